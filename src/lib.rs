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

pub mod busy;
pub mod error;
mod failpoint;
pub mod format;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod kernel;
pub mod manifest;
pub mod method;
pub mod model;
pub mod output;
pub mod paths;
pub mod pipeline;
pub mod plan;
pub mod progress;
#[allow(missing_docs)] // being documented: see the `docs` branch
pub mod spec;
pub mod synth;
pub mod units;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::time::Instant;

use error::UsageError;
pub use error::{Error, Result};
use kernel::Isa;
use method::{Method, Note, Policy, Recipe};
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

/// An ExPO run, as the command line describes it: one output, or with several alphas a sweep
/// (`OUT/alpha-0.1/`, `OUT/alpha-0.2/`, …) written from one read of the inputs.
#[derive(Debug, Clone)]
pub struct ExpoJob {
    /// The SFT model: a model directory or a `.safetensors` file.
    pub sft: PathBuf,
    /// The aligned model, whose dtypes and non-weight files the output takes.
    pub aligned: PathBuf,
    /// The output directory (created if missing).
    pub out: PathBuf,
    /// Extrapolation strengths: one output each (`aligned + alpha * (aligned - sft)`).
    pub alphas: Vec<f32>,
    /// Where the two models may disagree.
    pub policy: Policy,
    /// How the run goes about its work.
    pub options: RunOptions,
}

impl ExpoJob {
    /// The general job this ExPO run is.
    pub fn to_merge_job(&self) -> Result<MergeJob> {
        let mut seen = Vec::new();
        for &alpha in &self.alphas {
            if seen.contains(&alpha.to_bits()) {
                return Err(UsageError::AlphaTwice { alpha }.into());
            }
            seen.push(alpha.to_bits());
        }
        let outputs = match self.alphas.as_slice() {
            [] => return Err(Error::internal("an ExPO job without an alpha")),
            &[alpha] => vec![OutputJob {
                out: self.out.clone(),
                recipe: Recipe {
                    method: Method::Expo { alpha },
                    models: vec![0, 1],
                    policy: self.policy,
                },
            }],
            alphas => alphas
                .iter()
                .map(|&alpha| OutputJob {
                    out: self.out.join(format!("alpha-{alpha}")),
                    recipe: Recipe {
                        method: Method::Expo { alpha },
                        models: vec![0, 1],
                        policy: self.policy,
                    },
                })
                .collect(),
        };
        Ok(MergeJob {
            models: vec![self.sft.clone(), self.aligned.clone()],
            root: (self.alphas.len() > 1).then(|| self.out.clone()),
            outputs,
            options: self.options.clone(),
        })
    }
}

/// How a run goes about its work; none of it changes the output bytes.
#[derive(Debug, Clone)]
pub struct RunOptions {
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

/// One output of a run: where it goes and what it is made of.
#[derive(Debug, Clone)]
pub struct OutputJob {
    /// The output directory (created if missing).
    pub out: PathBuf,
    /// The method and the models it reads.
    pub recipe: Recipe,
}

/// A run: one or more outputs over a list of input models, each input read once.
#[derive(Debug, Clone)]
pub struct MergeJob {
    /// The input models; recipes refer to them by index.
    pub models: Vec<PathBuf>,
    /// The directory holding the outputs' directories, when there are several.
    pub root: Option<PathBuf>,
    /// The outputs, each a method over some of `models`.
    pub outputs: Vec<OutputJob>,
    /// How the run goes about its work.
    pub options: RunOptions,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Outputs written (several in a sweep).
    pub outputs: usize,
    /// Tensors in the shards this run (or part) is responsible for, over every output.
    pub tensors: usize,
    /// Shards written by this run.
    pub shards_written: usize,
    /// Shards an earlier, interrupted run had finished (`--resume`), kept.
    pub shards_kept: usize,
    /// Bytes of the shards written.
    pub bytes_written: u64,
    /// Bytes of input read: each input tensor once, plus once more per reduction pass of the
    /// statistics methods.
    pub bytes_read: u64,
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
    /// What the plans resolved on their own (buffers, extra vocabulary rows), once per output.
    pub notes: Vec<Note>,
    /// Compute workers.
    pub threads: usize,
    /// Working time of each stage (see [`busy::Busy`]).
    pub busy: Vec<(busy::Stage, std::time::Duration)>,
}

impl Summary {
    /// How busy `stage` was over the run, as a fraction of the wall time of one of its threads
    /// (compute has `threads` of them; hashing and disk writes one per output).
    pub fn busy_fraction(&self, stage: busy::Stage) -> f64 {
        let threads = match stage {
            busy::Stage::Compute => self.threads,
            busy::Stage::Hash | busy::Stage::Io => self.outputs,
            busy::Stage::Read | busy::Stage::Write => 1,
        };
        let spent = self
            .busy
            .iter()
            .find(|(s, _)| *s == stage)
            .map_or(0.0, |(_, d)| d.as_secs_f64());
        spent / (self.seconds.max(1e-9) * threads.max(1) as f64)
    }
}

/// The runs a merge config asks for, in the order they must happen: each run writes the
/// outputs whose inputs exist by then, reading each of its inputs once; a document that reads
/// another's output comes in a later run. One output goes to `out`; several go to
/// `out/<name>/` (`out/final/` for the one unnamed document mergekit-multi allows).
pub fn config_runs(
    spec: &spec::MergeSpec,
    out: &std::path::Path,
    policy: Policy,
    options: &RunOptions,
) -> Result<Vec<MergeJob>> {
    use spec::ModelLocation;
    let single = spec.outputs.len() == 1;
    let dir_of = |k: usize| -> PathBuf {
        if single {
            out.to_path_buf()
        } else {
            out.join(spec.outputs[k].name.as_deref().unwrap_or("final"))
        }
    };
    for o in &spec.outputs {
        if o.chat_template.is_some() {
            return Err(UsageError::NotSupported {
                feature: "chat_template",
                hint: "remove it from the config and set the template in the output's tokenizer_config.json",
            }
            .into());
        }
        if !matches!(o.tokenizer_source, spec::TokenizerSource::Default) {
            return Err(UsageError::NotSupported {
                feature: "tokenizer_source",
                hint: "mergekit realigns the embeddings to the chosen tokenizer, which mergestream does not do; without tokenizer_source the base model's (else the first model's) tokenizer files are copied",
            }
            .into());
        }
    }
    let order = spec.run_order();
    let mut done = vec![false; spec.outputs.len()];
    let mut runs = Vec::new();
    let mut remaining: Vec<usize> = order;
    while !remaining.is_empty() {
        let (now, later): (Vec<usize>, Vec<usize>) = remaining
            .iter()
            .partition(|&&k| spec.outputs[k].dependencies().iter().all(|&d| done[d]));
        if now.is_empty() {
            return Err(Error::internal(
                "the config's documents depend on each other in a cycle",
            ));
        }
        let mut models: Vec<PathBuf> = Vec::new();
        let mut outputs = Vec::new();
        for &k in &now {
            let o = &spec.outputs[k];
            let mut indices = Vec::new();
            for entry in &o.models {
                let path = match &entry.model.location {
                    ModelLocation::Output { index, .. } => dir_of(*index),
                    _ => entry.model.dir().expect("not another output").to_path_buf(),
                };
                let i = match models.iter().position(|m| *m == path) {
                    Some(i) => i,
                    None => {
                        models.push(path);
                        models.len() - 1
                    }
                };
                indices.push(i);
            }
            outputs.push(OutputJob {
                out: dir_of(k),
                recipe: Recipe {
                    method: Method::Config(std::sync::Arc::new(method::ConfigMerge {
                        spec: o.clone(),
                    })),
                    models: indices,
                    policy,
                },
            });
        }
        for &k in &now {
            done[k] = true;
        }
        runs.push(MergeJob {
            models,
            root: (!single).then(|| out.to_path_buf()),
            outputs,
            options: options.clone(),
        });
        remaining = later;
    }
    if runs.len() > 1 && options.part.is_some() {
        return Err(UsageError::StagedPartition.into());
    }
    Ok(runs)
}

/// Opens every model of `job` and plans every output, writing nothing.
pub fn plan_job(job: &MergeJob) -> Result<(Vec<Model>, Vec<Plan>)> {
    let models = job
        .models
        .iter()
        .map(|p| Model::open(p))
        .collect::<Result<Vec<_>>>()?;
    let plans = job
        .outputs
        .iter()
        .map(|o| Plan::build(&o.recipe, &models, job.options.max_shard_size))
        .collect::<Result<Vec<_>>>()?;
    Ok((models, plans))
}

/// Opens both models and plans one ExPO output, writing nothing.
pub fn plan_expo(
    sft: &std::path::Path,
    aligned: &std::path::Path,
    alpha: f32,
    max_shard_size: u64,
) -> Result<(Model, Model, Plan)> {
    let models = vec![Model::open(sft)?, Model::open(aligned)?];
    let recipe = Recipe {
        method: Method::Expo { alpha },
        models: vec![0, 1],
        policy: Policy::default(),
    };
    let plan = Plan::build(&recipe, &models, max_shard_size)?;
    let [sft, aligned]: [Model; 2] = models.try_into().expect("two models");
    Ok((sft, aligned, plan))
}

/// Runs an ExPO job (see [`run`]).
pub fn expo(job: &ExpoJob, cancel: &Cancel) -> Result<Summary> {
    run(&job.to_merge_job()?, cancel)
}

/// Runs `job`: plans, then writes this part's shards of every output (all of them for a whole
/// run), reading each input once, and for a whole run finalizes every output.
pub fn run(job: &MergeJob, cancel: &Cancel) -> Result<Summary> {
    let started = Instant::now();
    let opts = &job.options;
    // Before anything is created or removed (the precheck creates a probe file).
    let inputs: Vec<&std::path::Path> = job.models.iter().map(PathBuf::as_path).collect();
    if let Some(root) = &job.root {
        paths::check_overlap(root, &inputs)?;
    }
    for o in &job.outputs {
        paths::check_overlap(&o.out, &inputs)?;
    }
    match &job.root {
        Some(root) => output::precheck(root)?,
        None => {
            for o in &job.outputs {
                output::precheck(&o.out)?;
            }
        }
    }
    let isa = kernel::Isa::select().map_err(UsageError::Isa)?;
    let budget = opts
        .memory
        .checked_sub(MEMORY_RESERVE)
        .filter(|&b| b > 0)
        .ok_or(UsageError::MemoryBelowReserve {
            reserve: MEMORY_RESERVE,
        })?;
    let (models, plans) = plan_job(job)?;
    let part = opts.part.unwrap_or(Part::WHOLE);
    // Outputs listing the same tensors in the same order share one read of the inputs. Each
    // group's settings are decided (and refused) before anything is created.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for k in 0..plans.len() {
        match groups
            .iter_mut()
            .find(|g| plans[g[0]].tensor_names().eq(plans[k].tensor_names()))
        {
            Some(g) => g.push(k),
            None => groups.push(vec![k]),
        }
    }
    let part_shards: Vec<Vec<usize>> = plans.iter().map(|p| p.shards_of(part)).collect();
    let settings = groups
        .iter()
        .map(|group| {
            let shapes: Vec<(&Plan, &[usize])> = group
                .iter()
                .map(|&k| (&plans[k], part_shards[k].as_slice()))
                .collect();
            let (reads, computed) = pipeline::buffers_per_slot(&shapes);
            let mut settings = Settings::for_budget(budget, opts.threads, isa, reads + computed)?;
            if let Some(chunk) = opts.chunk_bytes {
                settings.chunk_bytes = chunk.max(8) & !7;
            }
            if let Some(granule) = pipeline::largest_granule(&shapes) {
                let fixed = opts.chunk_bytes.is_some();
                settings.hold(&granule, budget, reads + computed, fixed, opts.memory)?;
            }
            Ok(settings)
        })
        .collect::<Result<Vec<Settings>>>()?;
    if let Some(root) = &job.root {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(root, "creating output directory", e))?;
    }
    let mut dirs = job
        .outputs
        .iter()
        .zip(&plans)
        .map(|(o, plan)| OutputDir::open(&o.out, &inputs, plan, part, opts.existing, opts.io))
        .collect::<Result<Vec<_>>>()?;
    let todo: Vec<Vec<usize>> = plans
        .iter()
        .zip(&dirs)
        .map(|(plan, dir)| {
            plan.shards_of(part)
                .into_iter()
                .filter(|&s| !dir.has(&plan.shards[s].name))
                .collect()
        })
        .collect();
    let bytes: u64 = plans
        .iter()
        .zip(&todo)
        .map(|(plan, todo)| todo.iter().map(|&s| plan.shards[s].file_len()).sum::<u64>())
        .sum();
    let bar = progress::Bar::new(bytes, opts.show_progress);
    let busy = std::sync::Arc::new(busy::Busy::default());
    for dir in &mut dirs {
        dir.count_busy(std::sync::Arc::clone(&busy));
    }
    let mut buffered = false;
    let result = (|| {
        for (group, settings) in groups.iter().zip(&settings) {
            let mut writers: Vec<ShardWriter> = Vec::new();
            for (k, dir) in dirs.iter_mut().enumerate() {
                if group.contains(&k) {
                    writers.push(ShardWriter::new(dir));
                }
            }
            let mut outputs: Vec<pipeline::Output> = writers
                .iter_mut()
                .zip(group)
                .map(|(w, &k)| pipeline::Output {
                    plan: &plans[k],
                    shards: &todo[k],
                    sink: w,
                })
                .collect();
            pipeline::run(&models, &mut outputs, settings, &bar, cancel, &busy)?;
            drop(outputs);
            buffered |= writers.iter().any(|w| w.buffered);
        }
        Ok::<(), Error>(())
    })();
    bar.finish();
    result?;
    for (plan, dir) in plans.iter().zip(&mut dirs) {
        if part.index == 0 {
            for f in &plan.extra_files {
                if !dir.has(&f.name) {
                    dir.copy_file(&f.source, &f.name)?;
                }
            }
        }
        dir.complete()?;
    }
    drop(dirs);
    failpoint::hit("before-finalize", &|| false);
    let finalize = opts.part.is_none();
    if finalize {
        for o in &job.outputs {
            output::finalize(&o.out, Some(Part::WHOLE))?;
        }
    }
    let mut skipped_files: Vec<(String, &'static str)> =
        plans.iter().flat_map(|p| p.skipped_files.clone()).collect();
    skipped_files.sort();
    skipped_files.dedup();
    Ok(Summary {
        outputs: plans.len(),
        tensors: plans
            .iter()
            .map(|p| {
                p.shards_of(part)
                    .iter()
                    .map(|&s| p.shards[s].tensors.len())
                    .sum::<usize>()
            })
            .sum(),
        shards_written: todo.iter().map(Vec::len).sum(),
        shards_kept: plans
            .iter()
            .zip(&todo)
            .map(|(p, t)| p.shards_of(part).len() - t.len())
            .sum(),
        bytes_written: bytes,
        bytes_read: busy.bytes_read(),
        seconds: started.elapsed().as_secs_f64(),
        isa,
        io: if buffered {
            IoMode::Buffered
        } else {
            IoMode::Direct
        },
        finalized: finalize,
        skipped_files,
        notes: {
            let mut notes: Vec<Note> = plans.iter().flat_map(|p| p.notes.clone()).collect();
            notes.sort();
            notes.dedup();
            notes
        },
        threads: opts.threads.max(1),
        busy: busy::Stage::ALL.iter().map(|&s| (s, busy.get(s))).collect(),
    })
}
