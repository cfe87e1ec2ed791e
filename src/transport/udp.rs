//! UDP: one datagram is one CurveCP packet.
//!
//! [`UdpEndpoint`] wraps a non-blocking `mio::net::UdpSocket` with a reused receive buffer. It
//! reads until `WouldBlock` (the poll is edge-triggered) and treats a full send buffer like a
//! lost datagram: CurveCP retransmits, and nothing queues without bound.
//!
//! Sending can be batched: a driver writes each packet straight into [`UdpEndpoint::batch_slot`],
//! commits it with [`UdpEndpoint::batch_commit`] and ends the turn with
//! [`UdpEndpoint::batch_flush`]. On Linux a run of equal-sized datagrams to one peer goes out in
//! one `sendmsg` with UDP generic segmentation offload (`UDP_SEGMENT`), and the rest in one
//! `sendmmsg`; if the kernel refuses GSO the endpoint falls back to `sendmmsg` for good, and
//! elsewhere to one `send_to` per datagram. The batch buffer (at most [`SEND_BATCH`] packets) is
//! allocated once a turn has two packets and released after a batch of fewer than eight, so
//! an idle endpoint stays small. On Linux the receive buffer limit is raised to 1 MiB (capped by
//! `net.core.rmem_max`), since the kernel charges a whole GSO burst against it.
//!
//! Receiving is batched too, once traffic is heavy: after [`BULK_AFTER`] datagrams read in one
//! drain, an endpoint on Linux switches to bulk receive. It asks the kernel for UDP generic
//! receive offload (`UDP_GRO`): a GSO burst from a peer then arrives as one buffer (on loopback
//! it is never cut up at all), read with one `recvmsg` into a 64 KiB buffer and split into its
//! datagrams by the segment size the kernel reports. If the kernel refuses GRO, bulk receive
//! reads up to [`RECV_BATCH`] datagrams per `recvmmsg` instead. Either way [`UdpEndpoint::recv_one`]
//! and [`UdpEndpoint::recv_all`] still hand out one datagram at a time. After
//! [`IDLE_DRAINS`] drains in a row that found at most one datagram, the endpoint turns GRO off,
//! drains once more with the large buffer (datagrams coalesced before that are still queued)
//! and releases it, so an idle endpoint keeps only its 2 KiB buffer.

use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use crate::curvecp::MAX_PACKET;

/// Datagrams queued for one batched send at most.
pub const SEND_BATCH: usize = 32;
/// A batch of fewer packets releases the batch buffer once sent (only bulk traffic keeps it).
const KEEP_BATCH: usize = 8;
/// Bytes of the batch buffer.
const BATCH_BYTES: usize = SEND_BATCH * MAX_PACKET;

/// Datagrams read in one drain that switch an endpoint to bulk receive (Linux).
pub const BULK_AFTER: usize = 16;
/// Datagrams per `recvmmsg` when bulk receive runs without GRO.
pub const RECV_BATCH: usize = 32;
/// Drains in a row that found at most one datagram before bulk receive is left.
pub const IDLE_DRAINS: u32 = 256;
/// Bytes of the bulk receive buffer: one GRO buffer (at most 64 KiB), or `RECV_BATCH` slots of
/// `RECV_BUFFER` bytes.
const BULK_BYTES: usize = 65_536;

/// Receive buffer size: larger than any valid packet, so that an oversized datagram is seen
/// (and dropped by the protocol's length checks) rather than silently truncated to a valid size.
pub const RECV_BUFFER: usize = 2048;

/// Counters of one UDP endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams not sent because the socket's send buffer was full.
    pub send_dropped: u64,
    /// System calls that sent datagrams (one per `send_to`, `sendmmsg` or GSO `sendmsg`).
    pub send_calls: u64,
    /// System calls that returned datagrams (one per `recv_from`, GRO `recvmsg` or
    /// `recvmmsg`).
    pub recv_calls: u64,
    /// Times the endpoint switched to bulk receive.
    pub bulk_receives: u64,
}

/// Datagrams received in bulk and not handed out yet.
#[derive(Debug)]
struct RecvBatch {
    buf: Vec<u8>,
    /// (offset, length, source) of each datagram in `buf`.
    datagrams: Vec<(usize, usize, SocketAddr)>,
    /// The next one to hand out.
    next: usize,
    /// Datagrams read since the last drain ended.
    drained: usize,
    /// Drains in a row that found at most one datagram.
    idle_drains: u32,
    /// GRO was turned off: release this batch at the end of the next drain.
    leaving: bool,
}

/// A UDP socket registered for reading, with its receive buffer.
#[derive(Debug)]
pub struct UdpEndpoint {
    socket: UdpSocket,
    buf: Box<[u8; RECV_BUFFER]>,
    stats: UdpStats,
    /// The first packet of a batch (a batch of one, the common case off the bulk path, needs
    /// nothing more).
    first: Box<[u8; MAX_PACKET]>,
    /// The slot offered for a second packet (a turn often asks for one more slot and then has
    /// nothing to put in it: that must not allocate the batch buffer).
    second: Box<[u8; MAX_PACKET]>,
    /// Packets of the current batch, back to back, once it holds two or more (released after a
    /// small batch, so an idle endpoint stays small).
    batch: Vec<u8>,
    /// Bytes of `batch` in use.
    batch_used: usize,
    /// (offset, length, destination) of each queued packet.
    batch_entries: Vec<(usize, usize, SocketAddr)>,
    /// Whether UDP GSO is still tried.
    gso: bool,
    /// Bulk receive, while traffic is heavy (Linux).
    rx: Option<Box<RecvBatch>>,
    /// Datagrams read one by one since the last drain ended (towards `BULK_AFTER`).
    streak: usize,
    /// Whether UDP GRO is on for the socket; `None` once the kernel refused it.
    gro: Option<bool>,
}

impl UdpEndpoint {
    /// Binds `addr` and registers the socket for readability under `token`.
    pub fn bind(registry: &Registry, token: Token, addr: SocketAddr) -> io::Result<UdpEndpoint> {
        let mut socket = UdpSocket::bind(addr)?;
        #[cfg(target_os = "linux")]
        sys::grow_buffers(&socket);
        registry.register(&mut socket, token, Interest::READABLE)?;
        Ok(UdpEndpoint {
            socket,
            buf: Box::new([0; RECV_BUFFER]),
            stats: UdpStats::default(),
            first: Box::new([0; MAX_PACKET]),
            second: Box::new([0; MAX_PACKET]),
            batch: Vec::new(),
            batch_used: 0,
            batch_entries: Vec::new(),
            gso: cfg!(target_os = "linux"),
            rx: None,
            streak: 0,
            gro: Some(false),
        })
    }

    /// The local address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Reads every waiting datagram (until `WouldBlock`, at most `limit` of them so that one
    /// busy socket cannot starve the rest of a loop) and hands each to `f` with its source.
    /// Returns how many were read; `Ok(n)` with `n == limit` means more may be waiting.
    pub fn recv_all(
        &mut self,
        limit: usize,
        mut f: impl FnMut(&[u8], SocketAddr),
    ) -> io::Result<usize> {
        let mut n = 0;
        while n < limit {
            match self.recv_one()? {
                Some((packet, from)) => {
                    n += 1;
                    f(packet, from);
                }
                None => break,
            }
        }
        Ok(n)
    }

    /// Reads one waiting datagram, if any: its bytes (valid until the next call) and source.
    pub fn recv_one(&mut self) -> io::Result<Option<(&[u8], SocketAddr)>> {
        if self.rx.is_some() {
            let Some((off, len, from)) = self.next_batched()? else {
                return Ok(None);
            };
            self.stats.received += 1;
            let rx = self.rx.as_ref().expect("bulk receive");
            return Ok(Some((&rx.buf[off..off + len], from)));
        }
        loop {
            match self.socket.recv_from(&mut self.buf[..]) {
                Ok((len, from)) => {
                    self.stats.received += 1;
                    self.stats.recv_calls += 1;
                    self.streak += 1;
                    if self.streak >= BULK_AFTER {
                        self.start_bulk_receive();
                    }
                    return Ok(Some((&self.buf[..len], from)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.streak = 0;
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors from earlier sends (port unreachable) surface here on Linux; they
                // say nothing about the datagrams still waiting.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether the endpoint is in bulk receive (and whether with GRO).
    pub fn bulk_receive(&self) -> Option<bool> {
        self.rx.as_ref().map(|_| self.gro == Some(true))
    }

    /// Switches to bulk receive (on Linux; elsewhere datagrams are read one by one).
    fn start_bulk_receive(&mut self) {
        if !cfg!(target_os = "linux") {
            return;
        }
        #[cfg(target_os = "linux")]
        if self.gro == Some(false) {
            self.gro = match sys::set_gro(&self.socket, true) {
                Ok(()) => Some(true),
                Err(e) => {
                    log::debug!("udp: GRO refused ({e}); bulk receive uses recvmmsg");
                    None
                }
            };
        }
        self.stats.bulk_receives += 1;
        self.rx = Some(Box::new(RecvBatch {
            buf: vec![0u8; BULK_BYTES],
            datagrams: Vec::with_capacity(RECV_BATCH.max(sys_gso_max())),
            next: 0,
            drained: 0,
            idle_drains: 0,
            leaving: false,
        }));
    }

    /// The next datagram of the bulk batch, reading more when it is used up; `None` at the end
    /// of a drain (which may leave bulk receive).
    fn next_batched(&mut self) -> io::Result<Option<(usize, usize, SocketAddr)>> {
        let rx = self.rx.as_mut().expect("bulk receive");
        if rx.next == rx.datagrams.len() && !self.fill()? {
            self.end_drain();
            return Ok(None);
        }
        let rx = self.rx.as_mut().expect("bulk receive");
        let d = rx.datagrams[rx.next];
        rx.next += 1;
        rx.drained += 1;
        Ok(Some(d))
    }

    /// A drain of the bulk batch ended (`WouldBlock`): counts idle drains, leaves bulk receive
    /// after `IDLE_DRAINS` of them (GRO off first, then one more drain, then the buffer goes).
    fn end_drain(&mut self) {
        let rx = self.rx.as_mut().expect("bulk receive");
        if rx.leaving {
            self.rx = None;
            self.streak = 0;
            return;
        }
        if rx.drained > 1 {
            rx.idle_drains = 0;
        } else {
            rx.idle_drains += 1;
        }
        rx.drained = 0;
        if rx.idle_drains >= IDLE_DRAINS {
            #[cfg(target_os = "linux")]
            if self.gro == Some(true) {
                if let Err(e) = sys::set_gro(&self.socket, false) {
                    // Keep the large buffer: coalesced datagrams may still come.
                    log::debug!("udp: turning GRO off failed: {e}");
                    rx.idle_drains = 0;
                    return;
                }
                self.gro = Some(false);
                rx.leaving = true;
                return;
            }
            self.rx = None;
            self.streak = 0;
        }
    }

    /// Reads more datagrams into the bulk batch; `false` when none was waiting.
    #[cfg(target_os = "linux")]
    fn fill(&mut self) -> io::Result<bool> {
        let rx = self.rx.as_mut().expect("bulk receive");
        rx.datagrams.clear();
        rx.next = 0;
        loop {
            let r = if self.gro == Some(true) {
                sys::recv_gro(&self.socket, &mut rx.buf, &mut rx.datagrams)
            } else {
                sys::recv_mmsg(&self.socket, &mut rx.buf, &mut rx.datagrams)
            };
            match r {
                Ok(()) => {
                    self.stats.recv_calls += 1;
                    return Ok(!rx.datagrams.is_empty());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn fill(&mut self) -> io::Result<bool> {
        Ok(false)
    }

    /// Sends one datagram. A full send buffer drops it (counted); other errors are returned.
    pub fn send_to(&mut self, packet: &[u8], to: SocketAddr) -> io::Result<()> {
        send_one(&self.socket, &mut self.stats, packet, to)
    }

    /// Turns UDP GSO off (it is used on Linux when the kernel accepts it); batches then go out
    /// through `sendmmsg`.
    pub fn disable_gso(&mut self) {
        self.gso = false;
    }

    /// Whether UDP GSO is (still) in use.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// The buffer for the next packet of the batch ([`MAX_PACKET`] bytes): write a packet at its
    /// start, then [`UdpEndpoint::batch_commit`] it (or leave it: an uncommitted slot is
    /// reused). Call it before every commit: a commit sends what the latest slot holds.
    pub fn batch_slot(&mut self) -> &mut [u8] {
        match self.batch_entries.len() {
            0 => &mut self.first[..],
            1 if self.batch_used == 0 => &mut self.second[..],
            _ => &mut self.batch[self.batch_used..self.batch_used + MAX_PACKET],
        }
    }

    /// Queues the `len` bytes written at the start of the current slot for `to`; a full batch
    /// is sent at once. A `len` beyond the slot is ignored.
    pub fn batch_commit(&mut self, len: usize, to: SocketAddr) -> io::Result<()> {
        if len == 0 || len > MAX_PACKET {
            return Ok(());
        }
        if self.batch_entries.is_empty() {
            // In `first`; moved to the batch buffer if two more packets follow.
            self.batch_entries.push((0, len, to));
            return Ok(());
        }
        if self.batch_used == 0 {
            // In `second`: a batch of two or more, so both move to the batch buffer.
            if self.batch.is_empty() {
                self.batch = vec![0u8; BATCH_BYTES];
                self.batch_entries.reserve_exact(SEND_BATCH);
            }
            let first = self.batch_entries[0].1;
            self.batch[..first].copy_from_slice(&self.first[..first]);
            self.batch[first..first + len].copy_from_slice(&self.second[..len]);
            self.batch_entries.push((first, len, to));
            self.batch_used = first + len;
            return Ok(());
        }
        self.batch_entries.push((self.batch_used, len, to));
        self.batch_used += len;
        if self.batch_entries.len() >= SEND_BATCH || self.batch_used + MAX_PACKET > BATCH_BYTES {
            self.batch_flush()?;
        }
        Ok(())
    }

    /// Sends every queued packet (a full socket buffer drops the rest of the batch, counted).
    pub fn batch_flush(&mut self) -> io::Result<()> {
        let result = if self.batch_used == 0 {
            // Zero or one packet, in `first`.
            let single = self.batch_entries.first().copied();
            self.batch_entries.clear();
            if !self.batch.is_empty() {
                self.batch = Vec::new();
                self.batch_entries = Vec::new();
            }
            match single {
                Some((_, len, to)) => {
                    send_one(&self.socket, &mut self.stats, &self.first[..len], to)
                }
                None => Ok(()),
            }
        } else {
            let small = self.batch_entries.len() < KEEP_BATCH;
            let r = self.send_batch();
            self.batch_entries.clear();
            self.batch_used = 0;
            if small {
                // Not bulk traffic: do not hold the buffer.
                self.batch = Vec::new();
                self.batch_entries = Vec::new();
            }
            r
        };
        result
    }

    fn send_batch(&mut self) -> io::Result<()> {
        let entries = std::mem::take(&mut self.batch_entries);
        let result = self.send_entries(&entries);
        self.batch_entries = entries;
        result
    }

    #[cfg(not(target_os = "linux"))]
    fn send_entries(&mut self, entries: &[(usize, usize, SocketAddr)]) -> io::Result<()> {
        for &(off, len, to) in entries {
            send_one(
                &self.socket,
                &mut self.stats,
                &self.batch[off..off + len],
                to,
            )?;
        }
        Ok(())
    }

    #[cfg(target_os = "linux")]
    fn send_entries(&mut self, entries: &[(usize, usize, SocketAddr)]) -> io::Result<()> {
        let mut i = 0;
        // Start of a run of packets not sent by GSO, sent together by sendmmsg.
        let mut singles = 0;
        while i < entries.len() {
            let (off, len, to) = entries[i];
            // A GSO run: one destination, equal sizes except a shorter last one.
            let mut j = i + 1;
            while self.gso
                && j < entries.len()
                && j - i < sys::GSO_MAX_SEGMENTS
                && entries[j].2 == to
                && entries[j - 1].1 == len
                && entries[j].1 <= len
            {
                j += 1;
            }
            if j - i < 2 {
                i += 1;
                continue;
            }
            self.send_mmsg(&entries[singles..i])?;
            let end = entries[j - 1].0 + entries[j - 1].1;
            match sys::send_gso(&self.socket, &self.batch[off..end], len, &to) {
                Ok(()) => {
                    self.stats.sent += (j - i) as u64;
                    self.stats.send_calls += 1;
                    i = j;
                    singles = j;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.send_dropped += (j - i) as u64;
                    i = j;
                    singles = j;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    i = j;
                    singles = j;
                }
                Err(e) if sys::gso_unsupported(&e) => {
                    log::debug!("udp: GSO refused ({e}); using sendmmsg");
                    self.gso = false;
                    singles = i;
                }
                Err(e) => return Err(e),
            }
        }
        self.send_mmsg(&entries[singles..])
    }

    #[cfg(target_os = "linux")]
    fn send_mmsg(&mut self, mut entries: &[(usize, usize, SocketAddr)]) -> io::Result<()> {
        while !entries.is_empty() {
            match sys::send_mmsg(&self.socket, &self.batch, entries) {
                Ok(k) => {
                    self.stats.sent += k as u64;
                    self.stats.send_calls += 1;
                    entries = &entries[k.max(1).min(entries.len())..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.send_dropped += entries.len() as u64;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // An earlier datagram's ICMP error, or this one's: as good as lost.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => entries = &entries[1..],
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> UdpStats {
        self.stats
    }

    /// Removes the socket from `registry`.
    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut self.socket)
    }
}

/// Most datagrams one GRO buffer holds.
fn sys_gso_max() -> usize {
    #[cfg(target_os = "linux")]
    return sys::GSO_MAX_SEGMENTS;
    #[cfg(not(target_os = "linux"))]
    return 0;
}

/// Sends one datagram; a full send buffer drops it (counted).
fn send_one(
    socket: &UdpSocket,
    stats: &mut UdpStats,
    packet: &[u8],
    to: SocketAddr,
) -> io::Result<()> {
    loop {
        match socket.send_to(packet, to) {
            Ok(_) => {
                stats.sent += 1;
                stats.send_calls += 1;
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stats.send_dropped += 1;
                return Ok(());
            }
            // The peer's port is closed: as good as a lost datagram for a datagram protocol.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// The Linux system calls behind batched sends.
#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::net::SocketAddr;
    use std::os::fd::AsRawFd;

    use mio::net::UdpSocket;

    use super::SEND_BATCH;

    /// `UDP_SEGMENT` from `<linux/udp.h>`.
    const UDP_SEGMENT: libc::c_int = 103;
    /// The kernel's limit of segments per GSO send.
    pub const GSO_MAX_SEGMENTS: usize = 64;

    /// Receive buffer size asked for (the kernel caps it at `net.core.rmem_max`): a window of
    /// blocks arriving as GSO bursts must not overflow the default ~200 KiB (the kernel charges
    /// a whole GSO buffer against it). This is a limit, not an allocation.
    const RECV_SOCKET_BUFFER: libc::c_int = 1 << 20;

    /// Raises the socket's receive buffer limit (best effort).
    pub fn grow_buffers(socket: &UdpSocket) {
        let v = RECV_SOCKET_BUFFER;
        // SAFETY: `v` is a valid c_int for the duration of the call.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            log::debug!("udp: SO_RCVBUF failed: {}", io::Error::last_os_error());
        }
    }

    /// `UDP_GRO` from `<linux/udp.h>`.
    const UDP_GRO: libc::c_int = 104;

    /// Turns UDP generic receive offload on or off.
    pub fn set_gro(socket: &UdpSocket, on: bool) -> io::Result<()> {
        let v: libc::c_int = on.into();
        // SAFETY: `v` is a valid c_int for the duration of the call.
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

    fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
        match ss.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in (family AF_INET).
                let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
            }
            libc::AF_INET6 => {
                // SAFETY: the kernel wrote a sockaddr_in6 (family AF_INET6).
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

    /// Reads one (possibly coalesced) datagram into `buf` with GRO on and appends its
    /// datagrams, cut at the segment size the kernel reports, to `out`. A datagram larger than
    /// `buf` (impossible with GRO's 64 KiB limit) is dropped.
    pub fn recv_gro(
        socket: &UdpSocket,
        buf: &mut [u8],
        out: &mut Vec<(usize, usize, SocketAddr)>,
    ) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_storage and msghdr are valid values.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // Room for one cmsghdr carrying a c_int, 8-byte aligned.
        let mut control = [0u64; 8];
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut addr as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` and everything it points to are valid and writable for the call.
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
        // CMSG_FIRSTHDR/CMSG_NXTHDR stay within it.
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

    /// Reads up to [`super::RECV_BATCH`] datagrams (GRO off) into slots of
    /// [`super::RECV_BUFFER`] bytes of `buf` in one call and appends them to `out`.
    pub fn recv_mmsg(
        socket: &UdpSocket,
        buf: &mut [u8],
        out: &mut Vec<(usize, usize, SocketAddr)>,
    ) -> io::Result<()> {
        use super::{RECV_BATCH, RECV_BUFFER};
        let m = RECV_BATCH.min(buf.len() / RECV_BUFFER);
        // SAFETY: all-zero values of these C structs are valid.
        let mut addrs: [libc::sockaddr_storage; RECV_BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; RECV_BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
        for k in 0..m {
            iovs[k] = libc::iovec {
                iov_base: buf[k * RECV_BUFFER..].as_mut_ptr() as *mut libc::c_void,
                iov_len: RECV_BUFFER,
            };
            hdrs[k].msg_hdr.msg_name = &mut addrs[k] as *mut _ as *mut libc::c_void;
            hdrs[k].msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdrs[k].msg_hdr.msg_iov = &mut iovs[k];
            hdrs[k].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `hdrs[..m]` point into `addrs`, `iovs` and `buf`, all alive and writable for
        // the call; a null timeout.
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
            // A datagram larger than a slot arrives truncated to a size the protocol drops.
            if let Some(from) = from_sockaddr(a) {
                out.push((k * RECV_BUFFER, h.msg_len as usize, from));
            }
        }
        Ok(())
    }

    /// Whether `e` means the kernel or the device cannot do UDP GSO.
    pub fn gso_unsupported(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
        )
    }

    fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: an all-zero sockaddr_storage is a valid value.
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

    /// Sends `data` as datagrams of `segment` bytes (the last may be shorter) in one call.
    pub fn send_gso(
        socket: &UdpSocket,
        data: &[u8],
        segment: usize,
        to: &SocketAddr,
    ) -> io::Result<()> {
        let (addr, addr_len) = sockaddr(to);
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // Room for one cmsghdr carrying a u16, 8-byte aligned.
        let mut control = [0u64; 4];
        // SAFETY: an all-zero msghdr is valid; every pointer set below outlives the call.
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
        // CMSG_FIRSTHDR therefore returns a valid pointer into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, seg);
        }
        // SAFETY: `msg` and everything it points to are valid for the call.
        let r = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sends up to [`SEND_BATCH`] of `entries` (offset, length, destination in `buf`) in one
    /// call; returns how many were sent.
    pub fn send_mmsg(
        socket: &UdpSocket,
        buf: &[u8],
        entries: &[(usize, usize, SocketAddr)],
    ) -> io::Result<usize> {
        let m = entries.len().min(SEND_BATCH);
        // SAFETY: all-zero values of these C structs are valid.
        let mut addrs: [libc::sockaddr_storage; SEND_BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; SEND_BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
        for (k, &(off, len, to)) in entries[..m].iter().enumerate() {
            let packet = &buf[off..off + len];
            let (a, alen) = sockaddr(&to);
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
        // SAFETY: `hdrs[..m]` point into `addrs`, `iovs` and `buf`, all alive for the call.
        let r = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), m as _, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use std::time::{Duration, Instant};

    /// Sends a batch mixing runs of equal sizes, shorter tails and two destinations, then
    /// reads every datagram back: same bytes, same sizes, nothing lost on loopback.
    fn batch_round_trip(gso: bool) {
        let poll = Poll::new().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut tx = UdpEndpoint::bind(poll.registry(), Token(0), any).unwrap();
        if !gso {
            tx.disable_gso();
        }
        let mut rx = [
            UdpEndpoint::bind(poll.registry(), Token(1), any).unwrap(),
            UdpEndpoint::bind(poll.registry(), Token(2), any).unwrap(),
        ];
        let to = [rx[0].local_addr().unwrap(), rx[1].local_addr().unwrap()];
        let mut sent: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        let plan: Vec<(usize, usize)> = (0..100)
            .map(|i| {
                let dest = usize::from(i % 17 == 5);
                let len = match i % 10 {
                    3 => 64,
                    7 => 1 + i,
                    _ => 1184,
                };
                (dest, len)
            })
            .collect();
        for (i, &(dest, len)) in plan.iter().enumerate() {
            let slot = tx.batch_slot();
            for (k, b) in slot[..len].iter_mut().enumerate() {
                *b = (i * 31 + k) as u8;
            }
            sent[dest].push(slot[..len].to_vec());
            tx.batch_commit(len, to[dest]).unwrap();
        }
        tx.batch_flush().unwrap();
        let st = tx.stats();
        assert_eq!(st.sent + st.send_dropped, 100);
        assert_eq!(
            st.send_dropped, 0,
            "loopback socket buffers hold 100 datagrams"
        );
        assert!(st.send_calls < 100, "batched: {st:?}");
        // This kernel does UDP GSO (Linux >= 4.18); an older one falls back to sendmmsg.
        eprintln!("gso in use: {}, {st:?}", tx.gso());
        let mut got: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut events = Events::with_capacity(8);
        let mut poll = poll;
        while got[0].len() + got[1].len() < 100 && Instant::now() < deadline {
            for (k, r) in rx.iter_mut().enumerate() {
                r.recv_all(1000, |p, _| got[k].push(p.to_vec())).unwrap();
            }
            poll.poll(&mut events, Some(Duration::from_millis(10)))
                .unwrap();
        }
        assert_eq!(got, sent);
        // An idle endpoint gives its batch buffer back after a small batch.
        tx.batch_slot();
        tx.batch_commit(10, to[0]).unwrap();
        tx.batch_flush().unwrap();
        assert!(tx.batch.is_empty());
        assert_eq!(tx.stats().sent, 101);
    }

    #[test]
    fn batched_sends_with_gso_arrive_intact() {
        batch_round_trip(true);
    }

    #[test]
    fn batched_sends_with_sendmmsg_arrive_intact() {
        batch_round_trip(false);
    }

    #[test]
    fn a_batch_of_one_or_two_needs_no_batch_buffer_and_keeps_order() {
        let mut poll = Poll::new().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut tx = UdpEndpoint::bind(poll.registry(), Token(0), any).unwrap();
        let mut rx = UdpEndpoint::bind(poll.registry(), Token(1), any).unwrap();
        let to = rx.local_addr().unwrap();
        // One packet, then a slot asked for and left unused (what a driver turn does).
        tx.batch_slot()[..3].copy_from_slice(b"one");
        tx.batch_commit(3, to).unwrap();
        tx.batch_slot();
        tx.batch_flush().unwrap();
        assert!(tx.batch.is_empty());
        // Two packets: they move to the batch buffer, which a small batch then releases.
        tx.batch_slot()[..3].copy_from_slice(b"two");
        tx.batch_commit(3, to).unwrap();
        tx.batch_slot()[..5].copy_from_slice(b"three");
        tx.batch_commit(5, to).unwrap();
        assert!(!tx.batch.is_empty());
        tx.batch_flush().unwrap();
        assert!(tx.batch.is_empty());
        let mut got = Vec::new();
        let mut events = Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < 3 && Instant::now() < deadline {
            rx.recv_all(10, |p, _| got.push(p.to_vec())).unwrap();
            poll.poll(&mut events, Some(Duration::from_millis(10)))
                .unwrap();
        }
        assert_eq!(got, [&b"one"[..], b"two", b"three"]);
    }

    /// Bulk receive: after a first burst read one by one, a sender's GSO bursts (with GRO) or
    /// batches (with `recvmmsg`) are read in few calls, byte for byte; after enough idle drains
    /// the endpoint leaves bulk receive and releases its buffer; datagrams sent then still
    /// arrive. `gro`: whether the receiver may use GRO (else it uses `recvmmsg`).
    fn bulk_receive(gso: bool, gro: bool) {
        let mut poll = Poll::new().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut tx = UdpEndpoint::bind(poll.registry(), Token(0), any).unwrap();
        if !gso {
            tx.disable_gso();
        }
        let mut rx = UdpEndpoint::bind(poll.registry(), Token(1), any).unwrap();
        if !gro {
            rx.gro = None;
        }
        let to = rx.local_addr().unwrap();
        let from = tx.local_addr().unwrap();
        let mut events = Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut read = |rx: &mut UdpEndpoint, n: usize| {
            let mut got = Vec::new();
            while got.len() < n && Instant::now() < deadline {
                rx.recv_all(1000, |p, src| {
                    assert_eq!(src, from);
                    got.push(p.to_vec())
                })
                .unwrap();
                poll.poll(&mut events, Some(Duration::from_millis(10)))
                    .unwrap();
            }
            got
        };
        let send = |tx: &mut UdpEndpoint, n: usize| {
            let mut sent = Vec::new();
            for i in 0..n {
                let len = if i % 50 == 49 { 100 } else { 1184 };
                let slot = tx.batch_slot();
                for (k, b) in slot[..len].iter_mut().enumerate() {
                    *b = (i * 7 + k) as u8;
                }
                sent.push(slot[..len].to_vec());
                tx.batch_commit(len, to).unwrap();
                if i % 32 == 31 {
                    tx.batch_flush().unwrap();
                }
            }
            tx.batch_flush().unwrap();
            sent
        };
        let first = send(&mut tx, BULK_AFTER + 4);
        assert_eq!(read(&mut rx, first.len()), first);
        assert_eq!(rx.stats().bulk_receives, 1);
        assert_eq!(rx.bulk_receive(), Some(gro));
        let calls = rx.stats().recv_calls;
        let sent = send(&mut tx, 300);
        assert_eq!(tx.stats().send_dropped, 0);
        assert_eq!(read(&mut rx, sent.len()), sent);
        let st = rx.stats();
        eprintln!("bulk receive {:?}, {st:?}", rx.bulk_receive());
        if gso == gro {
            // GSO bursts kept whole by GRO, or sendmmsg batches read by recvmmsg.
            assert!(st.recv_calls - calls < 100, "batched: {st:?}");
        }
        // Idle drains: bulk receive ends (GRO off, one more drain, buffer released).
        for _ in 0..=IDLE_DRAINS {
            assert!(rx.recv_one().unwrap().is_none());
        }
        assert!(rx.bulk_receive().is_none());
        tx.send_to(b"after", to).unwrap();
        assert_eq!(read(&mut rx, 1), [b"after".to_vec()]);
    }

    #[test]
    fn bulk_receive_of_gso_bursts_with_gro() {
        bulk_receive(true, true);
    }

    #[test]
    fn bulk_receive_of_single_datagrams_with_recvmmsg() {
        bulk_receive(false, false);
    }

    #[test]
    fn bulk_receive_of_single_datagrams_with_gro() {
        bulk_receive(false, true);
    }

    #[test]
    fn bulk_receive_of_gso_bursts_without_gro() {
        bulk_receive(true, false);
    }

    #[test]
    fn oversized_or_empty_commits_are_ignored() {
        let poll = Poll::new().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut tx = UdpEndpoint::bind(poll.registry(), Token(0), any).unwrap();
        let to = tx.local_addr().unwrap();
        tx.batch_slot();
        tx.batch_commit(0, to).unwrap();
        tx.batch_commit(MAX_PACKET + 1, to).unwrap();
        tx.batch_flush().unwrap();
        assert_eq!(tx.stats().sent, 0);
    }
}
