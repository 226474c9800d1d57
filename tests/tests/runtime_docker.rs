//! The Docker backend of the `Runtime` trait against the real dockerd: each lab app runs
//! and answers, stop and remove leave nothing behind, bad input is refused before
//! anything is created, and a checkpointed counter continues its count after a restore.
//!
//! Every container is named `e2e-docker-<what>-<pid>` and removed again on drop, also
//! when a test fails. The images (`away-e2e-docker/<app>:test`) stay loaded for reuse.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use away_e2e::{free_port, require, require_root, require_socket, workspace_root};
use away_model::{PortMapping, Resources, WorkloadKind, WorkloadSpec, WorkloadState};
use away_runtime::docker::DockerRuntime;
use away_runtime::store::read_resolved;
use away_runtime::{CheckpointOptions, ResolvedImage, RestoreRequest, RunRequest, Runtime, RuntimeError};
use futures_util::StreamExt;

const DOCKERD: &str = "/run/docker.sock";

fn ready() -> bool {
    require_root() && require_socket(DOCKERD, "dockerd")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn docker() -> DockerRuntime {
    DockerRuntime::connect(DOCKERD.as_ref()).await.unwrap_or_else(|e| panic!("connect to {DOCKERD}: {e}"))
}

/// Build the app's image once per test process (tests share it).
fn image(app: &str) -> ResolvedImage {
    static BUILT: OnceLock<Mutex<()>> = OnceLock::new();
    let _one_at_a_time = BUILT.get_or_init(|| Mutex::new(())).lock().unwrap_or_else(|e| e.into_inner());
    let out = workspace_root().join("target/away-e2e/runtime-docker");
    let tar = out.join(format!("{app}.tar"));
    if !built_this_run(app) {
        let opts = away_image::BuildOptions {
            tag: Some(format!("away-e2e-docker/{app}:test")),
            cargo_quiet: true,
            ..Default::default()
        };
        let started = Instant::now();
        let (_, path, _) = away_image::build_to_dir(&workspace_root().join("images").join(app), &out, &opts, &|_| {})
            .unwrap_or_else(|e| panic!("build image {app}: {e}"));
        assert_eq!(path, tar);
        println!("built {} in {:?}", tar.display(), started.elapsed());
    }
    read_resolved(&tar, None).unwrap_or_else(|e| panic!("read {}: {e}", tar.display()))
}

/// True once an app was asked for in this process.
fn built_this_run(app: &str) -> bool {
    static SEEN: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap_or_else(|e| e.into_inner());
    if seen.iter().any(|a| a == app) {
        return true;
    }
    seen.push(app.to_string());
    false
}

fn unique(what: &str) -> String {
    format!("e2e-docker-{what}-{}", std::process::id())
}

fn spec(name: &str, image: &ResolvedImage, host_port: Option<u16>) -> WorkloadSpec {
    WorkloadSpec {
        name: name.to_string(),
        image: image.reference.clone(),
        kind: WorkloadKind::Container,
        command: None,
        env: Default::default(),
        ports: host_port.map(|p| PortMapping { container: 8080, host: Some(p) }).into_iter().collect(),
        resources: Resources::default(),
        placement: Default::default(),
        labels: Default::default(),
        user: None,
        capabilities: Default::default(),
        seccomp: Default::default(),
        disk: None,
        volumes: Vec::new(),
        network: None,
        overlay: None,
    }
}

/// Force-removes the named containers on drop (only these: never anything else).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new(away_e2e::docker_cli()).args(["rm", "-f", name]).output();
        }
    }
}

/// Names of containers that carry our label for `name` (running or not).
fn containers_labelled(name: &str) -> Vec<String> {
    let out = Command::new(away_e2e::docker_cli())
        .args(["ps", "-a", "--format", "{{.Names}}", "--filter", &format!("label=away.workload={name}")])
        .output()
        .expect("run docker ps");
    assert!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// Whether any container (labelled or not) has this name.
fn container_exists(name: &str) -> bool {
    Command::new(away_e2e::docker_cli())
        .args(["inspect", "--type", "container", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One HTTP/1.0 GET; the body when the answer is 200.
fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

/// Poll GET until it answers 200.
async fn wait_get(port: u16, path: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let p = path.to_string();
        if let Some(body) = tokio::task::spawn_blocking(move || get(port, &p)).await.unwrap() {
            return body;
        }
        assert!(start.elapsed() < timeout, "no HTTP answer on 127.0.0.1:{port}{path} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn json_u64(body: &str, key: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {body}"))
}

/// All log output so far.
async fn logs_now(rt: &DockerRuntime, name: &str) -> String {
    let mut stream = rt.logs(name, false).await.unwrap();
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.extend(chunk.unwrap());
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// Follow the log until `needle` shows up.
async fn follow_until(rt: &DockerRuntime, name: &str, needle: &str, timeout: Duration) -> String {
    let mut stream = rt.logs(name, true).await.unwrap();
    let mut text = String::new();
    let found = tokio::time::timeout(timeout, async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "{name}: {needle:?} not in the followed log within {timeout:?}:\n{text}");
    text
}

/// Run one lab app through the trait, check that it works, then stop and remove it.
fn app_runs_and_answers(app: &str) {
    if !ready() {
        return;
    }
    let image = image(app);
    let name = unique(app);
    let _cleanup = Cleanup(vec![name.clone()]);
    rt().block_on(async {
        let rt = docker().await;
        let port = free_port();
        let mut spec = spec(&name, &image, Some(port));
        if app == "memload" {
            spec.env.insert("MEMLOAD_INTERVAL_MS".into(), "200".into());
        }
        let started = Instant::now();
        let st = rt.run(&RunRequest { spec, image: image.clone() }).await.unwrap_or_else(|e| panic!("run {app}: {e}"));
        println!("{app}: run took {:?}", started.elapsed());
        assert_eq!(st.state, WorkloadState::Running, "{st:?}");
        assert_eq!(st.image, image.reference);
        assert!(st.pid.is_some_and(|p| p > 1), "{st:?}");
        assert_eq!(st.ports, vec![format!("{port}:8080")]);
        assert!(rt.list().await.unwrap().iter().any(|w| w.name == name && w.state == WorkloadState::Running));

        match app {
            "counter" => {
                let body = wait_get(port, "/", Duration::from_secs(30)).await;
                let first = json_u64(&body, "count");
                tokio::time::sleep(Duration::from_millis(600)).await;
                let later = json_u64(&wait_get(port, "/", Duration::from_secs(10)).await, "count");
                assert!(later > first, "count does not advance: {first} -> {later}");
                follow_until(&rt, &name, "counter: count=", Duration::from_secs(10)).await;
            }
            "labdesk" => {
                let page = wait_get(port, "/", Duration::from_secs(30)).await;
                assert!(page.to_lowercase().contains("<html"), "{page}");
                wait_get(port, "/state", Duration::from_secs(10)).await;
                assert!(logs_now(&rt, &name).await.contains("labdesk: started"));
            }
            "memload" => {
                let log = follow_until(&rt, &name, "memload: tick=", Duration::from_secs(20)).await;
                println!("memload log: {}", log.lines().last().unwrap_or_default());
            }
            _ => unreachable!(),
        }

        let t = Instant::now();
        rt.stop(&name, Duration::from_secs(5)).await.unwrap();
        println!("{app}: stop took {:?}", t.elapsed());
        let st = rt.status(&name).await.unwrap();
        assert_eq!(st.state, WorkloadState::Stopped, "{st:?}");
        assert!(st.exit_code.is_some(), "{st:?}");
        rt.remove(&name).await.unwrap();
        assert!(matches!(rt.status(&name).await, Err(RuntimeError::NotFound { .. })));
        assert!(!rt.list().await.unwrap().iter().any(|w| w.name == name));
        assert_eq!(containers_labelled(&name), Vec::<String>::new());
    });
}

#[test]
fn counter_runs_and_answers() {
    app_runs_and_answers("counter");
}

#[test]
fn labdesk_runs_and_answers() {
    app_runs_and_answers("labdesk");
}

#[test]
fn memload_runs_and_logs() {
    app_runs_and_answers("memload");
}

#[test]
fn remove_kills_a_running_workload_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let image = image("counter");
    let name = unique("remove");
    let _cleanup = Cleanup(vec![name.clone()]);
    rt().block_on(async {
        let rt = docker().await;
        rt.run(&RunRequest { spec: spec(&name, &image, None), image: image.clone() }).await.unwrap();
        rt.remove(&name).await.unwrap();
        assert!(!container_exists(&name));
        assert_eq!(containers_labelled(&name), Vec::<String>::new());
        // nothing left to stop, remove or read
        assert!(matches!(rt.stop(&name, Duration::from_secs(1)).await, Err(RuntimeError::NotFound { .. })));
        assert!(matches!(rt.remove(&name).await, Err(RuntimeError::NotFound { .. })));
        assert!(matches!(rt.logs(&name, false).await, Err(RuntimeError::NotFound { .. })));
    });
}

#[test]
fn bad_input_is_refused_and_creates_nothing() {
    if !ready() {
        return;
    }
    let counter = image("counter");
    let tmp = tempfile::tempdir().unwrap();
    let name = unique("bad");
    let _cleanup = Cleanup(vec![name.clone()]);
    rt().block_on(async {
        // dockerd down: a socket path where nothing listens (the real dockerd keeps running)
        let missing = tmp.path().join("no-dockerd.sock");
        match DockerRuntime::connect(&missing).await {
            Err(e @ RuntimeError::Unavailable { .. }) => {
                assert!(e.to_string().contains(&missing.display().to_string()), "{e}")
            }
            other => panic!("connect to a missing socket: {other:?}"),
        }

        let rt = docker().await;
        let health = rt.health().await;
        // the version the running dockerd reports (20.10 on the debian12 profile, 28 on current)
        let cli = std::process::Command::new(away_e2e::docker_cli())
            .args(["version", "-f", "{{.Server.Version}}"])
            .output()
            .unwrap();
        let server = String::from_utf8_lossy(&cli.stdout).trim().to_string();
        assert!(
            health.healthy && !server.is_empty() && health.version == server,
            "{health:?} vs docker version {server:?}"
        );

        // an image whose tar is missing, and one whose tar is garbage
        let mut missing_tar = counter.clone();
        missing_tar.reference = "docker.io/away-e2e-docker/missing:never".into();
        missing_tar.tar = tmp.path().join("missing.tar");
        let mut corrupt = missing_tar.clone();
        corrupt.tar = tmp.path().join("corrupt.tar");
        std::fs::write(&corrupt.tar, b"this is not a tar").unwrap();
        for image in [missing_tar, corrupt] {
            let err = rt.run(&RunRequest { spec: spec(&name, &image, None), image: image.clone() }).await.unwrap_err();
            assert!(matches!(&err, RuntimeError::Image { reference, .. } if *reference == image.reference), "{err:?}");
            assert!(err.to_string().contains("away-e2e-docker/missing:never"), "{err}");
            println!("refused: {err}");
            assert!(!container_exists(&name));
        }

        // more memory than the host has
        let mut huge = spec(&name, &counter, None);
        huge.resources.memory = "1Ti".parse().unwrap();
        let err = rt.run(&RunRequest { spec: huge, image: counter.clone() }).await.unwrap_err();
        assert!(matches!(&err, RuntimeError::Invalid { field, .. } if field == "resources.memory"), "{err:?}");
        println!("refused: {err}");
        assert!(!container_exists(&name));

        // a second workload with the same name
        rt.run(&RunRequest { spec: spec(&name, &counter, None), image: counter.clone() }).await.unwrap();
        let err = rt.run(&RunRequest { spec: spec(&name, &counter, None), image: counter.clone() }).await.unwrap_err();
        assert!(matches!(&err, RuntimeError::AlreadyExists { name: n, .. } if *n == name), "{err:?}");
        assert_eq!(rt.status(&name).await.unwrap().state, WorkloadState::Running, "the first one is untouched");
        rt.remove(&name).await.unwrap();

        assert!(matches!(rt.status("e2e-docker-no-such-workload").await, Err(RuntimeError::NotFound { .. })));
        assert_eq!(containers_labelled(&name), Vec::<String>::new());
    });
}

/// Docker can checkpoint at all: dockerd runs with --experimental.
async fn checkpoints_work(rt: &DockerRuntime) -> bool {
    let health = rt.health().await;
    require(health.checkpoint, &format!("docker checkpoints (dockerd --experimental): {}", health.detail))
}

/// Since Linux 6.16 getsockopt(SO_PASSCRED/SO_PASSSEC) on an inet socket fails with
/// EOPNOTSUPP, and CRIU before 4.2 then refuses to dump any process with a TCP socket
/// ("sockets: Can't get 1:16 opt", checkpoint-restore/criu#2705). Returns whether the CRIU
/// that dockerd runs (PATH with /usr/local/sbin first, as deploy/ starts it) can, and why not.
fn criu_dumps_inet_sockets() -> (bool, String) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let criu = ["/usr/local/sbin/criu", "/usr/sbin/criu"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("criu");
    let out = Command::new(criu)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let version = out.lines().find_map(|l| l.strip_prefix("Version:")).map(str::trim).unwrap_or("?").to_string();
    let num = |s: &str| -> (u32, u32) {
        let mut it = s.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let ok = num(kernel.trim()) < (6, 16) || num(&version) >= (4, 2);
    let why = format!(
        "CRIU >= 4.2 on kernel {} (found CRIU {version} at {criu}: it cannot dump TCP sockets on Linux >= 6.16, checkpoint-restore/criu#2705)",
        kernel.trim()
    );
    (ok, why)
}

/// Tick numbers in memload's log lines (`memload: tick=N ...`).
fn ticks(log: &str) -> Vec<u64> {
    log.lines().filter_map(|l| l.split("tick=").nth(1)?.split_whitespace().next()?.parse().ok()).collect()
}

/// Checkpoint and restore through Docker of a process without sockets (memload with its
/// status endpoint off): its tick count continues after the restore.
#[test]
fn checkpoint_and_restore_continue_memload_ticks() {
    if !ready() {
        return;
    }
    let image = image("memload");
    let name = unique("ckpt-memload");
    let _cleanup = Cleanup(vec![name.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let rt = docker().await;
        if !checkpoints_work(&rt).await {
            return;
        }
        let mut spec = spec(&name, &image, None);
        for (k, v) in [("MEMLOAD_PORT", "0"), ("MEMLOAD_INTERVAL_MS", "100"), ("MEMLOAD_SIZE", "16Mi")] {
            spec.env.insert(k.into(), v.into());
        }
        rt.run(&RunRequest { spec, image: image.clone() }).await.unwrap();
        follow_until(&rt, &name, "memload: tick=10 ", Duration::from_secs(20)).await;

        let dir = tmp.path().join("memload-1");
        let t = Instant::now();
        let archive =
            rt.checkpoint(&name, &CheckpointOptions { dir: dir.clone(), ..Default::default() }).await.unwrap();
        println!("checkpoint took {:?}: {} bytes in {}", t.elapsed(), archive.bytes, archive.dir.display());
        assert!(archive.bytes > 16 << 20, "16 MiB of touched memory is in the dump: {archive:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&archive.dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(rt.status(&name).await.unwrap().state, WorkloadState::Stopped);
        let last = *ticks(&logs_now(&rt, &name).await).last().expect("ticks before the checkpoint");

        rt.remove(&name).await.unwrap();
        let t = Instant::now();
        let st = rt.restore(&RestoreRequest { archive, image: image.clone(), close_connections: false }).await.unwrap();
        println!("restore took {:?}", t.elapsed());
        assert_eq!(st.state, WorkloadState::Running, "{st:?}");
        let log = follow_until(&rt, &name, "memload: tick=", Duration::from_secs(20)).await;
        let first = ticks(&log)[0];
        println!("tick {last} before the checkpoint, {first} first after the restore");
        assert!(first > last, "memload restarted: tick {last} before, {first} after:\n{log}");
        assert!(!log.contains("memload: started"), "a new process started:\n{log}");

        rt.remove(&name).await.unwrap();
        assert_eq!(containers_labelled(&name), Vec::<String>::new());
    });
}

/// Checkpoint and restore of the counter (an HTTP server, so a TCP socket in the dump).
#[test]
fn checkpoint_and_restore_continue_the_count() {
    if !ready() {
        return;
    }
    let image = image("counter");
    let name = unique("ckpt");
    let _cleanup = Cleanup(vec![name.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let rt = docker().await;
        if !checkpoints_work(&rt).await {
            return;
        }
        let (criu_ok, why) = criu_dumps_inet_sockets();
        if !require(criu_ok, &why) {
            return;
        }
        let port = free_port();
        rt.run(&RunRequest { spec: spec(&name, &image, Some(port)), image: image.clone() }).await.unwrap();
        let body = wait_get(port, "/", Duration::from_secs(30)).await;
        let started_ms = json_u64(&body, "started_unix_ms");
        // let it count for a while, so that a restart from 0 is plain to see
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = json_u64(&wait_get(port, "/", Duration::from_secs(10)).await, "count");
        assert!(before >= 10, "counter counts too slowly: {before}");

        let dir: PathBuf = tmp.path().join("archives").join("counter-1");
        let t = Instant::now();
        let archive =
            rt.checkpoint(&name, &CheckpointOptions { dir: dir.clone(), ..Default::default() }).await.unwrap();
        println!("checkpoint took {:?}: {} bytes in {}", t.elapsed(), archive.bytes, archive.dir.display());
        assert_eq!(archive.dir, dir.canonicalize().unwrap());
        assert!(archive.bytes > 0 && archive.dir.join("inventory.img").is_file(), "{archive:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&archive.dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!((archive.workload.as_str(), archive.image.as_str()), (name.as_str(), image.reference.as_str()));
        assert_eq!(archive.spec.name, name);
        assert_eq!(
            rt.status(&name).await.unwrap().state,
            WorkloadState::Stopped,
            "checkpoint without leave_running stops it"
        );

        // the restored workload takes the name over, as after a move
        rt.remove(&name).await.unwrap();
        let t = Instant::now();
        let st = rt
            .restore(&RestoreRequest { archive: archive.clone(), image: image.clone(), close_connections: false })
            .await
            .unwrap();
        println!("restore took {:?}", t.elapsed());
        assert_eq!(st.state, WorkloadState::Running, "{st:?}");
        assert_eq!(st.ports, vec![format!("{port}:8080")]);

        let body = wait_get(port, "/", Duration::from_secs(30)).await;
        let after = json_u64(&body, "count");
        println!("count {before} before the checkpoint, {after} after the restore");
        assert!(after >= before, "the count restarted: {before} before, {after} after");
        assert_eq!(json_u64(&body, "started_unix_ms"), started_ms, "a new process answered: {body}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let later = json_u64(&wait_get(port, "/", Duration::from_secs(10)).await, "count");
        assert!(later > after, "the restored counter does not count: {after} -> {later}");

        // restoring again under the same name is refused, and the running one stays
        let err =
            rt.restore(&RestoreRequest { archive, image: image.clone(), close_connections: false }).await.unwrap_err();
        assert!(matches!(err, RuntimeError::AlreadyExists { .. }), "{err:?}");
        assert_eq!(rt.status(&name).await.unwrap().state, WorkloadState::Running);

        rt.remove(&name).await.unwrap();
        assert_eq!(containers_labelled(&name), Vec::<String>::new());
    });
}
