//! Memory is bounded by the budget, not by tensor or model size: merging a pair shaped like
//! Llama-3-70B at full width (8192 hidden, vocab 128256: embed_tokens and lm_head are 2.1 GB
//! each) keeps the process's peak RSS, measured by the OS, within the budget; so does a
//! three-model TIES merge of such embeddings, whose every reduction pass streams them too.

use crate::common::*;
use crate::modelset::{write_set, Dt, SetSpec};

#[test]
fn peak_rss_is_bounded_by_the_budget_not_by_2gb_tensors() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(
        &pair,
        &[
            "--preset",
            "llama3-70b",
            "--layers",
            "0",
            "--sft-shards",
            "2",
            "--aligned-shards",
            "1",
        ],
    );
    for (memory, limit_mib) in [
        // The default budget (256 MiB): the product promise is under 300 MiB.
        (None, 300),
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

/// A 3-model TIES merge at Llama-3-70B width (the 128256 × 8192 embedding: 2.1 GB per model
/// in bf16, 6.3 GB read per pass, three passes: the high histogram, the threshold's tie pass,
/// the output) with the default `--memory` (256 MiB) peaks under 256 MiB.
#[test]
fn three_model_ties_at_70b_width_stays_under_256mib() {
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
