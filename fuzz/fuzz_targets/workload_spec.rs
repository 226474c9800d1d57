//! A workload spec as a user or the broker's API sends it: YAML or JSON, parsed and validated.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    away_model::fuzzing::parse_spec(data);
});
