//! The statistics methods (ties, dare_linear, dare_ties, slerp, model_stock, breadcrumbs,
//! breadcrumbs_ties, della, della_linear) through the binary: `mergestream merge CONFIG` on
//! generated model sets (`modelset`), every output tensor checked bit for bit against the
//! independent numpy reference `tests/python/mergekit_methods_ref.py` (run with
//! `MERGESTREAM_TEST_PYTHON`, else the venv of `scripts/test-env.sh`); the same bytes whatever
//! `--threads`, `--chunk-size`, `--memory` and `--part` (+ `finalize`); the edge cases: density
//! 0 and 1, NaN/±Inf inputs, tensors smaller than a block, a 0-D tensor, seeds, and rows too
//! long for the chunk buffers `--memory` allows (a typed error, before anything is written).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::modelset::{llama, rewrite_16bit, write_set, Dt, Merge, SetSpec};

const METHODS: [&str; 9] = [
    "ties",
    "dare_linear",
    "dare_ties",
    "slerp",
    "model_stock",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
];

/// A small Llama-shaped set: embeddings of 5 blocks, MLPs of 2.75 blocks, one-block
/// attention, norms of 64 elements (smaller than a block), a 0-D and a 3-element tensor.
fn small_set(dir: &Path, dtypes: Vec<Dt>, seed: u64, specials: bool) -> Vec<PathBuf> {
    let mut tensors = llama(64, 176, 320, 2);
    tensors.push(("model.scale".into(), vec![]));
    tensors.push(("model.layers.1.bias3".into(), vec![3]));
    write_set(
        dir,
        &SetSpec {
            tensors,
            dtypes,
            seed,
            specials,
            int_buffer: true,
        },
    )
}

/// Runs `mergestream merge` on `merge` over `dirs` into `out` with `extra` options.
fn merge_into(merge: &Merge, dirs: &[PathBuf], out: &Path, extra: &[&str]) -> std::process::Output {
    let config = out.with_extension("yml");
    std::fs::write(&config, merge.yaml(dirs)).unwrap();
    let mut args = vec![
        "merge",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn merge_ok(merge: &Merge, dirs: &[PathBuf], out: &Path, extra: &[&str]) {
    let r = merge_into(merge, dirs, out, extra);
    assert!(
        r.status.success(),
        "{} {extra:?}: {}",
        merge.method,
        stderr(&r)
    );
}

/// The numpy reference's output for `merge` over `dirs`, as a model directory.
fn reference(merge: &Merge, dirs: &[PathBuf], compute: Dt, out: &Path) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    let spec = out.join("spec.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&merge.reference_spec(dirs, compute)).unwrap(),
    )
    .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/mergekit_methods_ref.py"
    );
    let r = Command::new(crate::stats_methods::python())
        .arg(script)
        .arg(&spec)
        .arg(out.join("model.safetensors"))
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "reference failed for {}:\n{}",
        merge.method,
        String::from_utf8_lossy(&r.stderr)
    );
    out.to_path_buf()
}

/// Every float tensor of `got` equals the reference's bit for bit (dtype and shape too); the
/// integer buffer is the base model's.
fn assert_matches(label: &str, got: &Path, want: &Path, base: &Path) {
    let got = load_model(got);
    let want = load_model(want);
    let base = load_model(base);
    assert_eq!(got.len(), want.len() + 1, "{label}: tensor count");
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{label} {name}");
        if g.data != w.data {
            let size = g.dtype.bitsize() / 8;
            let diff: Vec<usize> = (0..g.data.len() / size)
                .filter(|&i| g.data[i * size..(i + 1) * size] != w.data[i * size..(i + 1) * size])
                .collect();
            let i = diff[0];
            panic!(
                "{label} {name}: {} of {} elements differ from the numpy reference; first at {i}: {:02x?} vs {:02x?}",
                diff.len(),
                g.data.len() / size,
                &g.data[i * size..(i + 1) * size],
                &w.data[i * size..(i + 1) * size]
            );
        }
    }
    assert_eq!(
        got["model.rotary.positions"], base["model.rotary.positions"],
        "{label}: the integer buffer is copied from the base model"
    );
}

/// Merges with `merge` and checks the result against the reference.
fn check(dir: &Path, label: &str, merge: &Merge, dirs: &[PathBuf], compute: Dt, extra: &[&str]) {
    let out = dir.join(format!("out-{label}"));
    merge_ok(merge, dirs, &out, extra);
    let want = reference(merge, dirs, compute, &dir.join(format!("ref-{label}")));
    assert_matches(label, &out, &want, &dirs[0]);
}

#[test]
fn every_method_matches_the_numpy_reference_in_every_dtype() {
    let dir = tempdir();
    for (di, dt) in [Dt::BF16, Dt::F16, Dt::F32].into_iter().enumerate() {
        let dirs = small_set(
            &dir.path().join(dt.st()),
            vec![dt; 3],
            100 + di as u64,
            true,
        );
        for method in METHODS {
            let mut merge = Merge::of(method);
            merge.dtype = Some(dt);
            check(
                dir.path(),
                &format!("{method}-{}", dt.st()),
                &merge,
                &dirs,
                dt,
                &[],
            );
        }
    }
}

/// Models stored in different dtypes and no `dtype:`: computed in the promoted dtype (F32),
/// written as `out_dtype`; with the methods' other parameters (lambda, normalize, rescale,
/// filter_wise, seed) away from their defaults.
#[test]
fn mixed_dtypes_promote_and_parameters_take_effect() {
    let dir = tempdir();
    let dirs = small_set(dir.path(), vec![Dt::BF16, Dt::F32, Dt::F16], 7, true);
    for method in METHODS {
        let mut merge = Merge::of(method);
        merge.out_dtype = Some(Dt::BF16);
        match method {
            "slerp" => merge.params = vec![("t", serde_json::json!(0.77))],
            "model_stock" => merge.params = vec![("filter_wise", serde_json::json!(true))],
            _ => {
                merge.params = vec![
                    ("lambda", serde_json::json!(0.7)),
                    ("normalize", serde_json::json!(method != "ties")),
                    ("rescale", serde_json::json!(!method.starts_with("d"))),
                ];
                if method.starts_with("dare") || method.starts_with("della") {
                    merge.params.push(("seed", serde_json::json!(7)));
                }
            }
        }
        check(
            dir.path(),
            &format!("{method}-mixed"),
            &merge,
            &dirs,
            Dt::F32,
            &[],
        );
    }
}

/// density 0 (nothing kept) and 1 (everything kept) on either model, in bf16 with specials.
#[test]
fn densities_at_their_edges() {
    let dir = tempdir();
    let dirs = small_set(dir.path(), vec![Dt::BF16; 3], 8, true);
    for method in [
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ] {
        for (a, b) in [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0)] {
            let mut merge = Merge::of(method);
            merge.dtype = Some(Dt::BF16);
            merge.models[0].1 = a;
            merge.models[1].1 = b;
            check(
                dir.path(),
                &format!("{method}-density-{a}-{b}"),
                &merge,
                &dirs,
                Dt::BF16,
                &[],
            );
        }
    }
}

/// NaN, ±Inf and −0 everywhere: one fine-tune's elements are, in turn, NaN, +Inf, −Inf, −0
/// or its own value, and the other's have the generator's sprinkled specials (F16, where
/// arithmetic also overflows to Inf).
#[test]
fn nan_and_inf_heavy_inputs_match_the_reference() {
    let dir = tempdir();
    let dirs = small_set(dir.path(), vec![Dt::F16; 3], 9, true);
    rewrite_16bit(&dirs[2], |_, i, bits| match i % 5 {
        0 => 0x7E00,
        1 => 0x7C00,
        2 => 0xFC00,
        3 => 0x8000,
        _ => bits,
    });
    for method in METHODS {
        let mut merge = Merge::of(method);
        merge.dtype = Some(Dt::F16);
        // slerp reads the base and the first model: give it the special-laden one.
        let set = if method == "slerp" {
            vec![dirs[0].clone(), dirs[2].clone()]
        } else {
            dirs.clone()
        };
        check(
            dir.path(),
            &format!("{method}-nan"),
            &merge,
            &set,
            Dt::F16,
            &[],
        );
    }
}

/// The same bytes whatever the threads, chunk sizes (any multiple of a block, or of a row),
/// memory budget and partition of the run.
#[test]
fn output_bytes_do_not_depend_on_run_settings() {
    let dir = tempdir();
    for (method, dt) in [
        ("ties", Dt::BF16),
        ("breadcrumbs_ties", Dt::F32),
        ("dare_ties", Dt::F16),
        ("della", Dt::F32),
        ("slerp", Dt::BF16),
        ("model_stock", Dt::F32),
    ] {
        let dirs = small_set(
            &dir.path().join(format!("set-{method}")),
            vec![dt; 3],
            11,
            true,
        );
        let mut merge = Merge::of(method);
        merge.dtype = Some(dt);
        let shard = ["--max-shard-size", "60KB"];
        let whole = dir.path().join(format!("{method}-whole"));
        merge_ok(
            &merge,
            &dirs,
            &whole,
            &[&shard[..], &["--threads", "1"]].concat(),
        );
        let shards = std::fs::read_dir(&whole)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".safetensors")
            })
            .count();
        assert!(shards >= 3, "{method}: {shards} shards");
        for (k, extra) in [
            &["--threads", "3"][..],
            &["--threads", "2", "--chunk-size", "16KiB"],
            &["--threads", "4", "--chunk-size", "40KiB"],
            &["--memory", "40MiB"],
        ]
        .iter()
        .enumerate()
        {
            let out = dir.path().join(format!("{method}-{k}"));
            merge_ok(&merge, &dirs, &out, &[&shard[..], extra].concat());
            assert_same_tree(&whole, &out);
            std::fs::remove_dir_all(&out).unwrap();
        }
        let parted = dir.path().join(format!("{method}-parts"));
        for part in ["2/3", "0/3", "1/3"] {
            merge_ok(
                &merge,
                &dirs,
                &parted,
                &[&shard[..], &["--part", part, "--threads", "2"]].concat(),
            );
        }
        run_ok(&["finalize", parted.to_str().unwrap()]);
        assert_same_tree(&whole, &parted);
        run_ok(&["verify", parted.to_str().unwrap()]);
    }
}

/// `seed` keys DARE's and DELLA's masks: another seed, other bytes (still the reference's).
#[test]
fn the_seed_keys_the_random_masks() {
    let dir = tempdir();
    let dirs = small_set(dir.path(), vec![Dt::BF16; 3], 12, false);
    for method in ["dare_ties", "della_linear"] {
        let mut merge = Merge::of(method);
        merge.dtype = Some(Dt::BF16);
        let default = dir.path().join(format!("{method}-default"));
        merge_ok(&merge, &dirs, &default, &[]);
        merge.params = vec![("seed", serde_json::json!(0))];
        let zero = dir.path().join(format!("{method}-zero"));
        merge_ok(&merge, &dirs, &zero, &[]);
        merge.params = vec![("seed", serde_json::json!(123456789))];
        check(
            dir.path(),
            &format!("{method}-seeded"),
            &merge,
            &dirs,
            Dt::BF16,
            &[],
        );
        let a = load_model(&default);
        let b = load_model(&zero);
        let c = load_model(&dir.path().join(format!("out-{method}-seeded")));
        assert_eq!(a, b, "{method}: the default seed is 0");
        assert_ne!(
            a["model.embed_tokens.weight"].data, c["model.embed_tokens.weight"].data,
            "{method}: another seed, another mask"
        );
    }
}

/// A row the method needs whole (DELLA ranks within rows) longer than the chunk buffers
/// `--memory` allows: a typed error naming the tensor and the `--memory` that would do, before
/// anything is created; with that much memory, the merge runs and matches the reference. A
/// `--chunk-size` below a block is refused the same way, and a 3-axis tensor for DELLA too.
#[test]
fn rows_longer_than_a_chunk_are_a_clear_error() {
    let dir = tempdir();
    let row = 300_000u64;
    let dirs = write_set(
        dir.path(),
        &SetSpec {
            tensors: vec![
                ("model.embed_tokens.weight".into(), vec![16, 64]),
                ("model.long_row".into(), vec![row]),
            ],
            dtypes: vec![Dt::F32; 3],
            seed: 13,
            specials: false,
            int_buffer: true,
        },
    );
    let mut merge = Merge::of("della");
    merge.dtype = Some(Dt::F32);
    let out = dir.path().join("out");
    let r = merge_into(
        &merge,
        &dirs,
        &out,
        &["--memory", "48MiB", "--threads", "2"],
    );
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    let err = stderr(&r);
    assert!(
        err.contains("tensor 'model.long_row'")
            && err.contains("rows of 300000 elements")
            && err.contains("raise --memory to at least"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is created before the error");
    // The --memory the message asks for is enough.
    let needed = err.rsplit("at least ").next().unwrap().trim().to_string();
    check(
        dir.path(),
        "long-row",
        &merge,
        &dirs,
        Dt::F32,
        &["--memory", &needed, "--threads", "2"],
    );
    // A chunk smaller than a block (hidden test option).
    let out = dir.path().join("small-chunk");
    let r = merge_into(&Merge::of("ties"), &dirs, &out, &["--chunk-size", "8KiB"]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("works on 4096 elements at a time"),
        "{}",
        stderr(&r)
    );
    // DELLA ranks within rows of 1-D and 2-D tensors only.
    let cube = write_set(
        &dir.path().join("cube"),
        &SetSpec {
            tensors: vec![("model.cube".into(), vec![2, 3, 4])],
            dtypes: vec![Dt::F32; 3],
            seed: 14,
            specials: false,
            int_buffer: false,
        },
    );
    let out = dir.path().join("cube-out");
    let r = merge_into(&merge, &cube, &out, &[]);
    assert_eq!(r.status.code(), Some(2), "{}", stderr(&r));
    assert_eq!(
        stderr(&r).trim(),
        "mergestream: error: tensor 'model.cube': della ranks within rows of 1-D and 2-D tensors; shape [2, 3, 4] has 3 axes"
    );
    assert!(!out.exists());
}

/// `--json` reports the input bytes read: SLERP reads its two inputs twice (the sums pass,
/// then the output), the copied integer buffer once.
#[test]
fn the_summary_counts_the_reads_of_every_pass() {
    let dir = tempdir();
    let dirs = small_set(dir.path(), vec![Dt::F32; 3], 15, false);
    let mut merge = Merge::of("slerp");
    merge.dtype = Some(Dt::F32);
    let out = dir.path().join("out");
    let r = merge_into(&merge, &dirs, &out, &["--json"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let float: u64 = load_model(&dirs[0])
        .values()
        .filter(|t| t.dtype == safetensors::Dtype::F32)
        .map(|t| t.data.len() as u64)
        .sum();
    let ints = 37 * 8;
    assert_eq!(
        summary["bytes_read"],
        serde_json::json!(2 * 2 * float + ints)
    );
}

/// A NaN or infinite parameter (`lambda`, `weight`, `density`, `gamma`, `epsilon`, slerp's
/// `t`) is refused while the merge is planned, from the config alone: exit 2, a message that
/// names the tensor, the parameter and the value, and nothing created. (model_stock takes no
/// numeric parameter.) A weight that is finite but overflows the compute dtype is refused
/// the same way.
#[test]
fn non_finite_parameters_are_refused_before_any_weight_is_read() {
    let dir = tempdir();
    let dirs = write_set(
        dir.path(),
        &SetSpec {
            tensors: vec![("model.w".into(), vec![8, 8])],
            dtypes: vec![Dt::BF16; 3],
            seed: 21,
            specials: false,
            int_buffer: false,
        },
    );
    // A value no test config uses, replaced in the YAML text by the one under test.
    const MARK: f64 = 12345.5;
    // (method, parameter, model (None: top level), YAML value, as printed)
    let cases: [(&str, &str, Option<usize>, &str, &str); 12] = [
        ("ties", "lambda", None, ".nan", "NaN"),
        ("ties", "weight", Some(1), ".inf", "inf"),
        ("dare_linear", "density", Some(0), ".inf", "inf"),
        ("dare_ties", "weight", Some(0), "-.inf", "-inf"),
        ("breadcrumbs", "gamma", Some(1), ".nan", "NaN"),
        ("breadcrumbs_ties", "lambda", None, "-.inf", "-inf"),
        ("breadcrumbs_ties", "density", Some(1), ".nan", "NaN"),
        ("della", "epsilon", Some(0), ".inf", "inf"),
        ("della_linear", "density", Some(1), ".inf", "inf"),
        ("slerp", "t", None, ".nan", "NaN"),
        ("slerp", "t", None, ".inf", "inf"),
        // Finite, but infinite in the compute dtype (bfloat16).
        ("ties", "weight", Some(0), "1.0e39", "1e39"),
    ];
    for (i, (method, param, model, yaml, shown)) in cases.into_iter().enumerate() {
        let mut merge = Merge::of(method);
        match model {
            None => {
                merge.params.retain(|(k, _)| *k != param);
                merge.params.push((param, serde_json::json!(MARK)));
            }
            Some(m) => {
                let p = &mut merge.models[m];
                match param {
                    "weight" => p.0 = MARK,
                    "density" => p.1 = MARK,
                    "gamma" => p.2 = MARK,
                    "epsilon" => p.3 = MARK,
                    _ => unreachable!(),
                }
            }
        }
        let text = merge.yaml(&dirs);
        assert_eq!(text.matches("12345.5").count(), 1, "{text}");
        let config = dir.path().join(format!("c{i}.yml"));
        std::fs::write(&config, text.replace("12345.5", yaml)).unwrap();
        let out = dir.path().join(format!("out{i}"));
        let r = run(&[
            "merge",
            config.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quiet",
        ]);
        let err = stderr(&r);
        let label = format!("{method} {param} {yaml}");
        assert_eq!(r.status.code(), Some(2), "{label}: {err}");
        assert!(
            err.contains("tensor 'model.w'")
                && err.contains(&format!("parameter '{param}'"))
                && err.contains(&format!(" is {shown}, but it must be a finite number")),
            "{label}: {err}"
        );
        assert_eq!(err.matches("model.w").count(), 1, "{label}: {err}");
        if let Some(m) = model {
            assert!(err.contains(&format!("of model {m} ")), "{label}: {err}");
        }
        assert!(!out.exists(), "{label}: nothing is created");
    }
}
