//! mergekit YAML configs (single- or multi-document) → [`MergeSpec`].
//!
//! Reads the keys mergekit 0.1.5's `MergeConfiguration` reads for a `models:` merge
//! (`mergekit/config.py`), plus mergekit-multimerge's `name:` (`mergekit/scripts/multimerge.py`).
//! Where mergekit is lenient in ways that hide mistakes, this reader refuses, always before any
//! weight is read, with the key path and line of the problem:
//!
//! - unknown keys anywhere (pydantic ignores them), repeated keys (PyYAML keeps the last);
//! - parameters a method does not take, method-level parameters under one model, and per-model
//!   parameters given to a base model that never reads them (mergekit ignores all three);
//! - values of the wrong kind: quoted numbers (`weight: "0.5"`, which pydantic would convert)
//!   and numbers where YAML 1.1 and 1.2 disagree (`010`); booleans are `true`/`false` or
//!   PyYAML's `yes/no/on/off` spellings, not `1`/`0`;
//! - filters containing `*` other than exactly `*` (mergekit matches them literally, so they
//!   never apply), empty lists (mergekit reads them as "not set");
//! - `tokenizer_source: base` without a `base_model` (mergekit picks an arbitrary model);
//! - two references to the same model directory (mergekit would treat `./m` and `m` as two
//!   models; we compare resolved directories, which is also how the base model is found among
//!   `models:`).
//!
//! Refused because mergestream does not do them (yet): `slices:`, `modules:`, the `tokenizer:`
//! block, `tokenizer_source: union`, LoRA references (`model+adapter`), `float64`/`int64`
//! dtypes, mergekit methods outside [`Method`].
//!
//! Multi-document configs follow mergekit-multimerge: every document may have a `name:`, at
//! most one may lack it, names are unique, and a model reference equal to another document's
//! name means that document's output (a dependency, cycles refused). Model references are
//! resolved by [`super::hf`].

use std::collections::HashMap;
use std::path::Path;

use super::error::{Location, RefProblem, SearchOutcome, Searched, SpecError};
use super::hf::{self, HfCache};
use super::methods::{
    BaseRule, Method, Param, ParamDefault, ParamKind, ParamSpec, Scope, MERGEKIT_ONLY_METHODS,
};
use super::params::{applies, Given, Params, Rule, RuleValue, Setting, Value};
use super::yaml::{self, Document, Kind, MapKey, NodeId, NumberText};
use super::{
    ChatTemplate, MergeSpec, ModelEntry, ModelLocation, ModelRef, OutputSpec, TokenizerSource,
};
use crate::kernel::FloatDtype;

/// The keys of a config document.
pub(crate) const TOP_KEYS: &[&str] = &[
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "chat_template",
    "name",
];

/// The chat templates mergekit 0.1.5 ships (`mergekit/_data/chat_templates/*.jinja`).
pub const CHAT_TEMPLATES: &[&str] = &["alpaca", "chatml", "exaone", "llama3", "mistral"];

const MODEL_KEYS: &[&str] = &["model", "parameters"];
const RULE_KEYS: &[&str] = &["filter", "value"];
const REF_KEYS: &[&str] = &["model", "lora", "override_architecture"];
const PATH_KEYS: &[&str] = &["path", "revision"];

/// Reads a mergekit config. Relative model paths are taken relative to `base_dir`; pass the
/// working directory to resolve them as mergekit does.
pub fn parse_config(text: &str, base_dir: &Path, hf: &HfCache) -> Result<MergeSpec, SpecError> {
    let docs: Vec<Document> = yaml::parse(text)?
        .into_iter()
        .filter(|d| !d.is_empty())
        .collect();
    if docs.is_empty() {
        return Err(SpecError::Empty);
    }
    // Names first: any document may use any other's output.
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut doc_names = Vec::with_capacity(docs.len());
    let mut unnamed: Option<Location> = None;
    for (index, doc) in docs.iter().enumerate() {
        let d = Doc(doc);
        let entries = d.map(doc.root, "", "a mapping of config keys")?;
        let name = match lookup(entries, "name") {
            None => None,
            Some((key, id)) => {
                let name = d.string(id, "name")?;
                check_name(&name, "name", Some(d.at(id)))?;
                if names.contains_key(&name) {
                    return Err(SpecError::DuplicateName {
                        path: "name".into(),
                        at: Some(key.at),
                        name,
                    });
                }
                names.insert(name.clone(), index);
                Some(name)
            }
        };
        if name.is_none() && docs.len() > 1 {
            let at = d.at(doc.root);
            if let Some(first) = unnamed {
                return Err(SpecError::MultipleUnnamed { at, first });
            }
            unnamed = Some(at);
        }
        doc_names.push(name);
    }
    let ctx = Ctx {
        base_dir,
        hf,
        names: &names,
    };
    let outputs = docs
        .iter()
        .zip(doc_names)
        .map(|(doc, name)| {
            let source = without_start_marker(text.get(doc.text.clone()).unwrap_or_default());
            read_document(doc, source, name, &ctx)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let spec = MergeSpec { outputs };
    spec.check_dependencies()?;
    Ok(spec)
}

/// A document's text without the `---` line that starts it (the separator before every
/// document but the first): the text a config holding that document alone would have, so
/// that a document of a multi-document config and the same document run alone record the
/// same source (and write the same bytes).
fn without_start_marker(doc: &str) -> &str {
    match doc.split_once('\n') {
        Some((first, rest)) if first.trim_end() == "---" => rest,
        _ => doc,
    }
}

/// Where model references are looked up.
pub(crate) struct Ctx<'a> {
    pub base_dir: &'a Path,
    pub hf: &'a HfCache,
    /// Document names → their index.
    pub names: &'a HashMap<String, usize>,
}

/// A document with typed accessors that produce this module's errors.
struct Doc<'d>(&'d Document);

impl<'d> Doc<'d> {
    fn at(&self, id: NodeId) -> Location {
        self.0.node(id).at
    }

    fn kind(&self, id: NodeId) -> &'d Kind {
        &self.0.node(id).kind
    }

    /// A short description of a node for "found …".
    fn describe(&self, id: NodeId) -> String {
        match self.kind(id) {
            Kind::Scalar { text, plain: true } if yaml::is_null_text(text) => {
                "nothing (null)".into()
            }
            Kind::Scalar { text, plain: true } => {
                match (yaml::bool_of(text), yaml::number_of(text)) {
                    (Some(_), _) => format!("the boolean {text}"),
                    (_, NumberText::Number { .. }) => format!("the number {text}"),
                    _ => format!("the text '{text}'"),
                }
            }
            Kind::Scalar { text, plain: false } => format!("the quoted text \"{text}\""),
            Kind::Seq(items) => format!("a list of {}", items.len()),
            Kind::Map(_) => "a mapping".into(),
        }
    }

    fn wrong(&self, id: NodeId, path: &str, expected: &'static str) -> SpecError {
        SpecError::WrongType {
            path: path.to_owned(),
            at: self.at(id),
            expected,
            found: self.describe(id),
        }
    }

    fn is_null(&self, id: NodeId) -> bool {
        matches!(self.kind(id), Kind::Scalar { text, plain: true } if yaml::is_null_text(text))
    }

    fn map(
        &self,
        id: NodeId,
        path: &str,
        expected: &'static str,
    ) -> Result<&'d [(MapKey, NodeId)], SpecError> {
        match self.kind(id) {
            Kind::Map(entries) => Ok(entries),
            _ => Err(self.wrong(id, path, expected)),
        }
    }

    /// A mapping whose keys must all be in `allowed`.
    fn closed_map(
        &self,
        id: NodeId,
        path: &str,
        expected: &'static str,
        allowed: &'static [&'static str],
    ) -> Result<&'d [(MapKey, NodeId)], SpecError> {
        let entries = self.map(id, path, expected)?;
        if let Some((key, _)) = entries
            .iter()
            .find(|(k, _)| !allowed.contains(&k.text.as_str()))
        {
            return Err(SpecError::UnknownKey {
                path: path.to_owned(),
                key: key.text.clone(),
                at: key.at,
                allowed: allowed.to_vec(),
            });
        }
        Ok(entries)
    }

    /// A string (any scalar's text; null is not one).
    fn string(&self, id: NodeId, path: &str) -> Result<String, SpecError> {
        match self.kind(id) {
            Kind::Scalar { text, .. } if !self.is_null(id) => Ok(text.clone()),
            _ => Err(self.wrong(id, path, "a text")),
        }
    }

    /// A string, or `None` for null or an absent key.
    fn opt_string(&self, id: Option<NodeId>, path: &str) -> Result<Option<String>, SpecError> {
        match id {
            None => Ok(None),
            Some(id) if self.is_null(id) => Ok(None),
            Some(id) => self.string(id, path).map(Some),
        }
    }

    /// One parameter value of `kind`.
    fn value(&self, id: NodeId, path: &str, kind: ParamKind) -> Result<Value, SpecError> {
        let (text, plain) = match self.kind(id) {
            Kind::Scalar { text, plain } => (text.as_str(), *plain),
            _ => {
                return Err(self.wrong(id, path, expected_of(kind)));
            }
        };
        let wrong = || self.wrong(id, path, expected_of(kind));
        if !plain {
            return Err(wrong());
        }
        match kind {
            ParamKind::Bool => yaml::bool_of(text).map(Value::Bool).ok_or_else(wrong),
            ParamKind::Float => match yaml::number_of(text) {
                NumberText::Number { f64, .. } => Ok(Value::Float(f64)),
                NumberText::Ambiguous => Err(SpecError::AmbiguousNumber {
                    path: path.to_owned(),
                    at: self.at(id),
                    text: text.to_owned(),
                }),
                NumberText::NotNumber => Err(wrong()),
            },
            ParamKind::Int => match yaml::number_of(text) {
                NumberText::Number { integer: true, .. } => text
                    .strip_prefix('+')
                    .unwrap_or(text)
                    .parse::<u64>()
                    .map(Value::Int)
                    .map_err(|_| SpecError::OutOfRange {
                        path: path.to_owned(),
                        at: Some(self.at(id)),
                        name: "seed",
                        value: text.to_owned(),
                        expected: "an integer from 0 to 18446744073709551615",
                    }),
                NumberText::Ambiguous => Err(SpecError::AmbiguousNumber {
                    path: path.to_owned(),
                    at: self.at(id),
                    text: text.to_owned(),
                }),
                _ => Err(wrong()),
            },
        }
    }

    /// A non-empty list of values of `kind`.
    fn values(
        &self,
        items: &[NodeId],
        id: NodeId,
        path: &str,
        kind: ParamKind,
    ) -> Result<Vec<Value>, SpecError> {
        if items.is_empty() {
            return Err(SpecError::EmptyList {
                path: path.to_owned(),
                at: Some(self.at(id)),
            });
        }
        items
            .iter()
            .enumerate()
            .map(|(i, &item)| self.value(item, &format!("{path}[{i}]"), kind))
            .collect()
    }

    /// A parameter setting: a value, a gradient, or rules.
    fn setting(
        &self,
        id: NodeId,
        path: &str,
        spec: &ParamSpec,
        method: Method,
    ) -> Result<Setting, SpecError> {
        let not_varying = || SpecError::NotVarying {
            path: path.to_owned(),
            at: self.at(id),
            name: spec.param.name(),
            method: method.name(),
        };
        match self.kind(id) {
            Kind::Scalar { .. } => self.value(id, path, spec.kind).map(Setting::Value),
            Kind::Seq(items) => {
                if items.is_empty() {
                    return Err(SpecError::EmptyList {
                        path: path.to_owned(),
                        at: Some(self.at(id)),
                    });
                }
                if !spec.varies {
                    return Err(not_varying());
                }
                let rules = items
                    .iter()
                    .filter(|&&i| matches!(self.kind(i), Kind::Map(_)))
                    .count();
                if rules == 0 {
                    self.values(items, id, path, spec.kind)
                        .map(Setting::Gradient)
                } else if rules == items.len() {
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, &item)| self.rule(item, &format!("{path}[{i}]"), spec.kind))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Setting::Rules)
                } else {
                    Err(self.wrong(
                        id,
                        path,
                        "a list of values, or a list of {filter, value} rules (not both)",
                    ))
                }
            }
            Kind::Map(_) => {
                if !spec.varies {
                    return Err(not_varying());
                }
                Ok(Setting::Rules(vec![self.rule(id, path, spec.kind)?]))
            }
        }
    }

    /// One `{filter, value}` rule.
    fn rule(&self, id: NodeId, path: &str, kind: ParamKind) -> Result<Rule, SpecError> {
        let entries = self.closed_map(id, path, "a {filter, value} rule", RULE_KEYS)?;
        let filter = match lookup(entries, "filter") {
            None => None,
            Some((_, f)) => {
                let fpath = format!("{path}.filter");
                match self.opt_string(Some(f), &fpath)? {
                    None => None,
                    Some(s) if s == "*" => None,
                    Some(s) if s.contains('*') => {
                        return Err(SpecError::FilterNeverMatches {
                            path: fpath,
                            at: self.at(f),
                            filter: s,
                        })
                    }
                    Some(s) => Some(s),
                }
            }
        };
        let Some((_, v)) = lookup(entries, "value") else {
            return Err(SpecError::MissingKey {
                path: path.to_owned(),
                key: "value",
                at: self.at(id),
            });
        };
        let vpath = format!("{path}.value");
        let value = match self.kind(v) {
            Kind::Seq(items) => RuleValue::Gradient(self.values(items, v, &vpath, kind)?),
            _ => RuleValue::Value(self.value(v, &vpath, kind)?),
        };
        Ok(Rule { filter, value })
    }

    /// A `parameters:` mapping, checked against the method's parameters. `per_model` says
    /// whether it belongs to one model (method-level parameters are refused there).
    fn params(
        &self,
        id: Option<NodeId>,
        path: &str,
        method: Method,
        per_model: bool,
    ) -> Result<Params, SpecError> {
        let mut params = Params::default();
        let Some(id) = id else { return Ok(params) };
        if self.is_null(id) {
            return Ok(params);
        }
        let entries = self.map(id, path, "a mapping of parameter names to values")?;
        for (key, value) in entries {
            let ppath = format!("{path}.{}", key.text);
            let spec = Param::from_name(&key.text).and_then(|p| method.param(p));
            let Some(spec) = spec else {
                return Err(SpecError::UnknownParameter {
                    path: ppath,
                    at: key.at,
                    name: key.text.clone(),
                    method: method.name(),
                    accepted: method.params().iter().map(|s| s.param.name()).collect(),
                });
            };
            if per_model && spec.scope == Scope::Global {
                return Err(SpecError::ParameterNotPerModel {
                    path: ppath,
                    at: key.at,
                    name: spec.param.name(),
                    method: method.name(),
                });
            }
            let setting = self.setting(*value, &ppath, spec, method)?;
            params.given.insert(
                spec.param,
                Given {
                    setting,
                    path: ppath,
                },
            );
        }
        Ok(params)
    }
}

fn expected_of(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Float => "a number",
        ParamKind::Bool => "true or false",
        ParamKind::Int => "a non-negative integer",
    }
}

fn lookup<'e>(entries: &'e [(MapKey, NodeId)], key: &str) -> Option<(&'e MapKey, NodeId)> {
    entries
        .iter()
        .find(|(k, _)| k.text == key)
        .map(|(k, id)| (k, *id))
}

/// Checks that `name` can name an output directory.
pub(crate) fn check_name(name: &str, path: &str, at: Option<Location>) -> Result<(), SpecError> {
    let problem = if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not directory names")
    } else if name.contains(['/', '\\', '\0']) {
        Some("it contains '/', '\\' or a NUL byte")
    } else if name.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(SpecError::InvalidName {
            path: path.to_owned(),
            at,
            name: name.to_owned(),
            problem,
        }),
        None => Ok(()),
    }
}

/// A model reference as written, before lookup.
struct RawRef {
    written: String,
    path: String,
    at: Location,
}

/// Reads a model reference: `path-or-id[@revision]`, or mergekit's mapping form
/// `{model: {path, revision}, lora: null, override_architecture: null}`.
fn raw_ref(d: &Doc, id: NodeId, path: &str) -> Result<RawRef, SpecError> {
    let at = d.at(id);
    let written = match d.kind(id) {
        Kind::Scalar { .. } => d.string(id, path)?,
        Kind::Map(_) => {
            let entries = d.closed_map(id, path, "a model reference", REF_KEYS)?;
            if let Some((_, lora)) = lookup(entries, "lora") {
                if !d.is_null(lora) {
                    return Err(SpecError::Lora {
                        path: format!("{path}.lora"),
                        at: Some(d.at(lora)),
                        written: d.describe(lora),
                    });
                }
            }
            if let Some((_, o)) = lookup(entries, "override_architecture") {
                if !d.is_null(o) {
                    return Err(SpecError::InvalidModelRef {
                        path: format!("{path}.override_architecture"),
                        at: Some(d.at(o)),
                        written: d.describe(o),
                        problem: RefProblem::OverrideArchitecture,
                    });
                }
            }
            let Some((_, model)) = lookup(entries, "model") else {
                return Err(SpecError::MissingKey {
                    path: path.to_owned(),
                    key: "model",
                    at,
                });
            };
            let mpath = format!("{path}.model");
            match d.kind(model) {
                Kind::Map(_) => {
                    let e = d.closed_map(model, &mpath, "{path, revision}", PATH_KEYS)?;
                    let Some((_, p)) = lookup(e, "path") else {
                        return Err(SpecError::MissingKey {
                            path: mpath,
                            key: "path",
                            at: d.at(model),
                        });
                    };
                    let p = d.string(p, &format!("{mpath}.path"))?;
                    match d.opt_string(
                        lookup(e, "revision").map(|(_, r)| r),
                        &format!("{mpath}.revision"),
                    )? {
                        Some(r) => format!("{p}@{r}"),
                        None => p,
                    }
                }
                _ => d.string(model, &mpath)?,
            }
        }
        Kind::Seq(_) => return Err(d.wrong(id, path, "a model path or Hugging Face id")),
    };
    Ok(RawRef {
        written,
        path: path.to_owned(),
        at,
    })
}

/// Looks a model reference up: another document's output, a local path, or the HF cache.
pub(crate) fn resolve_ref(
    written: &str,
    path: &str,
    at: Option<Location>,
    ctx: &Ctx,
) -> Result<ModelRef, SpecError> {
    if written.contains('+') {
        // mergekit splits on '+' for a LoRA adapter whatever the path looks like.
        return Err(SpecError::Lora {
            path: path.to_owned(),
            at,
            written: written.to_owned(),
        });
    }
    let invalid = |problem| SpecError::InvalidModelRef {
        path: path.to_owned(),
        at,
        written: written.to_owned(),
        problem,
    };
    let (name, revision) = match written.split_once('@') {
        None => (written, None),
        Some((_, rev)) if rev.contains('@') => return Err(invalid(RefProblem::SeveralRevisions)),
        Some((name, rev)) => (name, Some(rev)),
    };
    if name.is_empty() || revision == Some("") {
        return Err(invalid(RefProblem::Empty));
    }
    if let Some(&index) = ctx.names.get(name) {
        if revision.is_some() {
            return Err(invalid(RefProblem::RevisionOnOutput));
        }
        return Ok(ModelRef {
            written: written.to_owned(),
            location: ModelLocation::Output {
                index,
                name: name.to_owned(),
            },
        });
    }
    let local = hf::local_candidate(ctx.base_dir, name);
    if local.exists() {
        if revision.is_some() {
            return Err(invalid(RefProblem::RevisionOnLocalPath));
        }
        return Ok(ModelRef {
            written: written.to_owned(),
            location: ModelLocation::Local(local),
        });
    }
    let mut searched = vec![Searched {
        path: local,
        outcome: SearchOutcome::NoSuchPath,
    }];
    let mut download = None;
    if hf::is_repo_id(name) {
        match ctx.hf.resolve(name, revision) {
            Ok(snapshot) => {
                return Ok(ModelRef {
                    written: written.to_owned(),
                    location: ModelLocation::Hub {
                        repo: name.to_owned(),
                        revision: revision.map(str::to_owned),
                        commit: snapshot.commit,
                        dir: snapshot.dir,
                    },
                })
            }
            Err(s) => {
                searched.push(s);
                download = Some(hf::download_command(name, revision));
            }
        }
    } else if revision.is_some() {
        return Err(invalid(RefProblem::RevisionOnLocalPath));
    }
    Err(SpecError::ModelNotFound {
        path: path.to_owned(),
        at,
        written: written.to_owned(),
        searched,
        download,
    })
}

fn dtype(d: &Doc, id: Option<NodeId>, path: &str) -> Result<Option<FloatDtype>, SpecError> {
    let Some(id) = id else { return Ok(None) };
    let Some(name) = d.opt_string(Some(id), path)? else {
        return Ok(None);
    };
    let bare = name.strip_prefix("torch.").unwrap_or(&name);
    match bare {
        // mergekit's dtype_from_name: an empty name means "not set".
        "" => Ok(None),
        "float32" => Ok(Some(FloatDtype::F32)),
        "bfloat16" => Ok(Some(FloatDtype::BF16)),
        "float16" => Ok(Some(FloatDtype::F16)),
        "float64" | "int64" => Err(SpecError::UnsupportedDtype {
            path: path.to_owned(),
            at: d.at(id),
            found: name,
        }),
        _ => Err(SpecError::UnknownDtype {
            path: path.to_owned(),
            at: d.at(id),
            found: name,
        }),
    }
}

fn chat_template(d: &Doc, id: Option<NodeId>) -> Result<Option<ChatTemplate>, SpecError> {
    let path = "chat_template";
    let Some(id) = id else { return Ok(None) };
    let Some(text) = d.opt_string(Some(id), path)? else {
        return Ok(None);
    };
    // mergekit/merge.py:_set_chat_template, in its order.
    if text.is_empty() {
        return Ok(None);
    }
    if text == "auto" {
        return Ok(Some(ChatTemplate::Auto));
    }
    if text.len() < 256
        && !text.contains('\n')
        && !text.contains('{')
        && CHAT_TEMPLATES.contains(&text.as_str())
    {
        return Ok(Some(ChatTemplate::Named(text)));
    }
    if text.len() < 20 || !text.contains('{') {
        return Err(SpecError::InvalidChatTemplate {
            path: path.to_owned(),
            at: d.at(id),
            found: text,
        });
    }
    Ok(Some(ChatTemplate::Template(text)))
}

/// Reads one document into an output.
fn read_document(
    doc: &Document,
    source: &str,
    name: Option<String>,
    ctx: &Ctx,
) -> Result<OutputSpec, SpecError> {
    let d = Doc(doc);
    let root_at = d.at(doc.root);
    let entries = d.map(doc.root, "", "a mapping of config keys")?;
    for (key, _) in entries {
        match key.text.as_str() {
            "slices" => return Err(SpecError::Slices { at: key.at }),
            "modules" => return Err(SpecError::Modules { at: key.at }),
            "tokenizer" => return Err(SpecError::TokenizerBlock { at: key.at }),
            k if TOP_KEYS.contains(&k) => {}
            _ => {
                return Err(SpecError::UnknownKey {
                    path: String::new(),
                    key: key.text.clone(),
                    at: key.at,
                    allowed: TOP_KEYS.to_vec(),
                })
            }
        }
    }
    let get = |key: &str| lookup(entries, key).map(|(_, id)| id);

    // merge_method
    let Some(method_id) = get("merge_method") else {
        return Err(SpecError::MissingKey {
            path: String::new(),
            key: "merge_method",
            at: root_at,
        });
    };
    let method_name = d.string(method_id, "merge_method")?;
    let Some(method) = Method::from_name(&method_name) else {
        let supported = Method::names();
        return Err(if MERGEKIT_ONLY_METHODS.contains(&method_name.as_str()) {
            SpecError::UnsupportedMethod {
                path: "merge_method".into(),
                at: d.at(method_id),
                name: method_name,
                supported,
            }
        } else {
            SpecError::UnknownMethod {
                path: "merge_method".into(),
                at: d.at(method_id),
                name: method_name,
                supported,
            }
        });
    };

    // Structure and parameters, before any lookup on disk.
    let Some(models_id) = get("models") else {
        return Err(SpecError::MissingKey {
            path: String::new(),
            key: "models",
            at: root_at,
        });
    };
    let Kind::Seq(model_items) = d.kind(models_id) else {
        return Err(d.wrong(models_id, "models", "a list of models"));
    };
    if model_items.is_empty() {
        return Err(SpecError::EmptyList {
            path: "models".into(),
            at: Some(d.at(models_id)),
        });
    }
    let mut raw_models = Vec::with_capacity(model_items.len());
    for (i, &item) in model_items.iter().enumerate() {
        let path = format!("models[{i}]");
        let e = d.closed_map(item, &path, "a mapping with 'model:'", MODEL_KEYS)?;
        let Some((_, model)) = lookup(e, "model") else {
            return Err(SpecError::MissingKey {
                path,
                key: "model",
                at: d.at(item),
            });
        };
        let raw = raw_ref(&d, model, &format!("{path}.model"))?;
        let params = d.params(
            lookup(e, "parameters").map(|(_, p)| p),
            &format!("{path}.parameters"),
            method,
            true,
        )?;
        raw_models.push((raw, params, path));
    }
    let raw_base = match get("base_model") {
        Some(id) if !d.is_null(id) => Some(raw_ref(&d, id, "base_model")?),
        _ => None,
    };
    let params = d.params(get("parameters"), "parameters", method, false)?;
    let expo_alpha = match method {
        Method::Expo => expo_alpha(&d, get("parameters"))?,
        _ => None,
    };
    let out_dtype = dtype(&d, get("out_dtype"), "out_dtype")?;
    let compute_dtype = dtype(&d, get("dtype"), "dtype")?;
    let chat_template = chat_template(&d, get("chat_template"))?;
    let raw_tokenizer = match get("tokenizer_source") {
        None => None,
        Some(id) if d.is_null(id) => None,
        Some(id) => {
            let text = match d.kind(id) {
                Kind::Scalar { text, .. } => Some(text.as_str()),
                _ => None,
            };
            match text {
                Some("union") => {
                    return Err(SpecError::UnionTokenizer {
                        path: "tokenizer_source".into(),
                        at: d.at(id),
                    })
                }
                Some("base") => Some(None),
                _ => Some(Some(raw_ref(&d, id, "tokenizer_source")?)),
            }
        }
    };

    // Models on disk.
    let mut models: Vec<ModelEntry> = Vec::with_capacity(raw_models.len() + 1);
    for (raw, params, path) in raw_models {
        let model = resolve_ref(&raw.written, &raw.path, Some(raw.at), ctx)?;
        if let Some(first) = models.iter().find(|m| m.model.same_as(&model)) {
            return Err(SpecError::DuplicateModel {
                path: raw.path,
                at: Some(raw.at),
                model: raw.written,
                first: first.path.clone(),
            });
        }
        models.push(ModelEntry {
            model,
            params,
            path,
        });
    }
    let mut base = None;
    if let Some(raw) = &raw_base {
        let model = resolve_ref(&raw.written, &raw.path, Some(raw.at), ctx)?;
        base = Some(match models.iter().position(|m| m.model.same_as(&model)) {
            Some(i) => i,
            None => {
                // mergekit adds a base model that is not among the models as the last input.
                models.push(ModelEntry {
                    model,
                    params: Params::default(),
                    path: "base_model".into(),
                });
                models.len() - 1
            }
        });
    }
    let spec = method.spec();
    if spec.base == BaseRule::Required && base.is_none() {
        return Err(SpecError::MissingBaseModel {
            method: method.name(),
            at: root_at,
        });
    }
    let n = models.len();
    if n < spec.min_inputs || spec.max_inputs.is_some_and(|max| n > max) {
        return Err(SpecError::ModelCount {
            method: method.name(),
            expected: spec.inputs_text,
            got: n,
            at: d.at(models_id),
        });
    }
    // Parameters given to the base model that it never reads.
    if let Some(b) = base {
        for (param, given) in &models[b].params.given {
            let scope = method.param(*param).map(|s| s.scope);
            if scope == Some(Scope::PerNonBase) {
                let at = d_at_of_param(&d, model_items.get(b).copied(), param.name());
                return Err(SpecError::ParameterOnBase {
                    path: given.path.clone(),
                    at: at.unwrap_or(root_at),
                    name: param.name(),
                    method: method.name(),
                });
            }
        }
    }
    // Required parameters, given somewhere for every model they apply to.
    for ps in method
        .params()
        .iter()
        .filter(|s| s.default == ParamDefault::Required)
    {
        if ps.scope == Scope::Global {
            if params.get(ps.param).is_none() {
                return Err(SpecError::MissingGlobalParameter {
                    method: method.name(),
                    name: ps.param.name(),
                    at: get("parameters").map(|p| d.at(p)).unwrap_or(root_at),
                });
            }
            continue;
        }
        for (i, m) in models.iter().enumerate() {
            let applies_here = applies(ps.scope, base == Some(i));
            if applies_here && m.params.get(ps.param).is_none() && params.get(ps.param).is_none() {
                return Err(SpecError::MissingParameter {
                    method: method.name(),
                    name: ps.param.name(),
                    model: m.model.written.clone(),
                    path: m.path.clone(),
                });
            }
        }
    }
    let tokenizer_source = match raw_tokenizer {
        None => TokenizerSource::Default,
        Some(None) => {
            if base.is_none() {
                let id = get("tokenizer_source");
                return Err(SpecError::BaseTokenizerWithoutBase {
                    at: id.map(|i| d.at(i)).unwrap_or(root_at),
                });
            }
            TokenizerSource::Base
        }
        Some(Some(raw)) => {
            TokenizerSource::Model(resolve_ref(&raw.written, &raw.path, Some(raw.at), ctx)?)
        }
    };
    Ok(OutputSpec {
        name,
        method,
        models,
        base,
        params,
        expo_alpha,
        dtype: compute_dtype,
        out_dtype,
        tokenizer_source,
        chat_template,
        source_text: source.to_owned(),
    })
}

/// `parameters.alpha` of an `expo` document, rounded once from its decimal text to f32 as
/// `mergestream expo --alpha` rounds it, so both spellings merge identically. Called after
/// [`Doc::params`] checked that it is one plain number.
fn expo_alpha(d: &Doc, params: Option<NodeId>) -> Result<Option<f32>, SpecError> {
    let Some(Kind::Map(entries)) = params.map(|p| d.kind(p)) else {
        return Ok(None);
    };
    let Some((_, id)) = lookup(entries, "alpha") else {
        return Ok(None);
    };
    let Kind::Scalar { text, .. } = d.kind(id) else {
        return Ok(None);
    };
    match yaml::number_of(text) {
        NumberText::Number { f32, .. } if f32.is_finite() => Ok(Some(f32)),
        _ => Err(SpecError::OutOfRange {
            path: "parameters.alpha".into(),
            at: Some(d.at(id)),
            name: "alpha",
            value: text.clone(),
            expected: "a finite number (within f32 range)",
        }),
    }
}

/// Where `models[i].parameters.<name>` starts, for errors found after parsing.
fn d_at_of_param(d: &Doc, item: Option<NodeId>, name: &str) -> Option<Location> {
    let Kind::Map(e) = d.kind(item?) else {
        return None;
    };
    let (_, p) = lookup(e, "parameters")?;
    let Kind::Map(pe) = d.kind(p) else {
        return None;
    };
    lookup(pe, name).map(|(k, _)| k.at)
}

#[cfg(test)]
mod tests {
    use super::without_start_marker;

    #[test]
    fn a_document_records_its_text_without_the_separator() {
        assert_eq!(without_start_marker("---\nname: a\n"), "name: a\n");
        assert_eq!(without_start_marker("---  \r\nname: a\n"), "name: a\n");
        assert_eq!(without_start_marker("name: a\n---\n"), "name: a\n---\n");
        assert_eq!(
            without_start_marker("--- # c\nname: a\n"),
            "--- # c\nname: a\n"
        );
        assert_eq!(without_start_marker("---"), "---");
    }
}
