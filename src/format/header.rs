//! safetensors headers: read, validate, encode.
//!
//! A safetensors file is `u64 little-endian N`, then `N` bytes of JSON (an object mapping tensor
//! names to `{dtype, shape, data_offsets}`, plus an optional `__metadata__` object of strings),
//! then the data section. [`read`] (from an open file) and [`parse_file_bytes`] (from memory)
//! share one path through [`parse`], which enforces every rule a reader later relies on — header
//! length bounded and inside the file, valid UTF-8 JSON object, no duplicate names, known dtypes,
//! shape dimensions that are non-negative integers whose product does not overflow, byte length
//! equal to dtype × shape, offsets that tile the data section exactly (in bounds, no overlap, no
//! gap) — so that nothing downstream needs to check again. [`encode`] writes the header of an
//! output shard. None of them reads or writes tensor data.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;

use super::Dtype;
use crate::error::{Error, Result};

/// The largest header accepted, as in the safetensors crate.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Output shards pad their header so tensor data starts on this boundary, which lets the writer
/// use direct I/O and lets loaders map tensors at aligned addresses.
pub const DATA_ALIGN: u64 = 4096;

/// One tensor's entry in a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte range within the data section, `[start, end)`.
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }
}

/// A validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// `N`, the JSON length (padding included).
    pub header_len: u64,
    /// Length of the data section.
    pub data_len: u64,
    /// `__metadata__`, in file order.
    pub metadata: Vec<(String, String)>,
    /// Tensors ordered by their position in the data section.
    pub tensors: Vec<TensorInfo>,
    /// blake3 of the header JSON, identifying the file's layout.
    pub digest: [u8; 32],
}

impl Header {
    /// File offset of the data section.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    /// File length the header implies.
    pub fn file_len(&self) -> u64 {
        self.data_start() + self.data_len
    }
}

/// Reads and validates the header of `file` (whose length is `file_len`), naming `path` in errors.
pub fn read(path: &Path, file: &File, file_len: u64) -> Result<Header> {
    read_with(path, file_len, |buf, at| file.read_exact_at(buf, at))
}

/// Validates a whole safetensors file held in memory, naming `path` in errors. The same checks
/// as [`read`], through the same code; for callers (and fuzzing) that have the bytes already.
pub fn parse_file_bytes(path: &Path, bytes: &[u8]) -> Result<Header> {
    read_with(path, bytes.len() as u64, |buf, at| {
        let src = usize::try_from(at)
            .ok()
            .and_then(|at| bytes.get(at..)?.get(..buf.len()))
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    })
}

/// [`read`] over any source: `read_at(buf, offset)` fills `buf` from the file at `offset`.
fn read_with(
    path: &Path,
    file_len: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
) -> Result<Header> {
    if file_len < 8 {
        return Err(Error::format(
            path,
            None,
            format!(
                "file is {file_len} bytes long, too short to be safetensors (needs at least 8)"
            ),
        ));
    }
    let mut len_bytes = [0u8; 8];
    read_at(&mut len_bytes, 0).map_err(|e| Error::io(path, "reading header length", e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::format(
            path,
            None,
            format!("header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes"),
        ));
    }
    if header_len > file_len - 8 {
        return Err(Error::format(
            path,
            None,
            format!("header length {header_len} runs past the end of the file ({file_len} bytes)"),
        ));
    }
    let mut json = vec![0u8; header_len as usize];
    read_at(&mut json, 8).map_err(|e| Error::io(path, "reading header", e))?;
    parse(path, &json, file_len - 8 - header_len)
}

/// Validates the JSON header `json` of a file whose data section is `data_len` bytes long.
pub fn parse(path: &Path, json: &[u8], data_len: u64) -> Result<Header> {
    let bad = |tensor: Option<&str>, reason: String| Error::format(path, tensor, reason);
    let text = std::str::from_utf8(json).map_err(|e| {
        bad(
            None,
            format!("header is not valid UTF-8 (at byte {})", e.valid_up_to()),
        )
    })?;
    if !text.starts_with('{') {
        return Err(bad(None, "header is not a JSON object".into()));
    }
    let entries: Entries = serde_json::from_str(text)
        .map_err(|e| bad(None, format!("header is not valid JSON: {e}")))?;

    let mut seen = HashSet::new();
    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(bad(Some(&name), "appears twice in the header".into()));
        }
        let Field::Object(fields) = value else {
            return Err(bad(Some(&name), "entry is not a JSON object".into()));
        };
        if name == "__metadata__" {
            for (key, value) in fields.0 {
                match value {
                    Field::Value(Value::String(s)) => metadata.push((key, s)),
                    _ => {
                        return Err(bad(
                            None,
                            format!("__metadata__ value of '{key}' is not a string"),
                        ))
                    }
                }
            }
            continue;
        }
        tensors.push(parse_tensor(&name, fields).map_err(|reason| bad(Some(&name), reason))?);
    }

    tensors.sort_by_key(|t| (t.start, t.end));
    let mut at = 0u64;
    for t in &tensors {
        if t.start < at {
            return Err(bad(
                Some(&t.name),
                format!(
                    "data_offsets [{}, {}] overlap the previous tensor (which ends at {at})",
                    t.start, t.end
                ),
            ));
        }
        if t.start > at {
            return Err(bad(
                Some(&t.name),
                format!(
                    "data_offsets [{}, {}] leave a gap of {} bytes after the previous tensor",
                    t.start,
                    t.end,
                    t.start - at
                ),
            ));
        }
        at = t.end;
    }
    if at != data_len {
        let last = tensors.last().map(|t| t.name.as_str());
        let reason = if at > data_len {
            format!("data_offsets end at {at}, past the end of the data section ({data_len} bytes; file truncated?)")
        } else {
            format!("tensors cover {at} bytes but the data section is {data_len} bytes (trailing bytes not indexed)")
        };
        return Err(bad(last, reason));
    }
    Ok(Header {
        header_len: json.len() as u64,
        data_len,
        metadata,
        tensors,
        digest: *blake3::hash(json).as_bytes(),
    })
}

fn parse_tensor(name: &str, fields: Entries) -> std::result::Result<TensorInfo, String> {
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    for (key, value) in fields.0 {
        let value = match value {
            Field::Value(v) => v,
            Field::Object(_) => return Err(format!("field '{key}' must not be an object")),
        };
        match key.as_str() {
            "dtype" => dtype = Some(value),
            "shape" => shape = Some(value),
            "data_offsets" => offsets = Some(value),
            _ => return Err(format!("unknown field '{key}'")),
        }
    }
    let dtype = match dtype.ok_or("missing field 'dtype'")? {
        Value::String(s) => Dtype::parse(&s).ok_or_else(|| format!("unknown dtype '{s}'"))?,
        other => return Err(format!("dtype {other} is not a string")),
    };
    let Value::Array(dims) = shape.ok_or("missing field 'shape'")? else {
        return Err("shape is not an array".into());
    };
    let mut shape = Vec::with_capacity(dims.len());
    let mut numel: u64 = 1;
    for d in &dims {
        let d = d
            .as_u64()
            .ok_or_else(|| format!("shape dimension {d} is not a non-negative integer"))?;
        numel = numel.checked_mul(d).ok_or_else(|| {
            format!(
                "shape {} has more elements than fit in 64 bits",
                json_list(&dims)
            )
        })?;
        shape.push(d);
    }
    let nbytes = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| format!("shape {shape:?} of {dtype} is larger than 2^64 bytes"))?;
    let Value::Array(offsets) = offsets.ok_or("missing field 'data_offsets'")? else {
        return Err("data_offsets is not an array".into());
    };
    let offsets: Vec<u64> = offsets
        .iter()
        .map(|o| o.as_u64())
        .collect::<Option<_>>()
        .filter(|o: &Vec<u64>| o.len() == 2)
        .ok_or_else(|| {
            format!(
                "data_offsets {} is not two non-negative integers",
                json_list(&offsets)
            )
        })?;
    let (start, end) = (offsets[0], offsets[1]);
    if end < start {
        return Err(format!(
            "data_offsets [{start}, {end}] end before they start"
        ));
    }
    if end - start != nbytes {
        return Err(format!(
            "data_offsets [{start}, {end}] span {} bytes but {dtype} {shape:?} needs {nbytes}",
            end - start
        ));
    }
    Ok(TensorInfo {
        name: name.to_owned(),
        dtype,
        shape,
        start,
        end,
    })
}

/// Encodes a header for `tensors` (already laid out back to back from offset 0) with
/// `metadata`, returning the whole file prefix: length, JSON, and space padding so that the data
/// section starts at a multiple of [`DATA_ALIGN`]. Metadata comes first, then tensors in the
/// order given, so the bytes are fully determined by the arguments.
pub fn encode(metadata: &[(String, String)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut json = String::from("{");
    if !metadata.is_empty() {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in metadata.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&json_string(k));
            json.push(':');
            json.push_str(&json_string(v));
        }
        json.push('}');
    }
    for (i, t) in tensors.iter().enumerate() {
        if i > 0 || !metadata.is_empty() {
            json.push(',');
        }
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        json.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_string(&t.name),
            t.dtype.name(),
            shape.join(","),
            t.start,
            t.end
        ));
    }
    json.push('}');
    let unpadded = 8 + json.len() as u64;
    let padded = unpadded.div_ceil(DATA_ALIGN) * DATA_ALIGN;
    let header_len = padded - 8;
    let mut out = Vec::with_capacity(padded as usize);
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(padded as usize, b' ');
    out
}

/// `values` as the header wrote them, `[1, -2, 3.5]`, for messages.
fn json_list(values: &[Value]) -> String {
    let items: Vec<String> = values.iter().map(Value::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("serializing a string cannot fail")
}

/// A JSON object's entries in file order, duplicates kept (so they can be reported), with
/// nested objects kept as [`Entries`] too.
struct Entries(Vec<(String, Field)>);

enum Field {
    Object(Entries),
    Value(Value),
}

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(EntriesVisitor)
    }
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            entries.push((key, map.next_value::<Field>()?));
        }
        Ok(Entries(entries))
    }
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        // Objects become `Entries` (keeping duplicates visible); everything else a `Value`.
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<Field, A::Error> {
                EntriesVisitor.visit_map(map).map(Field::Object)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> std::result::Result<Field, A::Error> {
                Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(Field::Value)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Field, E> {
                Ok(Field::Value(Value::String(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> std::result::Result<Field, E> {
                Ok(Field::Value(Value::String(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Field, E> {
                Ok(Field::Value(Value::from(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Field, E> {
                Ok(Field::Value(Value::from(v)))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Field, E> {
                Ok(Field::Value(
                    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
                ))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Field, E> {
                Ok(Field::Value(Value::Bool(v)))
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Field, E> {
                Ok(Field::Value(Value::Null))
            }
        }
        d.deserialize_any(FieldVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(json: &str, data_len: u64) -> Result<Header> {
        parse(Path::new("x.safetensors"), json.as_bytes(), data_len)
    }

    #[test]
    fn accepts_a_valid_header_with_metadata_and_padding() {
        let h = p(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}   "#,
            12,
        )
        .unwrap();
        assert_eq!(h.metadata, vec![("format".into(), "pt".into())]);
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn rejects_duplicates_gaps_overlaps_and_bad_lengths() {
        let cases = [
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
                "twice",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
                "gap",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,2]}}"#,
                2,
                "needs 3",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
                1,
                "past the end",
            ),
            (
                r#"{"a":{"dtype":"X9","shape":[2],"data_offsets":[0,2]}}"#,
                2,
                "unknown dtype",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}"#,
                2,
                "non-negative",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,2]}}"#,
                2,
                "non-negative",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,2]}}"#,
                2,
                "64 bits",
            ),
            (r#"[1,2]"#, 0, "not a JSON object"),
        ];
        for (json, len, expect) in cases {
            let err = p(json, len).unwrap_err().to_string();
            assert!(err.contains(expect), "{json}: {err}");
        }
    }

    #[test]
    fn encode_round_trips_and_aligns_data() {
        let tensors = vec![
            TensorInfo {
                name: "é".into(),
                dtype: Dtype::BF16,
                shape: vec![2, 3],
                start: 0,
                end: 12,
            },
            TensorInfo {
                name: "s".into(),
                dtype: Dtype::F32,
                shape: vec![],
                start: 12,
                end: 16,
            },
        ];
        let meta = vec![("format".to_string(), "pt".to_string())];
        let bytes = encode(&meta, &tensors);
        assert_eq!(bytes.len() as u64 % DATA_ALIGN, 0);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let h = parse(Path::new("o"), &bytes[8..8 + n as usize], 16).unwrap();
        assert_eq!(h.tensors, tensors);
        assert_eq!(h.metadata, meta);
    }
}
