//! Several outputs from one read: `expo --alpha a,b,c,…` writes `OUT/alpha-a/`, … each of which
//! must be byte for byte the directory a single run with that alpha writes — whole, partitioned
//! and finalized, resumed after a kill, and whatever the thread count and chunk size.

use std::path::Path;

use crate::common::*;

const ALPHAS: [&str; 5] = ["0.1", "0.2", "0.3", "0.4", "0.5"];
const SHARD: &str = "100KB";

fn pair(dir: &Path) {
    synth(
        dir,
        &[
            "--preset",
            "tiny-llama",
            "--layers",
            "3",
            "--sft-shards",
            "3",
            "--aligned-shards",
            "2",
            "--specials",
            "--int-buffer",
            "--seed",
            "21",
        ],
    );
}

/// The single runs every sweep output is compared with, checked against the reference.
fn singles(pair: &Path, dir: &Path) -> Vec<std::path::PathBuf> {
    ALPHAS
        .iter()
        .map(|alpha| {
            let out = dir.join(format!("single-{alpha}"));
            let o = expo(pair, &out, alpha, &["--max-shard-size", SHARD]);
            assert!(o.status.success(), "{}", stderr(&o));
            assert_matches_reference(pair, &out, alpha.parse().unwrap());
            out
        })
        .collect()
}

#[test]
fn a_five_alpha_sweep_equals_five_single_runs() {
    let dir = tempdir();
    let pair_dir = dir.path().join("pair");
    pair(&pair_dir);
    let singles = singles(&pair_dir, dir.path());
    let alphas = ALPHAS.join(",");
    for (k, extra) in [
        vec!["--max-shard-size", SHARD],
        vec![
            "--max-shard-size",
            SHARD,
            "--threads",
            "1",
            "--chunk-size",
            "4KiB",
        ],
        vec![
            "--max-shard-size",
            SHARD,
            "--threads",
            "3",
            "--memory",
            "64MiB",
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("sweep-{k}"));
        let o = expo(&pair_dir, &out, &alphas, &extra);
        assert!(o.status.success(), "{}", stderr(&o));
        for (alpha, single) in ALPHAS.iter().zip(&singles) {
            let sub = out.join(format!("alpha-{alpha}"));
            assert_same_tree(single, &sub);
            run_ok(&["verify", sub.to_str().unwrap()]);
        }
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), ALPHAS.len(), "only the outputs in {names:?}");
    }
}

#[test]
fn a_partitioned_sweep_finalizes_to_the_single_runs() {
    let dir = tempdir();
    let pair_dir = dir.path().join("pair");
    pair(&pair_dir);
    let singles = singles(&pair_dir, dir.path());
    let out = dir.path().join("sweep");
    let alphas = ALPHAS.join(",");
    // Parts in an odd order; each part writes its shards of every output.
    for part in ["2/3", "0/3", "1/3"] {
        let o = expo(
            &pair_dir,
            &out,
            &alphas,
            &["--max-shard-size", SHARD, "--part", part],
        );
        assert!(o.status.success(), "part {part}: {}", stderr(&o));
        assert!(!out.join("alpha-0.1/checksums.b3").exists());
    }
    run_ok(&["finalize", out.to_str().unwrap(), "--quiet"]);
    for (alpha, single) in ALPHAS.iter().zip(&singles) {
        assert_same_tree(single, &out.join(format!("alpha-{alpha}")));
    }
}

#[test]
fn a_sweep_refuses_an_alpha_given_twice_and_writes_nothing() {
    let dir = tempdir();
    let pair_dir = dir.path().join("pair");
    pair(&pair_dir);
    let out = dir.path().join("sweep");
    let o = expo(&pair_dir, &out, "0.1,0.2,0.1", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("alpha 0.1 is given twice"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}
