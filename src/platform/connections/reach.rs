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
//! - *Relays*: a node behind a NAT that knows a node offering relaying (its nodeInfo's UDP
//!   endpoint says `"relay": true`; from the bootstrap list, a nodeInfo given to it,
//!   discovery) connects to it, asks for a reservation (`mm`/`relay.reserve`; answered by
//!   `mm`/`relay.ok` with a 16-byte token in hex, or `mm`/`relay.no`), binds it from its
//!   listening socket every [`NetConfig::relay_bind_interval`] (retried every
//!   [`BIND_RETRY`] until the relay confirms, at most [`BIND_TRIES`] times), and then
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
//!
//! Published endpoints: the bound ones, minus those on an unspecified address (`0.0.0.0`,
//! `::`, which nobody can dial) and, while a relay is bound, minus every direct one (a node
//! behind a NAT cannot be dialled there); the relayed one while bound. Once a dial-back
//! proved us reachable, the UDP endpoints carry the IP address the dialling peer saw (the
//! bound port kept); TCP endpoints are not checked and stay as bound. A change makes the
//! platform publish `transports.myNodeInfo` and raise [`crate::Event::MyNodeInfo`].

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
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

/// How often an unconfirmed bind is sent again.
pub const BIND_RETRY: Duration = Duration::from_millis(300);
/// Unconfirmed binds before a relay is given up.
pub const BIND_TRIES: u32 = 10;
/// Relay candidates remembered.
const MAX_CANDIDATES: usize = 16;
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
    /// The peer said it dialled.
    acked: bool,
    timer: TimerId,
}

/// The relay we use.
struct RelayUse {
    peer: BoxId,
    addr: SocketAddr,
    token: Option<[u8; TOKEN_LEN]>,
    /// Our listening socket as the relay sees it, once a bind is confirmed.
    observed: Option<SocketAddr>,
    unanswered: u32,
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
    check: Option<Check>,
    asks: u32,
    /// The serving side's limits on dialling back.
    guard: DialBackGuard,
    relay: Option<RelayUse>,
    /// Nodes offering relaying, with their relay address.
    candidates: Vec<(BoxId, SocketAddr)>,
    /// Candidates that refused or went away.
    failed: HashSet<BoxId>,
    /// The relay candidate a connection was opened to (to learn our observed address).
    probing: Option<BoxId>,
    bind_timer: Option<TimerId>,
}

impl Reach {
    pub(super) fn new(bound: &[Endpoint]) -> Reach {
        let mut r = Reach {
            bound: bound.to_vec(),
            published: Vec::new(),
            changed: false,
            nat_hint: false,
            reachable: None,
            public_ip: None,
            check: None,
            asks: 0,
            guard: DialBackGuard::new(),
            relay: None,
            candidates: Vec::new(),
            failed: HashSet::new(),
            probing: None,
            bind_timer: None,
        };
        r.published = r.compute();
        r
    }

    fn compute(&self) -> Vec<Endpoint> {
        if let Some(RelayUse {
            addr,
            observed: Some(_),
            ..
        }) = &self.relay
        {
            return vec![Endpoint::relayed(*addr)];
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
                        addr: SocketAddr::new(ip, e.addr.port()),
                        ..*e
                    })
                }
                _ => (!e.addr.ip().is_unspecified()).then_some(*e),
            })
            .collect()
    }

    /// Whether we should use a relay: what a dial-back concluded, else the hint.
    fn behind_nat(&self) -> bool {
        self.reachable.map_or(self.nat_hint, |r| !r)
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

    /// A nodeInfo arrived: a node offering relaying is a candidate; if we may need one and
    /// use none, we connect to it (its `observed` answer tells whether we need it).
    pub(super) fn learn_relay(&mut self, info: &NodeInfo, now: Instant) {
        if self.cfg.relay.is_some() || !self.cfg.use_relays {
            return;
        }
        let Some(e) = info.endpoints.iter().find(|e| e.offers_relay) else {
            return;
        };
        let b = info.box_id;
        if !self.reach.candidates.iter().any(|c| c.0 == b) {
            if self.reach.candidates.len() >= MAX_CANDIDATES {
                self.reach.candidates.remove(0);
            }
            self.reach.candidates.push((b, e.addr));
        }
        self.next_relay(now);
    }

    /// Uses (or probes) the next candidate relay when we have none.
    fn next_relay(&mut self, now: Instant) {
        if self.reach.relay.is_some() || self.reach.probing.is_some() || self.reach.check.is_some()
        {
            return;
        }
        let Some(&(b, addr)) = self
            .reach
            .candidates
            .iter()
            .find(|c| !self.reach.failed.contains(&c.0))
        else {
            return;
        };
        if self.reach.behind_nat() {
            self.reach.relay = Some(RelayUse {
                peer: b,
                addr,
                token: None,
                observed: None,
                unanswered: 0,
            });
            self.queue_mm(b, "relay.reserve", Vec::new(), now);
        } else if self.reach.reachable.is_none() {
            // Its `observed` answer (and a dial-back) tell whether we need it.
            self.reach.probing = Some(b);
            self.queue_mm(b, "reach.hello", Vec::new(), now);
        }
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
        let ours = self.reach.relay.as_ref().and_then(|r| r.observed);
        if let (Some(Path::Relayed { peer, .. }), Some(ours), true) =
            (path, ours, self.cfg.hole_punching)
        {
            if let Some(c) = self.conns.get_mut(k) {
                c.punched = true;
            }
            if self.server.start_punch(peer, now) {
                self.queue_mm(b, "punch", ours.to_string().into_bytes(), now);
            }
        }
    }

    /// Connection `k` of peer `b` ended (`k` already out of the slab): a relay reservation of
    /// the peer goes, and if it was our relay we look for another.
    pub(super) fn reach_conn_lost(&mut self, b: BoxId, was_active: bool, now: Instant) {
        if !was_active {
            return;
        }
        if let Some(r) = self.server.relay_mut() {
            r.release(&b.0 .0);
        }
        if self.reach.probing == Some(b) {
            self.reach.probing = None;
        }
        if self.reach.relay.as_ref().is_some_and(|r| r.peer == b) {
            self.drop_relay(now);
        }
    }

    /// Our relay is gone: its endpoint leaves the nodeInfo and another is tried.
    fn drop_relay(&mut self, now: Instant) {
        self.leave_relay(now, true);
    }

    /// Stops using our relay (`failed`: it refused or went away, so it is not tried again)
    /// and looks for another if we still need one.
    fn leave_relay(&mut self, now: Instant, failed: bool) {
        let Some(r) = self.reach.relay.take() else {
            return;
        };
        log::debug!("relay {} at {} given up", r.peer, r.addr);
        self.server.unbind_relay(r.addr);
        if failed {
            self.reach.failed.insert(r.peer);
        }
        if let Some(id) = self.reach.bind_timer.take() {
            self.timers.cancel(id);
        }
        self.reach.refresh();
        self.next_relay(now);
    }

    /// The bind timer: bind again, or give the relay up after too many unanswered binds.
    pub(super) fn relay_bind_due(&mut self, now: Instant) {
        self.reach.bind_timer = None;
        let Some(r) = self.reach.relay.as_mut() else {
            return;
        };
        let Some(token) = r.token else { return };
        if r.unanswered >= BIND_TRIES {
            self.drop_relay(now);
            return;
        }
        r.unanswered += 1;
        let addr = r.addr;
        let next = if r.observed.is_some() && r.unanswered == 1 {
            now + self.cfg.relay_bind_interval
        } else {
            now + BIND_RETRY
        };
        if !self.server.bind_relay(addr, &token) {
            self.drop_relay(now);
            return;
        }
        self.reach.bind_timer = Some(self.timers.schedule(next, NetTimer::RelayBind));
    }

    /// Asks native peer `b` (which sees us from `seen`) to dial our listening UDP port back;
    /// `false` if we have no UDP listener.
    fn ask_dial_back(&mut self, b: BoxId, seen: SocketAddr, now: Instant) -> bool {
        let Some(port) = self.server.udp_addr().map(|a| a.port()) else {
            return false;
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
            acked: false,
            timer,
        });
        log::debug!("asking {b} to dial us back at {}:{port}", seen.ip());
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
        if c.acked {
            log::debug!("{} dialled us back and nothing came: not reachable", c.peer);
            self.reach.reachable = Some(false);
        } else {
            log::debug!("{} did not answer our dial-back request", c.peer);
        }
        self.end_check(now);
    }

    /// A check ended (already taken out): act on what we know now.
    fn end_check(&mut self, now: Instant) {
        self.server.expect_dial_back(None);
        if self.reach.reachable == Some(true) && self.reach.relay.is_some() {
            self.leave_relay(now, false);
        }
        self.reach.refresh();
        self.next_relay(now);
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
                    log::debug!("dialled back from {from}: reachable at {}", c.seen.ip());
                    self.reach.reachable = Some(true);
                    self.reach.public_ip = Some(c.seen.ip());
                    self.end_check(now);
                }
                NatEvent::Bound { relay, observed } => {
                    let Some(r) = self.reach.relay.as_mut() else {
                        continue;
                    };
                    if r.addr != relay {
                        continue;
                    }
                    r.unanswered = 0;
                    if r.observed != Some(observed) {
                        log::debug!("relay {relay} bound; it sees our listener at {observed}");
                        r.observed = Some(observed);
                        self.reach.refresh();
                    }
                    if self.reach.bind_timer.is_none() {
                        let at = now + self.cfg.relay_bind_interval;
                        self.reach.bind_timer = Some(self.timers.schedule(at, NetTimer::RelayBind));
                    }
                }
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
        let addr: Option<SocketAddr> = text.and_then(|t| t.parse().ok());
        match topic {
            "observed" => {
                if let Some(seen) = addr {
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
                    self.end_check(now);
                }
            }
            "relay.reserve" => {
                let token = self.server.relay_mut().and_then(|r| r.reserve(b.0 .0, now));
                match token {
                    Some(t) => self.queue_mm(b, "relay.ok", hex(&t).into_bytes(), now),
                    None => self.queue_mm(b, "relay.no", Vec::new(), now),
                }
            }
            "relay.ok" => self.on_relay_ok(b, text.and_then(unhex), now),
            "relay.no" if self.reach.relay.as_ref().is_some_and(|r| r.peer == b) => {
                self.drop_relay(now);
            }
            "punch" => {
                if let Some(target) = addr {
                    self.on_punch(k, target, now);
                }
            }
            _ => {}
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
        let hint = local.ip() != seen.ip();
        if hint && !self.reach.nat_hint {
            log::debug!("a NAT may be between us and {b}: it sees us from {seen}");
            self.reach.nat_hint = true;
        }
        let unspecified = self
            .reach
            .bound
            .iter()
            .any(|e| e.kind == TransportKind::Udp && e.addr.ip().is_unspecified());
        if self.reach.reachable.is_none()
            && self.reach.check.is_none()
            && self.reach.asks < MAX_DIAL_BACK_ASKS
            && (hint || unspecified)
        {
            self.ask_dial_back(b, seen, now);
        }
        if self.reach.probing == Some(b) {
            self.reach.probing = None;
            self.next_relay(now);
        }
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

    /// `mm`/`relay.ok` from peer `b`: the reservation we asked our relay for, with its token;
    /// binding starts.
    fn on_relay_ok(&mut self, b: BoxId, token: Option<[u8; TOKEN_LEN]>, now: Instant) {
        let Some(r) = self.reach.relay.as_mut().filter(|r| r.peer == b) else {
            return;
        };
        if r.token.is_some() {
            return;
        }
        let Some(token) = token else { return };
        r.token = Some(token);
        self.relay_bind_due(now);
    }

    /// `mm`/`punch` on connection `k`: the peer probes us from our relay's view of it; a
    /// relayed outgoing connection probes `target` back (one round per connection).
    fn on_punch(&mut self, k: usize, target: SocketAddr, now: Instant) {
        if !self.cfg.hole_punching {
            return;
        }
        if let Some(c) = self.conns.get_mut(k) {
            if let Link::Client(d) = &mut c.link {
                if d.path().1 && !c.punched {
                    c.punched = true;
                    d.start_punch(target, now);
                    self.mark_dirty(k);
                }
            }
        }
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
        assert!(!r.behind_nat());
        r.nat_hint = true;
        assert!(!r.behind_nat(), "the dial-back outweighs the hint");
        r.reachable = None;
        assert!(r.behind_nat());
    }

    #[test]
    fn published_endpoints_skip_unspecified_and_follow_the_relay() {
        let bound = vec![
            Endpoint::native(TransportKind::Udp, "0.0.0.0:4000".parse().unwrap()),
            Endpoint::native(TransportKind::Tcp, "192.0.2.2:4001".parse().unwrap()),
        ];
        let mut r = Reach::new(&bound);
        assert_eq!(r.published, vec![bound[1]]);
        let relay: SocketAddr = "203.0.113.10:4000".parse().unwrap();
        r.relay = Some(RelayUse {
            peer: BoxId(crate::crypto::BoxPublicKey([1; 32])),
            addr: relay,
            token: Some([0; TOKEN_LEN]),
            observed: None,
            unanswered: 0,
        });
        r.refresh();
        assert!(!r.changed, "not before the relay confirms a bind");
        r.relay.as_mut().unwrap().observed = Some("203.0.113.2:4000".parse().unwrap());
        r.refresh();
        assert!(r.changed);
        assert_eq!(r.published, vec![Endpoint::relayed(relay)]);
    }
}
