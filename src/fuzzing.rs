//! Fuzzing entry points: the bodies of the cargo-fuzz targets in `fuzz/`.
//!
//! Each function takes a fuzzer's bytes, drives one public entry point of the library, and
//! panics only when a promise the library makes is broken (a header that validates but does not
//! tile its data section, a failed merge that leaves output behind, a merged value that differs
//! from the reference, a file the `safetensors` crate reads that mergestream refuses for an
//! undocumented reason, …). Errors are expected outcomes, not findings. The functions live here,
//! not in `fuzz/`, so that `tests/it/fuzz_corpus.rs` replays the seed corpus and every crash
//! reproducer under plain `cargo test`, through the very same code.
//!
//! Compiled only with the `fuzzing` cargo feature. Not part of the API: hidden from the docs,
//! and free to change with the targets.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::HeaderError;
use crate::format::header::{self, Header};
use crate::format::index::{self, INDEX_FILE};
use crate::format::pickle::{self, StateDict};
use crate::format::torch::{self, TorchShard};
use crate::format::zip::Archive;
use crate::format::Dtype;
use crate::model::Model;
use crate::output::Existing;
use crate::pipeline::Cancel;
use crate::{Error, ExpoJob};

/// Separates the parts of an `index` input: the index JSON, then up to [`SHARD_NAMES`]`.len()`
/// shard files.
pub const SEPARATOR: &[u8] = b"\n--shard--\n";

/// The file names the shards of an `index` input are written under, in order.
pub const SHARD_NAMES: [&str; 3] = ["a.safetensors", "b.safetensors", "c.safetensors"];

/// Bytes of parameters that open a `merge` input; the rest is a safetensors file.
pub const MERGE_PARAMS: usize = 8;

/// Float dtypes the merge target lets reach the kernel (all that mergestream merges).
pub const MERGED_FLOATS: &[Dtype] = &[Dtype::BF16, Dtype::F16, Dtype::F32];

/// `header`: a whole file, parsed from memory by the same code that reads shards.
pub fn header(data: &[u8]) {
    let path = Path::new("fuzz.safetensors");
    match header::parse_file_bytes(path, data) {
        Ok(h) => check_header(&h, data.len() as u64),
        Err(e) => check_error(&e),
    }
}

/// `differential`: a whole file, read by mergestream's header parser and by the reference, the
/// `safetensors` crate (the Rust core of the Python `safetensors` package, same version). They
/// must agree on accepting or refusing it, and on what an accepted header says (every tensor's
/// dtype, shape and offsets, the metadata). Mergestream may refuse what the reference reads
/// only for a documented [`Difference`]; for those that are a matter of spelling, the file is
/// rewritten the way mergestream reads it ([`normalized`]) and must then agree in full, so that
/// a documented difference cannot hide another behind it. Mergestream must never accept what
/// the reference refuses.
pub fn differential(data: &[u8]) {
    compare_with_reference(data, data, true);
}

/// The ways mergestream deliberately refuses a header the reference reads (listed in
/// `fuzz/README.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// A tensor name appears twice among the header's keys: the reference silently keeps the
    /// last entry; mergestream will not guess which was meant.
    DuplicateTensor,
    /// A tensor's entry is a JSON array `[dtype, shape, data_offsets]`, which serde reads as a
    /// struct, field by field; the format says an entry is an object.
    EntryIsArray,
    /// A dtype written as a one-key object, `{"BF16": null}` (serde's form of a unit enum
    /// variant); the format says a dtype is a string.
    DtypeIsObject,
    /// A dtype whose elements take less than a byte (`F4`, `F6_E2M3`, `F6_E3M2`): not
    /// supported.
    SubByteDtype,
}

/// The documented difference `error` is, if it is one.
pub fn difference(error: &Error) -> Option<Difference> {
    let Error::Header { kind, .. } = error else {
        return None;
    };
    match kind {
        HeaderError::DuplicateTensor { .. } => Some(Difference::DuplicateTensor),
        HeaderError::EntryNotObject { .. } => Some(Difference::EntryIsArray),
        HeaderError::DtypeNotString { .. } => Some(Difference::DtypeIsObject),
        HeaderError::UnsupportedDtype { .. } => Some(Difference::SubByteDtype),
        _ => None,
    }
}

/// Compares mergestream on `data` with the reference on `original` (the same file, or the
/// file `data` was normalized from). `retry`: whether a normalizable difference may be
/// normalized and compared again.
fn compare_with_reference(data: &[u8], original: &[u8], retry: bool) {
    let ours = header::parse_file_bytes(Path::new("fuzz.safetensors"), data);
    let theirs = safetensors::SafeTensors::read_metadata(original);
    match (ours, theirs) {
        (Ok(h), Ok((n, reference))) => {
            if data == original {
                assert_eq!(h.header_len, n as u64, "header length");
            }
            agree(&h, &reference);
        }
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => panic!("mergestream accepts a file the reference refuses ({e})"),
        (Err(e), Ok(_)) => match difference(&e) {
            None => panic!("mergestream refuses a file the reference reads: {e}"),
            Some(Difference::SubByteDtype) => {}
            Some(d) => {
                assert!(retry, "{d:?} remains after normalizing: {e}");
                let fixed = normalized(data)
                    .unwrap_or_else(|| panic!("{d:?} ({e}), but nothing to normalize"));
                compare_with_reference(&fixed, original, false);
            }
        },
    }
}

/// Panics unless mergestream's header `ours` says what the reference's `theirs` says.
fn agree(ours: &Header, theirs: &safetensors::tensor::Metadata) {
    let reference = theirs.tensors();
    assert_eq!(ours.tensors.len(), reference.len(), "tensor count");
    for t in &ours.tensors {
        let r = reference
            .get(&t.name)
            .unwrap_or_else(|| panic!("tensor '{}' unknown to the reference", t.name));
        assert_eq!(
            format!("{:?}", r.dtype),
            t.dtype.name(),
            "'{}' dtype",
            t.name
        );
        let shape: Vec<u64> = r.shape.iter().map(|&d| d as u64).collect();
        assert_eq!(shape, t.shape, "'{}' shape", t.name);
        let (start, end) = r.data_offsets;
        assert_eq!(
            (start as u64, end as u64),
            (t.start, t.end),
            "'{}' offsets",
            t.name
        );
    }
    // Of a metadata key given twice, the reference (a map) keeps the last value.
    let ours: std::collections::HashMap<&str, &str> = ours
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let theirs: std::collections::HashMap<&str, &str> = theirs
        .metadata()
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(ours, theirs, "metadata");
}

/// The file with its header rewritten as the format spells it, keeping what the reference
/// reads it to mean: of a name given twice the last entry, an entry given as an array as the
/// object of its three fields, a dtype given as a one-key object as that key. `None` when the
/// header is not a JSON object or nothing changed.
pub fn normalized(data: &[u8]) -> Option<Vec<u8>> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::Value;

    /// A JSON object's entries in file order, duplicates kept.
    struct Entries(Vec<(String, Value)>);
    impl<'de> serde::Deserialize<'de> for Entries {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Entries, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Entries;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                    let mut entries = Vec::new();
                    while let Some(entry) = map.next_entry()? {
                        entries.push(entry);
                    }
                    Ok(Entries(entries))
                }
            }
            d.deserialize_map(V)
        }
    }

    let n = usize::try_from(u64::from_le_bytes(data.get(..8)?.try_into().ok()?)).ok()?;
    let json = std::str::from_utf8(data.get(8..8usize.checked_add(n)?)?).ok()?;
    let Entries(entries) = serde_json::from_str(json).ok()?;
    let mut header = serde_json::Map::new();
    for (name, mut entry) in entries {
        if name != "__metadata__" {
            if let Value::Array(fields) = &entry {
                if let [dtype, shape, offsets] = &fields[..] {
                    entry = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets});
                }
            }
            if let Some(Value::Object(dtype)) = entry.get("dtype") {
                if let Some((key, _)) = dtype.iter().next().filter(|_| dtype.len() == 1) {
                    let key = key.clone();
                    entry["dtype"] = Value::String(key);
                }
            }
        }
        header.insert(name, entry);
    }
    let text = serde_json::to_vec(&header).ok()?;
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data[8 + n..]);
    (out != data).then_some(out)
}

/// `index`: `INDEX JSON` [`SEPARATOR`] `SHARD` ([`SEPARATOR`] `SHARD`)…, written to a scratch
/// directory and opened as a model, so the index is parsed and cross-checked against real
/// shard headers.
pub fn index(data: &[u8]) {
    let mut parts = split(data, SEPARATOR);
    let index_json = parts.remove(0);
    let parsed = index::parse(index_json);
    match &parsed {
        Ok(idx) => check_index(idx),
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let scratch = scratch();
    let dir = scratch.path();
    write(&dir.join(INDEX_FILE), index_json);
    for (name, bytes) in SHARD_NAMES.iter().zip(&parts) {
        write(&dir.join(name), bytes);
    }
    match Model::open(dir) {
        Ok(model) => {
            let idx = parsed.expect("a model opened through its index, so the index parses");
            assert_eq!(model.tensor_count(), idx.weight_map.len());
            for (tensor, shard) in &idx.weight_map {
                let (loc, _) = model
                    .get(tensor)
                    .unwrap_or_else(|| panic!("tensor '{tensor}' listed but not in the model"));
                assert_eq!(&model.shards[loc.shard].name, shard, "tensor '{tensor}'");
            }
            for shard in &model.shards {
                assert_eq!(shard.path.parent(), Some(dir), "a shard outside the model");
                check_header(shard.header().expect("a safetensors shard"), shard.len());
            }
        }
        Err(e) => check_error(&e),
    }
}

/// `merge`: `PARAMS` (see [`MERGE_PARAMS`]) then a safetensors file `A`. A second file `B` is
/// derived from `A` (values perturbed; tensors renamed, reshaped, retyped, dropped or added, and
/// the layout reordered, as the parameters say), and the two are merged as a whole run — with
/// `params[0]` bit 1, into compressed output (`--compress`, blocks of `64 << (params[0] >> 2 &
/// 3)` bytes, on `1 + (params[0] >> 4 & 1)` threads), read back through the packed reader. A
/// successful run must verify and match the reference element by element; a failed one must
/// leave nothing behind.
pub fn merge(data: &[u8]) {
    let Some((params, file)) = data.split_first_chunk::<MERGE_PARAMS>() else {
        return;
    };
    let parsed = header::parse_file_bytes(Path::new("a.safetensors"), file).ok();
    let unmerged_float = |d: Dtype| d.mergeable().is_some() && !MERGED_FLOATS.contains(&d);
    if let Some(h) = &parsed {
        if h.tensors.iter().any(|t| unmerged_float(t.dtype)) {
            return;
        }
    }
    let derived = match &parsed {
        Some(h) => derive(params, h, file),
        None => file.to_vec(),
    };

    let scratch = scratch();
    let dir = scratch.path();
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    write(&a, file);
    write(&b, &derived);
    let ((sft, sft_bytes), (aligned, aligned_bytes)) = if params[0] & 1 == 0 {
        ((a, file), (b, &derived[..]))
    } else {
        ((b, &derived[..]), (a, file))
    };
    let alpha = ALPHAS[params[1] as usize % ALPHAS.len()];
    let job = ExpoJob {
        sft,
        aligned,
        out: dir.join("out"),
        alphas: vec![alpha],
        policy: Default::default(),
        options: crate::RunOptions {
            max_shard_size: SHARD_SIZES[params[2] as usize % SHARD_SIZES.len()],
            memory: 40 << 20,
            threads: 1,
            chunk_bytes: Some(8 * (1 + params[3] as usize % 64)),
            part: None,
            existing: Existing::Refuse,
            show_progress: false,
            io: crate::writer::IoMode::Auto,
            hash_inputs: false,
            compress: (params[0] & 2 != 0).then(|| crate::packed::PackOptions {
                level: 1,
                block_size: 64 << (params[0] >> 2 & 3),
                threads: 1 + usize::from(params[0] >> 4 & 1),
            }),
        },
    };
    match crate::expo(&job, &Cancel::default()) {
        Ok(_) => {
            if let Err(e) = crate::verify::verify(&job.out) {
                panic!("a finished run does not verify: {e}");
            }
            check_merged(sft_bytes, aligned_bytes, &job.out, alpha);
        }
        Err(e) => {
            check_error(&e);
            let mut left: Vec<String> = std::fs::read_dir(dir)
                .expect("the scratch directory lists")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            left.sort();
            assert_eq!(
                left,
                ["a.safetensors", "b.safetensors"],
                "a failed run ({e}) left files behind"
            );
        }
    }
}

/// `pickle`: the bytes of a `data.pkl`, run on the pickle machine that executes nothing. A state
/// dict it accepts must hold what it promises: unique names, C-contiguous tensors whose byte
/// ranges are numel × dtype size and lie inside storages it lists once each.
pub fn pickle(data: &[u8]) {
    match pickle::parse(data) {
        Ok(sd) => check_state_dict(&sd),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// `torch`: a whole PyTorch checkpoint file, read from memory by the code that reads files. A
/// checkpoint it accepts must have a valid archive whose stored members hold every tensor's
/// bytes, each tensor's range being numel × dtype size.
pub fn torch(data: &[u8]) {
    match torch::parse_bytes(Path::new("fuzz.bin"), data) {
        Ok(shard) => check_torch(&shard, data),
        Err(e) => check_error(&Error::from(e)),
    }
}

fn check_state_dict(sd: &StateDict) {
    let mut names = HashSet::new();
    let storages: std::collections::HashMap<&str, u64> = sd
        .storages
        .iter()
        .map(|s| (s.key.as_str(), s.nbytes))
        .collect();
    assert_eq!(storages.len(), sd.storages.len(), "a storage listed twice");
    for t in &sd.tensors {
        assert!(names.insert(&t.name), "tensor '{}' twice", t.name);
        assert!(t.shape.len() <= pickle::MAX_DIMS && t.strides.len() == t.shape.len());
        let numel = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let numel = numel.expect("numel fits in u64");
        assert_eq!(
            Some(t.end - t.start),
            numel.checked_mul(t.dtype.size() as u64)
        );
        assert_eq!(
            Some(t.start),
            t.storage_offset.checked_mul(t.dtype.size() as u64)
        );
        let mut step = 1u64;
        for (&d, &s) in t.shape.iter().zip(&t.strides).rev() {
            assert!(
                numel == 0 || d == 1 || s == step,
                "tensor '{}' not contiguous",
                t.name
            );
            step = step.saturating_mul(d);
        }
        let nbytes = storages
            .get(t.storage.as_str())
            .unwrap_or_else(|| panic!("tensor '{}': storage not listed", t.name));
        assert!(
            t.start <= t.end && t.end <= *nbytes,
            "tensor '{}' out of its storage",
            t.name
        );
    }
}

fn check_torch(shard: &TorchShard, data: &[u8]) {
    let archive = Archive::parse_bytes(data).expect("an accepted checkpoint's archive parses");
    let mut names = HashSet::new();
    for t in &shard.tensors {
        let i = &t.info;
        assert!(names.insert(&i.name), "tensor '{}' twice", i.name);
        let m = archive
            .get(&t.member)
            .unwrap_or_else(|| panic!("tensor '{}': no member '{}'", i.name, t.member));
        assert!(m.is_stored());
        assert!(m.data_start <= i.start && i.start <= i.end && i.end <= m.data_end());
        let numel = i.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        assert_eq!(
            numel.and_then(|n| n.checked_mul(i.dtype.size() as u64)),
            Some(i.nbytes()),
            "tensor '{}'",
            i.name
        );
    }
    let mut members: Vec<_> = archive.members.iter().collect();
    members.sort_by_key(|m| m.data_start);
    for w in members.windows(2) {
        assert!(w[0].data_end() <= w[1].data_start, "members overlap");
    }
}

/// Bytes of parameters that open a `packed` input; the rest is a file.
pub const PACKED_PARAMS: usize = 4;

/// `packed`: `PARAMS` (see [`PACKED_PARAMS`]) then a file.
///
/// A file that starts with the packed magic number is opened as a packed shard and read whole
/// (`unpack_into`) and in pieces (`read_at`); it must fail with an error or give the same bytes
/// both ways. Any other file is taken as safetensors: if it validates, it is packed (block size
/// `64 << (params[0] % 8)`, against a base derived from it if `params[1]` bit 0, on two threads
/// if bit 1) and must unpack, and read back at every offset, to exactly its bytes; then bytes
/// of the packed file chosen by `params[2..4]` (0: none) are flipped, and reading it must fail
/// or still give exactly the original — never other bytes.
pub fn packed(data: &[u8]) {
    use crate::packed::{Base, BlockCache, PackOptions, PackWriter, PackedShard, MAGIC};
    use std::sync::Arc;

    let Some((params, file)) = data.split_first_chunk::<PACKED_PARAMS>() else {
        return;
    };
    let path = Path::new("fuzz.mszst");
    if file.starts_with(&MAGIC) {
        let _ = read_packed(path, file.to_vec(), None);
        return;
    }
    let Ok(h) = header::parse_file_bytes(Path::new("fuzz.safetensors"), file) else {
        return;
    };
    let scratch = scratch();
    let base = if params[1] & 1 != 0 && !h.tensors.is_empty() {
        // The base: the same tensors with every data byte rotated, in a model directory.
        let mut b = file.to_vec();
        for x in &mut b[h.data_start() as usize..] {
            *x = x.rotate_left(3) ^ 0x11;
        }
        write(&scratch.path().join("model.safetensors"), &b);
        Some(Arc::new(
            Base::open(scratch.path()).expect("a base made from a valid file opens"),
        ))
    } else {
        None
    };
    let options = PackOptions {
        level: 1 + i32::from(params[0] >> 3) % 4,
        block_size: 64 << (params[0] % 8),
        threads: 1 + usize::from(params[1] >> 1 & 1),
    };
    let prefix = &file[..h.data_start() as usize];
    let mut writer = PackWriter::new(path, prefix, h.data_len, base.clone(), &options, Vec::new())
        .unwrap_or_else(|e| panic!("a valid file does not start packing: {e}"));
    // Feed the data in uneven pieces, as a pipeline would.
    let mut rest = &file[prefix.len()..];
    let mut piece = 1 + usize::from(params[2]);
    while !rest.is_empty() {
        let n = piece.min(rest.len());
        writer.write(&rest[..n]).expect("writing packs");
        rest = &rest[n..];
        piece = piece * 3 + 1;
    }
    let (bytes, summary) = writer.finish().expect("a valid file packs");
    assert_eq!(summary.original_blake3, blake3::hash(file));
    assert_eq!(summary.packed_blake3, Some(blake3::hash(&bytes)));
    let back = read_packed(path, bytes.clone(), base.clone())
        .unwrap_or_else(|e| panic!("a packed file does not read back: {e}"));
    assert!(back == file, "a packed file reads back other bytes");

    let seed = u16::from_le_bytes([params[2], params[3]]);
    if seed != 0 {
        let mut bad = bytes;
        let mut state = u32::from(seed);
        for _ in 0..1 + seed % 3 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let at = (state as usize >> 4) % bad.len();
            bad[at] ^= 1 << (state % 8);
        }
        if let Ok(got) = read_packed(path, bad, base) {
            assert!(got == file, "a corrupted packed file reads as other bytes");
        }
    }

    /// Opens `bytes` as a packed shard and returns the original file, read whole and read
    /// piecewise through a small cache — which must agree.
    fn read_packed(path: &Path, bytes: Vec<u8>, base: Option<Arc<Base>>) -> crate::Result<Vec<u8>> {
        let len = bytes.len() as u64;
        let shard = PackedShard::from_source(path, Box::new(bytes), len, base)?;
        let mut whole = Vec::new();
        shard.unpack_into(&mut whole, 1)?;
        assert_eq!(whole.len() as u64, shard.original_len());
        let data_len = shard.header().data_len;
        let mut cache = BlockCache::new(1)?;
        let mut pieces = shard.prefix().to_vec();
        let mut at = 0;
        let mut n = 1;
        while at < data_len {
            let take = n.min(data_len - at);
            let mut buf = vec![0u8; take as usize];
            shard.read_at(at, &mut buf, &mut cache)?;
            pieces.extend_from_slice(&buf);
            at += take;
            n = n * 2 + 3;
        }
        assert!(pieces == whole, "read_at and unpack disagree");
        Ok(whole)
    }
}

const ALPHAS: [f32; 12] = [
    0.5,
    0.0,
    -1.0,
    0.1,
    2.0,
    1e-3,
    -0.3,
    f32::MAX,
    f32::MIN_POSITIVE,
    1e30,
    f32::NAN,
    f32::INFINITY,
];

const SHARD_SIZES: [u64; 8] = [u64::MAX, 0, 1, 2, 16, 100, 4096, 5_000_000_000];

/// Invariants of a header that validated, for a file of `file_len` bytes.
fn check_header(h: &Header, file_len: u64) {
    assert_eq!(h.file_len(), file_len, "header and data must fill the file");
    let mut at = 0;
    let mut names = HashSet::new();
    for t in &h.tensors {
        assert!(names.insert(&t.name), "tensor '{}' twice", t.name);
        assert_ne!(t.name, "__metadata__");
        assert_eq!(
            t.start, at,
            "tensor '{}' does not start where the last ended",
            t.name
        );
        assert!(t.end >= t.start);
        at = t.end;
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .expect("numel fits in u64");
        assert_eq!(
            Some(t.nbytes()),
            numel.checked_mul(t.dtype.size() as u64),
            "tensor '{}': nbytes is not numel × dtype size",
            t.name
        );
    }
    assert_eq!(at, h.data_len, "tensors must tile the data section");

    // What encode writes, parse reads back the same.
    let mut file = header::encode(&h.metadata, &h.tensors);
    assert_eq!(file.len() as u64 % header::DATA_ALIGN, 0);
    file.resize(file.len() + h.data_len as usize, 0);
    let again = header::parse_file_bytes(Path::new("encoded"), &file)
        .unwrap_or_else(|e| panic!("an encoded header does not parse: {e}"));
    assert_eq!(again.tensors, h.tensors);
    assert_eq!(again.metadata, h.metadata);
}

fn check_index(idx: &index::Index) {
    assert!(!idx.weight_map.is_empty());
    let mut names = HashSet::new();
    for (tensor, shard) in &idx.weight_map {
        assert!(names.insert(tensor), "tensor '{tensor}' twice");
        assert!(index::check_shard_name(tensor, shard).is_ok());
        assert!(!shard.contains('/') && shard != ".." && shard != ".");
    }
    let shards = idx.shards();
    assert!(shards.windows(2).all(|w| w[0] < w[1]));
}

/// An error must render, and say something.
fn check_error(e: &Error) {
    let text = e.to_string();
    assert!(!text.is_empty());
    assert!((1..=2).contains(&e.exit_code()), "{text}");
}

/// Checks the merged model at `out` against the reference computed from the input files.
fn check_merged(sft: &[u8], aligned: &[u8], out: &Path, alpha: f32) {
    let read = |bytes: &[u8]| {
        let h = header::parse_file_bytes(Path::new("input"), bytes).expect("inputs parsed");
        let base = h.data_start() as usize;
        h.tensors
            .into_iter()
            .map(|t| {
                let data = bytes[base + t.start as usize..base + t.end as usize].to_vec();
                (t.name.clone(), (t, data))
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (sft, aligned) = (read(sft), read(aligned));
    let merged = Model::open(out).unwrap_or_else(|e| panic!("the output does not open: {e}"));
    assert_eq!(merged.tensor_count(), aligned.len());
    for (name, (a, a_data)) in &aligned {
        let (loc, m) = merged
            .get(name)
            .unwrap_or_else(|| panic!("tensor '{name}' missing from the output"));
        assert_eq!((m.dtype, &m.shape), (a.dtype, &a.shape), "tensor '{name}'");
        let shard = &merged.shards[loc.shard];
        let mut got = vec![0u8; m.nbytes() as usize];
        shard
            .read_at(m.start, &mut got, &mut crate::model::ReadCache::new(1))
            .expect("output tensor data reads");
        let want = if a.dtype.mergeable().is_some() {
            let (s, s_data) = &sft[name];
            a_data
                .chunks_exact(a.dtype.size())
                .zip(s_data.chunks_exact(s.dtype.size()))
                .flat_map(|(a_el, s_el)| expo_reference(a.dtype, s.dtype, alpha, a_el, s_el))
                .collect()
        } else {
            a_data.clone()
        };
        assert!(got == want, "tensor '{name}' differs from the reference");
    }
}

/// One element of `aligned + alpha * (aligned - sft)` in f32, unfused, rounded to nearest even,
/// NaN canonical: the kernel's contract, computed with the `half` crate's conversions.
fn expo_reference(dtype: Dtype, sft_dtype: Dtype, alpha: f32, a: &[u8], s: &[u8]) -> Vec<u8> {
    let to_f32 = |dtype: Dtype, b: &[u8]| match dtype {
        Dtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    };
    let (a, s) = (to_f32(dtype, a), to_f32(sft_dtype, s));
    let o = a + alpha * (a - s);
    match dtype {
        Dtype::BF16 if o.is_nan() => 0x7FC0u16.to_le_bytes().to_vec(),
        Dtype::F16 if o.is_nan() => 0x7E00u16.to_le_bytes().to_vec(),
        Dtype::BF16 => half::bf16::from_f32(o).to_le_bytes().to_vec(),
        Dtype::F16 => half::f16::from_f32(o).to_le_bytes().to_vec(),
        _ if o.is_nan() => 0x7FC0_0000u32.to_le_bytes().to_vec(),
        _ => o.to_le_bytes().to_vec(),
    }
}

/// Derives the second model of a `merge` input from the first, as `params` say:
/// - `params[4]`, a set of edits to tensor `params[5] % n`: bit 0 renames it, bit 1 reshapes
///   it (same bytes), bit 2 retypes it (same element size), bit 3 drops it, bit 4 adds a tensor;
/// - `params[5]` bit 7 reverses the data layout;
/// - `params[6..8]` seed the perturbation of the values (0 keeps them);
/// - `params[7] % 8` spaces of header padding.
fn derive(params: &[u8; MERGE_PARAMS], h: &Header, file: &[u8]) -> Vec<u8> {
    let base = h.data_start() as usize;
    let mut tensors: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = h
        .tensors
        .iter()
        .map(|t| {
            let data = file[base + t.start as usize..base + t.end as usize].to_vec();
            (t.name.clone(), t.dtype, t.shape.clone(), data)
        })
        .collect();
    let edits = params[4];
    if !tensors.is_empty() {
        let k = params[5] as usize % tensors.len();
        let t = &mut tensors[k];
        if edits & 1 != 0 {
            t.0.push('\'');
        }
        if edits & 2 != 0 {
            t.2.push(1);
        }
        if edits & 4 != 0 {
            t.1 = match t.1 {
                Dtype::BF16 => Dtype::I16,
                Dtype::I16 | Dtype::U16 | Dtype::F16 => Dtype::BF16,
                Dtype::U8 => Dtype::I8,
                Dtype::I32 => Dtype::U32,
                Dtype::U32 | Dtype::F32 => Dtype::I32,
                Dtype::I64 => Dtype::U64,
                Dtype::U64 | Dtype::F64 => Dtype::I64,
                _ => Dtype::U8,
            };
        }
        if edits & 8 != 0 {
            tensors.remove(k);
        }
    }
    if edits & 16 != 0 {
        let n = params[5] as u64 % 5;
        tensors.push(("extra".into(), Dtype::U8, vec![n], vec![7; n as usize]));
    }
    if params[5] & 0x80 != 0 {
        tensors.reverse();
    }
    let mut state = u32::from(params[6]) << 8 | u32::from(params[7]);
    if state != 0 {
        for t in &mut tensors {
            for byte in &mut t.3 {
                // xorshift32: cheap, deterministic, hits every bit pattern.
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                *byte ^= state as u8;
            }
        }
    }

    let mut json = serde_json::Map::new();
    if !h.metadata.is_empty() {
        let meta: serde_json::Map<_, _> = h
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        json.insert("__metadata__".into(), meta.into());
    }
    let mut at = 0;
    for (name, dtype, shape, data) in &tensors {
        let end = at + data.len() as u64;
        json.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut text = serde_json::to_vec(&json).expect("serializing JSON cannot fail");
    text.resize(text.len() + params[7] as usize % 8, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    for (_, _, _, data) in &tensors {
        out.extend_from_slice(data);
    }
    out
}

/// `data` cut at every `sep`; always at least one part.
fn split<'a>(data: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(sep.len()).position(|w| w == sep) {
        parts.push(&rest[..at]);
        rest = &rest[at + sep.len()..];
    }
    parts.push(rest);
    parts
}

/// A fresh directory on tmpfs where there is one (`$MERGESTREAM_FUZZ_DIR` overrides).
fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("MERGESTREAM_FUZZ_DIR")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("mergestream-fuzz-")
        .tempdir_in(base)
        .expect("a scratch directory")
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
