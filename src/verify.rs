//! `mergestream verify DIR`: check a finished output against its manifest and its own structure.
//!
//! Every file listed in `checksums.b3` is re-hashed; every shard's header is re-validated; the
//! index is cross-checked against the shards; files the manifest does not list and a leftover
//! work directory are reported, in the directory and in the subdirectories that hold listed files
//! (`1_Pooling/`; another directory is reported as one unlisted name). All problems are collected and reported together, each cause
//! once with its consequences under it: a shard that is missing or whose header is broken is
//! one problem, under which the index's tensors that therefore cannot be checked are listed —
//! not one problem per tensor. Nothing is written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result, VerifyCause, VerifyConsequence, VerifyProblem};
use crate::format::header;
use crate::format::index::{self, INDEX_FILE};
use crate::manifest;
use crate::output::WORK_DIR;
use crate::plan::MANIFEST_FILE;

/// What a successful verification covered.
#[derive(Debug)]
pub struct Report {
    /// Files checked against the manifest.
    pub files: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// Tensors in the shards' headers.
    pub tensors: usize,
}

/// Verifies the output directory `dir`; `Err(Error::Verify)` lists every problem found.
pub fn verify(dir: &Path) -> Result<Report> {
    let mut found = Problems::default();
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(|source| Error::Verify {
        path: dir.to_path_buf(),
        problems: vec![VerifyProblem::new(VerifyCause::ManifestUnreadable {
            source,
        })],
    })?;
    let (listed_entries, bad_lines) = manifest::parse(&text);
    for (line, text) in bad_lines {
        found.add(None, VerifyCause::ManifestLine { line, text });
    }
    let mut entries = Vec::new();
    let mut listed = BTreeSet::new();
    for entry in listed_entries {
        if listed.insert(entry.name.clone()) {
            entries.push(entry);
        } else {
            found.add(None, VerifyCause::ListedTwice { name: entry.name });
        }
    }

    // Contents: every listed file against its hash. A file that cannot be read is checked no
    // further.
    let mut bytes = 0;
    let mut readable = BTreeSet::new();
    for entry in &entries {
        let name = entry.name.clone();
        match hash_file(&dir.join(&name)) {
            Ok((hash, _)) if hash != entry.hash => {
                readable.insert(name.clone());
                let cause = VerifyCause::HashMismatch {
                    name: name.clone(),
                    actual: hash.to_hex().to_string(),
                    recorded: entry.hash.to_hex().to_string(),
                };
                found.add(Some(&name), cause);
            }
            Ok((_, len)) => {
                readable.insert(name);
                bytes += len;
            }
            Err(source) => found.add(
                Some(&name.clone()),
                VerifyCause::Unreadable { name, source },
            ),
        }
    }

    // Directories that hold listed files: looked into, not reported themselves.
    let listed_dirs: BTreeSet<&str> = listed
        .iter()
        .flat_map(|n| n.match_indices('/').map(move |(i, _)| &n[..i]))
        .collect();
    let mut unlisted = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(prefix) = todo.pop() {
        match std::fs::read_dir(dir.join(&prefix)) {
            Ok(listing) => {
                for entry in listing.filter_map(|e| e.ok()) {
                    let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
                    if name == MANIFEST_FILE || listed.contains(&name) {
                        continue;
                    }
                    if listed_dirs.contains(name.as_str())
                        && entry.file_type().is_ok_and(|t| t.is_dir())
                    {
                        todo.push(format!("{name}/"));
                    } else {
                        unlisted.push(name);
                    }
                }
            }
            Err(source) if prefix.is_empty() => found.add(None, VerifyCause::CannotList { source }),
            // The listed files inside are unreadable too, and already reported.
            Err(_) => {}
        }
    }
    unlisted.sort();
    for name in unlisted {
        if name == WORK_DIR {
            found.add(None, VerifyCause::Unfinished);
        } else {
            found.add(Some(&name.clone()), VerifyCause::Unlisted { name });
        }
    }

    // Structure: every readable shard's header, and the index against the shards.
    let mut shard_tensors: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for entry in entries.iter().filter(|e| e.name.ends_with(".safetensors")) {
        if !readable.contains(&entry.name) {
            continue;
        }
        let path = dir.join(&entry.name);
        let header = File::open(&path)
            .and_then(|f| f.metadata().map(|m| (f, m.len())))
            .map_err(|e| Error::io(&path, "opening", e))
            .and_then(|(f, len)| header::read(&path, &f, len));
        match header {
            Ok(h) => {
                shard_tensors.insert(&entry.name, h.tensors.into_iter().map(|t| t.name).collect());
            }
            Err(error) => {
                let (name, error) = (entry.name.clone(), Box::new(error));
                if found.has(&name) {
                    found.attach(&name, VerifyConsequence::InvalidHeader { error });
                } else {
                    // The hash matched: the manifest was made for this broken file.
                    found.add(
                        Some(&name.clone()),
                        VerifyCause::InvalidShard { name, error },
                    );
                }
            }
        }
    }
    let tensors = shard_tensors.values().map(BTreeSet::len).sum();
    if listed.contains(INDEX_FILE) && readable.contains(INDEX_FILE) {
        let path = dir.join(INDEX_FILE);
        let parsed = std::fs::read(&path)
            .map_err(|e| Error::io(&path, "reading", e))
            .and_then(|b| index::parse(&b).map_err(|kind| Error::index(&path, kind)));
        match parsed {
            Ok(index) => {
                // Tensors grouped by the shard the index puts them in.
                let mut by_shard: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for (tensor, shard) in &index.weight_map {
                    by_shard.entry(shard).or_default().push(tensor.clone());
                }
                let holder: HashMap<&str, &str> = shard_tensors
                    .iter()
                    .flat_map(|(shard, names)| names.iter().map(move |t| (t.as_str(), *shard)))
                    .collect();
                let mut misplaced = BTreeSet::new();
                for (shard, tensors) in by_shard {
                    if let Some(names) = shard_tensors.get(shard) {
                        for tensor in tensors.into_iter().filter(|t| !names.contains(t)) {
                            let cause = match holder.get(tensor.as_str()) {
                                Some(actual) => {
                                    misplaced.insert(tensor.clone());
                                    VerifyCause::WrongShard {
                                        tensor,
                                        listed: shard.to_owned(),
                                        actual: (*actual).to_owned(),
                                    }
                                }
                                None => VerifyCause::NotInShard {
                                    tensor,
                                    shard: shard.to_owned(),
                                },
                            };
                            found.add(None, cause);
                        }
                    } else if found.has(shard) {
                        // Missing, unreadable, broken or unlisted: already a problem, of which
                        // these tensors are a consequence.
                        found.attach(shard, VerifyConsequence::TensorsUnchecked { tensors });
                    } else {
                        // Absent altogether, or a listed file that is not a shard.
                        let cause = VerifyCause::IndexNamesNoShard {
                            shard: shard.to_owned(),
                            tensors,
                        };
                        found.add(None, cause);
                    }
                }
                let indexed: BTreeSet<(&str, &str)> = index
                    .weight_map
                    .iter()
                    .map(|(t, s)| (s.as_str(), t.as_str()))
                    .collect();
                for (shard, names) in &shard_tensors {
                    for t in names {
                        if !indexed.contains(&(*shard, t.as_str())) && !misplaced.contains(t) {
                            found.add(
                                None,
                                VerifyCause::NotIndexed {
                                    shard: shard.to_string(),
                                    tensor: t.clone(),
                                },
                            );
                        }
                    }
                }
            }
            Err(error) => {
                let error = Box::new(error);
                if found.has(INDEX_FILE) {
                    found.attach(INDEX_FILE, VerifyConsequence::InvalidIndex { error });
                } else {
                    found.add(Some(INDEX_FILE), VerifyCause::InvalidIndex { error });
                }
            }
        }
    } else if !listed.contains(INDEX_FILE) && shard_tensors.len() > 1 {
        found.add(
            None,
            VerifyCause::NoIndex {
                shards: shard_tensors.len(),
            },
        );
    }

    if found.list.is_empty() {
        Ok(Report {
            files: entries.len(),
            bytes,
            tensors,
        })
    } else {
        Err(Error::Verify {
            path: dir.to_path_buf(),
            problems: found.list,
        })
    }
}

/// The problems found so far, with the one about each file findable by the file's name.
#[derive(Default)]
struct Problems {
    list: Vec<VerifyProblem>,
    by_file: HashMap<String, usize>,
}

impl Problems {
    /// Records `cause`, about the file `file` if it is about one file.
    fn add(&mut self, file: Option<&str>, cause: VerifyCause) {
        if let Some(file) = file {
            self.by_file.insert(file.to_owned(), self.list.len());
        }
        self.list.push(VerifyProblem::new(cause));
    }

    /// Whether `file` already has a problem.
    fn has(&self, file: &str) -> bool {
        self.by_file.contains_key(file)
    }

    /// Puts `consequence` under the problem of `file` (which [`Problems::has`] one).
    fn attach(&mut self, file: &str, consequence: VerifyConsequence) {
        if let Some(&i) = self.by_file.get(file) {
            self.list[i].consequences.push(consequence);
        }
    }
}

/// blake3 and length of a file's contents, read in fixed-size pieces.
fn hash_file(path: &Path) -> std::io::Result<(blake3::Hash, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finalize(), len));
        }
        len += n as u64;
        hasher.update(&buf[..n]);
    }
}
