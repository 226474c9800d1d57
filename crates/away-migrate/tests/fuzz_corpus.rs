//! Replays the fuzz targets' committed inputs (`fuzz/corpus`, seeds and what the fuzzers
//! kept; `fuzz/regressions`, inputs that once crashed) through the same entry points as
//! `fuzz/fuzz_targets/`: a decoder that panics, loops or breaks on them fails here, in
//! the ordinary `cargo test`, without nightly or libFuzzer. See fuzz/README.md.

use std::path::{Path, PathBuf};

use away_migrate::transfer::fuzzing::{decode_frames, unpack_payload};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        files.extend(entries.map(|e| e.unwrap().path()).filter(|p| !p.ends_with(".keep")));
    }
    files.sort();
    assert!(!files.is_empty(), "no inputs for {target} under {}", root.display());
    files
}

#[test]
fn transfer_frames_corpus_replays() {
    for path in inputs("transfer_frames") {
        decode_frames(&std::fs::read(&path).unwrap());
    }
    // the seeds decode whole: a decoder that breaks on good frames fails here
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/transfer_frames");
    assert_eq!(decode_frames(&std::fs::read(seeds.join("sender-stream")).unwrap()), 6);
    assert_eq!(decode_frames(&std::fs::read(seeds.join("receiver-stream")).unwrap()), 4);
}

#[test]
fn payload_unpack_corpus_replays() {
    for path in inputs("payload_unpack") {
        let scratch = tempfile::tempdir().unwrap();
        let _ = unpack_payload(&std::fs::read(&path).unwrap(), scratch.path());
    }
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/payload_unpack");
    let scratch = tempfile::tempdir().unwrap();
    unpack_payload(&std::fs::read(seeds.join("checkpoint")).unwrap(), scratch.path()).unwrap();
    assert_eq!(std::fs::read(scratch.path().join("out/checkpoint/pages-1.img")).unwrap(), vec![0; 4096]);
}
