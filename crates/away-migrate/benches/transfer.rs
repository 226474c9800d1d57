//! End-to-end transfer time per compression over two emulated links.
//!
//! `cargo bench -p away-migrate --bench transfer`
//!
//! The payload imitates a CRIU checkpoint: `pages-1.img` made of 4 KiB pages (35 % zero pages,
//! 25 % random pages, 40 % text-like pages of repeated words and small integers), a few small
//! image files, and a JSON manifest. It goes through an in-process relay (`away_link::proxy`) that models a
//! link: a token bucket at the link rate, a one-way delay in each direction, and a 200 ms router queue.
//! Time is end to end: tar spool, chunking, compression, wire, verification, unpack, verdict.
//!
//! Then the cost of mutual TLS (issue 17): 256 MiB over loopback (no relay), plaintext and
//! TLS alternating, three runs each, with and without compression. `-- tls` runs only that part.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use away_migrate::channel::Channels;
use away_migrate::transfer::{send, serve, Compression, ReceivedPayload, Receiver, SendOptions, Verdict};
use tokio::net::TcpListener;

#[derive(Clone, Copy)]
struct Link {
    name: &'static str,
    bits_per_sec: f64,
    one_way_delay: Duration,
    payload_mib: usize,
}

const LINKS: [Link; 2] = [
    Link {
        name: "37 Mbit/s, 36.784 ms",
        bits_per_sec: 37e6,
        one_way_delay: Duration::from_micros(36_784),
        payload_mib: 32,
    },
    Link { name: "1 Gbit/s, 0.1 ms", bits_per_sec: 1e9, one_way_delay: Duration::from_micros(100), payload_mib: 128 },
];

const COMPRESSIONS: [Compression; 5] = [
    Compression::None,
    Compression::Gzip { level: 1 },
    Compression::Zstd { level: 1 },
    Compression::Zstd { level: 3 },
    Compression::Gzip { level: 6 },
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn synthesize_checkpoint(dir: &Path, mib: usize) {
    fs::create_dir_all(dir).unwrap();
    let words: [&[u8]; 8] = [
        b"malloc ",
        b"session_id=",
        b"GET /api/v1/items ",
        b"\x00\x00\x7f\xff",
        b"user ",
        b"200 OK ",
        b"lorem ipsum ",
        b"0x00005555",
    ];
    let mut rng = Rng(0x2545f4914f6cdd1d);
    let mut pages = Vec::with_capacity(mib << 20);
    while pages.len() < mib << 20 {
        let roll = rng.next() % 100;
        let start = pages.len();
        if roll < 35 {
            pages.resize(start + 4096, 0);
        } else if roll < 60 {
            while pages.len() < start + 4096 {
                pages.extend_from_slice(&rng.next().to_le_bytes());
            }
        } else {
            while pages.len() < start + 4096 {
                let r = rng.next();
                pages.extend_from_slice(words[(r % 8) as usize]);
                pages.extend_from_slice(&((r >> 8) % 1000).to_le_bytes()[..2]);
            }
        }
        pages.truncate(start + 4096);
    }
    fs::write(dir.join("pages-1.img"), &pages).unwrap();
    for name in ["core-1.img", "mm-1.img", "pagemap-1.img", "fdinfo-2.img", "files.img"] {
        let mut small = Vec::new();
        while small.len() < 6000 {
            small.extend_from_slice(&(rng.next() % 4096).to_le_bytes());
        }
        fs::write(dir.join(name), &small).unwrap();
    }
    fs::write(dir.join("manifest.json"), br#"{"workload":"bench","runtime":"containerd"}"#).unwrap();
}

async fn relay(listener: TcpListener, upstream: SocketAddr, link: Link) {
    let profile = away_link::LinkProfile {
        rate_bits_per_sec: link.bits_per_sec,
        delay: link.one_way_delay,
        jitter: Duration::ZERO,
        queue: Duration::from_millis(200),
    };
    let _ = away_link::proxy(listener, upstream, profile).await;
}

struct Row {
    link: &'static str,
    compression: Compression,
    seconds: f64,
    raw: u64,
    wire: u64,
}

/// Plaintext against mutual TLS on loopback, same payload, same run, alternating.
async fn tls_cost(tmp: &Path) {
    const MIB: usize = 256;
    const RUNS: usize = 3;
    let src = tmp.join(format!("checkpoint-{MIB}"));
    if !src.exists() {
        synthesize_checkpoint(&src, MIB);
    }
    let ca = away_identity::Ca::load_or_create(&tmp.join("ca")).unwrap();
    let identity = |node: &str| Channels::from_identity(&ca.issue_self(node, &[]).unwrap()).unwrap();
    let (source, target) = (identity("bench-source"), identity("bench-target"));
    let mut addrs = Vec::new();
    for (i, channels) in [Channels::plaintext(), target].into_iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap().to_string());
        let receiver = Receiver::from_listener(listener, tmp.join(format!("spool-tls-{i}"))).with_channels(channels);
        tokio::spawn(receiver.serve(|_p: ReceivedPayload| async { Verdict::ok("bench") }));
    }
    let modes = [("plaintext", Channels::plaintext(), &addrs[0]), ("mutual TLS", source, &addrs[1])];
    println!();
    println!("TLS cost: {MIB} MiB synthetic checkpoint over 127.0.0.1 (no relay), 1 MiB chunks, 2 cores,");
    println!("TLS 1.3 (rustls, ring; AES-GCM or ChaCha20 as negotiated), both modes alternating, {RUNS} runs each");
    println!("| compression | plaintext s | mutual TLS s | TLS / plaintext |");
    println!("| --- | ---: | ---: | ---: |");
    for compression in [Compression::None, Compression::Zstd { level: 1 }] {
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            for (i, (name, channels, addr)) in modes.iter().enumerate() {
                let opts = SendOptions {
                    compression,
                    channels: channels.clone(),
                    peer_node: "bench-target".into(),
                    ..SendOptions::default()
                };
                let started = Instant::now();
                let outcome = send(addr, &src, serde_json::Value::Null, &opts).await.expect("bench transfer");
                let seconds = started.elapsed().as_secs_f64();
                assert!(outcome.verdict.ok);
                eprintln!("  loopback {MIB} MiB {:<8} {name:<10} {seconds:>7.2} s", compression.to_string());
                times[i].push(seconds);
            }
        }
        let list = |t: &[f64]| t.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(" / ");
        let mean = |t: &[f64]| t.iter().sum::<f64>() / t.len() as f64;
        println!(
            "| {compression} | {} | {} | {:.3} |",
            list(&times[0]),
            list(&times[1]),
            mean(&times[1]) / mean(&times[0])
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    if std::env::args().any(|a| a == "tls") {
        tls_cost(tmp.path()).await;
        return;
    }
    let spool = tmp.path().join("spool");
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(serve(target, spool, |_p: ReceivedPayload| async { Verdict::ok("bench") }));

    let mut rows = Vec::new();
    for link in LINKS {
        let src = tmp.path().join(format!("checkpoint-{}", link.payload_mib));
        if !src.exists() {
            synthesize_checkpoint(&src, link.payload_mib);
        }
        let relay_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = relay_listener.local_addr().unwrap().to_string();
        let relay_task = tokio::spawn(relay(relay_listener, target_addr, link));
        for compression in COMPRESSIONS {
            let opts = SendOptions { compression, ..SendOptions::default() };
            let started = Instant::now();
            let outcome = send(&relay_addr, &src, serde_json::Value::Null, &opts).await.expect("bench transfer");
            let seconds = started.elapsed().as_secs_f64();
            assert!(outcome.verdict.ok);
            eprintln!("  {:<22} {:<8} {seconds:>7.2} s", link.name, compression.to_string());
            rows.push(Row { link: link.name, compression, seconds, raw: outcome.bytes_raw, wire: outcome.bytes_wire });
        }
        relay_task.abort();
    }

    println!();
    println!("transfer bench: synthetic CRIU-like checkpoint (pages 35% zero / 25% random / 40% text), 1 MiB chunks,");
    println!(
        "2 cores, 127.0.0.1 through a token-bucket relay; 32 MiB payload on the 37 Mbit/s link, 128 MiB on 1 Gbit/s"
    );
    println!("| link | compression | seconds | bytes raw | bytes on wire | effective Mbit/s | wire/raw |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {} | {} | {:.1} | {:.3} |",
            r.link,
            r.compression,
            r.seconds,
            r.raw,
            r.wire,
            r.raw as f64 * 8.0 / r.seconds / 1e6,
            r.wire as f64 / r.raw as f64
        );
    }
    for link in LINKS {
        let best = rows
            .iter()
            .filter(|r| r.link == link.name)
            .min_by(|a, b| a.seconds.total_cmp(&b.seconds))
            .expect("rows per link");
        println!("fastest on {}: {} ({:.2} s)", link.name, best.compression, best.seconds);
    }
    tls_cost(tmp.path()).await;
}
