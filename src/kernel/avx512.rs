//! AVX-512 (F + BW + VL) implementation of the ExPO kernel (x86-64 only),
//! bit-identical to [`super::scalar`].
//!
//! Same algorithm as the AVX2 path on 512-bit vectors: widen (BF16 by
//! zero-interleaving, F16 with `vcvtph2ps`), packed f32 `sub`/`mul`/`add`,
//! narrow with round-to-nearest-even (BF16 integer `+0x7FFF+lsb` trick, F16
//! `vcvtps2ph` in RNE mode), NaN lanes replaced by the canonical quiet NaN
//! using an unordered-compare mask and a masked blend. Leftover elements
//! (fewer than one step) go through the scalar path.
//!
//! What it deliberately does not do: no FMA, no AVX512-BF16 instructions
//! (`vcvtneps2bf16` flushes subnormals to zero, so it would not be
//! bit-identical), no embedded-rounding or MXCSR tricks (FTZ/DAZ are never
//! set), no aligned or masked loads/stores, and no feature detection of its
//! own: [`expo`] may only be called once the caller has established that the
//! CPU has `avx512f`, `avx512bw` and `avx512vl`.

use std::arch::x86_64::*;

use super::scalar::{self, BF16_NAN, F32_NAN};
use super::FloatDtype;

/// RNE rounding for `vcvtps2ph`, exceptions suppressed (MXCSR is not consulted).
const CVT_RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

/// AVX-512 kernel; same contract as [`super::expo`] minus dispatch.
///
/// # Safety
///
/// This is a `#[target_feature]` function, so calling it is `unsafe`: the
/// caller must ensure that the CPU supports `avx512f`, `avx512bw` and
/// `avx512vl`
/// ([`super::expo`] checks this before calling).
///
/// # Panics
///
/// If the slice lengths differ or are not a multiple of `dtype.size()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn expo_ps(a: __m512, s: __m512, alpha: __m512) -> __m512 {
    let d = _mm512_sub_ps(a, s);
    let t = _mm512_mul_ps(alpha, d);
    _mm512_add_ps(a, t)
}

/// f32 lanes to BF16 bits (low half of each 32-bit lane), RNE, NaN lanes ->
/// `BF16_NAN`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn round_bf16(o: __m512) -> __m512i {
    let bits = _mm512_castps_si512(o);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let biased = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb);
    let r = _mm512_srli_epi32::<16>(biased);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(o, o);
    _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(BF16_NAN as i32))
}

/// Replaces NaN lanes by the canonical f32 quiet NaN `0x7FC0_0000`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn canon_nan_ps(o: __m512) -> __m512 {
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(o, o);
    _mm512_mask_blend_ps(
        nan,
        o,
        _mm512_castsi512_ps(_mm512_set1_epi32(F32_NAN as i32)),
    )
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn bf16(alpha: f32, a: &[u8], s: &[u8], out: &mut [u8]) {
    const STEP: usize = 64; // bytes = 32 BF16 elements
    let va = _mm512_set1_ps(alpha);
    let zero = _mm512_setzero_si512();
    let mut ab = a.chunks_exact(STEP);
    let mut sb = s.chunks_exact(STEP);
    let mut ob = out.chunks_exact_mut(STEP);
    for ((ac, sc), oc) in (&mut ab).zip(&mut sb).zip(&mut ob) {
        // SAFETY: `ac` and `sc` are exactly 64 bytes (chunks_exact), the size
        // of the unaligned 512-bit load; avx512f is enabled on this function.
        let (x, y) = unsafe {
            (
                _mm512_loadu_si512(ac.as_ptr().cast()),
                _mm512_loadu_si512(sc.as_ptr().cast()),
            )
        };
        // Zero-interleaving gives the exact f32 (`bits << 16`). unpack works
        // per 128-bit lane and packus_epi32 undoes that same per-lane split,
        // so the output order is the input order without any permute.
        let xlo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, x));
        let xhi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, x));
        let ylo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, y));
        let yhi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, y));
        let rlo = round_bf16(expo_ps(xlo, ylo, va));
        let rhi = round_bf16(expo_ps(xhi, yhi, va));
        // All lanes are <= 0xFFFF, so the unsigned saturation never triggers.
        let r = _mm512_packus_epi32(rlo, rhi);
        // SAFETY: `oc` is exactly 64 bytes (chunks_exact_mut), the size of the
        // unaligned 512-bit store; avx512f is enabled on this function.
        unsafe { _mm512_storeu_si512(oc.as_mut_ptr().cast(), r) };
    }
    scalar::expo(
        FloatDtype::BF16,
        alpha,
        ab.remainder(),
        sb.remainder(),
        ob.into_remainder(),
    );
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f16(alpha: f32, a: &[u8], s: &[u8], out: &mut [u8]) {
    const STEP: usize = 64; // bytes = 32 F16 elements, two 16-lane halves
    let va = _mm512_set1_ps(alpha);
    let mut ab = a.chunks_exact(STEP);
    let mut sb = s.chunks_exact(STEP);
    let mut ob = out.chunks_exact_mut(STEP);
    for ((ac, sc), oc) in (&mut ab).zip(&mut sb).zip(&mut ob) {
        for h in [0, 32] {
            // SAFETY: `h + 32 <= 64 == ac.len() == sc.len()`: each unaligned
            // 256-bit load reads 32 in-bounds bytes; avx512f implies avx.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_si256(ac.as_ptr().add(h).cast()),
                    _mm256_loadu_si256(sc.as_ptr().add(h).cast()),
                )
            };
            let o = expo_ps(_mm512_cvtph_ps(x), _mm512_cvtph_ps(y), va);
            // vcvtps2ph maps 0x7FC0_0000 to 0x7E00 (tested), so canonicalize
            // in f32 first.
            let r = _mm512_cvtps_ph::<CVT_RNE>(canon_nan_ps(o));
            // SAFETY: `h + 32 <= 64 == oc.len()`: the unaligned 256-bit store
            // writes 32 in-bounds bytes.
            unsafe { _mm256_storeu_si256(oc.as_mut_ptr().add(h).cast(), r) };
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

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn f32(alpha: f32, a: &[u8], s: &[u8], out: &mut [u8]) {
    const STEP: usize = 128; // bytes = 32 F32 elements, two 16-lane halves
    let va = _mm512_set1_ps(alpha);
    let mut ab = a.chunks_exact(STEP);
    let mut sb = s.chunks_exact(STEP);
    let mut ob = out.chunks_exact_mut(STEP);
    for ((ac, sc), oc) in (&mut ab).zip(&mut sb).zip(&mut ob) {
        for h in [0, 64] {
            // SAFETY: `h + 64 <= 128 == ac.len() == sc.len()`: each unaligned
            // 512-bit load reads 64 in-bounds bytes; avx512f is enabled.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(ac.as_ptr().add(h).cast()),
                    _mm512_loadu_ps(sc.as_ptr().add(h).cast()),
                )
            };
            let r = canon_nan_ps(expo_ps(x, y, va));
            // SAFETY: `h + 64 <= 128 == oc.len()`: the unaligned 512-bit store
            // writes 64 in-bounds bytes.
            unsafe { _mm512_storeu_ps(oc.as_mut_ptr().add(h).cast(), r) };
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

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn narrow_f16(x: [u32; 16]) -> [u16; 16] {
        // SAFETY: both arrays are exactly the size of the 512-bit / 256-bit
        // value; unaligned load/store; avx512f enabled on this function.
        unsafe {
            let v = _mm512_loadu_ps(x.as_ptr().cast());
            let h = _mm512_cvtps_ph::<CVT_RNE>(v);
            let mut r = [0u16; 16];
            _mm256_storeu_si256(r.as_mut_ptr().cast(), h);
            r
        }
    }

    /// The F16 NaN canonicalization relies on vcvtps2ph mapping the canonical
    /// f32 quiet NaN to the canonical F16 quiet NaN; check the 512-bit form.
    #[test]
    fn cvtps_ph_512_maps_canonical_nan_to_canonical_f16_nan() {
        if !Isa::available().contains(&Isa::Avx512) {
            eprintln!("SKIPPED: AVX-512 not available on this CPU; AVX-512 vcvtps2ph NOT tested");
            return;
        }
        let mut input = [0x7FC0_0000u32; 16];
        input[1] = 0x477F_F000; // 65520 -> Inf
        input[2] = 0x3300_0000; // 2^-25 -> +0 (tie to even)
        input[3] = 0x3340_0000; // 1.5 * 2^-25 -> 2^-24
                                // SAFETY: availability of avx512f/bw/vl checked just above.
        let out = unsafe { narrow_f16(input) };
        assert_eq!(out[0], 0x7E00, "canonical NaN must narrow to 0x7E00");
        assert_eq!(out[15], 0x7E00);
        assert_eq!(out[1], 0x7C00);
        assert_eq!(out[2], 0x0000);
        assert_eq!(out[3], 0x0001);
    }
}
