//! The fallback rule on the real host: with containerd and Docker stopped, `kind: auto`
//! runs the workload as a QEMU VM and says why; then the daemons come back.
//!
//! This file is its own test binary (cargo runs test binaries one after another), so
//! stopping the daemons cannot disturb other tests.

use std::process::Command;

use away_e2e::{away, away_json, free_port, http_get, lab_image, require, require_root, wait_for, workspace_root};

fn services(cmd: &str) -> String {
    let out = Command::new("bash").arg(workspace_root().join("deploy/services.sh")).arg(cmd).output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Starts the daemons again however the test ends.
struct Restart;
impl Drop for Restart {
    fn drop(&mut self) {
        eprintln!("{}", services("start"));
    }
}

#[test]
fn auto_falls_back_to_qemu_when_container_runtimes_are_down() {
    if !require_root() {
        return;
    }
    // only daemons that deploy/services.sh started can be stopped by it (never by name)
    let started_by_us =
        ["containerd", "dockerd"].iter().all(|d| std::path::Path::new(&format!("/run/away/{d}.pid")).exists());
    if !require(started_by_us, "containerd and dockerd started by deploy/services.sh (pidfiles in /run/away)") {
        return;
    }
    let tar = lab_image("counter");
    let n = format!("fallback-{}", std::process::id());
    let port = free_port().to_string();

    let _restart = Restart;
    eprintln!("{}", services("stop"));
    let status = Command::new("bash").arg(workspace_root().join("deploy/services.sh")).arg("status").status().unwrap();
    assert!(!status.success(), "daemons still answer after services.sh stop");

    let started = away_json(&[
        "run",
        tar.to_str().unwrap(),
        "--name",
        &n,
        "-e",
        &format!("COUNTER_PORT={port}"),
        "-p",
        // (the app listens on the port it was told: PORT alone would go to the image's 8080)
        &format!("{port}:{port}"),
        "--memory",
        "128Mi",
        "--json",
    ]);
    let result = std::panic::catch_unwind(|| {
        assert_eq!(started["decision"]["runtime"], "qemu", "{started}");
        let reason = started["decision"]["reason"].as_str().unwrap();
        assert!(reason.contains("no container runtime can run it"), "{reason}");
        assert!(reason.contains("containerd") && reason.contains("docker"), "{reason}");
        let considered = started["decision"]["considered"].as_array().unwrap();
        assert_eq!(considered.len(), 3);
        assert!(considered.iter().filter(|v| v["runtime"] != "qemu").all(|v| v["usable"] == false));
        let port: u16 = port.parse().unwrap();
        let count = wait_for(120, || http_get(port, "/count")).expect("the counter VM answers over HTTP");
        eprintln!("counter VM answered: {}", count.trim());
    });
    let _ = away(&["rm", "--force", &n]);
    drop(_restart);
    let status = Command::new("bash").arg(workspace_root().join("deploy/services.sh")).arg("status").status().unwrap();
    assert!(status.success(), "daemons did not come back");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
