//! Faults: a run killed at every stage, resumed; a full disk; an unwritable output; two runs at
//! once; inputs changed underneath; SIGINT and SIGTERM. Killing and pausing at exact points uses
//! the failpoints in `src/failpoint.rs`: the process really gets SIGKILL.

use crate::common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHARD: &str = "60KB";

/// A generated pair and the output of an uninterrupted run, to compare against.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempdir();
        synth(
            &dir.path().join("pair"),
            &["--preset", "tiny-llama", "--layers", "3", "--int-buffer"],
        );
        let f = Fixture { dir };
        let r = expo(
            &f.pair(),
            &f.reference(),
            "0.3",
            &["--max-shard-size", SHARD],
        );
        assert!(r.status.success(), "{}", stderr(&r));
        f
    }
    fn pair(&self) -> PathBuf {
        self.dir.path().join("pair")
    }
    fn reference(&self) -> PathBuf {
        self.dir.path().join("reference")
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn command(&self, out: &Path, extra: &[&str]) -> Command {
        let pair = self.pair();
        let mut args = vec!["--max-shard-size", SHARD];
        args.extend_from_slice(extra);
        let mut cmd = Command::new(bin());
        cmd.args(expo_args(
            pair.to_str().unwrap(),
            out.to_str().unwrap(),
            "0.3",
            &args,
        ))
        .env("MERGESTREAM_FAILPOINT_DIR", self.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        cmd
    }
    /// Starts a run that pauses at `point`, and waits until it is there.
    fn start_paused(&self, out: &Path, point: &str) -> Child {
        let _ = std::fs::remove_file(self.path(&format!("reached-{point}")));
        let _ = std::fs::remove_file(self.path(&format!("continue-{point}")));
        let child = self
            .command(out, &[])
            .env("MERGESTREAM_FAILPOINT", format!("{point}:pause"))
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !self.path(&format!("reached-{point}")).exists() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the run never reached {point}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child
    }
    fn release(&self, point: &str) {
        std::fs::write(self.path(&format!("continue-{point}")), b"").unwrap();
    }
}

/// Every file in `out` with a final name is complete: byte-identical to the uninterrupted run's
/// file of that name. No manifest exists. Temporaries live only in the work directory.
fn assert_nothing_looks_complete(f: &Fixture, out: &Path) {
    let reference = tree_digest(&f.reference());
    for (name, digest) in tree_digest(out) {
        if name == ".mergestream" {
            continue;
        }
        assert_ne!(
            name, "checksums.b3",
            "an interrupted run must not leave a manifest"
        );
        assert_eq!(
            reference.get(&name),
            Some(&digest),
            "{name} has a final name but is not complete"
        );
    }
}

fn temporaries(out: &Path) -> Vec<String> {
    let work = out.join(".mergestream");
    let Ok(entries) = std::fs::read_dir(work) else {
        return vec![];
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn killed_at_every_stage_then_resumed_is_byte_identical() {
    let f = Fixture::new();
    for point in [
        "shard-data",
        "shard-renamed",
        "before-finalize",
        "finalize-index",
    ] {
        let out = f.path(&format!("out-{point}"));
        let r = f
            .command(&out, &[])
            .env("MERGESTREAM_FAILPOINT", format!("{point}:kill"))
            .output()
            .unwrap();
        assert_eq!(
            r.status.signal(),
            Some(9),
            "{point}: expected SIGKILL, got {:?}",
            r.status
        );
        assert_nothing_looks_complete(&f, &out);

        // Without --resume the run refuses to touch it, and says what to do.
        let again = f.command(&out, &[]).output().unwrap();
        assert_eq!(again.status.code(), Some(2), "{point}");
        assert!(
            stderr(&again).contains("--resume"),
            "{point}: {}",
            stderr(&again)
        );

        let resumed = f.command(&out, &["--resume"]).output().unwrap();
        assert!(resumed.status.success(), "{point}: {}", stderr(&resumed));
        assert_same_tree(&f.reference(), &out);
    }
}

#[test]
fn resume_keeps_finished_shards_and_redoes_damaged_ones() {
    let f = Fixture::new();
    let out = f.path("out");
    let r = f
        .command(&out, &[])
        .env("MERGESTREAM_FAILPOINT", "before-finalize:kill")
        .output()
        .unwrap();
    assert_eq!(r.status.signal(), Some(9));
    let shards: Vec<String> = tree_digest(&out)
        .into_keys()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 3, "{shards:?}");
    // Damage one finished shard: resume must notice (blake3) and write it again.
    let damaged = out.join(&shards[1]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&damaged, bytes).unwrap();
    let resumed = f
        .command(&out, &["--resume"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_same_tree(&f.reference(), &out);
    // Without --quiet the summary says what was kept.
    let out2 = f.path("out2");
    let r = f
        .command(&out2, &[])
        .env("MERGESTREAM_FAILPOINT", "before-finalize:kill")
        .output()
        .unwrap();
    assert_eq!(r.status.signal(), Some(9));
    let pair = f.pair();
    let r = run(&[
        "expo",
        "--sft",
        pair.join("sft").to_str().unwrap(),
        "--aligned",
        pair.join("aligned").to_str().unwrap(),
        "--alpha",
        "0.3",
        "--out",
        out2.to_str().unwrap(),
        "--max-shard-size",
        SHARD,
        "--resume",
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(
        stderr(&r).contains(&format!("written in 0 shards, {} kept", shards.len())),
        "{}",
        stderr(&r)
    );
    assert_same_tree(&f.reference(), &out2);
}

#[test]
fn resume_refuses_a_run_with_other_options() {
    let f = Fixture::new();
    let out = f.path("out");
    let r = f
        .command(&out, &[])
        .env("MERGESTREAM_FAILPOINT", "before-finalize:kill")
        .output()
        .unwrap();
    assert_eq!(r.status.signal(), Some(9));
    let pair = f.pair();
    let r = expo(&pair, &out, "0.4", &["--max-shard-size", SHARD, "--resume"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        stderr(&r).contains("other inputs or options"),
        "{}",
        stderr(&r)
    );
}

#[test]
fn sigint_and_sigterm_remove_temporaries_and_exit_130_143() {
    let f = Fixture::new();
    for (signal, code, name) in [
        (libc_sig::SIGINT, 130, "SIGINT"),
        (libc_sig::SIGTERM, 143, "SIGTERM"),
    ] {
        let out = f.path(&format!("out-{name}"));
        let child = f.start_paused(&out, "shard-data");
        assert!(
            !temporaries(&out).is_empty(),
            "a shard is being written at this point"
        );
        send(&child, signal);
        let r = child.wait_with_output().unwrap();
        assert_eq!(r.status.code(), Some(code), "{name}: {}", stderr(&r));
        assert!(
            stderr(&r).contains(&format!("interrupted by {name}")),
            "{}",
            stderr(&r)
        );
        assert_eq!(
            temporaries(&out),
            Vec::<String>::new(),
            "{name}: temporaries left"
        );
        assert_nothing_looks_complete(&f, &out);
        let resumed = f.command(&out, &["--resume"]).output().unwrap();
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        assert_same_tree(&f.reference(), &out);
    }
}

#[test]
fn a_second_run_into_the_same_output_is_refused() {
    let f = Fixture::new();
    let out = f.path("out");
    let first = f.start_paused(&out, "shard-data");
    let second = f.command(&out, &["--resume"]).output().unwrap();
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("another mergestream run is writing part 0/1"),
        "{}",
        stderr(&second)
    );
    f.release("shard-data");
    let r = first.wait_with_output().unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same_tree(&f.reference(), &out);
}

#[test]
fn an_input_truncated_or_rewritten_during_the_run_is_an_error() {
    let f = Fixture::new();
    let shard = f.pair().join("aligned/model-00001-of-00002.safetensors");
    let original = std::fs::read(&shard).unwrap();
    for (case, damage) in [
        (
            "truncated",
            &(|p: &Path, b: &[u8]| std::fs::write(p, &b[..b.len() / 2]).unwrap())
                as &dyn Fn(&Path, &[u8]),
        ),
        ("rewritten", &|p: &Path, b: &[u8]| {
            let mut b = b.to_vec();
            let at = b.len() - 10;
            b[at] ^= 1;
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .map(|file| {
                    use std::os::unix::fs::FileExt;
                    std::thread::sleep(Duration::from_millis(20)); // a visible mtime step
                    file.write_all_at(&b, 0).unwrap();
                })
                .unwrap();
        }),
    ] {
        let out = f.path(&format!("out-{case}"));
        let child = f.start_paused(&out, "shard-data");
        damage(&shard, &original);
        f.release("shard-data");
        let r = child.wait_with_output().unwrap();
        std::fs::write(&shard, &original).unwrap();
        assert_eq!(r.status.code(), Some(2), "{case}: {}", stderr(&r));
        let err = stderr(&r);
        assert!(err.contains("input changed while reading"), "{case}: {err}");
        assert!(
            err.contains("model-00001-of-00002.safetensors"),
            "{case}: {err}"
        );
        assert_eq!(temporaries(&out), Vec::<String>::new());
        // Shards finished before the change are complete and correct; none after it exist.
        assert_nothing_looks_complete(&f, &out);
    }
}

/// A small tmpfs at `at` with mount `options`, or `None` where mounting is not allowed.
fn tmpfs(at: &Path, options: &str) -> Option<Mount> {
    Mount::new(at, &["-t", "tmpfs", "-o", options, "tmpfs"])
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_no_temporaries() {
    let f = Fixture::new();
    let Some(mount) = tmpfs(&f.path("small"), "size=160k") else {
        return;
    };
    let out = mount.0.join("out");
    let r = f.command(&out, &[]).output().unwrap();
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    let err = stderr(&r);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(out.to_str().unwrap()), "names the file: {err}");
    assert_eq!(temporaries(&out), Vec::<String>::new(), "temporaries left");
    assert_nothing_looks_complete(&f, &out);
}

#[test]
fn an_unwritable_output_is_refused_before_any_work() {
    let f = Fixture::new();
    let Some(mount) = tmpfs(&f.path("ro"), "ro,size=64k") else {
        return;
    };
    // The inputs are not models (empty directories): the output is checked first, so that is
    // the error reported.
    let inputs = tempdir();
    let (sft, aligned) = (
        inputs.path().join("nonmodel-a"),
        inputs.path().join("nonmodel-b"),
    );
    std::fs::create_dir(&sft).unwrap();
    std::fs::create_dir(&aligned).unwrap();
    for out in [mount.0.clone(), mount.0.join("new")] {
        let r = run(&[
            "expo",
            "--sft",
            sft.to_str().unwrap(),
            "--aligned",
            aligned.to_str().unwrap(),
            "--alpha",
            "0.3",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(r.status.code(), Some(2));
        let err = stderr(&r);
        assert!(err.contains("is not writable"), "{err}");
        assert!(!err.contains("nonmodel"), "{err}");
    }
    let file = f.path("a-file");
    std::fs::write(&file, "x").unwrap();
    let r = f.command(&file, &[]).output().unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(
        stderr(&r).contains("exists and is not a directory"),
        "{}",
        stderr(&r)
    );
}

mod libc_sig {
    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;
}

fn send(child: &Child, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_compressed_run_killed_then_resumed_unpacks_to_the_uninterrupted_bytes() {
    let f = Fixture::new();
    for point in ["shard-data", "shard-renamed", "before-finalize"] {
        let out = f.path(&format!("compressed-{point}"));
        let r = f
            .command(&out, &["--compress"])
            .env("MERGESTREAM_FAILPOINT", format!("{point}:kill"))
            .output()
            .unwrap();
        assert_eq!(r.status.signal(), Some(9), "{point}: {:?}", r.status);
        for name in tree_digest(&out).into_keys() {
            assert!(
                name != "checksums.b3" && name != "packed.b3",
                "{point}: an interrupted run left {name}"
            );
        }
        let resumed = f
            .command(&out, &["--compress", "--resume"])
            .output()
            .unwrap();
        assert!(resumed.status.success(), "{point}: {}", stderr(&resumed));
        assert!(temporaries(&out).is_empty());
        run_ok(&["verify", out.to_str().unwrap(), "-q"]);
        let restored = f.path(&format!("restored-{point}"));
        run_ok(&[
            "unpack",
            out.to_str().unwrap(),
            "--out",
            restored.to_str().unwrap(),
            "-q",
        ]);
        assert_same_tree(&f.reference(), &restored);
    }
}
