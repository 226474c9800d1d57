//! A workload spec as a user or the broker's API sends it: YAML or JSON, parsed and validated.
#![no_main]

use away_model::{SpecFormat, WorkloadSpec};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for format in [SpecFormat::Yaml, SpecFormat::Json] {
        if let Ok(spec) = WorkloadSpec::parse(text, format, "<fuzz>") {
            // A valid spec written back as JSON parses to the same spec.
            let json = serde_json::to_string(&spec).expect("a spec serializes");
            let again = WorkloadSpec::parse(&json, SpecFormat::Json, "<fuzz again>").expect("its own JSON is valid");
            assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&spec).unwrap());
        }
    }
});
