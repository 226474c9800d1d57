//! The overlay end to end (docs/network.md): a cluster of three nodes (each in its own
//! network namespace with its own containerd) whose broker runs lab networks on VXLAN.
//! A client on a third node holds an open TCP connection to a workload by its overlay
//! address while the broker moves the workload to another node: the connection stays
//! open, every byte arrives once and in order, and the gap the client saw is printed.
//! Two workloads on different nodes reach each other by overlay address before and
//! after the move. A VM on the overlay (a tap on the bridge, QEMU live migration) keeps
//! its connection the same way.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use away_cluster::ClusterInfo;
use away_e2e::{cluster_plan, free_cluster_name, require_root, wait_for};
use away_model::Tier;
use serde_json::{json, Value};

const PORT: u16 = 18080;

struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        away_cluster::down(&self.0);
    }
}

/// A node's network namespace.
fn netns_of(info: &ClusterInfo, node: &str) -> PathBuf {
    Path::new("/run/netns").join(&info.nodes.iter().find(|n| n.name == node).unwrap().netns)
}

/// Run `f` on a thread inside the network namespace at `ns`: its sockets belong there.
fn inside<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
        away_runtime::host::process::enter_network_namespace(&file).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// `GET /count` of the counter at `ip`, from namespace `ns`.
fn count_from(ns: &Path, ip: Ipv4Addr) -> Option<u64> {
    inside(ns, move || count_at(SocketAddr::from((ip, PORT))))
}

/// `GET /count` at `addr`, from this process's namespace.
fn count_at(addr: SocketAddr) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET /count HTTP/1.1\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.rsplit("\r\n\r\n").next()?.trim().parse().ok()
}

/// What a streaming client saw: every line's number and arrival, and how it ended.
#[derive(Default)]
struct Seen {
    lines: Vec<(u64, Instant)>,
    end: Option<String>,
}

/// A client that reads the counter's `/stream` over one TCP connection, from
/// namespace `ns`, until `stop` (or the connection ends).
fn stream_from(ns: &Path, ip: Ipv4Addr, stop: Arc<AtomicBool>) -> (Arc<Mutex<Seen>>, std::thread::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (seen2, ns) = (seen.clone(), ns.to_path_buf());
    let handle = std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap();
        away_runtime::host::process::enter_network_namespace(&file).unwrap();
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((ip, PORT)), Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        s.write_all(b"GET /stream HTTP/1.1\r\n\r\n").unwrap();
        // a byte to the server now and then: a peer whose socket is gone answers it
        // with a reset, so a connection the move closed ends here instead of stalling
        let mut w = s.try_clone().unwrap();
        let mut last_write = Instant::now();
        let mut r = BufReader::new(s);
        let mut header = true;
        let mut line = String::new();
        while !stop.load(Ordering::SeqCst) {
            if last_write.elapsed() > Duration::from_millis(200) {
                last_write = Instant::now();
                if let Err(e) = w.write_all(b".") {
                    seen2.lock().unwrap().end = Some(format!("write error: {e}"));
                    return;
                }
            }
            match r.read_line(&mut line) {
                Ok(0) => {
                    seen2.lock().unwrap().end = Some("closed by the server".into());
                    return;
                }
                Ok(_) if line.ends_with('\n') => {
                    let text = line.trim().to_string();
                    line.clear();
                    if header {
                        header = !text.is_empty();
                        continue;
                    }
                    let n: u64 = text.parse().unwrap_or_else(|_| panic!("not a number: {text:?}"));
                    seen2.lock().unwrap().lines.push((n, Instant::now()));
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => {
                    seen2.lock().unwrap().end = Some(format!("error: {e}"));
                    return;
                }
            }
        }
    });
    (seen, handle)
}

fn overlay_ip(w: &Value) -> Ipv4Addr {
    w["spec"]["overlay"]["ip"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no overlay ip: {w}"))
}

#[test]
fn a_moving_workload_keeps_its_address_and_its_tcp_connections() {
    if !require_root() {
        return;
    }
    let clock = Instant::now();
    let cluster = overlay_cluster("ovl", false);
    let (info, api) = (&cluster.info, &cluster.api);

    let submit = |wname: &str, tiers: &[&str], ports: Value| {
        let spec = json!({"name": wname, "image": "away/counter:latest",
            "env": {"COUNTER_PORT": PORT.to_string(), "COUNTER_INTERVAL_MS": "20", "COUNTER_LOG_EVERY": "100"},
            "ports": ports, "resources": {"memory": "64Mi", "cpus": 0.25},
            "placement": {"tiers": tiers, "runtime": "containerd"}});
        let (status, body) = api.post("/v1/workloads", spec);
        assert_eq!(status, 201, "submit {wname}: {body}");
    };
    // a submitted spec may not choose its own address
    let (status, body) = api.post(
        "/v1/workloads",
        json!({"name": "forged", "image": "away/counter:latest", "overlay": {"network": "default", "vni": 4200,
            "port": 4799, "ip": "10.250.0.9", "prefix_len": 24, "mac": "02:aa:0a:fa:00:09"}}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("overlay"), "{body}");

    // ovc publishes its port on its node (the agent relays it into the workload's namespace)
    submit("ovc", &["cloud", "client"], json!([{"container": PORT}]));
    submit("ovp", &["edge"], json!([]));
    let placed = wait_for(120, || {
        api.get("/v1/workloads/ovc")
            .filter(|w| w["state"] == "running")
            .and_then(|w| w["node"].as_str().map(String::from))
    })
    .expect("ovc running");
    // it moves between cloud and laptop, whichever placement chose first
    let (source, target) = if placed == "cloud" { ("cloud", "laptop") } else { ("laptop", "cloud") };
    let moving = api.wait_running_on("ovc", source);
    eprintln!("ovc running on {source} after {:?}", clock.elapsed());
    let peer = api.wait_running_on("ovp", "edge");
    let (ip, peer_ip) = (overlay_ip(&moving), overlay_ip(&peer));
    let mac = moving["spec"]["overlay"]["mac"].clone();
    assert_ne!(ip, peer_ip);
    let (edge, source_ns) = (netns_of(info, "edge"), netns_of(info, source));
    // each workload has its own namespace, named after its node's containerd namespace
    let ns_of = |node: &str, w: &str| Path::new("/run/netns").join(format!("awo-away-{node}-{w}"));
    assert!(ns_of(source, "ovc").exists() && ns_of("edge", "ovp").exists());

    // before: the edge node (by its own overlay address) and the other workload reach it
    let before = wait_for(20, || count_from(&edge, ip)).expect("the edge node reaches the workload by overlay IP");
    assert!(count_from(&ns_of("edge", "ovp"), ip).is_some(), "workload ovp reaches ovc by overlay IP");
    assert!(count_from(&ns_of(source, "ovc"), peer_ip).is_some(), "workload ovc reaches ovp by overlay IP");
    // a workload of another network: its own node (on both networks) reaches it, the
    // workloads of the default network do not, nor does it reach them
    let (status, body) = api.post(
        "/v1/workloads",
        json!({"name": "ovx", "image": "away/counter:latest", "network": "lab-2",
            "env": {"COUNTER_PORT": PORT.to_string()}, "resources": {"memory": "64Mi", "cpus": 0.25},
            "placement": {"tiers": ["edge"], "runtime": "containerd"}}),
    );
    assert_eq!(status, 201, "submit ovx: {body}");
    let other = api.wait_running_on("ovx", "edge");
    let other_ip = overlay_ip(&other);
    assert_eq!(other["spec"]["overlay"]["network"], "lab-2", "{other}");
    wait_for(20, || count_from(&edge, other_ip)).expect("its node reaches ovx on lab-2");
    assert!(count_from(&ns_of("edge", "ovx"), ip).is_none(), "ovx (lab-2) reaches ovc (default)");
    assert!(count_from(&ns_of("edge", "ovp"), other_ip).is_none(), "ovp (default) reaches ovx (lab-2)");
    assert!(count_from(&ns_of(source, "ovc"), other_ip).is_none(), "ovc (default) reaches ovx (lab-2)");
    // not on the node's own network, but its node relays the published port: from this
    // host, outside the overlay, the node's address answers
    let node_ip = |node: &str| info.nodes.iter().find(|n| n.name == node).unwrap().ip;
    let (source_ip, target_ip) = (node_ip(source), node_ip(target));
    let published = SocketAddr::from((source_ip, PORT));
    let via_port = wait_for(10, || count_at(published)).expect("the published port answers on the node's address");
    assert!(count_from(&source_ns, ip).is_some_and(|n| n >= via_port), "the same counter, by overlay IP");

    // a client on the third node holds a connection while the broker moves the workload
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, reader) = stream_from(&edge, ip, stop.clone());
    wait_for(10, || (seen.lock().unwrap().lines.len() > 20).then_some(())).expect("the stream flows");
    let (status, body) = api.post("/v1/migrations", json!({"workload": "ovc", "to": target}));
    assert!(status == 201 || status == 202, "migration: {status} {body}");
    // the compatibility check said before the move that the connection would stay
    let said = connections_said(&body);
    assert!(said.starts_with(&format!("kept: {ip} on network")), "{said}");
    let id = body["migration"]["id"].as_str().expect("the migration's id").to_string();
    let moved = api.wait_running_on("ovc", target);
    eprintln!("ovc running on {target} after {:?}", clock.elapsed());
    // the report: the same address before and after, and the overlay following it
    let done = wait_for(60, || api.get(&format!("/v1/migrations/{id}")).filter(|m| m["state"] == "succeeded"))
        .expect("the migration succeeds");
    let (follow, unanswered, downtime) = network_followed(&done, ip, &mac);
    println!(
        "the network followed ovc {follow} ms after its resume (asked from {source}; unanswered for {unanswered} ms \
         from the freeze, downtime {downtime} ms)"
    );
    assert_eq!(overlay_ip(&moved), ip, "the same IP after the move");
    assert_eq!(moved["spec"]["overlay"]["mac"], mac, "the same MAC after the move");
    let (lines, gap) = held_through_the_move(&seen, &stop, reader, "the move");
    println!(
        "overlay move {source} -> {target}: {lines} lines over one TCP connection, none lost or repeated; \
         longest gap the client saw {} ms (lines every 20 ms)",
        gap.as_millis()
    );
    wait_for(20, || (!ns_of(source, "ovc").exists()).then_some(())).expect("the source's namespace is removed");
    // the edge node's VXLAN device sends ovc's MAC to the target (learned from the
    // announcement, and set from the broker's list once the move ended)
    let vni = moving["spec"]["overlay"]["vni"].as_u64().unwrap();
    let edge_netns = info.nodes.iter().find(|n| n.name == "edge").unwrap().netns.clone();
    let entry = format!("{} dst {target_ip} ", mac.as_str().unwrap());
    wait_for(10, || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &edge_netns, "bridge", "fdb", "show", "dev", &format!("awx{vni}")])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).contains(&entry).then_some(())
    })
    .unwrap_or_else(|| panic!("edge's forwarding entry for ovc ({entry}) points at the target"));
    // the published port followed: the target's node answers, the source's does not
    let there =
        wait_for(10, || count_at(SocketAddr::from((target_ip, PORT)))).expect("the port is published on the target");
    assert!(there > via_port, "the count went on through the published port: {via_port} then {there}");
    wait_for(10, || count_at(published).is_none().then_some(())).expect("the source no longer publishes the port");
    let moved_to = ns_of(target, "ovc");
    assert!(count_from(&moved_to, peer_ip).is_some(), "ovc reaches ovp after the move");

    // the control: the same move with the connections restored closed (CRIU's
    // tcp-close instead of tcp-established) breaks the client's connection, so the
    // check above cannot pass without the connection really moving
    let stop = Arc::new(AtomicBool::new(false));
    let (closed, reader) = stream_from(&edge, ip, stop.clone());
    wait_for(10, || (closed.lock().unwrap().lines.len() > 20).then_some(())).expect("the second stream flows");
    let (status, body) =
        api.post("/v1/migrations", json!({"workload": "ovc", "to": source, "close_connections": true}));
    assert!(status == 201 || status == 202, "migration: {status} {body}");
    assert!(connections_said(&body).starts_with("closed on request"), "{body}");
    api.wait_running_on("ovc", source);
    eprintln!("ovc back on {source} after {:?}", clock.elapsed());
    let end = wait_for(20, || closed.lock().unwrap().end.clone()).unwrap_or_else(|| {
        panic!("the connection survived a move that closed it: {} lines", closed.lock().unwrap().lines.len())
    });
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    println!("with close_connections the client's connection ended: {end}");

    // after: the same address answers from the new node, with the state it had
    let after = count_from(&edge, ip).expect("the edge node reaches the moved workload");
    assert!(after > before, "the count went on: {before} then {after}");
    assert!(count_from(&ns_of("edge", "ovp"), ip).is_some(), "ovp reaches ovc after the move");
    assert!(count_from(&ns_of(source, "ovc"), peer_ip).is_some(), "ovc reaches ovp after the moves");
}

/// A three-node cluster (cloud, laptop, edge) whose broker runs `--overlay`, its agents
/// online; `wan`: cloud and laptop joined by the emulated WAN. Torn down when dropped.
struct OverlayCluster {
    info: ClusterInfo,
    api: away_e2e::BrokerApi,
    // (fields drop in this order: the link before the cluster)
    wan: Option<away_e2e::wan::NodeLink>,
    _down: Down,
}

fn overlay_cluster(prefix: &str, wan: bool) -> OverlayCluster {
    let clock = Instant::now();
    let name = free_cluster_name(prefix);
    let mut plan =
        cluster_plan(&name, &[("cloud", Tier::Cloud), ("laptop", Tier::Client), ("edge", Tier::Edge)], &["counter"]);
    plan.overlay = Some("10.250.0.0/16".into());
    let info = away_cluster::up(&plan).expect("cluster up");
    eprintln!("cluster up after {:?}", clock.elapsed());
    let _down = Down(name);
    let wan = wan.then(|| away_e2e::wan::NodeLink::up(&info, "cloud", "laptop", away_link::LinkProfile::wan()));
    let api = away_e2e::BrokerApi::new(&info);
    wait_for(60, || {
        api.get("/v1/nodes")
            .filter(|n| n.as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "online").count() == 3))
    })
    .expect("three agents online");
    OverlayCluster { info, api, wan, _down }
}

/// Submit `spec` and wait (up to `secs`) until it runs: the node it was placed on.
fn submit_placed(api: &away_e2e::BrokerApi, spec: Value, secs: u64) -> String {
    let name = spec["name"].as_str().unwrap().to_string();
    let (status, body) = api.post("/v1/workloads", spec);
    assert_eq!(status, 201, "{body}");
    wait_for(secs, || {
        api.workload(&name).filter(|w| w["state"] == "running").and_then(|w| w["node"].as_str().map(String::from))
    })
    .unwrap_or_else(|| panic!("{name} not running after {secs} s"))
}

/// A VM's tap device on `node` (named after its QEMU state directory there).
fn tap_of(info: &ClusterInfo, node: &str, vm: &str) -> String {
    let run = &info.nodes.iter().find(|n| n.name == node).unwrap().run_dir;
    away_overlay::tap_name(&run.join("qemu").join(vm).display().to_string())
}

/// Whether link `name` exists in network namespace `ns`.
fn link_in(ns: &Path, name: &str) -> bool {
    let name = name.to_string();
    inside(ns, move || away_overlay::link_exists(&name).unwrap())
}

/// The counter as a QEMU VM on the overlay (under TCG here): a client on the third node
/// holds one TCP connection to the guest by its overlay address while the broker
/// live-migrates the VM; its tap follows it (made on the target before the incoming
/// QEMU, removed on the source with its QEMU) and QEMU's self-announce moves the MAC.
#[test]
fn vm_on_overlay_keeps_conn() {
    if !away_e2e::require_vm_host() {
        return;
    }
    let (row, _) = move_a_vm_holding_a_connection("ovv", false);
    println!("{row}");
}

/// Issue 18's VM case over the packet-level WAN (37 Mbit/s, 36.784 ms one way) between
/// cloud and laptop, the client on edge: what `vm_on_overlay_keeps_conn` checks, with the
/// live migration's stream and the VXLAN traffic crossing the link. A lab run (about
/// 3 min), its output committed under docs/results/2026-12-03-overlay-wan/.
#[test]
#[ignore = "a lab run over the emulated WAN: cargo test -p away-e2e --test overlay -- --ignored"]
fn vm_over_the_wan_keeps_conn() {
    if !away_e2e::require_vm_host() {
        return;
    }
    let (row, stats) = move_a_vm_holding_a_connection("ovx", true);
    println!(
        "overlay VM over the emulated WAN (37 Mbit/s, 36.784 ms one way) between cloud and laptop; client on edge"
    );
    println!("{row}");
    println!("link: {}", stats.unwrap_or_default());
}

/// The VM move of the two tests above, in a cluster of its own (`wan`: cloud and laptop
/// joined by the emulated WAN). Returns what it measured, and the link's statistics.
fn move_a_vm_holding_a_connection(prefix: &str, wan: bool) -> (String, Option<String>) {
    let clock = Instant::now();
    let cluster = overlay_cluster(prefix, wan);
    let (info, api) = (&cluster.info, &cluster.api);
    let spec = json!({"name": "ovm", "image": "away/counter:latest",
        "env": {"COUNTER_PORT": PORT.to_string(), "COUNTER_INTERVAL_MS": "20", "COUNTER_LOG_EVERY": "100"},
        "ports": [{"container": PORT}], "resources": {"memory": "128Mi", "cpus": 1},
        "placement": {"tiers": ["cloud", "client"], "runtime": "qemu"}});
    let placed = submit_placed(api, spec, 180);
    let (source, target) = if placed == "cloud" { ("cloud", "laptop") } else { ("laptop", "cloud") };
    let w = api.wait_running_on("ovm", source);
    assert_eq!(w["runtime"], "qemu", "{w}");
    let (ip, mac) = (overlay_ip(&w), w["spec"]["overlay"]["mac"].clone());
    let (edge, source_ns, target_ns) = (netns_of(info, "edge"), netns_of(info, source), netns_of(info, target));
    let (source_tap, target_tap) = (tap_of(info, source, "ovm"), tap_of(info, target, "ovm"));
    assert!(link_in(&source_ns, &source_tap), "no tap {source_tap} on {source}");
    assert!(!link_in(&target_ns, &target_tap), "a tap {target_tap} on {target} before the move");
    // the guest boots (TCG) and its counter answers at its overlay address, from another node
    let before = wait_for(90, || count_from(&edge, ip)).expect("the edge node reaches the VM by overlay IP");
    eprintln!("ovm answers on {source} at {ip} after {:?}", clock.elapsed());
    // its published port: the agent relays the node's port to the guest
    let node_ip = |node: &str| info.nodes.iter().find(|n| n.name == node).unwrap().ip;
    let via_port = wait_for(10, || count_at(SocketAddr::from((node_ip(source), PORT))))
        .expect("the published port answers on the node's address");
    assert!(via_port >= before, "{before} then {via_port}");

    if wan {
        // an aborted move: cancelled while its pre-copy crosses the WAN (about 16 s), once
        // the target has made its tap; the destination goes with its tap, the VM runs on
        // (and announces itself) on the source
        let (status, body) = api.post("/v1/migrations", json!({"workload": "ovm", "to": target}));
        assert!(status == 201 || status == 202, "migration: {status} {body}");
        let id = body["migration"]["id"].as_str().unwrap().to_string();
        wait_for(60, || link_in(&target_ns, &target_tap).then_some(())).expect("the target makes its tap");
        let (status, body) = api.delete(&format!("/v1/migrations/{id}"));
        assert!(status == 200 || status == 202, "cancel: {status} {body}");
        let ended = wait_for(120, || {
            api.get(&format!("/v1/migrations/{id}"))
                .filter(|m| ["succeeded", "failed", "cancelled"].contains(&m["state"].as_str().unwrap_or_default()))
        })
        .expect("the cancelled move ends");
        assert_eq!(ended["state"], "cancelled", "{ended}");
        wait_for(30, || (!link_in(&target_ns, &target_tap)).then_some(()))
            .expect("the aborted destination's tap is removed");
        assert!(link_in(&source_ns, &source_tap), "the source's tap went with a cancelled move");
        api.wait_running_on("ovm", source);
        let after = wait_for(20, || count_from(&edge, ip)).expect("the VM answers on the source after the cancel");
        assert!(after > via_port, "{via_port} then {after}");
        eprintln!("cancelled move: the target's tap removed, the VM answers on {source}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (seen, reader) = stream_from(&edge, ip, stop.clone());
    wait_for(20, || (seen.lock().unwrap().lines.len() > 20).then_some(())).expect("the stream flows");
    let (status, body) = api.post("/v1/migrations", json!({"workload": "ovm", "to": target}));
    assert!(status == 201 || status == 202, "migration: {status} {body}");
    let said = connections_said(&body);
    assert!(said.starts_with(&format!("kept: {ip} on network")) && said.contains("QEMU"), "{said}");
    let id = body["migration"]["id"].as_str().unwrap().to_string();
    let done = wait_for(600, || {
        api.get(&format!("/v1/migrations/{id}")).filter(|m| m["state"] == "succeeded" || m["state"] == "failed")
    })
    .expect("the move ends");
    assert_eq!(done["state"], "succeeded", "{done}");
    let (follow, unanswered, _) = network_followed(&done, ip, &mac);
    let moved = api.wait_running_on("ovm", target);
    assert_eq!(overlay_ip(&moved), ip, "the same IP after the move");
    assert_eq!(moved["spec"]["overlay"]["mac"], mac, "the same MAC after the move");
    let (lines, gap) = held_through_the_move(&seen, &stop, reader, "the VM move");
    let r = &done["report"];
    let row = format!(
        "overlay VM move {source} -> {target} (TCG, 128 MiB, vm-live pre-copy): {lines} lines over one TCP \
         connection, none lost or repeated; longest gap the client saw {} ms (lines every 20 ms); move {:.2} s, \
         downtime {:.2} s, {:.0} kB on the wire; the network followed {follow} ms after the resume (asked from \
         {source}, unanswered {unanswered} ms from the STOP)",
        gap.as_millis(),
        r["total_millis"].as_f64().unwrap_or(f64::NAN) / 1e3,
        r["downtime_millis"].as_f64().unwrap_or(f64::NAN) / 1e3,
        r["bytes_wire"].as_f64().unwrap_or(f64::NAN) / 1e3,
    );
    // the tap followed: on the target, gone from the source with its QEMU
    assert!(link_in(&target_ns, &target_tap), "no tap {target_tap} on {target} after the move");
    wait_for(20, || (!link_in(&source_ns, &source_tap)).then_some(())).expect("the source's tap is removed");
    let there = wait_for(10, || count_at(SocketAddr::from((node_ip(target), PORT))))
        .expect("the port is published on the target");
    assert!(there > via_port, "the count went on through the published port: {via_port} then {there}");
    // removed with the workload: nothing left on the node
    let (status, body) = api.delete("/v1/workloads/ovm");
    assert!(status == 200 || status == 202, "{status} {body}");
    wait_for(60, || (!link_in(&target_ns, &target_tap)).then_some(())).expect("the target's tap goes with the VM");
    let stats = cluster.wan.as_ref().map(|l| format!("{:?}", l.link().stats()));
    (row, stats)
}

/// The report's `network` of move `done`: the same address before and after, and the
/// overlay following it; nothing answered while the workload was down (the source's
/// copy is locked or paused, then gone). (follow, unanswered, downtime) in ms.
fn network_followed(done: &Value, ip: Ipv4Addr, mac: &Value) -> (u64, u64, u64) {
    let net = &done["report"]["network"];
    let ip_text = ip.to_string();
    assert_eq!(
        (net["ip_before"].as_str(), net["ip_after"].as_str()),
        (Some(ip_text.as_str()), Some(ip_text.as_str())),
        "{done}"
    );
    assert_eq!(&net["mac"], mac, "{done}");
    let follow = net["follow_millis"].as_u64().unwrap_or_else(|| panic!("the source node never reached it: {done}"));
    let (unanswered, downtime) =
        (net["unanswered_millis"].as_u64().unwrap(), done["report"]["downtime_millis"].as_u64().unwrap());
    assert!(unanswered * 2 >= downtime, "answered {unanswered} ms after the freeze, downtime {downtime} ms: {done}");
    (follow, unanswered, downtime)
}

/// After a move: the stream goes on (50 more lines), then stops; the connection never
/// ended and every line came once and in order. How many lines, and the longest gap.
fn held_through_the_move(
    seen: &Mutex<Seen>,
    stop: &AtomicBool,
    reader: std::thread::JoinHandle<()>,
    what: &str,
) -> (usize, Duration) {
    let at_move = seen.lock().unwrap().lines.len();
    wait_for(20, || (seen.lock().unwrap().lines.len() > at_move + 50).then_some(()))
        .unwrap_or_else(|| panic!("{what}: the stream did not go on: {:?}", seen.lock().unwrap().end));
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.end.is_none(), "{what}: the connection ended: {:?}", seen.end);
    for (i, (n, _)) in seen.lines.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "{what}: line {i} carries {n}: a byte lost or repeated");
    }
    (seen.lines.len(), seen.lines.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap())
}

/// What a migration's compatibility check said about the workload's connections.
fn connections_said(answer: &Value) -> String {
    let migration = &answer["migration"];
    let checks = migration["compatibility"]["checks"].as_array().unwrap_or_else(|| panic!("no checks: {migration}"));
    let rule = checks.iter().find(|r| r["name"] == "connections").unwrap_or_else(|| panic!("{migration}"));
    rule["detail"].as_str().unwrap().to_string()
}

/// Issue 18's check over the packet-level WAN (37 Mbit/s, 36.784 ms one way) between
/// cloud and laptop (away_e2e::wan::NodeLink): the client on edge holds one TCP
/// connection to the counter while it moves between them once in each container mode;
/// every line arrives once and in order. Prints, per mode, the move's report (total,
/// downtime) and the longest gap the client saw. Several minutes: a lab run, not part of
/// CI (`cargo test -p away-e2e --test overlay -- --ignored --nocapture`); its output is
/// committed under docs/results/.
#[test]
#[ignore = "a lab run over the emulated WAN, several minutes: cargo test -p away-e2e --test overlay -- --ignored"]
fn over_the_wan_each_container_mode_keeps_the_connection() {
    if !require_root() {
        return;
    }
    let cluster = overlay_cluster("ovw", true);
    let (info, api) = (&cluster.info, &cluster.api);
    let wan = cluster.wan.as_ref().expect("the WAN link");
    let spec = json!({"name": "ovw", "image": "away/counter:latest",
        "env": {"COUNTER_PORT": PORT.to_string(), "COUNTER_INTERVAL_MS": "20", "COUNTER_LOG_EVERY": "100"},
        "resources": {"memory": "64Mi", "cpus": 0.25},
        "placement": {"tiers": ["cloud", "client"], "runtime": "containerd"}});
    let placed = submit_placed(api, spec, 120);
    let w = api.wait_running_on("ovw", &placed);
    let ip = overlay_ip(&w);
    let edge = netns_of(info, "edge");
    wait_for(20, || count_from(&edge, ip)).expect("the edge node reaches the workload by overlay IP");

    let mut rows = Vec::new();
    let mut at = if placed == "cloud" { "cloud" } else { "laptop" };
    for mode in ["staged", "stop-copy", "lazy"] {
        let to = if at == "cloud" { "laptop" } else { "cloud" };
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, reader) = stream_from(&edge, ip, stop.clone());
        wait_for(10, || (seen.lock().unwrap().lines.len() > 20).then_some(())).expect("the stream flows");
        let (status, body) = api.post("/v1/migrations", json!({"workload": "ovw", "to": to, "mode": mode}));
        assert!(status == 201 || status == 202, "{mode}: {status} {body}");
        assert!(connections_said(&body).starts_with("kept:"), "{body}");
        let id = body["migration"]["id"].as_str().unwrap().to_string();
        let done = wait_for(300, || {
            api.get(&format!("/v1/migrations/{id}")).filter(|m| m["state"] == "succeeded" || m["state"] == "failed")
        })
        .unwrap_or_else(|| panic!("{mode}: the move did not end"));
        assert_eq!(done["state"], "succeeded", "{mode}: {done}");
        api.wait_running_on("ovw", to);
        let (lines, gap) = held_through_the_move(&seen, &stop, reader, mode);
        let r = &done["report"];
        rows.push(format!(
            "| {mode} | {at} → {to} | {lines} | {:.2} | {:.2} | {:.0} | {:.2} |",
            r["total_millis"].as_f64().unwrap_or(f64::NAN) / 1e3,
            r["downtime_millis"].as_f64().unwrap_or(f64::NAN) / 1e3,
            r["bytes_wire"].as_f64().unwrap_or(f64::NAN) / 1e3,
            gap.as_secs_f64(),
        ));
        at = to;
    }
    let stats = wan.link().stats();
    println!("overlay over the emulated WAN (37 Mbit/s, 36.784 ms one way) between cloud and laptop; client on edge");
    println!("| mode | move | lines, none lost or repeated | total s | downtime s | kB on the wire | longest gap the client saw, s |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!("{r}");
    }
    println!("link: {stats:?}");
}
