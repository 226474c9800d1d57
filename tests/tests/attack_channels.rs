//! Migration channels against real agents (issue 17): who may push a transfer.
//!
//! (1) a raw TCP client sending a well-formed transfer with no credential is refused
//! before anything is spooled, and so are an announced move without its secret or with a
//! wrong one; (2) a node with a valid certificate for another name is refused, for a
//! move never announced and for one announced from another node (even holding its
//! secret); (5) a client without a certificate fails the TLS handshake at the transfer
//! port; a node announcing a move from another node over the mutual TLS API is refused
//! (403). Each test ends with a control that gets past the check, so that a check that
//! refused everything (or nothing) would fail it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use away_e2e::{announce, http_get, require_root, require_socket, LocalAgent, Node};
use away_migrate::channel::Channels;
use away_migrate::transfer::{MoveSecret, SendOptions, TransferError};
use serde_json::Value;

fn ready() -> bool {
    require_root() && require_socket("/run/containerd/containerd.sock", "containerd")
}

fn root(test: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/away-e2e-channels/{test}-{}", std::process::id()))
}

/// An agent named `name`; with `identity`, saved in its state directory as a joined
/// node keeps it (its API and channels are then mutual TLS).
fn agent(test: &str, name: &str, identity: Option<&away_identity::Identity>) -> LocalAgent {
    let root = root(test);
    let node = Node::at(format!("away-ch-{test}-{}", std::process::id()), root.join("node"));
    if let Some(id) = identity {
        id.save(&node.state.join("identity")).unwrap();
    }
    node.start_agent(name, &[], &[("AWAY_LOG", "info")], &root.join("agent.log"))
}

fn transfer_addr(agent: &LocalAgent) -> String {
    let port: u16 = agent.api.rsplit(':').next().unwrap().parse().unwrap();
    let info: Value = serde_json::from_str(&http_get(port, "/v1/node").expect("the agent answers")).unwrap();
    info["transfer_addr"].as_str().unwrap().to_string()
}

/// The URL base and a client of node `target`'s mutual TLS API, as node `caller`.
fn tls_api(agent: &LocalAgent, target: &str, caller: &away_identity::Identity) -> (String, reqwest::blocking::Client) {
    let host = format!("{target}.node.away");
    let sock: std::net::SocketAddr = agent.api.parse().unwrap();
    let http = reqwest::blocking::Client::builder()
        .tls_backend_preconfigured((*caller.client_config().unwrap()).clone())
        .resolve(&host, sock)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    (format!("https://{host}:{}", sock.port()), http)
}

fn tls_transfer_addr(agent: &LocalAgent, target: &str, caller: &away_identity::Identity) -> String {
    let (base, http) = tls_api(agent, target, caller);
    let info: Value = http.get(format!("{base}/v1/node")).send().expect("the agent answers").json().unwrap();
    info["transfer_addr"].as_str().unwrap().to_string()
}

/// `POST /v1/transfers` over mutual TLS as node `caller`: (status, body).
fn tls_announce(
    agent: &LocalAgent,
    target: &str,
    caller: &away_identity::Identity,
    id: &str,
    source: &str,
) -> (u16, Value) {
    let (base, http) = tls_api(agent, target, caller);
    let body = serde_json::json!({"transfer_id": id, "workload": "counter", "source": source});
    let r = http.post(format!("{base}/v1/transfers")).json(&body).send().expect("the agent answers");
    (r.status().as_u16(), r.json().unwrap_or(Value::Null))
}

/// The secret of a move announced from `source` by `source` itself.
fn tls_announce_ok(agent: &LocalAgent, target: &str, source: &away_identity::Identity, id: &str) -> String {
    let (status, v) = tls_announce(agent, target, source, id, source.name());
    assert_eq!(status, 200, "announce {id}: {v}");
    v["secret"].as_str().expect("a secret").to_string()
}

fn spooled(agent: &LocalAgent, id: &str) -> bool {
    agent.node.state.join("transfers").join(id).exists()
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    [vec![kind], (body.len() as u32).to_be_bytes().to_vec(), body.to_vec()].concat()
}

/// A well-formed hello for a 1-chunk payload of `data`, its chunk and done.
fn transfer_frames(id: &str, data: &[u8], secret: Option<&str>) -> Vec<u8> {
    use sha2::Digest;
    let sha = sha2::Sha256::digest(data);
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let len = data.len() as u64;
    let mut hello = serde_json::json!({"version": 1, "transfer_id": id, "total_bytes": len, "chunk_size": len,
        "chunk_count": 1, "compression": "none", "sha256": hex, "meta": null});
    if let Some(s) = secret {
        hello["secret"] = s.into();
    }
    let chunk =
        [0u64.to_be_bytes().to_vec(), (len as u32).to_be_bytes().to_vec(), vec![0u8], sha.to_vec(), data.to_vec()]
            .concat();
    [frame(1, &serde_json::to_vec(&hello).unwrap()), frame(3, &chunk), frame(4, &[])].concat()
}

/// The receiver's first answer: (kind, body).
fn first_answer(s: &mut impl Read) -> (u8, String) {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).expect("an answer from the receiver");
    let mut body = vec![0u8; u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize];
    s.read_exact(&mut body).unwrap();
    (head[0], String::from_utf8_lossy(&body).into_owned())
}

fn raw_transfer(addr: &str, id: &str, secret: Option<&str>) -> (u8, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the transfer port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&transfer_frames(id, b"a checkpoint, supposedly", secret)).unwrap();
    first_answer(&mut s)
}

#[test]
fn a_transfer_without_a_credential_is_refused_and_writes_nothing() {
    if !ready() {
        return;
    }
    // the weakest mode an agent has: plaintext channels, by its loud flag
    let agent = agent("raw", "raw-target", None);
    let addr = transfer_addr(&agent);
    let pid = std::process::id();

    // never announced, no secret
    let id = format!("raw-unannounced-{pid}");
    let (kind, answer) = raw_transfer(&addr, &id, None);
    assert_eq!(kind, 6, "refused with an error frame: {answer}");
    assert!(answer.contains("not announced"), "{answer}");
    assert!(!spooled(&agent, &id), "nothing spooled for {id}");

    // announced, but the hello has no secret, or a wrong one
    let id = format!("raw-announced-{pid}");
    let secret = announce(&agent.api, &id, "counter", "source-node");
    for given in [None, Some("0".repeat(secret.len()))] {
        let (kind, answer) = raw_transfer(&addr, &id, given.as_deref());
        assert_eq!(kind, 6, "refused with an error frame: {answer}");
        assert!(answer.contains("secret"), "{answer}");
        assert!(!spooled(&agent, &id), "nothing spooled for {id}");
    }

    // control: with its secret the same transfer gets past the check (and is spooled)
    let (kind, answer) = raw_transfer(&addr, &id, Some(&secret));
    assert!(!answer.contains("not announced") && !answer.contains("secret"), "{answer}");
    assert!(kind == 2 || kind == 5 || kind == 6, "kind {kind}: {answer}");
    assert!(
        spooled(&agent, &id) || kind == 5 || answer.contains("restore") || answer.contains("manifest"),
        "the announced move was taken: {kind} {answer}"
    );
    assert!(http_get(agent.api.rsplit(':').next().unwrap().parse().unwrap(), "/v1/node").is_some(), "agent lives");
}

/// A CA and node identities in `dir`.
struct Pki {
    ca: away_identity::Ca,
    _dir: PathBuf,
}

impl Pki {
    fn new(dir: PathBuf) -> Pki {
        let _ = std::fs::remove_dir_all(&dir);
        let ca = away_identity::Ca::load_or_create(&dir.join("ca")).unwrap();
        Pki { ca, _dir: dir }
    }

    fn identity(&self, node: &str) -> away_identity::Identity {
        self.ca.issue_self(node, &[]).unwrap()
    }

    fn channels(&self, node: &str) -> Channels {
        Channels::from_identity(&self.identity(node)).unwrap()
    }
}

fn payload(dir: &Path) -> PathBuf {
    let p = dir.join("payload");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("junk.img"), vec![1u8; 64 << 10]).unwrap();
    p
}

fn push(
    addr: &str,
    channels: Channels,
    target: &str,
    id: &str,
    secret: Option<MoveSecret>,
    dir: &Path,
) -> Result<String, String> {
    let opts = SendOptions {
        channels,
        peer_node: target.into(),
        transfer_id: Some(id.into()),
        secret,
        reconnect_timeout: Duration::from_millis(500),
        ..SendOptions::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    match rt.block_on(away_migrate::transfer::send(addr, &payload(dir), Value::Null, &opts)) {
        Ok(o) => Ok(o.verdict.message),
        Err(TransferError::Remote { message, .. }) => Err(message),
        Err(e) => Err(format!("not a refusal: {e}")),
    }
}

#[test]
fn a_node_with_a_valid_certificate_for_another_name_is_refused() {
    if !ready() {
        return;
    }
    let pid = std::process::id();
    let pki = Pki::new(root("pki").join("pki"));
    let target = format!("tls-target-{pid}");
    let source = format!("tls-source-{pid}");
    let agent = agent("tls", &target, Some(&pki.identity(&target)));
    let source_id = pki.identity(&source);
    let addr = tls_transfer_addr(&agent, &target, &source_id);
    let work = root("tls");

    // a move announced for nobody, pushed by a node the CA vouches for
    let id = format!("tls-unannounced-{pid}");
    let refused = push(&addr, pki.channels("intruder"), &target, &id, None, &work).expect_err("refused");
    assert!(refused.contains("not announced"), "{refused}");
    assert!(!spooled(&agent, &id));

    // a move announced from `source`, pushed by the intruder even holding its secret
    let id = format!("tls-announced-{pid}");
    // the intruder cannot announce it from `source` (its certificate names itself)
    let (status, answer) = tls_announce(&agent, &target, &pki.identity("intruder"), &id, &source);
    assert_eq!(status, 403, "{answer}");
    assert!(answer["message"].as_str().unwrap_or("").contains("intruder"), "{answer}");
    let secret = MoveSecret::from_string(tls_announce_ok(&agent, &target, &source_id, &id));
    let refused =
        push(&addr, pki.channels("intruder"), &target, &id, Some(secret.clone()), &work).expect_err("refused");
    assert!(refused.contains(&format!("announced from node {source}")), "{refused}");
    assert!(!spooled(&agent, &id));

    // control: `source` itself with the secret gets through the check (the junk payload
    // then fails where a payload is looked at, not at the door)
    let answer = push(&addr, pki.channels(&source), &target, &id, Some(secret), &work);
    let text = match &answer {
        Ok(m) | Err(m) => m.clone(),
    };
    assert!(
        !text.contains("not announced") && !text.contains("announced from") && !text.contains("not a refusal"),
        "{text}"
    );
}

#[test]
fn a_client_without_a_certificate_fails_the_tls_handshake_at_the_transfer_port() {
    if !ready() {
        return;
    }
    let pid = std::process::id();
    let pki = Pki::new(root("nocert").join("pki"));
    let target = format!("nocert-target-{pid}");
    let agent = agent("nocert", &target, Some(&pki.identity(&target)));
    let anyone = pki.identity("anyone");
    let addr = tls_transfer_addr(&agent, &target, &anyone);
    let id = format!("nocert-{pid}");
    let secret = tls_announce_ok(&agent, &target, &anyone, &id);

    // trusts the CA, presents nothing
    let config = away_identity::trusting_client_config(pki.ca.cert_pem()).unwrap();
    let name = away_migrate::channel::server_name(&target).unwrap();
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    let tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let wrote = tls.write_all(&transfer_frames(&id, b"memory", Some(&secret))).and_then(|()| tls.flush());
    let mut buf = [0u8; 16];
    let read = wrote.and_then(|()| tls.read(&mut buf));
    match read {
        Err(e) => assert!(e.to_string().to_lowercase().contains("certificate"), "a certificate alert: {e}"),
        Ok(n) => assert_eq!(n, 0, "the receiver answered a client without a certificate: {:?}", &buf[..n]),
    }
    assert!(!spooled(&agent, &id));

    // plain TCP speaking the protocol, the secret and all: a TLS alert, no frame
    let mut raw = TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(&transfer_frames(&id, b"memory", Some(&secret))).unwrap();
    let n = raw.read(&mut buf).unwrap_or(0);
    assert!(n == 0 || buf[0] == 21, "plain TCP got a non-alert answer: {:?}", &buf[..n]);
    assert!(!spooled(&agent, &id));

    // control: a client with the CA's certificate for another node completes the handshake
    let intruder = pki.identity("intruder");
    let name = away_migrate::channel::server_name(&target).unwrap();
    let conn = rustls::ClientConnection::new(intruder.client_config().unwrap(), name).unwrap();
    let tcp = TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(&transfer_frames(&id, b"memory", Some(&secret))).unwrap();
    tls.flush().unwrap();
    let (kind, answer) = first_answer(&mut tls);
    assert_eq!(kind, 6, "{answer}");
    assert!(answer.contains("announced from node anyone"), "a frame answer, past TLS: {answer}");
}
