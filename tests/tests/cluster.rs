//! Broker and agents end to end: a real broker and real agents, each agent in its own
//! network namespace with its own containerd (away-cluster), driven over the broker's
//! HTTP API the way users drive it.
//!
//! One test function runs the scenarios in order on one cluster: starting a cluster
//! costs a few seconds, and the scenarios build on each other (the broker restart must
//! find what the earlier steps placed).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use away_cluster::ClusterInfo;
use away_e2e::{away_bin, cluster_plan, require_root, wait_for};
use away_model::Tier;
use serde_json::{json, Value};

const NAME: &str = "e2e";

struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        away_cluster::down(NAME);
    }
}

/// GET on a node's address (not loopback: the node's own namespace).
fn get_at(ip: &str, port: u16, path: &str) -> Option<String> {
    away_e2e::http_get_at(ip.parse().ok()?, port, path)
}

fn counter_state(ip: &str) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&get_at(ip, 18080, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

/// Instances of `name` running across all nodes, as the nodes' own runtimes report them.
fn instances(info: &ClusterInfo, name: &str) -> usize {
    info.nodes
        .iter()
        .map(|n| {
            let mut c = std::process::Command::new(away_bin());
            for (k, v) in n.env() {
                c.env(k, v);
            }
            let out = c.args(["ps", "--json"]).output().unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            v["workloads"]
                .as_array()
                .map(|a| a.iter().filter(|w| w["name"] == name && w["state"] == "running").count())
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn broker_places_moves_survives_restarts_and_cut_links() {
    if !require_root() {
        return;
    }
    away_cluster::down(NAME);
    let plan =
        cluster_plan(NAME, &[("cloud", Tier::Cloud), ("laptop", Tier::Client)], &["counter", "labdesk", "memload"]);
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = Down;
    let api = away_e2e::BrokerApi::new(&info);
    wait_for(30, || {
        api.get("/v1/nodes")
            .filter(|n| n.as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "online").count() == 2))
    })
    .expect("both agents registered and online");

    // 0. the cluster's tokens are on no command line (`ps` shows those to every user) and
    // in no file others can read
    let run = Path::new("/run/away/cluster").join(NAME);
    let mut pidfiles = vec![run.join("broker.pid")];
    pidfiles.extend(info.nodes.iter().map(|n| run.join(&n.name).join("agent.pid")));
    let join = std::fs::read_to_string(run.join("join-token")).expect("join-token");
    for pidfile in pidfiles {
        let pid = std::fs::read_to_string(&pidfile).expect("pidfile");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&info.user_token) && !cmdline.contains(join.trim()),
            "a token on {}'s command line: {cmdline}",
            pidfile.display()
        );
    }
    for (path, mode) in [(run.clone(), 0o700), (run.join("cluster.json"), 0o600), (run.join("join-token"), 0o600)] {
        let meta = std::fs::metadata(&path).expect("cluster file");
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{}", path.display());
    }

    // 1. each lab app, submitted over HTTP, runs on the node its constraints point to
    let submit = |name: &str, image: &str, env: Value, tiers: &[&str]| {
        let spec = json!({"name": name, "image": image, "env": env, "resources": {"memory": "64Mi", "cpus": 0.25}, "placement": {"tiers": tiers}});
        let (status, body) = api.post("/v1/workloads", spec);
        assert_eq!(status, 201, "submit {name}: {body}");
        body
    };
    let placed = submit("labdesk", "away/labdesk:latest", json!({"LABDESK_PORT": "18081"}), &["client"]);
    assert_eq!(placed["workload"]["node"], "laptop");
    assert!(
        placed["placement"]["filtered"].to_string().contains("cloud"),
        "the explanation names the filtered node: {placed}"
    );
    submit("memload", "away/memload:latest", json!({"MEMLOAD_SIZE": "16Mi", "MEMLOAD_PORT": "18082"}), &["cloud"]);
    // no constraint: the scores decide, and the answer shows both nodes' scores
    let placed = submit("counter", "away/counter:latest", json!({"COUNTER_PORT": "18080"}), &[]);
    assert_eq!(placed["placement"]["scores"].as_array().map(|a| a.len()), Some(2), "{placed}");
    let home = placed["workload"]["node"].as_str().unwrap().to_string();
    let away_to = if home == "cloud" { "laptop" } else { "cloud" };
    api.wait_running_on("counter", &home);
    api.wait_running_on("labdesk", "laptop");
    api.wait_running_on("memload", "cloud");
    let (cloud, laptop) = (api.node_ip("cloud"), api.node_ip("laptop"));
    let (home_ip, away_ip) = (api.node_ip(&home), api.node_ip(away_to));
    assert!(wait_for(20, || get_at(&laptop, 18081, "/state")).is_some(), "labdesk answers on the laptop");
    assert!(wait_for(20, || get_at(&cloud, 18082, "/")).is_some(), "memload answers in the cloud");
    let logs = api
        .http
        .get(format!("{}/v1/workloads/counter/logs", info.broker_url))
        .bearer_auth(&info.user_token)
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(logs.contains("counter: "), "logs through the broker: {logs}");

    // 2. counter moves between the agents through the broker; the count goes on
    let before = wait_for(20, || counter_state(&home_ip).filter(|s| s.0 >= 10)).expect("counter counts");
    let (status, body) = api.post("/v1/migrations", json!({"workload": "counter", "to": away_to}));
    assert_eq!(status, 202, "{body}");
    let id = body["migration"]["id"].as_str().unwrap().to_string();
    let done = wait_for(60, || {
        api.get(&format!("/v1/migrations/{id}")).filter(|m| m["state"] == "succeeded" || m["state"] == "failed")
    })
    .expect("migration ends");
    assert_eq!(done["state"], "succeeded", "{done}");
    api.wait_running_on("counter", away_to);
    let after = wait_for(20, || counter_state(&away_ip)).expect("counter answers on its new node");
    assert_eq!(after.1, before.1, "counter restarted instead of moving");
    assert!(after.0 >= before.0);
    assert_eq!(instances(&info, "counter"), 1);
    // the counter and labdesk on the laptop for the link cut below
    if away_to != "laptop" {
        let (status, body) = api.post("/v1/migrations", json!({"workload": "counter", "to": "laptop"}));
        assert_eq!(status, 202, "{body}");
        api.wait_running_on("counter", "laptop");
    }
    let after = wait_for(20, || counter_state(&laptop)).expect("counter answers on the laptop");

    // 3. the broker goes away: agents keep their workloads; it comes back with the same picture
    away_cluster::stop_broker(NAME);
    std::thread::sleep(Duration::from_secs(3));
    let during = counter_state(&laptop).expect("counter keeps running without the broker");
    assert!(during.0 > after.0);
    away_cluster::start_broker(NAME).expect("broker restarts");
    for (name, node) in [("counter", "laptop"), ("labdesk", "laptop"), ("memload", "cloud")] {
        api.wait_running_on(name, node);
    }
    assert_eq!(api.get("/v1/nodes").unwrap().as_array().unwrap().len(), 2);
    assert!(
        api.get(&format!("/v1/migrations/{id}")).is_some_and(|m| m["state"] == "succeeded"),
        "the migration record survived the restart"
    );

    // 4. the laptop loses its link: its workloads go on; back online, nothing is duplicated
    away_cluster::set_link(NAME, "laptop", false).unwrap();
    let laptop_state = || api.get("/v1/nodes/laptop").map(|n| n["state"].as_str().unwrap_or("").to_string());
    wait_for(30, || laptop_state().filter(|s| s == "offline")).expect("the broker sees the laptop go offline");
    // cut off, the laptop keeps its work; its count is checked once it is back
    std::thread::sleep(Duration::from_secs(3));
    away_cluster::set_link(NAME, "laptop", true).unwrap();
    wait_for(30, || laptop_state().filter(|s| s == "online")).expect("the laptop is back online");
    api.wait_running_on("counter", "laptop");
    api.wait_running_on("labdesk", "laptop");
    let later = wait_for(20, || counter_state(&laptop)).unwrap();
    assert_eq!(later.1, before.1, "the counter is still the same process");
    assert!(later.0 > during.0);
    for name in ["counter", "labdesk", "memload"] {
        assert_eq!(instances(&info, name), 1, "{name} runs exactly once");
    }
}
