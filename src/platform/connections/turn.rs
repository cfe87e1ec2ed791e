//! The connection manager's turn, in two passes around the platform's deliveries (see the
//! parent module's "event-driven turn"): [`Net::receive`] takes the listeners' events and reads
//! the connections that have input, before the deliveries, so that what arrived is delivered
//! in the same turn; [`Net::pump`] fires due timers, connects wanted peers and visits each
//! dirty connection (write, acknowledgements, flush, next deadline), after the deliveries, so
//! that what the callbacks sent is written in the same turn.

use super::context::Cx;
use super::{
    DeliveryCallback, DeliveryError, Link, Net, NetTimer, ReadOutcome, Track, DEDUP_FLUSH_EVERY,
};
use crate::curvecp::client::ClientState;
use crate::curvecp::server::ServerEvent;

impl Net {
    /// The receiving pass: the listeners' events (once), then one read of each connection that
    /// has input. A connection whose read stopped because the local delivery queue is full
    /// (and those not reached because of it) or whose read budget ran out is read again in the
    /// next turn's pass; one that starved for frame budget waits for a release.
    pub(crate) fn receive(&mut self, cx: &mut Cx<'_>) {
        self.server_events(cx);
        if self.readable.is_empty() || cx.queue_full() {
            return;
        }
        let batch = std::mem::take(&mut self.readable);
        for &k in &batch {
            if let Some(c) = self.conns.get_mut(k) {
                c.readable = false;
            }
        }
        for (i, &k) in batch.iter().enumerate() {
            if !self.client_alive(cx, k) {
                continue;
            }
            match self.read_conn(cx, k) {
                ReadOutcome::Done | ReadOutcome::Starved => {}
                ReadOutcome::More => self.mark_readable(k),
                ReadOutcome::Blocked => {
                    for &rest in &batch[i..] {
                        self.mark_readable(rest);
                    }
                    self.mark_dirty(k);
                    break;
                }
            }
            // What was read may need acknowledging, and its window reopening: visited in the
            // pump.
            self.mark_dirty(k);
        }
    }

    /// The pump: due timers, wanted peers, then a visit of each dirty connection, the
    /// acknowledgements of watched server-side streams, and the listeners' flush. The server
    /// events that flush raises are handled at the start of the next turn's receiving pass
    /// (which [`Net::has_work`] makes immediate).
    pub(crate) fn pump(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        self.fire_timers(cx);
        self.ensure_connections(cx);
        let batch = std::mem::take(&mut self.dirty);
        for &k in &batch {
            if let Some(c) = self.conns.get_mut(k) {
                c.dirty = false;
            }
        }
        for k in batch {
            self.visit(cx, k);
        }
        if std::mem::take(&mut self.server_io) && !self.watch.is_empty() {
            let watch = std::mem::take(&mut self.watch);
            for &k in &watch {
                if let Some(c) = self.conns.get_mut(k) {
                    c.watched = false;
                }
            }
            for k in watch {
                self.check_acks(cx, k);
            }
        }
        if let Err(e) = self.server.flush(&self.registry, now) {
            log::debug!("listener flush failed: {e}");
        }
        // Packets left unread (a full batch) or due at once: look again next turn.
        if self.server.next_deadline().is_some_and(|d| d <= now) {
            self.server_io = true;
        }
        while let Some(ev) = self.server.poll_event() {
            self.server_backlog.push_back(ev);
        }
        self.nat_events(now);
        self.relay_pump(cx);
    }

    /// One connection's share of the pump: a JavaScript server's finished handshake
    /// identifies it; then its writes, its acknowledged messages, its driver's flush, its
    /// next deadline and its path.
    fn visit(&mut self, cx: &mut Cx<'_>, k: usize) {
        if !self.conns.contains(k) {
            return;
        }
        cx.stats.conn_visits += 1;
        if !self.client_alive(cx, k) {
            return;
        }
        let handshake_done = self.conns.get(k).is_some_and(|c| {
            !c.dialect.speaks_mm()
                && !c.identified
                && matches!(&c.link, Link::Client(d)
                    if matches!(d.client().state(), ClientState::Established))
        });
        if handshake_done {
            // A JavaScript server spoke first (its all-zero message): the handshake is done,
            // and that is all the identification a JavaScript node gives.
            self.identify_by_handshake(cx, k);
        }
        self.write_conn(cx, k);
        self.check_acks(cx, k);
        let now = cx.now;
        if let Some(c) = self.conns.get_mut(k) {
            if let Link::Client(d) = &mut c.link {
                if let Err(e) = d.flush(&self.registry, now) {
                    log::debug!("connection flush failed: {e}");
                }
            }
        }
        if self.client_alive(cx, k) {
            self.reschedule_conn(k, now);
            self.check_path(cx, k);
        }
    }

    /// The delivery callbacks whose outcome is known, with it (the platform runs them).
    pub(crate) fn take_fired(&mut self) -> Vec<(DeliveryCallback, Result<(), DeliveryError>)> {
        let fired = std::mem::take(&mut self.fired);
        let mut cbs = Vec::with_capacity(fired.len());
        for (id, r) in fired {
            if let Some(cb) = self.callbacks.try_remove(id) {
                cbs.push((cb, r));
            }
        }
        cbs
    }

    /// Handles the server's events: those the last flush raised, then the new ones. Accepted
    /// and closed connections; the ones with something to read or room to write become
    /// readable and dirty.
    fn server_events(&mut self, cx: &mut Cx<'_>) {
        loop {
            let ev = match self.server_backlog.pop_front() {
                Some(ev) => ev,
                None => match self.server.poll_event() {
                    Some(ev) => ev,
                    None => return,
                },
            };
            match ev {
                ServerEvent::Accepted(id) => self.on_accept(cx, id),
                ServerEvent::Closed(id) => {
                    if let Some(k) = self.by_server.remove(&id) {
                        self.conn_lost(cx, k, "closed");
                    }
                }
                ServerEvent::Readable(id) | ServerEvent::Writable(id) => {
                    if let Some(&k) = self.by_server.get(&id) {
                        self.mark_readable(k);
                        self.mark_dirty(k);
                    }
                }
            }
        }
    }

    /// Fires the connection manager's due timers (those scheduled while firing wait for the
    /// next turn).
    fn fire_timers(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        let limit = self.timers.next_seq();
        while let Some(t) = self.timers.pop_due(now, limit) {
            match t {
                NetTimer::Conn(k) => self.conn_timer(cx, k),
                NetTimer::Retry(b) => {
                    if let Some(p) = self.peers.get_mut(&b) {
                        p.retry_timer = None;
                        self.want_peer(b);
                    }
                }
                NetTimer::Expiry(b) => self.expire_queue(b, now),
                NetTimer::Lookup(b) => self.lookup_timed_out(cx, b),
                NetTimer::OfflineRetry => {
                    self.offline_timer = None;
                    self.offline_retry(cx);
                }
                #[cfg(feature = "relay")]
                NetTimer::RelayBind => self.relay_bind_due(now),
                #[cfg(feature = "relay")]
                NetTimer::RelayWait => self.relay_wait_due(now),
                NetTimer::DialBack => self.dial_back_due(now),
                NetTimer::PortMap => self.portmap_due(now),
                NetTimer::DialBackRetry => self.dial_back_retry_due(now),
                NetTimer::MappingWait => self.mapping_wait_due(now),
                NetTimer::Interfaces => self.interfaces_due(now),
                NetTimer::FramePool => {
                    if let Some(at) = self.frames.release_due(now) {
                        self.timers.schedule(at, NetTimer::FramePool);
                    }
                }
                NetTimer::DedupFlush => {
                    self.dedup_timer = None;
                    self.next_dedup_flush = now + DEDUP_FLUSH_EVERY;
                    if !self.acks_due.is_empty() {
                        // Stored (and acknowledged) by `settle_acks` at the end of this turn.
                        self.ack_store_failed = false;
                    } else if let Err(e) = self.dedup.flush(cx.storage) {
                        log::warn!("de-duplication memory could not be stored: {e}");
                    }
                }
            }
        }
    }

    /// The lookup for peer `b` timed out (unless it was answered): a destination waiting for
    /// it fails.
    fn lookup_timed_out(&mut self, cx: &mut Cx<'_>, b: super::BoxId) {
        if !self.dir.lookup_expired(&b, cx.now) {
            return;
        }
        if !self.aliases.is_empty() {
            self.aliases.retain(|_, waiting| *waiting != b);
        }
        if self.peers.get(&b).is_some_and(|p| p.waiting_lookup) {
            self.fail_peer(cx, b, "nodeInfo lookup timed out");
        }
    }

    /// Connection `k`'s deadline: a handshake or identify that took too long, a closing
    /// connection that lingers, a keepalive; in any case a visit (the driver's timers).
    fn conn_timer(&mut self, cx: &mut Cx<'_>, k: usize) {
        let now = cx.now;
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        c.timer = None;
        let age = now.saturating_duration_since(c.opened);
        let slow = (!c.identified && age >= self.cfg.connect_timeout)
            || c.closing
                .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.dead_after);
        if slow {
            self.conn_lost(cx, k, "timed out");
            return;
        }
        if c.active
            && c.dialect.speaks_mm()
            && c.closing.is_none()
            && c.partial_pos >= c.partial.len()
            && now.saturating_duration_since(c.last_write) >= self.cfg.keepalive
        {
            c.partial.clear();
            c.partial.extend_from_slice(&self.ping);
            c.partial_pos = 0;
            c.partial_track = Track::default();
        }
        self.mark_dirty(k);
    }
}
