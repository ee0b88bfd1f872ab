//! The arithmetic of every merge, as pure functions over little-endian tensor bytes, with
//! runtime ISA dispatch. This module is the ExPO kernel, [`expo`]:
//! `out = round(a + alpha * (a - s))`, element-wise. The other methods live in submodules:
//!
//! * [`linear`]: mergekit's `linear` and `task_arithmetic`, N inputs, bit for bit as mergekit
//!   computes them ([`linear::Combine`], [`linear::combine`]);
//! * [`methods`]: the methods that need whole-tensor or per-row statistics (TIES, DARE,
//!   breadcrumbs, DELLA, SLERP, model_stock), driven in reduction passes ([`methods::Op`]);
//! * [`exec`]: a reference driver that runs a [`methods::Op`] over tensors held in memory.
//!
//! Internal to the crate: the scalar reference and its AVX2/AVX-512 twins, the streamed
//! statistics (fixed-order sums, radix rank selection), the counter-based random numbers of
//! DARE and DELLA, and the deterministic `acos`/`sin` of SLERP (`docs/mergekit-methods.md`
//! documents all three).
//!
//! # ExPO semantics ("IEEE f32, unfused")
//!
//! For every element, `a` (aligned) and `s` (SFT) are widened from the
//! storage dtype to `f32` (exact for BF16 and F16), then
//!
//! ```text
//! d = a - s;  t = alpha * d;  o = a + t;
//! ```
//!
//! are evaluated as three separately rounded IEEE-754 binary32 operations
//! (round-to-nearest-even, no fused multiply-add anywhere, denormals neither
//! flushed nor treated as zero), and `o` is rounded back to the storage dtype
//! with round-to-nearest-even (overflow goes to ±Inf, subnormal results are
//! kept).
//!
//! **NaN canonicalization:** if `o` is NaN, the output element is the
//! canonical *positive quiet* NaN of the dtype (BF16 `0x7FC0`, F16 `0x7E00`,
//! F32 `0x7FC0_0000`), whatever the payloads or signs of the NaNs involved.
//! NaN-payload propagation differs between instruction sets; canonicalizing
//! makes the output bytes a pure function of the input bytes and `alpha`, so
//! every [`Isa`] produces byte-identical results (this is tested).
//!
//! # What the ExPO kernel deliberately does not do
//!
//! No kernel module does I/O or knows about files; each submodule says what else it leaves out.
//!
//! * No tensor metadata, no threading, no allocation on the hot path:
//!   callers hand in equal-length byte slices and get bytes back.
//! * No dtype conversion between input and output in [`expo`]: `out` has the dtype of the
//!   inputs ([`expo_mixed`] is the rare mixed-dtype path).
//! * No "faster but different" modes: no FMA, no flush-to-zero, no use of the
//!   AVX512-BF16 `vcvtneps2bf16` instruction (it flushes subnormals). Speed
//!   never changes the bytes.
//! * No alignment requirements: slices may start at any address.

use std::fmt;

pub(crate) mod detmath;
pub mod exec;
pub mod linear;
pub mod methods;
pub(crate) mod rng;
pub(crate) mod scalar;
pub(crate) mod stats;
pub mod torch_order;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
mod linear_avx2;
#[cfg(target_arch = "x86_64")]
mod linear_avx512;

/// Storage dtype of a floating-point tensor (safetensors naming).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    /// bfloat16.
    BF16,
    /// IEEE binary16.
    F16,
    /// IEEE binary32.
    F32,
}

impl FloatDtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            FloatDtype::BF16 | FloatDtype::F16 => 2,
            FloatDtype::F32 => 4,
        }
    }

    /// The safetensors dtype string: `"BF16"`, `"F16"` or `"F32"`.
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::BF16 => "BF16",
            FloatDtype::F16 => "F16",
            FloatDtype::F32 => "F32",
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An implementation of the kernel. All of them produce identical bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, written to auto-vectorize; also the reference.
    Scalar,
    /// x86-64 AVX2 + F16C intrinsics (never FMA).
    Avx2,
    /// x86-64 AVX-512 F + BW + VL intrinsics (never FMA, never AVX512-BF16).
    Avx512,
}

pub use scalar::expo_mixed;

/// Name of the environment variable that overrides [`Isa::select`].
pub const ISA_ENV_VAR: &str = "MERGESTREAM_ISA";

impl Isa {
    /// Every instruction set this CPU can run, Scalar first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// Best available; environment variable `MERGESTREAM_ISA=scalar|avx2|avx512`
    /// overrides (returns an [`IsaError`] naming the problem if the requested ISA is
    /// unknown or not supported by this CPU). An empty value counts as unset;
    /// the value is matched case-insensitively after trimming whitespace.
    pub fn select() -> Result<Isa, IsaError> {
        match std::env::var(ISA_ENV_VAR) {
            Ok(v) => Self::select_from(Some(&v)),
            Err(std::env::VarError::NotPresent) => Self::select_from(None),
            Err(std::env::VarError::NotUnicode(v)) => Err(IsaError::NotUnicode {
                value: v.to_string_lossy().into_owned(),
            }),
        }
    }

    /// [`Isa::select`] with the environment variable's value passed in.
    fn select_from(request: Option<&str>) -> Result<Isa, IsaError> {
        let request = request.map(str::trim).filter(|r| !r.is_empty());
        let Some(request) = request else {
            return Ok(*Self::available()
                .last()
                .expect("Scalar is always available"));
        };
        let isa = match request.to_ascii_lowercase().as_str() {
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2,
            "avx512" => Isa::Avx512,
            _ => {
                return Err(IsaError::Unknown {
                    value: request.to_owned(),
                })
            }
        };
        if isa.is_supported() {
            Ok(isa)
        } else {
            Err(IsaError::Unsupported {
                value: request.to_owned(),
                isa,
                available: Self::available(),
            })
        }
    }

    /// `"scalar"`, `"avx2"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn required_features(self) -> &'static str {
        match self {
            Isa::Scalar => "nothing",
            Isa::Avx2 => "x86-64 avx2 + f16c",
            Isa::Avx512 => "x86-64 avx512f + avx512bw + avx512vl",
        }
    }

    /// Whether this CPU can run `self`. Cheap: `is_x86_feature_detected!`
    /// caches its answer in a static after the first call.
    pub(crate) fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }
}

/// Why `MERGESTREAM_ISA` cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IsaError {
    /// The value is not UTF-8.
    #[error("{ISA_ENV_VAR}={value:?} is not valid UTF-8; expected scalar|avx2|avx512")]
    NotUnicode {
        /// The value, lossily decoded.
        value: String,
    },
    /// The value names no instruction set.
    #[error("{ISA_ENV_VAR}={value:?} is not a known instruction set; expected scalar|avx2|avx512")]
    Unknown {
        /// The value.
        value: String,
    },
    /// This CPU cannot run the instruction set asked for.
    #[error("{ISA_ENV_VAR}={value:?}: this CPU does not support {isa} (needs {}); available: {}", isa.required_features(), isa_names(available))]
    Unsupported {
        /// The value.
        value: String,
        /// The instruction set it names.
        isa: Isa,
        /// What this CPU can run.
        available: Vec<Isa>,
    },
}

fn isa_names(isas: &[Isa]) -> String {
    isas.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `out[i] = round(a + alpha * (a - s))` element-wise, as described in the
/// module documentation. `aligned`, `sft` and `out` hold little-endian
/// elements of `dtype`, need not be aligned in memory, and must have equal
/// lengths that are a multiple of `dtype.size()`.
///
/// Dispatch happens once per call on `isa`.
///
/// ```
/// use mergestream::kernel::{expo, FloatDtype, Isa};
/// // BF16 aligned 1.0, sft 0.5, alpha 0.5: 1.0 + 0.5 * (1.0 - 0.5) = 1.25 (0x3FA0).
/// let (aligned, sft) = (0x3F80u16.to_le_bytes(), 0x3F00u16.to_le_bytes());
/// let mut out = [0u8; 2];
/// expo(Isa::select().unwrap(), FloatDtype::BF16, 0.5, &aligned, &sft, &mut out);
/// assert_eq!(u16::from_le_bytes(out), 0x3FA0);
/// ```
///
/// # Panics
///
/// If the lengths differ or are not a multiple of `dtype.size()` (a caller
/// bug), or if `isa` is not supported by this CPU (use [`Isa::available`] or
/// [`Isa::select`] to obtain a valid one).
pub fn expo(isa: Isa, dtype: FloatDtype, alpha: f32, aligned: &[u8], sft: &[u8], out: &mut [u8]) {
    assert!(
        aligned.len() == sft.len() && aligned.len() == out.len(),
        "expo: length mismatch: aligned {} bytes, sft {} bytes, out {} bytes",
        aligned.len(),
        sft.len(),
        out.len()
    );
    assert!(
        aligned.len().is_multiple_of(dtype.size()),
        "expo: {} bytes is not a whole number of {} elements",
        aligned.len(),
        dtype.name()
    );
    assert!(
        isa.is_supported(),
        "expo: instruction set {} is not supported by this CPU (needs {})",
        isa.name(),
        isa.required_features()
    );
    match isa {
        Isa::Scalar => scalar::expo(dtype, alpha, aligned, sft, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa.is_supported()` was asserted above, i.e. the CPU has
        // avx2 and f16c, the target features `avx2::expo` is compiled with.
        Isa::Avx2 => unsafe { avx2::expo(dtype, alpha, aligned, sft, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa.is_supported()` was asserted above, i.e. the CPU has
        // avx512f, avx512bw and avx512vl, the target features `avx512::expo`
        // is compiled with.
        Isa::Avx512 => unsafe { avx512::expo(dtype, alpha, aligned, sft, out) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 | Isa::Avx512 => unreachable!("is_supported() is false off x86_64"),
    }
}

#[cfg(test)]
mod tests {
    use super::scalar::{BF16_NAN, F16_NAN, F32_NAN};
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const DTYPES: [FloatDtype; 3] = [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32];

    // ---------------------------------------------------------------- API

    #[test]
    fn dtype_size_and_name() {
        assert_eq!(FloatDtype::BF16.size(), 2);
        assert_eq!(FloatDtype::F16.size(), 2);
        assert_eq!(FloatDtype::F32.size(), 4);
        assert_eq!(FloatDtype::BF16.name(), "BF16");
        assert_eq!(FloatDtype::F16.name(), "F16");
        assert_eq!(FloatDtype::F32.name(), "F32");
    }

    #[test]
    fn available_isas_reported() {
        let avail = Isa::available();
        eprintln!(
            "kernel ISAs available on this CPU: {}",
            avail
                .iter()
                .map(|i| i.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert_eq!(avail.first(), Some(&Isa::Scalar), "Scalar must come first");
        for (i, isa) in avail.iter().enumerate() {
            assert!(!avail[i + 1..].contains(isa), "duplicate {isa:?}");
        }
        for isa in [Isa::Avx2, Isa::Avx512] {
            if !avail.contains(&isa) {
                eprintln!(
                    "SKIPPED: {} is not available on this CPU; its kernel is NOT tested here",
                    isa.name()
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c");
            assert_eq!(avail.contains(&Isa::Avx2), avx2);
            let avx512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl");
            assert_eq!(avail.contains(&Isa::Avx512), avx512);
        }
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(avail, vec![Isa::Scalar]);
    }

    #[test]
    fn isa_names() {
        assert_eq!(Isa::Scalar.name(), "scalar");
        assert_eq!(Isa::Avx2.name(), "avx2");
        assert_eq!(Isa::Avx512.name(), "avx512");
    }

    #[test]
    fn isa_selection() {
        let avail = Isa::available();
        let best = *avail.last().unwrap();
        assert_eq!(Isa::select_from(None), Ok(best));
        assert_eq!(Isa::select_from(Some("")), Ok(best));
        assert_eq!(Isa::select_from(Some("scalar")), Ok(Isa::Scalar));
        for isa in [Isa::Avx2, Isa::Avx512] {
            let spelled = format!(" {} ", isa.name().to_uppercase());
            match Isa::select_from(Some(&spelled)) {
                Ok(got) => {
                    assert!(avail.contains(&isa));
                    assert_eq!(got, isa);
                }
                Err(e) => {
                    assert!(!avail.contains(&isa));
                    assert_eq!(
                        e,
                        IsaError::Unsupported {
                            value: spelled.trim().to_owned(),
                            isa,
                            available: avail.clone()
                        }
                    );
                }
            }
        }
        assert_eq!(
            Isa::select_from(Some("sse9")),
            Err(IsaError::Unknown {
                value: "sse9".into()
            })
        );
        // The real entry point agrees with the helper on the actual environment.
        let env = std::env::var(ISA_ENV_VAR).ok();
        assert_eq!(Isa::select(), Isa::select_from(env.as_deref()));
    }

    #[test]
    fn unavailable_isa_panics_instead_of_running() {
        for isa in [Isa::Avx2, Isa::Avx512] {
            if Isa::available().contains(&isa) {
                continue;
            }
            let r = std::panic::catch_unwind(|| {
                let mut out = [0u8; 64];
                expo(isa, FloatDtype::BF16, 1.0, &[0; 64], &[0; 64], &mut out);
            });
            assert!(r.is_err(), "{isa:?} must panic when unsupported");
        }
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn length_mismatch_panics() {
        let mut out = [0u8; 4];
        expo(
            Isa::Scalar,
            FloatDtype::BF16,
            1.0,
            &[0; 4],
            &[0; 6],
            &mut out,
        );
    }

    #[test]
    #[should_panic(expected = "not a whole number")]
    fn partial_element_panics() {
        let mut out = [0u8; 6];
        expo(
            Isa::Scalar,
            FloatDtype::F32,
            1.0,
            &[0; 6],
            &[0; 6],
            &mut out,
        );
    }

    #[test]
    fn empty_input_is_fine_on_every_isa() {
        for isa in Isa::available() {
            for dtype in DTYPES {
                expo(isa, dtype, 1.0, &[], &[], &mut []);
            }
        }
    }

    // ------------------------------------------------- reference formulas

    /// Independent per-element definition using the `half` crate for the
    /// conversions (both are round-to-nearest-even), NaN canonicalized after.
    fn independent(dtype: FloatDtype, a: u32, s: u32, alpha: f32) -> u32 {
        use half::{bf16, f16};
        let (a, s) = match dtype {
            FloatDtype::BF16 => (
                bf16::from_bits(a as u16).to_f32(),
                bf16::from_bits(s as u16).to_f32(),
            ),
            FloatDtype::F16 => (
                f16::from_bits(a as u16).to_f32(),
                f16::from_bits(s as u16).to_f32(),
            ),
            FloatDtype::F32 => (f32::from_bits(a), f32::from_bits(s)),
        };
        let d = a - s;
        let t = alpha * d;
        let o = a + t;
        match dtype {
            FloatDtype::BF16 if o.is_nan() => BF16_NAN as u32,
            FloatDtype::BF16 => bf16::from_f32(o).to_bits() as u32,
            FloatDtype::F16 if o.is_nan() => F16_NAN as u32,
            FloatDtype::F16 => f16::from_f32(o).to_bits() as u32,
            FloatDtype::F32 if o.is_nan() => F32_NAN,
            FloatDtype::F32 => o.to_bits(),
        }
    }

    fn to_bytes(dtype: FloatDtype, words: &[u32]) -> Vec<u8> {
        match dtype.size() {
            2 => words
                .iter()
                .flat_map(|&w| (w as u16).to_le_bytes())
                .collect(),
            _ => words.iter().flat_map(|&w| w.to_le_bytes()).collect(),
        }
    }

    fn from_bytes(dtype: FloatDtype, bytes: &[u8]) -> Vec<u32> {
        match dtype.size() {
            2 => bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect(),
            _ => bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }

    /// Runs `expo` with the three slices starting at the given byte offsets
    /// into their buffers (so SIMD loads/stores are misaligned), and checks
    /// that bytes around `out` are untouched.
    fn run(
        isa: Isa,
        dtype: FloatDtype,
        alpha: f32,
        a: &[u8],
        s: &[u8],
        offs: [usize; 3],
    ) -> Vec<u8> {
        let pad = |v: &[u8], o: usize| {
            let mut b = vec![0xA5u8; o];
            b.extend_from_slice(v);
            b
        };
        let (ab, sb) = (pad(a, offs[0]), pad(s, offs[1]));
        let n = a.len();
        let mut ob = vec![0x5Au8; offs[2] + n + 64];
        expo(
            isa,
            dtype,
            alpha,
            &ab[offs[0]..],
            &sb[offs[1]..],
            &mut ob[offs[2]..offs[2] + n],
        );
        assert!(ob[..offs[2]].iter().all(|&b| b == 0x5A), "wrote before out");
        assert!(
            ob[offs[2] + n..].iter().all(|&b| b == 0x5A),
            "wrote after out"
        );
        ob[offs[2]..offs[2] + n].to_vec()
    }

    // ------------------------------------------------------ strategies

    const BF16_SPECIALS: &[u32] = &[
        0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x807F, 0x0080, 0x8080, 0x7F7F, 0xFF7F, 0x7F7E,
        0xFF7E, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0xFF81, 0x7FFF, 0xFFFF, 0x7FA5, 0xFFD3,
        0x3F80, 0x3F81, 0xBF80, 0xBF81,
    ];
    const F16_SPECIALS: &[u32] = &[
        0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0400, 0x8400, 0x7BFF, 0xFBFF, 0x7BFE,
        0xFBFE, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7FFF, 0xFFFF, 0x7D55, 0xFEAA,
        0x3C00, 0x3C01, 0xBC00, 0xBC01,
    ];
    const F32_SPECIALS: &[u32] = &[
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x8000_0001,
        0x007F_FFFF,
        0x807F_FFFF,
        0x0080_0000,
        0x7F7F_FFFF,
        0xFF7F_FFFF,
        0x7F7F_FFFE,
        0x7F80_0000,
        0xFF80_0000,
        0x7FC0_0000,
        0xFFC0_0000,
        0x7F80_0001,
        0xFF80_0001,
        0x7FFF_FFFF,
        0xFFFF_FFFF,
        0x7FA1_2345,
        0x3F80_0000,
        0x3F80_0001,
        0x3F80_0002,
        0x3400_0000,
        0xBF80_0001,
    ];

    /// Element bit patterns: uniformly random, specials (NaNs with various
    /// payloads and both signs, ±Inf, ±0, subnormals, max finite), values on
    /// a fine grid around ±1 (which, with the simple alphas below, produce
    /// exact rounding ties), and tiny values around the subnormal range.
    fn element(dtype: FloatDtype) -> BoxedStrategy<u32> {
        let (specials, one, sign, small) = match dtype {
            FloatDtype::BF16 => (BF16_SPECIALS, 0x3F80u32, 0x8000u32, 0x0100u32),
            FloatDtype::F16 => (F16_SPECIALS, 0x3C00, 0x8000, 0x0800),
            FloatDtype::F32 => (F32_SPECIALS, 0x3F80_0000, 0x8000_0000, 0x0100_0000),
        };
        let random = match dtype.size() {
            2 => any::<u16>().prop_map(u32::from).boxed(),
            _ => any::<u32>().boxed(),
        };
        prop_oneof![
            4 => random,
            3 => proptest::sample::select(specials),
            2 => (one - 8..one + 8, any::<bool>())
                .prop_map(move |(v, neg)| if neg { v | sign } else { v }),
            1 => (0..small, any::<bool>())
                .prop_map(move |(v, neg)| if neg { v | sign } else { v }),
        ]
        .boxed()
    }

    fn alpha() -> BoxedStrategy<f32> {
        prop_oneof![
            3 => proptest::sample::select(vec![
                0.0f32, -0.0, 1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 0.25, -0.75, 2.0, 3.0, 1e-3,
                1e30, -1e30, 65504.0, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY,
                f32::NEG_INFINITY, f32::NAN, -f32::NAN,
            ]),
            2 => -4.0f32..4.0,
            1 => -1e6f32..1e6,
            2 => any::<u32>().prop_map(f32::from_bits),
        ]
        .boxed()
    }

    type Case = (f32, Vec<(u32, u32)>, [usize; 3]);

    fn case(dtype: FloatDtype) -> impl Strategy<Value = Case> {
        (
            alpha(),
            proptest::collection::vec((element(dtype), element(dtype)), 0..300),
            [0usize..4, 0usize..4, 0usize..4],
        )
    }

    /// 300 cases per test by default (debug builds are slow at generating
    /// them); `PROPTEST_CASES=N` overrides, e.g. for a long release run.
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

    // ------------------------------------------------ scalar correctness

    /// The scalar path (block loop and tail) agrees with the independent
    /// `half`-based formula on random and special inputs.
    #[test]
    fn scalar_matches_independent_formula() {
        for dtype in DTYPES {
            runner()
                .run(&case(dtype), |(alpha, pairs, offs)| {
                    let (a, s): (Vec<u32>, Vec<u32>) = pairs.into_iter().unzip();
                    let out = run(
                        Isa::Scalar,
                        dtype,
                        alpha,
                        &to_bytes(dtype, &a),
                        &to_bytes(dtype, &s),
                        offs,
                    );
                    let got = from_bytes(dtype, &out);
                    for i in 0..a.len() {
                        let want = independent(dtype, a[i], s[i], alpha);
                        prop_assert_eq!(
                            got[i],
                            want,
                            "{} a={:#x} s={:#x} alpha={:e} ({:#010x}) at {}",
                            dtype.name(),
                            a[i],
                            s[i],
                            alpha,
                            alpha.to_bits(),
                            i
                        );
                    }
                    Ok(())
                })
                .unwrap();
        }
    }

    /// Every 16-bit `a` against several `s` per `a` and a set of alphas.
    fn dense_16bit() -> (Vec<u32>, Vec<u32>) {
        let mut a = Vec::new();
        let mut s = Vec::new();
        let mut rng = 0x9E37_79B9u32;
        for x in 0..=u16::MAX as u32 {
            rng ^= rng << 13;
            rng ^= rng >> 17;
            rng ^= rng << 5;
            for y in [x, x ^ 1, x ^ 0x8000, (x + 1) & 0xFFFF, 0, rng & 0xFFFF] {
                a.push(x);
                s.push(y);
            }
        }
        (a, s)
    }

    const DENSE_ALPHAS: [f32; 7] = [0.0, 1.0, -0.5, 1.5, 0.3, -7.25, 1e-30];

    #[test]
    fn scalar_matches_independent_formula_dense_16bit() {
        for dtype in [FloatDtype::BF16, FloatDtype::F16] {
            let (a, s) = dense_16bit();
            let (ab, sb) = (to_bytes(dtype, &a), to_bytes(dtype, &s));
            for alpha in DENSE_ALPHAS {
                let got = from_bytes(dtype, &run(Isa::Scalar, dtype, alpha, &ab, &sb, [0; 3]));
                for i in 0..a.len() {
                    assert_eq!(
                        got[i],
                        independent(dtype, a[i], s[i], alpha),
                        "{} a={:#x} s={:#x} alpha={alpha}",
                        dtype.name(),
                        a[i],
                        s[i]
                    );
                }
            }
        }
    }

    // --------------------------------------------- SIMD == scalar, bytes

    /// Proptest: `isa` gives byte-identical output to the scalar path.
    /// Says SKIPPED loudly (and returns) if the CPU lacks `isa`.
    fn check_isa_matches_scalar(isa: Isa, dtype: FloatDtype) {
        if !Isa::available().contains(&isa) {
            eprintln!(
                "SKIPPED: {} is not available on this CPU; {} {} kernel NOT compared to scalar",
                isa.name(),
                isa.name(),
                dtype.name()
            );
            return;
        }
        runner()
            .run(&case(dtype), |(alpha, pairs, offs)| {
                let (a, s): (Vec<u32>, Vec<u32>) = pairs.into_iter().unzip();
                let (ab, sb) = (to_bytes(dtype, &a), to_bytes(dtype, &s));
                let want = run(Isa::Scalar, dtype, alpha, &ab, &sb, [0; 3]);
                let got = run(isa, dtype, alpha, &ab, &sb, offs);
                if got != want {
                    let (g, w) = (from_bytes(dtype, &got), from_bytes(dtype, &want));
                    let i = (0..g.len()).find(|&i| g[i] != w[i]).unwrap();
                    prop_assert!(
                        false,
                        "{} {} differs from scalar at {} of {}: a={:#x} s={:#x} \
                         alpha={:e} ({:#010x}): got {:#x}, scalar {:#x}",
                        isa.name(),
                        dtype.name(),
                        i,
                        g.len(),
                        a[i],
                        s[i],
                        alpha,
                        alpha.to_bits(),
                        g[i],
                        w[i]
                    );
                }
                Ok(())
            })
            .unwrap();
    }

    /// Every 16-bit `a` (several `s` each, several alphas) through `isa`.
    fn check_isa_dense_16bit(isa: Isa, dtype: FloatDtype) {
        if !Isa::available().contains(&isa) {
            eprintln!(
                "SKIPPED: {} is not available on this CPU; dense {} {} check NOT run",
                isa.name(),
                isa.name(),
                dtype.name()
            );
            return;
        }
        let (a, s) = dense_16bit();
        let (ab, sb) = (to_bytes(dtype, &a), to_bytes(dtype, &s));
        for alpha in DENSE_ALPHAS {
            let want = run(Isa::Scalar, dtype, alpha, &ab, &sb, [0; 3]);
            let got = run(isa, dtype, alpha, &ab, &sb, [1, 3, 1]);
            assert!(got == want, "{} {} alpha={alpha}", isa.name(), dtype.name());
        }
    }

    #[test]
    fn avx2_bf16_matches_scalar() {
        check_isa_matches_scalar(Isa::Avx2, FloatDtype::BF16);
    }

    #[test]
    fn avx2_f16_matches_scalar() {
        check_isa_matches_scalar(Isa::Avx2, FloatDtype::F16);
    }

    #[test]
    fn avx2_f32_matches_scalar() {
        check_isa_matches_scalar(Isa::Avx2, FloatDtype::F32);
    }

    #[test]
    fn avx512_bf16_matches_scalar() {
        check_isa_matches_scalar(Isa::Avx512, FloatDtype::BF16);
    }

    #[test]
    fn avx512_f16_matches_scalar() {
        check_isa_matches_scalar(Isa::Avx512, FloatDtype::F16);
    }

    #[test]
    fn avx512_f32_matches_scalar() {
        check_isa_matches_scalar(Isa::Avx512, FloatDtype::F32);
    }

    #[test]
    fn avx2_dense_16bit_matches_scalar() {
        check_isa_dense_16bit(Isa::Avx2, FloatDtype::BF16);
        check_isa_dense_16bit(Isa::Avx2, FloatDtype::F16);
    }

    #[test]
    fn avx512_dense_16bit_matches_scalar() {
        check_isa_dense_16bit(Isa::Avx512, FloatDtype::BF16);
        check_isa_dense_16bit(Isa::Avx512, FloatDtype::F16);
    }
}
