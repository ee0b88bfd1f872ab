//! PyTorch checkpoints as models, through the binary: `.bin` pairs written by real `torch.save`
//! (`tests/fixtures/torch/pairs/`, made by `tests/python/make_torch_fixtures.py` together with
//! their safetensors twins: the same tensors, in the same order, written by
//! `safetensors.torch.save_file`) merge exactly as the twins do — single and sharded, BF16, F16
//! and F32, with `expo` and with a `merge` config — and the `.bin` merges also match the
//! independent ExPO reference element by element. A directory holding both formats is read as
//! safetensors, and says so; `inspect` lists a PyTorch model; the plan fingerprint and the
//! unchanged-input check see PyTorch shards; a malicious pickle given as a model is refused
//! (exit 2, naming the file and what it would import) and its payload never runs.
//!
//! What "the same output" means here: every output file is byte-identical, except where the
//! output records its inputs' file names and sizes — the `mergestream.<role>` file lists (and a
//! config's text, which names the model paths) in each shard header's `__metadata__`, and
//! `inputs` (and `config`) in `mergestream.json`. Those differ because the inputs' files do
//! (`pytorch_model.bin`, 22 985 bytes, against `model.safetensors`, 17 568 bytes). Each shard's
//! tensor table and data section are compared byte for byte, and the rest of its header too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mergestream::model::{Format, Model};
use mergestream::Error;

use crate::common::*;

fn pairs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/pairs")
}

/// `pairs/<case>/<format>`, a directory holding `sft/` and `aligned/`.
fn pair(case: &str, format: &str) -> PathBuf {
    pairs().join(case).join(format)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A safetensors file split into its header's tensor entries, its metadata and its data section.
struct Parsed {
    tensors: serde_json::Map<String, serde_json::Value>,
    metadata: BTreeMap<String, String>,
    data: Vec<u8>,
}

fn parse_safetensors(path: &Path) -> Parsed {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let metadata = header
        .remove("__metadata__")
        .map(|m| serde_json::from_value(m).unwrap())
        .unwrap_or_default();
    Parsed {
        tensors: header,
        metadata,
        data: bytes[8 + n..].to_vec(),
    }
}

/// Whether a metadata value is a list of input files (`[{"name": …, "size": …}, …]`).
fn is_file_list(value: &str) -> bool {
    serde_json::from_str::<Vec<serde_json::Value>>(value).is_ok_and(|files| {
        !files.is_empty()
            && files
                .iter()
                .all(|f| f["name"].is_string() && f["size"].is_u64())
    })
}

/// Panics unless the outputs `a` and `b` are the same but for what names their inputs (see the
/// module's comment); returns how many shards were compared.
fn assert_same_output(a: &Path, b: &Path) -> usize {
    let names = |d: &Path| tree_digest(d).into_keys().collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "file names");
    let (da, db) = (tree_digest(a), tree_digest(b));
    let mut shards = 0;
    for name in names(a) {
        let (pa, pb) = (a.join(&name), b.join(&name));
        if name.ends_with(".safetensors") {
            let (x, y) = (parse_safetensors(&pa), parse_safetensors(&pb));
            assert_eq!(x.tensors, y.tensors, "{name}: tensor tables");
            assert!(x.data == y.data, "{name}: data sections differ");
            assert_eq!(
                x.metadata.keys().collect::<Vec<_>>(),
                y.metadata.keys().collect::<Vec<_>>(),
                "{name}: metadata keys"
            );
            for (key, va) in &x.metadata {
                let vb = &y.metadata[key];
                if va != vb {
                    assert!(
                        key == "mergestream.config" || (is_file_list(va) && is_file_list(vb)),
                        "{name}: metadata '{key}' differs: {va} vs {vb}"
                    );
                }
            }
            shards += 1;
        } else if name == "mergestream.json" {
            let strip = |p: &Path| {
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                let o = v.as_object_mut().unwrap();
                let roles: Vec<String> = o["inputs"].as_object().unwrap().keys().cloned().collect();
                o.remove("inputs");
                o.remove("config");
                (v, roles)
            };
            assert_eq!(strip(&pa), strip(&pb), "{name}");
        } else if !["checksums.b3", "README.md", "mergekit_config.yml"].contains(&name.as_str()) {
            // The index, config.json, …: the same bytes. (The model card names the inputs as
            // they were given, so it differs, as do the config and the manifest.)
            assert_eq!(da[&name], db[&name], "{name} differs");
        }
    }
    assert!(shards > 0, "no shards in {}", a.display());
    for out in [a, b] {
        run_ok(&["verify", s(out)]);
    }
    shards
}

/// `expo` of `pair` (holding sft/ and aligned/) into `out`, with `extra` options.
fn expo_ok(sft: &Path, aligned: &Path, out: &Path, alpha: &str, extra: &[&str]) {
    let mut args = vec![
        "expo",
        "--sft",
        s(sft),
        "--aligned",
        s(aligned),
        "--alpha",
        alpha,
        "--out",
        s(out),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    run_ok(&args);
}

#[test]
fn bin_pairs_merge_like_their_safetensors_twins() {
    let tmp = tempdir();
    // (case, extra options): the f16 output sharded too, so the index is compared.
    for (case, extra) in [
        ("bf16", &[][..]),
        ("f16", &["--max-shard-size", "4KB"][..]),
        ("f32", &[][..]),
    ] {
        let (bin, st) = (pair(case, "bin"), pair(case, "st"));
        let (out_bin, out_st) = (
            tmp.path().join(format!("{case}-bin")),
            tmp.path().join(format!("{case}-st")),
        );
        expo_ok(
            &bin.join("sft"),
            &bin.join("aligned"),
            &out_bin,
            "0.3",
            extra,
        );
        expo_ok(&st.join("sft"), &st.join("aligned"), &out_st, "0.3", extra);
        let shards = assert_same_output(&out_bin, &out_st);
        if case == "f16" {
            assert!(shards > 1, "f16: one output shard");
        }
        // And against the independent reference, from the safetensors twins.
        let n = assert_matches_reference(&st, &out_bin, 0.3);
        assert!(n >= 21, "{case}: {n} tensors");
        // Nothing of the .bin inputs is copied: outputs are safetensors.
        assert!(
            !tree_digest(&out_bin)
                .keys()
                .any(|f| f.ends_with(".bin") || f.starts_with("pytorch_model")),
            "{case}: a PyTorch file in the output"
        );
        assert!(
            out_bin.join("config.json").exists(),
            "{case}: config.json not copied"
        );
    }
}

/// One input of each format, and single `.bin` files named directly.
#[test]
fn mixed_formats_and_single_bin_files() {
    let tmp = tempdir();
    let (bin, st) = (pair("f16", "bin"), pair("f16", "st"));
    let (mixed, plain) = (tmp.path().join("mixed"), tmp.path().join("plain"));
    expo_ok(&bin.join("sft"), &st.join("aligned"), &mixed, "0.5", &[]);
    expo_ok(&st.join("sft"), &st.join("aligned"), &plain, "0.5", &[]);
    assert_same_output(&mixed, &plain);

    let (bin, st) = (pair("bf16", "bin"), pair("bf16", "st"));
    let (files_bin, files_st) = (tmp.path().join("files-bin"), tmp.path().join("files-st"));
    let file = |d: &Path, role: &str, name: &str| d.join(role).join(name);
    expo_ok(
        &file(&bin, "sft", "pytorch_model.bin"),
        &file(&bin, "aligned", "pytorch_model.bin"),
        &files_bin,
        "0.2",
        &[],
    );
    expo_ok(
        &file(&st, "sft", "model.safetensors"),
        &file(&st, "aligned", "model.safetensors"),
        &files_st,
        "0.2",
        &[],
    );
    assert_same_output(&files_bin, &files_st);
    assert_matches_reference(&st, &files_bin, 0.2);
}

#[test]
fn merge_config_on_bin_inputs_matches_safetensors() {
    let tmp = tempdir();
    let mut outs = Vec::new();
    for format in ["bin", "st"] {
        let p = pair("f32", format);
        let config = tmp.path().join(format!("{format}.yml"));
        std::fs::write(
            &config,
            format!(
                "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: 1.3\n",
                s(&p.join("sft")),
                s(&p.join("aligned"))
            ),
        )
        .unwrap();
        let out = tmp.path().join(format!("merge-{format}"));
        run_ok(&["merge", s(&config), "--out", s(&out), "--quiet"]);
        outs.push(out);
    }
    assert_same_output(&outs[0], &outs[1]);
}

/// Builds a directory holding the safetensors weights of `st` and the PyTorch weights of
/// `bin` (different models), by symbolic links.
fn both_formats(dir: &Path, st: &Path, bin: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for src in [st, bin] {
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let link = dir.join(e.file_name());
            if !link.exists() {
                std::os::unix::fs::symlink(e.path(), link).unwrap();
            }
        }
    }
}

#[test]
fn safetensors_wins_in_a_directory_with_both() {
    let tmp = tempdir();
    // The aligned model's safetensors beside the SFT model's PyTorch weights: if the .bin were
    // read, the merge would be of the SFT model with itself.
    let (bin, st) = (pair("f16", "bin"), pair("f16", "st"));
    let both = tmp.path().join("both");
    both_formats(&both, &st.join("aligned"), &bin.join("sft"));

    let model = Model::open(&both).unwrap();
    assert_eq!(model.format, Format::Safetensors);
    assert_eq!(model.unread, ["pytorch_model.bin.index.json"]);
    assert!(model
        .shards
        .iter()
        .all(|s| s.name.ends_with(".safetensors")));

    let (got, want) = (tmp.path().join("got"), tmp.path().join("want"));
    expo_ok(&st.join("sft"), &both, &got, "0.3", &[]);
    expo_ok(&st.join("sft"), &st.join("aligned"), &want, "0.3", &[]);
    assert_same_output(&got, &want);
    // Neither the .bin shards nor their index are copied.
    assert!(!tree_digest(&got)
        .keys()
        .any(|f| f.contains("pytorch_model")));

    let note = "also holds pytorch_model.bin.index.json, not read (safetensors wins";
    let plan = run_ok(&[
        "plan",
        "--sft",
        s(&st.join("sft")),
        "--aligned",
        s(&both),
        "--alpha",
        "0.3",
    ]);
    let plan = String::from_utf8(plan.stdout).unwrap();
    assert!(plan.contains(note), "{plan}");
    let inspect = String::from_utf8(run_ok(&["inspect", s(&both)]).stdout).unwrap();
    assert!(inspect.contains(note), "{inspect}");
    assert!(inspect.contains("(safetensors)"), "{inspect}");
    let json = run_ok(&["inspect", "--json", s(&both)]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["format"], "safetensors");
    assert_eq!(
        json["unread"],
        serde_json::json!(["pytorch_model.bin.index.json"])
    );
}

#[test]
fn inspect_lists_a_torch_models_tensors() {
    for case in ["bf16", "f16"] {
        let (bin, st) = (pair(case, "bin").join("sft"), pair(case, "st").join("sft"));
        let listing = |p: &Path| {
            let out = run_ok(&["inspect", "--json", s(p)]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v
        };
        let (b, t) = (listing(&bin), listing(&st));
        assert_eq!(b["format"], "pytorch");
        assert_eq!(b["tensor_count"], t["tensor_count"]);
        assert_eq!(b["total_bytes"], t["total_bytes"]);
        // The same tensors, in the same order, with shard names of their own format.
        let strip = |v: &serde_json::Value| {
            v["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["name"].clone(),
                        t["dtype"].clone(),
                        t["shape"].clone(),
                        t["bytes"].clone(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&b), strip(&t), "{case}");
        for t in b["tensors"].as_array().unwrap() {
            assert!(
                t["shard"].as_str().unwrap().starts_with("pytorch_model"),
                "{t}"
            );
        }
        let text = String::from_utf8(run_ok(&["inspect", s(&bin)]).stdout).unwrap();
        for t in b["tensors"].as_array().unwrap() {
            assert!(text.contains(t["name"].as_str().unwrap()), "{text}");
        }
        assert!(text.contains("(pytorch)"), "{text}");
    }
}

/// The plan fingerprint covers PyTorch shards: the same inputs give the same one, and a changed
/// tensor byte (data the reader does not checksum) gives another.
#[test]
fn plan_fingerprint_sees_torch_shards() {
    let tmp = tempdir();
    let bin = pair("bf16", "bin");
    let copy = tmp.path().join("aligned");
    std::fs::create_dir(&copy).unwrap();
    for f in ["pytorch_model.bin", "config.json"] {
        std::fs::copy(bin.join("aligned").join(f), copy.join(f)).unwrap();
    }
    let fingerprint = |aligned: &Path| {
        let out = run_ok(&[
            "plan",
            "--sft",
            s(&bin.join("sft")),
            "--aligned",
            s(aligned),
            "--alpha",
            "0.3",
        ]);
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("plan fingerprint: "))
            .unwrap_or_else(|| panic!("no fingerprint in:\n{text}"))
            .to_owned()
    };
    let before = fingerprint(&copy);
    // (The same path: the output's model card names the inputs as given, so the plan covers it.)
    assert_eq!(before, fingerprint(&copy));
    // One byte of lm_head's data, at the offset the reader reports.
    let model = Model::open(&copy).unwrap();
    let (loc, t) = model.get("lm_head.weight").unwrap();
    let at = model.shards[loc.shard].file_offset(t.start).unwrap();
    drop(model);
    let path = copy.join("pytorch_model.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[at as usize] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert!(
        Model::open(&copy).is_ok(),
        "tensor data is not checksummed by the reader"
    );
    assert_ne!(before, fingerprint(&copy));
}

/// A PyTorch shard that changes after it was opened is reported, as a safetensors one is.
#[test]
fn a_changed_torch_shard_is_detected() {
    let tmp = tempdir();
    let path = tmp.path().join("pytorch_model.bin");
    std::fs::copy(pair("f32", "bin").join("aligned/pytorch_model.bin"), &path).unwrap();
    let model = Model::open(&path).unwrap();
    assert_eq!(model.format, Format::Torch);
    model.check_unchanged().unwrap();
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.set_len(1000).unwrap();
    assert!(matches!(
        model.check_unchanged(),
        Err(Error::InputChanged { path: p, .. }) if *p == path
    ));
}

/// The malicious fixtures (made by torch.save, each running a payload under `torch.load`):
/// (file stem, what the error names).
const MALICIOUS: [(&str, &str); 7] = [
    ("os-system", "'os.system'"),
    ("posix-system", "'posix.system'"),
    ("builtin-eval", "'__builtin__.eval'"),
    ("builtins-eval-protocol4", "'builtins.eval'"),
    ("subprocess", "'subprocess.call'"),
    ("hidden-in-tensor", "'posix.system'"),
    ("inst-opcode", "(INST)"),
];

/// Each malicious checkpoint given as a model — as a model directory's `pytorch_model.bin` and
/// as a file — is refused by `expo`, `plan` and `inspect` with exit 2, naming the file and the
/// global; its payload (which would create `mergestream-pwned-<case>` in the working
/// directory, where the binary runs) never runs, and nothing is written.
#[test]
fn malicious_pickles_given_as_models_are_refused_and_never_run() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/malicious");
    let good = pair("bf16", "bin").join("sft");
    for (case, global) in MALICIOUS {
        let work = tempdir();
        let dir = work.path().join("model");
        std::fs::create_dir(&dir).unwrap();
        let in_dir = dir.join("pytorch_model.bin");
        std::fs::copy(fixtures.join(format!("{case}.bin")), &in_dir).unwrap();
        let as_file = work.path().join(format!("{case}.bin"));
        std::fs::copy(&in_dir, &as_file).unwrap();
        let out = work.path().join("out");
        for (model, named) in [(&dir, &in_dir), (&as_file, &as_file)] {
            for args in [
                vec![
                    "expo",
                    "--sft",
                    s(&good),
                    "--aligned",
                    s(model),
                    "--alpha",
                    "0.3",
                    "--out",
                    s(&out),
                ],
                vec![
                    "expo",
                    "--sft",
                    s(model),
                    "--aligned",
                    s(&good),
                    "--alpha",
                    "0.3",
                    "--out",
                    s(&out),
                ],
                vec![
                    "plan",
                    "--sft",
                    s(&good),
                    "--aligned",
                    s(model),
                    "--alpha",
                    "0.3",
                ],
                vec!["inspect", s(model)],
            ] {
                let r = Command::new(bin())
                    .args(&args)
                    .current_dir(work.path())
                    .output()
                    .unwrap();
                let err = stderr(&r);
                assert_eq!(r.status.code(), Some(2), "{case} {args:?}: {err}");
                assert!(
                    err.contains(s(named)),
                    "{case}: the file is not named:\n{err}"
                );
                assert!(
                    err.contains(global),
                    "{case}: {global} is not named:\n{err}"
                );
                assert!(r.stdout.is_empty(), "{case} {args:?}: printed a result");
                assert!(!out.exists(), "{case} {args:?}: created the output");
            }
        }
        let pwned = format!("mergestream-pwned-{case}");
        for place in [work.path(), &dir] {
            assert!(!place.join(&pwned).exists(), "{case}: the payload ran");
        }
        let left: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{case}: unexpected files {left:?}");
    }
}

/// Pickles made to use as much memory as the reader allows (each within `MAX_PICKLE_LEN`, and
/// refused once what it builds passes `MAX_HELD_BYTES`): reading each, from opening the file to
/// the refusal, allocates at most `MEMORY_RESERVE` (32 MiB) at any one time, counted by the
/// test binary's allocator; so does the real checkpoint of 2 000 tensors. The binary refuses each
/// with exit 2, naming the file.
#[test]
fn hostile_pickles_stay_within_the_memory_reserve() {
    use crate::alloc::peak_during;
    use crate::torch_bin::build::{checkpoint, Pickle};
    use mergestream::format::pickle::{MAX_HELD_BYTES, MAX_PICKLE_LEN};
    use mergestream::format::torch;
    let room = MAX_PICKLE_LEN as usize - 64;
    // Short strings in tuples of 60 000.
    let mut strings = Pickle::new();
    while strings.0.len() + 60_000 * 9 + 2 < room {
        strings = (0..60_000)
            .fold(strings.op(b"("), |p, _| p.str("abcd"))
            .op(b"t");
    }
    // Memo entries, one per 5-byte LONG_BINPUT.
    let mut memo = Pickle::new().op(b"N");
    for i in 0..(room / 5 - 2) as u32 {
        memo = memo.op(&[&[b'r'][..], &i.to_le_bytes()].concat());
    }
    // Dict entries, two bytes each, by SETITEMS of 30 000 pairs.
    let mut dict = Pickle::new().op(b"}");
    while dict.0.len() + 60_002 < room {
        dict = dict.op(b"(").op(&[b'N'; 60_000]).op(b"u");
    }
    // Tuples of one item, each in the memo and in a dict.
    let mut tuples = Pickle::new().op(b"}");
    for i in 0..(room / 9 - 2) as u32 {
        tuples = tuples.op(&[&[b'N', b'N', 0x85, b'r'][..], &i.to_le_bytes(), b"s"].concat());
    }
    // Long strings: the whole pickle copied into strings.
    let mut long = Pickle::new().op(b"(");
    while long.0.len() + (1 << 20) + 8 < room {
        long = long.str(&"x".repeat(1 << 20));
    }
    let tmp = tempdir();
    let mut files = Vec::new();
    for (name, pkl) in [
        ("strings", strings.op(b".").0),
        ("memo", memo.op(b".").0),
        ("dict", dict.op(b".").0),
        ("tuples", tuples.op(b".").0),
        ("long-strings", long.op(b"t.").0),
    ] {
        assert!(
            pkl.len() as u64 <= MAX_PICKLE_LEN,
            "{name}: {} bytes",
            pkl.len()
        );
        let file = tmp.path().join(format!("{name}.bin"));
        std::fs::write(&file, checkpoint(&pkl, &[])).unwrap();
        files.push((name, file, false));
    }
    let many =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/many/pytorch_model.bin");
    files.push(("many (real, 2 000 tensors)", many, true));
    for (name, file, valid) in files {
        let (result, peak) = peak_during(|| {
            let f = std::fs::File::open(&file).unwrap();
            let len = f.metadata().unwrap().len();
            torch::read(&file, &f, len)
        });
        eprintln!("{name}: peak {} KiB allocated while reading", peak >> 10);
        assert_eq!(result.is_ok(), valid, "{name}: {:?}", result.err());
        assert!(
            peak <= mergestream::MEMORY_RESERVE,
            "{name}: {} KiB allocated at once",
            peak >> 10
        );
        if let Err(e) = result {
            // The ones that reach the byte budget say so.
            let msg = e.to_string();
            assert!(
                name == "long-strings" || msg.contains(&format!("{} MiB", MAX_HELD_BYTES >> 20)),
                "{name}: {msg}"
            );
            let r = run(&["inspect", s(&file)]);
            assert_eq!(r.status.code(), Some(2), "{name}");
            assert_eq!(stderr(&r), format!("mergestream: error: {msg}\n"));
        }
    }
}
