//! The committed `openapi.json` is the document the broker serves, derived from the
//! handlers and away-model's types. Regenerate it with
//! `AWAY_UPDATE_OPENAPI=1 cargo test -p away-broker --test openapi`.

use std::path::Path;

#[test]
fn committed_openapi_json_is_the_generated_document() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = away_broker::api::openapi_document();
    if std::env::var_os("AWAY_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| committed.lines().count().min(generated.lines().count()) + 1, |i| i + 1);
        panic!(
            "{} differs from the generated document (first at line {line}); regenerate it with \
             `AWAY_UPDATE_OPENAPI=1 cargo test -p away-broker --test openapi` and commit it",
            path.display()
        );
    }
}
