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
//!
//! This module is the endpoint's logic (batches, bulk receive and when to enter and leave it,
//! counters, which errors drop a datagram); the system calls themselves, with their raw
//! pointers and C structs, are in the transport's private `socket` module, which also holds
//! the portable path (one `send_to` / `recv_from` per datagram) for Unix systems other than
//! Linux.

use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::socket::{self, Entry};
use crate::curvecp::MAX_PACKET;

/// Datagrams queued for one batched send at most.
pub const SEND_BATCH: usize = socket::MMSG_BATCH;
/// A batch of fewer packets releases the batch buffer once sent (only bulk traffic keeps it).
const KEEP_BATCH: usize = 8;
/// Bytes of the batch buffer.
const BATCH_BYTES: usize = SEND_BATCH * MAX_PACKET;

/// Datagrams read in one drain that switch an endpoint to bulk receive (Linux).
pub const BULK_AFTER: usize = 16;
/// Datagrams per `recvmmsg` when bulk receive runs without GRO.
pub const RECV_BATCH: usize = socket::MMSG_BATCH;
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
    datagrams: Vec<Entry>,
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
    batch_entries: Vec<Entry>,
    /// Whether UDP GSO is still tried.
    gso: bool,
    /// Bulk receive, while traffic is heavy (Linux).
    rx: Option<Box<RecvBatch>>,
    /// Datagrams read one by one since the last drain ended (towards `BULK_AFTER`).
    streak: usize,
    /// Whether UDP GRO is on for the socket; `None` once the kernel refused it.
    gro: Option<bool>,
    /// The socket is IPv6 (dual-stack when bound to `::`): IPv4 peers appear as IPv4-mapped
    /// addresses to the kernel, and as plain IPv4 addresses to callers.
    v6: bool,
}

/// `a` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, how a dual-stack socket sees an
/// IPv4 peer) written as the IPv4 address it is.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::from((ip, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

/// A non-blocking UDP socket bound to the IPv6 address `addr`, taking IPv4 too (as
/// IPv4-mapped) unless `only_v6`, whatever the system's default (`bindv6only`).
pub(crate) fn bind_v6(addr: SocketAddr, only_v6: bool) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_only_v6(only_v6)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(UdpSocket::from_std(s.into()))
}

impl UdpEndpoint {
    /// Binds `addr` and registers the socket for readability under `token`.
    pub fn bind(registry: &Registry, token: Token, addr: SocketAddr) -> io::Result<UdpEndpoint> {
        let mut socket = if addr.is_ipv6() && addr.ip().is_unspecified() {
            // `::` is both families, whatever the system's default (`bindv6only`).
            bind_v6(addr, false)?
        } else {
            UdpSocket::bind(addr)?
        };
        socket::grow_recv_buffer(&socket);
        registry.register(&mut socket, token, Interest::READABLE)?;
        Ok(UdpEndpoint {
            v6: addr.is_ipv6(),
            socket,
            buf: Box::new([0; RECV_BUFFER]),
            stats: UdpStats::default(),
            first: Box::new([0; MAX_PACKET]),
            second: Box::new([0; MAX_PACKET]),
            batch: Vec::new(),
            batch_used: 0,
            batch_entries: Vec::new(),
            gso: socket::OFFLOAD,
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
            return Ok(Some((&rx.buf[off..off + len], canonical(from))));
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
                    return Ok(Some((&self.buf[..len], canonical(from))));
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
        if !socket::OFFLOAD {
            return;
        }
        if self.gro == Some(false) {
            self.gro = match socket::set_gro(&self.socket, true) {
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
            datagrams: Vec::with_capacity(RECV_BATCH.max(socket::GSO_MAX_SEGMENTS)),
            next: 0,
            drained: 0,
            idle_drains: 0,
            leaving: false,
        }));
    }

    /// The next datagram of the bulk batch, reading more when it is used up; `None` at the end
    /// of a drain (which may leave bulk receive).
    fn next_batched(&mut self) -> io::Result<Option<Entry>> {
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
            if self.gro == Some(true) {
                if let Err(e) = socket::set_gro(&self.socket, false) {
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
    fn fill(&mut self) -> io::Result<bool> {
        let rx = self.rx.as_mut().expect("bulk receive");
        rx.datagrams.clear();
        rx.next = 0;
        loop {
            let r = if self.gro == Some(true) {
                socket::recv_gro(&self.socket, &mut rx.buf, &mut rx.datagrams)
            } else {
                socket::recv_mmsg(&self.socket, &mut rx.buf, RECV_BUFFER, &mut rx.datagrams)
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

    /// Sends one datagram. A full send buffer drops it (counted); other errors are returned.
    pub fn send_to(&mut self, packet: &[u8], to: SocketAddr) -> io::Result<()> {
        let to = self.kernel_addr(to);
        send_one(&self.socket, &mut self.stats, packet, to)
    }

    /// `to` as the socket's family writes it: an IPv4 address becomes IPv4-mapped on an
    /// IPv6 socket.
    fn kernel_addr(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.v6 => {
                SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port()))
            }
            _ => to,
        }
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
        let to = self.kernel_addr(to);
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

    /// Sends `entries` (offset, length, destination in `batch`): each run of equal-sized
    /// datagrams to one peer (the last may be shorter) with one GSO call while GSO works, the
    /// rest with `sendmmsg`.
    fn send_entries(&mut self, entries: &[Entry]) -> io::Result<()> {
        let mut i = 0;
        // Start of a run of packets not sent by GSO, sent together by sendmmsg.
        let mut singles = 0;
        while i < entries.len() {
            let (off, len, to) = entries[i];
            // A GSO run: one destination, equal sizes except a shorter last one.
            let mut j = i + 1;
            while self.gso
                && j < entries.len()
                && j - i < socket::GSO_MAX_SEGMENTS
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
            match socket::send_gso(&self.socket, &self.batch[off..end], len, &to) {
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
                Err(e) if socket::gso_unsupported(&e) => {
                    log::debug!("udp: GSO refused ({e}); using sendmmsg");
                    self.gso = false;
                    singles = i;
                }
                Err(e) => return Err(e),
            }
        }
        self.send_mmsg(&entries[singles..])
    }

    /// Sends `entries` with as few `sendmmsg` calls as the socket takes; a full send buffer
    /// drops the rest (counted).
    fn send_mmsg(&mut self, mut entries: &[Entry]) -> io::Result<()> {
        while !entries.is_empty() {
            match socket::send_mmsg(&self.socket, &self.batch, entries) {
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
