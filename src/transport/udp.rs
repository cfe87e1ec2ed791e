//! UDP: one datagram is one CurveCP packet.
//!
//! [`UdpEndpoint`] wraps a non-blocking `mio::net::UdpSocket` with a reused receive buffer. It
//! reads until `WouldBlock` (the poll is edge-triggered) and treats a full send buffer like a
//! lost datagram: CurveCP retransmits, and nothing queues without bound.

use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

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
}

/// A UDP socket registered for reading, with its receive buffer.
#[derive(Debug)]
pub struct UdpEndpoint {
    socket: UdpSocket,
    buf: Box<[u8; RECV_BUFFER]>,
    stats: UdpStats,
}

impl UdpEndpoint {
    /// Binds `addr` and registers the socket for readability under `token`.
    pub fn bind(registry: &Registry, token: Token, addr: SocketAddr) -> io::Result<UdpEndpoint> {
        let mut socket = UdpSocket::bind(addr)?;
        registry.register(&mut socket, token, Interest::READABLE)?;
        Ok(UdpEndpoint {
            socket,
            buf: Box::new([0; RECV_BUFFER]),
            stats: UdpStats::default(),
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
            match self.socket.recv_from(&mut self.buf[..]) {
                Ok((len, from)) => {
                    n += 1;
                    self.stats.received += 1;
                    f(&self.buf[..len], from);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors from earlier sends (port unreachable) surface here on Linux; they
                // say nothing about the datagrams still waiting.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Reads one waiting datagram, if any: its bytes (valid until the next call) and source.
    pub fn recv_one(&mut self) -> io::Result<Option<(&[u8], SocketAddr)>> {
        loop {
            match self.socket.recv_from(&mut self.buf[..]) {
                Ok((len, from)) => {
                    self.stats.received += 1;
                    return Ok(Some((&self.buf[..len], from)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one datagram. A full send buffer drops it (counted); other errors are returned.
    pub fn send_to(&mut self, packet: &[u8], to: SocketAddr) -> io::Result<()> {
        loop {
            match self.socket.send_to(packet, to) {
                Ok(_) => {
                    self.stats.sent += 1;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.send_dropped += 1;
                    return Ok(());
                }
                // The peer's port is closed: as good as a lost datagram for a datagram protocol.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) => return Err(e),
            }
        }
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
