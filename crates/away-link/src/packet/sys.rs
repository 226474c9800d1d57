//! The few system calls the packet mode needs and `std` does not wrap: creating a TUN
//! device (`TUNSETIFF`), entering a network namespace (`setns`), waiting on a file
//! descriptor with a timeout (`poll`), the timer slack of a thread (`prctl`) and a TCP
//! socket's kernel state (`TCP_INFO`). Each is a thin call on a descriptor this process
//! owns, so the unsafe code is kept to this module.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::Duration;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFNAMSIZ: usize = 16;

/// `struct ifreq` as `TUNSETIFF` reads it: a name and a flags word (the rest of the
/// union is padding).
#[repr(C)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Open `/dev/net/tun` and attach a new layer-3 TUN device (no packet-info header)
/// named `name`, in the calling thread's network namespace.
pub(crate) fn open_tun(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("tun name {name:?}: 1 to 15 bytes")));
    }
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReqFlags { name: [0; IFNAMSIZ], flags: IFF_TUN | IFF_NO_PI, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: the descriptor is open, `req` is a valid ifreq-sized buffer that lives
    // across the call, and TUNSETIFF reads and writes only within it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Move the calling thread into the network namespace at `path` (e.g.
/// `/run/netns/<name>`). Only this thread changes namespace.
pub(crate) fn enter_netns(path: &Path) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: `ns` is an open namespace file for the duration of the call.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Put `fd` in non-blocking mode (reads return `WouldBlock` when no packet waits).
pub(crate) fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let raw = fd.as_fd().as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an open descriptor touch no memory.
    let rc = unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wait until `fd` is readable or `timeout` passes; `Ok(true)` if readable.
pub(crate) fn wait_readable(fd: &impl AsFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: fd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(rc > 0 && pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
}

/// Make this thread's sleeps end within about a microsecond of their deadline (the
/// default slack is 50 µs).
pub(crate) fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// The kernel's smoothed round-trip estimate for a connected TCP socket.
pub fn tcp_rtt(sock: &impl AsFd) -> io::Result<Duration> {
    // SAFETY: tcp_info is plain data; zero is a valid value for every field.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::from_micros(info.tcpi_rtt as u64))
}

/// Whether this process runs as root (the packet mode needs CAP_NET_ADMIN).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
