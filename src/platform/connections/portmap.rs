//! Port mapping's IO: the socket and timer of the [`PortMapper`] (the protocol is
//! [`crate::transport::portmap`]), and what a mapping changes in `reach`.
//!
//! When it runs: [`crate::NetConfig::port_mapping`] is on (the default), the UDP listener is
//! bound to an unspecified address (`0.0.0.0`) or to a private or documentation-range IPv4
//! address (a node listening on loopback or on a public address has nothing to map), and the
//! system has a default IPv4 gateway (Linux: `/proc/net/route`). It asks that gateway only;
//! answers from any other address are dropped. An ICMP "port unreachable" from the gateway
//! (nothing listens on 5351) ends the asking at once; otherwise a silent gateway is given up
//! after about 12 s (PCP, then NAT-PMP). The first reachability check waits for the gateway's
//! first answer, at most 1 s, so that it checks the mapped port when there is one.
//!
//! What a mapping does: the mapped external port becomes the port of our dial-back requests
//! (one the peer refuses, its once-per-30-s dial-back of our address being spent, is asked
//! again 30 s later), so a peer that sees us from the gateway's public address dials that
//! address at the mapped port; when the probe arrives we are reachable, and the published UDP endpoint carries the
//! address the peer saw with the *mapped* port (the gateway's own claim about its address is
//! only logged: behind a second NAT it is wrong). That proof is also what keeps a forged answer
//! harmless: NAT-PMP answers carry no nonce, so a host on the LAN that spoofs the gateway's
//! address could invent a mapping, but an endpoint is published only once a peer's probe came
//! in through it. Being reachable, the node takes no relay and
//! leaves the one it had. A mapping that is lost (renewals unanswered) makes the node
//! unreachable again, so it takes a relay. Dropping the platform asks the gateway to remove the
//! mapping (`Platform::close` does not: the platform stays usable after it). A process killed
//! (SIGKILL) leaves its mapping on the gateway until the lifetime asked for (2 h) runs out; the
//! next run asks for the same port again, which PCP and NAT-PMP servers grant to the same
//! client.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use super::{Net, NetTimer};
use crate::platform::timers::TimerId;
use crate::transport::portmap::{default_gateway, PortMapEvent, PortMapper, MAX_ANSWER};

/// The mapper's socket token: the top of the listeners' range (their accepted streams count
/// up from its bottom).
pub(crate) const PORTMAP_TOKEN: Token = Token(crate::platform::host::SERVICE_TOKEN_BASE - 1);

/// How long the first reachability check waits for the gateway's first answer.
const MAPPING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The mapper, its socket (connected to the gateway's server port) and its timer.
pub(super) struct PortMap {
    socket: UdpSocket,
    mapper: PortMapper,
    timer: Option<TimerId>,
}

/// Whether a listener on `ip` may sit behind a gateway that maps ports.
fn worth_mapping(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_private() || is_documentation(a),
        IpAddr::V6(_) => false,
    }
}

/// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 (the addresses of test networks).
fn is_documentation(a: Ipv4Addr) -> bool {
    matches!(
        a.octets(),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _]
    )
}

impl PortMap {
    /// Starts asking the default gateway to map the UDP listener at `udp`, or `None` when
    /// there is nothing to ask (see the module docs) or no socket towards the gateway.
    pub(super) fn start(registry: &Registry, udp: SocketAddr, now: Instant) -> Option<PortMap> {
        if !worth_mapping(udp.ip()) {
            return None;
        }
        let table = std::fs::read_to_string("/proc/net/route").ok()?;
        let gateway = default_gateway(&table)?;
        match Self::open(registry, gateway, udp, now) {
            Ok(p) => Some(p),
            Err(e) => {
                log::debug!("portmap: no socket towards gateway {gateway}: {e}");
                None
            }
        }
    }

    fn open(
        registry: &Registry,
        gateway: Ipv4Addr,
        udp: SocketAddr,
        now: Instant,
    ) -> io::Result<PortMap> {
        let bind_ip = match udp.ip() {
            IpAddr::V4(a) if !a.is_unspecified() => a,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let mut socket = UdpSocket::bind(SocketAddr::from((bind_ip, 0)))?;
        let server = SocketAddr::from((gateway, crate::transport::portmap::SERVER_PORT));
        socket.connect(server)?;
        let client_ip = match socket.local_addr()?.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => return Err(io::Error::other("no IPv4 source address")),
        };
        registry.register(&mut socket, PORTMAP_TOKEN, Interest::READABLE)?;
        let mut nonce = [0u8; 12];
        crate::crypto::random_bytes(&mut nonce);
        log::debug!(
            "portmap: asking {gateway} to map UDP port {} (from {client_ip})",
            udp.port()
        );
        Ok(PortMap {
            socket,
            mapper: PortMapper::new(gateway, client_ip, udp.port(), nonce, now),
            timer: None,
        })
    }
}

impl Net {
    /// Starts port mapping if it applies (called once the listeners are bound).
    pub(super) fn portmap_start(&mut self, now: Instant) {
        if !self.cfg.port_mapping {
            return;
        }
        let Some(udp) = self.server.udp_addr() else {
            return;
        };
        self.portmap = PortMap::start(&self.registry, udp, now);
        if self.portmap.is_some() {
            // The first reachability check waits for the gateway's answer, but not long:
            // PCP and NAT-PMP servers answer at once, and a silent gateway must not hold up a
            // node that a peer could reach anyway.
            self.reach_mapping_pending(true);
            self.timers
                .schedule(now + MAPPING_WAIT, NetTimer::MappingWait);
        }
        self.portmap_flush(now);
    }

    /// The mapper's socket is readable: every datagram (at most [`MAX_ANSWER`] bytes of each)
    /// goes to the mapper.
    pub(super) fn portmap_readable(&mut self, now: Instant) {
        let Some(p) = self.portmap.as_mut() else {
            return;
        };
        let mut buf = [0u8; MAX_ANSWER + 1];
        // Bounded: a flood is read at most this many datagrams a turn (the rest next turn,
        // edge-triggered readiness repeats only on new data, so drain to WouldBlock).
        for _ in 0..64 {
            match p.socket.recv_from(&mut buf) {
                // A longer datagram arrives cut to MAX_ANSWER + 1 bytes: the mapper drops it as
                // too long, and counts it.
                Ok((n, from)) => p.mapper.handle_datagram(from, &buf[..n], now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    // The gateway's ICMP "port unreachable", reported on a connected socket:
                    // no PCP or NAT-PMP server there.
                    p.mapper.handle_unreachable();
                }
                Err(e) => {
                    log::debug!("portmap: {e}");
                    break;
                }
            }
        }
        self.portmap_flush(now);
    }

    /// The mapper's timer.
    pub(super) fn portmap_due(&mut self, now: Instant) {
        if let Some(p) = self.portmap.as_mut() {
            p.timer = None;
        }
        self.portmap_flush(now);
    }

    /// Sends what is due, acts on the mapper's events, re-arms its timer.
    fn portmap_flush(&mut self, now: Instant) {
        let mut events = Vec::new();
        {
            let Some(p) = self.portmap.as_mut() else {
                return;
            };
            while let Some(d) = p.mapper.poll_transmit(now) {
                if let Err(e) = p.socket.send(&d) {
                    log::debug!("portmap: request not sent: {e}");
                }
            }
            while let Some(e) = p.mapper.poll_event() {
                events.push(e);
            }
            if let Some(id) = p.timer.take() {
                self.timers.cancel(id);
            }
            p.timer = p
                .mapper
                .poll_timeout()
                .map(|at| self.timers.schedule(at, NetTimer::PortMap));
        }
        for e in events {
            let first = matches!(e, PortMapEvent::Mapped(_) | PortMapEvent::Unavailable(_));
            match e {
                PortMapEvent::Mapped(m) => {
                    if let Some(ip) = m.external_ip {
                        log::debug!("portmap: the gateway says its address is {ip}");
                    }
                    self.on_port_mapped(Some(m.external_port), now);
                }
                PortMapEvent::Lost => {
                    log::info!("portmap: the gateway stopped renewing our mapping");
                    self.on_port_mapped(None, now);
                }
                PortMapEvent::Unavailable(why) => {
                    log::debug!("portmap: no mapping: {why}");
                    self.on_port_mapped(None, now);
                }
            }
            if first {
                self.mapping_settled(now);
            }
        }
    }

    /// Asks the gateway to remove our mapping (best effort: one datagram, no answer awaited)
    /// and stops mapping.
    pub(crate) fn portmap_close(&mut self) {
        let Some(mut p) = self.portmap.take() else {
            return;
        };
        p.mapper.close();
        if let Some(d) = p.mapper.poll_transmit(Instant::now()) {
            let _ = p.socket.send(&d);
        }
        if let Some(id) = p.timer.take() {
            self.timers.cancel(id);
        }
        let _ = self.registry.deregister(&mut p.socket);
    }

    /// The external port forwarded to our UDP listener, while a mapping holds.
    pub(crate) fn mapped_port(&self) -> Option<u16> {
        self.portmap
            .as_ref()
            .and_then(|p| p.mapper.mapping())
            .map(|m| m.external_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listeners_that_may_sit_behind_a_gateway_are_mapped() {
        for ip in ["0.0.0.0", "192.168.1.5", "10.0.0.2", "198.51.100.2"] {
            assert!(worth_mapping(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "8.8.8.8", "::", "::1"] {
            assert!(!worth_mapping(ip.parse().unwrap()), "{ip}");
        }
    }
}
