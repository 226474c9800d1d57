//! Packet-level link between two network namespaces: delay, rate and TCP's view of the
//! round trip. Needs root (namespaces, TUN); without it the tests print SKIP, unless
//! `CI=true`, where they fail.
//!
//! Rates: the link's rate counts whole IP packets. A bulk TCP transfer carries 1448
//! payload bytes per 1500-byte packet (20 IP + 20 TCP + 12 timestamp option), so the
//! expected goodput is `rate × 1448 / 1500`; the link's own byte counter gives the wire
//! rate directly. Both are checked within 2 %.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use away_link::packet::{is_root, run_in_netns, tcp_rtt, Endpoint, PacketLink};
use away_link::{LinkModel, LinkProfile};

/// The perf tests share two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Highest rate this machine sustains within 2 % (2 cores, see docs/link.md); 1 Gbit/s
/// falls 4 to 14 % short.
const HIGH_RATE: f64 = 800e6;

fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root (network namespaces, /dev/net/tun)");
    }
    eprintln!("SKIP {test}: needs root");
    false
}

fn profile(rate: f64, delay: Duration, queue: Duration) -> LinkProfile {
    LinkProfile { rate_bits_per_sec: rate, delay, jitter: Duration::ZERO, queue }
}

/// UDP echo in B, pings from A: the median round trip.
fn udp_rtt(link: &PacketLink, pings: usize) -> Duration {
    let server_addr = SocketAddr::from((link.b().addr, 7001));
    let server = run_in_netns(&link.b().netns, move || UdpSocket::bind(server_addr)).unwrap().unwrap();
    let client = run_in_netns(&link.a().netns, || UdpSocket::bind("0.0.0.0:0")).unwrap().unwrap();
    server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        for _ in 0..pings {
            let (n, from) = server.recv_from(&mut buf).unwrap();
            server.send_to(&buf[..n], from).unwrap();
        }
    });
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..pings {
        let t = Instant::now();
        client.send_to(&[i as u8; 32], server_addr).unwrap();
        client.recv_from(&mut buf).unwrap();
        rtts.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    echo.join().unwrap();
    rtts.sort();
    rtts[rtts.len() / 2]
}

/// One-way delay from 30 UDP pings over a link set to `p`: (median round trip, one way,
/// error against the set delay in ms). The 60-byte packets' wire time each way is
/// taken off.
fn one_way_delay(link: &PacketLink, p: &LinkProfile) -> (Duration, Duration, f64) {
    let rtt = udp_rtt(link, 30);
    let one_way = rtt / 2 - p.wire_time(60);
    (rtt, one_way, (one_way.as_secs_f64() - p.delay.as_secs_f64()) * 1e3)
}

/// A connected pair: (client in A, server side in B).
fn tcp_pair(link: &PacketLink, port: u16) -> (TcpStream, TcpStream, Duration) {
    let addr = SocketAddr::from((link.b().addr, port));
    let listener = run_in_netns(&link.b().netns, move || TcpListener::bind(addr)).unwrap().unwrap();
    let accept = std::thread::spawn(move || listener.accept().unwrap().0);
    let (client, connect_time) = run_in_netns(&link.a().netns, move || {
        let t = Instant::now();
        let c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        (c, t.elapsed())
    })
    .unwrap();
    (client, accept.join().unwrap(), connect_time)
}

struct Bulk {
    goodput: f64,
    wire: f64,
}

/// Send `bytes` from A to B; rates over the part after `warmup` (slow start excluded).
fn bulk(link: &PacketLink, port: u16, bytes: usize, warmup: Duration) -> Bulk {
    let (mut client, mut server, _) = tcp_pair(link, port);
    let receiver = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        let mut samples = Vec::with_capacity(100_000);
        loop {
            match server.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n as u64;
                    samples.push((Instant::now(), total));
                }
                Err(e) => panic!("receive: {e}"),
            }
        }
        samples
    });
    let sender = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            client.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        client.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut wire = Vec::new();
    while !receiver.is_finished() {
        wire.push((Instant::now(), link.stats().a_to_b.bytes));
        std::thread::sleep(Duration::from_millis(5));
    }
    sender.join().unwrap();
    let samples = receiver.join().unwrap();
    assert_eq!(samples.last().unwrap().1, bytes as u64, "all bytes arrive");
    let t_start = samples[0].0 + warmup;
    let (t0, b0) = *samples.iter().find(|(t, _)| *t >= t_start).expect("transfer longer than warmup");
    let (t1, b1) = *samples.last().unwrap();
    let goodput = (b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64();
    // wire counter: same window, ending at the last poll before the transfer ended
    let (w0t, w0) = *wire.iter().find(|(t, _)| *t >= t0).unwrap();
    let (w1t, w1) = *wire.iter().rev().find(|(t, _)| *t <= t1).unwrap();
    let wire = (w1 - w0) as f64 * 8.0 / (w1t - w0t).as_secs_f64();
    Bulk { goodput, wire }
}

fn goodput_of(rate: f64) -> f64 {
    rate * 1448.0 / 1500.0
}

#[test]
fn wan_delay_rate_and_tcp_round_trip() {
    if !root_or_skip("wan_delay_rate_and_tcp_round_trip") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let wan = LinkProfile::wan();
    let link = PacketLink::up("t-wan", wan).unwrap();

    // one-way delay from UDP pings: 60-byte packets add 13 µs of wire time each way
    let (rtt, one_way, err_ms) = one_way_delay(&link, &wan);
    eprintln!("37 Mbit/s link: median ping rtt {rtt:?}, one way {one_way:?}, error {err_ms:+.3} ms");
    assert!(err_ms.abs() < 0.5, "one-way delay {one_way:?} vs {:?}", wan.delay);

    // the endpoints' TCP sees the round trip: connect takes one, and the kernel's own
    // estimate after a request/response matches it
    let (mut c, mut s, connect) = tcp_pair(&link, 7002);
    assert!(connect >= wan.rtt(), "connect in {connect:?}, shorter than the round trip");
    let t = Instant::now();
    let server = std::thread::spawn(move || {
        let mut req = vec![0u8; 64 << 10];
        s.read_exact(&mut req).unwrap();
        s.write_all(&req).unwrap();
    });
    c.write_all(&vec![1u8; 64 << 10]).unwrap();
    let mut resp = vec![0u8; 64 << 10];
    c.read_exact(&mut resp).unwrap();
    let exchange = t.elapsed();
    server.join().unwrap();
    let kernel_rtt = tcp_rtt(&c).unwrap();
    eprintln!("connect {connect:?}, 64 KiB request/response {exchange:?}, tcp_info rtt {kernel_rtt:?}");
    assert!(exchange >= wan.rtt() * 2, "64 KiB each way from a cold window needs at least 2 round trips");
    assert!(
        kernel_rtt >= wan.rtt() && kernel_rtt < wan.rtt() + Duration::from_millis(15),
        "tcp_info rtt {kernel_rtt:?}"
    );

    // bulk transfer after slow start
    let r = bulk(&link, 7003, 16 << 20, Duration::from_millis(1000));
    let stats = link.stats();
    eprintln!(
        "37 Mbit/s link: goodput {:.3} Mbit/s (expect {:.3}), wire {:.3} Mbit/s, {stats:?}",
        r.goodput / 1e6,
        goodput_of(37e6) / 1e6,
        r.wire / 1e6
    );
    assert!((r.wire / 37e6 - 1.0).abs() < 0.02, "wire rate {:.3} Mbit/s", r.wire / 1e6);
    assert!((r.goodput / goodput_of(37e6) - 1.0).abs() < 0.02, "goodput {:.3} Mbit/s", r.goodput / 1e6);
    link.down().unwrap();
    assert!(!std::path::Path::new("/run/netns/awl-t-wan-a").exists());
}

#[test]
fn sustains_the_highest_rate() {
    if !root_or_skip("sustains_the_highest_rate") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // other work on the two cores can disturb one measurement: it gets a second try
    let mut last = None;
    for attempt in 1..=2 {
        let p = profile(HIGH_RATE, Duration::from_millis(2), Duration::from_millis(20));
        let link = PacketLink::up("t-high", p).unwrap();
        let (rtt, _, delay_err_ms) = one_way_delay(&link, &p);
        let bytes = (HIGH_RATE / 8.0 * 2.5) as usize;
        let r = bulk(&link, 7004, bytes, Duration::from_millis(500));
        eprintln!(
            "{} Mbit/s link, try {attempt}: one-way delay error {delay_err_ms:+.3} ms (median ping rtt {rtt:?}), \
             goodput {:.1} Mbit/s (expect {:.1}), wire {:.1} Mbit/s, {:?}",
            HIGH_RATE / 1e6,
            r.goodput / 1e6,
            goodput_of(HIGH_RATE) / 1e6,
            r.wire / 1e6,
            link.stats()
        );
        let ok = delay_err_ms.abs() < 0.5
            && (r.wire / HIGH_RATE - 1.0).abs() < 0.02
            && (r.goodput / goodput_of(HIGH_RATE) - 1.0).abs() < 0.02;
        if ok {
            return;
        }
        last = Some((r, delay_err_ms));
    }
    let (r, delay_err_ms) = last.unwrap();
    panic!(
        "at {} Mbit/s: wire {:.1} Mbit/s, goodput {:.1} Mbit/s, one-way delay error {delay_err_ms:+.3} ms",
        HIGH_RATE / 1e6,
        r.wire / 1e6,
        r.goodput / 1e6
    );
}

#[test]
fn loss_drops_packets_and_tcp_recovers() {
    if !root_or_skip("loss_drops_packets_and_tcp_recovers") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p = profile(50e6, Duration::from_millis(5), Duration::from_millis(50));
    let link = PacketLink::up("t-loss", LinkModel::with_loss(p, 0.01)).unwrap();
    bulk(&link, 7005, 2 << 20, Duration::ZERO);
    let s = link.stats().a_to_b;
    let lost = s.dropped_loss as f64 / (s.packets + s.dropped_loss + s.dropped_queue) as f64;
    eprintln!("1 % loss: {s:?}, lost {:.2} %", lost * 100.0);
    assert!(lost > 0.003 && lost < 0.03, "lost fraction {lost}");
}

/// Steps through rates and prints what each achieves; `--ignored --nocapture` to see
/// the figures docs/link.md reports.
#[test]
#[ignore = "measurement, not a check: prints achieved rates (about 20 s)"]
fn find_highest_rate() {
    if !root_or_skip("find_highest_rate") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for mbit in [100.0, 200.0, 400.0, 600.0, 800.0, 900.0, 1000.0] {
        let rate = mbit * 1e6;
        let p = profile(rate, Duration::from_millis(2), Duration::from_millis(20));
        let link = PacketLink::up("t-find", p).unwrap();
        let r = bulk(&link, 7006, (rate / 8.0 * 2.5) as usize, Duration::from_millis(500));
        eprintln!(
            "{mbit} Mbit/s: wire {:.1} ({:+.2} %), goodput {:.1} ({:+.2} % of {:.1}), {:?}",
            r.wire / 1e6,
            (r.wire / rate - 1.0) * 100.0,
            r.goodput / 1e6,
            (r.goodput / goodput_of(rate) - 1.0) * 100.0,
            goodput_of(rate) / 1e6,
            link.stats().a_to_b
        );
    }
}

/// Deletes the namespaces a test made itself, also when it fails.
struct NetnsGuard(Vec<String>);
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn attach_links_existing_namespaces_and_leaves_them() {
    if !root_or_skip("attach_links_existing_namespaces_and_leaves_them") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let names = ["awl-t-att-a", "awl-t-att-b"];
    let _guard = NetnsGuard(names.iter().map(|s| s.to_string()).collect());
    for ns in names {
        let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        assert!(std::process::Command::new("ip").args(["netns", "add", ns]).status().unwrap().success());
    }
    let end = |netns: &str, last: u8| Endpoint {
        netns: netns.into(),
        tun: "awl-up".into(),
        addr: std::net::Ipv4Addr::new(10, 254, 9, last),
    };
    let slow = profile(10e6, Duration::from_millis(10), Duration::from_millis(50));
    let fast = profile(100e6, Duration::from_millis(2), Duration::from_millis(50));
    let link = PacketLink::attach(end(names[0], 1), end(names[1], 2), slow.into(), fast.into()).unwrap();
    let rtt = udp_rtt(&link, 10);
    // 10 ms one way, 2 ms back, plus 60-byte packets on the wire
    let expect = Duration::from_millis(12) + slow.wire_time(60) + fast.wire_time(60);
    assert!(rtt >= expect && rtt < expect + Duration::from_millis(1), "rtt {rtt:?}, expected {expect:?}");
    link.down().unwrap();
    for ns in names {
        assert!(std::path::Path::new("/run/netns").join(ns).exists(), "{ns} kept after down");
    }
}
