//! The reversible transforms a block goes through before zstd: cutting it into per-tensor
//! segments, XOR with a base model's bytes, and byte grouping of float elements.
//!
//! Byte grouping rewrites a segment of `len` bytes of a tensor whose elements are `size` bytes
//! as `size` streams, stream `p` holding, in order, every byte whose position within its element
//! is `p` (for a little-endian BF16 tensor: all low bytes — mostly mantissa — then all high bytes
//! — sign and exponent). A segment may start or end inside an element (a block boundary can fall
//! anywhere); `phase` is the position within its element of the segment's first byte, so partial
//! elements simply contribute fewer bytes to some streams. Pure functions over slices; no I/O,
//! no zstd.

use crate::format::{Dtype, TensorInfo};

/// Whether tensors of `dtype` are byte-grouped: the multi-byte float types.
pub fn grouped(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

/// The part of one tensor that falls in one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index into the header's tensors.
    pub tensor: usize,
    /// Offset of the segment within the block.
    pub at: usize,
    pub len: usize,
    /// Offset of the segment's first byte within its tensor.
    pub tensor_offset: u64,
    /// Element size if grouped, else 1.
    pub group: usize,
}

impl Segment {
    pub fn phase(&self) -> usize {
        (self.tensor_offset % self.group as u64) as usize
    }
}

/// The segments of the block covering data bytes `[start, start + len)`, in order. `tensors`
/// are sorted by position and tile the data section (as `format::header` guarantees); empty
/// tensors contribute nothing.
pub fn segments(tensors: &[TensorInfo], start: u64, len: usize, out: &mut Vec<Segment>) {
    out.clear();
    let end = start + len as u64;
    let first = tensors.partition_point(|t| t.end <= start);
    for (i, t) in tensors.iter().enumerate().skip(first) {
        if t.start >= end {
            break;
        }
        let s = t.start.max(start);
        let e = t.end.min(end);
        if e > s {
            out.push(Segment {
                tensor: i,
                at: (s - start) as usize,
                len: (e - s) as usize,
                tensor_offset: s - t.start,
                group: if grouped(t.dtype) { t.dtype.size() } else { 1 },
            });
        }
    }
}

/// `dst ^= src`.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    // Eight bytes at a time: LLVM vectorizes this loop.
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let x = u64::from_ne_bytes(d.try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(s.try_into().expect("8 bytes"));
        d.copy_from_slice(&x.to_ne_bytes());
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d ^= *s;
    }
}

/// Number of bytes of stream `p` in a segment of `len` bytes starting at `phase`.
fn stream_len(len: usize, size: usize, phase: usize, p: usize) -> usize {
    let first = (p + size - phase) % size;
    if first < len {
        (len - first - 1) / size + 1
    } else {
        0
    }
}

/// Byte-groups `src` into `dst` (same length): streams of byte positions `0..size`, in order.
pub fn group(src: &[u8], dst: &mut [u8], size: usize, phase: usize) {
    debug_assert_eq!(src.len(), dst.len());
    if size == 1 {
        dst.copy_from_slice(src);
        return;
    }
    if phase == 0 && src.len().is_multiple_of(size) {
        let n = src.len() / size;
        match size {
            2 => return group_n::<2>(src, dst, n),
            4 => return group_n::<4>(src, dst, n),
            8 => return group_n::<8>(src, dst, n),
            _ => {}
        }
    }
    let mut out = 0;
    for p in 0..size {
        let first = (p + size - phase) % size;
        for &b in src.iter().skip(first).step_by(size) {
            dst[out] = b;
            out += 1;
        }
    }
}

/// Inverse of [`group`].
pub fn ungroup(src: &[u8], dst: &mut [u8], size: usize, phase: usize) {
    debug_assert_eq!(src.len(), dst.len());
    if size == 1 {
        dst.copy_from_slice(src);
        return;
    }
    if phase == 0 && src.len().is_multiple_of(size) {
        let n = src.len() / size;
        match size {
            2 => return ungroup_n::<2>(src, dst, n),
            4 => return ungroup_n::<4>(src, dst, n),
            8 => return ungroup_n::<8>(src, dst, n),
            _ => {}
        }
    }
    let mut at = 0;
    for p in 0..size {
        let first = (p + size - phase) % size;
        let n = stream_len(src.len(), size, phase, p);
        for (d, &b) in dst
            .iter_mut()
            .skip(first)
            .step_by(size)
            .zip(&src[at..at + n])
        {
            *d = b;
        }
        at += n;
    }
}

/// Whole elements, no phase: element `i` byte `p` goes to `dst[p * n + i]`.
fn group_n<const S: usize>(src: &[u8], dst: &mut [u8], n: usize) {
    if S == 2 {
        let (lo, hi) = dst.split_at_mut(n);
        for ((e, l), h) in src.chunks_exact(2).zip(lo).zip(hi) {
            *l = e[0];
            *h = e[1];
        }
        return;
    }
    for (i, e) in src.chunks_exact(S).enumerate() {
        for (p, &b) in e.iter().enumerate() {
            dst[p * n + i] = b;
        }
    }
}

fn ungroup_n<const S: usize>(src: &[u8], dst: &mut [u8], n: usize) {
    if S == 2 {
        let (lo, hi) = src.split_at(n);
        for ((e, l), h) in dst.chunks_exact_mut(2).zip(lo).zip(hi) {
            e[0] = *l;
            e[1] = *h;
        }
        return;
    }
    for (i, e) in dst.chunks_exact_mut(S).enumerate() {
        for (p, b) in e.iter_mut().enumerate() {
            *b = src[p * n + i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, written the slow way: stream p is every byte at position p.
    fn reference(src: &[u8], size: usize, phase: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for p in 0..size {
            for (i, &b) in src.iter().enumerate() {
                if (phase + i) % size == p {
                    out.push(b);
                }
            }
        }
        out
    }

    #[test]
    fn bf16_puts_low_bytes_then_high_bytes() {
        let src = [0x01, 0xA1, 0x02, 0xA2, 0x03, 0xA3];
        let mut dst = [0; 6];
        group(&src, &mut dst, 2, 0);
        assert_eq!(dst, [0x01, 0x02, 0x03, 0xA1, 0xA2, 0xA3]);
    }

    proptest! {
        #[test]
        fn group_matches_reference_and_ungroup_inverts(
            src in proptest::collection::vec(any::<u8>(), 0..200),
            size in prop_oneof![Just(1usize), Just(2), Just(4), Just(8)],
            phase in 0usize..8,
        ) {
            let phase = phase % size;
            let mut grouped = vec![0; src.len()];
            group(&src, &mut grouped, size, phase);
            prop_assert_eq!(&grouped, &reference(&src, size, phase));
            let mut back = vec![0; src.len()];
            ungroup(&grouped, &mut back, size, phase);
            prop_assert_eq!(back, src);
        }

        #[test]
        fn xor_matches_bytewise(a in proptest::collection::vec(any::<u8>(), 0..100), seed in any::<u8>()) {
            let b: Vec<u8> = a.iter().map(|x| x.wrapping_mul(31).wrapping_add(seed)).collect();
            let mut d = a.clone();
            xor_into(&mut d, &b);
            let want: Vec<u8> = a.iter().zip(&b).map(|(x, y)| x ^ y).collect();
            prop_assert_eq!(d, want);
        }
    }

    #[test]
    fn segments_cut_tensors_at_block_edges() {
        let t = |name: &str, dtype, start, end| TensorInfo {
            name: name.into(),
            dtype,
            shape: vec![(end - start) / dtype_size(dtype)],
            start,
            end,
        };
        fn dtype_size(d: Dtype) -> u64 {
            d.size() as u64
        }
        let tensors = vec![
            t("a", Dtype::U8, 0, 3),
            t("empty", Dtype::F32, 3, 3),
            t("b", Dtype::F32, 3, 43),
            t("c", Dtype::BF16, 43, 64),
        ];
        let mut segs = Vec::new();
        segments(&tensors, 0, 16, &mut segs);
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].tensor, segs[0].len, segs[0].group), (0, 3, 1));
        assert_eq!((segs[1].tensor, segs[1].at, segs[1].len), (2, 3, 13));
        segments(&tensors, 16, 16, &mut segs);
        assert_eq!(segs.len(), 1);
        assert_eq!((segs[0].tensor_offset, segs[0].phase()), (13, 1));
        segments(&tensors, 32, 32, &mut segs);
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[1].tensor, segs[1].at, segs[1].len), (3, 11, 21));
    }
}
