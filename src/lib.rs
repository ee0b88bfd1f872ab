//! mergestream: stream-merge model checkpoints from disk.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod kernel;
