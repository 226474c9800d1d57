//! The QEMU backend against the real qemu-system-x86_64, under the accelerator the
//! host's KVM probe chose (TCG on hosts where KVM hangs): each lab app boots as a VM
//! and answers over its forwarded port, stop/remove leave no process and no state,
//! bad input leaves nothing, and a checkpoint/restore keeps the counter's count.
//!
//! VM tests take a shared lock: under TCG two cores barely boot one guest quickly,
//! and parallel boots would starve each other past the timeouts.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use away_e2e::{free_port, http_get, require_vm_host, wait_for, workspace_root};
use away_model::{Accel, ByteSize, PortMapping, Resources, WorkloadSpec, WorkloadState};
use away_runtime::host::HostPaths;
use away_runtime::qemu::{QemuRuntime, STATE_FILE};
use away_runtime::store::{read_resolved, ResolvedImage};
use away_runtime::{CheckpointOptions, ImageStore, RestoreRequest, RunRequest, Runtime, RuntimeError};
use futures_util::StreamExt;

/// A TCG boot to /init takes 8-11 s on an idle host; allow for a loaded one.
const BOOT_SECS: u64 = 90;

static VM_LOCK: Mutex<()> = Mutex::new(());

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn ready() -> bool {
    require_vm_host()
}

/// Image of a lab app, built once per test process with away-image directly (no CLI).
fn image(app: &str) -> ResolvedImage {
    static BUILD: Mutex<()> = Mutex::new(());
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let out = workspace_root().join("target").join("away-e2e-qemu-images");
    let tar = out.join(format!("{app}.tar"));
    if !tar.is_file() || std::env::var_os("AWAY_E2E_REBUILD").is_some() {
        let ctx = workspace_root().join("images").join(app);
        let opts = away_image::BuildOptions { tag: Some(format!("away-e2e/{app}:qemu")), ..Default::default() };
        away_image::build_to_dir(&ctx, &out, &opts, &|_| {}).unwrap_or_else(|e| panic!("build images/{app}: {e}"));
    }
    read_resolved(&tar, None).unwrap_or_else(|e| panic!("read {}: {e}", tar.display()))
}

/// A runtime with its own state directory (short path: QMP sockets have a 108-byte limit).
struct Harness {
    tokio: tokio::runtime::Runtime,
    rt: QemuRuntime,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        let tokio = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::Builder::new().prefix("away-qemu-e2e").tempdir().unwrap();
        let rt = tokio.block_on(QemuRuntime::detect(dir.path().to_path_buf(), HostPaths::default()));
        eprintln!("qemu runtime: accel {} ({})", rt.accel(), tokio.block_on(rt.health()).detail);
        Harness { tokio, rt, dir }
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.tokio.block_on(f)
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// PIDs of live QEMUs whose command line names this harness's state directory.
    fn qemu_pids(&self) -> Vec<u32> {
        let needle = self.dir.path().display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmd).contains(&needle)
            })
            .collect()
    }

    fn log(&self, name: &str) -> String {
        let mut s = self.block(self.rt.logs(name, false)).expect("logs");
        let mut out = Vec::new();
        while let Some(chunk) = self.block(s.next()) {
            out.extend(chunk.expect("log chunk"));
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Kill only the QEMUs this test started (found by their state directory), also on panic.
impl Drop for Harness {
    fn drop(&mut self) {
        for pid in self.qemu_pids() {
            eprintln!("cleanup: killing qemu pid {pid}");
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

fn spec(name: &str, guest_port: u16, host_port: u16) -> WorkloadSpec {
    WorkloadSpec {
        name: name.into(),
        image: "unused".into(),
        kind: away_model::WorkloadKind::Vm,
        command: None,
        env: Default::default(),
        ports: vec![PortMapping { container: guest_port, host: Some(host_port) }],
        resources: Resources { memory: ByteSize::mib(256), cpus: 1.0 },
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

fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

fn count(port: u16) -> Option<u64> {
    http_get(port, "/count")?.trim().parse().ok()
}

/// Each lab app boots as a VM and answers on its forwarded port; stop and remove
/// leave no QEMU process and no state directory.
#[test]
fn lab_apps_run_as_vms() {
    if !ready() {
        return;
    }
    let h = Harness::new();
    for (app, path, log_line) in [
        ("counter", "/count", "counter: started"),
        ("labdesk", "/state", "labdesk: started"),
        ("memload", "/", "memload: tick="),
    ] {
        let img = image(app);
        let _vm = vm_lock();
        let name = unique(&format!("e2e-{app}"));
        let port = free_port();
        let req = RunRequest { spec: spec(&name, 8080, port), image: img.clone() };
        let t0 = Instant::now();
        let st = h.block(h.rt.run(&req)).unwrap_or_else(|e| panic!("run {app}: {e}"));
        assert_eq!(st.state, WorkloadState::Running, "{st:?}");
        assert!(
            st.pid.is_some_and(|p| h.qemu_pids().contains(&p)),
            "status pid {:?} is not our qemu ({:?})",
            st.pid,
            h.qemu_pids()
        );
        assert!(st.detail.contains(&h.rt.accel().to_string()), "detail names the accel: {}", st.detail);
        assert_eq!(st.ports, vec![format!("{port}:8080")]);
        let record = std::fs::read_to_string(h.vm_dir(&name).join("spec.json")).unwrap();
        assert!(record.contains(&format!("\"accel\": \"{}\"", h.rt.accel())), "{record}");
        assert!(h.rt.accel() == Accel::Kvm || record.contains("\"-accel\",\n    \"tcg\""), "{record}");

        // the same name again is refused before anything starts
        let again = h.block(h.rt.run(&req));
        assert!(matches!(again, Err(RuntimeError::AlreadyExists { .. })), "{again:?}");

        let body = wait_for(BOOT_SECS, || http_get(port, path));
        let booted = t0.elapsed();
        assert!(
            body.is_some(),
            "{app} did not answer GET {path} on port {port} within {BOOT_SECS} s; serial log:\n{}",
            h.log(&name)
        );
        eprintln!("{app}: answered over http {:.1} s after run ({})", booted.as_secs_f64(), h.rt.accel());
        let seen = wait_for(30, || h.log(&name).contains(log_line).then_some(()));
        assert!(seen.is_some(), "{app}: serial log lacks {log_line:?}:\n{}", h.log(&name));
        if app == "counter" {
            let body = http_get(port, "/").unwrap();
            assert!(body.contains("\"count\""), "{body}");
        }
        let listed = h.block(h.rt.list()).unwrap();
        assert!(listed.iter().any(|s| s.name == name && s.state == WorkloadState::Running), "{listed:?}");

        h.block(h.rt.stop(&name, Duration::from_secs(1))).unwrap_or_else(|e| panic!("stop {name}: {e}"));
        let st = h.block(h.rt.status(&name)).unwrap();
        assert_eq!(st.state, WorkloadState::Stopped, "{st:?}");
        assert!(h.qemu_pids().is_empty(), "qemu still running after stop: {:?}", h.qemu_pids());
        // a stopped vm's log is still readable, and a following reader ends
        let followed = h.block(async {
            let mut s = h.rt.logs(&name, true).await.unwrap();
            let mut n = 0;
            while let Some(c) =
                tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("follow ends once the vm is gone")
            {
                n += c.unwrap().len();
            }
            n
        });
        assert!(followed > 0);
        h.block(h.rt.remove(&name)).unwrap_or_else(|e| panic!("remove {name}: {e}"));
        assert!(!h.vm_dir(&name).exists(), "state dir left behind");
        assert!(matches!(h.block(h.rt.status(&name)), Err(RuntimeError::NotFound { .. })));
    }
    // remove of a running VM kills it too
    let img = image("counter");
    let _vm = vm_lock();
    let name = unique("e2e-rm");
    h.block(h.rt.run(&RunRequest { spec: spec(&name, 8080, free_port()), image: img })).unwrap();
    h.block(h.rt.remove(&name)).unwrap();
    assert!(h.qemu_pids().is_empty() && !h.vm_dir(&name).exists(), "remove left {:?}", h.qemu_pids());
}

/// Unknown images and impossible sizes are refused, and nothing is left behind.
#[test]
fn bad_input_leaves_nothing() {
    if !ready() {
        return;
    }
    let h = Harness::new();
    let store = ImageStore::new(h.dir.path());
    let unknown = store.resolve("away/does-not-exist:latest");
    assert!(matches!(unknown, Err(RuntimeError::Image { .. })), "{unknown:?}");

    // An image whose tar is gone (digest never seen, so no cached artifact either).
    let mut gone = image("counter");
    gone.tar = h.dir.path().join("missing.tar");
    gone.manifest_digest = format!("sha256:{:064x}", std::process::id() as u128 * 7919 + 1);
    gone.reference = "away-e2e/gone:latest".into();
    let name = unique("e2e-noimage");
    let err = h.block(h.rt.run(&RunRequest { spec: spec(&name, 8080, free_port()), image: gone })).unwrap_err();
    assert!(matches!(err, RuntimeError::Image { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.tar"), "error names the file: {err}");
    assert!(!h.vm_dir(&name).exists());

    let name = unique("e2e-huge");
    let mut big = spec(&name, 8080, free_port());
    big.resources.memory = ByteSize(1 << 40);
    let err = h.block(h.rt.run(&RunRequest { spec: big, image: image("counter") })).unwrap_err();
    match &err {
        RuntimeError::Invalid { field, .. } => assert_eq!(field, "resources.memory"),
        other => panic!("1Ti memory: expected Invalid, got {other:?}"),
    }
    assert!(!h.vm_dir(&name).exists());
    assert!(h.qemu_pids().is_empty());
    assert!(h.block(h.rt.list()).unwrap().is_empty());
}

/// Checkpoint the counter VM to a file and restore it: the count goes on from at least
/// the value it had.
#[test]
fn checkpoint_and_restore_keep_the_count() {
    if !ready() {
        return;
    }
    let h = Harness::new();
    let img = image("counter");
    let _vm = vm_lock();
    let name = unique("e2e-ckpt");
    let port = free_port();
    h.block(h.rt.run(&RunRequest { spec: spec(&name, 8080, port), image: img.clone() })).unwrap();
    let before = wait_for(BOOT_SECS, || count(port).filter(|c| *c >= 20));
    let before = before.unwrap_or_else(|| panic!("counter never reached 20; serial log:\n{}", h.log(&name)));

    let ckpt = tempfile::Builder::new().prefix("away-qemu-ckpt").tempdir().unwrap();
    let dir = ckpt.path().join("c1");
    let t0 = Instant::now();
    let archive = h
        .block(h.rt.checkpoint(&name, &CheckpointOptions { dir: dir.clone(), ..Default::default() }))
        .unwrap_or_else(|e| panic!("checkpoint: {e}"));
    eprintln!("checkpoint: {} bytes in {:.2} s", archive.bytes, t0.elapsed().as_secs_f64());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(dir.join(STATE_FILE).is_file() && archive.bytes > 0, "{archive:?}");
    assert_eq!(archive.spec.name, name);
    assert_eq!(h.block(h.rt.status(&name)).unwrap().state, WorkloadState::Stopped);
    assert!(h.qemu_pids().is_empty(), "checkpoint without leave_running must stop the vm");
    h.block(h.rt.remove(&name)).unwrap();

    let t0 = Instant::now();
    let st = h
        .block(h.rt.restore(&RestoreRequest { archive: archive.clone(), image: img, close_connections: false }))
        .unwrap_or_else(|e| panic!("restore: {e}"));
    assert_eq!(st.state, WorkloadState::Running, "{st:?}");
    assert!(st.detail.contains("restored from"), "{}", st.detail);
    let after = wait_for(30, || count(port))
        .unwrap_or_else(|| panic!("restored counter does not answer; serial log:\n{}", h.log(&name)));
    eprintln!(
        "restore: answering {:.2} s after restore; count {before} before, {after} after",
        t0.elapsed().as_secs_f64()
    );
    assert!(after >= before, "count went back: {before} before the checkpoint, {after} after restore");
    let later = wait_for(10, || count(port).filter(|c| *c > after));
    assert!(later.is_some(), "restored counter is not counting");

    h.block(h.rt.remove(&name)).unwrap();
    assert!(h.qemu_pids().is_empty() && !h.vm_dir(&name).exists());
}
