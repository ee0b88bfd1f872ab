//! `--hash-inputs`: the SHA-256 of every input weight file in provenance and the card, checked
//! against coreutils' `sha256sum`; outputs byte-identical whether written whole, in parts (part 0
//! hashes), resumed or in a sweep; and `verify OUT --inputs …` / `--config …` re-hashing the
//! inputs, reporting each file and every difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::card::assert_same_deep_tree;
use crate::common::*;

const SHARD: [&str; 2] = ["--max-shard-size", "60KB"];

fn pair(dir: &Path) -> PathBuf {
    let pair = dir.join("pair");
    synth(
        &pair,
        &[
            "--preset",
            "tiny-llama",
            "--seed",
            "9",
            "--sft-shards",
            "3",
            "--aligned-shards",
            "2",
        ],
    );
    pair
}

/// `sha256sum FILE`, by coreutils: the reference.
fn sha256sum(path: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(o.status.success());
    String::from_utf8(o.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The weight files of a synth model, by name.
fn weight_files(model: &Path) -> BTreeMap<String, PathBuf> {
    std::fs::read_dir(model)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect()
}

fn provenance(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("mergestream.json")).unwrap()).unwrap()
}

#[test]
fn provenance_and_card_record_every_input_files_sha256() {
    let dir = tempdir();
    let pair = pair(dir.path());
    let out = dir.path().join("out");
    let o = expo(&pair, &out, "0.3", &[SHARD[0], SHARD[1], "--hash-inputs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let recorded = &provenance(&out)["input_sha256"];
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let roles: Vec<&str> = recorded
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["sft", "aligned"]);
    for (k, role) in ["sft", "aligned"].iter().enumerate() {
        let entry = &recorded[k];
        assert_eq!(entry["model"], format!("{}/{role}", pair.display()));
        let files = weight_files(&pair.join(role));
        let listed: Vec<&str> = entry["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(listed, files.keys().map(String::as_str).collect::<Vec<_>>());
        for f in entry["files"].as_array().unwrap() {
            let path = &files[f["name"].as_str().unwrap()];
            let want = sha256sum(path);
            assert_eq!(f["sha256"], want.as_str(), "{}", path.display());
            assert_eq!(f["size"], std::fs::metadata(path).unwrap().len());
            assert!(
                card.contains(&format!("| {role} | `{}` |", f["name"].as_str().unwrap()))
                    && card.contains(&format!("`{want}`")),
                "the card lacks {role}'s {}",
                f["name"]
            );
        }
    }
    assert!(card.contains("--hash-inputs --out OUT"), "{card}");
    // Without the flag, nothing is hashed or recorded.
    let plain = dir.path().join("plain");
    let o = expo(&pair, &plain, "0.3", &SHARD);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(provenance(&plain).get("input_sha256").is_none());
    assert!(!std::fs::read_to_string(plain.join("README.md"))
        .unwrap()
        .contains("SHA-256"));
}

#[test]
fn hashed_outputs_are_the_same_bytes_whole_in_parts_resumed_and_in_a_sweep() {
    let dir = tempdir();
    let pair = pair(dir.path());
    let hashed = |extra: &[&str]| {
        let mut args = vec![SHARD[0], SHARD[1], "--hash-inputs"];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let go = |out: &Path, alpha: &str, extra: &[&str]| {
        let args = hashed(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = expo(&pair, out, alpha, &args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let single = dir.path().join("single");
    go(&single, "0.3", &["--threads", "1"]);

    // Parts in any order; only part 0 hashes (its record holds the hashes), finalize writes them.
    let parts = dir.path().join("parts");
    for part in ["2/3", "1/3"] {
        go(&parts, "0.3", &["--part", part]);
    }
    let record = |i: u32| -> serde_json::Value {
        let path = parts.join(format!(".mergestream/part-{i}-of-3.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    assert!(record(1).get("input_sha256").is_none());
    let o = run(&["finalize", parts.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "finalize without part 0");
    go(&parts, "0.3", &["--part", "0/3", "--threads", "3"]);
    assert!(record(0).get("input_sha256").is_some());
    // A resumed part 0 (everything kept) hashes again and finishes the same.
    go(&parts, "0.3", &["--part", "0/3", "--resume"]);
    run_ok(&["finalize", parts.to_str().unwrap(), "--quiet"]);
    assert_same_deep_tree(&single, &parts);

    let sweep = dir.path().join("sweep");
    go(&sweep, "0.1,0.3", &["--chunk-size", "4KiB"]);
    assert_same_deep_tree(&single, &sweep.join("alpha-0.3"));
    let other = provenance(&sweep.join("alpha-0.1"));
    assert_eq!(other["input_sha256"], provenance(&single)["input_sha256"]);

    // A part run without the flag belongs to another plan: finalize refuses to mix them.
    let mixed = dir.path().join("mixed");
    go(&mixed, "0.3", &["--part", "0/2"]);
    let o = expo(&pair, &mixed, "0.3", &[SHARD[0], SHARD[1], "--part", "1/2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["finalize", mixed.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("different inputs or options"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn verify_inputs_rehashes_each_file_and_reports_every_difference() {
    let dir = tempdir();
    let pair = pair(dir.path());
    let out = dir.path().join("out");
    let o = expo(&pair, &out, "0.3", &["--hash-inputs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (sft, aligned) = (pair.join("sft"), pair.join("aligned"));
    let out_s = out.to_str().unwrap();

    let o = run_ok(&[
        "verify",
        out_s,
        "--inputs",
        sft.to_str().unwrap(),
        aligned.to_str().unwrap(),
    ]);
    let report = String::from_utf8(o.stdout).unwrap();
    for (role, model) in [("sft", &sft), ("aligned", &aligned)] {
        for (name, path) in weight_files(model) {
            let line = format!(
                "{}  {}/{name}: OK ({role} input)",
                sha256sum(&path),
                model.display()
            );
            assert!(
                report.lines().any(|l| l == line),
                "no line {line:?} in:\n{report}"
            );
        }
    }
    assert!(
        report.contains("5 input files match their SHA-256"),
        "{report}"
    );

    // In the wrong order: every file of both is reported, as a missing, unrecorded or
    // different file.
    let o = run(&[
        "verify",
        out_s,
        "--inputs",
        aligned.to_str().unwrap(),
        sft.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));

    // A copy of the SFT model with one byte of one shard changed.
    let changed = dir.path().join("changed");
    std::fs::create_dir_all(&changed).unwrap();
    for entry in std::fs::read_dir(&sft).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, changed.join(p.file_name().unwrap())).unwrap();
    }
    let victim = changed.join("model-00002-of-00003.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    use mergestream::error::VerifyCause as C;
    let problems = verify_problems(&out, &changed, &aligned);
    assert_eq!(problems.len(), 1, "{problems:?}");
    match &problems[0] {
        C::InputHashMismatch {
            role,
            name,
            actual,
            recorded,
            ..
        } => {
            assert_eq!(
                (role.as_str(), name.as_str()),
                ("sft", "model-00002-of-00003.safetensors")
            );
            assert_eq!(actual, &sha256sum(&victim));
            assert_eq!(recorded, &sha256sum(&sft.join(name)));
        }
        other => panic!("{other}"),
    }
    // The same tensors saved in four shards: the recorded files are missing, the new ones
    // unrecorded.
    let resharded = dir.path().join("resharded");
    synth(
        &resharded,
        &["--preset", "tiny-llama", "--seed", "9", "--sft-shards", "4"],
    );
    let mut kinds: Vec<String> = verify_problems(&out, &resharded.join("sft"), &aligned)
        .iter()
        .map(|p| match p {
            C::InputFileMissing { role, name, .. } => format!("{role}: missing {name}"),
            C::InputFileUnrecorded { role, name, .. } => format!("{role}: unrecorded {name}"),
            other => panic!("{other}"),
        })
        .collect();
    kinds.sort();
    let mut want: Vec<String> = (1..=3)
        .map(|k| format!("sft: missing model-0000{k}-of-00003.safetensors"))
        .chain((1..=4).map(|k| format!("sft: unrecorded model-0000{k}-of-00004.safetensors")))
        .collect();
    want.sort();
    assert_eq!(kinds, want);

    // The wrong number of models is a usage error; an output made without --hash-inputs has
    // nothing to compare with.
    let o = run(&["verify", out_s, "--inputs", sft.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--inputs names 1 model but the output recorded 2: sft, aligned"),
        "{}",
        stderr(&o)
    );
    let plain = dir.path().join("plain");
    assert!(expo(&pair, &plain, "0.3", &[]).status.success());
    let o = run(&[
        "verify",
        plain.to_str().unwrap(),
        "--inputs",
        sft.to_str().unwrap(),
        aligned.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("records no input hashes"),
        "{}",
        stderr(&o)
    );
}

/// The problems `verify_inputs` finds with `sft` and `aligned` given for `out`.
fn verify_problems(out: &Path, sft: &Path, aligned: &Path) -> Vec<mergestream::error::VerifyCause> {
    use mergestream::lineage::{verify_inputs, GivenInput};
    let given = [sft, aligned].map(|p| GivenInput {
        role: None,
        path: p.to_path_buf(),
    });
    match verify_inputs(out, &given) {
        Err(mergestream::Error::Verify { problems, .. }) => {
            problems.into_iter().map(|p| p.cause).collect()
        }
        other => panic!("verify_inputs passed: {other:?}"),
    }
}

#[test]
fn verify_config_finds_the_inputs_as_merge_does() {
    let dir = tempdir();
    pair(dir.path());
    let config = "name: ties-a\nmerge_method: ties\nbase_model: pair/sft\nmodels:\n  - model: pair/aligned\n    parameters:\n      weight: 1.0\n      density: 0.5\n---\nname: lin\nmerge_method: linear\nmodels:\n  - model: pair/sft\n    parameters:\n      weight: 0.5\n  - model: pair/aligned\n    parameters:\n      weight: 0.5\n";
    std::fs::write(dir.path().join("multi.yml"), config).unwrap();
    let cmd = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = cmd(&[
        "merge",
        "multi.yml",
        "--out",
        "out",
        "--hash-inputs",
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Each output is matched with its document by name; the roles are the document's.
    for (name, roles) in [
        ("ties-a", ["models[0]", "base_model"]),
        ("lin", ["models[0]", "models[1]"]),
    ] {
        let o = cmd(&["verify", &format!("out/{name}"), "--config", "multi.yml"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let report = String::from_utf8(o.stdout).unwrap();
        assert!(
            report.contains("5 input files match their SHA-256"),
            "{report}"
        );
        let recorded = provenance(&dir.path().join("out").join(name));
        let got: Vec<&str> = recorded["input_sha256"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["role"].as_str().unwrap())
            .collect();
        assert_eq!(got, roles);
    }
    let lin = provenance(&dir.path().join("out/lin"));
    assert_eq!(lin["input_sha256"][1]["model"], "pair/aligned");
    // Changing an input after the fact is found.
    let shard = dir
        .path()
        .join("pair/aligned/model-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).unwrap();
    let o = cmd(&["verify", "out/lin", "--config", "multi.yml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("models[1] input"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("model-00001-of-00002.safetensors: SHA-256 is"),
        "{}",
        stderr(&o)
    );
}
