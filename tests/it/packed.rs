//! The packed format end to end: byte-identical round trips for every dtype (NaN payloads,
//! empty and scalar tensors, integer tensors, tensors spanning blocks and starting mid-element),
//! with and without a base, through `pack`/`unpack` and through random-access reads; and
//! malformed or mismatched inputs, each failing with its own error variant and leaving nothing
//! behind.
//!
//! Inputs are written here by a minimal safetensors writer of the test's own, and malformed
//! packed files are made by editing bytes at the offsets `docs/packed-format.md` gives, read
//! here independently of the library's parser.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mergestream::error::OverlapKind;
use mergestream::packed::{
    self, error::IndexProblem, Base, BlockCache, PackOptions, PackedError, PackedShard,
};
use mergestream::Error;

/// xorshift64*: deterministic test bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 32) as u8).collect()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One tensor: name, dtype name, shape, bytes.
type T = (String, &'static str, Vec<u64>, Vec<u8>);

const SIZES: [(&str, usize); 15] = [
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E5M2", 1),
    ("F8_E4M3", 1),
    ("I16", 2),
    ("U16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("I32", 4),
    ("U32", 4),
    ("F32", 4),
    ("F64", 8),
    ("I64", 8),
    ("U64", 8),
];

fn size_of(dtype: &str) -> usize {
    SIZES.iter().find(|(d, _)| *d == dtype).unwrap().1
}

/// A safetensors file with the tensors laid out in the order given (so a tensor can start at
/// any offset), written without the library.
fn safetensors_bytes(tensors: &[T]) -> Vec<u8> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut at = 0;
    for (name, dtype, shape, data) in tensors {
        let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
        json += &format!(
            ",\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{at},{}]}}",
            shape.join(","),
            at + data.len()
        );
        at += data.len();
    }
    json.push('}');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.3);
    }
    out
}

/// Float bit patterns that must survive: NaN payloads of both signs, infinities, zeros,
/// subnormals, extremes.
fn special_bits(dtype: &str) -> Vec<u8> {
    let v: Vec<u64> = match dtype {
        "BF16" | "F16" => vec![
            0x7FC1, 0xFFFF, 0x7F81, 0x7C01, 0xFE01, 0x7F80, 0xFF80, 0, 0x8000, 1, 0x807F,
        ],
        "F32" => vec![
            0x7FC0_0001,
            0xFFFF_FFFF,
            0x7F80_0001,
            0xFF80_0000,
            0x8000_0000,
            1,
            0x7F7F_FFFF,
        ],
        "F64" => vec![
            0x7FF0_0000_0000_0001,
            0xFFF8_0000_0000_BEEF,
            0x8000_0000_0000_0000,
            1,
        ],
        _ => vec![0, 1, u64::MAX, 0x80],
    };
    let size = size_of(dtype);
    v.iter()
        .flat_map(|x| x.to_le_bytes()[..size].to_vec())
        .collect()
}

/// Every dtype, each as a matrix of random bits (spanning small blocks), a scalar, an empty
/// tensor and a tensor of special values; odd-length byte tensors in between so that many
/// tensors start mid-element and mid-block.
fn every_dtype(rng: &mut Rng) -> Vec<T> {
    let mut tensors = Vec::new();
    for (i, (dtype, size)) in SIZES.iter().enumerate() {
        let rows = 3 + rng.below(40);
        tensors.push((
            format!("{i}.{dtype}.matrix"),
            *dtype,
            vec![rows, 7],
            rng.bytes(rows as usize * 7 * size),
        ));
        tensors.push((
            format!("{i}.{dtype}.scalar"),
            *dtype,
            vec![],
            rng.bytes(*size),
        ));
        tensors.push((format!("{i}.{dtype}.empty"), *dtype, vec![4, 0], vec![]));
        let specials = special_bits(dtype);
        tensors.push((
            format!("{i}.{dtype}.specials"),
            *dtype,
            vec![(specials.len() / size) as u64],
            specials,
        ));
        let odd = 1 + 2 * rng.below(5);
        tensors.push((format!("{i}.pad"), "U8", vec![odd], rng.bytes(odd as usize)));
    }
    // A larger smooth BF16 tensor so some blocks really compress.
    let smooth: Vec<u8> = (0..20_000u32)
        .flat_map(|i| half::bf16::from_f32(((i % 97) as f32 - 48.0) * 1e-3).to_le_bytes())
        .collect();
    tensors.push(("smooth".into(), "BF16", vec![200, 100], smooth));
    tensors
}

/// The same tensors with some elements' bits flipped: a base close to `tensors`.
fn perturbed(tensors: &[T], rng: &mut Rng) -> Vec<T> {
    tensors
        .iter()
        .map(|(n, d, s, data)| {
            let mut data = data.clone();
            for b in data.iter_mut() {
                if rng.below(4) == 0 {
                    *b ^= 1 << rng.below(8);
                }
            }
            (n.clone(), *d, s.clone(), data)
        })
        .collect()
}

fn tempdir() -> tempfile::TempDir {
    common::tempdir()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn options(block_size: u32, threads: usize) -> PackOptions {
    PackOptions {
        level: 3,
        block_size,
        threads,
    }
}

/// Packs `src` into memory.
fn pack_bytes(src: &Path, base: Option<Arc<Base>>, o: &PackOptions) -> Vec<u8> {
    let (bytes, summary) = packed::pack_shard_into(src, base, o, Vec::new()).unwrap();
    assert_eq!(summary.packed_len, bytes.len() as u64);
    assert_eq!(summary.packed_blake3, Some(blake3::hash(&bytes)));
    assert_eq!(
        summary.original_blake3,
        blake3::hash(&std::fs::read(src).unwrap())
    );
    bytes
}

fn open_bytes(bytes: Vec<u8>, base: Option<Arc<Base>>) -> mergestream::Result<PackedShard> {
    let len = bytes.len() as u64;
    PackedShard::from_source(Path::new("mem.mszst"), Box::new(bytes), len, base)
}

/// The whole original file back, through `unpack_into`.
fn unpack_bytes(shard: &PackedShard, threads: usize) -> mergestream::Result<Vec<u8>> {
    let mut out = Vec::new();
    shard.unpack_into(&mut out, threads)?;
    Ok(out)
}

/// A model directory holding `tensors` in one shard, plus a config file.
fn model_dir(dir: &Path, tensors: &[T]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    write(&dir.join("model.safetensors"), &safetensors_bytes(tensors));
    write(&dir.join("config.json"), b"{\"model_type\": \"test\"}\n");
    dir.to_path_buf()
}

#[test]
fn every_dtype_round_trips_at_every_block_size_and_thread_count() {
    let mut rng = Rng(7);
    let tensors = every_dtype(&mut rng);
    let dir = tempdir();
    let src = dir.path().join("a.safetensors");
    let original = safetensors_bytes(&tensors);
    write(&src, &original);
    for block_size in [64, 128, 1024, 1 << 20] {
        let one = pack_bytes(&src, None, &options(block_size, 1));
        for threads in [2, 3] {
            assert_eq!(
                pack_bytes(&src, None, &options(block_size, threads)),
                one,
                "bytes depend on threads"
            );
        }
        let shard = open_bytes(one, None).unwrap();
        assert_eq!(shard.header().tensors.len(), tensors.len());
        for threads in [1, 2, 4] {
            assert!(
                unpack_bytes(&shard, threads).unwrap() == original,
                "block {block_size}, {threads} threads"
            );
        }
    }
}

#[test]
fn xor_with_a_base_round_trips_and_shrinks_close_models() {
    let mut rng = Rng(11);
    let tensors = every_dtype(&mut rng);
    let base_tensors = perturbed(&tensors, &mut rng);
    let dir = tempdir();
    let src = dir.path().join("a.safetensors");
    let original = safetensors_bytes(&tensors);
    write(&src, &original);
    let base_dir = model_dir(&dir.path().join("base"), &base_tensors);
    let base = Arc::new(Base::open(&base_dir).unwrap());
    for block_size in [64, 4096] {
        let bytes = pack_bytes(&src, Some(base.clone()), &options(block_size, 2));
        let shard = open_bytes(bytes.clone(), Some(base.clone())).unwrap();
        assert_eq!(shard.base_id(), Some(base.id));
        assert!(unpack_bytes(&shard, 2).unwrap() == original);
    }

    // Close models: a BF16 tensor of noisy values, and a base differing from it in the last
    // mantissa bit of one element in twenty. The XOR packs to a fraction of the tensor.
    let values: Vec<u8> = (0..50_000)
        .flat_map(|_| {
            let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            half::bf16::from_f32(u * 0.05).to_le_bytes()
        })
        .collect();
    let mut near = values.clone();
    for e in near.chunks_exact_mut(2) {
        if rng.below(20) == 0 {
            e[0] ^= 1;
        }
    }
    let w = |data: Vec<u8>| vec![("w".to_string(), "BF16", vec![500, 100], data)];
    let src = dir.path().join("w.safetensors");
    write(&src, &safetensors_bytes(&w(values)));
    let base = Arc::new(Base::open(&model_dir(&dir.path().join("near"), &w(near))).unwrap());
    let plain = pack_bytes(&src, None, &options(4096, 1)).len();
    let xor = pack_bytes(&src, Some(base), &options(4096, 1)).len();
    assert!(xor * 4 < plain, "XOR {xor} bytes, plain {plain}");
}

#[test]
fn random_reads_match_the_original_and_sequential_reads_decode_each_block_once() {
    let mut rng = Rng(3);
    let tensors = every_dtype(&mut rng);
    let base_tensors = perturbed(&tensors, &mut rng);
    let dir = tempdir();
    let src = dir.path().join("a.safetensors");
    let original = safetensors_bytes(&tensors);
    write(&src, &original);
    let base = Arc::new(Base::open(&model_dir(&dir.path().join("base"), &base_tensors)).unwrap());
    for base in [None, Some(base)] {
        let path = dir.path().join("a.mszst");
        let (file, _) = packed::pack_shard_into(
            &src,
            base.clone(),
            &options(256, 1),
            packed::AtomicFile::create(dir.path(), &path).unwrap(),
        )
        .unwrap();
        file.persist().unwrap();
        let shard = PackedShard::open(&path, base.clone()).unwrap();
        let data = &original[shard.header().data_start() as usize..];
        assert_eq!(shard.header().data_len, data.len() as u64);

        // Random offsets and lengths, from several threads sharing the shard.
        std::thread::scope(|s| {
            for seed in 0..3u64 {
                let shard = &shard;
                s.spawn(move || {
                    let mut rng = Rng(100 + seed);
                    let mut cache = BlockCache::new(1 + seed as usize).unwrap();
                    for _ in 0..300 {
                        let off = rng.below(data.len() as u64) as usize;
                        let len = rng.below((data.len() - off) as u64 + 1).min(2000) as usize;
                        let mut buf = vec![0u8; len];
                        shard.read_at(off as u64, &mut buf, &mut cache).unwrap();
                        assert!(buf == data[off..off + len], "read of {len} at {off}");
                    }
                });
            }
        });

        // Every tensor, read whole.
        let mut cache = BlockCache::new(1).unwrap();
        for t in &shard.header().tensors {
            let mut buf = vec![0u8; t.nbytes() as usize];
            shard.read_at(t.start, &mut buf, &mut cache).unwrap();
            assert!(
                buf == data[t.start as usize..t.end as usize],
                "tensor {}",
                t.name
            );
        }

        // In-order chunks smaller than a block: each block decoded once.
        let mut cache = BlockCache::new(1).unwrap();
        let mut at = 0;
        while at < data.len() {
            let n = 100.min(data.len() - at);
            let mut buf = vec![0u8; n];
            shard.read_at(at as u64, &mut buf, &mut cache).unwrap();
            assert!(buf == data[at..at + n]);
            at += n;
        }
        assert_eq!(cache.decoded(), shard.block_count());

        let mut buf = [0u8; 2];
        let past = shard.header().data_len - 1;
        assert!(matches!(
            shard.read_at(past, &mut buf, &mut cache),
            Err(Error::Packed(e)) if matches!(*e, PackedError::OutOfRange { .. })
        ));
    }
}

// ---- malformed packed shards ----------------------------------------------------------------

/// Fields of a packed file, read here from the documented offsets.
pub(crate) struct Parsed {
    pub(crate) prefix_len: usize,
    pub(crate) index_offset: usize,
    pub(crate) blocks: usize,
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub(crate) fn parse(bytes: &[u8]) -> Parsed {
    let n = bytes.len();
    assert_eq!(&bytes[n - 8..], b"MSZSTEND");
    Parsed {
        prefix_len: le64(bytes, 24) as usize,
        index_offset: le64(bytes, n - 32) as usize,
        blocks: le64(bytes, n - 24) as usize,
    }
}

/// `(offset, stored length, codec)` of block `k`.
pub(crate) fn entry(bytes: &[u8], p: &Parsed, k: usize) -> (usize, usize, u8) {
    let e = p.index_offset + 24 * k;
    (
        le64(bytes, e) as usize,
        u32::from_le_bytes(bytes[e + 8..e + 12].try_into().unwrap()) as usize,
        bytes[e + 12],
    )
}

/// Rewrites the index checksum in the trailer after an edit of the index (xxh3-64).
pub(crate) fn reseal_index(bytes: &mut [u8], p: &Parsed) {
    let n = bytes.len();
    let sum = xxhash_rust::xxh3::xxh3_64(&bytes[p.index_offset..n - 32]);
    bytes[n - 16..n - 8].copy_from_slice(&sum.to_le_bytes());
}

/// A packed shard of one compressible BF16 tensor in several zstd blocks.
fn packed_sample() -> (tempfile::TempDir, Vec<u8>, Vec<u8>) {
    let data: Vec<u8> = (0..8192u32)
        .flat_map(|i| half::bf16::from_f32(((i % 13) as f32) * 0.25).to_le_bytes())
        .collect();
    let original = safetensors_bytes(&[("w".into(), "BF16", vec![64, 128], data)]);
    let dir = tempdir();
    let src = dir.path().join("a.safetensors");
    write(&src, &original);
    let bytes = pack_bytes(&src, None, &options(4096, 1));
    (dir, original, bytes)
}

fn decode_err(bytes: Vec<u8>) -> PackedError {
    let result = open_bytes(bytes, None).and_then(|s| unpack_bytes(&s, 1));
    match result {
        Err(Error::Packed(e)) => *e,
        other => panic!("expected a packed-format error, got {other:?}"),
    }
}

/// Cuts the last `cut` bytes of zstd block `k`'s frame, keeping everything else consistent:
/// later offsets move, the index checksum is resealed. Only block `k` is then broken.
pub(crate) fn truncate_frame(bytes: &mut Vec<u8>, k: usize, cut: usize) {
    let p = parse(bytes);
    let (off, len, codec) = entry(bytes, &p, k);
    assert_eq!(codec, 1, "block {k} is zstd");
    bytes.drain(off + len - cut..off + len);
    let p2 = Parsed {
        index_offset: p.index_offset - cut,
        ..p
    };
    let e = p2.index_offset + 24 * k;
    bytes[e + 8..e + 12].copy_from_slice(&((len - cut) as u32).to_le_bytes());
    for later in k + 1..p2.blocks {
        let at = p2.index_offset + 24 * later;
        let o = le64(bytes, at) - cut as u64;
        bytes[at..at + 8].copy_from_slice(&o.to_le_bytes());
    }
    let n = bytes.len();
    bytes[n - 32..n - 24].copy_from_slice(&(p2.index_offset as u64).to_le_bytes());
    reseal_index(bytes, &p2);
}

#[test]
fn a_truncated_frame_is_reported_as_one() {
    let (_dir, _, mut bytes) = packed_sample();
    truncate_frame(&mut bytes, 1, 5);
    assert!(matches!(
        decode_err(bytes),
        PackedError::TruncatedFrame { block: 1, .. }
    ));
}

#[test]
fn corrupt_bytes_give_their_own_errors() {
    let (_dir, original, bytes) = packed_sample();
    let p = parse(&bytes);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        decode_err(b)
    };
    // The index: one flipped bit fails its checksum.
    let e = edit(&|b| b[p.index_offset + 30] ^= 1);
    assert!(
        matches!(
            e,
            PackedError::CorruptIndex {
                problem: IndexProblem::Checksum { .. },
                ..
            }
        ),
        "{e}"
    );
    // A resealed index with an unknown codec still fails, on that entry.
    let e = edit(&|b| {
        b[p.index_offset + 24 + 12] = 7;
        reseal_index(b, &p);
    });
    assert!(
        matches!(
            e,
            PackedError::CorruptIndex {
                block: Some(1),
                problem: IndexProblem::Codec(7),
                ..
            }
        ),
        "{e}"
    );
    // A flipped bit inside a frame: zstd or the block checksum notices.
    let (off, len, _) = entry(&bytes, &p, 2);
    let e = edit(&|b| b[off + len / 2] ^= 0x10);
    assert!(
        matches!(
            e,
            PackedError::CorruptFrame { block: 2, .. }
                | PackedError::BlockChecksum { block: 2, .. }
        ),
        "{e}"
    );
    // The safetensors header kept verbatim is covered by the header checksum.
    let e = edit(&|b| b[80 + 8 + 3] ^= 1);
    assert!(matches!(e, PackedError::HeaderChecksum { .. }), "{e}");
    // An absurd prefix length is refused before anything is allocated for it.
    let e = edit(&|b| b[24..32].copy_from_slice(&u64::MAX.to_le_bytes()));
    assert!(
        matches!(
            e,
            PackedError::CorruptPreamble {
                problem: packed::error::PreambleProblem::PrefixRange(u64::MAX),
                ..
            }
        ),
        "{e}"
    );
    // Version and magic.
    let e = edit(&|b| b[8] = 9);
    assert!(
        matches!(e, PackedError::UnsupportedVersion { found: 9, .. }),
        "{e}"
    );
    let e = edit(&|b| b[1] = b'X');
    assert!(matches!(e, PackedError::NotPacked { .. }), "{e}");
    // A file cut short loses its trailer; one cut inside the header is truncated.
    let e = edit(&|b| b.truncate(b.len() - 7));
    assert!(matches!(e, PackedError::CorruptTrailer { .. }), "{e}");
    let e = edit(&|b| b.truncate(80 + p.prefix_len / 2));
    assert!(matches!(e, PackedError::Truncated { .. }), "{e}");
    assert!(matches!(
        edit(&|b| b.truncate(40)),
        PackedError::Truncated { .. }
    ));
    // Every single-byte flip anywhere is caught (or harmless), never a wrong byte.
    for at in (0..bytes.len()).step_by(7) {
        let mut b = bytes.clone();
        b[at] ^= 0x5A;
        if let Ok(out) = open_bytes(b, None).and_then(|s| unpack_bytes(&s, 1)) {
            assert!(out == original, "flip at {at} returned wrong bytes");
        }
    }
}

#[test]
fn bases_are_checked_by_identity_and_by_tensor() {
    let mut rng = Rng(5);
    let tensors = every_dtype(&mut rng);
    let dir = tempdir();
    let src = dir.path().join("a.safetensors");
    write(&src, &safetensors_bytes(&tensors));
    let good = Arc::new(
        Base::open(&model_dir(
            &dir.path().join("good"),
            &perturbed(&tensors, &mut rng),
        ))
        .unwrap(),
    );
    let other = Arc::new(
        Base::open(&model_dir(
            &dir.path().join("other"),
            &perturbed(&tensors, &mut rng),
        ))
        .unwrap(),
    );
    let bytes = pack_bytes(&src, Some(good.clone()), &options(1024, 1));

    let err = |base| match open_bytes(bytes.clone(), base) {
        Err(Error::Packed(e)) => *e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(matches!(err(None), PackedError::MissingBase { .. }));
    assert!(matches!(err(Some(other)), PackedError::WrongBase { .. }));

    // A base lacking a tensor, or with another shape, cannot be packed against.
    let mut fewer = tensors.clone();
    fewer.remove(3);
    let fewer = Arc::new(Base::open(&model_dir(&dir.path().join("fewer"), &fewer)).unwrap());
    let e = packed::pack_shard_into(&src, Some(fewer), &options(1024, 1), Vec::new()).unwrap_err();
    assert!(
        matches!(&e, Error::Packed(b) if matches!(&**b, PackedError::BaseTensorMissing { tensor, .. } if *tensor == tensors[3].0)),
        "{e}"
    );
    let mut reshaped = tensors.clone();
    reshaped[0].2 = vec![reshaped[0].2[0] * 7, 1];
    let reshaped =
        Arc::new(Base::open(&model_dir(&dir.path().join("reshaped"), &reshaped)).unwrap());
    let e =
        packed::pack_shard_into(&src, Some(reshaped), &options(1024, 1), Vec::new()).unwrap_err();
    assert!(
        matches!(&e, Error::Packed(b) if matches!(**b, PackedError::BaseTensorMismatch { .. })),
        "{e}"
    );
}

// ---- directories ----------------------------------------------------------------------------

/// Files in `dir`, recursively, relative, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() {
                out.extend(
                    listing(&e.path())
                        .into_iter()
                        .map(|n| format!("{name}/{n}")),
                );
                out.push(format!("{name}/"));
            } else {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

fn pack_err(src: &Path, out: &Path, base: Option<&Path>) -> PackedError {
    match packed::pack_dir(src, out, base, &options(1 << 20, 2)) {
        Err(Error::Packed(e)) => *e,
        other => panic!("expected a packed error, got {other:?}"),
    }
}

fn unpack_err(src: &Path, out: &Path, base: Option<&Path>) -> PackedError {
    match packed::unpack_dir(src, out, base, 2) {
        Err(Error::Packed(e)) => *e,
        other => panic!("expected a packed error, got {other:?}"),
    }
}

#[test]
fn directories_round_trip_with_and_without_base_through_the_binary() {
    let dir = tempdir();
    let d = dir.path();
    common::synth(d, &["--specials", "--int-buffer", "--aligned-shards", "3"]);
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    // Pack the aligned model (it has no checksums.b3: one is computed), unpack, compare.
    common::run_ok(&[
        "pack",
        &s(&d.join("aligned")),
        "--out",
        &s(&d.join("p")),
        "--block-size",
        "4KiB",
        "-q",
    ]);
    let packed_files = listing(&d.join("p"));
    assert!(packed_files.contains(&"model-00001-of-00003.safetensors.mszst".to_string()));
    assert!(packed_files.contains(&"packed.b3".to_string()));
    assert!(!packed_files.iter().any(|f| f.ends_with(".safetensors")));
    common::run_ok(&["unpack", &s(&d.join("p")), "--out", &s(&d.join("u")), "-q"]);
    for f in listing(&d.join("aligned")) {
        assert!(
            std::fs::read(d.join("aligned").join(&f)).unwrap()
                == std::fs::read(d.join("u").join(&f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        listing(&d.join("u")).len(),
        listing(&d.join("aligned")).len() + 1
    );
    // The manifests read with the standard tool, when it is there.
    if Path::new("/usr/bin/b3sum").exists() {
        for (sub, m) in [("p", "packed.b3"), ("u", "checksums.b3")] {
            let st = std::process::Command::new("b3sum")
                .arg("--check")
                .arg(m)
                .current_dir(d.join(sub))
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "b3sum --check {sub}/{m}: {}",
                String::from_utf8_lossy(&st.stderr)
            );
        }
    }

    // An ExPO output against its aligned model: its own checksums.b3 is carried verbatim.
    let expo = d.join("expo");
    let out = common::expo(d, &expo, "0.3", &[]);
    assert!(out.status.success());
    common::run_ok(&[
        "pack",
        &s(&expo),
        "--base",
        &s(&d.join("aligned")),
        "--out",
        &s(&d.join("x")),
        "-q",
    ]);
    assert!(
        std::fs::read(expo.join("checksums.b3")).unwrap()
            == std::fs::read(d.join("x/checksums.b3")).unwrap()
    );
    let no_base = common::run(&["unpack", &s(&d.join("x")), "--out", &s(&d.join("xu")), "-q"]);
    assert_eq!(no_base.status.code(), Some(2));
    assert!(
        common::stderr(&no_base).contains("--base"),
        "{}",
        common::stderr(&no_base)
    );
    assert!(!d.join("xu").exists());
    common::run_ok(&[
        "unpack",
        &s(&d.join("x")),
        "--base",
        &s(&d.join("aligned")),
        "--out",
        &s(&d.join("xu")),
        "-q",
    ]);
    common::run_ok(&["verify", &s(&d.join("xu")), "-q"]);

    // The packed directory read in place, tensor by tensor, against the restored files.
    let base = Arc::new(Base::open(&d.join("aligned")).unwrap());
    let shards = packed::open_packed_dir(&d.join("x"), Some(base)).unwrap();
    assert_eq!(
        shards.len(),
        listing(&expo)
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
            .count()
    );
    let mut cache = BlockCache::new(2).unwrap();
    for (name, shard) in &shards {
        let original = std::fs::read(expo.join(name)).unwrap();
        let start = shard.header().data_start() as usize;
        for t in &shard.header().tensors {
            let mut buf = vec![0u8; t.nbytes() as usize];
            shard.read_at(t.start, &mut buf, &mut cache).unwrap();
            assert!(
                buf == original[start + t.start as usize..start + t.end as usize],
                "{name}: {}",
                t.name
            );
        }
    }
    for f in listing(&expo) {
        assert!(
            std::fs::read(expo.join(&f)).unwrap() == std::fs::read(d.join("xu").join(&f)).unwrap(),
            "{f}"
        );
    }
}

#[test]
fn failed_directory_runs_leave_nothing_behind() {
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng(9);
    let tensors = every_dtype(&mut rng);
    let model = model_dir(&d.join("m"), &tensors);
    let base = model_dir(&d.join("b"), &perturbed(&tensors, &mut rng));
    let other = model_dir(&d.join("o"), &perturbed(&tensors, &mut rng));
    packed::pack_dir(&model, &d.join("p"), Some(&base), &options(4096, 2)).unwrap();
    let before = listing(d);

    // Missing and wrong base, unexpected base.
    assert!(matches!(
        unpack_err(&d.join("p"), &d.join("u"), None),
        PackedError::MissingBase { .. }
    ));
    assert!(matches!(
        unpack_err(&d.join("p"), &d.join("u"), Some(&other)),
        PackedError::WrongBase { .. }
    ));
    packed::pack_dir(&model, &d.join("plain"), None, &options(4096, 2)).unwrap();
    assert!(matches!(
        unpack_err(&d.join("plain"), &d.join("u"), Some(&base)),
        PackedError::UnexpectedBase { .. }
    ));
    std::fs::remove_dir_all(d.join("plain")).unwrap();
    assert_eq!(listing(d), before);

    // A corrupt block in the middle of a packed shard: unpack stops, removes its output.
    let bad = d.join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in listing(&d.join("p")) {
        std::fs::copy(d.join("p").join(&f), bad.join(&f)).unwrap();
    }
    let shard = bad.join("model.safetensors.mszst");
    let mut bytes = std::fs::read(&shard).unwrap();
    let p = parse(&bytes);
    let (off, len, _) = entry(&bytes, &p, p.blocks / 2);
    bytes[off + len / 2] ^= 0xFF;
    write(&shard, &bytes);
    let e = unpack_err(&bad, &d.join("u"), Some(&base));
    assert!(
        matches!(
            e,
            PackedError::CorruptFrame { .. } | PackedError::BlockChecksum { .. }
        ),
        "{e}"
    );
    assert!(!d.join("u").exists());

    // An output that exists empty is kept (empty), not removed.
    std::fs::create_dir(d.join("u")).unwrap();
    let e = unpack_err(&bad, &d.join("u"), Some(&base));
    assert!(
        matches!(
            e,
            PackedError::CorruptFrame { .. } | PackedError::BlockChecksum { .. }
        ),
        "{e}"
    );
    assert!(listing(&d.join("u")).is_empty());
    std::fs::remove_dir(d.join("u")).unwrap();

    // checksums.b3 disagreeing with what the shard decodes to: nothing gets its final name.
    std::fs::remove_dir_all(&bad).unwrap();
    packed::pack_dir(&model, &bad, None, &options(4096, 1)).unwrap();
    let manifest = bad.join("checksums.b3");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let wrong = blake3::hash(b"something else").to_hex().to_string();
    let text: String = text
        .lines()
        .map(|l| {
            if l.ends_with("  model.safetensors") {
                format!("{wrong}  model.safetensors\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    write(&manifest, text.as_bytes());
    let e = unpack_err(&bad, &d.join("u"), None);
    assert!(matches!(e, PackedError::FileChecksum { .. }), "{e}");
    assert!(!d.join("u").exists());
    // A file missing from the packed directory.
    std::fs::remove_file(bad.join("config.json")).unwrap();
    assert!(matches!(
        unpack_err(&bad, &d.join("u"), None),
        PackedError::ManifestFiles { .. }
    ));
    std::fs::remove_file(bad.join("packed.b3")).unwrap();
    assert!(matches!(
        unpack_err(&bad, &d.join("u"), None),
        PackedError::NotPackedDir { .. }
    ));
    std::fs::remove_dir_all(&bad).unwrap();
    assert_eq!(listing(d), before);

    // Packing: overlapping output, an input that does not match its own manifest, a base that
    // does not fit, an output that is not empty.
    for (out, kind) in [
        (model.join("sub"), OverlapKind::OutputInsideInput),
        (d.to_path_buf(), OverlapKind::InputInsideOutput),
        (model.clone(), OverlapKind::Same),
    ] {
        match packed::pack_dir(&model, &out, None, &options(1 << 20, 2)) {
            Err(Error::Overlap { kind: k, .. }) => assert_eq!(k, kind, "{}", out.display()),
            other => panic!("expected an overlap, got {other:?}"),
        }
    }
    // Unpacking into or around the packed directory, or into the base, is refused too.
    for (out, kind) in [
        (d.join("p").join("sub"), OverlapKind::OutputInsideInput),
        (d.to_path_buf(), OverlapKind::InputInsideOutput),
        (base.join("sub"), OverlapKind::OutputInsideInput),
    ] {
        match packed::unpack_dir(&d.join("p"), &out, Some(&base), 2) {
            Err(Error::Overlap { kind: k, .. }) => assert_eq!(k, kind, "{}", out.display()),
            other => panic!("expected an overlap, got {other:?}"),
        }
    }
    assert_eq!(listing(d), before);
    let mut fewer = tensors.clone();
    fewer.pop();
    let fewer = model_dir(&d.join("fewer"), &fewer);
    assert!(matches!(
        pack_err(&model, &d.join("q"), Some(&fewer)),
        PackedError::BaseTensorMissing { .. }
    ));
    std::fs::remove_dir_all(&fewer).unwrap();
    assert!(matches!(
        pack_err(&model, &d.join("p"), None),
        PackedError::OutputNotEmpty { .. }
    ));
    write(
        &model.join("checksums.b3"),
        format!(
            "{}  config.json\n{}  model.safetensors\n",
            blake3::hash(b"{\"model_type\": \"test\"}\n").to_hex(),
            wrong
        )
        .as_bytes(),
    );
    assert!(matches!(
        pack_err(&model, &d.join("q"), None),
        PackedError::SourceChecksum { .. }
    ));
    write(
        &model.join("checksums.b3"),
        format!("{}  config.json\n", blake3::hash(b"x").to_hex()).as_bytes(),
    );
    assert!(matches!(
        pack_err(&model, &d.join("q"), None),
        PackedError::ManifestFiles { .. }
    ));
    std::fs::remove_file(model.join("checksums.b3")).unwrap();
    std::fs::create_dir(model.join("original")).unwrap();
    assert!(matches!(
        pack_err(&model, &d.join("q"), None),
        PackedError::Subdirectory { .. }
    ));
    std::fs::remove_dir(model.join("original")).unwrap();
    assert!(!d.join("q").exists());
    assert_eq!(listing(d), before);
}

#[test]
fn a_packed_file_changed_after_opening_is_noticed() {
    let (dir, _, bytes) = packed_sample();
    let path = dir.path().join("s.mszst");
    write(&path, &bytes);
    let shard = PackedShard::open(&path, None).unwrap();
    shard.check_unchanged().unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &[0]))
        .unwrap();
    assert!(matches!(
        shard.check_unchanged(),
        Err(Error::InputChanged { .. })
    ));
    // Reopened, the extended file no longer has its trailer at the end.
    let e = PackedShard::open(&path, None).unwrap_err();
    assert!(
        matches!(&e, Error::Packed(b) if matches!(**b, PackedError::CorruptTrailer { .. })),
        "{e}"
    );
}

#[test]
fn misuse_of_the_writer_and_odd_inputs_get_their_own_errors() {
    let (dir, original, _) = packed_sample();
    let d = dir.path();
    let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let (prefix, data) = original.split_at(8 + n);
    let new = |o: &PackOptions| {
        packed::PackWriter::new(
            Path::new("w.mszst"),
            prefix,
            data.len() as u64,
            None,
            o,
            Vec::new(),
        )
    };
    let inner = |r: mergestream::Result<_>| match r {
        Err(Error::Packed(e)) => *e,
        Err(other) => panic!("expected a packed error, got {other}"),
        Ok(_) => panic!("expected an error"),
    };
    // Too few or too many data bytes for the header.
    let mut w = new(&options(4096, 1)).unwrap();
    w.write(&data[..10]).unwrap();
    assert!(matches!(
        inner(w.finish().map(drop)),
        PackedError::InputLength { expected, got: 10, .. } if expected == data.len() as u64
    ));
    let mut w = new(&options(4096, 2)).unwrap();
    w.write(data).unwrap();
    assert!(matches!(
        inner(w.write(b"x").map(drop)),
        PackedError::InputLength { .. }
    ));
    // Parameters outside the format.
    for o in [options(3000, 1), options(32, 1), options(1 << 27, 1)] {
        assert!(matches!(
            inner(new(&o).map(drop)),
            PackedError::BadParameter {
                what: "block size",
                ..
            }
        ));
    }
    let level = PackOptions {
        level: 23,
        ..options(4096, 1)
    };
    assert!(matches!(
        inner(new(&level).map(drop)),
        PackedError::BadParameter {
            what: "zstd level",
            ..
        }
    ));

    // Directories: no shard, a packed-looking name, a malformed manifest.
    let m = d.join("m");
    std::fs::create_dir(&m).unwrap();
    write(&m.join("config.json"), b"{}");
    assert!(matches!(
        pack_err(&m, &d.join("o"), None),
        PackedError::NoShards { .. }
    ));
    write(&m.join("model.safetensors"), &original);
    write(&m.join("x.safetensors.mszst"), b"");
    assert!(matches!(
        pack_err(&m, &d.join("o"), None),
        PackedError::ReservedName { .. }
    ));
    std::fs::remove_file(m.join("x.safetensors.mszst")).unwrap();
    write(&m.join("checksums.b3"), b"not a manifest\n");
    assert!(matches!(
        pack_err(&m, &d.join("o"), None),
        PackedError::Manifest { .. }
    ));
    assert!(!d.join("o").exists());
}
