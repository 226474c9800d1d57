//! `away agent`, `away migrate`, `away archives`: moving workloads between nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use away_agent::client::AgentClient;
use away_agent::AgentConfig;
use away_migrate::archive::ArchiveStore;
use away_migrate::container::{migrate_container, ContainerMigrationOptions, Step};
use away_migrate::mode::ContainerMode;
use away_migrate::transfer::{Compression, Faults, ReceiveOptions, SendOptions};
use away_model::{ByteSize, MigrationReport, Tier};
use away_runtime::{LocalNode, NodeOptions};

use crate::output::print_json;

/// Where this node keeps its daemons' sockets and its state (shared by agent and migrate).
#[derive(clap::Args, Clone)]
pub struct NodeArgs {
    /// containerd namespace of away's workloads
    #[arg(long, env = "AWAY_NAMESPACE", default_value = "away")]
    namespace: String,
    /// State directory (image store, logs, checkpoints, transfer spool)
    #[arg(long, env = "AWAY_STATE_DIR", default_value = "/var/lib/away")]
    state_dir: PathBuf,
    /// Per-boot state (QEMU pidfiles and sockets)
    #[arg(long, env = "AWAY_RUN_DIR", default_value = "/run/away")]
    run_dir: PathBuf,
    /// containerd's socket
    #[arg(long, env = "AWAY_CONTAINERD_SOCKET", default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// dockerd's socket
    #[arg(long, env = "AWAY_DOCKER_SOCKET", default_value = "/run/docker.sock")]
    docker_socket: PathBuf,
}

impl NodeArgs {
    pub fn options(&self) -> NodeOptions {
        let mut o =
            NodeOptions { namespace: self.namespace.clone(), run_dir: self.run_dir.clone(), ..Default::default() };
        o.paths.state_dir = self.state_dir.clone();
        o.paths.containerd_socket = self.containerd_socket.clone();
        o.paths.docker_socket = self.docker_socket.clone();
        o
    }
}

/// Run the node daemon: an HTTP API for the broker and other agents, and a transfer
/// receiver that restores incoming migrations on this node.
///
/// Examples:
///   away agent --name cloud-1 --tier cloud
///   away agent --name laptop --tier client --listen 0.0.0.0:7800 --transfer-listen 0.0.0.0:7801
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct AgentArgs {
    /// Node name [default: the hostname]
    #[arg(long)]
    name: Option<String>,
    /// Where the node stands: cloud, edge or client
    #[arg(long, default_value = "cloud", value_parser = parse_tier)]
    tier: Tier,
    /// HTTP API address
    #[arg(long, default_value = "127.0.0.1:7800")]
    listen: SocketAddr,
    /// Transfer (incoming migrations) address
    #[arg(long, default_value = "127.0.0.1:7801")]
    transfer_listen: SocketAddr,
    /// Address other nodes dial for transfers [default: --transfer-listen]
    #[arg(long)]
    transfer_advertise: Option<String>,
    /// Seconds an incoming workload waits for its source's commit before it is removed
    #[arg(long, default_value_t = 30)]
    commit_lease: u64,
    /// The broker to work for, e.g. https://10.0.0.1:7700 (without it the agent runs
    /// standalone); the agent joins it once with the join token and a CSR, and keeps the
    /// certificate it gets in STATE_DIR/identity
    #[arg(long)]
    broker: Option<String>,
    /// The broker's CA certificate (its ca.pem), the only root trusted to join it
    #[arg(long, env = "AWAY_CA", value_name = "FILE", requires = "broker")]
    ca: Option<PathBuf>,
    /// Join token the broker expects at registration
    #[arg(long, env = "AWAY_JOIN_TOKEN", hide_env_values = true, requires = "broker")]
    join_token: Option<String>,
    /// Standalone agents: a bearer token every API call must present
    #[arg(long, env = "AWAY_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Incoming transfers unfinished at once (a sender connected, or its spool waiting
    /// for it to come back); a hello for one more is refused
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    max_transfers: u32,
    /// Connections to the transfer port at once, handshakes included; more are refused
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_transfer_connections: u32,
    /// Spool space all incoming transfers may reserve together: each reserves twice its
    /// payload (the stream and its unpacked copy) before a byte of it is accepted
    #[arg(long, default_value = "128Gi")]
    max_spool: ByteSize,
    /// Largest payload (checkpoint) a sender may announce
    #[arg(long, default_value = "64Gi")]
    max_transfer_size: ByteSize,
    /// Seconds from a connection to the transfer port to its first frame
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    transfer_handshake_timeout: u64,
    /// Seconds an unfinished transfer waits without its sender before its spool is
    /// removed (spools an earlier run left too)
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    transfer_expiry: u64,
    /// Without a node identity (STATE_DIR/identity, from joining a broker), take and
    /// make migrations in PLAINTEXT: anyone on the path reads the workload's memory and
    /// can change it. Each move still needs its announcement and one-time secret.
    /// Without an identity and without this flag the agent takes part in no migration
    /// (docs/security.md, "Migration channels"); with an identity they are mutual TLS
    #[arg(long)]
    insecure_plaintext_channels: bool,
    #[command(flatten)]
    node: NodeArgs,
}

/// The node identity in `dir`, which must be node `name`'s (peers check the name).
fn load_identity(dir: &std::path::Path, name: &str) -> anyhow::Result<away_identity::Identity> {
    let identity = away_identity::Identity::load(dir)
        .with_context(|| format!("load the node identity in {}", dir.display()))?
        .with_context(|| format!("no node identity in {} (cert.pem missing)", dir.display()))?;
    if identity.name() != name {
        anyhow::bail!(
            "the identity in {} is node {:?}'s, not {name:?}'s (peers check the name): give --source-name {:?}",
            dir.display(),
            identity.name(),
            identity.name()
        );
    }
    Ok(identity)
}

fn parse_mode(s: &str) -> Result<ContainerMode, String> {
    s.parse()
}

fn parse_optimize(s: &str) -> Result<away_model::Optimize, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?}: expected total or downtime"))
}

fn parse_tier(s: &str) -> Result<Tier, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?}: expected cloud, edge or client"))
}

pub fn agent(a: AgentArgs) -> anyhow::Result<ExitCode> {
    let name = a.name.clone().unwrap_or_else(hostname);
    let ca = match &a.ca {
        Some(path) => Some(away_identity::read_ca_file(path)?),
        None => None,
    };
    let identity_dir = away_agent::AgentConfig::identity_dir_in(&a.node.state_dir);
    let has_identity = away_identity::Identity::load(&identity_dir).ok().flatten().is_some();
    if !has_identity && a.insecure_plaintext_channels {
        eprintln!(
            "away agent: WARNING: --insecure-plaintext-channels: until this node has an identity, migrations to and \
             from it cross the network in PLAINTEXT (workload memory readable and changeable on the path)"
        );
    } else if !has_identity && a.broker.is_none() {
        eprintln!("away agent: {}", away_agent::NO_CHANNELS);
    }
    let config = AgentConfig {
        name,
        tier: a.tier,
        listen: a.listen,
        transfer_listen: a.transfer_listen,
        transfer_advertise: a.transfer_advertise,
        node: a.node.options(),
        commit_lease: Duration::from_secs(a.commit_lease),
        broker: a.broker.map(|url| away_agent::broker::BrokerLink {
            url: url.trim_end_matches('/').to_string(),
            join_token: a.join_token.unwrap_or_default(),
            ca,
        }),
        api_token: a.token,
        transfers: ReceiveOptions {
            max_transfers: a.max_transfers as usize,
            max_connections: a.max_transfer_connections as usize,
            max_spool_bytes: a.max_spool.bytes(),
            max_payload_bytes: a.max_transfer_size.bytes(),
            handshake_timeout: Duration::from_secs(a.transfer_handshake_timeout),
            expire_after: Duration::from_secs(a.transfer_expiry),
            ..ReceiveOptions::default()
        },
        insecure_plaintext_channels: a.insecure_plaintext_channels,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // before anything is started: SIGTERM, like Ctrl-C, stops the agent gracefully
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    eprintln!(
        "away agent {} ({}): api http://{}, transfers {}",
        config.name, config.tier, config.listen, config.transfer_listen
    );
    rt.block_on(away_agent::run(config, async move { stops.next().await }))?;
    Ok(ExitCode::SUCCESS)
}

/// Move a running workload to another node, keeping its state.
///
/// Containers move by CRIU checkpoint/restore, in one of these modes (`--mode`):
///   stop-copy  the source stops, its whole state travels compressed and checksummed
///              to the target agent, which restores it: the pause grows with the
///              workload's memory and the link. On containerd it is streamed: the
///              pages go from CRIU's page server straight into the target's images
///              while CRIU dumps the rest, nothing is staged on disk.
///   staged     stop-copy through a checkpoint on disk: dump, transfer, restore in
///              turn (Docker always moves this way).
///   lazy       (containerd) everything but memory travels, the target restores at
///              once and its memory follows, compressed and prefetched, the pages the
///              workload writes first; the frozen source serves them until the last
///              one moved (a failure before that resumes the source).
///   auto       (default) measures the workload's writes and the round trip and
///              takes lazy unless page faults would stall it more than half the time.
/// The source is removed only after the target confirms; on any failure the source
/// resumes (from its checkpoint, or CRIU thaws it in lazy mode) and a partial copy on
/// the target is removed. There is no pre-copy: see `away doctor` (soft-dirty tracking).
///
/// `--cancel ID --broker URL` cancels a broker migration (`DELETE /v1/migrations/ID`,
/// user token from AWAY_USER_TOKEN) instead: one its source has not received yet, or one
/// whose source node is offline, ends at once; one an online source is moving is aborted
/// by that source before its commit point (it resumes, the target removes its copy) and
/// ends `cancelled`, or `succeeded` if the move had committed. The workload stays where
/// its source reports it.
///
/// Examples:
///   away migrate counter --to 10.0.0.2:7800
///   away migrate counter --to 10.0.0.2:7800 --plan
///   away migrate --cancel m-1a2b3c --broker http://127.0.0.1:7700
///   away migrate counter --to 10.0.0.2:7800 --mode lazy --json
///   away migrate counter --to 127.0.0.1:7810 --mode stop-copy --compression gzip
///   away migrate myvm --to 10.0.0.2:7800 --multifd 4 --compression zstd
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct MigrateArgs {
    /// The workload to move
    #[arg(required_unless_present_any = ["cancel", "recover"])]
    workload: Option<String>,
    /// The target agent's API address (host:port)
    #[arg(long, required_unless_present_any = ["cancel", "recover"])]
    to: Option<String>,
    /// Finish the moves a killed `away migrate` left open on this node (its journal in
    /// STATE_DIR/agent.db): ask each target what became of the move, then commit, remove
    /// the source's copy, or run the workload here again; never a second copy. The
    /// node's agent does the same when it starts
    #[arg(long, conflicts_with_all = ["workload", "to", "cancel"])]
    recover: bool,
    /// Cancel broker migration ID (with --broker) instead of moving a workload
    #[arg(long, value_name = "ID", conflicts_with_all = ["workload", "to"], requires = "broker", help_heading = "Broker migrations")]
    cancel: Option<String>,
    /// The broker's URL (https://host:port), for --cancel
    #[arg(long, value_name = "URL", requires = "cancel", help_heading = "Broker migrations")]
    broker: Option<String>,
    /// The broker's CA certificate (its ca.pem), the only root trusted for it
    #[arg(long, env = "AWAY_CA", value_name = "FILE", help_heading = "Broker migrations")]
    ca: Option<PathBuf>,
    /// A user token of the broker, for --cancel: set AWAY_USER_TOKEN rather than give
    /// it here, where every user of the machine can read it
    #[arg(long = "user-token", env = "AWAY_USER_TOKEN", hide_env_values = true, help_heading = "Broker migrations")]
    user_token: Option<String>,
    /// This node's identity (ca.pem, cert.pem, key.pem) [default: STATE_DIR/identity
    /// when this node joined a broker]: the target's API and the migration's channels
    /// are mutual TLS, the target checked by its node name (--to-node). Without one the
    /// API is plain HTTP with --token and the channels are PLAINTEXT, which a target
    /// takes only when started with --insecure-plaintext-channels. Its ca.pem is also
    /// the broker's CA for --cancel when --ca is not given
    #[arg(long, value_name = "DIR")]
    identity: Option<std::path::PathBuf>,
    /// With an identity: the target's node name, which its certificate must carry
    #[arg(long, value_name = "NAME")]
    to_node: Option<String>,
    /// Bearer token of the target agent's API (its cluster's, or its --token)
    #[arg(long, env = "AWAY_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Containers: stop-copy (streamed on containerd), staged, lazy (containerd;
    /// restore at once, pages follow) or auto
    #[arg(long, default_value_t = ContainerMode::Auto, value_parser = parse_mode)]
    mode: ContainerMode,
    /// Compression of the checkpoint stream: zstd[:LEVEL], gzip[:LEVEL] or none. The
    /// page stream of streamed and lazy moves is zstd:1 when this is given and not none;
    /// left out, zstd:1 too, except towards a target on this host (a loopback address),
    /// where the compressor is slower than the link [default: zstd:1].
    /// VMs: multifd's compression (zstd[:1-20], gzip[:LEVEL] as QEMU's zlib, or none;
    /// needs --multifd) [default: none]
    #[arg(long)]
    compression: Option<Compression>,
    /// Name of this node in the report [default: the hostname]
    #[arg(long)]
    source_name: Option<String>,
    /// Print the migration report as JSON
    #[arg(long)]
    json: bool,
    /// Do not move: measure the workload and the link to the target and print the
    /// predicted total time, downtime, degraded time and bytes of every way it could
    /// move, with the inputs used and the way --mode would take (containers)
    #[arg(long)]
    plan: bool,
    /// With --plan: name the way with the least total time or downtime as the choice
    #[arg(long, value_name = "total|downtime", requires = "plan", value_parser = parse_optimize)]
    optimize: Option<away_model::Optimize>,
    /// (testing) drop the link once after N chunks
    #[arg(long, hide = true)]
    fault_cut_after: Option<u64>,
    /// (testing) corrupt chunk N once
    #[arg(long, hide = true)]
    fault_corrupt_chunk: Option<u64>,
    /// (testing) chunk size in bytes
    #[arg(long, hide = true)]
    chunk_size: Option<u64>,
    /// Seconds to keep retrying a cut link before giving up (the source then resumes)
    #[arg(long, default_value_t = 60)]
    reconnect_timeout: u64,
    /// Seconds to keep asking a target that went silent after a commit that may have
    /// reached it; then the move is reported in doubt: the source neither resumes nor
    /// is removed, its checkpoint stays (a VM stays paused) (docs/reliability.md)
    /// [default: 300 for containers, 120 for VMs]
    #[arg(long, value_name = "SECONDS")]
    commit_wait: Option<u64>,
    /// VM: throttle the guest's vCPUs when pre-copy does not converge
    #[arg(long, help_heading = "VM live migration")]
    auto_converge: bool,
    /// VM: send only the changed bytes of pages sent before (xbzrle)
    #[arg(long, help_heading = "VM live migration")]
    xbzrle: bool,
    /// VM: send RAM over N parallel connections (multifd); --compression zstd
    /// compresses them
    #[arg(long, value_name = "N", help_heading = "VM live migration")]
    multifd: Option<u32>,
    /// VM: switch to post-copy after the first pre-copy pass
    #[arg(long, help_heading = "VM live migration")]
    postcopy: bool,
    /// VM: longest pause allowed for the final copy, in ms
    #[arg(long, value_name = "MS", help_heading = "VM live migration")]
    max_downtime: Option<u64>,
    /// VM: bandwidth cap, e.g. 4Mi (bytes per second)
    #[arg(long, value_name = "BYTES", help_heading = "VM live migration")]
    bandwidth: Option<away_model::ByteSize>,
    /// VM: cancel a migration still in pre-copy after this many seconds (the VM keeps
    /// running on the source)
    #[arg(long, default_value_t = 600, value_name = "SECONDS", help_heading = "VM live migration")]
    timeout: u64,
    /// VM: forward this host port on the target instead of the source's, GUEST:HOST
    #[arg(long = "target-port", value_name = "GUEST:HOST", help_heading = "VM live migration")]
    target_ports: Vec<String>,
    #[command(flatten)]
    node: NodeArgs,
}

pub fn migrate(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if let (Some(id), Some(broker)) = (&a.cancel, &a.broker) {
        // the broker's CA: --ca, else the one in --identity (it issued the node's certificate)
        let ca = a.ca.clone().or_else(|| a.identity.as_ref().map(|dir| dir.join("ca.pem")));
        return rt.block_on(cancel(broker, ca.as_deref(), a.user_token.as_deref(), id, a.json));
    }
    if a.recover {
        return rt.block_on(recover(&a));
    }
    // clap requires both unless --cancel or --recover is given
    let (Some(workload), Some(to)) = (a.workload.clone(), a.to.clone()) else {
        anyhow::bail!("give the workload to move and --to, or --cancel ID --broker URL");
    };
    let node = rt.block_on(LocalNode::open(a.node.options()));
    if let Some((away_model::RuntimeKind::Qemu, _)) = rt.block_on(node.find(&workload))? {
        let source_name = a.source_name.clone().unwrap_or_else(hostname);
        let identity = source_identity(&a, &source_name)?;
        let target = rt.block_on(target_client(&a, identity.as_ref(), &to))?;
        if a.plan {
            let opts = vm_options(&a)?;
            let plan = rt.block_on(away_migrate::estimate::plan_vm(
                &node,
                &source_name,
                &workload,
                &target,
                &opts,
                a.optimize,
            ))?;
            return show_plan(&plan, a.json);
        }
        let channels = channels_of(identity.as_ref(), "the VM's memory")?;
        return rt.block_on(migrate_vm(&node, &a, &workload, target, &channels));
    }
    let archives = ArchiveStore::new(a.node.state_dir.join("checkpoints"));
    let source_name = a.source_name.clone().unwrap_or_else(hostname);
    let identity = source_identity(&a, &source_name)?;
    let target = rt.block_on(target_client(&a, identity.as_ref(), &to))?;
    let channels = if a.plan && identity.is_none() {
        away_migrate::channel::Channels::plaintext()
    } else {
        channels_of(identity.as_ref(), "the checkpoint")?
    };
    if a.plan {
        let (plan, _, _) = rt.block_on(away_migrate::estimate::plan_container(
            &node,
            &source_name,
            &workload,
            &target,
            a.mode,
            a.optimize,
        ))?;
        return show_plan(&plan, a.json);
    }
    let opts = ContainerMigrationOptions {
        transfer: SendOptions {
            channels,
            compression: a.compression.unwrap_or_default(),
            chunk_size: a.chunk_size.unwrap_or(1 << 20),
            reconnect_timeout: Duration::from_secs(a.reconnect_timeout),
            faults: Faults {
                cut_after_chunks: a.fault_cut_after,
                corrupt_chunk: a.fault_corrupt_chunk,
                ..Default::default()
            },
            ..Default::default()
        },
        settle: None,
        close_connections: false,
        mode: a.mode,
        compress_pages: a.compression.map(|c| c != Compression::None),
        commit_wait: a.commit_wait.map(Duration::from_secs).unwrap_or(ContainerMigrationOptions::default().commit_wait),
        cancel: Default::default(),
        predict: true,
        // each step on disk: `away migrate --recover` (or the agent's next start)
        // finishes a move this process could not
        journal: Some(local_journal(&a.node.state_dir, &to)?),
    };
    let bar = progress_bar(a.json);
    let pb = bar.clone();
    let progress: away_migrate::container::ProgressFn = Arc::new(move |step| match step {
        Step::Checking => pb.set_message("checking compatibility"),
        Step::SendingImage => pb.set_message("sending the image (the workload still runs)"),
        Step::Checkpointing => pb.set_message("checkpointing"),
        Step::Transferring { sent, total } => {
            pb.set_message("transferring");
            pb.set_length(total);
            pb.set_position(sent);
        }
        Step::Paging { moved, total } => {
            pb.set_message("running on the target, memory arriving");
            pb.set_length(total.max(moved));
            pb.set_position(moved);
        }
        Step::Streaming { moved, total } => {
            pb.set_message("stopped, memory streaming into the target's images");
            pb.set_length(total.max(moved));
            pb.set_position(moved);
        }
        Step::Committing => pb.set_message("committing"),
        Step::Cleaning => pb.set_message("removing the source"),
        Step::RollingBack(why) => pb.set_message(format!("rolling back: {why}")),
    });
    let result = rt.block_on(migrate_container(&node, &source_name, &archives, &workload, &target, &opts, progress));
    finish(bar, result?, a.json)
}

/// The identity a move from here uses: `--identity DIR`, else this node's own
/// (`STATE_DIR/identity`, from joining a broker) when it has one.
fn source_identity(a: &MigrateArgs, source_name: &str) -> anyhow::Result<Option<away_identity::Identity>> {
    if let Some(dir) = &a.identity {
        return load_identity(dir, source_name).map(Some);
    }
    let own = away_agent::AgentConfig::identity_dir_in(&a.node.state_dir);
    match away_identity::Identity::load(&own).ok().flatten() {
        Some(id) if a.source_name.is_none() || id.name() == source_name => Ok(Some(id)),
        _ => Ok(None),
    }
}

/// The channels of a move from here: mutual TLS with `identity`, else plaintext (said
/// on stderr: `what` crosses the network readable by anyone on the path).
fn channels_of(
    identity: Option<&away_identity::Identity>,
    what: &str,
) -> anyhow::Result<away_migrate::channel::Channels> {
    match identity {
        Some(id) => {
            away_migrate::channel::Channels::from_identity(id).context("the TLS configuration of the node identity")
        }
        None => {
            eprintln!("away migrate: no node identity: {what} crosses the network in PLAINTEXT");
            Ok(away_migrate::channel::Channels::plaintext())
        }
    }
}

/// The target agent's API client: with an identity, mutual TLS to node `--to-node` (the
/// handshake checks its certificate names it); without one, plain HTTP with `--token`
/// (a standalone agent's).
async fn target_client(
    a: &MigrateArgs,
    identity: Option<&away_identity::Identity>,
    to: &str,
) -> anyhow::Result<AgentClient> {
    match (identity, &a.to_node) {
        (Some(id), Some(node)) => AgentClient::for_node(id, node, to)
            .await
            .with_context(|| format!("a mutual TLS client of node {node:?} at {to}")),
        (Some(id), None) => anyhow::bail!(
            "this move uses node {:?}'s identity: name the target node with --to-node NAME (its certificate is \
             checked for that name)",
            id.name()
        ),
        (None, _) => Ok(AgentClient::new(to).with_token(a.token.clone())),
    }
}

async fn migrate_vm(
    node: &LocalNode,
    a: &MigrateArgs,
    workload: &str,
    client: AgentClient,
    channels: &away_migrate::channel::Channels,
) -> anyhow::Result<ExitCode> {
    let source_name = a.source_name.clone().unwrap_or_else(hostname);
    let opts = vm_options(a)?;
    let bar = progress_bar(a.json);
    let pb = bar.clone();
    let progress = move |p: away_migrate::vm::VmProgress| {
        pb.set_message(format!("vm {} pass {}", p.status, p.pass));
        pb.set_length(p.transferred + p.remaining);
        pb.set_position(p.transferred);
    };
    let result = away_agent::client::migrate_vm_via_agent(
        node,
        &source_name,
        workload,
        client,
        channels,
        opts,
        Default::default(),
        Some(local_journal(&a.node.state_dir, a.to.as_deref().unwrap_or_default())?),
        progress,
    )
    .await;
    finish(bar, result?, a.json)
}

/// The VM live-migration options of `away migrate`'s flags.
fn vm_options(a: &MigrateArgs) -> anyhow::Result<away_migrate::vm::VmMigrationOptions> {
    let mut target_ports = std::collections::BTreeMap::new();
    for p in &a.target_ports {
        let (g, h) = p.split_once(':').ok_or_else(|| anyhow::anyhow!("--target-port {p:?}: expected GUEST:HOST"))?;
        target_ports.insert(g.parse()?, h.parse()?);
    }
    if a.compression.is_some_and(|c| c != Compression::None) && a.multifd.is_none() {
        anyhow::bail!("--compression for a VM compresses multifd's channels: add --multifd N (e.g. --multifd 2)");
    }
    Ok(away_migrate::vm::VmMigrationOptions {
        auto_converge: a.auto_converge,
        xbzrle: a.xbzrle,
        multifd: a.multifd,
        multifd_compression: a.compression,
        postcopy: a.postcopy,
        max_downtime_ms: a.max_downtime,
        bandwidth_limit_bytes_per_s: a.bandwidth.map(|b| b.bytes()),
        timeout: Duration::from_secs(a.timeout),
        target_ports,
        commit_wait: a.commit_wait.map(Duration::from_secs).unwrap_or(away_migrate::vm::DEFAULT_VM_COMMIT_WAIT),
        predict: true,
        ..Default::default()
    })
}

/// The journal of this node's outgoing moves (`STATE_DIR/agent.db`, shared with its
/// agent), writing to target API `to`.
fn local_journal(state_dir: &std::path::Path, to: &str) -> anyhow::Result<Arc<dyn away_migrate::journal::MoveJournal>> {
    let db = state_dir.join("agent.db");
    let state = away_agent::state::AgentState::open(&db).with_context(|| {
        format!("the journal of this node's moves ({}): a move is not started without it", db.display())
    })?;
    Ok(Arc::new(away_agent::outgoing::LocalJournal { state, target_api: to.to_string() }))
}

/// `away migrate --recover`: finish every move this node's journal has open, one after
/// the other, and say how each ended.
async fn recover(a: &MigrateArgs) -> anyhow::Result<ExitCode> {
    let node = LocalNode::open(a.node.options()).await;
    let archives = ArchiveStore::new(a.node.state_dir.join("checkpoints"));
    let db = a.node.state_dir.join("agent.db");
    let state = away_agent::state::AgentState::open(&db).with_context(|| format!("the journal {}", db.display()))?;
    let open = state.outgoing(false).with_context(|| format!("the open moves in {}", db.display()))?;
    let source_name = a.source_name.clone().unwrap_or_else(hostname);
    let identity = source_identity(a, &source_name)?;
    let mut ended = Vec::new();
    let mut failed = false;
    for (m, _, target_api) in open {
        if !a.json {
            eprintln!(
                "away migrate: move {} of {} to {} ({}) was left {}: finishing it",
                m.transfer_id,
                m.workload,
                m.target_node,
                target_api,
                m.state.as_str()
            );
        }
        let target = match &identity {
            Some(id) => AgentClient::for_node(id, &m.target_node, &target_api)
                .await
                .with_context(|| format!("a mutual TLS client of node {:?} at {target_api}", m.target_node))?,
            None => AgentClient::new(&target_api).with_token(a.token.clone()),
        };
        let journal =
            away_agent::outgoing::LocalJournal { state: away_agent::state::AgentState::open(&db)?, target_api };
        // after a commit that may have arrived it asks until the target answers (every
        // 30 s); Ctrl-C leaves the move open for the next run
        let recovered =
            away_agent::client::recover_move(&node, &archives, &target, m.clone(), &journal, Duration::from_secs(30))
                .await;
        let (kind, message) = away_agent::outgoing::recovered_event(&m, recovered);
        failed |= kind == "migration-in-doubt";
        if !a.json {
            println!("{} {}: {kind}: {message}", m.transfer_id, m.workload);
        }
        ended.push(serde_json::json!({"transfer_id": m.transfer_id, "workload": m.workload, "target": m.target_node, "outcome": kind, "message": message}));
    }
    if a.json {
        print_json(&ended)?;
    } else if ended.is_empty() {
        println!("no open moves in {}", db.display());
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// A transfer progress bar on stderr (hidden with --json: stdout is the report).
/// `away migrate --cancel ID`: `DELETE /v1/migrations/ID` on the broker.
async fn cancel(
    broker: &str,
    ca: Option<&std::path::Path>,
    token: Option<&str>,
    id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Some(token) = token else {
        anyhow::bail!("--cancel needs a user token of the broker: set AWAY_USER_TOKEN");
    };
    let ca = match ca {
        Some(path) => Some(away_identity::read_ca_file(path)?),
        None => None,
    };
    let client = away_client::Client::with_ca(broker, token, ca.as_deref())?;
    let m = client.cancel_migration(id).await.with_context(|| format!("cancel migration {id}"))?;
    if json {
        print_json(&m)?;
    } else if m.state.is_active() {
        println!(
            "migration {} of {}: source node {} is told to abort the move before its commit point; it ends \
             cancelled (or succeeded, if the move had committed): GET /v1/migrations/ID shows which",
            m.id, m.workload, m.source
        );
    } else {
        println!(
            "migration {} {}: {} stays on {}: {}",
            m.id,
            m.state.as_str(),
            m.workload,
            m.source,
            m.error.as_deref().unwrap_or("cancelled")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(json: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {bytes}/{total_bytes} {bar:30} {bytes_per_sec}")
            .expect("template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn finish(bar: indicatif::ProgressBar, report: MigrationReport, json: bool) -> anyhow::Result<ExitCode> {
    bar.finish_and_clear();
    if json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "node".into())
}

/// `--plan`'s answer: JSON for scripts, else the table.
fn show_plan(plan: &away_model::MovePlan, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(plan)?;
    } else {
        print_plan(plan);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_plan(p: &away_model::MovePlan) {
    let i = &p.inputs;
    println!("{} from {} to {}: predicted, nothing moved", p.workload, p.source, p.target);
    println!(
        "  inputs:  state {} (zstd:1 to {:.0} %), writes {:.2} MB/s{}, link {:.1} Mbit/s, round trip {:.2} ms",
        away_model::ByteSize(i.state_bytes).human(),
        i.compress_ratio * 100.0,
        i.dirty_bytes_per_s / 1e6,
        i.dirty_set_bytes.map(|b| format!(" to a set of {}", away_model::ByteSize(b).human())).unwrap_or_default(),
        i.link_bytes_per_s * 8.0 / 1e6,
        i.rtt_ms
    );
    for (name, how) in &i.sources {
        println!("    {name:<18} {how}");
    }
    println!("  {:<20} {:>9} {:>11} {:>11} {:>10}  note", "way", "total s", "downtime s", "degraded s", "wire MiB");
    for x in &p.predictions {
        let mark = if Some(x.kind) == p.chosen { "*" } else { " " };
        println!(
            "{mark} {:<20} {:>9.2} {:>11.3} {:>11.2} {:>10.1}  {}{}",
            x.kind.as_str(),
            x.total_ms as f64 / 1e3,
            x.downtime_ms as f64 / 1e3,
            x.degraded_ms as f64 / 1e3,
            x.bytes_wire as f64 / 1048576.0,
            if x.converges { "" } else { "does not converge: " },
            x.note
        );
    }
    println!("  (total: from the first check to the workload running on the target with all its state; the settle wait, commit and cleanup after it are not in it)");
    if let Some(k) = p.chosen {
        println!("  chosen:  {k}: {}", p.why);
    }
}

fn print_report(r: &MigrationReport) {
    println!(
        "{} moved from {} to {} ({}) in {:.2} s",
        r.workload,
        r.source,
        r.target,
        r.mode,
        r.total_millis as f64 / 1000.0
    );
    println!("  why:       {}", r.reason);
    println!("  downtime:  {:.3} s", r.downtime_millis as f64 / 1000.0);
    if r.degraded_millis > 0 {
        println!("  degraded:  {:.3} s (running on the target while pages arrived)", r.degraded_millis as f64 / 1000.0);
    }
    let ratio = if r.bytes_raw > 0 { r.bytes_wire as f64 / r.bytes_raw as f64 * 100.0 } else { 0.0 };
    println!(
        "  state:     {} raw, {} on the wire ({ratio:.0} %)",
        away_model::ByteSize(r.bytes_raw).human(),
        away_model::ByteSize(r.bytes_wire).human()
    );
    if r.paged_bytes_raw > 0 {
        println!("  paged:     {} raw over the page link", away_model::ByteSize(r.paged_bytes_raw).human());
    }
    if let Some(v) = &r.volumes {
        println!(
            "  volumes:   {} pre-copied before the freeze ({} on the wire), {} in {} files during it ({} files kept from the pre-copy, {} deleted)",
            away_model::ByteSize(v.precopy_bytes_raw).human(),
            away_model::ByteSize(v.precopy_bytes_wire).human(),
            away_model::ByteSize(v.frozen_bytes_raw).human(),
            v.frozen_files,
            v.precopied_files,
            v.deleted_files
        );
    }
    if let Some(n) = &r.network {
        let follow = match n.follow_millis {
            Some(ms) => format!(
                "answered the source node {:.3} s after the resume ({:.3} s after the freeze)",
                ms as f64 / 1000.0,
                n.unanswered_millis.unwrap_or(0) as f64 / 1000.0
            ),
            None => format!("did not answer the source node within {:.0} s", n.probe_millis as f64 / 1000.0),
        };
        println!(
            "  network:   {} before, {} after ({}, network {}); {follow}",
            n.ip_before, n.ip_after, n.mac, n.network
        );
    }
    if let Some(p) = &r.predicted {
        println!(
            "  predicted: {} running there with all its state after {:.2} s (the move's time above also has the settle wait, commit and cleanup), downtime {:.3} s, degraded {:.2} s, {} on the wire",
            p.kind,
            p.total_ms as f64 / 1e3,
            p.downtime_ms as f64 / 1e3,
            p.degraded_ms as f64 / 1e3,
            away_model::ByteSize(p.bytes_wire).human()
        );
    }
    for p in &r.phases {
        println!("  {:<10} {:>8.3} s", p.name, p.millis as f64 / 1000.0);
        for part in &p.parts {
            println!("    {:<18} {:>8.3} s", part.name, part.millis as f64 / 1000.0);
        }
    }
}

/// List or prune checkpoint archives (they hold process memory).
#[derive(clap::Subcommand)]
pub enum ArchivesCommand {
    /// List archives: moves in progress and the ones kept after failed moves
    List {
        #[arg(long, env = "AWAY_STATE_DIR", default_value = "/var/lib/away")]
        state_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Delete kept archives, oldest first, down to a total size
    Prune {
        #[arg(long, env = "AWAY_STATE_DIR", default_value = "/var/lib/away")]
        state_dir: PathBuf,
        /// Keep at most this much, e.g. 0 or 2Gi
        #[arg(long, default_value = "0B")]
        keep: away_model::ByteSize,
        #[arg(long)]
        json: bool,
    },
}

pub fn archives(cmd: ArchivesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ArchivesCommand::List { state_dir, json } => {
            let list = ArchiveStore::new(state_dir.join("checkpoints")).list()?;
            if json {
                print_json(&list)?;
            } else {
                println!("{:<8} {:>10} {:>8}  PATH", "STATE", "SIZE", "AGE");
                for e in list {
                    println!(
                        "{:<8} {:>10} {:>7}s  {}",
                        e.state,
                        away_model::ByteSize(e.bytes).human(),
                        e.age_seconds,
                        e.path.display()
                    );
                }
            }
        }
        ArchivesCommand::Prune { state_dir, keep, json } => {
            let gone = ArchiveStore::new(state_dir.join("checkpoints")).prune(keep.bytes())?;
            if json {
                print_json(&gone)?;
            } else {
                for e in &gone {
                    println!("deleted {} ({})", e.path.display(), away_model::ByteSize(e.bytes).human());
                }
                println!("{} archive(s) deleted", gone.len());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
