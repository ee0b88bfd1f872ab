//! The merge spec front-end: mergekit configs and `expo` flags → `MergeSpec`.
//!
//! - `mergekit_resolution`: every parameter of every tensor, for configs covering filters,
//!   gradients, scopes and each method's defaults, agrees bit for bit with what mergekit 0.1.5's
//!   own planner resolved (`tests/data/mergekit_params.json`, written by
//!   `scripts/mergekit-params-fixture.py`).
//! - one test per way a config can be wrong, checking the error's variant, key path and line;
//! - multi-document configs, the Hugging Face cache, the example configs, `expo` flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergestream::spec::{
    alpha_name, expo_spec, gradient_t, parse_config, FloatDtype, HfCache, MergeSpec, Method,
    ModelLocation, Param, RefProblem, SearchOutcome, SpecError, TokenizerSource, Value,
};

/// A working directory with local models `base`, `m1`, `m2`, `m3` (empty directories: the
/// spec never opens them) and an empty HF cache.
struct Env {
    dir: tempfile::TempDir,
    hf: HfCache,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        for m in ["base", "m1", "m2", "m3"] {
            std::fs::create_dir(dir.path().join(m)).unwrap();
        }
        let hf = HfCache::at(dir.path().join("hf-cache"));
        Env { dir, hf }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn parse(&self, text: &str) -> Result<MergeSpec, SpecError> {
        parse_config(text, self.path(), &self.hf)
    }

    fn ok(&self, text: &str) -> MergeSpec {
        match self.parse(text) {
            Ok(spec) => spec,
            Err(e) => panic!("config refused: {e}\n{text}"),
        }
    }

    fn err(&self, text: &str) -> SpecError {
        match self.parse(text) {
            Ok(spec) => panic!("config accepted: {spec:?}\n{text}"),
            Err(e) => e,
        }
    }

    /// Adds `repo` to the HF cache at a fixed commit, laid out as huggingface_hub does it.
    fn add_hub_model(&self, repo: &str, commit: &str, refs: &[&str]) -> PathBuf {
        let folder = self
            .path()
            .join("hf-cache")
            .join(format!("models--{}", repo.replace('/', "--")));
        let snap = folder.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(folder.join("blobs")).unwrap();
        let blob = folder.join("blobs").join(format!("blob-{commit}"));
        std::fs::write(&blob, b"{\"num_hidden_layers\": 2}").unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/blob-{commit}"),
            snap.join("config.json"),
        )
        .unwrap();
        for r in refs {
            let path = folder.join("refs").join(r);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, commit).unwrap();
        }
        snap
    }
}

// ---------------------------------------------------------------------------------------------
// Agreement with mergekit's own resolution.

#[test]
fn mergekit_resolution() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/mergekit_params.json"),
    )
    .unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(fixture["mergekit"], "0.1.5");
    let env = Env::new();
    let mut checked = 0;
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let num_layers = case["num_layers"].as_u64().unwrap() as usize;
        let spec = env.ok(case["config"].as_str().unwrap());
        let out = &spec.outputs[0];
        let written: Vec<&str> = out
            .models
            .iter()
            .map(|m| m.model.written.as_str())
            .collect();
        for row in case["tensors"].as_array().unwrap() {
            let tensor = row["tensor"].as_str().unwrap();
            let layer = row["layer"].as_u64().map(|l| l as usize);
            let ctx = format!("{name}: {tensor}");
            // mergekit's input order and base model.
            let order: Vec<&str> = row["order"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(written, order, "{ctx}: input order");
            assert_eq!(
                out.base_model().map(|b| b.model.written.as_str()),
                row["base"].as_str(),
                "{ctx}: base"
            );
            let resolved = out
                .resolve(tensor, gradient_t(layer, num_layers))
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let ours = |m: &BTreeMap<Param, Value>| -> BTreeMap<String, Value> {
                m.iter()
                    .filter(|(p, _)| !out.method.param(**p).unwrap().ours)
                    .map(|(p, v)| (p.name().to_owned(), *v))
                    .collect()
            };
            check_values(
                &ours(&resolved.global),
                &row["global"],
                &format!("{ctx} (global)"),
            );
            for (model, params) in row["per_model"].as_object().unwrap() {
                let i = written.iter().position(|w| w == model).unwrap();
                check_values(
                    &ours(&resolved.per_model[i]),
                    params,
                    &format!("{ctx} ({model})"),
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 1500, "only {checked} model-tensor pairs checked");
}

/// `want` is mergekit's `{name: value}` (floats as Python `repr` strings).
fn check_values(got: &BTreeMap<String, Value>, want: &serde_json::Value, ctx: &str) {
    let want = want.as_object().unwrap();
    let names: Vec<&String> = got.keys().collect();
    let want_names: Vec<&String> = {
        let mut v: Vec<&String> = want.keys().collect();
        v.sort();
        v
    };
    assert_eq!(names, want_names, "{ctx}: parameter names");
    for (name, w) in want {
        let g = got[name];
        match w {
            serde_json::Value::Bool(b) => assert_eq!(g, Value::Bool(*b), "{ctx}: {name}"),
            serde_json::Value::String(s) => {
                let w: f64 = s.parse().unwrap();
                let g = g
                    .as_f64()
                    .unwrap_or_else(|| panic!("{ctx}: {name} is {g:?}"));
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{ctx}: {name}: {g:?} vs mergekit {s}"
                );
            }
            other => panic!("{ctx}: unexpected fixture value {other}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors, one per way a config can be wrong.

#[test]
fn yaml_syntax_error_has_a_line() {
    let err = Env::new()
        .err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1\n");
    let SpecError::Syntax { at, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(at.line >= 4, "{err}");
    assert!(
        err.to_string().starts_with("YAML syntax error at line"),
        "{err}"
    );
}

#[test]
fn unknown_method_lists_the_supported_ones() {
    let err = Env::new().err("merge_method: lienar\nmodels:\n  - model: m1\n");
    let SpecError::UnknownMethod {
        name,
        at,
        supported,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(name, "lienar");
    assert_eq!((at.line, at.column), (1, 15));
    assert!(supported.contains(&"linear") && supported.contains(&"expo"));
    assert!(
        err.to_string()
            .contains("supported: linear, task_arithmetic, expo"),
        "{err}"
    );
}

#[test]
fn mergekit_method_not_supported_here() {
    let err = Env::new().err("merge_method: passthrough\nmodels:\n  - model: m1\n");
    assert!(
        matches!(&err, SpecError::UnsupportedMethod { name, .. } if name == "passthrough"),
        "{err:?}"
    );
}

#[test]
fn unknown_key_at_top_and_inside() {
    let env = Env::new();
    let err = env.err("merge_method: linear\nmodel:\n  - model: m1\n");
    assert!(
        matches!(&err, SpecError::UnknownKey { path, key, at, allowed }
            if path.is_empty() && key == "model" && at.line == 2 && allowed.contains(&"models")),
        "{err:?}"
    );
    let err =
        env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameter:\n      weight: 1\n");
    assert!(
        matches!(&err, SpecError::UnknownKey { path, key, at, .. }
            if path == "models[0]" && key == "parameter" && at.line == 4),
        "{err:?}"
    );
    let err = env.err(
        "merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: [{filter: mlp, valeu: 1}]\n",
    );
    assert!(
        matches!(&err, SpecError::UnknownKey { path, key, .. }
            if path == "models[0].parameters.weight[0]" && key == "valeu"),
        "{err:?}"
    );
}

#[test]
fn missing_model_names_the_places_searched_and_the_download_command() {
    let env = Env::new();
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n  - model: org/missing@v2\n    parameters: {weight: 1}\n");
    let SpecError::ModelNotFound {
        path,
        at,
        written,
        searched,
        download,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(path, "models[1].model");
    assert_eq!(at.unwrap().line, 5);
    assert_eq!(written, "org/missing@v2");
    assert_eq!(searched[0].path, env.path().join("org/missing"));
    assert_eq!(searched[0].outcome, SearchOutcome::NoSuchPath);
    assert_eq!(
        searched[1].path,
        env.path().join("hf-cache/models--org--missing")
    );
    assert!(download
        .as_ref()
        .unwrap()
        .starts_with("hf download org/missing --revision v2"));
    let msg = err.to_string();
    assert!(
        msg.contains("hf-cache/models--org--missing") && msg.contains("hf download"),
        "{msg}"
    );
    // A path that cannot be a Hub id: only the local place, no download command.
    let err = env.err(
        "merge_method: linear\nmodels:\n  - model: ./nowhere/x/y\n    parameters: {weight: 1}\n",
    );
    assert!(
        matches!(&err, SpecError::ModelNotFound { searched, download: None, .. } if searched.len() == 1),
        "{err:?}"
    );
}

#[test]
fn weight_that_is_not_a_number() {
    let env = Env::new();
    let err = env.err(
        "merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: heavy\n",
    );
    assert!(
        matches!(&err, SpecError::WrongType { path, at, expected, .. }
            if path == "models[0].parameters.weight" && at.line == 5 && at.column == 15 && *expected == "a number"),
        "{err:?}"
    );
    // A quoted number is text (mergekit's pydantic would convert it; we ask for a number).
    let err = env.err(
        "merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: \"0.5\"\n",
    );
    assert!(matches!(&err, SpecError::WrongType { .. }), "{err:?}");
    assert!(err.to_string().contains("quoted text \"0.5\""), "{err}");
    // Inside a gradient and a rule too, with the element's path.
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: [0.1, true]\n");
    assert!(
        matches!(&err, SpecError::WrongType { path, .. } if path == "models[0].parameters.weight[1]"),
        "{err:?}"
    );
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: [{value: x}]\n");
    assert!(
        matches!(&err, SpecError::WrongType { path, .. } if path == "models[0].parameters.weight[0].value"),
        "{err:?}"
    );
    // And a boolean that is not one.
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\nparameters:\n  normalize: 1\n");
    assert!(
        matches!(&err, SpecError::WrongType { path, expected, .. } if path == "parameters.normalize" && *expected == "true or false"),
        "{err:?}"
    );
    let err =
        env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 010}\n");
    assert!(matches!(&err, SpecError::AmbiguousNumber { .. }), "{err:?}");
}

#[test]
fn missing_base_model() {
    let env = Env::new();
    for method in [
        "task_arithmetic",
        "ties",
        "slerp",
        "expo",
        "model_stock",
        "della",
    ] {
        let err = env.err(&format!(
            "merge_method: {method}\nmodels:\n  - model: m1\n    parameters: {{}}\n  - model: m2\n"
        ));
        assert!(
            matches!(&err, SpecError::MissingBaseModel { method: m, .. } if *m == method),
            "{method}: {err:?}"
        );
    }
    // linear needs none.
    env.ok("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n");
}

#[test]
fn slices_configs_are_refused() {
    let err = Env::new().err(
        "merge_method: linear\nslices:\n  - sources:\n      - model: m1\n        layer_range: [0, 4]\n",
    );
    assert!(
        matches!(&err, SpecError::Slices { at } if at.line == 2),
        "{err:?}"
    );
    let err = Env::new().err("merge_method: linear\nmodules:\n  text: {}\n");
    assert!(matches!(&err, SpecError::Modules { .. }), "{err:?}");
}

#[test]
fn union_tokenizer_and_tokenizer_block_are_refused() {
    let env = Env::new();
    let head = "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n";
    let err = env.err(&format!("{head}tokenizer_source: union\n"));
    assert!(
        matches!(&err, SpecError::UnionTokenizer { at, .. } if at.line == 5),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("'base' or one of the models"),
        "{err}"
    );
    let err = env.err(&format!("{head}tokenizer:\n  source: union\n"));
    assert!(matches!(&err, SpecError::TokenizerBlock { .. }), "{err:?}");
    let err = env.err(&format!("{head}tokenizer_source: base\n"));
    assert!(
        matches!(&err, SpecError::BaseTokenizerWithoutBase { .. }),
        "{err:?}"
    );
    let spec = env.ok(&format!("{head}base_model: m1\ntokenizer_source: base\n"));
    assert_eq!(spec.outputs[0].tokenizer_source, TokenizerSource::Base);
    let spec = env.ok(&format!("{head}tokenizer_source: m2\n"));
    assert!(matches!(
        &spec.outputs[0].tokenizer_source,
        TokenizerSource::Model(m) if m.written == "m2"
    ));
}

#[test]
fn parameter_the_method_does_not_take() {
    let env = Env::new();
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: 1\n      density: 0.5\n");
    let SpecError::UnknownParameter {
        path,
        name,
        method,
        accepted,
        at,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        (path.as_str(), name.as_str(), *method),
        ("models[0].parameters.density", "density", "linear")
    );
    assert_eq!(accepted, &vec!["weight", "normalize"]);
    assert_eq!(at.line, 6);
    // Top level too; slerp takes only t.
    let err = env.err("merge_method: slerp\nbase_model: base\nmodels:\n  - model: m1\nparameters:\n  t: 0.5\n  weight: 1\n");
    assert!(
        matches!(&err, SpecError::UnknownParameter { path, accepted, .. } if path == "parameters.weight" && accepted == &vec!["t"]),
        "{err:?}"
    );
    // A method-level parameter under one model (mergekit ignores it there).
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: 1\n      normalize: false\n");
    assert!(
        matches!(&err, SpecError::ParameterNotPerModel { path, name: "normalize", .. } if path == "models[0].parameters.normalize"),
        "{err:?}"
    );
    // A per-non-base parameter on the base model (mergekit ignores it).
    let err = env.err("merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n    parameters: {weight: 1}\n  - model: m1\n    parameters: {weight: 1}\n");
    assert!(
        matches!(&err, SpecError::ParameterOnBase { path, name: "weight", at, .. } if path == "models[0].parameters.weight" && at.line == 5),
        "{err:?}"
    );
    // seed is ours, only for the random methods, and one value.
    let err = env.err("merge_method: ties\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: 1}\nparameters: {seed: 3}\n");
    assert!(
        matches!(&err, SpecError::UnknownParameter { name, .. } if name == "seed"),
        "{err:?}"
    );
    let err = env.err("merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: 1}\nparameters: {seed: [1, 2]}\n");
    assert!(
        matches!(&err, SpecError::NotVarying { name: "seed", .. }),
        "{err:?}"
    );
    let err = env.err("merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: 1}\nparameters: {seed: -1}\n");
    assert!(
        matches!(&err, SpecError::OutOfRange { name: "seed", .. }),
        "{err:?}"
    );
}

#[test]
fn duplicate_keys() {
    let err = Env::new().err("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: 1\n      weight: 2\n");
    assert!(
        matches!(&err, SpecError::DuplicateKey { path, key, at, first }
            if path == "models[0].parameters" && key == "weight" && at.line == 6 && first.line == 5),
        "{err:?}"
    );
    let err = Env::new().err("merge_method: linear\nmerge_method: ties\nmodels: []\n");
    assert!(matches!(&err, SpecError::DuplicateKey { .. }), "{err:?}");
}

#[test]
fn models_given_twice() {
    let env = Env::new();
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n  - model: m1\n    parameters: {weight: 2}\n");
    assert!(
        matches!(&err, SpecError::DuplicateModel { path, first, .. } if path == "models[1].model" && first == "models[0]"),
        "{err:?}"
    );
    // Two spellings of one directory.
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n  - model: ./m2/../m1\n    parameters: {weight: 2}\n");
    assert!(matches!(&err, SpecError::DuplicateModel { .. }), "{err:?}");
}

#[test]
fn missing_required_parameters() {
    let env = Env::new();
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n  - model: m2\n");
    assert!(
        matches!(&err, SpecError::MissingParameter { name: "weight", model, path, .. } if model == "m2" && path == "models[1]"),
        "{err:?}"
    );
    // linear with a base model that is not listed: mergekit adds it as an input, with a weight.
    let err = env.err("merge_method: linear\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n");
    assert!(
        matches!(&err, SpecError::MissingParameter { path, .. } if path == "base_model"),
        "{err:?}"
    );
    // A top-level weight covers every model.
    let spec = env.ok("merge_method: linear\nbase_model: base\nmodels:\n  - model: m1\nparameters: {weight: 0.5}\n");
    assert_eq!(spec.outputs[0].models.len(), 2);
    let err = env.err("merge_method: slerp\nbase_model: base\nmodels:\n  - model: m1\n");
    assert!(
        matches!(&err, SpecError::MissingGlobalParameter { name: "t", .. }),
        "{err:?}"
    );
    // A filter list without catch-all is accepted, and fails at the tensor it does not cover.
    let spec = env.ok("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight: [{filter: mlp, value: 1}]\n");
    let err = spec.outputs[0]
        .resolve("model.layers.0.self_attn.q_proj.weight", 0.0)
        .unwrap_err();
    assert!(
        matches!(&err, SpecError::Unresolved { name: "weight", tensor, model: Some(m), .. }
            if tensor == "model.layers.0.self_attn.q_proj.weight" && m == "m1"),
        "{err:?}"
    );
    assert!(spec.outputs[0]
        .resolve("model.layers.0.mlp.up_proj.weight", 0.0)
        .is_ok());
}

#[test]
fn model_counts() {
    let env = Env::new();
    let err = env.err("merge_method: slerp\nbase_model: base\nmodels:\n  - model: m1\n  - model: m2\nparameters: {t: 0.5}\n");
    assert!(
        matches!(&err, SpecError::ModelCount { got: 3, .. }),
        "{err:?}"
    );
    let err = env.err("merge_method: model_stock\nbase_model: base\nmodels:\n  - model: m1\n");
    assert!(
        matches!(&err, SpecError::ModelCount { got: 2, .. }),
        "{err:?}"
    );
    let err = env.err("merge_method: linear\nmodels: []\n");
    assert!(matches!(&err, SpecError::EmptyList { .. }), "{err:?}");
}

#[test]
fn filters_with_stars_and_empty_lists() {
    let env = Env::new();
    let err = env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight:\n        - filter: mlp.*\n          value: 1\n");
    assert!(
        matches!(&err, SpecError::FilterNeverMatches { filter, path, .. } if filter == "mlp.*" && path == "models[0].parameters.weight[0].filter"),
        "{err:?}"
    );
    let spec = env.ok("merge_method: linear\nmodels:\n  - model: m1\n    parameters:\n      weight:\n        - filter: \"*\"\n          value: 1\n");
    assert!(spec.outputs[0].resolve("anything", 0.0).is_ok());
    let err =
        env.err("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: []}\n");
    assert!(matches!(&err, SpecError::EmptyList { .. }), "{err:?}");
}

#[test]
fn model_reference_forms() {
    let env = Env::new();
    let err =
        env.err("merge_method: linear\nmodels:\n  - model: m1+lora\n    parameters: {weight: 1}\n");
    assert!(matches!(&err, SpecError::Lora { .. }), "{err:?}");
    let err =
        env.err("merge_method: linear\nmodels:\n  - model: m1@a@b\n    parameters: {weight: 1}\n");
    assert!(
        matches!(
            &err,
            SpecError::InvalidModelRef {
                problem: RefProblem::SeveralRevisions,
                ..
            }
        ),
        "{err:?}"
    );
    let err =
        env.err("merge_method: linear\nmodels:\n  - model: m1@v1\n    parameters: {weight: 1}\n");
    assert!(
        matches!(
            &err,
            SpecError::InvalidModelRef {
                problem: RefProblem::RevisionOnLocalPath,
                ..
            }
        ),
        "{err:?}"
    );
    // mergekit's mapping form.
    let spec = env.ok("merge_method: linear\nmodels:\n  - model: {model: {path: m1, revision: null}, lora: null}\n    parameters: {weight: 1}\n");
    assert_eq!(
        spec.outputs[0].models[0].model.location,
        ModelLocation::Local(env.path().join("m1"))
    );
    let err = env.err("merge_method: linear\nmodels:\n  - model: {model: m1, lora: adapter}\n    parameters: {weight: 1}\n");
    assert!(matches!(&err, SpecError::Lora { .. }), "{err:?}");
    // Absolute paths stay absolute; relative ones are joined to the base directory.
    let abs = env.path().join("m2");
    let spec = env.ok(&format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1}}\n",
        abs.display()
    ));
    assert_eq!(spec.outputs[0].models[0].model.dir(), Some(abs.as_path()));
}

#[test]
fn dtypes_and_chat_templates() {
    let env = Env::new();
    let head = "merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n";
    let spec = env.ok(&format!(
        "{head}dtype: torch.bfloat16\nout_dtype: float16\n"
    ));
    assert_eq!(spec.outputs[0].dtype, Some(FloatDtype::BF16));
    assert_eq!(spec.outputs[0].out_dtype, Some(FloatDtype::F16));
    assert_eq!(
        env.ok(&format!("{head}dtype: float32\n")).outputs[0].dtype,
        Some(FloatDtype::F32)
    );
    assert_eq!(env.ok(head).outputs[0].dtype, None);
    let err = env.err(&format!("{head}dtype: bf16\n"));
    assert!(
        matches!(&err, SpecError::UnknownDtype { found, .. } if found == "bf16"),
        "{err:?}"
    );
    let err = env.err(&format!("{head}out_dtype: float64\n"));
    assert!(
        matches!(&err, SpecError::UnsupportedDtype { path, .. } if path == "out_dtype"),
        "{err:?}"
    );
    use mergestream::spec::ChatTemplate;
    let ct = |v: &str| {
        env.parse(&format!("{head}chat_template: {v}\n"))
            .map(|s| s.outputs[0].chat_template.clone())
    };
    assert_eq!(ct("auto").unwrap(), Some(ChatTemplate::Auto));
    assert_eq!(
        ct("chatml").unwrap(),
        Some(ChatTemplate::Named("chatml".into()))
    );
    assert!(matches!(
        ct("'{% for m in messages %}{{ m.content }}{% endfor %}'").unwrap(),
        Some(ChatTemplate::Template(_))
    ));
    assert!(matches!(
        ct("vicuna").unwrap_err(),
        SpecError::InvalidChatTemplate { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Accepted configs.

#[test]
fn defaults_and_scopes() {
    let env = Env::new();
    let spec = env.ok("merge_method: ties\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: 1, density: 0.3}\n  - model: m2\n    parameters: {weight: 0.5}\nparameters:\n  density: 0.7\n");
    let out = &spec.outputs[0];
    assert_eq!(
        out.base,
        Some(2),
        "the base model is appended after the models"
    );
    let r = out.resolve("model.norm.weight", 0.0).unwrap();
    assert_eq!(r.bool(Param::Normalize), Some(true));
    assert_eq!(r.bool(Param::Rescale), Some(false));
    assert_eq!(r.f64(Param::Lambda), Some(1.0));
    assert_eq!(r.model_f64(0, Param::Density), Some(0.3));
    assert_eq!(r.model_f64(1, Param::Density), Some(0.7));
    assert!(
        r.per_model[2].is_empty(),
        "the base takes no per-model parameters in ties"
    );
    assert_eq!(out.for_model(2, Param::Weight, "x", 0.0).unwrap(), None);
    // yes/no are PyYAML booleans.
    let spec = env.ok("merge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1e-3}\nparameters: {normalize: no}\n");
    let r = spec.outputs[0].resolve("x", 0.0).unwrap();
    assert_eq!(r.bool(Param::Normalize), Some(false));
    assert_eq!(r.model_f64(0, Param::Weight), Some(0.001));
    // The dare/della seed defaults to 0.
    let spec = env.ok("merge_method: della\nbase_model: base\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n");
    let r = spec.outputs[0].resolve("x", 0.0).unwrap();
    assert_eq!(r.global.get(&Param::Seed), Some(&Value::Int(0)));
}

#[test]
fn source_text_is_the_document_as_written() {
    let env = Env::new();
    let text = "# my merge\nmerge_method: linear   # comment kept\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n";
    assert_eq!(env.ok(text).outputs[0].source_text, text);
}

#[test]
fn multi_document_configs() {
    let env = Env::new();
    let text = "name: stage-b\nmerge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: stage-a\n    parameters: {weight: 0.5}\n---\nname: stage-a\nmerge_method: linear\nmodels:\n  - model: m1\n    parameters: {weight: 1}\n  - model: m2\n    parameters: {weight: 1}\n---\nmerge_method: linear\nmodels:\n  - model: stage-b\n    parameters: {weight: 1}\n  - model: m3\n    parameters: {weight: 1}\n";
    let spec = env.ok(text);
    assert_eq!(spec.outputs.len(), 3);
    assert_eq!(spec.outputs[0].name.as_deref(), Some("stage-b"));
    assert_eq!(spec.outputs[2].name, None);
    assert_eq!(
        spec.outputs[0].models[0].model.location,
        ModelLocation::Output {
            index: 1,
            name: "stage-a".into()
        }
    );
    assert_eq!(
        spec.outputs[0]
            .dependencies()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(spec.run_order(), vec![1, 0, 2]);
    // Each document's own text, without the `---` that separated it: what a config holding
    // that document alone would say.
    assert!(spec.outputs[1].source_text.starts_with("name: stage-a\n"));

    // A circle.
    let err = env.err("name: a\nmerge_method: linear\nmodels:\n  - model: b\n    parameters: {weight: 1}\n---\nname: b\nmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n");
    assert!(
        matches!(&err, SpecError::DependencyCycle { names } if names == &["a", "b", "a"]),
        "{err:?}"
    );
    // A document using itself.
    let err = env
        .err("name: a\nmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n");
    assert!(matches!(&err, SpecError::DependencyCycle { .. }), "{err:?}");
    // Names: unique, at most one missing, usable as directory names.
    let doc = |name: &str| {
        format!(
            "{name}merge_method: linear\nmodels:\n  - model: m1\n    parameters: {{weight: 1}}\n"
        )
    };
    let err = env.err(&format!("{}---\n{}", doc("name: x\n"), doc("name: x\n")));
    assert!(
        matches!(&err, SpecError::DuplicateName { name, .. } if name == "x"),
        "{err:?}"
    );
    let err = env.err(&format!("{}---\n{}", doc(""), doc("")));
    assert!(matches!(&err, SpecError::MultipleUnnamed { .. }), "{err:?}");
    let err = env.err(&doc("name: ../escape\n"));
    assert!(matches!(&err, SpecError::InvalidName { .. }), "{err:?}");
    // A name shadows a local directory of the same name (as in mergekit-multimerge).
    let spec = env.ok(&format!("{}---\nname: m2\nmerge_method: linear\nmodels:\n  - model: m3\n    parameters: {{weight: 1}}\n", doc("name: x\n").replace("m1", "m2")));
    assert!(matches!(
        spec.outputs[0].models[0].model.location,
        ModelLocation::Output { index: 1, .. }
    ));
    // Empty documents (a trailing '---') are skipped; an empty config is an error.
    assert_eq!(env.ok(&format!("{}---\n", doc(""))).outputs.len(), 1);
    assert!(matches!(env.err("# nothing\n"), SpecError::Empty));
}

#[test]
fn hugging_face_ids_resolve_from_the_cache() {
    let env = Env::new();
    let main = "0123456789abcdef0123456789abcdef01234567";
    let older = "89abcdef0123456789abcdef0123456789abcdef";
    let snap_main = env.add_hub_model("org/name", main, &["main"]);
    let snap_old = env.add_hub_model("org/name", older, &["v1"]);
    let spec = env.ok("merge_method: task_arithmetic\nbase_model: org/name@v1\nmodels:\n  - model: org/name\n    parameters: {weight: 1}\n");
    let out = &spec.outputs[0];
    assert_eq!(
        out.models[0].model.location,
        ModelLocation::Hub {
            repo: "org/name".into(),
            revision: None,
            commit: main.into(),
            dir: snap_main
        }
    );
    assert_eq!(
        out.base_model().unwrap().model.dir(),
        Some(snap_old.as_path())
    );
    // A commit hash as the revision.
    let spec = env.ok(&format!("merge_method: linear\nmodels:\n  - model: org/name@{older}\n    parameters: {{weight: 1}}\n"));
    assert!(
        matches!(&spec.outputs[0].models[0].model.location, ModelLocation::Hub { commit, .. } if commit == older)
    );
    // A revision the cache does not have.
    let err = env.err(
        "merge_method: linear\nmodels:\n  - model: org/name@v9\n    parameters: {weight: 1}\n",
    );
    let SpecError::ModelNotFound {
        searched, download, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        searched[1].outcome,
        SearchOutcome::NoRef {
            revision: "v9".into()
        }
    );
    assert!(download.as_ref().unwrap().contains("--revision v9"));
    // A local directory wins over the cache, as in mergekit.
    std::fs::create_dir_all(env.path().join("org/name")).unwrap();
    let spec =
        env.ok("merge_method: linear\nmodels:\n  - model: org/name\n    parameters: {weight: 1}\n");
    assert!(matches!(
        spec.outputs[0].models[0].model.location,
        ModelLocation::Local(_)
    ));
}

// ---------------------------------------------------------------------------------------------
// Example configs and the expo flags.

const EXAMPLE_REPOS: &[&str] = &[
    "mistralai/Mistral-7B-v0.1",
    "teknium/OpenHermes-2.5-Mistral-7B",
    "HuggingFaceH4/zephyr-7b-beta",
    "meta-math/MetaMath-Mistral-7B",
    "openchat/openchat_3.5",
    "berkeley-nest/Starling-LM-7B-alpha",
];

#[test]
fn example_configs_parse() {
    let env = Env::new();
    for (i, repo) in EXAMPLE_REPOS.iter().enumerate() {
        env.add_hub_model(repo, &format!("{i:040x}"), &["main"]);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/configs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let spec = parse_config(&text, env.path(), &env.hf)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        for out in &spec.outputs {
            // Every tensor of a 32-layer Llama-shaped model resolves.
            for tensor in [
                "model.embed_tokens.weight",
                "model.layers.7.self_attn.q_proj.weight",
                "model.layers.31.mlp.down_proj.weight",
                "lm_head.weight",
            ] {
                let layer = mergestream::spec::layer_index(tensor);
                out.resolve(tensor, gradient_t(layer, 32))
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        seen.push((name, spec));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let get = |n: &str| &seen.iter().find(|(name, _)| name == n).unwrap().1;
    let sweep = get("expo-sweep");
    assert_eq!(sweep.outputs.len(), 5);
    for (k, out) in sweep.outputs.iter().enumerate() {
        let alpha = [0.1f32, 0.2, 0.3, 0.4, 0.5][k];
        assert_eq!(out.expo_alpha, Some(alpha));
        assert_eq!(out.name.as_deref(), Some(alpha_name(alpha).as_str()));
    }
    assert_eq!(get("two-stage").run_order(), vec![0, 1]);
    let slerp = &get("slerp").outputs[0];
    let t = |tensor: &str, layer| {
        slerp
            .global(Param::T, tensor, gradient_t(Some(layer), 32))
            .unwrap()
    };
    assert_eq!(
        t("model.layers.0.self_attn.o_proj.weight", 0),
        Value::Float(0.0)
    );
    assert_eq!(
        t("model.layers.31.mlp.up_proj.weight", 31),
        Value::Float(0.0)
    );
    assert_eq!(
        t("model.layers.31.input_layernorm.weight", 31),
        Value::Float(0.5)
    );
    assert!(seen.len() >= 8, "{}", seen.len());
}

#[test]
fn expo_flags_become_the_same_spec_as_the_expo_document() {
    let env = Env::new();
    let flags = expo_spec("base", "m1", &[0.3], env.path(), &env.hf).unwrap();
    let yaml = env.ok(
        "merge_method: expo\nbase_model: base\nmodels:\n  - model: m1\nparameters:\n  alpha: 0.3\n",
    );
    let (a, b) = (&flags.outputs[0], &yaml.outputs[0]);
    assert_eq!(a.name, None);
    assert_eq!((a.method, b.method), (Method::Expo, Method::Expo));
    assert_eq!(a.expo_alpha, Some(0.3f32));
    assert_eq!(b.expo_alpha, Some(0.3f32));
    assert_eq!(a.models.len(), 2);
    assert_eq!(a.models[0].model.location, b.models[0].model.location);
    assert_eq!(
        a.base_model().unwrap().model.location,
        b.base_model().unwrap().model.location
    );
    // The generated document reads back to the same spec.
    let again = env.ok(&a.source_text);
    assert_eq!(again.outputs[0].expo_alpha, a.expo_alpha);
    assert_eq!(
        again.outputs[0].models[0].model.location,
        a.models[0].model.location
    );
    // Listing the SFT model under models too is the same merge.
    let listed = env.ok("merge_method: expo\nbase_model: base\nmodels:\n  - model: base\n  - model: m1\nparameters:\n  alpha: 0.3\n");
    assert_eq!(listed.outputs[0].models.len(), 2);
    // Errors.
    let err = env.err("merge_method: expo\nbase_model: base\nmodels:\n  - model: m1\nparameters:\n  alpha: [0.1, 0.2]\n");
    assert!(
        matches!(&err, SpecError::NotVarying { name: "alpha", .. }),
        "{err:?}"
    );
    let err = env.err("merge_method: expo\nbase_model: base\nmodels:\n  - model: m1\n  - model: m2\nparameters:\n  alpha: 0.1\n");
    assert!(matches!(&err, SpecError::ModelCount { .. }), "{err:?}");
    let err = env.err("merge_method: expo\nbase_model: base\nmodels:\n  - model: m1\n");
    assert!(
        matches!(
            &err,
            SpecError::MissingGlobalParameter { name: "alpha", .. }
        ),
        "{err:?}"
    );
    let err = env.err("merge_method: expo\nbase_model: base\nmodels:\n  - model: m1\nparameters:\n  alpha: 1e39\n");
    assert!(
        matches!(&err, SpecError::OutOfRange { name: "alpha", .. }),
        "{err:?}"
    );
}

#[test]
fn expo_sweep_from_flags() {
    let env = Env::new();
    let spec = expo_spec("base", "m1", &[0.1, 0.2, 0.3], env.path(), &env.hf).unwrap();
    let names: Vec<_> = spec
        .outputs
        .iter()
        .map(|o| o.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["alpha-0.1", "alpha-0.2", "alpha-0.3"]);
    // Each output's document is the multi-document form of the same sweep.
    let joined = spec
        .outputs
        .iter()
        .map(|o| o.source_text.as_str())
        .collect::<Vec<_>>()
        .join("---\n");
    let again = env.ok(&joined);
    assert_eq!(
        again
            .outputs
            .iter()
            .map(|o| (o.name.clone(), o.expo_alpha))
            .collect::<Vec<_>>(),
        spec.outputs
            .iter()
            .map(|o| (o.name.clone(), o.expo_alpha))
            .collect::<Vec<_>>()
    );
    let err = expo_spec("base", "m1", &[0.1, 0.1], env.path(), &env.hf).unwrap_err();
    assert!(
        matches!(&err, SpecError::DuplicateName { name, .. } if name == "alpha-0.1"),
        "{err:?}"
    );
    let err = expo_spec("base", "./base", &[0.1], env.path(), &env.hf).unwrap_err();
    assert!(matches!(&err, SpecError::DuplicateModel { .. }), "{err:?}");
    let err = expo_spec("base", "m1", &[], env.path(), &env.hf).unwrap_err();
    assert!(matches!(&err, SpecError::EmptyList { .. }), "{err:?}");
    let err = expo_spec("base", "m1", &[f32::NAN], env.path(), &env.hf).unwrap_err();
    assert!(matches!(&err, SpecError::OutOfRange { .. }), "{err:?}");
    let err = expo_spec("base", "nope/nothing", &[0.1], env.path(), &env.hf).unwrap_err();
    assert!(
        matches!(&err, SpecError::ModelNotFound { path, at: None, .. } if path == "--aligned"),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Robustness: no input makes the reader panic.

const SEED_CONFIG: &str = "name: a\nmerge_method: ties\nbase_model: base\nmodels:\n  - model: m1\n    parameters:\n      weight: [0.1, 0.9]\n      density:\n        - filter: mlp\n          value: 0.5\n        - value: [0.2, 0.3]\n  - model: {model: {path: m2, revision: null}}\n    parameters: {weight: &w 0.5}\nparameters:\n  lambda: *w\n  normalize: yes\ndtype: bfloat16\ntokenizer_source: base\nchat_template: chatml\n---\nname: b\nmerge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n";

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(400))]

    #[test]
    fn edited_configs_never_panic(
        edits in proptest::collection::vec(
            (0usize..SEED_CONFIG.len(), 0usize..4, "[-:{}\\[\\],#&*!|>'\" \n0-9a-z.@+/~]{0,4}"),
            1..6,
        )
    ) {
        let env = Env::new();
        let mut text = SEED_CONFIG.to_owned();
        for (at, del, ins) in edits {
            let at = (0..=at.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
            let end = (at + del).min(text.len());
            let end = (end..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
            text.replace_range(at..end, &ins);
        }
        let result = env.parse(&text);
        if let Ok(spec) = &result {
            for out in &spec.outputs {
                let _ = out.resolve("model.layers.1.mlp.up_proj.weight", 0.5);
            }
            let _ = spec.run_order();
        }
        if let Err(e) = &result {
            let _ = e.to_string();
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[-:{}\\[\\],#&*!|>'\" \n\t0-9a-z.@+/~%]{0,200}") {
        let env = Env::new();
        let _ = env.parse(&text).map_err(|e| e.to_string());
    }
}

#[test]
fn the_seed_of_the_robustness_tests_is_a_valid_config() {
    let spec = Env::new().ok(SEED_CONFIG);
    assert_eq!(spec.run_order(), vec![0, 1]);
    let r = spec.outputs[0]
        .resolve("model.layers.0.mlp.up_proj.weight", 0.0)
        .unwrap();
    assert_eq!(r.f64(Param::Lambda), Some(0.5), "the alias is read");
}

/// The methods table of `docs/configs.md`, rendered from the method table the reader uses.
fn methods_table() -> String {
    use mergestream::spec::{BaseRule, ParamDefault, Scope};
    let mut out = String::from(
        "| method | base model | inputs (base included) | method-level parameters | per-model parameters |\n|---|---|---|---|---|\n",
    );
    for m in Method::ALL {
        let spec = m.spec();
        let fmt = |scopes: &[Scope]| {
            let items: Vec<String> = m
                .params()
                .iter()
                .filter(|p| scopes.contains(&p.scope))
                .map(|p| {
                    let default = match p.default {
                        ParamDefault::Required => "required".to_owned(),
                        ParamDefault::Float(v) => v.to_string(),
                        ParamDefault::Bool(v) => v.to_string(),
                        ParamDefault::Int(v) => v.to_string(),
                    };
                    let base = if p.scope == Scope::PerNonBase {
                        ", not the base"
                    } else {
                        ""
                    };
                    let ours = if p.ours { ", ours" } else { "" };
                    format!("`{}` ({default}{base}{ours})", p.param)
                })
                .collect();
            if items.is_empty() {
                "—".to_owned()
            } else {
                items.join(", ")
            }
        };
        let inputs = match spec.max_inputs {
            Some(max) if max == spec.min_inputs => format!("exactly {max}"),
            Some(max) => format!("{}–{max}", spec.min_inputs),
            None => format!("≥ {}", spec.min_inputs),
        };
        out.push_str(&format!(
            "| `{}`{} | {} | {inputs} | {} | {} |\n",
            m.name(),
            if spec.ours { " (ours)" } else { "" },
            match spec.base {
                BaseRule::Optional => "optional",
                BaseRule::Required => "required",
            },
            fmt(&[Scope::Global]),
            fmt(&[Scope::PerModel, Scope::PerNonBase]),
        ));
    }
    out
}

#[test]
fn docs_list_every_method_and_parameter() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configs.md"))
            .unwrap();
    let table = methods_table();
    assert!(
        doc.contains(&table),
        "docs/configs.md must contain the methods table exactly as the code defines it:\n{table}"
    );
}
