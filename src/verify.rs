//! `mergestream verify DIR`: check a finished output against its manifest and its own structure.
//!
//! Every file listed in `checksums.b3` is re-hashed; every shard's header is re-validated; the
//! index is cross-checked against the shards; files the manifest does not list and a leftover
//! work directory are reported. All problems are collected and reported together. Nothing is
//! written.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::header;
use crate::format::index::{self, INDEX_FILE};
use crate::manifest;
use crate::output::WORK_DIR;
use crate::plan::MANIFEST_FILE;

/// What a successful verification covered.
#[derive(Debug)]
pub struct Report {
    pub files: usize,
    pub bytes: u64,
    pub tensors: usize,
}

/// Verifies the output directory `dir`; `Err(Error::Verify)` lists every problem found.
pub fn verify(dir: &Path) -> Result<Report> {
    let mut problems = Vec::new();
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => text,
        Err(e) => {
            return Err(Error::Verify {
                path: dir.to_path_buf(),
                problems: vec![format!("{MANIFEST_FILE} cannot be read: {e}")],
            })
        }
    };
    let entries = manifest::parse(&manifest_path, &text).unwrap_or_else(|mut p| {
        problems.append(&mut p);
        Vec::new()
    });
    let listed: BTreeSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    if listed.len() != entries.len() {
        problems.push(format!("{MANIFEST_FILE} lists a file more than once"));
    }

    let mut bytes = 0;
    for entry in &entries {
        let path = dir.join(&entry.name);
        match manifest::hash_file(&path) {
            Ok(hash) if hash == entry.hash => {
                bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            }
            Ok(hash) => problems.push(format!(
                "{}: blake3 is {} but {MANIFEST_FILE} says {}",
                entry.name,
                hash.to_hex(),
                entry.hash.to_hex()
            )),
            Err(e) => problems.push(format!("{}: {e}", entry.name)),
        }
    }

    match std::fs::read_dir(dir) {
        Ok(listing) => {
            let mut unlisted: Vec<String> = listing
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != MANIFEST_FILE && !listed.contains(n.as_str()))
                .collect();
            unlisted.sort();
            for name in unlisted {
                if name == WORK_DIR {
                    problems.push(format!("{WORK_DIR}/ is present: the run was not finalized"));
                } else {
                    problems.push(format!("{name} is not listed in {MANIFEST_FILE}"));
                }
            }
        }
        Err(e) => problems.push(format!("cannot list the directory: {e}")),
    }

    // Structure: every shard's header, and the index against the shards.
    let mut shard_tensors: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e.name.ends_with(".safetensors")) {
        let path = dir.join(&entry.name);
        let header = File::open(&path)
            .and_then(|f| f.metadata().map(|m| (f, m.len())))
            .map_err(|e| Error::io(&path, "opening", e))
            .and_then(|(f, len)| header::read(&path, &f, len));
        match header {
            Ok(h) => {
                shard_tensors.insert(&entry.name, h.tensors.into_iter().map(|t| t.name).collect());
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    let tensors = shard_tensors.values().map(BTreeSet::len).sum();
    if listed.contains(INDEX_FILE) {
        let path = dir.join(INDEX_FILE);
        match std::fs::read(&path)
            .map_err(|e| Error::io(&path, "reading", e))
            .and_then(|b| index::parse(&path, &b))
        {
            Ok(index) => {
                let mut indexed = BTreeSet::new();
                for (tensor, shard) in &index.weight_map {
                    indexed.insert((shard.as_str(), tensor.as_str()));
                    match shard_tensors.get(shard.as_str()) {
                        None => problems.push(format!(
                            "{INDEX_FILE}: tensor '{tensor}' is listed in {shard}, which is not a listed shard"
                        )),
                        Some(names) if !names.contains(tensor) => problems.push(format!(
                            "{INDEX_FILE}: tensor '{tensor}' is listed in {shard}, which does not contain it"
                        )),
                        Some(_) => {}
                    }
                }
                for (shard, names) in &shard_tensors {
                    for t in names {
                        if !indexed.contains(&(*shard, t.as_str())) {
                            problems.push(format!("{shard}: tensor '{t}' is not in {INDEX_FILE}"));
                        }
                    }
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    } else if shard_tensors.len() > 1 {
        problems.push(format!(
            "{} shards but no {INDEX_FILE} to say which holds what",
            shard_tensors.len()
        ));
    }

    if problems.is_empty() {
        Ok(Report {
            files: entries.len(),
            bytes,
            tensors,
        })
    } else {
        Err(Error::Verify {
            path: dir.to_path_buf(),
            problems,
        })
    }
}
