//! `away node`: the broker's nodes (`/v1/nodes`), listed and revoked with a user token
//! from the environment.

use std::process::ExitCode;

use anyhow::Context;
use away_model::NodeView;

use crate::output::print_json;
use crate::token::BrokerArgs;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List the broker's nodes: state (online, offline, revoked), draining, workloads
    List {
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print the nodes as JSON
        #[arg(long)]
        json: bool,
    },
    /// Revoke a node's certificate: for a lost or stolen node (or its key)
    ///
    /// The broker puts the node's certificates on its CA's revocation list: it refuses
    /// them at the TLS handshake at once, and every agent does from its next heartbeat on
    /// (its API, transfer port, page relays, its calls to other nodes, QEMU's migration
    /// TLS). The node's agent token and key are forgotten and it counts as offline:
    /// nothing new is placed there, and its workloads stay there (`node-offline`) until
    /// you remove them or move them (a move needs its source: a revoked node cannot take
    /// part any more). Revoking it again changes nothing.
    ///
    /// The same name may join again, with a join token and a new key: on that node, stop
    /// the agent, remove STATE_DIR/identity (key.pem, cert.pem, crl.pem) and start it with
    /// AWAY_JOIN_TOKEN (the revoked key is refused).
    ///
    /// It needs an admin token (one of the broker's --user-token) in AWAY_USER_TOKEN; a
    /// user's own token is refused (403).
    ///
    /// Example:
    ///   export AWAY_USER_TOKEN=…
    ///   away node revoke laptop-anna --broker https://10.0.0.1:7700 --ca ca.pem
    #[command(verbatim_doc_comment)]
    Revoke {
        /// The node's name, as `away node list` shows it
        name: String,
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print the revoked node as JSON
        #[arg(long)]
        json: bool,
    },
}

/// A client of the broker for `away node`.
fn client(broker: &BrokerArgs) -> anyhow::Result<away_client::Client> {
    broker.client_needing(
        "away node needs a token of the broker (list: any user token; revoke: an admin token, one of its \
         --user-token)",
    )
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match cmd {
            Command::List { broker, json } => {
                let nodes = client(&broker)?.nodes().await.context("list nodes")?;
                if json {
                    print_json(&nodes)?;
                } else {
                    print_list(&nodes);
                }
            }
            Command::Revoke { name, broker, json } => {
                let n = client(&broker)?.revoke_node(&name).await.with_context(|| format!("revoke node {name}"))?;
                if json {
                    print_json(&n)?;
                } else {
                    println!(
                        "node {} revoked: its certificate is refused by the broker now and by every agent from its \
                         next heartbeat; it is offline{}",
                        n.name,
                        if n.workloads.is_empty() {
                            String::new()
                        } else {
                            format!(" and its workloads ({}) stay there until removed", n.workloads.join(", "))
                        }
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `revoked`, else the broker's `online` / `offline`.
fn state(n: &NodeView) -> &str {
    if n.revoked_ms.is_some() {
        "revoked"
    } else {
        &n.state
    }
}

fn print_list(nodes: &[NodeView]) {
    if nodes.is_empty() {
        println!("no nodes have joined this broker");
        return;
    }
    println!("{:<24} {:<8} {:<9} WORKLOADS", "NAME", "STATE", "DRAINING");
    for n in nodes {
        println!(
            "{:<24} {:<8} {:<9} {}",
            n.name,
            state(n),
            if n.draining { "yes" } else { "no" },
            if n.workloads.is_empty() { "-".to_string() } else { n.workloads.join(",") }
        );
    }
}
