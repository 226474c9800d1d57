//! Receiving side: verify and spool chunks per transfer id, resume where a cut link left off,
//! unpack, hand the payload to the caller and send its verdict back.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use super::payload::{self, hex};
use super::registry::{self, Limits, Registry};
use super::send::valid_transfer_id;
use super::wire::{self, ChunkFrame, ErrorFrame, Frame, Hello, Resume, MAX_CHUNK_SIZE, PROTOCOL_VERSION};
use super::{MoveSecret, TransferError, Verdict};
use crate::channel::{Channels, Stream};

/// What a sender claims at its hello, for the receiver's [`Authorize`] check.
pub struct Claim<'a> {
    pub transfer_id: &'a str,
    pub secret: Option<&'a MoveSecret>,
    /// The sender's certificate chain, verified against the CA by the TLS handshake
    /// (empty on a plaintext channel).
    pub peer_certs: &'a [rustls::pki_types::CertificateDer<'static>],
    pub peer: SocketAddr,
}

/// Decides whether a hello may start (or resume) its transfer; an `Err` is the message
/// sent back, and nothing of that transfer is spooled.
pub type Authorize = Arc<dyn Fn(&Claim<'_>) -> Result<(), String> + Send + Sync>;

/// Rejected chunks per connection before the receiver gives up on the sender.
const MAX_REJECTIONS: u32 = 16;
/// Warm-up frames a connection may send before its hello (senders send one).
const MAX_WARM_UPS: u32 = 4;
/// How long a connection refused before its transfer began is drained (so that the error
/// frame reaches the sender) before it closes.
const EARLY_DRAIN: Duration = Duration::from_secs(1);
/// Sync the spool and record progress at least this often (chunks / time), so a receiver
/// restart loses little, without one fsync per chunk.
const SYNC_EVERY_CHUNKS: u32 = 32;
const SYNC_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// A connection silent for this long while chunks are expected is dropped.
    pub idle_timeout: Duration,
    /// How long a reconnecting sender waits for its previous connection to wind down before
    /// taking the transfer over.
    pub takeover_wait: Duration,
    /// Largest payload a sender may announce; a hello above it is refused before any spool
    /// is made. Whatever this says, the spool's disk must also hold the payload twice (the
    /// stream and its unpacked copy).
    pub max_payload_bytes: u64,
    /// Connections open at once, those still in their handshake included; one more is
    /// answered with an error and closed at once.
    pub max_connections: usize,
    /// Transfers unfinished at once: admitted by their hello and without a verdict yet,
    /// whether their sender is connected or their spool waits for it to come back. A hello
    /// for one more is refused ("receiver busy").
    pub max_transfers: usize,
    /// Bytes the spools may hold together. Each transfer reserves twice its announced
    /// payload (the stream and its unpacked copy) at its hello, which is refused when the
    /// reservation does not fit ("receiver spool full").
    pub max_spool_bytes: u64,
    /// From accepting a connection to its first frame (a hello or a warm-up). A warm-up's
    /// hello then follows within `idle_timeout` (the sender checkpoints in between).
    pub handshake_timeout: Duration,
    /// A transfer with no connection for this long is forgotten and its spool removed
    /// (spools an earlier run left too, counted from when they were last written).
    pub expire_after: Duration,
}

/// Default [`ReceiveOptions::max_payload_bytes`]: a checkpoint holds a workload's memory
/// and rootfs changes; 64 GiB is more than any node here runs.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 64 << 30;

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            idle_timeout: Duration::from_secs(300),
            takeover_wait: Duration::from_secs(3),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_connections: 64,
            max_transfers: 16,
            // the largest payload, twice
            max_spool_bytes: 2 * DEFAULT_MAX_PAYLOAD_BYTES,
            handshake_timeout: Duration::from_secs(10),
            expire_after: Duration::from_secs(600),
        }
    }
}

/// A complete, verified payload, unpacked. `dir` (owner-only) is removed after the handler
/// returns an ok verdict, so a handler that needs the files later moves them; on a failed verdict
/// it is kept for inspection.
#[derive(Debug, Clone)]
pub struct ReceivedPayload {
    pub transfer_id: String,
    pub dir: PathBuf,
    pub meta: serde_json::Value,
    pub peer: SocketAddr,
    pub bytes_raw: u64,
    /// Frame bytes received for this transfer, over all connections.
    pub bytes_wire: u64,
}

pub struct Receiver {
    listener: TcpListener,
    spool: PathBuf,
    options: ReceiveOptions,
    channels: watch::Receiver<Channels>,
    authorize: Option<Authorize>,
}

impl Receiver {
    pub async fn bind(addr: &str, spool_dir: impl Into<PathBuf>) -> Result<Self, TransferError> {
        let listener =
            TcpListener::bind(addr).await.map_err(|source| TransferError::Bind { addr: addr.to_string(), source })?;
        Ok(Receiver::from_listener(listener, spool_dir))
    }

    pub fn from_listener(listener: TcpListener, spool_dir: impl Into<PathBuf>) -> Self {
        Receiver {
            listener,
            spool: spool_dir.into(),
            options: ReceiveOptions::default(),
            channels: watch::channel(Channels::plaintext()).1,
            authorize: None,
        }
    }

    /// Secure every connection as `channels` says (mutual TLS: the handshake runs within
    /// [`ReceiveOptions::handshake_timeout`], before any frame is read).
    pub fn with_channels(mut self, channels: Channels) -> Self {
        self.channels = watch::channel(channels).1;
        self
    }

    /// [`Receiver::with_channels`] as `channels` holds them when a connection is accepted
    /// (a node that gets its identity while it runs secures the next connections with it).
    pub fn with_channels_from(mut self, channels: watch::Receiver<Channels>) -> Self {
        self.channels = channels;
        self
    }

    /// Take a transfer only when `authorize` agrees to its hello (without one: every
    /// well-formed hello, for tests and benchmarks).
    pub fn with_authorizer(mut self, authorize: Authorize) -> Self {
        self.authorize = Some(authorize);
        self
    }

    pub fn with_options(mut self, options: ReceiveOptions) -> Self {
        self.options = options;
        self
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts senders forever, each connection in its own task. `handler` gets every complete
    /// payload and answers with the verdict sent back to the sender. First takes over what
    /// an earlier run left in the spool directory (see [`ReceiveOptions::expire_after`]).
    pub async fn serve<H, F>(self, handler: H) -> Result<(), TransferError>
    where
        H: Fn(ReceivedPayload) -> F + Send + Sync + 'static,
        F: Future<Output = Verdict> + Send + 'static,
    {
        self.serve_until(handler, std::future::pending()).await.map(|_| ())
    }

    /// [`Receiver::serve`] until `stop` resolves; then no connection is accepted, transfers
    /// still receiving chunks end (their spools synced: the sender resumes them from a
    /// receiver started again), and those whose handler runs are waited for, up to a
    /// minute. Returns how many connections were still open after that.
    pub async fn serve_until<H, F>(
        self,
        handler: H,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<usize, TransferError>
    where
        H: Fn(ReceivedPayload) -> F + Send + Sync + 'static,
        F: Future<Output = Verdict> + Send + 'static,
    {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.spool)
            .map_err(|source| TransferError::Io { path: self.spool.clone(), source })?;
        let o = &self.options;
        let limits = Limits { max_transfers: o.max_transfers.max(1), max_spool_bytes: o.max_spool_bytes };
        let registry = Arc::new(Registry::new(self.spool.clone(), limits));
        let (adopted, removed) = {
            let (registry, expire_after) = (registry.clone(), o.expire_after);
            tokio::task::spawn_blocking(move || registry.adopt_leftovers(expire_after))
                .await
                .expect("spool scan panicked")
        };
        registry::log_removed(&removed, "left by an earlier run and expired, or incomplete");
        if !adopted.is_empty() || !removed.is_empty() {
            info!(adopted = adopted.len(), removed = removed.len(), spool = %self.spool.display(), "spools of an earlier run: the adopted ones wait for their senders");
        }
        let ctx = Arc::new(Ctx {
            spool: self.spool,
            connections: Arc::new(Semaphore::new(self.options.max_connections.max(1))),
            options: self.options,
            channels: self.channels,
            authorize: self.authorize,
            registry,
            dropped: AtomicU64::new(0),
            stopping: watch::channel(false).0,
            handler,
        });
        let _sweeper = AbortOnDrop(tokio::spawn(sweep(ctx.clone())));
        info!(
            addr = ?self.listener.local_addr().ok(), spool = %ctx.spool.display(),
            max_connections = ctx.options.max_connections, max_transfers = ctx.options.max_transfers,
            max_spool_bytes = ctx.options.max_spool_bytes, max_payload_bytes = ctx.options.max_payload_bytes,
            "receiving transfers"
        );
        let mut stop = std::pin::pin!(stop);
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = &mut stop => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = ctx.connections.clone().try_acquire_owned() else {
                        refuse_busy(stream, peer, &ctx);
                        continue;
                    };
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle_connection(stream, peer, &ctx).await {
                            use io::ErrorKind::{InvalidData, TimedOut, UnexpectedEof};
                            if matches!(e.kind(), InvalidData | TimedOut | UnexpectedEof) {
                                // garbage, silence or a hang-up: counted, summed up by the
                                // sweeper (a flood must not flood the log too)
                                ctx.dropped.fetch_add(1, Ordering::Relaxed);
                                debug!(%peer, error = %e, "transfer connection dropped");
                            } else {
                                warn!(%peer, error = %e, "transfer connection ended with an error");
                            }
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(self.listener);
        ctx.stopping.send_replace(true);
        let all = ctx.options.max_connections.max(1);
        let open = all - ctx.connections.available_permits();
        if open > 0 {
            info!(open, "receiver stopping: cutting transfers between chunks, waiting for restores under way");
        }
        let permits = u32::try_from(all).unwrap_or(u32::MAX);
        let drain = STOP_DRAIN;
        if tokio::time::timeout(drain, ctx.connections.acquire_many(permits)).await.is_err() {
            let open = all - ctx.connections.available_permits();
            warn!(open, "receiver stopped with {open} connections still busy after {drain:?} (their restores end with the process)");
            return Ok(open);
        }
        Ok(0)
    }
}

/// How long a stopping receiver waits for the handlers (restores) under way.
const STOP_DRAIN: Duration = Duration::from_secs(60);

/// `fut`, or None once the receiver stops.
async fn unless_stopping<T>(stopping: &mut watch::Receiver<bool>, fut: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        r = fut => Some(r),
        _ = stopping.wait_for(|s| *s) => None,
    }
}

/// [`Receiver::serve`] on an existing listener.
pub async fn serve<H, F>(listener: TcpListener, spool_dir: impl Into<PathBuf>, handler: H) -> Result<(), TransferError>
where
    H: Fn(ReceivedPayload) -> F + Send + Sync + 'static,
    F: Future<Output = Verdict> + Send + 'static,
{
    Receiver::from_listener(listener, spool_dir).serve(handler).await
}

struct Ctx<H> {
    spool: PathBuf,
    options: ReceiveOptions,
    channels: watch::Receiver<Channels>,
    authorize: Option<Authorize>,
    registry: Arc<Registry>,
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    /// Connections refused or dropped (garbage, silence, over the limit) since the last sweep.
    dropped: AtomicU64,
    /// True once the receiver stops: connections end at their next read.
    stopping: watch::Sender<bool>,
    handler: H,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Over [`ReceiveOptions::max_connections`]: an error frame if the socket takes it at
/// once (a fresh socket's buffer does), then the connection closes. No task, no wait: a
/// flood costs nothing beyond the accept.
fn refuse_busy<H>(stream: TcpStream, peer: SocketAddr, ctx: &Ctx<H>) {
    ctx.dropped.fetch_add(1, Ordering::Relaxed);
    let message = format!(
        "receiver busy: {} connections open, its limit (agent --max-transfer-connections)",
        ctx.options.max_connections
    );
    debug!(%peer, %message, "refusing a transfer connection");
    if ctx.channels.borrow().is_tls() {
        // nothing is said outside TLS: the connection just closes
        return;
    }
    let _ = stream.try_write(&Frame::Error(ErrorFrame { message, resume_from: None }).encode());
}

/// Every so often: forget transfers idle past [`ReceiveOptions::expire_after`] (their
/// spools go), and sum up the connections dropped meanwhile.
async fn sweep<H>(ctx: Arc<Ctx<H>>)
where
    H: Send + Sync + 'static,
{
    let expire_after = ctx.options.expire_after;
    let every = (expire_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let registry = ctx.registry.clone();
        let removed =
            tokio::task::spawn_blocking(move || registry.sweep(expire_after)).await.expect("spool sweep panicked");
        let why = format!("no connection for {} s", expire_after.as_secs());
        registry::log_removed(&removed, &why);
        let dropped = ctx.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let stats = ctx.registry.stats();
            warn!(
                dropped, unfinished = stats.unfinished, reserved_bytes = stats.reserved_bytes, known = stats.known,
                "transfer connections refused or dropped in the last {every:?} (over the limit, garbage, or silent past the handshake timeout)"
            );
        }
    }
}

/// Everything known about one transfer id. Connections come and go; the newest one owns it.
#[derive(Default)]
pub(super) struct Slot {
    generation: u64,
    active: bool,
    pub(super) phase: Phase,
    spool: Option<Spool>,
    bytes_wire: u64,
}

#[derive(Default, Clone)]
pub(super) enum Phase {
    #[default]
    Receiving,
    /// Unpacking or in the handler.
    Finishing,
    /// Kept so that a sender reconnecting after the verdict was lost gets it again, and the
    /// handler (a restore) never runs twice.
    Finished(Verdict),
}

struct Spool {
    dir: PathBuf,
    data_path: PathBuf,
    data: File,
    hello: Hello,
    have: u64,
    hasher: Sha256,
    unsynced: u32,
    last_sync: Instant,
}

#[derive(Serialize, Deserialize)]
pub(super) struct ProgressFile {
    pub transfer_id: String,
    pub total_bytes: u64,
    pub chunk_size: u64,
    pub chunk_count: u64,
    pub sha256: String,
    /// Chunks verified and synced to `payload.tar`.
    pub have: u64,
}

fn same_payload(a: &Hello, b: &Hello) -> bool {
    (a.total_bytes, a.chunk_size, a.chunk_count, &a.sha256) == (b.total_bytes, b.chunk_size, b.chunk_count, &b.sha256)
}

fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) || e.raw_os_error() == Some(28)
}

fn describe_io(what: &str, path: &Path, e: &io::Error) -> String {
    if is_disk_full(e) {
        format!("target disk full: cannot {what} {}: {e}", path.display())
    } else {
        format!("cannot {what} {}: {e}", path.display())
    }
}

impl Spool {
    /// Opens the spool of a transfer, keeping what an earlier connection or process verified.
    fn open(root: &Path, hello: &Hello) -> Result<Spool, String> {
        let dir = root.join(&hello.transfer_id);
        let fresh = !dir.exists();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| describe_io("create", &dir, &e))?;
        let data_path = dir.join("payload.tar");
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&data_path)
            .map_err(|e| describe_io("open", &data_path, &e))?;
        let len = data.metadata().map_err(|e| describe_io("stat", &data_path, &e))?.len();
        let mut have = 0;
        if let Ok(bytes) = fs::read(dir.join("progress.json")) {
            if let Ok(p) = serde_json::from_slice::<ProgressFile>(&bytes) {
                let matches = (p.total_bytes, p.chunk_size, p.chunk_count, &p.sha256)
                    == (hello.total_bytes, hello.chunk_size, hello.chunk_count, &hello.sha256);
                if matches {
                    let held = if len >= hello.total_bytes { hello.chunk_count } else { len / hello.chunk_size };
                    have = p.have.min(held);
                }
            }
        }
        let keep = (have * hello.chunk_size).min(hello.total_bytes);
        // the rest of the stream and its unpacked copy must fit, known before a byte comes
        let need = (hello.total_bytes - keep).saturating_add(hello.total_bytes);
        let free =
            away_runtime::host::beneath::Beneath::open(&dir).and_then(|d| d.free_bytes()).map_err(|e| e.to_string())?;
        if need > free {
            if fresh {
                let _ = fs::remove_dir_all(&dir);
            }
            return Err(format!(
                "target disk full: transfer {} needs {need} more bytes in {}, {free} are free",
                hello.transfer_id,
                dir.display()
            ));
        }
        data.set_len(keep).map_err(|e| describe_io("truncate", &data_path, &e))?;
        // The whole-payload hash continues from the bytes already held.
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < keep {
            let n = (keep - offset).min(buf.len() as u64) as usize;
            data.read_exact_at(&mut buf[..n], offset).map_err(|e| describe_io("read", &data_path, &e))?;
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(Spool { dir, data_path, data, hello: hello.clone(), have, hasher, unsynced: 0, last_sync: Instant::now() })
    }

    fn append(&mut self, raw: &[u8]) -> io::Result<()> {
        self.data.write_all_at(raw, self.have * self.hello.chunk_size)?;
        self.hasher.update(raw);
        self.have += 1;
        self.unsynced += 1;
        if self.unsynced >= SYNC_EVERY_CHUNKS || self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    /// Data first, then the progress file that vouches for it.
    fn sync(&mut self) -> io::Result<()> {
        self.data.sync_data()?;
        let progress = ProgressFile {
            transfer_id: self.hello.transfer_id.clone(),
            total_bytes: self.hello.total_bytes,
            chunk_size: self.hello.chunk_size,
            chunk_count: self.hello.chunk_count,
            sha256: self.hello.sha256.clone(),
            have: self.have,
        };
        let tmp = self.dir.join("progress.json.tmp");
        fs::write(&tmp, serde_json::to_vec(&progress).expect("progress serializes"))?;
        fs::rename(&tmp, self.dir.join("progress.json"))?;
        self.unsynced = 0;
        self.last_sync = Instant::now();
        Ok(())
    }
}

/// Clears `active` when a connection ends, unless a newer one took over.
struct ActiveGuard {
    slot: Arc<Mutex<Slot>>,
    generation: u64,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut slot = self.slot.lock().expect("slot lock");
        if slot.generation == self.generation {
            slot.active = false;
            if let Some(spool) = slot.spool.as_mut() {
                if spool.unsynced > 0 {
                    let _ = spool.sync();
                }
            }
        }
    }
}

fn validate_hello(hello: &Hello, max_payload_bytes: u64) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} not supported (this receiver speaks {PROTOCOL_VERSION})",
            hello.version
        ));
    }
    if !valid_transfer_id(&hello.transfer_id) {
        return Err(format!("transfer id {:?} must be 1-64 characters of [A-Za-z0-9_-]", hello.transfer_id));
    }
    if hello.chunk_size == 0 || hello.chunk_size > MAX_CHUNK_SIZE {
        return Err(format!("chunk size {} must be between 1 and {MAX_CHUNK_SIZE}", hello.chunk_size));
    }
    if hello.total_bytes > max_payload_bytes {
        return Err(format!(
            "payload of {} bytes exceeds this receiver's limit of {max_payload_bytes} bytes",
            hello.total_bytes
        ));
    }
    if hello.chunk_count != hello.total_bytes.div_ceil(hello.chunk_size) {
        return Err(format!(
            "{} chunks of {} bytes cannot hold {} bytes",
            hello.chunk_count, hello.chunk_size, hello.total_bytes
        ));
    }
    if hello.sha256.len() != 64 || !hello.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("payload sha256 {:?} is not 64 hex digits", hello.sha256));
    }
    Ok(())
}

async fn send_frame(stream: &mut Stream, frame: &Frame) -> io::Result<()> {
    wire::write_frame(stream, frame).await.map(|_| ())
}

/// Sends a fatal error, then drains until the sender hangs up: closing with unread data would
/// reset the connection and could destroy the error frame before the sender reads it.
async fn fail(stream: &mut Stream, message: String) -> io::Result<()> {
    fail_within(stream, message, Duration::from_secs(5)).await
}

/// [`fail`], draining for at most `drain`.
async fn fail_within(stream: &mut Stream, message: String, drain: Duration) -> io::Result<()> {
    tokio::time::timeout(drain, send_frame(stream, &Frame::Error(ErrorFrame { message, resume_from: None })))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the sender does not read"))??;
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 64 << 10];
    let _ = tokio::time::timeout(drain, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

enum Stored {
    Yes,
    Corrupt(String),
    Superseded,
    WriteFailed(String),
}

async fn handle_connection<H, F>(tcp: TcpStream, peer: SocketAddr, ctx: &Arc<Ctx<H>>) -> io::Result<()>
where
    H: Fn(ReceivedPayload) -> F + Send + Sync + 'static,
    F: Future<Output = Verdict> + Send + 'static,
{
    tcp.set_nodelay(true)?;
    let (idle, handshake) = (ctx.options.idle_timeout, ctx.options.handshake_timeout);
    let silent = |t: Duration| io::Error::new(io::ErrorKind::TimedOut, format!("sender silent for {t:?}"));
    // the TLS handshake and the first frame come at once, or the connection goes: idle
    // and garbage connections must not hold on to the receiver's connection slots
    let mut stopping = ctx.stopping.subscribe();
    let opened = Instant::now();
    let channels = ctx.channels.borrow().clone();
    let Some(accepted) = unless_stopping(&mut stopping, channels.accept(tcp, handshake)).await else {
        return Ok(());
    };
    let (mut stream, peer_certs) = accepted?;
    let first = tokio::time::timeout(handshake.saturating_sub(opened.elapsed()), wire::read_frame(&mut stream, 0));
    let Some(first) = unless_stopping(&mut stopping, first).await else { return Ok(()) };
    let (mut frame, mut hello_wire) = first.map_err(|_| silent(handshake))??;
    let mut warm_ups = 0;
    while let Frame::WarmUp(_) = frame {
        // a sender warming the connection up before its pause: answer, wait for the hello
        // (it comes once the checkpoint is made)
        warm_ups += 1;
        if warm_ups > MAX_WARM_UPS {
            return fail_within(&mut stream, format!("more than {MAX_WARM_UPS} warm-up frames"), EARLY_DRAIN).await;
        }
        wire::write_frame(&mut stream, &Frame::WarmUp(0)).await?;
        let next = tokio::time::timeout(idle, wire::read_frame(&mut stream, 0));
        let Some(next) = unless_stopping(&mut stopping, next).await else { return Ok(()) };
        (frame, hello_wire) = next.map_err(|_| silent(idle))??;
    }
    let mut hello = match frame {
        Frame::Hello(h) => h,
        other => return fail_within(&mut stream, format!("expected hello, got {}", other.name()), EARLY_DRAIN).await,
    };
    if let Err(message) = validate_hello(&hello, ctx.options.max_payload_bytes) {
        return fail_within(&mut stream, message, EARLY_DRAIN).await;
    }
    let id = hello.transfer_id.clone();
    if let Some(authorize) = &ctx.authorize {
        let claim = Claim { transfer_id: &id, secret: hello.secret.as_ref(), peer_certs: &peer_certs, peer };
        if let Err(message) = authorize(&claim) {
            warn!(%peer, transfer_id = %id, %message, "transfer refused: not authorized");
            return fail_within(&mut stream, message, EARLY_DRAIN).await;
        }
    }
    // checked: the secret goes no further (not into the spool's state)
    hello.secret = None;
    let admission = match ctx.registry.admit(&hello) {
        Ok(admission) => admission,
        Err(message) => {
            info!(%peer, transfer_id = %id, bytes = hello.total_bytes, %message, "transfer refused");
            return fail_within(&mut stream, message, EARLY_DRAIN).await;
        }
    };
    let slot = admission.slot.clone();
    let timed_out = || silent(idle);

    // Let the previous connection of this transfer store what it already received.
    let wait_until = Instant::now() + ctx.options.takeover_wait;
    while slot.lock().expect("slot lock").active && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (generation, have) = {
        let slot = slot.clone();
        let root = ctx.spool.clone();
        let hello = hello.clone();
        tokio::task::spawn_blocking(move || {
            let mut s = slot.lock().expect("slot lock");
            s.generation += 1;
            s.active = true;
            s.bytes_wire += hello_wire;
            let generation = s.generation;
            if !matches!(s.phase, Phase::Receiving) {
                return Ok((generation, hello.chunk_count));
            }
            let reuse = s.spool.as_ref().is_some_and(|sp| same_payload(&sp.hello, &hello));
            if !reuse {
                s.spool = Some(Spool::open(&root, &hello)?);
            }
            let have = s.spool.as_ref().map_or(0, |sp| sp.have);
            Ok::<_, String>((generation, have))
        })
        .await
        .expect("spool task panicked")
    }
    .map_err(|e| e.to_string())
    .map_or_else(|e| (0, Err(e)), |(g, h)| (g, Ok(h)));
    let _guard = ActiveGuard { slot: slot.clone(), generation };
    let have = match have {
        Ok(have) => have,
        Err(message) => {
            warn!(%peer, transfer_id = %id, %message, "cannot prepare spool");
            if !ctx.spool.join(&id).exists() {
                ctx.registry.spool_gone(&id);
            }
            return fail(&mut stream, message).await;
        }
    };
    info!(%peer, transfer_id = %id, have, of = hello.chunk_count, bytes = hello.total_bytes, "transfer connection");
    send_frame(&mut stream, &Frame::Resume(Resume { have })).await?;

    let mut expected = have;
    let mut resyncing = false;
    let mut rejections = 0u32;
    loop {
        let read = tokio::time::timeout(idle, wire::read_frame(&mut stream, hello.chunk_size));
        let Some(read) = unless_stopping(&mut stopping, read).await else {
            info!(%peer, transfer_id = %id, have = expected, "receiver stopping: the transfer's spool stays for its sender to resume");
            return Ok(());
        };
        let (frame, wire_len) = match read {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                debug!(%peer, transfer_id = %id, expected, "sender closed the connection");
                return Ok(());
            }
            Ok(r) => r?,
        };
        slot.lock().expect("slot lock").bytes_wire += wire_len;
        match frame {
            Frame::Chunk(chunk) if chunk.index == expected && expected < hello.chunk_count => {
                match store_chunk(&slot, generation, chunk).await {
                    Stored::Yes => {
                        expected += 1;
                        resyncing = false;
                    }
                    Stored::Superseded => {
                        debug!(%peer, transfer_id = %id, "a newer connection took over");
                        return Ok(());
                    }
                    Stored::WriteFailed(message) => {
                        warn!(%peer, transfer_id = %id, %message, "cannot store chunk");
                        return fail(&mut stream, message).await;
                    }
                    Stored::Corrupt(reason) => {
                        rejections += 1;
                        let message = format!("chunk {expected} of transfer {id} failed verification: {reason}");
                        warn!(%peer, %message, "rejecting chunk");
                        if rejections > MAX_REJECTIONS {
                            return fail(&mut stream, format!("{message}; {MAX_REJECTIONS} rejections, giving up"))
                                .await;
                        }
                        resyncing = true;
                        let frame = Frame::Error(ErrorFrame { message, resume_from: Some(expected) });
                        send_frame(&mut stream, &frame).await?;
                    }
                }
            }
            // Chunks already in flight behind a rejected one: the sender is rewinding.
            Frame::Chunk(_) | Frame::Done if resyncing => {}
            Frame::Done if expected == hello.chunk_count => {
                return finish(&mut stream, peer, ctx, &slot, generation, hello).await;
            }
            Frame::Chunk(c) => {
                let message = format!("chunk {} of transfer {id} out of order (expected {expected})", c.index);
                return fail(&mut stream, message).await;
            }
            other => {
                let message = format!("unexpected {} frame in transfer {id} at chunk {expected}", other.name());
                return fail(&mut stream, message).await;
            }
        }
    }
}

async fn store_chunk(slot: &Arc<Mutex<Slot>>, generation: u64, chunk: ChunkFrame) -> Stored {
    let slot = slot.clone();
    tokio::task::spawn_blocking(move || {
        let expected_len = {
            let s = slot.lock().expect("slot lock");
            let Some(sp) = s.spool.as_ref().filter(|_| s.generation == generation) else {
                return Stored::Superseded;
            };
            sp.hello.chunk_size.min(sp.hello.total_bytes - chunk.index * sp.hello.chunk_size)
        };
        // Decompress and hash outside the lock.
        let raw = match payload::decode_chunk(&chunk, expected_len) {
            Ok(raw) => raw,
            Err(reason) => return Stored::Corrupt(reason),
        };
        let mut s = slot.lock().expect("slot lock");
        if s.generation != generation {
            return Stored::Superseded;
        }
        let Some(sp) = s.spool.as_mut() else { return Stored::Superseded };
        match sp.append(&raw) {
            Ok(()) => Stored::Yes,
            Err(e) => Stored::WriteFailed(describe_io("write", &sp.data_path, &e)),
        }
    })
    .await
    .expect("chunk task panicked")
}

enum Finish {
    Answer(Verdict),
    Wait,
    Unpack { dir: PathBuf, data_path: PathBuf, meta: serde_json::Value, bytes_raw: u64, bytes_wire: u64 },
    Fail(String),
}

async fn finish<H, F>(
    stream: &mut Stream,
    peer: SocketAddr,
    ctx: &Arc<Ctx<H>>,
    slot: &Arc<Mutex<Slot>>,
    generation: u64,
    hello: Hello,
) -> io::Result<()>
where
    H: Fn(ReceivedPayload) -> F + Send + Sync + 'static,
    F: Future<Output = Verdict> + Send + 'static,
{
    let id = hello.transfer_id.clone();
    let step = loop {
        let step = {
            let slot = slot.clone();
            tokio::task::spawn_blocking(move || finish_step(&slot, generation)).await.expect("finish task panicked")
        };
        match step {
            Finish::Wait => tokio::time::sleep(Duration::from_millis(50)).await,
            other => break other,
        }
    };
    let (dir, data_path, meta, bytes_raw, bytes_wire) = match step {
        Finish::Answer(verdict) => return send_frame(stream, &Frame::Verdict(verdict)).await,
        Finish::Fail(message) => {
            warn!(%peer, transfer_id = %id, %message, "transfer failed");
            return fail(stream, message).await;
        }
        Finish::Wait => unreachable!("loop above never breaks on wait"),
        Finish::Unpack { dir, data_path, meta, bytes_raw, bytes_wire } => (dir, data_path, meta, bytes_raw, bytes_wire),
    };
    let out = dir.join("payload");
    let unpacked = {
        let (out, id) = (out.clone(), id.clone());
        tokio::task::spawn_blocking(move || {
            if out.exists() {
                fs::remove_dir_all(&out).map_err(|source| TransferError::Io { path: out.clone(), source })?;
            }
            let result = payload::unpack(&data_path, &out, &id);
            if result.is_err() {
                // Nothing half-written remains.
                let _ = fs::remove_dir_all(&out);
            }
            result
        })
        .await
        .expect("unpack task panicked")
    };
    if let Err(e) = unpacked {
        let message = match &e {
            TransferError::Io { path, source } => describe_io("unpack into", path, source),
            other => other.to_string(),
        };
        let message = format!("transfer {id}: {message}");
        if matches!(e, TransferError::Io { .. }) {
            slot.lock().expect("slot lock").phase = Phase::Receiving;
        } else {
            // refused content (a link, a device, a path outside): the same bytes would be
            // refused again, so none of them stays on this node
            let mut s = slot.lock().expect("slot lock");
            s.spool = None;
            s.phase = Phase::Finished(Verdict::failed(message.clone()));
            drop(s);
            if let Err(e) = fs::remove_dir_all(&dir) {
                warn!(transfer_id = %id, dir = %dir.display(), error = %e, "cannot remove refused spool");
            }
            ctx.registry.finished(&id, false);
        }
        warn!(%peer, transfer_id = %id, %message, "cannot unpack payload");
        return fail(stream, message).await;
    }
    info!(%peer, transfer_id = %id, dir = %out.display(), "payload complete, handing over");
    let received = ReceivedPayload { transfer_id: id.clone(), dir: out, meta, peer, bytes_raw, bytes_wire };
    let verdict = match tokio::spawn((ctx.handler)(received)).await {
        Ok(verdict) => verdict,
        Err(e) => Verdict::failed(format!("receiver handler for transfer {id} crashed: {e}")),
    };
    {
        let mut s = slot.lock().expect("slot lock");
        s.phase = Phase::Finished(verdict.clone());
        if verdict.ok {
            s.spool = None;
            if let Err(e) = fs::remove_dir_all(&dir) {
                warn!(transfer_id = %id, dir = %dir.display(), error = %e, "cannot remove spool");
            }
        }
    }
    // a failed verdict's spool stays for inspection until the transfer expires
    ctx.registry.finished(&id, !verdict.ok);
    info!(%peer, transfer_id = %id, ok = verdict.ok, message = %verdict.message, "verdict");
    // If this fails the sender reconnects and gets the stored verdict.
    send_frame(stream, &Frame::Verdict(verdict)).await?;
    let _ = stream.shutdown().await;
    Ok(())
}

fn finish_step(slot: &Mutex<Slot>, generation: u64) -> Finish {
    let mut s = slot.lock().expect("slot lock");
    match &s.phase {
        Phase::Finished(verdict) => return Finish::Answer(verdict.clone()),
        Phase::Finishing => return Finish::Wait,
        Phase::Receiving => {}
    }
    if s.generation != generation {
        return Finish::Fail("a newer connection took over this transfer".to_string());
    }
    let bytes_wire = s.bytes_wire;
    let Some(sp) = s.spool.as_mut() else { return Finish::Fail("transfer has no spool".to_string()) };
    if let Err(e) = sp.sync() {
        return Finish::Fail(describe_io("sync", &sp.data_path, &e));
    }
    let got = hex(&sp.hasher.clone().finalize());
    if got != sp.hello.sha256 {
        return Finish::Fail(format!(
            "payload of transfer {} failed verification: sha256 {got}, sender announced {}; spool kept at {}",
            sp.hello.transfer_id,
            sp.hello.sha256,
            sp.dir.display()
        ));
    }
    let step = Finish::Unpack {
        dir: sp.dir.clone(),
        data_path: sp.data_path.clone(),
        meta: sp.hello.meta.clone(),
        bytes_raw: sp.hello.total_bytes,
        bytes_wire,
    };
    s.phase = Phase::Finishing;
    step
}
