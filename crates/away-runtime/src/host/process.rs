//! Host processes, the one way away drives them: signals to a process or a process group,
//! the parent-death signal, pidfds, and one scan of /proc. Everything sits on rustix, so
//! callers need no `unsafe` and no `kill(1)`.
//!
//! Pids are `u32` as std hands them out (`Child::id`). A pid names a process only while
//! it runs: between finding a process (by its command line, in a pidfile) and signalling
//! it, that process may end and its pid go to another. [`signal_if`] and [`kill_where`]
//! close that race with a pidfd: they hold the process first, then check it is the one
//! meant, then signal the process they hold.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;

use rustix::io::Errno;
use rustix::process::Pid;
pub use rustix::process::Signal;

fn to_pid(pid: u32) -> io::Result<Pid> {
    // 0 and negative numbers mean groups to kill(2), never one process
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("invalid pid {pid}")))
}

/// ESRCH (no such process) is the outcome a signal to end a process wants.
fn gone_is_ok(r: rustix::io::Result<()>) -> io::Result<()> {
    match r {
        Err(Errno::SRCH) => Ok(()),
        r => r.map_err(io::Error::from),
    }
}

/// Send `sig` to process `pid`; Ok when it has already ended.
pub fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    gone_is_ok(rustix::process::kill_process(to_pid(pid)?, sig))
}

/// Send `sig` to every process of group `pgid` (a child started with
/// `process_group(0)` leads the group of its own pid); Ok when the group is empty.
pub fn signal_group(pgid: u32, sig: Signal) -> io::Result<()> {
    gone_is_ok(rustix::process::kill_process_group(to_pid(pgid)?, sig))
}

/// A process held by a pidfd: signals go to that process, never to a later one that got
/// its pid.
#[derive(Debug)]
pub struct Pidfd {
    pid: u32,
    fd: OwnedFd,
}

impl Pidfd {
    /// Hold process `pid`; None when no such process exists (a zombie still exists).
    pub fn open(pid: u32) -> io::Result<Option<Pidfd>> {
        match rustix::process::pidfd_open(to_pid(pid)?, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => Ok(Some(Pidfd { pid, fd })),
            Err(Errno::SRCH) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Send `sig` to the held process; Ok when it has already ended.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        gone_is_ok(rustix::process::pidfd_send_signal(self.fd.as_fd(), sig))
    }
}

/// Send `sig` to process `pid` if it is still the one `is_it` describes, checked after the
/// process is held (a pidfd; on kernels without pidfds, before 5.3, checked just before a
/// plain kill). Ok(true): signalled; Ok(false): gone, or not that process.
pub fn signal_if(pid: u32, sig: Signal, is_it: impl FnOnce(&ProcessEntry) -> bool) -> io::Result<bool> {
    let held = match Pidfd::open(pid) {
        Ok(None) => return Ok(false),
        Ok(Some(fd)) => Some(fd),
        Err(e) if e.raw_os_error() == Some(Errno::NOSYS.raw_os_error()) => None,
        Err(e) => return Err(e),
    };
    if !process(pid).is_some_and(|p| is_it(&p)) {
        return Ok(false);
    }
    match held {
        Some(fd) => fd.signal(sig)?,
        None => signal(pid, sig)?,
    }
    Ok(true)
}

/// Send `sig` to every process `select` picks (each checked again once held, as in
/// [`signal_if`]); returns the pids signalled. This process is never among them.
pub fn kill_where(mut select: impl FnMut(&ProcessEntry) -> bool, sig: Signal) -> Vec<u32> {
    let me = std::process::id();
    let picked: Vec<u32> = processes().filter(|p| p.pid != me && select(p)).map(|p| p.pid).collect();
    picked
        .into_iter()
        .filter(|&pid| match signal_if(pid, sig, &mut select) {
            Ok(signalled) => signalled,
            Err(e) => {
                tracing::warn!(pid, "cannot signal process {pid}: {e}");
                false
            }
        })
        .collect()
}

/// For `pre_exec` (async-signal-safe, no allocation): the child gets `sig` when the
/// thread that spawned it ends. Fails with ESRCH when `parent` (the spawning process's
/// pid, taken before the spawn) has already ended, since then nothing would ever signal
/// the child.
pub fn set_parent_death_signal(sig: Signal, parent: u32) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(sig))?;
    if rustix::process::getppid().map(Pid::as_raw_nonzero).map(|p| p.get() as u32) != Some(parent) {
        return Err(io::Error::from_raw_os_error(Errno::SRCH.raw_os_error()));
    }
    Ok(())
}

/// Make `cmd`'s process get `sig` when the thread that spawns it ends (for callers that
/// spawn from threads living as long as away: when away ends). With `new_session` it also
/// leads a session of its own.
pub fn die_with_spawning_thread(
    cmd: &mut std::process::Command,
    sig: Signal,
    new_session: bool,
) -> &mut std::process::Command {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and makes only raw syscalls
    // (setsid, prctl, getppid) through rustix: async-signal-safe, no allocation.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if new_session {
                rustix::process::setsid()?;
            }
            set_parent_death_signal(sig, parent)
        })
    }
}

/// Give `cmd`'s process descriptor `fd` as number `target` (without close-on-exec), e.g.
/// for `runc checkpoint --status-fd 3`. `fd` must stay open until the spawn.
pub fn inherit_fd_as<'c>(
    cmd: &'c mut std::process::Command,
    fd: BorrowedFd<'_>,
    target: RawFd,
) -> &'c mut std::process::Command {
    let fd = fd.as_raw_fd();
    // SAFETY: the closure runs between fork and exec and makes only dup2/fcntl calls
    // (async-signal-safe, no allocation) on descriptor numbers of the child's own table.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would keep close-on-exec: clear the flag instead
            let rc = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// True when this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Move the calling thread into the network namespace `ns` (an open `/proc/PID/ns/net`
/// or `/run/netns/NAME`); sockets it makes from then on belong there.
pub fn enter_network_namespace(ns: &impl AsFd) -> io::Result<()> {
    rustix::thread::move_into_link_name_space(ns.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))?;
    Ok(())
}

/// True while process `pid` runs: it exists and is not a zombie (one that has ended but
/// whose parent, PID 1 here among them, has not reaped it yet).
pub fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| parse_stat(&s)).is_some_and(|s| s.runs())
}

/// One process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEntry {
    pub pid: u32,
    /// Its parent (0 for the first process of a pid namespace).
    pub ppid: u32,
    /// Its process group.
    pub pgrp: u32,
    /// Its session.
    pub session: u32,
    /// The state letter of `/proc/PID/stat` (`R`, `S`, `Z` for a zombie…).
    pub state: char,
    /// The command name (at most 15 bytes, the kernel's `comm`).
    pub comm: String,
    /// The command line (empty for kernel threads and zombies), lossily UTF-8.
    pub argv: Vec<String>,
}

impl ProcessEntry {
    /// Not a zombie.
    pub fn runs(&self) -> bool {
        self.state != 'Z'
    }

    /// Some argument of the command line contains `needle` (for a needle without NUL,
    /// the same as searching the whole `/proc/PID/cmdline`).
    pub fn cmdline_contains(&self, needle: &str) -> bool {
        self.argv.iter().any(|a| a.contains(needle))
    }

    /// The command line joined by spaces, for messages.
    pub fn cmdline(&self) -> String {
        self.argv.join(" ")
    }
}

/// The fields of `/proc/PID/stat` away uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: char,
    ppid: u32,
    pgrp: u32,
    session: u32,
}

impl Stat {
    fn runs(&self) -> bool {
        self.state != 'Z'
    }
}

/// `PID (COMM) STATE PPID PGRP SESSION …`; COMM may hold spaces and parentheses, so it
/// ends at the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let mut num = || f.next()?.parse::<u32>().ok();
    Some(Stat { comm: comm.to_string(), state, ppid: num()?, pgrp: num()?, session: num()? })
}

/// `/proc/PID/cmdline`: arguments each ended by a NUL.
fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Process `pid`, None when it does not exist (any more).
pub fn process(pid: u32) -> Option<ProcessEntry> {
    let stat = parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let argv = parse_cmdline(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default());
    let Stat { comm, state, ppid, pgrp, session } = stat;
    Some(ProcessEntry { pid, ppid, pgrp, session, state, comm, argv })
}

/// Every process in this pid namespace (as far as /proc is that namespace's), read one by
/// one as the iterator advances; processes that end meanwhile are skipped.
pub fn processes() -> impl Iterator<Item = ProcessEntry> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process)
}

/// The children of process `pid` (of its main thread: those of other threads are not
/// listed), from `/proc/PID/task/PID/children`; empty when it has none or is gone.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// Whether this process holds capability `cap` (a bit of /proc/self/status's CapEff).
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

/// CAP_SYS_RESOURCE's bit.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Why CRIU, run from here, cannot dump the process tree rooted at `pid`; None if it can
/// as far as this check knows.
///
/// CRIU reads every process's rlimits with prlimit(2), which a caller may do for a
/// process of another user only with CAP_SYS_RESOURCE. Root on some hosts (and in some
/// sandboxes) lacks it: a workload that runs any process as another user (a server whose
/// workers drop to `nobody`) then cannot be checkpointed, and saying so before the
/// freeze beats a failed dump.
pub fn criu_cannot_dump(pid: u32) -> Option<String> {
    if has_capability(CAP_SYS_RESOURCE) {
        return None;
    }
    let me = rustix::process::getuid().as_raw();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let uids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .map(|l| l.split_whitespace().filter_map(|u| u.parse().ok()).collect())
            .unwrap_or_default();
        if let Some(uid) = uids.iter().find(|u| **u != me) {
            let comm = process(p).map(|e| e.comm).unwrap_or_default();
            return Some(format!(
                "its process {p} ({comm}) runs as uid {uid}, and root on this host lacks CAP_SYS_RESOURCE, \
                 which CRIU needs to read the rlimits of another user's process"
            ));
        }
        todo.extend(children(p));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    /// Spawn `cmd` and wait for its command line: the kernel lets the spawning parent go
    /// on before it has set up the new program's arguments.
    fn spawned(cmd: &mut Command) -> std::process::Child {
        let child = cmd.stdin(Stdio::null()).spawn().unwrap();
        while process(child.id()).is_some_and(|p| p.argv.is_empty()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        child
    }

    fn sleeper() -> std::process::Child {
        spawned(Command::new("sleep").arg("30"))
    }

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name_parses() {
        let s = parse_stat("4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0\n").unwrap();
        assert_eq!(s, Stat { comm: "a) b (c)".into(), state: 'S', ppid: 1, pgrp: 4242, session: 4242 });
        let z = parse_stat("7 (qemu-system-x86) Z 1 7 7 0").unwrap();
        assert!(!z.runs());
        assert_eq!(parse_stat("7 (no end S 1 7 7"), None);
        assert_eq!(parse_stat("7 (x) S 1"), None);
    }

    #[test]
    fn cmdline_splits_at_nul() {
        assert_eq!(parse_cmdline(b"sleep\x0030\x00"), ["sleep", "30"]);
        assert_eq!(parse_cmdline(b"a\x00\x00b\x00"), ["a", "", "b"]);
        assert!(parse_cmdline(b"").is_empty());
        let p = ProcessEntry {
            pid: 1,
            ppid: 0,
            pgrp: 1,
            session: 1,
            state: 'S',
            comm: "qemu".into(),
            argv: parse_cmdline(b"qemu\x00-qmp\x00unix:/run/x/qmp.sock\x00"),
        };
        assert!(p.cmdline_contains("/run/x/qmp.sock"));
        assert!(!p.cmdline_contains("qmp unix"));
        assert_eq!(p.cmdline(), "qemu -qmp unix:/run/x/qmp.sock");
    }

    #[test]
    fn this_process_is_in_the_scan() {
        let me = processes().find(|p| p.pid == std::process::id()).unwrap();
        assert!(me.runs());
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(!me.argv.is_empty());
        assert!(process_runs(me.pid));
        assert!(!process_runs(u32::MAX));
    }

    #[test]
    fn signal_ends_a_child_and_a_gone_process_is_fine() {
        let mut child = sleeper();
        let pid = child.id();
        signal(pid, Signal::KILL).unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        // above pid_max: no such process
        signal(i32::MAX as u32, Signal::KILL).unwrap();
        assert!(signal(0, Signal::KILL).is_err(), "pid 0 would be our own group");
        assert!(signal(u32::MAX, Signal::KILL).is_err());
    }

    #[test]
    fn signal_group_reaches_the_group() {
        // a shell (`; :` keeps it from becoming its sleep) and its child, in a group
        let mut shell = spawned(Command::new("sh").args(["-c", "sleep 30; :"]).process_group(0));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let sleep = loop {
            let sleeps = children(shell.id()).into_iter().filter_map(process).find(|p| p.comm == "sleep");
            match sleeps {
                Some(p) => break p,
                None if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(5)),
                None => panic!("the shell started no sleep"),
            }
        };
        assert_eq!((sleep.ppid, sleep.pgrp), (shell.id(), shell.id()));
        signal_group(shell.id(), Signal::TERM).unwrap();
        assert_eq!(shell.wait().unwrap().signal(), Some(libc::SIGTERM));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_runs(sleep.pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!process_runs(sleep.pid), "the group's other process got the signal too");
    }

    #[test]
    fn pidfd_holds_the_process() {
        let mut child = sleeper();
        let fd = Pidfd::open(child.id()).unwrap().unwrap();
        assert_eq!(fd.pid(), child.id());
        fd.signal(Signal::KILL).unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        // reaped: the pid may be anyone's now, the pidfd still means the old process
        fd.signal(Signal::KILL).unwrap();
        assert!(Pidfd::open(i32::MAX as u32).unwrap().is_none());
    }

    #[test]
    fn signal_if_checks_the_process() {
        let mut child = sleeper();
        let pid = child.id();
        assert!(!signal_if(pid, Signal::KILL, |p| p.cmdline_contains("not-this-one")).unwrap());
        assert!(process_runs(pid));
        assert!(signal_if(pid, Signal::KILL, |p| p.argv == ["sleep", "30"]).unwrap());
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(!signal_if(i32::MAX as u32, Signal::KILL, |_| true).unwrap());
    }

    #[test]
    fn kill_where_picks_by_command_line() {
        // a command line no other process has
        let marker = format!("29.{}", std::process::id());
        let mut child = spawned(Command::new("sleep").arg(&marker));
        let killed = kill_where(|p| p.argv.get(1) == Some(&marker), Signal::KILL);
        assert_eq!(killed, [child.id()]);
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn inherited_descriptor_has_its_number() {
        let (read, write) = std::io::pipe().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hi >&3"]);
        inherit_fd_as(&mut cmd, write.as_fd(), 3);
        let status = cmd.status().unwrap();
        drop(write);
        assert!(status.success());
        assert_eq!(std::io::read_to_string(read).unwrap(), "hi\n");
    }

    #[test]
    fn parent_death_signal_follows_the_spawning_thread() {
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            die_with_spawning_thread(cmd.arg("30"), Signal::KILL, true);
            cmd.spawn().unwrap()
        })
        .join()
        .unwrap();
        let p = process(child.id()).unwrap();
        assert_eq!(p.session, child.id(), "leads a session of its own");
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
