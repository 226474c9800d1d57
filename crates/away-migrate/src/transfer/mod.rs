//! The one transfer protocol every migration path uses to move a checkpoint from a source node
//! to a target node: a chunked, compressed, checksummed, resumable stream over plain TCP. No
//! shared storage is needed.
//!
//! * The sender turns the checkpoint directory into a deterministic tar (sorted, owner 0) in a
//!   spool file next to it, so any offset can be re-read when a link is cut, and cuts it into
//!   fixed chunks (1 MiB by default). Each chunk carries its index, raw length and raw SHA-256,
//!   and is compressed on its own; the SHA-256 of the whole stream goes in the hello.
//! * The receiver answers the hello with how many chunks it already holds for that transfer id
//!   (kept in `<spool>/<transfer_id>/`), so a reconnect never resends a verified chunk. Chunks are
//!   pipelined, never acknowledged one by one (one round trip per chunk would cap WAN throughput
//!   at chunk size / RTT); a chunk that fails verification is answered in-band with
//!   `Error { resume_from }` and the sender rewinds to it.
//! * After `Done` the receiver checks the whole SHA-256, unpacks into a fresh owner-only
//!   directory, hands it to the caller's handler (the migration engine restores there) and sends
//!   the handler's [`Verdict`] back on the same connection.
//!
//! The receiver trusts no number and no path from the sender: every frame length is checked
//! against its kind's limit before a buffer is sized (control frames 1 MiB, a chunk the
//! hello's chunk size plus its header, no chunk before a valid hello), the announced payload
//! against [`ReceiveOptions::max_payload_bytes`] and twice its size against the spool disk's
//! free space; the payload unpacks to regular files and directories only, each created
//! beneath its directory (`away_runtime::host::beneath`), and a refused one leaves no spool.
//!
//! What a receiver holds is bounded ([`ReceiveOptions`], the agent's flags): connections at
//! once (one more is refused at accept), the first frame within a handshake timeout, at
//! most N unfinished transfers and M bytes of spool, each transfer reserving twice its
//! announced payload at its hello, before a byte of it is taken. A transfer without a
//! connection for the expiry time is forgotten and its spool removed; at start the
//! receiver takes over the resumable spools an earlier run left and removes the rest
//! (module `registry`).
//!
//! Wire format (module `wire`): frames `[u8 kind][u32 len BE][payload]`. Kinds: 1 hello, 2 resume,
//! 3 chunk, 4 done, 5 verdict, 6 error. Control frames carry JSON; a chunk is binary:
//! `[u64 index BE][u32 raw_len BE][u8 codec 0 none|1 zstd|2 gzip][32 bytes raw SHA-256][data]`.
//!
//! # Choice of compression
//!
//! Measured end to end (tar spool, chunking, compression, wire, verification, unpack, verdict)
//! with `cargo bench -p away-migrate --bench transfer`: a synthetic CRIU-like checkpoint (4 KiB
//! pages: 35 % zero, 25 % random, 40 % text-like; plus small image files and a manifest), 1 MiB
//! chunks, 2 cores, 127.0.0.1 through an in-process token-bucket relay with a one-way delay in
//! each direction and a 200 ms queue. 32 MiB payload on the slow link (to keep the bench short),
//! 128 MiB on the fast one. Effective Mbit/s = raw payload bits / seconds.
//!
//! | link | compression | seconds | bytes raw | bytes on wire | effective Mbit/s | wire/raw |
//! | --- | --- | ---: | ---: | ---: | ---: | ---: |
//! | 37 Mbit/s, 36.784 ms | none | 7.57 | 33590272 | 33592164 | 35.5 | 1.000 |
//! | 37 Mbit/s, 36.784 ms | gzip:1 | 2.99 | 33590272 | 12422753 | 89.9 | 0.370 |
//! | 37 Mbit/s, 36.784 ms | zstd:1 | 2.90 | 33590272 | 12187842 | 92.5 | 0.363 |
//! | 37 Mbit/s, 36.784 ms | zstd:3 | 2.86 | 33590272 | 11729081 | 93.9 | 0.349 |
//! | 37 Mbit/s, 36.784 ms | gzip:6 | 3.14 | 33590272 | 12214357 | 85.6 | 0.364 |
//! | 1 Gbit/s, 0.1 ms | none | 1.63 | 134253568 | 134260262 | 658.2 | 1.000 |
//! | 1 Gbit/s, 0.1 ms | gzip:1 | 2.10 | 134253568 | 50449099 | 511.3 | 0.376 |
//! | 1 Gbit/s, 0.1 ms | zstd:1 | 1.38 | 134253568 | 49527202 | 777.7 | 0.369 |
//! | 1 Gbit/s, 0.1 ms | zstd:3 | 1.66 | 134253568 | 47697040 | 648.0 | 0.355 |
//! | 1 Gbit/s, 0.1 ms | gzip:6 | 10.09 | 134253568 | 49628938 | 106.5 | 0.370 |
//!
//! The default is **zstd level 1**: fastest at 1 Gbit/s (where gzip's CPU cost makes it slower
//! than sending raw) and within 2 % of zstd:3 at 37 Mbit/s, where any compression wins ~2.6x
//! because the link, not the CPU, is the limit. `--compression zstd:3` (or higher) pays off only
//! on links slower than that. The ratio depends on the memory of the workload; these pages are
//! synthetic, not a real CRIU dump.

#[doc(hidden)]
pub mod fuzzing;
mod payload;
mod receive;
mod registry;
mod send;
#[cfg(test)]
mod tls_tests;
mod wire;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use receive::{serve, Authorize, Claim, ReceiveOptions, ReceivedPayload, Receiver, DEFAULT_MAX_PAYLOAD_BYTES};
pub use send::{new_transfer_id, send, send_on, send_spool_prefix, warm_up};

/// How each chunk is compressed on the wire. Parsed from and printed as `none`, `zstd`,
/// `zstd:<1-22>`, `gzip` or `gzip:<0-9>` (the CLI `--compression` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Zstd { level: i32 },
    Gzip { level: u32 },
}

impl Default for Compression {
    /// zstd level 1: see the measurements at the top of this module.
    fn default() -> Self {
        Compression::Zstd { level: 1 }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => write!(f, "none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
            Compression::Gzip { level } => write!(f, "gzip:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = TransferError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || TransferError::InvalidCompression { input: s.to_string() };
        let (name, level) = match s.split_once(':') {
            Some((name, level)) => (name, Some(level)),
            None => (s, None),
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "none" | "off" if level.is_none() => Ok(Compression::None),
            "zstd" => {
                let level = level.map(|l| l.trim().parse::<i32>()).transpose().map_err(|_| invalid())?.unwrap_or(1);
                if !(1..=22).contains(&level) {
                    return Err(invalid());
                }
                Ok(Compression::Zstd { level })
            }
            "gzip" | "gz" => {
                let level = level.map(|l| l.trim().parse::<u32>()).transpose().map_err(|_| invalid())?.unwrap_or(1);
                if level > 9 {
                    return Err(invalid());
                }
                Ok(Compression::Gzip { level })
            }
            _ => Err(invalid()),
        }
    }
}

/// The one-time secret of one move: the target hands it to the source over its
/// authenticated API when the move is announced, the source's hello carries it, and the
/// receiver takes that transfer only with it. Never printed (`Debug` hides it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MoveSecret(String);

impl MoveSecret {
    /// 256 random bits from the OS, hex.
    pub fn generate() -> Result<MoveSecret, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(MoveSecret(payload::hex(&bytes)))
    }

    /// The secret as its holder received it (from the target's API answer).
    pub fn from_string(secret: String) -> MoveSecret {
        MoveSecret(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compared without an early exit on the first differing byte.
    pub fn matches(&self, given: Option<&MoveSecret>) -> bool {
        let Some(given) = given else { return false };
        let (a, b) = (self.0.as_bytes(), given.0.as_bytes());
        !a.is_empty() && a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for MoveSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MoveSecret(<hidden>)")
    }
}

/// The receiving side's answer, produced by its handler after it used the payload (for a
/// migration: after restoring the workload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub ok: bool,
    pub message: String,
    #[serde(default)]
    pub detail: serde_json::Value,
}

impl Verdict {
    pub fn ok(message: impl Into<String>) -> Self {
        Verdict { ok: true, message: message.into(), detail: serde_json::Value::Null }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Verdict { ok: false, message: message.into(), detail: serde_json::Value::Null }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// How far the sender is, for a progress bar. `bytes_sent` counts raw payload bytes and goes back
/// when the sender has to resend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub bytes_sent: u64,
    pub bytes_total: u64,
}

/// Called after every chunk written to the socket.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Faults the sender injects into its own stream, to test the recovery paths end to end.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Flip one byte of this chunk's compressed data after hashing, once.
    pub corrupt_chunk: Option<u64>,
    /// Drop the connection once, right after this many chunks were written.
    pub cut_after_chunks: Option<u64>,
    /// Announce a wrong whole-payload SHA-256 in the hello.
    pub wrong_payload_sha: bool,
}

#[derive(Clone)]
pub struct SendOptions {
    /// Raw bytes per chunk (default 1 MiB; at most 64 MiB).
    pub chunk_size: u64,
    pub compression: Compression,
    /// Per connection attempt.
    pub connect_timeout: Duration,
    /// How long to keep trying to reconnect after the link is cut, before giving up.
    pub reconnect_timeout: Duration,
    /// A write that makes no progress for this long counts as a cut link.
    pub stall_timeout: Duration,
    /// Resends of one chunk after failed verification before giving up.
    pub max_chunk_retries: u32,
    /// Reuse a transfer id to resume a transfer started by an earlier `send` call; random otherwise.
    pub transfer_id: Option<String>,
    /// Where the tar spool goes; default: the directory containing the payload directory.
    pub spool_dir: Option<PathBuf>,
    /// Paths inside the payload directory that stay behind (with what is below them).
    pub exclude: Vec<PathBuf>,
    pub progress: Option<ProgressFn>,
    pub faults: Faults,
    /// How the connection is secured (mutual TLS with node identities, or plaintext).
    pub channels: crate::channel::Channels,
    /// The node the receiver must be (its certificate's name is checked under TLS).
    pub peer_node: String,
    /// The move's one-time secret, from the target's announcement.
    pub secret: Option<MoveSecret>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            chunk_size: 1 << 20,
            compression: Compression::default(),
            connect_timeout: Duration::from_secs(10),
            reconnect_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(60),
            max_chunk_retries: 5,
            transfer_id: None,
            spool_dir: None,
            exclude: Vec::new(),
            progress: None,
            faults: Faults::default(),
            channels: crate::channel::Channels::plaintext(),
            peer_node: String::new(),
            secret: None,
        }
    }
}

impl fmt::Debug for SendOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendOptions")
            .field("chunk_size", &self.chunk_size)
            .field("compression", &self.compression)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect_timeout", &self.reconnect_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("max_chunk_retries", &self.max_chunk_retries)
            .field("transfer_id", &self.transfer_id)
            .field("spool_dir", &self.spool_dir)
            .field("exclude", &self.exclude)
            .field("progress", &self.progress.as_ref().map(|_| "<fn>"))
            .field("faults", &self.faults)
            .field("channels", &self.channels)
            .field("peer_node", &self.peer_node)
            .field("secret", &self.secret)
            .finish()
    }
}

/// What a finished `send` did. The transfer succeeded; whether the target could use the payload is
/// in `verdict`.
#[derive(Debug, Clone)]
pub struct SendOutcome {
    pub transfer_id: String,
    pub verdict: Verdict,
    /// Size of the payload stream (the tar).
    pub bytes_raw: u64,
    /// Everything the sender wrote to sockets, frames and resends included.
    pub bytes_wire: u64,
    pub chunk_count: u64,
    /// Chunk frames written, resends included.
    pub chunks_sent: u64,
    /// Chunks not sent because the receiver already held them, summed over all connections.
    pub chunks_skipped: u64,
    pub elapsed: Duration,
    pub reconnects: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot connect to {peer}")]
    Connect { peer: String, source: io::Error },
    #[error("link to {peer} lost for transfer {transfer_id} and not restored within {waited:?}: {last_error}")]
    LinkLost { peer: String, transfer_id: String, waited: Duration, last_error: String },
    #[error("receiver {peer} failed transfer {transfer_id}: {message}")]
    Remote { peer: String, transfer_id: String, message: String },
    #[error("protocol error with {peer} in transfer {transfer_id}: {message}")]
    Protocol { peer: String, transfer_id: String, message: String },
    #[error("chunk {index} of transfer {transfer_id} failed verification at {peer} {retries} times: {message}")]
    ChunkRetriesExhausted { peer: String, transfer_id: String, index: u64, retries: u32, message: String },
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("payload {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot transfer {path}: only regular files and directories are supported")]
    UnsupportedFile { path: PathBuf },
    #[error("tar entry {entry:?} of transfer {transfer_id} escapes the output directory")]
    PathTraversal { entry: PathBuf, transfer_id: String },
    #[error(
        "tar entry {entry:?} of transfer {transfer_id} is a {kind}: only regular files and directories are accepted"
    )]
    UnsupportedEntry { entry: PathBuf, kind: String, transfer_id: String },
    #[error("invalid compression {input:?}: expected none, zstd[:1-22] or gzip[:0-9]")]
    InvalidCompression { input: String },
    #[error("invalid send options: {message}")]
    InvalidOptions { message: String },
    #[error(transparent)]
    Beneath(#[from] away_runtime::host::beneath::BeneathError),
    #[error("cannot listen on {addr}")]
    Bind { addr: String, source: io::Error },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_parses_and_prints() {
        for (input, want) in [
            ("none", Compression::None),
            ("zstd", Compression::Zstd { level: 1 }),
            ("zstd:3", Compression::Zstd { level: 3 }),
            ("gzip", Compression::Gzip { level: 1 }),
            ("GZIP:6", Compression::Gzip { level: 6 }),
        ] {
            let parsed: Compression = input.parse().unwrap();
            assert_eq!(parsed, want);
            assert_eq!(parsed.to_string().parse::<Compression>().unwrap(), want);
        }
        for bad in ["lz4", "zstd:0", "zstd:x", "gzip:10", "none:1"] {
            let err = bad.parse::<Compression>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
