//! N-input linear combinations with mergekit 0.1.5's exact arithmetic: the `linear` and
//! `task_arithmetic` merges, element-wise over little-endian tensor bytes, byte-identical to
//! what mergekit writes with x86-64 CPU torch (AVX2 or AVX-512 build).
//!
//! One plain-data description, [`Combine`], covers both methods and any number of inputs; it
//! is built once per tensor from what the config says ([`Combine::new`]) and handed with the
//! input chunks to [`combine`]. The derivation of every rule below, with the probes that
//! established it, is `docs/mergekit-arithmetic.md`; `tests/python/mergekit_ref.py` is an
//! independent numpy model of the same order, and the tests check this kernel against it.
//!
//! # Semantics
//!
//! Let `c` be the compute dtype (the config's `dtype:`, else [`promote`] of the inputs'
//! storage dtypes) and `o` the output dtype (`out_dtype:`, else `c`). Every input element is
//! first converted from its storage dtype to `c` (torch `.to(c)`), then widened to `f32`.
//! All arithmetic is IEEE binary32, round to nearest even, subnormals kept.
//!
//! **Fused sum** (`linear`): `r = +0; r = fma(x_i, w_i, r)` for each input in order (torch's
//! `addcmul_` is compiled with FMA contraction: one rounding per input); if normalising,
//! `r = r / s` with `s` the `f32` sum of the `w_i` in torch's reduction order; the result is
//! rounded to `c`, then converted to `o`. `w_i` is the config weight rounded to `f32`.
//!
//! **Task vectors** (`task_arithmetic`, input 0 is the base `b`): each torch op is one
//! binary32 operation rounded to `c` (a *rounding point*): `d_i = c(c(x_i - b) * w_i)` with
//! `w_i` the weight rounded to `c` (through `f32`); `m` = the sum of the `d_i` accumulated in
//! `f32` in torch's order for this element and rounded to `c` once; if normalising,
//! `m = c(m / s)` with `s` the `c`-rounded sum of the `w_i`, replaced by 1 when
//! `|s| < c(1e-8)`; if `lambda != 1`, `m = c(m * f32(lambda))`; finally `c(b + m)`, then
//! converted to `o`. torch sums `N <= 16` task vectors left to right from `+0`; for more it
//! cascades in blocks of 16, and the last `numel % 32` elements of a tensor (all of them when
//! it is smaller than one vector) use four interleaved partial sums instead: this kernel
//! reproduces all of it, which is why [`combine`] takes the chunk's element offset.
//!
//! # NaN, signed zero, subnormals
//!
//! Nothing is flushed; `-0` behaves as in IEEE (the sums start from `+0`, so an all-`-0`
//! column gives `+0`, as in torch). NaN results are *not* canonicalised: the output has the
//! bytes torch writes on its vectorised path, which are deterministic: an operation returns
//! its first NaN operand quieted (sign and payload kept; the operand order per operation is
//! documented in the docs), an invalid operation (`0 * Inf`, `Inf - Inf`, `0 / 0`) returns
//! the x86 default NaN `0xFFC00000`; rounding to BF16 turns every NaN into `0xFFFF` (`0x7FC0`
//! when converting from F16), rounding to F16 keeps sign and the top payload bits (quiet bit
//! set), widening F16 quiets and shifts the payload, widening BF16 is exact. These rules are
//! applied with explicit selects, so every [`Isa`] and every platform gives the same bytes.
//! torch's own scalar loop tails encode some NaNs differently (position- and thread-count
//! dependent); those are the only bytes where mergekit's output can differ (see the docs).
//!
//! # What this module deliberately does not do
//!
//! * No I/O, no tensor names, no config parsing, no weight resolution (filters, gradients):
//!   callers pass the weights of one tensor as the `f64` values mergekit computed.
//! * No ExPO: the ExPO kernel ([`super::expo`]) keeps its own exact sequence.
//! * No "faster but different" modes: no reassociation, no reciprocal multiply, no FTZ.
//! * No allocation per element; dispatch on the ISA, the sequence and the dtypes happens
//!   once per call, never per element.

use std::fmt;

use super::scalar::{bf16_to_f32, f16_to_f32, f32_to_bf16_rne, f32_to_f16_rne};
use super::{FloatDtype, Isa};

/// The x86 default NaN, produced by invalid operations (`0 * Inf`, `Inf - Inf`, `0 / 0`).
pub(crate) const DEFAULT_NAN: u32 = 0xFFC0_0000;
/// The quiet bit of a binary32 NaN.
const QUIET: u32 = 0x0040_0000;
/// BF16 bits of every NaN that torch's vectorised f32 -> bf16 rounding produces.
pub(crate) const BF16_NAN_VECTOR: u16 = 0xFFFF;
/// BF16 bits of every NaN that torch's scalar f32 -> bf16 rounding produces.
pub(crate) const BF16_NAN_SCALAR: u16 = 0x7FC0;

/// The merge methods this kernel implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// mergekit `linear`: weighted sum of all inputs, normalised by default.
    Linear,
    /// mergekit `task_arithmetic`: base plus weighted task vectors (`x_i - base`).
    TaskArithmetic,
}

impl Method {
    /// mergekit's name for the method.
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
        }
    }

    /// mergekit's default for `normalize` (true for linear, false for task arithmetic).
    pub fn default_normalize(self) -> bool {
        matches!(self, Method::Linear)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a [`Combine`] cannot be built. The plan wraps it with the tensor's name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CombineError {
    /// No input models (no weights).
    #[error("{method} needs at least one input model")]
    NoInputs {
        /// The method.
        method: Method,
    },
    /// Task arithmetic without any model besides the base (no weights).
    #[error("task_arithmetic needs at least one model besides the base model")]
    NoTaskModels,
    /// A weight is NaN or infinite, or overflows when rounded to the dtype it is used in.
    #[error("weight {value} of input {index} is not a finite {dtype} number")]
    NonFiniteWeight {
        /// Index in [`CombineParams::weights`] (for task arithmetic, among the non-base
        /// inputs).
        index: usize,
        /// The weight as given.
        value: f64,
        /// The dtype it overflows in: F32 for linear, the compute dtype for task arithmetic.
        dtype: FloatDtype,
    },
    /// `lambda` is NaN or infinite as an `f32`.
    #[error("lambda {value} is not a finite float32 number")]
    NonFiniteLambda {
        /// `lambda` as given.
        value: f64,
    },
}

/// The arithmetic sequence of a [`Combine`]; the rounding points follow from it and from the
/// compute dtype (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Sequence {
    /// `r = +0; r = fma(x_i, w_i, r)` in `f32`; `[r = r / divisor]`; round to compute, out.
    FusedSum,
    /// Input 0 is the base: `m = sum_i c(c(x_i - b) * w_i)` (torch's order, rounded once);
    /// `[m = c(m / divisor)]`; `[m = c(m * lambda)]`; `c(b + m)`; out.
    TaskVectors,
}

/// Which of torch's reduction code paths sums the task vectors of a given element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SumOrder {
    /// Cascade sum (left to right from `+0` for up to 16 vectors), vectorised in groups of
    /// 32 elements.
    Cascade {
        /// Whether, in the final fold of the cascade, the level accumulator is the first
        /// operand (visible only in NaN payloads; depends on the element's 8-lane group).
        level_first: bool,
    },
    /// Four interleaved partial sums (torch `row_sum`).
    Interleaved {
        /// `partial_first[k]`: partial `k` is the first operand when folded into partial 0.
        partial_first: [bool; 4],
    },
    /// The tensor has one element: a contiguous (inner) reduction over the inputs.
    Inner,
}

/// Where torch's task-vector sum switches code paths inside one tensor; pure function of
/// the tensor's element count and the compute dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SumRegions {
    /// Element count of the tensor.
    pub(crate) numel: u64,
    /// Elements `[0, cascade_end)` use the cascade order.
    pub(crate) cascade_end: u64,
    /// Elements `[cascade_end, vector_rows_end)` use vectorised interleaved sums; the rest
    /// scalar interleaved sums.
    pub(crate) vector_rows_end: u64,
    /// Whether the cascade part is torch's vectorised code (else 4-element scalar groups).
    pub(crate) vectorised: bool,
}

/// f32 lanes of torch's AVX2 accumulator vector.
const ACC_LANES: u64 = 8;

impl SumRegions {
    /// The regions of a `numel`-element tensor summed in `compute`.
    pub(crate) fn new(numel: u64, compute: FloatDtype) -> SumRegions {
        // torch's sum kernel is compiled for AVX2 even on AVX-512 machines; it compares the
        // column count with one vector of the stored dtype.
        let vec_elems = match compute {
            FloatDtype::F32 => 8,
            FloatDtype::BF16 | FloatDtype::F16 => 16,
        };
        if numel >= vec_elems {
            let cascade_end = numel - numel % (4 * ACC_LANES);
            let vector_rows_end = cascade_end + (numel - cascade_end) / ACC_LANES * ACC_LANES;
            SumRegions {
                numel,
                cascade_end,
                vector_rows_end,
                vectorised: true,
            }
        } else {
            let cascade_end = numel - numel % 4;
            SumRegions {
                numel,
                cascade_end,
                vector_rows_end: cascade_end,
                vectorised: false,
            }
        }
    }

    /// The order used for element `index` (in `0..numel`) when summing in `compute`.
    pub(crate) fn order(&self, index: u64, compute: FloatDtype) -> SumOrder {
        if self.numel == 1 {
            return SumOrder::Inner;
        }
        if index < self.cascade_end {
            let level_first = self.vectorised && {
                let group = (index % (4 * ACC_LANES)) / ACC_LANES;
                match compute {
                    FloatDtype::F32 => group < 2,
                    FloatDtype::F16 => group < 1,
                    FloatDtype::BF16 => false,
                }
            };
            SumOrder::Cascade { level_first }
        } else if index < self.vector_rows_end {
            let partial_first = [false, compute == FloatDtype::F16, false, false];
            SumOrder::Interleaved { partial_first }
        } else {
            SumOrder::Interleaved {
                partial_first: [false; 4],
            }
        }
    }
}

/// What one output tensor is, as data: the sequence, its constants (already rounded the way
/// mergekit rounds them) and the dtypes. Build it with [`Combine::new`] (or
/// [`Combine::linear`], [`Combine::task_arithmetic`]), which checks every value a config can
/// get wrong; the fields stay private because [`combine`] relies on their agreeing with each
/// other.
#[derive(Clone, Debug, PartialEq)]
pub struct Combine {
    /// The arithmetic sequence.
    pub(crate) sequence: Sequence,
    /// The dtype every operation rounds to.
    pub(crate) compute: FloatDtype,
    /// The dtype written.
    pub(crate) out: FloatDtype,
    /// One coefficient per weighted input (for [`Sequence::TaskVectors`], per non-base
    /// input), as used: `f32(weight)` for the fused sum, `c(f32(weight))` for task vectors.
    pub(crate) coefficients: Vec<f32>,
    /// The normalising divisor, if normalising (already as torch computes it).
    pub(crate) divisor: Option<f32>,
    /// `f32(lambda)` when `lambda != 1` (task vectors only).
    pub(crate) lambda: Option<f32>,
    /// Where the task-vector sum changes order inside the tensor.
    pub(crate) regions: SumRegions,
    /// Elements `[0, simd_end)` may use the SIMD paths (their order is plain left to right).
    pub(crate) simd_end: u64,
}

/// Everything [`Combine::new`] needs for one tensor.
#[derive(Clone, Copy, Debug)]
pub struct CombineParams<'a> {
    /// The method.
    pub method: Method,
    /// One weight per weighted input in config order (task arithmetic: non-base inputs),
    /// the Python floats mergekit resolved for this tensor.
    pub weights: &'a [f64],
    /// Divide by the sum of the weights (mergekit's `normalize`; see
    /// [`Method::default_normalize`] for its default).
    pub normalize: bool,
    /// Task arithmetic's `lambda` (ignored for linear).
    pub lambda: f64,
    /// The compute dtype: the config's `dtype:`, else [`promote`] of the inputs' dtypes.
    pub compute: FloatDtype,
    /// The dtype written: the config's `out_dtype:`, else `compute`.
    pub out: FloatDtype,
    /// Element count of the tensor (task arithmetic sums elements in an order that depends
    /// on it; linear ignores it).
    pub numel: u64,
}

/// torch.promote_types over the inputs' storage dtypes: the compute dtype mergekit uses when
/// the config has no `dtype:` (equal dtypes stay, any mix becomes F32). `None` if empty.
pub fn promote(dtypes: impl IntoIterator<Item = FloatDtype>) -> Option<FloatDtype> {
    let mut it = dtypes.into_iter();
    let first = it.next()?;
    Some(if it.all(|d| d == first) {
        first
    } else {
        FloatDtype::F32
    })
}

impl Combine {
    /// The op for one tensor, with mergekit's rounding of every constant.
    pub fn new(p: &CombineParams<'_>) -> Result<Combine, CombineError> {
        let c = p.compute;
        let n = p.weights.len();
        match p.method {
            Method::Linear => {
                if n == 0 {
                    return Err(CombineError::NoInputs { method: p.method });
                }
                let coefficients = p
                    .weights
                    .iter()
                    .enumerate()
                    .map(|(index, &w)| finite(w as f32, index, w, FloatDtype::F32))
                    .collect::<Result<Vec<f32>, _>>()?;
                // weight.sum(dim=1): an f32 contiguous reduction, stored into a zeroed f32.
                let divisor = p
                    .normalize
                    .then(|| add(0.0, inner_sum(&coefficients, FloatDtype::F32)));
                Ok(Combine {
                    sequence: Sequence::FusedSum,
                    compute: c,
                    out: p.out,
                    coefficients,
                    divisor,
                    lambda: None,
                    regions: SumRegions::new(p.numel, c),
                    // The fused sum has no reduction: every element takes the same path.
                    simd_end: u64::MAX,
                })
            }
            Method::TaskArithmetic => {
                if n == 0 {
                    return Err(CombineError::NoTaskModels);
                }
                // torch.tensor(weights, dtype=c): Python float -> f32 -> c.
                let coefficients = p
                    .weights
                    .iter()
                    .enumerate()
                    .map(|(index, &w)| finite(store_scalar(w as f32, c), index, w, c))
                    .collect::<Result<Vec<f32>, _>>()?;
                let divisor = p.normalize.then(|| {
                    let s = store_scalar(add(0.0, inner_sum(&coefficients, c)), c);
                    // divisor[divisor.abs() < 1e-8] = 1, compared in c.
                    let threshold = store_scalar(1e-8f64 as f32, c);
                    if s.abs() < threshold {
                        1.0
                    } else {
                        s
                    }
                });
                let lambda = if p.lambda != 1.0 {
                    let l = p.lambda as f32;
                    if !l.is_finite() {
                        return Err(CombineError::NonFiniteLambda { value: p.lambda });
                    }
                    Some(l)
                } else {
                    None
                };
                let regions = SumRegions::new(p.numel, c);
                let simd_end = if p.numel <= 1 {
                    0
                } else if n <= 3 {
                    p.numel
                } else if n <= 16 {
                    regions.cascade_end
                } else {
                    0
                };
                Ok(Combine {
                    sequence: Sequence::TaskVectors,
                    compute: c,
                    out: p.out,
                    coefficients,
                    divisor,
                    lambda,
                    regions,
                    simd_end,
                })
            }
        }
    }

    /// [`Combine::new`] for `linear` (any element count: the fused sum has no reduction).
    pub fn linear(
        weights: &[f64],
        normalize: bool,
        compute: FloatDtype,
        out: FloatDtype,
    ) -> Result<Combine, CombineError> {
        Combine::new(&CombineParams {
            method: Method::Linear,
            weights,
            normalize,
            lambda: 1.0,
            compute,
            out,
            numel: 0,
        })
    }

    /// [`Combine::new`] for `task_arithmetic` over a tensor of `numel` elements.
    pub fn task_arithmetic(
        weights: &[f64],
        normalize: bool,
        lambda: f64,
        compute: FloatDtype,
        out: FloatDtype,
        numel: u64,
    ) -> Result<Combine, CombineError> {
        Combine::new(&CombineParams {
            method: Method::TaskArithmetic,
            weights,
            normalize,
            lambda,
            compute,
            out,
            numel,
        })
    }

    /// Number of input slices [`combine`] expects (task vectors: the base, then the models).
    pub fn inputs(&self) -> usize {
        match self.sequence {
            Sequence::FusedSum => self.coefficients.len(),
            Sequence::TaskVectors => self.coefficients.len() + 1,
        }
    }
}

fn finite(v: f32, index: usize, value: f64, dtype: FloatDtype) -> Result<f32, CombineError> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(CombineError::NonFiniteWeight {
            index,
            value,
            dtype,
        })
    }
}

// ------------------------------------------------------------------ element arithmetic

/// `x` quieted (quiet bit set, sign and payload kept).
#[inline(always)]
fn quiet(x: f32) -> f32 {
    f32::from_bits(x.to_bits() | QUIET)
}

/// The x86 NaN rule for an instruction with operands `a`, `b` (priority in that order).
#[inline(always)]
fn pick(r: f32, a: f32, b: f32) -> f32 {
    let r = if r.is_nan() {
        f32::from_bits(DEFAULT_NAN)
    } else {
        r
    };
    let r = if b.is_nan() { quiet(b) } else { r };
    if a.is_nan() {
        quiet(a)
    } else {
        r
    }
}

#[inline(always)]
pub(crate) fn add(a: f32, b: f32) -> f32 {
    pick(a + b, a, b)
}

/// `a + b` with `b` as the priority NaN operand when `b_first`.
#[inline(always)]
fn add_pri(a: f32, b: f32, b_first: bool) -> f32 {
    if b_first {
        pick(a + b, b, a)
    } else {
        pick(a + b, a, b)
    }
}

#[inline(always)]
fn sub(a: f32, b: f32) -> f32 {
    pick(a - b, a, b)
}

#[inline(always)]
fn mul(a: f32, b: f32) -> f32 {
    pick(a * b, a, b)
}

#[inline(always)]
fn div(a: f32, b: f32) -> f32 {
    pick(a / b, a, b)
}

/// `x * w + r` rounded once; NaN priority `x`, then `r`, then `w`.
#[inline(always)]
fn fma(x: f32, w: f32, r: f32) -> f32 {
    let v = pick(x.mul_add(w, r), x, r);
    if !v.is_nan() && w.is_nan() {
        quiet(w)
    } else {
        v
    }
}

/// Widens `bits` of `dtype` to f32 as torch's vectorised copy does: BF16 exact (NaN bits
/// kept), F16 exact for numbers and a NaN quieted with its payload shifted up.
#[inline(always)]
pub(crate) fn widen(bits: u32, dtype: FloatDtype) -> f32 {
    match dtype {
        FloatDtype::BF16 => bf16_to_f32(bits as u16),
        FloatDtype::F16 => {
            let v = f16_to_f32(bits as u16);
            if v.is_nan() {
                quiet(v)
            } else {
                v
            }
        }
        FloatDtype::F32 => f32::from_bits(bits),
    }
}

/// Rounds `v` to `dtype` (RNE, subnormals kept, overflow to Inf); a NaN becomes `bf16_nan`
/// in BF16 and `sign | 0x7E00 | payload >> 13` in F16 (vcvtps2ph).
#[inline(always)]
pub(crate) fn narrow(v: f32, dtype: FloatDtype, bf16_nan: u16) -> u32 {
    match dtype {
        FloatDtype::BF16 => {
            if v.is_nan() {
                bf16_nan as u32
            } else {
                f32_to_bf16_rne(v) as u32
            }
        }
        FloatDtype::F16 => {
            if v.is_nan() {
                let b = v.to_bits();
                ((b >> 16) & 0x8000) | 0x7E00 | ((b >> 13) & 0x03FF)
            } else {
                f32_to_f16_rne(v) as u32
            }
        }
        FloatDtype::F32 => v.to_bits(),
    }
}

/// A compute-dtype rounding point on torch's vectorised path.
#[inline(always)]
fn round_to(v: f32, c: FloatDtype) -> f32 {
    match c {
        FloatDtype::F32 => v,
        _ => widen(narrow(v, c, BF16_NAN_VECTOR), c),
    }
}

/// A value stored into a `c` tensor by torch's scalar code (sum results, `torch.tensor`).
#[inline(always)]
fn store_scalar(v: f32, c: FloatDtype) -> f32 {
    match c {
        FloatDtype::F32 => v,
        _ => widen(narrow(v, c, BF16_NAN_SCALAR), c),
    }
}

/// The NaN encoding torch's `.to(dst)` gives a BF16 result converted from `src`.
#[inline(always)]
pub(crate) fn bf16_nan_from(src: FloatDtype) -> u16 {
    if src == FloatDtype::F16 {
        BF16_NAN_SCALAR
    } else {
        BF16_NAN_VECTOR
    }
}

/// An input element of storage dtype `s` as the compute dtype `c` sees it, in f32.
#[inline(always)]
pub(crate) fn load(bits: u32, s: FloatDtype, c: FloatDtype) -> f32 {
    let v = widen(bits, s);
    if s == c {
        v
    } else {
        widen(narrow(v, c, bf16_nan_from(s)), c)
    }
}

/// The final f32 result rounded to `c` (vectorised path), then converted to `out`.
#[inline(always)]
pub(crate) fn store(v: f32, c: FloatDtype, out: FloatDtype) -> u32 {
    let in_c = narrow(v, c, BF16_NAN_VECTOR);
    if out == c {
        in_c
    } else {
        narrow(widen(in_c, c), out, bf16_nan_from(c))
    }
}

// ------------------------------------------------------------------ torch's reductions

fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// torch's cascade sum of `size` items (`item(i)`), from `+0`: blocks of `2^level_power`
/// items summed into level 0, carried into level 1 after each block (further levels every
/// `2^level_power` blocks), level 0 folded with levels 1..3 at the end (`level_first`: the
/// level is the first operand there).
fn cascade(size: usize, item: impl Fn(usize) -> f32, level_first: bool) -> f32 {
    let level_power = (ceil_log2(size) / 4).max(4);
    let step = 1usize << level_power;
    let mask = step - 1;
    let mut acc = [0.0f32; 4];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            acc[0] = add(acc[0], item(i));
            i += 1;
        }
        for lv in 1..4 {
            acc[lv] = add(acc[lv], acc[lv - 1]);
            acc[lv - 1] = 0.0;
            if i & (mask << (lv as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        acc[0] = add(acc[0], item(i));
        i += 1;
    }
    for lv in 1..4 {
        acc[0] = add_pri(acc[0], acc[lv], level_first);
    }
    acc[0]
}

/// torch's `row_sum`: item `i` goes to partial `i % 4` (each a cascade), leftovers to
/// partial 0, then partials 1, 2, 3 are folded into partial 0.
fn row_sum(items: &[f32], partial_first: [bool; 4]) -> f32 {
    let rows = items.len() / 4;
    let mut partial = [0.0f32; 4];
    for (k, p) in partial.iter_mut().enumerate() {
        *p = cascade(rows, |i| items[4 * i + k], false);
    }
    for &x in &items[4 * rows..] {
        partial[0] = add(partial[0], x);
    }
    for k in 1..4 {
        partial[0] = add_pri(partial[0], partial[k], partial_first[k]);
    }
    partial[0]
}

/// torch's `sum` of a contiguous run of `items` (values of dtype `dtype`, in f32),
/// accumulated in f32, not yet stored.
pub(crate) fn inner_sum(items: &[f32], dtype: FloatDtype) -> f32 {
    let vec_elems = match dtype {
        FloatDtype::F32 => 8,
        FloatDtype::BF16 | FloatDtype::F16 => 16,
    };
    let k = items.len();
    if k < vec_elems {
        return row_sum(items, [false; 4]);
    }
    let n_vec = k / vec_elems;
    let lanes = ACC_LANES as usize;
    // Lane j of vector i: one element (f32) or elements j and j + 8 added (16-bit dtypes
    // are loaded as two f32 vectors).
    let lane_item = |i: usize, j: usize| -> f32 {
        let base = i * vec_elems;
        if vec_elems == lanes {
            items[base + j]
        } else {
            add(items[base + j], items[base + lanes + j])
        }
    };
    let mut final_acc = 0.0f32;
    for &x in &items[n_vec * vec_elems..] {
        final_acc = add(final_acc, x);
    }
    for j in 0..lanes {
        let lane_items: Vec<f32> = (0..n_vec).map(|i| lane_item(i, j)).collect();
        final_acc = add_pri(final_acc, row_sum(&lane_items, [false; 4]), true);
    }
    final_acc
}

/// Sum of the task vectors of one element in torch's order for that element.
fn task_sum(d: &[f32], order: SumOrder, c: FloatDtype) -> f32 {
    match order {
        SumOrder::Cascade { level_first } => cascade(d.len(), |i| d[i], level_first),
        SumOrder::Interleaved { partial_first } => row_sum(d, partial_first),
        SumOrder::Inner => inner_sum(d, c),
    }
}

// ------------------------------------------------------------------------ entry point

/// Reads element `i` of a little-endian slice of `dtype` as raw bits.
#[inline(always)]
pub(crate) fn read(bytes: &[u8], i: usize, dtype: FloatDtype) -> u32 {
    match dtype {
        FloatDtype::BF16 | FloatDtype::F16 => {
            u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32
        }
        FloatDtype::F32 => u32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]),
    }
}

/// Writes raw bits as element `i` of a little-endian slice of `dtype`.
#[inline(always)]
pub(crate) fn write(bytes: &mut [u8], i: usize, dtype: FloatDtype, bits: u32) {
    match dtype {
        FloatDtype::BF16 | FloatDtype::F16 => {
            bytes[2 * i..2 * i + 2].copy_from_slice(&(bits as u16).to_le_bytes())
        }
        FloatDtype::F32 => bytes[4 * i..4 * i + 4].copy_from_slice(&bits.to_le_bytes()),
    }
}

/// Computes `op` for the elements `offset .. offset + n` of the tensor: `inputs` hold `n`
/// little-endian elements each (in their own storage dtypes, in the order of
/// [`Combine::inputs`]), `out` receives `n` elements of the op's output dtype (`out` of
/// [`CombineParams`]). Slices need not be aligned. The result does not depend on `isa` or on
/// how a tensor is cut into chunks.
///
/// Dispatch happens once per call.
///
/// ```
/// use mergestream::kernel::linear::{combine, Combine};
/// use mergestream::kernel::{FloatDtype, Isa};
/// // linear, BF16, weights 0.25 and 0.75 normalised: 0.25 * 1.0 + 0.75 * 2.0 = 1.75 (0x3FE0).
/// let op = Combine::linear(&[0.25, 0.75], true, FloatDtype::BF16, FloatDtype::BF16).unwrap();
/// let (a, b) = (0x3F80u16.to_le_bytes(), 0x4000u16.to_le_bytes());
/// let mut out = [0u8; 2];
/// combine(Isa::select().unwrap(), &op, 0, &[(&a, FloatDtype::BF16), (&b, FloatDtype::BF16)], &mut out);
/// assert_eq!(u16::from_le_bytes(out), 0x3FE0);
/// ```
///
/// # Panics
///
/// On caller bugs: the number of inputs differs from [`Combine::inputs`], a slice length is
/// not `n` elements of its dtype, the chunk runs past the tensor's element count (task
/// vectors), or `isa` is not supported by this CPU.
pub fn combine(
    isa: Isa,
    op: &Combine,
    offset: u64,
    inputs: &[(&[u8], FloatDtype)],
    out: &mut [u8],
) {
    assert_eq!(
        inputs.len(),
        op.inputs(),
        "combine: {} inputs given, the op takes {}",
        inputs.len(),
        op.inputs()
    );
    assert!(
        out.len().is_multiple_of(op.out.size()),
        "combine: out is {} bytes, not a whole number of {} elements",
        out.len(),
        op.out
    );
    let n = out.len() / op.out.size();
    for (i, (bytes, dtype)) in inputs.iter().enumerate() {
        assert_eq!(
            bytes.len(),
            n * dtype.size(),
            "combine: input {i} is {} bytes, expected {n} {dtype} elements",
            bytes.len()
        );
    }
    if op.sequence == Sequence::TaskVectors {
        assert!(
            offset
                .checked_add(n as u64)
                .is_some_and(|end| end <= op.regions.numel),
            "combine: elements {offset}..+{n} run past the tensor's {} elements",
            op.regions.numel
        );
    }
    assert!(
        isa.is_supported(),
        "combine: instruction set {isa} is not supported by this CPU"
    );
    // The SIMD paths cover elements below `simd_end`; the rest (and everything on a CPU
    // without FMA) is the scalar reference.
    let simd_n = if simd_capable(isa) {
        (op.simd_end.saturating_sub(offset)).min(n as u64) as usize
    } else {
        0
    };
    let mut done = 0;
    if simd_n > 0 {
        // The SIMD twins process whole steps of the elements `out` holds.
        let head_out = &mut out[..simd_n * op.out.size()];
        done = match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: simd_capable(Avx2) checked avx2, f16c and fma, the target features
            // of `linear_avx2::combine`.
            Isa::Avx2 => unsafe { super::linear_avx2::combine(op, inputs, head_out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: simd_capable(Avx512) checked avx512f/bw/vl, the target features of
            // `linear_avx512::combine`.
            Isa::Avx512 => unsafe { super::linear_avx512::combine(op, inputs, head_out) },
            _ => unreachable!("simd_capable is false for {isa}"),
        };
    }
    if done < n {
        scalar(op, offset, inputs, out, done, n);
    }
}

/// Whether `isa` has a SIMD twin here on this CPU (AVX2 needs FMA too; CPUs with AVX2 but
/// without FMA use the scalar path).
fn simd_capable(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => false,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma")
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

/// The scalar reference for elements `from..to` of the chunk.
fn scalar(
    op: &Combine,
    offset: u64,
    inputs: &[(&[u8], FloatDtype)],
    out: &mut [u8],
    from: usize,
    to: usize,
) {
    let c = op.compute;
    match op.sequence {
        Sequence::FusedSum => {
            for i in from..to {
                let mut r = 0.0f32;
                for ((bytes, s), &w) in inputs.iter().zip(&op.coefficients) {
                    r = fma(load(read(bytes, i, *s), *s, c), w, r);
                }
                if let Some(d) = op.divisor {
                    r = div(r, d);
                }
                write(out, i, op.out, store(r, c, op.out));
            }
        }
        Sequence::TaskVectors => {
            let (base, models) = inputs.split_first().expect("task vectors have a base");
            // Scratch for one element's task vectors; on the stack for up to 32 models.
            let mut stack = [0.0f32; 32];
            let mut heap = Vec::new();
            let d: &mut [f32] = if models.len() <= stack.len() {
                &mut stack[..models.len()]
            } else {
                heap.resize(models.len(), 0.0);
                &mut heap
            };
            for i in from..to {
                let b = load(read(base.0, i, base.1), base.1, c);
                for ((di, (bytes, s)), &w) in d.iter_mut().zip(models).zip(&op.coefficients) {
                    let x = load(read(bytes, i, *s), *s, c);
                    *di = round_to(mul(round_to(sub(x, b), c), w), c);
                }
                let order = op.regions.order(offset + i as u64, c);
                let mut m = store_scalar(add(0.0, task_sum(d, order, c)), c);
                if let Some(s) = op.divisor {
                    m = round_to(div(m, s), c);
                }
                if let Some(l) = op.lambda {
                    m = round_to(mul(m, l), c);
                }
                write(out, i, op.out, store(add(b, m), c, op.out));
            }
        }
    }
}

#[cfg(test)]
mod tests;
