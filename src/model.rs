//! Input models: a Hugging Face model directory (sharded with an index, or one file) or a single
//! weights file, in safetensors or PyTorch (`torch.save` zip) format, or a safetensors model
//! packed by `mergestream pack` (shards as `NAME.safetensors.mszst`).
//!
//! Opening a model opens every shard, validates every header (for a PyTorch checkpoint: its
//! archive and its pickle, read by [`crate::format::torch`], which executes nothing) and
//! cross-checks the index against the shards, so that a model that opens is one whose every
//! tensor can be read at a known offset. The open file handles are kept: the run reads the very
//! files that were validated even if their paths are replaced meanwhile, and
//! [`Shard::check_unchanged`] tells whether one was modified underneath.
//!
//! A directory is read as safetensors (`model.safetensors.index.json`, else `model.safetensors`,
//! either of whose shards may be packed) when it has safetensors weights, else as PyTorch
//! (`pytorch_model.bin.index.json`, else `pytorch_model.bin`); [`Model::unread`] lists the
//! weights of the other format that were left aside. A single file is read by its name: `.bin`,
//! `.pt` and `.pth` as PyTorch, anything else as safetensors (packed if it starts with the packed
//! magic number).
//!
//! Above this module nothing knows a shard's format: a [`Shard`] presents its tensors as byte
//! ranges of its own *data space* ([`ShardKind`]) and fills buffers from it
//! ([`Shard::read_chunk`], [`Shard::read_at`]); for a packed shard the data space is the
//! original safetensors data section, decoded block by block through the caller's
//! [`ReadCache`]. This module reads no tensor data but what it is asked for.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, IndexError, InputChange, ModelError, Result};
use crate::format::header::{self, Header, TensorInfo};
use crate::format::index::{self, INDEX_FILE, MAX_INDEX_LEN};
use crate::format::torch;
use crate::packed::{self, BlockCache, PackedShard};

/// The single-file name in a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";

/// The format of a weights file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// A safetensors file (`*.safetensors`).
    Safetensors,
    /// A PyTorch checkpoint written by `torch.save` in its zip format (`pytorch_model*.bin`).
    Torch,
}

impl Format {
    /// The format of a file named `name` when it is given on its own: `.bin`, `.pt` and `.pth`
    /// are PyTorch checkpoints, anything else is read as safetensors.
    pub fn of_file_name(name: &str) -> Format {
        if [".bin", ".pt", ".pth"].iter().any(|s| name.ends_with(s)) {
            Format::Torch
        } else {
            Format::Safetensors
        }
    }

    /// `safetensors` or `pytorch`, for listings.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Torch => "pytorch",
        }
    }

    /// The index file of a sharded model in this format.
    pub fn index_file(self) -> &'static str {
        match self {
            Format::Safetensors => INDEX_FILE,
            Format::Torch => torch::INDEX_FILE,
        }
    }

    /// The weights file of an unsharded model in this format.
    pub fn single_file(self) -> &'static str {
        match self {
            Format::Safetensors => SINGLE_FILE,
            Format::Torch => torch::SINGLE_FILE,
        }
    }
}

/// One weight file of a model.
///
/// Whatever its format, a shard presents its tensors as byte ranges of one *data space* and
/// reads any range of it with [`Shard::read_at`]; nothing above this module knows the format.
/// For a safetensors file the data space is its data section; for a PyTorch checkpoint it is the
/// whole file (each tensor's bytes lie in one stored zip member, at absolute offsets).
#[derive(Debug)]
pub struct Shard {
    /// Path as the user's directory names it (symlinks not resolved, so errors read naturally).
    pub path: PathBuf,
    /// File name, as the index names it (a packed shard: the name of the file it packs).
    pub name: String,
    /// The open file: the run reads the file that was validated, whatever its path does later.
    pub file: File,
    /// Tensors ordered by their position in the data space (`start`/`end` are offsets in it).
    /// In a PyTorch checkpoint tensors may share bytes (tied weights, views of one storage).
    pub tensors: Vec<TensorInfo>,
    /// Length of the data space.
    pub data_len: u64,
    /// blake3 of the shard's metadata (a safetensors header's JSON; a PyTorch checkpoint's
    /// tensor table), identifying its layout.
    pub digest: [u8; 32],
    /// The safetensors header: of the file, or for a packed shard of the file it packs; none
    /// for a PyTorch checkpoint.
    header: Option<Header>,
    /// How the data space is stored.
    kind: ShardKind,
    /// The same open file with `O_DIRECT`, once [`Model::use_direct_reads`] made it.
    direct: Option<File>,
    /// Set when the filesystem refused a direct read: reads go through the page cache.
    direct_refused: AtomicBool,
    /// [`Shard::mostly_cached`], asked of the kernel once: `cachestat(2)` walks the file's
    /// page-cache entries (about 1.5 ms per GB here), and the run decides on it more than once.
    mostly_cached: std::sync::OnceLock<bool>,
    identity: Identity,
}

/// How a shard stores its data space. Each kind knows how to fill a buffer with any range of
/// it; everything above [`Shard::read_chunk`] and [`Shard::read_at`] is format-blind. A new
/// format is a new variant here, with its arms in `Shard::open` and the readers.
#[derive(Debug)]
#[non_exhaustive]
pub enum ShardKind {
    /// A safetensors file: the data space is the file's bytes from `data_start` on, read with
    /// `pread`.
    Safetensors {
        /// File offset of the data section.
        data_start: u64,
    },
    /// A PyTorch zip checkpoint: the data space is the file itself (each tensor's bytes lie in
    /// one stored zip member, at absolute offsets), read with `pread`.
    Torch,
    /// A packed shard (`docs/packed-format.md`): the data space is the original data section,
    /// decoded from the blocks covering a range ([`PackedShard::read_at`]).
    Packed(Box<PackedShard>),
}

impl ShardKind {
    /// File offset of the data space, for kinds that store it as plain bytes.
    fn plain_start(&self) -> Option<u64> {
        match self {
            ShardKind::Safetensors { data_start } => Some(*data_start),
            ShardKind::Torch => Some(0),
            ShardKind::Packed(_) => None,
        }
    }
}

/// What one reader of shards keeps between reads: the decoded blocks of packed shards, and the
/// state to decode them (nothing for plain files). Bounded: it holds at most `blocks` decoded
/// blocks whatever is read ([`ReadCache::bytes`] says how much memory that is), so a reader
/// that reads `n` places in turn — the distinct inputs of a chunk — keeps each one's current
/// block with `blocks = n` and decodes every block once.
pub struct ReadCache {
    blocks: usize,
    cache: Option<Box<BlockCache>>,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("blocks", &self.blocks)
            .field("decoded", &self.decoded())
            .finish()
    }
}

impl ReadCache {
    /// A cache that keeps up to `blocks` decoded blocks (at least one).
    pub fn new(blocks: usize) -> ReadCache {
        ReadCache {
            blocks: blocks.max(1),
            cache: None,
        }
    }

    /// Upper bound of the memory a `ReadCache::new(blocks)` uses reading `models`: the decoded
    /// blocks plus the decoder's scratch ([`BlockCache`]), at the largest block size of any
    /// packed shard among them, and, for shards packed against a packed base, the decoder's own
    /// cache of one base block; 0 when none is packed.
    pub fn bytes(models: &[Model], blocks: usize) -> u64 {
        let bases = models
            .iter()
            .flat_map(|m| &m.shards)
            .filter_map(|s| match &s.kind {
                ShardKind::Packed(p) => p.base().map(|b| &b.model),
                _ => None,
            });
        ReadCache::largest_block(models).map_or(0, |b| BlockCache::bytes(blocks, b))
            + ReadCache::largest_block(bases).map_or(0, |b| BlockCache::bytes(1, b))
    }

    /// Bytes of the largest decoded block of any packed shard of `models`; none when none is
    /// packed.
    pub fn largest_block<'a>(models: impl IntoIterator<Item = &'a Model>) -> Option<u64> {
        models
            .into_iter()
            .flat_map(|m| &m.shards)
            .filter_map(|s| match &s.kind {
                ShardKind::Packed(p) => Some(p.max_block_bytes()),
                _ => None,
            })
            .max()
    }

    /// Blocks decoded through this cache so far.
    pub fn decoded(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.decoded())
    }

    fn blocks(&mut self) -> Result<&mut BlockCache> {
        if self.cache.is_none() {
            self.cache = Some(Box::new(BlockCache::new(self.blocks)?));
        }
        Ok(self.cache.as_mut().expect("made above").as_mut())
    }
}

/// Alignment of direct reads: the direct-I/O alignment [`IoBuf`](crate::iobuf::IoBuf)s start
/// on (a page, which covers 512- and 4096-byte sectors).
pub const READ_ALIGN: usize = crate::iobuf::ALIGN;

/// A buffer one chunk of one input is read into: a page-aligned stretch of an arena (an
/// [`IoBuf`](crate::iobuf::IoBuf) holding every buffer of a run, on huge pages where the
/// system allows, so that a direct read lands in one or two stretches of contiguous memory and
/// goes to the disk as one request of few segments), with a page of slack at each end, so a
/// direct read can fetch the whole pages around the chunk (tensor data starts anywhere in a
/// file); [`ChunkBuf::bytes`] is the chunk itself.
///
/// Measured (1.8 GB pair, cold, two alternating rounds, 2026-11-26, with each buffer on a huge
/// page of its own, the arena's layout less its memory): reads into huge pages took 0.51–0.56 ms
/// per request against 0.67–0.70 ms into 4 KiB pages, and the run 2.07–2.28 s against
/// 2.68–2.75 s.
#[derive(Debug)]
pub struct ChunkBuf<'a> {
    raw: &'a mut [u8],
    /// Where the chunk's bytes are in `raw`.
    range: std::ops::Range<usize>,
}

impl<'a> ChunkBuf<'a> {
    /// Bytes of arena one buffer for chunks of up to `capacity` bytes takes: the chunk in whole
    /// pages, and a page of slack at each end.
    pub fn stride(capacity: usize) -> usize {
        capacity.next_multiple_of(READ_ALIGN) + 2 * READ_ALIGN
    }

    /// As many buffers for chunks of up to `capacity` bytes as `arena` (page-aligned) holds.
    pub fn carve(arena: &'a mut [u8], capacity: usize) -> impl Iterator<Item = ChunkBuf<'a>> {
        assert!(
            (arena.as_ptr() as usize).is_multiple_of(READ_ALIGN),
            "an arena of chunk buffers starts on a page"
        );
        arena
            .chunks_exact_mut(Self::stride(capacity))
            .map(|raw| ChunkBuf { raw, range: 0..0 })
    }

    /// The bytes of the chunk last read.
    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.range.clone()]
    }

    /// The largest chunk it holds.
    pub fn capacity(&self) -> usize {
        self.raw.len() - 2 * READ_ALIGN
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
    /// Whether the page cache held at least half of the shard's data when first asked
    /// (`cachestat(2)`; not where the kernel cannot tell). Decided once per opened shard, from
    /// 32 evenly spaced 1 MiB windows of a large shard.
    pub fn mostly_cached(&self) -> bool {
        *self.mostly_cached.get_or_init(|| {
            let start = self.kind.plain_start().unwrap_or(0);
            sampled_cache_share(&self.file, start, self.data_len).is_some_and(|share| share >= 0.5)
        })
    }

    /// Opens the shard file at `path` in `format`. A safetensors shard may be packed (told by
    /// its first bytes: a packed shard starts with [`packed::MAGIC`], which no safetensors file
    /// can).
    fn open(path: PathBuf, name: String, format: Format) -> Result<Shard> {
        let (file, meta) = open_regular(&path, "opening shard")?;
        let identity = Identity::of(&meta);
        let mut magic = [0u8; 8];
        let packed = format == Format::Safetensors
            && meta.len() >= 8
            && file.read_exact_at(&mut magic, 0).is_ok()
            && magic == packed::MAGIC;
        let (name, header, tensors, data_len, digest, kind) = if packed {
            let source = file
                .try_clone()
                .map_err(|e| Error::io(&path, "opening shard", e))?;
            // A shard packed against a base opens without it; the run gives it its base
            // (`Model::set_bases`) before reading.
            let shard = PackedShard::from_source_without_base(&path, Box::new(source), meta.len())?;
            let header = shard.header().clone();
            let name = packed::unpacked_name(&name).to_owned();
            let (tensors, data_len, digest) =
                (header.tensors.clone(), header.data_len, header.digest);
            let kind = ShardKind::Packed(Box::new(shard));
            (name, Some(header), tensors, data_len, digest, kind)
        } else if format == Format::Safetensors {
            let header = header::read(&path, &file, meta.len())?;
            let kind = ShardKind::Safetensors {
                data_start: header.data_start(),
            };
            let (tensors, data_len, digest) =
                (header.tensors.clone(), header.data_len, header.digest);
            (name, Some(header), tensors, data_len, digest, kind)
        } else {
            let checkpoint = torch::read(&path, &file, meta.len())?;
            // Storage order: front to back in the file, ties (tied weights) in state dict
            // order, so a sequential read of the tensors reads the file front to back.
            let mut tensors: Vec<TensorInfo> =
                checkpoint.tensors.into_iter().map(|t| t.info).collect();
            tensors.sort_by_key(|t| t.start);
            let digest = table_digest(&tensors);
            (name, None, tensors, meta.len(), digest, ShardKind::Torch)
        };
        advise_sequential(&file);
        Ok(Shard {
            path,
            name,
            file,
            tensors,
            data_len,
            digest,
            header,
            kind,
            direct: None,
            direct_refused: AtomicBool::new(false),
            mostly_cached: std::sync::OnceLock::new(),
            identity,
        })
    }

    /// The file's format (a packed shard packs a safetensors file).
    pub fn format(&self) -> Format {
        match self.kind {
            ShardKind::Torch => Format::Torch,
            _ => Format::Safetensors,
        }
    }

    /// The safetensors header (a packed shard: of the file it packs); none for a PyTorch
    /// checkpoint.
    pub fn header(&self) -> Option<&Header> {
        self.header.as_ref()
    }

    /// How the data space is stored.
    pub fn kind(&self) -> &ShardKind {
        &self.kind
    }

    /// Where the data space's byte `offset` lies in the file; none for a packed shard, whose
    /// file holds the data space compressed.
    pub fn file_offset(&self, offset: u64) -> Option<u64> {
        self.kind.plain_start().map(|start| start + offset)
    }

    /// Reads `len` bytes of the data space at `offset` into `buf`, for the pipeline's readers.
    /// A packed shard decodes them, keeping decoded blocks in `cache`. A plain file is read with
    /// direct I/O where it is on (the whole pages around the chunk, bypassing the page cache),
    /// through the page cache otherwise; a filesystem that refuses a direct read turns direct
    /// reads off for the shard. A file that ends before the bytes is an
    /// [`Error::InputChanged`] (it was validated when opened).
    pub fn read_chunk(
        &self,
        offset: u64,
        len: usize,
        buf: &mut ChunkBuf,
        cache: &mut ReadCache,
    ) -> Result<()> {
        assert!(len <= buf.capacity(), "a chunk larger than its buffer");
        match &self.kind {
            ShardKind::Packed(p) => {
                p.read_at(offset, &mut buf.raw[..len], cache.blocks()?)?;
                buf.range = 0..len;
                Ok(())
            }
            ShardKind::Safetensors { data_start } => self
                .read_plain_chunk(data_start + offset, len, buf)
                .map_err(|e| self.read_error(offset, e)),
            ShardKind::Torch => self
                .read_plain_chunk(offset, len, buf)
                .map_err(|e| self.read_error(offset, e)),
        }
    }

    /// [`Shard::read_chunk`] of a plain file: `len` bytes at file offset `at`.
    fn read_plain_chunk(&self, at: u64, len: usize, buf: &mut ChunkBuf) -> std::io::Result<()> {
        let direct = self
            .direct
            .as_ref()
            .filter(|_| !self.direct_refused.load(Ordering::Relaxed));
        if let Some(direct) = direct {
            let align = READ_ALIGN as u64;
            let first = at / align * align;
            let need = (at + len as u64 - first) as usize;
            let span = need.div_ceil(READ_ALIGN) * READ_ALIGN;
            let dst = &mut buf.raw[..span];
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
        self.file.read_exact_at(&mut buf.raw[..len], at)?;
        buf.range = 0..len;
        Ok(())
    }

    /// What a failed read of a plain file at data offset `offset` is: a file that ends early
    /// changed after it was validated.
    fn read_error(&self, offset: u64, e: std::io::Error) -> Error {
        let Some(data_start) = self.kind.plain_start() else {
            return Error::io(&self.path, "reading tensor data", e);
        };
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            let at = self.tensors.partition_point(|t| t.end <= offset);
            Error::InputChanged {
                path: self.path.clone(),
                change: InputChange::EndsEarly {
                    tensor: self
                        .tensors
                        .get(at)
                        .map_or_else(String::new, |t| t.name.clone()),
                    offset: data_start + offset,
                },
            }
        } else {
            Error::io(&self.path, "reading tensor data", e)
        }
    }

    /// Fills `buf` with the bytes of the data space starting at `offset`, through the page
    /// cache (a packed shard: decoding, through `cache`), as [`Shard::read_chunk`] does.
    pub fn read_at(&self, offset: u64, buf: &mut [u8], cache: &mut ReadCache) -> Result<()> {
        match &self.kind {
            ShardKind::Safetensors { data_start } => self
                .file
                .read_exact_at(buf, data_start + offset)
                .map_err(|e| self.read_error(offset, e)),
            ShardKind::Torch => self
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| self.read_error(offset, e)),
            ShardKind::Packed(p) => p.read_at(offset, buf, cache.blocks()?),
        }
    }

    /// Length of the file the shard stands for, as a model's file list records it: the file's
    /// own length, or for a packed shard the length of the safetensors file it packs (so that
    /// a packed model is described, and merged, exactly as its unpacked form).
    pub fn len(&self) -> u64 {
        match &self.kind {
            ShardKind::Packed(p) => p.original_len(),
            _ => self.identity.len,
        }
    }

    /// Whether the file is empty (never, for a shard that opened).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Errs if the file (or, for a shard packed against a base, a file of the base) was
    /// truncated, extended or rewritten since it was opened.
    pub fn check_unchanged(&self) -> Result<()> {
        if let ShardKind::Packed(p) = &self.kind {
            if let Some(base) = p.base() {
                base.model.check_unchanged()?;
            }
        }
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
    /// Index into that shard's [`Shard::tensors`].
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
    /// The format read.
    pub format: Format,
    /// Weights of another format that the directory also holds and that were not read (the
    /// index or single file found): safetensors wins over PyTorch.
    pub unread: Vec<String>,
    tensors: HashMap<String, TensorLoc>,
}

impl Model {
    /// Whether the page cache holds most of every shard ([`Shard::mostly_cached`]).
    pub fn mostly_cached(&self) -> bool {
        self.shards.iter().all(Shard::mostly_cached)
    }

    /// Opens and validates the model at `path`.
    pub fn open(path: &Path) -> Result<Model> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "opening model", e))?;
        if meta.is_file() {
            let name = file_name(path);
            let format = Format::of_file_name(&name);
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let shard = Shard::open(path.to_path_buf(), name, format)?;
            return Model::from_shards(path, dir, vec![shard], None);
        }
        if !meta.is_dir() {
            return Err(Error::model(path, ModelError::NotAModel));
        }
        // `symlink_metadata`, so that a dangling link (an HF cache missing a blob) is reported
        // as such, not as an absent file.
        let present = |format: Format| -> Vec<&'static str> {
            [format.index_file(), format.single_file()]
                .into_iter()
                .filter(|name| {
                    std::fs::symlink_metadata(path.join(name)).is_ok()
                        || (format == Format::Safetensors
                            && std::fs::symlink_metadata(path.join(packed::packed_name(name)))
                                .is_ok())
                })
                .collect()
        };
        let (safetensors, pytorch) = (present(Format::Safetensors), present(Format::Torch));
        let (format, found, unread) = match (safetensors.is_empty(), pytorch.is_empty()) {
            (false, _) => (Format::Safetensors, safetensors, pytorch),
            (true, false) => (Format::Torch, pytorch, Vec::new()),
            (true, true) => return Err(Error::model(path, ModelError::NoWeights)),
        };
        let mut model = if found[0] == format.index_file() {
            Model::open_indexed(path, &path.join(found[0]), format)?
        } else {
            let shard = Shard::open(shard_file(path, found[0]), found[0].into(), format)?;
            Model::from_shards(path, path.to_path_buf(), vec![shard], None)?
        };
        model.unread = unread.into_iter().map(String::from).collect();
        Ok(model)
    }

    fn open_indexed(dir: &Path, index_path: &Path, format: Format) -> Result<Model> {
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
            .map(|name| Shard::open(shard_file(dir, &name), name, format))
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
        let format = shards
            .first()
            .map(Shard::format)
            .ok_or_else(|| Error::internal("a model opened with no shards"))?;
        Ok(Model {
            path: path.to_path_buf(),
            dir,
            shards,
            format,
            unread: Vec::new(),
            tensors,
        })
    }

    /// The identities of the bases this model's shards were packed against and were not given
    /// (see [`Model::set_bases`]), each once.
    pub fn missing_bases(&self) -> Vec<[u8; 32]> {
        let mut ids: Vec<[u8; 32]> = self
            .shards
            .iter()
            .filter_map(|s| match &s.kind {
                ShardKind::Packed(p) => p.missing_base(),
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Gives every shard packed against a base its base, from `bases`; errs with
    /// [`packed::PackedError::BaseNotAnInput`] for a shard whose base is not among them.
    pub fn set_bases(&mut self, bases: &[std::sync::Arc<packed::Base>]) -> Result<()> {
        for shard in &mut self.shards {
            let ShardKind::Packed(p) = &mut shard.kind else {
                continue;
            };
            let Some(id) = p.missing_base() else {
                continue;
            };
            match bases.iter().find(|b| b.id == id) {
                Some(base) => p.set_base(std::sync::Arc::clone(base))?,
                None => {
                    return Err(packed::PackedError::BaseNotAnInput {
                        path: shard.path.clone(),
                        expected: packed::hex(&id),
                    }
                    .into())
                }
            }
        }
        Ok(())
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

    /// Bytes of tensor data: every tensor's size, summed (tensors sharing storage in a PyTorch
    /// checkpoint count once per name, as they would be merged).
    pub fn data_bytes(&self) -> u64 {
        self.tensors().map(|(_, t)| t.nbytes()).sum()
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
    /// path does meanwhile. A shard the page cache mostly holds keeps reading through it (with
    /// `required` too: that flag is about the filesystem). Returns whether every shard reads
    /// directly; with `required`, a filesystem that refuses direct I/O is an error.
    pub fn use_direct_reads(&mut self, required: bool) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let mut all = true;
        for shard in &mut self.shards {
            if !matches!(shard.kind, ShardKind::Safetensors { .. }) {
                // Packed shards are read block by block through the page cache.
                all = false;
                continue;
            }
            // A shard the page cache mostly holds (a warm rerun, a model just written) is
            // copied from it: faster than the disk. Decided once per shard: chunk by chunk, a
            // buffered read's readahead would pull the next chunks in, and every later chunk
            // would follow through the cache at its cold speed.
            if shard.mostly_cached() {
                all = false;
                continue;
            }
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

/// The file of the shard the index (or the single-file convention) names `name` in `dir`:
/// `dir/name`, or where there is no such file and a packed one, `dir/name.mszst`.
fn shard_file(dir: &Path, name: &str) -> PathBuf {
    let plain = dir.join(name);
    if std::fs::symlink_metadata(&plain).is_err() {
        let packed = dir.join(packed::packed_name(name));
        if std::fs::symlink_metadata(&packed).is_ok() {
            return packed;
        }
    }
    plain
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The share of the pages of `len` bytes of `file` at `offset` that the page cache holds, asked
/// with `cachestat(2)` (Linux 6.5+), which starts no I/O; `None` where the kernel lacks it or it
/// fails. Public for the benchmark's floor, which chooses its reads as the pipeline does.
pub fn page_cache_share(file: &File, offset: u64, len: u64) -> Option<f64> {
    use std::os::fd::AsRawFd;
    /// `struct cachestat_range` of `<linux/mman.h>`.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    /// `struct cachestat` of `<linux/mman.h>`.
    #[repr(C)]
    #[derive(Default)]
    struct CacheStat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    /// `cachestat`'s number in the generic syscall table, the same on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    if len == 0 {
        return Some(1.0);
    }
    let page = READ_ALIGN as u64;
    let first = offset / page * page;
    // (A range of length 0 would mean "to the end of the file".)
    let range = Range {
        off: first,
        len: (offset + len).div_ceil(page) * page - first,
    };
    let mut stat = CacheStat::default();
    // SAFETY: cachestat reads one `struct cachestat_range` and writes one `struct cachestat`,
    // both `repr(C)` locals with the kernel's layout (two and five `__u64`s), valid for the call;
    // the descriptor is open for as long as `file` is borrowed; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut CacheStat,
            0u32,
        )
    };
    (r == 0).then(|| (stat.nr_cache as f64 / (range.len / page) as f64).min(1.0))
}

/// Windows a large shard's page-cache share is sampled in, and their size. `cachestat(2)` walks
/// the page cache's entries for every page it is asked about, about 1.5 ms per GB on this
/// project's test machine: 0.4 s for both inputs of a Llama-3-70B merge, against 0.1 ms for
/// the windows. Page-cache contents come in long runs (a file read or written earlier, the
/// pages reclaim left), which evenly spaced windows see.
const CACHE_PROBES: u64 = 32;
const CACHE_PROBE_BYTES: u64 = 1 << 20;

/// [`page_cache_share`] of `len` bytes at `offset`, estimated from 32 evenly spaced 1 MiB
/// windows when they cover less than the range: what a shard's read path is decided
/// on. Public for the benchmark's floor.
pub fn sampled_cache_share(file: &File, offset: u64, len: u64) -> Option<f64> {
    if len <= CACHE_PROBES * CACHE_PROBE_BYTES {
        return page_cache_share(file, offset, len);
    }
    let stride = (len - CACHE_PROBE_BYTES) / (CACHE_PROBES - 1);
    let mut total = 0.0;
    for k in 0..CACHE_PROBES {
        total += page_cache_share(file, offset + k * stride, CACHE_PROBE_BYTES)?;
    }
    Some(total / CACHE_PROBES as f64)
}

/// Tells the kernel the file will be read front to back, so it reads ahead generously.
/// A hint only: failure changes nothing but speed.
fn advise_sequential(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Sequential);
}

/// blake3 over a tensor table (names, dtypes, shapes, offsets), for formats whose metadata is not
/// one canonical byte string.
fn table_digest(tensors: &[TensorInfo]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"mergestream tensor table v1\0");
    for t in tensors {
        h.update(&(t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update(t.dtype.name().as_bytes());
        h.update(&[0]);
        h.update(&(t.shape.len() as u64).to_le_bytes());
        for d in &t.shape {
            h.update(&d.to_le_bytes());
        }
        h.update(&t.start.to_le_bytes());
        h.update(&t.end.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arena is carved into disjoint, page-aligned buffers, each holding a chunk of the asked
    /// size plus a page of slack at each end, as many as fit.
    #[test]
    fn an_arena_is_carved_into_page_aligned_buffers_that_hold_a_chunk() {
        for capacity in [8, READ_ALIGN, 256 << 10, (512 << 10) + 24] {
            let stride = ChunkBuf::stride(capacity);
            let mut arena = crate::iobuf::IoBuf::new(3 * stride + stride / 2);
            let base = arena.as_slice().as_ptr() as usize;
            let bufs: Vec<ChunkBuf> = ChunkBuf::carve(arena.as_mut_slice(), capacity).collect();
            assert_eq!(bufs.len(), 3, "capacity {capacity}");
            for (k, buf) in bufs.iter().enumerate() {
                assert_eq!(buf.raw.as_ptr() as usize, base + k * stride);
                assert!((buf.raw.as_ptr() as usize).is_multiple_of(READ_ALIGN));
                assert!(buf.capacity() >= capacity);
                // The widest direct read of a chunk: from the page before an unaligned start
                // to the end of the page after.
                assert!(buf.raw.len() >= (capacity + READ_ALIGN - 1).next_multiple_of(READ_ALIGN));
                assert!(buf.bytes().is_empty());
            }
        }
    }

    /// A file just read through the page cache is held by it: `page_cache_share` says so for
    /// any range of it (kernels without `cachestat(2)` say SKIPPED).
    #[test]
    fn a_file_just_read_is_in_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * READ_ALIGN + 100]).unwrap();
        let file = File::open(&path).unwrap();
        std::io::Read::read_to_end(&mut &file, &mut Vec::new()).unwrap();
        if page_cache_share(&file, 0, 1).is_none() {
            eprintln!("SKIPPED: cachestat(2) is not available on this kernel");
            return;
        }
        for (at, len) in [
            (0, 3 * READ_ALIGN as u64 + 100),
            (5, 4096),
            (4095, 2),
            (8192, 1),
        ] {
            assert_eq!(page_cache_share(&file, at, len), Some(1.0), "{at}+{len}");
        }
        assert_eq!(page_cache_share(&file, 100, 0), Some(1.0));
    }

    /// A large file's share is estimated from windows; it follows the exact share when half of
    /// the file leaves the page cache.
    #[test]
    fn a_sampled_share_follows_the_exact_one() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let len = 3 * CACHE_PROBES * CACHE_PROBE_BYTES / 2 + 12345;
        std::fs::write(&path, vec![7u8; len as usize]).unwrap();
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        std::io::Read::read_to_end(&mut &file, &mut Vec::new()).unwrap();
        if page_cache_share(&file, 0, 1).is_none() {
            eprintln!("SKIPPED: cachestat(2) is not available on this kernel");
            return;
        }
        assert_eq!(sampled_cache_share(&file, 100, len - 100), Some(1.0));
        // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
        let r = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                (len / 2) as libc::off_t,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        let exact = page_cache_share(&file, 100, len - 100).unwrap();
        if exact > 0.6 {
            eprintln!("SKIPPED: this filesystem keeps the pages (exact share {exact})");
            return;
        }
        let sampled = sampled_cache_share(&file, 100, len - 100).unwrap();
        assert!(
            (sampled - exact).abs() <= 1.0 / 16.0,
            "sampled {sampled}, exact {exact}"
        );
    }
}
