//! The streaming engine: reader → compute → writer, joined by bounded channels.
//!
//! The reader walks the planned output in order, cutting every tensor into chunks of at most
//! `chunk_bytes`, and reads each chunk of both inputs into a *slot* taken from a fixed pool;
//! compute workers run the kernel on whole slots; the writer puts chunks back in order and hands
//! their bytes to a [`ShardSink`]. A slot carries its chunk from read to write and then returns
//! to the pool, so memory is `slots × 3 × chunk_bytes` whatever the size of a tensor or model,
//! and no stage can wait on a buffer held by a later one. The engine knows nothing of files on
//! the output side (that is the sink's business) and nothing of arithmetic (that is the
//! kernel's): it moves bytes.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::error::{Error, InputChange, Result, UsageError};
use crate::kernel::{self, Isa};
use crate::model::{Model, TensorLoc};
use crate::plan::{Op, OutShard, Plan};

/// How the engine runs. None of it changes the output bytes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Compute workers.
    pub threads: usize,
    /// Bytes of one input chunk (a multiple of 8, so chunks never split an element).
    pub chunk_bytes: usize,
    /// Chunks in flight: the pool holds this many slots of three chunk buffers each.
    pub slots: usize,
    /// The kernel to run.
    pub isa: Isa,
}

impl Settings {
    /// The largest chunk worth having. Measured (benches/e2e.rs, 1.8 GB pair): 128–256 KiB
    /// chunks keep a chunk's three buffers in L2 from read to write and run ~1.5x faster than
    /// 4 MiB ones; more slots than the stages need only spill the cache.
    pub const MAX_CHUNK_BYTES: usize = 256 << 10;
    /// The smallest chunk: below it per-chunk overhead dominates.
    pub const MIN_CHUNK_BYTES: usize = 64 << 10;

    /// Settings whose buffers fit in `buffer_budget` bytes: as many slots as keep every stage
    /// busy (two per worker plus the reader's and writer's), at the largest chunk size that fits.
    pub fn for_budget(buffer_budget: u64, threads: usize, isa: Isa) -> Result<Settings> {
        let threads = threads.max(1);
        let slots = 2 * threads + 2;
        let per_slot = buffer_budget / (3 * slots as u64);
        let chunk = (per_slot.min(Self::MAX_CHUNK_BYTES as u64) as usize) & !7;
        if chunk < Self::MIN_CHUNK_BYTES {
            return Err(Error::Usage(UsageError::MemoryTooSmall {
                threads,
                needed: (3 * slots * Self::MIN_CHUNK_BYTES) as u64,
            }));
        }
        Ok(Settings {
            threads,
            chunk_bytes: chunk,
            slots,
            isa,
        })
    }

    /// Bytes of buffers the pool holds.
    pub fn buffer_bytes(&self) -> u64 {
        3 * self.slots as u64 * self.chunk_bytes as u64
    }
}

/// Receives the output, shard by shard, in order, from the writer stage.
pub trait ShardSink {
    /// A shard starts; its header is `shard.prefix`.
    fn begin(&mut self, shard: &OutShard) -> Result<()>;
    /// The next bytes of the shard's data section.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// The shard's data is complete and its inputs were unchanged while it was read.
    fn finish(&mut self, shard: &OutShard) -> Result<()>;
}

/// Stops a run from outside: a signal handler, or a failing stage.
#[derive(Debug, Default, Clone)]
pub struct Cancel {
    /// Set to the signal number by the signal handler.
    pub signal: Arc<AtomicUsize>,
    abort: Arc<AtomicBool>,
}

impl Cancel {
    fn check(&self) -> Result<()> {
        match self.signal.load(Ordering::Relaxed) {
            0 => Ok(()),
            s => Err(Error::Interrupted { signal: s as i32 }),
        }
    }
    fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }
}

/// Counts bytes as the writer emits them.
pub trait Progress: Sync {
    /// `bytes` more bytes were handed to the sink.
    fn advance(&self, bytes: u64);
}

impl Progress for () {
    fn advance(&self, _: u64) {}
}

/// The three buffers of one chunk in flight.
struct Slot {
    aligned: Vec<u8>,
    sft: Vec<u8>,
    out: Vec<u8>,
}

/// One chunk of one tensor.
struct Job {
    seq: u64,
    /// Bytes of the aligned input and of the output.
    len: usize,
    /// Bytes of the SFT input.
    sft_len: usize,
    op: Op,
    slot: Slot,
}

impl Job {
    fn output(&self) -> &[u8] {
        match self.op {
            Op::Expo(_) | Op::ExpoMixed { .. } => &self.slot.out[..self.len],
            Op::Copy => &self.slot.aligned[..self.len],
        }
    }
}

/// Everything the stages share, read-only.
struct Run<'a> {
    plan: &'a Plan,
    sft: &'a Model,
    aligned: &'a Model,
    shards: &'a [usize],
    settings: &'a Settings,
    cancel: &'a Cancel,
}

/// Writes the output shards `shards` (indices into `plan.shards`, ascending) into `sink`.
#[allow(clippy::too_many_arguments)] // the stages' inputs, named at the one call site
pub fn run(
    plan: &Plan,
    sft: &Model,
    aligned: &Model,
    shards: &[usize],
    settings: &Settings,
    sink: &mut dyn ShardSink,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<()> {
    let cancel = Cancel {
        signal: cancel.signal.clone(),
        abort: Arc::new(AtomicBool::new(false)),
    };
    let run = Run {
        plan,
        sft,
        aligned,
        shards,
        settings,
        cancel: &cancel,
    };
    let (pool_tx, pool_rx) = bounded::<Slot>(settings.slots);
    for _ in 0..settings.slots {
        let buffer = || vec![0u8; settings.chunk_bytes];
        pool_tx
            .send(Slot {
                aligned: buffer(),
                sft: buffer(),
                out: buffer(),
            })
            .expect("the pool has room for every slot");
    }
    let (read_tx, read_rx) = bounded::<Job>(settings.slots);
    let (done_tx, done_rx) = bounded::<Job>(settings.slots);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        cancel.abort.store(true, Ordering::Relaxed);
        let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
    };

    std::thread::scope(|scope| {
        let run = &run;
        let fail = &fail;
        scope.spawn(move || {
            // Record the error before closing the channel, so that it is the one reported
            // rather than the writer's complaint about the early end.
            if let Err(e) = read_stage(run, pool_rx, &read_tx) {
                fail(e);
            }
            drop(read_tx);
        });
        for _ in 0..settings.threads {
            let (rx, tx) = (read_rx.clone(), done_tx.clone());
            scope.spawn(move || compute_stage(run, rx, tx));
        }
        drop((read_rx, done_tx));
        if let Err(e) = write_stage(run, done_rx, pool_tx, sink, progress) {
            fail(e);
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Reads every chunk of the selected shards, in output order.
fn read_stage(run: &Run, pool: Receiver<Slot>, out: &Sender<Job>) -> Result<()> {
    let mut seq = 0;
    for &s in run.shards {
        for t in &run.plan.tensors[run.plan.shards[s].tensors.clone()] {
            // Chunks are whole elements of both inputs (the SFT side may be a wider type).
            let (wa, ws) = match t.op {
                Op::ExpoMixed { aligned, sft } => (aligned.size() as u64, sft.size() as u64),
                _ => (t.dtype.size() as u64, t.dtype.size() as u64),
            };
            let per_chunk = run.settings.chunk_bytes as u64 / wa.max(ws);
            let numel = t.nbytes / wa;
            let mut done = 0;
            while done < numel {
                run.cancel.check()?;
                if run.cancel.aborted() {
                    return Ok(());
                }
                let n = (numel - done).min(per_chunk);
                let (len, sft_len) = ((n * wa) as usize, (n * ws) as usize);
                let Ok(mut slot) = pool.recv() else {
                    return Ok(()); // the writer has stopped
                };
                read_chunk(
                    run.aligned,
                    t.aligned,
                    &t.name,
                    done * wa,
                    &mut slot.aligned[..len],
                )?;
                if let Some(loc) = t.sft {
                    read_chunk(run.sft, loc, &t.name, done * ws, &mut slot.sft[..sft_len])?;
                }
                let job = Job {
                    seq,
                    len,
                    sft_len,
                    op: t.op,
                    slot,
                };
                if out.send(job).is_err() {
                    return Ok(());
                }
                seq += 1;
                done += n;
            }
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes of tensor `loc` of `model`, starting `at` bytes into the tensor.
fn read_chunk(model: &Model, loc: TensorLoc, name: &str, at: u64, buf: &mut [u8]) -> Result<()> {
    let shard = &model.shards[loc.shard];
    let info = &shard.header.tensors[loc.entry];
    let offset = shard.header.data_start() + info.start + at;
    shard.file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::InputChanged {
                path: shard.path.clone(),
                change: InputChange::EndsEarly {
                    tensor: name.to_owned(),
                    offset,
                },
            }
        } else {
            Error::io(&shard.path, "reading tensor data", e)
        }
    })
}

fn compute_stage(run: &Run, input: Receiver<Job>, output: Sender<Job>) {
    let alpha = run.plan.alpha;
    for mut job in input {
        let Slot { aligned, sft, out } = &mut job.slot;
        let (a, s, o) = (
            &aligned[..job.len],
            &sft[..job.sft_len],
            &mut out[..job.len],
        );
        match job.op {
            Op::Expo(dtype) => kernel::expo(run.settings.isa, dtype, alpha, a, s, o),
            Op::ExpoMixed { aligned, sft } => kernel::expo_mixed(aligned, sft, alpha, a, s, o),
            Op::Copy => {}
        }
        if output.send(job).is_err() {
            return;
        }
    }
}

/// Puts chunks back in order and feeds them to the sink, shard by shard.
fn write_stage(
    run: &Run,
    input: Receiver<Job>,
    pool: Sender<Slot>,
    sink: &mut dyn ShardSink,
    progress: &dyn Progress,
) -> Result<()> {
    let mut pending: BTreeMap<u64, Job> = BTreeMap::new();
    let mut next = 0u64;
    let signalled = || run.cancel.signal.load(Ordering::Relaxed) != 0;
    for (position, &s) in run.shards.iter().enumerate() {
        let shard = &run.plan.shards[s];
        sink.begin(shard)?;
        let mut written = 0u64;
        while written < shard.data_len {
            let job = match pending.remove(&next) {
                Some(job) => job,
                None => {
                    let Ok(job) = input.recv() else {
                        // Upstream stopped early; its error (or the signal) says why.
                        run.cancel.check()?;
                        return Err(Error::internal("the read stage stopped early"));
                    };
                    if job.seq != next {
                        pending.insert(job.seq, job);
                        continue;
                    }
                    job
                }
            };
            run.cancel.check()?;
            sink.write(job.output())?;
            if written == 0 && position == run.shards.len().min(2) - 1 {
                crate::failpoint::hit("shard-data", &signalled);
            }
            written += job.len as u64;
            progress.advance(job.len as u64);
            next += 1;
            // The pool is never full while this slot is out, and nobody else closes it.
            let _ = pool.send(job.slot);
        }
        run.sft.check_unchanged()?;
        run.aligned.check_unchanged()?;
        sink.finish(shard)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The engine against an in-memory sink: what reaches the sink, in what order, whatever the
    //! threads and chunk sizes; errors and cancellation. The expected bytes come from reading
    //! the input files directly and an element-wise reference built on the `half` crate, not
    //! from the engine's own reading or kernel.

    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::format::Dtype;
    use crate::synth::{write_pair, PairSpec, Preset};

    /// Shards as the sink saw them: (name, header prefix + data).
    #[derive(Default)]
    struct MemorySink {
        shards: Vec<(String, Vec<u8>)>,
        open: bool,
    }

    impl ShardSink for MemorySink {
        fn begin(&mut self, shard: &OutShard) -> Result<()> {
            assert!(!self.open, "begin while {} is open", shard.name);
            self.open = true;
            self.shards.push((shard.name.clone(), shard.prefix.clone()));
            Ok(())
        }
        fn write(&mut self, bytes: &[u8]) -> Result<()> {
            assert!(self.open, "write outside a shard");
            self.shards.last_mut().unwrap().1.extend_from_slice(bytes);
            Ok(())
        }
        fn finish(&mut self, shard: &OutShard) -> Result<()> {
            let (name, bytes) = self.shards.last().unwrap();
            assert!(self.open && *name == shard.name);
            assert_eq!(bytes.len() as u64, shard.file_len(), "{name}");
            self.open = false;
            Ok(())
        }
    }

    /// A sink whose `write` fails after `ok` successful writes, counting what comes after.
    struct FailingSink {
        ok: usize,
        writes: usize,
        after_failure: usize,
    }

    impl ShardSink for FailingSink {
        fn begin(&mut self, _: &OutShard) -> Result<()> {
            Ok(())
        }
        fn write(&mut self, _: &[u8]) -> Result<()> {
            self.writes += 1;
            if self.writes > self.ok + 1 {
                self.after_failure += 1;
            }
            if self.writes > self.ok {
                return Err(Error::io(
                    "memory",
                    "writing",
                    std::io::Error::other("sink full"),
                ));
            }
            Ok(())
        }
        fn finish(&mut self, _: &OutShard) -> Result<()> {
            Ok(())
        }
    }

    struct Pair {
        _dir: tempfile::TempDir,
        sft: Model,
        aligned: Model,
        plan: Plan,
    }

    /// A Llama-shaped pair (BF16 aligned, F32 SFT, specials, an integer buffer), planned into
    /// several shards.
    fn pair() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let mut shape = Preset::TinyLlama.shape();
        shape.layers = 2;
        let spec = PairSpec {
            shape,
            dtype: Dtype::BF16,
            sft_dtype: Some(Dtype::F32),
            seed: 7,
            sft_shards: 2,
            aligned_shards: 3,
            specials: true,
            int_buffer: true,
        };
        write_pair(dir.path(), &spec).unwrap();
        let sft = Model::open(&dir.path().join("sft")).unwrap();
        let aligned = Model::open(&dir.path().join("aligned")).unwrap();
        let plan = Plan::expo(&sft, &aligned, 0.3, 60_000).unwrap();
        assert!(plan.shards.len() >= 3, "{} shards", plan.shards.len());
        Pair {
            _dir: dir,
            sft,
            aligned,
            plan,
        }
    }

    fn settings(threads: usize, chunk_bytes: usize) -> Settings {
        Settings {
            threads,
            chunk_bytes,
            slots: 2 * threads + 2,
            isa: Isa::select().unwrap(),
        }
    }

    /// A tensor's bytes, read straight from its file.
    fn tensor_bytes(model: &Model, loc: TensorLoc) -> Vec<u8> {
        let shard = &model.shards[loc.shard];
        let t = &shard.header.tensors[loc.entry];
        let mut buf = vec![0u8; t.nbytes() as usize];
        shard
            .file
            .read_exact_at(&mut buf, shard.header.data_start() + t.start)
            .unwrap();
        buf
    }

    fn to_f32(dtype: Dtype, b: &[u8]) -> f32 {
        match dtype {
            Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        }
    }

    fn from_f32(dtype: Dtype, v: f32) -> Vec<u8> {
        match dtype {
            Dtype::BF16 if v.is_nan() => 0x7FC0u16.to_le_bytes().to_vec(),
            Dtype::F16 if v.is_nan() => 0x7E00u16.to_le_bytes().to_vec(),
            Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            _ if v.is_nan() => 0x7FC0_0000u32.to_le_bytes().to_vec(),
            _ => v.to_le_bytes().to_vec(),
        }
    }

    /// Every shard of `plan` as it should come out: header prefix, then each tensor, merged
    /// element by element (`a + alpha * (a - s)` in f32) or copied.
    fn expected(p: &Pair) -> Vec<(String, Vec<u8>)> {
        p.plan
            .shards
            .iter()
            .map(|shard| {
                let mut bytes = shard.prefix.clone();
                for t in &p.plan.tensors[shard.tensors.clone()] {
                    let a = tensor_bytes(&p.aligned, t.aligned);
                    let Some(sft_loc) = t.sft else {
                        bytes.extend_from_slice(&a);
                        continue;
                    };
                    let s = tensor_bytes(&p.sft, sft_loc);
                    let s_dtype = p.sft.get(&t.name).unwrap().1.dtype;
                    let (wa, ws) = (t.dtype.size(), s_dtype.size());
                    for (ae, se) in a.chunks_exact(wa).zip(s.chunks_exact(ws)) {
                        let (av, sv) = (to_f32(t.dtype, ae), to_f32(s_dtype, se));
                        let d = av - sv;
                        let scaled = p.plan.alpha * d;
                        bytes.extend_from_slice(&from_f32(t.dtype, av + scaled));
                    }
                }
                (shard.name.clone(), bytes)
            })
            .collect()
    }

    fn run_into(p: &Pair, shards: &[usize], settings: &Settings) -> Result<MemorySink> {
        let mut sink = MemorySink::default();
        run(
            &p.plan,
            &p.sft,
            &p.aligned,
            shards,
            settings,
            &mut sink,
            &(),
            &Cancel::default(),
        )?;
        assert!(!sink.open, "a shard was left open");
        Ok(sink)
    }

    #[test]
    fn the_sink_receives_every_shard_in_order_matching_the_reference() {
        let p = pair();
        let all: Vec<usize> = (0..p.plan.shards.len()).collect();
        let want = expected(&p);
        for (threads, chunk) in [(1, 8), (2, 4096), (3, 520), (4, 256 << 10)] {
            let got = run_into(&p, &all, &settings(threads, chunk)).unwrap();
            assert!(
                got.shards == want,
                "{threads} threads, {chunk}-byte chunks: output differs from the reference"
            );
        }
    }

    #[test]
    fn only_the_selected_shards_are_written() {
        let p = pair();
        let want = expected(&p);
        let last = p.plan.shards.len() - 1;
        let got = run_into(&p, &[1, last], &settings(2, 1024)).unwrap();
        assert!(got.shards == [want[1].clone(), want[last].clone()]);
        assert!(run_into(&p, &[], &settings(2, 1024))
            .unwrap()
            .shards
            .is_empty());
    }

    #[test]
    fn a_sink_error_stops_the_run_and_is_the_error_reported() {
        let p = pair();
        let all: Vec<usize> = (0..p.plan.shards.len()).collect();
        for ok in [0, 3, 40] {
            let mut sink = FailingSink {
                ok,
                writes: 0,
                after_failure: 0,
            };
            let err = run(
                &p.plan,
                &p.sft,
                &p.aligned,
                &all,
                &settings(2, 64),
                &mut sink,
                &(),
                &Cancel::default(),
            )
            .unwrap_err();
            assert!(
                matches!(&err, Error::Io { what: "writing", source, .. } if source.to_string() == "sink full"),
                "{err:?}"
            );
            assert_eq!(sink.after_failure, 0, "writes after the sink failed");
        }
    }

    #[test]
    fn a_signal_interrupts_the_run() {
        let p = pair();
        let cancel = Cancel::default();
        cancel.signal.store(15, Ordering::Relaxed);
        let mut sink = MemorySink::default();
        let err = run(
            &p.plan,
            &p.sft,
            &p.aligned,
            &[0],
            &settings(2, 64),
            &mut sink,
            &(),
            &cancel,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Interrupted { signal: 15 }), "{err:?}");
    }
}
