//! The connection manager's turn: listener events, due timers, the visit of each dirty
//! connection, the listeners' flush and the delivery callbacks (see the parent module's
//! "event-driven turn").

use super::*;

impl Core {
    /// The receiving half, run before the turn's deliveries so that what arrived is delivered
    /// in the same turn: listener events, ended connections, frames read from the connections
    /// that had input (the dirty ones).
    pub(crate) fn net_receive(&mut self) {
        if self.net.is_none() {
            return;
        }
        self.server_events();
        let dirty: Vec<usize> = self
            .net
            .as_ref()
            .map(|n| n.dirty.clone())
            .unwrap_or_default();
        for k in dirty {
            if !self.client_alive(k) {
                continue;
            }
            if self.read_conn(k) == ReadOutcome::Blocked {
                break;
            }
            // Starved: it waits in `budget_waiters`; the others read on.
        }
    }

    /// One turn of the connection manager (see the module docs): listener events, due
    /// timers, wanted peers, then a visit of each dirty connection (read, write,
    /// acknowledgements, flush, next deadline), the listeners' flush, delivery callbacks.
    pub(crate) fn net_pump(&mut self) {
        if self.net.is_none() {
            return;
        }
        let now = self.now;
        self.server_events();
        self.fire_net_timers(now);
        self.ensure_connections(now);
        let Some(net) = self.net.as_mut() else { return };
        if !net.read_blocked.is_empty() && self.queue.len() < self.limits.local_queue {
            for k in std::mem::take(&mut net.read_blocked) {
                net.mark_dirty(k);
            }
        }
        let batch = std::mem::take(&mut net.dirty);
        for &k in &batch {
            if let Some(c) = net.conns.get_mut(k) {
                c.dirty = false;
            }
        }
        for k in batch {
            self.visit(k, now);
        }
        let Some(net) = self.net.as_mut() else { return };
        if std::mem::take(&mut net.server_io) && !net.watch.is_empty() {
            let watch = std::mem::take(&mut net.watch);
            for &k in &watch {
                if let Some(c) = net.conns.get_mut(k) {
                    c.watched = false;
                }
            }
            for k in watch {
                self.check_acks(k);
            }
        }
        let Some(net) = self.net.as_mut() else { return };
        if let Err(e) = net.server.flush(&net.registry, now) {
            log::debug!("listener flush failed: {e}");
        }
        // Packets left unread (a full batch) or due at once: look again next turn.
        if net.server.next_deadline().is_some_and(|d| d <= now) {
            net.server_io = true;
        }
        self.server_events();
        if let Some(net) = self.net.as_mut() {
            net.nat_events(now);
        }
        self.sync_node_info();
        self.run_fired();
    }

    /// One connection's share of the turn.
    pub(super) fn visit(&mut self, k: usize, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        if !net.conns.contains(k) {
            return;
        }
        self.stats.conn_visits += 1;
        if !self.client_alive(k) {
            return;
        }
        let handshake_done = self
            .net
            .as_ref()
            .and_then(|n| n.conns.get(k))
            .is_some_and(|c| {
                c.compat
                    && !c.identified
                    && matches!(&c.link, Link::Client(d)
                    if matches!(d.client().state(), ClientState::Established))
            });
        if handshake_done {
            // A JavaScript server spoke first (its all-zero message): the handshake is done,
            // and that is all the identification a JavaScript node gives.
            self.identify_compat(k);
        }
        match self.read_conn(k) {
            ReadOutcome::Done | ReadOutcome::Starved => {}
            ReadOutcome::More => {
                if let Some(net) = self.net.as_mut() {
                    net.mark_dirty(k);
                }
            }
            ReadOutcome::Blocked => {
                if let Some(net) = self.net.as_mut() {
                    if net.conns.contains(k) && !net.read_blocked.contains(&k) {
                        net.read_blocked.push(k);
                    }
                }
            }
        }
        self.write_conn(k, now);
        self.check_acks(k);
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        if let Link::Client(d) = &mut c.link {
            if let Err(e) = d.flush(&net.registry, now) {
                log::debug!("connection flush failed: {e}");
            }
        }
        if self.client_alive(k) {
            if let Some(net) = self.net.as_mut() {
                net.reschedule_conn(k, now);
            }
            self.check_path(k);
        }
    }

    pub(super) fn run_fired(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        if net.fired.is_empty() {
            return;
        }
        let fired = std::mem::take(&mut net.fired);
        let mut cbs = Vec::with_capacity(fired.len());
        for (id, r) in fired {
            if let Some(cb) = net.callbacks.try_remove(id) {
                cbs.push((cb, r));
            }
        }
        let now = self.now;
        for (cb, r) in cbs {
            cb(&mut Context { core: self, now }, r);
        }
    }

    /// Takes the server's events: accepted and closed connections, and the ones with
    /// something to read or room to write (made dirty).
    pub(super) fn server_events(&mut self) {
        loop {
            let Some(net) = self.net.as_mut() else { return };
            let Some(ev) = net.server.poll_event() else {
                return;
            };
            match ev {
                ServerEvent::Accepted(id) => self.on_accept(id),
                ServerEvent::Closed(id) => {
                    if let Some(k) = net.by_server.remove(&id) {
                        self.conn_lost(k, "closed");
                    }
                }
                ServerEvent::Readable(id) | ServerEvent::Writable(id) => {
                    if let Some(&k) = net.by_server.get(&id) {
                        net.mark_dirty(k);
                    }
                }
            }
        }
    }

    /// Fires the connection manager's due timers (those scheduled while firing wait for the
    /// next turn).
    pub(super) fn fire_net_timers(&mut self, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let limit = net.timers.next_seq();
        loop {
            let Some(net) = self.net.as_mut() else { return };
            let Some(t) = net.timers.pop_due(now, limit) else {
                return;
            };
            match t {
                NetTimer::Conn(k) => self.conn_timer(k, now),
                NetTimer::Retry(b) => {
                    if let Some(p) = net.peers.get_mut(&b) {
                        p.retry_timer = None;
                        net.want_peer(b);
                    }
                }
                NetTimer::Expiry(b) => self.expire_queue(b, now),
                NetTimer::Lookup(b) => {
                    if !net.dir.lookup_expired(&b, now) {
                        continue;
                    }
                    if !net.aliases.is_empty() {
                        net.aliases.retain(|_, waiting| *waiting != b);
                    }
                    let waiting = self
                        .net
                        .as_ref()
                        .and_then(|n| n.peers.get(&b))
                        .is_some_and(|p| p.waiting_lookup);
                    if waiting {
                        self.fail_peer(b, "nodeInfo lookup timed out", now);
                    }
                }
                NetTimer::OfflineRetry => {
                    net.offline_timer = None;
                    self.offline_retry(now);
                }
                NetTimer::RelayBind => net.relay_bind_due(now),
                NetTimer::DialBack => net.dial_back_due(now),
                NetTimer::FramePool => {
                    if let Some(at) = net.frames.release_due(now) {
                        net.timers.schedule(at, NetTimer::FramePool);
                    }
                }
                NetTimer::DedupFlush => {
                    net.dedup_timer = None;
                    net.next_dedup_flush = now + DEDUP_FLUSH_EVERY;
                    if !net.acks_due.is_empty() {
                        // Stored (and acknowledged) by `settle_acks` at the end of this turn.
                        net.ack_store_failed = false;
                    } else if let Err(e) = net.dedup.flush(&mut *self.storage) {
                        log::warn!("de-duplication memory could not be stored: {e}");
                    }
                }
            }
        }
    }

    /// Connection `k`'s deadline: a handshake or identify that took too long, a closing
    /// connection that lingers, a keepalive; in any case a visit (the driver's timers).
    pub(super) fn conn_timer(&mut self, k: usize, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        c.timer = None;
        let age = now.saturating_duration_since(c.opened);
        let slow = (!c.identified && age >= net.cfg.connect_timeout)
            || c.closing
                .is_some_and(|t| now.saturating_duration_since(t) >= net.cfg.dead_after);
        if slow {
            self.conn_lost(k, "timed out");
            return;
        }
        if c.active
            && !c.compat
            && c.closing.is_none()
            && c.partial_pos >= c.partial.len()
            && now.saturating_duration_since(c.last_write) >= net.cfg.keepalive
        {
            c.partial.clear();
            c.partial.extend_from_slice(&net.ping);
            c.partial_pos = 0;
            c.partial_track = Track::default();
        }
        net.mark_dirty(k);
    }
}
