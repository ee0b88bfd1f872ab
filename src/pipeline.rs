//! The streaming engine: reader → compute → writer, joined by bounded channels.
//!
//! A run writes one or more outputs whose tensors come in the same order (one output, or a sweep
//! of one method over the same models). The reader walks that order once, cutting every tensor
//! into chunks of whole elements, and for each chunk reads every *distinct* input any output
//! needs — once, however many outputs use it — into a *slot* taken from a fixed pool. Compute
//! workers run the method and combine ops on the slot; the writer puts chunks back in order and
//! hands each output's bytes to that output's [`ShardSink`], computing ExPO's as it goes,
//! straight into the sink's buffers ([`ShardSink::write_with`]). A slot carries its chunk from
//! read to write and then returns to the pool, so memory is `slots × buffers × chunk_bytes`
//! whatever the size of a tensor or model, and no stage can wait on a buffer held by a later
//! one. The engine knows nothing of files on the output side (that is the sinks' business),
//! nothing of arithmetic (the kernel's) and nothing of methods (the plan's ops are data): it
//! moves bytes.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::busy::{Busy, Stage};
use crate::error::{Error, MethodFailure, Result, UsageError};
use crate::iobuf::IoBuf;
use crate::kernel::{self, methods, Isa};
use crate::method::{Input, Op};
use crate::model::{ChunkBuf, Model, ReadCache};
use crate::plan::{OutShard, Plan};

/// How the engine runs. None of it changes the output bytes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Compute workers.
    pub threads: usize,
    /// Bytes of one chunk buffer (a multiple of 8, so chunks never split an element).
    pub chunk_bytes: usize,
    /// Chunks in flight: the pool holds this many slots.
    pub slots: usize,
    /// Reader threads, each with one chunk's reads in flight: [`Settings::READERS`] for inputs
    /// read from the disk, [`Settings::CACHED_READERS`] when the page cache holds them all, and
    /// two for packed inputs (each with its own cache of decoded blocks).
    pub readers: usize,
    /// The kernel to run.
    pub isa: Isa,
}

impl Settings {
    /// The largest chunk worth having when the page cache holds every input (a read is a
    /// copy). Measured (benches/e2e.rs, 1.8 GB pair): 128–256 KiB chunks keep a chunk's buffers
    /// in L2 from read to write and run ~1.5x faster than 4 MiB ones; more slots than the
    /// stages need only spill the cache. With huge-page buffers (2026-11-26, warm, six
    /// alternating rounds): 0.76–0.83 s against 0.79–0.84 s for 512 KiB and 0.83–0.93 s for
    /// 1 MiB.
    pub const CACHED_CHUNK_BYTES: usize = 256 << 10;
    /// The largest chunk worth having when inputs are read from the disk: each input's chunk is
    /// one read, and the disk does better with fewer, larger requests, while data that arrives
    /// by DMA is not in a CPU cache to keep. Measured (1.8 GB pair, cold, three alternating
    /// rounds, huge-page buffers, 2026-11-26): 2.00–2.03 s (one 3.08 s) against 2.19–2.29 s
    /// for 256 KiB, and 1.99–2.33 s for 1 MiB.
    pub const DISK_CHUNK_BYTES: usize = 512 << 10;
    /// The smallest chunk: below it per-chunk overhead dominates.
    pub const MIN_CHUNK_BYTES: usize = 64 << 10;
    /// Reader threads. Measured (`benches/e2e.rs --reads`, cold cache, two 2 GiB inputs on this
    /// machine's virtio disk): one chunk's reads in flight at a time reach 1.0 GB/s, four
    /// reach 1.7 GB/s with direct I/O (1.0–1.1 through the page cache), eight no more.
    pub const READERS: usize = 4;
    /// Reader threads when the page cache holds every input: a read is then a copy, work for a
    /// CPU rather than the disk, and more readers only take turns on the cores. Measured (1.8
    /// GB pair, warm, five alternating rounds, 2026-11-26): two readers 0.87–1.00 s against
    /// 0.96–1.08 s for four; one, 0.84–1.10 s.
    pub const CACHED_READERS: usize = 2;

    /// Settings with `readers` reader threads whose buffers fit in `buffer_budget` bytes when a
    /// slot holds `buffers` chunk buffers: as many slots as keep every stage busy (one per
    /// reader, two per worker, and the writer's), at the largest chunk size up to `max_chunk`
    /// that fits.
    pub fn for_budget(
        buffer_budget: u64,
        threads: usize,
        readers: usize,
        max_chunk: usize,
        isa: Isa,
        buffers: usize,
    ) -> Result<Settings> {
        let threads = threads.max(1);
        let buffers = buffers.max(1);
        let readers = readers.max(1);
        let slots = readers + 2 * threads + 1;
        let per_buffer = buffer_budget / (buffers * slots) as u64;
        let chunk = (per_buffer.min(max_chunk as u64) as usize) & !7;
        if chunk < Self::MIN_CHUNK_BYTES {
            return Err(Error::Usage(UsageError::MemoryTooSmall {
                threads,
                needed: (buffers * slots * Self::MIN_CHUNK_BYTES) as u64,
            }));
        }
        Ok(Settings {
            threads,
            chunk_bytes: chunk,
            slots,
            readers,
            isa,
        })
    }

    /// Makes chunks hold `granule` whole: chunk buffers grow beyond the chosen size
    /// if `buffer_budget` allows `buffers` of them per slot; else, or when the chunk size was
    /// `fixed` by the caller, a method error naming the tensor (and, for the budget, the
    /// `--memory` that would do: `memory` is the cap the budget came from).
    pub fn hold(
        &mut self,
        granule: &Granule,
        buffer_budget: u64,
        buffers: usize,
        fixed: bool,
        memory: u64,
    ) -> Result<()> {
        if granule.bytes <= self.chunk_bytes as u64 {
            return Ok(());
        }
        let chunk = granule.bytes.next_multiple_of(8);
        let total = chunk * (buffers.max(1) * self.slots) as u64;
        if !fixed && total <= buffer_budget {
            self.chunk_bytes = chunk as usize;
            return Ok(());
        }
        let source = if fixed {
            MethodFailure::ChunkTooSmall {
                granule: granule.elems,
                bytes: granule.bytes,
                chunk: self.chunk_bytes as u64,
            }
        } else {
            MethodFailure::RowTooLong {
                granule: granule.elems,
                bytes: granule.bytes,
                memory,
                needed: memory.saturating_sub(buffer_budget) + total,
            }
        };
        Err(Error::Method {
            tensor: granule.tensor.clone(),
            source,
        })
    }
}

/// The tensor of a run whose method ops need the largest chunks: chunks of a method op's
/// tensor are cut on its granule (a block of elements, or a row), so a chunk buffer must hold
/// at least `bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granule {
    /// The tensor.
    pub tensor: String,
    /// Elements per granule (the common multiple of the granules of the tensor's method ops
    /// over the outputs, at most the tensor's element count).
    pub elems: u64,
    /// Their bytes at the widest dtype read or written for the tensor.
    pub bytes: u64,
}

/// The [`Granule`] of `outputs`' method ops that needs the most bytes, if any op has one.
pub fn largest_granule(outputs: &[(&Plan, &[usize])]) -> Option<Granule> {
    let &(first, _) = outputs.first()?;
    let mut best: Option<Granule> = None;
    for t in 0..first.tensors.len() {
        let (mut granule, mut widest) = (1u64, 1u64);
        for (plan, shards) in outputs {
            if !shards.iter().any(|&s| plan.shards[s].tensors.contains(&t)) {
                continue;
            }
            let tensor = &plan.tensors[t];
            widest = widest.max(tensor.dtype.size() as u64);
            for seg in &tensor.segments {
                if let Op::Method(op) = &seg.op {
                    granule = lcm(granule, op.granule());
                }
                for input in &seg.inputs {
                    widest = widest.max(input.dtype.size() as u64);
                }
            }
        }
        let elems = granule.min(first.tensors[t].numel());
        if granule > 1 && best.as_ref().is_none_or(|b| elems * widest > b.bytes) {
            best = Some(Granule {
                tensor: first.tensors[t].name.clone(),
                elems,
                bytes: elems * widest,
            });
        }
    }
    best
}

/// Chunk buffers one slot needs for `outputs`: for the most demanding tensor, one per distinct
/// input and one per output computed into the slot (copies write straight from their input's
/// buffer, ExPO straight into the sink's).
pub fn buffers_per_slot(outputs: &[(&Plan, &[usize])]) -> (usize, usize) {
    let Some(&(first, _)) = outputs.first() else {
        return (1, 0);
    };
    let (mut reads, mut computed) = (1, 0);
    for t in 0..first.tensors.len() {
        let mut inputs: Vec<&Input> = Vec::new();
        let mut ops = 0;
        for (plan, _) in outputs {
            for seg in &plan.tensors[t].segments {
                inputs.extend(&seg.inputs);
                ops += usize::from(!matches!(seg.op, Op::Copy | Op::Expo { .. }));
            }
        }
        inputs.sort_by_key(|i| (i.model, i.loc.shard, i.loc.entry, i.first));
        inputs.dedup();
        reads = reads.max(inputs.len());
        computed = computed.max(ops);
    }
    (reads, computed)
}

/// Receives one output, shard by shard, in order, from the writer stage.
pub trait ShardSink {
    /// A shard starts; its header is `shard.prefix`.
    fn begin(&mut self, shard: &OutShard) -> Result<()>;
    /// The next bytes of the shard's data section.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// The next `len` bytes of the shard's data section, computed by `fill` where the sink
    /// wants them: `fill(at, dst)` puts the bytes from `at` on into `dst`, and `at` and
    /// `dst.len()` are multiples of `unit` (an element's bytes, at most 8). A sink with buffers
    /// of its own has them filled in place, saving a copy; by default the bytes are computed
    /// into a scratch buffer and written (see [`fill_scratch`] for a sink that keeps one).
    fn write_with(
        &mut self,
        len: usize,
        unit: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        let _ = unit;
        let mut scratch = Vec::new();
        self.write(fill_scratch(&mut scratch, len, fill))
    }
    /// The shard's data is complete and its inputs were unchanged while it was read.
    fn finish(&mut self, shard: &OutShard) -> Result<()>;
}

/// The `len` bytes `fill` computes, in `scratch` (grown as needed and kept by the caller, so a
/// sink without buffers of its own allocates once for [`ShardSink::write_with`]).
pub fn fill_scratch<'s>(
    scratch: &'s mut Vec<u8>,
    len: usize,
    fill: &mut dyn FnMut(usize, &mut [u8]),
) -> &'s [u8] {
    if scratch.len() < len {
        scratch.resize(len, 0);
    }
    fill(0, &mut scratch[..len]);
    &scratch[..len]
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

/// One output of a run: its plan, the shards to write (indices into `plan.shards`, ascending)
/// and where they go.
pub struct Output<'a> {
    /// What the output is.
    pub plan: &'a Plan,
    /// The shards this run writes (indices into `plan.shards`, ascending).
    pub shards: &'a [usize],
    /// Where they go.
    pub sink: &'a mut dyn ShardSink,
}

/// An op as the pipeline runs it: a method's statistics live here, one copy per tensor and
/// output, filled in by the reduction rounds before the output round reads them.
#[derive(Debug)]
enum Kernel {
    Copy,
    Expo {
        alpha: f32,
        aligned: kernel::FloatDtype,
        sft: kernel::FloatDtype,
    },
    Method(Box<RwLock<methods::Op>>),
    Combine(Arc<kernel::linear::Combine>),
}

impl Kernel {
    fn of(op: &Op) -> Kernel {
        match op {
            Op::Copy => Kernel::Copy,
            &Op::Expo {
                alpha,
                aligned,
                sft,
            } => Kernel::Expo {
                alpha,
                aligned,
                sft,
            },
            Op::Method(op) => Kernel::Method(Box::new(RwLock::new((**op).clone()))),
            Op::Combine(c) => Kernel::Combine(Arc::clone(c)),
        }
    }

    /// Whether the op computes into a slot buffer on the compute workers (copies are written
    /// from their input's buffer, ExPO computed into the sink's).
    fn in_slot(&self) -> bool {
        matches!(self, Kernel::Method(_) | Kernel::Combine(_))
    }

    /// The method op, for reading.
    fn method(&self) -> Option<std::sync::RwLockReadGuard<'_, methods::Op>> {
        match self {
            Kernel::Method(op) => Some(op.read().unwrap_or_else(|p| p.into_inner())),
            _ => None,
        }
    }
}

/// What one output makes of one piece of a tensor.
#[derive(Debug)]
struct Work {
    /// Index into the run's outputs.
    output: usize,
    /// The output shard the bytes belong to.
    shard: usize,
    kernel: Kernel,
    /// Buffers (indices into the step's reads) of the op's inputs, in the op's order.
    inputs: Vec<usize>,
    /// The slot's output buffer the result goes to (used by method and combine ops only).
    out: usize,
    /// Bytes per output element.
    width: u64,
}

/// A stretch of one tensor over which every output's segment stays the same: what to read and
/// what to compute for each of its chunks.
#[derive(Debug)]
struct Step {
    tensor: usize,
    /// Elements of the output tensor covered.
    elems: Range<u64>,
    /// Distinct inputs, each with the input element lining up with `elems.start`.
    reads: Vec<(usize, Input)>,
    work: Vec<Work>,
    /// Whether a work item computes into the slot (a method or combine op), so that chunks
    /// go through the compute workers.
    in_slot: bool,
    /// Elements per chunk.
    per_chunk: u64,
}

/// The buffers of one chunk in flight.
struct Slot<'a> {
    inputs: Vec<ChunkBuf<'a>>,
    outputs: Vec<Vec<u8>>,
}

/// What a chunk is read for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// A reduction pass of the step's method ops; `last` marks the step's last chunk.
    Reduce { last: bool },
    /// The output.
    Output,
}

/// One chunk of one step.
struct Job<'a> {
    seq: u64,
    step: Arc<Step>,
    /// Elements of the step's tensor.
    elems: Range<u64>,
    round: Round,
    /// Which of the step's reads the round needs (a reduction round reads only what the ops
    /// still reducing take).
    needed: Arc<[bool]>,
    slot: Slot<'a>,
    /// Per work item, in a reduction round: the chunk's partial statistics.
    partials: Vec<Option<methods::Partial>>,
    /// What went wrong computing the chunk (reported by the writer, in order).
    error: Option<Error>,
}

impl Job<'_> {
    fn n(&self) -> u64 {
        self.elems.end - self.elems.start
    }

    /// The bytes `work` produced.
    fn output(&self, work: &Work) -> &[u8] {
        let len = (self.n() * work.width) as usize;
        match work.kernel {
            Kernel::Copy => &self.slot.inputs[work.inputs[0]].bytes()[..len],
            Kernel::Method(_) | Kernel::Combine(_) => &self.slot.outputs[work.out][..len],
            Kernel::Expo { .. } => unreachable!("ExPO is computed into the sink"),
        }
    }
}

/// Everything the stages share, read-only.
struct Run<'a> {
    models: &'a [Model],
    plans: Vec<&'a Plan>,
    /// Per output, per shard: whether this run writes it.
    selected: Vec<Vec<bool>>,
    settings: &'a Settings,
    cancel: &'a Cancel,
    busy: &'a Busy,
}

/// Tells the reader that the writer has applied a reduction round's statistics.
type RoundDone = (Sender<()>, Receiver<()>);

/// Writes every output's selected shards into its sink, reading each input once.
///
/// The outputs must list the same tensors in the same order (the plans of one method over the
/// same layout model do); their ops may read different models.
pub fn run(
    models: &[Model],
    outputs: &mut [Output],
    settings: &Settings,
    progress: &dyn Progress,
    cancel: &Cancel,
    busy: &Busy,
) -> Result<()> {
    let Some(first) = outputs.first() else {
        return Ok(());
    };
    for o in outputs.iter() {
        if !o.plan.tensor_names().eq(first.plan.tensor_names()) {
            return Err(Error::internal(
                "outputs of one run must list the same tensors in the same order",
            ));
        }
    }
    let cancel = Cancel {
        signal: cancel.signal.clone(),
        abort: Arc::new(AtomicBool::new(false)),
    };
    let run = Run {
        models,
        plans: outputs.iter().map(|o| o.plan).collect(),
        selected: outputs
            .iter()
            .map(|o| {
                let mut sel = vec![false; o.plan.shards.len()];
                for &s in o.shards {
                    sel[s] = true;
                }
                sel
            })
            .collect(),
        settings,
        cancel: &cancel,
        busy,
    };
    let shapes: Vec<(&Plan, &[usize])> = outputs.iter().map(|o| (o.plan, o.shards)).collect();
    let (reads, computed) = buffers_per_slot(&shapes);
    // Every slot's input buffers, in one mapping (declared before the channels that hold them).
    let mut arena = IoBuf::new(ChunkBuf::stride(settings.chunk_bytes) * reads * settings.slots);
    let mut chunk_bufs = ChunkBuf::carve(arena.as_mut_slice(), settings.chunk_bytes);
    let (pool_tx, pool_rx) = bounded::<Slot>(settings.slots);
    for _ in 0..settings.slots {
        pool_tx
            .send(Slot {
                inputs: chunk_bufs.by_ref().take(reads).collect(),
                outputs: (0..computed)
                    .map(|_| vec![0u8; settings.chunk_bytes])
                    .collect(),
            })
            .expect("the pool has room for every slot");
    }
    let (fill_tx, fill_rx) = bounded::<Job>(settings.slots);
    let (read_tx, read_rx) = bounded::<Job>(settings.slots);
    let (done_tx, done_rx) = bounded::<Job>(settings.slots);
    let (round_tx, round_rx): RoundDone = bounded(1);
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
            if let Err(e) = read_stage(run, pool_rx, &fill_tx, &round_rx) {
                fail(e);
            }
            drop(fill_tx);
        });
        for _ in 0..settings.readers.max(1) {
            let (rx, tx, done) = (fill_rx.clone(), read_tx.clone(), done_tx.clone());
            scope.spawn(move || {
                if let Err(e) = reader(run, rx, tx, done, reads) {
                    fail(e);
                }
            });
        }
        drop((fill_rx, read_tx));
        for _ in 0..settings.threads {
            let (rx, tx) = (read_rx.clone(), done_tx.clone());
            scope.spawn(move || compute_stage(run, rx, tx));
        }
        drop((read_rx, done_tx));
        if let Err(e) = write_stage(run, done_rx, pool_tx, outputs, progress, round_tx) {
            fail(e);
        }
    });
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The steps of tensor `t`: one per stretch over which no wanted output changes segment.
fn steps_of(run: &Run, t: usize) -> Result<Vec<Step>> {
    let mut cuts: Vec<u64> = Vec::new();
    let mut wanted = Vec::new();
    for (k, plan) in run.plans.iter().enumerate() {
        let shard = plan
            .shards
            .iter()
            .position(|s| s.tensors.contains(&t))
            .expect("every tensor is in a shard");
        if run.selected[k][shard] {
            wanted.push((k, shard));
            for seg in &plan.tensors[t].segments {
                cuts.extend([seg.elems.start, seg.elems.end]);
            }
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut steps = Vec::new();
    for w in cuts.windows(2) {
        let elems = w[0]..w[1];
        let mut reads: Vec<(usize, Input)> = Vec::new();
        let mut work = Vec::new();
        let mut widest = 1;
        let mut granule = 1;
        for &(k, shard) in &wanted {
            let tensor = &run.plans[k].tensors[t];
            let seg = tensor
                .segments
                .iter()
                .find(|s| s.elems.start <= elems.start && elems.end <= s.elems.end)
                .expect("segments cover the tensor");
            let mut inputs = Vec::new();
            for input in &seg.inputs {
                let at = Input {
                    first: input.first + (elems.start - seg.elems.start),
                    ..*input
                };
                let i = match reads.iter().position(|(_, r)| *r == at) {
                    Some(i) => i,
                    None => {
                        reads.push((reads.len(), at));
                        reads.len() - 1
                    }
                };
                widest = widest.max(at.dtype.size() as u64);
                inputs.push(i);
            }
            let width = tensor.dtype.size() as u64;
            widest = widest.max(width);
            let out = work.iter().filter(|w: &&Work| w.kernel.in_slot()).count();
            if let Op::Method(op) = &seg.op {
                granule = lcm(granule, op.granule());
                if seg.elems != elems {
                    return Err(Error::internal(format!(
                        "tensor '{}': a method op covers elements {:?}, not the whole stretch {elems:?}",
                        tensor.name, seg.elems
                    )));
                }
            }
            work.push(Work {
                output: k,
                shard,
                kernel: Kernel::of(&seg.op),
                inputs,
                out,
                width,
            });
        }
        let fits = run.settings.chunk_bytes as u64 / widest;
        let per_chunk = if granule > 1 {
            // Method ops see chunks cut on their granule (a block of elements, or a row); a
            // stretch shorter than a granule is one chunk.
            let len = elems.end - elems.start;
            let per_chunk = if len <= fits {
                len.max(1)
            } else {
                fits / granule * granule
            };
            if per_chunk == 0 {
                return Err(Error::Method {
                    tensor: run.plans[wanted[0].0].tensors[t].name.clone(),
                    source: MethodFailure::ChunkTooSmall {
                        granule,
                        bytes: granule * widest,
                        chunk: run.settings.chunk_bytes as u64,
                    },
                });
            }
            per_chunk
        } else {
            fits.max(1)
        };
        let in_slot = work.iter().any(|w| w.kernel.in_slot());
        steps.push(Step {
            tensor: t,
            elems,
            reads,
            in_slot,
            work,
            per_chunk,
        });
    }
    Ok(steps)
}

fn lcm(a: u64, b: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

/// Reads every chunk of the selected shards, in output order: for a step with method ops,
/// first the chunks of each reduction round, waiting after each for the writer to apply its
/// statistics, then the chunks of the output round.
fn read_stage<'b>(
    run: &Run,
    pool: Receiver<Slot<'b>>,
    out: &Sender<Job<'b>>,
    round_done: &Receiver<()>,
) -> Result<()> {
    let mut seq = 0;
    let tensors = run.plans.first().map_or(0, |p| p.tensors.len());
    for t in 0..tensors {
        for step in steps_of(run, t)? {
            let step = Arc::new(step);
            loop {
                let reducing = step
                    .work
                    .iter()
                    .any(|w| w.kernel.method().is_some_and(|op| op.next_pass().is_some()));
                let round = if reducing {
                    Round::Reduce { last: false }
                } else {
                    Round::Output
                };
                // A reduction round reads only what the ops still reducing take.
                let mut needed = vec![!reducing; step.reads.len()];
                for w in &step.work {
                    if w.kernel.method().is_some_and(|op| op.next_pass().is_some()) {
                        for &i in &w.inputs {
                            needed[i] = true;
                        }
                    }
                }
                let needed: Arc<[bool]> = needed.into();
                if !read_round(run, &step, round, &needed, &pool, out, &mut seq)? {
                    return Ok(()); // a later stage has stopped
                }
                if !reducing {
                    break;
                }
                if round_done.recv().is_err() {
                    return Ok(()); // the writer has stopped
                }
            }
        }
    }
    Ok(())
}

/// Reads (the `needed` inputs of) every chunk of `step` for `round` and sends it on; false if
/// a later stage has stopped.
fn read_round<'b>(
    run: &Run,
    step: &Arc<Step>,
    round: Round,
    needed: &Arc<[bool]>,
    pool: &Receiver<Slot<'b>>,
    out: &Sender<Job<'b>>,
    seq: &mut u64,
) -> Result<bool> {
    let mut at = step.elems.start;
    while at < step.elems.end {
        run.cancel.check()?;
        if run.cancel.aborted() {
            return Ok(false);
        }
        let n = (step.elems.end - at).min(step.per_chunk);
        let Ok(slot) = pool.recv() else {
            return Ok(false);
        };
        let round = match round {
            Round::Reduce { .. } => Round::Reduce {
                last: at + n == step.elems.end,
            },
            Round::Output => Round::Output,
        };
        let job = Job {
            seq: *seq,
            step: Arc::clone(step),
            elems: at..at + n,
            round,
            needed: Arc::clone(needed),
            slot,
            partials: Vec::new(),
            error: None,
        };
        if out.send(job).is_err() {
            return Ok(false);
        }
        *seq += 1;
        at += n;
    }
    Ok(true)
}

/// A reader thread: fills each job's input buffers, then hands it to the compute workers, or
/// straight to the writer when nothing is computed into the slot (copies and ExPO, which the
/// writer computes into its sinks). Several readers keep several chunks' reads in flight; jobs
/// leave in any order (the writer restores it).
///
/// Packed inputs are decoded here, through the reader's own [`ReadCache`] holding a decoded
/// block per distinct input of a chunk (`reads`). A run with packed inputs has two readers
/// and, where the budget allows, chunks of a whole block (see `stream_groups` in `lib.rs`), so
/// a chunk decodes at most two blocks of each input and the two readers seldom decode the
/// same one.
fn reader<'b>(
    run: &Run,
    input: Receiver<Job<'b>>,
    compute: Sender<Job<'b>>,
    write: Sender<Job<'b>>,
    reads: usize,
) -> Result<()> {
    let mut cache = ReadCache::new(reads);
    for mut job in input {
        if run.cancel.aborted() {
            return Ok(());
        }
        let step = Arc::clone(&job.step);
        let n = job.n();
        let started = std::time::Instant::now();
        for (i, read) in &step.reads {
            if !job.needed[*i] {
                continue;
            }
            let width = read.dtype.size() as u64;
            let first = read.first + (job.elems.start - step.elems.start);
            run.busy.add_read(n * width);
            read_chunk(
                &run.models[read.model],
                read,
                first * width,
                (n * width) as usize,
                &mut job.slot.inputs[*i],
                &mut cache,
            )?;
        }
        run.busy.add(Stage::Read, started.elapsed());
        let next = if step.in_slot { &compute } else { &write };
        if next.send(job).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads `len` bytes of `input`'s tensor in `model`, starting `at` bytes into the tensor.
fn read_chunk(
    model: &Model,
    input: &Input,
    at: u64,
    len: usize,
    buf: &mut ChunkBuf,
    cache: &mut ReadCache,
) -> Result<()> {
    let shard = &model.shards[input.loc.shard];
    let info = &shard.tensors[input.loc.entry];
    shard.read_chunk(info.start + at, len, buf, cache)
}

fn compute_stage<'b>(run: &Run, input: Receiver<Job<'b>>, output: Sender<Job<'b>>) {
    for mut job in input {
        let started = std::time::Instant::now();
        if let Err(e) = compute(run, &mut job) {
            job.error = Some(e);
        }
        run.busy.add(Stage::Compute, started.elapsed());
        if output.send(job).is_err() {
            return;
        }
    }
}

/// Runs every work item of `job`: its partial statistics in a reduction round, its output bytes
/// in the output round.
fn compute(run: &Run, job: &mut Job) -> Result<()> {
    let n = job.n();
    let step = Arc::clone(&job.step);
    let Slot { inputs, outputs } = &mut job.slot;
    // Elements into the tensor (a method's segment is the whole tensor).
    let offset = job.elems.start;
    for work in &step.work {
        let len = (n * work.width) as usize;
        let ins = work_inputs(&step, inputs, n, work);
        if let Round::Reduce { .. } = job.round {
            let partial = match work.kernel.method() {
                Some(op) if op.next_pass().is_some() => Some(
                    op.partial(offset, &ins)
                        .map_err(|e| method_error(run, &step, e))?,
                ),
                _ => None,
            };
            job.partials.push(partial);
            continue;
        }
        match &work.kernel {
            // Written from the input's buffer, or computed into the sink's (see `write_work`).
            Kernel::Copy | Kernel::Expo { .. } => {}
            Kernel::Combine(c) => {
                let typed: Vec<(&[u8], kernel::FloatDtype)> = work
                    .inputs
                    .iter()
                    .zip(&ins)
                    .map(|(&i, bytes)| {
                        let (_, at) = &step.reads[i];
                        (
                            *bytes,
                            at.dtype.mergeable().expect("planned as a float input"),
                        )
                    })
                    .collect();
                kernel::linear::combine(
                    run.settings.isa,
                    c,
                    offset,
                    &typed,
                    &mut outputs[work.out][..len],
                );
            }
            Kernel::Method(_) => {
                let op = work.kernel.method().expect("a method kernel");
                op.output(offset, &ins, &mut outputs[work.out][..len])
                    .map_err(|e| method_error(run, &step, e))?;
            }
        }
    }
    Ok(())
}

/// The input bytes of `work` in a chunk of `n` elements, in the op's order.
fn work_inputs<'a>(step: &Step, inputs: &'a [ChunkBuf], n: u64, work: &Work) -> Vec<&'a [u8]> {
    work.inputs
        .iter()
        .map(|&i| {
            let (_, at) = &step.reads[i];
            &inputs[i].bytes()[..(n * at.dtype.size() as u64) as usize]
        })
        .collect()
}

/// An op's error in the pipeline: [`Error::Method`], or [`Error::Internal`] when the pipeline
/// broke the op's protocol ([`Error::method`]).
fn method_error(run: &Run, step: &Step, e: methods::MethodError) -> Error {
    Error::method(&run.plans[step.work[0].output].tensors[step.tensor].name, e)
}

/// Where the writer stands in one output.
struct Cursor {
    /// Position in the output's shard list of the next shard to begin.
    next: usize,
    /// The shard being written and the data bytes written to it so far.
    open: Option<(usize, u64)>,
}

/// Puts chunks back in order and feeds each output's bytes to its sink, shard by shard.
fn write_stage<'b>(
    run: &Run,
    input: Receiver<Job<'b>>,
    pool: Sender<Slot<'b>>,
    outputs: &mut [Output],
    progress: &dyn Progress,
    round_done: Sender<()>,
) -> Result<()> {
    // A reduction round's combiners, per work item of the step being reduced.
    let mut combiners: Vec<Option<methods::Combiner>> = Vec::new();
    let mut pending: BTreeMap<u64, Job> = BTreeMap::new();
    let mut next = 0u64;
    let mut cursors: Vec<Cursor> = outputs
        .iter()
        .map(|_| Cursor {
            next: 0,
            open: None,
        })
        .collect();
    let signalled = || run.cancel.signal.load(Ordering::Relaxed) != 0;
    loop {
        let job = match pending.remove(&next) {
            Some(job) => job,
            None => {
                let Ok(job) = input.recv() else { break };
                if job.seq != next {
                    pending.insert(job.seq, job);
                    continue;
                }
                job
            }
        };
        run.cancel.check()?;
        if let Some(e) = job.error {
            return Err(e);
        }
        if let Round::Reduce { last } = job.round {
            reduce(run, &job, &mut combiners, last)?;
            if last && round_done.send(()).is_err() {
                return Ok(());
            }
            next += 1;
            let _ = pool.send(job.slot);
            continue;
        }
        for work in &job.step.work {
            let out = &mut outputs[work.output];
            let cursor = &mut cursors[work.output];
            open_shard(run, out, cursor, Some(work.shard))?;
            let (shard, written) = cursor.open.as_mut().expect("opened above");
            if *written == 0 && work.output == 0 && cursor.next == out.shards.len().min(2) {
                crate::failpoint::hit("shard-data", &signalled);
            }
            let len = run
                .busy
                .time(Stage::Write, || write_work(run, &job, work, &mut *out.sink))?;
            *written += len as u64;
            progress.advance(len as u64);
            if *written == out.plan.shards[*shard].data_len {
                let shard = *shard;
                cursor.open = None;
                finish_shard(run, out, shard)?;
            }
        }
        next += 1;
        // The pool is never full while this slot is out, and nobody else closes it.
        let _ = pool.send(job.slot);
    }
    // Upstream has stopped: an error or a signal says why, unless every shard is done (shards
    // of empty tensors only are done now).
    run.cancel.check()?;
    if run.cancel.aborted() {
        return Ok(()); // the reader's error is the one reported
    }
    for (out, cursor) in outputs.iter_mut().zip(&mut cursors) {
        open_shard(run, out, cursor, None)?;
        if cursor.open.is_some() || cursor.next < out.shards.len() {
            return Err(Error::internal(
                "the read stage stopped before every shard was complete",
            ));
        }
    }
    Ok(())
}

/// Hands `sink` the bytes `work` makes of `job`'s chunk, and tells how many: an ExPO output's
/// computed straight into the sink's buffers, the others' from the slot.
///
/// ExPO reads each input byte once and runs at the speed of memory; computed here rather than
/// on a worker, the writer no longer copies its result into the sink's staging buffers, and
/// the run moves each output byte through memory once less. Measured (2026-11-26): see
/// README, Performance.
fn write_work(run: &Run, job: &Job, work: &Work, sink: &mut dyn ShardSink) -> Result<usize> {
    let n = job.n();
    let len = (n * work.width) as usize;
    let &Kernel::Expo {
        alpha,
        aligned,
        sft,
    } = &work.kernel
    else {
        sink.write(job.output(work))?;
        return Ok(len);
    };
    let ins = work_inputs(&job.step, &job.slot.inputs, n, work);
    let (width, isa) = (work.width as usize, run.settings.isa);
    let mut fill = |at: usize, dst: &mut [u8]| {
        let (first, count) = (at / width, dst.len() / width);
        let a = &ins[0][first * aligned.size()..(first + count) * aligned.size()];
        let b = &ins[1][first * sft.size()..(first + count) * sft.size()];
        if aligned == sft {
            kernel::expo(isa, aligned, alpha, a, b, dst);
        } else {
            kernel::expo_mixed(aligned, sft, alpha, a, b, dst);
        }
    };
    sink.write_with(len, width, &mut fill)?;
    Ok(len)
}

/// Pushes a reduction chunk's partials into the round's combiners, in chunk order; after the
/// step's last chunk, applies the statistics to the step's method ops.
fn reduce(
    run: &Run,
    job: &Job,
    combiners: &mut Vec<Option<methods::Combiner>>,
    last: bool,
) -> Result<()> {
    combiners.resize_with(job.step.work.len(), || None);
    for ((work, partial), comb) in job
        .step
        .work
        .iter()
        .zip(&job.partials)
        .zip(combiners.iter_mut())
    {
        let Some(partial) = partial else { continue };
        let op = work.kernel.method().expect("partials come from method ops");
        let comb = comb.get_or_insert_with(|| op.combiner());
        comb.push(
            partial.clone(),
            &work_inputs(&job.step, &job.slot.inputs, job.n(), work),
        )
        .map_err(|e| method_error(run, &job.step, e))?;
    }
    if last {
        for (work, comb) in job.step.work.iter().zip(combiners.iter_mut()) {
            if let (Kernel::Method(op), Some(comb)) = (&work.kernel, comb.take()) {
                op.write()
                    .unwrap_or_else(|p| p.into_inner())
                    .finish_pass(comb)
                    .map_err(|e| method_error(run, &job.step, e))?;
            }
        }
    }
    Ok(())
}

/// Makes `target` the output's open shard, beginning (and finishing) every empty shard before
/// it; with `None`, finishes the empty shards left at the end.
fn open_shard(
    run: &Run,
    out: &mut Output,
    cursor: &mut Cursor,
    target: Option<usize>,
) -> Result<()> {
    loop {
        match cursor.open {
            Some((s, _)) if Some(s) == target => return Ok(()),
            Some((s, written)) => {
                return Err(Error::internal(format!(
                    "shard {} left after {written} of {} bytes",
                    out.plan.shards[s].name, out.plan.shards[s].data_len
                )))
            }
            None => {}
        }
        let Some(&s) = out.shards.get(cursor.next) else {
            return match target {
                None => Ok(()),
                Some(t) => Err(Error::internal(format!(
                    "data for shard {} which this run does not write",
                    out.plan.shards[t].name
                ))),
            };
        };
        let shard = &out.plan.shards[s];
        if target.is_none() && shard.data_len > 0 {
            return Ok(()); // reported by the caller
        }
        cursor.next += 1;
        out.sink.begin(shard)?;
        if shard.data_len == 0 {
            finish_shard(run, out, s)?;
        } else {
            cursor.open = Some((s, 0));
        }
    }
}

/// Checks that the inputs did not change while the shard's data was read, then finishes it.
fn finish_shard(run: &Run, out: &mut Output, shard: usize) -> Result<()> {
    for model in run.models {
        model.check_unchanged()?;
    }
    out.sink.finish(&out.plan.shards[shard])
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
        /// `[sft, aligned]`.
        models: Vec<Model>,
        plan: Plan,
        alpha: f32,
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
        let models = vec![
            Model::open(&dir.path().join("sft")).unwrap(),
            Model::open(&dir.path().join("aligned")).unwrap(),
        ];
        let recipe = crate::method::Recipe {
            method: crate::method::Method::Expo { alpha: 0.3 },
            models: vec![0, 1],
            policy: Default::default(),
        };
        let plan = Plan::build(&recipe, &models, 60_000).unwrap();
        assert!(plan.shards.len() >= 3, "{} shards", plan.shards.len());
        Pair {
            _dir: dir,
            models,
            plan,
            alpha: 0.3,
        }
    }

    fn settings(threads: usize, chunk_bytes: usize) -> Settings {
        Settings {
            threads,
            chunk_bytes,
            slots: Settings::READERS + 2 * threads + 1,
            readers: Settings::READERS,
            isa: Isa::select().unwrap(),
        }
    }

    /// A tensor's bytes, read straight from its file.
    fn tensor_bytes(model: &Model, name: &str) -> Vec<u8> {
        let (loc, t) = model.get(name).unwrap();
        let shard = &model.shards[loc.shard];
        let header = shard.header().unwrap();
        let mut buf = vec![0u8; t.nbytes() as usize];
        shard
            .file
            .read_exact_at(&mut buf, header.data_start() + t.start)
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
                    let (sft, aligned) = (&p.models[0], &p.models[1]);
                    let a = tensor_bytes(aligned, &t.name);
                    if t.dtype.mergeable().is_none() {
                        bytes.extend_from_slice(&a);
                        continue;
                    }
                    let s = tensor_bytes(sft, &t.name);
                    let s_dtype = sft.get(&t.name).unwrap().1.dtype;
                    let (wa, ws) = (t.dtype.size(), s_dtype.size());
                    for (ae, se) in a.chunks_exact(wa).zip(s.chunks_exact(ws)) {
                        let (av, sv) = (to_f32(t.dtype, ae), to_f32(s_dtype, se));
                        let d = av - sv;
                        let scaled = p.alpha * d;
                        bytes.extend_from_slice(&from_f32(t.dtype, av + scaled));
                    }
                }
                (shard.name.clone(), bytes)
            })
            .collect()
    }

    /// Runs `p`'s plan for `shards` into `sink`.
    fn run_with(
        p: &Pair,
        shards: &[usize],
        settings: &Settings,
        sink: &mut dyn ShardSink,
        cancel: &Cancel,
    ) -> Result<()> {
        let mut outputs = [Output {
            plan: &p.plan,
            shards,
            sink,
        }];
        run(
            &p.models,
            &mut outputs,
            settings,
            &(),
            cancel,
            &Busy::default(),
        )
    }

    fn run_into(p: &Pair, shards: &[usize], settings: &Settings) -> Result<MemorySink> {
        let mut sink = MemorySink::default();
        run_with(p, shards, settings, &mut sink, &Cancel::default())?;
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
            let err =
                run_with(&p, &all, &settings(2, 64), &mut sink, &Cancel::default()).unwrap_err();
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
        let err = run_with(&p, &[0], &settings(2, 64), &mut sink, &cancel).unwrap_err();
        assert!(matches!(err, Error::Interrupted { signal: 15 }), "{err:?}");
    }
}
