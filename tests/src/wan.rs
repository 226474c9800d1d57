//! An emulated link between two nodes of a local cluster (away-cluster): the cluster
//! joins every node to one bridge, so two of its nodes talk at memory speed. This puts
//! away-link's packet link (TUN devices in both nodes' namespaces, every packet through
//! the link model in this process) between two of them, with a host route in each to
//! the other's cluster address through it: whatever the two nodes send each other (agent
//! API, transfers, CRIU's page server, QEMU's stream, VXLAN) crosses the emulated link,
//! while the broker and the other nodes stay on the bridge.

use std::net::Ipv4Addr;
use std::process::Command;

use away_cluster::ClusterInfo;
use away_link::packet::{Endpoint, PacketLink};
use away_link::LinkProfile;

/// The link's own point-to-point addresses, inside the two nodes' namespaces only.
const SIDE_A: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
const SIDE_B: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
const TUN: &str = "awl0";

/// Two cluster nodes joined by an emulated link; dropping it removes the routes and the
/// link (the nodes talk over the bridge again).
pub struct NodeLink {
    link: Option<PacketLink>,
    routes: Vec<(String, Ipv4Addr)>,
}

impl NodeLink {
    /// Join nodes `a` and `b` of the cluster with `profile` in both directions.
    pub fn up(info: &ClusterInfo, a: &str, b: &str, profile: LinkProfile) -> NodeLink {
        let node = |n: &str| {
            info.nodes.iter().find(|x| x.name == n).unwrap_or_else(|| panic!("no node {n} in cluster {}", info.name))
        };
        let (na, nb) = (node(a), node(b));
        let link = PacketLink::attach(
            Endpoint { netns: na.netns.clone(), tun: TUN.into(), addr: SIDE_A },
            Endpoint { netns: nb.netns.clone(), tun: TUN.into(), addr: SIDE_B },
            profile.into(),
            profile.into(),
        )
        .unwrap_or_else(|e| panic!("packet link {a} <-> {b}: {}", away_model::error_chain(&e)));
        let mut joined = NodeLink { link: Some(link), routes: Vec::new() };
        // each node reaches the other's cluster address through the link, from its own
        for (here, there) in [(na, nb), (nb, na)] {
            ip(&[
                "-n",
                &here.netns,
                "route",
                "add",
                &format!("{}/32", there.ip),
                "dev",
                TUN,
                "src",
                &here.ip.to_string(),
            ]);
            joined.routes.push((here.netns.clone(), there.ip));
        }
        joined
    }

    pub fn link(&self) -> &PacketLink {
        self.link.as_ref().expect("link up")
    }
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        for (netns, to) in self.routes.drain(..) {
            let _ = Command::new("ip").args(["-n", &netns, "route", "del", &format!("{to}/32")]).status();
        }
        if let Some(l) = self.link.take() {
            let _ = l.down();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
