//! Host probes leave nothing behind, even when away is killed in the middle of one. An
//! interrupted `away doctor` or agent (Ctrl-C, kill) runs no destructor, so
//! `kill_on_drop` and `TempDir` alone would leave a KVM probe guest spinning in QEMU, the
//! CRIU probe frozen under a CRIU that waits forever for its page-server client, and
//! their scratch directories in /tmp. The kernel's parent-death signal ends the
//! processes; the next probe removes the directories.

use std::path::Path;
use std::process::Command;

use super::process::{die_with_spawning_thread, Signal};

/// Make `cmd`'s process get SIGKILL when the thread that spawns it ends (for away's
/// callers: with away, since they spawn from threads that outlive the child). With
/// `new_session` it also starts a session of its own (see `criu_stack` for why).
pub(crate) fn tie_to_this_process(cmd: &mut Command, new_session: bool) -> &mut Command {
    die_with_spawning_thread(cmd, Signal::KILL, new_session)
}

/// A scratch directory for a probe of `kind`, removed when dropped:
/// `$TMPDIR/away-<kind>-<pid namespace>-<pid>-<random>`. Those of every away in this pid
/// namespace that no longer runs are removed first (pids are only unique within a pid
/// namespace, and /tmp is shared across them).
pub(crate) fn probe_dir(kind: &str) -> std::io::Result<tempfile::TempDir> {
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|l| l.to_string_lossy().to_string()).unwrap_or_default();
    let ns: String = ns.chars().filter(char::is_ascii_digit).collect();
    let prefix = format!("away-{kind}-{ns}-");
    let tmp = std::env::temp_dir();
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let rest = name.to_str().and_then(|n| n.strip_prefix(&prefix));
        let pid = rest.and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    tempfile::Builder::new().prefix(&format!("{prefix}{}-", std::process::id())).tempdir_in(tmp)
}
