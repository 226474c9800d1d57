//! A workload as it runs on a node, and the decision that put it on its runtime.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::RuntimeKind;

/// Lifecycle state of a workload on its runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct WorkloadStatus {
    pub name: String,
    pub runtime: RuntimeKind,
    pub state: WorkloadState,
    /// Image reference the workload was created from.
    pub image: String,
    /// Host PID of the workload's main process (the container's init, or QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
pub struct RuntimeDecision {
    pub runtime: RuntimeKind,
    /// One sentence, for people: "container on containerd: healthy and the image is amd64".
    pub reason: String,
    /// Every runtime considered, with why it was or was not taken.
    pub considered: Vec<RuntimeVerdict>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeVerdict {
    pub runtime: RuntimeKind,
    pub usable: bool,
    pub why: String,
}
