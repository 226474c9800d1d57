//! Replays the image fuzz target's committed inputs (`fuzz/corpus/image_tar`, seeds and
//! what the fuzzer kept; `fuzz/regressions/image_tar`, inputs that once crashed) through
//! the target's own entry point: a reader that panics or hangs on them fails here, in the
//! ordinary `cargo test`. See fuzz/README.md.

use std::path::Path;

use away_image::read::fuzzing::read_image;

#[test]
fn image_tar_corpus_replays() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        for entry in std::fs::read_dir(root.join(dir).join("image_tar")).unwrap() {
            let path = entry.unwrap().path();
            if !path.ends_with(".keep") {
                let _ = read_image(&std::fs::read(&path).unwrap());
                n += 1;
            }
        }
    }
    assert!(n > 0, "no inputs under {}", root.display());
    // the seeds are real images: each reads
    for seed in ["away-oci-and-docker.tar", "docker-20.10-save.tar", "gzipped-save.tar.gz", "podman-oci-zstd.tar"] {
        let bytes = std::fs::read(root.join("corpus/image_tar").join(seed)).unwrap();
        read_image(&bytes).unwrap_or_else(|e| panic!("{seed}: {e}"));
    }
}
