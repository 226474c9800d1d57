//! Address management for the lab networks (docs/network.md): each network is a /24
//! of the overlay pool with its own VNI; each workload and each node gets one address
//! (and a MAC made from it) per network, kept in SQLite so that a workload keeps its
//! address for its whole life, across moves and broker restarts. Pure: the store and
//! the heartbeat answer are the broker's business.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use away_model::{format_mac, OverlayAddress};

/// What `away broker --overlay POOL` turns on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConfig {
    /// The pool's first address; each network is a /24 of it, in creation order.
    pub pool: Ipv4Addr,
    pub pool_prefix: u8,
    /// VXLAN's UDP port on every node. Not 4789 (IANA's, which Docker's overlay, Cilium
    /// and Calico bind) nor 8472 (the Linux default, flannel's): a node that runs one
    /// of those keeps it.
    pub port: u16,
    /// The VNI of the first network; the n-th network created gets `first_vni + n`.
    pub first_vni: u32,
}

/// The default UDP port of away's VXLAN tunnels.
pub const DEFAULT_PORT: u16 = 4799;
/// The default VNI of the first network.
pub const DEFAULT_FIRST_VNI: u32 = 4200;

impl OverlayConfig {
    /// `A.B.C.D/N` with N from 8 to 24, the address the pool's first.
    pub fn parse_pool(text: &str) -> Result<(Ipv4Addr, u8), String> {
        let (ip, prefix) = text.split_once('/').ok_or_else(|| format!("{text:?}: write a pool as A.B.C.D/N"))?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{text:?}: {e}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{text:?}: the prefix length is not a number"))?;
        if !(8..=24).contains(&prefix) {
            return Err(format!("{text:?}: the prefix length must be 8 to 24 (each network is a /24 of the pool)"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(ip) & !mask != 0 {
            return Err(format!(
                "{text:?}: host bits set; the pool starts at {}",
                Ipv4Addr::from(u32::from(ip) & mask)
            ));
        }
        Ok((ip, prefix))
    }

    fn networks_max(&self) -> u32 {
        1 << (24 - self.pool_prefix)
    }
}

/// One network as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRow {
    pub name: String,
    pub index: u32,
    pub vni: u32,
}

/// One address as stored: `owner` is `node/NAME` or `workload/NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub network: String,
    pub owner: String,
    pub ip: Ipv4Addr,
}

/// What a call added, for the store.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct IpamChanges {
    pub networks: Vec<NetworkRow>,
    pub leases: Vec<LeaseRow>,
}

impl IpamChanges {
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty() && self.leases.is_empty()
    }
}

pub fn node_owner(name: &str) -> String {
    format!("node/{name}")
}

pub fn workload_owner(name: &str) -> String {
    format!("workload/{name}")
}

#[derive(Debug, Clone)]
pub struct Ipam {
    pub config: OverlayConfig,
    networks: BTreeMap<String, NetworkRow>,
    /// (network, owner) -> ip
    leases: BTreeMap<(String, String), Ipv4Addr>,
}

impl Ipam {
    pub fn new(config: OverlayConfig, networks: Vec<NetworkRow>, leases: Vec<LeaseRow>) -> Ipam {
        Ipam {
            config,
            networks: networks.into_iter().map(|n| (n.name.clone(), n)).collect(),
            leases: leases.into_iter().map(|l| ((l.network, l.owner), l.ip)).collect(),
        }
    }

    /// The networks, in creation order.
    pub fn networks(&self) -> Vec<&NetworkRow> {
        let mut v: Vec<&NetworkRow> = self.networks.values().collect();
        v.sort_by_key(|n| n.index);
        v
    }

    /// Network `name`, made (next /24, next VNI) when new.
    pub fn network(&mut self, name: &str, out: &mut IpamChanges) -> Result<NetworkRow, String> {
        if let Some(n) = self.networks.get(name) {
            return Ok(n.clone());
        }
        let index = self.networks.len() as u32;
        if index >= self.config.networks_max() {
            return Err(format!(
                "network {name}: the overlay pool {}/{} holds {} networks of 256 addresses, all in use",
                self.config.pool,
                self.config.pool_prefix,
                self.config.networks_max()
            ));
        }
        let row = NetworkRow { name: name.into(), index, vni: self.config.first_vni + index };
        self.networks.insert(name.into(), row.clone());
        out.networks.push(row.clone());
        Ok(row)
    }

    /// The address of `owner` on network `name` (both made when new): the lowest free
    /// one from .1 to .254 of the network's /24.
    pub fn address(&mut self, name: &str, owner: &str, out: &mut IpamChanges) -> Result<OverlayAddress, String> {
        let net = self.network(name, out)?;
        let base = u32::from(self.config.pool) + (net.index << 8);
        let key = (name.to_string(), owner.to_string());
        let ip = match self.leases.get(&key) {
            Some(ip) => *ip,
            None => {
                let used: std::collections::BTreeSet<Ipv4Addr> =
                    self.leases.iter().filter(|((n, _), _)| n == name).map(|(_, ip)| *ip).collect();
                let ip = (1..255)
                    .map(|h| Ipv4Addr::from(base + h))
                    .find(|ip| !used.contains(ip))
                    .ok_or_else(|| format!("network {name}: all 254 addresses are in use"))?;
                self.leases.insert(key, ip);
                out.leases.push(LeaseRow { network: name.into(), owner: owner.into(), ip });
                ip
            }
        };
        Ok(self.describe(&net, ip))
    }

    fn describe(&self, net: &NetworkRow, ip: Ipv4Addr) -> OverlayAddress {
        let o = ip.octets();
        OverlayAddress {
            network: net.name.clone(),
            vni: net.vni,
            port: self.config.port,
            ip,
            prefix_len: 24,
            // locally administered unicast, unique per address
            mac: format_mac([0x02, 0xaa, o[0], o[1], o[2], o[3]]),
        }
    }

    /// Forget every address of `owner`; true when it had any.
    pub fn release(&mut self, owner: &str) -> bool {
        let before = self.leases.len();
        self.leases.retain(|(_, o), _| o != owner);
        before != self.leases.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam() -> Ipam {
        let (pool, pool_prefix) = OverlayConfig::parse_pool("10.250.0.0/23").unwrap();
        Ipam::new(OverlayConfig { pool, pool_prefix, port: DEFAULT_PORT, first_vni: DEFAULT_FIRST_VNI }, vec![], vec![])
    }

    #[test]
    fn each_network_is_a_slash_24_with_its_own_vni_and_addresses_are_stable() {
        let mut i = ipam();
        let mut out = IpamChanges::default();
        let a = i.address("default", "workload/a", &mut out).unwrap();
        let n = i.address("default", "node/n1", &mut out).unwrap();
        let b = i.address("lab-2", "workload/b", &mut out).unwrap();
        assert_eq!((a.ip, a.vni, a.mac.as_str()), (Ipv4Addr::new(10, 250, 0, 1), 4200, "02:aa:0a:fa:00:01"));
        assert_eq!(n.ip, Ipv4Addr::new(10, 250, 0, 2));
        assert_eq!((b.ip, b.vni), (Ipv4Addr::new(10, 250, 1, 1), 4201));
        assert_eq!((out.networks.len(), out.leases.len()), (2, 3));
        // asked again: the same address, nothing new to store
        let mut again = IpamChanges::default();
        assert_eq!(i.address("default", "workload/a", &mut again).unwrap(), a);
        assert!(again.is_empty());
        // a released address is given again; a third network does not fit a /23
        assert!(i.release("workload/a"));
        assert_eq!(i.address("default", "workload/c", &mut out).unwrap().ip, a.ip);
        assert!(i.address("lab-3", "workload/d", &mut out).unwrap_err().contains("all in use"));
    }

    #[test]
    fn bad_pools_are_named() {
        assert!(OverlayConfig::parse_pool("10.250.0.0").unwrap_err().contains("A.B.C.D/N"));
        assert!(OverlayConfig::parse_pool("10.250.0.0/25").unwrap_err().contains("8 to 24"));
        assert!(OverlayConfig::parse_pool("10.250.0.1/16").unwrap_err().contains("host bits"));
    }
}
