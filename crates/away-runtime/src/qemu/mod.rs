//! QEMU backend: each workload is a VM booted from the image's VM artifact (guest
//! kernel + initramfs holding the image's rootfs), driven over QMP.
//!
//! State lives in one directory per workload, `<state_dir>/<name>/`: `qemu.pid`,
//! `qmp.sock`, `serial.log` (the guest console = the app's output), `qemu.log` and
//! `spec.json` (spec, image, accelerator and why). QEMU daemonizes, so VMs outlive the
//! `away` process; every later call finds them again through that directory.
//! Artifacts are cached by image manifest digest under `<host state>/vm-artifacts/`.
//!
//! Checkpoints are QEMU migration streams written to a file (`file:` URI), restored
//! with `-incoming defer` + `migrate-incoming`.

mod command;
pub mod disk;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use away_model::{error_chain, Accel, RuntimeInfo, RuntimeKind, WorkloadSpec, WorkloadState, WorkloadStatus};
use serde::{Deserialize, Serialize};

pub use command::{cmdline_with_address, memory_mib, vcpus, VmFiles, VmLaunch, VmTap};
pub use disk::{BaseImage, DiskStore, DISK_NODE, OVERLAY_FILE};
use qmp::commands::{Cont, Migrate, MigrateIncoming, MigrationStatus, QueryMigrate, Quit, Stop, SystemPowerdown};
pub use qmp::{Qmp, QmpError, QmpEvent};

use crate::host::{probe_kvm, HostPaths, KvmProbeConfig};
use crate::runtime::{
    check_fits_host, create_private_dir, tail_file, CheckpointArchive, CheckpointOptions, LogStream, RestoreRequest,
    RunRequest, Runtime, RuntimeError, StillRunning,
};
use crate::store::ResolvedImage;

const KIND: RuntimeKind = RuntimeKind::Qemu;
/// The migration stream inside a checkpoint directory.
pub const STATE_FILE: &str = "vm-state.qemu";
/// Smallest VM the guest kernel plus an initramfs boots in.
const MIN_MEMORY_MIB: u64 = 64;
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// VMs under QEMU. `accel` comes from the host's KVM probe (see [`QemuRuntime::detect`]).
#[derive(Debug, Clone)]
pub struct QemuRuntime {
    state_dir: PathBuf,
    paths: HostPaths,
    accel: Accel,
    /// Why `accel` (the probe's answer), recorded with every workload.
    accel_reason: String,
    /// Base images of VM disks (`<host state>/disks` unless set).
    disks: DiskStore,
    /// The node's network namespace, where its lab networks' bridges are, when it is
    /// not this process's (two nodes in one process: the lab).
    netns: Option<PathBuf>,
}

/// What `spec.json` holds: enough to explain and to restart the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: WorkloadSpec,
    pub image: String,
    pub manifest_digest: String,
    pub accel: Accel,
    /// Why this accelerator.
    pub decision: String,
    pub artifact_dir: PathBuf,
    pub argv: Vec<String>,
    /// Checkpoint this VM was restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<PathBuf>,
}

/// A VM boot artifact on disk (cached per image).
#[derive(Debug, Clone)]
pub struct CachedArtifact {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub nic: String,
}

impl QemuRuntime {
    /// `state_dir` holds one directory per workload (e.g. `/run/away/qemu`).
    pub fn new(state_dir: PathBuf, paths: HostPaths, accel: Accel) -> Self {
        let disks = DiskStore::new(paths.state_dir.join("disks"), &paths.qemu);
        QemuRuntime {
            state_dir,
            paths,
            accel,
            accel_reason: format!("{accel} chosen by the caller"),
            disks,
            netns: None,
        }
    }

    /// Make the VMs' taps in network namespace `netns` (a path such as
    /// `/run/netns/NAME`), where this node's bridges are, instead of this process's.
    /// QEMU must run there too (its `qemu` wrapped in `nsenter`, as the lab does).
    pub fn with_netns(mut self, netns: PathBuf) -> Self {
        self.netns = Some(netns);
        self
    }

    /// Keep base disk images in `dir` instead of `<host state>/disks` (two nodes on one
    /// host, each with its own store).
    pub fn with_disk_store(mut self, dir: PathBuf) -> Self {
        self.disks = DiskStore::new(dir, &self.paths.qemu);
        self
    }

    /// The node's base disk images.
    pub fn disk_store(&self) -> &DiskStore {
        &self.disks
    }

    /// Record why `accel` was chosen (shown in status and spec.json).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.accel_reason = reason.into();
        self
    }

    /// The accelerator from the host's KVM probe (cached in `<host state>/kvm-probe.json`):
    /// KVM only when a probe guest really booted under it, TCG otherwise.
    pub async fn detect(state_dir: PathBuf, paths: HostPaths) -> Self {
        let version = qemu_version(&paths.qemu).await.unwrap_or_default();
        let cfg = KvmProbeConfig {
            qemu: paths.qemu.clone(),
            kernel: paths.guest_kernel.clone(),
            busybox: paths.busybox.clone(),
            timeout: Duration::from_secs(15),
            cache_file: Some(paths.kvm_probe_cache.clone()),
            reprobe: false,
        };
        let probe = tokio::task::spawn_blocking(move || probe_kvm(&cfg, &version)).await.expect("kvm probe thread");
        let accel = if probe.usable { Accel::Kvm } else { Accel::Tcg };
        let reason = format!("{accel}: kvm probe: {}{}", probe.reason, if probe.cached { " (cached)" } else { "" });
        QemuRuntime::new(state_dir, paths, accel).with_reason(reason)
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// State directory files of workload `name`.
    pub fn files(&self, name: &str) -> VmFiles {
        VmFiles::new(self.state_dir.join(name))
    }

    /// The tap device of workload `name` when it is on a lab network: named after its
    /// state directory, so two runtimes in one namespace (a local move) never share one.
    pub fn tap_name(&self, name: &str) -> String {
        away_overlay::tap_name(&self.files(name).dir.display().to_string())
    }

    /// Make the tap of `launch` on its network's bridge (nothing without one).
    async fn attach_tap(&self, launch: &VmLaunch, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        let (Some(tap), Some(addr)) = (&launch.tap, &spec.overlay) else { return Ok(()) };
        let (ifname, addr) = (tap.ifname.clone(), addr.clone());
        let started = Instant::now();
        let netns = self.netns.clone();
        let made = tokio::task::spawn_blocking(move || away_overlay::attach_tap(&ifname, &addr, netns.as_deref()))
            .await
            .map_err(|e| RuntimeError::io("tap thread", std::io::Error::other(e.to_string())))?;
        made.map_err(|e| RuntimeError::Failed {
            runtime: KIND,
            op: "attach to its lab network",
            name: spec.name.clone(),
            message: error_chain(&e),
        })?;
        tracing::info!(workload = %spec.name, tap = %tap.ifname, mac = %tap.mac, "overlay tap ready in {} ms", started.elapsed().as_millis());
        Ok(())
    }

    /// Remove the tap of workload `name`, if it has one.
    async fn detach_tap(&self, name: &str) -> Result<(), RuntimeError> {
        let tap = self.tap_name(name);
        let netns = self.netns.clone();
        let removed = tokio::task::spawn_blocking(move || away_overlay::detach_tap(&tap, netns.as_deref()))
            .await
            .map_err(|e| RuntimeError::io("tap thread", std::io::Error::other(e.to_string())))?;
        removed.map_err(|e| RuntimeError::Failed {
            runtime: KIND,
            op: "remove the tap of",
            name: name.to_string(),
            message: error_chain(&e),
        })
    }

    /// The VM artifact of `image`, built once per manifest digest.
    pub async fn artifact(&self, image: &ResolvedImage) -> Result<CachedArtifact, RuntimeError> {
        let root = self.paths.state_dir.join("vm-artifacts");
        let image = image.clone();
        let paths = self.paths.clone();
        tokio::task::spawn_blocking(move || build_artifact(&root, &image, &paths)).await.map_err(|e| {
            RuntimeError::Failed {
                runtime: KIND,
                op: "build the vm artifact",
                name: String::new(),
                message: e.to_string(),
            }
        })?
    }

    /// The QEMU launch of `spec` from `artifact` in its state directory. A spec that sets
    /// env or a command boots the artifact's initrd with an overrides cpio appended.
    /// A spec with a disk gets its overlay (created at start) and the guest's disk
    /// modules and mount in the overrides cpio.
    pub fn launch(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        artifact: &CachedArtifact,
    ) -> Result<VmLaunch, RuntimeError> {
        let files = self.files(&spec.name);
        let guest_disk = match &spec.disk {
            Some(d) => {
                // the base must be here before anything starts
                self.disks.find(&d.base)?;
                let modules_dir = away_image::VmOptions::default().modules_dir;
                let g = away_image::GuestDisk::load(&modules_dir, d.mount.as_deref())
                    .map_err(|e| RuntimeError::Unavailable { runtime: KIND, reason: error_chain(&e) })?;
                Some(g)
            }
            None => None,
        };
        let overrides = (!spec.env.is_empty() || spec.command.is_some() || guest_disk.is_some()).then(|| {
            let argv = spec.command.as_ref().map(|c| image.argv(Some(c)));
            let cpio = away_image::overrides_cpio_with_disk(&spec.env, argv.as_deref(), guest_disk.as_ref());
            (artifact.initrd.clone(), cpio)
        });
        let initrd = if overrides.is_some() { files.dir.join("initrd.gz") } else { artifact.initrd.clone() };
        let mut launch = VmLaunch::for_spec(
            &self.paths.qemu,
            spec,
            self.accel,
            &artifact.kernel,
            &initrd,
            &artifact.cmdline,
            &artifact.nic,
            files,
        );
        launch.initrd_overrides = overrides;
        if let Some(addr) = &spec.overlay {
            // on a lab network: a tap on the network's bridge, the guest with the
            // workload's MAC and address (docs/network.md); no user networking
            launch.tap = Some(VmTap {
                ifname: self.tap_name(&spec.name),
                mac: addr.mac.clone(),
                mtu: away_overlay::OVERLAY_MTU,
            });
            launch.cmdline = cmdline_with_address(&launch.cmdline, addr.ip, addr.prefix_len);
            launch.ports.clear();
        }
        launch.disk = spec.disk.as_ref().map(|d| (d.clone(), launch.files.dir.join(OVERLAY_FILE)));
        Ok(launch)
    }

    /// Start `spec` as a migration destination: QEMU with the same command line as
    /// `run` plus `-incoming <incoming>` (`defer` for a checkpoint file, or
    /// `tcp:0.0.0.0:PORT` for live migration), waiting in state "inmigrate". The
    /// caller feeds the stream (`migrate-incoming` for `defer`) and, on failure,
    /// calls `remove`. Returns the state directory and what spec.json records.
    pub async fn start_incoming(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        incoming: &str,
        restored_from: Option<PathBuf>,
    ) -> Result<(VmFiles, VmRecord), RuntimeError> {
        self.start_incoming_as(spec, image, incoming, restored_from, false).await
    }

    /// [`QemuRuntime::start_incoming`] with `-S` when `paused`: the received guest stays
    /// paused after the incoming migration until a `cont` (a live-migration destination
    /// held until its source commits the move).
    pub async fn start_incoming_as(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        incoming: &str,
        restored_from: Option<PathBuf>,
        paused: bool,
    ) -> Result<(VmFiles, VmRecord), RuntimeError> {
        self.precheck(spec)?;
        let artifact = self.artifact(image).await?;
        let mut launch = self.launch(spec, image, &artifact)?;
        launch.incoming = Some(incoming.to_string());
        launch.paused = paused;
        let mut record = self.record_for(spec, image, &artifact, &launch);
        record.restored_from = restored_from;
        self.start(&launch, &record, "start the migration destination of").await?;
        Ok((launch.files, record))
    }

    /// Reboot the guest of `name` cold, keeping its disk: QEMU stops (the guest is asked
    /// to power off first) and starts again with the same command line, on the same
    /// overlay. What the guest kept in memory is gone, what it wrote to its disk is not.
    pub async fn reboot(&self, name: &str, image: &ResolvedImage) -> Result<WorkloadStatus, RuntimeError> {
        let record = self.read_record(name)?;
        self.stop(name, Duration::from_secs(5)).await?;
        let artifact = self.artifact(image).await?;
        let launch = self.launch(&record.spec, image, &artifact)?;
        let started = Instant::now();
        let pid = self.spawn_and_wait(&launch, &record, "reboot").await?;
        tracing::info!(workload = name, pid, "vm rebooted in {:.1} s", started.elapsed().as_secs_f64());
        Ok(self.status_of(&record).await)
    }

    /// Checks that need no VM: name, memory, and nothing of that name yet.
    fn precheck(&self, spec: &WorkloadSpec) -> Result<(), RuntimeError> {
        let name = &spec.name;
        if name.is_empty()
            || name.starts_with('.')
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(RuntimeError::Invalid {
                field: "name".into(),
                reason: format!("{name:?} is not a valid workload name (letters, digits, '-')"),
            });
        }
        let mib = memory_mib(spec.resources.memory.bytes());
        check_fits_host(spec)?;
        if mib < MIN_MEMORY_MIB {
            return Err(RuntimeError::Invalid {
                field: "resources.memory".into(),
                reason: format!("workload {name}: a vm needs at least {MIN_MEMORY_MIB} MiB, got {mib} MiB"),
            });
        }
        if self.files(name).dir.exists() {
            return Err(RuntimeError::AlreadyExists { runtime: KIND, name: name.clone() });
        }
        Ok(())
    }

    /// Start QEMU for `launch`, in a fresh state directory, and wait until QMP answers.
    /// On any failure the QEMU it started is killed and the directory removed.
    async fn start(&self, launch: &VmLaunch, record: &VmRecord, op: &'static str) -> Result<u32, RuntimeError> {
        let files = &launch.files;
        let name = &launch.name;
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| RuntimeError::io(format!("create {}", self.state_dir.display()), e))?;
        // create_dir (not _all): a second `run` of the same name loses this race cleanly.
        match std::fs::create_dir(&files.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists { runtime: KIND, name: name.clone() })
            }
            Err(e) => return Err(RuntimeError::io(format!("create {}", files.dir.display()), e)),
        }
        let result = match &launch.initrd_overrides {
            Some((base, extra)) => write_initrd_with_overrides(base, extra, &launch.initrd),
            None => Ok(()),
        };
        // a fresh, empty overlay: a new VM's disk, or a migration destination's (the
        // source mirrors its blocks into it)
        let result = match (result, &launch.disk) {
            (Ok(()), Some((disk, overlay))) => self.disks.create_overlay(disk, overlay).map(|_| ()),
            (r, _) => r,
        };
        let result = match result {
            Ok(()) => self.attach_tap(launch, &record.spec).await,
            Err(e) => Err(e),
        };
        let result = match result {
            Ok(()) => self.spawn_and_wait(launch, record, op).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            kill_vm(files).await;
            if launch.tap.is_some() {
                if let Err(e) = self.detach_tap(name).await {
                    tracing::warn!("after a failed {op}: {}", error_chain(&e));
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&files.dir) {
                tracing::warn!("cannot remove {} after a failed {op}: {e}", files.dir.display());
            }
        }
        result
    }

    async fn spawn_and_wait(
        &self,
        launch: &VmLaunch,
        record: &VmRecord,
        op: &'static str,
    ) -> Result<u32, RuntimeError> {
        let files = &launch.files;
        let name = &launch.name;
        let failed = |message: String| RuntimeError::Failed { runtime: KIND, op, name: name.clone(), message };
        let json = serde_json::to_vec_pretty(record).expect("vm record json");
        std::fs::write(files.record(), json)
            .map_err(|e| RuntimeError::io(format!("write {}", files.record().display()), e))?;
        let log = std::fs::File::create(files.qemu_log())
            .map_err(|e| RuntimeError::io(format!("create {}", files.qemu_log().display()), e))?;
        tracing::info!(workload = %name, accel = %launch.accel, "starting qemu: {} {}", launch.qemu.display(), launch.argv().join(" "));
        let child = tokio::process::Command::new(&launch.qemu)
            .args(launch.argv())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| failed(format!("cannot start {}: {e}", launch.qemu.display())))?;
        // With -daemonize the first process exits once the VM is set up (or failed).
        let status = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .map_err(|_| failed("qemu did not finish starting within 60 s".into()))?
            .map_err(|e| failed(format!("waiting for qemu: {e}")))?
            .status;
        if !status.success() {
            let err = std::fs::read_to_string(files.qemu_log()).unwrap_or_default();
            return Err(failed(format!("qemu exited ({status}): {}", err.trim())));
        }
        let pid = read_pid(files)
            .ok_or_else(|| failed(format!("qemu started but wrote no pid to {}", files.pidfile().display())))?;
        let want = if launch.incoming.is_some() { "inmigrate" } else { "running" };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match query_state(files).await {
                Ok(s) if s == want => return Ok(pid),
                Ok(s) if Instant::now() >= deadline => {
                    return Err(failed(format!("vm is {s:?}, not {want:?}, 30 s after start")))
                }
                Err(e) if Instant::now() >= deadline => return Err(failed(error_chain(&e))),
                _ if !pid_alive(pid, &files.dir) => {
                    let err = std::fs::read_to_string(files.qemu_log()).unwrap_or_default();
                    return Err(failed(format!("qemu (pid {pid}) exited right after starting: {}", err.trim())));
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn read_record(&self, name: &str) -> Result<VmRecord, RuntimeError> {
        let files = self.files(name);
        if name.is_empty() || name.contains('/') || name.starts_with('.') || !files.dir.is_dir() {
            return Err(RuntimeError::NotFound { runtime: KIND, name: name.to_string() });
        }
        let data = std::fs::read(files.record())
            .map_err(|e| RuntimeError::io(format!("read {}", files.record().display()), e))?;
        serde_json::from_slice(&data).map_err(|e| RuntimeError::Failed {
            runtime: KIND,
            op: "read",
            name: name.to_string(),
            message: format!("{}: {e}", files.record().display()),
        })
    }

    async fn status_of(&self, record: &VmRecord) -> WorkloadStatus {
        let files = self.files(&record.spec.name);
        let pid = read_pid(&files).filter(|p| pid_alive(*p, &files.dir));
        let (state, note) = match pid {
            None => (WorkloadState::Stopped, String::new()),
            Some(_) => match query_state(&files).await {
                Ok(s) => (vm_state(&s), format!(", qemu {s}")),
                Err(e) => (WorkloadState::Unknown, format!(", {}", error_chain(&e))),
            },
        };
        let mut detail = format!("accel {}{note}; {}", record.accel, record.decision);
        if let Some(o) = &record.spec.overlay {
            let tap = self.tap_name(&record.spec.name);
            detail.push_str(&format!("; overlay {} {} ({}) on tap {tap}", o.network, o.ip, o.mac));
        }
        if let Some(from) = &record.restored_from {
            detail.push_str(&format!("; restored from {}", from.display()));
        }
        WorkloadStatus {
            name: record.spec.name.clone(),
            runtime: KIND,
            state,
            image: record.image.clone(),
            pid,
            exit_code: None,
            ports: record.spec.ports.iter().map(|p| format!("{}:{}", p.host_port(), p.container)).collect(),
            detail,
        }
    }

    fn record_for(
        &self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        artifact: &CachedArtifact,
        launch: &VmLaunch,
    ) -> VmRecord {
        VmRecord {
            spec: spec.clone(),
            image: image.reference.clone(),
            manifest_digest: image.manifest_digest.clone(),
            accel: self.accel,
            decision: self.accel_reason.clone(),
            artifact_dir: artifact.dir.clone(),
            argv: launch.argv(),
            restored_from: None,
        }
    }
}

/// The shared initrd followed by the workload's overrides cpio (the kernel unpacks
/// concatenated archives in order, so the overrides file lands on top).
fn write_initrd_with_overrides(base: &Path, extra: &[u8], dest: &Path) -> Result<(), RuntimeError> {
    let mut bytes = std::fs::read(base).map_err(|e| RuntimeError::io(format!("read {}", base.display()), e))?;
    bytes.extend_from_slice(extra);
    std::fs::write(dest, bytes).map_err(|e| RuntimeError::io(format!("write {}", dest.display()), e))
}

#[async_trait]
impl Runtime for QemuRuntime {
    fn kind(&self) -> RuntimeKind {
        KIND
    }

    async fn health(&self) -> RuntimeInfo {
        let version = qemu_version(&self.paths.qemu).await;
        let kernel = self.paths.guest_kernel.exists();
        let detail = match (&version, kernel) {
            (Err(e), _) => e.clone(),
            (Ok(_), false) => format!("no guest kernel at {}", self.paths.guest_kernel.display()),
            (Ok(_), true) => format!("accel {}; {}", self.accel, self.accel_reason),
        };
        let ok = version.is_ok();
        RuntimeInfo { kind: KIND, version: version.unwrap_or_default(), healthy: ok && kernel, checkpoint: ok, detail }
    }

    async fn run(&self, req: &RunRequest) -> Result<WorkloadStatus, RuntimeError> {
        let spec = &req.spec;
        if !spec.volumes.is_empty() {
            return Err(RuntimeError::Invalid {
                field: "volumes".into(),
                reason: "volumes are for containers; a vm keeps its data on its disk (disk.mount)".into(),
            });
        }
        self.precheck(spec)?;
        let artifact = self.artifact(&req.image).await?;
        let launch = self.launch(spec, &req.image, &artifact)?;
        let record = self.record_for(spec, &req.image, &artifact, &launch);
        let started = Instant::now();
        let pid = self.start(&launch, &record, "run").await?;
        tracing::info!(workload = %spec.name, pid, "vm running after {:.1} s", started.elapsed().as_secs_f64());
        Ok(self.status_of(&record).await)
    }

    async fn stop(&self, name: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.read_record(name)?;
        let files = self.files(name);
        let Some(pid) = read_pid(&files).filter(|p| pid_alive(*p, &files.dir)) else {
            return Ok(());
        };
        // ACPI power button first; the guest may ignore it (no acpid in the initramfs).
        if let Err(e) = qmp(&files, &SystemPowerdown).await {
            tracing::debug!(workload = name, "system_powerdown: {}", error_chain(&e));
        }
        if wait_exit(pid, &files.dir, grace).await {
            return Ok(());
        }
        if let Err(e) = qmp(&files, &Quit).await {
            tracing::debug!(workload = name, "quit: {}", error_chain(&e));
        }
        if wait_exit(pid, &files.dir, Duration::from_secs(5)).await {
            return Ok(());
        }
        kill_pid(pid, &files.dir).await;
        if wait_exit(pid, &files.dir, Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(RuntimeError::Failed {
                runtime: KIND,
                op: "stop",
                name: name.into(),
                message: format!("qemu pid {pid} survived SIGKILL"),
            })
        }
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        let files = self.files(name);
        if name.is_empty() || name.contains('/') || name.starts_with('.') || !files.dir.is_dir() {
            return Err(RuntimeError::NotFound { runtime: KIND, name: name.to_string() });
        }
        if read_pid(&files).is_some_and(|p| pid_alive(p, &files.dir)) {
            // It goes away anyway: no point in a long ACPI grace period.
            if self.read_record(name).is_ok() {
                self.stop(name, Duration::from_millis(500)).await?;
            } else {
                kill_vm(&files).await;
            }
        }
        // its tap goes with it (before the directory: a failure leaves the VM to remove again)
        if self.read_record(name).map_or(true, |r| r.spec.overlay.is_some()) {
            self.detach_tap(name).await?;
        }
        std::fs::remove_dir_all(&files.dir).map_err(|e| RuntimeError::io(format!("remove {}", files.dir.display()), e))
    }

    async fn status(&self, name: &str) -> Result<WorkloadStatus, RuntimeError> {
        let record = self.read_record(name)?;
        Ok(self.status_of(&record).await)
    }

    async fn list(&self) -> Result<Vec<WorkloadStatus>, RuntimeError> {
        let rd = match std::fs::read_dir(&self.state_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io(format!("read {}", self.state_dir.display()), e)),
        };
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().join("spec.json").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            // A directory being created or removed right now is simply skipped.
            if let Ok(r) = self.read_record(&n) {
                out.push(self.status_of(&r).await);
            }
        }
        Ok(out)
    }

    async fn logs(&self, name: &str, follow: bool) -> Result<LogStream, RuntimeError> {
        self.read_record(name)?;
        let files = self.files(name);
        let serial = files.serial_log();
        if !follow {
            return Ok(tail_file(serial, Box::new(|| Box::pin(async { false }))));
        }
        let still_running: StillRunning = Box::new(move || {
            let files = files.clone();
            Box::pin(async move { read_pid(&files).is_some_and(|p| pid_alive(p, &files.dir)) })
        });
        Ok(tail_file(serial, still_running))
    }

    async fn checkpoint(&self, name: &str, opts: &CheckpointOptions) -> Result<CheckpointArchive, RuntimeError> {
        let record = self.read_record(name)?;
        let files = self.files(name);
        let failed =
            |message: String| RuntimeError::Failed { runtime: KIND, op: "checkpoint", name: name.to_string(), message };
        let pid = read_pid(&files)
            .filter(|p| pid_alive(*p, &files.dir))
            .ok_or_else(|| failed("the vm is not running".into()))?;
        create_private_dir(&opts.dir)?;
        let dir = std::fs::canonicalize(&opts.dir)
            .map_err(|e| RuntimeError::io(format!("resolve {}", opts.dir.display()), e))?;
        let state = dir.join(STATE_FILE);
        let started = Instant::now();
        let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await.map_err(|e| failed(error_chain(&e)))?;
        let before = q.run_state().await.map_err(|e| failed(error_chain(&e)))?;
        // Stop the guest first: the stream is then one consistent copy, written once.
        let outcome = async {
            q.execute(&Stop).await?;
            q.execute(&Migrate { uri: format!("file:{}", state.display()) }).await?;
            wait_migration(&mut q, Duration::from_secs(600)).await
        }
        .await;
        if let Err(e) = outcome {
            // Never lose the workload: it keeps running as before.
            let _ = std::fs::remove_file(&state);
            if before == "running" {
                if let Err(e) = q.execute(&Cont).await {
                    tracing::warn!(
                        workload = name,
                        "cannot resume the vm after a failed checkpoint: {}",
                        error_chain(&e)
                    );
                }
            }
            return Err(failed(format!("migration to {}: {}", state.display(), error_chain(&e))));
        }
        if opts.leave_running {
            q.execute(&Cont).await.map_err(|e| failed(format!("resume after the checkpoint: {}", error_chain(&e))))?;
        } else {
            let _ = q.execute(&Quit).await;
            drop(q);
            if !wait_exit(pid, &files.dir, Duration::from_secs(10)).await {
                kill_pid(pid, &files.dir).await;
                wait_exit(pid, &files.dir, Duration::from_secs(5)).await;
            }
        }
        let archive = CheckpointArchive {
            workload: name.to_string(),
            runtime: KIND,
            dir: dir.clone(),
            bytes: 0,
            spec: record.spec.clone(),
            image: record.image.clone(),
        };
        let json = serde_json::to_vec_pretty(&archive).expect("archive json");
        std::fs::write(dir.join("checkpoint.json"), json)
            .map_err(|e| RuntimeError::io(format!("write {}", dir.join("checkpoint.json").display()), e))?;
        let bytes = crate::runtime::dir_bytes(&dir);
        tracing::info!(
            workload = name,
            bytes,
            "vm checkpoint written to {} in {:.1} s",
            state.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(CheckpointArchive { bytes, ..archive })
    }

    async fn restore(&self, req: &RestoreRequest) -> Result<WorkloadStatus, RuntimeError> {
        let archive = &req.archive;
        if archive.runtime != KIND {
            return Err(RuntimeError::Unsupported {
                runtime: KIND,
                op: "restore",
                reason: format!("checkpoint {} was written by {}, not qemu", archive.dir.display(), archive.runtime),
            });
        }
        let spec = &archive.spec;
        let state = std::fs::canonicalize(archive.dir.join(STATE_FILE)).map_err(|e| {
            RuntimeError::io(format!("checkpoint state file {}", archive.dir.join(STATE_FILE).display()), e)
        })?;
        if req.image.reference != archive.image {
            tracing::warn!(workload = %spec.name, "restoring a checkpoint of {} with image {}", archive.image, req.image.reference);
        }
        let started = Instant::now();
        let (files, record) = self.start_incoming(spec, &req.image, "defer", Some(archive.dir.clone())).await?;
        let files = &files;
        let failed =
            |message: String| RuntimeError::Failed { runtime: KIND, op: "restore", name: spec.name.clone(), message };
        let incoming = async {
            let chain = |e: QmpError| error_chain(&e);
            let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await.map_err(chain)?;
            q.execute(&MigrateIncoming { uri: format!("file:{}", state.display()) }).await.map_err(chain)?;
            wait_migration(&mut q, Duration::from_secs(600)).await.map_err(chain)?;
            // Without -S QEMU resumes by itself after an incoming migration; `cont` covers the rest.
            let s = q.run_state().await.map_err(chain)?;
            if s != "running" {
                q.execute(&Cont).await.map_err(|e| format!("cont from {s}: {}", error_chain(&e)))?;
            }
            Ok::<_, String>(())
        }
        .await;
        if let Err(e) = incoming {
            kill_vm(files).await;
            let _ = std::fs::remove_dir_all(&files.dir);
            return Err(failed(format!("incoming migration from {}: {e}", state.display())));
        }
        tracing::info!(workload = %spec.name, "vm restored from {} in {:.1} s", state.display(), started.elapsed().as_secs_f64());
        Ok(self.status_of(&record).await)
    }
}

/// Poll `query-migrate` until completed; error when it failed or took too long.
async fn wait_migration(q: &mut Qmp, limit: Duration) -> Result<(), QmpError> {
    let deadline = Instant::now() + limit;
    loop {
        let info = q.execute(&QueryMigrate).await?;
        match info.status {
            MigrationStatus::Completed => return Ok(()),
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                return Err(QmpError::Command {
                    command: "migrate".into(),
                    class: info.status.to_string(),
                    desc: info.error_desc.unwrap_or_else(|| "no reason given".into()),
                })
            }
            status if Instant::now() >= deadline => {
                return Err(QmpError::Command {
                    command: "migrate".into(),
                    class: "Timeout".into(),
                    desc: format!("still {status} after {} s", limit.as_secs()),
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// QEMU's run state mapped onto the workload's.
fn vm_state(qemu: &str) -> WorkloadState {
    match qemu {
        "running" => WorkloadState::Running,
        "inmigrate" | "prelaunch" => WorkloadState::Created,
        "paused" | "postmigrate" | "finish-migrate" | "suspended" | "save-vm" | "restore-vm" | "debug" => {
            WorkloadState::Paused
        }
        "shutdown" | "guest-panicked" | "internal-error" | "io-error" => WorkloadState::Stopped,
        _ => WorkloadState::Unknown,
    }
}

impl QemuRuntime {
    /// The ports running VMs on a lab network publish: each of their `ports:` goes from
    /// the node's port to the guest's overlay address (the agent relays them,
    /// away_agent::published; a VM on user networking has QEMU forward them itself).
    /// A live QEMU process counts (never QMP: QEMU serves one QMP client at a time, and a
    /// move holds that session), so the port opens on a held destination and closes once
    /// the source's QEMU is gone; either way it relays to the address, which is one.
    pub async fn published_overlay_ports(&self) -> Result<Vec<crate::containerd::PublishedPort>, RuntimeError> {
        let rd = match std::fs::read_dir(&self.state_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io(format!("read {}", self.state_dir.display()), e)),
        };
        let mut out = Vec::new();
        for name in rd.flatten().filter_map(|e| e.file_name().into_string().ok()) {
            let Ok(record) = self.read_record(&name) else { continue };
            let Some(addr) = &record.spec.overlay else { continue };
            let files = self.files(&name);
            if record.spec.ports.is_empty() || !read_pid(&files).is_some_and(|p| pid_alive(p, &files.dir)) {
                continue;
            }
            out.extend(record.spec.ports.iter().map(|p| crate::containerd::PublishedPort {
                workload: name.clone(),
                host: p.host_port(),
                to: std::net::SocketAddrV4::new(addr.ip, p.container),
            }));
        }
        Ok(out)
    }

    /// The guest's dirty-page rate in bytes per second, as QEMU measures it
    /// (`calc-dirty-rate` by page sampling over `seconds`, then `query-dirty-rate`).
    /// It samples 4,096 pages per GiB: QEMU's default 512 leaves a 128 MiB guest 64
    /// pages, too few to tell a 16 MiB working set from noise.
    pub async fn dirty_rate(&self, name: &str, seconds: u32) -> Result<f64, QmpError> {
        let files = self.files(name);
        let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await?;
        q.execute(&qmp::commands::CalcDirtyRate { calc_time: seconds.max(1).into(), sample_pages: 4096 }).await?;
        tokio::time::sleep(Duration::from_secs(seconds.max(1).into())).await;
        for _ in 0..50 {
            let info = q.execute(&qmp::commands::QueryDirtyRate).await?;
            if let (true, Some(mb)) = (info.status == "measured", info.dirty_rate) {
                return Ok(mb.max(0) as f64 * 1e6);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(QmpError::Command {
            command: "query-dirty-rate".into(),
            class: "Timeout".into(),
            desc: format!("no measurement after {seconds} s and 5 s more"),
        })
    }
}

/// One QMP command in its own short session.
async fn qmp<C: qmp::Command>(files: &VmFiles, cmd: &C) -> Result<C::Reply, QmpError> {
    let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await?;
    q.execute(cmd).await
}

async fn query_state(files: &VmFiles) -> Result<String, QmpError> {
    let mut q = Qmp::connect(&files.qmp_socket(), Duration::from_secs(3)).await?;
    q.run_state().await
}

fn read_pid(files: &VmFiles) -> Option<u32> {
    std::fs::read_to_string(files.pidfile()).ok()?.trim().parse().ok()
}

/// True when `pid` is a live (not zombie) QEMU of the workload in `dir`: the command
/// line must name that directory, so a reused PID is never taken for ours.
pub fn pid_alive(pid: u32, dir: &Path) -> bool {
    crate::host::process::process(pid).is_some_and(|p| is_qemu_of(&p, dir))
}

/// `p` runs and is the QEMU of the workload in `dir` (its QMP socket is there).
fn is_qemu_of(p: &crate::host::process::ProcessEntry, dir: &Path) -> bool {
    p.runs() && p.cmdline_contains(&format!("{}/qmp.sock", dir.display()))
}

async fn wait_exit(pid: u32, dir: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while pid_alive(pid, dir) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// SIGKILL the workload's QEMU, only after checking the PID is still that QEMU.
async fn kill_pid(pid: u32, dir: &Path) {
    if !pid_alive(pid, dir) {
        return;
    }
    tracing::info!("killing qemu pid {pid} of {}", dir.display());
    // checked again once the process is held, so a pid reused since is never signalled
    let ours = |p: &crate::host::process::ProcessEntry| is_qemu_of(p, dir);
    if let Err(e) = crate::host::process::signal_if(pid, crate::host::process::Signal::KILL, ours) {
        tracing::warn!("cannot kill qemu pid {pid}: {e}");
    }
}

/// Kill whatever QEMU the pidfile in `files` names and wait for it to go.
async fn kill_vm(files: &VmFiles) {
    if let Some(pid) = read_pid(files) {
        kill_pid(pid, &files.dir).await;
        wait_exit(pid, &files.dir, Duration::from_secs(5)).await;
    }
}

/// `qemu-system-x86_64 --version` -> "10.0.2".
async fn qemu_version(qemu: &Path) -> Result<String, String> {
    if !qemu.exists() {
        return Err(format!("qemu not found at {}", qemu.display()));
    }
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(qemu).arg("--version").kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| format!("{} --version timed out", qemu.display()))?
    .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("QEMU emulator version "))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| format!("{} --version said {:?}", qemu.display(), text.trim()))
}

/// Build (or reuse) the VM artifact of `image` under `root/<digest>/`.
fn build_artifact(root: &Path, image: &ResolvedImage, paths: &HostPaths) -> Result<CachedArtifact, RuntimeError> {
    let img_err = |reason: String| RuntimeError::Image { reference: image.reference.clone(), reason };
    let key: String = image
        .manifest_digest
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect();
    if key.is_empty() {
        return Err(img_err(format!("no manifest digest for {}", image.tar.display())));
    }
    // the init script is away's, not the image's: a new init needs a new cache entry
    let key = format!("{key}-init{}", away_image::vm::VM_INIT_VERSION);
    let dir = root.join(&key);
    if let Some(a) = read_artifact(&dir) {
        return Ok(a);
    }
    let read = away_image::read_image_tar(&image.tar)
        .map_err(|e| img_err(format!("cannot read {}: {e}", image.tar.display())))?;
    std::fs::create_dir_all(root).map_err(|e| RuntimeError::io(format!("create {}", root.display()), e))?;
    // Build beside the final place, then rename: a concurrent run never sees half an artifact.
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{key}-"))
        .tempdir_in(root)
        .map_err(|e| RuntimeError::io(format!("create a temp dir in {}", root.display()), e))?;
    let opts = away_image::VmOptions {
        kernel: paths.guest_kernel.clone(),
        busybox: paths.busybox.clone(),
        ..Default::default()
    };
    let started = Instant::now();
    away_image::write_vm_artifact(&read.image, "vm", tmp.path(), &opts, &|p| {
        tracing::debug!("vm artifact of {}: {p}", image.reference)
    })
    .map_err(|e| match e {
        away_image::VmError::Module { .. } => RuntimeError::Unavailable { runtime: KIND, reason: e.to_string() },
        away_image::VmError::Io { .. } => RuntimeError::Failed {
            runtime: KIND,
            op: "build the vm artifact of",
            name: image.reference.clone(),
            message: away_model::error_chain(&e),
        },
        other => img_err(other.to_string()),
    })?;
    match std::fs::rename(tmp.path(), &dir) {
        Ok(()) => {
            let _ = tmp.keep();
        }
        // Someone else finished first: theirs is as good (same digest); ours is dropped.
        Err(_) if read_artifact(&dir).is_some() => {}
        Err(e) => return Err(RuntimeError::io(format!("rename {} to {}", tmp.path().display(), dir.display()), e)),
    }
    tracing::info!(
        "vm artifact of {} in {} ({:.1} s)",
        image.reference,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    read_artifact(&dir).ok_or_else(|| img_err(format!("vm artifact {} is incomplete", dir.display())))
}

/// A complete cached artifact in `dir` (the JSON is written last).
fn read_artifact(dir: &Path) -> Option<CachedArtifact> {
    let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("vm.vm.json")).ok()?).ok()?;
    let s = |k: &str| spec.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let a = CachedArtifact {
        dir: dir.to_path_buf(),
        kernel: dir.join(s("kernel")?),
        initrd: dir.join(s("initrd")?),
        cmdline: s("cmdline")?,
        nic: s("nic")?,
    };
    (a.kernel.is_file() && a.initrd.is_file()).then_some(a)
}
