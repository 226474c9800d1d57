//! What the broker remembers: nodes, workloads, migrations and pending removals of
//! stale copies. Kept in memory for placement and mirrored, write-through, in SQLite.

use away_model::{Desired, NodeInfo, NodeLoad, RuntimeDecision, TokenState, WorkloadSpec, WorkloadStatus};
use serde::{Deserialize, Serialize};

use crate::placement::PlacementDecision;

/// A registered node. Its token is kept apart (hashed) in the `tokens` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub info: NodeInfo,
    pub api_addr: String,
    pub transfer_addr: String,
    pub draining: bool,
    pub load: NodeLoad,
    /// Every workload the agent reported in its last heartbeat.
    pub reported: Vec<WorkloadStatus>,
    /// Highest agent event seq stored: later heartbeats skip what is at or below it.
    pub acked_seq: u64,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    /// SHA-256 of the public key the node's certificate was issued for (brokers with a
    /// CA): a later join of this name with another key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// When its certificate was revoked: offline from then on (no token, no key) until
    /// it joins again with a new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// A node certificate the broker's CA issued (table `node_certificates`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Its serial number, hex.
    pub serial: String,
    pub node: String,
    /// SHA-256 of the key it was issued for: a revoked key never joins again.
    pub key_id: String,
    pub issued_ms: u64,
    pub revoked_ms: Option<u64>,
}

/// A workload the broker placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadRecord {
    pub spec: WorkloadSpec,
    /// Its home: the node that should run it.
    pub node: String,
    pub desired: Desired,
    /// As the home node last reported it (`None`: not reported yet, or not there).
    pub status: Option<WorkloadStatus>,
    pub status_ms: Option<u64>,
    pub decision: RuntimeDecision,
    pub placement: PlacementDecision,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The last agent event about it, for people (`workload-failed: image not found`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
}

// the API bodies live in away-model, shared with away-client
pub use away_model::{MigrationRecord, MigrationState};

/// A stale copy of a workload on a node that is not (or no longer) its home.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    pub node: String,
    pub workload: String,
    pub spec: WorkloadSpec,
    pub reason: String,
    pub since_ms: u64,
}

/// A join token made over the API (`POST /v1/join-tokens`): only the SHA-256 of its
/// secret is kept. The broker's configured `AWAY_JOIN_TOKEN` is not one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    pub id: String,
    pub sha256: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked_ms: Option<u64>,
    pub label: Option<String>,
    /// The node that joined with it: a made join token joins one node (that node may
    /// join again with it, e.g. after losing its state; no other may).
    pub used_by: Option<String>,
}

impl JoinTokenRecord {
    pub fn state(&self, now_ms: u64) -> TokenState {
        TokenState::at(self.revoked_ms, self.expires_ms, now_ms)
    }

    /// As `GET /v1/join-tokens` shows it: no secret, not even its hash.
    pub fn view(&self, now_ms: u64) -> away_model::JoinTokenView {
        away_model::JoinTokenView {
            id: self.id.clone(),
            label: self.label.clone(),
            created_unix_ms: self.created_ms,
            expires_unix_ms: self.expires_ms,
            revoked_unix_ms: self.revoked_ms,
            state: self.state(now_ms),
            used_by: self.used_by.clone(),
        }
    }
}

/// A user's token made over the API (`POST /v1/user-tokens`): only the SHA-256 of its
/// secret is kept. The broker's configured `--user-token`s (admin tokens) are not
/// among these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserTokenRecord {
    pub id: String,
    pub user: String,
    pub sha256: String,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked_ms: Option<u64>,
    pub label: Option<String>,
}

impl UserTokenRecord {
    pub fn state(&self, now_ms: u64) -> TokenState {
        TokenState::at(self.revoked_ms, self.expires_ms, now_ms)
    }

    /// As `GET /v1/user-tokens` shows it: no secret, not even its hash.
    pub fn view(&self, now_ms: u64) -> away_model::UserTokenView {
        away_model::UserTokenView {
            id: self.id.clone(),
            user: self.user.clone(),
            label: self.label.clone(),
            created_unix_ms: self.created_ms,
            expires_unix_ms: self.expires_ms,
            revoked_unix_ms: self.revoked_ms,
            state: self.state(now_ms),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
