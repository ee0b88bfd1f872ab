//! Memory is bounded by the budget, not by tensor or model size: merging a pair shaped like
//! Llama-3-70B at full width (8192 hidden, vocab 128256: embed_tokens and lm_head are 2.1 GB
//! each) keeps the process's peak RSS, measured by the OS, within the budget.

use crate::common::*;

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
