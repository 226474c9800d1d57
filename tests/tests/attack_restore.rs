//! A restore that cannot escape, against a real agent: an attacker who reaches the
//! transfer port sends hand-made payloads. The move is announced first, as its source
//! would (`send_raw`): these are the checks a peer that got that far still meets
//! (attack_channels.rs has the ones that keep it from getting there).
//! (a) a payload carrying a symlink to a file outside is refused, the file unchanged and
//! nothing of the payload left; (b) a streamed move whose pagemap announces 2^40 pages
//! fails with a clear answer before anything is sized from it, and the agent lives on.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use away_e2e::{http_get, lab_image, require_root, require_socket, LocalAgent, Node};
use serde_json::Value;

fn ready() -> bool {
    require_root() && require_socket("/run/containerd/containerd.sock", "containerd")
}

fn agent(test: &str) -> LocalAgent {
    let id = format!("attack-{test}-{}", std::process::id());
    let node = Node::at(format!("away-{id}"), PathBuf::from(format!("/tmp/away-e2e-attack/{id}")));
    let log = PathBuf::from(format!("/tmp/away-e2e-attack/agent-{id}.log"));
    node.start_agent(&id, &[], &[], &log)
}

/// The agent's API port, its node answer (proof it lives) and its transfer address.
fn node_info(agent: &LocalAgent) -> Option<Value> {
    let port: u16 = agent.api.rsplit(':').next()?.parse().ok()?;
    serde_json::from_str(&http_get(port, "/v1/node")?).ok()
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    [vec![kind], (body.len() as u32).to_be_bytes().to_vec(), body.to_vec()].concat()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
}

/// The attacker's sender: `payload` (a tar) as transfer `id` with `meta`, in one chunk,
/// speaking the wire format by hand (hello, chunk, done). Returns the receiver's last
/// answer (kind 5 verdict or 6 error, with its JSON).
fn send_raw(agent: &LocalAgent, addr: &str, id: &str, payload: &[u8], meta: &Value) -> (u8, Value) {
    let secret = away_e2e::announce(&agent.api, id, "attacked", "attacker");
    let sha = sha256_hex(payload);
    let len = payload.len() as u64;
    let hello = serde_json::json!({"version": 1, "transfer_id": id, "total_bytes": len, "chunk_size": len,
        "chunk_count": 1, "compression": "none", "sha256": sha, "meta": meta, "secret": secret});
    let raw_sha: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&sha[2 * i..2 * i + 2], 16).unwrap()).collect();
    let chunk =
        [0u64.to_be_bytes().to_vec(), (len as u32).to_be_bytes().to_vec(), vec![0u8], raw_sha, payload.to_vec()]
            .concat();
    let mut s = TcpStream::connect(addr).expect("connect to the transfer port");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    for f in [frame(1, &serde_json::to_vec(&hello).unwrap()), frame(3, &chunk), frame(4, &[])] {
        s.write_all(&f).unwrap();
    }
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).expect("an answer from the receiver");
        let mut body = vec![0u8; u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize];
        s.read_exact(&mut body).unwrap();
        if head[0] == 5 || head[0] == 6 {
            return (head[0], serde_json::from_slice(&body).unwrap());
        }
    }
}

fn tar_of(entries: &[(&str, &[u8])], symlink: Option<(&str, &Path)>) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        tar.append_data(&mut h, name, *data).unwrap();
    }
    if let Some((name, target)) = symlink {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        tar.append_link(&mut h, name, target).unwrap();
    }
    tar.into_inner().unwrap()
}

fn manifest(name: &str, image: &str, relay: &str) -> Value {
    serde_json::json!({
        "spec": {"name": name, "image": image, "resources": {"memory": "64MiB", "cpus": 0.5}},
        "image": image, "runtime": "containerd", "source_node": "attacker", "stopped_at_ms": 1,
        "lazy_page_relay": relay, "pull_pages": true
    })
}

#[test]
fn a_payload_with_a_symlink_outside_is_refused_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let agent = agent("link");
    let info = node_info(&agent).expect("the agent answers");
    let addr = info["transfer_addr"].as_str().unwrap().to_string();
    let victim = PathBuf::from(format!("/tmp/away-e2e-attack-victim-{}", std::process::id()));
    std::fs::write(&victim, b"not yours").unwrap();
    let id = format!("attack-link-{}", std::process::id());
    let m = manifest(&id, "away-e2e/attack:latest", "127.0.0.1:9");
    let payload = tar_of(
        &[("manifest.json", &serde_json::to_vec(&m).unwrap()), ("checkpoint/pagemap-1.img", b"")],
        // where the streamed restore writes first
        Some(("checkpoint/pages-1.img.pulling", &victim)),
    );
    let (kind, answer) = send_raw(&agent, &addr, &id, &payload, &m);
    let message = answer["message"].as_str().unwrap_or_default();
    assert_eq!(kind, 6, "refused as a transfer error: {answer}");
    assert!(message.contains("pages-1.img.pulling") && message.contains("Symlink"), "entry named: {message}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours", "the file outside is unchanged");
    let spool = agent.node.state.join("transfers").join(&id);
    assert!(!spool.exists(), "nothing of the refused payload is left in {}", spool.display());
    assert!(node_info(&agent).is_some(), "the agent still answers");
    let _ = std::fs::remove_file(&victim);
}

/// CRIU's pagemap image: the head {pages_id: 1}, one lazy entry (away's own encoder: the
/// count is what is under test, not the encoding).
fn pagemap(vaddr: u64, pages: u64) -> Vec<u8> {
    use away_migrate::lazy::pagemap::{Entry, Pagemap, PE_LAZY};
    let head_only = [vec![0u8; 8], 2u32.to_le_bytes().to_vec(), vec![0x08, 0x01]].concat();
    let mut map = Pagemap::parse(&head_only).expect("a pagemap head");
    map.entries = vec![Entry::new(vaddr, pages, PE_LAZY)];
    map.encode()
}

#[test]
fn a_peer_announcing_2_pow_40_pages_fails_the_move_and_the_agent_lives() {
    if !ready() {
        return;
    }
    let agent = agent("pages");
    let info = node_info(&agent).expect("the agent answers");
    let addr = info["transfer_addr"].as_str().unwrap().to_string();
    let id = format!("attack-pages-{}", std::process::id());
    let image = "away-e2e/attack:latest";
    // nothing listens at the relay: the move must fail on the count, before any connection
    let m = manifest(&id, image, "127.0.0.1:9");
    let image_tar = std::fs::read(lab_image("counter")).unwrap();
    let payload = tar_of(
        &[
            ("manifest.json", &serde_json::to_vec(&m).unwrap()),
            ("image.tar", &image_tar),
            ("checkpoint/pagemap-1.img", &pagemap(0x7f00_0000_0000, 1 << 40)),
            ("checkpoint/pages-1.img", b""),
        ],
        None,
    );
    let started = std::time::Instant::now();
    let (kind, answer) = send_raw(&agent, &addr, &id, &payload, &m);
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(kind == 5 && answer["ok"] == false, "a failed verdict: {answer}");
    assert!(message.contains("1099511627776 lazy pages") && message.contains("bytes free in"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(60), "failed at once, not after a timeout");
    assert!(node_info(&agent).is_some(), "the agent still answers");
    let (ok, ps, err) = agent.node.away(&["ps", "--json"]);
    assert!(ok, "{err}");
    assert!(!ps.contains(&id), "no copy of {id} on the target: {ps}");
    let spool = agent.node.state.join("transfers").join(&id);
    assert!(!spool.join("payload/checkpoint/pages-1.img.pulling").exists(), "no file sized from the count");
}
