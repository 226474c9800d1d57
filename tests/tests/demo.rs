//! `away demo`, README's main job: it runs through, and an interrupted demo leaves no
//! cluster behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use away_e2e::{away, away_bin, require_root, workspace_root};

fn demo_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("away-demo-"))
        .map(String::from)
        .collect()
}

#[test]
fn demo_runs_and_cleans_up_even_when_interrupted() {
    if !require_root() {
        return;
    }
    // a full run
    let out = Command::new(away_bin()).arg("demo").current_dir(workspace_root()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("the state moved, the cloud copy is gone"), "{text}");
    assert!(text.contains("downtime"), "{text}");
    assert!(demo_namespaces().is_empty(), "namespaces left: {:?}", demo_namespaces());

    // interrupted while the cluster runs
    let mut child = Command::new(away_bin())
        .arg("demo")
        .current_dir(workspace_root())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("[3]") => break,
            Some(Ok(_)) => {}
            _ => panic!("demo ended before it submitted the workload"),
        }
    }
    assert!(!demo_namespaces().is_empty(), "the demo cluster should be up now");
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted demo must not report success");
    assert!(demo_namespaces().is_empty(), "namespaces left after Ctrl-C: {:?}", demo_namespaces());
    let st = away(&["cluster", "status", "--name", "demo"]);
    assert!(!st.status.success(), "the demo cluster is still recorded");
}
