//! A pickle reader for PyTorch state dicts that executes nothing.
//!
//! `data.pkl` in a `torch.save` archive is a Python pickle: a program for a stack machine whose
//! `GLOBAL` opcode imports any Python name and whose `REDUCE` calls it, which is how a malicious
//! checkpoint runs `os.system` under `torch.load`. [`parse`] runs that program on a small stack
//! machine of its own that has no way to run anything: it knows the opcodes `torch.save` writes
//! for a state dict (protocols 2 to 5: `PROTO`, `FRAME`, `MARK`, `STOP`, `EMPTY_DICT`,
//! `EMPTY_TUPLE`, `TUPLE`/`TUPLE1..3`, `NONE`, `NEWTRUE`/`NEWFALSE`, `BININT`/`BININT1`/`BININT2`,
//! `LONG1`, `BINUNICODE`/`SHORT_BINUNICODE`/`BINUNICODE8`, `GLOBAL`/`STACK_GLOBAL`, `REDUCE`,
//! `BUILD`, `BINPERSID`, `SETITEM`/`SETITEMS`, the memo opcodes) and refuses every other one
//! (`INST`, `OBJ`, `NEWOBJ`, `EXT*`, lists, sets, bytes, floats, …). `GLOBAL` resolves only
//! names on an allow-list, mapped to inert tags, and is refused for anything else *when it is
//! read*, before anything could use it:
//!
//! - `collections.OrderedDict` (a state dict, and the empty backward-hooks dict of each tensor);
//! - `torch._utils._rebuild_tensor_v2`, `_rebuild_tensor_v3` (new dtypes: float8, uint16/32/64),
//!   `_rebuild_tensor` (old), `_rebuild_parameter`, `_rebuild_parameter_with_state`,
//!   `torch._tensor._rebuild_from_type_v2` with `torch.Tensor` or `torch.nn.parameter.Parameter`
//!   (a tensor or parameter carrying Python attributes, which are ignored);
//! - the typed storages `torch.{BFloat16,Half,Float,Double,Long,Int,Short,Char,Byte,Bool}Storage`
//!   and `torch.storage.UntypedStorage` (named in each storage's persistent id);
//! - dtypes `torch.float8_e4m3fn`, `torch.uint16`, … (arguments of `_rebuild_tensor_v3`).
//!
//! Known torch types with no safetensors dtype (complex, quantized, sub-byte) get their own
//! error. The result is a flat state dict: a list of tensors (name, dtype, shape, strides,
//! storage key, offset) each checked to be C-contiguous and inside its storage; tensors sharing a
//! storage (tied weights, views) are fine. Everything is bounded: input size, stack and mark
//! depth, tuple nesting, tensors, dimensions, and the bytes of everything the machine builds
//! (strings, tuples, dicts, the memo), counted before it is allocated, so that reading any pickle
//! stays within [`crate::MEMORY_RESERVE`] ([`MAX_HELD_BYTES`]).
//!
//! What it does not do: read the archive (that is [`super::zip`]) or tensor data, check storages
//! against the archive's members (that is [`super::torch`]), or accept nested checkpoints
//! (`{"model": state_dict, "optimizer": …}`) and non-tensor entries, which `pytorch_model*.bin`
//! files do not have. Byte offsets in errors are positions in the pickle.

use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use super::Dtype;

/// Largest pickle accepted: `torch.save` writes about 140 bytes per tensor, so this is some
/// 60 000 tensors, far more than [`MAX_HELD_BYTES`] lets the machine build.
pub const MAX_PICKLE_LEN: u64 = 8 << 20;
/// Most values on the stack at once (`torch.save` batches dict items by 1000).
pub const MAX_STACK: usize = 1 << 16;
/// Most open marks at once (`torch.save` nests three).
pub const MAX_MARKS: usize = 64;
/// Deepest tuple nesting (`torch.save` nests three).
pub const MAX_NESTING: u32 = 32;
/// Most bytes the machine may hold while it runs: every string it makes, the values held in
/// tuples, dicts and the memo (with the spare capacity of their vectors), tensors and storages,
/// each counted at its size in memory before it is allocated. A `torch.save` state dict costs
/// about 1.9 KiB per tensor here (`tests::real_state_dicts_fit`), so one file may hold some
/// 11 000 tensors; a real `.bin` shard holds hundreds, a whole unsharded model a few thousand.
/// With the pickle's own bytes ([`MAX_PICKLE_LEN`]) and the stack ([`MAX_STACK`] values, 1.5 MiB),
/// reading any pickle stays within [`crate::MEMORY_RESERVE`] (32 MiB), the memory `--memory`
/// keeps aside for everything but chunk buffers (`tests/it/torch_models.rs` measures the peak on
/// hostile pickles).
pub const MAX_HELD_BYTES: u64 = 20 << 20;
/// Most tensors in one state dict (tensors rebuilt from memoized arguments cost little else).
pub const MAX_TENSORS: usize = 1 << 16;
/// Most dimensions of a tensor.
pub const MAX_DIMS: usize = 32;
/// Longest module or name in a `GLOBAL`.
const MAX_GLOBAL_PART: usize = 256;
/// Longest storage key (`torch.save` writes decimal numbers).
const MAX_STORAGE_KEY: usize = 64;

// What each thing the machine makes costs against [`MAX_HELD_BYTES`]: its size in memory, with
// 16 bytes for an `Rc`'s counts and 16 more for the allocator's rounding and bookkeeping.
const RC_COST: u64 = 32;
const VALUE_COST: u64 = std::mem::size_of::<Value>() as u64;
const TUPLE_COST: u64 = std::mem::size_of::<Tuple>() as u64 + RC_COST;
/// A memo entry: its key and value in a B-tree node at the least fill a node can have (half of
/// its 11 slots, so twice their size), with the node's links.
const MEMO_COST: u64 = 2 * std::mem::size_of::<(u32, Value)>() as u64 + 16;
const TENSOR_COST: u64 = std::mem::size_of::<Tensor>() as u64 + RC_COST;
/// A storage: its `Rc`, and its entry in the machine's B-tree (counted as a memo entry is).
const STORAGE_COST: u64 = std::mem::size_of::<Storage>() as u64
    + RC_COST
    + 2 * std::mem::size_of::<(Rc<str>, Rc<Storage>)>() as u64
    + 16;

/// Everything that can be wrong with a state dict pickle. `offset` is always a byte position in
/// the pickle (`data.pkl`), pointing at the opcode concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PickleError {
    /// The pickle is larger than [`MAX_PICKLE_LEN`].
    #[error("the pickle is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The pickle ends inside an opcode or its argument, or before `STOP`.
    #[error("the pickle ends inside the opcode at byte {offset}; is it truncated?")]
    Truncated {
        /// Where the unfinished opcode starts.
        offset: usize,
    },
    /// A `PROTO` opcode names a protocol other than 2 to 5.
    #[error("byte {offset}: pickle protocol {protocol} is not supported (2 to 5 are)")]
    UnsupportedProtocol {
        /// Where the `PROTO` opcode is.
        offset: usize,
        /// The protocol it names.
        protocol: u8,
    },
    /// An opcode `torch.save` does not write for a state dict (`INST`, `OBJ`, `NEWOBJ`, lists,
    /// floats, …), or a byte that is no opcode at all.
    #[error("byte {offset}: opcode {} is not one torch.save writes for a state dict", opcode_label(*opcode))]
    UnsupportedOpcode {
        /// Where it is.
        offset: usize,
        /// The opcode byte.
        opcode: u8,
    },
    /// A `GLOBAL` / `STACK_GLOBAL` names something outside the allow-list (`os.system`,
    /// `builtins.eval`, …): refused when it is read, before anything could call it.
    #[error("byte {offset}: refusing global '{global}': a state dict may only name torch's tensor-rebuilding functions, storage types and dtypes, and collections.OrderedDict; torch.load(weights_only=False) would import and call it")]
    ForbiddenGlobal {
        /// Where the `GLOBAL` / `STACK_GLOBAL` opcode is.
        offset: usize,
        /// The name, `module.name`.
        global: String,
    },
    /// A torch type that has no safetensors dtype (complex, quantized, sub-byte storages).
    #[error("byte {offset}: '{global}' is a torch type with no safetensors dtype (complex, quantized or sub-byte tensors are not supported)")]
    UnsupportedType {
        /// Where the `GLOBAL` / `STACK_GLOBAL` opcode is.
        offset: usize,
        /// The type, `module.name`.
        global: String,
    },
    /// A `GLOBAL`'s module or name is not short UTF-8 text.
    #[error("byte {offset}: a GLOBAL module or name is not UTF-8 text of at most {MAX_GLOBAL_PART} bytes")]
    BadGlobalName {
        /// Where the opcode is.
        offset: usize,
    },
    /// A string is not valid UTF-8.
    #[error("byte {offset}: a string is not valid UTF-8")]
    BadString {
        /// Where the opcode is.
        offset: usize,
    },
    /// A `LONG1` integer does not fit in 64 bits.
    #[error("byte {offset}: an integer does not fit in 64 bits")]
    IntegerTooLarge {
        /// Where the opcode is.
        offset: usize,
    },
    /// An opcode needs more values than the stack holds above the last mark.
    #[error("byte {offset}: opcode {} needs more values than the stack holds", opcode_label(*opcode))]
    StackUnderflow {
        /// Where the opcode is.
        offset: usize,
        /// The opcode byte.
        opcode: u8,
    },
    /// An opcode that works on the values above a `MARK` finds none.
    #[error("byte {offset}: opcode {} needs a MARK and there is none", opcode_label(*opcode))]
    NoMark {
        /// Where the opcode is.
        offset: usize,
        /// The opcode byte.
        opcode: u8,
    },
    /// More than [`MAX_STACK`] values or [`MAX_MARKS`] marks at once.
    #[error("byte {offset}: more than {max} values or marks on the stack")]
    StackTooDeep {
        /// Where the limit was passed.
        offset: usize,
        /// The limit passed.
        max: usize,
    },
    /// Tuples nested deeper than [`MAX_NESTING`].
    #[error("byte {offset}: tuples nest more than {max} deep")]
    NestingTooDeep {
        /// Where the limit was passed.
        offset: usize,
        /// The limit.
        max: u32,
    },
    /// A memo `GET` of an entry never `PUT`.
    #[error("byte {offset}: memo entry {index} was never stored")]
    MemoMissing {
        /// Where the `GET` is.
        offset: usize,
        /// The memo index it asks for.
        index: u32,
    },
    /// Reading the pickle would hold more than [`MAX_HELD_BYTES`] of values.
    #[error("byte {offset}: the pickle builds more than the {} MiB of values a state dict may (some 11 000 tensors); split the checkpoint into shards", max >> 20)]
    TooManyValues {
        /// Where the limit was passed.
        offset: usize,
        /// The limit, in bytes.
        max: u64,
    },
    /// More than [`MAX_TENSORS`] tensors.
    #[error("byte {offset}: more than {max} tensors")]
    TooManyTensors {
        /// Where the limit was passed.
        offset: usize,
        /// The limit.
        max: usize,
    },
    /// A tensor with more than [`MAX_DIMS`] dimensions.
    #[error("byte {offset}: a tensor has {dims} dimensions; the limit is {max}")]
    TooManyDims {
        /// Where the tensor is rebuilt.
        offset: usize,
        /// Its number of dimensions.
        dims: usize,
        /// The limit.
        max: usize,
    },
    /// `REDUCE` applied to something that is not an allowed function (a dtype, a storage type,
    /// a plain value).
    #[error("byte {offset}: REDUCE calls {what}, which torch.save does not call")]
    NotCallable {
        /// Where the `REDUCE` is.
        offset: usize,
        /// What it would call.
        what: String,
    },
    /// An allowed function is called with arguments of the wrong number or kind.
    #[error("byte {offset}: {function} is called with wrong arguments (expected {expected})")]
    BadArguments {
        /// Where the `REDUCE` is.
        offset: usize,
        /// The function.
        function: &'static str,
        /// What it takes.
        expected: &'static str,
    },
    /// A persistent id that is not a storage reference as `torch.save` writes it.
    #[error("byte {offset}: a persistent id is not ('storage', storage type, key, location, size) with a plain key")]
    BadPersistentId {
        /// Where the `BINPERSID` is.
        offset: usize,
    },
    /// One storage key named with different types or sizes.
    #[error("byte {offset}: storage '{storage}' is named with different types or sizes")]
    StorageConflict {
        /// Where the second, different reference is.
        offset: usize,
        /// The storage key.
        storage: String,
    },
    /// A tensor with its conjugate or negative bit set (its bytes are not its values).
    #[error("byte {offset}: a tensor has its conjugate or negative bit set, so its stored bytes are not its values")]
    TensorFlags {
        /// Where the tensor is rebuilt.
        offset: usize,
    },
    /// `SETITEM(S)` applied to something that is not a dict.
    #[error("byte {offset}: opcode {} applies to a {found}, not a dict", opcode_label(*opcode))]
    NotADictTarget {
        /// Where the opcode is.
        offset: usize,
        /// The opcode byte.
        opcode: u8,
        /// What it applies to.
        found: &'static str,
    },
    /// `BUILD` on anything but an `OrderedDict`, or with a state that is not a dict (an
    /// `OrderedDict`'s state, a state dict's `_metadata`, is read and dropped).
    #[error("byte {offset}: BUILD sets the state of a {found}; only an OrderedDict's is accepted")]
    BadBuild {
        /// Where the `BUILD` is.
        offset: usize,
        /// What it applies to.
        found: &'static str,
    },
    /// `STOP` with anything but one value on the stack.
    #[error("byte {offset}: STOP leaves {values} values and {marks} marks on the stack; expected one value")]
    UnbalancedStop {
        /// Where the `STOP` is.
        offset: usize,
        /// Values left.
        values: usize,
        /// Marks left.
        marks: usize,
    },
    /// Bytes after `STOP`.
    #[error("{len} bytes follow the STOP opcode at byte {offset}")]
    TrailingBytes {
        /// Where the `STOP` is.
        offset: usize,
        /// How many bytes follow it.
        len: usize,
    },
    /// The pickle's value is not a dict.
    #[error("the pickle holds a {found}, not a state dict (a dict of tensors)")]
    NotADict {
        /// What it holds.
        found: &'static str,
    },
    /// A state dict key that is not a string.
    #[error("key {index} of the state dict is a {found}, not a string")]
    KeyNotString {
        /// The key's position in the dict, from 0.
        index: usize,
        /// What it is.
        found: &'static str,
    },
    /// A name given twice in the state dict.
    #[error("tensor '{name}' appears twice in the state dict")]
    DuplicateKey {
        /// The name.
        name: String,
    },
    /// A state dict entry that is not a tensor (a nested dict, a number, …).
    #[error("state dict entry '{name}' is a {found}, not a tensor (only flat state dicts of tensors are read)")]
    NotATensor {
        /// The entry's name.
        name: String,
        /// What it is.
        found: &'static str,
    },
    /// A shape with a negative dimension.
    #[error("tensor '{tensor}': shape {shape:?} has a negative dimension")]
    BadShape {
        /// The tensor.
        tensor: String,
        /// Its shape, as pickled.
        shape: Vec<i64>,
    },
    /// Strides of another length than the shape, or negative.
    #[error("tensor '{tensor}': strides {strides:?} do not fit shape {shape:?}")]
    BadStrides {
        /// The tensor.
        tensor: String,
        /// Its shape, as pickled.
        shape: Vec<i64>,
        /// Its strides, as pickled.
        strides: Vec<i64>,
    },
    /// A negative storage offset.
    #[error("tensor '{tensor}': storage offset {offset} is negative")]
    BadStorageOffset {
        /// The tensor.
        tensor: String,
        /// The offset, in elements.
        offset: i64,
    },
    /// A tensor whose byte size or end overflows 64 bits.
    #[error("tensor '{tensor}': shape {shape:?} at storage offset {offset} is too large (its byte size overflows)")]
    SizeOverflow {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<i64>,
        /// Its storage offset, in elements.
        offset: i64,
    },
    /// A tensor that is not C-contiguous (a transposed or strided view).
    #[error("tensor '{tensor}' is not contiguous (shape {shape:?}, strides {strides:?}; C order needs strides {expected:?}); save it with .contiguous()")]
    NotContiguous {
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<u64>,
        /// Its strides, in elements.
        strides: Vec<u64>,
        /// The strides C order needs.
        expected: Vec<u64>,
    },
    /// A tensor whose bytes run past the end of its storage.
    #[error("tensor '{tensor}': bytes {start}..{end} of storage '{storage}' run past its end ({storage_len} bytes)")]
    OutOfStorage {
        /// The tensor.
        tensor: String,
        /// Its storage's key.
        storage: String,
        /// First byte of the tensor in the storage.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The storage's size in bytes.
        storage_len: u64,
    },
}

impl PickleError {
    /// The tensor (state dict entry) the error is about, where there is one.
    pub fn tensor(&self) -> Option<&str> {
        use PickleError::*;
        match self {
            DuplicateKey { name } | NotATensor { name, .. } => Some(name),
            BadShape { tensor, .. }
            | BadStrides { tensor, .. }
            | BadStorageOffset { tensor, .. }
            | SizeOverflow { tensor, .. }
            | NotContiguous { tensor, .. }
            | OutOfStorage { tensor, .. } => Some(tensor),
            _ => None,
        }
    }
}

type Result<T, E = PickleError> = std::result::Result<T, E>;

/// A parsed, checked state dict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDict {
    /// Tensors in the order the dict lists them.
    pub tensors: Vec<PickledTensor>,
    /// The storages those tensors use, in order of first use.
    pub storages: Vec<PickledStorage>,
}

/// A storage (one archive member, `data/<key>`) as the pickle describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickledStorage {
    /// Its key, the member name under `data/` (`torch.save` numbers them from 0).
    pub key: String,
    /// Bytes the member must hold: elements × element size (bytes, for an untyped storage).
    pub nbytes: u64,
}

/// A tensor: a C-contiguous run of bytes in one storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickledTensor {
    /// Its name in the state dict.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Strides in elements, as pickled (checked to describe a C-contiguous layout).
    pub strides: Vec<u64>,
    /// Key of its storage.
    pub storage: String,
    /// Offset into the storage, in elements of `dtype`.
    pub storage_offset: u64,
    /// Byte range within the storage, `[start, end)`; `end - start` = numel × dtype size.
    pub start: u64,
    /// One past the last byte within the storage.
    pub end: u64,
}

/// Parses and checks the state dict pickle `data`.
pub fn parse(data: &[u8]) -> Result<StateDict> {
    if data.len() as u64 > MAX_PICKLE_LEN {
        return Err(PickleError::TooLarge {
            len: data.len() as u64,
            max: MAX_PICKLE_LEN,
        });
    }
    let mut m = Machine::new(data);
    let top = m.run()?;
    m.state_dict(top)
}

/// The opcodes read.
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINUNICODE: u8 = b'X';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_DICT: u8 = b'}';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const PROTO: u8 = 0x80;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// Every pickle opcode's name (Python's `pickletools`), for messages.
const OPCODE_NAMES: &[(u8, &str)] = &[
    (b'(', "MARK"),
    (b'.', "STOP"),
    (b'0', "POP"),
    (b'1', "POP_MARK"),
    (b'2', "DUP"),
    (b'F', "FLOAT"),
    (b'I', "INT"),
    (b'J', "BININT"),
    (b'K', "BININT1"),
    (b'L', "LONG"),
    (b'M', "BININT2"),
    (b'N', "NONE"),
    (b'P', "PERSID"),
    (b'Q', "BINPERSID"),
    (b'R', "REDUCE"),
    (b'S', "STRING"),
    (b'T', "BINSTRING"),
    (b'U', "SHORT_BINSTRING"),
    (b'V', "UNICODE"),
    (b'X', "BINUNICODE"),
    (b'a', "APPEND"),
    (b'b', "BUILD"),
    (b'c', "GLOBAL"),
    (b'd', "DICT"),
    (b'}', "EMPTY_DICT"),
    (b'e', "APPENDS"),
    (b'g', "GET"),
    (b'h', "BINGET"),
    (b'i', "INST"),
    (b'j', "LONG_BINGET"),
    (b'l', "LIST"),
    (b']', "EMPTY_LIST"),
    (b'o', "OBJ"),
    (b'p', "PUT"),
    (b'q', "BINPUT"),
    (b'r', "LONG_BINPUT"),
    (b's', "SETITEM"),
    (b't', "TUPLE"),
    (b')', "EMPTY_TUPLE"),
    (b'u', "SETITEMS"),
    (b'G', "BINFLOAT"),
    (0x80, "PROTO"),
    (0x81, "NEWOBJ"),
    (0x82, "EXT1"),
    (0x83, "EXT2"),
    (0x84, "EXT4"),
    (0x85, "TUPLE1"),
    (0x86, "TUPLE2"),
    (0x87, "TUPLE3"),
    (0x88, "NEWTRUE"),
    (0x89, "NEWFALSE"),
    (0x8a, "LONG1"),
    (0x8b, "LONG4"),
    (b'B', "BINBYTES"),
    (b'C', "SHORT_BINBYTES"),
    (0x8c, "SHORT_BINUNICODE"),
    (0x8d, "BINUNICODE8"),
    (0x8e, "BINBYTES8"),
    (0x8f, "EMPTY_SET"),
    (0x90, "ADDITEMS"),
    (0x91, "FROZENSET"),
    (0x92, "NEWOBJ_EX"),
    (0x93, "STACK_GLOBAL"),
    (0x94, "MEMOIZE"),
    (0x95, "FRAME"),
    (0x96, "BYTEARRAY8"),
    (0x97, "NEXT_BUFFER"),
    (0x98, "READONLY_BUFFER"),
];

/// `0x69 (INST)`, or `0xff (not a pickle opcode)`.
fn opcode_label(opcode: u8) -> String {
    match OPCODE_NAMES.iter().find(|(o, _)| *o == opcode) {
        Some((_, name)) => format!("0x{opcode:02x} ({name})"),
        None => format!("0x{opcode:02x} (not a pickle opcode)"),
    }
}

/// The names `GLOBAL` may resolve, as inert tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    TensorClass,
    ParameterClass,
    /// A storage type: typed with its dtype, or `UntypedStorage` (bytes).
    Storage(Option<Dtype>),
    Dtype(Dtype),
}

/// What a `GLOBAL` name resolves to.
#[derive(Debug, Clone, Copy)]
enum Resolved {
    Allowed(Global),
    /// A torch type with no safetensors dtype.
    Unsupported,
}

use Dtype as D;
use Global as G;
use Resolved::{Allowed, Unsupported};

/// The allow-list: `(module, name)` → tag. Anything absent is refused.
#[rustfmt::skip]
const ALLOWED: &[(&str, &str, Resolved)] = &[
    ("collections", "OrderedDict", Allowed(G::OrderedDict)),
    ("torch._utils", "_rebuild_tensor_v2", Allowed(G::RebuildTensorV2)),
    ("torch._utils", "_rebuild_tensor_v3", Allowed(G::RebuildTensorV3)),
    ("torch._utils", "_rebuild_tensor", Allowed(G::RebuildTensor)),
    ("torch._utils", "_rebuild_parameter", Allowed(G::RebuildParameter)),
    ("torch._utils", "_rebuild_parameter_with_state", Allowed(G::RebuildParameterWithState)),
    ("torch._tensor", "_rebuild_from_type_v2", Allowed(G::RebuildFromTypeV2)),
    ("torch", "Tensor", Allowed(G::TensorClass)),
    ("torch.nn.parameter", "Parameter", Allowed(G::ParameterClass)),
    ("torch.storage", "UntypedStorage", Allowed(G::Storage(None))),
    ("torch", "BFloat16Storage", Allowed(G::Storage(Some(D::BF16)))),
    ("torch", "HalfStorage", Allowed(G::Storage(Some(D::F16)))),
    ("torch", "FloatStorage", Allowed(G::Storage(Some(D::F32)))),
    ("torch", "DoubleStorage", Allowed(G::Storage(Some(D::F64)))),
    ("torch", "LongStorage", Allowed(G::Storage(Some(D::I64)))),
    ("torch", "IntStorage", Allowed(G::Storage(Some(D::I32)))),
    ("torch", "ShortStorage", Allowed(G::Storage(Some(D::I16)))),
    ("torch", "CharStorage", Allowed(G::Storage(Some(D::I8)))),
    ("torch", "ByteStorage", Allowed(G::Storage(Some(D::U8)))),
    ("torch", "BoolStorage", Allowed(G::Storage(Some(D::Bool)))),
    ("torch", "ComplexFloatStorage", Unsupported),
    ("torch", "ComplexDoubleStorage", Unsupported),
    ("torch", "QInt8Storage", Unsupported),
    ("torch", "QInt32Storage", Unsupported),
    ("torch", "QUInt8Storage", Unsupported),
    ("torch", "QUInt4x2Storage", Unsupported),
    ("torch", "QUInt2x4Storage", Unsupported),
    ("torch", "bfloat16", Allowed(G::Dtype(D::BF16))),
    ("torch", "float16", Allowed(G::Dtype(D::F16))),
    ("torch", "half", Allowed(G::Dtype(D::F16))),
    ("torch", "float32", Allowed(G::Dtype(D::F32))),
    ("torch", "float", Allowed(G::Dtype(D::F32))),
    ("torch", "float64", Allowed(G::Dtype(D::F64))),
    ("torch", "double", Allowed(G::Dtype(D::F64))),
    ("torch", "int64", Allowed(G::Dtype(D::I64))),
    ("torch", "long", Allowed(G::Dtype(D::I64))),
    ("torch", "int32", Allowed(G::Dtype(D::I32))),
    ("torch", "int", Allowed(G::Dtype(D::I32))),
    ("torch", "int16", Allowed(G::Dtype(D::I16))),
    ("torch", "short", Allowed(G::Dtype(D::I16))),
    ("torch", "int8", Allowed(G::Dtype(D::I8))),
    ("torch", "uint8", Allowed(G::Dtype(D::U8))),
    ("torch", "bool", Allowed(G::Dtype(D::Bool))),
    ("torch", "uint16", Allowed(G::Dtype(D::U16))),
    ("torch", "uint32", Allowed(G::Dtype(D::U32))),
    ("torch", "uint64", Allowed(G::Dtype(D::U64))),
    ("torch", "float8_e5m2", Allowed(G::Dtype(D::F8E5M2))),
    ("torch", "float8_e4m3fn", Allowed(G::Dtype(D::F8E4M3))),
    ("torch", "float8_e5m2fnuz", Unsupported),
    ("torch", "float8_e4m3fnuz", Unsupported),
    ("torch", "float8_e8m0fnu", Unsupported),
    ("torch", "float4_e2m1fn_x2", Unsupported),
    ("torch", "complex32", Unsupported),
    ("torch", "complex64", Unsupported),
    ("torch", "complex128", Unsupported),
    ("torch", "cfloat", Unsupported),
    ("torch", "cdouble", Unsupported),
    ("torch", "qint8", Unsupported),
    ("torch", "qint32", Unsupported),
    ("torch", "quint8", Unsupported),
    ("torch", "quint4x2", Unsupported),
    ("torch", "quint2x4", Unsupported),
    ("torch", "bits1x8", Unsupported),
    ("torch", "bits2x4", Unsupported),
    ("torch", "bits4x2", Unsupported),
    ("torch", "bits8", Unsupported),
    ("torch", "bits16", Unsupported),
];

impl Global {
    /// The dotted Python name, for messages.
    fn name(self) -> String {
        ALLOWED
            .iter()
            .find(|(_, _, r)| matches!(r, Allowed(g) if *g == self))
            .map_or_else(|| format!("{self:?}"), |(m, n, _)| format!("{m}.{n}"))
    }

    /// The functions that build a tensor from a storage (what `_rebuild_from_type_v2` wraps).
    fn builds_tensor(self) -> bool {
        matches!(
            self,
            Global::RebuildTensorV2
                | Global::RebuildTensorV3
                | Global::RebuildTensor
                | Global::RebuildParameter
                | Global::RebuildParameterWithState
        )
    }
}

/// A value on the machine's stack.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<Tuple>),
    /// A dict or OrderedDict, by index into the machine's dicts (dicts are mutable and shared).
    Dict(usize),
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<Tensor>),
}

#[derive(Debug)]
struct Tuple {
    /// 1 + the deepest tuple inside.
    depth: u32,
    items: Vec<Value>,
}

#[derive(Debug, Default)]
struct Dict {
    ordered: bool,
    entries: Vec<(Value, Value)>,
}

#[derive(Debug, PartialEq, Eq)]
struct Storage {
    key: Rc<str>,
    /// `None` for an untyped storage (of bytes).
    dtype: Option<Dtype>,
    numel: u64,
}

impl Storage {
    fn nbytes(&self) -> u64 {
        // Checked when the persistent id was read.
        self.numel * self.dtype.map_or(1, |d| d.size() as u64)
    }
}

/// A tensor as rebuilt, not yet checked (that needs its name, known only once it is a value in
/// the state dict). Size and stride stay the pickle's tuples of ints, shared, so that a tensor
/// rebuilt again and again from memoized arguments costs no more than the handle.
#[derive(Debug)]
struct Tensor {
    storage: Rc<Storage>,
    dtype: Dtype,
    offset: i64,
    size: Rc<Tuple>,
    stride: Rc<Tuple>,
}

impl Tuple {
    /// The items as integers (checked to be ints when the tensor was rebuilt).
    fn ints(&self) -> Vec<i64> {
        self.items
            .iter()
            .map(|v| match v {
                Value::Int(i) => *i,
                _ => 0,
            })
            .collect()
    }

    fn all_ints(&self) -> bool {
        self.items.iter().all(|v| matches!(v, Value::Int(_)))
    }
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn depth(&self) -> u32 {
        match self {
            Value::Tuple(t) => t.depth,
            _ => 0,
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for errors.
    at: usize,
    opcode: u8,
    stack: Vec<Value>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    /// A B-tree, not a hash table: it grows a node at a time, so what it holds is what was
    /// counted, with no doubling table to allocate beside the old one.
    memo: BTreeMap<u32, Value>,
    dicts: Vec<Dict>,
    /// Bytes held, against [`MAX_HELD_BYTES`].
    held: u64,
    tensors: usize,
    storages: BTreeMap<Rc<str>, Rc<Storage>>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine {
            data,
            pos: 0,
            at: 0,
            opcode: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: BTreeMap::new(),
            dicts: Vec::new(),
            held: 0,
            tensors: 0,
            storages: BTreeMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let bytes = self
            .pos
            .checked_add(n)
            .and_then(|end| self.data.get(self.pos..end))
            .ok_or(PickleError::Truncated { offset: self.at })?;
        self.pos += n;
        Ok(bytes)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn take_u8(&mut self) -> Result<u8> {
        Ok(self.take_array::<1>()?[0])
    }

    fn take_len(&mut self, n: u64) -> Result<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| PickleError::Truncated { offset: self.at })?;
        self.take(n)
    }

    /// A `\n`-terminated line of a `GLOBAL`.
    fn take_line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(len) = rest
            .iter()
            .take(MAX_GLOBAL_PART + 1)
            .position(|&b| b == b'\n')
        else {
            return Err(if rest.len() <= MAX_GLOBAL_PART {
                PickleError::Truncated { offset: self.at }
            } else {
                PickleError::BadGlobalName { offset: self.at }
            });
        };
        self.pos += len + 1;
        std::str::from_utf8(&rest[..len])
            .map_err(|_| PickleError::BadGlobalName { offset: self.at })
    }

    fn string(&mut self, bytes: &[u8]) -> Result<Value> {
        self.hold(bytes.len() as u64 + RC_COST)?;
        let s =
            std::str::from_utf8(bytes).map_err(|_| PickleError::BadString { offset: self.at })?;
        Ok(Value::Str(s.into()))
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(PickleError::StackTooDeep {
                offset: self.at,
                max: MAX_STACK,
            });
        }
        self.stack.push(v);
        Ok(())
    }

    /// The floor below which the current opcode may not pop (the last MARK).
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.underflow());
        }
        Ok(self.stack.pop().expect("checked above the floor"))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>> {
        if self.stack.len() < self.floor() + n {
            return Err(self.underflow());
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn top(&self) -> Result<&Value> {
        if self.stack.len() <= self.floor() {
            return Err(self.underflow());
        }
        Ok(self.stack.last().expect("checked above the floor"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().ok_or(PickleError::NoMark {
            offset: self.at,
            opcode: self.opcode,
        })?;
        Ok(self.stack.split_off(mark))
    }

    fn underflow(&self) -> PickleError {
        PickleError::StackUnderflow {
            offset: self.at,
            opcode: self.opcode,
        }
    }

    /// Counts `bytes` more held against [`MAX_HELD_BYTES`].
    fn hold(&mut self, bytes: u64) -> Result<()> {
        self.held = self.held.saturating_add(bytes);
        if self.held > MAX_HELD_BYTES {
            return Err(PickleError::TooManyValues {
                offset: self.at,
                max: MAX_HELD_BYTES,
            });
        }
        Ok(())
    }

    /// Makes room in `v` for one more item, counting the bytes a new allocation takes before
    /// it is made (the old one is freed after the move, and stays counted).
    fn room<T>(held: &mut u64, at: usize, v: &mut Vec<T>) -> Result<()> {
        if v.len() < v.capacity() {
            return Ok(());
        }
        let grow = v.capacity().max(4);
        *held = held.saturating_add(
            (grow * std::mem::size_of::<T>()) as u64
                + (v.capacity() * std::mem::size_of::<T>()) as u64,
        );
        if *held > MAX_HELD_BYTES {
            return Err(PickleError::TooManyValues {
                offset: at,
                max: MAX_HELD_BYTES,
            });
        }
        v.reserve_exact(grow);
        Ok(())
    }

    fn tuple(&mut self, items: Vec<Value>) -> Result<Value> {
        self.hold(items.capacity() as u64 * VALUE_COST + TUPLE_COST)?;
        let depth = 1 + items.iter().map(Value::depth).max().unwrap_or(0);
        if depth > MAX_NESTING {
            return Err(PickleError::NestingTooDeep {
                offset: self.at,
                max: MAX_NESTING,
            });
        }
        Ok(Value::Tuple(Rc::new(Tuple { depth, items })))
    }

    fn new_dict(&mut self, ordered: bool) -> Result<Value> {
        Machine::room(&mut self.held, self.at, &mut self.dicts)?;
        self.dicts.push(Dict {
            ordered,
            entries: Vec::new(),
        });
        Ok(Value::Dict(self.dicts.len() - 1))
    }

    /// Adds `(key, value)` to dict `id`.
    fn set_item(&mut self, id: usize, key: Value, value: Value) -> Result<()> {
        let entries = &mut self.dicts[id].entries;
        Machine::room(&mut self.held, self.at, entries)?;
        entries.push((key, value));
        Ok(())
    }

    /// The dict on top of the stack, which SETITEM(S) fill.
    fn target_dict(&self) -> Result<usize> {
        match self.top()? {
            Value::Dict(id) => Ok(*id),
            other => Err(PickleError::NotADictTarget {
                offset: self.at,
                opcode: self.opcode,
                found: other.kind(),
            }),
        }
    }

    fn memo_put(&mut self, index: u32) -> Result<()> {
        let value = self.top()?.clone();
        if !self.memo.contains_key(&index) {
            self.hold(MEMO_COST)?;
        }
        self.memo.insert(index, value);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> Result<()> {
        let value = self
            .memo
            .get(&index)
            .cloned()
            .ok_or(PickleError::MemoMissing {
                offset: self.at,
                index,
            })?;
        self.push(value)
    }

    fn global(&self, module: &str, name: &str) -> Result<Value> {
        match ALLOWED.iter().find(|(m, n, _)| *m == module && *n == name) {
            Some((_, _, Allowed(g))) => Ok(Value::Global(*g)),
            Some((_, _, Unsupported)) => Err(PickleError::UnsupportedType {
                offset: self.at,
                global: format!("{module}.{name}"),
            }),
            None => Err(PickleError::ForbiddenGlobal {
                offset: self.at,
                global: format!("{module}.{name}"),
            }),
        }
    }

    /// Runs the program to STOP; returns the value it leaves.
    fn run(&mut self) -> Result<Value> {
        loop {
            self.at = self.pos;
            self.opcode = self.take_u8()?;
            match self.opcode {
                op::PROTO => {
                    let protocol = self.take_u8()?;
                    if !(2..=5).contains(&protocol) {
                        return Err(PickleError::UnsupportedProtocol {
                            offset: self.at,
                            protocol,
                        });
                    }
                }
                op::FRAME => {
                    // Frames only group opcodes for buffered reading; their length must fit.
                    let len = u64::from_le_bytes(self.take_array()?);
                    if len > (self.data.len() - self.pos) as u64 {
                        return Err(PickleError::Truncated { offset: self.at });
                    }
                }
                op::STOP => break,
                op::MARK => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(PickleError::StackTooDeep {
                            offset: self.at,
                            max: MAX_MARKS,
                        });
                    }
                    self.marks.push(self.stack.len());
                }
                op::EMPTY_DICT => {
                    let d = self.new_dict(false)?;
                    self.push(d)?;
                }
                op::EMPTY_TUPLE => {
                    let t = self.tuple(Vec::new())?;
                    self.push(t)?;
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let items = self.pop_n(usize::from(self.opcode - op::TUPLE1 + 1))?;
                    let t = self.tuple(items)?;
                    self.push(t)?;
                }
                op::NONE => self.push(Value::None)?,
                op::NEWTRUE => self.push(Value::Bool(true))?,
                op::NEWFALSE => self.push(Value::Bool(false))?,
                op::BININT => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v.into()))?;
                }
                op::BININT1 => {
                    let v = self.take_u8()?;
                    self.push(Value::Int(v.into()))?;
                }
                op::BININT2 => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v.into()))?;
                }
                op::LONG1 => {
                    let n = self.take_u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        return Err(PickleError::IntegerTooLarge { offset: self.at });
                    }
                    // Little-endian two's complement, sign-extended from its last byte.
                    let fill = if bytes.last().is_some_and(|b| b & 0x80 != 0) {
                        0xFF
                    } else {
                        0
                    };
                    let mut wide = [fill; 8];
                    wide[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(wide)))?;
                }
                op::BINUNICODE => {
                    let n = u32::from_le_bytes(self.take_array()?);
                    let bytes = self.take_len(n.into())?;
                    let s = self.string(bytes)?;
                    self.push(s)?;
                }
                op::SHORT_BINUNICODE => {
                    let n = self.take_u8()?;
                    let bytes = self.take_len(n.into())?;
                    let s = self.string(bytes)?;
                    self.push(s)?;
                }
                op::BINUNICODE8 => {
                    let n = u64::from_le_bytes(self.take_array()?);
                    let bytes = self.take_len(n)?;
                    let s = self.string(bytes)?;
                    self.push(s)?;
                }
                op::GLOBAL => {
                    let module = self.take_line()?;
                    let name = self.take_line()?;
                    let g = self.global(module, name)?;
                    self.push(g)?;
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(PickleError::BadGlobalName { offset: self.at });
                    };
                    let g = self.global(&module, &name)?;
                    self.push(g)?;
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push(Value::Storage(storage))?;
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push(v)?;
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    let ordered_dict = matches!(target, Value::Dict(id) if self.dicts[*id].ordered);
                    if !ordered_dict {
                        return Err(PickleError::BadBuild {
                            offset: self.at,
                            found: target.kind(),
                        });
                    }
                    // An OrderedDict's state is its `__dict__` (a state dict's `_metadata`):
                    // attributes only, never tensors; read and dropped.
                    if !matches!(state, Value::Dict(_) | Value::None) {
                        return Err(PickleError::BadBuild {
                            offset: self.at,
                            found: state.kind(),
                        });
                    }
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let id = self.target_dict()?;
                    self.set_item(id, key, value)?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let id = self.target_dict()?;
                    if items.len() % 2 != 0 {
                        return Err(self.underflow());
                    }
                    let mut items = items.into_iter();
                    while let (Some(k), Some(v)) = (items.next(), items.next()) {
                        self.set_item(id, k, v)?;
                    }
                }
                op::BINPUT => {
                    let i = self.take_u8()?;
                    self.memo_put(i.into())?;
                }
                op::LONG_BINPUT => {
                    let i = u32::from_le_bytes(self.take_array()?);
                    self.memo_put(i)?;
                }
                op::MEMOIZE => {
                    let i = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.take_u8()?;
                    self.memo_get(i.into())?;
                }
                op::LONG_BINGET => {
                    let i = u32::from_le_bytes(self.take_array()?);
                    self.memo_get(i)?;
                }
                opcode => {
                    return Err(PickleError::UnsupportedOpcode {
                        offset: self.at,
                        opcode,
                    })
                }
            }
        }
        if self.pos != self.data.len() {
            return Err(PickleError::TrailingBytes {
                offset: self.at,
                len: self.data.len() - self.pos,
            });
        }
        if self.stack.len() != 1 || !self.marks.is_empty() {
            return Err(PickleError::UnbalancedStop {
                offset: self.at,
                values: self.stack.len(),
                marks: self.marks.len(),
            });
        }
        Ok(self.stack.pop().expect("one value, checked"))
    }

    /// `('storage', storage type, key, location, numel)`, as `torch.save`'s `persistent_id`
    /// writes it.
    fn persistent_load(&mut self, pid: Value) -> Result<Rc<Storage>> {
        let bad = PickleError::BadPersistentId { offset: self.at };
        let Value::Tuple(t) = pid else {
            return Err(bad);
        };
        let [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_location), Value::Int(numel)] =
            &t.items[..]
        else {
            return Err(bad);
        };
        let plain_key = !key.is_empty()
            && key.len() <= MAX_STORAGE_KEY
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            && &**tag == "storage";
        let numel =
            u64::try_from(*numel).map_err(|_| PickleError::BadPersistentId { offset: self.at })?;
        let size = dtype.map_or(1, |d| d.size() as u64);
        if !plain_key || numel.checked_mul(size).is_none() {
            return Err(bad);
        }
        let storage = Storage {
            key: key.clone(),
            dtype: *dtype,
            numel,
        };
        match self.storages.get(key) {
            Some(seen) if **seen == storage => Ok(seen.clone()),
            Some(_) => Err(PickleError::StorageConflict {
                offset: self.at,
                storage: key.to_string(),
            }),
            None => {
                self.hold(STORAGE_COST)?;
                let storage = Rc::new(storage);
                self.storages.insert(key.clone(), storage.clone());
                Ok(storage)
            }
        }
    }

    /// REDUCE: applies an allowed function to its arguments, symbolically.
    fn reduce(&mut self, callable: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = callable else {
            return Err(PickleError::NotCallable {
                offset: self.at,
                what: format!("a {}", callable.kind()),
            });
        };
        let Value::Tuple(args) = args else {
            return Err(self.bad_args(g, "a tuple of arguments"));
        };
        let a = &args.items[..];
        match g {
            Global::OrderedDict => {
                if !a.is_empty() {
                    return Err(self.bad_args(g, "no arguments"));
                }
                self.new_dict(true)
            }
            Global::RebuildTensorV2 | Global::RebuildTensorV3 | Global::RebuildTensor => {
                self.rebuild_tensor(g, a)
            }
            Global::RebuildParameter => match a {
                [Value::Tensor(t), Value::Bool(_), Value::Dict(_)] => Ok(Value::Tensor(t.clone())),
                _ => Err(self.bad_args(g, "(tensor, requires_grad, backward_hooks)")),
            },
            Global::RebuildParameterWithState => match a {
                [Value::Tensor(t), Value::Bool(_), Value::Dict(_), _state] => {
                    Ok(Value::Tensor(t.clone()))
                }
                _ => Err(self.bad_args(g, "(tensor, requires_grad, backward_hooks, state)")),
            },
            Global::RebuildFromTypeV2 => match a {
                [Value::Global(func), Value::Global(Global::TensorClass | Global::ParameterClass), Value::Tuple(inner), _state]
                    if func.builds_tensor() =>
                {
                    // The Python attributes in `_state` are ignored; the tensor is what counts.
                    self.reduce(Value::Global(*func), Value::Tuple(inner.clone()))
                }
                _ => Err(self.bad_args(
                    g,
                    "(tensor-rebuilding function, torch.Tensor or Parameter, arguments, state)",
                )),
            },
            Global::TensorClass
            | Global::ParameterClass
            | Global::Storage(_)
            | Global::Dtype(_) => Err(PickleError::NotCallable {
                offset: self.at,
                what: g.name(),
            }),
        }
    }

    fn bad_args(&self, g: Global, expected: &'static str) -> PickleError {
        let function = match g {
            Global::OrderedDict => "collections.OrderedDict",
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2",
            Global::RebuildTensorV3 => "torch._utils._rebuild_tensor_v3",
            Global::RebuildTensor => "torch._utils._rebuild_tensor",
            Global::RebuildParameter => "torch._utils._rebuild_parameter",
            Global::RebuildParameterWithState => "torch._utils._rebuild_parameter_with_state",
            Global::RebuildFromTypeV2 => "torch._tensor._rebuild_from_type_v2",
            _ => "a torch type",
        };
        PickleError::BadArguments {
            offset: self.at,
            function,
            expected,
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`,
    /// `_rebuild_tensor_v3(…, hooks, dtype[, metadata])`, `_rebuild_tensor(storage, offset,
    /// size, stride)`.
    fn rebuild_tensor(&mut self, g: Global, a: &[Value]) -> Result<Value> {
        let (expected, fixed, dtype_at) = match g {
            Global::RebuildTensorV2 => (
                "(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])",
                6,
                None,
            ),
            Global::RebuildTensorV3 => (
                "(storage, offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])",
                7,
                Some(6),
            ),
            _ => ("(storage, offset, size, stride)", 4, None),
        };
        let bad = || self.bad_args(g, expected);
        let metadata = match a.len() {
            n if n == fixed => None,
            n if n == fixed + 1 && fixed > 4 => a.last(),
            _ => return Err(bad()),
        };
        let [Value::Storage(storage), Value::Int(offset), Value::Tuple(size), Value::Tuple(stride), ..] =
            a
        else {
            return Err(bad());
        };
        if fixed > 4 && !matches!((&a[4], &a[5]), (Value::Bool(_), Value::Dict(_))) {
            return Err(bad());
        }
        let dtype = match dtype_at {
            Some(i) => match &a[i] {
                Value::Global(Global::Dtype(d)) => *d,
                _ => return Err(bad()),
            },
            // As torch.load does: a typed storage gives its dtype; untyped storage is bytes.
            None => storage.dtype.unwrap_or(Dtype::U8),
        };
        match metadata {
            None | Some(Value::None) => {}
            Some(Value::Dict(id)) => {
                // `{"conj": True}` or `{"neg": True}`: the bytes are not the values.
                if self.dicts[*id]
                    .entries
                    .iter()
                    .any(|(_, v)| matches!(v, Value::Bool(true)))
                {
                    return Err(PickleError::TensorFlags { offset: self.at });
                }
            }
            Some(_) => return Err(bad()),
        }
        if !size.all_ints() || !stride.all_ints() {
            return Err(bad());
        }
        let dims = size.items.len().max(stride.items.len());
        if dims > MAX_DIMS {
            return Err(PickleError::TooManyDims {
                offset: self.at,
                dims,
                max: MAX_DIMS,
            });
        }
        self.tensors += 1;
        if self.tensors > MAX_TENSORS {
            return Err(PickleError::TooManyTensors {
                offset: self.at,
                max: MAX_TENSORS,
            });
        }
        self.hold(TENSOR_COST)?;
        Ok(Value::Tensor(Rc::new(Tensor {
            storage: storage.clone(),
            dtype,
            offset: *offset,
            size: size.clone(),
            stride: stride.clone(),
        })))
    }

    /// The final value as a checked state dict.
    fn state_dict(&self, top: Value) -> Result<StateDict> {
        let Value::Dict(id) = top else {
            return Err(PickleError::NotADict { found: top.kind() });
        };
        let mut names = HashSet::new();
        let mut tensors = Vec::with_capacity(self.dicts[id].entries.len());
        let mut storages: Vec<PickledStorage> = Vec::new();
        let mut seen_storages = HashSet::new();
        for (index, (key, value)) in self.dicts[id].entries.iter().enumerate() {
            let Value::Str(name) = key else {
                return Err(PickleError::KeyNotString {
                    index,
                    found: key.kind(),
                });
            };
            if !names.insert(name.clone()) {
                return Err(PickleError::DuplicateKey {
                    name: name.to_string(),
                });
            }
            let Value::Tensor(t) = value else {
                return Err(PickleError::NotATensor {
                    name: name.to_string(),
                    found: value.kind(),
                });
            };
            let tensor = check_tensor(name, t)?;
            if seen_storages.insert(t.storage.key.clone()) {
                storages.push(PickledStorage {
                    key: t.storage.key.to_string(),
                    nbytes: t.storage.nbytes(),
                });
            }
            tensors.push(tensor);
        }
        Ok(StateDict { tensors, storages })
    }
}

/// Checks a rebuilt tensor: a C-contiguous run inside its storage.
fn check_tensor(name: &str, t: &Tensor) -> Result<PickledTensor> {
    let tensor = || name.to_owned();
    let (raw_shape, raw_strides) = (t.size.ints(), t.stride.ints());
    if raw_shape.iter().any(|&d| d < 0) {
        return Err(PickleError::BadShape {
            tensor: tensor(),
            shape: raw_shape,
        });
    }
    if raw_strides.len() != raw_shape.len() || raw_strides.iter().any(|&s| s < 0) {
        return Err(PickleError::BadStrides {
            tensor: tensor(),
            shape: raw_shape,
            strides: raw_strides,
        });
    }
    let Ok(offset) = u64::try_from(t.offset) else {
        return Err(PickleError::BadStorageOffset {
            tensor: tensor(),
            offset: t.offset,
        });
    };
    let shape: Vec<u64> = raw_shape.iter().map(|&d| d as u64).collect();
    let strides: Vec<u64> = raw_strides.iter().map(|&s| s as u64).collect();
    let size = t.dtype.size() as u64;
    let overflow = || PickleError::SizeOverflow {
        tensor: tensor(),
        shape: raw_shape.clone(),
        offset: t.offset,
    };
    let numel = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(overflow)?;
    let nbytes = numel.checked_mul(size).ok_or_else(overflow)?;
    let start = offset.checked_mul(size).ok_or_else(overflow)?;
    let end = start.checked_add(nbytes).ok_or_else(overflow)?;

    // C order: each dimension's stride is the product of the later dimensions. As in torch's
    // `is_contiguous`, dimensions of size 1 may have any stride, and an empty tensor is
    // contiguous.
    let mut expected = vec![0u64; shape.len()];
    let mut step = 1u64;
    for i in (0..shape.len()).rev() {
        expected[i] = step;
        step = step.saturating_mul(shape[i]);
    }
    let contiguous =
        numel == 0 || (0..shape.len()).all(|i| shape[i] == 1 || strides[i] == expected[i]);
    if !contiguous {
        return Err(PickleError::NotContiguous {
            tensor: tensor(),
            shape,
            strides,
            expected,
        });
    }
    let storage_len = t.storage.nbytes();
    if end > storage_len {
        return Err(PickleError::OutOfStorage {
            tensor: tensor(),
            storage: t.storage.key.to_string(),
            start,
            end,
            storage_len,
        });
    }
    Ok(PickledTensor {
        name: name.to_owned(),
        dtype: t.dtype,
        shape,
        strides,
        storage: t.storage.key.to_string(),
        storage_offset: offset,
        start,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pickle from raw opcode bytes, after `PROTO 2`.
    fn p(body: &[u8]) -> Vec<u8> {
        [&[op::PROTO, 2][..], body].concat()
    }

    fn global(module: &str, name: &str) -> Vec<u8> {
        format!("c{module}\n{name}\n").into_bytes()
    }

    fn s(text: &str) -> Vec<u8> {
        let mut v = vec![op::BINUNICODE];
        v.extend_from_slice(&(text.len() as u32).to_le_bytes());
        v.extend_from_slice(text.as_bytes());
        v
    }

    /// `{name: _rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', numel), 0, (n,), (1,),
    /// False, OrderedDict())}`, with `extra` spliced in before the final `SETITEMS STOP`.
    fn one_tensor(name: &str, key: &str, n: u8, extra: &[u8]) -> Vec<u8> {
        p(&[
            b"}(".as_slice(),
            &s(name),
            &global("torch._utils", "_rebuild_tensor_v2"),
            b"((",
            &s("storage"),
            &global("torch", "FloatStorage"),
            &s(key),
            &s("cpu"),
            &[op::BININT1, n, op::TUPLE, op::BINPERSID, op::BININT1, 0],
            &[
                op::BININT1,
                n,
                op::TUPLE1,
                op::BININT1,
                1,
                op::TUPLE1,
                op::NEWFALSE,
            ],
            &global("collections", "OrderedDict"),
            b")RtR",
            extra,
            b"u.",
        ]
        .concat())
    }

    fn err(data: &[u8]) -> PickleError {
        parse(data).expect_err("refused")
    }

    #[test]
    fn reads_a_minimal_state_dict() {
        let sd = parse(&one_tensor("w", "0", 3, b"")).unwrap();
        assert_eq!(
            sd.tensors,
            [PickledTensor {
                name: "w".into(),
                dtype: Dtype::F32,
                shape: vec![3],
                strides: vec![1],
                storage: "0".into(),
                storage_offset: 0,
                start: 0,
                end: 12,
            }]
        );
        assert_eq!(
            sd.storages,
            [PickledStorage {
                key: "0".into(),
                nbytes: 12
            }]
        );
    }

    #[test]
    fn reads_the_old_rebuild_function_and_untyped_storages() {
        // `_rebuild_tensor(storage, offset, size, stride)`, over a storage of 6 bytes as U8.
        let pkl = p(&[
            b"}(".as_slice(),
            &s("old"),
            &global("torch._utils", "_rebuild_tensor"),
            b"((",
            &s("storage"),
            &global("torch.storage", "UntypedStorage"),
            &s("k"),
            &s("cpu"),
            &[op::BININT1, 6, op::TUPLE, op::BINPERSID, op::BININT1, 2],
            &[
                op::BININT1,
                4,
                op::TUPLE1,
                op::BININT1,
                1,
                op::TUPLE1,
                op::TUPLE,
                b'R',
            ],
            b"u.",
        ]
        .concat());
        let sd = parse(&pkl).unwrap();
        let t = &sd.tensors[0];
        assert_eq!(
            (t.dtype, &t.shape[..], t.start, t.end),
            (Dtype::U8, &[4u64][..], 2, 6)
        );
        assert_eq!(sd.storages[0].nbytes, 6);
    }

    #[test]
    fn refuses_globals_off_the_list_when_read() {
        for (module, name) in [
            ("os", "system"),
            ("posix", "system"),
            ("builtins", "eval"),
            ("__builtin__", "exec"),
            ("subprocess", "Popen"),
            ("torch", "load"),
            ("torch.cuda", "FloatStorage"),
            ("collections", "OrderedDictX"),
            ("torch._utils ", "_rebuild_tensor_v2"),
        ] {
            // Just naming it is refused, even if it is never called.
            let e = err(&p(&[global(module, name), b".".to_vec()].concat()));
            assert!(
                matches!(&e, PickleError::ForbiddenGlobal { offset: 2, global } if *global == format!("{module}.{name}")),
                "{module}.{name}: {e}"
            );
        }
        // STACK_GLOBAL the same way.
        let e = err(&p(
            &[s("os"), s("system"), vec![op::STACK_GLOBAL, b'.']].concat()
        ));
        assert!(matches!(e, PickleError::ForbiddenGlobal { global, .. } if global == "os.system"));
        let e = err(&p(&[global("torch", "complex64"), b".".to_vec()].concat()));
        assert!(matches!(e, PickleError::UnsupportedType { .. }));
    }

    #[test]
    fn refuses_opcodes_that_can_call_anything() {
        // INST, OBJ, NEWOBJ, NEWOBJ_EX, EXT1/2/4 — and the ones torch.save does not write.
        for opcode in [
            b'i', b'o', 0x81, 0x92, 0x82, 0x83, 0x84, b'a', b']', b'G', b'S', 0xff,
        ] {
            let e = err(&p(&[opcode, b'.']));
            assert!(
                matches!(e, PickleError::UnsupportedOpcode { offset: 2, opcode: o } if o == opcode),
                "{opcode:#x}"
            );
        }
        assert!(err(&p(b"i")).to_string().contains("(INST)"));
    }

    #[test]
    fn refuses_calls_of_allowed_non_functions() {
        // A dtype or a storage type is allowed as a value, not as a callable.
        let e = err(&p(&[global("torch", "bfloat16"), b")R.".to_vec()].concat()));
        assert!(matches!(e, PickleError::NotCallable { what, .. } if what == "torch.bfloat16"));
        let e = err(&p(b"K\x01)R."));
        assert!(matches!(e, PickleError::NotCallable { .. }));
        let e = err(&p(&[
            global("collections", "OrderedDict"),
            b"K\x01\x85R.".to_vec(),
        ]
        .concat()));
        assert!(matches!(
            e,
            PickleError::BadArguments {
                function: "collections.OrderedDict",
                ..
            }
        ));
    }

    #[test]
    fn stack_discipline() {
        assert!(matches!(err(&p(b"t.")), PickleError::NoMark { .. }));
        assert!(matches!(
            err(&p(b"(\x85.")),
            PickleError::StackUnderflow { .. }
        ));
        assert!(matches!(err(&p(b"R.")), PickleError::StackUnderflow { .. }));
        assert!(matches!(
            err(&p(b"h\x05.")),
            PickleError::MemoMissing { index: 5, .. }
        ));
        assert!(matches!(
            err(&p(b"NN.")),
            PickleError::UnbalancedStop {
                values: 2,
                marks: 0,
                ..
            }
        ));
        assert!(matches!(
            err(&p(b"}(.")),
            PickleError::UnbalancedStop { marks: 1, .. }
        ));
        assert!(matches!(
            err(&p(b"}.N")),
            PickleError::TrailingBytes { len: 1, .. }
        ));
        assert!(matches!(
            err(b"\x80\x06}."),
            PickleError::UnsupportedProtocol { protocol: 6, .. }
        ));
        assert!(matches!(err(&p(b"N")), PickleError::Truncated { .. }));
        assert!(matches!(
            err(&p(b"X\xff\xff\xff\xff")),
            PickleError::Truncated { .. }
        ));
        assert!(matches!(
            err(&p(b"X\x01\x00\x00\x00\xff.")),
            PickleError::BadString { .. }
        ));
        assert!(matches!(
            err(&p(b"\x8a\x09123456789.")),
            PickleError::IntegerTooLarge { .. }
        ));
        assert!(matches!(
            err(&p(b"N}s.")),
            PickleError::StackUnderflow { .. }
        ));
        assert!(matches!(
            err(&p(b"NNNs.")),
            PickleError::NotADictTarget { found: "None", .. }
        ));
        assert!(matches!(
            err(&p(b"}}b.")),
            PickleError::BadBuild { found: "dict", .. }
        ));
        assert!(matches!(
            err(&p(b"N.")),
            PickleError::NotADict { found: "None" }
        ));
        assert!(matches!(
            err(&p(b"}(K\x01Nu.")),
            PickleError::KeyNotString {
                index: 0,
                found: "int"
            }
        ));
    }

    #[test]
    fn longs_are_sign_extended() {
        // A 3-byte LONG1 of -2 as a storage offset, caught as negative.
        let pkl = one_tensor("w", "0", 1, b"");
        let at = pkl
            .windows(3)
            .position(|w| w == [op::BINPERSID, op::BININT1, 0])
            .unwrap();
        let pkl = [
            &pkl[..at + 1],
            &[op::LONG1, 3, 0xFE, 0xFF, 0xFF],
            &pkl[at + 3..],
        ]
        .concat();
        assert!(matches!(
            err(&pkl),
            PickleError::BadStorageOffset { offset: -2, .. }
        ));
    }

    #[test]
    fn state_dict_entries_must_be_unique_tensors() {
        // The same tensor under the same name twice.
        let extra = [s("w"), vec![op::BINGET, 9]].concat();
        let pkl = one_tensor("w", "0", 2, b"");
        let memo = [&pkl[..pkl.len() - 2], b"q\x09", &extra, b"u."].concat();
        assert!(matches!(err(&memo), PickleError::DuplicateKey { name } if name == "w"));
        let pkl = one_tensor("w", "0", 2, &[s("n"), vec![op::NONE]].concat());
        assert!(matches!(
            err(&pkl),
            PickleError::NotATensor { name, found: "None" } if name == "n"
        ));
    }

    #[test]
    fn storages_must_be_consistent() {
        // Storage '0' named again with another size.
        let second = [
            s("v"),
            global("torch._utils", "_rebuild_tensor_v2"),
            b"((".to_vec(),
            s("storage"),
            global("torch", "FloatStorage"),
            s("0"),
            s("cpu"),
            vec![op::BININT1, 9, op::TUPLE, op::BINPERSID],
        ]
        .concat();
        assert!(matches!(
            err(&one_tensor("w", "0", 2, &second)),
            PickleError::StorageConflict { storage, .. } if storage == "0"
        ));
        for key in ["../0", "", "a/b", "0 "] {
            assert!(
                matches!(
                    err(&one_tensor("w", key, 2, b"")),
                    PickleError::BadPersistentId { .. }
                ),
                "{key:?}"
            );
        }
    }

    #[test]
    fn conjugate_or_negative_bits_are_refused() {
        let pkl = one_tensor("w", "0", 2, b"");
        // Add a metadata dict {'neg': True} as the 7th argument of _rebuild_tensor_v2.
        let at = pkl.windows(4).position(|w| w == b")RtR").unwrap() + 2;
        let meta = [vec![b'}'], s("neg"), vec![op::NEWTRUE, op::SETITEM]].concat();
        let flagged = [&pkl[..at], &meta, &pkl[at..]].concat();
        assert!(matches!(err(&flagged), PickleError::TensorFlags { .. }));
        let meta = [vec![b'}'], s("neg"), vec![op::NEWFALSE, op::SETITEM]].concat();
        assert!(parse(&[&pkl[..at], &meta, &pkl[at..]].concat()).is_ok());
    }

    #[test]
    fn bounds_hold() {
        // Marks.
        let marks = p(&[vec![b'('; MAX_MARKS + 1], vec![b'.']].concat());
        assert!(matches!(
            err(&marks),
            PickleError::StackTooDeep { max: MAX_MARKS, .. }
        ));
        // Stack.
        let stack = p(&[vec![b'N'; MAX_STACK + 1], vec![b'.']].concat());
        assert!(matches!(
            err(&stack),
            PickleError::StackTooDeep { max: MAX_STACK, .. }
        ));
        // Nesting: TUPLE1 over and over.
        let nest = p(&[
            vec![b'N'],
            vec![op::TUPLE1; MAX_NESTING as usize + 1],
            vec![b'.'],
        ]
        .concat());
        assert!(matches!(err(&nest), PickleError::NestingTooDeep { .. }));
        // Memo: distinct LONG_BINPUT indices count against the bytes held.
        let mut memo = vec![b'N'];
        for i in 0..=(MAX_HELD_BYTES / MEMO_COST) as u32 {
            memo.push(op::LONG_BINPUT);
            memo.extend_from_slice(&i.to_le_bytes());
        }
        assert!(matches!(
            err(&p(&memo)),
            PickleError::TooManyValues { offset, .. } if offset > memo.len() - 10
        ));
        // Held bytes: the same memoized None, in tuples of MAX_STACK / 2 items, stored in a dict.
        let tuples = MAX_HELD_BYTES as usize / (MAX_STACK / 2 * VALUE_COST as usize) + 1;
        let mut values = vec![b'N', op::BINPUT, 0, b'}'];
        for _ in 0..tuples {
            values.extend_from_slice(&[op::BINGET, 0, b'(']);
            for _ in 0..MAX_STACK / 2 {
                values.extend_from_slice(&[op::BINGET, 0]);
            }
            values.extend_from_slice(&[op::TUPLE, op::SETITEM]);
        }
        assert!(matches!(
            err(&p(&values)),
            PickleError::TooManyValues { .. }
        ));
    }

    /// What the machine holds for a real `torch.save` state dict of many tensors (2 000, with
    /// Mixtral-style expert names, `tests/fixtures/torch/many/`), per tensor: the figure behind
    /// [`MAX_HELD_BYTES`]'s "some 11 000 tensors".
    #[test]
    fn real_state_dicts_fit() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/torch/many/pytorch_model.bin"
        );
        let file = std::fs::read(path).unwrap();
        let archive = crate::format::zip::Archive::parse_bytes(&file).unwrap();
        let member = archive.get("pytorch_model/data.pkl").unwrap();
        let slice = crate::format::zip::slice_reader(&file);
        let pkl = archive.read_member(member, MAX_PICKLE_LEN, slice).unwrap();
        let mut m = Machine::new(&pkl);
        let top = m.run().unwrap();
        let tensors = m.state_dict(top).unwrap().tensors.len() as u64;
        assert_eq!(tensors, 2000);
        let per_tensor = m.held / tensors;
        eprintln!(
            "{tensors} tensors: {} bytes held, {per_tensor} per tensor; pickle {} bytes",
            m.held,
            pkl.len()
        );
        assert!(
            (1500..1950).contains(&per_tensor),
            "{per_tensor} bytes per tensor"
        );
        assert!(MAX_HELD_BYTES / per_tensor > 10_000);
    }

    #[test]
    fn tensor_count_is_bounded() {
        // One tensor built again and again from memoized arguments into one dict.
        // `{_rebuild_tensor_v2: args}` puts the function and its arguments in the memo.
        let mut body = vec![b'}'];
        body.extend(global("torch._utils", "_rebuild_tensor_v2"));
        body.extend_from_slice(&[op::BINPUT, 0]);
        body.extend_from_slice(b"((");
        body.extend(s("storage"));
        body.extend(global("torch", "FloatStorage"));
        body.extend(s("0"));
        body.extend(s("cpu"));
        body.extend_from_slice(&[op::BININT1, 1, op::TUPLE, op::BINPERSID, op::BININT1, 0]);
        body.extend_from_slice(&[op::BININT1, 1, op::TUPLE1, op::BININT1, 1, op::TUPLE1]);
        body.push(op::NEWFALSE);
        body.push(b'}');
        body.extend_from_slice(&[op::TUPLE, op::BINPUT, 1, op::SETITEM]);
        for _ in 0..=MAX_TENSORS {
            body.extend_from_slice(&[op::NONE, op::BINGET, 0, op::BINGET, 1, b'R', op::SETITEM]);
        }
        body.push(b'.');
        assert!(matches!(err(&p(&body)), PickleError::TooManyTensors { .. }));
    }
}
