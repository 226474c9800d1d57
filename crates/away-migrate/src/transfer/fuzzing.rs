//! Entry points for the fuzz targets (`fuzz/`) and the corpus replay test: the decoders a
//! peer feeds, called as the receiver calls them. Not an API; hidden from the docs.

use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::{payload, wire};

/// Decode `bytes` as a stream of transfer frames, as the receiver reads a connection, and
/// decompress and verify every chunk frame the way the receiver does. Returns how many
/// frames decoded before the first error or the end of the input.
pub fn decode_frames(bytes: &[u8]) -> usize {
    let mut r = bytes;
    let mut frames = 0;
    loop {
        let Ok((frame, wire_len)) = read_frame_now(&mut r) else { return frames };
        assert!(wire_len as usize <= bytes.len(), "a frame cannot be longer than the input");
        frames += 1;
        // The receiver decodes a chunk only against the length its hello announced, which
        // it bounds by MAX_CHUNK_SIZE first.
        if let wire::Frame::Chunk(chunk) = &frame {
            if u64::from(chunk.raw_len) <= wire::MAX_CHUNK_SIZE {
                if let Ok(raw) = payload::decode_chunk(chunk, u64::from(chunk.raw_len)) {
                    assert_eq!(raw.len(), chunk.raw_len as usize, "a verified chunk has its announced length");
                }
            }
        }
        // What is decoded encodes back to a frame the decoder reads again.
        let again = frame.encode();
        if let Err(e) = read_frame_now(&mut &again[..]) {
            panic!("a decoded {} frame does not decode again: {e}", frame.name());
        }
    }
}

/// One frame read from a byte slice, as the receiver reads it with chunks as large as a hello
/// may announce (its largest bound). A slice never waits, so one poll with a no-op waker runs
/// the read to its end.
fn read_frame_now(r: &mut &[u8]) -> std::io::Result<(wire::Frame, u64)> {
    let mut read = pin!(wire::read_frame(r, wire::MAX_CHUNK_SIZE));
    match read.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => panic!("read_frame waited on a byte slice"),
    }
}

/// Unpack `tar` (a payload tar as a receiver spools it) into a fresh directory below
/// `scratch`, as the receiver does. `Err` is the refusal's message. Whatever the input,
/// nothing appears in `scratch` beside the spooled tar and that directory.
pub fn unpack_payload(tar: &[u8], scratch: &Path) -> Result<(), String> {
    let tar_path = scratch.join("payload.tar");
    std::fs::write(&tar_path, tar).map_err(|e| e.to_string())?;
    let result = payload::unpack(&tar_path, &scratch.join("out"), "fuzz").map_err(|e| e.to_string());
    let mut names: Vec<_> =
        std::fs::read_dir(scratch).expect("scratch dir").map(|e| e.expect("entry").file_name()).collect();
    names.sort();
    assert!(names.iter().all(|n| n == "payload.tar" || n == "out"), "unpacking left {names:?} beside its directory");
    result
}
