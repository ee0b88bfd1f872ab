//! The base (reference) model of XOR packing: opening it, its identity, and reading the bytes
//! of its tensors.
//!
//! A base is a model (directory or single file, plain or itself packed without a base), opened
//! and validated by [`Model::open`] and read through [`crate::model::Shard::read_at`], so a
//! packed base is read by decoding its blocks. Its identity is the blake3 of its *weights manifest*: one b3sum line
//! (`<blake3 hex>  <shard file name>\n`) per safetensors shard, sorted by name. The shard hashes
//! come from the `checksums.b3` beside the shards when it lists them (every mergestream output
//! and unpacked or packed directory has one, so checking a base costs nothing), and from hashing
//! the shard files otherwise (a packed shard: the bytes it restores to). A packed base therefore
//! has the identity of its unpacked form. Files other than shards do not count: a base whose README changed is the
//! same base. The identity says *which* base; whether its bytes are still the ones packed
//! against is caught by each block's checksum, which covers the original bytes after the XOR.
//!
//! This module does not decide which tensors are XORed (all of a packed shard's are) and reads
//! nothing but tensor bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::PackedError;
use crate::error::{Error, Result};
use crate::format::TensorInfo;
use crate::manifest;
use crate::model::{Model, ReadCache, Shard, ShardKind};
use crate::plan::MANIFEST_FILE;

/// An opened base model and its identity.
#[derive(Debug)]
pub struct Base {
    /// The model.
    pub model: Model,
    /// blake3 of the weights manifest.
    pub id: [u8; 32],
}

/// Where the base holds one tensor of a packed shard.
#[derive(Debug, Clone, Copy)]
pub struct BaseLoc {
    /// Index into the base model's shards.
    pub shard: usize,
    /// Offset of the tensor's first byte in that shard's data space.
    pub offset: u64,
}

impl Base {
    /// Opens the model at `path` and computes its identity.
    pub fn open(path: &Path) -> Result<Base> {
        let model = Model::open(path)?;
        if !model.missing_bases().is_empty() {
            return Err(PackedError::NestedBase {
                base: path.to_path_buf(),
            }
            .into());
        }
        let listed = listed_hashes(&model)?;
        let mut lines: Vec<(String, blake3::Hash)> = Vec::new();
        for shard in &model.shards {
            let hash = match listed.get(&shard.name) {
                Some(h) => *h,
                None => hash_shard(shard)?,
            };
            lines.push((shard.name.clone(), hash));
        }
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        let text: String = lines
            .iter()
            .map(|(n, h)| format!("{}  {n}\n", h.to_hex()))
            .collect();
        Ok(Base {
            model,
            id: *blake3::hash(text.as_bytes()).as_bytes(),
        })
    }

    /// The identity as hex, as messages show it.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// The base model's path, as named.
    pub fn path(&self) -> &Path {
        &self.model.path
    }

    /// Where the base holds each of `tensors` (of the packed shard at `path`); every tensor must
    /// be in the base with the same dtype and shape.
    pub fn locate(&self, path: &Path, tensors: &[TensorInfo]) -> Result<Vec<BaseLoc>> {
        tensors
            .iter()
            .map(|t| {
                let Some((loc, b)) = self.model.get(&t.name) else {
                    return Err(PackedError::BaseTensorMissing {
                        path: path.to_path_buf(),
                        base: self.model.path.clone(),
                        tensor: t.name.clone(),
                    }
                    .into());
                };
                if b.dtype != t.dtype || b.shape != t.shape {
                    return Err(PackedError::BaseTensorMismatch {
                        path: path.to_path_buf(),
                        base: self.model.path.clone(),
                        tensor: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        base_dtype: b.dtype,
                        base_shape: b.shape.clone(),
                    }
                    .into());
                }
                Ok(BaseLoc {
                    shard: loc.shard,
                    offset: b.start,
                })
            })
            .collect()
    }

    /// Reads `buf.len()` bytes of a tensor at `loc`, from `tensor_offset` bytes into it
    /// (decoded through `cache` when the base is packed).
    pub fn read(
        &self,
        loc: BaseLoc,
        tensor_offset: u64,
        buf: &mut [u8],
        cache: &mut ReadCache,
    ) -> Result<()> {
        self.model.shards[loc.shard].read_at(loc.offset + tensor_offset, buf, cache)
    }

    /// Errs with [`PackedError::WrongBase`] unless this base is the one recorded as `expected`
    /// in the packed shard at `path`.
    pub fn check_id(&self, path: &Path, expected: &[u8; 32]) -> Result<()> {
        if &self.id != expected {
            return Err(PackedError::WrongBase {
                path: path.to_path_buf(),
                base: self.model.path.clone(),
                expected: hex(expected),
                found: self.id_hex(),
            }
            .into());
        }
        Ok(())
    }
}

/// Shard hashes listed in the `checksums.b3` beside a directory model's shards (none for a
/// single-file model, or a directory without a manifest).
fn listed_hashes(model: &Model) -> Result<HashMap<String, blake3::Hash>> {
    if !model.path.is_dir() {
        return Ok(HashMap::new());
    }
    let path: PathBuf = model.dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(Error::io(&path, "reading", e)),
    };
    let (entries, lines) = manifest::parse(&text);
    if !lines.is_empty() {
        return Err(PackedError::Manifest { path, lines }.into());
    }
    Ok(entries.into_iter().map(|e| (e.name, e.hash)).collect())
}

/// blake3 of the safetensors file a shard is (for a packed shard: the file it restores to).
fn hash_shard(shard: &Shard) -> Result<blake3::Hash> {
    match shard.kind() {
        ShardKind::Packed(p) => {
            let mut hasher = HashSink(blake3::Hasher::new());
            p.unpack_into(&mut hasher, 1)?;
            Ok(hasher.0.finalize())
        }
        _ => manifest::hash_file(&shard.path),
    }
}

/// A [`super::ByteSink`] that only hashes.
struct HashSink(blake3::Hasher);

impl super::ByteSink for HashSink {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.update(bytes);
        Ok(())
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
