//! A whole safetensors file, parsed and validated from memory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergestream::fuzzing::header(data));
