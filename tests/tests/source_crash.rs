//! The source agent SIGKILLed in the middle of a broker migration (docs/reliability.md,
//! "The source's journal"): a real broker and two real agents (away-cluster, each in its
//! own network namespace with its own containerd, [`away_e2e::CounterCluster`]). The
//! source agent kills itself with SIGKILL (`AWAY_FAULT_SOURCE_DIE`, a fault-injection
//! build) at one point of the move and is started again on the same state, as a
//! supervisor would.
//!
//! Staged (stop-and-copy through a checkpoint on disk):
//! * `before-commit`: the target has restored its copy and holds it as prepared; the
//!   restarted source finds the move `sent` in its journal, commits it, removes its
//!   stopped container and checkpoint: the migration succeeds;
//! * `after-checkpoint` (lab run): the workload is stopped and checkpointed, nothing has
//!   been sent; the target knows no such move; the restarted source resumes the counter
//!   from its checkpoint: the migration fails, the workload stays on the source.
//!
//! Streamed (`stop-copy`: the target pulls the memory from the source's CRIU page server
//! through the relay in the source agent) and lazy:
//! * `streaming` (streamed): killed while the pages move (slowed down,
//!   `AWAY_FAULT_LAZY=slow-after:0`); the kernel resets the relay's connection to CRIU,
//!   which resumes the counter on the source; the target's pull fails and it keeps
//!   nothing; the restarted source hears "aborted", finds its workload running and ends
//!   the move: the migration fails, the counter on the source;
//! * `after-verdict` (lazy, slowed down): killed right after the target's answer; the
//!   counter's few lazy pages are all in within the target's settle wait, so the kill
//!   lands in the last instant of the lazy phase or after it: either CRIU resumed the
//!   source and the target's copy went (failed, on the source), or the target had every
//!   page (succeeded, on the target; a source CRIU resumed in that instant is removed by
//!   the restarted source, the target's word deciding);
//! * `before-commit` (streamed; lazy in the lab run): every page moved, CRIU ended the
//!   source process, the target's copy is final; the restarted source hears "committed"
//!   and removes its stopped container and payload: the migration succeeds. Before the
//!   journal covered these moves, the restarted source took the broker's repeated order
//!   for a new move of a stopped workload and failed it.
//!
//! * `broker`: the broker is SIGKILLed while the source holds before its commit
//!   (`AWAY_FAULT_HOLD_BEFORE_COMMIT`) and started again on its database 3 s later; the
//!   agents work on offline, the source commits, and its queued `migration-finished`
//!   ends the migration `succeeded` when the broker is back.
//!
//! Each: exactly one instance, its count going on from the same start, no checkpoint of
//! the move left active on the source, no spool, and the broker's record of the workload
//! naming the node it runs on. CI runs staged and streamed `before-commit` once;
//! `AWAY_FAULT_MATRIX=full` runs every cell three times (`AWAY_FAULT_CELL=MODE/AT`, e.g.
//! `stop-copy/streaming`, only that one).

use away_e2e::{on_cluster_node, require_root, require_socket, CounterCluster};

/// The cases set the agents' fault variables in this process's environment: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether a kill at `at` of a `mode` move ends with the workload on the target (None:
/// either, the broker's record says which).
fn moves_on(mode: &str, at: &str) -> Option<bool> {
    match (mode, at) {
        (_, "after-checkpoint") | (_, "streaming") => Some(false),
        // the counter's few lazy pages are all in within the target's settle wait, so a
        // kill right after the verdict lands in or just after the lazy phase's end
        ("lazy", "after-verdict") => None,
        _ => Some(true),
    }
}

fn case(mode: &str, at: &str, run: u32) {
    if !away_e2e::fault_cell_selected(mode, at) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = away_e2e::Steps::default();
    let step = |what: &str| t0.step(what);
    // inherited by the cluster's agents (a fault-injection build of away); only a
    // source acts on them
    let mut vars = vec![];
    // where the source holds while the broker is killed: a staged move before its commit
    // (its target holds the copy), a streamed or lazy one after its freeze (the dump
    // serves pages), a VM's before its confirm (the target holds the complete guest)
    let hold = match mode {
        "staged" => "AWAY_FAULT_HOLD_BEFORE_COMMIT",
        "vm" => "AWAY_FAULT_HOLD_BEFORE_CONFIRM",
        _ => "AWAY_FAULT_HOLD_AFTER_FREEZE",
    };
    if at == "broker" {
        vars.push((hold, "10"));
    } else {
        vars.push(("AWAY_FAULT_SOURCE_DIE", at));
    }
    if matches!(at, "streaming" | "after-verdict") {
        // pages slowed down (50 ms a frame): a window to die in while they move
        vars.push(("AWAY_FAULT_LAZY", "slow-after:0"));
    }
    for (k, v) in &vars {
        std::env::set_var(k, v);
    }
    let c = if mode == "vm" { CounterCluster::up_vm("sc") } else { CounterCluster::up("sc") };
    let (src, dst) = (c.src.clone(), c.dst.clone());
    step("cluster up, the counter counts");
    let id = c.migrate(mode, serde_json::json!({}));
    step("migration asked");
    if at == "broker" {
        // once the source holds there
        let holding = format!("{hold}=10: holding");
        away_e2e::wait_for(120, || c.agent_log(&src).contains(&holding).then_some(()))
            .unwrap_or_else(|| panic!("the source did not hold at {hold}:\n{}", c.agent_log(&src)));
        let pidfile = std::path::Path::new("/run/away/cluster").join(&c.name).join("broker.pid");
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
        assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success());
        step("the broker was killed");
        for (k, _) in &vars {
            std::env::remove_var(k);
        }
        std::thread::sleep(std::time::Duration::from_secs(3));
        away_cluster::start_broker(&c.name).expect("restart the broker");
    } else {
        // the source agent kills itself at the fault point: its API goes silent
        let src_api = c.node(&src).api.clone();
        let api_down = || {
            let addr: std::net::SocketAddr = src_api.parse().unwrap();
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)).is_err()
        };
        away_e2e::wait_for(90, || api_down().then_some(())).expect("the source agent died at the fault point");
        let text = c.agent_log(&src);
        assert!(text.contains(&format!("AWAY_FAULT_SOURCE_DIE={at}")), "the fault did not fire at {at}:\n{text}");
        if mode == "staged" {
            // nothing runs the counter now (stopped on the source; on the target, at
            // most the prepared copy)
            assert_ne!(
                on_cluster_node(&c.info, &src, "counter").as_deref(),
                Some("running"),
                "the source still runs the counter"
            );
        }
        step("the source agent died");
        for (k, _) in &vars {
            std::env::remove_var(k);
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        away_cluster::restart_agent(&c.name, &src).expect("restart the source agent");
    }

    let ended = c.ended(&id, 150);
    step("the migration ended");
    // what the agents said of it (for a failure below)
    for n in [&src, &dst] {
        for line in c.agent_log(n).lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
            eprintln!("  {n}: {line}");
        }
    }
    let moved = moves_on(mode, at).unwrap_or(ended["state"] == "succeeded");
    let home = if moved {
        assert_eq!(ended["state"], "succeeded", "{ended}");
        dst.clone()
    } else {
        assert_eq!(ended["state"], "failed", "{ended}");
        src.clone()
    };
    let count = c.assert_one_instance_on(&home);
    step("one instance, counting on");
    eprintln!(
        "{mode} source killed at {at} (run {run}): {} on {home}, count {} -> {count} ({:.0} s)",
        ended["state"],
        c.before.0,
        t0.secs()
    );
}

fn ready() -> bool {
    require_root() && require_socket("/run/containerd/containerd.sock", "containerd")
}

fn full() -> bool {
    std::env::var("AWAY_FAULT_MATRIX").as_deref() == Ok("full")
}

#[test]
fn a_source_agent_killed_in_its_move_finishes_it_when_it_starts_again() {
    if !ready() {
        return;
    }
    let cells: &[(&str, u32)] =
        if full() { &[("before-commit", 3), ("after-checkpoint", 3)] } else { &[("before-commit", 1)] };
    for (at, runs) in cells {
        for run in 0..*runs {
            case("staged", at, run);
        }
    }
}

/// The broker SIGKILLed during a streamed, lazy and VM move (the staged one is in the
/// test above): the agents work on offline and its restart finds the migration ended by
/// their queued events. The lab run only (`AWAY_FAULT_MATRIX=full`).
#[test]
fn a_broker_killed_during_a_streamed_lazy_or_vm_move_finds_it_ended() {
    if !ready() || !full() {
        return;
    }
    for mode in ["stop-copy", "lazy", "vm"] {
        if mode == "vm" && !away_e2e::require_vm_host() {
            continue;
        }
        for run in 0..3 {
            case(mode, "broker", run);
        }
    }
}

/// A VM's source agent SIGKILLed before its confirm (the target holds the complete,
/// paused guest; the broker's order): the restarted agent finds the move in its journal
/// and confirms it within the target's lease: the migration succeeds, the VM counts on
/// on the target, the source's QEMU gone. The lab run only (a TCG VM in a cluster).
#[test]
fn a_vm_source_agent_killed_before_its_confirm_finishes_the_move() {
    if !ready() || !full() || !away_e2e::require_vm_host() {
        return;
    }
    for run in 0..3 {
        case("vm", "vm-before-confirm", run);
    }
}

/// Streamed and lazy moves: the page stream runs through the source agent's relay.
#[test]
fn a_source_agent_killed_in_a_streamed_or_lazy_move_leaves_one_instance() {
    if !ready() {
        return;
    }
    let cells: &[(&str, &str, u32)] = if full() {
        &[
            ("stop-copy", "streaming", 3),
            ("stop-copy", "before-commit", 3),
            ("lazy", "after-verdict", 3),
            ("lazy", "before-commit", 3),
        ]
    } else {
        &[("stop-copy", "before-commit", 1)]
    };
    for (mode, at, runs) in cells {
        for run in 0..*runs {
            case(mode, at, run);
        }
    }
}

/// The broker SIGKILLed during a move (docs/reliability.md, fault matrix).
#[test]
fn a_broker_killed_during_a_move_sees_it_end_when_it_is_back() {
    if !ready() {
        return;
    }
    let runs = if full() { 3 } else { 1 };
    for run in 0..runs {
        case("staged", "broker", run);
    }
}
