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

use away_model::{
    error_chain, ErrorChain, MigrationMode, MigrationPhase, MigrationReport, RuntimeKind, WorkloadSpec, WorkloadState,
};
use away_runtime::{CheckpointArchive, CheckpointOptions, LocalNode, RestoreRequest, Runtime, RuntimeError};
use serde::{Deserialize, Serialize};

use crate::archive::ArchiveStore;
use crate::compat;
use crate::follow::FollowProbe;
use crate::journal::{record_logged, MoveJournal, OutgoingMove, OutgoingState, PageServer};
use crate::target::{CommitOutcome, CommitPolicy, NoAnswer, TargetNode};
use crate::transfer::{self, ReceivedPayload, SendOptions, Verdict};
use crate::MigrateError;

/// Name of the payload's description file.
pub const MANIFEST: &str = "manifest.json";
/// Sub-directory of the payload holding the runtime's checkpoint (CRIU images, rootfs diff).
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// An image tar in a payload (older sources sent the image along; now it is uploaded
/// before the checkpoint, outside the downtime).
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
    /// Lazy move: the memory is not in the payload; the target's lazy-pages daemon
    /// fetches it from this relay (host:port) of the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_page_relay: Option<std::net::SocketAddr>,
    /// Lazy move: the workload's working set (vaddr, pages), fetched first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lazy_hot: Vec<(u64, u64)>,
    /// Streamed stop-and-copy: the target pulls every page from `lazy_page_relay`
    /// before it restores ([`crate::lazy::pull`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pull_pages: bool,
    /// Restore the workload's TCP connections closed, not established (overlay
    /// workloads; the move's `close_connections`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close_connections: bool,
}

impl Manifest {
    /// The manifest of a received payload (read beneath its directory), its spec validated
    /// as the API validates any spec: a peer's spec is no more trusted than a user's.
    pub fn of_payload(payload: &ReceivedPayload) -> Result<Manifest, String> {
        let bytes = away_runtime::host::beneath::Beneath::open(&payload.dir)
            .and_then(|d| d.read(MANIFEST))
            .map_err(|e| format!("no {MANIFEST} in the payload: {e}"))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| format!("{MANIFEST} is not valid: {e}"))?;
        let errors = manifest.spec.validate();
        if !errors.is_empty() {
            let source_name = format!("in {MANIFEST} of transfer {}", payload.transfer_id);
            return Err(away_model::SpecError { source_name, errors }.to_string());
        }
        Ok(manifest)
    }
}

/// How to move a container.
#[derive(Debug, Clone)]
pub struct ContainerMigrationOptions {
    pub transfer: SendOptions,
    /// Wait this long after the restore before calling the target healthy.
    pub settle: Option<Duration>,
    pub mode: crate::mode::ContainerMode,
    /// Compress the page stream of streamed and lazy moves; None: unless the target is
    /// on this host (a loopback address), where zstd only costs time.
    pub compress_pages: Option<bool>,
    /// How long to keep asking a target that went silent after a commit that may have
    /// reached it, before the move is reported in doubt (the source then neither resumes
    /// nor removes its copy).
    pub commit_wait: Duration,
    /// Abort the move when this is set before its commit point.
    pub cancel: crate::Cancel,
    /// Measure and predict the move before it starts (`crate::estimate`), for the
    /// report's `predicted`; the measuring is not counted in the move's times.
    pub predict: bool,
    /// Overlay workloads: the target restores their TCP connections closed instead of
    /// keeping them (CRIU's `tcp-close`); the peers see them end.
    pub close_connections: bool,
    /// Where a staged move's steps are written before they are taken, so that a source
    /// killed between its checkpoint and its commit's answer can finish the move when it
    /// starts again ([`crate::journal`]); None: not recorded (the source's process must
    /// live through the move).
    pub journal: Option<std::sync::Arc<dyn crate::journal::MoveJournal>>,
}

impl Default for ContainerMigrationOptions {
    fn default() -> Self {
        ContainerMigrationOptions {
            transfer: SendOptions::default(),
            settle: None,
            mode: Default::default(),
            compress_pages: None,
            commit_wait: Duration::from_secs(300),
            cancel: Default::default(),
            predict: true,
            close_connections: false,
            journal: None,
        }
    }
}

/// Receives the steps of a migration (for a progress bar).
pub type ProgressFn = std::sync::Arc<dyn Fn(Step) + Send + Sync>;

/// What a migration step reports to a progress display.
#[derive(Debug, Clone)]
pub enum Step {
    Checking,
    /// The target lacks the workload's image: it goes first (the workload still runs).
    SendingImage,
    Checkpointing,
    Transferring {
        sent: u64,
        total: u64,
    },
    /// Lazy move: the workload runs on the target; memory still arriving (bytes so far,
    /// of about `total`).
    Paging {
        moved: u64,
        total: u64,
    },
    /// Streamed stop-and-copy: the memory streams into the target's images (bytes so
    /// far, of about `total`); the workload is stopped.
    Streaming {
        moved: u64,
        total: u64,
    },
    Committing,
    Cleaning,
    RollingBack(String),
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn phase(name: &str, d: Duration) -> MigrationPhase {
    MigrationPhase::new(name, d.as_millis() as u64)
}

/// Move container workload `name` from this node to `target`. With `opts.predict`,
/// the move is measured and predicted first (before its clock starts) and the report
/// carries the prediction for the way it took; a successful move joins this node's
/// history, the source of its phase costs.
pub async fn migrate_container(
    node: &LocalNode,
    source_name: &str,
    archives: &ArchiveStore,
    name: &str,
    target: &dyn TargetNode,
    opts: &ContainerMigrationOptions,
    progress: ProgressFn,
) -> Result<MigrationReport, MigrateError> {
    let plan = if opts.predict {
        progress(Step::Checking);
        let planning = crate::estimate::plan_container(node, source_name, name, target, opts.mode, None);
        match tokio::time::timeout(crate::estimate::PLAN_TIMEOUT, planning).await {
            Ok(Ok(plan)) => Some(plan),
            Ok(Err(e)) => {
                tracing::warn!(workload = name, "no prediction: {}", away_model::error_chain(&e));
                None
            }
            Err(_) => {
                tracing::warn!(
                    workload = name,
                    "no prediction: measuring took over {:?}",
                    crate::estimate::PLAN_TIMEOUT
                );
                None
            }
        }
    } else {
        None
    };
    // asked before the move: the source is gone after it
    let runtime = node.get(name).await.map(|(r, _)| r.kind()).ok();
    let started_unix_ms = now_ms();
    let mut precopied = None;
    let (plan, measured) = match plan {
        Some((p, there, writes)) => (Some(p), Measured { there: Some(there), writes }),
        None => (None, Measured::default()),
    };
    let moved =
        move_container(node, source_name, archives, name, target, measured, opts, progress, &mut precopied).await;
    if let (Err(e), Some(id)) = (&moved, &precopied) {
        // the target's pre-copy of the volumes goes with the move (a restore that ran took
        // it already; a move in doubt leaves the target's copy alone)
        if !matches!(e, MigrateError::InDoubt { .. }) {
            if let Err(e) = target.abort(id).await {
                tracing::debug!(transfer = %id, "the target's volume pre-copy: {e}", e = ErrorChain(&e));
            }
        }
    }
    let mut report = moved?;
    report.started_unix_ms = Some(started_unix_ms);
    if let Some(runtime) = runtime {
        if let Some(plan) = &plan {
            report.predicted = crate::estimate::predicted_for(plan, runtime, &report);
        }
        if let Err(e) = crate::estimate::History::of(&node.options.paths.state_dir).record(
            runtime,
            &report,
            plan.as_ref().map(|p| &p.inputs.costs),
        ) {
            tracing::warn!("cannot keep the move in this node's history: {e}");
        }
    }
    Ok(report)
}

/// What a move's prediction measured just before it, which the move takes instead of
/// measuring again.
#[derive(Default)]
struct Measured {
    /// The target's description.
    there: Option<crate::target::TargetInfo>,
    /// The workload's writes (its working set, for a lazy move's order).
    writes: Option<crate::mode::DirtySample>,
}

/// [`migrate_container`] after its prediction; `precopied` is set to the move's id once
/// the target holds a pre-copy of the workload's volumes.
#[allow(clippy::too_many_arguments)]
async fn move_container(
    node: &LocalNode,
    source_name: &str,
    archives: &ArchiveStore,
    name: &str,
    target: &dyn TargetNode,
    measured: Measured,
    opts: &ContainerMigrationOptions,
    progress: ProgressFn,
    precopied: &mut Option<String>,
) -> Result<MigrationReport, MigrateError> {
    #[cfg(feature = "fault-injection")]
    hold("BEFORE_FREEZE").await;
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
    if let Some(why) = status.pid.and_then(away_runtime::host::process::criu_cannot_dump) {
        return Err(MigrateError::Incompatible(format!("{name} cannot be checkpointed here: {why}")));
    }
    // The checks run at once: this host's fingerprint, the target's description (the
    // prediction's, when one was made) and whether it holds the image, and the transfer
    // connection opens as soon as the target's address is known. One after another they took 0.9 s over a 73.6 ms
    // round trip (about 0.2 s on a LAN); together, three round trips and the slowest
    // local step. None of it is downtime: nothing has stopped yet.
    let mut watch = crate::mode::Watch::start(opts.mode, kind, status.pid, measured.writes);
    // the move's id, known before anything is sent (a lost answer is asked about by it)
    let transfer_id = opts.transfer.transfer_id.clone().unwrap_or_else(transfer::new_transfer_id);
    // The move is announced beside the early connection's handshake: the target takes
    // this transfer only from this node, with its secret, imports the image into its
    // runtime while this side checkpoints, and (a move that may stream or go lazily)
    // opens its page link to the relay listening here, which keeps that link warm until
    // the pages come (`crate::lazy::early`). A move refused below leaves an announcement
    // that expires, and a relay that closes.
    let may_page = kind == RuntimeKind::Containerd && !matches!(opts.mode, crate::mode::ContainerMode::Staged);
    let remote = async {
        // (the prediction just asked for it)
        let there = match measured.there {
            Some(there) => there,
            None => target.info().await?,
        };
        let announce = async {
            let page_relay = match may_page {
                true => Some(early_page_relay(&there, opts).await?),
                false => None,
            };
            let prepare = crate::target::PrepareImage {
                reference: status.image.clone(),
                runtime: kind,
                page_relay: page_relay.as_ref().map(crate::lazy::PendingRelay::addr),
            };
            let announced = target.announce(&transfer_id, name, source_name, Some(&prepare)).await?;
            Ok::<_, MigrateError>((announced, page_relay))
        };
        let (early, announced) =
            tokio::join!(connect_early(&there.transfer_addr, &there.node.name, &opts.transfer), announce);
        Ok::<_, MigrateError>((early?, announced?, there))
    };
    let ((here, host), remote, has_image) =
        tokio::join!(crate::local_node_info(node, source_name), remote, target.has_image(&status.image));
    let (mut early, (mut announced, page_relay), there) = remote?;
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
    // the image goes before anything stops: it is not part of the downtime
    if !has_image? {
        // the writes are measured again after the upload, not from before it
        watch = None;
        progress(Step::SendingImage);
        target.upload_image(&image.tar).await?;
        // announced again (the same secret and page link): the image the target now
        // holds is imported into its runtime while this side checkpoints
        let prepare = crate::target::PrepareImage { reference: status.image.clone(), runtime: kind, page_relay: None };
        announced.secret = target.announce(&transfer_id, name, source_name, Some(&prepare)).await?.secret;
        // a long upload may outlast the target's wait for a first frame: a fresh one
        early = connect_early(&there.transfer_addr, &there.node.name, &opts.transfer).await?;
    }
    let choice = crate::mode::choose(opts.mode, runtime, &status, &host, &there, watch).await?;
    if opts.cancel.is_cancelled() {
        return Err(MigrateError::Cancelled(name.into()));
    }
    tracing::info!(workload = name, mode = %choice.mode, "{}", choice.reason);
    // the page relay serves a streamed or lazy move only
    let page_relay = page_relay.filter(|_| choice.streamed || choice.mode == MigrationMode::Lazy);
    let mut opts = opts.clone();
    opts.transfer.secret = Some(announced.secret);
    opts.transfer.peer_node = there.node.name.clone();
    opts.transfer.transfer_id = Some(transfer_id.clone());
    let opts = &opts;
    let mut phases = vec![phase("check", started.elapsed())];
    // the volumes' files go while the workload runs; the freeze carries what changed since
    let precopy = precopy_volumes(runtime, name, &here.name, &there, target, archives, opts, &transfer_id).await?;
    if let Some(p) = &precopy {
        *precopied = Some(transfer_id.clone());
        phases.push(phase("volume-precopy", p.took));
        // the pre-copy may have outlasted the target's wait for the early connection's
        // first frame: a fresh one
        early = connect_early(&there.transfer_addr, &there.node.name, &opts.transfer).await?;
    }
    #[cfg(feature = "fault-injection")]
    hold("AFTER_PRECOPY").await;
    if opts.cancel.is_cancelled() {
        // nothing stopped; the target's pre-copy goes with the abort (`migrate_container`)
        return Err(MigrateError::Cancelled(name.into()));
    }
    if choice.mode == MigrationMode::Lazy || choice.streamed {
        let moving = Moving {
            runtime,
            name,
            here: &here,
            there: &there,
            target,
            archives,
            opts,
            progress: &progress,
            started,
            phases,
            reason: format!("{}; {}", compat.reason, choice.reason),
            hot: choice.hot,
            pid: status.pid,
            streamed: choice.streamed,
            early,
            precopy,
            page_relay: page_relay.map(|r| (r, announced.page_link)),
        };
        return migrate_lazy(moving).await;
    }

    // 1. checkpoint: the source process stops here
    let (early, _, round_trip, _) = early;
    progress(Step::Checkpointing);
    let payload = archives.create(name)?;
    let journal = opts.journal.as_deref();
    let mut journaled = OutgoingMove::checkpointing(&transfer_id, name, &there.node.name, payload.clone());
    // on disk before anything stops: a source that cannot record the move does not start it
    if let Some(j) = journal {
        if let Err(e) = j.record(&journaled) {
            let _ = archives.discard(&payload);
            return Err(MigrateError::Invalid(format!("cannot journal move {transfer_id} of {name}: {e}")));
        }
    }
    let t = Instant::now();
    let stopped_at_ms = now_ms();
    // the runtime's own steps (Docker's) become the phase's parts
    let (checkpoint, mut parts) = away_runtime::steps::collect(runtime.checkpoint(
        name,
        &CheckpointOptions {
            dir: payload.join(CHECKPOINT_DIR),
            leave_running: false,
            volumes_sent: precopy.as_ref().map(|p| p.sent.clone()),
            release_later: true,
        },
    ))
    .await;
    let checkpoint = checkpoint.map_err(|e| {
        let _ = archives.discard(&payload);
        record_logged(journal, &journaled.with_state(OutgoingState::Aborted));
        MigrateError::Runtime(e)
    })?;
    let downtime_start = frozen_at(&payload, t);
    // asked from the freeze on: the first answer comes from the target
    let follow = FollowProbe::start(&checkpoint.spec, unix_ms_at(downtime_start));
    let manifest = Manifest {
        spec: checkpoint.spec.clone(),
        image: checkpoint.image.clone(),
        runtime: kind,
        source_node: here.name.clone(),
        stopped_at_ms,
        lazy_page_relay: None,
        lazy_hot: Vec::new(),
        pull_pages: false,
        close_connections: opts.close_connections,
    };
    let prepared = std::fs::write(payload.join(MANIFEST), serde_json::to_vec_pretty(&manifest).unwrap_or_default());
    // the stopped source record steps aside so that the target may take the name (needed
    // when both share one engine; harmless otherwise)
    let aside = Instant::now();
    let set_aside = match prepared {
        Ok(()) => runtime.step_aside(name).await,
        Err(e) => Err(RuntimeError::io(format!("write the migration payload in {}", payload.display()), e)),
    };
    if kind == RuntimeKind::Docker {
        parts.push(phase("step-aside", aside.elapsed()));
    }
    phases.push(MigrationPhase { parts, ..phase("checkpoint", t.elapsed()) });
    let mut undo = Undo {
        progress: &progress,
        node,
        checkpoint: &checkpoint,
        set_aside: None,
        image: &image,
        archives,
        payload: &payload,
        journal: None,
    };
    undo.set_aside = match set_aside {
        Ok(n) => n,
        Err(e) => return Err(undo.rollback(error_chain(&e)).await),
    };
    journaled.archive = Some(checkpoint.clone());
    journaled.set_aside = undo.set_aside.clone();
    journaled = journaled.with_state(OutgoingState::Checkpointing);
    record_logged(journal, &journaled);
    undo.journal = journal.map(|j| (j, journaled.clone()));
    #[cfg(feature = "fault-injection")]
    source_dies("after-checkpoint");
    #[cfg(feature = "fault-injection")]
    hold("AFTER_FREEZE").await;

    // 2. transfer; the target restores and answers
    let t = Instant::now();
    // the dumped process is gone: its task's record goes while the checkpoint travels,
    // not inside the pause (a rollback's resume removes whatever is left of it)
    let release = async {
        let t = Instant::now();
        match runtime.release_stopped(name).await {
            Ok(()) => tracing::debug!(workload = name, "stopped source task released in {:?}", t.elapsed()),
            Err(e) => {
                tracing::warn!(workload = name, "the stopped source task was not released: {e}", e = ErrorChain(&e))
            }
        }
    };
    let (outcome, ()) = tokio::join!(
        send_payload(&there.transfer_addr, &payload, &manifest, opts, &progress, Some(early), &transfer_id),
        release
    );
    #[cfg(feature = "fault-injection")]
    let outcome = lose_verdict(outcome);
    // the target armed its lease before it answered: counted from here, it ends no
    // earlier on this side than on the target's
    let answered_at = tokio::time::Instant::now();
    let transfer_and_restore = t.elapsed();
    let outcome = match outcome {
        Ok(o) if o.verdict.ok => o,
        Ok(o) => {
            let why = format!("target {} could not restore {name}: {}", there.node.name, o.verdict.message);
            return Err(undo.rollback(why).await);
        }
        Err(e) => {
            let why =
                format!("transfer to {} ({}) failed: {e}", there.node.name, there.transfer_addr, e = ErrorChain(&e));
            // the target may have restored it and its answer got lost: its copy goes first
            if let Some(why) = withdraw(target, &transfer_id, opts.commit_wait).await {
                kept_in_doubt(undo.archives, &payload, journal, &journaled);
                let target = there.node.name.clone();
                return Err(MigrateError::InDoubt { transfer_id, target, why, checkpoint: payload.clone() });
            }
            return Err(undo.rollback(why).await);
        }
    };
    // the target waited `settle_ms` after the restore to see the workload stay up: it
    // already ran then, so that wait is not downtime
    let settle_ms = outcome.verdict.detail.get("settle_ms").and_then(|v| v.as_u64()).unwrap_or(0);
    let downtime = downtime_start.elapsed().saturating_sub(Duration::from_millis(settle_ms) + round_trip / 2);
    let restore_ms = outcome.verdict.detail.get("restore_ms").and_then(|v| v.as_u64()).unwrap_or(0);
    phases.push(phase("transfer", transfer_and_restore.saturating_sub(Duration::from_millis(restore_ms + settle_ms))));
    phases
        .push(MigrationPhase { parts: restore_parts(&outcome.verdict), ..MigrationPhase::new("restore", restore_ms) });
    phases.push(MigrationPhase::new("settle", settle_ms));
    journaled.lease_ms = outcome.verdict.detail.get("lease_ms").and_then(|v| v.as_u64());
    journaled = journaled.with_state(OutgoingState::Sent);
    record_logged(journal, &journaled);
    undo.journal = journal.map(|j| (j, journaled.clone()));

    #[cfg(feature = "fault-injection")]
    hold("BEFORE_COMMIT").await;
    #[cfg(feature = "fault-injection")]
    source_dies("before-commit");
    if opts.cancel.is_cancelled() {
        // before the commit point: the target's copy goes first, then the source resumes
        if let Some(why) = withdraw(target, &outcome.transfer_id, opts.commit_wait).await {
            kept_in_doubt(undo.archives, &payload, journal, &journaled);
            let target = there.node.name.clone();
            return Err(MigrateError::InDoubt {
                transfer_id: outcome.transfer_id.clone(),
                target,
                why,
                checkpoint: payload.clone(),
            });
        }
        return Err(undo.rollback("cancelled before the commit: the target removed its copy".into()).await);
    }

    // 3. commit: one answer per move. The source resumes only when the target says the
    // move is aborted, or when no commit can have reached it and its lease has run out;
    // it removes its copy only when the target says committed.
    progress(Step::Committing);
    let t = Instant::now();
    let policy = commit_policy(&outcome.verdict, opts);
    // from here a commit may reach the target: only its word ends the move
    record_logged(journal, &journaled.with_state(OutgoingState::Committing));
    match crate::target::commit_move(target, &outcome.transfer_id, answered_at, &policy).await {
        CommitOutcome::Committed => {}
        CommitOutcome::Aborted(why) => {
            let why = format!("commit to {}: {why}", there.node.name);
            return Err(undo.rollback(why).await);
        }
        CommitOutcome::InDoubt(why) => {
            // neither resume (two instances if the target committed) nor clean up (none
            // if it did not): the checkpoint stays, the target's agent has the answer
            kept_in_doubt(undo.archives, &payload, journal, &journaled.with_state(OutgoingState::Committing));
            return Err(MigrateError::InDoubt {
                transfer_id: outcome.transfer_id.clone(),
                target: there.node.name.clone(),
                why,
                checkpoint: payload.clone(),
            });
        }
    }
    phases.push(phase("commit", t.elapsed()));

    // 4. the source goes
    let volumes = volume_transfer(&checkpoint.spec, &payload, precopy.as_ref());
    let leftover = undo.set_aside.as_deref().unwrap_or(name);
    clean_source(runtime, name, leftover, archives, &payload, &progress, &mut phases).await?;
    record_logged(journal, &journaled.with_state(OutgoingState::Done));
    let (pre_raw, pre_wire) = precopy.as_ref().map_or((0, 0), |p| (p.bytes_raw, p.bytes_wire));
    let total_millis = started.elapsed().as_millis() as u64;
    let resumed = unix_ms_at(downtime_start + downtime);
    Ok(MigrationReport {
        workload: name.into(),
        mode: MigrationMode::StopAndCopy,
        source: here.name,
        target: there.node.name,
        phases,
        total_millis,
        downtime_millis: downtime.as_millis() as u64,
        degraded_millis: 0,
        resumed_unix_ms: Some(resumed),
        started_unix_ms: None,
        bytes_raw: outcome.bytes_raw + pre_raw,
        paged_bytes_raw: 0,
        bytes_wire: outcome.bytes_wire + pre_wire,
        reason: format!("{}; {}", compat.reason, choice.reason),
        ok: true,
        error: None,
        predicted: None,
        volumes,
        network: FollowProbe::finish(follow, resumed).await,
    })
}

/// How long the source keeps asking for a move's answer: the lease the target gave in
/// its verdict (`lease_ms`; a target too old to say gets the agent's default, 30 s).
fn commit_policy(verdict: &Verdict, opts: &ContainerMigrationOptions) -> CommitPolicy {
    let lease = verdict.detail.get("lease_ms").and_then(|v| v.as_u64()).unwrap_or(30_000);
    CommitPolicy {
        lease: Duration::from_millis(lease),
        retry: Duration::from_secs(1),
        give_up: opts.commit_wait,
        commit_sent: false,
    }
}

/// After a transfer that ended without an answer: take back whatever the target made of
/// move `transfer_id` before the source resumes. None when the target has no copy
/// (aborted now or before, never heard of it) or cannot be asked (as before this
/// question existed: its lease removes a copy); Some(why) when it would not let go
/// within `wait` (the source must then stay stopped: in doubt).
async fn withdraw(target: &dyn TargetNode, transfer_id: &str, wait: Duration) -> Option<String> {
    use crate::target::MoveState;
    let started = Instant::now();
    loop {
        match target.move_state(transfer_id).await {
            Ok(None) => return None,
            Ok(Some(r)) if r.state == MoveState::Aborted => return None,
            Ok(Some(r)) if r.state == MoveState::Committed => {
                return Some(format!("the target holds move {transfer_id} as committed, which the source never asked"))
            }
            // restored (or being restored): remove it now; a restore still running is
            // not held yet, ask again
            Ok(Some(_)) => match target.abort(transfer_id).await {
                Ok(()) => return None,
                Err(e) => tracing::info!(transfer = transfer_id, "the target's copy is not removable yet: {e}"),
            },
            Err(e) => {
                tracing::warn!(transfer = transfer_id, "cannot ask the target what it made of the move: {e}");
                return None;
            }
        }
        if started.elapsed() >= wait {
            return Some(format!("the target kept move {transfer_id} prepared for {} s", wait.as_secs()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Fault injection for the end-to-end tests (`AWAY_FAULT_HOLD_<POINT>=SECONDS`): the
/// source waits this long at that point of a move, a window for a test to land a fault
/// in (a cancel, a link cut): `BEFORE_COMMIT` (between the target's "restored" and the
/// commit of a staged move), `BEFORE_FREEZE` (a move of any mode, before its checks:
/// nothing has stopped), `AFTER_PRECOPY` (a move of any mode, after its volumes'
/// pre-copy, before the freeze), `AFTER_FREEZE` (the workload stopped: after a staged move's
/// checkpoint, or a lazy or streamed move's dump, before the payload leaves);
/// `BEFORE_CONFIRM` (a VM move: the destination holds the complete guest, before the
/// source's confirm).
#[cfg(feature = "fault-injection")]
pub(crate) async fn hold(point: &str) {
    let var = format!("AWAY_FAULT_HOLD_{point}");
    if let Some(secs) = std::env::var(&var).ok().and_then(|s| s.parse::<u64>().ok()) {
        tracing::warn!("{var}={secs}: holding");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
}

/// Fault injection for the end-to-end tests (`AWAY_FAULT_SOURCE_DIE=POINT`): the source's
/// process is SIGKILLed at that point of a move, as a crash or the OOM killer would end
/// it. Staged: `after-checkpoint` (before the payload leaves), `before-commit` (after the
/// target's "restored"). Lazy and streamed: `streaming` (once the target asked for pages,
/// the relay moving them), `after-verdict` (the target's copy runs; lazy: its pages still
/// come), `before-commit` (every page moved, CRIU ended the source process). VM moves:
/// `vm-migrating` (QEMU's migration under way), `vm-before-confirm` (the destination
/// complete and held, before the confirm).
#[cfg(feature = "fault-injection")]
pub(crate) fn source_dies(at: &str) {
    if std::env::var("AWAY_FAULT_SOURCE_DIE").as_deref() == Ok(at) {
        tracing::error!("AWAY_FAULT_SOURCE_DIE={at}: the source is killed (SIGKILL)");
        let _ = away_runtime::host::process::signal(std::process::id(), away_runtime::host::process::Signal::KILL);
        std::thread::sleep(Duration::from_secs(5));
        std::process::abort();
    }
}

/// Fault injection for the end-to-end tests (`AWAY_FAULT_VERDICT=lose`): the target's
/// "restored" answer is lost on its way back.
#[cfg(feature = "fault-injection")]
fn lose_verdict(
    outcome: Result<transfer::SendOutcome, transfer::TransferError>,
) -> Result<transfer::SendOutcome, transfer::TransferError> {
    match outcome {
        Ok(o) if std::env::var("AWAY_FAULT_VERDICT").as_deref() == Ok("lose") => {
            tracing::warn!(transfer = %o.transfer_id, ok = o.verdict.ok, "AWAY_FAULT_VERDICT=lose: the target's answer is dropped");
            Err(transfer::TransferError::Protocol {
                peer: "target".into(),
                transfer_id: o.transfer_id,
                message: "the answer was lost (AWAY_FAULT_VERDICT=lose)".into(),
            })
        }
        other => other,
    }
}

/// Send a payload with its manifest, the transfer's progress to `progress`, as transfer
/// `transfer_id`.
async fn send_payload(
    peer: &str,
    payload: &Path,
    manifest: &Manifest,
    opts: &ContainerMigrationOptions,
    progress: &ProgressFn,
    connected: Option<crate::channel::Stream>,
    transfer_id: &str,
) -> Result<transfer::SendOutcome, transfer::TransferError> {
    let mut send_opts = opts.transfer.clone();
    send_opts.transfer_id = Some(transfer_id.to_string());
    // CRIU's logs of the dump stay with the source's archive: the target writes its own
    // (and a lazy dump's log is still growing)
    send_opts.exclude.push(Path::new(CHECKPOINT_DIR).join(away_runtime::CRIU_WORK_DIR));
    let bar = progress.clone();
    send_opts.progress = Some(std::sync::Arc::new(move |p: transfer::Progress| {
        bar(Step::Transferring { sent: p.bytes_sent, total: p.bytes_total })
    }));
    let meta = serde_json::to_value(manifest).expect("a manifest is JSON");
    transfer::send_on(peer, connected, payload, meta, &send_opts).await
}

/// After the commit: the source's stopped container and the archive go.
async fn clean_source(
    runtime: &dyn away_runtime::Runtime,
    name: &str,
    leftover: &str,
    archives: &ArchiveStore,
    payload: &Path,
    progress: &ProgressFn,
    phases: &mut Vec<MigrationPhase>,
) -> Result<(), MigrateError> {
    progress(Step::Cleaning);
    let t = Instant::now();
    if let Err(e) = runtime.remove(leftover).await {
        tracing::warn!(
            workload = name,
            "the source's stopped container {leftover} could not be removed: {e}",
            e = ErrorChain(&e)
        );
    }
    archives.discard(payload)?;
    phases.push(phase("cleanup", t.elapsed()));
    Ok(())
}

/// What a move has established before its mode's own steps.
struct Moving<'a> {
    runtime: &'a dyn away_runtime::Runtime,
    name: &'a str,
    here: &'a away_model::NodeInfo,
    there: &'a crate::target::TargetInfo,
    target: &'a dyn TargetNode,
    archives: &'a ArchiveStore,
    opts: &'a ContainerMigrationOptions,
    progress: &'a ProgressFn,
    started: Instant,
    phases: Vec<MigrationPhase>,
    reason: String,
    hot: Vec<(u64, u64)>,
    /// The workload's process (its memory size, for the progress display).
    pid: Option<u32>,
    /// Stop-and-copy streamed: the target pulls every page before it restores.
    streamed: bool,
    /// The transfer connection, opened during the checks ([`connect_early`]).
    early: Early,
    /// What the volumes' pre-copy sent, if there was one.
    precopy: Option<Precopy>,
    /// The move's page relay, listening since the announce, and whether the target
    /// opened its link then (only such a target is sent an offer, `crate::lazy::early`).
    page_relay: Option<(crate::lazy::PendingRelay, bool)>,
}

/// A move's pre-copy of the workload's volumes: what it sent while the workload ran.
struct Precopy {
    sent: std::sync::Arc<away_runtime::volume::VolumesSent>,
    bytes_raw: u64,
    bytes_wire: u64,
    took: Duration,
}

/// Send the files of `name`'s volumes that are not being written to the target while
/// the workload runs (a transfer of its own, announced like the move's, which the
/// target keeps for move `transfer_id`); the checkpoint then carries only what changed
/// since (`away_runtime::volume`). None: no volumes, or the target did not take them
/// (the freeze then carries the whole volumes, as before). An error (a link or a device
/// in a volume) fails the move before anything stops.
#[allow(clippy::too_many_arguments)]
async fn precopy_volumes(
    runtime: &dyn away_runtime::Runtime,
    name: &str,
    here: &str,
    there: &crate::target::TargetInfo,
    target: &dyn TargetNode,
    archives: &ArchiveStore,
    opts: &ContainerMigrationOptions,
    transfer_id: &str,
) -> Result<Option<Precopy>, MigrateError> {
    // (fault injection, for measuring what the pre-copy saves: the volumes go whole in
    // the freeze, as before it existed)
    #[cfg(feature = "fault-injection")]
    if std::env::var("AWAY_FAULT_VOLUME_PRECOPY").as_deref() == Ok("off") {
        tracing::warn!(workload = name, "AWAY_FAULT_VOLUME_PRECOPY=off: no volume pre-copy");
        return Ok(None);
    }
    let t = Instant::now();
    let dir = archives.create(&format!("{name}-volumes"))?;
    let sent = match runtime.precopy_volumes(name, &dir).await {
        Ok(Some(sent)) => sent,
        other => {
            let _ = archives.discard(&dir);
            return other.map(|_| None).map_err(MigrateError::Runtime);
        }
    };
    let id = transfer::new_transfer_id();
    let sending = async {
        let secret = target.announce(&id, name, here, None).await?.secret;
        let mut send = opts.transfer.clone();
        send.transfer_id = Some(id.clone());
        send.secret = Some(secret);
        send.progress = None;
        let meta = serde_json::json!({ PRECOPY_META: { "move": transfer_id } });
        Ok::<_, MigrateError>(transfer::send(&there.transfer_addr, &dir, meta, &send).await?)
    };
    let outcome = sending.await;
    let _ = archives.discard(&dir);
    match outcome {
        Ok(o) if o.verdict.ok => {
            tracing::info!(
                workload = name,
                files = sent.files.values().map(|f| f.len()).sum::<usize>(),
                bytes = sent.bytes,
                wire = o.bytes_wire,
                ms = t.elapsed().as_millis() as u64,
                "volumes pre-copied"
            );
            Ok(Some(Precopy {
                sent: std::sync::Arc::new(sent),
                bytes_raw: o.bytes_raw,
                bytes_wire: o.bytes_wire,
                took: t.elapsed(),
            }))
        }
        Ok(o) => {
            tracing::warn!(
                workload = name,
                "the target did not take the volumes' pre-copy ({}): they go whole in the freeze",
                o.verdict.message
            );
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(
                workload = name,
                "the volumes' pre-copy failed ({e}): they go whole in the freeze",
                e = ErrorChain(&e)
            );
            Ok(None)
        }
    }
}

/// The key of a volume pre-copy's transfer metadata: `{"volume_precopy": {"move": ID}}`.
pub const PRECOPY_META: &str = "volume_precopy";

/// The move a received payload pre-copies volumes for, if it is a pre-copy.
pub fn precopy_of(meta: &serde_json::Value) -> Option<&str> {
    meta.get(PRECOPY_META)?.get("move")?.as_str()
}

/// What a move sent of `spec`'s volumes (None without volumes): its pre-copy, and what
/// the checkpoint in `payload` carries.
fn volume_transfer(
    spec: &WorkloadSpec,
    payload: &Path,
    precopy: Option<&Precopy>,
) -> Option<away_model::VolumeTransfer> {
    if spec.volumes.is_empty() {
        return None;
    }
    let c = away_runtime::volume::carried(&payload.join(CHECKPOINT_DIR));
    Some(away_model::VolumeTransfer {
        precopy_bytes_raw: precopy.map_or(0, |p| p.bytes_raw),
        precopy_bytes_wire: precopy.map_or(0, |p| p.bytes_wire),
        frozen_bytes_raw: c.bytes,
        frozen_files: c.files,
        precopied_files: c.unchanged,
        deleted_files: c.deleted,
    })
}

/// The steps the target's runtime reported for its restore (Docker's), if any.
fn restore_parts(verdict: &Verdict) -> Vec<MigrationPhase> {
    verdict.detail.get("restore_parts").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default()
}

/// The wall-clock time of `at` (a moment in the past).
fn unix_ms_at(at: Instant) -> u64 {
    now_ms().saturating_sub(at.elapsed().as_millis() as u64)
}

/// When the workload stopped: CRIU's freeze, read from the dump's log in `payload`
/// ([`away_runtime::runtime::criu_frozen_at`]), or `started` (when the dump began) if the
/// log does not say.
fn frozen_at(payload: &Path, started: Instant) -> Instant {
    let log = payload.join(CHECKPOINT_DIR).join(away_runtime::CRIU_WORK_DIR).join("dump.log");
    away_runtime::runtime::criu_frozen_at(&log).filter(|t| *t >= started).unwrap_or(started)
}

/// How long a source whose page link broke waits for the target's answer (which names
/// why, when its restore failed) before it gives up without one.
const VERDICT_GRACE: Duration = Duration::from_secs(2);

/// A page relay listening for a move's target `there` (only its node is taken) where
/// the target reaches it: on this host's address on the route to the target's
/// transfer port.
async fn early_page_relay(
    there: &crate::target::TargetInfo,
    opts: &ContainerMigrationOptions,
) -> Result<crate::lazy::PendingRelay, MigrateError> {
    let no_relay = |e: std::io::Error| MigrateError::Invalid(format!("cannot start the page relay: {e}"));
    let to = tokio::net::lookup_host(&there.transfer_addr).await.map_err(no_relay)?.next().ok_or_else(|| {
        MigrateError::Invalid(format!("no address for the target's transfer port {}", there.transfer_addr))
    })?;
    // (a datagram socket's connect only looks the route up: nothing is sent)
    let any: std::net::IpAddr = match to {
        std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let route = std::net::UdpSocket::bind((any, 0))
        .and_then(|u| {
            u.connect(to)?;
            u.local_addr()
        })
        .map_err(no_relay)?;
    let link = crate::lazy::PageLink { channels: opts.transfer.channels.clone(), peer_node: there.node.name.clone() };
    crate::lazy::PendingRelay::listen((route.ip(), 0).into(), link).await.map_err(no_relay)
}

/// A connection to the target's transfer port, opened before the workload stops (the
/// payload then goes without a connect round trip in the pause), and the address of
/// this host the target reaches (its local end: where the page relay listens).
/// Also returns how long it took to open: one round trip to the target. Under TLS the
/// handshake (one more round trip with TLS 1.3) is made here too, before the freeze.
/// Also returns its socket (a second descriptor of it, for its options once the mode is
/// known: [`migrate_lazy`] switches it to CUBIC).
async fn connect_early(target: &str, peer_node: &str, send: &SendOptions) -> Result<Early, MigrateError> {
    let unreachable =
        |e: std::io::Error| MigrateError::Invalid(format!("cannot reach the target's transfer port {target}: {e}"));
    let t = Instant::now();
    let s = tokio::net::TcpStream::connect(target).await.map_err(unreachable)?;
    let round_trip = t.elapsed();
    let ip = s.local_addr().map_err(|e| MigrateError::Invalid(e.to_string()))?.ip();
    // Small control frames must not wait for Nagle.
    s.set_nodelay(true).map_err(unreachable)?;
    transfer::bound_dead_link(&s, send.stall_timeout).map_err(unreachable)?;
    let socket = std::os::fd::AsFd::as_fd(&s).try_clone_to_owned().map_err(unreachable)?;
    let handshake = tokio::time::timeout(send.connect_timeout, send.channels.connect(s, peer_node));
    let s = handshake
        .await
        .map_err(|_| {
            MigrateError::Invalid(format!(
                "no TLS handshake with the target's transfer port {target} within {:?}",
                send.connect_timeout
            ))
        })?
        .map_err(unreachable)?;
    Ok((s, ip, round_trip, socket))
}

/// The early transfer connection: the stream, this host's address on it, how long the
/// connect took (a round trip), and its socket ([`connect_early`]).
type Early = (crate::channel::Stream, std::net::IpAddr, Duration, std::os::fd::OwnedFd);

/// Filler written on the early connection as the dump begins
/// ([`crate::transfer::warm_up`]): its two round trips of slow start overlap the dump,
/// and the payload (20-40 KiB compressed) then leaves in one flight.
const WARM_UP_BYTES: u32 = 48 * 1024;

/// Lazy (post-copy) move: CRIU dumps everything but memory, the small payload travels,
/// the target restores at once and fetches pages through the relay pair
/// ([`crate::lazy`]); the source stays frozen until the last page has moved, and only
/// then is the target's copy committed. If the lazy phase fails, CRIU resumes the
/// source and the target's copy is removed: one instance either way.
///
/// Streamed stop-and-copy takes the same road, but the target pulls every page
/// before it restores ([`crate::lazy::pull`]) and lets the source go once its copy runs.
async fn migrate_lazy(m: Moving<'_>) -> Result<MigrationReport, MigrateError> {
    let Moving { runtime, name, here, there, target, archives, opts, progress, streamed, early, .. } = m;
    let mut phases = m.phases;
    let (early, local_ip, round_trip, socket) = early;
    // The payload is small and waited for: CUBIC sends what the window holds at once,
    // where BBR (this host's default) paces it at the young connection's bandwidth
    // estimate, a round trip's worth on a 73.6 ms path.
    if let Err(e) = socket2::SockRef::from(&socket).set_tcp_congestion(b"cubic") {
        tracing::debug!("the transfer connection keeps the host's congestion control: {e}");
    }
    drop(socket);
    let compress_pages = opts.compress_pages.unwrap_or_else(|| {
        let same_host = there.transfer_addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
        opts.transfer.compression != crate::transfer::Compression::None && !same_host
    });
    progress(Step::Checkpointing);
    let mut early = early;
    let warming = tokio::spawn(async move {
        if let Err(e) = crate::transfer::warm_up(&mut early, WARM_UP_BYTES).await {
            // the payload's send finds the connection broken and opens another
            tracing::warn!("warming the transfer connection up: {e}");
        }
        early
    });
    let checkpoint_start = Instant::now();
    let stopped_at_ms = now_ms();
    let payload = archives.create(name)?;
    let criu_port = away_runtime::host::free_loopback_port()
        .map_err(|e| MigrateError::Invalid(format!("no free port for CRIU's page server: {e}")))?;
    // each step on disk before it is taken, as for a staged move: a source killed from
    // here on is finished by its next start (`crate::journal::recover`), which asks the
    // target and looks at the workload CRIU resumed or ended
    let transfer_id = opts.transfer.transfer_id.clone().unwrap_or_else(transfer::new_transfer_id);
    let journal = opts.journal.as_deref();
    let mut journaled = OutgoingMove::checkpointing(&transfer_id, name, &there.node.name, payload.clone());
    // where CRIU's page server will listen (the dump names the namespace for sure)
    journaled.page_server = Some(PageServer {
        netns: m.pid.map_or_else(|| "/proc/self/ns/net".into(), |p| format!("/proc/{p}/ns/net").into()),
        addr: (std::net::Ipv4Addr::LOCALHOST, criu_port).into(),
    });
    if let Some(j) = journal {
        if let Err(e) = j.record(&journaled) {
            let _ = archives.discard(&payload);
            return Err(MigrateError::Invalid(format!("cannot journal move {transfer_id} of {name}: {e}")));
        }
    }
    let lazy_opts = away_runtime::LazyCheckpointOptions {
        dir: payload.join(CHECKPOINT_DIR),
        page_server_port: criu_port,
        volumes_sent: m.precopy.as_ref().map(|p| p.sent.clone()),
    };
    // the runtime's own steps (Docker's) become the phase's parts
    let (dump, mut parts) = away_runtime::steps::collect(runtime.checkpoint_lazy(name, &lazy_opts)).await;
    let dump = match dump {
        Ok(d) => d,
        Err(e) => {
            // CRIU thaws the process when its dump fails: say whether it runs
            archives.keep_failed(&payload);
            record_logged(journal, &journaled.with_state(OutgoingState::Aborted));
            return Err(resumed_or_not(
                runtime,
                name,
                format!("lazy checkpoint failed: {e}", e = ErrorChain(&e)),
                None,
            )
            .await);
        }
    };
    journaled.archive = Some(dump.archive.clone());
    journaled.page_server = Some(PageServer { netns: dump.netns.clone(), addr: dump.page_server });
    // CRIU 4.2.1 as released leaves no page lazy when a thread's stack pointer sits on a
    // page boundary (its is_stack() compares the offsets in the page, not the pages;
    // deploy/install.sh builds CRIU mended). The move still works, as stop-and-copy
    // with the whole memory in the payload; the report says so.
    let nothing_lazy = crate::lazy::pagemap::nothing_left_lazy(&payload.join(CHECKPOINT_DIR));
    if nothing_lazy {
        tracing::warn!(
            workload = name,
            "CRIU left no page lazy (all in the payload): the move goes as stop-and-copy; \
             a CRIU without the is_stack() fix of deploy/criu/ does this when a thread's stack pointer is on a page boundary"
        );
    }
    // the pause starts at CRIU's freeze
    let downtime_start = frozen_at(&payload, checkpoint_start);
    if let (false, Some(pid)) = (streamed, m.pid) {
        // the pages the restore and the first instructions touch travel with the payload
        match crate::lazy::push::push_resume_pages(&payload.join(CHECKPOINT_DIR), pid) {
            Ok(pages) => tracing::debug!(workload = name, pages, "pages pushed with the payload"),
            Err(e) => tracing::warn!(workload = name, "pages the resume touches stay lazy: {e}", e = ErrorChain(&e)),
        }
    }
    // the frozen source record steps aside, so that a target on the same engine may
    // take its name (Docker's; a failure below gives it back)
    let aside = Instant::now();
    let set_aside = match runtime.step_aside(name).await {
        Ok(n) => n,
        Err(e) => {
            let why = format!("the source cannot give up its name: {e}", e = ErrorChain(&e));
            dump.abort().await;
            archives.keep_failed(&payload);
            record_logged(journal, &journaled.with_state(OutgoingState::Aborted));
            return Err(resumed_or_not(runtime, name, why, None).await);
        }
    };
    if set_aside.is_some() {
        parts.push(phase("step-aside", aside.elapsed()));
    }
    journaled.set_aside = set_aside.clone();
    journaled = journaled.with_state(OutgoingState::Checkpointing);
    record_logged(journal, &journaled);
    let set_aside = set_aside.as_deref();
    let (mut pushed, mut offered_lazy) = (false, false);
    // (an early relay listens on this host's address on the route to the target)
    let relay_ip = m.page_relay.as_ref().map_or(local_ip, |(pending, _)| pending.ip);
    let started_relay = match m.page_relay {
        Some((pending, early_link)) => {
            // a target that opened its link early is told what comes on it (pushed pages,
            // or a lazy move's ranges to ask for at once); one that did not connects later
            let dir = payload.join(CHECKPOINT_DIR);
            let offer = early_link.then(|| match streamed {
                true => crate::lazy::early::Offer::streamed(&dir),
                false => crate::lazy::early::Offer::lazy(&dir, &m.hot),
            });
            pushed = offer.as_ref().is_some_and(crate::lazy::early::Offer::pushes);
            offered_lazy = early_link && !streamed;
            Ok(pending.start(dump.page_server_connector(), crate::lazy::LazyFault::from_env(), compress_pages, offer))
        }
        None => {
            crate::lazy::SourceRelay::start(
                (local_ip, 0).into(),
                dump.page_server_connector(),
                crate::lazy::LazyFault::from_env(),
                compress_pages,
                // only the target's connection is taken (under TLS, by its certificate)
                crate::lazy::PageLink { channels: opts.transfer.channels.clone(), peer_node: there.node.name.clone() },
            )
            .await
        }
    };
    let relay = match started_relay {
        Ok(r) => r,
        Err(e) => {
            // nothing can reach CRIU's page server: end the dump, the source resumes
            let why = format!("cannot start the page relay on {local_ip}: {e}", e = ErrorChain(&e));
            dump.abort().await;
            archives.keep_failed(&payload);
            record_logged(journal, &journaled.with_state(OutgoingState::Aborted));
            return Err(resumed_aside(runtime, name, set_aside, why, None).await);
        }
    };
    let page_relay = std::net::SocketAddr::new(relay_ip, relay.port);
    phases.push(MigrationPhase { parts, ..phase("checkpoint", checkpoint_start.elapsed()) });
    let memory = m.pid.map(crate::mode::resident_bytes).unwrap_or(0);
    // asked from the freeze on: the first answer comes from the target
    let follow = FollowProbe::start(&dump.archive.spec, unix_ms_at(downtime_start));
    let manifest = Manifest {
        spec: dump.archive.spec.clone(),
        image: dump.archive.image.clone(),
        runtime: runtime.kind(),
        source_node: here.name.clone(),
        stopped_at_ms,
        lazy_page_relay: Some(page_relay),
        lazy_hot: m.hot,
        pull_pages: streamed,
        close_connections: m.opts.close_connections,
    };
    // Any failure until the target runs: CRIU resumes the source when told.
    let payload_ref = payload.as_path();
    let aborted = &journaled.with_state(OutgoingState::Aborted);
    let give_up = |why: String, dump: away_runtime::LazyDump, relay: crate::lazy::SourceRelay| async move {
        progress(Step::RollingBack(why.clone()));
        let _ = relay.abort().await;
        let finished = dump.finish().await;
        archives.keep_failed(payload_ref);
        record_logged(journal, aborted);
        resumed_aside(runtime, name, set_aside, why, finished.err()).await
    };
    let prepared = std::fs::write(payload.join(MANIFEST), serde_json::to_vec_pretty(&manifest).unwrap_or_default());
    if let Err(e) = prepared {
        return Err(give_up(format!("write the migration payload in {}: {e}", payload.display()), dump, relay).await);
    }

    #[cfg(feature = "fault-injection")]
    hold("AFTER_FREEZE").await;
    let counters = relay.counters.clone();
    let ticker = || {
        let bar = progress.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            loop {
                let (moved, total) = (counters.plain(), memory);
                bar(if streamed { Step::Streaming { moved, total } } else { Step::Paging { moved, total } });
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let t = Instant::now();
    // streamed: the pages move while the target answers (it pulls them first)
    let pulling = streamed.then(ticker);
    // a target that dies while pages move breaks the page link before any verdict:
    // give up then instead of waiting for its agent to come back
    let early = warming.await.ok();
    let send = send_payload(&there.transfer_addr, &payload, &manifest, opts, progress, early, &transfer_id);
    tokio::pin!(send);
    let sent = loop {
        tokio::select! {
            r = &mut send => break Some(r),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if relay.broken() {
                    // a target whose restore failed (its page daemon, say) ends the link
                    // too: its answer, when it comes at once, says why. An answer that
                    // the copy runs changes nothing: CRIU was told to resume the source.
                    let answer = tokio::time::timeout(VERDICT_GRACE, &mut send).await.ok();
                    break answer.filter(|r| !matches!(r, Ok(o) if o.verdict.ok));
                }
                // (fault injection: killed while pages move, the relay's connection to
                // CRIU is reset by the kernel)
                #[cfg(feature = "fault-injection")]
                if relay.counters.plain() > 0 {
                    source_dies("streaming");
                }
            }
        }
    };
    if let Some(p) = pulling {
        p.abort();
    }
    let outcome = match sent {
        None => {
            let why = format!("the page link to {} broke before it answered", there.node.name);
            return Err(give_up(why, dump, relay).await);
        }
        Some(Ok(o)) if o.verdict.ok => o,
        Some(Ok(o)) => {
            let why = format!("target {} could not restore {name}: {}", there.node.name, o.verdict.message);
            return Err(give_up(why, dump, relay).await);
        }
        Some(Err(e)) => {
            let why =
                format!("transfer to {} ({}) failed: {e}", there.node.name, there.transfer_addr, e = ErrorChain(&e));
            return Err(give_up(why, dump, relay).await);
        }
    };
    let detail = |key: &str| outcome.verdict.detail.get(key).and_then(|v| v.as_u64());
    let (restore_ms, pull_ms) = (detail("restore_ms").unwrap_or(0), detail("pull_ms").unwrap_or(0));
    // streamed: the target's copy runs and is final (every page in, CRIU let go); lazy:
    // it runs while its pages come
    journaled = journaled.with_state(OutgoingState::Sent);
    record_logged(journal, &journaled);
    #[cfg(feature = "fault-injection")]
    source_dies("after-verdict");
    let running_ms = detail("running_ms").or(detail("settle_ms")).unwrap_or(0);
    // the workload ran on the target from the end of its restore: the blackout ends
    // there, and the answer's trip back (half the round trip the connection took to
    // open) is not part of it
    let downtime = downtime_start.elapsed().saturating_sub(Duration::from_millis(running_ms) + round_trip / 2);
    phases.push(MigrationPhase::new(
        "transfer",
        (t.elapsed().as_millis() as u64).saturating_sub(restore_ms + running_ms),
    ));
    if streamed {
        phases.push(MigrationPhase::new("pages", pull_ms));
    }
    phases.push(MigrationPhase {
        parts: restore_parts(&outcome.verdict),
        ..MigrationPhase::new("restore", restore_ms - pull_ms.min(restore_ms))
    });
    // the copy ran on the target while the answer waited (the settle wait, the release)
    phases.push(MigrationPhase::new("settle", running_ms));

    // the lazy phase: the target runs while its memory arrives (streamed: the source's
    // CRIU, released, ends at once)
    let t = Instant::now();
    let paging = (!streamed).then(ticker);
    let finished = dump.finish().await;
    let relayed = relay.wait().await;
    if let Some(p) = paging {
        p.abort();
    }
    // lazy: the copy had all its memory when its daemon said so (its close, here half a
    // round trip after it left, as the answer came half a round trip after the copy had
    // run `running_ms`: the halves cancel); what follows is CRIU's end on both sides
    let paged = (!streamed).then(|| counters.closed_at().map(|at| at.saturating_duration_since(t))).flatten();
    let degraded = match (streamed, paged) {
        (true, _) => Duration::ZERO,
        (false, Some(paged)) => paged + Duration::from_millis(running_ms),
        (false, None) => t.elapsed() + Duration::from_millis(running_ms),
    };
    match paged {
        Some(paged) => {
            phases.push(phase("lazy-pages", paged));
            phases.push(phase("lazy-close", t.elapsed().saturating_sub(paged)));
        }
        None => phases.push(phase(if streamed { "release" } else { "lazy-pages" }, t.elapsed())),
    }
    if let Err(e) = finished {
        let why = format!(
            "the lazy phase failed ({}): {e}",
            relayed.err().map_or_else(|| "the page relay saw no error".into(), |r| error_chain(&r)),
            e = ErrorChain(&e)
        );
        progress(Step::RollingBack(why.clone()));
        if let Err(ae) = target.abort(&outcome.transfer_id).await {
            tracing::warn!(workload = name, "the target could not remove its partial copy: {ae}");
        }
        archives.keep_failed(&payload);
        record_logged(journal, &journaled.with_state(OutgoingState::Aborted));
        return Err(resumed_aside(runtime, name, set_aside, why, None).await);
    }

    // every page moved and CRIU ended the source process: the target's copy is the one
    #[cfg(feature = "fault-injection")]
    source_dies("before-commit");
    record_logged(journal, &journaled.with_state(OutgoingState::Committing));
    progress(Step::Committing);
    let t = Instant::now();
    if let Err(e) = target.commit(&outcome.transfer_id).await.and_then(|r| {
        r.ok_or_else(|| NoAnswer { message: "the target no longer knows the move".into(), maybe_delivered: false })
    }) {
        // the target made its copy final itself when its last page arrived (and the
        // source's process is gone): a commit it no longer knows is no failure
        tracing::debug!(workload = name, "commit to {}: {e}", there.node.name, e = ErrorChain(&e));
    }
    phases.push(phase("commit", t.elapsed()));
    let volumes = volume_transfer(&manifest.spec, &payload, m.precopy.as_ref());
    clean_source(runtime, name, set_aside.unwrap_or(name), archives, &payload, progress, &mut phases).await?;
    record_logged(journal, &journaled.with_state(OutgoingState::Done));
    let (pre_raw, pre_wire) = m.precopy.as_ref().map_or((0, 0), |p| (p.bytes_raw, p.bytes_wire));
    let total_millis = m.started.elapsed().as_millis() as u64;
    let resumed = unix_ms_at(downtime_start + downtime);
    Ok(MigrationReport {
        workload: name.into(),
        mode: if streamed { MigrationMode::StopAndCopy } else { MigrationMode::Lazy },
        source: here.name.clone(),
        target: there.node.name.clone(),
        phases,
        total_millis,
        downtime_millis: downtime.as_millis() as u64,
        degraded_millis: degraded.as_millis() as u64,
        resumed_unix_ms: Some(resumed),
        started_unix_ms: None,
        bytes_raw: outcome.bytes_raw + counters.plain() + pre_raw,
        paged_bytes_raw: counters.plain(),
        bytes_wire: outcome.bytes_wire + counters.wire() + pre_wire,
        reason: {
            let mut reason = m.reason;
            if nothing_lazy {
                reason.push_str("; CRIU left no page lazy, the whole memory went in the payload");
            }
            if pushed {
                reason.push_str(
                    "; the pages were pushed from the dump's end down the link the target opened at the announce",
                );
            }
            if offered_lazy {
                reason.push_str(
                    "; the target asked for the pages from the dump's end, down the link it opened at the announce",
                );
            }
            if opts.compress_pages.is_none() && !compress_pages {
                reason.push_str("; the page stream went stored (the target is on this host)");
            }
            reason
        },
        ok: true,
        error: None,
        predicted: None,
        volumes,
        network: FollowProbe::finish(follow, resumed).await,
    })
}

/// [`resumed_or_not`] for a source that stepped aside (as `aside`): it takes its name
/// back first.
async fn resumed_aside(
    runtime: &dyn away_runtime::Runtime,
    name: &str,
    aside: Option<&str>,
    why: String,
    lazy_error: Option<RuntimeError>,
) -> MigrateError {
    if let Some(aside) = aside {
        if let Err(e) = runtime.step_back(aside, name).await {
            tracing::warn!(workload = name, "the source keeps its temporary name {aside}: {e}", e = ErrorChain(&e));
        }
    }
    resumed_or_not(runtime, name, why, lazy_error).await
}

/// After a failed lazy move: is the source running again (CRIU resumes it)?
async fn resumed_or_not(
    runtime: &dyn away_runtime::Runtime,
    name: &str,
    why: String,
    lazy_error: Option<RuntimeError>,
) -> MigrateError {
    let detail = lazy_error.map(|e| format!(" (CRIU: {e})", e = ErrorChain(&e))).unwrap_or_default();
    match runtime.status(name).await {
        Ok(s) if s.state == WorkloadState::Running => MigrateError::RolledBack {
            why,
            resumed: true,
            detail: format!("{name} runs on at the source (CRIU resumed it){detail}"),
        },
        Ok(s) => MigrateError::RolledBack {
            why,
            resumed: false,
            detail: format!("{name} is {} at the source{detail}", s.state),
        },
        Err(e) => {
            MigrateError::RolledBack { why, resumed: false, detail: format!("{name}: {e}{detail}", e = ErrorChain(&e)) }
        }
    }
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
    /// Where the move is journaled, and its record: a resume ends it as aborted.
    journal: Option<(&'a dyn crate::journal::MoveJournal, OutgoingMove)>,
}

impl Undo<'_> {
    /// Resume the source from its own checkpoint; the payload stays for inspection.
    async fn rollback(&self, why: String) -> MigrateError {
        let Undo { progress, node, checkpoint, image, archives, payload, .. } = self;
        let set_aside = self.set_aside.as_deref();
        tracing::warn!(workload = %checkpoint.workload, "migration failed, resuming the source: {why}");
        progress(Step::RollingBack(why.clone()));
        let restored = resume_from(node, checkpoint, image, set_aside).await;
        archives.keep_failed(payload);
        if let (Ok(_), Some((j, m))) = (&restored, &self.journal) {
            record_logged(Some(*j), &m.with_state(OutgoingState::Aborted));
        }
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
                    payload.display(),
                    e = ErrorChain(&e)
                ),
            },
        }
    }
}

/// A move in doubt: its checkpoint is kept as failed, and the journal follows it there
/// (a restart, or the agent's retries, resume from it if the target says aborted).
fn kept_in_doubt(archives: &ArchiveStore, payload: &Path, journal: Option<&dyn MoveJournal>, m: &OutgoingMove) {
    if let Some(kept) = archives.keep_failed(payload) {
        let mut m = m.clone();
        if let Some(a) = &mut m.archive {
            a.dir = kept.join(CHECKPOINT_DIR);
        }
        m.payload = kept;
        record_logged(journal, &m);
    }
}

/// Restore the source from its own checkpoint after a failed move, its stopped record
/// (under its temporary name `set_aside`, if it stepped aside) removed first.
pub async fn resume_from(
    node: &LocalNode,
    checkpoint: &CheckpointArchive,
    image: &away_runtime::ResolvedImage,
    set_aside: Option<&str>,
) -> Result<away_model::WorkloadStatus, RuntimeError> {
    let runtime = node.runtime(checkpoint.runtime)?;
    if let Some(aside) = set_aside {
        if let Err(e) = runtime.remove(aside).await {
            tracing::warn!("cannot remove the set-aside source record {aside}: {e}");
        }
    }
    runtime
        .restore(&RestoreRequest { archive: checkpoint.clone(), image: image.clone(), close_connections: false })
        .await
}

/// A payload restored on the target.
pub struct Restored {
    pub status: away_model::WorkloadStatus,
    /// How long the restore itself took (without the settle wait).
    pub restore: Duration,
    /// Lazy move: the daemon still fetching memory; the copy is complete only when it
    /// ends well.
    pub lazy: Option<crate::lazy::LazyPagesDaemon>,
    /// Streamed move: the source has let go of its process (its CRIU ends it), so this
    /// copy is the workload now, commit or not.
    pub released: bool,
    /// Streamed move: how long the pages took to arrive (part of `restore`).
    pub pull: Duration,
    /// How long the copy had run when the answer left (the settle wait, and for a
    /// streamed move the source's release): not downtime.
    pub running: Duration,
    /// The runtime's own steps of the restore (Docker's), for the report.
    pub parts: Vec<MigrationPhase>,
}

/// A failed restore on the target.
#[derive(Debug)]
pub struct RestoreFailed {
    pub message: String,
    /// A copy this restore started and could not remove at once (a lazily restored
    /// process whose page daemon died can take a while to die): the caller must keep
    /// trying, or two instances could be left.
    pub leftover: Option<String>,
}

impl From<String> for RestoreFailed {
    fn from(message: String) -> Self {
        RestoreFailed { message, leftover: None }
    }
}

impl From<crate::lazy::LazyError> for RestoreFailed {
    fn from(e: crate::lazy::LazyError) -> Self {
        RestoreFailed::from(error_chain(&e))
    }
}

/// Remove a copy this restore started; what cannot go at once is named for the caller.
async fn failed_with_copy(runtime: &dyn Runtime, name: &str, message: String) -> RestoreFailed {
    match runtime.remove(name).await {
        Ok(()) => RestoreFailed { message, leftover: None },
        Err(e) => {
            tracing::warn!(
                workload = name,
                "the failed copy did not go at once, left to retry: {e}",
                e = ErrorChain(&e)
            );
            RestoreFailed { message, leftover: Some(name.to_string()) }
        }
    }
}

/// Target side: restore a received payload on this node and answer whether it runs.
/// Pages of a lazy or streamed move come over `pages` (its peer: the move's source node);
/// a streamed move's over `early_pages` when this node opened that link at the announce.
/// `volumes_base`: the pre-copy of the workload's volumes this node received for the
/// move, from which a checkpoint that carries only their changes is completed first.
pub async fn restore_received(
    node: &LocalNode,
    payload: &ReceivedPayload,
    settle: Duration,
    pages: &crate::lazy::PageLink,
    early_pages: Option<crate::lazy::early::EarlyLink>,
    volumes_base: Option<&Path>,
) -> Result<Restored, RestoreFailed> {
    let started = Instant::now();
    let manifest = Manifest::of_payload(payload)?;
    let image_tar = payload.dir.join(IMAGE_TAR);
    if image_tar.is_file() {
        node.store.add(&image_tar, Some(&manifest.image)).map_err(|e| error_chain(&e))?;
    }
    let image = node.store.resolve_stored(&manifest.image).map_err(|e| error_chain(&e))?;
    let runtime = node.runtime(manifest.runtime).map_err(|e| error_chain(&e))?;
    let dir: PathBuf = payload.dir.join(CHECKPOINT_DIR);
    let archive = CheckpointArchive {
        workload: manifest.spec.name.clone(),
        runtime: manifest.runtime,
        bytes: payload.bytes_raw,
        dir: dir.clone(),
        spec: manifest.spec.clone(),
        image: manifest.image.clone(),
    };
    let request = RestoreRequest { archive, image, close_connections: manifest.close_connections };
    // the source keeps its CRIU work directory; CRIU wants one here too
    away_runtime::host::beneath::Beneath::open(&dir)
        .and_then(|d| d.create_dir_all(away_runtime::CRIU_WORK_DIR, 0o700))
        .map_err(|e| e.to_string())?;
    // the restore's parts: the image store's, then the runtime's own steps
    let mut parts = vec![phase("store", started.elapsed())];
    let t = Instant::now();
    let from_precopy = away_runtime::volume::complete_delta(&dir, volumes_base).map_err(|e| error_chain(&e))?;
    if from_precopy > 0 {
        parts.push(phase("volume-delta", t.elapsed()));
    }
    let (mut pulled, mut pull) = (None, Duration::ZERO);
    let (st, mut lazy) = match manifest.lazy_page_relay {
        None => {
            let (restored, steps) = away_runtime::steps::collect(runtime.restore(&request)).await;
            parts.extend(steps);
            (restored.map_err(|e| error_chain(&e))?, None)
        }
        Some(relay) if manifest.pull_pages => {
            let t = Instant::now();
            let pages = crate::lazy::pull::pull_all(&dir, relay, pages, early_pages)
                .await
                .map_err(|e| format!("pull the pages: {e}", e = ErrorChain(&e)))?;
            pull = t.elapsed();
            let (restored, steps) = away_runtime::steps::collect(runtime.restore(&request)).await;
            parts.extend(steps);
            match restored {
                Ok(st) => {
                    pulled = Some(pages);
                    (st, None)
                }
                Err(e) => {
                    pages.abort();
                    return Err(error_chain(&e).into());
                }
            }
        }
        Some(relay) => {
            // the daemon starts while the restore prepares the container; the restore
            // waits for it only before CRIU runs (its wait is the restore's
            // `page-daemon` part)
            let (up_tx, up_rx) = tokio::sync::oneshot::channel();
            let pages_up: away_runtime::LazyPagesUp =
                Box::pin(async move { up_rx.await.unwrap_or_else(|_| Err("its start was abandoned".to_string())) });
            let restore = away_runtime::steps::collect(runtime.restore_lazy(&request, pages_up));
            tokio::pin!(restore);
            let started = async {
                let daemon =
                    crate::lazy::LazyPagesDaemon::start(&dir, relay, &manifest.lazy_hot, pages.clone(), early_pages)
                        .await;
                let _ = up_tx.send(daemon.as_ref().map(drop).map_err(|e| ErrorChain(e).to_string()));
                daemon
            };
            tokio::pin!(started);
            let daemon = tokio::select! {
                daemon = &mut started => daemon,
                (r, steps) = &mut restore => {
                    // the restore failed before it needed the daemon: stop that too
                    parts.extend(steps);
                    if let Ok(mut daemon) = started.await {
                        daemon.kill().await;
                    }
                    return Err(match r {
                        Ok(st) => failed_with_copy(runtime, &st.name, "restored without its page daemon".into()).await,
                        Err(e) => RestoreFailed::from(error_chain(&e)),
                    });
                }
            };
            let mut daemon = match daemon {
                Ok(d) => d,
                Err(e) => {
                    // told so, the restore undoes what it made
                    let _ = restore.await;
                    return Err(e.into());
                }
            };
            // a daemon that ended well had every page before the restore ended (a small
            // memory, prefetched since the dump's end; CRIU tells its daemon the restore
            // is done before the runtime answers): the restore goes on, the copy whole
            let mut paged_in = false;
            let restored = loop {
                tokio::select! {
                    (r, steps) = &mut restore => {
                        parts.extend(steps);
                        break r.map_err(|e| RestoreFailed::from(error_chain(&e)));
                    }
                    gone = daemon.exited(), if !paged_in => {
                        if matches!(&gone, crate::lazy::LazyError::DaemonExited { status, .. } if status.success()) {
                            tracing::info!(workload = %manifest.spec.name, "every page was in before the restore ended");
                            paged_in = true;
                            continue;
                        }
                        // the link or the source failed mid-restore: end the restore (it
                        // cleans up after itself) instead of waiting for pages forever
                        crate::lazy::LazyPagesDaemon::kill_restore(&dir);
                        let message = format!("the lazy-pages daemon ended during the restore: {}", ErrorChain(&gone));
                        // the restore may have got as far as a running copy, which misses memory
                        break Err(match restore.await.0 {
                            Ok(st) => failed_with_copy(runtime, &st.name, message).await,
                            Err(_) => RestoreFailed::from(message),
                        });
                    }
                }
            };
            match restored {
                Ok(st) => {
                    match st.pid {
                        Some(pid) if pid > 0 => daemon.guard(pid),
                        _ => tracing::warn!(
                            workload = st.name,
                            "no pid for the restored copy: a failing page daemon cannot stop it"
                        ),
                    }
                    (st, Some(daemon))
                }
                Err(e) => {
                    daemon.kill().await;
                    return Err(e);
                }
            }
        }
    };
    let restore = started.elapsed();
    // healthy = still running a moment later (a restore can succeed and the process die at once)
    tokio::time::sleep(settle).await;
    let gone = |lazy: &mut Option<crate::lazy::LazyPagesDaemon>| {
        let daemon = lazy.take();
        async move {
            if let Some(mut d) = daemon {
                d.kill().await;
            }
        }
    };
    let status = runtime.status(&st.name).await;
    if let Some(pages) = pulled {
        if matches!(&status, Ok(s) if s.state == WorkloadState::Running) {
            // the copy runs: the source may let go of its process
            if let Err(e) = pages.release().await {
                let message = format!("the source did not confirm the end of the page stream: {e}", e = ErrorChain(&e));
                return Err(failed_with_copy(runtime, &st.name, message).await);
            }
            let status = status.expect("checked");
            let running = started.elapsed() - restore;
            return Ok(Restored { status, restore, lazy, released: true, pull, running, parts });
        }
        pages.abort();
    }
    match status {
        Ok(s) if s.state == WorkloadState::Running => {
            Ok(Restored { status: s, restore, lazy, released: false, pull, running: settle, parts })
        }
        Ok(s) => {
            gone(&mut lazy).await;
            let message = format!("{} was restored but is {} after {} ms", s.name, s.state, settle.as_millis());
            Err(failed_with_copy(runtime, &s.name, message).await)
        }
        Err(e) => {
            gone(&mut lazy).await;
            let message = format!("{} was restored but its status is unknown: {e}", st.name, e = ErrorChain(&e));
            Err(failed_with_copy(runtime, &st.name, message).await)
        }
    }
}

/// The handler answer for a received payload.
pub fn verdict_for(result: &Result<Restored, RestoreFailed>, settle: Duration) -> Verdict {
    match result {
        Ok(r) => {
            Verdict::ok(format!("{} running on {}", r.status.name, r.status.runtime)).with_detail(serde_json::json!({
                "status": r.status,
                "restore_ms": r.restore.as_millis() as u64,
                "settle_ms": settle.as_millis() as u64,
                "pull_ms": r.pull.as_millis() as u64,
                "running_ms": r.running.as_millis() as u64,
                "restore_parts": r.parts,
            }))
        }
        Err(e) => Verdict::failed(e.message.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload_with(manifest: &serde_json::Value) -> (tempfile::TempDir, ReceivedPayload) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), serde_json::to_vec(manifest).unwrap()).unwrap();
        let payload = ReceivedPayload {
            transfer_id: "t1".into(),
            dir: dir.path().to_path_buf(),
            meta: serde_json::Value::Null,
            peer: "127.0.0.1:1".parse().unwrap(),
            bytes_raw: 0,
            bytes_wire: 0,
        };
        (dir, payload)
    }

    fn manifest(name: &str, memory: &str) -> serde_json::Value {
        serde_json::json!({
            "spec": {"name": name, "image": "away/counter:latest", "resources": {"memory": memory, "cpus": 0.5}},
            "image": "away/counter:latest", "runtime": "containerd", "source_node": "a", "stopped_at_ms": 1
        })
    }

    /// A peer's spec passes the API's checks or the restore is refused, the field named.
    #[test]
    fn a_received_spec_is_validated_like_any_other() {
        let (_d, ok) = payload_with(&manifest("web-1", "64MiB"));
        assert_eq!(Manifest::of_payload(&ok).unwrap().spec.name, "web-1");
        for (m, field) in [(manifest("../../etc", "64MiB"), "name"), (manifest("web", "1KiB"), "resources.memory")] {
            let (_d, bad) = payload_with(&m);
            let err = Manifest::of_payload(&bad).unwrap_err();
            assert!(err.contains(field) && err.contains("manifest.json of transfer t1"), "{field}: {err}");
        }
    }
}
