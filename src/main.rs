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

use mergestream::busy::Stage;
use mergestream::format::Dtype;
use mergestream::method::Policy;
use mergestream::model::Model;
use mergestream::output::{self, Existing};
use mergestream::pipeline::Cancel;
use mergestream::plan::Part;
use mergestream::units::{format_bytes, ByteSize};
use mergestream::writer::IoMode;
use mergestream::{
    check, progress, spec, synth, verify, Error, ExpoJob, MergeJob, Result, RunOptions, Summary,
};

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
        after_help = "Examples:\n  mergestream expo --sft Meta-Llama-3-70B-Instruct --aligned Llama3-70B-Chinese-Chat --alpha 0.3 --out ExPO\n  mergestream expo ... --alpha 0.1,0.2,0.3 --out SWEEP   (SWEEP/alpha-0.1/, … from one read)\n  mergestream expo ... --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT --resume   (then: mergestream finalize OUT)\n  mergestream expo ... --alpha 0.3 --check ./Llama3-70B-Chinese-Chat-ExPO   (recompute, compare, write nothing)"
    )]
    Expo(ExpoArgs),
    /// Run a mergekit merge config (linear, task_arithmetic, ties, dare, slerp, model_stock,
    /// breadcrumbs, della, and expo), with mergekit's arithmetic.
    #[command(
        after_help = "Examples:\n  mergestream merge examples/configs/ties.yml --out TIES\n  mergestream merge sweep.yml --out SWEEP        (a multi-document config: SWEEP/<name>/ each)\n  mergestream merge mergekit_config.yml --check ./published-merge   (recompute, compare, write nothing)\n  mergestream plan examples/configs/ties.yml      (check the config and models; writes nothing)"
    )]
    Merge(MergeArgs),
    /// Check the models (of two for ExPO, or of a merge config) and show the output layout;
    /// writes nothing.
    Plan(PlanArgs),
    /// List a model's tensors from its headers.
    Inspect {
        /// Model directory (safetensors or PyTorch .bin weights) or one weights file.
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every file of an output against checksums.b3 and re-check its structure.
    #[command(
        after_help = "Examples:\n  mergestream verify OUT\n  mergestream verify OUT --inputs ./sft ./aligned      (an output made with --hash-inputs: re-hash the inputs too)\n  mergestream verify OUT --config ties.yml            (the inputs of a config merge, found as `merge` finds them)"
    )]
    Verify {
        dir: PathBuf,
        /// Also re-hash these input models (in the order the output recorded them: --sft then
        /// --aligned for ExPO) and compare with the SHA-256 recorded by --hash-inputs.
        #[arg(long, value_name = "MODEL", num_args = 1.., conflicts_with = "config")]
        inputs: Vec<PathBuf>,
        /// Also re-hash the input models of this merge config (resolved as `merge` resolves
        /// them) and compare with the SHA-256 recorded by --hash-inputs.
        #[arg(long, value_name = "CONFIG")]
        config: Option<PathBuf>,
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
    #[arg(long, value_name = "SIZE", default_value = "1MiB")]
    block_size: ByteSize,
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
    /// The SFT model (a model directory, safetensors or PyTorch .bin, or one weights file).
    #[arg(long, value_name = "DIR")]
    sft: PathBuf,
    /// The aligned (DPO/RLHF) model, whose dtypes and non-weight files the output takes.
    #[arg(long, value_name = "DIR")]
    aligned: PathBuf,
    /// Extrapolation strength (ExPO papers use 0.1 to 0.5); several, comma-separated, write a
    /// sweep (OUT/alpha-0.1/, OUT/alpha-0.2/, …) from one read of the inputs.
    #[arg(
        long,
        allow_negative_numbers = true,
        value_delimiter = ',',
        required = true
    )]
    alpha: Vec<f32>,
    #[command(flatten)]
    layout: LayoutArgs,
    /// A float weight only --aligned has: refuse (default) or copy it from --aligned. Buffers
    /// transformers does not save (inv_freq, position_ids, …) and integer tensors need no flag.
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = OnlyIn::Refuse)]
    only_in_aligned: OnlyIn,
    /// Tensors whose first dimension differs (vocabularies of 32000 and 32002): refuse
    /// (default) or merge the shared rows and copy the aligned model's extra rows.
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = VocabMismatch::Refuse)]
    vocab_mismatch: VocabMismatch,
}

impl ModelPair {
    fn policy(&self) -> Policy {
        Policy {
            copy_only_in_layout: self.only_in_aligned == OnlyIn::Copy,
            copy_extra_rows: self.vocab_mismatch == VocabMismatch::CopyAligned,
        }
    }
}

/// Options that shape the output's files.
#[derive(Args)]
struct LayoutArgs {
    /// Largest output shard, like transformers' max_shard_size (5GB = 5*10^9 bytes, 5GiB = 5*2^30).
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(mergestream::DEFAULT_MAX_SHARD_SIZE))]
    max_shard_size: ByteSize,
}

/// `--only-in-aligned` / `--only-in-base`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnlyIn {
    /// A mismatch (the default).
    Refuse,
    /// Copied from the aligned (or base) model.
    Copy,
}

/// `plan --vocab-mismatch`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlanVocab {
    /// A mismatch (the default).
    Refuse,
    /// The layout (aligned) model's extra rows copied.
    CopyAligned,
    /// The layout (base) model's extra rows copied.
    CopyBase,
}

/// `expo --vocab-mismatch`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VocabMismatch {
    /// A mismatch (the default).
    Refuse,
    /// Shared rows merged, the aligned model's extra rows copied.
    CopyAligned,
}

#[derive(Args)]
struct ExpoArgs {
    #[command(flatten)]
    pair: ModelPair,
    #[command(flatten)]
    lineage: LineageArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// What the output records about its inputs.
#[derive(Args)]
struct LineageArgs {
    /// Record the SHA-256 of every input weight file (what the Hugging Face Hub shows as the
    /// file's LFS object id) in mergestream.json and the model card, hashed while the run reads
    /// them; check them later with `verify OUT --inputs …`.
    #[arg(long)]
    hash_inputs: bool,
}

/// How a run that writes goes about it; none of it changes the output bytes.
#[derive(Args)]
struct RunArgs {
    /// Output directory (created if missing; must be empty unless --resume or --force).
    #[arg(long, value_name = "DIR", required_unless_present = "check")]
    out: Option<PathBuf>,
    /// Write nothing: recompute the merge and compare it, tensor by tensor, with the model
    /// already in DIR (DIR/<name>/ for each output of several); prints every tensor's outcome,
    /// exits 0 only if all are identical, 1 otherwise.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "part", "resume", "force", "io", "json"])]
    check: Option<PathBuf>,
    #[arg(long, value_name = "SIZE", default_value_t = ByteSize(mergestream::DEFAULT_MEMORY), help = memory_help())]
    memory: ByteSize,
    /// Compute threads for method and combine ops (default: the number of CPUs); ExPO is computed
    /// as its output is written.
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
    /// Print the end-of-run summary as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
    /// How shards are written: direct I/O where the filesystem allows it (auto), always, or never.
    #[arg(long, value_name = "MODE", default_value_t = IoMode::Auto, value_parser = IoMode::parse)]
    io: IoMode,
    /// Bytes per chunk (for testing; output never depends on it).
    #[arg(long, hide = true)]
    chunk_size: Option<ByteSize>,
    /// Write the shards packed (NAME.safetensors.mszst, as `mergestream pack` makes them):
    /// checksums.b3 still lists the unpacked bytes, packed.b3 the files as written;
    /// `mergestream unpack` restores the plain output, and merges read it as it is.
    #[arg(long)]
    compress: bool,
    /// zstd level of --compress, 1 (fastest) to 22 (smallest).
    #[arg(long, value_name = "N", requires = "compress", default_value_t = mergestream::packed::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=22))]
    compress_level: i32,
}

impl RunArgs {
    /// The directory the run writes, or with `--check` the one it compares with.
    fn dir(&self) -> Result<PathBuf> {
        self.out
            .clone()
            .or_else(|| self.check.clone())
            .ok_or_else(|| Error::internal("clap requires --out or --check"))
    }

    fn options(&self, layout: &LayoutArgs, lineage: &LineageArgs) -> RunOptions {
        let threads = self.threads.unwrap_or_else(cpus);
        RunOptions {
            max_shard_size: layout.max_shard_size.0,
            memory: self.memory.0,
            threads,
            chunk_bytes: self.chunk_size.map(|c| c.0 as usize),
            part: self.part,
            existing: if self.resume {
                Existing::Resume
            } else if self.force {
                Existing::Overwrite
            } else {
                Existing::Refuse
            },
            show_progress: !self.quiet && !self.json,
            io: self.io,
            hash_inputs: lineage.hash_inputs,
            compress: self.compress.then(|| mergestream::packed::PackOptions {
                level: self.compress_level,
                threads,
                ..Default::default()
            }),
        }
    }
}

#[derive(Args)]
struct MergeArgs {
    /// The merge config (mergekit's YAML; several documents with `name:` write several outputs).
    config: PathBuf,
    #[command(flatten)]
    layout: LayoutArgs,
    #[command(flatten)]
    policy: ConfigPolicyArgs,
    /// Tensors whose first dimension differs (vocabularies of 32000 and 32002): refuse
    /// (default) or merge the rows all models have and copy the base (layout) model's extra
    /// rows (for an expo document, the aligned model's).
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = ConfigVocab::Refuse)]
    vocab_mismatch: ConfigVocab,
    #[command(flatten)]
    lineage: LineageArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// `merge --vocab-mismatch`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ConfigVocab {
    /// A mismatch (the default).
    Refuse,
    /// Shared rows merged, the base model's extra rows copied.
    CopyBase,
}

/// Where the models of a config may disagree.
#[derive(Args)]
struct ConfigPolicyArgs {
    /// A float weight the base (layout) model has and another model lacks: refuse (default) or
    /// copy it from the base model.
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = OnlyIn::Refuse)]
    only_in_base: OnlyIn,
}

impl ConfigPolicyArgs {
    fn policy(&self) -> Policy {
        Policy {
            copy_only_in_layout: self.only_in_base == OnlyIn::Copy,
            copy_extra_rows: false,
        }
    }
}

#[derive(Args)]
struct PlanArgs {
    /// A merge config to check (instead of --sft/--aligned/--alpha).
    #[arg(conflicts_with_all = ["sft", "aligned", "alpha"], required_unless_present_all = ["sft", "aligned", "alpha"])]
    config: Option<PathBuf>,
    /// The SFT model (a model directory, safetensors or PyTorch .bin, or one weights file).
    #[arg(long, value_name = "DIR")]
    sft: Option<PathBuf>,
    /// The aligned model.
    #[arg(long, value_name = "DIR")]
    aligned: Option<PathBuf>,
    /// Extrapolation strength(s), comma-separated.
    #[arg(long, allow_negative_numbers = true, value_delimiter = ',')]
    alpha: Vec<f32>,
    #[command(flatten)]
    layout: LayoutArgs,
    /// As `expo --only-in-aligned`.
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = OnlyIn::Refuse)]
    only_in_aligned: OnlyIn,
    /// As `expo --vocab-mismatch` (copy-aligned) and `merge --vocab-mismatch` (copy-base):
    /// either copies the layout model's extra rows (the aligned model's for ExPO, the base
    /// model's for a config).
    #[arg(long, value_name = "WHAT", value_enum, default_value_t = PlanVocab::Refuse)]
    vocab_mismatch: PlanVocab,
    #[command(flatten)]
    config_policy: ConfigPolicyArgs,
    /// As `expo --hash-inputs` (it changes provenance, the card and so the fingerprint).
    #[arg(long)]
    hash_inputs: bool,
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
        Command::Merge(args) => merge(args)?,
        Command::Plan(args) => plan(args)?,
        Command::Inspect { model, json } => inspect(&model, json)?,
        Command::Verify {
            dir,
            inputs,
            config,
            quiet,
        } => verify_output(&dir, &inputs, config.as_deref(), quiet)?,
        Command::Finalize { out, quiet } => {
            for (dir, done) in output::finalize_all(&out)? {
                if !quiet {
                    note(format_args!(
                        "finalized {} from {} part{}: {} files in checksums.b3",
                        dir.display(),
                        done.parts,
                        if done.parts == 1 { "" } else { "s" },
                        done.files - 1
                    ));
                }
            }
        }
        Command::Synth(args) => synth_pair(args)?,
        Command::Pack(args) => pack(args)?,
        Command::Unpack(args) => unpack(args)?,
    }
    Ok(())
}

/// `verify DIR [--inputs MODEL… | --config CONFIG]`: the output, then the inputs it recorded.
fn verify_output(
    dir: &std::path::Path,
    inputs: &[PathBuf],
    config: Option<&std::path::Path>,
    quiet: bool,
) -> Result<(), Failure> {
    use mergestream::lineage::{self, GivenInput};
    let report = verify::verify(dir);
    let given: Option<Vec<GivenInput>> = match config {
        Some(path) => Some(config_inputs(dir, path)?),
        None if !inputs.is_empty() => Some(
            inputs
                .iter()
                .map(|p| GivenInput {
                    role: None,
                    path: model_arg(p),
                })
                .collect(),
        ),
        None => None,
    };
    let checked = given.map(|g| lineage::verify_inputs(dir, &g));
    // Both checks' problems in one report.
    let (report, checked) = match (report, checked) {
        (
            Err(Error::Verify { path, mut problems }),
            Some(Err(Error::Verify { problems: more, .. })),
        ) => {
            problems.extend(more);
            return Err(Error::Verify { path, problems }.into());
        }
        (report, checked) => (report?, checked.transpose()?),
    };
    if !quiet {
        let mut out = stdout();
        for f in checked.iter().flatten() {
            writeln!(
                out,
                "{}  {}/{}: OK ({} input)",
                f.sha256,
                f.model.display(),
                f.name,
                f.role
            )?;
        }
        let inputs = match &checked {
            Some(files) => format!(", {} input files match their SHA-256", files.len()),
            None => String::new(),
        };
        writeln!(
            out,
            "{}: OK ({} files, {} tensors, {} checked{}{inputs})",
            dir.display(),
            report.files,
            report.tensors,
            format_bytes(report.bytes),
            if report.packed {
                " against packed.b3"
            } else {
                ""
            }
        )?;
        if report.packed {
            writeln!(
                out,
                "packed: the files, the packed shards' structure and checksums.b3's listing were checked; the unpacked bytes are checked against checksums.b3 by `mergestream unpack {} --out DIR`",
                dir.display()
            )?;
        }
        out.flush()?;
    }
    Ok(())
}

/// A model named on the command line: the path when it exists, else the Hugging Face id
/// (`org/name[@revision]`, as a model card's commands name models of the cache) looked up in the
/// local cache; else the path, for opening it to say what is wrong.
fn model_arg(path: &std::path::Path) -> PathBuf {
    if path.exists() {
        return path.to_path_buf();
    }
    let text = path.to_string_lossy();
    let (repo, revision) = match text.split_once('@') {
        Some((repo, revision)) => (repo, Some(revision)),
        None => (text.as_ref(), None),
    };
    if spec::is_repo_id(repo) {
        if let Ok(snapshot) = spec::HfCache::from_env().resolve(repo, revision) {
            return snapshot.dir;
        }
    }
    path.to_path_buf()
}

/// The input models of the config document that made the output `dir`, resolved as `merge`
/// resolves them, with their roles.
fn config_inputs(
    dir: &std::path::Path,
    config: &std::path::Path,
) -> Result<Vec<mergestream::lineage::GivenInput>> {
    use mergestream::error::UsageError;
    use mergestream::lineage::GivenInput;
    let spec = read_config(config)?;
    let k = if spec.outputs.len() == 1 {
        0
    } else {
        // A multi-document config writes OUT/<name>/: the output's provenance names it.
        let path = dir.join(mergestream::plan::PROVENANCE_FILE);
        let name = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned));
        spec.outputs
            .iter()
            .position(|o| o.name == name)
            .ok_or_else(|| UsageError::NoSuchDocument {
                name,
                names: spec
                    .outputs
                    .iter()
                    .map(|o| o.name.clone().unwrap_or_else(|| "(unnamed)".into()))
                    .collect(),
            })?
    };
    let siblings = dir.parent().unwrap_or(std::path::Path::new("."));
    Ok(spec.outputs[k]
        .models
        .iter()
        .map(|entry| GivenInput {
            role: Some(entry.path.clone()),
            path: match &entry.model.location {
                spec::ModelLocation::Output { name, .. } => siblings.join(name),
                _ => entry
                    .model
                    .dir()
                    .map(std::path::Path::to_path_buf)
                    .unwrap_or_default(),
            },
        })
        .collect())
}

/// A cancel flag set by SIGINT and SIGTERM.
fn cancel_on_signals() -> Result<Cancel> {
    let cancel = Cancel::default();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(signal, Arc::clone(&cancel.signal), signal as usize)
            .map_err(|source| Error::SignalHandler { source })?;
    }
    Ok(cancel)
}

/// `--sft` and `--aligned` as paths: as given when they exist, else looked up as Hugging Face
/// ids (`org/name[@revision]`) in the local cache, as configs' models are.
fn model_paths(sft: PathBuf, aligned: PathBuf, alphas: &[f32]) -> Result<(PathBuf, PathBuf)> {
    if sft.exists() && aligned.exists() {
        return Ok((sft, aligned));
    }
    let cwd =
        std::env::current_dir().map_err(|e| Error::io(".", "finding the working directory", e))?;
    let spec = spec::expo_spec(
        &sft.to_string_lossy(),
        &aligned.to_string_lossy(),
        alphas,
        &cwd,
        &spec::HfCache::from_env(),
    )
    .map_err(|e| Error::ModelReference(Box::new(e)))?;
    let doc = &spec.outputs[0];
    let base = doc.base.unwrap_or(1);
    let dir = |i: usize| doc.models[i].model.dir().map(std::path::Path::to_path_buf);
    let aligned_at = (0..doc.models.len()).find(|&i| i != base).unwrap_or(0);
    match (dir(base), dir(aligned_at)) {
        (Some(s), Some(a)) => Ok((s, a)),
        _ => Err(Error::internal(
            "an expo spec whose models have no directory",
        )),
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pack(args: PackArgs) -> Result<()> {
    let options = mergestream::packed::PackOptions {
        level: args.level,
        block_size: u32::try_from(args.block_size.0).unwrap_or(u32::MAX),
        threads: args.threads.unwrap_or_else(cpus),
    };
    let s = mergestream::packed::pack_dir(&args.dir, &args.out, args.base.as_deref(), &options)?;
    if !args.quiet {
        note(format_args!(
            "packed {} shard{} ({} -> {}, {:.3}x) and {} other file{} into {} in {:.1} s",
            s.shards,
            if s.shards == 1 { "" } else { "s" },
            format_bytes(s.original_bytes),
            format_bytes(s.packed_bytes),
            s.original_bytes as f64 / s.packed_bytes.max(1) as f64,
            s.carried,
            if s.carried == 1 { "" } else { "s" },
            args.out.display(),
            s.seconds
        ));
    }
    Ok(())
}

fn unpack(args: UnpackArgs) -> Result<()> {
    let threads = args.threads.unwrap_or_else(cpus);
    let s =
        mergestream::packed::unpack_dir(&args.packed, &args.out, args.base.as_deref(), threads)?;
    if !args.quiet {
        note(format_args!(
            "unpacked {} shard{} ({}) and {} other file{} into {} in {:.1} s; every file matches checksums.b3",
            s.shards,
            if s.shards == 1 { "" } else { "s" },
            format_bytes(s.original_bytes),
            s.carried,
            if s.carried == 1 { "" } else { "s" },
            args.out.display(),
            s.seconds
        ));
    }
    Ok(())
}

fn expo(args: ExpoArgs) -> Result<(), Failure> {
    let cancel = cancel_on_signals()?;
    let (sft, aligned) = model_paths(
        args.pair.sft.clone(),
        args.pair.aligned.clone(),
        &args.pair.alpha,
    )?;
    let job = ExpoJob {
        policy: args.pair.policy(),
        options: args.run.options(&args.pair.layout, &args.lineage),
        sft,
        aligned,
        out: args.run.dir()?,
        alphas: args.pair.alpha,
    };
    if let Some(dir) = &args.run.check {
        let reports = check::check(&job.to_merge_job()?, &cancel)?;
        return print_checks(dir, &reports, args.run.quiet);
    }
    let summary = mergestream::expo(&job, &cancel)?;
    report(&summary, job.options.part, args.run.quiet, args.run.json)
}

/// `--check`'s results: every tensor's outcome (only the others with `--quiet`) and a
/// summary line per output on stdout; exit 1 unless all are identical.
fn print_checks(
    dir: &std::path::Path,
    reports: &[check::CheckReport],
    quiet: bool,
) -> Result<(), Failure> {
    let mut out = stdout();
    let (mut tensors, mut differing, mut missing, mut extra) = (0, 0, 0, 0);
    for r in reports {
        for t in &r.tensors {
            if !quiet || t.outcome != check::Outcome::Identical {
                writeln!(out, "{t}")?;
            }
        }
        for name in &r.extra {
            writeln!(
                out,
                "{name}: EXTRA: in the existing model, not produced by the merge"
            )?;
        }
        let identical = r.identical();
        writeln!(
            out,
            "{}: {} of {} tensors identical{}",
            r.dir.display(),
            identical,
            r.tensors.len(),
            if r.is_identical() {
                String::new()
            } else {
                format!(
                    "; {} differ, {} missing, {} extra",
                    r.tensors.len() - identical - r.missing(),
                    r.missing(),
                    r.extra.len()
                )
            }
        )?;
        tensors += r.tensors.len();
        missing += r.missing();
        differing += r.tensors.len() - identical - r.missing();
        extra += r.extra.len();
    }
    out.flush()?;
    if reports.iter().all(check::CheckReport::is_identical) {
        return Ok(());
    }
    let path = match reports {
        [one] => one.dir.clone(),
        _ => dir.to_path_buf(),
    };
    Err(Error::CheckDiffers {
        path,
        tensors,
        differing,
        missing,
        extra,
    }
    .into())
}

/// Reads and checks a merge config (relative model paths are relative to the working
/// directory, as mergekit reads them).
fn read_config(path: &std::path::Path) -> Result<spec::MergeSpec> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "reading config", e))?;
    let cwd =
        std::env::current_dir().map_err(|e| Error::io(".", "finding the working directory", e))?;
    spec::parse_config(&text, &cwd, &spec::HfCache::from_env()).map_err(|source| Error::Config {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

fn merge(args: MergeArgs) -> Result<(), Failure> {
    let cancel = cancel_on_signals()?;
    let spec = read_config(&args.config)?;
    let options = args.run.options(&args.layout, &args.lineage);
    let policy = Policy {
        copy_extra_rows: args.vocab_mismatch == ConfigVocab::CopyBase,
        ..args.policy.policy()
    };
    let dir = args.run.dir()?;
    let runs = mergestream::config_runs(&spec, &dir, policy, &options)?;
    if args.run.check.is_some() {
        // Later stages read the earlier stages' outputs as they are in DIR.
        let mut reports = Vec::new();
        for job in &runs {
            reports.extend(check::check(job, &cancel)?);
        }
        return print_checks(&dir, &reports, args.run.quiet);
    }
    for job in &runs {
        let summary = mergestream::run(job, &cancel)?;
        report(&summary, options.part, args.run.quiet, args.run.json)?;
    }
    Ok(())
}

/// The end-of-run summary: a line (and where the time went) on stderr, or JSON on stdout.
fn report(summary: &Summary, part: Option<Part>, quiet: bool, json: bool) -> Result<(), Failure> {
    let peak = progress::peak_rss();
    if json {
        let busy: serde_json::Map<String, serde_json::Value> = summary
            .busy
            .iter()
            .map(|(stage, d)| {
                (
                    stage.name().replace(' ', "_"),
                    serde_json::json!({
                        "seconds": d.as_secs_f64(),
                        "fraction": summary.busy_fraction(*stage),
                    }),
                )
            })
            .collect();
        let doc = serde_json::json!({
            "finalized": summary.finalized,
            "part": part.map(|p| p.to_string()),
            "outputs": summary.outputs,
            "tensors": summary.tensors,
            "shards_written": summary.shards_written,
            "shards_kept": summary.shards_kept,
            "bytes_written": summary.bytes_written,
            "bytes_read": summary.bytes_read,
            "seconds": summary.seconds,
            "peak_rss_bytes": peak,
            "kernel": summary.isa.to_string(),
            "io": summary.io.to_string(),
            "reads": summary.reads.to_string(),
            "threads": summary.threads,
            "readers": summary.readers,
            "busy": busy,
            "notes": summary.notes.iter().map(|n| serde_json::json!({"tensor": n.tensor, "note": n.note})).collect::<Vec<_>>(),
            "input_sha256": summary.input_hashes.iter().map(|(m, files)| serde_json::json!({"model": m, "files": files})).collect::<Vec<_>>(),
            "not_copied": summary.skipped_files.iter().map(|(n, why)| serde_json::json!({"name": n, "why": why})).collect::<Vec<_>>(),
        });
        let mut out = stdout();
        serde_json::to_writer_pretty(&mut out, &doc).map_err(io::Error::from)?;
        writeln!(out)?;
        out.flush()?;
        return Ok(());
    }
    if quiet {
        return Ok(());
    }
    for (name, why) in &summary.skipped_files {
        note(format_args!("note: not copied: {name} ({why})"));
    }
    for n in &summary.notes {
        note(format_args!("note: {n}"));
    }
    for (model, files) in &summary.input_hashes {
        for f in files {
            note(format_args!(
                "sha256 {}  {}/{}",
                f.sha256,
                model.display(),
                f.name
            ));
        }
    }
    let kept = if summary.shards_kept > 0 {
        format!(", {} kept from the earlier run", summary.shards_kept)
    } else {
        String::new()
    };
    let peak = peak
        .map(|b| format!(", peak memory {} MiB", b >> 20))
        .unwrap_or_default();
    let rate = summary.bytes_written as f64 / summary.seconds.max(1e-9);
    let what = if summary.finalized {
        "done".to_string()
    } else {
        format!(
            "part {} done (run `mergestream finalize` after all parts)",
            part.unwrap_or(Part::WHOLE)
        )
    };
    let outputs = if summary.outputs > 1 {
        format!("{} outputs, ", summary.outputs)
    } else {
        String::new()
    };
    note(format_args!(
        "{what}: {outputs}{} tensors, {} written in {} shard{}{kept}, {:.1} s ({}/s){peak}, kernel {}, {} reads, {} writes",
        summary.tensors,
        format_bytes(summary.bytes_written),
        summary.shards_written,
        if summary.shards_written == 1 { "" } else { "s" },
        summary.seconds,
        format_bytes(rate as u64),
        summary.isa,
        summary.reads,
        summary.io
    ));
    let busy: Vec<String> = Stage::ALL
        .iter()
        .map(|&stage| {
            let of = match stage {
                Stage::Read if summary.readers > 1 => format!(" of {} threads", summary.readers),
                Stage::Compute if summary.threads > 1 => {
                    format!(" of {} threads", summary.threads)
                }
                Stage::Hash | Stage::Io if summary.outputs > 1 => {
                    format!(" of {} threads", summary.outputs)
                }
                _ => String::new(),
            };
            format!(
                "{} {:.0}%{of}",
                stage.name(),
                100.0 * summary.busy_fraction(stage)
            )
        })
        .collect();
    note(format_args!("busy: {}", busy.join(", ")));
    Ok(())
}

fn plan(args: PlanArgs) -> Result<(), Failure> {
    let options = RunOptions {
        max_shard_size: args.layout.max_shard_size.0,
        memory: mergestream::DEFAULT_MEMORY,
        threads: 1,
        chunk_bytes: None,
        part: args.part,
        existing: Existing::Refuse,
        show_progress: false,
        io: IoMode::Auto,
        hash_inputs: args.hash_inputs,
        compress: None,
    };
    let out_dir = args.out.clone().unwrap_or_else(|| PathBuf::from("OUT"));
    let runs: Vec<MergeJob> = match (&args.config, &args.sft, &args.aligned) {
        (Some(config), _, _) => {
            let spec = read_config(config)?;
            let policy = Policy {
                copy_extra_rows: args.vocab_mismatch != PlanVocab::Refuse,
                ..args.config_policy.policy()
            };
            mergestream::config_runs(&spec, &out_dir, policy, &options)?
        }
        (None, Some(sft), Some(aligned)) => {
            let policy = Policy {
                copy_only_in_layout: args.only_in_aligned == OnlyIn::Copy,
                copy_extra_rows: args.vocab_mismatch != PlanVocab::Refuse,
            };
            vec![ExpoJob {
                sft: sft.clone(),
                aligned: aligned.clone(),
                out: out_dir.clone(),
                alphas: args.alpha.clone(),
                policy,
                options,
            }
            .to_merge_job()?]
        }
        _ => {
            return Err(
                Error::internal("clap requires a config or --sft, --aligned and --alpha").into(),
            )
        }
    };
    let mut out = stdout();
    let part = args.part.unwrap_or(Part::WHOLE);
    for job in &runs {
        if args.out.is_some() {
            let inputs: Vec<&std::path::Path> = job.models.iter().map(PathBuf::as_path).collect();
            for o in &job.outputs {
                mergestream::paths::check_overlap(&o.out, &inputs)?;
            }
        }
        if job.models.iter().any(|m| !m.exists()) && runs.len() > 1 {
            // A later stage reads an earlier stage's output, which does not exist yet.
            writeln!(
                out,
                "later stage: {} (reads outputs of earlier stages; planned when they exist)",
                job.outputs
                    .iter()
                    .map(|o| o.out.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
            continue;
        }
        let (models, plans) = mergestream::plan_job(job)?;
        let sizes: Vec<String> = models
            .iter()
            .map(|m| {
                format!(
                    "{} ({}, {})",
                    m.path.display(),
                    format_bytes(m.data_bytes()),
                    m.format.name()
                )
            })
            .collect();
        writeln!(
            out,
            "OK: {} tensors match across {}",
            plans.first().map_or(0, |p| p.tensors.len()),
            sizes.join(", ")
        )?;
        for m in &models {
            if let Some(line) = unread_note(m) {
                writeln!(out, "note: {line}")?;
            }
        }
        for (output, plan) in job.outputs.iter().zip(&plans) {
            let mine = plan.shards_of(part);
            writeln!(
                out,
                "output {}: {} shard{}, {} of tensor data",
                output.out.display(),
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
                writeln!(out, "  {}  (copied)", f.name)?;
            }
            writeln!(
                out,
                "  {}  (written: this output's model card)",
                mergestream::card::CARD_FILE
            )?;
            if plan.config_yml.is_some() {
                writeln!(
                    out,
                    "  {}  (written: the merge config)",
                    mergestream::card::CONFIG_FILE
                )?;
            }
            if plan.hash_inputs {
                writeln!(
                    out,
                    "  input files: SHA-256 recorded (--hash-inputs; part 0 of a partitioned run hashes them)"
                )?;
            }
            for (name, why) in &plan.skipped_files {
                writeln!(out, "  {name}  (not copied: {why})")?;
            }
            for n in &plan.notes {
                writeln!(out, "  note: {n}")?;
            }
            writeln!(out, "plan fingerprint: {}", plan.fingerprint)?;
        }
    }
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
            "format": model.format.name(),
            "unread": model.unread,
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
        "{} tensors in {} shard{} ({}): {}; {} in all",
        model.tensor_count(),
        model.shards.len(),
        if model.shards.len() == 1 { "" } else { "s" },
        model.format.name(),
        counts.join(", "),
        format_bytes(model.data_bytes())
    )?;
    if let Some(line) = unread_note(&model) {
        writeln!(out, "note: {line}")?;
    }
    out.flush()?;
    Ok(())
}

/// A model directory holding weights in two formats is read in one (safetensors wins); says
/// which files were left unread.
fn unread_note(model: &Model) -> Option<String> {
    (!model.unread.is_empty()).then(|| {
        format!(
            "{}: read the {} weights; also holds {}, not read (safetensors wins when a directory has both)",
            model.path.display(),
            model.format.name(),
            model.unread.join(" and ")
        )
    })
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
