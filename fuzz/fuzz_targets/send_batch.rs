//! Bodies of `POST /v1/send/batch`: see `herald_ingest::fuzzing::send_batch`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_ingest::fuzzing::send_batch(data);
});
