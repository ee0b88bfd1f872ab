//! The output as a real client sees it: the Python `safetensors` package loads every shard
//! through the index, and numpy computes the ExPO reference independently; `transformers` loads
//! outputs as models (a forward pass, weights equal to the stored bytes) and PyYAML reads the
//! model card's front matter.

use crate::common::*;
use std::path::PathBuf;
use std::process::Command;

/// The test venv's python: `$MERGESTREAM_TEST_PYTHON`, else whatever `scripts/test-env.sh`
/// prepares (it installs what is missing).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MERGESTREAM_TEST_PYTHON") {
        return p.into();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-env.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "test-env.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn python_safetensors_loads_the_output_and_numpy_agrees() {
    let py = python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/check_output.py");
    for (i, (synth_args, alpha, extra)) in [
        (
            vec![
                "--preset",
                "tiny-llama",
                "--specials",
                "--int-buffer",
                "--seed",
                "21",
            ],
            "0.3",
            vec!["--max-shard-size", "100KB"],
        ),
        (
            vec![
                "--preset",
                "tiny-mistral",
                "--specials",
                "--seed",
                "22",
                "--sft-shards",
                "1",
            ],
            "0.2",
            vec![],
        ),
        (
            vec![
                "--preset",
                "tiny-llama",
                "--layers",
                "1",
                "--dtype",
                "F16",
                "--specials",
            ],
            "0.5",
            vec![],
        ),
        (
            vec![
                "--preset",
                "tiny-llama",
                "--layers",
                "1",
                "--dtype",
                "F32",
                "--specials",
            ],
            "-0.25",
            vec![],
        ),
        (
            vec![
                "--preset",
                "tiny-llama",
                "--layers",
                "1",
                "--sft-dtype",
                "F32",
                "--specials",
            ],
            "0.3",
            vec![],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempdir();
        let pair = dir.path().join("pair");
        synth(&pair, &synth_args);
        let out = dir.path().join(format!("out{i}"));
        let r = expo(&pair, &out, alpha, &extra);
        assert!(r.status.success(), "{}", stderr(&r));
        let check = Command::new(&py)
            .arg(script)
            .arg(&pair)
            .arg(&out)
            .arg(alpha)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "python check failed:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&check.stdout).trim());
    }
}

/// The differential fuzz target compares mergestream with the `safetensors` Rust crate; users
/// load files with the Python package. The two must agree on every differential seed (valid,
/// broken and differing alike), so that "what the reference accepts" means the same for both.
#[test]
fn the_python_package_agrees_with_the_reference_crate_on_every_differential_seed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/differential");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() > 40, "{} seeds", files.len());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/check_reference.py"
    );
    let out = Command::new(python())
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts = String::from_utf8(out.stdout).unwrap();
    let verdicts: Vec<&str> = verdicts.lines().collect();
    assert_eq!(verdicts.len(), files.len());
    for (file, python) in files.iter().zip(verdicts) {
        let crate_reads =
            safetensors::SafeTensors::read_metadata(&std::fs::read(file).unwrap()).is_ok();
        let python_reads = python == "ACCEPT";
        assert_eq!(python_reads, crate_reads, "{}", file.display());
    }
}

#[test]
fn transformers_loads_outputs_and_pyyaml_reads_their_cards() {
    let py = python();
    if !has_python_modules(&py, "torch, transformers, yaml") {
        return;
    }
    let dir = tempdir();
    let run_in = |args: &[&str]| {
        let o = Command::new(bin())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    // BF16 Llama, sharded, with the inputs hashed; F16 Mistral-shaped in one file; F32; a TIES
    // config merge.
    run_in(&["synth", "llama", "--preset", "tiny-llama", "--seed", "3"]);
    run_in(&[
        "synth",
        "mistral",
        "--preset",
        "tiny-mistral",
        "--dtype",
        "F16",
        "--seed",
        "4",
    ]);
    run_in(&[
        "expo",
        "--sft",
        "llama/sft",
        "--aligned",
        "llama/aligned",
        "--alpha",
        "0.3",
        "--out",
        "o1",
        "--max-shard-size",
        "100KB",
        "--hash-inputs",
        "--quiet",
    ]);
    run_in(&[
        "expo",
        "--sft",
        "mistral/sft",
        "--aligned",
        "mistral/aligned",
        "--alpha",
        "0.5",
        "--out",
        "o2",
        "--quiet",
    ]);
    std::fs::write(
        dir.path().join("ties.yml"),
        "merge_method: ties\nbase_model: llama/sft\nmodels:\n  - model: llama/aligned\n    parameters:\n      weight: 1.0\n      density: 0.5\n",
    )
    .unwrap();
    run_in(&["merge", "ties.yml", "--out", "o3", "--quiet"]);
    run_in(&[
        "synth",
        "f32",
        "--preset",
        "tiny-llama",
        "--layers",
        "1",
        "--dtype",
        "F32",
    ]);
    run_in(&[
        "expo",
        "--sft",
        "f32/sft",
        "--aligned",
        "f32/aligned",
        "--alpha",
        "0.2",
        "--out",
        "o4",
        "--quiet",
    ]);
    let cases = serde_json::json!([
        {"out": "o1", "method": "expo", "base_model": ["llama/sft", "llama/aligned"]},
        {"out": "o2", "method": "expo", "base_model": ["mistral/sft", "mistral/aligned"]},
        {"out": "o3", "method": "ties", "base_model": ["llama/aligned", "llama/sft"]},
        {"out": "o4", "method": "expo", "base_model": ["f32/sft", "f32/aligned"]},
    ]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/check_transformers.py"
    );
    let check = Command::new(&py)
        .arg(script)
        .arg(cases.to_string())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "transformers check failed:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&check.stdout).trim());
}
