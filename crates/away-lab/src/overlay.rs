//! `--overlay on`: the two nodes of a run joined by a VXLAN overlay across the packet
//! link, as agents build it from a broker's answer (docs/network.md): in each side's
//! namespace a VXLAN device and bridge with the node's own overlay address and the
//! other side as its one peer. The workload gets its own namespace on it (its address
//! in its spec, as a broker would give it), moved with it.

use std::net::Ipv4Addr;

use away_model::{NodeOverlay, OverlayAddress};

use crate::link::PacketSides;

/// The lab network's identifier and VXLAN port.
const VNI: u32 = 4900;
const PORT: u16 = 4799;

/// Address `last` of the lab network 10.253.0.0/24: the nodes are .1 (source) and .2
/// (target), the workload .10.
fn address(last: u8) -> OverlayAddress {
    OverlayAddress {
        network: "lab".into(),
        vni: VNI,
        port: PORT,
        ip: Ipv4Addr::new(10, 253, 0, last),
        prefix_len: 24,
        mac: format!("02:aa:0a:fd:00:{last:02x}"),
    }
}

/// The moving workload's place on the network.
pub(crate) fn workload_address() -> OverlayAddress {
    address(10)
}

/// Build both sides' devices (they go with the namespaces when the link goes down).
pub(crate) async fn build(sides: &PacketSides) -> Result<(), String> {
    for (end, peer, last) in [(sides.a(), sides.b().addr, 1), (sides.b(), sides.a().addr, 2)] {
        let netns = end.netns.clone();
        let node = NodeOverlay { address: address(last), peers: vec![peer], workloads: Vec::new() };
        let built = tokio::task::spawn_blocking(move || {
            away_link::packet::run_in_netns(&netns, move || away_overlay::ensure_networks(&[node]))
        })
        .await
        .map_err(|e| format!("the overlay task: {e}"))?
        .map_err(|e| format!("enter namespace {}: {e}", end.netns))?;
        built.map_err(|e| format!("build the overlay in {}: {}", end.netns, away_model::error_chain(&e)))?;
    }
    Ok(())
}
