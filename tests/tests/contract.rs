//! The container contract: the probe image (`images/probe`) reports what it sees from
//! inside — capabilities, user and groups, seccomp, mounts, environment — and the
//! reports from containerd and Docker must be the same, for the default spec and for
//! specs that set `user:`, `capabilities:` and `seccomp:`. This keeps the table in
//! docs/runtimes.md ("What a workload sees") true.

use away_e2e::{away, away_json, lab_image, require_root, require_socket, wait_for};
use serde_json::Value;
use std::process::Command;

fn ready() -> bool {
    require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require_socket("/run/docker.sock", "dockerd")
}

/// Removes the workload when the test ends, however it ends.
struct Rm(String);
impl Drop for Rm {
    fn drop(&mut self) {
        let _ = away(&["rm", "--force", &self.0]);
    }
}

/// What Docker adds because its containers sit on a bridge network of their own (the
/// files it writes for that network); containerd workloads share the node's network
/// and see the node's files in their image instead. Checked present, then left out.
const DOCKER_NETWORK_FILES: [&str; 3] = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"];

/// Run the probe with `extra` spec lines on `runtime` and return its report.
fn probe(runtime: &str, case: &str, extra: &str) -> Value {
    let name = format!("probe-{case}-{runtime}-{}", std::process::id());
    let _rm = Rm(name.clone());
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("probe.yaml");
    let tar = lab_image("probe");
    std::fs::write(&spec, format!("name: {name}\nimage: {}\n{extra}", tar.display())).unwrap();
    let started = away_json(&["run", spec.to_str().unwrap(), "--runtime", runtime, "--json"]);
    assert_eq!(started["decision"]["runtime"], runtime);
    let line = wait_for(20, || {
        let out = away(&["logs", &name]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix("probe: ").map(str::to_string))
    })
    .unwrap_or_else(|| panic!("{runtime}: the probe printed no report"));
    let mut report: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{runtime}: {e}: {line}"));
    // the hostname is the workload's name on both runtimes; the names differ here
    assert_eq!(report["hostname"], name.as_str(), "{runtime}");
    report.as_object_mut().unwrap().remove("hostname");
    if runtime == "docker" {
        let mounts = report["mounts"].as_array_mut().unwrap();
        for file in DOCKER_NETWORK_FILES {
            let before = mounts.len();
            mounts.retain(|m| !m.as_str().unwrap().starts_with(&format!("{file} ")));
            assert_eq!(mounts.len(), before - 1, "docker: {file} is not mounted");
        }
    }
    report
}

/// The reports of both runtimes for one spec, checked equal; the containerd one.
fn same_on_both(case: &str, extra: &str) -> Value {
    let containerd = probe("containerd", case, extra);
    let docker = probe("docker", case, extra);
    let mut c = containerd.as_object().unwrap().clone();
    let d = docker.as_object().unwrap();
    // Docker masks /proc/interrupts since 25 (moby#46962); away's contract is the current
    // Docker's, so on Docker 20.10 (the debian12 profile) that one mask is away's alone
    if docker_major() < 25 {
        if let Some(Value::Array(mounts)) = c.get_mut("mounts") {
            mounts.retain(|m| !m.as_str().is_some_and(|m| m.starts_with("/proc/interrupts ")));
        }
    }
    let c = &c;
    let keys: std::collections::BTreeSet<&String> = c.keys().chain(d.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| c.get(*k) != d.get(*k))
        .map(|k| {
            format!(
                "{k}:\n  containerd {}\n  docker     {}",
                c.get(k).unwrap_or(&Value::Null),
                d.get(k).unwrap_or(&Value::Null)
            )
        })
        .collect();
    assert!(differ.is_empty(), "{case}: the runtimes differ in\n{}", differ.join("\n"));
    containerd
}

/// The running dockerd's major version.
fn docker_major() -> u32 {
    let out = Command::new(away_e2e::docker_cli()).args(["version", "-f", "{{.Server.Version}}"]).output().unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    v.trim().split('.').next().and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("docker version {v:?}"))
}

fn names(v: &Value) -> Vec<&str> {
    v.as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect()
}

const DOCKER_DEFAULT: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "NET_RAW",
    "SYS_CHROOT",
    "MKNOD",
    "AUDIT_WRITE",
    "SETFCAP",
];

#[test]
fn the_default_container_is_the_same_on_containerd_and_docker() {
    if !ready() {
        return;
    }
    let r = same_on_both("default", "");
    let mut want = DOCKER_DEFAULT.to_vec();
    let mut got = names(&r["cap_effective"]);
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(names(&r["cap_bounding"]).len(), 14);
    assert!(names(&r["cap_inheritable"]).is_empty() && names(&r["cap_ambient"]).is_empty());
    assert_eq!((r["uid"].as_str(), r["groups"].as_str()), (Some("0 0 0 0"), Some("0")));
    assert_eq!(r["no_new_privs"], "0");
    assert_eq!(r["seccomp"], "2", "a seccomp filter is on");
    assert_eq!((r["unshare_0"].as_str(), r["clone3_empty"].as_str()), (Some("EPERM"), Some("ENOSYS")));
    assert_eq!(names(&r["env"]), ["HOME", "HOSTNAME", "PATH", "PROBE_IMAGE"]);
    assert_eq!(r["home"], "/root");
    assert_eq!(r["cwd"], "/");
    let mounts = names(&r["mounts"]);
    for m in ["/proc proc rw", "/dev tmpfs rw", "/dev/shm tmpfs rw", "/dev/mqueue mqueue rw", "/sys sysfs ro"] {
        assert!(mounts.contains(&m), "{m} missing from {mounts:?}");
    }
    // masked and read-only paths
    for masked in ["/proc/keys ", "/proc/timer_list ", "/sys/firmware "] {
        assert!(mounts.iter().any(|m| m.starts_with(masked)), "{masked}is not masked: {mounts:?}");
    }
    assert!(mounts.contains(&"/proc/sys proc ro"), "{mounts:?}");
}

#[test]
fn user_capabilities_and_seccomp_from_the_spec_are_the_same_on_both() {
    if !ready() {
        return;
    }
    // a name from the image's passwd: its groups from the image's group file
    let r = same_on_both("user", "user: probe\ncapabilities:\n  add: [net_admin]\n  drop: [CAP_NET_RAW, chown]\n");
    assert_eq!((r["uid"].as_str(), r["gid"].as_str()), (Some("1000 1000 1000 1000"), Some("1000 1000 1000 1000")));
    assert_eq!(r["groups"], "29 50 1000");
    assert_eq!(r["home"], "/home/probe");
    // a non-root user starts with no capability in effect; the bounding set follows the spec
    assert!(names(&r["cap_effective"]).is_empty());
    let bounding = names(&r["cap_bounding"]);
    assert!(bounding.contains(&"NET_ADMIN") && !bounding.contains(&"NET_RAW") && !bounding.contains(&"CHOWN"));
    assert_eq!(bounding.len(), 13);

    // name:group and numeric ids; all dropped; no filter
    let r = same_on_both("group", "user: nobody:staff\ncapabilities:\n  drop: [ALL]\nseccomp: unconfined\n");
    assert_eq!((r["uid"].as_str(), r["gid"].as_str()), (Some("65534 65534 65534 65534"), Some("50 50 50 50")));
    assert_eq!(r["groups"], "50");
    assert!(names(&r["cap_bounding"]).is_empty());
    assert_eq!((r["seccomp"].as_str(), r["unshare_0"].as_str()), (Some("0"), Some("ok")));
    let r = same_on_both("numeric", "user: \"4321:29\"\n");
    assert_eq!((r["uid"].as_str(), r["gid"].as_str()), (Some("4321 4321 4321 4321"), Some("29 29 29 29")));
    assert_eq!(r["home"], "/");
}

#[test]
fn a_user_the_image_does_not_have_is_refused_by_name_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let name = format!("probe-nouser-{}", std::process::id());
    let _rm = Rm(name.clone());
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("probe.yaml");
    let tar = lab_image("probe");
    std::fs::write(&spec, format!("name: {name}\nimage: {}\nuser: nginx\n", tar.display())).unwrap();
    let out = away(&["run", spec.to_str().unwrap(), "--runtime", "containerd"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("user \"nginx\" is not in the image's /etc/passwd"), "{err}");
    let ps = away_json(&["ps", "--json"]);
    assert!(!ps["workloads"].as_array().unwrap().iter().any(|w| w["name"] == name.as_str()), "left behind: {ps}");
    // a bad capability name is a spec error naming the field and its line
    std::fs::write(&spec, format!("name: {name}\nimage: {}\ncapabilities:\n  add: [NET_ADMN]\n", tar.display()))
        .unwrap();
    let out = away(&["run", spec.to_str().unwrap(), "--runtime", "docker"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("capabilities.add (line 4): \"NET_ADMN\" is not a Linux capability"), "{err}");
}
