//! The drivers' relayed and punched UDP paths (cargo feature `relay`; without it
//! `relay_off.rs` stands in): a client's path through a relay and its hole punch
//! ([`ClientRelay`]), a server's relay role, the relays it holds a reservation with and its
//! hole punches ([`ServerRelays`]), and the public methods of [`ServerDriver`] and
//! [`ClientDriver`] that set them up. The datagrams and the sans-IO machines are
//! [`super::relay`]'s; this file moves them between those and the sockets.

use std::collections::{HashMap, HashSet, VecDeque};

use super::client::ClientLink;
use super::inbound::{push_event, Reply};
use super::*;
use crate::transport::relay::Datagram;

/// Hole punches a [`ServerDriver`] runs at once (further ones are refused).
pub const MAX_PUNCHES: usize = 64;
/// Reservations one node may hold with relays at once.
pub const MAX_BOUND_RELAYS: usize = 8;
/// Probe answers a client sends per read.
const MAX_ANSWERS: usize = 16;

/// A client's path through a relay, and its hole punch towards the server.
pub(super) struct ClientRelay {
    /// While relayed: the server's box key, the relay's target (`None` once punched).
    via: Option<[u8; 32]>,
    /// The relay this connection started on (its stragglers are still accepted after a move
    /// to a direct path).
    relay: SocketAddr,
    /// A hole punch in progress.
    prober: Option<Prober>,
    /// Probe answers to send after a read.
    answers: Vec<(SocketAddr, [u8; 16])>,
    /// The punch opened a direct path to this address during a read.
    opened: Option<SocketAddr>,
}

impl ClientRelay {
    /// Whether packets still go through the relay.
    pub(super) fn relayed(&self) -> bool {
        self.via.is_some()
    }

    /// Whether a datagram from `from` comes from the relay.
    pub(super) fn is_relay(&self, from: SocketAddr) -> bool {
        from == self.relay
    }

    /// A relay-family datagram from `from`: a punch probe or answer (nothing else of that
    /// kind is for a client).
    pub(super) fn datagram(&mut self, d: &[u8], from: SocketAddr) {
        let Some(p) = self.prober.as_mut() else {
            return;
        };
        match p.handle(d, from) {
            ProbeInput::Answer(a) if self.answers.len() < MAX_ANSWERS => {
                self.answers.push((from, a))
            }
            ProbeInput::Open => self.opened = Some(from),
            _ => {}
        }
    }

    /// After a read: sends the probe answers it asked for; returns the direct path a punch
    /// opened, if one did (packets leave the relay for it).
    pub(super) fn after_read(&mut self, u: &mut UdpEndpoint) -> Option<SocketAddr> {
        for (to, a) in self.answers.drain(..) {
            if let Err(e) = u.send_to(&a, to) {
                debug!("client: probe answer to {to} not sent: {e}");
            }
        }
        let direct = self.opened.take()?;
        debug!("client: punched a direct path to {direct}; leaving the relay");
        self.via = None;
        Some(direct)
    }

    /// Sends the probes due, then, while relayed, every packet the client has due, each
    /// wrapped for the relay at `peer` with one `send_to`. `Ok(false)`: not relayed (any
    /// more), the caller sends the client's packets directly.
    pub(super) fn transmit(
        &mut self,
        client: &mut Client,
        u: &mut UdpEndpoint,
        peer: SocketAddr,
        bufs: (&mut [u8], &mut [u8]),
        now: Instant,
    ) -> io::Result<bool> {
        if let Some(p) = self.prober.as_mut() {
            while let Some(d) = p.poll_transmit(now) {
                if let Err(e) = u.send_to(&d, p.target()) {
                    debug!("client: probe to {} not sent: {e}", p.target());
                }
            }
        }
        let Some(target) = self.via else {
            return Ok(false);
        };
        let (buf, wrapped) = bufs;
        while let Some(n) = client.poll_transmit(now, buf) {
            match relay::wrap_to(&target, &buf[..n], wrapped) {
                Some(m) => u.send_to(&wrapped[..m], peer)?,
                None => debug!("client: a {n}-byte packet cannot be relayed"),
            }
        }
        Ok(true)
    }

    /// When the next probe is due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.prober.as_ref().and_then(Prober::next_deadline)
    }
}

impl ClientDriver {
    /// Like [`ClientDriver::connect`] over UDP, through the relay at `relay`
    /// ([`super::relay`]): every packet goes to the relay addressed to the server's box key
    /// (`config.server_key`); replies come from the relay.
    pub fn connect_relayed(
        registry: &Registry,
        token: Token,
        relay: SocketAddr,
        config: ClientConfig,
        now: Instant,
    ) -> io::Result<ClientDriver> {
        let target = config.server_key.0;
        // A dual-stack socket where the system has IPv6 (a punch may open an IPv6 path while
        // the relay is reached over IPv4); an IPv4 one otherwise.
        let udp = TransportKind::Udp;
        let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
        let dual = (relay.is_ipv4() && !relay.ip().is_loopback())
            .then(|| {
                let (r, c, f) = (registry, config.clone(), Framing::Native);
                Self::connect_from(r, token, udp, f, relay, Some(any6), c, now).ok()
            })
            .flatten();
        let mut d = match dual {
            Some(d) => d,
            None => Self::connect(registry, token, udp, relay, config, now)?,
        };
        d.relay = Some(ClientRelay {
            via: Some(target),
            relay,
            prober: None,
            answers: Vec::new(),
            opened: None,
        });
        d.wrapped = vec![0; MAX_PACKET + relay::OVERHEAD];
        Ok(d)
    }

    /// Starts a hole punch towards `target` (the server's address as its relay sees it): the
    /// driver probes it from its socket ([`Prober`]); when the target answers, packets go to
    /// it directly and no longer through the relay. Only for a relayed connection; a punch
    /// already running is replaced.
    pub fn start_punch(&mut self, target: SocketAddr, now: Instant) {
        if let (Some(r), ClientLink::Udp(_)) = (self.relay.as_mut(), &self.link) {
            if r.relayed() {
                r.prober = Some(Prober::new(target, now));
            }
        }
    }

    /// A hole punch is running.
    pub fn punching(&self) -> bool {
        self.relay
            .as_ref()
            .and_then(|r| r.prober.as_ref())
            .is_some_and(|p| !p.gave_up() && !p.is_open())
    }
}

/// A server's relayed paths on its listening UDP socket: the relay role, the relays it holds
/// a reservation with, and its hole punches.
#[derive(Default)]
pub(super) struct ServerRelays {
    /// The relay role ([`ServerDriver::enable_relay`]).
    relay: Option<Relay>,
    /// Relays we hold a reservation with: their relayed packets are accepted.
    bound: HashSet<SocketAddr>,
    /// Hole punches from the listening socket, by target (at most [`MAX_PUNCHES`]).
    probers: HashMap<SocketAddr, Prober>,
    /// Our signId, for who-is answers (set with the relay role).
    who: Option<[u8; 32]>,
    /// The current second of who-is answers and how many went out in it.
    who_window: Option<(Instant, u32)>,
}

impl ServerRelays {
    /// A relay-family datagram `d` (parsed: `parsed`) from `from`, other than the awaited
    /// dial-back probe: a packet a bound relay forwards goes to the server (its reply wrapped
    /// back through the relay), a bound relay's confirmation becomes a [`NatEvent`], a probe
    /// from a punch target is answered, anything else is the relay role's (or dropped
    /// without one). Returns the datagram to send, written into `out` (the server's reply
    /// goes into `reply` first).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn datagram<'b>(
        &mut self,
        server: &mut Server<Path>,
        (reply, out): (&mut [u8], &'b mut [u8]),
        d: &[u8],
        parsed: Datagram<'_>,
        from: SocketAddr,
        now: Instant,
        events: &mut VecDeque<NatEvent>,
    ) -> Option<Reply<'b>> {
        match parsed {
            Datagram::From { peer, packet } if self.bound.contains(&from) => {
                let path = Path::Relayed { relay: from, peer };
                let len = server.handle_packet(packet, path, now, reply)?;
                match relay::wrap_back(peer, &reply[..len], out) {
                    Some(m) => Some(Reply {
                        bytes: &out[..m],
                        to: from,
                        what: "relayed Cookie",
                    }),
                    None => {
                        debug!("server: a {len}-byte reply cannot be relayed");
                        None
                    }
                }
            }
            Datagram::Bound { observed, .. } if self.bound.contains(&from) => {
                push_event(
                    events,
                    NatEvent::Bound {
                        relay: from,
                        observed,
                    },
                );
                None
            }
            Datagram::Punch(_) | Datagram::PunchAck(_) => {
                let ProbeInput::Answer(a) = self.probers.get_mut(&from)?.handle(d, from) else {
                    return None;
                };
                out[..a.len()].copy_from_slice(&a);
                Some(Reply {
                    bytes: &out[..a.len()],
                    to: from,
                    what: "probe answer",
                })
            }
            Datagram::Who(nonce) if self.relay.is_some() => {
                let sign = self.who?;
                let window = match self.who_window {
                    Some((start, n))
                        if now.saturating_duration_since(start) < Duration::from_secs(1) =>
                    {
                        (start, n)
                    }
                    _ => (now, 0),
                };
                if window.1 >= relay::WHO_ANSWERS_PER_SEC {
                    debug!("server: who-is from {from} not answered (rate)");
                    return None;
                }
                self.who_window = Some((window.0, window.1 + 1));
                let a = relay::iam_datagram(&nonce, &sign);
                out[..a.len()].copy_from_slice(&a);
                Some(Reply {
                    bytes: &out[..a.len()],
                    to: from,
                    what: "who-is answer",
                })
            }
            _ if self.relay.is_some() => {
                let f = self.relay.as_mut()?.handle(d, from, now, out)?;
                Some(Reply {
                    bytes: &out[..f.len],
                    to: f.to,
                    what: "relayed datagram",
                })
            }
            _ => {
                debug!("server: dropped a relay datagram from {from}");
                None
            }
        }
    }

    /// Sends the probes of the running punches that are due.
    pub(super) fn send_probes(&mut self, u: &mut UdpEndpoint, now: Instant) {
        for p in self.probers.values_mut() {
            while let Some(d) = p.poll_transmit(now) {
                if let Err(e) = u.send_to(&d, p.target()) {
                    debug!("server: probe to {} not sent: {e}", p.target());
                }
            }
        }
    }

    /// When the next probe is due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.probers
            .values()
            .filter_map(Prober::next_deadline)
            .min()
    }
}

impl ServerDriver {
    /// Offers relaying on the UDP socket ([`super::relay`]) within `limits`.
    pub fn enable_relay(&mut self, limits: RelayLimits) {
        self.nat.relays.relay = Some(Relay::new(limits));
    }

    /// With the relay role, who-is questions are answered with this signId (see
    /// [`super::relay`]).
    pub fn answer_whois(&mut self, sign: [u8; 32]) {
        self.nat.relays.who = Some(sign);
    }

    /// The relay role's table (`None` unless [`ServerDriver::enable_relay`]).
    pub fn relay(&self) -> Option<&Relay> {
        self.nat.relays.relay.as_ref()
    }

    /// The relay role's table, to reserve and release.
    pub fn relay_mut(&mut self) -> Option<&mut Relay> {
        self.nat.relays.relay.as_mut()
    }

    /// Binds our reservation at the relay `relay` (sends one bind datagram from the listening
    /// socket, which also keeps our NAT's mapping towards it open) and from now on accepts the
    /// packets it relays. `false` if there is no UDP socket or too many relays are bound.
    pub fn bind_relay(&mut self, relay: SocketAddr, token: &[u8; relay::TOKEN_LEN]) -> bool {
        let bound = &mut self.nat.relays.bound;
        if !bound.contains(&relay) && bound.len() >= MAX_BOUND_RELAYS {
            return false;
        }
        let Some(u) = self.udp.as_mut() else {
            return false;
        };
        bound.insert(relay);
        if let Err(e) = u.send_to(&relay::bind_datagram(token), relay) {
            debug!("server: bind to relay {relay} not sent: {e}");
        }
        true
    }

    /// Stops accepting packets relayed by `relay`.
    pub fn unbind_relay(&mut self, relay: SocketAddr) {
        self.nat.relays.bound.remove(&relay);
    }

    /// Starts punching from the listening socket towards `target` (a client reaching us
    /// through a relay), and answers its probes. `false` when too many punches run.
    pub fn start_punch(&mut self, target: SocketAddr, now: Instant) -> bool {
        let probers = &mut self.nat.relays.probers;
        probers.retain(|_, p| p.next_deadline().is_some());
        if !probers.contains_key(&target) && probers.len() >= MAX_PUNCHES {
            return false;
        }
        probers.insert(target, Prober::new(target, now));
        true
    }
}
