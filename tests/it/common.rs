//! Shared helpers for the end-to-end tests: run the binary, make inputs, read outputs with an
//! independent reader (the `safetensors` crate), and compute the ExPO reference independently of
//! the tool's kernel (with the `half` crate's conversions).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mergestream"))
}

/// Runs `mergestream ARGS`, returning its output (whatever the exit status).
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("the mergestream binary runs")
}

/// Runs `mergestream ARGS` and panics with its stderr unless it succeeds.
pub fn run_ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "mergestream {args:?} failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The test venv's python: `$MERGESTREAM_TEST_PYTHON`, else what `scripts/test-env.sh`
/// prepares (it installs what is missing).
pub fn test_python() -> PathBuf {
    if let Some(p) = std::env::var_os("MERGESTREAM_TEST_PYTHON") {
        return p.into();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-env.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "test-env.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Whether the test venv's `py` can import `modules` (e.g. `"torch, transformers"`).
/// `scripts/test-env.sh` installs torch and transformers unless told not to
/// (`MERGESTREAM_TEST_NO_TORCH=1`): without them a test says SKIPPED, and under `CI=true` fails.
pub fn has_python_modules(py: &Path, modules: &str) -> bool {
    let ok = Command::new(py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI must have {modules}: scripts/test-env.sh installs them"
        );
        eprintln!("SKIPPED: {modules} not in the test venv (MERGESTREAM_TEST_NO_TORCH=1?)");
    }
    ok
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mergestream-test-")
        .tempdir()
        .expect("temp dir")
}

/// `mergestream synth DIR EXTRA...` (writes DIR/sft and DIR/aligned).
pub fn synth(dir: &Path, extra: &[&str]) {
    let mut args = vec!["synth", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_ok(&args);
}

/// `mergestream expo --sft DIR/sft --aligned DIR/aligned --alpha ALPHA --out OUT --quiet EXTRA...`.
pub fn expo_args<'a>(
    pair: &'a str,
    out: &'a str,
    alpha: &'a str,
    extra: &[&'a str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "expo".into(),
        "--sft".into(),
        format!("{pair}/sft"),
        "--aligned".into(),
        format!("{pair}/aligned"),
        "--alpha".into(),
        alpha.into(),
        "--out".into(),
        out.into(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub fn expo(pair: &Path, out: &Path, alpha: &str, extra: &[&str]) -> Output {
    let args = expo_args(pair.to_str().unwrap(), out.to_str().unwrap(), alpha, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs)
}

/// One tensor as an independent reader sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a model directory (index + shards, or one model.safetensors), read with the
/// `safetensors` crate.
pub fn load_model(dir: &Path) -> BTreeMap<String, Tensor> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        let mut names: Vec<String> = json["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut out = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e:?}", file.display()));
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                Tensor {
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            );
            assert!(prev.is_none(), "{name} appears in two shards");
        }
    }
    out
}

/// One element of the ExPO reference: f32, unfused, round to nearest even, canonical NaN. The
/// SFT side may be stored as another float type (`sft_dtype`): both widen exactly to f32 and
/// the result takes the aligned dtype.
pub fn expo_element_mixed(
    dtype: safetensors::Dtype,
    sft_dtype: safetensors::Dtype,
    alpha: f32,
    a: &[u8],
    s: &[u8],
) -> Vec<u8> {
    use safetensors::Dtype as D;
    let to_f32 = |dtype: D, b: &[u8]| match dtype {
        D::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        D::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        D::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        other => panic!("no reference for {other:?}"),
    };
    let (a, s) = (to_f32(dtype, a), to_f32(sft_dtype, s));
    let d = a - s;
    let t = alpha * d;
    let o = a + t;
    match dtype {
        D::BF16 if o.is_nan() => 0x7FC0u16.to_le_bytes().to_vec(),
        D::F16 if o.is_nan() => 0x7E00u16.to_le_bytes().to_vec(),
        D::F32 if o.is_nan() => 0x7FC0_0000u32.to_le_bytes().to_vec(),
        D::BF16 => half::bf16::from_f32(o).to_le_bytes().to_vec(),
        D::F16 => half::f16::from_f32(o).to_le_bytes().to_vec(),
        _ => o.to_le_bytes().to_vec(),
    }
}

/// Checks every tensor of the merged model at `out` against the reference computed from the
/// pair at `pair`; integer tensors must equal the aligned model's. Returns the tensor count.
pub fn assert_matches_reference(pair: &Path, out: &Path, alpha: f32) -> usize {
    let sft = load_model(&pair.join("sft"));
    let aligned = load_model(&pair.join("aligned"));
    let merged = load_model(out);
    assert_eq!(
        merged.keys().collect::<Vec<_>>(),
        aligned.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    for (name, m) in &merged {
        let (a, s) = (&aligned[name], &sft[name]);
        assert_eq!(m.dtype, a.dtype, "{name}: dtype");
        assert_eq!(m.shape, a.shape, "{name}: shape");
        let size = m.dtype.bitsize() / 8;
        let float = matches!(
            m.dtype,
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F32
        );
        if !float {
            assert_eq!(
                m.data, a.data,
                "{name}: copied tensor differs from --aligned"
            );
            continue;
        }
        assert_eq!(m.data.len(), a.data.len(), "{name}: byte length");
        for (i, ((mo, ao), so)) in m
            .data
            .chunks_exact(size)
            .zip(a.data.chunks_exact(size))
            .zip(s.data.chunks_exact(s.dtype.bitsize() / 8))
            .enumerate()
        {
            let want = expo_element_mixed(m.dtype, s.dtype, alpha, ao, so);
            assert_eq!(
                mo,
                &want[..],
                "{name}[{i}]: got {mo:02x?}, want {want:02x?} (aligned {ao:02x?}, sft {so:02x?})"
            );
        }
    }
    merged.len()
}

/// blake3 of every file in `dir` (top level), by name.
pub fn tree_digest(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let digest = if path.is_dir() {
            "<dir>".to_string()
        } else {
            blake3::hash(&std::fs::read(&path).unwrap())
                .to_hex()
                .to_string()
        };
        out.insert(name, digest);
    }
    out
}

/// Panics unless `a` and `b` hold the same files with the same bytes.
pub fn assert_same_tree(a: &Path, b: &Path) {
    assert_eq!(
        tree_digest(a),
        tree_digest(b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// Files of a merge output that name its inputs as they were given (the model card, the merge
/// config), so that merges of the same weights found at other paths differ in them.
pub const NAMES_INPUTS: [&str; 2] = ["README.md", "mergekit_config.yml"];

/// Panics unless `a` and `b` are the same merge of inputs given by other paths: the same files
/// with the same bytes, but for those in [`NAMES_INPUTS`], and manifests (`checksums.b3`, and
/// `packed.b3` of a compressed output) listing the same hashes for every other file.
pub fn assert_same_merge(a: &Path, b: &Path) {
    const MANIFESTS: [&str; 2] = ["checksums.b3", "packed.b3"];
    let strip = |dir: &Path| {
        let mut files = tree_digest(dir);
        for name in NAMES_INPUTS.iter().chain(&MANIFESTS) {
            files.remove(*name);
        }
        let manifests: Vec<Vec<String>> = MANIFESTS
            .iter()
            .map(|m| manifest_without_names_of_inputs(&dir.join(m)))
            .collect();
        (files, manifests)
    };
    assert_eq!(
        strip(a),
        strip(b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// The lines of a manifest (`DIR/checksums.b3` when given a directory) but for files in
/// [`NAMES_INPUTS`] and for `checksums.b3`, which hashes them.
pub fn manifest_without_names_of_inputs(path: &Path) -> Vec<String> {
    let path = if path.is_dir() {
        path.join("checksums.b3")
    } else {
        path.to_path_buf()
    };
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            !NAMES_INPUTS
                .iter()
                .chain(&["checksums.b3"])
                .any(|n| l.ends_with(&format!("  {n}")))
        })
        .map(String::from)
        .collect()
}

/// Runs `mergestream ARGS` to completion and returns its exit status, its peak resident memory
/// in bytes and its stderr.
///
/// The peak is the kernel's high-water mark of the child's own address space (`VmHWM` in
/// `/proc/PID/status`), sampled every 2 ms until the child exits. `wait4`'s `ru_maxrss` would be
/// simpler but is wrong here: the child is spawned with `CLONE_VM`, and at `exec` the kernel
/// folds the high-water mark of the address space it leaves, this test process's, into the
/// child's `ru_maxrss`; with other tests running in parallel that is whatever they hold.
pub fn run_measuring_peak_rss(args: &[&str]) -> (std::process::ExitStatus, u64, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the mergestream binary runs");
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut { stderr }, &mut err).unwrap();
        err
    });
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let status = loop {
        // Read before try_wait: once the child has exited its status has no VmHWM line.
        if let Some(hwm) = std::fs::read_to_string(&status_path).ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        }) {
            peak = peak.max(hwm * 1024);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    (status, peak, reader.join().unwrap())
}

/// Copies every file of `dir` into a Hugging-Face-cache layout
/// (`hub/blobs/<blake3>` and `hub/snapshots/rev/<name> -> ../../blobs/<blake3>`), returning the
/// snapshot directory.
pub fn as_hf_cache(dir: &Path, hub: &Path) -> PathBuf {
    let snapshot = hub.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(hub.join("blobs")).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let hash = blake3::hash(&bytes).to_hex().to_string();
        std::fs::write(hub.join("blobs").join(&hash), &bytes).unwrap();
        let name = path.file_name().unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{hash}"), snapshot.join(name)).unwrap();
    }
    snapshot
}

/// Something mounted at a directory for a test (`mount ARGS… AT`), unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    /// Mounts, or returns `None` (after saying SKIPPED) where this machine does not allow it
    /// (not root); under `CI=true`, where the suite runs as root, that is a failure.
    pub fn new(at: &Path, args: &[&str]) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(args)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(Mount(at.to_path_buf()))
        } else if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI runs as root and must be able to mount ({args:?})");
        } else {
            eprintln!("SKIPPED: cannot mount {args:?} here (not root?)");
            None
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
