//! Crash consistency of the broker: the real `away broker` process and its SQLite store,
//! SIGKILLed while 200 clients submit workloads (and then while 100 ask for migrations),
//! restarted on the same database. Every request it acknowledged must be there after the
//! restart, none twice; requests it never answered may or may not be.
//!
//! The two nodes are registered over the API but run no agent: this test is about the
//! broker's own store, and placement and migration requests need only registered nodes.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use away_e2e::{away_bin, free_port, wait_for};
use away_model::{Arch, CpuInfo, CpuVendor, NodeInfo, RegisterRequest, RuntimeInfo, RuntimeKind, Tier, WorkloadView};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::Value;

const USER: &str = "crash-test-user-token";
const JOIN: &str = "crash-test-join-token";

struct Broker {
    child: Child,
    port: u16,
}

impl Broker {
    /// `away broker` on a fresh port... or the same one after a crash, on `db`.
    fn start(db: &Path, port: u16, log: &Path) -> Broker {
        away_identity::install_default_provider();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("broker log");
        // the test plays 16 agents with fake registrations and no certificates: plain
        // HTTP on loopback (the agent's side of TLS is tests/tests/identity.rs)
        let child = Command::new(away_bin())
            .args([
                "broker",
                "--insecure-loopback",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--heartbeat-interval",
                "30",
            ])
            .arg("--db")
            .arg(db)
            .env("AWAY_JOIN_TOKEN", JOIN)
            .env("AWAY_USER_TOKEN", USER)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start away broker");
        let b = Broker { child, port };
        let up = wait_for(30, || b.get("/v1/nodes").ok().filter(|r| r.status() == StatusCode::OK));
        assert!(up.is_some(), "the broker did not answer on 127.0.0.1:{port}");
        b
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn get(&self, path: &str) -> reqwest::Result<reqwest::blocking::Response> {
        Client::new().get(self.url(path)).bearer_auth(USER).timeout(Duration::from_secs(5)).send()
    }

    fn list(&self, path: &str) -> Vec<Value> {
        let r = self.get(path).expect("list");
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().expect("a JSON list")
    }

    /// SIGKILL: no shutdown code runs, as in a crash.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the broker");
        self.child.wait().expect("reap the broker");
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(name: &str) -> NodeInfo {
    let rt =
        |kind| RuntimeInfo { kind, version: "test".into(), healthy: true, checkpoint: true, detail: String::new() };
    NodeInfo {
        name: name.into(),
        tier: Tier::Cloud,
        arch: Arch("amd64".into()),
        cpu: CpuInfo {
            vendor: CpuVendor::Intel,
            model: "simulated".into(),
            family: None,
            model_number: None,
            cores: 64,
            flags: ["sse4_2", "avx2"].iter().map(|f| f.to_string()).collect(),
        },
        memory_bytes: 256 << 30,
        kernel: "6.1".into(),
        runtimes: vec![rt(RuntimeKind::Containerd), rt(RuntimeKind::Docker), rt(RuntimeKind::Qemu)],
        hypervisor: None,
        link: None,
        labels: Default::default(),
        disk_bases: Default::default(),
    }
}

/// Send `n` requests from 16 threads; SIGKILL the broker once `kill_after` were acknowledged.
/// Returns the keys of the acknowledged ones (what `send` returned for a success).
fn flood_and_kill(
    broker: Broker,
    n: usize,
    kill_after: usize,
    send: impl Fn(&Client, &str, usize) -> Option<String> + Send + Sync + 'static,
) -> HashSet<String> {
    let base = broker.url("");
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let send = Arc::new(send);
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (acked, count, next, send, base) =
                (acked.clone(), count.clone(), next.clone(), send.clone(), base.clone());
            std::thread::spawn(move || {
                let client = Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= n {
                        return;
                    }
                    if let Some(key) = send(&client, &base, i) {
                        acked.lock().unwrap().insert(key);
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    // polled every millisecond (not wait_for's 250 ms): the kill must land mid-flood
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::SeqCst) < kill_after {
        assert!(
            std::time::Instant::now() < deadline,
            "the broker acknowledged fewer than {kill_after} requests in 120 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    broker.kill();
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() < n, "the kill came after every request was answered: nothing was tested");
    acked
}

#[test]
fn broker_killed_mid_submit_keeps_every_acknowledged_request_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let log = dir.path().join("broker.log");
    let port = free_port();
    let broker = Broker::start(&db, port, &log);
    for name in ["crash-a", "crash-b"] {
        let req = RegisterRequest {
            node: node(name),
            api_addr: "127.0.0.1:9".into(),
            transfer_addr: "127.0.0.1:9".into(),
            csr: None,
        };
        let r = Client::new().post(broker.url("/v1/agents/register")).bearer_auth(JOIN).json(&req).send().unwrap();
        assert!(r.status().is_success(), "register {name}: {}", r.text().unwrap_or_default());
    }

    // 200 submits, the broker killed after 100 answers
    let acked = flood_and_kill(broker, 200, 100, |client, base, i| {
        let name = format!("crash-w{i:03}");
        // small, so that both nodes have room for every one (migrations need a free target)
        let spec = serde_json::json!({
            "name": name, "image": "away/counter:latest", "resources": { "cpus": 0.1, "memory": "64Mi" }
        });
        let r = client.post(format!("{base}/v1/workloads")).bearer_auth(USER).json(&spec).send().ok()?;
        (r.status() == StatusCode::CREATED).then_some(name)
    });
    eprintln!("{} of 200 submits acknowledged before the SIGKILL", acked.len());

    let broker = Broker::start(&db, port, &log);
    let workloads: Vec<WorkloadView> =
        serde_json::from_value(Value::Array(broker.list("/v1/workloads"))).expect("workload views");
    let mut seen = HashMap::<&str, usize>::new();
    for w in &workloads {
        *seen.entry(w.name.as_str()).or_default() += 1;
    }
    assert!(seen.values().all(|&n| n == 1), "a workload listed twice: {seen:?}");
    let missing: Vec<&String> = acked.iter().filter(|n| !seen.contains_key(n.as_str())).collect();
    assert!(missing.is_empty(), "acknowledged but gone after the restart: {missing:?}");

    // 100 migration requests of acknowledged workloads, the broker killed after 50 answers
    let mut names: Vec<String> = acked.into_iter().collect();
    names.sort();
    names.truncate(100);
    let names = Arc::new(names);
    let count = names.len();
    let which = names.clone();
    let acked = flood_and_kill(broker, count, count / 2, move |client, base, i| {
        let req = serde_json::json!({ "workload": which[i] });
        let r = client.post(format!("{base}/v1/migrations")).bearer_auth(USER).json(&req).send().ok()?;
        if r.status() != StatusCode::ACCEPTED {
            eprintln!("migration of {} refused: {}", which[i], r.text().unwrap_or_default());
            return None;
        }
        let v: Value = r.json().ok()?;
        v["migration"]["id"].as_str().map(String::from)
    });
    eprintln!("{} of {count} migration requests acknowledged before the SIGKILL", acked.len());

    let broker = Broker::start(&db, port, &log);
    let migrations = broker.list("/v1/migrations");
    let ids: Vec<&str> = migrations.iter().filter_map(|m| m["id"].as_str()).collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !ids.contains(&id.as_str())).collect();
    assert!(missing.is_empty(), "acknowledged migrations gone after the restart: {missing:?}");
    let mut per_workload = HashMap::<&str, usize>::new();
    for m in &migrations {
        *per_workload.entry(m["workload"].as_str().unwrap()).or_default() += 1;
    }
    assert!(per_workload.values().all(|&n| n == 1), "a workload with two migrations: {per_workload:?}");
    drop(broker);
}
