//! How busy each stage of a run was, so a user can see where the time goes (a slow network
//! filesystem shows as a reader busy all the time, a slow disk as a busy I/O stage), and how
//! much input the run read (methods with reduction passes read their inputs more than once).
//!
//! Each stage adds the time it spent working — not waiting on a channel — to its counter; the
//! end-of-run summary divides by the wall time (and, for stages with several threads, by their
//! number). Counting costs two clock reads per chunk or buffer. Nothing here changes what a run
//! does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading input chunks (pread, decompression).
    Read,
    /// The kernels of method and combine ops, summed over the compute workers.
    Compute,
    /// Putting chunks in order and copying them into the output files' staging buffers, or, for
    /// ExPO, computing them there.
    Write,
    /// blake3 of the output files, summed over their hasher threads.
    Hash,
    /// Writing staging buffers to disk and syncing, summed over the outputs' I/O threads.
    Io,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 5] = [
        Stage::Read,
        Stage::Compute,
        Stage::Write,
        Stage::Hash,
        Stage::Io,
    ];

    /// Its name in summaries.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "reader",
            Stage::Compute => "compute",
            Stage::Write => "writer",
            Stage::Hash => "hasher",
            Stage::Io => "disk writes",
        }
    }
}

/// Working time per stage, and the bytes of input read.
#[derive(Debug, Default)]
pub struct Busy {
    nanos: [AtomicU64; 5],
    read: AtomicU64,
}

impl Busy {
    /// Runs `f`, adding its duration to `stage`.
    pub fn time<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = f();
        self.add(stage, started.elapsed());
        result
    }

    /// Adds `d` to `stage`.
    pub fn add(&self, stage: Stage, d: Duration) {
        self.nanos[stage as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// `bytes` more bytes of input were read.
    pub fn add_read(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes of input read (every reduction pass reads its inputs again).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Time `stage` spent working.
    pub fn get(&self, stage: Stage) -> Duration {
        Duration::from_nanos(self.nanos[stage as usize].load(Ordering::Relaxed))
    }
}
