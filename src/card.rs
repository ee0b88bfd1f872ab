//! The output's own model card: `README.md` with Hugging Face front matter, written by
//! mergestream for every output (the inputs' cards describe other models and are never copied).
//!
//! [`Card::new`] builds the card at plan time from the recipe and the input models' names: the
//! front matter (`base_model:` the inputs, as the user named them or as their Hugging Face ids
//! where those are known, with `base_model_relation: merge` for the Hub's model tree;
//! `tags: [merge, mergestream, <method>]`; `library_name` when the layout
//! model is a `transformers` or `sentence-transformers` model), the method and its formula with
//! its parameters, the canonical command (or config document) that makes the same bytes again,
//! the tool's version, the notes the plan made and how to verify the directory. It depends only
//! on what decides the output's bytes — never on `--out`, `--threads`, `--part` or whether the
//! output was written alone or in a sweep — so the card of a sweep's `alpha-0.2/` is the same
//! bytes as the single run's. The SHA-256 of the input files (`--hash-inputs`) is known only
//! after the run has read them, so the card is kept as the text around that section and
//! [`Card::render`] puts it in when `finalize` writes the file. This module reads no tensor
//! data and writes no file.

use serde::{Deserialize, Serialize};

use crate::lineage::InputHashes;
use crate::method::{Method, Note, Recipe};
use crate::model::Model;
use crate::spec::{self, ModelLocation};
use crate::units::ByteSize;

/// The model card's file name in an output directory.
pub const CARD_FILE: &str = "README.md";
/// The merge config of a config merge, as mergekit stores it in its outputs.
pub const CONFIG_FILE: &str = "mergekit_config.yml";

/// A model card, as the text before and after its input-checksums section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    /// Front matter, title, method, inputs, the command and the notes.
    pub head: String,
    /// How to verify the directory.
    pub tail: String,
}

/// What a card is made from besides the recipe and the models.
#[derive(Debug, Clone, Copy)]
pub struct CardOptions<'a> {
    /// `--max-shard-size` (part of the command when it is not the default).
    pub max_shard_size: u64,
    /// Whether the run records the inputs' SHA-256 (`--hash-inputs`).
    pub hash_inputs: bool,
    /// What the plan resolved on its own.
    pub notes: &'a [Note],
    /// Files of the layout model not copied, with why.
    pub skipped_files: &'a [(String, &'static str)],
}

/// One input as the card names it.
struct Named {
    /// Its role in the method (`sft`, `aligned`, `models[0]`, `base_model`).
    role: String,
    /// As the user wrote it (a path, or a Hub id in a config).
    written: String,
    /// Its Hugging Face id when known (a Hub reference, or a path into the Hub cache).
    hub: Option<String>,
    /// How a command names it: as written, or `org/name@<commit>` for a snapshot of the Hub
    /// cache (which `expo` looks up there, on any machine, at exactly that revision).
    word: String,
}

impl Card {
    /// The card of the output `recipe` makes from `models`.
    pub fn new(recipe: &Recipe, models: &[Model], options: &CardOptions) -> Card {
        let inputs = named_inputs(recipe, models);
        let layout = &models[recipe.layout_model()];
        let mut head = front_matter(&inputs, recipe.method.name(), library_name(layout));
        head.push('\n');
        head.push_str(&title(recipe));
        head.push_str(&format!(
            "\nMade with {} by merging the models below: no training, every tensor computed from the \
             inputs' tensors. This card was written by mergestream; the input models' own cards \
             describe other models.\n",
            crate::plan::TOOL
        ));
        head.push_str("\n## Method\n\n");
        head.push_str(&method_text(recipe));
        head.push_str("\n| role | model |\n|---|---|\n");
        for i in &inputs {
            let hub = match &i.hub {
                Some(id) if *id != i.written => format!(" (Hugging Face: {})", code(id)),
                _ => String::new(),
            };
            head.push_str(&format!(
                "| {} | {}{hub} |\n",
                cell(&i.role),
                cell(&code(&i.written))
            ));
        }
        head.push_str("\n## Reproduce\n\n");
        head.push_str(&reproduce_text(recipe, &inputs, options));
        let notes: Vec<String> = options
            .notes
            .iter()
            .map(|n| format!("- {}", inline(&n.to_string())))
            .chain(options.skipped_files.iter().map(|(name, why)| {
                format!(
                    "- {} of {} not copied: {}",
                    code(name),
                    code(&layout.path.display().to_string()),
                    inline(why)
                )
            }))
            .collect();
        if !notes.is_empty() {
            head.push_str("\n## Notes\n\n");
            for n in notes {
                head.push_str(&n);
                head.push('\n');
            }
        }
        let mut tail = String::from("\n## Verify\n\n");
        tail.push_str(&format!(
            "Every file of this directory is listed with its BLAKE3 in `{}`:\n\n",
            crate::plan::MANIFEST_FILE
        ));
        tail.push_str(&format!(
            "```sh\nb3sum --check {}          # in this directory\nmergestream verify .                # the hashes, every shard's header and the index\n",
            crate::plan::MANIFEST_FILE
        ));
        if options.hash_inputs {
            let given: Vec<String> = inputs.iter().map(|i| shell_word(&i.word)).collect();
            tail.push_str(&format!(
                "mergestream verify . --inputs {}   # the inputs' SHA-256, file by file\n",
                given.join(" ")
            ));
        }
        tail.push_str("```\n");
        Card { head, tail }
    }

    /// The card's text; `lineage` (the inputs' SHA-256, when the run recorded them) goes
    /// between the notes and how to verify.
    pub fn render(&self, lineage: Option<&[InputHashes]>) -> String {
        let mut text = self.head.clone();
        if let Some(inputs) = lineage {
            text.push_str("\n## Input checksums\n\n");
            text.push_str(
                "SHA-256 of every input weight file, as the Hugging Face Hub shows it (the file's \
                 LFS object id, \"SHA256\" on the file's page):\n\n| role | file | bytes | SHA-256 |\n|---|---|---|---|\n",
            );
            for input in inputs {
                for f in &input.files {
                    text.push_str(&format!(
                        "| {} | {} | {} | `{}` |\n",
                        cell(&input.role),
                        cell(&code(&f.name)),
                        f.size,
                        f.sha256
                    ));
                }
            }
        }
        text.push_str(&self.tail);
        text
    }
}

/// The text of `mergekit_config.yml` for a config merge: the document as written.
pub fn config_file(recipe: &Recipe) -> Option<String> {
    match &recipe.method {
        Method::Config(c) => {
            let mut text = c.spec.source_text.clone();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            Some(text)
        }
        Method::Expo { .. } => None,
    }
}

/// The recipe's inputs, in the method's order of roles.
fn named_inputs(recipe: &Recipe, models: &[Model]) -> Vec<Named> {
    match &recipe.method {
        Method::Expo { .. } => recipe
            .method
            .roles()
            .into_iter()
            .zip(&recipe.models)
            .map(|(role, &m)| {
                let written = models[m].path.display().to_string();
                let snapshot = hub_snapshot_of_path(&models[m].path);
                Named {
                    role,
                    word: snapshot
                        .as_ref()
                        .map_or_else(|| written.clone(), |(id, commit)| format!("{id}@{commit}")),
                    hub: snapshot.map(|(id, _)| id),
                    written,
                }
            })
            .collect(),
        Method::Config(c) => c
            .spec
            .models
            .iter()
            .map(|entry| Named {
                role: entry.path.clone(),
                word: entry.model.written.clone(),
                written: entry.model.written.clone(),
                hub: match &entry.model.location {
                    ModelLocation::Hub { repo, .. } => Some(repo.clone()),
                    ModelLocation::Local(p) => hub_snapshot_of_path(p).map(|(id, _)| id),
                    ModelLocation::Output { .. } => None,
                },
            })
            .collect(),
    }
}

/// Each input of `recipe` as `(role, the model as the user named it)`, in the method's order of
/// roles.
pub fn input_names(recipe: &Recipe, models: &[Model]) -> Vec<(String, String)> {
    named_inputs(recipe, models)
        .into_iter()
        .map(|n| (n.role, n.written))
        .collect()
}

/// The Hugging Face id and commit of a model in the Hub cache, from its path
/// (`…/models--org--name/snapshots/<commit>` → `("org/name", "<commit>")`), as given or after
/// resolving links.
pub fn hub_snapshot_of_path(path: &std::path::Path) -> Option<(String, String)> {
    let from = |p: &std::path::Path| -> Option<(String, String)> {
        let parts: Vec<&std::ffi::OsStr> = p.iter().collect();
        // The snapshot directory itself: the last three components.
        let w = parts.get(parts.len().checked_sub(3)?..)?;
        let folder = w[0].to_str()?.strip_prefix("models--")?;
        let commit = w[2].to_str()?;
        (w[1] == "snapshots" && spec::is_commit_hash(commit)).then_some(())?;
        let id = folder.replacen("--", "/", 1);
        spec::is_repo_id(&id).then(|| (id, commit.to_owned()))
    };
    from(path).or_else(|| std::fs::canonicalize(path).ok().and_then(|p| from(&p)))
}

/// `library_name` of the layout model: `sentence-transformers` for a sentence-transformers
/// folder, `transformers` when its `config.json` is a transformers config (has a `model_type`).
fn library_name(layout: &Model) -> Option<&'static str> {
    if !layout.path.is_dir() {
        return None;
    }
    let dir = &layout.dir;
    if dir.join("modules.json").is_file() || dir.join("config_sentence_transformers.json").is_file()
    {
        return Some("sentence-transformers");
    }
    let config = std::fs::read(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_slice(&config).ok()?;
    config
        .get("model_type")
        .and_then(serde_json::Value::as_str)
        .map(|_| "transformers")
}

fn front_matter(inputs: &[Named], method: &str, library: Option<&str>) -> String {
    let mut text = String::from("---\nbase_model:\n");
    let mut seen = Vec::new();
    for i in inputs {
        let name = i.hub.as_deref().unwrap_or(&i.written);
        if !seen.contains(&name) {
            seen.push(name);
            text.push_str(&format!("- {}\n", yaml_scalar(name)));
        }
    }
    text.push_str("base_model_relation: merge\n");
    if let Some(library) = library {
        text.push_str(&format!("library_name: {library}\n"));
    }
    text.push_str("tags:\n- merge\n- mergestream\n");
    text.push_str(&format!("- {}\n", yaml_scalar(method)));
    text.push_str("---\n");
    text
}

fn title(recipe: &Recipe) -> String {
    match &recipe.method {
        Method::Expo { alpha } => format!("# ExPO merge, alpha {alpha}\n"),
        Method::Config(c) => match &c.spec.name {
            Some(name) => format!(
                "# {} merge: {}\n",
                display_name(c.spec.method),
                inline(name)
            ),
            None => format!("# {} merge\n", display_name(c.spec.method)),
        },
    }
}

fn display_name(method: spec::Method) -> &'static str {
    use spec::Method as M;
    match method {
        M::Linear => "Linear",
        M::TaskArithmetic => "Task arithmetic",
        M::Expo => "ExPO",
        M::Ties => "TIES",
        M::DareLinear => "DARE (linear)",
        M::DareTies => "DARE-TIES",
        M::Slerp => "SLERP",
        M::ModelStock => "Model Stock",
        M::Breadcrumbs => "Model Breadcrumbs",
        M::BreadcrumbsTies => "Model Breadcrumbs with TIES",
        M::Della => "DELLA",
        M::DellaLinear => "DELLA (linear)",
    }
}

/// What a config method computes, in a sentence and a formula.
fn formula(method: spec::Method) -> &'static str {
    use spec::Method as M;
    match method {
        M::Linear => "a weighted average: `sum_i w_i * m_i`, divided by `sum_i w_i` when `normalize` (the default)",
        M::TaskArithmetic => "`base + lambda * sum_i w_i * (m_i - base)`: the task vectors added to the base model",
        M::Expo => "`aligned + alpha * (aligned - sft)`: extrapolation from the SFT model (the base model) through the aligned one",
        M::Ties => "each task vector `m_i - base` trimmed to its largest `density` fraction by magnitude, a sign elected per element, the agreeing values combined with their weights and added to the base model",
        M::DareLinear => "each task vector `m_i - base` with elements dropped at random (kept with probability `density`) and rescaled, combined with their weights and added to the base model",
        M::DareTies => "DARE's random drop and rescale of each task vector, then TIES' sign election, combined with their weights and added to the base model",
        M::Slerp => "spherical linear interpolation between the base model and the other model at `t`",
        M::ModelStock => "the average of the fine-tuned models moved toward the base model by a ratio computed from the angles between their task vectors",
        M::Breadcrumbs => "each task vector with its largest (`gamma`) and smallest magnitudes dropped, combined with their weights and added to the base model",
        M::BreadcrumbsTies => "Model Breadcrumbs' magnitude drop, then TIES' sign election, combined with their weights and added to the base model",
        M::Della => "each task vector with elements dropped at random with probabilities ranked by magnitude (`density`, `epsilon`) and rescaled, then TIES' sign election, combined and added to the base model",
        M::DellaLinear => "DELLA's magnitude-ranked random drop and rescale of each task vector, combined with their weights and added to the base model",
    }
}

fn method_text(recipe: &Recipe) -> String {
    match &recipe.method {
        Method::Expo { alpha } => format!(
            "ExPO (*Weak-to-Strong Extrapolation Expedites Alignment*): for every tensor\n\n\
             ```\noutput = aligned + alpha * (aligned - sft)        alpha = {alpha}\n```\n\n\
             computed in IEEE f32 as three separately rounded operations (`d = aligned - sft; \
             t = alpha * d; output = aligned + t`) and rounded to nearest even to the aligned \
             model's dtype; a NaN result is the dtype's canonical quiet NaN.\n"
        ),
        Method::Config(c) => format!(
            "{} (mergekit's `{}`, with mergekit's arithmetic): {}. The parameters are those of \
             the config below.\n",
            display_name(c.spec.method),
            c.spec.method.name(),
            formula(c.spec.method)
        ),
    }
}

fn reproduce_text(recipe: &Recipe, inputs: &[Named], options: &CardOptions) -> String {
    let mut flags = Vec::new();
    if options.max_shard_size != crate::DEFAULT_MAX_SHARD_SIZE {
        flags.push(format!(
            "--max-shard-size {}",
            ByteSize(options.max_shard_size)
        ));
    }
    if options.hash_inputs {
        flags.push("--hash-inputs".into());
    }
    let policy = recipe.policy;
    let mut text = String::new();
    match &recipe.method {
        Method::Expo { alpha } => {
            let model = |i: usize| shell_word(&inputs[i].word);
            let mut words = vec![
                "mergestream expo --sft".to_string(),
                model(0),
                "--aligned".into(),
                model(1),
                format!("--alpha {alpha}"),
            ];
            if policy.copy_only_in_layout {
                words.push("--only-in-aligned copy".into());
            }
            if policy.copy_extra_rows {
                words.push("--vocab-mismatch copy-aligned".into());
            }
            words.extend(flags);
            words.push("--out OUT".into());
            text.push_str(&format!("```sh\n{}\n```\n", words.join(" ")));
        }
        Method::Config(c) => {
            let doc = config_file(recipe).unwrap_or_default();
            let fence = fence_for(&doc);
            text.push_str(&format!(
                "The merge config (also in `{CONFIG_FILE}`):\n\n{fence}yaml\n{doc}{fence}\n\n"
            ));
            let mut words = vec![format!("mergestream merge {CONFIG_FILE}")];
            if policy.copy_only_in_layout {
                words.push("--only-in-base copy".into());
            }
            words.extend(flags);
            words.push("--out OUT".into());
            text.push_str(&format!("```sh\n{}\n```\n", words.join(" ")));
            let reads: Vec<&str> = c
                .spec
                .models
                .iter()
                .filter_map(|m| match &m.model.location {
                    ModelLocation::Output { name, .. } => Some(name.as_str()),
                    _ => None,
                })
                .collect();
            if !reads.is_empty() {
                text.push_str(&format!(
                    "\nThis document reads the output of {} from the same multi-document config: \
                     run that config to make it again.\n",
                    reads.iter().map(|n| code(n)).collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    text.push_str(&format!(
        "\n`OUT` is any new directory. Options that do not change the output's bytes (`--threads`, \
         `--memory`, `--part`, `--io`, …) are left out: the same inputs and these options give \
         the same bytes on any machine ({}).\n",
        crate::plan::TOOL
    ));
    text
}

/// `s` as one shell word: as it is when it needs no quoting, else in single quotes.
pub fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'-' | b'.' | b'/' | b':' | b'@' | b'+' | b',' | b'=' | b'%'
                )
        });
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `s` as a YAML scalar: plain when YAML reads it back as this very string, else double-quoted
/// (JSON's escapes are YAML's).
pub fn yaml_scalar(s: &str) -> String {
    let first_ok = s
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || matches!(b, b'_' | b'.' | b'/'));
    let rest_ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
    // Words YAML 1.1 (PyYAML) or 1.2 read as booleans, nulls or numbers.
    let special = matches!(
        s.to_ascii_lowercase().as_str(),
        "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null" | ".inf" | ".nan"
    );
    // `.5` and `._1` are floats to YAML 1.1.
    let float_like = s.starts_with('.')
        && s[1..]
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_digit() || b == b'_');
    if first_ok && rest_ok && !special && !float_like {
        s.to_owned()
    } else {
        serde_json::to_string(s).expect("strings serialize")
    }
}

/// `s` as a Markdown code span.
fn code(s: &str) -> String {
    let longest = longest_run(s, '`');
    let ticks = "`".repeat(longest + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{ticks}{pad}{s}{pad}{ticks}")
}

/// A code fence longer than any run of backticks in `text`.
fn fence_for(text: &str) -> String {
    "`".repeat(longest_run(text, '`').max(2) + 1)
}

fn longest_run(s: &str, c: char) -> usize {
    let (mut best, mut run) = (0, 0);
    for ch in s.chars() {
        run = if ch == c { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

/// `s` on one line of Markdown.
fn inline(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `s` in a Markdown table cell.
fn cell(s: &str) -> String {
    inline(s).replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;
    use saphyr_parser::{Event, Parser};

    /// The scalars of a YAML text, as a YAML parser reads them (text, whether written plain).
    fn scalars(text: &str) -> Vec<(String, bool)> {
        Parser::new_from_str(text)
            .filter_map(|e| match e.expect("valid YAML").0 {
                Event::Scalar(v, style, ..) => {
                    Some((v.to_string(), style == saphyr_parser::ScalarStyle::Plain))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn yaml_scalars_read_back_as_written() {
        for s in [
            "org/name",
            "./models/sft",
            "/abs/path with space",
            "yes",
            "No",
            "1.5",
            "2_Dense",
            "a: b",
            "#x",
            "- x",
            "\"quoted\"",
            "tab\there",
            "ends:",
            "",
            "~",
            "null",
            "é",
            ".5",
            "._",
            ".inf",
            "..",
        ] {
            let rendered = yaml_scalar(s);
            let read = scalars(&format!("- {rendered}\n"));
            assert_eq!(read.len(), 1, "{s:?} -> {rendered}");
            assert_eq!(read[0].0, s, "{s:?} -> {rendered}");
            // A plain scalar here must be one that is a string in YAML 1.1 and 1.2 alike.
            if read[0].1 {
                assert!(!s.is_empty() && !s.starts_with(|c: char| c.is_ascii_digit()));
            }
        }
        assert_eq!(yaml_scalar("org/name"), "org/name");
        assert_eq!(yaml_scalar("yes"), "\"yes\"");
    }

    #[test]
    fn shell_words_quote_what_the_shell_would_split() {
        assert_eq!(shell_word("pair/sft"), "pair/sft");
        assert_eq!(shell_word("my model"), "'my model'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("$HOME"), "'$HOME'");
    }

    #[test]
    fn hub_ids_from_cache_paths() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let of = |p: &str| hub_snapshot_of_path(std::path::Path::new(p));
        let p = format!("/c/hub/models--openchat--openchat_3.5/snapshots/{commit}");
        assert_eq!(
            of(&p),
            Some(("openchat/openchat_3.5".into(), commit.into()))
        );
        let p = format!("/c/hub/models--gpt2/snapshots/{commit}/");
        assert_eq!(of(&p), Some(("gpt2".into(), commit.into())));
        for not in [
            "/c/hub/models--a--b/snapshots/main".to_string(),
            format!("/c/hub/datasets--a--b/snapshots/{commit}"),
            format!("/c/hub/models--a--b/snapshots/{commit}/sub"),
            "./pair/sft".into(),
        ] {
            assert_eq!(of(&not), None, "{not}");
        }
    }

    #[test]
    fn code_spans_and_fences_hold_backticks() {
        assert_eq!(code("a"), "`a`");
        assert_eq!(code("a`b"), "``a`b``");
        assert_eq!(code("`a"), "`` `a ``");
        assert_eq!(fence_for("x ``` y"), "````");
        assert_eq!(fence_for("plain"), "```");
    }
}
