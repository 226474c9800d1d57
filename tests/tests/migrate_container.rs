//! Container migration end to end: a source node and a target agent on this host (each
//! with its own containerd namespace and state directory), the real containerd, Docker
//! and CRIU. The counter's count goes on after the move; faults end with exactly one
//! running instance and the count intact.

use std::path::PathBuf;
use std::process::Command;

use away_e2e::counter_state as state;
use away_e2e::{free_port, http_get_at, lab_image, require_root, require_socket, wait_for, Counter, LocalAgent, Node};
use serde_json::Value;

fn ready() -> bool {
    require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require_socket("/run/docker.sock", "dockerd")
}

/// A target agent process, killed (by its PID) when dropped.
struct Agent {
    agent: LocalAgent,
    /// dropped after the agent: a tmpfs is unmounted once nothing uses it
    _tmpfs: Option<Unmount>,
    /// Its stderr.
    log: PathBuf,
}

/// A tmpfs this test mounted, unmounted when dropped.
struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

impl std::ops::Deref for Agent {
    type Target = LocalAgent;
    fn deref(&self) -> &LocalAgent {
        &self.agent
    }
}

impl Agent {
    fn start(test: &str, env: &[(&str, &str)], tiny_disk: bool) -> Agent {
        let node = node("target", test);
        let mut tmpfs = None;
        if tiny_disk {
            // the target's transfer spool on a 64 KiB tmpfs: it fills up mid-transfer (the
            // image, uploaded before the source stops, goes to the store beside it)
            let spool = node.state.join("transfers");
            std::fs::create_dir_all(&spool).unwrap();
            let ok = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
                .arg(&spool)
                .status()
                .unwrap()
                .success();
            assert!(ok, "cannot mount a tmpfs on {}", spool.display());
            tmpfs = Some(Unmount(spool));
        }
        let log = PathBuf::from(format!("/tmp/away-e2e-mig/agent-{test}-{}.log", std::process::id()));
        let agent = node.start_agent(&format!("target-{test}"), &["--commit-lease", "20"], env, &log);
        Agent { agent, _tmpfs: tmpfs, log }
    }
}

type Workload<'a> = Counter<'a>;

fn start_counter<'a>(source: &'a Node, target: &'a Node, test: &str, runtime: &str) -> Workload<'a> {
    source.start_counter(target, format!("mig-{test}-{}", std::process::id()), runtime)
}

fn migrate(w: &Workload, agent: &Agent, extra: &[&str]) -> (bool, Value, String) {
    let mut args =
        vec!["migrate", &w.name, "--to", &agent.api, "--json", "--source-name", "source", "--reconnect-timeout", "15"];
    args.extend_from_slice(extra);
    let (ok, out, err) = w.source.away(&args);
    (ok, serde_json::from_str(&out).unwrap_or(Value::Null), err)
}

/// Running Docker containers of workload `name` on this host's one engine, which the
/// test's source and target nodes share (so `away ps` of either node sees both).
fn docker_running(name: &str) -> usize {
    let out = Command::new(away_e2e::docker_cli())
        .args(["ps", "-q", "--filter", &format!("label=away.workload={name}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Exactly one running instance, on `node`, and its count went on from `before`.
fn assert_one_instance_on(node: &Node, other: &Node, w: &Workload, before: (u64, u64)) {
    assert!(node.running(&w.name), "{} is not running where it should be", w.name);
    let on_docker = node.ps().iter().any(|x| x["name"] == w.name.as_str() && x["runtime"] == "docker");
    if on_docker {
        assert_eq!(docker_running(&w.name), 1, "{} runs more than once on the shared engine", w.name);
    } else {
        assert!(!other.running(&w.name), "{} runs on both nodes", w.name);
    }
    let after = wait_for(20, || state(w.port)).expect("counter answers after the move");
    assert_eq!(after.1, before.1, "the counter restarted (start time changed) instead of being restored");
    assert!(after.0 >= before.0, "count went back: {} -> {}", before.0, after.0);
    eprintln!("count {} -> {}", before.0, after.0);
}

fn marker_rootfs(runtime: &str, node: &Node, name: &str) -> PathBuf {
    match runtime {
        "containerd" => {
            PathBuf::from(format!("/run/containerd/io.containerd.runtime.v2.task/{}/{name}/rootfs", node.ns))
        }
        _ => {
            let out = Command::new(away_e2e::docker_cli())
                .args(["inspect", "-f", "{{.GraphDriver.Data.MergedDir}}", name])
                .output()
                .unwrap();
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    }
}

/// The steps of a restore through Docker's engine, in order: the target's image store,
/// then the engine's own.
const DOCKER_RESTORE_STEPS: &[&str] = &[
    "store",
    "engine-info",
    "image",
    "netns-holder",
    "docker-create",
    "rootfs-apply",
    "checkpoint-place",
    "docker-start",
    "checkpoint-delete",
    "status",
];

/// The steps of a containerd restore, in order: the target's image store, then
/// containerd's (the rootfs changes applied to the new snapshot, the task's creation, its
/// start, where the shim restores: runc around CRIU, and CRIU's own time from its log).
const CONTAINERD_RESTORE_STEPS: &[&str] =
    &["store", "image", "snapshot", "rootfs-diff", "container", "task-create", "shim-runc", "criu-restore", "status"];

/// The steps of a containerd checkpoint that stops the workload, in order (a move
/// deletes the exited task later, while the checkpoint travels: not in the pause).
const CONTAINERD_CHECKPOINT_STEPS: &[&str] = &["shim-runc", "criu-dump", "rootfs-diff"];

/// The report's phases account for the move: they sum to about its total, and the
/// phases named in `parts` (Docker's checkpoint and restore) are broken down into
/// exactly these steps of the engine, summing to about their phase; other phases have
/// no parts. (No timing bounds: numbers go in the benchmarks.)
fn phases_add_up(report: &Value, parts: &[(&str, &[&str])]) {
    let millis = |p: &Value| p["millis"].as_u64().unwrap();
    let phases = report["phases"].as_array().unwrap();
    let total = report["total_millis"].as_u64().unwrap();
    let sum: u64 = phases.iter().map(millis).sum();
    // what no phase covers: opening the transfer connection, the payload's directory
    assert!(sum <= total && total - sum <= 100 + total / 20, "phases sum to {sum} ms of {total} ms: {report}");
    let named = |name: &str| phases.iter().find(|p| p["name"] == name).unwrap();
    for name in ["checkpoint", "transfer", "restore"] {
        assert!(millis(named(name)) > 0, "phase {name} took 0 ms: {report}");
    }
    for phase in phases {
        let name = phase["name"].as_str().unwrap();
        let steps: Vec<(&str, u64)> = phase["parts"]
            .as_array()
            .map(|a| a.iter().map(|p| (p["name"].as_str().unwrap(), millis(p))).collect())
            .unwrap_or_default();
        let expected = parts.iter().find(|(n, _)| *n == name).map(|(_, s)| s.to_vec()).unwrap_or_default();
        assert_eq!(steps.iter().map(|(n, _)| *n).collect::<Vec<_>>(), expected, "the steps of {name}: {report}");
        if steps.is_empty() {
            continue;
        }
        let (sum, whole) = (steps.iter().map(|(_, ms)| ms).sum::<u64>(), millis(phase));
        // each step rounds down to whole milliseconds
        // (what lies between the steps: the agent's request handling, a loaded machine)
        assert!(sum <= whole + steps.len() as u64 && whole - sum.min(whole) <= 300 + whole / 5, "{name}: {report}");
        // CRIU's dump and restore are never free
        for (step, ms) in steps {
            assert!(
                !matches!(step, "docker-checkpoint" | "runc-dump" | "docker-start" | "criu-dump" | "criu-restore")
                    || ms > 0,
                "{report}"
            );
        }
    }
}

fn move_keeps_state(runtime: &str) {
    // (at info: its log says whether it prepared the image when the move was announced)
    let agent = Agent::start(&format!("ok-{runtime}"), &[("AWAY_LOG", "info")], false);
    let source = node("source", &format!("ok-{runtime}"));
    let w = start_counter(&source, &agent.node, &format!("ok-{runtime}"), runtime);
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 10)).expect("counter counts");
    // the workload's own file changes travel too
    std::fs::write(marker_rootfs(runtime, &source, &w.name).join("away-marker"), b"written before the move").unwrap();
    let (ok, report, err) = migrate(&w, &agent, &[]);
    assert!(ok, "migrate failed: {err}");
    eprintln!("report: {report}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["mode"], "stop-and-copy");
    assert!(report["downtime_millis"].as_u64().unwrap() > 0);
    assert!(report["bytes_wire"].as_u64().unwrap() > 0 && report["bytes_raw"].as_u64().unwrap() > 0);
    let phases: Vec<&str> = report["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    for p in ["check", "checkpoint", "transfer", "restore", "settle", "commit", "cleanup"] {
        assert!(phases.contains(&p), "phase {p} missing: {phases:?}");
    }
    let docker: &[(&str, &[&str])] = &[
        ("checkpoint", &["inspect", "docker-checkpoint", "rootfs-diff", "step-aside"]),
        ("restore", DOCKER_RESTORE_STEPS),
    ];
    let containerd: &[(&str, &[&str])] =
        &[("checkpoint", CONTAINERD_CHECKPOINT_STEPS), ("restore", CONTAINERD_RESTORE_STEPS)];
    phases_add_up(&report, if runtime == "docker" { docker } else { containerd });
    // the announcement carried the image: the target got it ready in its runtime while
    // the source checkpointed
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(log.contains("prepared for a move"), "the target did not prepare the image on the announcement:\n{log}");
    assert_one_instance_on(&agent.node, &source, &w, before);
    assert_eq!(
        std::fs::read(marker_rootfs(runtime, &agent.node, &w.name).join("away-marker")).unwrap(),
        b"written before the move"
    );
    // no checkpoint left on either side
    let (_, out, _) = source.away(&["archives", "list", "--json"]);
    assert_eq!(out.trim(), "[]", "source kept an archive");
    let spool = agent.node.state.join("transfers");
    let left: Vec<_> = std::fs::read_dir(&spool).map(|rd| rd.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "target kept transfer data in {}", spool.display());
}

#[test]
fn containerd_to_containerd_keeps_the_count_and_the_files() {
    if ready() {
        move_keeps_state("containerd");
    }
}

#[test]
fn docker_to_docker_keeps_the_count_and_the_files() {
    if ready() {
        move_keeps_state("docker");
    }
}

/// The address of a Docker container on its bridge network.
fn docker_ip(name: &str) -> Option<std::net::IpAddr> {
    let inspect = |what: &str, format: &str| -> Option<String> {
        let out = Command::new(away_e2e::docker_cli()).args(["inspect", "-f", format, what]).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // a workload joins its network-namespace holder's network: the address is the holder's
    let mode = inspect(name, "{{.HostConfig.NetworkMode}}")?;
    let owner = mode.strip_prefix("container:").unwrap_or(name);
    inspect(owner, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")?.parse().ok()
}

/// count and start time of the counter in Docker container `name`, through its bridge
/// address (it publishes no port)
fn docker_state(name: &str, port: u16) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&http_get_at(docker_ip(name)?, port, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

/// A Docker workload that publishes no port, reached on its own bridge address (its
/// holder's): asked for stop-copy, it moves staged (streamed Docker moves are off, see
/// away_migrate::mode) and says why; the count, the start time and the files go on,
/// and the report names the engine's steps on both sides.
#[test]
fn docker_move_without_ports_keeps_the_count_and_the_files() {
    if !ready() {
        return;
    }
    let test = "streamed-docker";
    let agent = Agent::start(test, &[], false);
    let source = node("source", test);
    std::fs::create_dir_all(&source.state).unwrap();
    let name = format!("mig-{test}-{}", std::process::id());
    let port = 8080;
    let tar = lab_image("counter");
    let (ok, _, err) = source.away(&[
        "run",
        tar.to_str().unwrap(),
        "--name",
        &name,
        "--runtime",
        "docker",
        "-e",
        &format!("COUNTER_PORT={port}"),
    ]);
    assert!(ok, "run counter on docker: {err}");
    let w = Workload { name, port, target_port: port, source: &source, target: &agent.node };
    let before = wait_for(20, || docker_state(&w.name, port).filter(|s| s.0 >= 10)).expect("counter counts");
    std::fs::write(marker_rootfs("docker", &source, &w.name).join("away-marker"), b"written before the move").unwrap();
    let (ok, report, err) = migrate(&w, &agent, &["--mode", "stop-copy"]);
    assert!(ok, "migrate failed: {err}");
    eprintln!("report: {report}");
    assert_eq!(report["mode"], "stop-and-copy");
    assert!(report["reason"].as_str().unwrap().contains("Docker moves are staged"), "{report}");
    phases_add_up(
        &report,
        &[
            ("checkpoint", &["inspect", "docker-checkpoint", "rootfs-diff", "step-aside"]),
            ("restore", DOCKER_RESTORE_STEPS),
        ],
    );
    assert!(agent.node.running(&w.name), "{} is not running on the target", w.name);
    assert_eq!(docker_running(&w.name), 1, "{} runs more than once on the shared engine", w.name);
    let after = wait_for(20, || docker_state(&w.name, port)).expect("counter answers after the move");
    assert_eq!(after.1, before.1, "the counter restarted instead of being restored");
    assert!(after.0 >= before.0, "count went back: {} -> {}", before.0, after.0);
    assert_eq!(
        std::fs::read(marker_rootfs("docker", &agent.node, &w.name).join("away-marker")).unwrap(),
        b"written before the move"
    );
    let (_, out, _) = source.away(&["archives", "list", "--json"]);
    assert_eq!(out.trim(), "[]", "source kept an archive");
}

#[test]
fn a_cut_link_and_a_corrupt_chunk_are_survived() {
    if !ready() {
        return;
    }
    let agent = Agent::start("faulty-link", &[], false);
    let source = node("source", "faulty-link");
    let w = start_counter(&source, &agent.node, "faulty-link", "containerd");
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 10)).expect("counter counts");
    // 64 KiB chunks: the payload (CRIU images + image tar) is a dozen or more chunks
    let (ok, report, err) =
        migrate(&w, &agent, &["--chunk-size", "65536", "--fault-cut-after", "3", "--fault-corrupt-chunk", "5"]);
    assert!(ok, "migration did not survive the faults: {err}");
    assert_eq!(report["ok"], true);
    assert_one_instance_on(&agent.node, &source, &w, before);
}

fn failed_move_resumes_the_source(test: &str, env: &[(&str, &str)], tiny_disk: bool, expect: &str) {
    let agent = Agent::start(test, env, tiny_disk);
    let source = node("source", test);
    let w = start_counter(&source, &agent.node, test, "containerd");
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 10)).expect("counter counts");
    let (ok, _, err) = migrate(&w, &agent, &["--chunk-size", "65536"]);
    assert!(!ok, "the migration should have failed");
    assert!(err.contains(expect), "error does not say {expect:?}: {err}");
    assert!(err.contains("resumed"), "error does not say the source resumed: {err}");
    assert_one_instance_on(&source, &agent.node, &w, before);
    // the failed archive is kept for inspection, owner-only
    let (_, out, _) = source.away(&["archives", "list", "--json"]);
    let kept: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(kept.len(), 1, "{out}");
    assert_eq!(kept[0]["state"], "failed");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(kept[0]["path"].as_str().unwrap()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let (ok, _, _) = source.away(&["archives", "prune", "--keep", "0B"]);
    assert!(ok);
}

#[test]
fn a_failed_restore_on_the_target_resumes_the_source() {
    if ready() {
        failed_move_resumes_the_source("bad-restore", &[("AWAY_FAULT_RESTORE", "fail")], false, "restore killed");
    }
}

#[test]
fn a_full_target_disk_resumes_the_source() {
    if ready() {
        failed_move_resumes_the_source("full-disk", &[], true, "disk full");
    }
}

#[test]
fn an_unreachable_target_moves_nothing() {
    if !ready() {
        return;
    }
    let source = node("source", "unreachable");
    let nowhere = node("target", "unreachable");
    let w = start_counter(&source, &nowhere, "unreachable", "containerd");
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 5)).expect("counter counts");
    let port = free_port();
    let (ok, _, err) = source.away(&["migrate", &w.name, "--to", &format!("127.0.0.1:{port}")]);
    assert!(!ok);
    assert!(err.contains("unreachable"), "{err}");
    // nothing happened: the source still runs, never stopped
    assert!(source.running(&w.name));
    let after = state(w.port).unwrap();
    assert_eq!(after.1, before.1);
}

/// Node `role` of test `test`.
fn node(role: &str, test: &str) -> Node {
    let id = format!("{role}-{test}-{}", std::process::id());
    Node::at(format!("away-{id}"), PathBuf::from(format!("/tmp/away-e2e-mig/{id}")))
}
