//! Merge configs through the binary: `mergestream merge CONFIG` for mergekit's `linear` and
//! `task_arithmetic` (2, 3 and 8 models; negative weights; normalize on and off; filters; layer
//! gradients; lambda; every `dtype` and `out_dtype`; mixed storage dtypes), each output tensor
//! compared bit for bit with the independent numpy model of mergekit 0.1.5's arithmetic
//! (`tests/python/mergekit_ref.py`), the weights of every tensor resolved by this file's own
//! small resolver (not mergestream's); `--check` on the outputs and on altered copies of them;
//! five-alpha sweeps as `expo --alpha` and as a multi-document config, whole, partitioned and
//! resumed, against single runs; a two-stage config; vocabularies of different sizes
//! (`--vocab-mismatch copy-base`); and bad configs, refused before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::common::*;

// ------------------------------------------------------------------------------ models

/// Widths of the generated Llama-shaped models: small, with tensors whose element counts hit
/// torch's vectorised sum, its 8-column tail and its scalar tail.
const HIDDEN: u64 = 48;
const INTER: u64 = 80;
const KV: u64 = 24;
const VOCAB: u64 = 100;
const LAYERS: u64 = 3;

/// Tensor names and shapes, in the order a model lists them.
fn shapes(hidden: u64, vocab: u64) -> Vec<(String, Vec<u64>)> {
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.");
        for (n, s) in [
            ("input_layernorm.weight", vec![hidden]),
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![KV, hidden]),
            ("self_attn.v_proj.weight", vec![KV, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
            ("mlp.gate_proj.weight", vec![INTER, hidden]),
            ("mlp.up_proj.weight", vec![INTER, hidden]),
            ("mlp.down_proj.weight", vec![hidden, INTER]),
        ] {
            out.push((format!("{p}{n}"), s));
        }
    }
    out.push(("model.norm.weight".into(), vec![hidden]));
    out.push(("lm_head.weight".into(), vec![vocab, hidden]));
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Roughly normal, mean 0, standard deviation 1.
    fn normal(&mut self) -> f32 {
        (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            * 1.7
            - 3.4
    }
}

/// Values of a base model's tensor (norms near 1, weights near 0), with a few NaNs, infinities,
/// signed zeros and subnormals; or a fine-tune of `base` (base plus a small delta).
fn values(rng: &mut Rng, base: Option<&[f32]>, n: usize, norm: bool) -> Vec<f32> {
    const SPECIALS: [f32; 6] = [f32::NAN, f32::INFINITY, -0.0, 0.0, 1e-40, -3e-39];
    (0..n)
        .map(|i| {
            if rng.next().is_multiple_of(400) {
                return SPECIALS[(rng.next() % 6) as usize];
            }
            match base {
                Some(b) => b[i] + 0.002 * rng.normal(),
                None if norm => 1.0 + 0.1 * rng.normal(),
                None => 0.02 * rng.normal(),
            }
        })
        .collect()
}

fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F32 => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        other => panic!("no encoding for {other:?}"),
    }
}

/// Writes a model directory: `shards` safetensors files (tensors dealt round-robin, so the
/// storage order differs from the name order) with an index, or one `model.safetensors`;
/// a `config.json` with the layer count and a tokenizer stand-in.
fn write_model(dir: &Path, tensors: &[(String, Dtype, Vec<u64>, Vec<u8>)], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut weight_map = serde_json::Map::new();
    for k in 0..shards {
        let name = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
        };
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == k)
            .map(|(_, (n, d, s, b))| {
                weight_map.insert(n.clone(), name.clone().into());
                let shape: Vec<usize> = s.iter().map(|&x| x as usize).collect();
                (n.clone(), TensorView::new(*d, shape, b).unwrap())
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(&name)).unwrap();
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": LAYERS, "hidden_size": HIDDEN,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
}

/// A base model (`m0`) and `dtypes.len() - 1` fine-tunes of it, model `i` stored as
/// `dtypes[i]` with `vocabs[i]` rows of embeddings (rows all share come from the same values).
fn make_set(root: &Path, dtypes: &[Dtype], vocabs: &[u64], seed: u64) -> Vec<PathBuf> {
    make_set_sharded(root, dtypes, vocabs, seed, |i| 1 + i % 3)
}

/// [`make_set`] with model `i` in `shards(i)` shards.
fn make_set_sharded(
    root: &Path,
    dtypes: &[Dtype],
    vocabs: &[u64],
    seed: u64,
    shards: impl Fn(usize) -> usize,
) -> Vec<PathBuf> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let widest = *vocabs.iter().max().unwrap();
    let mut base: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let mut paths = Vec::new();
    for (i, &dtype) in dtypes.iter().enumerate() {
        let mut tensors = Vec::new();
        for (name, shape) in shapes(HIDDEN, widest) {
            let n: u64 = shape.iter().product();
            let v = values(
                &mut rng,
                base.get(&name).map(Vec::as_slice),
                n as usize,
                name.ends_with("norm.weight"),
            );
            if i == 0 {
                base.insert(name.clone(), v.clone());
            }
            let mut shape = shape;
            let mut v = v;
            if name.contains("embed_tokens") || name.starts_with("lm_head") {
                shape[0] = vocabs[i];
                v.truncate((vocabs[i] * HIDDEN) as usize);
            }
            tensors.push((name, dtype, shape, encode(&v, dtype)));
        }
        let path = root.join(format!("m{i}"));
        write_model(&path, &tensors, shards(i));
        paths.push(path);
    }
    paths
}

// ------------------------------------------------------------------- configs, weights

/// A parameter value as a config writes it.
#[derive(Clone, Debug)]
enum Setting {
    Num(f64),
    /// Interpolated over the layers.
    Grad(Vec<f64>),
    /// `[{filter, value}, …]`: the first entry whose filter is absent or a substring of the
    /// tensor's name applies.
    Filters(Vec<(Option<&'static str>, Setting)>),
}

impl Setting {
    fn json(&self) -> serde_json::Value {
        match self {
            Setting::Num(v) => (*v).into(),
            Setting::Grad(v) => v.clone().into(),
            Setting::Filters(rules) => rules
                .iter()
                .map(|(f, v)| match f {
                    Some(f) => serde_json::json!({"filter": f, "value": v.json()}),
                    None => serde_json::json!({"value": v.json()}),
                })
                .collect::<Vec<_>>()
                .into(),
        }
    }

    /// The value for tensor `name` at layer position `t`, as mergekit documents it:
    /// a gradient of n values at `t` is `(1 - f) v[k] + f v[min(k + 1, n - 1)]` with
    /// `s = t (n - 1)`, `k = floor(s)`, `f = s - k`, in binary64.
    fn resolve(&self, name: &str, t: f64) -> Option<f64> {
        match self {
            Setting::Num(v) => Some(*v),
            Setting::Grad(v) => {
                let scaled = t * (v.len() - 1) as f64;
                let k = scaled as usize;
                let f = scaled - k as f64;
                Some((1.0 - f) * v[k] + f * v[(k + 1).min(v.len() - 1)])
            }
            Setting::Filters(rules) => rules
                .iter()
                .find(|(f, _)| f.is_none_or(|f| name.contains(f)))
                .and_then(|(_, v)| v.resolve(name, t)),
        }
    }
}

/// A tensor's place on a layer gradient: layer i of L at i / (L - 1); others at 0.
fn layer_t(name: &str) -> f64 {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        [_, "layers", i, ..] => i.parse::<f64>().unwrap() / (LAYERS - 1) as f64,
        _ => 0.0,
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        other => panic!("{other:?}"),
    }
}

/// One merge config and what the reference needs to compute it.
#[derive(Clone)]
struct Merge {
    method: &'static str,
    models: Vec<(PathBuf, Setting)>,
    base: Option<PathBuf>,
    dtype: Option<Dtype>,
    out_dtype: Option<Dtype>,
    normalize: Option<bool>,
    lambda: Option<f64>,
}

impl Merge {
    fn yaml(&self) -> String {
        let mut y = format!("merge_method: {}\n", self.method);
        if let Some(b) = &self.base {
            y += &format!("base_model: {}\n", b.display());
        }
        y += "models:\n";
        for (m, w) in &self.models {
            y += &format!(
                "  - model: {}\n    parameters:\n      weight: {}\n",
                m.display(),
                w.json()
            );
        }
        let mut params = Vec::new();
        if let Some(n) = self.normalize {
            params.push(format!("  normalize: {n}\n"));
        }
        if let Some(l) = self.lambda {
            params.push(format!("  lambda: {l:?}\n"));
        }
        if !params.is_empty() {
            y += "parameters:\n";
            y += &params.concat();
        }
        if let Some(d) = self.dtype {
            y += &format!("dtype: {}\n", dtype_name(d));
        }
        if let Some(d) = self.out_dtype {
            y += &format!("out_dtype: {}\n", dtype_name(d));
        }
        y
    }

    /// The reference's job: inputs, per-tensor weights (resolved here), options.
    fn reference_spec(&self, out: &Path, truncate_rows: bool) -> serde_json::Value {
        let mut weights = serde_json::Map::new();
        for (name, _) in shapes(HIDDEN, VOCAB) {
            let t = layer_t(&name);
            let w: Vec<f64> = self
                .models
                .iter()
                .map(|(_, s)| s.resolve(&name, t).expect("every setting has a catch-all"))
                .collect();
            weights.insert(name, w.into());
        }
        serde_json::json!({
            "method": self.method,
            "inputs": self.models.iter().map(|(m, _)| m.clone()).collect::<Vec<_>>(),
            "base": self.base,
            "dtype": self.dtype.map(dtype_name),
            "out_dtype": self.out_dtype.map(dtype_name),
            "normalize": self.normalize,
            "lambda": self.lambda.unwrap_or(1.0),
            "weights": weights,
            "truncate_rows": truncate_rows,
            "out": out,
        })
    }
}

/// Runs the reference on every job (one Python process).
fn run_reference(dir: &Path, jobs: &[serde_json::Value]) {
    let batch = dir.join("reference-jobs.json");
    std::fs::write(&batch, serde_json::to_vec(jobs).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/mergekit_ref.py");
    let out = Command::new(test_python())
        .arg(script)
        .arg("--batch")
        .arg(&batch)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "mergekit_ref.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every tensor of one `.safetensors` file, read with the `safetensors` crate.
fn load_file(path: &Path) -> BTreeMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                Tensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            )
        })
        .collect()
}

/// Panics unless `got` holds exactly the tensors of `want`, with the same dtypes, shapes and
/// bytes; names the first differing element.
fn assert_same_tensors(
    what: &str,
    got: &BTreeMap<String, Tensor>,
    want: &BTreeMap<String, Tensor>,
) -> usize {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: tensor names"
    );
    for (name, w) in want {
        let g = &got[name];
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{what}: {name}");
        if g.data != w.data {
            let size = w.dtype.bitsize() / 8;
            let i = (0..w.data.len() / size)
                .find(|&i| g.data[i * size..(i + 1) * size] != w.data[i * size..(i + 1) * size])
                .unwrap();
            panic!(
                "{what}: {name}[{i}] is {:02x?}, the reference says {:02x?}",
                &g.data[i * size..(i + 1) * size],
                &w.data[i * size..(i + 1) * size]
            );
        }
    }
    want.len()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `mergestream merge CONFIG EXTRA…`.
fn merge(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["merge", s(config)];
    args.extend_from_slice(extra);
    run(&args)
}

fn merge_ok(config: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["--out", s(out), "--quiet"];
    args.extend_from_slice(extra);
    let o = merge(config, &args);
    assert!(o.status.success(), "{}: {}", config.display(), stderr(&o));
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ----------------------------------------------------------------------------- tests

/// Weights per model for the three kinds of case: scalars (some negative), filters and
/// gradients mixed with scalars, and negatives only.
fn weights(kind: usize, n: usize) -> Vec<Setting> {
    use Setting::*;
    let filt = Filters(vec![
        (Some("self_attn"), Num(0.7)),
        (Some("mlp"), Grad(vec![0.1, 0.9])),
        (None, Num(0.4)),
    ]);
    let grad = Grad(vec![0.2, 0.5, 0.3]);
    let all: Vec<Setting> = match kind {
        0 => [0.5, 0.3, -0.2, 1.0, 0.25, 0.6, -0.1, 0.35]
            .map(Num)
            .to_vec(),
        1 => vec![
            filt.clone(),
            grad.clone(),
            Num(0.5),
            filt,
            Num(-0.25),
            grad,
            Num(1.0),
            Num(0.15),
        ],
        _ => [1.2, -0.3, 0.35, -0.5, 0.8, 0.1, -0.25, 0.4]
            .map(Num)
            .to_vec(),
    };
    all[..n].to_vec()
}

/// Storage, compute dtype, out_dtype, normalize, lambda (task arithmetic only), weight kind.
type Case = (
    &'static str,
    Option<Dtype>,
    Option<Dtype>,
    Option<bool>,
    Option<f64>,
    usize,
);

#[test]
fn linear_and_task_arithmetic_configs_match_the_reference_bit_for_bit() {
    use Dtype::*;
    let dir = tempdir();
    let root = dir.path();
    let mut sets: BTreeMap<(usize, &str), Vec<PathBuf>> = BTreeMap::new();
    let mut merges: Vec<(String, Merge)> = Vec::new();
    for n in [2usize, 3, 8] {
        for (storage, dtypes) in [
            ("bf16", vec![BF16; n + 1]),
            ("f16", vec![F16; n + 1]),
            ("f32", vec![F32; n + 1]),
            (
                "mixed",
                (0..=n).map(|i| [BF16, F16, F32][i % 3]).collect::<Vec<_>>(),
            ),
        ] {
            let set = make_set(
                &root.join(format!("set-{storage}-{n}")),
                &dtypes,
                &vec![VOCAB; n + 1],
                n as u64 * 10 + dtypes.len() as u64 + storage.len() as u64,
            );
            sets.insert((n, storage), set);
        }
        // (storage, compute dtype, out_dtype, normalize, lambda, weight kind) for each method.
        let cases: [Case; 4] = [
            ("bf16", None, None, None, None, 0),
            ("mixed", Some(F32), Some(BF16), Some(false), Some(0.6), 1),
            ("f32", Some(F16), None, Some(true), Some(1.25), 2),
            ("f16", Some(BF16), Some(F32), Some(true), None, 1),
        ];
        for method in ["linear", "task_arithmetic"] {
            for (storage, dtype, out_dtype, normalize, lambda, kind) in cases {
                let set = &sets[&(n, storage)];
                let models = set[1..]
                    .iter()
                    .cloned()
                    .zip(weights(kind, n))
                    .collect::<Vec<_>>();
                let ta = method == "task_arithmetic";
                let m = Merge {
                    method,
                    models,
                    base: ta.then(|| set[0].clone()),
                    dtype,
                    out_dtype,
                    normalize,
                    lambda: lambda.filter(|_| ta),
                };
                let label = format!(
                    "{method} x{n} {storage} dtype={dtype:?} out_dtype={out_dtype:?} normalize={normalize:?} lambda={:?} weights#{kind}",
                    m.lambda
                );
                merges.push((label, m));
            }
        }
    }
    let jobs: Vec<serde_json::Value> = merges
        .iter()
        .enumerate()
        .map(|(k, (_, m))| m.reference_spec(&root.join(format!("ref-{k}.safetensors")), false))
        .collect();
    run_reference(root, &jobs);
    let mut tensors = 0;
    for (k, (label, m)) in merges.iter().enumerate() {
        let config = write(&root.join(format!("config-{k}.yml")), &m.yaml());
        let out = root.join(format!("out-{k}"));
        // Several shards, so that shard boundaries fall between tensors of every kind.
        merge_ok(&config, &out, &["--max-shard-size", "30KB"]);
        let want = load_file(&root.join(format!("ref-{k}.safetensors")));
        tensors += assert_same_tensors(label, &load_model(&out), &want);
        run_ok(&["verify", s(&out), "--quiet"]);
        // --check recomputes the merge and finds every tensor identical.
        let o = merge(&config, &["--check", s(&out)]);
        assert!(o.status.success(), "{label}: --check: {}", stderr(&o));
        let report = stdout(&o);
        assert!(
            report.contains(&format!(
                "{}: {} of {} tensors identical\n",
                out.display(),
                want.len(),
                want.len()
            )),
            "{label}: {report}"
        );
    }
    eprintln!(
        "{} merges, {tensors} tensors identical to the numpy reference",
        merges.len()
    );
}

/// The file of `out` holding `tensor`, and the byte offset of its element `index`.
fn element_offset(out: &Path, tensor: &str, index: u64) -> (PathBuf, u64) {
    let index_file = out.join("model.safetensors.index.json");
    let file = if index_file.exists() {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index_file).unwrap()).unwrap();
        out.join(json["weight_map"][tensor].as_str().unwrap())
    } else {
        out.join("model.safetensors")
    };
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n as usize]).unwrap();
    let start = header[tensor]["data_offsets"][0].as_u64().unwrap();
    let width = match header[tensor]["dtype"].as_str().unwrap() {
        "F32" => 4,
        _ => 2,
    };
    (file, 8 + n + start + index * width)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn check_names_the_tensor_and_element_that_differ_and_writes_nothing() {
    let dir = tempdir();
    let root = dir.path();
    let set = make_set(&root.join("set"), &[Dtype::BF16; 4], &[VOCAB; 4], 7);
    let m = Merge {
        method: "task_arithmetic",
        models: set[1..].iter().cloned().zip(weights(1, 3)).collect(),
        base: Some(set[0].clone()),
        dtype: None,
        out_dtype: None,
        normalize: None,
        lambda: Some(0.8),
    };
    let config = write(&root.join("ta.yml"), &m.yaml());
    let out = root.join("out");
    merge_ok(&config, &out, &["--max-shard-size", "30KB"]);
    let merged = load_model(&out);
    let before = tree_digest(&out);
    let check = |dir: &Path, quiet: bool| {
        let mut args = vec!["--check", s(dir)];
        if quiet {
            args.push("--quiet");
        }
        let o = merge(&config, &args);
        (o.status.code(), stdout(&o), stderr(&o))
    };
    let (code, report, _) = check(&out, false);
    assert_eq!(code, Some(0), "{report}");
    for name in merged.keys() {
        assert!(
            report.contains(&format!("{name}: identical\n")),
            "{name}: {report}"
        );
    }
    assert_eq!(tree_digest(&out), before, "--check changed the directory");
    assert!(!out.join(".mergestream").exists());

    // One byte changed: the tensor and the element are named, with both bit patterns.
    let victim = "model.layers.1.mlp.up_proj.weight";
    let changed = root.join("changed");
    copy_dir(&out, &changed);
    let (file, at) = element_offset(&changed, victim, 37);
    let mut bytes = std::fs::read(&file).unwrap();
    let ours = u16::from_le_bytes([bytes[at as usize], bytes[at as usize + 1]]);
    bytes[at as usize] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let before = tree_digest(&changed);
    let (code, report, err) = check(&changed, true);
    assert_eq!(code, Some(1), "{report}\n{err}");
    let numel = HIDDEN * INTER;
    let want = format!(
        "{victim}: DIFFERS in 1 of {numel} elements; first at element 37 [0, 37]: recomputed 0x{ours:04x}"
    );
    assert!(report.contains(&want), "want {want:?} in:\n{report}");
    assert!(
        report.contains(&format!("found 0x{:04x}", ours ^ 1)),
        "{report}"
    );
    assert_eq!(
        report.lines().count(),
        2,
        "--quiet prints the difference and the summary only:\n{report}"
    );
    assert!(report.contains(&format!(
        "{}: {} of {} tensors identical; 1 differ, 0 missing, 0 extra",
        changed.display(),
        merged.len() - 1,
        merged.len()
    )));
    assert!(
        err.contains("not identical to the recomputed merge"),
        "{err}"
    );
    assert_eq!(tree_digest(&changed), before);

    // Sharded another way, tensors in another order: identical. One tensor stored as F32
    // (its values exactly), one missing, one extra: each named.
    let mut tensors: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = merged
        .iter()
        .rev()
        .map(|(n, t)| {
            let shape = t.shape.iter().map(|&x| x as u64).collect();
            (n.clone(), t.dtype, shape, t.data.clone())
        })
        .collect();
    let resharded = root.join("resharded");
    write_model(&resharded, &tensors, 3);
    let (code, report, _) = check(&resharded, true);
    assert_eq!(code, Some(0), "{report}");
    let widened = "model.norm.weight";
    for t in &mut tensors {
        if t.0 == widened {
            t.1 = Dtype::F32;
            t.3 =
                t.3.chunks_exact(2)
                    .flat_map(|b| {
                        half::bf16::from_le_bytes([b[0], b[1]])
                            .to_f32()
                            .to_le_bytes()
                    })
                    .collect();
        }
    }
    let dropped = "model.layers.0.self_attn.k_proj.weight";
    tensors.retain(|t| t.0 != dropped);
    tensors.push(("extra.bias".into(), Dtype::BF16, vec![4], vec![0; 8]));
    let other = root.join("other");
    write_model(&other, &tensors, 2);
    let (code, report, err) = check(&other, false);
    assert_eq!(code, Some(1), "{report}");
    for want in [
        format!("{widened}: DIFFERS in dtype: recomputed BF16, found F32; the values are equal"),
        format!("{dropped}: MISSING from the existing model"),
        "extra.bias: EXTRA: in the existing model, not produced by the merge".into(),
        format!(
            "{}: {} of {} tensors identical; 1 differ, 1 missing, 1 extra",
            other.display(),
            merged.len() - 2,
            merged.len()
        ),
    ] {
        assert!(report.contains(&want), "want {want:?} in:\n{report}");
    }
    let want = format!(
        "1 of {} tensors differ, 1 missing, 1 not produced",
        merged.len()
    );
    assert!(err.contains(&want), "{err}");
}

/// The documents of a five-alpha ExPO sweep in mergekit-multi's format.
fn sweep_docs(pair: &Path) -> Vec<String> {
    ["0.1", "0.2", "0.3", "0.4", "0.5"]
        .iter()
        .map(|a| {
            format!(
                "name: alpha-{a}\nmerge_method: expo\nbase_model: {}\nmodels:\n  - model: {}\nparameters:\n  alpha: {a}\n",
                pair.join("sft").display(),
                pair.join("aligned").display()
            )
        })
        .collect()
}

/// Deletes one shard `part`'s record lists, so that a `--resume` of that part must redo it.
fn delete_a_recorded_shard(out: &Path, part: &str) -> String {
    let record = out.join(format!(".mergestream/{part}.json"));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let victim = json["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .find(|n| n.ends_with(".safetensors"))
        .expect("the part wrote a shard");
    std::fs::remove_file(out.join(&victim)).unwrap();
    victim
}

#[test]
fn five_alpha_sweeps_as_flags_and_as_a_config_equal_their_single_runs() {
    let dir = tempdir();
    let root = dir.path();
    let pair = root.join("pair");
    synth(
        &pair,
        &[
            "--layers",
            "3",
            "--specials",
            "--seed",
            "5",
            "--sft-shards",
            "2",
        ],
    );
    let shard = ["--max-shard-size", "60KB"];
    let docs = sweep_docs(&pair);
    let alphas: Vec<String> = docs
        .iter()
        .map(|d| d.lines().next().unwrap()[6..].to_string())
        .collect();
    // Single runs: one config document each, and `expo --alpha` each.
    let mut singles = Vec::new();
    let mut expo_singles = Vec::new();
    for (doc, name) in docs.iter().zip(&alphas) {
        let config = write(&root.join(format!("{name}.yml")), doc);
        let out = root.join(format!("single-{name}"));
        merge_ok(&config, &out, &shard);
        singles.push(out);
        let out = root.join(format!("expo-single-{name}"));
        let o = expo(&pair, &out, &name[6..], &shard);
        assert!(o.status.success(), "{}", stderr(&o));
        expo_singles.push(out);
    }
    let sweep = write(&root.join("sweep.yml"), &docs.join("---\n"));
    let flag_alphas = "0.1,0.2,0.3,0.4,0.5";
    let same = |out: &Path, singles: &[PathBuf]| {
        for (name, single) in alphas.iter().zip(singles) {
            assert_same_tree(single, &out.join(name));
            run_ok(&["verify", s(&out.join(name)), "--quiet"]);
        }
    };

    // Whole.
    let whole = root.join("sweep-whole");
    merge_ok(&sweep, &whole, &shard);
    same(&whole, &singles);
    let o = merge(&sweep, &["--check", s(&whole), "--quiet"]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert_eq!(stdout(&o).lines().count(), 5, "{}", stdout(&o));
    let o = run(&[
        "expo",
        "--sft",
        s(&pair.join("sft")),
        "--aligned",
        s(&pair.join("aligned")),
        "--alpha",
        flag_alphas,
        "--check",
        s(&whole),
    ]);
    // The config's outputs carry the config in their headers, the flags' do not: the tensors
    // are what is compared, and they are identical.
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));

    // Partitioned, parts in any order, then finalized; and resumed after a part lost a shard.
    for (k, (runner, singles)) in [("config", &singles), ("flags", &expo_singles)]
        .into_iter()
        .enumerate()
    {
        let out = root.join(format!("sweep-parts-{k}"));
        let part_run = |part: &str, resume: bool| {
            let mut extra: Vec<&str> = shard.to_vec();
            extra.extend(["--part", part]);
            if resume {
                extra.push("--resume");
            }
            let o = if runner == "config" {
                let mut args = vec!["--out", s(&out), "--quiet"];
                args.extend(extra);
                merge(&sweep, &args)
            } else {
                expo(&pair, &out, flag_alphas, &extra)
            };
            assert!(o.status.success(), "{runner} part {part}: {}", stderr(&o));
        };
        for part in ["2/3", "0/3", "1/3"] {
            part_run(part, false);
        }
        // Part 0 loses a shard of one output: without --resume it refuses, with it the shard
        // is redone and the others kept.
        let victim = delete_a_recorded_shard(&out.join(&alphas[2]), "part-0-of-3");
        let o = if runner == "config" {
            merge(
                &sweep,
                &[
                    "--out",
                    s(&out),
                    "--part",
                    "0/3",
                    "--max-shard-size",
                    "60KB",
                ],
            )
        } else {
            expo(
                &pair,
                &out,
                flag_alphas,
                &["--part", "0/3", "--max-shard-size", "60KB"],
            )
        };
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
        assert!(!out.join(&alphas[2]).join(&victim).exists());
        part_run("0/3", true);
        assert!(out.join(&alphas[2]).join(&victim).exists());
        run_ok(&["finalize", s(&out), "--quiet"]);
        same(&out, singles);
    }
}

#[test]
fn a_two_stage_config_merges_the_first_stage_first_and_reads_its_output() {
    use Dtype::*;
    let dir = tempdir();
    let root = dir.path();
    let set = make_set(&root.join("set"), &[BF16, BF16, F16, BF16], &[VOCAB; 4], 11);
    let stage1 = Merge {
        method: "linear",
        models: vec![
            (set[1].clone(), Setting::Num(1.0)),
            (set[2].clone(), Setting::Grad(vec![0.3, 1.0])),
        ],
        base: None,
        dtype: Some(F32),
        out_dtype: None,
        normalize: None,
        lambda: None,
    };
    let out = root.join("out");
    let config = format!(
        "name: stage1\n{}---\nname: final\nmerge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: stage1\n    parameters:\n      weight: 0.8\n  - model: {}\n    parameters:\n      weight: 0.4\ndtype: bfloat16\n",
        stage1.yaml(),
        set[0].display(),
        set[3].display()
    );
    let config = write(&root.join("two-stage.yml"), &config);
    merge_ok(&config, &out, &["--max-shard-size", "40KB"]);
    let ref1 = root.join("ref-stage1.safetensors");
    let final_ = Merge {
        method: "task_arithmetic",
        models: vec![
            (ref1.clone(), Setting::Num(0.8)),
            (set[3].clone(), Setting::Num(0.4)),
        ],
        base: Some(set[0].clone()),
        dtype: Some(BF16),
        out_dtype: None,
        normalize: None,
        lambda: None,
    };
    let ref2 = root.join("ref-final.safetensors");
    // The first stage's reference, then the second's reading it (one batch, in order).
    run_reference(
        root,
        &[
            stage1.reference_spec(&ref1, false),
            final_.reference_spec(&ref2, false),
        ],
    );
    assert_same_tensors(
        "stage1",
        &load_model(&out.join("stage1")),
        &load_file(&ref1),
    );
    assert_same_tensors("final", &load_model(&out.join("final")), &load_file(&ref2));
    // --check with the two directories: the second stage reads the first as it is there.
    let o = merge(&config, &["--check", s(&out), "--quiet"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn bad_configs_are_refused_before_anything_is_written() {
    use Dtype::*;
    let dir = tempdir();
    let root = dir.path();
    let set = make_set(&root.join("set"), &[BF16, BF16, BF16], &[VOCAB; 3], 3);
    // A model of other widths: every tensor's shape disagrees.
    let wide: Vec<(String, Dtype, Vec<u64>, Vec<u8>)> = shapes(HIDDEN + 16, VOCAB)
        .into_iter()
        .map(|(n, shape)| {
            let bytes = vec![0u8; 2 * shape.iter().product::<u64>() as usize];
            (n, BF16, shape, bytes)
        })
        .collect();
    let wide_dir = root.join("wide");
    write_model(&wide_dir, &wide, 1);
    let (m0, m1, m2) = (
        set[0].display().to_string(),
        set[1].display().to_string(),
        set[2].display().to_string(),
    );
    let linear = |a: &str, b: &str| {
        format!(
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight: 0.5\n  - model: {b}\n    parameters:\n      weight: 0.5\n"
        )
    };
    let cases: Vec<(&str, String, i32, Vec<&str>)> = vec![
        (
            "YAML syntax",
            format!("merge_method: linear\nmodels: [\n  - model: {m1}\n"),
            2,
            vec!["line"],
        ),
        (
            "unknown method",
            linear(&m1, &m2).replace("linear", "lienar"),
            2,
            vec!["unknown merge method 'lienar'", "linear", "task_arithmetic"],
        ),
        (
            "unknown key",
            linear(&m1, &m2).replace("    parameters:\n      weight: 0.5\n  - model", "    paramters:\n      weight: 0.5\n  - model"),
            2,
            vec!["unknown key 'paramters'", "models[0]"],
        ),
        (
            "missing model",
            linear(&m1, &format!("{}/nope", root.display())),
            2,
            vec!["models[1].model", "nope", "not found"],
        ),
        (
            "weight not a number",
            linear(&m1, &m2).replacen("weight: 0.5", "weight: heavy", 1),
            2,
            vec!["models[0].parameters.weight", "expected a number", "heavy"],
        ),
        (
            "shapes disagree",
            linear(&m1, s(&wide_dir)),
            1,
            vec!["the models do not match", "model.layers.2.mlp.up_proj.weight", "shape"],
        ),
        (
            "missing base model",
            format!(
                "merge_method: task_arithmetic\nmodels:\n  - model: {m1}\n    parameters:\n      weight: 0.5\n"
            ),
            2,
            vec!["base_model", "task_arithmetic"],
        ),
        (
            "base model that does not exist",
            format!(
                "merge_method: task_arithmetic\nbase_model: {m0}-gone\nmodels:\n  - model: {m1}\n    parameters:\n      weight: 0.5\n"
            ),
            2,
            vec!["base_model", "not found"],
        ),
    ];
    for (k, (what, text, code, needles)) in cases.into_iter().enumerate() {
        let config = write(&root.join(format!("bad-{k}.yml")), &text);
        // An output directory that does not exist stays absent; one that exists (empty, or
        // holding a file) is left as it was.
        let absent = root.join(format!("out-{k}"));
        let o = merge(&config, &["--out", s(&absent)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{what}: {err}");
        for n in needles {
            assert!(err.contains(n), "{what}: want {n:?} in {err}");
        }
        assert_eq!(
            err.lines()
                .next()
                .map(|l| l.starts_with("mergestream: error: ")),
            Some(true),
            "{what}: {err}"
        );
        assert!(!absent.exists(), "{what}: {} was created", absent.display());
        let present = root.join(format!("present-{k}"));
        std::fs::create_dir_all(&present).unwrap();
        std::fs::write(present.join("keep.txt"), "mine").unwrap();
        let o = merge(&config, &["--out", s(&present), "--force"]);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{what} (--force): {}",
            stderr(&o)
        );
        assert_eq!(
            tree_digest(&present).keys().collect::<Vec<_>>(),
            ["keep.txt"],
            "{what}: the output directory was touched"
        );
        // `plan` refuses it the same way.
        let o = run(&["plan", s(&config)]);
        assert_eq!(o.status.code(), Some(code), "{what}: plan: {}", stderr(&o));
    }
}

#[test]
fn vocabularies_of_different_sizes_merge_shared_rows_and_copy_the_base_rows() {
    use Dtype::*;
    let dir = tempdir();
    let root = dir.path();
    // The base has 4 more rows than the models with the fewest (101: 4848 elements, so that
    // torch's sum switches order 16 elements before the end of the shared rows, not where it
    // would for the base's 105). Five task vectors in f32: the order shows in the bits.
    let shared = VOCAB + 1;
    let set = make_set(
        &root.join("set"),
        &[F32; 6],
        &[shared + 4, shared, shared + 2, shared, shared, shared + 1],
        13,
    );
    let embed = "model.embed_tokens.weight";
    let head = "lm_head.weight";
    let mut jobs = Vec::new();
    let mut cases = Vec::new();
    for (k, (method, base_first)) in [
        ("task_arithmetic", true),
        ("linear", true),
        ("linear", false),
    ]
    .into_iter()
    .enumerate()
    {
        // Linear without a base takes its layout from the first model: set[0] first (the
        // widest) or set[1] (among the narrowest).
        let (base, models): (Option<PathBuf>, Vec<PathBuf>) = match (method, base_first) {
            ("task_arithmetic", _) => (Some(set[0].clone()), set[1..].to_vec()),
            (_, true) => (None, set.to_vec()),
            _ => (None, vec![set[1].clone(), set[0].clone(), set[2].clone()]),
        };
        let n = models.len();
        let m = Merge {
            method,
            models: models.into_iter().zip(weights(0, n)).collect(),
            base,
            dtype: (method == "task_arithmetic").then_some(F32),
            out_dtype: None,
            normalize: Some(true),
            lambda: None,
        };
        let config = write(&root.join(format!("vocab-{k}.yml")), &m.yaml());
        let out = root.join(format!("out-{k}"));
        // Without the flag: both vocabulary tensors are named, with the flag; nothing written.
        let o = merge(&config, &["--out", s(&out)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        for needle in [embed, head, "--vocab-mismatch copy-base"] {
            assert!(err.contains(needle), "want {needle:?} in {err}");
        }
        assert!(!out.exists());
        merge_ok(&config, &out, &["--vocab-mismatch", "copy-base"]);
        let r = root.join(format!("ref-{k}.safetensors"));
        jobs.push(m.reference_spec(&r, true));
        cases.push((k, out, r, base_first));
    }
    run_reference(root, &jobs);
    let base_model = load_model(&set[0]);
    for (k, out, r, base_first) in cases {
        let got = load_model(&out);
        let mut want = load_file(&r);
        // The reference merged the rows all models have; the output has the layout model's
        // rows, the extra ones copied from it.
        for name in [embed, head] {
            let w = want.get_mut(name).unwrap();
            assert_eq!(w.shape[0] as u64, shared, "case {k}: {name}: rows merged");
            if base_first {
                let extra = &base_model[name].data[w.data.len()..];
                assert_eq!(extra.len() as u64, 4 * HIDDEN * 4);
                w.data.extend_from_slice(extra);
                w.shape[0] += 4;
            }
        }
        assert_same_tensors(&format!("vocab case {k}"), &got, &want);
        let o = run(&[
            "plan",
            s(&root.join(format!("vocab-{k}.yml"))),
            "--vocab-mismatch",
            "copy-base",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let want = if base_first {
            format!("note: tensor '{embed}': 105 rows in ")
        } else {
            format!("note: tensor '{embed}': 101 rows in ")
        };
        assert!(stdout(&o).contains(&want), "{}", stdout(&o));
        let want = if base_first {
            "the 4 extra rows copied from"
        } else {
            "left out"
        };
        assert!(stdout(&o).contains(want), "{}", stdout(&o));
    }
    // Extra rows that would have to change dtype to be copied are refused, naming the fix.
    let m = Merge {
        method: "task_arithmetic",
        models: set[1..].iter().cloned().zip(weights(0, 5)).collect(),
        base: Some(set[0].clone()),
        dtype: None,
        out_dtype: Some(BF16),
        normalize: None,
        lambda: None,
    };
    let config = write(&root.join("vocab-f32.yml"), &m.yaml());
    let out = root.join("out-f32");
    let o = merge(
        &config,
        &["--out", s(&out), "--vocab-mismatch", "copy-base"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stores it as F32 but the merge writes BF16"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
}

#[test]
fn documents_with_vocabularies_of_other_sizes_merge_as_they_do_alone() {
    // Two TIES documents over the same models, their layout (base) models of 105 and 101 rows
    // stored in the same order: one merges rows [0, 101) and copies 4, the other merges all
    // its rows; a third document's tensors have the same names and fewer rows. Such documents
    // are streamed one after the other, each whole, and each writes what it writes alone.
    let dir = tempdir();
    let root = dir.path();
    let set = make_set_sharded(
        &root.join("set"),
        &[Dtype::BF16; 3],
        &[VOCAB + 5, VOCAB + 1, VOCAB + 3],
        17,
        |_| 1,
    );
    let doc = |name: &str, base: &Path, others: [&Path; 2]| {
        format!(
            "name: {name}\nmerge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters:\n      weight: 0.6\n      density: 0.5\n  - model: {}\n    parameters:\n      weight: 0.4\n      density: 0.7\n",
            base.display(),
            others[0].display(),
            others[1].display()
        )
    };
    // And linear merges of the narrow and of the wide model alone: the same tensor names, rows
    // of two sizes.
    let alone = |name: &str, model: &Path| {
        format!(
            "name: {name}\nmerge_method: linear\nmodels:\n  - model: {}\n    parameters:\n      weight: 1.0\n",
            model.display()
        )
    };
    let docs = [
        alone("alone-wide", &set[0]),
        alone("alone-narrow", &set[1]),
        doc("wide", &set[0], [&set[1], &set[2]]),
        doc("narrow", &set[1], [&set[0], &set[2]]),
    ];
    let both = write(&root.join("both.yml"), &docs.join("---\n"));
    let out = root.join("out");
    merge_ok(&both, &out, &["--vocab-mismatch", "copy-base"]);
    for (doc, name) in docs
        .iter()
        .zip(["alone-wide", "alone-narrow", "wide", "narrow"])
    {
        let alone = write(&root.join(format!("{name}.yml")), doc);
        let single = root.join(format!("single-{name}"));
        merge_ok(&alone, &single, &["--vocab-mismatch", "copy-base"]);
        assert_same_tree(&single, &out.join(name));
    }
}
