//! `away cluster`: a broker and N agents on this machine, each agent in its own network
//! namespace with its own containerd (see the away-cluster crate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use away_cluster::{ClusterPlan, NodePlan};
use away_model::Tier;

use crate::output::print_json;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Start a broker and agents, each agent in its own network namespace
    ///
    /// Example: away cluster up --node cloud=cloud --node laptop=client --image out/labdesk.tar
    Up {
        /// Cluster name (letters and digits, at most 10)
        #[arg(long, default_value = "local")]
        name: String,
        /// A node as NAME=TIER (cloud, edge or client); repeat for each node
        #[arg(long = "node", value_name = "NAME=TIER", required = true)]
        nodes: Vec<String>,
        /// An image tar every node's store gets (repeatable; there is no registry)
        #[arg(long = "image", value_name = "TAR")]
        images: Vec<PathBuf>,
        /// Run the lab networks on a VXLAN overlay with addresses from this pool, e.g.
        /// 10.250.0.0/16 (the broker's --overlay; docs/network.md)
        #[arg(long, value_name = "POOL")]
        overlay: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stop a cluster's processes and remove its namespaces, bridge and firewall rule
    Down {
        #[arg(long, default_value = "local")]
        name: String,
    },
    /// Show a running cluster (broker URL, user token, nodes)
    Status {
        #[arg(long, default_value = "local")]
        name: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn parse_node(s: &str) -> anyhow::Result<NodePlan> {
    let (name, tier) = s.split_once('=').with_context(|| format!("--node {s:?}: expected NAME=TIER"))?;
    let tier: Tier = serde_json::from_value(serde_json::Value::String(tier.into()))
        .map_err(|_| anyhow::anyhow!("--node {s:?}: tier must be cloud, edge or client"))?;
    Ok(NodePlan { name: name.into(), tier })
}

/// `away cluster up` with Ctrl-C and SIGTERM alike ending the start at its next step and
/// undoing it: Ok(Err(signal)) then.
fn up_until_stopped(plan: &ClusterPlan) -> anyhow::Result<Result<away_cluster::ClusterInfo, &'static str>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // before anything is started: from here on a stop signal undoes the start
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut starting = {
        let (plan, stop) = (plan.clone(), stop.clone());
        rt.spawn_blocking(move || away_cluster::up_until(&plan, &stop))
    };
    rt.block_on(async {
        let why = tokio::select! {
            done = &mut starting => return Ok(Ok(done??)),
            why = stops.next() => why,
        };
        eprintln!("{why}: stopping the start of cluster {}", plan.name);
        stop.store(true, Ordering::SeqCst);
        match starting.await? {
            Err(away_cluster::ClusterError::Stopped) => Ok(Err(why)),
            // it was up before the stop was seen: a stop undoes it all the same
            Ok(_) => {
                // (down runs a runtime of its own: not on this one's thread)
                let name = plan.name.clone();
                tokio::task::spawn_blocking(move || away_cluster::down(&name)).await?;
                Ok(Err(why))
            }
            Err(e) => Err(e.into()),
        }
    })
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Up { name, nodes, images, overlay, json } => {
            let plan = ClusterPlan {
                name,
                nodes: nodes.iter().map(|n| parse_node(n)).collect::<anyhow::Result<_>>()?,
                away: std::env::current_exe()?,
                images,
                overlay,
            };
            let info = match up_until_stopped(&plan)? {
                Ok(info) => info,
                Err(why) => {
                    eprintln!("{why}: cluster {} was being started; what it started is stopped and removed", plan.name);
                    return Ok(ExitCode::from(if why == "SIGINT" { 130 } else { 143 }));
                }
            };
            if json {
                print_json(&info)?;
            } else {
                println!("cluster {} is up; broker {}", info.name, info.broker_url);
                println!("  user token: in /run/away/cluster/{}/cluster.json", info.name);
                for n in &info.nodes {
                    println!("  {:<10} {:<7} {} (netns {})", n.name, n.tier.to_string(), n.api, n.netns);
                }
            }
        }
        Command::Down { name } => {
            away_cluster::down(&name);
            println!("cluster {name} is down");
        }
        Command::Status { name, json } => {
            let info = away_cluster::info(&name).with_context(|| format!("cluster {name} is not up"))?;
            if json {
                print_json(&info)?;
            } else {
                println!("cluster {}: broker {}", info.name, info.broker_url);
                for n in &info.nodes {
                    println!("  {:<10} {:<7} {}", n.name, n.tier.to_string(), n.api);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
