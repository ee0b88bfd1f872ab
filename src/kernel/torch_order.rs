//! torch's CPU reductions of float tensors, reproduced bit for bit and streamed: `Tensor.sum`
//! over a contiguous vector (ATen's cascade sum) and `torch.norm` / `linalg.vector_norm` with
//! p = 2 over one (ATen's last-dimension norm kernel), as torch computes them on one thread,
//! for float32 tensors and for bfloat16/float16 ones (which both accumulate in float32).
//!
//! mergekit's model_stock takes its cosines from these two reductions. A float sum's last bits
//! depend on its association, so agreeing with mergekit means summing in torch's order, not in
//! a more accurate one. That order was read from ATen's kernels and checked against torch 2.15
//! (`scripts/torch-probes.py`, and `tests/it/torch_order.rs`, which compares these functions
//! with torch on every test run). It is the same whether torch dispatches to AVX2 or AVX-512:
//! both kernels work in 8-lane float vectors either way. Torch's no-SIMD build
//! (`ATEN_CPU_CAPABILITY=default`, for CPUs without AVX2) differs in one place: its float32
//! norm adds plain rounded squares in the tail too, which only tensors whose size is not a
//! multiple of 8 notice.
//!
//! * **Sum** (`vectorized_inner_sum`): a *vector* is 8 float32 elements, or 16 bfloat16/float16
//!   ones whose two 8-element halves are added as floats (`[x0 + x8, …, x7 + x15]`): 8 lanes
//!   either way. For `n` of at least one vector, the first `⌊n/v⌋` vectors (`v` elements each)
//!   are grouped 4 to a *row*, added into 4 levels of accumulators that cascade every `2^p`
//!   rows, `p = max(4, ⌈log2 rows⌉ / 4)`; the vectors after the last whole row go into the
//!   first accumulator; the 4 accumulators are added in order, then a scalar `acc = 0` takes the
//!   last `n mod v` elements and then the 8 lanes in order. Below one vector
//!   (`scalar_inner_sum`) the same cascade runs on rows of 4 scalars.
//! * **Norm²** (`norm_two_reduce_step`): one 8-lane accumulator takes `x·x` (rounded, then
//!   added: no fused multiply-add) over the first `v⌊n/v⌋` elements in order (a 16-bit
//!   vector's halves go through the lanes one after the other); its lanes are added in order;
//!   then of the last `r = n mod v` elements, the first `4⌊r/4⌋` add their rounded squares one
//!   by one and the rest are fused multiply-adds `s = fma(x, x, s)` (the scalar tail loop as
//!   torch's compiler built it: found by probing float32, where 3000 of 3000 random vectors of
//!   every tail length agree and no simpler rule does; for 16-bit tensors, whose results are
//!   rounded to 8 bits, the tail rule is assumed the same). A **float16** norm is not
//!   vectorised: ATen's generic reduction adds the squares one by one into one accumulator.
//!
//! With several threads torch splits a whole-tensor sum into one range per thread and adds
//! the ranges' sums, so its last bits follow the machine's core count; these functions are the
//! one-thread order, the same for any chunking of the stream (chunk boundaries only change
//! where a call to `push` ends).

/// Lanes of torch's float reduction vectors, whatever the ISA.
const LANES: usize = 8;
/// Independent accumulators of `row_sum` (`ilp_factor`).
const ILP: usize = 4;
/// Cascade levels of `multi_row_sum`.
const LEVELS: usize = 4;
/// Elements of the longest vector (a 16-bit one).
const MAX_VEC: usize = 16;

/// The dtype of the tensor torch reduces, which picks its kernels: float32 vectors of 8
/// lanes, or 16-bit vectors (values given here as the floats they convert to) of 16 elements,
/// whose two 8-element halves the sum adds as floats before accumulating them. The norm of a
/// float16 tensor is not vectorised at all (see [`NormTwo`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// float32 elements, 8 per vector.
    F32,
    /// bfloat16 elements, 16 per vector.
    Bf16,
    /// float16 elements, 16 per vector.
    F16,
}

impl Load {
    /// Elements per vector.
    fn vec_len(self) -> usize {
        match self {
            Load::F32 => LANES,
            Load::Bf16 | Load::F16 => 2 * LANES,
        }
    }
}

/// ATen's `CeilLog2`.
fn ceil_log2(x: u64) -> u32 {
    if x <= 1 {
        0
    } else {
        64 - (x - 1).leading_zeros()
    }
}

/// A streamed `Tensor.sum` of `n` elements in torch's order (see the module docs).
#[derive(Clone, Debug)]
pub struct CascadeSum {
    n: u64,
    load: Load,
    /// Elements pushed so far.
    seen: u64,
    /// Elements per vector: 8 or 16, or 1 on the scalar path (`n` below one vector).
    vec_len: usize,
    /// Lanes per vector: 8, or 1 on the scalar path.
    width: usize,
    /// Whole rows of `ILP` vectors.
    rows: u64,
    /// Elements covered by vectors: the rows plus the vectors after them.
    vector_elems: u64,
    level_power: u32,
    /// `acc[level][k × width + lane]`.
    acc: [[f32; ILP * LANES]; LEVELS],
    /// A row (or, after the rows, a vector) being filled when a push ends inside one.
    buf: [f32; ILP * MAX_VEC],
    filled: usize,
    rows_done: u64,
    /// The scalar tail's accumulator (vector path).
    tail: f32,
}

impl CascadeSum {
    /// A sum of `n` elements loaded as `load`, pushed in order.
    pub fn new(n: u64, load: Load) -> CascadeSum {
        let full = load.vec_len();
        let (vec_len, width) = if n >= full as u64 {
            (full, LANES)
        } else {
            (1, 1)
        };
        let vecs = n / vec_len as u64;
        let rows = vecs / ILP as u64;
        CascadeSum {
            n,
            load,
            seen: 0,
            vec_len,
            width,
            rows,
            vector_elems: vecs * vec_len as u64,
            level_power: 4.max(ceil_log2(rows) / LEVELS as u32),
            acc: [[0.0; ILP * LANES]; LEVELS],
            buf: [0.0; ILP * MAX_VEC],
            filled: 0,
            rows_done: 0,
            tail: 0.0,
        }
    }

    fn row_len(&self) -> usize {
        ILP * self.vec_len
    }

    /// Lane `lane` of the vector at `v` (its first element): the element itself, or for a
    /// 16-bit vector the float sum of its two halves' elements.
    #[inline(always)]
    fn lane(&self, v: &[f32], lane: usize) -> f32 {
        match (self.load, self.width) {
            (Load::Bf16 | Load::F16, LANES) => v[lane] + v[lane + LANES],
            _ => v[lane],
        }
    }

    /// Adds one whole row and cascades after every `2^level_power` rows.
    fn add_row(&mut self, row: &[f32]) {
        let (w, vl) = (self.width, self.vec_len);
        for k in 0..ILP {
            for lane in 0..w {
                let x = self.lane(&row[k * vl..], lane);
                self.acc[0][k * w + lane] += x;
            }
        }
        self.rows_done += 1;
        let done = self.rows_done;
        let step = 1u64 << self.level_power;
        if !done.is_multiple_of(step) {
            return;
        }
        for j in 1..LEVELS {
            let (lo, hi) = self.acc.split_at_mut(j);
            for (a, b) in hi[0].iter_mut().zip(lo[j - 1].iter_mut()) {
                *a += *b;
                *b = 0.0;
            }
            if done & ((step - 1) << (j as u32 * self.level_power)) != 0 {
                break;
            }
        }
    }

    /// Folds the levels into `acc[0]` once the whole rows are in.
    fn end_rows(&mut self) {
        for j in 1..LEVELS {
            let (lo, hi) = self.acc.split_at_mut(j);
            for (a, &b) in lo[0].iter_mut().zip(hi[0].iter()) {
                *a += b;
            }
        }
    }

    /// Adds one vector after the rows into the first accumulator.
    fn add_vector(&mut self, v: &[f32]) {
        for lane in 0..self.width {
            let x = self.lane(v, lane);
            self.acc[0][lane] += x;
        }
    }

    /// Adds the next elements of the vector.
    pub fn push(&mut self, mut xs: &[f32]) {
        let row_len = self.row_len();
        let rows_end = self.rows * row_len as u64;
        while !xs.is_empty() && self.seen < self.n {
            let in_rows = self.seen < rows_end;
            let (unit, end) = if in_rows {
                (row_len, rows_end)
            } else if self.seen < self.vector_elems {
                (self.vec_len, self.vector_elems)
            } else {
                let take = ((self.n - self.seen) as usize).min(xs.len());
                for &x in &xs[..take] {
                    self.tail += x;
                }
                self.seen += take as u64;
                xs = &xs[take..];
                continue;
            };
            let take = ((end - self.seen) as usize).min(xs.len());
            let (mut now, rest) = xs.split_at(take);
            xs = rest;
            while !now.is_empty() {
                if self.filled == 0 && now.len() >= unit {
                    let (u, rest) = now.split_at(unit);
                    if in_rows {
                        self.add_row(u);
                    } else {
                        self.add_vector(u);
                    }
                    self.seen += unit as u64;
                    now = rest;
                    continue;
                }
                let k = (unit - self.filled).min(now.len());
                self.buf[self.filled..self.filled + k].copy_from_slice(&now[..k]);
                self.filled += k;
                self.seen += k as u64;
                now = &now[k..];
                if self.filled == unit {
                    let u = self.buf;
                    if in_rows {
                        self.add_row(&u[..unit]);
                    } else {
                        self.add_vector(&u[..unit]);
                    }
                    self.filled = 0;
                }
            }
            if in_rows && self.seen == rows_end {
                self.end_rows();
            }
        }
    }

    /// The sum, once all `n` elements are in.
    pub fn finish(&self) -> f32 {
        debug_assert_eq!(self.seen, self.n, "a cascade sum finished early");
        let w = self.width;
        let mut ps = self.acc[0];
        for k in 1..ILP {
            for lane in 0..w {
                ps[lane] += ps[k * w + lane];
            }
        }
        if w == 1 {
            // `scalar_inner_sum`: the row sum is the result.
            return ps[0];
        }
        let mut total = self.tail;
        for &lane in &ps[..LANES] {
            total += lane;
        }
        total
    }
}

/// A streamed squared `torch.norm` (p = 2) of `n` elements loaded as `load`, in torch's order
/// (see the module docs); its square root in float32 is torch's norm (then rounded to the
/// tensor's dtype). A float16 tensor takes ATen's generic reduction instead of the
/// last-dimension kernel: one float accumulator, element by element (a float16 square is exact
/// in float32, so fused or not makes no difference).
#[derive(Clone, Debug)]
pub struct NormTwo {
    n: u64,
    /// Accumulator lanes: 8, or 1 for float16.
    width: usize,
    /// Elements the vector loop covers (a multiple of the vector length).
    vector_elems: u64,
    seen: u64,
    lanes: [f32; LANES],
    /// The elements after the last whole vector, in order.
    tail: [f32; MAX_VEC],
}

impl NormTwo {
    /// The norm of `n` elements loaded as `load`, pushed in order.
    pub fn new(n: u64, load: Load) -> NormTwo {
        let (width, step) = match load {
            Load::F16 => (1, 1),
            _ => (LANES, load.vec_len() as u64),
        };
        NormTwo {
            n,
            width,
            vector_elems: n - n % step,
            seen: 0,
            lanes: [0.0; LANES],
            tail: [0.0; MAX_VEC],
        }
    }

    /// Adds the next elements of the vector.
    pub fn push(&mut self, mut xs: &[f32]) {
        while !xs.is_empty() && self.seen < self.n {
            if self.seen < self.vector_elems {
                let take = ((self.vector_elems - self.seen) as usize).min(xs.len());
                let (now, rest) = xs.split_at(take);
                xs = rest;
                let mut now = now;
                if self.width == 1 {
                    for &x in now {
                        self.lanes[0] += x * x;
                    }
                    self.seen += now.len() as u64;
                    continue;
                }
                // Up to a lane boundary one by one, then whole groups of 8: a 16-bit vector's
                // two halves go through the 8 lanes one after the other, in element order too.
                while !now.is_empty() && !self.seen.is_multiple_of(LANES as u64) {
                    let lane = (self.seen % LANES as u64) as usize;
                    self.lanes[lane] += now[0] * now[0];
                    self.seen += 1;
                    now = &now[1..];
                }
                let mut vecs = now.chunks_exact(LANES);
                for v in &mut vecs {
                    for (a, &x) in self.lanes.iter_mut().zip(v) {
                        *a += x * x;
                    }
                }
                self.seen += (now.len() - vecs.remainder().len()) as u64;
                for (lane, &x) in vecs.remainder().iter().enumerate() {
                    self.lanes[lane] += x * x;
                    self.seen += 1;
                }
                continue;
            }
            let take = ((self.n - self.seen) as usize).min(xs.len());
            for &x in &xs[..take] {
                self.tail[(self.seen - self.vector_elems) as usize] = x;
                self.seen += 1;
            }
            xs = &xs[take..];
        }
    }

    /// `Σx²` in torch's order, once all `n` elements are in.
    pub fn finish(&self) -> f32 {
        debug_assert_eq!(self.seen, self.n, "a norm finished early");
        let mut s = self.lanes[0];
        for &l in &self.lanes[1..self.width] {
            s += l;
        }
        let tail = &self.tail[..(self.n - self.vector_elems) as usize];
        let (squared, fused) = tail.split_at(tail.len() / 4 * 4);
        for &x in squared {
            s += x * x;
        }
        for &x in fused {
            s = x.mul_add(x, s);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order spelled out directly, element by element, from the module docs (indexed as
    /// ATen's loops are).
    #[allow(clippy::needless_range_loop)]
    fn sum_ref(x: &[f32], load: Load) -> f32 {
        let n = x.len();
        let (vl, width) = if n >= load.vec_len() {
            (load.vec_len(), LANES)
        } else {
            (1, 1)
        };
        let lane = |v: usize, l: usize| -> f32 {
            if load != Load::F32 && width == LANES {
                x[v * vl + l] + x[v * vl + l + LANES]
            } else {
                x[v * vl + l]
            }
        };
        let vecs = n / vl;
        let rows = vecs / ILP;
        let p = 4.max(ceil_log2(rows as u64) / 4);
        let step = 1usize << p;
        let rl = ILP * width;
        let mut acc = vec![vec![0f32; rl]; LEVELS];
        let mut i = 0;
        let add_row = |acc: &mut Vec<Vec<f32>>, i: usize| {
            for k in 0..ILP {
                for l in 0..width {
                    acc[0][k * width + l] += lane(i * ILP + k, l);
                }
            }
        };
        while i + step <= rows {
            for _ in 0..step {
                add_row(&mut acc, i);
                i += 1;
            }
            for j in 1..LEVELS {
                for q in 0..rl {
                    acc[j][q] += acc[j - 1][q];
                    acc[j - 1][q] = 0.0;
                }
                if i & ((step - 1) << (j as u32 * p)) != 0 {
                    break;
                }
            }
        }
        while i < rows {
            add_row(&mut acc, i);
            i += 1;
        }
        for j in 1..LEVELS {
            for q in 0..rl {
                let v = acc[j][q];
                acc[0][q] += v;
            }
        }
        for v in rows * ILP..vecs {
            for l in 0..width {
                acc[0][l] += lane(v, l);
            }
        }
        for k in 1..ILP {
            for l in 0..width {
                let v = acc[0][k * width + l];
                acc[0][l] += v;
            }
        }
        if width == 1 {
            return acc[0][0];
        }
        let mut t = 0f32;
        for &e in &x[vecs * vl..] {
            t += e;
        }
        for &l in &acc[0][..LANES] {
            t += l;
        }
        t
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let m = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                m * f32::powi(2.0, ((s >> 8) % 24) as i32 - 12)
            })
            .collect()
    }

    #[test]
    fn streamed_sum_follows_the_spelled_out_order_for_any_chunking() {
        let lens = [
            0usize, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 511, 512, 513,
            4096, 70_001,
        ];
        for load in [Load::F32, Load::Bf16] {
            for &n in &lens {
                let x = values(n, n as u64 + 7);
                let want = sum_ref(&x, load);
                for chunk in [1usize, 3, 8, 32, 100, 4096, usize::MAX] {
                    let mut s = CascadeSum::new(n as u64, load);
                    for c in x.chunks(chunk.min(n.max(1))) {
                        s.push(c);
                    }
                    let got = s.finish();
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{load:?} n {n} chunk {chunk}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_float16_norm_is_one_accumulator() {
        let x = values(5000, 11);
        let mut want = 0f32;
        for &e in &x {
            want += e * e;
        }
        for chunk in [1usize, 7, 64, usize::MAX] {
            let mut s = NormTwo::new(x.len() as u64, Load::F16);
            for c in x.chunks(chunk.min(x.len())) {
                s.push(c);
            }
            assert_eq!(s.finish().to_bits(), want.to_bits(), "chunk {chunk}");
        }
    }

    #[test]
    fn streamed_norm_follows_the_spelled_out_order_for_any_chunking() {
        for (load, step) in [(Load::F32, 8), (Load::Bf16, 16)] {
            for &n in &[0usize, 1, 7, 8, 9, 15, 16, 17, 31, 1000, 4099] {
                let x = values(n, n as u64 + 3);
                let mut lanes = [0f32; LANES];
                let m = n - n % step;
                for (i, &e) in x[..m].iter().enumerate() {
                    lanes[i % LANES] += e * e;
                }
                let mut want = lanes[0];
                for &l in &lanes[1..] {
                    want += l;
                }
                let r = n - m;
                for (i, &e) in x[m..].iter().enumerate() {
                    if i < r / 4 * 4 {
                        want += e * e;
                    } else {
                        want = e.mul_add(e, want);
                    }
                }
                for chunk in [1usize, 5, 8, 64, usize::MAX] {
                    let mut s = NormTwo::new(n as u64, load);
                    for c in x.chunks(chunk.min(n.max(1))) {
                        s.push(c);
                    }
                    assert_eq!(s.finish().to_bits(), want.to_bits(), "{load:?} n {n}");
                }
            }
        }
    }
}
