//! Which way a container moves: stop-and-copy, or lazy (post-copy), chosen per
//! workload from what it does and the link it crosses.
//!
//! Lazy restores the workload on the target at once and fetches its memory after, so
//! its blackout does not grow with its memory; but every page it touches before that
//! page has arrived costs a round trip. `auto` measures both sides of that trade
//! before the move: how many distinct pages the workload writes per second (two
//! snapshots of its resident pages, hashed) and the round trip to the target. It picks
//! lazy unless the workload would spend more than [`MAX_STALL`] of its time waiting for
//! pages, where stop-and-copy's one pause is the better deal.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use away_model::{MigrationMode, RuntimeKind, WorkloadStatus};
use away_runtime::host::{HostReport, LABEL_CONTAINERD_NETNS, LABEL_LAZY_PAGES};
use away_runtime::Runtime;

use crate::target::TargetInfo;
use crate::MigrateError;

/// The parsed mode is policy (the broker checks it too): it lives in `away_policy::mode`.
pub use away_policy::mode::ContainerMode;

/// Stall share above which `auto` prefers stop-and-copy.
pub const MAX_STALL: f64 = 0.5;
/// How long `auto` watches the workload's writes.
pub const DIRTY_WINDOW: Duration = Duration::from_millis(500);
const PAGE: u64 = 4096;

/// The mode a move takes, and why.
#[derive(Debug, Clone)]
pub struct ModeChoice {
    pub mode: MigrationMode,
    pub reason: String,
    /// Lazy moves: the pages the workload wrote while it was watched (vaddr, pages),
    /// its working set, which the target fetches first.
    pub hot: Vec<(u64, u64)>,
    /// Stop-and-copy: the pages stream from CRIU's page server into the target's
    /// images during the dump ([`crate::lazy::pull`]) instead of being staged on disk.
    pub streamed: bool,
}

/// Why a lazy move cannot happen between these two nodes, given what keeps the source
/// from serving its pages (None: it can).
fn lazy_blocker(kind: RuntimeKind, page_server: Option<&String>, there: &TargetInfo) -> Option<String> {
    if let Some(why) = page_server {
        return Some(why.clone());
    }
    if kind == RuntimeKind::Docker {
        return Some("docker restores only through its engine, which cannot hand CRIU a lazy-pages restore".into());
    }
    if there.node.labels.get(LABEL_LAZY_PAGES).map(String::as_str) != Some("true") {
        return Some(format!("CRIU lazy pages do not work on {} (see `away doctor` there)", there.node.name));
    }
    None
}

/// Why the source's memory cannot be served from CRIU's page server (a lazy dump) for
/// a move to `there`: what lazy and streamed moves both need (None: it can).
fn page_server_blocker(
    kind: RuntimeKind,
    status: &WorkloadStatus,
    host: &HostReport,
    there: &TargetInfo,
) -> Option<String> {
    match kind {
        RuntimeKind::Containerd => {}
        // the frozen source container keeps its published ports until the target runs:
        // a target on the same engine could not take them
        RuntimeKind::Docker if !status.ports.is_empty() => {
            return Some(format!(
                "the frozen source would hold its published port(s) {} until the target runs",
                status.ports.join(", ")
            ))
        }
        // Off until it works with the network-namespace holders Docker 28 needs
        // (away_runtime::docker): a counter dumped by runc with its pages on CRIU's page
        // server and restored by the engine into a new holder is running but does not
        // answer there; Docker moves are staged (the engine's own checkpoint) meanwhile.
        RuntimeKind::Docker => {
            return Some(
                "Docker moves are staged: the engine's restore of a dump streamed through runc does not yet bring \
                 the workload's network back"
                    .into(),
            )
        }
        _ => {
            return Some(format!(
                "{kind} exposes no CRIU page server (lazy and streamed moves drive runc under the engine directly)"
            ))
        }
    }
    if !host.criu.lazy_pages() {
        return Some(format!(
            "CRIU lazy pages do not work on this node (userfaultfd {}, fs.pipe-max-size {}; see `away doctor`)",
            if host.criu.uffd { "ok" } else { "missing" },
            host.criu.pipe_max_size
        ));
    }
    let Some(pid) = status.pid else { return Some("the workload's process is unknown".into()) };
    let here = away_runtime::host::netns_id(pid);
    if here.is_some() && there.node.labels.get(LABEL_CONTAINERD_NETNS) == here.as_ref() {
        // the frozen source keeps its sockets until the last page moved
        let ports = listening_ports(pid);
        if !ports.is_empty() {
            return Some(format!(
                "{}'s containers would share this one's network namespace, where the frozen source still holds \
                 its listening port(s) {ports:?}",
                there.node.name
            ));
        }
    }
    None
}

/// TCP ports process `pid` listens on (its own sockets, not its namespace's).
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is f[1] (addr:port in hex), st is f[3] (0A: LISTEN), inode is f[9]
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some(port) = f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) {
                    ports.push(port);
                }
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Why a streamed and why a lazy move of `status` to `there` cannot happen (None: it can).
pub fn blockers(
    runtime: &dyn Runtime,
    status: &WorkloadStatus,
    host: &HostReport,
    there: &TargetInfo,
) -> (Option<String>, Option<String>) {
    let stream = page_server_blocker(runtime.kind(), status, host, there);
    let lazy = lazy_blocker(runtime.kind(), stream.as_ref(), there);
    (stream, lazy)
}

/// The workload's writes, measured in the background: a lazy or `auto` move needs them,
/// and started beside the move's other checks their 0.5 s window overlaps those checks'
/// round trips (one after the other they made a lazy move's check 1.0 s over the WAN).
pub enum Watch {
    Running(tokio::task::JoinHandle<std::io::Result<DirtySample>>),
    /// Measured just before the move, by its prediction.
    Measured(DirtySample),
}

impl Watch {
    /// Start watching `pid` when a move on `runtime` asked for as `requested` may need
    /// its writes (Docker never moves lazily: its `auto` does not look), unless they
    /// were `measured` just before.
    pub fn start(
        requested: ContainerMode,
        runtime: RuntimeKind,
        pid: Option<u32>,
        measured: Option<DirtySample>,
    ) -> Option<Watch> {
        let lazy_possible = runtime != RuntimeKind::Docker;
        let pid = pid.filter(|_| lazy_possible && matches!(requested, ContainerMode::Lazy | ContainerMode::Auto))?;
        Some(match measured {
            Some(sample) => Watch::Measured(sample),
            None => Watch::Running(tokio::task::spawn_blocking(move || dirty_rate(pid, DIRTY_WINDOW))),
        })
    }
}

/// `pid`'s writes: `watch`'s measurement when one runs or ran, else one taken now.
async fn writes(watch: Option<Watch>, pid: u32) -> std::io::Result<DirtySample> {
    let task = match watch {
        Some(Watch::Measured(sample)) => return Ok(sample),
        Some(Watch::Running(task)) => task,
        None => tokio::task::spawn_blocking(move || dirty_rate(pid, DIRTY_WINDOW)),
    };
    task.await.map_err(|e| std::io::Error::other(e.to_string())).and_then(|r| r)
}

/// Decide how `status` moves to `there`; `watch` measures its writes when the caller
/// started it early ([`Watch::start`]).
pub async fn choose(
    requested: ContainerMode,
    runtime: &dyn Runtime,
    status: &WorkloadStatus,
    host: &HostReport,
    there: &TargetInfo,
    watch: Option<Watch>,
) -> Result<ModeChoice, MigrateError> {
    // read once: it looks at the workload's sockets and namespace
    let stream_blocker = page_server_blocker(runtime.kind(), status, host, there);
    let blocker = lazy_blocker(runtime.kind(), stream_blocker.as_ref(), there);
    let stop_copy = |why: String| {
        let how = match &stream_blocker {
            None => "streamed (the pages go from CRIU's page server into the target's images while the rest \
                     travels)"
                .to_string(),
            Some(no) => format!("staged (checkpoint, transfer, restore in turn: {no})"),
        };
        ModeChoice {
            mode: MigrationMode::StopAndCopy,
            reason: format!("stop-and-copy: {why}; {how}; {}", crate::precopy_note(host)),
            hot: Vec::new(),
            streamed: stream_blocker.is_none(),
        }
    };
    match requested {
        ContainerMode::StopCopy => Ok(stop_copy("asked for (--mode stop-copy)".into())),
        ContainerMode::Staged => Ok(ModeChoice {
            mode: MigrationMode::StopAndCopy,
            reason: format!("stop-and-copy, staged: asked for (--mode staged); {}", crate::precopy_note(host)),
            hot: Vec::new(),
            streamed: false,
        }),
        ContainerMode::Lazy => match blocker {
            Some(why) => Err(MigrateError::Invalid(format!("cannot move {} lazily: {why}", status.name))),
            None => {
                // its working set goes first (a failed measurement only loses the order)
                let hot = writes(watch, status.pid.unwrap_or_default()).await.map(|d| d.hot).unwrap_or_default();
                Ok(ModeChoice {
                    mode: MigrationMode::Lazy,
                    reason: "lazy: asked for (--mode lazy)".into(),
                    hot,
                    streamed: false,
                })
            }
        },
        ContainerMode::Auto => {
            if let Some(why) = blocker {
                return Ok(stop_copy(format!("auto, lazy impossible: {why}")));
            }
            let pid = status.pid.unwrap_or_default();
            let (rtt, dirty) = tokio::join!(round_trip(&there.transfer_addr), writes(watch, pid));
            let (Some(rtt), Ok(dirty)) = (rtt, dirty) else {
                return Ok(stop_copy("auto, could not measure the workload's writes or the round trip".into()));
            };
            let stall = dirty.pages_per_s() * rtt.as_secs_f64();
            let facts = format!(
                "it wrote {:.0} distinct pages/s (of {} resident) over {} ms, the round trip to {} is {:.2} ms, so \
                 faults on pages not yet moved would stall it about {:.0} % of the time",
                dirty.pages_per_s(),
                dirty.resident_pages,
                DIRTY_WINDOW.as_millis(),
                there.node.name,
                rtt.as_secs_f64() * 1e3,
                (stall * 100.0).min(9999.0)
            );
            Ok(if stall > MAX_STALL {
                stop_copy(format!("auto: {facts} (over {:.0} %)", MAX_STALL * 100.0))
            } else {
                ModeChoice {
                    mode: MigrationMode::Lazy,
                    reason: format!(
                        "lazy (auto): {facts} (at most {:.0} %): it restores at once and its memory follows, \
                         the pages it wrote first",
                        MAX_STALL * 100.0
                    ),
                    hot: dirty.hot,
                    streamed: false,
                }
            })
        }
    }
}

/// Smallest TCP connect time of three to `addr`.
pub(crate) async fn round_trip(addr: &str) -> Option<Duration> {
    let mut best: Option<Duration> = None;
    for _ in 0..3 {
        let t = Instant::now();
        let connected = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await;
        if let Ok(Ok(_)) = connected {
            let d = t.elapsed();
            best = Some(best.map_or(d, |b| b.min(d)));
        }
    }
    best
}

/// A workload's writes over a window.
#[derive(Debug, Clone)]
pub struct DirtySample {
    pub resident_pages: u64,
    /// Pages whose content changed (or that appeared) during the window.
    pub dirty_pages: u64,
    pub window: Duration,
    /// Those pages as ranges (vaddr, pages); nearby ones merged, at most [`MAX_HOT_RANGES`].
    pub hot: Vec<(u64, u64)>,
}

/// Bound on the working-set ranges a lazy move carries (they travel in the downtime).
pub const MAX_HOT_RANGES: usize = 2048;

impl DirtySample {
    pub fn pages_per_s(&self) -> f64 {
        self.dirty_pages as f64 / self.window.as_secs_f64().max(1e-3)
    }
}

/// Count the pages of process `pid` that change over `window`, by hashing its
/// resident private writable pages twice (read through /proc/PID/mem). Soft-dirty
/// bits would be cheaper, but this kernel may not have them (see `away doctor`).
pub fn dirty_rate(pid: u32, window: Duration) -> std::io::Result<DirtySample> {
    let before = page_hashes(pid)?;
    std::thread::sleep(window);
    let after = page_hashes(pid)?;
    // both lists are sorted by address
    let mut dirty = 0u64;
    let mut hot: Vec<(u64, u64)> = Vec::new();
    let mut i = 0;
    for (addr, h) in &after {
        while i < before.len() && before[i].0 < *addr {
            i += 1;
        }
        if i >= before.len() || before[i].0 != *addr || before[i].1 != *h {
            dirty += 1;
            match hot.last_mut() {
                Some((v, n)) if *v + *n * PAGE == *addr => *n += 1,
                _ => hot.push((*addr, 1)),
            }
        }
    }
    Ok(DirtySample { resident_pages: after.len() as u64, dirty_pages: dirty, window, hot: bound_ranges(hot) })
}

/// Merge ranges across ever larger gaps until at most [`MAX_HOT_RANGES`] remain.
fn bound_ranges(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut gap = 1u64;
    while r.len() > MAX_HOT_RANGES {
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(r.len());
        for (v, n) in r {
            match merged.last_mut() {
                Some((mv, mn)) if *mv + (*mn + gap) * PAGE >= v => *mn = (v - *mv) / PAGE + n,
                _ => merged.push((v, n)),
            }
        }
        r = merged;
        gap *= 4;
    }
    r
}

/// (address, hash) of every resident page of the private writable mappings.
fn page_hashes(pid: u32) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    read_resident(pid, |addr, pages| {
        out.extend(pages.chunks_exact(PAGE as usize).enumerate().map(|(k, p)| (addr + k as u64 * PAGE, hash_page(p))))
    })?;
    Ok(out)
}

/// Addresses of the resident (or swapped) pages of `pid`'s private writable mappings,
/// from /proc/PID/maps and /proc/PID/pagemap: what a checkpoint of it would hold.
pub(crate) fn resident_pages(pid: u32) -> std::io::Result<Vec<u64>> {
    resident_pages_in(pid, None)
}

/// [`resident_pages`] within `[start, end)` only, when given.
pub(crate) fn resident_pages_in(pid: u32, within: Option<(u64, u64)>) -> std::io::Result<Vec<u64>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut present = Vec::new();
    let mut entries = vec![0u8; 8 * 4096];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        if !perms.starts_with("rw") || !perms.ends_with('p') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(mut start), Ok(mut end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else {
            continue;
        };
        if let Some((lo, hi)) = within {
            (start, end) = (start.max(lo), end.min(hi));
        }
        let mut addr = start;
        while addr < end {
            let n = ((end - addr) / PAGE).min(4096);
            let buf = &mut entries[..(n * 8) as usize];
            if pagemap.read_exact_at(buf, addr / PAGE * 8).is_err() {
                break;
            }
            for (k, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                // bit 63: present in RAM; bit 62: swapped
                if e & (3 << 62) != 0 {
                    present.push(addr + k as u64 * PAGE);
                }
            }
            addr += n * PAGE;
        }
    }
    Ok(present)
}

/// Reads the resident pages of [`resident_pages`] from /proc/PID/mem, each run of
/// neighbouring pages in reads of up to 1 MiB (one syscall per page made the check of
/// a real server take seconds), and hands `each(first address, its pages)`. A run that
/// cannot be read (unmapped since) is skipped.
pub(crate) fn read_resident(pid: u32, mut each: impl FnMut(u64, &[u8])) -> std::io::Result<()> {
    const RUN: usize = 256;
    let present = resident_pages(pid)?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = vec![0u8; RUN * PAGE as usize];
    let mut i = 0;
    while i < present.len() {
        let first = present[i];
        let mut n = 1;
        while n < RUN && i + n < present.len() && present[i + n] == first + n as u64 * PAGE {
            n += 1;
        }
        let run = &mut buf[..n * PAGE as usize];
        if mem.read_exact_at(run, first).is_ok() {
            each(first, run);
        }
        i += n;
    }
    Ok(())
}

/// FNV-1a over 64-bit words: enough to tell a changed page, cheap enough to run on
/// hundreds of MiB before a move.
fn hash_page(page: &[u8]) -> u64 {
    page.chunks_exact(8).fold(0xcbf2_9ce4_8422_2325u64, |h, w| {
        (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Resident memory of process `pid` in bytes (0 when unknown).
pub fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .map(|kb: u64| kb * 1024)
        .unwrap_or(0)
}

/// A QEMU guest's RAM as its QEMU process maps it: QEMU's one mapping the size of the
/// guest's memory (up to 2 MiB of alignment more), found in `/proc/PID/smaps`, so that
/// QEMU's own memory is not taken for the guest's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRam {
    pub start: u64,
    pub end: u64,
    /// Its resident bytes (`Rss`).
    pub resident: u64,
}

/// The guest-RAM mapping of QEMU process `pid` for a guest of `ram` bytes; None when no
/// mapping of that size is found.
pub fn guest_ram(pid: u32, ram: u64) -> Option<GuestRam> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    guest_ram_in(&smaps, ram)
}

fn guest_ram_in(smaps: &str, ram: u64) -> Option<GuestRam> {
    let kb =
        |l: &str, key: &str| -> Option<u64> { l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse().ok() };
    let (lo, hi) = (ram / 1024, (ram + (2 << 20)) / 1024);
    let (mut range, mut size) = ((0, 0), 0);
    let mut best: Option<GuestRam> = None;
    for l in smaps.lines() {
        let head = l.split_whitespace().next().and_then(|r| r.split_once('-'));
        if let Some((a, b)) =
            head.and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?)))
        {
            range = (a, b);
        } else if let Some(v) = kb(l, "Size:") {
            size = v;
        } else if let Some(rss) = kb(l, "Rss:") {
            if (lo..=hi).contains(&size) && best.is_none_or(|b| b.resident < rss * 1024) {
                best = Some(GuestRam { start: range.0, end: range.1, resident: rss * 1024 });
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_ram_is_the_mapping_of_its_size() {
        let smaps = "7f00000-7f10000 rw-p 00000000 00:00 0\nSize:               8192 kB\nRss:                4096 kB\n\
                     7e00000-7f00000 rw-p 00000000 00:00 0\nSize:             131072 kB\nRss:               40000 kB\n";
        let g = guest_ram_in(smaps, 128 << 20).unwrap();
        assert_eq!((g.start, g.end, g.resident), (0x7e00000, 0x7f00000, 40000 * 1024));
        assert_eq!(guest_ram_in(smaps, 256 << 20), None);
    }

    #[test]
    fn hot_ranges_are_bounded() {
        let many: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * 3 * PAGE, 1)).collect();
        let b = bound_ranges(many);
        assert!(b.len() <= MAX_HOT_RANGES, "{}", b.len());
        assert_eq!(b[0].0, 0);
        let last = b.last().unwrap();
        assert_eq!(last.0 + last.1 * PAGE, 9_999 * 3 * PAGE + PAGE, "the last page stays covered");
    }

    #[test]
    fn listening_ports_are_this_process_own() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening_ports(std::process::id()).contains(&port));
        drop(l);
        assert!(!listening_ports(std::process::id()).contains(&port));
    }

    /// A move that follows its prediction takes the writes it measured: no second watch.
    #[tokio::test]
    async fn a_measured_watch_is_taken_as_it_is() {
        let sample = DirtySample { resident_pages: 9, dirty_pages: 3, window: DIRTY_WINDOW, hot: vec![(0x1000, 3)] };
        let watch = Watch::start(ContainerMode::Lazy, RuntimeKind::Containerd, Some(u32::MAX), Some(sample));
        // pid u32::MAX has no memory to read: a watch that measured would fail
        let got = writes(watch, u32::MAX).await.expect("the prediction's sample");
        assert_eq!((got.dirty_pages, got.hot), (3, vec![(0x1000, 3)]));
        assert!(writes(None, u32::MAX).await.is_err(), "with nothing measured, it measures (and fails here)");
        // Docker never moves lazily: nothing to watch, measured or not
        assert!(Watch::start(ContainerMode::Lazy, RuntimeKind::Docker, Some(1), None).is_none());
    }

    /// The measurement sees a thread of this very process write pages.
    #[test]
    fn dirty_rate_sees_writes() {
        let pages = 2048usize;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut buf = vec![1u8; pages * PAGE as usize];
            let mut round = 0u8;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                round = round.wrapping_add(1);
                for p in 0..pages {
                    buf[p * PAGE as usize] = round;
                }
                std::hint::black_box(&buf);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let busy = dirty_rate(std::process::id(), Duration::from_millis(200)).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(busy.dirty_pages >= pages as u64, "{busy:?}");
        let hot_pages: u64 = busy.hot.iter().map(|r| r.1).sum();
        assert!(hot_pages >= pages as u64 && busy.hot.len() <= MAX_HOT_RANGES, "{busy:?}");
        assert!(busy.resident_pages >= pages as u64, "{busy:?}");
        assert!(resident_bytes(std::process::id()) > 0);
    }
}
