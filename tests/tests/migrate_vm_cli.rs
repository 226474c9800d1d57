//! `away migrate` of a VM through a target agent: QEMU live migration between two
//! nodes (here: two state directories on one host, so the target forwards another
//! host port), the count goes on, the source VM is gone afterwards.

use std::process::{Command, Stdio};

use away_e2e::{away_bin, free_port, http_get, lab_image, require, require_root, wait_for};
use serde_json::Value;

fn env(cmd: &mut Command, role: &str) -> String {
    let base = format!("/tmp/away-e2e-vmcli/{role}-{}", std::process::id());
    cmd.env("AWAY_AGENT_TOKEN", away_e2e::agent_token())
        .env("AWAY_STATE_DIR", format!("{base}/state"))
        .env("AWAY_RUN_DIR", format!("{base}/run"))
        .env("AWAY_NAMESPACE", format!("away-vmcli-{role}"));
    base
}

fn state(port: u16) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&http_get(port, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

struct Cleanup(Vec<Box<dyn FnMut()>>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in &mut self.0 {
            f();
        }
    }
}

#[test]
fn vm_moves_to_another_agent_and_keeps_counting() {
    if !require_root()
        || !require(std::path::Path::new("/opt/away-guest/vmlinuz").exists(), "guest kernel (deploy/install.sh)")
    {
        return;
    }
    let tar = lab_image("counter");
    let name = format!("vmcli-{}", std::process::id());
    let (api, transfer) = (free_port(), free_port());
    let mut agent_cmd = Command::new(away_bin());
    env(&mut agent_cmd, "target");
    agent_cmd.args([
        "agent",
        "--name",
        "vm-target",
        "--listen",
        &format!("127.0.0.1:{api}"),
        "--transfer-listen",
        &format!("127.0.0.1:{transfer}"),
        "--insecure-plaintext-channels",
    ]);
    let mut agent = agent_cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let mut cleanup = Cleanup(vec![]);
    let name2 = name.clone();
    cleanup.0.push(Box::new(move || {
        for role in ["source", "target"] {
            let mut c = Command::new(away_bin());
            env(&mut c, role);
            let _ = c.args(["rm", "--force", &name2]).output();
        }
    }));
    cleanup.0.push(Box::new(move || {
        let _ = agent.kill();
        let _ = agent.wait();
    }));
    assert!(wait_for(30, || std::net::TcpStream::connect(("127.0.0.1", api)).ok()).is_some(), "agent not listening");

    let (port, target_port) = (free_port(), free_port());
    let mut run = Command::new(away_bin());
    env(&mut run, "source");
    let out = run
        .args([
            "run",
            tar.to_str().unwrap(),
            "--vm",
            "--name",
            &name,
            "--memory",
            "128Mi",
            "-e",
            &format!("COUNTER_PORT={port}"),
            "-p",
            // (the app listens on the port it was told: PORT alone would go to the image's 8080)
            &format!("{port}:{port}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "run --vm: {}", String::from_utf8_lossy(&out.stderr));
    let before = wait_for(120, || state(port).filter(|s| s.0 >= 5)).expect("the counter VM answers");

    // --plan: measured and predicted, nothing moves
    let mut plan = Command::new(away_bin());
    env(&mut plan, "source");
    let out = plan.args(["migrate", &name, "--to", &format!("127.0.0.1:{api}"), "--plan", "--json"]).output().unwrap();
    assert!(out.status.success(), "migrate --plan: {}", String::from_utf8_lossy(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("plan: {plan}");
    assert_eq!(plan["chosen"], "vm-precopy", "{plan}");
    assert_eq!(plan["inputs"]["state_bytes"], 128u64 << 20, "{plan}");
    assert!(plan["inputs"]["sources"]["dirty_bytes_per_s"].as_str().unwrap().contains("calc-dirty-rate"), "{plan}");
    // the working set: a second, longer sample says whether the guest rewrites a bounded set
    let set_how = plan["inputs"]["sources"]["dirty_set_bytes"].as_str().unwrap_or_default();
    assert!(set_how.starts_with("measured") || set_how.starts_with("none seen"), "{plan}");
    let kinds: Vec<&str> = plan["predictions"].as_array().unwrap().iter().filter_map(|p| p["kind"].as_str()).collect();
    assert_eq!(kinds.len(), 4, "{plan}");
    assert!(plan["predictions"].as_array().unwrap().iter().all(|p| p["total_ms"].as_u64().unwrap() > 0), "{plan}");
    let still = state(port).expect("the VM runs on the source after --plan");
    assert_eq!(still.1, before.1, "--plan restarted the guest");

    let mut mig = Command::new(away_bin());
    env(&mut mig, "source");
    let out = mig
        .args([
            "migrate",
            &name,
            "--to",
            &format!("127.0.0.1:{api}"),
            "--target-port",
            &format!("{port}:{target_port}"),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("report: {report}");
    assert_eq!(report["mode"], "vm-live");
    assert_eq!(report["target"], "vm-target");
    assert!(report["downtime_millis"].as_u64().unwrap() > 0);
    assert!(report["bytes_wire"].as_u64().unwrap() > 0);
    assert!(report["reason"].as_str().unwrap().contains("QEMU live migration"), "{report}");
    // predicted before the move, next to what was measured
    assert_eq!(report["predicted"]["kind"], "vm-precopy", "{report}");
    // the source keeps the move for its next predictions, with the bytes it sent
    let history =
        std::fs::read_to_string(format!("/tmp/away-e2e-vmcli/source-{}/state/move-history.jsonl", std::process::id()))
            .expect("the source's move history");
    let kept: Value = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert_eq!(kept["runtime"], "qemu", "{history}");
    assert_eq!(kept["bytes_wire"], report["bytes_wire"], "{history}");
    assert!(kept["phases"]["migrate"].as_u64().unwrap() > 0, "{history}");

    let after = wait_for(30, || state(target_port)).expect("the VM answers on the target's port");
    assert_eq!(after.1, before.1, "the guest restarted instead of moving");
    assert!(after.0 >= before.0);
    assert!(state(port).is_none(), "the source VM still answers");
    let mut ps = Command::new(away_bin());
    env(&mut ps, "source");
    let listed: Value = serde_json::from_slice(&ps.args(["ps", "--json"]).output().unwrap().stdout).unwrap();
    assert!(
        listed["workloads"].as_array().unwrap().iter().all(|w| w["name"] != name.as_str()),
        "source still lists the VM"
    );
}
