//! Node identities and mutual TLS against a real `away broker` and real `away agent`s
//! (issue 17): an agent joins with the join token and a CSR, keeps its certificate in
//! 0600/0700 files, and from then on its API takes only clients with a certificate of
//! the cluster's CA; the broker hears heartbeats only from the node's own certificate
//! and refuses a second join of a known name with another key; an agent without any
//! credential refuses every call that changes anything.

use std::process::Stdio;
use std::time::Duration;

use away_e2e::{
    fake_node_info, file_mode, free_port, request_error_chain, require_root, wait_for, HttpsBroker, KillOnDrop, Node,
};
use away_identity::{Ca, Identity, NodeKey};
use serde_json::{json, Value};

const JOIN: &str = "identity-e2e-join-token-0123456789";
const USER: &str = "identity-e2e-user-token-0123456789";

fn client(tls: Option<std::sync::Arc<away_identity::rustls::ClientConfig>>) -> reqwest::blocking::Client {
    let config = tls.unwrap_or_else(away_identity::trust_nothing_client_config);
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured((*config).clone())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[test]
fn an_agent_without_credentials_refuses_every_change() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = Node::at(format!("away-e2e-id-open-{}", std::process::id()), dir.path().to_path_buf());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let transfer = format!("127.0.0.1:{}", free_port());
    let mut cmd = node.cmd(&["agent", "--name", "lonely", "--listen", &listen, "--transfer-listen", &transfer]);
    // no broker, no token
    cmd.env_remove("AWAY_AGENT_TOKEN").stdout(Stdio::null()).stderr(Stdio::null());
    let _agent = KillOnDrop(cmd.spawn().unwrap());
    let http = client(None);
    let base = format!("http://{listen}");
    let up = wait_for(30, || http.get(format!("{base}/v1/node")).send().ok().filter(|r| r.status().is_success()));
    assert!(up.is_some(), "the agent answers GET /v1/node");
    let r = http.post(format!("{base}/v1/images")).body(b"not an image".to_vec()).send().unwrap();
    assert_eq!(r.status().as_u16(), 401, "POST /v1/images: {:?}", r.text());
    let body: Value = r.json().unwrap_or(Value::Null);
    assert!(body["message"].as_str().unwrap_or("").contains("no credential"), "{body}");
    for (method, path) in [("POST", "/v1/vm-migrations"), ("DELETE", "/v1/transfers/x"), ("GET", "/v1/workloads")] {
        let r = http.request(method.parse().unwrap(), format!("{base}{path}")).send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "{method} {path}");
    }
    // its state database is the owner's only
    assert_eq!(file_mode(&node.state.join("agent.db")), 0o600);
}

#[test]
fn an_agent_joins_with_a_csr_and_serves_mutual_tls_only() {
    if !require_root() {
        return;
    }
    away_identity::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let broker = HttpsBroker::start(dir.path(), JOIN, USER);
    let (db, broker_port, broker_url, ca_pem_path, ca_pem) =
        (&broker.db, broker.port, &broker.url, &broker.ca_path, &broker.ca_pem);
    assert_eq!(file_mode(&db.with_file_name("ca").join("ca.key")), 0o600);
    assert_eq!(file_mode(&db.with_file_name("ca")), 0o700);
    let user = client(Some(away_identity::trusting_client_config(ca_pem).unwrap()));
    let nodes = wait_for(30, || {
        user.get(format!("{broker_url}/v1/nodes")).bearer_auth(USER).send().ok().filter(|r| r.status().is_success())
    });
    assert!(nodes.is_some(), "the broker answers over HTTPS with its CA");
    assert_eq!(file_mode(db), 0o600);
    // plain HTTP to the broker gets nothing
    let plain = client(None).get(format!("http://127.0.0.1:{broker_port}/v1/nodes")).send();
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");

    // the agent joins
    let node = Node::at(format!("away-e2e-id-{}", std::process::id()), dir.path().join("edge"));
    let api_port = free_port();
    let api = format!("127.0.0.1:{api_port}");
    let transfer = format!("127.0.0.1:{}", free_port());
    let mut cmd = node.cmd(&["agent", "--name", "edge-id", "--listen", &api, "--transfer-listen", &transfer]);
    cmd.args(["--broker", broker_url])
        .env_remove("AWAY_AGENT_TOKEN")
        .env("AWAY_JOIN_TOKEN", JOIN)
        .env("AWAY_CA", ca_pem_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap());
    let _agent = KillOnDrop(cmd.spawn().unwrap());
    let id_dir = node.state.join("identity");
    let joined = wait_for(60, || {
        let n: Value = user.get(format!("{broker_url}/v1/nodes/edge-id")).bearer_auth(USER).send().ok()?.json().ok()?;
        (n["state"] == "online" && id_dir.join("cert.pem").is_file()).then_some(n)
    });
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    assert!(joined.is_some(), "the agent joined and heartbeats over mutual TLS; its log:\n{log}");
    assert_eq!(file_mode(&id_dir), 0o700);
    assert_eq!(file_mode(&id_dir.join("key.pem")), 0o600);
    assert_eq!(file_mode(&node.state.join("agent.db")), 0o600);
    let identity = Identity::load(&id_dir).unwrap().expect("the saved identity");
    assert_eq!(identity.name(), "edge-id");
    assert_eq!(identity.subject(), "CN=edge-id");

    // the agent's API: no certificate, no handshake
    let base = format!("https://edge-id.node.away:{api_port}");
    let resolved = |tls: Option<std::sync::Arc<away_identity::rustls::ClientConfig>>| {
        let config = tls.unwrap();
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured((*config).clone())
            .resolve("edge-id.node.away", api.parse().unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let no_cert = resolved(Some(away_identity::trusting_client_config(ca_pem).unwrap()))
        .get(format!("{base}/v1/workloads"))
        .send();
    let e = no_cert.expect_err("a client without a certificate got an answer from the agent");
    eprintln!("no certificate: {}", request_error_chain(&e));
    // a certificate of another CA: no handshake either
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = Ca::load_or_create(other_dir.path()).unwrap();
    let stranger_key = NodeKey::generate().unwrap();
    let stranger_cert = other_ca.issue(&stranger_key.csr_pem("edge-id").unwrap(), "edge-id").unwrap();
    let stranger = stranger_key.into_identity(&stranger_cert, other_ca.cert_pem()).unwrap();
    // it trusts our CA for the server, and presents the foreign certificate
    let mut foreign = stranger.clone();
    foreign.ca = away_identity::read_ca_pem(ca_pem).unwrap().remove(0);
    let e = resolved(Some(foreign.client_config().unwrap())).get(format!("{base}/v1/workloads")).send();
    assert!(e.is_err(), "a certificate of another CA got an answer: {e:?}");
    // plain HTTP: nothing
    assert!(client(None).get(format!("http://{api}/v1/node")).send().is_err(), "plain HTTP answered");
    // a node of the cluster gets in: a certificate the broker's CA issued to another node
    let ca = Ca::load_or_create(&db.with_file_name("ca")).unwrap();
    let peer_key = NodeKey::generate().unwrap();
    let peer_cert = ca.issue(&peer_key.csr_pem("peer-id").unwrap(), "peer-id").unwrap();
    let peer = peer_key.into_identity(&peer_cert, ca_pem).unwrap();
    let r = resolved(Some(peer.client_config().unwrap())).get(format!("{base}/v1/workloads")).send().unwrap();
    assert!(r.status().is_success(), "a cluster node is refused: {}", r.status());
    // the agent's certificate names it: a client expecting another node refuses it
    let wrong = reqwest::blocking::Client::builder()
        .tls_backend_preconfigured((*peer.client_config().unwrap()).clone())
        .resolve("cloud.node.away", api.parse().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("https://cloud.node.away:{api_port}/v1/workloads"))
        .send();
    assert!(wrong.is_err(), "edge-id answered as cloud: {wrong:?}");

    // the broker's agent side: a heartbeat without the node's certificate is refused
    let hb = json!({"node": fake_node_info("edge-id"), "load": {"cpu_percent": 0.0, "memory_used_bytes": 0, "workloads": 0},
        "workloads": [], "events": []});
    let r = user.post(format!("{broker_url}/v1/agents/edge-id/heartbeat")).bearer_auth(JOIN).json(&hb).send().unwrap();
    assert_eq!(r.status().as_u16(), 401, "a heartbeat without a certificate");
    let r = client(Some(peer.client_config().unwrap()))
        .post(format!("{broker_url}/v1/agents/edge-id/heartbeat"))
        .bearer_auth(JOIN)
        .json(&hb)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401, "a heartbeat for edge-id with peer-id's certificate");

    // a second join of edge-id with another key is refused; a join without a CSR too
    let thief = NodeKey::generate().unwrap();
    let join = |body: Value| {
        let r = user.post(format!("{broker_url}/v1/agents/register")).bearer_auth(JOIN).json(&body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    };
    let (status, body) = join(json!({"node": fake_node_info("edge-id"), "api_addr": "127.0.0.1:9",
        "transfer_addr": "127.0.0.1:9", "csr": thief.csr_pem("edge-id").unwrap()}));
    assert_eq!(status, 409, "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("another key"), "{body}");
    let (status, body) =
        join(json!({"node": fake_node_info("fresh-id"), "api_addr": "127.0.0.1:9", "transfer_addr": "127.0.0.1:9"}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "csr", "{body}");
    // a CSR for another name than the node's
    let (status, body) = join(json!({"node": fake_node_info("fresh-id"), "api_addr": "127.0.0.1:9",
        "transfer_addr": "127.0.0.1:9", "csr": thief.csr_pem("edge-id").unwrap()}));
    assert_eq!(status, 400, "{body}");
    // the agent still beats: its own identity is untouched
    std::thread::sleep(Duration::from_secs(2));
    let n: Value = user.get(format!("{broker_url}/v1/nodes/edge-id")).bearer_auth(USER).send().unwrap().json().unwrap();
    assert_eq!(n["state"], "online", "{n}");
}
