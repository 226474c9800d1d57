//! `away broker`: the HTTP broker that places workloads across nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Run the broker: the HTTP JSON API under /v1 (nodes, workloads, migrations, events),
/// /metrics, the agents' registration and heartbeats, and the web dashboard at /
/// (sign in with a user token). State lives in SQLite.
///
/// The tokens are secrets: give them by environment (AWAY_JOIN_TOKEN, AWAY_USER_TOKEN),
/// not as flags, which every user of the machine sees in `ps`.
///
/// Examples:
///   export AWAY_JOIN_TOKEN=$(cat /proc/sys/kernel/random/uuid) AWAY_USER_TOKEN=$(cat /proc/sys/kernel/random/uuid)
///   away broker &
///   curl -H "Authorization: Bearer $AWAY_USER_TOKEN" http://127.0.0.1:7700/v1/nodes
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct BrokerArgs {
    /// Address of the HTTP API
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// SQLite database file
    #[arg(long, env = "AWAY_BROKER_DB", default_value = "/var/lib/away/broker.db")]
    db: PathBuf,
    /// Token agents present to register
    #[arg(long, env = "AWAY_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    /// A token users present (repeatable)
    #[arg(long = "user-token", env = "AWAY_USER_TOKEN", hide_env_values = true, required = true)]
    user_tokens: Vec<String>,
    /// Seconds between agent heartbeats
    #[arg(long, default_value_t = 1.0)]
    heartbeat_interval: f64,
    /// Experiment results directory (e.g. docs/results) the dashboard shows, read-only, to signed-in users
    #[arg(long, value_name = "DIR")]
    results: Option<PathBuf>,
}

pub fn run(a: BrokerArgs) -> anyhow::Result<ExitCode> {
    let interval = Duration::from_secs_f64(a.heartbeat_interval.max(0.1));
    let mut config = away_broker::BrokerConfig::new(a.user_tokens, a.join_token);
    config.listen = a.listen;
    config.db_path = a.db;
    config.heartbeat_interval = interval;
    config.node_timeout = interval * 3 + Duration::from_secs(2);
    if let Some(dir) = &a.results {
        anyhow::ensure!(dir.is_dir(), "--results {}: not a directory", dir.display());
    }
    config.results_dir = a.results;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // before anything is started: SIGTERM, like Ctrl-C, stops the broker gracefully
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    eprintln!("away broker on http://{}", config.listen);
    rt.block_on(away_broker::run(config, async move { stops.next().await }))?;
    Ok(ExitCode::SUCCESS)
}
