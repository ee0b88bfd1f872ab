//! Fault injection for the crash-safety tests: named points in a run where, when the
//! `MERGESTREAM_FAILPOINT` environment variable names them, the process kills itself with
//! SIGKILL (`NAME:kill`) or pauses (`NAME:pause`) until the test lets it go on.
//!
//! Compiled in only with the `failpoints` cargo feature (`scripts/test.sh` turns it on for the
//! fault tests): without it [`hit`] is an empty inline function, so the product has no hidden
//! behaviour driven by the environment. A pause creates `$MERGESTREAM_FAILPOINT_DIR/reached-NAME`
//! and waits (at most a minute) for `continue-NAME` beside it, or for the run to be cancelled.
//! Points sit at coarse places (per shard, per run), never in the per-chunk hot path, and cost
//! one environment lookup when the feature is on and the variable unset.

/// Acts on the failpoint `name` if the environment asks for it; `cancelled` ends a pause early.
#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &str, cancelled: &dyn Fn() -> bool) {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

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

/// Without the `failpoints` feature a failpoint is nothing at all.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str, _cancelled: &dyn Fn() -> bool) {}
