//! `model.safetensors.index.json`: the Hugging Face shard index.
//!
//! Parsing checks the index on its own (JSON shape, no tensor listed twice, shard names that are
//! plain file names — `..`, separators and absolute paths are refused so an index can never point
//! outside its model directory). Cross-checking the index against the shards' headers is the
//! model loader's job, which has both in hand.

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use crate::error::IndexError;

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

/// Parses and checks index `bytes`. The error says what is wrong; the caller knows which file
/// it is.
pub fn parse(bytes: &[u8]) -> std::result::Result<Index, IndexError> {
    let text = std::str::from_utf8(bytes).map_err(|e| IndexError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    // Parse the weight map by hand so that a tensor listed twice is seen, not silently merged.
    let top: Value = serde_json::from_str(text).map_err(|json| IndexError::NotJson { json })?;
    let Value::Object(top) = top else {
        return Err(IndexError::NotObject);
    };
    if !top.contains_key("weight_map") {
        return Err(IndexError::NoWeightMap);
    }
    let raw: RawIndex =
        serde_json::from_str(text).map_err(|json| IndexError::WeightMapMalformed { json })?;
    let mut seen = HashSet::new();
    let mut weight_map = Vec::with_capacity(raw.weight_map.0.len());
    for (tensor, shard) in raw.weight_map.0 {
        if !seen.insert(tensor.clone()) {
            return Err(IndexError::ListedTwice { tensor });
        }
        let Value::String(shard) = shard else {
            return Err(IndexError::ShardNotString {
                tensor,
                value: shard.to_string(),
            });
        };
        check_shard_name(&tensor, &shard)?;
        weight_map.push((tensor, shard));
    }
    if weight_map.is_empty() {
        return Err(IndexError::Empty);
    }
    Ok(Index { weight_map })
}

/// A shard (named for `tensor`) must be a plain file name inside the model directory.
pub fn check_shard_name(tensor: &str, shard: &str) -> std::result::Result<(), IndexError> {
    if shard.is_empty() || shard == "." || shard == ".." {
        return Err(IndexError::ShardNotFileName {
            tensor: tensor.to_owned(),
            shard: shard.to_owned(),
        });
    }
    if shard.contains('/') || shard.contains('\\') || shard.contains('\0') {
        return Err(IndexError::ShardIsPath {
            tensor: tensor.to_owned(),
            shard: shard.to_owned(),
        });
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

    fn p(json: &str) -> std::result::Result<Index, IndexError> {
        parse(json.as_bytes())
    }

    #[test]
    fn parses_and_lists_shards() {
        let idx = p(r#"{"metadata":{"total_size":4},"weight_map":{"a":"s2","b":"s1","c":"s2"}}"#)
            .unwrap();
        assert_eq!(idx.shards(), ["s1", "s2"]);
    }

    #[test]
    fn refuses_duplicates_and_paths() {
        use IndexError as I;
        type Expect = fn(&IndexError) -> bool;
        let cases: [(&str, Expect); 10] = [
            (
                r#"{"weight_map":{"a":"s","a":"s"}}"#,
                |e| matches!(e, I::ListedTwice { tensor } if tensor == "a"),
            ),
            (
                r#"{"weight_map":{"a":"../s"}}"#,
                |e| matches!(e, I::ShardIsPath { shard, .. } if shard == "../s"),
            ),
            (r#"{"weight_map":{"a":"/etc/passwd"}}"#, |e| {
                matches!(e, I::ShardIsPath { .. })
            }),
            (r#"{"weight_map":{"a":".."}}"#, |e| {
                matches!(e, I::ShardNotFileName { .. })
            }),
            (
                r#"{"weight_map":{"a":3}}"#,
                |e| matches!(e, I::ShardNotString { value, .. } if value == "3"),
            ),
            (r#"{"weight_map":{}}"#, |e| matches!(e, I::Empty)),
            (r#"{"metadata":{}}"#, |e| matches!(e, I::NoWeightMap)),
            (r#"{"weight_map":[]}"#, |e| {
                matches!(e, I::WeightMapMalformed { .. })
            }),
            (r#"[]"#, |e| matches!(e, I::NotObject)),
            (r#"{"weight_map":"#, |e| matches!(e, I::NotJson { .. })),
        ];
        for (json, expected) in cases {
            match p(json) {
                Ok(_) => panic!("{json} parses"),
                Err(e) => assert!(expected(&e), "{json}: {e:?}"),
            }
        }
        assert!(matches!(
            parse(b"{\"a\xff\":1}"),
            Err(I::NotUtf8 { valid_up_to: 3 })
        ));
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
