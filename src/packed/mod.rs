//! Packed shards: safetensors files compressed with zstd in independent blocks, readable with
//! random access, optionally stored as the XOR with a base model. `docs/packed-format.md` is the
//! specification of the bytes.
//!
//! - `layout`: the preamble, index and trailer bytes, and every structural check;
//! - `transform`: per-tensor segments, XOR, byte grouping (pure functions on slices);
//! - `block`: one block packed and unpacked (per-thread zstd state);
//! - `encode`: [`PackWriter`] (a streaming sink) and [`pack_shard`];
//! - `decode`: [`PackedShard`] (random access through a [`BlockCache`]) and [`unpack_shard`];
//! - `base`: the [`Base`] model and its identity;
//! - `dir`: `mergestream pack` / `unpack` of whole model directories ([`pack_dir`],
//!   [`unpack_dir`]);
//! - `sink`: where bytes go ([`ByteSink`], [`AtomicFile`]);
//! - [`error`]: the [`PackedError`] enum.
//!
//! Nothing here merges; the engine reads packed models through [`PackedShard::read_at`]
//! (`model::ShardKind::Packed`) and writes `--compress` output through [`PackWriter`].

mod base;
mod block;
mod decode;
mod dir;
mod encode;
pub mod error;
pub(crate) mod layout;
mod sink;
mod transform;

use std::path::Path;

pub use base::{hex, Base};
pub use decode::{unpack_shard, BlockCache, PackedShard, ReadAt};
pub use dir::{open_packed_dir, pack_dir, unpack_dir, DirSummary, PACKED_EXT, PACKED_MANIFEST};
pub use encode::{pack_shard, pack_shard_into, PackOptions, PackWriter, PackedSummary};
pub use error::PackedError;
pub use layout::MAGIC;
pub use sink::{AtomicFile, ByteSink, Persisted};

use crate::error::{Error, HeaderError, Result};
use crate::format::header::{self, Header};

/// The smallest block size the format allows (tiny blocks are for tests and fuzzing).
pub const MIN_BLOCK_SIZE: u32 = 64;
/// The largest block size the format allows.
pub const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// The block size `pack` uses unless told otherwise (see docs/packed-format.md for the
/// measurements behind it).
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// The zstd level `pack` uses unless told otherwise: measured smaller *and* faster than zstd's
/// default of 3 on byte-grouped weights (see docs/packed-format.md).
pub const DEFAULT_LEVEL: i32 = 1;

/// The name of the packed file of the shard `name` (`NAME.mszst`).
pub fn packed_name(name: &str) -> String {
    format!("{name}.{PACKED_EXT}")
}

/// The name of the shard a packed file `name` restores to (`name` without `.mszst`; a name
/// without that ending is returned as it is).
pub fn unpacked_name(name: &str) -> &str {
    name.strip_suffix(PACKED_EXT)
        .and_then(|n| n.strip_suffix('.'))
        .unwrap_or(name)
}

/// Validates a safetensors prefix (8-byte length + header JSON) for a data section of
/// `data_len` bytes, with `format::header`'s rules.
pub fn parse_prefix(path: &Path, prefix: &[u8], data_len: u64) -> Result<Header> {
    let Some((len, json)) = prefix.split_first_chunk::<8>() else {
        return Err(Error::header(
            path,
            HeaderError::TooShort {
                len: prefix.len() as u64,
            },
        ));
    };
    let n = u64::from_le_bytes(*len);
    if n != json.len() as u64 {
        return Err(PackedError::CorruptPreamble {
            path: path.to_path_buf(),
            problem: error::PreambleProblem::PrefixLength {
                recorded: prefix.len() as u64,
                header: n,
            },
        }
        .into());
    }
    if n > header::MAX_HEADER_LEN {
        return Err(Error::header(path, HeaderError::TooLarge { len: n }));
    }
    header::parse(json, data_len).map_err(|kind| Error::header(path, kind))
}
