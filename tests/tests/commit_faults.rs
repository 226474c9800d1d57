//! The commit protocol under faults, end to end (docs/reliability.md, "Commit
//! protocol"): a source node and a target agent on this host (each with its own
//! containerd namespace and state directory), the real containerd and CRIU, the counter
//! moved by stop-and-copy (staged: the one-round-trip commit is what is under test).
//!
//! Each fault lands between the target's "restored, prepared" and the source's commit,
//! where a guess makes two instances or none:
//! * the commit's answer is lost after the target committed (`AWAY_FAULT_COMMIT=lose-answer`
//!   in the source): the source asks again and hears "committed";
//! * the target's agent dies (abort, like a SIGKILL: no cleanup) when the commit arrives,
//!   before it is on disk (`AWAY_FAULT_COMMIT_TARGET=die-before`), and is started again
//!   (a supervisor would): it removes the copy, says "aborted", the source resumes;
//! * the same, after the commit is on disk (`die-after`): the agent, back, says
//!   "committed" and keeps the copy; the source removes its own.
//!
//! Each ends with exactly one running instance whose count went on, no transfer spool
//! on the target, and the source's checkpoint removed (or kept as failed when the source
//! resumed). `AWAY_FAULT_MATRIX=full` runs each case three times and adds Docker (the lab
//! run); CI runs each once on containerd.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use away_e2e::counter_state as state;
use away_e2e::{free_port, require_root, require_socket, wait_for, Counter, Node, Tmpfs};
use serde_json::Value;

fn ready() -> bool {
    require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && (!full_matrix() || require_socket("/run/docker.sock", "dockerd"))
}

fn full_matrix() -> bool {
    std::env::var("AWAY_FAULT_MATRIX").as_deref() == Ok("full")
}

/// (runtime, runs) of each case: containerd once in CI, both runtimes three times in the
/// lab run.
fn matrix() -> Vec<(&'static str, u32)> {
    if full_matrix() {
        vec![("containerd", 3), ("docker", 3)]
    } else {
        vec![("containerd", 1)]
    }
}

/// Run `case` for each runtime and run of the matrix (when the host is ready).
fn each_cell(case: impl Fn(&str, u32)) {
    if !ready() {
        return;
    }
    for (runtime, runs) in matrix() {
        for run in 0..runs {
            case(runtime, run);
        }
    }
}

/// Lease the target gives (short: the test waits it out in one case).
const LEASE_SECS: &str = "5";

/// The target's agent on fixed ports (so that it can be started again after it died),
/// killed by its PID when dropped.
struct TargetAgent {
    node: Node,
    name: String,
    api: String,
    transfer: String,
    log: PathBuf,
    child: std::sync::Mutex<Child>,
}

impl TargetAgent {
    fn start(test: &str, env: &[(&str, &str)]) -> TargetAgent {
        let node = node("target", test);
        let (api, transfer) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let log = PathBuf::from(format!("/tmp/away-e2e-commit/agent-{test}-{}.log", std::process::id()));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let name = format!("target-{test}");
        let child = spawn_agent(&node, &name, &api, &transfer, env, &log, false);
        TargetAgent { node, name, api, transfer, log, child: std::sync::Mutex::new(child) }
    }

    /// Start it again, as a supervisor would after it died, without faults.
    fn restart(&self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        *child = spawn_agent(&self.node, &self.name, &self.api, &self.transfer, &[], &self.log, true);
    }

    /// Has the agent's process ended (the injected fault killed it)?
    fn died(&self) -> bool {
        matches!(self.child.lock().unwrap().try_wait(), Ok(Some(_)))
    }
}

fn spawn_agent(
    node: &Node,
    name: &str,
    api: &str,
    transfer: &str,
    env: &[(&str, &str)],
    log: &std::path::Path,
    append: bool,
) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(append).write(true).truncate(!append).open(log).unwrap();
    let mut cmd = node.cmd(&[
        "agent",
        "--name",
        name,
        "--listen",
        api,
        "--transfer-listen",
        transfer,
        "--insecure-plaintext-channels",
    ]);
    cmd.args(["--commit-lease", LEASE_SECS]).envs(env.iter().copied()).env("AWAY_LOG", "info").env("NO_COLOR", "1");
    let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("start away agent");
    if wait_for(30, || std::net::TcpStream::connect(api).ok()).is_none() {
        let _ = child.kill();
        panic!("the target agent did not listen on {api}");
    }
    child
}

impl Drop for TargetAgent {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

type Workload<'a> = Counter<'a>;

fn start_counter<'a>(source: &'a Node, target: &'a Node, test: &str, runtime: &str) -> Workload<'a> {
    source.start_counter(target, format!("cf-{test}-{}", std::process::id()), runtime)
}

/// `away migrate --mode staged` from the source, started (not waited for), with `env`.
fn migrate(w: &Workload, agent: &TargetAgent, env: &[(&str, &str)]) -> Child {
    migrate_in(w, agent, env, "staged")
}

/// [`migrate`] in `mode`.
fn migrate_in(w: &Workload, agent: &TargetAgent, env: &[(&str, &str)], mode: &str) -> Child {
    w.source
        .cmd(&[
            "migrate",
            &w.name,
            "--to",
            &agent.api,
            "--json",
            "--source-name",
            "source",
            "--mode",
            mode,
            "--commit-wait",
            "120",
        ])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run away migrate")
}

fn finish(child: Child) -> (bool, Value, String) {
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("away migrate: {}\n{err}", out.status);
    (out.status.success(), serde_json::from_slice(&out.stdout).unwrap_or(Value::Null), err)
}

/// Running instances of the workload on `node` (`away ps`).
fn running(node: &Node, name: &str) -> usize {
    node.ps().iter().filter(|w| w["name"] == name && w["state"] == "running").count()
}

/// Exactly one running instance, on `on`, none on `other`; its count went on from `before`.
fn assert_one_instance(on: &Node, other: &Node, w: &Workload, before: (u64, u64), runtime: &str) {
    assert_eq!(running(on, &w.name), 1, "{} is not running where it should be", w.name);
    if runtime == "docker" {
        // one engine for both nodes: `away ps` of either sees every container
        let out = Command::new(away_e2e::docker_cli())
            .args(["ps", "-q", "--filter", &format!("label=away.workload={}", w.name)])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1, "{} runs twice", w.name);
    } else {
        assert_eq!(running(other, &w.name), 0, "{} runs on both nodes", w.name);
    }
    let after = wait_for(20, || state(w.port)).expect("the counter answers");
    assert_eq!(after.1, before.1, "the counter restarted (start time changed) instead of being restored");
    assert!(after.0 >= before.0, "count went back: {} -> {}", before.0, after.0);
    eprintln!("count {} -> {}", before.0, after.0);
}

/// No transfer data left in the target's spool.
fn assert_no_spool(target: &Node) {
    let spool = target.state.join("transfers");
    let left: Vec<_> = std::fs::read_dir(&spool).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "the target kept transfer data: {left:?}");
}

/// The source's checkpoints: none (moved), or one kept as failed (resumed).
fn source_archives(source: &Node) -> Vec<Value> {
    let (_, out, _) = source.away(&["archives", "list", "--json"]);
    serde_json::from_str(&out).unwrap_or_default()
}

/// The move's record on the target (`GET /v1/transfers/{id}`), the id read from the
/// target's log (the report does not carry it).
fn move_record(agent: &TargetAgent) -> Option<Value> {
    let raw = std::fs::read_to_string(&agent.log).ok()?;
    // without the terminal colours tracing may put around field names
    let mut log = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            log.push(c);
        }
    }
    let id = log
        .lines()
        .filter_map(|l| l.split("transfer=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(|id| id.trim_matches('"'))
        // a transfer id, not the agent's transfer address
        .rfind(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))?
        .to_string();
    let body = away_e2e::agent_get(&format!("http://{}/v1/transfers/{id}", agent.api))?.text().ok()?;
    serde_json::from_str(&body).ok()
}

fn case_lost_answer(runtime: &str, run: u32) {
    let test = format!("lost-{runtime}-{run}");
    let agent = TargetAgent::start(&test, &[]);
    let source = node("source", &test);
    let w = start_counter(&source, &agent.node, &test, runtime);
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 5)).expect("counter counts");
    let (ok, report, err) = finish(migrate(&w, &agent, &[("AWAY_FAULT_COMMIT", "lose-answer")]));
    assert!(ok, "a lost commit answer must not undo a committed move: {err}");
    assert!(err.contains("answer was lost"), "the fault did not fire: {err}");
    assert_eq!(report["ok"], true);
    assert_one_instance(&agent.node, &source, &w, before, runtime);
    assert_no_spool(&agent.node);
    assert!(source_archives(&source).is_empty(), "the source kept its checkpoint after the commit");
    let record = move_record(&agent).expect("the target answers what became of the move");
    assert_eq!(record["state"], "committed", "{record}");
}

/// The target cannot be reached from the commit on (`AWAY_FAULT_COMMIT=partition` in the
/// source: nothing is sent, as when its agent is gone): no commit was delivered, so the
/// source waits out the target's lease and resumes; the target, its lease run out, has
/// removed its copy by then and says "aborted".
fn case_partition(runtime: &str, run: u32) {
    let test = format!("cut-{runtime}-{run}");
    let agent = TargetAgent::start(&test, &[]);
    let source = node("source", &test);
    let w = start_counter(&source, &agent.node, &test, runtime);
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 5)).expect("counter counts");
    let t = std::time::Instant::now();
    let (ok, _, err) = finish(migrate(&w, &agent, &[("AWAY_FAULT_COMMIT", "partition")]));
    assert!(!ok, "no commit got through: the move cannot succeed");
    // checked the moment the source has resumed: the target's copy is gone already
    assert_one_instance(&source, &agent.node, &w, before, runtime);
    // the lease (LEASE_SECS) and the agent's removal grace (5 s) went by first
    let lease: u64 = LEASE_SECS.parse().unwrap();
    assert!(t.elapsed() >= Duration::from_secs(lease + 5), "resumed after {:?}, inside the lease", t.elapsed());
    assert!(err.contains("lease") && err.contains("resumed"), "the source did not resume after the lease: {err}");
    assert_no_spool(&agent.node);
    let record = move_record(&agent).expect("the target answers what became of the move");
    assert_eq!(record["state"], "aborted", "{record}");
    let _ = source.away(&["archives", "prune", "--keep", "0B"]);
}

/// The target's agent dies at the commit (`when`: before or after it is on disk) and is
/// started again `restart_after` later.
fn case_target_dies(runtime: &str, run: u32, when: &str) {
    let test = format!("{when}-{runtime}-{run}");
    let agent = TargetAgent::start(&test, &[("AWAY_FAULT_COMMIT_TARGET", when)]);
    let source = node("source", &test);
    let w = start_counter(&source, &agent.node, &test, runtime);
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 5)).expect("counter counts");
    let child = migrate(&w, &agent, &[]);
    assert!(wait_for(120, || agent.died().then_some(())).is_some(), "the target's agent did not die at the commit");
    // the source asks a dead agent for a while: it must neither resume nor clean up
    std::thread::sleep(Duration::from_secs(3));
    let moved = when == "die-after";
    agent.restart();
    let (ok, _, err) = finish(child);
    if moved {
        assert!(ok, "the commit was on disk: the move succeeded: {err}");
        assert_one_instance(&agent.node, &source, &w, before, runtime);
        assert!(source_archives(&source).is_empty(), "the source kept its checkpoint after the commit");
    } else {
        assert!(!ok, "the commit never got to disk: the move cannot succeed");
        // the agent, back, removed its copy before it said "aborted"
        assert_one_instance(&source, &agent.node, &w, before, runtime);
        assert!(err.contains("aborted") && err.contains("resumed"), "the source did not resume on the abort: {err}");
        let kept = source_archives(&source);
        assert!(kept.len() == 1 && kept[0]["state"] == "failed", "{kept:?}");
        let _ = source.away(&["archives", "prune", "--keep", "0B"]);
    }
    assert_no_spool(&agent.node);
    let record = move_record(&agent).expect("the target answers what became of the move");
    assert_eq!(record["state"], if moved { "committed" } else { "aborted" }, "{record}");
}

#[test]
fn a_lost_commit_answer_is_asked_again() {
    each_cell(case_lost_answer);
}

#[test]
fn an_unreachable_target_is_waited_out_for_its_lease() {
    each_cell(case_partition);
}

#[test]
fn a_target_dying_before_the_commit_is_on_disk_resumes_the_source() {
    each_cell(|runtime, run| case_target_dies(runtime, run, "die-before"));
}

#[test]
fn a_target_dying_after_the_commit_is_on_disk_keeps_the_move() {
    each_cell(|runtime, run| case_target_dies(runtime, run, "die-after"));
}

/// Node `role` of test `test`.
fn node(role: &str, test: &str) -> Node {
    let id = format!("{role}-{test}-{}", std::process::id());
    Node::at(format!("away-cf-{id}"), PathBuf::from(format!("/tmp/away-e2e-commit/{id}")))
}

/// A VM move (the counter as a TCG VM of 128 MiB, `away migrate --to` the target agent)
/// under `fault`, pre-copy or post-copy (docs/reliability.md, "VM moves"):
/// * `lose-answer` (source): the confirm is carried out and its answer dropped; asked
///   again, the target says committed: the VM runs on the target only;
/// * `partition` (source: nothing reaches the target from the confirm on): pre-copy, the
///   held destination never ran, its lease removes it, the source waits the lease out
///   and resumes; post-copy cannot go back: the target committed at the switchover, the
///   source stays paused and says so;
/// * `die-before`, `die-after` (target agent: dies when the confirm arrives, before or
///   after it is on disk; started again 3 s later): pre-copy, before: the restarted
///   agent removes the destination, which never ran, and the source resumes; after: the
///   move stays and the source removes its VM; post-copy: committed at the switchover
///   already, so both keep the move.
///
/// Each ends with exactly one running VM whose count went on from the same start time
/// (none on the other node), and the target's answer about move `vm-NAME`.
fn case_vm(fault: &str, postcopy: bool, run: u32) {
    let test = format!("vm-{fault}-{}-{run}", if postcopy { "post" } else { "pre" });
    let target_env: &[(&str, &str)] =
        if fault.starts_with("die-") { &[("AWAY_FAULT_COMMIT_TARGET", fault)] } else { &[] };
    let agent = TargetAgent::start(&test, target_env);
    let source = node("source", &test);
    let w = source.start_counter(&agent.node, format!("cf-{test}-{}", std::process::id()), "qemu");
    let before = wait_for(120, || state(w.port).filter(|s| s.0 >= 5)).expect("the counter VM answers");
    let ports = format!("{}:{}", w.port, w.target_port);
    let mut args = vec!["migrate", &w.name, "--to", &agent.api, "--target-port", &ports, "--json"];
    if postcopy {
        args.push("--postcopy");
    }
    let source_env: &[(&str, &str)] = if fault.starts_with("die-") { &[] } else { &[("AWAY_FAULT_COMMIT", fault)] };
    let t = std::time::Instant::now();
    let child = w
        .source
        .cmd(&args)
        .envs(source_env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if fault.starts_with("die-") {
        assert!(
            wait_for(120, || agent.died().then_some(())).is_some(),
            "the target's agent did not die at the confirm"
        );
        std::thread::sleep(Duration::from_secs(3));
        if !postcopy && fault == "die-before" {
            // held: the destination never ran, and the paused source waits for an answer
            assert!(state(w.target_port).is_none(), "the held destination runs before its commit");
            assert!(state(w.port).is_none(), "the source runs before an answer");
        }
        agent.restart();
    }
    let (ok, report, err) = finish(child);
    // post-copy cannot go back: the target committed at the switchover
    let moved = postcopy || matches!(fault, "lose-answer" | "die-after");
    let (on, other, port) = if moved { (&agent.node, &source, w.target_port) } else { (&source, &agent.node, w.port) };
    if postcopy && fault == "partition" {
        // no answer, and nothing to go back to: neither resumed nor removed
        assert!(!ok, "the source heard nothing: it cannot report a move: {err}");
        assert!(err.contains("post-copy") || err.contains("doubt"), "{err}");
        let _ = source.away(&["rm", "--force", &w.name]);
    } else if moved {
        assert!(ok, "the move was committed: {err}");
        assert_eq!(report["mode"], "vm-live", "{report}");
    } else {
        assert!(!ok, "the move was aborted: it cannot succeed");
        assert!(err.contains("resumed") || err.contains("source running"), "the source did not resume: {err}");
    }
    if fault == "lose-answer" {
        assert!(err.contains("answer is dropped"), "the fault did not fire: {err}");
    }
    if fault == "partition" && !postcopy {
        let lease: u64 = LEASE_SECS.parse().unwrap();
        assert!(t.elapsed() >= Duration::from_secs(lease + 5), "resumed after {:?}, inside the lease", t.elapsed());
    }
    let after = wait_for(30, || state(port)).expect("the counter VM answers where it should run");
    assert_eq!(after.1, before.1, "the guest restarted instead of moving");
    assert!(after.0 >= before.0, "count went back: {} -> {}", before.0, after.0);
    eprintln!("count {} -> {} on {}", before.0, after.0, if moved { "the target" } else { "the source" });
    assert_eq!(running(on, &w.name), 1, "the VM does not run where it should");
    assert_eq!(running(other, &w.name), 0, "the VM runs on both nodes");
    assert!(!other.run.join("qemu").join(&w.name).exists(), "a VM directory was left on the other node");
    let record: Value =
        away_e2e::agent_get(&format!("http://{}/v1/transfers/vm-{}", agent.api, w.name)).unwrap().json().unwrap();
    assert_eq!(record["state"], if moved { "committed" } else { "aborted" }, "{record}");
}

/// (fault, post-copy) cells of the VM moves: all in the lab run (three times each), the
/// lost answer and the target dying before the commit (pre-copy) in CI.
fn vm_cells(faults: &[(&'static str, bool)]) {
    if !away_e2e::require_vm_host() {
        return;
    }
    for &(fault, postcopy) in faults {
        for run in 0..if full_matrix() { 3 } else { 1 } {
            case_vm(fault, postcopy, run);
        }
    }
}

#[test]
fn a_lost_vm_confirm_answer_is_asked_again() {
    vm_cells(&[("lose-answer", false)]);
}

#[test]
fn a_vm_target_dying_before_the_commit_resumes_the_held_source() {
    vm_cells(&[("die-before", false)]);
}

/// The rest of the VM cells: the lab run only (`AWAY_FAULT_MATRIX=full`).
#[test]
fn vm_fault_matrix() {
    if !full_matrix() {
        return;
    }
    vm_cells(&[
        ("partition", false),
        ("die-after", false),
        ("lose-answer", true),
        ("partition", true),
        ("die-before", true),
        ("die-after", true),
    ]);
}

/// The target's "restored" answer is lost (`AWAY_FAULT_VERDICT=lose` in the source): the
/// source asks what became of the move, has the target remove its copy, and only then
/// resumes; one instance at once, and the target says "aborted".
fn case_lost_verdict(runtime: &str, run: u32) {
    let test = format!("verdict-{runtime}-{run}");
    let agent = TargetAgent::start(&test, &[]);
    let source = node("source", &test);
    let w = start_counter(&source, &agent.node, &test, runtime);
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 5)).expect("counter counts");
    let (ok, _, err) = finish(migrate(&w, &agent, &[("AWAY_FAULT_VERDICT", "lose")]));
    assert!(!ok, "the source never heard the target: the move cannot succeed");
    // checked the moment the source has resumed: the target's copy went first
    assert_one_instance(&source, &agent.node, &w, before, runtime);
    assert!(err.contains("answer was lost") && err.contains("resumed"), "{err}");
    assert_no_spool(&agent.node);
    let record = move_record(&agent).expect("the target answers what became of the move");
    assert_eq!(record["state"], "aborted", "{record}");
    let _ = source.away(&["archives", "prune", "--keep", "0B"]);
}

#[test]
fn a_lost_restore_answer_takes_the_targets_copy_back_first() {
    each_cell(case_lost_verdict);
}

/// Disk full on the target: its state directory (spool, store, journal) is a small tmpfs
/// holding the workload's image and filled up but for 64 KiB, less than the checkpoint.
/// The move fails cleanly: the source resumes (the same process, its count going on),
/// nothing of the move is left on the target (no copy, no spool), and the target agent
/// still answers.
fn case_disk_full(runtime: &str, run: u32, mode: &str) {
    let test = format!("full-{mode}-{runtime}-{run}");
    let target = node("target", &test);
    let disk = Tmpfs::mount(&target.state, "96M");
    let agent = TargetAgent::start(&test, &[]);
    assert_eq!(agent.node.state, target.state);
    let source = node("source", &test);
    let w = start_counter(&source, &agent.node, &test, runtime);
    // the image first (it goes before anything stops anyway), then the disk fills up
    let tar = std::fs::read(away_e2e::lab_image("counter")).unwrap();
    away_identity::install_default_provider();
    let up = reqwest::blocking::Client::new()
        .post(format!("http://{}/v1/images", agent.api))
        .bearer_auth(away_e2e::agent_token())
        .body(tar)
        .send()
        .unwrap();
    assert!(up.status().is_success(), "image upload: {}", up.status());
    disk.fill("filler", 64 << 10);
    eprintln!("target disk: {} bytes free", disk.free());
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 5)).expect("counter counts");
    let (ok, _, err) = finish(migrate_in(&w, &agent, &[], mode));
    assert!(!ok, "a move onto a full disk cannot succeed");
    assert!(err.contains("resumed"), "the source did not resume: {err}");
    assert_one_instance(&source, &agent.node, &w, before, runtime);
    assert_no_spool(&agent.node);
    assert!(agent_get_ok(&agent), "the target agent stopped answering");
    let _ = source.away(&["archives", "prune", "--keep", "0B"]);
    drop(w);
    drop(agent);
    drop(disk);
}

fn agent_get_ok(agent: &TargetAgent) -> bool {
    away_e2e::agent_get(&format!("http://{}/v1/node", agent.api)).is_some_and(|r| r.status().is_success())
}

#[test]
fn a_full_disk_on_the_target_fails_the_move_cleanly() {
    each_cell(|runtime, run| case_disk_full(runtime, run, "staged"));
}

/// The same for a streamed move (containerd: Docker moves are staged), the lab run only:
/// the receiver refuses the move's images, CRIU resumes the frozen source. (A lazy move
/// between two nodes on one host's network is refused before anything: the frozen
/// source holds its ports in the namespace the copy would share.)
#[test]
fn a_full_disk_on_the_target_fails_a_streamed_move_cleanly() {
    if !ready() || !full_matrix() {
        return;
    }
    for run in 0..3 {
        case_disk_full("containerd", run, "stop-copy");
    }
}

/// The source's `away migrate` of a VM SIGKILLed in the middle of its move
/// (`AWAY_FAULT_SOURCE_DIE`, docs/reliability.md, "The source's journal"). QEMU's
/// migration is QEMU to QEMU: it goes on without the process that started it.
/// * `vm-migrating` (killed while RAM is copied), `away migrate --recover` at once: it
///   waits for QEMU's migration to complete, finds the destination held, and commits:
///   the VM runs on the target, the source's QEMU is gone;
/// * `vm-before-confirm` (the destination complete and held), the source node's agent
///   started once the target's lease ran out (an agent finishes the node's open moves
///   when it starts): the target removed its destination (aborted), so the source's
///   paused VM runs again.
///
/// With `--postcopy` the destination is not held: it runs from the migration's end (the
/// source, killed, never asked for the switch, so pre-copy completed) and the target
/// commits at once; the recovery finds it committed and removes the source's QEMU,
/// whichever point the source died at.
///
/// Before the journal the VM ran nowhere after a pre-copy one (the source paused after
/// its migration completed, the destination removed by its lease), and nothing resumed
/// it.
fn case_vm_source_dies(at: &str, postcopy: bool, run: u32) {
    use std::os::unix::process::ExitStatusExt;
    // short: QMP's socket path under the test's run dir must stay under 108 bytes
    let point = if at == "vm-migrating" { "mig" } else { "conf" };
    let test = format!("vs-{point}-{}-{run}", if postcopy { "post" } else { "pre" });
    let agent = TargetAgent::start(&test, &[]);
    let source = node("source", &test);
    let w = source.start_counter(&agent.node, format!("cf-{test}-{}", std::process::id()), "qemu");
    let before = wait_for(120, || state(w.port).filter(|s| s.0 >= 5)).expect("the counter VM answers");
    let ports = format!("{}:{}", w.port, w.target_port);
    let mut args = vec!["migrate", &w.name, "--to", &agent.api, "--target-port", &ports, "--json"];
    if postcopy {
        args.push("--postcopy");
    }
    let out = w.source.cmd(&args).env("AWAY_FAULT_SOURCE_DIE", at).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(9), "the source's away migrate was not killed at {at}: {err}");
    let id = format!("vm-{}", w.name);
    let record = || -> Value {
        away_e2e::agent_get(&format!("http://{}/v1/transfers/{id}", agent.api))
            .and_then(|r| r.json().ok())
            .unwrap_or(Value::Null)
    };
    let moved = at == "vm-migrating" || postcopy;
    if !moved {
        // the held destination never ran; its lease removes it
        assert!(state(w.target_port).is_none(), "the held destination runs before its commit");
        let aborted = wait_for(60, || (record()["state"] == "aborted").then_some(()));
        assert!(aborted.is_some(), "the target's lease did not remove the destination: {}", record());
        assert!(state(w.port).is_none(), "the source runs before anyone resumed it");
    }
    let mut source_agent = None;
    if at == "vm-migrating" {
        let (ok, stdout, stderr) = source.away(&["migrate", "--recover", "--json"]);
        assert!(ok, "away migrate --recover failed:\n{stdout}\n{stderr}");
        let ended: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        eprintln!("recover: {ended}");
        assert_eq!(ended[0]["transfer_id"], id.as_str(), "{ended}");
        assert_eq!(ended[0]["outcome"], "migration-finished", "{ended}");
    } else {
        let (api, transfer) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let log = agent.log.with_file_name(format!("source-agent-{test}-{}.log", std::process::id()));
        source_agent = Some(KillOnDrop(spawn_agent(&source, "source", &api, &transfer, &[], &log, false)));
    }
    let (on, other, port) = if moved { (&agent.node, &source, w.target_port) } else { (&source, &agent.node, w.port) };
    let after = wait_for(60, || state(port)).expect("the counter VM answers where it should run");
    assert_eq!(after.1, before.1, "the guest restarted instead of moving");
    assert!(after.0 >= before.0, "count went back: {} -> {}", before.0, after.0);
    eprintln!("count {} -> {} on {}", before.0, after.0, if moved { "the target" } else { "the source" });
    assert_eq!(running(on, &w.name), 1, "the VM does not run where it should");
    assert_eq!(running(other, &w.name), 0, "the VM runs on both nodes");
    assert!(!other.run.join("qemu").join(&w.name).exists(), "a VM directory was left on the other node");
    assert_eq!(record()["state"], if moved { "committed" } else { "aborted" }, "{}", record());
    // the journal has nothing open any more
    let open = wait_for(10, || {
        let (ok, stdout, _) = source.away(&["migrate", "--recover", "--json"]);
        (ok && stdout.trim() == "[]").then_some(())
    });
    assert!(open.is_some(), "a move stayed open in the source's journal");
    drop(source_agent);
}

/// A child process killed (by its PID) when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VM's source killed mid-move: killed in its migration in CI, both points in the lab run.
#[test]
fn a_vm_source_killed_mid_move_is_finished_from_its_journal() {
    if !away_e2e::require_vm_host() {
        return;
    }
    let cells: &[(&str, bool)] = if full_matrix() {
        &[("vm-migrating", false), ("vm-before-confirm", false), ("vm-migrating", true), ("vm-before-confirm", true)]
    } else {
        &[("vm-migrating", false)]
    };
    for &(at, postcopy) in cells {
        for run in 0..if full_matrix() { 3 } else { 1 } {
            case_vm_source_dies(at, postcopy, run);
        }
    }
}

/// `away migrate` of a container, run by hand, SIGKILLed in its move
/// (`AWAY_FAULT_SOURCE_DIE`): its steps are in the node's journal, and `away migrate
/// --recover` finishes the move:
/// * `before-commit` (the target holds its copy as prepared, no commit sent): the
///   recovery commits within the lease; the copy on the target runs, the source's
///   stopped container and checkpoint are gone;
/// * `after-checkpoint` (stopped and checkpointed, nothing sent): the target knows no
///   such move; the recovery resumes the counter from its checkpoint (kept as failed).
///
/// Before the journal both left the counter stopped with its checkpoint for nobody.
fn case_cli_source_dies(runtime: &str, run: u32, at: &str) {
    use std::os::unix::process::ExitStatusExt;
    let test = format!("cli-{at}-{runtime}-{run}");
    let agent = TargetAgent::start(&test, &[]);
    let source = node("source", &test);
    let w = start_counter(&source, &agent.node, &test, runtime);
    let before = wait_for(20, || state(w.port).filter(|s| s.0 >= 5)).expect("counter counts");
    let out = migrate(&w, &agent, &[("AWAY_FAULT_SOURCE_DIE", at)]).wait_with_output().unwrap();
    assert_eq!(
        out.status.signal(),
        Some(9),
        "away migrate was not killed at {at}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if at == "after-checkpoint" {
        // (before the commit the target's prepared copy answers on the same port: one host)
        assert!(state(w.port).is_none(), "the source runs on after its checkpoint");
    }
    let (ok, stdout, stderr) = source.away(&["migrate", "--recover", "--json"]);
    assert!(ok, "away migrate --recover failed:\n{stdout}\n{stderr}");
    let ended: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    eprintln!("recover: {ended}");
    let moved = at == "before-commit";
    assert_eq!(ended[0]["outcome"], if moved { "migration-finished" } else { "migration-failed" }, "{ended}");
    if moved {
        assert_one_instance(&agent.node, &source, &w, before, runtime);
        assert!(source_archives(&source).is_empty(), "the source kept its checkpoint after the commit");
        let record = move_record(&agent).expect("the target answers what became of the move");
        assert_eq!(record["state"], "committed", "{record}");
    } else {
        assert_one_instance(&source, &agent.node, &w, before, runtime);
        let kept = source_archives(&source);
        assert!(kept.len() == 1 && kept[0]["state"] == "failed", "{kept:?}");
        let _ = source.away(&["archives", "prune", "--keep", "0B"]);
    }
    assert_no_spool(&agent.node);
    let (ok, stdout, _) = source.away(&["migrate", "--recover", "--json"]);
    assert!(ok && stdout.trim() == "[]", "a move stayed open: {stdout}");
}

#[test]
fn a_killed_away_migrate_is_finished_by_recover() {
    each_cell(|runtime, run| {
        case_cli_source_dies(runtime, run, "before-commit");
        if full_matrix() {
            case_cli_source_dies(runtime, run, "after-checkpoint");
        }
    });
}
