//! Memory is bounded by the budget, not by tensor or model size: merging a pair shaped like
//! Llama-3-70B at full width (8192 hidden, vocab 128256: embed_tokens and lm_head are 2.1 GB
//! each) keeps the process's peak RSS, measured by the OS, within the budget; so do merging
//! packed inputs into compressed output, an eight-model `linear` merge config at that width, and
//! a three-model TIES merge of such embeddings, whose every reduction pass streams them too.

use crate::common::*;
use crate::modelset::{write_set, Dt, SetSpec};

/// Held by the tests that write gigabytes, so that they take their turns: one at a time they
/// need at most 8.4 GB of disk (the TIES test), together some 15 GB.
static LARGE_FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn large_files_turn() -> std::sync::MutexGuard<'static, ()> {
    LARGE_FILES.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn peak_rss_is_bounded_by_the_budget_not_by_2gb_tensors() {
    let _turn = large_files_turn();
    // Llama-3-70B's embed_tokens, lm_head and final norm (hidden 8192, vocabulary 128256: 2.1 GB
    // per embedding), the SFT model in two shards and the aligned one in one, as sparse files:
    // every byte is read, only the output's 4.2 GB take disk space.
    let dir = tempdir();
    let pair = dir.path().join("pair");
    let embed: (&str, &[u64]) = ("model.embed_tokens.weight", &[128_256, 8192]);
    let head: (&str, &[u64]) = ("lm_head.weight", &[128_256, 8192]);
    let norm: (&str, &[u64]) = ("model.norm.weight", &[8192]);
    sparse_bf16_shards(&pair.join("sft"), &[&[embed], &[norm, head]]);
    sparse_bf16_shards(&pair.join("aligned"), &[&[embed, norm, head]]);
    for (memory, limit_mib) in [
        // The defaults (a 256 MiB budget, of which an ExPO pair needs a few MiB of buffers): the
        // target is 64 MiB (measured: 44 MiB); a generous 50% margin.
        (None, 96),
        // A budget 1/31 of the largest tensor (2004 MiB); a generous 50% margin.
        (Some("64MiB"), 96),
    ] {
        let out = dir
            .path()
            .join(format!("out-{}", memory.unwrap_or("default")));
        let mut extra = vec!["--max-shard-size", "3GB"];
        if let Some(m) = memory {
            extra.extend(["--memory", m]);
        }
        let args = expo_args(pair.to_str().unwrap(), out.to_str().unwrap(), "0.3", &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, peak, err) = run_measuring_peak_rss(&args);
        assert!(status.success(), "{err}");
        let mib = peak >> 20;
        eprintln!(
            "peak RSS {mib} MiB with --memory {}",
            memory.unwrap_or("256MiB (default)")
        );
        assert!(
            mib <= limit_mib,
            "peak RSS {mib} MiB exceeds {limit_mib} MiB"
        );
        run_ok(&["verify", out.to_str().unwrap()]);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// Packed inputs and `--compress` stay within the budget too: the reader's decoded blocks and
/// the packing writer's blocks in flight are counted in it. Mistral-7B's widths (embed_tokens
/// and lm_head are 262 MB each, four times the budget).
#[test]
fn packed_inputs_and_compressed_output_stay_within_the_budget() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(
        &pair,
        &[
            "--preset",
            "mistral-7b",
            "--layers",
            "0",
            "--sft-shards",
            "2",
            "--aligned-shards",
            "1",
        ],
    );
    let packed = |model: &str| {
        let out = dir.path().join(format!("packed-{model}"));
        let src = pair.join(model);
        run_ok(&[
            "pack",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "-q",
        ]);
        out
    };
    let (sft, aligned) = (packed("sft"), packed("aligned"));
    let out = dir.path().join("out");
    let args = [
        "expo",
        "--sft",
        sft.to_str().unwrap(),
        "--aligned",
        aligned.to_str().unwrap(),
        "--alpha",
        "0.3",
        "--out",
        out.to_str().unwrap(),
        "--memory",
        "64MiB",
        "--threads",
        "2",
        "--compress",
        "-q",
    ];
    let (status, peak, err) = run_measuring_peak_rss(&args);
    assert!(status.success(), "{err}");
    let mib = peak >> 20;
    eprintln!("peak RSS {mib} MiB with --memory 64MiB, packed inputs, --compress");
    assert!(mib <= 96, "peak RSS {mib} MiB exceeds 96 MiB");
    // The unpacked bytes are the plain run's (its manifest lists them; the model card names
    // the inputs as given).
    let plain = dir.path().join("plain");
    let r = expo(&pair, &plain, "0.3", &[]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_eq!(
        manifest_without_names_of_inputs(&out),
        manifest_without_names_of_inputs(&plain)
    );
}

/// Writes a safetensors file of BF16 tensors whose data is all zeros, as a sparse file: its
/// size is real (the run reads every byte), the disk space it takes is not.
fn sparse_bf16_model(path: &std::path::Path, tensors: &[(&str, &[u64])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = 2 * shape.iter().product::<u64>();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    std::fs::write(path, &bytes).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(bytes.len() as u64 + offset).unwrap();
}

/// A model directory of sparse BF16 shards (see [`sparse_bf16_model`]): `model.safetensors`
/// for one shard, else `model-0000k-of-0000n.safetensors` and their index.
fn sparse_bf16_shards(dir: &std::path::Path, shards: &[&[(&str, &[u64])]]) {
    std::fs::create_dir_all(dir).unwrap();
    if let [tensors] = shards {
        return sparse_bf16_model(&dir.join("model.safetensors"), tensors);
    }
    let mut weight_map = serde_json::Map::new();
    for (k, tensors) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards.len());
        sparse_bf16_model(&dir.join(&file), tensors);
        for (name, _) in tensors.iter() {
            weight_map.insert(name.to_string(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn an_eight_model_merge_at_llama3_70b_width_stays_within_256_mib() {
    let _turn = large_files_turn();
    // Llama-3-70B widths: hidden 8192, 8 KV heads of 128, vocabulary 128256 (embed_tokens is
    // 2.1 GB), one layer's attention. One sparse file, hard-linked into eight model
    // directories: eight models as far as the merge is concerned, one page-cache copy.
    let dir = tempdir();
    let first = dir.path().join("m0");
    std::fs::create_dir_all(&first).unwrap();
    let layer = "model.layers.0.";
    let q = format!("{layer}self_attn.q_proj.weight");
    let k = format!("{layer}self_attn.k_proj.weight");
    let v = format!("{layer}self_attn.v_proj.weight");
    let o = format!("{layer}self_attn.o_proj.weight");
    let norm = format!("{layer}input_layernorm.weight");
    sparse_bf16_model(
        &first.join("model.safetensors"),
        &[
            ("model.embed_tokens.weight", &[128256, 8192]),
            (&norm, &[8192]),
            (&q, &[8192, 8192]),
            (&k, &[1024, 8192]),
            (&v, &[1024, 8192]),
            (&o, &[8192, 8192]),
            ("model.norm.weight", &[8192]),
        ],
    );
    let mut config = String::from("merge_method: linear\nmodels:\n");
    for i in 0..8 {
        let m = dir.path().join(format!("m{i}"));
        if i > 0 {
            std::fs::create_dir_all(&m).unwrap();
            std::fs::hard_link(first.join("model.safetensors"), m.join("model.safetensors"))
                .unwrap();
        }
        config += &format!(
            "  - model: {}\n    parameters:\n      weight: {}\n",
            m.display(),
            0.05 + 0.1 * i as f64
        );
    }
    config += "dtype: float32\nout_dtype: bfloat16\n";
    let config_path = dir.path().join("eight.yml");
    std::fs::write(&config_path, config).unwrap();
    let out = dir.path().join("out");
    let (status, peak, err) = run_measuring_peak_rss(&[
        "merge",
        config_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(status.success(), "{err}");
    let mib = peak >> 20;
    eprintln!("8-model linear merge, 2.1 GB tensors: peak RSS {mib} MiB");
    assert!(mib <= 256, "peak RSS {mib} MiB exceeds 256 MiB");
    run_ok(&["verify", out.to_str().unwrap(), "--quiet"]);
}

/// A 3-model TIES merge at Llama-3-70B width (the 128256 × 8192 embedding: 2.1 GB per model
/// in bf16, 6.3 GB read per pass, three passes: the high histogram, the threshold's tie pass,
/// the output) with the default `--memory` (256 MiB) peaks under 256 MiB.
#[test]
fn three_model_ties_at_70b_width_stays_under_256mib() {
    let _turn = large_files_turn();
    let dir = tempdir();
    let dirs = write_set(
        dir.path(),
        &SetSpec {
            tensors: vec![
                ("model.embed_tokens.weight".into(), vec![128_256, 8192]),
                ("model.norm.weight".into(), vec![8192]),
            ],
            dtypes: vec![Dt::BF16; 3],
            seed: 70,
            specials: false,
            int_buffer: false,
        },
    );
    let config = dir.path().join("ties.yml");
    std::fs::write(
        &config,
        format!(
            "merge_method: ties\nbase_model: {}\ndtype: bfloat16\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.6, density: 0.3}}\n",
            dirs[0].display(),
            dirs[1].display(),
            dirs[2].display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let (status, peak, err) = run_measuring_peak_rss(&[
        "merge",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(status.success(), "{err}");
    let mib = peak >> 20;
    eprintln!("3-model TIES at 70B width: peak RSS {mib} MiB");
    assert!(mib <= 256, "peak RSS {mib} MiB exceeds 256 MiB");
    run_ok(&["verify", out.to_str().unwrap()]);
}
