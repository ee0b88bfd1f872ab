//! Memory is bounded by the budget, not by tensor or model size: merging a pair shaped like
//! Llama-3-70B at full width (8192 hidden, vocab 128256: embed_tokens and lm_head are 2.1 GB
//! each) keeps the process's peak RSS, measured by the OS, within the budget; so does merging
//! packed inputs into compressed output.

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
