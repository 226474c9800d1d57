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
//! The move never loses the workload and never runs it twice: a pre-copy destination
//! is held paused (`-S`) after the incoming migration, and runs only once the source
//! commits the move (the commit protocol, docs/reliability.md); the source is removed
//! only after that commit's answer. On any failure before the commit, the destination
//! is removed and the source resumed; without a definite answer the source stays
//! paused (in doubt). Once post-copy has started the guest's memory is split between
//! both ends, so nothing is cancelled or killed any more, and the destination runs from
//! the switchover on (not held): a destination lost after that loses the workload.
//!
//! Two downtimes are recorded. QEMU's own `downtime` stops its clock when the last
//! bytes enter the socket, before the destination has loaded them. The workload's
//! downtime is measured from the source's `STOP` event to the destination's `RESUME`
//! event, using the timestamps QEMU puts on the events (the host's wall clock). On two
//! hosts that figure is only as good as their clock sync (NTP/PTP); when it comes out
//! negative, QEMU's figure is reported instead.
//!
//! Disks: a VM with a disk (its spec's `disk`, an overlay on a base image) moves it
//! without shared storage: the destination exports an empty overlay on the same base
//! over NBD and the source mirrors its overlay into it, completing the mirror while the
//! migration waits before its switchover ([`disk`], docs/vm.md). [`live_migrate`] alone
//! (no mirror) refuses a VM with a writable disk.

mod destination;
pub mod disk;
mod info;
mod options;
mod recover;
mod source;
mod tls;

use std::time::{Duration, Instant, SystemTime};

use away_model::{error_chain, MigrationMode, MigrationPhase, MigrationReport};
pub use away_runtime::qemu::qmp::commands::MigrationStatus;
use away_runtime::qemu::{QemuRuntime, QmpError};
use away_runtime::{ResolvedImage, Runtime, RuntimeError};
use serde::{Deserialize, Serialize};

pub use destination::{copy_base, prepare_destination, Destination, LocalVmTarget, VmCommit, VmListen, VmTarget};
pub use disk::DiskMirror;
pub use info::{VmMigrationOutcome, VmProgress};
pub use options::{VmMigrationOptions, DEFAULT_VM_COMMIT_WAIT};
pub use recover::recover_source;
pub use source::{live_migrate, live_migrate_with_disk};
use source::{quit_source, read_record, resume_source};
pub use tls::VmTls;

/// Bound on each QMP command (a migration command returns at once; the work is polled).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to resume after the source reports completion.
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a `migrate_cancel` may take to settle.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong in a VM migration. Messages name the workload and, for QMP
/// failures, the command and the end (source or destination) it failed on. A variant
/// with a `source` leaves it out of its message: render the chain ([`error_chain`])
/// to show both.
#[derive(Debug, thiserror::Error)]
pub enum VmMigrateError {
    #[error("invalid vm migration options: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("workload {workload}: {op}")]
    Runtime {
        workload: String,
        op: &'static str,
        #[source]
        source: RuntimeError,
    },
    #[error("workload {workload}: qmp {command} on the {side} failed")]
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
    #[error("workload {workload}: migration stream tls: {reason}")]
    Tls { workload: String, reason: String },
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
    #[error("workload {workload}: the destination did not commit the move: {reason}")]
    NotCommitted { workload: String, reason: String },
    #[error("workload {workload}: migration in doubt: {reason}; the source vm stays paused (resuming could make two instances); ask the target about move vm-{workload}")]
    InDoubt { workload: String, reason: String },
    #[error("workload {workload}: the source vm is {state} after the failed migration and did not resume; {reason}")]
    SourceNotResumed { workload: String, state: String, reason: String },
    /// The whole move failed and was rolled back: the workload runs on the source.
    /// `cause` is what failed: match it to tell a time limit ([`VmMigrateError::TimedOut`])
    /// from a failure. Its whole chain leads the message (callers print this error
    /// alone), so it is not also this error's `source()`. `report` holds the phases up
    /// to the failure (`ok` false, `error` the same chain).
    #[error("{} (migration of workload {workload} rolled back: destination removed, source running)", error_chain(.cause))]
    Aborted { workload: String, cause: Box<VmMigrateError>, report: Box<MigrationReport> },
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

/// Both ends' TLS of a move between two runtimes of this host ([`migrate_vm_detailed`]):
/// the source's (its peer the destination's node) and the destination's (its peer the
/// source's node).
#[derive(Debug, Clone)]
pub struct LocalTls {
    pub source: VmTls,
    pub destination: VmTls,
}

/// Move VM `name` from `source` to `target` (both runtimes reachable from here: one
/// host, or a target state directory on a shared mount; across nodes the agents call
/// [`prepare_destination`] and [`live_migrate`] themselves) over plain TCP. The
/// destination listens on `port`. On success the source is gone and the report's
/// downtime is STOP (source) → RESUME (destination); QEMU's own figure is in the
/// reason text.
pub async fn migrate_vm(
    source: &QemuRuntime,
    target: &QemuRuntime,
    name: &str,
    image: &ResolvedImage,
    port: u16,
    opts: &VmMigrationOptions,
    progress: impl Fn(VmProgress) + Send + Sync,
) -> Result<MigrationReport, VmMigrateError> {
    migrate_vm_detailed(source, target, name, image, port, opts, None, progress).await.map(|(report, _)| report)
}

/// [`migrate_vm`], over TLS with `tls`, also returning the source's measurements.
#[allow(clippy::too_many_arguments)]
pub async fn migrate_vm_detailed(
    source: &QemuRuntime,
    target: &QemuRuntime,
    name: &str,
    image: &ResolvedImage,
    port: u16,
    opts: &VmMigrationOptions,
    tls: Option<&LocalTls>,
    progress: impl Fn(VmProgress) + Send + Sync,
) -> Result<(MigrationReport, VmMigrationOutcome), VmMigrateError> {
    let mut local =
        LocalVmTarget { runtime: target.clone(), port, dest: None, tls: tls.map(|t| t.destination.clone()) };
    migrate_vm_to(source, &mut local, name, image, opts, tls.map(|t| &t.source), progress).await
}

/// Move VM `name` from `source` to `target`: prepare the destination, live-migrate,
/// wait for its RESUME, and only then remove the source. With `tls` (this node's
/// identity, the target's node name) the stream is QEMU's TLS and the destination must
/// take it so; without, plain TCP, and a destination that wants TLS is refused too.
pub async fn migrate_vm_to(
    source: &QemuRuntime,
    target: &mut dyn VmTarget,
    name: &str,
    image: &ResolvedImage,
    opts: &VmMigrationOptions,
    tls: Option<&VmTls>,
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
        started_unix_ms: None,
        bytes_raw: 0,
        paged_bytes_raw: 0,
        bytes_wire: 0,
        reason: format!(
            "qemu live migration over {}, accel {}: {}",
            match tls {
                Some(t) => format!("tls (mutual, peer node {})", t.peer()),
                None => "plain tcp".into(),
            },
            source.accel(),
            opts.describe()
        ),
        ok: false,
        error: None,
        predicted: None,
        volumes: None,
        network: None,
    };
    let aborted = |mut report: MigrationReport, cause: VmMigrateError| {
        report.total_millis = millis(t0.elapsed());
        report.error = Some(error_chain(&cause));
        VmMigrateError::Aborted { workload: name.into(), cause: Box::new(cause), report: Box::new(report) }
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
    let mut base_note = String::new();
    if let Some(d) = &spec.disk {
        // post-copy too: its switch to the destination waits in pre-switchover like
        // pre-copy's last copy, and the mirror completes there
        let base = source.disk_store().find(&d.base).map_err(|source| VmMigrateError::Runtime {
            workload: name.into(),
            op: "find the disk's base image",
            source,
        })?;
        let copied = target.ensure_base(&base).await?;
        base_note = format!(
            "; disk base {} {}",
            base.digest,
            if copied { "copied to the target" } else { "already on the target" }
        );
    }
    let listen = target.prepare(&spec, image, opts).await?;
    let dest = target;
    if listen.tls != tls.is_some() {
        // never a stream in plaintext from a node that has an identity, and a clear
        // answer instead of a failed handshake the other way round
        let reason = if listen.tls {
            "the destination takes the stream over tls only, and this source has no node identity".to_string()
        } else {
            "the destination takes the stream in plaintext (its agent runs with --insecure-plaintext-channels), and \
             this source moves vms over tls only"
                .to_string()
        };
        if let Err(cleanup) = dest.abort().await {
            tracing::warn!(workload = name, "cannot remove the destination: {}", error_chain(&cleanup));
        }
        return Err(VmMigrateError::Tls { workload: name.into(), reason });
    }
    let uri = listen.uri;
    report.phases.push(phase_of("prepare-destination", phase));

    // disk-mirror: the overlay's blocks into the destination's empty overlay, until in sync
    let mut mirror = None;
    let mut export_note = String::new();
    if spec.disk.is_some() {
        let phase = Instant::now();
        let started = match dest.disk_export(opts) {
            Some((host, port)) => {
                export_note = format!(
                    " from {host}:{port} ({})",
                    if tls.is_some() { "tls, only the source node let in" } else { "plaintext, loopback" }
                );
                // the disk's connection has the stream's TLS (the same nodes at its ends)
                disk::start_mirror(source, name, &host, port, tls, opts.disk_mirror_bytes_per_s, opts.timeout).await
            }
            None => Err(VmMigrateError::Invalid {
                field: "disk".into(),
                reason: format!("{} exports no disk", dest.describe()),
            }),
        };
        report.phases.push(phase_of("disk-mirror", phase));
        match started {
            Ok(m) => mirror = Some(m),
            Err(e) => {
                if let Err(cleanup) = dest.abort().await {
                    tracing::warn!(workload = name, "cannot remove the destination: {}", error_chain(&cleanup));
                }
                return Err(aborted(report, e));
            }
        }
    }

    // migrate: pre-copy (and post-copy) driven from the source.
    let phase = Instant::now();
    // The last sample, for the bytes a failed migration sent.
    let last = std::sync::Mutex::new(None::<VmProgress>);
    let track = |p: VmProgress| {
        *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
        progress(p);
    };
    let outcome = match live_migrate_with_disk(source, name, &uri, opts, tls, mirror.as_mut(), track).await {
        Ok(o) => o,
        Err(e) => {
            report.phases.push(phase_of("migrate", phase));
            if mirror.is_some() && !matches!(e, VmMigrateError::PostcopyBroken { .. }) {
                // the source keeps its own disk; the mirror (if still running) goes
                disk::abort_mirror(source, name).await;
            }
            if let Some(p) = last.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                report.bytes_wire = p.transferred;
            }
            if matches!(e, VmMigrateError::PostcopyBroken { .. }) {
                // Neither end has the whole guest: keep both for recovery.
                return Err(e);
            }
            if let Err(cleanup) = dest.abort().await {
                tracing::warn!(workload = name, "cannot remove the destination: {}", error_chain(&cleanup));
            }
            if let VmMigrateError::SourceNotResumed { .. } = e {
                return Err(e);
            }
            return Err(aborted(report, e));
        }
    };
    report.phases.push(phase_of("migrate", phase));
    // post-copy: the last page came now; the guest ran on the destination from its resume
    let migrated_at = SystemTime::now();
    // on a lab network: how long the overlay takes to follow, asked from this node from
    // the source's STOP on (docs/network.md). Pre-copy only: the paused source and the
    // destination (held, or not yet announced) cannot answer before the destination
    // runs; after a post-copy switch the destination ran long before this point.
    let follow = if outcome.postcopy {
        None
    } else {
        let frozen = outcome.source_stopped_at.unwrap_or_else(SystemTime::now);
        crate::follow::FollowProbe::start(&record.spec, crate::follow::unix_ms(frozen))
    };
    let mut outcome = outcome;
    outcome.disk_bytes = mirror.as_ref().map_or(0, |m| m.total_bytes);
    // the report's bytes are all that crossed: the migration stream and the disk's mirror
    report.bytes_raw = outcome.ram_total + outcome.disk_bytes;
    report.bytes_wire = outcome.bytes_wire + outcome.disk_bytes;

    // switchover: the destination runs.
    let phase = Instant::now();
    let resumed_at = match dest.wait_resumed(RESUME_TIMEOUT).await {
        Ok(at) => at,
        Err(e) if outcome.postcopy => return Err(e),
        Err(e) => {
            // Pre-copy completed, so the paused source still holds the whole guest.
            report.phases.push(phase_of("switchover", phase));
            if let Err(cleanup) = dest.abort().await {
                tracing::warn!(workload = name, "cannot remove the destination: {}", error_chain(&cleanup));
            }
            resume_source(source, name).await?;
            return Err(aborted(report, e));
        }
    };
    // commit: a held destination starts only now; the answer decides which VM stays
    #[cfg(feature = "fault-injection")]
    {
        crate::container::hold("BEFORE_CONFIRM").await;
        crate::container::source_dies("vm-before-confirm");
    }
    let (placed, resumed_at) = match dest.confirm().await {
        VmCommit::Committed { placed, resumed_at: started } => (placed, started.unwrap_or(resumed_at)),
        // held (pre-copy only): the destination never ran. Not `outcome.postcopy`: a move
        // with post-copy enabled may complete before its switch, and its destination,
        // not held, runs from then on
        VmCommit::Aborted(reason) if !opts.postcopy => {
            // the destination is gone and the paused source holds the whole guest
            report.phases.push(phase_of("switchover", phase));
            resume_source(source, name).await?;
            return Err(aborted(report, VmMigrateError::NotCommitted { workload: name.into(), reason }));
        }
        VmCommit::Aborted(reason) => {
            return Err(VmMigrateError::Failed {
                workload: name.into(),
                status: "not confirmed after post-copy".into(),
                reason: format!(
                    "{reason}; the destination runs the guest since the switchover (post-copy: not held), so the \
                     source stays paused and is not resumed"
                ),
            })
        }
        VmCommit::InDoubt(reason) => return Err(VmMigrateError::InDoubt { workload: name.into(), reason }),
    };
    report.phases.push(phase_of("switchover", phase));
    let stop_to_resume = outcome.source_stopped_at.and_then(|s| resumed_at.duration_since(s).ok());
    let (downtime, how) = match stop_to_resume {
        Some(d) => (d, "source STOP to destination RESUME"),
        None => (outcome.qemu_downtime, "qemu's downtime (no usable STOP/RESUME pair)"),
    };
    report.downtime_millis = millis_ceil(downtime);
    if outcome.postcopy {
        report.degraded_millis = migrated_at.duration_since(resumed_at).map_or(0, millis_ceil);
    }
    report.resumed_unix_ms = resumed_at.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis() as u64);
    if let Some(resumed) = report.resumed_unix_ms {
        report.network = crate::follow::FollowProbe::finish(follow, resumed).await;
    }

    // cleanup: only now does the source go.
    let phase = Instant::now();
    let mut notes = String::new();
    if let Err(e) = quit_source(source, name).await {
        notes = format!("; source cleanup failed: {}", error_chain(&e));
        tracing::warn!(workload = name, "{}", error_chain(&e));
    }
    report.phases.push(phase_of("cleanup", phase));

    report.total_millis = millis(t0.elapsed());
    report.ok = true;
    report.reason = format!(
        "{}; downtime {:.1} ms ({how}; on two hosts this needs synced clocks), qemu's own downtime {} ms (ends when \
         the last bytes enter the socket); qemu total {} ms, setup {} ms; {} pass(es), {}; {} bytes on the wire for \
         {} bytes of ram{}; destination {}{notes}",
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
        match mirror {
            Some(m) => format!(
                "; disk: {} bytes of overlay mirrored over nbd{export_note} ({} until in sync after {} ms{}){base_note}",
                m.total_bytes,
                m.ready_bytes,
                m.ready_after.as_millis(),
                match m.active_after {
                    Some(t) => format!(", copying actively from {} ms on: not in sync by then", t.as_millis()),
                    None => String::new(),
                }
            ),
            None => String::new(),
        },
        placed,
    );
    tracing::info!(workload = name, "vm migrated: {}", report.reason);
    Ok((report, outcome))
}

/// The spec VM `name` runs with (its record on this node).
pub fn guest_spec(source: &QemuRuntime, name: &str) -> Result<away_model::WorkloadSpec, VmMigrateError> {
    read_record(source, name).map(|r| r.spec)
}

fn phase_of(name: &str, started: Instant) -> MigrationPhase {
    MigrationPhase::new(name, millis(started.elapsed()))
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

    fn qmp_io_failure() -> VmMigrateError {
        VmMigrateError::Qmp {
            workload: "w".into(),
            side: Side::Source,
            command: "migrate".into(),
            source: QmpError::Io {
                socket: "/run/away/qemu/w/qmp.sock".into(),
                source: std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer"),
            },
        }
    }

    #[test]
    fn each_cause_is_printed_once() {
        let e = qmp_io_failure();
        assert_eq!(e.to_string(), "workload w: qmp migrate on the source failed");
        assert_eq!(
            error_chain(&e),
            "workload w: qmp migrate on the source failed: qmp socket /run/away/qemu/w/qmp.sock: connection reset by peer"
        );
        let e = VmMigrateError::Runtime {
            workload: "w".into(),
            op: "find the source vm",
            source: RuntimeError::NotFound { runtime: away_model::RuntimeKind::Qemu, name: "w".into() },
        };
        let chain = error_chain(&e);
        assert!(
            chain.starts_with("workload w: find the source vm: ") && chain.matches("find the source vm").count() == 1
        );
    }

    fn aborted(cause: VmMigrateError) -> VmMigrateError {
        let report = MigrationReport {
            workload: "w".into(),
            mode: MigrationMode::VmLive,
            source: String::new(),
            target: String::new(),
            phases: Vec::new(),
            total_millis: 0,
            downtime_millis: 0,
            degraded_millis: 0,
            resumed_unix_ms: None,
            started_unix_ms: None,
            bytes_raw: 0,
            paged_bytes_raw: 0,
            bytes_wire: 0,
            reason: String::new(),
            ok: false,
            error: None,
            predicted: None,
            volumes: None,
            network: None,
        };
        VmMigrateError::Aborted { workload: "w".into(), cause: Box::new(cause), report: Box::new(report) }
    }

    #[test]
    fn a_rolled_back_move_names_its_cause_in_its_message_and_keeps_it_to_match() {
        let e = aborted(VmMigrateError::TimedOut { workload: "w".into(), secs: 3 });
        let msg = e.to_string();
        assert_eq!(
            msg,
            "workload w: migration cancelled after 3 s (the time limit); the vm runs on the source (migration of \
             workload w rolled back: destination removed, source running)"
        );
        // shown in the message, so not also a source (the chain prints it once)
        assert!(std::error::Error::source(&e).is_none());
        assert!(
            matches!(e, VmMigrateError::Aborted { ref cause, .. } if matches!(**cause, VmMigrateError::TimedOut { .. }))
        );
        // a cause with its own source: the whole chain, once
        let e = aborted(qmp_io_failure());
        assert_eq!(e.to_string().matches("connection reset by peer").count(), 1, "{e}");
        assert_eq!(error_chain(&e), e.to_string());
    }
}
