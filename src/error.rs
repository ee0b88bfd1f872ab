//! The library's error types: one top-level [`Error`], and one enum per area with a variant per
//! way things go wrong there ([`HeaderError`], [`IndexError`], [`ModelError`], …).
//!
//! Every variant carries what a user needs to act on it — the file, the tensor where there is
//! one, the numbers involved — as fields, not as a reason string, so that callers and tests can
//! match on them. The `Display` texts are the messages the command line prints. `main.rs` turns
//! an [`Error`] into a message and an exit code ([`Error::exit_code`]); no other module prints
//! errors. This module decides nothing: it only describes.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::format::header::MAX_HEADER_LEN;
use crate::format::Dtype;
use crate::kernel::IsaError;
use crate::plan::Part;

/// Everything that can go wrong in mergestream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on a file failed (open, read, write, rename, …).
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done, e.g. `"opening shard"`.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A safetensors file is malformed: its header, or one tensor's entry in it.
    #[error("{}: {kind}", path.display())]
    Header {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong with it.
        kind: HeaderError,
    },
    /// A `model.safetensors.index.json` is malformed or disagrees with its shards.
    #[error("{}: {kind}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        kind: IndexError,
    },
    /// A path given as a model is not one.
    #[error("{}: {kind}", path.display())]
    Model {
        /// The model path, or the file of it that is wrong.
        path: PathBuf,
        /// What is wrong with it.
        kind: ModelError,
    },
    /// The two models do not match; every mismatch is listed.
    #[error("the models do not match ({} problem{}; --sft {}, --aligned {}):\n{}", problems.len(), plural(problems.len()), sft.display(), aligned.display(), bullet_list(problems))]
    Mismatch {
        /// The SFT model, as named.
        sft: PathBuf,
        /// The aligned model, as named.
        aligned: PathBuf,
        /// Every mismatch, sorted by tensor.
        problems: Vec<Mismatch>,
    },
    /// An input file changed (truncated, rewritten, replaced) while the run read it.
    #[error("{}: input changed while reading: {change}", path.display())]
    InputChanged {
        /// The input file.
        path: PathBuf,
        /// How it changed.
        change: InputChange,
    },
    /// An output would overlap an input: written into it, around it, or over one of its files.
    /// Checked before anything is created or removed ([`crate::paths::check_overlap`]).
    #[error("{}", describe_overlap(output, input, location, *storage, kind))]
    Overlap {
        /// The output directory, as named.
        output: PathBuf,
        /// The input model, as named.
        input: PathBuf,
        /// Where they meet: the input model's directory, the directory its links point into
        /// (`storage`), or an input file; canonical.
        location: PathBuf,
        /// Whether `location` is where the input model's links point (a Hugging Face cache's
        /// `blobs/`), not the model directory itself.
        storage: bool,
        /// How they overlap.
        kind: OverlapKind,
    },
    /// The output directory cannot be used as asked.
    #[error("{}: {kind}", path.display())]
    Output {
        /// The output directory (or the record file that is wrong).
        path: PathBuf,
        /// Why it cannot be used.
        kind: OutputError,
    },
    /// Another run holds the lock on this output (or this part of it).
    #[error("{}: another mergestream run is writing {} here ({holder})", path.display(), locked_task(part))]
    Locked {
        /// The output directory.
        path: PathBuf,
        /// The part whose lock is held, or `None` for `finalize`'s lock.
        part: Option<Part>,
        /// What the lock file says about its holder (`pid N`).
        holder: String,
    },
    /// `finalize` found the parts' records incomplete or inconsistent.
    #[error("{}: cannot finalize:\n{}", path.display(), bullet_list(problems))]
    Parts {
        /// The output directory.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<PartsProblem>,
    },
    /// `verify` found problems; each cause is listed once, with its consequences under it.
    #[error("{}: verification failed ({} problem{}):\n{}", path.display(), problems.len(), plural(problems.len()), bullet_list(problems))]
    Verify {
        /// The output directory.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<VerifyProblem>,
    },
    /// SIGINT or SIGTERM arrived; temporaries were removed.
    #[error("interrupted by {}", signal_name(*signal))]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// The models of a merge config do not match; every problem is listed.
    #[error("the models do not match ({} problem{}):\n{}", problems.len(), plural(problems.len()), bullet_list(problems))]
    Disagree {
        /// Every problem, sorted by tensor.
        problems: Vec<Disagreement>,
    },
    /// A merge config is malformed or asks for what cannot be done (checked before any weight
    /// is read).
    #[error("{}: {source}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<crate::spec::SpecError>,
    },
    /// A model named on the command line (a path, or a Hugging Face id looked up in the local
    /// cache) cannot be found.
    #[error("{0}")]
    ModelReference(Box<crate::spec::SpecError>),
    /// A tensor's merge cannot be set up or run with the parameters it resolved to. Build it
    /// with [`Error::method`], which makes a failure of the protocol between the pipeline and
    /// an op an [`Error::Internal`] instead.
    #[error("{}", method_message(tensor, source))]
    Method {
        /// The tensor.
        tensor: String,
        /// What the method said.
        #[source]
        source: MethodFailure,
    },
    /// A packed shard or directory is malformed, or packing cannot proceed.
    #[error(transparent)]
    Packed(Box<crate::packed::PackedError>),
    /// `--check`: the recomputed merge is not what the existing model holds (each tensor's
    /// outcome is in the report printed before).
    #[error("{}: not identical to the recomputed merge: {differing} of {tensors} tensors differ, {missing} missing, {extra} not produced by the merge", path.display())]
    CheckDiffers {
        /// The existing model directory (or the directory holding several).
        path: PathBuf,
        /// Tensors the merge produces.
        tensors: usize,
        /// Of those, tensors the existing model holds with other bytes, dtype or shape.
        differing: usize,
        /// Of those, tensors the existing model lacks.
        missing: usize,
        /// Tensors of the existing model the merge does not produce.
        extra: usize,
    },
    /// The request cannot be done as asked (options, environment).
    #[error("{0}")]
    Usage(UsageError),
    /// The signal handlers that make Ctrl-C safe could not be installed.
    #[error("cannot install a signal handler: {source}")]
    SignalHandler {
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A broken internal invariant: a bug in mergestream, not a problem with the input.
    #[error("internal error: {what} (this is a bug in mergestream; please report it)")]
    Internal {
        /// Which invariant broke.
        what: String,
    },
    /// A PyTorch checkpoint (`.bin`) is malformed, unsupported or malicious; the error names
    /// the file (and the member, tensor or pickle global where there is one).
    #[error(transparent)]
    Torch(Box<crate::format::torch::TorchError>),
}

impl From<crate::format::torch::TorchError> for Error {
    fn from(e: crate::format::torch::TorchError) -> Error {
        Error::Torch(Box::new(e))
    }
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit code for this error: 1 when the models do not match, `verify` or
    /// `--check` found problems or `finalize` found the parts wanting; 128+N on signal N; 70 (`EX_SOFTWARE`)
    /// for an internal error; 2 for everything else (usage, input and I/O errors).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Mismatch { .. }
            | Error::Disagree { .. }
            | Error::Verify { .. }
            | Error::CheckDiffers { .. }
            | Error::Parts { .. } => 1,
            Error::Interrupted { signal } => 128 + signal,
            Error::Internal { .. } => 70,
            _ => 2,
        }
    }

    /// An [`Error::Io`] on `path` while doing `what`.
    pub fn io(path: impl AsRef<Path>, what: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            what,
            source,
        }
    }

    /// An [`Error::Header`] for the file at `path`.
    pub fn header(path: impl AsRef<Path>, kind: HeaderError) -> Error {
        Error::Header {
            path: path.as_ref().to_path_buf(),
            kind,
        }
    }

    /// An [`Error::Index`] for the index at `path`.
    pub fn index(path: impl AsRef<Path>, kind: IndexError) -> Error {
        Error::Index {
            path: path.as_ref().to_path_buf(),
            kind,
        }
    }

    /// An [`Error::Model`] for `path`.
    pub fn model(path: impl AsRef<Path>, kind: ModelError) -> Error {
        Error::Model {
            path: path.as_ref().to_path_buf(),
            kind,
        }
    }

    /// An [`Error::Output`] for `path`.
    pub fn output(path: impl AsRef<Path>, kind: OutputError) -> Error {
        Error::Output {
            path: path.as_ref().to_path_buf(),
            kind,
        }
    }

    /// An [`Error::Method`] for `tensor`, or an [`Error::Internal`] when `failure` can only
    /// come from the pipeline driving the op against its protocol
    /// ([`MethodFailure::is_protocol`]), not from the input or the config.
    pub fn method(tensor: impl Into<String>, failure: impl Into<MethodFailure>) -> Error {
        let tensor = tensor.into();
        let source = failure.into();
        if source.is_protocol() {
            return Error::internal(method_message(&tensor, &source));
        }
        Error::Method { tensor, source }
    }

    /// An [`Error::Internal`]: `what` invariant broke.
    pub fn internal(what: impl Into<String>) -> Error {
        Error::Internal { what: what.into() }
    }

    /// The tensor this error is about, if it is about one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            Error::Header { kind, .. } => kind.tensor(),
            Error::Index { kind, .. } => kind.tensor(),
            Error::Model {
                kind: ModelError::TensorInTwoShards { tensor, .. },
                ..
            } => Some(tensor),
            Error::InputChanged {
                change: InputChange::EndsEarly { tensor, .. },
                ..
            } => Some(tensor),
            Error::Torch(e) => e.tensor(),
            _ => None,
        }
    }
}

/// One way a safetensors header (or one tensor's entry in it) can be wrong. Each names the
/// tensor where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file is too short to hold the 8-byte header length.
    #[error("file is {len} bytes long, too short to be safetensors (needs at least 8)")]
    TooShort {
        /// The file's length.
        len: u64,
    },
    /// The header length is larger than any real header ([`MAX_HEADER_LEN`]).
    #[error("header length {len} exceeds the limit of {MAX_HEADER_LEN} bytes")]
    TooLarge {
        /// The header length the file gives.
        len: u64,
    },
    /// The header length runs past the end of the file.
    #[error("header length {len} runs past the end of the file ({file_len} bytes)")]
    PastEndOfFile {
        /// The header length the file gives.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header is not UTF-8.
    #[error("header is not valid UTF-8 (at byte {valid_up_to})")]
    NotUtf8 {
        /// Bytes of valid UTF-8 before the first invalid one.
        valid_up_to: usize,
    },
    /// The header is JSON, but not an object.
    #[error("header is not a JSON object")]
    NotObject,
    /// The header is not JSON.
    #[error("header is not valid JSON: {json}")]
    NotJson {
        /// What the JSON parser said (with line and column).
        json: serde_json::Error,
    },
    /// A name appears twice among the header's keys.
    #[error("tensor '{tensor}': appears twice in the header")]
    DuplicateTensor {
        /// The name.
        tensor: String,
    },
    /// A tensor's entry is not a JSON object.
    #[error("tensor '{tensor}': entry is not a JSON object")]
    EntryNotObject {
        /// The tensor.
        tensor: String,
    },
    /// `__metadata__` is neither an object nor `null`.
    #[error("__metadata__ is not a JSON object")]
    MetadataNotObject,
    /// A `__metadata__` value is not a string.
    #[error("__metadata__ value of '{key}' is not a string")]
    MetadataNotString {
        /// The metadata key.
        key: String,
    },
    /// A field of a tensor's entry appears twice.
    #[error("tensor '{tensor}': field '{field}' appears twice")]
    DuplicateField {
        /// The tensor.
        tensor: String,
        /// `dtype`, `shape` or `data_offsets`.
        field: &'static str,
    },
    /// A tensor's entry lacks a required field.
    #[error("tensor '{tensor}': missing field '{field}'")]
    MissingField {
        /// The tensor.
        tensor: String,
        /// `dtype`, `shape` or `data_offsets`.
        field: &'static str,
    },
    /// `dtype` is not a string.
    #[error("tensor '{tensor}': dtype {value} is not a string")]
    DtypeNotString {
        /// The tensor.
        tensor: String,
        /// The value, as JSON.
        value: String,
    },
    /// `dtype` names no dtype of the format.
    #[error("tensor '{tensor}': unknown dtype '{dtype}'")]
    UnknownDtype {
        /// The tensor.
        tensor: String,
        /// The dtype as written.
        dtype: String,
    },
    /// `dtype` is a sub-byte type of the format (F4, F6), which mergestream does not support.
    #[error("tensor '{tensor}': dtype {dtype} packs elements into less than a byte, which mergestream does not support")]
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// The dtype as written.
        dtype: String,
    },
    /// `shape` is not an array.
    #[error("tensor '{tensor}': shape is not an array")]
    ShapeNotArray {
        /// The tensor.
        tensor: String,
    },
    /// A dimension of `shape` is not a non-negative integer.
    #[error("tensor '{tensor}': shape dimension {value} is not a non-negative integer")]
    BadDimension {
        /// The tensor.
        tensor: String,
        /// The dimension, as JSON.
        value: String,
    },
    /// The element count overflows 64 bits.
    #[error("tensor '{tensor}': shape {shape} has more elements than fit in 64 bits")]
    TooManyElements {
        /// The tensor.
        tensor: String,
        /// The shape, as JSON.
        shape: String,
    },
    /// The byte count overflows 64 bits.
    #[error("tensor '{tensor}': shape {shape:?} of {dtype} is larger than 2^64 bytes")]
    TooManyBytes {
        /// The tensor.
        tensor: String,
        /// The dtype.
        dtype: Dtype,
        /// The shape.
        shape: Vec<u64>,
    },
    /// `data_offsets` is not a pair of non-negative integers.
    #[error("tensor '{tensor}': data_offsets {value} is not two non-negative integers")]
    OffsetsNotPair {
        /// The tensor.
        tensor: String,
        /// The value, as JSON.
        value: String,
    },
    /// The end offset is before the start.
    #[error("tensor '{tensor}': data_offsets [{start}, {end}] end before they start")]
    OffsetsReversed {
        /// The tensor.
        tensor: String,
        /// Start offset.
        start: u64,
        /// End offset.
        end: u64,
    },
    /// The byte range does not match dtype × shape.
    #[error("tensor '{tensor}': data_offsets [{start}, {end}] span {} bytes but {dtype} {shape:?} needs {needed}", end - start)]
    WrongLength {
        /// The tensor.
        tensor: String,
        /// Start offset.
        start: u64,
        /// End offset.
        end: u64,
        /// The dtype.
        dtype: Dtype,
        /// The shape.
        shape: Vec<u64>,
        /// Bytes that dtype and shape need.
        needed: u64,
    },
    /// The tensor's bytes overlap the previous tensor's.
    #[error("tensor '{tensor}': data_offsets [{start}, {end}] overlap the previous tensor (which ends at {previous_end})")]
    Overlap {
        /// The tensor.
        tensor: String,
        /// Start offset.
        start: u64,
        /// End offset.
        end: u64,
        /// Where the previous tensor (by offset) ends.
        previous_end: u64,
    },
    /// Bytes between the previous tensor and this one belong to no tensor.
    #[error("tensor '{tensor}': data_offsets [{start}, {end}] leave a gap of {} bytes after the previous tensor", start - previous_end)]
    Gap {
        /// The tensor.
        tensor: String,
        /// Start offset.
        start: u64,
        /// End offset.
        end: u64,
        /// Where the previous tensor (by offset) ends.
        previous_end: u64,
    },
    /// The tensors run past the end of the data section.
    #[error("{}data_offsets end at {end}, past the end of the data section ({data_len} bytes; file truncated?)", tensor_prefix(tensor))]
    PastEndOfData {
        /// The last tensor by offset.
        tensor: Option<String>,
        /// Where the tensors end.
        end: u64,
        /// The data section's length.
        data_len: u64,
    },
    /// The data section holds bytes after the last tensor.
    #[error("{}tensors cover {covered} bytes but the data section is {data_len} bytes (trailing bytes not indexed)", tensor_prefix(tensor))]
    TrailingBytes {
        /// The last tensor by offset, if any.
        tensor: Option<String>,
        /// Bytes the tensors cover.
        covered: u64,
        /// The data section's length.
        data_len: u64,
    },
}

impl HeaderError {
    /// The tensor this is about, if any.
    pub fn tensor(&self) -> Option<&str> {
        use HeaderError::*;
        match self {
            DuplicateTensor { tensor }
            | EntryNotObject { tensor }
            | DuplicateField { tensor, .. }
            | MissingField { tensor, .. }
            | DtypeNotString { tensor, .. }
            | UnknownDtype { tensor, .. }
            | UnsupportedDtype { tensor, .. }
            | ShapeNotArray { tensor }
            | BadDimension { tensor, .. }
            | TooManyElements { tensor, .. }
            | TooManyBytes { tensor, .. }
            | OffsetsNotPair { tensor, .. }
            | OffsetsReversed { tensor, .. }
            | WrongLength { tensor, .. }
            | Overlap { tensor, .. }
            | Gap { tensor, .. } => Some(tensor),
            PastEndOfData { tensor, .. } | TrailingBytes { tensor, .. } => tensor.as_deref(),
            TooShort { .. }
            | TooLarge { .. }
            | PastEndOfFile { .. }
            | NotUtf8 { .. }
            | NotObject
            | NotJson { .. }
            | MetadataNotObject
            | MetadataNotString { .. } => None,
        }
    }
}

/// One way a shard index can be wrong, on its own or against its shards.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// The file is larger than any index should be.
    #[error("{len} bytes is larger than any index should be")]
    TooLarge {
        /// The file's length.
        len: u64,
    },
    /// The index is not UTF-8.
    #[error("not valid UTF-8 (at byte {valid_up_to})")]
    NotUtf8 {
        /// Bytes of valid UTF-8 before the first invalid one.
        valid_up_to: usize,
    },
    /// The index is not JSON.
    #[error("not valid JSON: {json}")]
    NotJson {
        /// What the JSON parser said.
        json: serde_json::Error,
    },
    /// The index is JSON, but not an object.
    #[error("not a JSON object")]
    NotObject,
    /// The index has no `weight_map`.
    #[error("has no \"weight_map\"")]
    NoWeightMap,
    /// `weight_map` is not an object of strings.
    #[error("\"weight_map\" is malformed: {json}")]
    WeightMapMalformed {
        /// What the JSON parser said.
        json: serde_json::Error,
    },
    /// `weight_map` is empty.
    #[error("\"weight_map\" lists no tensors")]
    Empty,
    /// A tensor is listed twice.
    #[error("tensor '{tensor}': listed twice in \"weight_map\"")]
    ListedTwice {
        /// The tensor.
        tensor: String,
    },
    /// A shard name is not a string.
    #[error("tensor '{tensor}': shard {value} is not a string")]
    ShardNotString {
        /// The tensor.
        tensor: String,
        /// The value, as JSON.
        value: String,
    },
    /// A shard name is empty, `.` or `..`.
    #[error("tensor '{tensor}': shard name '{shard}' is not a file name")]
    ShardNotFileName {
        /// The tensor.
        tensor: String,
        /// The shard name.
        shard: String,
    },
    /// A shard name is a path; shards must be plain file names in the model directory.
    #[error("tensor '{tensor}': shard name '{shard}' is a path; shards must be plain file names in the model directory")]
    ShardIsPath {
        /// The tensor.
        tensor: String,
        /// The shard name.
        shard: String,
    },
    /// The index lists a tensor in one shard; it is in another.
    #[error("tensor '{tensor}': listed in {listed}, but it is in {actual}")]
    WrongShard {
        /// The tensor.
        tensor: String,
        /// The shard the index names.
        listed: String,
        /// The shard that holds it.
        actual: String,
    },
    /// The index lists a tensor in a shard that does not hold it (nor does any other).
    #[error("tensor '{tensor}': listed in {shard}, which does not contain it")]
    NotInShard {
        /// The tensor.
        tensor: String,
        /// The shard the index names.
        shard: String,
    },
    /// A shard holds a tensor the index does not list.
    #[error("tensor '{tensor}': is in {shard} but the index does not list it")]
    Unlisted {
        /// The tensor.
        tensor: String,
        /// The shard that holds it.
        shard: String,
    },
}

impl IndexError {
    /// The tensor this is about, if any.
    pub fn tensor(&self) -> Option<&str> {
        use IndexError::*;
        match self {
            ListedTwice { tensor }
            | ShardNotString { tensor, .. }
            | ShardNotFileName { tensor, .. }
            | ShardIsPath { tensor, .. }
            | WrongShard { tensor, .. }
            | NotInShard { tensor, .. }
            | Unlisted { tensor, .. } => Some(tensor),
            TooLarge { .. }
            | NotUtf8 { .. }
            | NotJson { .. }
            | NotObject
            | NoWeightMap
            | WeightMapMalformed { .. }
            | Empty => None,
        }
    }
}

/// Why a path given as a model is not one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The path is neither a file nor a directory.
    #[error("is neither a weights file (safetensors or PyTorch .bin) nor a model directory")]
    NotAModel,
    /// The directory has no index and no single weights file, in either format.
    #[error(
        "not a model: no {}, {}, {} or {} in this directory",
        crate::format::index::INDEX_FILE,
        crate::model::SINGLE_FILE,
        crate::format::torch::INDEX_FILE,
        crate::format::torch::SINGLE_FILE
    )]
    NoWeights,
    /// A shard (or the index) is a directory.
    #[error("is a directory, not a file")]
    IsDirectory,
    /// A shard (or the index) is a FIFO, socket or device, refused before it is opened.
    #[error("is not a regular file (a FIFO, socket or device?)")]
    NotRegularFile,
    /// Two shards hold a tensor of the same name.
    #[error("tensor '{tensor}' is also in {}", other.display())]
    TensorInTwoShards {
        /// The tensor.
        tensor: String,
        /// The other shard holding it.
        other: PathBuf,
    },
    /// The model holds no tensors.
    #[error("the model has no tensors")]
    NoTensors,
}

/// One way two models disagree about one tensor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mismatch {
    /// The tensor.
    pub tensor: String,
    /// How they disagree.
    pub kind: MismatchKind,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tensor '{}': {}", self.tensor, self.kind)
    }
}

/// How two models disagree about a tensor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[non_exhaustive]
pub enum MismatchKind {
    /// Only the aligned model has it.
    #[error("missing from the SFT model (--sft)")]
    MissingFromSft,
    /// Only the SFT model has it.
    #[error("missing from the aligned model (--aligned)")]
    MissingFromAligned,
    /// The shapes differ.
    #[error("shape {aligned:?} in --aligned but {sft:?} in --sft")]
    Shape {
        /// The aligned model's shape.
        aligned: Vec<u64>,
        /// The SFT model's shape.
        sft: Vec<u64>,
    },
    /// The dtypes differ, and are not two float types (which merge as a mixed-precision pair).
    #[error("dtype {aligned} in --aligned but {sft} in --sft")]
    Dtype {
        /// The aligned model's dtype.
        aligned: Dtype,
        /// The SFT model's dtype.
        sft: Dtype,
    },
    /// A float weight only the aligned model has (copied with `--only-in-aligned copy`).
    #[error("missing from the SFT model (--sft) (pass --only-in-aligned copy to copy it from --aligned)")]
    OnlyInAligned,
    /// The shapes differ in the first dimension only, as vocabularies of different sizes do
    /// (merged with `--vocab-mismatch copy-aligned`).
    #[error("shape {aligned:?} in --aligned but {sft:?} in --sft (only the first dimension differs: pass --vocab-mismatch copy-aligned to merge the shared rows and copy the aligned model's extra ones)")]
    Rows {
        /// The aligned model's shape.
        aligned: Vec<u64>,
        /// The SFT model's shape.
        sft: Vec<u64>,
    },
    /// Neither merged (BF16, F16, F32) nor copied (integers, booleans).
    #[error(
        "dtype {dtype} cannot be merged (BF16, F16 and F32 are merged; integer tensors are copied)"
    )]
    Unmergeable {
        /// The dtype.
        dtype: Dtype,
    },
}

/// One way the models of a merge config disagree about a tensor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Disagreement {
    /// The tensor.
    pub tensor: String,
    /// How they disagree.
    pub kind: DisagreementKind,
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tensor '{}': {}", self.tensor, self.kind)
    }
}

/// How the models of a merge config disagree about a tensor. Models are named as the config
/// places them and as written there: `models[1] (org/name)`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[non_exhaustive]
pub enum DisagreementKind {
    /// A model lacks a tensor the layout model has.
    #[error("missing from {model} (pass --only-in-base copy to copy it from {layout})")]
    Missing {
        /// The model lacking it.
        model: String,
        /// The model the output takes its tensors from.
        layout: String,
    },
    /// The layout model lacks a tensor another model has.
    #[error("in {model} but missing from {layout} (the output takes its tensors)")]
    NotInLayout {
        /// The model having it.
        model: String,
        /// The model the output takes its tensors from.
        layout: String,
    },
    /// The shapes differ.
    #[error("shape {shape:?} in {layout} but {other:?} in {model}")]
    Shape {
        /// The other model.
        model: String,
        /// Its shape.
        other: Vec<u64>,
        /// The model the output takes its tensors from.
        layout: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// The shapes differ in the first dimension only, as vocabularies of different sizes do
    /// (merged with `--vocab-mismatch copy-base`).
    #[error("shape {shape:?} in {layout} but {other:?} in {model} (only the first dimension differs: pass --vocab-mismatch copy-base to merge the rows all models have and copy {layout}'s extra rows)")]
    Rows {
        /// The other model.
        model: String,
        /// Its shape.
        other: Vec<u64>,
        /// The model the output takes its tensors from.
        layout: String,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// With `--vocab-mismatch copy-base`, the extra rows would be copied into an output of
    /// another dtype than the layout model stores them in.
    #[error("{layout} stores it as {stored} but the merge writes {out}: its extra rows cannot be copied unchanged (set out_dtype to {stored}, or merge models with the same vocabulary size)")]
    ExtraRowsDtype {
        /// The model the output takes its tensors from.
        layout: String,
        /// Its storage dtype.
        stored: Dtype,
        /// The output dtype.
        out: Dtype,
    },
    /// A dtype that cannot be merged.
    #[error("dtype {dtype} in {model} cannot be merged (BF16, F16 and F32 are merged; integer tensors are copied)")]
    Dtype {
        /// The model.
        model: String,
        /// Its dtype.
        dtype: Dtype,
    },
}

/// Why a tensor's merge cannot be set up or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MethodFailure {
    /// A statistics method (TIES, SLERP, DARE, …).
    #[error(transparent)]
    Method(#[from] crate::kernel::methods::MethodError),
    /// `linear` or `task_arithmetic`.
    #[error(transparent)]
    Combine(#[from] crate::kernel::linear::CombineError),
    /// A parameter could not be resolved for the tensor.
    #[error(transparent)]
    Parameter(Box<crate::spec::SpecError>),
    /// The method works on more elements at a time than a chunk of the size asked for
    /// (`--chunk-size`) holds.
    #[error("its merge method works on {granule} elements at a time ({bytes} bytes), more than a chunk holds ({chunk} bytes)")]
    ChunkTooSmall {
        /// Elements the method works on at a time (a block, or a row).
        granule: u64,
        /// Their bytes at the widest dtype.
        bytes: u64,
        /// Bytes of a chunk.
        chunk: u64,
    },
    /// A row the method works on whole (DELLA's ranks, model_stock's `filter_wise`) needs
    /// chunk buffers larger than `--memory` allows.
    #[error("its merge method works on rows of {granule} elements ({bytes} bytes per chunk buffer), and the chunk buffers for them need more than --memory {} allows: raise --memory to at least {}", crate::units::ByteSize(*memory), crate::units::ByteSize(needed.div_ceil(1 << 20) << 20))]
    RowTooLong {
        /// Elements of a row (or of the run's common multiple of the ops' granules).
        granule: u64,
        /// Their bytes at the widest dtype.
        bytes: u64,
        /// `--memory`.
        memory: u64,
        /// The smallest `--memory` that holds them.
        needed: u64,
    },
}

impl From<crate::spec::SpecError> for MethodFailure {
    fn from(e: crate::spec::SpecError) -> MethodFailure {
        MethodFailure::Parameter(Box::new(e))
    }
}

impl MethodFailure {
    /// Whether this can only come from the pipeline driving an op against its protocol (see
    /// [`MethodError::is_protocol`](crate::kernel::methods::MethodError::is_protocol)): a bug
    /// in mergestream, not a problem with the input or the config.
    pub fn is_protocol(&self) -> bool {
        match self {
            MethodFailure::Method(e) => e.is_protocol(),
            MethodFailure::Combine(_)
            | MethodFailure::Parameter(_)
            | MethodFailure::ChunkTooSmall { .. }
            | MethodFailure::RowTooLong { .. } => false,
        }
    }
}

/// `tensor 'NAME': ` and `source`'s message, which names the tensor only where it is a
/// [`SpecError::Unresolved`](crate::spec::SpecError::Unresolved) (a config problem that names
/// the tensor it could not be resolved for): then the message alone. The kernels' errors do
/// not name the tensor.
fn method_message(tensor: &str, source: &MethodFailure) -> String {
    match source {
        MethodFailure::Parameter(e) if matches!(**e, crate::spec::SpecError::Unresolved { .. }) => {
            e.to_string()
        }
        _ => format!("tensor '{tensor}': {source}"),
    }
}

/// How an input file changed while a run read it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputChange {
    /// Its length changed.
    #[error("its length changed from {from} to {to} bytes")]
    Length {
        /// The length when opened.
        from: u64,
        /// The length now.
        to: u64,
    },
    /// It was modified in place.
    #[error("it was modified (its modification time changed)")]
    Modified,
    /// It ended before a tensor's data.
    #[error("the file ends before the data of tensor '{tensor}' (at byte {offset}): truncated while being read?")]
    EndsEarly {
        /// The tensor being read.
        tensor: String,
        /// The file offset of the read.
        offset: u64,
    },
}

/// How an output would overlap an input (see [`Error::Overlap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverlapKind {
    /// The output directory is the input's directory.
    Same,
    /// The output directory lies inside it.
    OutputInsideInput,
    /// The output directory contains it.
    InputInsideOutput,
    /// A file already in the output directory is an input file: a hard link of it, or a
    /// symbolic link to it. Writing the output would replace it.
    SharesFile {
        /// The file in the output directory.
        output_file: PathBuf,
    },
}

/// Why an output directory cannot be used as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// `--out` exists and is not a directory.
    #[error("exists and is not a directory")]
    NotADirectory,
    /// `--out` does not exist and its parent is not a directory.
    #[error("cannot be created: {} is not a directory", parent.display())]
    ParentNotADirectory {
        /// The parent.
        parent: PathBuf,
    },
    /// A file cannot be created in the directory.
    #[error("is not writable: {source}")]
    NotWritable {
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The directory holds a finished output (it has `checksums.b3`).
    #[error("is already a finished output (it has {}){}; use another --out, or pass --force to replace it", crate::plan::MANIFEST_FILE, finished_part(part))]
    Finished {
        /// The part asking, for a partitioned run.
        part: Option<Part>,
    },
    /// The directory holds files other than this run's.
    #[error(
        "is not empty (holds {}); pass --force to replace earlier output",
        first_names(files)
    )]
    NotEmpty {
        /// The files, sorted.
        files: Vec<String>,
    },
    /// The directory holds an earlier run of this part.
    #[error("holds {} run of part {part} ({files} files done); pass --resume to {} or --force to start over", if *complete { "a finished" } else { "an unfinished" }, if *complete { "keep it" } else { "finish it" })]
    HoldsRun {
        /// The part.
        part: Part,
        /// Whether that run completed.
        complete: bool,
        /// Files it finished.
        files: usize,
    },
    /// `--resume` found a run of this part made with other inputs or options.
    #[error(
        "holds a run of part {part} made with other inputs or options; pass --force to start over"
    )]
    OtherRun {
        /// The part.
        part: Part,
    },
    /// `finalize` on a finalized directory.
    #[error("is already finalized (it has a checksums.b3 and no work directory)")]
    AlreadyFinalized,
    /// `finalize` on a directory no part has written to.
    #[error(
        "has no {} directory: no part of a run has written here",
        crate::output::WORK_DIR
    )]
    NothingToFinalize,
    /// The work directory lacks the plan record the parts name.
    #[error("the plan record is missing from the work directory")]
    PlanRecordMissing,
    /// A record file of the work directory does not parse.
    #[error("is corrupt ({json}); rerun with --force")]
    RecordCorrupt {
        /// What the JSON parser said.
        json: serde_json::Error,
    },
    /// A part's record of one file is corrupt.
    #[error("the record of {name} is corrupt")]
    FileRecordCorrupt {
        /// The file.
        name: String,
    },
}

/// One reason `finalize` refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PartsProblem {
    /// No part has written a record.
    #[error("no part has recorded any work")]
    NoRecords,
    /// Records of runs split into different numbers of parts are present.
    #[error("records of runs split in different ways are present (into {} parts: {}); remove the records of the split you do not want from {}/", join(counts), join(parts), crate::output::WORK_DIR)]
    MixedSplits {
        /// The part counts seen.
        counts: Vec<u32>,
        /// Every part with a record.
        parts: Vec<Part>,
    },
    /// A part has no record.
    #[error("part {part} has no record: did its task run?")]
    MissingPart {
        /// The part.
        part: Part,
    },
    /// A part has not finished.
    #[error("part {part} is not complete ({files} files done)")]
    IncompletePart {
        /// The part.
        part: Part,
        /// Files it finished.
        files: usize,
    },
    /// Parts were planned from different inputs or options.
    #[error(
        "parts were made with different inputs or options: {}",
        plan_groups(groups)
    )]
    DifferentPlans {
        /// Each plan fingerprint (hex) with the parts made from it.
        groups: Vec<(String, Vec<Part>)>,
    },
    /// A recorded file is missing or has another size.
    #[error("{name} is missing or not the size its part recorded")]
    FileChanged {
        /// The file.
        name: String,
    },
    /// A file of the plan was written by no part.
    #[error("{name} was written by no part")]
    Unwritten {
        /// The file.
        name: String,
    },
    /// The run hashes its inputs (`--hash-inputs`), but no part recorded the hashes.
    #[error("part {part} recorded no input hashes (a run with --hash-inputs hashes them in part {part})")]
    InputsUnhashed {
        /// The part that hashes.
        part: Part,
    },
}

/// One problem `verify` found: a cause, with what follows from it.
#[derive(Debug)]
pub struct VerifyProblem {
    /// What is wrong.
    pub cause: VerifyCause,
    /// What could not be checked, or is wrong too, because of it.
    pub consequences: Vec<VerifyConsequence>,
}

impl VerifyProblem {
    /// A problem with no consequences.
    pub fn new(cause: VerifyCause) -> VerifyProblem {
        VerifyProblem {
            cause,
            consequences: Vec::new(),
        }
    }
}

impl fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.cause)?;
        for c in &self.consequences {
            write!(f, "\n      - {c}")?;
        }
        Ok(())
    }
}

/// What `verify` can find wrong with an output directory. `manifest` is the manifest the
/// files are checked against: `checksums.b3`, or for a packed output `packed.b3` (the packed
/// files as they are).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyCause {
    /// The manifest cannot be read.
    #[error("{manifest} cannot be read: {source}")]
    ManifestUnreadable {
        /// The manifest.
        manifest: &'static str,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A line of a manifest is malformed.
    #[error("{manifest}: line {line} is not '<64 hex digits>  <file name>': {text:?}")]
    ManifestLine {
        /// The manifest.
        manifest: &'static str,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A manifest lists a file more than once.
    #[error("{manifest} lists {name} more than once")]
    ListedTwice {
        /// The manifest.
        manifest: &'static str,
        /// The file.
        name: String,
    },
    /// A listed file cannot be read (missing, unreadable).
    #[error("{name}: cannot be read: {source}")]
    Unreadable {
        /// The file.
        name: String,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A listed file's blake3 differs from the manifest's.
    #[error("{name}: blake3 is {actual} but {manifest} says {recorded}")]
    HashMismatch {
        /// The manifest.
        manifest: &'static str,
        /// The file.
        name: String,
        /// Its blake3 now, hex.
        actual: String,
        /// The manifest's, hex.
        recorded: String,
    },
    /// A file the manifest does not list.
    #[error("{name} is not listed in {manifest}")]
    Unlisted {
        /// The manifest.
        manifest: &'static str,
        /// The file.
        name: String,
    },
    /// In a packed output, `checksums.b3` (the unpacked files' manifest) does not list what
    /// `unpack` would restore from the files `packed.b3` lists.
    #[error(
        "{}: does not list the files unpack restores ({})",
        crate::plan::MANIFEST_FILE,
        listing_difference(unlisted, missing)
    )]
    UnpackedListing {
        /// Files unpack restores that it does not list.
        unlisted: Vec<String>,
        /// Files it lists that unpack does not restore.
        missing: Vec<String>,
    },
    /// In a packed output, a file carried as it is has another blake3 in `checksums.b3` than
    /// in `packed.b3`.
    #[error("{name}: {} records blake3 {unpacked} but {} records {packed} (it is carried as it is, so they must agree)", crate::plan::MANIFEST_FILE, crate::packed::PACKED_MANIFEST)]
    ManifestsDisagree {
        /// The file.
        name: String,
        /// Its blake3 in `checksums.b3`, hex.
        unpacked: String,
        /// Its blake3 in `packed.b3`, hex.
        packed: String,
    },
    /// The work directory is present: the run was not finalized.
    #[error("{}/ is present: the run was not finalized", crate::output::WORK_DIR)]
    Unfinished,
    /// The directory cannot be listed.
    #[error("cannot list the directory: {source}")]
    CannotList {
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A shard's hash matches but its header (a packed shard: its structure) does not validate
    /// (the manifest was rewritten).
    #[error("{name}: {error}")]
    InvalidShard {
        /// The shard.
        name: String,
        /// What is wrong with its header.
        error: Box<Error>,
    },
    /// The index does not parse.
    #[error("{error}")]
    InvalidIndex {
        /// What is wrong with it.
        error: Box<Error>,
    },
    /// The index puts tensors in a file that is not a shard of the output: not in the directory
    /// at all, or listed in the manifest but not a `.safetensors` file.
    #[error(
        "{}: puts {} in {shard}, which is not one of the output's shards",
        crate::format::index::INDEX_FILE,
        tensor_list(tensors)
    )]
    IndexNamesNoShard {
        /// The shard name.
        shard: String,
        /// The tensors it puts there.
        tensors: Vec<String>,
    },
    /// The index lists a tensor in one shard; another holds it.
    #[error(
        "{}: tensor '{tensor}' is listed in {listed}, but it is in {actual}",
        crate::format::index::INDEX_FILE
    )]
    WrongShard {
        /// The tensor.
        tensor: String,
        /// The shard the index names.
        listed: String,
        /// The shard that holds it.
        actual: String,
    },
    /// The index lists a tensor in a shard whose header does not hold it (nor does any other).
    #[error(
        "{}: tensor '{tensor}' is listed in {shard}, which does not contain it",
        crate::format::index::INDEX_FILE
    )]
    NotInShard {
        /// The tensor.
        tensor: String,
        /// The shard.
        shard: String,
    },
    /// A shard holds a tensor the index does not list.
    #[error(
        "{shard}: tensor '{tensor}' is not in {}",
        crate::format::index::INDEX_FILE
    )]
    NotIndexed {
        /// The shard.
        shard: String,
        /// The tensor.
        tensor: String,
    },
    /// Several shards and no index.
    #[error(
        "{shards} shards but no {} to say which holds what",
        crate::format::index::INDEX_FILE
    )]
    NoIndex {
        /// The number of shards.
        shards: usize,
    },
    /// `mergestream.json` is not the JSON mergestream writes (checking `--inputs`).
    #[error("{}: is not valid provenance: {json}", crate::plan::PROVENANCE_FILE)]
    ProvenanceInvalid {
        /// What the JSON reader said.
        json: serde_json::Error,
    },
    /// `--inputs` asked for, but the output records no input hashes.
    #[error(
        "{} records no input hashes: the output was made without --hash-inputs",
        crate::plan::PROVENANCE_FILE
    )]
    InputsNotHashed,
    /// An input file the output recorded is not in the model given for it.
    #[error("{role} input {}: {name} is recorded but the model has no such weight file", model.display())]
    InputFileMissing {
        /// The input's role.
        role: String,
        /// The model given.
        model: PathBuf,
        /// The recorded file.
        name: String,
    },
    /// An input file's SHA-256 differs from the recorded one.
    #[error("{role} input {}: {name}: SHA-256 is {actual} but the output recorded {recorded}", model.display())]
    InputHashMismatch {
        /// The input's role.
        role: String,
        /// The model given.
        model: PathBuf,
        /// The file.
        name: String,
        /// Its SHA-256 now, hex.
        actual: String,
        /// The recorded one, hex.
        recorded: String,
    },
    /// The model given has a weight file the output did not record.
    #[error("{role} input {}: {name} is a weight file the output did not record", model.display())]
    InputFileUnrecorded {
        /// The input's role.
        role: String,
        /// The model given.
        model: PathBuf,
        /// The file.
        name: String,
    },
}

/// What follows from a [`VerifyCause`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyConsequence {
    /// The shard's header does not validate either.
    #[error("its header is invalid too: {error}")]
    InvalidHeader {
        /// What is wrong with it.
        error: Box<Error>,
    },
    /// The index does not parse either.
    #[error("it is not a valid index either: {error}")]
    InvalidIndex {
        /// What is wrong with it.
        error: Box<Error>,
    },
    /// The index puts tensors in this file, which therefore cannot be checked against it.
    #[error(
        "{} puts {} in it, which cannot be checked",
        crate::format::index::INDEX_FILE,
        tensor_list(tensors)
    )]
    TensorsUnchecked {
        /// The tensors.
        tensors: Vec<String>,
    },
}

/// Why a request cannot be done as asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// `--alpha` is NaN or infinite.
    #[error("alpha {alpha} is not a finite number")]
    AlphaNotFinite {
        /// The value.
        alpha: f32,
    },
    /// `--memory` does not exceed the reserve kept for everything but buffers.
    #[error("--memory must be more than {} MiB", reserve >> 20)]
    MemoryBelowReserve {
        /// The reserve ([`crate::MEMORY_RESERVE`]), bytes.
        reserve: u64,
    },
    /// `--memory` leaves too little for the buffers of this many threads.
    #[error("--memory is too small for {threads} threads: needs at least {} MiB of buffers", needed >> 20)]
    MemoryTooSmall {
        /// Compute threads.
        threads: usize,
        /// Bytes of buffers needed.
        needed: u64,
    },
    /// `MERGESTREAM_ISA` asks for an instruction set that cannot be used.
    #[error("{0}")]
    Isa(#[from] IsaError),
    /// The same alpha twice in a sweep.
    #[error("alpha {alpha} is given twice")]
    AlphaTwice {
        /// The value.
        alpha: f32,
    },
    /// A config asks for something mergestream does not do yet.
    #[error("{feature} is not supported yet: {hint}")]
    NotSupported {
        /// What is asked for.
        feature: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// `verify --inputs` names another number of models than the output recorded.
    #[error("--inputs names {given} model{} but the output recorded {}: {}", plural(*given), roles.len(), join(roles))]
    InputCount {
        /// Models given.
        given: usize,
        /// The recorded roles, in order.
        roles: Vec<String>,
    },
    /// A model of `verify --config` has a role the output did not record.
    #[error(
        "the config's {role} is not among the output's recorded inputs ({})",
        join(roles)
    )]
    UnknownRole {
        /// The role in the config.
        role: String,
        /// The recorded roles.
        roles: Vec<String>,
    },
    /// `verify --config` with a multi-document config: no document made this output.
    #[error("no document of the config is named {} (the config has {})", name.as_deref().unwrap_or("(unnamed)"), join(names))]
    NoSuchDocument {
        /// The output's name, from its provenance.
        name: Option<String>,
        /// The documents' names.
        names: Vec<String>,
    },
    /// A config whose documents read each other's outputs, run with `--part`.
    #[error("documents of this config read other documents' outputs, which a partitioned run cannot do in one go: run `merge` without --part, or split the config into one config per stage")]
    StagedPartition,
}

impl From<crate::packed::PackedError> for Error {
    fn from(e: crate::packed::PackedError) -> Error {
        Error::Packed(Box::new(e))
    }
}

impl From<UsageError> for Error {
    fn from(e: UsageError) -> Error {
        Error::Usage(e)
    }
}

fn describe_overlap(
    output: &Path,
    input: &Path,
    location: &Path,
    storage: bool,
    kind: &OverlapKind,
) -> String {
    let what = if storage {
        format!(
            "{}, where the input model {} keeps the files its links point to",
            location.display(),
            input.display()
        )
    } else if location == input {
        format!("the input model {}", input.display())
    } else {
        format!(
            "the input model {} ({})",
            input.display(),
            location.display()
        )
    };
    let out = output.display();
    match kind {
        OverlapKind::Same => {
            format!("--out {out} is {what}; an output must never overwrite an input: choose another --out")
        }
        OverlapKind::OutputInsideInput => format!(
            "--out {out} lies inside {what}; an output must never overwrite an input: choose another --out"
        ),
        OverlapKind::InputInsideOutput => format!(
            "--out {out} contains {what}; an output must never overwrite an input: choose another --out"
        ),
        OverlapKind::SharesFile { output_file } => format!(
            "--out {out}: {} is the same file as {} of the input model {} (a hard link, or a link to it), and writing the output would replace it: choose another --out",
            output_file.display(),
            location.display(),
            input.display()
        ),
    }
}

fn listing_difference(unlisted: &[String], missing: &[String]) -> String {
    let mut parts = Vec::new();
    if !unlisted.is_empty() {
        parts.push(format!("not listed: {}", unlisted.join(", ")));
    }
    if !missing.is_empty() {
        parts.push(format!(
            "listed but not in the output: {}",
            missing.join(", ")
        ));
    }
    parts.join("; ")
}

fn locked_task(part: &Option<Part>) -> String {
    match part {
        Some(p) => format!("part {p}"),
        None => "finalize".into(),
    }
}

fn finished_part(part: &Option<Part>) -> String {
    match part {
        Some(p) if p.count > 1 => format!(": part {p} has nothing to add to it"),
        _ => String::new(),
    }
}

fn first_names(files: &[String]) -> String {
    let shown: Vec<&str> = files.iter().take(5).map(String::as_str).collect();
    let more = if files.len() > 5 { ", …" } else { "" };
    format!("{}{more}", shown.join(", "))
}

fn tensor_list(tensors: &[String]) -> String {
    let shown: Vec<String> = tensors.iter().take(3).map(|t| format!("'{t}'")).collect();
    let more = if tensors.len() > 3 { ", …" } else { "" };
    format!(
        "{} tensor{} ({}{more})",
        tensors.len(),
        plural(tensors.len()),
        shown.join(", ")
    )
}

fn plan_groups(groups: &[(String, Vec<Part>)]) -> String {
    groups
        .iter()
        .map(|(f, parts)| format!("parts {} have plan {}", join(parts), &f[..f.len().min(16)]))
        .collect::<Vec<_>>()
        .join("; ")
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn tensor_prefix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!("tensor '{t}': "),
        None => String::new(),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn bullet_list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn signal_name(signal: i32) -> String {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT".into(),
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages read as they did when they were strings: one example of each kind, with
    /// the exact text a user sees.
    #[test]
    fn messages_read_as_before() {
        let p = || PathBuf::from("pair/aligned/model-00002-of-00003.safetensors");
        let cases: Vec<(Error, &str)> = vec![
            (
                Error::header(
                    p(),
                    HeaderError::WrongLength {
                        tensor: "lm_head.weight".into(),
                        start: 0,
                        end: 4096,
                        dtype: Dtype::BF16,
                        shape: vec![32, 32],
                        needed: 2048,
                    },
                ),
                "pair/aligned/model-00002-of-00003.safetensors: tensor 'lm_head.weight': data_offsets [0, 4096] span 4096 bytes but BF16 [32, 32] needs 2048",
            ),
            (
                Error::header(
                    p(),
                    HeaderError::PastEndOfData {
                        tensor: Some("a".into()),
                        end: 4,
                        data_len: 2,
                    },
                ),
                "pair/aligned/model-00002-of-00003.safetensors: tensor 'a': data_offsets end at 4, past the end of the data section (2 bytes; file truncated?)",
            ),
            (
                Error::header(p(), HeaderError::TooLarge { len: 200_000_000 }),
                "pair/aligned/model-00002-of-00003.safetensors: header length 200000000 exceeds the limit of 100000000 bytes",
            ),
            (
                Error::index(
                    "m/model.safetensors.index.json",
                    IndexError::ShardIsPath {
                        tensor: "b".into(),
                        shard: "../s2.safetensors".into(),
                    },
                ),
                "m/model.safetensors.index.json: tensor 'b': shard name '../s2.safetensors' is a path; shards must be plain file names in the model directory",
            ),
            (
                Error::Mismatch {
                    sft: "s".into(),
                    aligned: "a".into(),
                    problems: vec![
                        Mismatch {
                            tensor: "x".into(),
                            kind: MismatchKind::Shape {
                                aligned: vec![4],
                                sft: vec![2, 2],
                            },
                        },
                        Mismatch {
                            tensor: "y".into(),
                            kind: MismatchKind::MissingFromSft,
                        },
                    ],
                },
                "the models do not match (2 problems; --sft s, --aligned a):\n  - tensor 'x': shape [4] in --aligned but [2, 2] in --sft\n  - tensor 'y': missing from the SFT model (--sft)",
            ),
            (
                Error::output(
                    "out",
                    OutputError::NotEmpty {
                        files: (1..=6).map(|i| format!("f{i}")).collect(),
                    },
                ),
                "out: is not empty (holds f1, f2, f3, f4, f5, …); pass --force to replace earlier output",
            ),
            (
                Error::Locked {
                    path: "out".into(),
                    part: Some(Part { index: 1, count: 2 }),
                    holder: "pid 7".into(),
                },
                "out: another mergestream run is writing part 1/2 here (pid 7)",
            ),
            (
                Error::Parts {
                    path: "out".into(),
                    problems: vec![
                        PartsProblem::MissingPart {
                            part: Part { index: 1, count: 3 },
                        },
                        PartsProblem::IncompletePart {
                            part: Part { index: 2, count: 3 },
                            files: 1,
                        },
                    ],
                },
                "out: cannot finalize:\n  - part 1/3 has no record: did its task run?\n  - part 2/3 is not complete (1 files done)",
            ),
            (
                Error::Verify {
                    path: "out".into(),
                    problems: vec![VerifyProblem {
                        cause: VerifyCause::HashMismatch {
                            manifest: "checksums.b3",
                            name: "s.safetensors".into(),
                            actual: "ab".into(),
                            recorded: "cd".into(),
                        },
                        consequences: vec![VerifyConsequence::TensorsUnchecked {
                            tensors: vec!["a".into(), "b".into(), "c".into(), "d".into()],
                        }],
                    }],
                },
                "out: verification failed (1 problem):\n  - s.safetensors: blake3 is ab but checksums.b3 says cd\n      - model.safetensors.index.json puts 4 tensors ('a', 'b', 'c', …) in it, which cannot be checked",
            ),
            (
                Error::Method {
                    tensor: "model.norm.weight".into(),
                    source: MethodFailure::RowTooLong {
                        granule: 300_000,
                        bytes: 1_200_000,
                        memory: 64 << 20,
                        needed: (70 << 20) + 5,
                    },
                },
                "tensor 'model.norm.weight': its merge method works on rows of 300000 elements (1200000 bytes per chunk buffer), and the chunk buffers for them need more than --memory 64MiB allows: raise --memory to at least 71MiB",
            ),
            (
                Error::Method {
                    tensor: "w".into(),
                    source: MethodFailure::Method(
                        crate::kernel::methods::MethodError::RowShape {
                            tensor: "w".into(),
                            method: "della",
                            shape: vec![2, 3, 4],
                            dims: 3,
                        },
                    ),
                },
                "tensor 'w': della ranks within rows of 1-D and 2-D tensors; shape [2, 3, 4] has 3 axes",
            ),
            (
                Error::Usage(UsageError::MemoryTooSmall {
                    threads: 5,
                    needed: 36 << 20,
                }),
                "--memory is too small for 5 threads: needs at least 36 MiB of buffers",
            ),
            (
                Error::Overlap {
                    output: "a".into(),
                    input: "a".into(),
                    location: "a".into(),
                    storage: false,
                    kind: OverlapKind::Same,
                },
                "--out a is the input model a; an output must never overwrite an input: choose another --out",
            ),
            (
                Error::from(crate::format::torch::TorchError::Pickle {
                    path: "m/pytorch_model.bin".into(),
                    member: "pytorch_model/data.pkl".into(),
                    source: Box::new(crate::format::pickle::PickleError::ForbiddenGlobal {
                        offset: 172,
                        global: "os.system".into(),
                    }),
                }),
                "m/pytorch_model.bin: pytorch_model/data.pkl: byte 172: refusing global 'os.system': a state dict may only name torch's tensor-rebuilding functions, storage types and dtypes, and collections.OrderedDict; torch.load(weights_only=False) would import and call it",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::Interrupted { signal: 15 }.exit_code(), 143);
        assert_eq!(Error::internal("x").exit_code(), 70);
        assert_eq!(
            Error::Parts {
                path: "o".into(),
                problems: vec![PartsProblem::NoRecords]
            }
            .exit_code(),
            1
        );
        assert_eq!(
            Error::header("f", HeaderError::NotObject).exit_code(),
            2,
            "a malformed input is exit 2"
        );
        assert_eq!(
            Error::from(crate::format::torch::TorchError::BigEndian { path: "f".into() })
                .exit_code(),
            2,
            "a refused PyTorch checkpoint is exit 2"
        );
    }

    /// One failure of every kind an op can report, protocol or not.
    fn every_method_failure(tensor: &str) -> Vec<MethodFailure> {
        use crate::kernel::methods::MethodError as M;
        let t = || tensor.to_string();
        vec![
            M::InputCount {
                tensor: t(),
                method: "slerp",
                expected: "exactly 2",
                got: 3,
            }
            .into(),
            M::ParamCount {
                tensor: t(),
                method: "ties",
                got: 1,
                models: 2,
            }
            .into(),
            M::BadParam {
                tensor: t(),
                method: "ties",
                input: Some(1),
                param: "density",
                value: f64::NAN,
                allowed: "a finite number >= 0",
            }
            .into(),
            M::DellaEpsilon {
                tensor: t(),
                method: "della",
                input: 0,
                density: 0.1,
                epsilon: 0.2,
            }
            .into(),
            M::RowShape {
                tensor: t(),
                method: "della",
                shape: vec![2, 2, 2],
                dims: 3,
            }
            .into(),
            M::Misaligned {
                tensor: t(),
                offset: 3,
                len: 4,
                granule: 4096,
                numel: 9000,
            }
            .into(),
            M::ChunkLengths {
                tensor: t(),
                lens: vec![4, 8],
            }
            .into(),
            M::OutOfOrder {
                tensor: t(),
                expected: 0,
                got: 4096,
            }
            .into(),
            M::WrongPass { tensor: t() }.into(),
            M::Incomplete {
                tensor: t(),
                got: 4096,
                numel: 9000,
            }
            .into(),
            M::PassPending { tensor: t() }.into(),
            crate::kernel::linear::CombineError::NonFiniteLambda { value: f64::NAN }.into(),
            crate::spec::SpecError::Unresolved {
                method: "ties",
                name: "density",
                model: Some("m1".into()),
                tensor: t(),
                path: "models[1].parameters.density".into(),
            }
            .into(),
            MethodFailure::ChunkTooSmall {
                granule: 4096,
                bytes: 16384,
                chunk: 8192,
            },
            MethodFailure::RowTooLong {
                granule: 300_000,
                bytes: 1_200_000,
                memory: 64 << 20,
                needed: 71 << 20,
            },
        ]
    }

    /// Every method failure's message names the tensor exactly once (the kernels' errors and
    /// an unresolved parameter name it themselves; the error around them must not repeat it).
    #[test]
    fn method_failures_name_the_tensor_once() {
        let tensor = "model.layers.7.mlp.up_proj.weight";
        for failure in every_method_failure(tensor) {
            let debug = format!("{failure:?}");
            let text = Error::Method {
                tensor: tensor.into(),
                source: failure,
            }
            .to_string();
            assert_eq!(text.matches(tensor).count(), 1, "{text} ({debug})");
        }
    }

    /// A failure only a broken protocol between the pipeline and an op can cause is an
    /// internal error (exit 70); the others are the user's (exit 2), and name the tensor once.
    #[test]
    fn protocol_failures_are_internal_errors() {
        let tensor = "model.layers.7.mlp.up_proj.weight";
        let mut protocol = 0;
        for failure in every_method_failure(tensor) {
            let debug = format!("{failure:?}");
            let is_protocol = matches!(
                &failure,
                MethodFailure::Method(
                    crate::kernel::methods::MethodError::ParamCount { .. }
                        | crate::kernel::methods::MethodError::Misaligned { .. }
                        | crate::kernel::methods::MethodError::ChunkLengths { .. }
                        | crate::kernel::methods::MethodError::OutOfOrder { .. }
                        | crate::kernel::methods::MethodError::WrongPass { .. }
                        | crate::kernel::methods::MethodError::Incomplete { .. }
                        | crate::kernel::methods::MethodError::PassPending { .. }
                )
            );
            let e = Error::method(tensor, failure);
            if is_protocol {
                protocol += 1;
                assert!(matches!(e, Error::Internal { .. }), "{e} ({debug})");
                assert_eq!(e.exit_code(), 70, "{debug}");
            } else {
                assert!(
                    matches!(&e, Error::Method { tensor: t, .. } if t == tensor),
                    "{e}"
                );
                assert_eq!(e.exit_code(), 2, "{debug}");
            }
            assert_eq!(e.to_string().matches(tensor).count(), 1, "{e}");
        }
        assert_eq!(protocol, 7);
    }

    /// A real protocol break: a reduction pass finished before its partials covered the
    /// tensor.
    #[test]
    fn a_pass_finished_early_is_an_internal_error() {
        use crate::kernel::methods::{InputParams, Method, MethodParams, Op, TensorCtx};
        use crate::kernel::FloatDtype;
        let mut p = MethodParams::new(Method::Ties);
        let mut input = InputParams::new(1.0);
        input.density = 0.5;
        p.inputs = vec![input.clone(), input];
        let dtypes = [FloatDtype::F32; 3];
        let ctx = TensorCtx {
            name: "w",
            shape: &[64],
            compute: FloatDtype::F32,
            inputs: &dtypes,
            out: FloatDtype::F32,
        };
        let mut op = Op::new(&p, &ctx).unwrap();
        assert!(op.next_pass().is_some(), "ties at density 0.5 ranks first");
        let comb = op.combiner();
        let e = Error::method("w", op.finish_pass(comb).unwrap_err());
        assert!(matches!(e, Error::Internal { .. }), "{e}");
    }

    #[test]
    fn tensor_is_reported_where_there_is_one() {
        let e = Error::header(
            "f",
            HeaderError::UnknownDtype {
                tensor: "w".into(),
                dtype: "Q7".into(),
            },
        );
        assert_eq!(e.tensor(), Some("w"));
        assert_eq!(Error::header("f", HeaderError::NotObject).tensor(), None);
    }
}
