//! Partitioned runs: `expo --part I/N` then `finalize`, in any order or all at once, must give
//! the directory a single `expo` gives, byte for byte; `finalize` must refuse (exit 1, naming
//! the part) whenever the parts do not add up to one run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::common::*;

const ALPHA: &str = "0.3";
/// Small enough that the tiny pair makes 5 shards: with 7 parts, two parts get none.
const SHARD: &str = "100KB";
const WORK: &str = ".mergestream";

/// A synthetic pair in `dir` (`dir/sft`, `dir/aligned`).
fn make_pair(dir: &Path, seed: &str) -> PathBuf {
    synth(
        dir,
        &[
            "--preset",
            "tiny-llama",
            "--layers",
            "4",
            "--sft-shards",
            "3",
            "--aligned-shards",
            "2",
            "--int-buffer",
            "--seed",
            seed,
        ],
    );
    dir.to_path_buf()
}

/// The single-machine run everything is compared with.
fn single_run(pair: &Path, out: &Path) {
    let o = expo(pair, out, ALPHA, &["--max-shard-size", SHARD]);
    assert!(o.status.success(), "single run: {}", stderr(&o));
}

fn part_command(pair: &Path, out: &Path, alpha: &str, part: &str, extra: &[&str]) -> Command {
    let mut args = vec!["--part", part];
    if !extra.contains(&"--max-shard-size") {
        args.extend(["--max-shard-size", SHARD]);
    }
    args.extend_from_slice(extra);
    let args = expo_args(pair.to_str().unwrap(), out.to_str().unwrap(), alpha, &args);
    let mut cmd = Command::new(bin());
    cmd.args(args);
    cmd
}

/// `expo --part PART EXTRA...` (with `--max-shard-size SHARD` unless `extra` sets it), whatever
/// its exit status.
fn part_with(pair: &Path, out: &Path, alpha: &str, part: &str, extra: &[&str]) -> Output {
    part_command(pair, out, alpha, part, extra)
        .output()
        .expect("mergestream runs")
}

fn part_ok(pair: &Path, out: &Path, part: &str) {
    let o = part_with(pair, out, ALPHA, part, &[]);
    assert!(o.status.success(), "part {part}: {}", stderr(&o));
}

fn finalize(out: &Path) -> Output {
    run(&["finalize", out.to_str().unwrap(), "--quiet"])
}

fn finalize_ok(out: &Path) {
    let o = finalize(out);
    assert!(o.status.success(), "finalize: {}", stderr(&o));
}

/// Runs `finalize`, which must refuse with exit 1 and a message holding every one of `needles`;
/// the directory must be left unfinalized.
fn finalize_refuses(out: &Path, needles: &[&str]) -> String {
    let o = finalize(out);
    let msg = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "finalize should refuse: {msg}");
    for needle in needles {
        assert!(msg.contains(needle), "{needle:?} not in: {msg}");
    }
    assert!(
        !out.join("checksums.b3").exists(),
        "refused but wrote checksums.b3"
    );
    assert!(
        out.join(WORK).is_dir(),
        "refused but removed the work directory"
    );
    msg
}

/// The shard names each part of `count` writes, as `plan --part` marks them.
fn planned_split(pair: &Path, count: u32, extra: &[&str]) -> Vec<Vec<String>> {
    (0..count)
        .map(|i| {
            let part = format!("{i}/{count}");
            let pair = pair.to_str().unwrap();
            let (sft, aligned) = (format!("{pair}/sft"), format!("{pair}/aligned"));
            let mut args = vec![
                "plan",
                "--sft",
                &sft,
                "--aligned",
                &aligned,
                "--alpha",
                ALPHA,
                "--max-shard-size",
                SHARD,
                "--part",
                &part,
            ];
            args.extend_from_slice(extra);
            let text = String::from_utf8(run_ok(&args).stdout).unwrap();
            text.lines()
                .filter(|l| l.ends_with("<- this part"))
                .map(|l| l.split_whitespace().next().unwrap().to_string())
                .collect()
        })
        .collect()
}

fn record_path(out: &Path, index: u32, count: u32) -> PathBuf {
    out.join(WORK).join(format!("part-{index}-of-{count}.json"))
}

fn read_record(out: &Path, index: u32, count: u32) -> serde_json::Value {
    let path = record_path(out, index, count);
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")))
        .unwrap()
}

/// The names of the files a part's record lists.
fn recorded_files(out: &Path, index: u32, count: u32) -> Vec<String> {
    read_record(out, index, count)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

/// Deterministic orders of `0..n` that are neither forward nor (except for `n <= 2`) reversed.
fn shuffled(n: u32) -> Vec<u32> {
    // 3 is coprime with 1, 2 and 7; for 3 parts take 2, 0, 1 by hand.
    match n {
        3 => vec![2, 0, 1],
        _ => (0..n).map(|i| (i * 3 + n - 1) % n).collect(),
    }
}

#[test]
fn split_covers_every_shard_and_leaves_some_parts_empty() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let whole = planned_split(&pair, 1, &[]).remove(0);
    assert!(
        (5..=8).contains(&whole.len()),
        "the test wants 5 to 8 shards, the plan has {}",
        whole.len()
    );
    for count in [2, 3, 7] {
        let split = planned_split(&pair, count, &[]);
        let mut all: Vec<String> = split.iter().flatten().cloned().collect();
        all.sort();
        assert_eq!(all, whole, "{count} parts do not split the shards exactly");
        if count == 7 {
            assert!(
                split.iter().any(Vec::is_empty),
                "with 7 parts some get none"
            );
        }
    }
}

#[test]
fn parts_in_shuffled_order_match_single_run() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let single = tmp.path().join("single");
    single_run(&pair, &single);
    for count in [1u32, 2, 3, 7] {
        let split = planned_split(&pair, count, &[]);
        for (name, order) in [
            ("reverse", (0..count).rev().collect::<Vec<_>>()),
            ("shuffled", shuffled(count)),
        ] {
            let out = tmp.path().join(format!("{name}-{count}"));
            for &i in &order {
                part_ok(&pair, &out, &format!("{i}/{count}"));
                // What the part wrote is what `plan --part` said, plus the copied files for 0.
                let mut files: Vec<String> = recorded_files(&out, i, count)
                    .into_iter()
                    .filter(|n| n.ends_with(".safetensors"))
                    .collect();
                files.sort();
                assert_eq!(
                    files, split[i as usize],
                    "part {i}/{count} wrote other shards"
                );
                let copied = recorded_files(&out, i, count)
                    .iter()
                    .any(|n| n == "config.json");
                assert_eq!(copied, i == 0, "only part 0 copies config.json");
            }
            assert!(
                !out.join("checksums.b3").exists(),
                "a part finalized by itself"
            );
            finalize_ok(&out);
            assert_same_tree(&single, &out);
            run_ok(&["verify", out.to_str().unwrap(), "--quiet"]);
        }
    }
    let out = tmp.path().join("shuffled-3");
    let tensors = assert_matches_reference(&pair, &out, ALPHA.parse().unwrap());
    assert!(tensors > 30, "{tensors} tensors");
}

/// Spawns every part at once and waits for all; panics with the stderr of any that failed.
fn run_parts_concurrently(pair: &Path, out: &Path, count: u32) {
    let children: Vec<(u32, Child)> = (0..count)
        .map(|i| {
            let child = part_command(pair, out, ALPHA, &format!("{i}/{count}"), &[])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn mergestream");
            (i, child)
        })
        .collect();
    let mut failures = Vec::new();
    for (i, child) in children {
        let o = child.wait_with_output().unwrap();
        if !o.status.success() {
            failures.push(format!("part {i}/{count}: {}", stderr(&o)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn concurrent_parts_match_single_run() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let single = tmp.path().join("single");
    single_run(&pair, &single);
    // A few rounds, since what can go wrong here is a race.
    for round in 0..3 {
        for count in [1u32, 2, 3, 7] {
            let out = tmp.path().join(format!("concurrent-{count}-{round}"));
            run_parts_concurrently(&pair, &out, count);
            finalize_ok(&out);
            assert_same_tree(&single, &out);
            std::fs::remove_dir_all(&out).unwrap();
        }
    }
}

#[test]
fn finalize_refuses_a_missing_part() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let out = tmp.path().join("out");
    part_ok(&pair, &out, "0/3");
    part_ok(&pair, &out, "2/3");
    let msg = finalize_refuses(&out, &["part 1/3 has no record"]);
    assert!(
        !msg.contains("part 0/3") && !msg.contains("part 2/3"),
        "{msg}"
    );
    // Once the part has run, the same directory finalizes to the single run's bytes.
    part_ok(&pair, &out, "1/3");
    finalize_ok(&out);
    let single = tmp.path().join("single");
    single_run(&pair, &single);
    assert_same_tree(&single, &out);
}

#[test]
fn finalize_refuses_an_incomplete_part() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let out = tmp.path().join("out");
    part_ok(&pair, &out, "0/2");
    part_ok(&pair, &out, "1/2");
    // What a part killed before its last shard leaves: a record that is not complete.
    let mut record = read_record(&out, 1, 2);
    assert_eq!(record["complete"], true);
    record["complete"] = false.into();
    std::fs::write(record_path(&out, 1, 2), record.to_string()).unwrap();
    finalize_refuses(&out, &["part 1/2 is not complete"]);

    // --resume finishes it (keeping its shards), and then finalize goes through.
    let o = part_with(&pair, &out, ALPHA, "1/2", &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    finalize_ok(&out);
    let single = tmp.path().join("single");
    single_run(&pair, &single);
    assert_same_tree(&single, &out);
}

#[test]
fn finalize_refuses_parts_with_different_alpha() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let out = tmp.path().join("out");
    part_ok(&pair, &out, "0/2");
    // Same shard names, so the part runs; only finalize can tell.
    let o = part_with(&pair, &out, "0.5", "1/2", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let msg = finalize_refuses(&out, &["different inputs or options"]);
    assert!(msg.contains("0/2") && msg.contains("1/2"), "{msg}");
}

#[test]
fn finalize_refuses_parts_of_different_inputs() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let other = make_pair(&tmp.path().join("other"), "2");
    let out = tmp.path().join("out");
    part_ok(&pair, &out, "1/2");
    // Same shapes and shard names, other weights (another seed).
    let o = part_with(&other, &out, ALPHA, "0/2", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let msg = finalize_refuses(&out, &["different inputs or options"]);
    assert!(msg.contains("0/2") && msg.contains("1/2"), "{msg}");
}

#[test]
fn parts_with_different_shard_size_never_finalize() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");

    // One after the other: the second part sees shards that are not in its plan and refuses
    // before it creates anything; finalize then names the part that has no record.
    let out = tmp.path().join("out");
    part_ok(&pair, &out, "0/2");
    let o = part_with(&pair, &out, ALPHA, "1/2", &["--max-shard-size", "60KB"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is not empty"), "{}", stderr(&o));
    assert!(!record_path(&out, 1, 2).exists());
    finalize_refuses(&out, &["part 1/2 has no record"]);

    // Into separate directories then merged (as two parts starting at the same moment would
    // leave it): finalize names both plans' parts.
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    part_ok(&pair, &a, "0/2");
    let o = part_with(&pair, &b, ALPHA, "1/2", &["--max-shard-size", "60KB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for entry in std::fs::read_dir(b.join(WORK)).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name.ends_with(".json") {
            std::fs::copy(entry.path(), a.join(WORK).join(&name)).unwrap();
        }
    }
    for name in recorded_files(&b, 1, 2) {
        std::fs::copy(b.join(&name), a.join(&name)).unwrap();
    }
    let msg = finalize_refuses(&a, &["different inputs or options"]);
    assert!(msg.contains("0/2") && msg.contains("1/2"), "{msg}");
}

#[test]
fn finalize_refuses_records_of_different_part_counts() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let out = tmp.path().join("out");
    part_ok(&pair, &out, "0/2");
    part_ok(&pair, &out, "1/2");
    part_ok(&pair, &out, "2/3");
    finalize_refuses(&out, &["split in different ways", "2/3", "0/2", "1/2"]);
}

#[test]
fn resume_redoes_a_deleted_shard_of_its_part_only() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let out = tmp.path().join("out");
    for i in 0..3 {
        part_ok(&pair, &out, &format!("{i}/3"));
    }
    let mine = recorded_files(&out, 1, 3);
    let victim = mine
        .iter()
        .find(|n| n.ends_with(".safetensors"))
        .expect("part 1/3 has a shard")
        .clone();
    let mtimes = |out: &Path| -> Vec<(String, std::time::SystemTime)> {
        let mut v: Vec<_> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| {
                let name = e.file_name().into_string().unwrap();
                (name, e.metadata().unwrap().modified().unwrap())
            })
            .collect();
        v.sort();
        v
    };
    let before = mtimes(&out);
    std::fs::remove_file(out.join(&victim)).unwrap();

    // Without --resume the part refuses, naming what to do.
    let o = part_with(&pair, &out, ALPHA, "1/3", &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));

    let o = part_with(&pair, &out, ALPHA, "1/3", &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.join(&victim).exists(), "{victim} was not redone");
    assert_eq!(read_record(&out, 1, 3)["complete"], true);
    // Every other file, this part's other shards included, was kept as it was.
    let after = mtimes(&out);
    let unchanged =
        |v: &[(String, std::time::SystemTime)]| -> Vec<(String, std::time::SystemTime)> {
            v.iter().filter(|(n, _)| *n != victim).cloned().collect()
        };
    assert_eq!(unchanged(&before), unchanged(&after));

    finalize_ok(&out);
    let single = tmp.path().join("single");
    single_run(&pair, &single);
    assert_same_tree(&single, &out);
}

/// The content `lock` writes into a lock file it holds.
fn lock_holder(out: &Path, part: &str) -> String {
    std::fs::read_to_string(out.join(WORK).join(format!("{part}.lock"))).unwrap_or_default()
}

#[test]
fn same_part_twice_at_once_is_refused_by_the_lock() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let out = tmp.path().join("out");

    // A real second process: catch the first while it holds the part's lock (SIGSTOP), start
    // the same part again, then let the first go on. The first may finish before it is caught;
    // then try again.
    let mut caught = false;
    for _attempt in 0..20 {
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
        }
        let mut first = part_command(&pair, &out, ALPHA, "1/2", &["--chunk-size", "8"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = first.id().to_string();
        let want = format!("pid {pid}");
        let mut stopped = false;
        while first.try_wait().unwrap().is_none() {
            if lock_holder(&out, "part-1-of-2").trim() == want {
                let kill = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
                assert!(kill.success());
                stopped = true;
                break;
            }
            std::thread::yield_now();
        }
        if !stopped {
            first.wait().unwrap();
            continue;
        }
        // Stopped, but possibly after it finished its work: only count it if it is unfinished.
        let finished = std::fs::read(record_path(&out, 1, 2))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|r| r["complete"] == true);
        let second = part_with(&pair, &out, ALPHA, "1/2", &["--resume"]);
        Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        let first = first.wait_with_output().unwrap();
        assert!(first.status.success(), "first: {}", stderr(&first));
        if finished {
            continue;
        }
        let msg = stderr(&second);
        assert_eq!(second.status.code(), Some(2), "second run: {msg}");
        assert!(
            msg.contains("another mergestream run is writing part 1/2") && msg.contains(&want),
            "{msg}"
        );
        caught = true;
        break;
    }
    assert!(
        caught,
        "never caught the first run holding its lock in 20 attempts"
    );

    // Deterministically, with the lock held in this process by the library itself: the same
    // part is refused, another part runs meanwhile.
    let out = tmp.path().join("held");
    let (_, _, plan) = mergestream::plan_expo(
        &pair.join("sft"),
        &pair.join("aligned"),
        0.3,
        mergestream::units::parse_size(SHARD).unwrap(),
    )
    .unwrap();
    let held = mergestream::output::OutputDir::open(
        &out,
        &[&pair.join("sft"), &pair.join("aligned")],
        &plan,
        mergestream::plan::Part::parse("1/2").unwrap(),
        mergestream::output::Existing::Resume,
        mergestream::writer::IoMode::Auto,
        None,
    )
    .unwrap();
    let o = part_with(&pair, &out, ALPHA, "1/2", &["--resume"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another mergestream run is writing part 1/2"),
        "{}",
        stderr(&o)
    );
    part_ok(&pair, &out, "0/2");
    finalize_refuses(&out, &["part 1/2 is not complete"]);
    drop(held);
    let o = part_with(&pair, &out, ALPHA, "1/2", &["--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    finalize_ok(&out);
    let single = tmp.path().join("single");
    single_run(&pair, &single);
    assert_same_tree(&single, &out);
}

#[test]
fn part_after_finalize_is_refused_and_leaves_output_intact() {
    let tmp = tempdir();
    let pair = make_pair(&tmp.path().join("pair"), "1");
    let out = tmp.path().join("out");
    part_ok(&pair, &out, "0/2");
    part_ok(&pair, &out, "1/2");
    finalize_ok(&out);
    let before = tree_digest(&out);
    for extra in [&[][..], &["--resume"][..]] {
        let o = part_with(&pair, &out, ALPHA, "1/2", extra);
        let msg = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{msg}");
        assert!(
            msg.contains("already a finished output") && msg.contains("part 1/2"),
            "{msg}"
        );
        // The refusal touched nothing: no work directory appeared, and it still verifies.
        assert_eq!(tree_digest(&out), before);
        run_ok(&["verify", out.to_str().unwrap(), "--quiet"]);
    }
    let o = finalize(&out);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already finalized"), "{}", stderr(&o));
}
