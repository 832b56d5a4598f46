//! Any text in, no panic out: see `policy/src/fuzzing.rs`, which the policy library's unit tests
//! also run on every input of the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ward_policy::fuzzing::parse_compile_decide(data));
