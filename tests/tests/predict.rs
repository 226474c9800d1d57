//! Predicted moves through a real broker and real agents (away-cluster: each agent in its
//! own network namespace with its own containerd): a dry run measures and predicts and
//! changes nothing; a move that cannot meet the deadline asked for is refused with the
//! prediction; an accepted move carries the prediction in its record and its report.

use std::time::Duration;

use away_e2e::{cluster_plan, free_cluster_name, require_root, wait_for};
use away_model::Tier;
use serde_json::{json, Value};

struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        away_cluster::down(&self.0);
    }
}

struct Api {
    url: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Api {
    fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.url)).bearer_auth(&self.token).send().unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().unwrap()
    }
    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.http.post(format!("{}{path}", self.url)).bearer_auth(&self.token).json(&body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }
    fn running_on(&self, name: &str, node: &str) -> bool {
        let w = self.get(&format!("/v1/workloads/{name}"));
        w["state"] == "running" && w["node"] == node
    }
    fn migrations_of(&self, name: &str) -> usize {
        self.get("/v1/migrations").as_array().unwrap().iter().filter(|m| m["workload"] == name).count()
    }
}

#[test]
fn dry_run_changes_nothing_deadline_refusal_and_predicted_reports() {
    if !require_root() {
        return;
    }
    let name = free_cluster_name("e2p");
    let plan = cluster_plan(&name, &[("cloud", Tier::Cloud), ("laptop", Tier::Client)], &["memload"]);
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = Down(name.clone());
    let api = Api {
        url: info.broker_url.clone(),
        token: info.user_token.clone(),
        http: away_e2e::broker_client_timeout(&info, Duration::from_secs(90)),
    };
    wait_for(30, || {
        let nodes = api.get("/v1/nodes");
        (nodes.as_array().unwrap().iter().filter(|n| n["state"] == "online").count() == 2).then_some(())
    })
    .expect("both agents online");
    let spec = json!({"name": "mem", "image": "away/memload:latest",
        "env": {"MEMLOAD_SIZE": "96Mi", "MEMLOAD_PORT": "0"},
        "resources": {"memory": "192Mi", "cpus": 0.25}});
    let (status, body) = api.post("/v1/workloads", spec);
    assert_eq!(status, 201, "{body}");
    let home = body["workload"]["node"].as_str().unwrap().to_string();
    let to = if home == "cloud" { "laptop" } else { "cloud" };
    wait_for(90, || api.running_on("mem", &home).then_some(())).expect("mem runs where it was placed");
    // memload has filled its memory once its heartbeat says so; give it a moment
    std::thread::sleep(Duration::from_secs(3));

    // 1. a dry run: measured inputs and a prediction per way; nothing recorded, nothing moved
    let (status, dry) = api.post("/v1/migrations?dry_run=true", json!({"workload": "mem", "to": to}));
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["source"], home.as_str());
    assert_eq!(dry["target"], to);
    let plan = &dry["plan"];
    assert!(plan.is_object(), "a plan: {dry}");
    let state = plan["inputs"]["state_bytes"].as_u64().unwrap();
    assert!(state >= 96 << 20, "memload's 96 MiB are measured: {state}");
    let sources = plan["inputs"]["sources"].to_string();
    assert!(sources.contains("measured: probe of") && sources.contains("TCP connects"), "{sources}");
    let link = plan["inputs"]["link_bytes_per_s"].as_f64().unwrap();
    assert!(link > 1e6, "a bridge between namespaces moves more than 1 MB/s: {link}");
    let ways: Vec<&str> = plan["predictions"].as_array().unwrap().iter().map(|p| p["kind"].as_str().unwrap()).collect();
    assert_eq!(ways, ["container-streamed", "container-staged", "container-lazy"], "{plan}");
    for p in plan["predictions"].as_array().unwrap() {
        assert!(p["total_ms"].as_u64().unwrap() > 0 && p["bytes_wire"].as_u64().unwrap() > 0, "{p}");
    }
    assert!(plan["chosen"].is_string(), "{plan}");
    assert_eq!(api.migrations_of("mem"), 0, "a dry run records no migration");
    assert!(api.running_on("mem", &home), "a dry run moves nothing");

    // 2. a deadline the prediction cannot meet: refused, with predicted and asked (96 MiB
    // through a node without history: over 1 s in every way, the check alone 0.6 s)
    let (status, refused) = api.post("/v1/migrations", json!({"workload": "mem", "to": to, "deadline_s": 1}));
    assert_eq!(status, 422, "{refused}");
    let msg = refused["message"].as_str().unwrap();
    assert!(msg.contains("predicted to take") && msg.contains("deadline_s of 1 s"), "{msg}");
    assert!(refused["plan"]["predictions"].is_array(), "the refusal carries the plan: {refused}");
    let (status, refused) = api.post("/v1/migrations", json!({"workload": "mem", "to": to, "max_downtime_ms": 1}));
    assert_eq!(status, 422, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("max_downtime_ms of 1 ms"), "{refused}");
    assert_eq!(api.migrations_of("mem"), 0, "a refused move records nothing");
    assert!(api.running_on("mem", &home));

    // 3. a move the prediction can meet, its mode chosen for the least downtime: the
    // record carries the broker's prediction, the report the source's beside what it measured
    let (status, accepted) =
        api.post("/v1/migrations", json!({"workload": "mem", "to": to, "deadline_s": 600, "optimize": "downtime"}));
    assert_eq!(status, 202, "{accepted}");
    let m = &accepted["migration"];
    assert!(m["predicted"]["downtime_ms"].is_u64(), "{m}");
    let chosen = m["predicted"]["kind"].as_str().unwrap().to_string();
    assert!(m["why"].as_str().unwrap().contains("least downtime"), "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    let done = wait_for(120, || {
        let m = api.get(&format!("/v1/migrations/{id}"));
        (m["state"] == "succeeded" || m["state"] == "failed").then_some(m)
    })
    .expect("the migration ends");
    assert_eq!(done["state"], "succeeded", "{done}");
    let report = &done["report"];
    let predicted = &report["predicted"];
    assert_eq!(predicted["kind"], chosen.as_str(), "the way predicted is the way taken: {report}");
    eprintln!(
        "predicted {chosen}: total {} ms, downtime {} ms; measured total {} ms, downtime {} ms",
        predicted["total_ms"], predicted["downtime_ms"], report["total_millis"], report["downtime_millis"]
    );
    wait_for(60, || api.running_on("mem", to).then_some(())).expect("mem runs on its new node");
}

/// `away migrate --plan` on the source node: the prediction of every way with its
/// inputs, as JSON and as text; the counter stays where it is and the target holds nothing.
#[test]
fn away_migrate_plan_predicts_and_moves_nothing() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let source = away_e2e::Node::at(format!("e2e-plan-src-{id}"), dir.path().join("source"));
    let target = away_e2e::Node::at(format!("e2e-plan-dst-{id}"), dir.path().join("target"));
    let agent = target.start_agent(&format!("plan-target-{id}"), &[], &[], &dir.path().join("agent.log"));
    let counter = source.start_counter(&agent.node, format!("plan-counter-{id}"), "containerd");
    wait_for(20, || away_e2e::counter_state(counter.port)).expect("counter answers");

    let (ok, out, err) = source.away(&["migrate", &counter.name, "--to", &agent.api, "--plan", "--json"]);
    assert!(ok, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["workload"], counter.name.as_str());
    assert!(plan["inputs"]["state_bytes"].as_u64().unwrap() > 0, "{plan}");
    assert!(plan["inputs"]["sources"]["link_bytes_per_s"].as_str().unwrap().starts_with("measured: probe"), "{plan}");
    assert_eq!(plan["predictions"].as_array().unwrap().len(), 3, "{plan}");
    assert!(plan["chosen"].is_string(), "{plan}");

    let (ok, text, err) =
        source.away(&["migrate", &counter.name, "--to", &agent.api, "--plan", "--optimize", "downtime"]);
    assert!(ok, "{err}");
    assert!(text.contains("predicted, nothing moved") && text.contains("container-lazy"), "{text}");
    assert!(text.contains("chosen:") && text.contains("the least downtime predicted"), "{text}");
    assert!(source.running(&counter.name), "the plan moved nothing");
    assert!(!agent.node.running(&counter.name), "the target holds nothing");
}
