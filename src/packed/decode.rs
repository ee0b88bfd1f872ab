//! The decoder: [`PackedShard`], a validated packed shard read with random access, the
//! per-caller [`BlockCache`], and [`unpack_shard`], which restores the original file.
//!
//! [`PackedShard::open`] checks everything but the blocks themselves before returning: magic,
//! version, preamble, header checksum, the safetensors header (with `format::header`'s rules),
//! trailer, index checksum and every index entry, and the base's identity and tensors. Blocks
//! are checked as they are decoded (frame integrity, decoded length, xxh3 of the original
//! bytes). A `PackedShard` is `Sync`: any number of threads read it at once with `pread`, each
//! with its own [`BlockCache`] (which owns the zstd context and scratch space), so nothing is
//! locked on the read path.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::bounded;

use super::base::{hex, Base};
use super::block::{Ctx, Decoder};
use super::error::PackedError;
use super::layout::{self, Entry, Preamble, Trailer, PREAMBLE_LEN, TRAILER_LEN};
use super::sink::ByteSink;
use crate::error::{Error, InputChange, Result};
use crate::format::header::{Header, MAX_HEADER_LEN};

/// Positioned reads from the bytes of a packed shard: a file, or memory (tests, fuzzing).
pub trait ReadAt: Send + Sync {
    /// Fills `buf` with the bytes at `offset`, or errs (`UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|at| self.get(at..)?.get(..buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Distinguishes shards in caches shared between them.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// An open, validated packed shard.
pub struct PackedShard {
    id: u64,
    source: Box<dyn ReadAt>,
    /// The file opened, and its status then (none for packed bytes in memory).
    file: Option<(File, std::fs::Metadata)>,
    len: u64,
    preamble: Preamble,
    header: Header,
    prefix: Vec<u8>,
    entries: Vec<Entry>,
    ctx: Ctx,
}

impl std::fmt::Debug for PackedShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedShard")
            .field("path", &self.ctx.path)
            .field("len", &self.len)
            .field("blocks", &self.entries.len())
            .finish()
    }
}

impl PackedShard {
    /// Opens and validates the packed shard at `path`. A shard packed against a base needs
    /// that base (by identity); `base` is ignored for a shard packed without one.
    pub fn open(path: &Path, base: Option<Arc<Base>>) -> Result<PackedShard> {
        // Look before opening: opening a FIFO would block.
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io(path, "opening packed shard", e))?;
        if !meta.is_file() {
            return Err(PackedError::NotRegular {
                path: path.to_path_buf(),
            }
            .into());
        }
        let file = File::open(path).map_err(|e| Error::io(path, "opening packed shard", e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(path, "reading file status", e))?;
        if !meta.is_file() {
            return Err(PackedError::NotRegular {
                path: path.to_path_buf(),
            }
            .into());
        }
        let len = meta.len();
        let held = file
            .try_clone()
            .map_err(|e| Error::io(path, "opening packed shard", e))?;
        let mut shard = PackedShard::from_source(path, Box::new(file), len, base)?;
        shard.file = Some((held, meta));
        Ok(shard)
    }

    /// Errs if the packed file was truncated, extended or rewritten since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let Some((file, then)) = &self.file else {
            return Ok(());
        };
        let now = file
            .metadata()
            .map_err(|e| Error::io(&self.ctx.path, "reading file status", e))?;
        let change = if now.len() != then.len() {
            Some(InputChange::Length {
                from: then.len(),
                to: now.len(),
            })
        } else if now.ino() != then.ino()
            || now.dev() != then.dev()
            || now.mtime() != then.mtime()
            || now.mtime_nsec() != then.mtime_nsec()
        {
            Some(InputChange::Modified)
        } else {
            None
        };
        match change {
            Some(change) => Err(Error::InputChanged {
                path: self.ctx.path.clone(),
                change,
            }),
            None => Ok(()),
        }
    }

    /// Checks the packed shard at `path` as [`PackedShard::open`] does — everything but the
    /// blocks — without its base, and returns the original safetensors header. For checking
    /// a packed directory's structure; a shard packed against a base can only be *read* with it.
    pub fn check_structure(path: &Path) -> Result<Header> {
        let meta =
            std::fs::metadata(path).map_err(|e| Error::io(path, "opening packed shard", e))?;
        if !meta.is_file() {
            return Err(PackedError::NotRegular {
                path: path.to_path_buf(),
            }
            .into());
        }
        let file = File::open(path).map_err(|e| Error::io(path, "opening packed shard", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(path, "reading file status", e))?
            .len();
        let shard = PackedShard::validate(path, Box::new(file), len, None, false)?;
        Ok(shard.header)
    }

    /// Opens packed bytes held by `source` (`len` bytes long), naming `path` in errors.
    pub fn from_source(
        path: &Path,
        source: Box<dyn ReadAt>,
        len: u64,
        base: Option<Arc<Base>>,
    ) -> Result<PackedShard> {
        PackedShard::validate(path, source, len, base, true)
    }

    /// Opens packed bytes as [`PackedShard::from_source`] does, but a shard packed against a
    /// base opens without it: its header and structure are checked and readable, and reading
    /// its data is [`PackedError::MissingBase`] until [`PackedShard::set_base`] gives it one
    /// ([`PackedShard::missing_base`] tells which).
    pub fn from_source_without_base(
        path: &Path,
        source: Box<dyn ReadAt>,
        len: u64,
    ) -> Result<PackedShard> {
        PackedShard::validate(path, source, len, None, false)
    }

    /// The identity of the base this shard was packed against, if it needs one it was not
    /// given.
    pub fn missing_base(&self) -> Option<[u8; 32]> {
        (self.preamble.has_base() && self.ctx.base.is_none()).then_some(self.preamble.base_id)
    }

    /// Gives a shard opened without its base ([`PackedShard::from_source_without_base`]) the
    /// base: it must be the one recorded, holding every tensor with the same dtype and shape.
    pub fn set_base(&mut self, base: Arc<Base>) -> Result<()> {
        base.check_id(&self.ctx.path, &self.preamble.base_id)?;
        let locs = base.locate(&self.ctx.path, &self.header.tensors)?;
        self.ctx.base = Some((base, locs));
        Ok(())
    }

    /// The base this shard is XORed with, if any.
    pub fn base(&self) -> Option<&Arc<Base>> {
        self.ctx.base.as_ref().map(|(b, _)| b)
    }

    /// [`PackedShard::from_source`]; without `need_base`, a shard packed against a base opens
    /// without it (see [`PackedShard::from_source_without_base`]).
    fn validate(
        path: &Path,
        source: Box<dyn ReadAt>,
        len: u64,
        base: Option<Arc<Base>>,
        need_base: bool,
    ) -> Result<PackedShard> {
        let read = |buf: &mut [u8], at: u64, what: &'static str| {
            source
                .read_exact_at(buf, at)
                .map_err(|e| Error::io(path, what, e))
        };
        let truncated = |what, needed| PackedError::Truncated {
            path: path.to_path_buf(),
            what,
            needed,
            len,
        };
        if len < 8 {
            return Err(truncated("the magic number", 8).into());
        }
        let mut magic = [0u8; 8];
        read(&mut magic, 0, "reading magic number")?;
        if magic != layout::MAGIC {
            return Err(PackedError::NotPacked {
                path: path.to_path_buf(),
            }
            .into());
        }
        if len < PREAMBLE_LEN as u64 {
            return Err(truncated("the preamble", PREAMBLE_LEN as u64).into());
        }
        let mut fixed = [0u8; PREAMBLE_LEN];
        read(&mut fixed, 0, "reading preamble")?;
        let (preamble, header_sum) = Preamble::parse(path, &fixed)?;
        let prefix_len = preamble.prefix_len;
        if !(8..=8 + MAX_HEADER_LEN).contains(&prefix_len) {
            return Err(PackedError::CorruptPreamble {
                path: path.to_path_buf(),
                problem: super::error::PreambleProblem::PrefixRange(prefix_len),
            }
            .into());
        }
        let needed = preamble.frames_start() + TRAILER_LEN as u64;
        if len < needed {
            return Err(truncated("the safetensors header and trailer", needed).into());
        }
        let mut prefix = vec![0u8; prefix_len as usize];
        read(
            &mut prefix,
            PREAMBLE_LEN as u64,
            "reading safetensors header",
        )?;
        layout::check_header_checksum(path, &preamble, header_sum, &prefix)?;
        let header = super::parse_prefix(path, &prefix, preamble.data_len)?;

        let mut tail = [0u8; TRAILER_LEN];
        read(&mut tail, len - TRAILER_LEN as u64, "reading trailer")?;
        let trailer = Trailer::parse(path, &tail, &preamble, len)?;
        let mut index = vec![0u8; (len - TRAILER_LEN as u64 - trailer.index_offset) as usize];
        read(&mut index, trailer.index_offset, "reading block index")?;
        let entries = layout::parse_index(path, &index, &preamble, &trailer)?;

        let base = if preamble.has_base() && (need_base || base.is_some()) {
            let Some(base) = base else {
                return Err(PackedError::MissingBase {
                    path: path.to_path_buf(),
                    expected: hex(&preamble.base_id),
                }
                .into());
            };
            base.check_id(path, &preamble.base_id)?;
            let locs = base.locate(path, &header.tensors)?;
            Some((base, locs))
        } else {
            None
        };
        let ctx = Ctx {
            path: path.to_path_buf(),
            tensors: header.tensors.clone(),
            base,
            block_size: preamble.block_size,
            data_len: preamble.data_len,
        };
        Ok(PackedShard {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            source,
            file: None,
            len,
            preamble,
            header,
            prefix,
            entries,
            ctx,
        })
    }

    /// The original safetensors header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The original file's first bytes: the 8-byte length and the header JSON, verbatim.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// Length of the original file.
    pub fn original_len(&self) -> u64 {
        self.header.file_len()
    }

    /// Length of the packed file.
    pub fn packed_len(&self) -> u64 {
        self.len
    }

    /// Bytes of original data per block (the last block may be shorter).
    pub fn block_size(&self) -> u32 {
        self.preamble.block_size
    }

    /// The longest block's length: the most one decoded block occupies.
    pub fn max_block_bytes(&self) -> u64 {
        u64::from(self.preamble.block_size).min(self.preamble.data_len.max(1))
    }

    /// Blocks the data section is stored in.
    pub fn block_count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// The base identity recorded, if the shard was packed against one.
    pub fn base_id(&self) -> Option<[u8; 32]> {
        self.preamble.has_base().then_some(self.preamble.base_id)
    }

    /// The packed file, as named when opened.
    pub fn path(&self) -> &Path {
        &self.ctx.path
    }

    /// Errs unless the shard has the base it needs, if any.
    fn check_base(&self) -> Result<()> {
        match self.missing_base() {
            Some(id) => Err(PackedError::MissingBase {
                path: self.ctx.path.clone(),
                expected: hex(&id),
            }
            .into()),
            None => Ok(()),
        }
    }

    /// Decodes block `k` into `out` (exactly its original length).
    fn decode(
        &self,
        k: u64,
        out: &mut [u8],
        dec: &mut Decoder,
        stored: &mut Vec<u8>,
    ) -> Result<()> {
        self.check_base()?;
        let entry = &self.entries[k as usize];
        stored.resize(entry.stored_len as usize, 0);
        self.source
            .read_exact_at(stored, entry.offset)
            .map_err(|e| Error::io(&self.ctx.path, "reading block", e))?;
        dec.decode(&self.ctx, k, entry, stored, out)
    }

    /// Fills `buf` with the original data section's bytes from `data_offset` on (offsets as
    /// the header's `data_offsets` give them). Blocks come from `cache` when it holds them;
    /// a block `buf` covers whole is decoded straight into `buf`, bypassing the cache.
    pub fn read_at(&self, data_offset: u64, buf: &mut [u8], cache: &mut BlockCache) -> Result<()> {
        let end = data_offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.preamble.data_len) {
            return Err(PackedError::OutOfRange {
                path: self.ctx.path.clone(),
                offset: data_offset,
                len: buf.len() as u64,
                data_len: self.preamble.data_len,
            }
            .into());
        }
        let bs = u64::from(self.preamble.block_size);
        let mut at = data_offset;
        let mut out = &mut buf[..];
        while !out.is_empty() {
            let k = at / bs;
            let within = (at % bs) as usize;
            let raw = self.ctx.raw_len(k);
            let n = (raw - within).min(out.len());
            let (now, rest) = out.split_at_mut(n);
            if within == 0 && n == raw && !cache.holds(self.id, k) {
                cache.decoded += 1;
                self.decode(k, now, &mut cache.decoder, &mut cache.stored)?;
            } else {
                let block = cache.block(self, k)?;
                now.copy_from_slice(&block[within..within + n]);
            }
            out = rest;
            at += n as u64;
        }
        Ok(())
    }

    /// Writes the original file (prefix, then data) to `sink`, decoding on `threads` threads.
    pub fn unpack_into<S: ByteSink>(&self, sink: &mut S, threads: usize) -> Result<()> {
        self.check_base()?;
        sink.write_all(&self.prefix)?;
        let count = self.block_count();
        let threads = threads.max(1).min(count.max(1) as usize);
        if threads == 1 {
            let mut dec = Decoder::new()?;
            let (mut stored, mut out) = (Vec::new(), Vec::new());
            for k in 0..count {
                out.resize(self.ctx.raw_len(k), 0);
                self.decode(k, &mut out, &mut dec, &mut stored)?;
                sink.write_all(&out)?;
            }
            return Ok(());
        }
        // Workers take a free buffer, then claim the next block, so the block the writer waits
        // for always holds a buffer: no deadlock, and at most `buffers` blocks in memory.
        let buffers = 2 * threads + 1;
        let (free_tx, free_rx) = bounded::<Vec<u8>>(buffers);
        for _ in 0..buffers {
            free_tx.send(Vec::new()).expect("room for every buffer");
        }
        let (done_tx, done_rx) = bounded::<Result<(u64, Vec<u8>)>>(buffers);
        let next = AtomicU64::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (free_rx, done_tx, next, stop) =
                    (free_rx.clone(), done_tx.clone(), &next, &stop);
                scope.spawn(move || {
                    let mut dec = match Decoder::new() {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = done_tx.send(Err(e));
                            return;
                        }
                    };
                    let mut stored = Vec::new();
                    while let Ok(mut buf) = free_rx.recv() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= count {
                            return;
                        }
                        buf.resize(self.ctx.raw_len(k), 0);
                        let r = self
                            .decode(k, &mut buf, &mut dec, &mut stored)
                            .map(|()| (k, buf));
                        if done_tx.send(r).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(done_tx);
            let mut pending = std::collections::BTreeMap::new();
            let mut want = 0;
            let result = (|| {
                while want < count {
                    let (k, buf) = done_rx.recv().map_err(|_| PackedError::WorkerFailed {
                        path: self.ctx.path.clone(),
                    })??;
                    pending.insert(k, buf);
                    while let Some(buf) = pending.remove(&want) {
                        sink.write_all(&buf)?;
                        want += 1;
                        let _ = free_tx.send(buf);
                    }
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            drop(free_tx);
            // Let workers blocked on sending finish.
            while done_rx.recv().is_ok() {}
            result
        })
    }
}

/// Generous bound of a zstd decompression context's memory (about 160 KiB measured; decoding a
/// whole frame into a buffer of its size needs no window of its own).
const ZSTD_CONTEXT_BYTES: u64 = 256 << 10;

/// A caller's decoded blocks, most recently used first, and its decoding state. Holds at most
/// `capacity` blocks, so its memory is at most about `(capacity + 3) × block size` (the blocks,
/// and scratch for one stored, one transformed and one base block) whatever is read.
pub struct BlockCache {
    capacity: usize,
    blocks: Vec<(u64, u64, Vec<u8>)>,
    decoder: Decoder,
    stored: Vec<u8>,
    decoded: u64,
}

impl BlockCache {
    /// A cache holding up to `capacity` decoded blocks (at least one). Sequential reads need
    /// one; two help readers that alternate between two places.
    pub fn new(capacity: usize) -> Result<BlockCache> {
        Ok(BlockCache {
            capacity: capacity.max(1),
            blocks: Vec::new(),
            decoder: Decoder::new()?,
            stored: Vec::new(),
            decoded: 0,
        })
    }

    /// Upper bound of the memory of a `BlockCache::new(capacity)` reading shards whose blocks
    /// are at most `block_bytes` long: the blocks, the three scratch buffers and the zstd
    /// context.
    pub fn bytes(capacity: usize, block_bytes: u64) -> u64 {
        (capacity.max(1) as u64 + 3) * block_bytes + ZSTD_CONTEXT_BYTES
    }

    /// Blocks decoded through this cache so far (sequential reads decode each block once).
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    fn holds(&self, shard: u64, k: u64) -> bool {
        self.blocks.iter().any(|(s, b, _)| *s == shard && *b == k)
    }

    fn block(&mut self, shard: &PackedShard, k: u64) -> Result<&[u8]> {
        if let Some(i) = self
            .blocks
            .iter()
            .position(|(s, b, _)| *s == shard.id && *b == k)
        {
            let hit = self.blocks.remove(i);
            self.blocks.insert(0, hit);
        } else {
            let mut buf = if self.blocks.len() >= self.capacity {
                self.blocks.pop().map(|(_, _, b)| b).unwrap_or_default()
            } else {
                Vec::new()
            };
            buf.resize(shard.ctx.raw_len(k), 0);
            self.decoded += 1;
            shard.decode(k, &mut buf, &mut self.decoder, &mut self.stored)?;
            self.blocks.insert(0, (shard.id, k, buf));
        }
        Ok(&self.blocks[0].2)
    }
}

/// Restores the original safetensors file of the packed shard `src` as the new file `dst`
/// (written under a temporary name beside it, renamed when complete). Returns its blake3.
pub fn unpack_shard(
    src: &Path,
    dst: &Path,
    base: Option<Arc<Base>>,
    threads: usize,
) -> Result<blake3::Hash> {
    let shard = PackedShard::open(src, base)?;
    let dir: PathBuf = super::encode::parent(dst);
    let mut file = super::sink::AtomicFile::create(&dir, dst)?;
    shard.unpack_into(&mut file, threads)?;
    Ok(file.persist()?.blake3)
}
