//! Counter-based randomness for DARE and DELLA: the same bits for a given (seed, tensor name,
//! input, element index) on any machine, thread count, chunk size or `--part`.
//!
//! # Construction (version 1)
//!
//! * **Key.** `k = BLAKE3(b"mergestream rng v1\0" ‖ seed as u64 little-endian ‖ tensor name as
//!   UTF-8)`; the Philox key is `[u32::from_le_bytes(k[0..4]), u32::from_le_bytes(k[4..8])]`.
//! * **Counter.** Element `i` of input `k` (the position of the model among the non-base inputs,
//!   in config order, 0-based) for purpose `p` ([`PURPOSE_DARE`] or [`PURPOSE_DELLA`]) uses the
//!   Philox4x32-10 block `ctr = [lo32(i / 4), hi32(i / 4), k, p]` and takes output word `i % 4`.
//! * **Uniform.** `u = (word >> 8) as f32 * 2^-24`, exactly representable, in `[0, 1)`. An
//!   element is kept when `u < p` (an f32 comparison), so `p = 0` keeps nothing and `p = 1` keeps
//!   everything.
//!
//! Philox4x32-10 is Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3" (SC11), checked
//! against the Random123 known-answer vectors below.
//!
//! What this module deliberately does not do: no state, no streams, no floating-point draws
//! other than the one uniform above; no attempt to reproduce torch's generator (mergekit's DARE
//! and DELLA masks come from torch's global, unseeded RNG and cannot be reproduced by anyone).

/// `ctr[3]` for DARE's keep/drop draws.
pub const PURPOSE_DARE: u32 = 0;
/// `ctr[3]` for DELLA's keep/drop draws.
pub const PURPOSE_DELLA: u32 = 1;
/// The seed used when a config gives none.
pub const DEFAULT_SEED: u64 = 0;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds.
#[inline]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let [mut x0, mut x1, mut x2, mut x3] = ctr;
    let [mut k0, mut k1] = key;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        let p0 = (M0 as u64) * (x0 as u64);
        let p1 = (M1 as u64) * (x2 as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        x0 = hi1 ^ x1 ^ k0;
        x1 = lo1;
        x2 = hi0 ^ x3 ^ k1;
        x3 = lo0;
    }
    [x0, x1, x2, x3]
}

/// The Philox key for one tensor under one seed.
pub fn tensor_key(seed: u64, tensor: &str) -> [u32; 2] {
    let mut h = blake3::Hasher::new();
    h.update(b"mergestream rng v1\0");
    h.update(&seed.to_le_bytes());
    h.update(tensor.as_bytes());
    let k = h.finalize();
    let b = k.as_bytes();
    [
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

/// Fills `out[j]` with the uniform of element `first + j` (see the module documentation).
pub fn uniforms(key: [u32; 2], input: u32, purpose: u32, first: u64, out: &mut [f32]) {
    let mut j = 0usize;
    while j < out.len() {
        let i = first + j as u64;
        let block = i >> 2;
        let w = philox4x32_10([block as u32, (block >> 32) as u32, input, purpose], key);
        let mut lane = (i & 3) as usize;
        while lane < 4 && j < out.len() {
            out[j] = (w[lane] >> 8) as f32 * (1.0 / 16_777_216.0);
            lane += 1;
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random123_known_answers() {
        // Random123 kat_vectors, "philox4x32 10": counter[4] key[2] -> output[4].
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniforms_do_not_depend_on_where_a_run_starts() {
        let key = tensor_key(7, "model.layers.0.mlp.up_proj.weight");
        let mut whole = vec![0f32; 103];
        uniforms(key, 1, PURPOSE_DARE, 5, &mut whole);
        for cut in [0usize, 1, 2, 3, 4, 50, 102] {
            let mut a = vec![0f32; cut];
            let mut b = vec![0f32; 103 - cut];
            uniforms(key, 1, PURPOSE_DARE, 5, &mut a);
            uniforms(key, 1, PURPOSE_DARE, 5 + cut as u64, &mut b);
            a.extend(b);
            assert_eq!(a, whole);
        }
        assert!(whole.iter().all(|&u| (0.0..1.0).contains(&u)));
        // Different inputs, purposes, seeds and names give different draws.
        let mut other = vec![0f32; 103];
        uniforms(key, 2, PURPOSE_DARE, 5, &mut other);
        assert_ne!(other, whole);
        uniforms(key, 1, PURPOSE_DELLA, 5, &mut other);
        assert_ne!(other, whole);
        assert_ne!(tensor_key(8, "a"), tensor_key(7, "a"));
        assert_ne!(tensor_key(7, "b"), tensor_key(7, "a"));
    }

    #[test]
    fn uniform_mean_is_about_one_half() {
        let mut u = vec![0f32; 1 << 16];
        uniforms(tensor_key(0, "x"), 0, PURPOSE_DARE, 0, &mut u);
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / u.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        let kept = u.iter().filter(|&&x| x < 0.3).count() as f64 / u.len() as f64;
        assert!((kept - 0.3).abs() < 0.01, "{kept}");
    }
}
