//! mergestream: merge model checkpoints by streaming them from disk.
//!
//! The public API mirrors the command line: [`plan_expo`] checks two models and plans a merge,
//! [`expo`] plans and runs it (or one part of it), [`output::finalize`] completes a partitioned
//! run, [`verify::verify`] checks a finished output. Every error is an [`Error`], whose variants
//! say what went wrong in fields a caller can match on. The pieces, each ignorant of the others'
//! concerns:
//!
//! - [`mod@format`] parses and writes safetensors headers and shard indexes, and reads PyTorch
//!   checkpoints' metadata;
//! - [`model`] opens and validates input models;
//! - [`spec`] reads a merge request (a mergekit YAML config, or `expo` flags) into a
//!   [`spec::MergeSpec`], refusing every mistake before any weight is read ([`config_runs`]
//!   turns one into runs);
//! - [`plan`] decides every byte of the output from the headers and options;
//! - [`kernel`] is the arithmetic, on slices;
//! - [`pipeline`] moves chunks from the inputs through the kernel to a sink, in bounded memory;
//! - [`output`] is that sink: temporary files, renames, records, locks, finalizing (and
//!   `checksums.b3`, the blake3 manifest);
//! - [`card`] writes the output's model card; [`lineage`] hashes the inputs (`--hash-inputs`)
//!   and checks them again;
//! - [`packed`] is the zstd-packed shard format: `pack`, `unpack`, random-access reads (a
//!   model may be packed) and the writer behind `--compress`;
//! - [`check`] compares a recomputed merge with an existing model instead of writing it;
//! - [`verify`] checks a finished output; [`synth`] makes model pairs to try things on.
//!
//! What the library does not do: print (only `main.rs` does), parse command lines, or read
//! tensor data anywhere but in the pipeline.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod busy;
pub mod card;
pub mod check;
pub mod error;
mod failpoint;
pub mod format;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod iobuf;
pub mod kernel;
pub mod lineage;
pub mod manifest;
pub mod method;
pub mod model;
pub mod output;
pub mod packed;
pub mod paths;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod spec;
pub mod synth;
pub mod units;
pub mod verify;
pub mod writer;

use std::path::PathBuf;
use std::time::Instant;

pub use error::{Error, Result};
use error::{MethodFailure, UsageError};
use kernel::Isa;
use method::{Method, Note, Policy, Recipe};
use model::Model;
use output::{Existing, OutputDir, ShardWriter};
use pipeline::{Cancel, Settings};
use plan::{Part, Plan, PlanOptions};
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
    /// The SFT model: a model directory (safetensors or PyTorch `.bin` weights) or one weights
    /// file.
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
            earlier_outputs: Vec::new(),
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
    /// Compute threads, for method and combine ops (ExPO is computed by the writer).
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
    /// Record the SHA-256 of every input weight file in provenance and the card
    /// (`--hash-inputs`); part 0 of a partitioned run computes them.
    pub hash_inputs: bool,
    /// Write every output's shards packed (`--compress`: `NAME.safetensors.mszst`, with
    /// `checksums.b3` still listing the unpacked bytes and `packed.b3` the packed files), with
    /// these options; their `threads` compress each output's blocks.
    pub compress: Option<packed::PackOptions>,
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
    /// Inputs (indices into `models`) that earlier runs of the same config wrote into
    /// `root`: `root` may hold them (each output is still kept off every input).
    pub earlier_outputs: Vec<usize>,
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
    /// How inputs were read: [`IoMode::Direct`] when every shard was read around the page
    /// cache, else [`IoMode::Buffered`].
    pub reads: IoMode,
    /// Whether this run also finalized the output (a whole run does).
    pub finalized: bool,
    /// Files of the aligned model directory not copied to the output, with why.
    pub skipped_files: Vec<(String, &'static str)>,
    /// What the plans resolved on their own (buffers, extra vocabulary rows), once per output.
    pub notes: Vec<Note>,
    /// Compute workers.
    pub threads: usize,
    /// Reader threads.
    pub readers: usize,
    /// Working time of each stage (see [`busy::Busy`]).
    pub busy: Vec<(busy::Stage, std::time::Duration)>,
    /// The SHA-256 of every input file, when this run computed them (`--hash-inputs`, part 0),
    /// per model of the run: the model as named, and its files.
    pub input_hashes: Vec<(PathBuf, Vec<lineage::FileHash>)>,
}

impl Summary {
    /// How busy `stage` was over the run, as a fraction of the wall time of its threads
    /// (reading has `readers` of them, compute `threads`, hashing and disk writes one per output).
    pub fn busy_fraction(&self, stage: busy::Stage) -> f64 {
        let threads = match stage {
            busy::Stage::Compute => self.threads,
            busy::Stage::Read => self.readers,
            busy::Stage::Hash | busy::Stage::Io => self.outputs,
            busy::Stage::Write => 1,
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
        let mut earlier_outputs = Vec::new();
        let mut outputs = Vec::new();
        for &k in &now {
            let o = &spec.outputs[k];
            let mut indices = Vec::new();
            for entry in &o.models {
                let (path, earlier) = match &entry.model.location {
                    ModelLocation::Output { index, .. } => (dir_of(*index), true),
                    _ => (
                        entry.model.dir().expect("not another output").to_path_buf(),
                        false,
                    ),
                };
                let i = match models.iter().position(|m| *m == path) {
                    Some(i) => i,
                    None => {
                        models.push(path);
                        models.len() - 1
                    }
                };
                if earlier && !earlier_outputs.contains(&i) {
                    earlier_outputs.push(i);
                }
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
            earlier_outputs,
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
    let models = open_models(&job.models)?;
    let plans = job
        .outputs
        .iter()
        .map(|o| {
            Plan::build_with(
                &o.recipe,
                &models,
                &PlanOptions {
                    max_shard_size: job.options.max_shard_size,
                    hash_inputs: job.options.hash_inputs,
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((models, plans))
}

/// Opens the models at `paths`. A packed model stored as the XOR with a base model (`pack
/// --base`) is read through that base, which must be one of the others: those that can be
/// bases are identified (their `checksums.b3`, or hashing their shards) only when some model
/// needs one.
pub fn open_models(paths: &[PathBuf]) -> Result<Vec<Model>> {
    let mut models = paths
        .iter()
        .map(|p| Model::open(p))
        .collect::<Result<Vec<_>>>()?;
    if models.iter().all(|m| m.missing_bases().is_empty()) {
        return Ok(models);
    }
    let mut bases: Vec<Option<std::sync::Arc<packed::Base>>> = vec![None; paths.len()];
    for i in 0..models.len() {
        let needed = models[i].missing_bases();
        if needed.is_empty() {
            continue;
        }
        for (j, path) in paths.iter().enumerate() {
            if j != i && bases[j].is_none() && models[j].missing_bases().is_empty() {
                // A model that cannot be a base (it does not open as one) is just not a candidate.
                bases[j] = packed::Base::open(path).ok().map(std::sync::Arc::new);
            }
            if needed
                .iter()
                .all(|id| bases.iter().flatten().any(|b| b.id == *id))
            {
                break;
            }
        }
        let candidates: Vec<std::sync::Arc<packed::Base>> = bases
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter_map(|(_, b)| b.clone())
            .collect();
        models[i].set_bases(&candidates)?;
    }
    Ok(models)
}

/// Opens both models and plans one ExPO output, writing nothing.
pub fn plan_expo(
    sft: &std::path::Path,
    aligned: &std::path::Path,
    alpha: f32,
    max_shard_size: u64,
) -> Result<(Model, Model, Plan)> {
    let models = open_models(&[sft.to_path_buf(), aligned.to_path_buf()])?;
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

/// The kernel a run uses and the bytes its chunk buffers may take, from its options; checked
/// before anything is created.
fn engine(opts: &RunOptions) -> Result<(Isa, u64)> {
    let isa = kernel::Isa::select().map_err(UsageError::Isa)?;
    let budget = opts
        .memory
        .checked_sub(MEMORY_RESERVE)
        .filter(|&b| b > 0)
        .ok_or(UsageError::MemoryBelowReserve {
            reserve: MEMORY_RESERVE,
        })?;
    Ok((isa, budget))
}

/// Whether two outputs can share one read of their inputs: they list the same tensors in the
/// same order with the same element counts (vocabularies of one size), and where either runs a
/// statistics method (whose op must see its segment whole) both cut the tensor into the same
/// segments.
fn share_a_read(a: &Plan, b: &Plan) -> bool {
    a.tensor_names().eq(b.tensor_names())
        && a.tensors.iter().zip(&b.tensors).all(|(x, y)| {
            if x.numel() != y.numel() {
                return false;
            }
            let method = |t: &plan::PlannedTensor| {
                t.segments
                    .iter()
                    .any(|s| matches!(s.op, plan::Op::Method(_)))
            };
            !(method(x) || method(y))
                || x.segments
                    .iter()
                    .map(|s| s.elems.clone())
                    .eq(y.segments.iter().map(|s| s.elems.clone()))
        })
}

/// The groups of outputs that share one read of their inputs, each with the pipeline settings
/// it runs with, for `outputs` (each a plan and the shards of it to write), and the kernel.
///
/// Outputs share a read when [`share_a_read`] says so. A group's settings come out of the
/// budget less what the outputs' staging buffers, packed inputs' decoded blocks and
/// `--compress`'s blocks in flight take, and make chunks hold the granule of its method ops
/// whole; a budget that cannot is refused here, before anything is written.
fn stream_groups(
    models: &[Model],
    outputs: &[(&Plan, &[usize])],
    options: &RunOptions,
) -> Result<(Isa, Vec<ReadGroup>)> {
    let (isa, budget) = engine(options)?;
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for k in 0..outputs.len() {
        match groups
            .iter_mut()
            .find(|g| share_a_read(outputs[g[0]].0, outputs[k].0))
        {
            Some(g) => g.push(k),
            None => groups.push(vec![k]),
        }
    }
    let with_settings = groups
        .into_iter()
        .map(|group| {
            let shapes: Vec<(&Plan, &[usize])> = group.iter().map(|&k| outputs[k]).collect();
            let (reads, computed) = pipeline::buffers_per_slot(&shapes);
            // Packed inputs are decoded on PACKED_READERS readers, each with its own cache.
            let packed = model::ReadCache::largest_block(models);
            let readers = if packed.is_some() { PACKED_READERS } else { 1 };
            let cache = model::ReadCache::bytes(models, reads) * readers as u64
                + options
                    .compress
                    .as_ref()
                    .map_or(0, |o| o.memory_bytes() * group.len() as u64);
            // Each output of the group is written through staging buffers of its own.
            let stage_bytes = writer::stage_bytes_for(budget.saturating_sub(cache), group.len());
            let cache = cache + writer::staging_bytes(stage_bytes) * group.len() as u64;
            // A larger --memory gets larger staging buffers: what a refusal asks for counts
            // them at their largest, so that it is enough.
            let staging_growth = (writer::staging_bytes(writer::MAX_STAGE_BYTES)
                - writer::staging_bytes(stage_bytes))
                * group.len() as u64;
            let budget = budget.saturating_sub(cache);
            // Inputs the page cache holds are copied from it: fewer readers do, in chunks that
            // stay in L2. Inputs on the disk are read in fewer, larger requests.
            let (plain_readers, max_chunk) = if models.iter().all(Model::mostly_cached) {
                (Settings::CACHED_READERS, Settings::CACHED_CHUNK_BYTES)
            } else {
                (Settings::READERS, Settings::DISK_CHUNK_BYTES)
            };
            let mut settings = Settings::for_budget(
                budget,
                options.threads,
                plain_readers,
                max_chunk,
                isa,
                reads + computed,
            )
            .map_err(|e| match e {
                Error::Usage(UsageError::MemoryTooSmall { threads, needed }) => {
                    UsageError::MemoryTooSmall {
                        threads,
                        needed: needed + cache + staging_growth,
                    }
                    .into()
                }
                e => e,
            })?;
            if let Some(chunk) = options.chunk_bytes {
                settings.chunk_bytes = chunk.max(8) & !7;
            }
            if let Some(granule) = pipeline::largest_granule(&shapes) {
                let fixed = options.chunk_bytes.is_some();
                settings
                    .hold(&granule, budget, reads + computed, fixed, options.memory)
                    .map_err(|mut e| {
                        if let Error::Method {
                            source: MethodFailure::RowTooLong { needed, .. },
                            ..
                        } = &mut e
                        {
                            *needed += staging_growth;
                        }
                        e
                    })?;
            }
            if let Some(block) = packed {
                // Decoding is the reader stage's work: two readers decode in parallel. A chunk
                // of a whole block (where the budget allows and no chunk size was asked for)
                // decodes at most two blocks of each input, so neighbouring chunks on the two
                // readers seldom decode the same block twice; measured on a 0.96 GB BF16 pair:
                // 1.30 s with one reader and 256 KiB chunks, 0.93 s with two and 1 MiB chunks.
                settings.readers = PACKED_READERS;
                let block = (block as usize).next_multiple_of(8);
                let total = (block * (reads + computed) * settings.slots) as u64;
                if options.chunk_bytes.is_none() && block > settings.chunk_bytes && total <= budget
                {
                    settings.chunk_bytes = block;
                }
            }
            Ok(ReadGroup {
                outputs: group,
                settings,
                stage_bytes,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((isa, with_settings))
}

/// Reader threads of a run with packed inputs (plain inputs get [`Settings::READERS`]).
const PACKED_READERS: usize = 2;

/// Outputs streamed together, reading their inputs once.
struct ReadGroup {
    /// Indexes of the outputs.
    outputs: Vec<usize>,
    /// What the pipeline runs them with.
    settings: Settings,
    /// The size of the staging buffers each output's files are written through.
    stage_bytes: usize,
}

/// Streams the selected shards of every output into its sink: the engine behind [`run`] (whose
/// sinks write output directories) and [`check::check`] (whose sinks compare with existing
/// ones), and open to any other [`pipeline::ShardSink`]. Outputs that can share a read of their
/// inputs are streamed together, reading each input once; the others one group after another
/// (`stream_groups`). Returns the kernel that ran and the most reader threads a group used.
pub fn stream(
    models: &[Model],
    outputs: Vec<pipeline::Output<'_>>,
    options: &RunOptions,
    progress: &dyn pipeline::Progress,
    cancel: &Cancel,
    busy: &busy::Busy,
) -> Result<(Isa, usize)> {
    let shapes: Vec<(&Plan, &[usize])> = outputs.iter().map(|o| (o.plan, o.shards)).collect();
    let (isa, groups) = stream_groups(models, &shapes, options)?;
    drop(shapes);
    let mut outputs: Vec<Option<pipeline::Output<'_>>> = outputs.into_iter().map(Some).collect();
    let mut readers = 1;
    for ReadGroup {
        outputs: group,
        settings,
        ..
    } in groups
    {
        let mut members: Vec<pipeline::Output<'_>> = group
            .iter()
            .map(|&k| outputs[k].take().expect("each output is in one group"))
            .collect();
        readers = readers.max(settings.readers);
        pipeline::run(models, &mut members, &settings, progress, cancel, busy)?;
    }
    Ok((isa, readers))
}

/// Runs `job`: plans, then writes this part's shards of every output (all of them for a whole
/// run), reading each input once, and for a whole run finalizes every output.
pub fn run(job: &MergeJob, cancel: &Cancel) -> Result<Summary> {
    let started = Instant::now();
    let opts = &job.options;
    // Before anything is created or removed (the precheck creates a probe file).
    let inputs: Vec<&std::path::Path> = job.models.iter().map(PathBuf::as_path).collect();
    if let Some(root) = &job.root {
        let outside: Vec<&std::path::Path> = (0..inputs.len())
            .filter(|i| !job.earlier_outputs.contains(i))
            .map(|i| inputs[i])
            .collect();
        paths::check_overlap(root, &outside)?;
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
    // What held nothing before this run, so that a run stopped by a damaged input can leave
    // nothing behind.
    let fresh: Vec<(PathBuf, bool)> = job
        .root
        .iter()
        .chain(job.outputs.iter().map(|o| &o.out))
        .filter_map(|p| holds_nothing(p).map(|absent| (p.clone(), absent)))
        .collect();
    let (isa, _) = engine(opts)?;
    let (mut models, plans) = plan_job(job)?;
    let part = opts.part.unwrap_or(Part::WHOLE);
    // The input hasher (`--hash-inputs`, part 0) reads the inputs through the page cache; the
    // pipeline then reads them there too, so the disk reads them once (`--io direct` insists).
    let hashing = opts.hash_inputs && part.index == 0;
    if opts.io == IoMode::Direct || (opts.io == IoMode::Auto && !hashing) {
        for model in &mut models {
            model.use_direct_reads(opts.io == IoMode::Direct)?;
        }
    }
    // Each group's settings are decided (and refused) before anything is created.
    let part_shards: Vec<Vec<usize>> = plans.iter().map(|p| p.shards_of(part)).collect();
    let shapes: Vec<(&Plan, &[usize])> = plans
        .iter()
        .zip(&part_shards)
        .map(|(p, s)| (p, s.as_slice()))
        .collect();
    let (_, groups) = stream_groups(&models, &shapes, opts)?;
    if let Some(root) = &job.root {
        std::fs::create_dir_all(root)
            .map_err(|e| Error::io(root, "creating output directory", e))?;
    }
    let mut dirs = job
        .outputs
        .iter()
        .zip(&plans)
        .map(|(o, plan)| {
            OutputDir::open(
                &o.out,
                &inputs,
                plan,
                part,
                opts.existing,
                opts.io,
                opts.compress.as_ref(),
            )
        })
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
    for group in &groups {
        for &k in &group.outputs {
            dirs[k].set_stage_bytes(group.stage_bytes);
        }
    }
    let mut writers: Vec<ShardWriter> = dirs.iter_mut().map(ShardWriter::new).collect();
    let outputs: Vec<pipeline::Output> = writers
        .iter_mut()
        .zip(&plans)
        .zip(&todo)
        .map(|((w, plan), todo)| pipeline::Output {
            plan,
            shards: todo,
            sink: w,
        })
        .collect();
    // Part 0 hashes every input file (`--hash-inputs`) on threads of its own while the
    // pipeline reads: see `lineage`.
    let stop_hashing = std::sync::atomic::AtomicBool::new(false);
    let (result, hashes) = std::thread::scope(|scope| {
        let hasher =
            hashing.then(|| scope.spawn(|| lineage::hash_models(&models, &stop_hashing, cancel)));
        let result = stream(&models, outputs, opts, &bar, cancel, &busy);
        if result.is_err() {
            stop_hashing.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let hashes = hasher.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::internal("the hashing thread panicked")))
        });
        (result, hashes)
    });
    let buffered = writers.iter().any(|w| w.buffered);
    drop(writers);
    bar.finish();
    let readers = match result {
        Ok((_, readers)) => readers,
        Err(e) => {
            if damaged_input(&e) {
                drop(dirs);
                remove_fresh(&fresh);
            }
            return Err(e);
        }
    };
    let hashes: Option<Vec<Vec<lineage::FileHash>>> = match hashes {
        None => None,
        Some(h) => {
            Some(h?.ok_or_else(|| Error::internal("hashing stopped by a run that went on"))?)
        }
    };
    for (k, (plan, dir)) in plans.iter().zip(&mut dirs).enumerate() {
        if let Some(hashes) = &hashes {
            let recipe = &job.outputs[k].recipe;
            let inputs = card::input_names(recipe, &models)
                .into_iter()
                .zip(&recipe.models)
                .map(|((role, model), &m)| lineage::InputHashes {
                    role,
                    model,
                    files: hashes[m].clone(),
                })
                .collect();
            dir.record_input_hashes(inputs)?;
        }
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
        reads: if models.iter().all(Model::reads_direct) {
            IoMode::Direct
        } else {
            IoMode::Buffered
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
        readers,
        busy: busy::Stage::ALL.iter().map(|&s| (s, busy.get(s))).collect(),
        input_hashes: hashes
            .map(|h| models.iter().map(|m| m.path.clone()).zip(h).collect())
            .unwrap_or_default(),
    })
}

/// `Some(true)` if `path` does not exist, `Some(false)` if it is an empty directory, `None` if
/// it holds something.
fn holds_nothing(path: &std::path::Path) -> Option<bool> {
    match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_none().then_some(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(true),
        Err(_) => None,
    }
}

/// Whether a run failed because an input's stored bytes are damaged (a packed block that does
/// not decode to what was packed): no rerun or resume can finish it, so it leaves nothing
/// behind.
fn damaged_input(e: &Error) -> bool {
    use packed::PackedError as P;
    matches!(e, Error::Packed(p) if matches!(**p, P::TruncatedFrame { .. } | P::CorruptFrame { .. } | P::BlockChecksum { .. }))
}

/// Removes what this run wrote into the directories of `fresh` (each with whether it did not
/// exist before, in which case it goes too): nested outputs before the root holding them.
fn remove_fresh(fresh: &[(PathBuf, bool)]) {
    for (path, absent) in fresh.iter().rev() {
        if *absent {
            let _ = std::fs::remove_dir_all(path);
        } else if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                let p = entry.path();
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
}
