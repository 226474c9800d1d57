//! Prefetch for lazy moves: the target's relay asks the source's CRIU for every lazy
//! page itself, a few chunks ahead, and answers the lazy-pages daemon from what has
//! arrived. CRIU's daemon fetches its background pages one request at a time (one
//! round trip each), which on a WAN leaves most of the link idle; with a window of
//! requests in flight the pages stream at the link's rate, and a fault waits at most
//! behind that window instead of behind a round trip per chunk.
//!
//! It speaks CRIU's page server protocol (criu/page-xfer.c): 32-byte requests
//! (u32 cmd, padding, u64 nr_pages, u64 vaddr, u64 dst_id); a GET is answered by a
//! header of the same shape and the pages, in request order; the closing request by a
//! 4-byte status. Which pages are lazy comes from the checkpoint's pagemap image. Hand
//! written: no crate speaks this protocol.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

use super::{LazyError, PS_CMD_MASK, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE, PS_IOV_SIZE};

pub(super) const PS_IOV_GET: u32 = 7;
pub(super) const PAGE: u64 = 4096;
/// Pages per prefetch request, and requests in flight.
const CHUNK_PAGES: u64 = 64;
const WINDOW: usize = 4;
/// Pages the prefetch holds at most before the daemon's first request (8 MiB). On a
/// fast link the whole memory would otherwise cross while the restore runs, and its
/// decompression takes the CPU the restore needs (measured on the emulated LAN: the
/// restore 0.33-0.43 s instead of 0.23-0.26 s); a WAN moves less than this until the
/// daemon asks.
const BEFORE_DAEMON_PAGES: usize = 2048;
/// The lazy page ranges (vaddr, pages) of a checkpoint, from its one pagemap image,
/// and the process's pid in the checkpoint (what a GET names, as CRIU's daemon does);
/// None when there is not exactly one process or the image cannot be read (then the
/// relay passes requests through unchanged).
pub fn lazy_ranges(checkpoint: &Path) -> Option<(Vec<(u64, u64)>, u64)> {
    let (image, pid) = super::pagemap::single_image(checkpoint)?;
    Some((super::pagemap::Pagemap::parse(&super::pagemap::read_image(&image).ok()?)?.lazy_ranges(), pid))
}

/// The lazy ranges in fetch order: the parts inside `hot` (the pages the workload wrote
/// while watched) first, then the rest in address order.
pub fn hot_first(lazy: Vec<(u64, u64)>, hot: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    for (v, n) in lazy {
        let end = v + n * PAGE;
        let mut at = v;
        for &(hv, hn) in hot.iter().filter(|(hv, hn)| *hv < end && hv + hn * PAGE > v) {
            let (s, e) = (hv.max(v), (hv + hn * PAGE).min(end));
            if s > at {
                rest.push((at, (s - at) / PAGE));
            }
            first.push((s, (e - s) / PAGE));
            at = at.max(e);
        }
        if at < end {
            rest.push((at, (end - at) / PAGE));
        }
    }
    first.extend(rest);
    first
}

/// Fill `buf` from `r`, its first byte already read (`first`) or not.
pub(super) async fn read_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    first: Option<u8>,
    buf: &mut [u8],
) -> Result<(), LazyError> {
    let start = match first {
        Some(b) => {
            buf[0] = b;
            1
        }
        None => 0,
    };
    r.read_exact(&mut buf[start..]).await.map(|_| ()).map_err(LazyError::io("receive"))
}

pub(super) fn request(cmd: u32, pages: u64, vaddr: u64, dst: u64) -> [u8; PS_IOV_SIZE] {
    let mut r = [0u8; PS_IOV_SIZE];
    r[..4].copy_from_slice(&cmd.to_le_bytes());
    r[8..16].copy_from_slice(&pages.to_le_bytes());
    r[16..24].copy_from_slice(&vaddr.to_le_bytes());
    r[24..32].copy_from_slice(&dst.to_le_bytes());
    r
}

pub(super) fn fields(r: &[u8]) -> (u32, u64, u64, u64) {
    let u = |a: usize| u64::from_le_bytes(r[a..a + 8].try_into().expect("8 bytes"));
    (u32::from_le_bytes(r[..4].try_into().expect("4 bytes")), u(8), u(16), u(24))
}

enum Pending {
    Close,
    Fetch { vaddr: u64, pages: u64, urgent: bool },
}

struct State<U> {
    up: U,
    pending: VecDeque<Pending>,
    plan: VecDeque<(u64, u64)>,
    cache: HashMap<u64, Vec<u8>>,
    /// Pages asked of the source and not yet here.
    on_the_way: HashSet<u64>,
    /// Pages handed to the daemon (never fetched again).
    delivered: HashSet<u64>,
    /// The daemon's requests waiting for their pages: (vaddr, pages, dst_id).
    waiting: VecDeque<(u64, u64, u64)>,
    dst: Option<u64>,
    /// The command word CRIU answers a GET with.
    answer_cmd: Option<u32>,
    /// Prefetch (not urgent) requests in flight.
    in_flight: usize,
    /// The daemon has asked for something (until then the prefetch holds at most
    /// [`BEFORE_DAEMON_PAGES`]).
    daemon_asked: bool,
    closing: bool,
    stats: PrefetchStats,
}

impl<U: AsyncWrite + Unpin> State<U> {
    fn new(up: U, ranges: Vec<(u64, u64)>) -> Self {
        State {
            up,
            pending: VecDeque::new(),
            plan: ranges.into(),
            cache: HashMap::new(),
            on_the_way: HashSet::new(),
            delivered: HashSet::new(),
            waiting: VecDeque::new(),
            dst: None,
            answer_cmd: None,
            in_flight: 0,
            daemon_asked: false,
            closing: false,
            stats: PrefetchStats::default(),
        }
    }

    fn missing(&self, p: u64) -> bool {
        !self.cache.contains_key(&p) && !self.on_the_way.contains(&p) && !self.delivered.contains(&p)
    }

    async fn fetch(&mut self, vaddr: u64, pages: u64, dst: u64, urgent: bool) -> Result<(), LazyError> {
        self.up.write_all(&request(PS_IOV_GET, pages, vaddr, dst)).await.map_err(LazyError::io("send"))?;
        for i in 0..pages {
            self.on_the_way.insert(vaddr + i * PAGE);
        }
        self.pending.push_back(Pending::Fetch { vaddr, pages, urgent });
        if !urgent {
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Keep `WINDOW` prefetch requests in flight.
    async fn refill(&mut self) -> Result<(), LazyError> {
        let Some(dst) = self.dst else { return Ok(()) };
        while !self.closing && self.in_flight < WINDOW {
            if !self.daemon_asked && self.cache.len() + self.on_the_way.len() >= BEFORE_DAEMON_PAGES {
                return Ok(());
            }
            let Some((vaddr, pages)) = self.plan.pop_front() else { return Ok(()) };
            // skip what is here or on its way already
            let skip = (0..pages).take_while(|i| !self.missing(vaddr + i * PAGE)).count() as u64;
            if skip == pages {
                continue;
            }
            let (v, rest) = (vaddr + skip * PAGE, pages - skip);
            let n = (0..rest.min(CHUNK_PAGES)).take_while(|i| self.missing(v + i * PAGE)).count() as u64;
            if rest > n {
                self.plan.push_front((v + n * PAGE, rest - n));
            }
            self.fetch(v, n, dst, false).await?;
        }
        Ok(())
    }

    /// A daemon request: ask at once for its pages that are neither here nor on their
    /// way (ahead of further prefetch), and wait for all of them.
    async fn want(&mut self, vaddr: u64, pages: u64, dst: u64) -> Result<(), LazyError> {
        self.fetch_missing(vaddr, pages, dst).await?;
        self.waiting.push_back((vaddr, pages, dst));
        Ok(())
    }

    /// Ask at once for the pages of a range that are neither here nor on their way.
    async fn fetch_missing(&mut self, vaddr: u64, pages: u64, dst: u64) -> Result<(), LazyError> {
        let mut i = 0;
        while i < pages {
            if !self.missing(vaddr + i * PAGE) {
                i += 1;
                continue;
            }
            let run = (i..pages).take_while(|j| self.missing(vaddr + j * PAGE)).count() as u64;
            self.fetch(vaddr + i * PAGE, run, dst, true).await?;
            i += run;
        }
        Ok(())
    }

    /// Answers for the waiting requests whose pages are all here, in the order the
    /// daemon asked (it matches each answer to its oldest outstanding request, and
    /// aborts on anything else).
    fn answerable(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let Some(answer) = self.answer_cmd else { return out };
        while let Some(&(vaddr, pages, dst)) = self.waiting.front() {
            if !(0..pages).all(|i| self.cache.contains_key(&(vaddr + i * PAGE))) {
                break;
            }
            self.waiting.pop_front();
            out.extend(request(answer, pages, vaddr, dst));
            for i in 0..pages {
                out.extend(self.cache.remove(&(vaddr + i * PAGE)).expect("checked"));
                self.delivered.insert(vaddr + i * PAGE);
            }
            self.stats.answered += 1;
        }
        out
    }
}

/// What the prefetcher did, for the log.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrefetchStats {
    /// Pages that came in answers to the prefetcher's own requests.
    pub prefetched_pages: u64,
    /// Pages asked for at once because the daemon wanted them and they were not on
    /// their way yet (faults, mostly).
    pub urgent_pages: u64,
    /// Daemon requests answered here.
    pub answered: u64,
}

/// Relay between the daemon (`daemon_r`/`daemon_w`) and the source (`up_r`/`up_w`,
/// plain bytes: the compressing relay is beyond them), prefetching `ranges`. Every
/// request the source sees is the relay's own, so no page crosses the link twice.
/// Given the process's `dst` id, the prefetch starts at once, while the restore still
/// runs, instead of at the daemon's first request: the link is busy sooner, and the
/// working set is on its way before the workload touches it.
pub async fn relay<DR, DW, UR, UW>(
    mut daemon_r: DR,
    daemon_w: DW,
    mut up_r: UR,
    up_w: UW,
    ranges: Vec<(u64, u64)>,
    dst: Option<u64>,
) -> Result<PrefetchStats, LazyError>
where
    DR: AsyncRead + Unpin,
    DW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let state = Arc::new(Mutex::new(State::new(up_w, ranges)));
    let daemon_w = Arc::new(Mutex::new(daemon_w));
    // a request went to the source: its answer will come
    let asked = Arc::new(tokio::sync::Notify::new());
    if dst.is_some() {
        let mut st = state.lock().await;
        st.dst = dst;
        st.refill().await?;
        asked.notify_one();
    }

    // daemon -> source: requests
    let requests = {
        let (state, daemon_w, asked) = (state.clone(), daemon_w.clone(), asked.clone());
        async move {
            let mut req = [0u8; PS_IOV_SIZE];
            loop {
                match daemon_r.read_exact(&mut req).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        let _ = state.lock().await.up.shutdown().await;
                        return Ok::<(), LazyError>(());
                    }
                    Err(e) => return Err(LazyError::io("read the daemon's request")(e)),
                }
                let (cmd, pages, vaddr, dst) = fields(&req);
                let mut st = state.lock().await;
                match cmd & PS_CMD_MASK {
                    PS_IOV_GET => {
                        st.dst.get_or_insert(dst);
                        st.daemon_asked = true;
                        tracing::trace!(
                            vaddr,
                            pages,
                            dst,
                            cached = st.cache.len(),
                            waiting = st.waiting.len(),
                            in_flight = st.in_flight,
                            pending = st.pending.len(),
                            "daemon asks"
                        );
                        st.want(vaddr, pages, dst).await?;
                        st.refill().await?;
                        let out = st.answerable();
                        drop(st);
                        if !out.is_empty() {
                            daemon_w.lock().await.write_all(&out).await.map_err(LazyError::io("answer the daemon"))?;
                        }
                    }
                    PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                        // the daemon has every page: nothing more to fetch
                        tracing::trace!("daemon closes");
                        st.closing = true;
                        st.up.write_all(&req).await.map_err(LazyError::io("send"))?;
                        st.pending.push_back(Pending::Close);
                    }
                    other => return Err(LazyError::UnexpectedRequest { cmd: other }),
                }
                asked.notify_one();
            }
        }
    };

    // source -> relay: answers, in request order
    let answers = {
        let (state, daemon_w, asked) = (state.clone(), daemon_w.clone(), asked.clone());
        async move {
            loop {
                // the request an answer belongs to; with none sent, wait for one or the end
                let mut first: Option<u8> = None;
                let front = loop {
                    if let Some(f) = state.lock().await.pending.pop_front() {
                        break f;
                    }
                    if first.is_some() {
                        return Err(LazyError::UnaskedAnswer);
                    }
                    let mut byte = [0u8; 1];
                    tokio::select! {
                        _ = asked.notified() => {}
                        r = up_r.read(&mut byte) => match r {
                            Ok(0) => {
                                let _ = daemon_w.lock().await.shutdown().await;
                                return Ok::<(), LazyError>(());
                            }
                            Ok(_) => first = Some(byte[0]),
                            Err(e) => return Err(LazyError::io("receive")(e)),
                        },
                    }
                };
                let Pending::Fetch { vaddr: wanted_at, pages: wanted, urgent } = front else {
                    let mut status = [0u8; 4];
                    read_rest(&mut up_r, first, &mut status).await?;
                    tracing::trace!(?status, "the source's answer to the close");
                    daemon_w.lock().await.write_all(&status).await.map_err(LazyError::io("answer the daemon"))?;
                    continue;
                };
                let mut head = [0u8; PS_IOV_SIZE];
                read_rest(&mut up_r, first, &mut head).await?;
                let (cmd, pages, vaddr, _) = fields(&head);
                // the count is the source's: bounded by what was asked before it sizes a buffer
                if pages > wanted {
                    return Err(LazyError::TooManyPages { got: pages, asked: wanted, vaddr });
                }
                let mut data = vec![0u8; (pages * PAGE) as usize];
                up_r.read_exact(&mut data).await.map_err(LazyError::io("receive"))?;
                let mut st = state.lock().await;
                if pages > 0 {
                    st.answer_cmd.get_or_insert(cmd);
                }
                for i in 0..wanted {
                    st.on_the_way.remove(&(wanted_at + i * PAGE));
                }
                for (i, page) in data.chunks_exact(PAGE as usize).enumerate() {
                    st.cache.insert(vaddr + i as u64 * PAGE, page.to_vec());
                }
                if vaddr == wanted_at && pages < wanted {
                    // CRIU answered part of the range (a page pipe boundary): the rest
                    // goes first, as it may be what a waiting request needs
                    st.plan.push_front((wanted_at + pages * PAGE, wanted - pages));
                }
                tracing::trace!(
                    vaddr,
                    pages,
                    wanted,
                    urgent,
                    pending = st.pending.len(),
                    waiting = st.waiting.len(),
                    "answer from the source"
                );
                if urgent {
                    st.stats.urgent_pages += pages;
                } else {
                    st.in_flight -= 1;
                    st.stats.prefetched_pages += pages;
                }
                st.refill().await?;
                let out = st.answerable();
                // waiting requests whose pages fell out of flight (a partial answer)
                let waiting: Vec<(u64, u64, u64)> = st.waiting.iter().copied().collect();
                for (v, n, d) in waiting {
                    st.fetch_missing(v, n, d).await?;
                }
                drop(st);
                if !out.is_empty() {
                    daemon_w.lock().await.write_all(&out).await.map_err(LazyError::io("answer the daemon"))?;
                }
                asked.notify_one();
            }
        }
    };
    tokio::try_join!(requests, answers)?;
    let s = state.lock().await.stats;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_images_decode() {
        // magics, head {pages_id: 1}, entry {vaddr 0x1000, nr_pages 0, flags LAZY, pages 3},
        // entry {vaddr 0x9000, flags PRESENT, pages 1} (not lazy)
        let mut img = vec![0x19, 0x43, 0x56, 0x54, 0x25, 0x40, 0x08, 0x56];
        for msg in [
            vec![0x08, 0x01],
            vec![0x08, 0x80, 0x20, 0x10, 0x00, 0x20, 0x02, 0x28, 0x03],
            vec![0x08, 0x80, 0x90, 0x02, 0x20, 0x04, 0x28, 0x01],
        ] {
            img.extend((msg.len() as u32).to_le_bytes());
            img.extend(msg);
        }
        let map = super::super::pagemap::Pagemap::parse(&img).unwrap();
        assert_eq!(map.lazy_ranges(), vec![(0x1000, 3)]);
    }

    #[test]
    fn the_working_set_comes_first() {
        let p = PAGE;
        let lazy = vec![(0, 10), (100 * p, 10)];
        let hot = vec![(3 * p, 2), (105 * p, 20)];
        assert_eq!(hot_first(lazy, &hot), vec![(3 * p, 2), (105 * p, 5), (0, 3), (5 * p, 5), (100 * p, 5)],);
    }

    /// Pages the daemon got early (a fault ahead of the prefetch, or the working set
    /// out of address order) are skipped when the prefetch reaches them.
    #[tokio::test]
    async fn pages_the_daemon_already_has_are_not_fetched_again() {
        let mut st = State::new(Vec::new(), vec![(0, 16)]);
        st.dst = Some(1);
        for p in 4..8 {
            st.delivered.insert(p * PAGE);
        }
        st.refill().await.unwrap();
        let asked: Vec<(u64, u64)> = st
            .up
            .chunks(PS_IOV_SIZE)
            .map(|r| {
                let (_, n, v, _) = fields(r);
                (v / PAGE, n)
            })
            .collect();
        assert_eq!(asked, vec![(0, 4), (8, 8)]);
    }

    /// A fake CRIU page server over a duplex pipe: answers GETs with pages whose first
    /// byte is their page number; the prefetching relay must hand the daemon exactly
    /// what it asked for, most of it without asking the source.
    /// Runs the relay between a fake CRIU page server (answers GETs in pieces of at most
    /// 16 pages, each page's first byte its number) and a fake daemon asking 8 pages at
    /// a time at `asks` (page numbers from `base`), checking every answer.
    /// With `start`, the relay knows the process's id and prefetches before any ask.
    async fn run_fake(base: u64, plan: Vec<(u64, u64)>, asks: Vec<u64>, start: Option<u64>) -> (PrefetchStats, u64) {
        let (daemon_side, relay_daemon) = tokio::io::duplex(1 << 20);
        let (relay_up, server) = tokio::io::duplex(1 << 20);
        let (dr, dw) = tokio::io::split(relay_daemon);
        let (ur, uw) = tokio::io::split(relay_up);
        let relay = tokio::spawn(relay(dr, dw, ur, uw, plan, start));
        let criu = tokio::spawn(fake_page_server(server, base, Default::default()));
        let (mut d_r, mut d_w) = tokio::io::split(daemon_side);
        for p in asks {
            d_w.write_all(&request(PS_IOV_GET, 8, base + p * PAGE, 1)).await.unwrap();
            let mut head = [0u8; PS_IOV_SIZE];
            d_r.read_exact(&mut head).await.unwrap();
            let (_, pages, vaddr, dst) = fields(&head);
            assert_eq!((vaddr, dst), (base + p * PAGE, 1), "answers come in the daemon's order");
            let mut data = vec![0u8; (pages * PAGE) as usize];
            d_r.read_exact(&mut data).await.unwrap();
            for (i, page) in data.chunks(PAGE as usize).enumerate() {
                assert_eq!(page[0], (p + i as u64) as u8, "page {i} of request at {p}");
            }
        }
        d_w.write_all(&request(PS_IOV_CLOSE, 0, 0, 0)).await.unwrap();
        let mut status = [0u8; 4];
        d_r.read_exact(&mut status).await.unwrap();
        d_w.shutdown().await.unwrap();
        (relay.await.unwrap().unwrap(), criu.await.unwrap())
    }

    /// CRIU's page server on a pipe: answers GETs with at most 16 pages, each page's
    /// first byte its number from `base`, counting them in `sent`; returns its GETs.
    async fn fake_page_server(
        mut server: tokio::io::DuplexStream,
        base: u64,
        sent: Arc<std::sync::atomic::AtomicU64>,
    ) -> u64 {
        let mut req = [0u8; PS_IOV_SIZE];
        let mut gets = 0u64;
        while server.read_exact(&mut req).await.is_ok() {
            let (cmd, pages, vaddr, dst) = fields(&req);
            if cmd == PS_IOV_CLOSE {
                server.write_all(&[0u8; 4]).await.unwrap();
                break;
            }
            gets += 1;
            let n = pages.min(16);
            let mut out = request(0x40006, n, vaddr, dst).to_vec();
            for i in 0..n {
                let mut page = vec![0u8; PAGE as usize];
                page[0] = ((vaddr - base) / PAGE + i) as u8;
                out.extend(page);
            }
            server.write_all(&out).await.unwrap();
            sent.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        }
        gets
    }

    /// Until the daemon asks, the prefetch holds at most 8 MiB (the restore runs then);
    /// its first request lets the rest come.
    #[tokio::test]
    async fn before_the_daemon_asks_the_prefetch_holds_at_most_8_mib() {
        let base = 0x10_0000u64;
        let (relay_up, server) = tokio::io::duplex(1 << 20);
        let (daemon_side, relay_daemon) = tokio::io::duplex(1 << 20);
        let (dr, dw) = tokio::io::split(relay_daemon);
        let (ur, uw) = tokio::io::split(relay_up);
        let _relay = tokio::spawn(relay(dr, dw, ur, uw, vec![(base, 4096)], Some(1)));
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _criu = tokio::spawn(fake_page_server(server, base, sent.clone()));
        let pages = || sent.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let held = BEFORE_DAEMON_PAGES as u64..=BEFORE_DAEMON_PAGES as u64 + CHUNK_PAGES;
        assert!(held.contains(&pages()), "{} pages before the daemon asked", pages());
        let (mut d_r, mut d_w) = tokio::io::split(daemon_side);
        d_w.write_all(&request(PS_IOV_GET, 1, base + 4095 * PAGE, 1)).await.unwrap();
        let mut answer = vec![0u8; PS_IOV_SIZE + PAGE as usize];
        d_r.read_exact(&mut answer).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while pages() < 4096 {
            assert!(tokio::time::Instant::now() < deadline, "{} pages after the daemon asked", pages());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// A source whose answer announces 2^40 pages (4 PiB): refused by its count, before
    /// a buffer is sized from it (the agent would abort on the allocation).
    #[tokio::test]
    async fn a_source_announcing_2_pow_40_pages_is_refused() {
        let base = 0x10_0000u64;
        let (daemon_side, relay_daemon) = tokio::io::duplex(1 << 20);
        let (relay_up, mut server) = tokio::io::duplex(1 << 20);
        let (dr, dw) = tokio::io::split(relay_daemon);
        let (ur, uw) = tokio::io::split(relay_up);
        let relay = tokio::spawn(relay(dr, dw, ur, uw, vec![(base, 64)], None));
        let (_d_r, mut d_w) = tokio::io::split(daemon_side);
        d_w.write_all(&request(PS_IOV_GET, 8, base, 1)).await.unwrap();
        let mut req = [0u8; PS_IOV_SIZE];
        server.read_exact(&mut req).await.unwrap();
        let (_, _, vaddr, dst) = fields(&req);
        server.write_all(&request(0x40006, 1 << 40, vaddr, dst)).await.unwrap();
        let err = relay.await.unwrap().unwrap_err();
        assert!(matches!(err, LazyError::TooManyPages { got, .. } if got == 1 << 40), "{err}");
        assert!(err.to_string().contains("1099511627776 pages"), "{err}");
    }

    #[tokio::test]
    async fn the_daemon_gets_its_pages_and_most_come_from_the_prefetch() {
        let base = 0x10_0000u64;
        let (stats, gets) = run_fake(base, vec![(base, 512)], (0..512u64).step_by(8).collect(), None).await;
        assert_eq!(stats.answered, 64, "{stats:?}");
        assert_eq!(stats.prefetched_pages + stats.urgent_pages, 512, "no page crossed twice: {stats:?}");
        assert!(gets < 64, "the source was asked {gets} times");
    }

    /// Knowing the process's id, the relay asks the source before the daemon asks
    /// anything, and still answers the daemon exactly, nothing twice.
    #[tokio::test]
    async fn with_the_process_known_the_prefetch_starts_before_the_daemon_asks() {
        let base = 0x10_0000u64;
        let (relay_up, mut server) = tokio::io::duplex(1 << 20);
        let (_daemon_side, relay_daemon) = tokio::io::duplex(1 << 20);
        let (dr, dw) = tokio::io::split(relay_daemon);
        let (ur, uw) = tokio::io::split(relay_up);
        let _relay = tokio::spawn(relay(dr, dw, ur, uw, vec![(base, 512)], Some(1)));
        let mut req = [0u8; PS_IOV_SIZE];
        tokio::time::timeout(std::time::Duration::from_secs(5), server.read_exact(&mut req))
            .await
            .expect("a GET before any daemon request")
            .unwrap();
        assert_eq!(fields(&req), (PS_IOV_GET, CHUNK_PAGES, base, 1));
        let (stats, _) = run_fake(base, vec![(base, 512)], (0..512u64).step_by(8).collect(), Some(1)).await;
        assert_eq!(stats.answered, 64, "{stats:?}");
        assert_eq!(stats.prefetched_pages + stats.urgent_pages, 512, "no page crossed twice: {stats:?}");
    }
}
