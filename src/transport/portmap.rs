//! Port mapping: asking the home router (the default gateway) to forward a public port to our
//! listening UDP socket, with PCP (RFC 6887) and, where the router speaks only that, NAT-PMP
//! (RFC 6886). Sans-IO: [`PortMapper`] takes datagrams and `now`, hands out the datagrams to
//! send to the gateway's port [`SERVER_PORT`] and its next deadline, and reports
//! [`PortMapEvent`]s. The connection manager owns the socket and the clock.
//!
//! What it does: a PCP `MAP` request for our UDP port (the external port suggested equal to
//! it), sent five times (after 250 ms, 500 ms, 1 s, 2 s) and given 2 s more; a router that answers "unsupported version"
//! (in PCP or NAT-PMP form) is asked again in NAT-PMP at once, one that never answers PCP is
//! asked in NAT-PMP after those tries; a router that answers neither leaves the mapper
//! [`PortMapEvent::Unavailable`] (it does not ask again). A mapping is renewed at half its
//! lifetime (with the same resends), reported [`PortMapEvent::Lost`] when it expires without
//! renewal, and removed by [`PortMapper::close`] (a request with lifetime zero).
//!
//! Every answer is hostile input: one that does not come from the gateway's [`SERVER_PORT`],
//! is shorter or longer than its format, of another version or opcode, a PCP answer whose
//! nonce, protocol or internal port is not ours' request, a NAT-PMP answer for another
//! internal port, or a success with lifetime or external port zero is dropped (counted in
//! [`PortMapStats`]) and changes nothing. Answers are at most [`MAX_ANSWER`] bytes read.
//!
//! The external address the gateway claims is only reported: behind a second NAT (a carrier's)
//! it is not the address peers see, so the connection manager publishes the mapped *port* with
//! the address a dial-back proved (see `platform::connections::reach`).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::TransportKind;

/// The port PCP and NAT-PMP servers listen on.
pub const SERVER_PORT: u16 = 5351;
/// The largest answer read (the largest PCP message, RFC 6887 §7).
pub const MAX_ANSWER: usize = 1100;
/// The lifetime asked for.
pub const LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);
/// The longest lifetime believed (a longer one is taken as this).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest lifetime kept: a mapping renewed more often than this is not worth having.
const MIN_LIFETIME: Duration = Duration::from_secs(30);
/// Sends of one request before the next step (NAT-PMP, or giving up).
const MAX_SENDS: usize = 5;
/// The wait after the first, second, ... send of a request (the last one repeats).
const RESENDS: [Duration; 4] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

const PCP_VERSION: u8 = 2;
const PCP_OP_MAP: u8 = 1;
const PCP_RESPONSE: u8 = 0x80;
const PCP_HEADER: usize = 24;
const PCP_MAP_LEN: usize = PCP_HEADER + 36;
const PCP_UNSUPP_VERSION: u8 = 1;
const NATPMP_VERSION: u8 = 0;
const NATPMP_OP_MAP_UDP: u8 = 1;
const NATPMP_OP_MAP_TCP: u8 = 2;
const NATPMP_RESPONSE: u8 = 128;
const NATPMP_MAP_ANSWER_LEN: usize = 16;
const NATPMP_UNSUPP_VERSION: u16 = 1;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;

/// Which protocol a mapping was made with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Port Control Protocol, RFC 6887.
    Pcp,
    /// NAT Port Mapping Protocol, RFC 6886.
    NatPmp,
    /// UPnP Internet Gateway Device (`WANIPConnection`'s `AddPortMapping`), see
    /// [`crate::transport::upnp`].
    UpnpIgd,
}

/// A mapping the gateway made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The public port forwarded to ours.
    pub external_port: u16,
    /// The public address the gateway says it has (PCP says it; NAT-PMP answers to a `MAP`
    /// do not, `None`).
    pub external_ip: Option<Ipv4Addr>,
    /// How long the gateway keeps it without renewal.
    pub lifetime: Duration,
    /// The protocol that made it.
    pub protocol: Protocol,
    /// Which of our listeners it forwards to (UDP or TCP).
    pub transport: TransportKind,
}

/// What a [`PortMapper`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMapEvent {
    /// A mapping was made or renewed (the external port may differ from the last one).
    Mapped(Mapping),
    /// The mapping expired without renewal (the gateway stopped answering).
    Lost,
    /// No mapping can be had from this gateway: the reason (no answer, refused with a result
    /// code).
    Unavailable(String),
}

/// Counters of a [`PortMapper`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortMapStats {
    /// Requests sent (first sends and resends).
    pub requests: u64,
    /// Answers accepted.
    pub answers: u64,
    /// Datagrams from another address than the gateway's server port.
    pub foreign: u64,
    /// Datagrams from the gateway that were malformed, not an answer to our request, or
    /// unexpected in the state we were in.
    pub dropped: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Asking for a mapping (or its renewal) with `protocol`; `sent` requests so far.
    Asking {
        protocol: Protocol,
        sent: usize,
        next_at: Instant,
    },
    /// Mapped, renewed from `renew_at`, gone at `expires_at`.
    Mapped {
        mapping: Mapping,
        renew_at: Instant,
        expires_at: Instant,
    },
    /// Renewing a mapping that is still valid until `expires_at`.
    Renewing {
        mapping: Mapping,
        sent: usize,
        next_at: Instant,
        expires_at: Instant,
    },
    /// Nothing more to do (unavailable, lost, or closed).
    Done,
}

/// The client side of PCP and NAT-PMP for one UDP port (see the module docs).
pub struct PortMapper {
    gateway: SocketAddrV4,
    client_ip: Ipv4Addr,
    port: u16,
    transport: TransportKind,
    nonce: [u8; 12],
    phase: Phase,
    /// A request is due now (first send, resend, renewal, removal).
    due: Option<Vec<u8>>,
    events: VecDeque<PortMapEvent>,
    stats: PortMapStats,
}

impl PortMapper {
    /// A mapper asking `gateway` for a mapping of our UDP `port`; `client_ip` is our address
    /// on the gateway's network (the source address of our requests, which PCP repeats in
    /// them); `nonce` 12 random bytes. The first request is due at `now`.
    pub fn new(
        gateway: Ipv4Addr,
        client_ip: Ipv4Addr,
        port: u16,
        nonce: [u8; 12],
        now: Instant,
    ) -> PortMapper {
        Self::new_for(TransportKind::Udp, gateway, client_ip, port, nonce, now)
    }

    /// [`PortMapper::new`] for our `transport` listener's port (UDP or TCP).
    pub fn new_for(
        transport: TransportKind,
        gateway: Ipv4Addr,
        client_ip: Ipv4Addr,
        port: u16,
        nonce: [u8; 12],
        now: Instant,
    ) -> PortMapper {
        let mut m = PortMapper {
            gateway: SocketAddrV4::new(gateway, SERVER_PORT),
            client_ip,
            port,
            transport,
            nonce,
            phase: Phase::Done,
            due: None,
            events: VecDeque::new(),
            stats: PortMapStats::default(),
        };
        m.ask(Protocol::Pcp, now);
        m
    }

    /// The gateway's server address (where [`Self::poll_transmit`]'s datagrams go).
    pub fn server(&self) -> SocketAddrV4 {
        self.gateway
    }

    /// The counters.
    pub fn stats(&self) -> PortMapStats {
        self.stats
    }

    /// The current mapping, if any.
    pub fn mapping(&self) -> Option<Mapping> {
        match self.phase {
            Phase::Mapped { mapping, .. } | Phase::Renewing { mapping, .. } => Some(mapping),
            _ => None,
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<PortMapEvent> {
        self.events.pop_front()
    }

    /// A datagram to send to [`Self::server`] now, if one is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.handle_timeout(now);
        let d = self.due.take();
        if d.is_some() {
            self.stats.requests += 1;
        }
        d
    }

    /// When [`Self::poll_transmit`] should next be called (`None`: only on input).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            _ if self.due.is_some() => None,
            Phase::Asking { next_at, .. } | Phase::Renewing { next_at, .. } => Some(next_at),
            Phase::Mapped { renew_at, .. } => Some(renew_at),
            Phase::Done => None,
        }
    }

    /// Stops: a mapping we hold is removed (a request with lifetime zero, due at once, not
    /// resent); nothing more is asked.
    pub fn close(&mut self) {
        if let Some(m) = self.mapping() {
            self.due = Some(self.request_for(m.protocol, 0));
        }
        self.phase = Phase::Done;
    }

    fn ask(&mut self, protocol: Protocol, now: Instant) {
        self.due = Some(self.request(protocol));
        self.phase = Phase::Asking {
            protocol,
            sent: 1,
            next_at: now + RESENDS[0],
        };
    }

    fn request(&self, protocol: Protocol) -> Vec<u8> {
        self.request_for(protocol, LIFETIME.as_secs() as u32)
    }

    /// A request in `protocol` (PCP, else NAT-PMP: a `PortMapper` asks in nothing else).
    fn request_for(&self, protocol: Protocol, lifetime: u32) -> Vec<u8> {
        if protocol == Protocol::Pcp {
            self.pcp_request(lifetime)
        } else {
            self.natpmp_request(lifetime)
        }
    }

    /// The IP protocol number of our transport (PCP).
    fn ip_proto(&self) -> u8 {
        match self.transport {
            TransportKind::Udp => IPPROTO_UDP,
            TransportKind::Tcp => IPPROTO_TCP,
        }
    }

    /// The NAT-PMP opcode mapping our transport.
    fn natpmp_op(&self) -> u8 {
        match self.transport {
            TransportKind::Udp => NATPMP_OP_MAP_UDP,
            TransportKind::Tcp => NATPMP_OP_MAP_TCP,
        }
    }

    /// A PCP `MAP` request for our port (RFC 6887 §7.1, §11.1).
    fn pcp_request(&self, lifetime: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(PCP_MAP_LEN);
        b.extend_from_slice(&[PCP_VERSION, PCP_OP_MAP, 0, 0]);
        b.extend_from_slice(&lifetime.to_be_bytes());
        b.extend_from_slice(&self.client_ip.to_ipv6_mapped().octets());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&[self.ip_proto(), 0, 0, 0]);
        b.extend_from_slice(&self.port.to_be_bytes());
        b.extend_from_slice(&self.port.to_be_bytes());
        // Suggested external address: any IPv4 address (::ffff:0.0.0.0).
        b.extend_from_slice(&Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets());
        b
    }

    /// A NAT-PMP mapping request (RFC 6886 §3.3).
    fn natpmp_request(&self, lifetime: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(12);
        b.extend_from_slice(&[NATPMP_VERSION, self.natpmp_op(), 0, 0]);
        b.extend_from_slice(&self.port.to_be_bytes());
        b.extend_from_slice(&self.port.to_be_bytes());
        b.extend_from_slice(&lifetime.to_be_bytes());
        b
    }

    /// Deadlines: resends, the switch to NAT-PMP, giving up, renewal, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Asking {
                protocol,
                sent,
                next_at,
            } if now >= next_at => {
                if sent < MAX_SENDS {
                    self.due = Some(self.request(protocol));
                    self.phase = Phase::Asking {
                        protocol,
                        sent: sent + 1,
                        next_at: now + RESENDS[sent.min(RESENDS.len() - 1)],
                    };
                } else if protocol == Protocol::Pcp {
                    log::debug!(
                        "portmap: no PCP answer from {}, trying NAT-PMP",
                        self.gateway
                    );
                    self.ask(Protocol::NatPmp, now);
                } else {
                    self.unavailable(format!("no answer from {}", self.gateway));
                }
            }
            Phase::Mapped {
                mapping,
                renew_at,
                expires_at,
            } if now >= renew_at => {
                self.due = Some(self.request(mapping.protocol));
                self.phase = Phase::Renewing {
                    mapping,
                    sent: 1,
                    next_at: (now + RESENDS[0]).min(expires_at),
                    expires_at,
                };
            }
            Phase::Renewing {
                mapping,
                sent,
                next_at,
                expires_at,
            } if now >= next_at => {
                if now >= expires_at {
                    log::debug!("portmap: mapping of port {} expired unrenewed", self.port);
                    self.phase = Phase::Done;
                    self.events.push_back(PortMapEvent::Lost);
                } else {
                    // Keep asking until the mapping expires, at most every 2 s.
                    let wait = RESENDS[sent.min(RESENDS.len() - 1)];
                    self.due = Some(self.request(mapping.protocol));
                    self.phase = Phase::Renewing {
                        mapping,
                        sent: sent + 1,
                        next_at: (now + wait).min(expires_at),
                        expires_at,
                    };
                }
            }
            _ => {}
        }
    }

    fn unavailable(&mut self, why: String) {
        log::debug!("portmap: unavailable: {why}");
        self.phase = Phase::Done;
        self.due = None;
        self.events.push_back(PortMapEvent::Unavailable(why));
    }

    /// The gateway said (ICMP "port unreachable") that nothing listens on its server port:
    /// neither protocol will answer. Given up at once while asking for a first mapping; while
    /// a mapping is held (renewing) it is ignored, and the renewal's resends decide.
    pub fn handle_unreachable(&mut self) {
        if let Phase::Asking { .. } = self.phase {
            self.unavailable(format!("nothing listens on {}", self.gateway));
        }
    }

    /// A datagram that arrived on the mapper's socket from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        if from != SocketAddr::V4(self.gateway) {
            self.stats.foreign += 1;
            return;
        }
        let asking = match self.phase {
            Phase::Asking { protocol, .. } => Some(protocol),
            Phase::Renewing { mapping, .. } => Some(mapping.protocol),
            Phase::Mapped { .. } | Phase::Done => None,
        };
        let Some(protocol) = asking else {
            self.stats.dropped += 1;
            return;
        };
        let answer = match data.first() {
            Some(&PCP_VERSION) if protocol == Protocol::Pcp => self.parse_pcp(data),
            Some(&NATPMP_VERSION) => self.parse_natpmp(data, protocol),
            _ => None,
        };
        let Some(answer) = answer else {
            self.stats.dropped += 1;
            return;
        };
        self.stats.answers += 1;
        match answer {
            Answer::Mapped(m) => {
                let lifetime = m.lifetime.min(MAX_LIFETIME);
                if lifetime < MIN_LIFETIME {
                    self.unavailable(format!("lifetime of {} s is too short", lifetime.as_secs()));
                    return;
                }
                let mapping = Mapping { lifetime, ..m };
                log::debug!(
                    "portmap: {:?} maps external port {} to our port {} for {} s",
                    mapping.protocol,
                    mapping.external_port,
                    self.port,
                    lifetime.as_secs()
                );
                self.phase = Phase::Mapped {
                    mapping,
                    renew_at: now + lifetime / 2,
                    expires_at: now + lifetime,
                };
                self.due = None;
                self.events.push_back(PortMapEvent::Mapped(mapping));
            }
            Answer::UnsupportedVersion if protocol == Protocol::Pcp => {
                log::debug!("portmap: {} speaks no PCP, trying NAT-PMP", self.gateway);
                self.ask(Protocol::NatPmp, now);
            }
            Answer::UnsupportedVersion => self.unavailable("unsupported version".into()),
            Answer::Refused(code) => {
                self.unavailable(format!("refused by {}: result code {code}", self.gateway))
            }
        }
    }

    /// A PCP `MAP` answer to our request, or `None`.
    fn parse_pcp(&self, d: &[u8]) -> Option<Answer> {
        if d.len() < PCP_HEADER || d.len() > MAX_ANSWER || !d.len().is_multiple_of(4) {
            return None;
        }
        if d[1] != PCP_RESPONSE | PCP_OP_MAP {
            return None;
        }
        let result = d[3];
        if result == PCP_UNSUPP_VERSION {
            return Some(Answer::UnsupportedVersion);
        }
        // Error answers carry the opcode's data too; options after it are ignored.
        if d.len() < PCP_MAP_LEN {
            return None;
        }
        let lifetime = u32::from_be_bytes(d[4..8].try_into().ok()?);
        let map = &d[PCP_HEADER..PCP_MAP_LEN];
        if map[..12] != self.nonce || map[12] != self.ip_proto() {
            return None;
        }
        let internal = u16::from_be_bytes([map[16], map[17]]);
        if internal != self.port {
            return None;
        }
        if result != 0 {
            return Some(Answer::Refused(u16::from(result)));
        }
        let external_port = u16::from_be_bytes([map[18], map[19]]);
        let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&map[20..36]).ok()?);
        if external_port == 0 || lifetime == 0 {
            return None;
        }
        Some(Answer::Mapped(Mapping {
            external_port,
            external_ip: ip.to_ipv4_mapped(),
            lifetime: Duration::from_secs(u64::from(lifetime)),
            protocol: Protocol::Pcp,
            transport: self.transport,
        }))
    }

    /// A NAT-PMP answer: to our UDP `MAP`, or "unsupported version" (to a PCP request), or
    /// `None`.
    fn parse_natpmp(&self, d: &[u8], asking: Protocol) -> Option<Answer> {
        // The short form: an answer to a request of another version (RFC 6886 §3.5), which
        // is how a NAT-PMP-only router answers PCP.
        if d.len() >= 4 && d[1] >= NATPMP_RESPONSE {
            let result = u16::from_be_bytes([d[2], d[3]]);
            if result == NATPMP_UNSUPP_VERSION && asking == Protocol::Pcp {
                return Some(Answer::UnsupportedVersion);
            }
        }
        if asking != Protocol::NatPmp || d.len() != NATPMP_MAP_ANSWER_LEN {
            return None;
        }
        if d[1] != NATPMP_RESPONSE + self.natpmp_op() {
            return None;
        }
        let result = u16::from_be_bytes([d[2], d[3]]);
        let internal = u16::from_be_bytes([d[8], d[9]]);
        if internal != self.port {
            return None;
        }
        if result == NATPMP_UNSUPP_VERSION {
            return Some(Answer::UnsupportedVersion);
        }
        if result != 0 {
            return Some(Answer::Refused(result));
        }
        let external_port = u16::from_be_bytes([d[10], d[11]]);
        let lifetime = u32::from_be_bytes(d[12..16].try_into().ok()?);
        if external_port == 0 || lifetime == 0 {
            return None;
        }
        Some(Answer::Mapped(Mapping {
            external_port,
            external_ip: None,
            lifetime: Duration::from_secs(u64::from(lifetime)),
            protocol: Protocol::NatPmp,
            transport: self.transport,
        }))
    }
}

/// The default IPv4 gateway in the text of Linux's `/proc/net/route` (the first route to
/// `0.0.0.0/0` with the gateway flag), or `None`.
pub fn default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gw, flags, mask) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if *dest != "00000000" || *mask != "00000000" || flags & (RTF_UP | RTF_GATEWAY) != 3 {
            return None;
        }
        // The kernel prints the address in host byte order (little-endian here).
        let gw = u32::from_str_radix(gw, 16).ok()?;
        let ip = Ipv4Addr::from(gw.to_le_bytes());
        (!ip.is_unspecified()).then_some(ip)
    })
}

/// What an accepted answer says.
enum Answer {
    Mapped(Mapping),
    UnsupportedVersion,
    Refused(u16),
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const ME: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    const NONCE: [u8; 12] = [7; 12];

    fn gw() -> SocketAddr {
        SocketAddr::from((GW, SERVER_PORT))
    }

    /// A PCP server's answer to `req` (a MAP request) with `result`, `port` and `lifetime`.
    fn pcp_answer(req: &[u8], result: u8, port: u16, lifetime: u32) -> Vec<u8> {
        let mut a = vec![PCP_VERSION, PCP_RESPONSE | PCP_OP_MAP, 0, result];
        a.extend_from_slice(&lifetime.to_be_bytes());
        a.extend_from_slice(&[0, 0, 0, 1]); // epoch
        a.extend_from_slice(&[0; 12]);
        a.extend_from_slice(&req[PCP_HEADER..PCP_HEADER + 18]); // nonce, protocol, internal port
        a.extend_from_slice(&port.to_be_bytes());
        a.extend_from_slice(&Ipv4Addr::new(203, 0, 113, 3).to_ipv6_mapped().octets());
        a
    }

    fn natpmp_answer(result: u16, internal: u16, port: u16, lifetime: u32) -> Vec<u8> {
        let mut a = vec![0, NATPMP_RESPONSE + 1];
        a.extend_from_slice(&result.to_be_bytes());
        a.extend_from_slice(&5u32.to_be_bytes());
        a.extend_from_slice(&internal.to_be_bytes());
        a.extend_from_slice(&port.to_be_bytes());
        a.extend_from_slice(&lifetime.to_be_bytes());
        a
    }

    #[test]
    fn pcp_maps_renews_at_half_life_and_removes_on_close() {
        let t = Instant::now();
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let req = m.poll_transmit(t).unwrap();
        assert_eq!(req.len(), PCP_MAP_LEN);
        assert_eq!(&req[..2], &[2, 1]);
        assert_eq!(&req[8..24], &ME.to_ipv6_mapped().octets());
        assert_eq!(&req[24..36], &NONCE);
        assert_eq!(&req[40..44], &[0x0f, 0xa0, 0x0f, 0xa0]);
        m.handle_datagram(gw(), &pcp_answer(&req, 0, 4100, 600), t);
        let want = Mapping {
            external_port: 4100,
            external_ip: Some(Ipv4Addr::new(203, 0, 113, 3)),
            lifetime: Duration::from_secs(600),
            protocol: Protocol::Pcp,
            transport: TransportKind::Udp,
        };
        assert_eq!(m.poll_event(), Some(PortMapEvent::Mapped(want)));
        assert_eq!(m.poll_timeout(), Some(t + Duration::from_secs(300)));
        assert!(m.poll_transmit(t + Duration::from_secs(299)).is_none());
        let t2 = t + Duration::from_secs(300);
        let renew = m.poll_transmit(t2).expect("renewal");
        assert_eq!(renew, req);
        m.handle_datagram(gw(), &pcp_answer(&renew, 0, 4100, 600), t2);
        assert_eq!(m.poll_event(), Some(PortMapEvent::Mapped(want)));
        m.close();
        let del = m.poll_transmit(t2).expect("removal");
        assert_eq!(&del[4..8], &[0, 0, 0, 0], "lifetime zero");
        assert_eq!(m.poll_timeout(), None);
        assert!(m.poll_transmit(t2 + Duration::from_secs(10_000)).is_none());
    }

    #[test]
    fn a_natpmp_only_router_is_asked_again_in_natpmp() {
        let t = Instant::now();
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let _pcp = m.poll_transmit(t).unwrap();
        // RFC 6886 §3.5: "unsupported version" in NAT-PMP's short form.
        m.handle_datagram(gw(), &[0, 128 + 1, 0, 1, 0, 0, 0, 9], t);
        let req = m.poll_transmit(t).expect("NAT-PMP request at once");
        assert_eq!(
            req,
            vec![0, 1, 0, 0, 0x0f, 0xa0, 0x0f, 0xa0, 0, 0, 0x1c, 0x20]
        );
        m.handle_datagram(gw(), &natpmp_answer(0, 4000, 4000, 7200), t);
        match m.poll_event() {
            Some(PortMapEvent::Mapped(mp)) => {
                assert_eq!(mp.protocol, Protocol::NatPmp);
                assert_eq!(mp.external_port, 4000);
                assert_eq!(mp.external_ip, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn silence_resends_then_falls_back_then_gives_up_and_stays_idle() {
        let t = Instant::now();
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let mut now = t;
        let mut sent = Vec::new();
        for _ in 0..100 {
            if let Some(d) = m.poll_transmit(now) {
                sent.push((now - t, d[0]));
            }
            match m.poll_timeout() {
                Some(at) => {
                    assert!(at > now, "a deadline already past");
                    now = at;
                }
                None => break,
            }
        }
        let versions: Vec<u8> = sent.iter().map(|s| s.1).collect();
        assert_eq!(versions, vec![2, 2, 2, 2, 2, 0, 0, 0, 0, 0]);
        assert!(sent.last().unwrap().0 < Duration::from_secs(10), "{sent:?}");
        assert!(matches!(m.poll_event(), Some(PortMapEvent::Unavailable(_))));
        assert_eq!(m.poll_timeout(), None, "idle after giving up");
        assert_eq!(m.stats().requests, 10);
    }

    #[test]
    fn forged_malformed_and_foreign_answers_change_nothing() {
        let t = Instant::now();
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let req = m.poll_transmit(t).unwrap();
        let good = pcp_answer(&req, 0, 4100, 600);
        // From another host, or from the gateway's other port.
        m.handle_datagram(SocketAddr::from(([198, 51, 100, 9], SERVER_PORT)), &good, t);
        m.handle_datagram(SocketAddr::from((GW, 5350)), &good, t);
        assert_eq!(m.stats().foreign, 2);
        let mut bad = Vec::new();
        let mut wrong_nonce = good.clone();
        wrong_nonce[24] ^= 1;
        bad.push(wrong_nonce);
        let mut wrong_port = good.clone();
        wrong_port[41] ^= 1;
        bad.push(wrong_port);
        let mut tcp = good.clone();
        tcp[36] = 6;
        bad.push(tcp);
        let mut zero_life = good.clone();
        zero_life[4..8].copy_from_slice(&[0; 4]);
        bad.push(zero_life);
        let mut zero_port = good.clone();
        zero_port[42..44].copy_from_slice(&[0, 0]);
        bad.push(zero_port);
        let mut not_answer = good.clone();
        not_answer[1] = PCP_OP_MAP;
        bad.push(not_answer);
        bad.push(good[..PCP_MAP_LEN - 4].to_vec());
        bad.push(vec![2; MAX_ANSWER + 4]);
        bad.push(Vec::new());
        bad.push(vec![9; 60]);
        // A NAT-PMP map answer while asking in PCP, and one for another port later.
        bad.push(natpmp_answer(0, 4000, 4000, 7200));
        for b in &bad {
            m.handle_datagram(gw(), b, t);
        }
        assert_eq!(m.stats().dropped, bad.len() as u64);
        assert_eq!(m.poll_event(), None);
        assert_eq!(m.mapping(), None);
        // The real answer still works.
        m.handle_datagram(gw(), &good, t);
        assert!(matches!(m.poll_event(), Some(PortMapEvent::Mapped(_))));
        // Once mapped, answers nobody asked for are dropped.
        m.handle_datagram(gw(), &good, t);
        assert_eq!(m.stats().dropped, bad.len() as u64 + 1);
        assert_eq!(m.poll_event(), None);
        // Random input of every length: no panic, no event.
        let mut n = PortMapper::new(GW, ME, 4000, NONCE, t);
        let mut x = 0x1234_5678_u32;
        for len in 0..200 {
            let d: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            n.handle_datagram(gw(), &d, t);
        }
        assert!(n.mapping().is_none());
    }

    #[test]
    fn the_default_gateway_is_read_from_the_route_table() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t016433C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_gateway(table), Some(GW));
        // Only a link route, or garbage: none.
        let link = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                    eth0\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_gateway(link), None);
        assert_eq!(default_gateway(""), None);
        assert_eq!(default_gateway("x\ny z\n\u{0}"), None);
    }

    #[test]
    fn a_gateway_port_that_is_unreachable_ends_the_asking_at_once() {
        let t = Instant::now();
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let _ = m.poll_transmit(t);
        m.handle_unreachable();
        assert!(matches!(m.poll_event(), Some(PortMapEvent::Unavailable(_))));
        assert_eq!(m.poll_timeout(), None);
        // While a mapping is held, an ICMP error (forgeable) does not end it.
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let req = m.poll_transmit(t).unwrap();
        m.handle_datagram(gw(), &pcp_answer(&req, 0, 4000, 600), t);
        assert!(matches!(m.poll_event(), Some(PortMapEvent::Mapped(_))));
        m.handle_unreachable();
        assert!(m.mapping().is_some());
        assert_eq!(m.poll_event(), None);
    }

    #[test]
    fn refusals_and_expiry_are_reported() {
        let t = Instant::now();
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let req = m.poll_transmit(t).unwrap();
        m.handle_datagram(gw(), &pcp_answer(&req, 2, 0, 0), t); // NOT_AUTHORIZED
        match m.poll_event() {
            Some(PortMapEvent::Unavailable(why)) => assert!(why.contains("result code 2"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A mapping whose renewals go unanswered is lost when it expires.
        let mut m = PortMapper::new(GW, ME, 4000, NONCE, t);
        let req = m.poll_transmit(t).unwrap();
        m.handle_datagram(gw(), &pcp_answer(&req, 0, 4000, 60), t);
        assert!(matches!(m.poll_event(), Some(PortMapEvent::Mapped(_))));
        let mut now = t;
        let mut renewals = 0;
        for _ in 0..1000 {
            if m.poll_transmit(now).is_some() {
                renewals += 1;
            }
            match m.poll_timeout() {
                Some(at) => now = at,
                None => break,
            }
        }
        assert_eq!(m.poll_event(), Some(PortMapEvent::Lost));
        assert_eq!(now, t + Duration::from_secs(60));
        // Every 2 s at most from 30 s to 60 s.
        assert!((10..=20).contains(&renewals), "{renewals}");
    }

    #[test]
    fn a_tcp_mapper_asks_for_tcp_and_ignores_udp_answers() {
        let t = Instant::now();
        let mut m = PortMapper::new_for(TransportKind::Tcp, GW, ME, 4001, NONCE, t);
        let req = m.poll_transmit(t).unwrap();
        assert_eq!(req[PCP_HEADER + 12], IPPROTO_TCP);
        // The UDP mapper's answer (same socket, same nonce here) is not ours.
        let mut udp_answer = pcp_answer(&req, 0, 4001, 600);
        udp_answer[PCP_HEADER + 12] = IPPROTO_UDP;
        m.handle_datagram(gw(), &udp_answer, t);
        assert_eq!(m.stats().dropped, 1);
        m.handle_datagram(gw(), &pcp_answer(&req, 0, 5001, 600), t);
        match m.poll_event() {
            Some(PortMapEvent::Mapped(mp)) => {
                assert_eq!((mp.external_port, mp.transport), (5001, TransportKind::Tcp))
            }
            e => panic!("{e:?}"),
        }
        // NAT-PMP: opcode 2.
        let mut m = PortMapper::new_for(TransportKind::Tcp, GW, ME, 4001, NONCE, t);
        m.poll_transmit(t).unwrap();
        m.handle_datagram(gw(), &[0, 128, 0, 1], t);
        let req = m.poll_transmit(t).unwrap();
        assert_eq!(&req[..2], &[0, 2]);
        let mut a = natpmp_answer(0, 4001, 5002, 600);
        a[1] = NATPMP_RESPONSE + 2;
        m.handle_datagram(gw(), &a, t);
        assert!(
            matches!(m.poll_event(), Some(PortMapEvent::Mapped(mp)) if mp.external_port == 5002)
        );
    }
}
