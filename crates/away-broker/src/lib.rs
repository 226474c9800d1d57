//! The away broker: decides where workloads run across cloud, edge and client nodes,
//! and remembers it.
//!
//! * [`api`]: the HTTP JSON API under `/v1` for users (nodes, workloads, migrations,
//!   events) and agents (register, heartbeat), plus `/metrics` and the OpenAPI document;
//! * [`dashboard`]: the web page at `/` that drives that same API with a user token;
//! * [`placement`]: two-phase placement (filters with reasons, then scores with parts);
//! * [`broker`]: the state and what requests do to it;
//! * [`reconcile`]: the offline-first reconciliation rules of heartbeats, as a pure function;
//! * [`store`]: the state in one SQLite file;
//! * [`group_commit`]: concurrent submissions share one durable transaction.
//!
//! Agents pull (see `away_model::cluster`): the broker never dials an agent except to
//! proxy a user's request for logs.

pub mod api;
pub mod broker;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod group_commit;
pub mod metrics;
pub mod move_plan;
pub mod overlay;
pub mod placement;
pub mod reconcile;
pub mod records;
pub mod store;
pub mod tokens;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use api::router;
pub use broker::{Broker, MigrationRequest, NodeView, WorkloadView};
pub use error::{BrokerError, Problem};
pub use events::BrokerEvent;
pub use placement::PlacementDecision;
pub use records::{MigrationRecord, MigrationState};

/// Where the broker keeps its state unless told otherwise.
pub const DEFAULT_DB_PATH: &str = "/var/lib/away/broker.db";

/// How a broker runs.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub db_path: PathBuf,
    /// Admin tokens users present (`Authorization: Bearer`): the user API and managing
    /// join and user tokens. Per-user tokens are made over the API and kept in the
    /// database; with neither, no user gets in.
    pub user_tokens: Vec<String>,
    /// Token agents present to register.
    pub join_token: String,
    /// How often agents are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a node counts as offline (e.g. three missed heartbeats).
    pub node_timeout: Duration,
    /// Experiment results (`docs/results`) the dashboard shows read-only to signed-in users.
    pub results_dir: Option<PathBuf>,
    /// The CA that issues node certificates at join and the broker's own certificate:
    /// HTTPS, node certificates required for heartbeats, mutual TLS to agents. None
    /// (`--insecure-loopback`, in-process tests): plain HTTP with bearer tokens only.
    pub tls: Option<BrokerTls>,
    /// Lab networks on a VXLAN overlay (docs/network.md): every workload without
    /// published ports and every node gets an address. None: no overlay, workloads use
    /// their node's network.
    pub overlay: Option<overlay::OverlayConfig>,
}

/// The broker's CA and its own identity (server and client certificate).
#[derive(Clone)]
pub struct BrokerTls {
    pub ca: Arc<away_identity::Ca>,
    pub identity: away_identity::Identity,
}

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerTls").field("ca", &self.ca.fingerprint()).field("identity", &self.identity).finish()
    }
}

impl BrokerConfig {
    /// Defaults for everything but the secrets: port 7070 on all interfaces, the
    /// default database, 2 s heartbeats, offline after 3 missed ones.
    pub fn new(user_tokens: Vec<String>, join_token: String) -> BrokerConfig {
        let heartbeat_interval = Duration::from_secs(2);
        BrokerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 7070)),
            db_path: PathBuf::from(DEFAULT_DB_PATH),
            user_tokens,
            join_token,
            heartbeat_interval,
            node_timeout: heartbeat_interval * 3,
            results_dir: None,
            tls: None,
            overlay: None,
        }
    }
}

/// Serve on an already bound listener until the process ends (tests bind port 0).
pub async fn serve(broker: Arc<Broker>, listener: tokio::net::TcpListener) -> Result<(), BrokerError> {
    serve_until(broker, listener, std::future::pending()).await
}

/// How long requests under way (event streams stay open forever) may take once the
/// broker stops.
const STOP_DRAIN: Duration = Duration::from_secs(5);

/// [`serve`] until `stop` resolves; then no new connection is taken and requests under
/// way get [`STOP_DRAIN`] to finish (event streams are closed after it).
pub async fn serve_until(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), BrokerError> {
    // weak: the ticker must not keep a stopped broker (and its database) alive
    let ticker = Arc::downgrade(&broker);
    let every = broker.config.heartbeat_interval.max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        loop {
            interval.tick().await;
            match ticker.upgrade() {
                Some(b) => b.tick(),
                None => break,
            }
        }
    });
    let (stopped_tx, mut stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        stop.await;
        stopped_tx.send_replace(true);
    };
    let tls = match &broker.config.tls {
        // users come with bearer tokens, agents with their certificates
        Some(t) => Some(
            t.identity.server_config_client_optional().map_err(|e| BrokerError::Config(away_model::error_chain(&e)))?,
        ),
        None => None,
    };
    let listener = away_identity::serve::Listener::watching(listener, tokio::sync::watch::channel(tls).1)
        .map_err(|source| BrokerError::Config(format!("listener: {source}")))?;
    let app = router(broker).into_make_service_with_connect_info::<away_identity::serve::TlsPeer>();
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let drained = async {
        if stopped.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(STOP_DRAIN).await;
    };
    tokio::select! {
        served = std::future::IntoFuture::into_future(server) => served.map_err(BrokerError::Serve),
        () = drained => {
            tracing::info!("requests still open {} s after the stop (event streams): closed", STOP_DRAIN.as_secs());
            Ok(())
        }
    }
}

/// Open the state and serve the API on `config.listen` until `stop` resolves (with the
/// name of what stopped it, e.g. "SIGTERM"); then requests under way finish and the
/// database is closed.
pub async fn run(
    config: BrokerConfig,
    stop: impl std::future::Future<Output = &'static str> + Send + 'static,
) -> Result<(), BrokerError> {
    let addr = config.listen;
    let broker = Arc::new(
        tokio::task::spawn_blocking(move || Broker::open(config))
            .await
            .map_err(|e| BrokerError::Config(format!("opening the state failed: {e}")))??,
    );
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| BrokerError::Listen { addr, source })?;
    tracing::info!(%addr, "broker listening");
    let (why_tx, why_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        let why = stop.await;
        tracing::info!(signal = why, "broker stopping: no new requests; those under way finish");
        let _ = why_tx.send(why);
    };
    serve_until(broker, listener, stop).await?;
    let why = why_rx.await.unwrap_or("stop");
    tracing::info!(signal = why, "broker stopped cleanly: every answered request is in the database");
    Ok(())
}
