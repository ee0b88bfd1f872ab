//! The plan: what a merge will write, decided from the input headers and options alone.
//!
//! [`Plan::build`] asks the output's [`Recipe`] for every tensor's ops (the method matches the
//! models tensor by tensor, reporting every mismatch at once), lays out the output shards and
//! their headers byte for byte, writes the output's model card and provenance, and fingerprints
//! the whole. It
//! is deterministic — the same inputs and options give the same plan on any machine — which is
//! what lets partitioned runs ([`Part`]) coordinate without talking, and lets a resumed run
//! trust what an earlier one wrote. Nothing here reads tensor data or writes a file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::card::{self, Card, CardOptions, CARD_FILE, CONFIG_FILE};
use crate::error::{Error, Result};
use crate::format::header::{self, TensorInfo};
use crate::format::index::{self, INDEX_FILE};
pub use crate::method::{Input, Op, PlannedTensor, Segment};
use crate::method::{Note, Recipe};
use crate::model::Model;

/// The tool's name and version, as recorded in provenance.
pub const TOOL: &str = concat!("mergestream ", env!("CARGO_PKG_VERSION"));
/// The provenance file in an output directory.
pub const PROVENANCE_FILE: &str = "mergestream.json";
/// The checksum manifest in an output directory.
pub const MANIFEST_FILE: &str = "checksums.b3";

/// One output shard: its name, its tensors (a range of [`Plan::tensors`]) and its header bytes.
#[derive(Debug, Clone)]
pub struct OutShard {
    /// File name, e.g. `model-00001-of-00003.safetensors`.
    pub name: String,
    /// Its tensors: a range of [`Plan::tensors`], in data order.
    pub tensors: std::ops::Range<usize>,
    /// Length prefix, header JSON and padding: everything before the data section.
    pub prefix: Vec<u8>,
    /// Bytes of the data section.
    pub data_len: u64,
}

impl OutShard {
    /// The whole file's length.
    pub fn file_len(&self) -> u64 {
        self.prefix.len() as u64 + self.data_len
    }
}

/// A non-weight file of the aligned model (config, tokenizer, …) copied to the output.
#[derive(Debug, Clone)]
pub struct ExtraFile {
    /// File name, the same in the output: a path relative to the model directory for a file in
    /// a subdirectory (`1_Pooling/config.json`), `/`-separated.
    pub name: String,
    /// Where it is copied from.
    pub source: PathBuf,
    /// Its length when planned.
    pub size: u64,
}

/// One of `count` partitions of a run: `--part index/count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Which part, from 0.
    pub index: u32,
    /// Of how many.
    pub count: u32,
}

impl Part {
    /// The whole run.
    pub const WHOLE: Part = Part { index: 0, count: 1 };

    /// Parses `I/N` with `0 <= I < N`.
    pub fn parse(text: &str) -> std::result::Result<Part, String> {
        let bad = || format!("'{text}' is not a part: use I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Part { index, count })
    }

    /// `part-I-of-N`, for file names.
    pub fn tag(self) -> String {
        format!("part-{}-of-{}", self.index, self.count)
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The complete description of an output.
#[derive(Debug)]
pub struct Plan {
    /// What the output is made of.
    pub recipe: Recipe,
    /// What the plan resolved on its own (buffers left out or copied, extra vocabulary rows).
    pub notes: Vec<Note>,
    /// Every output tensor, in output order.
    pub tensors: Vec<PlannedTensor>,
    /// The output shards, in order.
    pub shards: Vec<OutShard>,
    /// Non-weight files copied from the aligned model, those of its subdirectories included.
    pub extra_files: Vec<ExtraFile>,
    /// Files of the aligned model directory that are not copied, with why.
    pub skipped_files: Vec<(String, &'static str)>,
    /// Bytes of tensor data (the index's `total_size`).
    pub total_size: u64,
    /// The index JSON, for sharded outputs.
    pub index_json: Option<String>,
    /// The `mergestream.json` provenance text (without the inputs' SHA-256, which `finalize`
    /// adds when the run records them).
    pub provenance_json: String,
    /// The output's model card (`README.md`).
    pub card: Card,
    /// The merge config, for config merges (`mergekit_config.yml`).
    pub config_yml: Option<String>,
    /// Whether the run records the SHA-256 of every input file (`--hash-inputs`).
    pub hash_inputs: bool,
    /// blake3 over everything that determines the output bytes, in hex.
    pub fingerprint: String,
}

/// What shapes an output besides its recipe and inputs.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Largest shard, in bytes of data (a larger tensor gets a shard of its own).
    pub max_shard_size: u64,
    /// Record the SHA-256 of every input file in provenance and the card (`--hash-inputs`).
    pub hash_inputs: bool,
}

impl Plan {
    /// Plans the output `recipe` makes from `models`, in shards of at most `max_shard_size`
    /// bytes of data (a larger tensor gets a shard of its own).
    pub fn build(recipe: &Recipe, models: &[Model], max_shard_size: u64) -> Result<Plan> {
        Plan::build_with(
            recipe,
            models,
            &PlanOptions {
                max_shard_size,
                hash_inputs: false,
            },
        )
    }

    /// Plans the output `recipe` makes from `models`, shaped by `options`.
    pub fn build_with(recipe: &Recipe, models: &[Model], options: &PlanOptions) -> Result<Plan> {
        let max_shard_size = options.max_shard_size;
        let (tensors, notes) = recipe.plan_tensors(models)?;
        let mut metadata = vec![
            ("format".to_string(), "pt".to_string()),
            ("mergestream.tool".into(), TOOL.into()),
        ];
        metadata.extend(recipe.metadata(models));
        let shards = lay_out(&tensors, &metadata, max_shard_size);
        let total_size = tensors.iter().map(|t| t.nbytes).sum();
        let index_json = (shards.len() > 1).then(|| {
            let map: BTreeMap<String, String> = shards
                .iter()
                .flat_map(|s| {
                    tensors[s.tensors.clone()]
                        .iter()
                        .map(|t| (t.name.clone(), s.name.clone()))
                })
                .collect();
            index::encode(total_size, &map)
        });
        let (extra_files, skipped_files) = extra_files(&models[recipe.layout_model()])?;

        let mut provenance = recipe.provenance(models);
        provenance.insert("tool".into(), TOOL.into());
        if !notes.is_empty() {
            provenance.insert(
                "notes".into(),
                notes
                    .iter()
                    .map(|n| serde_json::json!({"tensor": n.tensor, "note": n.note}))
                    .collect::<Vec<_>>()
                    .into(),
            );
        }
        provenance.insert(
            "output".into(),
            serde_json::json!({
                "tensors": tensors.len(),
                "shards": shards.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
                "total_size": total_size,
            }),
        );
        let mut provenance_json =
            serde_json::to_string_pretty(&serde_json::Value::Object(provenance))
                .expect("serializing JSON cannot fail");
        provenance_json.push('\n');
        let card = Card::new(
            recipe,
            models,
            &CardOptions {
                max_shard_size,
                hash_inputs: options.hash_inputs,
                notes: &notes,
                skipped_files: &skipped_files,
            },
        );
        let config_yml = card::config_file(recipe);

        let mut plan = Plan {
            recipe: recipe.clone(),
            notes,
            tensors,
            shards,
            extra_files,
            skipped_files,
            total_size,
            index_json,
            provenance_json,
            card,
            config_yml,
            hash_inputs: options.hash_inputs,
            fingerprint: String::new(),
        };
        let inputs: Vec<&Model> = recipe.models.iter().map(|&m| &models[m]).collect();
        plan.fingerprint = fingerprint(&plan, &inputs)?;
        Ok(plan)
    }

    /// Names of the output tensors, in order: outputs with the same sequence can share one read
    /// of their inputs.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Output shards written by `part`, balanced by bytes: largest first, each to the part with
    /// the fewest bytes so far (ties to the lowest part). Returned in shard order.
    pub fn shards_of(&self, part: Part) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        order.sort_by_key(|&s| (std::cmp::Reverse(self.shards[s].file_len()), s));
        let mut load = vec![0u64; part.count as usize];
        let mut mine = Vec::new();
        for s in order {
            let target = (0..load.len())
                .min_by_key(|&p| (load[p], p))
                .expect("count >= 1");
            load[target] += self.shards[s].file_len();
            if target == part.index as usize {
                mine.push(s);
            }
        }
        mine.sort_unstable();
        mine
    }

    /// Every file name the finished output directory holds, checksums manifest excluded.
    pub fn output_files(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shards.iter().map(|s| s.name.clone()).collect();
        if self.index_json.is_some() {
            names.push(INDEX_FILE.into());
        }
        names.push(PROVENANCE_FILE.into());
        names.push(CARD_FILE.into());
        if self.config_yml.is_some() {
            names.push(CONFIG_FILE.into());
        }
        names.extend(self.extra_files.iter().map(|f| f.name.clone()));
        names.sort();
        names
    }
}

/// Splits `tensors` greedily into shards of at most `max_shard_size` data bytes (a larger tensor
/// gets a shard of its own), as `transformers` does, and encodes each shard's header.
fn lay_out(
    tensors: &[PlannedTensor],
    metadata: &[(String, String)],
    max_shard_size: u64,
) -> Vec<OutShard> {
    let mut ranges = Vec::new();
    let (mut start, mut size) = (0usize, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        if i > start && size + t.nbytes > max_shard_size {
            ranges.push(start..i);
            start = i;
            size = 0;
        }
        size += t.nbytes;
    }
    ranges.push(start..tensors.len());
    let count = ranges.len();
    ranges
        .into_iter()
        .enumerate()
        .map(|(k, range)| {
            let mut offset = 0;
            let infos: Vec<TensorInfo> = tensors[range.clone()]
                .iter()
                .map(|t| {
                    let info = TensorInfo {
                        name: t.name.clone(),
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        start: offset,
                        end: offset + t.nbytes,
                    };
                    offset += t.nbytes;
                    info
                })
                .collect();
            OutShard {
                name: shard_name(k, count),
                tensors: range,
                prefix: header::encode(metadata, &infos),
                data_len: offset,
            }
        })
        .collect()
}

/// `model.safetensors`, or `model-00001-of-00003.safetensors`.
pub(crate) fn shard_name(k: usize, count: usize) -> String {
    if count == 1 {
        crate::model::SINGLE_FILE.into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", k + 1, count)
    }
}

/// Whether a file of a model directory holds weights (in any format) or is an index of them.
fn is_weight_file(name: &str) -> bool {
    const WEIGHT_SUFFIXES: [&str; 13] = [
        ".safetensors",
        ".mszst",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".onnx",
        ".ot",
        ".pkl",
        ".index.json",
    ];
    WEIGHT_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// How deep `extra_files` goes into subdirectories.
const MAX_DEPTH: usize = 8;

/// Files, found and not copied, of a model directory: `(copied, skipped with why)`.
type Listing = (Vec<ExtraFile>, Vec<(String, &'static str)>);

/// The layout model's non-weight files (a model named as a single file has none), sorted by
/// name: those at the top of its directory and those of its subdirectories (sentence-transformers'
/// `1_Pooling/`), except hidden ones (`.git`, `.cache`, `.huggingface`). Its model card and merge
/// config are not copied (they describe the input, not the output), nor are weight files in
/// subdirectories (they are not merged).
fn extra_files(layout: &Model) -> Result<Listing> {
    let mut listing = (Vec::new(), Vec::new());
    if layout.path.is_file() {
        return Ok(listing);
    }
    let mut walked = Vec::new();
    list_dir(&layout.dir, "", &mut walked, &mut listing)?;
    listing.0.sort_by(|a, b| a.name.cmp(&b.name));
    listing.1.sort();
    Ok(listing)
}

/// Adds the files of `dir` (named `prefix` + name) to `listing`, and those of its
/// subdirectories; `walked` holds the directories seen, so a link back up is not followed.
fn list_dir(
    dir: &std::path::Path,
    prefix: &str,
    walked: &mut Vec<(u64, u64)>,
    listing: &mut Listing,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let top = prefix.is_empty();
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, "listing model directory", e))?;
    if walked.contains(&(meta.dev(), meta.ino())) {
        listing.1.push((
            prefix.trim_end_matches('/').to_owned(),
            "a link to a directory already copied",
        ));
        return Ok(());
    }
    walked.push((meta.dev(), meta.ino()));
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(dir, "listing model directory", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "listing model directory", e))?;
        let Ok(name) = entry.file_name().into_string() else {
            listing.1.push((
                format!("{prefix}{}", entry.file_name().to_string_lossy()),
                "name is not UTF-8",
            ));
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let rel = format!("{prefix}{name}");
        let why = match () {
            _ if top && [PROVENANCE_FILE, MANIFEST_FILE, crate::packed::PACKED_MANIFEST].contains(&name.as_str()) => continue,
            _ if top && is_weight_file(&name) => continue,
            _ if top && name == CARD_FILE => Some(
                "it is the input's model card, about another model; mergestream writes this output's own",
            ),
            _ if top && name == CONFIG_FILE => {
                Some("describes how the input was made, not the output")
            }
            _ if is_weight_file(&name) => {
                Some("weights in a subdirectory are not merged (only the top-level weights are)")
            }
            _ if name.contains(['\n', '\r', '\\']) => {
                Some("name has characters checksum lines cannot hold")
            }
            _ => None,
        };
        if let Some(why) = why {
            listing.1.push((rel, why));
            continue;
        }
        let source = entry.path();
        let Ok(meta) = std::fs::metadata(&source) else {
            listing.1.push((rel, "cannot be read (broken link?)"));
            continue;
        };
        if meta.is_dir() {
            if prefix.matches('/').count() >= MAX_DEPTH {
                listing.1.push((rel, "nested too deep"));
            } else {
                list_dir(&source, &format!("{rel}/"), walked, listing)?;
            }
        } else if meta.is_file() {
            listing.0.push(ExtraFile {
                name: rel,
                source,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

/// How much of each end of an input's data section the fingerprint samples.
const SAMPLE: u64 = 1 << 20;

/// blake3 over everything that decides the output's bytes: the tool, the output layout (every
/// shard header, which holds the method, alpha and input file list), the input headers, a sample
/// of each input's data (so two fine-tunes of one architecture differ) and the copied files.
fn fingerprint(plan: &Plan, inputs: &[&Model]) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(b"mergestream plan v2\0");
    h.update(TOOL.as_bytes());
    for shard in &plan.shards {
        h.update(shard.name.as_bytes());
        h.update(&shard.prefix);
    }
    h.update(plan.index_json.as_deref().unwrap_or("").as_bytes());
    h.update(plan.provenance_json.as_bytes());
    h.update(plan.card.head.as_bytes());
    h.update(plan.card.tail.as_bytes());
    h.update(plan.config_yml.as_deref().unwrap_or("").as_bytes());
    h.update(&[u8::from(plan.hash_inputs)]);
    let mut buf = vec![0u8; SAMPLE as usize];
    let mut cache = crate::model::ReadCache::new(1);
    for model in inputs {
        for shard in &model.shards {
            h.update(shard.name.as_bytes());
            h.update(&shard.len().to_le_bytes());
            h.update(&shard.digest);
            let len = shard.data_len;
            let head = len.min(SAMPLE);
            for (at, n) in [(0, head), (len - head, head)] {
                let buf = &mut buf[..n as usize];
                shard.read_at(at, buf, &mut cache)?;
                h.update(buf);
            }
        }
    }
    for f in &plan.extra_files {
        h.update(f.name.as_bytes());
        h.update(&f.size.to_le_bytes());
        crate::manifest::hash_into(&f.source, &mut h)?;
    }
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_parse() {
        assert_eq!(Part::parse("2/7"), Ok(Part { index: 2, count: 7 }));
        for bad in ["7/7", "1/0", "x/2", "3", "-1/2"] {
            assert!(Part::parse(bad).is_err(), "{bad}");
        }
    }

    /// A plan with shards of the given file lengths and nothing else.
    fn plan_of_shards(lens: &[u64]) -> Plan {
        Plan {
            recipe: Recipe {
                method: crate::method::Method::Expo { alpha: 0.0 },
                models: vec![0, 1],
                policy: Default::default(),
            },
            notes: Vec::new(),
            tensors: Vec::new(),
            shards: lens
                .iter()
                .enumerate()
                .map(|(k, &len)| OutShard {
                    name: shard_name(k, lens.len()),
                    tensors: 0..0,
                    prefix: Vec::new(),
                    data_len: len,
                })
                .collect(),
            extra_files: Vec::new(),
            skipped_files: Vec::new(),
            total_size: lens.iter().sum(),
            index_json: None,
            provenance_json: String::new(),
            card: Card {
                head: String::new(),
                tail: String::new(),
            },
            config_yml: None,
            hash_inputs: false,
            fingerprint: String::new(),
        }
    }

    /// Checks that the parts of `count` split the shards exactly (each once, in shard order) and
    /// that their byte loads differ by at most the largest shard; returns the loads.
    fn check_split(lens: &[u64], count: u32) -> Vec<u64> {
        let plan = plan_of_shards(lens);
        let mut seen = vec![0u32; lens.len()];
        let mut loads = Vec::new();
        for index in 0..count {
            let mine = plan.shards_of(Part { index, count });
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "{mine:?} not in order"
            );
            for &s in &mine {
                seen[s] += 1;
            }
            loads.push(mine.iter().map(|&s| lens[s]).sum::<u64>());
        }
        assert!(seen.iter().all(|&n| n == 1), "shards taken {seen:?} times");
        let largest = lens.iter().copied().max().unwrap_or(0);
        let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
        assert!(
            hi - lo <= largest,
            "loads {loads:?} differ by more than the largest shard ({largest})"
        );
        loads
    }

    #[test]
    fn parts_split_shards_by_bytes() {
        // Two parts, largest first to the lighter part: 10+4+1 and 9+5+1.
        assert_eq!(check_split(&[10, 9, 5, 4, 1, 1], 2), vec![15, 15]);
        // More parts than shards: the extra parts get nothing, and still a valid (empty) part.
        assert_eq!(check_split(&[3, 2, 1], 5), vec![3, 2, 1, 0, 0]);
        assert_eq!(check_split(&[7], 1), vec![7]);
        // Equal shards go round-robin from part 0, so part 0 is never the one left short.
        assert_eq!(check_split(&[5; 5], 2), vec![15, 10]);
    }

    proptest::proptest! {
        #[test]
        fn parts_split_and_balance(
            lens in proptest::collection::vec(1u64..5_000_000_000, 1..40),
            count in 1u32..12,
        ) {
            check_split(&lens, count);
            check_split(&lens, 2);
        }
    }

    #[test]
    fn weight_files() {
        for w in [
            "model.safetensors",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "model.safetensors.index.json",
            "consolidated.00.pth",
        ] {
            assert!(is_weight_file(w), "{w}");
        }
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer.model",
            "generation_config.json",
        ] {
            assert!(!is_weight_file(f), "{f}");
        }
    }
}
