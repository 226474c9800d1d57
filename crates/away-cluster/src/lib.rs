//! A whole away cluster on one machine, for tests, examples and `away demo`: a broker
//! and N agents, each agent in its own network namespace with its own containerd
//! (own root, state and socket), the namespaces joined to a host bridge by veth pairs.
//! A migration between two nodes therefore crosses a real (virtual) network between two
//! containerd instances.
//!
//! Layout for cluster `C`, node `N` (index i):
//! * bridge `awb-C`, 10.213.K.1/24 on the host (K from the cluster name); the broker
//!   listens there;
//! * netns `away-C-N`, veth `awh-C-i` (host side, on the bridge) / `eth0` inside with
//!   10.213.K.(10+i)/24 and a default route via the bridge;
//! * containerd at `/run/away/cluster/C/N/containerd.sock`, root and state under
//!   `/var/lib/away/cluster/C/N` and `/run/away/cluster/C/N`;
//! * processes (containerd, agents, broker) with pidfiles and logs in
//!   `/run/away/cluster/C/`; `down` stops only what these pidfiles name.
//!
//! Docker is not part of a node here: one dockerd per namespace would be a second
//! container engine per node for no test that needs it; the host's dockerd stays the
//! host's. Nodes offer containerd and QEMU.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use away_model::Tier;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{cmd}: {message}")]
    Command { cmd: String, message: String },
    #[error("{what} did not come up within {secs} s (log: {log})")]
    Timeout { what: String, secs: u64, log: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid cluster: {0}")]
    Invalid(String),
    #[error("stopped while it was being started")]
    Stopped,
}

/// One node to start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub tier: Tier,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    pub name: String,
    pub nodes: Vec<NodePlan>,
    /// The `away` binary the broker and agents run.
    pub away: PathBuf,
    /// Image tars put into every node's image store (there is no registry).
    pub images: Vec<PathBuf>,
    /// The broker's overlay pool (`away broker --overlay`), e.g. `10.250.0.0/16`: each
    /// node builds the lab networks' VXLAN devices in its namespace, tunnelling over
    /// the cluster's bridge. None: workloads use their node's network.
    pub overlay: Option<String>,
}

/// A running cluster, as `cluster.json` records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub name: String,
    /// `https://<gateway>:7700`
    pub broker_url: String,
    pub user_token: String,
    /// The broker's CA certificate (`ca.pem` in the run directory): clients trust it.
    #[serde(default)]
    pub ca: PathBuf,
    pub nodes: Vec<NodeInfoLocal>,
}

impl ClusterInfo {
    /// The broker's CA certificate, PEM.
    pub fn ca_pem(&self) -> Result<String, ClusterError> {
        std::fs::read_to_string(&self.ca).map_err(io(&self.ca))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfoLocal {
    pub name: String,
    pub tier: Tier,
    pub netns: String,
    /// Host side of the node's veth pair (down = the node is cut off).
    pub host_if: String,
    pub ip: Ipv4Addr,
    pub api: String,
    pub containerd_socket: PathBuf,
    pub namespace: String,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl NodeInfoLocal {
    /// Environment that points `away` commands at this node (`away ps`, `away logs` …).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWAY_NAMESPACE".into(), self.namespace.clone()),
            ("AWAY_STATE_DIR".into(), self.state_dir.display().to_string()),
            ("AWAY_RUN_DIR".into(), self.run_dir.display().to_string()),
            ("AWAY_CONTAINERD_SOCKET".into(), self.containerd_socket.display().to_string()),
            ("AWAY_DOCKER_SOCKET".into(), "/nonexistent/docker.sock".into()),
        ]
    }
}

pub const BROKER_PORT: u16 = 7700;
pub const AGENT_PORT: u16 = 7800;
pub const TRANSFER_PORT: u16 = 7801;

fn run_dir(cluster: &str) -> PathBuf {
    PathBuf::from("/run/away/cluster").join(cluster)
}

fn state_dir(cluster: &str) -> PathBuf {
    PathBuf::from("/var/lib/away/cluster").join(cluster)
}

/// Third octet of the cluster's subnet, stable per name (10.213.K.0/24).
fn subnet(cluster: &str) -> u8 {
    let h = cluster.bytes().fold(17u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    (h % 200) as u8 + 20
}

/// The host's address on cluster `cluster`'s bridge (its broker listens there).
pub fn gateway(cluster: &str) -> Ipv4Addr {
    Ipv4Addr::new(10, 213, subnet(cluster), 1)
}

fn bridge(cluster: &str) -> String {
    // interface names are at most 15 bytes
    format!("awb-{}", &cluster[..cluster.len().min(10)])
}

fn sh(cmd: &str, args: &[&str]) -> Result<String, ClusterError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| ClusterError::Command { cmd: format!("{cmd} {}", args.join(" ")), message: e.to_string() })?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            cmd: format!("{cmd} {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io { path: path.to_path_buf(), source }
}

fn random_token() -> String {
    let mut buf = [0u8; 24];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The command prefix that runs a program in the node's network namespace only.
/// Not `ip netns exec`: it also enters a new mount namespace with /sys remounted, which
/// hides the cgroup mounts runc needs.
fn nsenter(ns: &str) -> Vec<String> {
    vec!["nsenter".into(), format!("--net=/run/netns/{ns}"), "--".into()]
}

/// Start a process detached from the caller, logging to `log`, its PID in `pidfile`.
fn spawn(argv: &[String], log: &Path, pidfile: &Path, env: &[(&str, std::ffi::OsString)]) -> Result<u32, ClusterError> {
    use std::os::unix::process::CommandExt;
    // appended: a process started again (broker, agent) keeps its first run's log
    let out = std::fs::File::options().create(true).append(true).open(log).map_err(io(log))?;
    let err = out.try_clone().map_err(io(log))?;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // its own process group: a Ctrl-C meant for `away demo` reaches the demo, which
        // then stops these in order
        .process_group(0)
        .spawn()
        .map_err(|e| ClusterError::Command { cmd: argv.join(" "), message: e.to_string() })?;
    let pid = child.id();
    std::fs::write(pidfile, pid.to_string()).map_err(io(pidfile))?;
    Ok(pid)
}

/// Err(Stopped) once `stop` is set: the start ends at its next step.
fn go_on(stop: &AtomicBool) -> Result<(), ClusterError> {
    if stop.load(Ordering::SeqCst) {
        return Err(ClusterError::Stopped);
    }
    Ok(())
}

fn wait_until(
    what: &str,
    log: &Path,
    secs: u64,
    stop: &AtomicBool,
    mut ok: impl FnMut() -> bool,
) -> Result<(), ClusterError> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if ok() {
            return Ok(());
        }
        go_on(stop)?;
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(ClusterError::Timeout { what: what.into(), secs, log: log.display().to_string() })
}

fn tcp_answers(addr: &str) -> bool {
    addr.parse().is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// Bring the cluster up; on failure, whatever was started is stopped again.
pub fn up(plan: &ClusterPlan) -> Result<ClusterInfo, ClusterError> {
    up_until(plan, &AtomicBool::new(false))
}

/// [`up`], ending with [`ClusterError::Stopped`] at its next step once `stop` is set (a
/// stop signal came): whatever was started is stopped and removed again.
pub fn up_until(plan: &ClusterPlan, stop: &AtomicBool) -> Result<ClusterInfo, ClusterError> {
    if plan.nodes.is_empty() || plan.nodes.len() > 50 {
        return Err(ClusterError::Invalid(format!("{} nodes: give 1 to 50", plan.nodes.len())));
    }
    if !plan.name.chars().all(|c| c.is_ascii_alphanumeric()) || plan.name.is_empty() || plan.name.len() > 10 {
        return Err(ClusterError::Invalid(format!("name {:?}: 1-10 letters or digits", plan.name)));
    }
    if run_dir(&plan.name).join("cluster.json").exists() {
        return Err(ClusterError::Invalid(format!(
            "cluster {} is already up (away cluster down {} first)",
            plan.name, plan.name
        )));
    }
    if run_dir(&plan.name).exists() {
        // a start that was killed before it finished (SIGKILL): its pidfiles name what it
        // started, which goes before this start makes the same again
        tracing::warn!(cluster = %plan.name, "removing what an unfinished start of this cluster left");
        down(&plan.name);
    }
    let result = up_inner(plan, stop);
    if result.is_err() {
        down(&plan.name);
    }
    result
}

fn up_inner(plan: &ClusterPlan, stop: &AtomicBool) -> Result<ClusterInfo, ClusterError> {
    let c = &plan.name;
    let (run, state) = (run_dir(c), state_dir(c));
    std::fs::create_dir_all(&run).map_err(io(&run))?;
    // the cluster's tokens are kept here: root's alone
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).map_err(io(&run))?;
    std::fs::create_dir_all(&state).map_err(io(&state))?;
    let k = subnet(c);
    let br = bridge(c);
    let gw = Ipv4Addr::new(10, 213, k, 1);
    std::fs::write(run.join("bridge"), &br).map_err(io(&run))?;
    sh("ip", &["link", "add", &br, "type", "bridge"])?;
    sh("ip", &["addr", "add", &format!("{gw}/24"), "dev", &br])?;
    sh("ip", &["link", "set", &br, "up"])?;
    // dockerd sets FORWARD's policy to DROP and br_netfilter sends bridged frames
    // through it: let the cluster's own traffic pass (removed again by `down`)
    sh(
        "iptables",
        &[
            "-I",
            "FORWARD",
            "-i",
            &br,
            "-o",
            &br,
            "-j",
            "ACCEPT",
            "-m",
            "comment",
            "--comment",
            &format!("away cluster {c}"),
        ],
    )?;

    let join = random_token();
    let user = random_token();
    let broker_addr = format!("{gw}:{BROKER_PORT}");
    let broker_log = run.join("broker.log");
    let mut argv: Vec<String> =
        vec![plan.away.display().to_string(), "broker".into(), "--listen".into(), broker_addr.clone()];
    argv.extend(["--db".into(), state.join("broker.db").display().to_string()]);
    if let Some(pool) = &plan.overlay {
        argv.extend(["--overlay".into(), pool.clone()]);
    }
    // the tokens go by environment, never on a command line (`ps` shows those to everyone)
    write_secret(&run.join("join-token"), &join)?;
    write_secret(&run.join("user-token"), &user)?;
    std::fs::write(run.join("broker.argv"), serde_json::to_vec(&argv).expect("argv")).map_err(io(&run))?;
    spawn(&argv, &broker_log, &run.join("broker.pid"), &broker_env(&run)?)?;
    wait_until("broker", &broker_log, 30, stop, || tcp_answers(&broker_addr))?;
    // the broker wrote its CA certificate next to its database before it listened
    let ca = run.join("ca.pem");
    std::fs::copy(state.join("ca.pem"), &ca).map_err(io(&ca))?;

    let mut nodes = Vec::new();
    for (i, n) in plan.nodes.iter().enumerate() {
        if !n.name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-') {
            return Err(ClusterError::Invalid(format!("node name {:?}: lower-case letters, digits, '-'", n.name)));
        }
        go_on(stop)?;
        let joining = Joining { br: &br, gw, broker: &broker_addr, join: &join };
        nodes.push(node_up(plan, i, n, &joining, stop)?);
    }
    let info =
        ClusterInfo { name: c.clone(), broker_url: format!("https://{broker_addr}"), user_token: user, ca, nodes };
    save(&info)?;
    Ok(info)
}

fn save(info: &ClusterInfo) -> Result<(), ClusterError> {
    let run = run_dir(&info.name);
    let json = serde_json::to_string_pretty(info).expect("cluster info");
    // it holds the user token
    write_secret(&run.join("cluster.json"), &json)
}

/// A file only root reads (0600 from its creation, not chmod-ed after).
fn write_secret(path: &Path, text: &str) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

/// The broker's tokens, for its environment.
fn broker_env(run: &Path) -> Result<Vec<(&'static str, std::ffi::OsString)>, ClusterError> {
    let read = |name: &str| std::fs::read_to_string(run.join(name)).map_err(io(&run.join(name)));
    Ok(vec![("AWAY_JOIN_TOKEN", read("join-token")?.into()), ("AWAY_USER_TOKEN", read("user-token")?.into())])
}

/// Add a node to a running cluster (a student's laptop coming online).
pub fn add_node(plan: &ClusterPlan, node: &NodePlan) -> Result<NodeInfoLocal, ClusterError> {
    let c = &plan.name;
    let mut info = info(c).ok_or_else(|| ClusterError::Invalid(format!("cluster {c} is not up")))?;
    if info.nodes.iter().any(|n| n.name == node.name) {
        return Err(ClusterError::Invalid(format!("node {} is already in cluster {c}", node.name)));
    }
    let run = run_dir(c);
    let join = std::fs::read_to_string(run.join("join-token")).map_err(io(&run))?;
    let br = std::fs::read_to_string(run.join("bridge")).map_err(io(&run))?;
    let gw = Ipv4Addr::new(10, 213, subnet(c), 1);
    let index = info.nodes.iter().map(|n| n.ip.octets()[3] as usize - 10 + 1).max().unwrap_or(0);
    let broker = format!("{gw}:{BROKER_PORT}");
    let joining = Joining { br: &br, gw, broker: &broker, join: &join };
    let n = node_up(plan, index, node, &joining, &AtomicBool::new(false))?;
    info.nodes.push(n.clone());
    save(&info)?;
    Ok(n)
}

/// What a node joins: the cluster's bridge and gateway, its broker and join token.
struct Joining<'a> {
    br: &'a str,
    gw: Ipv4Addr,
    broker: &'a str,
    join: &'a str,
}

fn node_up(
    plan: &ClusterPlan,
    i: usize,
    n: &NodePlan,
    joining: &Joining<'_>,
    stop: &AtomicBool,
) -> Result<NodeInfoLocal, ClusterError> {
    let Joining { br, gw, broker, join } = *joining;
    let c = &plan.name;
    let ns = format!("away-{c}-{}", n.name);
    let ip = Ipv4Addr::new(10, 213, gw.octets()[2], 10 + i as u8);
    let host_if = format!("{}{i}", veth_prefix(c));
    let run = run_dir(c).join(&n.name);
    let state = state_dir(c).join(&n.name);
    std::fs::create_dir_all(&run).map_err(io(&run))?;
    std::fs::create_dir_all(&state).map_err(io(&state))?;
    sh("ip", &["netns", "add", &ns])?;
    sh("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
    sh("ip", &["link", "set", &host_if, "master", br])?;
    sh("ip", &["link", "set", &host_if, "up"])?;
    let inside = |args: &[&str]| -> Result<String, ClusterError> {
        let mut full = vec!["netns", "exec", ns.as_str(), "ip"];
        full.extend_from_slice(args);
        sh("ip", &full)
    };
    inside(&["link", "set", "lo", "up"])?;
    inside(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    inside(&["link", "set", "eth0", "up"])?;
    inside(&["route", "add", "default", "via", &gw.to_string()])?;

    // the node's own containerd, inside its namespace
    let sock = run.join("containerd.sock");
    let cfg = run.join("containerd.toml");
    let config = format!(
        "version = 2\nroot = \"{}\"\nstate = \"{}\"\n# no CNI here: workloads share the node's network namespace\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}.ttrpc\"\n",
        state.join("containerd").display(),
        run.join("containerd").display(),
        sock.display(),
        sock.display()
    );
    std::fs::write(&cfg, config).map_err(io(&cfg))?;
    let ctr_log = run.join("containerd.log");
    let argv: Vec<String> = nsenter(&ns)
        .into_iter()
        .chain([
            away_runtime::host::runtime_bin("containerd").display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ])
        .collect();
    // PATH: the shim and runc it starts are the active runtime profile's
    spawn(&argv, &ctr_log, &run.join("containerd.pid"), &[("PATH", away_runtime::host::runtime_path())])?;
    wait_until(&format!("containerd of {}", n.name), &ctr_log, 30, stop, || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    })?;

    let node = NodeInfoLocal {
        name: n.name.clone(),
        tier: n.tier,
        netns: ns.clone(),
        host_if: host_if.clone(),
        ip,
        api: format!("{ip}:{AGENT_PORT}"),
        containerd_socket: sock.clone(),
        namespace: format!("away-{}", n.name),
        state_dir: state.join("away"),
        run_dir: run.join("away"),
    };
    // images: there is no registry, each node's store gets them
    let store = away_runtime::ImageStore::new(&node.state_dir);
    for tar in &plan.images {
        store
            .add(tar, None)
            .map_err(|e| ClusterError::Invalid(format!("image {}: {}", tar.display(), away_model::ErrorChain(&e))))?;
    }
    let agent_log = run.join("agent.log");
    let mut argv = nsenter(&ns);
    argv.push("env".into());
    argv.extend(node.env().into_iter().map(|(k, v)| format!("{k}={v}")));
    argv.push(format!("AWAY_LOG={}", std::env::var("AWAY_LOG").unwrap_or_else(|_| "info".into())));
    argv.extend([
        plan.away.display().to_string(),
        "agent".into(),
        "--name".into(),
        n.name.clone(),
        "--tier".into(),
        n.tier.to_string(),
        "--listen".into(),
        node.api.clone(),
        "--transfer-listen".into(),
        format!("{ip}:{TRANSFER_PORT}"),
        "--broker".into(),
        format!("https://{broker}"),
    ]);
    // the join token by environment (nsenter and env pass it on), not on env's command
    // line; the broker's CA certificate to trust when joining
    let env = [
        ("PATH", away_runtime::host::runtime_path()),
        ("AWAY_JOIN_TOKEN", join.into()),
        ("AWAY_CA", run_dir(&plan.name).join("ca.pem").into()),
    ];
    std::fs::write(run.join("agent.argv"), serde_json::to_vec(&argv).expect("argv")).map_err(io(&run))?;
    spawn(&argv, &agent_log, &run.join("agent.pid"), &env)?;
    wait_until(&format!("agent {}", n.name), &agent_log, 60, stop, || tcp_answers(&node.api))?;
    Ok(node)
}

/// Start node `node`'s agent again as it was first started (after it died, as a
/// supervisor would; one still running is stopped first), on the same state.
pub fn restart_agent(name: &str, node: &str) -> Result<(), ClusterError> {
    let n = node_of(name, node)?;
    let run = run_dir(name);
    let dir = run.join(node);
    let argv: Vec<String> = serde_json::from_slice(&std::fs::read(dir.join("agent.argv")).map_err(io(&dir))?)
        .map_err(|e| ClusterError::Invalid(format!("agent.argv: {e}")))?;
    kill_pidfile(&dir.join("agent.pid"));
    let join = std::fs::read_to_string(run.join("join-token")).map_err(io(&run))?;
    let env = [
        ("PATH", away_runtime::host::runtime_path()),
        ("AWAY_JOIN_TOKEN", join.into()),
        ("AWAY_CA", run.join("ca.pem").into()),
    ];
    let log = dir.join("agent.log");
    spawn(&argv, &log, &dir.join("agent.pid"), &env)?;
    wait_until(&format!("agent {node}"), &log, 60, &AtomicBool::new(false), || tcp_answers(&n.api))
}

/// Stop the broker (agents keep running: they work offline).
pub fn stop_broker(name: &str) {
    kill_pidfile(&run_dir(name).join("broker.pid"));
}

/// Start the broker again, on the same database.
pub fn start_broker(name: &str) -> Result<(), ClusterError> {
    let run = run_dir(name);
    let argv: Vec<String> = serde_json::from_slice(&std::fs::read(run.join("broker.argv")).map_err(io(&run))?)
        .map_err(|e| ClusterError::Invalid(format!("broker.argv: {e}")))?;
    let info = info(name).ok_or_else(|| ClusterError::Invalid(format!("cluster {name} is not up")))?;
    let addr = info.broker_url.trim_start_matches("https://").to_string();
    let log = run.join("broker.log");
    spawn(&argv, &log, &run.join("broker.pid"), &broker_env(&run)?)?;
    wait_until("broker", &log, 30, &AtomicBool::new(false), || tcp_answers(&addr))
}

/// Node `node` of running cluster `name`.
fn node_of(name: &str, node: &str) -> Result<NodeInfoLocal, ClusterError> {
    let info = info(name).ok_or_else(|| ClusterError::Invalid(format!("cluster {name} is not up")))?;
    info.nodes
        .into_iter()
        .find(|n| n.name == node)
        .ok_or_else(|| ClusterError::Invalid(format!("no node {node} in cluster {name}")))
}

/// Cut a node off the network (`up = false`) or connect it again.
pub fn set_link(name: &str, node: &str, up: bool) -> Result<(), ClusterError> {
    let n = node_of(name, node)?;
    sh("ip", &["link", "set", &n.host_if, if up { "up" } else { "down" }]).map(|_| ())
}

/// The cluster's recorded state, when it is up.
pub fn info(name: &str) -> Option<ClusterInfo> {
    serde_json::from_slice(&std::fs::read(run_dir(name).join("cluster.json")).ok()?).ok()
}

fn kill_pidfile(pidfile: &Path) {
    use away_runtime::host::process::{process_runs, signal, Pidfd, Signal};
    let Some(pid) = std::fs::read_to_string(pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok()) else { return };
    // held from here on (kernels since 5.3), so the SIGKILL below cannot reach a process
    // that got the pid meanwhile
    let held = Pidfd::open(pid);
    let send = |sig| match &held {
        Ok(Some(held)) => held.signal(sig),
        Ok(None) => Ok(()),
        Err(_) => signal(pid, sig),
    };
    let _ = send(Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    // a zombie (PID 1 here reaps late) counts as gone
    while Instant::now() < deadline && process_runs(pid) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if process_runs(pid) {
        let _ = send(Signal::KILL);
    }
    let _ = std::fs::remove_file(pidfile);
}

/// Remove every workload a node holds (containers through its containerd, VMs by their
/// state directories), so that stopping containerd leaves no orphan shim behind.
fn clear_node(node: &NodeInfoLocal) {
    let opts = away_runtime::NodeOptions {
        paths: away_runtime::host::HostPaths {
            containerd_socket: node.containerd_socket.clone(),
            docker_socket: "/nonexistent/docker.sock".into(),
            state_dir: node.state_dir.clone(),
            ..Default::default()
        },
        namespace: node.namespace.clone(),
        run_dir: node.run_dir.clone(),
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    rt.block_on(async {
        let local = away_runtime::LocalNode::open(opts).await;
        let (list, _) = local.list().await;
        for w in list {
            if let Ok(r) = local.runtime(w.runtime) {
                let _ = r.remove(&w.name).await;
            }
        }
    });
}

/// Stop everything the cluster's pidfiles name and remove its namespaces, bridge and
/// firewall rule. Safe to run twice, and on a half-started cluster.
/// The host end of node `i`'s veth is this prefix and `i` (within the 15 bytes of an
/// interface name).
fn veth_prefix(cluster: &str) -> String {
    format!("awh-{}-", &cluster[..cluster.len().min(6)])
}

pub fn down(name: &str) {
    let run = run_dir(name);
    let info = info(name);
    // agents first (no new work), then each node's workloads, then containerd
    if let Ok(rd) = std::fs::read_dir(&run) {
        let node_dirs: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
        for d in &node_dirs {
            kill_pidfile(&d.join("agent.pid"));
        }
        if let Some(info) = &info {
            for n in &info.nodes {
                clear_node(n);
            }
        }
        for d in &node_dirs {
            kill_pidfile(&d.join("containerd.pid"));
        }
    }
    kill_pidfile(&run.join("broker.pid"));
    let br = std::fs::read_to_string(run.join("bridge")).unwrap_or_else(|_| bridge(name));
    // namespaces named after the cluster: delete ours only
    if let Ok(out) = sh("ip", &["netns", "list"]) {
        for line in out.lines() {
            let ns = line.split_whitespace().next().unwrap_or("");
            if ns.starts_with(&format!("away-{name}-")) {
                let _ = sh("ip", &["netns", "del", ns]);
            }
        }
    }
    // a node's veth outlives its deleted namespace while anything still runs in it;
    // its host end would refuse the next `up`
    if let Ok(out) = sh("ip", &["-o", "link", "show"]) {
        for line in out.lines() {
            let dev = line.split(": ").nth(1).and_then(|d| d.split('@').next()).unwrap_or("");
            if dev.starts_with(&veth_prefix(name)) {
                let _ = sh("ip", &["link", "del", dev]);
            }
        }
    }
    let comment = format!("away cluster {name}");
    while sh(
        "iptables",
        &["-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT", "-m", "comment", "--comment", &comment],
    )
    .is_ok()
    {}
    let _ = sh("ip", &["link", "del", &br]);
    let _ = std::fs::remove_file(run.join("cluster.json"));
    // a cluster is made for one run: its databases, images and checkpoints go with it
    // (logs stay in the run directory until reboot)
    let _ = std::fs::remove_dir_all(state_dir(name));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_interface_limits() {
        assert!(bridge("abcdefghij").len() <= 15);
        assert!(format!("{}49", veth_prefix("abcdefghij")).len() <= 15);
        let k = subnet("demo");
        assert!((20..220).contains(&k));
        assert_eq!(subnet("demo"), k, "stable per name");
    }
}
