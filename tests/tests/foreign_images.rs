//! Images away did not build. The counter's static binary (taken out of away's own
//! image, so no network is needed) goes into a `FROM scratch` Dockerfile that the real
//! tools build and export:
//!
//! * `docker build` + `docker save` on the running dockerd: Docker 20.10 writes the
//!   legacy format (`manifest.json`, `<id>/layer.tar`), Docker ≥ 25 an OCI layout inside;
//!   the test detects which and prints it, so the same test covers both profiles;
//! * `podman build` + `podman save --format oci-archive` (gzip layers), `--format
//!   docker-archive` (legacy format), and `podman push --compression-format zstd` to an
//!   untagged oci-archive (zstd layers).
//!
//! Each runs on containerd and on Docker through `away run` and answers; Docker's and
//! podman's OCI images move between two nodes with their count; one boots as a VM;
//! broken tars are refused naming the file and the problem, with nothing left in
//! containerd.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use away_e2e::{
    away_bin, free_port, http_get, lab_image, require, require_root, require_socket, require_vm_host, wait_for,
    LocalAgent, Node,
};
use serde_json::Value;

fn ready() -> bool {
    require_root()
        && require_socket("/run/containerd/containerd.sock", "containerd")
        && require_socket("/run/docker.sock", "dockerd")
        && require(Command::new("podman").arg("--version").output().is_ok(), "podman (apt-get install podman)")
}

/// The docker CLI: `AWAY_DOCKER_CLI`, else the active runtime profile's.
fn docker_cli() -> PathBuf {
    std::env::var_os("AWAY_DOCKER_CLI").map(PathBuf::from).unwrap_or_else(away_e2e::docker_cli)
}

fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The foreign image tars, made once per test process.
struct Foreign {
    /// `docker save` output, and which format this Docker wrote.
    docker_save: PathBuf,
    docker_format: &'static str,
    podman_oci: PathBuf,
    podman_docker: PathBuf,
    podman_zstd: PathBuf,
}

fn foreign() -> &'static Foreign {
    static F: OnceLock<Foreign> = OnceLock::new();
    F.get_or_init(|| {
        let dir = PathBuf::from(format!("/tmp/away-e2e-foreign-{}", std::process::id()));
        let ctx = dir.join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        // the counter's binary, out of away's own image
        let own = away_image::read_image_tar(&lab_image("counter")).unwrap();
        let tree = away_image::vm::rootfs(&own.image).unwrap();
        let Some(away_image::tree::Node::File { data, .. }) = tree.entries.get("counter") else {
            panic!("no /counter in away's counter image")
        };
        std::fs::write(ctx.join("counter"), data).unwrap();
        std::fs::set_permissions(ctx.join("counter"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY counter /counter\nENV COUNTER_PORT=8080\nEXPOSE 8080\nENTRYPOINT [\"/counter\"]\n",
        )
        .unwrap();

        // Docker: the classic builder needs no buildx plugin, on 20.10 and on 28
        let docker = docker_cli();
        let tag = format!("away-e2e-foreign/docker-{}:1", std::process::id());
        let version = must(Command::new(&docker).args(["version", "--format", "{{.Server.Version}}"]));
        must(Command::new(&docker).env("DOCKER_BUILDKIT", "0").args(["build", "-q", "-t", &tag]).arg(&ctx));
        let docker_save = dir.join("docker-save.tar");
        must(Command::new(&docker).args(["save", "-o"]).arg(&docker_save).arg(&tag));
        // away's runs must load it themselves
        must(Command::new(&docker).args(["rmi", &tag]));
        let names = must(Command::new("tar").arg("-tf").arg(&docker_save));
        let docker_format = if names.lines().any(|l| l.trim_start_matches("./") == "index.json") {
            "OCI layout inside (index.json + blobs/sha256 + manifest.json)"
        } else {
            "legacy (manifest.json + <id>/layer.tar, no OCI blobs)"
        };
        println!("docker save of Docker {}: {docker_format}", version.trim());

        // podman, with its own storage under the test's dir (nothing of the host's touched)
        let podman = |args: &[&str]| {
            must(
                Command::new("podman")
                    .arg("--root")
                    .arg(dir.join("podman-root"))
                    .arg("--runroot")
                    .arg(dir.join("podman-run"))
                    .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"])
                    .args(args),
            )
        };
        let ptag = "localhost/away-e2e-foreign/podman:1";
        podman(&["build", "-q", "-t", ptag, ctx.to_str().unwrap()]);
        let podman_oci = dir.join("podman-oci.tar");
        let podman_docker = dir.join("podman-docker.tar");
        let podman_zstd = dir.join("podman-zstd.tar");
        podman(&["save", "--format", "oci-archive", "-o", podman_oci.to_str().unwrap(), ptag]);
        podman(&["save", "--format", "docker-archive", "-o", podman_docker.to_str().unwrap(), ptag]);
        podman(&[
            "push",
            "-q",
            "--compression-format",
            "zstd",
            ptag,
            &format!("oci-archive:{}", podman_zstd.display()),
        ]);
        println!("podman: {}", must(Command::new("podman").arg("--version")).trim());
        Foreign { docker_save, docker_format, podman_oci, podman_docker, podman_zstd }
    })
}

/// `away image inspect --json` of a tar.
fn inspect(tar: &Path) -> Value {
    let out = Command::new(away_bin()).args(["image", "inspect", "--json"]).arg(tar).output().unwrap();
    assert!(out.status.success(), "inspect {}: {}", tar.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A workload, removed from its nodes when dropped.
struct Workload<'a> {
    name: String,
    port: u16,
    nodes: Vec<&'a Node>,
}

impl Drop for Workload<'_> {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = n.away(&["rm", "--force", &self.name]);
        }
    }
}

fn start<'a>(node: &'a Node, tar: &Path, name: &str, extra: &[&str]) -> Workload<'a> {
    std::fs::create_dir_all(&node.state).unwrap();
    let port = free_port();
    let w = Workload { name: format!("{name}-{}", std::process::id()), port, nodes: vec![node] };
    let env = format!("COUNTER_PORT={port}");
    let p = format!("{port}:{port}");
    let mut args = vec!["run", tar.to_str().unwrap(), "--name", &w.name, "-e", &env, "-p", &p];
    args.extend_from_slice(extra);
    let (ok, _, err) = node.away(&args);
    assert!(ok, "away run {} {extra:?} failed: {err}", tar.display());
    w
}

/// count and start time of the counter answering on `port`
fn state(port: u16) -> Option<(u64, u64)> {
    let v: Value = serde_json::from_str(&http_get(port, "/")?).ok()?;
    Some((v["count"].as_u64()?, v["started_unix_ms"].as_u64()?))
}

#[test]
fn each_foreign_image_runs_on_containerd_and_docker() {
    if !ready() {
        return;
    }
    let f = foreign();
    println!("docker save format: {}", f.docker_format);
    let node = node("run", "each");
    let images = [
        ("docker-save", &f.docker_save),
        ("podman-oci", &f.podman_oci),
        ("podman-docker", &f.podman_docker),
        ("podman-zstd", &f.podman_zstd),
    ];
    for (what, tar) in images {
        let report = inspect(tar);
        let media: Vec<&str> =
            report["layers"].as_array().unwrap().iter().map(|l| l["media_type"].as_str().unwrap()).collect();
        println!("{what}: format {}, tags {}, layers {media:?}", report["format"], report["tags"]);
        if what == "podman-zstd" {
            assert_eq!(media, ["application/vnd.oci.image.layer.v1.tar+zstd"]);
        }
        for runtime in ["containerd", "docker"] {
            let w = start(&node, tar, &format!("fi-{what}-{runtime}"), &["--runtime", runtime]);
            let s = wait_for(30, || state(w.port).filter(|s| s.0 >= 3));
            assert!(s.is_some(), "{what} on {runtime}: the counter does not answer on {}", w.port);
            println!("{what} on {runtime}: answers, count {}", s.unwrap().0);
        }
    }
}

/// The target agent, killed (by its PID) when dropped.
fn start_target(test: &str) -> LocalAgent {
    let log = PathBuf::from(format!("/tmp/away-e2e-fi/agent-{test}-{}.log", std::process::id()));
    node("target", test).start_agent(&format!("target-{test}"), &[], &[], &log)
}

fn move_keeps_the_count(what: &str, tar: &Path, runtime: &str) {
    let test = format!("mv-{what}-{runtime}");
    let agent = start_target(&test);
    let source = node("source", &test);
    let mut w = start(&source, tar, &format!("fi-{test}"), &["--runtime", runtime]);
    w.nodes.push(&agent.node);
    let before = wait_for(30, || state(w.port).filter(|s| s.0 >= 10)).expect("counter counts");
    let (ok, out, err) = source.away(&[
        "migrate",
        &w.name,
        "--to",
        &agent.api,
        "--json",
        "--source-name",
        "source",
        "--reconnect-timeout",
        "15",
    ]);
    assert!(ok, "{what} on {runtime}: migrate failed: {err}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert!(agent.node.running(&w.name), "{what} is not running on the target after the move");
    if runtime == "containerd" {
        assert!(!source.running(&w.name), "{what} still runs on the source");
    }
    let after = wait_for(20, || state(w.port)).expect("counter answers after the move");
    assert_eq!(after.1, before.1, "{what}: the counter restarted instead of being restored");
    assert!(after.0 >= before.0, "{what}: count went back: {} -> {}", before.0, after.0);
    println!(
        "{what} moved {runtime} -> {runtime}: count {} -> {}, downtime {} ms",
        before.0, after.0, report["downtime_millis"]
    );
}

#[test]
fn docker_saved_image_moves_between_containerd_nodes_with_its_count() {
    if ready() {
        let f = foreign();
        println!("docker save format: {}", f.docker_format);
        move_keeps_the_count("docker-save", &f.docker_save, "containerd");
    }
}

#[test]
fn docker_saved_image_moves_between_docker_nodes_with_its_count() {
    if ready() {
        let f = foreign();
        println!("docker save format: {}", f.docker_format);
        move_keeps_the_count("docker-save", &f.docker_save, "docker");
    }
}

#[test]
fn podman_oci_archive_moves_between_containerd_nodes_with_its_count() {
    if ready() {
        move_keeps_the_count("podman-oci", &foreign().podman_oci, "containerd");
    }
}

#[test]
fn podman_oci_archive_moves_between_docker_nodes_with_its_count() {
    if ready() {
        move_keeps_the_count("podman-oci", &foreign().podman_oci, "docker");
    }
}

#[test]
fn docker_saved_image_boots_as_a_vm() {
    if !ready() || !require_vm_host() {
        return;
    }
    let f = foreign();
    let node = node("vm", "boot");
    let started = std::time::Instant::now();
    let w = start(&node, &f.docker_save, "fi-vm", &["--vm"]);
    let s = wait_for(120, || state(w.port));
    assert!(s.is_some(), "the docker-saved image as a VM does not answer on {}", w.port);
    println!(
        "docker save ({}) as a VM answered {:.1} s after away run started",
        f.docker_format,
        started.elapsed().as_secs_f64()
    );
}

/// A tar's regular files, in order.
fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(std::fs::File::open(path).unwrap());
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type() == tar::EntryType::Regular {
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            out.push((name, data));
        }
    }
    out
}

fn write_tar(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn broken_tars_are_refused_and_leave_nothing_in_containerd() {
    if !ready() {
        return;
    }
    let f = foreign();
    let dir = PathBuf::from(format!("/tmp/away-e2e-foreign-{}", std::process::id()));
    let good = &f.podman_oci;
    let oci = inspect(good);
    let layer = oci["layers"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();

    let truncated = dir.join("truncated.tar");
    let bytes = std::fs::read(good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let missing = dir.join("missing-layer.tar");
    let mut files = entries(good);
    files.retain(|(name, _)| !name.ends_with(&layer));
    write_tar(&missing, &files);

    // the layer's media type replaced by one nobody knows, the manifest's digest and size
    // fixed up in index.json: only the media type is wrong
    let odd = dir.join("unknown-media-type.tar");
    let manifest = oci["manifest_digest"].as_str().unwrap().to_string();
    let mut files = entries(good);
    let at = files.iter().position(|(name, _)| name.ends_with(manifest.trim_start_matches("sha256:"))).unwrap();
    let edited = String::from_utf8(files[at].1.clone())
        .unwrap()
        .replace("application/vnd.oci.image.layer.v1.tar+gzip", "application/vnd.example.layer.v1.tar+lz4")
        .into_bytes();
    let edited_digest = away_image::tree::sha256_digest(&edited);
    files[at] = (format!("blobs/sha256/{}", edited_digest.trim_start_matches("sha256:")), edited.clone());
    let index = files.iter_mut().find(|(name, _)| name == "index.json").unwrap();
    let mut v: Value = serde_json::from_slice(&index.1).unwrap();
    v["manifests"][0]["digest"] = edited_digest.into();
    v["manifests"][0]["size"] = edited.len().into();
    index.1 = serde_json::to_vec(&v).unwrap();
    write_tar(&odd, &files);

    // a layer that passes every digest check but is no tar: only containerd's unpacker
    // finds out, after blobs were written
    let not_a_tar = dir.join("not-a-tar-layer.tar");
    let mut layer_blob = away_image::tree::LayerBlob::from_tar(&[0x42; 4096]);
    layer_blob.diff_id = away_image::tree::sha256_digest(&[0x42; 4096]);
    let config = serde_json::from_value(serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/counter"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_blob.diff_id]},
    }))
    .unwrap();
    away_image::archive::Image {
        config,
        layers: vec![layer_blob],
        tags: vec![format!("away-e2e/not-a-tar:{}", std::process::id())],
    }
    .write_tar(&not_a_tar)
    .unwrap();

    let node = node("broken", "refused");
    std::fs::create_dir_all(&node.state).unwrap();
    let cases: [(&Path, &[&str]); 4] = [
        (&truncated, &["truncated"]),
        (&missing, &["layer 0", &layer, "missing"]),
        (&odd, &["application/vnd.example.layer.v1.tar+lz4", "cannot unpack"]),
        (&not_a_tar, &["apply layer"]),
    ];
    for (tar, needles) in cases {
        let name = format!("fi-broken-{}", std::process::id());
        let (ok, _, err) = node.away(&["run", tar.to_str().unwrap(), "--name", &name, "--runtime", "containerd"]);
        let _ = node.away(&["rm", "--force", &name]);
        assert!(!ok, "away run {} succeeded", tar.display());
        println!("{}: {}", tar.display(), err.trim());
        let file_named = err.contains(tar.file_name().unwrap().to_str().unwrap());
        assert!(file_named, "the error names the file: {err}");
        for n in needles {
            assert!(err.contains(n), "the error says {n:?}: {err}");
        }
        // nothing half-imported: no image record, no blobs, no snapshots in the node's namespace
        assert_eq!(ctr(&node, &["images", "ls", "-q"]).trim(), "", "an image record was left for {}", tar.display());
        let content = wait_for(10, || {
            let c = ctr(&node, &["content", "ls", "-q"]);
            c.trim().is_empty().then_some(())
        });
        assert!(content.is_some(), "content left for {}: {}", tar.display(), ctr(&node, &["content", "ls"]));
        let snaps = ctr(&node, &["snapshots", "ls"]);
        assert!(snaps.lines().count() <= 1, "snapshots left for {}: {snaps}", tar.display());
    }
    let _ = Command::new(away_runtime::host::runtime_bin("ctr")).args(["namespaces", "rm", &node.ns]).output();
}

/// Node `role` of test `test`.
fn node(role: &str, test: &str) -> Node {
    let id = format!("{role}-{test}-{}", std::process::id());
    Node::at(format!("away-fi-{id}"), PathBuf::from(format!("/tmp/away-e2e-fi/{id}")))
}

/// `ctr` (the active profile's) in the node's namespace.
fn ctr(node: &Node, args: &[&str]) -> String {
    must(Command::new(away_runtime::host::runtime_bin("ctr")).args(["-n", &node.ns]).args(args))
}
