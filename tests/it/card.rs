//! The output's own model card (`README.md`), the merge config of a config merge
//! (`mergekit_config.yml`), and the input's subdirectories (`1_Pooling/`): what the card says
//! (read back with a YAML parser), that its command makes the same bytes again, that nothing of
//! the input's own card or config is passed off as the output's, and that files in
//! subdirectories are copied, listed in `checksums.b3` with relative paths and checked by
//! `verify` and `b3sum --check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// The front matter of a card: each key with its scalar value or its list of scalars, read
/// with a YAML parser.
fn front_matter(card: &str) -> BTreeMap<String, Vec<String>> {
    use saphyr_parser::{Event, Parser};
    let body = card
        .strip_prefix("---\n")
        .expect("the card starts with front matter");
    let end = body.find("\n---\n").expect("front matter ends");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut key: Option<String> = None;
    let mut in_seq = false;
    let mut depth = 0;
    for event in Parser::new_from_str(&body[..end + 1]) {
        match event.expect("the front matter is valid YAML").0 {
            Event::MappingStart(..) => depth += 1,
            Event::MappingEnd => depth -= 1,
            Event::SequenceStart(..) => in_seq = true,
            Event::SequenceEnd => {
                in_seq = false;
                key = None;
            }
            Event::Scalar(v, ..) => {
                assert_eq!(depth, 1, "only a flat mapping of scalars and lists");
                match (&key, in_seq) {
                    (None, _) => {
                        key = Some(v.to_string());
                        out.insert(v.to_string(), Vec::new());
                    }
                    (Some(k), true) => out.get_mut(k).unwrap().push(v.to_string()),
                    (Some(k), false) => {
                        out.get_mut(k).unwrap().push(v.to_string());
                        key = None;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first ```sh block of a card.
fn shell_block(card: &str) -> String {
    let start = card.find("```sh\n").expect("a shell block") + 6;
    let len = card[start..].find("```").unwrap();
    card[start..start + len].trim().to_owned()
}

/// Runs a command line from a card (plain words, `OUT` replaced by `out`) in `cwd`.
fn run_card_command(line: &str, cwd: &Path, out: &Path) {
    let words: Vec<String> = line
        .split_whitespace()
        .map(|w| {
            if w == "OUT" {
                out.to_str().unwrap().to_owned()
            } else {
                w.to_owned()
            }
        })
        .collect();
    assert_eq!(words[0], "mergestream", "{line}");
    let o = Command::new(bin())
        .args(&words[1..])
        .arg("--quiet")
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(o.status.success(), "{line}: {}", stderr(&o));
}

/// blake3 of every file under `dir`, by relative path, subdirectories included.
fn deep_digest(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.insert(
                    rel,
                    blake3::hash(&std::fs::read(&path).unwrap())
                        .to_hex()
                        .to_string(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

pub fn assert_same_deep_tree(a: &Path, b: &Path) {
    assert_eq!(
        deep_digest(a),
        deep_digest(b),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

/// The names `checksums.b3` lists.
fn manifest_names(out: &Path) -> Vec<String> {
    read(&out.join("checksums.b3"))
        .lines()
        .map(|l| l.split_once("  ").unwrap().1.to_owned())
        .collect()
}

fn pair(dir: &Path) -> PathBuf {
    let pair = dir.join("pair");
    synth(
        &pair,
        &["--preset", "tiny-llama", "--int-buffer", "--seed", "5"],
    );
    pair
}

/// Gives the aligned model what real checkpoints carry beside their weights: its own card and
/// merge config, sentence-transformers-style subdirectories (one with weights of its own), and
/// hidden directories that belong to tools, not to the model.
fn decorate(aligned: &Path) {
    let write = |rel: &str, text: &str| {
        let path = aligned.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(
        "README.md",
        "---\nlicense: apache-2.0\n---\n# The aligned model\n",
    );
    write("mergekit_config.yml", "merge_method: linear\n");
    write(
        "1_Pooling/config.json",
        "{\"pooling_mode_mean_tokens\": true}\n",
    );
    write("2_Dense/config.json", "{\"in_features\": 64}\n");
    write("2_Dense/model.safetensors", "not merged");
    write("3_Deep/a/b/notes.txt", "deep\n");
    write(".git/HEAD", "ref: refs/heads/main\n");
    write(".cache/huggingface/x.lock", "");
    write("1_Pooling/.hidden", "tool state\n");
}

#[test]
fn the_card_is_the_outputs_own_and_its_command_makes_the_same_bytes() {
    let dir = tempdir();
    let pair = pair(dir.path());
    decorate(&pair.join("aligned"));
    let out = dir.path().join("out");
    let o = expo(&pair, &out, "0.3", &["--max-shard-size", "100KB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let card = read(&out.join("README.md"));
    assert!(
        !card.contains("The aligned model"),
        "the aligned model's card was copied"
    );
    assert!(!out.join("mergekit_config.yml").exists());

    let meta = front_matter(&card);
    let (sft, aligned) = (
        format!("{}/sft", pair.display()),
        format!("{}/aligned", pair.display()),
    );
    assert_eq!(meta["base_model"], [sft.clone(), aligned.clone()]);
    assert_eq!(meta["tags"], ["merge", "mergestream", "expo"]);
    assert_eq!(meta["library_name"], ["transformers"]);
    assert_eq!(meta["base_model_relation"], ["merge"]);

    for needle in [
        "output = aligned + alpha * (aligned - sft)        alpha = 0.3",
        &format!("mergestream {}", env!("CARGO_PKG_VERSION")),
        "b3sum --check checksums.b3",
        "mergestream verify .",
        // What was not copied, and why.
        "`README.md` of",
        "`2_Dense/model.safetensors` of",
    ] {
        assert!(card.contains(needle), "the card lacks {needle:?}:\n{card}");
    }
    let command = shell_block(&card);
    assert_eq!(
        command,
        format!("mergestream expo --sft {sft} --aligned {aligned} --alpha 0.3 --max-shard-size 100KB --out OUT")
    );
    assert!(manifest_names(&out).contains(&"README.md".to_string()));

    // The command as the card gives it makes the same bytes, card included.
    let again = dir.path().join("again");
    run_card_command(&command, Path::new("/"), &again);
    assert_same_deep_tree(&out, &again);
}

#[test]
fn subdirectories_are_copied_listed_and_verified() {
    let dir = tempdir();
    let pair = pair(dir.path());
    decorate(&pair.join("aligned"));
    let out = dir.path().join("out");

    let plan = run_ok(&[
        "plan",
        "--sft",
        pair.join("sft").to_str().unwrap(),
        "--aligned",
        pair.join("aligned").to_str().unwrap(),
        "--alpha",
        "0.3",
    ]);
    let plan = String::from_utf8(plan.stdout).unwrap();
    for line in [
        "  1_Pooling/config.json  (copied)",
        "  3_Deep/a/b/notes.txt  (copied)",
        "  README.md  (written: this output's model card)",
        "  README.md  (not copied: it is the input's model card, about another model; mergestream writes this output's own)",
        "  mergekit_config.yml  (not copied: describes how the input was made, not the output)",
        "  2_Dense/model.safetensors  (not copied: weights in a subdirectory are not merged (only the top-level weights are))",
    ] {
        assert!(plan.lines().any(|l| l == line), "plan lacks {line:?}:\n{plan}");
    }
    assert!(!plan.contains(".git") && !plan.contains(".cache") && !plan.contains(".hidden"));

    // A sentence-transformers folder says so.
    std::fs::write(pair.join("aligned/modules.json"), "[]\n").unwrap();
    let o = expo(&pair, &out, "0.3", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        front_matter(&read(&out.join("README.md")))["library_name"],
        ["sentence-transformers"]
    );
    let names = manifest_names(&out);
    for name in [
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "3_Deep/a/b/notes.txt",
    ] {
        assert!(
            names.contains(&name.to_string()),
            "{name} not listed: {names:?}"
        );
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(pair.join("aligned").join(name)).unwrap(),
            "{name}"
        );
    }
    for absent in [
        "2_Dense/model.safetensors",
        ".git",
        ".cache",
        "1_Pooling/.hidden",
    ] {
        assert!(!out.join(absent).exists(), "{absent} was copied");
    }
    assert!(std::fs::read_dir(out.join(".mergestream")).is_err());
    run_ok(&["verify", out.to_str().unwrap()]);
    let b3 = Command::new("b3sum")
        .args(["--check", "checksums.b3"])
        .current_dir(&out)
        .output()
        .expect("b3sum runs (scripts/test-env.sh installs it)");
    assert!(
        b3.status.success(),
        "{}",
        String::from_utf8_lossy(&b3.stderr)
    );
    assert!(String::from_utf8_lossy(&b3.stdout).contains("1_Pooling/config.json: OK"));

    // verify walks the subdirectories: an unlisted file in one, a changed one, and a directory
    // holding no listed file (reported once, by its name).
    std::fs::write(out.join("1_Pooling/extra.txt"), "x").unwrap();
    std::fs::write(out.join("3_Deep/a/b/notes.txt"), "changed\n").unwrap();
    std::fs::create_dir_all(out.join("junk/deeper")).unwrap();
    std::fs::write(out.join("junk/deeper/f"), "x").unwrap();
    let problems = match mergestream::verify::verify(&out) {
        Err(mergestream::Error::Verify { problems, .. }) => problems,
        other => panic!("verify passed a damaged output: {other:?}"),
    };
    use mergestream::error::VerifyCause as C;
    let mut seen: Vec<String> = problems
        .iter()
        .map(|p| match &p.cause {
            C::Unlisted { name, .. } => format!("unlisted {name}"),
            C::HashMismatch { name, .. } => format!("changed {name}"),
            other => panic!("unexpected problem: {other}"),
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "changed 3_Deep/a/b/notes.txt",
            "unlisted 1_Pooling/extra.txt",
            "unlisted junk"
        ]
    );
    let o = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("1_Pooling/extra.txt is not listed in checksums.b3"));
}

#[test]
fn a_file_in_an_output_subdirectory_that_is_not_ours_makes_the_output_not_empty() {
    let dir = tempdir();
    let pair = pair(dir.path());
    decorate(&pair.join("aligned"));
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("1_Pooling")).unwrap();
    std::fs::write(out.join("1_Pooling/mine.txt"), "user's").unwrap();
    let o = expo(&pair, &out, "0.3", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("1_Pooling/mine.txt"), "{}", stderr(&o));
    // Our own file there from an earlier run is no obstacle to --force, and the user's file
    // is left alone.
    let o = expo(&pair, &out, "0.3", &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&out.join("1_Pooling/mine.txt")), "user's");
}

#[test]
fn inputs_in_the_hub_cache_are_named_by_their_hub_ids() {
    let dir = tempdir();
    let pair = pair(dir.path());
    let hub = dir.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let mut snapshots = Vec::new();
    for (role, repo) in [
        ("sft", "openchat--openchat_3.5"),
        ("aligned", "berkeley-nest--Starling-LM-7B-alpha"),
    ] {
        let repo_dir = hub.join(format!("models--{repo}"));
        let snap = as_hf_cache(&pair.join(role), &repo_dir);
        let named = repo_dir.join("snapshots").join(commit);
        std::fs::rename(&snap, &named).unwrap();
        snapshots.push(named);
    }
    let out = dir.path().join("out");
    run_ok(&[
        "expo",
        "--sft",
        snapshots[0].to_str().unwrap(),
        "--aligned",
        snapshots[1].to_str().unwrap(),
        "--alpha",
        "0.2",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--hash-inputs",
    ]);
    let card = read(&out.join("README.md"));
    assert_eq!(
        front_matter(&card)["base_model"],
        [
            "openchat/openchat_3.5",
            "berkeley-nest/Starling-LM-7B-alpha"
        ]
    );
    assert!(
        card.contains("(Hugging Face: `openchat/openchat_3.5`)"),
        "{card}"
    );
    // The command names them by id and commit, which `expo` looks up in the cache: the same
    // bytes again.
    let command = shell_block(&card);
    assert_eq!(
        command,
        format!("mergestream expo --sft openchat/openchat_3.5@{commit} --aligned berkeley-nest/Starling-LM-7B-alpha@{commit} --alpha 0.2 --hash-inputs --out OUT")
    );
    let again = dir.path().join("again");
    let words: Vec<&str> = command.split_whitespace().collect();
    let o = Command::new(bin())
        .args(&words[1..words.len() - 1])
        .arg(&again)
        .arg("--quiet")
        .env("HF_HUB_CACHE", &hub)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_deep_tree(&out, &again);
    // `verify --inputs` takes the models as the card names them, too.
    let line = format!("mergestream verify . --inputs openchat/openchat_3.5@{commit} berkeley-nest/Starling-LM-7B-alpha@{commit}");
    assert!(card.contains(&format!("{line}   #")), "{card}");
    let words: Vec<&str> = line.split_whitespace().collect();
    let o = Command::new(bin())
        .args(&words[1..])
        .env("HF_HUB_CACHE", &hub)
        .current_dir(&again)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("5 input files match their SHA-256"));
}

#[test]
fn a_config_merge_writes_its_config_and_a_card_that_makes_the_same_bytes() {
    let dir = tempdir();
    let pair = pair(dir.path());
    decorate(&pair.join("sft"));
    let config_text = "# the base is the SFT model\nmerge_method: ties\nbase_model: pair/sft\nmodels:\n  - model: pair/aligned\n    parameters:\n      weight: 0.7\n      density: 0.5\ndtype: float32\n";
    let config = dir.path().join("ties.yml");
    std::fs::write(&config, config_text).unwrap();
    let out = dir.path().join("out");
    let o = Command::new(bin())
        .args([
            "merge",
            "ties.yml",
            "--out",
            "out",
            "--quiet",
            "--only-in-base",
            "copy",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&out.join("mergekit_config.yml")), config_text);
    let card = read(&out.join("README.md"));
    assert!(!card.contains("The aligned model"));
    let meta = front_matter(&card);
    // mergekit's order: the models, then the base model.
    assert_eq!(meta["base_model"], ["pair/aligned", "pair/sft"]);
    assert_eq!(meta["tags"], ["merge", "mergestream", "ties"]);
    assert!(
        card.contains(&format!("```yaml\n{config_text}```")),
        "{card}"
    );
    let names = manifest_names(&out);
    assert!(
        names.contains(&"mergekit_config.yml".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"1_Pooling/config.json".to_string()),
        "{names:?}"
    );

    // The command the card gives, run on the config it wrote, makes the same bytes.
    let block = {
        let after = &card[card.find("```sh\n").unwrap() + 6..];
        after[..after.find("```").unwrap()].trim().to_owned()
    };
    assert_eq!(
        block,
        "mergestream merge mergekit_config.yml --only-in-base copy --out OUT"
    );
    std::fs::copy(
        out.join("mergekit_config.yml"),
        dir.path().join("mergekit_config.yml"),
    )
    .unwrap();
    run_card_command(&block, dir.path(), &dir.path().join("again"));
    assert_same_deep_tree(&out, &dir.path().join("again"));
}

#[test]
fn cards_of_a_sweep_and_of_parts_are_the_single_runs() {
    let dir = tempdir();
    let pair = pair(dir.path());
    decorate(&pair.join("aligned"));
    let shard = ["--max-shard-size", "60KB"];
    let single = dir.path().join("single");
    let o = expo(&pair, &single, "0.2", &shard);
    assert!(o.status.success(), "{}", stderr(&o));

    let sweep = dir.path().join("sweep");
    let o = expo(&pair, &sweep, "0.1,0.2", &shard);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_deep_tree(&single, &sweep.join("alpha-0.2"));

    let parts = dir.path().join("parts");
    for part in ["2/3", "0/3", "1/3"] {
        let o = expo(&pair, &parts, "0.2", &[shard[0], shard[1], "--part", part]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    run_ok(&["finalize", parts.to_str().unwrap(), "--quiet"]);
    assert_same_deep_tree(&single, &parts);
}

/// Writes a one-file model of BF16 (or I64) tensors with a transformers config.
fn write_model(dir: &Path, tensors: &[(&str, safetensors::Dtype, Vec<usize>)]) {
    std::fs::create_dir_all(dir).unwrap();
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dtype, shape)| {
            let n: usize = shape.iter().product();
            let width = if *dtype == safetensors::Dtype::I64 {
                8
            } else {
                2
            };
            (0..n * width).map(|i| (i % 7) as u8 * 3).collect()
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), bytes)| {
            (
                name.to_string(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}\n").unwrap();
}

#[test]
fn the_card_lists_what_the_plan_resolved_and_the_flags_that_allowed_it() {
    use safetensors::Dtype::{BF16, I64};
    let dir = tempdir();
    let (sft, aligned) = (dir.path().join("sft"), dir.path().join("aligned"));
    write_model(
        &sft,
        &[
            ("model.embed_tokens.weight", BF16, vec![32000, 2]),
            ("model.position_ids", I64, vec![1, 4]),
        ],
    );
    write_model(
        &aligned,
        &[
            ("model.embed_tokens.weight", BF16, vec![32002, 2]),
            (
                "model.layers.0.self_attn.rotary_emb.inv_freq",
                BF16,
                vec![4],
            ),
        ],
    );
    let out = dir.path().join("out");
    run_ok(&[
        "expo",
        "--sft",
        sft.to_str().unwrap(),
        "--aligned",
        aligned.to_str().unwrap(),
        "--alpha",
        "0.5",
        "--vocab-mismatch",
        "copy-aligned",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let card = read(&out.join("README.md"));
    let notes = &card[card.find("## Notes").expect("a notes section")..];
    for needle in [
        "- tensor 'model.embed_tokens.weight': 32002 rows in --aligned, 32000 in --sft: 32000 rows merged, the 2 extra rows copied from --aligned (--vocab-mismatch copy-aligned)",
        "- tensor 'model.layers.0.self_attn.rotary_emb.inv_freq': only in --aligned (a buffer transformers does not save): copied from it",
        "- tensor 'model.position_ids': only in --sft: left out",
    ] {
        assert!(notes.contains(needle), "the notes lack {needle:?}:\n{notes}");
    }
    assert!(
        shell_block(&card).contains(" --alpha 0.5 --vocab-mismatch copy-aligned --out OUT"),
        "{card}"
    );
}
