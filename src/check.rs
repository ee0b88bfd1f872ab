//! Auditing a merge: `merge CONFIG --check DIR` (and `expo … --check DIR`) recomputes the merge
//! without writing it and compares it, tensor by tensor, with an existing model directory — for
//! instance a published merge with its `mergekit_config.yml`.
//!
//! The recomputation is the ordinary run: the same plan, the same pipeline, the same kernels,
//! reading each input once. Only the sink differs: a [`Comparer`] receives each output shard's
//! bytes as a [`ShardWriter`](crate::output::ShardWriter) would, and instead of writing them reads
//! the same tensor ranges of the existing model (which may be sharded differently, store its
//! tensors in another order, or in another dtype) and compares, in memory bounded by one chunk.
//! A tensor is *identical* when the existing model stores it with the same dtype, shape and bytes;
//! for each other tensor the report says how it differs and where first (element index and both
//! bit patterns).
//!
//! What it deliberately does not do: write or create anything, compare headers, metadata or
//! non-weight files (config, tokenizer), or decide the exit code (that is `main.rs`'s, from
//! [`CheckReport::is_identical`]).

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::format::Dtype;
use crate::model::{Model, TensorLoc};
use crate::pipeline::{Cancel, ShardSink};
use crate::plan::{OutShard, Part, Plan};
use crate::writer::IoMode;
use crate::{busy, pipeline, plan_job, progress, stream, MergeJob};

/// How one recomputed tensor compares with the existing model's.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// Same dtype, shape and bytes.
    Identical,
    /// Same dtype and shape; `elements` elements differ.
    Differs {
        /// Elements that differ.
        elements: u64,
        /// The first of them.
        first: Difference,
    },
    /// The existing model stores the tensor in another dtype; values compared after widening
    /// both exactly (`values` is `None` when they are not both BF16, F16 or F32).
    OtherDtype {
        /// The existing model's dtype.
        found: Dtype,
        /// Elements whose values differ (both NaN counts as equal; `-0` and `+0` differ), and the
        /// first of them.
        values: Option<(u64, Option<Difference>)>,
    },
    /// The existing model's tensor has another shape.
    OtherShape {
        /// Its shape.
        found: Vec<u64>,
    },
    /// The existing model has no tensor of this name.
    Missing,
}

/// An element where the recomputed tensor and the existing one differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// The element's index in the flattened tensor.
    pub index: u64,
    /// The recomputed element's bits (little-endian value of its bytes).
    pub ours: u64,
    /// The existing element's bits.
    pub theirs: u64,
}

/// One recomputed tensor and how it compares.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorCheck {
    /// The tensor.
    pub name: String,
    /// Its recomputed dtype.
    pub dtype: Dtype,
    /// Its recomputed shape.
    pub shape: Vec<u64>,
    /// How it compares.
    pub outcome: Outcome,
}

/// What `--check` found for one output.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// The existing model directory compared with.
    pub dir: PathBuf,
    /// Every recomputed tensor, in output order.
    pub tensors: Vec<TensorCheck>,
    /// Tensors of the existing model the merge does not produce, sorted.
    pub extra: Vec<String>,
}

impl CheckReport {
    /// Whether every tensor is identical and the existing model has no other tensor.
    pub fn is_identical(&self) -> bool {
        self.extra.is_empty() && self.identical() == self.tensors.len()
    }

    /// Identical tensors.
    pub fn identical(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.outcome == Outcome::Identical)
            .count()
    }

    /// Tensors the existing model lacks.
    pub fn missing(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.outcome == Outcome::Missing)
            .count()
    }
}

/// Recomputes every output of `job` and compares it with the existing model directory named as
/// its output (`outputs[k].out`). Reads each input once; writes nothing.
pub fn check(job: &MergeJob, cancel: &Cancel) -> Result<Vec<CheckReport>> {
    let (mut models, plans) = plan_job(job)?;
    // Inputs are read as a run that writes reads them.
    if job.options.io != IoMode::Buffered {
        for model in &mut models {
            model.use_direct_reads(job.options.io == IoMode::Direct)?;
        }
    }
    let existing = job
        .outputs
        .iter()
        .map(|o| Model::open(&o.out))
        .collect::<Result<Vec<_>>>()?;
    let shards: Vec<Vec<usize>> = plans.iter().map(|p| p.shards_of(Part::WHOLE)).collect();
    let bytes = plans.iter().map(|p| p.total_size).sum();
    let bar = progress::Bar::new(bytes, job.options.show_progress);
    let busy = busy::Busy::default();
    let mut comparers: Vec<Comparer> = plans
        .iter()
        .zip(&existing)
        .map(|(plan, model)| Comparer::new(plan, model))
        .collect();
    let outputs: Vec<pipeline::Output> = comparers
        .iter_mut()
        .zip(&plans)
        .zip(&shards)
        .map(|((sink, plan), shards)| pipeline::Output { plan, shards, sink })
        .collect();
    let result = stream(&models, outputs, &job.options, &bar, cancel, &busy);
    bar.finish();
    result?;
    for model in &existing {
        model.check_unchanged()?;
    }
    comparers
        .into_iter()
        .zip(&job.outputs)
        .map(|(c, o)| c.into_report(o.out.clone()))
        .collect()
}

/// How the bytes of the tensor being received are compared.
#[derive(Debug)]
enum Mode {
    /// The existing tensor has the same dtype and shape: compare bytes.
    Bytes { loc: TensorLoc },
    /// Another float dtype, same shape: compare values.
    Values { loc: TensorLoc, found: Dtype },
    /// Nothing to compare with (missing, other shape, or a dtype whose values are not compared).
    Skip,
}

/// The tensor being received.
#[derive(Debug)]
struct Current {
    /// Index into the plan's tensors.
    tensor: usize,
    /// Bytes of it received so far.
    received: u64,
    mode: Mode,
    /// Differing elements so far, and the first.
    differing: u64,
    first: Option<Difference>,
}

/// A [`ShardSink`] that compares what it receives with an existing model instead of writing it.
pub struct Comparer<'a> {
    plan: &'a Plan,
    existing: &'a Model,
    /// Results so far, in output order.
    checked: Vec<TensorCheck>,
    /// The shard being received: its next tensor, and the tensor in progress.
    next: usize,
    end: usize,
    current: Option<Current>,
    /// The existing model's bytes for the piece being compared.
    buf: Vec<u8>,
    /// Decoded blocks of the existing model, when it is packed.
    cache: crate::model::ReadCache,
    /// The recomputed bytes of a chunk computed for the sink (`ShardSink::write_with`).
    scratch: Vec<u8>,
}

impl<'a> Comparer<'a> {
    /// A comparer of `plan`'s output with `existing`.
    pub fn new(plan: &'a Plan, existing: &'a Model) -> Comparer<'a> {
        Comparer {
            plan,
            existing,
            checked: Vec::with_capacity(plan.tensors.len()),
            next: 0,
            end: 0,
            current: None,
            buf: Vec::new(),
            cache: crate::model::ReadCache::new(1),
            scratch: Vec::new(),
        }
    }

    /// The report, once every shard has been received; `dir` is the existing model's path.
    pub fn into_report(self, dir: PathBuf) -> Result<CheckReport> {
        if self.current.is_some() || self.checked.len() != self.plan.tensors.len() {
            return Err(Error::internal(format!(
                "--check received {} of {} tensors",
                self.checked.len(),
                self.plan.tensors.len()
            )));
        }
        let ours: std::collections::HashSet<&str> = self.plan.tensor_names().collect();
        let mut extra: Vec<String> = self
            .existing
            .tensors()
            .filter(|(_, t)| !ours.contains(t.name.as_str()))
            .map(|(_, t)| t.name.clone())
            .collect();
        extra.sort();
        Ok(CheckReport {
            dir,
            tensors: self.checked,
            extra,
        })
    }

    /// Starts tensor `t`: decides how to compare it.
    fn start(&mut self, t: usize) {
        let ours = &self.plan.tensors[t];
        let mode = match self.existing.get(&ours.name) {
            Some((loc, info)) if info.shape == ours.shape && info.dtype == ours.dtype => {
                Mode::Bytes { loc }
            }
            Some((loc, info))
                if info.shape == ours.shape
                    && info.dtype.mergeable().is_some()
                    && ours.dtype.mergeable().is_some() =>
            {
                Mode::Values {
                    loc,
                    found: info.dtype,
                }
            }
            _ => Mode::Skip,
        };
        self.current = Some(Current {
            tensor: t,
            received: 0,
            mode,
            differing: 0,
            first: None,
        });
    }

    /// Ends the tensor in progress, recording its outcome.
    fn end_tensor(&mut self) {
        let Some(c) = self.current.take() else { return };
        let ours = &self.plan.tensors[c.tensor];
        let outcome = match (&c.mode, self.existing.get(&ours.name)) {
            (_, None) => Outcome::Missing,
            (Mode::Bytes { .. }, _) => match c.first {
                None => Outcome::Identical,
                Some(first) => Outcome::Differs {
                    elements: c.differing,
                    first,
                },
            },
            (Mode::Values { found, .. }, _) => Outcome::OtherDtype {
                found: *found,
                values: Some((c.differing, c.first)),
            },
            (Mode::Skip, Some((_, info))) if info.shape != ours.shape => Outcome::OtherShape {
                found: info.shape.clone(),
            },
            (Mode::Skip, Some((_, info))) => Outcome::OtherDtype {
                found: info.dtype,
                values: None,
            },
        };
        self.checked.push(TensorCheck {
            name: ours.name.clone(),
            dtype: ours.dtype,
            shape: ours.shape.clone(),
            outcome,
        });
    }

    /// Moves past finished tensors (and empty ones) to the one the next bytes belong to.
    fn advance(&mut self) {
        loop {
            if let Some(c) = &self.current {
                if c.received < self.plan.tensors[c.tensor].nbytes {
                    return;
                }
                self.end_tensor();
            }
            if self.next >= self.end {
                return;
            }
            self.next += 1;
            self.start(self.next - 1);
        }
    }

    /// Compares `piece`, the next bytes of the tensor in progress, with the existing model.
    fn compare(&mut self, piece: &[u8]) -> Result<()> {
        let c = self
            .current
            .as_mut()
            .ok_or_else(|| Error::internal("--check received bytes past a shard's tensors"))?;
        let ours = &self.plan.tensors[c.tensor];
        let width = ours.dtype.size() as u64;
        if !c.received.is_multiple_of(width) || !(piece.len() as u64).is_multiple_of(width) {
            return Err(Error::internal(format!(
                "tensor '{}': --check received a piece that is not whole elements",
                ours.name
            )));
        }
        let first_elem = c.received / width;
        let n = piece.len() / width as usize;
        let (loc, theirs) = match c.mode {
            Mode::Skip => return Ok(()),
            Mode::Bytes { loc } => (loc, ours.dtype),
            Mode::Values { loc, found } => (loc, found),
        };
        let their_width = theirs.size();
        self.buf.resize(n * their_width, 0);
        let shard = &self.existing.shards[loc.shard];
        let info = &shard.tensors[loc.entry];
        shard.read_at(
            info.start + first_elem * their_width as u64,
            &mut self.buf[..n * their_width],
            &mut self.cache,
        )?;
        let theirs_bytes = &self.buf[..n * their_width];
        let by_value = matches!(c.mode, Mode::Values { .. });
        if !by_value && piece == theirs_bytes {
            return Ok(());
        }
        let w = width as usize;
        for i in 0..n {
            let a = bits(&piece[i * w..(i + 1) * w]);
            let b = bits(&theirs_bytes[i * their_width..(i + 1) * their_width]);
            let same = if by_value {
                let (x, y) = (value(ours.dtype, a), value(theirs, b));
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan())
            } else {
                a == b
            };
            if !same {
                c.differing += 1;
                if c.first.is_none() {
                    c.first = Some(Difference {
                        index: first_elem + i as u64,
                        ours: a,
                        theirs: b,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The little-endian value of an element's bytes.
fn bits(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// The value of a float element's bits (exactly: every BF16, F16 and F32 value is an f64).
fn value(dtype: Dtype, bits: u64) -> f64 {
    match dtype {
        Dtype::BF16 => half::bf16::from_bits(bits as u16).to_f64(),
        Dtype::F16 => half::f16::from_bits(bits as u16).to_f64(),
        Dtype::F32 => f64::from(f32::from_bits(bits as u32)),
        _ => f64::NAN,
    }
}

impl ShardSink for Comparer<'_> {
    fn begin(&mut self, shard: &OutShard) -> Result<()> {
        if self.current.is_some() {
            return Err(Error::internal(
                "--check: a shard began before the last ended",
            ));
        }
        self.next = shard.tensors.start;
        self.end = shard.tensors.end;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let mut rest = bytes;
        while !rest.is_empty() {
            self.advance();
            let c = self
                .current
                .as_ref()
                .ok_or_else(|| Error::internal("--check received bytes past a shard's tensors"))?;
            let left = self.plan.tensors[c.tensor].nbytes - c.received;
            let take = (rest.len() as u64).min(left) as usize;
            let (piece, after) = rest.split_at(take);
            self.compare(piece)?;
            if let Some(c) = self.current.as_mut() {
                c.received += take as u64;
            }
            rest = after;
        }
        Ok(())
    }

    fn write_with(
        &mut self,
        len: usize,
        _unit: usize,
        fill: &mut dyn FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.write(crate::pipeline::fill_scratch(&mut scratch, len, fill));
        self.scratch = scratch;
        result
    }

    fn finish(&mut self, _shard: &OutShard) -> Result<()> {
        self.advance();
        if self.current.is_some() || self.next != self.end {
            return Err(Error::internal("--check: a shard ended before its tensors"));
        }
        Ok(())
    }
}

/// The element at flat `index` of `shape`, as `[i, j, …]`.
fn position(index: u64, shape: &[u64]) -> String {
    let mut rest = index;
    let mut at = vec![0u64; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            at[k] = rest % d;
            rest /= d;
        }
    }
    let at: Vec<String> = at.iter().map(u64::to_string).collect();
    format!("[{}]", at.join(", "))
}

fn hex(dtype: Dtype, bits: u64) -> String {
    format!("0x{bits:0w$x}", w = 2 * dtype.size())
}

fn shown(dtype: Dtype, bits: u64) -> String {
    if dtype.mergeable().is_some() {
        format!("{} ({})", hex(dtype, bits), value(dtype, bits))
    } else {
        hex(dtype, bits)
    }
}

impl fmt::Display for TensorCheck {
    /// One line: `name: identical`, or what differs and where first.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let numel: u64 = self.shape.iter().product();
        let at = |d: &Difference| format!("element {} {}", d.index, position(d.index, &self.shape));
        match &self.outcome {
            Outcome::Identical => write!(f, "{}: identical", self.name),
            Outcome::Differs { elements, first } => write!(
                f,
                "{}: DIFFERS in {elements} of {numel} elements; first at {}: recomputed {}, found {}",
                self.name,
                at(first),
                shown(self.dtype, first.ours),
                shown(self.dtype, first.theirs)
            ),
            Outcome::OtherDtype { found, values } => {
                write!(
                    f,
                    "{}: DIFFERS in dtype: recomputed {}, found {found}",
                    self.name, self.dtype
                )?;
                match values {
                    None => Ok(()),
                    Some((0, _)) | Some((_, None)) => write!(f, "; the values are equal"),
                    Some((n, Some(d))) => write!(
                        f,
                        "; {n} of {numel} values differ, first at {}: recomputed {}, found {}",
                        at(d),
                        shown(self.dtype, d.ours),
                        shown(*found, d.theirs)
                    ),
                }
            }
            Outcome::OtherShape { found } => write!(
                f,
                "{}: DIFFERS in shape: recomputed {:?}, found {found:?}",
                self.name, self.shape
            ),
            Outcome::Missing => write!(f, "{}: MISSING from the existing model", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_bits() {
        assert_eq!(position(0, &[3, 4]), "[0, 0]");
        assert_eq!(position(7, &[3, 4]), "[1, 3]");
        assert_eq!(position(23, &[2, 3, 4]), "[1, 2, 3]");
        assert_eq!(position(0, &[]), "[]");
        assert_eq!(bits(&[0x80, 0x3f]), 0x3f80);
        assert_eq!(bits(&[0, 0, 0x80, 0x3f]), 0x3f80_0000);
        assert_eq!(value(Dtype::BF16, 0x3f80), 1.0);
        assert_eq!(value(Dtype::F16, 0x3c00), 1.0);
        assert_eq!(hex(Dtype::BF16, 0x3f80), "0x3f80");
        assert_eq!(hex(Dtype::F32, 1), "0x00000001");
    }

    #[test]
    fn lines_name_the_tensor_and_the_element() {
        let t = TensorCheck {
            name: "lm_head.weight".into(),
            dtype: Dtype::BF16,
            shape: vec![4, 8],
            outcome: Outcome::Differs {
                elements: 1,
                first: Difference {
                    index: 10,
                    ours: 0x3f80,
                    theirs: 0x3f81,
                },
            },
        };
        assert_eq!(
            t.to_string(),
            "lm_head.weight: DIFFERS in 1 of 32 elements; first at element 10 [1, 2]: recomputed 0x3f80 (1), found 0x3f81 (1.0078125)"
        );
    }
}
