//! Shared support for the end-to-end tests in `tests/tests/`.
//!
//! These tests talk to the real daemons (containerd, dockerd), CRIU and QEMU and need
//! root. When a requirement is missing they skip with a message on a developer's
//! machine, but under CI (`CI=true`) they fail loudly: a CI run that skipped the real
//! thing must not look green.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod wan;

/// Workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// True when running under CI, where missing requirements are failures.
/// The bearer token of the standalone agents the tests start, and that their `away
/// migrate` presents (`AWAY_AGENT_TOKEN`): an agent without a credential refuses every
/// call that changes anything. Random per test process, passed by environment only.
pub fn agent_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/uuid").expect("a random uuid").trim().to_string()
    })
}

/// A blocking HTTP client of cluster `info`'s broker: HTTPS trusting only its CA.
pub fn broker_client(info: &away_cluster::ClusterInfo) -> reqwest::blocking::Client {
    broker_client_timeout(info, std::time::Duration::from_secs(30))
}

/// [`broker_client`] whose calls may take up to `timeout`.
pub fn broker_client_timeout(
    info: &away_cluster::ClusterInfo,
    timeout: std::time::Duration,
) -> reqwest::blocking::Client {
    let ca = info.ca_pem().expect("the cluster's ca.pem");
    let tls = away_identity::trusting_client_config(&ca).expect("a CA certificate");
    reqwest::blocking::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .timeout(timeout)
        .build()
        .expect("http client")
}

/// GET `url` on a standalone agent the tests started (plain HTTP, its bearer token).
/// A user's calls to a local cluster's broker over HTTPS (its CA, the user token).
pub struct BrokerApi {
    pub info: away_cluster::ClusterInfo,
    pub http: reqwest::blocking::Client,
}

impl BrokerApi {
    pub fn new(info: &away_cluster::ClusterInfo) -> BrokerApi {
        BrokerApi { info: info.clone(), http: broker_client(info) }
    }
    pub fn get(&self, path: &str) -> Option<serde_json::Value> {
        let r =
            self.http.get(format!("{}{path}", self.info.broker_url)).bearer_auth(&self.info.user_token).send().ok()?;
        r.status().is_success().then(|| r.json().ok()).flatten()
    }
    pub fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.info.broker_url))
            .bearer_auth(&self.info.user_token)
            .json(&body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(serde_json::Value::Null))
    }
    pub fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .delete(format!("{}{path}", self.info.broker_url))
            .bearer_auth(&self.info.user_token)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(serde_json::Value::Null))
    }
    pub fn workload(&self, name: &str) -> Option<serde_json::Value> {
        self.get(&format!("/v1/workloads/{name}"))
    }
    /// The workload's view once the broker has it running on `node` (within 2 min).
    pub fn wait_running_on(&self, name: &str, node: &str) -> serde_json::Value {
        wait_for(120, || self.workload(name).filter(|w| w["state"] == "running" && w["node"] == node))
            .unwrap_or_else(|| panic!("{name} not running on {node}: {:?}", self.workload(name)))
    }
    pub fn node_ip(&self, node: &str) -> String {
        self.info.nodes.iter().find(|n| n.name == node).unwrap().ip.to_string()
    }
}

pub fn agent_get(url: &str) -> Option<reqwest::blocking::Response> {
    away_identity::install_default_provider();
    reqwest::blocking::Client::new().get(url).bearer_auth(agent_token()).send().ok()
}

pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Skip (developer machine) or fail (CI) because `what` is missing.
/// Returns false so callers can write `if !require(...) { return; }`.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("required for this test but missing: {what} (CI=true, so this is a failure, not a skip)");
    }
    eprintln!("SKIP: {what} is missing (set CI=true to make this a failure)");
    false
}

/// Require root (uid 0).
pub fn require_root() -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    require(uid.is_ok_and(|u| u == "0"), "root (uid 0)")
}

/// Require what VMs need on this host: root, QEMU, the guest kernel and its NIC modules
/// (all from deploy/install.sh).
pub fn require_vm_host() -> bool {
    let paths = away_runtime::host::HostPaths::default();
    let modules = paths.guest_kernel.with_file_name("modules").join("kernel/drivers/net/virtio_net.ko");
    require_root()
        && require(paths.qemu.is_file(), &format!("qemu at {} (deploy/install.sh)", paths.qemu.display()))
        && require(
            paths.guest_kernel.exists(),
            &format!("guest kernel at {} (deploy/install.sh)", paths.guest_kernel.display()),
        )
        && require(
            modules.is_file(),
            &format!("guest NIC module {} (deploy/install.sh extracts it)", modules.display()),
        )
}

/// PIDs of live processes (QEMUs) whose command line names a path under `dir`: what a
/// VM test started there, to kill at its end.
pub fn qemu_pids_in(dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&needle)
        })
        .collect()
}

/// Require a unix socket that answers at `path` (e.g. containerd's or dockerd's).
pub fn require_socket(path: &str, daemon: &str) -> bool {
    let ok = std::os::unix::net::UnixStream::connect(path).is_ok();
    require(ok, &format!("{daemon} answering on {path} (start it with deploy/services.sh start)"))
}

/// Path to the `away` binary of this workspace, built once per test process.
/// (Integration tests of another package get no CARGO_BIN_EXE_away, so we build it.)
/// Benchmarks (`AWAY_BENCH_RELEASE=1`, set by them) get the release build: a debug
/// build compresses and hashes ten times slower and would measure the wrong thing.
///
/// The debug build is built with `--features fault-injection`: the tests drive failures
/// through the `AWAY_FAULT_*` variables, which a default build ignores. (The release build
/// is what users run, without it: the same command as deploy/install-node.sh's, so the
/// lab and the node install share one artifact.) The feature is asked for
/// here, on this one command line, and deliberately not in this crate's Cargo.toml: a
/// dependency with the feature would unify it into every workspace build (the `away`
/// that `cargo test --workspace` links for crates/away's tests, CI's clippy), and
/// crates/away's `fault_injection_only_when_asked_for` test would fail. Cargo keeps the
/// two builds apart (features change the artifacts' hashes), so a `cargo test
/// --workspace` compiles each of away-migrate, away-agent and away once per feature
/// set and afterwards only relinks target/debug/away: no rebuild back and forth.
///
/// `AWAY_BENCH_BIN=PATH` measures that binary instead of building one (a benchmark of a
/// build kept aside, e.g. before and after a change).
pub fn away_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("AWAY_BENCH_BIN") {
            return PathBuf::from(bin);
        }
        let root = workspace_root();
        let release = std::env::var_os("AWAY_BENCH_RELEASE").is_some();
        let mut args = vec!["build", "--quiet", "-p", "away", "--bin", "away"];
        args.extend(if release { ["--release"].as_slice() } else { ["--features", "fault-injection"].as_slice() });
        let status =
            Command::new(env!("CARGO")).args(&args).current_dir(&root).status().expect("run cargo build -p away");
        assert!(status.success(), "cargo build -p away failed");
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        target.join(if release { "release" } else { "debug" }).join("away")
    })
}

/// `len` pseudo-random bytes from `seed` (xorshift: incompressible, reproducible, no
/// rand dependency).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Run `away ARGS...` and return its output (does not check the exit code).
pub fn away(args: &[&str]) -> Output {
    Command::new(away_bin()).args(args).output().expect("run away")
}

/// Run `away ARGS...`, assert success, and parse stdout as JSON.
pub fn away_json(args: &[&str]) -> serde_json::Value {
    let out = away(args);
    assert!(
        out.status.success(),
        "away {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("away {args:?}: stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
    })
}

/// Image tar of a lab app (`images/<app>`), built once per test process with
/// `away image build` into `target/away-e2e-images/`.
pub fn lab_image(app: &str) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let out = workspace_root().join("target").join("away-e2e-images");
    let tar = out.join(format!("{app}.tar"));
    let built = away(&[
        "image",
        "build",
        workspace_root().join("images").join(app).to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(built.status.success(), "away image build images/{app} failed: {}", String::from_utf8_lossy(&built.stderr));
    assert!(tar.is_file(), "away image build did not write {}", tar.display());
    tar
}

/// An image of a real server from this host's Debian packages, packed by `away image
/// build`: `binary` (a link is copied as the file it names, under `binary`'s own name)
/// and the libraries `ldd` names for it, the `files` given (path in the image, text),
/// the empty `dirs`, and `entrypoint`; tagged `tag`, written to `out` (a directory).
/// Returns the image tar.
pub fn host_binary_image(
    binary: &Path,
    files: &[(&str, String)],
    dirs: &[&str],
    entrypoint: &[&str],
    tag: &str,
    out: &Path,
) -> PathBuf {
    let ctx = out.join("context");
    let root = ctx.join("rootfs");
    let put = |dest: &Path, src: &Path| {
        let to = root.join(dest.strip_prefix("/").unwrap_or(dest));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src, &to).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), to.display()));
    };
    put(binary, binary);
    let ldd = Command::new("ldd").arg(binary).output().expect("run ldd");
    assert!(ldd.status.success(), "ldd {} failed", binary.display());
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        if let Some(lib) = line.split_whitespace().find(|w| w.starts_with('/')) {
            put(Path::new(lib), Path::new(lib));
        }
    }
    for dir in dirs {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for (dest, text) in files {
        let to = root.join(dest);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, text).unwrap();
    }
    let entry = serde_json::to_string(entrypoint).expect("strings serialize");
    std::fs::write(ctx.join("Containerfile"), format!("FROM scratch\nCOPY rootfs/ /\nENTRYPOINT {entry}\n")).unwrap();
    let built = away(&["image", "build", ctx.to_str().unwrap(), "-t", tag, "-o", out.to_str().unwrap()]);
    assert!(built.status.success(), "away image build failed: {}", String::from_utf8_lossy(&built.stderr));
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tar"))
        .expect("away image build wrote a tar")
}

/// Debian's nginx ([`host_binary_image`]) answering `nginx answers` on `port`, its
/// configuration's main section beginning with `main` (who runs the workers, how many),
/// temp directories under /tmp, passwd/group files for root and nobody.
pub fn nginx_image(main: &str, port: u16, tag: &str, out: &Path) -> PathBuf {
    const NGINX: &str = "/usr/sbin/nginx";
    let conf = format!(
        "{main}pid /run/nginx.pid;\nerror_log stderr notice;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  default_type text/plain;\n\
         client_body_temp_path /tmp/body;\n  proxy_temp_path /tmp/proxy;\n  fastcgi_temp_path /tmp/fastcgi;\n\
         uwsgi_temp_path /tmp/uwsgi;\n  scgi_temp_path /tmp/scgi;\n\
         server {{\n    listen {port};\n    location / {{ return 200 \"nginx answers\\n\"; }}\n  }}\n}}\n"
    );
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n".to_string(),
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n".to_string()),
        ("etc/nginx/nginx.conf", conf),
    ];
    host_binary_image(
        Path::new(NGINX),
        &files,
        &["tmp", "run", "var/log/nginx", "var/lib/nginx"],
        &[NGINX, "-g", "daemon off;"],
        tag,
        out,
    )
}

/// A name for a local cluster, `PREFIX` and digits, whose subnet (10.213.K.0/24) no
/// interface of this host uses right now (other tests' clusters).
pub fn free_cluster_name(prefix: &str) -> String {
    let out = Command::new("ip").args(["-o", "-4", "addr"]).output().expect("run ip addr");
    let addrs = String::from_utf8_lossy(&out.stdout).to_string();
    (0..50)
        .map(|i| format!("{prefix}{}", (std::process::id() + i) % 100_000))
        .find(|n| !addrs.contains(&format!("10.213.{}.", away_cluster::gateway(n).octets()[2])))
        .expect("a cluster subnet no interface uses")
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    away_runtime::host::free_loopback_port().expect("bind 127.0.0.1:0")
}

/// `GET path` on 127.0.0.1:port; the body on a 200, None otherwise (or on no answer).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_at(std::net::Ipv4Addr::LOCALHOST.into(), port, path)
}

/// POST `body` (JSON) to `path` at `addr` (`host:port`) with the standalone agents' token
/// ([`agent_token`]): the status and the body.
pub fn http_post_json(addr: &str, path: &str, body: &serde_json::Value) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).ok()?;
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        agent_token(),
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Announce move `transfer_id` of `workload` from node `source` to the agent whose API is
/// at `api` (`POST /v1/transfers`, as a migration source does): the move's secret.
pub fn announce(api: &str, transfer_id: &str, workload: &str, source: &str) -> String {
    let body = serde_json::json!({"transfer_id": transfer_id, "workload": workload, "source": source});
    let (status, answer) = http_post_json(api, "/v1/transfers", &body).expect("the agent's API answers");
    assert_eq!(status, 200, "announce {transfer_id}: {answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).expect("a JSON answer");
    v["secret"].as_str().expect("a secret in the answer").to_string()
}

/// The body of a 200 answer to GET `path` at `ip:port` (e.g. a node's own namespace).
pub fn http_get_at(ip: std::net::IpAddr, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::new(ip, port);
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Poll `f` every 250 ms until it returns Some or `secs` pass.
pub fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// The docker CLI of the active runtime profile (docs/runtimes.md), so that a test talks
/// to dockerd with the CLI that came with it.
pub fn docker_cli() -> PathBuf {
    away_runtime::host::runtime_bin("docker")
}

/// One away node of a test on this host: its containerd namespace, state and run dirs
/// (`away` run with them as `AWAY_NAMESPACE`, `AWAY_STATE_DIR`, `AWAY_RUN_DIR`).
pub struct Node {
    pub ns: String,
    pub state: PathBuf,
    pub run: PathBuf,
}

impl Node {
    /// Namespace `ns`, state in `dir/state`, run files in `dir/run`.
    pub fn at(ns: String, dir: PathBuf) -> Node {
        Node { ns, state: dir.join("state"), run: dir.join("run") }
    }

    /// `away ARGS` as this node.
    pub fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(away_bin());
        c.args(args)
            .env("AWAY_AGENT_TOKEN", agent_token())
            .env("AWAY_NAMESPACE", &self.ns)
            .env("AWAY_STATE_DIR", &self.state)
            .env("AWAY_RUN_DIR", &self.run);
        c
    }

    /// (success, stdout, stderr) of `away ARGS` as this node.
    pub fn away(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.cmd(args).output().expect("run away");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// Its workloads, as `away ps --json` lists them.
    pub fn ps(&self) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.away(&["ps", "--json"]);
        assert!(ok, "ps failed: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["workloads"].as_array().unwrap().clone()
    }

    /// Whether workload `name` runs on it.
    pub fn running(&self, name: &str) -> bool {
        self.ps().iter().any(|w| w["name"] == name && w["state"] == "running")
    }
}

/// A cluster of `nodes` (name, tier) on this host running this workspace's `away`, with
/// the lab `images` (by app name) in every node's store.
pub fn cluster_plan(name: &str, nodes: &[(&str, away_model::Tier)], images: &[&str]) -> away_cluster::ClusterPlan {
    away_cluster::ClusterPlan {
        name: name.into(),
        nodes: nodes.iter().map(|(n, tier)| away_cluster::NodePlan { name: (*n).into(), tier: *tier }).collect(),
        away: away_bin().to_path_buf(),
        images: images.iter().map(|app| lab_image(app)).collect(),
        overlay: None,
    }
}

/// The counter lab app (images/counter) started with `away run` on a source node, and
/// removed on the source and the target when dropped: what the migration tests move.
pub struct Counter<'a> {
    pub name: String,
    /// The port it answers on (published 1:1 on the node).
    pub port: u16,
    /// The port it answers on once moved to the target: `port` for a container; a VM's
    /// (QEMU forwards the host port itself, so both ends of a move on one host need their
    /// own) is another free port, for `away migrate --target-port PORT:TARGET_PORT`.
    pub target_port: u16,
    pub source: &'a Node,
    pub target: &'a Node,
}

impl Drop for Counter<'_> {
    fn drop(&mut self) {
        let _ = self.source.away(&["rm", "--force", &self.name]);
        let _ = self.target.away(&["rm", "--force", &self.name]);
    }
}

impl Node {
    /// The counter named `name` on this node's `runtime` (`qemu`: a VM of 128 MiB), on a
    /// free port, removed here and on `target` when dropped.
    pub fn start_counter<'a>(&'a self, target: &'a Node, name: String, runtime: &str) -> Counter<'a> {
        self.start_counter_with(target, name, runtime, &[])
    }

    /// [`Node::start_counter`] with `extra` arguments of `away run` (e.g. `-e K=V`).
    pub fn start_counter_with<'a>(
        &'a self,
        target: &'a Node,
        name: String,
        runtime: &str,
        extra: &[&str],
    ) -> Counter<'a> {
        std::fs::create_dir_all(&self.state).unwrap();
        let tar = lab_image("counter");
        let port = free_port();
        let vm = runtime == "qemu";
        let target_port = if vm { free_port() } else { port };
        let memory: &[&str] = if vm { &["--memory", "128Mi"] } else { &[] };
        let (ok, _, err) = self.away(
            &[
                "run",
                tar.to_str().unwrap(),
                "--name",
                &name,
                "--runtime",
                runtime,
                "-e",
                &format!("COUNTER_PORT={port}"),
                "-p",
                // (the app listens on the port it was told: PORT alone would go to the image's 8080)
                &format!("{port}:{port}"),
            ]
            .into_iter()
            .chain(memory.iter().copied())
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
        assert!(ok, "run counter on {runtime}: {err}");
        Counter { name, port, target_port, source: self, target }
    }
}

/// Count and start time of the counter answering on `port` of this host.
pub fn counter_state(port: u16) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&http_get(port, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

/// An `away agent` a test started as one of its nodes, on free loopback ports; killed
/// when dropped.
pub struct LocalAgent {
    pub node: Node,
    /// Its API, `127.0.0.1:PORT`.
    pub api: String,
    /// Its transfer port (checkpoints arrive there), `127.0.0.1:PORT`.
    pub transfer: String,
    child: std::process::Child,
}

impl Node {
    /// `away agent --name NAME` as this node on free loopback ports (API and transfers),
    /// with `extra` arguments and `env`, its stderr in `log`; returns once its API listens.
    pub fn start_agent(self, name: &str, extra: &[&str], env: &[(&str, &str)], log: &Path) -> LocalAgent {
        let (api, transfer) = (free_port(), free_port());
        let (listen, transfer) = (format!("127.0.0.1:{api}"), format!("127.0.0.1:{transfer}"));
        let mut args = vec!["agent", "--name", name, "--listen", &listen, "--transfer-listen", &transfer];
        // a node without an identity takes part in migrations only in plaintext, by flag
        // (one with an identity in its state directory is mutual TLS whatever it says)
        args.push("--insecure-plaintext-channels");
        args.extend_from_slice(extra);
        let mut cmd = self.cmd(&args);
        cmd.envs(env.iter().copied());
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        let log = std::fs::File::create(log).unwrap();
        let child = cmd.stdout(std::process::Stdio::null()).stderr(log).spawn().expect("start away agent");
        let up = wait_for(30, || std::net::TcpStream::connect(&listen).ok());
        let mut agent = LocalAgent { node: self, api: listen, transfer: transfer.clone(), child };
        if up.is_none() {
            let _ = agent.child.kill();
            panic!("agent did not listen on {}", agent.api);
        }
        agent
    }
}

impl LocalAgent {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cluster `NAME` taken down (`away_cluster::down`) when dropped.
pub struct ClusterDown(pub String);

impl Drop for ClusterDown {
    fn drop(&mut self) {
        away_cluster::down(&self.0);
    }
}

/// `METHOD path` on cluster `info`'s broker with its user token: (status, JSON body);
/// (0, null) when the broker does not answer (it may be down in a test).
pub fn broker_call(
    info: &away_cluster::ClusterInfo,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let http = broker_client(info);
    let mut req = http.request(method, format!("{}{path}", info.broker_url)).bearer_auth(&info.user_token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send() {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().unwrap_or(serde_json::Value::Null))
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

/// Count and start time of the counter a cluster node runs (on its address, port 18090).
pub fn cluster_counter_state(ip: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&http_get_at(ip.parse().ok()?, 18090, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

/// Workload `name`'s state on cluster node `node` as its own runtime reports it (None:
/// not there).
pub fn on_cluster_node(info: &away_cluster::ClusterInfo, node: &str, name: &str) -> Option<String> {
    let n = info.nodes.iter().find(|n| n.name == node)?;
    let out = Command::new(away_bin()).envs(n.env()).args(["ps", "--json"]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    v["workloads"].as_array()?.iter().find(|w| w["name"] == name).map(|w| w["state"].as_str().unwrap_or("").to_string())
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub std::process::Child);

/// A real `away broker` over HTTPS with its own CA (in `dir/broker/`), on a free loopback
/// port, heartbeats every 0.5 s, the given join and user tokens (by environment), its log
/// in `dir/broker.log`; killed when dropped.
pub struct HttpsBroker {
    _child: KillOnDrop,
    pub port: u16,
    /// `https://127.0.0.1:PORT`
    pub url: String,
    pub db: PathBuf,
    /// Its CA certificate (`ca.pem` beside the database) and that file's text.
    pub ca_path: PathBuf,
    pub ca_pem: String,
}

impl HttpsBroker {
    /// Started, and its CA written (the test fails when it is not within 30 s).
    pub fn start(dir: &Path, join_token: &str, user_token: &str) -> HttpsBroker {
        let db = dir.join("broker/broker.db");
        let port = free_port();
        let child = KillOnDrop(
            std::process::Command::new(away_bin())
                .args(["broker", "--listen", &format!("127.0.0.1:{port}"), "--heartbeat-interval", "0.5"])
                .arg("--db")
                .arg(&db)
                .env("AWAY_JOIN_TOKEN", join_token)
                .env("AWAY_USER_TOKEN", user_token)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(dir.join("broker.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        let ca_path = db.with_file_name("ca.pem");
        assert!(wait_for(30, || ca_path.is_file().then_some(())).is_some(), "the broker writes ca.pem");
        let ca_pem = std::fs::read_to_string(&ca_path).unwrap();
        HttpsBroker { _child: child, port, url: format!("https://127.0.0.1:{port}"), db, ca_path, ca_pem }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A file's permission bits (`0o600`), panicking with its path when it is missing.
pub fn file_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

/// The chain of a failed request as one line (a TLS alert is at its end).
pub fn request_error_chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

/// A made-up node's fingerprint (`NodeInfo` as JSON), for hand-made registrations and
/// heartbeats.
pub fn fake_node_info(name: &str) -> serde_json::Value {
    serde_json::json!({"name": name, "tier": "edge", "arch": "amd64", "memory_bytes": 17_179_869_184u64,
        "kernel": "6.1.0", "cpu": {"vendor": "amd", "model": "fake", "cores": 8, "flags": ["sse4_2"]},
        "runtimes": [{"kind": "containerd", "version": "2.0", "healthy": true, "checkpoint": true}],
        "link": {"rate_mbit": 1000, "latency_ms": 1}})
}

/// A two-node local cluster (`a` cloud, `b` edge: a real broker and agents, each node in
/// its own network namespace with its own containerd) with the counter placed by the
/// broker and counting: what the broker-migration fault tests (`source_crash.rs`,
/// `cancel_move.rs`, `link_faults.rs`) share. Taken down when dropped. The agents
/// inherit this process's environment when it comes up (`AWAY_FAULT_*`).
pub struct CounterCluster {
    pub name: String,
    pub info: away_cluster::ClusterInfo,
    /// The node the broker placed the counter on (the moves' source), and the other.
    pub src: String,
    pub dst: String,
    /// The counter's count and start time on the source once it counted to 5.
    pub before: (u64, u64),
    /// Where this cluster's part of each node's agent log begins (a later cluster of the
    /// same name appends to the same files).
    log_from: Vec<(String, usize)>,
    _down: ClusterDown,
}

impl CounterCluster {
    /// Up as `PREFIX` and digits, both agents online, the counter placed and counting.
    pub fn up(prefix: &str) -> CounterCluster {
        Self::up_with(prefix, false)
    }

    /// [`CounterCluster::up`] with the counter as a VM (128 MiB, TCG; its port 18090
    /// forwarded by QEMU on the node's address).
    pub fn up_vm(prefix: &str) -> CounterCluster {
        Self::up_with(prefix, true)
    }

    fn up_with(prefix: &str, vm: bool) -> CounterCluster {
        let name = free_cluster_name(prefix);
        let log_from = ["a", "b"]
            .map(|n| {
                let log = Path::new("/run/away/cluster").join(&name).join(n).join("agent.log");
                (n.to_string(), std::fs::metadata(log).map_or(0, |m| m.len() as usize))
            })
            .to_vec();
        let plan = cluster_plan(&name, &[("a", away_model::Tier::Cloud), ("b", away_model::Tier::Edge)], &["counter"]);
        let info = away_cluster::up(&plan).expect("cluster up");
        let down = ClusterDown(name.clone());
        wait_for(30, || {
            let (_, nodes) = broker_call(&info, reqwest::Method::GET, "/v1/nodes", None);
            nodes.as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "online").count() == 2).then_some(())
        })
        .expect("both agents online");
        let spec = if vm {
            serde_json::json!({"name": "counter", "image": "away/counter:latest", "kind": "vm",
                "env": {"COUNTER_PORT": "18090"}, "ports": [{"container": 18090}],
                "resources": {"memory": "128Mi", "cpus": 1.0}, "placement": {"tiers": ["cloud", "edge"]}})
        } else {
            serde_json::json!({"name": "counter", "image": "away/counter:latest",
                "env": {"COUNTER_PORT": "18090"}, "resources": {"memory": "64Mi", "cpus": 0.25},
                "placement": {"tiers": ["cloud", "edge"]}})
        };
        let (s, placed) = broker_call(&info, reqwest::Method::POST, "/v1/workloads", Some(spec));
        assert_eq!(s, 201, "{placed}");
        // the scores pick the source; the other node is the target
        let src = placed["workload"]["node"].as_str().unwrap().to_string();
        let dst = if src == "a" { "b" } else { "a" }.to_string();
        let mut c = CounterCluster { name, info, src, dst, before: (0, 0), log_from, _down: down };
        let ip = c.ip(&c.src);
        // a VM boots first (TCG)
        let boot = if vm { 180 } else { 90 };
        c.before = wait_for(boot, || cluster_counter_state(&ip).filter(|s| s.0 >= 5)).expect("the counter counts");
        c
    }

    /// Node `node`'s address.
    pub fn ip(&self, node: &str) -> String {
        self.node(node).ip.to_string()
    }

    pub fn node(&self, node: &str) -> &away_cluster::NodeInfoLocal {
        self.info.nodes.iter().find(|n| n.name == node).unwrap()
    }

    /// Node `node`'s agent log, this cluster's part (restarts of the agent included).
    pub fn agent_log(&self, node: &str) -> String {
        let log = Path::new("/run/away/cluster").join(&self.name).join(node).join("agent.log");
        let text = std::fs::read(log).unwrap_or_default();
        let from = self.log_from.iter().find(|(n, _)| n == node).map_or(0, |(_, at)| *at);
        String::from_utf8_lossy(text.get(from..).unwrap_or_default()).into_owned()
    }

    /// Ask the broker to move the counter to the other node in `mode` (`vm`: a VM's move,
    /// which names none; `extra` fields added to the order, e.g. `deadline_s`): the
    /// migration's id.
    pub fn migrate(&self, mode: &str, extra: serde_json::Value) -> String {
        let mut order = serde_json::json!({"workload": "counter", "to": self.dst, "mode": mode});
        if mode == "vm" {
            order.as_object_mut().expect("an object").remove("mode");
        }
        if let (Some(o), Some(x)) = (order.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        let (s, m) = broker_call(&self.info, reqwest::Method::POST, "/v1/migrations", Some(order));
        assert_eq!(s, 202, "{m}");
        m["migration"]["id"].as_str().unwrap().to_string()
    }

    /// Migration `id` once it ended (neither pending nor running), within `secs`.
    pub fn ended(&self, id: &str, secs: u64) -> serde_json::Value {
        wait_for(secs, || {
            let (_, m) = broker_call(&self.info, reqwest::Method::GET, &format!("/v1/migrations/{id}"), None);
            (m["state"].as_str().is_some_and(|s| s != "running" && s != "pending")).then_some(m)
        })
        .unwrap_or_else(|| panic!("migration {id} did not end within {secs} s"))
    }

    /// After a fault and its recovery: exactly one instance of the counter, on `home`,
    /// the same process counting on from [`CounterCluster::before`]; none on the other
    /// node; the broker placing it on `home`; no active checkpoint on the source and no
    /// transfer spool (when `home` is the source, the move failed: its checkpoint kept as
    /// failed on the source and a failed restore's spool on the target are kept for
    /// inspection, as designed). Returns the count reached.
    pub fn assert_one_instance_on(&self, home: &str) -> u64 {
        let other = if home == self.src { &self.dst } else { &self.src };
        let after = wait_for(30, || cluster_counter_state(&self.ip(home))).expect("the counter answers where it lives");
        assert_eq!(after.1, self.before.1, "the counter restarted instead of going on");
        assert!(after.0 >= self.before.0, "count went back: {} -> {}", self.before.0, after.0);
        wait_for(30, || (on_cluster_node(&self.info, other, "counter").is_none()).then_some(()))
            .unwrap_or_else(|| panic!("{other} keeps a copy: {:?}", on_cluster_node(&self.info, other, "counter")));
        assert_eq!(on_cluster_node(&self.info, home, "counter").as_deref(), Some("running"));
        let placed = wait_for(30, || {
            let (_, w) = broker_call(&self.info, reqwest::Method::GET, "/v1/workloads/counter", None);
            (w["node"].as_str() == Some(home)).then_some(())
        });
        assert!(placed.is_some(), "the broker does not place the counter on {home}");
        let entries = |dir: PathBuf| -> Vec<PathBuf> {
            std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
        };
        let ck = self.node(&self.src).state_dir.join("checkpoints");
        let active = entries(ck.join("active"));
        assert!(active.is_empty(), "the source keeps an active checkpoint: {active:?}");
        if home != self.src {
            let failed = entries(ck.join("failed"));
            assert!(failed.is_empty(), "the source kept its checkpoint after the move: {failed:?}");
        }
        // spools go once their restore ended well; a failed restore's stays for inspection
        // until the transfer expires (`--transfer-expiry`, docs/reliability.md), as a
        // failed move's checkpoint stays on the source
        let spools: &[&String] = if home == self.src { &[&self.src] } else { &[&self.src, &self.dst] };
        for n in spools.iter().copied() {
            let spool = wait_for(15, || entries(self.node(n).state_dir.join("transfers")).is_empty().then_some(()));
            assert!(spool.is_some(), "{n} kept transfer data: {:?}", entries(self.node(n).state_dir.join("transfers")));
        }
        after.0
    }
}

/// Whether fault-matrix cell `MODE/AT` runs: every cell, unless `AWAY_FAULT_CELL=MODE/AT`
/// names one (a lab run of one cell at a time).
pub fn fault_cell_selected(mode: &str, at: &str) -> bool {
    std::env::var("AWAY_FAULT_CELL").map_or(true, |c| c == format!("{mode}/{at}"))
}

/// A test's clock: prints each step with the seconds since it began.
pub struct Steps(std::time::Instant);

impl Default for Steps {
    fn default() -> Self {
        Steps(std::time::Instant::now())
    }
}

impl Steps {
    pub fn step(&self, what: &str) {
        eprintln!("[{:>5.1} s] {what}", self.secs());
    }

    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// A tmpfs of `size` mounted on `dir` (created), unmounted when dropped: a small disk to
/// fill for the disk-full fault cases.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    /// Bytes still free on it.
    pub fn free(&self) -> u64 {
        let out = Command::new("df").args(["--output=avail", "-B1"]).arg(&self.0).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap()
    }

    /// Fill it up but for `leave` bytes with the file `name` (allocated for real: tmpfs
    /// has no holes to fall back on).
    pub fn fill(&self, name: &str, leave: u64) {
        let fill = self.free().saturating_sub(leave);
        let path = self.0.join(name);
        let ok = Command::new("fallocate").args(["-l", &fill.to_string()]).arg(&path).status();
        assert!(ok.is_ok_and(|s| s.success()), "fallocate {}", path.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
