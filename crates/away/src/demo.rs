//! `away demo`: the main job, end to end on one machine. A broker and a cloud node start
//! (the node in its own network namespace with its own containerd); `labdesk` runs in
//! the cloud and a student writes session state into it; the student's laptop (a client
//! node, another namespace, another containerd) comes online; the broker moves labdesk
//! there while it runs; the same state is read back from the laptop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use away_client::Client;
use away_cluster::{ClusterInfo, ClusterPlan, NodePlan};
use away_model::{
    ByteSize, MigrationRecord, MigrationRequest, MigrationState, PortMapping, Resources, Tier, WorkloadKind,
    WorkloadSpec,
};
use serde_json::Value;

/// Run the main demo: scale a running lab app away from the cloud to a student's laptop.
///
/// Needs root, containerd's binaries and CRIU (deploy/install.sh). Cleans up after itself,
/// also when interrupted (Ctrl-C). Takes about 30 s.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// The lab app's build context
    #[arg(long, default_value = "images/labdesk")]
    app: PathBuf,
    /// Keep the cluster running at the end (remove it with `away cluster down --name demo`)
    #[arg(long)]
    keep: bool,
}

const CLUSTER: &str = "demo";

struct Steps {
    t0: Instant,
    n: usize,
}

impl Steps {
    fn step(&mut self, what: &str) -> Instant {
        self.n += 1;
        println!("[{}] {what}", self.n);
        Instant::now()
    }
    fn done(&self, started: Instant, detail: &str) {
        println!(
            "    {detail} ({:.2} s; {:.1} s in total)",
            started.elapsed().as_secs_f64(),
            self.t0.elapsed().as_secs_f64()
        );
    }
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // a cluster left by an interrupted earlier run would block this one
    if away_cluster::info(CLUSTER).is_some() {
        eprintln!("removing the demo cluster of an earlier run");
        away_cluster::down(CLUSTER);
    }
    let mut stops = crate::signal::StopSignals::register_in(&rt)?;
    let result = rt.block_on(async {
        tokio::select! {
            r = demo(&a) => r,
            why = stops.next() => Err(anyhow::anyhow!("interrupted ({why})")),
        }
    });
    if !a.keep || result.is_err() {
        println!("cleaning up: stopping the nodes and the broker, removing their namespaces");
        away_cluster::down(CLUSTER);
    }
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

async fn demo(a: &DemoArgs) -> anyhow::Result<()> {
    let mut s = Steps { t0: Instant::now(), n: 0 };
    let app = a.app.clone();

    let t = s.step(&format!("building the lab app image from {}", app.display()));
    let out = std::env::temp_dir().join("away-demo-images");
    let tar = blocking(move || {
        let (built, path, _) = away_image::build_to_dir(&app, &out, &away_image::BuildOptions::default(), &|_| {})?;
        println!("    {} ({})", path.display(), built.image.tags.first().cloned().unwrap_or_default());
        Ok(path)
    })
    .await?;
    s.done(t, "built");

    let t = s.step("starting a broker and a cloud node (own network namespace, own containerd, an agent)");
    let plan = ClusterPlan {
        name: CLUSTER.into(),
        nodes: vec![NodePlan { name: "cloud".into(), tier: Tier::Cloud }],
        away: std::env::current_exe()?,
        images: vec![tar.clone()],
        overlay: None,
    };
    let plan2 = plan.clone();
    let info: ClusterInfo = blocking(move || Ok(away_cluster::up(&plan2)?)).await?;
    s.done(t, &format!("broker {}, cloud node {}", info.broker_url, info.nodes[0].api));

    let http = away_client::http_client(Some(&info.ca_pem()?))?;
    let broker = Client::with_http(http.clone(), info.broker_url.clone(), info.user_token.clone());

    let t = s.step("submitting labdesk to the broker over HTTP");
    wait_online(&broker, 1).await?;
    let spec = WorkloadSpec {
        name: "labdesk".into(),
        image: "away/labdesk:latest".into(),
        kind: WorkloadKind::Auto,
        command: None,
        env: BTreeMap::from([("LABDESK_PORT".to_string(), "8080".to_string())]),
        ports: vec![PortMapping { container: 8080, host: None }],
        resources: Resources { memory: ByteSize::mib(64), cpus: 0.5 },
        placement: Default::default(),
        labels: BTreeMap::new(),
        user: None,
        capabilities: Default::default(),
        seccomp: Default::default(),
        disk: None,
        volumes: Vec::new(),
        network: None,
        overlay: None,
    };
    let placed = broker.submit(&spec).await?;
    let node = placed.workload.as_ref().map_or("?", |w| w.node.as_str()).to_string();
    println!("    placement: {}", placed.placement.why);
    wait_state(&broker, "labdesk", "running").await?;
    s.done(t, &format!("labdesk runs on {node}"));

    let t = s.step("a student works in labdesk: notes and a command history, in its memory only");
    let cloud_app = format!("http://{}:8080", info.nodes[0].ip);
    wait_http(&http, &format!("{cloud_app}/state")).await?;
    for note in ["lab 3: measure the migration downtime", "container path first, VM path second"] {
        check_text(http.post(format!("{cloud_app}/notes")).body(note).send().await?).await?;
    }
    for cmd in ["away doctor", "away migrate labdesk --to laptop"] {
        check_text(http.post(format!("{cloud_app}/history")).body(cmd).send().await?).await?;
    }
    let before: Value = check(http.get(format!("{cloud_app}/state")).send().await?).await?;
    s.done(
        t,
        &format!(
            "{} notes, {} commands, process started at {}",
            count(&before, "notes"),
            count(&before, "history"),
            before["started_unix_ms"]
        ),
    );

    let t = s.step("the student's laptop comes online (a client node: namespace, containerd, agent)");
    let laptop =
        blocking(move || Ok(away_cluster::add_node(&plan, &NodePlan { name: "laptop".into(), tier: Tier::Client })?))
            .await?;
    wait_online(&broker, 2).await?;
    s.done(t, &format!("laptop at {}", laptop.api));

    let t = s.step("scaling away: the broker moves the running labdesk to the laptop (CRIU checkpoint/restore)");
    let request = MigrationRequest {
        workload: "labdesk".into(),
        to: Some("laptop".into()),
        mode: None,
        deadline_s: None,
        ..Default::default()
    };
    let started = broker.migrate(&request).await?;
    println!("    placement: {}", started.why);
    let m = wait_migration(&broker, &started.id).await?;
    let r = m.report.context("the finished migration has no report")?;
    println!("    mode: {}", r.reason);
    let phases: Vec<String> = r.phases.iter().map(|p| format!("{} {} ms", p.name, p.millis)).collect();
    println!("    {}", phases.join(", "));
    s.done(
        t,
        &format!(
            "moved in {} ms, downtime {} ms, {} KiB of state, {} KiB on the wire",
            r.total_millis,
            r.downtime_millis,
            r.bytes_raw / 1024,
            r.bytes_wire / 1024
        ),
    );

    let t = s.step("reading the session back from the laptop");
    let laptop_app = format!("http://{}:8080", laptop.ip);
    wait_http(&http, &format!("{laptop_app}/state")).await?;
    let after: Value = check(http.get(format!("{laptop_app}/state")).send().await?).await?;
    if after["notes"] != before["notes"]
        || after["history"] != before["history"]
        || after["started_unix_ms"] != before["started_unix_ms"]
    {
        bail!("the state did not survive the move:\nbefore {before}\nafter  {after}");
    }
    let old_home = http.get(format!("{cloud_app}/state")).timeout(Duration::from_secs(2)).send().await;
    if old_home.is_ok() {
        bail!("labdesk still answers in the cloud: two instances");
    }
    s.done(
        t,
        &format!(
            "same {} notes and {} commands, same process start time: the state moved, the cloud copy is gone",
            count(&after, "notes"),
            count(&after, "history")
        ),
    );
    println!("done in {:.1} s", s.t0.elapsed().as_secs_f64());
    Ok(())
}

fn count(v: &Value, key: &str) -> usize {
    v[key].as_array().map(|a| a.len()).unwrap_or(0)
}

async fn check(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

async fn check_text(resp: reqwest::Response) -> anyhow::Result<()> {
    check(resp).await.map(|_| ())
}

async fn poll<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_online(broker: &Client, n: usize) -> anyhow::Result<()> {
    poll(&format!("{n} online node(s)"), 60, async || {
        let nodes = broker.nodes().await.ok()?;
        (nodes.iter().filter(|x| x.state == "online").count() >= n).then_some(())
    })
    .await
}

async fn wait_state(broker: &Client, name: &str, state: &str) -> anyhow::Result<()> {
    poll(&format!("{name} to be {state}"), 60, async || {
        let w = broker.workload(name).await.ok()?;
        (w.state == state).then_some(())
    })
    .await
}

async fn wait_http(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    poll(url, 30, async || http.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ())).await
}

async fn wait_migration(broker: &Client, id: &str) -> anyhow::Result<MigrationRecord> {
    let m = poll("the migration to finish", 120, async || {
        let m = broker.migration(id).await.ok()?;
        (!m.state.is_active()).then_some(m)
    })
    .await?;
    if m.state != MigrationState::Succeeded {
        let why = m.error.clone().or_else(|| m.report.as_ref().and_then(|r| r.error.clone()));
        bail!("the migration {id} failed: {}", why.unwrap_or_else(|| format!("{m:?}")));
    }
    Ok(m)
}
