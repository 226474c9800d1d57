//! The containerd backend against the real containerd: each lab app runs and answers,
//! bad input leaves nothing behind, and a checkpoint/restore keeps the counter's count.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use away_e2e::{free_port, http_get, lab_image, require_root, require_socket, wait_for};
use away_model::{ByteSize, PortMapping, Resources, WorkloadSpec};
use away_runtime::containerd::ContainerdRuntime;
use away_runtime::store::read_resolved;
use away_runtime::{CheckpointOptions, RestoreRequest, RunRequest, Runtime, RuntimeError};
use futures_util::StreamExt;

const SOCKET: &str = "/run/containerd/containerd.sock";
const NAMESPACE: &str = "away-test";

fn ready() -> bool {
    require_root() && require_socket(SOCKET, "containerd")
}

fn rt() -> (tokio::runtime::Runtime, ContainerdRuntime) {
    let tokio = tokio::runtime::Runtime::new().unwrap();
    // logs (and volumes, none here) under it
    let state = std::env::temp_dir().join("away-e2e-containerd");
    let rt = tokio
        .block_on(ContainerdRuntime::connect(Path::new(SOCKET), NAMESPACE, &state))
        .expect("connect to containerd");
    (tokio, rt)
}

fn spec(name: &str, env: &[(&str, String)], port: Option<u16>) -> WorkloadSpec {
    WorkloadSpec {
        name: name.into(),
        image: "unused".into(),
        kind: Default::default(),
        command: None,
        env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<BTreeMap<_, _>>(),
        ports: port.map(|p| vec![PortMapping { container: p, host: None }]).unwrap_or_default(),
        resources: Resources { memory: ByteSize::mib(64), cpus: 0.5 },
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

/// Removes the workload when the test ends, however it ends.
struct Cleanup<'a>(&'a tokio::runtime::Runtime, &'a ContainerdRuntime, String);
impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.0.block_on(self.1.remove(&self.2));
    }
}

fn name(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

fn logs(tokio: &tokio::runtime::Runtime, rt: &ContainerdRuntime, name: &str) -> String {
    tokio.block_on(async {
        let mut s = rt.logs(name, false).await.unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend(chunk.unwrap());
        }
        String::from_utf8_lossy(&out).to_string()
    })
}

fn count(port: u16) -> Option<u64> {
    http_get(port, "/count").and_then(|b| b.trim().parse().ok())
}

#[test]
fn counter_runs_answers_and_is_removed_without_a_trace() {
    if !ready() {
        return;
    }
    let (tokio, rt) = rt();
    let image = read_resolved(&lab_image("counter"), None).unwrap();
    let port = free_port();
    let n = name("ctr-counter");
    let _c = Cleanup(&tokio, &rt, n.clone());
    let st = tokio
        .block_on(rt.run(&RunRequest { spec: spec(&n, &[("COUNTER_PORT", port.to_string())], Some(port)), image }))
        .expect("run counter");
    assert_eq!(st.state, away_model::WorkloadState::Running);
    assert!(st.pid.is_some());
    let c = wait_for(20, || count(port).filter(|c| *c > 0)).expect("counter answers over HTTP");
    eprintln!("counter answered with count {c}");
    assert!(
        wait_for(10, || logs(&tokio, &rt, &n).contains("counter: ").then_some(())).is_some(),
        "counter logged nothing"
    );
    let listed = tokio.block_on(rt.list()).unwrap();
    assert!(listed.iter().any(|w| w.name == n));
    // the spec's limits reached the container's cgroup (v1 memory controller, or v2)
    let limit = [format!("/sys/fs/cgroup/memory/away/{NAMESPACE}"), format!("/sys/fs/cgroup/away/{NAMESPACE}")]
        .iter()
        .find_map(|base| {
            let dir = format!("{base}/{n}");
            std::fs::read_to_string(format!("{dir}/memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(format!("{dir}/memory.max")))
                .ok()
        })
        .expect("memory cgroup of the container");
    assert_eq!(limit.trim(), (64u64 << 20).to_string(), "memory limit not applied");
    // a second workload of the same name is refused
    let image = read_resolved(&lab_image("counter"), None).unwrap();
    let dup = tokio.block_on(rt.run(&RunRequest { spec: spec(&n, &[], None), image }));
    assert!(matches!(dup, Err(RuntimeError::AlreadyExists { .. })), "{dup:?}");
    tokio.block_on(rt.stop(&n, Duration::from_secs(5))).unwrap();
    assert_eq!(tokio.block_on(rt.status(&n)).unwrap().state, away_model::WorkloadState::Stopped);
    tokio.block_on(rt.remove(&n)).unwrap();
    assert!(matches!(tokio.block_on(rt.status(&n)), Err(RuntimeError::NotFound { .. })));
    assert!(!ctr_has(&["containers", "ls", "-q"], &n), "container left behind");
    assert!(!ctr_has(&["snapshots", "ls"], &n), "snapshot left behind");
}

#[test]
fn memload_and_labdesk_run() {
    if !ready() {
        return;
    }
    let (tokio, rt) = rt();
    let port = free_port();
    let lab = name("ctr-labdesk");
    let _l = Cleanup(&tokio, &rt, lab.clone());
    let image = read_resolved(&lab_image("labdesk"), None).unwrap();
    tokio
        .block_on(rt.run(&RunRequest { spec: spec(&lab, &[("LABDESK_PORT", port.to_string())], Some(port)), image }))
        .expect("run labdesk");
    assert!(
        wait_for(20, || http_get(port, "/state")).is_some(),
        "labdesk does not answer on {port}: {}",
        logs(&tokio, &rt, &lab)
    );

    let mem = name("ctr-memload");
    let _m = Cleanup(&tokio, &rt, mem.clone());
    let image = read_resolved(&lab_image("memload"), None).unwrap();
    let env = [
        ("MEMLOAD_SIZE", "16Mi".to_string()),
        ("MEMLOAD_RAM", "50".to_string()),
        ("MEMLOAD_CPU", "10".to_string()),
        ("MEMLOAD_PORT", free_port().to_string()),
    ];
    tokio.block_on(rt.run(&RunRequest { spec: spec(&mem, &env, None), image })).expect("run memload");
    assert!(
        wait_for(20, || logs(&tokio, &rt, &mem).lines().count().ge(&2).then_some(())).is_some(),
        "memload reports no progress: {}",
        logs(&tokio, &rt, &mem)
    );
}

#[test]
fn bad_input_leaves_nothing_behind() {
    if !ready() {
        return;
    }
    let (tokio, rt) = rt();
    let image = read_resolved(&lab_image("counter"), None).unwrap();
    let n = name("ctr-toobig");
    let mut too_big = spec(&n, &[], None);
    too_big.resources.memory = "1Ti".parse().unwrap();
    let err = tokio.block_on(rt.run(&RunRequest { spec: too_big, image: image.clone() })).unwrap_err();
    assert!(matches!(err, RuntimeError::Invalid { ref field, .. } if field == "resources.memory"), "{err}");
    assert!(!ctr_has(&["containers", "ls", "-q"], &n));

    // a corrupt image: a flipped byte in a blob
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.tar");
    let mut bytes = std::fs::read(&image.tar).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&corrupt, bytes).unwrap();
    let n2 = name("ctr-corrupt");
    let result = read_resolved(&corrupt, None)
        .and_then(|img| tokio.block_on(rt.run(&RunRequest { spec: spec(&n2, &[], None), image: img })));
    let err = result.unwrap_err();
    assert!(matches!(err, RuntimeError::Image { .. }), "{err}");
    assert!(!ctr_has(&["containers", "ls", "-q"], &n2));
    assert!(!ctr_has(&["snapshots", "ls"], &n2));

    // containerd down: a socket that is not there
    let down = tokio.block_on(ContainerdRuntime::connect(
        Path::new("/run/away-no-such/containerd.sock"),
        NAMESPACE,
        dir.path(),
    ));
    assert!(matches!(down, Err(RuntimeError::Unavailable { .. })));
}

#[test]
fn checkpoint_and_restore_keep_the_count() {
    if !ready() {
        return;
    }
    let (tokio, rt) = rt();
    let image = read_resolved(&lab_image("counter"), None).unwrap();
    let port = free_port();
    let n = name("ctr-cr");
    let _c = Cleanup(&tokio, &rt, n.clone());
    tokio
        .block_on(rt.run(&RunRequest {
            spec: spec(&n, &[("COUNTER_PORT", port.to_string())], Some(port)),
            image: image.clone(),
        }))
        .expect("run counter");
    let before = wait_for(30, || count(port).filter(|c| *c >= 20)).expect("counter reaches 20");
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let archive = tokio
        .block_on(rt.checkpoint(&n, &CheckpointOptions { dir: ckpt.clone(), ..Default::default() }))
        .expect("checkpoint");
    assert!(archive.bytes > 0);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&ckpt).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(count(port).is_none(), "the source still answers after a checkpoint with exit");
    tokio.block_on(rt.restore(&RestoreRequest { archive, image, close_connections: false })).expect("restore");
    let after = wait_for(20, || count(port)).expect("restored counter answers");
    eprintln!("count before checkpoint {before}, after restore {after}");
    assert!(after >= before, "restored count {after} < checkpointed {before}: the state was lost");
}

fn ctr_has(args: &[&str], needle: &str) -> bool {
    let out =
        std::process::Command::new("ctr").args(["--address", SOCKET, "-n", NAMESPACE]).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().next() == Some(needle))
}
