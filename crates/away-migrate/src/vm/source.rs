//! The source end: checks, capabilities and parameters, `migrate`, the polling loop
//! (post-copy switch, time limit), cancellation, and the source's removal at the end.

use std::time::{Duration, Instant, SystemTime};

use away_model::error_chain;
use away_runtime::qemu::qmp::block::MigrateContinue;
use away_runtime::qemu::qmp::commands::{
    AnnounceSelf, Command, Cont, Migrate, MigrateCancel, MigrateSetCapabilities, MigrateSetParameters,
    MigrateStartPostcopy, MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationStatus,
    QmpCapabilities, QueryBlock, QueryMigrate, QueryStatus, Quit,
};
use away_runtime::qemu::{pid_alive, QemuRuntime, Qmp, QmpError, VmRecord};
use away_runtime::{Runtime, RuntimeError};

use super::info::{outcome, sample};
use super::{Side, VmMigrateError, VmMigrationOptions, VmMigrationOutcome, VmProgress, CANCEL_TIMEOUT, QMP_TIMEOUT};

/// Live-migrate the running VM `name` of `source` to the destination listening at
/// `dest_uri` (`tcp:HOST:PORT`, prepared with the same `opts`), over TLS with `tls`
/// (the destination is checked to be its peer node), else plain TCP. Returns when the
/// source reports the migration completed; the source QEMU is left paused
/// ("postmigrate") for the caller to remove once the destination runs. When the time
/// limit passes in pre-copy, or the migration fails, it is cancelled and the source VM
/// is made to run again before the error is returned.
pub async fn live_migrate(
    source: &QemuRuntime,
    name: &str,
    dest_uri: &str,
    opts: &VmMigrationOptions,
    tls: Option<&super::VmTls>,
    progress: impl Fn(VmProgress) + Send + Sync,
) -> Result<VmMigrationOutcome, VmMigrateError> {
    live_migrate_with_disk(source, name, dest_uri, opts, tls, None, progress).await
}

/// [`live_migrate`] of a VM whose disk is being mirrored to the destination (`mirror`,
/// started and ready, see [`super::disk`]): the migration pauses before its switchover,
/// the mirror is completed there (`mirror.total_bytes` set), then it goes on. Without a
/// mirror, a VM with a writable disk is refused.
pub async fn live_migrate_with_disk(
    source: &QemuRuntime,
    name: &str,
    dest_uri: &str,
    opts: &VmMigrationOptions,
    tls: Option<&super::VmTls>,
    mut mirror: Option<&mut super::disk::DiskMirror>,
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
    let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await.map_err(|e| qmp_err(QmpCapabilities::NAME, e))?;
    let state = q.run_state().await.map_err(|e| qmp_err(QueryStatus::NAME, e))?;
    if state != "running" {
        return Err(VmMigrateError::SourceNotRunning { workload: name.into(), state });
    }
    if mirror.is_none() {
        refuse_disks(&mut q, name).await?;
    }
    let info = q.execute(&QueryMigrate).await.map_err(|e| qmp_err(QueryMigrate::NAME, e))?;
    if info.status.is_migrating() {
        return Err(VmMigrateError::Failed {
            workload: name.into(),
            status: info.status.to_string(),
            reason: "another migration of this vm is in progress".into(),
        });
    }
    q.execute(&opts.source_capabilities()).await.map_err(|e| qmp_err(MigrateSetCapabilities::NAME, e))?;
    // set either way: a reused QEMU does not keep an earlier move's pause
    let pause = MigrateSetCapabilities {
        capabilities: vec![MigrationCapabilityStatus {
            capability: MigrationCapability::PauseBeforeSwitchover,
            state: mirror.is_some(),
        }],
    };
    q.execute(&pause).await.map_err(|e| qmp_err(MigrateSetCapabilities::NAME, e))?;
    let mut switched = false;
    let params = opts.source_parameters();
    if !params.is_empty() {
        q.execute(&params).await.map_err(|e| qmp_err(MigrateSetParameters::NAME, e))?;
    }
    super::tls::apply(&mut q, name, Side::Source, &files.dir, tls).await?;
    q.take_events();
    tracing::info!(workload = name, "live migration to {dest_uri}: {}", opts.describe());
    let started = Instant::now();
    q.execute(&Migrate { uri: dest_uri.into() }).await.map_err(|e| qmp_err(Migrate::NAME, e))?;

    let mut stopped_at: Option<SystemTime> = None;
    let mut postcopy_requested = false;
    let mut in_postcopy = false;
    let mut max_throttle = 0u64;
    let mut warned_postcopy_timeout = false;
    let failure = loop {
        let info = match q.execute(&QueryMigrate).await {
            Ok(info) => info,
            Err(e) => break qmp_err(QueryMigrate::NAME, e),
        };
        for ev in q.take_events() {
            if ev.name == "STOP" && stopped_at.is_none() {
                stopped_at = Some(ev.at);
            }
        }
        let p = sample(name, &info, started.elapsed(), in_postcopy);
        let status = p.status.clone();
        in_postcopy |= status.is_postcopy();
        max_throttle = max_throttle.max(p.cpu_throttle_percent.unwrap_or(0));
        let pass = p.pass;
        #[cfg(feature = "fault-injection")]
        if status == MigrationStatus::Active && p.transferred > 0 {
            crate::container::source_dies("vm-migrating");
        }
        progress(VmProgress { postcopy: in_postcopy, ..p });
        match status {
            MigrationStatus::Completed => {
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
            MigrationStatus::Failed | MigrationStatus::Cancelled => {
                let reason = info.error_desc.unwrap_or_else(|| "no reason given".into());
                break VmMigrateError::Failed { workload: name.into(), status: status.to_string(), reason };
            }
            MigrationStatus::PreSwitchover if !switched => {
                // the source is paused: complete the disk's mirror, then switch over
                switched = true;
                if let Some(m) = mirror.as_deref_mut() {
                    match super::disk::complete_mirror(&mut q, name).await {
                        Ok(total) => m.total_bytes = total,
                        Err(e) => break e,
                    }
                }
                if let Err(e) = q.execute(&MigrateContinue { state: "pre-switchover" }).await {
                    break qmp_err(MigrateContinue::NAME, e);
                }
                continue;
            }
            ref s if s.is_postcopy_broken() => {
                return Err(VmMigrateError::PostcopyBroken { workload: name.into(), status: s.to_string() });
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
        } else if opts.postcopy
            && !postcopy_requested
            && status == MigrationStatus::Active
            && pass > opts.postcopy_after_passes
        {
            match q.execute(&MigrateStartPostcopy).await {
                Ok(_) => {
                    postcopy_requested = true;
                    tracing::info!(workload = name, "post-copy requested after {} full pass(es)", pass - 1);
                }
                Err(e) => break qmp_err(MigrateStartPostcopy::NAME, e),
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
    tracing::warn!(workload = name, "live migration to {dest_uri} stops: {}", error_chain(&failure));
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
pub(super) async fn cancel_and_resume(q: &mut Qmp, name: &str) -> Result<Option<MigrationInfo>, VmMigrateError> {
    let not_resumed = |state: &str, reason: String| VmMigrateError::SourceNotResumed {
        workload: name.into(),
        state: state.into(),
        reason,
    };
    if let Err(e) = q.execute(&MigrateCancel).await {
        tracing::warn!(workload = name, "migrate_cancel: {}", error_chain(&e));
    }
    let deadline = Instant::now() + CANCEL_TIMEOUT;
    loop {
        match q.execute(&QueryMigrate).await {
            Ok(info) => {
                let status = &info.status;
                match status {
                    MigrationStatus::Completed => return Ok(Some(info)),
                    s if s.is_postcopy() => {
                        return Err(VmMigrateError::PostcopyBroken { workload: name.into(), status: s.to_string() });
                    }
                    s if !s.is_migrating() => break,
                    _ => {}
                }
                if Instant::now() >= deadline {
                    return Err(not_resumed(
                        "migrating",
                        format!("the migration is still {status} {} s after migrate_cancel", CANCEL_TIMEOUT.as_secs()),
                    ));
                }
            }
            Err(e) => {
                return Err(not_resumed("unknown", format!("query-migrate after migrate_cancel: {}", error_chain(&e))))
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // QEMU restarts a source it stopped for the final copy; `cont` covers the rest.
    let query_status_failed = |e: QmpError| not_resumed("unknown", format!("query-status: {}", error_chain(&e)));
    let state = q.run_state().await.map_err(query_status_failed)?;
    if state != "running" {
        tracing::info!(workload = name, "source is {state} after the cancelled migration: cont");
        if let Err(e) = q.execute(&Cont).await {
            return Err(not_resumed(&state, format!("cont: {}", error_chain(&e))));
        }
        let now = q.run_state().await.map_err(query_status_failed)?;
        if now != "running" {
            return Err(not_resumed(&now, "cont did not make it run".into()));
        }
    }
    tracing::info!(workload = name, "source vm runs again after the cancelled migration");
    Ok(None)
}

/// After a failed switchover of a completed pre-copy: run the source again.
pub(super) async fn resume_source(source: &QemuRuntime, name: &str) -> Result<(), VmMigrateError> {
    let files = source.files(name);
    let mut q = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await.map_err(|e| VmMigrateError::Qmp {
        workload: name.into(),
        side: Side::Source,
        command: QmpCapabilities::NAME.into(),
        source: e,
    })?;
    let state = q.run_state().await.unwrap_or_else(|_| "unknown".into());
    if state == "running" {
        return Ok(());
    }
    if let Err(e) = q.execute(&Cont).await {
        let reason = format!("cont: {}", error_chain(&e));
        return Err(VmMigrateError::SourceNotResumed { workload: name.into(), state, reason });
    }
    let now = q.run_state().await.unwrap_or_else(|_| "unknown".into());
    if now != "running" {
        return Err(VmMigrateError::SourceNotResumed {
            workload: name.into(),
            state: now,
            reason: "after cont".into(),
        });
    }
    // the destination may have announced the guest's MAC before the move failed: on a
    // lab network the switches must learn it here again (docs/network.md)
    if let Err(e) = q.execute(&AnnounceSelf::default()).await {
        tracing::warn!(workload = name, "announce-self after resuming: {}", error_chain(&e));
    }
    Ok(())
}

/// Quit the (paused, migrated-away) source QEMU and remove its state directory.
pub(super) async fn quit_source(source: &QemuRuntime, name: &str) -> Result<(), VmMigrateError> {
    let files = source.files(name);
    let pid = std::fs::read_to_string(files.pidfile()).ok().and_then(|s| s.trim().parse::<u32>().ok());
    match Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await {
        Ok(mut q) => {
            if let Err(e) = q.execute(&Quit).await {
                tracing::debug!(workload = name, "quit: {}", error_chain(&e));
            }
        }
        Err(e) => tracing::debug!(workload = name, "qmp for quit: {}", error_chain(&e)),
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

pub(super) fn read_record(source: &QemuRuntime, name: &str) -> Result<VmRecord, VmMigrateError> {
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
    let blocks = q.execute(&QueryBlock).await.map_err(|e| VmMigrateError::Qmp {
        workload: name.into(),
        side: Side::Source,
        command: QueryBlock::NAME.into(),
        source: e,
    })?;
    match blocks.iter().find(|b| b.inserted.as_ref().is_some_and(|i| !i.ro)) {
        Some(b) => {
            let device = Some(b.device.as_str()).filter(|d| !d.is_empty()).or(b.qdev.as_deref()).unwrap_or("?");
            Err(VmMigrateError::Disk { workload: name.into(), device: device.into() })
        }
        None => Ok(()),
    }
}
