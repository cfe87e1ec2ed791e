//! The receiving half: frames read from connection streams (within the frame budget),
//! identify, de-duplication, scopes; delivery acknowledgements of what was dispatched; and the
//! directory messages of the bus (nodeInfo, directory replies).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Instant;

use super::context::Cx;
use super::dialect::Dialect;
use super::{
    frame_pool, mm_frame, stream_of, Net, NetTimer, Pending, ReadOutcome, Track, ACKS_PER_FRAME,
    ACK_STORE_EVERY, DEDUP_FLUSH_EVERY, DELIVERY_ACKS, FRAME_FLOOR, READ_STEP,
};
use crate::curvecp::stream::Eof;
use crate::envelope::Envelope;
use crate::identity::{BoxId, KeyCache, SignId};
use crate::platform::crash_points;
use crate::platform::directory::NodeInfo;
use crate::platform::{Address, Message, MessageId};

/// Parses a `self.transports.nodeInfo` payload (checked: its boxId must be its signId's
/// conversion); `None` if it is refused.
pub(crate) fn parse_node_info(payload: &[u8], keys: &mut KeyCache) -> Option<NodeInfo> {
    let v = serde_json::from_slice::<serde_json::Value>(payload).ok()?;
    match NodeInfo::from_json(&v, keys) {
        Ok(i) => Some(i),
        Err(e) => {
            log::debug!("nodeInfo refused: {e}");
            None
        }
    }
}

/// Parses a `self.directory.getReply` payload, `{"key": boxId, "value": signId}` (checked:
/// the signId must convert to the boxId); `None` if it is refused.
pub(crate) fn parse_directory_reply(
    payload: &[u8],
    keys: &mut KeyCache,
) -> Option<(BoxId, SignId)> {
    let v = serde_json::from_slice::<serde_json::Value>(payload).ok()?;
    let key: Option<BoxId> = v.get("key").and_then(|k| k.as_str()?.parse().ok());
    let value: Option<SignId> = v.get("value").and_then(|k| k.as_str()?.parse().ok());
    let (b, s) = (key?, value?);
    if keys.box_id(&s) != Some(b) {
        log::debug!("directory.getReply refused: signId does not convert to boxId");
        return None;
    }
    Some((b, s))
}

/// How one step of reading a connection's stream ended.
enum Step {
    /// Bytes moved into the frame reader: look for frames again.
    Read,
    /// Stop here, with this outcome.
    Stop(ReadOutcome),
}

impl Net {
    /// Takes back the payload buffer of a message that has been dispatched: a large one is
    /// kept for the next large frame (see [`frame_pool`]).
    pub(crate) fn recycle_payload(&mut self, payload: Vec<u8>, now: Instant) {
        if payload.capacity() < frame_pool::MIN_POOLED {
            return;
        }
        self.frames.give_scheduled(payload, now, &mut self.timers);
    }

    /// Reads complete frames from connection `k` into the local queue: the frames already
    /// buffered, then more of its stream, at most 1,024 steps.
    pub(super) fn read_conn(&mut self, cx: &mut Cx<'_>, k: usize) -> ReadOutcome {
        for _ in 0..1024 {
            if let Some(stop) = self.take_frames(cx, k) {
                return stop;
            }
            match self.read_step(cx, k) {
                Step::Read => {}
                Step::Stop(outcome) => return outcome,
            }
        }
        ReadOutcome::More
    }

    /// Hands connection `k`'s buffered complete frames on; `Some` when reading must stop.
    fn take_frames(&mut self, cx: &mut Cx<'_>, k: usize) -> Option<ReadOutcome> {
        let now = cx.now;
        loop {
            if cx.queue_full() {
                return Some(ReadOutcome::Blocked);
            }
            let c = self.conns.get_mut(k)?;
            let frames = &mut self.frames;
            match c.reader.next_envelope_with(|len| frames.take(len, now)) {
                Ok(Some(env)) => {
                    // A large frame's buffer, done with, goes to the spares for the next.
                    if let Some(b) = c.reader.take_idle_buffer() {
                        self.frames.give_scheduled(b, now, &mut self.timers);
                    }
                    if !self.handle_envelope(cx, k, env) {
                        return Some(ReadOutcome::Done);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    log::debug!("connection {k}: bad frame ({e}); closing it");
                    self.conn_lost(cx, k, "protocol error");
                    return Some(ReadOutcome::Done);
                }
            }
        }
    }

    /// Moves the next bytes of connection `k`'s stream into its frame reader: beyond the
    /// floor, the frame in progress has its whole size reserved from the frame budget first
    /// (no deadlock between partial frames).
    fn read_step(&mut self, cx: &mut Cx<'_>, k: usize) -> Step {
        if let Some(stop) = self.reserve_frame(cx, k) {
            return Step::Stop(stop);
        }
        let now = cx.now;
        let Some(c) = self.conns.get_mut(k) else {
            return Step::Stop(ReadOutcome::Done);
        };
        if let Some(len) = c.reader.short_of() {
            // The whole frame's room at once, a spare buffer if one fits: here, once the
            // frame has been reserved above. Taken right after its header arrived, as it
            // was, a buffer cost the declared frame's memory, faulted in, on every
            // connection whatever the budget (tests/frame_budget.rs: 53 MB, now 16 MB).
            debug_assert!(len <= FRAME_FLOOR + c.reserved);
            let spare = self.frames.take(len, now);
            let old = c.reader.replace_buffer(spare);
            self.frames.give_scheduled(old, now, &mut self.timers);
        }
        let limit = (FRAME_FLOOR + c.reserved).saturating_sub(c.reader.buffered());
        let room = c.reader.room().min(READ_STEP).min(limit);
        if room == 0 {
            return Step::Stop(ReadOutcome::Done);
        }
        let Some(stream) = stream_of(&mut self.server, &mut c.link) else {
            return Step::Stop(ReadOutcome::Done);
        };
        // Straight from the stream's ring into the frame buffer.
        let n = c
            .reader
            .push_with(room, |buf, n| stream.read_append(buf, n));
        if n > 0 {
            return Step::Read;
        }
        if stream.peer_eof().is_some() && c.closing.is_none() {
            // The peer winds this connection down (it lost the simultaneous-connect
            // tie-break, or it is leaving): finish ours too.
            stream.finish(Eof::Success);
            c.closing = Some(now);
            if c.active {
                self.conn_lost(cx, k, "peer closed the connection");
            }
        }
        Step::Stop(ReadOutcome::Done)
    }

    /// Reserves (or gives back) the frame budget the frame in progress on connection `k`
    /// needs beyond the floor; `Some(Starved)` if it does not fit (the connection waits in
    /// `budget_waiters`).
    fn reserve_frame(&mut self, cx: &mut Cx<'_>, k: usize) -> Option<ReadOutcome> {
        let Some(c) = self.conns.get_mut(k) else {
            return Some(ReadOutcome::Done);
        };
        let want = c
            .reader
            .buffered()
            .max(c.reader.frame_len().unwrap_or(0))
            .saturating_sub(FRAME_FLOOR);
        if want < c.reserved {
            let give = c.reserved - want;
            c.reserved = want;
            self.release_frame_bytes(give);
        } else if want > c.reserved {
            let more = want - c.reserved;
            if self.frame_used + more > self.frame_budget {
                log::debug!("connection {k}: frame budget exhausted; reading paused");
                if !c.budget_wait {
                    c.budget_wait = true;
                    self.budget_waiters.push(k);
                }
                return Some(ReadOutcome::Starved);
            }
            c.reserved = want;
            self.frame_used += more;
            let used = self.frame_used as u64;
            cx.stats.frame_bytes_peak = cx.stats.frame_bytes_peak.max(used);
        }
        None
    }

    /// Handles one frame; `false` if the connection was closed.
    fn handle_envelope(&mut self, cx: &mut Cx<'_>, k: usize, env: Envelope) -> bool {
        let Some(c) = self.conns.get_mut(k) else {
            return false;
        };
        c.msgs_in += 1;
        if c.identified {
            return self.handle_identified(cx, k, env);
        }
        if !c.dialect.speaks_mm() {
            // An outgoing connection to a JavaScript node: data from it means its CurveCP
            // handshake is done (the server spoke), which is all the identification it gives.
            self.identify_by_handshake(cx, k);
            return self.handle_identified(cx, k, env);
        }
        let ok = env.protocol == "mm" && env.topic == "identify";
        let sign = std::str::from_utf8(&env.payload)
            .ok()
            .and_then(|s| s.parse::<SignId>().ok());
        let peer_box = c.peer_box;
        match sign {
            Some(s) if ok && cx.keys.box_id(&s) == Some(peer_box) => {
                c.peer = Some(s);
                c.identified = true;
                c.peer_acks = env.id.as_deref() == Some(DELIVERY_ACKS);
                c.reader.set_max_frame(self.cfg.max_frame);
                self.dir.learn_reverse(peer_box, s);
                self.activate(cx, k);
                true
            }
            _ => {
                log::debug!("connection {k}: missing or forged identify; closing it");
                self.conn_lost(cx, k, "identify failed");
                false
            }
        }
    }

    /// Handles one frame of an identified connection; `false` if the connection was closed.
    fn handle_identified(&mut self, cx: &mut Cx<'_>, k: usize, env: Envelope) -> bool {
        if env.protocol == "mm" {
            // identify repeated, ping, and the reachability frames
            if env.topic == "delivered" {
                self.on_delivered(cx, k, &env.payload);
            } else if env.topic != "identify" && env.topic != "ping" {
                self.on_mm(cx, k, &env.topic, &env.payload);
            }
            return self.conns.contains(k);
        }
        if env.id.is_some() && !self.first_time(cx, k, env.id.as_deref()) {
            return true;
        }
        let Some(c) = self.conns.get_mut(k) else {
            return false;
        };
        // A JavaScript peer names itself by box key only: reported by signId once known.
        if c.peer.is_none() {
            c.peer = self.dir.reverse(&c.peer_box);
        }
        let sender = match c.peer {
            Some(s) => Address::Node(s),
            None => Address::Box(c.peer_box),
        };
        let ask = c.peer.is_none() && !std::mem::replace(&mut c.asked_sign, true);
        let (peer_box, dialect) = (c.peer_box, c.dialect);
        let scope = cx.circles.scope_of(&peer_box);
        let payload = dialect.payload_in(&env.protocol, env.payload);
        let protocol: Cow<'static, str> = match env.protocol.as_str() {
            "ms" => Cow::Borrowed("ms"),
            "bt" => Cow::Borrowed("bt"),
            _ => Cow::Owned(env.protocol),
        };
        if ask {
            self.resolve_box_id(cx, &peer_box);
        }
        cx.deliver(Message {
            sender,
            protocol,
            topic: env.topic,
            scope,
            payload,
            id: env.id.as_deref().and_then(|i| i.try_into().ok()),
        });
        true
    }

    /// Whether a message with id `id` from connection `k`'s peer is new (a duplicate is
    /// counted, dropped, and acknowledged again if its sender waits for that). A new one is
    /// remembered in memory now and stored only once delivered (`message_dispatched`): an id
    /// stored before its message reached the subscribers would make a crash lose it. (Ids that
    /// are not 16 bytes, which no node of ours sends, are stored at once.)
    fn first_time(&mut self, cx: &mut Cx<'_>, k: usize, id: Option<&[u8]>) -> bool {
        let (Some(c), Some(id)) = (self.conns.get(k), id) else {
            return true;
        };
        let b = c.peer_box;
        // A message sent through the peer's offline buffer (16-byte id), from a peer that
        // waits for our delivery acknowledgement before it deletes its record.
        let acked = if c.peer_acks {
            <[u8; 16]>::try_from(id).ok()
        } else {
            None
        };
        let fresh = if id.len() == 16 {
            self.dedup.seen_first_time(b.0.as_bytes(), id)
        } else {
            self.dedup.first_time_from(b.0.as_bytes(), id)
        };
        if !fresh {
            cx.stats.duplicates += 1;
            log::debug!("duplicate message from {b} dropped");
            if let Some(id) = acked {
                // Seen before: acknowledged again once its id is stored, unless the first
                // copy still waits for its delivery (then it is acknowledged after that).
                if !self.ack_on_dispatch.contains(&(b, id)) {
                    self.queue_ack(b, id);
                }
            }
            return false;
        }
        if let Some(id) = acked {
            self.ack_on_dispatch.insert((b, id));
        }
        self.dedup_flush_soon(cx.now);
        true
    }

    /// Schedules the de-duplication memory's next write (if none is).
    fn dedup_flush_soon(&mut self, now: Instant) {
        if self.dedup_timer.is_none() {
            let at = self.next_dedup_flush.max(now);
            self.dedup_timer = Some(self.timers.schedule(at, NetTimer::DedupFlush));
        }
    }

    /// A message from another node (box key `b`) was handed to its subscribers: if its sender
    /// waits for a delivery acknowledgement, that is sent once the message's id is stored.
    /// `clock` is the time now (a turn that delivers for long stores its ids as it goes).
    pub(crate) fn message_dispatched(
        &mut self,
        cx: &mut Cx<'_>,
        b: BoxId,
        id: MessageId,
        clock: Instant,
    ) {
        // Delivered: its id may now be stored (flushed with the next batch, or at once below
        // when its sender waits for the acknowledgement).
        self.dedup.delivered(b.0.as_bytes(), &id);
        self.dedup_flush_soon(cx.now);
        if self.ack_on_dispatch.remove(&(b, id)) {
            self.queue_ack(b, id);
            crash_points::reach("receiver.dispatched");
            // A turn that delivers for long (slow subscribers) stores its ids as it goes, so
            // that a crash repeats at most the last ACK_STORE_EVERY of deliveries.
            if clock.saturating_duration_since(self.acks_stored_at) >= ACK_STORE_EVERY {
                self.settle_acks(cx, clock);
            }
        }
    }

    /// Sends the delivery acknowledgements that are due, once the ids they name are stored
    /// (one write of the de-duplication memory for all of them). If storing fails, nothing is
    /// acknowledged (the senders keep their records and retry); storing is tried again at the
    /// de-duplication timer. `clock` is the time now.
    pub(crate) fn settle_acks(&mut self, cx: &mut Cx<'_>, clock: Instant) {
        let now = cx.now;
        if self.acks_due.is_empty() || self.ack_store_failed {
            return;
        }
        if let Err(e) = self.dedup.flush(cx.storage) {
            log::warn!(
                "delivered message ids could not be stored ({e}): {} delivery acknowledgements held back",
                self.acks_due.len()
            );
            self.ack_store_failed = true;
            if self.dedup_timer.is_none() {
                let at = now + DEDUP_FLUSH_EVERY;
                self.dedup_timer = Some(self.timers.schedule(at, NetTimer::DedupFlush));
            }
            return;
        }
        self.next_dedup_flush = now + DEDUP_FLUSH_EVERY;
        self.acks_stored_at = clock;
        crash_points::reach("receiver.stored");
        let mut by_peer: HashMap<BoxId, Vec<u8>> = HashMap::new();
        for (b, id) in self.acks_due.drain(..) {
            by_peer.entry(b).or_default().extend_from_slice(&id);
        }
        for (b, ids) in by_peer {
            self.queue_delivered(b, &ids);
        }
    }

    /// Queues `mm`/`delivered` frames naming `ids` for peer `b`, on a live connection only: a
    /// sender without one retries, and its retry is acknowledged as a duplicate. They go ahead
    /// of whatever else waits for that peer (acknowledgements have no order with other
    /// frames), outside the queue's message bound (they are bounded by `acks_due`).
    fn queue_delivered(&mut self, b: BoxId, ids: &[u8]) {
        let Some(k) = self.peers.get(&b).filter(|p| p.online).and_then(|p| p.conn) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        for chunk in ids.chunks(ACKS_PER_FRAME * 16) {
            let frame = mm_frame("delivered", chunk.to_vec());
            p.queued_bytes += frame.len();
            self.queued_total += frame.len();
            let pending = Pending::frame(frame, Dialect::Native, None, Track::default());
            p.queue.push_front(pending);
        }
        self.mark_dirty(k);
    }

    /// A checked nodeInfo of another node arrived on the bus: cached, a relay candidate, and
    /// the peer waiting for it (or for the destination key it answers) may connect.
    pub(crate) fn learn_node_info(&mut self, cx: &mut Cx<'_>, info: NodeInfo) {
        let now = cx.now;
        let (b, sign) = (info.box_id, info.sign_id);
        self.learn_relay(&info, now);
        self.dir.insert(info, now);
        // A lookup for a destination key taken as a signId was answered by the node whose
        // boxId it is: its waiting messages move to that node.
        if let Some(from) = self.aliases.remove(&b) {
            if from != b {
                self.rekey_peer(from, b, now);
            }
        }
        if let Some(p) = self.peers.get_mut(&b) {
            p.sign.get_or_insert(sign);
            p.waiting_lookup = false;
            self.want_peer(b);
            self.announce(cx, b);
        }
    }

    /// A checked directory reply: box key `b` is the node `s`.
    pub(crate) fn learn_reverse(&mut self, cx: &mut Cx<'_>, b: BoxId, s: SignId) {
        self.dir.learn_reverse(b, s);
        if let Some(p) = self.peers.get_mut(&b) {
            p.sign.get_or_insert(s);
            self.announce(cx, b);
        }
    }

    /// The signId of a box key if known; otherwise publishes `self.directory.get` (the answer,
    /// `self.directory.getReply`, is remembered).
    pub(crate) fn resolve_box_id(&mut self, cx: &mut Cx<'_>, b: &BoxId) -> Option<SignId> {
        let known = self.dir.reverse(b);
        if known.is_none() {
            cx.publish("directory.get", b);
        }
        known
    }
}
