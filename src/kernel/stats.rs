//! Whole-tensor statistics, streamed: fixed-order float sums and exact rank selections by radix
//! histograms. The building blocks of the multi-pass methods in [`super::methods`].
//!
//! # Sums: one association, whatever the threads, chunks or parts
//!
//! A tensor's summands (squares, products, magnitudes, computed per element in f64) are cut
//! into **blocks**: [`BLOCK`] = 4096 elements for whole-tensor statistics, or one row for the
//! row-local methods. Within a block, summand `j` goes to lane `j mod 16`; each lane adds its
//! summands in index order, starting from `+0.0`, in f64; the 16 lanes are then folded by
//! halving (`l[i] + l[i+8]`, then `+4`, `+2`, `+1`). Block sums are combined by a perfect
//! binary tree over the block sequence, zero-padded to a power of two ([`PairwiseTree`] does
//! this streaming, with `O(log blocks)` state). Nothing here depends on how blocks are grouped
//! into chunks, provided chunks start at block boundaries (the pipeline's promise), and chunk
//! partials are pushed in chunk order.
//!
//! Why not exact accumulation: a superaccumulator over f64 products costs several times the
//! memory bandwidth the pass has; the f64 lane sums are accurate to far below the f32/bf16
//! rounding of every consumer (relative error < 300·2⁻⁵³), and a fixed association is all that
//! determinism needs. Why `+0.0` starts: a sum never becomes `−0.0`, so zero padding is exact.
//!
//! # Rank selection: exact thresholds, a documented tie rule
//!
//! A selection finds position `p` in a total order of the elements: by magnitude key (the
//! compute dtype's bit pattern with the sign cleared; every NaN maps to the largest key, as
//! torch sorts NaN above +Inf), descending ([`Order::Desc`], TIES' top-k) or ascending
//! ([`Order::Asc`], breadcrumbs), and **among equal keys, lower element index first** in both
//! orders. torch's `argsort`/`sort` leave ties unspecified (torch 2.15's CPU sort is not stable
//! above 16 elements); this rule is ours. The passes:
//!
//! 1. a 65 536-bin histogram of the key's high 16 bits (for 16-bit dtypes: the whole key);
//! 2. for f32 only, a histogram of the low 16 bits among elements in the selected bin;
//! 3. only when the threshold key's tie group is split (some but not all of it before `p`):
//!    tie counts per [`BLOCK`], combined in chunk order to find the block holding the boundary
//!    and how many ties of that block come first; the output pass counts ties from that
//!    block's start, which lies inside the chunk because chunks start at block boundaries.
//!
//! Histogram partials are integers, so combining them is exact in any order; tie partials and
//! sums are combined in chunk order.
//!
//! What this module deliberately does not do: no I/O, no threads, no method arithmetic, no
//! knowledge of dtypes beyond the magnitude key.

use super::scalar::f32_to_f16_rne;
use super::FloatDtype;

/// Elements per reduction block (and per tie-count block) of whole-tensor statistics.
pub const BLOCK: u64 = 4096;
/// Lanes of the within-block sum.
pub const LANES: usize = 16;
/// Bins of one radix digit.
pub const BINS: usize = 1 << 16;

/// The fixed-order sum of one block's summands (see the module documentation).
#[inline]
pub fn lane_sum(summands: &[f64]) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut chunks = summands.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    for (l, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += v;
    }
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            lanes[i] += lanes[i + half];
        }
        half /= 2;
    }
    lanes[0]
}

/// Streaming perfect binary tree over block sums pushed in block order, equal to the tree over
/// the sequence zero-padded to a power of two.
#[derive(Clone, Debug, Default)]
pub struct PairwiseTree {
    stack: Vec<(u32, f64)>,
}

impl PairwiseTree {
    /// Adds the next block's sum.
    pub fn push(&mut self, x: f64) {
        let mut cur = (0u32, x);
        while let Some(&(level, left)) = self.stack.last() {
            if level != cur.0 {
                break;
            }
            self.stack.pop();
            cur = (level + 1, left + cur.1);
        }
        self.stack.push(cur);
    }

    /// The total; `0.0` for no blocks.
    pub fn finish(&self) -> f64 {
        let mut it = self.stack.iter().rev();
        let Some(&(_, mut r)) = it.next() else {
            return 0.0;
        };
        for &(_, left) in it {
            r += left;
        }
        r
    }
}

/// Width in bits of a dtype's magnitude key: 16 or 32.
pub fn key_bits(dtype: FloatDtype) -> u32 {
    match dtype {
        FloatDtype::F32 => 32,
        FloatDtype::BF16 | FloatDtype::F16 => 16,
    }
}

/// The magnitude key of `v`, a value of `dtype` held in an f32: its bits with the sign
/// cleared, every NaN mapped to the largest key. Monotone in `|v|`; equal keys are equal
/// magnitudes.
#[inline]
pub fn magnitude_key(dtype: FloatDtype, v: f32) -> u32 {
    match dtype {
        FloatDtype::F32 => {
            let a = v.to_bits() & 0x7FFF_FFFF;
            if a > 0x7F80_0000 {
                0x7FFF_FFFF
            } else {
                a
            }
        }
        FloatDtype::BF16 => {
            let a = (v.to_bits() >> 16) & 0x7FFF;
            if a > 0x7F80 {
                0x7FFF
            } else {
                a
            }
        }
        FloatDtype::F16 => {
            let a = (f32_to_f16_rne(v) as u32) & 0x7FFF;
            if v.is_nan() || a > 0x7C00 {
                0x7FFF
            } else {
                a
            }
        }
    }
}

/// Direction of a selection's order (ties: lower index first, in both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Larger magnitudes first.
    Desc,
    /// Smaller magnitudes first.
    Asc,
}

/// The set of elements before position `p` of a selection's order, as element-wise data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// `p = 0`.
    Nothing,
    /// `p = N`.
    Everything,
    /// Elements strictly before key `key`, plus the ties (`key` itself) of blocks before
    /// `tie_block` and the first `tie_rem` ties of block `tie_block`.
    At {
        /// The selection's order.
        order: Order,
        /// The threshold key.
        key: u32,
        /// The [`BLOCK`] holding the boundary inside the threshold's tie group (`0` when no
        /// tie comes first, `u64::MAX` when all do).
        tie_block: u64,
        /// How many ties of `tie_block` come first.
        tie_rem: u64,
    },
}

impl Cut {
    /// Marks `before[j]` for elements `first + j` with keys `keys[j]`. `first` must be a
    /// multiple of [`BLOCK`] whenever the chunk holds the tie block (chunks start at blocks).
    /// (The pipeline marks chunks piecewise, with [`Cut::mark_from`]; the tests use this.)
    #[cfg(test)]
    pub fn mark(&self, keys: &[u32], first: u64, before: &mut [bool]) {
        self.mark_from(keys, first, before, &mut 0);
    }

    /// [`Cut::mark`] for a chunk marked in consecutive pieces: `ties_seen` carries the count of
    /// the tie block's ties already met from one piece to the next (start it at 0 for the
    /// chunk).
    pub fn mark_from(&self, keys: &[u32], first: u64, before: &mut [bool], ties_seen: &mut u64) {
        match *self {
            Cut::Nothing => before.iter_mut().for_each(|b| *b = false),
            Cut::Everything => before.iter_mut().for_each(|b| *b = true),
            Cut::At {
                order,
                key: t,
                tie_block,
                tie_rem,
            } => {
                match order {
                    Order::Desc => {
                        for (&k, b) in keys.iter().zip(before.iter_mut()) {
                            *b = k > t;
                        }
                    }
                    Order::Asc => {
                        for (&k, b) in keys.iter().zip(before.iter_mut()) {
                            *b = k < t;
                        }
                    }
                }
                if !keys.contains(&t) {
                    return;
                }
                let mut ordinal = *ties_seen;
                for (j, (&k, b)) in keys.iter().zip(before.iter_mut()).enumerate() {
                    if k != t {
                        continue;
                    }
                    let blk = (first + j as u64) / BLOCK;
                    *b = if blk < tie_block {
                        true
                    } else if blk > tie_block {
                        false
                    } else {
                        ordinal += 1;
                        ordinal <= tie_rem
                    };
                }
                *ties_seen = ordinal;
            }
        }
    }
}

/// Where a selection stands between passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectPhase {
    /// Needs the high-digit histogram.
    High,
    /// Needs the low-digit histogram among keys with high digit `high`; `rem` elements of that
    /// bin come before position `p`.
    Low {
        /// The selected high digit.
        high: u32,
        /// Elements of that bin before position `p`.
        rem: u64,
    },
    /// Needs tie counts of key `key`; `rem` of its ties come before position `p`.
    Ties {
        /// The threshold key.
        key: u32,
        /// Ties before position `p`.
        rem: u64,
    },
    /// Done.
    Done(Cut),
}

/// One rank selection: position `pos` of `n` elements in `order`, over keys of `bits` bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// The order.
    pub order: Order,
    /// Width of the keys ([`key_bits`]).
    pub bits: u32,
    /// Where the selection stands.
    pub phase: SelectPhase,
}

impl Selection {
    /// A selection of position `pos` among `n` elements (done at once when `pos` is 0 or
    /// at least `n`).
    pub fn new(order: Order, bits: u32, pos: u64, n: u64) -> Selection {
        let phase = if pos == 0 {
            SelectPhase::Done(Cut::Nothing)
        } else if pos >= n {
            SelectPhase::Done(Cut::Everything)
        } else {
            SelectPhase::High
        };
        Selection { order, bits, phase }
    }

    /// The position within the selection's order of bins: `rem` is the number of elements of
    /// the histogram's range that precede the wanted position.
    fn walk(&self, hist: &[u64], rem: u64) -> (u32, u64, u64) {
        let mut cum = 0u64;
        let mut visit = |bin: usize| -> Option<(u32, u64, u64)> {
            let c = hist[bin];
            if cum + c > rem {
                return Some((bin as u32, rem - cum, c));
            }
            cum += c;
            None
        };
        let found = match self.order {
            Order::Desc => (0..hist.len()).rev().find_map(&mut visit),
            Order::Asc => (0..hist.len()).find_map(&mut visit),
        };
        // The histogram covers at least rem + 1 elements by construction.
        found.unwrap_or((0, 0, 0))
    }

    /// Advances after a histogram pass. `pos` is the selection's position (only used in the
    /// `High` phase, where `rem = pos`).
    pub fn advance_hist(&mut self, hist: &[u64], pos: u64) {
        match self.phase.clone() {
            SelectPhase::High => {
                let (bin, rem, count) = self.walk(hist, pos);
                if self.bits == 16 {
                    self.phase = self.ties_or_done(bin, rem, count);
                } else {
                    self.phase = SelectPhase::Low { high: bin, rem };
                }
            }
            SelectPhase::Low { high, rem } => {
                let (bin, rem, count) = self.walk(hist, rem);
                self.phase = self.ties_or_done((high << 16) | bin, rem, count);
            }
            _ => {}
        }
    }

    fn ties_or_done(&self, key: u32, rem: u64, count: u64) -> SelectPhase {
        if rem == 0 {
            SelectPhase::Done(Cut::At {
                order: self.order,
                key,
                tie_block: 0,
                tie_rem: 0,
            })
        } else if rem >= count {
            SelectPhase::Done(Cut::At {
                order: self.order,
                key,
                tie_block: u64::MAX,
                tie_rem: 0,
            })
        } else {
            SelectPhase::Ties { key, rem }
        }
    }

    /// Which histogram bin a key falls in for the current phase, if it counts at all. (The
    /// pipeline counts whole chunks at once; the tests' reference selection uses this.)
    #[cfg(test)]
    #[inline]
    pub fn bin(&self, key: u32) -> Option<usize> {
        match self.phase {
            SelectPhase::High => Some(if self.bits == 16 {
                key as usize
            } else {
                (key >> 16) as usize
            }),
            SelectPhase::Low { high, .. } => {
                if key >> 16 == high {
                    Some((key & 0xFFFF) as usize)
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// The result, once the selection is done.
    pub fn cut(&self) -> Option<Cut> {
        match self.phase {
            SelectPhase::Done(c) => Some(c),
            _ => None,
        }
    }
}

/// Combines tie counts per block, pushed in block order, into the boundary of a selection.
#[derive(Clone, Debug)]
pub struct TieFinder {
    key: u32,
    order: Order,
    rem: u64,
    seen: u64,
    next_block: u64,
    found: Option<Cut>,
}

impl TieFinder {
    /// A finder for the boundary after `rem` ties of `key`, in `order`.
    pub fn new(order: Order, key: u32, rem: u64) -> TieFinder {
        TieFinder {
            key,
            order,
            rem,
            seen: 0,
            next_block: 0,
            found: None,
        }
    }

    /// The next block's tie count.
    pub fn push(&mut self, count: u64) {
        let b = self.next_block;
        self.next_block += 1;
        if self.found.is_none() && self.seen + count > self.rem {
            self.found = Some(Cut::At {
                order: self.order,
                key: self.key,
                tie_block: b,
                tie_rem: self.rem - self.seen,
            });
        }
        self.seen += count;
    }

    /// The boundary (`None` only if fewer ties were pushed than the histogram counted).
    pub fn finish(&self) -> Option<Cut> {
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_reference(blocks: &[f64]) -> f64 {
        let mut v: Vec<f64> = blocks.to_vec();
        let n = v.len().next_power_of_two().max(1);
        v.resize(n, 0.0);
        while v.len() > 1 {
            v = v.chunks(2).map(|p| p[0] + p[1]).collect();
        }
        v[0]
    }

    #[test]
    fn streaming_tree_equals_zero_padded_perfect_tree() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for n in 0..70 {
            let vals: Vec<f64> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
                        * 10f64.powi((x % 30) as i32 - 15)
                })
                .collect();
            let mut t = PairwiseTree::default();
            vals.iter().for_each(|&v| t.push(v));
            assert_eq!(
                t.finish().to_bits(),
                tree_reference(&vals).to_bits(),
                "n={n}"
            );
        }
    }

    #[test]
    fn lane_sum_has_the_documented_association() {
        let v: Vec<f64> = (0..37).map(|i| 1.0 / (i as f64 + 0.37)).collect();
        let mut lanes = [0.0f64; 16];
        for (j, x) in v.iter().enumerate() {
            lanes[j % 16] += x;
        }
        let l8: Vec<f64> = (0..8).map(|i| lanes[i] + lanes[i + 8]).collect();
        let l4: Vec<f64> = (0..4).map(|i| l8[i] + l8[i + 4]).collect();
        let l2: Vec<f64> = (0..2).map(|i| l4[i] + l4[i + 2]).collect();
        assert_eq!(lane_sum(&v).to_bits(), (l2[0] + l2[1]).to_bits());
        assert_eq!(lane_sum(&[]).to_bits(), 0f64.to_bits());
        assert_eq!(lane_sum(&[-0.0]).to_bits(), 0f64.to_bits());
    }

    #[test]
    fn keys_order_magnitudes_and_put_nan_last() {
        for dtype in [FloatDtype::F32, FloatDtype::BF16, FloatDtype::F16] {
            let k = |v: f32| magnitude_key(dtype, v);
            assert_eq!(k(0.0), k(-0.0));
            assert!(k(1.0) < k(2.0) && k(-2.0) == k(2.0));
            assert!(k(f32::INFINITY) < k(f32::NAN));
            assert_eq!(k(f32::NAN), k(-f32::NAN));
            assert!(k(0.5) > k(0.25));
        }
    }

    /// Brute-force reference of a selection: sort (key, index) and take the first p.
    fn brute(keys: &[u32], order: Order, p: usize) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..keys.len()).collect();
        idx.sort_by(|&a, &b| {
            let o = match order {
                Order::Desc => keys[b].cmp(&keys[a]),
                Order::Asc => keys[a].cmp(&keys[b]),
            };
            o.then(a.cmp(&b))
        });
        let mut before = vec![false; keys.len()];
        for &i in &idx[..p] {
            before[i] = true;
        }
        before
    }

    fn select(keys: &[u32], bits: u32, order: Order, p: usize) -> Cut {
        let n = keys.len() as u64;
        let mut s = Selection::new(order, bits, p as u64, n);
        loop {
            match s.phase.clone() {
                SelectPhase::Done(c) => return c,
                SelectPhase::Ties { key, rem } => {
                    let mut f = TieFinder::new(order, key, rem);
                    for blk in keys.chunks(BLOCK as usize) {
                        f.push(blk.iter().filter(|&&k| k == key).count() as u64);
                    }
                    s.phase = SelectPhase::Done(f.finish().unwrap());
                }
                _ => {
                    let mut h = vec![0u64; BINS];
                    for &k in keys {
                        if let Some(b) = s.bin(k) {
                            h[b] += 1;
                        }
                    }
                    s.advance_hist(&h, p as u64);
                }
            }
        }
    }

    #[test]
    fn selections_match_brute_force_with_heavy_ties() {
        let mut x = 12345u64;
        for (n, bits, spread) in [
            (1usize, 16u32, 3u32),
            (10, 16, 2),
            (9000, 16, 5),
            (9000, 32, 70_000),
            (20_000, 32, 4),
            (5000, 32, u32::MAX),
        ] {
            let keys: Vec<u32> = (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let k = ((x >> 33) as u32) % spread.max(1);
                    if bits == 16 {
                        k & 0x7FFF
                    } else {
                        k & 0x7FFF_FFFF
                    }
                })
                .collect();
            for order in [Order::Desc, Order::Asc] {
                for p in [0, 1, n / 3, n / 2, n.saturating_sub(1), n] {
                    let cut = select(&keys, bits, order, p);
                    let mut got = vec![false; n];
                    // Mark in chunks of arbitrary block multiples.
                    let mut first = 0usize;
                    let mut step = 1usize;
                    while first < n {
                        let len = (step * BLOCK as usize).min(n - first);
                        cut.mark(
                            &keys[first..first + len],
                            first as u64,
                            &mut got[first..first + len],
                        );
                        first += len;
                        step = step % 3 + 1;
                    }
                    assert_eq!(
                        got,
                        brute(&keys, order, p),
                        "n={n} bits={bits} {order:?} p={p}"
                    );
                }
            }
        }
    }
}
