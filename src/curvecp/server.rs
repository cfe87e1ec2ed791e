//! The CurveCP server crypto layer (docs/ARCHITECTURE.md §4.1), sans-IO.
//!
//! A [`Server`] answers Hellos statelessly (a fresh S'/s' per Hello, sealed with C' into a
//! cookie under the current minute key; the Cookie is the immediate reply of
//! [`Server::handle_packet`], nothing is kept), and creates a connection only for a valid
//! Initiate: cookie under the current or previous minute key, cookie C' equal to the packet's
//! C', the box, the server name, the vouch, then the optional `accept_client` policy. Client
//! Initiates and Messages of a connection must carry strictly increasing nonces (checked before
//! decryption, stored after the box opens). Every invalid packet is dropped silently (logged
//! at debug level) and changes no state.
//!
//! Connections live in a slab indexed by a generation-checked [`ConnectionId`] and in a map
//! keyed by the client short-term key C'. Nothing scans all connections: connections with
//! something to send sit in a queue, and deadlines sit in a timer heap (with lazy
//! invalidation: an entry counts only if it still equals the connection's current deadline).
//!
//! Connection end:
//! - when the stream is done (both EOFs acknowledged) the connection lingers for
//!   [`Server::set_linger`] (default 4 s) to acknowledge a retransmission of the peer's last
//!   block again, then is removed;
//! - when the stream fails, at once;
//! - when no valid packet has come from the client for [`Server::set_idle_timeout`]
//!   (default 180 s);
//! - when the application calls [`Server::remove`].
//!
//! Replay protection (better than the reference, docs/ARCHITECTURE.md §8): the C' of every ended
//! connection is remembered until every cookie that could carry it has expired (at most 120 s,
//! computed from the minute-key schedule), and an Initiate for such a C' is refused. The set is
//! bounded ([`Server::set_replay_capacity`], default 65536). When it is full, both minute keys
//! are replaced at once, which kills every outstanding cookie, so the set can be emptied
//! without opening a replay window; the cost is that clients between their Cookie and their
//! Initiate must start again with a Hello.
//!
//! Strictness: a Hello whose padding (bytes 72..136) or boxed zeros are not all zero is
//! dropped (the reference answers it; honest clients always send zeros). Replies of a
//! connection go to the path of the Initiate that created it (like the reference), unless the
//! application allows roaming ([`Server::set_roaming`]).
//!
//! Events ([`ServerEvent`]) are coalesced: at most one pending `Readable` and one pending
//! `Writable` per connection, plus `Accepted` and `Closed`. The queue is capped at
//! `4 * max_connections + 1024` entries; events beyond are dropped (counted in
//! [`ServerStats::events_dropped`]), so an application must call [`Server::poll_event`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::cookie::{MinuteKeys, MINUTE};
use super::packet::{
    build_cookie, counter_nonce, long_nonce, parse_client_packet, seal_server_message,
    ClientPacket, ServerName, CLIENT_MESSAGE_NONCE, COOKIE_LEN, COOKIE_PACKET_LEN, HELLO_NONCE,
    INITIATE_NONCE, SERVER_MESSAGE_NONCE, SERVER_MESSAGE_OFFSET, VOUCH_NONCE,
};
use super::stream::{Stream, StreamConfig};
use super::{Extension, MAX_MESSAGE, MAX_PACKET};
use crate::crypto::{
    random_below, random_bytes, wipe, BoxKeyPair, BoxPublicKey, SharedKey, KEY_LEN, TAG_LEN,
};

/// Default for [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default linger time after a stream is done.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(4);
/// Default idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// Clients' long-term vouch keys a server keeps precomputed.
const VOUCH_KEY_CACHE: usize = 256;
/// Default capacity of the ended-connection (replay) set.
pub const DEFAULT_REPLAY_CAPACITY: usize = 65536;

/// A check of a client's long-term key C: `true` accepts the client.
pub type ClientPolicy = Arc<dyn Fn(&BoxPublicKey) -> bool + Send + Sync>;

/// Settings of a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// The long-term key pair S.
    pub keypair: BoxKeyPair,
    /// The name clients must use.
    pub name: ServerName,
    /// The server extension; packets with another are ignored.
    pub extension: Extension,
    /// Most connections at once; Initiates beyond it are dropped.
    pub max_connections: usize,
    /// Accept only clients whose long-term key passes this check (all when `None`).
    pub accept_client: Option<ClientPolicy>,
    /// The stream settings of each connection (`initial_ping` false, `initial_block` 1024).
    pub stream: StreamConfig,
}

impl ServerConfig {
    /// Settings with the given key pair: the empty name, the zero extension,
    /// [`DEFAULT_MAX_CONNECTIONS`], every client accepted, [`StreamConfig::server`].
    pub fn new(keypair: BoxKeyPair) -> ServerConfig {
        ServerConfig::with_stream(keypair, StreamConfig::server())
    }

    /// Settings with the given key pair and stream settings: the empty name, the zero
    /// extension, [`DEFAULT_MAX_CONNECTIONS`], every client accepted.
    pub fn with_stream(keypair: BoxKeyPair, stream: StreamConfig) -> ServerConfig {
        ServerConfig {
            keypair,
            name: ServerName::empty(),
            extension: [0; 16],
            max_connections: DEFAULT_MAX_CONNECTIONS,
            accept_client: None,
            stream,
        }
    }
}

/// Names one connection of a [`Server`] (stale ids are detected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    index: usize,
    generation: u64,
}

/// What happened on a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// A valid Initiate created this connection.
    Accepted(ConnectionId),
    /// The connection's stream has bytes or an EOF to read.
    Readable(ConnectionId),
    /// The stream has room for more bytes after being full.
    Writable(ConnectionId),
    /// The connection is gone (finished, failed or removed); its id is now stale.
    Closed(ConnectionId),
}

/// Counters of a server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Cookies sent (valid Hellos).
    pub cookies_sent: u64,
    /// Connections created.
    pub accepted: u64,
    /// Packets dropped for any reason.
    pub dropped: u64,
    /// Initiates refused because their C' belongs to an ended connection.
    pub replays_refused: u64,
    /// Initiates refused because the table was full.
    pub table_full: u64,
    /// Initiates refused by `accept_client`.
    pub policy_refused: u64,
    /// Events dropped because the event queue was full.
    pub events_dropped: u64,
    /// Connections moved to another path by an authenticated Message (roaming).
    pub roamed: u64,
    /// Connections removed.
    pub closed: u64,
}

/// Sizes of the server's internal queues and tables (to check that memory stays flat).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerQueues {
    /// Connections in the table.
    pub connections: usize,
    /// Entries in the send queue.
    pub send_queue: usize,
    /// Entries in the timer heap (including stale ones).
    pub timers: usize,
    /// Pending events.
    pub events: usize,
    /// Remembered C' of ended connections.
    pub ended: usize,
}

struct Conn<A> {
    generation: u64,
    client_short: [u8; KEY_LEN],
    client_long: BoxPublicKey,
    client_extension: Extension,
    /// beforenm(C', s').
    key: SharedKey,
    path: A,
    last_client_nonce: u64,
    server_nonce: u64,
    stream: Stream,
    queued: bool,
    timer: Option<Instant>,
    last_activity: Instant,
    linger_until: Option<Instant>,
    readable_pending: bool,
    writable_pending: bool,
}

/// A CurveCP server, generic over the path a packet came on (`SocketAddr` for UDP, a
/// connection token for TCP).
pub struct Server<A> {
    config: ServerConfig,
    minute: MinuteKeys,
    conns: Slab<Conn<A>>,
    by_key: HashMap<[u8; KEY_LEN], usize>,
    next_generation: u64,
    send_queue: VecDeque<(usize, u64)>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    events: VecDeque<ServerEvent>,
    ended: HashMap<[u8; KEY_LEN], Instant>,
    ended_order: VecDeque<([u8; KEY_LEN], Instant)>,
    replay_capacity: usize,
    idle_timeout: Duration,
    linger: Duration,
    last_now: Instant,
    scratch: Box<[u8]>,
    /// beforenm(C, s) of recent clients' long-term keys (a reconnecting client's vouch then
    /// costs no scalar multiplication).
    vouch_keys: HashMap<[u8; KEY_LEN], SharedKey>,
    stats: ServerStats,
    /// Which path changes an authenticated client Message may make (`None`: none).
    roam: Option<fn(&A, &A) -> bool>,
    /// Burst cap of a connection's stream, by path ([`Server::set_path_burst`]).
    path_burst: Option<fn(&A) -> Option<u32>>,
}

impl<A: Copy + Eq + Hash + Debug> Server<A> {
    /// A new server; the minute keys rotate from `now`.
    pub fn new(config: ServerConfig, now: Instant) -> Server<A> {
        Server {
            minute: MinuteKeys::new(now),
            conns: Slab::new(),
            by_key: HashMap::new(),
            next_generation: 1,
            send_queue: VecDeque::new(),
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            linger: DEFAULT_LINGER,
            last_now: now,
            scratch: vec![0u8; MAX_PACKET].into_boxed_slice(),
            vouch_keys: HashMap::new(),
            stats: ServerStats::default(),
            roam: None,
            path_burst: None,
            config,
        }
    }

    /// Sets how long a finished connection stays to re-acknowledge the peer's last block.
    pub fn set_linger(&mut self, linger: Duration) {
        self.linger = linger;
    }

    /// Sets after how long without a valid packet from its client a connection is removed.
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle_timeout = idle;
    }

    /// Lets clients change address (curvecp.org's roaming): an authenticated Message (box
    /// opened, nonce above every earlier one) that comes on another path moves the connection's
    /// replies there when `allow(old, new)` says so. Off by default (like the reference).
    pub fn set_roaming(&mut self, allow: fn(&A, &A) -> bool) {
        self.roam = Some(allow);
    }

    /// Caps the burst of each connection's stream by the path it replies on
    /// ([`Stream::set_max_burst`]; `None`: no cap), when the connection is created and when it
    /// roams.
    pub fn set_path_burst(&mut self, burst: fn(&A) -> Option<u32>) {
        self.path_burst = Some(burst);
    }

    /// Sets how many ended connections' C' are remembered (at least 1).
    pub fn set_replay_capacity(&mut self, capacity: usize) {
        self.replay_capacity = capacity.max(1);
    }

    fn event_cap(&self) -> usize {
        4 * self.config.max_connections + 1024
    }

    fn push_event(&mut self, ev: ServerEvent) {
        if self.events.len() >= self.event_cap() {
            self.stats.events_dropped += 1;
            log::debug!("curvecp server: event queue full, {ev:?} dropped");
        } else {
            self.events.push_back(ev);
        }
    }

    fn drop_packet(&mut self, why: &'static str) -> Option<usize> {
        self.stats.dropped += 1;
        log::debug!("curvecp server: dropped packet: {why}");
        None
    }

    fn advance(&mut self, now: Instant) {
        if now > self.last_now {
            self.last_now = now;
        }
        self.minute.rotate_if_due(now);
        while let Some(&(key, forget_at)) = self.ended_order.front() {
            if forget_at > now {
                break;
            }
            self.ended_order.pop_front();
            if self.ended.get(&key) == Some(&forget_at) {
                self.ended.remove(&key);
            }
        }
    }

    /// Feeds one packet from `from`. Returns the length of an immediate reply written into
    /// `reply` (a Cookie, to be sent to `from`).
    pub fn handle_packet(
        &mut self,
        packet: &[u8],
        from: A,
        now: Instant,
        reply: &mut [u8],
    ) -> Option<usize> {
        self.advance(now);
        let parsed = match parse_client_packet(packet, &self.config.extension) {
            Ok(p) => p,
            Err(e) => {
                self.stats.dropped += 1;
                log::debug!("curvecp server: dropped by the prefilter: {e:?}");
                return None;
            }
        };
        match parsed {
            ClientPacket::Hello(h) => {
                if h.padding.iter().any(|&b| b != 0) {
                    return self.drop_packet("Hello padding not zero");
                }
                if reply.len() < COOKIE_PACKET_LEN {
                    return self.drop_packet("reply buffer too small for a Cookie");
                }
                let client_short = BoxPublicKey(*h.client_short);
                let key = self.config.keypair.shared_key(&client_short);
                let mut zeros = [0u8; 64];
                if key
                    .open_into(&counter_nonce(HELLO_NONCE, h.nonce), h.boxed, &mut zeros)
                    .is_err()
                {
                    return self.drop_packet("Hello box does not open");
                }
                if zeros.iter().any(|&b| b != 0) {
                    return self.drop_packet("Hello boxed zeros not zero");
                }
                let short = BoxKeyPair::generate();
                let mut cookie = [0u8; COOKIE_LEN];
                self.minute
                    .seal(h.client_short, short.secret_bytes(), &mut cookie);
                let mut x = [0u8; 16];
                random_bytes(&mut x);
                let n = build_cookie(
                    reply,
                    h.client_extension,
                    &self.config.extension,
                    &x,
                    &key,
                    &short.public.0,
                    &cookie,
                );
                self.stats.cookies_sent += 1;
                Some(n)
            }
            ClientPacket::Initiate(v) => {
                if let Some(&idx) = self.by_key.get(v.client_short) {
                    let last = self.conns[idx].last_client_nonce;
                    if v.nonce <= last {
                        return self.drop_packet("Initiate nonce not increasing");
                    }
                    let plain_len = v.boxed.len() - TAG_LEN;
                    let conn = &self.conns[idx];
                    if conn
                        .key
                        .open_into(
                            &counter_nonce(INITIATE_NONCE, v.nonce),
                            v.boxed,
                            &mut self.scratch[..plain_len],
                        )
                        .is_err()
                    {
                        return self.drop_packet("Initiate box does not open");
                    }
                    self.deliver(idx, v.nonce, 352, plain_len, now);
                    return None;
                }
                self.new_connection(&v, from, now);
                None
            }
            ClientPacket::Message(v) => {
                let Some(&idx) = self.by_key.get(v.client_short) else {
                    return self.drop_packet("Message for an unknown C'");
                };
                if v.nonce <= self.conns[idx].last_client_nonce {
                    return self.drop_packet("Message nonce not increasing");
                }
                let plain_len = v.boxed.len() - TAG_LEN;
                let conn = &self.conns[idx];
                if conn
                    .key
                    .open_into(
                        &counter_nonce(CLIENT_MESSAGE_NONCE, v.nonce),
                        v.boxed,
                        &mut self.scratch[..plain_len],
                    )
                    .is_err()
                {
                    return self.drop_packet("Message box does not open");
                }
                let path = self.conns[idx].path;
                if path != from && self.roam.is_some_and(|allow| allow(&path, &from)) {
                    log::debug!("curvecp server: a client moved from {path:?} to {from:?}");
                    self.conns[idx].path = from;
                    self.stats.roamed += 1;
                    if let Some(f) = self.path_burst {
                        let cap = f(&from).unwrap_or(u32::MAX);
                        self.conns[idx].stream.set_max_burst(cap);
                    }
                }
                self.deliver(idx, v.nonce, 0, plain_len, now);
                None
            }
        }
    }

    fn new_connection(&mut self, v: &super::packet::InitiateView<'_>, from: A, now: Instant) {
        if self.conns.len() >= self.config.max_connections {
            self.stats.table_full += 1;
            self.drop_packet("connection table full");
            return;
        }
        if self.ended.contains_key(v.client_short) {
            self.stats.replays_refused += 1;
            self.drop_packet("Initiate for the C' of an ended connection (replay)");
            return;
        }
        let Some(contents) = self.minute.open(v.cookie) else {
            self.drop_packet("cookie does not open (forged or expired)");
            return;
        };
        if &contents.client_short != v.client_short {
            self.drop_packet("cookie issued to another C'");
            return;
        }
        let client_short = BoxPublicKey(*v.client_short);
        let mut key = SharedKey::from_secret(&client_short, &contents.server_short_secret);
        drop(contents);
        // Every Message box of the connection uses one of these prefixes: their subkeys once.
        key.cache_nonce_prefix(CLIENT_MESSAGE_NONCE);
        key.cache_nonce_prefix(SERVER_MESSAGE_NONCE);
        let plain_len = v.boxed.len() - TAG_LEN;
        if key
            .open_into(
                &counter_nonce(INITIATE_NONCE, v.nonce),
                v.boxed,
                &mut self.scratch[..plain_len],
            )
            .is_err()
        {
            self.drop_packet("Initiate box does not open");
            return;
        }
        if self.scratch[96..352] != self.config.name.0[..] {
            self.drop_packet("Initiate for another server name");
            return;
        }
        let client_long = BoxPublicKey(self.scratch[..32].try_into().expect("32 bytes"));
        let vouch_nonce: [u8; 16] = self.scratch[32..48].try_into().expect("16 bytes");
        let mut vouched = [0u8; KEY_LEN];
        let cached = self.vouch_keys.get(&client_long.0).cloned();
        let vouch_key = cached
            .clone()
            .unwrap_or_else(|| self.config.keypair.shared_key(&client_long));
        let vouch_ok = vouch_key
            .open_into(
                &long_nonce(VOUCH_NONCE, &vouch_nonce),
                &self.scratch[48..96],
                &mut vouched,
            )
            .is_ok();
        if !vouch_ok || &vouched != v.client_short {
            self.drop_packet("vouch does not open or names another C'");
            return;
        }
        if cached.is_none() {
            // Only keys that opened a vouch are kept; the table is bounded and simply emptied
            // when full.
            if self.vouch_keys.len() >= VOUCH_KEY_CACHE {
                self.vouch_keys.clear();
            }
            self.vouch_keys.insert(client_long.0, vouch_key);
        }
        if let Some(policy) = &self.config.accept_client {
            if !policy(&client_long) {
                self.stats.policy_refused += 1;
                self.drop_packet("client refused by accept_client");
                return;
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let idx = self.conns.insert(Conn {
            generation,
            client_short: *v.client_short,
            client_long,
            client_extension: *v.client_extension,
            key,
            path: from,
            last_client_nonce: v.nonce,
            server_nonce: random_below(1 << 48),
            stream: Stream::new(&self.config.stream, now),
            queued: false,
            timer: None,
            last_activity: now,
            linger_until: None,
            readable_pending: false,
            writable_pending: false,
        });
        if let Some(cap) = self.path_burst.and_then(|f| f(&from)) {
            self.conns[idx].stream.set_max_burst(cap);
        }
        self.by_key.insert(*v.client_short, idx);
        self.stats.accepted += 1;
        log::debug!("curvecp server: accepted {client_long:?} from {from:?}");
        self.push_event(ServerEvent::Accepted(ConnectionId {
            index: idx,
            generation,
        }));
        self.deliver(idx, v.nonce, 352, plain_len, now);
    }

    /// Hands `scratch[offset..plain_len]` (an authenticated message) to the stream of `idx`.
    fn deliver(&mut self, idx: usize, nonce: u64, offset: usize, plain_len: usize, now: Instant) {
        let conn = &mut self.conns[idx];
        conn.last_client_nonce = nonce;
        conn.last_activity = now;
        let readable0 = conn.stream.readable();
        let eof0 = conn.stream.peer_eof().is_some();
        let full0 = conn.stream.writable() == 0;
        conn.stream
            .handle_message(&self.scratch[offset..plain_len], now);
        wipe(&mut self.scratch[..plain_len]);
        let id = ConnectionId {
            index: idx,
            generation: conn.generation,
        };
        let readable =
            conn.stream.readable() > readable0 || (!eof0 && conn.stream.peer_eof().is_some());
        let writable = full0 && conn.stream.writable() > 0;
        let mut evs = [None, None];
        if readable && !conn.readable_pending {
            conn.readable_pending = true;
            evs[0] = Some(ServerEvent::Readable(id));
        }
        if writable && !conn.writable_pending {
            conn.writable_pending = true;
            evs[1] = Some(ServerEvent::Writable(id));
        }
        for ev in evs.into_iter().flatten() {
            self.push_event(ev);
        }
        self.enqueue(idx);
    }

    fn enqueue(&mut self, idx: usize) {
        let conn = &mut self.conns[idx];
        if !conn.queued {
            conn.queued = true;
            self.send_queue.push_back((idx, conn.generation));
        }
    }

    fn deadline(&self, conn: &Conn<A>) -> Instant {
        let mut d = conn.last_activity + self.idle_timeout;
        if let Some(l) = conn.linger_until {
            d = d.min(l);
        }
        if let Some(t) = conn.stream.poll_timeout() {
            d = d.min(t);
        }
        d
    }

    fn reschedule(&mut self, idx: usize) {
        let d = self.deadline(&self.conns[idx]);
        let conn = &mut self.conns[idx];
        if conn.timer != Some(d) {
            conn.timer = Some(d);
            self.timers.push(Reverse((d, idx, conn.generation)));
        }
        if self.timers.len() > 4 * self.conns.len() + 64 {
            // Too many stale entries: rebuild from the live deadlines.
            self.timers = self
                .conns
                .iter()
                .filter_map(|(i, c)| c.timer.map(|t| Reverse((t, i, c.generation))))
                .collect();
        }
    }

    fn remove_index(&mut self, idx: usize, why: &'static str) {
        let conn = self.conns.remove(idx);
        self.by_key.remove(&conn.client_short);
        self.stats.closed += 1;
        log::debug!(
            "curvecp server: connection of {:?} removed: {why}",
            conn.client_long
        );
        self.remember_ended(conn.client_short);
        if self.conns.is_empty() {
            // Nothing left to wake up for: drop the stale entries at once.
            self.timers.clear();
            self.send_queue.clear();
        }
        self.push_event(ServerEvent::Closed(ConnectionId {
            index: idx,
            generation: conn.generation,
        }));
    }

    fn remember_ended(&mut self, client_short: [u8; KEY_LEN]) {
        if self.ended.len() >= self.replay_capacity {
            // Full: kill every outstanding cookie instead of forgetting a C' early.
            log::debug!("curvecp server: replay set full, replacing both minute keys");
            self.minute.replace_both();
            self.ended.clear();
            self.ended_order.clear();
        }
        // Any cookie carrying this C' was sealed before now, so under the current or the
        // previous minute key: it stops opening when the current key is retired.
        let forget_at = self.minute.next_rotation() + MINUTE;
        self.ended.insert(client_short, forget_at);
        self.ended_order.push_back((client_short, forget_at));
    }

    /// The next packet due at `now` for any connection, written into `out`, with its path.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut [u8]) -> Option<(A, usize)> {
        self.advance(now);
        // Move connections whose deadline passed into the send queue.
        while let Some(&Reverse((t, idx, generation))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let live = self
                .conns
                .get(idx)
                .is_some_and(|c| c.generation == generation && c.timer == Some(t));
            if live {
                self.conns[idx].timer = None;
                self.enqueue(idx);
            }
        }
        while let Some((idx, generation)) = self.send_queue.pop_front() {
            match self.conns.get(idx) {
                Some(c) if c.generation == generation && c.queued => {}
                _ => continue,
            }
            if let Some(len) = self.service(idx, now, out) {
                let conn = &mut self.conns[idx];
                // Keep it queued: it may have more to send.
                self.send_queue.push_back((idx, conn.generation));
                return Some((conn.path, len));
            }
        }
        None
    }

    /// Polls one connection; `None` means it has nothing to send now (it is then unqueued,
    /// rescheduled or removed).
    fn service(&mut self, idx: usize, now: Instant, out: &mut [u8]) -> Option<usize> {
        let conn = &mut self.conns[idx];
        if conn.stream.error().is_some() {
            self.remove_index(idx, "stream failed");
            return None;
        }
        if conn.linger_until.is_some_and(|l| now >= l) {
            self.remove_index(idx, "finished");
            return None;
        }
        if now >= conn.last_activity + self.idle_timeout {
            self.remove_index(idx, "idle timeout");
            return None;
        }
        if conn.server_nonce == u64::MAX {
            self.remove_index(idx, "server nonce exhausted");
            return None;
        }
        let msg = &mut out[SERVER_MESSAGE_OFFSET..SERVER_MESSAGE_OFFSET + MAX_MESSAGE];
        if let Some(m) = conn.stream.poll_message(now, MAX_MESSAGE, msg) {
            if !(16..=MAX_MESSAGE).contains(&m) || m % 16 != 0 {
                log::debug!("curvecp server: stream produced a {m}-byte message, not sent");
            } else {
                conn.server_nonce += 1;
                let len = seal_server_message(
                    out,
                    &conn.client_extension,
                    &self.config.extension,
                    conn.server_nonce,
                    &conn.key,
                    m,
                );
                return Some(len);
            }
        }
        if conn.stream.error().is_some() {
            self.remove_index(idx, "stream failed");
            return None;
        }
        if conn.linger_until.is_none() && conn.stream.is_done() {
            conn.linger_until = Some(now + self.linger);
        }
        conn.queued = false;
        self.reschedule(idx);
        None
    }

    /// When `poll_transmit` (or a key rotation) next needs a turn.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut d = self.minute.next_rotation();
        if let Some(Reverse((t, _, _))) = self.timers.peek() {
            d = d.min(*t);
        }
        if !self.send_queue.is_empty() {
            d = d.min(self.last_now);
        }
        Some(d)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        let ev = self.events.pop_front()?;
        match ev {
            ServerEvent::Readable(id) => {
                if let Some(c) = self.get_mut(id) {
                    c.readable_pending = false;
                }
            }
            ServerEvent::Writable(id) => {
                if let Some(c) = self.get_mut(id) {
                    c.writable_pending = false;
                }
            }
            _ => {}
        }
        Some(ev)
    }

    fn get(&self, id: ConnectionId) -> Option<&Conn<A>> {
        self.conns
            .get(id.index)
            .filter(|c| c.generation == id.generation)
    }

    fn get_mut(&mut self, id: ConnectionId) -> Option<&mut Conn<A>> {
        self.conns
            .get_mut(id.index)
            .filter(|c| c.generation == id.generation)
    }

    /// A connection's stream, to read or write (marks it for `poll_transmit`).
    pub fn stream_mut(&mut self, id: ConnectionId) -> Option<&mut Stream> {
        self.get(id)?;
        self.enqueue(id.index);
        Some(&mut self.conns[id.index].stream)
    }

    /// A connection's stream, to inspect.
    pub fn stream(&self, id: ConnectionId) -> Option<&Stream> {
        self.get(id).map(|c| &c.stream)
    }

    /// The client's long-term key C of a connection.
    pub fn client_key(&self, id: ConnectionId) -> Option<BoxPublicKey> {
        self.get(id).map(|c| c.client_long)
    }

    /// The path a connection replies on.
    pub fn path(&self, id: ConnectionId) -> Option<A> {
        self.get(id).map(|c| c.path)
    }

    /// Forgets a connection now (a `Closed` event follows).
    pub fn remove(&mut self, id: ConnectionId) {
        if self.get(id).is_some() {
            self.remove_index(id.index, "removed by the application");
        }
    }

    /// Connections in the table.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// Sizes of the internal queues and tables.
    pub fn queues(&self) -> ServerQueues {
        ServerQueues {
            connections: self.conns.len(),
            send_queue: self.send_queue.len(),
            timers: self.timers.len(),
            events: self.events.len(),
            ended: self.ended.len(),
        }
    }

    /// The server's long-term public key S.
    pub fn public_key(&self) -> BoxPublicKey {
        self.config.keypair.public
    }
}
