//! Lazy (post-copy) container migration end to end, with `away migrate --mode lazy`.
//!
//! Two nodes of a local cluster give two network namespaces, each with its own
//! containerd (a lazy move needs them apart: the frozen source keeps its sockets until
//! the last page has moved). On them: memload (64 MiB, heartbeat every 100 ms) started
//! with `away run` on the source, and a standalone `away agent` on the target, both in
//! containerd namespaces of their own. Then: a move that works (the heartbeat goes on
//! from the same start time on the target), and the faults of the stop-and-copy tests
//! during the lazy phase (link cut, corrupt pages, target's page daemon killed early
//! and late, the target's agent killed), each ending with exactly one instance: the
//! source, resumed by CRIU (a killed agent's copy is killed at once and removed when the
//! agent is back).
//! Then the same for streamed stop-and-copy (`--mode stop-copy`, which pulls every page
//! into the target's images before it restores): a good move, a cut, corrupt pages and
//! the target's agent dying mid-pull.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use away_cluster::{ClusterInfo, NodeInfoLocal};
use away_e2e::{away_bin, cluster_plan, http_get_at, lab_image, require_root, wait_for};
use away_model::Tier;
use serde_json::Value;

const NAME: &str = "lazy";
const PORT: u16 = 18082;
const AGENT_API: u16 = 7850;

struct Down;
impl Drop for Down {
    fn drop(&mut self) {
        away_cluster::down(NAME);
    }
}

/// `away` on a cluster node, in its network namespace, with a containerd namespace and
/// state directory of this test's own.
fn on(node: &NodeInfoLocal, role: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let state = PathBuf::from(format!("/tmp/away-e2e-lazy/{role}"));
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", node.netns)).arg(away_bin()).args(args);
    for (k, v) in node.env() {
        c.env(k, v);
    }
    c.env("AWAY_AGENT_TOKEN", away_e2e::agent_token())
        .env("AWAY_NAMESPACE", format!("away-e2e-lazy-{role}"))
        .env("AWAY_STATE_DIR", &state)
        .env("AWAY_RUN_DIR", state.join("run"));
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn memload_state(ip: &str) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&http_get_at(ip.parse().ok()?, PORT, "/")?).ok()?;
    Some((v["tick"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

fn running(node: &NodeInfoLocal, role: &str, name: &str) -> usize {
    let out = on(node, role, &["ps", "--json"], &[]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["workloads"]
        .as_array()
        .map(|a| a.iter().filter(|w| w["name"] == name && w["state"] == "running").count())
        .unwrap_or(0)
}

/// Workloads called `name` on the node, in any state.
fn listed(node: &NodeInfoLocal, role: &str, name: &str) -> usize {
    let out = on(node, role, &["ps", "--json"], &[]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["workloads"].as_array().map(|a| a.iter().filter(|w| w["name"] == name).count()).unwrap_or(0)
}

/// The target's standalone agent (killed by its PID when dropped).
struct Agent(Child);
impl Agent {
    /// The target's agent, logging to /tmp/away-e2e-lazy/agent-`log`.log.
    fn start(node: &NodeInfoLocal, log: &str, env: &[(&str, &str)]) -> Agent {
        let api = format!("{}:{AGENT_API}", node.ip);
        let transfer = format!("{}:{}", node.ip, AGENT_API + 1);
        std::fs::create_dir_all("/tmp/away-e2e-lazy").unwrap();
        let log_path = format!("/tmp/away-e2e-lazy/agent-{log}.log");
        let log = std::fs::File::create(&log_path).unwrap();
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
            env,
        )
        .env("AWAY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the target agent");
        let ip = node.ip.to_string();
        let up = wait_for(30, || {
            away_e2e::agent_get(&format!("http://{ip}:{AGENT_API}/v1/node")).filter(|r| r.status().is_success())
        });
        assert!(up.is_some(), "the target agent did not answer on {api}");
        Agent(child)
    }
}
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Nodes {
    info: ClusterInfo,
}

impl Nodes {
    fn source(&self) -> &NodeInfoLocal {
        &self.info.nodes[0]
    }
    fn target(&self) -> &NodeInfoLocal {
        &self.info.nodes[1]
    }

    fn start_memload(&self, name: &str) -> (u64, u64) {
        self.start_memload_with(name, &[])
    }

    /// memload with more `-e KEY=VALUE` settings.
    fn start_memload_with(&self, name: &str, env: &[&str]) -> (u64, u64) {
        let image = lab_image("memload");
        let port = format!("MEMLOAD_PORT={PORT}");
        let extra = env.iter().flat_map(|e| ["-e", e]);
        let out = on(
            self.source(),
            "source",
            &[
                "run",
                image.to_str().unwrap(),
                "--name",
                name,
                "--runtime",
                "containerd",
                "--memory",
                "256Mi",
                "-e",
                "MEMLOAD_SIZE=64Mi",
                "-e",
                "MEMLOAD_INTERVAL_MS=100",
                "-e",
                &port,
            ]
            .into_iter()
            .chain(extra)
            .collect::<Vec<_>>(),
            &[],
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "away run: {}", String::from_utf8_lossy(&out.stderr));
        let ip = self.source().ip.to_string();
        wait_for(60, || memload_state(&ip).filter(|s| s.0 >= 5)).expect("memload beats on the source")
    }

    /// `away migrate --mode <mode>`: (exit ok, report or error JSON, stderr).
    fn migrate(&self, name: &str, mode: &str, env: &[(&str, &str)]) -> (bool, Value, String) {
        let to = format!("{}:{AGENT_API}", self.target().ip);
        let out = on(
            self.source(),
            "source",
            &["migrate", name, "--to", &to, "--mode", mode, "--json", "--source-name", "source"],
            env,
        )
        .output()
        .unwrap();
        let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), report, String::from_utf8_lossy(&out.stderr).to_string())
    }

    fn remove(&self, name: &str) {
        let _ = on(self.source(), "source", &["rm", "--force", name], &[]).output();
        let _ = on(self.target(), "target", &["rm", "--force", name], &[]).output();
    }

    /// A good move: the heartbeat goes on on the target from the same start, and only
    /// there.
    fn assert_moved(&self, name: &str, before: (u64, u64)) {
        let ip = self.target().ip.to_string();
        let after = wait_for(20, || memload_state(&ip)).expect("memload answers on the target");
        assert_eq!(after.1, before.1, "memload restarted instead of moving");
        assert!(after.0 >= before.0, "the heartbeat went on: {before:?} -> {after:?}");
        assert_eq!(running(self.target(), "target", name), 1);
        assert_eq!(running(self.source(), "source", name), 0, "the source is gone after a good move");
    }

    /// Start memload `name` and move it with `mode`, which must fail and leave the
    /// source resumed ([`Self::assert_source_resumed`]); returns the error output.
    fn assert_move_fails(&self, name: &str, mode: &str, env: &[(&str, &str)], why: &str) -> String {
        let before = self.start_memload(name);
        let (ok, _, stderr) = self.migrate(name, mode, env);
        assert!(!ok, "{why}: the move cannot succeed");
        self.assert_source_resumed(name, before, &stderr);
        self.remove(name);
        stderr
    }

    /// A failed lazy move: the source runs on from where it was (same start time, more
    /// beats), the target has no copy.
    fn assert_source_resumed(&self, name: &str, before: (u64, u64), stderr: &str) {
        assert!(stderr.contains("CRIU resumed it"), "the error says the source resumed: {stderr}");
        let ip = self.source().ip.to_string();
        let after =
            wait_for(20, || memload_state(&ip).filter(|s| s.0 > before.0 + 3)).expect("memload beats on at the source");
        assert_eq!(after.1, before.1, "the source restarted instead of resuming");
        assert!(
            wait_for(75, || (running(self.target(), "target", name) == 0).then_some(())).is_some(),
            "the target's partial copy is removed"
        );
        assert_eq!(running(self.source(), "source", name), 1);
    }
}

#[test]
fn lazy_moves_keep_state_and_faults_leave_one_instance() {
    if !require_root() {
        return;
    }
    away_cluster::down(NAME);
    let _ = std::fs::remove_dir_all("/tmp/away-e2e-lazy");
    let plan = cluster_plan(NAME, &[("src", Tier::Cloud), ("dst", Tier::Edge)], &[]);
    let info = away_cluster::up(&plan).expect("cluster up");
    let _down = Down;
    let nodes = Nodes { info };
    // the workloads go before the cluster (a resumed source would outlive its node)
    struct Cleanup<'a>(&'a Nodes);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for name in [
                "ml-ok",
                "ml-sp-page",
                "ml-cut",
                "ml-corrupt",
                "ml-kill-early",
                "ml-kill",
                "ml-agent-dies",
                "ml-source-killed",
                "ms-ok",
                "ms-cut",
                "ms-corrupt",
                "ms-die",
            ] {
                self.0.remove(name);
            }
        }
    }
    let _cleanup = Cleanup(&nodes);

    // 1. a lazy move: the heartbeat goes on on the target from the same start, and
    // 1b. the same with memload's main thread asleep with its stack pointer on a page
    // boundary: CRIU 4.2.1 as released takes every page for a stack page then and leaves
    // nothing lazy (the move would go as stop-and-copy); install.sh builds it mended
    let agent = Agent::start(nodes.target(), "plain", &[]);
    for (name, env) in [("ml-ok", None), ("ml-sp-page", Some("MEMLOAD_SLEEP_AT_PAGE_BOUNDARY=1"))] {
        let before = nodes.start_memload_with(name, env.as_slice());
        let (ok, report, stderr) = nodes.migrate(name, "lazy", &[]);
        assert!(ok, "{name}: lazy move failed: {stderr}");
        assert_eq!(report["mode"], "lazy", "{report}");
        // the target opened its page link at the announce and was offered the ranges
        assert!(report["reason"].as_str().unwrap().contains("from the dump's end"), "{report}");
        assert!(report["degraded_millis"].as_u64().unwrap() > 0, "{report}");
        assert!(
            report["paged_bytes_raw"].as_u64().unwrap() > 48 << 20,
            "{name}: the memory went lazily, through the page relay: {report}"
        );
        assert!(report["bytes_raw"].as_u64().unwrap() > report["paged_bytes_raw"].as_u64().unwrap(), "{report}");
        assert!(
            report["bytes_wire"].as_u64().unwrap() < report["bytes_raw"].as_u64().unwrap(),
            "the page stream is compressed: {report}"
        );
        nodes.assert_moved(name, before);
        nodes.remove(name);
    }

    // 2. the link cut during the lazy phase, and 3. a corrupt frame of pages
    for (name, fault) in [("ml-cut", "cut-after:1048576"), ("ml-corrupt", "corrupt-after:1048576")] {
        let stderr = nodes.assert_move_fails(name, "lazy", &[("AWAY_FAULT_LAZY", fault)], fault);
        // the fault lands while pages move: during the restore (the target's daemon
        // already fetches) or after it
        assert!(
            ["lazy phase failed", "could not restore", "page link"].iter().any(|m| stderr.contains(m)),
            "{fault}: {stderr}"
        );
    }
    drop(agent);

    // 4. the target's page daemon dies while pages are moving: early (during the
    // restore, whose CRIU then waits for pages that never come) and after it
    for (name, ms) in [("ml-kill-early", 100), ("ml-kill", 700)] {
        let fault = format!("kill-daemon-after-ms:{ms}");
        let _agent = Agent::start(nodes.target(), name, &[("AWAY_FAULT_LAZY_TARGET", &fault)]);
        nodes.assert_move_fails(name, "lazy", &[], &format!("{fault} (no page daemon on the target)"));
    }
    // 4a. the target's page daemon does not start at all: the restore, which prepared
    // the container while the daemon started, undoes it and the source resumes
    {
        let name = "ml-no-daemon";
        let _agent = Agent::start(nodes.target(), name, &[("AWAY_FAULT_LAZY_TARGET", "daemon-fails-to-start")]);
        let stderr = nodes.assert_move_fails(name, "lazy", &[], "daemon-fails-to-start (no page daemon)");
        assert!(stderr.contains("lazy-pages"), "the error names the page daemon: {stderr}");
        assert_eq!(listed(nodes.target(), "target", name), 0, "the restore left no container on the target");
    }
    // the target's whole agent dies in the lazy phase: the shell around its page daemon
    // kills the copy (which would run on with zero-filled pages), the source resumes,
    // and the agent, started again, removes the copy its last run left
    {
        let name = "ml-agent-dies";
        let agent = Agent::start(nodes.target(), name, &[("AWAY_FAULT_LAZY_TARGET", "kill-agent-after-ms:700")]);
        let before = nodes.start_memload(name);
        let (ok, _, stderr) = nodes.migrate(name, "lazy", &[]);
        assert!(!ok, "the target's agent died: the move cannot succeed");
        nodes.assert_source_resumed(name, before, &stderr);
        drop(agent);
        // the page daemon's shell, told by its parent-death signal, ended the daemon and
        // with it the copy's restore: no copy runs (one may be listed, dead, until the
        // agent is back)
        assert_eq!(running(nodes.target(), "target", name), 0, "no copy runs without its agent");
        let _again = Agent::start(nodes.target(), "ml-agent-dies-again", &[]);
        assert!(
            wait_for(75, || (listed(nodes.target(), "target", name) == 0).then_some(())).is_some(),
            "the agent, back, removed the copy its last run left"
        );
        nodes.remove(name);
    }
    // 4b. the source's `away migrate` SIGKILLed in the lazy phase (pages slowed to 50 ms
    // a frame after the first 4 MiB, so that the phase lasts): none of its code runs, the
    // kernel closes its relay's connection to CRIU's page server, which it set to reset
    // (SO_LINGER 0); CRIU takes the reset for a failed dump and resumes the source,
    // where a plain close would have read as "every page moved" and ended it with pages
    // missing on the target. The target's page daemon then loses its source and the copy
    // goes: exactly one instance, the source, from the same start
    {
        let name = "ml-source-killed";
        let _agent = Agent::start(nodes.target(), name, &[]);
        let before = nodes.start_memload(name);
        let to = format!("{}:{AGENT_API}", nodes.target().ip);
        let args = ["migrate", name, "--to", &to, "--mode", "lazy", "--json", "--source-name", "source"];
        let mut child = on(nodes.source(), "source", &args, &[("AWAY_FAULT_LAZY", "slow-after:4194304")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // the copy runs on the target: the lazy phase is on
        let lazy = wait_for(60, || (running(nodes.target(), "target", name) == 1).then_some(()));
        std::thread::sleep(std::time::Duration::from_secs(1));
        let _ = child.kill();
        let _ = child.wait();
        assert!(lazy.is_some(), "the lazy phase did not begin");
        let ip = nodes.source().ip.to_string();
        let after =
            wait_for(30, || memload_state(&ip).filter(|s| s.0 > before.0 + 3)).expect("memload beats on at the source");
        assert_eq!(after.1, before.1, "the source restarted instead of resuming");
        assert!(
            wait_for(75, || (running(nodes.target(), "target", name) == 0).then_some(())).is_some(),
            "the target's partial copy is removed"
        );
        assert_eq!(running(nodes.source(), "source", name), 1, "exactly one instance, on the source");
        eprintln!("source killed in the lazy phase: resumed, beats {} -> {}", before.0, after.0);
        nodes.remove(name);
    }

    // 5. streamed stop-and-copy: the pages go from the source's CRIU into the target's
    // images while the rest travels; the target restores once all are in
    {
        let _agent = Agent::start(nodes.target(), "streamed", &[]);
        let before = nodes.start_memload("ms-ok");
        let (ok, report, stderr) = nodes.migrate("ms-ok", "stop-copy", &[]);
        assert!(ok, "streamed move failed: {stderr}");
        assert_eq!(report["mode"], "stop-and-copy", "{report}");
        assert!(report["reason"].as_str().unwrap().contains("streamed"), "{report}");
        // the target opened the page link when the move was announced, and the source
        // pushed every page from its dump's end without being asked
        assert!(report["reason"].as_str().unwrap().contains("pages were pushed"), "{report}");
        assert_eq!(report["degraded_millis"], 0, "{report}");
        let phases: Vec<&str> =
            report["phases"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
        assert!(phases.contains(&"pages"), "{report}");
        assert!(report["paged_bytes_raw"].as_u64().unwrap() > 48 << 20, "every page crossed the relay: {report}");
        assert!(report["bytes_wire"].as_u64().unwrap() < report["bytes_raw"].as_u64().unwrap(), "{report}");
        nodes.assert_moved("ms-ok", before);
        nodes.remove("ms-ok");

        // the link cut and corrupt pages while the target pulls
        for (name, fault) in [("ms-cut", "cut-after:4194304"), ("ms-corrupt", "corrupt-after:4194304")] {
            nodes.assert_move_fails(name, "stop-copy", &[("AWAY_FAULT_LAZY", fault)], fault);
        }
    }
    // the target's agent dies mid-pull
    {
        let _agent = Agent::start(nodes.target(), "ms-die", &[("AWAY_FAULT_STREAM_TARGET", "die-after:8388608")]);
        nodes.assert_move_fails("ms-die", "stop-copy", &[], "the target gone");
    }

    // nothing a killed restore mounted is left behind
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let left: Vec<&str> = mounts.lines().filter(|l| l.contains("/tmp/away-e2e-lazy/target/transfers")).collect();
    assert!(left.is_empty(), "mounts left under the target's transfers: {left:#?}");
}
