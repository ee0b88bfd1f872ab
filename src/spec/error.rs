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
    pub line: usize,
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
    pub path: PathBuf,
    pub outcome: SearchOutcome,
}

/// Why a searched place did not hold the model.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SearchOutcome {
    /// As a local path (relative paths are relative to the working directory, as in mergekit).
    NoSuchPath,
    /// The Hugging Face cache has no folder for the repository. `cache` says how the cache
    /// directory was chosen (`HF_HUB_CACHE`, `HF_HOME`, …).
    NotInCache { cache: &'static str },
    /// The repository's folder has no `refs/<revision>` file.
    NoRef { revision: String },
    /// The commit named by the ref (or given as the revision) has no snapshot folder.
    NoSnapshot { commit: String },
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
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The text is not YAML.
    #[error("YAML syntax error at {at}: {message}")]
    Syntax { at: Location, message: String },

    /// Lists and mappings nested deeper than any merge config needs.
    #[error("{at}: nested more than {limit} levels deep")]
    TooDeep { at: Location, limit: usize },

    /// A YAML tag (`!!float 1`, `!custom x`).
    #[error("{at}: YAML tags ('{tag}') are not supported in merge configs; write the plain value")]
    Tag { at: Location, tag: String },

    /// A mapping repeats a key (PyYAML keeps the last one silently).
    #[error("{}: duplicate key '{key}' (first given at {first})", place(path, &Some(*at)))]
    DuplicateKey {
        path: String,
        key: String,
        at: Location,
        first: Location,
    },

    /// A mapping key that is a list or a mapping.
    #[error("{}: mapping keys must be plain names", place(path, &Some(*at)))]
    NonStringKey { path: String, at: Location },

    /// No document has any content.
    #[error("the config is empty: it needs at least merge_method and models")]
    Empty,

    /// A key that is not part of the format at this place.
    #[error("{}: unknown key '{key}'; accepted here: {}", place(path, &Some(*at)), allowed.join(", "))]
    UnknownKey {
        path: String,
        key: String,
        at: Location,
        allowed: Vec<&'static str>,
    },

    /// A value of the wrong kind (text where a number belongs, a list where a mapping does, …).
    #[error("{}: expected {expected}, found {found}", place(path, &Some(*at)))]
    WrongType {
        path: String,
        at: Location,
        expected: &'static str,
        found: String,
    },

    /// A number written in a form that YAML 1.1 (PyYAML, mergekit) and YAML 1.2 read
    /// differently, or that mergekit configs never need (`010`, `1_000`, `0x10`, `1:30`).
    #[error("{}: '{text}' is ambiguous (YAML 1.1 and 1.2 read it differently); write a plain decimal number", place(path, &Some(*at)))]
    AmbiguousNumber {
        path: String,
        at: Location,
        text: String,
    },

    /// A required key is absent.
    #[error("{}: missing '{key}'", place(path, &Some(*at)))]
    MissingKey {
        path: String,
        key: &'static str,
        at: Location,
    },

    /// A `merge_method` that neither mergekit 0.1.5 nor mergestream has.
    #[error("{}: unknown merge method '{name}'; supported: {}", place(path, &Some(*at)), supported.join(", "))]
    UnknownMethod {
        path: String,
        at: Location,
        name: String,
        supported: Vec<&'static str>,
    },

    /// A mergekit method that mergestream does not implement.
    #[error("{}: merge method '{name}' (a mergekit method) is not supported by mergestream; supported: {}", place(path, &Some(*at)), supported.join(", "))]
    UnsupportedMethod {
        path: String,
        at: Location,
        name: String,
        supported: Vec<&'static str>,
    },

    /// A `slices:` config (layer ranges from several models).
    #[error("{at}: 'slices:' configs are not supported; list whole models under 'models:'")]
    Slices { at: Location },

    /// A `modules:` config (per-module merges of multi-module architectures).
    #[error("{at}: 'modules:' configs are not supported; list whole models under 'models:'")]
    Modules { at: Location },

    /// `tokenizer_source: union` (a vocabulary built from every model's).
    #[error("{}: tokenizer_source 'union' is not supported yet; use 'base' or one of the models", place(path, &Some(*at)))]
    UnionTokenizer { path: String, at: Location },

    /// mergekit's `tokenizer:` block (vocabulary surgery).
    #[error(
        "{at}: the 'tokenizer:' block is not supported; use 'tokenizer_source: base' or a model"
    )]
    TokenizerBlock { at: Location },

    /// A parameter the method does not take at all.
    #[error("{}: {method} takes no parameter '{name}'; it takes: {}", place(path, &Some(*at)), list_or_none(accepted))]
    UnknownParameter {
        path: String,
        at: Location,
        name: String,
        method: &'static str,
        accepted: Vec<&'static str>,
    },

    /// A method-level parameter given for one model (mergekit would silently ignore it).
    #[error("{}: '{name}' applies to the whole {method} merge, not to one model; set it under the top-level 'parameters:' (mergekit would silently ignore it here)", place(path, &Some(*at)))]
    ParameterNotPerModel {
        path: String,
        at: Location,
        name: &'static str,
        method: &'static str,
    },

    /// A parameter given to the base model that the method only reads for the other models
    /// (mergekit would silently ignore it).
    #[error("{}: {method} does not use the base model's '{name}' (only the other models'); remove it (mergekit would silently ignore it)", place(path, &Some(*at)))]
    ParameterOnBase {
        path: String,
        at: Location,
        name: &'static str,
        method: &'static str,
    },

    /// A parameter that must be one value for the whole merge was given filters or a gradient.
    #[error("{}: '{name}' of {method} must be a single value (no filters, no per-layer list)", place(path, &Some(*at)))]
    NotVarying {
        path: String,
        at: Location,
        name: &'static str,
        method: &'static str,
    },

    /// A required parameter is given nowhere for this model.
    #[error("{method} needs '{name}' for model '{model}': set {path}.parameters.{name} or a top-level parameters.{name}")]
    MissingParameter {
        method: &'static str,
        name: &'static str,
        model: String,
        /// Where the model is given (`models[1]`, or `base_model` when mergekit adds the base
        /// model as an input).
        path: String,
    },

    /// A required method-level parameter is absent.
    #[error("{at}: {method} needs parameters.{name}")]
    MissingGlobalParameter {
        method: &'static str,
        name: &'static str,
        at: Location,
    },

    /// The method needs a base model and none is given.
    #[error(
        "{at}: {method} needs a base_model (the model the others' differences are taken from)"
    )]
    MissingBaseModel { method: &'static str, at: Location },

    /// `tokenizer_source: base` without a `base_model` (mergekit would pick an arbitrary model).
    #[error("{at}: tokenizer_source 'base' needs a base_model; name the model whose tokenizer to use instead")]
    BaseTokenizerWithoutBase { at: Location },

    /// Too few or too many models for the method.
    #[error("{at}: {method} takes {expected}; the config gives {got} model{}", if *got == 1 { "" } else { "s" })]
    ModelCount {
        method: &'static str,
        expected: &'static str,
        got: usize,
        at: Location,
    },

    /// The same model is listed twice (by the same reference, or two references to one
    /// directory).
    #[error(
        "{}: model '{model}' is already given at {first}; list each model once",
        place(path, at)
    )]
    DuplicateModel {
        path: String,
        at: Option<Location>,
        model: String,
        first: String,
    },

    /// `model+lora` (mergekit merges the adapter into the model first).
    #[error("{}: '{written}' names a LoRA adapter; LoRA references are not supported, merge the adapter into the model first", place(path, at))]
    Lora {
        path: String,
        at: Option<Location>,
        written: String,
    },

    /// A model reference that is malformed.
    #[error("{}: '{written}': {problem}", place(path, at))]
    InvalidModelRef {
        path: String,
        at: Option<Location>,
        written: String,
        problem: RefProblem,
    },

    /// A model that is neither a local path nor in the local Hugging Face cache.
    #[error("{}: model '{written}' not found; looked in:\n{}{}", place(path, at), bullets(searched), download.as_ref().map(|d| format!("\nto download it: {d}")).unwrap_or_default())]
    ModelNotFound {
        path: String,
        at: Option<Location>,
        written: String,
        searched: Vec<Searched>,
        /// The command that fetches it into the cache, when it is a Hugging Face id.
        download: Option<String>,
    },

    /// A `dtype`/`out_dtype` name mergekit does not know.
    #[error("{}: unknown dtype '{found}'; use float32, bfloat16 or float16", place(path, &Some(*at)))]
    UnknownDtype {
        path: String,
        at: Location,
        found: String,
    },

    /// A dtype mergekit knows but mergestream does not compute in (`float64`, `int64`).
    #[error("{}: dtype '{found}' is not supported; use float32, bfloat16 or float16", place(path, &Some(*at)))]
    UnsupportedDtype {
        path: String,
        at: Location,
        found: String,
    },

    /// A `chat_template` that is neither a known name, `auto`, nor a Jinja template.
    #[error("{}: chat_template '{found}' is not a template; use auto, one of {}, or a Jinja template", place(path, &Some(*at)), super::config::CHAT_TEMPLATES.join(", "))]
    InvalidChatTemplate {
        path: String,
        at: Location,
        found: String,
    },

    /// A filter that contains `*` but is not exactly `*`: mergekit matches filters as plain
    /// substrings, so it can never match a tensor name.
    #[error("{}: filter '{filter}' can never match: filters are plain substrings of tensor names (only a filter of exactly '*' matches everything)", place(path, &Some(*at)))]
    FilterNeverMatches {
        path: String,
        at: Location,
        filter: String,
    },

    /// An empty list where values belong (mergekit reads it as "not set").
    #[error("{}: empty list", place(path, at))]
    EmptyList { path: String, at: Option<Location> },

    /// A number that must be finite (or a non-negative integer) is not.
    #[error("{}: {name} must be {expected}, not {value}", place(path, at))]
    OutOfRange {
        path: String,
        at: Option<Location>,
        name: &'static str,
        value: String,
        expected: &'static str,
    },

    /// A document `name:` that cannot name an output directory.
    #[error("{}: '{name}' cannot name an output: {problem}", place(path, at))]
    InvalidName {
        path: String,
        at: Option<Location>,
        name: String,
        problem: &'static str,
    },

    /// Two documents (or two alphas) give the same output name.
    #[error("{}: output name '{name}' is used twice", place(path, at))]
    DuplicateName {
        path: String,
        at: Option<Location>,
        name: String,
    },

    /// More than one document without a `name:`.
    #[error("{at}: only one document may be without a 'name:' (the first is at {first})")]
    MultipleUnnamed { at: Location, first: Location },

    /// Documents that use each other's outputs in a circle.
    #[error("documents depend on each other in a circle: {}", names.join(" -> "))]
    DependencyCycle { names: Vec<String> },

    /// At plan time: no setting of a required parameter applies to a tensor (a filter list
    /// without a catch-all, and no top-level value).
    #[error("{method}: no value of '{name}' applies to tensor '{tensor}'{} (set at {path}: add a rule without filter, or a top-level parameters.{name})", model.as_ref().map(|m| format!(" for model '{m}'")).unwrap_or_default())]
    Unresolved {
        method: &'static str,
        name: &'static str,
        model: Option<String>,
        tensor: String,
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
