//! Container migration, stop-and-copy: checkpoint on the source (CRIU through the
//! runtime), send the checkpoint with the transfer protocol, restore on the target,
//! and only then remove the source.
//!
//! One live instance at every moment:
//! * the source process stops with the checkpoint; its checkpoint stays on disk (and its
//!   stopped container under a temporary name) until the target has confirmed;
//! * the target restores, checks the workload stays up, and answers; its copy is
//!   provisional until the source commits it (a lease on the target removes an
//!   uncommitted copy, see `away_agent`);
//! * on any failure before the commit the source restores its own checkpoint.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use away_model::{MigrationMode, MigrationPhase, MigrationReport, RuntimeKind, WorkloadSpec, WorkloadState};
use away_runtime::{CheckpointArchive, CheckpointOptions, LocalNode, RestoreRequest, RuntimeError};
use serde::{Deserialize, Serialize};

use crate::archive::ArchiveStore;
use crate::compat;
use crate::target::TargetNode;
use crate::transfer::{self, ReceivedPayload, SendOptions, Verdict};
use crate::MigrateError;

/// Name of the payload's description file.
pub const MANIFEST: &str = "manifest.json";
/// Sub-directory of the payload holding the runtime's checkpoint (CRIU images, rootfs diff).
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The image tar, sent along when the target lacks the image.
pub const IMAGE_TAR: &str = "image.tar";

/// What travels with a checkpoint, besides the CRIU images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub spec: WorkloadSpec,
    pub image: String,
    pub runtime: RuntimeKind,
    pub source_node: String,
    /// Milliseconds since the Unix epoch when the source stopped.
    pub stopped_at_ms: u64,
}

/// How to move a container.
#[derive(Debug, Clone, Default)]
pub struct ContainerMigrationOptions {
    pub transfer: SendOptions,
    /// Wait this long after the restore before calling the target healthy.
    pub settle: Option<Duration>,
}

/// Receives the steps of a migration (for a progress bar).
pub type ProgressFn = std::sync::Arc<dyn Fn(Step) + Send + Sync>;

/// What a migration step reports to a progress display.
#[derive(Debug, Clone)]
pub enum Step {
    Checking,
    Checkpointing,
    Transferring { sent: u64, total: u64 },
    Committing,
    Cleaning,
    RollingBack(String),
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn phase(name: &str, d: Duration) -> MigrationPhase {
    MigrationPhase { name: name.into(), millis: d.as_millis() as u64 }
}

/// Move container workload `name` from this node to `target`.
pub async fn migrate_container(
    node: &LocalNode,
    source_name: &str,
    archives: &ArchiveStore,
    name: &str,
    target: &dyn TargetNode,
    opts: &ContainerMigrationOptions,
    progress: ProgressFn,
) -> Result<MigrationReport, MigrateError> {
    let started = Instant::now();
    progress(Step::Checking);
    let (runtime, status) = node.get(name).await?;
    let kind = runtime.kind();
    if !kind.is_container() {
        return Err(MigrateError::Invalid(format!("{name} runs on {kind}: use the VM path")));
    }
    if status.state != WorkloadState::Running {
        return Err(MigrateError::Invalid(format!("{name} is {}, not running", status.state)));
    }
    let (here, host) = crate::local_node_info(node, source_name).await;
    let there = target.info().await?;
    let compat = compat::check_container(&here, &there.node, kind, kind);
    if !compat.allowed {
        return Err(MigrateError::Incompatible(compat.reason));
    }
    if compat.mode == MigrationMode::ColdRestart {
        return Err(MigrateError::Incompatible(format!(
            "{}; run it there from its image (away run on {}) if that is acceptable",
            compat.reason, there.node.name
        )));
    }
    let image = node.store.resolve(&status.image).map_err(MigrateError::Runtime)?;
    let send_image = !target.has_image(&status.image).await?;
    let mut phases = vec![phase("check", started.elapsed())];

    // 1. checkpoint: the source process stops here
    progress(Step::Checkpointing);
    let payload = archives.create(name)?;
    let t = Instant::now();
    // CRIU freezes the process when the dump begins: the downtime starts here
    let downtime_start = Instant::now();
    let stopped_at_ms = now_ms();
    let checkpoint = runtime
        .checkpoint(name, &CheckpointOptions { dir: payload.join(CHECKPOINT_DIR), leave_running: false })
        .await
        .map_err(|e| {
            let _ = archives.discard(&payload);
            MigrateError::Runtime(e)
        })?;
    phases.push(phase("checkpoint", t.elapsed()));
    let manifest = Manifest {
        spec: checkpoint.spec.clone(),
        image: checkpoint.image.clone(),
        runtime: kind,
        source_node: here.name.clone(),
        stopped_at_ms,
    };
    let prepared = (|| -> std::io::Result<()> {
        std::fs::write(payload.join(MANIFEST), serde_json::to_vec_pretty(&manifest)?)?;
        if send_image {
            std::fs::copy(&image.tar, payload.join(IMAGE_TAR))?;
        }
        Ok(())
    })();
    // the stopped source record steps aside so that the target may take the name (needed
    // when both share one engine; harmless otherwise)
    let set_aside = match prepared {
        Ok(()) => runtime.step_aside(name).await,
        Err(e) => Err(RuntimeError::io(format!("write the migration payload in {}", payload.display()), e)),
    };
    let mut undo = Undo {
        progress: &progress,
        node,
        checkpoint: &checkpoint,
        set_aside: None,
        image: &image,
        archives,
        payload: &payload,
    };
    undo.set_aside = match set_aside {
        Ok(n) => n,
        Err(e) => return Err(undo.rollback(e.to_string()).await),
    };

    // 2. transfer; the target restores and answers
    let mut send_opts = opts.transfer.clone();
    let bar = progress.clone();
    send_opts.progress = Some(std::sync::Arc::new(move |p: transfer::Progress| {
        bar(Step::Transferring { sent: p.bytes_sent, total: p.bytes_total })
    }));
    let t = Instant::now();
    let meta = serde_json::to_value(&manifest).map_err(|e| MigrateError::Invalid(e.to_string()))?;
    let outcome = transfer::send(&there.transfer_addr, &payload, meta, &send_opts).await;
    let transfer_and_restore = t.elapsed();
    let outcome = match outcome {
        Ok(o) if o.verdict.ok => o,
        Ok(o) => {
            let why = format!("target {} could not restore {name}: {}", there.node.name, o.verdict.message);
            return Err(undo.rollback(why).await);
        }
        Err(e) => {
            let why = format!("transfer to {} ({}) failed: {e}", there.node.name, there.transfer_addr);
            return Err(undo.rollback(why).await);
        }
    };
    // the target waited `settle_ms` after the restore to see the workload stay up: it
    // already ran then, so that wait is not downtime
    let settle_ms = outcome.verdict.detail.get("settle_ms").and_then(|v| v.as_u64()).unwrap_or(0);
    let downtime = downtime_start.elapsed().saturating_sub(Duration::from_millis(settle_ms));
    let restore_ms = outcome.verdict.detail.get("restore_ms").and_then(|v| v.as_u64()).unwrap_or(0);
    phases.push(MigrationPhase {
        name: "transfer".into(),
        millis: (transfer_and_restore.as_millis() as u64).saturating_sub(restore_ms),
    });
    phases.push(MigrationPhase { name: "restore".into(), millis: restore_ms });

    // 3. commit: from here on the target's copy is the workload
    progress(Step::Committing);
    let t = Instant::now();
    if let Err(e) = target.commit(&outcome.transfer_id).await {
        // The target removes an uncommitted copy after its lease: resume here.
        let why = format!("commit to {} failed: {e}", there.node.name);
        return Err(undo.rollback(why).await);
    }
    phases.push(phase("commit", t.elapsed()));

    // 4. the source goes
    progress(Step::Cleaning);
    let t = Instant::now();
    let leftover = undo.set_aside.as_deref().unwrap_or(name);
    if let Err(e) = runtime.remove(leftover).await {
        tracing::warn!(workload = name, "the source's stopped container {leftover} could not be removed: {e}");
    }
    archives.discard(&payload)?;
    phases.push(phase("cleanup", t.elapsed()));
    Ok(MigrationReport {
        workload: name.into(),
        mode: MigrationMode::StopAndCopy,
        source: here.name,
        target: there.node.name,
        phases,
        total_millis: started.elapsed().as_millis() as u64,
        downtime_millis: downtime.as_millis() as u64,
        bytes_raw: outcome.bytes_raw,
        bytes_wire: outcome.bytes_wire,
        reason: format!("{}; {}", compat.reason, crate::precopy_note(&host)),
        ok: true,
        error: None,
    })
}

/// What it takes to put the source back after a failed move.
struct Undo<'a> {
    progress: &'a ProgressFn,
    node: &'a LocalNode,
    checkpoint: &'a CheckpointArchive,
    /// The stopped source record's temporary name, if it stepped aside.
    set_aside: Option<String>,
    image: &'a away_runtime::ResolvedImage,
    archives: &'a ArchiveStore,
    payload: &'a Path,
}

impl Undo<'_> {
    /// Resume the source from its own checkpoint; the payload stays for inspection.
    async fn rollback(&self, why: String) -> MigrateError {
        let Undo { progress, node, checkpoint, image, archives, payload, .. } = self;
        let set_aside = self.set_aside.as_deref();
        tracing::warn!(workload = %checkpoint.workload, "migration failed, resuming the source: {why}");
        progress(Step::RollingBack(why.clone()));
        let Ok(runtime) = node.runtime(checkpoint.runtime) else {
            return MigrateError::RolledBack {
                why,
                resumed: false,
                detail: format!("{} is unavailable", checkpoint.runtime),
            };
        };
        if let Some(aside) = set_aside {
            if let Err(e) = runtime.remove(aside).await {
                tracing::warn!("cannot remove the set-aside source record {aside}: {e}");
            }
        }
        let restored =
            runtime.restore(&RestoreRequest { archive: (*checkpoint).clone(), image: (*image).clone() }).await;
        archives.keep_failed(payload);
        match restored {
            Ok(st) => MigrateError::RolledBack {
                why,
                resumed: true,
                detail: format!("{} resumed on {} from its checkpoint", st.name, st.runtime),
            },
            Err(e) => MigrateError::RolledBack {
                why,
                resumed: false,
                detail: format!(
                    "the source could not be resumed either: {e}; its checkpoint is kept in {}",
                    payload.display()
                ),
            },
        }
    }
}

/// Target side: restore a received payload on this node and answer whether it runs.
/// Returns the workload's status and how long the restore itself took (without `settle`).
pub async fn restore_received(
    node: &LocalNode,
    payload: &ReceivedPayload,
    settle: Duration,
) -> Result<(away_model::WorkloadStatus, Duration), String> {
    let started = Instant::now();
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(payload.dir.join(MANIFEST)).map_err(|e| format!("no {MANIFEST} in the payload: {e}"))?,
    )
    .map_err(|e| format!("{MANIFEST} is not valid: {e}"))?;
    let image_tar = payload.dir.join(IMAGE_TAR);
    if image_tar.is_file() {
        node.store.add(&image_tar, Some(&manifest.image)).map_err(|e| e.to_string())?;
    }
    let image = node.store.resolve(&manifest.image).map_err(|e| e.to_string())?;
    let runtime = node.runtime(manifest.runtime).map_err(|e| e.to_string())?;
    let dir: PathBuf = payload.dir.join(CHECKPOINT_DIR);
    let archive = CheckpointArchive {
        workload: manifest.spec.name.clone(),
        runtime: manifest.runtime,
        bytes: payload.bytes_raw,
        dir,
        spec: manifest.spec.clone(),
        image: manifest.image.clone(),
    };
    let st = runtime.restore(&RestoreRequest { archive, image }).await.map_err(|e| e.to_string())?;
    let restore = started.elapsed();
    // healthy = still running a moment later (a restore can succeed and the process die at once)
    tokio::time::sleep(settle).await;
    match runtime.status(&st.name).await {
        Ok(s) if s.state == WorkloadState::Running => Ok((s, restore)),
        Ok(s) => {
            let _ = runtime.remove(&s.name).await;
            Err(format!("{} was restored but is {} after {} ms", s.name, s.state, settle.as_millis()))
        }
        Err(e) => Err(format!("{} was restored but its status is unknown: {e}", st.name)),
    }
}

/// The handler answer for a received payload.
pub fn verdict_for(result: &Result<(away_model::WorkloadStatus, Duration), String>, settle: Duration) -> Verdict {
    match result {
        Ok((st, restore)) => {
            Verdict::ok(format!("{} running on {}", st.name, st.runtime)).with_detail(serde_json::json!({
                "status": st,
                "restore_ms": restore.as_millis() as u64,
                "settle_ms": settle.as_millis() as u64,
            }))
        }
        Err(e) => Verdict::failed(e.clone()),
    }
}
