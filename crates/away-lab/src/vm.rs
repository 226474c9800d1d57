//! VM runs: two QEMU runtimes on this host (own state directories, standing in for two
//! nodes), the memload VM booted on the first, and QEMU's migration stream sent to the
//! second through the link: the destination listens on a port, the source dials the
//! link's front instead (see [`LinkedVmTarget`]). With the packet link, each runtime
//! starts its QEMU through an `nsenter` wrapper: the source QEMU lives in namespace A, the
//! destination in namespace B, and QEMU's own migration TCP crosses the link (QMP stays
//! on unix sockets, reachable from the host).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use away_migrate::vm::{
    migrate_vm_to, LocalVmTarget, VmListen, VmMigrateError, VmMigrationOptions, VmProgress, VmTarget, VmTls,
};
use away_model::{error_chain, Accel};
use away_model::{ByteSize, Resources, WorkloadSpec};
use away_runtime::host::HostPaths;
use away_runtime::qemu::QemuRuntime;
use away_runtime::store::{read_resolved, ResolvedImage};
use away_runtime::{RunRequest, Runtime};

use crate::link::{LinkEmulator, LinkFront, PacketSides};
use crate::{CompareOptions, LabError, MigrationPath, PlannedRun, RunOutcome, RunResult};

/// A TCG boot takes 8-12 s and memload then fills its memory; allow for a loaded host.
const BOOT_AND_FILL: Duration = Duration::from_secs(180);

/// multifd channels of the multifd paths (QEMU's default; the host has 2 cores).
const MULTIFD_CHANNELS: u32 = 2;

/// The `vm-disk` path's disk, as the e2e test has it.
pub(crate) const DISK_BYTES: u64 = 256 << 20;
/// Where the guest mounts it and memload writes (the container's volume has the same path).
pub(crate) const DISK_MOUNT: &str = "/data";

pub struct VmLab {
    work: PathBuf,
    accel: Accel,
    accel_reason: String,
    image: ResolvedImage,
    /// QEMU's refusal of multifd with post-copy (None: accepted, or not asked).
    multifd_postcopy_refused: Option<String>,
    /// The `vm-disk` path's base: an empty ext4 in a qcow2, made once, put into both
    /// nodes' disk stores before each run (a node that lacks it gets it copied once by
    /// the move; the lab measures the moves after that, as for the image).
    blank_disk: Option<PathBuf>,
}

impl VmLab {
    pub async fn new(opts: &CompareOptions, work: &Path) -> Result<VmLab, LabError> {
        let paths = HostPaths::default();
        for (what, path) in [("qemu", &paths.qemu), ("guest kernel", &paths.guest_kernel)] {
            if !path.exists() {
                return Err(LabError::Missing {
                    what: format!("{what} {}", path.display()),
                    hint: "install it with deploy/install.sh, or leave the vm paths out".into(),
                });
            }
        }
        let probe = QemuRuntime::detect(work.join("probe"), paths).await;
        let image = read_resolved(&opts.image, None).map_err(|e| LabError::Missing {
            what: format!("a readable memload image at {}", opts.image.display()),
            hint: e.to_string(),
        })?;
        let multifd_postcopy_refused = if opts.paths.contains(&MigrationPath::VmMultifdZstdPostcopy) {
            probe_multifd_postcopy(&work.join("probe-mfpc")).await.err()
        } else {
            None
        };
        let blank_disk = if opts.paths.contains(&MigrationPath::VmDisk) {
            let path = work.join("blank-disk.qcow2");
            away_image::write_blank_disk_image(&path, DISK_BYTES).map_err(|e| LabError::Missing {
                what: format!("a blank disk image at {} for vm-disk", path.display()),
                hint: format!("{} (mkfs.ext4 and qemu-img come with deploy/install.sh)", error_chain(&e)),
            })?;
            Some(path)
        } else {
            None
        };
        Ok(VmLab {
            blank_disk,
            work: work.to_path_buf(),
            accel: probe.accel(),
            accel_reason: probe.accel().to_string(),
            image,
            multifd_postcopy_refused,
        })
    }

    pub fn accel_reason(&self) -> String {
        self.accel_reason.clone()
    }

    pub async fn run(
        &self,
        opts: &CompareOptions,
        planned: &PlannedRun,
        identities: Option<&crate::LabIdentities>,
        status: &(dyn Fn(String) + Sync),
    ) -> RunResult {
        if let (MigrationPath::VmMultifdZstdPostcopy, Some(why)) = (planned.path, &self.multifd_postcopy_refused) {
            // no boot: QEMU refuses the capabilities before anything moves
            return RunResult::new(planned, RunOutcome::Failed, Duration::ZERO, None)
                .with_notes(format!("failed: qemu refuses multifd with post-copy: {why}"));
        }
        let dir = self.work.join(format!("v{}", planned.run));
        let name = format!("labvm{}", planned.run);
        let reason = format!("{} (away lab)", self.accel);
        let mut link = None;
        let result = async {
            let (paths_a, paths_b, target_host) = match opts.link_emulator {
                LinkEmulator::Packet => {
                    status("bringing up the packet link".into());
                    let sides = PacketSides::up(&PacketSides::name_for(planned.run), planned.link.profile()).await?;
                    if planned.overlay {
                        status("building the overlay".into());
                        crate::overlay::build(&sides).await?;
                    }
                    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
                    let a = qemu_in_netns(&dir.join("qemu-a"), sides.a())?;
                    let b = qemu_in_netns(&dir.join("qemu-b"), sides.b())?;
                    let host = sides.b().addr.to_string();
                    link = Some(sides);
                    (a, b, host)
                }
                LinkEmulator::SplitTcpProxy => (HostPaths::default(), HostPaths::default(), "127.0.0.1".to_string()),
            };
            let mut source = QemuRuntime::new(dir.join("a"), paths_a, self.accel).with_reason(reason.clone());
            let mut target = QemuRuntime::new(dir.join("b"), paths_b, self.accel).with_reason(reason.clone());
            // on the overlay each QEMU's tap goes on its side's bridge, in its namespace
            if let (true, Some(sides)) = (planned.overlay, &link) {
                source = source.with_netns(away_overlay::netns_path(&sides.a().netns));
                target = target.with_netns(away_overlay::netns_path(&sides.b().netns));
            }
            let result = self.attempt(opts, planned, (&source, &target), identities, &name, &target_host, status).await;
            status("cleaning up".into());
            let _ = source.remove(&name).await;
            let _ = target.remove(&name).await;
            result
        }
        .await;
        kill_qemus_in(&dir);
        if let Some(l) = link {
            l.down().await;
        }
        let _ = std::fs::remove_dir_all(&dir);
        result.unwrap_or_else(|e| {
            RunResult::new(planned, RunOutcome::Failed, Duration::ZERO, None).with_notes(format!("failed: {e}"))
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        opts: &CompareOptions,
        planned: &PlannedRun,
        (source, target): (&QemuRuntime, &QemuRuntime),
        identities: Option<&crate::LabIdentities>,
        name: &str,
        target_host: &str,
        status: &(dyn Fn(String) + Sync),
    ) -> Result<RunResult, String> {
        status(format!("booting the vm ({} MiB, {})", opts.vm_ram.as_mib(), self.accel));
        let mut spec = spec(name, opts, planned);
        if planned.overlay {
            spec.overlay = Some(crate::overlay::workload_address());
        }
        if let (MigrationPath::VmDisk, Some(blank)) = (planned.path, &self.blank_disk) {
            let import = |node: &QemuRuntime| {
                node.disk_store().import(blank).map_err(|e| format!("put the blank disk base in a store: {e}"))
            };
            import(target)?;
            let base = import(source)?;
            spec.disk = Some(away_model::DiskSpec {
                base: base.digest,
                size: ByteSize(DISK_BYTES),
                mount: Some(DISK_MOUNT.into()),
            });
        }
        source
            .run(&RunRequest { spec, image: self.image.clone() })
            .await
            .map_err(|e| format!("boot the memload vm: {e}"))?;
        let serial = source.files(name).serial_log();
        let t = Instant::now();
        loop {
            let log = std::fs::read_to_string(&serial).unwrap_or_default();
            if log.contains("pages resident") {
                break;
            }
            if t.elapsed() > BOOT_AND_FILL {
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
                return Err(format!(
                    "memload in the vm did not report its pages resident within {} s (serial: {tail})",
                    BOOT_AND_FILL.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;

        let port = away_runtime::host::free_loopback_port().map_err(|e| format!("find a free port: {e}"))?;
        let timeout = opts.vm_timeout(planned.link);
        let multifd = matches!(planned.path, MigrationPath::VmMultifdZstd | MigrationPath::VmMultifdZstdPostcopy);
        let mig = VmMigrationOptions {
            auto_converge: planned.path == MigrationPath::VmAutoConverge,
            postcopy: matches!(planned.path, MigrationPath::VmPostcopy | MigrationPath::VmMultifdZstdPostcopy),
            multifd: multifd.then_some(MULTIFD_CHANNELS),
            multifd_compression: multifd.then_some(away_migrate::transfer::Compression::Zstd { level: 1 }),
            postcopy_after_passes: 1,
            timeout,
            listen_host: target_host.into(),
            target_host: target_host.into(),
            ..VmMigrationOptions::default()
        };
        // QEMU's TLS with the lab's identities (each end checks the other's node name)
        let tls = |i: &crate::LabIdentities, source: bool| {
            let (me, peer) = if source { (&i.source, &i.target) } else { (&i.target, &i.source) };
            VmTls::new(me.clone(), peer.name()).map_err(|e| format!("the VM move's TLS: {e}"))
        };
        let (source_tls, dest_tls) = match identities {
            Some(i) => (Some(tls(i, true)?), Some(tls(i, false)?)),
            None => (None, None),
        };
        let mut dest = LinkedVmTarget {
            inner: LocalVmTarget { runtime: target.clone(), port, dest: None, tls: dest_tls },
            emulator: opts.link_emulator,
            profile: planned.link.profile(),
            front: None,
            disk_front: None,
        };
        status(format!("migrating over {} (limit {:.0} s)", planned.link, timeout.as_secs_f64()));
        let show = |p: VmProgress| {
            let pct = if p.ram_total > 0 { p.transferred as f64 * 100.0 / p.ram_total as f64 } else { 0.0 };
            status(format!(
                "migrating: {:.0} s, pass {}, {:.0} % of RAM sent, {:.1} Mbit/s{}",
                p.elapsed.as_secs_f64(),
                p.pass,
                pct,
                p.mbps,
                if p.postcopy { ", post-copy" } else { "" }
            ));
        };
        status("measuring the guest's dirty rate for the prediction".into());
        let predicted = predict(opts, planned, source, name, &mig).await;
        // timed like every path (crate::timed_total): from here to the destination running
        // with the whole guest (pre-copy: its RESUME; post-copy: the migration's end)
        let start_ms = crate::unix_ms();
        let result = migrate_vm_to(source, &mut dest, name, &self.image, &mig, source_tls.as_ref(), show).await;
        self.outcome(opts, planned, timeout, start_ms, result, predicted)
    }

    fn outcome(
        &self,
        opts: &CompareOptions,
        planned: &PlannedRun,
        timeout: Duration,
        start_ms: u64,
        result: Result<(away_model::MigrationReport, away_migrate::vm::VmMigrationOutcome), VmMigrateError>,
        predicted: Option<(away_model::MovePrediction, away_model::PhaseCosts)>,
    ) -> Result<RunResult, String> {
        let (predicted, costs) = predicted.unzip();
        match result {
            Ok((mut report, outcome)) => {
                // as a node keeps it: with its prediction, whose misses teach the next
                report.predicted = predicted.clone();
                if let Err(e) = history(opts).record(away_model::RuntimeKind::Qemu, &report, costs.as_ref()) {
                    tracing::warn!("cannot keep the move in the experiment's history: {e}");
                }
                let phase = |n: &str| report.phases.iter().find(|p| p.name == n).map_or(0, |p| p.millis);
                let migrated_ms = start_ms + phase("prepare-destination") + phase("migrate");
                let total = crate::timed_total(start_ms, report.resumed_unix_ms.map(|r| r.max(migrated_ms)))
                    .unwrap_or(Duration::from_millis(report.total_millis));
                let mut notes = vec![format!("{} passes", outcome.passes)];
                notes.push(format!("qemu downtime {} ms", outcome.qemu_downtime.as_millis()));
                if outcome.postcopy {
                    notes.push(format!("post-copy ({} page requests)", outcome.postcopy_requests));
                }
                if outcome.max_cpu_throttle_percent > 0 {
                    notes.push(format!("vCPU throttled up to {} %", outcome.max_cpu_throttle_percent));
                }
                let phases: Vec<String> =
                    report.phases.iter().map(|p| format!("{} {:.2}s", p.name, p.millis as f64 / 1000.0)).collect();
                notes.push(phases.join(" "));
                notes.push(format!("away's own total {:.2}s", report.total_millis as f64 / 1000.0));
                if planned.path.writes_disk() {
                    notes.push(format!(
                        "disk: {:.1} MB of overlay mirrored over nbd, ram stream {:.1} MB",
                        outcome.disk_bytes as f64 / 1e6,
                        outcome.bytes_wire as f64 / 1e6
                    ));
                }
                Ok(RunResult::new(
                    planned,
                    RunOutcome::Moved,
                    total,
                    Some(Duration::from_millis(report.downtime_millis)),
                )
                .with_degraded(outcome.postcopy.then(|| Duration::from_millis(report.degraded_millis)))
                .with_bytes(outcome.bytes_wire + outcome.disk_bytes, outcome.ram_total + outcome.disk_bytes)
                .with_disk(planned.path.writes_disk().then_some(outcome.disk_bytes))
                .with_notes(notes.join("; "))
                .with_predicted(predicted))
            }
            // The time limit, not a failure: pre-copy did not converge and was cancelled.
            Err(VmMigrateError::Aborted { cause, report, .. }) if matches!(*cause, VmMigrateError::TimedOut { .. }) => {
                Ok(RunResult::new(planned, RunOutcome::NotConverged, Duration::from_millis(report.total_millis), None)
                    .with_bytes(report.bytes_wire, opts.vm_ram.bytes())
                    .with_notes(format!(
                        "not converged: cancelled after {:.0} s, the vm stayed on the source",
                        timeout.as_secs_f64()
                    ))
                    .with_predicted(predicted))
            }
            Err(e) => Err(error_chain(&e)),
        }
    }
}

/// The prediction of this VM run (`away_predict`), before it starts: the guest's
/// writes as QEMU measures them (rate, working set), its non-zero share from the QEMU
/// process's resident memory, the link's rate and round trip as emulated (the lab has
/// no agent to probe at the VM's far end: these are the emulator's settings), phase
/// costs learned from the experiment's earlier VM moves (QEMU's defaults before the
/// first). None when QEMU cannot measure.
async fn predict(
    opts: &CompareOptions,
    planned: &PlannedRun,
    source: &QemuRuntime,
    name: &str,
    mig: &VmMigrationOptions,
) -> Option<(away_model::MovePrediction, away_model::PhaseCosts)> {
    let kind = match planned.path {
        MigrationPath::VmPrecopy => away_model::MoveKind::VmPrecopy,
        MigrationPath::VmAutoConverge => away_model::MoveKind::VmAutoConverge,
        MigrationPath::VmPostcopy | MigrationPath::VmMultifdZstdPostcopy => away_model::MoveKind::VmPostcopy,
        MigrationPath::VmMultifdZstd => away_model::MoveKind::VmMultifd,
        // the model has no disk mirror (yet): no prediction rather than a wrong one
        _ => return None,
    };
    let writes = match away_migrate::estimate::measure_guest_writes(source, name).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("no prediction for {name}: {}", error_chain(&e));
            return None;
        }
    };
    let ram = opts.vm_ram.bytes();
    // the guest's non-zero share, as away_migrate's VM plans measure it
    let pid = source.status(name).await.ok().and_then(|s| s.pid);
    let nonzero =
        pid.and_then(|pid| away_migrate::estimate::sample_guest(pid, ram).ok()).map_or(1.0, |g| g.nonzero_fraction);
    let profile = planned.link.profile();
    let inputs = away_model::PredictionInputs {
        state_bytes: ram,
        // memload's pages: half random (what the container runs' samples show)
        compress_ratio: 0.5,
        nonzero_fraction: nonzero,
        dirty_bytes_per_s: writes.dirty_bytes_per_s,
        dirty_set_bytes: writes.dirty_set_bytes,
        vm_stream_backlog_bytes: away_migrate::estimate::vm_stream_backlog().0,
        link_bytes_per_s: profile.rate_bits_per_sec / 8.0,
        rtt_ms: profile.rtt().as_secs_f64() * 1e3,
        costs: history(opts).costs(away_model::RuntimeKind::Qemu).0,
        vm_max_downtime_ms: mig.max_downtime_ms.unwrap_or(300) as f64,
        vm_timeout_s: mig.timeout.as_secs_f64(),
        sources: writes.sources,
    };
    Some((away_predict::predict(kind, &inputs), inputs.costs))
}

/// The experiment's move history, one node's across the runs as on a real node (the
/// container runs carry theirs in the same file; each runtime learns from its own).
fn history(opts: &CompareOptions) -> away_migrate::estimate::History {
    away_migrate::estimate::History::of(&opts.out_dir.join("logs"))
}

fn spec(name: &str, opts: &CompareOptions, planned: &PlannedRun) -> WorkloadSpec {
    let (cpu, ram) = planned.load.memload_env();
    WorkloadSpec {
        name: name.into(),
        image: "memload".into(),
        kind: away_model::WorkloadKind::Vm,
        command: None,
        env: [
            ("MEMLOAD_SIZE".to_string(), opts.app_ram.bytes().to_string()),
            ("MEMLOAD_CPU".into(), cpu.to_string()),
            ("MEMLOAD_RAM".into(), ram.to_string()),
            ("MEMLOAD_CPU_THREADS".into(), opts.cpu_threads.to_string()),
            ("MEMLOAD_PORT".into(), "0".into()),
        ]
        .into_iter()
        .chain(disk_env(opts, planned))
        .collect(),
        ports: Vec::new(),
        resources: Resources { memory: ByteSize(opts.vm_ram.bytes()), cpus: 1.0 },
        placement: Default::default(),
        labels: Default::default(),
        user: None,
        capabilities: Default::default(),
        seccomp: Default::default(),
        disk: None,
        volumes: Vec::new(),
        network: None,
        overlay: None,
    }
}

/// A destination QEMU on this host reached through the link: it listens on its own
/// port, and the source is given the link front's address instead; a VM with a disk
/// has its NBD export behind a front of its own (the mirror crosses the link too).
pub struct LinkedVmTarget {
    pub inner: LocalVmTarget,
    pub emulator: LinkEmulator,
    pub profile: away_link::LinkProfile,
    pub front: Option<LinkFront>,
    pub disk_front: Option<LinkFront>,
}

#[async_trait::async_trait]
impl VmTarget for LinkedVmTarget {
    fn describe(&self) -> String {
        format!("{} through the emulated link", self.inner.describe())
    }

    async fn prepare(
        &mut self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        opts: &VmMigrationOptions,
    ) -> Result<VmListen, VmMigrateError> {
        let listen = self.inner.prepare(spec, image, opts).await?;
        if self.emulator == LinkEmulator::Packet {
            // the destination QEMU listens in namespace B; the source dials it from A
            return Ok(listen);
        }
        let upstream = SocketAddr::from(([127, 0, 0, 1], self.inner.port));
        let disk = self.inner.disk_export(opts).map(|(_, port)| SocketAddr::from(([127, 0, 0, 1], port)));
        let fronts = async {
            let front = self.emulator.start(upstream, self.profile).await?;
            let disk_front = match disk {
                Some(upstream) => Some(self.emulator.start(upstream, self.profile).await?),
                None => None,
            };
            Ok::<_, std::io::Error>((front, disk_front))
        };
        match fronts.await {
            Ok((front, disk_front)) => {
                let uri = format!("tcp:{}", front.addr);
                self.front = Some(front);
                self.disk_front = disk_front;
                Ok(VmListen { uri, ..listen })
            }
            Err(e) => {
                let _ = self.inner.abort().await;
                Err(VmMigrateError::Invalid { field: "link".into(), reason: format!("start the link: {e}") })
            }
        }
    }

    async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError> {
        self.inner.wait_resumed(limit).await
    }

    async fn confirm(&mut self) -> away_migrate::vm::VmCommit {
        (self.front, self.disk_front) = (None, None);
        self.inner.confirm().await
    }

    async fn abort(&mut self) -> Result<(), VmMigrateError> {
        (self.front, self.disk_front) = (None, None);
        self.inner.abort().await
    }

    async fn ensure_base(&mut self, base: &away_runtime::qemu::BaseImage) -> Result<bool, VmMigrateError> {
        self.inner.ensure_base(base).await
    }

    fn disk_export(&self, opts: &VmMigrationOptions) -> Option<(String, u16)> {
        match &self.disk_front {
            Some(front) => Some((front.addr.ip().to_string(), front.addr.port())),
            // the packet link: the export listens in namespace B, reached from A directly
            None => self.inner.disk_export(opts),
        }
    }
}

/// Host paths whose `qemu` is a wrapper at `wrapper` that runs the real QEMU in
/// `end`'s network namespace (QEMU daemonizes from there and stays in it).
fn qemu_in_netns(wrapper: &Path, end: &away_link::packet::Endpoint) -> Result<HostPaths, String> {
    use std::os::unix::fs::PermissionsExt;
    let paths = HostPaths::default();
    let script = format!(
        "#!/bin/sh\nexec nsenter --net=/run/netns/{} -- '{}' \"$@\"\n",
        end.netns,
        paths.qemu.display().to_string().replace('\'', "'\\''")
    );
    std::fs::write(wrapper, script)
        .and_then(|()| std::fs::set_permissions(wrapper, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("write {}: {e}", wrapper.display()))?;
    Ok(HostPaths { qemu: wrapper.to_path_buf(), ..paths })
}

/// Ask a QEMU without a guest (`-machine none`) whether it takes multifd and post-copy
/// together; Err carries its answer (QEMU 10.0: "Postcopy is not yet compatible with
/// multifd"; 10.1 allows it).
async fn probe_multifd_postcopy(dir: &Path) -> Result<(), String> {
    use away_runtime::qemu::qmp::commands::{MigrateSetCapabilities, MigrationCapability, MigrationCapabilityStatus};
    use away_runtime::qemu::qmp::Qmp;
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let socket = dir.join("qmp.sock");
    let mut qemu = tokio::process::Command::new(HostPaths::default().qemu)
        .args(["-machine", "none", "-nodefaults", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start qemu: {e}"))?;
    let t = Instant::now();
    while !socket.exists() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = async {
        let mut q = Qmp::connect(&socket, Duration::from_secs(10)).await.map_err(|e| error_chain(&e))?;
        let caps = MigrateSetCapabilities {
            capabilities: [MigrationCapability::Multifd, MigrationCapability::PostcopyRam]
                .into_iter()
                .map(|capability| MigrationCapabilityStatus { capability, state: true })
                .collect(),
        };
        q.execute(&caps).await.map(|_| ()).map_err(|e| error_chain(&e))
    }
    .await;
    let _ = qemu.kill().await;
    let _ = std::fs::remove_dir_all(dir);
    asked
}

/// Kill the QEMUs this lab started under `dir` (found by their command line naming it).
fn kill_qemus_in(dir: &Path) {
    use away_runtime::host::process::{kill_where, Signal};
    let needle = format!("{}/", dir.display());
    let killed = kill_where(|p| p.cmdline_contains("qemu") && p.cmdline_contains(&needle), Signal::KILL);
    for pid in killed {
        tracing::warn!(pid, "killed a qemu the lab left behind");
    }
}

/// memload's disk writes in the paths that have them: `disk_rate` bytes per second to
/// [`DISK_MOUNT`] (the VM's disk, the container's volume).
pub(crate) fn disk_env(opts: &CompareOptions, planned: &PlannedRun) -> Vec<(String, String)> {
    if !planned.path.writes_disk() {
        return Vec::new();
    }
    vec![
        ("MEMLOAD_DISK_RATE".into(), opts.disk_rate.bytes().to_string()),
        ("MEMLOAD_DISK_DIR".into(), DISK_MOUNT.into()),
    ]
}
