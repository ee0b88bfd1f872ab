//! Benchmark of the packed format: sizes and speeds of `mergestream pack` / `unpack` on generated
//! checkpoints, side by side with plain `zstd -3` of the same files.
//!
//! For each dtype asked for (BF16, F32), this generates a pair with `mergestream synth` (values
//! normally distributed with a per-tensor scale, see `src/synth.rs`) and an ExPO output of it
//! (`mergestream expo`), then measures, each as a child process timed with `wait4` (wall and
//! user+sys CPU of that child alone):
//!
//! - Debian's `zstd -3 -T1` of every shard of the aligned model, and `zstd -d` back (the
//!   baseline the issue asks for), writing to files beside them;
//! - `mergestream pack --threads 1` at the default level and at `--level 3`, and
//!   `mergestream unpack --threads 1` of the default one (one thread, so CPU time per byte is
//!   per core);
//! - `mergestream pack --base ALIGNED` of the ExPO output (with plain `pack` and `zstd -3` of the
//!   same output for comparison), and its unpack.
//!
//! Then, for the first dtype, **merging from packed inputs**: `mergestream expo` of the packed
//! pair (both models packed at the default level) against two floors measured in this process,
//! each a reader thread and a writer thread overlapping as the tool's stages do, the writer
//! writing as many bytes as the merge writes (buffered, then `fsync`; the tool runs with
//! `--io buffered` to match):
//!
//! - **read packed**: reading both inputs' packed files sequentially in 4 MiB `pread`s — the
//!   I/O of a merge from packed inputs, with no decoding, arithmetic or hashing;
//! - **read + decode**: decoding both inputs' data sections in 256 KiB pieces through
//!   `PackedShard::read_at` on one thread with a two-block cache, a piece of each in turn —
//!   what the tool's reader stage does, with nothing else.
//!
//! and, for scale, `expo` of the same pair unpacked. Each is run `--runs` times, interleaved;
//! the table gives medians (the page cache is warm: every input was just written).
//!
//! It prints the machine, the date and the commit, and markdown tables. Sizes are exact and
//! repeatable; speeds are only meaningful on a quiet machine. It checks no bytes (the tests do).
//!
//! `cargo bench --bench packed -- [--preset mistral-7b] [--layers 1] [--dtypes BF16,F32]
//!  [--runs 3] [--dir PATH] [--keep]`

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;

const BIN: &str = env!("CARGO_BIN_EXE_mergestream");

#[derive(Parser)]
#[command(about = "Sizes and speeds of mergestream pack/unpack against zstd -3")]
struct Args {
    /// Model widths (a `mergestream synth` preset).
    #[arg(long, default_value = "mistral-7b")]
    preset: String,
    /// Transformer layers (with embeddings and lm_head: 1 layer of mistral-7b is 0.96 GB of BF16).
    #[arg(long, default_value_t = 1)]
    layers: u64,
    /// Dtypes to generate pairs in.
    #[arg(long, value_delimiter = ',', default_values_t = ["BF16".to_string(), "F32".to_string()])]
    dtypes: Vec<String>,
    /// Where pairs and outputs go (default: target/bench-packed).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the generated pairs (reused by later runs with the same options).
    #[arg(long)]
    keep: bool,
    /// Measured runs of each merge and floor (medians are shown).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

type Res<T> = Result<T, String>;

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("bench packed: {e}");
        std::process::exit(1);
    }
}

/// One measured command.
struct Measured {
    wall: f64,
    cpu: f64,
}

/// One row of the table.
struct Row {
    what: String,
    original: u64,
    stored: u64,
    pack: Option<Measured>,
    unpack: Option<Measured>,
}

fn run(args: &Args) -> Res<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-packed"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log = dir.join("last-command.log");
    print_machine(&dir);
    let mut rows = Vec::new();
    let mut merge_rows = Vec::new();
    for (d, dtype) in args.dtypes.iter().enumerate() {
        let pair = dir.join(format!("pair-{}-{}-{dtype}", args.preset, args.layers));
        if !pair.join("aligned").exists() {
            remove(&pair)?;
            measure(
                Command::new(BIN)
                    .arg("synth")
                    .arg(&pair)
                    .args([
                        "--preset",
                        &args.preset,
                        "--layers",
                        &args.layers.to_string(),
                    ])
                    .args([
                        "--dtype",
                        dtype,
                        "--sft-shards",
                        "1",
                        "--aligned-shards",
                        "2",
                    ]),
                &log,
            )?;
        }
        let aligned = pair.join("aligned");
        let expo = pair.join("expo");
        if !expo.join("checksums.b3").exists() {
            remove(&expo)?;
            measure(
                Command::new(BIN)
                    .args(["expo", "--quiet", "--alpha", "0.3", "--sft"])
                    .arg(pair.join("sft"))
                    .arg("--aligned")
                    .arg(&aligned)
                    .arg("--out")
                    .arg(&expo),
                &log,
            )?;
        }
        rows.push(zstd_row(
            &format!("{dtype} aligned: zstd -3 (CLI)"),
            &aligned,
            &dir,
            &log,
        )?);
        rows.push(pack_row(
            &format!("{dtype} aligned: pack"),
            &aligned,
            None,
            &[],
            &dir,
            &log,
        )?);
        rows.push(pack_row(
            &format!("{dtype} aligned: pack --level 3"),
            &aligned,
            None,
            &["--level", "3"],
            &dir,
            &log,
        )?);
        rows.push(zstd_row(
            &format!("{dtype} ExPO output: zstd -3 (CLI)"),
            &expo,
            &dir,
            &log,
        )?);
        rows.push(pack_row(
            &format!("{dtype} ExPO output: pack"),
            &expo,
            None,
            &[],
            &dir,
            &log,
        )?);
        rows.push(pack_row(
            &format!("{dtype} ExPO output: pack --base aligned"),
            &expo,
            Some(&aligned),
            &[],
            &dir,
            &log,
        )?);
        if d == 0 {
            merge_rows = merge_from_packed(dtype, &pair, &dir, &log, args.runs.max(1))?;
        }
        if !args.keep {
            remove(&pair)?;
        }
    }
    println!();
    println!("| input and method | original | stored | ratio | pack s (CPU s) | pack GB/s per core | unpack s (CPU s) | unpack GB/s per core |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let gb = r.original as f64 / 1e9;
        let cell = |m: &Option<Measured>| match m {
            Some(m) => (
                format!("{:.2} ({:.2})", m.wall, m.cpu),
                format!("{:.2}", gb / m.cpu.max(1e-9)),
            ),
            None => ("—".into(), "—".into()),
        };
        let (pw, pr) = cell(&r.pack);
        let (uw, ur) = cell(&r.unpack);
        println!(
            "| {} | {:.3} GB | {:.3} GB | {:.3}× | {pw} | {pr} | {uw} | {ur} |",
            r.what,
            gb,
            r.stored as f64 / 1e9,
            r.original as f64 / r.stored as f64
        );
    }
    if !merge_rows.is_empty() {
        let floor = merge_rows[0].wall;
        println!();
        println!("| merge (ExPO, alpha 0.3) | output | s (median) | CPU s | ratio to read-packed floor |");
        println!("|---|---:|---:|---:|---:|");
        for r in &merge_rows {
            println!(
                "| {} | {:.3} GB | {:.2} | {} | {:.2}× |",
                r.what,
                r.output as f64 / 1e9,
                r.wall,
                r.cpu.map_or("—".into(), |c| format!("{c:.2}")),
                r.wall / floor.max(1e-9)
            );
        }
        println!();
        println!("Floors run in this process (CPU not separated); the tool's rows are child processes (CPU = user+sys from wait4).");
    }
    Ok(())
}

/// One row of the merge table.
struct MergeRow {
    what: String,
    output: u64,
    wall: f64,
    cpu: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Packs both models of `pair`, then times the floors and `expo` from packed and from plain
/// inputs, `runs` times each, interleaved.
fn merge_from_packed(
    dtype: &str,
    pair: &Path,
    dir: &Path,
    log: &Path,
    runs: usize,
) -> Res<Vec<MergeRow>> {
    let packed = |model: &str| -> Res<PathBuf> {
        let out = dir.join(format!("merge-packed-{model}"));
        remove(&out)?;
        measure(
            Command::new(BIN)
                .arg("pack")
                .arg(pair.join(model))
                .arg("--out")
                .arg(&out)
                .arg("--quiet"),
            log,
        )?;
        Ok(out)
    };
    let (psft, paligned) = (packed("sft")?, packed("aligned")?);
    let out = dir.join("merge-out");
    let expo = |sft: &Path, aligned: &Path| -> Res<Measured> {
        remove(&out)?;
        let m = measure(
            Command::new(BIN)
                .args([
                    "expo", "--quiet", "--io", "buffered", "--alpha", "0.3", "--sft",
                ])
                .arg(sft)
                .arg("--aligned")
                .arg(aligned)
                .arg("--out")
                .arg(&out),
            log,
        )?;
        Ok(m)
    };
    expo(&psft, &paligned)?; // warm-up, and the output's size
    let output: u64 = shards(&out)?.iter().map(|p| len(p)).sum::<Res<u64>>()?;
    let files = |model: &Path| -> Res<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(model)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "mszst"))
            .collect();
        out.sort();
        Ok(out)
    };
    let inputs = [files(&psft)?, files(&paligned)?];
    let sink = dir.join("merge-floor.bin");
    let (mut read, mut decode, mut from_packed, mut from_plain) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cpu = (Vec::new(), Vec::new());
    for _ in 0..runs {
        read.push(floor(&inputs, output, &sink, false)?);
        decode.push(floor(&inputs, output, &sink, true)?);
        let m = expo(&psft, &paligned)?;
        from_packed.push(m.wall);
        cpu.0.push(m.cpu);
        let m = expo(&pair.join("sft"), &pair.join("aligned"))?;
        from_plain.push(m.wall);
        cpu.1.push(m.cpu);
    }
    let _ = std::fs::remove_file(&sink);
    remove(&out)?;
    remove(&psft)?;
    remove(&paligned)?;
    let row = |what: String, wall: Vec<f64>, cpu: Option<Vec<f64>>| MergeRow {
        what,
        output,
        wall: median(wall),
        cpu: cpu.map(median),
    };
    Ok(vec![
        row(format!("{dtype} floor: read packed"), read, None),
        row(
            format!("{dtype} floor: read + decode (one thread)"),
            decode,
            None,
        ),
        row(
            format!("{dtype} mergestream expo, packed inputs"),
            from_packed,
            Some(cpu.0),
        ),
        row(
            format!("{dtype} mergestream expo, plain inputs"),
            from_plain,
            Some(cpu.1),
        ),
    ])
}

/// A floor: a reader thread reads (or decodes) both inputs, a piece of each in turn, while this
/// thread writes `output` bytes to `sink` and syncs it. Returns the wall time in seconds.
fn floor(inputs: &[Vec<PathBuf>; 2], output: u64, sink: &Path, decode: bool) -> Res<f64> {
    use mergestream::packed::{BlockCache, PackedShard};
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 4 << 20;
    const CHUNK: usize = 256 << 10;
    let start = Instant::now();
    let (tx, rx) = crossbeam_channel::bounded::<usize>(6);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Res<()> {
            if decode {
                let mut cache = BlockCache::new(2).map_err(|e| e.to_string())?;
                let open = |files: &Vec<PathBuf>| -> Res<Vec<PackedShard>> {
                    files
                        .iter()
                        .map(|f| PackedShard::open(f, None).map_err(|e| e.to_string()))
                        .collect()
                };
                let shards = [open(&inputs[0])?, open(&inputs[1])?];
                let mut at = [(0usize, 0u64); 2];
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let mut n = 0;
                    for (i, (s, off)) in at.iter_mut().enumerate() {
                        let Some(shard) = shards[i].get(*s) else {
                            continue;
                        };
                        let len = (shard.header().data_len - *off).min(CHUNK as u64) as usize;
                        shard
                            .read_at(*off, &mut buf[..len], &mut cache)
                            .map_err(|e| e.to_string())?;
                        *off += len as u64;
                        n += len;
                        if *off == shard.header().data_len {
                            *s += 1;
                            *off = 0;
                        }
                    }
                    if n == 0 {
                        return Ok(());
                    }
                    let _ = tx.send(n);
                }
            } else {
                let open = |files: &Vec<PathBuf>| -> Res<Vec<File>> {
                    files
                        .iter()
                        .map(|f| File::open(f).map_err(|e| e.to_string()))
                        .collect()
                };
                let files = [open(&inputs[0])?, open(&inputs[1])?];
                let mut at = [(0usize, 0u64); 2];
                let mut buf = vec![0u8; PIECE];
                loop {
                    let mut n = 0;
                    for (i, (f, off)) in at.iter_mut().enumerate() {
                        let Some(file) = files[i].get(*f) else {
                            continue;
                        };
                        let got = file.read_at(&mut buf, *off).map_err(|e| e.to_string())?;
                        if got == 0 {
                            *f += 1;
                            *off = 0;
                        }
                        *off += got as u64;
                        n += got;
                    }
                    if n == 0
                        && at
                            .iter()
                            .enumerate()
                            .all(|(i, (f, _))| *f >= files[i].len())
                    {
                        return Ok(());
                    }
                    let _ = tx.send(n);
                }
            }
        });
        let mut file = File::create(sink).map_err(|e| format!("{}: {e}", sink.display()))?;
        let zeros = vec![0u8; PIECE];
        let mut written = 0u64;
        while written < output {
            let _ = rx.recv();
            let n = (output - written).min(PIECE as u64) as usize;
            file.write_all(&zeros[..n]).map_err(|e| e.to_string())?;
            written += n as u64;
        }
        file.sync_all().map_err(|e| e.to_string())?;
        for _ in rx.iter() {}
        reader.join().map_err(|_| "reader panicked".to_string())?
    })?;
    Ok(start.elapsed().as_secs_f64())
}

/// `zstd -3 -T1` of every shard of `model`, then `zstd -d` of each.
fn zstd_row(what: &str, model: &Path, dir: &Path, log: &Path) -> Res<Row> {
    let work = dir.join("zstd");
    remove(&work)?;
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let (mut original, mut stored) = (0, 0);
    let mut pack = Measured {
        wall: 0.0,
        cpu: 0.0,
    };
    let mut unpack = Measured {
        wall: 0.0,
        cpu: 0.0,
    };
    for shard in shards(model)? {
        let name = shard.file_name().unwrap().to_string_lossy().into_owned();
        let z = work.join(format!("{name}.zst"));
        let m = measure(
            Command::new("zstd")
                .args(["-3", "-T1", "-q", "-f", "-o"])
                .arg(&z)
                .arg(&shard),
            log,
        )?;
        pack.wall += m.wall;
        pack.cpu += m.cpu;
        let u = measure(
            Command::new("zstd")
                .args(["-d", "-q", "-f", "-o"])
                .arg(work.join(&name))
                .arg(&z),
            log,
        )?;
        unpack.wall += u.wall;
        unpack.cpu += u.cpu;
        original += len(&shard)?;
        stored += len(&z)?;
    }
    remove(&work)?;
    Ok(Row {
        what: what.into(),
        original,
        stored,
        pack: Some(pack),
        unpack: Some(unpack),
    })
}

/// `mergestream pack --threads 1` of `model`, then `unpack --threads 1`.
fn pack_row(
    what: &str,
    model: &Path,
    base: Option<&Path>,
    extra: &[&str],
    dir: &Path,
    log: &Path,
) -> Res<Row> {
    let packed = dir.join("packed");
    let restored = dir.join("restored");
    remove(&packed)?;
    remove(&restored)?;
    let mut cmd = Command::new(BIN);
    cmd.arg("pack").arg(model).arg("--out").arg(&packed);
    cmd.args(["--threads", "1", "--quiet"]).args(extra);
    let mut un = Command::new(BIN);
    un.arg("unpack").arg(&packed).arg("--out").arg(&restored);
    un.args(["--threads", "1", "--quiet"]);
    if let Some(b) = base {
        cmd.arg("--base").arg(b);
        un.arg("--base").arg(b);
    }
    let pack = measure(&mut cmd, log)?;
    let unpack = measure(&mut un, log)?;
    let original: u64 = shards(model)?.iter().map(|p| len(p)).sum::<Res<u64>>()?;
    let mut stored = 0;
    for entry in std::fs::read_dir(&packed).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "mszst") {
            stored += len(&path)?;
        }
    }
    remove(&packed)?;
    remove(&restored)?;
    Ok(Row {
        what: what.into(),
        original,
        stored,
        pack: Some(pack),
        unpack: Some(unpack),
    })
}

fn shards(model: &Path) -> Res<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(model).map_err(|e| format!("{}: {e}", model.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn len(path: &Path) -> Res<u64> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn remove(path: &Path) -> Res<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

/// Runs `cmd` with its output into `log`; its wall time and, from `wait4`, its own CPU time.
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
        let text = std::fs::read_to_string(log).unwrap_or_default();
        return Err(format!(
            "{:?} failed (wait status {status}):\n{text}",
            cmd.get_program()
        ));
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        wall,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
    })
}

fn print_machine(dir: &Path) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let text = |cmd: &mut Command| {
        cmd.stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let root = env!("CARGO_MANIFEST_DIR");
    println!(
        "- machine: {cpu}, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "- filesystem: {}",
        text(Command::new("df").args(["--output=fstype"]).arg(dir))
            .lines()
            .last()
            .unwrap_or("")
    );
    println!(
        "- date: {}",
        text(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
    );
    println!(
        "- commit: {}",
        text(Command::new("git").args(["-C", root, "rev-parse", "--short=12", "HEAD"]))
    );
    println!("- zstd: {}", text(Command::new("zstd").arg("--version")));
}
