//! Entry point for the spec fuzz target (`fuzz/`) and its corpus replay; not an API.

use crate::{SpecFormat, WorkloadSpec};

/// Parse `bytes` as a YAML and as a JSON spec, as the CLI and the broker's API do. A
/// spec that passes validation must survive its own JSON: the broker stores and
/// forwards specs as JSON. Returns how many of the two formats accepted it.
pub fn parse_spec(bytes: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(bytes) else { return 0 };
    let mut accepted = 0;
    for format in [SpecFormat::Yaml, SpecFormat::Json] {
        let Ok(spec) = WorkloadSpec::parse(text, format, "<fuzz input>") else { continue };
        accepted += 1;
        let json = serde_json::to_string(&spec).expect("a spec serializes");
        let again = WorkloadSpec::parse(&json, SpecFormat::Json, "<its JSON>")
            .unwrap_or_else(|e| panic!("a valid spec's own JSON is refused: {e}\n{json}"));
        assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&spec).unwrap(), "{json}");
    }
    accepted
}
