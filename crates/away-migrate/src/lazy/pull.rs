//! Streamed stop-and-copy: the source dumps lazily (CRIU keeps the memory in its page
//! server, nothing is written to the source's disk), and every page travels through
//! the compressing relay straight into the checkpoint's images while the small rest of
//! the payload travels; then the target restores as from an ordinary dump. The dump,
//! compression and transfer overlap instead of following each other, and the pages
//! land where the restore reads them, with no staging copy on either side.
//!
//! The page link opens when the move is announced, while the source still runs
//! ([`EarlyLink`]), and the source pushes every page down it from the moment its dump
//! ends ([`Push`]): the link's handshake, the payload's trip and a request's round
//! trip are all off the pause. The target only reads until its close. A target given
//! no early link, or a source that cannot plan the push, falls back to the pull: the
//! target connects once the payload is in and asks for each range itself.
//!
//! The source stays frozen (CRIU waits in its page server) until the target, its copy
//! running, sends the closing request ([`PulledPages::release`]); any failure before
//! that ends the link without it, and the source relay makes CRIU resume the source.
//!
//! Pages answer CRIU GET requests (see [`super::prefetch`] for the protocol) for
//! each lazy range, 1 MiB at a time with 8 requests in flight, and are written at
//! their place in the new pages image; the pagemap's lazy entries become present.

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

use away_runtime::host::beneath::{Beneath, BeneathError};

use super::early::{EarlyLink, Found};
use super::pagemap::{Pagemap, PE_PRESENT};
use super::prefetch::{fields, request, PAGE, PS_IOV_GET};
use super::{framed_link, Framer, LazyError, RelayCounters, CHUNK, PS_IOV_CLOSE, PS_IOV_SIZE};

/// Pages per request, and requests in flight: 8 MiB raw ahead covers a WAN's
/// bandwidth-delay product several times over.
const PULL_PAGES: u64 = 256;
const PULL_WINDOW: usize = 8;

/// Plain CRIU protocol on an in-process pipe, and the task that relays it over the page
/// link (frames, compressed) to the source. Dropped, the relay stops.
pub(super) struct PageStream {
    pub(super) link: DuplexStream,
    relay: tokio::task::JoinHandle<Result<(), LazyError>>,
    pub(super) counters: Arc<RelayCounters>,
}

impl Drop for PageStream {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

/// Pages pushed ahead of the reader, held in the pipe (then in the socket): the source
/// pushes from the end of its dump, the target reads once the payload is in and its
/// images are set up (about a round trip and the payload later, 16 MiB on a fast LAN).
const EARLY_BUFFER: usize = 16 << 20;

impl PageStream {
    /// The link to the source relay at `upstream`, connected by a task of its own.
    pub(super) fn connect(upstream: SocketAddr, link: super::PageLink) -> PageStream {
        let counters = Arc::new(RelayCounters::default());
        let (link_end, outer) = tokio::io::duplex(EARLY_BUFFER);
        let c = counters.clone();
        let relay = tokio::spawn(async move {
            let net = link.connect(upstream).await?;
            let (mut n_r, mut n_w) = tokio::io::split(net);
            framed_link(outer, &mut n_r, &mut n_w, &c).await
        });
        PageStream { link: link_end, relay, counters }
    }

    /// The relay's own error, which says more than the pipe's end (a corrupt frame, a
    /// cut, a refused handshake), when it has ended with one.
    pub(super) async fn explain(&mut self, e: LazyError) -> LazyError {
        if !self.relay.is_finished() {
            return e;
        }
        match (&mut self.relay).await {
            Ok(Err(relay)) => LazyError::Pull { pipe: Box::new(e), relay: Box::new(relay) },
            _ => e,
        }
    }

    /// The plain side has ended (the source's status read, the end sent): wait for the
    /// relay to end too, with its verdict.
    pub(super) async fn finish(&mut self) -> Result<(), LazyError> {
        match tokio::time::timeout(Duration::from_secs(30), &mut self.relay).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(LazyError::task("page relay")(e)),
            Err(_) => Err(LazyError::NotWithin { what: "the page relay did not end", secs: 30 }),
        }
    }
}

/// Every page of a checkpoint is in its images; the source waits for [`release`].
///
/// [`release`]: PulledPages::release
pub struct PulledPages {
    stream: PageStream,
    pub pages: u64,
}

impl PulledPages {
    /// Bytes through the page link.
    pub fn counters(&self) -> &RelayCounters {
        &self.stream.counters
    }

    /// The copy runs: tell the source's CRIU every page moved (it then ends the source
    /// process) and wait for its answer.
    pub async fn release(mut self) -> Result<(), LazyError> {
        let link = &mut self.stream.link;
        let close = request(PS_IOV_CLOSE, 0, 0, 0);
        link.write_all(&close).await.map_err(LazyError::io("send the closing request"))?;
        let mut status = [0u8; 4];
        let answer = tokio::time::timeout(Duration::from_secs(30), link.read_exact(&mut status)).await;
        match answer {
            Ok(Ok(_)) if status == [0; 4] => {}
            Ok(Ok(_)) => return Err(LazyError::BadEndStatus { status }),
            Ok(Err(e)) => return Err(LazyError::io("no answer to the closing request")(e)),
            Err(_) => return Err(LazyError::NotWithin { what: "no answer to the closing request", secs: 30 }),
        }
        // CRIU wants the peer's end after its answer
        let _ = link.shutdown().await;
        self.stream.finish().await
    }

    /// Give up: the link ends without the closing request and the source resumes.
    pub fn abort(self) {
        drop(self.stream);
    }
}

/// The source's half of a pushed stream: the lazy ranges of its checkpoint and its
/// process's pid in it. The source asks CRIU for them in the walk the target reads them
/// in ([`walk`]) and sends each answer down the link as it comes.
pub struct Push {
    ranges: Vec<(u64, u64)>,
    pid: u64,
}

impl Push {
    /// The push of checkpoint `dir`; None (the target pulls) unless it has exactly one
    /// process's pagemap.
    pub fn of_checkpoint(dir: &Path) -> Option<Push> {
        let (ranges, pid) = super::prefetch::lazy_ranges(dir)?;
        Some(Push { ranges, pid })
    }

    /// Ask CRIU (`criu_r`, `criu_w`) for every page and frame its answers onto `net_w`.
    pub(super) async fn send(
        &self,
        criu_r: &mut (impl AsyncRead + Unpin),
        criu_w: &mut (impl AsyncWrite + Unpin),
        net_w: &mut (impl AsyncWrite + Unpin),
        framer: &mut Framer,
        counters: &RelayCounters,
    ) -> Result<(), LazyError> {
        let slots: Vec<Slot> = self.ranges.iter().map(|&(vaddr, pages)| Slot { vaddr, pages, offset: 0 }).collect();
        let mut walk = Walk::new(&slots, self.pid, "the source's CRIU");
        let mut answer = Vec::new();
        while walk.next(criu_r, Some(&mut *criu_w)).await?.is_some() {
            answer.clear();
            answer.extend_from_slice(&walk.head);
            answer.extend_from_slice(&walk.data);
            for piece in answer.chunks(CHUNK) {
                framer.send(net_w, piece, counters).await?;
            }
        }
        Ok(())
    }
}

/// Where each page goes: an entry's pages are at `offset` in the new pages image.
struct Slot {
    vaddr: u64,
    pages: u64,
    offset: u64,
}

/// Take every lazy page of the checkpoint in `dir` from the source relay `upstream`
/// and rewrite its images as those of a complete dump: over `early` when the target
/// opened the link at the announce (else connected now), read as the source pushes
/// them when its offer says so, else asked for.
pub async fn pull_all(
    dir: &Path,
    upstream: SocketAddr,
    link: &super::PageLink,
    early: Option<EarlyLink>,
) -> Result<PulledPages, LazyError> {
    // a received checkpoint: each of its files is opened beneath it, never through a link
    let root = Beneath::open(dir)?;
    let (image, pid) =
        super::pagemap::single_image(dir).ok_or_else(|| LazyError::NoSinglePagemap { dir: dir.to_path_buf() })?;
    let image_name = PathBuf::from(image.file_name().unwrap_or_default());
    let mut map =
        Pagemap::parse(&root.read(&image_name)?).ok_or_else(|| LazyError::NotPagemap { path: image.clone() })?;
    let old_name = PathBuf::from(format!("pages-{}.img", map.pages_id()));
    let new_name = PathBuf::from(format!("pages-{}.img.pulling", map.pages_id()));
    let old_pages = dir.join(&old_name);
    let new_pages = dir.join(&new_name);

    // the new pages image: every present page in entry order. Its size comes from the
    // peer's pagemap: it must fit on this disk before anything is written or planned
    let mut slots = Vec::new();
    let mut new_at = 0u64;
    let in_new_image = |e: &&super::pagemap::Entry| e.is_lazy_only() || e.flags() & PE_PRESENT != 0;
    for e in map.entries.iter().filter(in_new_image) {
        if e.is_lazy_only() {
            slots.push(Slot { vaddr: e.vaddr(), pages: e.pages(), offset: new_at });
        }
        new_at = new_at.saturating_add(e.pages().saturating_mul(PAGE));
    }
    let lazy_pages = slots.iter().map(|s| s.pages).fold(0, u64::saturating_add);
    let free = root.free_bytes()?;
    if new_at > free {
        return Err(LazyError::TooLarge { pages: lazy_pages, bytes: new_at, free, dir: dir.to_path_buf() });
    }
    // (it goes again if anything below fails)
    let _partial = RemoveUnlessKept(new_pages.clone());
    let out = root.create(&new_name, 0o600)?;
    let old = root.open_file(&old_name).ok();
    // the same entries as sized above, in the same order: present pages copied now, the
    // lazy slots left as holes for the pull
    let (mut old_at, mut at) = (0u64, 0u64);
    for e in map.entries.iter().filter(in_new_image) {
        let len = e.pages() * PAGE;
        if !e.is_lazy_only() {
            let old = old.as_ref().ok_or_else(|| LazyError::Missing { path: old_pages.clone() })?;
            copy_range(old, old_at, &out, at, len).map_err(LazyError::file("copy", &old_pages))?;
            old_at += len;
        }
        at += len;
    }
    out.set_len(new_at).map_err(LazyError::file("size", &new_pages))?;

    let (mut stream, pushed) = match early {
        Some(early) => match early.offer().await? {
            Found::Pages { stream, pushed } => (stream, pushed),
            Found::Lazy(_) => {
                return Err(LazyError::BadOffer { reason: "a lazy move's, for a streamed restore".into() });
            }
        },
        None => (PageStream::connect(upstream, link.clone()), false),
    };
    let fault = TargetFault::from_env();
    let mut received = 0u64;
    let (mut r, mut w) = tokio::io::split(&mut stream.link);
    // a GET names the process by its pid in the checkpoint, as CRIU's lazy-pages
    // daemon does (criu/uffd.c), not by the encoded id of image writes
    let mut walk = Walk::new(&slots, pid, "the source");
    let fetched = async {
        while let Some(offset) = walk.next(&mut r, (!pushed).then_some(&mut w)).await? {
            out.write_all_at(&walk.data, offset).map_err(LazyError::io("write the pulled pages"))?;
            received += walk.data.len() as u64;
            if let Some(f) = &fault {
                f.hit(received);
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = fetched {
        return Err(stream.explain(e).await);
    }
    let pulled = PulledPages { stream, pages: lazy_pages };
    drop(out);
    for e in map.entries.iter_mut().filter(|e| e.is_lazy_only()) {
        e.set_flags(e.flags() | PE_PRESENT);
    }
    let rewrite = || -> Result<(), BeneathError> {
        root.rename(&new_name, &old_name)?;
        map.store(&image)
    };
    if let Err(e) = rewrite() {
        pulled.abort();
        return Err(e.into());
    }
    Ok(pulled)
}

/// Removes a file when dropped, unless it has been renamed away by then.
struct RemoveUnlessKept(PathBuf);

impl Drop for RemoveUnlessKept {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn copy_range(from: &std::fs::File, at: u64, to: &std::fs::File, to_at: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..n], at + done)?;
        to.write_all_at(&buf[..n], to_at + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The walk over every slot's pages, 256 at a time, `PULL_WINDOW` requests ahead. CRIU
/// answers in request order, possibly fewer pages than asked (a page pipe's end): the
/// rest is asked again, first. With a writer to ask on, each step's requests go out;
/// without, the source sends the answers of this same walk unasked ([`Push`]) and they
/// are checked against it all the same.
struct Walk<'a> {
    // requests are made as they go out, never all at once: the page counts are the peer's
    planned: Box<dyn Iterator<Item = (u64, u64, u64)> + Send + 'a>,
    // the rest of a range answered in part goes first
    again: Option<(u64, u64, u64)>,
    asked: std::collections::VecDeque<(u64, u64, u64)>,
    dst: u64,
    peer: &'static str,
    /// The last answer: its header and its pages.
    head: [u8; PS_IOV_SIZE],
    data: Vec<u8>,
}

impl<'a> Walk<'a> {
    fn new(slots: &'a [Slot], dst: u64, peer: &'static str) -> Walk<'a> {
        let planned = slots.iter().flat_map(|s| {
            (0..s.pages.div_ceil(PULL_PAGES)).map(move |i| {
                let first = i * PULL_PAGES;
                (s.vaddr + first * PAGE, (s.pages - first).min(PULL_PAGES), s.offset + first * PAGE)
            })
        });
        Walk {
            planned: Box::new(planned),
            again: None,
            asked: Default::default(),
            dst,
            peer,
            head: [0; PS_IOV_SIZE],
            data: Vec::new(),
        }
    }

    /// The next answer, read into `head` and `data`: where its pages go in the new
    /// image, or None when every slot is done.
    async fn next(
        &mut self,
        r: &mut (impl AsyncRead + Unpin),
        mut ask: Option<&mut (impl AsyncWrite + Unpin)>,
    ) -> Result<Option<u64>, LazyError> {
        while self.asked.len() < PULL_WINDOW {
            let Some(q) = self.again.take().or_else(|| self.planned.next()) else { break };
            if let Some(w) = ask.as_mut() {
                w.write_all(&request(PS_IOV_GET, q.1, q.0, self.dst)).await.map_err(LazyError::io("ask for pages"))?;
            }
            self.asked.push_back(q);
        }
        let Some((vaddr, pages, offset)) = self.asked.pop_front() else { return Ok(None) };
        // a source host that vanished sends no end either
        tokio::time::timeout(super::IDLE_TIMEOUT, r.read_exact(&mut self.head))
            .await
            .map_err(|_| LazyError::Idle { peer: self.peer, secs: super::IDLE_TIMEOUT.as_secs() })?
            .map_err(LazyError::io("the page stream ended"))?;
        let (_, got, at, _) = fields(&self.head);
        if at != vaddr || got == 0 || got > pages {
            return Err(LazyError::LostTrack { got, at, pages, vaddr });
        }
        self.data.resize((got * PAGE) as usize, 0);
        r.read_exact(&mut self.data).await.map_err(LazyError::io("the page stream ended"))?;
        if got < pages {
            // the rest of this range goes next, ahead of the planned ones
            self.again = Some((vaddr + got * PAGE, pages - got, offset + got * PAGE));
        }
        Ok(Some(offset))
    }
}

/// Fault injection for the end-to-end tests: `AWAY_FAULT_STREAM_TARGET=die-after:BYTES`
/// kills the receiving agent outright once that many page bytes have arrived. Without
/// the `fault-injection` feature there is no such fault (the type has no value).
#[derive(Debug, Clone, Copy)]
enum TargetFault {
    #[cfg(feature = "fault-injection")]
    DieAfter(u64),
}

impl TargetFault {
    #[cfg(feature = "fault-injection")]
    fn from_env() -> Option<TargetFault> {
        let v = std::env::var("AWAY_FAULT_STREAM_TARGET").ok()?;
        v.strip_prefix("die-after:")?.parse().ok().map(TargetFault::DieAfter)
    }

    #[cfg(not(feature = "fault-injection"))]
    fn from_env() -> Option<TargetFault> {
        None
    }

    /// `received` page bytes are in: die if that is the fault's moment.
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    fn hit(&self, received: u64) {
        match *self {
            #[cfg(feature = "fault-injection")]
            TargetFault::DieAfter(limit) => {
                if received >= limit {
                    tracing::error!(received, "AWAY_FAULT_STREAM_TARGET: the target dies mid-pull");
                    std::process::abort();
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::pagemap::{Entry, PE_LAZY};
    use super::super::{PageLink, SourceRelay, PS_IOV_SIZE};
    use super::*;
    use tokio::net::TcpListener;

    /// A page's content: its address, repeated.
    pub(in crate::lazy) fn page(vaddr: u64) -> Vec<u8> {
        vaddr.to_le_bytes().repeat(PAGE as usize / 8)
    }

    /// CRIU's page server for process 1: answers GETs with at most 100 pages (as at a
    /// page pipe's end), the close with status 0. Returns whether the close came, then
    /// the end, and how many pages it sent.
    pub(in crate::lazy) async fn fake_criu(listener: TcpListener) -> (bool, u64) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut sent = 0;
        loop {
            let mut req = [0u8; PS_IOV_SIZE];
            if s.read_exact(&mut req).await.is_err() {
                return (false, sent);
            }
            let (cmd, pages, vaddr, dst) = fields(&req);
            if cmd == PS_IOV_CLOSE {
                s.write_all(&[0; 4]).await.unwrap();
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                return (rest.is_empty(), sent);
            }
            assert_eq!((cmd, dst), (PS_IOV_GET, 1));
            let n = pages.min(100);
            sent += n;
            let mut answer = request(0x100 | PS_IOV_GET, n, vaddr, dst).to_vec();
            for i in 0..n {
                answer.extend(page(vaddr + i * PAGE));
            }
            s.write_all(&answer).await.unwrap();
        }
    }

    /// A checkpoint in a fresh directory: 2 present pages at `A`, 700 lazy ones at `B`
    /// (more than two requests' worth, and CRIU's answers of at most 100 pages end
    /// inside them), 1 present page at `C`.
    pub(in crate::lazy) fn three_entries(name: &str) -> tempfile::TempDir {
        let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
        // magics, then the head {pages_id: 1}
        let img = [vec![0u8; 8], 2u32.to_le_bytes().to_vec(), vec![0x08, 0x01]].concat();
        let mut map = Pagemap::parse(&img).unwrap();
        map.entries = vec![Entry::new(A, 2, PE_PRESENT), Entry::new(B, 700, PE_LAZY), Entry::new(C, 1, PE_PRESENT)];
        std::fs::write(dir.path().join("pagemap-1.img"), map.encode()).unwrap();
        let old: Vec<u8> = [page(A), page(A + PAGE), page(C)].concat();
        std::fs::write(dir.path().join("pages-1.img"), &old).unwrap();
        dir
    }

    const A: u64 = 0x5555_0000_0000;
    pub(in crate::lazy) const B: u64 = 0x7f00_0000_0000;
    const C: u64 = 0x7fff_0000_0000;

    /// Every page of [`three_entries`] at its place, and no entry left lazy.
    fn assert_complete(dir: &Path) {
        let pages = std::fs::read(dir.join("pages-1.img")).unwrap();
        let want: Vec<u8> = std::iter::once(page(A))
            .chain([page(A + PAGE)])
            .chain((0..700).map(|i| page(B + i * PAGE)))
            .chain([page(C)])
            .collect::<Vec<_>>()
            .concat();
        assert!(pages == want, "every page at its place in entry order");
        let map = Pagemap::parse(&std::fs::read(dir.join("pagemap-1.img")).unwrap()).unwrap();
        assert!(map.entries.iter().all(|e| e.flags() & PE_PRESENT != 0), "no entry is left lazy");
        assert!(map.lazy_ranges().is_empty());
    }

    /// The target closes: the source's CRIU sent each page once, saw the close, then the
    /// end, and every page of [`three_entries`] is in its images.
    async fn closed_complete(
        pulled: PulledPages,
        criu: tokio::task::JoinHandle<(bool, u64)>,
        source: SourceRelay,
        dir: &Path,
    ) {
        pulled.release().await.unwrap();
        assert_eq!(
            criu.await.unwrap(),
            (true, 700),
            "the source's CRIU sent each page once, saw the close, then the end"
        );
        source.wait().await.expect("a clean end at the source");
        assert_complete(dir);
    }

    #[tokio::test]
    async fn every_lazy_page_lands_in_the_images_in_order() {
        let dir = three_entries("away-pull-");
        let criu = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let criu_addr = criu.local_addr().unwrap();
        let server = tokio::spawn(fake_criu(criu));
        let connect = move || std::net::TcpStream::connect(criu_addr);
        let source = SourceRelay::start("127.0.0.1:0".parse().unwrap(), connect, None, true, PageLink::plaintext())
            .await
            .unwrap();
        let upstream = SocketAddr::from(([127, 0, 0, 1], source.port));
        let pulled = pull_all(dir.path(), upstream, &PageLink::plaintext(), None).await.unwrap();
        assert_eq!(pulled.pages, 700);
        assert!(pulled.counters().wire() < pulled.counters().plain(), "the pages travel compressed");
        closed_complete(pulled, server, source, dir.path()).await;
    }

    /// The streamed move's way: the target's link is up (and carries filler) before the
    /// dump, the source pushes every page (asking its CRIU itself, re-asking what an
    /// answer left out) before the target reads any, and the target only reads, then
    /// closes.
    #[tokio::test]
    async fn pushed_pages_land_like_pulled_ones_and_the_target_asks_for_none() {
        let dir = three_entries("away-push-");
        let pending =
            super::super::PendingRelay::listen("127.0.0.1:0".parse().unwrap(), PageLink::plaintext()).await.unwrap();
        let upstream = SocketAddr::from(([127, 0, 0, 1], pending.port));
        // announced: the link opens before there is a page server
        let early = EarlyLink::connect(upstream, PageLink::plaintext());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let criu = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let criu_addr = criu.local_addr().unwrap();
        let server = tokio::spawn(fake_criu(criu));
        let push = Push::of_checkpoint(dir.path()).expect("one process's pagemap");
        let source = pending.start(
            move || std::net::TcpStream::connect(criu_addr),
            None,
            true,
            Some(super::super::early::Offer::Push(push)),
        );
        // every page crosses before the target reads one (the payload is still on its way)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while source.counters.plain() < 700 * PAGE {
            assert!(tokio::time::Instant::now() < deadline, "pushed {} bytes", source.counters.plain());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pulled =
            pull_all(dir.path(), "127.0.0.1:9".parse().unwrap(), &PageLink::plaintext(), Some(early)).await.unwrap();
        assert_eq!(pulled.pages, 700);
        // the filler that kept the link busy while the "dump" ran was read and dropped
        assert!(pulled.counters().wire() >= super::super::WARM_UP_MAX, "{:?}", pulled.counters());
        assert!(source.counters.wire() >= super::super::WARM_UP_MAX, "{:?}", source.counters);
        // (a request of the target's would reach CRIU after the push: pages sent twice)
        closed_complete(pulled, server, source, dir.path()).await;
    }

    /// A checkpoint (pagemap `pages_id` 1, one entry) in a fresh directory.
    fn checkpoint(name: &str, entry: Entry) -> tempfile::TempDir {
        let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
        let img = [vec![0u8; 8], 2u32.to_le_bytes().to_vec(), vec![0x08, 0x01]].concat();
        let mut map = Pagemap::parse(&img).unwrap();
        map.entries = vec![entry];
        std::fs::write(dir.path().join("pagemap-1.img"), map.encode()).unwrap();
        std::fs::write(dir.path().join("pages-1.img"), b"").unwrap();
        dir
    }

    /// A peer's pagemap announcing 2^40 lazy pages (4 PiB) is refused before a file is
    /// sized or a request planned from it (nothing listens upstream: it never gets there).
    #[tokio::test]
    async fn a_pagemap_announcing_2_pow_40_pages_is_refused() {
        let dir = checkpoint("away-pull-huge-", Entry::new(0x7f00_0000_0000, 1 << 40, PE_LAZY));
        let err = match pull_all(dir.path(), "127.0.0.1:9".parse().unwrap(), &PageLink::plaintext(), None).await {
            Err(e) => e,
            Ok(_) => panic!("a 4 PiB pull was accepted"),
        };
        assert!(matches!(err, LazyError::TooLarge { pages, .. } if pages == 1 << 40), "{err}");
        assert!(err.to_string().contains("bytes free in"), "{err}");
        assert!(!dir.path().join("pages-1.img.pulling").exists());
    }

    /// A payload that put a symlink where the pull writes: refused, its target unchanged.
    #[tokio::test]
    async fn the_pull_never_writes_through_a_link() {
        let dir = checkpoint("away-pull-link-", Entry::new(0x7f00_0000_0000, 4, PE_LAZY));
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join("pages-1.img.pulling")).unwrap();
        let err = match pull_all(dir.path(), "127.0.0.1:9".parse().unwrap(), &PageLink::plaintext(), None).await {
            Err(e) => e,
            Ok(_) => panic!("pulled through a link"),
        };
        assert!(err.to_string().contains("pages-1.img.pulling"), "{err}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
