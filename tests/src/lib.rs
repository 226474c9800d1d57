//! Shared support for the end-to-end tests in `tests/tests/`.
//!
//! These tests talk to the real daemons (containerd, dockerd), CRIU and QEMU and need
//! root. When a requirement is missing they skip with a message on a developer's
//! machine, but under CI (`CI=true`) they fail loudly: a CI run that skipped the real
//! thing must not look green.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// True when running under CI, where missing requirements are failures.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Skip (developer machine) or fail (CI) because `what` is missing.
/// Returns false so callers can write `if !require(...) { return; }`.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("required for this test but missing: {what} (CI=true, so this is a failure, not a skip)");
    }
    eprintln!("SKIP: {what} is missing (set CI=true to make this a failure)");
    false
}

/// Require root (uid 0).
pub fn require_root() -> bool {
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    require(uid.is_ok_and(|u| u == "0"), "root (uid 0)")
}

/// Require a unix socket that answers at `path` (e.g. containerd's or dockerd's).
pub fn require_socket(path: &str, daemon: &str) -> bool {
    let ok = std::os::unix::net::UnixStream::connect(path).is_ok();
    require(ok, &format!("{daemon} answering on {path} (start it with deploy/services.sh start)"))
}

/// Path to the `away` binary of this workspace, built once per test process.
/// (Integration tests of another package get no CARGO_BIN_EXE_away, so we build it.)
pub fn away_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = workspace_root();
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "away", "--bin", "away"])
            .current_dir(&root)
            .status()
            .expect("run cargo build -p away");
        assert!(status.success(), "cargo build -p away failed");
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        target.join("debug").join("away")
    })
}

/// Run `away ARGS...` and return its output (does not check the exit code).
pub fn away(args: &[&str]) -> Output {
    Command::new(away_bin()).args(args).output().expect("run away")
}

/// Run `away ARGS...`, assert success, and parse stdout as JSON.
pub fn away_json(args: &[&str]) -> serde_json::Value {
    let out = away(args);
    assert!(
        out.status.success(),
        "away {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("away {args:?}: stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}
