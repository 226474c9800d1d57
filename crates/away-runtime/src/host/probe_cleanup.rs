//! Host probes leave nothing behind, even when away is killed in the middle of one. An
//! interrupted `away doctor` or agent (Ctrl-C, kill) runs no destructor, so
//! `kill_on_drop` and `TempDir` alone would leave a KVM probe guest spinning in QEMU, the
//! CRIU probe frozen under a CRIU that waits forever for its page-server client, and
//! their scratch directories in /tmp. The kernel's parent-death signal ends the
//! processes; the next probe removes the directories.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Make `cmd`'s process get SIGKILL when the thread that spawns it ends (for away's
/// callers: with away, since they spawn from threads that outlive the child). With
/// `new_session` it also starts a session of its own (see `criu_stack` for why).
pub(crate) fn tie_to_this_process(cmd: &mut Command, new_session: bool) -> &mut Command {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, prctl,
    // getppid) and no allocation.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if new_session && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // away may have ended before prctl: then nothing would ever signal this one
            if libc::getppid() != parent {
                return Err(std::io::Error::other("away ended while starting this process"));
            }
            Ok(())
        })
    }
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
