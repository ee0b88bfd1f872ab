//! The encoder: [`PackWriter`], a streaming sink that takes a shard's bytes in order and emits
//! the packed shard in order, and [`pack_shard`], which feeds it a safetensors file.
//!
//! The writer is given the safetensors prefix (length + header JSON) up front, then the data
//! section in pieces of any size. It cuts the data into blocks and packs them on `threads`
//! worker threads (each with its own zstd context; blocks are independent, so the bytes do not
//! depend on the thread count), writing finished blocks in order. At most `2 × threads + 1`
//! blocks are in flight, so memory is bounded by a few blocks per thread whatever the shard's
//! size. It hashes (blake3) both the original bytes it was given — with workers, on a hasher
//! thread that passes each block on to them, so the caller's thread only copies — and the
//! packed bytes it emits (unless its sink hashes them itself), so a caller can record both
//! manifests without reading anything back.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::base::Base;
use super::block::{Ctx, Encoder, Packed};
use super::error::PackedError;
use super::layout::{Entry, Preamble, Trailer, FLAG_BASE};
use super::sink::ByteSink;
use super::{DEFAULT_BLOCK_SIZE, DEFAULT_LEVEL, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::error::{Error, Result};
use crate::format::header;

/// Generous bound of a zstd compression context's memory for one block: level 1 with a
/// 64-entry match table needs well under 1 MiB; higher levels build larger match tables (bounded
/// by the block's size, which zstd's window shrinks to).
fn zstd_context_bytes(level: i32) -> u64 {
    match level {
        ..=2 => 2 << 20,
        3..=9 => 8 << 20,
        _ => 32 << 20,
    }
}

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// zstd level (1..=22; 3 is zstd's default).
    pub level: i32,
    /// Bytes of original data per block: a power of two from [`MIN_BLOCK_SIZE`] to
    /// [`MAX_BLOCK_SIZE`].
    pub block_size: u32,
    /// Compression threads (1 packs on the calling thread).
    pub threads: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            level: DEFAULT_LEVEL,
            block_size: DEFAULT_BLOCK_SIZE,
            threads: 1,
        }
    }
}

impl PackOptions {
    /// Upper bound of the memory a [`PackWriter`] with these options holds: the blocks in
    /// flight (original and stored bytes), the block being filled, each worker's scratch and
    /// zstd context.
    pub fn memory_bytes(&self) -> u64 {
        let threads = self.threads.max(1) as u64;
        let block = u64::from(self.block_size);
        let in_flight = 2 * threads + 1;
        (2 * in_flight + 1 + 2 * threads) * block + threads * zstd_context_bytes(self.level)
    }

    fn check(&self) -> Result<()> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(PackedError::BadParameter {
                what: "block size",
                value: i64::from(bs),
                allowed: "powers of two from 64 B to 64 MiB",
            }
            .into());
        }
        if !(1..=22).contains(&self.level) {
            return Err(PackedError::BadParameter {
                what: "zstd level",
                value: i64::from(self.level),
                allowed: "1..=22",
            }
            .into());
        }
        Ok(())
    }
}

/// What packing one shard produced.
#[derive(Debug, Clone)]
pub struct PackedSummary {
    /// Length of the original shard (prefix and data) as given to the writer.
    pub original_len: u64,
    /// blake3 of the original shard, computed as it was given.
    pub original_blake3: blake3::Hash,
    /// Length of the packed bytes emitted.
    pub packed_len: u64,
    /// blake3 of the packed bytes emitted (`None` from a writer told its sink hashes them:
    /// [`PackWriter::new_unhashed`]).
    pub packed_blake3: Option<blake3::Hash>,
    /// Blocks written.
    pub blocks: u64,
    /// Blocks stored raw because zstd did not shrink them.
    pub raw_blocks: u64,
}

/// A block's result from a worker: (index, raw buffer back, stored bytes, how).
type Done = (u64, Vec<u8>, Vec<u8>, Packed);
/// A block for a worker: (index, original bytes, buffer for the stored bytes).
type Job = (u64, Vec<u8>, Vec<u8>);

/// The threads of a writer packing on workers: a hasher thread that hashes the original bytes
/// block by block in order and passes each block on to the compression workers.
struct Workers {
    jobs: Option<Sender<Job>>,
    done: Receiver<Result<Done>>,
    hasher: Option<JoinHandle<blake3::Hash>>,
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// The blake3 of every block submitted (after the prefix), once they are all hashed.
    fn original_hash(&mut self) -> Option<blake3::Hash> {
        self.jobs = None;
        self.hasher.take()?.join().ok()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.jobs = None;
        // Drain so no worker blocks on a full result channel, then join.
        while self.done.recv().is_ok() {}
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Packs a shard streamed through it. See the module documentation.
pub struct PackWriter<S: ByteSink> {
    sink: S,
    ctx: Arc<Ctx>,
    prefix_len: u64,
    /// The block being filled.
    pending: Vec<u8>,
    /// Index of the block being filled.
    next_block: u64,
    /// Index of the next block to write out.
    next_out: u64,
    /// Data bytes accepted.
    seen: u64,
    inline: Option<Encoder>,
    workers: Option<Workers>,
    window: usize,
    in_flight: usize,
    finished: BTreeMap<u64, (Vec<u8>, Packed)>,
    free: Vec<Vec<u8>>,
    entries: Vec<u8>,
    offset: u64,
    raw_blocks: u64,
    /// The original bytes' hasher when packing inline (with workers, their hasher thread has
    /// it).
    original: Option<blake3::Hasher>,
    /// The packed bytes' hasher, unless the sink hashes them itself.
    packed: Option<blake3::Hasher>,
}

impl<S: ByteSink> PackWriter<S> {
    /// Starts a packed shard whose safetensors `prefix` (8-byte length + header JSON) is given
    /// and whose data section will be `data_len` bytes; writes the preamble and prefix to
    /// `sink`. `path` names the shard in errors. With `base`, every tensor is XORed with the
    /// base's tensor of the same name, dtype and shape (checked here).
    ///
    /// The original bytes are hashed (blake3) as they come and, with more than one thread, on a
    /// thread of their own, so that neither hashing nor compression runs on the caller's
    /// thread; the packed bytes are hashed as they are emitted.
    pub fn new(
        path: &Path,
        prefix: &[u8],
        data_len: u64,
        base: Option<Arc<Base>>,
        options: &PackOptions,
        sink: S,
    ) -> Result<PackWriter<S>> {
        Self::start(path, prefix, data_len, base, options, sink, true)
    }

    /// As [`PackWriter::new`], for a sink that hashes what it is given itself (the engine's
    /// output files do, on a thread of their own): the packed bytes are not hashed again, and
    /// the summary's `packed_blake3` is `None`.
    pub fn new_unhashed(
        path: &Path,
        prefix: &[u8],
        data_len: u64,
        base: Option<Arc<Base>>,
        options: &PackOptions,
        sink: S,
    ) -> Result<PackWriter<S>> {
        Self::start(path, prefix, data_len, base, options, sink, false)
    }

    fn start(
        path: &Path,
        prefix: &[u8],
        data_len: u64,
        base: Option<Arc<Base>>,
        options: &PackOptions,
        mut sink: S,
        hash_packed: bool,
    ) -> Result<PackWriter<S>> {
        options.check()?;
        let header = super::parse_prefix(path, prefix, data_len)?;
        let base = match base {
            Some(b) => {
                let locs = b.locate(path, &header.tensors)?;
                Some((b, locs))
            }
            None => None,
        };
        let preamble = Preamble {
            flags: if base.is_some() { FLAG_BASE } else { 0 },
            block_size: options.block_size,
            prefix_len: prefix.len() as u64,
            data_len,
            base_id: base.as_ref().map_or([0; 32], |(b, _)| b.id),
        };
        let start = preamble.encode(prefix);
        let mut original = blake3::Hasher::new();
        original.update(prefix);
        let packed = hash_packed.then(|| {
            let mut h = blake3::Hasher::new();
            h.update(&start);
            h
        });
        sink.write_all(&start)?;
        let ctx = Arc::new(Ctx {
            path: path.to_path_buf(),
            tensors: header.tensors,
            base,
            block_size: options.block_size,
            data_len,
        });
        let threads = options.threads.max(1);
        let (inline, workers, original) = if threads == 1 {
            (Some(Encoder::new(options.level)?), None, Some(original))
        } else {
            (
                None,
                Some(spawn(&ctx, options.level, threads, original)?),
                None,
            )
        };
        Ok(PackWriter {
            sink,
            ctx,
            prefix_len: prefix.len() as u64,
            pending: Vec::new(),
            next_block: 0,
            next_out: 0,
            seen: 0,
            inline,
            workers,
            window: 2 * threads + 1,
            in_flight: 0,
            finished: BTreeMap::new(),
            free: Vec::new(),
            entries: Vec::new(),
            offset: preamble.frames_start(),
            raw_blocks: 0,
            original,
            packed,
        })
    }

    /// Appends the next `bytes` of the data section.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        let after = self.seen + bytes.len() as u64;
        if after > self.ctx.data_len {
            return Err(PackedError::InputLength {
                path: self.ctx.path.clone(),
                expected: self.ctx.data_len,
                got: after,
            }
            .into());
        }
        if let Some(h) = &mut self.original {
            h.update(bytes);
        }
        self.seen = after;
        while !bytes.is_empty() {
            let want = self.ctx.raw_len(self.next_block) - self.pending.len();
            let n = want.min(bytes.len());
            if self.pending.capacity() == 0 {
                self.pending = self.free.pop().unwrap_or_default();
                self.pending.clear();
            }
            self.pending.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.pending.len() == self.ctx.raw_len(self.next_block) {
                self.submit()?;
            }
        }
        Ok(())
    }

    /// Hands the full pending block to the workers (or packs it here).
    fn submit(&mut self) -> Result<()> {
        let k = self.next_block;
        self.next_block += 1;
        let raw = std::mem::take(&mut self.pending);
        let mut stored = self.free.pop().unwrap_or_default();
        if let Some(enc) = &mut self.inline {
            let packed = enc.encode(&self.ctx, k, &raw, &mut stored)?;
            self.free.push(raw);
            self.emit(stored, packed)?;
            return Ok(());
        }
        let workers = self.workers.as_ref().expect("inline or workers");
        workers
            .jobs
            .as_ref()
            .expect("open until finish")
            .send((k, raw, stored))
            .map_err(|_| worker_died(&self.ctx.path))?;
        self.in_flight += 1;
        while self.in_flight >= self.window {
            self.collect_one()?;
        }
        Ok(())
    }

    /// Waits for one block from the workers, and writes out every block now in order.
    fn collect_one(&mut self) -> Result<()> {
        let workers = self.workers.as_ref().expect("workers");
        let (k, raw, stored, packed) = workers
            .done
            .recv()
            .map_err(|_| worker_died(&self.ctx.path))??;
        self.in_flight -= 1;
        self.free.push(raw);
        self.finished.insert(k, (stored, packed));
        while let Some((stored, packed)) = self.finished.remove(&self.next_out) {
            self.emit(stored, packed)?;
        }
        Ok(())
    }

    /// Writes block `next_out`'s stored bytes and records its index entry.
    fn emit(&mut self, stored: Vec<u8>, packed: Packed) -> Result<()> {
        self.sink.write_all(&stored)?;
        if let Some(h) = &mut self.packed {
            h.update(&stored);
        }
        Entry {
            offset: self.offset,
            stored_len: stored.len() as u32,
            codec: packed.codec,
            checksum: packed.checksum,
        }
        .encode(&mut self.entries);
        self.offset += stored.len() as u64;
        if packed.codec == super::layout::Codec::Raw {
            self.raw_blocks += 1;
        }
        self.next_out += 1;
        self.free.push(stored);
        Ok(())
    }

    /// Packs what is left, writes the index and trailer, and returns the sink with a summary.
    pub fn finish(mut self) -> Result<(S, PackedSummary)> {
        if self.seen != self.ctx.data_len {
            return Err(PackedError::InputLength {
                path: self.ctx.path.clone(),
                expected: self.ctx.data_len,
                got: self.seen,
            }
            .into());
        }
        if !self.pending.is_empty() {
            self.submit()?;
        }
        while self.in_flight > 0 {
            self.collect_one()?;
        }
        let original = match (self.original.take(), &mut self.workers) {
            (Some(h), _) => h.finalize(),
            (None, Some(w)) => w
                .original_hash()
                .ok_or_else(|| worker_died(&self.ctx.path))?,
            (None, None) => return Err(worker_died(&self.ctx.path)),
        };
        let trailer = Trailer {
            index_offset: self.offset,
            block_count: self.next_out,
            index_checksum: xxhash_rust::xxh3::xxh3_64(&self.entries),
        };
        let trailer = trailer.encode();
        self.sink.write_all(&self.entries)?;
        self.sink.write_all(&trailer)?;
        let packed = self.packed.take().map(|mut h| {
            h.update(&self.entries);
            h.update(&trailer);
            h.finalize()
        });
        let summary = PackedSummary {
            original_len: self.prefix_len + self.ctx.data_len,
            original_blake3: original,
            packed_len: self.offset + (self.entries.len() + trailer.len()) as u64,
            packed_blake3: packed,
            blocks: self.next_out,
            raw_blocks: self.raw_blocks,
        };
        self.workers = None;
        let PackWriter { sink, .. } = self;
        Ok((sink, summary))
    }
}

fn worker_died(path: &Path) -> Error {
    PackedError::WorkerFailed {
        path: path.to_path_buf(),
    }
    .into()
}

/// Starts the hasher thread (holding `original`, the prefix already hashed) and `threads`
/// compression workers.
fn spawn(
    ctx: &Arc<Ctx>,
    level: i32,
    threads: usize,
    mut original: blake3::Hasher,
) -> Result<Workers> {
    let (jobs, hash_rx) = bounded::<Job>(threads);
    let (to_workers, job_rx) = bounded::<Job>(threads);
    let (done_tx, done) = bounded::<Result<Done>>(2 * threads + 1);
    let hasher = std::thread::spawn(move || {
        for job in hash_rx {
            original.update(&job.1);
            if to_workers.send(job).is_err() {
                break;
            }
        }
        original.finalize()
    });
    let mut handles = Vec::new();
    for _ in 0..threads {
        let mut enc = Encoder::new(level)?;
        let (rx, tx, ctx) = (job_rx.clone(), done_tx.clone(), Arc::clone(ctx));
        handles.push(std::thread::spawn(move || {
            for (k, raw, mut stored) in rx {
                let result = enc
                    .encode(&ctx, k, &raw, &mut stored)
                    .map(|p| (k, raw, stored, p));
                if tx.send(result).is_err() {
                    return;
                }
            }
        }));
    }
    Ok(Workers {
        jobs: Some(jobs),
        done,
        hasher: Some(hasher),
        handles,
    })
}

/// Packs the safetensors file `src` into `sink`. Returns the sink and what was packed.
pub fn pack_shard_into<S: ByteSink>(
    src: &Path,
    base: Option<Arc<Base>>,
    options: &PackOptions,
    sink: S,
) -> Result<(S, PackedSummary)> {
    let file = File::open(src).map_err(|e| Error::io(src, "opening", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(src, "reading file status", e))?
        .len();
    let h = header::read(src, &file, len)?;
    let mut prefix = vec![0u8; h.data_start() as usize];
    file.read_exact_at(&mut prefix, 0)
        .map_err(|e| Error::io(src, "reading header", e))?;
    let mut writer = PackWriter::new(src, &prefix, h.data_len, base, options, sink)?;
    let piece = options.block_size.max(1 << 20) as usize;
    let mut buf = vec![0u8; piece];
    let mut at = h.data_start();
    while at < len {
        let n = ((len - at) as usize).min(piece);
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| Error::io(src, "reading", e))?;
        writer.write(&buf[..n])?;
        at += n as u64;
    }
    writer.finish()
}

/// Packs the safetensors file `src` into the new file `dst` (written under a temporary name
/// beside it, renamed when complete).
pub fn pack_shard(
    src: &Path,
    dst: &Path,
    level: i32,
    base: Option<Arc<Base>>,
) -> Result<PackedSummary> {
    let options = PackOptions {
        level,
        ..PackOptions::default()
    };
    let dir = parent(dst);
    let file = super::sink::AtomicFile::create(&dir, dst)?;
    let (file, summary) = pack_shard_into(src, base, &options, file)?;
    file.persist()?;
    Ok(summary)
}

pub(crate) fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
