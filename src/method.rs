//! Merge methods: what each output tensor is made of, decided per tensor from the input models'
//! headers.
//!
//! A [`Recipe`] names a method and the models it reads (by index into the run's list of models,
//! in the method's own order of roles). [`Recipe::plan_tensors`] matches the models tensor by
//! tensor and turns each output tensor into [`Segment`]s: ranges of elements, each an [`Op`]
//! over [`Input`]s. The plan lays those tensors out in shards; the pipeline reads the inputs and
//! runs the ops; neither knows which method asked for them. Every mismatch between the models is
//! collected and reported at once. Nothing here reads tensor data.

use std::sync::Arc;

use crate::error::{
    Disagreement, DisagreementKind, Error, Mismatch, MismatchKind, Result, UsageError,
};
use crate::format::Dtype;
use crate::kernel::FloatDtype;
use crate::kernel::{linear, methods};
use crate::model::{Model, TensorLoc};
use crate::spec;

/// A merge method with its parameters.
#[derive(Debug, Clone)]
pub enum Method {
    /// `aligned + alpha * (aligned - sft)` (ExPO), over the models `[sft, aligned]`.
    Expo {
        /// The extrapolation strength.
        alpha: f32,
    },
    /// One document of a merge config (mergekit's methods, or `expo` written as a config),
    /// over the models of `spec.models`, in that order.
    Config(Arc<ConfigMerge>),
}

/// A config document.
#[derive(Debug, Clone)]
pub struct ConfigMerge {
    /// The document, checked and with its models resolved.
    pub spec: spec::OutputSpec,
}

/// The layer count that places a tensor on a parameter gradient: `num_hidden_layers` of the
/// model's `config.json` (or of its `text_config`), else one more than the highest
/// `layers.N.` in its tensor names.
pub fn num_layers(model: &Model) -> usize {
    let from_config = std::fs::read(model.dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| {
            c.get("num_hidden_layers")
                .or_else(|| {
                    c.get("text_config")
                        .and_then(|t| t.get("num_hidden_layers"))
                })
                .and_then(serde_json::Value::as_u64)
        });
    match from_config {
        Some(n) => n as usize,
        None => model
            .tensors()
            .filter_map(|(_, t)| spec::layer_index(&t.name))
            .max()
            .map_or(1, |i| i + 1),
    }
}

impl Method {
    /// The method's name, as recorded in provenance and headers.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Expo { .. } => "expo",
            Method::Config(c) => c.spec.method.name(),
        }
    }

    /// What each model the method reads is called in messages and provenance.
    pub fn roles(&self) -> Vec<String> {
        match self {
            Method::Expo { .. } => vec!["sft".into(), "aligned".into()],
            Method::Config(c) => c.spec.models.iter().map(|m| m.path.clone()).collect(),
        }
    }
}

/// One output of a run: a method over some of the run's models.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The method and its parameters.
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
    /// (`expo --vocab-mismatch copy-aligned`, `merge --vocab-mismatch copy-base`), instead of
    /// being a mismatch.
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
    /// The tensor.
    pub tensor: String,
    /// What was done.
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
    /// Where the tensor is in that model.
    pub loc: TensorLoc,
    /// Its storage dtype.
    pub dtype: Dtype,
    /// The input element that lines up with the segment's first element.
    pub first: u64,
}

/// What is computed for a range of elements. Ops are data: the pipeline hands them to the
/// kernel without knowing which method made them.
#[derive(Debug, Clone)]
pub enum Op {
    /// The bytes of the one input, unchanged (integer buffers, rows only one model has).
    Copy,
    /// ExPO over the inputs `[aligned, sft]`, each widened exactly to f32; the output has the
    /// aligned input's type.
    Expo {
        /// The extrapolation strength.
        alpha: f32,
        /// The aligned input's (and the output's) type.
        aligned: FloatDtype,
        /// The SFT input's type.
        sft: FloatDtype,
    },
    /// A method that may need whole-tensor statistics first (TIES, SLERP, DARE, …), over the
    /// inputs `[base, others…]`: reduction passes over the tensor's chunks, then the output
    /// pass. This is the op as planned, before any statistics; the pipeline runs a copy.
    Method(std::sync::Arc<crate::kernel::methods::Op>),
    /// mergekit's `linear` or `task_arithmetic` over the inputs in the combination's order
    /// (task arithmetic: the base first), with mergekit's rounding points and sum order.
    Combine(std::sync::Arc<crate::kernel::linear::Combine>),
}

impl Op {
    /// Whether the op writes the bytes of its input unchanged.
    pub fn is_copy(&self) -> bool {
        matches!(self, Op::Copy)
    }
}

/// A range of an output tensor's elements and how to compute it.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Elements `[start, end)` of the output tensor.
    pub elems: std::ops::Range<u64>,
    /// What is computed.
    pub op: Op,
    /// What it reads, in the op's order.
    pub inputs: Vec<Input>,
}

/// One output tensor.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// The tensor's name.
    pub name: String,
    /// Its storage dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Bytes of output data.
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
    /// The model whose tensor order, dtypes and non-weight files the output takes: the
    /// aligned model of ExPO, else the base model, else the first.
    pub fn layout_model(&self) -> usize {
        match &self.method {
            Method::Expo { .. } => self.models[1],
            Method::Config(c) if c.spec.method == spec::Method::Expo => {
                let aligned = (0..self.models.len())
                    .find(|&i| Some(i) != c.spec.base)
                    .unwrap_or(0);
                self.models[aligned]
            }
            Method::Config(c) => self.models[c.spec.base.unwrap_or(0)],
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
            Method::Config(c) => {
                metadata.push(("mergestream.config".into(), c.spec.source_text.clone()));
            }
        }
        for (role, &m) in self.method.roles().iter().zip(&self.models) {
            let role = role.replace(['[', ']'], "");
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
            Method::Config(c) => {
                p.insert("config".into(), c.spec.source_text.clone().into());
                if let Some(name) = &c.spec.name {
                    p.insert("name".into(), name.clone().into());
                }
            }
        }
        let mut inputs = serde_json::Map::new();
        for (role, &m) in self.method.roles().iter().zip(&self.models) {
            inputs.insert(
                role.clone(),
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
                    return Err(Error::Usage(UsageError::AlphaNotFinite { alpha }));
                }
                let (sft, aligned) = (self.models[0], self.models[1]);
                plan_expo(alpha, sft, aligned, models, self.policy)
            }
            Method::Config(ref c) => match c.spec.method {
                spec::Method::Expo => {
                    let alpha = c
                        .spec
                        .expo_alpha
                        .ok_or_else(|| Error::internal("an expo document without alpha"))?;
                    let base = c.spec.base.unwrap_or(0);
                    let aligned = (0..self.models.len()).find(|&i| i != base).unwrap_or(0);
                    plan_expo(
                        alpha,
                        self.models[base],
                        self.models[aligned],
                        models,
                        self.policy,
                    )
                }
                _ => plan_config(c, &self.models, models, self.policy),
            },
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
    let mut mismatch = |tensor: &str, kind: MismatchKind| {
        problems.push(Mismatch {
            tensor: tensor.to_owned(),
            kind,
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
            } else if t.dtype.mergeable().is_some() {
                mismatch(&t.name, MismatchKind::OnlyInAligned);
            } else {
                mismatch(&t.name, MismatchKind::MissingFromSft);
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
                MismatchKind::Dtype {
                    aligned: t.dtype,
                    sft: s.dtype,
                },
            );
            continue;
        }
        if t.dtype.is_integer() {
            tensors.push(copy(None, &mut notes));
            continue;
        }
        let (Some(a_dtype), Some(s_dtype)) = (t.dtype.mergeable(), s.dtype.mergeable()) else {
            mismatch(&t.name, MismatchKind::Unmergeable { dtype: t.dtype });
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
            let (aligned, sft) = (t.shape.clone(), s.shape.clone());
            let kind = if rows_only_differ(&t.shape, &s.shape) {
                MismatchKind::Rows { aligned, sft }
            } else {
                MismatchKind::Shape { aligned, sft }
            };
            mismatch(&t.name, kind);
            continue;
        };
        let mut segments = Vec::new();
        if shared > 0 {
            segments.push(Segment {
                elems: 0..shared,
                op: op.clone(),
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
            mismatch(&s.name, MismatchKind::MissingFromAligned);
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

/// The output dtype of a config merge: `out_dtype`, else the compute dtype, else the promotion
/// of the inputs' dtypes (as torch promotes: any F32 or a BF16/F16 mix gives F32).
fn promote(dtypes: &[FloatDtype]) -> FloatDtype {
    let first = dtypes.first().copied().unwrap_or(FloatDtype::F32);
    if dtypes.iter().all(|&d| d == first) {
        first
    } else {
        FloatDtype::F32
    }
}

fn dtype_of(f: FloatDtype) -> Dtype {
    match f {
        FloatDtype::BF16 => Dtype::BF16,
        FloatDtype::F16 => Dtype::F16,
        FloatDtype::F32 => Dtype::F32,
    }
}

/// Plans a config document whose method is not ExPO: the layout model's tensors, each an op over
/// `[base, others in config order]` (methods with a base) or the models in config order.
fn plan_config(
    c: &ConfigMerge,
    indices: &[usize],
    models: &[Model],
    policy: Policy,
) -> Result<(Vec<PlannedTensor>, Vec<Note>)> {
    let spec = &c.spec;
    let layout_pos = spec.base.unwrap_or(0);
    let layout = &models[indices[layout_pos]];
    let layers = num_layers(layout);
    // The op's input order: the base model first, then the others in config order.
    let order: Vec<usize> = spec
        .base
        .into_iter()
        .chain((0..spec.models.len()).filter(|&i| Some(i) != spec.base))
        .collect();
    let role = |i: usize| format!("{} ({})", spec.models[i].path, spec.models[i].model.written);
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut tensors = Vec::with_capacity(layout.tensor_count());
    let mut mismatch = |tensor: &str, kind: DisagreementKind| {
        problems.push(Disagreement {
            tensor: tensor.to_owned(),
            kind,
        })
    };
    for (loc, t) in layout.tensors() {
        let numel = t.nbytes() / t.dtype.size() as u64;
        let layout_input = Input {
            model: indices[layout_pos],
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
                    inputs: vec![layout_input],
                }],
            }
        };
        if is_unsaved_buffer(&t.name) || t.dtype.is_integer() {
            tensors.push(copy(None, &mut notes));
            continue;
        }
        let Some(_) = t.dtype.mergeable() else {
            mismatch(
                &t.name,
                DisagreementKind::Dtype {
                    model: role(layout_pos),
                    dtype: t.dtype,
                },
            );
            continue;
        };
        let mut found = Vec::with_capacity(order.len());
        let mut missing = Vec::new();
        for &i in &order {
            let model = &models[indices[i]];
            match model.get(&t.name) {
                Some((loc, info)) => found.push((i, loc, info)),
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            if policy.copy_only_in_layout {
                let who: Vec<String> = missing.iter().map(|&i| role(i)).collect();
                tensors.push(copy(
                    Some(format!(
                        "missing from {}: copied from {} (--only-in-base copy)",
                        who.join(", "),
                        role(layout_pos)
                    )),
                    &mut notes,
                ));
            } else {
                for i in missing {
                    mismatch(
                        &t.name,
                        DisagreementKind::Missing {
                            model: role(i),
                            layout: role(layout_pos),
                        },
                    );
                }
            }
            continue;
        }
        let mut bad = false;
        // Whether some model has another number of rows (a vocabulary of another size).
        let mut rows_differ = false;
        for &(i, _, info) in &found {
            if info.shape != t.shape {
                if rows_only_differ(&t.shape, &info.shape) && policy.copy_extra_rows {
                    rows_differ = true;
                } else {
                    let (model, other, layout, shape) = (
                        role(i),
                        info.shape.clone(),
                        role(layout_pos),
                        t.shape.clone(),
                    );
                    let kind = if rows_only_differ(&t.shape, &info.shape) {
                        DisagreementKind::Rows {
                            model,
                            other,
                            layout,
                            shape,
                        }
                    } else {
                        DisagreementKind::Shape {
                            model,
                            other,
                            layout,
                            shape,
                        }
                    };
                    mismatch(&t.name, kind);
                    bad = true;
                }
            }
            if info.dtype.mergeable().is_none() {
                mismatch(
                    &t.name,
                    DisagreementKind::Dtype {
                        model: role(i),
                        dtype: info.dtype,
                    },
                );
                bad = true;
            }
        }
        if bad {
            continue;
        }
        let compute = spec.dtype.unwrap_or_else(|| {
            promote(
                &found
                    .iter()
                    .map(|(_, _, info)| info.dtype.mergeable().expect("checked above"))
                    .collect::<Vec<_>>(),
            )
        });
        let out = spec.out_dtype.unwrap_or(compute);
        // The rows all models have are merged (as mergekit merges vocabularies truncated to the
        // shortest); the layout model's rows beyond them are copied.
        let (shape, shared) = if rows_differ {
            let rows = found
                .iter()
                .map(|(_, _, info)| info.shape[0])
                .min()
                .unwrap_or(0);
            let mut shape = t.shape.clone();
            shape[0] = rows;
            let shared: u64 = shape.iter().product();
            let extra = t.shape[0] - rows;
            let fewest = found
                .iter()
                .filter(|(_, _, info)| info.shape[0] == rows)
                .map(|&(i, _, _)| role(i))
                .collect::<Vec<_>>()
                .join(", ");
            let what = if extra > 0 {
                if dtype_of(out) != t.dtype {
                    mismatch(
                        &t.name,
                        DisagreementKind::ExtraRowsDtype {
                            layout: role(layout_pos),
                            stored: t.dtype,
                            out: dtype_of(out),
                        },
                    );
                    continue;
                }
                format!(
                    "{} rows in {}, {rows} in {fewest}: {rows} rows merged, the {extra} extra rows copied from {} (--vocab-mismatch copy-base)",
                    t.shape[0],
                    role(layout_pos),
                    role(layout_pos)
                )
            } else {
                let more: Vec<String> = found
                    .iter()
                    .filter(|(_, _, info)| info.shape[0] > rows)
                    .map(|&(i, _, info)| format!("{} ({} rows)", role(i), info.shape[0]))
                    .collect();
                format!(
                    "{rows} rows in {}: merged; the extra rows of {} left out (--vocab-mismatch copy-base)",
                    role(layout_pos),
                    more.join(", ")
                )
            };
            notes.push(Note {
                tensor: t.name.clone(),
                note: what,
            });
            (shape, shared)
        } else {
            (t.shape.clone(), numel)
        };
        let layer_t = spec::gradient_t(spec::layer_index(&t.name), layers);
        let resolved = spec
            .resolve(&t.name, layer_t)
            .map_err(|e| Error::method(&t.name, e))?;
        let linear = match spec.method {
            spec::Method::Linear => Some(linear::Method::Linear),
            spec::Method::TaskArithmetic => Some(linear::Method::TaskArithmetic),
            _ => None,
        };
        // Linear weighs every input in config order; the others take the base first.
        let found: Vec<_> = if linear == Some(linear::Method::Linear) {
            let mut f = found;
            f.sort_by_key(|&(i, _, _)| i);
            f
        } else {
            found
        };
        let dtypes: Vec<FloatDtype> = found
            .iter()
            .map(|(_, _, info)| info.dtype.mergeable().expect("checked above"))
            .collect();
        let op = match methods::Method::from_name(spec.method.name()) {
            _ if linear.is_some() => {
                let method = linear.expect("checked");
                use spec::Param;
                let weights: Vec<f64> = found
                    .iter()
                    .filter(|&&(i, _, _)| method == linear::Method::Linear || Some(i) != spec.base)
                    .map(|&(i, _, _)| resolved.model_f64(i, Param::Weight).unwrap_or(1.0))
                    .collect();
                let normalize = resolved
                    .bool(Param::Normalize)
                    .unwrap_or(method == linear::Method::Linear);
                let combine = linear::Combine::new(&linear::CombineParams {
                    method,
                    weights: &weights,
                    normalize,
                    lambda: resolved.f64(Param::Lambda).unwrap_or(1.0),
                    compute,
                    out,
                    numel: shared,
                })
                .map_err(|e| Error::method(&t.name, e))?;
                Op::Combine(Arc::new(combine))
            }
            Some(method) => {
                let params = method_params(method, spec, &resolved, &order);
                let ctx = methods::TensorCtx {
                    name: &t.name,
                    shape: &shape,
                    compute,
                    inputs: &dtypes,
                    out,
                };
                let op = methods::Op::new(&params, &ctx).map_err(|e| Error::method(&t.name, e))?;
                Op::Method(Arc::new(op))
            }
            None => {
                return Err(Error::internal(format!(
                    "merge method '{}' reached the planner without an op",
                    spec.method.name()
                )))
            }
        };
        let inputs = found
            .iter()
            .map(|&(i, loc, info)| Input {
                model: indices[i],
                loc,
                dtype: info.dtype,
                first: 0,
            })
            .collect();
        let dtype = dtype_of(out);
        let mut segments = vec![Segment {
            elems: 0..shared,
            op,
            inputs,
        }];
        if shared < numel {
            segments.push(Segment {
                elems: shared..numel,
                op: Op::Copy,
                inputs: vec![Input {
                    first: shared,
                    ..layout_input
                }],
            });
            if shared == 0 {
                segments.remove(0);
            }
        }
        tensors.push(PlannedTensor {
            name: t.name.clone(),
            dtype,
            shape: t.shape.clone(),
            nbytes: numel * dtype.size() as u64,
            segments,
        });
    }
    // Tensors the other models have and the layout model does not.
    for (i, entry) in spec.models.iter().enumerate() {
        if i == layout_pos {
            continue;
        }
        for (_, other) in models[indices[i]].tensors() {
            if layout.get(&other.name).is_some() {
                continue;
            }
            if is_unsaved_buffer(&other.name) || other.dtype.is_integer() {
                notes.push(Note {
                    tensor: other.name.clone(),
                    note: format!("only in {}: left out", entry.path),
                });
            } else {
                mismatch(
                    &other.name,
                    DisagreementKind::NotInLayout {
                        model: role(i),
                        layout: role(layout_pos),
                    },
                );
            }
        }
    }
    if problems.is_empty() {
        notes.sort();
        notes.dedup();
        Ok((tensors, notes))
    } else {
        problems.sort();
        problems.dedup();
        Err(Error::Disagree { problems })
    }
}

/// A statistics method's parameters for one tensor, from the resolved config values; `order`
/// lists the inputs as the op takes them (base first).
fn method_params(
    method: methods::Method,
    spec: &spec::OutputSpec,
    resolved: &spec::Resolved,
    order: &[usize],
) -> methods::MethodParams {
    use spec::Param;
    let mut p = methods::MethodParams::new(method);
    p.inputs = order
        .iter()
        .filter(|&&i| Some(i) != spec.base)
        .map(|&i| {
            let mut input =
                methods::InputParams::new(resolved.model_f64(i, Param::Weight).unwrap_or(1.0));
            if let Some(d) = resolved.model_f64(i, Param::Density) {
                input.density = d;
            }
            if let Some(g) = resolved.model_f64(i, Param::Gamma) {
                input.gamma = g;
            }
            if let Some(e) = resolved.model_f64(i, Param::Epsilon) {
                input.epsilon = e;
            }
            input
        })
        .collect();
    p.normalize = resolved.bool(Param::Normalize);
    p.rescale = resolved.bool(Param::Rescale);
    if let Some(l) = resolved.f64(Param::Lambda) {
        p.lambda = l;
    }
    p.int8_mask = resolved.bool(Param::Int8Mask).unwrap_or(false);
    if let Some(t) = resolved.f64(Param::T) {
        p.t = t;
    }
    p.filter_wise = resolved.bool(Param::FilterWise).unwrap_or(false);
    if let Some(seed) = resolved.global.get(&Param::Seed).and_then(|v| v.as_u64()) {
        p.seed = seed;
    }
    p
}
