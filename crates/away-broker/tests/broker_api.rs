//! The broker's HTTP API, in-process on 127.0.0.1:0 with a temporary database, driven
//! by fake agents (register + heartbeats with synthetic fingerprints). This tests the
//! broker's logic: placement, reconciliation, migration checks, errors, persistence.
//! Runs without root or daemons.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use away_broker::{Broker, BrokerConfig};
use away_model::{
    Accel, AgentEvent, Arch, CpuInfo, CpuVendor, Desired, Heartbeat, HeartbeatResponse, HypervisorInfo, LinkInfo,
    MigrationMode, MigrationReport, NodeInfo, NodeLoad, RegisterRequest, RegisterResponse, RuntimeInfo, RuntimeKind,
    Tier, WorkloadState, WorkloadStatus,
};
use serde_json::{json, Value};

const USER: &str = "user-secret";
const JOIN: &str = "join-secret";

struct Running {
    url: String,
    broker: Arc<Broker>,
    server: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

impl Running {
    async fn start(db: &Path) -> Running {
        Running::start_with_timeout(db, Duration::from_secs(30)).await
    }

    /// A broker whose nodes count as offline after `node_timeout` without a heartbeat.
    async fn start_with_timeout(db: &Path, node_timeout: Duration) -> Running {
        Running::start_with(db, node_timeout, None).await
    }

    async fn start_with(
        db: &Path,
        node_timeout: Duration,
        overlay: Option<away_broker::overlay::OverlayConfig>,
    ) -> Running {
        let mut config = BrokerConfig::new(vec![USER.into()], JOIN.into());
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.db_path = db.to_path_buf();
        config.heartbeat_interval = Duration::from_millis(200);
        config.node_timeout = node_timeout;
        config.overlay = overlay;
        let broker = Arc::new(Broker::open(config).expect("open broker"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let b = broker.clone();
        let server = tokio::spawn(async move {
            let _ = away_broker::serve(b, listener).await;
        });
        Running { url, broker, server, http: away_identity::http::client_builder(None).build().unwrap() }
    }

    async fn stop(self) {
        self.server.abort();
        let _ = self.server.await;
        drop(self.broker);
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("broker answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(USER), None).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(USER), Some(body)).await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, Some(USER), None).await
    }

    async fn register(&self, node: &NodeInfo, api_addr: &str) -> RegisterResponse {
        let (status, body) = self.register_with(JOIN, node, api_addr).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    /// A registration with join token `token`, answered as it is.
    async fn register_with(&self, token: &str, node: &NodeInfo, api_addr: &str) -> (u16, Value) {
        let req = RegisterRequest {
            node: node.clone(),
            api_addr: api_addr.into(),
            transfer_addr: "127.0.0.1:1".into(),
            csr: None,
        };
        self.call(reqwest::Method::POST, "/v1/agents/register", Some(token), Some(serde_json::to_value(req).unwrap()))
            .await
    }

    async fn beat(
        &self,
        node: &NodeInfo,
        token: &str,
        workloads: Vec<WorkloadStatus>,
        events: Vec<AgentEvent>,
    ) -> HeartbeatResponse {
        let hb = Heartbeat { node: node.clone(), load: NodeLoad::default(), workloads, events, crl_number: None };
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/agents/{}/heartbeat", node.name),
                Some(token),
                Some(serde_json::to_value(hb).unwrap()),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }
}

fn node(name: &str, tier: Tier, vendor: CpuVendor) -> NodeInfo {
    let rt = |kind| RuntimeInfo { kind, version: "1.7".into(), healthy: true, checkpoint: true, detail: String::new() };
    NodeInfo {
        name: name.into(),
        tier,
        arch: Arch("amd64".into()),
        cpu: CpuInfo {
            vendor,
            model: "fake".into(),
            family: None,
            model_number: None,
            cores: 8,
            flags: ["sse4_2", "avx", "avx2"].iter().map(|s| s.to_string()).collect(),
        },
        memory_bytes: 16 << 30,
        kernel: "6.1".into(),
        runtimes: vec![rt(RuntimeKind::Containerd), rt(RuntimeKind::Docker), rt(RuntimeKind::Qemu)],
        hypervisor: Some(HypervisorInfo { qemu_version: "7.2.0".into(), accel: Accel::Tcg, reason: "test".into() }),
        link: Some(LinkInfo { rate_mbit: 1000.0, latency_ms: 1.0 }),
        labels: Default::default(),
        disk_bases: Default::default(),
    }
}

fn status(name: &str, runtime: RuntimeKind, state: WorkloadState) -> WorkloadStatus {
    WorkloadStatus {
        name: name.into(),
        runtime,
        state,
        image: "away/counter:latest".into(),
        pid: Some(42),
        exit_code: None,
        ports: vec![],
        detail: String::new(),
    }
}

fn event(
    seq: u64,
    kind: &str,
    workload: &str,
    migration_id: Option<&str>,
    report: Option<MigrationReport>,
) -> AgentEvent {
    AgentEvent {
        seq,
        at_ms: 1,
        kind: kind.into(),
        workload: Some(workload.into()),
        message: format!("{kind} (test)"),
        migration_id: migration_id.map(str::to_string),
        report,
    }
}

fn report(workload: &str, source: &str, target: &str) -> MigrationReport {
    MigrationReport {
        workload: workload.into(),
        mode: MigrationMode::StopAndCopy,
        source: source.into(),
        target: target.into(),
        phases: vec![],
        total_millis: 900,
        downtime_millis: 700,
        degraded_millis: 0,
        resumed_unix_ms: None,
        started_unix_ms: None,
        bytes_raw: 1 << 20,
        paged_bytes_raw: 0,
        bytes_wire: 1 << 19,
        reason: "test".into(),
        ok: true,
        error: None,
        predicted: None,
        volumes: None,
        network: None,
    }
}

fn assignment<'a>(r: &'a HeartbeatResponse, name: &str) -> Option<&'a away_model::Assignment> {
    r.assignments.iter().find(|a| a.spec.name == name)
}

#[tokio::test]
async fn placement_assignments_migration_and_reconciliation() {
    let dir = tempfile::tempdir().unwrap();
    let b = Running::start(&dir.path().join("broker.db")).await;
    let cloud = node("cloud-1", Tier::Cloud, CpuVendor::Amd);
    let laptop = node("laptop", Tier::Client, CpuVendor::Intel);
    let t_cloud = b.register(&cloud, "127.0.0.1:1").await.agent_token;
    let t_laptop = b.register(&laptop, "127.0.0.1:1").await.agent_token;

    // dry run explains and stores nothing
    let spec = json!({"name": "counter", "image": "away/counter:latest", "placement": {"prefer_client": true}});
    let (s, body) = b.post("/v1/workloads?dry_run=true", spec.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["placement"]["chosen"], "laptop");
    assert!(body.get("workload").is_none());
    assert_eq!(b.get("/v1/workloads").await.1, json!([]));

    // placed on the user's client, as a container, with the reasons
    let (s, body) = b.post("/v1/workloads", spec.clone()).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["workload"]["node"], "laptop");
    assert_eq!(body["placement"]["scores"][0]["parts"]["prefer_client"], 40.0);
    assert!(body["placement"]["why"].as_str().unwrap().starts_with("counter on laptop"), "{body}");

    // the client's heartbeat carries the assignment, the cloud's does not
    let r = b.beat(&laptop, &t_laptop, vec![], vec![]).await;
    let a = assignment(&r, "counter").expect("assigned to the laptop");
    assert_eq!((a.desired, a.runtime), (Desired::Running, Some(RuntimeKind::Containerd)));
    assert!(assignment(&b.beat(&cloud, &t_cloud, vec![], vec![]).await, "counter").is_none());

    // the agent reports it running: status shows up
    let running = vec![status("counter", RuntimeKind::Containerd, WorkloadState::Running)];
    let r =
        b.beat(&laptop, &t_laptop, running.clone(), vec![event(1, "workload-started", "counter", None, None)]).await;
    assert_eq!(r.acked_seq, 1);
    let (_, w) = b.get("/v1/workloads/counter").await;
    assert_eq!(w["state"], "running", "{w}");
    assert_eq!(w["status"]["pid"], 42);
    assert_eq!(w["decision"]["runtime"], "containerd");

    // a mode the agents do not know is refused, naming the field
    let (s, body) = b.post("/v1/migrations", json!({"workload": "counter", "to": "cloud-1", "mode": "fast"})).await;
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("stop-copy, staged, lazy or auto"), "{body}");
    // a container moves across CPU vendors (Intel laptop -> AMD cloud), lazily as asked
    let (s, body) = b.post("/v1/migrations", json!({"workload": "counter", "to": "cloud-1", "mode": "lazy"})).await;
    assert_eq!(s, 202, "{body}");
    let id = body["migration"]["id"].as_str().unwrap().to_string();
    assert_eq!(body["migration"]["state"], "pending");
    assert!(body["migration"]["compatibility"]["reason"].as_str().unwrap().contains("across CPU vendors"), "{body}");
    // a second request while it is under way conflicts
    assert_eq!(b.post("/v1/migrations", json!({"workload": "counter"})).await.0, 409);

    // the source gets the order; no assignment while the move is in flight
    let r = b.beat(&laptop, &t_laptop, running.clone(), vec![]).await;
    assert_eq!(r.migrations.len(), 1);
    assert_eq!(r.migrations[0].target_node, "cloud-1");
    assert_eq!(r.migrations[0].mode.as_deref(), Some("lazy"), "the order carries the mode");
    assert!(assignment(&r, "counter").is_none(), "withheld during the move: {r:?}");
    assert_eq!(b.get(&format!("/v1/migrations/{id}")).await.1["state"], "running");
    // the target's provisional copy is left alone
    let r = b.beat(&cloud, &t_cloud, running.clone(), vec![]).await;
    assert!(assignment(&r, "counter").is_none(), "{r:?}");

    // the source reports success; sent twice (a retried heartbeat): applied once
    let done = event(2, "migration-finished", "counter", Some(&id), Some(report("counter", "laptop", "cloud-1")));
    let r1 = b.beat(&laptop, &t_laptop, running.clone(), vec![done.clone()]).await;
    let r2 = b.beat(&laptop, &t_laptop, running.clone(), vec![done]).await;
    assert_eq!((r1.acked_seq, r2.acked_seq), (2, 2));
    let (_, m) = b.get(&format!("/v1/migrations/{id}")).await;
    assert_eq!(m["state"], "succeeded", "{m}");
    assert_eq!(m["report"]["downtime_millis"], 700);
    assert_eq!(b.get("/v1/workloads/counter").await.1["node"], "cloud-1");
    // the laptop still reports its copy: it is stale and must go
    let a = assignment(&r2, "counter").expect("stale copy removal");
    assert_eq!(a.desired, Desired::Removed);
    // once it is gone the removal is over; the cloud keeps it running
    assert!(assignment(&b.beat(&laptop, &t_laptop, vec![], vec![]).await, "counter").is_none());
    let r = b.beat(&cloud, &t_cloud, running.clone(), vec![]).await;
    assert_eq!(assignment(&r, "counter").map(|a| a.desired), Some(Desired::Running));

    // delete: desired removed, forgotten once the node reports it gone
    let (s, w) = b.call(reqwest::Method::DELETE, "/v1/workloads/counter", Some(USER), None).await;
    assert_eq!((s, w["state"].as_str()), (202, Some("removing")), "{w}");
    let r = b.beat(&cloud, &t_cloud, running.clone(), vec![]).await;
    assert_eq!(assignment(&r, "counter").map(|a| a.desired), Some(Desired::Removed));
    b.beat(&cloud, &t_cloud, vec![], vec![]).await;
    assert_eq!(b.get("/v1/workloads/counter").await.0, 404);

    // an unknown workload on a node is left alone and shown as unmanaged
    let r =
        b.beat(&cloud, &t_cloud, vec![status("by-hand", RuntimeKind::Docker, WorkloadState::Running)], vec![]).await;
    assert!(assignment(&r, "by-hand").is_none());
    assert_eq!(b.get("/v1/nodes/cloud-1").await.1["unmanaged"], json!(["by-hand"]));
    b.stop().await;
}

#[tokio::test]
async fn overlay_addresses_follow_workloads_and_nodes_across_a_restart() {
    use away_broker::overlay::{OverlayConfig, DEFAULT_FIRST_VNI, DEFAULT_PORT};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let (pool, pool_prefix) = OverlayConfig::parse_pool("10.250.0.0/16").unwrap();
    let overlay = OverlayConfig { pool, pool_prefix, port: DEFAULT_PORT, first_vni: DEFAULT_FIRST_VNI };
    let b = Running::start_with(&db, Duration::from_secs(30), Some(overlay.clone())).await;
    let n1 = node("n1", Tier::Cloud, CpuVendor::Amd);
    let n2 = node("n2", Tier::Cloud, CpuVendor::Amd);
    let t1 = b.register(&n1, "10.9.0.1:7800").await.agent_token;
    b.register(&n2, "10.9.0.2:7800").await;

    let submit = |name: &str, extra: Value| {
        let mut spec = json!({"name": name, "image": "away/counter:latest"});
        spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        spec
    };
    let (s, a) = b.post("/v1/workloads", submit("a", json!({}))).await;
    assert_eq!(s, 201, "{a}");
    let a = a["workload"]["spec"]["overlay"].clone();
    assert_eq!(
        (a["network"].as_str(), a["ip"].as_str(), a["vni"].as_u64()),
        (Some("default"), Some("10.250.0.1"), Some(4200))
    );
    assert_eq!((a["mac"].as_str(), a["port"].as_u64()), (Some("02:aa:0a:fa:00:01"), Some(4799)));
    let (s, l) = b.post("/v1/workloads", submit("l", json!({"network": "lab-1"}))).await;
    assert_eq!(s, 201, "{l}");
    assert_eq!(
        (l["workload"]["spec"]["overlay"]["ip"].as_str(), l["workload"]["spec"]["overlay"]["vni"].as_u64()),
        (Some("10.250.1.1"), Some(4201))
    );
    // a workload that publishes ports is on the network too (its node relays them); a
    // spec may not bring its own address
    let (s, p) = b.post("/v1/workloads", submit("p", json!({"ports": [{"container": 8080}]}))).await;
    assert_eq!(s, 201, "{p}");
    assert_eq!(p["workload"]["spec"]["overlay"]["ip"].as_str(), Some("10.250.0.2"), "{p}");
    let forged = json!({"overlay": {"network": "default", "vni": 4200, "port": 4799, "ip": "10.250.0.9", "prefix_len": 24, "mac": "02:aa:0a:fa:00:09"}});
    let (s, f) = b.post("/v1/workloads", submit("f", forged)).await;
    assert_eq!((s, f["field"].as_str()), (400, Some("overlay")), "{f}");
    let (s, bad) = b.post("/v1/workloads", submit("b", json!({"network": "Lab_1"}))).await;
    assert_eq!(s, 400, "{bad}");

    // a node's heartbeat: its address in each network and the other node's endpoint
    let r = b.beat(&n1, &t1, vec![], vec![]).await;
    let nets: Vec<(String, String, Vec<std::net::Ipv4Addr>)> =
        r.overlay.iter().map(|n| (n.address.network.clone(), n.address.ip.to_string(), n.peers.clone())).collect();
    let peer = vec![std::net::Ipv4Addr::new(10, 9, 0, 2)];
    assert_eq!(
        nets,
        vec![("default".into(), "10.250.0.3".into(), peer.clone()), ("lab-1".into(), "10.250.1.2".into(), peer)]
    );
    // and the network's workloads on the other node, for its VXLAN device's forwarding
    // entries (none of its own)
    let (_, all) = b.get("/v1/workloads").await;
    let on_n2 = |w: &&Value| w["node"] == "n2";
    let mut elsewhere: Vec<(String, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(on_n2)
        .map(|w| {
            (
                w["spec"]["overlay"]["network"].as_str().unwrap().into(),
                w["spec"]["overlay"]["mac"].as_str().unwrap().into(),
            )
        })
        .collect();
    let mut listed: Vec<(String, String)> = r
        .overlay
        .iter()
        .flat_map(|n| n.workloads.iter().map(move |w| (n.address.network.clone(), w.mac.clone())))
        .collect();
    elsewhere.sort();
    listed.sort();
    assert!(!elsewhere.is_empty(), "placement put workloads on n2: {all}");
    assert_eq!(listed, elsewhere);
    assert!(r.overlay.iter().flat_map(|n| &n.workloads).all(|w| w.node == std::net::Ipv4Addr::new(10, 9, 0, 2)));

    // a restarted broker gives the same addresses, to nodes and workloads
    b.stop().await;
    let b = Running::start_with(&db, Duration::from_secs(30), Some(overlay)).await;
    let again = b.beat(&n1, &t1, vec![], vec![]).await;
    assert_eq!(again.overlay, r.overlay);
    let (_, w) = b.get("/v1/workloads/a").await;
    assert_eq!(w["spec"]["overlay"], a);
    let (s, c) = b.post("/v1/workloads", submit("c", json!({}))).await;
    assert_eq!((s, c["workload"]["spec"]["overlay"]["ip"].as_str()), (201, Some("10.250.0.4")), "{c}");
    b.stop().await;

    // a broker without an overlay refuses a network by name
    let plain = Running::start(&dir.path().join("plain.db")).await;
    let (s, e) = plain.post("/v1/workloads", submit("n", json!({"network": "lab-1"}))).await;
    assert_eq!((s, e["field"].as_str()), (422, Some("network")), "{e}");
    plain.stop().await;
}

#[tokio::test]
async fn vm_migration_across_vendors_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let b = Running::start(&dir.path().join("broker.db")).await;
    let intel = node("edge-intel", Tier::Edge, CpuVendor::Intel);
    let amd = node("cloud-amd", Tier::Cloud, CpuVendor::Amd);
    b.register(&intel, "127.0.0.1:1").await;
    b.register(&amd, "127.0.0.1:1").await;
    let (s, body) = b.post("/v1/workloads", json!({"name": "legacy", "image": "away/legacy:1", "kind": "vm"})).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["workload"]["decision"]["runtime"], "qemu");
    assert_eq!(body["workload"]["node"], "edge-intel", "edge costs less than cloud");
    let (s, body) = b.post("/v1/migrations", json!({"workload": "legacy", "to": "cloud-amd"})).await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["code"], "incompatible");
    assert!(
        body["message"].as_str().unwrap().contains("CPU vendor intel on edge-intel but amd on cloud-amd"),
        "{body}"
    );
    assert_eq!(body["compatibility"]["allowed"], false);
    // "broker chooses" finds no compatible node either, and says why
    let (s, body) = b.post("/v1/migrations", json!({"workload": "legacy"})).await;
    assert_eq!(s, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("cloud-amd"), "{body}");
    assert_eq!(b.get("/v1/migrations").await.1, json!([]));
    b.stop().await;
}

#[tokio::test]
async fn bad_input_gets_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let b = Running::start(&dir.path().join("broker.db")).await;
    b.register(&node("n1", Tier::Edge, CpuVendor::Amd), "127.0.0.1:1").await;
    let raw = |body: &'static str| {
        b.http
            .post(format!("{}/v1/workloads", b.url))
            .bearer_auth(USER)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // malformed JSON
    let resp = raw("{\"name\": ").await.unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["code"], "invalid_input");
    // an unknown field is named
    let resp = raw("{\"name\": \"a\", \"image\": \"x\", \"colour\": \"red\"}").await.unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert!(e["message"].as_str().unwrap().contains("unknown field `colour`"), "{e}");
    // a bad value names its field
    let (s, e) = b.post("/v1/workloads", json!({"name": "a", "image": "x", "resources": {"memory": "1Mi"}})).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("resources.memory")), "{e}");
    let (s, e) = b.post("/v1/migrations", json!({"workload": "a", "target": "n1"})).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("invalid_input")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("unknown field `target`"), "{e}");
    let (s, _) = b.post("/v1/workloads?dry_run=maybe", json!({"name": "a", "image": "x"})).await;
    assert_eq!(s, 400);
    // tokens
    let (s, e) = b.call(reqwest::Method::GET, "/v1/workloads", None, None).await;
    assert_eq!((s, e["code"].as_str()), (401, Some("unauthorized")), "{e}");
    assert_eq!(b.call(reqwest::Method::GET, "/v1/nodes", Some("nope"), None).await.0, 401);
    assert_eq!(b.call(reqwest::Method::GET, "/v1/nodes", Some(JOIN), None).await.0, 401);
    let req = json!({"node": node("n2", Tier::Edge, CpuVendor::Amd), "api_addr": "x:1", "transfer_addr": "x:2"});
    assert_eq!(b.call(reqwest::Method::POST, "/v1/agents/register", Some(USER), Some(req)).await.0, 401);
    let hb = json!({"node": node("n1", Tier::Edge, CpuVendor::Amd), "load": NodeLoad::default(), "workloads": [], "events": []});
    assert_eq!(b.call(reqwest::Method::POST, "/v1/agents/n1/heartbeat", Some("forged"), Some(hb)).await.0, 401);
    // unknown names
    let (s, e) = b.get("/v1/workloads/ghost").await;
    assert_eq!((s, e["code"].as_str()), (404, Some("not_found")));
    assert_eq!(b.get("/v1/nodes/ghost").await.0, 404);
    assert_eq!(b.get("/v1/migrations/m-ghost").await.0, 404);
    assert_eq!(b.post("/v1/migrations", json!({"workload": "ghost"})).await.0, 404);
    assert_eq!(b.get("/v1/nowhere").await.0, 404);
    // duplicates
    assert_eq!(b.post("/v1/workloads", json!({"name": "a", "image": "x"})).await.0, 201);
    let (s, e) = b.post("/v1/workloads", json!({"name": "a", "image": "x"})).await;
    assert_eq!((s, e["code"].as_str(), e["field"].as_str()), (409, Some("conflict"), Some("name")));
    // impossible placement: 422 with the whole explanation
    let (s, e) = b.post("/v1/workloads", json!({"name": "big", "image": "x", "resources": {"memory": "1Ti"}})).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["placement"]["filtered"][0]["node"], "n1");
    assert!(e["placement"]["filtered"][0]["reasons"][0].as_str().unwrap().contains("needs 1Ti memory"), "{e}");
    b.stop().await;
}

#[tokio::test]
async fn events_stream_metrics_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let b = Running::start(&dir.path().join("broker.db")).await;

    // a fake agent API that serves logs to holders of the cluster token
    let fake = axum::Router::new().route(
        "/v1/workloads/{name}/logs",
        axum::routing::get(
            |headers: axum::http::HeaderMap, axum::extract::Path(name): axum::extract::Path<String>| async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                (axum::http::StatusCode::OK, format!("log of {name}; auth={}\n", auth.len()))
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, fake).await;
    });

    let mut sse = b.http.get(format!("{}/v1/events", b.url)).bearer_auth(USER).send().await.unwrap();
    assert_eq!(sse.status(), 200);
    assert!(sse.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let n1 = node("n1", Tier::Edge, CpuVendor::Amd);
    let reg = b.register(&n1, &agent_addr).await;
    let mut seen = String::new();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains("node-registered") {
            match sse.chunk().await.unwrap() {
                Some(c) => seen.push_str(&String::from_utf8_lossy(&c)),
                None => break,
            }
        }
    })
    .await;
    assert!(got.is_ok(), "no event within 10 s: {seen:?}");
    let data = seen.lines().find_map(|l| l.strip_prefix("data:")).expect("a data line");
    let ev: Value = serde_json::from_str(data.trim()).unwrap();
    assert_eq!((ev["kind"].as_str(), ev["node"].as_str()), (Some("node-registered"), Some("n1")), "{seen}");
    assert!(seen.contains("event: node-registered"), "{seen}");

    // logs are proxied with the cluster token (a 64-hex-digit bearer)
    assert_eq!(b.post("/v1/workloads", json!({"name": "w", "image": "x"})).await.0, 201);
    let (s, text) = b.get("/v1/workloads/w/logs?tail=10").await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(text, Value::String(format!("log of w; auth={}\n", "Bearer ".len() + reg.cluster_token.len())));
    // an unreachable node: 503 naming it
    let gone = node("gone", Tier::Edge, CpuVendor::Amd);
    b.register(&gone, "127.0.0.1:9").await;
    b.call(reqwest::Method::POST, "/v1/nodes/n1/drain", Some(USER), None).await;
    assert_eq!(b.post("/v1/workloads", json!({"name": "w2", "image": "x"})).await.1["workload"]["node"], "gone");
    let (s, e) = b.get("/v1/workloads/w2/logs").await;
    assert_eq!((s, e["code"].as_str()), (503, Some("unavailable")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("node gone"), "{e}");

    // metrics parse as Prometheus text
    b.beat(&n1, &reg.agent_token, vec![], vec![]).await;
    let text = b.http.get(format!("{}/metrics", b.url)).send().await.unwrap().text().await.unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(rest.starts_with("HELP ") || rest.starts_with("TYPE "), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        value.parse::<f64>().unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "{line}");
        }
        names.insert(name.to_string());
    }
    for want in [
        "away_nodes",
        "away_workloads",
        "away_migrations",
        "away_placements_total",
        "away_heartbeats_total",
        "away_http_requests_total",
    ] {
        assert!(names.contains(want), "{want} missing in\n{text}");
    }
    assert!(text.contains("away_nodes{state=\"draining\"} 1"), "{text}");
    assert!(text.contains("away_heartbeats_total 1"), "{text}");
    b.stop().await;
}

#[tokio::test]
async fn a_restarted_broker_keeps_nodes_workloads_migrations_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let a = node("a", Tier::Edge, CpuVendor::Intel);
    let c = node("c", Tier::Edge, CpuVendor::Amd);
    let b = Running::start(&db).await;
    let ta = b.register(&a, "127.0.0.1:1").await.agent_token;
    b.register(&c, "127.0.0.1:1").await;
    assert_eq!(
        b.post("/v1/workloads", json!({"name": "w", "image": "x"})).await.1["workload"]["node"],
        "a",
        "ties go to the first name"
    );
    b.beat(
        &a,
        &ta,
        vec![status("w", RuntimeKind::Containerd, WorkloadState::Running)],
        vec![event(1, "workload-started", "w", None, None)],
    )
    .await;
    let (s, m) = b.post("/v1/migrations", json!({"workload": "w"})).await;
    assert_eq!(s, 202, "{m}");
    assert_eq!(m["migration"]["target"], "c");
    assert_eq!(m["migration"]["chosen_by"], "broker");
    let id = m["migration"]["id"].as_str().unwrap().to_string();
    b.call(reqwest::Method::POST, "/v1/nodes/c/drain", Some(USER), None).await;
    b.stop().await;

    let b = Running::start(&db).await;
    let (_, nodes) = b.get("/v1/nodes").await;
    let names: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["a", "c"]);
    assert_eq!(nodes[1]["draining"], true);
    let (_, w) = b.get("/v1/workloads/w").await;
    assert_eq!((w["node"].as_str(), w["status"]["state"].as_str()), (Some("a"), Some("running")), "{w}");
    assert_eq!(b.get(&format!("/v1/migrations/{id}")).await.1["state"], "pending");
    // the agent's token still works, its acked events stay acked, the order is delivered
    let r = b
        .beat(
            &a,
            &ta,
            vec![status("w", RuntimeKind::Containerd, WorkloadState::Running)],
            vec![event(1, "workload-started", "w", None, None)],
        )
        .await;
    assert_eq!(r.acked_seq, 1);
    assert_eq!(r.migrations.len(), 1);
    assert_eq!(r.migrations[0].id, id);
    b.stop().await;
}

/// Join tokens made over the API: a user token makes, lists and revokes them; a node
/// registers with a valid one, not with a revoked or expired one (401 naming which),
/// and a node that joined with a token it has since lost keeps beating. Only hashes are
/// stored, the list shows no secret, and all of it survives a restart.
#[tokio::test]
async fn join_tokens_register_until_revoked_or_expired() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let b = Running::start(&db).await;

    // a user token is needed: none, the join token and a made-up one are all refused
    for token in [None, Some(JOIN), Some("not-a-user")] {
        for (method, path) in [
            (Method::POST, "/v1/join-tokens"),
            (Method::GET, "/v1/join-tokens"),
            (Method::DELETE, "/v1/join-tokens/jt-x"),
        ] {
            let (s, body) = b.call(method.clone(), path, token, Some(json!({}))).await;
            assert_eq!(s, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["code"], "unauthorized");
        }
    }

    // made: the secret shown once, an id, no expiry unless asked
    let (s, lasting) = b.post("/v1/join-tokens", json!({"label": "laptop-anna"})).await;
    assert_eq!(s, 201, "{lasting}");
    let (lasting_id, lasting_token) = (lasting["id"].as_str().unwrap(), lasting["token"].as_str().unwrap());
    assert!(lasting_id.starts_with("jt-") && lasting_token.len() == 64, "{lasting}");
    assert!(lasting.get("expires_unix_ms").is_none(), "{lasting}");
    // a body is needed (the schema says so); {} makes a token that never expires
    let (s, e) = b.call(Method::POST, "/v1/join-tokens", Some(USER), None).await;
    assert_eq!(s, 400, "{e}");
    let (s, plain) = b.post("/v1/join-tokens", json!({})).await;
    assert_eq!(s, 201, "{plain}");
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let (s, short) = b.post("/v1/join-tokens", json!({"expires_in_s": 1, "label": "short"})).await;
    assert_eq!(s, 201, "{short}");
    let expires = short["expires_unix_ms"].as_u64().unwrap();
    assert!((before + 1000..before + 3000).contains(&expires), "{short}");

    // a node registers with it, and heartbeats with what it got
    let anna = node("anna", Tier::Client, CpuVendor::Intel);
    let (s, reg) = b.register_with(lasting_token, &anna, "127.0.0.1:1").await;
    assert_eq!(s, 200, "{reg}");
    let _: RegisterResponse = serde_json::from_value(reg).unwrap();
    // it is anna's now: another node is refused with it, anna may join again with it
    let (s, e) = b.register_with(lasting_token, &node("bob", Tier::Edge, CpuVendor::Amd), "127.0.0.1:1").await;
    assert_eq!(s, 401, "{e}");
    assert!(e["message"].as_str().unwrap().contains(&format!("join token {lasting_id} was used by node anna")), "{e}");
    let (s, again) = b.register_with(lasting_token, &anna, "127.0.0.1:1").await;
    assert_eq!(s, 200, "{again}");
    let anna_token: RegisterResponse = serde_json::from_value(again).unwrap();
    // the short one works until it expires
    let (s, reg) = b
        .register_with(short["token"].as_str().unwrap(), &node("brief", Tier::Edge, CpuVendor::Amd), "127.0.0.1:1")
        .await;
    assert_eq!(s, 200, "{reg}");

    // the list: every token with its state, no secret and no hash of one
    let (s, list) = b.get("/v1/join-tokens").await;
    assert_eq!(s, 200, "{list}");
    let (plain_id, short_id) = (plain["id"].as_str().unwrap(), short["id"].as_str().unwrap());
    let ids: BTreeSet<&str> = list.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, BTreeSet::from([lasting_id, plain_id, short_id]));
    let one = |list: &Value, id: &str| list.as_array().unwrap().iter().find(|t| t["id"] == id).unwrap().clone();
    let first = one(&list, lasting_id);
    assert_eq!((first["state"].as_str(), first["label"].as_str()), (Some("valid"), Some("laptop-anna")), "{first}");
    assert_eq!(first["used_by"], "anna", "{first}");
    assert!(one(&list, plain_id).get("used_by").is_none(), "{list}");
    let text = list.to_string();
    for made in [&lasting, &plain, &short] {
        let secret = made["token"].as_str().unwrap();
        assert!(!text.contains(secret) && !text.contains(&away_broker::tokens::sha256_hex(secret)), "{text}");
    }

    // revoked: registering with it is refused naming why; anna, who joined with it, beats on
    let (s, v) = b.delete(&format!("/v1/join-tokens/{lasting_id}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["state"], "revoked");
    assert!(v["revoked_unix_ms"].as_u64().is_some(), "{v}");
    let (s, e) = b.register_with(lasting_token, &node("mallory", Tier::Client, CpuVendor::Intel), "127.0.0.1:1").await;
    assert_eq!(s, 401, "{e}");
    assert_eq!(e["message"], format!("join token {lasting_id} revoked: ask for a new one"));
    b.beat(&anna, &anna_token.agent_token, vec![], vec![]).await;
    // again: still revoked, when it first was; an unknown id is a 404
    let (s, again) = b.delete(&format!("/v1/join-tokens/{lasting_id}")).await;
    assert_eq!((s, &again["revoked_unix_ms"]), (200, &v["revoked_unix_ms"]));
    let (s, e) = b.delete("/v1/join-tokens/jt-ghost").await;
    assert_eq!(s, 404, "{e}");
    assert!(e["message"].as_str().unwrap().contains("jt-ghost"), "{e}");

    // expired: refused naming why, listed as such
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(expires.saturating_sub(now) + 50)).await;
    let (s, e) = b
        .register_with(short["token"].as_str().unwrap(), &node("late", Tier::Edge, CpuVendor::Amd), "127.0.0.1:1")
        .await;
    assert_eq!(s, 401, "{e}");
    assert_eq!(e["message"], format!("join token {} expired: ask for a new one", short["id"].as_str().unwrap()));
    assert_eq!(one(&b.get("/v1/join-tokens").await.1, short_id)["state"], "expired");

    // a revoked node's join token goes with it: whoever holds its files cannot join it back
    let carl = node("carl", Tier::Edge, CpuVendor::Amd);
    let (_, carls) = b.post("/v1/join-tokens", json!({"label": "carl"})).await;
    let (carls_id, carls_token) = (carls["id"].as_str().unwrap(), carls["token"].as_str().unwrap());
    let (s, reg) = b.register_with(carls_token, &carl, "127.0.0.1:1").await;
    assert_eq!(s, 200, "{reg}");
    let (s, v) = b.call(Method::POST, "/v1/nodes/carl/revoke", Some(USER), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(one(&b.get("/v1/join-tokens").await.1, carls_id)["state"], "revoked");
    let (s, e) = b.register_with(carls_token, &carl, "127.0.0.1:1").await;
    assert_eq!(s, 401, "{e}");
    assert_eq!(e["message"], format!("join token {carls_id} revoked: ask for a new one"));

    // bad input names the field
    for (body, field) in [
        (json!({"expires_in_s": 0}), "expires_in_s"),
        (json!({"expires_in_s": 400_000_000u64}), "expires_in_s"),
        (json!({"label": "x".repeat(201)}), "label"),
        (json!({"label": "a\nb"}), "label"),
        // judged as sent: trimming must not hide a control character (schemathesis found it)
        (json!({"label": "\u{f3db1}\u{b}"}), "label"),
        (json!({"label": format!("{} ", "x".repeat(200))}), "label"),
    ] {
        let (s, e) = b.post("/v1/join-tokens", body.clone()).await;
        assert_eq!((s, e["field"].as_str()), (400, Some(field)), "{body}: {e}");
    }
    let (s, e) = b.post("/v1/join-tokens", json!({"expires": 5})).await;
    assert!(s == 400 && e["message"].as_str().unwrap().contains("unknown field `expires`"), "{e}");

    // the configured join token still registers; a wrong one is just wrong
    b.register(&node("boot", Tier::Cloud, CpuVendor::Amd), "127.0.0.1:1").await;
    let (s, e) = b.register_with("no-such-token", &node("x", Tier::Cloud, CpuVendor::Amd), "127.0.0.1:1").await;
    assert_eq!((s, e["message"].as_str()), (401, Some("wrong join token")));
    b.stop().await;

    // after a restart: the same tokens, the revoked one still refused, the plain one still good
    let b = Running::start(&db).await;
    let (_, list) = b.get("/v1/join-tokens").await;
    let states: Vec<_> = [lasting_id, plain_id, short_id].iter().map(|id| one(&list, id)["state"].clone()).collect();
    assert_eq!(states, vec!["revoked", "valid", "expired"]);
    let (s, e) = b.register_with(lasting_token, &node("mallory", Tier::Client, CpuVendor::Intel), "127.0.0.1:1").await;
    assert!(s == 401 && e["message"].as_str().unwrap().contains("revoked"), "{e}");
    let (s, e) = b
        .register_with(plain["token"].as_str().unwrap(), &node("later", Tier::Edge, CpuVendor::Amd), "127.0.0.1:1")
        .await;
    assert_eq!(s, 200, "{e}");
    b.stop().await;
    // the database holds hashes only
    for file in [db.clone(), db.with_extension("db-wal")] {
        let raw = String::from_utf8_lossy(&std::fs::read(&file).unwrap_or_default()).to_string();
        for made in [&lasting, &plain, &short] {
            assert!(!raw.contains(made["token"].as_str().unwrap()), "a secret in {}", file.display());
        }
    }
}

/// Per-user tokens: an admin (a configured token) makes one for anna, who then uses the
/// user API with it but may not manage tokens (403); revoked or expired it is refused
/// with 401 naming why, on the next request; bad names are 400; all kept across a restart.
#[tokio::test]
async fn user_tokens_use_the_user_api_until_revoked_or_expired() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let b = Running::start(&db).await;
    b.register(&node("edge-1", Tier::Edge, CpuVendor::Amd), "127.0.0.1:1").await;

    // made by the admin: the secret shown once, with its user
    let (s, anna) = b.post("/v1/user-tokens", json!({"user": "anna", "label": "laptop"})).await;
    assert_eq!(s, 201, "{anna}");
    let (anna_id, anna_token) = (anna["id"].as_str().unwrap(), anna["token"].as_str().unwrap());
    assert!(anna_id.starts_with("ut-") && anna_token.len() == 64 && anna["user"] == "anna", "{anna}");
    assert!(anna.get("expires_unix_ms").is_none(), "{anna}");

    // anna uses the user API with it; the events say it was her
    let mut events = b.broker.subscribe();
    let (s, nodes) = b.call(Method::GET, "/v1/nodes", Some(anna_token), None).await;
    assert_eq!((s, nodes[0]["name"].as_str()), (200, Some("edge-1")), "{nodes}");
    let (s, placed) =
        b.call(Method::POST, "/v1/workloads", Some(anna_token), Some(json!({"name": "annas", "image": "x"}))).await;
    assert_eq!(s, 201, "{placed}");
    let (s, w) = b.call(Method::GET, "/v1/workloads/annas", Some(anna_token), None).await;
    assert_eq!((s, w["node"].as_str()), (200, Some("edge-1")), "{w}");
    let (s, n) = b.call(Method::POST, "/v1/nodes/edge-1/drain", Some(anna_token), None).await;
    assert_eq!((s, n["draining"].as_bool()), (200, Some(true)), "{n}");
    let (s, n) = b.delete("/v1/nodes/edge-1/drain").await;
    assert_eq!((s, n["draining"].as_bool()), (200, Some(false)), "{n}");
    let mut by = Vec::new();
    while let Ok(e) = events.try_recv() {
        by.push((e.kind, e.by));
    }
    let by: Vec<(&str, Option<&str>)> = by.iter().map(|(k, b)| (k.as_str(), b.as_deref())).collect();
    assert_eq!(
        by,
        [("workload-placed", Some("anna")), ("node-draining", Some("anna")), ("node-undrained", Some("admin"))]
    );

    // but manages no tokens, of either kind: 403 naming why
    for (method, path, body) in [
        (Method::POST, "/v1/user-tokens", json!({"user": "mallory"})),
        (Method::GET, "/v1/user-tokens", json!({})),
        (Method::DELETE, &format!("/v1/user-tokens/{anna_id}"), json!({})),
        (Method::POST, "/v1/join-tokens", json!({})),
        (Method::GET, "/v1/join-tokens", json!({})),
        (Method::DELETE, "/v1/join-tokens/jt-x", json!({})),
    ] {
        let (s, e) = b.call(method.clone(), path, Some(anna_token), Some(body)).await;
        assert_eq!((s, e["code"].as_str()), (403, Some("forbidden")), "{method} {path}: {e}");
        let message = e["message"].as_str().unwrap();
        assert!(message.contains("needs an admin token") && message.contains(anna_id), "{message}");
    }
    // nor does a made-up token or none (401)
    for token in [None, Some("not-a-user"), Some(JOIN)] {
        let (s, e) = b.call(Method::GET, "/v1/user-tokens", token, None).await;
        assert_eq!((s, e["code"].as_str()), (401, Some("unauthorized")), "{token:?}: {e}");
    }

    // listed without secrets; a short-lived one expires
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let (s, brief) = b.post("/v1/user-tokens", json!({"user": "ben", "expires_in_s": 1.0})).await;
    assert_eq!(s, 201, "{brief}");
    let expires = brief["expires_unix_ms"].as_u64().unwrap();
    assert!((before + 1000..before + 3000).contains(&expires), "{brief}");
    let (s, list) = b.get("/v1/user-tokens").await;
    assert_eq!(s, 200, "{list}");
    let one = |list: &Value, id: &str| list.as_array().unwrap().iter().find(|t| t["id"] == id).unwrap().clone();
    let listed = one(&list, anna_id);
    assert_eq!((listed["user"].as_str(), listed["state"].as_str()), (Some("anna"), Some("valid")), "{listed}");
    assert_eq!(listed["label"], "laptop");
    let text = list.to_string();
    for made in [&anna, &brief] {
        let secret = made["token"].as_str().unwrap();
        assert!(!text.contains(secret) && !text.contains(&away_broker::tokens::sha256_hex(secret)), "{text}");
    }
    let (s, _) = b.call(Method::GET, "/v1/nodes", brief["token"].as_str(), None).await;
    assert_eq!(s, 200);

    // revoked: the next request is refused, naming why
    let (s, v) = b.delete(&format!("/v1/user-tokens/{anna_id}")).await;
    assert_eq!((s, v["state"].as_str()), (200, Some("revoked")), "{v}");
    let (s, e) = b.call(Method::GET, "/v1/nodes", Some(anna_token), None).await;
    assert_eq!(s, 401, "{e}");
    assert_eq!(e["message"], format!("user token {anna_id} revoked: ask the broker's admin for a new one"));
    let (s, again) = b.delete(&format!("/v1/user-tokens/{anna_id}")).await;
    assert_eq!((s, &again["revoked_unix_ms"]), (200, &v["revoked_unix_ms"]));
    let (s, e) = b.delete("/v1/user-tokens/ut-ghost").await;
    assert!(s == 404 && e["message"].as_str().unwrap().contains("ut-ghost"), "{e}");

    // expired
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(expires.saturating_sub(now) + 50)).await;
    let (s, e) = b.call(Method::GET, "/v1/workloads", brief["token"].as_str(), None).await;
    assert_eq!(s, 401, "{e}");
    assert_eq!(
        e["message"],
        format!("user token {} expired: ask the broker's admin for a new one", brief["id"].as_str().unwrap())
    );

    // bad input names the field
    for (body, field) in [
        (json!({"user": "Anna"}), Some("user")),
        (json!({"user": "2anna"}), Some("user")),
        (json!({"user": ""}), Some("user")),
        (json!({"user": "a".repeat(64)}), Some("user")),
        (json!({"user": "admin"}), Some("user")),
        (json!({"user": "anna", "expires_in_s": 0}), Some("expires_in_s")),
        (json!({"user": "anna", "label": "a\nb"}), Some("label")),
        (json!({}), None),
        (json!(["anna"]), None),
    ] {
        let (s, e) = b.post("/v1/user-tokens", body.clone()).await;
        assert_eq!(s, 400, "{body}: {e}");
        if field.is_some() {
            assert_eq!(e["field"].as_str(), field, "{body}: {e}");
        }
    }
    let (s, e) = b.post("/v1/user-tokens", json!({"user": "Anna"})).await;
    assert!(s == 400 && e["message"].as_str().unwrap().contains("lower-case letter"), "{e}");
    b.stop().await;

    // after a restart: the states kept, the revoked token still refused, the admin still in
    let b = Running::start(&db).await;
    let (_, list) = b.get("/v1/user-tokens").await;
    assert_eq!(one(&list, anna_id)["state"], "revoked");
    assert_eq!(one(&list, brief["id"].as_str().unwrap())["state"], "expired");
    let (s, e) = b.call(Method::GET, "/v1/nodes", Some(anna_token), None).await;
    assert!(s == 401 && e["message"].as_str().unwrap().contains("revoked"), "{e}");
    b.stop().await;
    for file in [db.clone(), db.with_extension("db-wal")] {
        let raw = String::from_utf8_lossy(&std::fs::read(&file).unwrap_or_default()).to_string();
        assert!(!raw.contains(anna_token), "a secret in {}", file.display());
    }
}

/// Every migration ends: a pending one is cancelled and never delivered; one under way on
/// an online source is told to abort (202, the order carries `cancel`); past its deadline a pending one fails, and
/// one whose source went offline fails or is cancelled with the workload kept on the
/// source; all of it survives a restart, and the source's late word still wins.
#[tokio::test]
async fn migrations_end_by_cancel_or_deadline_and_stay_ended_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let a = node("a", Tier::Edge, CpuVendor::Intel);
    let c = node("c", Tier::Edge, CpuVendor::Intel);
    let b = Running::start_with_timeout(&db, Duration::from_secs(1)).await;
    let ta = b.register(&a, "127.0.0.1:1").await.agent_token;
    let names = ["w1", "w2", "w3", "w4"];
    for w in names {
        assert_eq!(b.post("/v1/workloads", json!({"name": w, "image": "x"})).await.1["workload"]["node"], "a");
    }
    let tc = b.register(&c, "127.0.0.1:1").await.agent_token;
    let all_running = || names.iter().map(|w| status(w, RuntimeKind::Containerd, WorkloadState::Running)).collect();
    b.beat(&a, &ta, all_running(), vec![]).await;
    b.beat(&c, &tc, vec![], vec![]).await;

    // deadlines are validated, and default to 900 s
    for bad in [json!(0), json!(86_401), json!(-1), json!(1.5), json!("soon")] {
        let (s, e) = b.post("/v1/migrations", json!({"workload": "w1", "to": "c", "deadline_s": bad})).await;
        assert_eq!((s, e["field"].as_str()), (400, Some("deadline_s")), "{bad}: {e}");
    }
    // JSON's integers include 60.0 (what schema fuzzers send)
    let (s, m0) = b.post("/v1/migrations", json!({"workload": "w1", "to": "c", "deadline_s": 60.0})).await;
    assert_eq!(s, 202, "{m0}");
    let id0 = m0["migration"]["id"].as_str().unwrap().to_string();
    assert_eq!(b.delete(&format!("/v1/migrations/{id0}")).await.0, 200);
    let (s, m1) = b.post("/v1/migrations", json!({"workload": "w1", "to": "c"})).await;
    assert_eq!(s, 202, "{m1}");
    let m1 = &m1["migration"];
    let id1 = m1["id"].as_str().unwrap().to_string();
    assert_eq!(m1["deadline_ms"].as_u64().unwrap() - m1["requested_ms"].as_u64().unwrap(), 900_000);

    // pending: cancelled at once, never delivered, the workload stays a's
    let (s, cancelled) = b.delete(&format!("/v1/migrations/{id1}")).await;
    assert_eq!((s, cancelled["state"].as_str()), (200, Some("cancelled")), "{cancelled}");
    assert!(cancelled["error"].as_str().unwrap().contains("before source node a received"), "{cancelled}");
    let r = b.beat(&a, &ta, all_running(), vec![]).await;
    assert!(r.migrations.is_empty(), "a cancelled migration is never ordered: {:?}", r.migrations);
    assert_eq!(assignment(&r, "w1").map(|a| a.desired), Some(Desired::Running));
    let (s, e) = b.delete(&format!("/v1/migrations/{id1}")).await;
    assert_eq!(s, 409, "{e}");
    assert!(e["message"].as_str().unwrap().contains("already ended"), "{e}");
    assert_eq!(b.delete("/v1/migrations/m-ghost").await.0, 404);

    // running on an online source: 202, still running, the source is told to abort it
    let (_, m2) = b.post("/v1/migrations", json!({"workload": "w2", "to": "c", "deadline_s": 2})).await;
    let id2 = m2["migration"]["id"].as_str().unwrap().to_string();
    let (_, m4) = b.post("/v1/migrations", json!({"workload": "w4", "to": "c"})).await;
    let id4 = m4["migration"]["id"].as_str().unwrap().to_string();
    let r = b.beat(&a, &ta, all_running(), vec![]).await;
    assert_eq!(r.migrations.len(), 2);
    assert!(r.migrations.iter().all(|o| !o.cancel), "{:?}", r.migrations);
    let (s, e) = b.delete(&format!("/v1/migrations/{id2}")).await;
    assert_eq!((s, e["state"].as_str()), (202, Some("running")), "{e}");
    assert!(e["cancel_requested_ms"].as_u64().is_some(), "{e}");
    // pending past its deadline: a never asks again
    let (_, m3) = b.post("/v1/migrations", json!({"workload": "w3", "to": "c", "deadline_s": 1})).await;
    let id3 = m3["migration"]["id"].as_str().unwrap().to_string();

    // a goes silent: its running migrations end when it is offline (and past the deadline)
    let ended = |state: &'static str| {
        move |m: &Value| (m["state"] == state).then(|| m["error"].as_str().unwrap_or_default().to_string())
    };
    let why3 = wait_migration(&b, &id3, ended("failed")).await;
    assert!(why3.starts_with("not delivered before its deadline"), "{why3}");
    let why2 = wait_migration(&b, &id2, ended("failed")).await;
    assert!(why2.contains("source node a is offline") && why2.contains("no second copy"), "{why2}");
    let (s, m) = b.delete(&format!("/v1/migrations/{id4}")).await;
    assert_eq!((s, m["state"].as_str()), (200, Some("cancelled")), "{m}");
    assert!(m["error"].as_str().unwrap().contains("kept where a last reported it"), "{m}");
    let (_, w2) = b.get("/v1/workloads/w2").await;
    assert_eq!((w2["node"].as_str(), w2.get("migration")), (Some("a"), None), "{w2}");
    b.stop().await;

    // a restart keeps every state (a map: ids made in the same ms sort by id); a is back: w2's move committed meanwhile, its late report wins
    let b = Running::start_with_timeout(&db, Duration::from_secs(1)).await;
    let states: std::collections::BTreeMap<String, String> = b
        .get("/v1/migrations")
        .await
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_str().unwrap().to_string(), m["state"].as_str().unwrap().to_string()))
        .collect();
    let expected: std::collections::BTreeMap<String, String> =
        [(&id0, "cancelled"), (&id1, "cancelled"), (&id2, "failed"), (&id4, "cancelled"), (&id3, "failed")]
            .iter()
            .map(|(i, s)| (i.to_string(), s.to_string()))
            .collect();
    assert_eq!(states, expected);
    let on_a =
        || ["w1", "w3", "w4"].iter().map(|w| status(w, RuntimeKind::Containerd, WorkloadState::Running)).collect();
    b.beat(&c, &tc, vec![status("w2", RuntimeKind::Containerd, WorkloadState::Running)], vec![]).await;
    let done = event(1, "migration-finished", "w2", Some(&id2), Some(report("w2", "a", "c")));
    let r = b.beat(&a, &ta, on_a(), vec![done]).await;
    assert!(r.migrations.is_empty() && assignment(&r, "w2").is_none(), "nothing of w2 starts on a: {r:?}");
    assert_eq!(b.get(&format!("/v1/migrations/{id2}")).await.1["state"], "succeeded");
    assert_eq!(b.get("/v1/workloads/w2").await.1["node"], "c");
    b.stop().await;
}

/// A cancel of a move its online source has started: 202 (asked again: the same), the
/// source's order carries `cancel` from then on; the source's `migration-failed` (it
/// aborted before its commit point) ends it `cancelled` with the workload on the source,
/// and a `migration-finished` (the move had committed) ends it `succeeded`.
#[tokio::test]
async fn a_cancel_under_way_is_carried_out_by_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let a = node("a", Tier::Edge, CpuVendor::Intel);
    let c = node("c", Tier::Edge, CpuVendor::Intel);
    let b = Running::start(&dir.path().join("broker.db")).await;
    let ta = b.register(&a, "127.0.0.1:1").await.agent_token;
    for w in ["w1", "w2"] {
        assert_eq!(b.post("/v1/workloads", json!({"name": w, "image": "x"})).await.1["workload"]["node"], "a");
    }
    b.register(&c, "127.0.0.1:1").await;
    let on_a = || ["w1", "w2"].iter().map(|w| status(w, RuntimeKind::Containerd, WorkloadState::Running)).collect();
    b.beat(&a, &ta, on_a(), vec![]).await;
    let mut ids = Vec::new();
    for w in ["w1", "w2"] {
        let (_, m) = b.post("/v1/migrations", json!({"workload": w, "to": "c"})).await;
        ids.push(m["migration"]["id"].as_str().unwrap().to_string());
    }
    assert_eq!(b.beat(&a, &ta, on_a(), vec![]).await.migrations.len(), 2);
    for id in &ids {
        let (s, m) = b.delete(&format!("/v1/migrations/{id}")).await;
        assert_eq!((s, m["state"].as_str()), (202, Some("running")), "{m}");
        let again = b.delete(&format!("/v1/migrations/{id}")).await;
        assert_eq!((again.0, &again.1["cancel_requested_ms"]), (202, &m["cancel_requested_ms"]), "the same answer");
    }
    let r = b.beat(&a, &ta, on_a(), vec![]).await;
    assert!(r.migrations.len() == 2 && r.migrations.iter().all(|o| o.cancel), "{:?}", r.migrations);
    // w1 aborted in time, w2 had committed
    let events = vec![
        event(1, "migration-failed", "w1", Some(&ids[0]), None),
        event(2, "migration-finished", "w2", Some(&ids[1]), Some(report("w2", "a", "c"))),
    ];
    let r = b.beat(&a, &ta, vec![status("w1", RuntimeKind::Containerd, WorkloadState::Running)], events).await;
    assert!(r.migrations.is_empty(), "{:?}", r.migrations);
    let m1 = b.get(&format!("/v1/migrations/{}", ids[0])).await.1;
    assert_eq!(m1["state"], "cancelled", "{m1}");
    assert!(m1["error"].as_str().unwrap().starts_with("cancelled"), "{m1}");
    assert_eq!(b.get(&format!("/v1/migrations/{}", ids[1])).await.1["state"], "succeeded");
    assert_eq!(b.get("/v1/workloads/w1").await.1["node"], "a");
    assert_eq!(b.get("/v1/workloads/w2").await.1["node"], "c");
    let (s, e) = b.delete(&format!("/v1/migrations/{}", ids[0])).await;
    assert_eq!(s, 409, "an ended migration: {e}");
    b.stop().await;
}

/// A broker that was down longer than the node timeout does not take its nodes for
/// offline at once: a migration past its deadline is ended only once the source had a
/// node timeout to beat again.
#[tokio::test]
async fn a_restarted_broker_waits_a_node_timeout_before_ending_migrations_without_their_source() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let timeout = Duration::from_secs(1);
    let a = node("a", Tier::Edge, CpuVendor::Intel);
    let c = node("c", Tier::Edge, CpuVendor::Intel);
    let b = Running::start_with_timeout(&db, timeout).await;
    let ta = b.register(&a, "127.0.0.1:1").await.agent_token;
    b.post("/v1/workloads", json!({"name": "w", "image": "x"})).await;
    b.register(&c, "127.0.0.1:1").await;
    b.beat(&a, &ta, vec![status("w", RuntimeKind::Containerd, WorkloadState::Running)], vec![]).await;
    let (_, m) = b.post("/v1/migrations", json!({"workload": "w", "to": "c", "deadline_s": 1})).await;
    let id = m["migration"]["id"].as_str().unwrap().to_string();
    let r = b.beat(&a, &ta, vec![status("w", RuntimeKind::Containerd, WorkloadState::Running)], vec![]).await;
    assert_eq!(r.migrations.len(), 1);
    b.stop().await;
    // down for longer than the node timeout and the deadline
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let b = Running::start_with_timeout(&db, timeout).await;
    let started = std::time::Instant::now();
    let (s, e) = b.delete(&format!("/v1/migrations/{id}")).await;
    assert_eq!(
        (s, e["state"].as_str()),
        (202, Some("running")),
        "a may be online: it has had no chance to beat yet: {e}"
    );
    let why = wait_migration(&b, &id, |m| (m["state"] == "failed").then(|| m["error"].to_string())).await;
    assert!(started.elapsed() >= timeout, "ended {:?} after the start", started.elapsed());
    assert!(why.contains("source node a is offline"), "{why}");
    b.stop().await;
}

/// Polls migration `id` until `done` says it ended, for at most 10 s.
async fn wait_migration(b: &Running, id: &str, done: impl Fn(&Value) -> Option<String>) -> String {
    for _ in 0..100 {
        let (_, m) = b.get(&format!("/v1/migrations/{id}")).await;
        if let Some(v) = done(&m) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("migration {id} did not end in 10 s: {:?}", b.get(&format!("/v1/migrations/{id}")).await.1);
}

#[tokio::test]
async fn openapi_document_matches_the_served_routes() {
    let dir = tempfile::tempdir().unwrap();
    let b = Running::start(&dir.path().join("broker.db")).await;
    let (s, doc) = b.call(reqwest::Method::GET, "/v1/openapi.json", None, None).await;
    assert_eq!(s, 200);
    assert_eq!(doc, serde_json::from_str::<Value>(away_broker::api::OPENAPI).unwrap());
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{name}", "x").replace("{id}", "x");
        for method in ops.as_object().unwrap().keys() {
            if path == "/v1/events" {
                continue; // a stream: checked above
            }
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let (status, body) = b.call(m, &concrete, Some(USER), Some(json!({}))).await;
            assert_ne!(status, 405, "{method} {path} is documented but not served");
            assert!(
                !body["message"].as_str().unwrap_or_default().starts_with("no such endpoint"),
                "{method} {path} is documented but not served"
            );
            // every documented route answers with a documented status
            let documented = ops[method]["responses"].as_object().unwrap();
            assert!(documented.contains_key(&status.to_string()), "{method} {path} answered {status}: {body}");
        }
    }
    b.stop().await;
}

/// Concurrent submissions share transactions (group commit): each gets its own answer,
/// a name submitted twice at once is placed once, the memory promised by earlier
/// submissions of the same batch counts for the later ones, and every acknowledged
/// workload is in the database after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_are_placed_once_each_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let b = Arc::new(Running::start(&db).await);
    // one node with room for exactly 16 workloads of 1 GiB
    b.register(&node("only", Tier::Edge, CpuVendor::Intel), "127.0.0.1:1").await;
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let b = b.clone();
            // w-0 .. w-19, each twice
            let name = format!("w-{}", i % 20);
            tokio::spawn(async move {
                let body = json!({"name": name, "image": "x", "resources": {"memory": "1Gi", "cpus": 0.1}});
                (name, b.post("/v1/workloads", body).await)
            })
        })
        .collect();
    let mut placed = BTreeSet::new();
    let (mut conflicts, mut full) = (0, 0);
    for c in calls {
        let (name, (status, body)) = c.await.unwrap();
        match status {
            201 => assert!(placed.insert(name), "{body}"),
            409 if body["code"] == "conflict" => conflicts += 1,
            _ => {
                assert!(body["message"].as_str().unwrap().contains("memory"), "{status} {body}");
                full += 1;
            }
        }
    }
    assert_eq!(placed.len(), 16, "16 GiB hold 16 workloads of 1 GiB: {placed:?}");
    assert_eq!(conflicts + full, 24, "the other 24 calls were a second submission or found the node full");
    let b = Arc::into_inner(b).expect("no call left");
    b.stop().await;
    let b = Running::start(&db).await;
    let (_, all) = b.get("/v1/workloads").await;
    let kept: BTreeSet<String> = all.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().into()).collect();
    assert_eq!(kept, placed);
    b.stop().await;
}

/// A dry run records nothing; when the source agent cannot be asked (here: no agent at
/// its address) the answer says why there is no prediction, and a move with a deadline
/// goes ahead without one, saying so. A bad `optimize` is a 400 naming the field.
#[tokio::test]
async fn dry_runs_record_nothing_and_say_why_there_is_no_prediction() {
    let dir = tempfile::tempdir().unwrap();
    let b = Running::start(&dir.path().join("broker.db")).await;
    let a = node("a", Tier::Edge, CpuVendor::Intel);
    let c = node("c", Tier::Edge, CpuVendor::Intel);
    let ta = b.register(&a, "127.0.0.1:1").await.agent_token;
    assert_eq!(b.post("/v1/workloads", json!({"name": "w", "image": "x"})).await.1["workload"]["node"], "a");
    let tc = b.register(&c, "127.0.0.1:1").await.agent_token;
    b.beat(&a, &ta, vec![status("w", RuntimeKind::Containerd, WorkloadState::Running)], vec![]).await;
    b.beat(&c, &tc, vec![], vec![]).await;

    let (s, dry) = b.post("/v1/migrations?dry_run=true", json!({"workload": "w", "to": "c", "deadline_s": 1})).await;
    assert_eq!(s, 200, "{dry}");
    assert_eq!((dry["source"].as_str(), dry["target"].as_str()), (Some("a"), Some("c")));
    assert!(dry["plan"].is_null(), "{dry}");
    assert!(dry["plan_error"].as_str().unwrap().contains("asking a to measure the move"), "{dry}");
    assert!(dry["why"].as_str().unwrap().contains("no prediction"), "{dry}");
    assert_eq!(b.get("/v1/migrations").await.1, json!([]), "a dry run records nothing");

    let (s, e) = b.post("/v1/migrations", json!({"workload": "w", "to": "c", "optimize": "fastest"})).await;
    assert_eq!((s, e["field"].as_str()), (400, Some("optimize")), "{e}");

    let (s, m) = b.post("/v1/migrations", json!({"workload": "w", "to": "c", "deadline_s": 600})).await;
    assert_eq!(s, 202, "{m}");
    assert!(m["migration"]["why"].as_str().unwrap().contains("no prediction"), "{m}");
    assert!(m["migration"]["predicted"].is_null(), "{m}");
}

#[tokio::test]
async fn a_revoked_node_is_offline_out_of_placement_and_stays_revoked() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let b = Running::start(&db).await;
    let laptop = node("laptop", Tier::Client, CpuVendor::Intel);
    let cloud = node("cloud", Tier::Cloud, CpuVendor::Amd);
    let t_laptop = b.register(&laptop, "127.0.0.1:1").await.agent_token;
    let t_cloud = b.register(&cloud, "127.0.0.1:2").await.agent_token;
    b.beat(&laptop, &t_laptop, vec![], vec![]).await;
    b.beat(&cloud, &t_cloud, vec![], vec![]).await;
    let spec = json!({"name": "counter", "image": "away/counter:latest", "placement": {"prefer_client": true}});
    let (s, body) = b.post("/v1/workloads?dry_run=true", spec.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["placement"]["chosen"], "laptop", "{body}");

    // a user token is needed; an unknown node is named
    for token in [None, Some(JOIN), Some(t_laptop.as_str())] {
        let (s, body) = b.call(Method::POST, "/v1/nodes/laptop/revoke", token, None).await;
        assert_eq!(s, 401, "{token:?}: {body}");
    }
    let (s, body) = b.call(Method::POST, "/v1/nodes/nowhere/revoke", Some(USER), None).await;
    assert_eq!(s, 404, "{body}");
    // a user's own token uses the user API but may not revoke a node
    let (s, made) = b.post("/v1/user-tokens", json!({"user": "anna"})).await;
    assert_eq!(s, 201, "{made}");
    let (s, body) = b.call(Method::POST, "/v1/nodes/laptop/revoke", made["token"].as_str(), None).await;
    assert_eq!(s, 403, "{body}");

    let (s, revoked) = b.call(Method::POST, "/v1/nodes/laptop/revoke", Some(USER), None).await;
    assert_eq!(s, 200, "{revoked}");
    assert_eq!(revoked["state"], "offline", "{revoked}");
    let at = revoked["revoked_ms"].as_u64().expect("revoked_ms");
    // again: nothing changes
    let (s, again) = b.call(Method::POST, "/v1/nodes/laptop/revoke", Some(USER), None).await;
    assert_eq!((s, again["revoked_ms"].as_u64()), (200, Some(at)), "{again}");
    // its token is forgotten; placement passes it over like a lost node
    let hb = Heartbeat {
        node: laptop.clone(),
        load: NodeLoad::default(),
        workloads: vec![],
        events: vec![],
        crl_number: None,
    };
    let (s, body) = b
        .call(Method::POST, "/v1/agents/laptop/heartbeat", Some(&t_laptop), Some(serde_json::to_value(&hb).unwrap()))
        .await;
    assert_eq!(s, 401, "{body}");
    let (s, body) = b.post("/v1/workloads?dry_run=true", spec.clone()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["placement"]["chosen"], "cloud", "{body}");
    // a broker without a CA keeps no revocation list: nothing to hand out
    assert_eq!(b.beat(&cloud, &t_cloud, vec![], vec![]).await.crl, None);

    // a restart keeps it revoked
    b.stop().await;
    let b = Running::start(&db).await;
    let (s, n) = b.get("/v1/nodes/laptop").await;
    assert_eq!((s, n["revoked_ms"].as_u64(), n["state"].as_str()), (200, Some(at), Some("offline")), "{n}");
    // the name joins again (this broker issues no certificates, so no key to refuse)
    let t_laptop = b.register(&laptop, "127.0.0.1:1").await.agent_token;
    b.beat(&laptop, &t_laptop, vec![], vec![]).await;
    let (_, n) = b.get("/v1/nodes/laptop").await;
    assert!(n.get("revoked_ms").is_none() && n["state"] == "online", "{n}");
    b.stop().await;
}

/// A broker with a CA, called in-process (no HTTP): the revocation list it makes, hands
/// out with heartbeats, keeps across a restart, and the revoked key it refuses.
#[test]
fn a_revocation_goes_on_the_crl_heartbeats_carry_it_and_a_restart_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("broker.db");
    let ca = Arc::new(away_identity::Ca::load_or_create(&dir.path().join("ca")).unwrap());
    let open = || {
        let mut config = BrokerConfig::new(vec![USER.into()], JOIN.into());
        config.db_path = db.clone();
        let identity = ca.issue_self("broker", &["127.0.0.1".into()]).unwrap();
        config.tls = Some(away_broker::BrokerTls { ca: ca.clone(), identity });
        Broker::open(config).unwrap()
    };
    let join = |b: &Broker, name: &str, key: &away_identity::NodeKey| {
        let req = RegisterRequest {
            node: node(name, Tier::Edge, CpuVendor::Amd),
            api_addr: "127.0.0.1:1".into(),
            transfer_addr: "127.0.0.1:2".into(),
            csr: Some(key.csr_pem(name).unwrap()),
        };
        b.register(Some(JOIN), req)
    };
    let beat = |b: &Broker, name: &str, token: &str, crl_number: Option<u64>| {
        let hb = Heartbeat {
            node: node(name, Tier::Edge, CpuVendor::Amd),
            load: NodeLoad::default(),
            workloads: vec![],
            events: vec![],
            crl_number,
        };
        b.heartbeat(name, Some(token), hb)
    };
    let b = open();
    let (key_a, key_b) = (away_identity::NodeKey::generate().unwrap(), away_identity::NodeKey::generate().unwrap());
    let a = join(&b, "node-a", &key_a).unwrap();
    let bb = join(&b, "node-b", &key_b).unwrap();
    let cert_b = bb.certificate.clone().unwrap();
    assert_eq!(beat(&b, "node-a", &a.agent_token, None).unwrap().crl, None, "nothing revoked: no list");
    assert!(b.config.tls.as_ref().unwrap().identity.revocations().summary().is_none());

    let view = b.revoke_node("node-b").unwrap();
    assert!(view.revoked_ms.is_some());
    // the broker's own verifiers have it at once, listing B's serial
    let serial = away_identity::serial_hex(&cert_b).unwrap();
    let own = &b.config.tls.as_ref().unwrap().identity;
    assert!(own.revocations().is_revoked(&serial));
    // A gets it with its next heartbeat, once: a list it holds is not sent again
    let crl = beat(&b, "node-a", &a.agent_token, None).unwrap().crl.expect("the list for an agent without one");
    let identity_a = key_a.into_identity(a.certificate.as_ref().unwrap(), a.ca.as_ref().unwrap()).unwrap();
    let summary = identity_a.set_crl_pem(&crl).unwrap();
    assert_eq!((summary.number, summary.revoked), (1, 1));
    assert!(identity_a.revocations().is_revoked(&serial));
    assert_eq!(beat(&b, "node-a", &a.agent_token, Some(1)).unwrap().crl, None);
    // B's token is gone, and its key never joins again
    assert!(beat(&b, "node-b", &bb.agent_token, None).is_err());
    let refused = join(&b, "node-b", &key_b).unwrap_err();
    assert!(format!("{refused:?}").contains("revoked"), "{refused:?}");
    drop(b);

    // a restart makes the same list again and hands it out
    let b = open();
    assert!(b.config.tls.as_ref().unwrap().identity.revocations().is_revoked(&serial));
    assert_eq!(b.node("node-b").unwrap().revoked_ms, view.revoked_ms);
    let again = beat(&b, "node-a", &a.agent_token, Some(0)).unwrap().crl.expect("a newer list than #0");
    assert_eq!(identity_a.set_crl_pem(&again).unwrap().number, 1);
    assert_eq!(beat(&b, "node-a", &a.agent_token, Some(1)).unwrap().crl, None);
    // a new key joins the name again, and revoking it raises the list's number
    let fresh = join(&b, "node-b", &away_identity::NodeKey::generate().unwrap()).unwrap();
    assert!(b.node("node-b").unwrap().revoked_ms.is_none());
    b.revoke_node("node-b").unwrap();
    let newer = beat(&b, "node-a", &a.agent_token, Some(1)).unwrap().crl.expect("list #2");
    let summary = identity_a.set_crl_pem(&newer).unwrap();
    assert_eq!((summary.number, summary.revoked), (2, 2));
    assert!(identity_a
        .revocations()
        .is_revoked(&away_identity::serial_hex(fresh.certificate.as_ref().unwrap()).unwrap()));
}
