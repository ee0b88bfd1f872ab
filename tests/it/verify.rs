//! `verify` reports each cause once, with its consequences under it: a damaged or missing shard
//! is one problem, under which the index's tensors that therefore cannot be checked are listed.
//! Checked through the library (variants and fields) and through the binary (exit code, one
//! line per cause).

use std::path::{Path, PathBuf};

use mergestream::error::{HeaderError, VerifyCause, VerifyConsequence, VerifyProblem};
use mergestream::Error;

use crate::common::*;

/// A finished four-shard output of a tiny pair; returns (scratch dir, output dir).
fn finished_output() -> (tempfile::TempDir, PathBuf) {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, &["--layers", "1"]);
    let out = dir.path().join("out");
    let r = expo(&pair, &out, "0.3", &["--max-shard-size", "60KB"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(out.join(SHARD).exists() && out.join(LAST).exists());
    (dir, out)
}

/// The tensors the output's index puts in `shard`, as the index JSON says (read independently).
fn indexed_in(out: &Path, shard: &str) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let mut names: Vec<String> = index["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, s)| s.as_str() == Some(shard))
        .map(|(t, _)| t.clone())
        .collect();
    names.sort();
    names
}

fn problems(out: &Path) -> Vec<VerifyProblem> {
    match mergestream::verify::verify(out) {
        Err(Error::Verify { problems, .. }) => problems,
        other => panic!("verify: {other:?}"),
    }
}

/// The binary's report: exit 1, `causes` top-level problems (one line each), the count in the
/// headline, and `text` as the library renders it.
fn binary_reports(out: &Path, causes: usize) -> String {
    let r = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    let err = stderr(&r);
    let top = err.lines().filter(|l| l.starts_with("  - ")).count();
    assert_eq!(top, causes, "{err}");
    let plural = if causes == 1 { "" } else { "s" };
    assert!(
        err.contains(&format!("({causes} problem{plural})")),
        "{err}"
    );
    err
}

const SHARD: &str = "model-00002-of-00004.safetensors";
const LAST: &str = "model-00004-of-00004.safetensors";

#[test]
fn a_truncated_shard_is_one_problem_with_its_consequences() {
    let (_dir, out) = finished_output();
    let path = out.join(SHARD);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
    let found = problems(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        matches!(&found[0].cause, VerifyCause::HashMismatch { name, .. } if name == SHARD),
        "{found:#?}"
    );
    match &found[0].consequences[..] {
        [VerifyConsequence::InvalidHeader { error }, VerifyConsequence::TensorsUnchecked { tensors }] =>
        {
            assert!(
                matches!(
                    **error,
                    Error::Header {
                        kind: HeaderError::PastEndOfData { .. },
                        ..
                    }
                ),
                "{error:?}"
            );
            assert_eq!(*tensors, indexed_in(&out, SHARD));
            assert!(!tensors.is_empty());
        }
        other => panic!("{other:#?}"),
    }
    let err = binary_reports(&out, 1);
    assert!(!err.contains("not a listed shard"), "{err}");
}

#[test]
fn a_missing_shard_is_reported_once() {
    let (_dir, out) = finished_output();
    std::fs::remove_file(out.join(SHARD)).unwrap();
    let found = problems(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        matches!(&found[0].cause, VerifyCause::Unreadable { name, source }
            if name == SHARD && source.kind() == std::io::ErrorKind::NotFound),
        "{found:#?}"
    );
    assert!(
        matches!(&found[0].consequences[..], [VerifyConsequence::TensorsUnchecked { tensors }]
            if *tensors == indexed_in(&out, SHARD)),
        "{found:#?}"
    );
    binary_reports(&out, 1);
}

#[test]
fn a_broken_shard_with_a_matching_manifest_line_is_one_problem() {
    // The manifest was rewritten for the broken file: the hash passes, the header does not.
    let (_dir, out) = finished_output();
    let path = out.join(SHARD);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 2);
    std::fs::write(&path, &bytes).unwrap();
    let manifest = std::fs::read_to_string(out.join("checksums.b3")).unwrap();
    let fixed: String = manifest
        .lines()
        .map(|l| match l.split_once("  ") {
            Some((_, name)) if name == SHARD => {
                format!("{}  {SHARD}\n", blake3::hash(&bytes).to_hex())
            }
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(out.join("checksums.b3"), fixed).unwrap();
    let found = problems(&out);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        matches!(&found[0].cause, VerifyCause::InvalidShard { name, error }
            if name == SHARD && matches!(**error, Error::Header { .. })),
        "{found:#?}"
    );
    assert!(
        matches!(&found[0].consequences[..], [VerifyConsequence::TensorsUnchecked { tensors }]
            if *tensors == indexed_in(&out, SHARD)),
        "{found:#?}"
    );
    binary_reports(&out, 1);
}

#[test]
fn every_independent_cause_is_listed() {
    // A flipped byte in one shard (its header intact), a missing copied file, an extra file.
    let (_dir, out) = finished_output();
    let path = out.join(LAST);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    std::fs::write(out.join("stray.txt"), "x").unwrap();
    let found = problems(&out);
    let causes: Vec<&VerifyCause> = found.iter().map(|p| &p.cause).collect();
    assert!(
        matches!(causes[..], [
            VerifyCause::HashMismatch { name: a, .. },
            VerifyCause::Unreadable { name: b, .. },
            VerifyCause::Unlisted { name: c, .. },
        ] if a == LAST && b == "tokenizer.json" && c == "stray.txt"),
        "{found:#?}"
    );
    assert!(
        found.iter().all(|p| p.consequences.is_empty()),
        "{found:#?}"
    );
    binary_reports(&out, 3);
}

#[test]
fn an_index_naming_a_shard_that_is_not_there_is_one_problem() {
    // The index (and its manifest line) rewritten to put two tensors in a shard that does not
    // exist: one problem, naming the shard and the tensors.
    let (_dir, out) = finished_output();
    let moved = indexed_in(&out, SHARD);
    let path = out.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(SHARD, "model-00009-of-00009.safetensors");
    std::fs::write(&path, &text).unwrap();
    let manifest: String = std::fs::read_to_string(out.join("checksums.b3"))
        .unwrap()
        .lines()
        .map(|l| match l.split_once("  ") {
            Some((_, name)) if name == "model.safetensors.index.json" => {
                format!("{}  {name}\n", blake3::hash(text.as_bytes()).to_hex())
            }
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(out.join("checksums.b3"), manifest).unwrap();
    let found = problems(&out);
    // The shard the index no longer mentions holds tensors the index does not list.
    let (missing, unindexed): (Vec<_>, Vec<_>) = found
        .iter()
        .partition(|p| matches!(p.cause, VerifyCause::IndexNamesNoShard { .. }));
    assert!(
        matches!(&missing[..], [p] if matches!(&p.cause, VerifyCause::IndexNamesNoShard { shard, tensors }
            if shard == "model-00009-of-00009.safetensors" && *tensors == moved)),
        "{found:#?}"
    );
    assert_eq!(unindexed.len(), moved.len(), "{found:#?}");
    assert!(unindexed
        .iter()
        .all(|p| matches!(&p.cause, VerifyCause::NotIndexed { shard, .. } if shard == SHARD)));
}
