//! Real, unmodified servers moved between two nodes of a local cluster (each node its
//! own network namespace and containerd, joined by the host's bridge: a LAN hop),
//! through the broker, in every container mode (issue 21: "real servers under 0.5 s on
//! the LAN"):
//! * Debian's `redis-server`, filled with 8 MiB of values (8192 keys of 1 KiB);
//! * Debian's `nginx` (nginx-light) as one process (`master_process off`: a lazy move
//!   serves one process's pages).
//!
//! Each image is packed by `away image build` from the host's binary and the libraries
//! `ldd` names ([`away_e2e::host_binary_image`]). The server moves back and forth: each
//! mode (staged, streamed, lazy, then `auto`, which shows the pre-move write-rate check)
//! [`RUNS`] times; after each move it must answer on its new node (redis: a key written
//! before the first move, byte for byte; nginx: its page).
//!
//! Prints, per move, downtime (CRIU's freeze to the target's restore done, from the
//! migration's report) and every phase with its parts (the target's restore: the image
//! store, the snapshot and container, containerd's task creation split into CRIU's
//! restore as its own log times it and the rest (shim, runc), the task's start).
//!
//! `cargo bench -p away-e2e --bench servers` (root; CRIU, containerd's binaries and
//! `redis-server`, `nginx` from deploy/install.sh). `AWAY_BENCH_RUNS=N` sets the runs per
//! mode (default 2). Takes about 6 minutes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use away_e2e::{away_bin, broker_call, free_cluster_name, host_binary_image, wait_for, ClusterDown};
use reqwest::Method;
use serde_json::{json, Value};

const REDIS: &str = "/usr/bin/redis-server";
const NGINX: &str = "/usr/sbin/nginx";
const REDIS_PORT: u16 = 6379;
const NGINX_PORT: u16 = 18091;
/// Keys and the size of each value redis holds before the first move.
const KEYS: usize = 8192;
const VALUE: usize = 1024;
/// Moves per mode.
const RUNS: usize = 2;
const MODES: [&str; 4] = ["staged", "stop-copy", "lazy", "auto"];

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // measure the release build of away, as users run it
    std::env::set_var("AWAY_BENCH_RELEASE", "1");
    assert!(away_e2e::require_root(), "the benchmark needs root");
    for bin in [REDIS, NGINX] {
        assert!(Path::new(bin).is_file(), "{bin} is missing: deploy/install.sh installs it");
    }
    let runs: usize = std::env::var("AWAY_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(RUNS);
    let work = PathBuf::from(format!("/var/tmp/away-bench-servers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let images = [("redis", redis_image(&work.join("redis"))), ("nginx", nginx_image(&work.join("nginx")))];

    let name = free_cluster_name("sv");
    let plan = away_cluster::ClusterPlan {
        name: name.clone(),
        nodes: vec![
            away_cluster::NodePlan { name: "a".into(), tier: away_model::Tier::Cloud },
            away_cluster::NodePlan { name: "b".into(), tier: away_model::Tier::Edge },
        ],
        away: away_bin().to_path_buf(),
        images: images.iter().map(|(_, tar)| tar.clone()).collect(),
        overlay: None,
    };
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = ClusterDown(name.clone());
    wait_for(60, || {
        let (_, nodes) = broker_call(&info, Method::GET, "/v1/nodes", None);
        nodes.as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "online").count() == 2).then_some(())
    })
    .expect("both agents online");
    let ip = |node: &str| info.nodes.iter().find(|n| n.name == node).expect("a node of the cluster").ip.to_string();

    let mut rows = Vec::new();
    for (server, _) in &images {
        let workload = format!("bench-{server}");
        let spec = json!({"name": workload, "image": format!("away/bench-{server}:latest"),
            "resources": {"memory": "256Mi", "cpus": 1.0}, "placement": {"tiers": ["cloud", "edge"]}});
        let (s, placed) = broker_call(&info, Method::POST, "/v1/workloads", Some(spec));
        assert_eq!(s, 201, "{placed}");
        let mut at = placed["workload"]["node"].as_str().expect("placed on a node").to_string();
        let value = value_of(0);
        let answers = |node: &str| -> bool {
            let ip = ip(node);
            match *server {
                "redis" => redis_get(&ip, "key:0").is_some_and(|v| v == value),
                _ => nginx_get(&ip).is_some_and(|b| b == "nginx answers\n"),
            }
        };
        if *server == "redis" {
            wait_for(30, || redis_ping(&ip(&at)).then_some(())).expect("redis answers");
            fill_redis(&ip(&at));
        }
        wait_for(30, || answers(&at).then_some(())).unwrap_or_else(|| panic!("{server} does not answer on {at}"));
        for mode in MODES {
            for run in 0..runs {
                let to = if at == "a" { "b" } else { "a" }.to_string();
                let (s, m) = broker_call(
                    &info,
                    Method::POST,
                    "/v1/migrations",
                    Some(json!({"workload": workload, "to": to, "mode": mode})),
                );
                assert_eq!(s, 202, "{m}");
                let id = m["migration"]["id"].as_str().expect("a migration id").to_string();
                let m = wait_for(300, || {
                    let (_, m) = broker_call(&info, Method::GET, &format!("/v1/migrations/{id}"), None);
                    m["state"].as_str().is_some_and(|s| s != "running" && s != "pending").then_some(m)
                })
                .unwrap_or_else(|| panic!("{server} {mode}: migration {id} did not end"));
                assert_eq!(m["state"], "succeeded", "{server} {mode} run {run}: {m}");
                let report = m["report"].clone();
                assert!(
                    wait_for(20, || answers(&to).then_some(())).is_some(),
                    "{server} does not answer on {to} after a {mode} move"
                );
                eprintln!("{server} {mode} {at}->{to}: downtime {} ms", report["downtime_millis"]);
                rows.push(Row { server, mode, report });
                at = to;
            }
        }
        let (s, gone) = broker_call(&info, Method::DELETE, &format!("/v1/workloads/{workload}"), None);
        assert!((200..300).contains(&s), "remove {workload}: {s} {gone}");
    }
    print_table(&rows, runs);
    let _ = std::fs::remove_dir_all(&work);
}

/// One measured move.
struct Row {
    server: &'static str,
    mode: &'static str,
    report: Value,
}

fn print_table(rows: &[Row], runs: usize) {
    println!(
        "\nreal servers moved between two nodes of a local cluster (own netns and containerd each, one host bridge),"
    );
    println!(
        "through the broker; CRIU {}, {} cores, release build, {runs} move(s) per mode, back and forth",
        criu_version(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("redis-server {} with {KEYS} keys of {VALUE} B; nginx {} as one process", version(REDIS), version(NGINX));
    println!("downtime: CRIU's freeze (from its log) to the target's restore done (lazy: then its memory follows)");
    println!("phases in ms; [parts] of a phase as the runtime times them\n");
    println!(
        "| server | mode | downtime ms | raw MB | check | checkpoint | transfer | pages | restore | restore parts |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        let phases = r.report["phases"].as_array().cloned().unwrap_or_default();
        let ms = |n: &str| {
            phases
                .iter()
                .find(|p| p["name"] == n)
                .and_then(|p| p["millis"].as_u64())
                .map_or("-".into(), |m| m.to_string())
        };
        let parts = phases
            .iter()
            .find(|p| p["name"] == "restore")
            .and_then(|p| p["parts"].as_array())
            .map(|parts| {
                parts
                    .iter()
                    .map(|p| format!("{} {}", p["name"].as_str().unwrap_or("?"), p["millis"]))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .join(", ");
        println!(
            "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} |",
            r.server,
            if r.mode == "stop-copy" { "streamed" } else { r.mode },
            r.report["downtime_millis"],
            r.report["bytes_raw"].as_u64().unwrap_or(0) as f64 / 1e6,
            ms("check"),
            ms("checkpoint"),
            ms("transfer"),
            ms("pages"),
            ms("restore"),
            parts
        );
    }
    println!("\nevery phase of every move:");
    for r in rows {
        let phases = r.report["phases"].as_array().cloned().unwrap_or_default();
        let all: Vec<String> = phases
            .iter()
            .map(|p| {
                let parts = p["parts"].as_array().map_or(String::new(), |parts| {
                    format!(
                        " [{}]",
                        parts
                            .iter()
                            .map(|q| format!("{} {}", q["name"].as_str().unwrap_or("?"), q["millis"]))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
                format!("{} {}{parts}", p["name"].as_str().unwrap_or("?"), p["millis"])
            })
            .collect();
        println!(
            "{} {}: downtime {} ms; {} ({})",
            r.server,
            r.mode,
            r.report["downtime_millis"],
            all.join("; "),
            r.report["reason"].as_str().unwrap_or("")
        );
    }
}

/// redis-server with persistence off (its state is its memory), on all addresses.
fn redis_image(out: &Path) -> PathBuf {
    let conf = format!(
        "port {REDIS_PORT}\nbind 0.0.0.0\nprotected-mode no\ndaemonize no\nsave \"\"\nappendonly no\n\
         dir /data\nlogfile \"\"\n"
    );
    host_binary_image(
        Path::new(REDIS),
        &[("etc/redis/redis.conf", conf)],
        &["data", "tmp"],
        &[REDIS, "/etc/redis/redis.conf"],
        "away/bench-redis:latest",
        out,
    )
}

/// nginx as one process serving a fixed page.
fn nginx_image(out: &Path) -> PathBuf {
    away_e2e::nginx_image("master_process off;\nworker_processes 1;\n", NGINX_PORT, "away/bench-nginx:latest", out)
}

/// Value `i` of the fill: printable, varied (it compresses like text, not like zeros).
fn value_of(i: usize) -> Vec<u8> {
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..VALUE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b'a' + (x % 26) as u8
        })
        .collect()
}

fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn redis_conn(ip: &str) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&format!("{ip}:{REDIS_PORT}").parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    Some(s)
}

/// Reads until `want` bytes arrived (or the peer stops).
fn read_n(s: &mut TcpStream, want: usize) -> Option<Vec<u8>> {
    let mut got = vec![0u8; want];
    s.read_exact(&mut got).ok()?;
    Some(got)
}

fn redis_ping(ip: &str) -> bool {
    let Some(mut s) = redis_conn(ip) else { return false };
    s.write_all(&resp(&[b"PING"])).is_ok() && read_n(&mut s, 7).is_some_and(|r| r == b"+PONG\r\n")
}

/// Writes the fill, pipelined; every SET must answer +OK.
fn fill_redis(ip: &str) {
    let mut s = redis_conn(ip).expect("connect to redis");
    let mut batch = Vec::new();
    for i in 0..KEYS {
        batch.extend(resp(&[b"SET", format!("key:{i}").as_bytes(), &value_of(i)]));
    }
    s.write_all(&batch).expect("send the fill");
    let replies = read_n(&mut s, KEYS * 5).expect("redis answers the fill");
    assert!(replies.chunks(5).all(|r| r == b"+OK\r\n"), "a SET failed");
}

/// The value of `key` (a bulk string of [`VALUE`] bytes).
fn redis_get(ip: &str, key: &str) -> Option<Vec<u8>> {
    let mut s = redis_conn(ip)?;
    s.write_all(&resp(&[b"GET", key.as_bytes()])).ok()?;
    let head = format!("${VALUE}\r\n");
    let r = read_n(&mut s, head.len() + VALUE + 2)?;
    r.starts_with(head.as_bytes()).then(|| r[head.len()..head.len() + VALUE].to_vec())
}

fn nginx_get(ip: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&format!("{ip}:{NGINX_PORT}").parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes()).ok()?;
    let mut all = String::new();
    s.read_to_string(&mut all).ok()?;
    let (head, body) = all.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

fn version(bin: &str) -> String {
    let out = std::process::Command::new(bin).arg("-v").output();
    out.map(|o| {
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("v=").or_else(|| w.strip_prefix("nginx/")).map(str::to_string))
            .unwrap_or_else(|| "?".into())
    })
    .unwrap_or_else(|_| "?".into())
}

fn criu_version() -> String {
    let out = std::process::Command::new("criu").arg("--version").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("?").trim_start_matches("Version: ").into())
        .unwrap_or_else(|_| "?".into())
}
