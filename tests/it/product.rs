//! The product as shipped: a build without the test-hook cargo features (`failpoints`,
//! `fuzzing`) has no behaviour hidden behind environment variables. `scripts/test.sh` runs this
//! module against the default release binary (`cargo test --release`, no features), and the
//! fault tests in a second pass with the features on.

#[cfg(not(feature = "failpoints"))]
#[test]
fn a_default_build_ignores_mergestream_failpoint() {
    use crate::common::*;

    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, &["--layers", "2", "--int-buffer"]);
    for (i, spec) in [
        "shard-data:kill",
        "shard-renamed:kill",
        "before-finalize:kill",
        "finalize-index:kill",
        "shard-data:pause",
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("out{i}"));
        let args = expo_args(
            pair.to_str().unwrap(),
            out.to_str().unwrap(),
            "0.3",
            &["--max-shard-size", "60KB"],
        );
        let r = std::process::Command::new(bin())
            .args(&args)
            .env("MERGESTREAM_FAILPOINT", spec)
            .env("MERGESTREAM_FAILPOINT_DIR", dir.path())
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "MERGESTREAM_FAILPOINT={spec}: {:?}\n{}",
            r.status,
            stderr(&r)
        );
        assert!(
            !dir.path().join("reached-shard-data").exists(),
            "{spec}: the pause point was reached"
        );
        assert_matches_reference(&pair, &out, 0.3);
        run_ok(&["verify", out.to_str().unwrap(), "--quiet"]);
    }
}
