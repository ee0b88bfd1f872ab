//! Merge methods: what each output tensor is made of, decided per tensor from the input models'
//! headers.
//!
//! A [`Recipe`] names a method and the models it reads (by index into the run's list of models,
//! in the method's own order of roles). [`Recipe::plan_tensors`] matches the models tensor by
//! tensor and turns each output tensor into [`Segment`]s: ranges of elements, each an [`Op`]
//! over [`Input`]s. The plan lays those tensors out in shards; the pipeline reads the inputs and
//! runs the ops; neither knows which method asked for them. Every mismatch between the models is
//! collected and reported at once. Nothing here reads tensor data.

use crate::error::{Error, Mismatch, Result};
use crate::format::Dtype;
use crate::kernel::FloatDtype;
use crate::model::{Model, TensorLoc};

/// A merge method with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// `aligned + alpha * (aligned - sft)` (ExPO), over the models `[sft, aligned]`.
    Expo { alpha: f32 },
}

impl Method {
    /// The method's name, as recorded in provenance and headers.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Expo { .. } => "expo",
        }
    }

    /// How many models the method reads, and what each is called in messages.
    pub fn roles(&self) -> &'static [&'static str] {
        match self {
            Method::Expo { .. } => &["sft", "aligned"],
        }
    }
}

/// One output of a run: a method over some of the run's models.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub method: Method,
    /// Indices into the run's models, one per role of the method, in the method's order.
    pub models: Vec<usize>,
    /// What to do where the models disagree in ways that can be resolved.
    pub policy: Policy,
}

/// What the user allows where models disagree. Buffers that `transformers` does not save and
/// integer tensors need no permission (see [`is_unsaved_buffer`]); float weights do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// A float tensor only the layout model (aligned, base) has is copied from it
    /// (`--only-in-aligned copy`), instead of being a mismatch.
    pub copy_only_in_layout: bool,
    /// Tensors whose shapes differ only in the first dimension (vocabularies of 32000 and 32002
    /// rows) merge the rows all models have and copy the layout model's extra rows
    /// (`--vocab-mismatch copy-aligned`), instead of being a mismatch.
    pub copy_extra_rows: bool,
}

/// Whether `name` is a buffer `transformers` registers as non-persistent (so checkpoints saved by
/// one version have it and by another do not): rotary `inv_freq`, `position_ids`,
/// `token_type_ids`, GPT-2/GPT-NeoX/GPT-J causal masks (`attn.bias`, `attention.bias`,
/// `masked_bias`). Such a tensor is never merged: it is copied from the layout model when that
/// has it, and left out when only another model has it.
pub fn is_unsaved_buffer(name: &str) -> bool {
    let mut parts = name.rsplit('.');
    let last = parts.next().unwrap_or("");
    let parent = parts.next().unwrap_or("");
    matches!(
        last,
        "inv_freq" | "original_inv_freq" | "position_ids" | "token_type_ids" | "masked_bias"
    ) || (last == "bias" && matches!(parent, "attn" | "attention"))
}

/// Something the plan resolved without failing, reported by `plan`, the run summary and
/// provenance.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    pub tensor: String,
    pub note: String,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor '{}': {}", self.tensor, self.note)
    }
}

/// An input tensor an [`Op`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// Index into the run's models.
    pub model: usize,
    pub loc: TensorLoc,
    pub dtype: Dtype,
    /// The input element that lines up with the segment's first element.
    pub first: u64,
}

/// What is computed for a range of elements. Ops are data: the pipeline hands them to the
/// kernel without knowing which method made them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// The bytes of the one input, unchanged (integer buffers, rows only one model has).
    Copy,
    /// ExPO over the inputs `[aligned, sft]`, each widened exactly to f32; the output has the
    /// aligned input's type.
    Expo {
        alpha: f32,
        aligned: FloatDtype,
        sft: FloatDtype,
    },
}

/// A range of an output tensor's elements and how to compute it.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Elements `[start, end)` of the output tensor.
    pub elems: std::ops::Range<u64>,
    pub op: Op,
    pub inputs: Vec<Input>,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub nbytes: u64,
    /// Segments covering `[0, numel)` in order, without gaps.
    pub segments: Vec<Segment>,
}

impl PlannedTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.nbytes / self.dtype.size() as u64
    }
}

impl Recipe {
    /// The model whose tensor order, dtypes and non-weight files the output takes.
    pub fn layout_model(&self) -> usize {
        match self.method {
            Method::Expo { .. } => self.models[1],
        }
    }

    /// Header metadata of every output shard (after `"format": "pt"` and the tool's name),
    /// given each model's `(file name, size)` list as JSON text.
    pub fn metadata(&self, models: &[Model]) -> Vec<(String, String)> {
        let mut metadata = vec![("mergestream.method".to_string(), self.method.name().into())];
        match &self.method {
            Method::Expo { alpha } => {
                metadata.push(("mergestream.alpha".into(), format!("{alpha}")));
            }
        }
        for (role, &m) in self.method.roles().iter().zip(&self.models) {
            let files = serde_json::to_string(&file_list(&models[m]))
                .expect("serializing JSON cannot fail");
            metadata.push((format!("mergestream.{role}"), files));
        }
        metadata
    }

    /// The method's part of `mergestream.json`: method, formula, parameters and inputs.
    pub fn provenance(&self, models: &[Model]) -> serde_json::Map<String, serde_json::Value> {
        let mut p = serde_json::Map::new();
        p.insert("method".into(), self.method.name().into());
        match &self.method {
            Method::Expo { alpha } => {
                p.insert(
                    "formula".into(),
                    "aligned + alpha * (aligned - sft), computed in f32 without fusion, rounded to nearest even".into(),
                );
                p.insert("alpha".into(), json_number(&format!("{alpha}")));
            }
        }
        let mut inputs = serde_json::Map::new();
        for (role, &m) in self.method.roles().iter().zip(&self.models) {
            inputs.insert(
                (*role).into(),
                serde_json::json!({ "files": file_list(&models[m]) }),
            );
        }
        p.insert("inputs".into(), inputs.into());
        p.insert(
            "policy".into(),
            serde_json::json!({
                "only_in_layout_model": if self.policy.copy_only_in_layout { "copy" } else { "refuse" },
                "vocab_mismatch": if self.policy.copy_extra_rows { "copy-extra-rows" } else { "refuse" },
            }),
        );
        p
    }

    /// Every output tensor, in the layout model's storage order, with notes on what was
    /// resolved; all mismatches at once.
    pub fn plan_tensors(&self, models: &[Model]) -> Result<(Vec<PlannedTensor>, Vec<Note>)> {
        match self.method {
            Method::Expo { alpha } => {
                if !alpha.is_finite() {
                    return Err(Error::Usage(format!(
                        "alpha {alpha} is not a finite number"
                    )));
                }
                let (sft, aligned) = (self.models[0], self.models[1]);
                plan_expo(alpha, sft, aligned, models, self.policy)
            }
        }
    }
}

/// `(file name, size)` of every file of a model, as provenance records it.
fn file_list(model: &Model) -> Vec<serde_json::Value> {
    model
        .file_list()
        .into_iter()
        .map(|(name, size)| serde_json::json!({"name": name, "size": size}))
        .collect()
}

/// A number as JSON, spelled as `text` spells it where JSON can hold it.
fn json_number(text: &str) -> serde_json::Value {
    text.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn plan_expo(
    alpha: f32,
    sft_index: usize,
    aligned_index: usize,
    models: &[Model],
    policy: Policy,
) -> Result<(Vec<PlannedTensor>, Vec<Note>)> {
    let (sft, aligned) = (&models[sft_index], &models[aligned_index]);
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut tensors = Vec::with_capacity(aligned.tensor_count());
    let mut mismatch = |tensor: &str, problem: String| {
        problems.push(Mismatch {
            tensor: tensor.to_owned(),
            problem,
        })
    };
    for (loc, t) in aligned.tensors() {
        let numel = t.nbytes() / t.dtype.size() as u64;
        let aligned_input = Input {
            model: aligned_index,
            loc,
            dtype: t.dtype,
            first: 0,
        };
        let copy = |note: Option<String>, notes: &mut Vec<Note>| {
            if let Some(note) = note {
                notes.push(Note {
                    tensor: t.name.clone(),
                    note,
                });
            }
            PlannedTensor {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                nbytes: t.nbytes(),
                segments: vec![Segment {
                    elems: 0..numel,
                    op: Op::Copy,
                    inputs: vec![aligned_input],
                }],
            }
        };
        let unsaved = is_unsaved_buffer(&t.name);
        let Some((sft_loc, s)) = sft.get(&t.name) else {
            if unsaved || t.dtype.is_integer() {
                let kind = if unsaved {
                    "a buffer transformers does not save"
                } else {
                    "an integer tensor"
                };
                tensors.push(copy(
                    Some(format!("only in --aligned ({kind}): copied from it")),
                    &mut notes,
                ));
            } else if t.dtype.mergeable().is_some() && policy.copy_only_in_layout {
                tensors.push(copy(
                    Some("only in --aligned: copied from it (--only-in-aligned copy)".into()),
                    &mut notes,
                ));
            } else {
                let hint = if t.dtype.mergeable().is_some() {
                    " (pass --only-in-aligned copy to copy it from --aligned)"
                } else {
                    ""
                };
                mismatch(&t.name, format!("missing from the SFT model (--sft){hint}"));
            }
            continue;
        };
        if unsaved {
            // Never merged, whatever the other model holds.
            tensors.push(copy(None, &mut notes));
            continue;
        }
        let both_float = t.dtype.mergeable().is_some() && s.dtype.mergeable().is_some();
        if s.dtype != t.dtype && !both_float {
            mismatch(
                &t.name,
                format!("dtype {} in --aligned but {} in --sft", t.dtype, s.dtype),
            );
            continue;
        }
        if t.dtype.is_integer() {
            tensors.push(copy(None, &mut notes));
            continue;
        }
        let (Some(a_dtype), Some(s_dtype)) = (t.dtype.mergeable(), s.dtype.mergeable()) else {
            mismatch(
                &t.name,
                format!(
                    "dtype {} cannot be merged (BF16, F16 and F32 are merged; integer tensors are copied)",
                    t.dtype
                ),
            );
            continue;
        };
        let op = Op::Expo {
            alpha,
            aligned: a_dtype,
            sft: s_dtype,
        };
        let sft_input = Input {
            model: sft_index,
            loc: sft_loc,
            dtype: s.dtype,
            first: 0,
        };
        // Rows both models have are merged; the aligned model's extra rows are copied.
        let shared = if s.shape == t.shape {
            numel
        } else if rows_only_differ(&t.shape, &s.shape) && policy.copy_extra_rows {
            let row: u64 = t.shape[1..].iter().product();
            let (a_rows, s_rows) = (t.shape[0], s.shape[0]);
            let merged = a_rows.min(s_rows);
            let extra = if a_rows > s_rows {
                format!(", the {} extra rows copied from --aligned", a_rows - s_rows)
            } else {
                format!(", the {} extra rows of --sft left out", s_rows - a_rows)
            };
            notes.push(Note {
                tensor: t.name.clone(),
                note: format!(
                    "{a_rows} rows in --aligned, {s_rows} in --sft: {merged} rows merged{extra} (--vocab-mismatch copy-aligned)"
                ),
            });
            merged * row
        } else {
            let hint = if rows_only_differ(&t.shape, &s.shape) {
                " (only the first dimension differs: pass --vocab-mismatch copy-aligned to merge the shared rows and copy the aligned model's extra ones)"
            } else {
                ""
            };
            mismatch(
                &t.name,
                format!(
                    "shape {:?} in --aligned but {:?} in --sft{hint}",
                    t.shape, s.shape
                ),
            );
            continue;
        };
        let mut segments = Vec::new();
        if shared > 0 {
            segments.push(Segment {
                elems: 0..shared,
                op,
                inputs: vec![aligned_input, sft_input],
            });
        }
        if shared < numel {
            segments.push(Segment {
                elems: shared..numel,
                op: Op::Copy,
                inputs: vec![Input {
                    first: shared,
                    ..aligned_input
                }],
            });
        }
        if segments.is_empty() {
            // An empty tensor: nothing to read or compute.
            segments.push(Segment {
                elems: 0..0,
                op,
                inputs: vec![aligned_input, sft_input],
            });
        }
        tensors.push(PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            nbytes: t.nbytes(),
            segments,
        });
    }
    for (_, s) in sft.tensors() {
        if aligned.get(&s.name).is_some() {
            continue;
        }
        if is_unsaved_buffer(&s.name) || s.dtype.is_integer() {
            notes.push(Note {
                tensor: s.name.clone(),
                note: "only in --sft: left out".into(),
            });
        } else {
            mismatch(&s.name, "missing from the aligned model (--aligned)".into());
        }
    }
    if problems.is_empty() {
        notes.sort();
        Ok((tensors, notes))
    } else {
        problems.sort();
        Err(Error::Mismatch {
            sft: sft.path.clone(),
            aligned: aligned.path.clone(),
            problems,
        })
    }
}

/// Whether two shapes differ in their first dimension only.
fn rows_only_differ(a: &[u64], b: &[u64]) -> bool {
    !a.is_empty() && a.len() == b.len() && a[0] != b[0] && a[1..] == b[1..]
}
