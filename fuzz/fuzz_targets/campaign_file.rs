//! Receiver files of `POST /v1/campaigns`, uploaded in frames: see
//! `herald_ingest::fuzzing::campaign_file`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_ingest::fuzzing::campaign_file(data);
});
