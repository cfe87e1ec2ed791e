//! Connections coming and going: incoming ones accepted (or refused by the connection limits),
//! outgoing ones opened toward a peer's endpoints, identified peers made active (the
//! one-connection-per-peer rule), ended connections and failed destinations.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mio::Token;

use super::context::Cx;
use super::dialect::Dialect;
use super::{
    stream_of, wall_ms, Conn, DeliveryError, Link, Net, NetTimer, Pending, Track,
    CONNECTION_TOKEN_BASE,
};
use crate::curvecp::client::{ClientConfig, ClientState};
use crate::curvecp::server::ConnectionId;
use crate::curvecp::stream::{Eof, StreamConfig};
use crate::identity::BoxId;
use crate::platform::directory::{Lookup, NodeInfo, MAX_CACHED};
use crate::platform::Event;
use crate::transport::connection_info::{self, Endpoint};
use crate::transport::driver::Path;
use crate::transport::{ClientDriver, SourceKey, TransportKind};

impl Net {
    /// A connection the listeners accepted: kept within the connection limits (or dropped
    /// from the CurveCP server at once), read in this turn's receiving pass.
    pub(super) fn on_accept(&mut self, cx: &mut Cx<'_>, id: ConnectionId) {
        let now = cx.now;
        let Some(key) = self.server.server().client_key(id) else {
            return;
        };
        // Peers in our circles may take any slot; strangers leave `reserved_outbound` free
        // and are capped per source address.
        let circle = cx.circles.is_friend(&BoxId(key)) || cx.circles.is_device(&BoxId(key));
        let path = self.server.server().path(id);
        let Some(source) = self.admit(circle, path) else {
            log::debug!("too many connections (or from this source): incoming one refused");
            self.server.server_mut().remove(id);
            return;
        };
        if let Some(s) = source {
            *self.inbound_per_ip.entry(s).or_insert(0) += 1;
        }
        let kind = match path {
            Some(Path::Tcp { .. }) => TransportKind::Tcp,
            _ => TransportKind::Udp,
        };
        let dialect = Dialect::of_path(path);
        let frames = (self.cfg.max_frame, &self.identify[..]);
        let link = Link::Server(id);
        let conn = Conn::new(link, (kind, dialect), BoxId(key), source, frames, now);
        let k = self.conns.insert(conn);
        self.by_server.insert(id, k);
        self.mark_readable(k);
        self.mark_dirty(k);
        if let Some(s) = self.server.server_mut().stream_mut(id) {
            dialect.pace(s, kind, now);
        }
        if !dialect.speaks_mm() {
            // A JavaScript peer sends no identify: the Initiate CurveCP just accepted proved
            // its box key, which is all it names itself by.
            self.identify_by_handshake(cx, k);
        }
    }

    /// Whether an incoming connection fits the limits: `Some` with the source it counts
    /// under (strangers only), `None` if it is refused.
    fn admit(&self, circle: bool, path: Option<Path>) -> Option<Option<SourceKey>> {
        let source = match (circle, path) {
            (false, Some(p)) => self.server.peer_ip(p).map(SourceKey::of),
            _ => None,
        };
        let limit = if circle {
            self.cfg.max_connections
        } else {
            self.cfg
                .max_connections
                .saturating_sub(self.cfg.reserved_outbound)
        };
        let from_source = source.map_or(0, |s| self.inbound_per_ip.get(&s).copied().unwrap_or(0));
        if self.conns.len() >= limit || (!circle && from_source >= self.cfg.max_inbound_per_ip) {
            log::debug!("refusing a connection from {source:?}");
            return None;
        }
        Some(source)
    }

    /// A JavaScript connection's peer is authenticated (its CurveCP handshake is done): it
    /// becomes identified by its box key, with its signId if the directory knows it (else
    /// `directory.get` is asked), and is activated.
    pub(super) fn identify_by_handshake(&mut self, cx: &mut Cx<'_>, k: usize) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if c.identified {
            return;
        }
        c.identified = true;
        let b = c.peer_box;
        c.peer = self.dir.reverse(&b);
        if c.peer.is_none() {
            c.asked_sign = true;
            self.resolve_box_id(cx, &b);
        }
        self.activate(cx, k);
    }

    /// Reports `Connection` and `transports.online` for peer `b` if it is online, known by
    /// its signId and not reported yet (a JavaScript peer whose signId was learnt late).
    pub(super) fn announce(&mut self, cx: &mut Cx<'_>, b: BoxId) {
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        let Some(sign) = p.sign.filter(|_| p.online && !p.announced) else {
            return;
        };
        p.announced = true;
        cx.emit(Event::Connection(sign));
        cx.publish("transports.online", sign);
    }

    /// Whether connection `k` still exists; an outgoing one whose transport or handshake
    /// failed, or that closed, is ended here.
    pub(super) fn client_alive(&mut self, cx: &mut Cx<'_>, k: usize) -> bool {
        let Some(c) = self.conns.get(k) else {
            return false;
        };
        let why = match &c.link {
            Link::Client(d) => match (d.transport_error(), d.client().state()) {
                (Some(e), _) => Some(e.to_owned()),
                (None, ClientState::Failed(e)) => Some(format!("{e:?}")),
                (None, ClientState::Closed) => Some("closed".into()),
                _ => None,
            },
            Link::Server(_) => None,
        };
        match why {
            Some(why) => {
                self.conn_lost(cx, k, &why);
                false
            }
            None => true,
        }
    }

    /// Ends connection `k`: reports its unacknowledged messages, and if it was the peer's
    /// active one, `Disconnected` and `transports.offline`.
    pub(super) fn conn_lost(&mut self, cx: &mut Cx<'_>, k: usize, why: &str) {
        let Some(mut c) = self.conns.try_remove(k) else {
            return;
        };
        log::debug!("connection {k} to {:?} ended: {why}", c.peer);
        self.unlink(k, &mut c);
        let mut lost: Vec<Track> = c.inflight.drain(..).map(|(_, t)| t).collect();
        if c.partial_pos > 0 || !c.partial_track.is_none() {
            lost.push(c.partial_track);
        }
        // Arrived but not acknowledged as delivered: sent again (the peer drops the copy if it
        // had delivered it, and acknowledges it).
        lost.extend(c.awaiting.drain().map(|key| Track {
            cb: None,
            offline: Some(key),
        }));
        for t in lost {
            self.complete(cx.storage, t, Err(DeliveryError::ConnectionLost));
        }
        // A slot is free: peers that hit max_connections may try again.
        for b in std::mem::take(&mut self.conn_waiters) {
            self.want_peer(b);
        }
        let b = c.peer_box;
        let was_active = self
            .peers
            .get(&b)
            .is_some_and(|p| p.conn == Some(k) && p.online);
        self.reach_conn_lost(b, was_active, cx.now);
        if let Some(s) = self.peer_conn_lost(b, k, &c, why) {
            cx.emit(Event::Disconnected(s));
            cx.publish("transports.offline", s);
        }
    }

    /// Connection `k` (`c`, out of the slab) of peer `b` ended: if it was the peer's, the peer
    /// is offline, its offline records waiting in memory go back to the buffer and it is
    /// wanted again. Returns the peer's signId if its going offline must be reported.
    fn peer_conn_lost(&mut self, b: BoxId, k: usize, c: &Conn, why: &str) -> Option<crate::SignId> {
        let p = self.peers.get_mut(&b).filter(|p| p.conn == Some(k))?;
        p.conn = None;
        if c.outbound && !c.identified {
            p.endpoint += 1;
            p.last_failure = Some(match c.path {
                Some((to, _)) => format!("{to}: {why}"),
                None => why.to_owned(),
            });
        }
        let mut offline_sign = None;
        if p.online {
            p.online = false;
            if std::mem::take(&mut p.announced) {
                offline_sign = p.sign;
            }
            let mut keep = VecDeque::with_capacity(p.queue.len());
            for m in p.queue.drain(..) {
                match m.track.offline {
                    Some(key) => {
                        p.queued_bytes -= m.len;
                        self.queued_total -= m.len;
                        self.offline.release(&key);
                    }
                    None => keep.push_back(m),
                }
            }
            p.queue = keep;
        }
        // Whatever is still queued (or buffered offline) wants a new connection.
        self.want_peer(b);
        self.queue_drained(&b);
        offline_sign
    }

    /// Fails a destination: its real-time messages fail, offline ones wait for the retry.
    pub(super) fn fail_peer(&mut self, cx: &mut Cx<'_>, b: BoxId, why: &str) {
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        let sign = p.sign;
        p.attempts = 0;
        p.last_failure = None;
        p.endpoint = 0;
        p.waiting_lookup = false;
        self.queued_total -= std::mem::take(&mut p.queued_bytes);
        let msgs: Vec<Pending> = p.queue.drain(..).collect();
        // 1 s, 2 s, 4 s, ... at most `offline_retry`: a peer that comes back is found soon.
        let wait = Duration::from_secs(1)
            .saturating_mul(1 << p.failures.min(16))
            .min(self.cfg.offline_retry);
        p.failures = p.failures.saturating_add(1);
        self.retry_peer_at(b, cx.now + wait);
        self.queue_drained(&b);
        for m in msgs {
            let r = Err(DeliveryError::Unreachable(why.to_owned()));
            self.complete(cx.storage, m.track, r);
        }
        log::debug!("destination {sign:?} failed: {why}");
        self.maybe_forget(&b);
        if let Some(s) = sign {
            cx.publish("transports.failed", s);
        }
    }

    /// Looks at the wanted peers only: one without a connection that has something to send
    /// (and no failure to wait out) connects; an online one takes its idle offline records.
    pub(super) fn ensure_connections(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        for s in std::mem::take(&mut self.released) {
            if let Some(b) = cx.keys.box_id(&s) {
                self.want_peer(b);
            }
        }
        for b in std::mem::take(&mut self.want) {
            let Some(p) = self.peers.get_mut(&b) else {
                continue;
            };
            p.wanted = false;
            cx.stats.peer_visits += 1;
            let idle = p.sign.is_some_and(|s| self.offline.has_idle(&s));
            if p.conn.is_none() {
                if !p.waiting_lookup
                    && p.retry_at.is_none_or(|t| t <= now)
                    && (!p.queue.is_empty() || idle)
                {
                    self.connect_peer(cx, b);
                } else {
                    self.maybe_forget(&b);
                }
            } else if p.online && idle {
                if let (Some(s), Some(k)) = (p.sign, p.conn) {
                    self.take_offline(b, &s);
                    self.mark_dirty(k);
                }
            }
        }
    }

    /// Opens a connection to peer `b` once its nodeInfo is known (else a lookup is started or
    /// waited for).
    fn connect_peer(&mut self, cx: &mut Cx<'_>, b: BoxId) {
        let Some(info) = self.node_info_for(cx, b) else {
            return;
        };
        // A peer we send to is remembered across restarts (written only when it changed).
        self.dir.remember(cx.storage, &info, wall_ms());
        let relay = connection_info::offers_relay(&info.endpoints);
        let mut order = if relay {
            connection_info::connect_order_for_relay(&info.endpoints)
        } else {
            connection_info::connect_order(&info.endpoints)
        };
        if !self.cfg.ipv6 {
            order.retain(|e| e.addr.is_ipv4());
        }
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        if order.is_empty() {
            self.fail_peer(cx, b, "nodeInfo lists no usable endpoint");
            return;
        }
        if p.attempts >= self.cfg.max_attempts {
            let why = match &p.last_failure {
                Some(last) => format!(
                    "{} connection attempts failed (the last: {last})",
                    p.attempts
                ),
                None => format!("{} connection attempts failed", p.attempts),
            };
            self.fail_peer(cx, b, &why);
            return;
        }
        if self.conns.len() >= self.cfg.max_connections {
            // Tried again when a connection ends.
            if !self.conn_waiters.contains(&b) {
                self.conn_waiters.push(b);
            }
            return;
        }
        p.attempts += 1;
        let ep = order[p.endpoint % order.len()];
        let partner = self
            .cfg
            .happy_eyeballs
            .filter(|_| !relay)
            .and_then(|d| Some((connection_info::race_partner(&ep, &order)?, d)));
        self.open_connection(cx.now, b, ep, partner);
    }

    /// The nodeInfo to connect to peer `b` with: the application's directory's, the cache's
    /// or the one remembered from an earlier run (then a fresher one is asked for); `None`
    /// while a lookup runs (one is started if none is).
    fn node_info_for(&mut self, cx: &mut Cx<'_>, b: BoxId) -> Option<NodeInfo> {
        let sign = self.peers.get(&b)?.sign;
        let custom = match (sign, self.custom_dir.as_mut()) {
            (Some(s), Some(d)) => d.lookup(&s),
            _ => None,
        };
        if let Some(i) = custom {
            if i.box_id == b {
                return Some(i);
            }
            log::debug!("custom directory answered a mismatched nodeInfo");
        }
        match self.dir.lookup(&b, cx.now) {
            Lookup::Found(i) => Some(i),
            Lookup::Remembered(i) => {
                // Remembered from an earlier run: used at once, and a fresher one asked
                // for (its answer replaces it in the cache and in storage).
                cx.publish("transports.requestNodeInfo", i.sign_id);
                Some(i)
            }
            Lookup::Pending => {
                if let Some(p) = self.peers.get_mut(&b) {
                    p.waiting_lookup = true;
                }
                None
            }
            Lookup::Unknown => {
                self.start_lookup(cx, b);
                None
            }
        }
    }

    /// Nothing is known of peer `b`: asks the bus for its nodeInfo (by signId when we know
    /// it, our own services answer both, else by boxId, as the JavaScript nodes ask).
    fn start_lookup(&mut self, cx: &mut Cx<'_>, b: BoxId) {
        let now = cx.now;
        let sign = self.peers.get(&b).and_then(|p| p.sign);
        // The key given as a destination was the boxId of a node whose nodeInfo arrived
        // after the send but before this attempt: its messages follow it now (a lookup by
        // that key would find nothing new).
        if let Some(s) = sign {
            let as_box = BoxId(crate::crypto::BoxPublicKey(s.0 .0));
            if as_box != b && self.dir.knows_box(&as_box) {
                self.rekey_peer(b, as_box, now);
                self.kick_peer(as_box);
                return;
            }
        }
        if !self.dir.start_lookup(b, now) {
            self.fail_peer(cx, b, "too many lookups pending");
            return;
        }
        let at = now + self.cfg.lookup_timeout;
        self.timers.schedule(at, NetTimer::Lookup(b));
        if let Some(p) = self.peers.get_mut(&b) {
            p.waiting_lookup = true;
        }
        match sign {
            Some(s) => {
                // The key may have been a JavaScript node's boxId given as a destination:
                // an answer for it re-keys this entry.
                if s.0 .0 != b.0 .0 && self.aliases.len() < MAX_CACHED {
                    self.aliases
                        .insert(BoxId(crate::crypto::BoxPublicKey(s.0 .0)), b);
                }
                cx.publish("transports.requestNodeInfo", s);
            }
            None => cx.publish("transports.requestNodeInfo", b),
        }
    }

    /// Opens an outgoing connection to peer `b` at endpoint `ep`, in the endpoint's dialect;
    /// with `partner` (the same peer's endpoint in the other address family, and the head
    /// start), a Happy Eyeballs race of the two, IPv6 first.
    fn open_connection(
        &mut self,
        now: Instant,
        b: BoxId,
        ep: Endpoint,
        partner: Option<(Endpoint, Duration)>,
    ) {
        let entry = self.conns.vacant_entry();
        let k = entry.key();
        let dialect = Dialect::of_endpoint(&ep);
        let mut config = ClientConfig::with_stream(
            b.0,
            StreamConfig {
                dead_after: self.cfg.dead_after,
                no_one_byte_blocks: dialect.no_one_byte_blocks(),
                congestion: dialect.congestion(ep.kind),
                ..StreamConfig::client()
            },
        );
        config.long_term = Some(self.our_box.clone());
        let token = Token(CONNECTION_TOKEN_BASE + k);
        let framing = dialect.framing();
        let (registry, kind, addr) = (&self.registry, ep.kind, ep.addr);
        let driver = match (ep.relayed, partner) {
            (false, Some((other, head_start))) => {
                let (first, second) = if addr.is_ipv6() {
                    (addr, other.addr)
                } else {
                    (other.addr, addr)
                };
                ClientDriver::connect_racing(
                    registry,
                    token,
                    first,
                    second,
                    head_start,
                    config.clone(),
                    now,
                )
                .or_else(|e| {
                    // No dual-stack socket (a system without IPv6): this endpoint alone.
                    log::debug!("happy eyeballs: no dual-stack socket ({e}); dialling {addr}");
                    ClientDriver::connect_with_framing(
                        registry, token, kind, framing, addr, config, now,
                    )
                })
            }
            #[cfg(feature = "relay")]
            (true, _) => ClientDriver::connect_relayed(registry, token, addr, config, now),
            // Without the `relay` feature `connect_order` leaves relayed endpoints out.
            _ => ClientDriver::connect_with_framing(
                registry, token, kind, framing, addr, config, now,
            ),
        };
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        match driver {
            Ok(d) => {
                let frames = (self.cfg.max_frame, &self.identify[..]);
                let link = Link::Client(Box::new(d));
                let mut conn = Conn::new(link, (ep.kind, dialect), b, None, frames, now);
                conn.dirty = true;
                entry.insert(conn);
                p.conn = Some(k);
                p.dialect = Some(dialect);
                self.dirty.push(k);
                log::debug!(
                    "connecting to {} over {:?} at {} ({framing:?} framing)",
                    p.sign.map_or_else(|| b.to_string(), |s| s.to_string()),
                    ep.kind,
                    ep.addr
                );
            }
            Err(e) => {
                log::debug!("connecting to {} failed: {e}", ep.addr);
                p.last_failure = Some(format!("{}: {e}", ep.addr));
                p.endpoint += 1;
                self.want_peer(b);
            }
        }
    }

    /// Connection `k` identified its peer: make it the active one (or not, see module docs).
    pub(super) fn activate(&mut self, cx: &mut Cx<'_>, k: usize) {
        let now = cx.now;
        let c = &self.conns[k];
        let (b, sign, dialect) = (c.peer_box, c.peer, c.dialect);
        let peer = self.peers.entry(b).or_default();
        if sign.is_some() {
            peer.sign = sign;
        }
        let other = peer.conn.filter(|&o| o != k && self.conns.contains(o));
        let demote = match other {
            None => None,
            Some(o) => match self.settle_pair(k, o) {
                Pair::Both => return,
                Pair::KeepNew => Some(o),
                Pair::KeepOld => {
                    self.wind_down(k, now);
                    return;
                }
            },
        };
        let peer = self.peers.entry(b).or_default();
        peer.conn = Some(k);
        // What is queued from now on is encoded for the connection that writes it.
        peer.dialect = Some(dialect);
        let was_online = peer.online;
        peer.online = true;
        peer.attempts = 0;
        peer.last_failure = None;
        peer.failures = 0;
        peer.endpoint = 0;
        self.conns[k].active = true;
        if let Some(o) = demote {
            self.demote(o, now);
        }
        // Offline records for this peer join its queue.
        if let Some(s) = self.peers.get(&b).and_then(|p| p.sign) {
            self.take_offline(b, &s);
        }
        self.clear_retry(b);
        self.mark_dirty(k);
        self.on_active(k, now);
        if !was_online {
            self.announce(cx, b);
        }
        self.check_path(cx, k);
    }

    /// Which of two connections of one peer stays: `k`, which just identified its peer, or
    /// `o`, the peer's connection until now.
    fn settle_pair(&self, k: usize, o: usize) -> Pair {
        let (ck, co) = (&self.conns[k], &self.conns[o]);
        if ck.dialect.keeps_both_connections() {
            // Frames arrive on both; ours go on the one already active.
            return if co.identified {
                Pair::Both
            } else {
                Pair::KeepNew
            };
        }
        // Opened close together: a simultaneous connect, settled by the key rule (the one
        // initiated by the node with the smaller box key stays). Otherwise the newer one wins
        // (the peer restarted, or the old one died).
        let gap = if ck.opened > co.opened {
            ck.opened - co.opened
        } else {
            co.opened - ck.opened
        };
        if co.outbound == ck.outbound || gap >= self.cfg.connect_timeout {
            return Pair::KeepNew;
        }
        let ours = self.our_box.public;
        let initiator = |c: &Conn| if c.outbound { ours } else { c.peer_box.0 };
        if initiator(ck) < initiator(co) {
            Pair::KeepNew
        } else {
            Pair::KeepOld
        }
    }

    /// Connection `k` finishes what it was writing and closes gracefully.
    fn wind_down(&mut self, k: usize, now: Instant) {
        let c = &mut self.conns[k];
        c.closing = Some(now);
        if let Some(s) = stream_of(&mut self.server, &mut c.link) {
            s.finish(Eof::Success);
        }
    }

    /// Connection `o` loses its peer to a newer one: an identified one winds down (visited in
    /// this turn's pump), an attempt still in its handshake is dropped (it was not active, so
    /// no event).
    fn demote(&mut self, o: usize, now: Instant) {
        if self.conns[o].identified {
            self.conns[o].active = false;
            self.wind_down(o, now);
            self.mark_dirty(o);
        } else {
            let mut c = self.conns.remove(o);
            self.unlink(o, &mut c);
        }
    }
}

/// How two connections of one peer settle ([`Net::settle_pair`]).
enum Pair {
    /// Both stay open (a JavaScript peer).
    Both,
    /// The connection that just identified its peer stays; the other goes.
    KeepNew,
    /// The peer's connection until now stays; the new one winds down.
    KeepOld,
}
