//! A whole PyTorch checkpoint file (ZIP archive, pickle, storages), read from memory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergestream::fuzzing::torch(data));
