//! End-to-end ExPO merges of generated pairs, checked element by element against an independent
//! reference; determinism across threads and chunk sizes; every mismatch class of the plan;
//! checksums and `verify`.

use crate::common::*;
use std::path::Path;

fn merge_and_check(synth_args: &[&str], alpha: &str, extra: &[&str]) -> tempfile::TempDir {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, synth_args);
    let out = dir.path().join("out");
    let result = expo(&pair, &out, alpha, extra);
    assert!(result.status.success(), "{}", stderr(&result));
    let n = assert_matches_reference(&pair, &out, alpha.parse().unwrap());
    assert!(n > 5);
    run_ok(&["verify", out.to_str().unwrap()]);
    dir
}

#[test]
fn llama_bf16_pair_matches_reference_bit_for_bit() {
    merge_and_check(
        &[
            "--preset",
            "tiny-llama",
            "--sft-shards",
            "3",
            "--aligned-shards",
            "2",
            "--specials",
            "--int-buffer",
            "--seed",
            "11",
        ],
        "0.3",
        &["--max-shard-size", "100KB"],
    );
}

#[test]
fn mistral_bf16_pair_matches_reference_bit_for_bit() {
    merge_and_check(
        &[
            "--preset",
            "tiny-mistral",
            "--sft-shards",
            "1",
            "--aligned-shards",
            "4",
            "--specials",
            "--seed",
            "12",
        ],
        "0.2",
        &[],
    );
}

#[test]
fn f16_and_f32_pairs_match_reference() {
    for dtype in ["F16", "F32"] {
        merge_and_check(
            &[
                "--preset",
                "tiny-llama",
                "--layers",
                "1",
                "--dtype",
                dtype,
                "--specials",
                "--seed",
                "13",
            ],
            "0.5",
            &["--max-shard-size", "150KB"],
        );
    }
}

#[test]
fn mixed_precision_pairs_merge_in_f32_and_take_the_aligned_dtype() {
    for (aligned, sft) in [("BF16", "F32"), ("F16", "BF16"), ("F32", "F16")] {
        merge_and_check(
            &[
                "--preset",
                "tiny-llama",
                "--layers",
                "1",
                "--dtype",
                aligned,
                "--sft-dtype",
                sft,
                "--specials",
                "--int-buffer",
            ],
            "0.3",
            &["--chunk-size", "4KiB"],
        );
    }
}

#[test]
fn negative_and_large_alpha_match_reference() {
    for alpha in ["-0.7", "37.5"] {
        merge_and_check(
            &[
                "--preset",
                "tiny-llama",
                "--layers",
                "1",
                "--specials",
                "--seed",
                "14",
            ],
            alpha,
            &[],
        );
    }
}

#[test]
fn output_is_independent_of_threads_chunk_size_and_io_mode() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(
        &pair,
        &["--preset", "tiny-mistral", "--specials", "--int-buffer"],
    );
    let reference = dir.path().join("ref");
    run_ok(
        &expo_args(
            pair.to_str().unwrap(),
            reference.to_str().unwrap(),
            "0.3",
            &["--max-shard-size", "200KB"],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    for (i, extra) in [
        vec!["--threads", "1"],
        vec!["--threads", "5", "--chunk-size", "4KiB"],
        vec!["--threads", "2", "--chunk-size", "520"],
        vec!["--threads", "3", "--memory", "40MiB"],
        vec!["--io", "buffered"],
        vec!["--io", "direct", "--threads", "1"],
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}"));
        let mut args = vec!["--max-shard-size", "200KB"];
        args.extend(extra);
        let r = expo(&pair, &out, "0.3", &args);
        assert!(r.status.success(), "{}", stderr(&r));
        assert_same_tree(&reference, &out);
    }
}

#[test]
fn output_is_hugging_face_shaped() {
    let dir = merge_and_check(
        &["--preset", "tiny-llama", "--int-buffer"],
        "0.3",
        &["--max-shard-size", "100KB"],
    );
    let out = dir.path().join("out");
    let names: Vec<String> = tree_digest(&out).into_keys().collect();
    assert_eq!(
        names,
        [
            "README.md",
            "checksums.b3",
            "config.json",
            "generation_config.json",
            "mergestream.json",
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let merged = load_model(&out);
    let total: usize = merged.values().map(|t| t.data.len()).sum();
    assert_eq!(index["metadata"]["total_size"], total as u64);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), merged.len());
    // Each shard: metadata format=pt and provenance; data starts on a 4096-byte boundary.
    for k in 1..=3 {
        let bytes = std::fs::read(out.join(format!("model-0000{k}-of-00003.safetensors"))).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 4096, 0);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["format"], "pt");
        assert_eq!(meta["mergestream.method"], "expo");
        assert_eq!(meta["mergestream.alpha"], "0.3");
    }
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("mergestream.json")).unwrap()).unwrap();
    assert_eq!(provenance["method"], "expo");
    assert_eq!(provenance["alpha"], 0.3);
    assert!(
        provenance["inputs"]["sft"]["files"]
            .as_array()
            .unwrap()
            .len()
            == 3
    );
    // Non-weight files are the aligned model's.
    let pair = dir.path().join("pair");
    for f in ["config.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(pair.join("aligned").join(f)).unwrap()
        );
    }
}

#[test]
fn single_shard_output_is_model_safetensors_without_index() {
    let dir = merge_and_check(&["--preset", "tiny-llama", "--layers", "1"], "0.1", &[]);
    let out = dir.path().join("out");
    assert!(out.join("model.safetensors").exists());
    assert!(!out.join("model.safetensors.index.json").exists());
}

#[test]
fn b3sum_checks_the_manifest() {
    let dir = merge_and_check(
        &["--preset", "tiny-llama", "--layers", "1"],
        "0.3",
        &["--max-shard-size", "60KB"],
    );
    let out = dir.path().join("out");
    match std::process::Command::new("b3sum")
        .arg("--check")
        .arg("checksums.b3")
        .current_dir(&out)
        .output()
    {
        Ok(r) => assert!(
            r.status.success(),
            "b3sum --check failed:\n{}",
            String::from_utf8_lossy(&r.stdout)
        ),
        Err(_) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: b3sum is not installed (scripts/test-env.sh installs it)")
        }
        Err(e) => panic!("b3sum is required in CI: {e}"),
    }
}

#[test]
fn verify_catches_a_flipped_byte_a_missing_file_and_an_extra_file() {
    let dir = merge_and_check(
        &["--preset", "tiny-llama", "--layers", "1"],
        "0.3",
        &["--max-shard-size", "60KB"],
    );
    let out = dir.path().join("out");
    let name = tree_digest(&out)
        .into_keys()
        .find(|n| n.starts_with("model-00002-of-"))
        .unwrap();
    let shard = out.join(&name);
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    std::fs::remove_file(out.join("tokenizer.json")).unwrap();
    std::fs::write(out.join("stray.txt"), "x").unwrap();
    let r = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    let err = stderr(&r);
    assert!(err.contains(&format!("{name}: blake3 is")), "{err}");
    assert!(err.contains("tokenizer.json"), "{err}");
    assert!(err.contains("stray.txt is not listed"), "{err}");
    assert!(err.contains("3 problems"), "{err}");
}

#[test]
fn verify_rechecks_structure_too() {
    // A shard whose header is broken but whose manifest line was updated to match: the hash
    // passes, the structure check does not.
    let dir = merge_and_check(&["--preset", "tiny-llama", "--layers", "1"], "0.3", &[]);
    let out = dir.path().join("out");
    let shard = out.join("model.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes.truncate(bytes.len() - 2);
    std::fs::write(&shard, &bytes).unwrap();
    let manifest = std::fs::read_to_string(out.join("checksums.b3")).unwrap();
    let fixed: String = manifest
        .lines()
        .map(|l| {
            if l.ends_with("  model.safetensors") {
                format!("{}  model.safetensors\n", blake3::hash(&bytes).to_hex())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(out.join("checksums.b3"), fixed).unwrap();
    let r = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("model.safetensors: "), "{}", stderr(&r));
}

fn write_single(path: &Path, tensors: &[(&str, &str, Vec<u64>)]) {
    // A minimal independent safetensors writer for hand-made models (zero-filled data).
    let mut json = String::from("{");
    let mut at = 0u64;
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let size = match *dtype {
            "BF16" | "F16" => 2,
            "F32" | "I32" => 4,
            "F64" | "I64" => 8,
            _ => 1,
        };
        let n: u64 = shape.iter().product::<u64>() * size;
        if i > 0 {
            json.push(',');
        }
        json += &format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{at},{}]}}",
            at + n
        );
        at += n;
    }
    json.push('}');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.resize(bytes.len() + at as usize, 0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn every_mismatch_is_listed_at_once_and_nothing_is_written() {
    let dir = tempdir();
    let sft = dir.path().join("sft/model.safetensors");
    let aligned = dir.path().join("aligned/model.safetensors");
    write_single(
        &sft,
        &[
            ("same", "BF16", vec![2, 2]),
            ("only_in_sft", "BF16", vec![2]),
            ("reshaped", "BF16", vec![4, 2]),
            ("retyped", "I32", vec![3]),
            ("wide", "F64", vec![1]),
        ],
    );
    write_single(
        &aligned,
        &[
            ("same", "BF16", vec![2, 2]),
            ("only_in_aligned", "F32", vec![2]),
            ("reshaped", "BF16", vec![2, 4]),
            ("retyped", "BF16", vec![3]),
            ("wide", "F64", vec![1]),
        ],
    );
    let out = dir.path().join("out");
    let r = run(&[
        "expo",
        "--sft",
        dir.path().join("sft").to_str().unwrap(),
        "--aligned",
        dir.path().join("aligned").to_str().unwrap(),
        "--alpha",
        "0.3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
    let err = stderr(&r);
    for expect in [
        "5 problems",
        "tensor 'only_in_aligned': missing from the SFT model",
        "tensor 'only_in_sft': missing from the aligned model",
        "tensor 'reshaped': shape [2, 4] in --aligned but [4, 2] in --sft",
        "tensor 'retyped': dtype BF16 in --aligned but I32 in --sft",
        "tensor 'wide': dtype F64 cannot be merged",
    ] {
        assert!(err.contains(expect), "missing {expect:?} in:\n{err}");
    }
    assert!(
        !out.exists(),
        "a failed plan must not create the output directory"
    );
}

#[test]
fn refuses_a_non_empty_output_directory_unless_forced() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, &["--layers", "1"]);
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let r = expo(&pair, &out, "0.3", &[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        stderr(&r).contains("is not empty (holds notes.txt)"),
        "{}",
        stderr(&r)
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "nothing written"
    );
    // A finished output is refused too; --force replaces it and leaves unrelated files alone.
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    assert!(expo(&pair, &out, "0.3", &[]).status.success());
    let r = expo(&pair, &out, "0.4", &[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(stderr(&r).contains("--force"), "{}", stderr(&r));
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let r = expo(&pair, &out, "0.4", &["--force"]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_matches_reference(&pair, &out, 0.4);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn inspect_and_plan_describe_without_writing() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, &["--layers", "1", "--int-buffer"]);
    let r = run_ok(&["inspect", pair.join("aligned").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("model.embed_tokens.weight"), "{text}");
    assert!(text.contains("13 tensors in 2 shards"), "{text}");
    let r = run_ok(&["inspect", "--json", pair.join("sft").to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(json["tensor_count"], 13);
    assert_eq!(json["shards"].as_array().unwrap().len(), 3);
    let before = tree_digest(&pair.join("aligned"));
    let r = run_ok(&[
        "plan",
        "--sft",
        pair.join("sft").to_str().unwrap(),
        "--aligned",
        pair.join("aligned").to_str().unwrap(),
        "--alpha",
        "0.3",
        "--max-shard-size",
        "60KB",
    ]);
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("OK: 13 tensors match"), "{text}");
    assert!(text.contains("model-00001-of-"), "{text}");
    assert_eq!(before, tree_digest(&pair.join("aligned")));
}

/// `--sft` and `--aligned` may be Hugging Face ids found in the local cache (`HF_HUB_CACHE`),
/// with a revision; a missing one is an error naming where it looked and how to download it.
#[test]
fn models_given_as_hugging_face_ids_come_from_the_local_cache() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(
        &pair,
        &["--preset", "tiny-llama", "--layers", "1", "--seed", "31"],
    );
    let cache = dir.path().join("hub");
    let snapshot = as_hf_cache(&pair.join("sft"), &cache.join("models--org--base"));
    let commit = snapshot.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::create_dir_all(cache.join("models--org--base/refs")).unwrap();
    std::fs::write(
        cache.join("models--org--base/refs/main"),
        format!("{commit:0<40}"),
    )
    .unwrap();
    std::fs::rename(&snapshot, snapshot.with_file_name(format!("{commit:0<40}"))).unwrap();

    let by_path = dir.path().join("by-path");
    let o = expo(&pair, &by_path, "0.3", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let by_id = dir.path().join("by-id");
    let aligned = pair.join("aligned");
    let run_with_cache = |sft: &str, out: &Path| {
        std::process::Command::new(bin())
            .env("HF_HUB_CACHE", &cache)
            .args(["expo", "--sft", sft, "--aligned"])
            .arg(&aligned)
            .args(["--alpha", "0.3", "--quiet", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let o = run_with_cache("org/base@main", &by_id);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_matches_reference(&pair, &by_id, 0.3);

    let missing = dir.path().join("missing");
    let o = run_with_cache("org/absent", &missing);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let msg = stderr(&o);
    assert!(
        msg.contains("--sft: model 'org/absent' not found")
            && msg.contains("models--org--absent")
            && msg.contains("download org/absent"),
        "{msg}"
    );
    assert!(!missing.exists());
}

/// The end-of-run summary says how busy each stage was: a `busy:` line on stderr, and in the
/// `--json` summary each stage's seconds and its share of the run's wall time per thread. ExPO
/// is computed by the writer, straight into its staging buffers, so its compute workers idle;
/// a `linear` merge's compute on them.
#[test]
fn the_summary_says_how_busy_each_stage_was() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, &["--preset", "tiny-mistral"]);
    let out = dir.path().join("json");
    let r = expo(&pair, &out, "0.3", &["--json", "--threads", "2"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let doc: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    check_busy(&doc, false);
    let config = dir.path().join("linear.yml");
    std::fs::write(
        &config,
        format!(
            "merge_method: linear\nmodels:\n  - model: {sft}\n    parameters:\n      weight: 0.5\n  - model: {aligned}\n    parameters:\n      weight: 0.5\n",
            sft = pair.join("sft").display(),
            aligned = pair.join("aligned").display()
        ),
    )
    .unwrap();
    let merged = dir.path().join("linear");
    let r = run(&[
        "merge",
        config.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
        "--json",
        "--threads",
        "2",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    let doc: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    check_busy(&doc, true);
    let out = dir.path().join("line");
    let args = expo_args(pair.to_str().unwrap(), out.to_str().unwrap(), "0.3", &[]);
    let refs: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--quiet")
        .collect();
    let r = run(&refs);
    assert!(r.status.success(), "{}", stderr(&r));
    let err = stderr(&r);
    let line = err
        .lines()
        .find(|l| l.contains("busy: "))
        .unwrap_or_else(|| panic!("no busy line: {err}"));
    for stage in ["reader ", "compute ", "writer ", "hasher ", "disk writes "] {
        assert!(line.contains(stage), "{stage}in {line}");
    }
}

/// Checks a `--json` summary's `busy` object: every stage there, each within its threads' share
/// of the wall time; each busy, but for the compute workers unless `computed`.
fn check_busy(doc: &serde_json::Value, computed: bool) {
    let seconds = doc["seconds"].as_f64().unwrap();
    let threads = |key: &str| doc[key].as_f64().unwrap();
    for (stage, over) in [
        ("reader", threads("readers")),
        ("compute", threads("threads")),
        ("writer", 1.0),
        ("hasher", threads("outputs")),
        ("disk_writes", threads("outputs")),
    ] {
        // Each output has several I/O threads, so its disk writes may add up to more than the
        // wall time (the share is per output, as the summary prints it).
        let bound = if stage == "disk_writes" {
            over * mergestream::writer::WRITES_IN_FLIGHT as f64
        } else {
            over
        };
        let busy = &doc["busy"][stage];
        let spent = busy["seconds"]
            .as_f64()
            .unwrap_or_else(|| panic!("{stage}: {doc}"));
        let fraction = busy["fraction"].as_f64().unwrap();
        if stage == "compute" && !computed {
            assert_eq!(spent, 0.0, "{stage} idles: {doc}");
        } else {
            assert!(spent > 0.0, "{stage} did some work: {doc}");
        }
        assert!(spent <= seconds * bound * 1.01 + 0.01, "{stage}: {doc}");
        assert!(
            (fraction - spent / (seconds * over)).abs() < 1e-9,
            "{stage}: {doc}"
        );
    }
}
