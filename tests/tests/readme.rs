//! README's "Using it" block, run as written, line by line, top to bottom: the front
//! door cannot drift from what `away` does.
//!
//! The block is read from README.md (the ```sh fence under "## Using it"). Each line is
//! one command and a comment; the command runs through bash in the workspace root, as a
//! user pastes it after `./deploy/demo.sh`, with `away` resolving to the e2e's build
//! ([`away_bin`]). Every line has a check of its output here; a line this file does not
//! know is a failure, so a new README line needs its check.
//!
//! Lines ending in `&` start in the background (checked by what they answer or print,
//! stopped by the README's own `kill` lines or at the end). `away lab compare --quick`
//! takes about 5 minutes: it runs here with `--dry-run` added (which builds the app and
//! prints the plan), and lab.rs runs the same quick profile end to end.
//!
//! The node the lines run on gets a containerd namespace, state and run directory of
//! its own (AWAY_NAMESPACE, AWAY_STATE_DIR, AWAY_RUN_DIR, AWAY_BROKER_DB), so that the
//! test does not touch the workloads of whoever uses the machine; everything else (the
//! second node's namespace and directory, ports, cluster and link names) is the README's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use away_e2e::{away_bin, http_get, require, require_root, require_socket, require_vm_host, wait_for, workspace_root};
use serde_json::Value;

/// The README's second node (its `away agent` line): how the test looks at it.
const LAPTOP_NS: &str = "laptop";
const LAPTOP_STATE: &str = "/var/lib/away-laptop";
/// This test's own identity of the node the lines run on.
const HERE: &str = "/tmp/away-e2e-readme";

/// The commands of README's "Using it" block, each with its comment.
fn readme_block() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("read README.md");
    let section = readme.split_once("\n## Using it\n").expect("README has a \"## Using it\" section").1;
    let fence = section.split_once("```sh\n").expect("\"Using it\" has a ```sh block").1;
    let block = fence.split_once("\n```").expect("the ```sh block is closed").0;
    block
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            // the comment: from the first " #" (no command in the block has a '#')
            let (cmd, comment) = l.split_once(" #").unwrap_or((l, ""));
            let (cmd, comment) = (cmd.trim().to_string(), comment.trim().to_string());
            assert!(!comment.is_empty(), "README line without a comment: {l}");
            (cmd, comment)
        })
        .collect()
}

/// A line started with `&`: its process and where its output goes.
struct Background {
    cmd: String,
    child: Child,
    log: PathBuf,
}

impl Background {
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait up to `secs` for the process to end; its exit status.
    fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "`{}` did not end within {secs} s:\n{}", self.cmd, self.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The shell session the lines run in: exported variables and background jobs.
struct Session {
    exported: BTreeMap<String, String>,
    jobs: Vec<Background>,
    started: SystemTime,
    /// what the counter answered before the move
    counter_before: Option<(u64, u64)>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

impl Session {
    fn command(&self, script: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg("-c").arg(script).current_dir(workspace_root());
        c.env("AWAY_NAMESPACE", "away-e2e-readme")
            .env("AWAY_STATE_DIR", format!("{HERE}/state"))
            .env("AWAY_RUN_DIR", format!("{HERE}/run"))
            .env("AWAY_BROKER_DB", format!("{HERE}/broker.db"));
        for (k, v) in &self.exported {
            c.env(k, v);
        }
        // `away` is the e2e's build, whatever PATH the README's lines set
        let path = self.exported.get("PATH").cloned().unwrap_or_else(|| std::env::var("PATH").unwrap_or_default());
        let bin = away_bin().parent().unwrap().display().to_string();
        c.env("PATH", format!("{bin}:/opt/away-runtimes/current/bin:{path}"));
        c
    }

    /// Run a foreground line as written; it must succeed.
    fn run(&self, cmd: &str) -> (String, String) {
        let out: Output = self.command(cmd).output().expect("run bash");
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "README line failed ({}): {cmd}\nstdout: {stdout}\nstderr: {stderr}", out.status);
        eprintln!("$ {cmd}\n{stdout}{stderr}");
        (stdout, stderr)
    }

    /// Start a `... &` line in the background.
    fn start(&mut self, cmd: &str) -> &Background {
        std::fs::create_dir_all(HERE).unwrap();
        let log = PathBuf::from(format!("{HERE}/job-{}.log", self.jobs.len()));
        let out = std::fs::File::create(&log).unwrap();
        let child = self
            .command(&format!("exec {cmd}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start a background line");
        self.jobs.push(Background { cmd: cmd.to_string(), child, log });
        self.jobs.last().unwrap()
    }

    /// Wait until the last background job printed `what`.
    fn job_prints(&self, what: &str, secs: u64) -> String {
        let job = self.jobs.last().unwrap();
        wait_for(secs, || job.output().contains(what).then_some(()))
            .unwrap_or_else(|| panic!("`{}` did not print {what:?} within {secs} s:\n{}", job.cmd, job.output()));
        job.output()
    }

    /// `away` as a node with `namespace` and `state` sees it (for looking, not a README line).
    fn ps_of(&self, namespace: Option<(&str, &str)>) -> Vec<Value> {
        let mut c = self.command("away ps --json");
        if let Some((ns, state)) = namespace {
            c.env("AWAY_NAMESPACE", ns).env("AWAY_STATE_DIR", state);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "away ps --json: {}", text(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["workloads"].as_array().unwrap().clone()
    }

    fn running_on(&self, name: &str, namespace: Option<(&str, &str)>) -> Option<Value> {
        self.ps_of(namespace).into_iter().find(|w| w["name"] == name && w["state"] == "running")
    }

    /// Run README line `cmd` and check what it did.
    fn step(&mut self, cmd: &str) {
        let t0 = Instant::now();
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let arg = |flag: &str| words.iter().position(|w| *w == flag).and_then(|i| words.get(i + 1)).copied();
        let laptop = Some((LAPTOP_NS, LAPTOP_STATE));
        match words.as_slice() {
            ["export", "PATH=$PWD/target/debug:$PATH"] => {
                // the binary demo.sh leaves there (here `away` is the e2e's own build of it)
                let demo = std::fs::read_to_string(workspace_root().join("deploy/demo.sh")).unwrap();
                assert!(
                    demo.contains("cargo build --quiet -p away") && demo.contains("./target/debug/away"),
                    "deploy/demo.sh no longer builds target/debug/away"
                );
                self.export(cmd);
            }
            ["export", ..] if cmd.contains("AWAY_JOIN_TOKEN=") && cmd.contains("AWAY_USER_TOKEN=") => {
                assert!(cmd.matches("=$(").count() == 2, "tokens made fresh, not written in the README: {cmd}");
                self.export(cmd);
                let (join, user) = (&self.exported["AWAY_JOIN_TOKEN"], &self.exported["AWAY_USER_TOKEN"]);
                assert!(join.len() >= 16 && user.len() >= 16 && join != user, "tokens: {join:?} {user:?}");
            }
            ["export", ..] if cmd.contains("AWAY_AGENT_TOKEN=") => {
                assert!(cmd.contains("=$("), "the token made fresh, not written in the README: {cmd}");
                self.export(cmd);
                assert!(self.exported["AWAY_AGENT_TOKEN"].len() >= 16, "{:?}", self.exported["AWAY_AGENT_TOKEN"]);
            }
            ["away", "image", "build", context, "-o", out] => {
                let (stdout, stderr) = self.run(cmd);
                let app = Path::new(context).file_name().unwrap().to_str().unwrap();
                let tar = workspace_root().join(out).join(format!("{app}.tar"));
                let fresh = std::fs::metadata(&tar).and_then(|m| m.modified()).is_ok_and(|t| t >= self.started);
                assert!(fresh, "{} was not written\n{stdout}{stderr}", tar.display());
                assert!(stdout.contains(&format!("away/{app}:latest")), "the stored reference is named: {stdout}");
            }
            ["away", "run", "examples/counter.yaml"] => {
                let (stdout, _) = self.run(cmd);
                assert!(stdout.contains("counter is running on containerd"), "{stdout}");
                assert!(stdout.contains("why: container on containerd"), "{stdout}");
                let spec = std::fs::read_to_string(workspace_root().join("examples/counter.yaml")).unwrap();
                assert!(spec.contains("COUNTER_PORT: \"18080\""), "examples/counter.yaml counts on 18080");
                assert!(wait_for(20, || counter(18080)).is_some(), "the counter does not answer on 18080");
            }
            ["away", "run", "away/counter:latest", "--vm", ..] => {
                let (stdout, _) = self.run(cmd);
                let name = arg("--name").expect("the VM line names its workload");
                let port: u16 = arg("-p").expect("the VM line publishes a port").parse().unwrap();
                assert!(stdout.contains(&format!("{name} is running on qemu")), "{stdout}");
                // -p PORT went to the image's one exposed port, where counter listens
                assert!(stdout.contains(&format!("ports: {port}:8080")), "{stdout}");
                let booted = wait_for(180, || counter(port));
                assert!(booted.is_some(), "the VM does not answer on {port} after 180 s");
                eprintln!("the VM answered on {port} {:.1} s after `away run`", t0.elapsed().as_secs_f64());
            }
            ["away", "ps"] => {
                let (stdout, _) = self.run(cmd);
                let row = |name: &str| stdout.lines().find(|l| l.split_whitespace().next() == Some(name));
                let c = row("counter").unwrap_or_else(|| panic!("ps lists counter: {stdout}"));
                assert!(c.contains("containerd") && c.contains("running") && c.contains("18080"), "{c}");
                let vm = row("counter-vm").unwrap_or_else(|| panic!("ps lists counter-vm: {stdout}"));
                assert!(vm.contains("qemu") && vm.contains("running") && vm.contains("18090:8080"), "{vm}");
            }
            ["away", "logs", name] => {
                let (stdout, _) = self.run(cmd);
                assert!(stdout.contains(&format!("{name}: ")), "{name}'s output: {stdout}");
            }
            ["away", "stop", name] => {
                let (stdout, _) = self.run(cmd);
                assert_eq!(stdout.trim(), format!("{name} is stopped"));
            }
            ["away", "rm", name] => {
                let (stdout, _) = self.run(cmd);
                assert!(stdout.starts_with(&format!("removed {name} (")), "{stdout}");
                assert!(self.ps_of(None).iter().all(|w| w["name"] != *name), "{name} still listed");
            }
            ["away", "agent", .., "&"] => {
                let listen = arg("--listen").unwrap().to_string();
                assert_eq!(arg("--namespace"), Some(LAPTOP_NS));
                assert_eq!(arg("--state-dir"), Some(LAPTOP_STATE));
                self.start(cmd.trim_end_matches('&').trim());
                let out = self.job_prints(&format!("api http://{listen}"), 30);
                assert!(out.contains("away agent laptop (client)"), "{out}");
            }
            ["curl", .., url] if url.ends_with("/v1/node") => {
                let (stdout, _) = self.run(cmd);
                let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
                assert_eq!(v["node"]["name"], "laptop", "{v}");
                assert_eq!(v["node"]["tier"], "client", "{v}");
                assert_eq!(v["transfer_addr"], "127.0.0.1:7811", "{v}");
            }
            ["away", "migrate", "counter", "--to", to] => {
                self.counter_before = Some(counter(18080).expect("the counter answers before the move"));
                let (stdout, _) = self.run(cmd);
                assert!(stdout.contains("counter moved from") && stdout.contains("to laptop"), "{stdout}");
                assert!(stdout.contains("downtime:"), "the report: {stdout}");
                assert!(to.starts_with("127.0.0.1:"));
                assert!(self.running_on("counter", laptop).is_some(), "counter does not run on laptop");
                assert!(self.running_on("counter", None).is_none(), "counter still runs here");
            }
            ["curl", "-s", "127.0.0.1:18080/"] => {
                let before = self.counter_before.expect("a move before");
                // the restored counter may need a moment to answer
                let stdout = wait_for(20, || {
                    let out = self.command(cmd).output().unwrap();
                    (out.status.success() && !out.stdout.is_empty()).then(|| text(&out.stdout))
                })
                .expect("the counter answers on 18080 after the move");
                eprintln!("$ {cmd}\n{stdout}");
                let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
                assert_eq!(v["started_unix_ms"].as_u64(), Some(before.1), "it restarted instead of moving: {v}");
                assert!(v["count"].as_u64().unwrap() >= before.0, "the count went back: {before:?} -> {v}");
            }
            ["away", "run", "out/memload.tar", "-e", "MEMLOAD_PORT=0"] => {
                let (stdout, _) = self.run(cmd);
                assert!(stdout.contains("memload is running on containerd"), "{stdout}");
                let beats = wait_for(30, || {
                    let out = self.command("away logs memload").output().unwrap();
                    (text(&out.stdout).lines().count() >= 2).then_some(())
                });
                assert!(beats.is_some(), "memload prints no heartbeat");
            }
            ["away", "migrate", "memload", "--to", _, "--mode", mode] => {
                let (stdout, _) = self.run(cmd);
                assert!(stdout.contains(&format!("to laptop ({mode}")), "moved {mode}: {stdout}");
                assert!(stdout.contains("paged:"), "its memory followed over the page link: {stdout}");
                assert!(self.running_on("memload", laptop).is_some(), "memload does not run on laptop");
                assert!(self.running_on("memload", None).is_none(), "memload still runs here");
            }
            ["away", "broker", "&"] => {
                let pid = self.start("away broker").child.id();
                // the tokens are in its environment, not its command line
                let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv = text(&argv);
                for token in [&self.exported["AWAY_JOIN_TOKEN"], &self.exported["AWAY_USER_TOKEN"]] {
                    assert!(!argv.contains(token.as_str()), "a token on the broker's command line: {argv}");
                }
                self.job_prints("away broker on https://127.0.0.1:7700", 30);
            }
            ["curl", .., url] if url.ends_with("7700/v1/nodes") => {
                // the broker's database (and so its ca.pem) is this test's, not /var/lib/away's
                let ca = format!("{HERE}/ca.pem");
                assert!(cmd.contains("--cacert /var/lib/away/ca.pem"), "{cmd}");
                let (stdout, _) = self.run(&cmd.replace("/var/lib/away/ca.pem", &ca));
                let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
                assert!(v.is_array() || v["nodes"].is_array(), "a list of nodes: {v}");
                // without the token, no answer; over plain HTTP, no answer; and a client
                // that does not trust the CA does not get through the handshake
                let code = |c: &str| text(&self.command(c).output().unwrap().stdout);
                assert_eq!(
                    code(&format!(
                        "curl -s --cacert {ca} -o /dev/null -w '%{{http_code}}' https://127.0.0.1:7700/v1/nodes"
                    )),
                    "401"
                );
                assert_eq!(code("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:7700/v1/nodes"), "000");
                assert_eq!(code("curl -s -o /dev/null -w '%{http_code}' https://127.0.0.1:7700/v1/nodes"), "000");
            }
            ["away", "cluster", "up", ..] => {
                let (stdout, _) = self.run(cmd);
                assert!(stdout.contains("cluster local is up; broker https://"), "{stdout}");
                let status = self.run("away cluster status --json").0;
                let v: Value = serde_json::from_str(&status).unwrap();
                let nodes: Vec<&str> =
                    v["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
                assert_eq!(nodes, ["cloud", "laptop"], "{v}");
                let store = "/var/lib/away/cluster/local/laptop/away/images/docker.io_away_counter_latest.tar";
                assert!(Path::new(store).is_file(), "the nodes got out/counter.tar ({store})");
            }
            ["away", "cluster", "down"] => {
                let (stdout, _) = self.run(cmd);
                assert_eq!(stdout.trim(), "cluster local is down");
                assert!(!Path::new("/run/netns/away-local-cloud").exists(), "its namespaces are gone");
            }
            ["away", "link", "up", name, .., "&"] => {
                let name = name.to_string();
                self.start(cmd.trim_end_matches('&').trim());
                let out = self.job_prints("Ctrl-C or SIGTERM removes it", 30);
                assert!(
                    out.contains(&format!(
                        "link {name} up: awl-{name}-a (10.254.0.1) <-> awl-{name}-b (10.254.0.2), 36.784 ms one way"
                    )),
                    "{out}"
                );
            }
            ["sleep", secs] => {
                // (the link's line already waited for it; sleeping as written costs little)
                assert!(secs.parse::<f64>().is_ok_and(|s| s <= 5.0), "a short pause: {cmd}");
                self.run(cmd);
            }
            ["ip", "netns", "exec", _, "busybox", "ping", ..] => {
                let (stdout, _) = self.run(cmd);
                // round-trip min/avg/max = 73.9/74.1/74.4 ms
                let avg: f64 = stdout
                    .lines()
                    .find_map(|l| l.strip_prefix("round-trip min/avg/max = "))
                    .and_then(|r| r.split('/').nth(1)?.parse().ok())
                    .unwrap_or_else(|| panic!("no round trip in {stdout}"));
                assert!((73.5..90.0).contains(&avg), "round trip {avg} ms, twice 36.784 ms expected");
            }
            ["kill", "$!"] => {
                let job = self.jobs.last_mut().expect("a background job before");
                let pid = job.child.id().to_string();
                assert!(Command::new("kill").arg(&pid).status().unwrap().success());
                let st = job.wait(30);
                assert!(st.success(), "`{}` after SIGTERM: {st}\n{}", job.cmd, job.output());
                assert!(job.output().contains("link wan down (SIGTERM)"), "{}", job.output());
                assert!(!Path::new("/run/netns/awl-wan-a").exists(), "its namespaces are gone");
                self.jobs.pop();
            }
            ["away", "lab", "compare", "--quick", "--out", out] => {
                // the whole quick profile is lab.rs's; here its plan, from the same binary
                let lab_rs = std::fs::read_to_string(workspace_root().join("tests/tests/lab.rs")).unwrap();
                assert!(lab_rs.contains("CompareOptions::quick("), "lab.rs runs the quick profile");
                let (_, stderr) = self.run(&format!("{cmd} --dry-run"));
                let quick = away_lab::CompareOptions::quick(PathBuf::new(), PathBuf::new(), PathBuf::from(out));
                let runs = format!("{} runs, estimated at most", quick.plan().len());
                assert!(stderr.contains(&runs), "{runs:?}: {stderr}");
            }
            ["away", "lab", "merge", "--out", out, ..] => {
                let _ = std::fs::remove_dir_all(workspace_root().join(out));
                let (stdout, _) = self.run(cmd);
                assert!(stdout.contains(&format!("from {} sources", words.len() - 5)), "{stdout}");
                let report = std::fs::read_to_string(workspace_root().join(out).join("report.md")).unwrap();
                assert!(report.contains("merged (`away lab merge`)"), "{report}");
            }
            ["away", "doctor", "--json"] => {
                let (stdout, _) = self.run(cmd);
                let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
                // (it exits non-zero when something away needs is missing: run() checked that)
                assert_eq!(v["containerd"]["socket"], "/run/containerd/containerd.sock", "{v}");
                let checks = v["checks"].as_array().unwrap_or_else(|| panic!("doctor lists its checks: {v}"));
                assert!(checks.iter().any(|c| c["name"] == "cpu" && c["status"] == "ok"), "{v}");
            }
            ["kill", "$(jobs", "-p)"] => {
                assert!(!self.jobs.is_empty(), "no background jobs left to stop");
                for job in &mut self.jobs {
                    let _ = Command::new("kill").arg(job.child.id().to_string()).status();
                    job.wait(30);
                }
                self.jobs.clear();
                for port in [7700, 7810] {
                    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "{port} still answers");
                }
            }
            _ => panic!("README's \"Using it\" has a line tests/tests/readme.rs cannot run or check: {cmd}"),
        }
        eprintln!("  ({:.1} s)", t0.elapsed().as_secs_f64());
    }

    /// `export ...` as bash does it; the variables it set join the session.
    fn export(&mut self, cmd: &str) {
        let out = self.command(&format!("{cmd} && env -0")).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
        for pair in text(&out.stdout).split('\0') {
            if let Some((k, v)) = pair.split_once('=') {
                if cmd.contains(&format!("{k}=")) {
                    self.exported.insert(k.to_string(), v.to_string());
                }
            }
        }
    }
}

impl Drop for Session {
    /// a failed line leaves no background job behind
    fn drop(&mut self) {
        for job in &mut self.jobs {
            let _ = job.child.kill();
            let _ = job.child.wait();
        }
    }
}

/// (count, start time) of a counter answering on `port`
fn counter(port: u16) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&http_get(port, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

/// Leaves nothing behind, whatever line failed.
struct Cleanup {
    /// the README's second node's directory was there before the test
    laptop_existed: bool,
}
impl Drop for Cleanup {
    fn drop(&mut self) {
        let here = [
            ("AWAY_NAMESPACE", "away-e2e-readme".to_string()),
            ("AWAY_STATE_DIR", format!("{HERE}/state")),
            ("AWAY_RUN_DIR", format!("{HERE}/run")),
        ];
        let laptop = [
            ("AWAY_NAMESPACE", LAPTOP_NS.to_string()),
            ("AWAY_STATE_DIR", LAPTOP_STATE.to_string()),
            ("AWAY_RUN_DIR", format!("{HERE}/run")),
        ];
        for env in [&here, &laptop] {
            for name in ["counter", "counter-vm", "memload"] {
                let _ = Command::new(away_bin()).args(["rm", "--force", name]).envs(env.iter().cloned()).output();
            }
        }
        away_cluster::down("local");
        if !self.laptop_existed {
            let _ = std::fs::remove_dir_all(LAPTOP_STATE);
        }
    }
}

#[test]
fn readme_using_it_runs_as_written() {
    if !(require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require_socket("/run/docker.sock", "dockerd")
        && require_vm_host()
        && require(Path::new("/usr/bin/curl").is_file(), "curl")
        && require(Command::new("busybox").arg("true").status().is_ok_and(|s| s.success()), "busybox"))
    {
        return;
    }
    let lines = readme_block();
    assert!(lines.len() >= 10, "README's \"Using it\" block: {lines:?}");
    // the README's fixed ports and names must be free
    for port in [18080, 18090, 7700, 7810, 7811] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port}, which README's lines use, is taken on this machine"
        );
    }
    for netns in ["awl-wan-a", "away-local-cloud"] {
        assert!(!Path::new("/run/netns").join(netns).exists(), "network namespace {netns} exists already");
    }
    let _ = std::fs::remove_dir_all(HERE);
    let _cleanup = Cleanup { laptop_existed: Path::new(LAPTOP_STATE).exists() };
    let mut session =
        Session { exported: BTreeMap::new(), jobs: Vec::new(), started: SystemTime::now(), counter_before: None };
    let t0 = Instant::now();
    for (cmd, comment) in &lines {
        eprintln!("== {cmd}   # {comment}");
        session.step(cmd);
    }
    assert!(session.jobs.is_empty(), "the block leaves background jobs running: the README should stop them");
    eprintln!("README's {} lines ran in {:.0} s", lines.len(), t0.elapsed().as_secs_f64());
}
