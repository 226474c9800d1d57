//! Revoking a node (issue 17, a lost or stolen node key) against a real `away broker`
//! (HTTPS, its own CA) and two real `away agent`s that joined it: `away node revoke B`
//! makes the broker refuse B's certificate at the TLS handshake at once, and agent A,
//! after its next heartbeat brought it the CA's revocation list, refuses a client that
//! presents B's certificate and key while another node of the CA still gets in; A's own
//! heartbeats go on; the broker lists B as revoked and offline, refuses B's revoked key
//! for a new join and takes the name with a new key.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use away_e2e::{
    away_bin, fake_node_info, file_mode, request_error_chain, require_root, wait_for, HttpsBroker, LocalAgent, Node,
};
use away_identity::rustls::ClientConfig;
use away_identity::{Ca, Identity, NodeKey};
use serde_json::{json, Value};

const JOIN: &str = "revoke-e2e-join-token-0123456789abc";
const USER: &str = "revoke-e2e-user-token-0123456789abc";

/// A client with `tls`.
fn client_with(tls: Arc<ClientConfig>) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A client with `tls` that reaches node `node` at `addr` by its certificate name.
fn client_of(tls: Arc<ClientConfig>, node: &str, addr: &str) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .resolve(&format!("{node}.node.away"), addr.parse().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A TLS handshake with node `node` at `addr` presenting `who`, then a read of up to 2 s:
/// Err(the alert) when the server refuses the certificate (TLS 1.3: its verdict on the
/// client certificate comes after the client's last flight), Ok when it takes the
/// connection and waits (the transfer port waits for a hello).
fn handshake(who: &Identity, node: &str, addr: &str) -> Result<(), String> {
    use std::io::Read;
    let name = away_identity::server_name(node).unwrap();
    let mut conn = away_identity::rustls::ClientConnection::new(who.client_config().unwrap(), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut stream = away_identity::rustls::Stream::new(&mut conn, &mut tcp);
    match stream.read(&mut [0u8; 1]) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(()),
        Err(e) => Err(e.to_string()),
        Ok(_) => Ok(()),
    }
}

/// `away node ARGS` against the broker with the user token in the environment.
fn away_node(args: &[&str], broker: &str, ca: &Path) -> (bool, String, String) {
    let out = Command::new(away_bin())
        .arg("node")
        .args(args)
        .args(["--broker", broker, "--ca"])
        .arg(ca)
        .env("AWAY_USER_TOKEN", USER)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_revoked_node_is_refused_by_the_broker_and_by_the_other_agents() {
    if !require_root() {
        return;
    }
    away_identity::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let broker = HttpsBroker::start(dir.path(), JOIN, USER);
    let (db, broker_url, ca_path, ca_pem) = (&broker.db, &broker.url, &broker.ca_path, &broker.ca_pem);
    let user = client_with(away_identity::trusting_client_config(ca_pem).unwrap());
    let get_node = |name: &str| -> Option<Value> {
        user.get(format!("{broker_url}/v1/nodes/{name}")).bearer_auth(USER).send().ok()?.json().ok()
    };

    // two agents join
    let pid = std::process::id();
    let ca_env = ca_path.to_str().unwrap();
    let start = |name: &str| -> LocalAgent {
        let node = Node::at(format!("away-e2e-rv-{name}-{pid}"), dir.path().join(name));
        node.start_agent(
            name,
            &["--broker", broker_url],
            &[("AWAY_JOIN_TOKEN", JOIN), ("AWAY_CA", ca_env)],
            &dir.path().join(format!("{name}.log")),
        )
    };
    // both at once: each fingerprints its host before it listens
    let started = std::time::Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| start("revoke-b"));
        (start("revoke-a"), b.join().unwrap())
    });
    eprintln!("two agents listening after {:.1} s", started.elapsed().as_secs_f64());
    for (agent, name) in [(&a, "revoke-a"), (&b, "revoke-b")] {
        let id_dir = agent.node.state.join("identity");
        let joined = wait_for(90, || {
            let n = get_node(name)?;
            (n["state"] == "online" && id_dir.join("cert.pem").is_file()).then_some(n)
        });
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
        assert!(joined.is_some(), "{name} joined and heartbeats; its log:\n{log}");
    }
    eprintln!("both joined after {:.1} s", started.elapsed().as_secs_f64());
    // B's certificate and key, as a thief of B's disk would hold them
    let b_id = Identity::load(&b.node.state.join("identity")).unwrap().expect("B's identity");
    // a third node of the CA (issued by the broker's CA directly)
    let ca = Ca::load_or_create(&db.with_file_name("ca")).unwrap();
    let third_key = NodeKey::generate().unwrap();
    let third_cert = ca.issue(&third_key.csr_pem("revoke-c").unwrap(), "revoke-c").unwrap();
    let third = third_key.into_identity(&third_cert, ca_pem).unwrap();

    let a_port = a.api.rsplit(':').next().unwrap().to_string();
    let a_api = |who: &Identity| {
        client_of(who.client_config().unwrap(), "revoke-a", &a.api)
            .get(format!("https://revoke-a.node.away:{a_port}/v1/workloads"))
            .send()
    };
    // control: before the revocation B's certificate gets into A's API, A's transfer port
    // and the broker
    let r = a_api(&b_id).expect("B's certificate reaches A's API before the revocation");
    assert!(r.status().is_success(), "{}", r.status());
    handshake(&b_id, "revoke-a", &a.transfer).expect("B's certificate reaches A's transfer port");
    let hb = json!({"node": fake_node_info("revoke-b"), "load": {"cpu_percent": 0.0, "memory_used_bytes": 0, "workloads": 0},
        "workloads": [], "events": []});
    let as_b = client_with(b_id.client_config().unwrap());
    let r = as_b.post(format!("{broker_url}/v1/agents/revoke-b/heartbeat")).json(&hb).send();
    assert_eq!(r.expect("B's certificate reaches the broker").status().as_u16(), 401, "no agent token: 401");

    // revoke B: an unknown node is named, B is revoked, a second time changes nothing
    let (ok, _, err) = away_node(&["revoke", "no-such-node"], broker_url, ca_path);
    assert!(!ok && err.contains("no-such-node"), "revoking an unknown node: {err}");
    let (ok, out, err) = away_node(&["revoke", "revoke-b", "--json"], broker_url, ca_path);
    assert!(ok, "away node revoke: {err}");
    let revoked: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(revoked["revoked_ms"].as_u64().is_some(), "{revoked}");
    assert_eq!(revoked["state"], "offline", "{revoked}");
    let (ok, out, err) = away_node(&["revoke", "revoke-b", "--json"], broker_url, ca_path);
    assert!(ok, "revoking again: {err}");
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["revoked_ms"], revoked["revoked_ms"], "idempotent");

    // a connection B opened before is refused request by request (keep-alive)
    let r = as_b.post(format!("{broker_url}/v1/agents/revoke-b/heartbeat")).bearer_auth("x").json(&hb).send();
    let r = r.map(|r| (r.status().as_u16(), r.text().unwrap_or_default()));
    eprintln!("broker, B's open connection: {r:?}");
    if let Ok((status, text)) = &r {
        assert_eq!(*status, 401, "{text}");
        assert!(text.contains("revoked"), "{text}");
    }
    // the broker refuses B's certificate at the handshake of a new connection, at once
    let as_b = client_with(b_id.client_config().unwrap());
    let e = as_b.post(format!("{broker_url}/v1/agents/revoke-b/heartbeat")).json(&hb).send();
    let e = e.expect_err("the broker answered a revoked certificate");
    eprintln!("broker, B's certificate: {}", request_error_chain(&e));
    // and keeps refusing its real agent: B stays offline
    std::thread::sleep(Duration::from_secs(2));
    let n = get_node("revoke-b").unwrap();
    assert_eq!(n["state"], "offline", "{n}");
    let (ok, out, _) = away_node(&["list"], broker_url, ca_path);
    assert!(ok && out.lines().any(|l| l.starts_with("revoke-b") && l.contains("revoked")), "away node list:\n{out}");

    // A learns the list with its next heartbeat and refuses B's certificate from then on
    let crl = a.node.state.join("identity").join(away_identity::CRL_FILE);
    assert!(wait_for(20, || crl.is_file().then_some(())).is_some(), "A stores the CA's revocation list");
    assert_eq!(file_mode(&crl), 0o600);
    let refused = wait_for(10, || a_api(&b_id).err());
    let e = refused.expect("A's API still answers B's revoked certificate");
    let why = request_error_chain(&e);
    eprintln!("A's API, B's certificate: {why}");
    assert!(why.to_lowercase().contains("revoked"), "the handshake fails for the revocation: {why}");
    // and so does its transfer receiver
    let why = handshake(&b_id, "revoke-a", &a.transfer).expect_err("A's transfer port took B's revoked certificate");
    eprintln!("A's transfer port, B's certificate: {why}");
    assert!(why.to_lowercase().contains("revoked"), "{why}");
    handshake(&third, "revoke-a", &a.transfer).expect("a valid node is refused by A's transfer port");
    // another node of the CA still gets in, and A still heartbeats with the broker
    let r = a_api(&third).expect("a valid node is refused by A after the revocation");
    assert!(r.status().is_success(), "{}", r.status());
    std::thread::sleep(Duration::from_secs(2));
    let n = get_node("revoke-a").unwrap();
    assert_eq!(n["state"], "online", "{n}");
    assert!(n["revoked_ms"].is_null(), "{n}");

    // B's revoked key never joins again; the name does, with a new key
    let join = |csr: String| {
        let body = json!({"node": fake_node_info("revoke-b"), "api_addr": "127.0.0.1:9", "transfer_addr": "127.0.0.1:9",
            "csr": csr});
        let r = user.post(format!("{broker_url}/v1/agents/register")).bearer_auth(JOIN).json(&body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    let stolen = NodeKey::load_or_create(&b.node.state.join("identity")).unwrap();
    let (status, body) = join(stolen.csr_pem("revoke-b").unwrap());
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("revoked"), "{body}");
    drop(b);
    let (status, body) = join(NodeKey::generate().unwrap().csr_pem("revoke-b").unwrap());
    assert_eq!(status, 200, "the name joins again with a new key: {body}");
    let n = get_node("revoke-b").unwrap();
    assert!(n["revoked_ms"].is_null(), "{n}");
}
