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
        p
    }

    /// Every output tensor, in the layout model's storage order; all mismatches at once.
    pub fn plan_tensors(&self, models: &[Model]) -> Result<Vec<PlannedTensor>> {
        match self.method {
            Method::Expo { alpha } => {
                if !alpha.is_finite() {
                    return Err(Error::Usage(format!(
                        "alpha {alpha} is not a finite number"
                    )));
                }
                let (sft, aligned) = (self.models[0], self.models[1]);
                plan_expo(alpha, sft, aligned, models)
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
) -> Result<Vec<PlannedTensor>> {
    let (sft, aligned) = (&models[sft_index], &models[aligned_index]);
    let mut problems = Vec::new();
    let mut tensors = Vec::with_capacity(aligned.tensor_count());
    for (loc, t) in aligned.tensors() {
        let Some((sft_loc, s)) = sft.get(&t.name) else {
            problems.push(Mismatch {
                tensor: t.name.clone(),
                problem: "missing from the SFT model (--sft)".into(),
            });
            continue;
        };
        if s.shape != t.shape {
            problems.push(Mismatch {
                tensor: t.name.clone(),
                problem: format!(
                    "shape {:?} in --aligned but {:?} in --sft",
                    t.shape, s.shape
                ),
            });
        }
        let both_float = t.dtype.mergeable().is_some() && s.dtype.mergeable().is_some();
        if s.dtype != t.dtype && !both_float {
            problems.push(Mismatch {
                tensor: t.name.clone(),
                problem: format!("dtype {} in --aligned but {} in --sft", t.dtype, s.dtype),
            });
        }
        let aligned_input = Input {
            model: aligned_index,
            loc,
            dtype: t.dtype,
            first: 0,
        };
        let (op, inputs) = match (t.dtype.mergeable(), s.dtype.mergeable()) {
            (Some(a), Some(s_dtype)) => (
                Op::Expo {
                    alpha,
                    aligned: a,
                    sft: s_dtype,
                },
                vec![
                    aligned_input,
                    Input {
                        model: sft_index,
                        loc: sft_loc,
                        dtype: s.dtype,
                        first: 0,
                    },
                ],
            ),
            // The dtype disagreement is reported above.
            (Some(_), None) => continue,
            (None, _) if t.dtype.is_integer() => (Op::Copy, vec![aligned_input]),
            (None, _) => {
                problems.push(Mismatch {
                    tensor: t.name.clone(),
                    problem: format!(
                        "dtype {} cannot be merged (BF16, F16 and F32 are merged; integer tensors are copied)",
                        t.dtype
                    ),
                });
                continue;
            }
        };
        let numel = t.nbytes() / t.dtype.size() as u64;
        tensors.push(PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            nbytes: t.nbytes(),
            segments: vec![Segment {
                elems: 0..numel,
                op,
                inputs,
            }],
        });
    }
    for (_, s) in sft.tensors() {
        if aligned.get(&s.name).is_none() {
            problems.push(Mismatch {
                tensor: s.name.clone(),
                problem: "missing from the aligned model (--aligned)".into(),
            });
        }
    }
    if problems.is_empty() {
        Ok(tensors)
    } else {
        problems.sort();
        Err(Error::Mismatch {
            sft: sft.path.clone(),
            aligned: aligned.path.clone(),
            problems,
        })
    }
}
