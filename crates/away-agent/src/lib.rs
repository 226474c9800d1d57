//! The away node daemon. It runs the runtime and migration work asked of its node and
//! receives transfers from other agents:
//!
//! * an HTTP JSON API under `/v1` (axum): the node's fingerprint, its workloads, image
//!   presence, commits of incoming migrations, VM migration destinations;
//! * the transfer protocol's receiver (`away_migrate::transfer`) on a second port, which
//!   restores incoming checkpoints.
//!
//! An incoming workload is *provisional* until the source commits it: if no commit
//! arrives within the lease, the agent removes it again, because the source, having
//! heard nothing, resumes its own copy. That is what keeps one live instance when the
//! link dies at the worst moment.

pub mod api;
pub mod broker;
pub mod client;
mod disks;
pub mod outgoing;
mod published;
pub mod state;

/// Built with the `fault-injection` feature: the end-to-end tests' `AWAY_FAULT_*`
/// variables are read (never in a build users run).
pub const FAULT_INJECTION: bool = cfg!(feature = "fault-injection");

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use away_migrate::target::{MoveRecord, MoveState};
use away_model::{ErrorChain, NodeInfo, Tier};
use away_runtime::host::FingerprintOptions;
use away_runtime::{LocalNode, NodeOptions};
use tokio::sync::Mutex;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name, as the broker and other agents know it.
    pub name: String,
    pub tier: Tier,
    /// HTTP API address.
    pub listen: SocketAddr,
    /// Transfer protocol address (incoming migrations).
    pub transfer_listen: SocketAddr,
    /// Address other agents reach the transfer port at (default: `transfer_listen`).
    pub transfer_advertise: Option<String>,
    pub node: NodeOptions,
    /// How long an incoming workload waits for its source's commit.
    pub commit_lease: Duration,
    /// The broker this agent works for; `None` runs it standalone.
    pub broker: Option<broker::BrokerLink>,
    /// A fixed token the API demands (standalone agents); agents of a broker use the
    /// cluster token the broker hands out at registration.
    pub api_token: Option<String>,
    /// The transfer receiver's bounds (connections, transfers, spool, timeouts).
    pub transfers: away_migrate::transfer::ReceiveOptions,
    /// `--insecure-plaintext-channels`: without a node identity, migration channels
    /// (transfers, page relays) are plain TCP. Without an identity and without this
    /// flag the agent takes part in no migration (every incoming transfer is refused,
    /// every move from here fails), docs/security.md. With an identity they are mutual
    /// TLS whatever this says.
    pub insecure_plaintext_channels: bool,
}

/// Why an agent without channels refuses a move.
pub const NO_CHANNELS: &str = "this agent has no node identity and was not started with \
     --insecure-plaintext-channels: it takes part in no migration (join a broker with --broker \
     for an identity, or start it with --insecure-plaintext-channels on a trusted network)";

/// An incoming move announced by its source over the API: only its transfer, from that
/// node, with that secret, is taken.
#[derive(Debug, Clone)]
pub struct Announced {
    pub workload: String,
    pub source: String,
    pub secret: away_migrate::transfer::MoveSecret,
    /// When it was announced (Unix ms).
    pub at_ms: i64,
}

impl Announced {
    fn fresh(&self, expiry: Duration) -> bool {
        state::now_ms().saturating_sub(self.at_ms) < expiry.as_millis() as i64
    }
}

/// Announced moves kept at once (older ones are forgotten first).
const MAX_ANNOUNCED: usize = 256;

impl AgentConfig {
    pub fn spool_dir(&self) -> PathBuf {
        self.node.paths.state_dir.join("transfers")
    }

    /// Where the volume pre-copies of incoming moves wait for their checkpoints, one
    /// directory per move (0700).
    pub fn precopy_dir(&self) -> PathBuf {
        self.node.paths.state_dir.join("volume-precopies")
    }

    /// Where the node's key and certificate live (0700; the key 0600).
    pub fn identity_dir(&self) -> PathBuf {
        Self::identity_dir_in(&self.node.paths.state_dir)
    }

    /// Where a node with state directory `state_dir` keeps its identity.
    pub fn identity_dir_in(state_dir: &std::path::Path) -> PathBuf {
        state_dir.join("identity")
    }
}

/// How long removing an expired copy may take (a container's task killed and deleted):
/// part of the lease the agent announces.
const REMOVAL_GRACE: Duration = Duration::from_secs(5);

/// How long an ended move's answer is kept for a source that asks again.
const ENDED_MOVES_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// An incoming migration restored here, not yet committed by its source.
#[derive(Debug, Clone)]
pub struct Provisional {
    pub workload: String,
    pub runtime: away_model::RuntimeKind,
}

/// Shared state of a running agent.
pub struct Agent {
    pub config: AgentConfig,
    pub node: LocalNode,
    pub info: NodeInfo,
    /// transfer id -> provisional workload
    pub provisional: Mutex<HashMap<String, Provisional>>,
    /// workload -> VM migration destination waiting here
    pub vm_destinations: Mutex<HashMap<String, away_migrate::vm::Destination>>,
    pub state: state::AgentState,
    /// Bearer token callers of the API must present (None: open, for a standalone agent
    /// on loopback).
    pub cluster_token: tokio::sync::RwLock<Option<String>>,
    /// Broker work in progress, so that a repeated order does not run twice.
    work: Mutex<std::collections::HashSet<String>>,
    /// Migration id -> its cancel, for the moves under way (a broker's cancel sets it).
    pub(crate) cancels: std::sync::Mutex<HashMap<String, away_migrate::Cancel>>,
    /// The lab networks as last built from the broker's answer (docs/network.md).
    pub(crate) overlay: std::sync::Mutex<Vec<away_model::NodeOverlay>>,
    /// The node's certificate from the broker's CA, once it joined one: from then on its
    /// API is served over mutual TLS only and its calls to other nodes use it.
    identity: std::sync::RwLock<Option<away_identity::Identity>>,
    /// The API's TLS configuration (None: plain HTTP, no identity yet).
    tls: tokio::sync::watch::Sender<Option<Arc<away_identity::rustls::ServerConfig>>>,
    /// The migration channels (transfers, page relays): mutual TLS with the identity,
    /// else plaintext (whether plaintext is allowed at all: [`Agent::channels`]). The
    /// transfer receiver secures each connection it accepts with what this holds then.
    channels: tokio::sync::watch::Sender<away_migrate::channel::Channels>,
    /// transfer id -> the move its source announced (checked by the transfer receiver).
    pub announced: std::sync::Mutex<HashMap<String, Announced>>,
    /// transfer id -> the page link a streamed move's announcement opened, and when;
    /// its restore takes it ([`Agent::take_page_link`]).
    page_links: std::sync::Mutex<HashMap<String, (std::time::Instant, away_migrate::lazy::early::EarlyLink)>>,
}

impl Agent {
    /// Open the node's runtimes, its state database, and fingerprint the host.
    pub async fn open(config: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        let node = LocalNode::open(config.node.clone()).await;
        let fp = away_runtime::host::fingerprint(&FingerprintOptions {
            paths: config.node.paths.clone(),
            ..Default::default()
        })
        .await;
        let info = fp.node_info(&config.name, config.tier);
        let state =
            state::AgentState::open(&config.node.paths.state_dir.join("agent.db")).map_err(AgentError::State)?;
        let identity = away_identity::Identity::load(&config.identity_dir()).map_err(AgentError::Identity)?;
        let (tls, channels) = match &identity {
            Some(id) => (
                Some(id.server_config().map_err(AgentError::Identity)?),
                away_migrate::channel::Channels::from_identity(id).map_err(AgentError::Identity)?,
            ),
            None => (None, away_migrate::channel::Channels::plaintext()),
        };
        if let Some(id) = &identity {
            tracing::info!(subject = %id.subject(), ca = %id.ca_fingerprint(), crl = ?id.revocations().summary(), "node identity loaded: the API and migration channels are mutual TLS");
        }
        // moves announced before a restart: their transfers resume with their secrets
        let since = state::now_ms().saturating_sub(config.transfers.expire_after.as_millis() as i64);
        let announced = state.announced_since(since).map_err(AgentError::State)?.into_iter().collect();
        Ok(Arc::new(Agent {
            identity: std::sync::RwLock::new(identity),
            tls: tokio::sync::watch::channel(tls).0,
            channels: tokio::sync::watch::channel(channels).0,
            cluster_token: tokio::sync::RwLock::new(config.api_token.clone()),
            config,
            node,
            info,
            provisional: Mutex::new(HashMap::new()),
            vm_destinations: Mutex::new(HashMap::new()),
            state,
            work: Mutex::new(Default::default()),
            cancels: Default::default(),
            overlay: Default::default(),
            announced: std::sync::Mutex::new(announced),
            page_links: Default::default(),
        }))
    }

    /// The node's identity, if it has one.
    pub fn identity(&self) -> Option<away_identity::Identity> {
        self.identity.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Take on `identity` (already saved): the API serves mutual TLS from the next
    /// connection on.
    pub fn set_identity(&self, mut identity: away_identity::Identity) -> Result<(), away_identity::IdentityError> {
        // a node that joined again keeps the revocation list it holds
        if let Some(old) = self.identity() {
            identity.share_revocations(old.revocations());
        }
        let server = identity.server_config()?;
        let channels = away_migrate::channel::Channels::from_identity(&identity)?;
        *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Some(identity);
        self.tls.send_replace(Some(server));
        self.channels.send_replace(channels);
        Ok(())
    }

    /// Put the CA's revocation list `pem` (from the broker's heartbeat answer) in force:
    /// checked against the node's CA, saved to `STATE_DIR/identity/crl.pem` (0600), and
    /// from the next handshake on every mutual-TLS channel of this node (its API, the
    /// transfer receiver, page relays, its calls to other nodes) refuses what it lists.
    pub fn take_crl(&self, pem: &str) -> Result<away_identity::CrlSummary, String> {
        let Some(identity) = self.identity() else {
            return Err("this node has no identity to check the list against".into());
        };
        let summary = identity.set_crl_pem(pem).map_err(|e| away_model::error_chain(&e))?;
        identity.save_crl(&self.config.identity_dir()).map_err(|e| away_model::error_chain(&e))?;
        tracing::info!(
            number = summary.number,
            revoked = summary.revoked,
            "certificate revocation list from the broker in force: the certificates it lists are refused on every channel"
        );
        Ok(summary)
    }

    /// The node's fingerprint with its runtimes' health as of now.
    pub async fn node_info(&self) -> NodeInfo {
        let mut info = self.info.clone();
        info.runtimes = self.node.health().await;
        // what the broker places a VM with a disk by (a move copies a missing base)
        info.disk_bases = self.node.qemu().disk_store().digests();
        info
    }

    /// Claim a piece of broker work; false when it already runs.
    pub async fn start_work(&self, key: &str) -> bool {
        self.work.lock().await.insert(key.to_string())
    }

    pub async fn finish_work(&self, key: &str) {
        self.work.lock().await.remove(key);
    }

    /// Record move `transfer_id` of `workload` from node `source` and give its secret
    /// (the same one when the same source announces it again). Announcements older than
    /// the receiver's expiry are forgotten.
    pub fn announce(&self, transfer_id: &str, workload: &str, source: &str) -> Result<Announced, String> {
        self.channels()?;
        let mut announced = self.announced.lock().expect("announced lock");
        let expiry = self.config.transfers.expire_after;
        announced.retain(|_, a| a.fresh(expiry));
        if let Some(a) = announced.get(transfer_id) {
            if a.source != source || a.workload != workload {
                return Err(format!(
                    "move {transfer_id} is announced already, of {} from node {}",
                    a.workload, a.source
                ));
            }
            return Ok(a.clone());
        }
        if announced.len() >= MAX_ANNOUNCED {
            let oldest = announced.iter().min_by_key(|(_, a)| a.at_ms).map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                announced.remove(&id);
                let _ = self.state.forget_announced(&id);
            }
        }
        let secret =
            away_migrate::transfer::MoveSecret::generate().map_err(|e| format!("no random secret from the OS: {e}"))?;
        let a =
            Announced { workload: workload.to_string(), source: source.to_string(), secret, at_ms: state::now_ms() };
        self.state
            .save_announced(transfer_id, &a)
            .map_err(|e| format!("cannot record the move: {e}", e = ErrorChain(&e)))?;
        announced.insert(transfer_id.to_string(), a.clone());
        Ok(a)
    }

    /// Import an announced move's image into its runtime in the background, so that the
    /// restore finds it there. Best effort: an image this node's store lacks, or an
    /// import that fails, only means the restore imports it (and says why, if it cannot).
    pub fn prepare_image(self: &std::sync::Arc<Self>, prepare: away_migrate::target::PrepareImage) {
        let agent = self.clone();
        tokio::spawn(async move {
            let node = &agent.node;
            let t = std::time::Instant::now();
            let prepared = async {
                let image = node.store.resolve_stored(&prepare.reference).map_err(|e| ErrorChain(&e).to_string())?;
                let runtime = node.runtime(prepare.runtime).map_err(|e| ErrorChain(&e).to_string())?;
                runtime.prepare_image(&image).await.map_err(|e| ErrorChain(&e).to_string())
            };
            match prepared.await {
                Ok(()) => tracing::info!(image = %prepare.reference, "prepared for a move in {:?}", t.elapsed()),
                Err(e) => tracing::info!(image = %prepare.reference, "not prepared for a move (its restore will): {e}"),
            }
        });
    }

    /// Open the page link of announced move `transfer_id` to `relay`, its source's page
    /// relay (under TLS only `source`'s certificate is taken there); true when it is
    /// being opened. A link no restore took goes with the announcement's expiry.
    pub fn open_page_link(&self, transfer_id: &str, relay: std::net::SocketAddr, source: &str) -> bool {
        let Ok(channels) = self.channels() else { return false };
        let link = away_migrate::lazy::PageLink { channels, peer_node: source.to_string() };
        let mut links = self.page_links.lock().expect("page links lock");
        let expiry = self.config.transfers.expire_after;
        links.retain(|_, (at, _)| at.elapsed() < expiry);
        // announced again (a retry): the link opened the first time stands
        if links.contains_key(transfer_id) {
            return true;
        }
        if links.len() >= MAX_ANNOUNCED {
            return false;
        }
        tracing::debug!(transfer = transfer_id, %relay, "opening the move's page link");
        let early = away_migrate::lazy::early::EarlyLink::connect(relay, link);
        links.insert(transfer_id.to_string(), (std::time::Instant::now(), early));
        true
    }

    /// The page link announced move `transfer_id` opened, if it did.
    pub fn take_page_link(&self, transfer_id: &str) -> Option<away_migrate::lazy::early::EarlyLink> {
        self.page_links.lock().expect("page links lock").remove(transfer_id).map(|(_, l)| l)
    }

    /// The transfer receiver's check of a hello: an announced move, from its source
    /// node (under TLS, by the peer's certificate), with its secret.
    pub fn authorize(&self, claim: &away_migrate::transfer::Claim<'_>) -> Result<(), String> {
        let channels = self.channels()?;
        let id = claim.transfer_id;
        let announced = self.announced.lock().expect("announced lock");
        let Some(a) = announced.get(id).filter(|a| a.fresh(self.config.transfers.expire_after)) else {
            return Err(format!("transfer {id} was not announced to this agent (POST /v1/transfers)"));
        };
        if channels.is_tls() && !away_migrate::channel::peer_is(claim.peer_certs, &a.source) {
            return Err(format!("transfer {id} is announced from node {}, and this peer is not that node", a.source));
        }
        if !a.secret.matches(claim.secret) {
            return Err(format!("transfer {id}: wrong or missing move secret"));
        }
        Ok(())
    }

    /// The node move `transfer_id` was announced from.
    pub fn announced_source(&self, transfer_id: &str) -> Option<String> {
        self.announced.lock().expect("announced lock").get(transfer_id).map(|a| a.source.clone())
    }

    /// The channels a move from or to here uses, or why there are none: mutual TLS with
    /// the node's identity; plaintext only without one and with
    /// `--insecure-plaintext-channels`.
    pub fn channels(&self) -> Result<away_migrate::channel::Channels, String> {
        let channels = self.channels.borrow().clone();
        if channels.is_tls() || self.config.insecure_plaintext_channels {
            Ok(channels)
        } else {
            Err(NO_CHANNELS.to_string())
        }
    }

    /// The channels as they change (the transfer receiver takes them per connection).
    pub fn watch_channels(&self) -> tokio::sync::watch::Receiver<away_migrate::channel::Channels> {
        self.channels.subscribe()
    }

    /// The transfer address other agents should dial.
    pub fn transfer_addr(&self) -> String {
        self.config.transfer_advertise.clone().unwrap_or_else(|| self.config.transfer_listen.to_string())
    }

    /// Note an incoming copy as provisional in memory. The state database has it as a
    /// prepared move since its restore began ([`Agent::journal`]), so that an agent that
    /// dies before the copy is final removes it when it runs again
    /// ([`Agent::remove_leftovers`]), since its source resumes its own.
    async fn hold(&self, transfer_id: &str, p: &Provisional) {
        self.provisional.lock().await.insert(transfer_id.to_string(), p.clone());
    }

    /// Note on disk only: a restore of `p` begins, the move is `prepared` (an agent killed
    /// in the middle of it leaves a copy to remove when it runs again).
    pub fn journal(&self, transfer_id: &str, p: &Provisional) {
        let runtime = serde_json::to_value(p.runtime).ok().and_then(|v| v.as_str().map(str::to_string));
        if let Err(e) = self.state.hold_provisional(transfer_id, &p.workload, &runtime.unwrap_or_default()) {
            tracing::warn!(workload = %p.workload, "an agent restart would not know this copy is provisional: {e}", e = ErrorChain(&e));
        }
    }

    /// The move ends on disk, `committed` or `aborted` (why), unless it ended before.
    pub fn end_move(&self, transfer_id: &str, state: MoveState, reason: &str) -> Result<(), state::StateError> {
        if !self.state.end_move(transfer_id, state, reason)? {
            tracing::debug!(transfer = transfer_id, %state, "the move had ended already");
        }
        Ok(())
    }

    /// [`Agent::end_move`] where nobody waits for the answer: a failure is logged.
    pub(crate) fn end_move_logged(&self, transfer_id: &str, state: MoveState, reason: &str) {
        if let Err(e) = self.end_move(transfer_id, state, reason) {
            tracing::error!(transfer = transfer_id, %state, "cannot record the end of the move: {e}", e = ErrorChain(&e));
        }
    }

    /// Take a copy out of the provisional ones: whoever takes it first (the commit, the
    /// lease, an abort) decides the move. None when it is not held (decided before).
    async fn take(&self, transfer_id: &str) -> Option<Provisional> {
        self.provisional.lock().await.remove(transfer_id)
    }

    /// Remove a copy taken out of the provisional ones, then record its move as aborted
    /// (why): "aborted" means the copy is gone, so a source told so may resume at once. A
    /// copy that will not go keeps its move prepared (the source keeps asking; the next
    /// start of the agent tries again).
    pub async fn abort_copy(&self, transfer_id: &str, p: &Provisional, why: &str) -> bool {
        let removed = self.remove_copy(p).await;
        if removed {
            self.end_move_logged(transfer_id, MoveState::Aborted, why);
        }
        removed
    }

    /// Remove the copies a previous run of this agent held provisionally when it ended
    /// (killed in the middle of a move): no commit can take them any more (nothing holds
    /// them), and their moves are aborted once they are gone; their sources resume their
    /// own when they hear it. The copies go in the background; returns how many.
    pub fn remove_leftovers(self: &Arc<Self>) -> usize {
        match self.state.prune_moves(ENDED_MOVES_KEPT.as_millis() as u64) {
            Ok(0) => {}
            Ok(n) => tracing::info!("forgot {n} moves that ended more than a week ago"),
            Err(e) => tracing::warn!("cannot prune the ended moves: {e}", e = ErrorChain(&e)),
        }
        // a disk base half received or half imported when the last run ended
        match self.node.qemu().disk_store().remove_partial() {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} partial disk base copies the last run left"),
            Err(e) => tracing::warn!("cannot clean the disk store: {e}", e = ErrorChain(&e)),
        }
        // volume pre-copies of moves the last run did not restore: their checkpoints,
        // if they come, are refused (their sources keep their volumes)
        match std::fs::remove_dir_all(self.config.precopy_dir()) {
            Ok(()) => tracing::info!("removed the volume pre-copies the last run left"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the volume pre-copies the last run left: {e}"),
        }
        let left = match self.state.provisional_left() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot read the provisional copies of the last run: {e}", e = ErrorChain(&e));
                return 0;
            }
        };
        for (transfer_id, workload, runtime) in &left {
            let Ok(runtime) = serde_json::from_value(serde_json::Value::String(runtime.clone())) else {
                tracing::error!(workload, runtime, "a provisional copy of an unknown runtime is left alone");
                continue;
            };
            tracing::warn!(
                workload,
                transfer = transfer_id,
                "removing a copy the agent's last run left unfinished (the source keeps or resumes its own)"
            );
            let (agent, p, id) =
                (self.clone(), Provisional { workload: workload.clone(), runtime }, transfer_id.clone());
            tokio::spawn(async move {
                agent.abort_copy(&id, &p, "the target's agent restarted before the commit").await;
            });
        }
        left.len()
    }

    /// Hold `p` as provisional now (a commit may come as soon as the source has the
    /// answer) and remove it after the lease unless its move was committed meanwhile (the
    /// caller journaled the copy when its restore began).
    pub async fn arm_lease(self: &Arc<Self>, transfer_id: String, p: Provisional) {
        self.hold(&transfer_id, &p).await;
        let agent = self.clone();
        let lease = self.config.commit_lease;
        tokio::spawn(async move {
            tokio::time::sleep(lease).await;
            let why = format!("no commit from the source within the lease ({} s)", lease.as_secs());
            if agent.take(&transfer_id).await.is_some() {
                tracing::warn!(workload = %p.workload, transfer = %transfer_id, "{why}: removing the provisional copy (the source resumes its own)");
                agent.abort_copy(&transfer_id, &p, &why).await;
            }
        });
    }

    /// The lease of VM destination `name` (its move `vm-NAME`): once the held guest has
    /// arrived whole ([`away_migrate::vm::Destination::ready_at`]), a confirm must come
    /// within `commit_lease`, or the destination is removed and the move aborted (the
    /// source, which heard nothing, resumes its own after the lease it was given). A
    /// post-copy destination is not held: its move is committed once its guest runs. The
    /// watch looks every second and ends with the destination (confirmed, aborted).
    pub fn watch_vm_lease(self: &Arc<Self>, name: String) {
        let agent = self.clone();
        let lease = self.config.commit_lease;
        let id = api::vm_move_id(&name);
        tokio::spawn(async move {
            // post-copy: when the move was committed here
            let mut committed_at = None::<tokio::time::Instant>;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut destinations = agent.vm_destinations.lock().await;
                let Some(dest) = destinations.get_mut(&name) else {
                    drop(destinations);
                    match agent.move_record(&id) {
                        // out of the map while its source waits for it: look again
                        Ok(Some(r)) if r.state == MoveState::Prepared => continue,
                        _ => return,
                    }
                };
                if !dest.held() {
                    // post-copy: the guest runs here from the switchover on and the source
                    // no longer has all of it: the copy is final once it runs (no lease, and
                    // a restart must not remove it), like a lazy container move's. Its
                    // source's confirm is a formality; without one within the lease the
                    // destination is let go (its QMP session freed for `ps`, `stop`, ...)
                    if committed_at.is_none() && dest.wait_resumed(Duration::ZERO).await.is_ok() {
                        agent.end_move_logged(
                            &id,
                            MoveState::Committed,
                            "post-copy: the vm runs here since the switchover",
                        );
                        tracing::info!(workload = %name, "post-copy: the vm runs here, the move is final");
                        committed_at = Some(tokio::time::Instant::now());
                    }
                    if committed_at.is_some_and(|t| t.elapsed() >= lease) {
                        if let Some(dest) = destinations.remove(&name) {
                            tracing::warn!(workload = %name, "post-copy: no confirm from the source within the lease; the vm stays here");
                            dest.confirm();
                        }
                        return;
                    }
                    continue;
                }
                if dest.ready_at().is_none() && dest.held() {
                    // complete since the last look? (one query, not a wait)
                    let _ = dest.wait_resumed(Duration::ZERO).await;
                }
                let expired = dest.ready_at().is_some_and(|t| t.elapsed() >= lease);
                if !expired {
                    continue;
                }
                let Some(dest) = destinations.remove(&name) else { continue };
                drop(destinations);
                let why = format!("no confirm from the source within the lease ({} s)", lease.as_secs());
                tracing::warn!(workload = %name, "{why}: removing the vm destination (the source resumes its own)");
                match dest.abort().await {
                    Ok(()) => agent.end_move_logged(&id, MoveState::Aborted, &why),
                    Err(e) => {
                        tracing::error!(workload = %name, "cannot remove the vm destination: {e}", e = ErrorChain(&e))
                    }
                }
                return;
            }
        });
    }

    /// What the agent promises a source in its answer: no commit is taken after
    /// `commit_lease`, and the copy is gone [`REMOVAL_GRACE`] later. A source that could
    /// not deliver its commit resumes its own after this long.
    pub fn lease_promise(&self) -> Duration {
        self.config.commit_lease + REMOVAL_GRACE
    }

    /// The source commits: the provisional workload stays. Idempotent: asked again (its
    /// answer lost), it gives the move's state as it is on disk. None: an unknown move.
    pub async fn commit(&self, transfer_id: &str) -> Result<Option<MoveRecord>, state::StateError> {
        let mut held = self.provisional.lock().await;
        if let Some(p) = held.remove(transfer_id) {
            if let Err(e) = self.end_move(transfer_id, MoveState::Committed, "committed by its source") {
                // not committed: the lease stays armed and the source asks again
                held.insert(transfer_id.to_string(), p);
                return Err(e);
            }
        }
        drop(held);
        self.state.move_record(transfer_id)
    }

    /// What became of a move (None: never heard of, or forgotten a week after it ended).
    pub fn move_record(&self, transfer_id: &str) -> Result<Option<MoveRecord>, state::StateError> {
        self.state.move_record(transfer_id)
    }

    /// The source gives up: remove the provisional workload now. None if not held, else
    /// whether it went (a copy that did not keeps its move prepared). A pre-copy of the
    /// move's volumes goes in any case.
    pub async fn abort(&self, transfer_id: &str) -> Option<bool> {
        if let Some(dir) = self.precopy_dir(transfer_id) {
            self.drop_precopy_dir(&dir);
        }
        let p = self.take(transfer_id).await?;
        Some(self.abort_copy(transfer_id, &p, "aborted by its source").await)
    }

    /// A volume pre-copy for move `move_id` has arrived (the payload of its own transfer,
    /// announced from the move's source for the same workload): it waits under
    /// [`AgentConfig::precopy_dir`] for the move's checkpoint, whose restore takes it and
    /// removes it. An abort of the move, its expiry (the transfers' `expire_after`) or a
    /// restart of the agent remove it too.
    pub async fn keep_precopy(
        self: &Arc<Self>,
        payload: &away_migrate::transfer::ReceivedPayload,
        move_id: &str,
    ) -> away_migrate::transfer::Verdict {
        use away_migrate::transfer::Verdict;
        let (this, of_move) = {
            let announced = self.announced.lock().expect("announced lock");
            let get = |id: &str| announced.get(id).map(|a| (a.source.clone(), a.workload.clone()));
            (get(&payload.transfer_id), get(move_id))
        };
        if !precopy_allowed(move_id, this.as_ref(), of_move.as_ref()) {
            return Verdict::failed(format!(
                "transfer {} pre-copies volumes for move {move_id:?}, which was not announced to this agent by the \
                 same node for the same workload",
                payload.transfer_id
            ));
        }
        let root = self.config.precopy_dir();
        let dest = root.join(move_id);
        let kept = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&root).and_then(|()| {
            match std::fs::remove_dir_all(&dest) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => std::fs::rename(&payload.dir, &dest),
            }
        });
        if let Err(e) = kept {
            return Verdict::failed(format!("cannot keep the volume pre-copy in {}: {e}", dest.display()));
        }
        tracing::info!(transfer = %payload.transfer_id, r#move = move_id, bytes = payload.bytes_raw, "volume pre-copy kept for its move");
        let (agent, expiry) = (self.clone(), self.config.transfers.expire_after);
        tokio::spawn(async move {
            tokio::time::sleep(expiry).await;
            if dest.exists() {
                tracing::warn!(dir = %dest.display(), "a volume pre-copy whose move never restored here expired");
                agent.drop_precopy_dir(&dest);
            }
        });
        Verdict::ok(format!("volume pre-copy kept for move {move_id}"))
    }

    /// The pre-copy of move `transfer_id`'s volumes, if this node holds one.
    pub fn precopy_dir(&self, transfer_id: &str) -> Option<PathBuf> {
        let valid = !transfer_id.is_empty() && !transfer_id.contains(['/', '.']);
        let dir = self.config.precopy_dir().join(transfer_id);
        (valid && dir.is_dir()).then_some(dir)
    }

    /// Remove a pre-copy directory (its files are hard links: a volume placed from it
    /// keeps them).
    pub fn drop_precopy_dir(&self, dir: &std::path::Path) {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "volume pre-copy removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot remove the volume pre-copy: {e}"),
        }
    }

    /// Remove an uncommitted copy; retried for a minute (a lazily restored process whose
    /// page daemon died can take a while to die: its faults spin until the kernel has
    /// released its userfaultfd).
    pub async fn remove_copy(&self, p: &Provisional) -> bool {
        let Ok(rt) = self.node.runtime(p.runtime) else { return false };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match rt.remove(&p.workload).await {
                // already gone (another path removed it first): nothing left to do
                Ok(()) | Err(away_runtime::RuntimeError::NotFound { .. }) => return true,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    tracing::error!(workload = %p.workload, "cannot remove the uncommitted copy: {e}", e = ErrorChain(&e));
                    return false;
                }
                Err(e) => {
                    // what holds it (for the log): the process's state and where it waits
                    let pid = rt.status(&p.workload).await.ok().and_then(|s| s.pid);
                    let state = pid.map(|pid| {
                        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                        let line = st.lines().find(|l| l.starts_with("State:")).unwrap_or("").to_string();
                        format!("pid {pid} {line} wchan {wchan}")
                    });
                    tracing::warn!(workload = %p.workload, ?state, "removing the uncommitted copy, retrying: {e}", e = ErrorChain(&e));
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// A lazily restored workload: provisional while pages arrive (no lease: the lazy
    /// phase takes as long as the link needs). If the lazy-pages daemon fails, the copy
    /// misses memory and goes (the source resumes its own); if it ends well, the copy is
    /// final at once. The caller journaled the copy when its restore began.
    pub async fn watch_lazy(
        self: &Arc<Self>,
        transfer_id: String,
        p: Provisional,
        daemon: away_migrate::lazy::LazyPagesDaemon,
    ) {
        self.hold(&transfer_id, &p).await;
        let agent = self.clone();
        tokio::spawn(async move {
            match daemon.wait().await {
                Ok(()) => {
                    // every page is here, so the source's CRIU has ended the source process:
                    // this copy is the workload whether the source's commit arrives or not
                    // (a lease removing it could leave none)
                    if agent.take(&transfer_id).await.is_some() {
                        agent.end_move_logged(&transfer_id, MoveState::Committed, "every page arrived");
                    }
                    tracing::info!(workload = %p.workload, transfer = %transfer_id, "every page is in: the copy is final");
                }
                Err(e) => {
                    tracing::warn!(workload = %p.workload, transfer = %transfer_id, "lazy phase failed, removing the partial copy: {e}", e = ErrorChain(&e));
                    let why = format!("the lazy phase failed: {e}", e = ErrorChain(&e));
                    if agent.take(&transfer_id).await.is_some() {
                        agent.abort_copy(&transfer_id, &p, &why).await;
                    }
                }
            }
        });
    }
}

/// May a volume pre-copy whose transfer was announced as `this` (source node, workload)
/// be kept for move `move_id`, announced as `of_move`? Only for a move id of the
/// transfer protocol's form, announced by the same node for the same workload: a node
/// cannot park files under another node's move, nor under a path.
fn precopy_allowed(move_id: &str, this: Option<&(String, String)>, of_move: Option<&(String, String)>) -> bool {
    let valid_id = !move_id.is_empty()
        && move_id.len() <= 64
        && move_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    valid_id && this.is_some() && this == of_move
}

/// How long API requests under way may take to finish once the agent stops.
const API_DRAIN: Duration = Duration::from_secs(10);

/// Run the agent until `stop` resolves (with the name of what stopped it, e.g. "SIGTERM"):
/// HTTP API and transfer receiver. Stopping is graceful: no new request or transfer is
/// taken, requests and restores under way finish (bounded), transfers still receiving
/// keep their spools for their senders to resume from the next start, VM destinations
/// that do not run yet are removed (their sources keep their VMs), and the workloads
/// keep running. What is not final stays journaled for the next start.
pub async fn run(
    config: AgentConfig,
    stop: impl std::future::Future<Output = &'static str> + Send + 'static,
) -> Result<(), AgentError> {
    let http = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| AgentError::Bind { addr: config.listen.to_string(), source: e })?;
    let transfer = tokio::net::TcpListener::bind(config.transfer_listen)
        .await
        .map_err(|e| AgentError::Bind { addr: config.transfer_listen.to_string(), source: e })?;
    let agent = Agent::open(config).await?;
    agent.remove_leftovers();
    // before the first heartbeat: a repeated order of a journaled move must find it claimed
    let open = agent.finish_outgoing().await;
    if open > 0 {
        tracing::warn!(open, "outgoing moves the last run left open are being finished");
    }
    tracing::info!(name = %agent.config.name, api = %agent.config.listen, transfer = %agent.config.transfer_listen, "agent up");
    let (stopped_tx, stopped) = tokio::sync::watch::channel(None::<&'static str>);
    tokio::spawn(async move {
        let why = stop.await;
        stopped_tx.send_replace(Some(why));
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<Option<&'static str>>| async move {
        let _ = rx.wait_for(Option::is_some).await;
    };
    let heartbeats = agent.config.broker.clone().map(|link| tokio::spawn(broker::run(agent.clone(), link)));
    // overlay workloads come from a broker: their published ports too
    let published = agent.config.broker.is_some().then(|| tokio::spawn(published::run(agent.clone())));
    let mut receiver = {
        let (agent, stop) = (agent.clone(), until_stopped(stopped.clone()));
        tokio::spawn(async move { api::serve_transfers(agent, transfer, stop).await })
    };
    let app = api::router(agent.clone()).into_make_service_with_connect_info::<away_identity::serve::TlsPeer>();
    let http = away_identity::serve::Listener::watching(http, agent.tls.subscribe())
        .map_err(|e| AgentError::Bind { addr: agent.config.listen.to_string(), source: e })?;
    let mut server =
        tokio::spawn(axum::serve(http, app).with_graceful_shutdown(until_stopped(stopped.clone())).into_future());
    // The stop ends the server too and both wake this task: a server found ended is a
    // failure only when no stop was asked for.
    let mut server_ended = false;
    let why = {
        let mut rx = stopped.clone();
        tokio::select! {
            biased;
            why = rx.wait_for(Option::is_some) => why.ok().and_then(|w| *w).unwrap_or("stop"),
            served = &mut server => {
                server_ended = true;
                let stop = *stopped.borrow();
                match stop {
                    Some(why) => why,
                    None => {
                        receiver.abort();
                        heartbeats.inspect(|h| h.abort());
                        published.inspect(|h| h.abort());
                        let message = match served {
                            Ok(Ok(())) => "the API server ended".to_string(),
                            Ok(Err(e)) => e.to_string(),
                            Err(e) => e.to_string(),
                        };
                        return Err(AgentError::Serve(message));
                    }
                }
            }
        }
    };
    tracing::info!(signal = why, "agent stopping: no new API requests or transfers; what is under way finishes");
    // (a finished task's handle must not be polled again)
    if !server_ended && tokio::time::timeout(API_DRAIN, &mut server).await.is_err() {
        tracing::warn!("API requests still open after {} s: closing them", API_DRAIN.as_secs());
        server.abort();
    }
    let busy = match (&mut receiver).await {
        Ok(open) => open,
        Err(e) => {
            tracing::error!("the transfer receiver failed: {e}");
            0
        }
    };
    for h in [heartbeats, published].into_iter().flatten() {
        h.abort();
    }
    let vm_removed = agent.stop_vm_destinations().await;
    let provisional = agent.provisional.lock().await.len();
    tracing::info!(
        signal = why,
        provisional,
        vm_destinations_removed = vm_removed,
        transfers_cut_in_restore = busy,
        "agent stopped cleanly: workloads keep running; copies not committed yet stay journaled for the next start"
    );
    Ok(())
}

impl Agent {
    /// At a stop: a VM destination that does not run yet is removed (its source's
    /// migration fails and the source keeps its VM); one that runs is the VM now and stays.
    /// Returns how many were removed.
    async fn stop_vm_destinations(&self) -> usize {
        let destinations: Vec<_> = self.vm_destinations.lock().await.drain().collect();
        let mut removed = 0;
        for (name, mut dest) in destinations {
            if dest.wait_resumed(Duration::ZERO).await.is_ok() && !dest.held() {
                tracing::info!(workload = %name, "vm destination runs: it stays (the VM lives here now)");
                dest.confirm();
                continue;
            }
            match dest.abort().await {
                Ok(()) => {
                    removed += 1;
                    self.end_move_logged(
                        &api::vm_move_id(&name),
                        MoveState::Aborted,
                        "the target's agent stopped before the commit",
                    );
                    tracing::info!(workload = %name, "vm destination not running yet: removed (its source keeps the VM)");
                }
                Err(e) => tracing::error!(workload = %name, "cannot remove a vm destination: {e}", e = ErrorChain(&e)),
            }
        }
        removed
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent server failed: {0}")]
    Serve(String),
    #[error(transparent)]
    State(state::StateError),
    #[error("the node identity")]
    Identity(#[source] away_identity::IdentityError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_precopy_is_kept_only_for_a_move_of_the_same_node_and_workload() {
        let of = |node: &str, w: &str| Some((node.to_string(), w.to_string()));
        let a = of("a", "web");
        assert!(precopy_allowed("f00d-1_2", a.as_ref(), a.as_ref()));
        assert!(!precopy_allowed("f00d", a.as_ref(), of("b", "web").as_ref()), "another node's move");
        assert!(!precopy_allowed("f00d", a.as_ref(), of("a", "db").as_ref()), "another workload");
        assert!(!precopy_allowed("f00d", a.as_ref(), None), "a move never announced");
        assert!(!precopy_allowed("f00d", None, None), "a transfer never announced");
        for bad in ["", "../x", "a/b", ".", &"x".repeat(65)] {
            assert!(!precopy_allowed(bad, a.as_ref(), a.as_ref()), "{bad:?}");
        }
    }
}
