//! Everything that can be wrong with a merge request, one variant per problem.
//!
//! Each variant carries the key path in the config (`models[1].parameters.weight`, or a
//! command-line flag such as `--sft` for requests built from flags) and, for configs, the line
//! and column where the offending node starts. Messages name what is accepted instead. This
//! module only describes problems; [`super::config`], [`super::hf`] and [`super::params`] find
//! them.

use std::fmt;
use std::path::PathBuf;

/// A position in the config text, both 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// Line number, from 1.
    pub line: usize,
    /// Column number, from 1, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// What is wrong with a model reference's spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefProblem {
    /// Empty, or only a revision.
    Empty,
    /// `a@b@c`.
    SeveralRevisions,
    /// `./dir@rev`: a revision only means something for a Hugging Face id.
    RevisionOnLocalPath,
    /// `name@rev` where `name` is another document of the config.
    RevisionOnOutput,
    /// The mapping form with `override_architecture` set.
    OverrideArchitecture,
}

impl fmt::Display for RefProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefProblem::Empty => "an empty model reference",
            RefProblem::SeveralRevisions => {
                "more than one '@' (write org/name@revision with one revision)"
            }
            RefProblem::RevisionOnLocalPath => {
                "a revision ('@…') on a local directory; revisions apply to Hugging Face ids only"
            }
            RefProblem::RevisionOnOutput => {
                "a revision ('@…') on the name of another document of this config"
            }
            RefProblem::OverrideArchitecture => "override_architecture, which is not supported",
        })
    }
}

/// One place a model reference was looked for, and what was found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Searched {
    /// The place: a local path, or the cache's repository folder, `refs/<revision>` file or
    /// snapshot folder.
    pub path: PathBuf,
    /// What was missing there.
    pub outcome: SearchOutcome,
}

/// Why a searched place did not hold the model.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SearchOutcome {
    /// Nothing at the local path (a relative reference is joined to the caller's base
    /// directory; the command line passes the working directory, as mergekit resolves it).
    NoSuchPath,
    /// The Hugging Face cache has no folder for the repository. `cache` says how the cache
    /// directory was chosen (`HF_HUB_CACHE`, `HF_HOME`, …).
    NotInCache {
        /// [`HfCache::chosen_by`](crate::spec::HfCache::chosen_by).
        cache: &'static str,
    },
    /// The repository's folder has no `refs/<revision>` file.
    NoRef {
        /// The revision looked up (`main` when none was written).
        revision: String,
    },
    /// The commit named by the ref (or given as the revision) has no snapshot folder.
    NoSnapshot {
        /// The full commit hash.
        commit: String,
    },
}

impl fmt::Display for Searched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        match &self.outcome {
            SearchOutcome::NoSuchPath => write!(f, "{p}: no such file or directory"),
            SearchOutcome::NotInCache { cache } => {
                write!(f, "{p}: not in the Hugging Face cache (chosen by {cache})")
            }
            SearchOutcome::NoRef { revision } => {
                write!(f, "{p}: no revision '{revision}' in the Hugging Face cache")
            }
            SearchOutcome::NoSnapshot { commit } => {
                write!(f, "{p}: commit {commit} is not downloaded")
            }
        }
    }
}

/// A merge request that cannot be run as written.
///
/// Fields shared by most variants: `path` is the key path of the offending node
/// (`models[1].parameters.weight`; empty for the top level of a document) or, for a request
/// built from flags, the flag (`--alpha`); `at` is where that node starts in the config text
/// (`None` for a request built from flags). The message names what is accepted instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The text is not YAML.
    #[error("YAML syntax error at {at}: {message}")]
    Syntax {
        /// Where the parser stopped.
        at: Location,
        /// What the YAML parser said.
        message: String,
    },

    /// Lists and mappings nested deeper than any merge config needs.
    #[error("{at}: nested more than {limit} levels deep")]
    TooDeep {
        /// The node that goes one level too deep.
        at: Location,
        /// The deepest nesting accepted.
        limit: usize,
    },

    /// A YAML tag (`!!float 1`, `!custom x`).
    #[error("{at}: YAML tags ('{tag}') are not supported in merge configs; write the plain value")]
    Tag {
        /// The tagged node.
        at: Location,
        /// The tag as written.
        tag: String,
    },

    /// A mapping repeats a key (PyYAML keeps the last one silently).
    #[error("{}: duplicate key '{key}' (first given at {first})", place(path, &Some(*at)))]
    DuplicateKey {
        /// Key path of the mapping.
        path: String,
        /// The repeated key.
        key: String,
        /// The repetition.
        at: Location,
        /// The key's first occurrence.
        first: Location,
    },

    /// A mapping key that is a list or a mapping.
    #[error("{}: mapping keys must be plain names", place(path, &Some(*at)))]
    NonStringKey {
        /// Key path of the mapping.
        path: String,
        /// The key.
        at: Location,
    },

    /// No document has any content.
    #[error("the config is empty: it needs at least merge_method and models")]
    Empty,

    /// A key that is not part of the format at this place.
    #[error("{}: unknown key '{key}'; accepted here: {}", place(path, &Some(*at)), allowed.join(", "))]
    UnknownKey {
        /// Key path of the mapping holding the key (empty at the top level).
        path: String,
        /// The key.
        key: String,
        /// The key.
        at: Location,
        /// The keys this mapping accepts.
        allowed: Vec<&'static str>,
    },

    /// A value of the wrong kind (text where a number belongs, a list where a mapping does, …).
    #[error("{}: expected {expected}, found {found}", place(path, &Some(*at)))]
    WrongType {
        /// Key path of the value.
        path: String,
        /// The value.
        at: Location,
        /// What belongs here (`"a number"`, `"a list of models"`, …).
        expected: &'static str,
        /// What was found (`the quoted text "0.5"`, `a list of 3`, …).
        found: String,
    },

    /// A number written in a form that YAML 1.1 (PyYAML, mergekit) and YAML 1.2 read
    /// differently, or that mergekit configs never need (`010`, `1_000`, `0x10`, `1:30`).
    #[error("{}: '{text}' is ambiguous (YAML 1.1 and 1.2 read it differently); write a plain decimal number", place(path, &Some(*at)))]
    AmbiguousNumber {
        /// Key path of the value.
        path: String,
        /// The value.
        at: Location,
        /// The number as written.
        text: String,
    },

    /// A required key is absent.
    #[error("{}: missing '{key}'", place(path, &Some(*at)))]
    MissingKey {
        /// Key path of the mapping that lacks it (empty at the top level).
        path: String,
        /// The missing key.
        key: &'static str,
        /// The mapping.
        at: Location,
    },

    /// A `merge_method` that neither mergekit 0.1.5 nor mergestream has.
    #[error("{}: unknown merge method '{name}'; supported: {}", place(path, &Some(*at)), supported.join(", "))]
    UnknownMethod {
        /// `merge_method`.
        path: String,
        /// The value.
        at: Location,
        /// The method as written.
        name: String,
        /// Every method mergestream runs ([`Method::names`](crate::spec::Method::names)).
        supported: Vec<&'static str>,
    },

    /// A mergekit method that mergestream does not implement.
    #[error("{}: merge method '{name}' (a mergekit method) is not supported by mergestream; supported: {}", place(path, &Some(*at)), supported.join(", "))]
    UnsupportedMethod {
        /// `merge_method`.
        path: String,
        /// The value.
        at: Location,
        /// The method as written.
        name: String,
        /// Every method mergestream runs ([`Method::names`](crate::spec::Method::names)).
        supported: Vec<&'static str>,
    },

    /// A `slices:` config (layer ranges from several models).
    #[error("{at}: 'slices:' configs are not supported; list whole models under 'models:'")]
    Slices {
        /// The `slices` key.
        at: Location,
    },

    /// A `modules:` config (per-module merges of multi-module architectures).
    #[error("{at}: 'modules:' configs are not supported; list whole models under 'models:'")]
    Modules {
        /// The `modules` key.
        at: Location,
    },

    /// `tokenizer_source: union` (a vocabulary built from every model's).
    #[error("{}: tokenizer_source 'union' is not supported yet; use 'base' or one of the models", place(path, &Some(*at)))]
    UnionTokenizer {
        /// `tokenizer_source`.
        path: String,
        /// The value.
        at: Location,
    },

    /// mergekit's `tokenizer:` block (vocabulary surgery).
    #[error(
        "{at}: the 'tokenizer:' block is not supported; use 'tokenizer_source: base' or a model"
    )]
    TokenizerBlock {
        /// The `tokenizer` key.
        at: Location,
    },

    /// A parameter the method does not take at all.
    #[error("{}: {method} takes no parameter '{name}'; it takes: {}", place(path, &Some(*at)), list_or_none(accepted))]
    UnknownParameter {
        /// Key path of the parameter (`models[0].parameters.densty`).
        path: String,
        /// The parameter's key.
        at: Location,
        /// The parameter as written.
        name: String,
        /// The merge method.
        method: &'static str,
        /// The parameters the method takes.
        accepted: Vec<&'static str>,
    },

    /// A method-level parameter given for one model (mergekit would silently ignore it).
    #[error("{}: '{name}' applies to the whole {method} merge, not to one model; set it under the top-level 'parameters:' (mergekit would silently ignore it here)", place(path, &Some(*at)))]
    ParameterNotPerModel {
        /// Key path of the parameter.
        path: String,
        /// The parameter's key.
        at: Location,
        /// The parameter.
        name: &'static str,
        /// The merge method.
        method: &'static str,
    },

    /// A parameter given to the base model that the method only reads for the other models
    /// (mergekit would silently ignore it).
    #[error("{}: {method} does not use the base model's '{name}' (only the other models'); remove it (mergekit would silently ignore it)", place(path, &Some(*at)))]
    ParameterOnBase {
        /// Key path of the parameter.
        path: String,
        /// The parameter's key (the document's start if it cannot be placed).
        at: Location,
        /// The parameter.
        name: &'static str,
        /// The merge method.
        method: &'static str,
    },

    /// A parameter that must be one value for the whole merge was given filters or a gradient.
    #[error("{}: '{name}' of {method} must be a single value (no filters, no per-layer list)", place(path, &Some(*at)))]
    NotVarying {
        /// Key path of the parameter.
        path: String,
        /// The value.
        at: Location,
        /// The parameter.
        name: &'static str,
        /// The merge method.
        method: &'static str,
    },

    /// A required parameter is given nowhere for this model.
    #[error("{method} needs '{name}' for model '{model}': set {path}.parameters.{name} or a top-level parameters.{name}")]
    MissingParameter {
        /// The merge method.
        method: &'static str,
        /// The parameter.
        name: &'static str,
        /// The model reference, as written.
        model: String,
        /// Where the model is given (`models[1]`, or `base_model` when mergekit adds the base
        /// model as an input).
        path: String,
    },

    /// A required method-level parameter is absent.
    #[error("{at}: {method} needs parameters.{name}")]
    MissingGlobalParameter {
        /// The merge method.
        method: &'static str,
        /// The parameter.
        name: &'static str,
        /// The top-level `parameters:` mapping, or the document if there is none.
        at: Location,
    },

    /// The method needs a base model and none is given.
    #[error(
        "{at}: {method} needs a base_model (the model the others' differences are taken from)"
    )]
    MissingBaseModel {
        /// The merge method.
        method: &'static str,
        /// The document.
        at: Location,
    },

    /// `tokenizer_source: base` without a `base_model` (mergekit would pick an arbitrary model).
    #[error("{at}: tokenizer_source 'base' needs a base_model; name the model whose tokenizer to use instead")]
    BaseTokenizerWithoutBase {
        /// The `tokenizer_source` value.
        at: Location,
    },

    /// Too few or too many models for the method.
    #[error("{at}: {method} takes {expected}; the config gives {got} model{}", if *got == 1 { "" } else { "s" })]
    ModelCount {
        /// The merge method.
        method: &'static str,
        /// How many it takes, in words ([`MethodSpec::inputs_text`](crate::spec::MethodSpec)).
        expected: &'static str,
        /// How many the document gives, the base model included.
        got: usize,
        /// The `models:` list.
        at: Location,
    },

    /// The same model is listed twice (by the same reference, or two references to one
    /// directory).
    #[error(
        "{}: model '{model}' is already given at {first}; list each model once",
        place(path, at)
    )]
    DuplicateModel {
        /// Where the second reference is (`models[2].model`, `--aligned`).
        path: String,
        /// The second reference (`None` for flags).
        at: Option<Location>,
        /// The second reference, as written.
        model: String,
        /// Where the model was first given (`models[0]`, `--sft`).
        first: String,
    },

    /// `model+lora` (mergekit merges the adapter into the model first).
    #[error("{}: '{written}' names a LoRA adapter; LoRA references are not supported, merge the adapter into the model first", place(path, at))]
    Lora {
        /// Key path (or flag) of the reference.
        path: String,
        /// The reference (`None` for flags).
        at: Option<Location>,
        /// The reference as written (or the `lora:` value).
        written: String,
    },

    /// A model reference that is malformed.
    #[error("{}: '{written}': {problem}", place(path, at))]
    InvalidModelRef {
        /// Key path (or flag) of the reference.
        path: String,
        /// The reference (`None` for flags).
        at: Option<Location>,
        /// The reference as written.
        written: String,
        /// What is wrong with it.
        problem: RefProblem,
    },

    /// A model that is neither a local path nor in the local Hugging Face cache.
    #[error("{}: model '{written}' not found; looked in:\n{}{}", place(path, at), bullets(searched), download.as_ref().map(|d| format!("\nto download it: {d}")).unwrap_or_default())]
    ModelNotFound {
        /// Key path (or flag) of the reference.
        path: String,
        /// The reference (`None` for flags).
        at: Option<Location>,
        /// The reference as written.
        written: String,
        /// Every place looked at, in order, with what was missing there.
        searched: Vec<Searched>,
        /// The command that fetches it into the cache, when it is a Hugging Face id.
        download: Option<String>,
    },

    /// A `dtype`/`out_dtype` name mergekit does not know.
    #[error("{}: unknown dtype '{found}'; use float32, bfloat16 or float16", place(path, &Some(*at)))]
    UnknownDtype {
        /// `dtype` or `out_dtype`.
        path: String,
        /// The value.
        at: Location,
        /// The name as written.
        found: String,
    },

    /// A dtype mergekit knows but mergestream does not compute in (`float64`, `int64`).
    #[error("{}: dtype '{found}' is not supported; use float32, bfloat16 or float16", place(path, &Some(*at)))]
    UnsupportedDtype {
        /// `dtype` or `out_dtype`.
        path: String,
        /// The value.
        at: Location,
        /// The name as written.
        found: String,
    },

    /// A `chat_template` that is neither a known name, `auto`, nor a Jinja template.
    #[error("{}: chat_template '{found}' is not a template; use auto, one of {}, or a Jinja template", place(path, &Some(*at)), super::config::CHAT_TEMPLATES.join(", "))]
    InvalidChatTemplate {
        /// `chat_template`.
        path: String,
        /// The value.
        at: Location,
        /// The value as written.
        found: String,
    },

    /// A filter that contains `*` but is not exactly `*`: mergekit matches filters as plain
    /// substrings, so it can never match a tensor name.
    #[error("{}: filter '{filter}' can never match: filters are plain substrings of tensor names (only a filter of exactly '*' matches everything)", place(path, &Some(*at)))]
    FilterNeverMatches {
        /// Key path of the filter (`parameters.weight[0].filter`).
        path: String,
        /// The filter.
        at: Location,
        /// The filter as written.
        filter: String,
    },

    /// An empty list where values belong (mergekit reads it as "not set").
    #[error("{}: empty list", place(path, at))]
    EmptyList {
        /// Key path of the list, or `--alpha` with no values.
        path: String,
        /// The list (`None` for flags).
        at: Option<Location>,
    },

    /// A number that must be finite (or a non-negative integer) is not.
    #[error("{}: {name} must be {expected}, not {value}", place(path, at))]
    OutOfRange {
        /// Key path (or flag) of the number.
        path: String,
        /// The number (`None` for flags).
        at: Option<Location>,
        /// The parameter (`alpha`, `seed`).
        name: &'static str,
        /// The number as written.
        value: String,
        /// What it must be (`"a finite number"`, …).
        expected: &'static str,
    },

    /// A document `name:` that cannot name an output directory.
    #[error("{}: '{name}' cannot name an output: {problem}", place(path, at))]
    InvalidName {
        /// `name`.
        path: String,
        /// The value.
        at: Option<Location>,
        /// The name as written.
        name: String,
        /// Why it cannot name a directory (`"it is empty"`, …).
        problem: &'static str,
    },

    /// Two documents (or two alphas) give the same output name.
    #[error("{}: output name '{name}' is used twice", place(path, at))]
    DuplicateName {
        /// `name`, or `--alpha` for two alphas with the same name.
        path: String,
        /// The second `name:` key (`None` for flags).
        at: Option<Location>,
        /// The name.
        name: String,
    },

    /// More than one document without a `name:`.
    #[error("{at}: only one document may be without a 'name:' (the first is at {first})")]
    MultipleUnnamed {
        /// The second unnamed document.
        at: Location,
        /// The first unnamed document.
        first: Location,
    },

    /// Documents that use each other's outputs in a circle.
    #[error("documents depend on each other in a circle: {}", names.join(" -> "))]
    DependencyCycle {
        /// The documents' names along the circle, the first repeated at the end.
        names: Vec<String>,
    },

    /// At plan time: no setting of a required parameter applies to a tensor (a filter list
    /// without a catch-all, and no top-level value).
    #[error("{method}: no value of '{name}' applies to tensor '{tensor}'{} (set at {path}: add a rule without filter, or a top-level parameters.{name})", model.as_ref().map(|m| format!(" for model '{m}'")).unwrap_or_default())]
    Unresolved {
        /// The merge method.
        method: &'static str,
        /// The parameter.
        name: &'static str,
        /// The model it is resolved for, as written (`None` for a method-level parameter).
        model: Option<String>,
        /// The tensor.
        tensor: String,
        /// The key paths of the settings that were tried, joined by `" and "`.
        path: String,
    },
}

/// `models[1].model (line 3, column 12)`, or the path alone without a location.
fn place(path: &str, at: &Option<Location>) -> String {
    let path = if path.is_empty() { "config" } else { path };
    match at {
        Some(at) => format!("{path} ({at})"),
        None => path.to_owned(),
    }
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "no parameters".into()
    } else {
        items.join(", ")
    }
}

fn bullets(items: &[Searched]) -> String {
    items
        .iter()
        .map(|s| format!("  - {s}"))
        .collect::<Vec<_>>()
        .join("\n")
}
