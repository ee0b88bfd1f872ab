//! `acos` and `sin` in f64 from plain IEEE arithmetic (`+ − × ÷ sqrt`, no FMA, no libm), so
//! SLERP's coefficients are the same bits on every machine and in the numpy reference
//! (`tests/python/mergekit_methods_ref.py` spells out the same operations in the same order).
//!
//! `acos` follows the classic fdlibm method (the published rational approximation of
//! `asin(x)−x` on `[0, 0.5]` and the half-angle identities); `sin` reduces by `π/2` with a
//! two-piece Cody–Waite constant and evaluates the fdlibm minimax polynomials. Both are within
//! about one f64 ulp of the true value for the arguments SLERP produces (`|x| ≤ 2^20`); SLERP
//! rounds their results to f32, so the last f64 bit almost never matters.
//!
//! What it deliberately does not do: no other functions, no huge-argument reduction (beyond
//! `2^20` the result loses accuracy; SLERP's `t·θ` never gets there for sane `t`), no `errno`,
//! no speed tricks. It is called a few times per tensor, never per element.

// The constants are written with the digits published with the algorithm; each parses to the
// intended double (the accuracy tests below would catch a wrong one).
#![allow(clippy::excessive_precision, clippy::approx_constant)]

const PIO2_HI: f64 = 1.570_796_326_794_896_558; // 0x3FF921FB_54442D18
const PIO2_LO: f64 = 6.123_233_995_736_766_036e-17; // 0x3C91A626_33145C07
const PS0: f64 = 1.666_666_666_666_666_574_15e-1;
const PS1: f64 = -3.255_658_186_224_009_154_05e-1;
const PS2: f64 = 2.012_125_321_348_629_258_81e-1;
const PS3: f64 = -4.005_553_450_067_941_140_27e-2;
const PS4: f64 = 7.915_349_942_898_145_321_76e-4;
const PS5: f64 = 3.479_331_075_960_211_675_70e-5;
const QS1: f64 = -2.403_394_911_734_414_218_78;
const QS2: f64 = 2.020_945_760_233_505_694_71;
const QS3: f64 = -6.882_839_716_054_532_930_30e-1;
const QS4: f64 = 7.703_815_055_590_193_527_91e-2;

/// `π/2` to 33 bits (so `n · P1` is exact for `|n| < 2^20`) and the rest.
const P1: f64 = 1.570_796_326_734_125_614_17; // 0x3FF921FB_54400000
const P1T: f64 = 6.077_100_506_506_192_249_32e-11;
const FRAC_2_PI: f64 = 6.366_197_723_675_813_824_33e-1;

const S1: f64 = -1.666_666_666_666_663_243_48e-1;
const S2: f64 = 8.333_333_333_322_489_461_24e-3;
const S3: f64 = -1.984_126_982_985_794_931_34e-4;
const S4: f64 = 2.755_731_370_707_006_767_89e-6;
const S5: f64 = -2.505_076_025_340_686_341_95e-8;
const S6: f64 = 1.589_690_995_211_550_102_21e-10;
const C1: f64 = 4.166_666_666_666_660_190_37e-2;
const C2: f64 = -1.388_888_888_887_410_957_49e-3;
const C3: f64 = 2.480_158_728_947_672_941_78e-5;
const C4: f64 = -2.755_731_435_139_066_330_35e-7;
const C5: f64 = 2.087_572_321_298_174_827_90e-9;
const C6: f64 = -1.135_964_755_778_819_482_65e-11;

fn r(z: f64) -> f64 {
    let p = z * (PS0 + z * (PS1 + z * (PS2 + z * (PS3 + z * (PS4 + z * PS5)))));
    let q = 1.0 + z * (QS1 + z * (QS2 + z * (QS3 + z * QS4)));
    p / q
}

/// Arc cosine, in `[0, π]`; NaN outside `[−1, 1]`.
pub fn acos(x: f64) -> f64 {
    if x.is_nan() || x.abs() > 1.0 {
        return f64::NAN;
    }
    if x == 1.0 {
        return 0.0;
    }
    if x == -1.0 {
        return 2.0 * PIO2_HI;
    }
    if x.abs() < 0.5 {
        if x.abs() <= 6.938_893_903_907_228e-18 {
            // |x| <= 2^-57
            return PIO2_HI;
        }
        return PIO2_HI - (x - (PIO2_LO - x * r(x * x)));
    }
    if x < 0.0 {
        let z = (1.0 + x) * 0.5;
        let s = z.sqrt();
        let w = r(z) * s - PIO2_LO;
        return 2.0 * (PIO2_HI - (s + w));
    }
    let z = (1.0 - x) * 0.5;
    let s = z.sqrt();
    let df = f64::from_bits(s.to_bits() & 0xFFFF_FFFF_0000_0000);
    let c = (z - df * df) / (s + df);
    let w = r(z) * s + c;
    2.0 * (df + w)
}

fn kernel_sin(x: f64) -> f64 {
    let z = x * x;
    x + x * z * (S1 + z * (S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))))
}

fn kernel_cos(x: f64) -> f64 {
    let z = x * x;
    1.0 - 0.5 * z + z * z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))))
}

/// Sine; NaN for ±Inf and NaN.
pub fn sin(x: f64) -> f64 {
    if !x.is_finite() {
        return f64::NAN;
    }
    if x.abs() <= 0.785_398_163_397_448_3 {
        return kernel_sin(x);
    }
    let n = (x * FRAC_2_PI + 0.5).floor();
    let y = (x - n * P1) - n * P1T;
    match (n as i64) & 3 {
        0 => kernel_sin(y),
        1 => kernel_cos(y),
        2 => -kernel_sin(y),
        _ => -kernel_cos(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f64, b: f64) -> u64 {
        let (a, b) = (a.to_bits() as i64, b.to_bits() as i64);
        (a - b).unsigned_abs()
    }

    #[test]
    fn acos_is_within_two_ulps_of_libm() {
        let mut worst = 0;
        for i in 0..=200_000 {
            let x = -1.0 + i as f64 * 1e-5;
            let x = x.clamp(-1.0, 1.0);
            worst = worst.max(ulps(acos(x), x.acos()));
        }
        for i in 0..10_000 {
            let x = 1.0 - i as f64 * 1e-9;
            worst = worst.max(ulps(acos(x), x.acos()));
        }
        assert!(worst <= 2, "worst {worst} ulps");
        assert_eq!(acos(1.0), 0.0);
        assert_eq!(acos(-1.0), std::f64::consts::PI);
        assert!(acos(1.5).is_nan() && acos(f64::NAN).is_nan());
    }

    #[test]
    fn sin_is_within_two_ulps_of_libm() {
        let mut worst = 0;
        for i in 0..200_000 {
            let x = -20.0 + i as f64 * 2e-4;
            let (a, b) = (sin(x), x.sin());
            // Near zeros of sin, compare absolutely.
            if b.abs() > 1e-3 {
                worst = worst.max(ulps(a, b));
            } else {
                assert!((a - b).abs() < 1e-18, "{x}: {a} vs {b}");
            }
        }
        assert!(worst <= 2, "worst {worst} ulps");
        assert!(sin(f64::INFINITY).is_nan());
    }
}
