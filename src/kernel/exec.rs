//! A reference driver for [`super::methods::Op`]: runs a method over whole in-memory tensors
//! cut into chunks at any multiple of the op's granule, with any number of threads that take
//! chunks in a scrambled order, combining partials in chunk order as the real pipeline must.
//! Tests use it to show that output bytes do not depend on chunking or threads; a library user
//! can use it to merge one tensor held in memory, and read it as the protocol's example.
//!
//! What it deliberately does not do: bound memory (it holds whole tensors and the whole
//! output), overlap passes, or read files; the merge pipeline drives ops itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::methods::{MethodError, Op, Partial};

/// One chunk's output buffer, taken by whichever worker gets there first.
type Piece<'a> = Mutex<Option<(usize, &'a mut [u8])>>;

/// Runs `op` to completion over `inputs` (whole tensors, little-endian storage bytes, in the
/// order of [`TensorCtx::inputs`](super::methods::TensorCtx::inputs): base first) and returns
/// the output bytes. `out_size` is the byte size of one output element (the op's output
/// dtype's [`size`](super::FloatDtype::size)); `chunk` is the chunk length in elements, rounded
/// down to a multiple of [`Op::granule`] (at least one granule); `threads` (at least one) work
/// on each pass. The bytes do not depend on `chunk` or `threads`.
///
/// # Errors
///
/// A [`MethodError`] from a pass or from the output, including the protocol errors
/// ([`MethodError::ChunkLengths`], …) that slices not holding [`Op::numel`] elements each, or a
/// wrong `out_size`, lead to.
pub fn run(
    op: &mut Op,
    inputs: &[&[u8]],
    out_size: usize,
    chunk: u64,
    threads: usize,
) -> Result<Vec<u8>, MethodError> {
    let n = op.numel();
    let g = op.granule();
    let chunk = (chunk / g).max(1) * g;
    let ranges: Vec<(u64, u64)> = (0..n.div_ceil(chunk))
        .map(|i| (i * chunk, ((i + 1) * chunk).min(n)))
        .collect();
    let sizes: Vec<usize> = inputs
        .iter()
        .map(|b| if n == 0 { 0 } else { b.len() / n as usize })
        .collect();
    let slice = |(a, b): (u64, u64)| -> Vec<&[u8]> {
        inputs
            .iter()
            .zip(&sizes)
            .map(|(x, &s)| &x[a as usize * s..b as usize * s])
            .collect()
    };
    // Workers take chunks in a scrambled order, so arrival order differs from chunk order.
    let order: Vec<usize> = {
        let mut o: Vec<usize> = (0..ranges.len()).collect();
        let mut x = 0x2545_F491_4F6C_DD1Du64 ^ ranges.len() as u64;
        for i in (1..o.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            o.swap(i, (x % (i as u64 + 1)) as usize);
        }
        o
    };
    let threads = threads.max(1);
    while op.next_pass().is_some() {
        let parts: Vec<Mutex<Option<Result<Partial, MethodError>>>> =
            ranges.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let shared: &Op = op;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&ci) = order.get(i) else { break };
                    let p = shared.partial(ranges[ci].0, &slice(ranges[ci]));
                    if let Ok(mut slot) = parts[ci].lock() {
                        *slot = Some(p);
                    }
                });
            }
        });
        let mut comb = op.combiner();
        for (slot, &range) in parts.into_iter().zip(&ranges) {
            if let Some(p) = slot.into_inner().ok().flatten() {
                comb.push(p?, &slice(range))?;
            }
        }
        op.finish_pass(comb)?;
    }
    let mut out = vec![0u8; n as usize * out_size];
    let mut pieces: Vec<(usize, &mut [u8])> = Vec::new();
    let mut rest: &mut [u8] = &mut out;
    for (i, &(a, b)) in ranges.iter().enumerate() {
        let (head, tail) = rest.split_at_mut((b - a) as usize * out_size);
        pieces.push((i, head));
        rest = tail;
    }
    let pieces: Vec<Piece<'_>> = pieces.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let errors: Mutex<Vec<MethodError>> = Mutex::new(Vec::new());
    let next = AtomicUsize::new(0);
    let shared: &Op = op;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&ci) = order.get(i) else { break };
                let taken = pieces[ci].lock().ok().and_then(|mut g| g.take());
                if let Some((_, buf)) = taken {
                    if let Err(e) = shared.output(ranges[ci].0, &slice(ranges[ci]), buf) {
                        if let Ok(mut v) = errors.lock() {
                            v.push(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = errors.into_inner().ok().and_then(|mut v| v.pop()) {
        return Err(e);
    }
    Ok(out)
}
