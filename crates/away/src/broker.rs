//! `away broker`: the HTTP broker that places workloads across nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

/// Run the broker: the HTTP JSON API under /v1 (nodes, workloads, migrations, events),
/// /metrics, the agents' registration and heartbeats, and the web dashboard at /
/// (sign in with a user token), over HTTPS. State lives in SQLite.
///
/// The broker keeps a CA (--ca-dir, made on the first start) that issues each agent its
/// node certificate when it joins, and its own certificate; its CA certificate is
/// written as ca.pem next to the database: clients trust that file (--ca, AWAY_CA).
/// --insecure-loopback serves plain HTTP instead, only on a loopback address.
///
/// The tokens are secrets: give them by environment (AWAY_JOIN_TOKEN, AWAY_USER_TOKEN),
/// not as flags, which every user of the machine sees in `ps`.
///
/// Examples:
///   export AWAY_JOIN_TOKEN=$(cat /proc/sys/kernel/random/uuid) AWAY_USER_TOKEN=$(cat /proc/sys/kernel/random/uuid)
///   away broker --db /var/lib/away/broker.db &
///   curl --cacert /var/lib/away/ca.pem -H "Authorization: Bearer $AWAY_USER_TOKEN" https://127.0.0.1:7700/v1/nodes
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct BrokerArgs {
    /// Address of the HTTP API
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// SQLite database file
    #[arg(long, env = "AWAY_BROKER_DB", default_value = "/var/lib/away/broker.db")]
    db: PathBuf,
    /// Token agents present to register (the bootstrap token; `away token create` makes
    /// more, which expire and can be revoked)
    #[arg(long, env = "AWAY_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    /// An admin token (repeatable): the user API and managing tokens; `away token create
    /// --user NAME` makes per-user tokens, which expire and can be revoked
    #[arg(long = "user-token", env = "AWAY_USER_TOKEN", hide_env_values = true, required = true)]
    user_tokens: Vec<String>,
    /// Seconds between agent heartbeats
    #[arg(long, default_value_t = 1.0)]
    heartbeat_interval: f64,
    /// Experiment results directory (e.g. docs/results) the dashboard shows, read-only, to signed-in users
    #[arg(long, value_name = "DIR")]
    results: Option<PathBuf>,
    /// The CA's directory (ca.pem, ca.key; made 0700 on the first start) [default: ca/
    /// next to the database]
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// More names clients reach the broker at, for its certificate (IP addresses or DNS
    /// names; the listen address, 127.0.0.1 and localhost are in it already)
    #[arg(long = "san", value_name = "NAME")]
    sans: Vec<String>,
    /// Plain HTTP, no CA, no node certificates: only with a loopback --listen address,
    /// for a broker nothing outside this machine reaches
    #[arg(long)]
    insecure_loopback: bool,
    /// Run lab networks on a VXLAN overlay with addresses from this pool (e.g.
    /// 10.250.0.0/16; each network is a /24 of it): every workload without `ports:` gets
    /// its own network namespace, IP and MAC, which move with it (docs/network.md)
    #[arg(long, value_name = "POOL")]
    overlay: Option<String>,
    /// VXLAN's UDP port on every node (with --overlay)
    #[arg(long, default_value_t = away_broker::overlay::DEFAULT_PORT, requires = "overlay")]
    overlay_port: u16,
}

/// The names in the broker's certificate: its listen address when it is one, loopback's
/// names when it listens there (or everywhere), and `--san`.
fn broker_sans(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut sans = Vec::new();
    let ip = listen.ip();
    if !ip.is_unspecified() {
        sans.push(ip.to_string());
    }
    if ip.is_unspecified() || ip.is_loopback() {
        sans.extend(["127.0.0.1".to_string(), "localhost".to_string()]);
    }
    for s in extra {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    sans.dedup();
    sans
}

fn broker_tls(a: &BrokerArgs) -> anyhow::Result<Option<away_broker::BrokerTls>> {
    if a.insecure_loopback {
        anyhow::ensure!(
            a.listen.ip().is_loopback(),
            "--insecure-loopback serves plain HTTP: only on a loopback address, not {}",
            a.listen
        );
        eprintln!("away broker: --insecure-loopback: plain HTTP, no node certificates (loopback only)");
        return Ok(None);
    }
    let db_dir = a.db.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let ca_dir = a.ca_dir.clone().unwrap_or_else(|| db_dir.join("ca"));
    let ca = away_identity::Ca::load_or_create(&ca_dir)
        .with_context(|| format!("the broker's CA in {}", ca_dir.display()))?;
    // users and the cluster point their clients at this copy
    let ca_pem = db_dir.join("ca.pem");
    if !db_dir.exists() {
        away_identity::private_dir(db_dir)?;
    }
    std::fs::write(&ca_pem, ca.cert_pem()).with_context(|| format!("writing {}", ca_pem.display()))?;
    let identity = ca.issue_self(away_identity::BROKER_NAME, &broker_sans(a.listen, &a.sans))?;
    Ok(Some(away_broker::BrokerTls { ca: std::sync::Arc::new(ca), identity }))
}

pub fn run(a: BrokerArgs) -> anyhow::Result<ExitCode> {
    let interval = Duration::from_secs_f64(a.heartbeat_interval.max(0.1));
    let tls = broker_tls(&a)?;
    let mut config = away_broker::BrokerConfig::new(a.user_tokens, a.join_token);
    config.listen = a.listen;
    config.db_path = a.db.clone();
    config.heartbeat_interval = interval;
    config.node_timeout = interval * 3 + Duration::from_secs(2);
    if let Some(dir) = &a.results {
        anyhow::ensure!(dir.is_dir(), "--results {}: not a directory", dir.display());
    }
    config.tls = tls;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    config.results_dir = a.results;
    if let Some(pool) = &a.overlay {
        let (pool, pool_prefix) =
            away_broker::overlay::OverlayConfig::parse_pool(pool).map_err(|why| anyhow::anyhow!("--overlay {why}"))?;
        anyhow::ensure!(a.overlay_port != 0, "--overlay-port 0 is not a port");
        config.overlay = Some(away_broker::overlay::OverlayConfig {
            pool,
            pool_prefix,
            port: a.overlay_port,
            first_vni: away_broker::overlay::DEFAULT_FIRST_VNI,
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // before anything is started: SIGTERM, like Ctrl-C, stops the broker gracefully
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    eprintln!("away broker on {scheme}://{}", config.listen);
    if let Some(tls) = &config.tls {
        eprintln!("  CA {} (sha256 {})", config.db_path.with_file_name("ca.pem").display(), tls.ca.fingerprint());
    }
    rt.block_on(away_broker::run(config, async move { stops.next().await }))?;
    Ok(ExitCode::SUCCESS)
}
