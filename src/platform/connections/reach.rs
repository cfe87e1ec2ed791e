//! Reachability: what a node learns about how others can reach it, and what it does about it.
//! The data paths themselves are transports ([`crate::transport::relay`], the drivers'
//! relayed and punched paths); this is their control plane, `mm` frames between native nodes
//! (never sent to JavaScript peers, which speak no `mm`: see [`super::dialect`]).
//!
//! - *Observed addresses* (libp2p identify's idea): the accepting side of a native connection
//!   tells its peer, once identified, the address it sees it from (`mm`/`observed`, payload
//!   `ip:port`). The receiver compares the IP with the source address its own system picks
//!   for that peer: different hints that a NAT is between them.
//! - *Dial-back* (libp2p autonat's idea, [`crate::transport::relay::DialBackGuard`]): a node
//!   that got such a hint, or whose UDP listener is bound to an unspecified address (so it
//!   does not know what to publish), asks the peer that told it (`mm`/`reach.dialback`,
//!   payload `PORT NONCEHEX`: its listening UDP port and a fresh 16-byte nonce) to dial it
//!   back. The peer, within its guard's limits, sends `MMdialB1` probes with the nonce from a
//!   fresh socket to *the requester's IP address as its connection shows it* (never an address
//!   from the request) and that port, and answers `mm`/`reach.dialing` (or `reach.refused`),
//!   payload the nonce. The nonce reaching our listener within [`DIAL_BACK_TIMEOUT`] of the
//!   request makes us *reachable*; a `reach.dialing` answer and no probe by then makes us
//!   *unreachable*; anything else (refused, no answer: an older node) is inconclusive and the
//!   hint decides. At most [`MAX_DIAL_BACK_ASKS`] checks per run; a conclusion is kept for
//!   the run. A reachable node publishes its UDP endpoints with the observed IP address (so a
//!   public node bound to `0.0.0.0`, or one behind a port forward, publishes an address others
//!   can use) and takes no relay (it leaves one it took before the answer); an unreachable one
//!   takes a relay even when the hint said nothing (a firewall that drops inbound flows).
//! - *Port mapping* (`portmap` beside this file): while our gateway maps a public port to our
//!   UDP listener, our dial-back requests name that port instead of the listener's, so a
//!   probe through the mapping proves it, and the published UDP endpoint then carries the
//!   observed address with the mapped port. Each new mapping is checked once (with the
//!   latest peer that sent us `observed`); a lost one starts the reachability question over.
//! - *Relays*: a node behind a NAT that knows a node offering relaying (its nodeInfo's UDP
//!   endpoint says `"relay": true`; from the bootstrap list, a nodeInfo given to it,
//!   discovery, a relay search in a DHT) chooses one (by RTT among several; the choice of
//!   the last run first: see `relay.rs`), connects to it, asks for a reservation (`mm`/`relay.reserve`; answered by
//!   `mm`/`relay.ok` with a 16-byte token in hex, or `mm`/`relay.no`), binds it from its
//!   listening socket every [`NetConfig::relay_bind_interval`] (retried every
//!   [`relay::BIND_RETRY`] until the relay confirms, at most [`relay::BIND_TRIES`] times), and then
//!   publishes the relayed endpoint in its nodeInfo instead of its unusable direct ones. The
//!   relay keeps the reservation while the node's connection to it lives. A relay that goes
//!   away (connection lost, binds unanswered) is replaced by another known one; with none
//!   left, the node publishes its direct endpoints again. A node offering relaying never uses
//!   one.
//! - *Hole punching* (DCUtR's idea): when a connection reaches us through our relay, and the
//!   relay told us our listening socket's public address, we send it to the peer
//!   (`mm`/`punch`, payload `ip:port`) and probe the peer's address (as the relay sees it)
//!   from our listening socket; the peer, on receiving it, probes ours from its connection's
//!   socket. Both sides probe for the same few seconds, so each NAT sees outgoing traffic
//!   before the other's probes arrive; when the peer's probe is answered its CurveCP client
//!   sends straight to us and our server follows it (roaming). CurveCP's stream carries the
//!   bytes across the move, so no message is lost or duplicated. One round per connection:
//!   behind NATs that map a fresh port per destination the punch fails and the relayed path
//!   stays.
//! - *Hole punching over IPv6*: IPv6 needs no address translation, but stateful firewalls
//!   drop flows that start outside (a node behind one withdraws its IPv6 addresses once a
//!   dial-back over IPv6 never arrives, and is reached through its relay). With a global IPv6
//!   address on a dual-stack listener, we also send `mm`/`punch6` (our IPv6 address and
//!   listener port) on such a connection; the peer, whose relayed connection runs on a
//!   dual-stack socket, probes that address and answers with its own IPv6 address and the
//!   socket's port (`punch6` back), which our listener probes. Both firewalls see outgoing
//!   probes first, the punch opens a direct IPv6 path (it replaces the IPv4 punch on the
//!   peer's side: IPv6 has no port translation to defeat it). Once per connection; only
//!   global unicast targets are probed.
//!
//! Relays and hole punching are `relay.rs` beside this file, cargo feature `relay`. Without
//! it, `relay_off.rs` stands in: observed addresses and dial-back work as above (a reachable
//! node still publishes its observed address), but the node takes no relay (an unreachable
//! one keeps publishing its direct endpoints), refuses reservations and never punches.
//!
//! Published endpoints: the bound ones, minus those on an unspecified address (`0.0.0.0`,
//! `::`, which nobody can dial) and, while a relay is bound, minus every direct one (a node
//! behind a NAT cannot be dialled there); the relayed ones while bound. Once a dial-back
//! proved us reachable, the UDP endpoints carry the IP address the dialling peer saw (the
//! bound port kept); TCP endpoints are not checked and stay as bound.
//!
//! IPv6: a listener on `::` also lists its global IPv6 addresses (2000::/3, at most 4, read
//! from the interfaces at start and every [`NetConfig::interface_refresh`] after) with its
//! port, beside a relay too: IPv6 needs no NAT traversal. A native peer that tells us over
//! IPv6 where it sees us from is asked to dial back that address (the same check as IPv4's,
//! one at a time, in the same budget, never through the IPv4 port mapping); if it dials and
//! nothing comes, a firewall drops inbound IPv6 and the addresses are withdrawn until they
//! change. Until such a check they are listed unproven: a peer whose packets they drop loses
//! one connection attempt there (or the 250 ms Happy Eyeballs head start, when it races our
//! IPv4 endpoint).
//!
//! A change of the published endpoints makes the platform publish `transports.myNodeInfo` and
//! raise [`crate::Event::MyNodeInfo`].

use std::net::{Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::context::Cx;
use super::dialect::Dialect;
use super::{mm_frame, Link, Net, NetTimer, Pending, Track};
use crate::identity::BoxId;
use crate::platform::directory::NodeInfo;
use crate::platform::timers::TimerId;
use crate::platform::Event;
use crate::transport::connection_info::Endpoint;
use crate::transport::driver::{NatEvent, Path};
use crate::transport::relay::{DialBackGuard, DIAL_BACK_NONCE_LEN, TOKEN_LEN};
use crate::transport::TransportKind;

// The relay we use, serving reservations and hole punching; without the `relay` feature, a
// stand-in that does none of it.
#[cfg_attr(not(feature = "relay"), path = "reach/relay_off.rs")]
mod relay;
pub(super) use relay::{offers_relay, serve_relay, serve_whois};

/// A dial-back we asked for must reach our listener this soon after the request.
pub const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Dial-back checks a node asks for in one run at most.
pub const MAX_DIAL_BACK_ASKS: u32 = 4;

/// A dial-back check in flight.
struct Check {
    peer: BoxId,
    nonce: [u8; DIAL_BACK_NONCE_LEN],
    /// Our listening socket's IP address as the peer sees it (`observed`), with the port
    /// it saw.
    seen: SocketAddr,
    /// The port we asked the peer to dial: our listener's, or the one our gateway maps to it.
    port: u16,
    /// The peer said it dialled.
    acked: bool,
    timer: TimerId,
}

/// The reachability state of a node (see the module docs).
pub(super) struct Reach {
    /// The endpoints as bound.
    bound: Vec<Endpoint>,
    /// What our nodeInfo lists.
    published: Vec<Endpoint>,
    /// `published` changed since the platform last looked.
    changed: bool,
    /// A NAT seems to be between us and some peer (an `observed` address not ours).
    nat_hint: bool,
    /// What a dial-back check concluded (`None`: none did).
    reachable: Option<bool>,
    /// Our IP address as the peer whose dial-back reached us sees it.
    public_ip: Option<std::net::IpAddr>,
    /// The port that dial-back reached (our listener's, or a mapped one).
    public_port: Option<u16>,
    /// The external port our gateway forwards to our UDP listener (`portmap`), while held.
    mapped_port: Option<u16>,
    /// The external port our gateway forwards to our TCP listener, while held.
    tcp_mapped_port: Option<u16>,
    /// The latest native peer that told us where it sees us from, and what it said: whom a
    /// new mapping is checked with.
    last_observed: Option<(BoxId, SocketAddr)>,
    /// The port our latest dial-back request named (a mapped port is checked once).
    asked_port: Option<u16>,
    /// A port mapping request is out and unanswered: the first check waits for it.
    mapping_pending: bool,
    /// A check of the mapped port waits for the peer's dial-back guard.
    retry_timer: Option<TimerId>,
    check: Option<Check>,
    asks: u32,
    /// The serving side's limits on dialling back.
    guard: DialBackGuard,
    /// The relay we use, the candidates, the bind timer.
    relays: relay::Relays,
    /// Our global IPv6 addresses, when a listener is on `::` (published with its port).
    v6_addrs: Vec<Ipv6Addr>,
    /// What a dial-back over IPv6 concluded: `Some(false)` withdraws `v6_addrs` (a firewall
    /// drops inbound IPv6).
    reachable6: Option<bool>,
    /// The latest native peer that told us over IPv6 where it sees us from.
    last_observed6: Option<(BoxId, SocketAddr)>,
}

/// The most IPv6 addresses published per listener.
const MAX_V6_ADDRS: usize = 4;
/// The system's global IPv6 addresses (at most [`MAX_V6_ADDRS`]), sorted.
fn read_v6_addrs() -> Vec<Ipv6Addr> {
    let mut v: Vec<Ipv6Addr> = crate::transport::interface_ipv6_addrs()
        .into_iter()
        .filter(|a| global_v6(*a))
        .collect();
    v.sort();
    v.dedup();
    v.truncate(MAX_V6_ADDRS);
    v
}

/// Whether `a` is a global unicast IPv6 address (2000::/3, which holds the documentation
/// range 2001:db8::/32 too): one a peer elsewhere can send to. Link-local, unique-local,
/// loopback, multicast and IPv4-mapped addresses are not.
pub(super) fn global_v6(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xe000 == 0x2000
}

impl Reach {
    /// Takes back the relay chosen in an earlier run (see `relay`'s module docs).
    pub(super) fn restore_relay_choice(&mut self, storage: &mut dyn crate::storage::Storage) {
        self.relays.restore_choice(storage);
    }

    pub(super) fn new(bound: &[Endpoint]) -> Reach {
        let mut r = Reach {
            bound: bound.to_vec(),
            published: Vec::new(),
            changed: false,
            nat_hint: false,
            reachable: None,
            public_ip: None,
            public_port: None,
            mapped_port: None,
            tcp_mapped_port: None,
            last_observed: None,
            asked_port: None,
            mapping_pending: false,
            retry_timer: None,
            check: None,
            asks: 0,
            guard: DialBackGuard::new(),
            relays: relay::Relays::new(),
            v6_addrs: Vec::new(),
            reachable6: None,
            last_observed6: None,
        };
        if r.on_any_v6() {
            r.v6_addrs = read_v6_addrs();
        }
        r.published = r.compute();
        r
    }

    /// Whether a UDP listener is on `::` (both families).
    fn on_any_v6(&self) -> bool {
        self.bound.iter().any(|e| {
            e.kind == TransportKind::Udp && e.addr.is_ipv6() && e.addr.ip().is_unspecified()
        })
    }

    fn compute(&self) -> Vec<Endpoint> {
        let mut out = self.compute_v4();
        // Global IPv6 addresses need no NAT traversal: listed beside a relay too.
        if self.reachable6 != Some(false) {
            for e in &self.bound {
                if e.addr.is_ipv6() && e.addr.ip().is_unspecified() && !e.relayed {
                    for a in &self.v6_addrs {
                        out.push(Endpoint {
                            addr: SocketAddr::from((*a, e.addr.port())),
                            ..*e
                        });
                    }
                }
            }
        }
        out
    }

    /// The endpoints as IPv4 reachability decides them (and specific IPv6 ones as bound).
    fn compute_v4(&self) -> Vec<Endpoint> {
        if let Some(e) = self.relays.endpoints() {
            return e;
        }
        let public = self.public_ip.filter(|_| self.reachable == Some(true));
        self.bound
            .iter()
            .filter_map(|e| match public {
                Some(ip)
                    if e.kind == TransportKind::Udp
                        && !e.relayed
                        && (e.addr.ip().is_unspecified() || e.addr.is_ipv4() == ip.is_ipv4()) =>
                {
                    Some(Endpoint {
                        addr: SocketAddr::new(ip, self.public_port.unwrap_or(e.addr.port())),
                        ..*e
                    })
                }
                // A TCP listener on `0.0.0.0`/`::` that our gateway maps: at the address the
                // UDP check proved, with the mapped port.
                Some(ip)
                    if e.kind == TransportKind::Tcp
                        && e.addr.ip().is_unspecified()
                        && ip.is_ipv4()
                        && self.tcp_mapped_port.is_some() =>
                {
                    let port = self.tcp_mapped_port.unwrap_or(e.addr.port());
                    Some(Endpoint {
                        addr: SocketAddr::new(ip, port),
                        ..*e
                    })
                }
                _ => (!e.addr.ip().is_unspecified()).then_some(*e),
            })
            .collect()
    }

    fn refresh(&mut self) {
        let p = self.compute();
        if p != self.published {
            self.published = p;
            self.changed = true;
        }
    }
}

impl Net {
    /// The endpoints our nodeInfo lists.
    pub(crate) fn published_endpoints(&self) -> &[Endpoint] {
        &self.reach.published
    }

    /// The relay we use, once it confirmed our reservation.
    pub(crate) fn relay_in_use(&self) -> Option<super::RelayInUse> {
        self.reach.relays.in_use()
    }

    /// Whether the published endpoints changed since the last call.
    pub(crate) fn take_endpoints_changed(&mut self) -> bool {
        std::mem::take(&mut self.reach.changed)
    }

    /// Queues an `mm` frame for native peer `b` (connecting if need be).
    fn queue_mm(&mut self, b: BoxId, topic: &str, payload: Vec<u8>, now: Instant) {
        let frame = mm_frame(topic, payload);
        let peer = self.peers.entry(b).or_default();
        if peer.queue.len() >= self.cfg.peer_queue_messages {
            return;
        }
        peer.queued_bytes += frame.len();
        self.queued_total += frame.len();
        let expires = now + self.cfg.realtime_expiry;
        let pending = Pending::frame(frame, Dialect::Native, Some(expires), Track::default());
        peer.queue.push_back(pending);
        self.expiry_at(b, expires);
        self.kick_peer(b);
    }

    /// Connection `k` became active: the accepting side of a native connection tells the
    /// peer where it sees it from, and a connection that came through our relay starts a
    /// hole punch.
    pub(super) fn on_active(&mut self, k: usize, now: Instant) {
        let Some(c) = self.conns.get(k) else { return };
        if !c.dialect.speaks_mm() {
            return;
        }
        let b = c.peer_box;
        let path = match c.link {
            Link::Server(id) => self.server.server().path(id),
            Link::Client(_) => None,
        };
        let seen = match path {
            Some(Path::Udp(a)) => Some(a),
            Some(Path::Relayed { peer, .. }) => Some(peer),
            _ => None,
        };
        if let Some(a) = seen {
            self.queue_mm(b, "observed", a.to_string().into_bytes(), now);
        }
        self.relay_on_active(k, b, path, now);
    }

    /// Connection `k` of peer `b` ended (`k` already out of the slab): a relay reservation of
    /// the peer goes, and if it was our relay (or a relay candidate we probed) we look for
    /// another. A connection that was not the peer's active one counts only when the peer
    /// has no other (a dial that failed), not when it lost a race to another.
    pub(super) fn reach_conn_lost(&mut self, b: BoxId, was_active: bool, now: Instant) {
        let connected = self.peers.get(&b).is_some_and(|p| p.online);
        if was_active || !connected {
            self.relay_conn_lost(b, was_active, now);
        }
    }

    /// Asks native peer `b` (which sees us from `seen`) to dial our listening UDP port back;
    /// `false` if we have no UDP listener.
    fn ask_dial_back(&mut self, b: BoxId, seen: SocketAddr, now: Instant) -> bool {
        let Some(listener) = self.server.udp_addr().map(|a| a.port()) else {
            return false;
        };
        // Our gateway maps IPv4 ports only; IPv6 is checked at the listener's port.
        let port = if seen.is_ipv4() {
            let port = self.reach.mapped_port.unwrap_or(listener);
            self.reach.asked_port = Some(port);
            port
        } else {
            listener
        };
        let mut nonce = [0u8; DIAL_BACK_NONCE_LEN];
        crate::crypto::random_bytes(&mut nonce);
        self.reach.asks += 1;
        self.server.expect_dial_back(Some(nonce));
        let timer = self
            .timers
            .schedule(now + DIAL_BACK_TIMEOUT, NetTimer::DialBack);
        self.reach.check = Some(Check {
            peer: b,
            nonce,
            seen,
            port,
            acked: false,
            timer,
        });
        log::debug!(
            "asking {b} to dial us back at {}",
            SocketAddr::new(seen.ip(), port)
        );
        let payload = format!("{port} {}", hex(&nonce)).into_bytes();
        self.queue_mm(b, "reach.dialback", payload, now);
        true
    }

    /// The dial-back check's time is up: a peer that said it dialled and whose probe did not
    /// come makes us unreachable; no answer at all says nothing.
    pub(super) fn dial_back_due(&mut self, now: Instant) {
        let Some(c) = self.reach.check.take() else {
            return;
        };
        if c.acked && c.seen.is_ipv6() {
            log::debug!(
                "{} dialled us back over IPv6 and nothing came: our IPv6 addresses are withdrawn",
                c.peer
            );
            self.reach.reachable6 = Some(false);
        } else if c.acked {
            log::debug!("{} dialled us back and nothing came: not reachable", c.peer);
            self.reach.reachable = Some(false);
        } else {
            log::debug!("{} did not answer our dial-back request", c.peer);
        }
        self.end_check(c.seen, now);
    }

    /// A check ended (already taken out; `seen` is where its peer saw us): act on what we
    /// know now, and start the other family's check if one waited for this one.
    fn end_check(&mut self, seen: SocketAddr, now: Instant) {
        self.server.expect_dial_back(None);
        self.reach.refresh();
        self.relay_check_ended(now);
        self.check_mapping(now);
        if seen.is_ipv6() {
            self.maybe_check(now);
        } else {
            self.maybe_check6(now);
        }
    }

    /// Our gateway now maps `port` to our UDP listener (`None`: no longer, or not at all).
    /// What a dial-back proved through the old mapping no longer holds; a new mapping is
    /// checked with the latest peer that told us where it sees us from.
    pub(super) fn on_port_mapped(&mut self, port: Option<u16>, now: Instant) {
        if self.reach.mapped_port == port {
            return;
        }
        let listener = self.server.udp_addr().map(|a| a.port());
        let old = std::mem::replace(&mut self.reach.mapped_port, port);
        // A new mapping (even of a port asked about before it was lost) is worth a check.
        self.reach.asked_port = None;
        let proven_by_old = old.is_some() && self.reach.public_port == old && old != listener;
        if proven_by_old || port.is_some() && self.reach.reachable != Some(true) {
            // Start over: the next check decides (with the new port, if any).
            self.reach.reachable = None;
            self.reach.public_ip = None;
            self.reach.public_port = None;
            self.reach.refresh();
            self.relay_check_ended(now);
        }
        self.check_mapping(now);
    }

    /// Our gateway now maps `port` to our TCP listener (`None`: no longer). It is not checked
    /// by a dial-back of its own: it is published, with the address the UDP check proved,
    /// once that check proved our UDP mapping (the same gateway forwards both).
    pub(super) fn on_tcp_port_mapped(&mut self, port: Option<u16>) {
        if self.reach.tcp_mapped_port != port {
            self.reach.tcp_mapped_port = port;
            self.reach.refresh();
        }
    }

    /// Asks for a dial-back through the mapped port if one is held, not yet asked about, no
    /// check is in flight and a peer told us where it sees us from.
    fn check_mapping(&mut self, now: Instant) {
        let Some(port) = self.reach.mapped_port else {
            return;
        };
        if self.reach.asked_port == Some(port)
            || self.reach.check.is_some()
            || self.reach.asks >= MAX_DIAL_BACK_ASKS
        {
            return;
        }
        if let Some((b, seen)) = self.reach.last_observed {
            self.ask_dial_back(b, seen, now);
        }
    }

    /// Events of the listeners' relay datagrams.
    pub(super) fn nat_events(&mut self, now: Instant) {
        while let Some(ev) = self.server.poll_nat_event() {
            match ev {
                NatEvent::DialedBack { from } => {
                    let Some(c) = self.reach.check.take() else {
                        continue;
                    };
                    self.timers.cancel(c.timer);
                    log::debug!(
                        "dialled back from {from}: reachable at {}:{}",
                        c.seen.ip(),
                        c.port
                    );
                    if c.seen.is_ipv6() {
                        self.reach.reachable6 = Some(true);
                    } else {
                        self.reach.reachable = Some(true);
                        self.reach.public_ip = Some(c.seen.ip());
                        self.reach.public_port = Some(c.port);
                    }
                    self.end_check(c.seen, now);
                }
                NatEvent::Bound { relay, observed } => self.relay_bound(relay, observed, now),
                NatEvent::RelayIs { addr, sign } => self.relay_identified(addr, sign, now),
            }
        }
    }
}

impl Net {
    /// An `mm` frame other than identify on connection `k` (identified, native).
    pub(super) fn on_mm(&mut self, cx: &mut Cx<'_>, k: usize, topic: &str, payload: &[u8]) {
        let now = cx.now;
        let Some(c) = self.conns.get(k) else { return };
        if !c.dialect.speaks_mm() {
            return;
        }
        let b = c.peer_box;
        let text = std::str::from_utf8(payload).ok();
        match topic {
            "observed" => {
                if let Some(seen) = text.and_then(|t| t.parse().ok()) {
                    self.on_observed(k, b, seen, now);
                }
            }
            "reach.dialback" => {
                if let Some((port, nonce)) = text.and_then(parse_dial_back) {
                    self.on_dial_back_request(k, b, port, nonce, now);
                }
            }
            "reach.dialing" | "reach.refused" => {
                let ours = self
                    .reach
                    .check
                    .as_ref()
                    .is_some_and(|c| c.peer == b && text.and_then(unhex) == Some(c.nonce));
                if !ours {
                    return;
                }
                if topic == "reach.dialing" {
                    if let Some(c) = self.reach.check.as_mut() {
                        c.acked = true;
                    }
                } else if let Some(c) = self.reach.check.take() {
                    self.timers.cancel(c.timer);
                    self.end_check(c.seen, now);
                    self.retry_mapping_check_later(now);
                }
            }
            _ => self.relay_mm(k, b, topic, text, now),
        }
    }

    /// `mm`/`observed` from peer `b` on connection `k`: it sees us from `seen`. An address
    /// other than the one our system sends from hints at a NAT; a hint (or a listener on an
    /// unspecified address) starts a dial-back check; a relay candidate we probed has
    /// answered.
    fn on_observed(&mut self, k: usize, b: BoxId, seen: SocketAddr, now: Instant) {
        let Some(c) = self.conns.get(k) else { return };
        // The address our system sends from towards this peer.
        let remote = match &c.link {
            Link::Client(d) => d.path().0,
            Link::Server(_) => return,
        };
        let local = UdpSocket::bind(if remote.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        })
        .and_then(|s| {
            s.connect(remote)?;
            s.local_addr()
        });
        let Ok(local) = local else { return };
        if seen.is_ipv6() {
            // IPv6: no NAT to hint at; a listener on `::` checks that its addresses take
            // inbound traffic (a firewall may drop it).
            self.reach.last_observed6 = Some((b, seen));
            self.maybe_check6(now);
            return;
        }
        self.reach.last_observed = Some((b, seen));
        let hint = local.ip() != seen.ip();
        if hint && !self.reach.nat_hint {
            log::debug!("a NAT may be between us and {b}: it sees us from {seen}");
            self.reach.nat_hint = true;
        }
        self.maybe_check(now);
    }

    /// Starts a dial-back check with the latest peer that sent `observed` if reachability is
    /// unknown, a NAT is hinted at (or our listener is on an unspecified address), no check is
    /// in flight, the run's asks are not used up, and no port mapping request is pending (its
    /// answer decides which port to check: checking the listener's port first would spend the
    /// peer's once-per-30-s dial-back on the wrong port).
    fn maybe_check(&mut self, now: Instant) {
        let Some((b, seen)) = self.reach.last_observed else {
            return;
        };
        let unspecified = self
            .reach
            .bound
            .iter()
            .any(|e| e.kind == TransportKind::Udp && e.addr.ip().is_unspecified());
        if self.reach.reachable.is_none()
            && self.reach.check.is_none()
            && self.reach.asks < MAX_DIAL_BACK_ASKS
            && !self.reach.mapping_pending
            && (self.reach.nat_hint || unspecified)
        {
            self.ask_dial_back(b, seen, now);
        }
    }

    /// Starts a dial-back check over IPv6 with the latest peer that told us over IPv6 where it
    /// sees us from, if we publish IPv6 addresses of a listener on `::`, that check has not
    /// concluded, no check is in flight and the run's asks are not used up.
    fn maybe_check6(&mut self, now: Instant) {
        let Some((b, seen)) = self.reach.last_observed6 else {
            return;
        };
        if self.reach.reachable6.is_none()
            && !self.reach.v6_addrs.is_empty()
            && self.reach.check.is_none()
            && self.reach.asks < MAX_DIAL_BACK_ASKS
        {
            self.ask_dial_back(b, seen, now);
        }
    }

    /// Starts reading the IPv6 addresses again every [`NetConfig::interface_refresh`] (a
    /// laptop that changed networks, a prefix its router renumbered), when a listener is on
    /// `::`.
    pub(super) fn interfaces_start(&mut self, now: Instant) {
        if self.reach.on_any_v6() {
            let at = now + self.cfg.interface_refresh;
            self.timers.schedule(at, NetTimer::Interfaces);
        }
    }

    /// Reads the IPv6 addresses again: new ones are published (and may be checked again by
    /// dial-back), gone ones withdrawn.
    pub(super) fn interfaces_due(&mut self, now: Instant) {
        let addrs = read_v6_addrs();
        if addrs != self.reach.v6_addrs {
            log::info!("our global IPv6 addresses are now {addrs:?}");
            self.reach.v6_addrs = addrs;
            self.reach.reachable6 = None;
            self.reach.refresh();
        }
        let at = now + self.cfg.interface_refresh;
        self.timers.schedule(at, NetTimer::Interfaces);
    }

    /// Whether a port mapping request is out (set when the mapper starts).
    pub(super) fn reach_mapping_pending(&mut self, pending: bool) {
        self.reach.mapping_pending = pending;
    }

    /// The port mapper answered for the first time (a mapping, or none to be had): a check
    /// held back for it may go now.
    pub(super) fn mapping_settled(&mut self, now: Instant) {
        if std::mem::take(&mut self.reach.mapping_pending) {
            self.maybe_check(now);
            if self.reach.check.is_none() {
                // No check to wait for: a relay held back for the mapper may be taken.
                self.relay_check_ended(now);
            }
        }
    }

    /// A dial-back request was refused (the peer's guard: one per source address per 30 s,
    /// which another node behind our NAT may have used): a mapping not yet proven is asked
    /// about again once that time has passed.
    fn retry_mapping_check_later(&mut self, now: Instant) {
        if self.reach.mapped_port.is_some() && self.reach.retry_timer.is_none() {
            self.reach.asked_port = None;
            self.reach.retry_timer = Some(self.timers.schedule(
                now + crate::transport::relay::DialBackGuard::PER_IP_EVERY,
                NetTimer::DialBackRetry,
            ));
        }
    }

    /// The wait after a refused check is over.
    pub(super) fn dial_back_retry_due(&mut self, now: Instant) {
        self.reach.retry_timer = None;
        self.check_mapping(now);
    }

    /// `mm`/`reach.dialback` from peer `b` on connection `k`: within the guard's limits,
    /// probes `port` at the peer's own address as this connection shows it (never one its
    /// relay or the request claims), and answers whether it did.
    fn on_dial_back_request(
        &mut self,
        k: usize,
        b: BoxId,
        port: u16,
        nonce: [u8; DIAL_BACK_NONCE_LEN],
        now: Instant,
    ) {
        let Some(c) = self.conns.get(k) else { return };
        let ip = match &c.link {
            Link::Client(d) => {
                let (a, relayed) = d.path();
                (!relayed).then_some(a.ip())
            }
            Link::Server(id) => match self.server.server().path(*id) {
                Some(p @ (Path::Udp(_) | Path::Tcp { .. })) => self.server.peer_ip(p),
                _ => None,
            },
        };
        let dialled = match ip {
            Some(ip) if self.reach.guard.allow(ip, now) => {
                let target = SocketAddr::new(ip, port);
                match self.server.dial_back(target, &nonce) {
                    Ok(()) => true,
                    Err(e) => {
                        log::debug!("dial-back to {target} not sent: {e}");
                        false
                    }
                }
            }
            _ => false,
        };
        let topic = if dialled {
            "reach.dialing"
        } else {
            "reach.refused"
        };
        self.queue_mm(b, topic, hex(&nonce).into_bytes(), now);
    }

    /// Reports connection `k`'s path if it changed (`Event::Path`).
    pub(super) fn check_path(&mut self, cx: &mut Cx<'_>, k: usize) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if !c.active {
            return;
        }
        let now_path = match &c.link {
            Link::Client(d) => Some(d.path()),
            Link::Server(id) => self.server.server().path(*id).and_then(|p| p.remote()),
        };
        if now_path.is_none() || now_path == c.path {
            return;
        }
        c.path = now_path;
        let (Some(peer), Some((remote, relayed))) = (c.peer, now_path) else {
            return;
        };
        cx.emit(Event::Path {
            peer,
            relayed,
            remote,
        });
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `PORT NONCEHEX` of a dial-back request; `None` for anything else (port 0 included).
fn parse_dial_back(s: &str) -> Option<(u16, [u8; DIAL_BACK_NONCE_LEN])> {
    let (port, nonce) = s.split_once(' ')?;
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    Some((port, unhex(nonce)?))
}

fn unhex(s: &str) -> Option<[u8; TOKEN_LEN]> {
    let s = s.as_bytes();
    if s.len() != 2 * TOKEN_LEN {
        return None;
    }
    let mut out = [0u8; TOKEN_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        let d = std::str::from_utf8(&s[2 * i..2 * i + 2]).ok()?;
        *o = u8::from_str_radix(d, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_junk_is_refused() {
        let t = [0xab; TOKEN_LEN];
        assert_eq!(unhex(&hex(&t)), Some(t));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(32)), None);
        assert_eq!(unhex(&"a".repeat(33)), None);
    }

    #[test]
    fn dial_back_requests_parse_and_junk_is_refused() {
        let n = [0x5a; DIAL_BACK_NONCE_LEN];
        assert_eq!(
            parse_dial_back(&format!("4000 {}", hex(&n))),
            Some((4000, n))
        );
        for junk in [
            "",
            "4000",
            &format!("0 {}", hex(&n)),
            &format!("65536 {}", hex(&n)),
            &format!("-1 {}", hex(&n)),
            &format!("4000  {}", hex(&n)),
            &format!("4000 {}00", hex(&n)),
            "4000 zz",
        ] {
            assert_eq!(parse_dial_back(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_reachable_node_publishes_its_observed_address_on_udp() {
        let bound = vec![
            Endpoint::native(TransportKind::Udp, "0.0.0.0:4000".parse().unwrap()),
            Endpoint::native(TransportKind::Tcp, "192.0.2.2:4001".parse().unwrap()),
        ];
        let mut r = Reach::new(&bound);
        r.public_ip = Some("203.0.113.11".parse().unwrap());
        r.refresh();
        assert!(!r.changed, "not before a dial-back concluded");
        r.reachable = Some(false);
        r.refresh();
        assert!(!r.changed, "nor when it found us unreachable");
        r.reachable = Some(true);
        r.refresh();
        assert!(r.changed);
        assert_eq!(
            r.published,
            vec![
                Endpoint::native(TransportKind::Udp, "203.0.113.11:4000".parse().unwrap()),
                bound[1]
            ]
        );
    }

    #[test]
    fn published_endpoints_skip_unspecified_ones() {
        let bound = vec![
            Endpoint::native(TransportKind::Udp, "0.0.0.0:4000".parse().unwrap()),
            Endpoint::native(TransportKind::Tcp, "192.0.2.2:4001".parse().unwrap()),
        ];
        let r = Reach::new(&bound);
        assert_eq!(r.published, vec![bound[1]]);
    }

    #[test]
    fn a_listener_on_any_v6_publishes_global_ipv6_addresses_until_a_check_fails() {
        let bound = vec![Endpoint::native(
            TransportKind::Udp,
            "[::]:4000".parse().unwrap(),
        )];
        let mut r = Reach::new(&bound);
        r.v6_addrs = vec!["2001:db8:b::2".parse().unwrap()];
        r.refresh();
        let v6 = Endpoint::native(TransportKind::Udp, "[2001:db8:b::2]:4000".parse().unwrap());
        assert_eq!(r.published, vec![v6]);
        // IPv4 proven too: both families listed.
        r.public_ip = Some("203.0.113.3".parse().unwrap());
        r.reachable = Some(true);
        r.refresh();
        let v4 = Endpoint::native(TransportKind::Udp, "203.0.113.3:4000".parse().unwrap());
        assert_eq!(r.published, vec![v4, v6]);
        // A dial-back over IPv6 that never arrived: a firewall drops inbound IPv6.
        r.reachable6 = Some(false);
        r.refresh();
        assert_eq!(r.published, vec![v4]);
    }

    #[test]
    fn only_global_unicast_ipv6_addresses_are_published() {
        for a in ["2001:db8::1", "2a00:1450::5", "3fff::1"] {
            assert!(global_v6(a.parse().unwrap()), "{a}");
        }
        for a in [
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:192.0.2.1",
        ] {
            assert!(!global_v6(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn a_mapped_tcp_listener_is_published_once_udp_is_proven() {
        let bound = vec![
            Endpoint::native(TransportKind::Udp, "[::]:4000".parse().unwrap()),
            Endpoint::native(TransportKind::Tcp, "[::]:4001".parse().unwrap()),
        ];
        let mut r = Reach::new(&bound);
        r.v6_addrs.clear();
        r.tcp_mapped_port = Some(5001);
        r.refresh();
        assert_eq!(r.published, vec![], "not before the UDP check");
        r.public_ip = Some("203.0.113.3".parse().unwrap());
        r.public_port = Some(5000);
        r.reachable = Some(true);
        r.refresh();
        assert_eq!(
            r.published,
            vec![
                Endpoint::native(TransportKind::Udp, "203.0.113.3:5000".parse().unwrap()),
                Endpoint::native(TransportKind::Tcp, "203.0.113.3:5001".parse().unwrap()),
            ]
        );
        r.tcp_mapped_port = None;
        r.refresh();
        assert_eq!(r.published.len(), 1, "unmapped TCP on :: is not published");
    }
}
