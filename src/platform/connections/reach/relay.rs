//! Relays and hole punching, the parts of reachability that need the cargo feature `relay`
//! (without it `relay_off.rs` stands in): the relay we use and the candidates, how one is
//! chosen, searched for and remembered, the reservation's binds, serving reservations for
//! others, and the punch of a connection that came through our relay. The protocol is
//! described in [`super`]'s docs.
//!
//! # Choosing a relay
//!
//! Every nodeInfo that arrives with an endpoint offering relaying (from a bootstrap list,
//! mDNS, a DHT) makes its node a candidate (at most [`MAX_CANDIDATES`]). A node behind a NAT
//! with several candidates measures up to [`MAX_PROBES`] of them first (`mm`/`relay.ping`,
//! answered `relay.pong`; the connection's smoothed RTT, or the time to the answer when the
//! connection has no estimate yet) and reserves at the one with the smallest RTT; a candidate
//! that does not answer within [`PROBE_TIMEOUT`], refuses, or cannot be reached is not tried
//! again in this run. The relay a reservation was confirmed at is written to storage
//! ([`CHOICE_KEY`]) and taken back first, without measuring, after a restart.
//!
//! A node behind a NAT that has no usable candidate publishes `self.transports.findRelay` on
//! the bus (so does a dual-stack node that settled its IPv6 side but never heard anything of
//! its IPv4 one: its peers all talk to it over IPv6, and a relay, probed over IPv4, tells it
//! where it is seen from there, which starts the IPv4 dial-back check); the DHT services answer: Kademlia with the relays' nodeInfos
//! (`transports.nodeInfo`), Mainline with bare addresses (`transports.relayAddresses`, from a
//! BEP 5 `get_peers`), each of which the node asks who it is from its listening socket (the
//! who-is datagram of [`crate::transport::relay`]): a relay's answer gives its signId, hence
//! the key to connect to, and makes it a candidate ([`Net::relay_identified`]). The search
//! is asked again while none works, after [`SEARCH_FIRST`], doubling up to [`SEARCH_MAX`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{
    hex, unhex, BoxId, Endpoint, Link, Net, NetTimer, NodeInfo, Path, Reach, TimerId, TOKEN_LEN,
};
use crate::platform::connections::Cx;
use crate::platform::peer_memory;
use crate::storage::Storage;
use crate::transport::ServerDriver;
use crate::NetConfig;

/// How often an unconfirmed bind is sent again.
pub const BIND_RETRY: Duration = Duration::from_millis(300);
/// Unconfirmed binds before a relay is given up.
pub const BIND_TRIES: u32 = 10;
/// Relay candidates remembered.
pub const MAX_CANDIDATES: usize = 16;
/// Candidates measured before one is chosen (and probes in flight at once).
pub const MAX_PROBES: usize = 3;
/// A probed candidate that has not answered after this long is given up.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before a relay search is asked again.
pub const SEARCH_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between relay searches.
pub const SEARCH_MAX: Duration = Duration::from_secs(300);
/// The storage key of the relay chosen last (the relay's nodeInfo, in the record format of
/// the remembered peers).
pub const CHOICE_KEY: &str = "relay-choice";

/// A node offering relaying that we may use.
struct Candidate {
    info: NodeInfo,
    /// Its relay address (IPv4 when it has one).
    addr: SocketAddr,
    /// Its IPv6 relay address beside an IPv4 one.
    alt: Option<SocketAddr>,
    /// Measured by a probe.
    rtt: Option<Duration>,
    /// Our choice in an earlier run.
    remembered: bool,
}

/// When a relay search may be asked: at once the first time, then after [`SEARCH_FIRST`],
/// doubling up to [`SEARCH_MAX`], until [`SearchPacer::reset`] (a relay confirmed).
#[derive(Default)]
struct SearchPacer {
    /// No search before this.
    next: Option<Instant>,
    /// The wait after the next search.
    every: Duration,
}

impl SearchPacer {
    /// `Ok` (and the search counts as asked now) if a search may be asked at `now`;
    /// otherwise the time from which it may.
    fn ask(&mut self, now: Instant) -> Result<Instant, Instant> {
        if let Some(t) = self.next.filter(|t| now < *t) {
            return Err(t);
        }
        let every = self.every.max(SEARCH_FIRST);
        self.next = Some(now + every);
        self.every = (every * 2).min(SEARCH_MAX);
        Ok(now + every)
    }

    /// The next search may be asked at once, and waits start from the first again.
    fn reset(&mut self) {
        *self = SearchPacer::default();
    }
}

/// The relay we use.
struct RelayUse {
    peer: BoxId,
    addr: SocketAddr,
    /// The relay's IPv6 address, when it has one beside `addr`: the same reservation is
    /// published there too, for peers that have IPv6 alone.
    alt: Option<SocketAddr>,
    token: Option<[u8; TOKEN_LEN]>,
    /// Our listening socket as the relay sees it, once a bind is confirmed.
    observed: Option<SocketAddr>,
    unanswered: u32,
}

/// The relay side of a node's reachability.
#[derive(Default)]
pub(super) struct Relays {
    relay: Option<RelayUse>,
    /// Nodes offering relaying.
    candidates: Vec<Candidate>,
    /// Candidates that refused, went away or did not answer.
    failed: HashSet<BoxId>,
    /// Candidates probed, with when (`relay.ping` sent, answer awaited).
    probing: Vec<(BoxId, Instant)>,
    bind_timer: Option<TimerId>,
    /// Calls [`Net::next_relay`] again (a probe's deadline, the next search).
    wait_timer: Option<(TimerId, Instant)>,
    /// `transports.findRelay` is to be published (by [`Net::relay_pump`]).
    search_due: bool,
    /// When searches may be asked.
    pacer: SearchPacer,
    /// A relay newly confirmed, to be written as our choice.
    choice_to_store: Option<NodeInfo>,
}

impl Relays {
    /// No relay, no candidate.
    pub(super) fn new() -> Relays {
        Relays::default()
    }

    /// Takes back the relay chosen in an earlier run (see the module docs), if `storage`
    /// holds a sound record of one.
    pub(in crate::platform::connections) fn restore_choice(&mut self, storage: &mut dyn Storage) {
        let bytes = match storage.get(CHOICE_KEY) {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                log::warn!("the relay chosen last could not be read: {e}");
                return;
            }
        };
        let mut keys = crate::identity::KeyCache::new(4);
        match peer_memory::decode(&bytes, &mut keys) {
            Ok((info, _)) => match candidate_of(&info) {
                Some(mut c) => {
                    log::debug!("relay chosen last: {} at {}", info.sign_id, c.addr);
                    c.remembered = true;
                    self.candidates.push(c);
                }
                None => log::warn!("the relay chosen last offers no relaying; ignored"),
            },
            Err(why) => {
                log::warn!("the relay chosen last is damaged ({why}); deleted");
                let _ = storage.del(CHOICE_KEY);
            }
        }
    }

    /// The relay we use: its signId, its address, and the RTT measured before choosing it
    /// (none when it was the only candidate or the one remembered), once a bind is confirmed.
    pub(in crate::platform::connections) fn in_use(&self) -> Option<super::super::RelayInUse> {
        let r = self.relay.as_ref().filter(|r| r.observed.is_some())?;
        let c = self.candidates.iter().find(|c| c.info.box_id == r.peer)?;
        Some(super::super::RelayInUse {
            sign_id: c.info.sign_id,
            addr: r.addr,
            rtt: c.rtt,
        })
    }

    /// The relayed endpoint to publish instead of the direct ones: our relay's, once it
    /// confirmed a bind.
    /// The relayed endpoints to publish (the relay's IPv4 address, and its IPv6 one when it
    /// has one) once a bind is confirmed; `None` without.
    pub(super) fn endpoints(&self) -> Option<Vec<Endpoint>> {
        match &self.relay {
            Some(RelayUse {
                addr,
                alt,
                observed: Some(_),
                ..
            }) => Some(
                std::iter::once(*addr)
                    .chain(*alt)
                    .map(Endpoint::relayed)
                    .collect(),
            ),
            _ => None,
        }
    }
}

/// The candidate a nodeInfo makes, if one of its endpoints offers relaying: its IPv4 relay
/// address when it has one (relays serve IPv4 NAT traversal, and the connection to it goes
/// there too, `connect_order_for_relay`), with its IPv6 one beside (a dual-stack relay serves
/// IPv6-only peers too).
fn candidate_of(info: &NodeInfo) -> Option<Candidate> {
    let relaying = || info.endpoints.iter().filter(|e| e.offers_relay);
    let e = relaying().min_by_key(|e| e.addr.is_ipv6())?;
    let alt = relaying()
        .find(|a| a.addr.is_ipv6() && e.addr.is_ipv4())
        .map(|a| a.addr);
    Some(Candidate {
        info: info.clone(),
        addr: e.addr,
        alt,
        rtt: None,
        remembered: false,
    })
}

/// With the relay role, the listener answers who-is questions with our signId.
pub(in crate::platform::connections) fn serve_whois(
    cfg: &NetConfig,
    server: &mut ServerDriver,
    sign: crate::identity::SignId,
) {
    if cfg.relay.is_some() {
        server.answer_whois(sign.0 .0);
    }
}

/// Whether our UDP endpoint offers relaying ([`NetConfig::relay`]).
pub(in crate::platform::connections) fn offers_relay(cfg: &NetConfig) -> bool {
    cfg.relay.is_some()
}

/// Gives the listeners the relay role if [`NetConfig::relay`] asks for it.
pub(in crate::platform::connections) fn serve_relay(cfg: &NetConfig, server: &mut ServerDriver) {
    if let Some(limits) = cfg.relay {
        server.enable_relay(limits);
    }
}

impl Reach {
    /// Whether we should use a relay: what a dial-back concluded, else the hint.
    fn behind_nat(&self) -> bool {
        self.reachable.map_or(self.nat_hint, |r| !r)
    }

    /// Whether we know nothing of our IPv4 side while IPv6 is settled: a dual-stack node that
    /// talks to dual-stack peers over IPv6 only never hears where it is seen from over IPv4,
    /// so neither checks it nor takes a relay; a relay found and probed (over IPv4) tells it.
    fn ipv4_unknown(&self) -> bool {
        let takes_ipv4 = self.bound.iter().any(|e| {
            e.kind == crate::transport::TransportKind::Udp
                && (e.addr.is_ipv4() || e.addr.ip().is_unspecified())
        });
        takes_ipv4
            && self.reachable.is_none()
            && self.last_observed.is_none()
            && self.reachable6.is_some()
    }
}

impl Net {
    /// A nodeInfo arrived: a node offering relaying is a candidate; if we may need one and
    /// use none, we connect to it (its `observed` answer tells whether we need it).
    pub(in crate::platform::connections) fn learn_relay(&mut self, info: &NodeInfo, now: Instant) {
        if self.cfg.relay.is_some()
            || !self.cfg.use_relays
            || info.box_id == BoxId(self.our_box.public)
        {
            return;
        }
        let Some(fresh) = candidate_of(info) else {
            return;
        };
        let relays = &mut self.reach.relays;
        match relays
            .candidates
            .iter_mut()
            .find(|c| c.info.box_id == info.box_id)
        {
            Some(c) => {
                // Moved or renumbered: the new addresses (the measure and the mark stay).
                c.info = fresh.info;
                c.addr = fresh.addr;
                c.alt = fresh.alt;
            }
            None => {
                if relays.candidates.len() >= MAX_CANDIDATES {
                    // The oldest that is neither in use nor probed.
                    let busy = |c: &Candidate| {
                        relays
                            .relay
                            .as_ref()
                            .is_some_and(|r| r.peer == c.info.box_id)
                            || relays.probing.iter().any(|p| p.0 == c.info.box_id)
                    };
                    match relays.candidates.iter().position(|c| !busy(c)) {
                        Some(i) => {
                            relays.candidates.remove(i);
                        }
                        None => return,
                    }
                }
                log::debug!("relay candidate {} at {}", info.sign_id, fresh.addr);
                relays.candidates.push(fresh);
            }
        }
        self.next_relay(now);
    }

    /// When we have no relay: measures candidates, uses the best one if we need a relay, or
    /// asks for a search when no candidate is left (see the module docs).
    fn next_relay(&mut self, now: Instant) {
        // A check in flight, or a port mapping request (at most 1 s), may make a relay
        // unneeded: wait for it rather than publish a relayed endpoint for a moment.
        if self.reach.relays.relay.is_some()
            || self.reach.check.is_some()
            || self.reach.mapping_pending
        {
            return;
        }
        let behind = self.reach.behind_nat();
        let unknown = self.reach.reachable.is_none();
        let ipv4_unknown = self.reach.ipv4_unknown();
        let relays = &mut self.reach.relays;
        let overdue: Vec<BoxId> = relays
            .probing
            .iter()
            .filter(|p| p.1 + PROBE_TIMEOUT <= now)
            .map(|p| p.0)
            .collect();
        for b in overdue {
            log::debug!("relay candidate {b} did not answer its probe");
            relays.probing.retain(|p| p.0 != b);
            relays.failed.insert(b);
        }
        let usable: Vec<usize> = (0..relays.candidates.len())
            .filter(|&i| !relays.failed.contains(&relays.candidates[i].info.box_id))
            .collect();
        if usable.is_empty() {
            if (behind || ipv4_unknown) && self.cfg.use_relays {
                self.want_relay_search(now);
            }
            return;
        }
        let remembered = usable
            .iter()
            .copied()
            .find(|&i| relays.candidates[i].remembered);
        if let (true, Some(i)) = (behind, remembered) {
            self.reserve_at(i, now);
            return;
        }
        // Several candidates: measure up to MAX_PROBES before choosing. With reachability
        // unknown, a probe also brings the `observed` that a dial-back check starts from.
        let measured = usable
            .iter()
            .filter(|&&i| relays.candidates[i].rtt.is_some())
            .count();
        let measure = (usable.len() > 1 && measured < MAX_PROBES.min(usable.len()))
            || (!behind && unknown && measured == 0);
        if measure {
            let room = MAX_PROBES.saturating_sub(relays.probing.len() + measured);
            let next: Vec<BoxId> = usable
                .iter()
                .map(|&i| &relays.candidates[i])
                .filter(|c| c.rtt.is_none() && !relays.probing.iter().any(|p| p.0 == c.info.box_id))
                .map(|c| c.info.box_id)
                .take(room)
                .collect();
            for b in next {
                self.reach.relays.probing.push((b, now));
                self.queue_mm(b, "relay.ping", Vec::new(), now);
            }
        }
        if let Some(first) = self.reach.relays.probing.iter().map(|p| p.1).min() {
            self.relay_wait_until(first + PROBE_TIMEOUT);
            return;
        }
        if !behind {
            return;
        }
        let relays = &self.reach.relays;
        let best = usable
            .iter()
            .copied()
            .min_by_key(|&i| relays.candidates[i].rtt.unwrap_or(Duration::MAX));
        if let Some(i) = best {
            self.reserve_at(i, now);
        }
    }

    /// Asks our relay candidate `i` for a reservation.
    fn reserve_at(&mut self, i: usize, now: Instant) {
        let c = &self.reach.relays.candidates[i];
        let b = c.info.box_id;
        log::debug!(
            "asking relay {} at {} for a reservation (RTT {:?})",
            c.info.sign_id,
            c.addr,
            c.rtt
        );
        self.reach.relays.relay = Some(RelayUse {
            peer: b,
            addr: c.addr,
            alt: c.alt,
            token: None,
            observed: None,
            unanswered: 0,
        });
        self.queue_mm(b, "relay.reserve", Vec::new(), now);
    }

    /// We need a relay and know none that works: a search is asked for on the bus now, or
    /// once the last one's wait is over.
    fn want_relay_search(&mut self, now: Instant) {
        let relays = &mut self.reach.relays;
        let again = match relays.pacer.ask(now) {
            Ok(again) => {
                relays.search_due = true;
                again
            }
            Err(from) => from,
        };
        self.relay_wait_until(again);
    }

    /// Calls [`Net::next_relay`] again at `at` (or earlier, if already planned earlier).
    fn relay_wait_until(&mut self, at: Instant) {
        if let Some((id, t)) = self.reach.relays.wait_timer {
            if t <= at {
                return;
            }
            self.timers.cancel(id);
        }
        let id = self.timers.schedule(at, NetTimer::RelayWait);
        self.reach.relays.wait_timer = Some((id, at));
    }

    /// The wait timer: probes overdue, a search due.
    pub(in crate::platform::connections) fn relay_wait_due(&mut self, now: Instant) {
        self.reach.relays.wait_timer = None;
        self.next_relay(now);
    }

    /// The pump's share: publishes a relay search that is due, and writes a new choice.
    pub(in crate::platform::connections) fn relay_pump(&mut self, cx: &mut Cx<'_>) {
        let relays = &mut self.reach.relays;
        if std::mem::take(&mut relays.search_due) {
            log::debug!("no relay that works is known: asking the bus for a search");
            cx.publish("transports.findRelay", "");
        }
        if let Some(info) = relays.choice_to_store.take() {
            let record = peer_memory::encode(&info, crate::platform::connections::wall_ms());
            if let Err(e) = cx.storage.put(CHOICE_KEY, &record) {
                log::warn!("the relay chosen could not be stored: {e}");
            }
        }
    }

    /// Addresses a relay search found with no key (`transports.relayAddresses`, from the
    /// Mainline DHT): each is asked who it is, unless it is already a candidate's (at most
    /// [`MAX_CANDIDATES`] of them). The answers arrive as [`Net::relay_identified`].
    pub(crate) fn relay_addresses(&mut self, addrs: &[SocketAddr]) {
        if self.cfg.relay.is_some() || !self.cfg.use_relays {
            return;
        }
        let relays = &self.reach.relays;
        let ask: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| !relays.candidates.iter().any(|c| c.addr == *a))
            .take(MAX_CANDIDATES)
            .collect();
        for a in ask {
            if let Err(e) = self.server.ask_whois(a) {
                log::debug!("who-is to {a} not sent: {e}");
            }
        }
    }

    /// The node at `addr` answered our who-is question as the relay `sign`: a candidate,
    /// with a nodeInfo made of that (CurveCP authenticates it when we connect).
    pub(in crate::platform::connections) fn relay_identified(
        &mut self,
        addr: SocketAddr,
        sign: [u8; 32],
        now: Instant,
    ) {
        let sign_id = crate::identity::SignId(crate::crypto::SignPublicKey(sign));
        let Ok(box_id) = sign_id.to_box_id() else {
            log::debug!("who-is answer from {addr}: not a valid key");
            return;
        };
        let mut e = Endpoint::native(crate::transport::TransportKind::Udp, addr);
        e.offers_relay = true;
        log::debug!("{addr} is the relay {sign_id}");
        // The same relay may answer at its IPv4 and its IPv6 address (found in both DHTs):
        // both are kept, so that the candidate is reserved at over IPv4 with its IPv6 address
        // beside (see `candidate_of`).
        let mut endpoints: Vec<Endpoint> = self
            .reach
            .relays
            .candidates
            .iter()
            .find(|c| c.info.box_id == box_id)
            .map(|c| c.info.endpoints.clone())
            .unwrap_or_default();
        if !endpoints.contains(&e) {
            endpoints.push(e);
        }
        let info = NodeInfo {
            sign_id,
            box_id,
            endpoints,
        };
        // A nodeInfo of it already cached (a fuller one) is kept.
        if !matches!(
            self.dir.lookup(&box_id, now),
            crate::platform::directory::Lookup::Found(_)
                | crate::platform::directory::Lookup::Remembered(_)
        ) {
            self.dir.insert(info.clone(), now);
        }
        self.learn_relay(&info, now);
    }

    /// `mm`/`relay.pong` from candidate `b` on connection `k`: its measure, then the choice.
    fn on_relay_pong(&mut self, k: usize, b: BoxId, now: Instant) {
        let relays = &mut self.reach.relays;
        let Some(i) = relays.probing.iter().position(|p| p.0 == b) else {
            return;
        };
        let (_, sent) = relays.probing.remove(i);
        let rtt = self
            .conns
            .get(k)
            .and_then(|c| super::super::stream_ref(&self.server, &c.link))
            .and_then(|s| s.stats().srtt)
            .unwrap_or_else(|| now.saturating_duration_since(sent));
        if let Some(c) = relays.candidates.iter_mut().find(|c| c.info.box_id == b) {
            log::debug!("relay candidate {} answered: RTT {rtt:?}", c.info.sign_id);
            c.rtt = Some(rtt);
        }
        self.next_relay(now);
    }

    /// Native connection `k` to peer `b` became active on `path` (a server connection's): one
    /// that came through our relay starts a hole punch.
    pub(super) fn relay_on_active(&mut self, k: usize, b: BoxId, path: Option<Path>, now: Instant) {
        let ours = self.reach.relays.relay.as_ref().and_then(|r| r.observed);
        if let (Some(Path::Relayed { peer, .. }), Some(ours), true) =
            (path, ours, self.cfg.hole_punching)
        {
            if let Some(c) = self.conns.get_mut(k) {
                c.punched = true;
            }
            if self.server.start_punch(peer, now) {
                self.queue_mm(b, "punch", ours.to_string().into_bytes(), now);
            }
            // With a global IPv6 address on a dual-stack listener, an IPv6 punch too: the
            // peer answers with its own IPv6 address (`punch6` both ways).
            if let Some(ours6) = self.our_ipv6_listener() {
                self.queue_mm(b, "punch6", ours6.to_string().into_bytes(), now);
            }
        }
    }

    /// Our UDP listener at our first global IPv6 address, when it takes IPv6.
    fn our_ipv6_listener(&self) -> Option<SocketAddr> {
        let listener = self.server.udp_addr().filter(SocketAddr::is_ipv6)?;
        let ip = self.reach.v6_addrs.first()?;
        Some(SocketAddr::from((*ip, listener.port())))
    }

    /// `mm`/`punch6` on connection `k`: an IPv6 hole punch (see the module docs of
    /// [`super`]). From the server (we dialled through its relay): we probe its IPv6 address
    /// from our dual-stack socket and tell it ours; from the client (the answer, on a
    /// connection we started a punch for): our listener probes the client's. Once per
    /// connection; only global unicast IPv6 targets.
    fn on_punch6(&mut self, k: usize, b: BoxId, target: SocketAddr, now: Instant) {
        let global = match target {
            SocketAddr::V6(a) => a.ip().segments()[0] & 0xe000 == 0x2000,
            SocketAddr::V4(_) => false,
        };
        if !self.cfg.hole_punching || !global {
            return;
        }
        let ours = self.reach.v6_addrs.first().copied();
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if c.punched6 {
            return;
        }
        match &mut c.link {
            Link::Client(d) => {
                let local = d.udp_local_addr().filter(SocketAddr::is_ipv6);
                let (Some(ours), Some(local), true) = (ours, local, d.path().1) else {
                    return;
                };
                c.punched6 = true;
                d.start_punch(target, now);
                self.mark_dirty(k);
                let reply = SocketAddr::from((ours, local.port())).to_string();
                self.queue_mm(b, "punch6", reply.into_bytes(), now);
            }
            Link::Server(_) if c.punched => {
                c.punched6 = true;
                self.server.start_punch(target, now);
            }
            Link::Server(_) => {}
        }
    }

    /// A connection of peer `b` ended: the peer's active one (`was_active`), or one that
    /// never became active while the peer has no other (a dial that failed). A reservation
    /// it held with us goes; if it was our relay, or a candidate we probed, it is given up
    /// and we look for another.
    pub(super) fn relay_conn_lost(&mut self, b: BoxId, was_active: bool, now: Instant) {
        if was_active {
            if let Some(r) = self.server.relay_mut() {
                r.release(&b.0 .0);
            }
        }
        let relays = &mut self.reach.relays;
        if relays.probing.iter().any(|p| p.0 == b) {
            log::debug!("relay candidate {b} could not be reached");
            relays.probing.retain(|p| p.0 != b);
            relays.failed.insert(b);
            self.next_relay(now);
        }
        if self
            .reach
            .relays
            .relay
            .as_ref()
            .is_some_and(|r| r.peer == b)
        {
            self.drop_relay(now);
        }
    }

    /// A dial-back check ended: a reachable node leaves its relay; otherwise one is looked
    /// for if need be.
    pub(super) fn relay_check_ended(&mut self, now: Instant) {
        if self.reach.reachable == Some(true) && self.reach.relays.relay.is_some() {
            self.leave_relay(now, false);
        }
        self.next_relay(now);
    }

    /// Our relay is gone: its endpoint leaves the nodeInfo and another is tried.
    fn drop_relay(&mut self, now: Instant) {
        self.leave_relay(now, true);
    }

    /// Stops using our relay (`failed`: it refused or went away, so it is not tried again)
    /// and looks for another if we still need one.
    fn leave_relay(&mut self, now: Instant, failed: bool) {
        let Some(r) = self.reach.relays.relay.take() else {
            return;
        };
        log::debug!("relay {} at {} given up", r.peer, r.addr);
        self.server.unbind_relay(r.addr);
        if failed {
            self.reach.relays.failed.insert(r.peer);
        }
        if let Some(id) = self.reach.relays.bind_timer.take() {
            self.timers.cancel(id);
        }
        self.reach.refresh();
        self.next_relay(now);
    }

    /// The bind timer: bind again, or give the relay up after too many unanswered binds.
    pub(in crate::platform::connections) fn relay_bind_due(&mut self, now: Instant) {
        self.reach.relays.bind_timer = None;
        let Some(r) = self.reach.relays.relay.as_mut() else {
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
        let timer = self.timers.schedule(next, NetTimer::RelayBind);
        self.reach.relays.bind_timer = Some(timer);
    }

    /// The relay at `relay` confirmed our bind and sees our listening socket from
    /// `observed` ([`NatEvent::Bound`]).
    pub(super) fn relay_bound(&mut self, relay: SocketAddr, observed: SocketAddr, now: Instant) {
        let Some(r) = self.reach.relays.relay.as_mut() else {
            return;
        };
        if r.addr != relay {
            return;
        }
        r.unanswered = 0;
        if r.observed != Some(observed) {
            log::debug!("relay {relay} bound; it sees our listener at {observed}");
            let first = r.observed.is_none();
            let peer = r.peer;
            r.observed = Some(observed);
            self.reach.refresh();
            let relays = &mut self.reach.relays;
            if first {
                // Confirmed: our choice, and searches start from the first wait again.
                relays.pacer.reset();
                relays.choice_to_store = relays
                    .candidates
                    .iter()
                    .find(|c| c.info.box_id == peer)
                    .map(|c| c.info.clone());
            }
        }
        if self.reach.relays.bind_timer.is_none() {
            let at = now + self.cfg.relay_bind_interval;
            self.reach.relays.bind_timer = Some(self.timers.schedule(at, NetTimer::RelayBind));
        }
    }

    /// The relay and punch `mm` frames (`relay.reserve`, `relay.ok`, `relay.no`,
    /// `relay.ping`, `relay.pong`, `punch`) from peer `b` on connection `k`; other topics are
    /// ignored.
    pub(super) fn relay_mm(
        &mut self,
        k: usize,
        b: BoxId,
        topic: &str,
        text: Option<&str>,
        now: Instant,
    ) {
        match topic {
            "relay.reserve" => {
                let token = self.server.relay_mut().and_then(|r| r.reserve(b.0 .0, now));
                match token {
                    Some(t) => self.queue_mm(b, "relay.ok", hex(&t).into_bytes(), now),
                    None => self.queue_mm(b, "relay.no", Vec::new(), now),
                }
            }
            "relay.ok" => self.on_relay_ok(b, text.and_then(unhex), now),
            // Any node answers a probe (one frame for one; the peer's queue bound applies).
            "relay.ping" => self.queue_mm(b, "relay.pong", Vec::new(), now),
            "relay.pong" => self.on_relay_pong(k, b, now),
            "relay.no"
                if self
                    .reach
                    .relays
                    .relay
                    .as_ref()
                    .is_some_and(|r| r.peer == b) =>
            {
                self.drop_relay(now);
            }
            "punch" => {
                if let Some(target) = text.and_then(|t| t.parse().ok()) {
                    self.on_punch(k, target, now);
                }
            }
            "punch6" => {
                if let Some(target) = text.and_then(|t| t.parse().ok()) {
                    self.on_punch6(k, b, target, now);
                }
            }
            _ => {}
        }
    }

    /// `mm`/`relay.ok` from peer `b`: the reservation we asked our relay for, with its token;
    /// binding starts.
    fn on_relay_ok(&mut self, b: BoxId, token: Option<[u8; TOKEN_LEN]>, now: Instant) {
        let Some(r) = self.reach.relays.relay.as_mut().filter(|r| r.peer == b) else {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::TransportKind;

    #[test]
    fn relay_searches_are_paced_and_the_pace_restarts_after_a_relay() {
        let t0 = Instant::now();
        let mut p = SearchPacer::default();
        assert_eq!(p.ask(t0), Ok(t0 + SEARCH_FIRST), "the first at once");
        assert_eq!(p.ask(t0), Err(t0 + SEARCH_FIRST));
        assert_eq!(p.ask(t0 + SEARCH_FIRST / 2), Err(t0 + SEARCH_FIRST));
        // The waits double up to SEARCH_MAX: a node that never finds a relay asks at most
        // once per SEARCH_MAX in the long run.
        let mut at = t0 + SEARCH_FIRST;
        let mut waits = Vec::new();
        for _ in 0..12 {
            let next = p.ask(at).expect("due");
            waits.push(next - at);
            at = next;
        }
        assert_eq!(waits[0], SEARCH_FIRST * 2);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*waits.last().unwrap(), SEARCH_MAX);
        p.reset();
        assert_eq!(p.ask(at), Ok(at + SEARCH_FIRST));
    }

    fn relay_info(offers: bool) -> NodeInfo {
        let id = crate::identity::Identity::generate();
        let mut e = Endpoint::native(
            crate::transport::TransportKind::Udp,
            "203.0.113.10:4000".parse().unwrap(),
        );
        e.offers_relay = offers;
        NodeInfo {
            sign_id: id.sign_id(),
            box_id: id.box_id(),
            endpoints: vec![e],
        }
    }

    #[test]
    fn the_relay_chosen_last_is_taken_back_and_a_damaged_record_is_deleted() {
        use crate::storage::{MemStore, Storage};
        let mut store = MemStore::new();
        let mut r = Relays::new();
        r.restore_choice(&mut store);
        assert!(r.candidates.is_empty(), "nothing stored");
        // A sound record: the first candidate, marked as our earlier choice.
        let info = relay_info(true);
        store
            .put(CHOICE_KEY, &peer_memory::encode(&info, 1))
            .unwrap();
        let mut r = Relays::new();
        r.restore_choice(&mut store);
        assert_eq!(r.candidates.len(), 1);
        assert!(r.candidates[0].remembered);
        assert_eq!(r.candidates[0].info, info);
        assert_eq!(r.candidates[0].addr, "203.0.113.10:4000".parse().unwrap());
        // A node that offers no relaying: ignored (and kept: it is sound).
        store
            .put(CHOICE_KEY, &peer_memory::encode(&relay_info(false), 1))
            .unwrap();
        let mut r = Relays::new();
        r.restore_choice(&mut store);
        assert!(r.candidates.is_empty());
        // A damaged record (one byte flipped): ignored and deleted.
        let mut bytes = peer_memory::encode(&info, 1);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        store.put(CHOICE_KEY, &bytes).unwrap();
        let mut r = Relays::new();
        r.restore_choice(&mut store);
        assert!(r.candidates.is_empty());
        assert_eq!(store.get(CHOICE_KEY).unwrap(), None);
    }

    #[test]
    fn a_candidate_is_reserved_at_over_ipv4_with_its_ipv6_address_beside() {
        let mut info = relay_info(true);
        let mut v6 = Endpoint::native(
            crate::transport::TransportKind::Udp,
            "[2001:db8::10]:4000".parse().unwrap(),
        );
        v6.offers_relay = true;
        // IPv6 first in the list (as a who-is answer from the IPv6 DHT may come first).
        info.endpoints.insert(0, v6);
        let c = candidate_of(&info).expect("a candidate");
        assert_eq!(c.addr, "203.0.113.10:4000".parse().unwrap());
        assert_eq!(c.alt, Some(v6.addr));
        // IPv6 alone: reserved at over IPv6, nothing beside.
        info.endpoints.truncate(1);
        let c = candidate_of(&info).expect("a candidate");
        assert_eq!((c.addr, c.alt), (v6.addr, None));
        // No endpoint offering relaying: no candidate.
        assert!(candidate_of(&relay_info(false)).is_none());
    }

    #[test]
    fn a_dial_back_outweighs_the_hint() {
        let mut r = Reach::new(&[]);
        r.reachable = Some(true);
        assert!(!r.behind_nat());
        r.nat_hint = true;
        assert!(!r.behind_nat(), "the dial-back outweighs the hint");
        r.reachable = None;
        assert!(r.behind_nat());
    }

    #[test]
    fn published_endpoints_follow_the_relay() {
        let bound = vec![
            Endpoint::native(TransportKind::Udp, "0.0.0.0:4000".parse().unwrap()),
            Endpoint::native(TransportKind::Tcp, "192.0.2.2:4001".parse().unwrap()),
        ];
        let mut r = Reach::new(&bound);
        assert_eq!(r.published, vec![bound[1]]);
        let relay: SocketAddr = "203.0.113.10:4000".parse().unwrap();
        r.relays.relay = Some(RelayUse {
            peer: BoxId(crate::crypto::BoxPublicKey([1; 32])),
            addr: relay,
            alt: None,
            token: Some([0; TOKEN_LEN]),
            observed: None,
            unanswered: 0,
        });
        r.refresh();
        assert!(!r.changed, "not before the relay confirms a bind");
        r.relays.relay.as_mut().unwrap().observed = Some("203.0.113.2:4000".parse().unwrap());
        r.refresh();
        assert!(r.changed);
        assert_eq!(r.published, vec![Endpoint::relayed(relay)]);
        // A dual-stack relay: the reservation is listed at its IPv6 address too.
        let relay6: SocketAddr = "[2001:db8::10]:4000".parse().unwrap();
        r.relays.relay.as_mut().unwrap().alt = Some(relay6);
        r.refresh();
        assert_eq!(
            r.published,
            vec![Endpoint::relayed(relay), Endpoint::relayed(relay6)]
        );
    }
}
