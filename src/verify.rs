//! `mergestream verify DIR`: check a finished output against its manifest and its own structure.
//!
//! Every file listed in `checksums.b3` is re-hashed; every shard's header is re-validated; the
//! index is cross-checked against the shards; files the manifest does not list and a leftover
//! work directory are reported, in the directory and in the subdirectories that hold listed files
//! (`1_Pooling/`; another directory is reported as one unlisted name). All problems are collected and reported together, each cause
//! once with its consequences under it: a shard that is missing or whose header is broken is
//! one problem, under which the index's tensors that therefore cannot be checked are listed —
//! not one problem per tensor. Nothing is written.
//!
//! A packed output (`--compress`, or `mergestream pack`; it has `packed.b3`) is checked as far
//! as it can be without decoding it: every file against `packed.b3`, every packed shard's
//! structure (preamble, header checksum, safetensors header, index, trailer), the index against
//! the shards' headers, and `checksums.b3` against the files `unpack` would restore (the same
//! names, and the same blake3 for the files carried as they are). The unpacked bytes' blake3s
//! are what `mergestream unpack` checks as it restores them; the report says so.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result, VerifyCause, VerifyConsequence, VerifyProblem};
use crate::format::header;
use crate::format::index::{self, INDEX_FILE};
use crate::manifest;
use crate::output::WORK_DIR;
use crate::packed::{self, PackedShard, PACKED_MANIFEST};
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
    /// Whether the output is packed: `files` and `bytes` are then the packed files checked
    /// against `packed.b3`, and the unpacked bytes' blake3s (`checksums.b3`) were not checked —
    /// `mergestream unpack` checks them as it restores the files.
    pub packed: bool,
}

/// Verifies the output directory `dir`; `Err(Error::Verify)` lists every problem found.
pub fn verify(dir: &Path) -> Result<Report> {
    let mut found = Problems::default();
    let packed = std::fs::symlink_metadata(dir.join(PACKED_MANIFEST)).is_ok();
    let manifest_name = if packed {
        PACKED_MANIFEST
    } else {
        MANIFEST_FILE
    };
    let text =
        std::fs::read_to_string(dir.join(manifest_name)).map_err(|source| Error::Verify {
            path: dir.to_path_buf(),
            problems: vec![VerifyProblem::new(VerifyCause::ManifestUnreadable {
                manifest: manifest_name,
                source,
            })],
        })?;
    let entries = parse_manifest(manifest_name, &text, &mut found);
    let listed: BTreeSet<String> = entries.iter().map(|e| e.name.clone()).collect();

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
                    manifest: manifest_name,
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
                    if name == manifest_name || listed.contains(&name) {
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
            let cause = VerifyCause::Unlisted {
                manifest: manifest_name,
                name: name.clone(),
            };
            found.add(Some(&name), cause);
        }
    }

    // Structure: every readable shard's header (a packed shard's whole structure), and the
    // index against the shards, which it names as they are unpacked.
    let packed_suffix = format!(".safetensors.{}", packed::PACKED_EXT);
    let mut shard_tensors: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for entry in &entries {
        let is_packed = packed && entry.name.ends_with(&packed_suffix);
        let shard = if is_packed {
            let shard = packed::unpacked_name(&entry.name);
            found.alias(shard, &entry.name);
            shard
        } else {
            entry.name.as_str()
        };
        if !(is_packed || entry.name.ends_with(".safetensors")) || !readable.contains(&entry.name) {
            continue;
        }
        let path = dir.join(&entry.name);
        let header = if is_packed {
            PackedShard::check_structure(&path)
        } else {
            File::open(&path)
                .and_then(|f| f.metadata().map(|m| (f, m.len())))
                .map_err(|e| Error::io(&path, "opening", e))
                .and_then(|(f, len)| header::read(&path, &f, len))
        };
        match header {
            Ok(h) => {
                shard_tensors.insert(shard, h.tensors.into_iter().map(|t| t.name).collect());
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
    if packed {
        check_unpacked_manifest(dir, &entries, &readable, &packed_suffix, &mut found);
    }
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
            packed,
        })
    } else {
        Err(Error::Verify {
            path: dir.to_path_buf(),
            problems: found.list,
        })
    }
}

/// The entries of the manifest `name` (text `text`), each file once; malformed lines and
/// repeated files are problems.
fn parse_manifest(name: &'static str, text: &str, found: &mut Problems) -> Vec<manifest::Entry> {
    let (listed_entries, bad_lines) = manifest::parse(text);
    for (line, text) in bad_lines {
        found.add(
            None,
            VerifyCause::ManifestLine {
                manifest: name,
                line,
                text,
            },
        );
    }
    let mut entries = Vec::new();
    let mut listed = BTreeSet::new();
    for entry in listed_entries {
        if listed.insert(entry.name.clone()) {
            entries.push(entry);
        } else {
            let cause = VerifyCause::ListedTwice {
                manifest: name,
                name: entry.name,
            };
            found.add(None, cause);
        }
    }
    entries
}

/// In a packed output: `checksums.b3` must list exactly the files `unpack` restores from the
/// files `packed.b3` lists (`entries`), with the blake3 `packed.b3` gives the ones carried as
/// they are.
fn check_unpacked_manifest(
    dir: &Path,
    entries: &[manifest::Entry],
    readable: &BTreeSet<String>,
    packed_suffix: &str,
    found: &mut Problems,
) {
    if !entries.iter().any(|e| e.name == MANIFEST_FILE) {
        // Present but unlisted is reported as such; absent, it is this.
        if std::fs::symlink_metadata(dir.join(MANIFEST_FILE)).is_err() {
            let source = std::io::Error::from(std::io::ErrorKind::NotFound);
            let cause = VerifyCause::ManifestUnreadable {
                manifest: MANIFEST_FILE,
                source,
            };
            found.add(Some(MANIFEST_FILE), cause);
        }
        return;
    }
    if !readable.contains(MANIFEST_FILE) {
        return; // already a problem
    }
    let text = match std::fs::read_to_string(dir.join(MANIFEST_FILE)) {
        Ok(text) => text,
        Err(source) => {
            let cause = VerifyCause::ManifestUnreadable {
                manifest: MANIFEST_FILE,
                source,
            };
            found.add(Some(MANIFEST_FILE), cause);
            return;
        }
    };
    let unpacked = parse_manifest(MANIFEST_FILE, &text, found);
    // What unpack restores: packed shards under their own names, the rest as it is.
    let restored: BTreeMap<&str, Option<blake3::Hash>> = entries
        .iter()
        .filter(|e| e.name != MANIFEST_FILE)
        .map(|e| {
            if e.name.ends_with(packed_suffix) {
                (packed::unpacked_name(&e.name), None)
            } else {
                (e.name.as_str(), Some(e.hash))
            }
        })
        .collect();
    let listed: BTreeMap<&str, blake3::Hash> =
        unpacked.iter().map(|e| (e.name.as_str(), e.hash)).collect();
    let unlisted: Vec<String> = restored
        .keys()
        .filter(|n| !listed.contains_key(*n))
        .map(|n| n.to_string())
        .collect();
    let missing: Vec<String> = listed
        .keys()
        .filter(|n| !restored.contains_key(*n))
        .map(|n| n.to_string())
        .collect();
    if !unlisted.is_empty() || !missing.is_empty() {
        found.add(None, VerifyCause::UnpackedListing { unlisted, missing });
    }
    for (name, hash) in &listed {
        if let Some(Some(packed)) = restored.get(name) {
            if packed != hash {
                let cause = VerifyCause::ManifestsDisagree {
                    name: name.to_string(),
                    unpacked: hash.to_hex().to_string(),
                    packed: packed.to_hex().to_string(),
                };
                found.add(None, cause);
            }
        }
    }
}

/// The problems found so far, with the one about each file findable by the file's name (a
/// packed shard's also by the name of the shard it restores to, as the index names it).
#[derive(Default)]
struct Problems {
    list: Vec<VerifyProblem>,
    by_file: HashMap<String, usize>,
    aliases: HashMap<String, String>,
}

impl Problems {
    /// Records `cause`, about the file `file` if it is about one file.
    fn add(&mut self, file: Option<&str>, cause: VerifyCause) {
        if let Some(file) = file {
            self.by_file.insert(file.to_owned(), self.list.len());
        }
        self.list.push(VerifyProblem::new(cause));
    }

    /// Makes `name` another name of `file`, for [`Problems::has`] and [`Problems::attach`].
    fn alias(&mut self, name: &str, file: &str) {
        self.aliases.insert(name.to_owned(), file.to_owned());
    }

    fn problem_of(&self, file: &str) -> Option<usize> {
        let file = self.aliases.get(file).map_or(file, String::as_str);
        self.by_file.get(file).copied()
    }

    /// Whether `file` already has a problem.
    fn has(&self, file: &str) -> bool {
        self.problem_of(file).is_some()
    }

    /// Puts `consequence` under the problem of `file` (which [`Problems::has`] one).
    fn attach(&mut self, file: &str, consequence: VerifyConsequence) {
        if let Some(i) = self.problem_of(file) {
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
