//! One block, packed and unpacked: the per-thread state that turns a block's original bytes
//! into stored bytes (XOR with the base, byte grouping, zstd or raw, checksum) and back.
//!
//! Both directions work on whole blocks of the original data section and need only the shard's
//! tensor list and, for XOR packing, the base; [`Ctx`] carries those. This module does no file
//! I/O of the packed shard itself: callers hand it the bytes.

use std::path::PathBuf;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::base::{Base, BaseLoc};
use super::error::{FrameProblem, PackedError};
use super::layout::{Codec, Entry};
use super::transform::{self, Segment};
use crate::error::Result;
use crate::format::TensorInfo;
use crate::model::ReadCache;

/// zstd levels at which the match table is shrunk (zstd's "fast" strategy).
pub const FAST_LEVELS: i32 = 2;

/// What a block's transforms need to know about its shard.
#[derive(Debug)]
pub struct Ctx {
    /// The packed file (named in errors).
    pub path: PathBuf,
    pub tensors: Vec<TensorInfo>,
    /// The base and where it holds each of `tensors`, for XOR packing.
    pub base: Option<(Arc<Base>, Vec<BaseLoc>)>,
    pub block_size: u32,
    pub data_len: u64,
}

impl Ctx {
    pub fn block_start(&self, k: u64) -> u64 {
        k * u64::from(self.block_size)
    }

    pub fn raw_len(&self, k: u64) -> usize {
        (self.data_len - self.block_start(k)).min(u64::from(self.block_size)) as usize
    }

    /// The name of the first tensor in block `k`, for messages.
    pub fn first_tensor(&self, k: u64) -> Option<String> {
        let start = self.block_start(k);
        let i = self.tensors.partition_point(|t| t.end <= start);
        self.tensors.get(i).map(|t| t.name.clone())
    }

    fn base_bytes(&self, seg: &Segment, buf: &mut Vec<u8>, cache: &mut ReadCache) -> Result<()> {
        buf.resize(seg.len, 0);
        if let Some((base, locs)) = &self.base {
            base.read(locs[seg.tensor], seg.tensor_offset, buf, cache)?;
        }
        Ok(())
    }
}

/// A block packed: where its stored bytes are, and how to describe it in the index.
#[derive(Debug, Clone, Copy)]
pub struct Packed {
    pub codec: Codec,
    pub checksum: u64,
}

/// Per-thread packing state: a zstd context and scratch buffers, reused block after block.
pub struct Encoder {
    zstd: zstd::bulk::Compressor<'static>,
    segs: Vec<Segment>,
    grouped: Vec<u8>,
    base: Vec<u8>,
    /// For reading a packed base.
    base_cache: ReadCache,
}

impl Encoder {
    pub fn new(level: i32) -> Result<Encoder> {
        let bad = |_| PackedError::BadParameter {
            what: "zstd level",
            value: i64::from(level),
            allowed: "1..=22",
        };
        let mut zstd = zstd::bulk::Compressor::new(level).map_err(bad)?;
        if level <= FAST_LEVELS {
            // Byte-grouped weights are nearly free of LZ matches: what zstd gains on them is
            // its Huffman coding of literals, and the matches its fast strategy finds cost more
            // than they save. A 64-entry match table makes it code (almost) only literals:
            // smaller and faster (measurements in docs/packed-format.md).
            zstd.set_parameter(zstd::stream::raw::CParameter::HashLog(6))
                .map_err(bad)?;
        }
        Ok(Encoder {
            zstd,
            segs: Vec::new(),
            grouped: Vec::new(),
            base: Vec::new(),
            base_cache: ReadCache::new(1),
        })
    }

    /// Packs block `k` (`raw`, its original bytes) into `stored`.
    pub fn encode(
        &mut self,
        ctx: &Ctx,
        k: u64,
        raw: &[u8],
        stored: &mut Vec<u8>,
    ) -> Result<Packed> {
        debug_assert_eq!(raw.len(), ctx.raw_len(k));
        let checksum = xxh3_64(raw);
        transform::segments(&ctx.tensors, ctx.block_start(k), raw.len(), &mut self.segs);
        self.grouped.resize(raw.len(), 0);
        for seg in &self.segs {
            let src = &raw[seg.at..seg.at + seg.len];
            let dst = &mut self.grouped[seg.at..seg.at + seg.len];
            if ctx.base.is_some() {
                ctx.base_bytes(seg, &mut self.base, &mut self.base_cache)?;
                transform::xor_into(&mut self.base, src);
                transform::group(&self.base, dst, seg.group, seg.phase());
            } else {
                transform::group(src, dst, seg.group, seg.phase());
            }
        }
        stored.clear();
        stored.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let compressed = self.zstd.compress_to_buffer(&self.grouped, stored);
        let codec = match compressed {
            Ok(n) if n < raw.len() => Codec::Zstd,
            // Did not shrink (or zstd refused): store the transformed bytes as they are.
            _ => {
                stored.clear();
                stored.extend_from_slice(&self.grouped);
                Codec::Raw
            }
        };
        Ok(Packed { codec, checksum })
    }
}

/// Per-thread unpacking state: a zstd context and scratch buffers.
pub struct Decoder {
    zstd: zstd::bulk::Decompressor<'static>,
    segs: Vec<Segment>,
    grouped: Vec<u8>,
    base: Vec<u8>,
    /// For reading a packed base.
    base_cache: ReadCache,
}

impl Decoder {
    pub fn new() -> Result<Decoder> {
        let zstd = zstd::bulk::Decompressor::new()
            .map_err(|e| crate::error::Error::io("zstd", "creating a decompression context", e))?;
        Ok(Decoder {
            zstd,
            segs: Vec::new(),
            grouped: Vec::new(),
            base: Vec::new(),
            base_cache: ReadCache::new(1),
        })
    }

    /// Unpacks block `k` from its `stored` bytes into `out` (its original length) and checks it
    /// against `entry`'s checksum.
    pub fn decode(
        &mut self,
        ctx: &Ctx,
        k: u64,
        entry: &Entry,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<()> {
        debug_assert_eq!(out.len(), ctx.raw_len(k));
        self.grouped.resize(out.len(), 0);
        match entry.codec {
            Codec::Raw => self.grouped.copy_from_slice(stored),
            Codec::Zstd => {
                // A frame must be exactly the stored bytes: one that runs past them is
                // truncated, one that stops short has garbage after it.
                match zstd::zstd_safe::find_frame_compressed_size(stored) {
                    Ok(n) if n == stored.len() => {}
                    Ok(n) => {
                        return Err(PackedError::CorruptFrame {
                            path: ctx.path.clone(),
                            block: k,
                            tensor: ctx.first_tensor(k),
                            problem: FrameProblem::Length {
                                frame: n as u64,
                                stored: stored.len() as u64,
                            },
                        }
                        .into())
                    }
                    Err(_) => {
                        return Err(PackedError::TruncatedFrame {
                            path: ctx.path.clone(),
                            block: k,
                            tensor: ctx.first_tensor(k),
                            stored: entry.stored_len,
                        }
                        .into())
                    }
                }
                let n = self
                    .zstd
                    .decompress_to_buffer(stored, &mut self.grouped[..])
                    .map_err(|e| PackedError::CorruptFrame {
                        path: ctx.path.clone(),
                        block: k,
                        tensor: ctx.first_tensor(k),
                        problem: FrameProblem::Zstd {
                            message: e.to_string(),
                        },
                    })?;
                if n != out.len() {
                    return Err(PackedError::CorruptFrame {
                        path: ctx.path.clone(),
                        block: k,
                        tensor: ctx.first_tensor(k),
                        problem: FrameProblem::DecodedLength {
                            decoded: n as u64,
                            expected: out.len() as u64,
                        },
                    }
                    .into());
                }
            }
        }
        transform::segments(&ctx.tensors, ctx.block_start(k), out.len(), &mut self.segs);
        for seg in &self.segs {
            let dst = &mut out[seg.at..seg.at + seg.len];
            transform::ungroup(
                &self.grouped[seg.at..seg.at + seg.len],
                dst,
                seg.group,
                seg.phase(),
            );
            if ctx.base.is_some() {
                ctx.base_bytes(seg, &mut self.base, &mut self.base_cache)?;
                transform::xor_into(dst, &self.base);
            }
        }
        let actual = xxh3_64(out);
        if actual != entry.checksum {
            // Which tensor's bytes are wrong cannot be told without the original: name the
            // block's first tensor.
            return Err(PackedError::BlockChecksum {
                path: ctx.path.clone(),
                block: k,
                tensor: ctx.first_tensor(k),
                expected: entry.checksum,
                actual,
                with_base: ctx.base.is_some(),
            }
            .into());
        }
        Ok(())
    }
}
