//! Bodies of `PUT /v1/policy`: see `herald_ingest::fuzzing::policy`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_ingest::fuzzing::policy(data);
});
