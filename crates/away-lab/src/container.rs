//! Container runs: a source node (`away run` with its own state directories) and a
//! target agent (`away agent`, a subprocess) whose transfer port sits behind the link;
//! the move is `away migrate --json`, the same path users take. With the packet link the
//! target agent runs in namespace B and `away migrate` in namespace A, so the migration
//! traffic crosses the link; `away run` and the runtimes' sockets stay on the host.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use away_model::MigrationReport;
use tokio::process::{Child, Command};

use crate::link::{LinkEmulator, LinkFront, PacketSides};
use crate::{CompareOptions, MigrationPath, PlannedRun, RunOutcome, RunResult};

/// Compression of the checkpoint stream (away's default).
pub const COMPRESSION: &str = "zstd:1";
const AGENT_UP: Duration = Duration::from_secs(30);
const FILL_TIMEOUT: Duration = Duration::from_secs(120);

struct Node {
    base: PathBuf,
    namespace: String,
}

/// The bearer token of the lab's target agent, which `away migrate` presents: a
/// standalone agent without one refuses every call that changes anything. Random per
/// lab process, passed by environment only.
fn agent_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| format!("lab-{}-{:?}", std::process::id(), Instant::now()))
    })
}

impl Node {
    /// `bin` in network namespace `netns` (through `nsenter`), or on the host.
    fn command_in(&self, bin: &Path, netns: Option<&away_link::packet::Endpoint>) -> Command {
        let mut c = match netns {
            Some(end) => {
                let mut c = Command::new("nsenter");
                c.args(PacketSides::nsenter_args(end)).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        c.env("AWAY_AGENT_TOKEN", agent_token())
            .env("AWAY_STATE_DIR", self.base.join("state"))
            .env("AWAY_RUN_DIR", self.base.join("run"))
            .env("AWAY_NAMESPACE", &self.namespace)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn away(&self, bin: &Path, args: &[&str]) -> Result<std::process::Output, String> {
        self.away_in(bin, None, args).await
    }

    async fn away_in(
        &self,
        bin: &Path,
        netns: Option<&away_link::packet::Endpoint>,
        args: &[&str],
    ) -> Result<std::process::Output, String> {
        self.command_in(bin, netns)
            .args(args)
            .output()
            .await
            .map_err(|e| format!("run {} {args:?}: {e}", bin.display()))
    }
}

/// The target agent's log, kept beside the results (`logs/run-N-target-agent.log`;
/// `AWAY_LOG` sets its detail) for reading a run's timings afterwards.
fn agent_log(opts: &CompareOptions, planned: &PlannedRun) -> Stdio {
    let dir = opts.out_dir.join("logs");
    let file = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::File::create(dir.join(format!("run-{}-target-agent.log", planned.run))));
    match file {
        Ok(f) => Stdio::from(f),
        Err(e) => {
            tracing::warn!("cannot keep the target agent's log in {}: {e}", dir.display());
            Stdio::null()
        }
    }
}

fn free_port() -> Result<u16, String> {
    away_runtime::host::free_loopback_port().map_err(|e| format!("find a free port on 127.0.0.1: {e}"))
}

/// The source's move history (the phase costs its predictions learn from) is one
/// node's across the runs, as on a real node: `into` copies the experiment's history
/// into this run's fresh source before its move, `!into` back after it.
/// (A missing file is no history yet.)
fn carry_history(opts: &CompareOptions, source: &Node, into: bool) {
    let kept = opts.out_dir.join("logs").join("move-history.jsonl");
    let node = source.base.join("state").join("move-history.jsonl");
    let (from, to) = if into { (&kept, &node) } else { (&node, &kept) };
    if from.exists() {
        if let Err(e) = to.parent().map(std::fs::create_dir_all).unwrap_or(Ok(())).and_then(|_| std::fs::copy(from, to))
        {
            tracing::warn!("cannot carry the move history to {}: {e}", to.display());
        }
    }
}

/// One container run; failures become a `Failed` result with the reason in notes.
pub async fn run(
    opts: &CompareOptions,
    work: &Path,
    planned: &PlannedRun,
    identities: Option<&crate::LabIdentities>,
    status: &(dyn Fn(String) + Sync),
) -> RunResult {
    let runtime = match planned.path {
        MigrationPath::ContainerDocker => "docker",
        _ => "containerd",
    };
    let dir = work.join(format!("c{}", planned.run));
    let source = Node { base: dir.join("source"), namespace: "away-lab-source".into() };
    let target = Node { base: dir.join("target"), namespace: "away-lab-target".into() };
    let name = format!("lab-memload-{}-{}", std::process::id(), planned.run);
    let mut agent = None;
    let mut link = None;
    let outcome =
        attempt(opts, planned, runtime, (&source, &target), identities, &name, &mut agent, &mut link, status).await;
    status("cleaning up".into());
    let _ = target.away(&opts.away_bin, &["rm", "--force", &name]).await;
    let _ = source.away(&opts.away_bin, &["rm", "--force", &name]).await;
    if let Some(mut a) = agent {
        let _ = a.kill().await;
    }
    if let Some(l) = link {
        l.down().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    match outcome {
        Ok(r) => r,
        Err(e) => RunResult::new(planned, RunOutcome::Failed, Duration::ZERO, None).with_notes(format!("failed: {e}")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    opts: &CompareOptions,
    planned: &PlannedRun,
    runtime: &str,
    (source, target): (&Node, &Node),
    identities: Option<&crate::LabIdentities>,
    name: &str,
    agent_slot: &mut Option<Child>,
    link_slot: &mut Option<PacketSides>,
    status: &(dyn Fn(String) + Sync),
) -> Result<RunResult, String> {
    let bin = &opts.away_bin;
    let (api, transfer) = (free_port()?, free_port()?);
    // The proxy's front (kept until the move is over) or the packet link's namespaces.
    let mut front: Option<LinkFront> = None;
    let (api_addr, transfer_listen, transfer_advertise) = match opts.link_emulator {
        LinkEmulator::Packet => {
            status("bringing up the packet link".into());
            let sides = PacketSides::up(&PacketSides::name_for(planned.run), planned.link.profile()).await?;
            let b = sides.b().addr;
            *link_slot = Some(sides);
            let transfer = SocketAddr::from((b, transfer));
            (SocketAddr::from((b, api)), transfer, transfer)
        }
        LinkEmulator::SplitTcpProxy => {
            let upstream = SocketAddr::from(([127, 0, 0, 1], transfer));
            let f = opts
                .link_emulator
                .start(upstream, planned.link.profile())
                .await
                .map_err(|e| format!("start the link in front of {upstream}: {e}"))?;
            let advertise = f.addr;
            front = Some(f);
            (SocketAddr::from(([127, 0, 0, 1], api)), upstream, advertise)
        }
    };
    let side_a = link_slot.as_ref().map(|l| l.a().clone());
    let side_b = link_slot.as_ref().map(|l| l.b().clone());
    // --overlay on: both sides on a VXLAN overlay across the link; the workload starts
    // in side A (the source's devices are there) with its address in its spec
    let spec_file = match (planned.overlay, link_slot.as_ref()) {
        (false, _) => None,
        (true, None) => return Err("the overlay needs the packet link".into()),
        (true, Some(sides)) => {
            status("building the overlay".into());
            crate::overlay::build(sides).await?;
            let spec = serde_json::json!({
                "name": name,
                "image": opts.image,
                "overlay": crate::overlay::workload_address(),
            });
            let file = source.base.join("spec.json");
            std::fs::create_dir_all(&source.base)
                .and_then(|_| std::fs::write(&file, spec.to_string()))
                .map_err(|e| format!("write {}: {e}", file.display()))?;
            Some(file.to_string_lossy().to_string())
        }
    };
    // the target holds the app's image before the move, as Podman's target store does
    // in the peer's runs: the image's one-time upload is not part of a move's time
    away_runtime::store::ImageStore::new(&target.base.join("state"))
        .add(&opts.image, None)
        .map_err(|e| format!("load the image into the target's store: {e}"))?;
    // with identities: each node's in its state directory, where `away agent` and
    // `away migrate` look for it
    for (node, identity) in identities.iter().flat_map(|i| [(source, &i.source), (target, &i.target)]) {
        identity
            .save(&node.base.join("state").join("identity"))
            .map_err(|e| format!("save the node identity in {}: {e}", node.base.display()))?;
    }
    status("starting the target agent".into());
    let mut agent = target.command_in(bin, side_b.as_ref());
    // a lab killed outright (SIGKILL) takes its target agent along: SIGTERM, which the
    // agent takes for a graceful stop (spawned here, on a runtime thread that lives as
    // long as the lab; nsenter execs the agent in place, which keeps the signal)
    away_runtime::host::process::die_with_spawning_thread(
        agent.as_std_mut(),
        away_runtime::host::process::Signal::TERM,
        false,
    );
    agent.args([
        "agent",
        "--name",
        crate::LabIdentities::TARGET,
        "--listen",
        &api_addr.to_string(),
        "--transfer-listen",
        &transfer_listen.to_string(),
        "--transfer-advertise",
        &transfer_advertise.to_string(),
    ]);
    if identities.is_none() {
        agent.arg("--insecure-plaintext-channels");
    }
    agent.stdout(Stdio::null()).stderr(agent_log(opts, planned));
    *agent_slot = Some(agent.spawn().map_err(|e| format!("start away agent: {e}"))?);
    let t = Instant::now();
    loop {
        let up = match link_slot.as_ref() {
            Some(l) => l.connect_from_a(api_addr, Duration::from_secs(2)).await,
            None => tokio::net::TcpStream::connect(api_addr).await.is_ok(),
        };
        if up {
            break;
        }
        if t.elapsed() > AGENT_UP {
            return Err(format!("the target agent did not listen on {api_addr} within {} s", AGENT_UP.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    status(format!("starting memload on {runtime}"));
    let (cpu, ram) = planned.load.memload_env();
    let app_mib = opts.app_ram.as_mib().max(1);
    let image = opts.image.to_string_lossy().to_string();
    // container-volume: memload writes to a volume, as the vm-disk VM to its disk
    let volume = format!("data:{}", crate::vm::DISK_MOUNT);
    let disk_env: Vec<String> = crate::vm::disk_env(opts, planned).iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut extra: Vec<&str> = Vec::new();
    if planned.path.writes_disk() {
        extra.extend(["-v", &volume]);
        for e in &disk_env {
            extra.extend(["-e", e]);
        }
    }
    let out = source
        .away_in(
            bin,
            spec_file.as_ref().and(side_a.as_ref()),
            &[
                "run",
                spec_file.as_deref().unwrap_or(&image),
                "--name",
                name,
                "--runtime",
                runtime,
                "--memory",
                &format!("{}Mi", app_mib * 3 / 2 + 64),
                "-e",
                &format!("MEMLOAD_SIZE={}", opts.app_ram.bytes()),
                "-e",
                &format!("MEMLOAD_CPU={cpu}"),
                "-e",
                &format!("MEMLOAD_RAM={ram}"),
                "-e",
                &format!("MEMLOAD_CPU_THREADS={}", opts.cpu_threads),
                "-e",
                "MEMLOAD_PORT=0",
                "-e",
                &format!("MEMLOAD_INTERVAL_MS={}", HEARTBEAT.as_millis()),
            ]
            .into_iter()
            .chain(extra)
            .collect::<Vec<_>>(),
        )
        .await?;
    if !out.status.success() {
        return Err(format!("away run: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    status("waiting for memload to fill its memory".into());
    let t = Instant::now();
    loop {
        let logs = source.away(bin, &["logs", name]).await?;
        if String::from_utf8_lossy(&logs.stdout).contains("pages resident") {
            break;
        }
        if t.elapsed() > FILL_TIMEOUT {
            return Err(format!("memload did not report its pages resident within {} s", FILL_TIMEOUT.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Let the load run a moment, as the VM's does.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // memload's write rate before the move (the last heartbeats), to judge it after
    let logs = source.away(bin, &["logs", name]).await?;
    let before = heartbeats(&String::from_utf8_lossy(&logs.stdout));
    let mut rates: Vec<u64> = before.iter().rev().take(4).map(|b| b.1).collect();
    rates.sort_unstable();
    let baseline = rates.get(rates.len() / 2).copied().filter(|r| *r > 0);

    status(format!("migrating over {}", planned.link));
    carry_history(opts, source, true);
    // every path is timed the same way, on the lab's clock: from here (the command's
    // start) to the workload running on the target (crate::timed_total)
    let api = api_addr.to_string();
    let mut args = vec![
        "migrate",
        name,
        "--to",
        &api,
        "--compression",
        COMPRESSION,
        "--mode",
        match planned.path {
            MigrationPath::ContainerLazy => "lazy",
            MigrationPath::ContainerStaged => "staged",
            _ => "stop-copy",
        },
        "--json",
        "--reconnect-timeout",
        "120",
    ];
    if identities.is_some() {
        // the identity is the source's STATE_DIR/identity; the target's name is checked
        args.extend(["--to-node", crate::LabIdentities::TARGET, "--source-name", crate::LabIdentities::SOURCE]);
    }
    let start_ms = crate::unix_ms();
    let out = source.away_in(bin, side_a.as_ref(), &args).await?;
    drop(front);
    carry_history(opts, source, false);
    let report: Option<MigrationReport> = serde_json::from_slice(&out.stdout).ok();
    let mut slowed = None;
    if let (Some(r), Some(baseline)) = (report.as_ref().filter(|r| r.ok), baseline) {
        // a few heartbeats of the moved app at full speed close the picture
        tokio::time::sleep(HEARTBEAT * 4).await;
        let logs = target.away(bin, &["logs", name]).await?;
        // kept beside the agent's log: the app's own account of the move
        let _ = std::fs::write(opts.out_dir.join("logs").join(format!("run-{}-app.log", planned.run)), &logs.stdout);
        let after = heartbeats(&String::from_utf8_lossy(&logs.stdout));
        slowed = r.resumed_unix_ms.and_then(|resumed| slowed_after(baseline, &after, resumed, HEARTBEAT));
    }
    match report {
        Some(r) if out.status.success() && r.ok => Ok(RunResult::new(
            planned,
            RunOutcome::Moved,
            // a lazy move has all its memory on the target `degraded` after its resume
            // (from the move's own start when it says: the measuring for its prediction
            // comes before and is no part of the move, and Podman has none)
            crate::timed_total(
                r.started_unix_ms.map_or(start_ms, |s| s.max(start_ms)),
                r.resumed_unix_ms.map(|at| at + r.degraded_millis),
            )
            .unwrap_or(Duration::from_millis(r.total_millis)),
            Some(Duration::from_millis(r.downtime_millis)),
        )
        .with_degraded((r.degraded_millis > 0).then(|| Duration::from_millis(r.degraded_millis)))
        .with_slowed(slowed)
        .with_bytes(r.bytes_wire, r.bytes_raw)
        .with_paged(r.paged_bytes_raw)
        .with_predicted(r.predicted.clone())
        .with_follow(r.network.as_ref().and_then(|n| n.follow_millis))
        // container-volume: the volume's files sent, before the freeze and in it
        .with_disk(r.volumes.as_ref().map(|v| v.precopy_bytes_raw + v.frozen_bytes_raw))
        .with_notes(phases(&r))),
        Some(r) => Ok(RunResult::new(planned, RunOutcome::Failed, Duration::from_millis(r.total_millis), None)
            .with_bytes(r.bytes_wire, r.bytes_raw)
            .with_notes(format!("failed: {}", r.error.unwrap_or_else(|| "migration not ok".into())))),
        None => Err(format!(
            "away migrate ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("no output")
        )),
    }
}

/// memload's heartbeat period in the lab (its default is 1 s: too coarse to see a
/// sub-second slowdown).
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(250);

/// memload's heartbeats in its log: (Unix ms, pages written per second since the last).
pub(crate) fn heartbeats(log: &str) -> Vec<(u64, u64)> {
    let field =
        |l: &str, key: &str| l.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse::<u64>().ok());
    log.lines()
        .filter(|l| l.starts_with("memload: tick="))
        .filter_map(|l| Some((field(l, "unix_ms=")?, field(l, "pages_per_s=")?)))
        .collect()
}

/// How long after `resumed` (Unix ms) the app wrote below 90 % of `baseline` pages/s:
/// until the start of the first full heartbeat period after the resume in which it
/// wrote at least that. None when no heartbeat after the resume reached it.
pub(crate) fn slowed_after(baseline: u64, beats: &[(u64, u64)], resumed: u64, period: Duration) -> Option<Duration> {
    let period = period.as_millis() as u64;
    let full = beats.iter().find(|(at, rate)| *at >= resumed + period && *rate * 10 >= baseline * 9)?;
    Some(Duration::from_millis((full.0 - period).saturating_sub(resumed)))
}

fn phases(r: &MigrationReport) -> String {
    let secs = |p: &away_model::MigrationPhase| format!("{} {:.2}s", p.name, p.millis as f64 / 1000.0);
    let p: Vec<String> = r
        .phases
        .iter()
        .map(|p| match p.parts.is_empty() {
            true => secs(p),
            // the runtime's own steps (Docker's), in brackets
            false => format!("{} [{}]", secs(p), p.parts.iter().map(secs).collect::<Vec<_>>().join(", ")),
        })
        .collect();
    format!("{} {COMPRESSION}; {}; away's own total {:.2}s", r.mode, p.join(", "), r.total_millis as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_and_the_slowdown_after_a_resume() {
        let log = "memload: 65536 pages resident\n\
                   memload: tick=1 unix_ms=1000 pages_per_s=400000 pages_total=1 passes=0\n\
                   memload: tick=2 unix_ms=1250 pages_per_s=1000 pages_total=2 passes=0\n\
                   memload: tick=3 unix_ms=1500 pages_per_s=200000 pages_total=3 passes=0\n\
                   memload: tick=4 unix_ms=1750 pages_per_s=390000 pages_total=4 passes=0\n";
        let beats = heartbeats(log);
        assert_eq!(beats.len(), 4);
        assert_eq!(beats[0], (1000, 400_000));
        let period = Duration::from_millis(250);
        // resumed at 1100: the first full period at >= 90 % ends at 1750, so it began at 1500
        assert_eq!(slowed_after(400_000, &beats, 1100, period), Some(Duration::from_millis(400)));
        // a heartbeat whose period straddles the resume does not count
        assert_eq!(slowed_after(400_000, &beats, 900, period), Some(Duration::from_millis(600)));
        assert_eq!(slowed_after(500_000, &beats, 1100, period), None);
    }
}
