//! Host fingerprinting: what this machine is and what it can run. `away doctor` prints
//! it; the agent reports the `NodeInfo` part to the broker. Every answer comes from
//! asking the real thing (the daemon's socket, the binary, a probe boot), never from
//! what is merely installed.

pub mod beneath;
mod cpu;
pub mod criu_args;
pub mod criu_stack;
mod kvm;
mod page_boundary;
mod probe_cleanup;
pub mod process;

use std::path::{Path, PathBuf};
use std::time::Duration;

use away_model::{Accel, Arch, ByteSize, CpuInfo, HypervisorInfo, NodeInfo, RuntimeInfo, RuntimeKind, Tier};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

pub use cpu::{host_cpu, parse_cpuinfo};
pub use kvm::{boot_probe_guest, probe_kvm, KvmProbe, KvmProbeConfig};
pub use process::process_runs;

/// CRIU's lazy page server needs pipes of this size (819 pages of 4 KiB); when root lacks
/// CAP_SYS_RESOURCE it cannot grow them itself and lazy migration fails at the first page.
pub const LAZY_PAGES_MIN_PIPE_SIZE: u64 = 3_354_624;

/// A TCP port free on 127.0.0.1 right now, for a child process that must be told where to
/// listen (CRIU's page server, QEMU's incoming migration, a lab agent).
///
/// The kernel may hand the same port to two binds in a row once the first is closed, so
/// two calls could name one port for two listeners (an agent's API and transfer ports
/// once collided this way): a port this process was given in the last 256 calls is not
/// given again.
pub fn free_loopback_port() -> std::io::Result<u16> {
    static RECENT: std::sync::Mutex<std::collections::VecDeque<u16>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
    let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..64 {
        let port = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port();
        if !recent.contains(&port) {
            if recent.len() == 256 {
                recent.pop_front();
            }
            recent.push_back(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no loopback port that was not just handed out"))
}

/// Where the host's daemons and tools live. Defaults match `deploy/install.sh`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostPaths {
    pub containerd_socket: PathBuf,
    pub docker_socket: PathBuf,
    pub runc: PathBuf,
    pub criu: PathBuf,
    pub qemu: PathBuf,
    pub guest_kernel: PathBuf,
    pub busybox: PathBuf,
    /// Away's own state (image store, logs, databases).
    pub state_dir: PathBuf,
    /// The KVM probe's answer: a fact about the host, shared by every node on it.
    pub kvm_probe_cache: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        let env = |var: &str, default: &str| PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_string()));
        HostPaths {
            containerd_socket: env("AWAY_CONTAINERD_SOCKET", "/run/containerd/containerd.sock"),
            docker_socket: env("AWAY_DOCKER_SOCKET", "/run/docker.sock"),
            runc: runtime_bin("runc"),
            criu: which("criu").unwrap_or_else(|| "/usr/local/sbin/criu".into()),
            qemu: which("qemu-system-x86_64").unwrap_or_else(|| "/usr/bin/qemu-system-x86_64".into()),
            guest_kernel: env("AWAY_GUEST_KERNEL", "/opt/away-guest/vmlinuz"),
            busybox: ["/bin/busybox", "/usr/bin/busybox"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .unwrap_or_else(|| "/bin/busybox".into()),
            state_dir: env("AWAY_STATE_DIR", "/var/lib/away"),
            kvm_probe_cache: env("AWAY_KVM_PROBE_CACHE", "/var/cache/away/kvm-probe.json"),
        }
    }
}

/// Where the active runtime profile keeps its binaries: containerd, its shim, ctr, runc,
/// dockerd, docker (chosen by `deploy/install.sh --profile`, see docs/runtimes.md).
/// `AWAY_RUNTIME_BIN` names another directory.
pub fn runtime_bin_dir() -> PathBuf {
    std::env::var_os("AWAY_RUNTIME_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/away-runtimes/active/bin"))
}

/// `name` from the active runtime profile, else from PATH: the runc that checkpoints a
/// task and the containerd a node starts must be those of the daemons that run.
pub fn runtime_bin(name: &str) -> PathBuf {
    let in_profile = runtime_bin_dir().join(name);
    if in_profile.is_file() {
        return in_profile;
    }
    which(name).unwrap_or_else(|| PathBuf::from(name))
}

/// PATH for a daemon away starts (a node's containerd): the profile's binaries first, so
/// that the shims and the runc it runs are the profile's too.
pub fn runtime_path() -> std::ffi::OsString {
    let mut dirs = vec![runtime_bin_dir()];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(dirs).unwrap_or_default()
}

/// First match of `name` in PATH, with the sbin directories that root's PATH may lack.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    // /usr/local/sbin first: deploy/install.sh puts the working CRIU wrapper there.
    let found = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .into_iter()
        .chain(path.split(':'))
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Present and working.
    Ok,
    /// Works, with a limit worth knowing (e.g. no pre-copy, VMs under TCG).
    Warn,
    /// Absent or not answering: something away needs does not work.
    Missing,
}

/// One line of the doctor's table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    /// What was found (version, socket, mode).
    pub detail: String,
    /// The command that fixes a `missing` or `warn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContainerdStatus {
    pub socket: PathBuf,
    pub version: Option<String>,
    pub error: Option<String>,
    /// The network namespace containerd's workloads get (containerd's own), as
    /// `<boot id>/net:[<inode>]`: two nodes that show the same one share a network.
    #[serde(default)]
    pub workload_netns: Option<String>,
}

/// `<boot id>/net:[<inode>]` of process `pid`'s network namespace.
pub fn netns_id(pid: u32) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    Some(format!("{}/{}", boot.trim(), ns.display()))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DockerStatus {
    pub socket: PathBuf,
    pub version: Option<String>,
    pub api_version: Option<String>,
    /// Checkpoints need an engine started with `--experimental`.
    pub experimental: Option<bool>,
    pub cgroup_driver: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolStatus {
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CriuStatus {
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    /// `criu check` said "Looks good."
    pub check_ok: bool,
    pub check_output: String,
    /// Soft-dirty tracking (`criu check --feature mem_dirty_track`): needed for pre-dump rounds.
    pub dirty_tracking: bool,
    /// userfaultfd with non-cooperative events (`--feature uffd-noncoop`): needed for lazy pages.
    pub uffd: bool,
    /// `fs.pipe-max-size`; lazy pages need at least LAZY_PAGES_MIN_PIPE_SIZE.
    pub pipe_max_size: u64,
    /// Bytes of pages a lazy dump wrote for a process whose thread's stack pointer is on
    /// a page boundary ([`criu_stack`]: far below its memory when CRIU keeps it lazy);
    /// None when not probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_page_probe_written: Option<u64>,
    /// Why that probe could not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_page_probe_error: Option<String>,
}

impl CriuStatus {
    pub fn lazy_pages(&self) -> bool {
        self.check_ok && self.uffd && self.pipe_max_size >= LAZY_PAGES_MIN_PIPE_SIZE
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupStatus {
    /// "v2" (unified), "v1" or "hybrid" (v1 controllers, an empty v2 mount beside).
    pub version: String,
    pub filesystem: String,
}

/// The runtime profile `deploy/install.sh --profile` made active (docs/runtimes.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuntimeProfile {
    /// `current` or `debian12`.
    pub name: String,
    pub bin_dir: PathBuf,
    /// The Debian packages its binaries come from, `name version` each.
    pub packages: Vec<String>,
}

impl RuntimeProfile {
    /// The active profile, or None on a host where install.sh made none.
    pub fn active() -> Option<RuntimeProfile> {
        let bin_dir = runtime_bin_dir();
        let dir = std::fs::canonicalize(bin_dir.parent()?).ok()?;
        let packages = std::fs::read_to_string(dir.join("PACKAGES")).ok()?;
        Some(RuntimeProfile {
            name: dir.file_name()?.to_string_lossy().into_owned(),
            bin_dir,
            packages: packages.lines().map(str::to_string).filter(|l| !l.is_empty()).collect(),
        })
    }

    /// The upstream version (before Debian's `+ds1-5`, `~ds1`) of package `pkg`.
    pub fn upstream_version(&self, pkg: &str) -> Option<&str> {
        let line = self.packages.iter().find(|l| l.split(' ').next() == Some(pkg))?;
        let version = line.split(' ').nth(1)?;
        version.split(['+', '~', '-']).next()
    }
}

/// Everything `away doctor` knows about this host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostReport {
    pub hostname: String,
    pub arch: Arch,
    pub kernel: String,
    pub memory_bytes: u64,
    pub cpu: CpuInfo,
    pub cgroup: CgroupStatus,
    pub overlayfs: bool,
    #[serde(default)]
    pub runtime_profile: Option<RuntimeProfile>,
    pub containerd: ContainerdStatus,
    pub docker: DockerStatus,
    pub runc: ToolStatus,
    pub criu: CriuStatus,
    pub qemu: ToolStatus,
    pub guest_kernel: Option<PathBuf>,
    pub kvm: KvmProbe,
    /// The accelerator VMs will use: KVM only when the probe booted a guest.
    pub accel: Accel,
    pub checks: Vec<Check>,
}

/// Options of a fingerprint run.
#[derive(Debug, Clone)]
pub struct FingerprintOptions {
    pub paths: HostPaths,
    pub kvm_timeout: Duration,
    pub reprobe_kvm: bool,
    /// An executable that becomes the CRIU stack-page probe when run with
    /// [`criu_stack::PROBE_ENV`] (`away` itself); None: not probed.
    pub criu_stack_probe: Option<PathBuf>,
}

impl Default for FingerprintOptions {
    fn default() -> Self {
        FingerprintOptions {
            paths: HostPaths::default(),
            kvm_timeout: Duration::from_secs(15),
            reprobe_kvm: false,
            criu_stack_probe: None,
        }
    }
}

/// Ask every component of the host what it is and whether it works.
pub async fn fingerprint(opts: &FingerprintOptions) -> HostReport {
    let p = &opts.paths;
    let (containerd, docker, runc, mut criu, qemu) = tokio::join!(
        containerd_status(&p.containerd_socket),
        docker_status(&p.docker_socket),
        runc_status(&p.runc),
        criu_status(&p.criu),
        qemu_status(&p.qemu)
    );
    if let (Some(exe), true) = (&opts.criu_stack_probe, criu.lazy_pages()) {
        match criu_stack::lazy_dump_pages_written(&p.criu, exe).await {
            Ok(written) => criu.stack_page_probe_written = Some(written),
            Err(e) => criu.stack_page_probe_error = Some(e),
        }
    }
    let kvm_cfg = KvmProbeConfig {
        qemu: p.qemu.clone(),
        kernel: p.guest_kernel.clone(),
        busybox: p.busybox.clone(),
        timeout: opts.kvm_timeout,
        cache_file: Some(p.kvm_probe_cache.clone()),
        reprobe: opts.reprobe_kvm,
    };
    let qemu_version = qemu.version.clone().unwrap_or_default();
    let kvm = tokio::task::spawn_blocking(move || probe_kvm(&kvm_cfg, &qemu_version)).await.expect("kvm probe thread");
    let cpu = host_cpu().unwrap_or_else(|_| parse_cpuinfo(""));
    let mut report = HostReport {
        hostname: read_trim("/proc/sys/kernel/hostname"),
        arch: Arch::host(),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        memory_bytes: mem_total_bytes(),
        cpu,
        cgroup: cgroup_status(),
        overlayfs: std::fs::read_to_string("/proc/filesystems")
            .is_ok_and(|s| s.lines().any(|l| l.trim_end().ends_with("overlay"))),
        runtime_profile: RuntimeProfile::active(),
        containerd,
        docker,
        runc,
        criu,
        qemu,
        guest_kernel: p.guest_kernel.exists().then(|| p.guest_kernel.clone()),
        accel: if kvm.usable { Accel::Kvm } else { Accel::Tcg },
        kvm,
        checks: Vec::new(),
    };
    report.checks = checks(&report, p);
    report
}

impl HostReport {
    /// True when nothing away needs is missing (warnings allowed).
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Missing)
    }

    /// The broker's view of this host.
    pub fn node_info(&self, name: &str, tier: Tier) -> NodeInfo {
        let runtimes = vec![
            RuntimeInfo {
                kind: RuntimeKind::Containerd,
                version: self.containerd.version.clone().unwrap_or_default(),
                healthy: self.containerd.version.is_some(),
                checkpoint: self.containerd.version.is_some() && self.criu.check_ok,
                detail: self.containerd.error.clone().unwrap_or_default(),
            },
            RuntimeInfo {
                kind: RuntimeKind::Docker,
                version: self.docker.version.clone().unwrap_or_default(),
                healthy: self.docker.version.is_some(),
                checkpoint: self.docker.experimental == Some(true) && self.criu.check_ok,
                detail: self.docker.error.clone().unwrap_or_default(),
            },
            RuntimeInfo {
                kind: RuntimeKind::Qemu,
                version: self.qemu.version.clone().unwrap_or_default(),
                healthy: self.qemu.version.is_some() && self.guest_kernel.is_some(),
                checkpoint: self.qemu.version.is_some(),
                detail: self.qemu.error.clone().unwrap_or_default(),
            },
        ];
        NodeInfo {
            name: name.to_string(),
            tier,
            arch: self.arch.clone(),
            cpu: self.cpu.clone(),
            memory_bytes: self.memory_bytes,
            kernel: self.kernel.clone(),
            runtimes,
            hypervisor: self.qemu.version.as_ref().map(|v| HypervisorInfo {
                qemu_version: v.clone(),
                accel: self.accel,
                reason: self.kvm.reason.clone(),
            }),
            link: None,
            labels: {
                let mut l = std::collections::BTreeMap::new();
                if self.criu.lazy_pages() {
                    l.insert(LABEL_LAZY_PAGES.to_string(), "true".to_string());
                }
                if let Some(ns) = &self.containerd.workload_netns {
                    l.insert(LABEL_CONTAINERD_NETNS.to_string(), ns.clone());
                }
                l
            },
            // the node's disk store is the QEMU runtime's (the agent fills this in)
            disk_bases: Default::default(),
        }
    }
}

/// Node label saying CRIU lazy pages work on the node (userfaultfd, pipe size): a
/// lazy migration needs it on both ends.
pub const LABEL_LAZY_PAGES: &str = "away.criu-lazy-pages";
/// Node label: the network namespace the node's containerd workloads get ([`netns_id`]).
pub const LABEL_CONTAINERD_NETNS: &str = "away.containerd-netns";

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// MemTotal of /proc/meminfo in bytes (0 when unreadable).
pub fn mem_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or(0)
}

fn cgroup_status() -> CgroupStatus {
    let fs = statfs_type("/sys/fs/cgroup");
    let version = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if Path::new("/sys/fs/cgroup/unified").exists() {
        "hybrid"
    } else {
        "v1"
    };
    CgroupStatus { version: version.to_string(), filesystem: fs }
}

/// Filesystem type of a mount point, from /proc/self/mounts (no libc call needed).
fn statfs_type(mount_point: &str) -> String {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mp, ty) = (f.next()?, f.next()?, f.next()?);
            (mp == mount_point).then(|| ty.to_string())
        })
        .next()
        .unwrap_or_else(|| "unknown".into())
}

/// Run a command with a timeout; Ok(stdout+stderr) when it exits 0.
async fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let fut = Command::new(program).args(args).kill_on_drop(true).output();
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(format!("{} {} timed out after {} s", program.display(), args.join(" "), timeout.as_secs())),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", program.display())),
        Ok(Ok(out)) => {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            if out.status.success() {
                Ok(text)
            } else {
                Err(format!("{} {} failed ({}): {}", program.display(), args.join(" "), out.status, text.trim()))
            }
        }
    }
}

async fn containerd_status(socket: &Path) -> ContainerdStatus {
    use containerd_client::services::v1::version_client::VersionClient;
    let mut st = ContainerdStatus { socket: socket.to_path_buf(), ..Default::default() };
    if !socket.exists() {
        st.error = Some(format!("no socket at {}", socket.display()));
        return st;
    }
    let ask = async {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
        let v = VersionClient::new(channel)
            .version(())
            .await
            .map_err(|e| format!("Version RPC on {}: {}", socket.display(), e.message()))?;
        Ok::<_, String>(v.into_inner().version)
    };
    // containerd's pid from the socket's peer credentials
    if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::UnixStream::connect(socket)).await {
        st.workload_netns = conn.peer_cred().ok().and_then(|c| c.pid()).and_then(|pid| netns_id(pid as u32));
    }
    match tokio::time::timeout(Duration::from_secs(5), ask).await {
        Ok(Ok(v)) => st.version = Some(v),
        Ok(Err(e)) => st.error = Some(e),
        Err(_) => st.error = Some(format!("no answer on {} within 5 s", socket.display())),
    }
    st
}

async fn docker_status(socket: &Path) -> DockerStatus {
    let mut st = DockerStatus { socket: socket.to_path_buf(), ..Default::default() };
    if !socket.exists() {
        st.error = Some(format!("no socket at {}", socket.display()));
        return st;
    }
    let ask = async {
        let docker = bollard::Docker::connect_with_unix(&socket.to_string_lossy(), 5, bollard::API_DEFAULT_VERSION)
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?
            .negotiate_version()
            .await
            .map_err(|e| format!("version negotiation on {}: {e}", socket.display()))?;
        let version = docker.version().await.map_err(|e| format!("GET /version on {}: {e}", socket.display()))?;
        let info = docker.info().await.map_err(|e| format!("GET /info on {}: {e}", socket.display()))?;
        Ok::<_, String>((version, info))
    };
    match tokio::time::timeout(Duration::from_secs(8), ask).await {
        Ok(Ok((version, info))) => {
            st.version = version.version;
            st.api_version = version.api_version;
            st.experimental = info.experimental_build;
            st.cgroup_driver = info.cgroup_driver.map(|d| d.to_string());
        }
        Ok(Err(e)) => st.error = Some(e),
        Err(_) => st.error = Some(format!("no answer on {} within 8 s", socket.display())),
    }
    st
}

async fn tool_status(path: &Path, args: &[&str], parse: fn(&str) -> Option<String>) -> ToolStatus {
    if !path.exists() {
        return ToolStatus { path: None, version: None, error: Some(format!("not found at {}", path.display())) };
    }
    match run(path, args, Duration::from_secs(10)).await {
        Ok(out) => ToolStatus {
            path: Some(path.to_path_buf()),
            version: parse(&out).or(Some(out.trim().to_string())),
            error: None,
        },
        Err(e) => ToolStatus { path: Some(path.to_path_buf()), version: None, error: Some(e) },
    }
}

/// `runc version 1.1.5+ds1` -> `1.1.5+ds1`
fn parse_runc_version(out: &str) -> Option<String> {
    out.lines().find_map(|l| l.strip_prefix("runc version ")).map(|v| v.trim().to_string())
}

/// `QEMU emulator version 10.0.2 (Debian ...)` -> `10.0.2`
pub fn parse_qemu_version(out: &str) -> Option<String> {
    let rest = out.lines().find_map(|l| l.split_once("version ").map(|(_, r)| r))?;
    rest.split_whitespace().next().map(str::to_string)
}

/// `Version: 4.1.1` -> `4.1.1`
fn parse_criu_version(out: &str) -> Option<String> {
    out.lines().find_map(|l| l.strip_prefix("Version:")).map(|v| v.trim().to_string())
}

async fn runc_status(path: &Path) -> ToolStatus {
    tool_status(path, &["--version"], parse_runc_version).await
}

async fn qemu_status(path: &Path) -> ToolStatus {
    tool_status(path, &["--version"], parse_qemu_version).await
}

async fn criu_status(path: &Path) -> CriuStatus {
    let pipe_max_size = read_trim("/proc/sys/fs/pipe-max-size").parse().unwrap_or(0);
    let tool = tool_status(path, &["--version"], parse_criu_version).await;
    let mut st = CriuStatus { path: tool.path.clone(), version: tool.version, pipe_max_size, ..Default::default() };
    if tool.path.is_none() || st.version.is_none() {
        st.check_output = tool.error.unwrap_or_default();
        return st;
    }
    let t = Duration::from_secs(20);
    let (check, dirty, uffd) = tokio::join!(
        run(path, &["check"], t),
        run(path, &["check", "--feature", "mem_dirty_track"], t),
        run(path, &["check", "--feature", "uffd-noncoop"], t)
    );
    match check {
        Ok(out) => {
            st.check_ok = out.contains("Looks good");
            st.check_output = out.trim().to_string();
        }
        Err(e) => st.check_output = e,
    }
    st.dirty_tracking = dirty.is_ok();
    st.uffd = uffd.is_ok();
    st
}

/// Turn the findings into the doctor's table: one verdict per component, each
/// `missing`/`warn` with the command that fixes it.
fn checks(r: &HostReport, p: &HostPaths) -> Vec<Check> {
    let mut out = Vec::new();
    let mut add = |name: &str, status: Status, detail: String, fix: Option<&str>| {
        out.push(Check { name: name.into(), status, detail, fix: fix.map(str::to_string) })
    };
    let flags_shown: Vec<&str> = ["sse4_2", "avx", "avx2", "avx512f", "aes", "vmx", "svm", "hypervisor"]
        .into_iter()
        .filter(|f| r.cpu.flags.contains(*f))
        .collect();
    add(
        "cpu",
        Status::Ok,
        format!(
            "{} {} \"{}\", {} cores, {} flags (incl. {})",
            r.arch,
            r.cpu.vendor,
            r.cpu.model,
            r.cpu.cores,
            r.cpu.flags.len(),
            flags_shown.join(" ")
        ),
        None,
    );
    add(
        "kernel",
        Status::Ok,
        format!("{}, {:.1} GiB RAM", r.kernel, r.memory_bytes as f64 / (1u64 << 30) as f64),
        None,
    );
    add("cgroup", Status::Ok, format!("{} ({})", r.cgroup.version, r.cgroup.filesystem), None);
    if r.overlayfs {
        add("overlayfs", Status::Ok, "in /proc/filesystems".into(), None);
    } else {
        add(
            "overlayfs",
            Status::Missing,
            "not in /proc/filesystems: containerd's snapshotter needs it".into(),
            Some("modprobe overlay"),
        );
    }
    let install = "deploy/install.sh";
    let start = "deploy/services.sh start";
    match &r.runtime_profile {
        Some(p) => {
            // a daemon still running from another profile answers with its own version
            let running = [("containerd", r.containerd.version.as_deref()), ("docker.io", r.docker.version.as_deref())];
            let stale: Vec<String> = running
                .iter()
                .filter_map(|(pkg, v)| {
                    let (want, have) = (p.upstream_version(pkg)?, (*v)?);
                    (!have.starts_with(want)).then(|| format!("{pkg} {have} runs, the profile has {want}"))
                })
                .collect();
            let detail = format!("{}: {}", p.name, p.packages.join(", "));
            if stale.is_empty() {
                add("runtime profile", Status::Ok, detail, None)
            } else {
                add(
                    "runtime profile",
                    Status::Warn,
                    format!("{detail}; {}", stale.join("; ")),
                    Some("deploy/services.sh restart"),
                )
            }
        }
        None => add(
            "runtime profile",
            Status::Warn,
            format!("none in {}: the daemons found on PATH are used", runtime_bin_dir().display()),
            Some(install),
        ),
    }
    match (&r.containerd.version, &r.containerd.error) {
        (Some(v), _) => add("containerd", Status::Ok, format!("{v} on {}", r.containerd.socket.display()), None),
        (None, e) => {
            let fix = if runtime_bin("containerd").is_file() { start } else { install };
            add("containerd", Status::Missing, e.clone().unwrap_or_default(), Some(fix))
        }
    }
    match (&r.docker.version, r.docker.experimental) {
        (Some(v), Some(true)) => add(
            "docker",
            Status::Ok,
            format!(
                "{v} (API {}) on {}, experimental on",
                r.docker.api_version.as_deref().unwrap_or("?"),
                r.docker.socket.display()
            ),
            None,
        ),
        (Some(v), _) => add(
            "docker",
            Status::Warn,
            format!("{v} on {}, experimental OFF: docker checkpoints will fail", r.docker.socket.display()),
            Some("restart dockerd with --experimental (deploy/services.sh stop && deploy/services.sh start)"),
        ),
        (None, _) => {
            let fix = if runtime_bin("dockerd").is_file() { start } else { install };
            add("docker", Status::Missing, r.docker.error.clone().unwrap_or_default(), Some(fix))
        }
    }
    match &r.runc.version {
        Some(v) => add("runc", Status::Ok, format!("{v} ({})", path_str(&r.runc.path)), None),
        None => add("runc", Status::Missing, r.runc.error.clone().unwrap_or_default(), Some(install)),
    }
    let criu_too_old = r.criu.version.as_deref().and_then(|v| criu_too_old(v, &r.kernel));
    match (&r.criu.version, r.criu.check_ok, criu_too_old) {
        (Some(v), true, Some(why)) => add("criu", Status::Missing, format!("{v}: {why}"), Some(install)),
        (Some(v), true, None) => {
            add("criu", Status::Ok, format!("{v} ({}), criu check: Looks good", path_str(&r.criu.path)), None)
        }
        (Some(v), false, _) => add(
            "criu",
            Status::Missing,
            format!("{v}: criu check failed: {}", last_line(&r.criu.check_output)),
            Some(install),
        ),
        (None, _, _) => add("criu", Status::Missing, r.criu.check_output.clone(), Some(install)),
    }
    if r.criu.dirty_tracking {
        add("criu pre-dump", Status::Ok, "soft-dirty tracking on: iterative pre-copy possible".into(), None);
    } else {
        add(
            "criu pre-dump",
            Status::Warn,
            "no soft-dirty tracking in this kernel: container migration is stop-and-copy or lazy, no pre-copy rounds"
                .into(),
            Some("boot a kernel built with CONFIG_MEM_SOFT_DIRTY=y"),
        );
    }
    if process::has_capability(process::CAP_SYS_RESOURCE) {
        add("criu other users", Status::Ok, "CAP_SYS_RESOURCE: processes of any user can be dumped".into(), None);
    } else {
        add(
            "criu other users",
            Status::Warn,
            "root lacks CAP_SYS_RESOURCE: a workload with a process running as another user (workers dropped to \
             nobody) cannot be checkpointed; away refuses to move it before it stops"
                .into(),
            Some("run away with CAP_SYS_RESOURCE (a host or sandbox that does not withhold it from root)"),
        );
    }
    if r.criu.lazy_pages() {
        add("criu lazy pages", Status::Ok, format!("userfaultfd ok, fs.pipe-max-size {}", r.criu.pipe_max_size), None);
        let fixed = "deploy/install.sh (builds CRIU with deploy/criu/0001-is-stack-page-number.patch)";
        let probed = r.criu.stack_page_probe_written.map(|w| (criu_stack::stays_lazy(w), ByteSize(w).human()));
        let of = ByteSize(criu_stack::PROBE_MEMORY as u64).human();
        match (probed, &r.criu.stack_page_probe_error) {
            (Some((true, w)), _) => add(
                "criu lazy stack page",
                Status::Ok,
                format!(
                    "a thread's stack pointer on a page boundary leaves the memory lazy (is_stack() fixed; \
                     probe: {w} of {of} dumped)"
                ),
                None,
            ),
            (Some((false, w)), _) => add(
                "criu lazy stack page",
                Status::Warn,
                format!(
                    "a thread's stack pointer on a page boundary makes CRIU dump every page (its is_stack() bug; \
                     probe: {w} of {of} dumped): such a process moves as stop-and-copy under --mode lazy \
                     (about one process start in 256)"
                ),
                Some(fixed),
            ),
            (None, Some(e)) => add(
                "criu lazy stack page",
                Status::Warn,
                format!("not probed: {e}"),
                Some("run `away doctor` as root on x86_64: the probe dumps a small process of its own with criu"),
            ),
            (None, None) => {}
        }
    } else if !r.criu.uffd {
        add(
            "criu lazy pages",
            Status::Warn,
            "userfaultfd (uffd-noncoop) unavailable: no post-copy container migration".into(),
            Some("boot a kernel with CONFIG_USERFAULTFD=y"),
        );
    } else {
        add(
            "criu lazy pages",
            Status::Warn,
            format!(
                "fs.pipe-max-size is {} < {LAZY_PAGES_MIN_PIPE_SIZE}: lazy migration fails at the first page",
                r.criu.pipe_max_size
            ),
            Some("sysctl -w fs.pipe-max-size=4194304 (done by deploy/services.sh start)"),
        );
    }
    match &r.qemu.version {
        Some(v) => add("qemu", Status::Ok, format!("{v} ({})", path_str(&r.qemu.path)), None),
        None => add("qemu", Status::Missing, r.qemu.error.clone().unwrap_or_default(), Some(install)),
    }
    let modules = p.guest_kernel.with_file_name("modules");
    match &r.guest_kernel {
        Some(k) if !modules.join("kernel/drivers/net/virtio_net.ko").exists() => add(
            "guest kernel",
            Status::Missing,
            format!("{} has no virtio-net module under {}: VMs get no network", k.display(), modules.display()),
            Some(install),
        ),
        Some(k) => add(
            "guest kernel",
            Status::Ok,
            format!(
                "{} ({}) with virtio-net modules",
                k.display(),
                read_trim(&k.with_file_name("VERSION").to_string_lossy())
            ),
            None,
        ),
        None => add(
            "guest kernel",
            Status::Missing,
            format!("no kernel at {}: VM workloads cannot boot", p.guest_kernel.display()),
            Some(install),
        ),
    }
    let cached = if r.kvm.cached { " (cached; --reprobe-kvm to boot again)" } else { "" };
    if r.kvm.usable {
        add("kvm", Status::Ok, format!("{}{cached}: VMs use KVM", r.kvm.reason), None);
    } else {
        add(
            "kvm",
            Status::Warn,
            format!("not usable: {}{cached}; VMs run under TCG (software, much slower)", r.kvm.reason),
            Some("run on a host with working hardware virtualisation"),
        );
    }
    out
}

/// `(major, minor)` of a version string like "4.2.1" or "6.18.44-fc".
fn major_minor(v: &str) -> Option<(u32, u32)> {
    let mut it = v.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|n| n.parse().ok());
    Some((it.next()??, it.next()??))
}

/// Why this CRIU cannot work with this kernel, when `criu check` alone does not tell:
/// before 4.0 it fails on current vDSO layouts; before 4.2 it cannot dump any TCP
/// socket on kernels >= 6.16, where SO_PASSCRED became AF_UNIX/netlink-only.
pub fn criu_too_old(criu: &str, kernel: &str) -> Option<String> {
    let c = major_minor(criu)?;
    if c < (4, 0) {
        return Some("older than 4.0, which fails on current kernels (vDSO)".into());
    }
    if c < (4, 2) && major_minor(kernel).is_some_and(|k| k >= (6, 16)) {
        return Some(format!(
            "older than 4.2: cannot checkpoint TCP sockets on kernel {kernel} (>= 6.16 restricts SO_PASSCRED)"
        ));
    }
    None
}

fn path_str(p: &Option<PathBuf>) -> String {
    p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}

fn last_line(s: &str) -> &str {
    s.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_criu_is_refused_on_new_kernels() {
        assert!(criu_too_old("3.17.1", "6.1.0").is_some());
        assert!(criu_too_old("4.1.1", "6.18.44-fc-v669").unwrap().contains("TCP sockets"));
        assert_eq!(criu_too_old("4.1.1", "6.12.0"), None);
        assert_eq!(criu_too_old("4.2.1", "6.18.44"), None);
    }

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_runc_version("runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1\nspec: 1.0.2-dev\n").as_deref(),
            Some("1.1.5+ds1")
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright").as_deref(),
            Some("10.0.2")
        );
        assert_eq!(parse_criu_version("Version: 4.1.1\n").as_deref(), Some("4.1.1"));
    }
}

#[cfg(test)]
mod free_port_tests {
    #[test]
    fn calls_in_a_row_never_name_one_port_twice() {
        let ports: Vec<u16> = (0..200).map(|_| super::free_loopback_port().unwrap()).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    }
}
