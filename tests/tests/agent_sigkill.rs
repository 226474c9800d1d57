//! The target agent SIGKILLed (no chance to clean up) while its node runs a VM and a lazy
//! move into it is in its lazy phase. Afterwards nothing runs that nobody owns: the page
//! daemon and its supervising shell end by themselves (their relay lived in the agent),
//! the half-restored copy is killed and, once the agent is back, removed; the VM runs on
//! with the same PID and is still the node's (listed, stoppable): adopted, not orphaned;
//! the source runs on, resumed by CRIU. Checked by the PIDs recorded before the kill.
//!
//! Two nodes of a local cluster (`sigkill`), each in its network namespace with its own
//! containerd, as in migrate_lazy.rs. About 1.5 minutes (one TCG VM boot).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use away_cluster::NodeInfoLocal;
use away_e2e::{away_bin, cluster_plan, http_get_at, lab_image, require_vm_host, wait_for};
use away_model::Tier;
use away_runtime::host::process::{process_runs, processes, signal, Signal};
use serde_json::Value;

const PORT: u16 = 18083;
const AGENT_API: u16 = 7860;

fn base() -> PathBuf {
    PathBuf::from(format!("/tmp/away-e2e-sigkill-{}", std::process::id()))
}

fn on(node: &NodeInfoLocal, role: &str, args: &[&str]) -> Command {
    let state = base().join(role);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", node.netns)).arg(away_bin()).args(args);
    for (k, v) in node.env() {
        c.env(k, v);
    }
    c.env("AWAY_AGENT_TOKEN", away_e2e::agent_token())
        .env("AWAY_NAMESPACE", format!("away-e2e-sigkill-{role}"))
        .env("AWAY_STATE_DIR", &state)
        .env("AWAY_RUN_DIR", state.join("run"));
    c
}

fn ps(node: &NodeInfoLocal, role: &str) -> Vec<Value> {
    let out = on(node, role, &["ps", "--json"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["workloads"].as_array().cloned().unwrap_or_default()
}

fn find(node: &NodeInfoLocal, role: &str, name: &str) -> Option<Value> {
    ps(node, role).into_iter().find(|w| w["name"] == name)
}

fn agent(node: &NodeInfoLocal, log: &str) -> Child {
    let api = format!("{}:{AGENT_API}", node.ip);
    let transfer = format!("{}:{}", node.ip, AGENT_API + 1);
    let log = std::fs::File::create(base().join(log)).unwrap();
    let child = on(
        node,
        "target",
        &[
            "agent",
            "--name",
            "target",
            "--listen",
            &api,
            "--transfer-listen",
            &transfer,
            "--insecure-plaintext-channels",
        ],
    )
    .env("AWAY_LOG", "info")
    .stdout(Stdio::null())
    .stderr(log)
    .spawn()
    .unwrap();
    let up = wait_for(60, || std::net::TcpStream::connect(&api).ok());
    assert!(up.is_some(), "the target agent did not listen on {api}");
    child
}

fn memload(ip: &str) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&http_get_at(ip.parse().ok()?, PORT, "/")?).ok()?;
    Some((v["tick"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

struct Down(String);
impl Drop for Down {
    fn drop(&mut self) {
        away_cluster::down(&self.0);
    }
}

#[test]
fn a_sigkilled_agent_leaves_nothing_running_that_nobody_owns() {
    if !require_vm_host() {
        return;
    }
    // a cluster name whose subnet no interface of this host uses
    let name = away_e2e::free_cluster_name("sk");
    std::fs::create_dir_all(base()).unwrap();
    let plan = cluster_plan(&name, &[("src", Tier::Cloud), ("dst", Tier::Edge)], &[]);
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = Down(name);
    let (source, target) = (&info.nodes[0], &info.nodes[1]);
    struct Cleanup<'a>(&'a NodeInfoLocal, &'a NodeInfoLocal);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for w in ["sk-vm", "sk-mem"] {
                let _ = on(self.0, "source", &["rm", "--force", w]).output();
                let _ = on(self.1, "target", &["rm", "--force", w]).output();
            }
        }
    }
    let _cleanup = Cleanup(source, target);

    // the target node runs a VM
    let counter = lab_image("counter");
    let out = on(target, "target", &["run", counter.to_str().unwrap(), "--vm", "--name", "sk-vm", "--memory", "128Mi"])
        .output()
        .unwrap();
    assert!(out.status.success(), "run the vm: {}", String::from_utf8_lossy(&out.stderr));
    let vm_pid = find(target, "target", "sk-vm").and_then(|w| w["pid"].as_u64()).expect("the vm's pid") as u32;

    // memload on the source, the target's agent, and a lazy move
    let image = lab_image("memload");
    let out = on(
        source,
        "source",
        &[
            "run",
            image.to_str().unwrap(),
            "--name",
            "sk-mem",
            "--runtime",
            "containerd",
            "--memory",
            "512Mi",
            "-e",
            "MEMLOAD_SIZE=256Mi",
            "-e",
            "MEMLOAD_INTERVAL_MS=100",
            "-e",
            &format!("MEMLOAD_PORT={PORT}"),
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "run memload: {}", String::from_utf8_lossy(&out.stderr));
    let src_ip = source.ip.to_string();
    let before = wait_for(90, || memload(&src_ip).filter(|s| s.0 >= 5)).expect("memload beats on the source");
    let mut agent1 = agent(target, "agent1.log");
    let agent_pid = agent1.id();
    let to = format!("{}:{AGENT_API}", target.ip);
    let mut mover = on(source, "source", &["migrate", "sk-mem", "--to", &to, "--mode", "lazy", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // the lazy phase: the target's page daemon (criu lazy-pages under its shell) runs
    let target_dir = base().join("target").display().to_string();
    let daemon =
        || processes().filter(|p| p.runs() && p.cmdline_contains("lazy-pages") && p.cmdline_contains(&target_dir));
    let t = Instant::now();
    let mut daemons: Vec<u32> = Vec::new();
    while t.elapsed() < Duration::from_secs(120) && daemons.is_empty() {
        daemons = daemon().map(|p| p.pid).collect();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!daemons.is_empty(), "no lazy-pages daemon appeared on the target");
    std::thread::sleep(Duration::from_millis(200));
    // its whole family (shell, CRIU), recorded, and still working when the agent dies
    daemons = daemon().map(|p| p.pid).collect();
    let restored: Vec<u32> =
        find(target, "target", "sk-mem").and_then(|w| w["pid"].as_u64()).map(|p| vec![p as u32]).unwrap_or_default();
    assert!(!daemons.is_empty(), "the lazy phase ended before the kill: make memload bigger");
    signal(agent_pid, Signal::KILL).unwrap();
    let _ = agent1.wait();
    eprintln!("SIGKILLed agent {agent_pid}; page daemon family {daemons:?}, restored copy {restored:?}, vm {vm_pid}");

    // the move fails and the source runs on
    let moved = mover.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut mover.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!moved.success(), "the target's agent died: the move cannot succeed");
    let after =
        wait_for(30, || memload(&src_ip).filter(|s| s.0 > before.0 + 3)).expect("memload beats on at the source");
    assert_eq!(after.1, before.1, "the source restarted instead of resuming: {stderr}");

    // nothing of the move's page daemon runs on the target any more, without any agent
    // (its parent-death signal); the restored copy goes with it once the agent had
    // guarded it. A copy restored in the instant before the agent could guard it is in
    // the agent's journal since its restore began: the restarted agent removes it (below).
    let gone = wait_for(60, || daemons.iter().all(|p| !process_runs(*p)).then_some(()));
    let alive: Vec<u32> = daemons.iter().copied().filter(|p| process_runs(*p)).collect();
    assert!(gone.is_some(), "page daemon still running with no agent: {alive:?}");
    let copy_gone = wait_for(10, || restored.iter().all(|p| !process_runs(*p)).then_some(()));
    if copy_gone.is_none() {
        eprintln!("restored copy {restored:?} was not guarded yet when the agent died: the restarted agent removes it");
    }
    // the VM runs on and is still the node's
    assert!(process_runs(vm_pid), "the vm died with the agent");
    let vm = find(target, "target", "sk-vm").expect("the vm is listed");
    assert_eq!(vm["pid"].as_u64(), Some(vm_pid as u64), "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");

    // the agent back: it removes the copy its last run left; the VM stays, one QEMU
    let mut agent2 = agent(target, "agent2.log");
    let removed = wait_for(75, || {
        (find(target, "target", "sk-mem").is_none() && restored.iter().all(|p| !process_runs(*p))).then_some(())
    });
    assert!(removed.is_some(), "the copy the killed agent left is removed: {:?}", find(target, "target", "sk-mem"));
    let vm_dir = base().join("target/run/qemu/sk-vm").display().to_string();
    let qemus: Vec<u32> = processes().filter(|p| p.runs() && p.cmdline_contains(&vm_dir)).map(|p| p.pid).collect();
    assert_eq!(qemus, vec![vm_pid], "exactly the one QEMU of the VM");
    let leftovers: Vec<u32> = processes()
        .filter(|p| p.runs() && p.cmdline_contains(&target_dir) && p.cmdline_contains("criu"))
        .map(|p| p.pid)
        .collect();
    assert!(leftovers.is_empty(), "criu processes left: {leftovers:?}");
    assert_eq!(ps(source, "source").iter().filter(|w| w["name"] == "sk-mem" && w["state"] == "running").count(), 1);
    // the adopted VM obeys: it stops and goes
    let out = on(target, "target", &["rm", "--force", "sk-vm"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_for(20, || (!process_runs(vm_pid)).then_some(())).is_some(), "the vm's qemu is gone");
    eprintln!("after the restart: copy removed, vm {vm_pid} adopted and then removed, no criu left");
    let _ = signal(agent2.id(), Signal::TERM);
    let _ = agent2.wait();
}
