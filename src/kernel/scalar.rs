//! Portable ExPO kernel: the bit-exact reference for every SIMD path and the
//! implementation used on CPUs without one (aarch64/NEON, x86 without AVX2,
//! ...).
//!
//! It is plain safe Rust written for LLVM's auto-vectorizer: the main loop
//! works on fixed-size blocks of [`LANES`] elements held in local arrays, and
//! every per-element step (widening, `a - s`, `alpha * d`, `a + t`,
//! round-to-nearest-even narrowing, NaN canonicalization) is branch-free
//! integer/float arithmetic plus selects. The `expo_element_*` functions are
//! the per-element definition of the result and are what the block loop and
//! the tail both call, so there is a single source of truth.
//!
//! What it deliberately does not do: no `unsafe`, no `half` crate on the hot
//! path (its conversions branch per element or call out-of-line intrinsics),
//! no `mul_add` (the merge is defined as unfused), no special-casing of
//! `alpha` values, and no attempt to preserve NaN payloads: every NaN result
//! becomes the dtype's canonical positive quiet NaN (see the parent module).

use super::FloatDtype;

/// Canonical positive quiet NaN, BF16 bits.
pub const BF16_NAN: u16 = 0x7FC0;
/// Canonical positive quiet NaN, F16 bits.
pub const F16_NAN: u16 = 0x7E00;
/// Canonical positive quiet NaN, F32 bits.
pub const F32_NAN: u32 = 0x7FC0_0000;

/// Elements per block of the auto-vectorized main loop.
pub const LANES: usize = 16;

/// Exact widening of BF16 bits to `f32`.
#[inline(always)]
pub(crate) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `f32` to BF16 bits, round-to-nearest-even; overflow rounds to ±Inf and
/// subnormals are kept. Meaningless for NaN input (callers canonicalize).
#[inline(always)]
pub(crate) fn f32_to_bf16_rne(x: f32) -> u16 {
    let b = x.to_bits();
    // wrapping: NaN bit patterns near 0xFFFF_FFFF may wrap; their result is
    // discarded by the caller's NaN select.
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// Exact widening of F16 bits to `f32`, branch-free (selects only).
/// NaN payloads are shifted along, not quieted (callers canonicalize NaN).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    const EXP_MASK: u32 = 0x7C00 << 13; // F16 exponent field, moved to f32 position
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = (h & 0x7FFF) << 13; // exponent + mantissa bits in f32 position
    let exp = em & EXP_MASK;
    // Normal: rebias the exponent by 127 - 15 = 112.
    let normal = em + (112 << 23);
    // Inf/NaN: exponent all-ones, rebias by 2 * 112 to reach 255.
    let inf_nan = em + (224 << 23);
    // Zero/subnormal: m * 2^-24 computed exactly as (2^-14 + m * 2^-24) - 2^-14.
    let magic = f32::from_bits(113 << 23); // 2^-14
    let sub = (f32::from_bits(em + (113 << 23)) - magic).to_bits();
    let r = if exp == EXP_MASK {
        inf_nan
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    f32::from_bits(r | sign)
}

/// `f32` to F16 bits, IEEE round-to-nearest-even including overflow to ±Inf
/// and F16 subnormals; branch-free (selects only). NaN maps to a quiet NaN
/// of the same sign, but callers canonicalize NaN anyway.
#[inline(always)]
pub(crate) fn f32_to_f16_rne(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let abs = bits & 0x7FFF_FFFF;
    // |x| >= 65536 (or Inf/NaN): beyond anything that rounds to a finite F16.
    // (65520 <= |x| < 65536 rounds to Inf through the normal path's carry.)
    let inf_nan = if abs > 0x7F80_0000 { 0x7E00 } else { 0x7C00 };
    // |x| < 2^-14: F16 zero/subnormal. Adding 0.5 makes the f32 ulp 2^-24,
    // the F16 subnormal spacing, so the (RNE) float add does the rounding;
    // subtracting 0.5's bits leaves the F16 bits (0x400 if it rounded up to
    // the smallest normal, which is correct).
    let half_bits: u32 = 126 << 23; // 0.5
    let sub = (f32::from_bits(abs) + f32::from_bits(half_bits))
        .to_bits()
        .wrapping_sub(half_bits);
    // Normal: rebias exponent (-112), then RNE on the 13 dropped bits. A carry
    // out of the mantissa bumps the exponent, up to 0x7C00 (Inf) if needed.
    let mant_odd = (abs >> 13) & 1;
    let normal = abs.wrapping_sub(112 << 23).wrapping_add(0xFFF + mant_odd) >> 13;
    let r = if abs >= 0x4780_0000 {
        inf_nan
    } else if abs < (113 << 23) {
        sub
    } else {
        normal
    };
    (r | sign) as u16
}

/// The ExPO arithmetic in `f32`: three separately rounded operations.
#[inline(always)]
fn expo_f32(a: f32, s: f32, alpha: f32) -> f32 {
    let d = a - s;
    let t = alpha * d;
    a + t
}

/// One BF16 element: `round_bf16(a + alpha * (a - s))`, NaN canonicalized.
#[inline(always)]
pub fn expo_element_bf16(a: u16, s: u16, alpha: f32) -> u16 {
    let o = expo_f32(bf16_to_f32(a), bf16_to_f32(s), alpha);
    let r = f32_to_bf16_rne(o);
    if o.is_nan() {
        BF16_NAN
    } else {
        r
    }
}

/// One F16 element: `round_f16(a + alpha * (a - s))`, NaN canonicalized.
#[inline(always)]
pub fn expo_element_f16(a: u16, s: u16, alpha: f32) -> u16 {
    let o = expo_f32(f16_to_f32(a), f16_to_f32(s), alpha);
    let r = f32_to_f16_rne(o);
    if o.is_nan() {
        F16_NAN
    } else {
        r
    }
}

/// One F32 element (as bits): `a + alpha * (a - s)`, NaN canonicalized.
#[inline(always)]
pub fn expo_element_f32(a: u32, s: u32, alpha: f32) -> u32 {
    let o = expo_f32(f32::from_bits(a), f32::from_bits(s), alpha);
    if o.is_nan() {
        F32_NAN
    } else {
        o.to_bits()
    }
}

/// Applies `elem` to every pair of little-endian `W`-byte words of `a` and
/// `s`, writing to `out`. Blocks of [`LANES`] elements go through fixed-size
/// local arrays so that LLVM vectorizes the block body; the remainder is done
/// one element at a time with the same `elem`.
#[inline(always)]
fn map_words<const W: usize, T: Copy + Default>(
    a: &[u8],
    s: &[u8],
    out: &mut [u8],
    load: impl Fn([u8; W]) -> T,
    store: impl Fn(T) -> [u8; W],
    elem: impl Fn(T, T) -> T,
) {
    let block = W * LANES;
    let mut ab = a.chunks_exact(block);
    let mut sb = s.chunks_exact(block);
    let mut ob = out.chunks_exact_mut(block);
    for ((ac, sc), oc) in (&mut ab).zip(&mut sb).zip(&mut ob) {
        let mut r = [T::default(); LANES];
        for (i, ri) in r.iter_mut().enumerate() {
            let x = load(ac[W * i..W * i + W].try_into().unwrap());
            let y = load(sc[W * i..W * i + W].try_into().unwrap());
            *ri = elem(x, y);
        }
        for (i, ri) in r.iter().enumerate() {
            oc[W * i..W * i + W].copy_from_slice(&store(*ri));
        }
    }
    let tail = ab
        .remainder()
        .chunks_exact(W)
        .zip(sb.remainder().chunks_exact(W))
        .zip(ob.into_remainder().chunks_exact_mut(W));
    for ((x, y), o) in tail {
        let r = elem(load(x.try_into().unwrap()), load(y.try_into().unwrap()));
        o.copy_from_slice(&store(r));
    }
}

/// The portable kernel; same contract as [`super::expo`] minus dispatch.
///
/// # Panics
///
/// If the slice lengths differ or are not a multiple of `dtype.size()`.
pub fn expo(dtype: FloatDtype, alpha: f32, aligned: &[u8], sft: &[u8], out: &mut [u8]) {
    assert!(aligned.len() == sft.len() && aligned.len() == out.len());
    assert!(aligned.len().is_multiple_of(dtype.size()));
    match dtype {
        FloatDtype::BF16 => map_words(
            aligned,
            sft,
            out,
            u16::from_le_bytes,
            u16::to_le_bytes,
            |x, y| expo_element_bf16(x, y, alpha),
        ),
        FloatDtype::F16 => map_words(
            aligned,
            sft,
            out,
            u16::from_le_bytes,
            u16::to_le_bytes,
            |x, y| expo_element_f16(x, y, alpha),
        ),
        FloatDtype::F32 => map_words(
            aligned,
            sft,
            out,
            u32::from_le_bytes,
            u32::to_le_bytes,
            |x, y| expo_element_f32(x, y, alpha),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    const ONE: u16 = 0x3F80; // bf16 1.0
    const ONE_PLUS_ULP: u16 = 0x3F81; // bf16 1 + 2^-7

    fn scalar_bf16(a: u16, s: u16, alpha: f32) -> u16 {
        let mut out = [0u8; 2];
        expo(
            FloatDtype::BF16,
            alpha,
            &a.to_le_bytes(),
            &s.to_le_bytes(),
            &mut out,
        );
        let block = u16::from_le_bytes(out);
        // Also run it through the vectorized block loop (element at index 5).
        let (mut av, mut sv) = (vec![0u16; LANES], vec![0u16; LANES]);
        av[5] = a;
        sv[5] = s;
        let ab: Vec<u8> = av.iter().flat_map(|v| v.to_le_bytes()).collect();
        let sb: Vec<u8> = sv.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut ob = vec![0u8; ab.len()];
        expo(FloatDtype::BF16, alpha, &ab, &sb, &mut ob);
        assert_eq!(u16::from_le_bytes([ob[10], ob[11]]), block);
        assert_eq!(expo_element_bf16(a, s, alpha), block);
        block
    }

    fn scalar_f16(a: u16, s: u16, alpha: f32) -> u16 {
        let mut out = [0u8; 2];
        expo(
            FloatDtype::F16,
            alpha,
            &a.to_le_bytes(),
            &s.to_le_bytes(),
            &mut out,
        );
        let r = u16::from_le_bytes(out);
        assert_eq!(expo_element_f16(a, s, alpha), r);
        r
    }

    fn scalar_f32(a: u32, s: u32, alpha: f32) -> u32 {
        let mut out = [0u8; 4];
        expo(
            FloatDtype::F32,
            alpha,
            &a.to_le_bytes(),
            &s.to_le_bytes(),
            &mut out,
        );
        let r = u32::from_le_bytes(out);
        assert_eq!(expo_element_f32(a, s, alpha), r);
        r
    }

    #[test]
    fn bf16_plain_value() {
        // a = 1, s = 0.5, alpha = 2: 1 + 2 * 0.5 = 2.0
        assert_eq!(scalar_bf16(ONE, 0x3F00, 2.0), 0x4000);
        // alpha = 0 returns a exactly.
        assert_eq!(scalar_bf16(0x1234, 0x5678, 0.0), 0x1234);
    }

    #[test]
    fn bf16_ties_to_even() {
        // d = -2^-7; alpha = -0.5: o = 1 + 2^-8, halfway between 0x3F80 (even)
        // and 0x3F81 (odd) -> 0x3F80.
        assert_eq!(scalar_bf16(ONE, ONE_PLUS_ULP, -0.5), 0x3F80);
        // alpha = -1.5: o = 1 + 3 * 2^-8, halfway between 0x3F81 (odd) and
        // 0x3F82 (even) -> 0x3F82.
        assert_eq!(scalar_bf16(ONE, ONE_PLUS_ULP, -1.5), 0x3F82);
        // alpha = -0.75: o = 1 + 1.5 * 2^-8, above the tie -> 0x3F81.
        assert_eq!(scalar_bf16(ONE, ONE_PLUS_ULP, -0.75), 0x3F81);
        // Negative mirror: -(1 + 2^-8) -> -1.
        assert_eq!(scalar_bf16(0xBF80, 0xBF81, -0.5), 0xBF80);
    }

    #[test]
    fn bf16_overflow_to_inf() {
        // a = max bf16 = 0x7F7F (mantissa odd), s = next lower; alpha = 0.5:
        // o = max + 2^119 is finite in f32 but exactly halfway between max
        // and 2^128 -> ties to even -> +Inf.
        assert_eq!(scalar_bf16(0x7F7F, 0x7F7E, 0.5), 0x7F80);
        // Same below the tie stays at max.
        assert_eq!(scalar_bf16(0x7F7F, 0x7F7E, 0.25), 0x7F7F);
        // f32 overflow itself: a - s = 2 * max = +Inf.
        assert_eq!(scalar_bf16(0x7F7F, 0xFF7F, 1.0), 0x7F80);
        assert_eq!(scalar_bf16(0xFF7F, 0x7F7F, 1.0), 0xFF80);
        // Inf - (-Inf) = Inf; Inf + alpha * Inf = Inf.
        assert_eq!(scalar_bf16(0x7F80, 0xFF80, 1.0), 0x7F80);
    }

    #[test]
    fn bf16_subnormals_kept() {
        // a = smallest subnormal 2^-133, s = 0, alpha = 1: 2^-132 = 0x0002.
        assert_eq!(scalar_bf16(0x0001, 0x0000, 1.0), 0x0002);
        // alpha = 0.5: 1.5 * 2^-133, tie between 0x0001 and 0x0002 -> 0x0002.
        assert_eq!(scalar_bf16(0x0001, 0x0000, 0.5), 0x0002);
        // alpha = -0.5: 0.5 * 2^-133 (an f32 subnormal), tie between 0 and
        // 0x0001 -> +0.
        assert_eq!(scalar_bf16(0x0001, 0x0000, -0.5), 0x0000);
        // Negative side keeps the sign: -0.
        assert_eq!(scalar_bf16(0x8001, 0x0000, -0.5), 0x8000);
        // Largest subnormal + 1 ulp becomes the smallest normal.
        assert_eq!(scalar_bf16(0x007F, 0x007E, 1.0), 0x0080);
    }

    #[test]
    fn bf16_signed_zero() {
        // d = -0 - (-0) = +0, t = +0, o = -0 + +0 = +0 under RNE.
        assert_eq!(scalar_bf16(0x8000, 0x8000, 1.0), 0x0000);
        // d = -0 - (+0) = -0, t = -0, o = -0 + -0 = -0.
        assert_eq!(scalar_bf16(0x8000, 0x0000, 1.0), 0x8000);
        // alpha = 0 with a = -0 and finite s: t = +-0 ... -0 + 0*(-0 - 1) =
        // -0 + -0 = -0.
        assert_eq!(scalar_bf16(0x8000, ONE, 0.0), 0x8000);
    }

    #[test]
    fn bf16_nan_canonical() {
        // Negative signalling-pattern NaN input.
        assert_eq!(scalar_bf16(0xFF81, 0x0000, 1.0), BF16_NAN);
        // NaN in sft with a payload.
        assert_eq!(scalar_bf16(ONE, 0x7FD5, 1.0), BF16_NAN);
        // NaN alpha (negative, with payload).
        assert_eq!(
            scalar_bf16(ONE, 0x0000, f32::from_bits(0xFFC0_1234)),
            BF16_NAN
        );
        // Inf - Inf.
        assert_eq!(scalar_bf16(0x7F80, 0x7F80, 1.0), BF16_NAN);
        // 0 * Inf.
        assert_eq!(scalar_bf16(0xFF80, 0x0000, 0.0), BF16_NAN);
        // alpha = +Inf with d = 0: Inf * 0.
        assert_eq!(scalar_bf16(ONE, ONE, f32::INFINITY), BF16_NAN);
    }

    #[test]
    fn f16_cases() {
        // 1 + 2 * (1 - 0.5) = 2
        assert_eq!(scalar_f16(0x3C00, 0x3800, 2.0), 0x4000);
        // Ties to even: 1 + 2^-11 halfway between 0x3C00 and 0x3C01 -> 0x3C00;
        // 1 + 3 * 2^-11 halfway between 0x3C01 and 0x3C02 -> 0x3C02.
        assert_eq!(scalar_f16(0x3C00, 0x3C01, -0.5), 0x3C00);
        assert_eq!(scalar_f16(0x3C00, 0x3C01, -1.5), 0x3C02);
        // Overflow: 65504 + 0.5 * 32 = 65520 is the tie with 2^16 -> +Inf.
        assert_eq!(scalar_f16(0x7BFF, 0x7BFE, 0.5), 0x7C00);
        // 65504 + 0.25 * 32 = 65512 rounds back to 65504.
        assert_eq!(scalar_f16(0x7BFF, 0x7BFE, 0.25), 0x7BFF);
        assert_eq!(scalar_f16(0xFBFF, 0xFBFE, 0.5), 0xFC00);
        // Subnormals: 2 * 2^-24; 1.5 * 2^-24 -> 2 (even); 0.5 * 2^-24 -> 0.
        assert_eq!(scalar_f16(0x0001, 0x0000, 1.0), 0x0002);
        assert_eq!(scalar_f16(0x0001, 0x0000, 0.5), 0x0002);
        assert_eq!(scalar_f16(0x0001, 0x0000, -0.5), 0x0000);
        assert_eq!(scalar_f16(0x8001, 0x0000, -0.5), 0x8000);
        // Largest subnormal + 1 ulp = smallest normal.
        assert_eq!(scalar_f16(0x03FF, 0x03FE, 1.0), 0x0400);
        // Signed zeros.
        assert_eq!(scalar_f16(0x8000, 0x8000, 1.0), 0x0000);
        assert_eq!(scalar_f16(0x8000, 0x0000, 1.0), 0x8000);
        // NaN: payload/sign discarded.
        assert_eq!(scalar_f16(0xFC01, 0x0000, 1.0), F16_NAN);
        assert_eq!(scalar_f16(0x7C00, 0x7C00, 1.0), F16_NAN);
        assert_eq!(scalar_f16(0x3C00, 0x0000, f32::NAN), F16_NAN);
        // Infinity survives.
        assert_eq!(scalar_f16(0xFC00, 0x0000, 1.0), 0xFC00);
    }

    #[test]
    fn f32_cases() {
        let f = |x: f32| x.to_bits();
        assert_eq!(scalar_f32(f(1.0), f(0.5), 2.0), f(2.0));
        // Unfused: alpha * d = -(1 + 2^-23)^2 rounds to -(1 + 2^-22), which
        // cancels a exactly -> +0. A fused multiply-add would give -2^-46.
        let a = 0x3F80_0002; // 1 + 2^-22
        let s = 0x3400_0000; // 2^-23, so d = 1 + 2^-23 exactly
        let alpha = f32::from_bits(0xBF80_0001); // -(1 + 2^-23)
        assert_eq!(scalar_f32(a, s, alpha), 0);
        let fused = alpha.mul_add(f32::from_bits(a) - f32::from_bits(s), f32::from_bits(a));
        assert_eq!(
            fused.to_bits(),
            0xA880_0000,
            "sanity: fused gives -2^-46 here"
        );
        // Subnormal arithmetic is not flushed: 2^-149 + 1 * 2^-149.
        assert_eq!(scalar_f32(1, 0, 1.0), 2);
        // Overflow.
        assert_eq!(scalar_f32(f(f32::MAX), f(-f32::MAX), 1.0), f(f32::INFINITY));
        // NaN canonicalization.
        assert_eq!(scalar_f32(0xFFC1_2345, 0, 1.0), F32_NAN);
        assert_eq!(scalar_f32(0x7F80_0001, 0, 0.0), F32_NAN);
        assert_eq!(scalar_f32(f(f32::INFINITY), f(f32::INFINITY), 1.0), F32_NAN);
        // -0 handling as in bf16.
        assert_eq!(scalar_f32(0x8000_0000, 0x8000_0000, 1.0), 0);
        assert_eq!(scalar_f32(0x8000_0000, 0, 1.0), 0x8000_0000);
    }

    #[test]
    fn bf16_widening_exhaustive() {
        for h in 0..=u16::MAX {
            let ours = bf16_to_f32(h);
            let theirs = bf16::from_bits(h).to_f32();
            if theirs.is_nan() {
                // `half` quiets signalling NaNs; we keep the bits (the NaN is
                // canonicalized after the arithmetic anyway).
                assert!(ours.is_nan(), "{h:#06x}");
                assert_eq!(ours.to_bits(), (h as u32) << 16);
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn f16_widening_exhaustive_vs_half() {
        for h in 0..=u16::MAX {
            let ours = f16_to_f32(h);
            let theirs = f16::from_bits(h).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{h:#06x}");
                assert_eq!(ours.is_sign_negative(), theirs.is_sign_negative());
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{h:#06x}");
            }
        }
    }

    /// Compares narrowing against `half` on a strided subset of all f32 bit
    /// patterns plus a dense window around every F16/BF16 exponent boundary.
    fn check_narrowing(bits: u32) {
        let x = f32::from_bits(bits);
        if x.is_nan() {
            return;
        }
        assert_eq!(
            f32_to_f16_rne(x),
            f16::from_f32(x).to_bits(),
            "f16 {bits:#010x}"
        );
        assert_eq!(
            f32_to_bf16_rne(x),
            bf16::from_f32(x).to_bits(),
            "bf16 {bits:#010x}"
        );
    }

    #[test]
    fn narrowing_sampled_vs_half() {
        // Stride is odd so every low-bit residue pattern shows up.
        let mut bits: u32 = 0;
        loop {
            check_narrowing(bits);
            match bits.checked_add(4093) {
                Some(b) => bits = b,
                None => break,
            }
        }
        // Dense windows around each exponent boundary, both signs.
        for exp in 0..=255u32 {
            for sign in [0, 0x8000_0000] {
                let base = sign | (exp << 23);
                for delta in 0..4096u32 {
                    check_narrowing(base.wrapping_add(delta));
                    check_narrowing(base.wrapping_sub(delta + 1) & 0x7FFF_FFFF | sign);
                }
            }
        }
    }

    /// Every f32 bit pattern; ~1 min in release. Run with
    /// `cargo test --release --lib narrowing_exhaustive -- --ignored`.
    #[test]
    #[ignore = "exhaustive over 2^32 values; run in release on demand"]
    fn narrowing_exhaustive_vs_half() {
        for bits in 0..=u32::MAX {
            check_narrowing(bits);
        }
    }
}

/// Widens one little-endian element of `dtype` to `f32` (exact).
#[inline(always)]
fn widen(dtype: FloatDtype, bytes: &[u8]) -> f32 {
    match dtype {
        FloatDtype::BF16 => bf16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
        FloatDtype::F16 => f16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
        FloatDtype::F32 => f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
    }
}

/// ExPO for a tensor stored in different float types by the two models: both sides widen
/// exactly to `f32`, the arithmetic is the same three operations, and the result is rounded to
/// the aligned model's type (NaN canonicalized), so the result equals what the one-type path
/// gives whenever the types agree. `aligned` and `out` hold elements of `aligned_dtype`, `sft`
/// the same number of elements of `sft_dtype`. A rare path (checkpoints saved at different
/// precisions), kept simple rather than fast.
///
/// # Panics
///
/// If the element counts differ.
pub fn expo_mixed(
    aligned_dtype: FloatDtype,
    sft_dtype: FloatDtype,
    alpha: f32,
    aligned: &[u8],
    sft: &[u8],
    out: &mut [u8],
) {
    let (wa, ws) = (aligned_dtype.size(), sft_dtype.size());
    assert!(
        aligned.len() == out.len() && aligned.len() / wa == sft.len() / ws,
        "expo_mixed: element counts differ"
    );
    for ((a, s), o) in aligned
        .chunks_exact(wa)
        .zip(sft.chunks_exact(ws))
        .zip(out.chunks_exact_mut(wa))
    {
        let r = expo_f32(widen(aligned_dtype, a), widen(sft_dtype, s), alpha);
        match aligned_dtype {
            FloatDtype::BF16 => {
                let bits = if r.is_nan() {
                    BF16_NAN
                } else {
                    f32_to_bf16_rne(r)
                };
                o.copy_from_slice(&bits.to_le_bytes());
            }
            FloatDtype::F16 => {
                let bits = if r.is_nan() {
                    F16_NAN
                } else {
                    f32_to_f16_rne(r)
                };
                o.copy_from_slice(&bits.to_le_bytes());
            }
            FloatDtype::F32 => {
                let bits = if r.is_nan() { F32_NAN } else { r.to_bits() };
                o.copy_from_slice(&bits.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod mixed_tests {
    use super::*;

    #[test]
    fn mixed_equals_one_type_path_when_types_agree() {
        let a: Vec<u8> = (0..4096u32)
            .flat_map(|i| (i.wrapping_mul(2654435761) as u16).to_le_bytes())
            .collect();
        let s: Vec<u8> = (0..4096u32)
            .flat_map(|i| (i.wrapping_mul(40503) as u16).to_le_bytes())
            .collect();
        for dtype in [FloatDtype::BF16, FloatDtype::F16] {
            let (mut one, mut mixed) = (vec![0u8; a.len()], vec![0u8; a.len()]);
            expo(dtype, 0.3, &a, &s, &mut one);
            expo_mixed(dtype, dtype, 0.3, &a, &s, &mut mixed);
            assert_eq!(one, mixed, "{dtype:?}");
        }
    }

    #[test]
    fn mixed_widens_both_sides_exactly() {
        // aligned BF16 1.0, sft F32 0.99999994 (not representable in BF16): the difference
        // survives because sft is not rounded to BF16 first.
        let a = 0x3F80u16.to_le_bytes();
        let s = 0.999_999_94f32.to_le_bytes();
        let mut out = [0u8; 2];
        expo_mixed(FloatDtype::BF16, FloatDtype::F32, 1e7, &a, &s, &mut out);
        let want = f32_to_bf16_rne(1.0 + 1e7 * (1.0 - 0.999_999_94f32));
        assert_eq!(u16::from_le_bytes(out), want);
        assert_ne!(want, 0x3F80);
    }
}
