//! What the user asked for, normalised: a [`MergeSpec`] of one or more outputs, each a method
//! with parameters over resolved input models.
//!
//! Two front-ends build one: [`parse_config`] reads a mergekit YAML config (single or
//! multi-document, see [`config`]), [`expo_spec`] turns `mergestream expo --sft --aligned
//! --alpha a,b,c` into the same thing. (The `expo` command does not go through [`expo_spec`]
//! yet: [`crate::ExpoJob`] builds its run from the flags directly, taking them as paths.) Every error about the request is raised here, before any
//! weight is read: unknown keys and methods, parameters a method does not take, values of the
//! wrong kind, missing base models, models absent from disk and from the Hugging Face cache
//! ([`SpecError`], each with its key path and line). The spec reads no tensor and does no
//! arithmetic; the plan turns it into per-tensor ops, using [`OutputSpec::resolve`] to get each
//! tensor's parameters exactly as mergekit 0.1.5 resolves them (see [`params`]).
//!
//! # The `expo` document
//!
//! Our own method in mergekit's format; `base_model` is the SFT model, the one model under
//! `models:` the aligned one (the SFT model may also be listed there, as mergekit users list
//! base models), and `alpha` a single number:
//!
//! ```yaml
//! merge_method: expo
//! base_model: openchat/openchat_3.5          # SFT
//! models:
//!   - model: berkeley-nest/Starling-LM-7B-alpha   # aligned
//! parameters:
//!   alpha: 0.3
//! ```
//!
//! `alpha` is rounded once from its decimal text to f32 ([`OutputSpec::expo_alpha`]), exactly
//! as `--alpha 0.3` is, so both spellings give the same bytes. A sweep is a multi-document
//! config with one document per alpha, or `expo --alpha 0.1,0.2`: outputs named
//! [`alpha_name`]`(a)` = `alpha-0.1`, … (the shortest decimal that reads back as the same f32,
//! so `0.1` prints as `0.1`).
//!
//! # Why `saphyr-parser`
//!
//! `serde_yaml` is unmaintained (archived in 2024); its forks `serde_yaml_ng` and
//! `serde_norway` keep its design: a C-to-Rust translation of libyaml (`unsafe-libyaml`) under
//! a serde layer that knows positions only for errors it raises itself, and a `Value` that
//! forgets where each node was and whether a scalar was quoted. The checks here need both for
//! every node (`models[1].parameters.weight (line 7, column 15)`; `"0.5"` is text, `0.5` a
//! number) and must reject duplicate keys in any mapping. `saphyr-parser` (the maintained
//! successor of `yaml-rust`/`yaml-rust2`, pure safe Rust, passes the YAML test suite, two small
//! dependencies) emits events with spans and scalar styles; `spec/yaml.rs` builds a positioned tree
//! from them in ~200 lines. Scalars are then read as mergekit's PyYAML (YAML 1.1) reads them
//! where that matters (`yes`/`on` are booleans, `1e-3` is a number once pydantic is done with
//! it), and forms the two YAML versions read differently are refused.

pub mod config;
mod error;
pub mod hf;
mod methods;
pub mod params;
mod yaml;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub use crate::kernel::FloatDtype;
pub use config::parse_config;
pub use error::{Location, RefProblem, SearchOutcome, Searched, SpecError};
pub use hf::{download_command, is_commit_hash, is_repo_id, HfCache, Snapshot};
pub use methods::{BaseRule, Method, MethodSpec, Param, ParamDefault, ParamKind, ParamSpec, Scope};
pub use params::{
    gradient_t, layer_index, Given, Params, Resolved, Rule, RuleValue, Setting, Value,
};

/// Everything one run is asked to write.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSpec {
    /// In config order (documents of a multi-document config, or one per `--alpha`).
    pub outputs: Vec<OutputSpec>,
}

/// One output model.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    /// The document's `name:` (mergekit-multimerge), or `alpha-…` in an `expo` sweep; `None`
    /// for a single unnamed output. Checked to be usable as a directory name.
    pub name: Option<String>,
    /// `merge_method:` (`expo` for a request built from flags).
    pub method: Method,
    /// The inputs in mergekit's order: `models:` as written, then the base model if it is not
    /// among them (mergekit appends it; for `linear` it is then an ordinary input with a weight).
    pub models: Vec<ModelEntry>,
    /// Index in `models` of the base model, if `base_model:` is given.
    pub base: Option<usize>,
    /// The top-level `parameters:` (method-level parameters, and fallbacks of per-model ones).
    pub params: Params,
    /// For `expo`: alpha rounded once from its decimal text to f32 (what the kernel uses);
    /// `params` holds it too, as an f64, for provenance.
    pub expo_alpha: Option<f32>,
    /// `dtype:`, the compute dtype: mergekit converts every input tensor to it when loading.
    /// `None`: each tensor is computed in the promotion of its inputs' dtypes.
    pub dtype: Option<FloatDtype>,
    /// `out_dtype:`: the merged tensor is converted to it when saved; `None` keeps the compute
    /// result's dtype.
    pub out_dtype: Option<FloatDtype>,
    /// `tokenizer_source:`: whose tokenizer the output gets. [`crate::config_runs`] refuses
    /// anything but [`TokenizerSource::Default`] so far.
    pub tokenizer_source: TokenizerSource,
    /// `chat_template:`, if given ([`crate::config_runs`] refuses it so far).
    pub chat_template: Option<ChatTemplate>,
    /// The document as written (for a config), or an equivalent `expo` document (for flags):
    /// what to store as the output's `mergekit_config.yml`.
    pub source_text: String,
}

/// One input model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model, resolved.
    pub model: ModelRef,
    /// Its `parameters:` (empty for a base model that mergekit adds as an input).
    pub params: Params,
    /// Where it is given: `models[2]`, `base_model`, `--aligned`.
    pub path: String,
}

/// A model reference and where it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRef {
    /// As written in the config (`org/name@rev`, `./m`, `other-doc`).
    pub written: String,
    /// Where it resolved to.
    pub location: ModelLocation,
}

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelLocation {
    /// A local file or directory (relative paths joined to the base directory).
    Local(PathBuf),
    /// A Hugging Face model found in the local cache.
    Hub {
        /// The repository id (`org/name`), without the revision.
        repo: String,
        /// As written after `@` (`None`: `main`).
        revision: Option<String>,
        /// The commit it resolved to.
        commit: String,
        /// `…/models--org--name/snapshots/<commit>`.
        dir: PathBuf,
    },
    /// The output of another document of the same config (its index in
    /// [`MergeSpec::outputs`]); it must be merged first.
    Output {
        /// The document's index in [`MergeSpec::outputs`].
        index: usize,
        /// The document's `name:`.
        name: String,
    },
}

impl ModelRef {
    /// The model's directory (or file), unless it is another output.
    pub fn dir(&self) -> Option<&Path> {
        match &self.location {
            ModelLocation::Local(p) => Some(p),
            ModelLocation::Hub { dir, .. } => Some(dir),
            ModelLocation::Output { .. } => None,
        }
    }

    /// Whether two references name the same model: the same output, or the same directory
    /// after resolving symlinks.
    pub fn same_as(&self, other: &ModelRef) -> bool {
        match (&self.location, &other.location) {
            (ModelLocation::Output { index: a, .. }, ModelLocation::Output { index: b, .. }) => {
                a == b
            }
            _ => match (self.dir(), other.dir()) {
                (Some(a), Some(b)) => canonical(a) == canonical(b),
                _ => false,
            },
        }
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Where the output's tokenizer comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// No `tokenizer_source`: mergekit copies the tokenizer files of the base model, else of
    /// the first model (mergekit's "first" is an unordered set's; ours is `models[0]`), and
    /// leaves the embeddings alone.
    Default,
    /// `tokenizer_source: base`. Note: mergekit then realigns every vocabulary-indexed tensor
    /// (embeddings, `lm_head`) to the base tokenizer's vocabulary, which drops padding rows
    /// beyond the tokenizer's size even when all vocabularies agree.
    Base,
    /// `tokenizer_source: <model>` (same realignment, to that model's vocabulary).
    Model(ModelRef),
}

/// `chat_template:`, as mergekit reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// The most common template among the input models.
    Auto,
    /// One of mergekit's bundled templates ([`config::CHAT_TEMPLATES`]).
    Named(String),
    /// A Jinja template given inline.
    Template(String),
}

impl OutputSpec {
    /// The base model's entry.
    pub fn base_model(&self) -> Option<&ModelEntry> {
        self.base.map(|b| &self.models[b])
    }

    /// A method-level parameter (`normalize`, `lambda`, `t`, …) for `tensor` at gradient
    /// position `t` ([`gradient_t`]): the top-level setting, else the method's default.
    /// [`SpecError::Unresolved`] when neither applies (or the method does not take `param`).
    pub fn global(&self, param: Param, tensor: &str, t: f64) -> Result<Value, SpecError> {
        params::resolve_one(
            self.method,
            param,
            &[self.params.get(param)],
            tensor,
            t,
            None,
        )
    }

    /// A per-model parameter (`weight`, `density`, …) of input `input` for `tensor`: the
    /// model's setting, else the top-level one, else the default; `None` if the parameter does
    /// not apply to that input (the base model's `weight` in TIES) or `input` is out of range.
    /// [`SpecError::Unresolved`] when no setting applies and there is no default.
    pub fn for_model(
        &self,
        input: usize,
        param: Param,
        tensor: &str,
        t: f64,
    ) -> Result<Option<Value>, SpecError> {
        let Some(spec) = self.method.param(param) else {
            return Ok(None);
        };
        let Some(entry) = self.models.get(input) else {
            return Ok(None);
        };
        if !params::applies(spec.scope, self.base == Some(input)) {
            return Ok(None);
        }
        params::resolve_one(
            self.method,
            param,
            &[entry.params.get(param), self.params.get(param)],
            tensor,
            t,
            Some(&entry.model.written),
        )
        .map(Some)
    }

    /// Every parameter of the method for `tensor` at gradient position `t`, as mergekit 0.1.5
    /// resolves them ([`params`]); the first [`SpecError::Unresolved`] if one cannot be.
    pub fn resolve(&self, tensor: &str, t: f64) -> Result<Resolved, SpecError> {
        let mut out = Resolved {
            per_model: vec![Default::default(); self.models.len()],
            ..Default::default()
        };
        for spec in self.method.params() {
            if spec.scope == Scope::Global {
                out.global
                    .insert(spec.param, self.global(spec.param, tensor, t)?);
                continue;
            }
            for i in 0..self.models.len() {
                if let Some(v) = self.for_model(i, spec.param, tensor, t)? {
                    out.per_model[i].insert(spec.param, v);
                }
            }
        }
        Ok(out)
    }

    /// The outputs (indices in [`MergeSpec::outputs`]) this one reads as inputs.
    pub fn dependencies(&self) -> BTreeSet<usize> {
        let tokenizer = match &self.tokenizer_source {
            TokenizerSource::Model(m) => Some(m),
            _ => None,
        };
        self.models
            .iter()
            .map(|m| &m.model)
            .chain(tokenizer)
            .filter_map(|m| match m.location {
                ModelLocation::Output { index, .. } => Some(index),
                _ => None,
            })
            .collect()
    }

    fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| "(unnamed)".into())
    }
}

impl MergeSpec {
    /// An order in which every output comes after the outputs it reads (config order where
    /// there is a choice).
    pub fn run_order(&self) -> Vec<usize> {
        let mut done = vec![false; self.outputs.len()];
        let mut order = Vec::with_capacity(self.outputs.len());
        while order.len() < self.outputs.len() {
            let next = (0..self.outputs.len())
                .find(|&i| !done[i] && self.outputs[i].dependencies().iter().all(|&d| done[d]));
            // check_dependencies refused cycles; stop rather than loop if one slipped through.
            let Some(next) = next else { break };
            done[next] = true;
            order.push(next);
        }
        order
    }

    /// Refuses outputs that depend on each other in a circle.
    pub(crate) fn check_dependencies(&self) -> Result<(), SpecError> {
        // 0 unvisited, 1 on the current path, 2 finished.
        fn visit(
            spec: &MergeSpec,
            i: usize,
            state: &mut [u8],
            path: &mut Vec<usize>,
        ) -> Option<Vec<usize>> {
            state[i] = 1;
            path.push(i);
            for d in spec.outputs[i].dependencies() {
                if state[d] == 1 {
                    let from = path.iter().position(|&p| p == d).unwrap_or(0);
                    let mut cycle = path[from..].to_vec();
                    cycle.push(d);
                    return Some(cycle);
                }
                if state[d] == 0 {
                    if let Some(c) = visit(spec, d, state, path) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            state[i] = 2;
            None
        }
        let mut state = vec![0u8; self.outputs.len()];
        for i in 0..self.outputs.len() {
            if state[i] == 0 {
                if let Some(cycle) = visit(self, i, &mut state, &mut Vec::new()) {
                    return Err(SpecError::DependencyCycle {
                        names: cycle.iter().map(|&c| self.outputs[c].label()).collect(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The output name of alpha `a` in an `expo` sweep: `alpha-0.1` (the shortest decimal that
/// reads back as the same f32, so `0.1` prints as `0.1`, not `0.100000001490116`).
///
/// ```
/// use mergestream::spec::alpha_name;
/// assert_eq!(alpha_name(0.1), "alpha-0.1");
/// assert_eq!(alpha_name(0.25), "alpha-0.25");
/// assert_eq!(alpha_name(1.0), "alpha-1");
/// assert_eq!(alpha_name(-0.5), "alpha--0.5");
/// ```
pub fn alpha_name(alpha: f32) -> String {
    format!("alpha-{alpha}")
}

/// The spec of `mergestream expo --sft SFT --aligned ALIGNED --alpha a[,b,…]`: one output
/// per alpha, unnamed when there is one, named [`alpha_name`] when there are several. Model
/// references resolve as in configs (local paths relative to `base_dir`, else Hugging Face
/// ids from `hf`).
pub fn expo_spec(
    sft: &str,
    aligned: &str,
    alphas: &[f32],
    base_dir: &Path,
    hf: &HfCache,
) -> Result<MergeSpec, SpecError> {
    if alphas.is_empty() {
        return Err(SpecError::EmptyList {
            path: "--alpha".into(),
            at: None,
        });
    }
    let names = std::collections::HashMap::new();
    let ctx = config::Ctx {
        base_dir,
        hf,
        names: &names,
    };
    let sft_ref = config::resolve_ref(sft, "--sft", None, &ctx)?;
    let aligned_ref = config::resolve_ref(aligned, "--aligned", None, &ctx)?;
    if aligned_ref.same_as(&sft_ref) {
        return Err(SpecError::DuplicateModel {
            path: "--aligned".into(),
            at: None,
            model: aligned.to_owned(),
            first: "--sft".into(),
        });
    }
    let mut outputs: Vec<OutputSpec> = Vec::with_capacity(alphas.len());
    for &alpha in alphas {
        if !alpha.is_finite() {
            return Err(SpecError::OutOfRange {
                path: "--alpha".into(),
                at: None,
                name: "alpha",
                value: alpha.to_string(),
                expected: "a finite number",
            });
        }
        let name = (alphas.len() > 1).then(|| alpha_name(alpha));
        if let Some(n) = &name {
            if outputs.iter().any(|o| o.name.as_ref() == Some(n)) {
                return Err(SpecError::DuplicateName {
                    path: "--alpha".into(),
                    at: None,
                    name: n.clone(),
                });
            }
        }
        let mut params = Params::default();
        params.given.insert(
            Param::Alpha,
            Given {
                setting: Setting::Value(Value::Float(f64::from(alpha))),
                path: "--alpha".into(),
            },
        );
        let mut source_text = String::new();
        if let Some(n) = &name {
            source_text.push_str(&format!("name: {}\n", yaml_quote(n)));
        }
        source_text.push_str(&format!(
            "merge_method: expo\nbase_model: {}\nmodels:\n  - model: {}\nparameters:\n  alpha: {alpha}\n",
            yaml_quote(sft),
            yaml_quote(aligned)
        ));
        outputs.push(OutputSpec {
            name,
            method: Method::Expo,
            models: vec![
                ModelEntry {
                    model: aligned_ref.clone(),
                    params: Params::default(),
                    path: "--aligned".into(),
                },
                ModelEntry {
                    model: sft_ref.clone(),
                    params: Params::default(),
                    path: "--sft".into(),
                },
            ],
            base: Some(1),
            params,
            expo_alpha: Some(alpha),
            dtype: None,
            out_dtype: None,
            tokenizer_source: TokenizerSource::Default,
            chat_template: None,
            source_text,
        });
    }
    Ok(MergeSpec { outputs })
}

/// `s` as a YAML double-quoted scalar.
fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
