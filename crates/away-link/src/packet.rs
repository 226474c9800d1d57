//! Packet-level mode: two network namespaces joined by a pair of TUN devices, with every
//! IP packet passed between them by this process through a model of the link.
//!
//! Each namespace gets a layer-3 TUN device (`IFF_TUN | IFF_NO_PI`, MTU 1500) with a
//! point-to-point address (`10.254.0.1 peer 10.254.0.2` by default), so the endpoints'
//! own TCP stacks talk to each other and see the real round trip, slow start, losses and
//! congestion window. Per direction, a reader thread takes packets from one TUN as they
//! arrive and schedules them; a writer thread injects each into the other TUN at its due
//! time:
//!
//! - loss: each packet is dropped with probability `loss` (independent draws);
//! - rate and router queue: a token bucket at the link rate (the rate counts whole IP
//!   packets); a packet that would wait longer than `queue` for the wire is dropped at
//!   the tail, like a router's drop-tail FIFO;
//! - delay: the packet leaves the wire at the end of its serialisation and arrives one
//!   `delay` (+ uniform jitter in `[0, jitter)`) later, never before the packet ahead of
//!   it (no reordering).
//!
//! The writer sleeps with a 1 ns timer slack, so a packet is injected within tens of
//! microseconds of its due time.

mod sys;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use sys::{is_root, tcp_rtt};

use crate::{LinkModel, Xorshift};

/// The TUN device name used inside each namespace by [`PacketLink::up`].
pub const DEFAULT_TUN: &str = "awl0";
/// Address of side A made by [`PacketLink::up`].
pub const DEFAULT_ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
/// Address of side B made by [`PacketLink::up`].
pub const DEFAULT_ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
const MTU: u32 = 1500;
/// How often idle threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PacketLinkError {
    #[error("ip {args}: {detail}")]
    Ip { args: String, detail: String },
    #[error("tun {tun} in netns {netns}")]
    Tun {
        tun: String,
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("netns {netns}")]
    Netns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("starting forwarder thread")]
    Thread(#[source] io::Error),
    #[error("link name {0:?}: use 1 to 20 characters from [a-z0-9-]")]
    Name(String),
}

pub type Result<T, E = PacketLinkError> = std::result::Result<T, E>;

/// One side of a packet link: the namespace, the TUN device in it and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub netns: String,
    pub tun: String,
    pub addr: Ipv4Addr,
}

/// Counters of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Packets and bytes (whole IP packets) written to the far side.
    pub packets: u64,
    pub bytes: u64,
    /// Packets dropped because the router queue was full.
    pub dropped_queue: u64,
    /// Packets dropped by random loss.
    pub dropped_loss: u64,
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub a_to_b: DirectionStats,
    pub b_to_a: DirectionStats,
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_loss: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped_queue: self.dropped_queue.load(Ordering::Relaxed),
            dropped_loss: self.dropped_loss.load(Ordering::Relaxed),
        }
    }
}

/// A running packet link. Dropping it (or [`PacketLink::down`]) stops the forwarders,
/// removes the TUN devices and deletes the namespaces it created.
pub struct PacketLink {
    a: Endpoint,
    b: Endpoint,
    owns_netns: bool,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: [Arc<Counters>; 2],
}

impl PacketLink {
    /// Create namespaces `awl-<name>-a` and `awl-<name>-b` (replacing leftovers of the
    /// same name), join them with `model` in both directions and start forwarding.
    /// Side A is [`DEFAULT_ADDR_A`], side B [`DEFAULT_ADDR_B`], on device [`DEFAULT_TUN`].
    pub fn up(name: &str, model: impl Into<LinkModel>) -> Result<PacketLink> {
        if name.is_empty()
            || name.len() > 20
            || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(PacketLinkError::Name(name.into()));
        }
        let model = model.into();
        let a = Endpoint { netns: format!("awl-{name}-a"), tun: DEFAULT_TUN.into(), addr: DEFAULT_ADDR_A };
        let b = Endpoint { netns: format!("awl-{name}-b"), tun: DEFAULT_TUN.into(), addr: DEFAULT_ADDR_B };
        for ns in [&a.netns, &b.netns] {
            if netns_path(ns).exists() {
                ip(&["netns", "del", ns])?;
            }
            ip(&["netns", "add", ns])?;
        }
        let link = Self::start(a.clone(), b.clone(), model, model, true);
        if link.is_err() {
            let _ = ip(&["netns", "del", &a.netns]);
            let _ = ip(&["netns", "del", &b.netns]);
        }
        link
    }

    /// Join two existing namespaces: create a TUN device in each, give it its address
    /// with the other side as point-to-point peer, and forward with `a_to_b` and
    /// `b_to_a`. The namespaces are left in place when the link goes down.
    pub fn attach(a: Endpoint, b: Endpoint, a_to_b: LinkModel, b_to_a: LinkModel) -> Result<PacketLink> {
        for ns in [&a.netns, &b.netns] {
            if !netns_path(ns).exists() {
                return Err(PacketLinkError::Netns {
                    netns: ns.clone(),
                    source: io::Error::new(io::ErrorKind::NotFound, "no such network namespace"),
                });
            }
        }
        Self::start(a, b, a_to_b, b_to_a, false)
    }

    fn start(a: Endpoint, b: Endpoint, a_to_b: LinkModel, b_to_a: LinkModel, owns_netns: bool) -> Result<PacketLink> {
        let tun_a = Arc::new(create_tun(&a)?);
        let tun_b = Arc::new(create_tun(&b)?);
        configure(&a, b.addr)?;
        configure(&b, a.addr)?;
        let mut link = PacketLink {
            a,
            b,
            owns_netns,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            counters: [Arc::default(), Arc::default()],
        };
        let dirs = [(tun_a.clone(), tun_b.clone(), a_to_b, "a>b", 1), (tun_b, tun_a, b_to_a, "b>a", 2)];
        for (i, (from, to, model, tag, seed)) in dirs.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            let stop = link.stop.clone();
            let counters = link.counters[i].clone();
            let reader = std::thread::Builder::new()
                .name(format!("awl-read-{tag}"))
                .spawn(move || read_side(&from, tx, model, seed, &stop, &counters))
                .map_err(PacketLinkError::Thread)?;
            link.threads.push(reader);
            let stop = link.stop.clone();
            let counters = link.counters[i].clone();
            let writer = std::thread::Builder::new()
                .name(format!("awl-write-{tag}"))
                .spawn(move || write_side(&to, rx, &stop, &counters))
                .map_err(PacketLinkError::Thread)?;
            link.threads.push(writer);
        }
        tracing::info!(a = %link.a.netns, b = %link.b.netns, "packet link up");
        Ok(link)
    }

    /// Side A.
    pub fn a(&self) -> &Endpoint {
        &self.a
    }

    /// Side B.
    pub fn b(&self) -> &Endpoint {
        &self.b
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats { a_to_b: self.counters[0].snapshot(), b_to_a: self.counters[1].snapshot() }
    }

    /// Stop forwarding, remove the TUN devices and delete the namespaces this link
    /// created.
    pub fn down(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // the threads held the last references to the TUN files: the devices are gone
        if self.owns_netns {
            self.owns_netns = false;
            let a = ip(&["netns", "del", &self.a.netns]);
            let b = ip(&["netns", "del", &self.b.netns]);
            a?;
            b?;
        }
        Ok(())
    }
}

impl Drop for PacketLink {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("packet link down: {e}");
        }
    }
}

/// Per-direction scheduler: the link model applied at each packet's arrival.
struct Scheduler {
    model: LinkModel,
    /// When the wire finishes the last accepted packet.
    wire_free: Instant,
    /// Due time of the last accepted packet (jitter never reorders).
    last_due: Instant,
    rng: Xorshift,
}

enum Verdict {
    Deliver(Instant),
    DropQueue,
    DropLoss,
}

impl Scheduler {
    fn new(model: LinkModel, seed: u64) -> Self {
        let now = Instant::now();
        Scheduler { model, wire_free: now, last_due: now, rng: Xorshift::new(seed) }
    }

    fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        if self.model.loss > 0.0 && self.rng.unit() < self.model.loss {
            return Verdict::DropLoss;
        }
        let p = &self.model.profile;
        let start = self.wire_free.max(now);
        if start - now > p.queue {
            return Verdict::DropQueue;
        }
        self.wire_free = start + p.wire_time(len as u64);
        let due = (self.wire_free + p.delay + self.rng.duration(p.jitter)).max(self.last_due);
        self.last_due = due;
        Verdict::Deliver(due)
    }
}

fn read_side(
    tun: &File,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    model: LinkModel,
    seed: u64,
    stop: &AtomicBool,
    counters: &Counters,
) {
    let mut sched = Scheduler::new(model, 0x9E37_79B9_7F4A_7C15 ^ seed);
    let mut buf = vec![0u8; 65_536];
    let mut reader = tun;
    while !stop.load(Ordering::Relaxed) {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = sys::wait_readable(tun, POLL) {
                    tracing::warn!("packet link poll: {e}");
                    return;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("packet link read: {e}");
                return;
            }
        };
        match sched.admit(Instant::now(), n) {
            Verdict::Deliver(due) => {
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Verdict::DropQueue => {
                counters.dropped_queue.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::DropLoss => {
                counters.dropped_loss.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn write_side(tun: &File, rx: mpsc::Receiver<(Instant, Vec<u8>)>, stop: &AtomicBool, counters: &Counters) {
    sys::tight_timer_slack();
    let mut writer = tun;
    while !stop.load(Ordering::Relaxed) {
        let (due, packet) = match rx.recv_timeout(POLL) {
            Ok(p) => p,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        wait_until(due);
        // a TUN write takes the whole packet or fails
        match writer.write(&packet) {
            Ok(n) => {
                counters.packets.fetch_add(1, Ordering::Relaxed);
                counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            // the far stack refused the packet (e.g. device going down): a loss on the wire
            Err(e) => tracing::debug!("packet link write: {e}"),
        }
    }
}

/// Sleep until `due` (with the 1 ns timer slack set by the writer thread, a wake-up
/// comes some 10 to 60 µs late; spinning the last stretch measured no better and cost
/// throughput).
fn wait_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

/// Run `f` on a new thread inside network namespace `netns` (by name, as `ip netns`
/// knows it). Sockets made there stay in that namespace wherever they are used later,
/// so a test or the lab can open a listener "in B" and use it from any thread.
pub fn spawn_in_netns<T, F>(netns: &str, f: F) -> io::Result<JoinHandle<io::Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = netns_path(netns);
    std::thread::Builder::new().name(format!("in-{netns}")).spawn(move || {
        sys::enter_netns(&path).map_err(|e| io::Error::new(e.kind(), format!("setns {}: {e}", path.display())))?;
        Ok(f())
    })
}

/// [`spawn_in_netns`] and wait for the result.
pub fn run_in_netns<T, F>(netns: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    spawn_in_netns(netns, f)?.join().map_err(|_| io::Error::other(format!("thread in netns {netns} panicked")))?
}

fn create_tun(end: &Endpoint) -> Result<File> {
    let tun = end.tun.clone();
    let opened = run_in_netns(&end.netns, move || {
        let file = sys::open_tun(&tun)?;
        sys::set_nonblocking(&file)?;
        Ok::<_, io::Error>(file)
    });
    opened.and_then(|r| r).map_err(|source| PacketLinkError::Tun {
        tun: end.tun.clone(),
        netns: end.netns.clone(),
        source,
    })
}

fn configure(end: &Endpoint, peer: Ipv4Addr) -> Result<()> {
    let ns = end.netns.as_str();
    let mtu = MTU.to_string();
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "set", &end.tun, "mtu", &mtu, "up"])?;
    ip(&["-n", ns, "addr", "add", &end.addr.to_string(), "peer", &format!("{peer}/32"), "dev", &end.tun])?;
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let shown = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| PacketLinkError::Ip { args: shown.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(PacketLinkError::Ip {
            args: shown,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LinkProfile;

    fn model(rate: f64, delay_ms: u64, queue_ms: u64) -> LinkModel {
        LinkModel {
            profile: LinkProfile {
                rate_bits_per_sec: rate,
                delay: Duration::from_millis(delay_ms),
                jitter: Duration::ZERO,
                queue: Duration::from_millis(queue_ms),
            },
            loss: 0.0,
        }
    }

    #[test]
    fn scheduler_paces_delays_and_drops_at_the_tail() {
        // 12 Mbit/s: a 1500-byte packet takes 1 ms on the wire
        let mut s = Scheduler::new(model(12e6, 10, 3), 1);
        let t0 = Instant::now();
        let mut dues = Vec::new();
        let mut dropped = 0;
        for _ in 0..6 {
            match s.admit(t0, 1500) {
                Verdict::Deliver(d) => dues.push(d - t0),
                Verdict::DropQueue => dropped += 1,
                Verdict::DropLoss => unreachable!(),
            }
        }
        // waits of 0, 1, 2, 3 ms fit the 3 ms queue; the rest is dropped
        let ms: Vec<u128> = dues.iter().map(|d| d.as_micros()).collect();
        assert_eq!(ms, vec![11_000, 12_000, 13_000, 14_000]);
        assert_eq!(dropped, 2);
    }

    #[test]
    fn scheduler_loss_and_jitter_keep_order() {
        let mut m = model(f64::INFINITY, 5, 100);
        m.loss = 0.25;
        m.profile.jitter = Duration::from_millis(4);
        let mut s = Scheduler::new(m, 7);
        let t0 = Instant::now();
        let (mut lost, mut last) = (0, t0);
        for i in 0..4000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            match s.admit(now, 100) {
                Verdict::Deliver(d) => {
                    assert!(d >= last && d >= now + Duration::from_millis(5));
                    last = d;
                }
                Verdict::DropLoss => lost += 1,
                Verdict::DropQueue => unreachable!(),
            }
        }
        assert!((800..1200).contains(&lost), "lost {lost} of 4000 at 25 %");
    }
}
