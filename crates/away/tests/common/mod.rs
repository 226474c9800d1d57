//! A real `away broker` (this binary, on 127.0.0.1, fresh database in a temporary
//! directory, tokens in the environment, plain HTTP: the tests play its agents with
//! fake registrations) and the `away` runs the CLI tests make against it.

// each test file uses a part of it
#![allow(dead_code)]

use std::process::{Child, Command, Output};
use std::time::Duration;

use away_client::Client;
use away_model::{NodeInfo, RegisterRequest};

/// A running broker, stopped (by its PID) however the test ends.
pub struct Broker {
    child: Child,
    pub url: String,
    pub client: Client,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    /// Start one with user token `user` and join token `join`; answers once it serves.
    pub async fn start(user: &str, join: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_away"))
            .args(["broker", "--insecure-loopback", "--listen", &format!("127.0.0.1:{port}")])
            .env("AWAY_BROKER_DB", dir.path().join("broker.db"))
            .env("AWAY_USER_TOKEN", user)
            .env("AWAY_JOIN_TOKEN", join)
            .env("RUST_LOG", "off")
            .spawn()
            .expect("start away broker");
        let client = Client::new(&url, user).unwrap();
        let broker = Broker { child, url, client, _dir: dir };
        for _ in 0..100 {
            if broker.client.nodes().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        broker
    }
}

/// A fake node's registration (its agent's addresses lead nowhere).
pub fn registration(name: &str) -> RegisterRequest {
    RegisterRequest { node: node(name), api_addr: "127.0.0.1:9".into(), transfer_addr: "127.0.0.1:9".into(), csr: None }
}

pub fn node(name: &str) -> NodeInfo {
    serde_json::from_value(serde_json::json!({
        "name": name, "tier": "edge", "arch": "amd64", "memory_bytes": 17_179_869_184u64, "kernel": "6.1.0",
        "cpu": {"vendor": "amd", "model": "fake", "cores": 8, "flags": ["sse4_2", "avx2"]},
        "runtimes": [{"kind": "containerd", "version": "2.0", "healthy": true, "checkpoint": true}],
        "link": {"rate_mbit": 1000, "latency_ms": 1}
    }))
    .unwrap()
}

/// `away ARGS` with user token `token` in AWAY_USER_TOKEN (none: unset).
pub fn away(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_away"));
    cmd.args(args).env("RUST_LOG", "off").env_remove("AWAY_USER_TOKEN").env_remove("AWAY_CA");
    if let Some(t) = token {
        cmd.env("AWAY_USER_TOKEN", t);
    }
    cmd.output().expect("run away")
}
