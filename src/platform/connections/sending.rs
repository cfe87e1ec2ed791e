//! The sending half: messages queued per destination (real-time ones in memory, others in the
//! offline buffer), written into connection streams, settled when acknowledged or expired.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::context::Cx;
use super::dialect::{Body, Dialect};
use super::{
    stream_of, stream_ref, wall_ms, Conn, DeliveryCallback, DeliveryError, Link, Net, NetConfig,
    Pending, Track, ACKS_PER_FRAME, MAX_OFFLINE_EXPIRY,
};
use crate::curvecp::stream::Stream;
use crate::envelope::Envelope;
use crate::identity::{BoxId, SignId};
use crate::offline::AddError;
use crate::platform::crash_points;
use crate::platform::{Address, MessageId, SendError, SendOptions, SendResult};
use crate::storage::Storage;
use crate::transport::ServerDriver;

/// Frames (or what is left of one) of at least this many bytes are given to the stream whole
/// ([`Stream::write_owned`]) instead of copied into its send buffer as room appears: one copy
/// fewer of every byte of a bulk sender (with the stream's prefetch of such buffers, about 5%
/// of its CPU in `nodes_bt`), and the buffer returns to the frame pool once acknowledged.
/// Smaller frames are copied, packed together in the stream's ring.
const OWNED_FRAME: usize = 16 * 1024;

/// A real-time message to queue: an envelope, or a payload its codec writes straight into the
/// frame.
enum Outgoing<'a> {
    Envelope(Envelope),
    Written {
        topic: &'a str,
        protocol: &'a str,
        len: usize,
        write: &'a mut dyn FnMut(&mut Vec<u8>) -> bool,
    },
}

impl Net {
    /// Sends a message to another node (the remote half of the platform's send). `now` is
    /// the time of the send (its expiry counts from it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_remote(
        &mut self,
        cx: &mut Cx<'_>,
        dest: Address,
        protocol: Cow<'static, str>,
        topic: String,
        payload: Vec<u8>,
        options: SendOptions,
        callback: Option<DeliveryCallback>,
        now: Instant,
    ) -> SendResult {
        let Some((b, sign)) = self.resolve_destination(cx, dest) else {
            return Err(SendError::InvalidDestination);
        };
        let env = Envelope {
            topic,
            protocol: protocol.into_owned(),
            payload,
            id: None,
        };
        if options.realtime {
            let frame_len = env.frame_len_without_id();
            let msg = Outgoing::Envelope(env);
            return self.queue_realtime(b, sign, frame_len, options, callback, now, msg);
        }
        // The offline buffer keeps destinations by signId (what survives a restart): a node
        // known only by its boxId must become known first (its nodeInfo).
        let Some(dest) = sign else {
            return Err(SendError::UnknownDestination);
        };
        self.send_offline(cx, b, dest, env, options, callback, now)
    }

    /// Stores a message for `dest` (box key `b`) in the offline buffer and has it sent.
    #[allow(clippy::too_many_arguments)]
    fn send_offline(
        &mut self,
        cx: &mut Cx<'_>,
        b: BoxId,
        dest: SignId,
        env: Envelope,
        options: SendOptions,
        callback: Option<DeliveryCallback>,
        now: Instant,
    ) -> SendResult {
        let after = options
            .expire_after
            .unwrap_or(self.cfg.offline_expiry)
            .min(MAX_OFFLINE_EXPIRY);
        let expires_ms = wall_ms().saturating_add(after.as_millis() as u64);
        let key = match self.offline.add(cx.storage, dest, env, expires_ms) {
            Ok(k) => k,
            Err(AddError::Full) => return Err(SendError::BufferFull),
            Err(AddError::Storage(e)) => {
                log::warn!("offline buffer: storing a message to {dest} failed: {e}");
                return Err(SendError::StorageFailed(e.cause()));
            }
        };
        if let Some(c) = callback {
            let id = self.callbacks.insert(c);
            self.offline_cbs.insert(key, id);
        }
        self.offline_retry_soon(now);
        let online = self.is_online(&b);
        let peer = self.peers.entry(b).or_default();
        peer.sign.get_or_insert(dest);
        self.clear_retry(b);
        if online {
            self.take_offline(b, &dest);
        }
        self.kick_peer(b);
        Ok(())
    }

    /// A real-time send to another node whose payload (`len` bytes) `write` appends straight
    /// into the frame (the platform's `send_encoded`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send_remote_written(
        &mut self,
        cx: &mut Cx<'_>,
        dest: Address,
        protocol: &str,
        topic: &str,
        len: usize,
        options: SendOptions,
        write: &mut dyn FnMut(&mut Vec<u8>) -> bool,
        now: Instant,
    ) -> SendResult {
        let Some((b, sign)) = self.resolve_destination(cx, dest) else {
            return Err(SendError::InvalidDestination);
        };
        let frame_len = Envelope::frame_len(topic.len(), protocol.len(), len);
        let msg = Outgoing::Written {
            topic,
            protocol,
            len,
            write,
        };
        self.queue_realtime(b, sign, frame_len, options, None, now, msg)
    }

    /// Whether a real-time send to the remote `dest` of a frame of `frame_len` bytes would be
    /// refused for a full peer queue (asked before a codec encodes a value, so that a refused
    /// send copies nothing).
    pub(crate) fn remote_queue_full(
        &mut self,
        cx: &mut Cx<'_>,
        dest: Address,
        frame_len: usize,
    ) -> bool {
        let Some((b, _)) = self.resolve_destination(cx, dest) else {
            return false;
        };
        let (len, bytes) = self
            .peers
            .get(&b)
            .map_or((0, 0), |p| (p.queue.len(), p.queued_bytes));
        queue_refuses(&self.cfg, len, bytes, self.queued_total, frame_len)
    }

    /// The box key and (if known) signId of a remote destination. A key given as a signId
    /// that is the box key of a node we know (its nodeInfo, a mapping, a connection or queued
    /// messages) is that node's boxId, as JavaScript nodes name each other; any other key is a
    /// signId, or a boxId when it is not a valid ed25519 key.
    fn resolve_destination(
        &mut self,
        cx: &mut Cx<'_>,
        dest: Address,
    ) -> Option<(BoxId, Option<SignId>)> {
        let known_sign = |net: &Net, b: &BoxId| {
            net.dir
                .reverse(b)
                .or_else(|| net.peers.get(b).and_then(|p| p.sign))
        };
        match dest {
            Address::Local => None,
            Address::Box(b) => Some((b, known_sign(self, &b))),
            Address::Node(s) => {
                let as_box = BoxId(crate::crypto::BoxPublicKey(s.0 .0));
                if self.dir.knows_box(&as_box) || self.peers.contains_key(&as_box) {
                    return Some((as_box, known_sign(self, &as_box)));
                }
                match cx.keys.box_id(&s) {
                    Some(b) => Some((b, Some(s))),
                    None => Some((as_box, None)),
                }
            }
        }
    }

    /// Registers a callback to run (with `Ok`) after the current turn's deliveries.
    pub(crate) fn fire_local(&mut self, callback: DeliveryCallback) {
        let id = self.callbacks.insert(callback);
        self.fired.push((id, Ok(())));
    }

    /// Fails the real-time messages of peer `b` whose expiry passed; the timer moves to the
    /// next expiry.
    pub(super) fn expire_queue(&mut self, b: BoxId, now: Instant) {
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        p.expiry_timer = None;
        let mut keep = VecDeque::with_capacity(p.queue.len());
        let mut next: Option<Instant> = None;
        for m in p.queue.drain(..) {
            match m.expires {
                Some(e) if e <= now => {
                    p.queued_bytes -= m.len;
                    self.queued_total -= m.len;
                    if let Some(cb) = m.track.cb {
                        self.fired.push((cb, Err(DeliveryError::Expired)));
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
            self.expiry_at(b, e);
        }
        self.maybe_forget(&b);
    }

    /// The offline buffer's periodic work: expired records are deleted (their callbacks
    /// fail), destinations with idle records are tried again.
    pub(super) fn offline_retry(&mut self, cx: &mut Cx<'_>) {
        let now = cx.now;
        for (key, _) in self.offline.expire(cx.storage, wall_ms()) {
            if let Some(cb) = self.offline_cbs.remove(&key) {
                self.fired.push((cb, Err(DeliveryError::Expired)));
            }
        }
        for dest in self.offline.idle_destinations() {
            let Some(b) = cx.keys.box_id(&dest) else {
                continue;
            };
            cx.stats.peer_visits += 1;
            let p = self.peers.entry(b).or_default();
            p.sign.get_or_insert(dest);
            if p.retry_at.is_some_and(|t| t <= now) {
                self.clear_retry(b);
            }
            self.want_peer(b);
        }
        self.offline_retry_soon(now);
    }

    /// Writes the partial frame and queued messages of connection `k` into its stream, each
    /// message as its connection's dialect writes it.
    pub(super) fn write_conn(&mut self, cx: &mut Cx<'_>, k: usize) {
        let now = cx.now;
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        let Some(stream) = stream_of(&mut self.server, &mut c.link) else {
            return;
        };
        while let Some(v) = stream.take_spent() {
            self.frames.give_scheduled(v, now, &mut self.timers);
        }
        let mut expired = Vec::new();
        loop {
            if c.partial_pos < c.partial.len() && !write_partial(&mut self.server, c, now) {
                break;
            }
            if !c.active || c.closing.is_some() {
                break;
            }
            let Some(p) = self.peers.get_mut(&c.peer_box) else {
                break;
            };
            let Some(m) = p.queue.pop_front() else { break };
            p.queued_bytes -= m.len;
            self.queued_total -= m.len;
            if m.expires.is_some_and(|e| e <= now) {
                expired.push(m.track);
                continue;
            }
            let next = c.dialect.bytes_of(m.body);
            let done = std::mem::replace(&mut c.partial, next);
            self.frames.give_scheduled(done, now, &mut self.timers);
            c.partial_pos = 0;
            c.partial_track = m.track;
        }
        if c.partial_pos >= c.partial.len() && c.partial.capacity() > 4096 {
            self.frames
                .give_scheduled(std::mem::take(&mut c.partial), now, &mut self.timers);
            c.partial_pos = 0;
        }
        let b = c.peer_box;
        self.queue_drained(&b);
        for t in expired {
            self.complete(cx.storage, t, Err(DeliveryError::Expired));
        }
    }

    /// Settles the tracked messages of connection `k` whose bytes its stream acknowledged.
    pub(super) fn check_acks(&mut self, cx: &mut Cx<'_>, k: usize) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        if c.inflight.is_empty() {
            return;
        }
        let Some(acked) = stream_ref(&self.server, &c.link).map(Stream::bytes_acked) else {
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
            self.watch.push(k);
        }
        let peer_acks = c.peer_acks;
        for t in done {
            match t.offline {
                // The bytes arrived; the record is deleted when the peer says the message was
                // delivered and its id stored (`mm`/`delivered`), not before.
                Some(key) if peer_acks => {
                    if self.offline.contains(&key) {
                        if let Some(c) = self.conns.get_mut(k) {
                            c.awaiting.insert(key);
                        }
                    }
                    crash_points::reach("sender.stream_acked");
                }
                _ => self.complete(cx.storage, t, Ok(())),
            }
        }
    }

    /// An `mm`/`delivered` frame on connection `k`: the peer delivered the messages with these
    /// ids (16 bytes each) and stored their ids; their records are deleted and their callbacks
    /// succeed. Only records addressed to that peer are touched; a malformed frame (length not
    /// a multiple of 16, more than [`ACKS_PER_FRAME`] ids) is ignored whole, as are ids we do
    /// not hold (acknowledged before, or never ours).
    pub(super) fn on_delivered(&mut self, cx: &mut Cx<'_>, k: usize, payload: &[u8]) {
        let Some(c) = self.conns.get(k) else {
            return;
        };
        if !payload.len().is_multiple_of(16) || payload.len() > ACKS_PER_FRAME * 16 {
            log::debug!("connection {k}: malformed delivery acknowledgement ignored");
            return;
        }
        let peer = c.peer_box;
        for id in payload.chunks_exact(16) {
            let id: MessageId = id.try_into().expect("16 bytes");
            let Some((key, dest)) = self.offline.find(&id) else {
                continue;
            };
            if cx.keys.box_id(&dest) != Some(peer) {
                log::debug!("connection {k}: acknowledgement of another node's message ignored");
                continue;
            }
            if let Some(c) = self.conns.get_mut(k) {
                c.awaiting.remove(&key);
            }
            crash_points::reach("sender.acked");
            let t = Track {
                cb: None,
                offline: Some(key),
            };
            self.complete(cx.storage, t, Ok(()));
        }
    }

    /// Settles one tracked message: offline records are deleted (delivered) or released
    /// (lost), callbacks are queued with the outcome.
    pub(super) fn complete(
        &mut self,
        storage: &mut dyn Storage,
        t: Track,
        result: Result<(), DeliveryError>,
    ) {
        if let Some(key) = t.offline {
            if result.is_ok() {
                if self.offline.delivered(storage, &key) {
                    self.records_delivered += 1;
                }
                if let Some(cb) = self.offline_cbs.remove(&key) {
                    self.fired.push((cb, Ok(())));
                }
            } else if let Some(dest) = self.offline.release(&key) {
                // Tried again (now if the peer is still online, else when it connects).
                self.released.push(dest);
            }
        }
        if let Some(cb) = t.cb {
            self.fired.push((cb, result));
        }
    }

    /// Queues a real-time message for `b` (its frame about `frame_len` bytes), encoded for the
    /// peer's dialect when that is known, else kept as an envelope until a connection writes
    /// it. Refused before anything is encoded when the peer's queue is full: a refused send
    /// copies nothing.
    #[allow(clippy::too_many_arguments)]
    fn queue_realtime(
        &mut self,
        b: BoxId,
        sign: Option<SignId>,
        frame_len: usize,
        options: SendOptions,
        callback: Option<DeliveryCallback>,
        now: Instant,
        msg: Outgoing<'_>,
    ) -> SendResult {
        let peer = self.peers.entry(b).or_default();
        if queue_refuses(
            &self.cfg,
            peer.queue.len(),
            peer.queued_bytes,
            self.queued_total,
            frame_len,
        ) {
            return Err(SendError::BufferFull);
        }
        let (body, len) = match (peer.dialect, msg) {
            (None, Outgoing::Envelope(env)) => (Body::Message(env), frame_len),
            (Some(d), Outgoing::Envelope(env)) => {
                let frame = d.frame_of(&env);
                let len = frame.len();
                (Body::Frame(frame, d), len)
            }
            (
                dialect,
                Outgoing::Written {
                    topic,
                    protocol,
                    len,
                    write,
                },
            ) => {
                // Before the peer's dialect is known, a written frame is a native one.
                let d = dialect.unwrap_or(Dialect::Native);
                let mut frame = self.frames.take(frame_len, now);
                if !d.encode_with(topic, protocol, len, &mut frame, write) {
                    return Err(SendError::EncodeFailed);
                }
                let len = frame.len();
                (Body::Frame(frame, d), len)
            }
        };
        if let Some(s) = sign {
            peer.sign.get_or_insert(s);
        }
        peer.queued_bytes += len;
        self.queued_total += len;
        let cb = callback.map(|c| self.callbacks.insert(c));
        let after = options.expire_after.unwrap_or(self.cfg.realtime_expiry);
        // `Duration::MAX` ("never") must not overflow the clock: about 136 years will do.
        let expires = now
            .checked_add(after)
            .unwrap_or_else(|| now + Duration::from_secs(1 << 32));
        peer.queue.push_back(Pending {
            body,
            len,
            expires: Some(expires),
            track: Track { cb, offline: None },
        });
        self.clear_retry(b);
        self.expiry_at(b, expires);
        self.kick_peer(b);
        Ok(())
    }
}

/// Writes what it can of connection `c`'s partial frame into its stream; `true` once the
/// whole frame is written (its tracked message then waits for the stream's acknowledgement).
fn write_partial(server: &mut ServerDriver, c: &mut Conn, now: Instant) -> bool {
    let Some(stream) = stream_of(server, &mut c.link) else {
        return false;
    };
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
        return false;
    }
    c.msgs_out += 1;
    if !c.partial_track.is_none() {
        c.inflight.push_back((c.written, c.partial_track));
    }
    c.partial_track = Track::default();
    true
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
