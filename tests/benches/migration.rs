//! Container migration of `memload` by each mode, containerd -> containerd on one host:
//! * staged stop-and-copy (checkpoint on disk, transfer, restore in turn) of 256 MiB
//!   over the research's WAN (37 Mbit/s, 36.784 ms one way, emulated in userspace with
//!   `away_link::proxy` on the transfer port), with and without compression;
//! * 128 MiB over plain loopback by every mode: staged, streamed stop-and-copy (the
//!   pages go from CRIU's page server into the target's images while the rest
//!   travels) and lazy (post-copy), the last two also with the page stream stored
//!   (`--compression none`: on loopback zstd is slower than the link).
//!
//! Prints, per run, the time of each phase, downtime, degraded time, bytes raw and on
//! the wire, and for the WAN the ratio to the physical limit (bytes on the wire / link
//! rate + round trips). The page relay of streamed and lazy moves connects directly,
//! not through the proxy, so those modes run on loopback only here; `away lab compare`
//! measures them over packet-level emulated links.
//!
//! `cargo bench -p away-e2e --bench migration` (root; containerd and CRIU running).
//! Takes about 5 minutes.

use std::process::{Child, Command, Stdio};

use away_e2e::{away_bin, free_port, lab_image, wait_for};
use away_link::LinkProfile;
use serde_json::Value;

/// Round trips the transfer needs besides the data: TCP connect, hello/resume, done/verdict.
const ROUND_TRIPS: u32 = 3;
/// Loopback runs per mode (the table shows each).
const LOOPBACK_RUNS: usize = 2;

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node_env(cmd: &mut Command, role: &str, run: usize) {
    let base = format!("/var/tmp/away-bench-mig/{role}-{run}");
    cmd.env("AWAY_AGENT_TOKEN", away_e2e::agent_token())
        .env("AWAY_STATE_DIR", format!("{base}/state"))
        .env("AWAY_RUN_DIR", format!("{base}/run"))
        .env("AWAY_NAMESPACE", format!("away-bench-{role}"));
}

fn away(role: &str, run: usize, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(away_bin());
    node_env(&mut c, role, run);
    c.args(args).output().expect("run away")
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // measure the release build of away, as users run it
    std::env::set_var("AWAY_BENCH_RELEASE", "1");
    let tar = lab_image("memload");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wan = "37 Mbit/s + 36.784 ms (away-link proxy)";
    let mut cases: Vec<(&str, Option<LinkProfile>, &str, &str, &str)> = vec![
        (wan, Some(LinkProfile::wan()), "256Mi", "zstd:1", "staged"),
        (wan, Some(LinkProfile::wan()), "256Mi", "none", "staged"),
    ];
    for _ in 0..LOOPBACK_RUNS {
        for (mode, compression) in
            [("staged", "zstd:1"), ("stop-copy", "zstd:1"), ("stop-copy", "none"), ("lazy", "zstd:1"), ("lazy", "none")]
        {
            cases.push(("loopback", None, "128Mi", compression, mode));
        }
    }
    let mut rows = Vec::new();
    let mut run = 0;
    for (link_name, link, size, compression, mode) in cases {
        {
            run += 1;
            let (api, transfer) = (free_port(), free_port());
            let advertise = match link {
                Some(profile) => {
                    let front = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
                    let addr = front.local_addr().unwrap();
                    rt.spawn(away_link::proxy(front, ([127, 0, 0, 1], transfer).into(), profile));
                    addr.to_string()
                }
                None => format!("127.0.0.1:{transfer}"),
            };
            let mut agent = Command::new(away_bin());
            node_env(&mut agent, "target", run);
            agent.args([
                "agent",
                "--name",
                "target",
                "--listen",
                &format!("127.0.0.1:{api}"),
                "--transfer-listen",
                &format!("127.0.0.1:{transfer}"),
                "--transfer-advertise",
                &advertise,
                "--insecure-plaintext-channels",
            ]);
            let _agent = Agent(agent.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
            wait_for(30, || std::net::TcpStream::connect(("127.0.0.1", api)).ok()).expect("agent up");
            let name = format!("bench-memload-{run}");
            let out = away(
                "source",
                run,
                &[
                    "run",
                    tar.to_str().unwrap(),
                    "--name",
                    &name,
                    "--runtime",
                    "containerd",
                    "--memory",
                    "400Mi",
                    "-e",
                    &format!("MEMLOAD_SIZE={size}"),
                    "-e",
                    "MEMLOAD_PORT=0",
                ],
            );
            assert!(out.status.success(), "run memload: {}", String::from_utf8_lossy(&out.stderr));
            wait_for(60, || {
                let logs = away("source", run, &["logs", &name]);
                String::from_utf8_lossy(&logs.stdout).contains("pages resident").then_some(())
            })
            .expect("memload filled its memory");
            let out = away(
                "source",
                run,
                &[
                    "migrate",
                    &name,
                    "--to",
                    &format!("127.0.0.1:{api}"),
                    "--compression",
                    compression,
                    "--mode",
                    mode,
                    "--json",
                    "--reconnect-timeout",
                    "120",
                ],
            );
            let _ = away("target", run, &["rm", "--force", &name]);
            let _ = away("source", run, &["rm", "--force", &name]);
            assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
            let r: Value = serde_json::from_slice(&out.stdout).unwrap();
            let phase = |n: &str| {
                r["phases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["name"] == n)
                    .map(|p| p["millis"].as_u64().unwrap())
                    .unwrap_or(0)
            };
            let wire = r["bytes_wire"].as_u64().unwrap();
            let limit = link.map(|l| l.wire_time(wire) + l.rtt() * ROUND_TRIPS);
            rows.push(Row {
                link: link_name,
                size,
                mode: if mode == "stop-copy" { "streamed" } else { mode },
                compression,
                raw: r["bytes_raw"].as_u64().unwrap(),
                wire,
                checkpoint: phase("checkpoint"),
                transfer: phase("transfer"),
                pages: phase("pages"),
                restore: phase("restore"),
                downtime: r["downtime_millis"].as_u64().unwrap(),
                degraded: r["degraded_millis"].as_u64().unwrap_or(0),
                total: r["total_millis"].as_u64().unwrap(),
                limit,
            });
            let _ = std::fs::remove_dir_all(format!("/var/tmp/away-bench-mig/source-{run}"));
            let _ = std::fs::remove_dir_all(format!("/var/tmp/away-bench-mig/target-{run}"));
        }
    }
    println!("\ncontainer migration of memload (filled, half random / half zero per page), containerd -> containerd,");
    println!(
        "two nodes on one host (own containerd namespaces and state), CRIU {}, {} cores, release build",
        criu_version(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "downtime: CRIU's freeze (from its log) to the target's restore done; degraded (lazy): then until the last page arrived"
    );
    println!("streamed: `pages` is the target pulling the memory from the source's CRIU, before its restore");
    println!("physical limit = bytes on the wire / link rate + {ROUND_TRIPS} round trips (connect, hello/resume, done/verdict)\n");
    println!("| link | size | mode | compression | raw MB | wire MB | checkpoint s | transfer s | pages s | restore s | downtime s | degraded s | total s | limit s | downtime / limit |");
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let s = |ms: u64| ms as f64 / 1000.0;
        let (lim, ratio) = match r.limit {
            Some(l) => (format!("{:.2}", l.as_secs_f64()), format!("{:.2}", s(r.downtime) / l.as_secs_f64())),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {lim} | {ratio} |",
            r.link,
            r.size,
            r.mode,
            r.compression,
            r.raw as f64 / 1e6,
            r.wire as f64 / 1e6,
            s(r.checkpoint),
            s(r.transfer),
            s(r.pages),
            s(r.restore),
            s(r.downtime),
            s(r.degraded),
            s(r.total)
        );
    }
}

/// One measured move.
struct Row {
    link: &'static str,
    size: &'static str,
    mode: &'static str,
    compression: &'static str,
    raw: u64,
    wire: u64,
    checkpoint: u64,
    transfer: u64,
    pages: u64,
    restore: u64,
    downtime: u64,
    degraded: u64,
    total: u64,
    limit: Option<std::time::Duration>,
}

fn criu_version() -> String {
    let out = Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    out.lines().next().unwrap_or("?").trim_start_matches("Version: ").to_string()
}
