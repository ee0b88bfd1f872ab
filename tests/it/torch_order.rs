//! `kernel::torch_order` against torch itself: mergestream's model_stock in float32 takes its
//! cosines from torch's one-thread float32 `sum` and `norm`, reproduced bit for bit. Vectors of
//! every length class those kernels treat differently (the scalar path below 8 elements,
//! partial vectors, partial rows, each cascade level) go to torch in the test venv, and its
//! bits must be the crate's.

use crate::common::*;
use mergestream::kernel::torch_order::{CascadeSum, NormTwo};
use std::process::Command;

/// Deterministic values spread over many binades, of both signs, with exact zeros.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if s.is_multiple_of(97) {
                return 0.0;
            }
            let m = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            m * f32::powi(2.0, ((s >> 8) % 40) as i32 - 26)
        })
        .collect()
}

#[test]
fn sums_and_norms_are_torchs_bit_for_bit() {
    let py = test_python();
    if !has_python_modules(&py, "torch, numpy") {
        return;
    }
    // Every tail length several times (the norm's tail has three rules), then longer vectors.
    let mut lens: Vec<usize> = (0..=40).chain(0..=40).chain(0..=40).collect();
    lens.extend([
        63,
        64,
        65,
        255,
        256,
        257,
        511,
        512,
        513,
        4095,
        4096,
        4097,
        16_384 + 5,
    ]);
    // Two, three and four cascade levels, and a Llama-width row count.
    lens.extend([100_003, 1024 * 2816, 9_000_017]);
    let dir = tempdir();
    let mut cases = Vec::new();
    for (i, &n) in lens.iter().enumerate() {
        let x = values(n, i as u64 + 1);
        let path = dir.path().join(format!("{i}.f32"));
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, bytes).unwrap();
        cases.push((n, x, path));
    }
    let script = r#"
import sys, numpy as np, torch
torch.set_num_threads(1)
for p in sys.argv[1:]:
    x = torch.from_numpy(np.fromfile(p, dtype="<f4"))
    s = x.sum(dim=-1).numpy().view(np.uint32)
    n = torch.norm(x, dim=-1).numpy().view(np.uint32)
    print(int(s), int(n))
"#;
    let out = Command::new(&py)
        .arg("-c")
        .arg(script)
        .args(cases.iter().map(|c| &c.2))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), cases.len());
    for ((n, x, _), line) in cases.iter().zip(lines) {
        let want: Vec<u32> = line.split(' ').map(|v| v.parse().unwrap()).collect();
        // Pushed in uneven pieces, as chunks of a stream arrive.
        let (mut sum, mut norm) = (CascadeSum::new(*n as u64), NormTwo::new(*n as u64));
        for piece in x.chunks(4093.min((*n).max(1))) {
            sum.push(piece);
            norm.push(piece);
        }
        assert_eq!(sum.finish().to_bits(), want[0], "sum of {n}");
        assert_eq!(norm.finish().sqrt().to_bits(), want[1], "norm of {n}");
    }
}
