//! The packed format's errors: one variant per way a packed file, a packed directory or a base
//! can be wrong, each naming the file (and the block or tensor where there is one).
//!
//! They reach users through [`crate::Error::Packed`]; tests match the variants. I/O failures are
//! not here: they stay [`crate::Error::Io`], like everywhere else in the library.

use std::fmt;
use std::path::PathBuf;

use crate::format::Dtype;

/// Everything that can be wrong with packed data. `path` is always the packed file (or packed
/// directory, or the input being packed) the problem is in.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackedError {
    /// The file does not start with the packed magic number.
    #[error("{}: not a packed shard (no mergestream packed magic number at its start)", path.display())]
    NotPacked {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a format version this build cannot read.
    #[error("{}: packed format version {found} is not supported (this build reads version {supported})", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it records.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The preamble holds a value the format does not allow.
    #[error("{}: corrupt preamble: {problem}", path.display())]
    CorruptPreamble {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: PreambleProblem,
    },
    /// The preamble or the safetensors header kept in it does not match its checksum.
    #[error("{}: the preamble or the safetensors header is corrupt (checksum {actual:016x}, recorded {expected:016x})", path.display())]
    HeaderChecksum {
        /// The file.
        path: PathBuf,
        /// The recorded xxh3.
        expected: u64,
        /// The xxh3 of the bytes read.
        actual: u64,
    },
    /// The file is shorter than its own structure says it is.
    #[error("{}: truncated: {what} needs {needed} bytes but the file has {len}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The part that does not fit.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// The trailer at the end of the file is missing or malformed.
    #[error("{}: corrupt trailer: {problem} (file truncated or extended?)", path.display())]
    CorruptTrailer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: TrailerProblem,
    },
    /// The block index is malformed.
    #[error("{}: corrupt block index{}: {problem}", path.display(), block_suffix(*block))]
    CorruptIndex {
        /// The file.
        path: PathBuf,
        /// The entry, where one is at fault.
        block: Option<u64>,
        /// What is wrong.
        problem: IndexProblem,
    },
    /// A zstd frame ends before its end: bytes are missing from the block.
    #[error("{}: block {block}{}: truncated zstd frame ({stored} stored bytes)", path.display(), tensor_suffix(tensor))]
    TruncatedFrame {
        /// The file.
        path: PathBuf,
        /// The block.
        block: u64,
        /// The first tensor with bytes in the block.
        tensor: Option<String>,
        /// Stored bytes of the block.
        stored: u32,
    },
    /// A zstd frame does not decode to the block's bytes.
    #[error("{}: block {block}{}: corrupt zstd frame: {problem}", path.display(), tensor_suffix(tensor))]
    CorruptFrame {
        /// The file.
        path: PathBuf,
        /// The block.
        block: u64,
        /// The first tensor with bytes in the block.
        tensor: Option<String>,
        /// What is wrong.
        problem: FrameProblem,
    },
    /// A block decoded, but not to the bytes that were packed.
    #[error("{}: block {block}{}: checksum mismatch (xxh3 {actual:016x}, recorded {expected:016x}){}", path.display(), tensor_suffix(tensor), if *with_base { "; was the base model changed?" } else { "" })]
    BlockChecksum {
        /// The file.
        path: PathBuf,
        /// The block.
        block: u64,
        /// The first tensor with bytes in the block.
        tensor: Option<String>,
        /// The recorded xxh3 of the block's original bytes.
        expected: u64,
        /// The xxh3 of the bytes decoded.
        actual: u64,
        /// Whether the block was XORed with a base (which may have changed).
        with_base: bool,
    },
    /// A read asked for bytes past the end of the data section.
    #[error("{}: read of {len} bytes at data offset {offset} runs past the data section ({data_len} bytes)", path.display())]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// Where the read starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The data section's length.
        data_len: u64,
    },
    /// The shard was packed against a base model, and none was given.
    #[error("{}: was packed against a base model (blake3 id {expected}); pass it with --base", path.display())]
    MissingBase {
        /// The file.
        path: PathBuf,
        /// The recorded identity of the base, hex.
        expected: String,
    },
    /// A merge input was packed against a base model that is none of the run's other models.
    #[error("{}: was packed against a base model (blake3 id {expected}) that is none of this run's other models: merge it together with that model, or restore it first with `mergestream unpack DIR --base REFDIR --out PLAIN`", path.display())]
    BaseNotAnInput {
        /// The packed shard.
        path: PathBuf,
        /// The recorded identity of the base, hex.
        expected: String,
    },
    /// A base model that is itself packed against a base (one level of bases only).
    #[error("{}: this base model is itself packed against a base model; unpack it first (`mergestream unpack`)", base.display())]
    NestedBase {
        /// The base model.
        base: PathBuf,
    },
    /// The base model given is not the one the shard was packed against.
    #[error("{}: was packed against another base model than {} (recorded id {expected}, this base is {found})", path.display(), base.display())]
    WrongBase {
        /// The file.
        path: PathBuf,
        /// The base model given.
        base: PathBuf,
        /// The recorded identity, hex.
        expected: String,
        /// The identity of the base given, hex.
        found: String,
    },
    /// A base model was given, but nothing in the packed directory was packed against one.
    #[error("{}: no shard was packed against a base model, but --base {} was given", path.display(), base.display())]
    UnexpectedBase {
        /// The packed directory.
        path: PathBuf,
        /// The base model given.
        base: PathBuf,
    },
    /// The base model has no tensor of this name.
    #[error("{}: tensor '{tensor}': not in the base model {}", path.display(), base.display())]
    BaseTensorMissing {
        /// The file being packed or read.
        path: PathBuf,
        /// The base model.
        base: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// The base model's tensor of this name differs in dtype or shape.
    #[error("{}: tensor '{tensor}': is {dtype} {shape:?} but the base model {} has {base_dtype} {base_shape:?}", path.display(), base.display())]
    BaseTensorMismatch {
        /// The file being packed or read.
        path: PathBuf,
        /// The base model.
        base: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<u64>,
        /// The base's dtype for it.
        base_dtype: Dtype,
        /// The base's shape for it.
        base_shape: Vec<u64>,
    },
    /// A restored file is not what the original manifest records.
    #[error("{}: restored bytes have blake3 {actual} but the original checksums.b3 records {expected}", path.display())]
    FileChecksum {
        /// The file being restored.
        path: PathBuf,
        /// The recorded blake3, hex.
        expected: String,
        /// The blake3 of the bytes restored, hex.
        actual: String,
    },
    /// An input file does not match the checksums.b3 beside it.
    #[error("{}: blake3 is {actual} but {} records {expected}; the input does not match its own manifest", path.display(), manifest.display())]
    SourceChecksum {
        /// The input file.
        path: PathBuf,
        /// The manifest beside it.
        manifest: PathBuf,
        /// The recorded blake3, hex.
        expected: String,
        /// The blake3 of the bytes read, hex.
        actual: String,
    },
    /// A manifest and the directory it describes disagree on which files there are.
    #[error("{}: does not describe its directory:{}{}", path.display(), list("not listed", unlisted), list("listed but absent", missing))]
    ManifestFiles {
        /// The manifest.
        path: PathBuf,
        /// Files present but not listed.
        unlisted: Vec<String>,
        /// Files listed but not present.
        missing: Vec<String>,
    },
    /// A manifest is not in b3sum's format.
    #[error("{}: malformed manifest:{}", path.display(), bad_lines(lines))]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Every malformed line: (1-based number, text).
        lines: Vec<(usize, String)>,
    },
    /// The directory is not a complete packed directory.
    #[error("{}: not a complete packed directory (no {file}; was `mergestream pack` interrupted?)", path.display())]
    NotPackedDir {
        /// The directory.
        path: PathBuf,
        /// The file it lacks.
        file: &'static str,
    },
    /// The input directory holds a subdirectory, which packing does not carry.
    #[error("{}: is a directory; pack carries the files of a model directory, not subdirectories (move it out first)", path.display())]
    Subdirectory {
        /// The subdirectory.
        path: PathBuf,
    },
    /// The input holds something that is neither a regular file nor a directory.
    #[error("{}: is not a regular file (a FIFO, socket or device?)", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
    },
    /// The output exists and is not an empty directory.
    #[error("{}: the output must not exist or be an empty directory", path.display())]
    OutputNotEmpty {
        /// The output directory.
        path: PathBuf,
    },
    /// A packing writer was given another number of data bytes than the header describes.
    #[error("{}: the header describes {expected} bytes of data but {got} were given", path.display())]
    InputLength {
        /// The shard being packed.
        path: PathBuf,
        /// Bytes the header describes.
        expected: u64,
        /// Bytes given.
        got: u64,
    },
    /// A compression or decompression thread stopped without answering (it panicked).
    #[error("{}: a worker thread failed (this is a bug in mergestream)", path.display())]
    WorkerFailed {
        /// The shard being packed or read.
        path: PathBuf,
    },
    /// An input file has a name that packing writes (it looks packed already).
    #[error("{}: is named like a file `mergestream pack` writes (packed.b3, *.mszst); is the input packed already?", path.display())]
    ReservedName {
        /// The file.
        path: PathBuf,
    },
    /// The input directory has no safetensors shard to pack.
    #[error("{}: no *.safetensors file to pack", path.display())]
    NoShards {
        /// The directory.
        path: PathBuf,
    },
    /// A parameter is outside what the format allows.
    #[error("{what} {value} is outside the allowed range {allowed}")]
    BadParameter {
        /// The parameter.
        what: &'static str,
        /// The value given.
        value: i64,
        /// What is allowed.
        allowed: &'static str,
    },
}

/// What is wrong with a zstd frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameProblem {
    /// The frame's own length disagrees with the block's stored length (bytes after the
    /// frame).
    Length {
        /// The frame's length.
        frame: u64,
        /// The block's stored length.
        stored: u64,
    },
    /// zstd refused the frame.
    Zstd {
        /// What zstd said.
        message: String,
    },
    /// The frame decodes to another length than the block's.
    DecodedLength {
        /// Bytes decoded.
        decoded: u64,
        /// The block's length.
        expected: u64,
    },
}

impl fmt::Display for FrameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameProblem::Length { frame, stored } => {
                write!(f, "the frame is {frame} bytes but {stored} are stored")
            }
            FrameProblem::Zstd { message } => f.write_str(message),
            FrameProblem::DecodedLength { decoded, expected } => {
                write!(f, "decodes to {decoded} bytes, not {expected}")
            }
        }
    }
}

/// What is wrong with a preamble.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreambleProblem {
    /// Flag bits this version does not define are set.
    UnknownFlags(u32),
    /// The block size is not a power of two in the allowed range.
    BlockSize(u32),
    /// A reserved field is not zero.
    Reserved,
    /// A base id is recorded although the shard was packed without a base.
    StrayBaseId,
    /// The recorded safetensors prefix length is outside what safetensors allows.
    PrefixRange(u64),
    /// The recorded safetensors prefix length disagrees with the header length inside it.
    PrefixLength {
        /// The prefix length recorded in the preamble.
        recorded: u64,
        /// The header length inside the prefix.
        header: u64,
    },
}

impl fmt::Display for PreambleProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PreambleProblem::UnknownFlags(flags) => write!(f, "unknown flags {flags:#x}"),
            PreambleProblem::BlockSize(size) => write!(
                f,
                "block size {size} is not a power of two from {} to {}",
                super::MIN_BLOCK_SIZE,
                super::MAX_BLOCK_SIZE
            ),
            PreambleProblem::Reserved => f.write_str("a reserved field is not zero"),
            PreambleProblem::StrayBaseId => {
                f.write_str("a base id is recorded but the base flag is not set")
            }
            PreambleProblem::PrefixRange(len) => write!(
                f,
                "a safetensors prefix of {len} bytes is outside 8 to 8 + {} bytes",
                crate::format::header::MAX_HEADER_LEN
            ),
            PreambleProblem::PrefixLength { recorded, header } => write!(
                f,
                "the safetensors prefix is recorded as {recorded} bytes but its header says {header}"
            ),
        }
    }
}

/// What is wrong with a trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrailerProblem {
    /// The trailer's magic number is not there.
    Magic,
    /// The index does not sit where the trailer says, right before the trailer.
    IndexPlacement {
        /// Where the trailer puts the index.
        index_offset: u64,
        /// The file's length.
        file_len: u64,
    },
}

impl fmt::Display for TrailerProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrailerProblem::Magic => f.write_str("no end magic number"),
            TrailerProblem::IndexPlacement {
                index_offset,
                file_len,
            } => write!(
                f,
                "the index is recorded at offset {index_offset}, which does not fit a {file_len}-byte file"
            ),
        }
    }
}

/// What is wrong with a block index.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexProblem {
    /// The index bytes do not match the checksum in the trailer.
    Checksum {
        /// The recorded xxh3.
        expected: u64,
        /// The xxh3 of the index read.
        actual: u64,
    },
    /// The index has another number of blocks than the data section needs.
    BlockCount {
        /// Blocks the trailer records.
        recorded: u64,
        /// Blocks the data section needs.
        needed: u64,
    },
    /// A block does not start where the previous one ended.
    Offset {
        /// Where the entry says it starts.
        offset: u64,
        /// Where the previous block ends.
        expected: u64,
    },
    /// A block's codec is unknown.
    Codec(u8),
    /// A block's stored length is impossible for its codec.
    StoredLength {
        /// The stored length.
        stored: u32,
        /// The block's original length.
        raw: u64,
    },
    /// A reserved byte of an entry is not zero.
    Reserved,
    /// The blocks do not end where the index starts.
    End {
        /// Where the last block ends.
        end: u64,
        /// Where the index starts.
        index_offset: u64,
    },
}

impl fmt::Display for IndexProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexProblem::Checksum { expected, actual } => write!(
                f,
                "checksum mismatch (xxh3 {actual:016x}, recorded {expected:016x})"
            ),
            IndexProblem::BlockCount { recorded, needed } => write!(
                f,
                "{recorded} blocks recorded but the data section needs {needed}"
            ),
            IndexProblem::Offset { offset, expected } => write!(
                f,
                "starts at file offset {offset} but the previous block ends at {expected}"
            ),
            IndexProblem::Codec(c) => write!(f, "unknown codec {c}"),
            IndexProblem::StoredLength { stored, raw } => write!(
                f,
                "{stored} stored bytes is impossible for a block of {raw} bytes"
            ),
            IndexProblem::Reserved => f.write_str("a reserved byte is not zero"),
            IndexProblem::End { end, index_offset } => write!(
                f,
                "the blocks end at file offset {end} but the index starts at {index_offset}"
            ),
        }
    }
}

fn block_suffix(block: Option<u64>) -> String {
    block.map(|b| format!(", block {b}")).unwrap_or_default()
}

fn tensor_suffix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!(" (tensor '{t}')"),
        None => String::new(),
    }
}

fn bad_lines(lines: &[(usize, String)]) -> String {
    lines
        .iter()
        .map(|(n, text)| format!("\n  - line {n} is not '<64 hex digits>  <file name>': {text:?}"))
        .collect()
}

fn list(what: &str, names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!("\n  {what}: {}", names.join(", "))
    }
}
