//! Does this CRIU keep a lazy dump lazy when a thread's stack pointer sits on a page
//! boundary? CRIU 4.2.1 as released does not: its `is_stack()` compares the offsets in
//! the page where it means the pages, takes every page for a stack page and writes the
//! whole memory into the images, so a "lazy" move of such a process is a stop-and-copy
//! (deploy/criu/0001-is-stack-page-number.patch has the fix, `deploy/install.sh` builds
//! CRIU with it).
//!
//! The probe asks the real CRIU: a probe process (the caller's own executable, run with
//! [`PROBE_ENV`]: see [`serve_if_asked`]) touches [`PROBE_MEMORY`] and sleeps with its
//! stack pointer on a page boundary; `criu dump --lazy-pages --leave-running` dumps it,
//! and the size of the pages it wrote tells which CRIU this is.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::criu_args::CriuDump;

/// Set in the probe process's environment: `away` then becomes the probe.
pub const PROBE_ENV: &str = "AWAY_CRIU_STACK_PROBE";
/// Memory the probe process writes: a lazy dump leaves it out of the images.
pub const PROBE_MEMORY: usize = 16 << 20;

/// In the probe process (started with [`PROBE_ENV`] set): write [`PROBE_MEMORY`] and
/// sleep, with the stack pointer on a page boundary, until killed. Returns at once in
/// any other process. Call it first thing in `main`.
pub fn serve_if_asked() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    close_inherited_fds();
    let mut memory = vec![0u8; PROBE_MEMORY];
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&memory);
    loop {
        super::page_boundary::sleep(Duration::from_secs(3600));
    }
}

/// Close every descriptor above stderr. The probe needs none, and whatever its caller's
/// caller left inheritable (a CI runner's unix socket, say) would make CRIU refuse the
/// dump ("External socket is used") and the probe say nothing about CRIU.
fn close_inherited_fds() {
    // kernels before 5.9 have no close_range: one by one, from /proc (collected first:
    // reading the directory holds a descriptor of its own)
    let listed = || -> Vec<i32> {
        std::fs::read_dir("/proc/self/fd")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect()
    };
    // Closing descriptors by number is what rustix cannot offer safely (nor close_range
    // at all).
    // SAFETY: close_range and close have no memory preconditions, and nothing in this
    // process uses descriptors above 2 yet (this runs first in main); a descriptor that
    // was the directory's is closed already and close returns EBADF, which is fine.
    #[allow(unsafe_code)]
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in listed() {
                libc::close(fd);
            }
        }
    }
}

/// Dump a probe process (`probe_exe` run with [`PROBE_ENV`]) lazily with `criu`: the
/// bytes of pages CRIU wrote into the images — far below [`PROBE_MEMORY`] when the memory
/// stayed lazy, above it with the is_stack() bug ([`stays_lazy`]). Err when the probe
/// could not run (not root, not x86_64, CRIU failed).
pub async fn lazy_dump_pages_written(criu: &Path, probe_exe: &Path) -> Result<u64, String> {
    if !cfg!(target_arch = "x86_64") {
        return Err("the probe is x86_64 only".into());
    }
    if !super::process::is_root() {
        return Err("needs root (CRIU dumps the probe process)".into());
    }
    let dir = super::probe_cleanup::probe_dir("criu-stack-probe").map_err(|e| format!("scratch directory: {e}"))?;
    probe(criu, probe_exe, dir.path()).await
}

/// What [`lazy_dump_pages_written`] found means: the probe's memory stayed lazy.
pub fn stays_lazy(pages_written: u64) -> bool {
    pages_written < PROBE_MEMORY as u64 / 2
}

async fn probe(criu: &Path, probe_exe: &Path, dir: &Path) -> Result<u64, String> {
    let mut probe_cmd = Command::new(probe_exe);
    // its own session: CRIU refuses a process whose session leader it cannot see ("A
    // session leader of … is outside of its pid namespace"), as when CI runs us in a pid
    // namespace of its own and the session began outside it
    super::probe_cleanup::tie_to_this_process(probe_cmd.as_std_mut(), true);
    let mut child = probe_cmd
        .env(PROBE_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the probe process {}: {e}", probe_exe.display()))?;
    let pid = child.id().ok_or("the probe process ended at once")?;
    // it has written its memory and sleeps where it should
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if sleeping_on_page_boundary(pid) {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill().await;
            return Err(format!("{} did not become the probe process ({PROBE_ENV})", probe_exe.display()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = super::free_loopback_port().map_err(|e| format!("no free port for CRIU's page server: {e}"))?;
    let args = CriuDump {
        pid,
        images_dir: dir.to_path_buf(),
        lazy_pages: Some((std::net::Ipv4Addr::LOCALHOST, port).into()),
        leave_running: true,
        log_file: Some("dump.log".into()),
    }
    .args();
    let mut dump_cmd = Command::new(criu);
    super::probe_cleanup::tie_to_this_process(dump_cmd.as_std_mut(), false);
    let mut dump = dump_cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", criu.display()))?;
    // the page server listens once the images are written; a connection that closes
    // without a request ends the dump, and the probe runs on (--leave-running)
    let deadline = Instant::now() + Duration::from_secs(20);
    let served = loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            break true;
        }
        if Instant::now() > deadline || dump.try_wait().ok().flatten().is_some() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), dump.wait()).await;
    let _ = dump.kill().await;
    let _ = child.kill().await;
    let _ = child.wait().await;
    if !served {
        let log = std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
        // the cause is the last error before CRIU's closing "Dumping FAILED"
        let cause = log.lines().rev().find(|l| l.contains("Error") && !l.contains("Dumping FAILED"));
        let cause = cause.or(log.lines().last()).unwrap_or("no log");
        return Err(format!("criu dump --lazy-pages of the probe failed: {}", cause.trim()));
    }
    Ok(pages_written(dir))
}

/// The probe's main thread waits in nanosleep with its stack pointer on a page boundary
/// (`/proc/PID/syscall`: number, six arguments, stack pointer, program counter).
fn sleeping_on_page_boundary(pid: u32) -> bool {
    let Ok(line) = std::fs::read_to_string(format!("/proc/{pid}/syscall")) else { return false };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let sp = fields.get(7).and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
    fields.first() == Some(&"35") && sp.is_some_and(|sp| sp % 4096 == 0)
}

/// Bytes of memory pages a dump wrote into its images.
fn pages_written(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_written_counts_only_page_images() {
        let dir = std::env::temp_dir().join(format!("away-criu-stack-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("pages-1.img"), vec![0u8; 8192]).unwrap();
        std::fs::write(dir.join("pagemap-42.img"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.join("dump.log"), "x").unwrap();
        assert_eq!(pages_written(&dir), 8192);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
