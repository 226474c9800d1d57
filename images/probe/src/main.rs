//! probe: prints one JSON line describing what the workload sees from inside, then
//! waits to be stopped. `tests/tests/contract.rs` runs it on each runtime and compares
//! the reports, which keeps docs/runtimes.md's table true.
//!
//! The report: capability sets (from /proc/self/status, as names), uids, gids and
//! groups, no_new_privs, the seccomp mode and what two system calls a filter decides
//! answer (`unshare(0)` and `clone3(NULL, 0)`), the mounts (mount point, type, ro/rw),
//! the environment's variable names, hostname, cwd and the open-files limit.
//!
//! Std only, like counter: one static binary in a scratch image.

use std::collections::BTreeMap;

/// Capability bit numbers (linux/capability.h).
const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A JSON value, written by hand (no dependencies).
enum J {
    S(String),
    L(Vec<String>),
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn caps(hex: &str) -> Vec<String> {
    let bits = u64::from_str_radix(hex.trim(), 16).unwrap_or(0);
    CAPS.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).map(|(_, c)| c.to_string()).collect()
}

/// `/proc/self/mountinfo` as "mount-point type ro|rw", sorted.
fn mounts() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let point = f.get(4)?.replace("\\040", " ");
            let ro = f.get(5)?.split(',').any(|o| o == "ro");
            Some(format!("{point} {} {}", f.get(sep + 1)?, if ro { "ro" } else { "rw" }))
        })
        .collect();
    out.sort();
    out
}

#[allow(unsafe_code)]
mod sys {
    extern "C" {
        fn syscall(number: i64, ...) -> i64;
        fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
        fn _exit(status: i32) -> !;
    }
    const SYS_UNSHARE: i64 = 272;
    const SYS_CLONE3: i64 = 435;

    /// "ok" or the errno's name of a system call the default seccomp profile decides.
    fn answer(ret: i64) -> String {
        if ret >= 0 {
            return "ok".into();
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(1) => "EPERM".into(),
            Some(14) => "EFAULT".into(),
            Some(22) => "EINVAL".into(),
            Some(38) => "ENOSYS".into(),
            Some(n) => format!("errno {n}"),
            None => "error".into(),
        }
    }

    /// unshare(0): a no-op the kernel allows anyone; Docker's filter refuses it
    /// without CAP_SYS_ADMIN.
    pub fn unshare_nothing() -> String {
        if !cfg!(target_arch = "x86_64") {
            return "not probed".into();
        }
        // SAFETY: unshare with no flags changes nothing and takes no pointers.
        answer(unsafe { syscall(SYS_UNSHARE, 0i64) })
    }

    /// clone3(NULL, 0): the kernel answers EINVAL (too small); Docker's filter ENOSYS.
    pub fn clone3_empty() -> String {
        if !cfg!(target_arch = "x86_64") {
            return "not probed".into();
        }
        // SAFETY: a size of 0 is refused before the (null) pointer is read: no
        // process is created.
        answer(unsafe { syscall(SYS_CLONE3, 0i64, 0i64) })
    }

    extern "C" fn on_term(_: i32) {
        // SAFETY: _exit is async-signal-safe and takes no pointers.
        unsafe { _exit(0) }
    }

    /// Exit at once on SIGTERM/SIGINT (PID 1 gets no default signal actions).
    pub fn exit_on_term() {
        // SAFETY: on_term is the `extern "C" fn(i32)` signal(2) expects and only
        // calls _exit; SIGTERM and SIGINT may be caught.
        unsafe {
            signal(15, on_term);
            signal(2, on_term);
        }
    }
}

fn main() {
    sys::exit_on_term();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let mut r: BTreeMap<&str, J> = BTreeMap::new();
    for (key, line) in [
        ("cap_effective", "CapEff"),
        ("cap_permitted", "CapPrm"),
        ("cap_bounding", "CapBnd"),
        ("cap_inheritable", "CapInh"),
        ("cap_ambient", "CapAmb"),
    ] {
        r.insert(key, J::L(caps(&field(line))));
    }
    r.insert("uid", J::S(field("Uid")));
    r.insert("gid", J::S(field("Gid")));
    r.insert("groups", J::S(field("Groups")));
    r.insert("no_new_privs", J::S(field("NoNewPrivs")));
    r.insert("seccomp", J::S(field("Seccomp")));
    r.insert("unshare_0", J::S(sys::unshare_nothing()));
    r.insert("clone3_empty", J::S(sys::clone3_empty()));
    r.insert("mounts", J::L(mounts()));
    let mut env: Vec<String> = std::env::vars_os().map(|(k, _)| k.to_string_lossy().into_owned()).collect();
    env.sort();
    r.insert("env", J::L(env));
    r.insert("home", J::S(std::env::var("HOME").unwrap_or_default()));
    r.insert("path", J::S(std::env::var("PATH").unwrap_or_default()));
    r.insert("hostname", J::S(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().into()));
    r.insert("cwd", J::S(std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default()));
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    r.insert("nofile", J::S(nofile));
    let body: Vec<String> = r
        .iter()
        .map(|(k, v)| {
            let v = match v {
                J::S(s) => quote(s),
                J::L(l) => format!("[{}]", l.iter().map(|s| quote(s)).collect::<Vec<_>>().join(",")),
            };
            format!("{}:{v}", quote(k))
        })
        .collect();
    println!("probe: {{{}}}", body.join(","));
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
