//! Parameter values as mergekit configs write them, and their resolution for one tensor.
//!
//! A parameter is written as one value (`weight: 0.5`), a list of numbers spread over the
//! layers (`weight: [0, 0.5, 1]`, mergekit's "gradient"), or a list of rules
//! (`- {filter: self_attn, value: 0.3}`, the value itself one value or a gradient). Resolving
//! one for a tensor reproduces mergekit 0.1.5 exactly (`mergekit/config.py:evaluate_setting`,
//! `mergekit/parameter_resolver.py`, `mergekit/plan.py`), checked value for value (bit for bit)
//! against mergekit's own planner by `tests/it/spec.rs`:
//!
//! - **Scopes.** A per-model parameter is looked up in that model's `parameters:`, then in the
//!   top-level `parameters:`, then the method's default; a method-level one in the top-level
//!   `parameters:`, then the default. A place whose setting yields nothing for the tensor (rules
//!   none of which match) passes to the next place. No default → an error naming the tensor.
//! - **Rules** are tried in the order written; the first whose `filter` is a *substring* of the
//!   tensor name applies (no regex, no glob: `mlp.*` only matches names containing `mlp.*`;
//!   a rule without `filter`, or with exactly `filter: "*"`, matches every tensor). Later rules
//!   are not consulted even if the first match's value is itself a list.
//! - **Gradients.** For a tensor with position `t` (see [`gradient_t`]) and a list of n numbers
//!   v, all in f64 (Python floats): `s = t·(n−1)`, `i = ⌊s⌋`, `j = min(n−1, i+1)`, `f = s − i`,
//!   value = `(1 − f)·v[i] + f·v[j]`, evaluated in exactly this order with IEEE f64 rounding
//!   after each operation (no fused multiply-add). A list of booleans is not interpolated: it
//!   picks `v[⌊t·(n−1)⌋]`.
//! - **t.** The layer's index over the number of layers minus one, `i / (L − 1)` in f64, with
//!   `L` the model's layer count (`num_hidden_layers` in `config.json`); `t = 1` when `L = 1`.
//!   Every tensor outside the layers (embeddings, final norm, `lm_head`) gets `t = 0`, before
//!   *and* after the layers.
//!
//! Where the values become f32/bf16 is the kernels' business, documented in the lead's plan;
//! in mergekit every one of them leaves this stage as a Python float (f64).
//!
//! Not here: reading `config.json` for `L`, or mapping tensors to layers for a given
//! architecture (the plan does that; [`layer_index`] covers the `…layers.N.…` naming).

use std::collections::BTreeMap;

use super::error::SpecError;
use super::methods::{Method, Param, ParamDefault, Scope};

/// A parameter value, of the parameter's [`ParamKind`](crate::spec::ParamKind).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A number, as mergekit holds it (a Python float).
    Float(f64),
    /// A flag.
    Bool(bool),
    /// A non-negative integer (`seed`).
    Int(u64),
}

impl Value {
    /// The number, if this is a float.
    pub fn as_f64(self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(v),
            _ => None,
        }
    }

    /// The flag, if this is a boolean.
    pub fn as_bool(self) -> Option<bool> {
        match self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_u64(self) -> Option<u64> {
        match self {
            Value::Int(v) => Some(v),
            _ => None,
        }
    }
}

/// How one parameter is written at one place (a model's `parameters:` or the top level).
/// Every value in it has the parameter's [`ParamKind`](crate::spec::ParamKind) (checked while
/// parsing).
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// The same value for every tensor.
    Value(Value),
    /// Values spread over the layers (non-empty).
    Gradient(Vec<Value>),
    /// Rules tried in order (non-empty).
    Rules(Vec<Rule>),
}

/// One `{filter, value}` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Matches tensors whose name contains it; `None` (no filter, or `"*"`) matches all.
    pub filter: Option<String>,
    /// What the rule gives a matching tensor.
    pub value: RuleValue,
}

/// The value of a rule: one value or a gradient.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleValue {
    /// The same value for every matching tensor.
    Value(Value),
    /// Values spread over the layers, as [`Setting::Gradient`] (non-empty).
    Gradient(Vec<Value>),
}

impl Rule {
    /// mergekit: `filter is None or filter == "*" or (tensor_name and filter in tensor_name)`.
    pub fn matches(&self, tensor: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) => !tensor.is_empty() && tensor.contains(f.as_str()),
        }
    }
}

impl Setting {
    /// The value for `tensor` at gradient position `t`, or `None` when no rule matches.
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<Value> {
        match self {
            Setting::Value(v) => Some(*v),
            Setting::Gradient(values) => interpolate(values, t),
            Setting::Rules(rules) => {
                let rule = rules.iter().find(|r| r.matches(tensor))?;
                match &rule.value {
                    RuleValue::Value(v) => Some(*v),
                    RuleValue::Gradient(values) => interpolate(values, t),
                }
            }
        }
    }

    /// Whether some value applies to every tensor (no rules, or a rule matching all).
    pub fn covers_all(&self) -> bool {
        match self {
            Setting::Value(_) | Setting::Gradient(_) => true,
            Setting::Rules(rules) => rules.iter().any(|r| r.filter.is_none()),
        }
    }
}

/// mergekit's gradient evaluation (see the module header); `values` is of one kind. An empty
/// list yields nothing, as in mergekit (the reader refuses empty lists before this).
fn interpolate(values: &[Value], t: f64) -> Option<Value> {
    let last = values.len().checked_sub(1)?;
    let scaled = t * last as f64;
    // Python's int() of a non-negative float: truncation. `t` is in [0, 1]; min() only guards.
    let i0 = (scaled as usize).min(last);
    Some(match (values[i0], values[(i0 + 1).min(last)]) {
        (Value::Float(a), Value::Float(b)) => {
            let frac = scaled - i0 as f64;
            Value::Float((1.0 - frac) * a + frac * b)
        }
        // Booleans (and integers, which never form gradients) select.
        (v, _) => v,
    })
}

/// The gradient position `t` of a tensor in layer `layer` of a model with `num_layers` layers
/// (`layer` is `None` for tensors outside the layers, which get `t = 0`).
///
/// ```
/// use mergestream::spec::gradient_t;
/// assert_eq!(gradient_t(None, 32), 0.0);      // embeddings, final norm, lm_head
/// assert_eq!(gradient_t(Some(0), 32), 0.0);
/// assert_eq!(gradient_t(Some(31), 32), 1.0);
/// assert_eq!(gradient_t(Some(0), 1), 1.0);    // a one-layer model
/// ```
pub fn gradient_t(layer: Option<usize>, num_layers: usize) -> f64 {
    match layer {
        None => 0.0,
        Some(i) if num_layers > 1 => i as f64 / (num_layers - 1) as f64,
        Some(_) => 1.0,
    }
}

/// The layer index of a tensor named `…layers.N.…` (Llama, Mistral, Mixtral, Qwen2/3, Gemma,
/// Phi-3, GPT-NeoX and most decoders on the Hub): the number after the first `layers.`
/// segment. Architectures that name their blocks otherwise (GPT-2's `h.N.`) need their own
/// rule; mergekit takes it from its architecture definitions.
///
/// ```
/// use mergestream::spec::layer_index;
/// assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
/// assert_eq!(layer_index("model.embed_tokens.weight"), None);
/// assert_eq!(layer_index("model.sublayers.3.x"), None);
/// ```
pub fn layer_index(tensor: &str) -> Option<usize> {
    let mut rest = tensor;
    loop {
        let at = rest.find("layers.")?;
        let preceded = at == 0 || rest.as_bytes()[at - 1] == b'.';
        let after = &rest[at + "layers.".len()..];
        if preceded {
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && after[digits..].starts_with('.') {
                return after[..digits].parse().ok();
            }
        }
        rest = after;
    }
}

/// A setting and where it was written (`models[1].parameters.weight`), for errors.
#[derive(Debug, Clone, PartialEq)]
pub struct Given {
    /// The setting.
    pub setting: Setting,
    /// Its key path (`models[1].parameters.weight`, or a flag such as `--alpha`).
    pub path: String,
}

/// The parameters written at one place.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    /// Each parameter given there (checked to be one the method takes at this place).
    pub given: BTreeMap<Param, Given>,
}

impl Params {
    /// `param`'s setting, if given here.
    pub fn get(&self, param: Param) -> Option<&Given> {
        self.given.get(&param)
    }

    /// Whether no parameter is given here.
    pub fn is_empty(&self) -> bool {
        self.given.is_empty()
    }
}

/// Every parameter of a method resolved for one tensor.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resolved {
    /// Method-level parameters.
    pub global: BTreeMap<Param, Value>,
    /// Per-model parameters, one map per input (in the order of `OutputSpec::models`); the
    /// base model's map lacks the parameters it does not take ([`Scope::PerNonBase`]).
    pub per_model: Vec<BTreeMap<Param, Value>>,
}

impl Resolved {
    /// A method-level number (`lambda`, `t`, …).
    pub fn f64(&self, param: Param) -> Option<f64> {
        self.global.get(&param).and_then(|v| v.as_f64())
    }

    /// A method-level flag (`normalize`, …).
    pub fn bool(&self, param: Param) -> Option<bool> {
        self.global.get(&param).and_then(|v| v.as_bool())
    }

    /// A per-model number (`weight`, `density`, …) of input `input`.
    pub fn model_f64(&self, input: usize, param: Param) -> Option<f64> {
        self.per_model
            .get(input)
            .and_then(|m| m.get(&param))
            .and_then(|v| v.as_f64())
    }
}

/// Resolves one parameter from `places` (most specific first), then the default.
pub(crate) fn resolve_one(
    method: Method,
    param: Param,
    places: &[Option<&Given>],
    tensor: &str,
    t: f64,
    model: Option<&str>,
) -> Result<Value, SpecError> {
    for given in places.iter().flatten() {
        if let Some(v) = given.setting.evaluate(tensor, t) {
            return Ok(v);
        }
    }
    let spec = method.param(param);
    match spec.map(|s| s.default) {
        Some(ParamDefault::Float(v)) => Ok(Value::Float(v)),
        Some(ParamDefault::Bool(v)) => Ok(Value::Bool(v)),
        Some(ParamDefault::Int(v)) => Ok(Value::Int(v)),
        Some(ParamDefault::Required) | None => Err(SpecError::Unresolved {
            method: method.name(),
            name: param.name(),
            model: model.map(str::to_owned),
            tensor: tensor.to_owned(),
            path: places
                .iter()
                .flatten()
                .map(|g| g.path.as_str())
                .collect::<Vec<_>>()
                .join(" and "),
        }),
    }
}

/// Whether `scope` applies to an input that is (or is not) the base model.
pub(crate) fn applies(scope: Scope, is_base: bool) -> bool {
    match scope {
        Scope::Global => false,
        Scope::PerModel => true,
        Scope::PerNonBase => !is_base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(v: &[f64]) -> Vec<Value> {
        v.iter().map(|&x| Value::Float(x)).collect()
    }

    /// Python, by hand: `t=0.25, [0, 0.3, 1.0]` → s=0.5, i=0, j=1, f=0.5 → 0.5*0 + 0.5*0.3.
    #[test]
    fn gradient_by_hand() {
        let g = Setting::Gradient(floats(&[0.0, 0.3, 1.0]));
        assert_eq!(g.evaluate("x", 0.25), Some(Value::Float(0.15)));
        assert_eq!(g.evaluate("x", 0.0), Some(Value::Float(0.0)));
        assert_eq!(g.evaluate("x", 1.0), Some(Value::Float(1.0)));
        // 0.75 → s=1.5 → 0.5*0.3 + 0.5*1.0 = 0.65 (exactly as Python rounds it)
        assert_eq!(
            g.evaluate("x", 0.75),
            Some(Value::Float(0.5 * 0.3 + 0.5 * 1.0))
        );
    }

    /// At a list entry, Python still computes (1-0)*v[i] + 0*v[j]: an infinite neighbour makes
    /// NaN, and -0.0 becomes +0.0. Reproduced, not "fixed".
    #[test]
    fn gradient_keeps_pythons_arithmetic_at_the_points() {
        let g = Setting::Gradient(floats(&[1.0, f64::INFINITY]));
        assert!(g.evaluate("x", 0.0).unwrap().as_f64().unwrap().is_nan());
        let g = Setting::Gradient(floats(&[-0.0, 1.0]));
        let v = g.evaluate("x", 0.0).unwrap().as_f64().unwrap();
        assert_eq!(v.to_bits(), 0.0f64.to_bits());
        let g = Setting::Gradient(floats(&[-0.0]));
        let v = g.evaluate("x", 0.5).unwrap().as_f64().unwrap();
        assert_eq!(v.to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn empty_lists_yield_nothing() {
        assert_eq!(Setting::Gradient(vec![]).evaluate("x", 0.5), None);
        let rules = Setting::Rules(vec![Rule {
            filter: None,
            value: RuleValue::Gradient(vec![]),
        }]);
        assert_eq!(rules.evaluate("x", 0.5), None);
    }

    #[test]
    fn boolean_gradients_select() {
        let g = Setting::Gradient(vec![Value::Bool(true), Value::Bool(false)]);
        assert_eq!(g.evaluate("x", 0.99), Some(Value::Bool(true)));
        assert_eq!(g.evaluate("x", 1.0), Some(Value::Bool(false)));
        let g = Setting::Gradient(vec![
            Value::Bool(true),
            Value::Bool(false),
            Value::Bool(true),
        ]);
        assert_eq!(g.evaluate("x", 0.5), Some(Value::Bool(false)));
        assert_eq!(g.evaluate("x", 0.49), Some(Value::Bool(true)));
    }

    #[test]
    fn rules_are_substrings_first_match_wins() {
        let rules = Setting::Rules(vec![
            Rule {
                filter: Some("self_attn".into()),
                value: RuleValue::Gradient(floats(&[1.0, 0.0])),
            },
            Rule {
                filter: Some("attn".into()),
                value: RuleValue::Value(Value::Float(7.0)),
            },
            Rule {
                filter: Some("mlp.*".into()),
                value: RuleValue::Value(Value::Float(8.0)),
            },
        ]);
        let q = "model.layers.0.self_attn.q_proj.weight";
        assert_eq!(rules.evaluate(q, 0.5), Some(Value::Float(0.5)));
        assert_eq!(
            rules.evaluate("x.cross_attn.y", 0.5),
            Some(Value::Float(7.0))
        );
        assert_eq!(
            rules.evaluate("model.layers.0.mlp.up_proj.weight", 0.5),
            None
        );
        assert_eq!(rules.evaluate("", 0.5), None);
        assert!(!rules.covers_all());
    }

    #[test]
    fn layer_positions() {
        assert_eq!(gradient_t(Some(1), 7), 1.0 / 6.0);
        assert_eq!(gradient_t(Some(5), 7), 5.0 / 6.0);
        assert_eq!(layer_index("layers.3.x"), Some(3));
        assert_eq!(
            layer_index("gpt_neox.layers.10.attention.dense.weight"),
            Some(10)
        );
        assert_eq!(layer_index("model.layers.x.layers.4.y"), Some(4));
        assert_eq!(layer_index("model.layers.4"), None);
        assert_eq!(layer_index("transformer.h.3.attn.weight"), None);
    }
}
