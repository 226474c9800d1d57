//! `away migrate --cancel ID` against a real `away broker` (this binary, on 127.0.0.1,
//! fresh database in a temporary directory, tokens in the environment) with two fake
//! nodes registered over the API. Root-free.

use std::process::{Child, Command, Output};
use std::time::Duration;

use away_client::Client;
use away_model::{Heartbeat, MigrationRequest, NodeInfo, NodeLoad, RegisterRequest, SpecFormat, WorkloadSpec};

const USER: &str = "cancel-test-user-token";
const JOIN: &str = "cancel-test-join-token";

/// Stops the broker (by its PID) however the test ends.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node(name: &str) -> NodeInfo {
    serde_json::from_value(serde_json::json!({
        "name": name, "tier": "edge", "arch": "amd64", "memory_bytes": 17_179_869_184u64, "kernel": "6.1.0",
        "cpu": {"vendor": "amd", "model": "fake", "cores": 8, "flags": ["sse4_2", "avx2"]},
        "runtimes": [{"kind": "containerd", "version": "2.0", "healthy": true, "checkpoint": true}],
        "link": {"rate_mbit": 1000, "latency_ms": 1}
    }))
    .unwrap()
}

fn away(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_away"));
    cmd.args(args).env("RUST_LOG", "off").env_remove("AWAY_USER_TOKEN");
    if let Some(t) = token {
        cmd.env("AWAY_USER_TOKEN", t);
    }
    cmd.output().expect("run away")
}

#[tokio::test]
async fn cancel_a_pending_migration_then_refuse_an_ended_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let _broker = Broker(
        Command::new(env!("CARGO_BIN_EXE_away"))
            // the test plays the agents with fake registrations: plain HTTP on loopback
            .args(["broker", "--insecure-loopback", "--listen", &format!("127.0.0.1:{port}")])
            .env("AWAY_BROKER_DB", dir.path().join("broker.db"))
            .env("AWAY_USER_TOKEN", USER)
            .env("AWAY_JOIN_TOKEN", JOIN)
            .env("RUST_LOG", "off")
            .spawn()
            .expect("start away broker"),
    );
    let client = Client::new(&url, USER).unwrap();
    for _ in 0..100 {
        if client.nodes().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for name in ["cancel-a", "cancel-b"] {
        let req = RegisterRequest {
            node: node(name),
            api_addr: "127.0.0.1:9".into(),
            transfer_addr: "127.0.0.1:9".into(),
            csr: None,
        };
        let token = client.register(JOIN, &req).await.expect("register").agent_token;
        let hb = Heartbeat { node: node(name), load: NodeLoad::default(), workloads: vec![], events: vec![] };
        client.heartbeat(name, &token, &hb).await.expect("heartbeat");
    }
    let spec = WorkloadSpec::parse("name: cancel-w\nimage: x\n", SpecFormat::Yaml, "test").unwrap();
    let home = client.submit(&spec).await.expect("submit").workload.unwrap().node;
    let to = if home == "cancel-a" { "cancel-b" } else { "cancel-a" };
    let req = MigrationRequest {
        workload: "cancel-w".into(),
        to: Some(to.into()),
        mode: None,
        deadline_s: Some(60),
        ..Default::default()
    };
    let m = client.migrate(&req).await.expect("migrate");

    // cancelled, printed as JSON
    let out = away(&["migrate", "--cancel", &m.id, "--broker", &url, "--json"], Some(USER));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!((printed["id"].as_str(), printed["state"].as_str()), (Some(m.id.as_str()), Some("cancelled")));
    assert_eq!(client.migration(&m.id).await.unwrap().state.as_str(), "cancelled");

    // again: it has ended, the broker's reason is printed and the exit is a failure
    let out = away(&["migrate", "--cancel", &m.id, "--broker", &url], Some(USER));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("409") && stderr.contains("already ended: cancelled"), "{stderr}");

    // a new migration, cancelled in words
    let m2 = client.migrate(&req).await.expect("migrate again");
    let out = away(&["migrate", "--cancel", &m2.id, "--broker", &url], Some(USER));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("migration {} cancelled: cancel-w stays on {home}", m2.id)), "{stdout}");

    // unknown id, no token, and the help
    let out = away(&["migrate", "--cancel", "m-ghost", "--broker", &url], Some(USER));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no migration \"m-ghost\""));
    let out = away(&["migrate", "--cancel", &m2.id, "--broker", &url], None);
    assert!(String::from_utf8_lossy(&out.stderr).contains("set AWAY_USER_TOKEN"));
    let out = away(&["migrate", "--cancel", &m2.id], Some(USER));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--broker"));
    let help = String::from_utf8_lossy(&away(&["migrate", "--help"], None).stdout).to_string();
    assert!(help.contains("--cancel <ID>") && help.contains("before its commit point"), "{help}");
}
