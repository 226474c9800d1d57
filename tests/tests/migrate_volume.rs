//! A container with a named volume moves with it (issue 19): a source node and a target
//! agent on this host (containerd namespaces and state directories of their own), the
//! counter writing into its volume (a new 4 KiB file every 50 ms, a line appended to an
//! open `grow.log`, a 4 MiB incompressible `preload.bin`) and listening on no port, so
//! that it may also move lazily on one host. After each move (staged, streamed, lazy):
//! every file the source had is byte-identical on the target (SHA-256), the files and
//! the log lines go on from where they were with no gap and from the same process (its
//! start time is in each file), and the source's volume directory is gone.
//!
//! Each move pre-copies the volume while the counter runs, then carries only what
//! changed since in the freeze: the test holds the move between the two
//! (`AWAY_FAULT_HOLD_AFTER_PRECOPY`), deletes, rewrites and adds files there, and checks
//! the target has the volume as it was at the freeze while the report shows the
//! unchanged megabytes went before the freeze (`volumes.precopy_bytes_raw`) and only
//! the changes during it (`volumes.frozen_bytes_raw`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use away_e2e::{lab_image, noise, require_root, require_socket, wait_for, LocalAgent, Node};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn node(role: &str, test: &str) -> Node {
    let id = format!("{role}-{test}-{}", std::process::id());
    Node::at(format!("away-{id}"), PathBuf::from(format!("/tmp/away-e2e-vol/{id}")))
}

/// The workload, removed on both nodes when dropped.
struct Workload<'a> {
    name: String,
    nodes: [&'a Node; 2],
}
impl Drop for Workload<'_> {
    fn drop(&mut self) {
        for n in self.nodes {
            let _ = n.away(&["rm", "--force", &self.name]);
        }
    }
}

fn volume(node: &Node, name: &str) -> PathBuf {
    node.state.join("volumes").join(&node.ns).join(name).join("data")
}

/// SHA-256 of every file in `dir`.
fn digests(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        // the file being written under its temporary name may vanish meanwhile
        if let Ok(bytes) = std::fs::read(e.path()) {
            out.insert(name, format!("{:x}", Sha256::digest(&bytes)));
        }
    }
    out
}

/// The highest `f-NNNNNN` in `dir`.
fn last_file(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("f-")?.parse().ok()).max()
}

/// The bytes of file N (images/counter: `N STARTED` repeated to 4 KiB).
fn volume_file(n: u64, started: &str) -> Vec<u8> {
    format!("{n} {started}\n").bytes().cycle().take(4096).collect()
}

fn ready() -> bool {
    require_root() && require_socket("/run/containerd/containerd.sock", "containerd")
}

/// A target agent (with `env`), a source node, and the counter writing into its volume
/// on the source.
fn start(test: &str, env: &[(&str, &str)]) -> (LocalAgent, Node, String) {
    let log = PathBuf::from(format!("/tmp/away-e2e-vol/agent-{test}-{}.log", std::process::id()));
    let agent: LocalAgent = node("target", test).start_agent(&format!("target-{test}"), &[], env, &log);
    let source = node("source", test);
    std::fs::create_dir_all(&source.state).unwrap();
    let name = format!("{test}-{}", std::process::id());
    let tar = lab_image("counter");
    #[rustfmt::skip]
    let (ok, _, err) = source.away(&[
        "run", tar.to_str().unwrap(), "--name", &name, "--runtime", "containerd", "-v", "data:/data",
        "-e", "COUNTER_PORT=0", "-e", "COUNTER_VOLUME=/data", "-e", "COUNTER_VOLUME_PRELOAD_KIB=4096",
    ]);
    assert!(ok, "away run with a volume: {err}");
    (agent, source, name)
}

/// Files 1..=last of the volume `dir` are there and all the same process's.
fn no_gap(dir: &Path, started: &str) -> u64 {
    let last = last_file(dir).unwrap();
    for n in 1..=last {
        let bytes = std::fs::read(dir.join(format!("f-{n:06}"))).unwrap_or_default();
        assert!(bytes == volume_file(n, started), "file {n} of {last} is missing or not the same process's");
    }
    last
}

/// The start time the counter writes into its files.
fn started(dir: &Path) -> String {
    let first = String::from_utf8(std::fs::read(dir.join("f-000001")).unwrap()).unwrap();
    first.lines().next().unwrap().split(' ').nth(1).unwrap().to_string()
}

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Where the target keeps the volume pre-copies of its incoming moves.
fn precopies(agent: &Node) -> PathBuf {
    agent.state.join("volume-precopies")
}

/// The entries of `dir` (none when it does not exist).
fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn moves_with_its_volume(mode: &str, expect: &str) {
    if !ready() {
        return;
    }
    let (agent, source, name) = start(&format!("vol-{mode}"), &[]);
    let w = Workload { name: name.clone(), nodes: [&source, &agent.node] };
    let (from, to) = (volume(&source, &name), volume(&agent.node, &name));
    assert_eq!(away_e2e::file_mode(&from) & 0o777, 0o700, "the volume is not owner-only");
    // beside the counter's 4 MiB preload: files the move will find unchanged, rewritten
    // and deleted, in a directory of their own
    let mine = from.join("mine");
    std::fs::create_dir(&mine).unwrap();
    for (i, f) in ["keep-1", "keep-2", "rewrite", "delete"].iter().enumerate() {
        std::fs::write(mine.join(f), noise(i as u64 + 1, 256 << 10)).unwrap();
    }
    wait_for(20, || last_file(&from).filter(|n| *n >= 10)).expect("the counter writes into its volume");
    // what the source had, moments before the move
    let before = digests(&from);
    let last_before = last_file(&from).unwrap();
    let started = started(&from);

    // the move, held between its pre-copy and its freeze
    let mut migrate =
        source.cmd(&["migrate", &name, "--to", &agent.api, "--json", "--source-name", "source", "--mode", mode]);
    migrate.env("AWAY_FAULT_HOLD_AFTER_PRECOPY", "2");
    let moving = std::thread::spawn(move || migrate.output().expect("run away migrate"));
    wait_for(30, || (entries(&precopies(&agent.node)) > 0).then_some(())).expect("the target got a pre-copy");
    // after the pre-copy: one file rewritten in place (same size), one deleted, one new
    let rewritten = noise(99, 256 << 10);
    std::fs::write(mine.join("rewrite"), &rewritten).unwrap();
    std::fs::remove_file(mine.join("delete")).unwrap();
    std::fs::write(mine.join("new"), b"written after the pre-copy").unwrap();
    let out = moving.join().unwrap();
    let (out, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let report: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("migrate --mode {mode} failed ({e}): {err}"));
    assert_eq!(report["mode"], expect, "{report}");
    let volumes = &report["volumes"];
    eprintln!(
        "{mode}: downtime {} ms, total {} ms, raw {} B, wire {} B; volume: pre-copy {} B ({} B wire), in the freeze {} B in {} files; {}",
        report["downtime_millis"], report["total_millis"], report["bytes_raw"], report["bytes_wire"],
        volumes["precopy_bytes_raw"], volumes["precopy_bytes_wire"], volumes["frozen_bytes_raw"], volumes["frozen_files"],
        report["reason"]
    );
    assert!(report["bytes_raw"].as_u64().unwrap() > 4 << 20, "the volume did not travel: {report}");
    // the unchanged 4.5 MiB went before the freeze, only what changed during it
    assert!(volumes["precopy_bytes_raw"].as_u64().unwrap() > (4 << 20) + (512 << 10), "no pre-copy: {report}");
    let frozen = volumes["frozen_bytes_raw"].as_u64().unwrap();
    assert!(frozen < 1 << 20, "the freeze carried {frozen} B of the volume, not only its changes: {report}");
    assert!(volumes["precopied_files"].as_u64().unwrap() >= 3 && volumes["deleted_files"] == 1, "{report}");
    assert!(!from.parent().unwrap().exists(), "the source's volume directory is left: {}", from.display());
    assert_eq!(entries(&precopies(&agent.node)), 0, "the target kept the move's pre-copy");

    // it goes on writing there, into the target's volume
    wait_for(20, || last_file(&to).filter(|n| *n >= last_before + 20)).expect("the moved counter writes on");
    let after = digests(&to);
    for (file, sum) in &before {
        if file == "grow.log" || file.starts_with('.') {
            continue;
        }
        assert_eq!(after.get(file), Some(sum), "{file} differs on the target ({mode})");
    }
    no_gap(&to, &started);
    // the directory as it was at the freeze: unchanged, rewritten, deleted, new
    let moved = digests(&to.join("mine"));
    let want = BTreeMap::from([
        ("keep-1".to_string(), sha(&noise(1, 256 << 10))),
        ("keep-2".to_string(), sha(&noise(2, 256 << 10))),
        ("rewrite".to_string(), sha(&rewritten)),
        ("new".to_string(), sha(b"written after the pre-copy")),
    ]);
    assert_eq!(moved, want, "the target's volume is not the source's at the freeze ({mode})");
    // the log the process kept open: its old lines as they were, and no line lost since
    let log = std::fs::read_to_string(to.join("grow.log")).unwrap();
    let lines: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert!(lines.len() as u64 >= last_before, "grow.log lost lines: {} < {last_before}", lines.len());
    assert!(lines.iter().enumerate().all(|(i, n)| *n == i as u64 + 1), "grow.log has a gap: {log}");
    assert!(agent.node.running(&name) && !source.running(&name), "not exactly one instance, on the target");
    drop(w);
    assert!(!to.parent().unwrap().exists(), "away rm left the target's volume");
}

#[test]
fn staged() {
    moves_with_its_volume("staged", "stop-and-copy");
}

#[test]
fn streamed() {
    moves_with_its_volume("stop-copy", "stop-and-copy");
}

#[test]
fn lazy() {
    moves_with_its_volume("lazy", "lazy");
}

/// A move whose restore fails on the target: the source resumes from its checkpoint with
/// its volume as it was (its own, which the checkpoint's delta was taken from) and writes
/// on with no gap; the target keeps no volume and no pre-copy.
#[test]
fn a_failed_move_keeps_the_volume_at_the_source() {
    if !ready() {
        return;
    }
    let (agent, source, name) = start("vol-fail", &[("AWAY_FAULT_RESTORE", "fail")]);
    let _w = Workload { name: name.clone(), nodes: [&source, &agent.node] };
    let (from, to) = (volume(&source, &name), volume(&agent.node, &name));
    wait_for(20, || last_file(&from).filter(|n| *n >= 10)).expect("the counter writes into its volume");
    let before = digests(&from);
    let (ok, _, err) =
        source.away(&["migrate", &name, "--to", &agent.api, "--source-name", "source", "--mode", "staged"]);
    assert!(!ok && err.contains("resumed"), "the move should have failed and the source resumed: {err}");
    assert!(!to.parent().unwrap().exists(), "the target kept a volume: {}", to.display());
    assert_eq!(entries(&precopies(&agent.node)), 0, "the target kept the move's pre-copy");
    let last_before = before.keys().filter_map(|f| f.strip_prefix("f-")?.parse::<u64>().ok()).max().unwrap();
    wait_for(20, || last_file(&from).filter(|n| *n >= last_before + 20)).expect("the resumed counter writes on");
    let after = digests(&from);
    for (file, sum) in before.iter().filter(|(f, _)| f.starts_with("f-") || *f == "preload.bin") {
        assert_eq!(after.get(file), Some(sum), "{file} changed at the source");
    }
    no_gap(&from, &started(&from));
    assert!(source.running(&name));
}
