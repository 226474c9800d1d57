//! QEMU live migration between two QEMU processes over TCP (one per node).
//!
//! The destination QEMU starts with the source's command line (same machine type,
//! memory, kernel and initrd: the same image digest) and `-incoming defer`; the
//! capabilities that must match on both ends (`multifd`, `postcopy-ram`) and the
//! multifd channel count are set on it over QMP, then `migrate-incoming` opens the TCP
//! listener. The source gets its capabilities (`auto-converge`, `xbzrle`, `multifd`,
//! `postcopy-ram`) and parameters (`downtime-limit`, `max-bandwidth`,
//! `multifd-channels`, `xbzrle-cache-size`), then `migrate`. `query-migrate` is polled
//! for progress; post-copy starts (`migrate-start-postcopy`) after a given number of
//! full pre-copy passes; a migration still in pre-copy when the time limit passes is
//! cancelled (`migrate_cancel`) and the source is checked to run again.
//!
//! The move never loses the workload: the source is removed only after the
//! destination reports "running"; on any failure before that, the destination is
//! killed and removed and the source resumed. Once post-copy has started the guest's
//! memory is split between both ends, so nothing is cancelled or killed any more.
//!
//! Two downtimes are recorded. QEMU's own `downtime` stops its clock when the last
//! bytes enter the socket, before the destination has loaded them. The workload's
//! downtime is measured from the source's `STOP` event to the destination's `RESUME`
//! event, using the timestamps QEMU puts on the events (the host's wall clock). On two
//! hosts that figure is only as good as their clock sync (NTP/PTP); when it comes out
//! negative, QEMU's figure is reported instead.
//!
//! Disks: away's VMs boot from kernel + initramfs and have no block devices, so there
//! is nothing to copy. A VM that has a writable disk is refused (QEMU 10 removed block
//! migration; mirroring over NBD is not implemented here).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use away_model::{MigrationMode, MigrationPhase, MigrationReport, WorkloadSpec};
use away_runtime::qemu::{pid_alive, QemuRuntime, Qmp, QmpError, VmFiles, VmRecord};
use away_runtime::{ResolvedImage, Runtime, RuntimeError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Bound on each QMP command (a migration command returns at once; the work is polled).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to resume after the source reports completion.
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a `migrate_cancel` may take to settle.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// QEMU's upper bound for `downtime-limit` (2000 s).
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// How a VM moves. `Default` is plain pre-copy, QEMU's default downtime limit and
/// bandwidth, cancelled after 10 minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmMigrationOptions {
    /// Throttle the guest's vCPUs when pre-copy does not converge (`auto-converge`).
    pub auto_converge: bool,
    /// Send only the changed bytes of pages sent before (`xbzrle`; not with multifd).
    pub xbzrle: bool,
    /// xbzrle cache size in bytes; None keeps QEMU's default (64 MiB).
    pub xbzrle_cache_bytes: Option<u64>,
    /// Send RAM over this many parallel TCP connections (`multifd`).
    pub multifd: Option<u32>,
    /// Switch to post-copy (`postcopy-ram`): the guest runs on the destination and
    /// pulls the remaining pages on demand.
    pub postcopy: bool,
    /// Full pre-copy passes before post-copy starts: 1 = right after the first pass
    /// (the usual choice), higher values give pre-copy that many passes to converge
    /// first, 0 = at once (pure post-copy: every page moves after the switch). A
    /// pre-copy that converges before then completes without post-copy.
    pub postcopy_after_passes: u64,
    /// Longest pause QEMU may take for the final copy (`downtime-limit`, ms).
    pub max_downtime_ms: Option<u64>,
    /// Cap on migration bandwidth (`max-bandwidth`, bytes/s).
    pub bandwidth_limit_bytes_per_s: Option<u64>,
    /// A migration still in pre-copy after this long is cancelled; the VM keeps running
    /// on the source.
    pub timeout: Duration,
    /// Address the destination listens on.
    pub listen_host: String,
    /// Address the source connects to (used by [`migrate_vm`]; the destination node's
    /// address on a real network).
    pub target_host: String,
    /// Guest port -> host port on the destination, for forwarded ports that must differ
    /// from the source's (two QEMUs on one host). Port forwards are netdev
    /// configuration, not migrated state: the destination's own command line decides.
    pub target_ports: BTreeMap<u16, u16>,
    /// How often `query-migrate` is polled (and progress reported).
    pub poll_interval: Duration,
}

impl Default for VmMigrationOptions {
    fn default() -> Self {
        VmMigrationOptions {
            auto_converge: false,
            xbzrle: false,
            xbzrle_cache_bytes: None,
            multifd: None,
            postcopy: false,
            postcopy_after_passes: 1,
            max_downtime_ms: None,
            bandwidth_limit_bytes_per_s: None,
            timeout: Duration::from_secs(600),
            listen_host: "0.0.0.0".into(),
            target_host: "127.0.0.1".into(),
            target_ports: BTreeMap::new(),
            poll_interval: Duration::from_millis(100),
        }
    }
}

impl VmMigrationOptions {
    /// Refuse combinations QEMU rejects or that make no sense, naming the field.
    pub fn validate(&self) -> Result<(), VmMigrateError> {
        let invalid = |field: &str, reason: &str| {
            Err(VmMigrateError::Invalid { field: field.to_string(), reason: reason.to_string() })
        };
        if let Some(n) = self.multifd {
            if n == 0 || n > 255 {
                return invalid("multifd", "channels must be between 1 and 255");
            }
            if self.xbzrle {
                return invalid("xbzrle", "qemu does not combine xbzrle with multifd");
            }
        }
        if self.max_downtime_ms.is_some_and(|ms| ms > MAX_DOWNTIME_LIMIT_MS) {
            return invalid("max_downtime_ms", "qemu accepts at most 2000000 ms");
        }
        if self.bandwidth_limit_bytes_per_s == Some(0) {
            return invalid("bandwidth_limit_bytes_per_s", "must be more than 0 (leave it unset for no limit)");
        }
        if self.xbzrle_cache_bytes.is_some_and(|b| b < 4096) {
            return invalid("xbzrle_cache_bytes", "must hold at least one page (4096 bytes)");
        }
        if self.timeout.is_zero() {
            return invalid("timeout", "must be more than 0");
        }
        if self.poll_interval.is_zero() {
            return invalid("poll_interval", "must be more than 0");
        }
        Ok(())
    }

    /// Capabilities the source sets. Every one is set explicitly, on or off, so a
    /// reused QEMU does not carry over an earlier choice.
    fn source_capabilities(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("auto-converge", self.auto_converge),
            ("xbzrle", self.xbzrle),
            ("multifd", self.multifd.is_some()),
            ("postcopy-ram", self.postcopy),
        ]
    }

    /// Capabilities that must match on the destination.
    fn destination_capabilities(&self) -> Vec<(&'static str, bool)> {
        vec![("multifd", self.multifd.is_some()), ("postcopy-ram", self.postcopy)]
    }

    fn source_parameters(&self) -> Value {
        let mut p = serde_json::Map::new();
        if let Some(ms) = self.max_downtime_ms {
            p.insert("downtime-limit".into(), json!(ms));
        }
        if let Some(b) = self.bandwidth_limit_bytes_per_s {
            p.insert("max-bandwidth".into(), json!(b));
        }
        if let Some(n) = self.multifd {
            p.insert("multifd-channels".into(), json!(n));
        }
        if let (true, Some(b)) = (self.xbzrle, self.xbzrle_cache_bytes) {
            p.insert("xbzrle-cache-size".into(), json!(b));
        }
        Value::Object(p)
    }

    /// One line for reports: what was switched on.
    fn describe(&self) -> String {
        let mut on: Vec<String> = Vec::new();
        if self.auto_converge {
            on.push("auto-converge".into());
        }
        if self.xbzrle {
            on.push("xbzrle".into());
        }
        if let Some(n) = self.multifd {
            on.push(format!("multifd ({n} channels)"));
        }
        if self.postcopy {
            on.push(format!("postcopy-ram (after {} pass(es))", self.postcopy_after_passes));
        }
        if let Some(ms) = self.max_downtime_ms {
            on.push(format!("downtime-limit {ms} ms"));
        }
        if let Some(b) = self.bandwidth_limit_bytes_per_s {
            on.push(format!("max-bandwidth {b} B/s"));
        }
        if on.is_empty() {
            "plain pre-copy".into()
        } else {
            on.join(", ")
        }
    }
}

/// What went wrong in a VM migration. Messages name the workload and, for QMP
/// failures, the command and the end (source or destination) it failed on.
#[derive(Debug, thiserror::Error)]
pub enum VmMigrateError {
    #[error("invalid vm migration options: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("workload {workload}: {op}: {source}")]
    Runtime {
        workload: String,
        op: &'static str,
        #[source]
        source: RuntimeError,
    },
    #[error("workload {workload}: qmp {command} on the {side} failed: {source}")]
    Qmp {
        workload: String,
        side: Side,
        command: String,
        #[source]
        source: QmpError,
    },
    #[error("workload {workload}: the source vm is {state}, not running: only a running vm is live-migrated")]
    SourceNotRunning { workload: String, state: String },
    #[error("workload {workload}: image mismatch: the source vm runs {source_digest}, the destination was given {target_digest}")]
    ImageMismatch { workload: String, source_digest: String, target_digest: String },
    #[error("workload {workload}: writable disk {device} cannot be moved: vm disk migration is not supported")]
    Disk { workload: String, device: String },
    #[error("workload {workload}: migration {status}: {reason}")]
    Failed { workload: String, status: String, reason: String },
    #[error("workload {workload}: migration cancelled after {secs} s (the time limit); the vm runs on the source")]
    TimedOut { workload: String, secs: u64 },
    #[error("workload {workload}: the destination did not resume: {reason}")]
    NotResumed { workload: String, reason: String },
    #[error("workload {workload}: post-copy broke ({status}): the guest's memory is split between source and destination, both are kept (paused) for `migrate-recover`")]
    PostcopyBroken { workload: String, status: String },
    #[error("workload {workload}: the source vm is {state} after the failed migration and did not resume; {reason}")]
    SourceNotResumed { workload: String, state: String, reason: String },
    /// The whole move failed and was rolled back: the workload runs on the source.
    /// `report` holds the phases up to the failure (`ok` false).
    #[error("{reason} (migration of workload {workload} rolled back: destination removed, source running)")]
    Aborted { workload: String, reason: String, report: Box<MigrationReport> },
}

/// Which end of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// One `query-migrate` sample, as the migration goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmProgress {
    pub workload: String,
    /// QEMU's migration status: setup, active, postcopy-active, device, completed, ...
    pub status: String,
    /// Since `migrate` was sent.
    pub elapsed: Duration,
    /// Pre-copy pass: QEMU's `dirty-sync-count` (1 during the first full pass).
    pub pass: u64,
    /// Guest RAM (bytes).
    pub ram_total: u64,
    /// Bytes sent so far (on the wire).
    pub transferred: u64,
    /// Dirty bytes still to send.
    pub remaining: u64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Current throughput (Mbit/s).
    pub mbps: f64,
    pub expected_downtime_ms: Option<u64>,
    /// auto-converge's current vCPU throttle (percent).
    pub cpu_throttle_percent: Option<u64>,
    /// Post-copy has started.
    pub postcopy: bool,
}

/// What a finished live migration measured on the source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmMigrationOutcome {
    pub workload: String,
    /// QEMU's `total-time`: from `migrate` to completion.
    pub total: Duration,
    /// QEMU's `setup-time`.
    pub setup: Duration,
    /// QEMU's own `downtime`: the source's stop until the last bytes entered the
    /// socket (the destination has not loaded them yet).
    pub qemu_downtime: Duration,
    /// Bytes on the wire (`ram.transferred`: RAM pages, xbzrle deltas, zero-page
    /// markers and device state).
    pub bytes_wire: u64,
    /// Guest RAM size (`ram.total`): the raw state that moved.
    pub ram_total: u64,
    /// Bytes of full pages sent (`ram.normal-bytes`).
    pub normal_bytes: u64,
    /// Zero pages sent as markers only (`ram.duplicate`).
    pub zero_pages: u64,
    /// Pre-copy passes (`ram.dirty-sync-count`).
    pub passes: u64,
    /// Pre-copy alone finished the move (no post-copy, no forced stop).
    pub converged: bool,
    /// Post-copy was started.
    pub postcopy: bool,
    /// Pages the destination asked for during post-copy.
    pub postcopy_requests: u64,
    /// Highest vCPU throttle auto-converge applied (percent).
    pub max_cpu_throttle_percent: u64,
    /// xbzrle: bytes of deltas sent, and cache misses (pages sent whole).
    pub xbzrle_bytes: Option<u64>,
    pub xbzrle_cache_misses: Option<u64>,
    /// The source's `STOP` event (QEMU's timestamp, host wall clock).
    pub source_stopped_at: Option<SystemTime>,
    /// Our own clock from `migrate` to completion seen by polling.
    pub wall: Duration,
}

/// A destination QEMU waiting for (or having received) the VM. Call [`Destination::confirm`]
/// once it runs, or [`Destination::abort`]; dropping it leaves the QEMU as it is.
pub struct Destination {
    runtime: QemuRuntime,
    name: String,
    files: VmFiles,
    listen: String,
    qmp: Option<Qmp>,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination")
            .field("name", &self.name)
            .field("dir", &self.files.dir)
            .field("listen", &self.listen)
            .finish()
    }
}

impl Destination {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn files(&self) -> &VmFiles {
        &self.files
    }

    /// The URI the destination listens on (`tcp:HOST:PORT`).
    pub fn listen_uri(&self) -> &str {
        &self.listen
    }

    fn qmp_err(&self, command: &str, source: QmpError) -> VmMigrateError {
        VmMigrateError::Qmp { workload: self.name.clone(), side: Side::Destination, command: command.into(), source }
    }

    /// Wait until the destination runs the VM; Ok(the time of its `RESUME` event).
    /// An incoming migration that fails makes QEMU exit: that is reported with the tail
    /// of its log.
    pub async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError> {
        let deadline = Instant::now() + limit;
        let not_resumed = |name: &str, reason: String| VmMigrateError::NotResumed { workload: name.into(), reason };
        let mut resumed_at = None;
        loop {
            let Some(q) = self.qmp.as_mut() else {
                return Err(not_resumed(&self.name, "the destination's qmp session is closed".into()));
            };
            let state = match q.run_state().await {
                Ok(s) => s,
                Err(e) => {
                    let log = log_tail(&self.files.qemu_log());
                    return Err(not_resumed(&self.name, format!("query-status: {e}; qemu log: {log}")));
                }
            };
            for ev in q.take_events() {
                if ev.name == "RESUME" && resumed_at.is_none() {
                    resumed_at = Some(ev.at);
                }
            }
            if state == "running" {
                return Ok(resumed_at.unwrap_or_else(|| {
                    tracing::warn!(workload = %self.name, "destination runs but sent no RESUME event; using now");
                    SystemTime::now()
                }));
            }
            if let Ok((status, err)) = q.migration_status().await {
                if status == "failed" {
                    return Err(not_resumed(
                        &self.name,
                        format!("incoming migration failed: {}", err.unwrap_or_default()),
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(not_resumed(&self.name, format!("still {state} after {} s", limit.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The VM runs here now: release the QMP session (so others may talk to QEMU).
    pub fn confirm(mut self) -> VmFiles {
        self.qmp = None;
        self.files.clone()
    }

    /// Kill the destination QEMU and remove its state directory.
    pub async fn abort(mut self) -> Result<(), VmMigrateError> {
        // QEMU serves one QMP client at a time: ours must go before `remove` talks to it.
        self.qmp = None;
        match self.runtime.remove(&self.name).await {
            Ok(()) | Err(RuntimeError::NotFound { .. }) => Ok(()),
            Err(source) => {
                Err(VmMigrateError::Runtime { workload: self.name.clone(), op: "remove the destination vm", source })
            }
        }
    }
}

/// Start the destination of `spec` on `target`: QEMU with the source's command line
/// (so `image` must be the source's image, and `spec` its spec apart from host ports),
/// waiting for the stream on `listen_host:listen_port`, with the capabilities that
/// must match the source's set. On failure nothing is left behind.
pub async fn prepare_destination(
    target: &QemuRuntime,
    spec: &WorkloadSpec,
    image: &ResolvedImage,
    listen_port: u16,
    opts: &VmMigrationOptions,
) -> Result<Destination, VmMigrateError> {
    opts.validate()?;
    let name = spec.name.clone();
    let (files, _record) = target
        .start_incoming(spec, image, "defer", None)
        .await
        .map_err(|source| VmMigrateError::Runtime { workload: name.clone(), op: "start the destination vm", source })?;
    let listen = format!("tcp:{}:{listen_port}", opts.listen_host);
    let mut dest = Destination { runtime: target.clone(), name: name.clone(), files, listen, qmp: None };
    let configured = async {
        let socket = dest.files.qmp_socket();
        let mut q = Qmp::connect(&socket, QMP_TIMEOUT).await.map_err(|e| dest.qmp_err("qmp_capabilities", e))?;
        q.execute("migrate-set-capabilities", Some(capabilities_json(&opts.destination_capabilities())))
            .await
            .map_err(|e| dest.qmp_err("migrate-set-capabilities", e))?;
        if let Some(n) = opts.multifd {
            q.execute("migrate-set-parameters", Some(json!({ "multifd-channels": n })))
                .await
                .map_err(|e| dest.qmp_err("migrate-set-parameters", e))?;
        }
        q.execute("migrate-incoming", Some(json!({ "uri": dest.listen })))
            .await
            .map_err(|e| dest.qmp_err("migrate-incoming", e))?;
        // migrate-incoming reports a failed bind only in the migration status.
        let (status, err) = q.migration_status().await.map_err(|e| dest.qmp_err("query-migrate", e))?;
        if status == "failed" {
            return Err(VmMigrateError::Failed {
                workload: dest.name.clone(),
                status,
                reason: format!("listen on {}: {}", dest.listen, err.unwrap_or_default()),
            });
        }
        q.take_events();
        Ok(q)
    }
    .await;
    match configured {
        Ok(q) => {
            dest.qmp = Some(q);
            tracing::info!(workload = %name, dir = %dest.files.dir.display(), "migration destination listening on {}", dest.listen);
            Ok(dest)
        }
        Err(e) => {
            if let Err(cleanup) = dest.abort().await {
                tracing::warn!(workload = %name, "cannot remove the failed destination: {cleanup}");
            }
            Err(e)
        }
    }
}

/// Live-migrate the running VM `name` of `source` to the destination listening at
/// `dest_uri` (`tcp:HOST:PORT`, prepared with the same `opts`). Returns when the
/// source reports the migration completed; the source QEMU is left paused
/// ("postmigrate") for the caller to remove once the destination runs. When the time
/// limit passes in pre-copy, or the migration fails, it is cancelled and the source VM
/// is made to run again before the error is returned.
pub async fn live_migrate(
    source: &QemuRuntime,
    name: &str,
    dest_uri: &str,
    opts: &VmMigrationOptions,
    progress: impl Fn(VmProgress) + Send + Sync,
) -> Result<VmMigrationOutcome, VmMigrateError> {
    opts.validate()?;
    let files = source.files(name);
    if !files.record().is_file() {
        return Err(VmMigrateError::Runtime {
            workload: name.into(),
            op: "find the source vm",
            source: RuntimeError::NotFound { runtime: away_model::RuntimeKind::Qemu, name: name.into() },
        });
    }
    let qmp_err = |command: &str, source: QmpError| VmMigrateError::Qmp {
        workload: name.into(),
        side: Side::Source,
        command: command.into(),
        source,
    };
    let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await.map_err(|e| qmp_err("qmp_capabilities", e))?;
    let state = q.run_state().await.map_err(|e| qmp_err("query-status", e))?;
    if state != "running" {
        return Err(VmMigrateError::SourceNotRunning { workload: name.into(), state });
    }
    refuse_disks(&mut q, name).await?;
    let (status, _) = q.migration_status().await.map_err(|e| qmp_err("query-migrate", e))?;
    if is_migrating(&status) {
        return Err(VmMigrateError::Failed {
            workload: name.into(),
            status,
            reason: "another migration of this vm is in progress".into(),
        });
    }
    q.execute("migrate-set-capabilities", Some(capabilities_json(&opts.source_capabilities())))
        .await
        .map_err(|e| qmp_err("migrate-set-capabilities", e))?;
    let params = opts.source_parameters();
    if params.as_object().is_some_and(|p| !p.is_empty()) {
        q.execute("migrate-set-parameters", Some(params)).await.map_err(|e| qmp_err("migrate-set-parameters", e))?;
    }
    q.take_events();
    tracing::info!(workload = name, "live migration to {dest_uri}: {}", opts.describe());
    let started = Instant::now();
    q.execute("migrate", Some(json!({ "uri": dest_uri }))).await.map_err(|e| qmp_err("migrate", e))?;

    let mut stopped_at: Option<SystemTime> = None;
    let mut postcopy_requested = false;
    let mut in_postcopy = false;
    let mut max_throttle = 0u64;
    let mut warned_postcopy_timeout = false;
    let failure = loop {
        let info = match q.execute("query-migrate", None).await {
            Ok(v) => v,
            Err(e) => break qmp_err("query-migrate", e),
        };
        for ev in q.take_events() {
            if ev.name == "STOP" && stopped_at.is_none() {
                stopped_at = Some(ev.at);
            }
        }
        let p = sample(name, &info, started.elapsed(), in_postcopy);
        let status = p.status.clone();
        in_postcopy |= status.starts_with("postcopy");
        max_throttle = max_throttle.max(p.cpu_throttle_percent.unwrap_or(0));
        let pass = p.pass;
        progress(VmProgress { postcopy: in_postcopy, ..p });
        match status.as_str() {
            "completed" => {
                let wall = started.elapsed();
                // Flush events that came with the completion (the STOP of the final copy).
                if q.run_state().await.is_ok() {
                    for ev in q.take_events() {
                        if ev.name == "STOP" && stopped_at.is_none() {
                            stopped_at = Some(ev.at);
                        }
                    }
                }
                let outcome = outcome(name, &info, stopped_at, in_postcopy, max_throttle, wall);
                tracing::info!(
                    workload = name,
                    "live migration completed: qemu total {} ms, qemu downtime {} ms, {} bytes on the wire, {} passes{}",
                    outcome.total.as_millis(),
                    outcome.qemu_downtime.as_millis(),
                    outcome.bytes_wire,
                    outcome.passes,
                    if outcome.postcopy { ", post-copy" } else { "" }
                );
                return Ok(outcome);
            }
            "failed" | "cancelled" => {
                let reason = info.get("error-desc").and_then(Value::as_str).unwrap_or("no reason given").to_string();
                break VmMigrateError::Failed { workload: name.into(), status, reason };
            }
            "postcopy-paused" | "postcopy-recover-setup" | "postcopy-recover" => {
                return Err(VmMigrateError::PostcopyBroken { workload: name.into(), status });
            }
            _ => {}
        }
        if in_postcopy {
            if started.elapsed() >= opts.timeout && !warned_postcopy_timeout {
                warned_postcopy_timeout = true;
                tracing::warn!(
                    workload = name,
                    "time limit passed in post-copy: it cannot be cancelled any more, waiting for it to finish"
                );
            }
        } else if started.elapsed() >= opts.timeout {
            break VmMigrateError::TimedOut { workload: name.into(), secs: opts.timeout.as_secs() };
        } else if opts.postcopy && !postcopy_requested && status == "active" && pass > opts.postcopy_after_passes {
            match q.execute("migrate-start-postcopy", None).await {
                Ok(_) => {
                    postcopy_requested = true;
                    tracing::info!(workload = name, "post-copy requested after {} full pass(es)", pass - 1);
                }
                Err(e) => break qmp_err("migrate-start-postcopy", e),
            }
        }
        // While a switch to post-copy is due, look often: an idle guest's later passes
        // take milliseconds.
        let wait = if opts.postcopy && !postcopy_requested {
            opts.poll_interval.min(Duration::from_millis(10))
        } else {
            opts.poll_interval
        };
        tokio::time::sleep(wait).await;
    };

    // Pre-copy failed, timed out or lost its QMP answer: cancel and resume the source.
    tracing::warn!(workload = name, "live migration to {dest_uri} stops: {failure}");
    match cancel_and_resume(&mut q, name).await {
        Ok(Some(info)) => {
            // The migration finished while being cancelled: the destination has the VM.
            tracing::info!(workload = name, "the migration completed while being cancelled");
            let outcome = outcome(name, &info, stopped_at, in_postcopy, max_throttle, started.elapsed());
            Ok(outcome)
        }
        Ok(None) => Err(failure),
        Err(e) => Err(e),
    }
}

/// Cancel the migration and make sure the source VM runs. Ok(Some(query-migrate)) when
/// the migration completed instead (the destination has the VM).
async fn cancel_and_resume(q: &mut Qmp, name: &str) -> Result<Option<Value>, VmMigrateError> {
    let not_resumed = |state: &str, reason: String| VmMigrateError::SourceNotResumed {
        workload: name.into(),
        state: state.into(),
        reason,
    };
    if let Err(e) = q.execute("migrate_cancel", None).await {
        tracing::warn!(workload = name, "migrate_cancel: {e}");
    }
    let deadline = Instant::now() + CANCEL_TIMEOUT;
    loop {
        match q.execute("query-migrate", None).await {
            Ok(info) => {
                let status = info.get("status").and_then(Value::as_str).unwrap_or("none").to_string();
                match status.as_str() {
                    "completed" => return Ok(Some(info)),
                    s if s.starts_with("postcopy") => {
                        return Err(VmMigrateError::PostcopyBroken { workload: name.into(), status });
                    }
                    s if !is_migrating(s) => break,
                    _ => {}
                }
                if Instant::now() >= deadline {
                    return Err(not_resumed(
                        "migrating",
                        format!("the migration is still {status} {} s after migrate_cancel", CANCEL_TIMEOUT.as_secs()),
                    ));
                }
            }
            Err(e) => return Err(not_resumed("unknown", format!("query-migrate after migrate_cancel: {e}"))),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // QEMU restarts a source it stopped for the final copy; `cont` covers the rest.
    let state = q.run_state().await.map_err(|e| not_resumed("unknown", format!("query-status: {e}")))?;
    if state != "running" {
        tracing::info!(workload = name, "source is {state} after the cancelled migration: cont");
        if let Err(e) = q.execute("cont", None).await {
            return Err(not_resumed(&state, format!("cont: {e}")));
        }
        let now = q.run_state().await.map_err(|e| not_resumed("unknown", format!("query-status: {e}")))?;
        if now != "running" {
            return Err(not_resumed(&now, "cont did not make it run".into()));
        }
    }
    tracing::info!(workload = name, "source vm runs again after the cancelled migration");
    Ok(None)
}

/// Move VM `name` from `source` to `target` (both runtimes reachable from here: one
/// host, or a target state directory on a shared mount; across nodes the agents call
/// [`prepare_destination`] and [`live_migrate`] themselves). The destination listens on
/// `port`. On success the source is gone and the report's downtime is STOP (source)
/// → RESUME (destination); QEMU's own figure is in the reason text.
pub async fn migrate_vm(
    source: &QemuRuntime,
    target: &QemuRuntime,
    name: &str,
    image: &ResolvedImage,
    port: u16,
    opts: &VmMigrationOptions,
    progress: impl Fn(VmProgress) + Send + Sync,
) -> Result<MigrationReport, VmMigrateError> {
    migrate_vm_detailed(source, target, name, image, port, opts, progress).await.map(|(report, _)| report)
}

/// [`migrate_vm`], also returning the source's measurements.
pub async fn migrate_vm_detailed(
    source: &QemuRuntime,
    target: &QemuRuntime,
    name: &str,
    image: &ResolvedImage,
    port: u16,
    opts: &VmMigrationOptions,
    progress: impl Fn(VmProgress) + Send + Sync,
) -> Result<(MigrationReport, VmMigrationOutcome), VmMigrateError> {
    let mut local = LocalVmTarget { runtime: target.clone(), port, dest: None };
    migrate_vm_to(source, &mut local, name, image, opts, progress).await
}

/// The destination side of a VM move, on this host ([`LocalVmTarget`]) or behind another
/// node's agent.
#[async_trait::async_trait]
pub trait VmTarget: Send {
    /// Where the destination is, for reports.
    fn describe(&self) -> String;
    /// Start the destination QEMU for `spec` (ports already remapped); returns the URI
    /// the source migrates to.
    async fn prepare(
        &mut self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        opts: &VmMigrationOptions,
    ) -> Result<String, VmMigrateError>;
    /// Wait for the destination's RESUME event; its QEMU timestamp.
    async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError>;
    /// The destination runs: keep it. Returns where it lives.
    async fn confirm(&mut self) -> Result<String, VmMigrateError>;
    /// Remove the destination.
    async fn abort(&mut self) -> Result<(), VmMigrateError>;
}

/// A destination QEMU on this host.
pub struct LocalVmTarget {
    pub runtime: QemuRuntime,
    /// TCP port the destination listens on.
    pub port: u16,
    pub dest: Option<Destination>,
}

#[async_trait::async_trait]
impl VmTarget for LocalVmTarget {
    fn describe(&self) -> String {
        format!("qemu {}", self.runtime.state_dir().display())
    }

    async fn prepare(
        &mut self,
        spec: &WorkloadSpec,
        image: &ResolvedImage,
        opts: &VmMigrationOptions,
    ) -> Result<String, VmMigrateError> {
        let dest = prepare_destination(&self.runtime, spec, image, self.port, opts).await?;
        self.dest = Some(dest);
        Ok(format!("tcp:{}:{}", opts.target_host, self.port))
    }

    async fn wait_resumed(&mut self, limit: Duration) -> Result<SystemTime, VmMigrateError> {
        match self.dest.as_mut() {
            Some(d) => d.wait_resumed(limit).await,
            None => Err(VmMigrateError::Invalid { field: "destination".into(), reason: "not prepared".into() }),
        }
    }

    async fn confirm(&mut self) -> Result<String, VmMigrateError> {
        Ok(self.dest.take().map(|d| d.confirm().dir.display().to_string()).unwrap_or_default())
    }

    async fn abort(&mut self) -> Result<(), VmMigrateError> {
        match self.dest.take() {
            Some(d) => d.abort().await,
            None => Ok(()),
        }
    }
}

/// Move VM `name` from `source` to `target`: prepare the destination, live-migrate,
/// wait for its RESUME, and only then remove the source.
pub async fn migrate_vm_to(
    source: &QemuRuntime,
    target: &mut dyn VmTarget,
    name: &str,
    image: &ResolvedImage,
    opts: &VmMigrationOptions,
    progress: impl Fn(VmProgress) + Send + Sync,
) -> Result<(MigrationReport, VmMigrationOutcome), VmMigrateError> {
    opts.validate()?;
    let t0 = Instant::now();
    let mut report = MigrationReport {
        workload: name.into(),
        mode: MigrationMode::VmLive,
        source: format!("qemu {}", source.state_dir().display()),
        target: target.describe(),
        phases: Vec::new(),
        total_millis: 0,
        downtime_millis: 0,
        degraded_millis: 0,
        resumed_unix_ms: None,
        bytes_raw: 0,
        paged_bytes_raw: 0,
        bytes_wire: 0,
        reason: format!("qemu live migration over tcp, accel {}: {}", source.accel(), opts.describe()),
        ok: false,
        error: None,
    };
    let aborted = |mut report: MigrationReport, reason: String| {
        report.total_millis = millis(t0.elapsed());
        report.error = Some(reason.clone());
        VmMigrateError::Aborted { workload: name.into(), reason, report: Box::new(report) }
    };

    // prepare-destination: the same spec (ports remapped) and image as the source.
    let phase = Instant::now();
    let record = read_record(source, name)?;
    if record.manifest_digest != image.manifest_digest {
        return Err(VmMigrateError::ImageMismatch {
            workload: name.into(),
            source_digest: record.manifest_digest,
            target_digest: image.manifest_digest.clone(),
        });
    }
    let status = source.status(name).await.map_err(|source| VmMigrateError::Runtime {
        workload: name.into(),
        op: "read the source vm's status",
        source,
    })?;
    if status.state != away_model::WorkloadState::Running {
        return Err(VmMigrateError::SourceNotRunning { workload: name.into(), state: status.state.to_string() });
    }
    let mut spec = record.spec.clone();
    for p in &mut spec.ports {
        if let Some(host) = opts.target_ports.get(&p.container) {
            p.host = Some(*host);
        }
    }
    let uri = target.prepare(&spec, image, opts).await?;
    let dest = target;
    report.phases.push(phase_of("prepare-destination", phase));

    // migrate: pre-copy (and post-copy) driven from the source.
    let phase = Instant::now();
    // The last sample, for the bytes a failed migration sent.
    let last = std::sync::Mutex::new(None::<VmProgress>);
    let track = |p: VmProgress| {
        *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
        progress(p);
    };
    let outcome = match live_migrate(source, name, &uri, opts, track).await {
        Ok(o) => o,
        Err(e) => {
            report.phases.push(phase_of("migrate", phase));
            if let Some(p) = last.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                report.bytes_wire = p.transferred;
            }
            if matches!(e, VmMigrateError::PostcopyBroken { .. }) {
                // Neither end has the whole guest: keep both for recovery.
                return Err(e);
            }
            if let Err(cleanup) = dest.abort().await {
                tracing::warn!(workload = name, "cannot remove the destination: {cleanup}");
            }
            if let VmMigrateError::SourceNotResumed { .. } = e {
                return Err(e);
            }
            return Err(aborted(report, e.to_string()));
        }
    };
    report.phases.push(phase_of("migrate", phase));
    report.bytes_raw = outcome.ram_total;
    report.bytes_wire = outcome.bytes_wire;

    // switchover: the destination runs.
    let phase = Instant::now();
    let resumed_at = match dest.wait_resumed(RESUME_TIMEOUT).await {
        Ok(at) => at,
        Err(e) if outcome.postcopy => return Err(e),
        Err(e) => {
            // Pre-copy completed, so the paused source still holds the whole guest.
            report.phases.push(phase_of("switchover", phase));
            if let Err(cleanup) = dest.abort().await {
                tracing::warn!(workload = name, "cannot remove the destination: {cleanup}");
            }
            resume_source(source, name).await?;
            return Err(aborted(report, e.to_string()));
        }
    };
    let placed = dest.confirm().await?;
    report.phases.push(phase_of("switchover", phase));
    let stop_to_resume = outcome.source_stopped_at.and_then(|s| resumed_at.duration_since(s).ok());
    let (downtime, how) = match stop_to_resume {
        Some(d) => (d, "source STOP to destination RESUME"),
        None => (outcome.qemu_downtime, "qemu's downtime (no usable STOP/RESUME pair)"),
    };
    report.downtime_millis = millis_ceil(downtime);

    // cleanup: only now does the source go.
    let phase = Instant::now();
    let mut notes = String::new();
    if let Err(e) = quit_source(source, name).await {
        tracing::warn!(workload = name, "{e}");
        notes = format!("; source cleanup failed: {e}");
    }
    report.phases.push(phase_of("cleanup", phase));

    report.total_millis = millis(t0.elapsed());
    report.ok = true;
    report.reason = format!(
        "{}; downtime {:.1} ms ({how}; on two hosts this needs synced clocks), qemu's own downtime {} ms (ends when \
         the last bytes enter the socket); qemu total {} ms, setup {} ms; {} pass(es), {}; {} bytes on the wire for \
         {} bytes of ram; destination {}{notes}",
        report.reason,
        downtime.as_secs_f64() * 1000.0,
        outcome.qemu_downtime.as_millis(),
        outcome.total.as_millis(),
        outcome.setup.as_millis(),
        outcome.passes,
        if outcome.postcopy {
            "post-copy"
        } else if outcome.converged {
            "converged"
        } else {
            "completed"
        },
        outcome.bytes_wire,
        outcome.ram_total,
        placed,
    );
    tracing::info!(workload = name, "vm migrated: {}", report.reason);
    Ok((report, outcome))
}

/// After a failed switchover of a completed pre-copy: run the source again.
async fn resume_source(source: &QemuRuntime, name: &str) -> Result<(), VmMigrateError> {
    let files = source.files(name);
    let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await.map_err(|e| VmMigrateError::Qmp {
        workload: name.into(),
        side: Side::Source,
        command: "qmp_capabilities".into(),
        source: e,
    })?;
    let state = q.run_state().await.unwrap_or_else(|_| "unknown".into());
    if state == "running" {
        return Ok(());
    }
    if let Err(e) = q.execute("cont", None).await {
        return Err(VmMigrateError::SourceNotResumed { workload: name.into(), state, reason: format!("cont: {e}") });
    }
    let now = q.run_state().await.unwrap_or_else(|_| "unknown".into());
    if now != "running" {
        return Err(VmMigrateError::SourceNotResumed {
            workload: name.into(),
            state: now,
            reason: "after cont".into(),
        });
    }
    Ok(())
}

/// Quit the (paused, migrated-away) source QEMU and remove its state directory.
async fn quit_source(source: &QemuRuntime, name: &str) -> Result<(), VmMigrateError> {
    let files = source.files(name);
    let pid = std::fs::read_to_string(files.pidfile()).ok().and_then(|s| s.trim().parse::<u32>().ok());
    match Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await {
        Ok(mut q) => {
            if let Err(e) = q.execute("quit", None).await {
                tracing::debug!(workload = name, "quit: {e}");
            }
        }
        Err(e) => tracing::debug!(workload = name, "qmp for quit: {e}"),
    }
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid, &files.dir) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // `remove` kills whatever is left and deletes the directory.
    source.remove(name).await.map_err(|source| VmMigrateError::Runtime {
        workload: name.into(),
        op: "remove the source vm",
        source,
    })
}

fn read_record(source: &QemuRuntime, name: &str) -> Result<VmRecord, VmMigrateError> {
    let path = source.files(name).record();
    let not_found = |e: String| VmMigrateError::Runtime {
        workload: name.into(),
        op: "read the source vm's record",
        source: RuntimeError::Failed {
            runtime: away_model::RuntimeKind::Qemu,
            op: "read",
            name: name.into(),
            message: format!("{}: {e}", path.display()),
        },
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(not_found("not a workload name".into()));
    }
    let data = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VmMigrateError::Runtime {
            workload: name.into(),
            op: "find the source vm",
            source: RuntimeError::NotFound { runtime: away_model::RuntimeKind::Qemu, name: name.into() },
        },
        _ => not_found(e.to_string()),
    })?;
    serde_json::from_slice(&data).map_err(|e| not_found(e.to_string()))
}

/// Refuse a VM with a writable disk: its contents would not move.
async fn refuse_disks(q: &mut Qmp, name: &str) -> Result<(), VmMigrateError> {
    let blocks = q.execute("query-block", None).await.map_err(|e| VmMigrateError::Qmp {
        workload: name.into(),
        side: Side::Source,
        command: "query-block".into(),
        source: e,
    })?;
    for b in blocks.as_array().into_iter().flatten() {
        let Some(inserted) = b.get("inserted") else { continue };
        if inserted.get("ro").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let device = b
            .get("device")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty())
            .or_else(|| b.get("qdev").and_then(Value::as_str))
            .unwrap_or("?");
        return Err(VmMigrateError::Disk { workload: name.into(), device: device.into() });
    }
    Ok(())
}

fn capabilities_json(caps: &[(&str, bool)]) -> Value {
    let list: Vec<Value> = caps.iter().map(|(c, on)| json!({ "capability": c, "state": on })).collect();
    json!({ "capabilities": list })
}

/// A migration status that means "still going".
fn is_migrating(status: &str) -> bool {
    matches!(status, "setup" | "active" | "pre-switchover" | "device" | "wait-unplug" | "cancelling" | "colo")
        || status.starts_with("postcopy")
}

fn u64_at(v: &Value, path: &[&str]) -> Option<u64> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_u64()
}

fn sample(name: &str, info: &Value, elapsed: Duration, postcopy: bool) -> VmProgress {
    let ram = |k: &str| u64_at(info, &["ram", k]).unwrap_or(0);
    VmProgress {
        workload: name.into(),
        status: info.get("status").and_then(Value::as_str).unwrap_or("none").to_string(),
        elapsed,
        pass: ram("dirty-sync-count"),
        ram_total: ram("total"),
        transferred: ram("transferred"),
        remaining: ram("remaining"),
        dirty_pages_rate: ram("dirty-pages-rate"),
        mbps: info.get("ram").and_then(|r| r.get("mbps")).and_then(Value::as_f64).unwrap_or(0.0),
        expected_downtime_ms: u64_at(info, &["expected-downtime"]),
        cpu_throttle_percent: u64_at(info, &["cpu-throttle-percentage"]),
        postcopy,
    }
}

fn outcome(
    name: &str,
    info: &Value,
    stopped_at: Option<SystemTime>,
    postcopy: bool,
    max_throttle: u64,
    wall: Duration,
) -> VmMigrationOutcome {
    let ram = |k: &str| u64_at(info, &["ram", k]).unwrap_or(0);
    let ms = |k: &str| Duration::from_millis(u64_at(info, &[k]).unwrap_or(0));
    VmMigrationOutcome {
        workload: name.into(),
        total: ms("total-time"),
        setup: ms("setup-time"),
        qemu_downtime: ms("downtime"),
        bytes_wire: ram("transferred"),
        ram_total: ram("total"),
        normal_bytes: ram("normal-bytes"),
        zero_pages: ram("duplicate"),
        passes: ram("dirty-sync-count"),
        converged: !postcopy,
        postcopy,
        postcopy_requests: ram("postcopy-requests"),
        max_cpu_throttle_percent: max_throttle,
        xbzrle_bytes: u64_at(info, &["xbzrle-cache", "bytes"]),
        xbzrle_cache_misses: u64_at(info, &["xbzrle-cache", "cache-miss"]),
        source_stopped_at: stopped_at,
        wall,
    }
}

fn phase_of(name: &str, started: Instant) -> MigrationPhase {
    MigrationPhase { name: name.into(), millis: millis(started.elapsed()) }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// Whole milliseconds, rounded up (a 0.4 ms downtime is not "no downtime").
fn millis_ceil(d: Duration) -> u64 {
    d.as_micros().div_ceil(1000).try_into().unwrap_or(u64::MAX)
}

/// The last lines of a log file, on one line (for error messages).
fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        format!("{} is empty", path.display())
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compile-time check: the whole flow can run in a spawned tokio task.
    #[allow(dead_code)]
    fn migrate_vm_is_send(rt: &QemuRuntime, img: &ResolvedImage) {
        fn is_send<T: Send>(_: T) {}
        is_send(migrate_vm(rt, rt, "x", img, 0, &VmMigrationOptions::default(), |_| {}));
    }

    #[test]
    fn default_options_are_valid_plain_precopy() {
        let o = VmMigrationOptions::default();
        o.validate().unwrap();
        assert_eq!(o.describe(), "plain pre-copy");
        assert_eq!(o.source_parameters(), json!({}));
        assert!(o.source_capabilities().iter().all(|(_, on)| !on));
    }

    #[test]
    fn bad_options_name_the_field() {
        let o = VmMigrationOptions { multifd: Some(4), xbzrle: true, ..Default::default() };
        let e = o.validate().unwrap_err().to_string();
        assert!(e.contains("xbzrle") && e.contains("multifd"), "{e}");
        let o = VmMigrationOptions { bandwidth_limit_bytes_per_s: Some(0), ..Default::default() };
        assert!(o.validate().unwrap_err().to_string().contains("bandwidth_limit_bytes_per_s"));
        let o = VmMigrationOptions { timeout: Duration::ZERO, ..Default::default() };
        assert!(o.validate().unwrap_err().to_string().contains("timeout"));
    }

    #[test]
    fn capabilities_and_parameters_match_the_options() {
        let o = VmMigrationOptions {
            multifd: Some(4),
            postcopy: true,
            auto_converge: true,
            max_downtime_ms: Some(50),
            bandwidth_limit_bytes_per_s: Some(1 << 20),
            ..Default::default()
        };
        let caps = capabilities_json(&o.source_capabilities());
        assert!(caps.to_string().contains(r#"{"capability":"multifd","state":true}"#), "{caps}");
        assert!(caps.to_string().contains(r#"{"capability":"xbzrle","state":false}"#), "{caps}");
        // the destination gets only what must match
        let dest = capabilities_json(&o.destination_capabilities()).to_string();
        assert!(dest.contains("postcopy-ram") && dest.contains("multifd") && !dest.contains("auto-converge"));
        assert_eq!(
            o.source_parameters(),
            json!({"downtime-limit": 50, "max-bandwidth": 1048576, "multifd-channels": 4})
        );
    }

    #[test]
    fn sample_and_outcome_read_query_migrate() {
        let info = json!({
            "status": "completed", "total-time": 512, "downtime": 8, "setup-time": 3,
            "ram": {"transferred": 1000, "total": 134217728, "remaining": 0, "dirty-sync-count": 3,
                    "normal-bytes": 900, "duplicate": 30000, "mbps": 800.5, "dirty-pages-rate": 12}
        });
        let p = sample("w", &info, Duration::from_millis(5), false);
        assert_eq!((p.pass, p.transferred, p.ram_total, p.dirty_pages_rate), (3, 1000, 134217728, 12));
        let o = outcome("w", &info, None, false, 0, Duration::from_millis(600));
        assert_eq!(o.qemu_downtime, Duration::from_millis(8));
        assert_eq!((o.bytes_wire, o.ram_total, o.passes, o.converged), (1000, 134217728, 3, true));
        assert_eq!(millis_ceil(Duration::from_micros(400)), 1);
    }
}
