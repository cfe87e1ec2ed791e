//! The Mainline DHT client, sans-IO: datagrams, bus requests and a `now` in; datagrams to
//! send, nodeInfos to publish and the next deadline out. No socket, no clock (the caller
//! passes the wall-clock seconds used for a new `seq`). One machine takes part in one DHT,
//! of the family of its bootstrap addresses: the IPv4 one (BEP 5) or the IPv6 one (BEP 32);
//! what it hears of the other family is foreign to it ([`Scope`]).
//!
//! What it does:
//!
//! - **Bootstrap.** A `find_node` lookup toward our own id from the bootstrap addresses (the
//!   caller's; there is no default list), repeated every [`Timing::refresh`] and, while the
//!   table stays empty, after a back-off.
//! - **Lookups.** Iterative, toward a 160-bit target: the [`Timing::alpha`] closest
//!   candidates not yet asked are queried (`get` for items, `find_node` for bootstrap), the
//!   answers' `nodes` become candidates (at most [`MAX_CANDIDATES`], closest kept, only
//!   addresses of the table's [`Scope`]), and the lookup ends when the [`Timing::k`] closest
//!   candidates that did not fail have all answered, after [`Timing::max_queries`] queries, or
//!   after [`Timing::lookup_timeout`]. A query unanswered after [`MainlineState::slow_after`]
//!   (a few smoothed round trips, between [`Timing::min_slow_after`] and
//!   [`Timing::slow_after`]) stops holding the lookup (it may still answer until
//!   [`Timing::query_timeout`]), so nodes that left cost a lookup little time. Such a query
//!   (any query: lookup, `put`, ping) is sent once more then, the same bytes under the same
//!   transaction id: on a lossy path a single lost datagram no longer loses the node, and a
//!   node that left costs one datagram more. Replies to a resent query are not timed (Karn).
//! - **Publish** (when given a signing key): our nodeInfo ([`super::item`]) signed as a BEP 44
//!   mutable item with `seq` = max(wall-clock seconds, last `seq` + 1), so it rises across
//!   restarts too (the caller persists it and hands it back with
//!   [`MainlineState::set_last_seq`]); a `get` lookup toward its target collects tokens (and
//!   any item already stored: one with a higher `seq` than ours, left by an earlier run, makes
//!   us sign again above it), then `put` to the `k` closest
//!   nodes that gave a token. Again every [`Timing::republish`] and whenever the value
//!   changes.
//! - **Resolve** (`self.transports.requestNodeInfo`): a `get` lookup for the signId's target.
//!   Every item received is checked ([`MutableItem::from_fields`]: target, ed25519
//!   signature) and must carry a valid nodeInfo of that very signId ([`item::node_info_of`]);
//!   the first one is published at once, a later one only with a higher `seq`. Results are
//!   cached for [`Timing::cache_ttl`]; at most [`Timing::max_lookups`] resolve lookups run at
//!   once and [`Timing::max_waiting`] wait.
//! - **Read-only by default** (BEP 43): queries carry `ro=1` and incoming queries are ignored.
//!   With `serve` on, it answers `ping`, `find_node`, `get_peers` (nodes only), `get` and
//!   `put` of mutable items (tokens, signature, `cas`, `seq` checked; [`Timing::max_stored`]
//!   items for [`ITEM_TTL`]), at most [`Timing::queries_per_sec`] queries a second; a node
//!   that queries us is pinged (a few at a time) and enters the table if it answers.
//! - **Relays** (BEP 5). A node that offers relaying, publishing, announces its relay port
//!   under [`relay_info_hash`] (a `get_peers` lookup for tokens, then `announce_peer` to the
//!   `k` closest that gave one), again every [`Timing::relay_announce`]. A relay search
//!   ([`MainlineState::find_relays`]) is a `get_peers` lookup there; the peers found (at most
//!   [`MAX_RELAY_PEERS`], in scope) are handed out ([`MainlineState::poll_relay_peers`]): bare
//!   addresses, which the platform asks who they are (see the platform's relay docs). Serving,
//!   it stores announced peers ([`Timing::max_stored`] in all, [`PEERS_PER_HASH`] per
//!   info-hash, for [`PEER_TTL`]) and answers `get_peers` with them.
//! - **No amplification.** Toward an address that is not in the routing table (not proven:
//!   source addresses can be forged), an answer (and the ping) may exceed the query's length
//!   only within a small per-network and shared byte budget; beyond it the answer is trimmed
//!   to the query's length or not sent ([`crate::proto::mainline::budget`]).
//! - **Hostile input.** Every datagram goes through [`krpc::decode`]; replies count only from
//!   the address a matching outstanding query went to; everything is bounded: outstanding
//!   queries ([`Timing::max_outstanding`]), candidates, lookups, cache, store, queues
//!   ([`OUT_QUEUE`]).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::budget::{AnswerBudget, Source};
use super::item::{self, ItemError, MutableItem};
use super::krpc::{self, Fields, Kind, Message, Method, NodeId, ID_LEN};
use super::table::{distance, RoutingTable, Scope};
use crate::crypto::{self, SignKeyPair};
use crate::identity::{KeyCache, SignId};

/// Most datagrams, and most publications, waiting to be taken.
pub const OUT_QUEUE: usize = 256;
/// Most candidates one lookup remembers.
pub const MAX_CANDIDATES: usize = 32;
/// How long a stored item lives without being put again (BEP 44: two hours).
pub const ITEM_TTL: Duration = Duration::from_secs(2 * 3600);
/// How often the token secret changes (the previous one stays valid as long).
pub const TOKEN_ROTATION: Duration = Duration::from_secs(300);
/// Length of our transaction ids: a random start, then counting. Four bytes, as libtorrent
/// and pubky's `mainline` send; the latter drops every message whose `t` has another length,
/// so shorter ids go unanswered there. Replies are matched on the whole id.
pub const TXID_LEN: usize = 4;
/// Pings to nodes that queried us (serving), outstanding at once.
const MAX_PINGS: usize = 8;
/// Length of our tokens.
const TOKEN_LEN: usize = 8;
/// How long an announced peer is kept (serving), as libtorrent does.
pub const PEER_TTL: Duration = Duration::from_secs(30 * 60);
/// Peers kept per info-hash at most (serving), and handed out in one answer at most.
pub const PEERS_PER_HASH: usize = 16;
/// Relay addresses one search hands out at most.
pub const MAX_RELAY_PEERS: usize = 32;

/// The info-hash under which nodes offering relaying announce themselves: SHA-1 of
/// `mm-platform relay v1`.
pub fn relay_info_hash() -> NodeId {
    crypto::sha1(&[b"mm-platform relay v1"])
}

/// Bytes of our ping query at most (our id, a 4-byte transaction id, no `ro`): what a ping
/// to an unproven address that queried us takes from its [`AnswerBudget`].
const PING_BYTES: usize = 64;

/// Timings and bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Parallel queries per lookup (3).
    pub alpha: usize,
    /// Nodes a lookup converges on and an item is put to (8).
    pub k: usize,
    /// A query no longer holds its lookup after this at most (1 s). Once replies have been
    /// timed, the threshold follows them: the smoothed round trip plus four times its
    /// deviation, as TCP's retransmission timer, within [`Timing::min_slow_after`] and this.
    /// A query past it may still answer, until [`Timing::query_timeout`].
    pub slow_after: Duration,
    /// The adaptive threshold's floor (100 ms).
    pub min_slow_after: Duration,
    /// A query is given up after this (3 s).
    pub query_timeout: Duration,
    /// A lookup ends after this at most (20 s).
    pub lookup_timeout: Duration,
    /// Queries one lookup sends at most (64).
    pub max_queries: usize,
    /// Queries outstanding at once, over all lookups (64).
    pub max_outstanding: usize,
    /// Resolve lookups at once (8).
    pub max_lookups: usize,
    /// Resolve requests waiting for a lookup slot (64).
    pub max_waiting: usize,
    /// Resolved nodeInfos are kept this long (10 min).
    pub cache_ttl: Duration,
    /// Resolved nodeInfos kept at most (256).
    pub max_cached: usize,
    /// Our item is put again after this (1 h; items live 2 h).
    pub republish: Duration,
    /// A publication that reached no node is tried again after this (30 s).
    pub publish_retry: Duration,
    /// The bootstrap lookup runs again after this (15 min).
    pub refresh: Duration,
    /// Serving: queries answered per second at most (100; a burst of twice as many).
    pub queries_per_sec: u32,
    /// Serving: items stored at most (256), and announced peers at most (as many).
    pub max_stored: usize,
    /// A relay announces itself again after this (15 min; peers are kept 30 min).
    pub relay_announce: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            alpha: 3,
            k: 8,
            slow_after: Duration::from_secs(1),
            min_slow_after: Duration::from_millis(100),
            query_timeout: Duration::from_secs(3),
            lookup_timeout: Duration::from_secs(20),
            max_queries: 64,
            max_outstanding: 64,
            max_lookups: 8,
            max_waiting: 64,
            cache_ttl: Duration::from_secs(600),
            max_cached: 256,
            republish: Duration::from_secs(3600),
            publish_retry: Duration::from_secs(30),
            refresh: Duration::from_secs(900),
            queries_per_sec: 100,
            max_stored: 256,
            relay_announce: Duration::from_secs(900),
        }
    }
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MainlineStats {
    /// Serving: answers to unproven addresses trimmed (or not sent) because their excess was
    /// not in the [`AnswerBudget`] (see [`crate::proto::mainline::budget`]).
    pub answers_trimmed: u64,
    /// Datagrams handed in.
    pub packets: u64,
    /// Datagrams refused by the codec (malformed, oversized).
    pub malformed: u64,
    /// Datagrams from addresses outside the scope (or IPv6).
    pub foreign: u64,
    /// Replies that matched no outstanding query from that address.
    pub unexpected: u64,
    /// Queries received and ignored (read-only).
    pub queries_ignored: u64,
    /// Queries dropped by the rate limit.
    pub queries_dropped: u64,
    /// Queries answered (serving).
    pub queries_answered: u64,
    /// Queries we sent.
    pub queries_sent: u64,
    /// Queries sent a second time, unanswered after [`MainlineState::slow_after`].
    pub resent: u64,
    /// Our queries that timed out.
    pub timeouts: u64,
    /// Replies to our queries (responses and errors).
    pub replies: u64,
    /// Datagrams dropped because the send queue was full.
    pub send_dropped: u64,
    /// Valid items received (signature and target checked).
    pub items_valid: u64,
    /// Items whose signature did not verify.
    pub items_bad_signature: u64,
    /// Items stored under another key than the one asked for.
    pub items_wrong_target: u64,
    /// Items refused otherwise (incomplete, too large).
    pub items_invalid: u64,
    /// Valid items whose value was not a valid nodeInfo.
    pub not_node_info: u64,
    /// Valid items carrying another node's nodeInfo.
    pub wrong_key: u64,
    /// Valid items with a `seq` not above what we already had.
    pub stale: u64,
    /// nodeInfos published (from the DHT or the cache).
    pub resolved: u64,
    /// Resolve lookups that found nothing.
    pub not_found: u64,
    /// Resolve requests refused (not a signId, ours, or too many waiting).
    pub requests_refused: u64,
    /// `put`s sent.
    pub puts_sent: u64,
    /// `put`s acknowledged.
    pub puts_acked: u64,
    /// `put`s refused or unanswered.
    pub puts_failed: u64,
    /// Publications completed (every `put` answered or timed out).
    pub publishes: u64,
    /// Nodes that stored the last publication.
    pub last_publish_stored: u32,
    /// From the start of the last publication to its first stored copy.
    pub last_publish_first_ack: Option<Duration>,
    /// From the start of the last publication to its end.
    pub last_publish_took: Option<Duration>,
    /// `seq` of our item.
    pub seq: i64,
    /// Nodes in the routing table now.
    pub table: usize,
    /// Queries outstanding now.
    pub outstanding: usize,
    /// Lookups running now.
    pub lookups: usize,
    /// Resolve requests waiting now.
    pub waiting: usize,
    /// Resolved nodeInfos cached now.
    pub cached: usize,
    /// Items stored for others now (serving).
    pub stored: usize,
    /// Relay announcements sent (`announce_peer`) and acknowledged.
    pub relay_announces: u64,
    /// ... of which acknowledged.
    pub relay_announces_acked: u64,
    /// Relay searches finished, and the relay addresses they found in all.
    pub relay_searches: u64,
    /// ... the addresses found.
    pub relay_peers_found: u64,
    /// Serving: peers announced to us and stored now.
    pub peers_stored: usize,
}

/// Options of the machine.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to start (required, no default).
    pub bootstrap: Vec<SocketAddr>,
    /// BEP 44 salt of our item and of lookups (empty: none).
    pub salt: Vec<u8>,
    /// Answer queries (off: read-only, BEP 43).
    pub serve: bool,
    /// Timings and bounds.
    pub timing: Timing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Bootstrap,
    Resolve(SignId),
    Publish,
    /// `get_peers` for tokens, then `announce_peer` of our relay port.
    AnnounceRelay,
    /// `get_peers` for the relays' addresses.
    FindRelays,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CState {
    Fresh,
    /// Queried at this instant; holds its lookup until [`MainlineState::slow_after`].
    Asked(Instant),
    /// Queried and unanswered past `slow_after`: no longer holds its lookup, may still answer
    /// until [`Timing::query_timeout`]. A state of its own so that the slow deadline, once
    /// past, is consumed (it is no longer a wake-up).
    Slow,
    Answered,
    Failed,
}

#[derive(Debug, Clone)]
struct Candidate {
    id: Option<NodeId>,
    addr: SocketAddr,
    state: CState,
    token: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Lookup {
    id: u64,
    purpose: Purpose,
    target: NodeId,
    cands: Vec<Candidate>,
    queries: usize,
    started: Instant,
    best: Option<MutableItem>,
    published_seq: Option<i64>,
    /// Peers found (`get_peers` values).
    peers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Lookup(u64),
    Put,
    Ping,
    Announce,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    addr: SocketAddr,
    sent: Instant,
    what: What,
}

#[derive(Debug, Clone, Copy)]
struct Round {
    started: Instant,
    sent: u32,
    acked: u32,
    failed: u32,
    first_ack: Option<Duration>,
}

#[derive(Debug, Clone)]
struct Cached {
    value: Value,
    seq: i64,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct Stored {
    item: MutableItem,
    expires: Instant,
}

/// The Mainline DHT client state machine (see the module docs). Cloning copies the whole
/// state (a fuzz target starts every input from one clone).
#[derive(Clone)]
pub struct MainlineState {
    timing: Timing,
    salt: Vec<u8>,
    serve: bool,
    own: NodeId,
    table: RoutingTable,
    bootstrap: Vec<SocketAddr>,
    signer: Option<SignKeyPair>,
    keys: KeyCache,
    my_value: Option<Vec<u8>>,
    my_item: Option<MutableItem>,
    last_seq: i64,
    seq_dirty: bool,
    publish_due: Option<Instant>,
    round: Option<Round>,
    cache: HashMap<SignId, Cached>,
    waiting: VecDeque<SignId>,
    lookups: Vec<Lookup>,
    next_lookup: u64,
    /// Our outstanding queries by transaction id (4 bytes on the wire, see [`TXID_LEN`]).
    outstanding: HashMap<u32, Pending>,
    /// The bytes of outstanding queries not sent a second time yet (a subset of
    /// `outstanding`'s keys, so bounded by [`Timing::max_outstanding`]).
    resend: HashMap<u32, Vec<u8>>,
    next_tx: u32,
    bootstrap_at: Option<Instant>,
    backoff: Duration,
    store: HashMap<NodeId, Stored>,
    /// Serving: announced peers by info-hash, with when they expire.
    peers: HashMap<NodeId, Vec<(SocketAddr, Instant)>>,
    /// Our relay port, while our nodeInfo offers relaying (and we publish).
    relay_port: Option<u16>,
    relay_announce_due: Option<Instant>,
    /// Relay searches' results, to be taken.
    relay_peers: VecDeque<Vec<SocketAddr>>,
    secrets: [[u8; 20]; 2],
    rotate_at: Instant,
    /// Bytes beyond their queries' length that unproven addresses may still be sent.
    budget: AnswerBudget,
    allowance: f64,
    refilled: Instant,
    transmit: VecDeque<(SocketAddr, Vec<u8>)>,
    publications: VecDeque<Value>,
    stats: MainlineStats,
    /// Smoothed round trip of our queries and its mean deviation, once one was timed.
    rtt: Option<(Duration, Duration)>,
}

fn random_id() -> NodeId {
    let mut id = [0u8; ID_LEN];
    crypto::random_bytes(&mut id);
    id
}

impl MainlineState {
    /// A machine with these options; with `signer` it publishes (the caller's identity).
    /// The bootstrap lookup starts at the first [`MainlineState::handle_timeout`].
    pub fn new(options: Options, signer: Option<SignKeyPair>, now: Instant) -> MainlineState {
        let own = random_id();
        let scope = Scope::of(&options.bootstrap);
        let mut tx = [0u8; TXID_LEN];
        crypto::random_bytes(&mut tx);
        MainlineState {
            timing: options.timing,
            salt: options.salt,
            serve: options.serve,
            own,
            table: RoutingTable::new(own, scope),
            bootstrap: options
                .bootstrap
                .into_iter()
                .filter(|a| scope.accepts(a))
                .take(64)
                .collect(),
            signer,
            keys: KeyCache::new(1024),
            my_value: None,
            my_item: None,
            last_seq: 0,
            seq_dirty: false,
            publish_due: None,
            round: None,
            cache: HashMap::new(),
            waiting: VecDeque::new(),
            lookups: Vec::new(),
            next_lookup: 0,
            outstanding: HashMap::new(),
            resend: HashMap::new(),
            next_tx: u32::from_be_bytes(tx),
            bootstrap_at: Some(now),
            backoff: Duration::from_secs(5),
            rtt: None,
            store: HashMap::new(),
            peers: HashMap::new(),
            relay_port: None,
            relay_announce_due: None,
            relay_peers: VecDeque::new(),
            secrets: [random_id(), random_id()],
            rotate_at: now + TOKEN_ROTATION,
            budget: AnswerBudget::new(now),
            allowance: f64::from(options.timing.queries_per_sec) * 2.0,
            refilled: now,
            transmit: VecDeque::new(),
            publications: VecDeque::new(),
            stats: MainlineStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> MainlineStats {
        MainlineStats {
            seq: self.my_item.as_ref().map_or(self.last_seq, |i| i.seq),
            table: self.table.len(),
            outstanding: self.outstanding.len(),
            lookups: self.lookups.len(),
            waiting: self.waiting.len(),
            cached: self.cache.len(),
            stored: self.store.len(),
            peers_stored: self.peers.values().map(Vec::len).sum(),
            ..self.stats
        }
    }

    /// The address scope (from the bootstrap addresses).
    pub fn scope(&self) -> Scope {
        self.table.scope()
    }

    /// Our node id (random per run).
    pub fn node_id(&self) -> &NodeId {
        &self.own
    }

    /// Restores the last `seq` used (from storage); the next one is above it.
    pub fn set_last_seq(&mut self, seq: i64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// The last `seq` signed, if it changed since the last call (to persist).
    pub fn take_seq_to_persist(&mut self) -> Option<i64> {
        std::mem::take(&mut self.seq_dirty).then_some(self.last_seq)
    }

    /// Our nodeInfo (`self.transports.myNodeInfo`). When publishing and its publishable
    /// value changed, it is signed with a new `seq` (at least `unix_secs`) and published.
    /// Returns whether a new item was signed.
    pub fn set_my_node_info(&mut self, info: &Value, unix_secs: u64, now: Instant) -> bool {
        if self.signer.is_none() {
            return false;
        }
        let local = self.scope().is_loopback();
        let Some(v) = item::publishable_node_info(info, &mut self.keys, local) else {
            return false;
        };
        if self.my_value.as_ref() == Some(&v) {
            return false;
        }
        let seq = i64::try_from(unix_secs)
            .unwrap_or(i64::MAX / 2)
            .max(self.last_seq + 1);
        if !self.sign(v.clone(), seq) {
            return false;
        }
        self.my_value = Some(v);
        self.publish_due = Some(now);
        true
    }

    fn sign(&mut self, v: Vec<u8>, seq: i64) -> bool {
        let Some(keys) = self.signer.as_ref() else {
            return false;
        };
        match MutableItem::sign(keys, &self.salt, seq, v) {
            Ok(item) => {
                self.my_item = Some(item);
                self.last_seq = seq;
                self.seq_dirty = true;
                true
            }
            Err(e) => {
                log::debug!("mainline: cannot sign our item: {e}");
                false
            }
        }
    }

    /// `self.transports.requestNodeInfo` (payload a signId): published from the cache, or
    /// looked up.
    pub fn request_node_info(&mut self, key: &Value, now: Instant) {
        let Some(sign) = key
            .as_str()
            .filter(|k| k.len() == 44)
            .and_then(|k| k.parse::<SignId>().ok())
        else {
            self.stats.requests_refused += 1;
            return;
        };
        if self.signer.as_ref().is_some_and(|s| s.public == sign.0) {
            self.stats.requests_refused += 1;
            return;
        }
        // An expired entry stays (until evicted) as the floor of the seq accepted for it.
        if let Some(c) = self.cache.get(&sign).filter(|c| c.expires > now) {
            let v = c.value.clone();
            self.publish(v);
            return;
        }
        let running = self
            .lookups
            .iter()
            .any(|l| l.purpose == Purpose::Resolve(sign));
        if running || self.waiting.contains(&sign) {
            return;
        }
        if self.waiting.len() >= self.timing.max_waiting {
            self.stats.requests_refused += 1;
            return;
        }
        self.waiting.push_back(sign);
    }

    /// Our relay port, `None` when our nodeInfo offers no relaying: announced under
    /// [`relay_info_hash`] now and every [`Timing::relay_announce`] (only with a signing key,
    /// that is when publishing).
    pub fn set_relay_port(&mut self, port: Option<u16>, now: Instant) {
        if self.signer.is_none() || port == self.relay_port {
            return;
        }
        self.relay_port = port;
        self.relay_announce_due = port.map(|_| now);
    }

    /// Looks for relays (a `get_peers` lookup of [`relay_info_hash`]) unless a search runs;
    /// the addresses found come out of [`MainlineState::poll_relay_peers`].
    pub fn find_relays(&mut self, now: Instant) {
        if !self
            .lookups
            .iter()
            .any(|l| l.purpose == Purpose::FindRelays)
        {
            self.start_lookup(Purpose::FindRelays, relay_info_hash(), now);
        }
    }

    /// The addresses a relay search found (one list per search that found any).
    pub fn poll_relay_peers(&mut self) -> Option<Vec<SocketAddr>> {
        self.relay_peers.pop_front()
    }

    /// A datagram received from `from`.
    pub fn handle_datagram(&mut self, bytes: &[u8], from: SocketAddr, now: Instant) {
        self.stats.packets += 1;
        let from = match crate::transport::udp::canonical(from) {
            a if self.scope().accepts(&a) => a,
            _ => {
                self.stats.foreign += 1;
                return;
            }
        };
        let msg = match krpc::decode(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        match msg.kind {
            Kind::Query(_) if !self.serve => self.stats.queries_ignored += 1,
            Kind::Query(_) => self.serve_query(msg, bytes.len(), from, now),
            Kind::Response | Kind::Error(..) => self.on_reply(msg, from, now),
        }
    }

    fn on_reply(&mut self, msg: Message, from: SocketAddr, now: Instant) {
        // Ours are all TXID_LEN bytes: a reply with another length answers no query of ours.
        let Ok(t) = <[u8; TXID_LEN]>::try_from(&msg.t[..]) else {
            self.stats.unexpected += 1;
            return;
        };
        let t = u32::from_be_bytes(t);
        match self.outstanding.get(&t) {
            Some(p) if p.addr == from => {}
            _ => {
                self.stats.unexpected += 1;
                return;
            }
        }
        let Some(pending) = self.outstanding.remove(&t) else {
            return;
        };
        self.stats.replies += 1;
        // Karn: a reply to a query sent twice says nothing sure about the round trip.
        if self.resend.remove(&t).is_some() {
            self.time_reply(now.saturating_duration_since(pending.sent));
        }
        let ok = msg.kind == Kind::Response;
        if ok && !msg.ro {
            if let Some(id) = msg.fields.id {
                self.table.heard(id, from, now);
            }
        }
        match pending.what {
            What::Put => {
                if let Some(r) = self.round.as_mut() {
                    if ok {
                        r.acked += 1;
                        r.first_ack.get_or_insert(now - r.started);
                        self.stats.puts_acked += 1;
                    } else {
                        r.failed += 1;
                        self.stats.puts_failed += 1;
                    }
                }
                self.check_round(now);
            }
            What::Lookup(lid) => {
                if let Some(i) = self.lookups.iter().position(|l| l.id == lid) {
                    self.lookup_reply(i, &msg, from, ok, now);
                    self.step(i, now);
                }
            }
            What::Ping => {}
            What::Announce => {
                if ok {
                    self.stats.relay_announces_acked += 1;
                }
            }
        }
    }

    fn lookup_reply(&mut self, i: usize, msg: &Message, from: SocketAddr, ok: bool, now: Instant) {
        let scope = self.scope();
        let own = self.own;
        let l = &mut self.lookups[i];
        if let Some(c) = l.cands.iter_mut().find(|c| c.addr == from) {
            if ok {
                c.state = CState::Answered;
                c.id = msg.fields.id.or(c.id);
                c.token = msg.fields.token.clone();
            } else {
                c.state = CState::Failed;
            }
        }
        if !ok {
            return;
        }
        for n in &msg.fields.nodes {
            add_candidate(&mut l.cands, Some(n.id), n.addr, scope, &own);
        }
        sort_candidates(&mut l.cands, &l.target);
        if l.purpose == Purpose::FindRelays {
            for p in &msg.fields.values {
                if scope.accepts(p) && !l.peers.contains(p) && l.peers.len() < MAX_RELAY_PEERS {
                    l.peers.push(*p);
                }
            }
        }
        if msg.fields.v.is_none() || l.purpose == Purpose::Bootstrap {
            return;
        }
        let target = l.target;
        let item = match MutableItem::from_fields(&msg.fields, &self.salt, Some(&target)) {
            Ok(item) => item,
            Err(ItemError::BadSignature) => {
                self.stats.items_bad_signature += 1;
                return;
            }
            Err(ItemError::WrongTarget) => {
                self.stats.items_wrong_target += 1;
                return;
            }
            Err(_) => {
                self.stats.items_invalid += 1;
                return;
            }
        };
        self.stats.items_valid += 1;
        let l = &mut self.lookups[i];
        if l.best.as_ref().is_none_or(|b| item.seq > b.seq) {
            l.best = Some(item.clone());
        }
        let Purpose::Resolve(sign) = l.purpose else {
            return;
        };
        let known = l
            .published_seq
            .or_else(|| self.cache.get(&sign).map(|c| c.seq));
        if known.is_some_and(|s| item.seq <= s) {
            self.stats.stale += 1;
            return;
        }
        match item::node_info_of(&item, &mut self.keys) {
            Ok(value) => {
                self.lookups[i].published_seq = Some(item.seq);
                self.remember(sign, value.clone(), item.seq, now);
                self.publish(value);
            }
            Err(ItemError::WrongKey) => self.stats.wrong_key += 1,
            Err(_) => self.stats.not_node_info += 1,
        }
    }

    fn remember(&mut self, sign: SignId, value: Value, seq: i64, now: Instant) {
        if self.cache.len() >= self.timing.max_cached && !self.cache.contains_key(&sign) {
            self.cache.retain(|_, c| c.expires > now);
            if self.cache.len() >= self.timing.max_cached {
                if let Some(k) = self
                    .cache
                    .iter()
                    .min_by_key(|(_, c)| c.expires)
                    .map(|(k, _)| *k)
                {
                    self.cache.remove(&k);
                }
            }
        }
        self.cache.insert(
            sign,
            Cached {
                value,
                seq,
                expires: now + self.timing.cache_ttl,
            },
        );
    }

    fn publish(&mut self, value: Value) {
        if self.publications.len() < OUT_QUEUE {
            self.publications.push_back(value);
            self.stats.resolved += 1;
        }
    }

    fn check_round(&mut self, now: Instant) {
        let Some(r) = self.round else { return };
        if r.acked + r.failed < r.sent {
            return;
        }
        self.round = None;
        self.stats.publishes += 1;
        self.stats.last_publish_stored = r.acked;
        self.stats.last_publish_first_ack = r.first_ack;
        self.stats.last_publish_took = Some(now - r.started);
        if r.acked == 0 {
            self.retry_publish(now);
        }
    }

    fn retry_publish(&mut self, now: Instant) {
        let at = now + self.timing.publish_retry;
        self.publish_due = Some(self.publish_due.map_or(at, |d| d.min(at)));
    }

    fn tx(&mut self) -> Option<u32> {
        for _ in 0..=self.timing.max_outstanding {
            self.next_tx = self.next_tx.wrapping_add(1);
            if !self.outstanding.contains_key(&self.next_tx) {
                return Some(self.next_tx);
            }
        }
        None
    }

    /// Queues encoded bytes for `to`; returns their length if there was room.
    fn push_bytes(&mut self, to: SocketAddr, bytes: Vec<u8>) -> Option<usize> {
        if self.transmit.len() >= OUT_QUEUE {
            self.stats.send_dropped += 1;
            return None;
        }
        let n = bytes.len();
        self.transmit.push_back((to, bytes));
        Some(n)
    }

    fn send_query(
        &mut self,
        to: SocketAddr,
        method: Method,
        fields: Fields,
        what: What,
        now: Instant,
    ) -> bool {
        if self.outstanding.len() >= self.timing.max_outstanding {
            return false;
        }
        let Some(t) = self.tx() else { return false };
        let msg = Message::query(t.to_be_bytes().to_vec(), method, fields, !self.serve);
        let Some(bytes) = krpc::encode(&msg) else {
            return false;
        };
        if self.transmit.len() >= OUT_QUEUE {
            self.stats.send_dropped += 1;
            return false;
        }
        self.transmit.push_back((to, bytes.clone()));
        self.resend.insert(t, bytes);
        self.outstanding.insert(
            t,
            Pending {
                addr: to,
                sent: now,
                what,
            },
        );
        self.stats.queries_sent += 1;
        true
    }

    fn start_lookup(&mut self, purpose: Purpose, target: NodeId, now: Instant) {
        let mut cands = Vec::new();
        let scope = self.scope();
        for n in self.table.closest(&target, self.timing.k * 2) {
            add_candidate(&mut cands, Some(n.id), n.addr, scope, &self.own);
        }
        if cands.len() < self.timing.k {
            for a in &self.bootstrap {
                add_candidate(&mut cands, None, *a, scope, &self.own);
            }
        }
        sort_candidates(&mut cands, &target);
        self.next_lookup += 1;
        self.lookups.push(Lookup {
            id: self.next_lookup,
            purpose,
            target,
            cands,
            queries: 0,
            started: now,
            best: None,
            published_seq: None,
            peers: Vec::new(),
        });
        let i = self.lookups.len() - 1;
        self.step(i, now);
    }

    /// Sends what lookup `i` may send; finishes it when done.
    fn step(&mut self, i: usize, now: Instant) {
        // Queries past `slow_after` stop holding the lookup: mark them, which consumes their
        // deadline (see `next_deadline`).
        let slow_after = self.slow_after();
        for c in &mut self.lookups[i].cands {
            if let CState::Asked(at) = c.state {
                if now.saturating_duration_since(at) >= slow_after {
                    c.state = CState::Slow;
                }
            }
        }
        loop {
            let l = &self.lookups[i];
            let (fresh, holding) = frontier(&l.cands, self.timing.k, self.slow_after(), now);
            let Some(c) = fresh else {
                if holding == 0 {
                    self.finish(i, now);
                }
                return;
            };
            if holding >= self.timing.alpha
                || l.queries >= self.timing.max_queries
                || self.outstanding.len() >= self.timing.max_outstanding
            {
                if l.queries >= self.timing.max_queries && holding == 0 {
                    self.finish(i, now);
                }
                return;
            }
            let addr = l.cands[c].addr;
            let target = l.target;
            let lid = l.id;
            let (method, fields) = match l.purpose {
                Purpose::Bootstrap => (
                    Method::FindNode,
                    Fields {
                        id: Some(self.own),
                        target: Some(target),
                        ..Fields::default()
                    },
                ),
                Purpose::AnnounceRelay | Purpose::FindRelays => (
                    Method::GetPeers,
                    Fields {
                        id: Some(self.own),
                        info_hash: Some(target),
                        ..Fields::default()
                    },
                ),
                Purpose::Resolve(_) | Purpose::Publish => (
                    Method::Get,
                    Fields {
                        id: Some(self.own),
                        target: Some(target),
                        ..Fields::default()
                    },
                ),
            };
            if !self.send_query(addr, method, fields, What::Lookup(lid), now) {
                return;
            }
            let l = &mut self.lookups[i];
            l.cands[c].state = CState::Asked(now);
            l.queries += 1;
        }
    }

    fn finish(&mut self, i: usize, now: Instant) {
        let l = self.lookups.swap_remove(i);
        match l.purpose {
            Purpose::Bootstrap => {
                if self.table.is_empty() {
                    self.bootstrap_at = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(300));
                } else {
                    self.bootstrap_at = Some(now + self.timing.refresh);
                    self.backoff = Duration::from_secs(5);
                }
            }
            Purpose::Resolve(_) => {
                if l.published_seq.is_none() {
                    self.stats.not_found += 1;
                }
            }
            Purpose::Publish => self.put(l, now),
            Purpose::AnnounceRelay => self.announce_relay(&l, now),
            Purpose::FindRelays => {
                self.stats.relay_searches += 1;
                self.stats.relay_peers_found += l.peers.len() as u64;
                if !l.peers.is_empty() && self.relay_peers.len() < OUT_QUEUE {
                    self.relay_peers.push_back(l.peers);
                }
            }
        }
    }

    /// The `k` closest nodes of a finished lookup that answered with a token, with it.
    fn token_holders(&self, l: &Lookup) -> Vec<(SocketAddr, Vec<u8>)> {
        l.cands
            .iter()
            .filter(|c| c.state == CState::Answered)
            .filter_map(|c| c.token.clone().map(|t| (c.addr, t)))
            .take(self.timing.k)
            .collect()
    }

    /// The end of a relay announcement's lookup: `announce_peer` of our relay port to the
    /// closest nodes that gave a token; again after [`Timing::relay_announce`] (after
    /// [`Timing::publish_retry`] when none could be sent).
    fn announce_relay(&mut self, l: &Lookup, now: Instant) {
        let Some(port) = self.relay_port else {
            return;
        };
        let mut sent = 0;
        let targets = self.token_holders(l);
        for (addr, token) in targets {
            let f = Fields {
                id: Some(self.own),
                info_hash: Some(l.target),
                port: Some(port),
                token: Some(token),
                ..Fields::default()
            };
            if self.send_query(addr, Method::AnnouncePeer, f, What::Announce, now) {
                sent += 1;
                self.stats.relay_announces += 1;
            }
        }
        let again = if sent > 0 {
            self.timing.relay_announce
        } else {
            self.timing.publish_retry
        };
        self.relay_announce_due = Some(now + again);
    }

    /// The end of a publish lookup: `put` our item to the closest nodes that gave a token.
    fn put(&mut self, l: Lookup, now: Instant) {
        let Some(mine) = self.my_item.clone() else {
            return;
        };
        // An item already under our key with a higher seq (an earlier run whose seq we lost),
        // or another value under our seq: sign again above it.
        if let Some(b) = &l.best {
            let above = b.seq > mine.seq || (b.seq == mine.seq && b.v != mine.v);
            if above && !self.sign(mine.v.clone(), b.seq + 1) {
                return;
            }
        }
        let Some(mine) = self.my_item.clone() else {
            return;
        };
        self.publish_due = Some(now + self.timing.republish);
        let mut round = Round {
            started: l.started,
            sent: 0,
            acked: 0,
            failed: 0,
            first_ack: None,
        };
        for (addr, token) in self.token_holders(&l) {
            // `target` is not in BEP 44's put, but pubky's `mainline` requires it (it drops a
            // put without one); libtorrent and bittorrent-dht ignore it.
            let mut f = Fields {
                id: Some(self.own),
                target: Some(mine.target()),
                token: Some(token),
                ..Fields::default()
            };
            mine.fill(&mut f);
            if self.send_query(addr, Method::Put, f, What::Put, now) {
                round.sent += 1;
                self.stats.puts_sent += 1;
            }
        }
        self.round = Some(round);
        self.check_round(now);
    }

    /// Runs what is due at `now`: timeouts, lookups to start or continue, republication,
    /// token rotation. Call it after every input.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Unanswered queries.
        let expired: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= self.timing.query_timeout)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            self.resend.remove(&t);
            let Some(p) = self.outstanding.remove(&t) else {
                continue;
            };
            self.stats.timeouts += 1;
            self.table.failed(&p.addr);
            match p.what {
                What::Put => {
                    if let Some(r) = self.round.as_mut() {
                        r.failed += 1;
                        self.stats.puts_failed += 1;
                    }
                    self.check_round(now);
                }
                What::Lookup(lid) => {
                    if let Some(l) = self.lookups.iter_mut().find(|l| l.id == lid) {
                        if let Some(c) = l.cands.iter_mut().find(|c| c.addr == p.addr) {
                            c.state = CState::Failed;
                        }
                    }
                }
                What::Ping | What::Announce => {}
            }
        }
        // Queries unanswered after `slow_after`: sent once more.
        let slow_after = self.slow_after();
        let due: Vec<u32> = self
            .resend
            .keys()
            .copied()
            .filter(|t| {
                self.outstanding
                    .get(t)
                    .is_none_or(|p| now.saturating_duration_since(p.sent) >= slow_after)
            })
            .collect();
        for t in due {
            let Some(bytes) = self.resend.remove(&t) else {
                continue;
            };
            let Some(p) = self.outstanding.get(&t) else {
                continue;
            };
            if self.transmit.len() >= OUT_QUEUE {
                self.stats.send_dropped += 1;
                continue;
            }
            self.transmit.push_back((p.addr, bytes));
            self.stats.resent += 1;
        }
        // Lookups that ran too long.
        while let Some(i) = self
            .lookups
            .iter()
            .position(|l| now.saturating_duration_since(l.started) >= self.timing.lookup_timeout)
        {
            self.finish(i, now);
        }
        // Bootstrap and refresh.
        if self.bootstrap_at.is_some_and(|t| t <= now)
            && !self.lookups.iter().any(|l| l.purpose == Purpose::Bootstrap)
        {
            self.bootstrap_at = None;
            let own = self.own;
            self.start_lookup(Purpose::Bootstrap, own, now);
        }
        // Publication.
        if self.publish_due.is_some_and(|t| t <= now) && self.publish_can_start() {
            if let Some(target) = self.my_item.as_ref().map(MutableItem::target) {
                self.publish_due = None;
                self.start_lookup(Purpose::Publish, target, now);
            }
        }
        // Our relay announcement.
        if self.relay_port.is_some()
            && self.relay_announce_due.is_some_and(|t| t <= now)
            && !self
                .lookups
                .iter()
                .any(|l| l.purpose == Purpose::AnnounceRelay)
        {
            self.relay_announce_due = None;
            self.start_lookup(Purpose::AnnounceRelay, relay_info_hash(), now);
        }
        // Waiting resolves.
        while self
            .lookups
            .iter()
            .filter(|l| matches!(l.purpose, Purpose::Resolve(_)))
            .count()
            < self.timing.max_lookups
        {
            let Some(sign) = self.waiting.pop_front() else {
                break;
            };
            let t = item::target(sign.as_bytes(), &self.salt);
            self.start_lookup(Purpose::Resolve(sign), t, now);
        }
        // Lookups that can go on (a slow query stopped holding one).
        let mut i = 0;
        while i < self.lookups.len() {
            let id = self.lookups[i].id;
            self.step(i, now);
            if self.lookups.get(i).is_some_and(|l| l.id == id) {
                i += 1;
            }
        }
        // Serving: token secrets, expired items.
        if self.serve && now >= self.rotate_at {
            self.secrets[1] = self.secrets[0];
            self.secrets[0] = random_id();
            self.rotate_at = now + TOKEN_ROTATION;
            self.store.retain(|_, s| s.expires > now);
            self.expire_peers(now);
        }
    }

    /// Whether a publication may start now (none is running: no publish lookup, no round of
    /// puts out).
    fn publish_can_start(&self) -> bool {
        self.round.is_none() && !self.lookups.iter().any(|l| l.purpose == Purpose::Publish)
    }

    /// Folds a reply's round trip into the smoothed one (gains 1/8 and 1/4, as TCP).
    fn time_reply(&mut self, sample: Duration) {
        self.rtt = Some(match self.rtt {
            None => (sample, sample / 2),
            Some((srtt, var)) => {
                let diff = srtt.abs_diff(sample);
                (srtt - srtt / 8 + sample / 8, var - var / 4 + diff / 4)
            }
        });
    }

    /// How long an unanswered query holds its lookup now (see [`Timing::slow_after`]).
    pub fn slow_after(&self) -> Duration {
        let t = &self.timing;
        match self.rtt {
            None => t.slow_after,
            Some((srtt, var)) => (srtt + var * 4).max(t.min_slow_after).min(t.slow_after),
        }
    }

    /// The next instant at which [`MainlineState::handle_timeout`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = &self.timing;
        let slow_after = self.slow_after();
        let mut d: Vec<Instant> = Vec::new();
        d.extend(self.outstanding.values().map(|p| p.sent + t.query_timeout));
        // Queries not sent twice yet (each is in `outstanding`; `handle_timeout` drops any
        // other).
        d.extend(
            self.resend
                .keys()
                .filter_map(|k| self.outstanding.get(k))
                .map(|p| p.sent + slow_after),
        );
        for l in &self.lookups {
            d.push(l.started + t.lookup_timeout);
            // Only `Asked` ones: a query past `slow_after` is `Slow`, its deadline consumed.
            for c in &l.cands {
                if let CState::Asked(at) = c.state {
                    d.push(at + slow_after);
                }
            }
        }
        // Each of these is a deadline only while `handle_timeout` can act on it; while it
        // cannot (the same kind of lookup runs, a round of puts is out), the end of that lookup
        // or round is the deadline, and a past instant here would wake us for nothing.
        if !self.lookups.iter().any(|l| l.purpose == Purpose::Bootstrap) {
            d.extend(self.bootstrap_at);
        }
        if self.my_item.is_some() && self.publish_can_start() {
            d.extend(self.publish_due);
        }
        if self.relay_port.is_some()
            && !self
                .lookups
                .iter()
                .any(|l| l.purpose == Purpose::AnnounceRelay)
        {
            d.extend(self.relay_announce_due);
        }
        if self.serve {
            d.push(self.rotate_at);
        }
        d.into_iter().min()
    }

    /// The next datagram to send, and where.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.transmit.pop_front()
    }

    /// The next nodeInfo to publish as `transports.nodeInfo`.
    pub fn poll_publication(&mut self) -> Option<Value> {
        self.publications.pop_front()
    }

    // ----- serving (not read-only) -----

    fn token_for(&self, ip: IpAddr, secret: usize) -> Vec<u8> {
        let octets = match ip {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        crypto::sha1(&[&self.secrets[secret], &octets])[..TOKEN_LEN].to_vec()
    }

    /// Answers a query of `len` bytes from `from`. Toward an address not in the table, what
    /// is sent beyond `len` bytes comes out of the [`AnswerBudget`] (see [`crate::proto::mainline::budget`]).
    fn serve_query(&mut self, msg: Message, len: usize, from: SocketAddr, now: Instant) {
        let rate = f64::from(self.timing.queries_per_sec);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.allowance = (self.allowance + elapsed * rate).min(rate * 2.0);
        if self.allowance < 1.0 {
            self.stats.queries_dropped += 1;
            return;
        }
        self.allowance -= 1.0;
        self.stats.queries_answered += 1;
        let Kind::Query(method) = &msg.kind else {
            return;
        };
        let proven = self.table.has_addr(&from);
        let a = &msg.fields;
        let mut r = Fields {
            id: Some(self.own),
            ..Fields::default()
        };
        let reply = match method {
            Method::Ping => Ok(()),
            Method::FindNode => match a.target {
                Some(t) => {
                    r.nodes = self.table.closest(&t, self.timing.k);
                    Ok(())
                }
                None => Err((203, "missing target")),
            },
            Method::GetPeers => match a.info_hash {
                Some(h) => {
                    // The peers announced here, and nodes closer (as libtorrent answers).
                    r.values = self
                        .peers
                        .get(&h)
                        .map(|l| {
                            l.iter()
                                .filter(|p| p.1 > now)
                                .map(|p| p.0)
                                .take(PEERS_PER_HASH)
                                .collect()
                        })
                        .unwrap_or_default();
                    r.nodes = self.table.closest(&h, self.timing.k);
                    r.token = Some(self.token_for(from.ip(), 0));
                    Ok(())
                }
                None => Err((203, "missing info_hash")),
            },
            Method::Get => match a.target {
                Some(t) => {
                    r.token = Some(self.token_for(from.ip(), 0));
                    match self.store.get(&t).filter(|s| s.expires > now) {
                        Some(s) => {
                            // BEP 44: a requester that has this seq already gets no value.
                            if a.seq.is_none_or(|q| q < s.item.seq) {
                                let item = s.item.clone();
                                item.fill(&mut r);
                                r.salt = None;
                            } else {
                                r.seq = Some(s.item.seq);
                            }
                        }
                        None => r.nodes = self.table.closest(&t, self.timing.k),
                    }
                    Ok(())
                }
                None => Err((203, "missing target")),
            },
            Method::Put => self.accept_put(a, &from, now),
            Method::AnnouncePeer => self.accept_announce(a, &from, now),
            Method::Other(_) => Err((204, "Method Unknown")),
        };
        let mut sent = 0;
        match reply {
            Ok(()) => {
                if let Some(n) = self.answer(msg.t.clone(), r, len, from, proven, now) {
                    sent = n;
                }
            }
            Err((code, text)) => {
                let out = Message::error(msg.t.clone(), code, text);
                if let Some(n) = self.push_within(from, &out, len, proven, now) {
                    sent = n;
                }
            }
        }
        // A node that queries us enters the table only once it answers a ping of ours, and
        // only while few pings are out; toward an unproven address the ping is excess too.
        if let (false, Some(id)) = (msg.ro, msg.fields.id) {
            let pings = self
                .outstanding
                .values()
                .filter(|p| p.what == What::Ping)
                .count();
            let excess = (sent + PING_BYTES).saturating_sub(len.max(sent));
            if pings < MAX_PINGS
                && !self.table.contains(&id, &from)
                && (proven || self.budget.take(self.source(&from), excess, now))
            {
                let f = Fields {
                    id: Some(self.own),
                    ..Fields::default()
                };
                self.send_query(from, Method::Ping, f, What::Ping, now);
            }
        }
    }

    fn source(&self, addr: &SocketAddr) -> Source {
        Source::of(addr, self.table.scope())
    }

    /// Sends `out` to `to` if it is proven, no longer than `len`, or its excess is in the
    /// budget; returns its length if it went out.
    fn push_within(
        &mut self,
        to: SocketAddr,
        out: &Message,
        len: usize,
        proven: bool,
        now: Instant,
    ) -> Option<usize> {
        let bytes = krpc::encode(out)?;
        let excess = bytes.len().saturating_sub(len);
        if !proven && !self.budget.take(self.source(&to), excess, now) {
            return None;
        }
        self.push_bytes(to, bytes)
    }

    /// Sends the response `r` under `t`: whole if [`Self::push_within`] allows it, else
    /// trimmed to `len` bytes (the value withheld, then fewer nodes, then no token), or not
    /// at all if even our id alone is longer. Returns the bytes sent.
    fn answer(
        &mut self,
        t: Vec<u8>,
        mut r: Fields,
        len: usize,
        to: SocketAddr,
        proven: bool,
        now: Instant,
    ) -> Option<usize> {
        let whole = Message::response(t.clone(), r.clone());
        if let Some(n) = self.push_within(to, &whole, len, proven, now) {
            return Some(n);
        }
        self.stats.answers_trimmed += 1;
        loop {
            if r.v.is_some() {
                (r.v, r.sig, r.k, r.seq, r.salt) = (None, None, None, None, None);
            } else if r.nodes.pop().is_none() && r.token.take().is_none() {
                return None;
            }
            let m = Message::response(t.clone(), r.clone());
            match krpc::encode(&m) {
                Some(b) if b.len() <= len => return self.push_bytes(to, b),
                Some(_) => {}
                None => return None,
            }
        }
    }

    fn token_ok(&self, token: Option<&Vec<u8>>, from: &SocketAddr) -> bool {
        token.is_some_and(|t| {
            *t == self.token_for(from.ip(), 0) || *t == self.token_for(from.ip(), 1)
        })
    }

    /// Drops the announced peers whose time is up (and the info-hashes left without any).
    fn expire_peers(&mut self, now: Instant) {
        self.peers.retain(|_, l| {
            l.retain(|p| p.1 > now);
            !l.is_empty()
        });
    }

    /// An `announce_peer`: token, info-hash and port checked; kept [`PEER_TTL`], at most
    /// [`PEERS_PER_HASH`] per info-hash (the oldest goes) and [`Timing::max_stored`] in all
    /// (beyond that, refused).
    fn accept_announce(
        &mut self,
        a: &Fields,
        from: &SocketAddr,
        now: Instant,
    ) -> Result<(), (i64, &'static str)> {
        if !self.token_ok(a.token.as_ref(), from) {
            return Err((203, "bad token"));
        }
        let Some(h) = a.info_hash else {
            return Err((203, "missing info_hash"));
        };
        let port = if a.implied_port {
            from.port()
        } else {
            a.port.ok_or((203, "missing port"))?
        };
        let peer = SocketAddr::new(from.ip(), port);
        let known = self
            .peers
            .get(&h)
            .is_some_and(|l| l.iter().any(|p| p.0 == peer));
        if !known && self.peers.values().map(Vec::len).sum::<usize>() >= self.timing.max_stored {
            self.expire_peers(now);
            if self.peers.values().map(Vec::len).sum::<usize>() >= self.timing.max_stored {
                return Err((202, "store full"));
            }
        }
        let list = self.peers.entry(h).or_default();
        list.retain(|p| p.0 != peer && p.1 > now);
        if list.len() >= PEERS_PER_HASH {
            list.remove(0);
        }
        list.push((peer, now + PEER_TTL));
        Ok(())
    }

    fn accept_put(
        &mut self,
        a: &Fields,
        from: &SocketAddr,
        now: Instant,
    ) -> Result<(), (i64, &'static str)> {
        if !self.token_ok(a.token.as_ref(), from) {
            return Err((203, "bad token"));
        }
        if a.k.is_none() {
            return Err((203, "only mutable items are stored"));
        }
        let salt = a.salt.clone().unwrap_or_default();
        let item = match MutableItem::from_fields(a, &salt, None) {
            Ok(i) => i,
            Err(ItemError::BadSignature) => return Err((206, "invalid signature")),
            Err(ItemError::TooLarge) => return Err((205, "message too big")),
            Err(_) => return Err((203, "incomplete item")),
        };
        let target = item.target();
        if let Some(prev) = self.store.get(&target).filter(|s| s.expires > now) {
            if a.cas.is_some_and(|c| c != prev.item.seq) {
                return Err((301, "CAS mismatch"));
            }
            if item.seq < prev.item.seq || (item.seq == prev.item.seq && item.v != prev.item.v) {
                return Err((302, "sequence number less than current"));
            }
        }
        if self.store.len() >= self.timing.max_stored && !self.store.contains_key(&target) {
            self.store.retain(|_, s| s.expires > now);
            if self.store.len() >= self.timing.max_stored {
                if let Some(k) = self
                    .store
                    .iter()
                    .min_by_key(|(_, s)| s.expires)
                    .map(|(k, _)| *k)
                {
                    self.store.remove(&k);
                }
            }
        }
        self.store.insert(
            target,
            Stored {
                item,
                expires: now + ITEM_TTL,
            },
        );
        Ok(())
    }
}

/// Adds a candidate unless it is out of scope, ours, or known (by address or id); keeps at
/// most [`MAX_CANDIDATES`] (the farthest fresh ones go first).
fn add_candidate(
    cands: &mut Vec<Candidate>,
    id: Option<NodeId>,
    addr: SocketAddr,
    scope: Scope,
    own: &NodeId,
) {
    if !scope.accepts(&addr)
        || id.as_ref() == Some(own)
        || cands
            .iter()
            .any(|c| c.addr == addr || (id.is_some() && c.id == id))
    {
        return;
    }
    cands.push(Candidate {
        id,
        addr,
        state: CState::Fresh,
        token: None,
    });
}

fn sort_candidates(cands: &mut Vec<Candidate>, target: &NodeId) {
    cands.sort_by_key(|c| c.id.map_or([0u8; ID_LEN], |i| distance(&i, target)));
    // Over the bound: drop the farthest that are not waiting for an answer.
    while cands.len() > MAX_CANDIDATES {
        match cands
            .iter()
            .rposition(|c| !matches!(c.state, CState::Asked(_) | CState::Slow))
        {
            Some(i) => {
                cands.remove(i);
            }
            None => break,
        }
    }
}

/// Among the `k` closest candidates that have not failed (a query unanswered after
/// `slow_after` counts as failed here): the first not yet asked, and how many are asked and
/// not yet slow.
fn frontier(
    cands: &[Candidate],
    k: usize,
    slow_after: Duration,
    now: Instant,
) -> (Option<usize>, usize) {
    let mut fresh = None;
    let mut holding = 0;
    let mut seen = 0;
    for (i, c) in cands.iter().enumerate() {
        if seen >= k {
            break;
        }
        match c.state {
            CState::Failed | CState::Slow => continue,
            CState::Asked(at) if now.saturating_duration_since(at) >= slow_after => continue,
            CState::Asked(_) => holding += 1,
            CState::Fresh => {
                if fresh.is_none() {
                    fresh = Some(i);
                }
            }
            CState::Answered => {}
        }
        seen += 1;
    }
    (fresh, holding)
}

/// The signId whose item `target` is, for tests and tools: SHA-1 of its key and `salt`.
pub fn target_of(sign: &SignId, salt: &[u8]) -> NodeId {
    item::target(sign.as_bytes(), salt)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "lossy_tests.rs"]
mod lossy_tests;
