//! Ports that overlay workloads publish on their node (docs/network.md). Such a workload
//! lives in its own network namespace (a container) or guest (a VM on a tap), so its `ports:` are not the node's: the agent
//! listens on each published port and relays every connection to the workload's overlay
//! address. A relay in user space, as Docker's docker-proxy is, rather than DNAT rules:
//! nothing is left in the node's firewall after a crash, and it follows the workload by
//! itself: once a move has stopped the source's copy, the source's sync drops the
//! listener, and the target's sync opens it once the restored copy runs.
//!
//! The port is the workload's own service, open to whoever reaches the node, as with
//! Docker's published ports: it carries none of away's channels (those are all mutual
//! TLS, docs/security.md).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use away_runtime::containerd::PublishedPort;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::Agent;

/// How often the listeners are matched to the running workloads: a moved workload's port
/// opens on its target within this after the restore.
const SYNC_EVERY: Duration = Duration::from_millis(250);
/// A workload that does not accept within this is treated as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Keep one listener per published port of every running overlay workload, until stopped.
pub async fn run(agent: Arc<Agent>) {
    let mut active: HashMap<PublishedPort, JoinHandle<()>> = HashMap::new();
    // ports that could not be bound, said once until they bind or go away
    let mut refused: HashSet<PublishedPort> = HashSet::new();
    loop {
        let mut want = Vec::new();
        let mut listed = true;
        if let Some(containerd) = agent.node.containerd() {
            match containerd.published_overlay_ports().await {
                Ok(p) => want.extend(p),
                Err(e) => {
                    listed = false;
                    tracing::debug!("published ports: cannot list the containers: {e}");
                }
            }
        }
        // VMs on a lab network too: their guest has the overlay address, not the node
        match agent.node.qemu().published_overlay_ports().await {
            Ok(p) => want.extend(p),
            Err(e) => {
                listed = false;
                tracing::debug!("published ports: cannot list the vms: {e}");
            }
        }
        // a runtime that cannot list keeps its ports as they are rather than closing them
        if listed {
            sync(&mut active, &mut refused, want).await;
        }
        tokio::time::sleep(SYNC_EVERY).await;
    }
}

async fn sync(
    active: &mut HashMap<PublishedPort, JoinHandle<()>>,
    refused: &mut HashSet<PublishedPort>,
    want: Vec<PublishedPort>,
) {
    let want: HashSet<PublishedPort> = want.into_iter().collect();
    active.retain(|p, relay| {
        let keep = want.contains(p) && !relay.is_finished();
        if !keep {
            relay.abort();
            tracing::info!(workload = %p.workload, port = p.host, "published port closed");
        }
        keep
    });
    refused.retain(|p| want.contains(p));
    for p in want {
        if active.contains_key(&p) {
            continue;
        }
        match TcpListener::bind(("0.0.0.0", p.host)).await {
            Ok(listener) => {
                refused.remove(&p);
                tracing::info!(workload = %p.workload, port = p.host, to = %p.to, "published port open");
                active.insert(p.clone(), tokio::spawn(relay(listener, p)));
            }
            Err(e) => {
                if refused.insert(p.clone()) {
                    tracing::warn!(workload = %p.workload, port = p.host, "cannot publish the port on this node: {e}");
                }
            }
        }
    }
}

/// Accept on the node's port and copy each connection to and from the workload.
async fn relay(listener: TcpListener, p: PublishedPort) {
    loop {
        let (mut client, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(workload = %p.workload, port = p.host, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let p = p.clone();
        tokio::spawn(async move {
            let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(p.to)).await;
            match upstream {
                Ok(Ok(mut upstream)) => {
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                        tracing::debug!(workload = %p.workload, %from, "published port connection: {e}");
                    }
                }
                Ok(Err(e)) => tracing::debug!(workload = %p.workload, to = %p.to, %from, "connect: {e}"),
                Err(_) => tracing::debug!(workload = %p.workload, to = %p.to, %from, "connect: timed out"),
            }
        });
    }
}
