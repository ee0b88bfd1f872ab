//! The statistics-based methods (ties, dare_*, breadcrumbs*, della*, slerp, model_stock) against
//! the independent numpy reference `tests/python/mergekit_methods_ref.py`, bit for bit, and
//! against themselves across chunk sizes and thread counts.
//!
//! Inputs are generated here: fine-tune-like task vectors (small deltas on a base, heavy ties in
//! bf16), NaN/±Inf/±0/subnormals, models equal to the base, tiny and multi-block tensors, and
//! densities at their edges.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mergestream::kernel::exec;
use mergestream::kernel::methods::{InputParams, Method, MethodParams, Op, TensorCtx};
use mergestream::kernel::FloatDtype;

pub fn python() -> PathBuf {
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
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51afd7ed558ccd);
        x ^ (x >> 33)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

const SPECIALS: [u32; 8] = [
    0x7FC0_0000,
    0xFF80_0000,
    0x7F80_0000,
    0x0000_0000,
    0x8000_0000,
    0x0001_0000,
    0x0080_0000,
    0x3F80_8000,
];

fn encode(d: FloatDtype, v: f32) -> Vec<u8> {
    match d {
        FloatDtype::F32 => v.to_le_bytes().to_vec(),
        FloatDtype::BF16 => half::bf16::from_f32(v).to_bits().to_le_bytes().to_vec(),
        FloatDtype::F16 => half::f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
    }
}

/// `models` tensors (base first) of `n` elements: base values in ±0.03, deltas in ±0.001
/// (scaled per model), some elements equal to the base, specials when asked.
fn make_inputs(
    rng: &mut Rng,
    d: FloatDtype,
    n: usize,
    models: usize,
    specials: bool,
) -> Vec<Vec<u8>> {
    let base: Vec<f32> = (0..n).map(|_| rng.unit() * 0.06).collect();
    let mut out = vec![base.iter().flat_map(|&v| encode(d, v)).collect::<Vec<u8>>()];
    for m in 1..models {
        let scale = 0.002 * m as f32;
        let mut vals: Vec<f32> = base
            .iter()
            .map(|&b| {
                let r = rng.next();
                if r.is_multiple_of(17) {
                    b
                } else {
                    b + rng.unit() * scale
                }
            })
            .collect();
        if specials {
            for v in vals.iter_mut() {
                let r = rng.next();
                if r.is_multiple_of(97) {
                    *v = f32::from_bits(SPECIALS[(r >> 8) as usize % SPECIALS.len()]);
                }
            }
        }
        out.push(vals.iter().flat_map(|&v| encode(d, v)).collect());
    }
    out
}

/// A tensor to write: name, dtype, shape, bytes.
type StTensor = (String, FloatDtype, Vec<u64>, Vec<u8>);

fn write_safetensors(path: &Path, tensors: &[StTensor]) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, d, shape, data) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": d.name(), "shape": shape, "data_offsets": [off, off + data.len()]}),
        );
        off += data.len();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for (_, _, _, data) in tensors {
        bytes.extend(data);
    }
    std::fs::write(path, bytes).unwrap();
}

fn read_safetensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
    let body = &bytes[8 + hlen..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k.clone(), body[a..b].to_vec())
        })
        .collect()
}

fn params_json(p: &MethodParams) -> serde_json::Value {
    serde_json::json!({
        "inputs": p.inputs.iter().map(|i| serde_json::json!({
            "weight": i.weight, "density": i.density, "gamma": i.gamma, "epsilon": i.epsilon})).collect::<Vec<_>>(),
        "normalize": p.normalize, "rescale": p.rescale, "lambda": p.lambda,
        "t": p.t, "filter_wise": p.filter_wise, "seed": p.seed,
    })
}

struct Case {
    label: String,
    params: MethodParams,
    compute: FloatDtype,
    storage: FloatDtype,
    out: FloatDtype,
    specials: bool,
    shapes: Vec<Vec<u64>>,
}

/// Runs one case: every shape through Rust (several chunkings and thread counts, which must
/// agree) and through the numpy reference, and compares bytes.
fn run_case(py: &Path, dir: &Path, case: &Case, seed: u64) {
    let models = match case.params.method {
        Method::Slerp => 2,
        Method::ModelStock => 4,
        _ => case.params.inputs.len() + 1,
    };
    let mut rng = Rng(seed);
    let mut files: Vec<Vec<StTensor>> = vec![Vec::new(); models];
    let mut rust: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut per_tensor = serde_json::Map::new();
    for (ti, shape) in case.shapes.iter().enumerate() {
        let n: u64 = shape.iter().product();
        let name = format!("model.layers.{ti}.w");
        let inputs = make_inputs(&mut rng, case.storage, n as usize, models, case.specials);
        let mut params = case.params.clone();
        if params.method == Method::Slerp {
            params.t = [0.0, 0.3, 0.5, 1.0, 0.77][ti % 5];
            per_tensor.insert(name.clone(), serde_json::json!({"t": params.t}));
        }
        let dtypes = vec![case.storage; models];
        let ctx = TensorCtx {
            name: &name,
            shape,
            compute: case.compute,
            inputs: &dtypes,
            out: case.out,
        };
        let refs: Vec<&[u8]> = inputs.iter().map(|v| v.as_slice()).collect();
        let mut first: Option<Vec<u8>> = None;
        for (chunk, threads) in [(u64::MAX, 1usize), (1, 2), (3 * 4096, 3), (5 * 4096, 2)] {
            let mut op = Op::new(&params, &ctx).unwrap_or_else(|e| panic!("{}: {e}", case.label));
            let got = exec::run(&mut op, &refs, case.out.size(), chunk, threads)
                .unwrap_or_else(|e| panic!("{}: {e}", case.label));
            match &first {
                None => first = Some(got),
                Some(f) => assert!(
                    f == &got,
                    "{} {name} {shape:?}: chunk {chunk} threads {threads} changed the bytes",
                    case.label
                ),
            }
        }
        rust.insert(name.clone(), first.unwrap_or_default());
        for (m, data) in inputs.into_iter().enumerate() {
            files[m].push((name.clone(), case.storage, shape.clone(), data));
        }
    }
    let mut paths = Vec::new();
    for (m, f) in files.iter().enumerate() {
        let p = dir.join(format!("{}-in{m}.safetensors", case.label));
        write_safetensors(&p, f);
        paths.push(p.display().to_string());
    }
    let spec = serde_json::json!({
        "method": case.params.method.name(), "compute": case.compute.name(), "out_dtype": case.out.name(),
        "inputs": paths, "params": params_json(&case.params), "per_tensor": per_tensor,
    });
    let spec_path = dir.join(format!("{}.json", case.label));
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let out_path = dir.join(format!("{}-ref.safetensors", case.label));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/mergekit_methods_ref.py"
    );
    let r = Command::new(py)
        .arg(script)
        .arg(&spec_path)
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "{}: reference failed:\n{}",
        case.label,
        String::from_utf8_lossy(&r.stderr)
    );
    let reference = read_safetensors(&out_path);
    for (name, bytes) in &rust {
        let want = &reference[name];
        if want != bytes {
            let size = case.out.size();
            let i = (0..bytes.len() / size)
                .find(|&i| bytes[i * size..(i + 1) * size] != want[i * size..(i + 1) * size])
                .unwrap_or(0);
            let differing = (0..bytes.len() / size)
                .filter(|&i| bytes[i * size..(i + 1) * size] != want[i * size..(i + 1) * size])
                .count();
            panic!(
                "{} {name}: {differing} elements differ from the numpy reference; first at {i}: rust {:02x?} numpy {:02x?}",
                case.label,
                &bytes[i * size..(i + 1) * size],
                &want[i * size..(i + 1) * size]
            );
        }
    }
}

fn shapes() -> Vec<Vec<u64>> {
    vec![
        vec![1],
        vec![7],
        vec![3, 5],
        vec![33, 130],
        vec![96, 333],
        vec![4, 4096],
    ]
}

fn gta(method: Method, densities: [f64; 3]) -> MethodParams {
    let mut p = MethodParams::new(method);
    p.inputs = densities
        .iter()
        .zip([1.0, 0.6, -0.4])
        .map(|(&d, w)| {
            let mut i = InputParams::new(w);
            i.density = d;
            i.gamma = 0.05;
            i.epsilon = 0.1;
            i
        })
        .collect();
    p.seed = 42;
    p
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    let dts = [FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32];
    for method in Method::ALL {
        for (vi, &d) in dts.iter().enumerate() {
            let mut params = match method {
                Method::Slerp | Method::ModelStock => MethodParams::new(method),
                Method::Della | Method::DellaLinear => gta(method, [0.5, 0.3, 1.0]),
                _ => gta(method, [0.5, 0.0, 1.0]),
            };
            if vi == 1 {
                params.lambda = 0.7;
                params.normalize = Some(!method.default_normalize());
            }
            if vi == 2 {
                params.rescale = Some(!method.default_rescale());
                params.filter_wise = true;
                let della = matches!(method, Method::Della | Method::DellaLinear);
                for (i, ip) in params.inputs.iter_mut().enumerate() {
                    ip.density = if della {
                        [0.85, 0.2, 0.15][i]
                    } else {
                        [0.9999, 0.2, 0.05][i]
                    };
                }
            }
            out.push(Case {
                label: format!("{}-{}", method.name(), d.name()),
                params,
                compute: d,
                storage: d,
                out: d,
                specials: vi == 0,
                shapes: shapes(),
            });
        }
        // Mixed: F32 storage, BF16 compute, F32 output.
        let params = match method {
            Method::Slerp | Method::ModelStock => MethodParams::new(method),
            _ => gta(method, [0.3, 0.7, 0.45]),
        };
        out.push(Case {
            label: format!("{}-mixed", method.name()),
            params,
            compute: FloatDtype::BF16,
            storage: FloatDtype::F32,
            out: FloatDtype::F32,
            specials: true,
            shapes: vec![vec![50, 100], vec![3, 4096]],
        });
    }
    out
}

#[test]
fn methods_match_the_numpy_reference_and_ignore_chunking() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    for (i, case) in cases().iter().enumerate() {
        run_case(&py, dir.path(), case, 1000 + i as u64);
    }
}

#[test]
fn large_bf16_ties_selection_uses_tie_passes_and_still_matches() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::Ties, Method::BreadcrumbsTies] {
        let case = Case {
            label: format!("large-{}", method.name()),
            params: gta(method, [0.37, 0.61, 0.2]),
            compute: FloatDtype::BF16,
            storage: FloatDtype::BF16,
            out: FloatDtype::BF16,
            specials: false,
            shapes: vec![vec![256, 1000]],
        };
        run_case(&py, dir.path(), &case, 7);
    }
}
