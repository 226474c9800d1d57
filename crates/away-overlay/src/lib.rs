//! A node's side of the lab networks (docs/network.md): per network a kernel VXLAN
//! device (unicast, one VNI, no multicast) enslaved to a bridge that carries the node's
//! own overlay address, a flood list of the other nodes' tunnel endpoints
//! (`00:00:00:00:00:00 dst <peer>` forwarding entries), and for each workload a network
//! namespace of its own joined to that bridge by a veth pair, with the workload's
//! overlay IP and MAC; a VM's NIC is a tap device on that bridge instead (its guest
//! has the address and MAC). Everything goes through netlink (rtnetlink) and, for the
//! tap's creation, the tun driver's ioctls; nothing runs `ip`.
//!
//! Each call works in a thread of its own: netlink sockets belong to the network
//! namespace of the thread that makes them, and entering a workload's namespace must
//! not move a thread of the caller's runtime.

mod arp;
mod netns;
pub mod probe;
mod tap;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use away_model::{NodeOverlay, OverlayAddress, RemoteWorkload};
use futures_util::TryStreamExt;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan};

pub use netns::{netns_path, NETNS_DIR};

/// MTU inside the overlay: 1500 on the underlay less VXLAN's 50 bytes of headers.
pub const OVERLAY_MTU: u32 = 1450;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network {network}: {reason}")]
    Invalid { network: String, reason: String },
    #[error("network {network} has no bridge {bridge} on this node (the node has not joined it yet)")]
    NoBridge { network: String, bridge: String },
    #[error("create tap device {tap} (/dev/net/tun, TUNSETIFF)")]
    Tap {
        tap: String,
        #[source]
        source: std::io::Error,
    },
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> OverlayError {
    let op = op.into();
    move |source| OverlayError::Netlink { op, source }
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> OverlayError {
    let op = op.into();
    move |source| OverlayError::Io { op, source }
}

/// The VXLAN device of network `vni` on a node.
pub fn vxlan_name(vni: u32) -> String {
    format!("awx{vni}")
}

/// The bridge of network `vni` on a node (its workloads' veths and the VXLAN device).
pub fn bridge_name(vni: u32) -> String {
    format!("awbr{vni}")
}

/// Run `work` with a netlink handle made in network namespace `netns` (the caller's
/// own when `None`), on a thread of its own with a runtime of its own.
fn with_netlink<T, F, Fut>(netns: Option<&Path>, work: F) -> Result<T, OverlayError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, OverlayError>>,
{
    let netns = netns.map(Path::to_path_buf);
    std::thread::spawn(move || {
        if let Some(ns) = &netns {
            netns::enter(ns)?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("start a runtime for netlink"))?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(io("open a netlink socket"))?;
            let conn = tokio::spawn(conn);
            let out = work(handle).await;
            conn.abort();
            out
        })
    })
    .join()
    .map_err(|_| OverlayError::Io { op: "netlink thread".into(), source: std::io::Error::other("it panicked") })?
}

async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, OverlayError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l.map(|l| l.header.index)),
        // ENODEV: no such link
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("look up link {name}"))(e)),
    }
}

/// Make this node's side of each network in `networks` as the broker describes it
/// (idempotent, called after every heartbeat): the VXLAN device and bridge, the node's
/// address on the bridge, and exactly the peers' flood entries.
pub fn ensure_networks(networks: &[NodeOverlay]) -> Result<(), OverlayError> {
    for n in networks {
        n.address.check().map_err(|reason| OverlayError::Invalid { network: n.address.network.clone(), reason })?;
    }
    let networks = networks.to_vec();
    with_netlink(None, move |h| async move {
        for n in &networks {
            ensure_network(&h, n).await?;
        }
        Ok(())
    })
}

async fn ensure_network(h: &Handle, n: &NodeOverlay) -> Result<(), OverlayError> {
    let a = &n.address;
    let (vx, br) = (vxlan_name(a.vni), bridge_name(a.vni));
    let mac = a.mac_bytes().expect("checked").to_vec();
    let br_index = match link_index(h, &br).await? {
        Some(i) => i,
        None => {
            h.link()
                // bridged frames skip the host's iptables (br_netfilter would pass them
                // through FORWARD, whose policy Docker sets to DROP): the overlay is
                // filtered nowhere but in the workloads' own namespaces
                .add(
                    LinkBridge::new(&br)
                        .nf_call_iptables(false)
                        .nf_call_ip6tables(false)
                        .nf_call_arptables(false)
                        .mtu(OVERLAY_MTU)
                        .address(mac.clone())
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("create bridge {br}")))?;
            link_index(h, &br)
                .await?
                .ok_or_else(|| OverlayError::NoBridge { network: a.network.clone(), bridge: br.clone() })?
        }
    };
    let vx_index = match link_index(h, &vx).await? {
        Some(i) => i,
        None => {
            // unicast: no group, no lower device; learning on, so a workload's MAC is
            // found at the node its gratuitous ARP came from after a move
            h.link()
                .add(LinkVxlan::new(&vx, a.vni).port(a.port).learning(true).mtu(OVERLAY_MTU).build())
                .execute()
                .await
                .map_err(nl(format!("create VXLAN device {vx} (vni {}, port {})", a.vni, a.port)))?;
            link_index(h, &vx).await?.ok_or_else(|| OverlayError::Invalid {
                network: a.network.clone(),
                reason: format!("{vx} vanished after its creation"),
            })?
        }
    };
    h.link()
        .set(LinkUnspec::new_with_index(vx_index).controller(br_index).up().build())
        .execute()
        .await
        .map_err(nl(format!("put {vx} on {br}")))?;
    let has_address = h
        .address()
        .get()
        .set_link_index_filter(br_index)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(nl(format!("read the addresses of {br}")))?
        .iter()
        .any(|m| {
            m.attributes.iter().any(|attr| {
                matches!(attr, rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) if *ip == a.ip)
            })
        });
    if !has_address {
        h.address()
            .add(br_index, IpAddr::V4(a.ip), a.prefix_len)
            .execute()
            .await
            .map_err(nl(format!("add {}/{} to {br}", a.ip, a.prefix_len)))?;
    }
    sync_flood_list(h, vx_index, &vx, &n.peers).await?;
    sync_workload_entries(h, vx_index, &vx, &n.workloads).await
}

/// Whether a workload's forwarding entry should be set to what the broker says: yes
/// when the device has none, or one elsewhere that it learned before the broker had the
/// workload there (`since`); no when it learned the MAC elsewhere later (a gratuitous
/// ARP after a move the broker has not seen end yet).
fn should_set(existing: Option<(Ipv4Addr, u64)>, wanted: &RemoteWorkload) -> bool {
    match existing {
        None => true,
        Some((dst, _)) if dst == wanted.node => false,
        Some((_, updated_unix_ms)) => updated_unix_ms <= wanted.since_unix_ms,
    }
}

/// The per-MAC forwarding entries of VXLAN device `index` for the network's workloads
/// on other nodes. Dynamic entries (NUD_REACHABLE): the device's learning may still
/// move them, and they age out like learned ones; entries the broker no longer lists
/// are left to age.
async fn sync_workload_entries(
    h: &Handle,
    index: u32,
    vx: &str,
    workloads: &[RemoteWorkload],
) -> Result<(), OverlayError> {
    if workloads.is_empty() {
        return Ok(());
    }
    let entries = forwarding_entries(h, index, vx).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    for w in workloads {
        let Some(mac) = w.mac_bytes() else {
            tracing::warn!(device = vx, mac = %w.mac, "the broker listed a workload with a malformed MAC");
            continue;
        };
        let existing = entries.iter().find_map(|e| {
            let lladdr =
                e.attributes.iter().any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l[..] == mac));
            let dst = e.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                _ => None,
            })?;
            // the kernel gives the entry's age in clock ticks (USER_HZ, 100 per second)
            let age_ms = e.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::CacheInfo(c) => Some(u64::from(c.updated) * 10),
                _ => None,
            });
            lladdr.then(|| (dst, now.saturating_sub(age_ms.unwrap_or(u64::MAX / 2))))
        });
        if should_set(existing, w) {
            set_workload_entry(h, index, mac, w.node)
                .await
                .map_err(nl(format!("point {} at {} on {vx}", w.mac, w.node)))?;
            tracing::info!(device = vx, mac = %w.mac, node = %w.node, "overlay forwarding entry set");
        }
    }
    Ok(())
}

/// `bridge fdb replace MAC dev <vx> dst <node> dynamic self`.
async fn set_workload_entry(h: &Handle, index: u32, mac: [u8; 6], node: Ipv4Addr) -> Result<(), rtnetlink::Error> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = rtnetlink::packet_route::neighbour::NeighbourState::Reachable;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(node)));
    fdb_request(h, msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE).await
}

async fn fdb_request(h: &Handle, msg: NeighbourMessage, flags: u16) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
    req.header.flags = flags;
    let mut answers = h.clone().request(req)?;
    while let Some(m) = futures_util::StreamExt::next(&mut answers).await {
        if let NetlinkPayload::Error(e) = m.payload {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}

/// The forwarding entries of VXLAN device `index` (named `vx`, for errors).
async fn forwarding_entries(h: &Handle, index: u32, vx: &str) -> Result<Vec<NeighbourMessage>, OverlayError> {
    let all: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .map_err(nl(format!("read the forwarding entries of {vx}")))?;
    Ok(all.into_iter().filter(|e| e.header.ifindex == index).collect())
}

/// The all-zero forwarding entries of VXLAN device `index`: exactly one per peer.
async fn sync_flood_list(h: &Handle, index: u32, vx: &str, peers: &[Ipv4Addr]) -> Result<(), OverlayError> {
    let entries = forwarding_entries(h, index, vx).await?;
    let mut present = Vec::new();
    for e in entries {
        let zero = e
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l.iter().all(|b| *b == 0)));
        let dst = e.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        match dst {
            Some(ip) if zero && !peers.contains(&ip) => {
                h.neighbours().del(e).execute().await.map_err(nl(format!("remove peer {ip} from {vx}")))?;
                tracing::info!(device = vx, peer = %ip, "overlay peer removed");
            }
            Some(ip) if zero => present.push(ip),
            _ => {}
        }
    }
    for peer in peers.iter().filter(|p| !present.contains(p)) {
        append_flood_entry(h, index, *peer).await.map_err(nl(format!("add peer {peer} to {vx}")))?;
        tracing::info!(device = vx, peer = %peer, "overlay peer added");
    }
    Ok(())
}

/// `bridge fdb append 00:00:00:00:00:00 dev <vx> dst <peer>`: rtnetlink's add asks for
/// an exclusive entry, and a second all-zero entry needs NLM_F_APPEND.
async fn append_flood_entry(h: &Handle, index: u32, peer: Ipv4Addr) -> Result<(), rtnetlink::Error> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = rtnetlink::packet_route::neighbour::NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![0; 6]));
    msg.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(peer)));
    fdb_request(h, msg, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND).await
}

/// The host end of a workload's veth pair (at most 15 bytes, stable per namespace name).
fn host_veth(netns: &str) -> String {
    let h = netns.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("awv{:011x}", h & 0xfff_ffff_ffff)
}

/// The tap device of a VM workload, from a key unique per node and workload (its QEMU
/// state directory): at most 15 bytes.
pub fn tap_name(key: &str) -> String {
    format!("awt{}", &host_veth(key)[3..])
}

/// Give a VM its NIC on its network: tap device `tap` (made here, persistent, in the
/// node's namespace: `netns`, or the calling thread's when `None`; one left by an
/// earlier run is replaced), MTU
/// of the overlay, up, on the network's bridge. QEMU attaches to it by name (`-netdev
/// tap,ifname=…`); the guest's NIC carries the workload's MAC and IP, so the same call on
/// another node gives a moved VM the same address. A node without the network's bridge
/// gets no tap ([`OverlayError::NoBridge`]).
pub fn attach_tap(tap: &str, addr: &OverlayAddress, netns: Option<&Path>) -> Result<(), OverlayError> {
    addr.check().map_err(|reason| OverlayError::Invalid { network: addr.network.clone(), reason })?;
    let (tap, br, network) = (tap.to_string(), bridge_name(addr.vni), addr.network.clone());
    let result = {
        let tap = tap.clone();
        with_netlink(netns, move |h| async move {
            let br_index = link_index(&h, &br).await?.ok_or(OverlayError::NoBridge { network, bridge: br.clone() })?;
            if let Some(old) = link_index(&h, &tap).await? {
                h.link().del(old).execute().await.map_err(nl(format!("remove the old tap {tap}")))?;
            }
            // the tun driver's ioctls work on the thread's namespace: this one's
            tap::create_persistent(&tap).map_err(|source| OverlayError::Tap { tap: tap.clone(), source })?;
            let index = link_index(&h, &tap).await?.ok_or_else(|| OverlayError::Invalid {
                network: br.clone(),
                reason: format!("tap {tap} vanished after its creation"),
            })?;
            h.link()
                .set(LinkUnspec::new_with_index(index).mtu(OVERLAY_MTU).controller(br_index).up().build())
                .execute()
                .await
                .map_err(nl(format!("put tap {tap} on {br}")))?;
            Ok(())
        })
    };
    if result.is_err() {
        let _ = detach_tap(&tap, netns);
    }
    result
}

/// Remove tap device `tap` (QEMU, once gone, holds it no more). Absent is not an error.
pub fn detach_tap(tap: &str, netns: Option<&Path>) -> Result<(), OverlayError> {
    let tap = tap.to_string();
    with_netlink(netns, move |h| async move {
        if let Some(i) = link_index(&h, &tap).await? {
            h.link().del(i).execute().await.map_err(nl(format!("remove tap {tap}")))?;
        }
        Ok(())
    })
}

/// True when link `name` exists in the calling thread's namespace.
pub fn link_exists(name: &str) -> Result<bool, OverlayError> {
    let name = name.to_string();
    with_netlink(None, move |h| async move { Ok(link_index(&h, &name).await?.is_some()) })
}

/// Give workload namespace `netns` (a name under /run/netns, made here; one left by an
/// earlier run is replaced) its overlay address: a veth pair whose host end is on the
/// network's bridge, the other end `eth0` inside with the workload's MAC and IP. The
/// same call on another node gives a moved workload the same address. Returns the
/// namespace's path for the OCI spec.
pub fn attach_workload(netns: &str, addr: &OverlayAddress) -> Result<PathBuf, OverlayError> {
    addr.check().map_err(|reason| OverlayError::Invalid { network: addr.network.clone(), reason })?;
    let path = netns::create(netns)?;
    let result = attach_inner(netns, &path, addr);
    if result.is_err() {
        let _ = detach_workload(netns);
    }
    result.map(|()| path)
}

fn attach_inner(netns: &str, path: &Path, addr: &OverlayAddress) -> Result<(), OverlayError> {
    let (host, peer) = (host_veth(netns), format!("{}p", host_veth(netns)));
    let br = bridge_name(addr.vni);
    let network = addr.network.clone();
    let ns_file = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
    with_netlink(None, move |h| async move {
        let br_index = link_index(&h, &br).await?.ok_or(OverlayError::NoBridge { network, bridge: br.clone() })?;
        // a host end left by a namespace deleted while something still held it
        if let Some(old) = link_index(&h, &host).await? {
            let _ = h.link().del(old).execute().await;
        }
        h.link()
            .add(LinkVeth::new(&host, &peer).mtu(OVERLAY_MTU).build())
            .execute()
            .await
            .map_err(nl(format!("create veth {host}")))?;
        let peer_index = link_index(&h, &peer).await?.ok_or_else(|| OverlayError::Invalid {
            network: br.clone(),
            reason: format!("veth end {peer} vanished"),
        })?;
        use std::os::fd::AsRawFd;
        h.link()
            .set(LinkUnspec::new_with_index(peer_index).setns_by_fd(ns_file.as_raw_fd()).build())
            .execute()
            .await
            .map_err(nl(format!("move {peer} into the workload's namespace")))?;
        let host_index = link_index(&h, &host).await?.unwrap_or(0);
        h.link()
            .set(LinkUnspec::new_with_index(host_index).controller(br_index).up().build())
            .execute()
            .await
            .map_err(nl(format!("put {host} on {br}")))?;
        Ok(())
    })?;
    let (peer, addr) = (format!("{}p", host_veth(netns)), addr.clone());
    with_netlink(Some(path), move |h| async move {
        let lo = link_index(&h, "lo").await?.unwrap_or(1);
        h.link().set(LinkUnspec::new_with_index(lo).up().build()).execute().await.map_err(nl("set lo up"))?;
        let index = link_index(&h, &peer).await?.ok_or_else(|| OverlayError::Invalid {
            network: addr.network.clone(),
            reason: format!("{peer} is not in the workload's namespace"),
        })?;
        let mac = addr.mac_bytes().expect("checked").to_vec();
        h.link()
            .set(LinkUnspec::new_with_index(index).name("eth0").address(mac).build())
            .execute()
            .await
            .map_err(nl(format!("name eth0 and set MAC {}", addr.mac)))?;
        // no IPv6 in the namespace: its duplicate address detection and router
        // solicitations would leave with the workload's MAC the moment eth0 is up, so
        // the other nodes would learn that MAC here before a restored workload's
        // sockets exist, and this kernel would reset its connections. The namespace
        // stays silent until the workload (or its announcement after a restore) speaks.
        for conf in ["all", "default", "eth0"] {
            let knob = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            match std::fs::write(&knob, b"1") {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(format!("write {knob}"))(e)),
                _ => {}
            }
        }
        h.address()
            .add(index, IpAddr::V4(addr.ip), addr.prefix_len)
            .execute()
            .await
            .map_err(nl(format!("add {}/{} to eth0", addr.ip, addr.prefix_len)))?;
        h.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await.map_err(nl("set eth0 up"))?;
        Ok(())
    })
}

/// Remove workload namespace `netns` (its veth pair goes with it once no process holds
/// the namespace). Nothing to remove is not an error.
pub fn detach_workload(netns: &str) -> Result<(), OverlayError> {
    netns::remove(netns)?;
    // the host end goes with the namespace, unless something still holds it
    let host = host_veth(netns);
    with_netlink(None, move |h| async move {
        if let Some(i) = link_index(&h, &host).await? {
            let _ = h.link().del(i).execute().await;
        }
        Ok(())
    })
}

/// Tell the overlay where the workload's MAC now is: a gratuitous ARP from `eth0` of
/// namespace `netns`, flooded to every node by the VXLAN devices (whose learning then
/// points the MAC at this node) and their bridges. Sent `count` times, 50 ms apart.
pub fn announce(netns: &str, addr: &OverlayAddress, count: u32) -> Result<(), OverlayError> {
    let path = netns_path(netns);
    let (ip, mac) = (
        addr.ip,
        addr.mac_bytes().ok_or_else(|| OverlayError::Invalid {
            network: addr.network.clone(),
            reason: format!("mac {:?}", addr.mac),
        })?,
    );
    std::thread::spawn(move || -> Result<(), OverlayError> {
        netns::enter(&path)?;
        for i in 0..count {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            arp::send_gratuitous("eth0", ip, mac).map_err(io("send a gratuitous ARP from eth0"))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| OverlayError::Io { op: "announce thread".into(), source: std::io::Error::other("it panicked") })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_sets_entries_unless_the_node_learned_the_mac_elsewhere_since() {
        let (b, c) = (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3));
        let wanted = RemoteWorkload { mac: "02:aa:00:00:00:05".into(), node: c, since_unix_ms: 1_000 };
        assert!(should_set(None, &wanted), "no entry yet");
        assert!(!should_set(Some((c, 500)), &wanted), "already there");
        assert!(should_set(Some((b, 900)), &wanted), "learned at b before the broker had it at c: stale");
        assert!(!should_set(Some((b, 1_100)), &wanted), "learned at b after: a move the broker has not seen end");
    }

    #[test]
    fn device_names_fit_the_kernel_limit() {
        assert!(vxlan_name((1 << 24) - 1).len() <= 15);
        assert!(bridge_name((1 << 24) - 1).len() <= 15);
        let h = host_veth("awo-away-cloud-1-some-long-workload-name");
        assert_eq!(h.len(), 14);
        assert_ne!(h, host_veth("awo-away-cloud-2-some-long-workload-name"));
        let t = tap_name("/run/away/qemu/some-long-workload-name");
        assert!(t.starts_with("awt") && t.len() == 14, "{t}");
    }
}
