//! The page link a move's target opens when the move is announced (`POST
//! /v1/transfers` naming the source's page relay): its TCP and TLS handshakes and its
//! slow start happen while the workload still runs. Once its dump is done the source
//! says first, in one record, what the link carries ([`Offer`]):
//! * a streamed move's pages, pushed unasked ([`Push`]), or to be asked for;
//! * a lazy move's page ranges, the working set first, and its process: the target's
//!   prefetch relay asks for them at once ([`LazyPrefetch`]), while the payload still
//!   travels and the restore starts, and serves the lazy-pages daemon from what has
//!   arrived once it runs. Without the offer the first request would wait for the
//!   payload, the restore's start and a connection of its own.
//!
//! The record has the shape of a page server request (32 bytes: u32 kind, padding,
//! u64 count, u64 pid, u64 zero); a lazy offer's ranges follow it as (u64 vaddr,
//! u64 pages) pairs, little-endian like CRIU's own fields.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, DuplexStream};

use super::prefetch::{self, fields, request, PAGE};
use super::pull::{PageStream, Push};
use super::{LazyError, PageLink, RelayCounters, PS_IOV_SIZE};

const OFFER_PUSH: u32 = 0x7a01;
const OFFER_PULL: u32 = 0x7a02;
const OFFER_LAZY: u32 = 0x7a03;
/// Ranges a lazy offer may name (a pagemap has hundreds): the record stays under 16 MiB.
const MAX_RANGES: u64 = 1 << 20;
/// Pages a lazy offer may name: 64 GiB, the transfer receiver's default payload bound.
/// The prefetch holds what arrives until the daemon takes it.
const MAX_OFFER_PAGES: u64 = (64 << 30) / PAGE;
/// How long a restore waits for the offer: the source sends it when its dump ends,
/// before the payload, so it is there unless the source is gone.
const OFFER_WAIT: Duration = super::IDLE_TIMEOUT;

/// What the source sends first on an early page link, once its dump is done.
pub enum Offer {
    /// A streamed move's pages, every one pushed unasked.
    Push(Push),
    /// A streamed move's pages, for the target to ask for (no push could be planned).
    Pull,
    /// A lazy move: its lazy ranges in the order to fetch them, and its process's pid in
    /// the checkpoint (0 and no ranges without exactly one process's pagemap: the target
    /// then asks as its daemon does).
    Lazy { ranges: Vec<(u64, u64)>, pid: u64 },
}

impl Offer {
    /// A streamed move's offer for checkpoint `dir`.
    pub fn streamed(dir: &Path) -> Offer {
        Push::of_checkpoint(dir).map_or(Offer::Pull, Offer::Push)
    }

    /// A lazy move's offer for checkpoint `dir`: its lazy ranges, those inside `hot`
    /// (the pages the workload wrote while watched) first.
    pub fn lazy(dir: &Path, hot: &[(u64, u64)]) -> Offer {
        match prefetch::lazy_ranges(dir) {
            Some((ranges, pid)) => Offer::Lazy { ranges: prefetch::hot_first(ranges, hot), pid },
            None => Offer::Lazy { ranges: Vec::new(), pid: 0 },
        }
    }

    pub fn pushes(&self) -> bool {
        matches!(self, Offer::Push(_))
    }

    pub(super) fn record(&self) -> Vec<u8> {
        match self {
            Offer::Push(_) => request(OFFER_PUSH, 0, 0, 0).to_vec(),
            Offer::Pull => request(OFFER_PULL, 0, 0, 0).to_vec(),
            Offer::Lazy { ranges, pid } => {
                let mut r = request(OFFER_LAZY, ranges.len() as u64, *pid, 0).to_vec();
                for &(vaddr, pages) in ranges {
                    r.extend(vaddr.to_le_bytes());
                    r.extend(pages.to_le_bytes());
                }
                r
            }
        }
    }
}

/// The record as the target read it.
#[derive(Debug, PartialEq)]
enum Offered {
    Pages { pushed: bool },
    Lazy { ranges: Vec<(u64, u64)>, pid: u64 },
}

async fn read_offer(r: &mut (impl AsyncRead + Unpin)) -> Result<Offered, LazyError> {
    let bad = |reason: String| LazyError::BadOffer { reason };
    let mut head = [0u8; PS_IOV_SIZE];
    r.read_exact(&mut head).await.map_err(LazyError::io("read the source's offer"))?;
    let (kind, count, pid, _) = fields(&head);
    match kind {
        OFFER_PUSH => Ok(Offered::Pages { pushed: true }),
        OFFER_PULL => Ok(Offered::Pages { pushed: false }),
        OFFER_LAZY => {
            if count > MAX_RANGES {
                return Err(bad(format!("{count} ranges, more than {MAX_RANGES}")));
            }
            let mut body = vec![0u8; count as usize * 16];
            r.read_exact(&mut body).await.map_err(LazyError::io("read the source's offer"))?;
            let u = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
            let ranges: Vec<(u64, u64)> = body.chunks_exact(16).map(|c| (u(&c[..8]), u(&c[8..]))).collect();
            let pages = ranges.iter().map(|r| r.1).fold(0u64, u64::saturating_add);
            if pages > MAX_OFFER_PAGES {
                return Err(bad(format!("{pages} pages, more than {MAX_OFFER_PAGES}")));
            }
            Ok(Offered::Lazy { ranges, pid })
        }
        other => Err(bad(format!("an offer of kind {other:#x}"))),
    }
}

/// What the target found on its early link.
pub(super) enum Found {
    /// A streamed move's page stream, past the offer; `pushed`: the pages come unasked.
    Pages { stream: PageStream, pushed: bool },
    /// A lazy move's prefetch, running since the offer came.
    Lazy(LazyPrefetch),
}

/// A move's page link, opened by the target when the source announced the move: it
/// connects in the background, reads the source's offer when it comes and, for a lazy
/// move, starts the prefetch at once. Its restore takes it ([`super::pull::pull_all`],
/// [`super::LazyPagesDaemon::start`]); dropped, it closes.
pub struct EarlyLink {
    task: Option<tokio::task::JoinHandle<Result<Found, LazyError>>>,
}

impl Drop for EarlyLink {
    fn drop(&mut self) {
        // (a finished task's output, a stream or a prefetch, goes with its handle)
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl EarlyLink {
    /// Connect to the source relay at `upstream` (in the background).
    pub fn connect(upstream: std::net::SocketAddr, link: PageLink) -> EarlyLink {
        let task = tokio::spawn(async move {
            let mut stream = PageStream::connect(upstream, link);
            // no bound here: the source dumps first; an offer never sent ends with the
            // link (the source's relay closes) or with the announcement's expiry
            match read_offer(&mut stream.link).await {
                Ok(Offered::Pages { pushed }) => Ok(Found::Pages { stream, pushed }),
                Ok(Offered::Lazy { ranges, pid }) => Ok(Found::Lazy(LazyPrefetch::start(stream, ranges, pid))),
                Err(e) => Err(stream.explain(e).await),
            }
        });
        EarlyLink { task: Some(task) }
    }

    /// What the source offered on the link.
    pub(super) async fn offer(mut self) -> Result<Found, LazyError> {
        let mut task = self.task.take().expect("an early link's offer is taken once");
        match tokio::time::timeout(OFFER_WAIT, &mut task).await {
            Ok(found) => found.map_err(LazyError::task("early page link"))?,
            Err(_) => {
                task.abort();
                Err(LazyError::NotWithin {
                    what: "no offer from the source on the early page link",
                    secs: OFFER_WAIT.as_secs(),
                })
            }
        }
    }
}

/// A lazy move's prefetch on its early link: the target's prefetch relay
/// ([`prefetch::relay`]) asking the source for the offered ranges since the offer
/// came, its daemon side an in-process pipe that the lazy-pages daemon's connection is
/// joined to once it runs ([`super::TargetRelay`]). Dropped, it stops.
pub(super) struct LazyPrefetch {
    ranges: Vec<(u64, u64)>,
    pid: u64,
    /// The pipe's end for the daemon's connection.
    pub(super) daemon: Option<DuplexStream>,
    pub(super) counters: Arc<RelayCounters>,
    pub(super) task: tokio::task::JoinHandle<Result<(), LazyError>>,
}

impl Drop for LazyPrefetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers for the daemon waiting in the pipe (the daemon reads them at its pace).
const DAEMON_PIPE: usize = 4 << 20;

impl LazyPrefetch {
    fn start(mut stream: PageStream, ranges: Vec<(u64, u64)>, pid: u64) -> LazyPrefetch {
        let counters = stream.counters.clone();
        let (inner, outer) = tokio::io::duplex(DAEMON_PIPE);
        let plan = ranges.clone();
        let task = tokio::spawn(async move {
            let pages: u64 = plan.iter().map(|r| r.1).sum();
            let (d_r, d_w) = tokio::io::split(inner);
            let relayed = {
                let (up_r, up_w) = tokio::io::split(&mut stream.link);
                prefetch::relay(d_r, d_w, up_r, up_w, plan, (pid != 0).then_some(pid)).await
            };
            match relayed {
                Ok(stats) => {
                    tracing::info!(lazy_pages = pages, ?stats, "lazy pages: prefetch done (asked from the offer on)");
                    stream.finish().await
                }
                Err(e) => Err(stream.explain(e).await),
            }
        });
        LazyPrefetch { ranges, pid, daemon: Some(outer), counters, task }
    }

    /// The offer against the checkpoint that came with the payload: the same lazy
    /// pages of the same process (a source whose offer and checkpoint disagree is
    /// refused, whatever the reason).
    pub(super) fn check(&self, dir: &Path) -> Result<(), LazyError> {
        let (ranges, pid) = prefetch::lazy_ranges(dir).unwrap_or_default();
        if pid != self.pid || merged(ranges) != merged(self.ranges.clone()) {
            return Err(LazyError::BadOffer {
                reason: format!("its ranges or process do not match the checkpoint in {}", dir.display()),
            });
        }
        Ok(())
    }
}

/// Ranges sorted, adjacent ones joined, empty ones dropped: two lists of the same pages
/// compare equal.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (vaddr, pages) in ranges {
        match out.last_mut() {
            Some(last) if last.0.saturating_add(last.1.saturating_mul(PAGE)) == vaddr => last.1 += pages,
            _ => out.push((vaddr, pages)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::pull::tests::{fake_criu, page, three_entries, B};
    use super::super::{PendingRelay, TargetRelay, PS_IOV_CLOSE};
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A lazy move's way: the target's link is up before the dump; from the dump's end
    /// the source offers its lazy ranges (the working set first) and the target's
    /// prefetch asks for all of them before any daemon runs. The daemon then gets each
    /// page from what arrived, the source's CRIU sent each page once, and the close ends
    /// the dump cleanly.
    #[tokio::test]
    async fn a_lazy_offer_has_every_page_asked_for_before_the_daemon_comes() {
        let dir = three_entries("away-offer-");
        let pending = PendingRelay::listen("127.0.0.1:0".parse().unwrap(), PageLink::plaintext()).await.unwrap();
        let early = EarlyLink::connect(pending.addr(), PageLink::plaintext());
        let criu = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let criu_addr = criu.local_addr().unwrap();
        let server = tokio::spawn(fake_criu(criu));
        let offer = Offer::lazy(dir.path(), &[(B + 600 * PAGE, 50)]);
        let Offer::Lazy { ranges, pid } = &offer else { unreachable!() };
        assert_eq!((ranges[0], *pid), ((B + 600 * PAGE, 50), 1), "the working set first, process 1");
        let source = pending.start(move || std::net::TcpStream::connect(criu_addr), None, true, Some(offer));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while source.counters.plain() < 700 * PAGE {
            assert!(tokio::time::Instant::now() < deadline, "moved {} bytes", source.counters.plain());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Found::Lazy(prefetch) = early.offer().await.unwrap() else { panic!("a lazy offer") };
        prefetch.check(dir.path()).expect("the offer matches the checkpoint");
        let other = tempfile::tempdir().unwrap();
        let err = prefetch.check(other.path()).unwrap_err();
        assert!(err.to_string().contains("do not match the checkpoint"), "{err}");
        let relay = TargetRelay::start_early(prefetch).unwrap();

        // the daemon: 50 pages a time across the lazy range, then the close
        let mut daemon = TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
        for first in (0..700u64).step_by(50) {
            let vaddr = B + first * PAGE;
            daemon.write_all(&request(prefetch::PS_IOV_GET, 50, vaddr, 1)).await.unwrap();
            let mut head = [0u8; PS_IOV_SIZE];
            daemon.read_exact(&mut head).await.unwrap();
            assert_eq!(fields(&head).1..=fields(&head).2, 50..=vaddr);
            let mut data = vec![0u8; 50 * PAGE as usize];
            daemon.read_exact(&mut data).await.unwrap();
            for (i, p) in data.chunks(PAGE as usize).enumerate() {
                assert!(p == page(vaddr + i as u64 * PAGE), "page {i} at {vaddr:#x}");
            }
        }
        daemon.write_all(&request(PS_IOV_CLOSE, 0, 0, 0)).await.unwrap();
        let mut status = [1u8; 4];
        daemon.read_exact(&mut status).await.unwrap();
        assert_eq!(status, [0; 4]);
        daemon.shutdown().await.unwrap();
        assert_eq!(server.await.unwrap(), (true, 700), "each page sent once, the close, then the end");
        source.wait().await.expect("a clean end at the source");
        relay.task.await.unwrap().expect("the target's relay ends well");
    }

    #[tokio::test]
    async fn offers_read_back_as_sent() {
        let lazy = Offer::Lazy { ranges: vec![(0x7f00_0000_0000, 3), (0x5555_0000_0000, 700)], pid: 42 };
        let record = lazy.record();
        assert_eq!(
            read_offer(&mut record.as_slice()).await.unwrap(),
            Offered::Lazy { ranges: vec![(0x7f00_0000_0000, 3), (0x5555_0000_0000, 700)], pid: 42 }
        );
        assert_eq!(read_offer(&mut Offer::Pull.record().as_slice()).await.unwrap(), Offered::Pages { pushed: false });
    }

    #[tokio::test]
    async fn an_offer_of_more_than_64_gib_or_of_an_unknown_kind_is_refused() {
        let huge = Offer::Lazy { ranges: vec![(0x1000, MAX_OFFER_PAGES + 1)], pid: 1 }.record();
        let err = read_offer(&mut huge.as_slice()).await.unwrap_err();
        assert!(err.to_string().contains("more than 16777216"), "{err}");
        let many = request(OFFER_LAZY, MAX_RANGES + 1, 1, 0);
        let err = read_offer(&mut many.as_slice()).await.unwrap_err();
        assert!(err.to_string().contains("ranges"), "{err}");
        let odd = request(0x40006, 8, 0x1000, 1);
        let err = read_offer(&mut odd.as_slice()).await.unwrap_err();
        assert!(err.to_string().contains("kind 0x40006"), "{err}");
    }

    #[test]
    fn the_same_pages_split_otherwise_compare_equal() {
        let p = PAGE;
        assert_eq!(merged(vec![(5 * p, 5), (0, 3), (3 * p, 2), (20 * p, 0)]), vec![(0, 10)]);
        assert_ne!(merged(vec![(0, 3)]), merged(vec![(0, 4)]));
    }
}
