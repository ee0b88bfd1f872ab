//! Packed models in merges, through the binary: inputs read packed give the bytes of merging the
//! unpacked models (sharded and single-file models, a packed and a plain model in one pair,
//! mixed precision, sweeps, merge configs with reduction passes, small blocks and odd chunk
//! sizes); `--compress` output restores to the bytes of a plain run (whole, in parts, in a
//! sweep, resumed) and passes `b3sum --check checksums.b3` once unpacked; `verify` on packed
//! output; and packed inputs that are damaged or miss their base fail with their own error,
//! leaving nothing behind.
//!
//! The reference for every merged output is the plain run's output, which `expo.rs` and the
//! method tests check against independent references; one case here checks its tensors against
//! the ExPO reference directly, and restored files are checked with `b3sum`, not with the tool.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::packed::{entry, parse, truncate_frame};

/// `mergestream pack SRC --out OUT --block-size 4KiB -q EXTRA...` (small blocks: tensors span
/// many blocks and start inside them).
fn pack(src: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "pack",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--block-size",
        "4KiB",
        "-q",
    ];
    args.extend_from_slice(extra);
    run_ok(&args);
}

fn unpack(src: &Path, out: &Path) {
    run_ok(&[
        "unpack",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
}

/// `mergestream expo --sft SFT --aligned ALIGNED --alpha ALPHA --out OUT -q EXTRA...`.
fn expo_of(
    sft: &Path,
    aligned: &Path,
    alpha: &str,
    out: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "expo",
        "--sft",
        sft.to_str().unwrap(),
        "--aligned",
        aligned.to_str().unwrap(),
        "--alpha",
        alpha,
        "--out",
        out.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn expo_ok(sft: &Path, aligned: &Path, alpha: &str, out: &Path, extra: &[&str]) {
    let r = expo_of(sft, aligned, alpha, out, extra);
    assert!(r.status.success(), "{}", stderr(&r));
}

/// `b3sum --check MANIFEST` in `dir` (skipped where b3sum is missing, outside CI).
fn b3sum_check(dir: &Path, manifest: &str) {
    match std::process::Command::new("b3sum")
        .args(["--check", manifest])
        .current_dir(dir)
        .output()
    {
        Ok(r) => assert!(
            r.status.success(),
            "b3sum --check failed in {}:\n{}",
            dir.display(),
            String::from_utf8_lossy(&r.stdout)
        ),
        Err(_) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: b3sum is not installed (scripts/test-env.sh installs it)")
        }
        Err(e) => panic!("b3sum is required in CI: {e}"),
    }
}

/// Files of `dir` (top level), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A pair (sharded 3/2, specials, integer buffer; `sft_dtype` for a mixed pair), and both of
/// its models packed.
struct Packed {
    dir: tempfile::TempDir,
}

impl Packed {
    fn new(extra: &[&str]) -> Packed {
        let dir = tempdir();
        let pair = dir.path().join("pair");
        let mut args = vec![
            "--layers",
            "2",
            "--sft-shards",
            "3",
            "--aligned-shards",
            "2",
            "--specials",
            "--int-buffer",
        ];
        args.extend_from_slice(extra);
        synth(&pair, &args);
        let p = Packed { dir };
        pack(&p.plain("sft"), &p.packed("sft"), &[]);
        pack(&p.plain("aligned"), &p.packed("aligned"), &["--level", "3"]);
        p
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn plain(&self, model: &str) -> PathBuf {
        self.path("pair").join(model)
    }
    fn packed(&self, model: &str) -> PathBuf {
        self.path(&format!("packed-{model}"))
    }
}

#[test]
fn merging_packed_models_gives_the_bytes_of_merging_the_unpacked_ones() {
    for extra in [&[][..], &["--sft-dtype", "F32"][..]] {
        let p = Packed::new(extra);
        assert!(names(&p.packed("sft"))
            .iter()
            .any(|n| n.ends_with(".mszst")));
        let reference = p.path("reference");
        expo_ok(&p.plain("sft"), &p.plain("aligned"), "0.3", &reference, &[]);
        assert_matches_reference(&p.path("pair"), &reference, 0.3);
        let cases: [(&str, PathBuf, PathBuf, &[&str]); 4] = [
            ("both packed", p.packed("sft"), p.packed("aligned"), &[]),
            ("packed sft", p.packed("sft"), p.plain("aligned"), &[]),
            (
                "packed aligned, small chunks",
                p.plain("sft"),
                p.packed("aligned"),
                &["--chunk-size", "520", "--threads", "3"],
            ),
            (
                "both packed, one thread, tiny chunks",
                p.packed("sft"),
                p.packed("aligned"),
                &["--chunk-size", "8", "--threads", "1"],
            ),
        ];
        for (what, sft, aligned, extra) in cases {
            let out = p.path(&format!("out-{}", what.replace([' ', ','], "-")));
            expo_ok(&sft, &aligned, "0.3", &out, extra);
            assert_same_merge(&reference, &out);
            // The plan (fingerprint included) does not depend on the inputs being packed.
            let plan = |s: &Path, a: &Path| {
                let r = run_ok(&[
                    "plan",
                    "--sft",
                    s.to_str().unwrap(),
                    "--aligned",
                    a.to_str().unwrap(),
                    "--alpha",
                    "0.3",
                ]);
                String::from_utf8(r.stdout)
                    .unwrap()
                    .lines()
                    // The fingerprint covers the model card, which names the inputs as given.
                    .filter(|l| !l.starts_with("OK:") && !l.starts_with("plan fingerprint:"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                plan(&sft, &aligned),
                plan(&p.plain("sft"), &p.plain("aligned")),
                "{what}"
            );
        }
    }
}

#[test]
fn single_packed_files_and_sweeps_read_packed_as_plain() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(
        &pair,
        &[
            "--layers",
            "1",
            "--sft-shards",
            "1",
            "--aligned-shards",
            "1",
        ],
    );
    let psft = dir.path().join("psft");
    pack(&pair.join("sft"), &psft, &[]);
    let single = psft.join("model.safetensors.mszst");
    assert!(single.is_file());
    let reference = dir.path().join("reference");
    expo_ok(
        &pair.join("sft/model.safetensors"),
        &pair.join("aligned"),
        "0.1,0.3",
        &reference,
        &[],
    );
    let out = dir.path().join("out");
    expo_ok(&single, &pair.join("aligned"), "0.1,0.3", &out, &[]);
    for alpha in ["alpha-0.1", "alpha-0.3"] {
        assert_same_merge(&reference.join(alpha), &out.join(alpha));
    }
    // `inspect` reads a packed model as the model it packs.
    let listing =
        |m: &Path| String::from_utf8(run_ok(&["inspect", m.to_str().unwrap()]).stdout).unwrap();
    assert_eq!(listing(&psft), listing(&pair.join("sft")));
}

/// A `ties` config over the pair (reduction passes read every tensor more than once) and a
/// `linear` one, with models at the given paths.
fn configs(base: &Path, model: &Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "ties",
            format!(
                "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: 0.7\n      density: 0.4\ndtype: bfloat16\n",
                base.display(),
                model.display()
            ),
        ),
        (
            "linear",
            format!(
                "merge_method: linear\nmodels:\n  - model: {}\n    parameters:\n      weight: 0.4\n  - model: {}\n    parameters:\n      weight: 0.6\ndtype: bfloat16\n",
                model.display(),
                base.display()
            ),
        ),
    ]
}

#[test]
fn merge_configs_read_packed_models_and_write_compressed_output() {
    let p = Packed::new(&[]);
    // The config names `models/sft` and `models/aligned` (its text is part of the output), links
    // to the plain models, then to the packed ones.
    let models = p.path("models");
    std::fs::create_dir(&models).unwrap();
    let link = |model: &str, to: &Path| {
        let at = models.join(model);
        let _ = std::fs::remove_file(&at);
        std::os::unix::fs::symlink(to, &at).unwrap();
    };
    for (name, text) in configs(&models.join("sft"), &models.join("aligned")) {
        let yml = p.path(&format!("{name}.yml"));
        std::fs::write(&yml, text).unwrap();
        let merge = |out: &Path, extra: &[&str]| {
            let mut args = vec![
                "merge",
                yml.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "-q",
            ];
            args.extend_from_slice(extra);
            run_ok(&args);
        };
        link("sft", &p.plain("sft"));
        link("aligned", &p.plain("aligned"));
        let reference = p.path(&format!("{name}-reference"));
        merge(&reference, &[]);
        link("sft", &p.packed("sft"));
        let out = p.path(&format!("{name}-out"));
        merge(&out, &["--chunk-size", "16KiB"]);
        assert_same_merge(&reference, &out);
        // Compressed, from packed inputs only: restores to the same bytes.
        link("aligned", &p.packed("aligned"));
        let compressed = p.path(&format!("{name}-compressed"));
        merge(&compressed, &["--compress"]);
        run_ok(&["verify", compressed.to_str().unwrap(), "-q"]);
        let restored = p.path(&format!("{name}-restored"));
        unpack(&compressed, &restored);
        assert_same_merge(&reference, &restored);
    }
}

#[test]
fn compressed_output_unpacks_to_the_bytes_of_a_plain_run() {
    let p = Packed::new(&[]);
    let reference = p.path("reference");
    let shards = ["--max-shard-size", "60KB"];
    expo_ok(
        &p.plain("sft"),
        &p.plain("aligned"),
        "0.3",
        &reference,
        &shards,
    );
    assert!(
        names(&reference).len() > 8,
        "several shards: {:?}",
        names(&reference)
    );

    // A whole run, from packed inputs.
    let out = p.path("compressed");
    let mut extra = shards.to_vec();
    extra.extend(["--compress", "--compress-level", "2"]);
    expo_ok(&p.packed("sft"), &p.packed("aligned"), "0.3", &out, &extra);
    let files = names(&out);
    assert!(files.contains(&"packed.b3".to_string()));
    for n in names(&reference) {
        let shard = n.ends_with(".safetensors");
        let packed = format!("{n}.mszst");
        assert_eq!(
            (files.contains(&n), files.contains(&packed)),
            (!shard, shard),
            "{n}: {files:?}"
        );
    }
    // The files as they are pass b3sum against packed.b3; checksums.b3 is the plain run's.
    b3sum_check(&out, "packed.b3");
    // (but for the model card's line: the card names the inputs as given).
    assert_eq!(
        manifest_without_names_of_inputs(&out),
        manifest_without_names_of_inputs(&reference)
    );
    let r = run_ok(&["verify", out.to_str().unwrap()]);
    let said = String::from_utf8(r.stdout).unwrap();
    assert!(
        said.contains("against packed.b3") && said.contains("mergestream unpack"),
        "{said}"
    );
    let restored = p.path("restored");
    unpack(&out, &restored);
    assert_same_merge(&reference, &restored);
    b3sum_check(&restored, "checksums.b3");

    // A compressed output is a model merges read as it is.
    let again = p.path("from-compressed");
    expo_ok(&p.plain("sft"), &out, "0.0", &again, &[]);
    let again_ref = p.path("from-plain");
    expo_ok(&p.plain("sft"), &reference, "0.0", &again_ref, &[]);
    assert_same_merge(&again_ref, &again);

    // In parts, finalized: the same files as the whole compressed run.
    let parts = p.path("parts");
    for i in 0..3 {
        let part = format!("{i}/3");
        let mut extra = extra.clone();
        extra.extend(["--part", part.as_str()]);
        expo_ok(&p.packed("sft"), &p.plain("aligned"), "0.3", &parts, &extra);
    }
    run_ok(&["finalize", parts.to_str().unwrap(), "-q"]);
    assert_same_merge(&out, &parts);

    // A part resumed keeps its shards; resuming it without --compress is refused (its packed
    // shards are not what a plain run writes).
    let resumed = p.path("resumed");
    let mut part0 = extra.clone();
    part0.extend(["--part", "0/2"]);
    expo_ok(
        &p.packed("sft"),
        &p.packed("aligned"),
        "0.3",
        &resumed,
        &part0,
    );
    let before = tree_digest(&resumed);
    let mut again = part0.clone();
    again.push("--resume");
    let r = expo_of(
        &p.packed("sft"),
        &p.packed("aligned"),
        "0.3",
        &resumed,
        &[&again[..], &["--json"]].concat(),
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(summary["shards_written"], 0, "{summary}");
    assert!(summary["shards_kept"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(tree_digest(&resumed), before);
    let plain_resume: Vec<&str> = shards
        .iter()
        .copied()
        .chain(["--part", "0/2", "--resume"])
        .collect();
    let r = expo_of(
        &p.packed("sft"),
        &p.packed("aligned"),
        "0.3",
        &resumed,
        &plain_resume,
    );
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("is not empty") && stderr(&r).contains(".mszst"),
        "{}",
        stderr(&r)
    );
    let mut part1 = extra.clone();
    part1.extend(["--part", "1/2"]);
    expo_ok(
        &p.packed("sft"),
        &p.packed("aligned"),
        "0.3",
        &resumed,
        &part1,
    );
    run_ok(&["finalize", resumed.to_str().unwrap(), "-q"]);
    assert_same_tree(&out, &resumed);
}

#[test]
fn a_compressed_sweep_in_parts_finalizes_every_output() {
    let p = Packed::new(&[]);
    let reference = p.path("reference");
    expo_ok(
        &p.plain("sft"),
        &p.plain("aligned"),
        "0.1,0.5",
        &reference,
        &[],
    );
    let sweep = p.path("sweep");
    for part in ["0/2", "1/2"] {
        expo_ok(
            &p.packed("sft"),
            &p.plain("aligned"),
            "0.1,0.5",
            &sweep,
            &["--compress", "--part", part, "--max-shard-size", "100KB"],
        );
    }
    run_ok(&["finalize", sweep.to_str().unwrap(), "-q"]);
    let plain = p.path("sweep-plain");
    expo_ok(
        &p.plain("sft"),
        &p.plain("aligned"),
        "0.1,0.5",
        &plain,
        &["--max-shard-size", "100KB"],
    );
    for alpha in ["alpha-0.1", "alpha-0.5"] {
        run_ok(&["verify", sweep.join(alpha).to_str().unwrap(), "-q"]);
        let restored = p.path(&format!("restored-{alpha}"));
        unpack(&sweep.join(alpha), &restored);
        assert_same_merge(&plain.join(alpha), &restored);
        b3sum_check(&restored, "checksums.b3");
    }
}

#[test]
fn damaged_packed_inputs_fail_with_their_own_error_and_leave_nothing_behind() {
    let p = Packed::new(&[]);
    let shard = "model-00002-of-00003.safetensors.mszst";
    let damaged = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| -> PathBuf {
        let dir = p.path(name);
        std::fs::create_dir(&dir).unwrap();
        for f in names(&p.packed("sft")) {
            std::fs::copy(p.packed("sft").join(&f), dir.join(&f)).unwrap();
        }
        let mut bytes = std::fs::read(dir.join(shard)).unwrap();
        edit(&mut bytes);
        std::fs::write(dir.join(shard), bytes).unwrap();
        dir
    };
    // A block's zstd frame cut short (the rest of the file consistent with it).
    let frame = damaged("frame", &|b| {
        let p = parse(b);
        let k = (1..p.blocks)
            .find(|&k| entry(b, &p, k).2 == 1)
            .expect("a zstd block");
        truncate_frame(b, k, 5);
    });
    // A corrupt index entry (its checksum in the trailer no longer matches).
    let index = damaged("index", &|b| {
        let p = parse(b);
        let (off, _, _) = entry(b, &p, 1);
        let at = p.index_offset + 24;
        b[at..at + 8].copy_from_slice(&(off as u64 + 1).to_le_bytes());
    });
    // Truncated: the trailer is gone.
    let truncated = damaged("truncated", &|b| b.truncate(b.len() - 20));
    for (dir, says) in [
        (&frame, vec!["truncated zstd frame"]),
        (&index, vec!["corrupt block index", "checksum"]),
        (&truncated, vec!["trailer"]),
    ] {
        for existed in [false, true] {
            let out = p.path("out");
            if existed {
                std::fs::create_dir(&out).unwrap();
            }
            let r = expo_of(dir, &p.plain("aligned"), "0.3", &out, &[]);
            assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
            let err = stderr(&r);
            assert!(err.contains(shard), "{err}");
            for s in &says {
                assert!(err.contains(s), "{s:?} not in {err}");
            }
            assert_eq!(err.lines().count(), 1, "one line: {err}");
            if existed {
                assert!(names(&out).is_empty(), "{:?}", names(&out));
                std::fs::remove_dir(&out).unwrap();
            } else {
                assert!(!out.exists(), "{:?}", names(&out));
            }
        }
    }
}

#[test]
fn inputs_packed_against_a_base_are_read_through_it_when_it_is_an_input() {
    let p = Packed::new(&[]);
    let reference = p.path("reference");
    expo_ok(&p.plain("sft"), &p.plain("aligned"), "0.3", &reference, &[]);
    // The SFT model stored as its XOR with the aligned model.
    let xsft = p.path("xsft");
    pack(
        &p.plain("sft"),
        &xsft,
        &["--base", p.plain("aligned").to_str().unwrap()],
    );
    for aligned in [p.plain("aligned"), p.packed("aligned")] {
        let out = p.path("out");
        expo_ok(&xsft, &aligned, "0.3", &out, &["--chunk-size", "1000"]);
        assert_same_merge(&reference, &out);
        std::fs::remove_dir_all(&out).unwrap();
    }
    // Its base is not among the inputs: refused before anything is written, saying what to do.
    let out = p.path("out");
    let r = expo_of(&xsft, &p.plain("sft"), "0.3", &out, &[]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    let err = stderr(&r);
    assert!(
        err.contains("none of this run's other models") && err.contains("--base"),
        "{err}"
    );
    assert!(!out.exists());
    // Unpacking it needs that base, and only that one (the binary's messages; nothing left).
    let r = run(&[
        "unpack",
        xsft.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("pass it with --base"), "{}", stderr(&r));
    let r = run(&[
        "unpack",
        xsft.to_str().unwrap(),
        "--base",
        p.plain("sft").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("another base model"), "{}", stderr(&r));
    assert!(!out.exists());
    // A packed base reads as its unpacked form.
    unpack_with_base(&xsft, &p.packed("aligned"), &out);
    b3sum_check(&out, "checksums.b3");
    std::fs::remove_file(out.join("checksums.b3")).unwrap(); // made by pack: the input had none
    assert_same_tree(&p.plain("sft"), &out);
}

fn unpack_with_base(src: &Path, base: &Path, out: &Path) {
    run_ok(&[
        "unpack",
        src.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
}
