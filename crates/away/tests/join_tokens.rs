//! `away token create|list|revoke` against a real `away broker` (this binary, on
//! 127.0.0.1, fresh database in a temporary directory, tokens in the environment); a
//! fake node registers with the token the CLI printed. Root-free.

use std::process::{Child, Command, Output};
use std::time::Duration;

use away_client::Client;
use away_model::{NodeInfo, RegisterRequest};

const USER: &str = "token-test-user-token";
const JOIN: &str = "token-test-join-token";

/// Stops the broker (by its PID) however the test ends.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn registration(name: &str) -> RegisterRequest {
    let node: NodeInfo = serde_json::from_value(serde_json::json!({
        "name": name, "tier": "edge", "arch": "amd64", "memory_bytes": 17_179_869_184u64, "kernel": "6.1.0",
        "cpu": {"vendor": "amd", "model": "fake", "cores": 8, "flags": ["sse4_2", "avx2"]},
        "runtimes": [{"kind": "containerd", "version": "2.0", "healthy": true, "checkpoint": true}],
        "link": {"rate_mbit": 1000, "latency_ms": 1}
    }))
    .unwrap();
    RegisterRequest { node, api_addr: "127.0.0.1:9".into(), transfer_addr: "127.0.0.1:9".into(), csr: None }
}

fn away(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_away"));
    cmd.args(args).env("RUST_LOG", "off").env_remove("AWAY_USER_TOKEN").env_remove("AWAY_CA");
    if let Some(t) = token {
        cmd.env("AWAY_USER_TOKEN", t);
    }
    cmd.output().expect("run away")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).to_string()
}

#[tokio::test]
async fn create_register_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let _broker = Broker(
        Command::new(env!("CARGO_BIN_EXE_away"))
            // the test plays the agent with a fake registration: plain HTTP on loopback
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

    // made in words: the secret alone on stdout, what to do with it on stderr
    let out = away(&["token", "create", "--broker", &url, "--expires", "1h", "--label", "laptop-anna"], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let secret = text(&out.stdout).trim().to_string();
    assert_eq!(secret.len(), 64, "{secret:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("AWAY_JOIN_TOKEN") && stderr.contains("expires in 59m"), "{stderr}");
    client.register(&secret, &registration("anna")).await.expect("register with the made token");

    // made as JSON
    let out = away(&["token", "create", "--broker", &url, "--json"], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let id = made["id"].as_str().unwrap().to_string();
    assert!(made["token"].as_str().is_some_and(|t| t.len() == 64) && made.get("expires_unix_ms").is_none(), "{made}");

    // listed without secrets
    let out = away(&["token", "list", "--broker", &url], Some(USER));
    let listed = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(listed.contains("laptop-anna") && listed.contains(&id) && listed.contains("never expires"), "{listed}");
    assert!(!listed.contains(&secret) && !listed.contains(made["token"].as_str().unwrap()), "{listed}");
    let out = away(&["token", "list", "--broker", &url, "--json"], Some(USER));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");

    // revoked: the broker refuses it, naming why
    let out = away(&["token", "revoke", &id, "--broker", &url], Some(USER));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("join token {id} revoked")), "{}", text(&out.stdout));
    let e = client.register(made["token"].as_str().unwrap(), &registration("mallory")).await.unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert!(e.to_string().contains("revoked"), "{e}");

    // unknown id, no user token, a bad duration
    let out = away(&["token", "revoke", "jt-ghost", "--broker", &url], Some(USER));
    assert!(!out.status.success() && text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    let out = away(&["token", "list", "--broker", &url], None);
    assert!(!out.status.success() && text(&out.stderr).contains("set AWAY_USER_TOKEN"), "{}", text(&out.stderr));
    let out = away(&["token", "create", "--broker", &url, "--expires", "1w"], Some(USER));
    assert!(!out.status.success() && text(&out.stderr).contains("s, m, h or d"), "{}", text(&out.stderr));
}
