//! VMs with a disk (docs/vm.md): a copy-on-write overlay on a base image of the node's
//! disk store, kept across a reboot of the guest, and moved live with the VM without
//! shared storage (the source mirrors its overlay into an empty overlay on the same
//! base at the destination, over NBD, while RAM migrates).
//!
//! Two QEMU runtimes on this host stand in for two nodes (as in migrate_vm.rs), each
//! with its own disk store: the destination's store lacks the base at first, so the
//! move copies it. VM tests take a shared lock: under TCG two cores boot one guest at a
//! time well.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use away_e2e::{require_vm_host, wait_for, workspace_root};
use away_model::{ByteSize, DiskSpec, Resources, WorkloadSpec, WorkloadState};
use away_runtime::host::HostPaths;
use away_runtime::qemu::QemuRuntime;
use away_runtime::store::{read_resolved, ResolvedImage};
use away_runtime::{RunRequest, Runtime};

/// A TCG boot to /init takes 8-11 s on an idle host; allow for a loaded one.
const BOOT_SECS: u64 = 120;

static VM_LOCK: Mutex<()> = Mutex::new(());

fn vm_lock() -> std::sync::MutexGuard<'static, ()> {
    VM_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn ready() -> bool {
    let blk = HostPaths::default().guest_kernel.with_file_name("modules").join("kernel/drivers/block/virtio_blk.ko");
    require_vm_host()
        && away_e2e::require(blk.is_file(), &format!("guest disk module {} (deploy/install.sh)", blk.display()))
}

fn out_dir() -> PathBuf {
    workspace_root().join("target").join("away-e2e-disk-images")
}

/// An image built from `context` (once per test run) and, when `disk` is set, its disk
/// image (`away image build --disk`'s ext4 in a qcow2).
fn build(context: &Path, tag: &str, disk: Option<u64>) -> (ResolvedImage, Option<PathBuf>) {
    static BUILD: Mutex<()> = Mutex::new(());
    let _g = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let out = out_dir();
    let opts = away_image::BuildOptions { tag: Some(tag.into()), ..Default::default() };
    let (built, tar, _) =
        away_image::build_to_dir(context, &out, &opts, &|_| {}).unwrap_or_else(|e| panic!("build {context:?}: {e}"));
    let disk = disk.map(|size| {
        let path = out.join(format!("{}.disk.qcow2", built.app));
        away_image::write_disk_image(&built.image, &path, size).unwrap_or_else(|e| panic!("disk image: {e}"));
        path
    });
    (read_resolved(&tar, None).unwrap_or_else(|e| panic!("read {}: {e}", tar.display())), disk)
}

/// Runtimes ("node a", "node b"), each with its own state and disk store.
struct Harness {
    tokio: tokio::runtime::Runtime,
    a: QemuRuntime,
    #[allow(dead_code)] // the move test (next)
    b: QemuRuntime,
    dir: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        let tokio = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::Builder::new().prefix("away-disk").tempdir().unwrap();
        let node = |n: &str| {
            let rt = tokio.block_on(QemuRuntime::detect(dir.path().join(n), HostPaths::default()));
            rt.with_disk_store(dir.path().join(format!("{n}-disks")))
        };
        let (a, b) = (node("a"), node("b"));
        eprintln!("qemu runtimes: accel {} / {}", a.accel(), b.accel());
        Harness { tokio, a, b, dir }
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

fn unique(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

fn vm_spec(name: &str, mib: u64, disk: DiskSpec) -> WorkloadSpec {
    let yaml = format!("name: {name}\nimage: unused\nkind: vm\n");
    let mut spec = WorkloadSpec::parse(&yaml, away_model::SpecFormat::Yaml, "test").unwrap();
    spec.resources = Resources { memory: ByteSize::mib(mib), cpus: 1.0 };
    spec.disk = Some(disk);
    spec
}

/// The last "count N boot B" the diskcounter printed.
fn last_count(serial: &str) -> Option<(u64, u64)> {
    serial.lines().rev().find_map(|l| {
        let rest = l.trim().strip_prefix("diskcounter: count ")?;
        let (n, boot) = rest.split_once(" boot ")?;
        Some((n.parse().ok()?, boot.trim().parse().ok()?))
    })
}

/// The example legacy app (examples/diskcounter, examples/legacy-disk.yaml) on its
/// ext4 disk: its count goes on after a cold reboot of the guest, from the file on the
/// disk, and the base image is never written (only the overlay is).
#[test]
fn legacy_app_keeps_its_count_on_the_disk_across_a_reboot() {
    if !ready() {
        return;
    }
    let _l = vm_lock();
    let h = Harness::new();
    let (image, disk) =
        build(&workspace_root().join("examples/diskcounter"), "away-e2e/diskcounter:disk", Some(64 << 20));
    let base = h.a.disk_store().import(&disk.unwrap()).expect("import the disk image");
    let example: WorkloadSpec = WorkloadSpec::load(&workspace_root().join("examples/legacy-disk.yaml")).unwrap();
    assert_eq!(
        example.disk.as_ref().unwrap().base,
        base.digest,
        "examples/legacy-disk.yaml names the digest `away image build examples/diskcounter --disk 64Mi` gives"
    );
    let base_bytes = std::fs::read(&base.path).unwrap();
    let name = unique("dcount");
    let mut spec = vm_spec(&name, 128, example.disk.clone().unwrap());
    spec.env.insert("DISKCOUNTER_INTERVAL".into(), "0.2".into());
    let t0 = Instant::now();
    h.block(h.a.run(&RunRequest { spec, image: image.clone() })).unwrap_or_else(|e| panic!("run {name}: {e}"));
    let (before, boot) = wait_for(BOOT_SECS, || last_count(&Harness::serial(&h.a, &name)).filter(|(n, _)| *n >= 5))
        .unwrap_or_else(|| panic!("no count on the disk; serial:\n{}", Harness::serial(&h.a, &name)));
    eprintln!("counting to {before} (boot {boot}) {:.1} s after run", t0.elapsed().as_secs_f64());
    assert_eq!(boot, 1);
    assert!(Harness::serial(&h.a, &name).contains("away-init: disk mounted on /data"));

    let t1 = Instant::now();
    let st = h.block(h.a.reboot(&name, &image)).unwrap_or_else(|e| panic!("reboot {name}: {e}"));
    assert_eq!(st.state, WorkloadState::Running);
    let (after, boot) = wait_for(BOOT_SECS, || last_count(&Harness::serial(&h.a, &name)).filter(|(_, b)| *b == 2))
        .unwrap_or_else(|| panic!("no count after the reboot; serial:\n{}", Harness::serial(&h.a, &name)));
    eprintln!("after the reboot ({:.1} s): count {after} boot {boot}", t1.elapsed().as_secs_f64());
    assert!(after > before, "the count restarted: {before} before the reboot, {after} after");
    let serial = Harness::serial(&h.a, &name);
    let from: u64 = serial
        .lines()
        .find_map(|l| l.trim().strip_prefix("diskcounter: boot 2, counting on from ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the second boot did not read the count from the disk; serial:\n{serial}"));
    assert!(from >= before, "the second boot counted on from {from}, the first had reached {before}");
    assert_eq!(std::fs::read(&base.path).unwrap(), base_bytes, "the base image was written");
    h.block(h.a.remove(&name)).unwrap();
    assert!(!h.a.files(&name).dir.exists());
}
