//! The output directory: locking, crash-safe shard files, per-part records, and finalizing.
//!
//! Every file is written under a temporary name inside `OUT/.mergestream/`, hashed as its bytes
//! go out, synced, and only then renamed to its final name, so a final name always means a
//! complete file. Each part of a run (`--part I/N`; a whole run is part 0/1) keeps a record of
//! the files it finished with their blake3, under a lock that keeps a second run of the same
//! part out. [`finalize`] turns complete records into the index, the model card (`README.md`),
//! the merge config of a config merge (`mergekit_config.yml`), `mergestream.json` (with the
//! inputs' SHA-256 that part 0 recorded, under `--hash-inputs`) and, last of all,
//! `checksums.b3`, then removes the work directory — so a directory with a manifest is a
//! finished one. Files copied from an input's subdirectories (`1_Pooling/config.json`) keep
//! their relative paths; temporary names never contain a `/`. This module never computes tensor
//! bytes; the pipeline hands them in through [`ShardWriter`].
//!
//! A compressed output (`--compress`) is the same directory with each shard written packed
//! (`NAME.safetensors.mszst`, through [`PackWriter`], compressing on worker threads) instead of
//! `NAME.safetensors` — exactly what `mergestream pack` makes of the uncompressed output: its
//! `checksums.b3` lists the *unpacked* bytes (hashed as they went into the packer), so `unpack`
//! restores files that `b3sum --check checksums.b3` accepts, and `packed.b3`, written last,
//! lists the files as they are.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::card::{Card, CARD_FILE, CONFIG_FILE};
use crate::error::{Error, OutputError, PartsProblem, Result};
use crate::format::index::INDEX_FILE;
use crate::lineage::InputHashes;
use crate::manifest::{self, Entry};
use crate::packed::{self, PackOptions, PackWriter, PACKED_MANIFEST};
use crate::pipeline::ShardSink;
use crate::plan::{OutShard, Part, Plan, MANIFEST_FILE, PROVENANCE_FILE};
use crate::writer::{IoMode, StreamFile, Written};

/// The work directory inside an output directory.
pub const WORK_DIR: &str = ".mergestream";

/// The name prefix of the file [`precheck`] creates and removes to test that a directory is
/// writable; concurrent parts may see another part's.
const PROBE_PREFIX: &str = ".mergestream-probe";

/// What to do with an output directory that already holds something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse anything but an empty directory (or other parts' files of the same run).
    Refuse,
    /// Keep this part's finished files whose hashes still match, redo the rest.
    Resume,
    /// Replace earlier output.
    Overwrite,
}

/// One finished file, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct FileRecord {
    pub name: String,
    pub size: u64,
    pub blake3: String,
    /// For a packed shard: the file it restores to, which `checksums.b3` lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked: Option<Unpacked>,
}

/// The safetensors file a packed shard restores to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Unpacked {
    pub name: String,
    pub size: u64,
    pub blake3: String,
}

/// What one part has finished.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PartRecord {
    fingerprint: String,
    part: String,
    complete: bool,
    files: Vec<FileRecord>,
    /// The SHA-256 of the output's input files, from the part that hashes them (part 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_sha256: Option<Vec<InputHashes>>,
}

/// What `finalize` needs to know of the plan, written by every part.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlanRecord {
    fingerprint: String,
    /// The input models (absolute), so that `finalize` can refuse an output that overlaps one.
    #[serde(default)]
    inputs: Vec<PathBuf>,
    /// Files the parts write between them (shards, copied files).
    files: Vec<String>,
    index_json: Option<String>,
    provenance_json: String,
    /// The model card, without the inputs' hashes.
    card: Card,
    /// `mergekit_config.yml`, for a config merge.
    #[serde(default)]
    config_yml: Option<String>,
    /// Whether part 0 records the inputs' SHA-256.
    #[serde(default)]
    hash_inputs: bool,
    /// Whether the shards are written packed (`--compress`): `finalize` then writes
    /// `packed.b3` too.
    #[serde(default)]
    packed: bool,
}

/// Checks, before any work, that `out` can be written: it is a writable directory, or can be
/// created as one. Creates nothing.
pub(crate) fn precheck(out: &Path) -> Result<()> {
    let probe_in = match std::fs::metadata(out) {
        Ok(m) if m.is_dir() => out.to_path_buf(),
        Ok(_) => return Err(Error::output(out, OutputError::NotADirectory)),
        Err(_) => {
            let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
            let parent = parent.unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(Error::output(
                    out,
                    OutputError::ParentNotADirectory {
                        parent: parent.to_path_buf(),
                    },
                ));
            }
            parent.to_path_buf()
        }
    };
    tempfile::Builder::new()
        .prefix(PROBE_PREFIX)
        .tempfile_in(&probe_in)
        .map(drop)
        .map_err(|source| Error::output(&probe_in, OutputError::NotWritable { source }))
}

/// An output directory opened for one part of a run, locked against a second run of that part.
pub struct OutputDir {
    /// The directory.
    pub path: PathBuf,
    work: PathBuf,
    part: Part,
    fingerprint: String,
    record: PartRecord,
    io: IoMode,
    /// How shards are packed, for a compressed output.
    compress: Option<PackOptions>,
    busy: Option<std::sync::Arc<crate::busy::Busy>>,
    /// Size of the staging buffers its files are written through.
    stage_bytes: usize,
    _lock: File,
}

impl OutputDir {
    /// Creates or opens `out` for `part` of `plan` made from the input models `inputs`,
    /// applying `existing`; with `compress`, shards are written packed. Refuses, before
    /// creating anything, an `out` that overlaps an input ([`crate::paths::check_overlap`]).
    pub fn open(
        out: &Path,
        inputs: &[&Path],
        plan: &Plan,
        part: Part,
        existing: Existing,
        io: IoMode,
        compress: Option<&PackOptions>,
    ) -> Result<OutputDir> {
        crate::paths::check_overlap(out, inputs)?;
        // A compressed output's files differ from a plain one's: its runs are other runs.
        let fingerprint = match compress {
            None => plan.fingerprint.clone(),
            Some(o) => {
                let mut h = blake3::Hasher::new();
                h.update(b"packed v1\0");
                h.update(&o.level.to_le_bytes());
                h.update(&o.block_size.to_le_bytes());
                h.update(plan.fingerprint.as_bytes());
                h.finalize().to_hex().to_string()
            }
        };
        let on_disk = |name: &str| match compress {
            Some(_) => packed::packed_name(name),
            None => name.to_owned(),
        };
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, "creating output directory", e))?;
        // Look before touching anything, so a refusal leaves the directory as it was.
        let mut ours: BTreeSet<String> = plan.output_files().into_iter().collect();
        let writes: BTreeSet<String> = plan
            .shards
            .iter()
            .map(|s| on_disk(&s.name))
            .chain(plan.extra_files.iter().map(|f| f.name.clone()))
            .collect();
        if compress.is_some() {
            for s in &plan.shards {
                ours.remove(&s.name);
                ours.insert(on_disk(&s.name));
            }
            ours.insert(PACKED_MANIFEST.into());
        }
        // Directories holding files of ours (`1_Pooling`, `a/b`): looked into, not foreign.
        let our_dirs: BTreeSet<&str> = ours
            .iter()
            .map(String::as_str)
            .chain(writes.iter().map(String::as_str))
            .flat_map(|n| n.match_indices('/').map(move |(i, _)| &n[..i]))
            .collect();
        let mut foreign = Vec::new();
        let mut todo = vec![String::new()];
        while let Some(prefix) = todo.pop() {
            let dir = out.join(&prefix);
            for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, "listing", e))? {
                let entry = entry.map_err(|e| Error::io(&dir, "listing", e))?;
                let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
                // Another part's `precheck` probe may come and go while we look.
                if name == WORK_DIR
                    || writes.contains(name.as_str())
                    || ours.contains(&name)
                    || (prefix.is_empty() && name.starts_with(PROBE_PREFIX))
                {
                    continue;
                }
                if our_dirs.contains(name.as_str()) && entry.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(format!("{name}/"));
                } else {
                    foreign.push(name);
                }
            }
        }
        foreign.sort();
        if foreign.iter().any(|n| n == MANIFEST_FILE) && existing != Existing::Overwrite {
            return Err(Error::output(
                out,
                OutputError::Finished { part: Some(part) },
            ));
        }
        if !foreign.is_empty() && existing != Existing::Overwrite {
            return Err(Error::output(out, OutputError::NotEmpty { files: foreign }));
        }
        let work = out.join(WORK_DIR);
        std::fs::create_dir_all(&work)
            .map_err(|e| Error::io(&work, "creating work directory", e))?;
        let lock = lock(&work.join(format!("{}.lock", part.tag())), out, Some(part))?;
        remove_temporaries(&work, part)?;
        for name in &foreign {
            if looks_like_output(name) {
                remove(&out.join(name))?;
            }
        }

        let record_path = work.join(format!("{}.json", part.tag()));
        let fresh = PartRecord {
            fingerprint: fingerprint.clone(),
            part: part.to_string(),
            complete: false,
            files: Vec::new(),
            input_sha256: None,
        };
        let record = match (read_json::<PartRecord>(&record_path)?, existing) {
            (None, _) => fresh,
            (Some(_), Existing::Overwrite) => fresh,
            (Some(old), Existing::Refuse) => {
                return Err(Error::output(
                    out,
                    OutputError::HoldsRun {
                        part,
                        complete: old.complete,
                        files: old.files.len(),
                    },
                ));
            }
            (Some(old), Existing::Resume) if old.fingerprint != fingerprint => {
                return Err(Error::output(out, OutputError::OtherRun { part }))
            }
            (Some(old), Existing::Resume) => PartRecord {
                files: keep_intact(out, old.files)?,
                ..fresh
            },
        };
        let plan_record = PlanRecord {
            fingerprint: fingerprint.clone(),
            inputs: inputs.iter().map(|p| absolute(p)).collect(),
            files: writes.iter().cloned().collect(),
            index_json: plan.index_json.clone(),
            provenance_json: plan.provenance_json.clone(),
            card: plan.card.clone(),
            config_yml: plan.config_yml.clone(),
            hash_inputs: plan.hash_inputs,
            packed: compress.is_some(),
        };
        let plan_path = work.join(plan_record_name(&fingerprint));
        write_atomic(&work, &plan_path, &to_json(&plan_record))?;
        let dir = OutputDir {
            path: out.to_path_buf(),
            work,
            part,
            fingerprint,
            record,
            io,
            compress: compress.cloned(),
            busy: None,
            stage_bytes: crate::writer::MAX_STAGE_BYTES,
            _lock: lock,
        };
        dir.save_record()?;
        Ok(dir)
    }

    /// Whether this part already holds `name`, finished and intact (for a shard of a
    /// compressed output, `name` packed).
    pub fn has(&self, name: &str) -> bool {
        self.record
            .files
            .iter()
            .any(|f| f.name == name || f.unpacked.as_ref().is_some_and(|u| u.name == name))
    }

    /// Records a finished file.
    fn add(&mut self, file: FileRecord) -> Result<()> {
        self.record.files.retain(|f| f.name != file.name);
        self.record.files.push(file);
        self.save_record()
    }

    /// Records the SHA-256 of the output's input files (the part that hashes them, under
    /// `--hash-inputs`), for `finalize` to write into provenance and the card.
    pub fn record_input_hashes(&mut self, inputs: Vec<InputHashes>) -> Result<()> {
        self.record.input_sha256 = Some(inputs);
        self.save_record()
    }

    /// Marks this part complete.
    pub fn complete(&mut self) -> Result<()> {
        self.record.complete = true;
        self.save_record()
    }

    fn save_record(&self) -> Result<()> {
        let path = self.work.join(format!("{}.json", self.part.tag()));
        write_atomic(&self.work, &path, &to_json(&self.record))?;
        Ok(())
    }

    /// Copies `source` into the output as `name` (a path relative to the output directory,
    /// whose directories are created), hashing it on the way.
    pub fn copy_file(&mut self, source: &Path, name: &str) -> Result<()> {
        let mut input = File::open(source).map_err(|e| Error::io(source, "opening", e))?;
        if let Some((parent, _)) = name.rsplit_once('/') {
            let dir = self.path.join(parent);
            if !dir.is_dir() {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io(&dir, "creating directory", e))?;
                // The new directories' entries must reach the disk with the file's.
                let mut at = Some(dir.as_path());
                while let Some(d) = at.filter(|d| *d != self.path) {
                    at = d.parent();
                    sync_dir(at.unwrap_or(&self.path))?;
                }
            }
        }
        let mut file = self.create(name)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input
                .read(&mut buf)
                .map_err(|e| Error::io(source, "reading", e))?;
            if n == 0 {
                break;
            }
            file.write(&buf[..n])?;
        }
        let written = file.persist()?;
        self.add(record(name, &written))
    }

    /// Counts the time this directory's files spend hashing and writing in `busy`.
    pub fn count_busy(&mut self, busy: std::sync::Arc<crate::busy::Busy>) {
        self.busy = Some(busy);
    }

    /// A new output file `name`, under a temporary name of this part until persisted (without
    /// a `/`: a file of a subdirectory is written in the work directory too).
    fn create(&self, name: &str) -> Result<StreamFile> {
        StreamFile::create(
            &self.work,
            &format!("{}.{}.", self.part.tag(), name.replace('/', "%2F")),
            &self.path.join(name),
            self.io,
            self.stage_bytes,
            self.busy.clone(),
        )
    }

    /// Writes its files through staging buffers of `stage_bytes` (the run's memory budget
    /// decides: [`crate::writer::stage_bytes_for`]).
    pub fn set_stage_bytes(&mut self, stage_bytes: usize) {
        self.stage_bytes = stage_bytes;
    }

    /// The fingerprint of the run this directory is being written for: the plan's, and for a
    /// compressed output how it is packed.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// The pipeline's sink: each shard becomes a file of the output directory — packed, for a
/// compressed output, by a [`PackWriter`] whose workers compress (and hash the original bytes)
/// while the pipeline's writer stage only copies.
pub struct ShardWriter<'a> {
    dir: &'a mut OutputDir,
    current: Option<OpenShard>,
    /// Whether any shard was written through the page cache.
    pub buffered: bool,
    /// Where bytes computed for a packed shard are put before it compresses them.
    scratch: Vec<u8>,
}

/// The shard a [`ShardWriter`] is writing.
enum OpenShard {
    Plain(Box<StreamFile>),
    Packed(Box<PackWriter<StreamFile>>),
}

impl<'a> ShardWriter<'a> {
    /// A sink writing into `dir`.
    pub fn new(dir: &'a mut OutputDir) -> ShardWriter<'a> {
        ShardWriter {
            dir,
            current: None,
            buffered: false,
            scratch: Vec::new(),
        }
    }
}

fn record(name: &str, written: &Written) -> FileRecord {
    FileRecord {
        name: name.to_owned(),
        size: written.size,
        blake3: written.blake3.to_hex().to_string(),
        unpacked: None,
    }
}

impl ShardSink for ShardWriter<'_> {
    fn begin(&mut self, shard: &OutShard) -> Result<()> {
        let open = match &self.dir.compress {
            None => {
                let mut file = self.dir.create(&shard.name)?;
                file.preallocate(shard.file_len())?;
                self.buffered |= !file.is_direct();
                file.write(&shard.prefix)?;
                OpenShard::Plain(Box::new(file))
            }
            Some(options) => {
                let name = packed::packed_name(&shard.name);
                let file = self.dir.create(&name)?;
                self.buffered |= !file.is_direct();
                let path = self.dir.path.join(&name);
                let options = options.clone();
                OpenShard::Packed(Box::new(PackWriter::new_unhashed(
                    &path,
                    &shard.prefix,
                    shard.data_len,
                    None,
                    &options,
                    file,
                )?))
            }
        };
        self.current = Some(open);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self.current.as_mut() {
            Some(OpenShard::Plain(file)) => file.write(bytes),
            Some(OpenShard::Packed(writer)) => writer.write(bytes),
            None => Err(Error::internal("a shard's bytes came before its begin")),
        }
    }

    fn write_with(
        &mut self,
        len: usize,
        unit: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        match self.current.as_mut() {
            Some(OpenShard::Plain(file)) => file.write_with(len, unit, fill),
            Some(OpenShard::Packed(writer)) => {
                writer.write(crate::pipeline::fill_scratch(&mut self.scratch, len, fill))
            }
            None => Err(Error::internal("a shard's bytes came before its begin")),
        }
    }

    fn finish(&mut self, shard: &OutShard) -> Result<()> {
        let open = self
            .current
            .take()
            .ok_or_else(|| Error::internal("a shard finished before it began"))?;
        let wrong_length = |name: &str, size: u64| {
            Error::internal(format!(
                "{name} came out {size} bytes long; its plan says {}",
                shard.file_len()
            ))
        };
        let record = match open {
            OpenShard::Plain(file) => {
                let written = file.persist()?;
                if written.size != shard.file_len() {
                    return Err(wrong_length(&shard.name, written.size));
                }
                record(&shard.name, &written)
            }
            OpenShard::Packed(writer) => {
                let (file, summary) = writer.finish()?;
                if summary.original_len != shard.file_len() {
                    return Err(wrong_length(&shard.name, summary.original_len));
                }
                let name = packed::packed_name(&shard.name);
                let written = file.persist()?;
                if written.size != summary.packed_len {
                    return Err(Error::internal(format!(
                        "{name}: {} bytes written but {} packed",
                        written.size, summary.packed_len
                    )));
                }
                FileRecord {
                    unpacked: Some(Unpacked {
                        name: shard.name.clone(),
                        size: summary.original_len,
                        blake3: summary.original_blake3.to_hex().to_string(),
                    }),
                    ..record(&name, &written)
                }
            }
        };
        crate::failpoint::hit("shard-renamed", &|| false);
        self.dir.add(record)
    }
}

/// What `finalize` did.
#[derive(Debug)]
pub struct Finalized {
    /// Files listed in `checksums.b3`, plus the manifest itself.
    pub files: usize,
    /// Parts the run was split into.
    pub parts: u32,
}

/// Finalizes `out`, or, when `out` holds the outputs of a sweep (directories of their own, each
/// with a work directory), every one of them; returns what was finalized. Every output is
/// attempted; the first failure is returned after the others are done.
pub fn finalize_all(out: &Path) -> Result<Vec<(PathBuf, Finalized)>> {
    if out.join(WORK_DIR).is_dir() || !out.is_dir() {
        return Ok(vec![(out.to_path_buf(), finalize(out, None)?)]);
    }
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, "listing", e))? {
        let path = entry.map_err(|e| Error::io(out, "listing", e))?.path();
        if path.join(WORK_DIR).is_dir() {
            subdirs.push(path);
        }
    }
    if subdirs.is_empty() {
        // The single-output messages explain what is missing.
        return Ok(vec![(out.to_path_buf(), finalize(out, None)?)]);
    }
    subdirs.sort();
    let mut done = Vec::new();
    let mut first_error = None;
    for dir in subdirs {
        match finalize(&dir, None) {
            Ok(f) => done.push((dir, f)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Writes the index, `mergestream.json` and `checksums.b3` once every part of the run in `out`
/// is complete and consistent, then removes the work directory. With `only`, considers just the
/// records of that part (a whole run finalizing itself); otherwise all records present must form
/// one run. First of all, refuses an `out` that overlaps an input model its parts recorded
/// ([`crate::paths::check_overlap`]).
pub fn finalize(out: &Path, only: Option<Part>) -> Result<Finalized> {
    let work = out.join(WORK_DIR);
    if !work.is_dir() {
        let kind = if out.join(MANIFEST_FILE).exists() {
            OutputError::AlreadyFinalized
        } else {
            OutputError::NothingToFinalize
        };
        return Err(Error::output(out, kind));
    }
    crate::paths::check_overlap(out, &recorded_inputs(&work)?)?;
    let _lock = lock(&work.join("finalize.lock"), out, None)?;
    let mut records = Vec::new();
    for entry in std::fs::read_dir(&work).map_err(|e| Error::io(&work, "listing", e))? {
        let name = entry
            .map_err(|e| Error::io(&work, "listing", e))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(tag) = name
            .strip_prefix("part-")
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let Some(part) = tag
            .split_once("-of-")
            .and_then(|(i, n)| Part::parse(&format!("{i}/{n}")).ok())
        else {
            continue;
        };
        if only.is_some_and(|p| p != part) {
            continue;
        }
        let path = work.join(&name);
        let record: PartRecord = read_json(&path)?.ok_or_else(|| {
            Error::io(
                &path,
                "reading part record",
                std::io::ErrorKind::NotFound.into(),
            )
        })?;
        records.push((part, record));
    }
    records.sort_by_key(|(p, _)| (p.count, p.index));

    let mut problems = Vec::new();
    let counts: BTreeSet<u32> = records.iter().map(|(p, _)| p.count).collect();
    if records.is_empty() {
        problems.push(PartsProblem::NoRecords);
    }
    if counts.len() > 1 {
        problems.push(PartsProblem::MixedSplits {
            counts: counts.iter().copied().collect(),
            parts: records.iter().map(|(p, _)| *p).collect(),
        });
    }
    let count = counts.iter().next().copied().unwrap_or(1);
    for index in 0..count {
        match records
            .iter()
            .find(|(p, _)| p.index == index && p.count == count)
        {
            None => problems.push(PartsProblem::MissingPart {
                part: Part { index, count },
            }),
            Some((_, r)) if !r.complete => problems.push(PartsProblem::IncompletePart {
                part: Part { index, count },
                files: r.files.len(),
            }),
            Some(_) => {}
        }
    }
    let mut by_fingerprint: BTreeMap<&str, Vec<Part>> = BTreeMap::new();
    for (p, r) in &records {
        by_fingerprint.entry(&r.fingerprint).or_default().push(*p);
    }
    if by_fingerprint.len() > 1 {
        problems.push(PartsProblem::DifferentPlans {
            groups: by_fingerprint
                .into_iter()
                .map(|(f, parts)| (f.to_owned(), parts))
                .collect(),
        });
    }
    if !problems.is_empty() {
        return Err(Error::Parts {
            path: out.to_path_buf(),
            problems,
        });
    }
    let fingerprint = records[0].1.fingerprint.clone();
    let plan: PlanRecord = read_json(&work.join(plan_record_name(&fingerprint)))?
        .ok_or_else(|| Error::output(out, OutputError::PlanRecordMissing))?;

    // `checksums.b3` lists the files as they are, but packed shards as the files they restore
    // to; `packed.b3` (for a compressed output) lists every file as it is.
    let mut entries = Vec::new();
    let mut packed_entries = Vec::new();
    let mut have = BTreeSet::new();
    for (_, r) in &records {
        for f in &r.files {
            let size = std::fs::metadata(out.join(&f.name)).map(|m| m.len()).ok();
            if size != Some(f.size) {
                problems.push(PartsProblem::FileChanged {
                    name: f.name.clone(),
                });
            }
            let parse = |hex: &str| {
                blake3::Hash::from_hex(hex).map_err(|_| {
                    Error::output(
                        out,
                        OutputError::FileRecordCorrupt {
                            name: f.name.clone(),
                        },
                    )
                })
            };
            let hash = parse(&f.blake3)?;
            packed_entries.push(Entry {
                name: f.name.clone(),
                hash,
            });
            entries.push(match &f.unpacked {
                Some(u) => Entry {
                    name: u.name.clone(),
                    hash: parse(&u.blake3)?,
                },
                None => Entry {
                    name: f.name.clone(),
                    hash,
                },
            });
            have.insert(f.name.clone());
        }
    }
    for name in &plan.files {
        if !have.contains(name) {
            problems.push(PartsProblem::Unwritten { name: name.clone() });
        }
    }
    let lineage = records.iter().find_map(|(_, r)| r.input_sha256.clone());
    if plan.hash_inputs && lineage.is_none() {
        problems.push(PartsProblem::InputsUnhashed {
            part: Part { index: 0, count },
        });
    }
    if !problems.is_empty() {
        return Err(Error::Parts {
            path: out.to_path_buf(),
            problems,
        });
    }
    let lineage = lineage.filter(|_| plan.hash_inputs);
    if let Some(index) = &plan.index_json {
        let hash = write_atomic(&work, &out.join(INDEX_FILE), index.as_bytes())?;
        entries.push(Entry {
            name: INDEX_FILE.into(),
            hash,
        });
        packed_entries.push(Entry {
            name: INDEX_FILE.into(),
            hash,
        });
        crate::failpoint::hit("finalize-index", &|| false);
    }
    let card = plan.card.render(lineage.as_deref());
    let mut generated = vec![(CARD_FILE, card)];
    if let Some(config) = &plan.config_yml {
        generated.push((CONFIG_FILE, config.clone()));
    }
    for (name, text) in generated {
        let hash = write_atomic(&work, &out.join(name), text.as_bytes())?;
        entries.push(Entry {
            name: name.into(),
            hash,
        });
        packed_entries.push(Entry {
            name: name.into(),
            hash,
        });
    }
    let provenance = match &lineage {
        None => plan.provenance_json.clone(),
        Some(inputs) => with_input_hashes(&plan.provenance_json, inputs)?,
    };
    let hash = write_atomic(&work, &out.join(PROVENANCE_FILE), provenance.as_bytes())?;
    entries.push(Entry {
        name: PROVENANCE_FILE.into(),
        hash,
    });
    packed_entries.push(Entry {
        name: PROVENANCE_FILE.into(),
        hash,
    });
    let hash = write_atomic(
        &work,
        &out.join(MANIFEST_FILE),
        manifest::encode(&entries).as_bytes(),
    )?;
    if plan.packed {
        packed_entries.push(Entry {
            name: MANIFEST_FILE.into(),
            hash,
        });
        write_atomic(
            &work,
            &out.join(PACKED_MANIFEST),
            manifest::encode(&packed_entries).as_bytes(),
        )?;
    }
    std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, "removing work directory", e))?;
    sync_dir(out)?;
    Ok(Finalized {
        files: entries.len() + 1,
        parts: count,
    })
}

/// The provenance text with the inputs' SHA-256 added (under [`crate::lineage::PROVENANCE_KEY`]).
fn with_input_hashes(provenance: &str, inputs: &[InputHashes]) -> Result<String> {
    let mut doc: serde_json::Map<String, serde_json::Value> = serde_json::from_str(provenance)
        .map_err(|e| {
            Error::internal(format!("the planned provenance is not a JSON object: {e}"))
        })?;
    doc.insert(
        crate::lineage::PROVENANCE_KEY.into(),
        crate::lineage::to_provenance(inputs),
    );
    let mut text = serde_json::to_string_pretty(&serde_json::Value::Object(doc))
        .expect("serializing JSON cannot fail");
    text.push('\n');
    Ok(text)
}

/// Takes an exclusive, non-blocking lock on `path` for `part` (`None`: for finalizing), or says
/// who holds it.
fn lock(path: &Path, out: &Path, part: Option<Part>) -> Result<File> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, "opening lock file", e))?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(Error::Locked {
            path: out.to_path_buf(),
            part,
            holder: holder.trim().to_owned(),
        });
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "pid {}", std::process::id());
    Ok(file)
}

/// Every input model the plan records in `work` name, for checking before anything is written.
fn recorded_inputs(work: &Path) -> Result<Vec<PathBuf>> {
    let mut inputs = Vec::new();
    for entry in std::fs::read_dir(work).map_err(|e| Error::io(work, "listing", e))? {
        let entry = entry.map_err(|e| Error::io(work, "listing", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("plan-") && name.ends_with(".json") {
            if let Some(record) = read_json::<PlanRecord>(&entry.path())? {
                inputs.extend(record.inputs);
            }
        }
    }
    inputs.sort();
    inputs.dedup();
    Ok(inputs)
}

/// `path` made absolute (canonical where it exists), so a record read from another working
/// directory still names it.
fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    })
}

/// The plan record's file name in the work directory.
fn plan_record_name(fingerprint: &str) -> String {
    format!("plan-{}.json", &fingerprint[..fingerprint.len().min(16)])
}

/// Removes what an earlier, killed run of `part` left under temporary names.
fn remove_temporaries(work: &Path, part: Part) -> Result<()> {
    let prefix = format!("{}.", part.tag());
    for entry in std::fs::read_dir(work).map_err(|e| Error::io(work, "listing", e))? {
        let entry = entry.map_err(|e| Error::io(work, "listing", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".tmp") {
            remove(&entry.path())?;
        }
    }
    Ok(())
}

/// Keeps the recorded files whose size and blake3 still match; the rest will be redone.
fn keep_intact(out: &Path, files: Vec<FileRecord>) -> Result<Vec<FileRecord>> {
    let mut kept = Vec::new();
    for f in files {
        let path = out.join(&f.name);
        let intact = std::fs::metadata(&path).is_ok_and(|m| m.len() == f.size)
            && manifest::hash_file(&path)?.to_hex().as_str() == f.blake3;
        if intact {
            kept.push(f);
        }
    }
    Ok(kept)
}

/// Names an earlier mergestream (or Hugging Face) output may have left.
fn looks_like_output(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(&format!(".safetensors.{}", packed::PACKED_EXT))
        || name.ends_with(".index.json")
        || name == MANIFEST_FILE
        || name == PACKED_MANIFEST
        || name == PROVENANCE_FILE
}

fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() && !path.is_symlink() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.map_err(|e| Error::io(path, "removing", e))
}

/// Writes `bytes` to `path` through a synced temporary in `work`; returns their blake3.
fn write_atomic(work: &Path, path: &Path, bytes: &[u8]) -> Result<blake3::Hash> {
    let mut temp = tempfile::Builder::new()
        .prefix(".write.")
        .suffix(".tmp")
        .permissions(file_mode())
        .tempfile_in(work)
        .map_err(|e| Error::io(path, "creating temporary file", e))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| Error::io(path, "writing", e))?;
    temp.persist(path)
        .map_err(|e| Error::io(path, "renaming into place", e.error))?;
    Ok(blake3::hash(bytes))
}

/// Output files are readable by all, as `cp` would make them (the umask still applies).
fn file_mode() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o666)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "syncing directory", e))
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("serializing JSON cannot fail");
    bytes.push(b'\n');
    bytes
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|json| Error::output(path, OutputError::RecordCorrupt { json })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, "reading", e)),
    }
}
