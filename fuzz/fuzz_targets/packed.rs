//! A packed shard read whole and by random access, or a safetensors file packed, read back and
//! corrupted.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergestream::fuzzing::packed(data));
