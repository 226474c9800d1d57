//! What a move is predicted to cost before it starts: the inputs a prediction starts
//! from (each with how it was obtained) and the prediction for each way of moving.
//! The model itself is `away-predict`; these are the types that cross the wire (the
//! broker's dry run, the agent's plan answer, a migration report's `predicted`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One way of moving a workload, as the prediction model tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum MoveKind {
    /// containerd stop-and-copy, pages streamed from CRIU's page server into the target's images.
    ContainerStreamed,
    /// containerd stop-and-copy through a checkpoint on disk (dump, transfer, restore in turn).
    ContainerStaged,
    /// containerd post-copy: restore at once, memory follows.
    ContainerLazy,
    /// Docker stop-and-copy through the engine's checkpoint.
    DockerStaged,
    /// QEMU pre-copy.
    VmPrecopy,
    /// QEMU pre-copy with auto-converge (vCPU throttling).
    VmAutoConverge,
    /// QEMU post-copy after the first pre-copy pass.
    VmPostcopy,
    /// QEMU pre-copy over multifd channels with zstd.
    VmMultifd,
}

impl MoveKind {
    pub const ALL: [MoveKind; 8] = [
        MoveKind::ContainerStreamed,
        MoveKind::ContainerStaged,
        MoveKind::ContainerLazy,
        MoveKind::DockerStaged,
        MoveKind::VmPrecopy,
        MoveKind::VmAutoConverge,
        MoveKind::VmPostcopy,
        MoveKind::VmMultifd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MoveKind::ContainerStreamed => "container-streamed",
            MoveKind::ContainerStaged => "container-staged",
            MoveKind::ContainerLazy => "container-lazy",
            MoveKind::DockerStaged => "docker-staged",
            MoveKind::VmPrecopy => "vm-precopy",
            MoveKind::VmAutoConverge => "vm-auto-converge",
            MoveKind::VmPostcopy => "vm-postcopy",
            MoveKind::VmMultifd => "vm-multifd",
        }
    }

    pub fn is_vm(self) -> bool {
        matches!(self, MoveKind::VmPrecopy | MoveKind::VmAutoConverge | MoveKind::VmPostcopy | MoveKind::VmMultifd)
    }

    /// The container mode (`away migrate --mode`, a migration request's `mode`) that
    /// takes this way; None for VM kinds.
    pub fn container_mode(self) -> Option<&'static str> {
        match self {
            MoveKind::ContainerStreamed => Some("stop-copy"),
            MoveKind::ContainerStaged | MoveKind::DockerStaged => Some("staged"),
            MoveKind::ContainerLazy => Some("lazy"),
            _ => None,
        }
    }
}

impl fmt::Display for MoveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What this node's recent moves cost, per phase (milliseconds, bytes per second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PhaseCosts {
    /// Before anything stops: compatibility, image, mode choice.
    pub check_ms: f64,
    /// Lazy moves: watching the workload's writes besides the check (its working set
    /// goes first): this fixed part plus its pages hashed at `hash_bytes_per_s`. 0 when
    /// the move takes the working set its prediction measured (a move that follows its
    /// plan watches nothing itself).
    pub watch_ms: f64,
    pub hash_bytes_per_s: f64,
    /// What a dump does before it freezes the workload (CRIU's start, finding the
    /// process tree): part of the move's time, not of its pause.
    #[serde(default)]
    pub prefreeze_ms: f64,
    /// A dump's cost beyond its memory once the workload is frozen (the process tree's
    /// state, files).
    pub dump_fixed_ms: f64,
    /// How fast a staged dump writes memory to disk.
    pub dump_bytes_per_s: f64,
    /// A restore's cost beyond its memory.
    pub restore_fixed_ms: f64,
    /// How fast a restore reads memory in.
    pub restore_bytes_per_s: f64,
    /// The target's wait before it calls a restore healthy.
    pub settle_ms: f64,
    /// Commit and cleanup after the target's verdict (after the workload runs on the
    /// target with all its state: not part of a predicted total).
    pub finish_ms: f64,
    /// Raw bytes per second a page stream (streamed and lazy moves, QEMU's sender)
    /// handles when the link is not the limit.
    pub pipeline_bytes_per_s: f64,
    /// Raw bytes per second a staged transfer handles when the link is not the limit
    /// (the archive read, compressed, checksummed, spooled and unpacked on the target).
    pub staged_bytes_per_s: f64,
    /// Raw bytes per second a lazy move's memory follows at when the link is not the limit.
    pub lazy_bytes_per_s: f64,
    /// VMs: starting the destination QEMU.
    pub vm_start_ms: f64,
    /// VMs: a pre-copy completion's pause beyond the last dirty pages, the round trip and
    /// the stream's backlog (device state, the destination's load and resume, the commit).
    pub vm_switchover_ms: f64,
    /// VMs: a post-copy switch's pause beyond the round trip and the stream's backlog
    /// (device state; the destination runs at once and pulls the rest).
    #[serde(default)]
    pub vm_postcopy_switch_ms: f64,
}

/// Everything a prediction starts from. `sources` says, per field name, how it was
/// obtained (measured how, from which history, or a default and why).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PredictionInputs {
    /// Memory the move carries (a container's resident memory; a VM's guest RAM).
    #[serde(deserialize_with = "crate::whole::de")]
    pub state_bytes: u64,
    /// Bytes on the wire per raw byte with zstd level 1 (sampled), 0..=1.
    pub compress_ratio: f64,
    /// VMs: share of guest RAM that is not zero (QEMU sends zero pages as a flag), 0..=1.
    pub nonzero_fraction: f64,
    /// Distinct bytes the workload writes per second.
    pub dirty_bytes_per_s: f64,
    /// VMs: the most the guest's writes dirty however long it runs (its working set),
    /// when two samples of different lengths showed a bound; absent, its whole RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_set_bytes: Option<u64>,
    /// VMs: what QEMU's migration stream may still hold in the source's socket send
    /// buffer when the guest stops; it crosses before the device state, in the pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_stream_backlog_bytes: Option<u64>,
    /// The link's rate between the two nodes.
    pub link_bytes_per_s: f64,
    /// The round trip between the two nodes.
    pub rtt_ms: f64,
    pub costs: PhaseCosts,
    /// VMs: the longest final pause QEMU accepts (its `downtime-limit`).
    pub vm_max_downtime_ms: f64,
    /// VMs: pre-copy still running after this long is cancelled (the move fails).
    pub vm_timeout_s: f64,
    /// Per field above: how it was obtained.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

/// One way of moving, predicted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MovePrediction {
    pub kind: MoveKind,
    /// Can it be taken between these nodes (a lazy move needs userfaultfd, Docker has no page server, …)?
    pub available: bool,
    /// From the move's first check to the workload running on the target with all its
    /// state (lazy and post-copy: its last page), as `away lab` times every path; the
    /// target's settle wait, the commit and the cleanup after are not in it. For a VM
    /// pre-copy that does not converge: its timeout (after which it fails and the VM
    /// stays).
    #[serde(deserialize_with = "crate::whole::de")]
    pub total_ms: u64,
    /// How long the workload answers nowhere.
    #[serde(deserialize_with = "crate::whole::de")]
    pub downtime_ms: u64,
    /// Post-copy: how long it runs on the target while memory still arrives.
    #[serde(deserialize_with = "crate::whole::de")]
    pub degraded_ms: u64,
    #[serde(deserialize_with = "crate::whole::de")]
    pub bytes_wire: u64,
    /// VM pre-copy: does it reach a final copy short enough (within its timeout)? Always
    /// true for the other kinds.
    pub converges: bool,
    /// VM pre-copy: passes over memory before the final copy (or until the timeout).
    #[serde(deserialize_with = "crate::whole::de")]
    pub rounds: u32,
    /// One sentence for people: the dominant term, why not available, why no convergence.
    pub note: String,
}

/// The answer of a plan (`away migrate --plan`, `POST /v1/migrations?dry_run=true`): the
/// inputs, every way's prediction, and the one a request would take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MovePlan {
    pub workload: String,
    pub source: String,
    pub target: String,
    pub inputs: PredictionInputs,
    /// Every kind that applies to this workload's runtime, available or not.
    pub predictions: Vec<MovePrediction>,
    /// The kind the move would take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<MoveKind>,
    /// Why that kind, for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
}

impl MovePlan {
    pub fn prediction(&self, kind: MoveKind) -> Option<&MovePrediction> {
        self.predictions.iter().find(|p| p.kind == kind)
    }

    pub fn chosen_prediction(&self) -> Option<&MovePrediction> {
        self.chosen.and_then(|k| self.prediction(k))
    }
}
