//! `checksums.b3`: the blake3 manifest of an output directory, in `b3sum`'s format.
//!
//! One line per file, `<64 hex digits>  <name>`, sorted by name, so `b3sum --check checksums.b3`
//! reads it as it is. A name is a path relative to the output directory: a file name, or a file
//! of a subdirectory copied from the input (`1_Pooling/config.json`); never absolute, never with
//! `..`, `.` or empty components. The hashes come from the bytes as they were written (see `output`); this
//! module only formats, parses and re-hashes.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The file's name, relative to the output directory.
    pub name: String,
    /// Its blake3.
    pub hash: blake3::Hash,
}

/// The manifest text for `entries` (sorted here by name).
pub fn encode(entries: &[Entry]) -> String {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    sorted
        .iter()
        .map(|e| format!("{}  {}\n", e.hash.to_hex(), e.name))
        .collect()
}

/// Parses manifest text into its entries, and the malformed lines as (1-based number, text).
pub(crate) fn parse(text: &str) -> (Vec<Entry>, Vec<(usize, String)>) {
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let parsed = line.split_once("  ").and_then(|(hex, name)| {
            let hash = blake3::Hash::from_hex(hex).ok()?;
            is_safe_relative(name).then(|| Entry {
                name: name.to_owned(),
                hash,
            })
        });
        match parsed {
            Some(e) => entries.push(e),
            None => bad.push((n + 1, line.to_owned())),
        }
    }
    (entries, bad)
}

/// Whether `name` is a path that stays inside the directory: `/`-separated components, none
/// empty, `.` or `..` (so no absolute path either).
pub fn is_safe_relative(name: &str) -> bool {
    !name.is_empty()
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// blake3 of a file's contents.
pub fn hash_file(path: &Path) -> Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hash_into(path, &mut hasher)?;
    Ok(hasher.finalize())
}

/// Feeds a file's contents to `hasher`, read in fixed-size pieces.
pub fn hash_into(path: &Path, hasher: &mut blake3::Hasher) -> Result<()> {
    let mut file = File::open(path).map_err(|e| Error::io(path, "opening", e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::io(path, "reading", e))?;
        if n == 0 {
            return Ok(());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_sorted() {
        let entries = vec![
            Entry {
                name: "b".into(),
                hash: blake3::hash(b"b"),
            },
            Entry {
                name: "a".into(),
                hash: blake3::hash(b"a"),
            },
        ];
        let text = encode(&entries);
        assert!(text.starts_with(&format!("{}  a\n", blake3::hash(b"a").to_hex())));
        let (parsed, bad) = parse(&text);
        assert_eq!(parsed[0].name, "a");
        assert_eq!((parsed.len(), bad.len()), (2, 0));
        assert_eq!(parse("xyz  a\n").1, [(1, "xyz  a".to_string())]);
        let traversal = format!("{}  ../a", blake3::hash(b"").to_hex());
        assert_eq!(parse(&format!("{text}{traversal}\n")).1, [(3, traversal)]);
    }

    #[test]
    fn names_are_safe_relative_paths() {
        let h = blake3::hash(b"").to_hex();
        for good in [
            "a",
            "1_Pooling/config.json",
            "a/b/c",
            "..a",
            "a..",
            ".hidden",
        ] {
            let (entries, bad) = parse(&format!("{h}  {good}\n"));
            assert_eq!((entries.len(), bad.len()), (1, 0), "{good}");
            assert_eq!(entries[0].name, good);
        }
        for unsafe_name in [
            "",
            "/etc/passwd",
            "..",
            ".",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a/.",
            "../a",
        ] {
            let (entries, bad) = parse(&format!("{h}  {unsafe_name}\n"));
            assert_eq!((entries.len(), bad.len()), (0, 1), "{unsafe_name:?}");
        }
    }
}
