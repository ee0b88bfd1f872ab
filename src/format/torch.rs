//! PyTorch checkpoints (`pytorch_model.bin`, `pytorch_model-0000k-of-0000n.bin`) as input.
//!
//! [`read`] validates one file written by `torch.save(state_dict, f)` (the zip format, default
//! since PyTorch 1.6) and returns every tensor's name, dtype, shape and the absolute byte range of
//! its data in the file, so that a caller streams tensor bytes with positioned reads, in chunks,
//! exactly as from a safetensors shard. On the way it checks: the archive's structure
//! ([`super::zip`]); that its members sit under one `<archive>/` directory as `torch.load`
//! requires, with one `data.pkl`, a `version` torch can read, and a `byteorder` of `little` (or
//! none, as older writers left it); the state dict pickle ([`super::pickle`], which executes
//! nothing); and for every storage a tensor uses, a stored (uncompressed) member
//! `<archive>/data/<key>` of exactly the size the pickle declares. Only `data.pkl`, `byteorder`
//! and `version` are read into memory, each bounded and CRC-checked.
//!
//! Deliberate refusals, each with its own [`TorchError`] variant:
//! - the legacy format (`_use_new_zipfile_serialization=False`, PyTorch < 1.6: concatenated
//!   pickles, then raw storages each behind a length). Supporting it would mean a second layout
//!   and a second pickle dialect for files that are rare on the Hub today and that
//!   `torch.load` + `torch.save` (or a safetensors conversion) turns into the zip format;
//! - big-endian checkpoints (`byteorder` = `big`): the readers above this module stream bytes
//!   unchanged, and swapping them is not worth a code path for files no mainstream machine writes;
//! - compressed members (`torch.save` never compresses; a repacked archive would have to be
//!   decompressed, which defeats positioned reads).
//!
//! A sharded checkpoint's `pytorch_model.bin.index.json` has the same JSON shape as the
//! safetensors index: parse it with [`super::index::parse`]. What this module does not do: open
//! model directories, choose between formats, or read tensor data.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::TensorInfo;
use super::pickle::{self, PickleError, MAX_PICKLE_LEN};
use super::zip::{self, Archive, Member, ZipError};

/// A single-file PyTorch checkpoint's name in a model directory.
pub const SINGLE_FILE: &str = "pytorch_model.bin";

/// The index of a sharded PyTorch checkpoint (parse it with [`super::index::parse`]).
pub const INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// The archive format versions `torch.load` reads (`caffe2/serialize/versions.h`).
pub const VERSIONS: std::ops::RangeInclusive<u64> = 1..=10;

/// Largest `version` / `byteorder` record read.
const MAX_SMALL_RECORD: u64 = 64;

/// Everything that can be wrong with a PyTorch checkpoint file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TorchError {
    /// A read failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The checkpoint file.
        path: PathBuf,
        /// What was being read.
        what: &'static str,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Saved in the legacy (pre-1.6, non-zip) format.
    #[error("{}: saved in PyTorch's legacy format (torch.save(..., _use_new_zipfile_serialization=False), the default before PyTorch 1.6), which is not supported; re-save it with a current torch.save or convert it to safetensors", path.display())]
    LegacyFormat {
        /// The checkpoint file.
        path: PathBuf,
    },
    /// Neither a zip archive nor the legacy format.
    #[error("{}: not a PyTorch checkpoint (it does not start like a ZIP archive: first bytes {magic:02x?})", path.display())]
    NotAZip {
        /// The checkpoint file.
        path: PathBuf,
        /// Its first bytes (up to four).
        magic: Vec<u8>,
    },
    /// The archive's structure is broken.
    #[error("{}: {source}", path.display())]
    Zip {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ZipError,
    },
    /// The state dict pickle is refused.
    #[error("{}: {member}: {source}", path.display())]
    Pickle {
        /// The checkpoint file.
        path: PathBuf,
        /// The pickle member (`<archive>/data.pkl`).
        member: String,
        /// Why it is refused.
        #[source]
        source: Box<PickleError>,
    },
    /// No `<archive>/data.pkl`.
    #[error("{}: the archive has no data.pkl, so it is not a torch.save checkpoint", path.display())]
    NoDataPkl {
        /// The checkpoint file.
        path: PathBuf,
    },
    /// The first member is not inside a directory, so the archive has none.
    #[error("{}: member '{member}' is not inside a directory; torch.save puts every record under '<archive>/'", path.display())]
    NoArchiveDirectory {
        /// The checkpoint file.
        path: PathBuf,
        /// The first member.
        member: String,
    },
    /// Members in more than one top-level directory (`torch.load` refuses this too).
    #[error("{}: member '{member}' is outside the archive's directory '{archive}/'", path.display())]
    MemberOutsideArchive {
        /// The checkpoint file.
        path: PathBuf,
        /// The member outside it.
        member: String,
        /// The archive's directory (every member's first path component).
        archive: String,
    },
    /// No `version` record (`torch.load` refuses this too).
    #[error("{}: the archive has no version record ('{archive}/version' or '{archive}/.data/version')", path.display())]
    NoVersion {
        /// The checkpoint file.
        path: PathBuf,
        /// The archive's directory (every member's first path component).
        archive: String,
    },
    /// A `version` record torch cannot read.
    #[error("{}: archive format version '{found}' is not one torch.load reads (1 to 10)", path.display())]
    UnsupportedVersion {
        /// The checkpoint file.
        path: PathBuf,
        /// What the `version` record says.
        found: String,
    },
    /// Tensors saved big-endian.
    #[error("{}: the tensors were saved big-endian (byteorder 'big'); only little-endian checkpoints are read: load and re-save it on a little-endian machine, or convert it to safetensors", path.display())]
    BigEndian {
        /// The checkpoint file.
        path: PathBuf,
    },
    /// A `byteorder` record that is neither `little` nor `big`.
    #[error("{}: the byteorder record says '{found}', neither 'little' nor 'big'", path.display())]
    BadByteorder {
        /// The checkpoint file.
        path: PathBuf,
        /// What the `byteorder` record says.
        found: String,
    },
    /// `data.pkl`, `version` or `byteorder` is compressed.
    #[error("{}: record '{member}' is compressed (ZIP method {method}); torch.save stores records uncompressed", path.display())]
    CompressedRecord {
        /// The checkpoint file.
        path: PathBuf,
        /// The archive member.
        member: String,
        /// Its ZIP compression method.
        method: u16,
    },
    /// A tensor storage is compressed.
    #[error("{}: tensor storage '{member}' is compressed (ZIP method {method}); torch.save stores storages uncompressed and mergestream streams them from disk as they are: re-save the checkpoint with torch.save (or convert it to safetensors)", path.display())]
    CompressedStorage {
        /// The checkpoint file.
        path: PathBuf,
        /// The archive member.
        member: String,
        /// Its ZIP compression method.
        method: u16,
    },
    /// `data.pkl` is larger than [`MAX_PICKLE_LEN`].
    #[error("{}: {member} is {len} bytes; the limit is {max}", path.display())]
    PickleTooLarge {
        /// The checkpoint file.
        path: PathBuf,
        /// The archive member.
        member: String,
        /// Its length in bytes.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A tensor's storage member is missing.
    #[error("{}: tensor '{tensor}': its storage member '{member}' is not in the archive", path.display())]
    StorageMissing {
        /// The checkpoint file.
        path: PathBuf,
        /// A tensor that uses it.
        tensor: String,
        /// The member it would be.
        member: String,
    },
    /// A storage member's size differs from what the pickle declares.
    #[error("{}: storage member '{member}' is {actual} bytes; data.pkl declares {expected}", path.display())]
    StorageSizeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The archive member.
        member: String,
        /// What `data.pkl` declares.
        expected: u64,
        /// The member's size.
        actual: u64,
    },
}

impl TorchError {
    /// The tensor the error is about, where there is one.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            TorchError::StorageMissing { tensor, .. } if !tensor.is_empty() => Some(tensor),
            TorchError::Pickle { source, .. } => source.tensor(),
            _ => None,
        }
    }
}

/// A validated checkpoint file.
#[derive(Debug, Clone)]
pub struct TorchShard {
    /// Every tensor, in the order the state dict lists them. Tensors may share bytes (tied
    /// weights, views of one storage).
    pub tensors: Vec<TorchTensor>,
    /// The archive's top-level directory (`archive`, or the file's stem).
    pub archive: String,
    /// The `version` record.
    pub version: u64,
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorchTensor {
    /// Name, dtype, shape, and `[start, end)`: the absolute byte range of its data in the file
    /// (C order, little-endian, `end - start` = numel × dtype size).
    pub info: TensorInfo,
    /// The archive member holding it; tensors with the same one share storage.
    pub member: String,
}

/// Reads and validates the checkpoint `file` (whose length is `file_len`), naming `path` in
/// errors. Reads only metadata: the directory, `data.pkl`, `version` and `byteorder`.
pub fn read(path: &Path, file: &File, file_len: u64) -> Result<TorchShard, TorchError> {
    read_with(path, file_len, |buf, at| file.read_exact_at(buf, at))
}

/// [`read`] from memory, through the same code; for callers (and fuzzing) that have the bytes.
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<TorchShard, TorchError> {
    read_with(path, bytes.len() as u64, zip::slice_reader(bytes))
}

/// [`read`] over any source: `read_at(buf, offset)` fills `buf` from `offset`.
pub fn read_with(
    path: &Path,
    file_len: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> Result<TorchShard, TorchError> {
    let mut magic = vec![0u8; file_len.min(4) as usize];
    read_at(&mut magic, 0).map_err(|source| TorchError::Io {
        path: path.into(),
        what: "reading the first bytes",
        source,
    })?;
    if magic != b"PK\x03\x04" {
        return Err(if is_legacy(file_len, &mut read_at) {
            TorchError::LegacyFormat { path: path.into() }
        } else {
            TorchError::NotAZip {
                path: path.into(),
                magic,
            }
        });
    }
    let zip_err = |source| TorchError::Zip {
        path: path.into(),
        source,
    };
    let archive = Archive::read_with(file_len, &mut read_at).map_err(zip_err)?;

    // torch.load takes the archive's directory from the first member and requires every
    // member to be inside it.
    let first = archive
        .members
        .first()
        .ok_or_else(|| TorchError::NoDataPkl { path: path.into() })?;
    let prefix = match first.name.split_once('/') {
        Some((dir, _)) => dir.to_owned(),
        None => {
            return Err(TorchError::NoArchiveDirectory {
                path: path.into(),
                member: first.name.clone(),
            })
        }
    };
    for m in &archive.members {
        if !m.name.starts_with(&prefix) || m.name.as_bytes().get(prefix.len()) != Some(&b'/') {
            return Err(TorchError::MemberOutsideArchive {
                path: path.into(),
                member: m.name.clone(),
                archive: prefix,
            });
        }
    }
    let record = |name: &str| archive.get(&format!("{prefix}/{name}"));
    let read_record =
        |m: &Member, max: u64, read_at: &mut dyn FnMut(&mut [u8], u64) -> io::Result<()>| {
            if !m.is_stored() {
                return Err(TorchError::CompressedRecord {
                    path: path.into(),
                    member: m.name.clone(),
                    method: m.method,
                });
            }
            archive.read_member(m, max, read_at).map_err(zip_err)
        };

    let version_member = record(".data/version")
        .or_else(|| record("version"))
        .ok_or_else(|| TorchError::NoVersion {
            path: path.into(),
            archive: prefix.clone(),
        })?;
    let text = read_record(version_member, MAX_SMALL_RECORD, &mut read_at)?;
    let text = String::from_utf8_lossy(&text);
    let version = text
        .trim_end_matches('\n')
        .parse::<u64>()
        .ok()
        .filter(|v| VERSIONS.contains(v))
        .ok_or_else(|| TorchError::UnsupportedVersion {
            path: path.into(),
            found: text.trim_end().to_owned(),
        })?;

    if let Some(m) = record("byteorder") {
        let order = read_record(m, MAX_SMALL_RECORD, &mut read_at)?;
        match &order[..] {
            b"little" => {}
            b"big" => return Err(TorchError::BigEndian { path: path.into() }),
            other => {
                return Err(TorchError::BadByteorder {
                    path: path.into(),
                    found: String::from_utf8_lossy(other).into_owned(),
                })
            }
        }
    }

    let pkl = record("data.pkl").ok_or_else(|| TorchError::NoDataPkl { path: path.into() })?;
    if pkl.len > MAX_PICKLE_LEN {
        return Err(TorchError::PickleTooLarge {
            path: path.into(),
            member: pkl.name.clone(),
            len: pkl.len,
            max: MAX_PICKLE_LEN,
        });
    }
    let bytes = read_record(pkl, MAX_PICKLE_LEN, &mut read_at)?;
    let state = pickle::parse(&bytes).map_err(|source| TorchError::Pickle {
        path: path.into(),
        member: pkl.name.clone(),
        source: Box::new(source),
    })?;
    drop(bytes);

    // Every storage a tensor uses: a stored member of exactly the declared size.
    let mut members = std::collections::HashMap::new();
    for s in &state.storages {
        let name = format!("{prefix}/data/{}", s.key);
        let Some(m) = archive.get(&name) else {
            let tensor = state
                .tensors
                .iter()
                .find(|t| t.storage == s.key)
                .map_or_else(String::new, |t| t.name.clone());
            return Err(TorchError::StorageMissing {
                path: path.into(),
                tensor,
                member: name,
            });
        };
        if !m.is_stored() {
            return Err(TorchError::CompressedStorage {
                path: path.into(),
                member: name,
                method: m.method,
            });
        }
        if m.len != s.nbytes {
            return Err(TorchError::StorageSizeMismatch {
                path: path.into(),
                member: name,
                expected: s.nbytes,
                actual: m.len,
            });
        }
        members.insert(s.key.as_str(), m);
    }

    let tensors = state
        .tensors
        .iter()
        .map(|t| {
            let m = members
                .get(t.storage.as_str())
                .expect("every storage a tensor uses was checked above");
            // In bounds: the pickle checked `t.end` ≤ the storage's size, which is `m.len`.
            TorchTensor {
                info: TensorInfo {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    start: m.data_start + t.start,
                    end: m.data_start + t.end,
                },
                member: m.name.clone(),
            }
        })
        .collect();
    Ok(TorchShard {
        tensors,
        archive: prefix,
        version,
    })
}

/// The legacy format starts with a pickled magic number: protocol 2, `LONG1` of
/// `0x1950a86a20f9469cfc6c` (`torch.serialization.MAGIC_NUMBER`). Older still, a tar archive.
fn is_legacy(file_len: u64, read_at: &mut impl FnMut(&mut [u8], u64) -> io::Result<()>) -> bool {
    const MAGIC: [u8; 14] = [
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
    ];
    let mut head = [0u8; 14];
    if file_len >= 14 && read_at(&mut head, 0).is_ok() && head == MAGIC {
        return true;
    }
    let mut ustar = [0u8; 5];
    file_len >= 262 && read_at(&mut ustar, 257).is_ok() && &ustar == b"ustar"
}
