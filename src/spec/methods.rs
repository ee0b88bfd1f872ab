//! The merge methods a spec can name, and the parameters each one takes.
//!
//! One table ([`Method::spec`]) feeds parsing, validation and error messages. Every mergekit
//! method's entry reproduces mergekit 0.1.5's own declaration (read from
//! `mergekit/merge_methods/{registry,linear,generalized_task_arithmetic,slerp,model_stock}.py`
//! and checked by listing `mergekit.merge_methods.registered_methods()`): the same parameter
//! names, types, scopes, defaults (including which ones have none), base-model rule and input
//! counts. What mergestream adds is marked `ours`: the `expo` method and the `seed` of the
//! random-drop methods.
//!
//! This module describes methods; it does not implement any (the plan and kernels do), and it
//! does not say which ones the engine can run today (the lead's plan decides that per method).

use std::fmt;

/// A merge method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// mergekit `linear`: Σ wᵢ·xᵢ (divided by Σ wᵢ when `normalize`).
    Linear,
    /// mergekit `task_arithmetic`: base + λ·Σ wᵢ·(xᵢ − base).
    TaskArithmetic,
    /// Ours: aligned + α·(aligned − sft) (ExPO); the base model is the SFT model.
    Expo,
    /// mergekit `ties`: magnitude trimming + sign election.
    Ties,
    /// mergekit `dare_linear`: random drop + rescale, no sign election.
    DareLinear,
    /// mergekit `dare_ties`: random drop + rescale + sign election.
    DareTies,
    /// mergekit `slerp`: spherical interpolation between the base and one other model.
    Slerp,
    /// mergekit `model_stock`: interpolation ratio from the task vectors' cosines.
    ModelStock,
    /// mergekit `breadcrumbs`: drop the largest (outliers) and smallest magnitudes.
    Breadcrumbs,
    /// mergekit `breadcrumbs_ties`: breadcrumbs + sign election.
    BreadcrumbsTies,
    /// mergekit `della`: magnitude-ranked random drop + sign election.
    Della,
    /// mergekit `della_linear`: magnitude-ranked random drop, no sign election.
    DellaLinear,
}

/// mergekit 0.1.5 methods that mergestream does not implement (named in errors so that a user
/// learns the method exists but is not supported here, rather than that it is misspelt).
pub(crate) const MERGEKIT_ONLY_METHODS: &[&str] = &[
    "arcee_fusion",
    "karcher",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
];

/// A parameter name. Which methods take which parameter, and how, is [`Method::params`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Param {
    /// `weight`: a model's weight (linear), or the weight of its task vector.
    Weight,
    /// `density`: the fraction of a task vector's elements kept.
    Density,
    /// `epsilon`: DELLA's spread of keep probabilities around `density`.
    Epsilon,
    /// `gamma`: breadcrumbs' fraction of the largest magnitudes removed.
    Gamma,
    /// `lambda`: scale of the merged task vector.
    Lambda,
    /// `t`: SLERP's interpolation position.
    T,
    /// `normalize`: divide by the sum of the weights.
    Normalize,
    /// `int8_mask`: mergekit's mask storage dtype (no effect on the result).
    Int8Mask,
    /// `rescale`: restore a sparsified task vector's L1 norm.
    Rescale,
    /// `filter_wise`: model_stock's ratio per row instead of per tensor.
    FilterWise,
    /// `seed` (ours): key of the random drop masks.
    Seed,
    /// `alpha` (ours): ExPO's extrapolation strength.
    Alpha,
}

impl Param {
    /// Every parameter, in declaration order.
    pub const ALL: [Param; 12] = [
        Param::Weight,
        Param::Density,
        Param::Epsilon,
        Param::Gamma,
        Param::Lambda,
        Param::T,
        Param::Normalize,
        Param::Int8Mask,
        Param::Rescale,
        Param::FilterWise,
        Param::Seed,
        Param::Alpha,
    ];

    /// The name as written in configs.
    pub const fn name(self) -> &'static str {
        match self {
            Param::Weight => "weight",
            Param::Density => "density",
            Param::Epsilon => "epsilon",
            Param::Gamma => "gamma",
            Param::Lambda => "lambda",
            Param::T => "t",
            Param::Normalize => "normalize",
            Param::Int8Mask => "int8_mask",
            Param::Rescale => "rescale",
            Param::FilterWise => "filter_wise",
            Param::Seed => "seed",
            Param::Alpha => "alpha",
        }
    }

    /// The parameter named `name` (exact, as configs write it).
    pub fn from_name(name: &str) -> Option<Param> {
        Param::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of a parameter's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A number (Python `float` in mergekit: an f64).
    Float,
    /// `true`/`false`.
    Bool,
    /// A non-negative integer (only `seed`).
    Int,
}

/// Where a parameter may be given and whom it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One value for the whole merge (per tensor): only under the top-level `parameters:`.
    /// mergekit's `SHARED`; mergekit ignores such a parameter under `models[].parameters`, we
    /// refuse it there.
    Global,
    /// One value per input model, the base model included: under `models[i].parameters`, with
    /// the top-level `parameters:` as the fallback for every model. mergekit's `INPUT`.
    PerModel,
    /// Like [`Scope::PerModel`], but only for the models other than the base model; the base
    /// model's value is never read (mergekit's `NON_BASE`; we refuse one given to the base).
    PerNonBase,
}

/// A parameter's default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamDefault {
    /// No default: the config must give it (for per-model parameters: for every model it
    /// applies to, directly or through the top-level `parameters:`).
    Required,
    /// A number.
    Float(f64),
    /// A flag.
    Bool(bool),
    /// A non-negative integer.
    Int(u64),
}

/// One parameter of one method.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamSpec {
    /// The parameter.
    pub param: Param,
    /// The type of its values.
    pub kind: ParamKind,
    /// Where it may be given and whom it applies to.
    pub scope: Scope,
    /// Its default, or that it has none.
    pub default: ParamDefault,
    /// Whether filters and per-layer lists are allowed (mergekit allows them for every one of
    /// its parameters; ours are single values).
    pub varies: bool,
    /// Added by mergestream (not a mergekit parameter).
    pub ours: bool,
    /// What it does, for help texts.
    pub doc: &'static str,
}

/// Whether a method uses a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseRule {
    /// The method has no notion of a base model (mergekit's `IGNORED` contract), but, as in
    /// mergekit, a `base_model:` that is not among `models:` is added as one more input at
    /// the end (and needs its parameters, e.g. a `weight` for `linear`).
    Optional,
    /// The method needs `base_model:`. If it is not among `models:` it is added at the end.
    Required,
}

/// Everything about one method that a config can get wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MethodSpec {
    /// The method.
    pub method: Method,
    /// Whether it needs `base_model:`.
    pub base: BaseRule,
    /// Fewest inputs, the base model included.
    pub min_inputs: usize,
    /// Most inputs, the base model included.
    pub max_inputs: Option<usize>,
    /// How the limits read in an error ("the base model and exactly one other model").
    pub inputs_text: &'static str,
    /// The parameters it takes, in mergekit's declaration order.
    pub params: &'static [ParamSpec],
    /// Added by mergestream (not a mergekit method).
    pub ours: bool,
}

const fn p(
    param: Param,
    kind: ParamKind,
    scope: Scope,
    default: ParamDefault,
    doc: &'static str,
) -> ParamSpec {
    ParamSpec {
        param,
        kind,
        scope,
        default,
        varies: true,
        ours: false,
        doc,
    }
}

const INT8_MASK: ParamSpec = p(
    Param::Int8Mask,
    ParamKind::Bool,
    Scope::Global,
    ParamDefault::Bool(false),
    "store the sign-election mask as int8 instead of the compute dtype",
);
const LAMBDA: ParamSpec = p(
    Param::Lambda,
    ParamKind::Float,
    Scope::Global,
    ParamDefault::Float(1.0),
    "scale of the merged task vector",
);
const WEIGHT_NON_BASE: ParamSpec = p(
    Param::Weight,
    ParamKind::Float,
    Scope::PerNonBase,
    ParamDefault::Required,
    "weight of the model's task vector",
);
const DENSITY: ParamSpec = p(
    Param::Density,
    ParamKind::Float,
    Scope::PerNonBase,
    ParamDefault::Float(1.0),
    "fraction of the task vector's elements kept (no effect without sparsification)",
);
const GAMMA: ParamSpec = p(
    Param::Gamma,
    ParamKind::Float,
    Scope::PerNonBase,
    ParamDefault::Float(0.01),
    "fraction of the largest magnitudes removed as outliers",
);
const EPSILON: ParamSpec = p(
    Param::Epsilon,
    ParamKind::Float,
    Scope::PerNonBase,
    ParamDefault::Float(0.15),
    "spread of keep probabilities around density, by magnitude rank",
);
const SEED: ParamSpec = ParamSpec {
    param: Param::Seed,
    kind: ParamKind::Int,
    scope: Scope::Global,
    default: ParamDefault::Int(0),
    varies: false,
    ours: true,
    doc: "key of the counter-based generator that draws the drop masks (ours; mergekit uses torch's global generator)",
};

const fn normalize(default: bool) -> ParamSpec {
    p(
        Param::Normalize,
        ParamKind::Bool,
        Scope::Global,
        ParamDefault::Bool(default),
        "divide by the sum of the weights",
    )
}

const fn rescale(default: bool) -> ParamSpec {
    p(
        Param::Rescale,
        ParamKind::Bool,
        Scope::Global,
        ParamDefault::Bool(default),
        "rescale a sparsified task vector to its original L1 norm (no effect without sparsification)",
    )
}

const LINEAR_PARAMS: [ParamSpec; 2] = [
    p(
        Param::Weight,
        ParamKind::Float,
        Scope::PerModel,
        ParamDefault::Required,
        "weight of the model",
    ),
    normalize(true),
];
const TASK_ARITHMETIC_PARAMS: [ParamSpec; 6] = [
    INT8_MASK,
    normalize(false),
    rescale(false),
    LAMBDA,
    WEIGHT_NON_BASE,
    DENSITY,
];
const TIES_PARAMS: [ParamSpec; 6] = [
    INT8_MASK,
    normalize(true),
    rescale(false),
    LAMBDA,
    WEIGHT_NON_BASE,
    DENSITY,
];
const DARE_TIES_PARAMS: [ParamSpec; 7] = [
    INT8_MASK,
    normalize(false),
    rescale(true),
    LAMBDA,
    WEIGHT_NON_BASE,
    DENSITY,
    SEED,
];
const DARE_LINEAR_PARAMS: [ParamSpec; 7] = DARE_TIES_PARAMS;
const BREADCRUMBS_PARAMS: [ParamSpec; 7] = [
    INT8_MASK,
    normalize(false),
    rescale(false),
    LAMBDA,
    WEIGHT_NON_BASE,
    DENSITY,
    GAMMA,
];
const BREADCRUMBS_TIES_PARAMS: [ParamSpec; 7] = BREADCRUMBS_PARAMS;
const DELLA_PARAMS: [ParamSpec; 8] = [
    INT8_MASK,
    normalize(true),
    rescale(true),
    LAMBDA,
    WEIGHT_NON_BASE,
    DENSITY,
    EPSILON,
    SEED,
];
const DELLA_LINEAR_PARAMS: [ParamSpec; 8] = [
    INT8_MASK,
    normalize(false),
    rescale(true),
    LAMBDA,
    WEIGHT_NON_BASE,
    DENSITY,
    EPSILON,
    SEED,
];
const SLERP_PARAMS: [ParamSpec; 1] = [p(
    Param::T,
    ParamKind::Float,
    Scope::Global,
    ParamDefault::Required,
    "interpolation position: 0 is the base model, 1 the other model",
)];
const MODEL_STOCK_PARAMS: [ParamSpec; 1] = [p(
    Param::FilterWise,
    ParamKind::Bool,
    Scope::Global,
    ParamDefault::Bool(false),
    "one ratio per row instead of one per tensor",
)];
const EXPO_PARAMS: [ParamSpec; 1] = [ParamSpec {
    param: Param::Alpha,
    kind: ParamKind::Float,
    scope: Scope::Global,
    default: ParamDefault::Required,
    varies: false,
    ours: true,
    doc: "extrapolation strength: aligned + alpha * (aligned - sft)",
}];

const fn gta(method: Method, params: &'static [ParamSpec]) -> MethodSpec {
    MethodSpec {
        method,
        base: BaseRule::Required,
        min_inputs: 1,
        max_inputs: None,
        inputs_text: "a base model and any number of other models",
        params,
        ours: false,
    }
}

const SPECS: [MethodSpec; 12] = [
    MethodSpec {
        method: Method::Linear,
        base: BaseRule::Optional,
        min_inputs: 1,
        max_inputs: None,
        inputs_text: "at least one model",
        params: &LINEAR_PARAMS,
        ours: false,
    },
    gta(Method::TaskArithmetic, &TASK_ARITHMETIC_PARAMS),
    MethodSpec {
        method: Method::Expo,
        base: BaseRule::Required,
        min_inputs: 2,
        max_inputs: Some(2),
        inputs_text: "the SFT model as base_model and exactly one aligned model",
        params: &EXPO_PARAMS,
        ours: true,
    },
    gta(Method::Ties, &TIES_PARAMS),
    gta(Method::DareLinear, &DARE_LINEAR_PARAMS),
    gta(Method::DareTies, &DARE_TIES_PARAMS),
    MethodSpec {
        method: Method::Slerp,
        base: BaseRule::Required,
        min_inputs: 2,
        max_inputs: Some(2),
        inputs_text: "the base model and exactly one other model",
        params: &SLERP_PARAMS,
        ours: false,
    },
    MethodSpec {
        method: Method::ModelStock,
        base: BaseRule::Required,
        min_inputs: 3,
        max_inputs: None,
        inputs_text: "the base model and at least two other models",
        params: &MODEL_STOCK_PARAMS,
        ours: false,
    },
    gta(Method::Breadcrumbs, &BREADCRUMBS_PARAMS),
    gta(Method::BreadcrumbsTies, &BREADCRUMBS_TIES_PARAMS),
    gta(Method::Della, &DELLA_PARAMS),
    gta(Method::DellaLinear, &DELLA_LINEAR_PARAMS),
];

impl Method {
    /// Every method, in the order of [`Method::name`]s listed in errors.
    pub const ALL: [Method; 12] = [
        Method::Linear,
        Method::TaskArithmetic,
        Method::Expo,
        Method::Ties,
        Method::DareLinear,
        Method::DareTies,
        Method::Slerp,
        Method::ModelStock,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::Della,
        Method::DellaLinear,
    ];

    /// The name as written after `merge_method:`.
    pub const fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Expo => "expo",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Slerp => "slerp",
            Method::ModelStock => "model_stock",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::Della => "della",
            Method::DellaLinear => "della_linear",
        }
    }

    /// The method named `name` (exact, as mergekit matches it).
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Every method's name, for error messages.
    pub fn names() -> Vec<&'static str> {
        Method::ALL.iter().map(|m| m.name()).collect()
    }

    /// The method's table entry.
    pub fn spec(self) -> &'static MethodSpec {
        // SPECS is in the order of ALL (checked by a test).
        &SPECS[self as usize]
    }

    /// The parameters the method takes.
    pub fn params(self) -> &'static [ParamSpec] {
        self.spec().params
    }

    /// The method's entry for `param`, if it takes it.
    pub fn param(self, param: Param) -> Option<&'static ParamSpec> {
        self.params().iter().find(|s| s.param == param)
    }

    /// Whether the method draws random numbers (and so takes `seed`).
    pub fn is_random(self) -> bool {
        self.param(Param::Seed).is_some()
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_enum_order() {
        for (i, m) in Method::ALL.into_iter().enumerate() {
            assert_eq!(m as usize, i);
            assert_eq!(SPECS[i].method, m);
            assert_eq!(Method::from_name(m.name()), Some(m));
        }
        for p in Param::ALL {
            assert_eq!(Param::from_name(p.name()), Some(p));
        }
    }

    /// mergekit 0.1.5's declarations, as printed by
    /// `[(m.spec.name, [(p.name, p.scope, p.default) for p in m.spec.parameters]) for m in
    /// mergekit.merge_methods.registered_methods()]` (our `seed` left out).
    /// (name, scope, default) of one parameter.
    type Declared = (&'static str, Scope, ParamDefault);
    /// (method, normalize default, rescale default, extra (name, default)s).
    type Gta = (Method, bool, bool, &'static [(&'static str, f64)]);

    #[test]
    fn defaults_are_mergekit_0_1_5s() {
        use ParamDefault::*;
        let expect: &[(Method, &[Declared])] = &[
            (
                Method::Linear,
                &[
                    ("weight", Scope::PerModel, Required),
                    ("normalize", Scope::Global, Bool(true)),
                ],
            ),
            (Method::Slerp, &[("t", Scope::Global, Required)]),
            (
                Method::ModelStock,
                &[("filter_wise", Scope::Global, Bool(false))],
            ),
        ];
        for (m, params) in expect {
            let got: Vec<_> = m
                .params()
                .iter()
                .map(|s| (s.param.name(), s.scope, s.default))
                .collect();
            assert_eq!(&got, params, "{m}");
        }
        // The generalized task arithmetic family: (normalize, rescale) defaults and extras.
        let gta: &[Gta] = &[
            (Method::TaskArithmetic, false, false, &[]),
            (Method::Ties, true, false, &[]),
            (Method::DareTies, false, true, &[]),
            (Method::DareLinear, false, true, &[]),
            (Method::Breadcrumbs, false, false, &[("gamma", 0.01)]),
            (Method::BreadcrumbsTies, false, false, &[("gamma", 0.01)]),
            (Method::Della, true, true, &[("epsilon", 0.15)]),
            (Method::DellaLinear, false, true, &[("epsilon", 0.15)]),
        ];
        for &(m, normalize, rescale, extra) in gta {
            let mut want = vec![
                ("int8_mask", Scope::Global, Bool(false)),
                ("normalize", Scope::Global, Bool(normalize)),
                ("rescale", Scope::Global, Bool(rescale)),
                ("lambda", Scope::Global, Float(1.0)),
                ("weight", Scope::PerNonBase, Required),
                ("density", Scope::PerNonBase, Float(1.0)),
            ];
            want.extend(extra.iter().map(|&(n, d)| (n, Scope::PerNonBase, Float(d))));
            let got: Vec<_> = m
                .params()
                .iter()
                .filter(|s| !s.ours)
                .map(|s| (s.param.name(), s.scope, s.default))
                .collect();
            assert_eq!(got, want, "{m}");
            assert_eq!(m.spec().base, BaseRule::Required);
            assert_eq!(
                m.is_random(),
                matches!(
                    m,
                    Method::DareTies | Method::DareLinear | Method::Della | Method::DellaLinear
                ),
                "{m}"
            );
        }
    }
}
