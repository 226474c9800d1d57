//! End-to-end tests of the transfer protocol over 127.0.0.1.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use away_migrate::transfer::{
    send, send_on, serve, warm_up, Compression, Faults, Progress, ReceiveOptions, ReceivedPayload, Receiver,
    SendOptions, TransferError, Verdict,
};
use tokio::net::TcpListener;

/// Deterministic pseudo-random bytes (xorshift), so no rand dependency is needed.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn checkpoint_dir(root: &Path, random_len: usize) -> PathBuf {
    let dir = root.join("checkpoint");
    fs::create_dir_all(dir.join("images/sub")).unwrap();
    fs::create_dir_all(dir.join("empty-dir")).unwrap();
    fs::write(dir.join("manifest.json"), br#"{"workload":"web","pid":42}"#).unwrap();
    fs::write(dir.join("images/pages-1.img"), random_bytes(random_len, 0x9e3779b97f4a7c15)).unwrap();
    fs::write(dir.join("images/zeros.img"), vec![0u8; 3 << 20]).unwrap();
    fs::write(dir.join("images/empty.img"), b"").unwrap();
    fs::write(dir.join("images/sub/empty2.img"), b"").unwrap();
    let text: Vec<u8> = b"GET /index.html HTTP/1.1\r\n".iter().cycle().take(700_000).copied().collect();
    fs::write(dir.join("images/sub/text.img"), text).unwrap();
    dir
}

/// Relative path -> file contents (`None` for directories).
type Tree = BTreeMap<PathBuf, Option<Vec<u8>>>;

fn tree(dir: &Path) -> Tree {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, None);
                stack.push(e.path());
            } else {
                out.insert(rel, Some(fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

/// What a test receiver saw: each payload with the tree it unpacked to.
type Received = Arc<Mutex<Vec<(ReceivedPayload, Tree)>>>;

/// A receiver whose handler records the unpacked tree and answers ok.
struct Target {
    addr: String,
    spool: PathBuf,
    received: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn target(spool: PathBuf) -> Target {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let received = Arc::new(Mutex::new(Vec::new()));
    let rec = received.clone();
    let spool2 = spool.clone();
    let task = tokio::spawn(async move {
        serve(listener, spool2, move |payload: ReceivedPayload| {
            let rec = rec.clone();
            async move {
                let mode =
                    fs::metadata(&payload.dir).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
                assert_eq!(mode.unwrap() & 0o777, 0o700, "payload dir must be owner-only");
                let t = tree(&payload.dir);
                rec.lock().unwrap().push((payload, t));
                Verdict::ok("restored").with_detail(serde_json::json!({"pid": 1234}))
            }
        })
        .await
        .unwrap();
    });
    Target { addr, spool, received, task }
}

fn opts(compression: Compression) -> SendOptions {
    SendOptions {
        compression,
        chunk_size: 256 << 10,
        reconnect_timeout: Duration::from_secs(10),
        ..SendOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_with_each_compression() {
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint_dir(tmp.path(), 3 << 20);
    let t = target(tmp.path().join("spool")).await;
    for compression in [Compression::None, Compression::Zstd { level: 3 }, Compression::Gzip { level: 1 }] {
        let progress: Arc<Mutex<Vec<Progress>>> = Arc::default();
        let p = progress.clone();
        let mut o = opts(compression);
        o.progress = Some(Arc::new(move |x| p.lock().unwrap().push(x)));
        let meta = serde_json::json!({"workload": "web", "compression": compression.to_string()});
        let outcome = send(&t.addr, &src, meta.clone(), &o).await.unwrap();
        assert!(outcome.verdict.ok, "{compression}: {:?}", outcome.verdict);
        assert_eq!(outcome.verdict.detail["pid"], 1234);
        assert_eq!(outcome.chunks_sent, outcome.chunk_count);
        assert_eq!((outcome.chunks_skipped, outcome.reconnects), (0, 0));
        if compression != Compression::None {
            assert!(outcome.bytes_wire < outcome.bytes_raw, "{compression} should shrink zero and text pages");
        }
        let last = *progress.lock().unwrap().last().unwrap();
        assert_eq!(last, Progress { bytes_sent: outcome.bytes_raw, bytes_total: outcome.bytes_raw });
        let (payload, got) = t.received.lock().unwrap().pop().unwrap();
        assert_eq!(got, tree(&src), "{compression}: trees differ");
        assert_eq!(payload.meta, meta);
        assert_eq!(payload.transfer_id, outcome.transfer_id);
        // Spool is removed after an ok verdict.
        assert!(!t.spool.join(&outcome.transfer_id).exists());
    }
    // The sender's tar spool is gone too.
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".away-send"))
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmed_up_connection_carries_the_payload() {
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint_dir(tmp.path(), 1 << 20);
    let t = target(tmp.path().join("spool")).await;
    let mut conn: away_migrate::channel::Stream = Box::new(tokio::net::TcpStream::connect(&t.addr).await.unwrap());
    // filler twice: the receiver answers each, the sender's reader skips the answers
    for _ in 0..2 {
        warm_up(&mut conn, 32 << 10).await.unwrap();
    }
    let o = opts(Compression::Zstd { level: 1 });
    let outcome = send_on(&t.addr, Some(conn), &src, serde_json::json!({"w": 1}), &o).await.unwrap();
    assert!(outcome.verdict.ok, "{:?}", outcome.verdict);
    assert_eq!(outcome.reconnects, 0, "the payload went over the warmed-up connection");
    let (_, got) = t.received.lock().unwrap().pop().unwrap();
    assert_eq!(got, tree(&src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_cut_link_without_resending_verified_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint_dir(tmp.path(), 4 << 20);
    let t = target(tmp.path().join("spool")).await;
    let mut o = opts(Compression::Zstd { level: 1 });
    o.faults = Faults { cut_after_chunks: Some(10), ..Faults::default() };
    let outcome = send(&t.addr, &src, serde_json::Value::Null, &o).await.unwrap();
    assert!(outcome.verdict.ok);
    assert_eq!(outcome.reconnects, 1);
    assert_eq!(outcome.chunks_skipped, 10, "the receiver kept the 10 chunks sent before the cut");
    assert_eq!(outcome.chunks_sent, outcome.chunk_count, "no verified chunk was sent twice");
    let (_, got) = t.received.lock().unwrap().pop().unwrap();
    assert_eq!(got, tree(&src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_is_detected_and_resent() {
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint_dir(tmp.path(), 2 << 20);
    let t = target(tmp.path().join("spool")).await;
    for compression in [Compression::None, Compression::Zstd { level: 1 }, Compression::Gzip { level: 1 }] {
        let mut o = opts(compression);
        o.faults = Faults { corrupt_chunk: Some(3), ..Faults::default() };
        let outcome = send(&t.addr, &src, serde_json::Value::Null, &o).await.unwrap();
        assert!(outcome.verdict.ok, "{compression}");
        assert_eq!(outcome.reconnects, 0, "{compression}: resent in-band");
        assert!(outcome.chunks_sent > outcome.chunk_count, "{compression}: chunk 3 was resent");
        let (_, got) = t.received.lock().unwrap().pop().unwrap();
        assert_eq!(got, tree(&src), "{compression}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_payload_mismatch_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint_dir(tmp.path(), 1 << 20);
    let t = target(tmp.path().join("spool")).await;
    let mut o = opts(Compression::default());
    o.faults = Faults { wrong_payload_sha: true, ..Faults::default() };
    o.transfer_id = Some("bad-sha".into());
    let err = send(&t.addr, &src, serde_json::Value::Null, &o).await.unwrap_err();
    assert!(matches!(err, TransferError::Remote { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("failed verification") && msg.contains("bad-sha") && msg.contains(&t.addr), "{msg}");
    assert!(t.received.lock().unwrap().is_empty(), "handler must not run");
    assert!(!t.spool.join("bad-sha/payload").exists(), "no output dir");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_receiver_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint_dir(tmp.path(), 1024);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = send(&addr, &src, serde_json::Value::Null, &opts(Compression::None)).await.unwrap_err();
    assert!(err.to_string().contains(&addr), "{err}");
}

/// A tmpfs of 1 MiB as the receiver's spool: needs root and mount; skipped otherwise.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(dir: &Path) -> Option<TinyFs> {
        fs::create_dir_all(dir).unwrap();
        let ok =
            Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(dir).status().ok()?.success();
        ok.then(|| TinyFs(dir.to_path_buf()))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_target_disk_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("tiny");
    let Some(_fs) = TinyFs::mount(&spool) else {
        eprintln!("skipping: cannot mount a tmpfs (needs root)");
        return;
    };
    // Chunks do not fit: refused at the hello, from the disk's free space.
    let big = tmp.path().join("big");
    fs::create_dir_all(&big).unwrap();
    fs::write(big.join("pages.img"), random_bytes(3 << 20, 7)).unwrap();
    let t = target(spool.clone()).await;
    let mut o = opts(Compression::None);
    o.transfer_id = Some("full1".into());
    let err = send(&t.addr, &big, serde_json::Value::Null, &o).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("target disk full") && msg.contains(&spool.display().to_string()), "{msg}");
    // The chunks fit but their unpacked copy would not: refused too, no partial output dir.
    let mid = tmp.path().join("mid");
    fs::create_dir_all(&mid).unwrap();
    fs::write(mid.join("pages.img"), random_bytes(600 << 10, 9)).unwrap();
    assert!(!spool.join("full1").exists(), "a refused transfer leaves no spool");
    o.transfer_id = Some("full2".into());
    let err = send(&t.addr, &mid, serde_json::Value::Null, &o).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("target disk full") && msg.contains("full2"), "{msg}");
    assert!(!spool.join("full2/payload").exists(), "partial output dir left behind");
    assert!(t.received.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_verdict_keeps_spool_and_is_returned() {
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint_dir(tmp.path(), 1024);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let spool = tmp.path().join("spool");
    let task = tokio::spawn(serve(listener, spool.clone(), |_p: ReceivedPayload| async {
        Verdict::failed("restore failed: criu exited 1")
    }));
    let mut o = opts(Compression::default());
    o.transfer_id = Some("keep".into());
    let outcome = send(&addr, &src, serde_json::Value::Null, &o).await.unwrap();
    assert!(!outcome.verdict.ok);
    assert!(outcome.verdict.message.contains("criu exited 1"));
    assert!(spool.join("keep/payload/manifest.json").exists(), "kept for inspection");
    task.abort();
}

/// A sender written by hand (no credential, nothing but the wire format): sends `frames`
/// as they are, then returns the receiver's first answer after `until_answer` (its kind and
/// body), or None when it closed the connection without one.
async fn raw_exchange(addr: &str, frames: Vec<Vec<u8>>) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for f in frames {
        if s.write_all(&f).await.is_err() {
            break;
        }
    }
    let _ = s.shutdown().await;
    let mut answers = Vec::new();
    let read = async {
        loop {
            let mut head = [0u8; 5];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len.min(1 << 20)];
            if s.read_exact(&mut body).await.is_err() {
                return;
            }
            answers.push((head[0], body));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("the receiver answers or closes");
    answers
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    [vec![kind], (body.len() as u32).to_be_bytes().to_vec(), body.to_vec()].concat()
}

fn hello(id: &str, total: u64, chunk: u64, sha: &str) -> Vec<u8> {
    let h = serde_json::json!({"version": 1, "transfer_id": id, "total_bytes": total, "chunk_size": chunk,
        "chunk_count": total.div_ceil(chunk), "compression": "none", "sha256": sha, "meta": null});
    frame(1, &serde_json::to_vec(&h).unwrap())
}

/// Sizes a peer announces are refused before anything is allocated for them, and the
/// receiver goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_sizes_are_bounded_and_the_receiver_lives() {
    let tmp = tempfile::tempdir().unwrap();
    let t = target(tmp.path().join("spool")).await;
    let sha = "0".repeat(64);
    // a hello frame claiming 4 GiB: the connection ends, nothing is read into memory
    let answers = raw_exchange(&t.addr, vec![[vec![1u8], u32::MAX.to_be_bytes().to_vec()].concat()]).await;
    assert!(answers.is_empty(), "{answers:?}");
    // a chunk before any hello
    assert!(raw_exchange(&t.addr, vec![frame(3, &[0u8; 64])]).await.is_empty());
    // 1 PiB announced: refused by the receiver's limit
    let answers = raw_exchange(&t.addr, vec![hello("huge1", 1 << 50, 1 << 20, &sha)]).await;
    let (kind, body) = &answers[0];
    let text = String::from_utf8_lossy(body);
    assert!(*kind == 6 && text.contains("exceeds this receiver's limit"), "{kind} {text}");
    // below the limit but above the disk's free space
    let answers = raw_exchange(&t.addr, vec![hello("huge2", 60 << 30, 1 << 20, &sha)]).await;
    let text = String::from_utf8_lossy(&answers[0].1);
    assert!(answers[0].0 == 6 && text.contains("target disk full"), "{text}");
    // a chunk longer than the hello's chunk size
    let frames = vec![hello("big-chunk", 8192, 4096, &sha), frame(3, &vec![0u8; 45 + 8192])];
    let answers = raw_exchange(&t.addr, frames).await;
    assert!(answers.iter().all(|(k, _)| *k == 2), "only the resume came back: {answers:?}");
    assert!(!tmp.path().join("spool/huge1").exists() && !tmp.path().join("spool/huge2").exists());
    // still serving
    let src = checkpoint_dir(tmp.path(), 1024);
    let outcome = send(&t.addr, &src, serde_json::Value::Null, &opts(Compression::default())).await.unwrap();
    assert!(outcome.verdict.ok);
}

/// A payload holding a symlink to a file outside: refused with the entry named, the
/// file unchanged, nothing of the payload left in the spool, the handler never called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_with_a_symlink_is_refused_and_leaves_nothing() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"keep").unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    tar.append_link(&mut h, "checkpoint/pages-1.img.pulling", &victim).unwrap();
    let bytes = tar.into_inner().unwrap();
    let sha: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    let chunk = [
        0u64.to_be_bytes().to_vec(),
        (bytes.len() as u32).to_be_bytes().to_vec(),
        vec![0u8],
        sha.to_vec(),
        bytes.clone(),
    ]
    .concat();
    let t = target(tmp.path().join("spool")).await;
    let frames = vec![hello("link1", bytes.len() as u64, bytes.len() as u64, &hex), frame(3, &chunk), frame(4, &[])];
    let answers = raw_exchange(&t.addr, frames).await;
    let (kind, body) = answers.last().expect("an answer");
    let text = String::from_utf8_lossy(body);
    assert!(*kind == 6 && text.contains("pages-1.img.pulling") && text.contains("Symlink"), "{kind} {text}");
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    assert!(!tmp.path().join("spool/link1").exists(), "the refused payload left nothing");
    assert!(t.received.lock().unwrap().is_empty());
}

/// The receiver's bounds: connections over the limit are refused at once, a silent one
/// goes after the handshake timeout, a hello over the unfinished-transfer or spool limit
/// is refused with the flag named, and abandoned transfers expire with their spools,
/// freeing their places; then a real payload still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_transfers_and_spool_are_bounded_and_abandoned_ones_expire() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let options = ReceiveOptions {
        max_connections: 3,
        max_transfers: 2,
        max_spool_bytes: 16 << 20,
        handshake_timeout: Duration::from_millis(500),
        expire_after: Duration::from_secs(2),
        ..ReceiveOptions::default()
    };
    let receiver = Receiver::from_listener(listener, spool.clone()).with_options(options);
    let task = tokio::spawn(receiver.serve(|_p: ReceivedPayload| async { Verdict::ok("restored") }));
    let sha = "0".repeat(64);

    // three silent connections fill the slots; the fourth is refused at once, named
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), fourth.read_to_end(&mut answer)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("receiver busy: 3 connections") && text.contains("--max-transfer-connections"), "{text}");
    // the silent ones are closed after the handshake timeout
    for mut s in silent {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a silent connection outlived the handshake timeout");
    }

    // two abandoned transfers (hello, one chunk of four, gone) hold both places
    let chunk = 1 << 20;
    for id in ["gone1", "gone2"] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(&hello(id, 4 * chunk, chunk, &sha)).await.unwrap();
        let data = vec![7u8; chunk as usize];
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&data).into();
        let body =
            [0u64.to_be_bytes().to_vec(), (chunk as u32).to_be_bytes().to_vec(), vec![0u8], digest.to_vec(), data]
                .concat();
        s.write_all(&frame(3, &body)).await.unwrap();
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 2, "{id}: resume answered");
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(spool.join("gone1/payload.tar").exists() && spool.join("gone2/payload.tar").exists());
    let answers = raw_exchange(&addr, vec![hello("third", 1000, 1000, &sha)]).await;
    let text = String::from_utf8_lossy(&answers[0].1);
    assert!(answers[0].0 == 6 && text.contains("receiver busy: 2 transfers unfinished"), "{text}");
    assert!(!spool.join("third").exists(), "a refused hello leaves no spool");

    // they expire: spools gone, places free again
    let gone = async {
        while spool.join("gone1").exists() || spool.join("gone2").exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.expect("abandoned spools expire");
    // a payload whose twice does not fit the spool bound is refused before a byte of it
    let answers = raw_exchange(&addr, vec![hello("toobig", 9 << 20, 1 << 20, &sha)]).await;
    let text = String::from_utf8_lossy(&answers[0].1);
    assert!(answers[0].0 == 6 && text.contains("receiver spool full") && text.contains("--max-spool"), "{text}");
    let src = checkpoint_dir(tmp.path(), 1024);
    let outcome = send(&addr, &src, serde_json::Value::Null, &opts(Compression::default())).await.unwrap();
    assert!(outcome.verdict.ok, "{:?}", outcome.verdict);
    task.abort();
}

/// A receiver told to stop ends a transfer between chunks at once, its spool synced; a
/// receiver started again on the same spool takes it over and the sender resumes where
/// it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_receiver_leaves_resumable_spools_for_the_next_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let sha = "0".repeat(64);
    let chunk = 64u64 << 10;
    let chunk_frame = |index: u64| {
        let data = vec![index as u8; chunk as usize];
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&data).into();
        let body =
            [index.to_be_bytes().to_vec(), (chunk as u32).to_be_bytes().to_vec(), vec![0u8], digest.to_vec(), data]
                .concat();
        frame(3, &body)
    };
    let resume_of = |answer: &[u8]| -> u64 {
        assert_eq!(answer[0], 2, "a resume frame");
        serde_json::from_slice::<serde_json::Value>(&answer[5..]).unwrap()["have"].as_u64().unwrap()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(Receiver::from_listener(listener, spool.clone()).serve_until(
        |_p: ReceivedPayload| async { Verdict::ok("restored") },
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&hello("kept", 4 * chunk, chunk, &sha)).await.unwrap();
    s.write_all(&[chunk_frame(0), chunk_frame(1)].concat()).await.unwrap();
    let mut answer = [0u8; 64];
    let n = s.read(&mut answer).await.unwrap();
    assert_eq!(resume_of(&answer[..n]), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = std::time::Instant::now();
    stop_tx.send(()).unwrap();
    let open = tokio::time::timeout(Duration::from_secs(5), first).await.expect("stops promptly").unwrap().unwrap();
    assert_eq!(open, 0, "no connection left busy");
    assert!(stopped.elapsed() < Duration::from_secs(2), "took {:?}", stopped.elapsed());
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the cut connection closes");
    assert!(spool.join("kept/progress.json").exists(), "the spool stays for the sender");

    // the next receiver on the same spool: the sender resumes at chunk 2
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let second = tokio::spawn(
        Receiver::from_listener(listener, spool.clone()).serve(|_p: ReceivedPayload| async { Verdict::ok("restored") }),
    );
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(&hello("kept", 4 * chunk, chunk, &sha)).await.unwrap();
    let n = s.read(&mut answer).await.unwrap();
    assert_eq!(resume_of(&answer[..n]), 2, "the sender resumes where the stopped receiver was");
    second.abort();
}
