//! Unit and property tests of the N-input kernel: hand-derived cases (fused vs unfused,
//! rounding points, NaN rules, torch's reduction orders), and every SIMD path against the
//! scalar reference over raw bit patterns. The comparison with the independent numpy model
//! of mergekit is `tests/mergekit_ref.rs`.

use super::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const DTYPES: [FloatDtype; 3] = [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32];

fn bytes_of(dtype: FloatDtype, words: &[u32]) -> Vec<u8> {
    let mut v = vec![0u8; words.len() * dtype.size()];
    for (i, &w) in words.iter().enumerate() {
        write(&mut v, i, dtype, w);
    }
    v
}

fn words_of(dtype: FloatDtype, bytes: &[u8]) -> Vec<u32> {
    (0..bytes.len() / dtype.size())
        .map(|i| read(bytes, i, dtype))
        .collect()
}

/// Runs `op` on whole-tensor inputs given as words, cut into chunks of `chunk` elements
/// (to exercise offsets), returns the output words.
fn run(isa: Isa, op: &Combine, inputs: &[(Vec<u32>, FloatDtype)], chunk: usize) -> Vec<u32> {
    let n = inputs[0].0.len();
    let bytes: Vec<(Vec<u8>, FloatDtype)> =
        inputs.iter().map(|(w, d)| (bytes_of(*d, w), *d)).collect();
    let mut out = vec![0u8; n * op.out.size()];
    let mut start = 0;
    while start < n {
        let end = (start + chunk.max(1)).min(n);
        let slices: Vec<(&[u8], FloatDtype)> = bytes
            .iter()
            .map(|(b, d)| (&b[start * d.size()..end * d.size()], *d))
            .collect();
        combine(
            isa,
            op,
            start as u64,
            &slices,
            &mut out[start * op.out.size()..end * op.out.size()],
        );
        start = end;
    }
    words_of(op.out, &out)
}

fn f(x: f32) -> u32 {
    x.to_bits()
}

// ------------------------------------------------------------- constructor, API

#[test]
fn promote_is_torch_promote_types() {
    use FloatDtype::*;
    assert_eq!(promote([BF16, BF16]), Some(BF16));
    assert_eq!(promote([F16]), Some(F16));
    assert_eq!(promote([BF16, F16]), Some(F32));
    assert_eq!(promote([F16, F32, F16]), Some(F32));
    assert_eq!(promote([]), None);
}

#[test]
fn constructor_rounds_constants_like_mergekit() {
    // linear: weights are f32(w); the divisor is their f32 sum.
    let op = Combine::linear(&[0.1, 0.2, 0.3], true, FloatDtype::BF16, FloatDtype::BF16).unwrap();
    assert_eq!(op.coefficients, vec![0.1f32, 0.2f32, 0.3f32]);
    assert_eq!(op.divisor, Some((0.1f32 + 0.2f32) + 0.3f32));
    assert_eq!(op.inputs(), 3);
    // task arithmetic in BF16: python float -> f32 -> bf16 (double rounding):
    // 1 + 2^-8 + 2^-40 is 1 + 2^-8 in f32, a tie in bf16, -> 1.0 (direct rounding: 1 + 2^-7).
    let w = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
    let op = Combine::task_arithmetic(&[w, 0.5], true, 1.0, FloatDtype::BF16, FloatDtype::F32, 64)
        .unwrap();
    assert_eq!(op.coefficients, vec![1.0, 0.5]);
    assert_eq!(op.divisor, Some(1.5));
    assert_eq!(op.lambda, None);
    assert_eq!(op.inputs(), 3);
    // lambda != 1 is kept as f32, even when it rounds to 1.0 in f32.
    let op = Combine::task_arithmetic(
        &[1.0],
        false,
        1.0 + 1e-12,
        FloatDtype::F32,
        FloatDtype::F32,
        8,
    )
    .unwrap();
    assert_eq!(op.lambda, Some(1.0));
    assert_eq!(op.divisor, None);
}

#[test]
fn task_divisor_near_zero_becomes_one_per_dtype() {
    // weights summing to zero: |0| < c(1e-8) in BF16 and F32 -> 1; F16's c(1e-8) is 0, so
    // the divisor stays 0 (and mergekit divides by zero).
    for (c, want) in [
        (FloatDtype::BF16, 1.0),
        (FloatDtype::F32, 1.0),
        (FloatDtype::F16, 0.0),
    ] {
        let op = Combine::task_arithmetic(&[0.5, -0.5], true, 1.0, c, c, 16).unwrap();
        assert_eq!(op.divisor, Some(want), "{c}");
    }
    // f32(1e-8) itself is not below the threshold; the f32 just below is.
    let t = 1e-8f64 as f32;
    let below = f32::from_bits(t.to_bits() - 1);
    let op = Combine::task_arithmetic(&[t as f64], true, 1.0, FloatDtype::F32, FloatDtype::F32, 1)
        .unwrap();
    assert_eq!(op.divisor, Some(t));
    let op = Combine::task_arithmetic(
        &[below as f64],
        true,
        1.0,
        FloatDtype::F32,
        FloatDtype::F32,
        1,
    )
    .unwrap();
    assert_eq!(op.divisor, Some(1.0));
}

#[test]
fn constructor_errors() {
    assert_eq!(
        Combine::linear(&[], true, FloatDtype::BF16, FloatDtype::BF16),
        Err(CombineError::NoInputs {
            method: Method::Linear
        })
    );
    assert_eq!(
        Combine::task_arithmetic(&[], false, 1.0, FloatDtype::BF16, FloatDtype::BF16, 4),
        Err(CombineError::NoTaskModels)
    );
    assert!(matches!(
        Combine::linear(&[1.0, f64::NAN], true, FloatDtype::F32, FloatDtype::F32),
        Err(CombineError::NonFiniteWeight { index: 1, .. })
    ));
    // Finite as f64, infinite as f32.
    assert!(matches!(
        Combine::linear(&[1e39], false, FloatDtype::F32, FloatDtype::F32),
        Err(CombineError::NonFiniteWeight { index: 0, .. })
    ));
    // Finite as f32, overflows when rounded to F16 for task arithmetic.
    assert!(matches!(
        Combine::task_arithmetic(&[70000.0], false, 1.0, FloatDtype::F16, FloatDtype::F16, 4),
        Err(CombineError::NonFiniteWeight {
            index: 0,
            dtype: FloatDtype::F16,
            ..
        })
    ));
    assert!(matches!(
        Combine::task_arithmetic(
            &[1.0],
            false,
            f64::INFINITY,
            FloatDtype::F32,
            FloatDtype::F32,
            4
        ),
        Err(CombineError::NonFiniteLambda { .. })
    ));
    let e =
        Combine::linear(&[f64::INFINITY], true, FloatDtype::BF16, FloatDtype::BF16).unwrap_err();
    assert!(e.to_string().contains("weight inf of input 0"), "{e}");
}

#[test]
#[should_panic(expected = "inputs given")]
fn wrong_input_count_panics() {
    let op = Combine::linear(&[1.0, 1.0], false, FloatDtype::F32, FloatDtype::F32).unwrap();
    combine(
        Isa::Scalar,
        &op,
        0,
        &[(&[0; 4], FloatDtype::F32)],
        &mut [0; 4],
    );
}

#[test]
#[should_panic(expected = "expected 1 F32 elements")]
fn wrong_input_length_panics() {
    let op = Combine::linear(&[1.0], false, FloatDtype::F32, FloatDtype::BF16).unwrap();
    combine(
        Isa::Scalar,
        &op,
        0,
        &[(&[0; 8], FloatDtype::F32)],
        &mut [0; 2],
    );
}

#[test]
#[should_panic(expected = "run past")]
fn chunk_past_tensor_end_panics() {
    let op =
        Combine::task_arithmetic(&[1.0], false, 1.0, FloatDtype::F32, FloatDtype::F32, 2).unwrap();
    let z = [0u8; 8];
    combine(
        Isa::Scalar,
        &op,
        1,
        &[(&z, FloatDtype::F32), (&z, FloatDtype::F32)],
        &mut [0; 8],
    );
}

#[test]
fn unavailable_isa_panics_instead_of_running() {
    let op = Combine::linear(&[1.0], false, FloatDtype::BF16, FloatDtype::BF16).unwrap();
    for isa in [Isa::Avx2, Isa::Avx512] {
        if Isa::available().contains(&isa) {
            eprintln!("(this CPU has {isa}: nothing to check for it)");
            continue;
        }
        let r = std::panic::catch_unwind(|| {
            combine(isa, &op, 0, &[(&[0; 64], FloatDtype::BF16)], &mut [0; 64]);
        });
        assert!(r.is_err(), "{isa} must panic when unsupported");
    }
}

#[test]
fn empty_chunk_is_fine_on_every_isa() {
    let op = Combine::linear(&[1.0, 2.0], true, FloatDtype::BF16, FloatDtype::F16).unwrap();
    for isa in Isa::available() {
        combine(
            isa,
            &op,
            0,
            &[(&[], FloatDtype::BF16), (&[], FloatDtype::F32)],
            &mut [],
        );
    }
}

// --------------------------------------------------------- hand-derived semantics

fn scalar1(op: &Combine, xs: &[(u32, FloatDtype)]) -> u32 {
    let inputs: Vec<(Vec<u32>, FloatDtype)> = xs.iter().map(|&(w, d)| (vec![w], d)).collect();
    run(Isa::Scalar, op, &inputs, 1)[0]
}

#[test]
fn linear_is_fused_like_torch_addcmul() {
    // r = -1 (weight 1 on -1), then + (1 + 2^-12)(1 + 2^-12): unfused 2^-11, fused
    // 2^-11 + 2^-24. torch's AVX2/AVX-512 builds fuse.
    let t = 1.0f32 + 2f32.powi(-12);
    let op = Combine::linear(&[1.0, t as f64], false, FloatDtype::F32, FloatDtype::F32).unwrap();
    let got = scalar1(&op, &[(f(-1.0), FloatDtype::F32), (f(t), FloatDtype::F32)]);
    assert_eq!(got, f(2f32.powi(-11) + 2f32.powi(-24)));
}

#[test]
fn linear_bf16_accumulates_in_f32_and_rounds_once() {
    // BF16 inputs 1.0 and 2^-8 with weights 1: f32 sum 1 + 2^-8 is a BF16 tie -> 1.0; adding
    // a third 2^-8 gives 1 + 2^-7 exactly. Rounding per step would give 1.0 twice.
    let op = Combine::linear(&[1.0; 3], false, FloatDtype::BF16, FloatDtype::BF16).unwrap();
    let x = [
        (0x3F80, FloatDtype::BF16),
        (0x3B80, FloatDtype::BF16),
        (0x3B80, FloatDtype::BF16),
    ];
    assert_eq!(scalar1(&op, &x), 0x3F81);
    // Normalised: (1 + 2 * 2^-8) / 3 in f32, then BF16.
    let op = Combine::linear(&[1.0; 3], true, FloatDtype::BF16, FloatDtype::F32).unwrap();
    let want = store(
        (1.0f32 + 2f32.powi(-7)) / 3.0,
        FloatDtype::BF16,
        FloatDtype::F32,
    );
    assert_eq!(scalar1(&op, &x), want);
}

#[test]
fn storage_is_converted_to_compute_before_arithmetic() {
    // F32 input 1 + 2^-9 in a BF16 merge is rounded to BF16 (1.0) on load.
    let op = Combine::linear(&[2.0], false, FloatDtype::BF16, FloatDtype::F32).unwrap();
    assert_eq!(
        scalar1(&op, &[(f(1.0 + 2f32.powi(-9)), FloatDtype::F32)]),
        f(2.0)
    );
    // ... but kept in an F32 merge.
    let op = Combine::linear(&[2.0], false, FloatDtype::F32, FloatDtype::F32).unwrap();
    assert_eq!(
        scalar1(&op, &[(f(1.0 + 2f32.powi(-9)), FloatDtype::F32)]),
        f(2.0 + 2f32.powi(-8))
    );
}

#[test]
fn task_arithmetic_rounds_every_op_to_compute() {
    // BF16: base 1, x = 1 + 2^-7; d = 2^-7; * 0.3 (bf16 0x3E9A = 0.30078125) ->
    // 2^-7 * 0.30078125 = 0.00234985..., rounded to BF16; + base, rounded to BF16.
    let op =
        Combine::task_arithmetic(&[0.3], false, 1.0, FloatDtype::BF16, FloatDtype::F32, 1).unwrap();
    let w = bf16_to_f32(0x3E9A);
    assert_eq!(op.coefficients, vec![w]);
    let d = f32::from_bits((f32_to_bf16_rne(2f32.powi(-7) * w) as u32) << 16);
    let want = (f32_to_bf16_rne(1.0 + d) as u32) << 16;
    let got = scalar1(
        &op,
        &[(0x3F80, FloatDtype::BF16), (0x3F81, FloatDtype::BF16)],
    );
    assert_eq!(got, want);
}

#[test]
fn signed_zeros_follow_the_sums_from_plus_zero() {
    // linear: fma(-0, 1, +0) = +0.
    let op = Combine::linear(&[1.0], false, FloatDtype::F32, FloatDtype::F32).unwrap();
    assert_eq!(scalar1(&op, &[(0x8000_0000, FloatDtype::F32)]), 0);
    // task arithmetic: base -0, x -0: d = +0, sum +0, base + m = -0 + +0 = +0.
    let op =
        Combine::task_arithmetic(&[1.0], false, 1.0, FloatDtype::F32, FloatDtype::F32, 1).unwrap();
    let z = (0x8000_0000, FloatDtype::F32);
    assert_eq!(scalar1(&op, &[z, z]), 0);
}

#[test]
fn nan_rules() {
    use FloatDtype::*;
    // linear f32: the last NaN input wins (the tensor is the fma's priority operand).
    let op = Combine::linear(&[0.5, 0.5, 0.5], false, F32, F32).unwrap();
    let got = scalar1(
        &op,
        &[(0x7FC1_1111, F32), (0xFF82_2222, F32), (f(1.0), F32)],
    );
    assert_eq!(got, 0xFFC2_2222);
    // 0 * Inf is the x86 default NaN.
    let op = Combine::linear(&[0.0, 1.0], false, F32, F32).unwrap();
    assert_eq!(
        scalar1(&op, &[(f(f32::INFINITY), F32), (f(1.0), F32)]),
        DEFAULT_NAN
    );
    // Rounded to BF16: every NaN is 0xFFFF; to F16: sign + top payload bits, quiet.
    let op = Combine::linear(&[1.0], false, F32, BF16).unwrap();
    assert_eq!(scalar1(&op, &[(0x7FC1_1111, F32)]), 0xFFFF);
    let op = Combine::linear(&[1.0], false, F32, F16).unwrap();
    assert_eq!(scalar1(&op, &[(0x7F81_2345, F32)]), 0x7E09);
    assert_eq!(scalar1(&op, &[(0xFFFF_FFFF, F32)]), 0xFFFF);
    // F16 -> BF16 conversion makes NaN 0x7FC0 (torch converts through its scalar code).
    let op = Combine::linear(&[1.0], false, F16, BF16).unwrap();
    assert_eq!(scalar1(&op, &[(0xFD55, F16)]), 0x7FC0);
    // F16 storage widened: quieted, payload shifted.
    let op = Combine::linear(&[1.0], false, F32, F32).unwrap();
    assert_eq!(scalar1(&op, &[(0x7C01, F16)]), 0x7FC0_2000);
    // task arithmetic: a NaN base wins over model NaNs, else the first NaN model.
    let op = Combine::task_arithmetic(&[1.0, 1.0], true, 0.5, F32, F32, 1).unwrap();
    let one = (f(1.0), F32);
    assert_eq!(
        scalar1(&op, &[(0x7FC0_0001, F32), (0xFFC0_0002, F32), one]),
        0x7FC0_0001
    );
    assert_eq!(
        scalar1(&op, &[one, (0xFFC0_0002, F32), (0x7F80_0003, F32)]),
        0xFFC0_0002
    );
    assert_eq!(scalar1(&op, &[one, one, (0x7F80_0003, F32)]), 0x7FC0_0003);
}

#[test]
fn subnormals_are_kept() {
    // BF16 smallest subnormal * 3 with weight 1/2... 1.5 * 2^-133 ties to 2 * 2^-133.
    let op = Combine::linear(&[1.5], false, FloatDtype::BF16, FloatDtype::BF16).unwrap();
    assert_eq!(scalar1(&op, &[(0x0001, FloatDtype::BF16)]), 0x0002);
    // F32 subnormal arithmetic: 2^-149 * 2 = 2^-148.
    let op = Combine::linear(&[2.0], false, FloatDtype::F32, FloatDtype::F32).unwrap();
    assert_eq!(scalar1(&op, &[(1, FloatDtype::F32)]), 2);
}

#[test]
fn task_sum_order_depends_on_the_element_like_torch() {
    // Five task vectors 2^24, 1, 1, 1, 1 (f32): left to right from +0 the 1s are lost one at
    // a time (2^24 + 1 is a tie -> 2^24), giving 2^24; torch's interleaved partial sums
    // ((2^24 + 1) + 1) + 1 + 1 put the 5th into partial 0 first: ((0 + 2^24) + 1) = 2^24,
    // and partials 1..3 hold 1 each: 2^24 + 1 + 1 + 1 = 2^24. Use values where they differ:
    // d = [1, 2^24, -2^24, 1, 1]: sequential (((1 + 2^24) - 2^24) + 1) + 1 = 2;
    // interleaved p0 = 1 + 1 (item 4) = 2, p1 = 2^24, p2 = -2^24, p3 = 1:
    // ((2 + 2^24) - 2^24) + 1 = 3.
    let big = 16_777_216.0f32;
    let d = [1.0, big, -big, 1.0, 1.0];
    let numel = 40u64; // elements 0..32 cascade, 32..40 interleaved
    let op = Combine::task_arithmetic(
        &[1.0; 5],
        false,
        1.0,
        FloatDtype::F32,
        FloatDtype::F32,
        numel,
    )
    .unwrap();
    let mut inputs = vec![(vec![0u32; numel as usize], FloatDtype::F32)];
    for x in d {
        inputs.push((vec![f(x); numel as usize], FloatDtype::F32));
    }
    for isa in Isa::available() {
        for chunk in [1, 7, 40] {
            let got = run(isa, &op, &inputs, chunk);
            assert!(
                got[..32].iter().all(|&g| g == f(2.0)),
                "{isa} chunk {chunk}: {got:x?}"
            );
            assert!(
                got[32..].iter().all(|&g| g == f(3.0)),
                "{isa} chunk {chunk}: {got:x?}"
            );
        }
    }
}

#[test]
fn cascade_beyond_sixteen_task_vectors() {
    // 17 vectors: torch sums the first 16 as a block, then adds the 17th to the block sum:
    // d = [2^24, 1 x 15, 1]: block = 2^24 (each 1 lost), total = 1 + 2^24 = 2^24 (tie, even)
    // vs sequential also 2^24. Use d = [1 x 16, 2^24]: block = 16, then 2^24 + 16 exact.
    // And d = [2^24, 1 x 16]: block = 2^24, rest 1 -> 2^24 + 1 -> 2^24;
    // but 17 vectors [1, 2^24, -2^24, 1 x 14]: block (16 items) = 15, + 1 = 16.
    let cascade_sum = |d: &[f32]| cascade(d.len(), |i| d[i], false);
    let big = 16_777_216.0f32;
    let mut d = vec![1.0f32; 17];
    d[0] = big;
    // sequential: big + 1 + ... stays big (ties to even each time) = big; cascade: block 0
    // = big, the 17th item alone = 1, total big + 1 = big (tie). Same. Now make the 17th 3.
    d[16] = 3.0;
    // sequential: big (1s lost) + 3 = big + 4 (2^24 + 3 rounds to 2^24 + 4);
    // cascade: block 0 = big, remainder 3: 3 + big = big + 4. Same again; use two blocks:
    let mut e = vec![1.0f32; 33];
    e[0] = big;
    e[16] = -big;
    // sequential: big, then +1s lost, then -big -> 0, then +1 x 16 = 16.
    // cascade: block0 = big, block1 = -big + 15 = -big + 16 (rounded: -2^24 + 15 is exact?
    // 2^24 - 15 is representable) -> -16777201; acc1 = big + (-16777201) = 15; remainder 1
    // -> 1 + 15 = 16.
    assert_eq!(cascade_sum(&e), 16.0);
    let seq = e.iter().fold(0.0f32, |a, &x| a + x);
    assert_eq!(seq, 16.0);
    // A case where they differ: 2^24 first, then 1s in the next block only.
    let mut g = vec![0.0f32; 33];
    g[0] = big;
    for x in g.iter_mut().skip(16).take(16) {
        *x = 1.0;
    }
    // sequential: 2^24 + 1 (x16) = 2^24; cascade: block1 = 16, 2^24 + 16 exact.
    assert_eq!(g.iter().fold(0.0f32, |a, &x| a + x), big);
    assert_eq!(cascade_sum(&g), big + 16.0);
    let _ = d;
}

#[test]
fn sum_regions_match_torch_column_tails() {
    use FloatDtype::*;
    // >= one vector of the dtype: multiples of 32 cascade, then groups of 8, then scalar.
    let r = SumRegions::new(77, F32);
    assert_eq!(
        (r.cascade_end, r.vector_rows_end, r.vectorised),
        (64, 72, true)
    );
    let r = SumRegions::new(12, F32);
    assert_eq!(
        (r.cascade_end, r.vector_rows_end, r.vectorised),
        (0, 8, true)
    );
    // below one vector (8 f32 / 16 bf16, f16): groups of 4 columns cascade, rest scalar.
    let r = SumRegions::new(12, BF16);
    assert_eq!(
        (r.cascade_end, r.vector_rows_end, r.vectorised),
        (12, 12, false)
    );
    let r = SumRegions::new(7, F32);
    assert_eq!(
        (r.cascade_end, r.vector_rows_end, r.vectorised),
        (4, 4, false)
    );
    assert_eq!(SumRegions::new(1, F32).order(0, F32), SumOrder::Inner);
    assert_eq!(
        SumRegions::new(64, F32).order(9, F32),
        SumOrder::Cascade { level_first: true }
    );
    assert_eq!(
        SumRegions::new(64, F32).order(17, F32),
        SumOrder::Cascade { level_first: false }
    );
    assert_eq!(
        SumRegions::new(40, F16).order(33, F16),
        SumOrder::Interleaved {
            partial_first: [false, true, false, false]
        }
    );
    // simd_end: up to 3 task vectors every order agrees; up to 16 the cascade part.
    let op = |n: usize| Combine::task_arithmetic(&vec![1.0; n], false, 1.0, F32, F32, 77).unwrap();
    assert_eq!(op(3).simd_end, 77);
    assert_eq!(op(8).simd_end, 64);
    assert_eq!(op(17).simd_end, 0);
}

// ------------------------------------------------------------ SIMD == scalar

const BF16_SPECIALS: &[u32] = &[
    0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x807F, 0x0080, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0,
    0xFFC0, 0x7F81, 0xFF81, 0x7FFF, 0xFFFF, 0x7FA5, 0x3F80, 0x3F81, 0xBF80, 0x3B80,
];
const F16_SPECIALS: &[u32] = &[
    0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00,
    0xFE00, 0x7C01, 0xFC01, 0x7FFF, 0xFFFF, 0x7D55, 0x3C00, 0x3C01, 0xBC00, 0x1400,
];
const F32_SPECIALS: &[u32] = &[
    0x0000_0000,
    0x8000_0000,
    0x0000_0001,
    0x8000_0001,
    0x007F_FFFF,
    0x0080_0000,
    0x7F7F_FFFF,
    0xFF7F_FFFF,
    0x7F80_0000,
    0xFF80_0000,
    0x7FC0_0000,
    0xFFC0_0000,
    0x7F80_0001,
    0xFF80_0001,
    0x7FFF_FFFF,
    0x7FA1_2345,
    0x3F80_0000,
    0x3F80_0001,
    0x3380_0000,
    0x4B80_0000,
    0xCB80_0000,
];

fn element(dtype: FloatDtype) -> BoxedStrategy<u32> {
    let (specials, one, sign) = match dtype {
        FloatDtype::BF16 => (BF16_SPECIALS, 0x3F80u32, 0x8000u32),
        FloatDtype::F16 => (F16_SPECIALS, 0x3C00, 0x8000),
        FloatDtype::F32 => (F32_SPECIALS, 0x3F80_0000, 0x8000_0000),
    };
    let random = match dtype.size() {
        2 => any::<u16>().prop_map(u32::from).boxed(),
        _ => any::<u32>().boxed(),
    };
    prop_oneof![
        4 => random,
        2 => proptest::sample::select(specials),
        3 => (one - 24..one + 24, any::<bool>()).prop_map(move |(v, neg)| if neg { v | sign } else { v }),
    ]
    .boxed()
}

fn weight() -> BoxedStrategy<f64> {
    prop_oneof![
        3 => proptest::sample::select(vec![0.0, -0.0, 1.0, -1.0, 0.5, 0.25, 1.5, -0.3, 0.1, 1.0 / 3.0, 1e-30, 3e38, -2.0]),
        3 => -2.0f64..2.0,
        1 => -1e6f64..1e6,
    ]
    .boxed()
}

fn dtype() -> impl Strategy<Value = FloatDtype> {
    proptest::sample::select(DTYPES.to_vec())
}

/// A random op with 1..=8 inputs (task vectors: plus a base), inputs in mixed storage
/// dtypes, and a random number of elements and chunking.
#[derive(Debug, Clone)]
struct Case {
    method: Method,
    weights: Vec<f64>,
    normalize: bool,
    lambda: f64,
    compute: FloatDtype,
    out: FloatDtype,
    inputs: Vec<(Vec<u32>, FloatDtype)>,
    chunk: usize,
}

fn case(max_models: usize) -> impl Strategy<Value = Case> {
    (
        proptest::sample::select(vec![Method::Linear, Method::TaskArithmetic]),
        proptest::collection::vec(weight(), 1..=max_models),
        any::<bool>(),
        proptest::sample::select(vec![1.0, 0.5, -0.7, 0.0, 1.3]),
        dtype(),
        dtype(),
        dtype(),
        any::<bool>(),
        0usize..200,
        1usize..90,
    )
        .prop_flat_map(
            |(method, weights, normalize, lambda, compute, out, storage, mixed, n, chunk)| {
                let count = weights.len() + usize::from(method == Method::TaskArithmetic);
                let dtypes: BoxedStrategy<Vec<FloatDtype>> = if mixed {
                    proptest::collection::vec(dtype(), count).boxed()
                } else {
                    Just(vec![storage; count]).boxed()
                };
                dtypes.prop_flat_map(move |dts| {
                    let inputs: Vec<BoxedStrategy<(Vec<u32>, FloatDtype)>> = dts
                        .iter()
                        .map(|&d| {
                            proptest::collection::vec(element(d), n)
                                .prop_map(move |v| (v, d))
                                .boxed()
                        })
                        .collect();
                    let weights = weights.clone();
                    inputs.prop_map(move |inputs| Case {
                        method,
                        weights: weights.clone(),
                        normalize,
                        lambda,
                        compute,
                        out,
                        inputs,
                        chunk,
                    })
                })
            },
        )
}

fn runner() -> TestRunner {
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(_) => Config::default().cases,
        Err(_) => 300,
    };
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn op_of(c: &Case) -> Option<Combine> {
    let numel = c.inputs[0].0.len() as u64;
    Combine::new(&CombineParams {
        method: c.method,
        weights: &c.weights,
        normalize: c.normalize,
        lambda: c.lambda,
        compute: c.compute,
        out: c.out,
        numel,
    })
    .ok()
}

fn check_isa_matches_scalar(isa: Isa, max_models: usize) {
    if !Isa::available().contains(&isa) || !simd_capable(isa) {
        eprintln!(
            "SKIPPED: {} (with the features the N-input kernel needs) is not available on this \
             CPU; its N-input kernel is NOT compared to scalar",
            isa.name()
        );
        return;
    }
    runner()
        .run(&case(max_models), |c| {
            let Some(op) = op_of(&c) else {
                return Ok(());
            };
            let want = run(Isa::Scalar, &op, &c.inputs, usize::MAX);
            let got = run(isa, &op, &c.inputs, c.chunk);
            if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                let ins: Vec<String> = c
                    .inputs
                    .iter()
                    .map(|(w, d)| format!("{d}:{:#x}", w[i]))
                    .collect();
                prop_assert!(
                    false,
                    "{} {:?} differs from scalar at {} of {}: inputs {:?}: got {:#x}, scalar {:#x}",
                    isa.name(),
                    op,
                    i,
                    got.len(),
                    ins,
                    got[i],
                    want[i]
                );
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn avx2_matches_scalar() {
    check_isa_matches_scalar(Isa::Avx2, 8);
}

#[test]
fn avx512_matches_scalar() {
    check_isa_matches_scalar(Isa::Avx512, 8);
}

/// More than eight inputs: linear stays SIMD for any N, task vectors up to 16.
#[test]
fn simd_matches_scalar_with_many_inputs() {
    for isa in [Isa::Avx2, Isa::Avx512] {
        check_isa_matches_scalar(isa, 20);
    }
}

/// Chunking never changes the bytes (scalar path, element offsets).
#[test]
fn chunking_does_not_change_bytes() {
    runner()
        .run(&case(18), |c| {
            let Some(op) = op_of(&c) else {
                return Ok(());
            };
            let whole = run(Isa::Scalar, &op, &c.inputs, usize::MAX);
            let cut = run(Isa::Scalar, &op, &c.inputs, c.chunk);
            prop_assert_eq!(whole, cut);
            Ok(())
        })
        .unwrap();
}

/// Every 16-bit pattern as one input, through every (compute, out) pair, SIMD vs scalar.
#[test]
fn dense_16bit_simd_matches_scalar() {
    let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| {
            let ok = Isa::available().contains(&i) && simd_capable(i);
            if !ok {
                eprintln!(
                    "SKIPPED: {} not available; dense N-input check NOT run",
                    i.name()
                );
            }
            ok
        })
        .collect();
    let all: Vec<u32> = (0..=u16::MAX as u32).collect();
    let shifted: Vec<u32> = all.iter().map(|&x| x.rotate_left(7) & 0xFFFF).collect();
    for s in [FloatDtype::BF16, FloatDtype::F16] {
        for c in DTYPES {
            for o in DTYPES {
                for (method, weights) in [
                    (Method::Linear, vec![0.3, -1.7]),
                    (Method::TaskArithmetic, vec![0.3]),
                ] {
                    let op = Combine::new(&CombineParams {
                        method,
                        weights: &weights,
                        normalize: true,
                        lambda: 0.7,
                        compute: c,
                        out: o,
                        numel: all.len() as u64,
                    })
                    .unwrap();
                    let inputs = vec![(all.clone(), s), (shifted.clone(), s)];
                    let want = run(Isa::Scalar, &op, &inputs, usize::MAX);
                    for &isa in &isas {
                        let got = run(isa, &op, &inputs, 4099);
                        assert!(
                            got == want,
                            "{isa} {method} storage {s} compute {c} out {o}"
                        );
                    }
                }
            }
        }
    }
}
