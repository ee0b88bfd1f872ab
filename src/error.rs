//! The library's one error type.
//!
//! Every variant carries what a user needs to act on it: the file, and the tensor where there is
//! one. `main.rs` turns an [`Error`] into a message and an exit code ([`Error::exit_code`]); no
//! other module prints errors.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in mergestream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a file failed (open, read, write, rename, …).
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A safetensors file is malformed: its header, or one tensor's entry in it.
    #[error("{}: {}{reason}", path.display(), tensor_prefix(tensor))]
    Format {
        path: PathBuf,
        tensor: Option<String>,
        reason: String,
    },
    /// A `model.safetensors.index.json` is malformed or disagrees with its shards.
    #[error("{}: {}{reason}", path.display(), tensor_prefix(tensor))]
    Index {
        path: PathBuf,
        tensor: Option<String>,
        reason: String,
    },
    /// A path given as a model is not one.
    #[error("{}: {reason}", path.display())]
    Model { path: PathBuf, reason: String },
    /// The two models do not match; every mismatch is listed.
    #[error("the models do not match ({} problem{}; --sft {}, --aligned {}):\n{}", problems.len(), plural(problems.len()), sft.display(), aligned.display(), bullet_list(problems))]
    Mismatch {
        sft: PathBuf,
        aligned: PathBuf,
        problems: Vec<Mismatch>,
    },
    /// An input file changed (truncated, rewritten, replaced) while the run read it.
    #[error("{}: input changed while reading: {reason}", path.display())]
    InputChanged { path: PathBuf, reason: String },
    /// The output directory cannot be used as asked.
    #[error("{}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
    /// Another run holds the lock on this output (or this part of it).
    #[error("{}: {reason}", path.display())]
    Locked { path: PathBuf, reason: String },
    /// `finalize` found the parts' records incomplete or inconsistent.
    #[error("{}: cannot finalize:\n{}", path.display(), bullet_list(problems))]
    Parts {
        path: PathBuf,
        problems: Vec<String>,
    },
    /// `verify` found problems; every one is listed.
    #[error("{}: verification failed ({} problem{}):\n{}", path.display(), problems.len(), plural(problems.len()), bullet_list(problems))]
    Verify {
        path: PathBuf,
        problems: Vec<String>,
    },
    /// SIGINT or SIGTERM arrived; temporaries were removed.
    #[error("interrupted by {}", signal_name(*signal))]
    Interrupted { signal: i32 },
    /// A packed shard or directory is malformed, or packing cannot proceed.
    #[error(transparent)]
    Packed(Box<crate::packed::PackedError>),
    /// The command line asks for something that cannot be done.
    #[error("{0}")]
    Usage(String),
}

impl From<crate::packed::PackedError> for Error {
    fn from(e: crate::packed::PackedError) -> Error {
        Error::Packed(Box::new(e))
    }
}

/// One way in which two models disagree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mismatch {
    pub tensor: String,
    pub problem: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tensor '{}': {}", self.tensor, self.problem)
    }
}

impl Error {
    /// 0 ok, 1 verification or compatibility failure, 2 usage or I/O error, 128+N on signal N.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Mismatch { .. } | Error::Verify { .. } | Error::Parts { .. } => 1,
            Error::Interrupted { signal } => 128 + signal,
            _ => 2,
        }
    }

    pub fn io(path: impl AsRef<Path>, what: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            what,
            source,
        }
    }

    pub fn format(
        path: impl AsRef<Path>,
        tensor: Option<&str>,
        reason: impl Into<String>,
    ) -> Error {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.map(str::to_owned),
            reason: reason.into(),
        }
    }

    pub fn index(path: impl AsRef<Path>, tensor: Option<&str>, reason: impl Into<String>) -> Error {
        Error::Index {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.map(str::to_owned),
            reason: reason.into(),
        }
    }

    pub fn output(path: impl AsRef<Path>, reason: impl Into<String>) -> Error {
        Error::Output {
            path: path.as_ref().to_path_buf(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn tensor_prefix(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!("tensor '{t}': "),
        None => String::new(),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn bullet_list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn signal_name(signal: i32) -> String {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT".into(),
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}
