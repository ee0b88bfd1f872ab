//! `kernel::torch_order` against torch itself: mergestream's model_stock in float32 takes its
//! cosines from torch's one-thread float32 `sum` and `norm`, reproduced bit for bit. Vectors of
//! every length class those kernels treat differently (the scalar path below 8 elements,
//! partial vectors, partial rows, each cascade level) go to torch in the test venv, and its
//! bits must be the crate's.

use crate::common::*;
use mergestream::kernel::torch_order::{CascadeSum, Load, NormTwo};
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
    let files: Vec<_> = cases.iter().map(|c| c.2.clone()).collect();
    let lines = torch_lines(&py, script, &files);
    assert_eq!(lines.len(), cases.len());
    for ((n, x, _), want) in cases.iter().zip(&lines) {
        // Pushed in uneven pieces, as chunks of a stream arrive.
        let (mut sum, mut norm) = (
            CascadeSum::new(*n as u64, Load::F32),
            NormTwo::new(*n as u64, Load::F32),
        );
        for piece in x.chunks(4093.min((*n).max(1))) {
            sum.push(piece);
            norm.push(piece);
        }
        assert_eq!(sum.finish().to_bits() as u64, want[0], "sum of {n}");
        assert_eq!(
            norm.finish().sqrt().to_bits() as u64,
            want[1],
            "norm of {n}"
        );
    }
}

/// Values whose halves cancel (`v` and `-v` shuffled, plus small noise), as 16-bit bits: the
/// float sum of such a vector is all rounding error, so its 16-bit result tells orders apart.
fn cancelling(n: usize, seed: u64, to_bits: fn(f32) -> u16, from_bits: fn(u16) -> f32) -> Vec<u16> {
    let base = values(n / 2, seed);
    let noise = values(n, seed ^ 0xABCD);
    let mut x: Vec<f32> = base.iter().flat_map(|&v| [v, -v]).collect();
    x.extend(values(n - x.len(), seed + 1));
    let mut bits: Vec<u16> = x
        .iter()
        .zip(&noise)
        .map(|(&v, &e)| to_bits(from_bits(to_bits(v)) + e * 1e-3))
        .collect();
    // A fixed shuffle.
    let mut s = seed | 1;
    for i in (1..bits.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        bits.swap(i, (s % (i as u64 + 1)) as usize);
    }
    bits
}

/// Runs `script` on `files` in the test venv, one line of integers per file.
fn torch_lines(py: &std::path::Path, script: &str, files: &[std::path::PathBuf]) -> Vec<Vec<u64>> {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').map(|v| v.parse().unwrap()).collect())
        .collect()
}

#[test]
fn sixteen_bit_sums_and_norms_are_torchs() {
    let py = test_python();
    if !has_python_modules(&py, "torch, numpy") {
        return;
    }
    type Conv = (fn(f32) -> u16, fn(u16) -> f32);
    let kinds: [(&str, Load, Conv); 2] = [
        (
            "bfloat16",
            Load::Bf16,
            (
                |v| half::bf16::from_f32(v).to_bits(),
                |b| half::bf16::from_bits(b).to_f32(),
            ),
        ),
        (
            "float16",
            Load::F16,
            (
                |v| half::f16::from_f32(v).to_bits(),
                |b| half::f16::from_bits(b).to_f32(),
            ),
        ),
    ];
    let dir = tempdir();
    let script = r#"
import sys, numpy as np, torch
torch.set_num_threads(1)
dt = getattr(torch, sys.argv[1])
for p in sys.argv[2:]:
    x = torch.from_numpy(np.fromfile(p, dtype="<i2")).view(dt)
    print(int(x.sum(dim=-1).view(torch.int16)) & 0xFFFF, int(torch.norm(x, dim=-1).view(torch.int16)) & 0xFFFF)
"#;
    for (name, load, (to_bits, from_bits)) in kinds {
        let mut cases = Vec::new();
        // Sums: every length class, cancelling.
        for n in (1..=70).chain([255, 256, 257, 1000, 4096 + 9, 70_001]) {
            cases.push(cancelling(n, n as u64, to_bits, from_bits));
        }
        // Norms: a huge first element owns lane 0; small ones at every 16th element from the
        // 8th land in lane 0 (and vanish into it) with 8 lanes (or one), in lane 8 with 16.
        let n = 1 << 23;
        let (big, small) = if name == "bfloat16" {
            (32768.0, 6.0)
        } else {
            (128.0, 0.03)
        };
        let mut lanes = vec![to_bits(0.0); n];
        lanes[0] = to_bits(big);
        for i in (8..n).step_by(16) {
            lanes[i] = to_bits(small);
        }
        cases.push(lanes);
        // Norms: long vectors of small values, whose float accumulation errors reach the
        // 16-bit result (one accumulator and eight round differently on some of them).
        for seed in 0..6u64 {
            let n = 1_000_000 + 77_777 * seed as usize;
            let v = values(n, seed + 100);
            cases.push(
                v.iter()
                    .map(|&x| to_bits(x.clamp(-0.5, 0.5) * 0.004))
                    .collect(),
            );
        }
        let files: Vec<_> = cases
            .iter()
            .enumerate()
            .map(|(i, bits)| {
                let path = dir.path().join(format!("{name}-{i}.bin"));
                let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
                std::fs::write(&path, bytes).unwrap();
                path
            })
            .collect();
        let mut args = vec![std::path::PathBuf::from(name)];
        args.extend(files);
        let want = torch_lines(&py, script, &args);
        assert_eq!(want.len(), cases.len());
        for (bits, want) in cases.iter().zip(&want) {
            let x: Vec<f32> = bits.iter().map(|&b| from_bits(b)).collect();
            let (mut sum, mut norm) = (
                CascadeSum::new(x.len() as u64, load),
                NormTwo::new(x.len() as u64, load),
            );
            for piece in x.chunks(4093) {
                sum.push(piece);
                norm.push(piece);
            }
            let n = x.len();
            assert_eq!(to_bits(sum.finish()) as u64, want[0], "{name} sum of {n}");
            assert_eq!(
                to_bits(norm.finish().sqrt()) as u64,
                want[1],
                "{name} norm of {n}"
            );
        }
    }
}
