//! Synthetic checkpoint pairs shaped like real models, for examples, tests and benchmarks.
//!
//! `write_pair` writes `OUT/sft` and `OUT/aligned`: the same tensors (Llama/Mistral names and
//! shapes), the aligned one a small perturbation of the SFT one, laid out in *different* shard
//! splits and tensor orders, with `config.json` and tokenizer stand-ins beside them. Values come
//! from a seeded generator, so a pair is reproducible, and are distributed like trained weights
//! (normal, with a per-tensor scale; see `Dist`), so that compression figures measured on them
//! mean something. This module has its own minimal
//! safetensors writer, independent of the merge's, so the merge is tested against files it did
//! not make.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::Dtype;

/// Dimensions of a decoder-only transformer in the Llama family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Hidden size (embedding width).
    pub hidden: u64,
    /// MLP width.
    pub intermediate: u64,
    /// Vocabulary size.
    pub vocab: u64,
    /// Width of the k and v projections (kv heads × head dim).
    pub kv: u64,
    /// Transformer layers.
    pub layers: u64,
}

impl Shape {
    /// The attention head width its `config.json` declares: 128 where the widths allow it (as
    /// Llama and Mistral have), else 16, else the widest that divides both the hidden and the
    /// k/v width. The query heads (`hidden / head_dim`) are then a multiple of the k/v heads
    /// (`kv / head_dim`) whenever `kv` divides `hidden`, as grouped-query attention needs.
    pub fn head_dim(&self) -> u64 {
        let divides = |d: u64| d > 0 && self.hidden.is_multiple_of(d) && self.kv.is_multiple_of(d);
        if divides(128) && self.hidden / 128 >= 8 {
            128
        } else if divides(16) {
            16
        } else {
            fn gcd(a: u64, b: u64) -> u64 {
                if b == 0 {
                    a
                } else {
                    gcd(b, a % b)
                }
            }
            gcd(self.hidden, self.kv).max(1)
        }
    }
}

/// The named shapes `synth` makes: real models' widths, and tiny ones for tests. The one table
/// of presets: the command line's `--preset` (a bad name is refused while parsing), the tests
/// and the benchmarks all read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum Preset {
    /// 64 wide, 2 layers: a Llama-shaped model of a few hundred KB, for tests.
    #[value(name = "tiny-llama")]
    TinyLlama,
    /// 96 wide, 3 layers: Mistral-shaped, for tests.
    #[value(name = "tiny-mistral")]
    TinyMistral,
    /// Llama-3-8B's widths (4096 hidden, 128256 vocab), 32 layers.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// Mistral-7B's widths (4096 hidden, 32000 vocab), 32 layers.
    #[value(name = "mistral-7b")]
    Mistral7b,
    /// Llama-3-70B's widths (8192 hidden, 128256 vocab), 80 layers.
    #[value(name = "llama3-70b")]
    Llama3_70b,
}

impl Preset {
    /// The preset's dimensions.
    pub const fn shape(self) -> Shape {
        // hidden, intermediate, vocab, kv width, layers
        let [hidden, intermediate, vocab, kv, layers] = match self {
            Preset::TinyLlama => [64, 176, 320, 32, 2],
            Preset::TinyMistral => [96, 256, 250, 48, 3],
            Preset::Llama3_8b => [4096, 14336, 128256, 1024, 32],
            Preset::Mistral7b => [4096, 14336, 32000, 1024, 32],
            Preset::Llama3_70b => [8192, 28672, 128256, 1024, 80],
        };
        Shape {
            hidden,
            intermediate,
            vocab,
            kv,
            layers,
        }
    }

    /// The name `--preset` takes, e.g. `"mistral-7b"`.
    pub fn name(self) -> &'static str {
        match self {
            Preset::TinyLlama => "tiny-llama",
            Preset::TinyMistral => "tiny-mistral",
            Preset::Llama3_8b => "llama3-8b",
            Preset::Mistral7b => "mistral-7b",
            Preset::Llama3_70b => "llama3-70b",
        }
    }

    /// Every preset.
    pub fn all() -> &'static [Preset] {
        <Preset as clap::ValueEnum>::value_variants()
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to make a pair.
#[derive(Debug, Clone)]
pub struct PairSpec {
    /// The model's dimensions.
    pub shape: Shape,
    /// The float type of both models' weights (the aligned model's, with `sft_dtype`).
    pub dtype: Dtype,
    /// The SFT model's float type, when it differs from the aligned model's.
    pub sft_dtype: Option<Dtype>,
    /// Seed of the values.
    pub seed: u64,
    /// Shards of the SFT model.
    pub sft_shards: usize,
    /// Shards of the aligned model.
    pub aligned_shards: usize,
    /// Sprinkle NaN, ±Inf, ±0, subnormals and extremes into both models.
    pub specials: bool,
    /// Add an I64 buffer (copied, not merged).
    pub int_buffer: bool,
}

struct Tensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
}

impl Tensor {
    fn nbytes(&self) -> u64 {
        self.shape.iter().product::<u64>() * self.dtype.size() as u64
    }
}

fn tensors(spec: &PairSpec) -> Vec<Tensor> {
    let Shape {
        hidden: h,
        intermediate: i,
        vocab: v,
        kv,
        layers,
    } = spec.shape;
    let t = |name: String, shape: Vec<u64>| Tensor {
        name,
        dtype: spec.dtype,
        shape,
    };
    let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        out.push(t(format!("{p}self_attn.q_proj.weight"), vec![h, h]));
        out.push(t(format!("{p}self_attn.k_proj.weight"), vec![kv, h]));
        out.push(t(format!("{p}self_attn.v_proj.weight"), vec![kv, h]));
        out.push(t(format!("{p}self_attn.o_proj.weight"), vec![h, h]));
        out.push(t(format!("{p}mlp.gate_proj.weight"), vec![i, h]));
        out.push(t(format!("{p}mlp.up_proj.weight"), vec![i, h]));
        out.push(t(format!("{p}mlp.down_proj.weight"), vec![h, i]));
        out.push(t(format!("{p}input_layernorm.weight"), vec![h]));
        out.push(t(format!("{p}post_attention_layernorm.weight"), vec![h]));
    }
    out.push(t("model.norm.weight".into(), vec![h]));
    out.push(t("lm_head.weight".into(), vec![v, h]));
    if spec.int_buffer {
        out.push(Tensor {
            name: "model.position_ids".into(),
            dtype: Dtype::I64,
            shape: vec![1, 64],
        });
    }
    out
}

/// Where each tensor lands in one model's files.
struct Layout {
    /// Shard file names, with the tensors (indices) each holds in data order.
    shards: Vec<(String, Vec<usize>)>,
    /// Per tensor: (shard, absolute file offset).
    place: Vec<(usize, u64)>,
    prefixes: Vec<Vec<u8>>,
}

fn lay_out(tensors: &[Tensor], order: &[usize], shards: usize) -> Layout {
    let total: u64 = tensors.iter().map(Tensor::nbytes).sum();
    let target = total.div_ceil(shards.max(1) as u64).max(1);
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0;
    for &t in order {
        if size >= target && groups.len() < shards {
            groups.push(Vec::new());
            size = 0;
        }
        groups.last_mut().expect("one group at least").push(t);
        size += tensors[t].nbytes();
    }
    let n = groups.len();
    let mut place = vec![(0, 0); tensors.len()];
    let mut prefixes = Vec::new();
    let mut names = Vec::new();
    for (k, group) in groups.iter().enumerate() {
        // Header keys sorted by name, as the Python safetensors package writes them; data in
        // group order.
        let mut offsets = BTreeMap::new();
        let mut at = 0;
        for &t in group {
            offsets.insert(tensors[t].name.clone(), (t, at, at + tensors[t].nbytes()));
            at += tensors[t].nbytes();
        }
        let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
        for (name, (t, start, end)) in &offsets {
            let shape: Vec<String> = tensors[*t].shape.iter().map(u64::to_string).collect();
            json += &format!(
                ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{start},{end}]}}",
                serde_json::to_string(name).expect("strings serialize"),
                tensors[*t].dtype.name(),
                shape.join(",")
            );
        }
        json.push('}');
        while (8 + json.len()) % 8 != 0 {
            json.push(' ');
        }
        let mut prefix = (json.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(json.as_bytes());
        for (t, start, _) in offsets.values() {
            place[*t] = (k, prefix.len() as u64 + start);
        }
        prefixes.push(prefix);
        let name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        names.push(name);
    }
    Layout {
        shards: names.into_iter().zip(groups).collect(),
        place,
        prefixes,
    }
}

/// Writes a model pair under `out` (`out/sft`, `out/aligned`) and returns their data size.
pub fn write_pair(out: &Path, spec: &PairSpec) -> Result<u64> {
    let tensors = tensors(spec);
    // The SFT model may store its float tensors in another type.
    let sft_tensors: Vec<Tensor> = tensors
        .iter()
        .map(|t| Tensor {
            name: t.name.clone(),
            dtype: match spec.sft_dtype {
                Some(d) if t.dtype.mergeable().is_some() => d,
                _ => t.dtype,
            },
            shape: t.shape.clone(),
        })
        .collect();
    let forward: Vec<usize> = (0..tensors.len()).collect();
    // The aligned model stores its tensors in another order (lm_head and the last layers
    // first), as re-saved checkpoints often do.
    let reversed: Vec<usize> = forward.iter().rev().copied().collect();
    let layouts = [
        ("sft", lay_out(&sft_tensors, &forward, spec.sft_shards)),
        ("aligned", lay_out(&tensors, &reversed, spec.aligned_shards)),
    ];
    let mut files: Vec<Vec<File>> = Vec::new();
    for ((role, layout), tensors) in layouts.iter().zip([&sft_tensors, &tensors]) {
        let dir = out.join(role);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "creating", e))?;
        let mut handles = Vec::new();
        for ((name, group), prefix) in layout.shards.iter().zip(&layout.prefixes) {
            let path = dir.join(name);
            let file = File::create(&path).map_err(|e| Error::io(&path, "creating", e))?;
            let len = prefix.len() as u64 + group.iter().map(|&t| tensors[t].nbytes()).sum::<u64>();
            file.set_len(len)
                .map_err(|e| Error::io(&path, "sizing", e))?;
            file.write_all_at(prefix, 0)
                .map_err(|e| Error::io(&path, "writing", e))?;
            handles.push(file);
        }
        if layout.shards.len() > 1 {
            let mut map = BTreeMap::new();
            for (name, group) in &layout.shards {
                for &t in group {
                    map.insert(tensors[t].name.clone(), name.clone());
                }
            }
            let total: u64 = tensors.iter().map(Tensor::nbytes).sum();
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
            write_text(
                &dir.join("model.safetensors.index.json"),
                &serde_json::to_string_pretty(&index).expect("json"),
            )?;
        }
        write_side_files(&dir, role, spec)?;
        files.push(handles);
    }

    let mut rng = Rng(spec.seed ^ 0x9E37_79B9_7F4A_7C15);
    const CHUNK: u64 = 1 << 20;
    let mut s_bytes = Vec::new();
    let mut a_bytes = Vec::new();
    for (t, tensor) in tensors.iter().enumerate() {
        let (s_dtype, a_dtype) = (sft_tensors[t].dtype, tensor.dtype);
        let numel = tensor.nbytes() / a_dtype.size() as u64;
        let dist = Dist::of(tensor, &mut rng);
        let mut done = 0;
        while done < numel {
            let n = (numel - done).min(CHUNK);
            s_bytes.clear();
            a_bytes.clear();
            for _ in 0..n {
                let (s, a) = sample(&mut rng, &dist, spec.specials);
                s_bytes.extend_from_slice(&encode(s_dtype, s)[..s_dtype.size()]);
                a_bytes.extend_from_slice(&encode(a_dtype, a)[..a_dtype.size()]);
            }
            for (m, bytes, elem) in [(0, &s_bytes, s_dtype.size()), (1, &a_bytes, a_dtype.size())] {
                let (shard, offset) = layouts[m].1.place[t];
                files[m][shard]
                    .write_all_at(bytes, offset + done * elem as u64)
                    .map_err(|e| Error::io(out.join(layouts[m].0), "writing", e))?;
            }
            done += n;
        }
    }
    Ok(tensors.iter().map(Tensor::nbytes).sum())
}

/// How a tensor's values are distributed, as in trained checkpoints: matrices centred on 0
/// with a per-tensor standard deviation (0.01–0.03, like the 0.02 initialisation of Llama and
/// Mistral), norm weights centred on 1 (sd 0.05). The aligned model differs from the SFT model
/// by a further normal step of 1% of the tensor's standard deviation (about one BF16 ulp).
struct Dist {
    center: f32,
    sd: f32,
}

impl Dist {
    fn of(tensor: &Tensor, rng: &mut Rng) -> Dist {
        let u = (rng.next() >> 40) as f32 / (1u64 << 24) as f32;
        if tensor.shape.len() == 1 {
            Dist {
                center: 1.0,
                sd: 0.05,
            }
        } else {
            Dist {
                center: 0.0,
                sd: 0.01 + 0.02 * u,
            }
        }
    }
}

/// A standard normal variate, approximately: the Irwin–Hall sum of four uniforms, scaled to unit
/// variance (tails end at ±3.46; cheap enough to generate gigabytes).
fn normal(rng: &mut Rng) -> f32 {
    let r = rng.next();
    let sum: u64 = (0..4).map(|i| (r >> (16 * i)) & 0xFFFF).sum();
    (sum as f32 / 65536.0 - 2.0) * 3f32.sqrt()
}

/// One element of each model: (sft, aligned).
fn sample(rng: &mut Rng, dist: &Dist, specials: bool) -> (f32, f32) {
    let s = dist.center + dist.sd * normal(rng);
    let delta = 0.01 * dist.sd * normal(rng);
    let (mut s, mut a) = (s, s + delta);
    if specials && rng.next().is_multiple_of(61) {
        let pick = rng.next();
        let bits = f32::from_bits(SPECIALS[(pick % SPECIALS.len() as u64) as usize]);
        if pick & (1 << 40) != 0 {
            s = bits;
        } else {
            a = bits;
        }
    }
    (s, a)
}

/// f32 bit patterns of the values arithmetic gets wrong most easily.
const SPECIALS: [u32; 12] = [
    0x7FC0_0000, // NaN
    0xFFC0_1234, // negative NaN with payload
    0x7F80_0000, // +Inf
    0xFF80_0000, // -Inf
    0x0000_0000, // +0
    0x8000_0000, // -0
    0x0001_0000, // subnormal (also in bf16)
    0x8000_0001, // smallest negative subnormal (f32 only)
    0x7F7F_0000, // near the bf16 maximum: overflows when extrapolated
    0x477F_E000, // near the f16 maximum
    0x3F80_8000, // a bf16 rounding tie
    0x0080_0000, // smallest normal
];

fn encode(dtype: Dtype, value: f32) -> [u8; 8] {
    let mut out = [0u8; 8];
    match dtype {
        Dtype::BF16 => out[..2].copy_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
        Dtype::F16 => out[..2].copy_from_slice(&half::f16::from_f32(value).to_le_bytes()),
        Dtype::F32 => out[..4].copy_from_slice(&value.to_le_bytes()),
        Dtype::I64 => out.copy_from_slice(&((value * 1e6) as i64).to_le_bytes()),
        other => unreachable!("synth makes no {other} tensors"),
    }
    out
}

/// Writes `config.json` (a `LlamaConfig` that `transformers` loads: the tensors' shapes follow
/// from it), `generation_config.json` and tokenizer stand-ins.
fn write_side_files(dir: &Path, role: &str, spec: &PairSpec) -> Result<()> {
    let s = spec.shape;
    let head_dim = s.head_dim();
    let dtype = match spec.dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    };
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "vocab_size": s.vocab,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.hidden / head_dim,
        "num_key_value_heads": s.kv / head_dim,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "dtype": dtype,
        "_synthetic": format!("mergestream synth, {role} model, seed {}", spec.seed),
    });
    write_text(
        &dir.join("config.json"),
        &serde_json::to_string_pretty(&config).expect("json"),
    )?;
    write_text(
        &dir.join("generation_config.json"),
        "{\n  \"do_sample\": true,\n  \"temperature\": 0.6\n}\n",
    )?;
    write_text(
        &dir.join("tokenizer_config.json"),
        &format!("{{\n  \"chat_template\": \"{role}: {{{{ messages }}}}\"\n}}\n"),
    )?;
    write_text(
        &dir.join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"}}\n",
    )
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, "writing", e))
}

/// wyrand: fast, seedable, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xA076_1D64_78BD_642F);
        let t = (self.0 as u128) * ((self.0 ^ 0xE703_7ED1_A0B4_28DB) as u128);
        ((t >> 64) ^ t) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    /// The names clap parses are the names the table gives, and every preset has one.
    #[test]
    fn preset_names_round_trip_through_clap() {
        for &p in Preset::all() {
            assert_eq!(Preset::from_str(p.name(), false), Ok(p));
            assert_eq!(p.to_possible_value().unwrap().get_name(), p.name());
        }
        assert_eq!(Preset::all().len(), 5);
        assert!(Preset::from_str("llama3-9b", false).is_err());
    }

    /// Every preset's attention heads are whole and grouped as Llama's config requires: the
    /// query heads a multiple of the k/v heads, the real models' head width 128.
    #[test]
    fn presets_have_valid_attention_heads() {
        for &p in Preset::all() {
            let s = p.shape();
            let d = s.head_dim();
            assert_eq!((s.hidden % d, s.kv % d), (0, 0), "{p}");
            assert_eq!((s.hidden / d) % (s.kv / d), 0, "{p}");
        }
        assert_eq!(Preset::Mistral7b.shape().head_dim(), 128);
        assert_eq!(Preset::Llama3_70b.shape().head_dim(), 128);
        assert_eq!(Preset::TinyLlama.shape().head_dim(), 16);
    }
}
