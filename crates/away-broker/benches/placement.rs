//! Placement throughput: 10,000 workloads submitted through `Broker::submit` by 32
//! concurrent clients (as the HTTP API's blocking pool calls it) onto 1,000 and onto
//! 10,000 simulated nodes; each submission runs both placement phases over every node,
//! and concurrent submissions share one SQLite transaction (group commit, WAL,
//! `synchronous=FULL`, a temporary file). Then 500 more one by one (one transaction
//! each) for the latency of a lone submission, and dry runs for placement alone.
//! Prints the setup and placements per second.
//! Run: `cargo bench -p away-broker --bench placement`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use away_broker::{Broker, BrokerConfig};
use away_model::{
    Arch, CpuInfo, CpuVendor, LinkInfo, NodeInfo, RegisterRequest, RuntimeInfo, RuntimeKind, SpecFormat, Tier,
    WorkloadSpec,
};

const WORKLOADS: usize = 10_000;
const CLIENTS: usize = 32;
const ONE_BY_ONE: usize = 500;

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
        disk_bases: Default::default(),
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

/// CPU seconds this process has used (user + system), from /proc/self/stat: on a
/// loaded 2-core host the wall clock also counts other processes' turns, the CPU time
/// does not.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // fields after the command name (which may hold spaces) close with ')'
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

fn percentiles(mut latencies: Vec<Duration>) -> String {
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64() * 1e3;
    format!("p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms", pct(0.5), pct(0.99), pct(1.0))
}

fn run(nodes: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("broker.db");
    let mut config = BrokerConfig::new(vec!["user".into()], "join".into());
    config.db_path = db.clone();
    config.node_timeout = Duration::from_secs(3600);
    let broker = Arc::new(Broker::open(config).expect("open broker"));

    let t = Instant::now();
    for i in 0..nodes {
        let req = RegisterRequest {
            node: node(i),
            api_addr: "127.0.0.1:1".into(),
            transfer_addr: "127.0.0.1:2".into(),
            csr: None,
        };
        broker.register(Some("join"), req).expect("register");
    }
    let register = t.elapsed();

    // CLIENTS threads, each submitting its share one after the other (specs parsed
    // before the clock starts: the API parses them before placement too, outside the
    // broker's lock)
    let shares: Vec<Vec<WorkloadSpec>> =
        (0..CLIENTS).map(|c| (c..WORKLOADS).step_by(CLIENTS).map(spec).collect()).collect();
    let (t, cpu) = (Instant::now(), cpu_seconds());
    let clients: Vec<_> = shares
        .into_iter()
        .map(|share| {
            let broker = broker.clone();
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut refused = 0;
                for s in share {
                    let one = Instant::now();
                    if broker.submit(s, false, "bench").is_err() {
                        refused += 1;
                    }
                    latencies.push(one.elapsed());
                }
                (latencies, refused)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(WORKLOADS);
    let mut refused = 0;
    for c in clients {
        let (l, r) = c.join().expect("client thread");
        latencies.extend(l);
        refused += r;
    }
    let total = t.elapsed();
    let total_cpu = cpu_seconds() - cpu;

    let mut alone = Vec::with_capacity(ONE_BY_ONE);
    for i in 0..ONE_BY_ONE {
        let mut s = spec(i);
        s.name = format!("alone-{i}");
        let one = Instant::now();
        let _ = broker.submit(s, false, "bench");
        alone.push(one.elapsed());
    }

    // placement alone (no DB write), on the final state: a dry run of one more workload
    let dry = 200;
    let specs: Vec<WorkloadSpec> = (0..dry).map(spec).collect();
    let (t, cpu) = (Instant::now(), cpu_seconds());
    for s in specs {
        let _ = broker.submit(s, true, "bench");
    }
    let dry_each = t.elapsed() / dry as u32;
    let dry_cpu = (cpu_seconds() - cpu) / dry as f64;

    let db_bytes: u64 = ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    println!("-- {nodes} nodes");
    println!("registering {nodes} nodes (one transaction each): {:.2} s", register.as_secs_f64());
    println!(
        "placed {} of {WORKLOADS} ({refused} refused) by {CLIENTS} concurrent clients in {:.2} s: {:.0} placements/s \
         ({:.0} per CPU-second of this process, {:.2} CPU-s); per submission {}",
        WORKLOADS - refused,
        total.as_secs_f64(),
        WORKLOADS as f64 / total.as_secs_f64(),
        WORKLOADS as f64 / total_cpu.max(0.01),
        total_cpu,
        percentiles(latencies)
    );
    println!("{ONE_BY_ONE} more one by one (a transaction each): {}", percentiles(alone));
    println!(
        "placement alone (dry run, full state): {:.3} ms wall, {:.3} ms CPU",
        dry_each.as_secs_f64() * 1e3,
        dry_cpu * 1e3
    );
    println!("load average at the end: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    println!("database: {:.1} MiB", db_bytes as f64 / (1 << 20) as f64);
}

fn main() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("away-broker placement benchmark");
    println!(
        "setup: nodes cloud/edge/client in turn, Intel/AMD, 8-64 cores, 16-64 GiB, 1 in 7 with containerd down, \
         1 in 5 without avx2; {WORKLOADS} workloads (128-512 MiB, 0.25-1 CPU; 1/6 prefer_client, 1/6 never client, \
         1/6 need avx2, 1/6 kind vm) through Broker::submit by {CLIENTS} threads: both placement phases over all \
         nodes, concurrent submissions stored together in one SQLite transaction (WAL, synchronous=FULL, temp \
         file); {cpus} CPUs, release build"
    );
    for nodes in [1_000, 10_000] {
        run(nodes);
    }
}
