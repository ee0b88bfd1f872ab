//! Replays the fuzz seed corpus and the crash reproducers through the fuzz targets' own bodies
//! (`mergestream::fuzzing`), so they run under `cargo test --features fuzzing` on stable,
//! without cargo-fuzz (`scripts/test.sh` runs them).

use std::path::{Path, PathBuf};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("header", mergestream::fuzzing::header),
    ("differential", mergestream::fuzzing::differential),
    ("index", mergestream::fuzzing::index),
    ("merge", mergestream::fuzzing::merge),
    ("pickle", mergestream::fuzzing::pickle),
    ("torch", mergestream::fuzzing::torch),
    ("packed", mergestream::fuzzing::packed),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file of `fuzz/corpus/TARGET` and `fuzz/regressions/TARGET`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn every_corpus_file_and_reproducer_passes_its_target() {
    let mut failed = Vec::new();
    for (target, run) in TARGETS {
        let files = inputs(target);
        assert!(!files.is_empty(), "no corpus for the {target} target");
        for file in files {
            let data = std::fs::read(&file).expect("corpus file reads");
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their target:\n{}",
        failed.join("\n")
    );
}

/// The header seeds are named for what they are: `valid-*` must parse, `broken-*` must not.
#[test]
fn header_seeds_are_what_their_names_say() {
    for file in inputs("header") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&file).unwrap();
        let parsed = mergestream::format::header::parse_file_bytes(&file, &data);
        if name.starts_with("valid-") {
            assert!(parsed.is_ok(), "{name}: {}", parsed.unwrap_err());
        } else if name.starts_with("broken-") {
            assert!(parsed.is_err(), "{name} parses");
        }
    }
}

/// The differential seeds are named for what they are: `valid-*` both mergestream and the
/// `safetensors` crate read, `broken-*` both refuse, `differs-*` mergestream refuses for one of
/// the documented differences while the crate reads it.
#[test]
fn differential_seeds_are_what_their_names_say() {
    let mut differs = std::collections::BTreeSet::new();
    for file in inputs("differential") {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&file).unwrap();
        let ours = mergestream::format::header::parse_file_bytes(&file, &data);
        let theirs = safetensors::SafeTensors::read_metadata(&data).map(|_| ());
        if name.starts_with("valid-") {
            assert!(
                ours.is_ok() && theirs.is_ok(),
                "{name}: {ours:?} / {theirs:?}"
            );
        } else if name.starts_with("broken-") {
            assert!(
                ours.is_err() && theirs.is_err(),
                "{name}: {ours:?} / {theirs:?}"
            );
        } else if name.starts_with("differs-") {
            assert!(
                theirs.is_ok(),
                "{name}: the reference refuses it: {theirs:?}"
            );
            let e = ours.expect_err(&name);
            let d = mergestream::fuzzing::difference(&e)
                .unwrap_or_else(|| panic!("{name}: not a documented difference: {e}"));
            differs.insert(format!("{d:?}"));
        } else {
            panic!("{name}: seeds are named valid-*, broken-* or differs-*");
        }
    }
    // Every documented difference has a seed.
    assert_eq!(
        differs.into_iter().collect::<Vec<_>>(),
        [
            "DtypeIsObject",
            "DuplicateTensor",
            "EntryIsArray",
            "SubByteDtype"
        ]
    );
}
