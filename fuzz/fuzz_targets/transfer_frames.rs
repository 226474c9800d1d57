//! Transfer frames as a receiver reads them from a peer, chunks decompressed and verified.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    away_migrate::transfer::fuzzing::decode_frames(data);
});
