//! The transfer protocol over mutual TLS, with the per-move check at the hello: the good
//! move, and every way in that must stay shut (no secret, another node's certificate, no
//! certificate, a receiver that is not the expected node), none of which leaves a spool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::wire::{Frame, Hello, PROTOCOL_VERSION};
use super::{send, Authorize, MoveSecret, Receiver, SendOptions, TransferError, Verdict};
use crate::channel::testing::TestCa;
use crate::channel::{peer_is, Channels};

/// A receiver as node "target" that takes transfer "move-1" only from node "source" with
/// `secret`; returns its address and spool.
async fn target(ca: &TestCa, spool: PathBuf, secret: MoveSecret) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let authorize: Authorize = Arc::new(move |claim| {
        if claim.transfer_id != "move-1" {
            return Err(format!("no move {} announced here", claim.transfer_id));
        }
        if !peer_is(claim.peer_certs, "source") {
            return Err("move-1 comes from node source only".into());
        }
        if !secret.matches(claim.secret) {
            return Err("wrong or missing secret for move-1".into());
        }
        Ok(())
    });
    let receiver =
        Receiver::from_listener(listener, spool).with_channels(ca.channels("target")).with_authorizer(authorize);
    let task = tokio::spawn(async move {
        let _ = receiver.serve(|_| async { Verdict::ok("restored") }).await;
    });
    (addr, task)
}

fn payload(root: &Path) -> PathBuf {
    let dir = root.join("payload");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pages-1.img"), vec![7u8; 3 << 20]).unwrap();
    dir
}

fn opts(channels: Channels, peer: &str, id: &str, secret: Option<MoveSecret>) -> SendOptions {
    SendOptions {
        channels,
        peer_node: peer.into(),
        transfer_id: Some(id.into()),
        secret,
        reconnect_timeout: Duration::from_millis(300),
        ..SendOptions::default()
    }
}

fn spooled(spool: &Path, id: &str) -> bool {
    spool.join(id).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_move_from_its_node_goes_through() {
    let (ca, tmp) = (TestCa::new(), tempfile::tempdir().unwrap());
    let secret = MoveSecret::generate().unwrap();
    let (addr, _t) = target(&ca, tmp.path().join("spool"), secret.clone()).await;
    let o = opts(ca.channels("source"), "target", "move-1", Some(secret));
    let outcome = send(&addr, &payload(tmp.path()), serde_json::json!({}), &o).await.unwrap();
    assert!(outcome.verdict.ok, "{:?}", outcome.verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_without_its_secret_is_refused_before_any_spool() {
    let (ca, tmp) = (TestCa::new(), tempfile::tempdir().unwrap());
    let spool = tmp.path().join("spool");
    let (addr, _t) = target(&ca, spool.clone(), MoveSecret::generate().unwrap()).await;
    for secret in [None, Some(MoveSecret::generate().unwrap())] {
        let o = opts(ca.channels("source"), "target", "move-1", secret);
        match send(&addr, &payload(tmp.path()), serde_json::json!({}), &o).await {
            Err(TransferError::Remote { message, .. }) => assert!(message.contains("secret"), "{message}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(!spooled(&spool, "move-1"), "nothing spooled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_with_a_valid_certificate_is_refused() {
    let (ca, tmp) = (TestCa::new(), tempfile::tempdir().unwrap());
    let spool = tmp.path().join("spool");
    let secret = MoveSecret::generate().unwrap();
    let (addr, _t) = target(&ca, spool.clone(), secret.clone()).await;
    // even holding the secret: the certificate names another node
    let o = opts(ca.channels("intruder"), "target", "move-1", Some(secret));
    match send(&addr, &payload(tmp.path()), serde_json::json!({}), &o).await {
        Err(TransferError::Remote { message, .. }) => assert!(message.contains("node source only"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!spooled(&spool, "move-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_talks_only_to_the_node_it_expects() {
    let (ca, tmp) = (TestCa::new(), tempfile::tempdir().unwrap());
    let secret = MoveSecret::generate().unwrap();
    let (addr, _t) = target(&ca, tmp.path().join("spool"), secret.clone()).await;
    let o = opts(ca.channels("source"), "elsewhere", "move-1", Some(secret));
    match send(&addr, &payload(tmp.path()), serde_json::json!({}), &o).await {
        Err(TransferError::Connect { source, .. }) => {
            assert!(source.to_string().contains("elsewhere"), "{source}")
        }
        other => panic!("expected a failed handshake, got {other:?}"),
    }
    // and a CA of its own is no way in either
    let other_ca = TestCa::new();
    let o = opts(other_ca.channels("source"), "target", "move-1", None);
    assert!(matches!(
        send(&addr, &payload(tmp.path()), serde_json::json!({}), &o).await,
        Err(TransferError::Connect { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_gets_no_frame_through() {
    let (ca, tmp) = (TestCa::new(), tempfile::tempdir().unwrap());
    let spool = tmp.path().join("spool");
    let secret = MoveSecret::generate().unwrap();
    let (addr, _t) = target(&ca, spool.clone(), secret.clone()).await;
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let name = crate::channel::server_name("target").unwrap();
    let connector = tokio_rustls::TlsConnector::from(ca.anonymous_client());
    // TLS 1.3: the client's side of the handshake may end before the server has refused
    // it; either way not one frame is taken
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            transfer_id: "move-1".into(),
            total_bytes: 1,
            chunk_size: 1,
            chunk_count: 1,
            compression: "none".into(),
            sha256: "0".repeat(64),
            meta: serde_json::Value::Null,
            secret: Some(secret),
        };
        let _ = tls.write_all(&Frame::Hello(hello).encode()).await;
        let _ = tls.flush().await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await.expect("answered at once");
        assert!(matches!(read, Err(_) | Ok(0)), "the receiver answered a client without a certificate: {read:?}");
    }
    // plain TCP speaking the protocol gets a TLS alert (record type 21), no frame
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    let _ = raw.write_all(&Frame::WarmUp(16).encode()).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.expect("answered at once");
    assert!(matches!(read, Err(_) | Ok(0)) || buf[0] == 21, "plain TCP got an answer: {:?}", &buf[..8]);
    assert!(!spooled(&spool, "move-1"));
}
