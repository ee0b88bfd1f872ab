//! Malformed inputs: every one must be refused by the library with the error variant that says
//! what is wrong (matched on its fields, not its text), and by the binary with that error's exit
//! code (2 for bad input or I/O, 1 for models that do not match) and exactly its message, naming
//! the offending file (and tensor); and leave no output behind — whether `--out` did not exist
//! (the precheck creates nothing) or existed empty (plan failures come before the output
//! directory is opened). Valid edge cases must merge and match the independent reference.
//! PyTorch checkpoints (`.bin`, built as `torch.save` lays them out, or written by it) are given
//! both as a model directory's `pytorch_model.bin` and as a file: truncated archives and pickles,
//! pickles over the size limit or building more than the reader may hold, malicious pickles
//! (refused naming the global they would import; their payload never runs), unsupported ones,
//! missing storages, and a PyTorch index that disagrees with its shards.

use std::path::{Path, PathBuf};

use mergestream::error::{
    HeaderError as H, IndexError as I, Mismatch, MismatchKind, ModelError as M,
};
use mergestream::format::pickle::{PickleError as P, MAX_HELD_BYTES, MAX_PICKLE_LEN};
use mergestream::format::torch::TorchError as T;
use mergestream::format::zip::ZipError as Z;
use mergestream::format::Dtype;
use mergestream::Error;

use crate::common::*;

/// A safetensors file: the 8-byte length, `json` verbatim, then `data`.
fn raw(json: impl AsRef<[u8]>, data: &[u8]) -> Vec<u8> {
    let json = json.as_ref();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json);
    out.extend_from_slice(data);
    out
}

fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => 1,
        "BF16" | "F16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        _ => 8,
    }
}

/// A valid file of `tensors` (name, dtype, shape), laid out in the order given, with data bytes
/// from a simple generator seeded by `seed` (every bit pattern is a valid value to merge).
fn st(tensors: &[(&str, &str, &[u64])], seed: u8) -> Vec<u8> {
    let mut json = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape) in tensors {
        let n = shape.iter().product::<u64>() * dtype_size(dtype);
        let start = data.len() as u64;
        for i in 0..n {
            // Small exponents keep BF16 values finite, so the test compares real arithmetic.
            let byte = (i as u8).wrapping_mul(31).wrapping_add(seed);
            data.push(if i % 2 == 1 {
                0x3E | (byte & 0x81)
            } else {
                byte
            });
        }
        json.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, start + n]}),
        );
    }
    raw(serde_json::to_vec(&json).unwrap(), &data)
}

const GOOD: &[(&str, &str, &[u64])] = &[("w", "BF16", &[2, 2]), ("b", "BF16", &[2])];

/// A scratch area holding the inputs of one case.
struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        Case { dir: tempdir() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `bytes` at `rel` (parents created) and returns its path.
    fn file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// A valid one-file model directory `rel` holding `tensors`.
    fn model(&self, rel: &str, tensors: &[(&str, &str, &[u64])], seed: u8) -> PathBuf {
        self.file(&format!("{rel}/model.safetensors"), &st(tensors, seed));
        self.path(rel)
    }

    /// The good model, as the other side of a case.
    fn good(&self) -> PathBuf {
        self.model("good", GOOD, 1)
    }

    /// A sharded model directory `rel`: the two GOOD tensors in two shards, and `index` as its
    /// index JSON. Returns the directory.
    fn sharded(&self, rel: &str, index: &str) -> PathBuf {
        self.file(&format!("{rel}/s1.safetensors"), &st(&GOOD[..1], 3));
        self.file(&format!("{rel}/s2.safetensors"), &st(&GOOD[1..], 4));
        self.file(
            &format!("{rel}/model.safetensors.index.json"),
            index.as_bytes(),
        );
        self.path(rel)
    }
}

const GOOD_INDEX: &str =
    r#"{"metadata":{"total_size":12},"weight_map":{"w":"s1.safetensors","b":"s2.safetensors"}}"#;

/// Checks a failure both ways. The library (`plan_expo`, what `expo` runs after its output
/// checks) must refuse with an error `expected` accepts, whose exit code is `code`. Then the
/// binary runs `expo --sft SFT --aligned ALIGNED` twice, with `--out` absent and with it an empty
/// directory: it must exit with that code, print exactly the library's message, name every one
/// of `names`, and leave no output behind. Returns the error.
fn fails(
    sft: &Path,
    aligned: &Path,
    code: i32,
    names: &[&str],
    expected: impl Fn(&Error) -> bool,
) -> Error {
    let error = match mergestream::plan_expo(sft, aligned, 0.5, 5_000_000_000) {
        Ok(_) => panic!("the library plans a merge of {sft:?} and {aligned:?}"),
        Err(e) => e,
    };
    assert!(expected(&error), "not the expected error: {error:?}");
    assert_eq!(error.exit_code(), code, "{error:?}");
    let outs = tempdir();
    for existing in [false, true] {
        let out = outs.path().join(if existing { "empty" } else { "absent" });
        if existing {
            std::fs::create_dir(&out).unwrap();
        }
        let result = run(&[
            "expo",
            "--sft",
            sft.to_str().unwrap(),
            "--aligned",
            aligned.to_str().unwrap(),
            "--alpha",
            "0.5",
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        let err = stderr(&result);
        assert_eq!(
            result.status.code(),
            Some(code),
            "exit code; stderr:\n{err}"
        );
        assert_eq!(err, format!("mergestream: error: {error}\n"));
        for name in names {
            assert!(err.contains(name), "stderr does not name {name:?}:\n{err}");
        }
        if existing {
            let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
            assert!(left.is_empty(), "{} left in --out: {left:?}", left.len());
        } else {
            assert!(!out.exists(), "--out was created");
        }
    }
    error
}

/// A matcher for an [`Error::Header`] whose kind matches the pattern (and guard).
macro_rules! header {
    ($kind:pat $(if $guard:expr)?) => {
        |e: &Error| matches!(e, Error::Header { kind: $kind, .. } $(if $guard)?)
    };
}

/// A matcher for an [`Error::Index`] whose kind matches the pattern (and guard).
macro_rules! index {
    ($kind:pat $(if $guard:expr)?) => {
        |e: &Error| matches!(e, Error::Index { kind: $kind, .. } $(if $guard)?)
    };
}

/// A matcher for an [`Error::Model`] whose kind matches the pattern (and guard).
macro_rules! model {
    ($kind:pat $(if $guard:expr)?) => {
        |e: &Error| matches!(e, Error::Model { kind: $kind, .. } $(if $guard)?)
    };
}

/// A matcher for an [`Error::Io`] while doing `what`, whose OS error satisfies `os`.
fn io(what: &'static str, os: impl Fn(&std::io::Error) -> bool) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::Io { what: w, source, .. } if *w == what && os(source))
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

/// A broken single-file model given as --aligned (directory form) against a good --sft.
fn broken_file(bytes: &[u8], tensor: Option<&str>, expected: impl Fn(&Error) -> bool) {
    let case = Case::new();
    let file = case.file("bad/model.safetensors", bytes);
    let mut names = vec![file.to_str().unwrap().to_owned()];
    names.extend(tensor.map(|t| format!("tensor '{t}'")));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let e = fails(&case.good(), &case.path("bad"), 2, &names, expected);
    assert_eq!(e.tensor(), tensor);
}

/// The same file given directly as --sft (file form) against a good --aligned.
fn broken_file_as_sft(bytes: &[u8], tensor: Option<&str>, expected: impl Fn(&Error) -> bool) {
    let case = Case::new();
    let file = case.file("bad.safetensors", bytes);
    let mut names = vec![file.to_str().unwrap().to_owned()];
    names.extend(tensor.map(|t| format!("tensor '{t}'")));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let e = fails(&file, &case.good(), 2, &names, expected);
    assert_eq!(e.tensor(), tensor);
}

const ONE: &str = r#"{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#;
const FOUR: &[u8] = &[0, 0, 0x80, 0x3F];

// ---- the file and its header ----

#[test]
fn empty_file() {
    broken_file(b"", None, header!(H::TooShort { len: 0 }));
}

#[test]
fn shorter_than_8_bytes() {
    broken_file_as_sft(b"\x05\0\0\0\0", None, header!(H::TooShort { len: 5 }));
}

#[test]
fn header_length_past_end_of_file() {
    broken_file(
        &raw(ONE, FOUR)[..30],
        None,
        header!(H::PastEndOfFile {
            len: 55,
            file_len: 30
        }),
    );
}

#[test]
fn absurd_header_length() {
    let mut bytes = 200_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    broken_file(&bytes, None, header!(H::TooLarge { len: 200_000_000 }));
}

#[test]
fn header_not_utf8() {
    broken_file_as_sft(
        &raw(b"{\"a\xff\":1}", b""),
        None,
        header!(H::NotUtf8 { valid_up_to: 3 }),
    );
}

#[test]
fn header_not_json() {
    broken_file(
        &raw("{this is not json", b""),
        None,
        header!(H::NotJson { .. }),
    );
}

#[test]
fn header_json_but_not_an_object() {
    broken_file(&raw("[1,2,3]", b""), None, header!(H::NotObject));
}

#[test]
fn tensor_entry_not_an_object() {
    broken_file(
        &raw(r#"{"a":3}"#, b""),
        Some("a"),
        header!(H::EntryNotObject { .. }),
    );
}

#[test]
fn duplicate_tensor_names() {
    let json = r#"{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[4,8]}}"#;
    broken_file(
        &raw(json, &[FOUR, FOUR].concat()),
        Some("a"),
        header!(H::DuplicateTensor { .. }),
    );
}

#[test]
fn unknown_dtype() {
    broken_file_as_sft(
        &raw(ONE.replace("BF16", "Q7"), FOUR),
        Some("a"),
        header!(H::UnknownDtype { dtype, .. } if dtype == "Q7"),
    );
}

#[test]
fn negative_dimension() {
    broken_file(
        &raw(ONE.replace("[2]", "[-2]"), FOUR),
        Some("a"),
        header!(H::BadDimension { value, .. } if value == "-2"),
    );
}

#[test]
fn fractional_dimension() {
    broken_file(
        &raw(ONE.replace("[2]", "[1.5]"), FOUR),
        Some("a"),
        header!(H::BadDimension { value, .. } if value == "1.5"),
    );
}

#[test]
fn overflowing_dimensions() {
    broken_file(
        &raw(ONE.replace("[2]", "[4294967296,4294967296]"), FOUR),
        Some("a"),
        header!(H::TooManyElements { shape, .. } if shape == "[4294967296, 4294967296]"),
    );
}

#[test]
fn byte_length_not_dtype_times_shape() {
    broken_file(
        &raw(ONE.replace("[2]", "[3]"), FOUR),
        Some("a"),
        header!(H::WrongLength {
            start: 0,
            end: 4,
            dtype: Dtype::BF16,
            needed: 6,
            ..
        }),
    );
}

#[test]
fn offsets_out_of_bounds() {
    // The file was cut: the header promises 4 bytes of data, 2 are there.
    broken_file_as_sft(
        &raw(ONE, &FOUR[..2]),
        Some("a"),
        header!(H::PastEndOfData {
            end: 4,
            data_len: 2,
            ..
        }),
    );
}

#[test]
fn offsets_overlapping() {
    let json = r#"{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[2,6]}}"#;
    broken_file(
        &raw(json, &[0; 6]),
        Some("b"),
        header!(H::Overlap {
            start: 2,
            end: 6,
            previous_end: 4,
            ..
        }),
    );
}

#[test]
fn offsets_leaving_a_gap() {
    broken_file(
        &raw(ONE.replace("[0,4]", "[2,6]"), &[0; 6]),
        Some("a"),
        header!(H::Gap {
            start: 2,
            previous_end: 0,
            ..
        }),
    );
}

#[test]
fn offsets_reversed() {
    broken_file(
        &raw(ONE.replace("[0,4]", "[4,0]"), FOUR),
        Some("a"),
        header!(H::OffsetsReversed {
            start: 4,
            end: 0,
            ..
        }),
    );
}

#[test]
fn trailing_bytes_not_indexed() {
    broken_file(
        &raw(ONE, &[FOUR, &[9, 9]].concat()),
        Some("a"),
        header!(H::TrailingBytes {
            covered: 4,
            data_len: 6,
            ..
        }),
    );
}

#[test]
fn missing_dtype_field() {
    broken_file(
        &raw(r#"{"a":{"shape":[2],"data_offsets":[0,4]}}"#, FOUR),
        Some("a"),
        header!(H::MissingField { field: "dtype", .. }),
    );
}

#[test]
fn data_offsets_not_two_integers() {
    broken_file(
        &raw(ONE.replace("[0,4]", "[0,\"4\"]"), FOUR),
        Some("a"),
        header!(H::OffsetsNotPair { value, .. } if value == "[0, \"4\"]"),
    );
}

#[test]
fn metadata_value_not_a_string() {
    broken_file(
        &raw(r#"{"__metadata__":{"format":1}}"#, b""),
        None,
        header!(H::MetadataNotString { key } if key == "format"),
    );
}

#[test]
fn model_without_tensors() {
    let case = Case::new();
    let bad = case.file("bad/model.safetensors", &raw("{}", b""));
    fails(
        &case.good(),
        bad.parent().unwrap(),
        2,
        &[case.path("bad").to_str().unwrap()],
        model!(M::NoTensors),
    );
}

// ---- model directories and their index ----

#[test]
fn directory_with_shards_but_no_index() {
    let case = Case::new();
    let dir = case.sharded("bad", GOOD_INDEX);
    std::fs::remove_file(dir.join("model.safetensors.index.json")).unwrap();
    fails(
        &dir,
        &case.good(),
        2,
        &[dir.to_str().unwrap()],
        model!(M::NoWeights),
    );
}

#[test]
fn index_not_json() {
    let case = Case::new();
    let dir = case.sharded("bad", r#"{"weight_map": {"w": "#);
    fails(
        &case.good(),
        &dir,
        2,
        &[dir.join("model.safetensors.index.json").to_str().unwrap()],
        index!(I::NotJson { .. }),
    );
}

#[test]
fn index_without_weight_map() {
    let case = Case::new();
    let dir = case.sharded("bad", r#"{"metadata":{"total_size":12}}"#);
    fails(
        &dir,
        &case.good(),
        2,
        &[dir.join("model.safetensors.index.json").to_str().unwrap()],
        index!(I::NoWeightMap),
    );
}

#[test]
fn index_naming_a_missing_shard() {
    let case = Case::new();
    let dir = case.sharded(
        "bad",
        &GOOD_INDEX.replace("s2.safetensors", "s3.safetensors"),
    );
    fails(
        &case.good(),
        &dir,
        2,
        &[dir.join("s3.safetensors").to_str().unwrap()],
        io("opening shard", not_found),
    );
}

#[test]
fn index_naming_a_tensor_absent_from_its_shard() {
    let case = Case::new();
    let index = GOOD_INDEX.replace(
        r#""b":"s2.safetensors""#,
        r#""b":"s2.safetensors","ghost":"s1.safetensors""#,
    );
    let dir = case.sharded("bad", &index);
    fails(
        &case.good(),
        &dir,
        2,
        &[
            dir.join("model.safetensors.index.json").to_str().unwrap(),
            "tensor 'ghost'",
        ],
        index!(I::NotInShard { shard, .. } if shard == "s1.safetensors"),
    );
}

#[test]
fn index_listing_a_tensor_in_the_wrong_shard() {
    let case = Case::new();
    // b is in s2, but listed in s1 (x keeps s2 listed, so it is opened).
    let index = GOOD_INDEX.replace(
        r#""b":"s2.safetensors""#,
        r#""b":"s1.safetensors","x":"s2.safetensors""#,
    );
    let dir = case.sharded("bad", &index);
    fails(
        &dir,
        &case.good(),
        2,
        &[
            dir.join("model.safetensors.index.json").to_str().unwrap(),
            "tensor 'b'",
        ],
        index!(I::WrongShard { listed, actual, .. } if listed == "s1.safetensors" && actual == "s2.safetensors"),
    );
}

#[test]
fn index_listing_a_tensor_twice() {
    let case = Case::new();
    let index = GOOD_INDEX.replace(r#"{"w":"#, r#"{"b":"s2.safetensors","w":"#);
    let dir = case.sharded("bad", &index);
    fails(
        &case.good(),
        &dir,
        2,
        &[
            dir.join("model.safetensors.index.json").to_str().unwrap(),
            "tensor 'b'",
        ],
        index!(I::ListedTwice { .. }),
    );
}

#[test]
fn index_not_listing_a_tensor_of_a_shard() {
    let case = Case::new();
    let case_dir = case.sharded("bad", GOOD_INDEX);
    // s2 holds b and an unlisted c.
    case.file(
        "bad/s2.safetensors",
        &st(&[("b", "BF16", &[2]), ("c", "BF16", &[1])], 4),
    );
    fails(
        &case_dir,
        &case.good(),
        2,
        &[
            case_dir
                .join("model.safetensors.index.json")
                .to_str()
                .unwrap(),
            "tensor 'c'",
        ],
        index!(I::Unlisted { shard, .. } if shard == "s2.safetensors"),
    );
}

#[test]
fn tensor_in_two_shards() {
    let case = Case::new();
    let dir = case.sharded("bad", GOOD_INDEX);
    case.file("bad/s2.safetensors", &st(GOOD, 4));
    fails(
        &case.good(),
        &dir,
        2,
        &[dir.join("s2.safetensors").to_str().unwrap()],
        model!(M::TensorInTwoShards { tensor, other } if tensor == "w" && *other == dir.join("s1.safetensors")),
    );
}

#[test]
fn shard_name_with_dot_dot_is_refused() {
    let case = Case::new();
    // A file the traversal would reach, so success would be possible if it were followed.
    case.file("s2.safetensors", &st(&GOOD[1..], 4));
    let dir = case.sharded("bad", &GOOD_INDEX.replace(r#""b":"s2"#, r#""b":"../s2"#));
    fails(
        &case.good(),
        &dir,
        2,
        &[
            dir.join("model.safetensors.index.json").to_str().unwrap(),
            "tensor 'b'",
        ],
        index!(I::ShardIsPath { shard, .. } if shard == "../s2.safetensors"),
    );
}

#[test]
fn shard_name_with_absolute_path_is_refused() {
    let case = Case::new();
    let target = case.file("elsewhere/s2.safetensors", &st(&GOOD[1..], 4));
    let index = GOOD_INDEX.replace(
        "\"s2.safetensors\"",
        &format!("{:?}", target.to_str().unwrap()),
    );
    let dir = case.sharded("bad", &index);
    fails(
        &dir,
        &case.good(),
        2,
        &[
            dir.join("model.safetensors.index.json").to_str().unwrap(),
            "tensor 'b'",
        ],
        index!(I::ShardIsPath { .. }),
    );
}

#[test]
fn shard_that_is_a_directory() {
    let case = Case::new();
    let dir = case.sharded("bad", GOOD_INDEX);
    std::fs::remove_file(dir.join("s2.safetensors")).unwrap();
    std::fs::create_dir(dir.join("s2.safetensors")).unwrap();
    fails(
        &case.good(),
        &dir,
        2,
        &[dir.join("s2.safetensors").to_str().unwrap()],
        model!(M::IsDirectory),
    );
}

#[test]
fn shard_that_is_a_fifo() {
    // Opening a FIFO for reading would block forever: it must be refused before it is opened.
    let case = Case::new();
    let dir = case.sharded("bad", GOOD_INDEX);
    let shard = dir.join("s2.safetensors");
    std::fs::remove_file(&shard).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &shard,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fails(
        &dir,
        &case.good(),
        2,
        &[shard.to_str().unwrap()],
        model!(M::NotRegularFile),
    );
}

#[test]
fn model_that_is_a_fifo() {
    let case = Case::new();
    let fifo = case.path("model.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fails(
        &case.good(),
        &fifo,
        2,
        &[fifo.to_str().unwrap()],
        model!(M::NotAModel),
    );
}

#[test]
fn shard_that_is_a_dangling_symlink() {
    let case = Case::new();
    let dir = case.sharded("bad", GOOD_INDEX);
    let shard = dir.join("s2.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink("../blobs/missing", &shard).unwrap();
    fails(
        &case.good(),
        &dir,
        2,
        &[shard.to_str().unwrap()],
        io("opening shard", not_found),
    );
}

#[test]
fn shard_that_is_a_symlink_loop() {
    let case = Case::new();
    let dir = case.sharded("bad", GOOD_INDEX);
    let shard = dir.join("s2.safetensors");
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink("s2.safetensors", &shard).unwrap();
    fails(
        &case.good(),
        &dir,
        2,
        &[shard.to_str().unwrap()],
        io("opening shard", |e| e.raw_os_error() == Some(libc::ELOOP)),
    );
}

#[test]
fn shard_without_read_permission() {
    use std::os::unix::fs::PermissionsExt;
    let case = Case::new();
    let dir = case.sharded("bad", GOOD_INDEX);
    let shard = dir.join("s2.safetensors");
    std::fs::set_permissions(&shard, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&shard).is_ok() {
        eprintln!(
            "skipped shard_without_read_permission: mode 000 does not stop this user (root) \
             from reading; the FIFO and dangling-symlink cases cover unreadable shards"
        );
        return;
    }
    fails(
        &case.good(),
        &dir,
        2,
        &[shard.to_str().unwrap()],
        io("opening shard", |e| {
            e.kind() == std::io::ErrorKind::PermissionDenied
        }),
    );
}

#[test]
fn missing_model_path() {
    let case = Case::new();
    let missing = case.path("nowhere");
    // The library, given a path, cannot open it.
    let error = mergestream::plan_expo(&missing, &case.good(), 0.5, 5_000_000_000).unwrap_err();
    assert!(io("opening model", not_found)(&error), "{error:?}");
    assert_eq!(error.exit_code(), 2);
    // The command line first resolves --sft as a model reference (a path or a Hugging Face id)
    // and says where it looked.
    let out = case.path("out");
    let result = run(&[
        "expo",
        "--sft",
        missing.to_str().unwrap(),
        "--aligned",
        case.good().to_str().unwrap(),
        "--alpha",
        "0.5",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(2), "{err}");
    assert!(err.contains("--sft"), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(!out.exists(), "--out was created");
}

// ---- two models that do not match ----

#[test]
fn all_mismatches_are_listed_in_one_error() {
    let case = Case::new();
    let sft = case.model(
        "sft",
        &[
            ("same", "BF16", &[2]),
            ("only.sft", "BF16", &[2]),
            ("shape", "BF16", &[2, 2]),
            ("dtype", "I16", &[2]),
        ],
        1,
    );
    let aligned = case.model(
        "aligned",
        &[
            ("same", "BF16", &[2]),
            ("only.aligned", "BF16", &[2]),
            ("shape", "BF16", &[4]),
            ("dtype", "F16", &[2]),
        ],
        2,
    );
    let mismatch = |tensor: &str, kind| Mismatch {
        tensor: tensor.into(),
        kind,
    };
    let expected = vec![
        mismatch(
            "dtype",
            MismatchKind::Dtype {
                aligned: Dtype::F16,
                sft: Dtype::I16,
            },
        ),
        mismatch("only.aligned", MismatchKind::OnlyInAligned),
        mismatch("only.sft", MismatchKind::MissingFromAligned),
        mismatch(
            "shape",
            MismatchKind::Shape {
                aligned: vec![4],
                sft: vec![2, 2],
            },
        ),
    ];
    fails(
        &sft,
        &aligned,
        1,
        &[
            "tensor 'only.sft'",
            "tensor 'only.aligned'",
            "tensor 'shape'",
            "tensor 'dtype'",
        ],
        |e| matches!(e, Error::Mismatch { problems, sft: s, aligned: a } if *problems == expected && *s == sft && *a == aligned),
    );
}

#[test]
fn unmergeable_dtype_is_a_mismatch() {
    let case = Case::new();
    let t: &[(&str, &str, &[u64])] = &[("w", "BF16", &[2]), ("f8", "F8_E4M3", &[4])];
    fails(
        &case.model("sft", t, 1),
        &case.model("aligned", t, 2),
        1,
        &["tensor 'f8'"],
        |e| {
            matches!(e, Error::Mismatch { problems, .. } if *problems == [Mismatch {
                tensor: "f8".into(),
                kind: MismatchKind::Unmergeable { dtype: Dtype::F8E4M3 },
            }])
        },
    );
}

// ---- PyTorch checkpoints (.bin): truncated, oversized and malicious pickles ----

/// A matcher for an [`Error::Torch`] whose error matches the pattern (and guard).
macro_rules! torch {
    ($kind:pat $(if $guard:expr)?) => {
        |e: &Error| matches!(e, Error::Torch(t) if matches!(&**t, $kind $(if $guard)?))
    };
}

/// A matcher for an [`Error::Torch`] refusing the pickle for a reason matching the pattern.
macro_rules! pickle {
    ($kind:pat $(if $guard:expr)?) => {
        |e: &Error| matches!(
            e,
            Error::Torch(t) if matches!(&**t, T::Pickle { source, .. } if matches!(&**source, $kind $(if $guard)?))
        )
    };
}

/// A checkpoint as `torch.save` lays it out (`crate::torch_bin::build`): two F32 tensors `w`
/// and `b`, with `pkl` as its `data.pkl` when given.
fn bin_checkpoint(pkl: Option<Vec<u8>>) -> Vec<u8> {
    use crate::torch_bin::build::{bytes, checkpoint, state_dict, T as Tensor};
    let pkl = pkl.unwrap_or_else(|| {
        state_dict(&[Tensor::f32("w", "0", &[2, 2]), Tensor::f32("b", "1", &[2])])
    });
    checkpoint(&pkl, &[("0", bytes(16, 1)), ("1", bytes(8, 9))])
}

/// A broken PyTorch checkpoint given as a model directory's `pytorch_model.bin` (`--aligned`)
/// and as a file (`--sft`); both must fail alike, naming the file (and tensor).
fn broken_bin(bytes: &[u8], tensor: Option<&str>, expected: impl Fn(&Error) -> bool) {
    let case = Case::new();
    let in_dir = case.file("bad/pytorch_model.bin", bytes);
    let as_file = case.file("bad.bin", bytes);
    for (sft, aligned, file) in [
        (case.good(), case.path("bad"), &in_dir),
        (as_file.clone(), case.good(), &as_file),
    ] {
        let mut names = vec![file.to_str().unwrap().to_owned()];
        names.extend(tensor.map(|t| format!("tensor '{t}'")));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let e = fails(&sft, &aligned, 2, &names, &expected);
        assert_eq!(e.tensor(), tensor);
    }
}

#[test]
fn bin_built_checkpoint_is_valid() {
    // The positive control for the cases below: the same builder's file reads.
    let case = Case::new();
    let file = case.file("ok/pytorch_model.bin", &bin_checkpoint(None));
    let model = mergestream::model::Model::open(&file).unwrap();
    assert_eq!(model.tensor_count(), 2);
}

#[test]
fn bin_truncated() {
    let whole = bin_checkpoint(None);
    for cut in [whole.len() / 2, whole.len() - 1] {
        broken_bin(
            &whole[..cut],
            None,
            torch!(T::Zip {
                source: Z::NoEndOfCentralDirectory { .. },
                ..
            }),
        );
    }
    // A real torch.save file, cut short.
    let real = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch/pairs/f16/bin/sft/pytorch_model-00001-of-00003.bin"),
    )
    .unwrap();
    broken_bin(
        &real[..real.len() - 100],
        None,
        torch!(T::Zip {
            source: Z::NoEndOfCentralDirectory { .. },
            ..
        }),
    );
    broken_bin(&real[..3], None, torch!(T::NotAZip { .. }));
}

#[test]
fn bin_truncated_pickle() {
    let whole =
        crate::torch_bin::build::state_dict(&[crate::torch_bin::build::T::f32("w", "0", &[2, 2])]);
    broken_bin(
        &bin_checkpoint(Some(whole[..whole.len() / 2].to_vec())),
        None,
        pickle!(P::Truncated { .. }),
    );
}

#[test]
fn bin_oversized_pickle() {
    let big = vec![b'N'; MAX_PICKLE_LEN as usize + 1];
    broken_bin(
        &bin_checkpoint(Some(big)),
        None,
        torch!(T::PickleTooLarge { len, max, .. } if *len == MAX_PICKLE_LEN + 1 && *max == MAX_PICKLE_LEN),
    );
}

#[test]
fn bin_pickle_building_too_much() {
    // Within the size limit, but memoizing a value again and again until the bytes the reader
    // would hold pass their limit.
    let mut pkl = vec![0x80, 2, b'N'];
    for i in 0..(MAX_PICKLE_LEN / 5 - 2) as u32 {
        pkl.push(b'r');
        pkl.extend_from_slice(&i.to_le_bytes());
    }
    pkl.push(b'.');
    broken_bin(
        &bin_checkpoint(Some(pkl)),
        None,
        pickle!(P::TooManyValues { max, .. } if *max == MAX_HELD_BYTES),
    );
}

#[test]
fn bin_malicious_pickle() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/malicious");
    for (case, global) in [
        ("os-system", "os.system"),
        ("builtins-eval-protocol4", "builtins.eval"),
        ("subprocess", "subprocess.call"),
    ] {
        let bytes = std::fs::read(dir.join(format!("{case}.bin"))).unwrap();
        let quoted = format!("'{global}'");
        broken_bin(&bytes, None, |e: &Error| {
            pickle!(P::ForbiddenGlobal { global: g, .. } if g == global)(e)
                && e.to_string().contains(&quoted)
        });
        // Where the binary ran (this directory), the payload would have left its marker.
        assert!(!Path::new(&format!("mergestream-pwned-{case}")).exists());
    }
}

#[test]
fn bin_tensor_without_its_storage() {
    use crate::torch_bin::build::{bytes, checkpoint, state_dict, T as Tensor};
    let pkl = state_dict(&[Tensor::f32("w", "0", &[2, 2]), Tensor::f32("b", "1", &[2])]);
    broken_bin(
        &checkpoint(&pkl, &[("0", bytes(16, 1))]),
        Some("b"),
        torch!(T::StorageMissing { member, .. } if member == "archive/data/1"),
    );
}

#[test]
fn bin_legacy_and_big_endian() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch/refused");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    broken_bin(&read("legacy.bin"), None, torch!(T::LegacyFormat { .. }));
    broken_bin(&read("bigendian.bin"), None, torch!(T::BigEndian { .. }));
    broken_bin(
        &read("noncontiguous.bin"),
        Some("transposed"),
        pickle!(P::NotContiguous { .. }),
    );
}

#[test]
fn bin_index_listing_a_tensor_in_the_wrong_shard() {
    use crate::torch_bin::build::{bytes, checkpoint, state_dict, T as Tensor};
    let case = Case::new();
    let one = |name: &str| {
        checkpoint(
            &state_dict(&[Tensor::f32(name, "0", &[2])]),
            &[("0", bytes(8, 3))],
        )
    };
    case.file("bad/s1.bin", &one("w"));
    case.file("bad/s2.bin", &one("b"));
    let index = case.file(
        "bad/pytorch_model.bin.index.json",
        br#"{"metadata":{},"weight_map":{"w":"s2.bin","b":"s2.bin","x":"s1.bin"}}"#,
    );
    fails(
        &case.good(),
        &case.path("bad"),
        2,
        &[index.to_str().unwrap(), "tensor 'w'"],
        index!(I::WrongShard { listed, actual, .. } if listed == "s2.bin" && actual == "s1.bin"),
    );
}

// ---- valid edge cases: they merge, and match the reference ----

/// Merges `pair/sft` and `pair/aligned` (or `sft`/`aligned` paths given) into a fresh output and
/// checks it against the reference; returns the tensor count.
fn merges(pair: &Path, sft: &Path, aligned: &Path) -> usize {
    let out = pair.join("out");
    run_ok(&[
        "expo",
        "--sft",
        sft.to_str().unwrap(),
        "--aligned",
        aligned.to_str().unwrap(),
        "--alpha",
        "0.3",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    run_ok(&["verify", out.to_str().unwrap(), "--quiet"]);
    assert_matches_reference(pair, &out, 0.3)
}

#[test]
fn zero_element_scalar_and_non_ascii_tensors_merge() {
    let case = Case::new();
    let t: &[(&str, &str, &[u64])] = &[
        ("empty", "BF16", &[0]),
        ("empty.2d", "BF16", &[3, 0]),
        ("scalar", "BF16", &[]),
        ("模型.权重", "BF16", &[3]),
        ("é", "BF16", &[2, 2]),
        ("position_ids", "I64", &[1, 4]),
        ("empty.int", "I32", &[0, 5]),
    ];
    case.model("sft", t, 5);
    // The aligned model stores them in another order.
    let reversed: Vec<_> = t.iter().rev().cloned().collect();
    case.model("aligned", &reversed, 9);
    let n = merges(case.dir.path(), &case.path("sft"), &case.path("aligned"));
    assert_eq!(n, t.len());
}

#[test]
fn a_model_of_one_tensor_merges() {
    let case = Case::new();
    let t: &[(&str, &str, &[u64])] = &[("only", "BF16", &[5, 3])];
    case.model("sft", t, 1);
    case.model("aligned", t, 2);
    assert_eq!(
        merges(case.dir.path(), &case.path("sft"), &case.path("aligned")),
        1
    );
}

#[test]
fn single_safetensors_files_given_directly_merge() {
    let case = Case::new();
    let t: &[(&str, &str, &[u64])] = &[("a", "BF16", &[4, 4]), ("b", "BF16", &[7])];
    case.model("sft", t, 1);
    case.model("aligned", t, 2);
    let n = merges(
        case.dir.path(),
        &case.path("sft/model.safetensors"),
        &case.path("aligned/model.safetensors"),
    );
    assert_eq!(n, 2);
}

#[test]
fn symlinked_shards_in_hf_cache_layout_merge() {
    let dir = tempdir();
    let pair = dir.path().join("pair");
    synth(&pair, &["--layers", "1", "--int-buffer"]);
    let sft = as_hf_cache(&pair.join("sft"), &dir.path().join("hub-sft"));
    let aligned = as_hf_cache(&pair.join("aligned"), &dir.path().join("hub-aligned"));
    assert!(
        std::fs::symlink_metadata(aligned.join("model-00001-of-00002.safetensors"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let n = merges(&pair, &sft, &aligned);
    assert!(n > 10, "{n} tensors");
    // The same bytes as a merge of the plain directories, but for the model card, which names
    // the inputs as they were given (and the manifest, which holds the card's hash).
    let plain = dir.path().join("plain");
    let args = expo_args(pair.to_str().unwrap(), plain.to_str().unwrap(), "0.3", &[]);
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let without_card = |dir: &Path| {
        let mut files = tree_digest(dir);
        files.remove("README.md");
        files.remove("checksums.b3");
        files
    };
    assert_eq!(without_card(&plain), without_card(&pair.join("out")));
}
