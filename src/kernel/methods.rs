//! The merge methods that need whole-tensor (or per-row) statistics — `ties`, `dare_linear`,
//! `dare_ties`, `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`, `slerp`,
//! `model_stock` — as data plus pure functions over byte slices, streamable in passes.
//!
//! # How a caller drives an [`Op`]
//!
//! ```text
//! let mut op = Op::new(&params, &tensor_ctx)?;          // per tensor, from config values
//! while let Some(pass) = op.next_pass() {               // 0–4 reduction passes
//!     let mut comb = op.combiner();
//!     for chunk in chunks (any threads, any arrival order) {
//!         let p = op.partial(chunk.offset, &chunk.inputs)?;   // pure, &self
//!         ...hand p to the combiner in chunk order...
//!     }
//!     comb.push(p, &chunk.inputs)?  (in chunk order);  op.finish_pass(comb)?;
//! }
//! op.output(chunk.offset, &chunk.inputs, &mut chunk.out)?;    // element-wise, any order
//! ```
//!
//! Chunks are element ranges `[offset, offset + len)` whose `offset` is a multiple of
//! [`Op::granule`] and whose `len` is too (except the tensor's last chunk). `inputs[0]` is the
//! base model's bytes, then the other models in config order, each in its storage dtype;
//! `out` is in the output dtype. Every pass sees the same chunking is *not* required.
//!
//! # Semantics
//!
//! `docs/mergekit-methods.md` has the full derivation from mergekit 0.1.5; in short, inputs are
//! converted to the compute dtype `c` (mergekit's `dtype:`) with round-to-nearest-even, every
//! element-wise step is an f32 operation rounded to `c` (as torch computes bf16/f16 ops), sums
//! over the models axis are sequential f32 from `+0.0` rounded once to `c`, and the result is
//! rounded to the output dtype (NaN becomes the dtype's canonical positive quiet NaN).
//! Whole-tensor sums and rank thresholds come from the crate's streamed statistics (fixed
//! association, tie rule: lower index first), except model_stock's norms and dots, which are
//! torch's own one-thread order ([`super::torch_order`], folded in chunk order by the
//! [`Combiner`]); randomness from a counter-based generator
//! (Philox4x32-10 keyed by the seed and the tensor name); SLERP's `acos`/`sin` from plain IEEE
//! f64 arithmetic, so every machine computes the same bits.
//!
//! Also in `docs/mergekit-methods.md`: the exact construction of the three above, the pass
//! structure per method, the streaming design and the agreement figures with mergekit.
//!
//! What this module deliberately does not do: no I/O, no threads (see [`super::exec`] for a
//! reference driver), no config parsing (callers hand in resolved per-tensor values), no SIMD
//! (the per-element work is small next to the reads; a SIMD twin would need its own bit-exact
//! tests), no float64 compute dtype, no `consensus_method: count` (no mergekit 0.1.5 method or
//! YAML key reaches it).

use super::detmath;
use super::rng;
use super::scalar::{bf16_to_f32, f16_to_f32, f32_to_bf16_rne, f32_to_f16_rne};
use super::scalar::{BF16_NAN, F16_NAN, F32_NAN};
use super::stats::{
    key_bits, lane_sum, magnitude_key, Order, PairwiseTree, SelectPhase, Selection, TieFinder,
    BINS, BLOCK,
};
use super::torch_order::{CascadeSum, Load, NormTwo};
use super::FloatDtype;

/// A merge method of this module (mergekit's names and defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `ties`: keep each task vector's largest magnitudes (`density`), elect a sign.
    Ties,
    /// `dare_linear`: drop task-vector elements at random (keep probability `density`),
    /// rescale, no sign election.
    DareLinear,
    /// `dare_ties`: DARE's random drop, then sign election.
    DareTies,
    /// `breadcrumbs`: drop the largest (`gamma`) and the smallest magnitudes, keeping
    /// `density`.
    Breadcrumbs,
    /// `breadcrumbs_ties`: breadcrumbs, then sign election.
    BreadcrumbsTies,
    /// `della`: random drop with keep probabilities ranked by magnitude within each row
    /// (`density ± epsilon`), then sign election.
    Della,
    /// `della_linear`: DELLA's drop, no sign election.
    DellaLinear,
    /// `slerp`: spherical interpolation between the base and one other model at `t`.
    Slerp,
    /// `model_stock`: interpolation between the base and the models' average, with a ratio
    /// from the task vectors' cosines.
    ModelStock,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sparsify {
    Magnitude,
    Outliers,
    Random,
    Della,
}

impl Method {
    /// Every method, in mergekit's registry order.
    pub const ALL: [Method; 9] = [
        Method::Ties,
        Method::DareTies,
        Method::DareLinear,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::Della,
        Method::DellaLinear,
        Method::Slerp,
        Method::ModelStock,
    ];

    /// mergekit's `merge_method:` name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::Della => "della",
            Method::DellaLinear => "della_linear",
            Method::Slerp => "slerp",
            Method::ModelStock => "model_stock",
        }
    }

    /// The method named `name` (exact, as mergekit matches it).
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    fn sparsify(self) -> Option<Sparsify> {
        match self {
            Method::Ties => Some(Sparsify::Magnitude),
            Method::DareLinear | Method::DareTies => Some(Sparsify::Random),
            Method::Breadcrumbs | Method::BreadcrumbsTies => Some(Sparsify::Outliers),
            Method::Della | Method::DellaLinear => Some(Sparsify::Della),
            Method::Slerp | Method::ModelStock => None,
        }
    }

    /// Whether the method elects a sign per element (mergekit's `consensus_method: sum`).
    pub fn sign_election(self) -> bool {
        matches!(
            self,
            Method::Ties | Method::DareTies | Method::BreadcrumbsTies | Method::Della
        )
    }

    /// mergekit 0.1.5's default for `normalize`.
    pub fn default_normalize(self) -> bool {
        matches!(self, Method::Ties | Method::Della)
    }

    /// mergekit 0.1.5's default for `rescale` (L1-norm rescaling after sparsification).
    pub fn default_rescale(self) -> bool {
        matches!(
            self,
            Method::DareLinear | Method::DareTies | Method::Della | Method::DellaLinear
        )
    }
}

/// Per-model parameters of the task-arithmetic family (mergekit's `NON_BASE` scope).
#[derive(Clone, Debug, PartialEq)]
pub struct InputParams {
    /// Weight of the model's task vector (rounded to the compute dtype); must be finite.
    pub weight: f64,
    /// Fraction kept; mergekit's default 1.0.
    pub density: f64,
    /// breadcrumbs: fraction of largest magnitudes removed; default 0.01.
    pub gamma: f64,
    /// della: half-width of the keep-probability range; default 0.15.
    pub epsilon: f64,
}

impl InputParams {
    /// `weight` with mergekit's defaults for the rest.
    pub fn new(weight: f64) -> InputParams {
        InputParams {
            weight,
            density: 1.0,
            gamma: 0.01,
            epsilon: 0.15,
        }
    }
}

/// One tensor's resolved parameters (what the config layer hands over).
#[derive(Clone, Debug, PartialEq)]
pub struct MethodParams {
    /// The method.
    pub method: Method,
    /// The non-base models' parameters, in config order (task-arithmetic family only).
    pub inputs: Vec<InputParams>,
    /// `None`: the method's default.
    pub normalize: Option<bool>,
    /// `None`: the method's default.
    pub rescale: Option<bool>,
    /// Scale of the merged task vector (task-arithmetic family; 1 leaves it unscaled).
    pub lambda: f64,
    /// Accepted and ignored: the mask dtype cannot change a result (signs are −1, 0, 1 in any
    /// dtype, NaN's sign is 0 in both).
    pub int8_mask: bool,
    /// slerp's interpolation factor for this tensor.
    pub t: f64,
    /// model_stock: cosines per row (last axis) instead of over the whole tensor.
    pub filter_wise: bool,
    /// DARE/DELLA seed: with the tensor's name, it keys the random drop masks (`0` unless the
    /// config says otherwise).
    pub seed: u64,
}

impl MethodParams {
    /// Parameters for `method`: mergekit's defaults (`normalize` and `rescale` the method's,
    /// `lambda` 1, no `filter_wise`), `t` 0.5 (mergekit has none: set it for SLERP), seed 0,
    /// and no per-model entries (the task-arithmetic family needs one per non-base model in
    /// [`MethodParams::inputs`]).
    pub fn new(method: Method) -> MethodParams {
        MethodParams {
            method,
            inputs: Vec::new(),
            normalize: None,
            rescale: None,
            lambda: 1.0,
            int8_mask: false,
            t: 0.5,
            filter_wise: false,
            seed: rng::DEFAULT_SEED,
        }
    }
}

/// What the op needs to know about the tensor.
#[derive(Clone, Debug)]
pub struct TensorCtx<'a> {
    /// The tensor's name: with [`MethodParams::seed`], it keys the random drop masks; it also
    /// names the tensor in errors.
    pub name: &'a str,
    /// The tensor's shape; its product is the element count. DELLA ranks within rows (the
    /// last axis of a 1-D or 2-D tensor); model_stock with `filter_wise` takes one ratio per
    /// row (the last axis).
    pub shape: &'a [u64],
    /// mergekit's `dtype:` (or the promoted input dtype).
    pub compute: FloatDtype,
    /// Storage dtype of each input: the base first, then the other models in config order.
    pub inputs: &'a [FloatDtype],
    /// Output dtype (mergekit's `out_dtype:`, else `compute`).
    pub out: FloatDtype,
}

/// Why an op cannot be built or driven. [`MethodError::is_protocol`] tells the two kinds
/// apart: problems with the parameters or the tensor ([`Op::new`]: `InputCount`, `BadParam`,
/// `DellaEpsilon`, `RowShape`), and a driver breaking the protocol of the module
/// documentation (a bug in the caller, not in the input: the rest).
///
/// The messages do not name the tensor (each variant carries it in `tensor`): the error that
/// wraps them for the user ([`crate::Error::Method`]) names it once.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MethodError {
    /// The method does not take this many inputs.
    #[error("{method} takes {expected} inputs (base included), got {got}")]
    InputCount {
        /// The tensor.
        tensor: String,
        /// The method's name.
        method: &'static str,
        /// How many it takes (`"exactly 2"`, `"at least 3"`, …).
        expected: &'static str,
        /// How many [`TensorCtx::inputs`] lists.
        got: usize,
    },
    /// [`MethodParams::inputs`] does not have one entry per non-base model.
    #[error("{method}: {got} sets of per-model parameters for {models} non-base models")]
    ParamCount {
        /// The tensor.
        tensor: String,
        /// The method's name.
        method: &'static str,
        /// Entries given.
        got: usize,
        /// Non-base models.
        models: usize,
    },
    /// A parameter is out of range: `density`, `gamma` or `epsilon` negative or not
    /// finite; `weight`, `lambda` or `t` not finite (or not finite once rounded to the
    /// dtype it is used in).
    #[error("{method}: parameter '{param}'{} is {value:?}, but it must be {allowed}", of_model(*input))]
    BadParam {
        /// The tensor.
        tensor: String,
        /// The method's name.
        method: &'static str,
        /// For a per-model parameter, the model's index among the non-base models (in config
        /// order); `None` for a method-level one (`lambda`, `t`).
        input: Option<usize>,
        /// The parameter's name.
        param: &'static str,
        /// Its value.
        value: f64,
        /// What it must be (`"a finite number >= 0"`, …).
        allowed: &'static str,
    },
    /// DELLA's keep probabilities `density ± epsilon` do not stay inside (0, 1).
    #[error("{method}: density {density} ± epsilon {epsilon}{} must stay inside (0, 1)", of_model(Some(*input)))]
    DellaEpsilon {
        /// The tensor.
        tensor: String,
        /// The method's name.
        method: &'static str,
        /// Index of the model among the non-base models.
        input: usize,
        /// Its `density`.
        density: f64,
        /// Its `epsilon`.
        epsilon: f64,
    },
    /// DELLA ranks within rows, which needs a tensor of at most two axes.
    #[error("{method} ranks within rows of 1-D and 2-D tensors; shape {shape:?} has {dims} axes")]
    RowShape {
        /// The tensor.
        tensor: String,
        /// The method's name.
        method: &'static str,
        /// Its shape.
        shape: Vec<u64>,
        /// Its number of axes.
        dims: usize,
    },
    /// A chunk does not start on a multiple of [`Op::granule`], is not a multiple of it long
    /// (only the tensor's last chunk may be), or runs past the end of the tensor.
    #[error("chunk at element {offset} of {len} elements is not on a {granule}-element boundary (tensor of {numel})")]
    Misaligned {
        /// The tensor.
        tensor: String,
        /// The chunk's first element.
        offset: u64,
        /// The chunk's length in elements.
        len: u64,
        /// [`Op::granule`].
        granule: u64,
        /// The tensor's element count.
        numel: u64,
    },
    /// A chunk's slices do not all hold the same whole number of elements of their dtypes,
    /// or there are not as many input slices as inputs.
    #[error("chunk byte lengths {lens:?} do not hold the same number of elements")]
    ChunkLengths {
        /// The tensor.
        tensor: String,
        /// Byte lengths of the input slices (then of the output slice, for [`Op::output`]).
        lens: Vec<usize>,
    },
    /// A partial was pushed out of chunk order, or after a gap.
    #[error("partial for elements from {got} pushed where {expected} was next")]
    OutOfOrder {
        /// The tensor.
        tensor: String,
        /// The first element of the chunk that comes next.
        expected: u64,
        /// The first element of the partial's chunk.
        got: u64,
    },
    /// A partial was asked for when no pass is pending, or pushed into the combiner of
    /// another pass.
    #[error("a partial of another pass was pushed")]
    WrongPass {
        /// The tensor.
        tensor: String,
    },
    /// A pass was finished before its partials covered the whole tensor.
    #[error("pass finished after {got} of {numel} elements")]
    Incomplete {
        /// The tensor.
        tensor: String,
        /// Elements covered by the partials pushed.
        got: u64,
        /// The tensor's element count.
        numel: u64,
    },
    /// [`Op::output`] was called while a reduction pass is pending.
    #[error("statistics requested while a reduction pass is pending")]
    PassPending {
        /// The tensor.
        tensor: String,
    },
}

impl MethodError {
    /// Whether this is a driver breaking the protocol (chunks misaligned or out of order, a
    /// pass finished early or with another pass's partials, statistics asked for too soon, not
    /// one set of per-model parameters per model): a bug in the caller, never a problem with
    /// the input or the config.
    pub fn is_protocol(&self) -> bool {
        match self {
            MethodError::InputCount { .. }
            | MethodError::BadParam { .. }
            | MethodError::DellaEpsilon { .. }
            | MethodError::RowShape { .. } => false,
            MethodError::ParamCount { .. }
            | MethodError::Misaligned { .. }
            | MethodError::ChunkLengths { .. }
            | MethodError::OutOfOrder { .. }
            | MethodError::WrongPass { .. }
            | MethodError::Incomplete { .. }
            | MethodError::PassPending { .. } => true,
        }
    }

    /// The tensor the error is about.
    pub fn tensor(&self) -> &str {
        match self {
            MethodError::InputCount { tensor, .. }
            | MethodError::ParamCount { tensor, .. }
            | MethodError::BadParam { tensor, .. }
            | MethodError::DellaEpsilon { tensor, .. }
            | MethodError::RowShape { tensor, .. }
            | MethodError::Misaligned { tensor, .. }
            | MethodError::ChunkLengths { tensor, .. }
            | MethodError::OutOfOrder { tensor, .. }
            | MethodError::WrongPass { tensor }
            | MethodError::Incomplete { tensor, .. }
            | MethodError::PassPending { tensor } => tensor,
        }
    }
}

/// `" of model N (counting the models other than the base from 0)"`, or nothing.
fn of_model(input: Option<usize>) -> String {
    match input {
        Some(i) => format!(" of model {i} (counting the models other than the base, from 0)"),
        None => String::new(),
    }
}

/// The kind of reduction pass an op wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Radix histograms or tie counts for rank thresholds.
    Select,
    /// Fixed-order float sums.
    Sums,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Keep,
    Zero,
    TopK { sel: usize },
    Band { lo: usize, hi: usize },
    Random { p: f32 },
    Della { lo: f32, eps: f32 },
}

#[derive(Clone, Debug)]
struct Model {
    weight: f32,
    mode: Mode,
    /// Rescale ratio in the work dtype, once known (`None`: not rescaled).
    ratio: Option<f32>,
}

#[derive(Clone, Debug)]
struct Sel {
    model: usize,
    pos: u64,
    s: Selection,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Coefs {
    a: f32,
    b: f32,
}

/// One tensor's merge: constants, statistics so far, and the kernels.
#[derive(Clone, Debug)]
pub struct Op {
    method: Method,
    tensor: String,
    n: u64,
    row: u64,
    c: FloatDtype,
    w: FloatDtype,
    out: FloatDtype,
    inputs: Vec<FloatDtype>,
    models: Vec<Model>,
    normalize: bool,
    lambda: Option<f32>,
    rescale: bool,
    div_const: f32,
    key: [u32; 2],
    sels: Vec<Sel>,
    /// Quantities of the sums pass (0: none).
    quantities: usize,
    sums: Option<Vec<f64>>,
    slerp_t: f32,
    slerp: Option<Coefs>,
    stock_t: Option<f32>,
    filter_wise: bool,
}

/// A chunk's contribution to a reduction pass.
#[derive(Clone, Debug)]
pub struct Partial {
    offset: u64,
    len: u64,
    pass: Pass,
    /// Select: per selection, a histogram (High: only on the model's first High selection) or
    /// tie counts per block.
    counts: Vec<Option<Counts>>,
    /// Sums: per block, per quantity.
    sums: Vec<Vec<f64>>,
}

/// Combines a pass's partials, pushed in chunk order.
#[derive(Clone, Debug)]
pub struct Combiner {
    tensor: String,
    pass: Pass,
    next: u64,
    hists: Vec<Option<Vec<u64>>>,
    ties: Vec<Option<TieFinder>>,
    trees: Vec<PairwiseTree>,
    /// model_stock: the norms and dots in torch's order, folded from the chunks' inputs as
    /// they are pushed.
    torch: Option<TorchStock>,
}

/// How torch loads a tensor of compute dtype `c` in its reductions.
fn torch_load(c: FloatDtype) -> Load {
    match c {
        FloatDtype::F32 => Load::F32,
        FloatDtype::BF16 => Load::Bf16,
        FloatDtype::F16 => Load::F16,
    }
}

/// model_stock's statistics in torch's order ([`super::torch_order`]): `‖d_k‖²` per model,
/// `Σ c(d_a·d_b)` per pair, over the whole tensor.
#[derive(Clone, Debug)]
struct TorchStock {
    c: FloatDtype,
    inputs: Vec<FloatDtype>,
    norms: Vec<NormTwo>,
    dots: Vec<CascadeSum>,
}

impl TorchStock {
    fn new(c: FloatDtype, inputs: &[FloatDtype], n: u64) -> TorchStock {
        let k = inputs.len() - 1;
        let load = torch_load(c);
        TorchStock {
            c,
            inputs: inputs.to_vec(),
            norms: (0..k).map(|_| NormTwo::new(n, load)).collect(),
            dots: (0..k * k.saturating_sub(1) / 2)
                .map(|_| CascadeSum::new(n, load))
                .collect(),
        }
    }

    /// Folds in one chunk's inputs, `len` elements, in tensor order.
    fn push(&mut self, inputs: &[&[u8]], len: usize) {
        match self.c {
            FloatDtype::F32 => self.push_t::<Ff>(inputs, len),
            FloatDtype::BF16 => self.push_t::<Bf>(inputs, len),
            FloatDtype::F16 => self.push_t::<Hf>(inputs, len),
        }
    }

    fn push_t<D: Dt>(&mut self, inputs: &[&[u8]], len: usize) {
        let k = self.norms.len();
        let mut v: Vec<Vec<f32>> = (0..=k).map(|_| vec![0f32; TILE]).collect();
        let mut d: Vec<Vec<f32>> = (0..k).map(|_| vec![0f32; TILE]).collect();
        let mut prod = vec![0f32; TILE];
        let mut a = 0;
        while a < len {
            let b = (a + TILE).min(len);
            let n = b - a;
            for (i, vi) in v.iter_mut().enumerate() {
                let src = self.inputs[i];
                decode::<D>(src, slice_of(inputs[i], src, a, b), &mut vi[..n]);
            }
            deltas::<D>(&v, &mut d, n);
            self.fold::<D>(&d, n, &mut prod);
            a = b;
        }
    }

    /// Folds in the next `n` elements of the task vectors `d` (`prod`: scratch, `n` long).
    fn fold<D: Dt>(&mut self, d: &[Vec<f32>], n: usize, prod: &mut [f32]) {
        for (norm, dk) in self.norms.iter_mut().zip(d) {
            norm.push(&dk[..n]);
        }
        let mut dots = self.dots.iter_mut();
        for i in 0..d.len() {
            for j in i + 1..d.len() {
                for ((p, &x), &y) in prod[..n].iter_mut().zip(&d[i][..n]).zip(&d[j][..n]) {
                    *p = D::r(x * y);
                }
                if let Some(dot) = dots.next() {
                    dot.push(&prod[..n]);
                }
            }
        }
    }

    /// `[‖d_k‖², …, Σ d_a·d_b, …]`, each an f32 value held in an f64, as [`stock_t`] takes them.
    fn sums(&self) -> Vec<f64> {
        let norms = self.norms.iter().map(|s| s.finish() as f64);
        norms
            .chain(self.dots.iter().map(|s| s.finish() as f64))
            .collect()
    }
}

#[inline]
fn rnd(d: FloatDtype, x: f32) -> f32 {
    match d {
        FloatDtype::F32 => x,
        _ if x.is_nan() => x,
        FloatDtype::BF16 => bf16_to_f32(f32_to_bf16_rne(x)),
        FloatDtype::F16 => f16_to_f32(f32_to_f16_rne(x)),
    }
}

/// torch's `clamp(min=m)`: NaN stays NaN.
#[inline]
fn clamp_min(x: f32, m: f32) -> f32 {
    if x < m {
        m
    } else {
        x
    }
}

/// Sequential f32 sum from `+0.0`, rounded once to `c` (torch's `sum(dim=0)` over models).
#[inline]
fn seq_sum(c: FloatDtype, vals: impl Iterator<Item = f32>) -> f32 {
    let mut acc = 0.0f32;
    for v in vals {
        acc += v;
    }
    rnd(c, acc)
}

/// What a parameter that is a weight (scales values in `c`) must be.
fn finite_in(c: FloatDtype) -> &'static str {
    match c {
        FloatDtype::F32 => "a finite number (within float32 range)",
        FloatDtype::BF16 => "a finite number (within bfloat16 range)",
        FloatDtype::F16 => "a finite number (within float16 range)",
    }
}

/// `density`, `gamma`, `epsilon`: finite and not negative.
fn check_non_negative(
    tensor: &str,
    method: Method,
    input: usize,
    param: &'static str,
    value: f64,
) -> Result<(), MethodError> {
    if value.is_finite() && value >= 0.0 {
        return Ok(());
    }
    Err(MethodError::BadParam {
        tensor: tensor.to_string(),
        method: method.name(),
        input: Some(input),
        param,
        value,
        allowed: "a finite number >= 0",
    })
}

/// `weight`, `lambda`, `t`: `used`, the value as the kernel uses it (rounded to a dtype),
/// must be finite.
fn check_finite(
    tensor: &str,
    method: Method,
    input: Option<usize>,
    param: &'static str,
    (value, used): (f64, f32),
    allowed: &'static str,
) -> Result<(), MethodError> {
    if value.is_finite() && used.is_finite() {
        return Ok(());
    }
    Err(MethodError::BadParam {
        tensor: tensor.to_string(),
        method: method.name(),
        input,
        param,
        value,
        allowed,
    })
}

impl Op {
    /// Builds the op for one tensor, validating everything a config can get wrong.
    pub fn new(p: &MethodParams, t: &TensorCtx<'_>) -> Result<Op, MethodError> {
        let method = p.method;
        let tensor = t.name.to_string();
        let n: u64 = t.shape.iter().product();
        let k = t.inputs.len().saturating_sub(1);
        let c = t.compute;
        let (expected, ok) = match method {
            Method::Slerp => ("exactly 2", t.inputs.len() == 2),
            Method::ModelStock => ("at least 3", t.inputs.len() >= 3),
            _ => ("at least 2", t.inputs.len() >= 2),
        };
        if !ok {
            return Err(MethodError::InputCount {
                tensor,
                method: method.name(),
                expected,
                got: t.inputs.len(),
            });
        }
        // Method-level parameters, whether or not this method reads them (their defaults are
        // finite): refused here, from the config alone, before any weight is read.
        let f32_range = finite_in(FloatDtype::F32);
        check_finite(
            t.name,
            method,
            None,
            "lambda",
            (p.lambda, p.lambda as f32),
            f32_range,
        )?;
        check_finite(t.name, method, None, "t", (p.t, p.t as f32), f32_range)?;
        let row_local = matches!(method, Method::Della | Method::DellaLinear)
            || (method == Method::ModelStock && p.filter_wise);
        let row = if matches!(method, Method::Della | Method::DellaLinear) {
            match t.shape.len() {
                0 => 1,
                1 => t.shape[0],
                2 => t.shape[1],
                dims => {
                    return Err(MethodError::RowShape {
                        tensor,
                        method: method.name(),
                        shape: t.shape.to_vec(),
                        dims,
                    })
                }
            }
        } else if row_local {
            t.shape.last().copied().unwrap_or(1)
        } else {
            BLOCK
        };
        let w = if c == FloatDtype::BF16 {
            FloatDtype::BF16
        } else {
            FloatDtype::F32
        };
        let mut op = Op {
            method,
            tensor: tensor.clone(),
            n,
            row: row.max(1),
            c,
            w,
            out: t.out,
            inputs: t.inputs.to_vec(),
            models: Vec::new(),
            normalize: p.normalize.unwrap_or(method.default_normalize()),
            lambda: (p.lambda != 1.0).then_some(p.lambda as f32),
            rescale: p.rescale.unwrap_or(method.default_rescale()),
            div_const: 1.0,
            key: rng::tensor_key(p.seed, t.name),
            sels: Vec::new(),
            quantities: 0,
            sums: None,
            slerp_t: p.t as f32,
            slerp: None,
            stock_t: None,
            filter_wise: p.filter_wise,
        };
        match method.sparsify() {
            None if method == Method::Slerp => op.quantities = 3,
            None => {
                op.quantities = if p.filter_wise {
                    0
                } else {
                    k + k * (k - 1) / 2
                }
            }
            Some(sp) => op.init_task_arithmetic(p, sp, k)?,
        }
        if n == 0 {
            op.sels.clear();
            op.quantities = 0;
        }
        if op.quantities == 0 {
            op.sums = Some(Vec::new());
            op.derive()?;
        }
        Ok(op)
    }

    fn init_task_arithmetic(
        &mut self,
        p: &MethodParams,
        sp: Sparsify,
        k: usize,
    ) -> Result<(), MethodError> {
        let (method, c, n) = (self.method, self.c, self.n);
        if p.inputs.len() != k {
            return Err(MethodError::ParamCount {
                tensor: self.tensor.clone(),
                method: method.name(),
                got: p.inputs.len(),
                models: k,
            });
        }
        let bits = key_bits(c);
        for (i, ip) in p.inputs.iter().enumerate() {
            check_non_negative(&self.tensor, method, i, "density", ip.density)?;
            let weight = (ip.weight, rnd(c, ip.weight as f32));
            check_finite(
                &self.tensor,
                method,
                Some(i),
                "weight",
                weight,
                finite_in(c),
            )?;
            match sp {
                Sparsify::Outliers => {
                    check_non_negative(&self.tensor, method, i, "gamma", ip.gamma)?;
                }
                Sparsify::Della => {
                    check_non_negative(&self.tensor, method, i, "epsilon", ip.epsilon)?;
                }
                Sparsify::Magnitude | Sparsify::Random => {}
            }
            let d = ip.density;
            let mode = if d >= 1.0 {
                Mode::Keep
            } else {
                match sp {
                    Sparsify::Magnitude if d <= 0.0 || n == 0 => Mode::Zero,
                    Sparsify::Magnitude => {
                        let kk = ((d * n as f64) as u64).max(1);
                        self.sels.push(Sel {
                            model: i,
                            pos: kk,
                            s: Selection::new(Order::Desc, bits, kk, n),
                        });
                        Mode::TopK {
                            sel: self.sels.len() - 1,
                        }
                    }
                    Sparsify::Outliers => {
                        let target = (d * n as f64) as u64;
                        let n_top = (ip.gamma * n as f64) as u64;
                        let n_bot = n.saturating_sub(target).saturating_sub(n_top);
                        let hi = (n_bot + target).min(n);
                        for pos in [n_bot, hi] {
                            self.sels.push(Sel {
                                model: i,
                                pos,
                                s: Selection::new(Order::Asc, bits, pos, n),
                            });
                        }
                        Mode::Band {
                            lo: self.sels.len() - 2,
                            hi: self.sels.len() - 1,
                        }
                    }
                    Sparsify::Random => Mode::Random {
                        p: rnd(self.w, d as f32),
                    },
                    Sparsify::Della if d <= 0.0 => Mode::Zero,
                    Sparsify::Della => {
                        if d + ip.epsilon >= 1.0 || d - ip.epsilon <= 0.0 {
                            return Err(MethodError::DellaEpsilon {
                                tensor: self.tensor.clone(),
                                method: method.name(),
                                input: i,
                                density: d,
                                epsilon: ip.epsilon,
                            });
                        }
                        Mode::Della {
                            lo: (d - ip.epsilon) as f32,
                            eps: ip.epsilon as f32,
                        }
                    }
                }
            };
            self.models.push(Model {
                weight: rnd(c, ip.weight as f32),
                mode,
                ratio: None,
            });
        }
        let masked = self
            .models
            .iter()
            .any(|m| !matches!(m.mode, Mode::Keep | Mode::Zero));
        if self.rescale && masked {
            self.quantities = 2 * k;
        }
        if !method.sign_election() {
            let d = seq_sum(c, self.models.iter().map(|m| m.weight));
            self.div_const = if d.abs() < rnd(c, 1e-8f32) { 1.0 } else { d };
        }
        Ok(())
    }

    /// Chunk boundaries must be multiples of this many elements.
    pub fn granule(&self) -> u64 {
        self.row
    }

    /// Element count of the tensor (the product of its shape).
    pub fn numel(&self) -> u64 {
        self.n
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The next reduction pass, or `None` when [`Op::output`] can run.
    pub fn next_pass(&self) -> Option<Pass> {
        if self.sels.iter().any(|s| s.s.cut().is_none()) {
            Some(Pass::Select)
        } else if self.sums.is_none() {
            Some(Pass::Sums)
        } else {
            None
        }
    }

    fn check_chunk(
        &self,
        offset: u64,
        inputs: &[&[u8]],
        out: Option<(&[u8], FloatDtype)>,
    ) -> Result<usize, MethodError> {
        let mut lens: Vec<usize> = inputs.iter().map(|b| b.len()).collect();
        if let Some((o, _)) = out {
            lens.push(o.len());
        }
        let mut sizes: Vec<usize> = self.inputs.iter().map(|d| d.size()).collect();
        if let Some((_, d)) = out {
            sizes.push(d.size());
        }
        let len = lens
            .first()
            .zip(sizes.first())
            .map(|(l, s)| l / s)
            .unwrap_or(0);
        if inputs.len() != self.inputs.len()
            || lens
                .iter()
                .zip(&sizes)
                .any(|(l, s)| l % s != 0 || l / s != len)
        {
            return Err(MethodError::ChunkLengths {
                tensor: self.tensor.clone(),
                lens,
            });
        }
        let end = offset + len as u64;
        if !offset.is_multiple_of(self.row)
            || end > self.n
            || (end != self.n && !(len as u64).is_multiple_of(self.row))
        {
            return Err(MethodError::Misaligned {
                tensor: self.tensor.clone(),
                offset,
                len: len as u64,
                granule: self.row,
                numel: self.n,
            });
        }
        Ok(len)
    }

    /// Whether the sums pass takes torch's order ([`TorchStock`]): model_stock over the whole
    /// tensor, where mergekit's cosines come from torch's `sum` and `norm` and their last bits
    /// decide the interpolation factor's.
    fn torch_sums(&self) -> bool {
        self.method == Method::ModelStock && !self.filter_wise
    }

    /// Whether statistics and chunk boundaries follow rows (DELLA's ranks, model_stock's
    /// `filter_wise` ratios) rather than [`BLOCK`]s.
    fn row_local(&self) -> bool {
        matches!(self.method, Method::Della | Method::DellaLinear)
            || (self.method == Method::ModelStock && self.filter_wise)
    }

    /// The pieces `[start, end)` of a chunk of `len` elements that the element-wise loops
    /// work on: whole rows for row-local methods, else [`TILE`]s (which never straddle a
    /// [`BLOCK`], as chunks start at block boundaries).
    fn pieces(&self, len: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = if self.row_local() {
            self.row as usize
        } else {
            TILE
        };
        (0..len.div_ceil(step.max(1))).map(move |i| (i * step, ((i + 1) * step).min(len)))
    }

    /// The longest piece of a chunk of `len` elements.
    fn piece_len(&self, len: usize) -> usize {
        if self.row_local() {
            (self.row as usize).min(len)
        } else {
            TILE.min(len)
        }
    }

    /// The current pass's contribution of one chunk. Pure: call from any thread.
    pub fn partial(&self, offset: u64, inputs: &[&[u8]]) -> Result<Partial, MethodError> {
        let len = self.check_chunk(offset, inputs, None)?;
        let pass = self.next_pass().ok_or_else(|| MethodError::WrongPass {
            tensor: self.tensor.clone(),
        })?;
        let mut part = Partial {
            offset,
            len: len as u64,
            pass,
            counts: Vec::new(),
            sums: Vec::new(),
        };
        match (pass, self.c) {
            (Pass::Select, FloatDtype::BF16) => {
                part.counts = self.select_partial::<Bf>(inputs, len)
            }
            (Pass::Select, FloatDtype::F16) => part.counts = self.select_partial::<Hf>(inputs, len),
            (Pass::Select, FloatDtype::F32) => part.counts = self.select_partial::<Ff>(inputs, len),
            (Pass::Sums, FloatDtype::BF16) => {
                part.sums = self.sums_partial::<Bf>(offset, inputs, len)
            }
            (Pass::Sums, FloatDtype::F16) => {
                part.sums = self.sums_partial::<Hf>(offset, inputs, len)
            }
            (Pass::Sums, FloatDtype::F32) => {
                part.sums = self.sums_partial::<Ff>(offset, inputs, len)
            }
        }
        Ok(part)
    }

    /// Histograms (or tie counts per block) of the selections that want this pass's data.
    /// Model by model, so that at most a model's two selections hold a scratch histogram.
    fn select_partial<D: Dt>(&self, inputs: &[&[u8]], len: usize) -> Vec<Option<Counts>> {
        // What each selection counts in this pass.
        #[derive(Clone, Copy)]
        enum Task {
            /// A histogram of `key >> shift` over every key.
            All { shift: u32 },
            /// A histogram of the low 16 bits of the keys whose high 16 bits are `high`.
            Low { high: u32 },
            /// Keys equal to `key`, per block.
            Ties { key: u32 },
        }
        let tasks: Vec<Option<Task>> = self
            .sels
            .iter()
            .enumerate()
            .map(|(si, sel)| match sel.s.phase {
                SelectPhase::High if self.first_high(si) != si => None,
                SelectPhase::High => Some(Task::All {
                    shift: if sel.s.bits == 16 { 0 } else { 16 },
                }),
                SelectPhase::Low { high, .. } => Some(Task::Low { high }),
                SelectPhase::Ties { key, .. } => Some(Task::Ties { key }),
                SelectPhase::Done(_) => None,
            })
            .collect();
        let mut out: Vec<Option<Counts>> = vec![None; self.sels.len()];
        let piece = self.piece_len(len);
        let mut base = vec![0f32; piece];
        let mut x = vec![0f32; piece];
        let mut keys = vec![0u32; piece];
        let mut pool = HistPool::take();
        for m in 0..self.models_count() {
            // This model's selections with something to count, each with a scratch histogram
            // (and the range of bins it touched) or tie counts per block.
            let mine: Vec<usize> = (0..self.sels.len())
                .filter(|&si| self.sels[si].model == m && tasks[si].is_some())
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut range = vec![(u32::MAX, 0u32); mine.len()];
            let mut ties: Vec<Vec<u32>> = vec![Vec::new(); mine.len()];
            for (a, b) in self.pieces(len) {
                let n = b - a;
                decode::<D>(
                    self.inputs[0],
                    slice_of(inputs[0], self.inputs[0], a, b),
                    &mut base[..n],
                );
                let (src, bytes) = (self.inputs[m + 1], inputs[m + 1]);
                decode::<D>(src, slice_of(bytes, src, a, b), &mut x[..n]);
                for ((key, &xv), &bv) in keys[..n].iter_mut().zip(&x[..n]).zip(&base[..n]) {
                    *key = magnitude_key(D::D, D::r(xv - bv));
                }
                if n == 0 {
                    continue;
                }
                for (slot, &si) in mine.iter().enumerate() {
                    let keys = &keys[..n];
                    match tasks[si] {
                        Some(Task::All { shift }) => {
                            let h = pool.get(slot);
                            let (lo, hi) = &mut range[slot];
                            let (mut l, mut u) = (u32::MAX, 0u32);
                            for &key in keys {
                                l = l.min(key);
                                u = u.max(key);
                            }
                            *lo = (*lo).min((l >> shift) & 0xFFFF);
                            *hi = (*hi).max((u >> shift) & 0xFFFF);
                            for &key in keys {
                                h[((key >> shift) & 0xFFFF) as usize] += 1;
                            }
                        }
                        Some(Task::Low { high }) => {
                            let h = pool.get(slot);
                            let (lo, hi) = &mut range[slot];
                            for &key in keys {
                                if key >> 16 == high {
                                    let bin = key & 0xFFFF;
                                    h[bin as usize] += 1;
                                    *lo = (*lo).min(bin);
                                    *hi = (*hi).max(bin);
                                }
                            }
                        }
                        Some(Task::Ties { key: t }) => {
                            let counts = &mut ties[slot];
                            counts.resize(len.div_ceil(BLOCK as usize), 0);
                            // A piece lies within one block.
                            counts[a / BLOCK as usize] +=
                                keys.iter().map(|&key| u32::from(key == t)).sum::<u32>();
                        }
                        None => {}
                    }
                }
            }
            for (slot, &si) in mine.iter().enumerate() {
                out[si] = Some(match tasks[si] {
                    Some(Task::Ties { .. }) => Counts::Ties(std::mem::take(&mut ties[slot])),
                    _ => pool.emit(slot, range[slot]),
                });
            }
        }
        pool.give_back();
        out
    }

    /// The first selection of the same model that is in the High phase (histograms shared).
    fn first_high(&self, si: usize) -> usize {
        let m = self.sels[si].model;
        self.sels
            .iter()
            .position(|s| s.model == m && s.s.phase == SelectPhase::High)
            .unwrap_or(si)
    }

    /// Per block (a row for row-local methods) of the chunk, the pass's quantities.
    fn sums_partial<D: Dt>(&self, offset: u64, inputs: &[&[u8]], len: usize) -> Vec<Vec<f64>> {
        if self.torch_sums() {
            // Folded in order by the combiner, from the chunk's inputs.
            return Vec::new();
        }
        let block = (self.row as usize).min(len.max(1));
        let k = self.models_count();
        let mut v: Vec<Vec<f32>> = (0..=k).map(|_| vec![0f32; block]).collect();
        let mut d: Vec<Vec<f32>> = (0..k).map(|_| vec![0f32; block]).collect();
        let mut summands = vec![0f64; block];
        let mut scratch = Scratch::new(block);
        let mut markers = self.markers();
        let mut out = Vec::with_capacity(len.div_ceil(block));
        let mut a = 0;
        while a < len {
            let b = (a + self.row as usize).min(len);
            let n = b - a;
            for (i, vi) in v.iter_mut().enumerate() {
                decode::<D>(
                    self.inputs[i],
                    slice_of(inputs[i], self.inputs[i], a, b),
                    &mut vi[..n],
                );
            }
            let s = &mut summands[..n];
            let mut q = Vec::with_capacity(self.quantities);
            match self.method {
                Method::Slerp => {
                    let (x, y) = (&v[0][..n], &v[1][..n]);
                    for (pa, pb) in [(x, x), (y, y), (x, y)] {
                        for ((s, &p), &r) in s.iter_mut().zip(pa).zip(pb) {
                            *s = p as f64 * r as f64;
                        }
                        q.push(lane_sum(s));
                    }
                }
                Method::ModelStock => {
                    unreachable!("model_stock's sums are folded by its combiner (torch_sums)")
                }
                _ => {
                    deltas::<D>(&v, &mut d, n);
                    let first = offset + a as u64;
                    for (m, dm) in d.iter_mut().enumerate() {
                        let dm = &mut dm[..n];
                        for (s, &e) in s.iter_mut().zip(dm.iter()) {
                            *s = e.abs() as f64;
                        }
                        q.push(lane_sum(s));
                        // The masked task vector, before any rescaling.
                        self.mask_in_place::<D>(m, first, dm, &mut markers, &mut scratch, false);
                        for (s, &e) in s.iter_mut().zip(dm.iter()) {
                            *s = e.abs() as f64;
                        }
                        q.push(lane_sum(s));
                    }
                }
            }
            out.push(q);
            a = b;
        }
        out
    }

    /// model_stock's norms² and product sums of one row of task vectors `d[k][..n]` (with
    /// `filter_wise`), in torch's order: `[Σd_k², …, Σ c(d_a·d_b), …]`, appended to `q`.
    fn stock_row<D: Dt>(&self, d: &[Vec<f32>], n: usize, q: &mut Vec<f64>) {
        let mut row = TorchStock::new(D::D, &self.inputs, n as u64);
        row.fold::<D>(d, n, &mut vec![0f32; n]);
        q.extend(row.sums());
    }

    /// A new combiner for the pending pass.
    pub fn combiner(&self) -> Combiner {
        let pass = self.next_pass().unwrap_or(Pass::Sums);
        let mut c = Combiner {
            tensor: self.tensor.clone(),
            pass,
            next: 0,
            hists: Vec::new(),
            ties: Vec::new(),
            trees: Vec::new(),
            torch: None,
        };
        if pass == Pass::Sums {
            if self.torch_sums() {
                c.torch = Some(TorchStock::new(self.c, &self.inputs, self.n));
            } else {
                c.trees = vec![PairwiseTree::default(); self.quantities];
            }
        }
        if pass == Pass::Select {
            for sel in &self.sels {
                match sel.s.phase {
                    SelectPhase::High | SelectPhase::Low { .. } => {
                        c.hists.push(Some(vec![0u64; BINS]));
                        c.ties.push(None);
                    }
                    SelectPhase::Ties { key, rem } => {
                        c.hists.push(None);
                        c.ties.push(Some(TieFinder::new(sel.s.order, key, rem)));
                    }
                    SelectPhase::Done(_) => {
                        c.hists.push(None);
                        c.ties.push(None);
                    }
                }
            }
        }
        c
    }

    /// Applies a finished pass's statistics.
    pub fn finish_pass(&mut self, comb: Combiner) -> Result<(), MethodError> {
        if comb.next != self.n {
            return Err(MethodError::Incomplete {
                tensor: self.tensor.clone(),
                got: comb.next,
                numel: self.n,
            });
        }
        match comb.pass {
            Pass::Select => {
                let srcs: Vec<usize> = (0..self.sels.len()).map(|si| self.first_high(si)).collect();
                for (si, &src) in srcs.iter().enumerate() {
                    let pos = self.sels[si].pos;
                    match self.sels[si].s.phase.clone() {
                        SelectPhase::High => {
                            if let Some(h) = &comb.hists[src] {
                                self.sels[si].s.advance_hist(h, pos);
                            }
                        }
                        SelectPhase::Low { .. } => {
                            if let Some(h) = &comb.hists[si] {
                                self.sels[si].s.advance_hist(h, pos);
                            }
                        }
                        SelectPhase::Ties { .. } => {
                            if let Some(cut) = comb.ties[si].as_ref().and_then(|t| t.finish()) {
                                self.sels[si].s.phase = SelectPhase::Done(cut);
                            }
                        }
                        SelectPhase::Done(_) => {}
                    }
                }
            }
            Pass::Sums => {
                self.sums = Some(match &comb.torch {
                    Some(t) => t.sums(),
                    None => comb.trees.iter().map(|t| t.finish()).collect(),
                });
                self.derive()?;
            }
        }
        Ok(())
    }

    /// Turns the sums into the output's constants.
    fn derive(&mut self) -> Result<(), MethodError> {
        let sums = self.sums.clone().ok_or_else(|| MethodError::PassPending {
            tensor: self.tensor.clone(),
        })?;
        match self.method {
            Method::Slerp => {
                self.slerp = Some(if sums.is_empty() {
                    Coefs::default()
                } else {
                    slerp_coefs(sums[0], sums[1], sums[2], self.slerp_t)
                })
            }
            Method::ModelStock if !self.filter_wise => {
                self.stock_t = Some(if sums.is_empty() {
                    0.0
                } else {
                    stock_t(self.c, self.models_count(), &sums)
                })
            }
            Method::ModelStock => {}
            _ => {
                if sums.len() == 2 * self.models.len() {
                    let w = self.w;
                    for (k, m) in self.models.iter_mut().enumerate() {
                        let wd = if matches!(m.mode, Mode::Random { .. } | Mode::Della { .. }) {
                            w
                        } else {
                            self.c
                        };
                        let before = rnd(wd, sums[2 * k] as f32);
                        let after = rnd(wd, sums[2 * k + 1] as f32);
                        let eps = rnd(wd, 1e-7f32);
                        m.ratio = if before < eps || after < eps {
                            None
                        } else {
                            Some(rnd(wd, before / after))
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn models_count(&self) -> usize {
        self.inputs.len() - 1
    }

    /// Tie-ordinal state of every selection's cut, for a chunk marked piece by piece (see
    /// [`Cut::mark_from`]).
    fn markers(&self) -> Vec<u64> {
        vec![0; self.sels.len()]
    }

    /// Sparsifies model `m`'s task vector `d` (elements `first..` of the tensor) in place; with
    /// `rescale`, also applies the rescale ratio as the output does. `seen` is the chunk's tie
    /// state ([`Op::markers`]).
    fn mask_in_place<D: Dt>(
        &self,
        m: usize,
        first: u64,
        d: &mut [f32],
        seen: &mut [u64],
        scratch: &mut Scratch,
        rescale: bool,
    ) {
        let model = &self.models[m];
        let n = d.len();
        let Scratch {
            keep,
            below,
            keys,
            u,
            order,
            ..
        } = scratch;
        let keep = &mut keep[..n];
        match model.mode {
            Mode::Keep => return,
            Mode::Zero => {
                d.fill(0.0);
                return;
            }
            Mode::TopK { sel } => {
                let keys = &mut keys[..n];
                for (k, &e) in keys.iter_mut().zip(d.iter()) {
                    *k = magnitude_key(D::D, e);
                }
                match self.sels[sel].s.cut() {
                    Some(cut) => cut.mark_from(keys, first, keep, &mut seen[sel]),
                    None => keep.fill(false),
                }
            }
            Mode::Band { lo, hi } => {
                let keys = &mut keys[..n];
                for (k, &e) in keys.iter_mut().zip(d.iter()) {
                    *k = magnitude_key(D::D, e);
                }
                let below = &mut below[..n];
                match (self.sels[lo].s.cut(), self.sels[hi].s.cut()) {
                    (Some(cl), Some(ch)) => {
                        cl.mark_from(keys, first, below, &mut seen[lo]);
                        ch.mark_from(keys, first, keep, &mut seen[hi]);
                        for (k, &b) in keep.iter_mut().zip(below.iter()) {
                            *k = *k && !b;
                        }
                    }
                    _ => keep.fill(false),
                }
            }
            Mode::Random { p } => {
                let u = &mut u[..n];
                rng::uniforms(self.key, m as u32, rng::PURPOSE_DARE, first, u);
                for (k, &u) in keep.iter_mut().zip(u.iter()) {
                    *k = u < p;
                }
            }
            Mode::Della { lo, eps } => {
                self.della_keep::<D>(m, first, d, lo, eps, keep, &mut u[..n], order)
            }
        }
        let unit = |k: bool| if k { 1.0f32 } else { 0.0 };
        match (rescale, model.ratio) {
            (true, Some(r)) if matches!(model.mode, Mode::Random { .. } | Mode::Della { .. }) => {
                for (e, &k) in d.iter_mut().zip(keep.iter()) {
                    *e = D::r(rw::<D>(*e * unit(k) * r));
                }
            }
            (true, Some(r)) => {
                for (e, &k) in d.iter_mut().zip(keep.iter()) {
                    *e = D::r(*e * unit(k) * r);
                }
            }
            _ => {
                for (e, &k) in d.iter_mut().zip(keep.iter()) {
                    *e *= unit(k);
                }
            }
        }
    }

    /// DELLA's keep decisions for the whole rows `x` starting at element `first`.
    #[allow(clippy::too_many_arguments)]
    fn della_keep<D: Dt>(
        &self,
        m: usize,
        first: u64,
        x: &[f32],
        lo: f32,
        eps: f32,
        keep: &mut [bool],
        u: &mut [f32],
        order: &mut Vec<u64>,
    ) {
        let row = self.row as usize;
        rng::uniforms(self.key, m as u32, rng::PURPOSE_DELLA, first, u);
        for ((xs, ks), us) in x.chunks(row).zip(keep.chunks_mut(row)).zip(u.chunks(row)) {
            let n = xs.len();
            // Ascending magnitude, lower index first among equal magnitudes.
            order.clear();
            order.extend(
                xs.iter()
                    .enumerate()
                    .map(|(i, &e)| ((magnitude_key(D::D, e) as u64) << 32) | i as u64),
            );
            order.sort_unstable();
            for (rank0, &o) in order.iter().enumerate() {
                let i = (o & 0xFFFF_FFFF) as usize;
                let rn = if n > 1 {
                    (rank0 as f64 / (n - 1) as f64) as f32
                } else {
                    0.0
                };
                let p = rw::<D>(lo + (rn * 2.0) * eps);
                ks[i] = us[i] < p;
            }
        }
    }

    /// Writes the merged chunk. Needs every reduction pass done. Pure: call from any thread.
    pub fn output(&self, offset: u64, inputs: &[&[u8]], out: &mut [u8]) -> Result<(), MethodError> {
        let len = self.check_chunk(offset, inputs, Some((out, self.out)))?;
        if self.next_pass().is_some() {
            return Err(MethodError::PassPending {
                tensor: self.tensor.clone(),
            });
        }
        if len == 0 {
            return Ok(());
        }
        match self.c {
            FloatDtype::BF16 => self.output_t::<Bf>(offset, inputs, out, len),
            FloatDtype::F16 => self.output_t::<Hf>(offset, inputs, out, len),
            FloatDtype::F32 => self.output_t::<Ff>(offset, inputs, out, len),
        }
        Ok(())
    }

    fn output_t<D: Dt>(&self, offset: u64, inputs: &[&[u8]], out: &mut [u8], len: usize) {
        let k = self.models_count();
        let piece = self.piece_len(len);
        let mut v: Vec<Vec<f32>> = (0..=k).map(|_| vec![0f32; piece]).collect();
        let mut d: Vec<Vec<f32>> = (0..k).map(|_| vec![0f32; piece]).collect();
        let mut r = vec![0f32; piece];
        let mut scratch = Scratch::new(piece);
        let mut seen = self.markers();
        let size = self.out.size();
        for (a, b) in self.pieces(len) {
            let n = b - a;
            for (i, vi) in v.iter_mut().enumerate() {
                decode::<D>(
                    self.inputs[i],
                    slice_of(inputs[i], self.inputs[i], a, b),
                    &mut vi[..n],
                );
            }
            let r = &mut r[..n];
            match self.method {
                Method::Slerp => {
                    let co = self.slerp.unwrap_or_default();
                    for ((o, &x), &y) in r.iter_mut().zip(&v[0][..n]).zip(&v[1][..n]) {
                        *o = D::r(co.a * x + co.b * y);
                    }
                }
                Method::ModelStock => {
                    let t = match self.stock_t {
                        Some(t) => t,
                        None => {
                            deltas::<D>(&v, &mut d, n);
                            let mut q = Vec::with_capacity(k + k * (k - 1) / 2);
                            self.stock_row::<D>(&d, n, &mut q);
                            stock_t(self.c, k, &q)
                        }
                    };
                    let omt = D::r(1.0 - t);
                    let kf = k as f32;
                    let (acc, _) = scratch.sw.split_at_mut(n);
                    for (acc, &x) in acc.iter_mut().zip(&v[1][..n]) {
                        *acc = D::r(0.0 + x);
                    }
                    for x in &v[2..] {
                        for (acc, &x) in acc.iter_mut().zip(&x[..n]) {
                            *acc = D::r(*acc + x);
                        }
                    }
                    for ((o, &acc), &w0) in r.iter_mut().zip(acc.iter()).zip(&v[0][..n]) {
                        let avg = D::r(acc / kf);
                        *o = D::r(D::r(t * avg) + D::r(omt * w0));
                    }
                }
                _ => {
                    deltas::<D>(&v, &mut d, n);
                    for (m, dm) in d.iter_mut().enumerate() {
                        self.mask_in_place::<D>(
                            m,
                            offset + a as u64,
                            &mut dm[..n],
                            &mut seen,
                            &mut scratch,
                            true,
                        );
                    }
                    self.combine::<D>(&v[0][..n], &mut d, r, &mut scratch);
                }
            }
            encode(self.out, r, &mut out[a * size..b * size]);
        }
    }

    /// The task-arithmetic tail over a piece: weights, sign election, normalisation, lambda,
    /// base. `s[k]` holds model k's sparsified task vector (overwritten); `r` gets the result.
    fn combine<D: Dt>(
        &self,
        base: &[f32],
        s: &mut [Vec<f32>],
        r: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let n = base.len();
        for (x, m) in s.iter_mut().zip(&self.models) {
            for e in &mut x[..n] {
                *e = D::r(*e * m.weight);
            }
        }
        let Scratch { sw, mixed, div, .. } = scratch;
        let (mixed, div) = (&mut mixed[..n], &mut div[..n]);
        mixed.fill(0.0);
        if self.method.sign_election() {
            let sw = &mut sw[..n];
            sw.fill(0.0);
            for x in s.iter() {
                for (acc, &e) in sw.iter_mut().zip(&x[..n]) {
                    *acc += e;
                }
            }
            for e in sw.iter_mut() {
                *e = D::r(*e);
            }
            div.fill(0.0);
            for (x, m) in s.iter().zip(&self.models) {
                let w = m.weight;
                for (((mx, dv), &e), &total) in mixed
                    .iter_mut()
                    .zip(div.iter_mut())
                    .zip(&x[..n])
                    .zip(sw.iter())
                {
                    // The element's sign agrees with the elected one (+1 where the sum is
                    // >= 0, else −1; zeros and NaN never agree).
                    let agree = if total >= 0.0 { e > 0.0 } else { e < 0.0 };
                    let f = if agree { 1.0f32 } else { 0.0 };
                    *mx += e * f;
                    *dv += w * f;
                }
            }
            for (mx, dv) in mixed.iter_mut().zip(div.iter_mut()) {
                *mx = D::r(*mx);
                let d = D::r(*dv);
                *dv = if d == 0.0 { 1.0 } else { d };
            }
        } else {
            for x in s.iter() {
                for (acc, &e) in mixed.iter_mut().zip(&x[..n]) {
                    *acc += e;
                }
            }
            for e in mixed.iter_mut() {
                *e = D::r(*e);
            }
            div.fill(self.div_const);
        }
        if self.normalize {
            for (mx, &dv) in mixed.iter_mut().zip(div.iter()) {
                *mx = D::r(*mx / dv);
            }
        }
        if let Some(l) = self.lambda {
            for mx in mixed.iter_mut() {
                *mx = D::r(*mx * l);
            }
        }
        for ((o, &b), &mx) in r.iter_mut().zip(base).zip(mixed.iter()) {
            *o = D::r(b + mx);
        }
    }
}

/// Elements per piece of the element-wise loops of the block-wise methods: a piece's inputs,
/// task vectors and keys stay in the L1/L2 cache, and a call's scratch is a few pieces
/// whatever the chunk size. A multiple of [`LANES`](super::stats::LANES) that divides
/// [`BLOCK`], so a piece never straddles a block.
const TILE: usize = 1024;

/// Rounding to a compute dtype, chosen once per call so that the element loops are
/// branch-free (`r` is [`rnd`] for `D`).
trait Dt {
    const D: FloatDtype;
    fn r(x: f32) -> f32;
}

struct Bf;
struct Hf;
struct Ff;

impl Dt for Bf {
    const D: FloatDtype = FloatDtype::BF16;
    #[inline(always)]
    fn r(x: f32) -> f32 {
        let b = x.to_bits();
        // Round to nearest even at bit 16 (the NaN case is discarded below).
        let y = f32::from_bits(b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000);
        if x.is_nan() {
            x
        } else {
            y
        }
    }
}

impl Dt for Hf {
    const D: FloatDtype = FloatDtype::F16;
    #[inline(always)]
    fn r(x: f32) -> f32 {
        let y = f16_to_f32(f32_to_f16_rne(x));
        if x.is_nan() {
            x
        } else {
            y
        }
    }
}

impl Dt for Ff {
    const D: FloatDtype = FloatDtype::F32;
    #[inline(always)]
    fn r(x: f32) -> f32 {
        x
    }
}

/// Rounding to the work dtype of DARE and DELLA: bf16 when computing in bf16, else f32.
#[inline(always)]
fn rw<D: Dt>(x: f32) -> f32 {
    if matches!(D::D, FloatDtype::BF16) {
        D::r(x)
    } else {
        x
    }
}

/// Bytes `[a, b)` (in elements) of a chunk's input stored as `d`.
#[inline]
fn slice_of(bytes: &[u8], d: FloatDtype, a: usize, b: usize) -> &[u8] {
    &bytes[a * d.size()..b * d.size()]
}

/// Storage bytes of dtype `src` → values in the compute dtype `D` (as mergekit's loader
/// converts them: exact widening, then one round-to-nearest-even).
fn decode<D: Dt>(src: FloatDtype, bytes: &[u8], out: &mut [f32]) {
    let exact = src == D::D || D::D == FloatDtype::F32;
    match (src, exact) {
        (FloatDtype::BF16, true) => {
            for (o, e) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([e[0], e[1]]));
            }
        }
        (FloatDtype::BF16, false) => {
            for (o, e) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = D::r(bf16_to_f32(u16::from_le_bytes([e[0], e[1]])));
            }
        }
        (FloatDtype::F16, true) => {
            for (o, e) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([e[0], e[1]]));
            }
        }
        (FloatDtype::F16, false) => {
            for (o, e) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = D::r(f16_to_f32(u16::from_le_bytes([e[0], e[1]])));
            }
        }
        (FloatDtype::F32, _) => {
            for (o, e) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = D::r(f32::from_le_bytes([e[0], e[1], e[2], e[3]]));
            }
        }
    }
}

/// Values → storage bytes of dtype `d`, round-to-nearest-even, NaN as the canonical quiet NaN.
fn encode(d: FloatDtype, x: &[f32], out: &mut [u8]) {
    match d {
        FloatDtype::BF16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                let h = if v.is_nan() {
                    BF16_NAN
                } else {
                    f32_to_bf16_rne(v)
                };
                o.copy_from_slice(&h.to_le_bytes());
            }
        }
        FloatDtype::F16 => {
            for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                let h = if v.is_nan() {
                    F16_NAN
                } else {
                    f32_to_f16_rne(v)
                };
                o.copy_from_slice(&h.to_le_bytes());
            }
        }
        FloatDtype::F32 => {
            for (o, &v) in out.chunks_exact_mut(4).zip(x) {
                let b = if v.is_nan() { F32_NAN } else { v.to_bits() };
                o.copy_from_slice(&b.to_le_bytes());
            }
        }
    }
}

/// Task vectors of a piece: `d[k][j] = c(v[k + 1][j] − v[0][j])` for `j < n`.
fn deltas<D: Dt>(v: &[Vec<f32>], d: &mut [Vec<f32>], n: usize) {
    let base = &v[0][..n];
    for (dk, x) in d.iter_mut().zip(&v[1..]) {
        for ((o, &x), &b) in dk[..n].iter_mut().zip(&x[..n]).zip(base) {
            *o = D::r(x - b);
        }
    }
}

/// Per-call scratch of the element-wise loops, one piece long.
struct Scratch {
    keep: Vec<bool>,
    below: Vec<bool>,
    keys: Vec<u32>,
    u: Vec<f32>,
    order: Vec<u64>,
    sw: Vec<f32>,
    mixed: Vec<f32>,
    div: Vec<f32>,
}

impl Scratch {
    fn new(n: usize) -> Scratch {
        Scratch {
            keep: vec![false; n],
            below: vec![false; n],
            keys: vec![0; n],
            u: vec![0.0; n],
            order: Vec::with_capacity(n),
            sw: vec![0.0; n],
            mixed: vec![0.0; n],
            div: vec![0.0; n],
        }
    }
}

/// What one selection counted over a chunk.
#[derive(Clone, Debug)]
enum Counts {
    /// Histogram bins `lo..lo + counts.len()` (the bins outside are empty).
    Hist { lo: u32, counts: Vec<u32> },
    /// Threshold ties per block.
    Ties(Vec<u32>),
}

thread_local! {
    /// All-zero 65 536-bin histograms, reused by the selection passes of this thread.
    static HISTS: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Dense scratch histograms for one call, taken from (and given back to) the thread's pool;
/// every histogram is all zeros when taken and when given back.
struct HistPool {
    hists: Vec<Vec<u32>>,
}

impl HistPool {
    fn take() -> HistPool {
        HistPool {
            hists: HISTS.with(|h| std::mem::take(&mut *h.borrow_mut())),
        }
    }

    /// Histogram `i` (made if the pool has fewer).
    fn get(&mut self, i: usize) -> &mut [u32] {
        while self.hists.len() <= i {
            self.hists.push(vec![0u32; BINS]);
        }
        &mut self.hists[i][..BINS]
    }

    /// The bins `lo..=hi` of histogram `i` as a partial, leaving the histogram all zeros.
    fn emit(&mut self, i: usize, (lo, hi): (u32, u32)) -> Counts {
        if lo > hi {
            return Counts::Hist {
                lo: 0,
                counts: Vec::new(),
            };
        }
        let h = self.get(i);
        let r = lo as usize..hi as usize + 1;
        let counts = h[r.clone()].to_vec();
        h[r].fill(0);
        Counts::Hist { lo, counts }
    }

    fn give_back(self) {
        HISTS.with(|h| *h.borrow_mut() = self.hists);
    }
}

/// SLERP's coefficients from `Σa²`, `Σb²`, `Σab` (see the module documentation).
fn slerp_coefs(saa: f64, sbb: f64, sab: f64, t: f32) -> Coefs {
    let eps = 1e-8f32;
    let norm = |s: f64| -> f32 {
        let n = s.sqrt() as f32;
        if n > eps {
            n
        } else {
            1.0
        }
    };
    let (na, nb) = (norm(saa), norm(sbb));
    let dot = ((sab / (na as f64 * nb as f64)) as f32).clamp(-1.0, 1.0);
    if dot.abs() > 0.9995f32 {
        return Coefs { a: 1.0 - t, b: t };
    }
    let theta = detmath::acos(dot as f64);
    let s = detmath::sin(theta);
    let t64 = t as f64;
    Coefs {
        a: (detmath::sin((1.0 - t64) * theta) / s) as f32,
        b: (detmath::sin(t64 * theta) / s) as f32,
    }
}

/// model_stock's interpolation factor from one set of sums `[Σd_k², …, Σ rnd(d_a·d_b), …]`.
fn stock_t(c: FloatDtype, k: usize, q: &[f64]) -> f32 {
    let norms: Vec<f32> = q[..k].iter().map(|&s| rnd(c, s.sqrt() as f32)).collect();
    let mut cos = Vec::new();
    let mut idx = k;
    for a in 0..k {
        for b in a + 1..k {
            let np = clamp_min(rnd(c, norms[a] * norms[b]), rnd(c, 1e-6f32));
            let dot = rnd(c, q[idx] as f32);
            idx += 1;
            cos.push(rnd(c, dot / np).clamp(-1.0, 1.0));
        }
    }
    let mut acc = 0.0f32;
    for &x in &cos {
        acc += x;
    }
    let cos_theta = rnd(c, acc / cos.len() as f32);
    let den = rnd(c, 1.0 + rnd(c, (k - 1) as f32 * cos_theta));
    if den.abs() < rnd(c, 1e-6f32) {
        return 0.0;
    }
    rnd(c, rnd(c, k as f32 * cos_theta) / den)
}

impl Combiner {
    /// The pass this combiner belongs to.
    pub fn pass(&self) -> Pass {
        self.pass
    }

    /// Adds the next chunk's partial; chunks must come in order, without gaps. `inputs` are the
    /// chunk's inputs, as given to [`Op::partial`] (some statistics fold them in order here).
    pub fn push(&mut self, p: Partial, inputs: &[&[u8]]) -> Result<(), MethodError> {
        if p.pass != self.pass {
            return Err(MethodError::WrongPass {
                tensor: self.tensor.clone(),
            });
        }
        if p.offset != self.next {
            return Err(MethodError::OutOfOrder {
                tensor: self.tensor.clone(),
                expected: self.next,
                got: p.offset,
            });
        }
        self.next += p.len;
        match self.pass {
            Pass::Select => {
                for (si, counts) in p.counts.into_iter().enumerate() {
                    match (counts, self.ties.get_mut(si), self.hists.get_mut(si)) {
                        (Some(Counts::Ties(counts)), Some(Some(t)), _) => {
                            counts.iter().for_each(|&c| t.push(c as u64));
                        }
                        (Some(Counts::Hist { lo, counts }), _, Some(Some(h))) => {
                            h.iter_mut()
                                .skip(lo as usize)
                                .zip(&counts)
                                .for_each(|(a, &c)| *a += c as u64);
                        }
                        _ => {}
                    }
                }
            }
            Pass::Sums if self.torch.is_some() => {
                let t = self.torch.as_mut().expect("checked above");
                let len = p.len as usize;
                if inputs.len() != t.inputs.len()
                    || inputs
                        .iter()
                        .zip(&t.inputs)
                        .any(|(b, d)| b.len() != len * d.size())
                {
                    return Err(MethodError::ChunkLengths {
                        tensor: self.tensor.clone(),
                        lens: inputs.iter().map(|b| b.len()).collect(),
                    });
                }
                t.push(inputs, len);
            }
            Pass::Sums => {
                for blk in p.sums {
                    for (t, &v) in self.trees.iter_mut().zip(&blk) {
                        t.push(v);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(shape: &'a [u64], c: FloatDtype, inputs: &'a [FloatDtype]) -> TensorCtx<'a> {
        TensorCtx {
            name: "t",
            shape,
            compute: c,
            inputs,
            out: c,
        }
    }

    #[test]
    fn names_round_trip() {
        for m in Method::ALL {
            assert_eq!(Method::from_name(m.name()), Some(m));
        }
        assert_eq!(Method::from_name("linear"), None);
    }

    #[test]
    fn config_errors_are_typed() {
        let f = [FloatDtype::F32; 3];
        let mut p = MethodParams::new(Method::Della);
        p.inputs = vec![InputParams::new(1.0), InputParams::new(1.0)];
        p.inputs[0].density = 0.1;
        p.inputs[0].epsilon = 0.2;
        let e = Op::new(&p, &ctx(&[4, 4], FloatDtype::F32, &f)).unwrap_err();
        assert!(
            matches!(e, MethodError::DellaEpsilon { input: 0, .. }),
            "{e}"
        );
        p.inputs[0].epsilon = 0.05;
        let e = Op::new(&p, &ctx(&[2, 2, 2], FloatDtype::F32, &f)).unwrap_err();
        assert!(matches!(e, MethodError::RowShape { dims: 3, .. }), "{e}");
        let e = Op::new(
            &MethodParams::new(Method::Slerp),
            &ctx(&[4], FloatDtype::F32, &f),
        )
        .unwrap_err();
        assert!(matches!(e, MethodError::InputCount { got: 3, .. }), "{e}");
        let mut p = MethodParams::new(Method::Ties);
        p.inputs = vec![InputParams::new(1.0)];
        let e = Op::new(&p, &ctx(&[4], FloatDtype::F32, &f)).unwrap_err();
        assert!(
            matches!(
                e,
                MethodError::ParamCount {
                    got: 1,
                    models: 2,
                    ..
                }
            ),
            "{e}"
        );
        p.inputs = vec![InputParams::new(1.0), InputParams::new(1.0)];
        p.inputs[1].density = -0.5;
        let e = Op::new(&p, &ctx(&[4], FloatDtype::F32, &f)).unwrap_err();
        assert!(
            matches!(
                e,
                MethodError::BadParam {
                    input: Some(1),
                    param: "density",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Every float parameter of every method that reads it is refused when NaN or infinite
    /// (or, for a weight, infinite once rounded to the compute dtype), naming the parameter.
    #[test]
    fn non_finite_parameters_are_refused() {
        let f = [FloatDtype::F32; 3];
        let bf = [FloatDtype::BF16; 3];
        let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        let ok = |method: Method| {
            let mut p = MethodParams::new(method);
            let mut a = InputParams::new(1.0);
            a.density = 0.5;
            a.epsilon = 0.1;
            p.inputs = vec![a.clone(), a];
            p
        };
        let refused = |p: &MethodParams, c: &[FloatDtype], input: Option<usize>, param: &str| {
            let e = Op::new(p, &ctx(&[4, 8], c[0], c)).unwrap_err();
            assert!(
                matches!(&e, MethodError::BadParam { input: i, param: q, .. } if *i == input && *q == param),
                "{:?} {param}: {e}",
                p.method
            );
            assert!(!e.is_protocol());
        };
        for method in Method::ALL {
            if method.sparsify().is_none() {
                continue;
            }
            assert!(Op::new(&ok(method), &ctx(&[4, 8], FloatDtype::F32, &f)).is_ok());
            for v in bad {
                let mut p = ok(method);
                p.lambda = v;
                refused(&p, &f, None, "lambda");
                let mut p = ok(method);
                p.inputs[1].weight = v;
                refused(&p, &f, Some(1), "weight");
                let mut p = ok(method);
                p.inputs[0].density = v;
                refused(&p, &f, Some(0), "density");
                let mut p = ok(method);
                p.inputs[1].gamma = v;
                p.inputs[1].epsilon = v;
                match method.sparsify() {
                    Some(Sparsify::Outliers) => refused(&p, &f, Some(1), "gamma"),
                    Some(Sparsify::Della) => refused(&p, &f, Some(1), "epsilon"),
                    _ => assert!(Op::new(&p, &ctx(&[4, 8], FloatDtype::F32, &f)).is_ok()),
                }
            }
            // Finite as f64, infinite in the compute dtype.
            let mut p = ok(method);
            p.inputs[0].weight = 1e39;
            refused(&p, &bf, Some(0), "weight");
            let mut p = ok(method);
            p.lambda = 1e39;
            refused(&p, &f, None, "lambda");
        }
        let two = [FloatDtype::F32; 2];
        for v in bad {
            let mut p = MethodParams::new(Method::Slerp);
            p.t = v;
            refused(&p, &two, None, "t");
        }
        let mut p = MethodParams::new(Method::ModelStock);
        p.lambda = f64::NAN;
        refused(&p, &f, None, "lambda");
    }

    #[test]
    fn driving_errors_are_typed() {
        let f = [FloatDtype::F32; 3];
        let mut p = MethodParams::new(Method::Ties);
        p.inputs = vec![InputParams::new(1.0), InputParams::new(1.0)];
        p.inputs[0].density = 0.5;
        let mut op = Op::new(&p, &ctx(&[3 * BLOCK], FloatDtype::F32, &f)).unwrap();
        let z = vec![0u8; 4 * BLOCK as usize];
        let e = op.partial(1, &[&z, &z, &z]).unwrap_err();
        assert!(matches!(e, MethodError::Misaligned { .. }), "{e}");
        let e = op.partial(0, &[&z, &z, &z[4..]]).unwrap_err();
        assert!(matches!(e, MethodError::ChunkLengths { .. }), "{e}");
        let mut out = z.clone();
        let e = op.output(0, &[&z, &z, &z], &mut out).unwrap_err();
        assert!(matches!(e, MethodError::PassPending { .. }), "{e}");
        let mut comb = op.combiner();
        let second = op.partial(BLOCK, &[&z, &z, &z]).unwrap();
        let e = comb.push(second, &[&z, &z, &z]).unwrap_err();
        assert!(
            matches!(
                e,
                MethodError::OutOfOrder {
                    expected: 0,
                    got: 4096,
                    ..
                }
            ),
            "{e}"
        );
        comb.push(op.partial(0, &[&z, &z, &z]).unwrap(), &[&z, &z, &z])
            .unwrap();
        let e = op.finish_pass(comb).unwrap_err();
        assert!(matches!(e, MethodError::Incomplete { .. }), "{e}");
    }

    /// Drives `op` over whole inputs in chunks of `chunk` elements, returning the passes run.
    fn drive(op: &mut Op, inputs: &[Vec<u8>], size: usize, chunk: u64) -> Vec<Pass> {
        let mut passes = Vec::new();
        while let Some(pass) = op.next_pass() {
            passes.push(pass);
            let mut comb = op.combiner();
            let mut off = 0u64;
            while off < op.numel() {
                let end = (off + chunk).min(op.numel());
                let ins: Vec<&[u8]> = inputs
                    .iter()
                    .map(|b| &b[off as usize * size..end as usize * size])
                    .collect();
                comb.push(op.partial(off, &ins).unwrap(), &ins).unwrap();
                off = end;
            }
            op.finish_pass(comb).unwrap();
        }
        passes
    }

    #[test]
    fn pass_structure_depends_on_dtype_and_ties() {
        let bf = [FloatDtype::BF16; 2];
        let one = 0x3F80u16.to_le_bytes();
        let two = 0x4000u16.to_le_bytes();
        // Base 1.0 everywhere, model 2.0 everywhere: every |delta| is 1.0, one big tie group.
        let n = 3 * BLOCK as usize + 5;
        let base: Vec<u8> = one.iter().copied().cycle().take(2 * n).collect();
        let model: Vec<u8> = two.iter().copied().cycle().take(2 * n).collect();
        let mut p = MethodParams::new(Method::Ties);
        p.inputs = vec![InputParams::new(1.0)];
        p.inputs[0].density = 0.5;
        let shape = [n as u64];
        let mut op = Op::new(&p, &ctx(&shape, FloatDtype::BF16, &bf)).unwrap();
        let passes = drive(&mut op, &[base.clone(), model.clone()], 2, 2 * BLOCK);
        assert_eq!(
            passes,
            vec![Pass::Select, Pass::Select],
            "histogram, then ties"
        );
        let mut out = vec![0u8; 2 * n];
        op.output(0, &[&base, &model], &mut out).unwrap();
        // The first k = n/2 elements (lowest indices) keep their delta: 2.0; the rest 1.0.
        let k = n / 2;
        for (i, o) in out.chunks(2).enumerate() {
            let want = if i < k { 0x4000 } else { 0x3F80 };
            assert_eq!(u16::from_le_bytes([o[0], o[1]]), want, "element {i}");
        }
        // f32 with distinct magnitudes: two histogram passes and no tie pass; with rescale a
        // sums pass follows.
        let f = [FloatDtype::F32; 2];
        let base: Vec<u8> = (0..n).flat_map(|_| 0f32.to_le_bytes()).collect();
        let model: Vec<u8> = (0..n)
            .flat_map(|i| (i as f32 + 1.0).to_le_bytes())
            .collect();
        p.rescale = Some(true);
        let mut op = Op::new(&p, &ctx(&shape, FloatDtype::F32, &f)).unwrap();
        let passes = drive(&mut op, &[base, model], 4, BLOCK);
        assert_eq!(passes, vec![Pass::Select, Pass::Select, Pass::Sums]);
    }

    #[test]
    fn slerp_coefficients_follow_the_formula() {
        // Orthogonal unit vectors: theta = pi/2, coefficients sin((1-t)pi/2), sin(t pi/2).
        let c = slerp_coefs(1.0, 1.0, 0.0, 0.25);
        assert!((c.a as f64 - (0.75 * std::f64::consts::FRAC_PI_2).sin()).abs() < 1e-7);
        assert!((c.b as f64 - (0.25 * std::f64::consts::FRAC_PI_2).sin()).abs() < 1e-7);
        // Collinear: lerp.
        assert_eq!(slerp_coefs(4.0, 1.0, 2.0, 0.25), Coefs { a: 0.75, b: 0.25 });
    }
}
