//! AVX-512 (F + BW + VL) twin of the [`super::linear`] kernel (x86-64 only), bit-identical
//! to its scalar reference.
//!
//! The same algorithm as [`super::linear_avx2`] on 512-bit vectors, NaN lanes selected with
//! compare masks. Sixteen elements per step: every input is widened to f32 (BF16 by shifting, F16 with
//! `vcvtph2ps`, whose NaN handling is exactly torch's), rounded to the compute dtype when
//! its storage dtype differs, then the sequence of [`super::linear::Sequence`] runs on
//! packed f32 with `vfmadd` for the fused sum and separate `add`/`sub`/`mul`/`div` for task
//! vectors. After every instruction the NaN lanes are replaced by what the scalar rules say
//! (first NaN operand quieted, else the default NaN), so results never depend on which
//! operand order the compiler picks. Rounding to BF16 is the integer RNE trick; to F16 is
//! `vcvtps2ph` in RNE mode.
//!
//! What it deliberately does not do: no feature detection of its own (the dispatcher in
//! [`super::linear::combine`] checks avx512f, avx512bw and avx512vl), no partial steps (the caller runs
//! the leftover elements through the scalar path), no elements beyond
//! [`super::linear::Combine::simd_end`] (the caller only passes the SIMD part of a chunk),
//! no AVX512-BF16 or other conversion instructions that flush subnormals.

use std::arch::x86_64::*;

use super::linear::{Combine, Sequence, BF16_NAN_SCALAR, BF16_NAN_VECTOR, DEFAULT_NAN};
use super::FloatDtype;

/// RNE rounding for `vcvtps2ph`, exceptions suppressed.
const CVT_RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
const LANES: usize = 16;

// Compute/output dtypes as const generic parameters, so the per-element code is
// specialised once per call instead of branching per step.
const BF: u8 = 0;
const HF: u8 = 1;
const FL: u8 = 2;

fn code(d: FloatDtype) -> u8 {
    match d {
        FloatDtype::BF16 => BF,
        FloatDtype::F16 => HF,
        FloatDtype::F32 => FL,
    }
}

/// Runs `op` on the first `n - n % 16` elements of the chunk (`n` = elements of `out`) and
/// returns how many it did; the caller does the rest with the scalar path.
///
/// Inputs may be longer than `out` (only the elements `out` holds are read).
///
/// # Safety
///
/// A `#[target_feature]` function: the CPU must support avx512f, avx512bw and avx512vl. The caller has
/// checked that every input holds at least as many elements as `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub fn combine(op: &Combine, inputs: &[(&[u8], FloatDtype)], out: &mut [u8]) -> usize {
    macro_rules! go {
        ($c:expr, $o:expr) => {
            match op.sequence {
                Sequence::FusedSum => fused::<$c, $o>(op, inputs, out),
                Sequence::TaskVectors => task::<$c, $o>(op, inputs, out),
            }
        };
    }
    match (code(op.compute), code(op.out)) {
        (BF, BF) => go!(BF, BF),
        (BF, HF) => go!(BF, HF),
        (BF, FL) => go!(BF, FL),
        (HF, BF) => go!(HF, BF),
        (HF, HF) => go!(HF, HF),
        (HF, FL) => go!(HF, FL),
        (FL, BF) => go!(FL, BF),
        (FL, HF) => go!(FL, HF),
        _ => go!(FL, FL),
    }
}

// ------------------------------------------------------------------------ NaN rules

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn is_nan(v: __m512) -> __mmask16 {
    _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn quiet(v: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(v),
        _mm512_set1_epi32(0x0040_0000),
    ))
}

/// NaN lanes of `r` become the default NaN, then `b`'s NaN, then `a`'s (highest priority).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn pick(r: __m512, a: __m512, b: __m512) -> __m512 {
    let default = _mm512_castsi512_ps(_mm512_set1_epi32(DEFAULT_NAN as i32));
    let r = _mm512_mask_blend_ps(is_nan(r), r, default);
    let r = _mm512_mask_blend_ps(is_nan(b), r, quiet(b));
    _mm512_mask_blend_ps(is_nan(a), r, quiet(a))
}

/// `pick` for an operation whose second operand is a finite constant.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn pick1(r: __m512, a: __m512) -> __m512 {
    let default = _mm512_castsi512_ps(_mm512_set1_epi32(DEFAULT_NAN as i32));
    let r = _mm512_mask_blend_ps(is_nan(r), r, default);
    _mm512_mask_blend_ps(is_nan(a), r, quiet(a))
}

// ------------------------------------------------------------------ conversions

/// Rounds f32 lanes to BF16 (RNE), leaving the BF16 bits in the low half of each lane;
/// NaN lanes become `nan`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn bf16_bits(v: __m512, nan: u16) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        _mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)),
        lsb,
    ));
    _mm512_mask_blend_epi32(is_nan(v), r, _mm512_set1_epi32(nan as i32))
}

/// f32 lanes rounded to dtype `C` and widened back (a rounding point), with the BF16 NaN
/// encoding `nan`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn round_to<const C: u8>(v: __m512, nan: u16) -> __m512 {
    match C {
        BF => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bf16_bits(v, nan))),
        HF => _mm512_cvtph_ps(_mm512_cvtps_ph::<CVT_RNE>(v)),
        _ => v,
    }
}

/// Runtime-dtype version of [`round_to`] for input conversions.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn round_dyn(v: __m512, c: FloatDtype, nan: u16) -> __m512 {
    match c {
        FloatDtype::BF16 => round_to::<BF>(v, nan),
        FloatDtype::F16 => round_to::<HF>(v, nan),
        FloatDtype::F32 => v,
    }
}

/// Sixteen elements `i..i + 16` of an input, widened to f32 and converted to compute dtype `c`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn load(bytes: &[u8], i: usize, s: FloatDtype, c: FloatDtype) -> __m512 {
    let chunk = &bytes[i * s.size()..(i + LANES) * s.size()];
    let v = match s {
        FloatDtype::BF16 => {
            // SAFETY: `chunk` is exactly 16 BF16 elements = 32 bytes, the size of the
            // unaligned 256-bit load.
            let h = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
        FloatDtype::F16 => {
            // SAFETY: `chunk` is exactly 16 F16 elements = 32 bytes.
            let h = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
            _mm512_cvtph_ps(h)
        }
        // SAFETY: `chunk` is exactly 16 F32 elements = 64 bytes, the size of the load.
        FloatDtype::F32 => unsafe { _mm512_loadu_ps(chunk.as_ptr().cast()) },
    };
    if s == c {
        v
    } else {
        let nan = if s == FloatDtype::F16 {
            BF16_NAN_SCALAR
        } else {
            BF16_NAN_VECTOR
        };
        round_dyn(v, c, nan)
    }
}

/// Writes the final f32 lanes `v`: rounded to the compute dtype `C`, converted to `O`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn store<const C: u8, const O: u8>(out: &mut [u8], i: usize, v: __m512) {
    let v = round_to::<C>(v, BF16_NAN_VECTOR);
    match O {
        BF => {
            let nan = if C == HF {
                BF16_NAN_SCALAR
            } else {
                BF16_NAN_VECTOR
            };
            // Lanes hold values <= 0xFFFF: truncating each to 16 bits is exact.
            let packed = _mm512_cvtepi32_epi16(bf16_bits(v, nan));
            let chunk = &mut out[2 * i..2 * (i + LANES)];
            // SAFETY: `chunk` is exactly 32 bytes, the size of the unaligned store.
            unsafe { _mm256_storeu_si256(chunk.as_mut_ptr().cast(), packed) };
        }
        HF => {
            let h = _mm512_cvtps_ph::<CVT_RNE>(v);
            let chunk = &mut out[2 * i..2 * (i + LANES)];
            // SAFETY: `chunk` is exactly 32 bytes.
            unsafe { _mm256_storeu_si256(chunk.as_mut_ptr().cast(), h) };
        }
        _ => {
            let chunk = &mut out[4 * i..4 * (i + LANES)];
            // SAFETY: `chunk` is exactly 64 bytes.
            unsafe { _mm512_storeu_ps(chunk.as_mut_ptr().cast(), v) };
        }
    }
}

fn dtype_of<const C: u8>() -> FloatDtype {
    match C {
        BF => FloatDtype::BF16,
        HF => FloatDtype::F16,
        _ => FloatDtype::F32,
    }
}

// ------------------------------------------------------------------------ sequences

/// Whether any lane of `v` is NaN.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn any_nan(v: __m512) -> bool {
    is_nan(v) != 0
}

// Each step first runs the plain arithmetic. NaN never turns back into a number in these
// sequences (every operation and rounding point maps NaN to NaN), so if no result lane is
// NaN, no intermediate was either and the plain result is exact. Only a vector with a NaN
// result lane is recomputed with the NaN rules applied after every operation. Two vectors
// go through each step, interleaved, so that their dependency chains overlap.

/// The fused sum of the vector at element `i` with the NaN rules.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn fused_nan(op: &Combine, inputs: &[(&[u8], FloatDtype)], i: usize, c: FloatDtype) -> __m512 {
    let mut r = _mm512_setzero_ps();
    for ((bytes, s), &w) in inputs.iter().zip(&op.coefficients) {
        let x = load(bytes, i, *s, c);
        // w is finite by construction, so only x and r take part in the NaN rule.
        r = pick(_mm512_fmadd_ps(x, _mm512_set1_ps(w), r), x, r);
    }
    if let Some(d) = op.divisor {
        let d = _mm512_set1_ps(d);
        r = pick(_mm512_div_ps(r, d), r, d);
    }
    r
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn fused<const C: u8, const O: u8>(
    op: &Combine,
    inputs: &[(&[u8], FloatDtype)],
    out: &mut [u8],
) -> usize {
    let c = dtype_of::<C>();
    let n = out.len() / dtype_of::<O>().size();
    let divisor = op.divisor.map(|x| _mm512_set1_ps(x));
    let mut i = 0;
    while i + 2 * LANES <= n {
        let (mut r0, mut r1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for ((bytes, s), &w) in inputs.iter().zip(&op.coefficients) {
            let w = _mm512_set1_ps(w);
            r0 = _mm512_fmadd_ps(load(bytes, i, *s, c), w, r0);
            r1 = _mm512_fmadd_ps(load(bytes, i + LANES, *s, c), w, r1);
        }
        if let Some(d) = divisor {
            r0 = _mm512_div_ps(r0, d);
            r1 = _mm512_div_ps(r1, d);
        }
        for (k, r) in [(i, r0), (i + LANES, r1)] {
            let r = if any_nan(r) {
                fused_nan(op, inputs, k, c)
            } else {
                r
            };
            store::<C, O>(out, k, r);
        }
        i += 2 * LANES;
    }
    while i + LANES <= n {
        let mut r = _mm512_setzero_ps();
        for ((bytes, s), &w) in inputs.iter().zip(&op.coefficients) {
            r = _mm512_fmadd_ps(load(bytes, i, *s, c), _mm512_set1_ps(w), r);
        }
        if let Some(d) = divisor {
            r = _mm512_div_ps(r, d);
        }
        let r = if any_nan(r) {
            fused_nan(op, inputs, i, c)
        } else {
            r
        };
        store::<C, O>(out, i, r);
        i += LANES;
    }
    i
}

/// The task-vector sequence of the vector at element `i` with the NaN rules.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn task_nan<const C: u8>(op: &Combine, inputs: &[(&[u8], FloatDtype)], i: usize) -> __m512 {
    let c = dtype_of::<C>();
    let ((base, base_dtype), models) = (&inputs[0], &inputs[1..]);
    let b = load(base, i, *base_dtype, c);
    let zero = _mm512_setzero_ps();
    let mut acc = zero;
    for ((bytes, s), &w) in models.iter().zip(&op.coefficients) {
        let x = load(bytes, i, *s, c);
        let d = round_to::<C>(pick(_mm512_sub_ps(x, b), x, b), BF16_NAN_VECTOR);
        let d = round_to::<C>(
            pick1(_mm512_mul_ps(d, _mm512_set1_ps(w)), d),
            BF16_NAN_VECTOR,
        );
        acc = pick(_mm512_add_ps(acc, d), acc, d);
    }
    // The sum is stored into a zero-filled tensor by torch's scalar code.
    let mut m = round_to::<C>(pick1(_mm512_add_ps(zero, acc), acc), BF16_NAN_SCALAR);
    if let Some(s) = op.divisor {
        let s = _mm512_set1_ps(s);
        m = round_to::<C>(pick(_mm512_div_ps(m, s), m, s), BF16_NAN_VECTOR);
    }
    if let Some(l) = op.lambda {
        m = round_to::<C>(
            pick1(_mm512_mul_ps(m, _mm512_set1_ps(l)), m),
            BF16_NAN_VECTOR,
        );
    }
    pick(_mm512_add_ps(b, m), b, m)
}

/// What follows the sum in the task-vector sequence, without the NaN rules.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn task_finish<const C: u8>(
    b: __m512,
    acc: __m512,
    divisor: Option<__m512>,
    lambda: Option<__m512>,
) -> __m512 {
    let mut m = round_to::<C>(_mm512_add_ps(_mm512_setzero_ps(), acc), BF16_NAN_SCALAR);
    if let Some(s) = divisor {
        m = round_to::<C>(_mm512_div_ps(m, s), BF16_NAN_VECTOR);
    }
    if let Some(l) = lambda {
        m = round_to::<C>(_mm512_mul_ps(m, l), BF16_NAN_VECTOR);
    }
    _mm512_add_ps(b, m)
}

/// One task vector `c(c(x - b) * w)`, without the NaN rules.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn task_delta<const C: u8>(x: __m512, b: __m512, w: __m512) -> __m512 {
    let d = round_to::<C>(_mm512_sub_ps(x, b), BF16_NAN_VECTOR);
    round_to::<C>(_mm512_mul_ps(d, w), BF16_NAN_VECTOR)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn task<const C: u8, const O: u8>(
    op: &Combine,
    inputs: &[(&[u8], FloatDtype)],
    out: &mut [u8],
) -> usize {
    let c = dtype_of::<C>();
    let n = out.len() / dtype_of::<O>().size();
    let Some(((base, base_dtype), models)) = inputs.split_first() else {
        return 0;
    };
    let divisor = op.divisor.map(|x| _mm512_set1_ps(x));
    let lambda = op.lambda.map(|x| _mm512_set1_ps(x));
    // Left to right from +0: the only order below `simd_end`.
    let mut i = 0;
    while i + 2 * LANES <= n {
        let b0 = load(base, i, *base_dtype, c);
        let b1 = load(base, i + LANES, *base_dtype, c);
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for ((bytes, s), &w) in models.iter().zip(&op.coefficients) {
            let w = _mm512_set1_ps(w);
            acc0 = _mm512_add_ps(acc0, task_delta::<C>(load(bytes, i, *s, c), b0, w));
            acc1 = _mm512_add_ps(acc1, task_delta::<C>(load(bytes, i + LANES, *s, c), b1, w));
        }
        let r0 = task_finish::<C>(b0, acc0, divisor, lambda);
        let r1 = task_finish::<C>(b1, acc1, divisor, lambda);
        for (k, r) in [(i, r0), (i + LANES, r1)] {
            let r = if any_nan(r) {
                task_nan::<C>(op, inputs, k)
            } else {
                r
            };
            store::<C, O>(out, k, r);
        }
        i += 2 * LANES;
    }
    while i + LANES <= n {
        let b = load(base, i, *base_dtype, c);
        let mut acc = _mm512_setzero_ps();
        for ((bytes, s), &w) in models.iter().zip(&op.coefficients) {
            acc = _mm512_add_ps(
                acc,
                task_delta::<C>(load(bytes, i, *s, c), b, _mm512_set1_ps(w)),
            );
        }
        let r = task_finish::<C>(b, acc, divisor, lambda);
        let r = if any_nan(r) {
            task_nan::<C>(op, inputs, i)
        } else {
            r
        };
        store::<C, O>(out, i, r);
        i += LANES;
    }
    i
}
