//! How long the network took to follow a moved workload: ICMP echo requests from this
//! node (whose bridge carries its own overlay address) to the workload's overlay
//! address, until one is answered.
//!
//! Hand-written over socket2's raw socket: an echo request is 8 bytes and a checksum,
//! and the ping crates bring a runtime or a process of their own for what is one loop.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use socket2::{Domain, Protocol, Socket, Type};

use crate::OverlayError;

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;

/// Send an echo request to `addr` through `device` (the network's bridge, so that no
/// request leaves by any other interface) every `every` until one is answered or
/// `stop` is set: the wall-clock time of the first reply, or `None` when none came.
/// Runs in the caller's network namespace (an agent's is its node's) and blocks: call
/// it from a blocking task. A node without the device gets an error, not a probe.
pub fn first_answer(
    addr: Ipv4Addr,
    device: &str,
    every: Duration,
    stop: &AtomicBool,
) -> Result<Option<SystemTime>, OverlayError> {
    let io = |op: &str| {
        let op = format!("{op} (icmp echo to {addr})");
        move |source| OverlayError::Io { op, source }
    };
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).map_err(io("open a raw socket"))?;
    socket.bind_device(Some(device.as_bytes())).map_err(io(&format!("bind to {device}")))?;
    // distinct per call, so two probes of one process tell their replies apart
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let id = (std::process::id() as u16).wrapping_mul(31) ^ CALLS.fetch_add(1, Ordering::Relaxed);
    let to = SocketAddrV4::new(addr, 0).into();
    let mut seq: u16 = 0;
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        seq = seq.wrapping_add(1);
        socket.send_to(&echo_request(id, seq), &to).map_err(io("send"))?;
        let next = Instant::now() + every;
        while let Some(left) = next.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            socket.set_read_timeout(Some(left)).map_err(io("set the read timeout"))?;
            // (socket2's Read takes an initialised buffer, its recv an uninitialised one)
            let n = match (&socket).read(&mut buf) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io("receive")(e)),
            };
            if is_reply(&buf[..n], addr, id) {
                return Ok(Some(SystemTime::now()));
            }
        }
    }
    Ok(None)
}

/// An ICMP echo request with identifier `id` and sequence `seq`, checksummed.
fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = ECHO_REQUEST;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"away-flw");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A raw ICMP socket hands over the IP header too: an echo reply from `from` to our `id`.
fn is_reply(packet: &[u8], from: Ipv4Addr, id: u16) -> bool {
    let Some(&first) = packet.first() else { return false };
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || packet.len() < ihl + 8 || ihl < 20 {
        return false;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[ihl..];
    src == from && icmp[0] == ECHO_REPLY && icmp[4..6] == id.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_checksum_to_zero_and_replies_are_matched() {
        let req = echo_request(0x1234, 7);
        assert_eq!(checksum(&req), 0, "a packet with its checksum sums to 0");
        let mut reply = vec![0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 10, 250, 0, 5, 10, 250, 0, 1];
        reply.extend_from_slice(&req);
        reply[20] = ECHO_REPLY;
        let from = Ipv4Addr::new(10, 250, 0, 5);
        assert!(is_reply(&reply, from, 0x1234));
        assert!(!is_reply(&reply, Ipv4Addr::new(10, 250, 0, 6), 0x1234), "another sender");
        assert!(!is_reply(&reply, from, 0x1235), "another probe");
        reply[20] = ECHO_REQUEST;
        assert!(!is_reply(&reply, from, 0x1234), "a request is no answer");
        assert!(!is_reply(&reply[..24], from, 0x1234), "truncated");
    }

    /// Loopback answers at once (root: a raw socket needs CAP_NET_RAW).
    #[test]
    fn loopback_answers() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: a raw socket needs root");
            return;
        }
        let every = Duration::from_millis(50);
        let at = first_answer(Ipv4Addr::LOCALHOST, "lo", every, &AtomicBool::new(false)).unwrap();
        assert!(at.is_some(), "127.0.0.1 answers an echo request");
        assert_eq!(first_answer(Ipv4Addr::LOCALHOST, "lo", every, &AtomicBool::new(true)).unwrap(), None);
        let none = first_answer(Ipv4Addr::LOCALHOST, "awbr-none", every, &AtomicBool::new(false));
        assert!(none.unwrap_err().to_string().contains("bind to awbr-none"), "no such device: no probe");
    }
}
