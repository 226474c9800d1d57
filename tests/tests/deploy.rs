//! deploy/install.sh and deploy/services.sh are idempotent: a second run changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use away_e2e::{require_root, workspace_root};

fn run_script(script: &str, args: &[&str]) -> String {
    let path = workspace_root().join("deploy").join(script);
    let out = Command::new("bash").arg(&path).args(args).output().expect("run deploy script");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} {args:?} failed:\n{text}");
    text
}

/// What install.sh installs, as a fingerprint: package versions and the files it writes.
fn installed_state() -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n' | sort | sha256sum; \
             stat -c '%n %s %Y' /usr/local/sbin/criu /opt/away-criu/sbin/criu /opt/away-criu/.away-installed /opt/away-guest/vmlinuz /opt/away-guest/VERSION; \
             readlink /opt/away-guest/vmlinuz; ls -la /usr/sbin/policy-rc.d 2>&1; \
             readlink /opt/away-runtimes/active; stat -c '%n %s %Y' /opt/away-runtimes/active/bin/* /opt/away-runtimes/active/.away-installed",
        )
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn install_twice_changes_nothing() {
    if !require_root() {
        return;
    }
    // The first run may install (on a fresh machine CI already ran it via deploy/demo.sh).
    run_script("install.sh", &[]);
    let before = installed_state();
    let t0 = Instant::now();
    let log = run_script("install.sh", &[]);
    let took = t0.elapsed();
    eprintln!("second install.sh run took {:.2} s", took.as_secs_f64());
    assert!(log.contains("nothing changed"), "second run changed something:\n{log}");
    for sign_of_work in ["apt-get update", "Unpacking", "downloading", "Get:"] {
        assert!(!log.contains(sign_of_work), "second run did work ({sign_of_work}):\n{log}");
    }
    assert_eq!(before, installed_state(), "installed state differs after the second run");
}

#[test]
fn services_start_is_a_no_op_when_daemons_run() {
    if !require_root() {
        return;
    }
    run_script("services.sh", &["start"]);
    let pid = |name: &str| std::fs::read_to_string(format!("/run/away/{name}.pid")).ok();
    let before = (pid("containerd"), pid("dockerd"));
    let log = run_script("services.sh", &["start"]);
    assert!(log.contains("containerd already answers"), "{log}");
    assert!(log.contains("dockerd already answers"), "{log}");
    assert_eq!(before, (pid("containerd"), pid("dockerd")), "pidfiles changed on a second start");
    run_script("services.sh", &["status"]);
    assert!(Path::new("/run/containerd/containerd.sock").exists());
}
