//! QEMU live migration between two QEMU runtimes (two state directories on this host,
//! standing in for two nodes), over TCP on 127.0.0.1: the counter VM keeps its count
//! and its start time, the source QEMU goes, a migration that cannot finish in time is
//! cancelled with the VM still counting on the source, and the capabilities
//! (auto-converge + xbzrle, post-copy, multifd) each carry a VM across over QEMU's TLS
//! with node certificates; a destination's port refuses a source with another node's
//! certificate or none, and a source refuses a destination that is not its node.
//!
//! Both QEMUs run on one host, so the destination forwards the guest's port from a
//! different host port (hostfwd is netdev configuration, not migrated state).
//! VM tests take a shared lock: under TCG two cores boot one guest at a time well.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use away_e2e::{free_port, http_get, require_vm_host, wait_for, workspace_root};
use away_migrate::vm::{
    live_migrate, migrate_vm, migrate_vm_detailed, prepare_destination, LocalTls, VmMigrateError, VmMigrationOptions,
    VmProgress, VmTls,
};
use away_model::{ByteSize, MigrationMode, PortMapping, Resources, WorkloadSpec, WorkloadState};
use away_runtime::host::HostPaths;
use away_runtime::qemu::QemuRuntime;
use away_runtime::store::{read_resolved, ResolvedImage};
use away_runtime::{RunRequest, Runtime};

/// A TCG boot to /init takes 8-11 s on an idle host; allow for a loaded one.
const BOOT_SECS: u64 = 90;
const GUEST_PORT: u16 = 8080;

static VM_LOCK: Mutex<()> = Mutex::new(());

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn ready() -> bool {
    require_vm_host()
}

/// The counter image, built once with away-image directly (shared with runtime_qemu).
fn counter_image() -> ResolvedImage {
    static BUILD: Mutex<()> = Mutex::new(());
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let out = workspace_root().join("target").join("away-e2e-qemu-images");
    let tar = out.join("counter.tar");
    if !tar.is_file() || std::env::var_os("AWAY_E2E_REBUILD").is_some() {
        let ctx = workspace_root().join("images").join("counter");
        let opts = away_image::BuildOptions { tag: Some("away-e2e/counter:qemu".into()), ..Default::default() };
        away_image::build_to_dir(&ctx, &out, &opts, &|_| {}).unwrap_or_else(|e| panic!("build images/counter: {e}"));
    }
    read_resolved(&tar, None).unwrap_or_else(|e| panic!("read {}: {e}", tar.display()))
}

/// Two runtimes ("node a" and "node b") with their own state directories (short
/// paths: QMP sockets have a 108-byte limit).
struct Harness {
    tokio: tokio::runtime::Runtime,
    a: QemuRuntime,
    b: QemuRuntime,
    dir: tempfile::TempDir,
    /// The nodes' CA (in `dir`): identities of node-a, node-b and others.
    ca: away_identity::Ca,
}

impl Harness {
    fn new() -> Harness {
        let tokio = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::Builder::new().prefix("away-mig").tempdir().unwrap();
        let a = tokio.block_on(QemuRuntime::detect(dir.path().join("a"), HostPaths::default()));
        let b = tokio.block_on(QemuRuntime::detect(dir.path().join("b"), HostPaths::default()));
        eprintln!("qemu runtimes: accel {} / {}", a.accel(), b.accel());
        let ca = away_identity::Ca::load_or_create(&dir.path().join("ca")).unwrap();
        Harness { tokio, a, b, dir, ca }
    }

    /// An identity of node `node` from the harness's CA.
    fn identity(&self, node: &str) -> std::sync::Arc<away_identity::Identity> {
        std::sync::Arc::new(self.ca.issue_self(node, &[]).unwrap())
    }

    /// Both ends' TLS of a move from node `from` to node `to`.
    fn tls(&self, from: &str, to: &str) -> LocalTls {
        LocalTls {
            source: VmTls::new(self.identity(from), to).unwrap(),
            destination: VmTls::new(self.identity(to), from).unwrap(),
        }
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.tokio.block_on(f)
    }

    /// PIDs of live QEMUs whose command line names `dir`.
    fn qemu_pids_in(dir: &Path) -> Vec<u32> {
        let needle = format!("{}/", dir.display());
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

    fn serial(rt: &QemuRuntime, name: &str) -> String {
        std::fs::read_to_string(rt.files(name).serial_log()).unwrap_or_else(|e| format!("(no serial log: {e})"))
    }

    /// Boot the counter on `rt` forwarding `port`, and wait until it has counted a bit.
    fn boot_counter(&self, rt: &QemuRuntime, name: &str, port: u16, mib: u64, image: &ResolvedImage) -> u64 {
        let t0 = Instant::now();
        self.block(rt.run(&RunRequest { spec: spec(name, port, mib), image: image.clone() }))
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        let c = wait_for(BOOT_SECS, || count(port).filter(|c| *c >= 10))
            .unwrap_or_else(|| panic!("counter {name} never reached 10; serial:\n{}", Self::serial(rt, name)));
        eprintln!("{name}: counting ({c}) {:.1} s after run", t0.elapsed().as_secs_f64());
        c
    }
}

/// Kill only the QEMUs this test started (found by their state directory), also on panic.
impl Drop for Harness {
    fn drop(&mut self) {
        for pid in Self::qemu_pids_in(self.dir.path()) {
            eprintln!("cleanup: killing qemu pid {pid}");
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

fn spec(name: &str, host_port: u16, mib: u64) -> WorkloadSpec {
    WorkloadSpec {
        name: name.into(),
        image: "unused".into(),
        kind: away_model::WorkloadKind::Vm,
        command: None,
        env: [("COUNTER_PORT".to_string(), GUEST_PORT.to_string()), ("COUNTER_INTERVAL_MS".into(), "50".into())]
            .into_iter()
            .collect(),
        ports: vec![PortMapping { container: GUEST_PORT, host: Some(host_port) }],
        resources: Resources { memory: ByteSize::mib(mib), cpus: 1.0 },
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

/// GET / -> (count, guest pid, started_unix_ms).
fn identity(port: u16) -> Option<(u64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&http_get(port, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["pid"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

fn opts_to(target_port: u16) -> VmMigrationOptions {
    VmMigrationOptions {
        listen_host: "127.0.0.1".into(),
        target_host: "127.0.0.1".into(),
        target_ports: BTreeMap::from([(GUEST_PORT, target_port)]),
        timeout: Duration::from_secs(120),
        ..Default::default()
    }
}

fn print_progress(p: VmProgress) {
    eprintln!(
        "  {:>6.2} s {:<16} pass {} sent {} B, remaining {} B, dirty {} pages/s, {:.0} Mbit/s{}",
        p.elapsed.as_secs_f64(),
        p.status,
        p.pass,
        p.transferred,
        p.remaining,
        p.dirty_pages_rate,
        p.mbps,
        p.cpu_throttle_percent.map(|t| format!(", throttle {t} %")).unwrap_or_default()
    );
}

/// Migrate `name` from `from` to `to` and check the counter went on there (same guest
/// pid and start time, count not lower), the source QEMU and state are gone, and the
/// report has a downtime and bytes. Returns the new host port.
#[allow(clippy::too_many_arguments)]
fn migrate_and_check(
    h: &Harness,
    from: &QemuRuntime,
    to: &QemuRuntime,
    name: &str,
    from_port: u16,
    image: &ResolvedImage,
    mut opts: VmMigrationOptions,
    tls: Option<&LocalTls>,
    label: &str,
) -> (u16, away_migrate::vm::VmMigrationOutcome) {
    let to_port = free_port();
    opts.target_ports = BTreeMap::from([(GUEST_PORT, to_port)]);
    let (_, pid_before, started_before) =
        identity(from_port).unwrap_or_else(|| panic!("{label}: source does not answer GET / on {from_port}"));
    let last_source = count(from_port).expect("source count");
    let listen = free_port();
    let t0 = Instant::now();
    eprintln!("{label}: migrating {name} (count {last_source}) to port {listen}");
    let (report, outcome) = h
        .block(migrate_vm_detailed(from, to, name, image, listen, &opts, tls, print_progress))
        .unwrap_or_else(|e| panic!("{label}: migrate {name}: {e}"));
    let wall = t0.elapsed();
    eprintln!("{label}: report {}", serde_json::to_string_pretty(&report).unwrap());
    eprintln!(
        "{label}: wall {:.0} ms; qemu total {} ms, qemu downtime {} ms, STOP->RESUME {} ms; {} B on the wire, {} B ram, \
         {} passes, postcopy {} ({} page requests), xbzrle {:?} B, max throttle {} %",
        wall.as_secs_f64() * 1000.0,
        outcome.total.as_millis(),
        outcome.qemu_downtime.as_millis(),
        report.downtime_millis,
        outcome.bytes_wire,
        outcome.ram_total,
        outcome.passes,
        outcome.postcopy,
        outcome.postcopy_requests,
        outcome.xbzrle_bytes,
        outcome.max_cpu_throttle_percent,
    );
    assert!(report.ok && report.error.is_none(), "{report:?}");
    assert_eq!(report.mode, MigrationMode::VmLive);
    assert_eq!(report.workload, name);
    // post-copy ran on the destination while pages came: the report says how long
    assert_eq!(report.degraded_millis > 0, outcome.postcopy, "{label}: degraded {} ms", report.degraded_millis);
    let phases: Vec<&str> = report.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(phases, ["prepare-destination", "migrate", "switchover", "cleanup"]);
    assert!(report.downtime_millis > 0, "downtime {report:?}");
    assert!(report.bytes_wire > 0 && report.bytes_raw >= 64 << 20, "bytes {report:?}");
    assert!(outcome.source_stopped_at.is_some(), "no STOP event seen on the source");
    assert!(report.reason.contains("qemu's own downtime"), "{}", report.reason);
    let over = if tls.is_some() { "over tls (mutual" } else { "over plain tcp" };
    assert!(report.reason.contains(over), "{}", report.reason);

    // exactly one instance: the source QEMU and its state are gone, the destination runs
    assert!(
        Harness::qemu_pids_in(&from.files(name).dir).is_empty(),
        "{label}: source qemu still running: {:?}",
        Harness::qemu_pids_in(&from.files(name).dir)
    );
    assert!(!from.files(name).dir.exists(), "{label}: source state dir left behind");
    assert!(http_get(from_port, "/count").is_none(), "{label}: the old port still answers");
    let st = h.block(to.status(name)).unwrap();
    assert_eq!(st.state, WorkloadState::Running, "{st:?}");
    assert_eq!(st.ports, vec![format!("{to_port}:{GUEST_PORT}")]);

    // the same counter goes on: same guest pid and start time, count not lower
    let (after, pid_after, started_after) = wait_for(20, || identity(to_port))
        .unwrap_or_else(|| panic!("{label}: destination does not answer; serial:\n{}", Harness::serial(to, name)));
    eprintln!("{label}: count {last_source} on the source, {after} on the destination");
    assert!(after >= last_source, "{label}: count went back from {last_source} to {after}");
    assert_eq!(started_after, started_before, "{label}: the counter restarted (started_unix_ms changed)");
    assert_eq!(pid_after, pid_before, "{label}: the counter's pid changed");
    assert!(wait_for(10, || count(to_port).filter(|c| *c > after)).is_some(), "{label}: not counting on");
    (to_port, outcome)
}

/// Plain pre-copy: the counter VM moves from node a to node b and goes on counting.
#[test]
fn counter_vm_migrates_and_keeps_counting() {
    if !ready() {
        return;
    }
    let image = counter_image();
    let h = Harness::new();
    let _vm = vm_lock();
    let name = unique("mig");
    let port = free_port();
    h.boot_counter(&h.a, &name, port, 128, &image);
    let (to_port, _) = migrate_and_check(&h, &h.a, &h.b, &name, port, &image, opts_to(0), None, "pre-copy a->b");
    h.block(h.b.remove(&name)).unwrap();
    assert!(http_get(to_port, "/count").is_none());
    assert!(Harness::qemu_pids_in(h.dir.path()).is_empty(), "qemu left: {:?}", Harness::qemu_pids_in(h.dir.path()));
}

/// A migration that cannot finish in time (1 MiB/s for a 256 MiB guest, 3 s limit) is
/// cancelled: the VM keeps counting on the source, the destination QEMU is gone.
#[test]
fn too_slow_migration_is_cancelled_and_the_source_keeps_running() {
    if !ready() {
        return;
    }
    let image = counter_image();
    let h = Harness::new();
    let _vm = vm_lock();
    let name = unique("mig-slow");
    let port = free_port();
    h.boot_counter(&h.a, &name, port, 256, &image);
    let (_, pid_before, started_before) = identity(port).unwrap();
    let dest_port = free_port();
    let opts = VmMigrationOptions {
        bandwidth_limit_bytes_per_s: Some(1 << 20),
        timeout: Duration::from_secs(3),
        ..opts_to(dest_port)
    };
    let t0 = Instant::now();
    let err = h
        .block(migrate_vm(&h.a, &h.b, &name, &image, free_port(), &opts, print_progress))
        .expect_err("a 1 MiB/s migration of 256 MiB cannot finish in 3 s");
    let took = t0.elapsed();
    eprintln!("cancelled after {:.2} s: {err}", took.as_secs_f64());
    let msg = err.to_string();
    assert!(msg.contains(&name) && msg.contains("cancelled") && msg.contains("source running"), "{msg}");
    match &err {
        VmMigrateError::Aborted { report, .. } => {
            eprintln!("report of the failed move: {}", serde_json::to_string(report).unwrap());
            assert!(!report.ok && report.error.is_some(), "{report:?}");
            assert!(report.bytes_wire > 0 && report.bytes_wire < 16 << 20, "bytes sent before the cancel: {report:?}");
            assert_eq!(
                report.phases.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
                ["prepare-destination", "migrate"]
            );
        }
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert!(took < Duration::from_secs(20), "cancel took {took:?}");

    // the destination is gone, the source still runs the same counter and counts on
    assert!(Harness::qemu_pids_in(&h.b.files(&name).dir).is_empty(), "destination qemu still there");
    assert!(!h.b.files(&name).dir.exists(), "destination state dir left behind");
    assert!(http_get(dest_port, "/count").is_none(), "the destination's port answers");
    let st = h.block(h.a.status(&name)).unwrap();
    assert_eq!(st.state, WorkloadState::Running, "{st:?}");
    let (c1, pid, started) = identity(port).expect("source answers after the cancel");
    assert_eq!((pid, started), (pid_before, started_before), "the source counter restarted");
    let c2 = wait_for(10, || count(port).filter(|c| *c > c1));
    assert!(c2.is_some(), "the source stopped counting after the cancel (count {c1})");
    eprintln!("source counts on: {c1} -> {}", c2.unwrap());
    h.block(h.a.remove(&name)).unwrap();
    assert!(Harness::qemu_pids_in(h.dir.path()).is_empty());
}

/// One VM hops a -> b (auto-converge + xbzrle), b -> a (post-copy), a -> b (multifd),
/// each over QEMU's TLS with the nodes' certificates.
#[test]
fn capabilities_each_carry_the_vm() {
    if !ready() {
        return;
    }
    let image = counter_image();
    let h = Harness::new();
    let _vm = vm_lock();
    let name = unique("mig-caps");
    let port = free_port();
    h.boot_counter(&h.a, &name, port, 128, &image);

    // every hop over QEMU's TLS with the nodes' certificates
    let (ab, ba) = (h.tls("node-a", "node-b"), h.tls("node-b", "node-a"));
    let o = VmMigrationOptions { auto_converge: true, xbzrle: true, ..opts_to(0) };
    let (port, _) =
        migrate_and_check(&h, &h.a, &h.b, &name, port, &image, o, Some(&ab), "tls auto-converge+xbzrle a->b");

    // An idle guest converges within a poll after its first pass, so switch at once
    // (pure post-copy): every page moves after the switch, pushed or on demand.
    let o = VmMigrationOptions { postcopy: true, postcopy_after_passes: 0, ..opts_to(0) };
    let (port, out) = migrate_and_check(&h, &h.b, &h.a, &name, port, &image, o, Some(&ba), "tls postcopy b->a");
    assert!(out.postcopy, "post-copy was not started: {out:?}");

    let o = VmMigrationOptions { multifd: Some(2), ..opts_to(0) };
    let (port, _) = migrate_and_check(&h, &h.a, &h.b, &name, port, &image, o, Some(&ab), "tls multifd a->b");

    h.block(h.b.remove(&name)).unwrap();
    assert!(http_get(port, "/count").is_none());
    assert!(Harness::qemu_pids_in(h.dir.path()).is_empty());
}

/// Issue 17, attacker case 5 for QEMU's port: a destination prepared for a move from
/// node-a takes no stream from node "intruder" (a valid certificate of the same CA) nor
/// from a plain TCP source, and a source refuses a destination that is not the node it
/// moves to; each time the VM counts on at the source and the destination never ran it.
/// The control (node-a itself) moves it.
#[test]
fn a_destination_takes_the_stream_only_from_its_source_node() {
    if !ready() {
        return;
    }
    let image = counter_image();
    let h = Harness::new();
    let _vm = vm_lock();
    let name = unique("mig-tls");
    let port = free_port();
    h.boot_counter(&h.a, &name, port, 128, &image);
    let (_, pid_before, started_before) = identity(port).unwrap();
    let opts = VmMigrationOptions { timeout: Duration::from_secs(60), ..opts_to(free_port()) };

    // (source's tls, destination's tls, what the failure must say: from the destination's
    // qemu log, or from the source)
    let from_b = VmTls::new(h.identity("node-b"), "node-a").unwrap();
    // a node-a whose certificate the destination holds revoked (the broker's CRL, as an
    // agent gets it with its heartbeat; QEMU reads it as ca-crl.pem)
    let revoked_a = h.identity("node-a");
    let revoked = away_identity::Revoked {
        serial_hex: away_identity::serial_hex(&revoked_a.cert_pem()).unwrap(),
        revoked_at: std::time::SystemTime::now(),
    };
    let b_with_crl = h.identity("node-b");
    b_with_crl.revocations().set_from_ca(&h.ca.crl_pem(1, &[revoked]).unwrap()).unwrap();
    let cases: [(&str, Option<VmTls>, VmTls, &str); 4] = [
        (
            "a revoked source certificate",
            Some(VmTls::new(revoked_a, "node-b").unwrap()),
            VmTls::new(b_with_crl.clone(), "node-a").unwrap(),
            "The certificate has been revoked",
        ),
        (
            "another node's certificate",
            Some(VmTls::new(h.identity("intruder"), "node-b").unwrap()),
            from_b.clone(),
            "authz check for CN=intruder is denied",
        ),
        ("no certificate (plain tcp)", None, from_b, "TLS handshake failed"),
        (
            "a destination that is not node-b",
            Some(VmTls::new(h.identity("node-a"), "node-b").unwrap()),
            VmTls::new(h.identity("intruder"), "node-a").unwrap(),
            "does not match the hostname node-b.node.away",
        ),
    ];
    for (label, source_tls, dest_tls, says) in cases {
        let listen = free_port();
        let dest_spec = spec(&name, free_port(), 128);
        let mut dest = h
            .block(prepare_destination(&h.b, &dest_spec, &image, listen, &opts, Some(&dest_tls)))
            .unwrap_or_else(|e| panic!("{label}: prepare the destination: {e}"));
        let uri = format!("tcp:127.0.0.1:{listen}");
        let err = h
            .block(live_migrate(&h.a, &name, &uri, &opts, source_tls.as_ref(), print_progress))
            .expect_err(&format!("{label}: the stream was taken"));
        let err = away_model::error_chain(&err);
        eprintln!("{label}: the source says: {err}");
        // the destination never got the guest
        let arrived = h.block(dest.wait_resumed(Duration::from_secs(2)));
        assert!(arrived.is_err(), "{label}: the destination has the vm: {arrived:?}");
        let log = std::fs::read_to_string(dest.files().qemu_log()).unwrap_or_default();
        eprintln!("{label}: destination qemu log: {log}");
        assert!(log.contains(says) || err.contains(says), "{label}: {says:?} in neither {err:?} nor the log");
        h.block(dest.abort()).unwrap();
        // the source runs the same counter and counts on
        let st = h.block(h.a.status(&name)).unwrap();
        assert_eq!(st.state, WorkloadState::Running, "{label}: {st:?}");
        let (c1, pid, started) = identity(port).expect("the source answers");
        assert_eq!((pid, started), (pid_before, started_before), "{label}: the source counter restarted");
        assert!(wait_for(10, || count(port).filter(|c| *c > c1)).is_some(), "{label}: the source stopped counting");
    }

    // control: node-a (another certificate, not revoked) moves it to a node-b that holds
    // that CRL: QEMU takes the list and lets the valid peer in
    let ab = LocalTls {
        source: VmTls::new(h.identity("node-a"), "node-b").unwrap(),
        destination: VmTls::new(b_with_crl, "node-a").unwrap(),
    };
    let (to_port, _) = migrate_and_check(&h, &h.a, &h.b, &name, port, &image, opts_to(0), Some(&ab), "tls control");
    h.block(h.b.remove(&name)).unwrap();
    assert!(http_get(to_port, "/count").is_none());
}
