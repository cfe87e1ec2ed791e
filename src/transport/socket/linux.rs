//! The Linux system calls of UDP: GSO sends, GRO and `recvmmsg` receives, `sendmmsg`, the
//! `UDP_GRO` and receive buffer socket options, and the `sockaddr` conversions they need.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use mio::net::UdpSocket;

use super::{Entry, MMSG_BATCH};

/// `UDP_SEGMENT` from `<linux/udp.h>`.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` from `<linux/udp.h>`.
const UDP_GRO: libc::c_int = 104;

/// Receive buffer size asked for (the kernel caps it at `net.core.rmem_max`): a window of
/// blocks arriving as GSO bursts must not overflow the default ~200 KiB (the kernel charges a
/// whole GSO buffer against it). This is a limit, not an allocation.
const RECV_SOCKET_BUFFER: usize = 1 << 20;

/// Raises the socket's receive buffer limit (best effort: a failure is logged).
pub(crate) fn grow_recv_buffer(socket: &UdpSocket) {
    if let Err(e) = socket2::SockRef::from(socket).set_recv_buffer_size(RECV_SOCKET_BUFFER) {
        log::debug!("udp: SO_RCVBUF failed: {e}");
    }
}

/// Turns UDP generic receive offload on or off.
pub(crate) fn set_gro(socket: &UdpSocket, on: bool) -> io::Result<()> {
    let v: libc::c_int = on.into();
    // SAFETY: `v` is a valid c_int for the duration of the call, and the length passed is its
    // size; the descriptor is the socket's own.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            UDP_GRO,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The address the kernel wrote into `ss`, if it is IPv4 or IPv6.
fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family is AF_INET, so the storage holds a sockaddr_in; the storage is
            // larger than and aligned for it.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family is AF_INET6, so the storage holds a sockaddr_in6; the storage
            // is larger than and aligned for it.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `a` as a `sockaddr_storage` and the length of the address in it.
fn to_sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is a plain C struct; all-zero bytes are a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Reads one (possibly coalesced) datagram into `buf` with GRO on and appends its datagrams,
/// cut at the segment size the kernel reports, to `out`. A datagram larger than `buf`
/// (impossible with GRO's 64 KiB limit) is dropped.
pub(crate) fn recv_gro(socket: &UdpSocket, buf: &mut [u8], out: &mut Vec<Entry>) -> io::Result<()> {
    // SAFETY: sockaddr_storage is a plain C struct; all-zero bytes are a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for one cmsghdr carrying a c_int, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is a plain C struct; all-zero bytes (null pointers, zero lengths) are a
    // valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points to `addr`, `iov` (into `buf`) and `control`, all alive and writable
    // for the call, with their true sizes; the descriptor is the socket's own.
    let r = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = r as usize;
    let Some(from) = from_sockaddr(&addr) else {
        return Ok(());
    };
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        log::debug!("udp: dropped a datagram larger than {} bytes", buf.len());
        return Ok(());
    }
    let mut segment = len;
    // SAFETY: the kernel filled `control` up to msg_controllen with valid cmsghdrs;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay within it, and a UDP_GRO header carries a c_int.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let s = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
                if s > 0 {
                    segment = s as usize;
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let mut off = 0;
    while off < len {
        let n = segment.min(len - off);
        out.push((off, n, from));
        off += n;
    }
    if len == 0 {
        out.push((0, 0, from));
    }
    Ok(())
}

/// Reads up to [`MMSG_BATCH`] datagrams (GRO off) into slots of `slot` bytes of `buf` in one
/// call and appends them to `out`. A datagram larger than a slot arrives truncated to `slot`
/// bytes.
pub(crate) fn recv_mmsg(
    socket: &UdpSocket,
    buf: &mut [u8],
    slot: usize,
    out: &mut Vec<Entry>,
) -> io::Result<()> {
    let m = MMSG_BATCH.min(buf.len() / slot.max(1));
    // SAFETY: sockaddr_storage is a plain C struct; all-zero bytes are a valid value.
    let mut addrs: [libc::sockaddr_storage; MMSG_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: iovec is a plain C struct; all-zero bytes (a null pointer, length 0) are valid.
    let mut iovs: [libc::iovec; MMSG_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: mmsghdr is a plain C struct; all-zero bytes (null pointers, zero lengths) are
    // a valid value.
    let mut hdrs: [libc::mmsghdr; MMSG_BATCH] = unsafe { std::mem::zeroed() };
    for k in 0..m {
        iovs[k] = libc::iovec {
            iov_base: buf[k * slot..].as_mut_ptr() as *mut libc::c_void,
            iov_len: slot,
        };
        hdrs[k].msg_hdr.msg_name = &mut addrs[k] as *mut _ as *mut libc::c_void;
        hdrs[k].msg_hdr.msg_namelen =
            std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        hdrs[k].msg_hdr.msg_iov = &mut iovs[k];
        hdrs[k].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `hdrs[..m]` point into `addrs`, `iovs` and `buf` (slot `k` is
    // `buf[k * slot..(k + 1) * slot]`, within `buf` since `m * slot <= buf.len()`), all alive
    // and writable for the call; a null timeout; the descriptor is the socket's own.
    let r = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            hdrs.as_mut_ptr(),
            m as _,
            0,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    for (k, (h, a)) in hdrs.iter().zip(&addrs).take(r as usize).enumerate() {
        if let Some(from) = from_sockaddr(a) {
            out.push((k * slot, h.msg_len as usize, from));
        }
    }
    Ok(())
}

/// Whether `e` means the kernel or the device cannot do UDP GSO.
pub(crate) fn gso_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Sends `data` as datagrams of `segment` bytes (the last may be shorter) in one call.
pub(crate) fn send_gso(
    socket: &UdpSocket,
    data: &[u8],
    segment: usize,
    to: &SocketAddr,
) -> io::Result<()> {
    let (addr, addr_len) = to_sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one cmsghdr carrying a u16, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is a plain C struct; all-zero bytes (null pointers, zero lengths) are a
    // valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &addr as *const _ as *mut libc::c_void;
    msg.msg_namelen = addr_len;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    let seg = u16::try_from(segment).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: msg_control points to `control`, large enough for one header and a u16;
    // CMSG_FIRSTHDR therefore returns a valid pointer into it, and CMSG_DATA points to the
    // header's payload within it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, seg);
    }
    // SAFETY: `msg` points to `addr`, `iov` (into `data`, only read) and `control`, all alive
    // for the call; the descriptor is the socket's own.
    let r = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sends up to [`MMSG_BATCH`] of `entries` (offset, length, destination in `buf`) in one call;
/// returns how many were sent.
pub(crate) fn send_mmsg(socket: &UdpSocket, buf: &[u8], entries: &[Entry]) -> io::Result<usize> {
    let m = entries.len().min(MMSG_BATCH);
    // SAFETY: sockaddr_storage is a plain C struct; all-zero bytes are a valid value.
    let mut addrs: [libc::sockaddr_storage; MMSG_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: iovec is a plain C struct; all-zero bytes (a null pointer, length 0) are valid.
    let mut iovs: [libc::iovec; MMSG_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: mmsghdr is a plain C struct; all-zero bytes (null pointers, zero lengths) are
    // a valid value.
    let mut hdrs: [libc::mmsghdr; MMSG_BATCH] = unsafe { std::mem::zeroed() };
    for (k, &(off, len, to)) in entries[..m].iter().enumerate() {
        let packet = &buf[off..off + len];
        let (a, alen) = to_sockaddr(&to);
        addrs[k] = a;
        iovs[k] = libc::iovec {
            iov_base: packet.as_ptr() as *mut libc::c_void,
            iov_len: packet.len(),
        };
        hdrs[k].msg_hdr.msg_name = &mut addrs[k] as *mut _ as *mut libc::c_void;
        hdrs[k].msg_hdr.msg_namelen = alen;
        hdrs[k].msg_hdr.msg_iov = &mut iovs[k];
        hdrs[k].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `hdrs[..m]` point into `addrs`, `iovs` and `buf` (only read), all alive for the
    // call; the descriptor is the socket's own.
    let r = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), m as _, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
