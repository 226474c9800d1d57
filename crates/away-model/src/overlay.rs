//! Lab networks: the VXLAN overlay each workload's address lives on (docs/network.md).
//! The broker assigns the addresses (its IPAM); agents build the devices from them.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The network a workload joins when its spec names none.
pub const DEFAULT_NETWORK: &str = "default";

/// A workload's (or a node's) address on one lab network, and what identifies the
/// network on the wire: the same IP and MAC wherever the workload runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct OverlayAddress {
    /// The lab network's name.
    pub network: String,
    /// Its VXLAN network identifier (24 bits).
    pub vni: u32,
    /// The UDP port its VXLAN tunnels use on every node.
    pub port: u16,
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10.250.0.5"))]
    pub ip: Ipv4Addr,
    /// Prefix length of the network's subnet.
    pub prefix_len: u8,
    /// `02:..` (locally administered, unicast), lower-case.
    #[cfg_attr(feature = "openapi", schema(pattern = "^02(:[0-9a-f]{2}){5}$", example = "02:aa:0a:fa:00:05"))]
    pub mac: String,
}

impl OverlayAddress {
    /// The MAC as bytes; `None` when it is not six colon-separated hex bytes.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }

    /// Checks an address a peer sent before anything is built from it.
    pub fn check(&self) -> Result<(), String> {
        if self.vni == 0 || self.vni >= 1 << 24 {
            return Err(format!("vni {} is outside 1..2^24", self.vni));
        }
        if self.port == 0 {
            return Err("port 0".into());
        }
        if !(8..=30).contains(&self.prefix_len) {
            return Err(format!("prefix length {} is outside 8..=30", self.prefix_len));
        }
        match self.mac_bytes() {
            Some(m) if m[0] & 1 == 0 => Ok(()),
            Some(_) => Err(format!("mac {} is a multicast address", self.mac)),
            None => Err(format!("mac {:?} is not six hex bytes", self.mac)),
        }
    }
}

/// A moved workload's place on its lab network, in the migration report: the same
/// address before and after the move, and how long the network took to follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NetworkFollow {
    /// The lab network's name.
    pub network: String,
    /// The workload's overlay address before the move.
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Ipv4, example = "10.250.0.5"))]
    pub ip_before: Ipv4Addr,
    /// Its overlay address after the move: the same, since the address moves with it.
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Ipv4, example = "10.250.0.5"))]
    pub ip_after: Ipv4Addr,
    /// Its MAC, the same on every node.
    #[cfg_attr(feature = "openapi", schema(pattern = "^02(:[0-9a-f]{2}){5}$", example = "02:aa:0a:fa:00:05"))]
    pub mac: String,
    /// From the workload's resume on the target to the first ICMP echo it answered
    /// from the source node (sent every 10 ms from there, over the overlay); absent
    /// when none was answered within `probe_millis`.
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub follow_millis: Option<u64>,
    /// How long the source node asked before that first answer, from the freeze on:
    /// nothing answered at the address meanwhile (about the downtime, or more).
    #[serde(default, deserialize_with = "crate::whole::opt", skip_serializing_if = "Option::is_none")]
    pub unanswered_millis: Option<u64>,
    /// How long past the end of the move the source node still asked.
    #[serde(deserialize_with = "crate::whole::de")]
    pub probe_millis: u64,
}

/// Formats a MAC as lower-case colon-separated hex.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// One lab network as a node takes part in it: its own address there (on its bridge)
/// and the tunnel endpoints of every other node, for the VXLAN device's flood list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeOverlay {
    pub address: OverlayAddress,
    /// The other nodes' tunnel endpoints (their agents' addresses), sorted.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<String>))]
    pub peers: Vec<Ipv4Addr>,
    /// The network's workloads on other nodes, where the broker has them: the node's
    /// VXLAN device forwards to each MAC's node without learning it first, and a moved
    /// workload's entry follows its move (docs/network.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<RemoteWorkload>,
}

/// A workload of a lab network on another node, for a forwarding entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RemoteWorkload {
    #[cfg_attr(feature = "openapi", schema(pattern = "^02(:[0-9a-f]{2}){5}$", example = "02:aa:0a:fa:00:05"))]
    pub mac: String,
    /// Its node's tunnel endpoint.
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Ipv4, example = "10.77.0.2"))]
    pub node: Ipv4Addr,
    /// Since when (Unix ms, the broker's clock) the broker has it on that node: a
    /// forwarding entry the node learned later (a gratuitous ARP after a move the
    /// broker has not seen end yet) is newer and is kept.
    #[serde(deserialize_with = "crate::whole::de")]
    pub since_unix_ms: u64,
}

impl RemoteWorkload {
    /// The MAC as bytes, when it is a unicast one of six hex bytes.
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac).filter(|m| m[0] & 1 == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(mac: &str) -> OverlayAddress {
        OverlayAddress {
            network: "lab".into(),
            vni: 4242,
            port: 4799,
            ip: Ipv4Addr::new(10, 250, 0, 5),
            prefix_len: 24,
            mac: mac.into(),
        }
    }

    #[test]
    fn macs_round_trip_and_bad_ones_are_named() {
        let a = addr("02:aa:0a:fa:00:05");
        assert_eq!(a.mac_bytes(), Some([2, 0xaa, 10, 250, 0, 5]));
        assert_eq!(format_mac([2, 0xaa, 10, 250, 0, 5]), a.mac);
        assert!(a.check().is_ok());
        assert!(addr("03:aa:0a:fa:00:05").check().unwrap_err().contains("multicast"));
        assert!(addr("02:aa:0a:fa:00").check().unwrap_err().contains("six hex bytes"));
        assert!(addr("02:aa:0a:fa:00:05:07").check().is_err());
        let mut wide = addr("02:aa:0a:fa:00:05");
        wide.vni = 1 << 24;
        assert!(wide.check().unwrap_err().contains("vni"));
    }
}
