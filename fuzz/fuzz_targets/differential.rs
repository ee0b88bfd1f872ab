//! A whole safetensors file, read by mergestream and by the `safetensors` crate, which must
//! agree (up to the differences listed in fuzz/README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergestream::fuzzing::differential(data));
