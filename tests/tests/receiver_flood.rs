//! A real agent's transfer port flooded: 1,000 connections sending garbage headers, then
//! 100 transfers that stop half way. The agent stays within its stated memory and disk
//! bounds, the half-finished spools are removed when they expire, and it still takes a
//! real container migration afterwards (the counter's count goes on).
//!
//! The agent runs with `--max-transfer-connections 64 --max-transfers 8 --max-spool 256Mi
//! --transfer-handshake-timeout 2 --transfer-expiry 6`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use away_e2e::{counter_state, http_get, require_root, require_socket, wait_for, Node};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_CONNECTIONS: u64 = 64;
const MAX_TRANSFERS: u64 = 8;
const MAX_SPOOL: u64 = 256 << 20;
const CHUNK: u64 = 1 << 20;
/// Largest control frame a connection may make the receiver read before its hello.
const MAX_CONTROL: u64 = 1 << 20;

fn node(role: &str) -> Node {
    let id = format!("{role}-flood-{}", std::process::id());
    Node::at(format!("away-{id}"), PathBuf::from(format!("/tmp/away-e2e-flood/{id}")))
}

/// A value in kB of /proc/PID/status (VmRSS, VmHWM), in bytes.
fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Bytes the files below `path` take on disk (allocated blocks).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(path) else { return 0 };
    let own = m.blocks() * 512;
    if !m.is_dir() {
        return own;
    }
    own + std::fs::read_dir(path).unwrap().flatten().map(|e| disk_bytes(&e.path())).sum::<u64>()
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    [vec![kind], (body.len() as u32).to_be_bytes().to_vec(), body.to_vec()].concat()
}

fn hello(id: &str, total: u64, secret: &str) -> Vec<u8> {
    let h = serde_json::json!({"version": 1, "transfer_id": id, "total_bytes": total, "chunk_size": CHUNK,
        "chunk_count": total.div_ceil(CHUNK), "compression": "none", "sha256": "0".repeat(64), "meta": null,
        "secret": secret});
    frame(1, &serde_json::to_vec(&h).unwrap())
}

fn chunk(index: u64) -> Vec<u8> {
    use sha2::Digest;
    let data: Vec<u8> = (0..CHUNK).map(|i| (i as u8) ^ (index as u8)).collect();
    let sha = sha2::Sha256::digest(&data).to_vec();
    frame(3, &[index.to_be_bytes().to_vec(), (CHUNK as u32).to_be_bytes().to_vec(), vec![0u8], sha, data].concat())
}

/// Garbage without a rand dependency.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    away_e2e::noise(seed, len)
}

/// The first answer frame (kind, text), or None when the connection closed without one.
async fn answer(s: &mut tokio::net::TcpStream) -> Option<(u8, String)> {
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut head)).await.ok()?.ok()?;
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()).min(1 << 20) as usize;
    let mut body = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut body)).await.ok()?.ok()?;
    Some((head[0], String::from_utf8_lossy(&body).into_owned()))
}

#[derive(Debug, Default)]
struct Tally {
    refused_busy: u64,
    refused_spool: u64,
    other_error: u64,
    closed: u64,
    admitted: u64,
}

fn count(t: &mut Tally, a: Option<(u8, String)>) {
    match a {
        Some((6, m)) if m.contains("receiver busy") => t.refused_busy += 1,
        Some((6, m)) if m.contains("spool full") => t.refused_spool += 1,
        Some((2, _)) => t.admitted += 1,
        Some(_) => t.other_error += 1,
        None => t.closed += 1,
    }
}

#[test]
fn a_flooded_receiver_stays_bounded_and_still_takes_a_migration() {
    if !(require_root() && require_socket("/run/containerd/containerd.sock", "containerd")) {
        return;
    }
    let (source, target) = (node("source"), node("target"));
    let log = PathBuf::from(format!("/tmp/away-e2e-flood/agent-{}.log", std::process::id()));
    let flags = [
        "--commit-lease",
        "20",
        "--max-transfer-connections",
        "64",
        "--max-transfers",
        "8",
        "--max-spool",
        "256Mi",
        "--transfer-handshake-timeout",
        "2",
        "--transfer-expiry",
        "6",
    ];
    let agent = target.start_agent("target-flood", &flags, &[("AWAY_LOG", "info")], &log);
    let api_port: u16 = agent.api.rsplit(':').next().unwrap().parse().unwrap();
    let info: Value = serde_json::from_str(&wait_for(30, || http_get(api_port, "/v1/node")).unwrap()).unwrap();
    let transfer = info["transfer_addr"].as_str().unwrap().to_string();
    let pid = agent.pid();
    let spool = agent.node.state.join("transfers");
    let rss_start = proc_status(pid, "VmRSS:");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1. 1,000 connections at once, each writing a random header (and the hello kind with
    //    the largest length a control frame may have, whose body never comes)
    let started = Instant::now();
    let garbage_tally = rt.block_on(async {
        let tasks: Vec<_> = (0..1000u64)
            .map(|i| {
                let transfer = transfer.clone();
                tokio::spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(&transfer).await.ok()?;
                    let bytes = if i % 10 == 0 {
                        [vec![1u8], (MAX_CONTROL as u32).to_be_bytes().to_vec(), garbage(i, 100)].concat()
                    } else {
                        garbage(i, 5 + (i as usize % 60))
                    };
                    let _ = s.write_all(&bytes).await;
                    answer(&mut s).await
                })
            })
            .collect();
        let mut t = Tally::default();
        for task in tasks {
            count(&mut t, task.await.unwrap());
        }
        t
    });
    let garbage_secs = started.elapsed().as_secs_f64();
    let rss_after_garbage = proc_status(pid, "VmRSS:");

    // 2. 100 transfers that stop half way: hello for 8 MiB, 2 chunks, hang up; 10 at a time
    // (each announced first, as its source would: the receiver's bounds are under test)
    let secrets: std::collections::HashMap<String, String> = (0..100)
        .map(|i| format!("half-{i}"))
        .map(|id| (id.clone(), away_e2e::announce(&agent.api, &id, "flood", "flooder")))
        .collect();
    let secrets = std::sync::Arc::new(secrets);
    let started = Instant::now();
    let mut half_tally = Tally::default();
    let mut peak_spool = 0;
    for batch in 0..10u64 {
        let results = rt.block_on(async {
            let tasks: Vec<_> = (0..10u64)
                .map(|i| {
                    let (transfer, secrets) = (transfer.clone(), secrets.clone());
                    tokio::spawn(async move {
                        let id = format!("half-{}", batch * 10 + i);
                        let mut s = tokio::net::TcpStream::connect(&transfer).await.ok()?;
                        s.write_all(&hello(&id, 8 * CHUNK, &secrets[&id])).await.ok()?;
                        let a = answer(&mut s).await;
                        if matches!(a, Some((2, _))) {
                            let _ = s.write_all(&[chunk(0), chunk(1)].concat()).await;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        a
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        for a in results {
            count(&mut half_tally, a);
        }
        peak_spool = peak_spool.max(disk_bytes(&spool));
    }
    let half_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    peak_spool = peak_spool.max(disk_bytes(&spool));
    let spools_left = std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0);
    let (rss, hwm) = (proc_status(pid, "VmRSS:"), proc_status(pid, "VmHWM:"));
    // stated bound: each open connection may hold one control frame before its hello, each
    // admitted transfer a chunk frame and its decoded copy; plus 32 MiB for the rest
    let growth_bound = MAX_CONNECTIONS * MAX_CONTROL + MAX_TRANSFERS * 2 * (CHUNK + 64) + (32 << 20);
    eprintln!(
        "flood: agent pid {pid}, limits: {MAX_CONNECTIONS} connections, {MAX_TRANSFERS} transfers, spool {} MiB",
        MAX_SPOOL >> 20
    );
    eprintln!("  1000 garbage connections in {garbage_secs:.1} s: {garbage_tally:?}");
    eprintln!("  100 half-finished transfers in {half_secs:.1} s: {half_tally:?}");
    eprintln!(
        "  memory: VmRSS {} MiB at start, {} MiB after the garbage, {} MiB now; VmHWM {} MiB; growth bound {} MiB",
        rss_start >> 20,
        rss_after_garbage >> 20,
        rss >> 20,
        hwm >> 20,
        growth_bound >> 20
    );
    eprintln!(
        "  disk: spool peak {} KiB in {spools_left} spools (bound {} MiB reserved)",
        peak_spool >> 10,
        MAX_SPOOL >> 20
    );
    assert!(away_runtime::host::process::process_runs(pid), "the agent died");
    assert_eq!(garbage_tally.admitted, 0, "garbage admitted: {garbage_tally:?}");
    assert_eq!(half_tally.admitted, MAX_TRANSFERS, "admitted exactly the limit: {half_tally:?}");
    assert_eq!(half_tally.refused_busy, 100 - MAX_TRANSFERS, "{half_tally:?}");
    assert_eq!(spools_left as u64, MAX_TRANSFERS, "one spool per admitted transfer");
    assert!(peak_spool <= MAX_SPOOL, "spool {peak_spool} over {MAX_SPOOL}");
    assert!(hwm.saturating_sub(rss_start) <= growth_bound, "memory grew {} MiB", (hwm - rss_start) >> 20);

    // 3. the half-finished ones expire: spools gone, places free again
    let expired = wait_for(30, || (std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0) == 0).then_some(()));
    assert!(expired.is_some(), "half-finished spools left: {:?}", std::fs::read_dir(&spool).map(|d| d.count()));
    eprintln!("  the {MAX_TRANSFERS} half-finished spools expired and were removed");

    // 4. a real migration still goes through: the counter's count goes on
    let counter = source.start_counter(&agent.node, format!("flood-{}", std::process::id()), "containerd");
    let (name, port) = (counter.name.clone(), counter.port);
    let state = || counter_state(port);
    let before = wait_for(60, || state().filter(|s| s.0 >= 2)).expect("counter counts");
    let (ok, out, err) = source.away(&["migrate", &name, "--to", &agent.api, "--json", "--source-name", "source"]);
    let after = wait_for(30, state);
    drop(counter);
    assert!(ok, "migration after the flood failed: {out} {err}");
    let after = after.expect("counter answers after the move");
    assert_eq!(after.1, before.1, "the counter restarted instead of moving");
    assert!(after.0 >= before.0);
    eprintln!("  migration after the flood: count {} -> {}", before.0, after.0);
}
