//! The broker ↔ agent protocol. Agents pull: they register once with a join token,
//! then heartbeat; each heartbeat carries the node's fingerprint, load, workloads and
//! the events queued while the broker was unreachable, and its answer carries the work
//! the broker wants done (assignments, migrations). An agent therefore takes work only
//! from the broker it dials, keeps running what it has when the broker is gone, and
//! reconciles on the next heartbeat that gets through.

use serde::{Deserialize, Serialize};

use crate::node::NodeInfo;
use crate::spec::{RuntimeKind, WorkloadSpec};
use crate::workload::{MigrationReport, RuntimeDecision, WorkloadStatus};

/// `POST /v1/agents/register`, with `Authorization: Bearer <join token>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    pub node: NodeInfo,
    /// The agent's HTTP API (`host:port`), for the broker and other agents.
    #[cfg_attr(feature = "openapi", schema(pattern = r"\S", example = "10.0.0.2:7701"))]
    pub api_addr: String,
    /// The agent's transfer receiver (`host:port`), for incoming migrations.
    pub transfer_addr: String,
    /// PEM certificate signing request for the node's own key (common name the node
    /// name): a broker with a CA answers with the node's certificate and requires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    /// Secret for this agent's heartbeats (`Authorization: Bearer`).
    pub agent_token: String,
    /// Shared by the cluster's agents and broker for agent-API calls between them.
    pub cluster_token: String,
    pub heartbeat_interval_ms: u64,
    /// The node's certificate (PEM), issued for the request's CSR by the broker's CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    /// The broker's CA certificate (PEM), the one root the node trusts from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// Current use of a node's resources.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeLoad {
    /// 0..100 over all cores, averaged since the last heartbeat.
    pub cpu_percent: f64,
    #[serde(deserialize_with = "crate::whole::de")]
    pub memory_used_bytes: u64,
    #[serde(deserialize_with = "crate::whole::de")]
    pub workloads: u32,
}

/// Something that happened on an agent, queued until the broker hears of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentEvent {
    /// Per-agent sequence number: the broker ignores what it has seen (no duplicates
    /// after a retried heartbeat).
    #[serde(deserialize_with = "crate::whole::de")]
    pub seq: u64,
    /// Milliseconds since the Unix epoch, on the agent's clock.
    #[serde(deserialize_with = "crate::whole::de")]
    pub at_ms: u64,
    /// `workload-started`, `workload-stopped`, `workload-failed`, `migration-finished`,
    /// `migration-failed`, …
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MigrationReport>,
}

/// `POST /v1/agents/{name}/heartbeat`, with `Authorization: Bearer <agent token>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    pub node: NodeInfo,
    pub load: NodeLoad,
    /// Every workload the agent runs (or has stopped), as its runtimes report them.
    pub workloads: Vec<WorkloadStatus>,
    /// Events not yet acknowledged by the broker, oldest first.
    pub events: Vec<AgentEvent>,
    /// The number of the certificate revocation list the agent holds (none: it holds
    /// none): the broker answers with its list when it has a newer one.
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub crl_number: Option<u64>,
}

/// What the broker wants a workload to be on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    /// Stop and remove it.
    Removed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub spec: WorkloadSpec,
    pub desired: Desired,
    /// The runtime placement chose (and why); the agent applies the fallback rule itself
    /// when it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<RuntimeDecision>,
}

/// "Move this workload to that node": the source agent carries it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationOrder {
    pub id: String,
    pub workload: String,
    pub target_node: String,
    /// The target agent's API address.
    pub target_api: String,
    /// Containers: `stop-copy`, `staged`, `lazy` or `auto` (none: `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Restore the workload's TCP connections closed (the request's `close_connections`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close_connections: bool,
    /// A user cancelled the migration (`DELETE /v1/migrations/{id}`): abort it before its
    /// commit point (the source resumes, the target removes its prepared copy) and report
    /// `migration-failed`; a move past its commit point ends as it would have.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatResponse {
    /// Highest event `seq` the broker has stored: the agent drops those from its queue.
    pub acked_seq: u64,
    /// The complete desired set for this node (absent workloads are not this node's).
    pub assignments: Vec<Assignment>,
    pub migrations: Vec<MigrationOrder>,
    /// The node is draining: the broker places nothing new here.
    pub draining: bool,
    /// The lab networks this node takes part in (empty when the broker runs no
    /// overlay): the agent builds their VXLAN devices and bridges from this.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overlay: Vec<crate::NodeOverlay>,
    /// The CA's certificate revocation list (PEM), when it is newer than the heartbeat's
    /// `crl_number`: the agent refuses the certificates it lists on every mutual-TLS
    /// channel from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<String>,
}
