//! AVX2 + F16C implementation of the ExPO kernel (x86-64 only), bit-identical
//! to [`super::scalar`].
//!
//! Per 256-bit step: widen (BF16 by zero-interleaving, F16 with `vcvtph2ps`),
//! `sub`/`mul`/`add` in packed f32, narrow with round-to-nearest-even (BF16
//! with the integer `+0x7FFF+lsb` trick, F16 with `vcvtps2ph` in RNE mode),
//! and replace NaN lanes by the canonical quiet NaN via an unordered compare
//! and a blend. Leftover elements (fewer than one step) go through the scalar
//! path.
//!
//! What it deliberately does not do: no FMA instructions (the merge is
//! defined unfused), no reliance on MXCSR (rounding is explicit or the
//! default RNE; FTZ/DAZ are never set), no aligned loads or stores (input
//! slices may start anywhere), no masked/overlapping tail tricks, and no
//! feature detection of its own: [`expo`] may only be called once the caller
//! has established that the CPU has `avx2` and `f16c`.

use std::arch::x86_64::*;

use super::scalar::{self, BF16_NAN, F32_NAN};
use super::FloatDtype;

/// Explicit RNE rounding for `vcvtps2ph` (imm8 bit 2 clear: MXCSR.RC is not
/// consulted). Rust's `_mm256_cvtps_ph` only accepts a 3-bit immediate, so
/// `_MM_FROUND_NO_EXC` cannot be passed; FP exceptions are masked by default
/// in MXCSR anyway, and exception flags do not affect the result.
const CVT_RNE: i32 = _MM_FROUND_TO_NEAREST_INT;

/// AVX2 kernel; same contract as [`super::expo`] minus dispatch.
///
/// # Safety
///
/// This is a `#[target_feature]` function, so calling it is `unsafe`: the
/// caller must ensure that the CPU supports `avx2` and `f16c`
/// ([`super::expo`] checks this before calling).
///
/// # Panics
///
/// If the slice lengths differ or are not a multiple of `dtype.size()`.
#[target_feature(enable = "avx2,f16c")]
pub fn expo(dtype: FloatDtype, alpha: f32, aligned: &[u8], sft: &[u8], out: &mut [u8]) {
    assert!(aligned.len() == sft.len() && aligned.len() == out.len());
    assert!(aligned.len().is_multiple_of(dtype.size()));
    match dtype {
        FloatDtype::BF16 => bf16(alpha, aligned, sft, out),
        FloatDtype::F16 => f16(alpha, aligned, sft, out),
        FloatDtype::F32 => f32(alpha, aligned, sft, out),
    }
}

/// `a + alpha * (a - s)` as three separately rounded packed operations.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn expo_ps(a: __m256, s: __m256, alpha: __m256) -> __m256 {
    let d = _mm256_sub_ps(a, s);
    let t = _mm256_mul_ps(alpha, d);
    _mm256_add_ps(a, t)
}

/// f32 lanes to BF16 bits (in the low half of each 32-bit lane, high half
/// zero), round-to-nearest-even, NaN lanes -> `BF16_NAN`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn round_bf16(o: __m256) -> __m256i {
    let bits = _mm256_castps_si256(o);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let biased = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
    let r = _mm256_srli_epi32::<16>(biased);
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(o, o));
    _mm256_blendv_epi8(r, _mm256_set1_epi32(BF16_NAN as i32), nan)
}

/// Replaces NaN lanes by the canonical f32 quiet NaN `0x7FC0_0000`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn canon_nan_ps(o: __m256) -> __m256 {
    let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(o, o);
    _mm256_blendv_ps(
        o,
        _mm256_castsi256_ps(_mm256_set1_epi32(F32_NAN as i32)),
        nan,
    )
}

#[target_feature(enable = "avx2,f16c")]
fn bf16(alpha: f32, a: &[u8], s: &[u8], out: &mut [u8]) {
    const STEP: usize = 32; // bytes = 16 BF16 elements
    let va = _mm256_set1_ps(alpha);
    let zero = _mm256_setzero_si256();
    let mut ab = a.chunks_exact(STEP);
    let mut sb = s.chunks_exact(STEP);
    let mut ob = out.chunks_exact_mut(STEP);
    for ((ac, sc), oc) in (&mut ab).zip(&mut sb).zip(&mut ob) {
        // SAFETY: `ac` and `sc` are exactly 32 bytes (chunks_exact), the size
        // of the unaligned 256-bit load; avx2 is enabled on this function.
        let (x, y) = unsafe {
            (
                _mm256_loadu_si256(ac.as_ptr().cast()),
                _mm256_loadu_si256(sc.as_ptr().cast()),
            )
        };
        // Interleaving zeros below each u16 gives `bits << 16`, i.e. the exact
        // f32. Within each 128-bit lane, `lo` holds elements 0-3 (8-11 in the
        // upper lane) and `hi` elements 4-7 (12-15); `packus_epi32(lo, hi)`
        // undoes exactly this per-lane split, so no cross-lane permute is needed.
        let xlo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));
        let xhi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));
        let ylo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, y));
        let yhi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, y));
        let rlo = round_bf16(expo_ps(xlo, ylo, va));
        let rhi = round_bf16(expo_ps(xhi, yhi, va));
        // All lanes are <= 0xFFFF, so the unsigned saturation never triggers.
        let r = _mm256_packus_epi32(rlo, rhi);
        // SAFETY: `oc` is exactly 32 bytes (chunks_exact_mut), the size of the
        // unaligned 256-bit store; avx2 is enabled on this function.
        unsafe { _mm256_storeu_si256(oc.as_mut_ptr().cast(), r) };
    }
    scalar::expo(
        FloatDtype::BF16,
        alpha,
        ab.remainder(),
        sb.remainder(),
        ob.into_remainder(),
    );
}

#[target_feature(enable = "avx2,f16c")]
fn f16(alpha: f32, a: &[u8], s: &[u8], out: &mut [u8]) {
    const STEP: usize = 32; // bytes = 16 F16 elements, two 8-lane halves
    let va = _mm256_set1_ps(alpha);
    let mut ab = a.chunks_exact(STEP);
    let mut sb = s.chunks_exact(STEP);
    let mut ob = out.chunks_exact_mut(STEP);
    for ((ac, sc), oc) in (&mut ab).zip(&mut sb).zip(&mut ob) {
        for h in [0, 16] {
            // SAFETY: `h + 16 <= 32 == ac.len() == sc.len()`, so each unaligned
            // 128-bit load reads 16 in-bounds bytes; avx2 (which implies the
            // SSE2 load) is enabled on this function.
            let (x, y) = unsafe {
                (
                    _mm_loadu_si128(ac.as_ptr().add(h).cast()),
                    _mm_loadu_si128(sc.as_ptr().add(h).cast()),
                )
            };
            let o = expo_ps(_mm256_cvtph_ps(x), _mm256_cvtph_ps(y), va);
            // `vcvtps2ph` turns the quiet NaN 0x7FC0_0000 into 0x7E00 (sign
            // kept, payload truncated; tested), so canonicalizing before the
            // narrowing yields the canonical F16 NaN.
            let r = _mm256_cvtps_ph::<CVT_RNE>(canon_nan_ps(o));
            // SAFETY: `h + 16 <= 32 == oc.len()`: the unaligned 128-bit store
            // writes 16 in-bounds bytes.
            unsafe { _mm_storeu_si128(oc.as_mut_ptr().add(h).cast(), r) };
        }
    }
    scalar::expo(
        FloatDtype::F16,
        alpha,
        ab.remainder(),
        sb.remainder(),
        ob.into_remainder(),
    );
}

#[target_feature(enable = "avx2,f16c")]
fn f32(alpha: f32, a: &[u8], s: &[u8], out: &mut [u8]) {
    const STEP: usize = 64; // bytes = 16 F32 elements, two 8-lane halves
    let va = _mm256_set1_ps(alpha);
    let mut ab = a.chunks_exact(STEP);
    let mut sb = s.chunks_exact(STEP);
    let mut ob = out.chunks_exact_mut(STEP);
    for ((ac, sc), oc) in (&mut ab).zip(&mut sb).zip(&mut ob) {
        for h in [0, 32] {
            // SAFETY: `h + 32 <= 64 == ac.len() == sc.len()`: each unaligned
            // 256-bit load reads 32 in-bounds bytes; avx2 is enabled.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(ac.as_ptr().add(h).cast()),
                    _mm256_loadu_ps(sc.as_ptr().add(h).cast()),
                )
            };
            let r = canon_nan_ps(expo_ps(x, y, va));
            // SAFETY: `h + 32 <= 64 == oc.len()`: the unaligned 256-bit store
            // writes 32 in-bounds bytes.
            unsafe { _mm256_storeu_ps(oc.as_mut_ptr().add(h).cast(), r) };
        }
    }
    scalar::expo(
        FloatDtype::F32,
        alpha,
        ab.remainder(),
        sb.remainder(),
        ob.into_remainder(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Isa;

    fn have_avx2() -> bool {
        let ok = Isa::available().contains(&Isa::Avx2);
        if !ok {
            eprintln!("SKIPPED: AVX2/F16C not available on this CPU; AVX2 path NOT tested");
        }
        ok
    }

    #[target_feature(enable = "avx2,f16c")]
    fn narrow_f16(x: [u32; 8]) -> [u16; 8] {
        // SAFETY: both arrays are exactly the size of the 256-bit / 128-bit
        // value; unaligned load/store; f16c/avx2 enabled on this function.
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().cast());
            let h = _mm256_cvtps_ph::<CVT_RNE>(v);
            let mut r = [0u16; 8];
            _mm_storeu_si128(r.as_mut_ptr().cast(), h);
            r
        }
    }

    /// The F16 NaN canonicalization relies on vcvtps2ph mapping the canonical
    /// f32 quiet NaN to the canonical F16 quiet NaN. Check the hardware.
    #[test]
    fn cvtps_ph_maps_canonical_nan_to_canonical_f16_nan() {
        if !have_avx2() {
            return;
        }
        let input = [
            0x7FC0_0000, // canonical qNaN
            0xFFC0_0000, // negative qNaN: sign kept (why we canonicalize first)
            0x7F80_0001, // sNaN: quieted, payload truncated
            0x7FFF_FFFF,
            0x7F80_0000, // +Inf
            0x477F_F000, // 65520: tie -> Inf
            0x3380_0000, // 2^-24: smallest subnormal
            0x3300_0000, // 2^-25: tie -> +0
        ];
        // SAFETY: have_avx2() confirmed avx2 and f16c.
        let out = unsafe { narrow_f16(input) };
        assert_eq!(out[0], 0x7E00, "canonical NaN must narrow to 0x7E00");
        assert_eq!(out[1], 0xFE00);
        assert_eq!(out[2] & 0x7E00, 0x7E00);
        assert_eq!(out[4], 0x7C00);
        assert_eq!(out[5], 0x7C00);
        assert_eq!(out[6], 0x0001);
        assert_eq!(out[7], 0x0000);
    }
}
