//! A closed stdout ends the job quietly: every command that prints to stdout (`inspect`,
//! `inspect --json`, `plan`, `verify`, `--help`, `--version`) exits 0 with nothing on stderr
//! when whoever reads its output has gone — both into a pipe whose reading end is already
//! closed (every write fails with EPIPE) and through a real `| head -1` shell pipeline with more
//! output than a pipe holds.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::*;

/// A pair big enough that `inspect` and `plan` print well over a pipe's 64 KiB, and a finished
/// output of it. Returns (scratch dir, pair dir, output dir).
fn scene() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, &["--layers", "150"]);
    let out = dir.path().join("out");
    let r = expo(&pair, &out, "0.3", &["--max-shard-size", "10MB"]);
    assert!(r.status.success(), "{}", stderr(&r));
    (dir, pair, out)
}

/// The commands under test, as argument lists.
fn commands(pair: &Path, out: &Path) -> Vec<Vec<String>> {
    let p = |s: &str| pair.join(s).to_str().unwrap().to_owned();
    let s = |x: &str| x.to_owned();
    vec![
        vec![s("inspect"), p("aligned")],
        vec![s("inspect"), s("--json"), p("sft")],
        vec![
            s("plan"),
            s("--sft"),
            p("sft"),
            s("--aligned"),
            p("aligned"),
            s("--alpha"),
            s("0.3"),
            s("--max-shard-size"),
            s("1"),
        ],
        vec![s("verify"), out.to_str().unwrap().to_owned()],
        vec![s("--help")],
        vec![s("expo"), s("--help")],
        vec![s("--version")],
    ]
}

/// Runs `mergestream ARGS` with stdout a pipe nobody will ever read.
fn into_closed_pipe(args: &[String]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(bin())
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let (_dir, pair, out) = scene();
    for args in commands(&pair, &out) {
        // Each command does print something to a stdout that is open.
        let open = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(open.status.success(), "{args:?}: {}", stderr(&open));
        assert!(!open.stdout.is_empty(), "{args:?} prints nothing");
        let closed = into_closed_pipe(&args);
        assert_eq!(
            (closed.status.code(), stderr(&closed)),
            (Some(0), String::new()),
            "{args:?}"
        );
    }
}

#[test]
fn piping_into_head_exits_0_with_nothing_on_stderr() {
    let (_dir, pair, out) = scene();
    for args in commands(&pair, &out) {
        let r = Command::new("bash")
            .arg("-c")
            .arg(r#"set -o pipefail; "$@" | head -1"#)
            .arg("bash")
            .arg(bin())
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            (r.status.code(), stderr(&r)),
            (Some(0), String::new()),
            "{args:?} | head -1"
        );
        assert_eq!(
            String::from_utf8_lossy(&r.stdout).lines().count(),
            1,
            "{args:?}"
        );
    }
}

#[test]
fn other_stdout_errors_are_still_errors() {
    // A full disk is not a reader that left: /dev/full fails every write with ENOSPC.
    let (_dir, pair, _out) = scene();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let r = Command::new(bin())
        .args(["inspect", pair.join("aligned").to_str().unwrap()])
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(
        stderr(&r).starts_with("mergestream: error: writing to stdout: "),
        "{}",
        stderr(&r)
    );
}
