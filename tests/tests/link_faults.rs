//! The link to the target cut in the middle of a broker migration (docs/reliability.md,
//! "Fault matrix"): a real broker and two real agents ([`away_e2e::CounterCluster`], each
//! node in its own network namespace with its own containerd, joined to the host's bridge
//! by a veth pair), the counter moved staged, streamed (`stop-copy`) or lazy. The source
//! agent holds at one point of the move (`AWAY_FAULT_HOLD_BEFORE_FREEZE` /
//! `_AFTER_FREEZE`, a fault-injection build) while the test sets the target's veth down
//! (`away_cluster::set_link`: the target cut off from the source and the broker):
//!
//! * `before-freeze`: before the move's checks, the link down until the migration ended;
//!   the source cannot reach the target and the migration fails before anything stopped
//!   (no checkpoint taken), the counter on the source;
//! * `after-freeze`: the workload is stopped (a staged move's checkpoint on disk, a lazy
//!   or streamed move's dump serving pages), nothing sent yet, the link down until the
//!   migration ended; the payload cannot get through, the source gives up and resumes the
//!   counter (from its checkpoint; CRIU resumes a lazy or streamed one when told the
//!   stream failed): failed, on the source. It takes the source's timeouts (a streamed
//!   move: the page relay's 120 s wait for the target);
//! * `after-freeze-flap`: the same cut, the link back after 10 s; TCP carries the move
//!   through or the source gives up: either way the broker's record says where the one
//!   instance is.
//!
//! Each: exactly one instance, its count going on from the same start, none on the other
//! node once the link is back, the broker placing it where it runs, no active checkpoint.
//! CI runs one cell (streamed, `after-freeze-flap`); `AWAY_FAULT_MATRIX=full` runs each
//! cell three times (`AWAY_FAULT_CELL=MODE/AT` only that one).

use away_e2e::{broker_call, require_root, require_socket, wait_for, CounterCluster};

/// The cases set the agents' fault variables in this process's environment: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How long the source holds at the fault point (the test cuts the link meanwhile).
const HOLD_SECS: &str = "5";

fn case(mode: &str, at: &str, run: u32) {
    if std::env::var("AWAY_FAULT_CELL").is_ok_and(|c| c != format!("{mode}/{at}")) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:>5.1} s] {what}", t0.elapsed().as_secs_f64());
    let var = match at {
        "before-freeze" => "AWAY_FAULT_HOLD_BEFORE_FREEZE",
        _ => "AWAY_FAULT_HOLD_AFTER_FREEZE",
    };
    // inherited by the cluster's agents; only a source acts on it
    std::env::set_var(var, HOLD_SECS);
    let c = CounterCluster::up("lf");
    std::env::remove_var(var);
    let (src, dst) = (c.src.clone(), c.dst.clone());
    step("cluster up, the counter counts");
    let id = c.migrate(mode, serde_json::json!({}));
    let holding = format!("{var}={HOLD_SECS}: holding");
    wait_for(90, || c.agent_log(&src).contains(&holding).then_some(()))
        .unwrap_or_else(|| panic!("the source did not reach {var}:\n{}", c.agent_log(&src)));
    away_cluster::set_link(&c.name, &dst, false).expect("cut the target's link");
    step(&format!("{mode} move held {at}: the target's link is cut"));
    if at == "after-freeze-flap" {
        std::thread::sleep(std::time::Duration::from_secs(10));
        away_cluster::set_link(&c.name, &dst, true).expect("the target's link back");
        step("the target's link is back");
    }
    let ended = c.ended(&id, 300);
    step(&format!("the migration ended {}", ended["state"]));
    away_cluster::set_link(&c.name, &dst, true).expect("the target's link back");
    wait_for(60, || {
        let (_, n) = broker_call(&c.info, reqwest::Method::GET, &format!("/v1/nodes/{dst}"), None);
        (n["state"] == "online").then_some(())
    })
    .expect("the target is back online");
    step("the target is back");
    for n in [&src, &dst] {
        for line in c.agent_log(n).lines().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
            eprintln!("  {n}: {line}");
        }
    }
    let home = if at == "after-freeze-flap" && ended["state"] == "succeeded" { &dst } else { &src };
    if home == &src {
        assert_eq!(ended["state"], "failed", "{ended}");
    }
    let count = c.assert_one_instance_on(home);
    if at == "before-freeze" {
        // nothing stopped: no checkpoint was taken at all
        let failed = c.node(&src).state_dir.join("checkpoints/failed");
        let kept: Vec<_> =
            std::fs::read_dir(&failed).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(kept.is_empty(), "a checkpoint was taken before the freeze: {kept:?}");
    }
    eprintln!(
        "{mode} link cut {at} (run {run}): {} ({}), the counter on {home}, count {} -> {count} ({:.0} s)",
        ended["state"],
        ended["error"].as_str().unwrap_or_default(),
        c.before.0,
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_link_cut_before_or_after_the_freeze_leaves_one_instance() {
    if !(require_root() && require_socket("/run/containerd/containerd.sock", "containerd")) {
        return;
    }
    let full = std::env::var("AWAY_FAULT_MATRIX").as_deref() == Ok("full");
    let cells: Vec<(&str, &str)> = if full {
        let ats = ["before-freeze", "after-freeze-flap", "after-freeze"];
        ats.iter().flat_map(|at| ["staged", "stop-copy", "lazy"].map(|mode| (mode, *at))).collect()
    } else {
        vec![("stop-copy", "after-freeze-flap")]
    };
    for (mode, at) in &cells {
        for run in 0..if full { 3 } else { 1 } {
            case(mode, at, run);
        }
    }
}
