//! A gratuitous ARP (an ARP request for one's own address, to the broadcast MAC) on a
//! packet socket. No crate in the tree sends link-layer frames (rustix has no
//! `sockaddr_ll`), so this is the one place with raw libc calls.
#![allow(unsafe_code)]

use std::io;
use std::net::Ipv4Addr;

const ETH_P_ARP: u16 = 0x0806;

/// The Ethernet frame of a gratuitous ARP request from `mac` for `ip`.
pub(crate) fn frame(ip: Ipv4Addr, mac: [u8; 6]) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // hardware Ethernet, protocol IPv4, sizes 6 and 4, op 1 (request)
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address zero, target protocol address our own
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Send one gratuitous ARP out of interface `ifname` of the calling thread's namespace.
pub(crate) fn send_gratuitous(ifname: &str, ip: Ipv4Addr, mac: [u8; 6]) -> io::Result<()> {
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated name that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, ETH_P_ARP.to_be() as i32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value to fill in.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let f = frame(ip, mac);
    // SAFETY: the frame and the address live across the call, with their true lengths.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&owned),
            f.as_ptr().cast(),
            f.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_asks_for_its_own_address_from_its_own_mac() {
        let f = frame(Ipv4Addr::new(10, 250, 0, 5), [2, 0xaa, 10, 250, 0, 5]);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &[2, 0xaa, 10, 250, 0, 5]);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[28..32], &[10, 250, 0, 5]);
        assert_eq!(&f[38..42], &[10, 250, 0, 5]);
        assert_eq!(&f[32..38], &[0; 6]);
    }
}
