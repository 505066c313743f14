//! The template renderer with hostile templates and variables: see
//! `herald_core::fuzzing::template`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_core::fuzzing::template(data);
});
