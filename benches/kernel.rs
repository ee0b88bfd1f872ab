//! Throughput of the ExPO kernel (`mergestream::kernel::expo`) for every
//! instruction set this CPU supports × every dtype, on 1 Mi elements, and of the
//! N-input kernel (`mergestream::kernel::linear::combine`: mergekit's linear and
//! task_arithmetic) for 3 and 8 inputs, and of torch's float32 reduction order
//! (`mergestream::kernel::torch_order`: model_stock's float32 norms and dots, folded in order on
//! one thread, so their speed bounds that reduction pass).
//! Throughput is reported as bytes of *input* (all inputs) per second.
//!
//! What it deliberately does not do: no file I/O, threading or end-to-end
//! merge timing, and no correctness checks (those are the kernel's unit
//! tests). Inputs are finite normal values; special values cost the SIMD
//! paths nothing extra, so they are not benchmarked separately.

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mergestream::kernel::linear::{combine, Combine};
use mergestream::kernel::torch_order::{CascadeSum, Load, NormTwo};
use mergestream::kernel::{expo, FloatDtype, Isa};

const N: usize = 1 << 20;

/// Deterministic pseudo-random f32 values in roughly [-1, 1), encoded as `dtype`.
fn data(dtype: FloatDtype, seed: u32) -> Vec<u8> {
    let mut x = seed;
    let mut bytes = Vec::with_capacity(N * dtype.size());
    for _ in 0..N {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let v = (x as f32 / u32::MAX as f32) * 2.0 - 1.0;
        match dtype {
            FloatDtype::BF16 => bytes.extend(half::bf16::from_f32(v).to_le_bytes()),
            FloatDtype::F16 => bytes.extend(half::f16::from_f32(v).to_le_bytes()),
            FloatDtype::F32 => bytes.extend(v.to_le_bytes()),
        }
    }
    bytes
}

fn bench_expo(c: &mut Criterion) {
    let mut group = c.benchmark_group("expo");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for dtype in [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32] {
        let a = data(dtype, 0x1234_5678);
        let s = data(dtype, 0x9ABC_DEF1);
        let mut out = vec![0u8; a.len()];
        group.throughput(Throughput::Bytes((2 * N * dtype.size()) as u64));
        for isa in Isa::available() {
            group.bench_function(format!("{}/{}", isa.name(), dtype.name()), |b| {
                b.iter(|| expo(isa, dtype, black_box(0.3), &a, &s, &mut out));
            });
        }
    }
    group.finish();
}

fn bench_combine(c: &mut Criterion) {
    let mut group = c.benchmark_group("combine");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for dtype in [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32] {
        for models in [3usize, 8] {
            let inputs: Vec<Vec<u8>> = (0..=models as u32)
                .map(|i| data(dtype, 0x1234_5678 ^ i.wrapping_mul(0x9E37_79B9)))
                .collect();
            let weights: Vec<f64> = (0..models).map(|i| 0.1 + 0.05 * i as f64).collect();
            let ops = [
                (
                    "linear",
                    Combine::linear(&weights, true, dtype, dtype).unwrap(),
                    &inputs[..models],
                ),
                (
                    "task_arithmetic",
                    Combine::task_arithmetic(&weights, true, 0.8, dtype, dtype, N as u64).unwrap(),
                    &inputs[..],
                ),
            ];
            let mut out = vec![0u8; N * dtype.size()];
            for (name, op, ins) in &ops {
                let slices: Vec<(&[u8], FloatDtype)> =
                    ins.iter().map(|b| (b.as_slice(), dtype)).collect();
                group.throughput(Throughput::Bytes((slices.len() * N * dtype.size()) as u64));
                for isa in Isa::available() {
                    let id = format!("{name}x{models}/{}/{}", isa.name(), dtype.name());
                    group.bench_function(id, |b| {
                        b.iter(|| combine(isa, op, 0, black_box(&slices), &mut out));
                    });
                }
            }
        }
    }
    group.finish();
}

fn bench_torch_order(c: &mut Criterion) {
    let mut group = c.benchmark_group("torch_order");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let x: Vec<f32> = data(FloatDtype::F32, 0x2468_ACE1)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    group.throughput(Throughput::Bytes((N * 4) as u64));
    group.bench_function("cascade_sum", |b| {
        b.iter(|| {
            let mut s = CascadeSum::new(N as u64, Load::F32);
            for piece in x.chunks(1024) {
                s.push(black_box(piece));
            }
            s.finish()
        });
    });
    group.bench_function("norm_two", |b| {
        b.iter(|| {
            let mut s = NormTwo::new(N as u64, Load::F32);
            for piece in x.chunks(1024) {
                s.push(black_box(piece));
            }
            s.finish()
        });
    });
    group.finish();
}

criterion_group!(benches, bench_expo, bench_combine, bench_torch_order);
criterion_main!(benches);
