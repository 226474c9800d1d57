//! A workload as it runs on a node, and the decision that put it on its runtime.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::RuntimeKind;

/// Lifecycle state of a workload on its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WorkloadState {
    /// Created but not started (or being restored).
    Created,
    Running,
    /// Frozen (e.g. during a checkpoint).
    Paused,
    /// Exited or stopped; it can be removed.
    Stopped,
    /// The runtime knows it but cannot say more.
    Unknown,
}

impl fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkloadState::Created => "created",
            WorkloadState::Running => "running",
            WorkloadState::Paused => "paused",
            WorkloadState::Stopped => "stopped",
            WorkloadState::Unknown => "unknown",
        })
    }
}

/// What `away ps` shows for one workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkloadStatus {
    pub name: String,
    pub runtime: RuntimeKind,
    pub state: WorkloadState,
    /// Image reference the workload was created from.
    pub image: String,
    /// Host PID of the workload's main process (the container's init, or QEMU).
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Published ports as `host:container`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Extra facts for people (accelerator, restore origin, …).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Why a workload runs where it runs: the outcome of the container→VM fallback rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuntimeDecision {
    pub runtime: RuntimeKind,
    /// One sentence, for people: "container on containerd: healthy and the image is amd64".
    pub reason: String,
    /// Every runtime considered, with why it was or was not taken.
    pub considered: Vec<RuntimeVerdict>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuntimeVerdict {
    pub runtime: RuntimeKind,
    pub usable: bool,
    pub why: String,
}

/// How a workload moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum MigrationMode {
    /// Container: freeze, checkpoint everything, copy, restore (downtime = the whole move).
    StopAndCopy,
    /// Container: CRIU pre-dump rounds while running, then a short final stop-and-copy.
    PreCopy,
    /// Container: restore at once, pages fetched on demand (post-copy).
    Lazy,
    /// VM: QEMU live migration (pre-copy, optionally post-copy).
    VmLive,
    /// Different architecture: start fresh from the image on the target; state is lost.
    ColdRestart,
}

impl fmt::Display for MigrationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationMode::StopAndCopy => "stop-and-copy",
            MigrationMode::PreCopy => "pre-copy",
            MigrationMode::Lazy => "lazy",
            MigrationMode::VmLive => "vm-live",
            MigrationMode::ColdRestart => "cold-restart",
        })
    }
}

/// One timed step of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationPhase {
    /// `checkpoint`, `transfer`, `restore`, `confirm`, `cleanup`, `vm-migrate`, …
    pub name: String,
    #[serde(deserialize_with = "crate::whole::de")]
    pub millis: u64,
    /// What the phase spent its time on, where the runtime says (Docker's checkpoint
    /// and restore: `docker-checkpoint`, `rootfs-diff`, `docker-create`, `docker-start`,
    /// …); in order, summing to about `millis`. Absent in reports written before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(no_recursion))]
    pub parts: Vec<MigrationPhase>,
}

impl MigrationPhase {
    /// A phase without parts.
    pub fn new(name: impl Into<String>, millis: u64) -> Self {
        MigrationPhase { name: name.into(), millis, parts: Vec::new() }
    }
}

/// What a finished (or failed) migration reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationReport {
    pub workload: String,
    pub mode: MigrationMode,
    pub source: String,
    pub target: String,
    pub phases: Vec<MigrationPhase>,
    #[serde(deserialize_with = "crate::whole::de")]
    pub total_millis: u64,
    /// Time the workload answered nowhere: from the source's stop to the target's start.
    #[serde(deserialize_with = "crate::whole::de")]
    pub downtime_millis: u64,
    /// Lazy moves: time the workload ran on the target while memory was still arriving
    /// (it may be slowed by page faults); 0 for other modes.
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub degraded_millis: u64,
    /// Container moves: when the workload ran again on the target (Unix ms, the
    /// source's clock), to line its own progress up with the move.
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub resumed_unix_ms: Option<u64>,
    /// Container moves: when the move itself began (Unix ms, the source's clock), after
    /// the measuring for its prediction, which is not part of the move.
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub started_unix_ms: Option<u64>,
    /// Bytes of state before compression (CRIU images + rootfs changes, or RAM sent;
    /// a VM's disk blocks mirrored are counted here and in `bytes_wire`).
    #[serde(deserialize_with = "crate::whole::de")]
    pub bytes_raw: u64,
    /// Lazy and streamed container moves: the part of `bytes_raw` that CRIU's page
    /// server sent over the page link instead of in the payload (a lazy move whose dump
    /// left nothing lazy shows 0 here); 0 for other modes.
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub paged_bytes_raw: u64,
    /// Bytes that crossed the network.
    #[serde(deserialize_with = "crate::whole::de")]
    pub bytes_wire: u64,
    /// Why this mode, and the compatibility check's verdict.
    pub reason: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the prediction model said before the move, for the way it took (absent
    /// when nothing was predicted, and in reports written before predictions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<crate::predict::MovePrediction>,
    /// A workload on a lab network (overlay): its address before and after the move
    /// (the same) and how long the network took to follow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NetworkFollow>,
    /// Container moves with volumes: what of them crossed before the freeze and during it
    /// (absent for workloads without volumes and in reports written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<VolumeTransfer>,
}

/// What a container move sent of the workload's volumes: their pre-copy while it still
/// ran, then, in the freeze, the files that changed since (or the whole volumes when
/// there was no pre-copy). Part of the report's `bytes_raw` and `bytes_wire`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VolumeTransfer {
    /// Bytes of the pre-copy's payload before compression (the files not being written,
    /// and the tar around them); 0 without a pre-copy.
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub precopy_bytes_raw: u64,
    /// The pre-copy's bytes on the network.
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub precopy_bytes_wire: u64,
    /// Bytes of volume files the checkpoint carried, during the freeze.
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub frozen_bytes_raw: u64,
    /// Files the checkpoint carried.
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub frozen_files: u64,
    /// Files the target took from the pre-copy (unchanged since it).
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub precopied_files: u64,
    /// Files of the pre-copy deleted before the freeze (absent on the target).
    #[serde(default, deserialize_with = "crate::whole::de")]
    pub deleted_files: u64,
}
