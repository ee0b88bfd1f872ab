//! The on-disk formats: safetensors headers, the Hugging Face shard index, and PyTorch
//! checkpoints (`torch`, over `zip` and `pickle`).
//!
//! Everything here parses, validates and writes *metadata*; no tensor data passes through this
//! module, and it knows nothing of merging. Every rule a reader relies on later (offsets in
//! bounds, no overlap, byte length = dtype × shape) is checked here, once, before any data is
//! touched.

pub mod dtype;
pub mod header;
pub mod index;
pub mod pickle;
pub mod torch;
pub mod zip;

pub use dtype::Dtype;
pub use header::{Header, TensorInfo};
pub use index::Index;
