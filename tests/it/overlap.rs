//! An output must never overwrite an input. Every form of overlap — the same directory, through
//! a symlink, through `..`, an output inside an input, an input inside the output, a Hugging
//! Face cache snapshot and its blobs, a hard-linked or symlinked input file in the output, a
//! bind mount — is refused by the library with the overlap it is ([`OverlapKind`]), and by the
//! binary with exit 2 and the same message naming both paths, for `expo` (with and without
//! `--force` and `--resume`, whole or `--part`), `plan --out` and `finalize`. Every file under
//! the inputs (links, blobs and all) is byte-identical afterwards, and no name was added or
//! removed there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mergestream::error::OverlapKind;
use mergestream::Error;

use crate::common::*;

/// Every entry under `root`, recursively: files by blake3, links by target, directories marked.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                stack.push(path);
                "<dir>".into()
            } else {
                blake3::hash(&std::fs::read(&path).unwrap())
                    .to_hex()
                    .to_string()
            };
            out.insert(rel, what);
        }
    }
    out
}

/// A scratch directory with a generated pair at `pair/sft` and `pair/aligned`.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let scene = Scene { dir: tempdir() };
        synth(&scene.path("pair"), &["--layers", "1", "--int-buffer"]);
        scene
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Checks one refusal: the library's `check_overlap(out, [sft, aligned])` fails with
    /// `kind`, naming `input`; then the binary, run with `args`, exits 2 with exactly that
    /// message; and nothing under `watched` changed.
    fn refused(
        &self,
        args: &[&str],
        (out, sft, aligned): (&Path, &Path, &Path),
        input: &Path,
        kind: OverlapKind,
        watched: &Path,
    ) {
        let error = mergestream::paths::check_overlap(out, &[sft, aligned])
            .expect_err("the library refuses");
        match &error {
            Error::Overlap {
                output,
                input: named,
                kind: found,
                ..
            } => {
                assert_eq!((output.as_path(), named.as_path()), (out, input));
                assert_eq!(*found, kind, "{error}");
            }
            other => panic!("not an overlap: {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains(out.to_str().unwrap()) && message.contains(input.to_str().unwrap()),
            "{message}"
        );
        let before = snapshot(watched);
        let r = run(args);
        assert_eq!(
            snapshot(watched),
            before,
            "{args:?} changed the inputs: {}",
            stderr(&r)
        );
        assert_eq!(r.status.code(), Some(2), "{args:?}: {}", stderr(&r));
        assert_eq!(
            stderr(&r),
            format!("mergestream: error: {error}\n"),
            "{args:?}"
        );
    }

    /// `expo --sft SFT --aligned ALIGNED --alpha 0.3 --out OUT EXTRA…` must be refused as
    /// [`Scene::refused`] says, watching the whole pair.
    fn expo_refused(&self, out: &Path, extra: &[&str], input: &Path, kind: OverlapKind) {
        let (sft, aligned) = (self.path("pair/sft"), self.path("pair/aligned"));
        self.expo_refused_with(&sft, &aligned, out, extra, input, kind, &self.path("pair"));
    }

    #[allow(clippy::too_many_arguments)] // each case spells out its inputs, output and outcome
    fn expo_refused_with(
        &self,
        sft: &Path,
        aligned: &Path,
        out: &Path,
        extra: &[&str],
        input: &Path,
        kind: OverlapKind,
        watched: &Path,
    ) {
        let mut args = vec![
            "expo",
            "--sft",
            sft.to_str().unwrap(),
            "--aligned",
            aligned.to_str().unwrap(),
            "--alpha",
            "0.3",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ];
        args.extend_from_slice(extra);
        self.refused(&args, (out, sft, aligned), input, kind, watched);
    }
}

/// The option sets every refusal must hold under.
const EXISTING: [&[&str]; 3] = [&["--force"], &["--resume"], &[]];

#[test]
fn the_same_directory_is_refused() {
    let s = Scene::new();
    for extra in EXISTING {
        let aligned = s.path("pair/aligned");
        s.expo_refused(&aligned, extra, &aligned, OverlapKind::Same);
        let sft = s.path("pair/sft");
        s.expo_refused(&sft, extra, &sft, OverlapKind::Same);
    }
}

#[test]
fn the_same_directory_through_a_symlink_or_dot_dot_is_refused() {
    let s = Scene::new();
    std::os::unix::fs::symlink(s.path("pair/aligned"), s.path("link")).unwrap();
    let aligned = s.path("pair/aligned");
    for extra in EXISTING {
        s.expo_refused(&s.path("link"), extra, &aligned, OverlapKind::Same);
        s.expo_refused(
            &s.path("pair/sft/../aligned"),
            extra,
            &aligned,
            OverlapKind::Same,
        );
        // A new directory under a link into the input.
        s.expo_refused(
            &s.path("link/merged"),
            extra,
            &aligned,
            OverlapKind::OutputInsideInput,
        );
    }
}

#[test]
fn an_output_inside_an_input_is_refused() {
    let s = Scene::new();
    let sft = s.path("pair/sft");
    std::fs::create_dir(sft.join("existing")).unwrap();
    for extra in EXISTING {
        for out in ["pair/sft/merged", "pair/sft/existing", "pair/sft/a/b/../c"] {
            s.expo_refused(&s.path(out), extra, &sft, OverlapKind::OutputInsideInput);
        }
    }
}

#[test]
fn an_output_containing_an_input_is_refused() {
    let s = Scene::new();
    for extra in EXISTING {
        for out in ["pair", "", "pair/aligned/.."] {
            s.expo_refused(
                &s.path(out),
                extra,
                &s.path("pair/sft"),
                OverlapKind::InputInsideOutput,
            );
        }
    }
    // A single-file model lying in the output directory (with --force, mergestream would
    // remove *.safetensors files it finds there).
    let file = s.path("pair/aligned/model-00001-of-00002.safetensors");
    let sft = s.path("pair/sft");
    s.refused(
        &[
            "expo",
            "--sft",
            sft.to_str().unwrap(),
            "--aligned",
            file.to_str().unwrap(),
            "--alpha",
            "0.3",
            "--out",
            s.path("pair/aligned").to_str().unwrap(),
            "--force",
        ],
        (&s.path("pair/aligned"), &sft, &file),
        &file,
        OverlapKind::InputInsideOutput,
        &s.path("pair"),
    );
}

#[test]
fn a_hugging_face_cache_snapshot_and_its_blobs_are_refused() {
    let s = Scene::new();
    let sft = as_hf_cache(&s.path("pair/sft"), &s.path("hub/sft"));
    let aligned = as_hf_cache(&s.path("pair/aligned"), &s.path("hub/aligned"));
    let blobs = s.path("hub/aligned/blobs");
    let watched = s.path("hub");
    let cases: [(PathBuf, OverlapKind); 5] = [
        (aligned.clone(), OverlapKind::Same),
        (aligned.join("merged"), OverlapKind::OutputInsideInput),
        // The links point into blobs/: writing there, or under it, is writing into the model.
        (blobs.clone(), OverlapKind::Same),
        (blobs.join("merged"), OverlapKind::OutputInsideInput),
        // The model's cache directory holds both.
        (s.path("hub/aligned"), OverlapKind::InputInsideOutput),
    ];
    for extra in EXISTING {
        for (out, kind) in &cases {
            s.expo_refused_with(&sft, &aligned, out, extra, &aligned, kind.clone(), &watched);
        }
    }
    // The message says where the links point.
    let e = mergestream::paths::check_overlap(&blobs, &[&aligned]).unwrap_err();
    assert!(
        matches!(&e, Error::Overlap { storage: true, location, .. } if *location == std::fs::canonicalize(&blobs).unwrap()),
        "{e:?}"
    );
    // One shard of a snapshot named as a single-file model: the snapshot directory holds its
    // link, the blobs directory its bytes.
    let shard = aligned.join("model-00001-of-00002.safetensors");
    for (out, kind) in [
        (aligned.clone(), OverlapKind::InputInsideOutput),
        (blobs.clone(), OverlapKind::Same),
    ] {
        s.expo_refused_with(&sft, &shard, &out, &["--force"], &shard, kind, &watched);
    }
    // A sibling snapshot directory is fine: the check is not a blanket refusal of the cache.
    let sibling = s.path("hub/aligned/snapshots/fedcba98");
    mergestream::paths::check_overlap(&sibling, &[&sft, &aligned]).unwrap();
}

#[test]
fn an_input_file_linked_into_the_output_is_refused() {
    let s = Scene::new();
    let out = s.path("out");
    let r = expo(&s.path("pair"), &out, "0.3", &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    let input = s.path("pair/aligned/model-00001-of-00002.safetensors");
    let input_canonical = std::fs::canonicalize(&input).unwrap();
    let aligned = s.path("pair/aligned");
    // A hard link of an input shard, under a name the output writes (and --force replaces).
    let shard = out.join("model.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::fs::hard_link(&input, &shard).unwrap();
    for extra in EXISTING {
        s.expo_refused(
            &out,
            extra,
            &aligned,
            OverlapKind::SharesFile {
                output_file: shard.clone(),
            },
        );
    }
    // The same through a symbolic link.
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink(&input, &shard).unwrap();
    s.expo_refused(
        &out,
        &["--force"],
        &aligned,
        OverlapKind::SharesFile {
            output_file: shard.clone(),
        },
    );
    let e = mergestream::paths::check_overlap(&out, &[&aligned]).unwrap_err();
    assert!(
        matches!(&e, Error::Overlap { location, .. } if *location == input_canonical),
        "{e:?}"
    );
}

#[test]
fn parts_plan_and_finalize_refuse_too() {
    let s = Scene::new();
    let (sft, aligned) = (s.path("pair/sft"), s.path("pair/aligned"));
    for extra in [&["--part", "0/2"][..], &["--part", "1/2", "--resume"]] {
        s.expo_refused(&aligned, extra, &aligned, OverlapKind::Same);
        s.expo_refused(&s.path("pair"), extra, &sft, OverlapKind::InputInsideOutput);
    }
    // plan --out reports it (and without --out, plans).
    let inside = aligned.join("merged");
    s.refused(
        &[
            "plan",
            "--sft",
            sft.to_str().unwrap(),
            "--aligned",
            aligned.to_str().unwrap(),
            "--alpha",
            "0.3",
            "--out",
            inside.to_str().unwrap(),
        ],
        (&inside, &sft, &aligned),
        &aligned,
        OverlapKind::OutputInsideInput,
        &s.path("pair"),
    );
    // finalize reads the inputs from the parts' records: an input shard hard-linked into the
    // output after the parts ran is refused before anything is written.
    let out = s.path("out");
    for part in ["0/2", "1/2"] {
        let r = expo(&s.path("pair"), &out, "0.3", &["--part", part]);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let input = aligned.join("model-00002-of-00002.safetensors");
    let linked = out.join("stray.safetensors");
    std::fs::hard_link(&input, &linked).unwrap();
    let before = snapshot(&s.path("pair"));
    let out_before = snapshot(&out);
    let r = run(&["finalize", out.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    let err = stderr(&r);
    assert!(
        err.contains(linked.to_str().unwrap())
            && err.contains(std::fs::canonicalize(&aligned).unwrap().to_str().unwrap()),
        "{err}"
    );
    assert_eq!(snapshot(&s.path("pair")), before);
    assert_eq!(snapshot(&out), out_before, "finalize wrote something");
    // Once the link is gone, finalize proceeds.
    std::fs::remove_file(&linked).unwrap();
    run_ok(&["finalize", out.to_str().unwrap(), "--quiet"]);
    run_ok(&["verify", out.to_str().unwrap(), "--quiet"]);
}

#[test]
fn bind_mounts_are_seen_through() {
    let s = Scene::new();
    let elsewhere = tempdir();
    let (sft, aligned) = (s.path("pair/sft"), s.path("pair/aligned"));
    // The aligned model seen at another path: an output there is the model itself.
    let Some(bind) = Mount::new(
        &elsewhere.path().join("bind"),
        &["--bind", aligned.to_str().unwrap()],
    ) else {
        return;
    };
    for extra in EXISTING {
        s.expo_refused(&bind.0, extra, &aligned, OverlapKind::Same);
        s.expo_refused(
            &bind.0.join("merged"),
            extra,
            &aligned,
            OverlapKind::OutputInsideInput,
        );
    }
    // The SFT model named through a bind mount, the output its real parent: no path and no
    // ancestor gives it away, the mount table does.
    let Some(bound_sft) = Mount::new(
        &elsewhere.path().join("sft"),
        &["--bind", sft.to_str().unwrap()],
    ) else {
        return;
    };
    let out = s.path("pair");
    for extra in EXISTING {
        s.expo_refused_with(
            &bound_sft.0,
            &aligned,
            &out,
            extra,
            &bound_sft.0,
            OverlapKind::InputInsideOutput,
            &out,
        );
    }
}
