//! Lineage: the SHA-256 of every input weight file (`--hash-inputs`), and checking an output's
//! recorded inputs again (`mergestream verify OUT --inputs …`).
//!
//! SHA-256 is what the Hugging Face Hub shows for a file stored with Git LFS (its LFS object id,
//! "SHA256" on the file's page), so a published output names exactly which checkpoints it came
//! from, checkable against the Hub without downloading anything. The hashes depend only on the
//! inputs, so an output's bytes stay the same whether it was written whole, in parts or in a
//! sweep.
//!
//! How the run hashes ([`hash_models`]): one thread per input model reads that model's files
//! front to back, with `pread` on the very handles the run validated, while the pipeline merges.
//! SHA-256 cannot be split across threads or fed out of order, and the pipeline reads the inputs
//! in the layout model's tensor order — not in each file's byte order, and only the shards of its
//! part — so it cannot feed the hash itself; a separate sequential reader that moves through the
//! same files at about the same pace as the merge mostly reads what the page cache already holds
//! (measured in `docs/lineage.md`). With `--part I/N`, part 0 hashes every input file (whole
//! files, not just its shards), records the hashes in its part record, and `finalize` writes them
//! into `mergestream.json` and the card. SHA-NI is used where the CPU has it (the `sha2` crate
//! detects it at run time).
//!
//! Not here: what the card says about the hashes (`card`), where they go in the output
//! (`output`), or reading anything but whole input files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result, UsageError, VerifyCause, VerifyProblem};
use crate::model::{Model, Shard};
use crate::pipeline::Cancel;
use crate::plan::PROVENANCE_FILE;

/// The key of the input hashes in `mergestream.json`.
pub const PROVENANCE_KEY: &str = "input_sha256";

/// Bytes read per `pread` while hashing.
const BLOCK: usize = 1 << 20;

/// The SHA-256 of one input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    /// The file's name in its model directory.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// SHA-256 of its bytes, 64 lowercase hex digits.
    pub sha256: String,
}

/// The SHA-256 of every weight file of one input of an output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputHashes {
    /// The input's role in the method (`sft`, `aligned`, `models[0]`, `base_model`, …).
    pub role: String,
    /// The model as the user named it.
    pub model: String,
    /// Its weight files, in the model's shard order.
    pub files: Vec<FileHash>,
}

/// SHA-256 of `len` bytes of `file` from its start, in lowercase hex; stops with
/// [`Error::Interrupted`] on a signal, or returns `None` when `stop` is set.
fn hash_open_file(
    file: &std::fs::File,
    path: &Path,
    len: u64,
    stop: &AtomicBool,
    cancel: &Cancel,
) -> Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0u64;
    while at < len {
        match cancel.signal.load(Ordering::Relaxed) {
            0 => {}
            signal => {
                return Err(Error::Interrupted {
                    signal: signal as i32,
                })
            }
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = (len - at).min(BLOCK as u64) as usize;
        file.read_exact_at(&mut buf[..n], at).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::InputChanged {
                    path: path.to_path_buf(),
                    change: crate::error::InputChange::Length { from: len, to: at },
                }
            } else {
                Error::io(path, "reading to hash", e)
            }
        })?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(Some(hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file's contents, read front to back.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, "opening", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io(path, "reading file status", e))?
        .len();
    let hash = hash_open_file(
        &file,
        path,
        len,
        &AtomicBool::new(false),
        &Cancel::default(),
    )?;
    hash.ok_or_else(|| Error::internal("hashing stopped without being asked to"))
}

fn hash_shard(shard: &Shard, stop: &AtomicBool, cancel: &Cancel) -> Result<Option<FileHash>> {
    let Some(sha256) = hash_open_file(&shard.file, &shard.path, shard.len(), stop, cancel)? else {
        return Ok(None);
    };
    // The bytes hashed are the file's only if nobody changed it meanwhile.
    shard.check_unchanged()?;
    Ok(Some(FileHash {
        name: shard.name.clone(),
        size: shard.len(),
        sha256,
    }))
}

/// SHA-256 of every weight file of every model, one thread per model (each reading its files
/// in order); `Ok(None)` when `stop` was set before the end (the run failed elsewhere).
pub fn hash_models(
    models: &[Model],
    stop: &AtomicBool,
    cancel: &Cancel,
) -> Result<Option<Vec<Vec<FileHash>>>> {
    let results: Vec<Result<Option<Vec<FileHash>>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = models
            .iter()
            .map(|model| {
                scope.spawn(move || {
                    let mut files = Vec::with_capacity(model.shards.len());
                    for shard in &model.shards {
                        match hash_shard(shard, stop, cancel) {
                            Ok(Some(f)) => files.push(f),
                            Ok(None) => return Ok(None),
                            Err(e) => {
                                // No point in the other models' hashes now.
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(Some(files))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::internal("a hashing thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(results.len());
    let mut stopped = false;
    for r in results {
        match r? {
            Some(files) => all.push(files),
            None => stopped = true,
        }
    }
    Ok((!stopped).then_some(all))
}

/// The inputs' hashes as `mergestream.json` holds them.
pub fn to_provenance(inputs: &[InputHashes]) -> serde_json::Value {
    serde_json::to_value(inputs).expect("serializing JSON cannot fail")
}

/// One input file checked by [`verify_inputs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedFile {
    /// The input's role.
    pub role: String,
    /// The model as given to `verify`.
    pub model: PathBuf,
    /// The file's name.
    pub name: String,
    /// Its SHA-256, as recorded and as found.
    pub sha256: String,
}

/// An input model given to [`verify_inputs`]: its path, and the role it has (`None`: the next
/// recorded role, in order).
#[derive(Debug, Clone)]
pub struct GivenInput {
    /// The role, when known (from a config).
    pub role: Option<String>,
    /// The model directory or file.
    pub path: PathBuf,
}

/// The input hashes recorded in the output `dir`'s `mergestream.json`.
pub fn recorded(dir: &Path) -> Result<Vec<InputHashes>> {
    let path = dir.join(PROVENANCE_FILE);
    let problem = |cause| Error::Verify {
        path: dir.to_path_buf(),
        problems: vec![VerifyProblem::new(cause)],
    };
    let bytes = std::fs::read(&path).map_err(|source| {
        problem(VerifyCause::Unreadable {
            name: PROVENANCE_FILE.into(),
            source,
        })
    })?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|json| problem(VerifyCause::ProvenanceInvalid { json }))?;
    let Some(value) = doc.get(PROVENANCE_KEY) else {
        return Err(problem(VerifyCause::InputsNotHashed));
    };
    serde_json::from_value(value.clone())
        .map_err(|json| problem(VerifyCause::ProvenanceInvalid { json }))
}

/// Re-hashes the weight files of the `given` input models and compares them with the hashes the
/// output `dir` recorded (`--hash-inputs`): every recorded file must be in the given model with
/// the recorded SHA-256, and the given model must have no weight file the record lacks. Returns
/// every file checked, or `Err(Error::Verify)` listing every difference.
pub fn verify_inputs(dir: &Path, given: &[GivenInput]) -> Result<Vec<CheckedFile>> {
    let record = recorded(dir)?;
    let roles: Vec<String> = record.iter().map(|r| r.role.clone()).collect();
    if given.len() != record.len() {
        return Err(UsageError::InputCount {
            given: given.len(),
            roles,
        }
        .into());
    }
    let mut pairs: Vec<(&InputHashes, &GivenInput)> = Vec::new();
    for (k, g) in given.iter().enumerate() {
        let r =
            match &g.role {
                None => &record[k],
                Some(role) => record.iter().find(|r| &r.role == role).ok_or_else(|| {
                    UsageError::UnknownRole {
                        role: role.clone(),
                        roles: roles.clone(),
                    }
                })?,
            };
        pairs.push((r, g));
    }
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    let never = AtomicBool::new(false);
    let cancel = Cancel::default();
    for (r, g) in pairs {
        let model = Model::open(&g.path)?;
        for f in &r.files {
            let Some(shard) = model.shards.iter().find(|s| s.name == f.name) else {
                problems.push(VerifyProblem::new(VerifyCause::InputFileMissing {
                    role: r.role.clone(),
                    model: g.path.clone(),
                    name: f.name.clone(),
                }));
                continue;
            };
            let actual = hash_shard(shard, &never, &cancel)?
                .ok_or_else(|| Error::internal("hashing stopped without being asked to"))?;
            if actual.sha256 != f.sha256 {
                problems.push(VerifyProblem::new(VerifyCause::InputHashMismatch {
                    role: r.role.clone(),
                    model: g.path.clone(),
                    name: f.name.clone(),
                    actual: actual.sha256,
                    recorded: f.sha256.clone(),
                }));
            } else {
                checked.push(CheckedFile {
                    role: r.role.clone(),
                    model: g.path.clone(),
                    name: f.name.clone(),
                    sha256: actual.sha256,
                });
            }
        }
        for shard in &model.shards {
            if !r.files.iter().any(|f| f.name == shard.name) {
                problems.push(VerifyProblem::new(VerifyCause::InputFileUnrecorded {
                    role: r.role.clone(),
                    model: g.path.clone(),
                    name: shard.name.clone(),
                }));
            }
        }
    }
    if problems.is_empty() {
        Ok(checked)
    } else {
        Err(Error::Verify {
            path: dir.to_path_buf(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS 180-2 test vectors, and one longer than a block of the reader.
    #[test]
    fn sha256_of_files_matches_known_digests() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"".to_vec(),
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                b"abc".to_vec(),
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                vec![b'a'; 1_000_000],
                "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
            ),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".repeat(40_000),
                // That 2.24 MB string (more than two read blocks), digest from coreutils'
                // `sha256sum`.
                "30551ba27a056d35d1e050c792294fbd4ba1e55d6ba706cd4c1779f3f93a8ab0",
            ),
        ];
        for (i, (bytes, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, bytes).unwrap();
            assert_eq!(sha256_file(&path).unwrap(), *want, "case {i}");
        }
    }
}
