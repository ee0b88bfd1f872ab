//! Every end-to-end test, in one binary (one link, one process per `cargo test` run), a module
//! per area. The tests run the real `mergestream` binary on generated inputs and check its output
//! with independent readers (the `safetensors` crate, the `half` crate, the Python package).
//!
//! - `common`: running the binary, generating inputs, reading outputs, the ExPO reference;
//!   `alloc`: a counting allocator, for what one call allocates at most;
//! - `expo`, `malformed`, `parts`, `faults`, `memory`, `overlap`, `sweep`, `checkpoints`: the
//!   command line, area by area;
//! - `card`, `lineage`: the output's model card, subdirectories, and input hashes;
//! - `configs`: merge configs through the binary against the numpy reference, `--check`,
//!   sweeps, staged configs, vocabularies, bad configs;
//! - `spec`: merge configs read into specs; `mergekit_ref`, `stats_methods`: the merge methods'
//!   kernels against independent numpy references of mergekit's arithmetic;
//! - `packed`: the packed format (`pack`/`unpack`, random access, malformed files, bases);
//!   `packed_merge`: merges reading packed models, and `--compress` output, through the binary;
//!   kernels against independent numpy references of mergekit's arithmetic; `methods`: the
//!   statistics methods through the binary (`modelset` generates their model sets);
//! - `verify`: what `verify` reports about damaged outputs, cause by cause;
//! - `pipes`: a closed stdout ends every command quietly;
//! - `python_client`, `slurm`: real clients and a real cluster;
//! - `torch_bin`, `torch_models`: PyTorch checkpoints, read alone and merged as models;
//! - `fuzz_corpus`: the fuzz targets' seed corpus and reproducers.
//!
//! `faults` needs the `failpoints` cargo feature and `fuzz_corpus` the `fuzzing` feature (test
//! hooks kept out of the product); `scripts/test.sh` runs them. `product` checks what a build
//! without those features does with the hooks' environment variables.

mod alloc;
mod common;

mod card;
mod checkpoints;
mod configs;
mod expo;
#[cfg(feature = "failpoints")]
mod faults;
#[cfg(feature = "fuzzing")]
mod fuzz_corpus;
mod lineage;
mod malformed;
mod memory;
mod mergekit_ref;
mod methods;
mod modelset;
mod overlap;
mod packed;
mod packed_merge;
mod parts;
mod pipes;
mod product;
mod python_client;
mod slurm;
mod spec;
mod stats_methods;
mod sweep;
mod torch_bin;
mod torch_models;
mod torch_order;
mod verify;
