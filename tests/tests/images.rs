//! `away image build|vm` end to end: each lab app's image loads into containerd
//! and Docker and runs, and its VM boot artifact boots under QEMU (TCG) and
//! answers over HTTP. Everything created here is removed again, also on failure
//! (guards that clean up on drop).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use away_e2e::{away_json, free_port, require, require_root, require_socket, workspace_root};

const APPS: [&str; 3] = ["counter", "memload", "labdesk"];
const CONTAINERD: &str = "/run/containerd/containerd.sock";
const DOCKERD: &str = "/run/docker.sock";
/// The active runtime profile's ctr, the client of the containerd that runs.
fn ctr() -> String {
    away_runtime::host::runtime_bin("ctr").display().to_string()
}

fn docker() -> String {
    away_e2e::docker_cli().display().to_string()
}
const NS: &str = "away-test";

/// The app's port variable and a line its log must show.
fn app_facts(app: &str) -> (&'static str, &'static str) {
    match app {
        "counter" => ("COUNTER_PORT", "counter: started"),
        "memload" => ("MEMLOAD_PORT", "memload: tick="),
        "labdesk" => ("LABDESK_PORT", "labdesk: started"),
        _ => unreachable!(),
    }
}

fn tag(app: &str) -> String {
    format!("away-e2e/{app}:test")
}

/// Build all images once per test process (tests share them).
fn image_tar(app: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let out = workspace_root().join("target/away-e2e/images");
    let done = BUILT.get_or_init(|| Mutex::new(Vec::new()));
    let mut done = done.lock().unwrap_or_else(|e| e.into_inner());
    let tar = out.join(format!("{app}.tar"));
    if !done.iter().any(|a| a == app) {
        let ctx = workspace_root().join("images").join(app);
        let report = away_json(&[
            "image",
            "build",
            ctx.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--tag",
            &tag(app),
            "--json",
        ]);
        assert_eq!(report["path"].as_str().map(PathBuf::from), Some(tar.clone()));
        assert!(report["manifest_digest"].as_str().unwrap().starts_with("sha256:"));
        done.push(app.to_string());
    }
    tar
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must(cmd: &str, args: &[&str]) -> String {
    let (ok, text) = run(cmd, args);
    assert!(ok, "{cmd} {args:?} failed:\n{text}");
    text
}

/// One HTTP/1.1 request; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Poll `GET /` until it answers 200, up to `timeout`.
fn wait_http(port: u16, timeout: Duration) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some((200, body)) = http(port, "GET", "/", "") {
            return Some(body);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    None
}

/// What each app must answer over HTTP.
fn check_app_http(app: &str, port: u16, where_: &str) {
    let body = wait_http(port, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{app} in {where_}: no HTTP answer on 127.0.0.1:{port}"));
    println!("{app} in {where_}: GET / -> {}", body.lines().next().unwrap_or_default());
    match app {
        "counter" => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let first = v["count"].as_u64().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            let (_, text) = http(port, "GET", "/count", "").unwrap();
            let later: u64 = text.trim().parse().unwrap();
            assert!(later > first, "{app} in {where_}: count does not advance ({first} -> {later})");
            assert!(v["pid"].as_u64().is_some() && v["started_unix_ms"].as_u64().is_some(), "{body}");
        }
        "memload" => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(v["pid"].as_u64().is_some() && v["size"].as_u64().is_some(), "{body}");
        }
        "labdesk" => {
            assert!(body.contains("<html"), "{body}");
            let (status, created) = http(port, "POST", "/notes", r#"{"text":"migrate me"}"#).unwrap();
            assert_eq!(status, 201, "{created}");
            let (_, notes) = http(port, "GET", "/notes", "").unwrap();
            assert!(notes.contains("migrate me"), "{notes}");
            let (status, _) = http(port, "POST", "/history", "ls -la").unwrap();
            assert_eq!(status, 201);
            let (_, state) = http(port, "GET", "/state", "").unwrap();
            let v: serde_json::Value = serde_json::from_str(&state).unwrap();
            assert_eq!(v["history"][0]["command"], "ls -la", "{state}");
        }
        _ => unreachable!(),
    }
}

/// Poll a log until it contains `needle`.
fn wait_log(read: impl Fn() -> String, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let log = read();
        if log.contains(needle) || start.elapsed() > timeout {
            return log;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Removes a containerd container (task first) and image on drop.
struct CtrCleanup {
    id: String,
    image: String,
}

impl Drop for CtrCleanup {
    fn drop(&mut self) {
        let _ = run(&ctr(), &["-n", NS, "task", "kill", "-s", "SIGKILL", &self.id]);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) && !run(&ctr(), &["-n", NS, "task", "rm", &self.id]).0 {
            if !run(&ctr(), &["-n", NS, "task", "ls", "-q"]).1.lines().any(|l| l == self.id) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = run(&ctr(), &["-n", NS, "containers", "rm", &self.id]);
        let _ = run(&ctr(), &["-n", NS, "images", "rm", &self.image]);
    }
}

#[test]
fn images_import_and_run_in_containerd() {
    if !require_root() || !require_socket(CONTAINERD, "containerd") {
        return;
    }
    for app in APPS {
        let tar = image_tar(app);
        let image = format!("docker.io/{}", tag(app));
        let id = format!("away-e2e-{app}-{}", std::process::id());
        let _cleanup = CtrCleanup { id: id.clone(), image: image.clone() };
        must(&ctr(), &["-n", NS, "images", "import", tar.to_str().unwrap()]);
        // (ctr's progress output differs between versions: ask for the image instead)
        let listed = must(&ctr(), &["-n", NS, "images", "ls", "-q"]);
        assert!(listed.lines().any(|l| l == image), "ctr import did not name the image {image}:\n{listed}");

        // Host network with a free port, so the test can reach the app over HTTP.
        let port = free_port();
        let (port_env, log_needle) = app_facts(app);
        let log = std::env::temp_dir().join(format!("{id}.log"));
        let _ = std::fs::remove_file(&log);
        let env = format!("{port_env}={port}");
        let log_uri = format!("file://{}", log.display());
        must(&ctr(), &["-n", NS, "run", "-d", "--net-host", "--env", &env, "--log-uri", &log_uri, &image, &id]);
        check_app_http(app, port, "containerd");
        let text = wait_log(|| std::fs::read_to_string(&log).unwrap_or_default(), log_needle, Duration::from_secs(15));
        println!("{app} in containerd, log:\n{}", text.lines().take(4).collect::<Vec<_>>().join("\n"));
        assert!(text.contains(log_needle), "{app}: log lacks {log_needle:?}:\n{text}");

        // SIGTERM ends the app quickly (it is PID 1 and has a handler).
        let start = Instant::now();
        must(&ctr(), &["-n", NS, "task", "kill", "-s", "SIGTERM", &id]);
        while run(&ctr(), &["-n", NS, "task", "ls"]).1.lines().any(|l| l.starts_with(&id) && l.contains("RUNNING")) {
            assert!(start.elapsed() < Duration::from_secs(5), "{app} ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(&log);
    }
}

/// Removes a Docker container and image on drop.
struct DockerCleanup {
    name: String,
    image: String,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let _ = run(&docker(), &["rm", "-f", &self.name]);
        let _ = run(&docker(), &["rmi", &self.image]);
    }
}

#[test]
fn images_load_and_run_in_docker() {
    if !require_root()
        || !require_socket(DOCKERD, "dockerd")
        || !require(Path::new(&docker()).exists(), "the docker CLI")
    {
        return;
    }
    for app in APPS {
        let tar = image_tar(app);
        let name = format!("away-e2e-{app}-{}", std::process::id());
        let _cleanup = DockerCleanup { name: name.clone(), image: tag(app) };
        let out = must(&docker(), &["load", "-i", tar.to_str().unwrap()]);
        assert!(out.contains(&format!("Loaded image: {}", tag(app))), "{out}");
        let port = free_port();
        let publish = format!("127.0.0.1:{port}:8080");
        must(&docker(), &["run", "-d", "--name", &name, "-p", &publish, &tag(app)]);
        check_app_http(app, port, "docker");
        let (_, log_needle) = app_facts(app);
        let text = wait_log(|| run(&docker(), &["logs", &name]).1, log_needle, Duration::from_secs(15));
        println!("{app} in docker, log:\n{}", text.lines().take(4).collect::<Vec<_>>().join("\n"));
        assert!(text.contains(log_needle), "{app}: log lacks {log_needle:?}:\n{text}");
        let start = Instant::now();
        must(&docker(), &["stop", "-t", "10", &name]);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{app}: docker stop took {:?} (SIGTERM ignored?)",
            start.elapsed()
        );
    }
}

/// Kills a QEMU process by its PID on drop.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn vm_artifacts_boot_under_tcg_and_answer_http() {
    let kernel = Path::new("/opt/away-guest/vmlinuz");
    let modules = Path::new("/opt/away-guest/modules");
    if !require(kernel.exists(), "guest kernel /opt/away-guest/vmlinuz (deploy/install.sh)")
        || !require(modules.is_dir(), "guest NIC modules in /opt/away-guest/modules (deploy/install.sh)")
        || !require(Path::new("/bin/busybox").exists(), "/bin/busybox (busybox-static)")
        || !require(run("sh", &["-c", "command -v qemu-system-x86_64"]).0, "qemu-system-x86_64")
    {
        return;
    }
    let out = workspace_root().join("target/away-e2e/vm");
    for app in APPS {
        let tar = image_tar(app);
        let art = away_json(&["image", "vm", tar.to_str().unwrap(), "-o", out.to_str().unwrap(), "--json"]);
        let spec = &art["spec"];
        assert_eq!(spec["nic"], "virtio-net-pci");
        let port = free_port();
        let log = out.join(format!("{app}.console.log"));
        let console = std::fs::File::create(&log).unwrap();
        // KVM hangs on these machines: always TCG.
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-kernel"])
            .arg(art["kernel"].as_str().unwrap())
            .arg("-initrd")
            .arg(art["initrd"].as_str().unwrap())
            .args(["-append", spec["cmdline"].as_str().unwrap()])
            .args([
                "-netdev",
                &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:{}", spec["guest_port"].as_u64().unwrap_or(8080)),
            ])
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("start qemu-system-x86_64");
        let _qemu = Qemu(child);
        let start = Instant::now();
        if wait_http(port, Duration::from_secs(90)).is_none() {
            panic!(
                "{app} VM: no HTTP answer on 127.0.0.1:{port}; console:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        println!("{app} VM answered over HTTP {:.1} s after qemu started", start.elapsed().as_secs_f64());
        check_app_http(app, port, "VM");
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(console.contains("away-init: starting"), "{console}");
        let (_, log_needle) = app_facts(app);
        let console =
            wait_log(|| std::fs::read_to_string(&log).unwrap_or_default(), log_needle, Duration::from_secs(15));
        assert!(console.contains(log_needle), "{app} VM console lacks {log_needle:?}:\n{console}");
    }
}
