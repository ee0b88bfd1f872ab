//! The N-input kernel (`kernel::linear`) against the independent numpy model of mergekit
//! 0.1.5's arithmetic (`tests/python/mergekit_ref.py`), bit for bit: linear and
//! task_arithmetic, 1, 2, 3, 8 and 17 models, negative weights, normalize on and off,
//! lambda, every storage, compute and output dtype, mixed storage dtypes, NaN / Inf /
//! subnormal / signed-zero inputs, tensor sizes that hit every one of torch's reduction
//! orders, on every instruction set this CPU has and with chunk boundaries anywhere.
//!
//! The Python side runs in the project's test venv (`MERGESTREAM_TEST_PYTHON`, else
//! whatever `scripts/test-env.sh` prepares); it needs numpy only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mergestream::kernel::linear::{combine, promote, Combine, CombineParams, Method};
use mergestream::kernel::{FloatDtype, Isa};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// The test venv's python: `$MERGESTREAM_TEST_PYTHON`, else what `scripts/test-env.sh`
/// prepares (it installs what is missing).
fn python() -> PathBuf {
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

/// Tensors of every model: names as in a Llama checkpoint, sizes that exercise torch's
/// vectorised cascade (multiples of 32), its 8-column and scalar tails, the small-tensor
/// path (< one vector) and the one-element path.
const TENSORS: &[(&str, &[usize])] = &[
    ("model.layers.0.self_attn.q_proj.weight", &[64, 48]),
    ("model.layers.0.mlp.down_proj.weight", &[33, 5]),
    ("model.layers.0.input_layernorm.weight", &[40]),
    ("model.layers.1.post_attention_layernorm.weight", &[7]),
    ("model.norm.weight", &[12]),
    ("lm_head.scale", &[1]),
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Raw f32 bits of one element: mostly ordinary values of varied magnitude, sometimes a
/// special (NaNs with payloads and both signs, infinities, zeros, subnormals, extremes).
fn element_f32(rng: &mut Rng, specials: bool) -> u32 {
    const SPECIAL: &[u32] = &[
        0x7FC0_0000,
        0xFFC0_0000,
        0x7F80_0001,
        0xFFA1_2345,
        0x7F80_0000,
        0xFF80_0000,
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x8000_3000,
        0x0001_0000,
        0x7F7F_FFFF,
        0x3380_0000,
    ];
    if specials && rng.below(50) == 0 {
        return SPECIAL[rng.below(SPECIAL.len() as u64) as usize];
    }
    let exp = 127 - 12 + rng.below(14) as u32; // 2^-12 .. 2^1
    let sign = (rng.below(2) as u32) << 31;
    sign | (exp << 23) | (rng.next() as u32 & 0x7F_FFFF)
}

/// `bits` (f32) as an element of `dtype`: BF16 by truncation, F16 by rescaling into its
/// range (the values only need to be varied, not a particular rounding).
fn encode(bits: u32, dtype: FloatDtype) -> u32 {
    match dtype {
        FloatDtype::F32 => bits,
        FloatDtype::BF16 => bits >> 16,
        FloatDtype::F16 => {
            let sign = (bits >> 16) & 0x8000;
            let exp = (bits >> 23) & 0xFF;
            let mant = (bits >> 13) & 0x3FF;
            match exp {
                0xFF => sign | 0x7C00 | mant | u32::from((bits & 0x7F_FFFF) != 0 && mant == 0),
                e if e < 113 => sign | (mant >> (113 - e).min(10)),
                e => sign | ((e.min(142) - 112) << 10) | mant,
            }
        }
    }
}

fn st_dtype(d: FloatDtype) -> Dtype {
    match d {
        FloatDtype::BF16 => Dtype::BF16,
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::F32 => Dtype::F32,
    }
}

fn config_name(d: Option<FloatDtype>) -> serde_json::Value {
    match d {
        None => serde_json::Value::Null,
        Some(FloatDtype::BF16) => "bfloat16".into(),
        Some(FloatDtype::F16) => "float16".into(),
        Some(FloatDtype::F32) => "float32".into(),
    }
}

/// One merge: its config and the models' tensors (raw little-endian bytes).
struct Job {
    method: Method,
    /// Storage dtype of each input file (task arithmetic: the base first).
    storage: Vec<FloatDtype>,
    compute: Option<FloatDtype>,
    out: Option<FloatDtype>,
    normalize: Option<bool>,
    lambda: f64,
    /// Weights per tensor (one per weighted input).
    weights: BTreeMap<String, Vec<f64>>,
    /// files[i][tensor] = bytes
    files: Vec<BTreeMap<String, Vec<u8>>>,
    out_path: PathBuf,
    paths: Vec<PathBuf>,
}

const WEIGHT_CHOICES: &[f64] = &[
    0.5,
    0.3,
    -0.2,
    1.0,
    0.25,
    -1.0,
    0.1,
    1.0 / 3.0,
    0.7,
    -0.05,
    1.5,
    2.0,
];

#[allow(clippy::too_many_arguments)]
fn make_job(
    dir: &Path,
    id: usize,
    rng: &mut Rng,
    method: Method,
    models: usize,
    storage: Vec<FloatDtype>,
    compute: Option<FloatDtype>,
    out: Option<FloatDtype>,
    normalize: Option<bool>,
    lambda: f64,
) -> Job {
    let inputs = storage.len();
    let specials = !id.is_multiple_of(3);
    let mut files = vec![BTreeMap::new(); inputs];
    let mut weights = BTreeMap::new();
    for (t, (name, shape)) in TENSORS.iter().enumerate() {
        let numel: usize = shape.iter().product();
        for (file, &dtype) in files.iter_mut().zip(&storage) {
            let mut bytes = Vec::with_capacity(numel * dtype.size());
            for _ in 0..numel {
                let w = encode(element_f32(rng, specials), dtype);
                match dtype.size() {
                    2 => bytes.extend_from_slice(&(w as u16).to_le_bytes()),
                    _ => bytes.extend_from_slice(&w.to_le_bytes()),
                }
            }
            file.insert(name.to_string(), bytes);
        }
        // Per-tensor weights, as filters and layer gradients produce; some negative, some
        // summing to zero.
        let mut w: Vec<f64> = (0..models)
            .map(|_| WEIGHT_CHOICES[rng.below(WEIGHT_CHOICES.len() as u64) as usize])
            .collect();
        if (id + t).is_multiple_of(7) && models > 1 {
            let rest: f64 = w[1..].iter().sum();
            w[0] = -rest;
        }
        weights.insert(name.to_string(), w);
    }
    let paths: Vec<PathBuf> = (0..inputs)
        .map(|i| dir.join(format!("job{id}-in{i}.safetensors")))
        .collect();
    for (path, (file, &dtype)) in paths.iter().zip(files.iter().zip(&storage)) {
        let views: Vec<(String, TensorView)> = TENSORS
            .iter()
            .map(|(name, shape)| {
                let view = TensorView::new(st_dtype(dtype), shape.to_vec(), &file[*name]).unwrap();
                (name.to_string(), view)
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, path).unwrap();
    }
    Job {
        method,
        storage,
        compute,
        out,
        normalize,
        lambda,
        weights,
        files,
        out_path: dir.join(format!("job{id}-ref.safetensors")),
        paths,
    }
}

fn spec_json(job: &Job) -> serde_json::Value {
    let (base, inputs) = match job.method {
        Method::Linear => (None, &job.paths[..]),
        Method::TaskArithmetic => (Some(&job.paths[0]), &job.paths[1..]),
    };
    serde_json::json!({
        "method": job.method.name(),
        "inputs": inputs,
        "base": base,
        "dtype": config_name(job.compute),
        "out_dtype": config_name(job.out),
        "normalize": job.normalize,
        "lambda": job.lambda,
        "weights": job.weights,
        "out": job.out_path,
    })
}

/// Runs every job's tensors through the kernel on every ISA and compares with the
/// reference file; returns the number of tensors compared.
fn check(job: &Job, isas: &[Isa]) -> usize {
    let reference = std::fs::read(&job.out_path).unwrap();
    let reference = SafeTensors::deserialize(&reference).unwrap();
    let compute = job
        .compute
        .unwrap_or_else(|| promote(job.storage.iter().copied()).unwrap());
    let out = job.out.unwrap_or(compute);
    let normalize = job.normalize.unwrap_or(job.method.default_normalize());
    for (name, shape) in TENSORS {
        let numel: usize = shape.iter().product();
        let op = Combine::new(&CombineParams {
            method: job.method,
            weights: &job.weights[*name],
            normalize,
            lambda: job.lambda,
            compute,
            out,
            numel: numel as u64,
        })
        .unwrap();
        let want = reference.tensor(name).unwrap();
        assert_eq!(want.dtype(), st_dtype(out), "{name}: reference dtype");
        for &isa in isas {
            for chunk in [numel, 37, 8, 1] {
                let mut got = vec![0u8; numel * out.size()];
                let mut start = 0;
                while start < numel {
                    let end = (start + chunk).min(numel);
                    let inputs: Vec<(&[u8], FloatDtype)> = job
                        .files
                        .iter()
                        .zip(&job.storage)
                        .map(|(f, &d)| (&f[*name][start * d.size()..end * d.size()], d))
                        .collect();
                    combine(
                        isa,
                        &op,
                        start as u64,
                        &inputs,
                        &mut got[start * out.size()..end * out.size()],
                    );
                    start = end;
                }
                if got != want.data() {
                    let s = out.size();
                    let i = (0..numel)
                        .find(|&i| got[i * s..i * s + s] != want.data()[i * s..i * s + s])
                        .unwrap();
                    let ins: Vec<String> = job
                        .files
                        .iter()
                        .zip(&job.storage)
                        .map(|(f, d)| {
                            let b = &f[*name][i * d.size()..(i + 1) * d.size()];
                            format!("{d}:{b:02x?}")
                        })
                        .collect();
                    panic!(
                        "{} {name} ({numel} elements) on {isa}, chunks of {chunk}: element {i} \
                         is {:02x?}, the numpy reference says {:02x?}; inputs {ins:?}; \
                         storage {:?} compute {compute} out {out} normalize {normalize} lambda {} \
                         weights {:?}",
                        job.method,
                        &got[i * s..i * s + s],
                        &want.data()[i * s..i * s + s],
                        job.storage,
                        job.lambda,
                        job.weights[*name],
                    );
                }
            }
        }
    }
    TENSORS.len()
}

#[test]
fn kernel_matches_numpy_reference_of_mergekit() {
    use FloatDtype::*;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut jobs = Vec::new();
    let storages: [Option<FloatDtype>; 4] = [Some(BF16), Some(F16), Some(F32), None];
    let mut id = 0;
    for method in [Method::Linear, Method::TaskArithmetic] {
        for models in [2usize, 3, 8] {
            for compute in [None, Some(BF16), Some(F16), Some(F32)] {
                for storage in storages {
                    id += 1;
                    let inputs = models + usize::from(method == Method::TaskArithmetic);
                    let storage: Vec<FloatDtype> = match storage {
                        Some(d) => vec![d; inputs],
                        None => (0..inputs)
                            .map(|i| [BF16, F16, F32][(i + id) % 3])
                            .collect(),
                    };
                    let out = [None, Some(BF16), Some(F16), Some(F32)][id % 4];
                    let normalize = [None, Some(true), Some(false)][id % 3];
                    let lambda = [1.0, 0.5, -0.3, 1.25][(id / 3) % 4];
                    let job = make_job(
                        dir.path(),
                        id,
                        &mut rng,
                        method,
                        models,
                        storage,
                        compute,
                        out,
                        normalize,
                        lambda,
                    );
                    jobs.push(job);
                }
            }
        }
    }
    // A single model, and more than 16 (torch's cascade in blocks of 16).
    for (method, models, compute) in [
        (Method::Linear, 1, Some(BF16)),
        (Method::TaskArithmetic, 1, None),
        (Method::Linear, 17, Some(F32)),
        (Method::TaskArithmetic, 17, Some(F32)),
        (Method::TaskArithmetic, 17, Some(F16)),
        (Method::TaskArithmetic, 17, Some(BF16)),
    ] {
        id += 1;
        let inputs = models + usize::from(method == Method::TaskArithmetic);
        let storage = vec![[BF16, F16, F32][id % 3]; inputs];
        jobs.push(make_job(
            dir.path(),
            id,
            &mut rng,
            method,
            models,
            storage,
            compute,
            None,
            Some(true),
            0.8,
        ));
    }
    let batch = dir.path().join("jobs.json");
    let specs: Vec<serde_json::Value> = jobs.iter().map(spec_json).collect();
    std::fs::write(&batch, serde_json::to_vec(&specs).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/mergekit_ref.py");
    let out = Command::new(python())
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
    let isas = Isa::available();
    for isa in [Isa::Avx2, Isa::Avx512] {
        if !isas.contains(&isa) {
            eprintln!(
                "SKIPPED: {isa} is not available on this CPU; its kernel is NOT compared here"
            );
        }
    }
    let tensors: usize = jobs.iter().map(|j| check(j, &isas)).sum();
    eprintln!(
        "{} merges, {tensors} tensors identical to the numpy reference on {:?}",
        jobs.len(),
        isas
    );
}
