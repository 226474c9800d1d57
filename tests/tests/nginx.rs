//! A real server that drops privileges: Debian's nginx (a master as root, workers as
//! `nobody`, temp directories chowned at start), packed into an image with `away image
//! build` from the host's binary and the libraries `ldd` names. It must answer on
//! containerd and on Docker, and keep answering after a move between two containerd
//! nodes — what Docker's container contract (capabilities, user lookup) makes work.

use std::path::{Path, PathBuf};
use std::process::Command;

use away_e2e::{free_port, http_get, require, require_root, require_socket, wait_for, LocalAgent, Node};

const NGINX: &str = "/usr/sbin/nginx";

fn ready() -> bool {
    require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require_socket("/run/docker.sock", "dockerd")
        && require(Path::new(NGINX).is_file(), "nginx (Debian's nginx-light, from deploy/install.sh)")
}

/// The image: nginx whose workers run as `nobody` with their temp directories under
/// /tmp (which nginx chowns to them at start).
fn build_image(port: u16, out: &Path) -> PathBuf {
    away_e2e::nginx_image("user nobody nogroup;\nworker_processes 2;\n", port, "away/nginx-e2e:latest", out)
}

/// Removes the workload from the node when the test ends, however it ends.
struct Rm<'a>(&'a Node, String);
impl Drop for Rm<'_> {
    fn drop(&mut self) {
        let _ = self.0.away(&["rm", "--force", &self.1]);
    }
}

/// The target agent, killed (by its PID) when dropped.
fn start_target() -> LocalAgent {
    let log = PathBuf::from(format!("/tmp/away-e2e-nginx/agent-{}.log", std::process::id()));
    node("target").start_agent("target-nginx", &["--commit-lease", "20"], &[], &log)
}

fn answers(port: u16) -> bool {
    wait_for(20, || http_get(port, "/").filter(|b| b == "nginx answers\n")).is_some()
}

/// nginx's processes as `ps` shows them for the workload: the master as root, the
/// workers as nobody (the privilege drop happened).
fn assert_workers_dropped_to_nobody(node: &Node, name: &str, runtime: &str) {
    let (_, logs, _) = node.away(&["logs", name]);
    assert!(!logs.contains("emerg"), "{runtime}: nginx complained: {logs}");
    let ps = Command::new("ps").args(["-eo", "user:20,args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        ps.lines().any(|l| l.starts_with("nobody") && l.contains("nginx: worker process")),
        "{runtime}: no nginx worker runs as nobody"
    );
}

/// CRIU reads and sets the rlimits of every process it dumps; for nginx's workers,
/// which run as another user than CRIU (root), the kernel wants CAP_SYS_RESOURCE.
/// Some sandboxes (this project's build machine among them) withhold it from root.
fn host_has_cap_sys_resource() -> bool {
    away_runtime::host::process::has_capability(away_runtime::host::process::CAP_SYS_RESOURCE)
}

/// Runs nginx from the image on `runtime` as `name` on `node`; removed when dropped.
fn run_nginx<'a>(node: &'a Node, tar: &Path, runtime: &str, port: u16) -> Rm<'a> {
    let name = format!("nginx-{runtime}-{}", std::process::id());
    let rm = Rm(node, name.clone());
    let p = format!("{port}:{port}");
    let (ok, _, err) = node.away(&["run", tar.to_str().unwrap(), "--name", &name, "--runtime", runtime, "-p", &p]);
    assert!(ok, "run nginx on {runtime}: {err}");
    assert!(answers(port), "{runtime}: nginx does not answer on {port}: {}", node.away(&["logs", &name]).1);
    assert_workers_dropped_to_nobody(node, &name, runtime);
    rm
}

#[test]
fn nginx_runs_on_containerd_and_on_docker() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tar = build_image(port, dir.path());
    let node = node("run");
    std::fs::create_dir_all(&node.state).unwrap();
    for runtime in ["docker", "containerd"] {
        drop(run_nginx(&node, &tar, runtime, port));
        // docker-proxy lets the port go asynchronously
        assert!(wait_for(10, || std::net::TcpListener::bind(("0.0.0.0", port)).ok()).is_some());
    }
}

#[test]
fn nginx_moves_between_containerd_nodes() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tar = build_image(port, dir.path());
    let source = node("source");
    std::fs::create_dir_all(&source.state).unwrap();
    let rm = run_nginx(&source, &tar, "containerd", port);
    let name = rm.1.clone();
    // the move: checkpoint (CRIU under the seccomp filter), transfer, restore
    let agent = start_target();
    let _rm_target = Rm(&agent.node, name.clone());
    let (ok, out, err) = source.away(&[
        "migrate",
        &name,
        "--to",
        &agent.api,
        "--json",
        "--source-name",
        "source",
        "--reconnect-timeout",
        "15",
    ]);
    if !host_has_cap_sys_resource() {
        // CRIU cannot read the rlimits of the workers (nobody) here: the move is refused
        // before anything stops, saying why, and nginx goes on serving on the source
        eprintln!("root lacks CAP_SYS_RESOURCE here: the move must be refused up front");
        assert!(!ok, "a move CRIU cannot dump was not refused: {out}");
        assert!(err.contains("CAP_SYS_RESOURCE") && err.contains("uid 65534"), "{err}");
        assert!(source.running(&name), "nginx stopped on the source after a refused move");
        assert!(!agent.node.running(&name), "a refused move left a copy on the target");
        assert!(answers(port), "nginx does not answer after the refused move");
        assert_workers_dropped_to_nobody(&source, &name, "containerd after the refused move");
        return;
    }
    assert!(ok, "migrate nginx failed: {err}\n{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    eprintln!("nginx moved: downtime {} ms, {} bytes on the wire", report["downtime_millis"], report["bytes_wire"]);
    assert!(agent.node.running(&name), "nginx is not running on the target");
    assert!(!source.running(&name), "nginx still runs on the source");
    assert!(answers(port), "nginx does not answer after the move");
    assert_workers_dropped_to_nobody(&agent.node, &name, "containerd after the move");
}

/// Node `role` of the nginx tests.
fn node(role: &str) -> Node {
    let id = format!("{role}-nginx-{}", std::process::id());
    Node::at(format!("away-{id}"), PathBuf::from(format!("/tmp/away-e2e-nginx/{id}")))
}
