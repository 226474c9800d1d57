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

use away_e2e::{broker_call, on_cluster_node, require_root, require_socket, wait_for, CounterCluster};
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
    // inherited by the cluster's agents (a fault-injection build of away)
    std::env::set_var("AWAY_FAULT_HOLD_BEFORE_COMMIT", HOLD_SECS);
    let c = CounterCluster::up(if deadline.is_some() { "cd" } else { "cm" });
    let (src, dst) = (c.src.as_str(), c.dst.as_str());
    let before = c.before;
    let id = c.migrate("staged", deadline.map_or_else(|| json!({}), |d| json!({"deadline_s": d})));
    if deadline.is_none() {
        // restored on the target, held there for the commit the source holds back
        wait_for(60, || (on_cluster_node(&c.info, dst, "counter").as_deref() == Some("running")).then_some(()))
            .expect("the target restored its copy");
        let (s, m) = broker_call(&c.info, reqwest::Method::DELETE, &format!("/v1/migrations/{id}"), None);
        assert_eq!((s, m["state"].as_str()), (202, Some("running")), "{m}");
        assert!(m["cancel_requested_ms"].as_u64().is_some(), "{m}");
    }

    let ended = c.ended(&id, 90);
    assert_eq!(ended["state"], "cancelled", "{ended}");
    assert!(ended["error"].as_str().unwrap_or_default().contains("cancelled"), "{ended}");
    // one instance, on the source, the same process going on; nothing on the target, no
    // spool, no checkpoint kept but the failed one on the source
    let count = c.assert_one_instance_on(src);
    if deadline.is_some() {
        assert!(ended["cancel_requested_ms"].as_u64().is_some(), "the broker did not send the cancel: {ended}");
    }
    // the target's copy was restored well (its verdict ok): no spool of it either
    let spool = c.node(dst).state_dir.join("transfers");
    let left: Vec<_> = std::fs::read_dir(&spool).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "the target kept transfer data: {left:?}");
    eprintln!("cancelled under way ({:?}): count {} -> {count}", deadline, before.0);
}
