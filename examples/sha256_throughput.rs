//! SHA-256 throughput of the `sha2` crate as `--hash-inputs` uses it, one thread, from memory:
//! shows whether the CPU's SHA extensions (SHA-NI) are in use. The crate detects them at run
//! time; to see the portable code's speed on the same machine, force it at build time:
//!
//! ```sh
//! cargo run --release --example sha256_throughput
//! RUSTFLAGS='--cfg sha2_backend="soft"' cargo run --release --example sha256_throughput
//! ```
//!
//! Not a test: it prints a figure and checks nothing beyond the digest of a known input.

use sha2::{Digest, Sha256};

fn main() {
    // FIPS 180-2: one million 'a'.
    let million = Sha256::digest(vec![b'a'; 1_000_000]);
    let hex: String = million.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
    );
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    let sha_ni = std::arch::is_x86_feature_detected!("sha").to_string();
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
    let sha_ni = "n/a (not x86)";
    let block = vec![0x5au8; 1 << 20];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let mut h = Sha256::new();
        for _ in 0..1024 {
            h.update(&block);
        }
        std::hint::black_box(h.finalize());
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!(
        "SHA-256: {:.2} GB/s (best of 3, 1 GiB each); CPU has SHA extensions: {sha_ni}",
        (1u64 << 30) as f64 / best / 1e9
    );
}
