//! `model.safetensors.index.json`: the Hugging Face shard index.
//!
//! Parsing checks the index on its own (JSON shape, no tensor listed twice, shard names that are
//! plain file names — `..`, separators and absolute paths are refused so an index can never point
//! outside its model directory). Cross-checking the index against the shards' headers is the
//! model loader's job, which has both in hand.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The index file's name in a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The largest index accepted (a 405B model's index is about 100 KB).
pub const MAX_INDEX_LEN: u64 = 64 << 20;

/// A parsed index: which shard holds each tensor.
#[derive(Debug, Clone)]
pub struct Index {
    /// `(tensor, shard file name)` in file order.
    pub weight_map: Vec<(String, String)>,
}

impl Index {
    /// The distinct shard names, sorted.
    pub fn shards(&self) -> Vec<String> {
        let mut names: Vec<String> = self.weight_map.iter().map(|(_, s)| s.clone()).collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Parses and checks the index `bytes` read from `path`.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Index> {
    let bad = |tensor: Option<&str>, reason: String| Error::index(path, tensor, reason);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        bad(
            None,
            format!("not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    // Parse the weight map by hand so that a tensor listed twice is seen, not silently merged.
    let top: Value =
        serde_json::from_str(text).map_err(|e| bad(None, format!("not valid JSON: {e}")))?;
    let Value::Object(top) = top else {
        return Err(bad(None, "not a JSON object".into()));
    };
    if !top.contains_key("weight_map") {
        return Err(bad(None, "has no \"weight_map\"".into()));
    }
    let raw: RawIndex = serde_json::from_str(text)
        .map_err(|e| bad(None, format!("\"weight_map\" is malformed: {e}")))?;
    let mut seen = HashSet::new();
    let mut weight_map = Vec::with_capacity(raw.weight_map.0.len());
    for (tensor, shard) in raw.weight_map.0 {
        if !seen.insert(tensor.clone()) {
            return Err(bad(Some(&tensor), "listed twice in \"weight_map\"".into()));
        }
        let Value::String(shard) = shard else {
            return Err(bad(Some(&tensor), format!("shard {shard} is not a string")));
        };
        check_shard_name(&shard).map_err(|reason| bad(Some(&tensor), reason))?;
        weight_map.push((tensor, shard));
    }
    if weight_map.is_empty() {
        return Err(bad(None, "\"weight_map\" lists no tensors".into()));
    }
    Ok(Index { weight_map })
}

/// A shard must be a plain file name inside the model directory.
pub fn check_shard_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("shard name '{name}' is not a file name"));
    }
    if name.contains('/') || name.contains('\\') || name.contains('\0') {
        return Err(format!(
            "shard name '{name}' is a path; shards must be plain file names in the model directory"
        ));
    }
    Ok(())
}

/// The index JSON for `weight_map` (tensor → shard), as `transformers` writes it: two-space
/// indent, sorted keys, trailing newline.
pub fn encode(total_size: u64, weight_map: &BTreeMap<String, String>) -> String {
    let index = serde_json::json!({
        "metadata": { "total_size": total_size },
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_string_pretty(&index).expect("serializing JSON cannot fail");
    text.push('\n');
    text
}

#[derive(serde::Deserialize)]
struct RawIndex {
    weight_map: OrderedMap,
}

/// A JSON object's entries in file order, duplicates kept.
struct OrderedMap(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<OrderedMap, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(OrderedMap(entries))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(json: &str) -> Result<Index> {
        parse(Path::new(INDEX_FILE), json.as_bytes())
    }

    #[test]
    fn parses_and_lists_shards() {
        let idx = p(r#"{"metadata":{"total_size":4},"weight_map":{"a":"s2","b":"s1","c":"s2"}}"#)
            .unwrap();
        assert_eq!(idx.shards(), ["s1", "s2"]);
    }

    #[test]
    fn refuses_duplicates_and_paths() {
        for (json, expect) in [
            (r#"{"weight_map":{"a":"s","a":"s"}}"#, "twice"),
            (r#"{"weight_map":{"a":"../s"}}"#, "path"),
            (r#"{"weight_map":{"a":"/etc/passwd"}}"#, "path"),
            (r#"{"weight_map":{"a":".."}}"#, "not a file name"),
            (r#"{"weight_map":{"a":3}}"#, "not a string"),
            (r#"{"weight_map":{}}"#, "no tensors"),
            (r#"{"metadata":{}}"#, "no \"weight_map\""),
            (r#"[]"#, "not a JSON object"),
            (r#"{"weight_map":"#, "not valid JSON"),
        ] {
            let err = p(json).unwrap_err().to_string();
            assert!(err.contains(expect), "{json}: {err}");
        }
    }

    #[test]
    fn encodes_like_transformers() {
        let map = BTreeMap::from([
            ("b".to_string(), "s1".to_string()),
            ("a".into(), "s2".into()),
        ]);
        assert_eq!(
            encode(6, &map),
            "{\n  \"metadata\": {\n    \"total_size\": 6\n  },\n  \"weight_map\": {\n    \"a\": \"s2\",\n    \"b\": \"s1\"\n  }\n}\n"
        );
    }
}
