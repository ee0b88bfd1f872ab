//! The output as a real client sees it: the Python `safetensors` package loads every shard
//! through the index, and numpy computes the ExPO reference independently.

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
