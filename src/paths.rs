//! Where an output may go: never onto, into, or around an input model.
//!
//! [`check_overlap`] is what every command that writes calls first, before it creates or removes
//! anything: `expo` (whole or `--part`), `finalize` (with the inputs its parts recorded), and
//! `plan --out` reports the same. An output directory is refused when it is an input model's
//! directory, lies inside one, or contains one — however the paths are spelled — and when a
//! file already in it *is* an input file (a hard link of it, or a symbolic link to it), which
//! writing the output would replace.
//!
//! Three comparisons, because each alone can be fooled:
//! - canonical paths (symlinks and `..` resolved; for an output that does not exist yet, its
//!   longest existing ancestor resolved and the rest applied as written);
//! - the (device, inode) identities of the directories along each path, so a bind mount — the
//!   same directory under another path — is the same directory;
//! - each path's place in its filesystem, from `/proc/self/mountinfo` (a bind mount's root
//!   within its filesystem plus the rest of the path), which catches an input seen through a
//!   bind mount of a directory inside the output, where no path or ancestor matches.
//!
//! An input model directory protects itself and every directory its files' links point into: a
//! Hugging Face cache `snapshots/<rev>/` is a directory of links into `blobs/`, so the blobs
//! directory is protected too. A single-file model protects that file (and, if it is a link,
//! the directory holding its target). Inputs that do not exist are skipped: opening them reports
//! that. This module reads metadata only.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, OverlapKind, Result};

/// Refuses (with [`Error::Overlap`], naming both paths) an `output` directory that would
/// overlap any of `inputs` (model directories or `.safetensors` files, as the user named them).
/// Creates and removes nothing; call it before anything that does.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let model = dir.path().join("model");
/// std::fs::create_dir(&model).unwrap();
/// let inside = model.join("merged");
/// let err = mergestream::paths::check_overlap(&inside, &[&model]).unwrap_err();
/// assert_eq!(err.exit_code(), 2);
/// assert!(mergestream::paths::check_overlap(&dir.path().join("merged"), &[&model]).is_ok());
/// ```
pub fn check_overlap<P: AsRef<Path>>(output: &Path, inputs: &[P]) -> Result<()> {
    let out = Place::of(&resolve(output));
    let mounts = Mounts::read();
    for input in inputs {
        let input = input.as_ref();
        let Some(model) = InputModel::of(input) else {
            continue;
        };
        let overlap = |location: &Path, storage: bool, kind: OverlapKind| Error::Overlap {
            output: output.to_path_buf(),
            input: input.to_path_buf(),
            location: location.to_path_buf(),
            storage,
            kind,
        };
        for dir in &model.dirs {
            if let Some(kind) = relation(&out, &dir.place, &mounts) {
                return Err(overlap(&dir.place.path, dir.storage, kind));
            }
        }
        for file in &model.files {
            // A file can be the output path, or lie inside it; nothing lies inside a file.
            if let Some(kind @ (OverlapKind::Same | OverlapKind::InputInsideOutput)) =
                relation(&out, &file.place, &mounts)
            {
                return Err(overlap(&file.place.path, false, kind));
            }
        }
        if let Some((output_file, input_file)) = shared_file(&out.path, &model.files) {
            return Err(overlap(
                &input_file,
                false,
                OverlapKind::SharesFile { output_file },
            ));
        }
    }
    Ok(())
}

/// A path with what identifies it and the directories above it.
#[derive(Debug)]
struct Place {
    /// Canonical (as far as it exists).
    path: PathBuf,
    /// (device, inode) of the path itself, if it exists.
    id: Option<(u64, u64)>,
    /// (device, inode) of every existing ancestor, the path itself excluded.
    ancestors: Vec<(u64, u64)>,
}

impl Place {
    fn of(path: &Path) -> Place {
        let id = identity(path);
        let ancestors = path.ancestors().skip(1).filter_map(identity).collect();
        Place {
            path: path.to_path_buf(),
            id,
            ancestors,
        }
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// How the output `out` stands to the input place `input`: the same, inside it, around it, or
/// apart (`None`).
fn relation(out: &Place, input: &Place, mounts: &Mounts) -> Option<OverlapKind> {
    // Canonical paths.
    if out.path == input.path {
        return Some(OverlapKind::Same);
    }
    if out.path.starts_with(&input.path) {
        return Some(OverlapKind::OutputInsideInput);
    }
    if input.path.starts_with(&out.path) {
        return Some(OverlapKind::InputInsideOutput);
    }
    // Identities of the directories along the way (bind mounts).
    if let Some(id) = input.id {
        if out.id == Some(id) {
            return Some(OverlapKind::Same);
        }
        if out.ancestors.contains(&id) {
            return Some(OverlapKind::OutputInsideInput);
        }
    }
    if let Some(id) = out.id {
        if input.ancestors.contains(&id) {
            return Some(OverlapKind::InputInsideOutput);
        }
    }
    // Places within filesystems (a bind mount of a directory inside the output).
    let (Some((out_dev, out_fs)), Some((in_dev, in_fs))) =
        (mounts.locate(&out.path), mounts.locate(&input.path))
    else {
        return None;
    };
    if out_dev != in_dev {
        return None;
    }
    if out_fs == in_fs {
        Some(OverlapKind::Same)
    } else if out_fs.starts_with(&in_fs) {
        Some(OverlapKind::OutputInsideInput)
    } else if in_fs.starts_with(&out_fs) {
        Some(OverlapKind::InputInsideOutput)
    } else {
        None
    }
}

/// A directory an input model occupies.
struct Dir {
    place: Place,
    /// Whether it is where the model's links point, not the model directory itself.
    storage: bool,
}

/// A file of an input model: where its bytes are (links followed), and, for a link, where the
/// link itself is.
struct File {
    place: Place,
}

/// What an input model occupies.
struct InputModel {
    dirs: Vec<Dir>,
    files: Vec<File>,
}

impl InputModel {
    /// What `input` occupies, or `None` if it does not exist.
    fn of(input: &Path) -> Option<InputModel> {
        let meta = std::fs::metadata(input).ok()?;
        let canonical = std::fs::canonicalize(input).ok()?;
        let mut model = InputModel {
            dirs: Vec::new(),
            files: Vec::new(),
        };
        // Directories already protected; the model's own directory is not storage.
        let mut storage = HashSet::new();
        if meta.is_dir() {
            storage.insert(canonical.clone());
        }
        let mut add_file = |model: &mut InputModel, path: &Path, canonical: PathBuf| {
            let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
            if is_link {
                if let Some(parent) = canonical.parent() {
                    if storage.insert(parent.to_path_buf()) {
                        model.dirs.push(Dir {
                            place: Place::of(parent),
                            storage: true,
                        });
                    }
                }
                // The link itself (a snapshot's entry) belongs to the model too.
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                let parent = std::fs::canonicalize(parent.unwrap_or(Path::new(".")));
                if let (Ok(parent), Some(name)) = (parent, path.file_name()) {
                    model.files.push(File {
                        place: Place::of(&parent.join(name)),
                    });
                }
            }
            model.files.push(File {
                place: Place::of(&canonical),
            });
        };
        if meta.is_dir() {
            model.dirs.push(Dir {
                place: Place::of(&canonical),
                storage: false,
            });
            for entry in std::fs::read_dir(input).ok()?.flatten() {
                let path = entry.path();
                let is_file = std::fs::metadata(&path).is_ok_and(|m| m.is_file());
                if let Some(target) = std::fs::canonicalize(&path).ok().filter(|_| is_file) {
                    add_file(&mut model, &path, target);
                }
            }
        } else {
            add_file(&mut model, input, canonical);
        }
        Some(model)
    }
}

/// The first file directly in `out` that is one of `files` (same device and inode, links
/// followed), with the input file it is.
fn shared_file(out: &Path, files: &[File]) -> Option<(PathBuf, PathBuf)> {
    let entries = std::fs::read_dir(out).ok()?;
    let mut shared: Vec<(PathBuf, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let id = identity(&path)?;
            let input = files.iter().find(|f| f.place.id == Some(id))?;
            Some((path, input.place.path.clone()))
        })
        .collect();
    shared.sort();
    shared.into_iter().next()
}

/// `path` made absolute and canonical as far as it exists; the rest, which does not exist yet
/// (and so holds no links), applied as written, `..` and `.` included.
fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    for base in absolute.ancestors() {
        let Ok(canonical) = std::fs::canonicalize(base) else {
            continue;
        };
        let rest = absolute.strip_prefix(base).unwrap_or(Path::new(""));
        let mut out = canonical;
        for component in rest.components() {
            match component {
                Component::ParentDir => {
                    out.pop();
                }
                Component::Normal(name) => out.push(name),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
        return out;
    }
    absolute
}

/// The mount table, for finding where a path lies within its filesystem.
struct Mounts(Vec<Mount>);

struct Mount {
    /// `major:minor` of the filesystem.
    device: String,
    /// The directory of the filesystem mounted here (`/` for a whole filesystem, the bound
    /// directory for a bind mount).
    root: PathBuf,
    /// Where it is mounted.
    point: PathBuf,
}

impl Mounts {
    /// `/proc/self/mountinfo`, or an empty table where it cannot be read.
    fn read() -> Mounts {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        Mounts(text.lines().filter_map(parse_mountinfo_line).collect())
    }

    /// The filesystem `path` (canonical) is on, and the path within it: the mount with the
    /// longest mount point above `path` (the last of those, if several are stacked there).
    fn locate(&self, path: &Path) -> Option<(&str, PathBuf)> {
        let mount = self
            .0
            .iter()
            .filter(|m| path.starts_with(&m.point))
            .max_by_key(|m| m.point.components().count())?;
        let mount = self
            .0
            .iter()
            .rfind(|m| m.point == mount.point)
            .unwrap_or(mount);
        let rest = path.strip_prefix(&mount.point).ok()?;
        Some((&mount.device, mount.root.join(rest)))
    }
}

/// One line of `/proc/self/mountinfo`: `ID PARENT MAJOR:MINOR ROOT MOUNT-POINT …`, paths with
/// spaces, tabs, newlines and backslashes written as octal escapes.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let mut fields = line.split(' ');
    let device = fields.nth(2)?.to_owned();
    let root = unescape(fields.next()?);
    let point = unescape(fields.next()?);
    Some(Mount {
        device,
        root,
        point,
    })
}

fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_applies_the_missing_rest_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(base.join("a")).unwrap();
        std::os::unix::fs::symlink(base.join("a"), base.join("link")).unwrap();
        assert_eq!(resolve(&base.join("link/new")), base.join("a/new"));
        assert_eq!(resolve(&base.join("nope/../a/./x")), base.join("a/x"));
        assert_eq!(resolve(&base.join("a/..")), base);
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let m = parse_mountinfo_line(
            "36 35 98:0 /mnt\\0401 /mnt/my\\040dir rw,noatime master:1 - ext3 /dev/root rw",
        )
        .unwrap();
        assert_eq!(m.device, "98:0");
        assert_eq!(m.root, Path::new("/mnt 1"));
        assert_eq!(m.point, Path::new("/mnt/my dir"));
        let mounts = Mounts(vec![
            Mount {
                device: "8:1".into(),
                root: "/".into(),
                point: "/".into(),
            },
            m,
        ]);
        assert_eq!(
            mounts.locate(Path::new("/mnt/my dir/x")),
            Some(("98:0", PathBuf::from("/mnt 1/x")))
        );
        assert_eq!(
            mounts.locate(Path::new("/mnt/my dirt")),
            Some(("8:1", PathBuf::from("/mnt/my dirt")))
        );
    }
}
