//! Every spec in examples/ parses and validates: the examples are what users copy.

use std::path::Path;

use away_model::WorkloadSpec;

#[test]
fn every_example_spec_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            let spec = WorkloadSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!spec.name.is_empty());
            seen += 1;
        }
    }
    assert!(seen >= 4, "expected the example specs in {}", dir.display());
}
