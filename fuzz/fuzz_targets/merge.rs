//! Eight parameter bytes and a safetensors file, merged with a file derived from it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergestream::fuzzing::merge(data));
