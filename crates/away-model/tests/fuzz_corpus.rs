//! Replays the spec fuzz target's committed inputs (`fuzz/corpus/workload_spec`, seeds and
//! what the fuzzer kept; `fuzz/regressions/workload_spec`, inputs that once crashed)
//! through the target's own entry point, in the ordinary `cargo test`. See fuzz/README.md.

use std::path::Path;

use away_model::fuzzing::parse_spec;

#[test]
fn workload_spec_corpus_replays() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        for entry in std::fs::read_dir(root.join(dir).join("workload_spec")).unwrap() {
            let path = entry.unwrap().path();
            if !path.ends_with(".keep") {
                parse_spec(&std::fs::read(&path).unwrap());
                n += 1;
            }
        }
    }
    assert!(n > 0, "no inputs under {}", root.display());
    // the examples are valid specs
    for seed in ["counter.yaml", "memload.yaml", "legacy-vm.json", "every-field.yaml"] {
        let bytes = std::fs::read(root.join("corpus/workload_spec").join(seed)).unwrap();
        assert!(parse_spec(&bytes) >= 1, "{seed} is refused");
    }
}
