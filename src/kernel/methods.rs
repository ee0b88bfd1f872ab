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
//!     comb.push(p)?  (in chunk order);  op.finish_pass(comb)?;
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
//! association, tie rule: lower index first); randomness from a counter-based generator
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

/// Why an op cannot be built or driven. The first five variants are problems with the
/// parameters or the tensor ([`Op::new`]); the rest are a driver breaking the protocol of the
/// module documentation (a bug in the caller, not in the input).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MethodError {
    /// The method does not take this many inputs.
    #[error("{tensor}: {method} takes {expected} inputs (base included), got {got}")]
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
    #[error("{tensor}: {method}: {got} sets of per-model parameters for {models} non-base models")]
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
    /// A per-model parameter is out of range: `density`, `gamma` or `epsilon` negative or
    /// NaN, or `weight` not finite.
    #[error("{tensor}: {method}: parameter {param} of model {input} is {value}; it must be a number >= 0")]
    BadParam {
        /// The tensor.
        tensor: String,
        /// The method's name.
        method: &'static str,
        /// Index of the model among the non-base models.
        input: usize,
        /// The parameter's name.
        param: &'static str,
        /// Its value.
        value: f64,
    },
    /// DELLA's keep probabilities `density ± epsilon` do not stay inside (0, 1).
    #[error("{tensor}: {method}: density {density} ± epsilon {epsilon} of model {input} must stay inside (0, 1)")]
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
    #[error("{tensor}: {method} ranks within rows of 1-D and 2-D tensors; shape {shape:?} has {dims} axes")]
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
    #[error("{tensor}: chunk at element {offset} of {len} elements is not on a {granule}-element boundary (tensor of {numel})")]
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
    #[error("{tensor}: chunk byte lengths {lens:?} do not hold the same number of elements")]
    ChunkLengths {
        /// The tensor.
        tensor: String,
        /// Byte lengths of the input slices (then of the output slice, for [`Op::output`]).
        lens: Vec<usize>,
    },
    /// A partial was pushed out of chunk order, or after a gap.
    #[error("{tensor}: partial for elements from {got} pushed where {expected} was next")]
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
    #[error("{tensor}: a partial of another pass was pushed")]
    WrongPass {
        /// The tensor.
        tensor: String,
    },
    /// A pass was finished before its partials covered the whole tensor.
    #[error("{tensor}: pass finished after {got} of {numel} elements")]
    Incomplete {
        /// The tensor.
        tensor: String,
        /// Elements covered by the partials pushed.
        got: u64,
        /// The tensor's element count.
        numel: u64,
    },
    /// [`Op::output`] was called while a reduction pass is pending.
    #[error("{tensor}: statistics requested while a reduction pass is pending")]
    PassPending {
        /// The tensor.
        tensor: String,
    },
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
    counts: Vec<Option<Vec<u32>>>,
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

#[inline]
fn load(d: FloatDtype, b: &[u8], i: usize) -> f32 {
    match d {
        FloatDtype::BF16 => bf16_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])),
        FloatDtype::F16 => f16_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])),
        FloatDtype::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
    }
}

#[inline]
fn store(d: FloatDtype, x: f32, out: &mut [u8], i: usize) {
    match d {
        FloatDtype::BF16 => {
            let h = if x.is_nan() {
                BF16_NAN
            } else {
                f32_to_bf16_rne(x)
            };
            out[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
        }
        FloatDtype::F16 => {
            let h = if x.is_nan() {
                F16_NAN
            } else {
                f32_to_f16_rne(x)
            };
            out[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
        }
        FloatDtype::F32 => {
            let v = if x.is_nan() { F32_NAN } else { x.to_bits() };
            out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
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

fn check_param(
    tensor: &str,
    method: Method,
    input: usize,
    param: &'static str,
    value: f64,
) -> Result<(), MethodError> {
    if value.is_nan() || value < 0.0 {
        return Err(MethodError::BadParam {
            tensor: tensor.to_string(),
            method: method.name(),
            input,
            param,
            value,
        });
    }
    Ok(())
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
            check_param(&self.tensor, method, i, "density", ip.density)?;
            if !ip.weight.is_finite() {
                return Err(MethodError::BadParam {
                    tensor: self.tensor.clone(),
                    method: method.name(),
                    input: i,
                    param: "weight",
                    value: ip.weight,
                });
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
                        check_param(&self.tensor, method, i, "gamma", ip.gamma)?;
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
                        check_param(&self.tensor, method, i, "epsilon", ip.epsilon)?;
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

    /// Inputs of a chunk in the compute dtype: `v[input][j]`.
    fn values(&self, inputs: &[&[u8]], len: usize) -> Vec<Vec<f32>> {
        inputs
            .iter()
            .zip(&self.inputs)
            .map(|(b, &d)| (0..len).map(|i| rnd(self.c, load(d, b, i))).collect())
            .collect()
    }

    /// Task vectors of a chunk: `d[model][j] = rnd(x − base)`.
    fn deltas(&self, v: &[Vec<f32>]) -> Vec<Vec<f32>> {
        v[1..]
            .iter()
            .map(|x| {
                x.iter()
                    .zip(&v[0])
                    .map(|(&a, &b)| rnd(self.c, a - b))
                    .collect()
            })
            .collect()
    }

    /// The current pass's contribution of one chunk. Pure: call from any thread.
    pub fn partial(&self, offset: u64, inputs: &[&[u8]]) -> Result<Partial, MethodError> {
        let len = self.check_chunk(offset, inputs, None)?;
        let pass = self.next_pass().ok_or_else(|| MethodError::WrongPass {
            tensor: self.tensor.clone(),
        })?;
        let v = self.values(inputs, len);
        let mut part = Partial {
            offset,
            len: len as u64,
            pass,
            counts: Vec::new(),
            sums: Vec::new(),
        };
        match pass {
            Pass::Select => part.counts = self.select_partial(offset, &v),
            Pass::Sums => part.sums = self.sums_partial(offset, &v),
        }
        Ok(part)
    }

    fn select_partial(&self, offset: u64, v: &[Vec<f32>]) -> Vec<Option<Vec<u32>>> {
        let d = self.deltas(v);
        let keys: Vec<Vec<u32>> = d
            .iter()
            .map(|x| x.iter().map(|&e| magnitude_key(self.c, e)).collect())
            .collect();
        let mut counts = Vec::with_capacity(self.sels.len());
        for (si, sel) in self.sels.iter().enumerate() {
            let keys = &keys[sel.model];
            let out = match sel.s.phase {
                SelectPhase::High if self.first_high(si) != si => None,
                SelectPhase::High | SelectPhase::Low { .. } => {
                    let mut h = vec![0u32; BINS];
                    for &k in keys {
                        if let Some(b) = sel.s.bin(k) {
                            h[b] += 1;
                        }
                    }
                    Some(h)
                }
                SelectPhase::Ties { key, .. } => Some(
                    keys.chunks(BLOCK as usize)
                        .map(|b| b.iter().filter(|&&k| k == key).count() as u32)
                        .collect(),
                ),
                SelectPhase::Done(_) => None,
            };
            debug_assert!(offset.is_multiple_of(BLOCK));
            counts.push(out);
        }
        counts
    }

    /// The first selection of the same model that is in the High phase (histograms shared).
    fn first_high(&self, si: usize) -> usize {
        let m = self.sels[si].model;
        self.sels
            .iter()
            .position(|s| s.model == m && s.s.phase == SelectPhase::High)
            .unwrap_or(si)
    }

    fn sums_partial(&self, offset: u64, v: &[Vec<f32>]) -> Vec<Vec<f64>> {
        let len = v[0].len();
        let mut out = Vec::new();
        let mut start = 0usize;
        while start < len {
            let end = (start + self.row as usize).min(len);
            let blk: Vec<Vec<f32>> = v.iter().map(|x| x[start..end].to_vec()).collect();
            out.push(self.block_sums(offset + start as u64, &blk));
            start = end;
        }
        out
    }

    /// The quantities of one block (a row for row-local methods).
    fn block_sums(&self, first: u64, v: &[Vec<f32>]) -> Vec<f64> {
        let sq = |a: &[f32], b: &[f32]| -> f64 {
            let s: Vec<f64> = a
                .iter()
                .zip(b)
                .map(|(&x, &y)| x as f64 * y as f64)
                .collect();
            lane_sum(&s)
        };
        match self.method {
            Method::Slerp => vec![sq(&v[0], &v[0]), sq(&v[1], &v[1]), sq(&v[0], &v[1])],
            Method::ModelStock => {
                let d = self.deltas(v);
                self.stock_block(&d)
            }
            _ => {
                let d = self.deltas(v);
                let masked = self.masked(first, &d, true);
                let mut q = Vec::with_capacity(2 * d.len());
                for (x, m) in d.iter().zip(&masked) {
                    let a: Vec<f64> = x.iter().map(|&e| rnd(self.w, e).abs() as f64).collect();
                    let b: Vec<f64> = m.iter().map(|&e| e.abs() as f64).collect();
                    q.push(lane_sum(&a));
                    q.push(lane_sum(&b));
                }
                q
            }
        }
    }

    /// model_stock's norms² and product sums of one block: `[Σd_k², …, Σ rnd(d_a·d_b), …]`.
    fn stock_block(&self, d: &[Vec<f32>]) -> Vec<f64> {
        let k = d.len();
        let mut q = Vec::with_capacity(k + k * (k - 1) / 2);
        for x in d {
            let s: Vec<f64> = x.iter().map(|&e| e as f64 * e as f64).collect();
            q.push(lane_sum(&s));
        }
        for a in 0..k {
            for b in a + 1..k {
                let s: Vec<f64> = d[a]
                    .iter()
                    .zip(&d[b])
                    .map(|(&x, &y)| rnd(self.c, x * y) as f64)
                    .collect();
                q.push(lane_sum(&s));
            }
        }
        q
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
            trees: vec![PairwiseTree::default(); self.quantities],
        };
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
                self.sums = Some(comb.trees.iter().map(|t| t.finish()).collect());
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

    /// Sparsified (masked, before rescaling) task vectors of a chunk or block; with
    /// `raw_masked`, the mask applied but no rescale (for the sums pass), in the work dtype.
    fn masked(&self, first: u64, d: &[Vec<f32>], raw_masked: bool) -> Vec<Vec<f32>> {
        let len = d.first().map_or(0, |x| x.len());
        let mut out = Vec::with_capacity(d.len());
        for (k, (m, x)) in self.models.iter().zip(d).enumerate() {
            let keep: Option<Vec<bool>> = match m.mode {
                Mode::Keep | Mode::Zero => None,
                Mode::TopK { sel } => {
                    let keys: Vec<u32> = x.iter().map(|&e| magnitude_key(self.c, e)).collect();
                    let mut b = vec![false; len];
                    if let Some(cut) = self.sels[sel].s.cut() {
                        cut.mark(&keys, first, &mut b);
                    }
                    Some(b)
                }
                Mode::Band { lo, hi } => {
                    let keys: Vec<u32> = x.iter().map(|&e| magnitude_key(self.c, e)).collect();
                    let mut a = vec![false; len];
                    let mut b = vec![false; len];
                    if let (Some(cl), Some(ch)) = (self.sels[lo].s.cut(), self.sels[hi].s.cut()) {
                        cl.mark(&keys, first, &mut a);
                        ch.mark(&keys, first, &mut b);
                    }
                    Some(
                        a.iter()
                            .zip(&b)
                            .map(|(&below, &upto)| upto && !below)
                            .collect(),
                    )
                }
                Mode::Random { p } => {
                    let mut u = vec![0f32; len];
                    rng::uniforms(self.key, k as u32, rng::PURPOSE_DARE, first, &mut u);
                    Some(u.iter().map(|&u| u < p).collect())
                }
                Mode::Della { lo, eps } => Some(self.della_keep(k, first, x, lo, eps)),
            };
            let wd = if matches!(m.mode, Mode::Random { .. } | Mode::Della { .. }) {
                self.w
            } else {
                self.c
            };
            let v: Vec<f32> = match (m.mode, &keep) {
                (Mode::Keep, _) => x.clone(),
                (Mode::Zero, _) => vec![0.0; len],
                (_, Some(keep)) => x
                    .iter()
                    .zip(keep)
                    .map(|(&e, &kp)| {
                        let masked = e * if kp { 1.0 } else { 0.0 };
                        match (raw_masked, m.ratio) {
                            (false, Some(r)) => rnd(self.c, rnd(wd, masked * r)),
                            _ => masked,
                        }
                    })
                    .collect(),
                (_, None) => x.clone(),
            };
            out.push(v);
        }
        out
    }

    /// DELLA's keep decisions for whole rows starting at element `first`.
    fn della_keep(&self, k: usize, first: u64, x: &[f32], lo: f32, eps: f32) -> Vec<bool> {
        let row = self.row as usize;
        let mut keep = vec![false; x.len()];
        let mut u = vec![0f32; x.len()];
        rng::uniforms(self.key, k as u32, rng::PURPOSE_DELLA, first, &mut u);
        for (r, (xs, ks)) in x.chunks(row).zip(keep.chunks_mut(row)).enumerate() {
            let n = xs.len();
            let mut order: Vec<u32> = (0..n as u32).collect();
            let keys: Vec<u32> = xs.iter().map(|&e| magnitude_key(self.c, e)).collect();
            order.sort_unstable_by_key(|&i| (keys[i as usize], i));
            for (rank0, &i) in order.iter().enumerate() {
                let rn = if n > 1 {
                    (rank0 as f64 / (n - 1) as f64) as f32
                } else {
                    0.0
                };
                let p = rnd(self.w, lo + (rn * 2.0) * eps);
                ks[i as usize] = u[r * row + i as usize] < p;
            }
        }
        keep
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
        let v = self.values(inputs, len);
        let c = self.c;
        match self.method {
            Method::Slerp => {
                let co = self.slerp.unwrap_or_default();
                for (j, (&x, &y)) in v[0].iter().zip(&v[1]).enumerate() {
                    store(self.out, rnd(c, co.a * x + co.b * y), out, j);
                }
            }
            Method::ModelStock => {
                let d = self.deltas(&v);
                let row = if self.filter_wise {
                    self.row as usize
                } else {
                    len.max(1)
                };
                let k = self.models_count();
                let mut start = 0;
                while start < len {
                    let end = (start + row).min(len);
                    let t = match self.stock_t {
                        Some(t) => t,
                        None => {
                            let blk: Vec<Vec<f32>> =
                                d.iter().map(|x| x[start..end].to_vec()).collect();
                            stock_t(c, k, &self.stock_block(&blk))
                        }
                    };
                    let omt = rnd(c, 1.0 - t);
                    for j in start..end {
                        let mut acc = rnd(c, 0.0 + v[1][j]);
                        for x in &v[2..] {
                            acc = rnd(c, acc + x[j]);
                        }
                        let avg = rnd(c, acc / k as f32);
                        let r = rnd(c, rnd(c, t * avg) + rnd(c, omt * v[0][j]));
                        store(self.out, r, out, j);
                    }
                    start = end;
                }
            }
            _ => {
                let d = self.deltas(&v);
                let s = self.masked(offset, &d, false);
                for j in 0..len {
                    let r = self.combine(v[0][j], s.iter().map(|x| x[j]));
                    store(self.out, r, out, j);
                }
            }
        }
        Ok(())
    }

    /// The task-arithmetic tail for one element: weights, sign election, normalisation,
    /// lambda, base.
    #[inline]
    fn combine(&self, base: f32, s: impl Iterator<Item = f32>) -> f32 {
        let c = self.c;
        let mut d = [0f32; 64];
        let mut dv: Vec<f32> = Vec::new();
        let dk: &mut [f32] = if self.models.len() <= 64 {
            &mut d[..self.models.len()]
        } else {
            dv.resize(self.models.len(), 0.0);
            &mut dv
        };
        for ((slot, x), m) in dk.iter_mut().zip(s).zip(&self.models) {
            *slot = rnd(c, x * m.weight);
        }
        let (mut mixed, div) = if self.method.sign_election() {
            let sw = seq_sum(c, dk.iter().copied());
            let maj = if sw >= 0.0 { 1i8 } else { -1i8 };
            let sign = |x: f32| -> i8 {
                if x > 0.0 {
                    1
                } else if x < 0.0 {
                    -1
                } else {
                    0
                }
            };
            let mixed = seq_sum(
                c,
                dk.iter()
                    .map(|&x| x * if sign(x) == maj { 1.0 } else { 0.0 }),
            );
            let div = seq_sum(
                c,
                dk.iter()
                    .zip(&self.models)
                    .map(|(&x, m)| m.weight * if sign(x) == maj { 1.0 } else { 0.0 }),
            );
            (mixed, if div == 0.0 { 1.0 } else { div })
        } else {
            (seq_sum(c, dk.iter().copied()), self.div_const)
        };
        if self.normalize {
            mixed = rnd(c, mixed / div);
        }
        if let Some(l) = self.lambda {
            mixed = rnd(c, mixed * l);
        }
        rnd(c, base + mixed)
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

    /// Adds the next chunk's partial; chunks must come in order, without gaps.
    pub fn push(&mut self, p: Partial) -> Result<(), MethodError> {
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
                    let Some(counts) = counts else { continue };
                    if let Some(Some(t)) = self.ties.get_mut(si) {
                        counts.iter().for_each(|&c| t.push(c as u64));
                    } else if let Some(Some(h)) = self.hists.get_mut(si) {
                        h.iter_mut().zip(&counts).for_each(|(a, &c)| *a += c as u64);
                    }
                }
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
                    input: 1,
                    param: "density",
                    ..
                }
            ),
            "{e}"
        );
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
        let e = comb.push(second).unwrap_err();
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
        comb.push(op.partial(0, &[&z, &z, &z]).unwrap()).unwrap();
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
                comb.push(op.partial(off, &ins).unwrap()).unwrap();
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
