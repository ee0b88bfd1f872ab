//! mergestream: merge model checkpoints by streaming them from disk.
//!
//! The public API mirrors the command line: [`plan_expo`] checks two models and plans a merge,
//! [`expo`] plans and runs it (or one part of it), [`output::finalize`] completes a partitioned
//! run, [`verify::verify`] checks a finished output. Every error is an [`Error`], whose variants
//! say what went wrong in fields a caller can match on. The pieces, each ignorant of the others'
//! concerns:
//!
//! - [`mod@format`] parses and writes safetensors headers and shard indexes;
//! - [`model`] opens and validates input models;
//! - [`plan`] decides every byte of the output from the headers and options;
//! - [`kernel`] is the arithmetic, on slices;
//! - [`pipeline`] moves chunks from the inputs through the kernel to a sink, in bounded memory;
//! - [`output`] is that sink: temporary files, renames, records, locks, finalizing (and
//!   `checksums.b3`, the blake3 manifest);
//! - [`verify`] checks a finished output; [`synth`] makes model pairs to try things on.
//!
//! What the library does not do: print (only `main.rs` does), parse command lines, or read
//! tensor data anywhere but in the pipeline.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod error;
mod failpoint;
pub mod format;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
pub(crate) mod manifest;
pub mod model;
pub mod output;
pub mod paths;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod synth;
pub mod units;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::time::Instant;

use error::UsageError;
pub use error::{Error, Result};
use kernel::Isa;
use model::Model;
use output::{Existing, OutputDir, ShardWriter};
use pipeline::{Cancel, Settings};
use plan::{Part, Plan};
use writer::IoMode;

/// Memory kept aside from `--memory` for everything but chunk buffers: the program, thread
/// stacks, headers and plans.
pub const MEMORY_RESERVE: u64 = 32 << 20;
/// The default `--memory`.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// The default `--max-shard-size`, as `transformers` defaults it (5 GB, decimal).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// An ExPO run, as the command line describes it.
#[derive(Debug, Clone)]
pub struct ExpoJob {
    /// The SFT model: a model directory or a `.safetensors` file.
    pub sft: PathBuf,
    /// The aligned model, whose dtypes and non-weight files the output takes.
    pub aligned: PathBuf,
    /// The output directory (created if missing).
    pub out: PathBuf,
    /// Extrapolation strength: `aligned + alpha * (aligned - sft)`.
    pub alpha: f32,
    /// Largest output shard in bytes of tensor data (a larger tensor gets a shard of its own).
    pub max_shard_size: u64,
    /// Cap on the process's memory; chunk buffers get all of it but [`MEMORY_RESERVE`].
    pub memory: u64,
    /// Compute threads.
    pub threads: usize,
    /// Chunk size override (testing); output bytes never depend on it.
    pub chunk_bytes: Option<usize>,
    /// One part of a partitioned run (finalized later by [`output::finalize`]), or `None` for
    /// a whole run, which finalizes itself.
    pub part: Option<Part>,
    /// What to do with earlier output in `out`.
    pub existing: Existing,
    /// Show a progress bar on stderr (when it is a terminal).
    pub show_progress: bool,
    /// How output files are written.
    pub io: IoMode,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Tensors in the shards this run (or part) is responsible for.
    pub tensors: usize,
    /// Shards written by this run.
    pub shards_written: usize,
    /// Shards an earlier, interrupted run had finished (`--resume`), kept.
    pub shards_kept: usize,
    /// Bytes of the shards written.
    pub bytes_written: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The kernel that ran.
    pub isa: Isa,
    /// How shards were written: [`IoMode::Direct`], or [`IoMode::Buffered`] when the output
    /// filesystem refused direct I/O (or it was asked for).
    pub io: IoMode,
    /// Whether this run also finalized the output (a whole run does).
    pub finalized: bool,
    /// Files of the aligned model directory not copied to the output, with why.
    pub skipped_files: Vec<(String, &'static str)>,
}

/// Opens both models and plans the merge, writing nothing.
pub fn plan_expo(
    sft: &std::path::Path,
    aligned: &std::path::Path,
    alpha: f32,
    max_shard_size: u64,
) -> Result<(Model, Model, Plan)> {
    let sft = Model::open(sft)?;
    let aligned = Model::open(aligned)?;
    let plan = Plan::expo(&sft, &aligned, alpha, max_shard_size)?;
    Ok((sft, aligned, plan))
}

/// Runs `job`: plans, then writes this part's shards (all of them for a whole run), and for a
/// whole run finalizes the output.
pub fn expo(job: &ExpoJob, cancel: &Cancel) -> Result<Summary> {
    let started = Instant::now();
    // Before anything is created or removed (the precheck creates a probe file).
    let inputs = [job.sft.as_path(), job.aligned.as_path()];
    paths::check_overlap(&job.out, &inputs)?;
    output::precheck(&job.out)?;
    let isa = kernel::Isa::select().map_err(UsageError::Isa)?;
    let budget = job
        .memory
        .checked_sub(MEMORY_RESERVE)
        .filter(|&b| b > 0)
        .ok_or(UsageError::MemoryBelowReserve {
            reserve: MEMORY_RESERVE,
        })?;
    let mut settings = Settings::for_budget(budget, job.threads, isa)?;
    if let Some(chunk) = job.chunk_bytes {
        settings.chunk_bytes = chunk.max(8) & !7;
    }
    let (sft, aligned, plan) = plan_expo(&job.sft, &job.aligned, job.alpha, job.max_shard_size)?;
    let part = job.part.unwrap_or(Part::WHOLE);
    let mut dir = OutputDir::open(&job.out, &inputs, &plan, part, job.existing, job.io)?;

    let mine = plan.shards_of(part);
    let todo: Vec<usize> = mine
        .iter()
        .copied()
        .filter(|&s| !dir.has(&plan.shards[s].name))
        .collect();
    let bytes: u64 = todo.iter().map(|&s| plan.shards[s].file_len()).sum();
    let bar = progress::Bar::new(bytes, job.show_progress);
    let mut writer = ShardWriter::new(&mut dir);
    let result = pipeline::run(
        &plan,
        &sft,
        &aligned,
        &todo,
        &settings,
        &mut writer,
        &bar,
        cancel,
    );
    bar.finish();
    result?;
    let buffered = writer.buffered;
    if part.index == 0 {
        for f in &plan.extra_files {
            if !dir.has(&f.name) {
                dir.copy_file(&f.source, &f.name)?;
            }
        }
    }
    dir.complete()?;
    drop(dir);
    failpoint::hit("before-finalize", &|| false);
    let finalize = job.part.is_none();
    if finalize {
        output::finalize(&job.out, Some(Part::WHOLE))?;
    }
    Ok(Summary {
        tensors: mine.iter().map(|&s| plan.shards[s].tensors.len()).sum(),
        shards_written: todo.len(),
        shards_kept: mine.len() - todo.len(),
        bytes_written: bytes,
        seconds: started.elapsed().as_secs_f64(),
        isa,
        io: if buffered {
            IoMode::Buffered
        } else {
            IoMode::Direct
        },
        finalized: finalize,
        skipped_files: plan.skipped_files,
    })
}
