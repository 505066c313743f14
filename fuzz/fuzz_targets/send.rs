//! Bodies of `POST /v1/send`: see `herald_ingest::fuzzing::send`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_ingest::fuzzing::send(data);
});
