//! Model references: local paths and Hugging Face ids resolved offline from the local cache.
//!
//! mergekit (`mergekit/common.py:ModelReference.local_path`) takes a reference as a local path
//! when `os.path.exists(path)` — relative to the **working directory**, not to the config
//! file's — and otherwise as a Hub id that it downloads. We follow the same order but never
//! touch the network: a Hub id must already be in the cache that `huggingface_hub` uses, laid
//! out as
//!
//! ```text
//! <cache>/models--<org>--<name>/refs/<revision>        (a file holding a commit hash)
//! <cache>/models--<org>--<name>/snapshots/<commit>/     (the files, symlinks into ../../blobs/)
//! ```
//!
//! The cache directory is chosen as `huggingface_hub` 0.2x–1.x chooses it: `HF_HUB_CACHE`, else
//! the legacy `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (a leading `~` in a
//! variable is expanded; `$VAR`s inside one are not). A revision is a branch or tag name
//! (looked up in `refs/`, `main` by default) or a full 40-hex commit hash (used directly).
//! When the model is absent the error lists every place looked at and the download command.
//!
//! Not here: checking that the directory holds a loadable model (`model::Model::open` does), or
//! LoRA references (`model+adapter`, refused by the config reader).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::error::{SearchOutcome, Searched};

/// The local Hugging Face hub cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfCache {
    /// The `hub` directory holding `models--org--name` folders.
    pub dir: PathBuf,
    /// Which variable chose it (`"HF_HUB_CACHE"`, …, or `"the default ~/.cache/huggingface/hub"`).
    pub chosen_by: &'static str,
}

/// A Hub model found in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `<cache>/models--org--name/snapshots/<commit>`.
    pub dir: PathBuf,
    /// The commit hash the revision resolved to.
    pub commit: String,
}

impl HfCache {
    /// A cache at `dir` (tests; callers that know better than the environment).
    pub fn at(dir: impl Into<PathBuf>) -> HfCache {
        HfCache {
            dir: dir.into(),
            chosen_by: "the caller",
        }
    }

    /// The cache this process's environment names.
    pub fn from_env() -> HfCache {
        HfCache::from_vars(|name| std::env::var_os(name))
    }

    /// The cache that the variables `var` returns name (`var("HF_HOME")`, …).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> HfCache {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let home = || {
            set("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/"))
        };
        let expand = |v: OsString| -> PathBuf {
            let p = PathBuf::from(v);
            match p.strip_prefix("~") {
                Ok(rest) => home().join(rest),
                Err(_) => p,
            }
        };
        if let Some(v) = set("HF_HUB_CACHE") {
            return HfCache {
                dir: expand(v),
                chosen_by: "HF_HUB_CACHE",
            };
        }
        if let Some(v) = set("HUGGINGFACE_HUB_CACHE") {
            return HfCache {
                dir: expand(v),
                chosen_by: "HUGGINGFACE_HUB_CACHE",
            };
        }
        if let Some(v) = set("HF_HOME") {
            return HfCache {
                dir: expand(v).join("hub"),
                chosen_by: "HF_HOME",
            };
        }
        if let Some(v) = set("XDG_CACHE_HOME") {
            return HfCache {
                dir: expand(v).join("huggingface").join("hub"),
                chosen_by: "XDG_CACHE_HOME",
            };
        }
        HfCache {
            dir: home().join(".cache").join("huggingface").join("hub"),
            chosen_by: "the default ~/.cache/huggingface/hub",
        }
    }

    /// The folder of repository `repo` (`org/name` or `name`).
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        let mut folder = String::from("models");
        for part in repo.split('/') {
            folder.push_str("--");
            folder.push_str(part);
        }
        self.dir.join(folder)
    }

    /// Finds `repo` at `revision` (`main` when `None`) in the cache, or says what is missing.
    pub fn resolve(&self, repo: &str, revision: Option<&str>) -> Result<Snapshot, Searched> {
        let repo_dir = self.repo_dir(repo);
        if !repo_dir.is_dir() {
            return Err(Searched {
                path: repo_dir,
                outcome: SearchOutcome::NotInCache {
                    cache: self.chosen_by,
                },
            });
        }
        let revision = revision.unwrap_or("main");
        let commit = if is_commit_hash(revision) {
            revision.to_owned()
        } else {
            let ref_path = repo_dir.join("refs").join(revision);
            match std::fs::read_to_string(&ref_path) {
                Ok(text) if is_commit_hash(text.trim()) => text.trim().to_owned(),
                _ => {
                    return Err(Searched {
                        path: ref_path,
                        outcome: SearchOutcome::NoRef {
                            revision: revision.to_owned(),
                        },
                    })
                }
            }
        };
        let dir = repo_dir.join("snapshots").join(&commit);
        if !dir.is_dir() {
            return Err(Searched {
                path: dir,
                outcome: SearchOutcome::NoSnapshot { commit },
            });
        }
        Ok(Snapshot { dir, commit })
    }
}

/// A full commit hash, as `huggingface_hub` recognises one (`[0-9a-f]{40}`).
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `s` is spelt like a Hub repository id (`huggingface_hub.utils.validate_repo_id`):
/// `name` or `org/name`, of letters, digits, `-`, `_`, `.`, at most 96 characters, without
/// `--` or `..`, not starting or ending with `-` or `.`.
pub fn is_repo_id(s: &str) -> bool {
    if s.is_empty() || s.len() > 96 || s.contains("--") || s.contains("..") {
        return false;
    }
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() > 2 {
        return false;
    }
    parts.iter().all(|part| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
    })
}

/// The command that downloads `repo` at `revision` into the cache.
pub fn download_command(repo: &str, revision: Option<&str>) -> String {
    match revision {
        Some(rev) => format!(
            "hf download {repo} --revision {rev}   (older huggingface_hub: huggingface-cli download {repo} --revision {rev})"
        ),
        None => format!(
            "hf download {repo}   (older huggingface_hub: huggingface-cli download {repo})"
        ),
    }
}

/// `path` as given, or joined to `base` when relative.
pub(crate) fn local_candidate(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const OTHER: &str = "fedcba9876543210fedcba9876543210fedcba98";

    /// A cache laid out as huggingface_hub lays it out: blobs, snapshot symlinks, refs.
    fn fake_cache(root: &Path) -> HfCache {
        let repo = root.join("models--org--name");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs").join("abc123"), b"{}").unwrap();
        for commit in [COMMIT, OTHER] {
            let snap = repo.join("snapshots").join(commit);
            std::fs::create_dir_all(&snap).unwrap();
            std::os::unix::fs::symlink("../../blobs/abc123", snap.join("config.json")).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs").join("refs").join("pr")).unwrap();
        std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
        std::fs::write(repo.join("refs").join("v2"), format!("{OTHER}\n")).unwrap();
        std::fs::write(repo.join("refs").join("refs").join("pr").join("1"), OTHER).unwrap();
        HfCache::at(root)
    }

    #[test]
    fn resolves_main_tags_and_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = fake_cache(tmp.path());
        let main = cache.resolve("org/name", None).unwrap();
        assert_eq!(main.commit, COMMIT);
        assert_eq!(
            main.dir,
            tmp.path().join("models--org--name/snapshots").join(COMMIT)
        );
        // Files are reachable through the snapshot's symlinks.
        assert_eq!(std::fs::read(main.dir.join("config.json")).unwrap(), b"{}");
        assert_eq!(cache.resolve("org/name", Some("v2")).unwrap().commit, OTHER);
        assert_eq!(
            cache.resolve("org/name", Some("refs/pr/1")).unwrap().commit,
            OTHER
        );
        assert_eq!(
            cache.resolve("org/name", Some(OTHER)).unwrap().commit,
            OTHER
        );
    }

    #[test]
    fn says_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = fake_cache(tmp.path());
        let e = cache.resolve("org/other", None).unwrap_err();
        assert_eq!(e.path, tmp.path().join("models--org--other"));
        assert!(matches!(e.outcome, SearchOutcome::NotInCache { .. }));
        let e = cache.resolve("org/name", Some("dev")).unwrap_err();
        assert_eq!(e.path, tmp.path().join("models--org--name/refs/dev"));
        assert!(matches!(e.outcome, SearchOutcome::NoRef { .. }));
        let missing = "1111111111111111111111111111111111111111";
        let e = cache.resolve("org/name", Some(missing)).unwrap_err();
        assert!(matches!(e.outcome, SearchOutcome::NoSnapshot { ref commit } if commit == missing));
        // A short hash is a ref name, not a commit.
        assert!(matches!(
            cache
                .resolve("org/name", Some("0123456"))
                .unwrap_err()
                .outcome,
            SearchOutcome::NoRef { .. }
        ));
    }

    #[test]
    fn cache_directory_precedence() {
        let vars = |pairs: &[(&str, &str)]| {
            let map: HashMap<String, OsString> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), OsString::from(v)))
                .collect();
            HfCache::from_vars(move |k| map.get(k).cloned())
        };
        let all = [
            ("HF_HUB_CACHE", "/a"),
            ("HUGGINGFACE_HUB_CACHE", "/b"),
            ("HF_HOME", "/c"),
            ("XDG_CACHE_HOME", "/d"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(vars(&all).dir, PathBuf::from("/a"));
        assert_eq!(vars(&all[1..]).dir, PathBuf::from("/b"));
        assert_eq!(vars(&all[2..]).dir, PathBuf::from("/c/hub"));
        assert_eq!(vars(&all[3..]).dir, PathBuf::from("/d/huggingface/hub"));
        let home = vars(&all[4..]);
        assert_eq!(home.dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(home.chosen_by.contains("default"));
        // Empty variables count as unset; ~ expands to HOME.
        let c = vars(&[("HF_HUB_CACHE", ""), ("HF_HOME", "~/hf"), ("HOME", "/h")]);
        assert_eq!(c.dir, PathBuf::from("/h/hf/hub"));
        assert_eq!(c.chosen_by, "HF_HOME");
    }

    #[test]
    fn repo_ids() {
        for ok in [
            "gpt2",
            "org/name",
            "meta-llama/Meta-Llama-3-8B",
            "a.b/c_d-1.5",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "./x",
            "a/b/c",
            "a--b",
            "a..b",
            "-a",
            "a/",
            "a b",
            "org/name.",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
        let cache = HfCache::at("/c");
        assert_eq!(cache.repo_dir("gpt2"), PathBuf::from("/c/models--gpt2"));
        assert!(download_command("org/name", Some("v1"))
            .starts_with("hf download org/name --revision v1"));
    }
}
