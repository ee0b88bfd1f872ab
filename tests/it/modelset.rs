//! Generated model sets for the statistics methods' end-to-end tests: a base model and
//! fine-tunes of it, each a directory with one `model.safetensors` and a `config.json`.
//!
//! Element `i` of tensor `t` of the base is a hash of `(seed, t, i)` spread over ±0.03; a
//! fine-tune adds a small task vector (±0.002·m for model m, so the models' task vectors
//! differ in scale), except that about one element in 13 equals the base (so bf16 task vectors
//! have many equal magnitudes) and, with `specials`, about one in 97 is NaN, ±Inf, ±0, a
//! subnormal or an extreme. Values depend only on `(seed, tensor, element, model)`, so a set is
//! written in pieces of any size: the Llama-3-70B-width sets of the memory test stream through
//! a few MiB. Later models store their tensors in reverse order (the merge reads by name). This
//! writer is the tests' own (the `half` crate converts), independent of the tool's.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A float type of the generated tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    BF16,
    F16,
    F32,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::BF16 | Dt::F16 => 2,
            Dt::F32 => 4,
        }
    }

    /// The safetensors name.
    pub fn st(self) -> &'static str {
        match self {
            Dt::BF16 => "BF16",
            Dt::F16 => "F16",
            Dt::F32 => "F32",
        }
    }

    /// The name mergekit configs use.
    pub fn yaml(self) -> &'static str {
        match self {
            Dt::BF16 => "bfloat16",
            Dt::F16 => "float16",
            Dt::F32 => "float32",
        }
    }

    fn encode(self, v: f32, out: &mut Vec<u8>) {
        match self {
            Dt::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            Dt::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            Dt::F32 => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct SetSpec {
    /// Float tensors: name and shape.
    pub tensors: Vec<(String, Vec<u64>)>,
    /// Storage dtype of each model's float tensors (base first); its length is the model count.
    pub dtypes: Vec<Dt>,
    pub seed: u64,
    /// Sprinkle NaN, ±Inf, ±0, subnormals and extremes.
    pub specials: bool,
    /// Add an I64 tensor (`model.rotary.positions`, the same in every model).
    pub int_buffer: bool,
}

/// Llama-shaped tensors: `layers` layers of width `hidden`, MLP `inter`, vocabulary `vocab`.
pub fn llama(hidden: u64, inter: u64, vocab: u64, layers: u64) -> Vec<(String, Vec<u64>)> {
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        for (name, shape) in [
            ("input_layernorm.weight", vec![hidden]),
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden / 2, hidden]),
            ("self_attn.v_proj.weight", vec![hidden / 2, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
        ] {
            t.push((format!("{p}{name}"), shape));
        }
    }
    t.push(("model.norm.weight".to_string(), vec![hidden]));
    t.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    t
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform in [-0.5, 0.5) from 24 bits of `h`.
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

const SPECIALS: [u32; 10] = [
    0x7FC0_0000, // NaN
    0xFFC1_2345, // negative NaN with a payload
    0x7F80_0000, // +Inf
    0xFF80_0000, // -Inf
    0x0000_0000, // +0
    0x8000_0000, // -0
    0x0001_0000, // subnormal (bf16 too)
    0x0000_0003, // f32-only subnormal
    0x7F7F_0000, // near the bf16 maximum
    0x477F_E000, // near the f16 maximum
];

/// Element `i` of tensor `t` of model `m` (0: the base).
pub fn value(seed: u64, t: usize, i: u64, m: usize, specials: bool) -> f32 {
    let h = mix(seed ^ mix((t as u64) << 40 ^ i));
    let base = if specials && h.is_multiple_of(1009) {
        f32::from_bits(SPECIALS[(h >> 20) as usize % SPECIALS.len()])
    } else {
        unit(h) * 0.06
    };
    if m == 0 {
        return base;
    }
    let g = mix(h ^ (m as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    if g.is_multiple_of(13) {
        base
    } else if specials && g % 97 == 1 {
        f32::from_bits(SPECIALS[(g >> 20) as usize % SPECIALS.len()])
    } else {
        base + unit(g) * 0.004 * m as f32
    }
}

/// Writes the set under `dir` (`dir/m0` the base, `dir/m1`, …) and returns the model
/// directories.
pub fn write_set(dir: &Path, spec: &SetSpec) -> Vec<PathBuf> {
    (0..spec.dtypes.len())
        .map(|m| {
            let d = dir.join(format!("m{m}"));
            std::fs::create_dir_all(&d).unwrap();
            write_model(&d.join("model.safetensors"), spec, m);
            std::fs::write(
                d.join("config.json"),
                serde_json::json!({
                    "architectures": ["LlamaForCausalLM"],
                    "model_type": "llama",
                    "num_hidden_layers": spec.tensors.iter().filter(|(n, _)| n.ends_with("input_layernorm.weight")).count(),
                    "torch_dtype": spec.dtypes[m].yaml(),
                })
                .to_string(),
            )
            .unwrap();
            d
        })
        .collect()
}

const POSITIONS: u64 = 37;

fn write_model(path: &Path, spec: &SetSpec, m: usize) {
    let dt = spec.dtypes[m];
    // (index into spec.tensors or None for the integer buffer) in storage order.
    let mut order: Vec<Option<usize>> = (0..spec.tensors.len()).map(Some).collect();
    if spec.int_buffer {
        order.insert(1, None);
    }
    if m >= 2 {
        order.reverse();
    }
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for t in &order {
        let (name, dtype, shape, len) = match *t {
            Some(t) => {
                let (name, shape) = &spec.tensors[t];
                let n: u64 = shape.iter().product();
                (name.clone(), dt.st(), shape.clone(), n * dt.size() as u64)
            }
            None => (
                "model.rotary.positions".to_string(),
                "I64",
                vec![POSITIONS],
                POSITIONS * 8,
            ),
        };
        header.insert(
            name,
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + len]}),
        );
        off += len;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let file = std::fs::File::create(path).unwrap();
    let mut w = std::io::BufWriter::with_capacity(4 << 20, file);
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&h).unwrap();
    let mut buf = Vec::with_capacity(4 << 20);
    for t in order {
        let Some(t) = t else {
            for i in 0..POSITIONS {
                w.write_all(&(i as i64 * 3 - 7).to_le_bytes()).unwrap();
            }
            continue;
        };
        let n: u64 = spec.tensors[t].1.iter().product();
        let mut i = 0;
        while i < n {
            let end = (i + (1 << 20)).min(n);
            buf.clear();
            for e in i..end {
                dt.encode(value(spec.seed, t, e, m, spec.specials), &mut buf);
            }
            w.write_all(&buf).unwrap();
            i = end;
        }
    }
    w.flush().unwrap();
}

/// Per-model parameters of a method in the tests: `(weight, density, gamma, epsilon)`.
pub type ModelParams = (f64, f64, f64, f64);

/// A merge of a set: what the config says, for `mergestream merge` and for the reference.
#[derive(Clone, Debug)]
pub struct Merge {
    pub method: &'static str,
    /// `dtype:` (None: the inputs' promoted dtype).
    pub dtype: Option<Dt>,
    pub out_dtype: Option<Dt>,
    /// Per non-base model (task-arithmetic family).
    pub models: Vec<ModelParams>,
    /// Top-level `parameters:` (name, YAML value, JSON value).
    pub params: Vec<(&'static str, serde_json::Value)>,
}

impl Merge {
    /// The method's usual parameters (the agreement script's).
    pub fn of(method: &'static str) -> Merge {
        let models = match method {
            "ties" => vec![(1.0, 0.5, 0.01, 0.15), (0.6, 0.3, 0.01, 0.15)],
            "breadcrumbs" | "breadcrumbs_ties" => {
                vec![(1.0, 0.8, 0.05, 0.15), (0.5, 0.6, 0.02, 0.15)]
            }
            "dare_linear" | "dare_ties" => vec![(1.0, 0.5, 0.01, 0.15), (0.6, 0.7, 0.01, 0.15)],
            "della" | "della_linear" => vec![(1.0, 0.5, 0.01, 0.1), (0.6, 0.7, 0.01, 0.2)],
            _ => Vec::new(),
        };
        let params = match method {
            "slerp" => vec![("t", serde_json::json!(0.3))],
            _ => Vec::new(),
        };
        Merge {
            method,
            dtype: None,
            out_dtype: None,
            models,
            params,
        }
    }

    /// Inputs the method reads (base first): slerp reads two models, the others all.
    pub fn inputs<'a>(&self, dirs: &'a [PathBuf]) -> &'a [PathBuf] {
        if self.method == "slerp" {
            &dirs[..2]
        } else {
            dirs
        }
    }

    /// The mergekit YAML for `dirs` (base first).
    pub fn yaml(&self, dirs: &[PathBuf]) -> String {
        let dirs = self.inputs(dirs);
        let mut y = format!(
            "merge_method: {}\nbase_model: {}\n",
            self.method,
            dirs[0].display()
        );
        if let Some(d) = self.dtype {
            y += &format!("dtype: {}\n", d.yaml());
        }
        if let Some(d) = self.out_dtype {
            y += &format!("out_dtype: {}\n", d.yaml());
        }
        if !self.params.is_empty() {
            y += "parameters:\n";
            for (k, v) in &self.params {
                y += &format!("  {k}: {v}\n");
            }
        }
        y += "models:\n";
        for (i, d) in dirs[1..].iter().enumerate() {
            y += &format!("  - model: {}\n", d.display());
            if let Some(&(weight, density, gamma, epsilon)) = self.models.get(i) {
                y += &format!(
                    "    parameters:\n      weight: {weight:?}\n      density: {density:?}\n"
                );
                if self.method.starts_with("breadcrumbs") {
                    y += &format!("      gamma: {gamma:?}\n");
                }
                if self.method.starts_with("della") {
                    y += &format!("      epsilon: {epsilon:?}\n");
                }
            }
        }
        y
    }

    /// The reference's spec (`tests/python/mergekit_methods_ref.py`) for `dirs` and compute
    /// dtype `compute` (the config's, or the promoted one).
    pub fn reference_spec(&self, dirs: &[PathBuf], compute: Dt) -> serde_json::Value {
        let dirs = self.inputs(dirs);
        let mut params = serde_json::Map::new();
        params.insert(
            "inputs".into(),
            self.models
                .iter()
                .map(|&(weight, density, gamma, epsilon)| {
                    serde_json::json!({"weight": weight, "density": density, "gamma": gamma, "epsilon": epsilon})
                })
                .collect::<Vec<_>>()
                .into(),
        );
        for (k, v) in &self.params {
            params.insert(k.to_string(), v.clone());
        }
        serde_json::json!({
            "method": self.method,
            "compute": compute.st(),
            "out_dtype": self.out_dtype.unwrap_or(compute).st(),
            "inputs": dirs.iter().map(|d| d.join("model.safetensors").display().to_string()).collect::<Vec<_>>(),
            "params": params,
        })
    }
}

/// Rewrites the float elements of `dir/model.safetensors` in place: `f(name, index, bits)`
/// returns the new bits of an element of a 2-byte dtype (4-byte dtypes are left alone).
pub fn rewrite_16bit(dir: &Path, f: impl Fn(&str, usize, u16) -> u16) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" || !matches!(info["dtype"].as_str(), Some("BF16" | "F16")) {
            continue;
        }
        let o = info["data_offsets"].as_array().unwrap();
        let (a, b) = (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        );
        let data = &mut bytes[8 + hlen + a..8 + hlen + b];
        for (i, e) in data.chunks_exact_mut(2).enumerate() {
            let new = f(name, i, u16::from_le_bytes([e[0], e[1]]));
            e.copy_from_slice(&new.to_le_bytes());
        }
    }
    std::fs::write(&path, bytes).unwrap();
}
