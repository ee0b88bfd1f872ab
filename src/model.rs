//! Input models: a Hugging Face model directory (sharded with an index, or one
//! `model.safetensors`) or a single `.safetensors` file.
//!
//! Opening a model opens every shard, validates every header and cross-checks the index against
//! the shards, so that a model that opens is one whose every tensor can be read at a known
//! offset. The open file handles are kept: the run reads the very files that were validated even
//! if their paths are replaced meanwhile, and [`Shard::check_unchanged`] tells whether one was
//! modified underneath. This module reads no tensor data.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, IndexError, InputChange, ModelError, Result};
use crate::format::header::{self, Header, TensorInfo};
use crate::format::index::{self, INDEX_FILE, MAX_INDEX_LEN};

/// The single-file name in a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One weight file of a model.
///
/// Whatever its format, a shard presents its tensors as byte ranges of one *data space* and
/// reads any range of it with [`Shard::read_at`]; nothing above this module knows the format.
#[derive(Debug)]
pub struct Shard {
    /// Path as the user's directory names it (symlinks not resolved, so errors read naturally).
    pub path: PathBuf,
    /// File name, as the index names it.
    pub name: String,
    /// The open file: the run reads the file that was validated, whatever its path does later.
    pub file: File,
    /// Tensors ordered by their position in the data space (`start`/`end` are offsets in it).
    pub tensors: Vec<TensorInfo>,
    /// Length of the data space.
    pub data_len: u64,
    /// blake3 of the shard's metadata (a safetensors header's JSON), identifying its layout.
    pub digest: [u8; 32],
    /// The safetensors header, for shards that are safetensors files.
    pub header: Option<Header>,
    /// File offset of the data space, for formats that store it as plain bytes.
    data_start: u64,
    /// The same open file with `O_DIRECT`, once [`Model::use_direct_reads`] made it.
    direct: Option<File>,
    /// Set when the filesystem refused a direct read: reads go through the page cache.
    direct_refused: AtomicBool,
    identity: Identity,
}

/// Alignment of direct reads: a page, which covers 512- and 4096-byte sectors.
pub const READ_ALIGN: usize = 4096;

/// A buffer one chunk of one input is read into. It is page-aligned with a page of slack at
/// each end, so a direct read can fetch the whole pages around the chunk (tensor data starts
/// anywhere in a file); [`ChunkBuf::bytes`] is the chunk itself. Made without `unsafe` by
/// over-allocating and slicing.
#[derive(Debug)]
pub struct ChunkBuf {
    raw: Vec<u8>,
    /// Index of the first aligned byte of `raw`.
    start: usize,
    /// Where the chunk's bytes are, relative to `start`.
    range: std::ops::Range<usize>,
}

impl ChunkBuf {
    /// A buffer for chunks of up to `capacity` bytes.
    pub fn new(capacity: usize) -> ChunkBuf {
        let raw = vec![0u8; capacity + 3 * READ_ALIGN];
        let start = raw.as_ptr().align_offset(READ_ALIGN);
        ChunkBuf {
            raw,
            start,
            range: 0..0,
        }
    }

    /// The bytes of the chunk last read.
    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.start + self.range.start..self.start + self.range.end]
    }

    /// The largest chunk it holds.
    pub fn capacity(&self) -> usize {
        self.raw.len() - self.start - 2 * READ_ALIGN
    }
}

/// What identifies a file's content for change detection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }
}

impl Shard {
    fn open(path: PathBuf, name: String) -> Result<Shard> {
        let (file, meta) = open_regular(&path, "opening shard")?;
        let header = header::read(&path, &file, meta.len())?;
        advise_sequential(&file);
        Ok(Shard {
            path,
            name,
            file,
            tensors: header.tensors.clone(),
            data_len: header.data_len,
            digest: header.digest,
            data_start: header.data_start(),
            header: Some(header),
            direct: None,
            direct_refused: AtomicBool::new(false),
            identity: Identity::of(&meta),
        })
    }

    /// Reads `len` bytes of the data space at `offset` into `buf`: with direct I/O where it is
    /// on (the whole pages around the chunk, bypassing the page cache) unless the page cache
    /// holds the chunk already, through the page cache otherwise. A filesystem that refuses a
    /// direct read turns direct reads off for the shard.
    pub fn read_chunk(&self, offset: u64, len: usize, buf: &mut ChunkBuf) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        assert!(len <= buf.capacity(), "a chunk larger than its buffer");
        let at = self.data_start + offset;
        if let (Some(direct), false) = (&self.direct, self.direct_refused.load(Ordering::Relaxed)) {
            let align = READ_ALIGN as u64;
            let first = at / align * align;
            let need = (at + len as u64 - first) as usize;
            let span = need.div_ceil(READ_ALIGN) * READ_ALIGN;
            let dst = &mut buf.raw[buf.start..buf.start + span];
            let mut got = 0;
            while got < need {
                match direct.read_at(&mut dst[got..], first + got as u64) {
                    Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    // Only the end of the file makes a direct read short, so `got` stays
                    // aligned for the next read.
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        self.direct_refused.store(true, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if got >= need {
                let from = (at - first) as usize;
                buf.range = from..from + len;
                return Ok(());
            }
        }
        self.file
            .read_exact_at(&mut buf.raw[buf.start..buf.start + len], at)?;
        buf.range = 0..len;
        Ok(())
    }

    /// Fills `buf` with the bytes of the data space starting at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, self.data_start + offset)
    }

    /// Where the data space's byte `offset` is in the file, for messages.
    pub fn file_offset(&self, offset: u64) -> u64 {
        self.data_start + offset
    }

    /// File length.
    pub fn len(&self) -> u64 {
        self.identity.len
    }

    /// Whether the file is empty (never, for a shard that opened).
    pub fn is_empty(&self) -> bool {
        self.identity.len == 0
    }

    /// Errs if the file was truncated, extended or rewritten since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, "reading file status", e))?;
        let now = Identity::of(&meta);
        if now.len != self.identity.len {
            return Err(Error::InputChanged {
                path: self.path.clone(),
                change: InputChange::Length {
                    from: self.identity.len,
                    to: now.len,
                },
            });
        }
        if now != self.identity {
            return Err(Error::InputChanged {
                path: self.path.clone(),
                change: InputChange::Modified,
            });
        }
        Ok(())
    }
}

/// Where one tensor lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLoc {
    /// Index into the model's `shards`.
    pub shard: usize,
    /// Index into that shard's `header.tensors`.
    pub entry: usize,
}

/// A validated input model.
#[derive(Debug)]
pub struct Model {
    /// What the user named.
    pub path: PathBuf,
    /// The directory holding the model's files (for a single-file model, its parent).
    pub dir: PathBuf,
    /// Shards in file-name order.
    pub shards: Vec<Shard>,
    tensors: HashMap<String, TensorLoc>,
}

impl Model {
    /// Opens and validates the model at `path`.
    pub fn open(path: &Path) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "opening model", e))?;
        if meta.is_file() {
            let name = file_name(path);
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let shard = Shard::open(path.to_path_buf(), name)?;
            return Model::from_shards(path, dir, vec![shard], None);
        }
        if !meta.is_dir() {
            return Err(Error::model(path, ModelError::NotAModel));
        }
        // `symlink_metadata`, so that a dangling link (an HF cache missing a blob) is reported
        // as such, not as an absent file.
        let index_path = path.join(INDEX_FILE);
        if std::fs::symlink_metadata(&index_path).is_ok() {
            return Model::open_indexed(path, &index_path);
        }
        let single = path.join(SINGLE_FILE);
        if std::fs::symlink_metadata(&single).is_ok() {
            let shard = Shard::open(single, SINGLE_FILE.into())?;
            return Model::from_shards(path, path.to_path_buf(), vec![shard], None);
        }
        Err(Error::model(path, ModelError::NoWeights))
    }

    fn open_indexed(dir: &Path, index_path: &Path) -> Result<Model> {
        let (mut file, meta) = open_regular(index_path, "opening index")?;
        if meta.len() > MAX_INDEX_LEN {
            return Err(Error::index(
                index_path,
                IndexError::TooLarge { len: meta.len() },
            ));
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io(index_path, "reading index", e))?;
        let index = index::parse(&bytes).map_err(|kind| Error::index(index_path, kind))?;
        let shards = index
            .shards()
            .into_iter()
            .map(|name| Shard::open(dir.join(&name), name))
            .collect::<Result<Vec<_>>>()?;
        Model::from_shards(dir, dir.to_path_buf(), shards, Some((index_path, &index)))
    }

    fn from_shards(
        path: &Path,
        dir: PathBuf,
        shards: Vec<Shard>,
        index: Option<(&Path, &index::Index)>,
    ) -> Result<Model> {
        let mut tensors = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for (entry, t) in shard.tensors.iter().enumerate() {
                if let Some(prev) = tensors.insert(t.name.clone(), TensorLoc { shard: s, entry }) {
                    return Err(Error::model(
                        &shard.path,
                        ModelError::TensorInTwoShards {
                            tensor: t.name.clone(),
                            other: shards[prev.shard].path.clone(),
                        },
                    ));
                }
            }
        }
        if let Some((index_path, index)) = index {
            let by_name: HashMap<&str, usize> = shards
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.as_str(), i))
                .collect();
            for (tensor, shard_name) in &index.weight_map {
                let listed = *by_name.get(shard_name.as_str()).ok_or_else(|| {
                    Error::internal(format!("shard {shard_name} of the index was not opened"))
                })?;
                match tensors.get(tensor) {
                    Some(loc) if loc.shard == listed => {}
                    Some(loc) => {
                        return Err(Error::index(
                            index_path,
                            IndexError::WrongShard {
                                tensor: tensor.clone(),
                                listed: shard_name.clone(),
                                actual: shards[loc.shard].name.clone(),
                            },
                        ))
                    }
                    None => {
                        return Err(Error::index(
                            index_path,
                            IndexError::NotInShard {
                                tensor: tensor.clone(),
                                shard: shard_name.clone(),
                            },
                        ))
                    }
                }
            }
            if tensors.len() != index.weight_map.len() {
                let listed: std::collections::HashSet<&str> =
                    index.weight_map.iter().map(|(t, _)| t.as_str()).collect();
                let mut unlisted: Vec<(&str, &str)> = shards
                    .iter()
                    .flat_map(|s| {
                        s.tensors
                            .iter()
                            .map(move |t| (t.name.as_str(), s.name.as_str()))
                    })
                    .filter(|(t, _)| !listed.contains(t))
                    .collect();
                unlisted.sort();
                let (tensor, shard) = unlisted.first().ok_or_else(|| {
                    Error::internal("more tensors than the index lists, yet none unlisted")
                })?;
                return Err(Error::index(
                    index_path,
                    IndexError::Unlisted {
                        tensor: tensor.to_string(),
                        shard: shard.to_string(),
                    },
                ));
            }
        }
        if tensors.is_empty() {
            return Err(Error::model(path, ModelError::NoTensors));
        }
        Ok(Model {
            path: path.to_path_buf(),
            dir,
            shards,
            tensors,
        })
    }

    /// The tensor named `name`, with where it is.
    pub fn get(&self, name: &str) -> Option<(TensorLoc, &TensorInfo)> {
        self.tensors
            .get(name)
            .map(|&loc| (loc, &self.shards[loc.shard].tensors[loc.entry]))
    }

    /// Tensors in storage order: shard by shard, by position in the data section.
    pub fn tensors(&self) -> impl Iterator<Item = (TensorLoc, &TensorInfo)> {
        self.shards.iter().enumerate().flat_map(|(s, shard)| {
            shard
                .tensors
                .iter()
                .enumerate()
                .map(move |(entry, t)| (TensorLoc { shard: s, entry }, t))
        })
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_len).sum()
    }

    /// `(file name, size)` of every shard, for provenance.
    pub fn file_list(&self) -> Vec<(String, u64)> {
        self.shards
            .iter()
            .map(|s| (s.name.clone(), s.len()))
            .collect()
    }

    /// Whether every shard's reads go around the page cache (direct reads on, none refused).
    pub fn reads_direct(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.direct.is_some() && !s.direct_refused.load(Ordering::Relaxed))
    }

    /// Opens every shard a second time with `O_DIRECT`, so that reads bypass the page cache
    /// (measured on this project's test machine: 1.7 GB/s with four 256 KiB reads in flight
    /// against 1.0 GB/s through the cache; see `benches/e2e.rs`). The second descriptor is
    /// opened through `/proc/self/fd`, so it is the very file that was validated, whatever its
    /// path does meanwhile. Returns whether every shard can read directly; with `required`, a
    /// filesystem that refuses direct I/O is an error.
    pub fn use_direct_reads(&mut self, required: bool) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let mut all = true;
        for shard in &mut self.shards {
            let proc_path = PathBuf::from(format!("/proc/self/fd/{}", shard.file.as_raw_fd()));
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(
                    (rustix::fs::OFlags::DIRECT | rustix::fs::OFlags::NONBLOCK).bits() as i32,
                )
                .open(&proc_path);
            match opened {
                Ok(file) => {
                    let same = file
                        .metadata()
                        .is_ok_and(|m| m.dev() == shard.identity.dev && m.ino() == shard.identity.ino);
                    if same {
                        shard.direct = Some(file);
                    } else {
                        all = false;
                    }
                }
                Err(e) if required => {
                    return Err(Error::io(
                        &shard.path,
                        "opening for direct reads (--io direct; this filesystem may not support direct I/O)",
                        e,
                    ))
                }
                Err(_) => all = false,
            }
        }
        Ok(all)
    }

    /// Errs if any shard changed since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        self.shards.iter().try_for_each(Shard::check_unchanged)
    }

    /// The tensor names as a sorted map to their shard, for listings.
    pub fn weight_map(&self) -> BTreeMap<&str, &str> {
        self.tensors
            .iter()
            .map(|(n, loc)| (n.as_str(), self.shards[loc.shard].name.as_str()))
            .collect()
    }
}

/// Opens `path` for reading if it is a regular file (following symlinks). Anything else is
/// refused before it is opened: opening a FIFO blocks until a writer comes, and SIGINT would only
/// set the cancel flag. `O_NONBLOCK` covers a swap after the check; it changes nothing for a
/// regular file.
fn open_regular(path: &Path, what: &'static str) -> Result<(File, std::fs::Metadata)> {
    let not_regular = || Error::model(path, ModelError::NotRegularFile);
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, what, e))?;
    if meta.is_dir() {
        return Err(Error::model(path, ModelError::IsDirectory));
    }
    if !meta.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| Error::io(path, what, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "reading file status", e))?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    Ok((file, meta))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Tells the kernel the file will be read front to back, so it reads ahead generously.
/// A hint only: failure changes nothing but speed.
fn advise_sequential(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
}
