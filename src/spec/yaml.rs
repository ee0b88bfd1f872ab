//! YAML text → documents of positioned nodes, for the config reader.
//!
//! Built on `saphyr-parser`'s event stream (see [`super`] for why that crate). The tree keeps
//! what validation needs and serde-style loaders drop: the line and column of every node (so an
//! error about `models[1].parameters.weight` can say where it is), whether a scalar was quoted
//! (`0.5` is a number, `"0.5"` is text), and the text range of each document (provenance).
//! A mapping that repeats a key is an error here, whatever the key means; PyYAML (and so
//! mergekit) silently keeps the last one.
//!
//! Deliberately not here: what any key means (that is [`super::config`]); YAML tags (refused,
//! mergekit configs have no use for them); merge keys `<<` (left as an ordinary key, which the
//! config reader then rejects as unknown). Aliases share the anchored node instead of copying
//! it, so a "billion laughs" document costs no more memory than its text.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::error::{Location, SpecError};

/// Deepest nesting of lists and mappings accepted. mergekit configs need 5
/// (`models[i].parameters.weight[j].value[k]`); the limit stops the parser early on
/// pathological input (the scanner is slow on thousands of nested compact sequences).
pub(crate) const MAX_DEPTH: usize = 64;

/// Index of a node in [`Document::nodes`].
pub(crate) type NodeId = usize;

/// One YAML node.
#[derive(Debug)]
pub(crate) struct Node {
    pub kind: Kind,
    /// Where the node starts.
    pub at: Location,
}

#[derive(Debug)]
pub(crate) enum Kind {
    Scalar {
        text: String,
        /// Written without quotes or block indicators: the only scalars that can be numbers,
        /// booleans or null.
        plain: bool,
    },
    Seq(Vec<NodeId>),
    /// Entries in document order; keys are unique scalars.
    Map(Vec<(MapKey, NodeId)>),
}

/// A mapping key (always a scalar; anything else is refused while parsing).
#[derive(Debug)]
pub(crate) struct MapKey {
    pub text: String,
    pub at: Location,
}

/// One document of a YAML stream.
#[derive(Debug)]
pub(crate) struct Document {
    pub nodes: Vec<Node>,
    pub root: NodeId,
    /// Byte range of the document in the stream's text.
    pub text: std::ops::Range<usize>,
}

impl Document {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Whether the document holds nothing (an empty stream, or a stray `---` at the end).
    pub fn is_empty(&self) -> bool {
        matches!(&self.nodes[self.root].kind, Kind::Scalar { text, plain: true } if is_null_text(text))
    }
}

fn location(span: &Span) -> Location {
    Location {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

/// A collection being built.
enum Open {
    Seq {
        id: NodeId,
        items: Vec<NodeId>,
        anchor: usize,
    },
    Map {
        id: NodeId,
        entries: Vec<(MapKey, NodeId)>,
        /// Where each key was first seen (duplicate detection without quadratic cost).
        seen: HashMap<String, Location>,
        /// A key waiting for its value.
        key: Option<MapKey>,
        anchor: usize,
    },
}

/// Parses every document of `text`.
pub(crate) fn parse(text: &str) -> Result<Vec<Document>, SpecError> {
    // Marker indices count characters; documents' ranges are wanted in bytes.
    let byte_of_char: Vec<usize> = text
        .char_indices()
        .map(|(b, _)| b)
        .chain(std::iter::once(text.len()))
        .collect();
    let to_byte = |chars: usize| byte_of_char.get(chars).copied().unwrap_or(text.len());

    let mut docs = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut stack: Vec<Open> = Vec::new();
    // The key path of each open collection, for errors ("models[1].parameters").
    let mut paths: Vec<String> = Vec::new();
    let mut anchors: HashMap<usize, NodeId> = HashMap::new();
    let mut root: Option<NodeId> = None;
    let mut starts: Vec<usize> = Vec::new();

    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| SpecError::Syntax {
            at: Location {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
            message: e.info().to_owned(),
        })?;
        let at = location(&span);
        // A finished node (scalar, alias, or closed collection) to attach to its parent.
        let finished: Option<NodeId> = match event {
            Event::Nothing | Event::StreamStart | Event::StreamEnd => None,
            Event::DocumentStart(_) => {
                nodes = Vec::new();
                anchors.clear();
                root = None;
                starts.push(span.start.index());
                None
            }
            Event::DocumentEnd => {
                let Some(root) = root.take() else {
                    // saphyr emits a root node for every document, even an empty one.
                    return Err(SpecError::Syntax {
                        at,
                        message: "document without content".into(),
                    });
                };
                docs.push(Document {
                    nodes: std::mem::take(&mut nodes),
                    root,
                    text: 0..0,
                });
                None
            }
            Event::Alias(anchor) => match anchors.get(&anchor) {
                Some(&id) => Some(id),
                None => {
                    return Err(SpecError::Syntax {
                        at,
                        message: "alias to an unknown anchor".into(),
                    })
                }
            },
            Event::Scalar(value, style, anchor, tag) => {
                if let Some(tag) = tag {
                    return Err(SpecError::Tag {
                        at,
                        tag: format!("{}{}", tag.handle, tag.suffix),
                    });
                }
                let id = nodes.len();
                nodes.push(Node {
                    kind: Kind::Scalar {
                        text: value.into_owned(),
                        plain: style == ScalarStyle::Plain,
                    },
                    at,
                });
                if anchor != 0 {
                    anchors.insert(anchor, id);
                }
                Some(id)
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if let Some(tag) = tag {
                    return Err(SpecError::Tag {
                        at,
                        tag: format!("{}{}", tag.handle, tag.suffix),
                    });
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(SpecError::TooDeep {
                        at,
                        limit: MAX_DEPTH,
                    });
                }
                let id = nodes.len();
                let is_seq = matches!(event, Event::SequenceStart(..));
                paths.push(child_path(paths.last().map(String::as_str), stack.last()));
                nodes.push(Node {
                    kind: if is_seq {
                        Kind::Seq(Vec::new())
                    } else {
                        Kind::Map(Vec::new())
                    },
                    at,
                });
                stack.push(if is_seq {
                    Open::Seq {
                        id,
                        items: Vec::new(),
                        anchor,
                    }
                } else {
                    Open::Map {
                        id,
                        entries: Vec::new(),
                        seen: HashMap::new(),
                        key: None,
                        anchor,
                    }
                });
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match (stack.pop(), paths.pop()) {
                (Some(Open::Seq { id, items, anchor }), _) => {
                    nodes[id].kind = Kind::Seq(items);
                    if anchor != 0 {
                        anchors.insert(anchor, id);
                    }
                    Some(id)
                }
                (
                    Some(Open::Map {
                        id,
                        entries,
                        anchor,
                        ..
                    }),
                    _,
                ) => {
                    nodes[id].kind = Kind::Map(entries);
                    if anchor != 0 {
                        anchors.insert(anchor, id);
                    }
                    Some(id)
                }
                (None, _) => {
                    return Err(SpecError::Syntax {
                        at,
                        message: "unbalanced end of collection".into(),
                    })
                }
            },
        };
        let Some(id) = finished else { continue };
        match stack.last_mut() {
            None => root = Some(id),
            Some(Open::Seq { items, .. }) => items.push(id),
            Some(Open::Map {
                entries, seen, key, ..
            }) => match key.take() {
                None => {
                    let node = &nodes[id];
                    let path = paths.last().cloned().unwrap_or_default();
                    let Kind::Scalar { text, .. } = &node.kind else {
                        return Err(SpecError::NonStringKey { path, at: node.at });
                    };
                    if let Some(&first) = seen.get(text) {
                        return Err(SpecError::DuplicateKey {
                            path,
                            key: text.clone(),
                            at: node.at,
                            first,
                        });
                    }
                    seen.insert(text.clone(), node.at);
                    *key = Some(MapKey {
                        text: text.clone(),
                        at: node.at,
                    });
                }
                Some(k) => entries.push((k, id)),
            },
        }
    }
    // Each document's text runs from its start (the first one's from the top of the text, so
    // leading comments stay with it) to the next document's start.
    let mut bounds: Vec<usize> = starts.iter().map(|&s| to_byte(s)).collect();
    if let Some(first) = bounds.first_mut() {
        *first = 0;
    }
    bounds.push(text.len());
    for (doc, pair) in docs.iter_mut().zip(bounds.windows(2)) {
        doc.text = pair[0]..pair[1].max(pair[0]);
    }
    Ok(docs)
}

/// The key path of a collection opening inside `parent` (whose own path is `parent_path`).
fn child_path(parent_path: Option<&str>, parent: Option<&Open>) -> String {
    let base = parent_path.unwrap_or("");
    match parent {
        None => String::new(),
        Some(Open::Seq { items, .. }) => format!("{base}[{}]", items.len()),
        Some(Open::Map { key, .. }) => {
            let key = key.as_ref().map_or("?", |k| k.text.as_str());
            if base.is_empty() {
                key.to_owned()
            } else {
                format!("{base}.{key}")
            }
        }
    }
}

/// Plain scalars that YAML (1.1 as PyYAML reads it, and 1.2) takes for null.
pub(crate) fn is_null_text(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// The booleans PyYAML (YAML 1.1) reads from plain scalars. YAML 1.2 has only the `true` and
/// `false` spellings; mergekit configs are read by PyYAML, so `yes`/`on`/`off` are booleans too.
pub(crate) fn bool_of(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

/// How a plain scalar reads as a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum NumberText {
    /// A decimal number (integer or float, optional exponent), or `.inf`/`.nan`: the value is
    /// the text rounded once to f64 (as Python's `float()` rounds it) and, separately, once to f32.
    Number { f64: f64, f32: f32, integer: bool },
    /// Written in a form on which YAML 1.1 (PyYAML, mergekit) and YAML 1.2 disagree or which
    /// mergekit configs never need: leading zeros (`010` is octal 8 to PyYAML), `_` separators,
    /// hex/octal/binary prefixes, `1:30` sexagesimal. Refused with a hint.
    Ambiguous,
    /// Not a number at all.
    NotNumber,
}

/// Reads a plain scalar as a number.
pub(crate) fn number_of(text: &str) -> NumberText {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let negative = text.starts_with('-');
    match unsigned {
        ".inf" | ".Inf" | ".INF" => {
            let v = if negative {
                f64::NEG_INFINITY
            } else {
                f64::INFINITY
            };
            return NumberText::Number {
                f64: v,
                f32: v as f32,
                integer: false,
            };
        }
        ".nan" | ".NaN" | ".NAN" if unsigned.len() == text.len() => {
            return NumberText::Number {
                f64: f64::NAN,
                f32: f32::NAN,
                integer: false,
            };
        }
        _ => {}
    }
    let bytes = unsigned.as_bytes();
    let mut i = 0;
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    let mut dot = false;
    if i < bytes.len() && bytes[i] == b'.' {
        dot = true;
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
            frac_digits += 1;
        }
    }
    let mut exponent = false;
    if int_digits + frac_digits > 0 && i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
            j += 1;
        }
        let digits = j;
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        if j > digits {
            exponent = true;
            i = j;
        }
    }
    let well_formed = i == bytes.len() && int_digits + frac_digits > 0;
    if !well_formed {
        let looks_numeric = !unsigned.is_empty()
            && unsigned.as_bytes()[0].is_ascii_digit()
            && unsigned
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '+' | '-'));
        return if looks_numeric
            && (unsigned.contains(['_', ':'])
                || unsigned.starts_with("0x")
                || unsigned.starts_with("0o")
                || unsigned.starts_with("0b"))
        {
            NumberText::Ambiguous
        } else {
            NumberText::NotNumber
        };
    }
    let integer = !dot && !exponent;
    if integer && int_digits > 1 && bytes[0] == b'0' {
        return NumberText::Ambiguous;
    }
    match (text.parse::<f64>(), text.parse::<f32>()) {
        // PyYAML reads `-0` as the integer 0, which becomes +0.0 (`-0.0` stays -0.0).
        (Ok(f64), Ok(f32)) if integer && f64 == 0.0 => NumberText::Number {
            f64: 0.0,
            f32,
            integer,
        },
        (Ok(f64), Ok(f32)) => NumberText::Number { f64, f32, integer },
        _ => NumberText::NotNumber,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_kind(text: &str) -> String {
        let docs = parse(text).unwrap();
        format!("{:?}", docs[0].node(docs[0].root).kind)
    }

    #[test]
    fn numbers_read_as_python_reads_them() {
        let n = |t: &str| match number_of(t) {
            NumberText::Number { f64, .. } => Some(f64),
            _ => None,
        };
        assert_eq!(n("0.5"), Some(0.5));
        assert_eq!(n("1"), Some(1.0));
        assert_eq!(n("-2"), Some(-2.0));
        assert_eq!(n("+3.25"), Some(3.25));
        assert_eq!(n("1e-3"), Some(0.001));
        assert_eq!(n("1.0E+2"), Some(100.0));
        assert_eq!(n(".5"), Some(0.5));
        assert_eq!(n("1."), Some(1.0));
        assert_eq!(n("0"), Some(0.0));
        assert_eq!(n("0.0"), Some(0.0));
        assert_eq!(n("-.inf"), Some(f64::NEG_INFINITY));
        assert!(n(".nan").is_some_and(f64::is_nan));
        // Python: float(int("-0")) is +0.0, float("-0.0") is -0.0.
        assert_eq!(n("-0").map(f64::to_bits), Some(0.0f64.to_bits()));
        assert_eq!(n("-0.0").map(f64::to_bits), Some((-0.0f64).to_bits()));
        // Integers beyond 2^53 round to even, as Python's float(int) does.
        assert_eq!(n("9007199254740993"), Some(9007199254740992.0));
        // f64 of the text, not of some f32: 0.1 is 0.1000000000000000055…
        assert_eq!(n("0.1").map(f64::to_bits), Some(0.1f64.to_bits()));
        for text in [
            "abc", "", ".", "e5", "1e", "1.2.3", "0.5x", "- 1", "true", "inf", "nan",
        ] {
            assert_eq!(number_of(text), NumberText::NotNumber, "{text}");
        }
        for text in ["010", "1_000", "0x10", "0o7", "1:30"] {
            assert_eq!(number_of(text), NumberText::Ambiguous, "{text}");
        }
    }

    #[test]
    fn f32_is_rounded_from_the_text_once() {
        // 1.00000005960464477539062500001 lies just above the midpoint between 1.0f32 and its
        // successor; rounding through f64 first lands on the midpoint and then on 1.0f32.
        let text = "1.00000005960464477539062500001";
        let NumberText::Number { f64, f32, .. } = number_of(text) else {
            panic!("not a number")
        };
        assert_eq!(f32, 1.000_000_1_f32);
        assert_eq!(f64 as f32, 1.0_f32);
    }

    #[test]
    fn booleans_and_nulls() {
        assert_eq!(bool_of("yes"), Some(true));
        assert_eq!(bool_of("Off"), Some(false));
        assert_eq!(bool_of("y"), None);
        assert!(is_null_text("~"));
        assert!(!is_null_text("none"));
    }

    #[test]
    fn positions_are_one_based() {
        let docs = parse("a: 1\nbb:\n  - x\n").unwrap();
        let doc = &docs[0];
        let Kind::Map(entries) = &doc.node(doc.root).kind else {
            panic!()
        };
        assert_eq!(entries[1].0.at, Location { line: 2, column: 1 });
        let Kind::Seq(items) = &doc.node(entries[1].1).kind else {
            panic!()
        };
        assert_eq!(doc.node(items[0]).at, Location { line: 3, column: 5 });
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert!(
            matches!(&err, SpecError::DuplicateKey { path, key, at, first }
                if path.is_empty() && key == "a" && at.line == 3 && first.line == 1),
            "{err:?}"
        );
        // Also in flow mappings and nested ones, with the path of the mapping.
        let err = parse("x: {k: 1, k: 2}").unwrap_err();
        assert!(
            matches!(&err, SpecError::DuplicateKey { path, .. } if path == "x"),
            "{err:?}"
        );
        let err = parse("models:\n  - model: a\n  - model: b\n    parameters: {w: 1, w: 2}\n")
            .unwrap_err();
        assert!(
            matches!(&err, SpecError::DuplicateKey { path, .. } if path == "models[1].parameters"),
            "{err:?}"
        );
        // Quoting does not make a different key.
        assert!(matches!(
            parse("k: 1\n\"k\": 2\n").unwrap_err(),
            SpecError::DuplicateKey { .. }
        ));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let err = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        let SpecError::Syntax { at, .. } = err else {
            panic!("{err:?}")
        };
        assert!(at.line >= 2, "{at:?}");
    }

    #[test]
    fn tags_and_complex_keys_are_refused() {
        assert!(matches!(
            parse("a: !!float 1").unwrap_err(),
            SpecError::Tag { .. }
        ));
        assert!(matches!(
            parse("? [a, b]\n: 1\n").unwrap_err(),
            SpecError::NonStringKey { .. }
        ));
    }

    #[test]
    fn aliases_share_nodes() {
        let docs = parse("a: &w [1, 2]\nb: *w\n").unwrap();
        let doc = &docs[0];
        let Kind::Map(entries) = &doc.node(doc.root).kind else {
            panic!()
        };
        assert_eq!(entries[0].1, entries[1].1);
        assert!(matches!(parse("b: *nope\n"), Err(SpecError::Syntax { .. })));
        // Nested aliases do not multiply nodes.
        let text = "a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: &c [*b, *b, *b, *b]\nd: [*c, *c, *c, *c]\n";
        assert!(parse(text).unwrap()[0].nodes.len() < 30);
    }

    #[test]
    fn deep_nesting_is_an_error_or_a_tree_not_a_crash() {
        for open in ["[", "{a: ", "- "] {
            let text = open.repeat(100_000);
            assert!(parse(&text).is_err(), "{open}");
        }
        let text = (0..2000)
            .map(|i| format!("{}-\n", "  ".repeat(i)))
            .collect::<String>();
        assert!(matches!(parse(&text), Err(SpecError::TooDeep { .. })));
        // 64 levels are fine.
        let text = format!("{}x{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn quoted_scalars_are_not_plain() {
        assert!(root_kind("'0.5'").contains("plain: false"));
        assert!(root_kind("0.5").contains("plain: true"));
    }

    #[test]
    fn documents_and_their_text() {
        let text = "name: a\nx: 1\n---\nname: b\n---\nname: c\n";
        let docs = parse(text).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(&text[docs[0].text.clone()], "name: a\nx: 1\n");
        assert_eq!(&text[docs[1].text.clone()], "---\nname: b\n");
        assert_eq!(&text[docs[2].text.clone()], "---\nname: c\n");
        // Non-ASCII text before a document boundary: ranges are bytes, not characters.
        let text = "a: é\n---\nb: 1\n";
        let docs = parse(text).unwrap();
        assert_eq!(&text[docs[1].text.clone()], "---\nb: 1\n");
        assert!(parse("").unwrap().iter().all(Document::is_empty));
    }
}
