//! The source agent SIGKILLed in the middle of a broker migration (docs/reliability.md,
//! "The source's journal"): a real broker and two real agents (away-cluster, each in its
//! own network namespace with its own containerd), the counter moved by stop-and-copy
//! (staged). The source agent kills itself with SIGKILL (`AWAY_FAULT_SOURCE_DIE`, a
//! fault-injection build) at one point of the move and is started again on the same
//! state, as a supervisor would:
//!
//! * `before-commit`: the target has restored its copy and holds it as prepared; the
//!   restarted source finds the move `sent` in its journal, commits it, removes its
//!   stopped container and checkpoint: the migration succeeds;
//! * `after-checkpoint` (lab run): the workload is stopped and checkpointed, nothing has
//!   been sent; the target knows no such move; the restarted source resumes the counter
//!   from its checkpoint: the migration fails, the workload stays on the source.
//!
//! * `broker`: the broker is SIGKILLed while the source holds before its commit
//!   (`AWAY_FAULT_HOLD_BEFORE_COMMIT`) and started again on its database 3 s later; the
//!   agents work on offline, the source commits, and its queued `migration-finished`
//!   ends the migration `succeeded` when the broker is back.
//!
//! Either way: exactly one instance, its count going on from the same start, no
//! checkpoint of the move left active on the source, no spool on the target, and the
//! broker's record of the workload names the node it runs on. Before the journal the
//! source left the counter stopped with its checkpoint for nobody (zero instances).
//! CI runs `before-commit` once; `AWAY_FAULT_MATRIX=full` runs both three times.

use away_cluster::ClusterInfo;
use away_e2e::{
    broker_call, cluster_counter_state, cluster_plan, free_cluster_name, on_cluster_node, require_root, require_socket,
    wait_for,
};
use away_model::Tier;
use serde_json::json;

fn state_dir(info: &ClusterInfo, node: &str) -> std::path::PathBuf {
    info.nodes.iter().find(|n| n.name == node).unwrap().state_dir.clone()
}

fn entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

/// The cases set the agents' fault variables in this process's environment: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn case(at: &str, run: u32) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>5.1} s] {what}", t0.elapsed().as_secs_f64());
    let name = free_cluster_name("sc");
    // inherited by the cluster's agents (a fault-injection build of away); only a
    // source acts on it
    let (var, value) =
        if at == "broker" { ("AWAY_FAULT_HOLD_BEFORE_COMMIT", "10") } else { ("AWAY_FAULT_SOURCE_DIE", at) };
    std::env::set_var(var, value);
    let plan = cluster_plan(&name, &[("a", Tier::Cloud), ("b", Tier::Edge)], &["counter"]);
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = away_e2e::ClusterDown(name.clone());
    step("cluster up");
    wait_for(30, || {
        let (_, nodes) = broker_call(&info, reqwest::Method::GET, "/v1/nodes", None);
        nodes.as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "online").count() == 2).then_some(())
    })
    .expect("both agents online");
    let spec = json!({"name": "counter", "image": "away/counter:latest", "env": {"COUNTER_PORT": "18090"},
        "resources": {"memory": "64Mi", "cpus": 0.25}, "placement": {"tiers": ["cloud", "edge"]}});
    let (s, placed) = broker_call(&info, reqwest::Method::POST, "/v1/workloads", Some(spec));
    assert_eq!(s, 201, "{placed}");
    let src = placed["workload"]["node"].as_str().unwrap().to_string();
    let dst = if src == "a" { "b" } else { "a" }.to_string();
    let ip = |n: &str| info.nodes.iter().find(|x| x.name == n).unwrap().ip.to_string();
    let src_api = info.nodes.iter().find(|x| x.name == src).unwrap().api.clone();
    let before = wait_for(90, || cluster_counter_state(&ip(&src)).filter(|s| s.0 >= 5)).expect("the counter counts");

    let (s, m) = broker_call(
        &info,
        reqwest::Method::POST,
        "/v1/migrations",
        Some(json!({"workload": "counter", "to": dst, "mode": "staged"})),
    );
    assert_eq!(s, 202, "{m}");
    let id = m["migration"]["id"].as_str().unwrap().to_string();
    step("migration asked");
    if at == "broker" {
        // once the target holds its copy (the source holds before its commit)
        wait_for(90, || (on_cluster_node(&info, &dst, "counter").as_deref() == Some("running")).then_some(()))
            .expect("the target restored its copy");
        let pidfile = std::path::Path::new("/run/away/cluster").join(&name).join("broker.pid");
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
        assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
        step("the broker was killed");
        std::env::remove_var(var);
        std::thread::sleep(std::time::Duration::from_secs(3));
        away_cluster::start_broker(&name).expect("restart the broker");
    } else {
        // the source agent kills itself at the fault point: its API goes silent
        let api_down = || {
            let addr: std::net::SocketAddr = src_api.parse().unwrap();
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)).is_err()
        };
        wait_for(90, || api_down().then_some(())).expect("the source agent died at the fault point");
        let log = std::path::Path::new("/run/away/cluster").join(&name).join(&src).join("agent.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.contains(&format!("AWAY_FAULT_SOURCE_DIE={at}")), "the fault did not fire at {at}:\n{text}");
        // nothing runs the counter now (stopped on the source; on the target, at most the
        // prepared copy)
        assert_ne!(
            on_cluster_node(&info, &src, "counter").as_deref(),
            Some("running"),
            "the source still runs the counter"
        );
        step("the source agent died");
        std::env::remove_var("AWAY_FAULT_SOURCE_DIE");
        std::thread::sleep(std::time::Duration::from_secs(2));
        away_cluster::restart_agent(&name, &src).expect("restart the source agent");
    }

    let ended = wait_for(150, || {
        let (_, m) = broker_call(&info, reqwest::Method::GET, &format!("/v1/migrations/{id}"), None);
        (m["state"].as_str().is_some_and(|s| s != "running" && s != "pending")).then_some(m)
    })
    .expect("the migration ends after the source's restart");
    step("the migration ended");
    let (home, other) = match at {
        "before-commit" | "broker" => {
            assert_eq!(ended["state"], "succeeded", "{ended}");
            (dst.clone(), src.clone())
        }
        _ => {
            assert_eq!(ended["state"], "failed", "{ended}");
            (src.clone(), dst.clone())
        }
    };
    // exactly one instance, the same process going on
    let after = wait_for(30, || cluster_counter_state(&ip(&home))).expect("the counter answers where it lives");
    assert_eq!(after.1, before.1, "the counter restarted instead of going on");
    assert!(after.0 >= before.0, "count went back: {} -> {}", before.0, after.0);
    wait_for(30, || (on_cluster_node(&info, &other, "counter").is_none()).then_some(()))
        .unwrap_or_else(|| panic!("{other} keeps a copy: {:?}", on_cluster_node(&info, &other, "counter")));
    assert_eq!(on_cluster_node(&info, &home, "counter").as_deref(), Some("running"));
    // the broker agrees
    let w = wait_for(30, || {
        let (_, w) = broker_call(&info, reqwest::Method::GET, "/v1/workloads/counter", None);
        (w["node"].as_str() == Some(home.as_str())).then_some(w)
    });
    assert!(w.is_some(), "the broker does not place the counter on {home}");
    // nothing left: no active checkpoint on the source (none at all after a commit), no
    // spool on the target
    let ck = state_dir(&info, &src).join("checkpoints");
    assert!(entries(&ck.join("active")).is_empty(), "the source keeps an active checkpoint: {:?}", entries(&ck));
    if at != "after-checkpoint" {
        assert!(entries(&ck.join("failed")).is_empty(), "the source kept its checkpoint after the commit");
    }
    let spool = entries(&state_dir(&info, &dst).join("transfers"));
    assert!(spool.is_empty(), "the target kept transfer data: {spool:?}");
    eprintln!("source killed at {at} (run {run}): {} on {home}, count {} -> {}", ended["state"], before.0, after.0);
}

fn ready() -> bool {
    require_root() && require_socket("/run/containerd/containerd.sock", "containerd")
}

#[test]
fn a_source_agent_killed_in_its_move_finishes_it_when_it_starts_again() {
    if !ready() {
        return;
    }
    let full = std::env::var("AWAY_FAULT_MATRIX").as_deref() == Ok("full");
    let cells: &[(&str, u32)] =
        if full { &[("before-commit", 3), ("after-checkpoint", 3)] } else { &[("before-commit", 1)] };
    for (at, runs) in cells {
        for run in 0..*runs {
            case(at, run);
        }
    }
}

/// The broker SIGKILLed during a move (docs/reliability.md, fault matrix).
#[test]
fn a_broker_killed_during_a_move_sees_it_end_when_it_is_back() {
    if !ready() {
        return;
    }
    let runs = if std::env::var("AWAY_FAULT_MATRIX").as_deref() == Ok("full") { 3 } else { 1 };
    for run in 0..runs {
        case("broker", run);
    }
}
