//! The sending half: messages queued per destination (real-time ones in memory, others in the
//! offline buffer), written into connection streams, settled when acknowledged or expired.

use super::*;

/// Frames (or what is left of one) of at least this many bytes are given to the stream whole
/// ([`Stream::write_owned`]) instead of copied into its send buffer as room appears: one copy
/// fewer of every byte of a bulk sender (with the stream's prefetch of such buffers, about 5%
/// of its CPU in `nodes_bt`), and the buffer returns to the frame pool once acknowledged.
/// Smaller frames are copied, packed together in the stream's ring.
const OWNED_FRAME: usize = 16 * 1024;

impl Core {
    /// Sends a message to another node (the remote half of [`Core::send`]).
    pub(crate) fn send_remote(
        &mut self,
        dest: Address,
        protocol: Cow<'static, str>,
        topic: String,
        payload: Vec<u8>,
        options: SendOptions,
        callback: Option<DeliveryCallback>,
    ) -> SendStatus {
        let Some((b, sign)) = self.resolve_destination(dest) else {
            return SendStatus::InvalidDestination;
        };
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else {
            return SendStatus::NoTransport;
        };
        let now = Instant::now();
        let env = Envelope {
            topic,
            protocol: protocol.into_owned(),
            payload,
            id: None,
        };
        if options.realtime {
            let frame_len = env.frame_len_without_id();
            return net.queue_realtime(b, sign, frame_len, options, callback, now, |out| {
                env.encode_frame(out);
                true
            });
        }
        let after = options
            .expire_after
            .unwrap_or(net.cfg.offline_expiry)
            .min(MAX_OFFLINE_EXPIRY);
        let expires_ms = wall_ms().saturating_add(after.as_millis() as u64);
        // The offline buffer keeps destinations by signId (what survives a restart): a node
        // known only by its boxId must become known first (its nodeInfo).
        let Some(dest) = sign else {
            return SendStatus::UnknownDestination;
        };
        let key = match net.offline.add(storage, dest, env, expires_ms) {
            Ok(k) => k,
            Err(AddError::Full) => return SendStatus::BufferFull,
            Err(AddError::Storage(e)) => {
                log::warn!("offline buffer: storing a message to {dest} failed: {e}");
                return SendStatus::StorageFailed(e.cause());
            }
        };
        if let Some(c) = callback {
            let id = net.callbacks.insert(c);
            net.offline_cbs.insert(key, id);
        }
        net.offline_retry_soon(now);
        let online = net.is_online(&b);
        let peer = net.peers.entry(b).or_default();
        peer.sign.get_or_insert(dest);
        net.clear_retry(b);
        if online {
            net.take_offline(b, &dest);
        }
        net.kick_peer(b);
        SendStatus::Queued
    }

    /// A real-time send to another node whose payload (`len` bytes) `write` appends straight
    /// into the frame ([`Core::send_encoded`]).
    pub(crate) fn send_remote_written(
        &mut self,
        dest: Address,
        protocol: &str,
        topic: &str,
        len: usize,
        options: SendOptions,
        write: &mut dyn FnMut(&mut Vec<u8>) -> bool,
    ) -> SendStatus {
        let Some((b, sign)) = self.resolve_destination(dest) else {
            return SendStatus::InvalidDestination;
        };
        let Some(net) = self.net.as_mut() else {
            return SendStatus::NoTransport;
        };
        let frame_len = Envelope::frame_len(topic.len(), protocol.len(), len);
        net.queue_realtime(b, sign, frame_len, options, None, Instant::now(), |out| {
            Envelope::encode_frame_with(topic, protocol, len, out, write)
        })
    }

    /// Whether a real-time send to the remote `dest` of a frame of `frame_len` bytes would be
    /// refused for a full peer queue (asked before a codec encodes a value, so that a refused
    /// send copies nothing).
    pub(crate) fn remote_queue_full(&mut self, dest: Address, frame_len: usize) -> bool {
        let Some((b, _)) = self.resolve_destination(dest) else {
            return false;
        };
        let Some(net) = self.net.as_ref() else {
            return false;
        };
        match net.peers.get(&b) {
            Some(peer) => queue_refuses(
                &net.cfg,
                peer.queue.len(),
                peer.queued_bytes,
                net.queued_total,
                frame_len,
            ),
            None => queue_refuses(&net.cfg, 0, 0, net.queued_total, frame_len),
        }
    }

    /// The box key and (if known) signId of a remote destination. A key given as a signId
    /// that is the box key of a node we know (its nodeInfo, a mapping, a connection or queued
    /// messages) is that node's boxId, as JavaScript nodes name each other; any other key is a
    /// signId, or a boxId when it is not a valid ed25519 key.
    fn resolve_destination(&mut self, dest: Address) -> Option<(BoxId, Option<SignId>)> {
        let known_sign = |net: Option<&Net>, b: &BoxId| {
            net.and_then(|n| {
                n.dir
                    .reverse(b)
                    .or_else(|| n.peers.get(b).and_then(|p| p.sign))
            })
        };
        match dest {
            Address::Local => None,
            Address::Box(b) => Some((b, known_sign(self.net.as_ref(), &b))),
            Address::Node(s) => {
                let as_box = BoxId(crate::crypto::BoxPublicKey(s.0 .0));
                let known_box = self
                    .net
                    .as_ref()
                    .is_some_and(|n| n.dir.knows_box(&as_box) || n.peers.contains_key(&as_box));
                if known_box {
                    return Some((as_box, known_sign(self.net.as_ref(), &as_box)));
                }
                match self.keys.box_id(&s) {
                    Some(b) => Some((b, Some(s))),
                    None => Some((as_box, None)),
                }
            }
        }
    }

    /// Registers a callback to run (with `Ok`) after the current turn's deliveries.
    pub(crate) fn fire_local(&mut self, callback: DeliveryCallback) {
        match self.net.as_mut() {
            Some(net) => {
                let id = net.callbacks.insert(callback);
                net.fired.push((id, Ok(())));
            }
            None => {
                let now = self.now;
                callback(&mut Context { core: self, now }, Ok(()));
            }
        }
    }

    /// Fails the real-time messages of peer `b` whose expiry passed; the timer moves to the
    /// next expiry.
    pub(super) fn expire_queue(&mut self, b: BoxId, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(p) = net.peers.get_mut(&b) else {
            return;
        };
        p.expiry_timer = None;
        let mut keep = VecDeque::with_capacity(p.queue.len());
        let mut next: Option<Instant> = None;
        for m in p.queue.drain(..) {
            match m.expires {
                Some(e) if e <= now => {
                    p.queued_bytes -= m.frame.len();
                    net.queued_total -= m.frame.len();
                    if let Some(cb) = m.track.cb {
                        net.fired.push((cb, Err(DeliveryError::Expired)));
                    }
                }
                e => {
                    if let Some(e) = e {
                        next = Some(next.map_or(e, |n| n.min(e)));
                    }
                    keep.push_back(m);
                }
            }
        }
        p.queue = keep;
        if let Some(e) = next {
            net.expiry_at(b, e);
        }
        net.maybe_forget(&b);
    }

    /// The offline buffer's periodic work: expired records are deleted (their callbacks
    /// fail), destinations with idle records are tried again.
    pub(super) fn offline_retry(&mut self, now: Instant) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        for (key, _) in net.offline.expire(storage, wall_ms()) {
            if let Some(cb) = net.offline_cbs.remove(&key) {
                net.fired.push((cb, Err(DeliveryError::Expired)));
            }
        }
        let dests = net.offline.idle_destinations();
        for dest in dests {
            let Some(b) = self.keys.box_id(&dest) else {
                continue;
            };
            let Some(net) = self.net.as_mut() else { return };
            self.stats.peer_visits += 1;
            let p = net.peers.entry(b).or_default();
            p.sign.get_or_insert(dest);
            if p.retry_at.is_some_and(|t| t <= now) {
                net.clear_retry(b);
            }
            net.want_peer(b);
        }
        if let Some(net) = self.net.as_mut() {
            net.offline_retry_soon(now);
        }
    }

    /// Writes the partial frame and queued messages of connection `k` into its stream.
    pub(super) fn write_conn(&mut self, k: usize, now: Instant) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        let Some(stream) = stream_of(&mut net.server, &mut c.link) else {
            return;
        };
        while let Some(v) = stream.take_spent() {
            net.frames.give_scheduled(v, now, &mut net.timers);
        }
        let mut expired = Vec::new();
        loop {
            if c.partial_pos < c.partial.len() {
                let left = c.partial.len() - c.partial_pos;
                let n = if left >= OWNED_FRAME {
                    // Handed over whole, not copied: see `OWNED_FRAME`.
                    match stream.write_owned(std::mem::take(&mut c.partial), c.partial_pos) {
                        Ok(n) => {
                            c.partial_pos = 0;
                            n
                        }
                        Err(v) => {
                            c.partial = v;
                            0
                        }
                    }
                } else {
                    let n = stream.write(&c.partial[c.partial_pos..]);
                    c.partial_pos += n;
                    n
                };
                if n > 0 {
                    c.last_write = now;
                }
                c.written += n as u64;
                if c.partial_pos < c.partial.len() {
                    break;
                }
                c.msgs_out += 1;
                if !c.partial_track.is_none() {
                    c.inflight.push_back((c.written, c.partial_track));
                }
                c.partial_track = Track::default();
            }
            if !c.active || c.closing.is_some() {
                break;
            }
            let Some(p) = net.peers.get_mut(&c.peer_box) else {
                break;
            };
            let Some(m) = p.queue.pop_front() else { break };
            p.queued_bytes -= m.frame.len();
            net.queued_total -= m.frame.len();
            if m.expires.is_some_and(|e| e <= now) {
                expired.push(m.track);
                continue;
            }
            let next = if c.compat {
                crate::envelope::frame_for_js(m.frame)
            } else {
                m.frame
            };
            let done = std::mem::replace(&mut c.partial, next);
            net.frames.give_scheduled(done, now, &mut net.timers);
            c.partial_pos = 0;
            c.partial_track = m.track;
        }
        if c.partial_pos >= c.partial.len() && c.partial.capacity() > 4096 {
            net.frames
                .give_scheduled(std::mem::take(&mut c.partial), now, &mut net.timers);
            c.partial_pos = 0;
        }
        let b = c.peer_box;
        net.queue_drained(&b);
        for t in expired {
            complete(net, storage, t, Err(DeliveryError::Expired));
        }
    }

    pub(super) fn check_acks(&mut self, k: usize) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        if c.inflight.is_empty() {
            return;
        }
        let Some(acked) = stream_ref(&net.server, &c.link).map(Stream::bytes_acked) else {
            return;
        };
        let mut done = Vec::new();
        while c.inflight.front().is_some_and(|(end, _)| *end <= acked) {
            if let Some((_, t)) = c.inflight.pop_front() {
                done.push(t);
            }
        }
        // A server-side stream reports no event for a bare acknowledgement: watch it.
        if !c.inflight.is_empty() && !c.watched && matches!(c.link, Link::Server(_)) {
            c.watched = true;
            net.watch.push(k);
        }
        let peer_acks = c.peer_acks;
        for t in done {
            match t.offline {
                // The bytes arrived; the record is deleted when the peer says the message was
                // delivered and its id stored (`mm`/`delivered`), not before.
                Some(key) if peer_acks => {
                    if net.offline.contains(&key) {
                        if let Some(c) = net.conns.get_mut(k) {
                            c.awaiting.insert(key);
                        }
                    }
                    super::super::crash_points::reach("sender.stream_acked");
                }
                _ => complete(net, storage, t, Ok(())),
            }
        }
    }

    /// An `mm`/`delivered` frame on connection `k`: the peer delivered the messages with these
    /// ids (16 bytes each) and stored their ids; their records are deleted and their callbacks
    /// succeed. Only records addressed to that peer are touched; a malformed frame (length not
    /// a multiple of 16, more than [`ACKS_PER_FRAME`] ids) is ignored whole, as are ids we do
    /// not hold (acknowledged before, or never ours).
    pub(super) fn on_delivered(&mut self, k: usize, payload: &[u8]) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        if !payload.len().is_multiple_of(16) || payload.len() > ACKS_PER_FRAME * 16 {
            log::debug!("connection {k}: malformed delivery acknowledgement ignored");
            return;
        }
        let peer = c.peer_box;
        for id in payload.chunks_exact(16) {
            let id: MessageId = id.try_into().expect("16 bytes");
            let Some((key, dest)) = net.offline.find(&id) else {
                continue;
            };
            if self.keys.box_id(&dest) != Some(peer) {
                log::debug!("connection {k}: acknowledgement of another node's message ignored");
                continue;
            }
            if let Some(c) = net.conns.get_mut(k) {
                c.awaiting.remove(&key);
            }
            super::super::crash_points::reach("sender.acked");
            let t = Track {
                cb: None,
                offline: Some(key),
            };
            complete(net, storage, t, Ok(()));
        }
    }
}

/// Settles one tracked message: offline records are deleted (delivered) or released (lost),
/// callbacks are queued with the outcome.
pub(super) fn complete(
    net: &mut Net,
    storage: &mut dyn Storage,
    t: Track,
    result: Result<(), DeliveryError>,
) {
    if let Some(key) = t.offline {
        if result.is_ok() {
            if net.offline.delivered(storage, &key) {
                net.records_delivered += 1;
            }
            if let Some(cb) = net.offline_cbs.remove(&key) {
                net.fired.push((cb, Ok(())));
            }
        } else if let Some(dest) = net.offline.release(&key) {
            // Tried again (now if the peer is still online, else when it connects).
            net.released.push(dest);
        }
    }
    if let Some(cb) = t.cb {
        net.fired.push((cb, result));
    }
}

/// Whether a destination's queue of `len` frames and `bytes` bytes refuses one more frame of
/// `frame_len` bytes: beyond [`NetConfig::peer_queue_messages`] frames, or beyond
/// [`NetConfig::peer_queue_bytes`] bytes. An empty queue takes one frame up to a maximal one
/// ([`NetConfig::max_frame`], which is what a peer with the same settings accepts) whatever the
/// byte bound, so that the bound limits what waits, not what can be sent.
/// The same holds for [`NetConfig::send_queue_bytes`] against `total`, the bytes waiting for
/// all destinations.
fn queue_refuses(
    cfg: &NetConfig,
    len: usize,
    bytes: usize,
    total: usize,
    frame_len: usize,
) -> bool {
    let bound = |queued: usize, limit: usize| {
        if queued == 0 {
            frame_len > limit.max(crate::netstring::encoded_len(cfg.max_frame))
        } else {
            queued + frame_len > limit
        }
    };
    len >= cfg.peer_queue_messages
        || bound(bytes, cfg.peer_queue_bytes)
        || bound(total, cfg.send_queue_bytes)
}

impl Net {
    /// Queues a real-time frame of `frame_len` bytes for `b`, built by `build` (which returns
    /// `false` when it cannot: nothing is queued then). Refused before the frame is built when
    /// the peer's queue is full: a refused send copies nothing.
    #[allow(clippy::too_many_arguments)]
    fn queue_realtime(
        &mut self,
        b: BoxId,
        sign: Option<SignId>,
        frame_len: usize,
        options: SendOptions,
        callback: Option<DeliveryCallback>,
        now: Instant,
        build: impl FnOnce(&mut Vec<u8>) -> bool,
    ) -> SendStatus {
        let peer = self.peers.entry(b).or_default();
        if queue_refuses(
            &self.cfg,
            peer.queue.len(),
            peer.queued_bytes,
            self.queued_total,
            frame_len,
        ) {
            return SendStatus::BufferFull;
        }
        let mut frame = self.frames.take(frame_len, now);
        if !build(&mut frame) {
            return SendStatus::EncodeFailed;
        }
        debug_assert_eq!(frame.len(), frame_len);
        if let Some(s) = sign {
            peer.sign.get_or_insert(s);
        }
        peer.queued_bytes += frame.len();
        self.queued_total += frame.len();
        let cb = callback.map(|c| self.callbacks.insert(c));
        let after = options.expire_after.unwrap_or(self.cfg.realtime_expiry);
        // `Duration::MAX` ("never") must not overflow the clock: about 136 years will do.
        let expires = now
            .checked_add(after)
            .unwrap_or_else(|| now + Duration::from_secs(1 << 32));
        peer.queue.push_back(Pending {
            frame,
            expires: Some(expires),
            track: Track { cb, offline: None },
        });
        self.clear_retry(b);
        self.expiry_at(b, expires);
        self.kick_peer(b);
        SendStatus::Queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_bound_limits_what_waits_not_what_can_be_sent() {
        let cfg = NetConfig {
            peer_queue_messages: 4,
            peer_queue_bytes: 1000,
            max_frame: 5000,
            ..NetConfig::default()
        };
        let maximal = crate::netstring::encoded_len(5000);
        // Within the bound: taken while it fits.
        assert!(!queue_refuses(&cfg, 0, 0, 0, 1000));
        assert!(!queue_refuses(&cfg, 1, 600, 600, 400));
        assert!(queue_refuses(&cfg, 1, 600, 600, 401));
        // An empty queue takes one frame up to a maximal one, and nothing after it.
        assert!(!queue_refuses(&cfg, 0, 0, 0, maximal));
        assert!(queue_refuses(&cfg, 0, 0, 0, maximal + 1));
        assert!(queue_refuses(&cfg, 1, maximal, maximal, 1));
        // The frame count bound holds either way.
        assert!(queue_refuses(&cfg, 4, 0, 0, 1));
        let none = NetConfig {
            peer_queue_messages: 0,
            ..cfg
        };
        assert!(queue_refuses(&none, 0, 0, 0, 1));
    }

    #[test]
    fn the_total_bound_holds_across_destinations() {
        let cfg = NetConfig {
            peer_queue_bytes: 1000,
            send_queue_bytes: 1500,
            max_frame: 5000,
            ..NetConfig::default()
        };
        // Another destination's 1000 bytes leave room for 500 more in all.
        assert!(!queue_refuses(&cfg, 0, 0, 1000, 500));
        assert!(queue_refuses(&cfg, 0, 0, 1000, 501));
        assert!(queue_refuses(&cfg, 1, 100, 1400, 101));
        // Nothing waiting anywhere: one maximal frame is still taken.
        let maximal = crate::netstring::encoded_len(5000);
        assert!(!queue_refuses(&cfg, 0, 0, 0, maximal));
        assert!(queue_refuses(&cfg, 0, 0, 1, maximal));
    }
}
