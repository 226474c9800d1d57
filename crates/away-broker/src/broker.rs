//! The broker's state and what requests do to it. Every operation takes the state
//! lock, computes its changes, writes them to SQLite in one transaction, and only then
//! changes memory and announces events: what an answer acknowledges is on disk.
//!
//! What a heartbeat does (the offline-first reconciliation rules) is decided by the pure
//! [`crate::reconcile::reconcile`]; its module doc states the rules.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use away_model::{
    Desired, ErrorCode, Heartbeat, HeartbeatResponse, JoinTokenCreated, JoinTokenRequest, JoinTokenView, NodeInfo,
    NodeLoad, RegisterRequest, RegisterResponse, TokenState, UserTokenCreated, UserTokenRequest, UserTokenView,
    WorkloadSpec, DEFAULT_MIGRATION_DEADLINE_S, MAX_JOIN_TOKEN_LIFETIME_S, MAX_MIGRATION_DEADLINE_S,
};
use away_policy::compat::{check_container, check_vm, with_connections, Compatibility};
use tokio::sync::broadcast;

use crate::error::Problem;
use crate::events::{BrokerEvent, Pending};
use crate::group_commit::GroupCommit;
use crate::metrics::Metrics;
use crate::placement::{self, Candidate, PlacementDecision, RuntimeClasses};
use crate::reconcile::{self, reconcile, Plan, Snapshot};
use crate::records::{
    now_ms, CertificateRecord, JoinTokenRecord, MigrationRecord, MigrationState, NodeRecord, Removal, UserTokenRecord,
    WorkloadRecord,
};
use crate::store::{Changes, Store};
use crate::{tokens, BrokerConfig, BrokerError};

struct Inner {
    store: Store,
    nodes: BTreeMap<String, NodeRecord>,
    /// node -> SHA-256 of its agent token
    tokens: HashMap<String, String>,
    workloads: BTreeMap<String, WorkloadRecord>,
    migrations: BTreeMap<String, MigrationRecord>,
    removals: BTreeMap<(String, String), Removal>,
    /// Nodes last announced online, to announce transitions once.
    announced_online: BTreeSet<String>,
    /// node -> (memory, CPUs) of the workloads whose home it is; kept up to date
    /// because recounting every workload per placement dominated the benchmark.
    reserved: HashMap<String, (u64, f64)>,
    /// node -> its runtime class (placement::RuntimeClasses), numbered when its report arrives
    runtime_class: HashMap<String, u32>,
    runtime_classes: RuntimeClasses,
    /// Join tokens made over the API, by id (the configured one is not among them).
    join_tokens: BTreeMap<String, JoinTokenRecord>,
    /// The overlay's address management, when the broker runs one.
    ipam: Option<crate::overlay::Ipam>,
    /// Node certificates the CA issued, by serial.
    certificates: BTreeMap<String, CertificateRecord>,
    /// The CA's revocation list (number, PEM) once a certificate was revoked.
    crl: Option<(u64, String)>,
}

impl Inner {
    fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            nodes: &self.nodes,
            workloads: &self.workloads,
            migrations: &self.migrations,
            removals: &self.removals,
            announced_online: &self.announced_online,
        }
    }

    /// Numbers the runtime class of a node whose report arrived.
    fn classify(&mut self, name: &str) {
        // reports that changed leave classes no node has: start over when they pile up
        if self.runtime_classes.len() > 2 * self.nodes.len() + 64 {
            self.runtime_classes = RuntimeClasses::default();
            self.runtime_class.clear();
            for n in self.nodes.values() {
                self.runtime_class.insert(n.name.clone(), self.runtime_classes.of(&n.info));
            }
        } else if let Some(n) = self.nodes.get(name) {
            self.runtime_class.insert(n.name.clone(), self.runtime_classes.of(&n.info));
        }
    }

    fn recount_reserved(&mut self) {
        let mut map: HashMap<String, (u64, f64)> = HashMap::new();
        for w in self.workloads.values() {
            let e = map.entry(w.node.clone()).or_default();
            e.0 += w.spec.resources.memory.bytes();
            e.1 += w.spec.resources.cpus;
        }
        self.reserved = map;
    }
}

/// The broker: configuration, state, event channel, counters.
pub struct Broker {
    pub config: BrokerConfig,
    inner: Mutex<Inner>,
    events: broadcast::Sender<BrokerEvent>,
    event_seq: AtomicU64,
    pub metrics: Metrics,
    /// SHA-256 of the configured `--user-token`s: admin tokens.
    user_token_hashes: Vec<String>,
    /// User tokens made over the API, by id. Apart from `inner` (whose lock a placement
    /// holds while it writes SQLite) because every user request reads it; changed only
    /// under `inner`'s lock, after the store has the change.
    user_tokens: RwLock<BTreeMap<String, UserTokenRecord>>,
    join_token_hash: String,
    cluster_token: String,
    pub(crate) http: reqwest::Client,
    /// Submissions waiting for the transaction that stores them.
    submissions: GroupCommit<(WorkloadSpec, String), Submitted>,
    /// When this process opened the store: its nodes' last heartbeats are as old as the
    /// broker's downtime, so none counts as offline for ending a migration before a
    /// node_timeout has passed (each had its chance to beat again).
    started_ms: u64,
}

// the API bodies live in away-model, shared with away-client
pub use away_model::{MigrationRequest, NodeView, WorkloadView};

/// A submission's answer: the stored workload (none on a dry run) and its placement.
type Submitted = Result<(Option<WorkloadView>, PlacementDecision), Problem>;

/// Where a requested move would go, before it is recorded ([`Broker::choose_move`]).
#[derive(Debug, Clone)]
pub struct MoveChoice {
    pub source: String,
    pub source_api: String,
    pub source_online: bool,
    pub target: String,
    pub target_api: String,
    pub compatibility: Compatibility,
    /// `user` or `broker`.
    pub chosen_by: String,
    pub why: String,
    pub runtime: away_model::RuntimeKind,
    /// The broker chose the target: the next best-scoring compatible nodes (at most
    /// [`MOVE_ALTERNATIVES`] in all with the target), which a request that optimizes
    /// the move compares by prediction.
    pub others: Vec<String>,
}

/// Who a user request comes from ([`Broker::check_user`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A token of the broker's configuration (`--user-token`, `AWAY_USER_TOKEN`): the
    /// user API and managing tokens.
    Admin,
    /// A token made with `POST /v1/user-tokens`: the user API, not managing tokens.
    User { name: String, token_id: String },
}

impl Caller {
    /// The name events and logs give the caller: the user's, or `admin`.
    pub fn name(&self) -> &str {
        match self {
            Caller::Admin => away_model::ADMIN_USER,
            Caller::User { name, .. } => name,
        }
    }
}

/// Compatible targets a move that optimizes its prediction compares, at most.
pub const MOVE_ALTERNATIVES: usize = 3;

/// Where a workload's logs are.
pub struct LogSource {
    pub node: String,
    pub api_addr: String,
    pub online: bool,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // a panic while holding the lock left memory as it was before the failed change
    // (memory changes only after a successful commit): the state is still consistent
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    /// Open (or create) the database and load the state.
    pub fn open(config: BrokerConfig) -> Result<Broker, BrokerError> {
        if config.join_token.is_empty() {
            return Err(BrokerError::Config("the join token must not be empty".into()));
        }
        let store = Store::open(&config.db_path)?;
        let loaded = store.load()?;
        let now = now_ms();
        let timeout = config.node_timeout.as_millis() as u64;
        let announced_online = loaded
            .nodes
            .iter()
            .filter(|n| now.saturating_sub(n.last_seen_ms) <= timeout)
            .map(|n| n.name.clone())
            .collect();
        let inner = Inner {
            store,
            nodes: loaded.nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            tokens: loaded.tokens.into_iter().collect(),
            workloads: loaded.workloads.into_iter().map(|w| (w.spec.name.clone(), w)).collect(),
            migrations: loaded.migrations.into_iter().map(|m| (m.id.clone(), m)).collect(),
            removals: loaded.removals.into_iter().map(|r| ((r.node.clone(), r.workload.clone()), r)).collect(),
            announced_online,
            reserved: HashMap::new(),
            runtime_class: HashMap::new(),
            runtime_classes: RuntimeClasses::default(),
            join_tokens: loaded.join_tokens.into_iter().map(|t| (t.id.clone(), t)).collect(),
            ipam: None,
            certificates: loaded.certificates.into_iter().map(|c| (c.serial.clone(), c)).collect(),
            crl: None,
        };
        let mut inner = inner;
        Self::make_crl(&config, &mut inner).map_err(BrokerError::Config)?;
        if let Some(overlay) = &config.overlay {
            let (networks, leases) = inner.store.load_overlay()?;
            let mut ipam = crate::overlay::Ipam::new(overlay.clone(), networks, leases);
            // the default network exists from the start: every node joins it
            let mut made = crate::overlay::IpamChanges::default();
            ipam.network(away_model::DEFAULT_NETWORK, &mut made).map_err(BrokerError::Config)?;
            inner.store.apply_overlay(&made, &[])?;
            inner.ipam = Some(ipam);
        }
        inner.recount_reserved();
        let names: Vec<String> = inner.nodes.keys().cloned().collect();
        for name in names {
            inner.classify(&name);
        }
        tracing::info!(
            db = %config.db_path.display(),
            nodes = inner.nodes.len(),
            workloads = inner.workloads.len(),
            migrations = inner.migrations.len(),
            "broker state loaded"
        );
        let user_tokens = loaded.user_tokens.into_iter().map(|t| (t.id.clone(), t)).collect();
        let (events, _) = broadcast::channel(1024);
        let http = away_identity::http::client_builder(None)
            .connect_timeout(std::time::Duration::from_secs(3))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| BrokerError::Config(format!("http client: {e}")))?;
        Ok(Broker {
            user_token_hashes: config.user_tokens.iter().map(|t| tokens::sha256_hex(t)).collect(),
            user_tokens: RwLock::new(user_tokens),
            join_token_hash: tokens::sha256_hex(&config.join_token),
            cluster_token: tokens::cluster_token(&config.join_token),
            config,
            inner: Mutex::new(inner),
            events,
            event_seq: AtomicU64::new(0),
            metrics: Metrics::default(),
            http,
            submissions: GroupCommit::default(),
            started_ms: now_ms(),
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<BrokerEvent> {
        self.events.subscribe()
    }

    pub(crate) fn cluster_token(&self) -> &str {
        &self.cluster_token
    }

    /// The URL base and a client for calling node `node`'s agent at `api_addr`. With a
    /// CA: mutual TLS to the node by its name, so the address it registered can lead
    /// nowhere but to that node; without one (`--insecure-loopback`): plain HTTP (the
    /// caller presents the cluster token either way).
    pub(crate) async fn node_http(
        &self,
        node: &str,
        api_addr: &str,
        connect_timeout: std::time::Duration,
    ) -> Result<(String, reqwest::Client), String> {
        match &self.config.tls {
            Some(tls) => {
                let (base, builder) = away_identity::http::node_client(&tls.identity, node, api_addr)
                    .await
                    .map_err(|e| away_model::error_chain(&e))?;
                let http = builder.connect_timeout(connect_timeout).build().map_err(|e| away_model::error_chain(&e))?;
                Ok((base, http))
            }
            None => Ok((format!("http://{api_addr}"), self.http.clone())),
        }
    }

    fn emit(&self, events: Vec<Pending>) {
        for p in events {
            let e = BrokerEvent {
                seq: self.event_seq.fetch_add(1, Ordering::Relaxed) + 1,
                at_ms: now_ms(),
                kind: p.kind.to_string(),
                node: p.node,
                workload: p.workload,
                migration: p.migration,
                message: p.message,
                by: p.by,
            };
            tracing::info!(kind = %e.kind, node = ?e.node, workload = ?e.workload, migration = ?e.migration, by = ?e.by, "{}", e.message);
            // no subscriber is fine
            let _ = self.events.send(e);
        }
    }

    /// Heard of within the node timeout, and not revoked (a revoked node is treated as a
    /// lost one: offline, nothing placed there).
    fn is_online(&self, n: &NodeRecord, now: u64) -> bool {
        n.revoked_ms.is_none() && now.saturating_sub(n.last_seen_ms) <= self.config.node_timeout.as_millis() as u64
    }

    /// Whether a migration's source may be online, for ending the migration without it:
    /// online, or not heard of since this broker started less than a node_timeout ago.
    fn may_be_online(&self, n: &NodeRecord, now: u64) -> bool {
        self.is_online(n, now)
            || (n.revoked_ms.is_none()
                && now.saturating_sub(self.started_ms) <= self.config.node_timeout.as_millis() as u64)
    }

    /// Who a presented bearer token is: an admin (a configured `--user-token`) or the
    /// user of a valid token made over the API; a revoked or expired one is refused
    /// naming why.
    pub fn check_user(&self, presented: Option<&str>) -> Result<Caller, Problem> {
        let Some(t) = presented else {
            return Err(Problem::unauthorized("missing bearer token: send Authorization: Bearer <user token>"));
        };
        if self.user_token_hashes.iter().any(|h| tokens::matches(t, h)) {
            return Ok(Caller::Admin);
        }
        let hash = tokens::sha256_hex(t);
        let made = self.user_tokens.read().unwrap_or_else(|e| e.into_inner());
        let Some(record) = made.values().find(|r| tokens::same_hash(&hash, &r.sha256)) else {
            return Err(Problem::unauthorized("wrong user token"));
        };
        match record.state(now_ms()) {
            TokenState::Valid => Ok(Caller::User { name: record.user.clone(), token_id: record.id.clone() }),
            TokenState::Revoked => Err(Problem::unauthorized(format!(
                "user token {} revoked: ask the broker's admin for a new one",
                record.id
            ))),
            TokenState::Expired => Err(Problem::unauthorized(format!(
                "user token {} expired: ask the broker's admin for a new one",
                record.id
            ))),
        }
    }

    /// [`Broker::check_user`], and the caller must be an admin: managing tokens (join
    /// and user tokens) is `what` a user's own token may not do (403).
    pub fn check_admin(&self, presented: Option<&str>, what: &str) -> Result<(), Problem> {
        match self.check_user(presented)? {
            Caller::Admin => Ok(()),
            Caller::User { name, token_id } => Err(Problem::new(
                ErrorCode::Forbidden,
                format!(
                    "{what} needs an admin token (one of the broker's --user-token): user token {token_id} of {name} \
                     may use the user API but not manage tokens"
                ),
            )),
        }
    }

    // ---- agents ----

    /// Which join token `presented` is: the configured one (None) or a valid one made
    /// over the API (its id); a revoked or expired one is refused naming why, and so is
    /// one another node than `node` joined with.
    fn check_join_token(&self, presented: Option<&str>, node: &str) -> Result<Option<String>, Problem> {
        let Some(t) = presented else {
            return Err(Problem::unauthorized("missing bearer token: send Authorization: Bearer <join token>"));
        };
        if tokens::matches(t, &self.join_token_hash) {
            return Ok(None);
        }
        let inner = lock(&self.inner);
        let Some(record) = inner.join_tokens.values().find(|r| tokens::matches(t, &r.sha256)) else {
            return Err(Problem::unauthorized("wrong join token"));
        };
        match record.state(now_ms()) {
            TokenState::Valid => match &record.used_by {
                Some(used) if used != node => Err(Problem::unauthorized(format!(
                    "join token {} was used by node {used}: a join token made with `away token create` joins one \
                     node; ask for a new one",
                    record.id
                ))),
                _ => Ok(Some(record.id.clone())),
            },
            TokenState::Revoked => {
                Err(Problem::unauthorized(format!("join token {} revoked: ask for a new one", record.id)))
            }
            TokenState::Expired => {
                Err(Problem::unauthorized(format!("join token {} expired: ask for a new one", record.id)))
            }
        }
    }

    pub fn register(&self, presented: Option<&str>, mut req: RegisterRequest) -> Result<RegisterResponse, Problem> {
        let join_token = self.check_join_token(presented, &req.node.name)?;
        check_node_name(&req.node.name)?;
        if req.api_addr.trim().is_empty() {
            return Err(Problem::invalid("api_addr must be the agent's host:port").field("api_addr"));
        }
        let token = tokens::generate().map_err(|e| Problem::internal(format!("no randomness for a token: {e}")))?;
        let now = now_ms();
        let name = req.node.name.clone();
        let csr = req.csr.take();
        let mut inner = lock(&self.inner);
        let known = inner.nodes.get(&name).cloned();
        let mut certificate = None;
        // a broker with a CA issues the node its certificate, for the key it first joined with
        let issued = match &self.config.tls {
            Some(tls) => {
                let csr = csr.ok_or_else(|| {
                    Problem::invalid("this broker issues node certificates: send a CSR for the node's name")
                        .field("csr")
                })?;
                let bad_csr =
                    |e: away_identity::IdentityError| Problem::invalid(away_model::error_chain(&e)).field("csr");
                let key_id = away_identity::Ca::csr_key_id(&csr).map_err(bad_csr)?;
                if inner.certificates.values().any(|c| c.key_id == key_id && c.revoked_ms.is_some()) {
                    tracing::warn!(node = %name, key = %key_id, "a join with a revoked key: refused");
                    return Err(Problem::new(
                        ErrorCode::Conflict,
                        format!("this key was revoked (node {name} or another): join with a new key (remove STATE_DIR/identity/key.pem and cert.pem)"),
                    )
                    .field("csr"));
                }
                if let Some(other) = known.as_ref().and_then(|k| k.key_id.as_ref()).filter(|k| **k != key_id) {
                    tracing::warn!(node = %name, known_key = %other, "a join for a known node name with another key: refused");
                    return Err(Problem::new(
                        ErrorCode::Conflict,
                        format!("node {name} is registered with another key: a node keeps the key it joined with"),
                    )
                    .field("csr"));
                }
                let cert = tls.ca.issue(&csr, &name).map_err(bad_csr)?;
                let serial = away_identity::serial_hex(&cert).map_err(bad_csr)?;
                certificate = Some(CertificateRecord {
                    serial,
                    node: name.clone(),
                    key_id: key_id.clone(),
                    issued_ms: now,
                    revoked_ms: None,
                });
                Some((key_id, cert, tls.ca.cert_pem().to_string()))
            }
            None => None,
        };
        let record = NodeRecord {
            name: name.clone(),
            info: req.node,
            api_addr: req.api_addr,
            transfer_addr: req.transfer_addr,
            draining: known.as_ref().is_some_and(|k| k.draining),
            load: NodeLoad::default(),
            reported: known.as_ref().map(|k| k.reported.clone()).unwrap_or_default(),
            // a (re)registered agent starts a fresh event sequence
            acked_seq: 0,
            registered_ms: now,
            last_seen_ms: now,
            key_id: issued
                .as_ref()
                .map(|(k, _, _)| k.clone())
                .or_else(|| known.as_ref().and_then(|k| k.key_id.clone())),
            // joined again with a new key (a revoked one is refused above)
            revoked_ms: None,
        };
        // a made join token is this node's from its first join (checked again under the
        // lock: two joins with one token at once get one node)
        let used = match join_token.as_ref().and_then(|id| inner.join_tokens.get(id)) {
            Some(t) => match &t.used_by {
                Some(other) if *other != name => {
                    return Err(Problem::unauthorized(format!("join token {} was used by node {other}", t.id)))
                }
                Some(_) => None,
                None => Some(JoinTokenRecord { used_by: Some(name.clone()), ..t.clone() }),
            },
            None => None,
        };
        let hash = tokens::sha256_hex(&token);
        let changes = Changes {
            nodes: vec![record.clone()],
            tokens: vec![(name.clone(), hash.clone())],
            certificates: certificate.iter().cloned().collect(),
            join_tokens: used.iter().cloned().collect(),
            ..Default::default()
        };
        inner.store.apply(&changes)?;
        if let Some(t) = used {
            inner.join_tokens.insert(t.id.clone(), t);
        }
        if let Some(c) = certificate {
            inner.certificates.insert(c.serial.clone(), c);
        }
        inner.nodes.insert(name.clone(), record);
        inner.classify(&name);
        inner.tokens.insert(name.clone(), hash);
        inner.announced_online.insert(name.clone());
        drop(inner);
        let what = if known.is_some() { "registered again (new agent token)" } else { "registered" };
        let what = match &join_token {
            Some(id) => format!("{what} with join token {id}"),
            None => what.to_string(),
        };
        self.emit(vec![Pending::new("node-registered", format!("node {name} {what}")).node(&name)]);
        Ok(RegisterResponse {
            agent_token: token,
            cluster_token: self.cluster_token.clone(),
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            certificate: issued.as_ref().map(|(_, c, _)| c.clone()),
            ca: issued.map(|(_, _, ca)| ca),
        })
    }

    // ---- join tokens ----

    /// A new join token (`POST /v1/join-tokens`): its secret is answered this once and
    /// only its SHA-256 is stored.
    pub fn create_join_token(&self, req: JoinTokenRequest) -> Result<JoinTokenCreated, Problem> {
        let (expires_in_s, label) = token_lifetime_and_label(req.expires_in_s, req.label)?;
        let NewToken { token, sha256, created_ms, expires_ms } = NewToken::make(expires_in_s)?;
        let record = JoinTokenRecord {
            id: tokens::short_id("jt-"),
            sha256,
            created_ms,
            expires_ms,
            revoked_ms: None,
            label,
            used_by: None,
        };
        let mut inner = lock(&self.inner);
        if inner.join_tokens.contains_key(&record.id) {
            return Err(Problem::internal("a new join token id is taken already: try again"));
        }
        inner.store.apply(&Changes { join_tokens: vec![record.clone()], ..Default::default() })?;
        inner.join_tokens.insert(record.id.clone(), record.clone());
        drop(inner);
        tracing::info!(id = %record.id, label = ?record.label, expires_ms = ?record.expires_ms, "join token created");
        Ok(JoinTokenCreated { id: record.id, token, expires_unix_ms: record.expires_ms })
    }

    /// The join tokens made over the API, oldest first, without their secrets.
    pub fn join_tokens(&self) -> Vec<JoinTokenView> {
        let now = now_ms();
        let inner = lock(&self.inner);
        let mut out: Vec<&JoinTokenRecord> = inner.join_tokens.values().collect();
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        out.into_iter().map(|r| r.view(now)).collect()
    }

    /// Revoke join token `id`: no node registers with it from now on (nodes that did
    /// keep working). Revoking a revoked token changes nothing.
    pub fn revoke_join_token(&self, id: &str) -> Result<JoinTokenView, Problem> {
        let now = now_ms();
        let mut inner = lock(&self.inner);
        let Some(record) = inner.join_tokens.get(id) else {
            return Err(Problem::not_found(format!("no join token {id:?}")));
        };
        if record.revoked_ms.is_some() {
            return Ok(record.view(now));
        }
        let revoked = JoinTokenRecord { revoked_ms: Some(now), ..record.clone() };
        inner.store.apply(&Changes { join_tokens: vec![revoked.clone()], ..Default::default() })?;
        inner.join_tokens.insert(revoked.id.clone(), revoked.clone());
        drop(inner);
        tracing::info!(id = %revoked.id, "join token revoked");
        Ok(revoked.view(now))
    }

    // ---- user tokens ----

    /// A new token for a user (`POST /v1/user-tokens`): its secret is answered this once
    /// and only its SHA-256 is stored.
    pub fn create_user_token(&self, req: UserTokenRequest) -> Result<UserTokenCreated, Problem> {
        if req.user == away_model::ADMIN_USER {
            return Err(Problem::invalid(
                "user name \"admin\" is taken: events name the broker's configured (admin) tokens so; choose another",
            )
            .field("user"));
        }
        if !away_model::is_user_name(&req.user) {
            return Err(Problem::invalid(format!(
                "user name {:?} must be a lower-case letter, then up to 62 lower-case letters, digits or '-' (like \
                 a DNS label: anna, ci-runner-2)",
                req.user
            ))
            .field("user"));
        }
        let (expires_in_s, label) = token_lifetime_and_label(req.expires_in_s, req.label)?;
        let NewToken { token, sha256, created_ms, expires_ms } = NewToken::make(expires_in_s)?;
        let record = UserTokenRecord {
            id: tokens::short_id("ut-"),
            user: req.user,
            sha256,
            created_ms,
            expires_ms,
            revoked_ms: None,
            label,
        };
        let mut inner = lock(&self.inner);
        if self.user_tokens.read().unwrap_or_else(|e| e.into_inner()).contains_key(&record.id) {
            return Err(Problem::internal("a new user token id is taken already: try again"));
        }
        inner.store.apply(&Changes { user_tokens: vec![record.clone()], ..Default::default() })?;
        self.user_tokens.write().unwrap_or_else(|e| e.into_inner()).insert(record.id.clone(), record.clone());
        drop(inner);
        tracing::info!(id = %record.id, user = %record.user, label = ?record.label, expires_ms = ?record.expires_ms, "user token created");
        Ok(UserTokenCreated { id: record.id, user: record.user, token, expires_unix_ms: record.expires_ms })
    }

    /// The user tokens made over the API, oldest first, without their secrets.
    pub fn user_tokens(&self) -> Vec<UserTokenView> {
        let now = now_ms();
        let made = self.user_tokens.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<&UserTokenRecord> = made.values().collect();
        out.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        out.into_iter().map(|r| r.view(now)).collect()
    }

    /// Revoke user token `id`: its next request is refused (401). Revoking a revoked
    /// token changes nothing.
    pub fn revoke_user_token(&self, id: &str) -> Result<UserTokenView, Problem> {
        let now = now_ms();
        let mut inner = lock(&self.inner);
        let Some(record) = self.user_tokens.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned() else {
            return Err(Problem::not_found(format!("no user token {id:?}")));
        };
        if record.revoked_ms.is_some() {
            return Ok(record.view(now));
        }
        let revoked = UserTokenRecord { revoked_ms: Some(now), ..record };
        inner.store.apply(&Changes { user_tokens: vec![revoked.clone()], ..Default::default() })?;
        self.user_tokens.write().unwrap_or_else(|e| e.into_inner()).insert(revoked.id.clone(), revoked.clone());
        drop(inner);
        tracing::info!(id = %revoked.id, user = %revoked.user, "user token revoked");
        Ok(revoked.view(now))
    }

    pub fn heartbeat(&self, name: &str, presented: Option<&str>, hb: Heartbeat) -> Result<HeartbeatResponse, Problem> {
        let mut inner = lock(&self.inner);
        match (presented, inner.tokens.get(name)) {
            (None, _) => {
                return Err(Problem::unauthorized("missing bearer token: send Authorization: Bearer <agent token>"))
            }
            (Some(t), Some(hash)) if tokens::matches(t, hash) => {}
            // an unknown node gets 401 too: the agent registers again
            (Some(_), _) => return Err(Problem::unauthorized(format!("wrong agent token for node {name}"))),
        }
        if hb.node.name != name {
            return Err(Problem::invalid(format!("node.name is {:?} but the heartbeat is for {name:?}", hb.node.name))
                .field("node.name"));
        }
        let now = now_ms();
        let Some(node) = inner.nodes.get(name) else {
            return Err(Problem::unauthorized(format!("node {name} is not registered")));
        };
        let crl_held = hb.crl_number;
        let Plan { changes, response, events } = reconcile(&inner.snapshot(), node, hb, now);
        let homes_changed =
            changes.workloads.iter().any(|w| inner.workloads.get(&w.spec.name).is_some_and(|old| old.node != w.node));
        inner.store.apply(&changes)?;
        // committed: now memory
        for n in changes.nodes {
            let name = n.name.clone();
            inner.nodes.insert(n.name.clone(), n);
            inner.classify(&name);
        }
        for w in changes.workloads {
            inner.workloads.insert(w.spec.name.clone(), w);
        }
        for f in &changes.forget_workloads {
            inner.workloads.remove(f);
        }
        for m in changes.migrations {
            inner.migrations.insert(m.id.clone(), m);
        }
        if homes_changed || !changes.forget_workloads.is_empty() {
            inner.recount_reserved();
        }
        for r in changes.removals {
            inner.removals.insert((r.node.clone(), r.workload.clone()), r);
        }
        for k in &changes.drop_removals {
            inner.removals.remove(k);
        }
        inner.announced_online.insert(name.to_string());
        let released: Vec<String> =
            changes.forget_workloads.iter().map(|w| crate::overlay::workload_owner(w)).collect();
        let mut response = response;
        response.overlay = Self::node_overlay(&mut inner, name, &released)?;
        response.crl = match &inner.crl {
            Some((number, pem)) if crl_held.is_none_or(|held| held < *number) => Some(pem.clone()),
            _ => None,
        };
        drop(inner);
        Metrics::inc(&self.metrics.heartbeats);
        self.emit(events);
        Ok(response)
    }

    /// A spec's network fields, before placement: the address is the broker's to give,
    /// and a network needs a broker that runs an overlay.
    fn check_network(inner: &Inner, spec: &WorkloadSpec) -> Result<(), Problem> {
        if spec.overlay.is_some() {
            return Err(Problem::invalid(
                "overlay is the address the broker assigns; leave it out (name a network instead)",
            )
            .field("overlay"));
        }
        if let (Some(net), None) = (&spec.network, &inner.ipam) {
            // a well-formed request this broker cannot serve: 422, as for placement
            return Err(Problem::new(
                ErrorCode::Incompatible,
                format!("network {net}: this broker runs no overlay (start it with --overlay POOL)"),
            )
            .field("network"));
        }
        Ok(())
    }

    /// Node `name`'s part in every network (its address, made when new, and the other
    /// nodes' tunnel endpoints); `released` workloads' addresses are freed first.
    fn node_overlay(
        inner: &mut Inner,
        name: &str,
        released: &[String],
    ) -> Result<Vec<away_model::NodeOverlay>, Problem> {
        let Some(mut ipam) = inner.ipam.clone() else { return Ok(Vec::new()) };
        let released: Vec<String> = released.iter().filter(|o| ipam.release(o)).cloned().collect();
        // a node's tunnel endpoint is the address its agent's API listens on
        let endpoint = |n: &NodeRecord| {
            n.api_addr.parse::<std::net::SocketAddr>().ok().and_then(|a| match a.ip() {
                std::net::IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_loopback() => Some(ip),
                _ => None,
            })
        };
        let mut peers: Vec<std::net::Ipv4Addr> =
            inner.nodes.values().filter(|n| n.name != name).filter_map(endpoint).collect();
        peers.sort();
        peers.dedup();
        // the workloads on other nodes, per network: their forwarding entries
        let mut remote: BTreeMap<String, Vec<away_model::RemoteWorkload>> = BTreeMap::new();
        for w in inner.workloads.values().filter(|w| w.node != name) {
            let (Some(addr), Some(node)) = (&w.spec.overlay, inner.nodes.get(&w.node).and_then(endpoint)) else {
                continue;
            };
            remote.entry(addr.network.clone()).or_default().push(away_model::RemoteWorkload {
                mac: addr.mac.clone(),
                node,
                since_unix_ms: w.updated_ms,
            });
        }
        let mut made = crate::overlay::IpamChanges::default();
        let networks: Vec<String> = ipam.networks().iter().map(|n| n.name.clone()).collect();
        let mut out = Vec::new();
        for net in networks {
            let address = ipam
                .address(&net, &crate::overlay::node_owner(name), &mut made)
                .map_err(|why| Problem::new(ErrorCode::Incompatible, why))?;
            let mut workloads = remote.remove(&net).unwrap_or_default();
            workloads.sort();
            out.push(away_model::NodeOverlay { address, peers: peers.clone(), workloads });
        }
        if !made.is_empty() || !released.is_empty() {
            inner.store.apply_overlay(&made, &released)?;
        }
        inner.ipam = Some(ipam);
        Ok(out)
    }

    /// Announce nodes that went offline (or came back) since the last tick, and end
    /// migrations past their deadline that the broker may end (reconcile rule 7).
    pub fn tick(&self) {
        let now = now_ms();
        let mut inner = lock(&self.inner);
        let mut out = Vec::new();
        let online: BTreeSet<String> =
            inner.nodes.values().filter(|n| self.is_online(n, now)).map(|n| n.name.clone()).collect();
        for gone in inner.announced_online.difference(&online) {
            let secs = inner.nodes.get(gone).map(|n| now.saturating_sub(n.last_seen_ms) / 1000).unwrap_or(0);
            out.push(
                Pending::new(
                    "node-offline",
                    format!("node {gone} is offline: no heartbeat for {secs} s; its workloads stay there"),
                )
                .node(gone),
            );
        }
        inner.announced_online = online;
        let (ended, events) = reconcile::resolve_deadlines(&inner.snapshot(), now, |n| self.may_be_online(n, now));
        if !ended.is_empty() {
            match inner.store.apply(&Changes { migrations: ended.clone(), ..Default::default() }) {
                Ok(()) => {
                    for m in ended {
                        inner.migrations.insert(m.id.clone(), m);
                    }
                    out.extend(events);
                }
                // memory stays as stored; the next tick tries again
                Err(e) => tracing::error!(error = %e, "storing migrations past their deadline failed"),
            }
        }
        drop(inner);
        self.emit(out);
    }

    // ---- nodes ----

    fn node_view(&self, inner: &Inner, n: &NodeRecord, now: u64) -> NodeView {
        let (mem, cpus) = Self::reserved_on(inner, &n.name);
        NodeView {
            name: n.name.clone(),
            state: if self.is_online(n, now) { "online" } else { "offline" }.to_string(),
            draining: n.draining,
            tier: n.info.tier,
            api_addr: n.api_addr.clone(),
            transfer_addr: n.transfer_addr.clone(),
            registered_ms: n.registered_ms,
            last_seen_ms: n.last_seen_ms,
            load: n.load,
            reserved_memory_bytes: mem,
            reserved_cpus: cpus,
            workloads: inner.workloads.values().filter(|w| w.node == n.name).map(|w| w.spec.name.clone()).collect(),
            unmanaged: n
                .reported
                .iter()
                .filter(|s| !inner.workloads.contains_key(&s.name))
                .map(|s| s.name.clone())
                .collect(),
            info: n.info.clone(),
            revoked_ms: n.revoked_ms,
        }
    }

    fn reserved_on(inner: &Inner, node: &str) -> (u64, f64) {
        inner.reserved.get(node).copied().unwrap_or_default()
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        let inner = lock(&self.inner);
        let now = now_ms();
        inner.nodes.values().map(|n| self.node_view(&inner, n, now)).collect()
    }

    pub fn node(&self, name: &str) -> Result<NodeView, Problem> {
        let inner = lock(&self.inner);
        let n = inner.nodes.get(name).ok_or_else(|| Problem::not_found(format!("no node named {name:?}")))?;
        Ok(self.node_view(&inner, n, now_ms()))
    }

    /// Drain node `name` (or stop draining it), as user `by` asked.
    pub fn drain(&self, name: &str, draining: bool, by: &str) -> Result<NodeView, Problem> {
        let mut inner = lock(&self.inner);
        let mut n =
            inner.nodes.get(name).cloned().ok_or_else(|| Problem::not_found(format!("no node named {name:?}")))?;
        let changed = n.draining != draining;
        n.draining = draining;
        inner.store.apply(&Changes { nodes: vec![n.clone()], ..Default::default() })?;
        inner.nodes.insert(name.to_string(), n.clone());
        let view = self.node_view(&inner, &n, now_ms());
        drop(inner);
        if changed {
            self.emit(vec![if draining {
                Pending::new("node-draining", format!("node {name} is draining: nothing new is placed there"))
                    .node(name)
                    .by(by)
            } else {
                Pending::new("node-undrained", format!("node {name} takes new workloads again")).node(name).by(by)
            }]);
        }
        Ok(view)
    }

    /// Make the CA's revocation list from the revoked certificates, and put it in force
    /// in the broker's own verifiers (its API and its clients of agents). Nothing while
    /// none is revoked. Its number is the count of revoked certificates: it grows with
    /// each revocation and a restart makes the same number again.
    fn make_crl(config: &BrokerConfig, inner: &mut Inner) -> Result<(), String> {
        let Some(tls) = &config.tls else { return Ok(()) };
        let revoked: Vec<away_identity::Revoked> = inner
            .certificates
            .values()
            .filter_map(|c| {
                c.revoked_ms.map(|ms| away_identity::Revoked {
                    serial_hex: c.serial.clone(),
                    revoked_at: std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                })
            })
            .collect();
        if revoked.is_empty() {
            return Ok(());
        }
        let number = revoked.len() as u64;
        let failed = |e: away_identity::IdentityError| format!("revocation list: {}", away_model::error_chain(&e));
        let pem = tls.ca.crl_pem(number, &revoked).map_err(failed)?;
        tls.identity.revocations().set_from_ca(&pem).map_err(failed)?;
        inner.crl = Some((number, pem));
        Ok(())
    }

    /// Revoke node `name`'s certificates (`POST /v1/nodes/{name}/revoke`): they go on the
    /// CA's revocation list (in force at once in the broker's TLS, and at each agent with
    /// its next heartbeat), its agent token and key are forgotten (a later join of the
    /// name needs a join token and a new key), and the node counts as offline like a lost
    /// one: nothing is placed there, its workloads show `node-offline`. Revoking a
    /// revoked node changes nothing.
    pub fn revoke_node(&self, name: &str) -> Result<NodeView, Problem> {
        let now = now_ms();
        let mut inner = lock(&self.inner);
        let Some(node) = inner.nodes.get(name).cloned() else {
            return Err(Problem::not_found(format!("no node named {name:?}")));
        };
        let serials: Vec<CertificateRecord> = inner
            .certificates
            .values()
            .filter(|c| c.node == name && c.revoked_ms.is_none())
            .map(|c| CertificateRecord { revoked_ms: Some(now), ..c.clone() })
            .collect();
        if node.revoked_ms.is_some() && serials.is_empty() {
            return Ok(self.node_view(&inner, &node, now));
        }
        let record = NodeRecord { revoked_ms: node.revoked_ms.or(Some(now)), key_id: None, ..node };
        // the made join tokens it joined with: their owner may register with them again,
        // which would let whoever holds the node's files join it back with a new key
        let join_tokens: Vec<JoinTokenRecord> = inner
            .join_tokens
            .values()
            .filter(|t| t.used_by.as_deref() == Some(name) && t.revoked_ms.is_none())
            .map(|t| JoinTokenRecord { revoked_ms: Some(now), ..t.clone() })
            .collect();
        let changes = Changes {
            nodes: vec![record.clone()],
            certificates: serials.clone(),
            forget_tokens: vec![name.to_string()],
            join_tokens: join_tokens.clone(),
            ..Default::default()
        };
        inner.store.apply(&changes)?;
        inner.tokens.remove(name);
        let revoked_join_tokens = join_tokens.len();
        for t in join_tokens {
            inner.join_tokens.insert(t.id.clone(), t);
        }
        // offline from now on, announced by the event below rather than as a missed heartbeat
        inner.announced_online.remove(name);
        inner.nodes.insert(name.to_string(), record.clone());
        for c in &serials {
            inner.certificates.insert(c.serial.clone(), c.clone());
        }
        Self::make_crl(&self.config, &mut inner).map_err(Problem::internal)?;
        let view = self.node_view(&inner, &record, now);
        drop(inner);
        if serials.is_empty() && self.config.tls.is_some() {
            tracing::warn!(node = %name, "no certificate of this node is on record (issued before the broker kept them): only its token and key are forgotten");
        }
        self.emit(vec![Pending::new(
            "node-revoked",
            format!(
                "node {name} revoked: {} certificate(s) on the revocation list, its token and key forgotten, {} join \
                 token(s) it joined with revoked; it is offline",
                serials.len(),
                revoked_join_tokens
            ),
        )
        .node(name)
        .by(away_model::ADMIN_USER)]);
        Ok(view)
    }

    // ---- workloads ----

    fn candidates<'a>(&self, inner: &'a Inner, now: u64) -> Vec<Candidate<'a>> {
        inner
            .nodes
            .values()
            .map(|n| {
                let (mem, cpus) = Self::reserved_on(inner, &n.name);
                Candidate {
                    info: &n.info,
                    online: self.is_online(n, now),
                    draining: n.draining,
                    load: n.load,
                    reserved_memory: mem,
                    reserved_cpus: cpus,
                    runtime_class: inner.runtime_class.get(&n.name).copied(),
                }
            })
            .collect()
    }

    /// Place a workload (or only explain where it would go).
    pub fn submit(&self, spec: WorkloadSpec, dry_run: bool, by: &str) -> Submitted {
        if dry_run {
            let inner = lock(&self.inner);
            let decision = placement::place(&spec, &self.candidates(&inner, now_ms()));
            return match decision.chosen {
                Some(_) => Ok((None, decision)),
                None => {
                    Metrics::inc(&self.metrics.placements_refused);
                    Err(Self::refused(decision))
                }
            };
        }
        self.submissions.submit((spec, by.to_string()), |specs| self.place_batch(specs))
    }

    fn refused(decision: PlacementDecision) -> Problem {
        Problem::new(ErrorCode::Incompatible, decision.why.clone()).detail("placement", &decision)
    }

    /// Place submissions that arrived together, one after the other (each sees what the
    /// ones before it reserved), and store the placed ones in one transaction. Nothing
    /// is acknowledged, nor held in memory, before that transaction is durable; if it
    /// fails, each submission of the batch gets the error.
    fn place_batch(&self, specs: Vec<(WorkloadSpec, String)>) -> Vec<Submitted> {
        let now = now_ms();
        let mut inner = lock(&self.inner);
        let mut answers: Vec<Result<PlacementDecision, Problem>> = Vec::with_capacity(specs.len());
        // who asked for each, in the order of `answers`
        let mut asked_by: Vec<String> = Vec::with_capacity(specs.len());
        let mut placed: Vec<WorkloadRecord> = Vec::new();
        // addresses are taken from a copy, which replaces the broker's once stored
        let mut overlay = inner.ipam.clone();
        let mut overlay_changes = crate::overlay::IpamChanges::default();
        {
            // the nodes as placement sees them, once per batch: each placement adds its
            // workload to its node's promised resources here, for the next ones
            let mut candidates = self.candidates(&inner, now);
            let mut names = BTreeSet::new();
            for (mut spec, by) in specs {
                asked_by.push(by);
                if let Err(problem) = Self::check_network(&inner, &spec) {
                    answers.push(Err(problem));
                    continue;
                }
                if inner.workloads.contains_key(&spec.name) || !names.insert(spec.name.clone()) {
                    answers.push(Err(Problem::new(
                        ErrorCode::Conflict,
                        format!("a workload named {:?} exists already", spec.name),
                    )
                    .field("name")));
                    continue;
                }
                let (decision, at) = placement::place_at(&spec, &candidates);
                let (Some(node), Some(runtime), Some(at)) = (decision.chosen.clone(), decision.runtime.clone(), at)
                else {
                    Metrics::inc(&self.metrics.placements_refused);
                    answers.push(Err(Self::refused(decision)));
                    continue;
                };
                if let Some(ipam) = overlay.as_mut() {
                    let network = spec.network.as_deref().unwrap_or(away_model::DEFAULT_NETWORK);
                    match ipam.address(network, &crate::overlay::workload_owner(&spec.name), &mut overlay_changes) {
                        Ok(a) => spec.overlay = Some(a),
                        Err(why) => {
                            answers.push(Err(Problem::new(ErrorCode::Incompatible, why).field("network")));
                            continue;
                        }
                    }
                }
                let c = &mut candidates[at];
                c.reserved_memory += spec.resources.memory.bytes();
                c.reserved_cpus += spec.resources.cpus;
                placed.push(WorkloadRecord {
                    spec,
                    node,
                    desired: Desired::Running,
                    status: None,
                    status_ms: None,
                    decision: runtime,
                    placement: placement::shortened(&decision, placement::MAX_STORED),
                    created_ms: now,
                    updated_ms: now,
                    last_event: None,
                });
                answers.push(Ok(decision));
            }
        }
        if !overlay_changes.is_empty() {
            if let Err(e) = inner.store.apply_overlay(&overlay_changes, &[]) {
                let problem = Problem::from(e);
                return answers.into_iter().map(|a| a.and(Err(problem.clone()))).collect();
            }
            inner.ipam = overlay;
        }
        if !placed.is_empty() {
            if let Err(e) = inner.store.apply(&Changes { workloads: placed.clone(), ..Default::default() }) {
                // nothing of the batch reached memory either
                let problem = Problem::from(e);
                return answers.into_iter().map(|a| a.and(Err(problem.clone()))).collect();
            }
        }
        // committed: now memory
        for record in placed {
            let r = inner.reserved.entry(record.node.clone()).or_default();
            r.0 += record.spec.resources.memory.bytes();
            r.1 += record.spec.resources.cpus;
            inner.workloads.insert(record.spec.name.clone(), record);
        }
        let mut events = Vec::new();
        let answers = answers
            .into_iter()
            .zip(asked_by)
            .map(|(a, by)| {
                let decision = a?;
                let record = &inner.workloads[&decision.workload];
                let view = self.workload_view(&inner, record, now, true);
                Metrics::inc(&self.metrics.placements_placed);
                events.push(
                    Pending::new("workload-placed", decision.why.clone()).node(&view.node).workload(&view.name).by(&by),
                );
                Ok((Some(view), decision))
            })
            .collect();
        drop(inner);
        self.emit(events);
        answers
    }

    fn workload_view(&self, inner: &Inner, w: &WorkloadRecord, now: u64, with_placement: bool) -> WorkloadView {
        let migration =
            inner.migrations.values().find(|m| m.workload == w.spec.name && m.state.is_active()).map(|m| m.id.clone());
        let online = inner.nodes.get(&w.node).is_some_and(|n| self.is_online(n, now));
        let state = if w.desired == Desired::Removed {
            "removing".to_string()
        } else if migration.is_some() {
            "migrating".to_string()
        } else if !online {
            "node-offline".to_string()
        } else {
            w.status.as_ref().map(|s| s.state.to_string()).unwrap_or_else(|| "pending".to_string())
        };
        WorkloadView {
            name: w.spec.name.clone(),
            node: w.node.clone(),
            desired: w.desired,
            state,
            runtime: w.status.as_ref().map(|s| s.runtime).unwrap_or(w.decision.runtime),
            decision: w.decision.clone(),
            status: w.status.clone(),
            status_ms: w.status_ms,
            migration,
            last_event: w.last_event.clone(),
            created_ms: w.created_ms,
            updated_ms: w.updated_ms,
            spec: w.spec.clone(),
            placement: with_placement.then(|| w.placement.clone()),
        }
    }

    pub fn workloads(&self) -> Vec<WorkloadView> {
        let inner = lock(&self.inner);
        let now = now_ms();
        inner.workloads.values().map(|w| self.workload_view(&inner, w, now, false)).collect()
    }

    pub fn workload(&self, name: &str) -> Result<WorkloadView, Problem> {
        let inner = lock(&self.inner);
        let w = inner.workloads.get(name).ok_or_else(|| no_workload(name))?;
        Ok(self.workload_view(&inner, w, now_ms(), true))
    }

    /// Ask for removal (user `by` did): the home node removes it, then the broker forgets it.
    pub fn delete(&self, name: &str, by: &str) -> Result<WorkloadView, Problem> {
        let now = now_ms();
        let mut inner = lock(&self.inner);
        let mut w = inner.workloads.get(name).cloned().ok_or_else(|| no_workload(name))?;
        if let Some(m) = inner.migrations.values().find(|m| m.workload == name && m.state.is_active()) {
            return Err(Problem::new(
                ErrorCode::Conflict,
                format!(
                    "{name} is being migrated ({}, {}); delete it once the migration is over (DELETE /v1/migrations/ID \
                     cancels one its source has not started)",
                    m.id,
                    m.state.as_str()
                ),
            ));
        }
        let first = w.desired != Desired::Removed;
        w.desired = Desired::Removed;
        w.updated_ms = now;
        inner.store.apply(&Changes { workloads: vec![w.clone()], ..Default::default() })?;
        inner.workloads.insert(name.to_string(), w.clone());
        let view = self.workload_view(&inner, &w, now, false);
        drop(inner);
        if first {
            self.emit(vec![Pending::new("workload-removing", format!("{name} will be removed from {}", w.node))
                .node(&w.node)
                .workload(name)
                .by(by)]);
        }
        Ok(view)
    }

    pub fn log_source(&self, name: &str) -> Result<LogSource, Problem> {
        let inner = lock(&self.inner);
        let w = inner.workloads.get(name).ok_or_else(|| no_workload(name))?;
        let n =
            inner.nodes.get(&w.node).ok_or_else(|| Problem::internal(format!("home node {} is unknown", w.node)))?;
        Ok(LogSource { node: n.name.clone(), api_addr: n.api_addr.clone(), online: self.is_online(n, now_ms()) })
    }

    // ---- migrations ----

    /// Record a migration of `req`, as user `by` asked.
    pub fn migrate(&self, req: MigrationRequest, by: &str) -> Result<MigrationRecord, Problem> {
        self.migrate_as(req, None, None, by)
    }

    /// Where a move of `req` would go (source, target, compatibility, why), checked as
    /// `POST /v1/migrations` checks it; nothing is recorded.
    pub fn choose_move(&self, req: &MigrationRequest) -> Result<MoveChoice, Problem> {
        let inner = lock(&self.inner);
        self.pick_target(&inner, req, now_ms())
    }

    /// Record a migration of `req`. `chosen` keeps who chose the target and why when the
    /// request's `to` was filled in from [`Broker::choose_move`]; `predicted` is the
    /// prediction the request was checked against.
    pub fn migrate_as(
        &self,
        req: MigrationRequest,
        chosen: Option<(String, String)>,
        predicted: Option<away_model::MovePrediction>,
        by: &str,
    ) -> Result<MigrationRecord, Problem> {
        let now = now_ms();
        let deadline_s = req.deadline_s.unwrap_or(DEFAULT_MIGRATION_DEADLINE_S);
        let mut inner = lock(&self.inner);
        let MoveChoice { source, target, compatibility, chosen_by, why, .. } = self.pick_target(&inner, &req, now)?;
        let (chosen_by, why) = chosen.unwrap_or((chosen_by, why));
        let record = MigrationRecord {
            id: tokens::short_id("m-"),
            workload: req.workload.clone(),
            source,
            target: target.clone(),
            state: MigrationState::Pending,
            chosen_by,
            why,
            compatibility,
            requested_ms: now,
            delivered_ms: None,
            finished_ms: None,
            report: None,
            error: None,
            mode: req.mode.clone(),
            close_connections: req.close_connections,
            deadline_ms: Some(now + deadline_s * 1000),
            resolved_by_broker: false,
            cancel_requested_ms: None,
            predicted,
        };
        inner.store.apply(&Changes { migrations: vec![record.clone()], ..Default::default() })?;
        inner.migrations.insert(record.id.clone(), record.clone());
        drop(inner);
        self.emit(vec![Pending::new(
            "migration-requested",
            format!("move {} from {} to {}: {}", record.workload, record.source, record.target, record.why),
        )
        .node(&record.source)
        .workload(&record.workload)
        .migration(&record.id)
        .by(by)]);
        Ok(record)
    }

    fn pick_target(&self, inner: &Inner, req: &MigrationRequest, now: u64) -> Result<MoveChoice, Problem> {
        if let Some(mode) = &req.mode {
            mode.parse::<away_policy::ContainerMode>().map_err(|e| Problem::invalid(e).field("mode"))?;
        }
        let deadline_s = req.deadline_s.unwrap_or(DEFAULT_MIGRATION_DEADLINE_S);
        if !(1..=MAX_MIGRATION_DEADLINE_S).contains(&deadline_s) {
            return Err(Problem::invalid(format!(
                "deadline_s is {deadline_s}: a migration's deadline is 1 to {MAX_MIGRATION_DEADLINE_S} seconds"
            ))
            .field("deadline_s"));
        }
        let w =
            inner.workloads.get(&req.workload).cloned().ok_or_else(|| no_workload(&req.workload).field("workload"))?;
        if w.desired == Desired::Removed {
            return Err(
                Problem::new(ErrorCode::Conflict, format!("{} is being removed", req.workload)).field("workload")
            );
        }
        if let Some(m) = inner.migrations.values().find(|m| m.workload == req.workload && m.state.is_active()) {
            return Err(Problem::new(
                ErrorCode::Conflict,
                format!("{} is already being migrated by {}", req.workload, m.id),
            )
            .field("workload")
            .detail("migration", m));
        }
        let source = inner
            .nodes
            .get(&w.node)
            .cloned()
            .ok_or_else(|| Problem::internal(format!("home node {} of {} is unknown", w.node, req.workload)))?;
        let runtime = w.status.as_ref().map(|s| s.runtime).unwrap_or(w.decision.runtime);
        let check = |dst: &NodeInfo| -> Compatibility {
            let compat = if runtime.is_container() {
                check_container(&source.info, dst, runtime, runtime)
            } else {
                check_vm(&source.info, dst)
            };
            // said before the move: whether its open TCP connections survive it
            with_connections(compat, w.spec.overlay.as_ref(), runtime, req.close_connections, &dst.name)
        };
        // resources the workload holds on its source do not count against other nodes
        let candidates: Vec<Candidate> =
            self.candidates(inner, now).into_iter().filter(|c| c.info.name != source.name).collect();
        let mut others = Vec::new();
        let (target, compatibility, chosen_by, why) = match &req.to {
            Some(to) => {
                if *to == source.name {
                    return Err(Problem::invalid(format!("{} already runs on {to}", req.workload)).field("to"));
                }
                let c = candidates
                    .iter()
                    .find(|c| c.info.name == *to)
                    .ok_or_else(|| Problem::not_found(format!("no node named {to:?}")).field("to"))?;
                if let Err(reasons) = placement::feasibility(&placement::as_moved(&w.spec), c) {
                    return Err(Problem::new(
                        ErrorCode::Incompatible,
                        format!("{to} cannot take {}: {}", req.workload, reasons.join("; ")),
                    )
                    .field("to"));
                }
                let compat = check(c.info);
                if !compat.allowed {
                    return Err(Problem::new(
                        ErrorCode::Incompatible,
                        format!("{} cannot move from {} to {to}: {}", req.workload, source.name, compat.reason),
                    )
                    .field("to")
                    .detail("compatibility", &compat));
                }
                let why = format!("{to} as requested: {}", compat.reason);
                (to.clone(), compat, "user", why)
            }
            None => {
                let decision = placement::place(&placement::as_moved(&w.spec), &candidates);
                let mut refused = Vec::new();
                let mut found = None;
                for s in &decision.scores {
                    let Some(c) = candidates.iter().find(|c| c.info.name == s.node) else { continue };
                    let compat = check(c.info);
                    if compat.allowed {
                        if found.is_none() {
                            found = Some((s.node.clone(), compat, s.total));
                        } else if others.len() + 1 < MOVE_ALTERNATIVES {
                            others.push(s.node.clone());
                        } else {
                            break;
                        }
                        continue;
                    }
                    refused.push(format!("{}: {}", s.node, compat.reason));
                }
                let Some((to, compat, total)) = found else {
                    let mut reasons: Vec<String> = refused;
                    reasons.extend(decision.filtered.iter().map(|f| format!("{}: {}", f.node, f.reasons.join(", "))));
                    let msg = if reasons.is_empty() {
                        format!("no other node to move {} to", req.workload)
                    } else {
                        format!("no node can take {} from {}: {}", req.workload, source.name, reasons.join("; "))
                    };
                    return Err(Problem::new(ErrorCode::Incompatible, msg).detail("placement", &decision));
                };
                let why = format!("{to}: best-scoring compatible node (score {total}); {}", compat.reason);
                (to, compat, "broker", why)
            }
        };
        let target_api = inner.nodes.get(&target).map(|n| n.api_addr.clone()).unwrap_or_default();
        Ok(MoveChoice {
            source_online: self.is_online(&source, now),
            source: source.name.clone(),
            source_api: source.api_addr.clone(),
            target,
            target_api,
            compatibility,
            chosen_by: chosen_by.to_string(),
            why,
            runtime,
            others,
        })
    }

    pub fn migrations(&self) -> Vec<MigrationRecord> {
        let inner = lock(&self.inner);
        let mut all: Vec<MigrationRecord> = inner.migrations.values().cloned().collect();
        all.sort_by(|a, b| a.requested_ms.cmp(&b.requested_ms).then_with(|| a.id.cmp(&b.id)));
        all
    }

    pub fn migration(&self, id: &str) -> Result<MigrationRecord, Problem> {
        lock(&self.inner).migrations.get(id).cloned().ok_or_else(|| Problem::not_found(format!("no migration {id:?}")))
    }

    /// `DELETE /v1/migrations/{id}`: end a migration its source has not started, or one
    /// whose source is offline (reconcile rule 7).
    pub fn cancel_migration(&self, id: &str, by: &str) -> Result<MigrationRecord, Problem> {
        let now = now_ms();
        let mut inner = lock(&self.inner);
        let m = inner.migrations.get(id).ok_or_else(|| Problem::not_found(format!("no migration {id:?}")))?;
        let source_online = inner.nodes.get(&m.source).is_some_and(|n| self.may_be_online(n, now));
        let (m, event) = reconcile::cancel(m, source_online, now)?;
        inner.store.apply(&Changes { migrations: vec![m.clone()], ..Default::default() })?;
        inner.migrations.insert(m.id.clone(), m.clone());
        drop(inner);
        self.emit(vec![event.by(by)]);
        Ok(m)
    }

    // ---- metrics ----

    pub fn metrics_text(&self) -> String {
        let now = now_ms();
        let inner = lock(&self.inner);
        let mut nodes: BTreeMap<String, u64> =
            ["online", "offline", "draining"].iter().map(|s| (s.to_string(), 0)).collect();
        for n in inner.nodes.values() {
            let state = if !self.is_online(n, now) {
                "offline"
            } else if n.draining {
                "draining"
            } else {
                "online"
            };
            *nodes.entry(state.to_string()).or_default() += 1;
        }
        let mut workloads: BTreeMap<String, u64> = BTreeMap::new();
        for w in inner.workloads.values() {
            *workloads.entry(self.workload_view(&inner, w, now, false).state).or_default() += 1;
        }
        let mut migrations: BTreeMap<String, u64> =
            ["pending", "running", "succeeded", "failed"].iter().map(|s| (s.to_string(), 0)).collect();
        for m in inner.migrations.values() {
            *migrations.entry(m.state.as_str().to_string()).or_default() += 1;
        }
        drop(inner);
        self.metrics.render(&[
            ("away_nodes", "Registered nodes by state.", "state", nodes.into_iter().collect()),
            ("away_workloads", "Workloads by state.", "state", workloads.into_iter().collect()),
            ("away_migrations", "Migrations by state.", "state", migrations.into_iter().collect()),
        ])
    }
}

/// A new made token's secret, its hash, and when it was made and expires.
struct NewToken {
    token: String,
    sha256: String,
    created_ms: u64,
    expires_ms: Option<u64>,
}

impl NewToken {
    fn make(expires_in_s: Option<u64>) -> Result<NewToken, Problem> {
        let token = tokens::generate().map_err(|e| Problem::internal(format!("no randomness for a token: {e}")))?;
        let created_ms = now_ms();
        Ok(NewToken {
            sha256: tokens::sha256_hex(&token),
            token,
            created_ms,
            expires_ms: expires_in_s.map(|s| created_ms + s * 1000),
        })
    }
}

/// A made token's lifetime (1 s to 10 years, or none) and label (trimmed; at most 200
/// characters, no control characters), checked alike for join and user tokens.
fn token_lifetime_and_label(
    expires_in_s: Option<u64>,
    label: Option<String>,
) -> Result<(Option<u64>, Option<String>), Problem> {
    if let Some(s) = expires_in_s.filter(|s| *s == 0 || *s > MAX_JOIN_TOKEN_LIFETIME_S) {
        return Err(Problem::invalid(format!(
            "expires_in_s {s} must be 1 to {MAX_JOIN_TOKEN_LIFETIME_S} (10 years); leave it out for no expiry"
        ))
        .field("expires_in_s"));
    }
    // Checked as sent, before trimming: the schema's pattern and maxLength judge the raw
    // string, and a trailing tab or vertical tab is a control character either way.
    if label.as_ref().is_some_and(|l| l.chars().count() > 200 || l.chars().any(char::is_control)) {
        return Err(Problem::invalid("label must be at most 200 characters, no control characters").field("label"));
    }
    let label = label.map(|l| l.trim().to_string()).filter(|l| !l.is_empty());
    Ok((expires_in_s, label))
}

fn no_workload(name: &str) -> Problem {
    Problem::not_found(format!("no workload named {name:?}"))
}

/// Node names travel in URLs and logs: keep them plain.
fn check_node_name(name: &str) -> Result<(), Problem> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Problem::invalid(format!("node name {name:?} must be 1-63 letters, digits, '-', '_' or '.'"))
            .field("node.name"))
    }
}
