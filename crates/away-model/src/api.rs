//! The broker's HTTP API bodies that are not part of the agent protocol: what users
//! send and read (`/v1/nodes`, `/v1/workloads`, `/v1/migrations`, `/v1/events`). The
//! broker serves them and `away-client` reads them; the OpenAPI document is derived
//! from them (feature `openapi`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cluster::{Desired, NodeLoad};
use crate::node::{NodeInfo, Tier};
use crate::spec::{RuntimeKind, WorkloadSpec};
use crate::wire::ApiError;
use crate::workload::{MigrationMode, MigrationReport, RuntimeDecision, WorkloadStatus};

/// A node as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Node))]
pub struct NodeView {
    pub name: String,
    /// `online` or `offline` (missed heartbeats).
    #[cfg_attr(feature = "openapi", schema(pattern = "^(online|offline)$"))]
    pub state: String,
    pub draining: bool,
    pub tier: Tier,
    pub api_addr: String,
    pub transfer_addr: String,
    pub registered_ms: u64,
    pub last_seen_ms: u64,
    pub load: NodeLoad,
    pub reserved_memory_bytes: u64,
    pub reserved_cpus: f64,
    /// Workloads whose home this is.
    pub workloads: Vec<String>,
    /// Workloads it reports that the broker does not manage.
    pub unmanaged: Vec<String>,
    pub info: NodeInfo,
    /// When its certificate was revoked (`POST /v1/nodes/{name}/revoke`, Unix ms): the
    /// node counts as offline and nothing is placed there until it joins again with a
    /// new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// A workload as `GET /v1/workloads` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Workload))]
pub struct WorkloadView {
    pub name: String,
    pub node: String,
    pub desired: Desired,
    /// `pending` (not reported yet), the runtime's state (`running`, `stopped`, …),
    /// `node-offline`, `migrating` or `removing`.
    pub state: String,
    pub runtime: RuntimeKind,
    pub decision: RuntimeDecision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkloadStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_ms: Option<u64>,
    /// The active migration, if one is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub spec: WorkloadSpec,
    /// The placement explanation (single-workload answers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementDecision>,
}

/// One feasible node's score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeScore {
    pub node: String,
    pub total: f64,
    /// Score components by name (`link`, `load`, `runtime`, `prefer_client`, `cost`).
    pub parts: BTreeMap<String, f64>,
    /// How the workload would run there.
    pub runtime: RuntimeDecision,
}

/// A node ruled out, with every filter it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Filtered {
    pub node: String,
    pub reasons: Vec<String>,
}

/// The answer of placement: the chosen node, how it runs there, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Placement))]
pub struct PlacementDecision {
    pub workload: String,
    /// `None` when no node is feasible.
    pub chosen: Option<String>,
    pub runtime: Option<RuntimeDecision>,
    /// Feasible nodes, best first (at most the broker's listing limit).
    pub scores: Vec<NodeScore>,
    /// Infeasible nodes with their reasons (at most the broker's listing limit).
    pub filtered: Vec<Filtered>,
    pub feasible_count: usize,
    pub filtered_count: usize,
    /// One sentence for people.
    pub why: String,
}

/// The answer of a compatibility check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Compatibility {
    pub allowed: bool,
    /// How the workload would move (meaningful when allowed).
    pub mode: MigrationMode,
    /// One sentence for people.
    pub reason: String,
    /// Each rule checked, passed or not.
    pub checks: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rule {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// `POST /v1/migrations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    pub workload: String,
    /// Target node; omitted: the broker chooses the best-scoring compatible node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Containers: `stop-copy`, `staged`, `lazy` or `auto` (default; the source agent decides from
    /// the workload's write rate and the link, and says why in the report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::openapi::container_mode_schema))]
    pub mode: Option<String>,
    /// Seconds the migration may take, from the request (1..=86400; default 900). A migration
    /// not delivered to its source by then fails; one whose source node is offline at its
    /// deadline fails with the workload kept where the source last reported it.
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
    pub deadline_s: Option<u64>,
    /// The longest pause the workload may take, in ms: a move predicted to pause it
    /// longer is refused (422) with the prediction.
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub max_downtime_ms: Option<u64>,
    /// What the broker minimises when it chooses the mode (and, without `to`, the
    /// target) from the prediction: `total` time or `downtime`. Absent: no prediction
    /// unless `deadline_s` or `max_downtime_ms` asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimize: Option<Optimize>,
    /// Containers on an overlay network: restore the workload's TCP connections closed
    /// (CRIU's `tcp-close`) instead of keeping them open (`tcp-established`, the
    /// default). The peers then see their connections end at the move.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close_connections: bool,
}

/// What a predicted move is chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Optimize {
    /// The shortest move from start to cleanup.
    Total,
    /// The shortest pause of the workload.
    Downtime,
}

/// The answer of `POST /v1/migrations?dry_run=true`: where and how the move would go,
/// and what it is predicted to cost; nothing is recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationPlanAnswer {
    pub workload: String,
    pub source: String,
    pub target: String,
    /// `user` or `broker`, as in a migration record.
    pub chosen_by: String,
    pub why: String,
    pub compatibility: Compatibility,
    /// The container mode the move would ask for (none: `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The prediction with the inputs it used; absent when the source could not be asked
    /// (`plan_error` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<crate::predict::MovePlan>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_error: Option<String>,
    /// Why the move would be refused (its prediction misses the `deadline_s` or
    /// `max_downtime_ms` asked for); absent when it would be accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// A migration's deadline when the request names none, in seconds.
pub const DEFAULT_MIGRATION_DEADLINE_S: u64 = 900;
/// The largest `deadline_s` a request may ask for (a day).
pub const MAX_MIGRATION_DEADLINE_S: u64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Recorded; the source has not yet received the order.
    Pending,
    /// Delivered to the source in a heartbeat answer.
    Running,
    Succeeded,
    Failed,
    /// Cancelled by `DELETE /v1/migrations/{id}` before the source started it (or while
    /// its source was offline): the workload stays where its source reports it.
    Cancelled,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Pending => "pending",
            MigrationState::Running => "running",
            MigrationState::Succeeded => "succeeded",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        }
    }
    pub fn is_active(self) -> bool {
        matches!(self, MigrationState::Pending | MigrationState::Running)
    }
}

/// A migration as `GET /v1/migrations` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Migration))]
pub struct MigrationRecord {
    pub id: String,
    pub workload: String,
    pub source: String,
    pub target: String,
    pub state: MigrationState,
    /// `user` (the request named the target) or `broker` (best-scoring compatible node).
    pub chosen_by: String,
    /// Why this target, for people.
    pub why: String,
    pub compatibility: Compatibility,
    pub requested_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<MigrationReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The container migration mode asked for (none: `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// The request asked for the workload's TCP connections to be closed at the move.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close_connections: bool,
    /// When the migration must have ended (Unix ms); absent in records from brokers
    /// before deadlines, which get none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// True when the broker ended it without its source's word (a cancel, or its
    /// deadline while the source was offline): a later `migration-finished` from the
    /// source still wins, since the source knows where the workload runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resolved_by_broker: bool,
    /// When a user asked to cancel it while its source was moving it (Unix ms): the
    /// source is told to abort the move before its commit point; it stays `running`
    /// until the source reports, then ends `cancelled` (aborted in time) or `succeeded`
    /// (the move had committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_ms: Option<u64>,
    /// The broker's prediction for the way it asked for, when the request wanted one
    /// (`deadline_s`, `max_downtime_ms` or `optimize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<crate::predict::MovePrediction>,
}

/// One thing that happened. `kind` is one of `node-registered`, `node-online`,
/// `node-offline`, `node-draining`, `node-undrained`, `workload-placed`,
/// `workload-running`, `workload-stopped`, `workload-failed`, `workload-removing`,
/// `workload-removed`, `workload-stale-copy`, `migration-requested`, `migration-started`,
/// `migration-succeeded`, `migration-failed`, `migration-cancelling`, `migration-cancelled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BrokerEvent {
    /// Increasing within one broker process.
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    pub message: String,
    /// Whose request it follows: the user of a user token (`anna`), or `admin` for a
    /// token of the broker's configuration; absent for what nodes and the broker did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The answer of `POST /v1/workloads`: the stored workload (absent on a dry run) and
/// where placement put it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmitAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadView>,
    pub placement: PlacementDecision,
}

/// The answer of `POST /v1/migrations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationAccepted {
    pub migration: MigrationRecord,
}

/// The longest a join token may live: `expires_in_s` above this is refused.
pub const MAX_JOIN_TOKEN_LIFETIME_S: u64 = 10 * 365 * 24 * 3600;

/// The body of `POST /v1/join-tokens`: a new join token for registering nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// Seconds until it expires (1 .. 10 years); absent: it never expires (revoke it).
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub expires_in_s: Option<u64>,
    /// What it is for (shown by `GET /v1/join-tokens`), at most 200 characters, no
    /// control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 200, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$"))]
    pub label: Option<String>,
}

/// The answer of `POST /v1/join-tokens`: the token itself, shown this once (the broker
/// keeps only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinTokenCreated {
    /// Names it in `GET` and `DELETE /v1/join-tokens/{id}`.
    pub id: String,
    /// The secret an agent presents to `POST /v1/agents/register` (`AWAY_JOIN_TOKEN`).
    pub token: String,
    /// When it stops working (Unix ms); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

/// A join token as `GET /v1/join-tokens` lists it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JoinTokenView {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// When it was revoked; absent while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
    /// `valid`, `expired` or `revoked`, as of the answer.
    pub state: TokenState,
    /// The node that joined with it (a made join token joins that one node only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
}

/// Whether a join token registers nodes, or a user token is accepted, now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum TokenState {
    Valid,
    Expired,
    Revoked,
}

impl TokenState {
    /// A token revoked at `revoked_ms` (or not), expiring at `expires_ms` (or never), at `now_ms`.
    pub fn at(revoked_ms: Option<u64>, expires_ms: Option<u64>, now_ms: u64) -> TokenState {
        if revoked_ms.is_some() {
            TokenState::Revoked
        } else if expires_ms.is_some_and(|e| now_ms >= e) {
            TokenState::Expired
        } else {
            TokenState::Valid
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Valid => "valid",
            TokenState::Expired => "expired",
            TokenState::Revoked => "revoked",
        }
    }
}

/// The longest a user token may live: `expires_in_s` above this is refused.
pub const MAX_USER_TOKEN_LIFETIME_S: u64 = MAX_JOIN_TOKEN_LIFETIME_S;

/// The rule of a user name: a DNS label's shape (`anna`, `ci-runner-2`), and not
/// `admin`, the name events give the broker's configured tokens ([`ADMIN_USER`]).
pub const USER_NAME_PATTERN: &str = "^(?!admin$)[a-z][a-z0-9-]{0,62}$";

/// Who the broker's configured user tokens are, in events (`by`); no user is called so.
pub const ADMIN_USER: &str = "admin";

/// Whether `name` is a user name ([`USER_NAME_PATTERN`]).
pub fn is_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    name != ADMIN_USER
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The body of `POST /v1/user-tokens`: a new token for user `user`, who may then use the
/// whole user API (not manage tokens: that needs an admin token).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UserTokenRequest {
    /// Whose token it is: a lower-case letter, then up to 62 lower-case letters, digits or
    /// `-`; not `admin` (the name events give the broker's configured tokens).
    #[cfg_attr(feature = "openapi", schema(pattern = "^(?!admin$)[a-z][a-z0-9-]{0,62}$"))]
    pub user: String,
    /// Seconds until it expires (1 .. 10 years); absent: it never expires (revoke it).
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 315_360_000))]
    pub expires_in_s: Option<u64>,
    /// What it is for (shown by `GET /v1/user-tokens`), at most 200 characters, no
    /// control characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(max_length = 200, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$"))]
    pub label: Option<String>,
}

/// The answer of `POST /v1/user-tokens`: the token itself, shown this once (the broker
/// keeps only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserTokenCreated {
    /// Names it in `GET` and `DELETE /v1/user-tokens/{id}`.
    pub id: String,
    pub user: String,
    /// The secret its user presents (`Authorization: Bearer`, `AWAY_USER_TOKEN`).
    pub token: String,
    /// When it stops working (Unix ms); absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

/// A user token as `GET /v1/user-tokens` lists it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserTokenView {
    pub id: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// When it was revoked; absent while it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_unix_ms: Option<u64>,
    /// `valid`, `expired` or `revoked`, as of the answer.
    pub state: TokenState,
}

/// Every error answer of the broker: an `ApiError`, and for some the full explanation
/// (a 422 placement or compatibility verdict, the migration a 409 conflicts with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    #[serde(flatten)]
    pub error: ApiError,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementDecision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatibility: Option<Compatibility>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationRecord>,
    /// A move refused for its prediction: the plan with the inputs it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<crate::predict::MovePlan>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_dns_labels() {
        for good in ["anna", "a", "ci-runner-2", &"a".repeat(63)] {
            assert!(is_user_name(good), "{good}");
        }
        assert!(is_user_name("admins") && is_user_name("x-admin"));
        for bad in ["", "Anna", "2anna", "-anna", "an_na", "anna.b", "änna", "admin", &"a".repeat(64)] {
            assert!(!is_user_name(bad), "{bad}");
        }
    }

    #[test]
    fn token_states_follow_revocation_then_expiry() {
        assert_eq!(TokenState::at(None, None, 5), TokenState::Valid);
        assert_eq!(TokenState::at(None, Some(6), 5), TokenState::Valid);
        assert_eq!(TokenState::at(None, Some(5), 5), TokenState::Expired);
        assert_eq!(TokenState::at(Some(1), Some(5), 9), TokenState::Revoked);
    }

    #[test]
    fn user_token_requests_take_integral_floats_and_refuse_unknown_fields() {
        let r: UserTokenRequest = serde_json::from_str(r#"{"user": "anna", "expires_in_s": 60.0}"#).unwrap();
        assert_eq!((r.user.as_str(), r.expires_in_s), ("anna", Some(60)));
        assert!(serde_json::from_str::<UserTokenRequest>(r#"{"user": "anna", "admin": true}"#).is_err());
        assert!(serde_json::from_str::<UserTokenRequest>("{}").is_err(), "user is required");
    }
}
