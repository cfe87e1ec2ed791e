//! Relays and hole punching, the parts of reachability that need the cargo feature `relay`
//! (without it `relay_off.rs` stands in): the relay we use and the candidates, the
//! reservation's binds, serving reservations for others, and the punch of a connection that
//! came through our relay. The protocol is described in [`super`]'s docs.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{
    hex, unhex, BoxId, Endpoint, Link, Net, NetTimer, NodeInfo, Path, Reach, TimerId, TOKEN_LEN,
};
use crate::transport::ServerDriver;
use crate::NetConfig;

/// How often an unconfirmed bind is sent again.
pub const BIND_RETRY: Duration = Duration::from_millis(300);
/// Unconfirmed binds before a relay is given up.
pub const BIND_TRIES: u32 = 10;
/// Relay candidates remembered.
const MAX_CANDIDATES: usize = 16;

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
    /// Nodes offering relaying, with their relay address.
    candidates: Vec<(BoxId, SocketAddr, Option<SocketAddr>)>,
    /// Candidates that refused or went away.
    failed: HashSet<BoxId>,
    /// The relay candidate a connection was opened to (to learn our observed address).
    probing: Option<BoxId>,
    bind_timer: Option<TimerId>,
}

impl Relays {
    /// No relay, no candidate.
    pub(super) fn new() -> Relays {
        Relays::default()
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
}

impl Net {
    /// A nodeInfo arrived: a node offering relaying is a candidate; if we may need one and
    /// use none, we connect to it (its `observed` answer tells whether we need it).
    pub(in crate::platform::connections) fn learn_relay(&mut self, info: &NodeInfo, now: Instant) {
        if self.cfg.relay.is_some() || !self.cfg.use_relays {
            return;
        }
        // Its IPv4 address when it has one: relays serve IPv4 NAT traversal (the connection
        // to it goes there too, `connect_order_for_relay`).
        let Some(e) = info
            .endpoints
            .iter()
            .filter(|e| e.offers_relay)
            .min_by_key(|e| e.addr.is_ipv6())
        else {
            return;
        };
        let b = info.box_id;
        let relays = &mut self.reach.relays;
        // A dual-stack relay serves IPv6-only peers too, at its IPv6 address.
        let alt = info
            .endpoints
            .iter()
            .find(|a| a.offers_relay && a.addr.is_ipv6() && e.addr.is_ipv4())
            .map(|a| a.addr);
        if !relays.candidates.iter().any(|c| c.0 == b) {
            if relays.candidates.len() >= MAX_CANDIDATES {
                relays.candidates.remove(0);
            }
            relays.candidates.push((b, e.addr, alt));
        }
        self.next_relay(now);
    }

    /// Uses (or probes) the next candidate relay when we have none.
    fn next_relay(&mut self, now: Instant) {
        let relays = &self.reach.relays;
        // A check in flight, or a port mapping request (at most 1 s), may make a relay
        // unneeded: wait for it rather than publish a relayed endpoint for a moment.
        if relays.relay.is_some()
            || relays.probing.is_some()
            || self.reach.check.is_some()
            || self.reach.mapping_pending
        {
            return;
        }
        let Some(&(b, addr, alt)) = relays
            .candidates
            .iter()
            .find(|c| !relays.failed.contains(&c.0))
        else {
            return;
        };
        if self.reach.behind_nat() {
            self.reach.relays.relay = Some(RelayUse {
                peer: b,
                addr,
                alt,
                token: None,
                observed: None,
                unanswered: 0,
            });
            self.queue_mm(b, "relay.reserve", Vec::new(), now);
        } else if self.reach.reachable.is_none() {
            // Its `observed` answer (and a dial-back) tell whether we need it.
            self.reach.relays.probing = Some(b);
            self.queue_mm(b, "reach.hello", Vec::new(), now);
        }
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
        }
    }

    /// The active connection of peer `b` ended: a reservation it held with us goes, and if
    /// it was our relay (or the candidate we probed) we look for another.
    pub(super) fn relay_conn_lost(&mut self, b: BoxId, now: Instant) {
        if let Some(r) = self.server.relay_mut() {
            r.release(&b.0 .0);
        }
        if self.reach.relays.probing == Some(b) {
            self.reach.relays.probing = None;
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

    /// Peer `b` told us our observed address: if it was the candidate we probed, we know
    /// enough to decide on it now.
    pub(super) fn relay_observed(&mut self, b: BoxId, now: Instant) {
        if self.reach.relays.probing == Some(b) {
            self.reach.relays.probing = None;
            self.next_relay(now);
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
            r.observed = Some(observed);
            self.reach.refresh();
        }
        if self.reach.relays.bind_timer.is_none() {
            let at = now + self.cfg.relay_bind_interval;
            self.reach.relays.bind_timer = Some(self.timers.schedule(at, NetTimer::RelayBind));
        }
    }

    /// The relay and punch `mm` frames (`relay.reserve`, `relay.ok`, `relay.no`, `punch`) from
    /// peer `b` on connection `k`; other topics are ignored.
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
