//! PyTorch checkpoints through `format::torch`: files written by real `torch.save` (committed
//! under `tests/fixtures/torch/`, see `tests/python/make_torch_fixtures.py` and its MANIFEST.json)
//! must give, at the offsets the reader reports, exactly the bytes of the same tensors written by
//! `safetensors.torch.save_file` (read here with the `safetensors` crate, an independent reader).
//! Refused, malicious and malformed files must fail with their specific error variant; malicious
//! pickles must never run (their marker files never appear), while Python's own `pickle.load`
//! does run them.
//!
//! Why committed fixtures rather than torch in the test venv: torch from PyPI is a 5.3 GB install
//! with its CUDA wheels (73 s here on a fast mirror with `--no-cache-dir`, minutes elsewhere),
//! for 1.8 MB of files whose bytes would only differ by a random serialization id. The
//! generator and the versions it ran with are recorded (MANIFEST.json, checked below), every
//! file was verified by the generator with `torch.load`, and the malicious ones are re-checked
//! here with plain Python on every run. Regenerate with
//! `/tmp/mkvenv/bin/python tests/python/make_torch_fixtures.py` (any Python with torch,
//! safetensors and huggingface_hub).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use mergestream::format::index;
use mergestream::format::pickle::{self, PickleError};
use mergestream::format::torch::{self, TorchError, TorchShard};
use mergestream::format::zip::ZipError;
use mergestream::format::Dtype;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(rel)
}

fn read(path: &Path) -> Result<TorchShard, TorchError> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = file.metadata().unwrap().len();
    torch::read(path, &file, len)
}

fn read_ok(path: &Path) -> TorchShard {
    read(path).unwrap_or_else(|e| panic!("{e}"))
}

/// A tensor as the reference safetensors file has it.
struct Reference {
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

fn reference(case: &str) -> BTreeMap<String, Reference> {
    let bytes = std::fs::read(fixture(&format!("reference/{case}.safetensors"))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = Dtype::parse(&format!("{:?}", view.dtype())).expect("a known dtype");
            let r = Reference {
                dtype,
                shape: view.shape().iter().map(|&d| d as u64).collect(),
                data: view.data().to_vec(),
            };
            (name, r)
        })
        .collect()
}

/// Reads `[start, end)` of `file` in chunks of `chunk` bytes with `read_exact_at`, as a shard
/// fills a pipeline buffer.
fn read_chunked(file: &File, start: u64, end: u64, chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut buf = vec![0u8; chunk];
    let mut at = start;
    while at < end {
        let n = chunk.min((end - at) as usize);
        file.read_exact_at(&mut buf[..n], at).unwrap();
        out.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    out
}

/// Checks every tensor of `shards` (file, parsed) against the reference `case`: same names,
/// dtypes, shapes, and bytes at the reported offsets.
fn check_against_reference(shards: &[(PathBuf, TorchShard)], case: &str) {
    let want = reference(case);
    let mut seen = BTreeSet::new();
    for (path, shard) in shards {
        let file = File::open(path).unwrap();
        for t in &shard.tensors {
            let i = &t.info;
            let r = want
                .get(&i.name)
                .unwrap_or_else(|| panic!("{case}: tensor '{}' not in the reference", i.name));
            assert_eq!(
                (i.dtype, &i.shape),
                (r.dtype, &r.shape),
                "{case}: '{}'",
                i.name
            );
            let got = read_chunked(&file, i.start, i.end, 1 << 20);
            assert!(got == r.data, "{case}: tensor '{}' bytes differ", i.name);
            assert!(seen.insert(i.name.clone()), "'{}' in two shards", i.name);
        }
    }
    assert_eq!(
        seen,
        want.keys().cloned().collect::<BTreeSet<_>>(),
        "{case}: tensor sets"
    );
}

#[test]
fn single_file_gives_the_bytes_torch_saved() {
    let path = fixture("single/pytorch_model.bin");
    let shard = read_ok(&path);
    assert_eq!(shard.archive, "pytorch_model");
    assert_eq!(shard.version, 3);
    check_against_reference(&[(path, shard.clone())], "single");

    let get = |name: &str| {
        shard
            .tensors
            .iter()
            .find(|t| t.info.name == name)
            .unwrap_or_else(|| panic!("no '{name}'"))
    };
    // Tied weights: one storage, one byte range.
    let (embed, head) = (get("embed.weight"), get("lm_head.weight"));
    assert_eq!(embed.member, head.member);
    assert_eq!(
        (embed.info.start, embed.info.end),
        (head.info.start, head.info.end)
    );
    // Two views of one storage at different offsets.
    let (rows, flat) = (get("view.rows"), get("view.flat"));
    assert_eq!(rows.member, flat.member);
    assert_eq!(rows.info.start - flat.info.start, (24 - 5) * 4);
    // The state dict's order is kept (the module's parameters first, then buffers).
    let names: Vec<&str> = shard.tensors.iter().map(|t| t.info.name.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["position_ids", "embed.weight", "q_proj.weight"]
    );
    assert_eq!(names.last(), Some(&"big"));
}

#[test]
fn protocol_4_pickles_read_too() {
    let path = fixture("protocol4/pytorch_model.bin");
    let shard = read_ok(&path);
    check_against_reference(&[(path, shard)], "protocol4");
}

#[test]
fn sharded_checkpoint_through_its_index() {
    let dir = fixture("sharded");
    let index_path = dir.join(torch::INDEX_FILE);
    let idx = index::parse(&std::fs::read(&index_path).unwrap()).unwrap();
    let names = idx.shards();
    assert_eq!(
        names,
        [
            "pytorch_model-00001-of-00003.bin",
            "pytorch_model-00002-of-00003.bin",
            "pytorch_model-00003-of-00003.bin"
        ]
    );
    let mut shards = Vec::new();
    let mut found = BTreeMap::new();
    for name in &names {
        let path = dir.join(name);
        let shard = read_ok(&path);
        for t in &shard.tensors {
            found.insert(t.info.name.clone(), name.clone());
        }
        shards.push((path, shard));
    }
    let listed: BTreeMap<String, String> = idx.weight_map.into_iter().collect();
    assert_eq!(found, listed, "the index and the shards agree");
    check_against_reference(&shards, "sharded");
}

#[test]
fn tensors_stream_in_256_kib_chunks() {
    let path = fixture("single/pytorch_model.bin");
    let shard = read_ok(&path);
    let want = reference("single");
    let file = File::open(&path).unwrap();
    const CHUNK: usize = 256 << 10;
    let mut multi_chunk = 0;
    for t in &shard.tensors {
        let got = read_chunked(&file, t.info.start, t.info.end, CHUNK);
        assert!(got == want[&t.info.name].data, "'{}'", t.info.name);
        if t.info.end - t.info.start > 2 * CHUNK as u64 {
            multi_chunk += 1;
        }
    }
    assert!(multi_chunk > 0, "no tensor spans three chunks");
}

#[test]
fn zip64_checkpoint_over_4_gib() {
    #[derive(serde::Deserialize)]
    struct Layout {
        file_len: u64,
        tail_offset: u64,
        zeros_start: u64,
    }
    let layout: Layout =
        serde_json::from_slice(&std::fs::read(fixture("zip64/layout.json")).unwrap()).unwrap();
    // Restore the file torch wrote: its all-zero 4.4 GB stretch becomes a hole.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pytorch_model.bin");
    let file = File::create(&path).unwrap();
    let head = std::fs::read(fixture("zip64/head.bin")).unwrap();
    assert_eq!(head.len() as u64, layout.zeros_start);
    file.write_all_at(&head, 0).unwrap();
    file.write_all_at(
        &std::fs::read(fixture("zip64/tail.bin")).unwrap(),
        layout.tail_offset,
    )
    .unwrap();
    file.set_len(layout.file_len).unwrap();
    drop(file);

    let shard = read_ok(&path);
    let zeros = &shard.tensors[1].info;
    assert_eq!(
        (zeros.name.as_str(), zeros.dtype, &zeros.shape[..]),
        ("zeros", Dtype::U8, &[4_400_000_000u64][..])
    );
    assert_eq!(
        (zeros.start, zeros.end),
        (layout.zeros_start, layout.tail_offset)
    );
    let after = &shard.tensors[2].info;
    assert!(after.start > 1 << 32, "a tensor past 4 GiB");
    let rest = TorchShard {
        tensors: vec![shard.tensors[0].clone(), shard.tensors[2].clone()],
        ..shard
    };
    check_against_reference(&[(path, rest)], "zip64");
}

/// The ZIP64 records of the real 4.4 GB checkpoint, tampered with one at a time, read through
/// `read_with` (head, zeros, tail) without a file.
#[test]
fn zip64_records_are_cross_checked() {
    use mergestream::format::zip::Archive;
    #[derive(serde::Deserialize)]
    struct Layout {
        file_len: u64,
        tail_offset: u64,
    }
    let layout: Layout =
        serde_json::from_slice(&std::fs::read(fixture("zip64/layout.json")).unwrap()).unwrap();
    let head = std::fs::read(fixture("zip64/head.bin")).unwrap();
    let tail = std::fs::read(fixture("zip64/tail.bin")).unwrap();
    let read = |tail: &[u8]| {
        Archive::read_with(layout.file_len, |buf, at| {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = at + i as u64;
                *b = if at < head.len() as u64 {
                    head[at as usize]
                } else if at >= layout.tail_offset {
                    tail[(at - layout.tail_offset) as usize]
                } else {
                    0
                };
            }
            Ok(())
        })
    };
    let archive = read(&tail).unwrap();
    assert_eq!(
        archive.get("pytorch_model/data/1").unwrap().len,
        4_400_000_000
    );
    let find = |sig: &[u8]| tail.windows(4).rposition(|w| w == sig).unwrap();
    let (record, locator) = (find(b"PK\x06\x06"), find(b"PK\x06\x07"));

    let mut t = tail.clone();
    t[record + 24] += 1; // entries on this disk
    t[record + 32] += 1; // and in total
    assert!(matches!(
        read(&t),
        Err(ZipError::Zip64Mismatch {
            field: "number of members"
        })
    ));
    let mut t = tail.clone();
    t[locator + 8] ^= 0x40; // where the ZIP64 record is
    assert!(matches!(read(&t), Err(ZipError::BadSignature { .. })));
    let mut t = tail.clone();
    t[record + 48] ^= 1; // central directory offset
    assert!(matches!(
        read(&t),
        Err(ZipError::Zip64Mismatch { .. } | ZipError::DirectoryMisplaced { .. })
    ));
}

/// Unwraps a pickle refusal.
fn pickle_error(e: TorchError) -> PickleError {
    match e {
        TorchError::Pickle { source, .. } => *source,
        other => panic!("expected a pickle error, got: {other}"),
    }
}

#[test]
fn unsupported_checkpoints_are_refused_with_their_reason() {
    let err = |rel: &str| read(&fixture(rel)).expect_err(rel);
    assert!(matches!(
        pickle_error(err("refused/noncontiguous.bin")),
        PickleError::NotContiguous { tensor, strides, .. } if tensor == "transposed" && strides == [1, 4]
    ));
    assert!(matches!(
        err("refused/legacy.bin"),
        TorchError::LegacyFormat { .. }
    ));
    assert!(matches!(
        err("refused/bigendian.bin"),
        TorchError::BigEndian { .. }
    ));
    assert!(matches!(
        pickle_error(err("refused/complex.bin")),
        PickleError::UnsupportedType { global, .. } if global == "torch.ComplexFloatStorage"
    ));
    assert!(matches!(
        pickle_error(err("refused/nested.bin")),
        PickleError::NotATensor { name, found: "dict" } if name == "model"
    ));
    assert!(matches!(
        err("refused/deflated.bin"),
        TorchError::CompressedStorage { member, method: 8, .. } if member.starts_with("deflated/data/")
    ));
    // Every message names the file.
    for rel in ["refused/legacy.bin", "refused/nested.bin"] {
        assert!(err(rel).to_string().contains(rel), "{rel}");
    }
}

/// The malicious fixtures: (file stem, what the refusal names).
const MALICIOUS: [(&str, &str); 7] = [
    ("os-system", "os.system"),
    ("posix-system", "posix.system"),
    ("builtin-eval", "__builtin__.eval"),
    ("builtins-eval-protocol4", "builtins.eval"),
    ("subprocess", "subprocess.call"),
    ("hidden-in-tensor", "posix.system"),
    ("inst-opcode", "INST"),
];

fn marker(case: &str) -> String {
    format!("mergestream-pwned-{case}")
}

#[test]
fn malicious_pickles_are_refused_and_never_run() {
    for (case, named) in MALICIOUS {
        let e = pickle_error(read(&fixture(&format!("malicious/{case}.bin"))).expect_err(case));
        match e {
            PickleError::ForbiddenGlobal { ref global, .. } => assert_eq!(global, named, "{case}"),
            PickleError::UnsupportedOpcode { opcode: b'i', .. } => assert_eq!(named, "INST"),
            other => panic!("{case}: unexpected refusal: {other}"),
        }
        assert!(e.to_string().contains(named), "{case}: {e}");
        // The payloads write their marker into the current directory when run.
        assert!(
            !Path::new(&marker(case)).exists(),
            "{case}: the payload ran"
        );
    }
}

/// The test venv's python (`$MERGESTREAM_TEST_PYTHON`, else what `scripts/test-env.sh` prepares).
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MERGESTREAM_TEST_PYTHON") {
        return p.into();
    }
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-env.sh"))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The fixtures are live: Python's pickle runs each payload (so the refusal above matters).
#[test]
fn malicious_pickles_do_run_under_python_pickle() {
    let py = python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/run_pickle.py");
    for (case, _) in MALICIOUS {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(&py)
            .arg(script)
            .arg(fixture(&format!("malicious/{case}.bin")))
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            dir.path().join(marker(case)).exists(),
            "{case}: pickle.load did not run the payload"
        );
    }
}

/// MANIFEST.json lists every fixture with its SHA-256 (written by the generator), and the files
/// are those: nothing was edited by hand since.
#[test]
fn fixtures_are_what_the_generator_wrote() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("MANIFEST.json")).unwrap()).unwrap();
    assert!(manifest["torch"].as_str().unwrap().starts_with("2."));
    let listed = manifest["sha256"].as_object().unwrap();
    let mut on_disk = BTreeSet::new();
    let root = fixture("");
    let mut dirs = vec![root.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().unwrap() != "MANIFEST.json" {
                on_disk.insert(
                    p.strip_prefix(&root)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    assert_eq!(on_disk, listed.keys().cloned().collect::<BTreeSet<_>>());
    for (rel, hash) in listed {
        let got = sha256_hex(&fixture(rel));
        assert_eq!(&got, hash.as_str().unwrap(), "{rel}");
    }
}

/// SHA-256 of `path`, by coreutils' `sha256sum`.
fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Hand-built archives and pickles for the malformed-input cases, each differing from a valid
/// `torch.save`-shaped file in one way. [`built_checkpoints_parse`] shows the valid ones read.
pub(crate) mod build {
    use mergestream::format::zip::crc32;

    /// A protocol 2 pickle, opcode by opcode.
    pub struct Pickle(pub Vec<u8>);

    impl Pickle {
        pub fn new() -> Pickle {
            Pickle(vec![0x80, 2])
        }
        pub fn op(mut self, bytes: &[u8]) -> Pickle {
            self.0.extend_from_slice(bytes);
            self
        }
        pub fn global(self, module: &str, name: &str) -> Pickle {
            self.op(format!("c{module}\n{name}\n").as_bytes())
        }
        pub fn str(self, s: &str) -> Pickle {
            let mut op = vec![b'X'];
            op.extend_from_slice(&(s.len() as u32).to_le_bytes());
            op.extend_from_slice(s.as_bytes());
            self.op(&op)
        }
        pub fn int(self, v: i64) -> Pickle {
            if (0..256).contains(&v) {
                self.op(&[b'K', v as u8])
            } else if let Ok(v) = i32::try_from(v) {
                self.op(&[&[b'J'][..], &v.to_le_bytes()].concat())
            } else {
                self.op(&[&[0x8a, 8][..], &v.to_le_bytes()].concat())
            }
        }
        pub fn ints(self, vs: &[i64]) -> Pickle {
            vs.iter().fold(self.op(b"("), |p, &v| p.int(v)).op(b"t")
        }
    }

    /// One tensor entry as `torch.save` writes it.
    pub struct T<'a> {
        pub name: &'a str,
        pub storage: &'a str,
        pub key: &'a str,
        pub numel: i64,
        pub offset: i64,
        pub shape: Vec<i64>,
        pub strides: Vec<i64>,
    }

    impl<'a> T<'a> {
        /// A contiguous F32 tensor filling storage `key`.
        pub fn f32(name: &'a str, key: &'a str, shape: &[i64]) -> T<'a> {
            T {
                name,
                storage: "FloatStorage",
                key,
                numel: shape.iter().fold(1, |n: i64, &d| n.wrapping_mul(d)),
                offset: 0,
                shape: shape.to_vec(),
                strides: contiguous(shape),
            }
        }
    }

    pub fn contiguous(shape: &[i64]) -> Vec<i64> {
        let mut strides = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1].wrapping_mul(shape[i + 1]);
        }
        strides
    }

    /// `{name: _rebuild_tensor_v2(storage, offset, shape, strides, False, OrderedDict())}`.
    pub fn state_dict(tensors: &[T]) -> Vec<u8> {
        let mut p = Pickle::new().op(b"}(");
        for t in tensors {
            p = p
                .str(t.name)
                .global("torch._utils", "_rebuild_tensor_v2")
                .op(b"((")
                .str("storage")
                .global("torch", t.storage)
                .str(t.key)
                .str("cpu")
                .int(t.numel)
                .op(b"tQ")
                .int(t.offset)
                .ints(&t.shape)
                .ints(&t.strides)
                .op(&[0x89])
                .global("collections", "OrderedDict")
                .op(b")RtR");
        }
        p.op(b"u.").0
    }

    /// A member to write: name, data, compression method.
    pub struct Entry {
        pub name: String,
        pub data: Vec<u8>,
        pub method: u16,
    }

    pub fn entry(name: &str, data: &[u8]) -> Entry {
        Entry {
            name: name.into(),
            data: data.to_vec(),
            method: 0,
        }
    }

    pub fn local_header(name: &str, data: &[u8], method: u16) -> Vec<u8> {
        let mut h = 0x0403_4b50u32.to_le_bytes().to_vec();
        h.extend_from_slice(&20u16.to_le_bytes()); // version needed
        h.extend_from_slice(&0x0800u16.to_le_bytes()); // flags: UTF-8 names
        h.extend_from_slice(&method.to_le_bytes());
        h.extend_from_slice(&[0; 4]); // time, date
        h.extend_from_slice(&crc32(data).to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&(data.len() as u32).to_le_bytes());
        h.extend_from_slice(&(name.len() as u16).to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(name.as_bytes());
        h
    }

    pub fn central_entry(name: &str, data: &[u8], method: u16, offset: u32) -> Vec<u8> {
        let mut c = 0x0201_4b50u32.to_le_bytes().to_vec();
        c.extend_from_slice(&20u16.to_le_bytes()); // version made by
        c.extend_from_slice(&local_header(name, data, method)[4..30]);
        c.extend_from_slice(&[0; 2 + 2 + 2 + 4]); // comment len, disk, internal, external
        c.extend_from_slice(&offset.to_le_bytes());
        c.extend_from_slice(name.as_bytes());
        c
    }

    pub fn end_record(entries: usize, directory_len: usize, directory_offset: usize) -> Vec<u8> {
        let mut e = 0x0605_4b50u32.to_le_bytes().to_vec();
        e.extend_from_slice(&[0; 4]); // disks
        e.extend_from_slice(&(entries as u16).to_le_bytes());
        e.extend_from_slice(&(entries as u16).to_le_bytes());
        e.extend_from_slice(&(directory_len as u32).to_le_bytes());
        e.extend_from_slice(&(directory_offset as u32).to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes()); // comment
        e
    }

    /// A plain ZIP of `entries`, local headers and data back to back, then the directory.
    pub fn zip(entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut dir = Vec::new();
        for e in entries {
            dir.extend(central_entry(&e.name, &e.data, e.method, out.len() as u32));
            out.extend(local_header(&e.name, &e.data, e.method));
            out.extend_from_slice(&e.data);
        }
        let at = out.len();
        out.extend_from_slice(&dir);
        out.extend(end_record(entries.len(), dir.len(), at));
        out
    }

    /// The members of a checkpoint: `archive/data.pkl`, `byteorder`, `data/<key>`…, `version`.
    pub fn members(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<Entry> {
        let mut m = vec![
            entry("archive/data.pkl", pkl),
            entry("archive/byteorder", b"little"),
        ];
        for (key, data) in storages {
            m.push(entry(&format!("archive/data/{key}"), data));
        }
        m.push(entry("archive/version", b"3\n"));
        m
    }

    pub fn checkpoint(pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
        zip(&members(pkl, storages))
    }

    /// `n` bytes counting up from `seed`.
    pub fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| seed.wrapping_add(i as u8)).collect()
    }
}

use build::{bytes, checkpoint, entry, members, state_dict, zip, T};

fn parse(bytes: &[u8]) -> Result<TorchShard, TorchError> {
    torch::parse_bytes(Path::new("built.bin"), bytes)
}

fn zip_error(e: TorchError) -> ZipError {
    match e {
        TorchError::Zip { source, .. } => source,
        other => panic!("expected a zip error, got: {other}"),
    }
}

/// Two F32 tensors in two storages, the second at an offset of 2 elements.
fn good_pickle() -> Vec<u8> {
    state_dict(&[
        T::f32("a", "0", &[2, 3]),
        T {
            offset: 2,
            numel: 6,
            ..T::f32("b", "1", &[4])
        },
    ])
}

fn good_storages() -> Vec<(&'static str, Vec<u8>)> {
    vec![("0", bytes(24, 1)), ("1", bytes(24, 101))]
}

/// The positive control for everything below: the builders make files the reader accepts, with
/// the bytes where they were put.
#[test]
fn built_checkpoints_parse() {
    let file = checkpoint(&good_pickle(), &good_storages());
    let shard = parse(&file).unwrap();
    assert_eq!(shard.archive, "archive");
    let [a, b] = &shard.tensors[..] else {
        panic!("two tensors")
    };
    assert_eq!(
        (a.info.dtype, &a.info.shape[..]),
        (Dtype::F32, &[2u64, 3][..])
    );
    assert_eq!(
        &file[a.info.start as usize..a.info.end as usize],
        bytes(24, 1)
    );
    assert_eq!(
        &file[b.info.start as usize..b.info.end as usize],
        &bytes(24, 101)[8..24]
    );
}

#[test]
fn truncated_archives_are_refused() {
    let file = checkpoint(&good_pickle(), &good_storages());
    for cut in 0..file.len() {
        let e = parse(&file[..cut]).expect_err("a truncated archive");
        match cut {
            0..=3 => assert!(matches!(e, TorchError::NotAZip { .. }), "{cut}: {e}"),
            4..=21 => assert!(matches!(zip_error(e), ZipError::TooShort { .. }), "{cut}"),
            _ => assert!(
                matches!(zip_error(e), ZipError::NoEndOfCentralDirectory { .. }),
                "{cut}"
            ),
        }
    }
    // A real torch.save file, cut anywhere, is refused as a ZIP problem and never panics.
    let real = std::fs::read(fixture("sharded/pytorch_model-00002-of-00003.bin")).unwrap();
    for cut in 4..real.len() {
        assert!(
            matches!(parse(&real[..cut]), Err(TorchError::Zip { .. })),
            "{cut}"
        );
    }
}

#[test]
fn truncated_pickles_are_refused() {
    // The real data.pkl of a torch.save file, cut at every byte.
    let real = std::fs::read(fixture("single/pytorch_model.bin")).unwrap();
    let archive = mergestream::format::zip::Archive::parse_bytes(&real).unwrap();
    let member = archive.get("pytorch_model/data.pkl").unwrap();
    let pkl = archive
        .read_member(
            member,
            1 << 20,
            mergestream::format::zip::slice_reader(&real),
        )
        .unwrap();
    assert!(pickle::parse(&pkl).is_ok());
    for cut in 0..pkl.len() {
        assert!(
            matches!(
                pickle::parse(&pkl[..cut]),
                Err(PickleError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    // And inside an archive.
    let pkl = good_pickle();
    let e = parse(&checkpoint(&pkl[..pkl.len() / 2], &good_storages())).unwrap_err();
    assert!(matches!(pickle_error(e), PickleError::Truncated { .. }));
}

#[test]
fn oversized_pickles_are_refused() {
    let big = vec![b'N'; pickle::MAX_PICKLE_LEN as usize + 1];
    assert!(matches!(
        pickle::parse(&big),
        Err(PickleError::TooLarge { len, .. }) if len == pickle::MAX_PICKLE_LEN + 1
    ));
    let e = parse(&checkpoint(&big, &[])).unwrap_err();
    assert!(
        matches!(e, TorchError::PickleTooLarge { len, .. } if len == pickle::MAX_PICKLE_LEN + 1)
    );
}

#[test]
fn bogus_storage_offsets_and_sizes_are_refused() {
    let one = |t: T| parse(&checkpoint(&state_dict(&[t]), &[("0", bytes(24, 0))])).unwrap_err();
    let e = one(T {
        offset: 3,
        numel: 6,
        ..T::f32("w", "0", &[2, 2])
    });
    assert!(matches!(
        pickle_error(e),
        PickleError::OutOfStorage { tensor, storage, start: 12, end: 28, storage_len: 24 }
            if tensor == "w" && storage == "0"
    ));
    let e = one(T {
        offset: -1,
        ..T::f32("w", "0", &[2])
    });
    assert!(matches!(
        pickle_error(e),
        PickleError::BadStorageOffset { offset: -1, .. }
    ));
    // The storage member is smaller than data.pkl declares.
    let e = one(T {
        numel: 7,
        ..T::f32("w", "0", &[7])
    });
    assert!(matches!(
        e,
        TorchError::StorageSizeMismatch { member, expected: 28, actual: 24, .. } if member == "archive/data/0"
    ));
}

#[test]
fn missing_storage_member_is_refused() {
    let pkl = state_dict(&[T::f32("a", "0", &[2]), T::f32("b", "1", &[2])]);
    let e = parse(&checkpoint(&pkl, &[("0", bytes(8, 0))])).unwrap_err();
    assert!(matches!(
        e,
        TorchError::StorageMissing { tensor, member, .. } if tensor == "b" && member == "archive/data/1"
    ));
}

#[test]
fn huge_and_strange_dimensions_are_refused() {
    let one = |t: T| {
        pickle_error(parse(&checkpoint(&state_dict(&[t]), &[("0", bytes(16, 0))])).unwrap_err())
    };
    let huge = 1i64 << 40;
    assert!(matches!(
        one(T {
            numel: 4,
            ..T::f32("w", "0", &[huge, huge])
        }),
        PickleError::SizeOverflow { tensor, .. } if tensor == "w"
    ));
    assert!(matches!(
        one(T {
            numel: 4,
            ..T::f32("w", "0", &[huge])
        }),
        PickleError::OutOfStorage { end, .. } if end == (huge as u64) * 4
    ));
    assert!(matches!(
        one(T {
            numel: 4,
            ..T::f32("w", "0", &[1; 33])
        }),
        PickleError::TooManyDims { dims: 33, .. }
    ));
    assert!(matches!(
        one(T {
            numel: 4,
            ..T::f32("w", "0", &[-2, -2])
        }),
        PickleError::BadShape { .. }
    ));
    assert!(matches!(
        one(T {
            strides: vec![1, 2],
            ..T::f32("w", "0", &[2, 2])
        }),
        PickleError::NotContiguous { tensor, expected, .. } if tensor == "w" && expected == [2, 1]
    ));
    assert!(matches!(
        one(T {
            strides: vec![1],
            ..T::f32("w", "0", &[2, 2])
        }),
        PickleError::BadStrides { .. }
    ));
}

#[test]
fn overlapping_members_are_refused() {
    use build::{central_entry, end_record, local_header};
    // Member A's data is member B's local header and data: both local headers are valid, and
    // the directory lists both.
    let b = local_header("archive/b", b"xy", 0);
    let b_whole = [b.clone(), b"xy".to_vec()].concat();
    let a = local_header("archive/a", &b_whole, 0);
    let mut file = [a.clone(), b_whole.clone()].concat();
    let dir = [
        central_entry("archive/a", &b_whole, 0, 0),
        central_entry("archive/b", b"xy", 0, a.len() as u32),
    ]
    .concat();
    let at = file.len();
    file.extend_from_slice(&dir);
    file.extend(end_record(2, dir.len(), at));
    let e = zip_error(parse(&file).unwrap_err());
    assert!(
        matches!(&e, ZipError::Overlap { first, second } if first == "archive/a" && second == "archive/b"),
        "{e}"
    );
}

#[test]
fn broken_archive_structures_are_refused() {
    let pkl = good_pickle();
    let zerr = |file: &[u8]| zip_error(parse(file).unwrap_err());

    let mut m = members(&pkl, &good_storages());
    m.push(entry("archive/../evil", b"x"));
    assert!(matches!(zerr(&zip(&m)), ZipError::UnsafeName { name } if name == "archive/../evil"));

    let mut m = members(&pkl, &good_storages());
    m.push(entry("archive/data/0", b"x"));
    assert!(matches!(zerr(&zip(&m)), ZipError::DuplicateName { name } if name == "archive/data/0"));

    // A local header's name differs from the directory's.
    let mut file = checkpoint(&pkl, &good_storages());
    file[30 + "archive/".len()] = b'D';
    assert!(matches!(
        zerr(&file),
        ZipError::LocalHeaderMismatch { member, field: "name" } if member == "archive/data.pkl"
    ));

    // data.pkl's bytes no longer match their CRC-32.
    let mut file = checkpoint(&pkl, &good_storages());
    file[30 + "archive/data.pkl".len() + 5] ^= 1;
    assert!(matches!(zerr(&file), ZipError::Crc { member, .. } if member == "archive/data.pkl"));

    // A real torch.save file's data descriptor disagrees with the directory.
    let mut real = std::fs::read(fixture("sharded/pytorch_model-00002-of-00003.bin")).unwrap();
    let archive = mergestream::format::zip::Archive::parse_bytes(&real).unwrap();
    let end = archive
        .get("pytorch_model-00002-of-00003/data/0")
        .unwrap()
        .data_end() as usize;
    assert_eq!(&real[end..end + 4], b"PK\x07\x08");
    real[end + 4] ^= 1;
    assert!(matches!(
        zerr(&real),
        ZipError::DescriptorMismatch { member } if member == "pytorch_model-00002-of-00003/data/0"
    ));
}

#[test]
fn unaccounted_bytes_are_refused() {
    use build::{central_entry, end_record, local_header};
    let (a, b) = (
        local_header("archive/a", b"1", 0),
        local_header("archive/b", b"2", 0),
    );
    let mut file = [a.clone(), b"1".to_vec(), b"junk".to_vec()].concat();
    let b_at = file.len();
    file.extend([b.clone(), b"2".to_vec()].concat());
    let dir = [
        central_entry("archive/a", b"1", 0, 0),
        central_entry("archive/b", b"2", 0, b_at as u32),
    ]
    .concat();
    let at = file.len();
    file.extend_from_slice(&dir);
    file.extend(end_record(2, dir.len(), at));
    let e = zip_error(parse(&file).unwrap_err());
    let junk_at = (a.len() + 1) as u64;
    assert!(
        matches!(e, ZipError::UnaccountedBytes { start, end } if start == junk_at && end == junk_at + 4),
        "{e}"
    );
}

#[test]
fn checkpoint_records_are_checked() {
    let pkl = good_pickle();
    let with = |f: &dyn Fn(&mut Vec<build::Entry>)| {
        let mut m = members(&pkl, &good_storages());
        f(&mut m);
        parse(&zip(&m)).unwrap_err()
    };
    let set = |name: &'static str, data: &'static [u8]| {
        move |m: &mut Vec<build::Entry>| {
            m.iter_mut().find(|e| e.name == name).unwrap().data = data.to_vec()
        }
    };
    assert!(matches!(
        with(&set("archive/version", b"11\n")),
        TorchError::UnsupportedVersion { found, .. } if found == "11"
    ));
    assert!(matches!(
        with(&set("archive/version", b"three")),
        TorchError::UnsupportedVersion { .. }
    ));
    assert!(matches!(
        with(&|m| m.retain(|e| e.name != "archive/version")),
        TorchError::NoVersion { .. }
    ));
    assert!(matches!(
        with(&set("archive/byteorder", b"middle")),
        TorchError::BadByteorder { found, .. } if found == "middle"
    ));
    assert!(matches!(
        with(&|m| m.retain(|e| e.name != "archive/data.pkl")),
        TorchError::NoDataPkl { .. }
    ));
    assert!(matches!(
        with(&|m| m.push(entry("other/file", b"x"))),
        TorchError::MemberOutsideArchive { member, .. } if member == "other/file"
    ));
    assert!(matches!(
        with(&|m| m[0].method = 8),
        TorchError::CompressedRecord { member, method: 8, .. } if member == "archive/data.pkl"
    ));
    assert!(matches!(
        with(&|m| m.iter_mut().find(|e| e.name == "archive/data/1").unwrap().method = 8),
        TorchError::CompressedStorage { member, .. } if member == "archive/data/1"
    ));
    assert!(matches!(
        with(&|m| m.insert(0, entry("loose", b"x"))),
        TorchError::NoArchiveDirectory { member, .. } if member == "loose"
    ));
    assert!(
        matches!(parse(&zip(&[])), Err(TorchError::NotAZip { .. })),
        "an empty archive"
    );
    // Without a byteorder record (older writers), little-endian is assumed.
    let mut m = members(&pkl, &good_storages());
    m.retain(|e| e.name != "archive/byteorder");
    assert!(parse(&zip(&m)).is_ok());
    assert!(matches!(
        parse(b"not a checkpoint at all"),
        Err(TorchError::NotAZip { .. })
    ));
}
