//! Framing on the TCP stream: `[u8 kind][u32 len BE][payload]`.
//!
//! Control frames carry JSON; chunk frames are binary so a 1 MiB chunk costs no encoding:
//! `[u64 index BE][u32 raw_len BE][u8 codec][32 bytes raw SHA-256][data]`.

use std::io;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Verdict;

/// Bumped on any incompatible change of frames or their meaning.
pub(crate) const PROTOCOL_VERSION: u32 = 1;
/// Largest chunk a receiver accepts; bounds memory per connection.
pub(crate) const MAX_CHUNK_SIZE: u64 = 64 << 20;
const FRAME_HEADER: usize = 5;
const CHUNK_HEADER: usize = 8 + 4 + 1 + 32;
/// Largest control frame (hello, resume, verdict, error, warm-up filler): their JSON is a
/// few KiB (a manifest, a verdict), the filler 48 KiB.
const MAX_CONTROL: usize = 1 << 20;

const KIND_HELLO: u8 = 1;
const KIND_RESUME: u8 = 2;
const KIND_CHUNK: u8 = 3;
const KIND_DONE: u8 = 4;
const KIND_VERDICT: u8 = 5;
const KIND_ERROR: u8 = 6;
const KIND_WARM_UP: u8 = 7;

pub(crate) const CODEC_NONE: u8 = 0;
pub(crate) const CODEC_ZSTD: u8 = 1;
pub(crate) const CODEC_GZIP: u8 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Hello {
    pub version: u32,
    pub transfer_id: String,
    pub total_bytes: u64,
    pub chunk_size: u64,
    pub chunk_count: u64,
    pub compression: String,
    /// Hex SHA-256 of the whole payload stream.
    pub sha256: String,
    pub meta: serde_json::Value,
    /// The move's one-time secret (absent from a spool's stored hello).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<super::MoveSecret>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Resume {
    pub have: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ErrorFrame {
    pub message: String,
    /// `Some(i)`: resend from chunk i on this connection; `None`: the transfer failed.
    pub resume_from: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct ChunkFrame {
    pub index: u64,
    pub raw_len: u32,
    pub codec: u8,
    pub sha256: [u8; 32],
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub(crate) enum Frame {
    Hello(Hello),
    Resume(Resume),
    Chunk(ChunkFrame),
    Done,
    Verdict(Verdict),
    Error(ErrorFrame),
    /// Filler of this many bytes before a hello, answered by an empty one: it grows the
    /// connection's congestion window before the payload has to cross it.
    WarmUp(u32),
}

impl Frame {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Resume(_) => "resume",
            Frame::Chunk(_) => "chunk",
            Frame::Done => "done",
            Frame::Verdict(_) => "verdict",
            Frame::Error(_) => "error",
            Frame::WarmUp(_) => "warm-up",
        }
    }

    /// The whole frame as bytes, header included.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (kind, payload) = match self {
            Frame::Hello(h) => (KIND_HELLO, json(h)),
            Frame::Resume(r) => (KIND_RESUME, json(r)),
            Frame::Chunk(c) => return encode_chunk(c.index, c.raw_len, c.codec, &c.sha256, &c.data),
            Frame::Done => (KIND_DONE, Vec::new()),
            Frame::Verdict(v) => (KIND_VERDICT, json(v)),
            Frame::Error(e) => (KIND_ERROR, json(e)),
            Frame::WarmUp(n) => (KIND_WARM_UP, vec![0u8; *n as usize]),
        };
        let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("control frames serialize")
}

/// A chunk frame built in one buffer, so the socket sees one write per chunk.
pub(crate) fn encode_chunk(index: u64, raw_len: u32, codec: u8, sha256: &[u8; 32], data: &[u8]) -> Vec<u8> {
    let len = CHUNK_HEADER + data.len();
    let mut out = Vec::with_capacity(FRAME_HEADER + len);
    out.push(KIND_CHUNK);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&raw_len.to_be_bytes());
    out.push(codec);
    out.extend_from_slice(sha256);
    out.extend_from_slice(data);
    out
}

/// Offset of the compressed data inside an encoded chunk frame (used by fault injection).
pub(crate) const CHUNK_DATA_OFFSET: usize = FRAME_HEADER + CHUNK_HEADER;

pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> io::Result<u64> {
    let bytes = frame.encode();
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(bytes.len() as u64)
}

/// Reads one frame; returns it with its size on the wire. `max_chunk`: the chunk size of
/// the transfer (a chunk is sent raw unless compression made it smaller), 0 where no chunk
/// may come (before a valid hello, at the sender). Every length is checked against its
/// kind's limit before a buffer is sized from it.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max_chunk: u64) -> io::Result<(Frame, u64)> {
    let mut header = [0u8; FRAME_HEADER];
    r.read_exact(&mut header).await?;
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let (name, limit) = match kind {
        KIND_CHUNK if max_chunk == 0 => return Err(invalid("a chunk frame before a valid hello".to_string())),
        KIND_CHUNK => ("chunk", CHUNK_HEADER + max_chunk.min(MAX_CHUNK_SIZE) as usize),
        KIND_HELLO => ("hello", MAX_CONTROL),
        KIND_RESUME => ("resume", MAX_CONTROL),
        KIND_DONE => ("done", 0),
        KIND_VERDICT => ("verdict", MAX_CONTROL),
        KIND_ERROR => ("error", MAX_CONTROL),
        KIND_WARM_UP => ("warm-up", MAX_CONTROL),
        other => return Err(invalid(format!("unknown frame kind {other}"))),
    };
    if len > limit {
        return Err(invalid(format!("{name} frame of {len} bytes exceeds the limit of {limit}")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let wire = (FRAME_HEADER + len) as u64;
    let frame = match kind {
        KIND_HELLO => Frame::Hello(parse(&payload, "hello")?),
        KIND_RESUME => Frame::Resume(parse(&payload, "resume")?),
        KIND_DONE => Frame::Done,
        KIND_VERDICT => Frame::Verdict(parse(&payload, "verdict")?),
        KIND_ERROR => Frame::Error(parse(&payload, "error")?),
        KIND_WARM_UP => Frame::WarmUp(len as u32),
        KIND_CHUNK => {
            if len < CHUNK_HEADER {
                return Err(invalid(format!("chunk frame of {len} bytes is shorter than its header")));
            }
            let index = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
            let raw_len = u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes"));
            let codec = payload[12];
            let sha256: [u8; 32] = payload[13..45].try_into().expect("32 bytes");
            payload.drain(..CHUNK_HEADER);
            Frame::Chunk(ChunkFrame { index, raw_len, codec, sha256, data: payload })
        }
        _ => unreachable!("unknown kinds are refused above"),
    };
    Ok((frame, wire))
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8], what: &str) -> io::Result<T> {
    serde_json::from_slice(payload).map_err(|e| invalid(format!("malformed {what} frame: {e}")))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::Resume(Resume { have: 7 }),
            Frame::Chunk(ChunkFrame {
                index: 3,
                raw_len: 5,
                codec: CODEC_NONE,
                sha256: [9; 32],
                data: b"hello".to_vec(),
            }),
            Frame::Done,
            Frame::Error(ErrorFrame { message: "x".into(), resume_from: Some(2) }),
        ];
        let mut buf = Vec::new();
        for f in &frames {
            write_frame(&mut buf, f).await.unwrap();
        }
        let mut r = &buf[..];
        let (f, _) = read_frame(&mut r, 5).await.unwrap();
        assert!(matches!(f, Frame::Resume(Resume { have: 7 })));
        let (f, wire) = read_frame(&mut r, 5).await.unwrap();
        match f {
            Frame::Chunk(c) => {
                assert_eq!((c.index, c.raw_len, c.codec, c.sha256, &c.data[..]), (3, 5, 0, [9; 32], &b"hello"[..]));
                assert_eq!(wire as usize, CHUNK_DATA_OFFSET + 5);
            }
            other => panic!("expected chunk, got {}", other.name()),
        }
        assert!(matches!(read_frame(&mut r, 5).await.unwrap().0, Frame::Done));
        assert!(matches!(
            read_frame(&mut r, 5).await.unwrap().0,
            Frame::Error(ErrorFrame { resume_from: Some(2), .. })
        ));
    }

    /// Each kind's length is checked before anything is allocated for it (the reader
    /// holds only the 5 header bytes: a too-long frame fails on its length, not on EOF).
    #[tokio::test]
    async fn oversized_frames_are_refused_by_kind() {
        let frame = |kind: u8, len: u32| [vec![kind], len.to_be_bytes().to_vec()].concat();
        let cases = [
            (frame(KIND_CHUNK, u32::MAX), 1 << 20, "chunk frame of 4294967295 bytes"),
            (frame(KIND_CHUNK, (CHUNK_HEADER + 4097) as u32), 4096, "exceeds the limit of 4141"),
            (frame(KIND_CHUNK, 100), 0, "before a valid hello"),
            (frame(KIND_HELLO, 64 << 20), 1 << 20, "hello frame of 67108864 bytes"),
            (frame(KIND_WARM_UP, u32::MAX), 0, "warm-up frame"),
            (frame(KIND_VERDICT, 2 << 20), 0, "verdict frame"),
            (frame(KIND_DONE, 1), 0, "done frame of 1 bytes"),
            (frame(99, 1), 0, "unknown frame kind 99"),
        ];
        for (bytes, max_chunk, want) in cases {
            let err = read_frame(&mut &bytes[..], max_chunk).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{want}: {err}");
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }
}
