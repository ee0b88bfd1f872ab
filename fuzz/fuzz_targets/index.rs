//! An index JSON and up to three shards (see `mergestream::fuzzing::index`), opened as a model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergestream::fuzzing::index(data));
