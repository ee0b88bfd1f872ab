//! Every end-to-end test, in one binary (one link, one process per `cargo test` run), a module
//! per area. The tests run the real `mergestream` binary on generated inputs and check its output
//! with independent readers (the `safetensors` crate, the `half` crate, the Python package).
//!
//! - `common`: running the binary, generating inputs, reading outputs, the ExPO reference;
//! - `expo`, `malformed`, `parts`, `faults`, `memory`, `overlap`, `sweep`, `checkpoints`: the
//!   command line, area by area;
//! - `spec`: merge configs read into specs; `mergekit_ref`, `stats_methods`: the merge methods'
//!   kernels against independent numpy references of mergekit's arithmetic; `methods`: the
//!   statistics methods through the binary (`modelset` generates their model sets);
//! - `verify`: what `verify` reports about damaged outputs, cause by cause;
//! - `pipes`: a closed stdout ends every command quietly;
//! - `python_client`, `slurm`: real clients and a real cluster;
//! - `fuzz_corpus`: the fuzz targets' seed corpus and reproducers.
//!
//! `faults` needs the `failpoints` cargo feature and `fuzz_corpus` the `fuzzing` feature (test
//! hooks kept out of the product); `scripts/test.sh` runs them. `product` checks what a build
//! without those features does with the hooks' environment variables.

mod common;

mod checkpoints;
mod expo;
#[cfg(feature = "failpoints")]
mod faults;
#[cfg(feature = "fuzzing")]
mod fuzz_corpus;
mod malformed;
mod memory;
mod mergekit_ref;
mod methods;
mod modelset;
mod overlap;
mod parts;
mod pipes;
mod product;
mod python_client;
mod slurm;
mod spec;
mod stats_methods;
mod sweep;
mod verify;
