//! mergestream: merge model checkpoints by streaming them from disk.
//!
//! The public API mirrors the command line: [`expo`] plans and runs an ExPO merge (or one part
//! of it), [`output::finalize`] completes a partitioned run, [`verify::verify`] checks a
//! finished output. The pieces, each ignorant of the others' concerns:
//!
//! - [`format`] parses and writes safetensors headers and shard indexes;
//! - [`model`] opens and validates input models;
//! - [`plan`] decides every byte of the output from the headers and options;
//! - [`kernel`] is the arithmetic, on slices;
//! - [`pipeline`] moves chunks from the inputs through the kernel to a sink, in bounded memory;
//! - [`output`] is that sink: temporary files, renames, records, locks, finalizing;
//! - [`manifest`] is `checksums.b3`;
//! - [`packed`] is the zstd-packed shard format: `pack`, `unpack` and random-access reads.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod error;
#[doc(hidden)]
pub mod failpoint;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
pub mod manifest;
pub mod model;
pub mod output;
pub mod packed;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod synth;
pub mod units;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::time::Instant;

pub use error::{Error, Result};
use model::Model;
use output::{Existing, OutputDir, ShardWriter};
use pipeline::{Cancel, Settings};
use plan::{Part, Plan};

/// Memory kept aside from `--memory` for everything but chunk buffers: the program, thread
/// stacks, headers and plans.
pub const MEMORY_RESERVE: u64 = 32 << 20;
/// The default `--memory`.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// An ExPO run, as the command line describes it.
#[derive(Debug, Clone)]
pub struct ExpoJob {
    pub sft: PathBuf,
    pub aligned: PathBuf,
    pub out: PathBuf,
    pub alpha: f32,
    pub max_shard_size: u64,
    /// Cap on the process's memory; chunk buffers get all of it but [`MEMORY_RESERVE`].
    pub memory: u64,
    pub threads: usize,
    /// Chunk size override (testing); output bytes never depend on it.
    pub chunk_bytes: Option<usize>,
    /// One part of a partitioned run (finalized later by [`output::finalize`]), or `None` for
    /// a whole run, which finalizes itself.
    pub part: Option<Part>,
    pub existing: Existing,
    pub show_progress: bool,
    pub io: writer::IoMode,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub tensors: usize,
    pub shards_written: usize,
    pub shards_kept: usize,
    pub bytes_written: u64,
    pub seconds: f64,
    pub isa: &'static str,
    /// "direct" or "buffered" (the output filesystem refused direct I/O).
    pub io: &'static str,
    /// Whether this run also finalized the output (a whole run does).
    pub finalized: bool,
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
    output::precheck(&job.out)?;
    let isa = kernel::Isa::select().map_err(Error::Usage)?;
    let budget = job.memory.checked_sub(MEMORY_RESERVE).ok_or_else(|| {
        Error::Usage(format!(
            "--memory must be more than {} MiB",
            MEMORY_RESERVE >> 20
        ))
    })?;
    let mut settings = Settings::for_budget(budget, job.threads, isa)?;
    if let Some(chunk) = job.chunk_bytes {
        settings.chunk_bytes = chunk.max(8) & !7;
    }
    let (sft, aligned, plan) = plan_expo(&job.sft, &job.aligned, job.alpha, job.max_shard_size)?;
    let part = job.part.unwrap_or(Part::WHOLE);
    let mut dir = OutputDir::open(&job.out, &plan, part, job.existing, job.io)?;

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
        isa: isa.name(),
        io: if buffered { "buffered" } else { "direct" },
        finalized: finalize,
        skipped_files: plan.skipped_files,
    })
}
