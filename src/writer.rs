//! One output file, written front to back at the disk's pace.
//!
//! Bytes are copied into 4096-byte-aligned staging buffers; a full buffer goes to the file's
//! hasher thread (blake3) and from there to its I/O threads, two writes in flight at their
//! offsets while the next buffers fill, so copying, hashing and the disk overlap, and the
//! pipeline's writer stage only copies — a run writing several outputs hashes them on as many
//! threads. Where the filesystem allows it the file is opened with `O_DIRECT`: the page cache
//! is bypassed (buffered writes plus fsync run at a fraction of the disk's speed, and fill
//! memory with dirty pages). The tail is padded to the alignment and the file truncated to its
//! true length at the end. A shard, whose length is known, is first allocated to it
//! (`StreamFile::preallocate`): the two writes then really overlap on ext4, and a disk too small
//! fails before the first byte. Buffered I/O is the fallback, with the same bytes. The file lives
//! under a temporary name until `StreamFile::persist` syncs it and renames it into place;
//! dropped before that, it is removed. This module knows nothing of safetensors or merging.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use tempfile::NamedTempFile;

use crate::busy::{Busy, Stage as BusyStage};
use crate::error::{Error, Result};
use crate::iobuf::IoBuf;

/// How output files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IoMode {
    /// Direct I/O where the filesystem supports it, buffered elsewhere.
    Auto,
    /// Direct I/O, or an error.
    Direct,
    /// Through the page cache.
    Buffered,
}

impl IoMode {
    /// Parses `auto`, `direct` or `buffered`.
    pub fn parse(text: &str) -> std::result::Result<IoMode, String> {
        match text {
            "auto" => Ok(IoMode::Auto),
            "direct" => Ok(IoMode::Direct),
            "buffered" => Ok(IoMode::Buffered),
            _ => Err(format!(
                "'{text}' is not an I/O mode (auto, direct, buffered)"
            )),
        }
    }
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoMode::Auto => "auto",
            IoMode::Direct => "direct",
            IoMode::Buffered => "buffered",
        })
    }
}

/// Direct I/O alignment of buffers, offsets and lengths (a page; covers 512 and 4096 sectors).
pub(crate) use crate::iobuf::ALIGN;
/// Size of one staging buffer, so of one direct write, where the memory budget allows.
/// Measured (`mergestream expo`, 1.8 GB pair, 2-core VM, virtio disk, 2026-11-26, six
/// interleaved cold runs each): with reads sharing the disk, 2 MiB writes ran in a median
/// 2.92 s against 3.09 s for 8 MiB and 3.01 s for 1 MiB (smaller writes let the readers'
/// requests in between). Writing alone, 8 MiB had been ~8% faster than 4 MiB.
pub const MAX_STAGE_BYTES: usize = 2 << 20;
/// The smallest staging buffer, for many outputs in a small `--memory`.
pub const MIN_STAGE_BYTES: usize = 64 << 10;
/// Staging buffers per file: one filling, the others with the hasher and I/O threads. Measured
/// (1.8 GB pair, warm, six alternating runs, 2026-11-26): a median 0.90 s with six against
/// 0.955 s with four, whose two writes in flight often waited for the hasher.
pub(crate) const STAGES: usize = 6;
/// Writes of one file in flight at once, each on an I/O thread of its own: with one, a busy CPU
/// that delays the next write's submission leaves the disk idle. Measured (1.8 GB pair, warm,
/// ten alternating runs, 2026-11-26): a median 0.92 s against 0.98 s with one; cold, alike.
pub const WRITES_IN_FLIGHT: usize = 2;

/// Memory one output file's staging buffers take while it is written, with buffers of
/// `stage_bytes`.
pub fn staging_bytes(stage_bytes: usize) -> u64 {
    (STAGES * (stage_bytes + ALIGN)) as u64
}

/// The staging buffer size for `files` output files written at once out of `budget` bytes:
/// the largest power of two from [`MAX_STAGE_BYTES`] down to [`MIN_STAGE_BYTES`] whose staging
/// takes at most a quarter of the budget (the rest is for the pipeline's chunks), else the
/// smallest.
pub fn stage_bytes_for(budget: u64, files: usize) -> usize {
    let mut stage = MAX_STAGE_BYTES;
    while stage > MIN_STAGE_BYTES && staging_bytes(stage) * files as u64 > budget / 4 {
        stage /= 2;
    }
    stage
}

/// A staging buffer: an [`IoBuf`] (on a huge page where it holds one, so that a full buffer's
/// direct write is one disk request) and how much of it is filled.
struct Stage {
    buf: IoBuf,
    /// Bytes to write (the data, padded for direct I/O at the end of the file).
    len: usize,
    /// Bytes of the file's data (what is hashed).
    data: usize,
}

impl Stage {
    fn new(capacity: usize) -> Stage {
        Stage {
            buf: IoBuf::new(capacity),
            len: 0,
            data: 0,
        }
    }
    fn filled(&self) -> &[u8] {
        &self.buf.as_slice()[..self.len]
    }
    fn data(&self) -> &[u8] {
        &self.buf.as_slice()[..self.data]
    }
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut_slice()[self.len..]
    }
    /// Zero-pads the contents to the alignment (for the last write of a direct file).
    fn pad(&mut self) {
        let padded = self.len.div_ceil(ALIGN) * ALIGN;
        self.buf.as_mut_slice()[self.len..padded].fill(0);
        self.len = padded;
    }
}

/// Hashes staging buffers in order, then writes them at their offsets: a hasher thread and
/// [`WRITES_IN_FLIGHT`] writer threads, so that hashing one buffer overlaps writing the ones
/// before.
struct IoThread {
    jobs: Option<Sender<(Stage, u64)>>,
    done: Receiver<io::Result<Stage>>,
    hasher: Option<JoinHandle<blake3::Hash>>,
    writers: Vec<JoinHandle<()>>,
    in_flight: usize,
}

impl IoThread {
    fn spawn(file: Arc<File>, busy: Option<Arc<Busy>>) -> IoThread {
        let io_busy = busy.clone();
        let (jobs, hash_rx) = bounded::<(Stage, u64)>(STAGES);
        let (hashed_tx, rx) = bounded::<(Stage, u64)>(STAGES);
        let (tx, done) = bounded::<io::Result<Stage>>(STAGES);
        let hasher = std::thread::spawn(move || {
            let mut hasher = blake3::Hasher::new();
            for (stage, offset) in hash_rx {
                let started = Instant::now();
                hasher.update(stage.data());
                if let Some(b) = &busy {
                    b.add(BusyStage::Hash, started.elapsed());
                }
                if hashed_tx.send((stage, offset)).is_err() {
                    break;
                }
            }
            hasher.finalize()
        });
        let writers = (0..WRITES_IN_FLIGHT)
            .map(|_| {
                let (file, rx, tx, busy) = (Arc::clone(&file), rx.clone(), tx.clone(), io_busy.clone());
                std::thread::spawn(move || {
                    for (mut stage, offset) in rx {
                        let started = Instant::now();
                        let mut result = file.write_all_at(stage.filled(), offset);
                        if matches!(&result, Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()))
                            && direct_io_dropped(&file)
                        {
                            // Some filesystems accept O_DIRECT at open and refuse it at write time.
                            result = file.write_all_at(stage.filled(), offset);
                        }
                        if let Some(b) = &busy {
                            b.add(BusyStage::Io, started.elapsed());
                        }
                        let result = result.map(|()| {
                            stage.len = 0;
                            stage.data = 0;
                            stage
                        });
                        if tx.send(result).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        IoThread {
            jobs: Some(jobs),
            done,
            hasher: Some(hasher),
            writers,
            in_flight: 0,
        }
    }

    /// The blake3 of everything submitted, once every buffer has been reclaimed.
    fn finish_hash(&mut self) -> blake3::Hash {
        self.jobs = None;
        self.hasher
            .take()
            .expect("finished once")
            .join()
            .expect("the hasher thread does not panic")
    }

    fn submit(&mut self, stage: Stage, offset: u64) {
        self.jobs
            .as_ref()
            .expect("open until drop")
            .send((stage, offset))
            .expect("the I/O thread lives as long as this handle");
        self.in_flight += 1;
    }

    /// Waits for one submitted buffer to be written, and returns it.
    fn reclaim(&mut self) -> io::Result<Stage> {
        let result = self.done.recv().expect("the I/O thread answers every job");
        self.in_flight -= 1;
        result
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.jobs = None;
        while self.in_flight > 0 && self.done.recv().is_ok() {
            self.in_flight -= 1;
        }
        if let Some(h) = self.hasher.take() {
            let _ = h.join();
        }
        for h in self.writers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Turns direct I/O off for `file` if it is on; tells whether it is off now (another writer
/// thread of the file may have turned it off first).
fn direct_io_dropped(file: &File) -> bool {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    match fcntl_getfl(file) {
        Ok(flags) if flags.contains(OFlags::DIRECT) => {
            fcntl_setfl(file, flags - OFlags::DIRECT).is_ok()
        }
        Ok(_) => true,
        Err(_) => false,
    }
}

/// An output file being written under a temporary name.
pub(crate) struct StreamFile {
    final_path: PathBuf,
    temp: NamedTempFile<Arc<File>>,
    direct: bool,
    io: IoThread,
    free: Vec<Stage>,
    current: Stage,
    /// Bytes accepted so far (the file's length when done).
    len: u64,
    /// Bytes handed to the I/O thread so far.
    submitted: u64,
    /// Whether [`StreamFile::preallocate`] set the file's length ahead of its bytes.
    preallocated: bool,
    busy: Option<Arc<Busy>>,
}

/// What a finished file is.
#[derive(Debug, Clone)]
pub(crate) struct Written {
    /// Its length.
    pub size: u64,
    /// blake3 of its bytes, computed as they were written.
    pub blake3: blake3::Hash,
}

impl StreamFile {
    /// Creates a temporary file in `temp_dir` that will become `final_path`, written through
    /// staging buffers of `stage_bytes` (a multiple of [`ALIGN`]).
    pub fn create(
        temp_dir: &Path,
        prefix: &str,
        final_path: &Path,
        mode: IoMode,
        stage_bytes: usize,
        busy: Option<Arc<Busy>>,
    ) -> Result<StreamFile> {
        let stage_bytes = stage_bytes.next_multiple_of(ALIGN).max(ALIGN);
        let open = |direct: bool| {
            tempfile::Builder::new()
                .prefix(prefix)
                .suffix(".tmp")
                .make_in(temp_dir, |path| {
                    let mut options = OpenOptions::new();
                    options.write(true).create_new(true).mode(0o666);
                    if direct {
                        options.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
                    }
                    options.open(path).map(Arc::new)
                })
        };
        let (temp, direct) = match mode {
            IoMode::Buffered => (open(false), false),
            IoMode::Direct => (open(true), true),
            IoMode::Auto => match open(true) {
                Ok(t) => (Ok(t), true),
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                    (open(false), false)
                }
                Err(e) => (Err(e), true),
            },
        };
        let temp = temp.map_err(|e| {
            let what = if direct && mode == IoMode::Direct {
                "creating (with --io direct; this filesystem may not support direct I/O)"
            } else {
                "creating temporary file"
            };
            Error::io(final_path, what, e)
        })?;
        let io = IoThread::spawn(Arc::clone(temp.as_file()), busy.clone());
        Ok(StreamFile {
            final_path: final_path.to_path_buf(),
            temp,
            direct,
            io,
            free: (1..STAGES).map(|_| Stage::new(stage_bytes)).collect(),
            current: Stage::new(stage_bytes),
            len: 0,
            submitted: 0,
            preallocated: false,
            busy,
        })
    }

    /// Allocates the file's blocks for `len` bytes (padded to [`ALIGN`] for direct I/O) and sets
    /// its length, before any byte is written:
    /// - a disk too small fails here, before a byte is written, not after most of a large
    ///   shard;
    /// - two direct writes can really be in flight: ext4 serializes direct writes that extend
    ///   a file or fill a hole (each holds the inode lock until its I/O completes), and not
    ///   writes into allocated blocks. Measured (1.8 GB pair, warm, two series of eight
    ///   alternating runs, 2026-11-26): medians of 0.925 s against 0.99 s and 0.91 s against
    ///   0.935 s, with a quarter of the spread; a bare two-thread writer took as long as a
    ///   one-thread one without it.
    ///
    /// A filesystem without `fallocate` is written as before. `persist` cuts the file to the
    /// length written.
    pub fn preallocate(&mut self, len: u64) -> Result<()> {
        let len = if self.direct {
            len.next_multiple_of(ALIGN as u64)
        } else {
            len
        };
        if len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(
            &**self.temp.as_file(),
            rustix::fs::FallocateFlags::empty(),
            0,
            len,
        ) {
            Ok(()) => {
                self.preallocated = true;
                Ok(())
            }
            Err(e) if e == rustix::io::Errno::NOSPC || e == rustix::io::Errno::DQUOT => Err(
                Error::io(&self.final_path, "reserving disk space", e.into()),
            ),
            // Not supported here (EOPNOTSUPP, ENOSYS, EINVAL, ...): written as before.
            Err(_) => Ok(()),
        }
    }

    /// Whether the file is written with direct I/O.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends `bytes`.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.len += bytes.len() as u64;
        while !bytes.is_empty() {
            let spare = self.current.spare();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.current.len += n;
            self.current.data += n;
            bytes = &bytes[n..];
            if self.current.len == self.current.buf.len() {
                self.submit_current()?;
            }
        }
        Ok(())
    }

    /// Appends `len` bytes that `fill` computes straight into the staging buffers (see
    /// [`crate::pipeline::ShardSink::write_with`]): `fill(at, dst)` is given whole `unit`s, the
    /// room left in the filling buffer or what is left to write; a unit that straddles two
    /// buffers is computed into a word and copied.
    pub fn write_with(
        &mut self,
        len: usize,
        unit: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        assert!(
            (1..=8).contains(&unit) && len.is_multiple_of(unit),
            "write_with: {len} bytes in units of {unit}"
        );
        let mut at = 0;
        while at < len {
            // The filling buffer always has room: a full one is submitted at once.
            let room = self.current.buf.len() - self.current.len;
            let whole = room.min(len - at) / unit * unit;
            if whole == 0 {
                let mut word = [0u8; 8];
                fill(at, &mut word[..unit]);
                self.write(&word[..unit])?;
                at += unit;
                continue;
            }
            fill(at, &mut self.current.spare()[..whole]);
            self.current.len += whole;
            self.current.data += whole;
            self.len += whole as u64;
            at += whole;
            if self.current.len == self.current.buf.len() {
                self.submit_current()?;
            }
        }
        Ok(())
    }

    fn submit_current(&mut self) -> Result<()> {
        let next = match self.free.pop() {
            Some(stage) => stage,
            None => self.reclaim()?,
        };
        let full = std::mem::replace(&mut self.current, next);
        let offset = self.submitted;
        self.submitted += full.len as u64;
        self.io.submit(full, offset);
        Ok(())
    }

    fn reclaim(&mut self) -> Result<Stage> {
        self.io
            .reclaim()
            .map_err(|e| Error::io(&self.final_path, "writing", e))
    }

    /// Writes what is left, syncs, and renames the file to its final name.
    pub fn persist(mut self) -> Result<Written> {
        if self.current.len > 0 {
            if self.direct {
                self.current.pad();
            }
            self.submit_current()?;
        }
        while self.io.in_flight > 0 {
            let stage = self.reclaim()?;
            self.free.push(stage);
        }
        let file = self.temp.as_file();
        let path = &self.final_path;
        if self.direct || self.preallocated {
            rustix::fs::ftruncate(&**file, self.len)
                .map_err(|e| Error::io(path, "truncating padding", e.into()))?;
        }
        let started = Instant::now();
        file.sync_all().map_err(|e| Error::io(path, "syncing", e))?;
        if let Some(b) = &self.busy {
            b.add(BusyStage::Io, started.elapsed());
        }
        let (size, blake3) = (self.len, self.io.finish_hash());
        drop(self.io);
        self.temp
            .persist(path)
            .map_err(|e| Error::io(path, "renaming into place", e.error))?;
        let dir = path.parent().expect("output files live in a directory");
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, "syncing directory", e))?;
        Ok(Written { size, blake3 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file allocated ahead of its bytes ends at the length written, with those bytes, in
    /// every I/O mode, whether the allocation was larger, exact or absent.
    #[test]
    fn a_preallocated_file_ends_where_its_bytes_end() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3 * ALIGN as u32 + 77).map(|i| (i * 7) as u8).collect();
        let len = bytes.len() as u64;
        for mode in [IoMode::Auto, IoMode::Buffered] {
            for reserve in [None, Some(len), Some(len + 5 * ALIGN as u64)] {
                let path = dir.path().join(format!("out-{mode}-{reserve:?}"));
                let mut file =
                    StreamFile::create(dir.path(), "t.", &path, mode, ALIGN, None).unwrap();
                if let Some(n) = reserve {
                    file.preallocate(n).unwrap();
                }
                file.write(&bytes).unwrap();
                let written = file.persist().unwrap();
                assert_eq!(written.size, len);
                assert_eq!(written.blake3, blake3::hash(&bytes));
                assert_eq!(std::fs::read(&path).unwrap(), bytes, "{mode} {reserve:?}");
            }
        }
    }

    /// Bytes computed in place are the bytes written, whatever the unit and wherever the staging
    /// buffers' edges cut it: at the edge, a unit is computed whole and split across the two.
    #[test]
    fn bytes_computed_into_the_staging_buffers_are_the_bytes_written() {
        let dir = tempfile::tempdir().unwrap();
        // Byte `i` of the whole file.
        let byte = |i: usize| (i * 31 + i / 7) as u8;
        for mode in [IoMode::Auto, IoMode::Buffered] {
            for (unit, lead) in [(2, 3), (4, 1), (8, 5), (8, 0), (1, 2)] {
                let path = dir.path().join(format!("out-{mode}-{unit}-{lead}"));
                let mut file =
                    StreamFile::create(dir.path(), "t.", &path, mode, ALIGN, None).unwrap();
                // An odd start, so that units straddle the 4096-byte buffers' edges.
                let lead_bytes: Vec<u8> = (0..lead).map(byte).collect();
                file.write(&lead_bytes).unwrap();
                let mut at = lead;
                let mut calls = Vec::new();
                for units in [1, 700, 3 * ALIGN, 5] {
                    let len = units * unit;
                    file.write_with(len, unit, &mut |from, dst| {
                        assert!(from.is_multiple_of(unit) && dst.len().is_multiple_of(unit));
                        assert!(from + dst.len() <= len);
                        calls.push((units, dst.len()));
                        for (k, b) in dst.iter_mut().enumerate() {
                            *b = byte(at + from + k);
                        }
                    })
                    .unwrap();
                    at += len;
                }
                let expected: Vec<u8> = (0..at).map(byte).collect();
                let written = file.persist().unwrap();
                assert_eq!(written.size, at as u64);
                assert_eq!(written.blake3, blake3::hash(&expected));
                assert_eq!(
                    std::fs::read(&path).unwrap(),
                    expected,
                    "{mode} {unit} {lead}"
                );
                // A long write crosses buffer edges: with an odd start, a lone unit there.
                let straddles = calls.iter().filter(|&&c| c == (3 * ALIGN, unit)).count();
                assert_eq!(straddles > 0, lead % unit != 0, "{unit} {lead}: {calls:?}");
            }
        }
    }

    #[test]
    fn staging_takes_at_most_a_quarter_of_the_budget_down_to_the_smallest_buffers() {
        const MIB: u64 = 1 << 20;
        // The default budget (256 MiB less the reserve): full size for one output, half for
        // each of a 5-output sweep.
        assert_eq!(stage_bytes_for(224 * MIB, 1), MAX_STAGE_BYTES);
        assert_eq!(stage_bytes_for(224 * MIB, 5), 1 << 20);
        // --memory 64MiB (a 32 MiB budget): 1 MiB buffers, 256 KiB for a 5-output sweep.
        assert_eq!(stage_bytes_for(32 * MIB, 1), 1 << 20);
        assert_eq!(stage_bytes_for(32 * MIB, 5), 256 << 10);
        for (budget, files) in [(32 * MIB, 5), (16 * MIB, 2), (224 * MIB, 8), (8 * MIB, 1)] {
            let stage = stage_bytes_for(budget, files);
            assert!(stage.is_power_of_two() && stage.is_multiple_of(ALIGN));
            assert!(staging_bytes(stage) * files as u64 <= budget / 4);
        }
        // Too little for even the smallest: the smallest, refused later by the budget check.
        assert_eq!(stage_bytes_for(MIB, 4), MIN_STAGE_BYTES);
    }
}
