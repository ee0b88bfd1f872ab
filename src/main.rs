//! The command line: parse arguments, call the library, turn errors into messages and exit codes.
//!
//! Results (`inspect`, `plan`, `verify`'s report, `--help`, `--version`) go to stdout; notes,
//! summaries and errors to stderr. A closed stdout — `mergestream inspect DIR | head -1` — ends
//! the job: exit 0, no message, as ripgrep does. Nothing here panics on a failed write.

use std::io::{self, BufWriter, StdoutLock, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use mergestream::format::Dtype;
use mergestream::model::Model;
use mergestream::output::{self, Existing};
use mergestream::pipeline::Cancel;
use mergestream::plan::Part;
use mergestream::units::{format_bytes, ByteSize};
use mergestream::writer::IoMode;
use mergestream::{progress, synth, verify, Error, ExpoJob, Result};

#[derive(Parser)]
#[command(
    name = "mergestream",
    version,
    about = "Merge model checkpoints by streaming them from disk, in bounded memory, with verifiable output.",
    after_help = "Examples:\n  mergestream expo --sft ./openchat_3.5 --aligned ./Starling-LM-7B-alpha --alpha 0.2 --out ./Starling-ExPO\n  mergestream verify ./Starling-ExPO\n  b3sum --check checksums.b3    (inside the output directory)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write aligned + alpha * (aligned - sft) for every tensor (ExPO).
    #[command(
        after_help = "Examples:\n  mergestream expo --sft Meta-Llama-3-70B-Instruct --aligned Llama3-70B-Chinese-Chat --alpha 0.3 --out ExPO\n  mergestream expo ... --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --resume   (then: mergestream finalize OUT)"
    )]
    Expo(ExpoArgs),
    /// Check two models against each other and show the output layout; writes nothing.
    Plan(PlanArgs),
    /// List a model's tensors from its headers.
    Inspect {
        /// Model directory or .safetensors file.
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every file of an output against checksums.b3 and re-check its structure.
    Verify {
        dir: PathBuf,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Complete a partitioned run: check every part, write the index and checksums.b3.
    Finalize {
        out: PathBuf,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Generate a synthetic SFT/aligned checkpoint pair (OUT/sft, OUT/aligned) for trying things out.
    Synth(SynthArgs),
}

#[derive(Args)]
struct ModelPair {
    /// The SFT model (directory or .safetensors file).
    #[arg(long, value_name = "DIR")]
    sft: PathBuf,
    /// The aligned (DPO/RLHF) model, whose dtypes and non-weight files the output takes.
    #[arg(long, value_name = "DIR")]
    aligned: PathBuf,
    /// Extrapolation strength (ExPO papers use 0.1 to 0.5).
    #[arg(long, allow_negative_numbers = true)]
    alpha: f32,
    /// Largest output shard, like transformers' max_shard_size (5GB = 5*10^9 bytes, 5GiB = 5*2^30).
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(mergestream::DEFAULT_MAX_SHARD_SIZE))]
    max_shard_size: ByteSize,
}

#[derive(Args)]
struct ExpoArgs {
    #[command(flatten)]
    pair: ModelPair,
    /// Output directory (created if missing; must be empty unless --resume or --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(mergestream::DEFAULT_MEMORY), help = memory_help())]
    memory: ByteSize,
    /// Compute threads (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// Write only part I of N (0-based), for cluster job arrays; then run `finalize`.
    #[arg(long, value_name = "I/N", value_parser = Part::parse)]
    part: Option<Part>,
    /// Finish an interrupted run: keep the shards it completed (after re-checking their blake3).
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Replace earlier output in --out.
    #[arg(long)]
    force: bool,
    /// No progress bar, no summary.
    #[arg(long, short)]
    quiet: bool,
    /// How shards are written: direct I/O where the filesystem allows it (auto), always, or never.
    #[arg(long, value_name = "MODE", default_value_t = IoMode::Auto, value_parser = IoMode::parse)]
    io: IoMode,
    /// Bytes per chunk (for testing; output never depends on it).
    #[arg(long, hide = true)]
    chunk_size: Option<ByteSize>,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    pair: ModelPair,
    /// Show which shards part I of N would write.
    #[arg(long, value_name = "I/N", value_parser = Part::parse)]
    part: Option<Part>,
    /// Also check this output directory as `expo` would: it must not be, lie inside, or contain
    /// an input model.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct SynthArgs {
    /// Where to write OUT/sft and OUT/aligned.
    out: PathBuf,
    /// Model widths.
    #[arg(long, value_enum, default_value_t = synth::Preset::TinyLlama)]
    preset: synth::Preset,
    /// Number of transformer layers (default: the preset's).
    #[arg(long)]
    layers: Option<u64>,
    /// The float type of the weights.
    #[arg(long, value_enum, ignore_case = true, default_value_t = FloatArg::BF16)]
    dtype: FloatArg,
    /// Store the SFT model's float tensors as this type instead (a mixed-precision pair).
    #[arg(long, value_enum, ignore_case = true)]
    sft_dtype: Option<FloatArg>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 3)]
    sft_shards: usize,
    #[arg(long, default_value_t = 2)]
    aligned_shards: usize,
    /// Sprinkle NaN, Inf, zeros, subnormals and extremes into the weights.
    #[arg(long)]
    specials: bool,
    /// Add an I64 buffer tensor (copied, not merged).
    #[arg(long)]
    int_buffer: bool,
}

/// `--memory`'s help, from the constants it describes.
fn memory_help() -> String {
    format!(
        "Memory cap for the whole process (chunk buffers get all but {} MiB)",
        mergestream::MEMORY_RESERVE >> 20
    )
}

/// The float types `synth` writes.
#[derive(Clone, Copy, ValueEnum)]
enum FloatArg {
    #[value(name = "BF16")]
    BF16,
    #[value(name = "F16")]
    F16,
    #[value(name = "F32")]
    F32,
}

impl FloatArg {
    fn dtype(self) -> Dtype {
        match self {
            FloatArg::BF16 => Dtype::BF16,
            FloatArg::F16 => Dtype::F16,
            FloatArg::F32 => Dtype::F32,
        }
    }
}

impl std::fmt::Display for FloatArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dtype().name())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version (to stdout, exit 0) or a usage error (to stderr, exit 2). A
            // closed stream is no reason to say more.
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever reads our output has all they want.
        Err(Failure::Stdout(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Stdout(e)) => {
            note(format_args!("error: writing to stdout: {e}"));
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            note(format_args!("error: {e}"));
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Why a command failed: the library's error, or stdout refusing our results.
enum Failure {
    Run(Error),
    Stdout(io::Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Run(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Stdout(e)
    }
}

/// Stdout for a command's results, buffered; flush it before returning.
fn stdout() -> BufWriter<StdoutLock<'static>> {
    BufWriter::new(io::stdout().lock())
}

/// `mergestream: MESSAGE` on stderr. A stderr that cannot be written to is ignored: there is
/// nowhere left to say anything.
fn note(message: std::fmt::Arguments) {
    let _ = writeln!(io::stderr().lock(), "mergestream: {message}");
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Expo(args) => expo(args)?,
        Command::Plan(args) => plan(args)?,
        Command::Inspect { model, json } => inspect(&model, json)?,
        Command::Verify { dir, quiet } => {
            let report = verify::verify(&dir)?;
            if !quiet {
                let mut out = stdout();
                writeln!(
                    out,
                    "{}: OK ({} files, {} tensors, {} checked)",
                    dir.display(),
                    report.files,
                    report.tensors,
                    format_bytes(report.bytes)
                )?;
                out.flush()?;
            }
        }
        Command::Finalize { out, quiet } => {
            let done = output::finalize(&out, None)?;
            if !quiet {
                note(format_args!(
                    "finalized {} from {} part{}: {} files in checksums.b3",
                    out.display(),
                    done.parts,
                    if done.parts == 1 { "" } else { "s" },
                    done.files - 1
                ));
            }
        }
        Command::Synth(args) => synth_pair(args)?,
    }
    Ok(())
}

fn expo(args: ExpoArgs) -> Result<()> {
    let cancel = Cancel::default();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(signal, Arc::clone(&cancel.signal), signal as usize)
            .map_err(|source| Error::SignalHandler { source })?;
    }
    let job = ExpoJob {
        sft: args.pair.sft,
        aligned: args.pair.aligned,
        out: args.out,
        alpha: args.pair.alpha,
        max_shard_size: args.pair.max_shard_size.0,
        memory: args.memory.0,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        chunk_bytes: args.chunk_size.map(|c| c.0 as usize),
        part: args.part,
        existing: if args.resume {
            Existing::Resume
        } else if args.force {
            Existing::Overwrite
        } else {
            Existing::Refuse
        },
        show_progress: !args.quiet,
        io: args.io,
    };
    let summary = mergestream::expo(&job, &cancel)?;
    if !args.quiet {
        for (name, why) in &summary.skipped_files {
            note(format_args!(
                "note: not copied from --aligned: {name} ({why})"
            ));
        }
        let kept = if summary.shards_kept > 0 {
            format!(", {} kept from the earlier run", summary.shards_kept)
        } else {
            String::new()
        };
        let peak = progress::peak_rss()
            .map(|b| format!(", peak memory {} MiB", b >> 20))
            .unwrap_or_default();
        let rate = summary.bytes_written as f64 / summary.seconds.max(1e-9);
        let what = if summary.finalized {
            "done".to_string()
        } else {
            format!(
                "part {} done (run `mergestream finalize` after all parts)",
                job.part.unwrap_or(Part::WHOLE)
            )
        };
        note(format_args!(
            "{what}: {} tensors, {} written in {} shard{}{kept}, {:.1} s ({}/s){peak}, kernel {}, {} I/O",
            summary.tensors,
            format_bytes(summary.bytes_written),
            summary.shards_written,
            if summary.shards_written == 1 { "" } else { "s" },
            summary.seconds,
            format_bytes(rate as u64),
            summary.isa,
            summary.io
        ));
    }
    Ok(())
}

fn plan(args: PlanArgs) -> Result<(), Failure> {
    let p = &args.pair;
    if let Some(out) = &args.out {
        mergestream::paths::check_overlap(out, &[&p.sft, &p.aligned])?;
    }
    let (sft, aligned, plan) =
        mergestream::plan_expo(&p.sft, &p.aligned, p.alpha, p.max_shard_size.0)?;
    let mut out = stdout();
    writeln!(
        out,
        "OK: {} tensors match ({} in --sft, {} in --aligned)",
        plan.tensors.len(),
        format_bytes(sft.data_bytes()),
        format_bytes(aligned.data_bytes())
    )?;
    let part = args.part.unwrap_or(Part::WHOLE);
    let mine = plan.shards_of(part);
    writeln!(
        out,
        "output: {} shard{}, {} of tensor data",
        plan.shards.len(),
        if plan.shards.len() == 1 { "" } else { "s" },
        format_bytes(plan.total_size)
    )?;
    for (i, s) in plan.shards.iter().enumerate() {
        let marker = if args.part.is_some() && mine.contains(&i) {
            "  <- this part"
        } else {
            ""
        };
        writeln!(
            out,
            "  {}  {:>4} tensors  {:>10}{marker}",
            s.name,
            s.tensors.len(),
            format_bytes(s.file_len())
        )?;
    }
    for f in &plan.extra_files {
        writeln!(out, "  {}  (copied from --aligned)", f.name)?;
    }
    for (name, why) in &plan.skipped_files {
        writeln!(out, "  {name}  (not copied: {why})")?;
    }
    writeln!(out, "plan fingerprint: {}", plan.fingerprint)?;
    out.flush()?;
    Ok(())
}

fn inspect(path: &std::path::Path, json: bool) -> Result<(), Failure> {
    let model = Model::open(path)?;
    let mut out = stdout();
    if json {
        let tensors: Vec<_> = model
            .tensors()
            .map(|(loc, t)| {
                serde_json::json!({
                    "name": t.name,
                    "dtype": t.dtype.name(),
                    "shape": t.shape,
                    "shard": model.shards[loc.shard].name,
                    "bytes": t.nbytes(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "path": model.path,
            "shards": model.file_list().into_iter().map(|(n, s)| serde_json::json!({"name": n, "size": s})).collect::<Vec<_>>(),
            "tensors": tensors,
            "tensor_count": model.tensor_count(),
            "total_bytes": model.data_bytes(),
        });
        serde_json::to_writer_pretty(&mut out, &doc).map_err(io::Error::from)?;
        writeln!(out)?;
        out.flush()?;
        return Ok(());
    }
    let width = model
        .tensors()
        .map(|(_, t)| t.name.len())
        .max()
        .unwrap_or(4);
    writeln!(
        out,
        "{:width$}  {:7}  {:>22}  shard",
        "name", "dtype", "shape"
    )?;
    let mut by_dtype: std::collections::BTreeMap<Dtype, (usize, u64)> = Default::default();
    for (loc, t) in model.tensors() {
        let shape = format!("{:?}", t.shape);
        writeln!(
            out,
            "{:width$}  {:7}  {:>22}  {}",
            t.name,
            t.dtype.name(),
            shape,
            model.shards[loc.shard].name
        )?;
        let e = by_dtype.entry(t.dtype).or_default();
        e.0 += 1;
        e.1 += t.nbytes();
    }
    let counts: Vec<String> = by_dtype
        .iter()
        .map(|(d, (n, b))| format!("{n} {d} ({})", format_bytes(*b)))
        .collect();
    writeln!(
        out,
        "{} tensors in {} shard{}: {}; {} in all",
        model.tensor_count(),
        model.shards.len(),
        if model.shards.len() == 1 { "" } else { "s" },
        counts.join(", "),
        format_bytes(model.data_bytes())
    )?;
    out.flush()?;
    Ok(())
}

fn synth_pair(args: SynthArgs) -> Result<()> {
    let mut shape = args.preset.shape();
    if let Some(layers) = args.layers {
        shape.layers = layers;
    }
    let spec = synth::PairSpec {
        shape,
        dtype: args.dtype.dtype(),
        sft_dtype: args.sft_dtype.map(FloatArg::dtype),
        seed: args.seed,
        sft_shards: args.sft_shards.max(1),
        aligned_shards: args.aligned_shards.max(1),
        specials: args.specials,
        int_buffer: args.int_buffer,
    };
    let bytes = synth::write_pair(&args.out, &spec)?;
    note(format_args!(
        "wrote {0}/sft and {0}/aligned ({1} each)",
        args.out.display(),
        format_bytes(bytes)
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// clap's own consistency checks over the whole command line (as b3sum does).
    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
