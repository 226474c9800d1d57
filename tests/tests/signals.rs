//! SIGTERM is Ctrl-C: the long-running commands stopped the way a supervisor, `timeout` or
//! `kill` stops them finish or undo what they started, exit promptly and say so.
//!
//! * `away agent`: exits 0 and logs that it stopped cleanly; a transfer it was receiving
//!   keeps its spool, and the agent started again takes it over (the sender resumes).
//! * `away broker`: exits 0 with an event stream open, and serves again from the same
//!   database.
//! * `away cluster up` stopped while it starts: exits 143, and nothing it started is left
//!   (processes, namespaces, bridge, state).
//! * `away run --vm` stopped while the VM starts: exits 143, no QEMU and no state left.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use away_e2e::{away_bin, free_port, lab_image, require_root, require_socket, require_vm_host, wait_for, Node};
use away_runtime::host::process::{process_runs, signal, Signal};

/// True once `pid` has a handler for SIGTERM (`SigCgt` of /proc/PID/status): from then
/// on a SIGTERM is the command's to handle, not the default action's.
fn handles_sigterm(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let caught = status.lines().find_map(|l| l.strip_prefix("SigCgt:")).map(str::trim).unwrap_or("0");
    u64::from_str_radix(caught, 16).is_ok_and(|mask| mask & (1 << (15 - 1)) != 0)
}

/// SIGTERM `child` once it handles it; returns its exit status and how long it took.
fn sigterm_and_wait(child: &mut Child, limit: Duration) -> (ExitStatus, Duration) {
    let pid = child.id();
    assert!(wait_for(30, || handles_sigterm(pid).then_some(())).is_some(), "pid {pid} never handled SIGTERM");
    signal(pid, Signal::TERM).unwrap();
    let sent = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, sent.elapsed());
        }
        if sent.elapsed() > limit {
            let _ = child.kill();
            panic!("pid {pid} still runs {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    [vec![kind], (body.len() as u32).to_be_bytes().to_vec(), body.to_vec()].concat()
}

/// A transfer hello and its chunks, written by hand (the wire format of away_migrate::transfer).
fn hello(id: &str, total: u64, chunk: u64, secret: &str) -> Vec<u8> {
    let h = serde_json::json!({"version": 1, "transfer_id": id, "total_bytes": total, "chunk_size": chunk,
        "chunk_count": total.div_ceil(chunk), "compression": "none", "sha256": "0".repeat(64), "meta": null,
        "secret": secret});
    frame(1, &serde_json::to_vec(&h).unwrap())
}

fn chunk(index: u64, len: usize) -> Vec<u8> {
    use sha2::Digest;
    let data = vec![index as u8; len];
    let sha = sha2::Sha256::digest(&data).to_vec();
    let body = [index.to_be_bytes().to_vec(), (len as u32).to_be_bytes().to_vec(), vec![0u8], sha, data];
    frame(3, &body.concat())
}

/// `have` of the resume frame the receiver answers a hello with.
fn resume(s: &mut std::net::TcpStream) -> u64 {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize];
    s.read_exact(&mut body).unwrap();
    assert_eq!(head[0], 2, "a resume frame, got kind {}: {}", head[0], String::from_utf8_lossy(&body));
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["have"].as_u64().unwrap()
}

fn agent(node: &Node, api: u16, transfer: u16, log: &Path) -> Child {
    let (api, transfer) = (format!("127.0.0.1:{api}"), format!("127.0.0.1:{transfer}"));
    let child = node
        .cmd(&[
            "agent",
            "--name",
            "sig",
            "--listen",
            &api,
            "--transfer-listen",
            &transfer,
            "--insecure-plaintext-channels",
        ])
        .env("AWAY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    assert!(wait_for(60, || std::net::TcpStream::connect(&transfer).ok()).is_some(), "agent up: {}", read(log));
    child
}

#[test]
fn agent_stops_on_sigterm_and_its_next_start_resumes_the_transfer_it_cut() {
    if !(require_root() && require_socket("/run/containerd/containerd.sock", "containerd")) {
        return;
    }
    let tmp = tempfile::Builder::new().prefix("away-sig").tempdir().unwrap();
    let node = Node::at(format!("away-sig-{}", std::process::id()), tmp.path().to_path_buf());
    let (api, transfer) = (free_port(), free_port());
    let log = tmp.path().join("agent.log");
    let mut child = agent(&node, api, transfer, &log);

    // a sender half way through: 2 of 4 chunks, connection still open (its move announced
    // as a source would, the secret kept in the agent's state over the restart)
    let kib64 = 64 << 10;
    let secret = away_e2e::announce(&format!("127.0.0.1:{api}"), "sigterm-kept", "sig", "sig-source");
    let mut sender = std::net::TcpStream::connect(("127.0.0.1", transfer)).unwrap();
    sender.write_all(&hello("sigterm-kept", 4 * kib64, kib64, &secret)).unwrap();
    assert_eq!(resume(&mut sender), 0);
    sender.write_all(&[chunk(0, kib64 as usize), chunk(1, kib64 as usize)].concat()).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let (status, took) = sigterm_and_wait(&mut child, Duration::from_secs(30));
    let text = read(&log);
    eprintln!("agent exited {status} {took:?} after SIGTERM");
    assert!(status.success(), "exit {status}: {text}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(text.contains("agent stopped cleanly") && text.contains("SIGTERM"), "{text}");
    assert!(text.contains("the transfer's spool stays for its sender"), "{text}");
    let spool = node.state.join("transfers/sigterm-kept");
    assert!(spool.join("progress.json").is_file(), "the cut transfer's spool stays");

    // started again: it takes the spool over and the sender resumes at chunk 2
    let log2 = tmp.path().join("agent2.log");
    let mut child = agent(&node, api, transfer, &log2);
    let mut sender = std::net::TcpStream::connect(("127.0.0.1", transfer)).unwrap();
    sender.write_all(&hello("sigterm-kept", 4 * kib64, kib64, &secret)).unwrap();
    assert_eq!(resume(&mut sender), 2, "resumed where the stopped agent was");
    assert!(read(&log2).contains("spools of an earlier run"), "{}", read(&log2));
    drop(sender);
    let (status, _) = sigterm_and_wait(&mut child, Duration::from_secs(30));
    assert!(status.success(), "second stop: exit {status}: {}", read(&log2));
}

#[test]
fn broker_stops_on_sigterm_with_an_event_stream_open() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = tmp.path().join("broker.db");
    let log = tmp.path().join("broker.log");
    let token = format!("sig-user-{}", std::process::id());
    let start = || {
        Command::new(away_bin())
            // plain HTTP on loopback: the test speaks HTTP by hand over TCP, and what is
            // under test is the stop, not TLS (tests/tests/identity.rs)
            .args([
                "broker",
                "--insecure-loopback",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--db",
                db.to_str().unwrap(),
            ])
            // secrets through the environment, never on a command line
            .env("AWAY_JOIN_TOKEN", "sig-join")
            .env("AWAY_USER_TOKEN", &token)
            .env("AWAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap()
    };
    let get = |path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        resp.starts_with("HTTP/1.1 200").then_some(resp)
    };
    let mut child = start();
    assert!(wait_for(30, || get("/v1/nodes")).is_some(), "broker up: {}", read(&log));
    // an event stream never ends by itself
    let mut events = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(events, "GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let (status, took) = sigterm_and_wait(&mut child, Duration::from_secs(30));
    let text = read(&log);
    eprintln!("broker exited {status} {took:?} after SIGTERM");
    assert!(status.success(), "exit {status}: {text}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(text.contains("broker stopped cleanly") && text.contains("SIGTERM"), "{text}");
    drop(events);

    let mut child = start();
    assert!(wait_for(30, || get("/v1/nodes")).is_some(), "broker serves again from its database: {}", read(&log));
    let (status, _) = sigterm_and_wait(&mut child, Duration::from_secs(30));
    assert!(status.success());
}

#[test]
fn cluster_up_stopped_while_starting_leaves_nothing() {
    if !require_root() {
        return;
    }
    // a name whose subnet no interface of this host uses (other tests' clusters)
    let name = away_e2e::free_cluster_name("bs");
    let run = Path::new("/run/away/cluster").join(&name);
    let mut child = Command::new(away_bin())
        .args(["cluster", "up", "--name", &name, "--node", "n1=cloud"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stopped once the node's containerd runs: a broker, a containerd, a namespace, a bridge
    let pidfile = run.join("n1/containerd.pid");
    let started = wait_for(60, || read(&pidfile).trim().parse::<u32>().ok());
    let broker: Option<u32> = read(&run.join("broker.pid")).trim().parse().ok();
    let (status, took) = sigterm_and_wait(&mut child, Duration::from_secs(90));
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    eprintln!("cluster up exited {status} {took:?} after SIGTERM: {stderr}");
    let started = started.expect("containerd of n1 started");
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("SIGTERM") && stderr.contains("stopped and removed"), "{stderr}");
    for pid in [Some(started), broker].into_iter().flatten() {
        assert!(!process_runs(pid), "pid {pid} it started still runs");
    }
    let netns =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).to_string();
    assert!(!netns.contains(&format!("away-{name}-")), "namespace left: {netns}");
    let links = String::from_utf8_lossy(&Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).to_string();
    assert!(!links.contains(&format!("awb-{name}")), "bridge left");
    assert!(!Path::new("/var/lib/away/cluster").join(&name).exists(), "state left");
    assert!(!run.join("cluster.json").exists());
}

#[test]
fn run_of_a_vm_stopped_while_it_starts_is_undone() {
    if !require_vm_host() {
        return;
    }
    let image = lab_image("counter");
    let tmp = tempfile::Builder::new().prefix("away-sig").tempdir().unwrap();
    let node = Node::at(format!("away-sigvm-{}", std::process::id()), tmp.path().to_path_buf());
    let mut child = node
        .cmd(&["run", image.to_str().unwrap(), "--vm", "--name", "sigvm", "--memory", "128Mi"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // at once: the start runs on to its end, then is undone
    let (status, took) = sigterm_and_wait(&mut child, Duration::from_secs(240));
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    eprintln!("away run exited {status} {took:?} after SIGTERM: {stderr}");
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("SIGTERM: removed sigvm"), "{stderr}");
    let dir = node.run.join("qemu/sigvm");
    assert!(!dir.exists(), "{} left", dir.display());
    let needle = dir.display().to_string();
    let qemus: Vec<u32> = away_runtime::host::process::processes()
        .filter(|p| p.runs() && p.cmdline_contains(&needle))
        .map(|p| p.pid)
        .collect();
    assert!(qemus.is_empty(), "qemu left running: {qemus:?}");
    assert!(node.ps().iter().all(|w| w["name"] != "sigvm"));
}
