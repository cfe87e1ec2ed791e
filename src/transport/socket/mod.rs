//! The transports' system calls: every socket option, batched send and receive call and raw
//! read of [`crate::transport`], and every `unsafe` block of that layer, each with its
//! `// SAFETY:` argument. [`super::udp`] and [`super::tcp`] keep the endpoint logic (batching,
//! bulk receive, framing, buffers) and call these; nothing here decides policy.
//!
//! - UDP, Linux (the `linux` submodule, `#[cfg(target_os = "linux")]`): generic segmentation
//!   offload (`sendmsg` with `UDP_SEGMENT`), generic receive offload (`UDP_GRO` and `recvmsg`
//!   split by the segment size the kernel reports), `sendmmsg` / `recvmmsg`, the receive buffer
//!   limit, and the `sockaddr` conversions these need.
//! - UDP, other Unix systems: the portable path, one `send_to` / `recv_from` per datagram
//!   behind the same functions ([`OFFLOAD`] is `false`, GSO and GRO report
//!   [`io::ErrorKind::Unsupported`]). The crate is developed and tested on Linux only
//!   (docs/ARCHITECTURE.md §11): that path is built there only for its unit tests, over
//!   loopback.
//! - TCP, any Unix: [`recv_into_spare`] (one `recv` into a buffer's spare capacity, so that a
//!   read buffer is never zero-filled first) and [`reset_on_close`] (`SO_LINGER` 0).
//! - Interfaces, any Unix: [`interface_ipv6_addrs`] (`getifaddrs`).
//!
//! Errors are handed back as they come (`WouldBlock`, `Interrupted`, ...): retrying, dropping
//! and counting are the endpoints' business.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::net::TcpStream;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub(crate) use linux::{
    grow_recv_buffer, gso_unsupported, recv_gro, recv_mmsg, send_gso, send_mmsg, set_gro,
};
#[cfg(not(target_os = "linux"))]
pub(crate) use portable::{
    grow_recv_buffer, gso_unsupported, recv_gro, recv_mmsg, send_gso, send_mmsg, set_gro,
};

/// Whether the batched calls (GSO, GRO, `sendmmsg`, `recvmmsg`) are available: on Linux.
pub(crate) const OFFLOAD: bool = cfg!(target_os = "linux");
/// Most datagrams one [`send_mmsg`] or [`recv_mmsg`] call moves.
pub(crate) const MMSG_BATCH: usize = 32;
/// The kernel's limit of segments per GSO send (and so per GRO buffer).
pub(crate) const GSO_MAX_SEGMENTS: usize = 64;

/// One datagram of a batch: offset and length in the batch's buffer, and its peer.
pub(crate) type Entry = (usize, usize, SocketAddr);

/// One `recv` into the spare capacity of `buf` (up to `cap` bytes in all), extending its length
/// by what arrived.
pub(crate) fn recv_into_spare(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    cap: usize,
) -> io::Result<usize> {
    let room = cap
        .saturating_sub(buf.len())
        .min(buf.capacity() - buf.len());
    let spare = &mut buf.spare_capacity_mut()[..room];
    // SAFETY: `spare` is writable memory of `room` bytes owned by `buf`, and `recv` writes at
    // most that many; the descriptor is the stream's own, open for the call's duration.
    let n = unsafe { libc::recv(stream.as_raw_fd(), spare.as_mut_ptr().cast(), room, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` (<= `room`) bytes after the old length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Makes closing `stream` send a reset instead of a FIN (`SO_LINGER` 0): a refused or evicted
/// stream leaves no `TIME_WAIT` behind. Best effort (a failure is logged).
pub(crate) fn reset_on_close(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        log::debug!("socket: SO_LINGER not set: {e}");
    }
}

/// The portable path: one system call per datagram, no offload. Built on Linux too for its
/// tests.
/// The IPv6 addresses of the system's interfaces that are up (`getifaddrs`); empty if the
/// call fails.
pub(crate) fn interface_ipv6_addrs() -> Vec<std::net::Ipv6Addr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `getifaddrs` writes a pointer to a list it allocated into `list`, or fails and
    // leaves it alone; the list is freed below with `freeifaddrs`, once.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list `getifaddrs` returned, not yet freed.
        let ifa = unsafe { &*cur };
        let up = ifa.ifa_flags & libc::IFF_UP as libc::c_uint != 0;
        if up && !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` is non-null and points at a sockaddr whose family field
            // says which sockaddr it is; an AF_INET6 one is a `sockaddr_in6`.
            let family = unsafe { (*ifa.ifa_addr).sa_family };
            if i32::from(family) == libc::AF_INET6 {
                // SAFETY: the family is AF_INET6, so the sockaddr is a `sockaddr_in6`.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `list` came from a successful `getifaddrs` and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

#[cfg(any(not(target_os = "linux"), test))]
mod portable {
    use std::io;

    use mio::net::UdpSocket;

    use super::{Entry, MMSG_BATCH};

    /// Leaves the receive buffer limit as the system sets it.
    pub(crate) fn grow_recv_buffer(_socket: &UdpSocket) {}

    /// No receive offload here.
    pub(crate) fn set_gro(_socket: &UdpSocket, _on: bool) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// No receive offload here.
    pub(crate) fn recv_gro(
        _socket: &UdpSocket,
        _buf: &mut [u8],
        _out: &mut Vec<Entry>,
    ) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Reads one datagram into the first `slot` bytes of `buf` and appends it to `out`.
    pub(crate) fn recv_mmsg(
        socket: &UdpSocket,
        buf: &mut [u8],
        slot: usize,
        out: &mut Vec<Entry>,
    ) -> io::Result<()> {
        let slot = slot.min(buf.len());
        let (len, from) = socket.recv_from(&mut buf[..slot])?;
        out.push((0, len, from));
        Ok(())
    }

    /// Whether `e` means the system cannot do UDP GSO (always, here).
    pub(crate) fn gso_unsupported(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::Unsupported
    }

    /// No segmentation offload here.
    pub(crate) fn send_gso(
        _socket: &UdpSocket,
        _data: &[u8],
        _segment: usize,
        _to: &std::net::SocketAddr,
    ) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Sends up to [`MMSG_BATCH`] of `entries` with one `send_to` each, as `sendmmsg` would:
    /// how many went out, or the first one's error.
    pub(crate) fn send_mmsg(
        socket: &UdpSocket,
        buf: &[u8],
        entries: &[Entry],
    ) -> io::Result<usize> {
        for (k, &(off, len, to)) in entries.iter().take(MMSG_BATCH).enumerate() {
            if let Err(e) = socket.send_to(&buf[off..off + len], to) {
                return if k == 0 { Err(e) } else { Ok(k) };
            }
        }
        Ok(entries.len().min(MMSG_BATCH))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::net::UdpSocket;
    use std::time::Instant;

    fn udp_pair() -> (UdpSocket, UdpSocket) {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        (UdpSocket::bind(any).unwrap(), UdpSocket::bind(any).unwrap())
    }

    /// Reads with `recv` until `want` datagrams arrived (or five seconds passed).
    fn drain(
        rx: &UdpSocket,
        want: usize,
        recv: impl Fn(&UdpSocket, &mut [u8], &mut Vec<Entry>) -> io::Result<()>,
    ) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < deadline {
            let mut out = Vec::new();
            match recv(rx, &mut buf, &mut out) {
                Ok(()) => got.extend(out.iter().map(|&(o, l, _)| buf[o..o + l].to_vec())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    /// The portable path moves datagrams one system call each, as `sendmmsg` / `recvmmsg`
    /// would in one, and reports offload as unsupported, which the endpoint takes as "fall
    /// back".
    #[test]
    fn the_portable_path_sends_and_receives_one_datagram_per_call() {
        let (tx, rx) = udp_pair();
        portable::grow_recv_buffer(&rx);
        let to = rx.local_addr().unwrap();
        let buf: Vec<u8> = (0..100u8).collect();
        let entries: Vec<Entry> = (0..MMSG_BATCH + 3).map(|k| (k % 90, 10, to)).collect();
        assert_eq!(
            portable::send_mmsg(&tx, &buf, &entries).unwrap(),
            MMSG_BATCH
        );
        let got = drain(&rx, MMSG_BATCH, |s, b, out| {
            portable::recv_mmsg(s, b, 2048, out)
        });
        let want: Vec<Vec<u8>> = entries[..MMSG_BATCH]
            .iter()
            .map(|&(o, l, _)| buf[o..o + l].to_vec())
            .collect();
        assert_eq!(got, want);
        let e = portable::send_gso(&tx, &buf, 10, &to).unwrap_err();
        assert!(portable::gso_unsupported(&e));
        assert!(portable::set_gro(&rx, true).is_err());
        assert!(portable::recv_gro(&rx, &mut [0; 16], &mut Vec::new()).is_err());
    }

    /// The Linux calls: a GSO send arrives as its segments, a `sendmmsg` batch arrives whole
    /// through `recvmmsg`, and a datagram larger than a `recvmmsg` slot is cut to the slot.
    #[cfg(target_os = "linux")]
    #[test]
    fn linux_batched_calls_move_datagrams_intact() {
        let (tx, rx) = udp_pair();
        let to = rx.local_addr().unwrap();
        let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
        // Segments of 100 bytes: 100, 100, 50.
        match send_gso(&tx, &data, 100, &to) {
            Ok(()) => {
                let got = drain(&rx, 3, |s, b, out| recv_mmsg(s, b, 2048, out));
                assert_eq!(got, [&data[..100], &data[100..200], &data[200..]]);
            }
            Err(e) => assert!(gso_unsupported(&e), "{e}"),
        }
        let entries: Vec<Entry> = vec![(0, 5, to), (5, 0, to), (10, 240, to)];
        assert_eq!(send_mmsg(&tx, &data, &entries).unwrap(), 3);
        let got = drain(&rx, 3, |s, b, out| recv_mmsg(s, b, 64, out));
        assert_eq!(got, [&data[..5], &[][..], &data[10..74]]);
    }
}
