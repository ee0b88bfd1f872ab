//! Where packed and unpacked bytes go: the [`ByteSink`] seam, and [`AtomicFile`], a file
//! written under a temporary name, hashed as it is written, and renamed into place only when
//! complete.
//!
//! The encoder and decoder write to any [`ByteSink`], so the engine can hand them its own
//! output files (`writer::StreamFile` implements it too). `AtomicFile` writes through the page
//! cache; it knows nothing of the packed format.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::error::{Error, Result};

/// Receives bytes in order.
pub trait ByteSink {
    /// Takes the next `bytes`.
    fn write_all(&mut self, bytes: &[u8]) -> Result<()>;
}

impl ByteSink for Vec<u8> {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

impl ByteSink for crate::writer::StreamFile {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.write(bytes)
    }
}

impl<S: ByteSink + ?Sized> ByteSink for &mut S {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        (**self).write_all(bytes)
    }
}

/// A file being written under a temporary name in a work directory.
pub struct AtomicFile {
    temp: NamedTempFile,
    final_path: PathBuf,
    hasher: blake3::Hasher,
    len: u64,
}

/// A file put in place.
#[derive(Debug, Clone)]
pub struct Persisted {
    /// Its final path.
    pub path: PathBuf,
    /// Its length.
    pub size: u64,
    /// Its blake3, computed as it was written.
    pub blake3: blake3::Hash,
}

impl AtomicFile {
    /// A temporary file in `work` that will become `final_path`.
    pub fn create(work: &Path, final_path: &Path) -> Result<AtomicFile> {
        let temp = tempfile::Builder::new()
            .prefix(".pack.")
            .suffix(".tmp")
            .permissions(file_mode())
            .tempfile_in(work)
            .map_err(|e| Error::io(final_path, "creating temporary file", e))?;
        Ok(AtomicFile {
            temp,
            final_path: final_path.to_path_buf(),
            hasher: blake3::Hasher::new(),
            len: 0,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Syncs the file and renames it into place.
    pub fn persist(self) -> Result<Persisted> {
        let hash = self.hasher.finalize();
        let path = self.final_path;
        self.temp
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(&path, "syncing", e))?;
        self.temp
            .persist(&path)
            .map_err(|e| Error::io(&path, "renaming into place", e.error))?;
        Ok(Persisted {
            path,
            size: self.len,
            blake3: hash,
        })
    }
}

impl ByteSink for AtomicFile {
    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.temp
            .as_file_mut()
            .write_all(bytes)
            .map_err(|e| Error::io(&self.final_path, "writing", e))
    }
}

/// Output files are readable by all, as `cp` would make them (the umask still applies).
fn file_mode() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o666)
}

/// Syncs a directory, so renames into it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, "syncing directory", e))
}
