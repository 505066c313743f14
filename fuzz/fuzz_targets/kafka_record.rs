//! Records Kafka producers write to `herald.requests`: see `herald_ingest::fuzzing::kafka_record`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_ingest::fuzzing::kafka_record(data);
});
