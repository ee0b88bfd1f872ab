//! The bytes of a `data.pkl`, run on the pickle machine that executes nothing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergestream::fuzzing::pickle(data));
