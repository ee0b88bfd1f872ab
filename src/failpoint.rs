//! Fault injection for the crash-safety tests: named points in a run where, when the
//! `MERGESTREAM_FAILPOINT` environment variable names them, the process kills itself with
//! SIGKILL (`NAME:kill`) or pauses (`NAME:pause`) until the test lets it go on.
//!
//! A pause creates `$MERGESTREAM_FAILPOINT_DIR/reached-NAME` and waits (at most a minute) for
//! `continue-NAME` beside it, or for the run to be cancelled. Points sit at coarse places (per
//! shard, per run), never in the per-chunk hot path, and cost one environment lookup when unset.

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Acts on the failpoint `name` if the environment asks for it; `cancelled` ends a pause early.
pub fn hit(name: &str, cancelled: &dyn Fn() -> bool) {
    let Ok(spec) = std::env::var("MERGESTREAM_FAILPOINT") else {
        return;
    };
    let Some((point, action)) = spec.split_once(':') else {
        return;
    };
    if point != name {
        return;
    }
    match action {
        "kill" => {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            // SIGKILL cannot be caught; wait for it to land.
            std::thread::sleep(Duration::from_secs(60));
        }
        "pause" => {
            let dir =
                PathBuf::from(std::env::var_os("MERGESTREAM_FAILPOINT_DIR").unwrap_or_default());
            let _ = std::fs::write(dir.join(format!("reached-{name}")), b"");
            let go = dir.join(format!("continue-{name}"));
            let started = Instant::now();
            while !go.exists() && !cancelled() && started.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        _ => {}
    }
}
