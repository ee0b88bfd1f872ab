//! The command line: parse arguments, call the library, turn errors into messages and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use mergestream::format::Dtype;
use mergestream::model::Model;
use mergestream::output::{self, Existing};
use mergestream::pipeline::Cancel;
use mergestream::plan::Part;
use mergestream::units::{format_bytes, parse_size};
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
    /// Compress a model directory: each shard becomes a zstd-packed .mszst file.
    #[command(
        after_help = "Examples:\n  mergestream pack ./Starling-ExPO --out ./Starling-ExPO.packed\n  mergestream pack ./Starling-ExPO --base ./Starling-LM-7B-alpha --out ./Starling-ExPO.xor\n  b3sum --check packed.b3    (inside the packed directory)"
    )]
    Pack(PackArgs),
    /// Restore a packed directory, byte for byte, checked against its checksums.b3.
    #[command(
        after_help = "Example:\n  mergestream unpack ./Starling-ExPO.packed --out ./Starling-ExPO"
    )]
    Unpack(UnpackArgs),
}

#[derive(Args)]
struct PackArgs {
    /// Model directory to pack.
    dir: PathBuf,
    /// Packed directory to write (must not exist, or be empty).
    #[arg(long, value_name = "PACKED")]
    out: PathBuf,
    /// zstd level, 1 (fastest) to 22 (smallest).
    #[arg(long, default_value_t = mergestream::packed::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    level: i32,
    /// Store each tensor as the XOR with the same tensor of this model (e.g. the aligned model of an ExPO output).
    #[arg(long, value_name = "REFDIR")]
    base: Option<PathBuf>,
    /// Bytes of original data per block, a power of two (random-access granularity).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    block_size: u64,
    /// Compression threads (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
struct UnpackArgs {
    /// Packed directory.
    packed: PathBuf,
    /// Directory to restore into (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The base model the directory was packed against, if any.
    #[arg(long, value_name = "REFDIR")]
    base: Option<PathBuf>,
    /// Decompression threads (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, short)]
    quiet: bool,
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
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
}

#[derive(Args)]
struct ExpoArgs {
    #[command(flatten)]
    pair: ModelPair,
    /// Output directory (created if missing; must be empty unless --resume or --force).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Memory cap for the whole process (chunk buffers get all but 32 MiB).
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    memory: u64,
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
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = IoMode::parse)]
    io: IoMode,
    /// Bytes per chunk (for testing; output never depends on it).
    #[arg(long, hide = true, value_parser = parse_size)]
    chunk_size: Option<u64>,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    pair: ModelPair,
    /// Show which shards part I of N would write.
    #[arg(long, value_name = "I/N", value_parser = Part::parse)]
    part: Option<Part>,
}

#[derive(Args)]
struct SynthArgs {
    /// Where to write OUT/sft and OUT/aligned.
    out: PathBuf,
    /// Model widths: tiny-llama, tiny-mistral, llama3-8b, mistral-7b, llama3-70b.
    #[arg(long, default_value = "tiny-llama")]
    preset: String,
    /// Number of transformer layers (default: the preset's).
    #[arg(long)]
    layers: Option<u64>,
    /// BF16, F16 or F32.
    #[arg(long, default_value = "BF16")]
    dtype: String,
    /// Store the SFT model's float tensors as this type instead (a mixed-precision pair).
    #[arg(long)]
    sft_dtype: Option<String>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mergestream: error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Expo(args) => expo(args),
        Command::Plan(args) => plan(args),
        Command::Inspect { model, json } => inspect(&model, json),
        Command::Verify { dir, quiet } => {
            let report = verify::verify(&dir)?;
            if !quiet {
                eprintln!(
                    "mergestream: {}: OK ({} files, {} tensors, {} checked)",
                    dir.display(),
                    report.files,
                    report.tensors,
                    format_bytes(report.bytes)
                );
            }
            Ok(())
        }
        Command::Finalize { out, quiet } => {
            let done = output::finalize(&out, None)?;
            if !quiet {
                eprintln!(
                    "mergestream: finalized {} from {} part{}: {} files in checksums.b3",
                    out.display(),
                    done.parts,
                    if done.parts == 1 { "" } else { "s" },
                    done.files - 1
                );
            }
            Ok(())
        }
        Command::Synth(args) => synth_pair(args),
        Command::Pack(args) => pack(args),
        Command::Unpack(args) => unpack(args),
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pack(args: PackArgs) -> Result<()> {
    let options = mergestream::packed::PackOptions {
        level: args.level,
        block_size: u32::try_from(args.block_size).unwrap_or(u32::MAX),
        threads: args.threads.unwrap_or_else(cpus),
    };
    let s = mergestream::packed::pack_dir(&args.dir, &args.out, args.base.as_deref(), &options)?;
    if !args.quiet {
        eprintln!(
            "mergestream: packed {} shard{} ({} -> {}, {:.3}x) and {} other file{} into {} in {:.1} s",
            s.shards,
            if s.shards == 1 { "" } else { "s" },
            format_bytes(s.original_bytes),
            format_bytes(s.packed_bytes),
            s.original_bytes as f64 / s.packed_bytes.max(1) as f64,
            s.carried,
            if s.carried == 1 { "" } else { "s" },
            args.out.display(),
            s.seconds
        );
    }
    Ok(())
}

fn unpack(args: UnpackArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(cpus);
    let s =
        mergestream::packed::unpack_dir(&args.packed, &args.out, args.base.as_deref(), threads)?;
    if !args.quiet {
        eprintln!(
            "mergestream: unpacked {} shard{} ({}) and {} other file{} into {} in {:.1} s; every file matches checksums.b3",
            s.shards,
            if s.shards == 1 { "" } else { "s" },
            format_bytes(s.original_bytes),
            s.carried,
            if s.carried == 1 { "" } else { "s" },
            args.out.display(),
            s.seconds
        );
    }
    Ok(())
}

fn expo(args: ExpoArgs) -> Result<()> {
    let cancel = Cancel::default();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(signal, Arc::clone(&cancel.signal), signal as usize)
            .map_err(|e| Error::Usage(format!("cannot install a signal handler: {e}")))?;
    }
    let job = ExpoJob {
        sft: args.pair.sft,
        aligned: args.pair.aligned,
        out: args.out,
        alpha: args.pair.alpha,
        max_shard_size: args.pair.max_shard_size,
        memory: args.memory,
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        chunk_bytes: args.chunk_size.map(|c| c as usize),
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
            eprintln!("mergestream: note: not copied from --aligned: {name} ({why})");
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
        eprintln!(
            "mergestream: {what}: {} tensors, {} written in {} shard{}{kept}, {:.1} s ({}/s){peak}, kernel {}, {} I/O",
            summary.tensors,
            format_bytes(summary.bytes_written),
            summary.shards_written,
            if summary.shards_written == 1 { "" } else { "s" },
            summary.seconds,
            format_bytes(rate as u64),
            summary.isa,
            summary.io
        );
    }
    Ok(())
}

fn plan(args: PlanArgs) -> Result<()> {
    let p = &args.pair;
    let (sft, aligned, plan) =
        mergestream::plan_expo(&p.sft, &p.aligned, p.alpha, p.max_shard_size)?;
    println!(
        "OK: {} tensors match ({} in --sft, {} in --aligned)",
        plan.tensors.len(),
        format_bytes(sft.data_bytes()),
        format_bytes(aligned.data_bytes())
    );
    let part = args.part.unwrap_or(Part::WHOLE);
    let mine = plan.shards_of(part);
    println!(
        "output: {} shard{}, {} of tensor data",
        plan.shards.len(),
        if plan.shards.len() == 1 { "" } else { "s" },
        format_bytes(plan.total_size)
    );
    for (i, s) in plan.shards.iter().enumerate() {
        let marker = if args.part.is_some() && mine.contains(&i) {
            "  <- this part"
        } else {
            ""
        };
        println!(
            "  {}  {:>4} tensors  {:>10}{marker}",
            s.name,
            s.tensors.len(),
            format_bytes(s.file_len())
        );
    }
    for f in &plan.extra_files {
        println!("  {}  (copied from --aligned)", f.name);
    }
    for (name, why) in &plan.skipped_files {
        println!("  {name}  (not copied: {why})");
    }
    println!("plan fingerprint: {}", plan.fingerprint);
    Ok(())
}

fn inspect(path: &std::path::Path, json: bool) -> Result<()> {
    let model = Model::open(path)?;
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
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("serializing JSON cannot fail")
        );
        return Ok(());
    }
    let width = model
        .tensors()
        .map(|(_, t)| t.name.len())
        .max()
        .unwrap_or(4);
    println!("{:width$}  {:7}  {:>22}  shard", "name", "dtype", "shape");
    let mut by_dtype: std::collections::BTreeMap<Dtype, (usize, u64)> = Default::default();
    for (loc, t) in model.tensors() {
        let shape = format!("{:?}", t.shape);
        println!(
            "{:width$}  {:7}  {:>22}  {}",
            t.name,
            t.dtype.name(),
            shape,
            model.shards[loc.shard].name
        );
        let e = by_dtype.entry(t.dtype).or_default();
        e.0 += 1;
        e.1 += t.nbytes();
    }
    let counts: Vec<String> = by_dtype
        .iter()
        .map(|(d, (n, b))| format!("{n} {d} ({})", format_bytes(*b)))
        .collect();
    println!(
        "{} tensors in {} shard{}: {}; {} in all",
        model.tensor_count(),
        model.shards.len(),
        if model.shards.len() == 1 { "" } else { "s" },
        counts.join(", "),
        format_bytes(model.data_bytes())
    );
    Ok(())
}

fn synth_pair(args: SynthArgs) -> Result<()> {
    let mut shape = synth::preset(&args.preset).ok_or_else(|| {
        Error::Usage(format!(
            "unknown preset '{}' (choose from {})",
            args.preset,
            synth::PRESETS
        ))
    })?;
    if let Some(layers) = args.layers {
        shape.layers = layers;
    }
    let float = |text: &str| {
        Dtype::parse(&text.to_ascii_uppercase())
            .filter(|d| d.mergeable().is_some())
            .ok_or_else(|| Error::Usage(format!("{text} is not BF16, F16 or F32")))
    };
    let dtype = float(&args.dtype)?;
    let sft_dtype = args.sft_dtype.as_deref().map(float).transpose()?;
    let spec = synth::PairSpec {
        shape,
        dtype,
        sft_dtype,
        seed: args.seed,
        sft_shards: args.sft_shards.max(1),
        aligned_shards: args.aligned_shards.max(1),
        specials: args.specials,
        int_buffer: args.int_buffer,
    };
    let bytes = synth::write_pair(&args.out, &spec)?;
    eprintln!(
        "mergestream: wrote {0}/sft and {0}/aligned ({1} each)",
        args.out.display(),
        format_bytes(bytes)
    );
    Ok(())
}
