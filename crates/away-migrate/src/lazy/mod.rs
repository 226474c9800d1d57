//! Lazy (post-copy) container migration: what away adds around CRIU's lazy pages.
//!
//! CRIU serves the frozen source's memory from a page server; on the target its
//! lazy-pages daemon fetches pages on fault and the rest in the background. Between
//! the two away puts a relay pair that
//! * compresses the page stream (zstd level 1, one checksummed frame per read, so a
//!   request never waits for a buffer to fill), and
//! * keeps CRIU's ending rule from losing the workload: CRIU's page server takes a
//!   closed connection for "every page moved" and kills the source. When the network
//!   side fails (link cut, corrupt frame, target gone), the source relay sends CRIU a
//!   truncated request instead, which fails the dump and makes CRIU resume the source.
//!
//! Written by hand: the relay has to know which side ended first, which no generic
//! proxy crate reports.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub mod early;
mod error;
pub mod pagemap;
pub mod prefetch;
pub mod pull;
pub mod push;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use away_model::ErrorChain;
use away_runtime::host::criu_args::CriuLazyPages;
use away_runtime::host::process::{self, Signal};
pub use error::LazyError;

/// Largest plain chunk read at once (and so the largest frame's content).
const CHUNK: usize = 256 * 1024;
/// No request from the target for this long while pages remain: the link is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source waits for the target's lazy-pages daemon to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// The other end of a page link and how the link is secured: under mutual TLS the
/// source relay takes only the target node's connection (others are dropped, the relay
/// keeps waiting) and the target checks the source's certificate; in plaintext the
/// first connection wins, as with any plaintext channel (docs/security.md).
#[derive(Debug, Clone)]
pub struct PageLink {
    pub channels: crate::channel::Channels,
    /// The node at the other end.
    pub peer_node: String,
}

impl PageLink {
    /// A plaintext link (tests, and agents started with `--insecure-plaintext-channels`).
    pub fn plaintext() -> PageLink {
        PageLink { channels: crate::channel::Channels::plaintext(), peer_node: String::new() }
    }

    async fn connect(&self, upstream: SocketAddr) -> Result<crate::channel::Stream, LazyError> {
        let what = || format!("connect to the source's page relay {upstream}");
        let tcp = TcpStream::connect(upstream).await.map_err(LazyError::io(what()))?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(CONNECT_TIMEOUT, self.channels.connect(tcp, &self.peer_node))
            .await
            .map_err(|_| LazyError::NotWithin {
                what: "no TLS handshake with the source's page relay",
                secs: CONNECT_TIMEOUT.as_secs(),
            })?
            .map_err(LazyError::io(what()))
    }

    /// The first connection on `listener` from the expected peer (others are dropped),
    /// and its socket.
    async fn accept(&self, listener: &TcpListener) -> std::io::Result<(crate::channel::Stream, std::os::fd::OwnedFd)> {
        loop {
            let (tcp, peer) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            // the pages flow from here: CUBIC keeps a long fat link full where BBR (this
            // host's default) leaves it idle in its round-trip probes (measured below)
            if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_congestion(b"cubic") {
                tracing::debug!("the page relay keeps the host's congestion control: {e}");
            }
            // pushed pages wait for no request: a target gone without a word is found by
            // its unacknowledged data instead
            if let Err(e) = crate::transfer::bound_dead_link(&tcp, IDLE_TIMEOUT) {
                tracing::debug!("the page relay's link keeps the host's timeouts: {e}");
            }
            let socket = std::os::fd::AsFd::as_fd(&tcp).try_clone_to_owned()?;
            let (stream, certs) = match self.channels.accept(tcp, Duration::from_secs(10)).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%peer, "lazy pages: a connection to the page relay failed its TLS handshake: {e}");
                    continue;
                }
            };
            if self.channels.is_tls() && !crate::channel::peer_is(&certs, &self.peer_node) {
                tracing::warn!(%peer, expected = %self.peer_node, "lazy pages: a node other than the target connected to the page relay; dropped");
                continue;
            }
            tracing::debug!(%peer, "lazy pages: target connected");
            return Ok((stream, socket));
        }
    }
}

/// Bytes through a relay.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Uncompressed bytes CRIU (or its daemon) sent and received.
    pub plain: AtomicU64,
    /// Bytes on the wire, both directions.
    pub wire: AtomicU64,
    /// Source side: when the target's closing request came, the word of its lazy-pages
    /// daemon that every page is in place (it sends it after its last copy).
    closed_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl RelayCounters {
    pub fn plain(&self) -> u64 {
        self.plain.load(Ordering::Relaxed)
    }
    /// When the target's daemon said it had every page (source side; None before, or
    /// on a relay that saw no close).
    pub fn closed_at(&self) -> Option<std::time::Instant> {
        *self.closed_at.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn close_seen(&self) {
        self.closed_at.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(std::time::Instant::now);
    }
    pub fn wire(&self) -> u64 {
        self.wire.load(Ordering::Relaxed)
    }
}

/// Faults the end-to-end tests inject into the source relay
/// (`AWAY_FAULT_LAZY=cut-after:BYTES` or `corrupt-after:BYTES`, counted in page bytes
/// CRIU has sent). Only a build with the `fault-injection` feature reads the variable;
/// the unit tests pass a fault directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyFault {
    CutAfter(u64),
    CorruptAfter(u64),
    /// From this many bytes on, 50 ms per frame (a slow link: a lazy phase long enough
    /// for a test to kill the source in it; `slow-after:BYTES`).
    SlowAfter(u64),
}

impl LazyFault {
    #[cfg(feature = "fault-injection")]
    pub fn from_env() -> Option<LazyFault> {
        let v = std::env::var("AWAY_FAULT_LAZY").ok()?;
        let (kind, n) = v.split_once(':')?;
        let n = n.parse().ok()?;
        match kind {
            "cut-after" => Some(LazyFault::CutAfter(n)),
            "corrupt-after" => Some(LazyFault::CorruptAfter(n)),
            "slow-after" => Some(LazyFault::SlowAfter(n)),
            _ => None,
        }
    }

    /// A build for users injects nothing, whatever the environment says.
    #[cfg(not(feature = "fault-injection"))]
    pub fn from_env() -> Option<LazyFault> {
        None
    }
}

/// The source end: accepts the target's relay, connects to CRIU's page server.
pub struct SourceRelay {
    pub port: u16,
    pub counters: Arc<RelayCounters>,
    abort: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), LazyError>>,
    broken: Arc<AtomicBool>,
}

/// A source relay that listens (and takes the target's connection, TLS handshake and
/// all) before the dump has made a page server to connect to: a streamed move opens
/// its page link while the source still runs ([`PendingRelay::start`]). Until then
/// the link carries filler ([`warm_up`]).
pub struct PendingRelay {
    /// Where it listens.
    pub ip: std::net::IpAddr,
    pub port: u16,
    accepted: Accepting,
    /// Filler may go: the pages have not started.
    warming: Arc<AtomicBool>,
}

/// The accepting task: the target's stream and the filler sent on it, or why none came.
type Accepting = tokio::task::JoinHandle<Result<(crate::channel::Stream, u64), LazyError>>;

impl Drop for PendingRelay {
    fn drop(&mut self) {
        // a move that ends before its dump takes no connection
        self.accepted.abort();
    }
}

/// Filler on an early page link, at most (a round trip's worth of slow start on the
/// emulated WAN is 10-80 segments; a LAN needs none and stops here at once).
const WARM_UP_MAX: u64 = 256 << 10;
/// One filler frame.
const WARM_UP_FRAME: usize = 16 << 10;

/// Keep an early page link busy with filler frames while `warming` holds (the dump
/// runs), at most [`WARM_UP_MAX`]: its congestion window grows through slow start
/// while the workload still runs or is being dumped, instead of after the freeze, and
/// does not idle back before the pages come. The kernel keeps at most a frame unsent
/// (`TCP_NOTSENT_LOWAT`, restored after), so the first pages never queue behind
/// filler. Returns the filler's bytes on the wire.
async fn warm_up(
    stream: &mut crate::channel::Stream,
    socket: &std::os::fd::OwnedFd,
    warming: &AtomicBool,
) -> Result<u64, LazyError> {
    let sock = socket2::SockRef::from(socket);
    let before = sock.tcp_notsent_lowat().ok();
    if let Err(e) = sock.set_tcp_notsent_lowat(WARM_UP_FRAME as u32) {
        tracing::debug!("no filler on the page link (TCP_NOTSENT_LOWAT: {e})");
        return Ok(0);
    }
    let frame = vec![0u8; WARM_UP_FRAME];
    let header = (WARM_UP_FRAME as u32 | FILLER_FRAME).to_be_bytes();
    let mut sent = 0u64;
    while warming.load(Ordering::SeqCst) && sent < WARM_UP_MAX {
        stream.write_all(&header).await.map_err(LazyError::io("send filler"))?;
        stream.write_all(&frame).await.map_err(LazyError::io("send filler"))?;
        stream.flush().await.map_err(LazyError::io("send filler"))?;
        sent += 4 + WARM_UP_FRAME as u64;
    }
    if let Some(lowat) = before {
        let _ = sock.set_tcp_notsent_lowat(lowat);
    }
    tracing::debug!(bytes = sent, "page link warmed up");
    Ok(sent)
}

impl PendingRelay {
    /// Listen on `listen` and take the first connection of `link.peer_node` (under TLS),
    /// from now on.
    pub async fn listen(listen: SocketAddr, link: PageLink) -> std::io::Result<PendingRelay> {
        let listener = TcpListener::bind(listen).await?;
        let (ip, port) = (listener.local_addr()?.ip(), listener.local_addr()?.port());
        let warming = Arc::new(AtomicBool::new(true));
        let w = warming.clone();
        let accepted = tokio::spawn(async move {
            let (mut stream, socket) = match tokio::time::timeout(CONNECT_TIMEOUT, link.accept(&listener)).await {
                Ok(r) => r.map_err(LazyError::io("accept the target's page connection"))?,
                Err(_) => {
                    return Err(LazyError::NotWithin {
                        what: "the target did not fetch pages",
                        secs: CONNECT_TIMEOUT.as_secs(),
                    })
                }
            };
            let filler = warm_up(&mut stream, &socket, &w).await?;
            Ok((stream, filler))
        });
        Ok(PendingRelay { ip, port, accepted, warming })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// Relay between the target and CRIU's page server, reached with `connect_criu` (once,
    /// when the target has connected); `compress`: zstd frames, else stored ones with a
    /// CRC-32. With an `offer` (to a target that opened its link at the announce) the
    /// relay sends it first ([`early::Offer`]); an offer to push makes the relay ask CRIU
    /// for every page itself and send them down the link at once, without waiting for
    /// the target's requests ([`pull::Push`]).
    pub fn start(
        mut self,
        connect_criu: impl FnOnce() -> std::io::Result<std::net::TcpStream> + Send + 'static,
        fault: Option<LazyFault>,
        compress: bool,
        offer: Option<early::Offer>,
    ) -> SourceRelay {
        // the pages come: no more filler
        self.warming.store(false, Ordering::SeqCst);
        let accepted =
            std::mem::replace(&mut self.accepted, tokio::spawn(async { Err(LazyError::AbortedBeforeConnect) }));
        let counters = Arc::new(RelayCounters::default());
        let (abort_tx, abort_rx) = oneshot::channel();
        let c = counters.clone();
        let broken = Arc::new(AtomicBool::new(false));
        let b = broken.clone();
        let framer = Framer::new(fault, compress);
        let task = tokio::spawn(async move {
            let r = source_side(accepted, connect_criu, c, abort_rx, framer, offer).await;
            b.store(r.is_err(), Ordering::SeqCst);
            r
        });
        SourceRelay { port: self.port, counters, abort: Some(abort_tx), task, broken }
    }
}

impl SourceRelay {
    /// Listen on `listen` for the target; pages come from CRIU's page server, reached
    /// with `connect_criu` (once, when the target connects); `compress`: zstd frames,
    /// else stored ones with a CRC-32.
    /// Only `link.peer_node` (the target) is taken under TLS.
    pub async fn start(
        listen: SocketAddr,
        connect_criu: impl FnOnce() -> std::io::Result<std::net::TcpStream> + Send + 'static,
        fault: Option<LazyFault>,
        compress: bool,
        link: PageLink,
    ) -> std::io::Result<SourceRelay> {
        Ok(PendingRelay::listen(listen, link).await?.start(connect_criu, fault, compress, None))
    }

    /// The relay has ended in failure (the target or the link went; CRIU was told).
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Make CRIU fail the lazy dump (the source resumes), whatever state the relay is in.
    pub async fn abort(mut self) -> Result<(), LazyError> {
        if let Some(a) = self.abort.take() {
            let _ = a.send(());
        }
        self.task.await.map_err(LazyError::task("source relay"))?
    }

    /// Wait for the relay to end on its own (CRIU closed after the last page, or the
    /// network failed and CRIU was told).
    pub async fn wait(mut self) -> Result<(), LazyError> {
        let _keep = self.abort.take();
        self.task.await.map_err(LazyError::task("source relay"))?
    }
}

/// CRIU's page server protocol: requests are `struct page_server_iov` (u32 cmd, then
/// u64 nr_pages, vaddr and dst_id: 32 bytes with padding, little-endian here, as
/// CRIU 4.2 sends them); the lazy-pages daemon
/// ends with PS_IOV_CLOSE (PS_IOV_FORCE_CLOSE when CRIU was handed its socket; see
/// criu/page-xfer.c).
const PS_IOV_SIZE: usize = 32;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_MASK: u32 = 0xffff;

/// Is `last` (the final bytes the daemon sent) its closing request?
fn is_final_request(last: &[u8]) -> bool {
    let Some(req) = last.len().checked_sub(PS_IOV_SIZE).map(|start| &last[start..]) else { return false };
    matches!(u32::from_le_bytes(req[..4].try_into().expect("4 bytes")) & PS_CMD_MASK, PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE)
}

/// Tell CRIU's page server the transfer failed: a request cut short. CRIU then fails
/// the dump and resumes the frozen process (a plain close would read as success).
async fn poison(w: &mut OwnedWriteHalf) {
    let _ = w.write_all(&away_runtime::CRIU_PAGE_SERVER_ABORT).await;
    let _ = w.shutdown().await;
}

async fn source_side(
    accepted: Accepting,
    connect_criu: impl FnOnce() -> std::io::Result<std::net::TcpStream> + Send + 'static,
    counters: Arc<RelayCounters>,
    mut abort: oneshot::Receiver<()>,
    mut framer: Framer,
    offer: Option<early::Offer>,
) -> Result<(), LazyError> {
    let accepted = tokio::select! {
        a = accepted => Some(a),
        _ = &mut abort => None,
    };
    // CRIU waits for its one connection in any case: even to be told to give up
    let criu = tokio::task::spawn_blocking(connect_criu)
        .await
        .map_err(LazyError::task("page server connection"))?
        .and_then(|s| {
            s.set_nonblocking(true)?;
            // closed by anything but a clean end below (this process killed outright:
            // the kernel closes the socket), the connection is reset, not shut down:
            // CRIU reads a reset as a failed transfer and resumes the source, where a
            // plain close would read as "every page moved" and end it with pages missing
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            TcpStream::from_std(s)
        })
        .map_err(LazyError::io("connect to CRIU's page server"))?;
    let (mut criu_r, mut criu_w) = criu.into_split();
    let Some(accepted) = accepted else {
        poison(&mut criu_w).await;
        return Err(LazyError::AbortedBeforeConnect);
    };
    let net = match accepted.map_err(LazyError::task("accept the target's page connection")).and_then(|r| r) {
        Ok((s, filler)) => {
            counters.wire.fetch_add(filler, Ordering::Relaxed);
            s
        }
        Err(e) => {
            poison(&mut criu_w).await;
            return Err(e);
        }
    };
    let (mut net_r, mut net_w) = tokio::io::split(net);
    if let Some(offer) = &offer {
        let offered = async {
            for piece in offer.record().chunks(CHUNK) {
                framer.send(&mut net_w, piece, &counters).await?;
            }
            if let early::Offer::Push(push) = offer {
                // every page goes before the target asks: it only reads, then closes
                push.send(&mut criu_r, &mut criu_w, &mut net_w, &mut framer, &counters).await?;
            }
            Ok(())
        };
        let offered = tokio::select! {
            r = offered => r,
            _ = &mut abort => Err(LazyError::Aborted),
        };
        if let Err(e) = offered {
            tracing::warn!("page offer: {e}; telling CRIU to resume the source", e = ErrorChain(&e));
            poison(&mut criu_w).await;
            drain(&mut criu_r).await;
            return Err(e);
        }
    }
    let criu_closed = AtomicBool::new(false);
    // the daemon's closing request went to CRIU: it has every page, the move is done
    let final_seen = AtomicBool::new(false);
    // A lazy offer's prefetch may have asked for every page before the target's daemon
    // even runs: the silence until its close is bounded as the daemon's start was (a
    // dead host is found sooner, by the socket's user timeout).
    let idle = match offer {
        Some(early::Offer::Lazy { .. }) => CONNECT_TIMEOUT,
        _ => IDLE_TIMEOUT,
    };
    let up = async {
        // CRIU -> network: page data
        let r = plain_to_framed(&mut criu_r, &mut net_w, &counters, &mut framer).await;
        if r.is_ok() {
            criu_closed.store(true, Ordering::SeqCst);
        }
        r
    };
    let down = async {
        // network -> CRIU: page requests. CRIU answers the daemon's final request and
        // then waits for the connection to end; a FIN without that request would also
        // read as success, so it only goes to CRIU after the final request.
        let last = framed_to_plain(&mut net_r, &mut criu_w, &counters, Some(idle), false, Some(&final_seen)).await?;
        if is_final_request(&last) || criu_closed.load(Ordering::SeqCst) {
            end_cleanly(&mut criu_w).await;
            Ok(())
        } else {
            Err(LazyError::EndedBeforeLastPage)
        }
    };
    let result = tokio::select! {
        r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
        _ = &mut abort => Err(LazyError::Aborted),
    };
    if let Err(e) = &result {
        if final_seen.load(Ordering::SeqCst) && !criu_closed.load(Ordering::SeqCst) {
            // the link failed after the daemon's last request: the target has every page
            // and its daemon may be gone already; ending well here is the only way to one
            // instance (a resumed source would be a second)
            tracing::warn!("lazy pages: {e} after the last request; ending the dump as done", e = ErrorChain(e));
            end_cleanly(&mut criu_w).await;
            drain(&mut criu_r).await;
            return Ok(());
        }
        if !criu_closed.load(Ordering::SeqCst) {
            tracing::warn!("lazy pages: {e}; telling CRIU to resume the source", e = ErrorChain(e));
            poison(&mut criu_w).await;
            drain(&mut criu_r).await;
        }
    }
    result
}

/// End the connection to CRIU's page server as a success: a plain close (FIN), not the
/// reset set up for a death of this process.
async fn end_cleanly(criu_w: &mut OwnedWriteHalf) {
    let _ = socket2::SockRef::from(criu_w.as_ref()).set_linger(None);
    let _ = criu_w.shutdown().await;
}

/// Read what CRIU still sends until it closes (at most 10 s): it may be blocked sending
/// pages nobody reads, and only then gets to the end of the connection.
async fn drain(criu_r: &mut OwnedReadHalf) {
    let _ = tokio::time::timeout(Duration::from_secs(10), tokio::io::copy(criu_r, &mut tokio::io::sink())).await;
}

/// The target end: the lazy-pages daemon connects here; pages come from `upstream`.
pub struct TargetRelay {
    pub port: u16,
    pub counters: Arc<RelayCounters>,
    task: tokio::task::JoinHandle<Result<(), LazyError>>,
}

impl TargetRelay {
    /// With `prefetch` (the checkpoint's lazy page ranges and its process's pid) the
    /// relay fetches every page ahead of the daemon ([`prefetch`]), from the moment
    /// both ends are connected; without, it passes requests through.
    pub async fn start(
        upstream: SocketAddr,
        prefetch: Option<(Vec<(u64, u64)>, u64)>,
        link: PageLink,
    ) -> std::io::Result<TargetRelay> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let counters = Arc::new(RelayCounters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            // the page link comes up while the daemon starts and the restore begins: its
            // round trip is not on the first fault's way
            let net = link.connect(upstream);
            let (daemon, net) = tokio::try_join!(accept_daemon(&listener), net)?;
            let (mut d_r, mut d_w) = daemon.into_split();
            let (mut n_r, mut n_w) = tokio::io::split(net);
            let Some((ranges, pid)) = prefetch else {
                let mut framer = Framer::new(None, true);
                return tokio::try_join!(
                    plain_to_framed(&mut d_r, &mut n_w, &c, &mut framer),
                    framed_to_plain(&mut n_r, &mut d_w, &c, None, true, None)
                )
                .map(|_| ());
            };
            // daemon <-> prefetcher <-> (in-process pipe) <-> compression <-> network
            let (inner, outer) = tokio::io::duplex(4 << 20);
            let (inner_r, inner_w) = tokio::io::split(inner);
            let pages: u64 = ranges.iter().map(|r| r.1).sum();
            let (stats, _) = tokio::try_join!(
                prefetch::relay(d_r, d_w, inner_r, inner_w, ranges, Some(pid)),
                framed_link(outer, &mut n_r, &mut n_w, &c)
            )?;
            tracing::info!(lazy_pages = pages, ?stats, "lazy pages: prefetch done");
            Ok(())
        });
        Ok(TargetRelay { port, counters, task })
    }

    /// The relay of a lazy move whose prefetch runs on its early link since the source's
    /// offer ([`early::LazyPrefetch`]): the daemon's connection is joined to it.
    fn start_early(mut prefetch: early::LazyPrefetch) -> std::io::Result<TargetRelay> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let port = listener.local_addr()?.port();
        let counters = prefetch.counters.clone();
        let mut pipe = prefetch.daemon.take().expect("the prefetch's daemon side is taken once");
        let task = tokio::spawn(async move {
            let mut daemon = tokio::select! {
                d = accept_daemon(&listener) => d?,
                // (failed before the daemon came: its link or its source)
                done = &mut prefetch.task => {
                    done.map_err(LazyError::task("page prefetch"))??;
                    return Err(LazyError::EndedBeforeLastPage);
                }
            };
            // the prefetch ends the pipe, and so the joining, when it is done or fails; a
            // prefetch chunk goes in one write (copied in 8 KiB pieces, smaller than
            // loopback's segment, the daemon's requests came 120 ms apart)
            let joining = tokio::io::copy_bidirectional_with_sizes(&mut daemon, &mut pipe, DAEMON_COPY, DAEMON_COPY);
            let (joined, done) = tokio::join!(joining, &mut prefetch.task);
            done.map_err(LazyError::task("page prefetch"))??;
            joined.map(drop).map_err(LazyError::io("relay the lazy-pages daemon's requests"))
        });
        Ok(TargetRelay { port, counters, task })
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Bytes copied at once between the daemon's connection and an early prefetch: a
/// prefetch chunk of 64 pages and its header.
const DAEMON_COPY: usize = 260 << 10;

/// The lazy-pages daemon's one connection to its relay, without Nagle's delay: a
/// request's answer must not wait for the ACK of the one before.
async fn accept_daemon(listener: &TcpListener) -> Result<TcpStream, LazyError> {
    let (daemon, _) = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept())
        .await
        .map_err(|_| LazyError::NotWithin {
            what: "the lazy-pages daemon did not connect",
            secs: CONNECT_TIMEOUT.as_secs(),
        })?
        .map_err(LazyError::io("accept the lazy-pages daemon's connection"))?;
    daemon.set_nodelay(true).map_err(LazyError::io("set TCP_NODELAY on the lazy-pages daemon's connection"))?;
    Ok(daemon)
}

/// The compressing end of a relay link: plain CRIU protocol on `plain` (the other
/// end of an in-process pipe), frames on the network halves.
async fn framed_link(
    plain: tokio::io::DuplexStream,
    net_r: &mut (impl tokio::io::AsyncRead + Unpin),
    net_w: &mut (impl tokio::io::AsyncWrite + Unpin),
    counters: &RelayCounters,
) -> Result<(), LazyError> {
    let (mut r, mut w) = tokio::io::split(plain);
    let mut framer = Framer::new(None, true);
    tokio::try_join!(
        plain_to_framed(&mut r, net_w, counters, &mut framer),
        framed_to_plain(net_r, &mut w, counters, None, true, None)
    )
    .map(|_| ())
}

/// A frame whose length has this bit set is stored, not compressed (`--compression
/// none`: on loopback or a fast LAN zstd is slower than the link): a CRC-32 of its
/// content, then the content.
const RAW_FRAME: u32 = 1 << 31;
/// A frame whose length has this bit set is filler ([`warm_up`]): read and dropped.
const FILLER_FRAME: u32 = 1 << 30;

/// Writes plain bytes as frames: zstd (level 1, checksummed) or stored with a CRC-32,
/// one frame per call; the source's faults ([`LazyFault`]) strike here.
struct Framer {
    zstd: Option<zstd::bulk::Compressor<'static>>,
    fault: Option<LazyFault>,
    /// Plain bytes framed so far.
    sent: u64,
}

impl Framer {
    fn new(fault: Option<LazyFault>, compress: bool) -> Framer {
        let zstd = compress.then(|| {
            // (a level-1 context fails only where allocation does, which aborts anyway)
            let mut z = zstd::bulk::Compressor::new(1).expect("zstd level 1");
            let _ = z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true));
            z
        });
        Framer { zstd, fault, sent: 0 }
    }

    async fn send(
        &mut self,
        w: &mut (impl tokio::io::AsyncWrite + Unpin),
        plain: &[u8],
        counters: &RelayCounters,
    ) -> Result<(), LazyError> {
        let (header, mut frame) = match &mut self.zstd {
            Some(zstd) => {
                let frame = zstd.compress(plain).map_err(LazyError::io("compress"))?;
                (frame.len() as u32, frame)
            }
            None => {
                let mut frame = crc32fast::hash(plain).to_be_bytes().to_vec();
                frame.extend_from_slice(plain);
                (frame.len() as u32 | RAW_FRAME, frame)
            }
        };
        match self.fault {
            Some(LazyFault::CutAfter(limit)) if self.sent >= limit => {
                return Err(LazyError::FaultCut { sent: self.sent });
            }
            Some(LazyFault::CorruptAfter(limit)) if self.sent >= limit => {
                let mid = frame.len() / 2;
                frame[mid] ^= 0x5a;
            }
            Some(LazyFault::SlowAfter(limit)) if self.sent >= limit => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => {}
        }
        w.write_all(&header.to_be_bytes()).await.map_err(LazyError::io("send"))?;
        w.write_all(&frame).await.map_err(LazyError::io("send"))?;
        // a TLS stream may keep the frame's last records when its socket is full (it
        // sends them with its next write or flush); the peer may be waiting for exactly
        // these bytes before it asks for more, so both sides would wait forever
        w.flush().await.map_err(LazyError::io("send"))?;
        self.sent += plain.len() as u64;
        counters.plain.fetch_add(plain.len() as u64, Ordering::Relaxed);
        counters.wire.fetch_add(4 + frame.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

async fn plain_to_framed(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    counters: &RelayCounters,
    framer: &mut Framer,
) -> Result<(), LazyError> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = r.read(&mut buf).await.map_err(LazyError::io("read"))?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        framer.send(w, &buf[..n], counters).await?;
    }
}

/// The content of one received frame (stored or compressed), checked.
fn unframe(header: u32, frame: &[u8]) -> Result<Vec<u8>, LazyError> {
    let corrupt = |reason: &str| LazyError::Corrupt { reason: reason.to_string() };
    if header & RAW_FRAME == 0 {
        // zstd's text is the reason itself (its error has no further cause)
        return zstd::bulk::decompress(frame, CHUNK).map_err(|e| corrupt(&e.to_string()));
    }
    let (crc, content) = frame.split_at_checked(4).ok_or_else(|| corrupt("a stored frame without checksum"))?;
    if crc32fast::hash(content).to_be_bytes() != crc {
        return Err(corrupt("a stored frame fails its checksum"));
    }
    Ok(content.to_vec())
}

async fn framed_to_plain(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    counters: &RelayCounters,
    idle: Option<Duration>,
    shutdown_at_end: bool,
    final_seen: Option<&AtomicBool>,
) -> Result<Vec<u8>, LazyError> {
    let mut frame = Vec::new();
    // the last bytes written, for the caller to see how the stream ended
    let mut last: Vec<u8> = Vec::with_capacity(2 * PS_IOV_SIZE);
    loop {
        let mut len = [0u8; 4];
        let read = async {
            match r.read_exact(&mut len).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
                Err(e) => Err(LazyError::io("receive")(e)),
            }
        };
        let more = match idle {
            Some(t) => tokio::time::timeout(t, read)
                .await
                .map_err(|_| LazyError::Idle { peer: "the other side", secs: t.as_secs() })??,
            None => read.await?,
        };
        if !more {
            if shutdown_at_end {
                let _ = w.shutdown().await;
            }
            return Ok(last);
        }
        let header = u32::from_be_bytes(len);
        let n = (header & !(RAW_FRAME | FILLER_FRAME)) as usize;
        if n > zstd::zstd_safe::compress_bound(CHUNK).max(CHUNK + 4) {
            return Err(LazyError::Corrupt { reason: format!("a frame of {n} bytes") });
        }
        frame.resize(n, 0);
        r.read_exact(&mut frame).await.map_err(LazyError::io("receive"))?;
        if header & FILLER_FRAME != 0 {
            counters.wire.fetch_add(4 + n as u64, Ordering::Relaxed);
            continue;
        }
        let plain = unframe(header, &frame)?;
        w.write_all(&plain).await.map_err(LazyError::io("write"))?;
        last.extend_from_slice(&plain[plain.len().saturating_sub(PS_IOV_SIZE)..]);
        last.drain(..last.len().saturating_sub(PS_IOV_SIZE));
        if let Some(f) = final_seen {
            let closing = is_final_request(&last);
            f.store(closing, Ordering::SeqCst);
            if closing {
                counters.close_seen();
            }
        }
        counters.plain.fetch_add(plain.len() as u64, Ordering::Relaxed);
        counters.wire.fetch_add(4 + n as u64, Ordering::Relaxed);
    }
}

/// The target's CRIU lazy-pages daemon with its relay.
pub struct LazyPagesDaemon {
    /// The supervising shell (its process group holds CRIU too).
    child: tokio::process::Child,
    relay: TargetRelay,
    log: PathBuf,
    /// Where the restored process's pid goes for the shell (which removes the file), in
    /// a directory of this process's own (mode 0700, random name): no other user can
    /// plant a file or a symlink there.
    restored: PathBuf,
    _restored_dir: tempfile::TempDir,
}

impl LazyPagesDaemon {
    /// Start the daemon on checkpoint `dir` (images; work directory
    /// `dir/`[`away_runtime::CRIU_WORK_DIR`]) fetching from the source relay `upstream`,
    /// the `hot` ranges (the workload's working set) first; returns once its socket is
    /// there for the restore to connect to. With `early` (the link this node opened at
    /// the announce) the pages come over it, asked for since the source's offer, in the
    /// offer's order.
    pub async fn start(
        dir: &Path,
        upstream: SocketAddr,
        hot: &[(u64, u64)],
        link: PageLink,
        early: Option<early::EarlyLink>,
    ) -> Result<LazyPagesDaemon, LazyError> {
        let relay = match early {
            Some(early) => match early.offer().await? {
                early::Found::Lazy(prefetch) => {
                    prefetch.check(dir)?;
                    TargetRelay::start_early(prefetch)
                }
                early::Found::Pages { .. } => {
                    return Err(LazyError::BadOffer { reason: "a streamed move's, for a lazy restore".into() })
                }
            },
            None => {
                let ranges = prefetch::lazy_ranges(dir).map(|(r, pid)| (prefetch::hot_first(r, hot), pid));
                if ranges.is_none() {
                    tracing::info!("lazy pages: no single pagemap image in {}, no prefetch", dir.display());
                }
                TargetRelay::start(upstream, ranges, link).await
            }
        }
        .map_err(LazyError::io("start the page relay"))?;
        let work = dir.join(away_runtime::CRIU_WORK_DIR);
        away_runtime::host::beneath::Beneath::open(dir)?.create_dir_all(away_runtime::CRIU_WORK_DIR, 0o700)?;
        let log = work.join("lazy-pages.log");
        let socket = work.join("lazy-pages.socket");
        let _ = std::fs::remove_file(&socket);
        // The daemon runs under a shell that outlives this process: when the daemon fails
        // (its page link gone, or its relay with an agent that was killed, which the
        // shell hears of as its parent-death signal), the shell kills the restored copy,
        // which would otherwise run on with its missing pages filled with zeros (a
        // closed userfaultfd falls back to fresh anonymous memory).
        // The shell learns that process from a file outside the payload (which goes once
        // the restore is answered).
        let restored_dir = pid_dir().map_err(LazyError::io("create a directory for the restored process's pid"))?;
        let restored = restored_dir.path().join("pid");
        // fault injection for the end-to-end tests: the daemon exits before its socket is up
        #[cfg(feature = "fault-injection")]
        let script = match std::env::var("AWAY_FAULT_LAZY_TARGET").as_deref() {
            Ok("daemon-fails-to-start") => "exit 3",
            _ => SUPERVISOR,
        };
        #[cfg(not(feature = "fault-injection"))]
        let script = SUPERVISOR;
        let mut supervisor = tokio::process::Command::new("sh");
        // the agent killed outright (SIGKILL): the shell gets SIGTERM and ends the daemon
        // (spawned from a runtime thread, which lives as long as the agent)
        process::die_with_spawning_thread(supervisor.as_std_mut(), Signal::TERM, false);
        let mut child = supervisor
            .arg("-c")
            .arg(script)
            .arg("criu-lazy-pages")
            .env("AWAY_RESTORED_PIDFILE", &restored)
            .process_group(0)
            .args(
                CriuLazyPages {
                    page_server: SocketAddr::from(([127, 0, 0, 1], relay.port)),
                    images_dir: dir.to_path_buf(),
                    work_dir: work.clone(),
                    log_file: "lazy-pages.log".into(),
                    verbosity: Some(4),
                }
                .args(),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(LazyError::io("run criu lazy-pages"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                relay.abort();
                return Err(LazyError::DaemonExited { status, log: away_runtime::runtime::criu_log_errors(&log) });
            }
            if tokio::time::Instant::now() > deadline {
                relay.abort();
                return Err(LazyError::NotWithin { what: "criu lazy-pages did not create its socket", secs: 10 });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        #[cfg(feature = "fault-injection")]
        inject_target_fault(&child);
        Ok(LazyPagesDaemon { child, relay, log, restored, _restored_dir: restored_dir })
    }

    /// The restore is done and its process is `pid` (host pid): should the daemon fail
    /// from now on, that process is killed (see [`LazyPagesDaemon::start`]).
    pub fn guard(&mut self, pid: u32) {
        if matches!(self.child.try_wait(), Ok(Some(status)) if status.success()) {
            // every page came before the restore ended: no daemon left to fail
            return;
        }
        if let Err(e) = write_pid(&self.restored, pid) {
            let file = self.restored.display();
            tracing::warn!("a failing lazy-pages daemon would leave process {pid} running: write {file}: {e}");
        }
    }

    /// Resolves when the daemon has exited (cancel-safe; the daemon stays owned here).
    pub async fn exited(&mut self) -> LazyError {
        match self.child.wait().await {
            Ok(status) => LazyError::DaemonExited { status, log: away_runtime::runtime::criu_log_errors(&self.log) },
            Err(e) => LazyError::io("wait for criu lazy-pages")(e),
        }
    }

    pub fn counters(&self) -> Arc<RelayCounters> {
        self.relay.counters.clone()
    }

    /// Wait until every page is in (Ok) or the lazy phase failed (Err: the restored
    /// copy is missing memory and must go).
    pub async fn wait(mut self) -> Result<(), LazyError> {
        let status = self.child.wait().await.map_err(LazyError::io("wait for criu lazy-pages"))?;
        self.relay.abort();
        if status.success() {
            Ok(())
        } else {
            Err(LazyError::DaemonExited { status, log: away_runtime::runtime::criu_log_errors(&self.log) })
        }
    }

    /// A restore whose daemon is gone never ends (CRIU waits for pages): kill the runc
    /// and CRIU processes working on checkpoint `dir` so that the restore fails and
    /// cleans up after itself.
    pub fn kill_restore(dir: &Path) {
        let needle = dir.join(away_runtime::CRIU_WORK_DIR).display().to_string();
        // each checked again once held (a pidfd): a pid that went to another process is spared
        let kill = |pid: u32, is_it: &dyn Fn(&process::ProcessEntry) -> bool| {
            tracing::warn!(pid, "killing a lazy restore whose page daemon is gone");
            if let Err(e) = process::signal_if(pid, Signal::KILL, is_it) {
                tracing::warn!(pid, "cannot kill process {pid}: {e}");
            }
        };
        // runc (its command line names the work dir) and its CRIU children
        for runc in process::processes().filter(|p| p.cmdline_contains(&needle)) {
            for child in process::children(runc.pid) {
                kill(child, &|p| p.ppid == runc.pid);
            }
            kill(runc.pid, &|p| p.cmdline_contains(&needle));
        }
        // a killed CRIU leaves its cgroup yard (a tmpfs with every controller mounted
        // under the work dir) in the host's mount table; it would pin the payload
        for mount in mounts_under(&dir.join(away_runtime::CRIU_WORK_DIR)).iter().rev() {
            tracing::warn!(mount = %mount.display(), "unmounting what a killed restore left");
            let _ = std::process::Command::new("umount").arg("-l").arg(mount).status();
        }
    }

    /// Stop the daemon and its shell (the lazy phase fails on both sides; the caller
    /// removes the copy).
    pub async fn kill(&mut self) {
        if let (Some(group), Ok(None)) = (self.child.id(), self.child.try_wait()) {
            // the shell leads its own group (process_group(0)), CRIU is in it
            if let Err(e) = process::signal_group(group, Signal::KILL) {
                tracing::warn!(group, "cannot kill the lazy-pages daemon's process group {group}: {e}");
            }
        }
        let _ = self.child.kill().await;
        let _ = std::fs::remove_file(&self.restored);
    }
}

/// Fault injection for the end-to-end tests (`AWAY_FAULT_LAZY_TARGET`), in builds with
/// the `fault-injection` feature only.
#[cfg(feature = "fault-injection")]
fn inject_target_fault(child: &tokio::process::Child) {
    // fault injection for the end-to-end tests: the target side dies mid-copy, its
    // page daemon or the whole agent (this process)
    let fault = std::env::var("AWAY_FAULT_LAZY_TARGET").unwrap_or_default();
    if let Some(ms) = fault.strip_prefix("kill-agent-after-ms:").and_then(|n| n.parse::<u64>().ok()) {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            tracing::warn!("AWAY_FAULT_LAZY_TARGET: the agent dies mid-copy");
            std::process::abort();
        });
    }
    if let Some(ms) = fault.strip_prefix("kill-daemon-after-ms:").and_then(|n| n.parse::<u64>().ok()) {
        if let Some(shell) = child.id() {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                // CRIU itself, the shell's child: the shell then does what it is there for
                for pid in process::children(shell) {
                    tracing::warn!(pid, "AWAY_FAULT_LAZY_TARGET: killing the lazy-pages daemon");
                    let _ = process::signal_if(pid, Signal::KILL, |p| p.ppid == shell);
                }
            });
        }
    }
}

/// A directory for the restored process's pid: random name, mode 0700 (set here:
/// tempfile's default follows the umask, 0755), so no other user can predict it, plant
/// a file or put a symlink there.
fn pid_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new().prefix("away-lazy-restored-").permissions(std::fs::Permissions::from_mode(0o700)).tempdir()
}

/// The pid for the supervising shell: a new owner-only file, never through a link.
fn write_pid(path: &Path, pid: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?
        .write_all(pid.to_string().as_bytes())
}

/// The shell around `criu lazy-pages` (arguments: `$@`): a failed daemon takes the
/// process named in `$AWAY_RESTORED_PIDFILE` with it, if the restore got that far.
/// The shell around the lazy-pages daemon. SIGTERM (the agent's death: the shell's
/// parent-death signal) ends the daemon: a daemon whose agent (and page relay) is gone
/// may wait forever (seen while the restore had not handed its pages over yet). A
/// daemon that failed, or was ended so, takes the restored copy along.
const SUPERVISOR: &str = r#"criu "$@" & c=$!
trap 'kill -9 "$c" 2>/dev/null' TERM
wait "$c"; rc=$?
while kill -0 "$c" 2>/dev/null; do wait "$c"; rc=$?; done
if [ "$rc" -ne 0 ] && [ -s "$AWAY_RESTORED_PIDFILE" ]; then kill -9 "$(cat "$AWAY_RESTORED_PIDFILE")" 2>/dev/null; fi
rm -f "$AWAY_RESTORED_PIDFILE"; rmdir "${AWAY_RESTORED_PIDFILE%/*}" 2>/dev/null
exit "$rc""#;

/// Mount points at or below `dir`, in mount order (from /proc/self/mountinfo, where
/// the fifth field is the mount point with space, tab, newline and backslash in octal).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            PathBuf::from(m.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\"))
        })
        .filter(|m| m.starts_with(dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame reaches the peer without a later write: a writer that keeps what it was
    /// given until flushed (as a TLS stream does when its socket is full) must be
    /// flushed, or a peer waiting for that frame before it asks for more waits forever.
    #[tokio::test]
    async fn each_frame_is_flushed() {
        let (mut plain_in, mut plain_out) = tokio::io::duplex(1 << 20);
        let (net_w, mut net_r) = tokio::io::duplex(1 << 20);
        // a buffer larger than the frame: only a flush sends it on
        let mut held = tokio::io::BufWriter::with_capacity(1 << 20, net_w);
        let counters = RelayCounters::default();
        let mut framer = Framer::new(None, true);
        let relay = plain_to_framed(&mut plain_out, &mut held, &counters, &mut framer);
        let peer = async {
            // one answer; the relay's input stays open (the page server waits for the
            // next request, which comes only after this answer)
            plain_in.write_all(&[7u8; 4096]).await.unwrap();
            let mut len = [0u8; 4];
            let read = tokio::time::timeout(Duration::from_secs(5), net_r.read_exact(&mut len)).await;
            assert!(read.is_ok(), "the frame stayed in the writer's buffer");
        };
        tokio::select! {
            r = relay => panic!("the relay ended: {r:?}"),
            () = peer => {}
        }
    }

    /// A fake "CRIU" that answers every request with 64 KiB of pages; after the
    /// closing request it answers a status and, like CRIU, wants the peer's EOF next.
    /// Returns (requests, bytes of a cut request, clean end as CRIU would judge it).
    async fn fake_server(listener: TcpListener) -> (u64, Vec<u8>, bool) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = 0u64;
        let mut req = Vec::new();
        loop {
            let mut b = [0u8; PS_IOV_SIZE];
            let n = s.read(&mut b[..PS_IOV_SIZE - req.len()]).await.unwrap_or(0);
            if n == 0 {
                // EOF before the closing request: CRIU would take it as the end, which is
                // what the relay must never let happen by accident
                return (got, req, false);
            }
            req.extend_from_slice(&b[..n]);
            if req.len() < PS_IOV_SIZE {
                continue;
            }
            got += 1;
            if is_final_request(&req) {
                s.write_all(&[0u8; 4]).await.unwrap();
                let mut c = [0u8; 1];
                let clean = matches!(s.read(&mut c).await, Ok(0));
                return (got, Vec::new(), clean);
            }
            req.clear();
            if s.write_all(&vec![7u8; 64 * 1024]).await.is_err() {
                return (got, Vec::new(), false);
            }
        }
    }

    type PairOutcome = (u64, Vec<u8>, bool, Result<(), LazyError>, u64, u64);

    async fn pair(fault: Option<LazyFault>, compress: bool) -> PairOutcome {
        pair_over(fault, compress, PageLink::plaintext(), PageLink::plaintext(), None).await
    }

    /// The relay pair over `source_link` and `target_link`; `first`: a connection made
    /// to the source relay before the target's.
    async fn pair_over(
        fault: Option<LazyFault>,
        compress: bool,
        source_link: PageLink,
        target_link: PageLink,
        first: Option<crate::channel::Channels>,
    ) -> PairOutcome {
        let criu = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let criu_addr = criu.local_addr().unwrap();
        let server = tokio::spawn(fake_server(criu));
        let connect = move || std::net::TcpStream::connect(criu_addr);
        let source =
            SourceRelay::start("127.0.0.1:0".parse().unwrap(), connect, fault, compress, source_link).await.unwrap();
        let upstream = SocketAddr::from(([127, 0, 0, 1], source.port));
        if let Some(intruder) = first {
            // a page request from whoever it is: the relay must not pass it to CRIU
            let tcp = TcpStream::connect(upstream).await.unwrap();
            if let Ok(mut s) = intruder.connect(tcp, "source").await {
                let mut close = [0u8; PS_IOV_SIZE];
                close[..4].copy_from_slice(&PS_IOV_CLOSE.to_le_bytes());
                let _ = s.write_all(&close).await;
                let _ = s.flush().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let target = TargetRelay::start(upstream, None, target_link).await.unwrap();
        let mut daemon = TcpStream::connect(("127.0.0.1", target.port)).await.unwrap();
        let mut page = vec![0u8; 64 * 1024];
        for _ in 0..20 {
            if daemon.write_all(&[1u8; PS_IOV_SIZE]).await.is_err() || daemon.read_exact(&mut page).await.is_err() {
                break;
            }
        }
        assert!(source.counters.closed_at().is_none(), "the source saw a close before the daemon's");
        let mut close = [0u8; PS_IOV_SIZE];
        close[..4].copy_from_slice(&PS_IOV_CLOSE.to_le_bytes());
        let _ = daemon.write_all(&close).await;
        let mut status = [0u8; 4];
        if daemon.read_exact(&mut status).await.is_ok() {
            // the move's lazy phase ends there (its report's `lazy-pages`)
            assert!(source.counters.closed_at().is_some(), "the source relay marks the daemon's close");
        }
        drop(daemon);
        let (wire, plain) = (source.counters.wire(), source.counters.plain());
        let relay = source.wait().await;
        let (requests, tail, clean) = server.await.unwrap();
        (requests, tail, clean, relay, wire, plain)
    }

    #[tokio::test]
    async fn pages_move_compressed_and_the_end_is_clean() {
        let (requests, tail, clean, relay, wire, plain) = pair(None, true).await;
        assert_eq!(requests, 21, "20 page requests and the close");
        assert!(tail.is_empty());
        assert!(clean, "CRIU saw the closing request, then EOF");
        relay.expect("clean end");
        assert!(plain > 20 * 64 * 1024, "{plain}");
        assert!(wire < plain / 10, "constant pages compress: {wire} wire bytes for {plain}");
    }

    #[tokio::test]
    async fn under_tls_the_relay_takes_only_the_target_node() {
        let ca = crate::channel::testing::TestCa::new();
        let link = |node: &str, peer: &str| PageLink { channels: ca.channels(node), peer_node: peer.into() };
        // another node the CA vouches for connects first and asks CRIU to close: dropped
        let (requests, _, clean, relay, _, _) =
            pair_over(None, true, link("source", "target"), link("target", "source"), Some(ca.channels("intruder")))
                .await;
        assert_eq!(requests, 21, "only the target's 20 requests and its close reached CRIU");
        assert!(clean);
        relay.expect("clean end");
        // plain TCP first: dropped as well
        let (requests, _, clean, relay, _, _) = pair_over(
            None,
            true,
            link("source", "target"),
            link("target", "source"),
            Some(crate::channel::Channels::plaintext()),
        )
        .await;
        assert_eq!(requests, 21);
        assert!(clean && relay.is_ok());
    }

    #[tokio::test]
    async fn stored_frames_move_and_end_clean() {
        let (requests, _, clean, relay, wire, plain) = pair(None, false).await;
        assert_eq!(requests, 21);
        assert!(clean);
        relay.expect("clean end");
        assert!(wire > plain, "stored: the pages and a header and checksum per frame: {wire} for {plain}");
    }

    /// The process running the relay killed outright (SIGKILL: none of its code runs, the
    /// kernel closes its sockets): CRIU must read a reset, which fails the dump and
    /// resumes the source, never the plain end of stream it takes for "every page moved".
    /// The relay runs in a child process (this test binary again, the test below).
    #[tokio::test]
    async fn a_relay_killed_outright_resets_the_page_server_connection() {
        let criu = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = criu.local_addr().unwrap();
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "lazy::tests::relay_child", "--nocapture", "--include-ignored"])
            .env("AWAY_TEST_RELAY_CRIU", addr.to_string())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), criu.accept()).await.unwrap().unwrap();
        // relaying (the connection to CRIU set up): killed
        tokio::time::sleep(Duration::from_millis(300)).await;
        child.start_kill().unwrap();
        let _ = child.wait().await;
        let mut b = [0u8; PS_IOV_SIZE];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await.expect("an answer");
        assert!(matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset), "CRIU read {r:?}");
    }

    /// The child of the test above: a source relay to the "CRIU" it is given, with the
    /// target connected, waiting until it is killed. Ignored on its own.
    #[tokio::test]
    #[ignore = "run by a_relay_killed_outright_resets_the_page_server_connection"]
    async fn relay_child() {
        let Ok(addr) = std::env::var("AWAY_TEST_RELAY_CRIU") else { return };
        let connect = move || std::net::TcpStream::connect(addr.as_str());
        let source = SourceRelay::start("127.0.0.1:0".parse().unwrap(), connect, None, true, PageLink::plaintext())
            .await
            .unwrap();
        let _target = TcpStream::connect(("127.0.0.1", source.port)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    #[tokio::test]
    async fn a_cut_link_poisons_the_page_server() {
        let (requests, tail, clean, relay, _, _) = pair(Some(LazyFault::CutAfter(200_000)), true).await;
        assert!(requests < 21 && !clean, "the close never arrived: {requests}");
        assert_eq!(
            tail,
            away_runtime::CRIU_PAGE_SERVER_ABORT.to_vec(),
            "CRIU got a truncated request, not a clean close"
        );
        assert!(matches!(relay, Err(LazyError::FaultCut { .. })), "{relay:?}");
    }

    #[tokio::test]
    async fn corrupt_pages_poison_the_page_server() {
        for compress in [true, false] {
            let (requests, tail, clean, relay, _, _) = pair(Some(LazyFault::CorruptAfter(200_000)), compress).await;
            assert!(requests < 21 && !clean, "{requests}");
            assert_eq!(tail, away_runtime::CRIU_PAGE_SERVER_ABORT.to_vec());
            assert!(relay.is_err());
        }
    }

    /// The pid file the supervising root shell reads: unpredictable, owner-only, new.
    #[test]
    fn the_pid_file_is_private_and_unpredictable() {
        use std::os::unix::fs::PermissionsExt;
        let (a, b) = (pid_dir().unwrap(), pid_dir().unwrap());
        assert_ne!(a.path(), b.path());
        assert_eq!(std::fs::metadata(a.path()).unwrap().permissions().mode() & 0o777, 0o700);
        let file = a.path().join("pid");
        write_pid(&file, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "42");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        // never over an existing file or through a link
        assert!(write_pid(&file, 43).is_err());
        let link = b.path().join("pid");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(write_pid(&link, 44).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "42");
    }
}
