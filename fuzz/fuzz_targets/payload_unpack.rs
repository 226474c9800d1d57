//! A payload tar unpacked into a fresh directory, as a receiver does. Whatever the input,
//! nothing may appear outside that directory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let _ = away_migrate::transfer::fuzzing::unpack_payload(data, scratch.path());
    let names: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().all(|n| n == "payload.tar" || n == "out"), "unpacking left {names:?} beside its directory");
});
