//! Connections coming and going: incoming ones accepted (or refused by the connection limits),
//! outgoing ones opened toward a peer's endpoints, identified peers made active (the
//! one-connection-per-peer rule), ended connections and failed destinations.

use super::*;

impl Core {
    pub(super) fn on_accept(&mut self, id: ConnectionId) {
        let now = self.now;
        let Some(net) = self.net.as_mut() else { return };
        let Some(key) = net.server.server().client_key(id) else {
            return;
        };
        // Peers in our circles may take any slot; strangers leave `reserved_outbound` free
        // and are capped per source address.
        let circle = self.circles.is_friend(&BoxId(key)) || self.circles.is_device(&BoxId(key));
        let path = net.server.server().path(id);
        let source = match (circle, path) {
            (false, Some(p)) => net.server.peer_ip(p).map(SourceKey::of),
            _ => None,
        };
        let limit = if circle {
            net.cfg.max_connections
        } else {
            net.cfg
                .max_connections
                .saturating_sub(net.cfg.reserved_outbound)
        };
        let from_source = source.map_or(0, |s| net.inbound_per_ip.get(&s).copied().unwrap_or(0));
        if net.conns.len() >= limit || (!circle && from_source >= net.cfg.max_inbound_per_ip) {
            log::debug!("too many connections (or from {source:?}): incoming one refused");
            net.server.server_mut().remove(id);
            return;
        }
        if let Some(s) = source {
            *net.inbound_per_ip.entry(s).or_insert(0) += 1;
        }
        let kind = match path {
            Some(crate::transport::driver::Path::Tcp { .. }) => TransportKind::Tcp,
            _ => TransportKind::Udp,
        };
        let compat = path.is_some_and(|p| p.framing() == Framing::Compat);
        let frames = (net.cfg.max_frame, &net.identify[..]);
        let conn = Conn::new(
            Link::Server(id),
            (kind, compat),
            BoxId(key),
            source,
            frames,
            now,
        );
        let k = net.conns.insert(conn);
        net.by_server.insert(id, k);
        net.mark_dirty(k);
        if compat {
            if let Some(s) = net.server.server_mut().stream_mut(id) {
                s.set_no_one_byte_blocks(true);
                if kind == TransportKind::Tcp {
                    let gentle = congestion::gentle(JS_TCP_BLOCK_INTERVAL, JS_TCP_WINDOW);
                    s.set_congestion(&gentle, now);
                }
            }
            // A JavaScript peer sends no identify: the Initiate CurveCP just accepted proved
            // its box key, which is all it names itself by.
            self.identify_compat(k);
        }
    }

    /// A compat connection's peer is authenticated (its CurveCP handshake is done): it becomes
    /// identified by its box key, with its signId if the directory knows it (else
    /// `directory.get` is asked), and is activated.
    pub(super) fn identify_compat(&mut self, k: usize) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        if c.identified {
            return;
        }
        c.identified = true;
        let b = c.peer_box;
        c.peer = net.dir.reverse(&b);
        if c.peer.is_none() {
            c.asked_sign = true;
            self.resolve_box_id(&b);
        }
        self.activate(k);
    }

    /// Reports `Connection` and `transports.online` for peer `b` if it is online, known by
    /// its signId and not reported yet (a JavaScript peer whose signId was learnt late).
    pub(super) fn announce(&mut self, b: BoxId) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(p) = net.peers.get_mut(&b) else {
            return;
        };
        let Some(sign) = p.sign.filter(|_| p.online && !p.announced) else {
            return;
        };
        p.announced = true;
        self.emit(Event::Connection(sign));
        self.emit_peer("transports.online", sign);
    }

    /// Whether connection `k` still exists; an outgoing one whose transport or handshake
    /// failed, or that closed, is ended here.
    pub(super) fn client_alive(&mut self, k: usize) -> bool {
        let Some(c) = self.net.as_ref().and_then(|n| n.conns.get(k)) else {
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
                self.conn_lost(k, &why);
                false
            }
            None => true,
        }
    }

    /// Ends connection `k`: reports its unacknowledged messages, and if it was the peer's
    /// active one, `Disconnected` and `transports.offline`.
    pub(super) fn conn_lost(&mut self, k: usize, why: &str) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(mut c) = net.conns.try_remove(k) else {
            return;
        };
        log::debug!("connection {k} to {:?} ended: {why}", c.peer);
        net.unlink(k, &mut c);
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
            complete(net, storage, t, Err(DeliveryError::ConnectionLost));
        }
        // A slot is free: peers that hit max_connections may try again.
        for b in std::mem::take(&mut net.conn_waiters) {
            net.want_peer(b);
        }
        let b = c.peer_box;
        let mut offline_sign = None;
        let was_active = net
            .peers
            .get(&b)
            .is_some_and(|p| p.conn == Some(k) && p.online);
        net.reach_conn_lost(b, was_active, self.now);
        let Some(net) = self.net.as_mut() else { return };
        if let Some(p) = net.peers.get_mut(&b) {
            if p.conn == Some(k) {
                p.conn = None;
                if c.outbound && !c.identified {
                    p.endpoint += 1;
                }
                if p.online {
                    p.online = false;
                    if std::mem::take(&mut p.announced) {
                        offline_sign = p.sign;
                    }
                    // Offline records waiting in memory go back to the buffer.
                    let mut keep = VecDeque::with_capacity(p.queue.len());
                    for m in p.queue.drain(..) {
                        match m.track.offline {
                            Some(key) => {
                                p.queued_bytes -= m.frame.len();
                                net.queued_total -= m.frame.len();
                                net.offline.release(&key);
                            }
                            None => keep.push_back(m),
                        }
                    }
                    p.queue = keep;
                }
                // Whatever is still queued (or buffered offline) wants a new connection.
                net.want_peer(b);
                net.queue_drained(&b);
            }
        }
        if let Some(s) = offline_sign {
            self.emit(Event::Disconnected(s));
            self.emit_peer("transports.offline", s);
        }
    }

    /// Fails a destination: its real-time messages fail, offline ones wait for the retry.
    pub(super) fn fail_peer(&mut self, b: BoxId, why: &str, now: Instant) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(p) = net.peers.get_mut(&b) else {
            return;
        };
        let sign = p.sign;
        p.attempts = 0;
        p.endpoint = 0;
        p.waiting_lookup = false;
        net.queued_total -= std::mem::take(&mut p.queued_bytes);
        let msgs: Vec<Pending> = p.queue.drain(..).collect();
        // 1 s, 2 s, 4 s, ... at most `offline_retry`: a peer that comes back is found soon.
        let wait = Duration::from_secs(1)
            .saturating_mul(1 << p.failures.min(16))
            .min(net.cfg.offline_retry);
        p.failures = p.failures.saturating_add(1);
        let retry = now + wait;
        net.retry_peer_at(b, retry);
        net.queue_drained(&b);
        for m in msgs {
            let r = Err(DeliveryError::Unreachable(why.to_owned()));
            complete(net, storage, m.track, r);
        }
        log::debug!("destination {sign:?} failed: {why}");
        net.maybe_forget(&b);
        if let Some(s) = sign {
            self.emit_peer("transports.failed", s);
        }
    }

    /// Looks at the wanted peers only: one without a connection that has something to send
    /// (and no failure to wait out) connects; an online one takes its idle offline records.
    pub(super) fn ensure_connections(&mut self, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        for s in std::mem::take(&mut net.released) {
            if let Some(b) = self.keys.box_id(&s) {
                if let Some(net) = self.net.as_mut() {
                    net.want_peer(b);
                }
            }
        }
        let Some(net) = self.net.as_mut() else { return };
        let want = std::mem::take(&mut net.want);
        for b in want {
            let Some(net) = self.net.as_mut() else { return };
            let Some(p) = net.peers.get_mut(&b) else {
                continue;
            };
            p.wanted = false;
            self.stats.peer_visits += 1;
            let idle = p.sign.is_some_and(|s| net.offline.has_idle(&s));
            if p.conn.is_none() {
                if !p.waiting_lookup
                    && p.retry_at.is_none_or(|t| t <= now)
                    && (!p.queue.is_empty() || idle)
                {
                    self.connect_peer(b, now);
                } else {
                    net.maybe_forget(&b);
                }
            } else if p.online && idle {
                if let (Some(s), Some(k)) = (p.sign, p.conn) {
                    net.take_offline(b, &s);
                    net.mark_dirty(k);
                }
            }
        }
    }

    pub(super) fn connect_peer(&mut self, b: BoxId, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(p) = net.peers.get(&b) else {
            return;
        };
        let sign = p.sign;
        let mut info = match (sign, net.custom_dir.as_mut()) {
            (Some(s), Some(d)) => d.lookup(&s),
            _ => None,
        };
        if let Some(i) = &info {
            if i.box_id != b {
                log::debug!("custom directory answered a mismatched nodeInfo");
                info = None;
            }
        }
        let info = match info {
            Some(i) => i,
            None => match net.dir.lookup(&b, now) {
                Lookup::Found(i) => i,
                Lookup::Remembered(i) => {
                    // Remembered from an earlier run: used at once, and a fresher one asked
                    // for (its answer replaces it in the cache and in storage).
                    self.emit_peer("transports.requestNodeInfo", i.sign_id);
                    i
                }
                Lookup::Pending => {
                    if let Some(p) = net.peers.get_mut(&b) {
                        p.waiting_lookup = true;
                    }
                    return;
                }
                Lookup::Unknown => {
                    // The key given as a destination was the boxId of a node whose nodeInfo
                    // arrived after the send but before this attempt: its messages follow
                    // it now (a lookup by that key would find nothing new).
                    if let Some(s) = sign {
                        let as_box = BoxId(crate::crypto::BoxPublicKey(s.0 .0));
                        if as_box != b && net.dir.knows_box(&as_box) {
                            net.rekey_peer(b, as_box, now);
                            net.kick_peer(as_box);
                            return;
                        }
                    }
                    if !net.dir.start_lookup(b, now) {
                        self.fail_peer(b, "too many lookups pending", now);
                        return;
                    }
                    let at = now + net.cfg.lookup_timeout;
                    net.timers.schedule(at, NetTimer::Lookup(b));
                    if let Some(p) = net.peers.get_mut(&b) {
                        p.waiting_lookup = true;
                    }
                    // Asked by signId when we know it (our own services answer both), else
                    // by boxId, as the JavaScript nodes ask.
                    match sign {
                        Some(s) => {
                            if s.0 .0 != b.0 .0 {
                                // The key may have been a JavaScript node's boxId given as
                                // a destination: an answer for it re-keys this entry.
                                if let Some(n) = self.net.as_mut() {
                                    if n.aliases.len() < crate::platform::directory::MAX_CACHED {
                                        n.aliases
                                            .insert(BoxId(crate::crypto::BoxPublicKey(s.0 .0)), b);
                                    }
                                }
                            }
                            self.emit_peer("transports.requestNodeInfo", s)
                        }
                        None => self.emit_peer("transports.requestNodeInfo", b),
                    }
                    return;
                }
            },
        };
        // A peer we send to is remembered across restarts (written only when it changed).
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        net.dir.remember(storage, &info, wall_ms());
        let order = connection_info::connect_order(&info.endpoints);
        let Some(p) = net.peers.get_mut(&b) else {
            return;
        };
        if order.is_empty() {
            self.fail_peer(b, "nodeInfo lists no usable endpoint", now);
            return;
        }
        if p.attempts >= net.cfg.max_attempts {
            let why = format!("{} connection attempts failed", p.attempts);
            self.fail_peer(b, &why, now);
            return;
        }
        if net.conns.len() >= net.cfg.max_connections {
            // Tried again when a connection ends.
            if !net.conn_waiters.contains(&b) {
                net.conn_waiters.push(b);
            }
            return;
        }
        p.attempts += 1;
        let ep = order[p.endpoint % order.len()];
        let entry = net.conns.vacant_entry();
        let k = entry.key();
        // An endpoint without the native mark is a JavaScript node's: its 1tp framing, and
        // a stream that never sends it one-byte blocks.
        let compat = !ep.native;
        let mut config = ClientConfig::with_stream(
            b.0,
            StreamConfig {
                dead_after: net.cfg.dead_after,
                no_one_byte_blocks: compat,
                congestion: if compat && ep.kind == TransportKind::Tcp {
                    congestion::gentle(JS_TCP_BLOCK_INTERVAL, JS_TCP_WINDOW)
                } else {
                    congestion::default_factory()
                },
                ..StreamConfig::client()
            },
        );
        config.long_term = Some(net.our_box.clone());
        let token = Token(CONNECTION_TOKEN_BASE + k);
        let framing = if compat {
            Framing::Compat
        } else {
            Framing::Native
        };
        let (registry, kind, addr) = (&net.registry, ep.kind, ep.addr);
        let driver = if ep.relayed {
            ClientDriver::connect_relayed(registry, token, addr, config, now)
        } else {
            ClientDriver::connect_with_framing(registry, token, kind, framing, addr, config, now)
        };
        match driver {
            Ok(d) => {
                let frames = (net.cfg.max_frame, &net.identify[..]);
                let link = Link::Client(Box::new(d));
                let mut conn = Conn::new(link, (ep.kind, compat), b, None, frames, now);
                conn.dirty = true;
                entry.insert(conn);
                p.conn = Some(k);
                net.dirty.push(k);
                log::debug!(
                    "connecting to {} over {:?} at {} ({framing:?} framing)",
                    sign.map_or_else(|| b.to_string(), |s| s.to_string()),
                    ep.kind,
                    ep.addr
                );
            }
            Err(e) => {
                log::debug!("connecting to {} failed: {e}", ep.addr);
                p.endpoint += 1;
                net.want_peer(b);
            }
        }
    }

    /// Connection `k` identified its peer: make it the active one (or not, see module docs).
    pub(super) fn activate(&mut self, k: usize) {
        let Some(net) = self.net.as_mut() else { return };
        let c = &net.conns[k];
        let (b, sign, compat) = (c.peer_box, c.peer, c.compat);
        let ours = net.our_box.public;
        let initiator = |c: &Conn| if c.outbound { ours } else { b.0 };
        let peer = net.peers.entry(b).or_default();
        if sign.is_some() {
            peer.sign = sign;
        }
        let mut demote = None;
        match peer.conn {
            Some(o) if o != k && compat && net.conns.get(o).is_some_and(|c| c.identified) => {
                // A JavaScript node opens a connection of its own to send (it does not reply
                // on ours) and knows nothing of closing one of two: both stay open, frames
                // arrive on both, ours to it go on the one already active.
                return;
            }
            Some(o) if o != k && compat => demote = Some(o),
            Some(o) if o != k && net.conns.contains(o) => {
                let (co, ck) = (&net.conns[o], &net.conns[k]);
                // Opened close together: a simultaneous connect, settled by the key rule.
                // Otherwise the newer one wins (the peer restarted, or the old one died).
                let gap = if ck.opened > co.opened {
                    ck.opened - co.opened
                } else {
                    co.opened - ck.opened
                };
                let keep_new = if co.outbound == ck.outbound || gap >= net.cfg.connect_timeout {
                    true
                } else {
                    initiator(ck) < initiator(co)
                };
                if keep_new {
                    demote = Some(o);
                } else {
                    demote = Some(k);
                }
            }
            _ => {}
        }
        let now = self.now;
        if demote == Some(k) {
            let c = &mut net.conns[k];
            c.closing = Some(now);
            if let Some(s) = stream_of(&mut net.server, &mut c.link) {
                s.finish(Eof::Success);
            }
            return;
        }
        peer.conn = Some(k);
        net.conns[k].active = true;
        let was_online = peer.online;
        peer.online = true;
        peer.attempts = 0;
        peer.failures = 0;
        peer.endpoint = 0;
        if let Some(o) = demote {
            let identified = net.conns[o].identified;
            if identified {
                let c = &mut net.conns[o];
                c.active = false;
                c.closing = Some(now);
                if let Some(s) = stream_of(&mut net.server, &mut c.link) {
                    s.finish(Eof::Success);
                }
                net.mark_dirty(o);
            } else {
                // An attempt still in its handshake: drop it (it was not active, so no event).
                if let Some(p) = net.peers.get_mut(&b) {
                    p.conn = Some(k);
                }
                let mut c = net.conns.remove(o);
                net.unlink(o, &mut c);
            }
        }
        // Offline records for this peer join its queue.
        if let Some(s) = net.peers.get(&b).and_then(|p| p.sign) {
            net.take_offline(b, &s);
        }
        net.clear_retry(b);
        net.mark_dirty(k);
        net.on_active(k, now);
        if !was_online {
            self.announce(b);
        }
        self.check_path(k);
    }
}
