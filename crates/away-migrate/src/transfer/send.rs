//! Sending side: spool the directory as a tar, stream its chunks, reconnect and resume on a cut.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::payload::{self, hex};
use super::wire::{self, ErrorFrame, Frame, Hello, CHUNK_DATA_OFFSET, MAX_CHUNK_SIZE, PROTOCOL_VERSION};
use super::{Progress, SendOptions, SendOutcome, TransferError, Verdict};
use crate::channel::Stream;

type OwnedReadHalf = ReadHalf<Stream>;
type OwnedWriteHalf = WriteHalf<Stream>;

/// Why one connection ended without a verdict.
enum ConnError {
    /// The link broke: reconnect and resume.
    Link(String),
    /// The injected fault cut the link on purpose.
    Cut,
    /// Reconnecting would not help.
    Fatal(TransferError),
}

struct Plan {
    peer: String,
    transfer_id: String,
    spool_path: PathBuf,
    file: Arc<File>,
    total: u64,
    chunk_size: u64,
    chunk_count: u64,
    hello: Hello,
    opts: SendOptions,
}

#[derive(Default)]
struct Counters {
    chunks_sent: u64,
    chunks_skipped: u64,
    bytes_wire: u64,
    reconnects: u32,
    retries: HashMap<u64, u32>,
    cut_done: bool,
    corrupted: bool,
}

/// Sends the directory `dir` to the receiver at `addr` (`host:port`) and returns once the
/// receiver's handler has answered. `meta` travels in the hello, untouched by this layer.
///
/// A cut link is retried with backoff for up to `opts.reconnect_timeout`; the receiver tells how
/// many chunks it already holds, and only the rest is sent again.
pub async fn send(
    addr: &str,
    dir: &Path,
    meta: serde_json::Value,
    opts: &SendOptions,
) -> Result<SendOutcome, TransferError> {
    send_on(addr, None, dir, meta, opts).await
}

/// Write `bytes` of filler on a fresh connection to a receiver, ahead of the hello that
/// [`send_on`] will write on it: the filler keeps the connection busy while the
/// payload is being made (a checkpoint), so TCP's congestion window has grown instead
/// of having idled back (Linux restarts slow start after an idle spell), and a small
/// payload crosses a long path in one round trip instead of two. The receiver answers
/// each filler frame; the sender's reader skips the answers. Returns once the filler is
/// in the socket's buffer.
pub async fn warm_up(stream: &mut Stream, bytes: u32) -> io::Result<()> {
    wire::write_frame(stream, &Frame::WarmUp(bytes)).await.map(|_| ())
}

/// [`send`], its first attempt over `connected` when given: a connection to `addr` opened
/// beforehand (a round trip less where every one counts, as in a lazy move's pause).
pub async fn send_on(
    addr: &str,
    connected: Option<Stream>,
    dir: &Path,
    meta: serde_json::Value,
    opts: &SendOptions,
) -> Result<SendOutcome, TransferError> {
    let started = Instant::now();
    if opts.chunk_size == 0 || opts.chunk_size > MAX_CHUNK_SIZE {
        return Err(TransferError::InvalidOptions {
            message: format!("chunk_size {} must be between 1 and {MAX_CHUNK_SIZE}", opts.chunk_size),
        });
    }
    let transfer_id = match &opts.transfer_id {
        Some(id) if valid_transfer_id(id) => id.clone(),
        Some(id) => {
            return Err(TransferError::InvalidOptions {
                message: format!("transfer_id {id:?} must be 1-64 characters of [A-Za-z0-9_-]"),
            })
        }
        None => new_transfer_id(),
    };
    let spool_parent = opts
        .spool_dir
        .clone()
        .or_else(|| dir.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let dir_owned = dir.to_path_buf();
    let exclude = opts.exclude.clone();
    // named after the move: a source killed while it sends leaves it behind, and its
    // next start removes it by the move's id (`crate::journal::recover`)
    let prefix = send_spool_prefix(&transfer_id);
    let (spool, total, sha) = tokio::task::spawn_blocking(move || {
        let mut spool = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tar")
            .tempfile_in(&spool_parent)
            .map_err(|source| TransferError::Io { path: spool_parent.clone(), source })?;
        let (total, sha) = payload::pack_dir(&dir_owned, &exclude, spool.as_file_mut())?;
        Ok::<_, TransferError>((spool, total, sha))
    })
    .await
    .expect("spooling task panicked")?;
    let spool_path = spool.path().to_path_buf();
    let file = Arc::new(spool.reopen().map_err(|source| TransferError::Io { path: spool_path.clone(), source })?);
    let chunk_count = total.div_ceil(opts.chunk_size);
    let mut sha_hex = hex(&sha);
    if opts.faults.wrong_payload_sha {
        sha_hex = hex(&Sha256::digest(sha_hex.as_bytes()));
    }
    let hello = Hello {
        version: PROTOCOL_VERSION,
        transfer_id: transfer_id.clone(),
        total_bytes: total,
        chunk_size: opts.chunk_size,
        chunk_count,
        compression: opts.compression.to_string(),
        sha256: sha_hex,
        meta,
        secret: opts.secret.clone(),
    };
    let plan = Plan {
        peer: addr.to_string(),
        transfer_id,
        spool_path,
        file,
        total,
        chunk_size: opts.chunk_size,
        chunk_count,
        hello,
        opts: opts.clone(),
    };
    info!(
        peer = %plan.peer, transfer_id = %plan.transfer_id, bytes = total, chunks = chunk_count,
        compression = %opts.compression, dir = %dir.display(), "sending payload"
    );

    let mut c = Counters::default();
    let mut stream = match connected {
        Some(s) => s,
        None => connect(&plan.peer, opts)
            .await
            .map_err(|source| TransferError::Connect { peer: plan.peer.clone(), source })?,
    };
    let verdict = loop {
        match run_connection(stream, &plan, &mut c).await {
            Ok(verdict) => break verdict,
            Err(ConnError::Fatal(e)) => return Err(e),
            Err(ConnError::Cut) => {
                warn!(peer = %plan.peer, transfer_id = %plan.transfer_id, "fault injection: cutting the link");
                stream = reconnect(&plan, "link cut by fault injection".into()).await?;
            }
            Err(ConnError::Link(reason)) => {
                warn!(peer = %plan.peer, transfer_id = %plan.transfer_id, %reason, "link lost, reconnecting");
                stream = reconnect(&plan, reason).await?;
            }
        }
        c.reconnects += 1;
    };
    drop(spool);
    let outcome = SendOutcome {
        transfer_id: plan.transfer_id.clone(),
        verdict,
        bytes_raw: total,
        bytes_wire: c.bytes_wire,
        chunk_count,
        chunks_sent: c.chunks_sent,
        chunks_skipped: c.chunks_skipped,
        elapsed: started.elapsed(),
        reconnects: c.reconnects,
    };
    info!(
        peer = %plan.peer, transfer_id = %plan.transfer_id, ok = outcome.verdict.ok,
        bytes_wire = outcome.bytes_wire, chunks_sent = outcome.chunks_sent,
        chunks_skipped = outcome.chunks_skipped, reconnects = outcome.reconnects,
        elapsed_ms = outcome.elapsed.as_millis() as u64, "transfer finished"
    );
    Ok(outcome)
}

pub(crate) fn valid_transfer_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A fresh random transfer id (a caller that must know the id before it sends picks it
/// here and passes it in [`SendOptions::transfer_id`]).
pub fn new_transfer_id() -> String {
    let mut bytes = [0u8; 16];
    if File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_err() {
        // No urandom: time and pid are unique enough for one node's transfers.
        let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
        bytes.copy_from_slice(&Sha256::digest(seed.as_bytes())[..16]);
    }
    hex(&bytes)
}

/// A connection to the receiver at `peer`, secured as `opts.channels` says (under TLS
/// the receiver must be node `opts.peer_node`), within `opts.connect_timeout`.
pub(crate) async fn connect(peer: &str, opts: &SendOptions) -> io::Result<Stream> {
    connect_within(peer, opts, opts.connect_timeout).await
}

async fn connect_within(peer: &str, opts: &SendOptions, timeout: Duration) -> io::Result<Stream> {
    let open = async {
        let stream = TcpStream::connect(peer).await?;
        // Small control frames must not wait for Nagle.
        stream.set_nodelay(true)?;
        opts.channels.connect(stream, &opts.peer_node).await
    };
    tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {timeout:?}")))?
}

async fn reconnect(plan: &Plan, mut last_error: String) -> Result<Stream, TransferError> {
    let started = Instant::now();
    let deadline = started + plan.opts.reconnect_timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(TransferError::LinkLost {
                peer: plan.peer.clone(),
                transfer_id: plan.transfer_id.clone(),
                waited: started.elapsed(),
                last_error,
            });
        }
        match connect_within(&plan.peer, &plan.opts, plan.opts.connect_timeout.min(deadline - now)).await {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                debug!(peer = %plan.peer, error = %e, "reconnect attempt failed");
                last_error = e.to_string();
            }
        }
        tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn write_timed(wr: &mut OwnedWriteHalf, bytes: &[u8], stall: Duration) -> Result<u64, ConnError> {
    // flushed: TLS holds written records until asked (plain TCP has nothing to flush)
    let write = async {
        wr.write_all(bytes).await?;
        wr.flush().await
    };
    match tokio::time::timeout(stall, write).await {
        Ok(Ok(())) => Ok(bytes.len() as u64),
        Ok(Err(e)) => Err(ConnError::Link(format!("write failed: {e}"))),
        Err(_) => Err(ConnError::Link(format!("no write progress for {stall:?}"))),
    }
}

async fn run_connection(stream: Stream, plan: &Plan, c: &mut Counters) -> Result<Verdict, ConnError> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let stall = plan.opts.stall_timeout;
    c.bytes_wire += write_timed(&mut wr, &Frame::Hello(plan.hello.clone()).encode(), stall).await?;
    if c.reconnects == 0 {
        // A fresh transfer id: the receiver has nothing of it, so the chunks follow the
        // hello at once instead of a round trip later (its answer, "resume from 0", is
        // checked by the reader like any other answer).
        let rewind: Arc<Mutex<Option<(u64, String)>>> = Arc::default();
        let reader = tokio::spawn(read_answers(rd, rewind.clone(), plan.peer.clone(), plan.transfer_id.clone(), true));
        return stream_chunks(wr, reader, rewind, 0, plan, c).await;
    }
    let answer = tokio::time::timeout(stall, wire::read_frame(&mut rd, 0))
        .await
        .map_err(|_| ConnError::Link(format!("no answer to hello within {stall:?}")))?
        .map_err(|e| ConnError::Link(format!("reading the answer to hello: {e}")))?;
    let have = match answer.0 {
        Frame::Resume(r) if r.have <= plan.chunk_count => r.have,
        Frame::Resume(r) => {
            return Err(fatal_protocol(plan, format!("receiver claims {} of {} chunks", r.have, plan.chunk_count)))
        }
        Frame::Error(e) => return Err(fatal_remote(plan, e.message)),
        other => return Err(fatal_protocol(plan, format!("expected resume, got {}", other.name()))),
    };
    c.chunks_skipped += have;
    if have > 0 {
        info!(peer = %plan.peer, transfer_id = %plan.transfer_id, have, of = plan.chunk_count, "receiver resumes");
    }
    let rewind: Arc<Mutex<Option<(u64, String)>>> = Arc::default();
    let reader = tokio::spawn(read_answers(rd, rewind.clone(), plan.peer.clone(), plan.transfer_id.clone(), false));
    stream_chunks(wr, reader, rewind, have, plan, c).await
}

/// Write the chunks from `have` on while `reader` listens for the receiver's answers.
async fn stream_chunks(
    mut wr: OwnedWriteHalf,
    mut reader: JoinHandle<Result<Verdict, ConnError>>,
    rewind: Arc<Mutex<Option<(u64, String)>>>,
    have: u64,
    plan: &Plan,
    c: &mut Counters,
) -> Result<Verdict, ConnError> {
    // (a finished JoinHandle must not be polled again: write_chunks may have taken its result)
    let mut reader_done = false;
    let result = write_chunks(&mut wr, &mut reader, &mut reader_done, &rewind, have, plan, c).await;
    let result = match result {
        // A write error often means the receiver gave up and closed; prefer its reason if it sent one.
        Err(ConnError::Link(reason)) if !reader_done => {
            match tokio::time::timeout(Duration::from_secs(2), &mut reader).await {
                Ok(Ok(Err(ConnError::Fatal(e)))) => Err(ConnError::Fatal(e)),
                Ok(Ok(Ok(verdict))) => Ok(verdict),
                _ => Err(ConnError::Link(reason)),
            }
        }
        other => other,
    };
    reader.abort();
    result
}

fn fatal_protocol(plan: &Plan, message: String) -> ConnError {
    ConnError::Fatal(TransferError::Protocol {
        peer: plan.peer.clone(),
        transfer_id: plan.transfer_id.clone(),
        message,
    })
}

fn fatal_remote(plan: &Plan, message: String) -> ConnError {
    ConnError::Fatal(TransferError::Remote { peer: plan.peer.clone(), transfer_id: plan.transfer_id.clone(), message })
}

/// Reads what the receiver says while chunks stream out: rewind requests go to `rewind`, the
/// verdict or a fatal error ends the task.
async fn read_answers(
    mut rd: OwnedReadHalf,
    rewind: Arc<Mutex<Option<(u64, String)>>>,
    peer: String,
    transfer_id: String,
    mut expect_fresh_resume: bool,
) -> Result<Verdict, ConnError> {
    loop {
        let (frame, _) = wire::read_frame(&mut rd, 0).await.map_err(|e| {
            ConnError::Link(if e.kind() == io::ErrorKind::UnexpectedEof {
                "receiver closed the connection".to_string()
            } else {
                format!("read failed: {e}")
            })
        })?;
        match frame {
            // the answer to a filler written before the hello
            Frame::WarmUp(_) => {}
            Frame::Resume(r) if std::mem::take(&mut expect_fresh_resume) => {
                if r.have != 0 {
                    return Err(ConnError::Fatal(TransferError::Protocol {
                        peer,
                        transfer_id,
                        message: format!("receiver claims {} chunks of a fresh transfer", r.have),
                    }));
                }
            }
            Frame::Verdict(v) => return Ok(v),
            Frame::Error(ErrorFrame { resume_from: Some(index), message }) => {
                *rewind.lock().expect("rewind lock") = Some((index, message));
            }
            Frame::Error(ErrorFrame { resume_from: None, message }) => {
                return Err(ConnError::Fatal(TransferError::Remote { peer, transfer_id, message }))
            }
            other => {
                return Err(ConnError::Fatal(TransferError::Protocol {
                    peer,
                    transfer_id,
                    message: format!("unexpected {} frame from the receiver", other.name()),
                }))
            }
        }
    }
}

fn spawn_prepare(plan: &Plan, index: u64) -> JoinHandle<io::Result<Vec<u8>>> {
    let file = plan.file.clone();
    let offset = index * plan.chunk_size;
    let len = plan.chunk_size.min(plan.total - offset) as usize;
    let compression = plan.opts.compression;
    tokio::task::spawn_blocking(move || {
        let mut raw = vec![0u8; len];
        file.read_exact_at(&mut raw, offset)?;
        payload::encode_chunk(index, &raw, compression)
    })
}

async fn join<T>(handle: &mut JoinHandle<Result<T, ConnError>>) -> Result<T, ConnError> {
    handle.await.unwrap_or_else(|e| Err(ConnError::Link(format!("reader task ended: {e}"))))
}

async fn write_chunks(
    wr: &mut OwnedWriteHalf,
    reader: &mut JoinHandle<Result<Verdict, ConnError>>,
    reader_done: &mut bool,
    rewind: &Mutex<Option<(u64, String)>>,
    have: u64,
    plan: &Plan,
    c: &mut Counters,
) -> Result<Verdict, ConnError> {
    let stall = plan.opts.stall_timeout;
    let mut next = have;
    let mut done_sent = false;
    // Chunk i+1 is read, hashed and compressed while chunk i is on the wire.
    let mut pending: Option<(u64, JoinHandle<io::Result<Vec<u8>>>)> = None;
    loop {
        if reader.is_finished() {
            *reader_done = true;
            return join(reader).await;
        }
        let rewind_to = rewind.lock().expect("rewind lock").take();
        if let Some((from, message)) = rewind_to {
            if from >= plan.chunk_count {
                return Err(fatal_protocol(plan, format!("receiver asked to resume from chunk {from}")));
            }
            let retries = c.retries.entry(from).or_default();
            *retries += 1;
            if *retries > plan.opts.max_chunk_retries {
                return Err(ConnError::Fatal(TransferError::ChunkRetriesExhausted {
                    peer: plan.peer.clone(),
                    transfer_id: plan.transfer_id.clone(),
                    index: from,
                    retries: *retries - 1,
                    message,
                }));
            }
            warn!(peer = %plan.peer, transfer_id = %plan.transfer_id, chunk = from, %message, "receiver rejected a chunk; resending from it");
            next = from;
            done_sent = false;
            pending = None;
        }
        if next >= plan.chunk_count {
            if !done_sent {
                c.bytes_wire += write_timed(wr, &Frame::Done.encode(), stall).await?;
                done_sent = true;
            }
            // The verdict can take as long as the restore; meanwhile watch for rewinds.
            tokio::select! {
                res = &mut *reader => {
                    *reader_done = true;
                    return res.unwrap_or_else(|e| Err(ConnError::Link(format!("reader task ended: {e}"))));
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            continue;
        }
        let prepared = match pending.take() {
            Some((index, handle)) if index == next => handle,
            _ => spawn_prepare(plan, next),
        };
        if next + 1 < plan.chunk_count {
            pending = Some((next + 1, spawn_prepare(plan, next + 1)));
        }
        let mut frame = prepared
            .await
            .expect("chunk task panicked")
            .map_err(|source| ConnError::Fatal(TransferError::Io { path: plan.spool_path.clone(), source }))?;
        if plan.opts.faults.corrupt_chunk == Some(next) && !c.corrupted && frame.len() > CHUNK_DATA_OFFSET {
            c.corrupted = true;
            frame[CHUNK_DATA_OFFSET] ^= 0xff;
        }
        c.bytes_wire += write_timed(wr, &frame, stall).await?;
        c.chunks_sent += 1;
        next += 1;
        if let Some(progress) = &plan.opts.progress {
            progress(Progress { bytes_sent: (next * plan.chunk_size).min(plan.total), bytes_total: plan.total });
        }
        if plan.opts.faults.cut_after_chunks == Some(c.chunks_sent) && !c.cut_done {
            c.cut_done = true;
            return Err(ConnError::Cut);
        }
    }
}

/// The beginning of the name of the tar a sender packs transfer `transfer_id` into (in
/// the payload's parent directory unless `spool_dir` says otherwise).
pub fn send_spool_prefix(transfer_id: &str) -> String {
    format!(".away-send-{transfer_id}-")
}
