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
use crate::error::{Error, HeaderError, Result};

/// The largest header accepted, as in the safetensors crate.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Output shards pad their header so tensor data starts on this boundary, which lets the writer
/// use direct I/O and lets loaders map tensors at aligned addresses.
pub const DATA_ALIGN: u64 = 4096;

/// One tensor's entry in a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its dimensions (empty for a scalar).
    pub shape: Vec<u64>,
    /// Start of its byte range within the data section, `[start, end)`.
    pub start: u64,
    /// End of its byte range.
    pub end: u64,
}

impl TensorInfo {
    /// Bytes of data (`end - start`, which validation made dtype × shape).
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
        return Err(Error::header(path, HeaderError::TooShort { len: file_len }));
    }
    let mut len_bytes = [0u8; 8];
    read_at(&mut len_bytes, 0).map_err(|e| Error::io(path, "reading header length", e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::header(
            path,
            HeaderError::TooLarge { len: header_len },
        ));
    }
    if header_len > file_len - 8 {
        return Err(Error::header(
            path,
            HeaderError::PastEndOfFile {
                len: header_len,
                file_len,
            },
        ));
    }
    let mut json = vec![0u8; header_len as usize];
    read_at(&mut json, 8).map_err(|e| Error::io(path, "reading header", e))?;
    parse(&json, file_len - 8 - header_len).map_err(|kind| Error::header(path, kind))
}

/// Validates the JSON header `json` of a file whose data section is `data_len` bytes long. The
/// error says what is wrong; the caller knows which file it is ([`read`] attaches the path).
pub fn parse(json: &[u8], data_len: u64) -> std::result::Result<Header, HeaderError> {
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    // JSON allows whitespace before the object, and the reference reads such headers.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(HeaderError::NotObject);
    }
    let entries: Entries =
        serde_json::from_str(text).map_err(|json| HeaderError::NotJson { json })?;

    // Names first: a name given twice is reported as such, whatever its entries hold.
    let mut seen = HashSet::new();
    if let Some((name, _)) = entries
        .0
        .iter()
        .find(|(name, _)| !seen.insert(name.as_str()))
    {
        return Err(HeaderError::DuplicateTensor {
            tensor: name.clone(),
        });
    }
    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if name == "__metadata__" {
            let fields = match value {
                Field::Object(fields) => fields,
                // `null` means no metadata, as the safetensors crate reads it.
                Field::Value(Value::Null) => continue,
                Field::Value(_) => return Err(HeaderError::MetadataNotObject),
            };
            for (key, value) in fields.0 {
                match value {
                    Field::Value(Value::String(s)) => metadata.push((key, s)),
                    _ => return Err(HeaderError::MetadataNotString { key }),
                }
            }
            continue;
        }
        let Field::Object(fields) = value else {
            return Err(HeaderError::EntryNotObject { tensor: name });
        };
        tensors.push(parse_tensor(name, fields)?);
    }

    tensors.sort_by_key(|t| (t.start, t.end));
    let mut at = 0u64;
    for t in &tensors {
        if t.start < at {
            return Err(HeaderError::Overlap {
                tensor: t.name.clone(),
                start: t.start,
                end: t.end,
                previous_end: at,
            });
        }
        if t.start > at {
            return Err(HeaderError::Gap {
                tensor: t.name.clone(),
                start: t.start,
                end: t.end,
                previous_end: at,
            });
        }
        at = t.end;
    }
    if at != data_len {
        let tensor = tensors.last().map(|t| t.name.clone());
        return Err(if at > data_len {
            HeaderError::PastEndOfData {
                tensor,
                end: at,
                data_len,
            }
        } else {
            HeaderError::TrailingBytes {
                tensor,
                covered: at,
                data_len,
            }
        });
    }
    Ok(Header {
        header_len: json.len() as u64,
        data_len,
        metadata,
        tensors,
        digest: *blake3::hash(json).as_bytes(),
    })
}

/// One tensor's entry. Keys other than the three the format defines are ignored, as the
/// safetensors crate ignores them; each of the three must appear once.
fn parse_tensor(name: String, fields: Entries) -> std::result::Result<TensorInfo, HeaderError> {
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    for (key, value) in fields.0 {
        let (slot, field) = match key.as_str() {
            "dtype" => (&mut dtype, "dtype"),
            "shape" => (&mut shape, "shape"),
            "data_offsets" => (&mut offsets, "data_offsets"),
            _ => continue,
        };
        if slot.replace(value.into_value()).is_some() {
            return Err(HeaderError::DuplicateField {
                tensor: name,
                field,
            });
        }
    }
    let missing = |field| HeaderError::MissingField {
        tensor: name.clone(),
        field,
    };
    let dtype = match dtype.ok_or_else(|| missing("dtype"))? {
        Value::String(s) => match Dtype::parse(&s) {
            Some(d) => d,
            None if SUB_BYTE_DTYPES.contains(&s.as_str()) => {
                return Err(HeaderError::UnsupportedDtype {
                    tensor: name,
                    dtype: s,
                })
            }
            None => {
                return Err(HeaderError::UnknownDtype {
                    tensor: name,
                    dtype: s,
                })
            }
        },
        other => {
            return Err(HeaderError::DtypeNotString {
                tensor: name,
                value: other.to_string(),
            })
        }
    };
    let Value::Array(dims) = shape.ok_or_else(|| missing("shape"))? else {
        return Err(HeaderError::ShapeNotArray { tensor: name });
    };
    let offsets = offsets.ok_or_else(|| missing("data_offsets"))?;
    let mut shape = Vec::with_capacity(dims.len());
    let mut numel: u64 = 1;
    for d in &dims {
        let Some(d) = d.as_u64() else {
            return Err(HeaderError::BadDimension {
                tensor: name,
                value: d.to_string(),
            });
        };
        let Some(n) = numel.checked_mul(d) else {
            return Err(HeaderError::TooManyElements {
                tensor: name,
                shape: json_list(&dims),
            });
        };
        numel = n;
        shape.push(d);
    }
    let Some(nbytes) = numel.checked_mul(dtype.size() as u64) else {
        return Err(HeaderError::TooManyBytes {
            tensor: name,
            dtype,
            shape,
        });
    };
    let pair = match &offsets {
        Value::Array(items) if items.len() == 2 => items[0].as_u64().zip(items[1].as_u64()),
        _ => None,
    };
    let Some((start, end)) = pair else {
        let value = match &offsets {
            Value::Array(items) => json_list(items),
            other => other.to_string(),
        };
        return Err(HeaderError::OffsetsNotPair {
            tensor: name,
            value,
        });
    };
    if end < start {
        return Err(HeaderError::OffsetsReversed {
            tensor: name,
            start,
            end,
        });
    }
    if end - start != nbytes {
        return Err(HeaderError::WrongLength {
            tensor: name,
            start,
            end,
            dtype,
            shape,
            needed: nbytes,
        });
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

/// Dtypes of the format whose elements take less than a byte; refused with their own message.
const SUB_BYTE_DTYPES: [&str; 3] = ["F4", "F6_E2M3", "F6_E3M2"];

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

impl Field {
    /// The field as a plain JSON value (an object's duplicate keys collapse).
    fn into_value(self) -> Value {
        match self {
            Field::Value(v) => v,
            Field::Object(entries) => Value::Object(
                entries
                    .0
                    .into_iter()
                    .map(|(k, f)| (k, f.into_value()))
                    .collect(),
            ),
        }
    }
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

    fn p(json: &str, data_len: u64) -> std::result::Result<Header, HeaderError> {
        parse(json.as_bytes(), data_len)
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

    /// What the Python `safetensors` package (and the Rust crate it is built on) loads.
    #[test]
    fn accepts_what_the_reference_accepts() {
        // `__metadata__: null` is no metadata.
        let h = p(
            r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        )
        .unwrap();
        assert!(h.metadata.is_empty());
        // Unknown keys inside a tensor's entry, of any JSON type, are ignored.
        let h = p(
            r#"{"a":{"dtype":"U8","note":{"x":[1]},"shape":[1],"data_offsets":[0,1],"n":null}}"#,
            1,
        )
        .unwrap();
        assert_eq!((h.tensors[0].dtype, h.tensors[0].nbytes()), (Dtype::U8, 1));
        // Whitespace before the object.
        assert!(p("\n\t {}", 0).is_ok());
        // Byte-sized dtypes the format added: parsed (then refused as unmergeable by a plan).
        let h = p(
            r#"{"c":{"dtype":"C64","shape":[1],"data_offsets":[0,8]},"f":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[8,10]}}"#,
            10,
        )
        .unwrap();
        assert_eq!(h.tensors[0].dtype, Dtype::C64);
    }

    #[test]
    fn rejects_each_kind_of_broken_header() {
        use HeaderError as H;
        let one = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        type Expect = fn(&HeaderError) -> bool;
        let cases: Vec<(String, u64, Expect)> = vec![
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#.into(),
                2,
                |e| matches!(e, H::DuplicateTensor { tensor } if tensor == "a"),
            ),
            // A name given twice is the problem reported, even when its first entry is broken.
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#.into(),
                1,
                |e| matches!(e, H::DuplicateTensor { tensor } if tensor == "a"),
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#.into(),
                2,
                |e| matches!(e, H::Gap { start: 1, end: 2, previous_end: 0, .. }),
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#.into(),
                2,
                |e| matches!(e, H::Overlap { tensor, previous_end: 2, .. } if tensor == "b"),
            ),
            (
                one.replace("[1]", "[3]"),
                1,
                |e| matches!(e, H::WrongLength { needed: 3, start: 0, end: 1, .. }),
            ),
            (one.into(), 0, |e| {
                matches!(e, H::PastEndOfData { end: 1, data_len: 0, .. })
            }),
            (one.into(), 3, |e| {
                matches!(e, H::TrailingBytes { covered: 1, data_len: 3, .. })
            }),
            (one.replace("U8", "X9"), 1, |e| {
                matches!(e, H::UnknownDtype { dtype, .. } if dtype == "X9")
            }),
            (one.replace("U8", "F4"), 1, |e| {
                matches!(e, H::UnsupportedDtype { dtype, .. } if dtype == "F4")
            }),
            (one.replace("\"U8\"", "8"), 1, |e| {
                matches!(e, H::DtypeNotString { value, .. } if value == "8")
            }),
            (one.replace("[1]", "[-2]"), 1, |e| {
                matches!(e, H::BadDimension { value, .. } if value == "-2")
            }),
            (one.replace("[1]", "[1.5]"), 1, |e| {
                matches!(e, H::BadDimension { value, .. } if value == "1.5")
            }),
            (one.replace("[1]", "[4294967296,4294967296]"), 1, |e| {
                matches!(e, H::TooManyElements { .. })
            }),
            (one.replace("[1]", "[4294967296,4294967295]").replace("U8", "I64"), 1, |e| {
                matches!(e, H::TooManyBytes { dtype: Dtype::I64, .. })
            }),
            (one.replace("[0,1]", "[1,0]"), 1, |e| {
                matches!(e, H::OffsetsReversed { start: 1, end: 0, .. })
            }),
            (one.replace("[0,1]", "[0,1,2]"), 1, |e| {
                matches!(e, H::OffsetsNotPair { value, .. } if value == "[0, 1, 2]")
            }),
            (one.replace("[0,1]", "{\"a\":1}"), 1, |e| {
                matches!(e, H::OffsetsNotPair { .. })
            }),
            (one.replace("\"shape\":[1]", "\"shape\":1"), 1, |e| {
                matches!(e, H::ShapeNotArray { .. })
            }),
            (one.replace("\"dtype\":\"U8\",", ""), 1, |e| {
                matches!(e, H::MissingField { field: "dtype", .. })
            }),
            (one.replace("\"shape\"", "\"shape\":[1],\"shape\""), 1, |e| {
                matches!(e, H::DuplicateField { field: "shape", .. })
            }),
            ("[1,2]".into(), 0, |e| matches!(e, H::NotObject)),
            ("{\"a\":".into(), 0, |e| matches!(e, H::NotJson { .. })),
            (r#"{"a":3}"#.into(), 0, |e| {
                matches!(e, H::EntryNotObject { tensor } if tensor == "a")
            }),
            (r#"{"__metadata__":[]}"#.into(), 0, |e| {
                matches!(e, H::MetadataNotObject)
            }),
            (r#"{"__metadata__":{"k":1}}"#.into(), 0, |e| {
                matches!(e, H::MetadataNotString { key } if key == "k")
            }),
        ];
        for (json, len, expected) in cases {
            match p(&json, len) {
                Ok(_) => panic!("{json} parses"),
                Err(e) => assert!(expected(&e), "{json}: {e:?}"),
            }
        }
        assert!(matches!(
            parse(b"{\"a\xff\":1}", 0),
            Err(H::NotUtf8 { valid_up_to: 3 })
        ));
    }

    #[test]
    fn read_checks_the_length_prefix() {
        let path = Path::new("f");
        let err = |bytes: &[u8]| match parse_file_bytes(path, bytes) {
            Err(Error::Header { kind, .. }) => kind,
            other => panic!("{other:?}"),
        };
        assert!(matches!(err(b"\x05\0\0"), HeaderError::TooShort { len: 3 }));
        let mut huge = 200_000_000u64.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            err(&huge),
            HeaderError::TooLarge { len: 200_000_000 }
        ));
        let mut past = 10u64.to_le_bytes().to_vec();
        past.extend_from_slice(b"{}");
        assert!(matches!(
            err(&past),
            HeaderError::PastEndOfFile {
                len: 10,
                file_len: 10
            }
        ));
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
        let h = parse(&bytes[8..8 + n as usize], 16).unwrap();
        assert_eq!(h.tensors, tensors);
        assert_eq!(h.metadata, meta);
    }
}
