//! Three "nodes" (network namespaces joined by a bridge in a fourth) build the overlay
//! with away-overlay's calls: a workload namespace on one node answers TCP on its
//! overlay address from another node's own overlay address, moves to the third node
//! with the same IP and MAC, and after its gratuitous ARP answers there. Needs root;
//! without it the test prints SKIP, unless CI=true.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use away_model::{NodeOverlay, OverlayAddress};

fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "needs root (CI=true makes this a failure)");
    eprintln!("SKIP: needs root");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Run `f` on a thread inside namespace `ns` (a path).
fn inside<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn address(last: u8) -> OverlayAddress {
    OverlayAddress {
        network: "t3".into(),
        vni: 7001,
        port: 4799,
        ip: Ipv4Addr::new(10, 251, 0, last),
        prefix_len: 24,
        mac: format!("02:aa:0a:fb:00:{last:02x}"),
    }
}

struct Lab {
    tag: String,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in ["a", "b", "c", "sw"] {
            let _ = Command::new("ip").args(["netns", "del", &format!("{}-{n}", self.tag)]).output();
        }
        let _ = away_overlay::detach_workload(&format!("{}-w", self.tag));
    }
}

#[test]
fn a_workload_keeps_its_address_across_nodes() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab { tag: format!("awot{}", std::process::id() % 100000) };
    let t = &lab.tag;
    let sw = format!("{t}-sw");
    ip(&["netns", "add", &sw]);
    ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &sw, "link", "set", "br0", "up"]);
    let nodes: Vec<(String, Ipv4Addr)> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("{t}-{n}"), Ipv4Addr::new(10, 252, 9, 10 + i as u8)))
        .collect();
    for (i, (ns, addr)) in nodes.iter().enumerate() {
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &format!("p{i}"), "netns", &sw]);
        ip(&["-n", &sw, "link", "set", &format!("p{i}"), "master", "br0", "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    let path = |ns: &str| Path::new("/run/netns").join(ns);
    for (i, (ns, _)) in nodes.iter().enumerate() {
        let peers: Vec<Ipv4Addr> = nodes.iter().filter(|(n, _)| n != ns).map(|(_, a)| *a).collect();
        let me = NodeOverlay { address: address(200 + i as u8), peers, workloads: Vec::new() };
        inside(&path(ns), move || {
            away_overlay::ensure_networks(std::slice::from_ref(&me)).and_then(|()| away_overlay::ensure_networks(&[me]))
        })
        .unwrap();
    }
    // the workload on node b
    let w = format!("{t}-w");
    let (w2, wa) = (w.clone(), address(5));
    inside(&path(&nodes[1].0), move || away_overlay::attach_workload(&w2, &wa)).unwrap();
    let serve = |w: &str| {
        let listener = inside(&path(w), || TcpListener::bind("10.251.0.5:7000").unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"here").unwrap();
        })
    };
    let ask = |node: &str| {
        inside(&path(node), || {
            let to: SocketAddr = "10.251.0.5:7000".parse().unwrap();
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            std::io::Result::Ok(buf)
        })
    };
    let server = serve(&w);
    assert_eq!(ask(&nodes[0].0).expect("node a reaches the workload on node b"), "here");
    server.join().unwrap();

    // it moves to node c: same namespace name, IP and MAC
    away_overlay::detach_workload(&w).unwrap();
    let (w2, wa) = (w.clone(), address(5));
    inside(&path(&nodes[2].0), move || away_overlay::attach_workload(&w2, &wa)).unwrap();
    let server = serve(&w);
    away_overlay::announce(&w, &address(5), 2).unwrap();
    assert_eq!(ask(&nodes[0].0).expect("node a reaches the workload on node c after its announcement"), "here");
    server.join().unwrap();

    // back to node b, announcing nothing: node a's device still sends its MAC to node c
    // (where it learned it), until the broker's forwarding entry says node b
    away_overlay::detach_workload(&w).unwrap();
    let (w2, wa) = (w.clone(), address(5));
    inside(&path(&nodes[1].0), move || away_overlay::attach_workload(&w2, &wa)).unwrap();
    // node b's bridge learns it is local (as from its first packets), nothing of it
    // reaching the other nodes: a static neighbour for node b's address, so no ARP
    // broadcast, then one unicast datagram to it
    let b_bridge = address(201);
    ip(&["-n", &w, "neigh", "replace", &b_bridge.ip.to_string(), "lladdr", &b_bridge.mac, "dev", "eth0"]);
    let to = SocketAddr::from((b_bridge.ip, 9));
    inside(&path(&w), move || std::net::UdpSocket::bind("0.0.0.0:0").and_then(|u| u.send_to(b"here", to))).unwrap();
    let server = serve(&w);
    assert!(ask(&nodes[0].0).is_err(), "without an announcement or an entry node a still looks on node c");
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let peers: Vec<Ipv4Addr> = nodes.iter().skip(1).map(|(_, a)| *a).collect();
    let wanted = away_model::RemoteWorkload { mac: address(5).mac, node: nodes[1].1, since_unix_ms: since };
    let me = NodeOverlay { address: address(200), peers, workloads: vec![wanted] };
    inside(&path(&nodes[0].0), move || away_overlay::ensure_networks(&[me])).unwrap();
    assert_eq!(ask(&nodes[0].0).expect("node a reaches the workload on node b by the broker's entry"), "here");
    server.join().unwrap();
}

/// A VM's tap: refused with a clear error on a node without the network's bridge; made
/// persistent on the bridge with the overlay's MTU where it has one (again over a left
/// one); removed by `detach_tap`, twice without error.
#[test]
fn a_vm_tap_joins_the_bridge_and_goes() {
    if !root_or_skip() {
        return;
    }
    let lab = Lab { tag: format!("awtt{}", std::process::id() % 100000) };
    let ns = format!("{}-a", lab.tag);
    ip(&["netns", "add", &ns]);
    let path = Path::new("/run/netns").join(&ns);
    let tap = away_overlay::tap_name(&format!("/run/away/qemu/{ns}"));
    let a = address(9);
    let t = tap.clone();
    let e = inside(&path, move || away_overlay::attach_tap(&t, &a, None).unwrap_err().to_string());
    assert!(e.contains("no bridge awbr7001"), "{e}");
    let node = NodeOverlay { address: address(1), peers: vec![], workloads: vec![] };
    let (t, a) = (tap.clone(), address(9));
    let links = inside(&path, move || {
        away_overlay::ensure_networks(&[node]).unwrap();
        assert!(!away_overlay::link_exists(&t).unwrap(), "a failed attach left its tap");
        away_overlay::attach_tap(&t, &a, None).unwrap();
        away_overlay::attach_tap(&t, &a, None).unwrap();
        let shown = Command::new("ip").args(["-d", "link", "show", &t]).output().unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout).to_string();
        away_overlay::detach_tap(&t, None).unwrap();
        away_overlay::detach_tap(&t, None).unwrap();
        (shown, away_overlay::link_exists(&t).unwrap())
    });
    let (shown, left) = links;
    assert!(shown.contains("mtu 1450") && shown.contains("master awbr7001"), "{shown}");
    assert!(shown.contains("tun type tap") && shown.contains("persist on"), "{shown}");
    assert!(!left, "the tap is still there after detach_tap");
}
