//! `away run / ps / logs / stop / rm` end to end, through the binary users type.

use away_e2e::{away, away_json, free_port, http_get, lab_image, require_root, require_socket, wait_for};

fn ready() -> bool {
    require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require_socket("/run/docker.sock", "dockerd")
}

fn name(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

struct Rm(String);
impl Drop for Rm {
    fn drop(&mut self) {
        let _ = away(&["rm", "--force", &self.0]);
    }
}

fn stderr(args: &[&str]) -> (bool, String) {
    let out = away(args);
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn run_ps_logs_stop_rm_on_each_container_runtime() {
    if !ready() {
        return;
    }
    let tar = lab_image("counter");
    for runtime in ["containerd", "docker"] {
        let n = name(&format!("cli-{runtime}"));
        let _rm = Rm(n.clone());
        let port = free_port().to_string();
        let started = away_json(&[
            "run",
            tar.to_str().unwrap(),
            "--name",
            &n,
            "--runtime",
            runtime,
            "-e",
            &format!("COUNTER_PORT={port}"),
            "-p",
            &format!("{port}:{port}"),
            "--json",
        ]);
        assert_eq!(started["decision"]["runtime"], runtime);
        assert!(started["decision"]["reason"].as_str().unwrap().contains("as requested"));
        assert_eq!(started["workload"]["state"], "running");
        let port: u16 = port.parse().unwrap();
        assert!(wait_for(20, || http_get(port, "/count")).is_some(), "{runtime}: counter does not answer");
        let ps = away_json(&["ps", "--json"]);
        let me = ps["workloads"].as_array().unwrap().iter().find(|w| w["name"] == n.as_str()).expect("listed by ps");
        assert_eq!(me["runtime"], runtime);
        assert!(wait_for(10, || {
            let out = away(&["logs", &n]);
            String::from_utf8_lossy(&out.stdout).contains("counter: ").then_some(())
        })
        .is_some());
        // rm refuses a running workload without --force
        let (ok, err) = stderr(&["rm", &n]);
        assert!(!ok && err.contains("stop it first"), "{err}");
        let stopped = away_json(&["stop", &n, "--grace", "5", "--json"]);
        assert_eq!(stopped["state"], "stopped");
        away_json(&["rm", &n, "--json"]);
        let ps = away_json(&["ps", "--json"]);
        assert!(
            ps["workloads"].as_array().unwrap().iter().all(|w| w["name"] != n.as_str()),
            "{runtime}: still listed after rm"
        );
    }
}

#[test]
fn auto_prefers_a_container_and_says_why() {
    if !ready() {
        return;
    }
    let tar = lab_image("labdesk");
    let n = name("cli-auto");
    let _rm = Rm(n.clone());
    let port = free_port().to_string();
    let started = away_json(&[
        "run",
        tar.to_str().unwrap(),
        "--name",
        &n,
        "-e",
        &format!("LABDESK_PORT={port}"),
        "-p",
        // (the app listens on the port it was told: PORT alone would go to the image's own)
        &format!("{port}:{port}"),
        "--json",
    ]);
    assert_eq!(started["decision"]["runtime"], "containerd");
    assert!(started["decision"]["reason"].as_str().unwrap().starts_with("container on containerd"), "{started}");
    assert!(wait_for(20, || http_get(port.parse().unwrap(), "/state")).is_some());
}

#[test]
fn bad_input_gets_clear_errors_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let n = name("cli-bad");
    let (ok, err) = stderr(&["run", "away/no-such-image:latest", "--name", &n]);
    assert!(!ok);
    assert!(err.contains("no-such-image") && err.contains("not found"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("bad.yaml");
    std::fs::write(&spec, format!("name: {n}\nimage: away/counter:latest\nresources:\n  memory: 64\n")).unwrap();
    let (ok, err) = stderr(&["run", spec.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("resources.memory") && err.contains("line 4") && err.contains("no unit"), "{err}");

    let tar = lab_image("counter");
    let (ok, err) = stderr(&["run", tar.to_str().unwrap(), "--name", &n, "--memory", "64Ti"]);
    assert!(!ok);
    assert!(err.contains("resources.memory") && err.contains("more than this node"), "{err}");

    let ps = away_json(&["ps", "--json"]);
    assert!(
        ps["workloads"].as_array().unwrap().iter().all(|w| w["name"] != n.as_str()),
        "a failed run left {n} behind"
    );
}
