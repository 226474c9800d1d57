//! An image tar (docker-archive, OCI layout, or both; plain, gzip'd or zstd'd) read from
//! bytes, within small limits so that a bomb is found quickly.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = away_image::read::fuzzing::read_image(data);
});
