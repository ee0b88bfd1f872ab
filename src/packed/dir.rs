//! `mergestream pack` and `unpack` of whole model directories.
//!
//! A packed directory holds, for every `NAME.safetensors` of the input, `NAME.safetensors.mszst`
//! ([`PACKED_EXT`]); every other file of the input as it is; the input's `checksums.b3` (carried
//! verbatim when the input has one, computed from the bytes read otherwise); and, written last,
//! `packed.b3` ([`PACKED_MANIFEST`]), the b3sum manifest of every other file of the packed
//! directory. `unpack` restores every file listed in `checksums.b3`, hashing the bytes as it
//! writes them and giving a file its final name only when its blake3 is the recorded one, then
//! writes `checksums.b3`.
//!
//! Crash safety as for merges: files are written under temporary names in `OUT/.mergestream/`
//! and renamed when complete; `packed.b3` (for pack) and `checksums.b3` (for unpack) come last,
//! so a directory that has it is finished. A failed run removes what it wrote (and the output
//! directory, if it created it). This module does not merge, and carries no subdirectories.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::base::{hex, Base};
use super::decode::PackedShard;
use super::encode::{pack_shard_into, PackOptions};
use super::error::PackedError;
use super::sink::{sync_dir, AtomicFile, ByteSink};
use crate::error::{Error, Result};
use crate::manifest::{self, Entry};
use crate::output::WORK_DIR;
use crate::plan::MANIFEST_FILE;
use crate::writer::{IoMode, StreamFile};

/// The extension added to a packed shard's name.
pub const PACKED_EXT: &str = "mszst";
/// The manifest of a packed directory's own files.
pub const PACKED_MANIFEST: &str = "packed.b3";

const SHARD_SUFFIX: &str = ".safetensors";

/// What `pack_dir` or `unpack_dir` did.
#[derive(Debug, Clone)]
pub struct DirSummary {
    /// Shards packed or unpacked.
    pub shards: usize,
    /// Other files carried.
    pub carried: usize,
    /// Bytes of the unpacked shards.
    pub original_bytes: u64,
    /// Bytes of the packed shards.
    pub packed_bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Packs the model directory `src` into the new directory `out`.
pub fn pack_dir(
    src: &Path,
    out: &Path,
    base: Option<&Path>,
    options: &PackOptions,
) -> Result<DirSummary> {
    let started = Instant::now();
    let files = list_dir(src)?;
    for name in files.keys() {
        if name == PACKED_MANIFEST || name.ends_with(&format!(".{PACKED_EXT}")) {
            return Err(PackedError::ReservedName {
                path: src.join(name),
            }
            .into());
        }
    }
    if !files.keys().any(|n| n.ends_with(SHARD_SUFFIX)) {
        return Err(PackedError::NoShards {
            path: src.to_path_buf(),
        }
        .into());
    }
    // Before anything is created (and before the base is hashed).
    let inputs: Vec<&Path> = std::iter::once(src).chain(base).collect();
    crate::paths::check_overlap(out, &inputs)?;
    let base = base.map(Base::open).transpose()?.map(Arc::new);

    // The input's own manifest, if it has one, must describe exactly its files.
    let manifest_path = src.join(MANIFEST_FILE);
    let carried_manifest = match files.get(MANIFEST_FILE) {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, "reading", e))?;
            let entries = parse_manifest(&manifest_path, &text)?;
            let listed: BTreeSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            let present: BTreeSet<&str> = files
                .keys()
                .map(String::as_str)
                .filter(|n| *n != MANIFEST_FILE)
                .collect();
            check_same(&manifest_path, &listed, &present)?;
            Some((text, entries))
        }
        None => None,
    };
    let expected: BTreeMap<&str, blake3::Hash> = carried_manifest
        .iter()
        .flat_map(|(_, entries)| entries.iter().map(|e| (e.name.as_str(), e.hash)))
        .collect();

    let mut guard = OutGuard::prepare(out)?;
    let mut original = Vec::new();
    let mut packed = Vec::new();
    let mut summary = DirSummary {
        shards: 0,
        carried: 0,
        original_bytes: 0,
        packed_bytes: 0,
        seconds: 0.0,
    };
    for (name, path) in &files {
        if name == MANIFEST_FILE {
            continue;
        }
        let check = |actual: blake3::Hash| match expected.get(name.as_str()) {
            Some(want) if *want != actual => Err(Error::from(PackedError::SourceChecksum {
                path: path.clone(),
                manifest: manifest_path.clone(),
                expected: hex(want.as_bytes()),
                actual: hex(actual.as_bytes()),
            })),
            _ => Ok(()),
        };
        if name.ends_with(SHARD_SUFFIX) {
            let packed_name = format!("{name}.{PACKED_EXT}");
            let file = AtomicFile::create(&guard.work, &out.join(&packed_name))?;
            let (file, s) = pack_shard_into(path, base.clone(), options, file)?;
            check(s.original_blake3)?;
            let done = guard.place(file)?;
            original.push(Entry {
                name: name.clone(),
                hash: s.original_blake3,
            });
            packed.push(Entry {
                name: packed_name,
                hash: done.blake3,
            });
            summary.shards += 1;
            summary.original_bytes += s.original_len;
            summary.packed_bytes += s.packed_len;
        } else {
            let mut file = AtomicFile::create(&guard.work, &out.join(name))?;
            copy_into(path, &mut file)?;
            let done = guard.place(file)?;
            check(done.blake3)?;
            original.push(Entry {
                name: name.clone(),
                hash: done.blake3,
            });
            packed.push(Entry {
                name: name.clone(),
                hash: done.blake3,
            });
            summary.carried += 1;
        }
    }
    let manifest_text = match carried_manifest {
        Some((text, _)) => text,
        None => manifest::encode(&original),
    };
    let hash = guard.write(MANIFEST_FILE, manifest_text.as_bytes())?;
    packed.push(Entry {
        name: MANIFEST_FILE.into(),
        hash,
    });
    guard.write(PACKED_MANIFEST, manifest::encode(&packed).as_bytes())?;
    guard.finish()?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Restores the packed directory `src` into the new directory `out`. Every packed shard is
/// opened and checked (and its base identified) before anything is written.
pub fn unpack_dir(
    src: &Path,
    out: &Path,
    base: Option<&Path>,
    threads: usize,
) -> Result<DirSummary> {
    let started = Instant::now();
    let files = list_dir(src)?;
    for needed in [PACKED_MANIFEST, MANIFEST_FILE] {
        if !files.contains_key(needed) {
            return Err(PackedError::NotPackedDir {
                path: src.to_path_buf(),
                file: needed,
            }
            .into());
        }
    }
    let manifest_path = src.join(MANIFEST_FILE);
    let manifest_text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| Error::io(&manifest_path, "reading", e))?;
    let entries = parse_manifest(&manifest_path, &manifest_text)?;
    let mut missing = Vec::new();
    let mut used: BTreeSet<String> = [PACKED_MANIFEST, MANIFEST_FILE].map(String::from).into();
    let mut shards = Vec::new();
    for e in &entries {
        let packed_name = format!("{}.{PACKED_EXT}", e.name);
        if files.contains_key(&packed_name) {
            used.insert(packed_name.clone());
            shards.push((e, Some(packed_name)));
        } else if files.contains_key(&e.name) {
            used.insert(e.name.clone());
            shards.push((e, None));
        } else {
            missing.push(e.name.clone());
        }
    }
    let unlisted: Vec<String> = files
        .keys()
        .filter(|n| !used.contains(*n))
        .cloned()
        .collect();
    if !missing.is_empty() || !unlisted.is_empty() {
        return Err(PackedError::ManifestFiles {
            path: manifest_path,
            unlisted,
            missing,
        }
        .into());
    }
    // Before anything is created (and before the base is hashed).
    let inputs: Vec<&Path> = std::iter::once(src).chain(base).collect();
    crate::paths::check_overlap(out, &inputs)?;
    let base_path = base;
    let base = base.map(Base::open).transpose()?.map(Arc::new);
    let mut opened = Vec::new();
    for (e, packed_name) in &shards {
        let shard = match packed_name {
            Some(p) => Some(PackedShard::open(&src.join(p), base.clone())?),
            None => None,
        };
        opened.push((*e, shard));
    }
    if let Some(b) = base_path {
        if !opened
            .iter()
            .any(|(_, s)| s.as_ref().is_some_and(|s| s.base_id().is_some()))
        {
            return Err(PackedError::UnexpectedBase {
                path: src.to_path_buf(),
                base: b.to_path_buf(),
            }
            .into());
        }
    }

    let mut guard = OutGuard::prepare(out)?;
    let mut summary = DirSummary {
        shards: 0,
        carried: 0,
        original_bytes: 0,
        packed_bytes: 0,
        seconds: 0.0,
    };
    for (entry, shard) in &opened {
        // Restored files are written with direct I/O where the filesystem allows it (the
        // writer the merges use: no page-cache copy), hashed as written, then checked before
        // they get their final name.
        let pending = guard.work.join(format!("{}.unpacked", entry.name));
        let mut file = StreamFile::create(
            &guard.work,
            ".unpack.",
            &pending,
            IoMode::Auto,
            crate::writer::MAX_STAGE_BYTES,
            None,
        )?;
        match shard {
            Some(shard) => {
                shard.unpack_into(&mut file, threads)?;
                summary.shards += 1;
                summary.original_bytes += shard.original_len();
                summary.packed_bytes += shard.packed_len();
            }
            None => {
                copy_into(&src.join(&entry.name), &mut file)?;
                summary.carried += 1;
            }
        }
        let written = file.persist()?;
        let path = out.join(&entry.name);
        if written.blake3 != entry.hash {
            return Err(PackedError::FileChecksum {
                path,
                expected: hex(entry.hash.as_bytes()),
                actual: hex(written.blake3.as_bytes()),
            }
            .into());
        }
        std::fs::rename(&pending, &path).map_err(|e| Error::io(&path, "renaming into place", e))?;
        guard.placed.push(path);
    }
    guard.write(MANIFEST_FILE, manifest_text.as_bytes())?;
    guard.finish()?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Opens every packed shard of the complete packed directory `dir` (one with `packed.b3`), for
/// reading with random access: `(original shard name, shard)`, by name. The directory's other
/// files (the index, config) are where `unpack` would restore them from, under their own names.
pub fn open_packed_dir(dir: &Path, base: Option<Arc<Base>>) -> Result<Vec<(String, PackedShard)>> {
    let files = list_dir(dir)?;
    if !files.contains_key(PACKED_MANIFEST) {
        return Err(PackedError::NotPackedDir {
            path: dir.to_path_buf(),
            file: PACKED_MANIFEST,
        }
        .into());
    }
    let suffix = format!(".{PACKED_EXT}");
    files
        .iter()
        .filter_map(|(name, path)| Some((name.strip_suffix(&suffix)?, path)))
        .map(|(original, path)| Ok((original.to_string(), PackedShard::open(path, base.clone())?)))
        .collect()
}

/// The regular files of `dir` (symlinks followed), by name; subdirectories and special files
/// are refused.
fn list_dir(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, "listing", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, "listing", e))?;
        let path = entry.path();
        let meta =
            std::fs::metadata(&path).map_err(|e| Error::io(&path, "reading file status", e))?;
        if meta.is_dir() {
            return Err(PackedError::Subdirectory { path }.into());
        }
        if !meta.is_file() {
            return Err(PackedError::NotRegular { path }.into());
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        files.insert(name, path);
    }
    Ok(files)
}

fn parse_manifest(path: &Path, text: &str) -> Result<Vec<Entry>> {
    let (entries, lines) = manifest::parse(text);
    if !lines.is_empty() {
        return Err(PackedError::Manifest {
            path: path.to_path_buf(),
            lines,
        }
        .into());
    }
    Ok(entries)
}

fn check_same(path: &Path, listed: &BTreeSet<&str>, present: &BTreeSet<&str>) -> Result<()> {
    if listed == present {
        return Ok(());
    }
    Err(PackedError::ManifestFiles {
        path: path.to_path_buf(),
        unlisted: present.difference(listed).map(|s| s.to_string()).collect(),
        missing: listed.difference(present).map(|s| s.to_string()).collect(),
    }
    .into())
}

fn copy_into(src: &Path, sink: &mut impl ByteSink) -> Result<()> {
    let mut input = File::open(src).map_err(|e| Error::io(src, "opening", e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| Error::io(src, "reading", e))?;
        if n == 0 {
            return Ok(());
        }
        sink.write_all(&buf[..n])?;
    }
}

/// The output directory of a pack or unpack run: removes everything the run wrote unless the
/// run finishes.
struct OutGuard {
    out: PathBuf,
    work: PathBuf,
    created: bool,
    placed: Vec<PathBuf>,
    done: bool,
}

impl OutGuard {
    /// Creates `out`, or takes it if it is an empty directory.
    fn prepare(out: &Path) -> Result<OutGuard> {
        let created = match std::fs::read_dir(out) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(PackedError::OutputNotEmpty {
                        path: out.to_path_buf(),
                    }
                    .into());
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(out)
                    .map_err(|e| Error::io(out, "creating output directory", e))?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(PackedError::OutputNotEmpty {
                    path: out.to_path_buf(),
                }
                .into())
            }
            Err(e) => return Err(Error::io(out, "opening output directory", e)),
        };
        let mut guard = OutGuard {
            out: out.to_path_buf(),
            work: out.join(WORK_DIR),
            created,
            placed: Vec::new(),
            done: false,
        };
        std::fs::create_dir(&guard.work)
            .map_err(|e| Error::io(&guard.work, "creating work directory", e))?;
        guard.placed.clear();
        Ok(guard)
    }

    /// Puts a finished file in place.
    fn place(&mut self, file: AtomicFile) -> Result<super::sink::Persisted> {
        let done = file.persist()?;
        self.placed.push(done.path.clone());
        Ok(done)
    }

    /// Writes a small file `name` whole; returns its blake3.
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<blake3::Hash> {
        let mut file = AtomicFile::create(&self.work, &self.out.join(name))?;
        file.write_all(bytes)?;
        Ok(self.place(file)?.blake3)
    }

    fn finish(mut self) -> Result<()> {
        std::fs::remove_dir_all(&self.work)
            .map_err(|e| Error::io(&self.work, "removing work directory", e))?;
        sync_dir(&self.out)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for OutGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        for p in &self.placed {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir_all(&self.work);
        if self.created {
            let _ = std::fs::remove_dir(&self.out);
        }
    }
}
