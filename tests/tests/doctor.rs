//! `away doctor --json` against the real host: every claim it makes is checked with an
//! independent look at the same thing.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use away_e2e::{away, away_bin, require, require_root, require_socket};
use away_model::Accel;
use away_runtime::host::{boot_probe_guest, process_runs, HostPaths, KvmProbeConfig};
use serde_json::Value;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("run sh");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check named {name}"))
}

/// `away doctor --json` as CI's runner starts it, where the stack-page probe failed twice:
/// with a unix socket to a process outside it inherited as fd 7 (CRIU refuses to dump a
/// process holding an external socket), and in a pid namespace of its own whose session
/// began outside it (CRIU refuses a process whose session leader it cannot see).
fn doctor_json_as_ci_runs_it() -> Value {
    let (socket, _peer) = UnixStream::pair().expect("socketpair");
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c"])
        .arg(r#"grep -qx 'NSsid:\s*0' /proc/self/status || { echo "the session leader is in this pid namespace" >&2; exit 3; }
                exec "$0" doctor --json 7<&0 </dev/null"#)
        .arg(away_bin())
        .stdin(Stdio::from(OwnedFd::from(socket)))
        .output()
        .expect("run unshare … away doctor");
    assert!(out.status.success(), "away doctor --json failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("away doctor --json prints JSON")
}

#[test]
fn doctor_json_tells_the_truth_about_this_host() {
    if !require_root()
        || !require_socket("/run/containerd/containerd.sock", "containerd")
        || !require_socket("/run/docker.sock", "dockerd")
    {
        return;
    }
    let r = doctor_json_as_ci_runs_it();

    // CPU and kernel, against /proc and uname
    let arch = match sh("uname -m").as_str() {
        "x86_64" => "amd64".to_string(),
        "aarch64" => "arm64".to_string(),
        other => other.to_string(),
    };
    assert_eq!(r["arch"], arch.as_str());
    assert_eq!(r["kernel"], sh("uname -r").as_str());
    let vendor = sh("grep -m1 vendor_id /proc/cpuinfo | cut -d: -f2 | tr -d ' '");
    let expected_vendor = match vendor.as_str() {
        "GenuineIntel" => "intel",
        "AuthenticAMD" => "amd",
        other => other,
    };
    assert_eq!(r["cpu"]["vendor"], expected_vendor);
    assert_eq!(r["cpu"]["model"], sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'").as_str());
    assert_eq!(r["cpu"]["cores"], sh("grep -c ^processor /proc/cpuinfo").parse::<u64>().unwrap());
    let flags: Vec<String> =
        sh("grep -m1 ^flags /proc/cpuinfo | cut -d: -f2").split_whitespace().map(String::from).collect();
    assert_eq!(
        r["cpu"]["flags"].as_array().unwrap().len(),
        flags.iter().collect::<std::collections::BTreeSet<_>>().len()
    );

    // containerd and Docker, against their own CLIs on the same sockets
    let ctr_version = sh("ctr --address /run/containerd/containerd.sock --connect-timeout 2s version | awk '/^Server:/{s=1} s && /Version:/{print $2; exit}'");
    assert_eq!(r["containerd"]["version"], ctr_version.as_str());
    assert_eq!(check(&r, "containerd")["status"], "ok");
    assert_eq!(r["docker"]["version"], sh("/usr/bin/docker version -f '{{.Server.Version}}'").as_str());
    let experimental = sh("/usr/bin/docker version -f '{{.Server.Experimental}}'") == "true";
    assert_eq!(r["docker"]["experimental"], experimental);
    assert_eq!(check(&r, "docker")["status"], if experimental { "ok" } else { "warn" });

    // runc, CRIU, QEMU, against the binaries
    assert!(sh("runc --version").contains(r["runc"]["version"].as_str().unwrap()));
    assert!(sh("criu --version").contains(r["criu"]["version"].as_str().unwrap()));
    let criu_check_ok = Command::new("criu").arg("check").status().unwrap().success();
    assert_eq!(r["criu"]["check_ok"], criu_check_ok);
    let dirty = Command::new("criu").args(["check", "--feature", "mem_dirty_track"]).status().unwrap().success();
    assert_eq!(r["criu"]["dirty_tracking"], dirty);
    assert_eq!(check(&r, "criu pre-dump")["status"], if dirty { "ok" } else { "warn" });
    // CRIU and other users' processes: CAP_SYS_RESOURCE, read from a shell's own status
    let cap_eff = u64::from_str_radix(sh("awk '/^CapEff:/ {print $2}' /proc/self/status").trim(), 16).unwrap();
    assert_eq!(check(&r, "criu other users")["status"], if cap_eff & (1 << 24) != 0 { "ok" } else { "warn" });
    // the runtime profile: the active one's name, and its containerd package
    let profile = sh("basename $(readlink -f /opt/away-runtimes/active)");
    let detail = check(&r, "runtime profile")["detail"].as_str().unwrap().to_string();
    assert!(detail.starts_with(&format!("{}:", profile.trim())), "{detail}");
    assert!(
        detail.contains(sh("awk '$1 == \"containerd\" {print $2}' /opt/away-runtimes/active/PACKAGES").trim()),
        "{detail}"
    );
    assert_eq!(r["criu"]["pipe_max_size"], sh("cat /proc/sys/fs/pipe-max-size").parse::<u64>().unwrap());
    // the stack-page probe really dumped its 16 MiB process; the CRIU deploy/install.sh
    // builds carries the is_stack() fix, so the memory stayed lazy
    let written = r["criu"]["stack_page_probe_written"].as_u64();
    assert!(written.is_some(), "the stack-page probe did not run: {}", r["criu"]);
    let ours = std::fs::read_to_string("/opt/away-criu/.away-installed")
        .is_ok_and(|m| m.contains("0001-is-stack-page-number.patch"))
        && sh("readlink -f \"$(command -v criu)\"") == "/opt/away-criu/sbin/criu";
    if ours {
        assert!(written.unwrap() < 8 << 20, "the mended CRIU dumped {written:?} bytes of the probe's 16 MiB");
        assert_eq!(check(&r, "criu lazy stack page")["status"], "ok");
    }
    assert!(sh("qemu-system-x86_64 --version").contains(r["qemu"]["version"].as_str().unwrap()));

    // cgroups and overlayfs
    let cgroup = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else if std::path::Path::new("/sys/fs/cgroup/unified").exists() {
        "hybrid"
    } else {
        "v1"
    };
    assert_eq!(r["cgroup"]["version"], cgroup);
    assert_eq!(r["overlayfs"], sh("grep -c overlay /proc/filesystems") != "0");

    // KVM: the accelerator follows the probe, and a "no" says why
    let kvm = &r["kvm"];
    assert_eq!(kvm["device_present"], std::path::Path::new("/dev/kvm").exists());
    assert_eq!(r["accel"], if kvm["usable"] == true { "kvm" } else { "tcg" });
    assert!(!kvm["reason"].as_str().unwrap().is_empty());
    assert_eq!(check(&r, "kvm")["status"], if kvm["usable"] == true { "ok" } else { "warn" });

    // every non-ok check carries a fix
    for c in r["checks"].as_array().unwrap() {
        if c["status"] != "ok" {
            assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "check without a fix: {c}");
        }
    }
}

/// The KVM probe's "no" is only worth something if its guest boots where it can: under TCG.
#[test]
fn kvm_probe_guest_boots_under_tcg() {
    let paths = HostPaths::default();
    if !require(
        paths.qemu.exists() && paths.guest_kernel.exists() && paths.busybox.exists(),
        "qemu, guest kernel and busybox (deploy/install.sh)",
    ) {
        return;
    }
    let cfg = KvmProbeConfig {
        qemu: paths.qemu,
        kernel: paths.guest_kernel,
        busybox: paths.busybox,
        timeout: Duration::from_secs(90),
        cache_file: None,
        reprobe: true,
    };
    let took = boot_probe_guest(&cfg, Accel::Tcg).expect("probe guest must boot under TCG");
    eprintln!("probe guest booted under TCG in {:.1} s", took.as_secs_f64());
}

#[test]
fn doctor_table_names_every_component() {
    let out = away(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "cpu",
        "cgroup",
        "overlayfs",
        "containerd",
        "docker",
        "runc",
        "criu",
        "criu pre-dump",
        "criu lazy pages",
        "criu lazy stack page",
        "qemu",
        "kvm",
    ] {
        assert!(text.contains(name), "doctor table lacks {name}:\n{text}");
    }
}

/// The children of `pid` right now, by pid, with their command lines.
fn children(pid: u32) -> Vec<(u32, String)> {
    let list = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .collect::<String>();
    list.split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(|c: u32| (c, std::fs::read_to_string(format!("/proc/{c}/cmdline")).unwrap_or_default().replace('\0', " ")))
        .collect()
}

/// What was running when a test killed `away doctor`.
struct Killed {
    doctor: u32,
    children: Vec<(u32, String)>,
}

/// Start `away doctor args` (its KVM answer cached in `kvm_cache`, not the host's cache),
/// SIGKILL it as soon as one of its children's command lines contains all of `words`,
/// and say what ran then (None when it ended first, having run no such child).
fn kill_doctor_once_it_runs(args: &[&str], kvm_cache: &Path, words: &[&str]) -> Option<Killed> {
    let mut doctor = Command::new(away_bin())
        .arg("doctor")
        .args(args)
        .env("AWAY_KVM_PROBE_CACHE", kvm_cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start away doctor");
    let seen = loop {
        let now = children(doctor.id());
        if now.iter().any(|(_, c)| words.iter().all(|w| c.contains(w))) {
            break Some(Killed { doctor: doctor.id(), children: now });
        }
        if doctor.try_wait().expect("wait for away doctor").is_some() {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = doctor.kill();
    let _ = doctor.wait();
    seen
}

fn assert_all_end(killed: &Killed, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while killed.children.iter().any(|&(pid, _)| process_runs(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = killed.children.iter().filter(|&&(pid, _)| process_runs(pid)).collect();
    for &(pid, _) in &left {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    assert!(left.is_empty(), "{what}: still running 5 s after away doctor was killed: {left:?}");
}

/// The scratch directories in $TMPDIR that the away with this pid made for its probes.
fn probe_dirs_of(pid: u32) -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("away-") && n.contains("-probe-") && n.contains(&format!("-{pid}-")))
        .collect()
}

/// A killed `away doctor` (Ctrl-C, kill -9: no destructor runs) leaves nothing running:
/// not its CRIU probe (frozen under CRIU's ptrace before), not the CRIU that dumps it
/// (waiting forever for a page-server client), not a KVM probe guest (spinning a core);
/// and the next doctor removes the scratch directories it left.
#[test]
fn killed_doctor_leaves_no_probe_running() {
    if !require_root() {
        return;
    }
    let kvm_cache = tempfile::NamedTempFile::new().unwrap();
    // the CRIU dump lasts a fraction of a second: try until the kill lands inside it
    let during_dump = (0..10)
        .find_map(|_| kill_doctor_once_it_runs(&["--json"], kvm_cache.path(), &["criu", "dump", "--lazy-pages"]))
        .expect("away doctor never ran criu dump on its probe in 10 runs");
    assert!(during_dump.children.len() >= 2, "expected the probe and criu: {:?}", during_dump.children);
    assert_all_end(&during_dump, "killed during the CRIU probe's dump");
    let mut left = probe_dirs_of(during_dump.doctor);
    assert!(!left.is_empty(), "no scratch directory of the killed CRIU probe: is the test looking in the right place?");

    if std::path::Path::new("/dev/kvm").exists() {
        let args = ["--json", "--reprobe-kvm", "--kvm-timeout", "60"];
        let during_boot = kill_doctor_once_it_runs(&args, kvm_cache.path(), &["qemu-system", "-accel kvm"])
            .expect("away doctor --reprobe-kvm never started the KVM probe guest");
        assert_all_end(&during_boot, "killed during the KVM probe guest's boot");
        left.extend(probe_dirs_of(during_boot.doctor));
    } else {
        eprintln!("no /dev/kvm: away doctor boots no KVM probe guest here");
    }

    // a doctor that runs to its end (both probes) removes what the killed ones left
    let out = Command::new(away_bin())
        .args(["doctor", "--json", "--reprobe-kvm", "--kvm-timeout", "5"])
        .env("AWAY_KVM_PROBE_CACHE", kvm_cache.path())
        .output()
        .expect("run away doctor");
    assert!(out.status.success(), "away doctor failed: {}", String::from_utf8_lossy(&out.stderr));
    let tmp = std::env::temp_dir();
    let still: Vec<_> = left.iter().filter(|d| tmp.join(d).exists()).collect();
    assert!(still.is_empty(), "scratch directories of killed doctors left after the next run: {still:?}");
}

/// `away doctor --json | head -1`: the reader goes away before the report is written; the
/// report's end is simply not wanted, which is no failure and no panic.
#[test]
fn doctor_json_into_a_closed_pipe_ends_quietly() {
    let mut child = Command::new(away_bin())
        .args(["doctor", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run away doctor --json");
    drop(child.stdout.take()); // the reader is gone before anything is written
    let out = child.wait_with_output().expect("wait for away doctor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "away doctor --json panicked on a closed pipe: {stderr}");
    assert!(out.status.success(), "away doctor --json into a closed pipe: {}: {stderr}", out.status);
}
