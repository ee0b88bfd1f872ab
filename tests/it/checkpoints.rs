//! Checkpoints as people have them: buffers one save keeps and another drops (`position_ids`,
//! rotary `inv_freq`), integer tensors in one model only, float weights in one model only
//! (refused unless `--only-in-aligned copy`), and vocabularies of different sizes (refused
//! unless `--vocab-mismatch copy-aligned`, which merges the shared rows and copies the aligned
//! model's extra ones). Inputs are written here with the `safetensors` crate; outputs are read
//! back with it and checked against the independent reference in `common`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use safetensors::Dtype;

/// A tensor to write: dtype, shape, raw little-endian bytes.
type Spec = (Dtype, Vec<usize>, Vec<u8>);

/// `n` deterministic BF16 values around zero (distinct per `seed`).
fn bf16s(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x as f32 / u32::MAX as f32 - 0.5) * 0.1;
            half::bf16::from_f32(v).to_le_bytes()
        })
        .collect()
}

fn i64s(values: impl Iterator<Item = i64>) -> Vec<u8> {
    values.flat_map(i64::to_le_bytes).collect()
}

/// Writes a one-file model with `tensors` and a config.json into `dir`.
fn write_model(dir: &Path, tensors: &BTreeMap<&str, Spec>) {
    std::fs::create_dir_all(dir).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| {
            (
                name.to_string(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}\n").unwrap();
}

/// The weights both models share: an embedding of `vocab` rows, a layer, an lm_head.
fn weights(vocab: usize, seed: u32) -> BTreeMap<&'static str, Spec> {
    let h = 8;
    BTreeMap::from([
        (
            "model.embed_tokens.weight",
            (Dtype::BF16, vec![vocab, h], bf16s(vocab * h, seed)),
        ),
        (
            "model.layers.0.mlp.up_proj.weight",
            (Dtype::BF16, vec![16, h], bf16s(16 * h, seed + 1)),
        ),
        (
            "lm_head.weight",
            (Dtype::BF16, vec![vocab, h], bf16s(vocab * h, seed + 2)),
        ),
    ])
}

fn expo_pair(sft: &Path, aligned: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "expo",
        "--sft",
        sft.to_str().unwrap(),
        "--aligned",
        aligned.to_str().unwrap(),
        "--alpha",
        "0.3",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn provenance(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("mergestream.json")).unwrap()).unwrap()
}

#[test]
fn buffers_and_integer_tensors_in_one_model_need_no_flag() {
    let dir = tempdir();
    let (sft, aligned) = (dir.path().join("sft"), dir.path().join("aligned"));
    // An older SFT save keeps buffers a newer aligned save drops, and vice versa.
    let mut s = weights(32, 1);
    s.insert(
        "embeddings.position_ids",
        (Dtype::I64, vec![1, 16], i64s(0..16)),
    );
    s.insert(
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        (
            Dtype::F32,
            vec![4],
            [1.0f32, 0.1, 0.01, 0.001]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    );
    let mut a = weights(32, 11);
    a.insert("model.step_counter", (Dtype::I64, vec![1], i64s(7..8)));
    a.insert(
        "model.rotary_emb.inv_freq",
        (
            Dtype::F32,
            vec![2],
            [1.0f32, 0.5].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    );
    write_model(&sft, &s);
    write_model(&aligned, &a);

    let plan = run(&[
        "plan",
        "--sft",
        sft.to_str().unwrap(),
        "--aligned",
        aligned.to_str().unwrap(),
        "--alpha",
        "0.3",
    ]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let text = String::from_utf8_lossy(&plan.stdout);
    for needle in [
        "tensor 'embeddings.position_ids': only in --sft: left out",
        "tensor 'model.layers.0.self_attn.rotary_emb.inv_freq': only in --sft: left out",
        "tensor 'model.step_counter': only in --aligned (an integer tensor): copied from it",
        "tensor 'model.rotary_emb.inv_freq': only in --aligned (a buffer transformers does not save): copied from it",
    ] {
        assert!(text.contains(needle), "{needle:?} not in plan:\n{text}");
    }

    let out = dir.path().join("out");
    let o = expo_pair(&sft, &aligned, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("only in --sft: left out"),
        "{}",
        stderr(&o)
    );
    let merged = load_model(&out);
    let names: Vec<&str> = merged.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "lm_head.weight",
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.rotary_emb.inv_freq",
            "model.step_counter"
        ]
    );
    assert_eq!(merged["model.step_counter"].data, a["model.step_counter"].2);
    assert_eq!(
        merged["model.rotary_emb.inv_freq"].data,
        a["model.rotary_emb.inv_freq"].2
    );
    // The weights both have are merged exactly.
    for name in ["lm_head.weight", "model.embed_tokens.weight"] {
        let (m, av, sv) = (&merged[name].data, &a[name].2, &s[name].2);
        for i in (0..m.len()).step_by(2) {
            let want =
                expo_element_mixed(Dtype::BF16, Dtype::BF16, 0.3, &av[i..i + 2], &sv[i..i + 2]);
            assert_eq!(&m[i..i + 2], &want[..], "{name} byte {i}");
        }
    }
    let notes = provenance(&out)["notes"].as_array().unwrap().len();
    assert_eq!(notes, 4, "{}", provenance(&out));
}

#[test]
fn a_buffer_in_both_models_is_copied_not_merged() {
    let dir = tempdir();
    let (sft, aligned) = (dir.path().join("sft"), dir.path().join("aligned"));
    let inv = |v: f32| {
        (
            Dtype::F32,
            vec![2],
            [v, v / 2.0]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>(),
        )
    };
    let mut s = weights(16, 2);
    s.insert("model.rotary_emb.inv_freq", inv(3.0));
    let mut a = weights(16, 12);
    a.insert("model.rotary_emb.inv_freq", inv(1.0));
    write_model(&sft, &s);
    write_model(&aligned, &a);
    let out = dir.path().join("out");
    let o = expo_pair(&sft, &aligned, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        load_model(&out)["model.rotary_emb.inv_freq"].data,
        inv(1.0).2
    );
}

#[test]
fn a_float_weight_in_one_model_is_refused_unless_asked_to_copy() {
    let dir = tempdir();
    let (sft, aligned) = (dir.path().join("sft"), dir.path().join("aligned"));
    let s = weights(16, 3);
    let mut a = weights(16, 13);
    a.insert(
        "model.layers.0.mlp.extra_proj.weight",
        (Dtype::BF16, vec![4, 8], bf16s(32, 5)),
    );
    write_model(&sft, &s);
    write_model(&aligned, &a);
    let out = dir.path().join("out");
    let o = expo_pair(&sft, &aligned, &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let msg = stderr(&o);
    assert!(
        msg.contains("model.layers.0.mlp.extra_proj.weight")
            && msg.contains("--only-in-aligned copy"),
        "{msg}"
    );
    assert!(!out.exists(), "a refused run created its output");

    let o = expo_pair(&sft, &aligned, &out, &["--only-in-aligned", "copy"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = load_model(&out);
    assert_eq!(
        merged["model.layers.0.mlp.extra_proj.weight"].data,
        a["model.layers.0.mlp.extra_proj.weight"].2
    );
    run_ok(&["verify", out.to_str().unwrap()]);
}

/// openchat_3.5 added two tokens to Mistral's 32000: the aligned model has 32002 rows.
#[test]
fn vocabularies_32000_and_32002_merge_shared_rows_and_copy_the_extra_ones() {
    let dir = tempdir();
    let (sft, aligned) = (dir.path().join("sft"), dir.path().join("aligned"));
    let (s, a) = (weights(32000, 4), weights(32002, 14));
    write_model(&sft, &s);
    write_model(&aligned, &a);
    let out = dir.path().join("out");

    let o = expo_pair(&sft, &aligned, &out, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let msg = stderr(&o);
    for needle in [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "--vocab-mismatch copy-aligned",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in: {msg}");
    }
    assert!(!out.exists());

    for threads in ["1", "2"] {
        let out = dir.path().join(format!("out-{threads}"));
        let o = expo_pair(
            &sft,
            &aligned,
            &out,
            &[
                "--vocab-mismatch",
                "copy-aligned",
                "--threads",
                threads,
                "--chunk-size",
                "64KiB",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("32002 rows in --aligned, 32000 in --sft"),
            "{}",
            stderr(&o)
        );
        let merged = load_model(&out);
        for name in ["lm_head.weight", "model.embed_tokens.weight"] {
            let (m, av, sv) = (&merged[name], &a[name].2, &s[name].2);
            assert_eq!(m.shape, vec![32002, 8]);
            let shared = 32000 * 8 * 2;
            for i in (0..shared).step_by(2) {
                let want =
                    expo_element_mixed(Dtype::BF16, Dtype::BF16, 0.3, &av[i..i + 2], &sv[i..i + 2]);
                assert_eq!(&m.data[i..i + 2], &want[..], "{name} byte {i}");
            }
            assert_eq!(
                &m.data[shared..],
                &av[shared..],
                "{name}: extra rows are the aligned model's"
            );
        }
        run_ok(&["verify", out.to_str().unwrap()]);
    }
}
