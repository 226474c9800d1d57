//! A payload tar unpacked into a fresh directory, as a receiver does. Whatever the input,
//! nothing may appear outside that directory (checked by the entry point).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let _ = away_migrate::transfer::fuzzing::unpack_payload(data, scratch.path());
});
