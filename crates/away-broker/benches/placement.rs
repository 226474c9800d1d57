//! Placement throughput: 1,000 simulated nodes, 10,000 workloads submitted one by one
//! through `Broker::submit` (both placement phases over every node, then the SQLite
//! write of the workload, in WAL mode on a temporary file). Prints the setup and
//! placements per second. Run: `cargo bench -p away-broker --bench placement`.

use std::time::{Duration, Instant};

use away_broker::{Broker, BrokerConfig};
use away_model::{
    Arch, CpuInfo, CpuVendor, LinkInfo, NodeInfo, RegisterRequest, RuntimeInfo, RuntimeKind, SpecFormat, Tier,
    WorkloadSpec,
};

const NODES: usize = 1_000;
const WORKLOADS: usize = 10_000;

fn node(i: usize) -> NodeInfo {
    let tier = [Tier::Cloud, Tier::Edge, Tier::Client][i % 3];
    let rt = |kind, healthy| RuntimeInfo {
        kind,
        version: "1.7".into(),
        healthy,
        checkpoint: healthy,
        detail: if healthy { String::new() } else { "socket refused".into() },
    };
    NodeInfo {
        name: format!("node-{i:04}"),
        tier,
        arch: Arch("amd64".into()),
        cpu: CpuInfo {
            vendor: if i.is_multiple_of(2) { CpuVendor::Intel } else { CpuVendor::Amd },
            model: "simulated".into(),
            family: None,
            model_number: None,
            cores: [8, 16, 32, 64][i % 4],
            flags: if i.is_multiple_of(5) {
                ["sse4_2", "avx"].as_slice()
            } else {
                ["sse4_2", "avx", "avx2"].as_slice()
            }
            .iter()
            .map(|s| s.to_string())
            .collect(),
        },
        memory_bytes: [16u64, 32, 64][i % 3] << 30,
        kernel: "6.1".into(),
        // one node in seven has a broken containerd (so auto workloads go to docker or a VM)
        runtimes: vec![
            rt(RuntimeKind::Containerd, !i.is_multiple_of(7)),
            rt(RuntimeKind::Docker, !i.is_multiple_of(3)),
            rt(RuntimeKind::Qemu, true),
        ],
        hypervisor: None,
        link: Some(LinkInfo { rate_mbit: [37.0, 100.0, 1000.0][i % 3], latency_ms: [36.784, 10.0, 1.0][i % 3] }),
        labels: Default::default(),
    }
}

fn spec(i: usize) -> WorkloadSpec {
    let placement = match i % 6 {
        0 => "placement:\n  prefer_client: true\n",
        1 => "placement:\n  tiers: [cloud, edge]\n",
        2 => "placement:\n  cpu_flags: [avx2]\n",
        3 => "kind: vm\n",
        _ => "",
    };
    let yaml = format!(
        "name: w-{i:05}\nimage: away/counter:latest\nresources:\n  memory: {}Mi\n  cpus: {}\n{placement}",
        [128, 256, 512][i % 3],
        [0.25, 0.5, 1.0][i % 3]
    );
    WorkloadSpec::parse(&yaml, SpecFormat::Yaml, "bench").expect("bench spec")
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("broker.db");
    let mut config = BrokerConfig::new(vec!["user".into()], "join".into());
    config.db_path = db.clone();
    config.node_timeout = Duration::from_secs(3600);
    let broker = Broker::open(config).expect("open broker");

    let t = Instant::now();
    for i in 0..NODES {
        let req =
            RegisterRequest { node: node(i), api_addr: "127.0.0.1:1".into(), transfer_addr: "127.0.0.1:2".into() };
        broker.register(Some("join"), req).expect("register");
    }
    let register = t.elapsed();

    let specs: Vec<WorkloadSpec> = (0..WORKLOADS).map(spec).collect();
    let mut latencies = Vec::with_capacity(WORKLOADS);
    let mut refused = 0;
    let t = Instant::now();
    for s in specs {
        let one = Instant::now();
        if broker.submit(s, false).is_err() {
            refused += 1;
        }
        latencies.push(one.elapsed());
    }
    let total = t.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];

    // placement alone (no DB write), on the final state: a dry run of one more workload
    let t = Instant::now();
    let dry = 200;
    for i in 0..dry {
        let mut s = spec(i);
        s.name = format!("dry-{i}");
        let _ = broker.submit(s, true);
    }
    let dry_each = t.elapsed() / dry as u32;

    let db_bytes: u64 = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("away-broker placement benchmark");
    println!(
        "setup: {NODES} nodes (cloud/edge/client in turn, Intel/AMD, 8-64 cores, 16-64 GiB, 1 in 7 with containerd down, \
         1 in 5 without avx2), {WORKLOADS} workloads (128-512 MiB, 0.25-1 CPU; 1/6 prefer_client, 1/6 never client, \
         1/6 need avx2, 1/6 kind vm), submitted one by one through Broker::submit: both placement phases over all \
         nodes + one SQLite transaction (WAL, synchronous=FULL, temp file); {cpus} CPUs, release build"
    );
    println!("registering {NODES} nodes: {:.2} s", register.as_secs_f64());
    println!(
        "placed {} of {WORKLOADS} ({refused} refused) in {:.2} s: {:.0} placements/s",
        WORKLOADS - refused,
        total.as_secs_f64(),
        WORKLOADS as f64 / total.as_secs_f64()
    );
    println!(
        "per placement: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; placement alone (dry run, full state): {:.2} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        pct(1.0).as_secs_f64() * 1e3,
        dry_each.as_secs_f64() * 1e3
    );
    println!("database: {:.1} MiB", db_bytes as f64 / (1 << 20) as f64);
}
