//! A broker migration cancelled while its source moves it (docs/reliability.md,
//! "Deadlines and cancel"): a real broker and two real agents (away-cluster, each in its
//! own network namespace with its own containerd), the counter moved by stop-and-copy
//! (staged). The source agent holds between the target's "restored" and its commit
//! (`AWAY_FAULT_HOLD_BEFORE_COMMIT`, a fault-injection build) so that the cancel lands
//! in that window for sure: `DELETE /v1/migrations/{id}` answers 202, the source hears
//! it with its next heartbeat, has the target remove its prepared copy and resumes its
//! own; the migration ends `cancelled`, the workload stays on the source with its count
//! going on, and nothing of it is left on the target. The same without a `DELETE`: a
//! migration whose deadline passes while its online source holds is cancelled by the
//! broker the same way (before, the broker left it to the source, which committed).

use away_e2e::{
    broker_call, cluster_counter_state, cluster_plan, free_cluster_name, on_cluster_node, require_root, require_socket,
    wait_for,
};
use away_model::Tier;
use serde_json::json;

/// How long the source holds before its commit (the window the cancel lands in).
const HOLD_SECS: &str = "20";

#[test]
fn a_cancel_under_way_is_aborted_by_the_source_before_its_commit() {
    cancelled_under_way(None);
}

/// Deadline (s) of the migration that ends by it: passes while the source holds.
const DEADLINE_SECS: u64 = 12;

#[test]
fn a_migration_past_its_deadline_is_cancelled_through_its_online_source() {
    cancelled_under_way(Some(DEADLINE_SECS));
}

/// One case at a time: with both clusters (two containerds each) up at once on two
/// busy cores, the DELETE case once saw no restored copy on the target within its wait.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A migration cancelled while its source holds before the commit: by `DELETE` (None),
/// or by its deadline (`Some(seconds)`).
fn cancelled_under_way(deadline: Option<u64>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !(require_root() && require_socket("/run/containerd/containerd.sock", "containerd")) {
        return;
    }
    let name = free_cluster_name(if deadline.is_some() { "cd" } else { "cm" });
    // inherited by the cluster's agents (a fault-injection build of away)
    std::env::set_var("AWAY_FAULT_HOLD_BEFORE_COMMIT", HOLD_SECS);
    let plan = cluster_plan(&name, &[("a", Tier::Cloud), ("b", Tier::Edge)], &["counter"]);
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = away_e2e::ClusterDown(name.clone());
    wait_for(30, || {
        let (_, nodes) = broker_call(&info, reqwest::Method::GET, "/v1/nodes", None);
        nodes.as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "online").count() == 2).then_some(())
    })
    .expect("both agents online");
    let spec = json!({"name": "counter", "image": "away/counter:latest", "env": {"COUNTER_PORT": "18090"},
        "resources": {"memory": "64Mi", "cpus": 0.25}, "placement": {"tiers": ["cloud", "edge"]}});
    let (s, placed) = broker_call(&info, reqwest::Method::POST, "/v1/workloads", Some(spec));
    assert_eq!(s, 201, "{placed}");
    // the scores pick the source; the other node is the target
    let src = placed["workload"]["node"].as_str().unwrap().to_string();
    let dst = if src == "a" { "b" } else { "a" };
    let src_ip = info.nodes.iter().find(|n| n.name == src).unwrap().ip.to_string();
    let before =
        wait_for(90, || cluster_counter_state(&src_ip).filter(|s| s.0 >= 5)).expect("the counter counts on its node");

    let mut order = json!({"workload": "counter", "to": dst, "mode": "staged"});
    if let Some(d) = deadline {
        order["deadline_s"] = d.into();
    }
    let (s, m) = broker_call(&info, reqwest::Method::POST, "/v1/migrations", Some(order));
    assert_eq!(s, 202, "{m}");
    let id = m["migration"]["id"].as_str().unwrap().to_string();
    if deadline.is_none() {
        // restored on the target, held there for the commit the source holds back
        wait_for(60, || (on_cluster_node(&info, dst, "counter").as_deref() == Some("running")).then_some(()))
            .expect("the target restored its copy");
        let (s, m) = broker_call(&info, reqwest::Method::DELETE, &format!("/v1/migrations/{id}"), None);
        assert_eq!((s, m["state"].as_str()), (202, Some("running")), "{m}");
        assert!(m["cancel_requested_ms"].as_u64().is_some(), "{m}");
    }

    let ended = wait_for(90, || {
        let (_, m) = broker_call(&info, reqwest::Method::GET, &format!("/v1/migrations/{id}"), None);
        (m["state"] != "running" && m["state"] != "pending").then_some(m)
    })
    .expect("the migration ends");
    assert_eq!(ended["state"], "cancelled", "{ended}");
    assert!(ended["error"].as_str().unwrap_or_default().contains("cancelled"), "{ended}");
    // one instance, on the source, the same process going on
    let after = wait_for(30, || cluster_counter_state(&src_ip)).expect("the counter answers on its node");
    assert_eq!(after.1, before.1, "the counter restarted instead of resuming");
    assert!(after.0 >= before.0, "count went back: {} -> {}", before.0, after.0);
    assert_eq!(on_cluster_node(&info, &src, "counter").as_deref(), Some("running"));
    assert_eq!(on_cluster_node(&info, dst, "counter"), None, "the target kept its copy");
    let (_, w) = broker_call(&info, reqwest::Method::GET, "/v1/workloads/counter", None);
    assert_eq!(w["node"].as_str(), Some(src.as_str()), "{w}");
    // no spool on the target, no checkpoint kept but the failed one on the source
    let target = info.nodes.iter().find(|n| n.name == dst).unwrap();
    let spool = target.env().into_iter().find(|(k, _)| k == "AWAY_STATE_DIR").map(|(_, v)| v).unwrap();
    let left: Vec<_> = std::fs::read_dir(std::path::Path::new(&spool).join("transfers"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "the target kept transfer data: {left:?}");
    if deadline.is_some() {
        assert!(ended["cancel_requested_ms"].as_u64().is_some(), "the broker did not send the cancel: {ended}");
    }
    eprintln!("cancelled under way ({:?}): count {} -> {}", deadline, before.0, after.0);
}
