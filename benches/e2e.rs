//! End-to-end benchmark: `mergestream expo` (and merge configs) on generated checkpoints, against
//! the disk floor.
//!
//! For each requested size (GB per model) this generates an SFT/aligned pair with
//! `mergestream synth` (and, for the 3-model merge, a second pair), then for each workload
//! (`--workloads`: `expo`, one ExPO output; `linear3`, a mergekit `linear` config over three
//! models; `sweep5`, `expo --alpha 0.1,0.2,0.3,0.4,0.5`, five outputs from one read) measures,
//! several times each and interleaved (the three in turn, each run starting with a different one):
//!
//! - the **floor**: this process reading every input's files once, a piece of each input in
//!   turn with the tool's reads (with `O_DIRECT`, four 512 KiB `pread`s in flight; through the
//!   page cache, one of 4 MiB), and writing files of exactly the sizes the merge writes (every
//!   output's) in the tool's 2 MiB writes, two in flight, then `fsync` — the tool's I/O pattern
//!   with no arithmetic, hashing or bookkeeping. Readers and writers overlap, as the tool's
//!   stages do, and a piece of output is written no sooner than the merge could write it: once
//!   the inputs it would come from have been read. Each file is allocated to its length first
//!   (`fallocate`), as the tool does. Writes go through `O_DIRECT` (4096-aligned buffers and
//!   lengths, the tail fixed with `ftruncate`) or the page cache (`--io`);
//! - the **touching floor**: the floor with a CPU touching every byte once, the least any merge
//!   adds to the disk's work: a thread of its own reads each input piece (folding it into a
//!   word) before the writer takes it, and each output piece is written into one of six
//!   rotating buffers (as many as the tool's staging buffers) just before it goes to the disk,
//!   where the floor writes one buffer of zeros over and over. On a VM the two can differ by far
//!   more than that CPU time: on this project's virtio VM a process that looks at the bytes the
//!   disk delivered sees its requests take longer, up to ~1.7× as long in spells of minutes, and
//!   fresh output buffers cost the floor ~5 % (README, Performance);
//! - **mergestream** as a child process: wall time, and user+sys CPU time and peak RSS
//!   from `wait4`'s `rusage` of that child alone;
//! - with `--mergekit`, mergekit 0.1.5 on the same merges (ExPO as `task_arithmetic`, the same
//!   formula; the same `linear` config; the sweep as five runs, mergekit having no one-read
//!   sweep), in a throwaway venv or `--mergekit-venv`, timed the same way (the sweep's time is
//!   the sum of its runs, its memory the largest).
//!
//! It prints the machine, the date and the commit, and a markdown table. It deliberately checks
//! nothing about the output's bytes (the tests do that) and never changes the library.
//!
//! `cargo bench --bench e2e -- [--sizes 0.1,2,10] [--workloads expo,linear3,sweep5] [--cold]
//! [--mergekit [--mergekit-venv DIR]] [--dir PATH] [--keep]`

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use mergestream::iobuf::{IoBuf, ALIGN};
use mergestream::pipeline::Settings;
use mergestream::synth::{Preset, Shape};

const BIN: &str = env!("CARGO_BIN_EXE_mergestream");
/// The piece size of the floor's buffered reads (and the size of its read buffers).
const PIECE: usize = 4 << 20;
/// The size of the floor's writes: the tool's direct write with the default budget.
const WRITE_PIECE: usize = mergestream::writer::MAX_STAGE_BYTES;
/// Pieces the floor's writer lets wait for the disk, those being written included: two
/// queued behind the two in flight (the tool's staging buffers also hold one filling and one
/// being hashed).
const WRITE_STAGES: usize = 4;
/// The touching floor's write buffers: as many as the tool's staging buffers per file (those
/// waiting for the disk, one filling and one being hashed).
const TOUCHED_BUFFERS: usize = WRITE_STAGES + 2;
/// Writes in flight at once, as the tool's I/O threads per file.
const WRITES_IN_FLIGHT: usize = mergestream::writer::WRITES_IN_FLIGHT;
const GB: f64 = 1e9;
const MERGEKIT: &str = "mergekit==0.1.5";

#[derive(Parser)]
#[command(about = "End-to-end benchmark of `mergestream expo` against the disk floor")]
struct Args {
    /// Sizes in GB per model, or PRESET:LAYERS (e.g. mistral-7b:3), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["0.1".to_string(), "2".to_string()])]
    sizes: Vec<String>,
    /// Drop the page cache before every run (needs root).
    #[arg(long)]
    cold: bool,
    /// What to run on each size: expo (one output), linear3 (a 3-model linear config),
    /// sweep5 (five alphas from one read).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Workload::Expo])]
    workloads: Vec<Workload>,
    /// Also time mergekit 0.1.5 (installed from PyPI into a venv under --dir, kept for reuse).
    #[arg(long)]
    mergekit: bool,
    /// A venv that already has mergekit 0.1.5 (instead of installing one).
    #[arg(long, value_name = "DIR")]
    mergekit_venv: Option<PathBuf>,
    /// Where pairs, outputs and the venv go (default: target/bench-e2e).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep generated pairs (reused by later runs) and the last outputs.
    #[arg(long)]
    keep: bool,
    /// How the floor writes, and what `--io` the tool gets if it has that flag
    /// (default: direct if an O_DIRECT file can be written in --dir).
    #[arg(long, value_enum)]
    io: Option<IoMode>,
    /// Also print the read-strategy table (reads in flight, direct or buffered, piece size) for
    /// each size, cold (needs root).
    #[arg(long)]
    reads: bool,
    /// Measured runs of the floor and of mergestream, per size.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measured runs of mergekit, per size (it is slow).
    #[arg(long, default_value_t = 1)]
    mergekit_runs: usize,
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    alpha: f32,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A merge to time.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// `mergestream expo`: two inputs, one output.
    Expo,
    /// `mergestream merge` of a `linear` config: three inputs, one output.
    Linear3,
    /// `mergestream expo --alpha 0.1,0.2,0.3,0.4,0.5`: two inputs, five outputs.
    Sweep5,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Expo => "expo",
            Workload::Linear3 => "linear x3",
            Workload::Sweep5 => "expo sweep x5",
        }
    }
}

/// The alphas of the sweep workload.
const SWEEP: [&str; 5] = ["0.1", "0.2", "0.3", "0.4", "0.5"];

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IoMode {
    Direct,
    Buffered,
}

impl IoMode {
    fn name(self) -> &'static str {
        match self {
            IoMode::Direct => "direct",
            IoMode::Buffered => "buffered",
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("e2e: error: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, String>;

fn run(args: &Args) -> Res<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-e2e"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let dir = dir.canonicalize().map_err(|e| e.to_string())?;
    let specs: Vec<PairSpec> = args
        .sizes
        .iter()
        .map(|s| PairSpec::parse(s))
        .collect::<Res<_>>()?;

    let (io, io_note) = match args.io {
        Some(m) => (m, "set by --io"),
        None if direct_works(&dir) => (IoMode::Direct, "auto: O_DIRECT works here"),
        None => (IoMode::Buffered, "auto: O_DIRECT refused here"),
    };
    let help = output(Command::new(BIN).args(["expo", "--help"]))?;
    let tool_has_io = help.contains("--io <") || help.contains("--io=");
    let cold_ok = if args.cold {
        drop_caches().is_ok()
    } else {
        true
    };

    let machine = Machine::probe(&dir);
    println!("## mergestream e2e benchmark\n");
    println!("- date: {}", machine.date);
    println!("- commit: {}", machine.commit);
    println!("- binary: {BIN}");
    println!(
        "- machine: {}, {} cores, {} GiB RAM",
        machine.cpu, machine.cores, machine.ram_gib
    );
    println!("- bench dir: {} ({})", dir.display(), machine.fs);
    println!(
        "- floor I/O: {} ({io_note}); mergestream {}",
        io.name(),
        if tool_has_io {
            format!("gets --io {}", io.name())
        } else {
            "has no --io flag yet: it writes buffered".to_string()
        }
    );
    println!(
        "- runs: {} measured (median, min) after one warm-up; cache: {}",
        args.runs.max(1),
        match (args.cold, cold_ok) {
            (false, _) => "warm (every input read through the page cache before each run)",
            (true, true) => "cold (sync; echo 3 > /proc/sys/vm/drop_caches before each run)",
            (true, false) => "cold: not permitted (drop_caches failed), runs are warm",
        }
    );
    println!(
        "- alpha {}, mergestream defaults otherwise (--memory 256MiB, threads = cores)\n",
        args.alpha
    );

    let mergekit = if let Some(venv) = &args.mergekit_venv {
        let m = Mergekit::at(venv);
        println!("- mergekit: {}\n", m.versions);
        Some(m)
    } else if args.mergekit {
        match install_mergekit(&dir) {
            Ok(m) => {
                println!("- mergekit: {}\n", m.versions);
                Some(m)
            }
            Err(why) => {
                println!("- mergekit: skipped: {why}\n");
                None
            }
        }
    } else {
        None
    };

    let ctx = Ctx {
        dir: dir.clone(),
        io,
        tool_has_io,
        cold: args.cold && cold_ok,
        runs: args.runs.max(1),
        alpha: args.alpha,
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for spec in &specs {
        for &workload in &args.workloads {
            match bench_size(&ctx, spec, workload, mergekit.as_ref(), args, &mut notes) {
                Ok(row) => rows.push(row),
                Err(why) => notes.push(format!(
                    "{} {}: skipped: {why}",
                    spec.label(),
                    workload.name()
                )),
            }
        }
    }

    println!("| size | merge | I/O | cache | floor s | floor GB/s | touching floor s | mergestream s | mergestream GB/s | ratio to floor | ratio to touching floor | CPU s | peak RSS MiB | mergekit s | mergekit peak RSS MiB | speedup |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", r.markdown());
    }
    println!();
    println!("Times are median (min) of the measured runs; GB/s = output bytes / s; the floor reads every input once and writes every output; the touching floor also reads every input byte and writes every output byte with a CPU; ratio = median / floor median; CPU = user+sys of the child; speedup = mergekit / mergestream medians.");
    for n in &notes {
        println!("- {n}");
    }
    Ok(())
}

struct Ctx {
    dir: PathBuf,
    io: IoMode,
    tool_has_io: bool,
    cold: bool,
    runs: usize,
    alpha: f32,
}

/// What to generate: a preset's widths and a number of layers.
struct PairSpec {
    /// What the user asked for, as typed.
    asked: String,
    preset: Preset,
    layers: u64,
}

/// The synth presets, widest first (their dimensions come from `mergestream::synth`; the actual
/// bytes are read back from the generated files).
fn presets() -> Vec<Preset> {
    let mut all = Preset::all().to_vec();
    all.sort_by_key(|&p| std::cmp::Reverse(model_bytes(p, 0)));
    all
}

impl PairSpec {
    fn parse(text: &str) -> Res<PairSpec> {
        if let Some((name, layers)) = text.split_once(':') {
            let preset =
                Preset::from_str(name, false).map_err(|_| format!("unknown preset '{name}'"))?;
            let layers = layers
                .parse()
                .map_err(|_| format!("'{layers}' is not a layer count"))?;
            return Ok(PairSpec {
                asked: text.to_string(),
                preset,
                layers,
            });
        }
        let gb: f64 = text
            .parse()
            .map_err(|_| format!("'{text}' is not a size in GB or PRESET:LAYERS"))?;
        let target = gb * GB;
        // The widest preset whose embedding and lm_head alone fit, with the layer count that
        // comes closest to the target.
        let all = presets();
        let preset = all
            .iter()
            .copied()
            .find(|&p| model_bytes(p, 0) as f64 <= target)
            .unwrap_or(all[all.len() - 1]);
        let per_layer = (model_bytes(preset, 1) - model_bytes(preset, 0)) as f64;
        let layers = ((target - model_bytes(preset, 0) as f64) / per_layer)
            .round()
            .max(0.0) as u64;
        Ok(PairSpec {
            asked: text.to_string(),
            preset,
            layers,
        })
    }

    fn label(&self) -> String {
        format!("{} ({} --layers {})", self.asked, self.preset, self.layers)
    }

    fn bytes(&self) -> u64 {
        model_bytes(self.preset, self.layers)
    }
}

/// BF16 tensor bytes of a synth model of `preset`'s widths (the layout of `synth::tensors`).
fn model_bytes(preset: Preset, layers: u64) -> u64 {
    let Shape {
        hidden: h,
        intermediate: i,
        vocab: v,
        kv,
        ..
    } = preset.shape();
    let per_layer = 2 * h * h + 2 * kv * h + 3 * i * h + 2 * h;
    2 * (2 * v * h + h + layers * per_layer)
}

/// What a turn of a measured run times.
#[derive(Clone, Copy)]
enum Turn {
    Floor,
    TouchingFloor,
    Tool,
}

/// One size's and workload's results.
struct Row {
    label: String,
    workload: Workload,
    io: String,
    cache: &'static str,
    out_bytes: u64,
    floor: Stats,
    touching_floor: Stats,
    tool: Stats,
    tool_cpu: Stats,
    tool_rss_mib: u64,
    mergekit: Option<Result<(Stats, u64), String>>,
}

impl Row {
    fn markdown(&self) -> String {
        let rate = |s: f64| self.out_bytes as f64 / GB / s;
        let mergekit = match &self.mergekit {
            None => ("—".to_string(), "—".to_string(), "—".to_string()),
            Some(Err(_)) => ("failed".to_string(), "—".to_string(), "—".to_string()),
            Some(Ok((m, rss))) => (
                m.show(),
                rss.to_string(),
                format!("{:.1}×", m.median / self.tool.median),
            ),
        };
        format!(
            "| {} | {} | {} | {} | {} | {:.2} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            self.label,
            self.workload.name(),
            self.io,
            self.cache,
            self.floor.show(),
            rate(self.floor.median),
            self.touching_floor.show(),
            self.tool.show(),
            rate(self.tool.median),
            self.tool.median / self.floor.median,
            self.tool.median / self.touching_floor.median,
            self.tool_cpu.show(),
            self.tool_rss_mib,
            mergekit.0,
            mergekit.1,
            mergekit.2
        )
    }
}

/// Median and minimum of a few measurements.
struct Stats {
    median: f64,
    min: f64,
}

impl Stats {
    fn of(mut xs: Vec<f64>) -> Stats {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let median = if n % 2 == 1 {
            xs[n / 2]
        } else {
            (xs[n / 2 - 1] + xs[n / 2]) / 2.0
        };
        Stats { median, min: xs[0] }
    }

    fn show(&self) -> String {
        let digits = if self.median < 1.0 { 3 } else { 2 };
        format!("{:.digits$} ({:.digits$})", self.median, self.min)
    }
}

/// Generates (or reuses) a synth pair of `spec` at `pair` with `seed`.
fn make_pair(ctx: &Ctx, spec: &PairSpec, pair: &Path, seed: u64, keep: bool) -> Res<()> {
    let marker = pair.join("bench-pair.json");
    if marker.is_file() {
        return Ok(());
    }
    remove_dir(pair)?;
    let size = spec.bytes();
    let sft_shards = 1 + size.div_ceil(4_000_000_000);
    let aligned_shards = sft_shards + 1;
    eprintln!("e2e: {}: generating {} per model…", spec.label(), gb(size));
    let t = Instant::now();
    run_quiet(
        Command::new(BIN).arg("synth").arg(pair).args([
            "--preset",
            spec.preset.name(),
            "--layers",
            &spec.layers.to_string(),
            "--sft-shards",
            &sft_shards.to_string(),
            "--aligned-shards",
            &aligned_shards.to_string(),
            "--seed",
            &seed.to_string(),
        ]),
        &ctx.dir.join("synth.log"),
    )?;
    eprintln!("e2e: generated in {:.0} s", t.elapsed().as_secs_f64());
    if keep {
        std::fs::write(
            &marker,
            format!(
                "{{\"preset\":\"{}\",\"layers\":{},\"seed\":{seed}}}\n",
                spec.preset, spec.layers
            ),
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn bench_size(
    ctx: &Ctx,
    spec: &PairSpec,
    workload: Workload,
    mergekit: Option<&Mergekit>,
    args: &Args,
    notes: &mut Vec<String>,
) -> Res<Row> {
    let pair = ctx
        .dir
        .join(format!("pair-{}-L{}", spec.preset, spec.layers));
    // The third model of the linear merge: the aligned model of a second pair.
    let pair2 = ctx
        .dir
        .join(format!("pair-{}-L{}-seed2", spec.preset, spec.layers));
    let out = ctx.dir.join("out-mergestream");
    let floor_out = ctx.dir.join("out-floor");
    let mk_out = ctx.dir.join("out-mergekit");
    for d in [&out, &floor_out, &mk_out] {
        remove_dir(d)?;
    }
    let (inputs_n, outputs_n) = match workload {
        Workload::Expo => (2, 1),
        Workload::Linear3 => (3, 1),
        Workload::Sweep5 => (2, SWEEP.len() as u64),
    };
    // The inputs (a second pair for the third model) and every output, at once (each output is
    // removed before the next run), plus room for everything else on the disk.
    let size = spec.bytes();
    let have = [&pair, &pair2]
        .iter()
        .filter(|p| p.join("bench-pair.json").is_file())
        .count() as u64;
    let pairs: u64 = if workload == Workload::Linear3 { 2 } else { 1 };
    let need = 2 * size * pairs.saturating_sub(have) + outputs_n * size + size / 20 + (1 << 30);
    let free = free_bytes(&ctx.dir)?;
    if free < need {
        return Err(format!(
            "needs about {:.1} GB free in {}, has {:.1} GB",
            need as f64 / GB,
            ctx.dir.display(),
            free as f64 / GB
        ));
    }
    make_pair(ctx, spec, &pair, 1, args.keep)?;
    if workload == Workload::Linear3 {
        make_pair(ctx, spec, &pair2, 2, args.keep)?;
    }
    let models: Vec<PathBuf> = match workload {
        Workload::Linear3 => vec![
            pair.join("sft"),
            pair.join("aligned"),
            pair2.join("aligned"),
        ],
        _ => vec![pair.join("sft"), pair.join("aligned")],
    };
    let inputs: Vec<Vec<PathBuf>> = models
        .iter()
        .map(|m| safetensors_files(m))
        .collect::<Res<_>>()?;
    let in_bytes: u64 = file_sizes(&inputs[1])?.iter().sum();
    debug_assert_eq!(inputs.len(), inputs_n);

    let linear_config = ctx.dir.join("linear3.yml");
    let mut tool = Command::new(BIN);
    match workload {
        Workload::Expo | Workload::Sweep5 => {
            let alpha = if workload == Workload::Expo {
                ctx.alpha.to_string()
            } else {
                SWEEP.join(",")
            };
            tool.arg("expo")
                .arg("--sft")
                .arg(&models[0])
                .arg("--aligned")
                .arg(&models[1])
                .arg("--alpha")
                .arg(alpha);
        }
        Workload::Linear3 => {
            let mut yaml = String::from("merge_method: linear\nmodels:\n");
            for (m, w) in models.iter().zip([0.5, 0.3, 0.2]) {
                yaml += &format!(
                    "  - model: {}\n    parameters:\n      weight: {w}\n",
                    m.display()
                );
            }
            yaml += "dtype: bfloat16\n";
            std::fs::write(&linear_config, yaml).map_err(|e| e.to_string())?;
            tool.arg("merge").arg(&linear_config);
        }
    }
    if args.reads {
        read_strategies(&inputs[0], &inputs[1])?;
    }
    tool.arg("--out").arg(&out).arg("--force");
    if ctx.tool_has_io {
        tool.args(["--io", ctx.io.name()]);
    }
    let label = format!("{} {}", spec.label(), workload.name());

    // Warm-up: warms the cache, shows the tool's own summary, and tells the output's sizes.
    eprintln!("e2e: {label}: warm-up run");
    let log = ctx.dir.join("mergestream.log");
    measure(&mut tool, &log)?;
    let summary = std::fs::read_to_string(&log).unwrap_or_default();
    if let Some(line) = summary.lines().rev().find(|l| l.contains("done")) {
        notes.push(format!("{label}: warm-up said: {}", line.trim()));
    }
    let out_dirs: Vec<PathBuf> = match workload {
        Workload::Sweep5 => SWEEP
            .iter()
            .map(|a| out.join(format!("alpha-{a}")))
            .collect(),
        _ => vec![out.clone()],
    };
    let mut out_files = Vec::new();
    for d in &out_dirs {
        out_files.extend(safetensors_files(d)?);
    }
    let out_sizes = file_sizes(&out_files)?;
    let out_bytes: u64 = out_sizes.iter().sum();
    // The summary as JSON, for the run's own peak RSS (see `own_peak_rss_mib`).
    tool.args(["--quiet", "--json"]);

    let mut floor_t = Vec::new();
    let mut touching_t = Vec::new();
    let mut tool_t = Vec::new();
    let mut tool_cpu = Vec::new();
    let mut tool_rss = 0;
    for i in 0..ctx.runs {
        // Each run starts with a different one of the three, so that none always meets the
        // disk right after another's writes.
        const TURNS: [Turn; 3] = [Turn::Floor, Turn::TouchingFloor, Turn::Tool];
        for k in 0..TURNS.len() {
            remove_dir(&out)?;
            remove_dir(&floor_out)?;
            // The removals' journal commit (and, on a filesystem mounted with `discard`, the
            // discards of the freed blocks) happens now, not during the next run's writes.
            sync_disks();
            if ctx.cold {
                drop_caches()?;
            } else {
                warm_cache(&inputs)?;
            }
            match TURNS[(i + k) % TURNS.len()] {
                Turn::Tool => {
                    let m = measure(&mut tool, &log)?;
                    tool_t.push(m.wall);
                    tool_cpu.push(m.cpu);
                    tool_rss = tool_rss.max(own_peak_rss_mib(&log)?);
                }
                Turn::Floor => {
                    floor_t.push(floor(&inputs, &floor_out, &out_sizes, ctx.io, false)?);
                }
                Turn::TouchingFloor => {
                    touching_t.push(floor(&inputs, &floor_out, &out_sizes, ctx.io, true)?);
                }
            }
        }
        remove_dir(&floor_out)?;
        eprintln!(
            "e2e: {label}: run {}/{}: floor {:.3} s, touching floor {:.3} s, mergestream {:.3} s ({:.2} s CPU)",
            i + 1,
            ctx.runs,
            floor_t[i],
            touching_t[i],
            tool_t[i],
            tool_cpu[i]
        );
    }

    let mk = mergekit.map(|mk| {
        remove_dir(&out)?;
        let configs: Vec<(String, PathBuf)> = match workload {
            Workload::Linear3 => vec![("linear x3".into(), linear_config.clone())],
            Workload::Expo => vec![(
                format!("alpha {}", ctx.alpha),
                expo_config(ctx, &pair, ctx.alpha as f64, "expo")?,
            )],
            Workload::Sweep5 => SWEEP
                .iter()
                .map(|a| {
                    let alpha: f64 = a.parse().expect("a number");
                    Ok((format!("alpha {a}"), expo_config(ctx, &pair, alpha, a)?))
                })
                .collect::<Res<_>>()?,
        };
        let r = time_mergekit(
            ctx,
            mk,
            &configs,
            &label,
            &mk_out,
            args.mergekit_runs.max(1),
            notes,
        );
        if let Err(why) = &r {
            notes.push(format!("{label}: mergekit failed: {why}"));
        }
        r
    });
    let mk = match mk {
        Some(Err(e)) if e.starts_with("removing") => return Err(e),
        other => other,
    };

    if !args.keep {
        remove_dir(&out)?;
        remove_dir(&pair)?;
        remove_dir(&pair2)?;
    }
    remove_dir(&out)?;
    remove_dir(&mk_out)?;
    notes.push(format!(
        "{label}: {} inputs of {} each, {} output{} of {} in {} files",
        inputs.len(),
        gb(in_bytes),
        out_dirs.len(),
        if out_dirs.len() == 1 { "" } else { "s" },
        gb(out_bytes),
        out_files.len()
    ));
    Ok(Row {
        label: format!("{} GB ({} L{})", fmt_gb(in_bytes), spec.preset, spec.layers),
        workload,
        io: if ctx.tool_has_io {
            ctx.io.name().to_string()
        } else {
            format!("floor {}, tool buffered", ctx.io.name())
        },
        cache: if ctx.cold { "cold" } else { "warm" },
        out_bytes,
        floor: Stats::of(floor_t),
        touching_floor: Stats::of(touching_t),
        tool: Stats::of(tool_t),
        tool_cpu: Stats::of(tool_cpu),
        tool_rss_mib: tool_rss,
        mergekit: mk,
    })
}

fn gb(bytes: u64) -> String {
    format!("{} GB ({bytes} bytes)", fmt_gb(bytes))
}

fn fmt_gb(bytes: u64) -> String {
    let g = bytes as f64 / GB;
    if g < 1.0 {
        format!("{g:.3}")
    } else {
        format!("{g:.2}")
    }
}

/// The peak RSS a run of the tool reports in its `--json` summary (in `log`): the high-water
/// mark of its own address space. `wait4`'s `ru_maxrss` is not that: a child started with
/// `vfork` (as `Command` starts it) shares this process's address space until it execs, and
/// the kernel records that space's high-water mark as the child's at the exec; since the
/// floors' buffers live here, it was this process's peak that showed (up to 43 MiB against the
/// tool's 23–31).
fn own_peak_rss_mib(log: &Path) -> Res<u64> {
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    // The summary is the log's one JSON object (stderr, in the same file, is quiet).
    let json = match (text.find('{'), text.rfind('}')) {
        (Some(a), Some(b)) if a < b => &text[a..=b],
        _ => "",
    };
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["peak_rss_bytes"].as_u64())
        .map(|bytes| bytes >> 20)
        .ok_or_else(|| format!("no peak_rss_bytes in the summary in {}", log.display()))
}

/// A finished child's resource use.
struct Measured {
    wall: f64,
    cpu: f64,
    max_rss_kib: u64,
}

/// Runs `cmd` with stdout and stderr into `log`, and reports its wall time and, from `wait4`,
/// its own CPU time and peak RSS.
fn measure(cmd: &mut Command, log: &Path) -> Res<Measured> {
    let file = File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let reaped = loop {
        // SAFETY: `status` and `usage` are valid for writes; `pid` is our unreaped child (std's
        // `Child` never waits on it: we drop it without calling `wait`).
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break r;
        }
    };
    let wall = start.elapsed().as_secs_f64();
    drop(child);
    if reaped != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let tail = tail(log, 20);
        return Err(format!(
            "{:?} failed (wait status {status}); end of {}:\n{tail}",
            cmd.get_program(),
            log.display()
        ));
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        wall,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
        max_rss_kib: usage.ru_maxrss as u64,
    })
}

fn run_quiet(cmd: &mut Command, log: &Path) -> Res<()> {
    measure(cmd, log).map(drop)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn output(cmd: &mut Command) -> Res<String> {
    let o = cmd
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("running {:?}: {e}", cmd.get_program()))?;
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn remove_dir(path: &Path) -> Res<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

fn safetensors_files(dir: &Path) -> Res<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{} holds no .safetensors file", dir.display()));
    }
    Ok(files)
}

fn file_sizes(files: &[PathBuf]) -> Res<Vec<u64>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .map(|m| m.len())
                .map_err(|e| format!("{}: {e}", f.display()))
        })
        .collect()
}

fn free_bytes(dir: &Path) -> Res<u64> {
    let s = rustix::fs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    Ok(s.f_bavail * s.f_frsize)
}

/// Whether a file opened with O_DIRECT in `dir` takes an aligned write.
fn direct_works(dir: &Path) -> bool {
    let path = dir.join(".e2e-direct-probe");
    let ok = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .and_then(|f| f.write_all_at(IoBuf::new(ALIGN).as_slice(), 0))
        .is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

/// Reads every input file through the page cache, so that a warm run finds them there (the
/// tool's direct reads of a cold file leave the cache as it was; inputs larger than the cache
/// stay partly cold).
fn warm_cache(inputs: &[Vec<PathBuf>]) -> Res<()> {
    let mut buf = vec![0u8; PIECE];
    for path in inputs.iter().flatten() {
        let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        while std::io::Read::read(&mut f, &mut buf).map_err(|e| e.to_string())? > 0 {}
    }
    Ok(())
}

fn sync_disks() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn drop_caches() -> Res<()> {
    sync_disks();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .map_err(|e| format!("dropping the page cache: {e}"))
}

/// The pieces of every input's files in the order the tool reads them: a piece of each model in
/// turn, every file front to back.
fn pieces(models: &[&[PathBuf]], piece: u64) -> Res<Vec<(PathBuf, u64, usize)>> {
    let mut lists: Vec<Vec<(PathBuf, u64, usize)>> = Vec::new();
    for files in models {
        let mut list = Vec::new();
        for p in files.iter() {
            let len = std::fs::metadata(p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .len();
            let mut at = 0;
            while at < len {
                let n = (len - at).min(piece) as usize;
                list.push((p.clone(), at, n));
                at += n as u64;
            }
        }
        lists.push(list);
    }
    let mut out = Vec::new();
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    for k in 0..longest {
        for list in &lists {
            out.extend(list.get(k).cloned());
        }
    }
    Ok(out)
}

/// Reads `pieces` on `readers` threads (each with one read in flight), with `O_DIRECT` when
/// `direct` but from the page cache for a file it mostly holds (as the tool reads), handing each
/// filled buffer to `full` with the bytes read into it (taking empty ones from `free`).
fn read_pieces(
    pieces: &[(PathBuf, u64, usize)],
    readers: usize,
    direct: bool,
    full: &crossbeam_channel::Sender<(IoBuf, usize)>,
    free: &crossbeam_channel::Receiver<IoBuf>,
) -> Res<()> {
    // Each file opened twice, as the tool opens it: buffered, and with O_DIRECT when `direct`;
    // a file the page cache mostly holds is read from it, as the tool reads a shard.
    let mut files: Vec<(PathBuf, File, File, bool)> = Vec::new();
    for (p, _, _) in pieces {
        if files.iter().all(|(q, _, _, _)| q != p) {
            let open = |direct: bool| {
                let mut o = OpenOptions::new();
                o.read(true);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                o.open(p).map_err(|e| format!("{}: {e}", p.display()))
            };
            let buffered = open(false)?;
            let len = buffered.metadata().map_err(|e| e.to_string())?.len();
            let cached = mergestream::model::sampled_cache_share(&buffered, 0, len)
                .is_some_and(|share| share >= 0.5);
            files.push((p.clone(), buffered, open(direct)?, cached));
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..readers.max(1))
            .map(|_| {
                scope.spawn(|| -> Res<()> {
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((path, at, n)) = pieces.get(k) else {
                            return Ok(());
                        };
                        let Ok(mut buf) = free.recv() else {
                            return Ok(());
                        };
                        let (_, buffered, maybe_direct, cached) =
                            files.iter().find(|(q, _, _, _)| q == path).expect("opened");
                        let (file, len) = if direct && !cached {
                            (maybe_direct, n.next_multiple_of(ALIGN))
                        } else {
                            (buffered, *n)
                        };
                        let mut got = 0;
                        while got < *n {
                            let r = file
                                .read_at(&mut buf.as_mut_slice()[got..len], at + got as u64)
                                .map_err(|e| format!("{}: {e}", path.display()))?;
                            if r == 0 {
                                break;
                            }
                            got += r;
                        }
                        if full.send((buf, got)).is_err() {
                            return Ok(());
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("readers do not panic"))
    })
}

/// `bytes` folded into a word: a read of each byte by a CPU, at the speed of memory.
fn fold(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(0, |x, w| {
        x ^ u64::from_ne_bytes(w.try_into().expect("eight bytes"))
    })
}

/// The disk floor: reads every input's files once (a piece of each in turn, as the tool reads
/// a chunk of each tensor from every input) with as many reads in flight as the tool keeps (its
/// reader threads), while another thread writes files of `sizes` (every output's) into `out`
/// and fsyncs them. Reads and writes use `O_DIRECT` when `io` is direct (reads but for files
/// the page cache mostly holds), as the tool does. With `touching` (the touching floor), a
/// thread of its own also reads every byte read once, and the writer writes each piece into
/// a buffer of its own just before writing it.
/// Returns the wall time.
fn floor(
    inputs: &[Vec<PathBuf>],
    out: &Path,
    sizes: &[u64],
    io: IoMode,
    touching: bool,
) -> Res<f64> {
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let direct = io == IoMode::Direct;
    // The tool's chunk and reader count (src/pipeline.rs: Settings).
    let (piece, readers) = if direct {
        (Settings::DISK_CHUNK_BYTES, Settings::READERS)
    } else {
        (PIECE, 1)
    };
    let lists: Vec<&[PathBuf]> = inputs.iter().map(Vec::as_slice).collect();
    let pieces = pieces(&lists, piece as u64)?;
    const IN_FLIGHT: usize = 8;
    let (full_tx, full_rx) = crossbeam_channel::bounded::<(IoBuf, usize)>(IN_FLIGHT);
    let (free_tx, free_rx) = crossbeam_channel::bounded::<IoBuf>(IN_FLIGHT + 1);
    for _ in 0..IN_FLIGHT {
        free_tx.send(IoBuf::new(PIECE)).expect("room");
    }
    let (read_tx, read_rx) = if touching {
        let (tx, rx) = crossbeam_channel::bounded::<(IoBuf, usize)>(IN_FLIGHT);
        (tx, Some(rx))
    } else {
        (full_tx.clone(), None)
    };
    let start = Instant::now();
    std::thread::scope(|scope| {
        let pieces = &pieces;
        let reader = scope.spawn(move || {
            let r = read_pieces(pieces, readers, direct, &read_tx, &free_rx);
            drop(read_tx);
            r
        });
        // The touching floor's pass over the bytes read, on a thread of its own (as the tool computes
        // on threads other than its readers'), so that the reads in flight are the floor's.
        if let Some(read_rx) = read_rx {
            let full_tx = full_tx.clone();
            scope.spawn(move || {
                for (buf, n) in read_rx {
                    std::hint::black_box(fold(&buf.as_slice()[..n]));
                    if full_tx.send((buf, n)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(full_tx);
        let input_bytes = pieces.iter().map(|p| p.2 as u64).sum();
        let written = write_files(out, sizes, input_bytes, io, touching, &full_rx, &free_tx);
        // Let the readers finish reading everything once the writer has its bytes: hand their
        // buffers back until they are done (dropping `free_tx` here would stop them early).
        for (buf, _) in full_rx.iter() {
            let _ = free_tx.send(buf);
        }
        drop(free_tx);
        reader.join().expect("reader does not panic")?;
        written
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// `--reads`: the read strategies behind the tool's reader settings, cold, on one pair: a piece
/// of each input in turn, as the tool reads, with 1–8 reads in flight, through the page cache
/// or with `O_DIRECT`, in 256 KiB and 1 MiB pieces. Needs root (drop_caches).
fn read_strategies(sft: &[PathBuf], aligned: &[PathBuf]) -> Res<()> {
    println!("\n### Read strategies (cold cache, both inputs, a piece of each in turn)\n");
    println!("| reads in flight | I/O | piece | seconds | GB/s |");
    println!("|---:|---|---:|---:|---:|");
    for (readers, direct, piece) in [
        (1, false, 256 << 10),
        (4, false, 256 << 10),
        (1, true, 256 << 10),
        (2, true, 256 << 10),
        (4, true, 256 << 10),
        (8, true, 256 << 10),
        (4, true, 1 << 20),
    ] {
        let pieces = pieces(&[sft, aligned], piece as u64)?;
        let bytes: u64 = pieces.iter().map(|p| p.2 as u64).sum();
        drop_caches()?;
        let (full_tx, full_rx) = crossbeam_channel::bounded::<(IoBuf, usize)>(16);
        let (free_tx, free_rx) = crossbeam_channel::bounded::<IoBuf>(17);
        for _ in 0..16 {
            free_tx.send(IoBuf::new(piece)).expect("room");
        }
        let start = Instant::now();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for (b, _) in full_rx.iter() {
                    let _ = free_tx.send(b);
                }
            });
            let r = read_pieces(&pieces, readers, direct, &full_tx, &free_rx);
            drop(full_tx);
            r
        })?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "| {readers} | {} | {} KiB | {secs:.2} | {:.2} |",
            if direct { "direct" } else { "buffered" },
            piece >> 10,
            bytes as f64 / GB / secs
        );
    }
    Ok(())
}

/// The floor's writer: files of `sizes` (contents do not matter) in pieces of the tool's
/// direct write size, written no sooner than the merge could write them: after a share of the
/// `input_bytes` as large as the share of the output written so far has been read (reads
/// arrive on `full`; their buffers go back to `free`). A merge cannot write an output byte
/// before reading the inputs it comes from; a floor writing ahead of its reads would time the
/// disk's writes and reads one after the other rather than sharing it. As in the tool, up to
/// [`WRITE_STAGES`] pieces wait for the disk and [`WRITES_IN_FLIGHT`] are written at once.
/// Every piece is written from one buffer of zeros; with `touching`, from one of
/// [`TOUCHED_BUFFERS`] that the writer fills just before handing it to the disk.
fn write_files(
    out: &Path,
    sizes: &[u64],
    input_bytes: u64,
    io: IoMode,
    touching: bool,
    full: &crossbeam_channel::Receiver<(IoBuf, usize)>,
    free: &crossbeam_channel::Sender<IoBuf>,
) -> Res<()> {
    let output_bytes: u64 = sizes.iter().sum();
    let mut files = Vec::new();
    let mut pieces: Vec<(usize, u64, usize)> = Vec::new();
    for (k, &size) in sizes.iter().enumerate() {
        let path = out.join(format!("floor-{k}.bin"));
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if io == IoMode::Direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        // Allocated to its (padded) length first, as the tool's writer does.
        let reserve = match io {
            IoMode::Direct => size.next_multiple_of(ALIGN as u64),
            IoMode::Buffered => size,
        };
        if reserve > 0 {
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, reserve)
                .map_err(|e| format!("allocating {}: {e}", path.display()))?;
        }
        let mut at = 0u64;
        while at < size {
            let len = (size - at).min(WRITE_PIECE as u64) as usize;
            pieces.push((k, at, len));
            at += len as u64;
        }
        files.push((path, file));
    }
    let (go_tx, go_rx) =
        crossbeam_channel::bounded::<(usize, Option<IoBuf>)>(WRITE_STAGES - WRITES_IN_FLIGHT);
    // Written through, so that its pages are real ones (as the tool's staging buffers are), not
    // the kernel's shared zero page.
    let mut zeros = IoBuf::new(WRITE_PIECE);
    zeros.as_mut_slice().fill(0);
    let (spare_tx, spare_rx) = crossbeam_channel::bounded::<IoBuf>(TOUCHED_BUFFERS);
    if touching {
        for _ in 0..TOUCHED_BUFFERS {
            spare_tx.send(IoBuf::new(WRITE_PIECE)).expect("room");
        }
    }
    std::thread::scope(|scope| {
        let disks: Vec<_> = (0..WRITES_IN_FLIGHT)
            .map(|_| {
                let (go_rx, files, pieces, zeros) = (go_rx.clone(), &files, &pieces, &zeros);
                let spare_tx = spare_tx.clone();
                scope.spawn(move || -> Res<()> {
                    for (p, buf) in go_rx {
                        let (k, at, len) = pieces[p];
                        // O_DIRECT writes whole blocks; the tail's padding is cut off below.
                        let padded = match io {
                            IoMode::Direct => len.next_multiple_of(ALIGN),
                            IoMode::Buffered => len,
                        };
                        let (path, file) = &files[k];
                        file.write_all_at(&buf.as_ref().unwrap_or(zeros).as_slice()[..padded], at)
                            .map_err(|e| format!("writing {}: {e}", path.display()))?;
                        if let Some(buf) = buf {
                            let _ = spare_tx.send(buf);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        drop(go_rx);
        let mut read = 0u64;
        let mut reads_done = false;
        let mut allowed = 0u64;
        for (p, &(_, _, len)) in pieces.iter().enumerate() {
            let end = allowed + len as u64;
            // Wait for the reads this piece's bytes would be computed from.
            while !reads_done
                && (read as u128) * (output_bytes as u128) < (end as u128) * (input_bytes as u128)
            {
                match full.recv() {
                    Ok((buf, n)) => {
                        read += n as u64;
                        let _ = free.send(buf);
                    }
                    Err(_) => reads_done = true,
                }
            }
            let buf = if touching {
                let Ok(mut buf) = spare_rx.recv() else { break };
                buf.as_mut_slice()[..len].fill(p as u8);
                Some(buf)
            } else {
                None
            };
            if go_tx.send((p, buf)).is_err() {
                break;
            }
            allowed = end;
        }
        drop(go_tx);
        disks
            .into_iter()
            .try_for_each(|d| d.join().expect("the floor's writers do not panic"))
    })?;
    for ((path, file), &size) in files.iter().zip(sizes) {
        file.set_len(size)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    }
    File::open(out)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing {}: {e}", out.display()))
}

/// The machine and the build, for the table's header.
struct Machine {
    cpu: String,
    cores: usize,
    ram_gib: u64,
    fs: String,
    date: String,
    commit: String,
}

impl Machine {
    fn probe(dir: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let ram_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let df = output(Command::new("df").args(["--output=fstype,source"]).arg(dir))
            .unwrap_or_default();
        let fs = df
            .lines()
            .nth(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" on "))
            .unwrap_or_else(|| "unknown filesystem".into());
        let date = output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let root = env!("CARGO_MANIFEST_DIR");
        let head =
            output(Command::new("git").args(["-C", root, "rev-parse", "--short=12", "HEAD"]))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
        let dirty = output(Command::new("git").args([
            "-C",
            root,
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]))
        .is_ok_and(|s| !s.trim().is_empty());
        let branch =
            output(Command::new("git").args(["-C", root, "rev-parse", "--abbrev-ref", "HEAD"]))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ram_gib: ram_kib >> 20,
            fs,
            date,
            commit: format!(
                "{head} ({branch}){}",
                if dirty {
                    ", with uncommitted changes"
                } else {
                    ""
                }
            ),
        }
    }
}

/// An installed mergekit.
struct Mergekit {
    yaml: PathBuf,
    /// mergekit's, torch's and transformers' versions.
    versions: String,
}

/// Creates `DIR/mergekit-venv` and installs mergekit 0.1.5 from PyPI (with whatever torch it
/// pulls), or reuses an earlier install.
fn install_mergekit(dir: &Path) -> Res<Mergekit> {
    let venv = dir.join("mergekit-venv");
    let yaml = venv.join("bin/mergekit-yaml");
    let stamp = venv.join(".e2e-installed");
    if yaml.is_file() && stamp.is_file() {
        eprintln!("e2e: reusing {}", venv.display());
        return Ok(Mergekit::at(&venv));
    }
    // torch from PyPI brings CUDA wheels: several GB.
    if free_bytes(dir)? < 12_000_000_000 {
        return Err(format!(
            "installing {MERGEKIT} with torch takes about 6 GB in {} and less than 12 GB is free",
            dir.display()
        ));
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or("no python3 on PATH")?;
    let log = dir.join("mergekit-install.log");
    eprintln!(
        "e2e: installing {MERGEKIT} into {} (log: {}); torch from PyPI is large…",
        venv.display(),
        log.display()
    );
    let start = Instant::now();
    remove_dir(&venv)?;
    run_quiet(Command::new(python).args(["-m", "venv"]).arg(&venv), &log)
        .map_err(|e| format!("creating the venv failed: {e}"))?;
    let limit = Duration::from_secs(20 * 60);
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args(["install", "--no-input", MERGEKIT]);
    let status = run_with_limit(&mut pip, &log, limit)?;
    match status {
        None => {
            return Err(format!(
                "pip install {MERGEKIT} did not finish within {} minutes; see {}",
                limit.as_secs() / 60,
                log.display()
            ))
        }
        Some(false) => {
            return Err(format!(
                "pip install {MERGEKIT} failed; end of {}:\n{}",
                log.display(),
                tail(&log, 15)
            ))
        }
        Some(true) => {}
    }
    if !yaml.is_file() {
        return Err(format!(
            "pip installed {MERGEKIT} but {} is missing",
            yaml.display()
        ));
    }
    std::fs::write(&stamp, "").map_err(|e| e.to_string())?;
    eprintln!(
        "e2e: installed {MERGEKIT} in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(Mergekit::at(&venv))
}

impl Mergekit {
    fn at(venv: &Path) -> Mergekit {
        let script = "import importlib.metadata as m\nprint(', '.join(p + ' ' + m.version(p) for p in ['mergekit', 'torch', 'transformers']))";
        let versions = output(Command::new(venv.join("bin/python")).args(["-c", script]))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Mergekit {
            yaml: venv.join("bin/mergekit-yaml"),
            versions: format!("{versions}, in {}", venv.display()),
        }
    }
}

/// Runs `cmd` with output appended to `log`; `None` if it was killed for taking over `limit`.
fn run_with_limit(cmd: &mut Command, log: &Path, limit: Duration) -> Res<Option<bool>> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .map_err(|e| e.to_string())?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(Some(status.success()));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// mergekit's config for ExPO at `alpha`: `task_arithmetic` with base = sft, model = aligned at
/// weight 1 + alpha: sft + (1+α)(aligned − sft) = aligned + α(aligned − sft), the ExPO formula.
fn expo_config(ctx: &Ctx, pair: &Path, alpha: f64, tag: &str) -> Res<PathBuf> {
    let config = ctx.dir.join(format!("mergekit-expo-{tag}.yml"));
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {sft}\nmodels:\n  - model: {aligned}\n    parameters:\n      weight: {w}\ndtype: bfloat16\n",
        sft = pair.join("sft").display(),
        aligned = pair.join("aligned").display(),
        w = 1.0 + alpha,
    );
    std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
    Ok(config)
}

/// Times mergekit on `configs` run one after the other (a sweep is one run per alpha): the
/// total wall time per measured run, and the largest peak RSS of any of its processes (MiB).
fn time_mergekit(
    ctx: &Ctx,
    mk: &Mergekit,
    configs: &[(String, PathBuf)],
    label: &str,
    out: &Path,
    runs: usize,
    notes: &mut Vec<String>,
) -> Res<(Stats, u64)> {
    let log = ctx.dir.join("mergekit.log");
    let mut times = Vec::new();
    let mut peak = 0;
    for i in 0..runs {
        let mut total = 0.0;
        for (what, config) in configs {
            eprintln!("e2e: {label}: mergekit {what}, run {}/{runs}", i + 1);
            remove_dir(out)?;
            if ctx.cold {
                drop_caches()?;
            }
            let mut cmd = Command::new(&mk.yaml);
            cmd.arg(config).arg(out).args([
                "--lazy-unpickle",
                // Parameters per shard: 2.5B bf16 parameters = 5 GB, mergestream's default.
                "--out-shard-size",
                "2500M",
                // The synthetic tokenizer files are stand-ins that transformers cannot load.
                "--no-copy-tokenizer",
            ]);
            let m = measure(&mut cmd, &log)?;
            notes.push(format!(
                "{label}: mergekit {what}, run {}: {:.1} s wall, {:.1} s CPU, {} MiB peak RSS",
                i + 1,
                m.wall,
                m.cpu,
                m.max_rss_kib >> 10
            ));
            total += m.wall;
            peak = peak.max(m.max_rss_kib >> 10);
        }
        times.push(total);
    }
    remove_dir(out)?;
    Ok((Stats::of(times), peak))
}
