//! Is KVM usable? Only a guest that really boots says so. On some hosts /dev/kvm exists
//! but is a variant (e.g. nested KVM-PVM) in which normal guests hang, so the device's
//! presence proves nothing. The probe boots the guest kernel with a one-line init under
//! `-accel kvm` and waits for that init's marker on the serial console.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use away_model::Accel;
use serde::{Deserialize, Serialize};

const MARKER: &str = "AWAY-KVM-PROBE-OK";

/// Outcome of a KVM probe boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmProbe {
    pub device_present: bool,
    /// A guest booted to its init under KVM within the timeout.
    pub usable: bool,
    /// Why usable or not, for people.
    pub reason: String,
    /// Time the probe took (0 when it was not run).
    pub elapsed_ms: u64,
    /// Unix time of the probe; with `cached` it tells how old the answer is.
    pub probed_at: u64,
    /// True when this answer was read from the probe cache.
    #[serde(default)]
    pub cached: bool,
    /// What the answer depends on: it is reused only while this stays the same.
    pub key: String,
}

/// What the probe needs from the host.
#[derive(Debug, Clone)]
pub struct KvmProbeConfig {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub busybox: PathBuf,
    pub timeout: Duration,
    /// Where answers are cached; `None` disables the cache.
    pub cache_file: Option<PathBuf>,
    /// Ignore a cached answer and boot again.
    pub reprobe: bool,
}

/// Probe KVM, or return the cached answer for the same host, kernel and QEMU.
pub fn probe_kvm(cfg: &KvmProbeConfig, qemu_version: &str) -> KvmProbe {
    let device_present = Path::new("/dev/kvm").exists();
    let key = format!(
        "kernel={} qemu={} guest={}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        qemu_version,
        std::fs::canonicalize(&cfg.kernel).unwrap_or_else(|_| cfg.kernel.clone()).display()
    );
    let answer = |usable: bool, reason: String, elapsed: Duration| KvmProbe {
        device_present,
        usable,
        reason,
        elapsed_ms: elapsed.as_millis() as u64,
        probed_at: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        cached: false,
        key: key.clone(),
    };
    if !device_present {
        return answer(
            false,
            "/dev/kvm is absent (no hardware virtualisation exposed to this host)".into(),
            Duration::ZERO,
        );
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return answer(false, format!("/dev/kvm cannot be opened: {e}"), Duration::ZERO);
    }
    if !cfg.reprobe {
        if let Some(cached) = cfg.cache_file.as_deref().and_then(|f| read_cache(f, &key)) {
            return cached;
        }
    }
    for (what, path) in [("qemu", &cfg.qemu), ("guest kernel", &cfg.kernel), ("busybox", &cfg.busybox)] {
        if !path.exists() {
            return answer(false, format!("cannot probe: {what} missing at {}", path.display()), Duration::ZERO);
        }
    }
    let started = Instant::now();
    let probe = match boot_probe_guest(cfg, Accel::Kvm) {
        Ok(took) => answer(true, format!("probe guest booted under KVM in {:.1} s", took.as_secs_f64()), took),
        Err(why) => answer(false, why, started.elapsed()),
    };
    if let Some(file) = &cfg.cache_file {
        write_cache(file, &probe);
    }
    probe
}

fn read_cache(file: &Path, key: &str) -> Option<KvmProbe> {
    let mut probe: KvmProbe = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    (probe.key == key).then(|| {
        probe.cached = true;
        probe
    })
}

fn write_cache(file: &Path, probe: &KvmProbe) {
    // A cache that cannot be written only costs time on the next run.
    let write = || -> std::io::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(probe).unwrap_or_default())?;
        std::fs::rename(tmp, file)
    };
    if let Err(e) = write() {
        tracing::debug!("cannot cache the kvm probe in {}: {e}", file.display());
    }
}

/// Boot the probe guest with `accel`; Ok(boot time) when its init printed the marker
/// within `cfg.timeout`. Public so that tests can prove the probe guest itself is sound
/// (it must boot under TCG), which is what makes a KVM "no" trustworthy.
pub fn boot_probe_guest(cfg: &KvmProbeConfig, accel: Accel) -> Result<Duration, String> {
    let dir = super::probe_cleanup::probe_dir("kvm-probe").map_err(|e| format!("cannot probe: temp dir: {e}"))?;
    let initrd = dir.path().join("initrd.gz");
    write_probe_initramfs(&initrd, &cfg.busybox)
        .map_err(|e| format!("cannot probe: initramfs {}: {e}", initrd.display()))?;
    let serial = dir.path().join("serial.log");
    let mut qemu = Command::new(&cfg.qemu);
    // a guest that hangs under KVM spins a core until killed, even if away is killed first
    super::probe_cleanup::tie_to_this_process(&mut qemu, false);
    let mut child = qemu
        .args([
            "-accel",
            &accel.to_string(),
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&cfg.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", cfg.qemu.display()))?;
    let started = Instant::now();
    let deadline = started + cfg.timeout;
    let outcome = loop {
        if std::fs::read_to_string(&serial).is_ok_and(|s| s.contains(MARKER)) {
            break Ok(started.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            let seen = std::fs::read_to_string(&serial).unwrap_or_default();
            if seen.contains(MARKER) {
                break Ok(started.elapsed());
            }
            break Err(format!(
                "qemu -accel {accel} exited ({status}) before the probe guest booted: {}",
                first_line(&err)
            ));
        }
        if Instant::now() >= deadline {
            let seen = std::fs::read_to_string(&serial).unwrap_or_default();
            break Err(format!(
                "probe guest did not reach its init within {} s under -accel {accel} ({} bytes on its console){}",
                cfg.timeout.as_secs(),
                seen.len(),
                if accel == Accel::Kvm {
                    "; /dev/kvm is present but does not run normal guests (e.g. nested KVM-PVM)"
                } else {
                    ""
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

fn first_line(s: &str) -> &str {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no message")
}

/// A gzip newc initramfs: busybox, /dev/console (or the init's output is lost) and an
/// init that prints the marker and reboots (QEMU exits with -no-reboot).
fn write_probe_initramfs(path: &Path, busybox: &Path) -> std::io::Result<()> {
    use cpio::newc::{Builder, ModeFileType};
    let busybox = std::fs::read(busybox)?;
    let init = format!("#!/bin/busybox sh\n/bin/busybox echo {MARKER}\n/bin/busybox reboot -f\n");
    let gz = flate2::write::GzEncoder::new(std::fs::File::create(path)?, flate2::Compression::fast());
    let mut out = gz;
    let mut ino = 1;
    let mut entry = |name: &str,
                     mode: u32,
                     kind: ModeFileType,
                     rdev: (u32, u32),
                     data: &[u8],
                     out: &mut dyn Write|
     -> std::io::Result<()> {
        ino += 1;
        let mut w = Builder::new(name)
            .ino(ino)
            .mode(mode)
            .set_mode_file_type(kind)
            .nlink(1)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1)
            .write(out, data.len() as u32);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    };
    entry("bin", 0o755, ModeFileType::Directory, (0, 0), &[], &mut out)?;
    entry("dev", 0o755, ModeFileType::Directory, (0, 0), &[], &mut out)?;
    entry("dev/console", 0o600, ModeFileType::Char, (5, 1), &[], &mut out)?;
    entry("bin/busybox", 0o755, ModeFileType::Regular, (0, 0), &busybox, &mut out)?;
    entry("init", 0o755, ModeFileType::Regular, (0, 0), init.as_bytes(), &mut out)?;
    cpio::newc::trailer(&mut out)?;
    out.finish()?.sync_all()
}
