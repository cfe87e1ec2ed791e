//! The receiving half: frames read from connection streams (within the frame budget),
//! identify, de-duplication, scopes; and the directory messages of the bus (nodeInfo,
//! directory replies).

use super::*;

impl Core {
    /// Takes back the payload buffer of a message that has been dispatched: a large one is
    /// kept for the next large frame (see [`frame_pool`]).
    pub(in crate::platform) fn recycle_payload(&mut self, payload: Vec<u8>) {
        if payload.capacity() < frame_pool::MIN_POOLED {
            return;
        }
        let now = self.now;
        if let Some(net) = self.net.as_mut() {
            net.frames.give_scheduled(payload, now, &mut net.timers);
        }
    }

    /// Reads complete frames from connection `k` into the local queue.
    pub(super) fn read_conn(&mut self, k: usize) -> ReadOutcome {
        for _ in 0..1024 {
            // Frames already buffered first.
            loop {
                if self.queue.len() >= self.limits.local_queue {
                    return ReadOutcome::Blocked;
                }
                let Some(net) = self.net.as_mut() else {
                    return ReadOutcome::Done;
                };
                let Some(c) = net.conns.get_mut(k) else {
                    return ReadOutcome::Done;
                };
                let (frames, now) = (&mut net.frames, self.now);
                match c.reader.next_envelope_with(|len| frames.take(len, now)) {
                    Ok(Some(env)) => {
                        // A large frame's buffer, done with, goes to the spares for the next.
                        if let Some(b) = c.reader.take_idle_buffer() {
                            net.frames.give_scheduled(b, now, &mut net.timers);
                        }
                        if !self.handle_envelope(k, env) {
                            return ReadOutcome::Done;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("connection {k}: bad frame ({e}); closing it");
                        self.conn_lost(k, "protocol error");
                        return ReadOutcome::Done;
                    }
                }
            }
            // The frame in progress: beyond the floor, its whole size is reserved from the
            // frame budget before its bytes are read (no deadlock between partial frames).
            let Some(net) = self.net.as_mut() else {
                return ReadOutcome::Done;
            };
            let Some(c) = net.conns.get_mut(k) else {
                return ReadOutcome::Done;
            };
            let buffered = c.reader.buffered();
            let want = buffered
                .max(c.reader.frame_len().unwrap_or(0))
                .saturating_sub(FRAME_FLOOR);
            if want < c.reserved {
                let give = c.reserved - want;
                c.reserved = want;
                net.release_frame_bytes(give);
            } else if want > c.reserved {
                let more = want - c.reserved;
                if net.frame_used + more > net.frame_budget {
                    log::debug!("connection {k}: frame budget exhausted; reading paused");
                    if !c.budget_wait {
                        c.budget_wait = true;
                        net.budget_waiters.push(k);
                    }
                    return ReadOutcome::Starved;
                }
                c.reserved = want;
                net.frame_used += more;
                let used = net.frame_used as u64;
                self.stats.frame_bytes_peak = self.stats.frame_bytes_peak.max(used);
            }
            let Some(net) = self.net.as_mut() else {
                return ReadOutcome::Done;
            };
            let Some(c) = net.conns.get_mut(k) else {
                return ReadOutcome::Done;
            };
            if let Some(len) = c.reader.short_of() {
                // The whole frame's room at once, a spare buffer if one fits: here, once the
                // frame has been reserved above. Taken right after its header arrived, as it
                // was, a buffer cost the declared frame's memory, faulted in, on every
                // connection whatever the budget (tests/frame_budget.rs: 53 MB, now 16 MB).
                debug_assert!(len <= FRAME_FLOOR + c.reserved);
                let spare = net.frames.take(len, self.now);
                let old = c.reader.replace_buffer(spare);
                net.frames.give_scheduled(old, self.now, &mut net.timers);
            }
            let limit = (FRAME_FLOOR + c.reserved).saturating_sub(c.reader.buffered());
            let room = c.reader.room().min(READ_STEP).min(limit);
            if room == 0 {
                return ReadOutcome::Done;
            }
            let Some(stream) = stream_of(&mut net.server, &mut c.link) else {
                return ReadOutcome::Done;
            };
            // Straight from the stream's ring into the frame buffer.
            let n = c
                .reader
                .push_with(room, |buf, n| stream.read_append(buf, n));
            if n == 0 {
                if stream.peer_eof().is_some() && c.closing.is_none() {
                    // The peer winds this connection down (it lost the simultaneous-connect
                    // tie-break, or it is leaving): finish ours too.
                    stream.finish(Eof::Success);
                    c.closing = Some(self.now);
                    if c.active {
                        self.conn_lost(k, "peer closed the connection");
                    }
                }
                return ReadOutcome::Done;
            }
        }
        ReadOutcome::More
    }

    /// Handles one frame; `false` if the connection was closed.
    pub(super) fn handle_envelope(&mut self, k: usize, env: Envelope) -> bool {
        let Some(net) = self.net.as_mut() else {
            return false;
        };
        let Some(c) = net.conns.get_mut(k) else {
            return false;
        };
        c.msgs_in += 1;
        if c.compat && !c.identified {
            // An outgoing connection to a JavaScript node: data from it means its CurveCP
            // handshake is done (the server spoke), which is all the identification it gives.
            self.identify_compat(k);
            return self.handle_envelope_identified(k, env);
        }
        if !c.identified {
            let ok = env.protocol == "mm" && env.topic == "identify";
            let sign = std::str::from_utf8(&env.payload)
                .ok()
                .and_then(|s| s.parse::<SignId>().ok());
            let peer_box = c.peer_box;
            match sign {
                Some(s) if ok && self.keys.box_id(&s) == Some(peer_box) => {
                    c.peer = Some(s);
                    c.identified = true;
                    c.peer_acks = env.id.as_deref() == Some(DELIVERY_ACKS);
                    c.reader.set_max_frame(net.cfg.max_frame);
                    net.dir.learn_reverse(peer_box, s);
                    self.activate(k);
                    return true;
                }
                _ => {
                    log::debug!("connection {k}: missing or forged identify; closing it");
                    self.conn_lost(k, "identify failed");
                    return false;
                }
            }
        }
        self.handle_envelope_identified(k, env)
    }

    /// Handles one frame of an identified connection; `false` if the connection was closed.
    fn handle_envelope_identified(&mut self, k: usize, env: Envelope) -> bool {
        let Some(net) = self.net.as_mut() else {
            return false;
        };
        let Some(c) = net.conns.get_mut(k) else {
            return false;
        };
        if env.protocol == "mm" {
            // identify repeated, ping, and the reachability frames
            if env.topic == "delivered" {
                self.on_delivered(k, &env.payload);
            } else if env.topic != "identify" && env.topic != "ping" {
                self.on_mm(k, &env.topic, &env.payload);
            }
            return self.net.as_ref().is_some_and(|n| n.conns.contains(k));
        }
        // A message sent through the peer's offline buffer (16-byte id), from a peer that
        // waits for our delivery acknowledgement before it deletes its record.
        let acked = match (c.peer_acks, env.id.as_deref()) {
            (true, Some(id)) => <[u8; 16]>::try_from(id).ok(),
            _ => None,
        };
        if let Some(id) = &env.id {
            // Remembered in memory now; stored only once delivered (`message_dispatched`): an
            // id stored before its message reached the subscribers would make a crash lose it.
            // (Ids that are not 16 bytes, which no node of ours sends, are stored at once.)
            let fresh = if id.len() == 16 {
                net.dedup.seen_first_time(c.peer_box.0.as_bytes(), id)
            } else {
                net.dedup.first_time_from(c.peer_box.0.as_bytes(), id)
            };
            if !fresh {
                self.stats.duplicates += 1;
                log::debug!("duplicate message from {} dropped", c.peer_box);
                if let Some(id) = acked {
                    // Seen before: acknowledged again once its id is stored, unless the first
                    // copy still waits for its delivery (then it is acknowledged after that).
                    let b = c.peer_box;
                    if !net.ack_on_dispatch.contains(&(b, id)) {
                        net.queue_ack(b, id);
                    }
                }
                return true;
            }
            if let Some(id) = acked {
                net.ack_on_dispatch.insert((c.peer_box, id));
            }
            if net.dedup_timer.is_none() {
                let at = net.next_dedup_flush.max(self.now);
                net.dedup_timer = Some(net.timers.schedule(at, NetTimer::DedupFlush));
            }
        }
        // A JavaScript peer names itself by box key only: reported by signId once known.
        if c.peer.is_none() {
            c.peer = net.dir.reverse(&c.peer_box);
        }
        let sender = match c.peer {
            Some(s) => Address::Node(s),
            None => Address::Box(c.peer_box),
        };
        let ask = c.peer.is_none() && !std::mem::replace(&mut c.asked_sign, true);
        let peer_box = c.peer_box;
        let scope = self.circles.scope_of(&peer_box);
        let mut env = env;
        if c.compat && env.protocol == "bt" {
            // A JavaScript node's `bt` payload is a string of one character per byte.
            if let Some(bytes) = crate::envelope::js_string_to_bytes(&env.payload) {
                env.payload = bytes;
            }
        }
        let protocol: Cow<'static, str> = match env.protocol.as_str() {
            "ms" => Cow::Borrowed("ms"),
            "bt" => Cow::Borrowed("bt"),
            _ => Cow::Owned(env.protocol),
        };
        if ask {
            self.resolve_box_id(&peer_box);
        }
        self.queue.push_back(Message {
            sender,
            protocol,
            topic: env.topic,
            scope,
            payload: env.payload,
            id: env.id.as_deref().and_then(|i| i.try_into().ok()),
        });
        true
    }

    /// A message from another node was handed to its subscribers: if its sender waits for a
    /// delivery acknowledgement, that is sent once the message's id is stored.
    pub(in crate::platform) fn message_dispatched(&mut self, sender: &Address, id: MessageId) {
        let b = match sender {
            Address::Node(s) => self.keys.box_id(s),
            Address::Box(b) => Some(*b),
            Address::Local => None,
        };
        let now = self.now;
        let (Some(b), Some(net)) = (b, self.net.as_mut()) else {
            return;
        };
        // Delivered: its id may now be stored (flushed with the next batch, or at once below
        // when its sender waits for the acknowledgement).
        net.dedup.delivered(b.0.as_bytes(), &id);
        if net.dedup_timer.is_none() {
            let at = net.next_dedup_flush.max(now);
            net.dedup_timer = Some(net.timers.schedule(at, NetTimer::DedupFlush));
        }
        if net.ack_on_dispatch.remove(&(b, id)) {
            net.queue_ack(b, id);
            super::super::crash_points::reach("receiver.dispatched");
            // A turn that delivers for long (slow subscribers) stores its ids as it goes, so
            // that a crash repeats at most the last ACK_STORE_EVERY of deliveries.
            let at = Instant::now();
            if at.saturating_duration_since(net.acks_stored_at) >= ACK_STORE_EVERY {
                self.settle_acks();
            }
        }
    }

    /// Sends the delivery acknowledgements that are due, once the ids they name are stored
    /// (one write of the de-duplication memory for all of them). If storing fails, nothing is
    /// acknowledged (the senders keep their records and retry); storing is tried again at the
    /// de-duplication timer.
    pub(in crate::platform) fn settle_acks(&mut self) {
        let now = self.now;
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        if net.acks_due.is_empty() || net.ack_store_failed {
            return;
        }
        if let Err(e) = net.dedup.flush(storage) {
            log::warn!(
                "delivered message ids could not be stored ({e}): {} delivery acknowledgements held back",
                net.acks_due.len()
            );
            net.ack_store_failed = true;
            if net.dedup_timer.is_none() {
                net.dedup_timer = Some(
                    net.timers
                        .schedule(now + DEDUP_FLUSH_EVERY, NetTimer::DedupFlush),
                );
            }
            return;
        }
        net.next_dedup_flush = now + DEDUP_FLUSH_EVERY;
        net.acks_stored_at = Instant::now();
        super::super::crash_points::reach("receiver.stored");
        let mut by_peer: HashMap<BoxId, Vec<u8>> = HashMap::new();
        for (b, id) in net.acks_due.drain(..) {
            by_peer.entry(b).or_default().extend_from_slice(&id);
        }
        for (b, ids) in by_peer {
            // Only on a live connection: a sender without one retries, and its retry is
            // acknowledged as a duplicate.
            let Some(k) = net.peers.get(&b).filter(|p| p.online).and_then(|p| p.conn) else {
                continue;
            };
            let Some(p) = net.peers.get_mut(&b) else {
                continue;
            };
            // Ahead of whatever else waits for that peer (acknowledgements have no order
            // with other frames), outside the queue's message bound (they are bounded by
            // `acks_due`).
            for chunk in ids.chunks(ACKS_PER_FRAME * 16) {
                let frame = frame_of(&Envelope::new("delivered", "mm", chunk.to_vec()));
                p.queued_bytes += frame.len();
                net.queued_total += frame.len();
                p.queue.push_front(Pending {
                    frame,
                    expires: None,
                    track: Track::default(),
                });
            }
            net.mark_dirty(k);
        }
    }

    /// A `self.transports.nodeInfo` message.
    pub(crate) fn on_node_info(&mut self, payload: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        let info = match NodeInfo::from_json(&v, &mut self.keys) {
            Ok(i) => i,
            Err(e) => {
                log::debug!("nodeInfo refused: {e}");
                return false;
            }
        };
        if info.sign_id == self.identity.sign_id() {
            return true;
        }
        let now = self.now;
        let Some(net) = self.net_mut() else {
            return true;
        };
        let (b, sign) = (info.box_id, info.sign_id);
        net.learn_relay(&info, now);
        net.dir.insert(info, now);
        // A lookup for a destination key taken as a signId was answered by the node whose
        // boxId it is: its waiting messages move to that node.
        if let Some(from) = net.aliases.remove(&b) {
            if from != b {
                net.rekey_peer(from, b, now);
            }
        }
        if let Some(p) = net.peers.get_mut(&b) {
            p.sign.get_or_insert(sign);
            p.waiting_lookup = false;
            net.want_peer(b);
            self.announce(b);
        }
        true
    }

    /// A `self.directory.getReply` message: `{"key": boxId, "value": signId}`.
    pub(crate) fn on_directory_reply(&mut self, payload: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        let key: Option<BoxId> = v.get("key").and_then(|k| k.as_str()?.parse().ok());
        let value: Option<SignId> = v.get("value").and_then(|k| k.as_str()?.parse().ok());
        let (Some(b), Some(s)) = (key, value) else {
            return false;
        };
        if self.keys.box_id(&s) != Some(b) {
            log::debug!("directory.getReply refused: signId does not convert to boxId");
            return false;
        }
        if let Some(net) = self.net_mut() {
            net.dir.learn_reverse(b, s);
            if let Some(p) = net.peers.get_mut(&b) {
                p.sign.get_or_insert(s);
                self.announce(b);
            }
        }
        true
    }

    /// The signId of a box key if known; otherwise publishes `self.directory.get` (the answer,
    /// `self.directory.getReply`, is remembered).
    pub(crate) fn resolve_box_id(&mut self, b: &BoxId) -> Option<SignId> {
        let known = self.net.as_ref().and_then(|n| n.dir.reverse(b));
        if known.is_none() && self.net.is_some() {
            self.publish_local("directory.get", &serde_json::json!(b.to_string()));
        }
        known
    }

    pub(super) fn emit_peer(&mut self, topic: &str, key: impl std::fmt::Display) {
        self.publish_local(topic, &serde_json::json!(key.to_string()));
    }
}
