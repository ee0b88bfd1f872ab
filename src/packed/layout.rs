//! The fixed parts of a packed shard: preamble, block index entries and trailer — their byte
//! layout, encoding, and every structural check a reader makes before touching a block.
//!
//! `docs/packed-format.md` is the specification; this module is its one implementation. It does
//! no I/O and knows nothing of zstd, byte grouping or base models: it turns bytes into validated
//! values and back.

use std::path::Path;

use xxhash_rust::xxh3::xxh3_64;

use super::error::{IndexProblem, PackedError, PreambleProblem, TrailerProblem};
use super::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

/// The first 8 bytes of every packed shard.
pub const MAGIC: [u8; 8] = *b"\x89MSZST\r\n";
/// The last 8 bytes of every packed shard.
pub const END_MAGIC: [u8; 8] = *b"MSZSTEND";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Length of the preamble, before the verbatim safetensors prefix.
pub const PREAMBLE_LEN: usize = 80;
/// Length of one block index entry.
pub const ENTRY_LEN: usize = 24;
/// Length of the trailer.
pub const TRAILER_LEN: usize = 32;
/// Preamble flag: every tensor is stored XORed with the same tensor of a base model.
pub const FLAG_BASE: u32 = 1;

/// How a block's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The transformed bytes as they are (compression did not shrink them).
    Raw = 0,
    /// One zstd frame of the transformed bytes.
    Zstd = 1,
}

/// The preamble's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    pub flags: u32,
    pub block_size: u32,
    /// Length of the verbatim safetensors prefix (`8 + N`).
    pub prefix_len: u64,
    /// Length of the original data section.
    pub data_len: u64,
    /// blake3 identity of the base model, zero without one.
    pub base_id: [u8; 32],
}

impl Preamble {
    pub fn has_base(&self) -> bool {
        self.flags & FLAG_BASE != 0
    }

    /// Blocks the data section is cut into.
    pub fn block_count(&self) -> u64 {
        self.data_len.div_ceil(u64::from(self.block_size))
    }

    /// Original bytes of block `k`.
    pub fn raw_len(&self, k: u64) -> u64 {
        let bs = u64::from(self.block_size);
        (self.data_len - k * bs).min(bs)
    }

    /// File offset of the first block.
    pub fn frames_start(&self) -> u64 {
        PREAMBLE_LEN as u64 + self.prefix_len
    }

    /// The preamble bytes (without the checksum, which covers the prefix too).
    fn fields(&self) -> [u8; 72] {
        let mut b = [0u8; 72];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        // 20..24 reserved, zero.
        b[24..32].copy_from_slice(&self.prefix_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_len.to_le_bytes());
        b[40..72].copy_from_slice(&self.base_id);
        b
    }

    /// The preamble followed by the safetensors prefix, as the file starts.
    pub fn encode(&self, prefix: &[u8]) -> Vec<u8> {
        let fields = self.fields();
        let sum = header_checksum(&fields, prefix);
        let mut out = Vec::with_capacity(PREAMBLE_LEN + prefix.len());
        out.extend_from_slice(&fields);
        out.extend_from_slice(&sum.to_le_bytes());
        out.extend_from_slice(prefix);
        out
    }

    /// Parses and checks the fixed preamble `bytes` (its checksum is checked later, with the
    /// prefix, by [`check_header_checksum`]).
    pub fn parse(path: &Path, bytes: &[u8; PREAMBLE_LEN]) -> Result<(Preamble, u64), PackedError> {
        let corrupt = |problem| PackedError::CorruptPreamble {
            path: path.to_path_buf(),
            problem,
        };
        if bytes[0..8] != MAGIC {
            return Err(PackedError::NotPacked {
                path: path.to_path_buf(),
            });
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(PackedError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: VERSION,
            });
        }
        let flags = u32_at(bytes, 12);
        if flags & !FLAG_BASE != 0 {
            return Err(corrupt(PreambleProblem::UnknownFlags(flags)));
        }
        let block_size = u32_at(bytes, 16);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(corrupt(PreambleProblem::BlockSize(block_size)));
        }
        if u32_at(bytes, 20) != 0 {
            return Err(corrupt(PreambleProblem::Reserved));
        }
        let mut base_id = [0u8; 32];
        base_id.copy_from_slice(&bytes[40..72]);
        if flags & FLAG_BASE == 0 && base_id != [0; 32] {
            return Err(corrupt(PreambleProblem::StrayBaseId));
        }
        let preamble = Preamble {
            flags,
            block_size,
            prefix_len: u64_at(bytes, 24),
            data_len: u64_at(bytes, 32),
            base_id,
        };
        Ok((preamble, u64_at(bytes, 72)))
    }
}

/// xxh3-64 of the preamble fields followed by the safetensors prefix.
fn header_checksum(fields: &[u8; 72], prefix: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(fields);
    h.update(prefix);
    h.digest()
}

/// Checks the recorded header checksum against the preamble and prefix read.
pub fn check_header_checksum(
    path: &Path,
    preamble: &Preamble,
    recorded: u64,
    prefix: &[u8],
) -> Result<(), PackedError> {
    let actual = header_checksum(&preamble.fields(), prefix);
    if actual != recorded {
        return Err(PackedError::HeaderChecksum {
            path: path.to_path_buf(),
            expected: recorded,
            actual,
        });
    }
    Ok(())
}

/// One block's entry in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// File offset of the stored bytes.
    pub offset: u64,
    pub stored_len: u32,
    pub codec: Codec,
    /// xxh3-64 of the block's original bytes.
    pub checksum: u64,
}

impl Entry {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&[self.codec as u8, 0, 0, 0]);
        out.extend_from_slice(&self.checksum.to_le_bytes());
    }
}

/// The trailer's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub index_offset: u64,
    pub block_count: u64,
    pub index_checksum: u64,
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(&self.index_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.block_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.index_checksum.to_le_bytes());
        b[24..32].copy_from_slice(&END_MAGIC);
        b
    }

    /// Parses the trailer of a file of `file_len` bytes and checks that the index it points
    /// to fills the space between the blocks and the trailer exactly.
    pub fn parse(
        path: &Path,
        bytes: &[u8; TRAILER_LEN],
        preamble: &Preamble,
        file_len: u64,
    ) -> Result<Trailer, PackedError> {
        if bytes[24..32] != END_MAGIC {
            return Err(PackedError::CorruptTrailer {
                path: path.to_path_buf(),
                problem: TrailerProblem::Magic,
            });
        }
        let t = Trailer {
            index_offset: u64_at(bytes, 0),
            block_count: u64_at(bytes, 8),
            index_checksum: u64_at(bytes, 16),
        };
        let needed = preamble.block_count();
        if t.block_count != needed {
            return Err(PackedError::CorruptIndex {
                path: path.to_path_buf(),
                block: None,
                problem: IndexProblem::BlockCount {
                    recorded: t.block_count,
                    needed,
                },
            });
        }
        // The index must sit right before the trailer and after the blocks' start; this bounds
        // the index by the file's length before anything is allocated for it.
        let index_len = t.block_count.checked_mul(ENTRY_LEN as u64);
        let fits = index_len
            .and_then(|l| t.index_offset.checked_add(l))
            .and_then(|end| end.checked_add(TRAILER_LEN as u64))
            == Some(file_len)
            && t.index_offset >= preamble.frames_start();
        if !fits {
            return Err(PackedError::CorruptTrailer {
                path: path.to_path_buf(),
                problem: TrailerProblem::IndexPlacement {
                    index_offset: t.index_offset,
                    file_len,
                },
            });
        }
        Ok(t)
    }
}

/// Parses and validates the index bytes: checksum, then every entry — blocks must tile the
/// space from the first block to the index, in order, each with a stored length its codec
/// allows (raw: exactly the block's length; zstd: at least one byte and fewer than raw).
pub fn parse_index(
    path: &Path,
    bytes: &[u8],
    preamble: &Preamble,
    trailer: &Trailer,
) -> Result<Vec<Entry>, PackedError> {
    let corrupt = |block, problem| PackedError::CorruptIndex {
        path: path.to_path_buf(),
        block,
        problem,
    };
    let actual = xxh3_64(bytes);
    if actual != trailer.index_checksum {
        return Err(corrupt(
            None,
            IndexProblem::Checksum {
                expected: trailer.index_checksum,
                actual,
            },
        ));
    }
    let mut entries = Vec::with_capacity(bytes.len() / ENTRY_LEN);
    let mut at = preamble.frames_start();
    for (k, e) in bytes.chunks_exact(ENTRY_LEN).enumerate() {
        let k = k as u64;
        let offset = u64_at(e, 0);
        let stored_len = u32_at(e, 8);
        let codec = match e[12] {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            c => return Err(corrupt(Some(k), IndexProblem::Codec(c))),
        };
        if e[13..16] != [0, 0, 0] {
            return Err(corrupt(Some(k), IndexProblem::Reserved));
        }
        if offset != at {
            return Err(corrupt(
                Some(k),
                IndexProblem::Offset {
                    offset,
                    expected: at,
                },
            ));
        }
        let raw = preamble.raw_len(k);
        let ok = match codec {
            Codec::Raw => u64::from(stored_len) == raw,
            Codec::Zstd => stored_len > 0 && u64::from(stored_len) < raw,
        };
        if !ok {
            return Err(corrupt(
                Some(k),
                IndexProblem::StoredLength {
                    stored: stored_len,
                    raw,
                },
            ));
        }
        at += u64::from(stored_len);
        entries.push(Entry {
            offset,
            stored_len,
            codec,
            checksum: u64_at(e, 16),
        });
    }
    if at != trailer.index_offset {
        return Err(corrupt(
            None,
            IndexProblem::End {
                end: at,
                index_offset: trailer.index_offset,
            },
        ));
    }
    Ok(entries)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preamble() -> Preamble {
        Preamble {
            flags: 0,
            block_size: 1 << 20,
            prefix_len: 16,
            data_len: (1 << 20) + 5,
            base_id: [0; 32],
        }
    }

    #[test]
    fn preamble_round_trips_at_documented_offsets() {
        let p = preamble();
        let bytes = p.encode(&[7u8; 16]);
        assert_eq!(bytes.len(), PREAMBLE_LEN + 16);
        // Offsets as docs/packed-format.md gives them.
        assert_eq!(&bytes[0..8], b"\x89MSZST\r\n");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(bytes[16..20], (1u32 << 20).to_le_bytes());
        assert_eq!(bytes[24..32], 16u64.to_le_bytes());
        assert_eq!(bytes[32..40], ((1u64 << 20) + 5).to_le_bytes());
        let mut fixed = [0u8; PREAMBLE_LEN];
        fixed.copy_from_slice(&bytes[..PREAMBLE_LEN]);
        let (q, sum) = Preamble::parse(Path::new("p"), &fixed).unwrap();
        assert_eq!(q, p);
        assert_eq!(q.block_count(), 2);
        assert_eq!(q.raw_len(1), 5);
        check_header_checksum(Path::new("p"), &q, sum, &[7u8; 16]).unwrap();
        assert!(matches!(
            check_header_checksum(Path::new("p"), &q, sum, &[8u8; 16]),
            Err(PackedError::HeaderChecksum { .. })
        ));
    }

    #[test]
    fn preamble_rejects_bad_fields() {
        let good = preamble().encode(&[0; 16]);
        let parse = |edit: &dyn Fn(&mut [u8])| {
            let mut b = [0u8; PREAMBLE_LEN];
            b.copy_from_slice(&good[..PREAMBLE_LEN]);
            edit(&mut b);
            Preamble::parse(Path::new("p"), &b)
        };
        assert!(matches!(
            parse(&|b| b[0] = 0),
            Err(PackedError::NotPacked { .. })
        ));
        assert!(matches!(
            parse(&|b| b[8] = 2),
            Err(PackedError::UnsupportedVersion { found: 2, .. })
        ));
        assert!(matches!(
            parse(&|b| b[12] = 2),
            Err(PackedError::CorruptPreamble {
                problem: PreambleProblem::UnknownFlags(2),
                ..
            })
        ));
        assert!(matches!(
            parse(&|b| b[16..20].copy_from_slice(&3000u32.to_le_bytes())),
            Err(PackedError::CorruptPreamble {
                problem: PreambleProblem::BlockSize(3000),
                ..
            })
        ));
        assert!(matches!(
            parse(&|b| b[50] = 1),
            Err(PackedError::CorruptPreamble {
                problem: PreambleProblem::StrayBaseId,
                ..
            })
        ));
    }
}
