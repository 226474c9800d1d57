//! Issue 17: a capture of the link during a move shows no plaintext of the workload's
//! memory. The counter runs with a random marker in its environment (so in its
//! process's memory, and for a VM in the guest's RAM); `tcpdump` records every TCP
//! packet on the link between the source (`away migrate`, this host) and the target
//! agent (loopback: both nodes on one host) while the workload moves, uncompressed, to
//! an agent with a node identity; the marker must not be in the capture. The control
//! moves another counter with another marker the same way to an agent without identity
//! (`--insecure-plaintext-channels`): its capture must hold the marker, so a capture
//! that missed the traffic (or a marker that never crossed) fails the test instead of
//! passing it.
//!
//! Loopback carries other tests' traffic too; each capture is searched for its own
//! marker only, and a capture the kernel dropped packets of fails the test.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use away_e2e::{counter_state, require, require_root, require_socket, wait_for, Counter, LocalAgent, Node};
use serde_json::Value;

fn ready() -> bool {
    require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require(Path::new("/usr/bin/tcpdump").exists() || which("tcpdump"), "tcpdump (deploy/install.sh)")
}

fn which(bin: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success())
}

fn root(test: &str) -> PathBuf {
    PathBuf::from(format!("/tmp/away-e2e-capture/{test}-{}", std::process::id()))
}

/// A random marker no other traffic carries.
fn marker(what: &str) -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut bytes).unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("away-marker-{what}-{hex}")
}

/// A running `tcpdump` writing every TCP packet on loopback to a file.
struct Capture {
    child: Child,
    file: PathBuf,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Capture {
    fn start(file: PathBuf) -> Capture {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&file);
        // -U: each packet written as it comes; -B: a 128 MiB kernel buffer (a VM's
        // stream is fast on loopback); -Z root: no privilege drop (the file's directory
        // is root's)
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-B", "131072", "-Z", "root", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let (tx, rx) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let listening = rx.recv_timeout(std::time::Duration::from_secs(20)).unwrap_or_default();
        assert!(listening.contains("listening on lo"), "tcpdump did not start: {listening}");
        Capture { child, file, stderr: rx }
    }

    /// Stop (SIGINT: tcpdump flushes and reports its counts) and read the capture.
    fn stop(mut self) -> Vec<u8> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let _ = self.child.wait();
        let report: Vec<String> = self.stderr.try_iter().collect();
        eprintln!("tcpdump: {}", report.join(" | "));
        let dropped = report.iter().find(|l| l.contains("dropped by kernel")).cloned().unwrap_or_default();
        assert!(dropped.starts_with("0 "), "the capture is incomplete: {report:?}");
        let bytes = std::fs::read(&self.file).unwrap();
        let _ = std::fs::remove_file(&self.file);
        bytes
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The two targets: an agent with a node identity (mutual TLS, QEMU's TLS) and one
/// without (plaintext by flag), and the source's identity for `away migrate`.
struct Targets {
    secure: LocalAgent,
    plain: LocalAgent,
    secure_name: String,
    source_name: String,
    source_identity: PathBuf,
}

fn targets(test: &str) -> Targets {
    let root = root(test);
    let _ = std::fs::remove_dir_all(&root);
    let pid = std::process::id();
    let ca = away_identity::Ca::load_or_create(&root.join("ca")).unwrap();
    let (source_name, secure_name) = (format!("cap-src-{test}-{pid}"), format!("cap-dst-{test}-{pid}"));
    let source_identity = root.join("source-identity");
    ca.issue_self(&source_name, &[]).unwrap().save(&source_identity).unwrap();
    let secure = Node::at(format!("away-cap-{test}-dst-{pid}"), root.join("secure"));
    ca.issue_self(&secure_name, &[]).unwrap().save(&secure.state.join("identity")).unwrap();
    let secure = secure.start_agent(&secure_name, &[], &[("AWAY_LOG", "info")], &root.join("secure.log"));
    let plain = Node::at(format!("away-cap-{test}-plain-{pid}"), root.join("plain"));
    let plain = plain.start_agent(&format!("cap-plain-{test}-{pid}"), &[], &[], &root.join("plain.log"));
    Targets { secure, plain, secure_name, source_name, source_identity }
}

/// Move `w` to `to` (with `tls`: the source's identity) uncompressed, under a capture;
/// the captured bytes.
fn move_captured(t: &Targets, w: &Counter, to: &LocalAgent, tls: bool, extra: &[&str], file: &str) -> Vec<u8> {
    let identity = t.source_identity.to_str().unwrap();
    let mut args = vec!["migrate", &w.name, "--to", &to.api, "--json", "--compression", "none"];
    if tls {
        args.extend(["--to-node", &t.secure_name, "--identity", identity, "--source-name", &t.source_name]);
    }
    args.extend_from_slice(extra);
    let capture = Capture::start(root("captures").join(file));
    let t0 = std::time::Instant::now();
    let (ok, out, err) = w.source.away(&args);
    let took = t0.elapsed();
    let bytes = capture.stop();
    assert!(ok, "migrate ({}) failed: {err}", if tls { "tls" } else { "plaintext" });
    let report: Value = serde_json::from_str(&out).unwrap();
    eprintln!("moved in {:.1} s ({} bytes captured): {}", took.as_secs_f64(), bytes.len(), report["reason"]);
    assert!(report["ok"].as_bool().unwrap_or(false), "{report}");
    bytes
}

fn source(test: &str) -> Node {
    Node::at(format!("away-cap-{test}-src-{}", std::process::id()), root(test).join("source"))
}

/// The counter with `marker` in its environment, started on `source`.
fn counter_with<'a>(source: &'a Node, target: &'a Node, name: String, runtime: &str, marker: &str) -> Counter<'a> {
    // start_counter's options, plus the marker
    let t0 = std::time::Instant::now();
    let w = source.start_counter_with(target, name, runtime, &["-e", &format!("MARKER={marker}")]);
    assert!(wait_for(120, || counter_state(w.port)).is_some(), "the counter does not answer");
    eprintln!("{} ({runtime}) answers {:.1} s after away run", w.name, t0.elapsed().as_secs_f64());
    w
}

/// Move a counter on `runtime` to the agent with an identity and check its marker is
/// not in the capture (which holds at least `min_bytes`), then the control: another
/// counter to the plaintext agent, whose marker is in its capture.
fn no_marker_on_the_link(test: &str, runtime: &str, min_bytes: usize) {
    let t0 = std::time::Instant::now();
    let t = targets(test);
    eprintln!("agents up in {:.1} s", t0.elapsed().as_secs_f64());
    let src = source(test);
    let pid = std::process::id();
    // a container moves stop-and-copy (no page relay to wait for); a VM's guest port is
    // forwarded by QEMU on this host, so the target's is another one
    let extra = |w: &Counter| match runtime {
        "qemu" => vec!["--target-port".to_string(), format!("{}:{}", w.port, w.target_port)],
        _ => vec!["--mode".to_string(), "stop-copy".to_string()],
    };
    for (tls, to, kind) in [(true, &t.secure, "tls"), (false, &t.plain, "plain")] {
        let secret = marker(&format!("{test}-{kind}"));
        let w = counter_with(&src, &to.node, format!("cap-{test}-{kind}-{pid}"), runtime, &secret);
        let extra = extra(&w);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let captured = move_captured(&t, &w, to, tls, &extra, &format!("{test}-{kind}.pcap"));
        assert!(captured.len() > min_bytes, "the capture missed the move: {} bytes", captured.len());
        let found = contains(&captured, secret.as_bytes());
        if tls {
            assert!(!found, "the marker crossed the link in plaintext ({runtime}, node identities)");
        } else {
            // the control: a capture that misses the move (or a marker that does not
            // cross) would let the check above pass by accident
            assert!(found, "the control's marker is not in its plaintext capture ({runtime})");
        }
    }
}

#[test]
fn a_container_move_shows_no_plaintext_on_the_link() {
    if ready() {
        no_marker_on_the_link("ct", "containerd", 100_000);
    }
}

#[test]
fn a_vm_move_shows_no_plaintext_on_the_link() {
    if ready() && require(Path::new("/opt/away-guest/vmlinuz").exists(), "guest kernel (deploy/install.sh)") {
        // the guest's memory: tens of MiB
        no_marker_on_the_link("vm", "qemu", 10 << 20);
    }
}
