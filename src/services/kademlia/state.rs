//! The sans-IO Kademlia node: routing table, iterative lookups, the RPC handlers of `kad`
//! 1.6.5, the item store, expiry, replication, republication and bucket refresh. It takes
//! received messages and the time (a monotonic `Instant` for timers, the wall clock in
//! milliseconds for nonces and item timestamps) and hands out messages to send
//! ([`KadState::poll_transmit`]) and events ([`KadState::poll_event`]). It never touches a
//! socket or a clock, so tests drive it directly.
//!
//! # Lookups
//!
//! Iterative, `alpha` RPCs in flight, over a shortlist of at most `3k` candidates ordered by
//! distance; a lookup ends when the `k` closest candidates that did not fail have all
//! answered, when a value is found (`FIND_VALUE`), when the node looked for answered (a
//! resolution), or after [`Config::lookup_timeout`]. This is the textbook procedure rather than
//! `kad`'s rounds of `alpha` (which stop as soon as a round brings nothing closer); on the wire
//! the messages are the same. As `kad` does, a contact that times out is removed from the
//! table, a value found is also stored at the closest node that answered without it, and a put
//! stores at the `k` closest nodes and keeps a local copy.
//!
//! Two rules of ours keep lookups quick when nodes have gone: an RPC unanswered for
//! [`Config::stall`] frees its `alpha` slot (the lookup asks other nodes meanwhile) and, in a
//! node lookup that `k` nodes already answered, its place among the `k` closest (the lookup
//! may end without it; a value lookup waits for it, since the closest nodes hold the value),
//! and a
//! node that timed out is left out of lookups for [`Config::dead_for`] even when others still
//! list it (until it is heard from again).
//!
//! # Records and what is refused
//!
//! Any JSON value may be stored under any key, as with the original, except for the keys
//! that name a node, whose records anyone can check:
//!
//! - a key that is a 32-byte base64 key (a signId or a boxId) holds only the other id of the
//!   same node: `signId -> boxId` (the record the original publishes) or `boxId -> signId` (the
//!   one `directory.get` needs: the platform asks with a boxId); the value must be the
//!   conversion, whoever stores it;
//! - `nodeInfo:<signId>` holds that node's nodeInfo, and only that node may store it (the
//!   STORE must come from it; the nodeInfo's ids must match). The original has no such record;
//!   a resolution falls back to it when the node itself cannot be found.
//! - `relay:<slot>` ([`relay_key`], slot 0 to [`RELAY_SLOTS`]` - 1`) holds the nodeInfo of a
//!   node that offers relaying (one of its endpoints says so), stored by that node, in the slot
//!   its signId falls in ([`relay_slot`]).
//!
//! # Relays
//!
//! A node offering relaying announces itself once joined, when its nodeInfo changes, and every
//! [`Config::relay_announce`], by storing its nodeInfo under its relay slot. A node that needs
//! a relay ([`KadState::find_relays`]) looks up all the slots; each nodeInfo found that offers
//! relaying is reported as a [`KadEvent::NodeInfo`], which the platform takes as a relay
//! candidate. A slot holds one relay at each storing node (relays in the same slot replace one
//! another), so a search sees at most [`RELAY_SLOTS`] relays at a time, spread by signId; a
//! relay that has gone stays listed until its record expires ([`Config::expire`]), and the
//! platform gives it up when it cannot reach it.
//!
//! Memory is bounded: the table (see [`super::table`]), [`Config::max_pending`] RPCs,
//! [`Config::max_lookups`] lookups, [`Config::max_items`] items of at most
//! [`Config::max_value_bytes`], [`Config::replay_cache`] remembered signatures.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::id::NodeId;
use super::json::JsValue;
use super::rpc::{self, Contact, Opened};
use super::table::{Table, Update};
use crate::crypto::SignKeyPair;
use crate::identity::{BoxId, KeyCache, SignId};

/// Prefix of the key of a node's own nodeInfo record.
pub const NODE_INFO_PREFIX: &str = "nodeInfo:";
/// Prefix of the keys under which relays announce themselves ([`relay_key`]).
pub const RELAY_PREFIX: &str = "relay:";
/// Slots of relay records: a relay search looks up this many keys.
pub const RELAY_SLOTS: u8 = 8;

/// The key of relay slot `slot` (`relay:0` .. `relay:7`).
pub fn relay_key(slot: u8) -> String {
    format!("{RELAY_PREFIX}{slot}")
}

/// The relay slot of the node `sign` (its first byte modulo [`RELAY_SLOTS`]).
pub fn relay_slot(sign: &SignId) -> u8 {
    sign.0 .0[0] % RELAY_SLOTS
}

/// Whether a nodeInfo lists an endpoint that offers relaying (`"relay": true` in its
/// `transportInfo`).
pub fn offers_relay(info: &JsValue) -> bool {
    let Some(JsValue::Arr(endpoints)) = info.get("connectionInfo") else {
        return false;
    };
    endpoints.iter().any(|e| {
        e.get("transportInfo")
            .and_then(|t| t.get("relay"))
            .is_some_and(|r| matches!(r, JsValue::Bool(true)))
    })
}

/// Parameters (the defaults are `kad` 1.6.5's constants).
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Bucket size and replication factor (`K`, 20).
    pub k: usize,
    /// Parallel RPCs of a lookup (`ALPHA`, 3).
    pub alpha: usize,
    /// Time to wait for an answer (`T_RESPONSETIMEOUT`, 5 s).
    pub rpc_timeout: Duration,
    /// Longest a lookup may run (60 s).
    pub lookup_timeout: Duration,
    /// A full bucket's head seen more recently than this is not pinged (`PING_TTL`, 300 s).
    pub ping_ttl: Duration,
    /// Bucket refresh interval (`T_REFRESH`, 3600 s).
    pub refresh: Duration,
    /// Replication interval (`T_REPLICATE`, 3600 s).
    pub replicate: Duration,
    /// Age after which our own items are published again (`T_REPUBLISH`, 86400 s).
    pub republish: Duration,
    /// Age after which items are dropped (`T_EXPIRE`, 86405 s).
    pub expire: Duration,
    /// An RPC of a lookup unanswered for this long stops counting against `alpha` and, in a
    /// node lookup that `k` nodes answered, among the closest nodes, so the lookup goes on
    /// with others and may end without it (2 s, well above a JS node's first answer; `kad` has no such rule and waits
    /// for each round).
    pub stall: Duration,
    /// How long a node that did not answer is kept out of lookups (10 min; it comes back as
    /// soon as it is heard from).
    pub dead_for: Duration,
    /// RPCs awaiting an answer at most (256).
    pub max_pending: usize,
    /// Lookups running at most (64).
    pub max_lookups: usize,
    /// Items stored at most (4096).
    pub max_items: usize,
    /// Largest key (512 bytes).
    pub max_key_bytes: usize,
    /// Largest value, as JSON text (16 KiB).
    pub max_value_bytes: usize,
    /// Signatures remembered to refuse replays (8192).
    pub replay_cache: usize,
    /// A node offering relaying stores its relay record again this often (10 min; see
    /// "Relays" in the module docs).
    pub relay_announce: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            k: 20,
            alpha: 3,
            rpc_timeout: Duration::from_secs(5),
            lookup_timeout: Duration::from_secs(60),
            ping_ttl: Duration::from_secs(300),
            stall: Duration::from_secs(2),
            dead_for: Duration::from_secs(600),
            refresh: Duration::from_secs(3600),
            replicate: Duration::from_secs(3600),
            republish: Duration::from_secs(86_400),
            expire: Duration::from_secs(86_405),
            max_pending: 256,
            max_lookups: 64,
            max_items: 4096,
            max_key_bytes: 512,
            max_value_bytes: 16 * 1024,
            replay_cache: 8192,
            relay_announce: Duration::from_secs(600),
        }
    }
}

/// A message to send: `payload` (JSON text) as an `ms` message on topic `kademlia` to `to`.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// The destination.
    pub to: Contact,
    /// The JSON text.
    pub payload: String,
}

/// Who asked for a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `self.directory.get` (answered with `directory.getReply`, only when found, as the
    /// original).
    Directory,
    /// The service's own API (`dht.get`; answered either way).
    Api,
    /// A resolution's fallback to a node's `nodeInfo:` record: a nodeInfo found is reported
    /// as [`KadEvent::NodeInfo`], nothing found as [`KadEvent::NotFound`]; never a
    /// [`KadEvent::Value`].
    Resolution,
    /// A relay search ([`KadState::find_relays`]): a relay's nodeInfo found is reported as
    /// [`KadEvent::NodeInfo`]; nothing else is reported.
    Relay,
}

/// What the node tells its host.
#[derive(Debug, Clone)]
pub enum KadEvent {
    /// A nodeInfo the platform should know (a contact heard from, a seed, a node resolved):
    /// publish it as `transports.nodeInfo`. Each nodeInfo is reported when new or changed.
    NodeInfo(serde_json::Value),
    /// A value lookup ended.
    Value {
        /// The key.
        key: String,
        /// Who asked.
        origin: Origin,
        /// The value, or why not.
        result: Result<serde_json::Value, String>,
    },
    /// A put ended (stored at that many nodes; a local copy is always kept).
    Stored {
        /// The key.
        key: String,
        /// Nodes that acknowledged the STORE.
        acks: usize,
    },
    /// A resolution found nothing.
    NotFound(String),
    /// The first join lookup ended: the node is part of the DHT.
    Joined,
}

/// A finished lookup, for measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupRecord {
    /// What it was.
    pub kind: LookupKindTag,
    /// How long it ran.
    pub duration: Duration,
    /// RPCs it sent.
    pub rpcs: u32,
    /// Whether it found what it looked for (for node lookups: ended normally).
    pub found: bool,
}

/// The kind of a lookup, without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupKindTag {
    /// Our own id, when joining.
    Join,
    /// A random id in a bucket.
    Refresh,
    /// A node, for `requestNodeInfo`.
    Resolve,
    /// A value.
    Get,
    /// The nodes to store a value at.
    Put,
    /// A relay slot ([`KadState::find_relays`]).
    Relay,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KadStats {
    /// Messages sent.
    pub sent: u64,
    /// Messages received and accepted.
    pub accepted: u64,
    /// Messages refused (malformed, forged, stale, replayed, wrong sender).
    pub refused: u64,
    /// STOREs refused (record rules, size, store full).
    pub stores_refused: u64,
    /// RPCs that timed out.
    pub timeouts: u64,
    /// RPCs not sent because too many were pending.
    pub pending_full: u64,
}

#[derive(Debug, Clone)]
struct Item {
    value: JsValue,
    publisher: String,
    timestamp: f64,
    bytes: usize,
}

impl Item {
    fn to_js(&self, key: &str) -> JsValue {
        JsValue::obj()
            .with("key", JsValue::Str(key.to_owned()))
            .with("value", self.value.clone())
            .with("publisher", JsValue::Str(self.publisher.clone()))
            .with("timestamp", JsValue::Num(self.timestamp))
    }
}

#[derive(Debug, Clone)]
enum Kind {
    Join,
    Refresh,
    Resolve { target: BoxId, sign: Option<SignId> },
    Get { origin: Origin },
    Put { item: JsValue },
}

/// A put whose STOREs are out.
#[derive(Debug, Clone)]
struct PutWait {
    key: String,
    outstanding: usize,
    acks: usize,
    rpcs: u32,
    started: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CandState {
    New,
    InFlight,
    Answered,
    Failed,
}

#[derive(Debug, Clone)]
struct Candidate {
    contact: Contact,
    distance: [u8; 20],
    state: CandState,
    has_value: bool,
    /// When its RPC went out.
    sent: Option<Instant>,
    /// Its RPC has been out longer than [`Config::stall`]: it no longer holds one of the
    /// `alpha` slots.
    stalled: bool,
}

#[derive(Debug, Clone)]
struct Lookup {
    kind: Kind,
    key: String,
    target: NodeId,
    value: bool,
    shortlist: Vec<Candidate>,
    in_flight: usize,
    rpcs: u32,
    started: Instant,
    found: Option<JsValue>,
}

#[derive(Debug, Clone)]
enum Purpose {
    Lookup(u64),
    PingHead(usize),
    Store(Option<u64>),
}

#[derive(Debug, Clone)]
struct Pending {
    to: NodeId,
    purpose: Purpose,
    deadline: Instant,
}

/// The node (see the module docs). Cloning copies the whole state (a fuzz target starts
/// every input from one clone).
#[derive(Clone)]
pub struct KadState {
    cfg: Config,
    sign: SignKeyPair,
    me: Contact,
    keys: KeyCache,
    table: Table,
    pending: HashMap<String, Pending>,
    lookups: HashMap<u64, Lookup>,
    puts: HashMap<u64, PutWait>,
    next_lookup: u64,
    items: HashMap<String, Item>,
    replay: HashMap<[u8; 32], f64>,
    dead: HashMap<NodeId, Instant>,
    reported: HashMap<BoxId, Contact>,
    connected: Vec<BoxId>,
    out: VecDeque<Transmit>,
    events: VecDeque<KadEvent>,
    finished: VecDeque<LookupRecord>,
    joined: bool,
    next_refresh: Instant,
    next_replicate: Instant,
    /// When our relay record is stored again (while our nodeInfo offers relaying).
    next_relay_announce: Option<Instant>,
    stats: KadStats,
    dirty: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_millis() as f64
}

impl KadState {
    /// A node whose nodeInfo is `my_node_info` (it must hold our own ids), signing with `sign`.
    pub fn new(
        cfg: Config,
        sign: SignKeyPair,
        my_node_info: &serde_json::Value,
        now: Instant,
        now_ms: f64,
    ) -> Option<KadState> {
        let mut keys = KeyCache::new(4096);
        let me = Contact::from_node_info(&JsValue::from_serde(my_node_info), &mut keys, now_ms)?;
        if me.sign_id.0 != sign.public {
            return None;
        }
        Some(KadState {
            table: Table::new(me.id, cfg.k),
            cfg,
            sign,
            me,
            keys,
            pending: HashMap::new(),
            lookups: HashMap::new(),
            puts: HashMap::new(),
            next_lookup: 0,
            items: HashMap::new(),
            replay: HashMap::new(),
            dead: HashMap::new(),
            reported: HashMap::new(),
            connected: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            finished: VecDeque::new(),
            joined: false,
            next_refresh: now + cfg.refresh,
            next_replicate: now + cfg.replicate,
            next_relay_announce: None,
            stats: KadStats::default(),
            dirty: false,
        })
    }

    /// Our node id.
    pub fn id(&self) -> NodeId {
        self.me.id
    }

    fn is_dead(&self, id: &NodeId, now: Instant) -> bool {
        self.dead
            .get(id)
            .is_some_and(|t| now.saturating_duration_since(*t) < self.cfg.dead_for)
    }

    /// The box key of a signId (conversions cached).
    pub fn box_of(&mut self, sign: &SignId) -> Option<BoxId> {
        self.keys.box_id(sign)
    }

    /// Counters.
    pub fn stats(&self) -> KadStats {
        self.stats
    }

    /// Contacts in the routing table.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// The routing table's contacts' nodeInfos.
    pub fn contacts(&self) -> Vec<serde_json::Value> {
        self.table.iter().map(|c| c.node_info.to_serde()).collect()
    }

    /// Items stored here.
    pub fn items_len(&self) -> usize {
        self.items.len()
    }

    /// RPCs awaiting an answer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Lookups running.
    pub fn lookups_len(&self) -> usize {
        self.lookups.len()
    }

    /// Whether the first join ended.
    pub fn is_joined(&self) -> bool {
        self.joined
    }

    /// The local copy of an item's value.
    pub fn local_value(&self, key: &str) -> Option<serde_json::Value> {
        self.items.get(key).map(|i| i.value.to_serde())
    }

    /// Our nodeInfo changed: later messages carry the new one, and our records are stored
    /// again once joined (the original stores `signId -> boxId` on every change).
    pub fn set_my_node_info(&mut self, info: &serde_json::Value, now: Instant, now_ms: f64) {
        let js = JsValue::from_serde(info);
        match Contact::from_node_info(&js, &mut self.keys, now_ms) {
            Some(c) if c.id == self.me.id => {
                if c.node_info != self.me.node_info {
                    self.me.node_info = c.node_info;
                    if self.joined {
                        self.publish_records(now, now_ms);
                    }
                }
            }
            _ => log::debug!("kademlia: our new nodeInfo is not ours; ignored"),
        }
    }

    /// Joins through a node (a seed, a bootstrap nodeInfo from mDNS): `kad`'s `connect`, once
    /// per node.
    pub fn connect(&mut self, node_info: &serde_json::Value, now: Instant, now_ms: f64) {
        self.connect_many(std::slice::from_ref(node_info), now, now_ms);
    }

    /// Joins through several nodes at once (one lookup of our id, all of them as its first
    /// candidates): the contacts restored from storage.
    pub fn connect_many(&mut self, infos: &[serde_json::Value], now: Instant, now_ms: f64) {
        let mut fresh = Vec::new();
        for info in infos {
            let js = JsValue::from_serde(info);
            let Some(c) = Contact::from_node_info(&js, &mut self.keys, now_ms) else {
                log::debug!("kademlia: invalid bootstrap nodeInfo ignored");
                continue;
            };
            if c.id == self.me.id || self.connected.contains(&c.box_id) {
                continue;
            }
            if self.connected.len() >= 1024 {
                self.connected.remove(0);
            }
            self.connected.push(c.box_id);
            self.report(&c);
            fresh.push(c);
        }
        if fresh.is_empty() {
            return;
        }
        let id = self.start_lookup(Kind::Join, self.me.id.to_hex(), self.me.id, false, now);
        if let Some(id) = id {
            if let Some(l) = self.lookups.get_mut(&id) {
                add_candidates(l, fresh.into_iter(), self.me.id, 3 * self.cfg.k);
            }
            self.step(id, now, now_ms);
        }
    }

    /// `self.transports.requestNodeInfo`: a signId or a boxId. Answered from the table when the
    /// node is there, otherwise by a lookup of its node id.
    pub fn request_node_info(&mut self, key: &str, now: Instant, now_ms: f64) {
        let Ok(as_box) = key.parse::<BoxId>() else {
            return;
        };
        let mut targets = vec![(as_box, None)];
        if let Ok(sign) = key.parse::<SignId>() {
            if let Some(b) = self.keys.box_id(&sign) {
                targets.insert(0, (b, Some(sign)));
            }
        }
        for (target, _) in &targets {
            let id = NodeId::of_box_id(&target.to_string());
            let known = self
                .table
                .get(&id)
                .or_else(|| self.reported.get(target))
                .cloned();
            if let Some(c) = known {
                self.reported.remove(&c.box_id);
                self.report(&c);
                return;
            }
        }
        for (target, sign) in targets {
            let id = NodeId::of_box_id(&target.to_string());
            let running = self
                .lookups
                .values()
                .any(|l| matches!(l.kind, Kind::Resolve { target: t, .. } if t == target));
            if !running {
                let kind = Kind::Resolve { target, sign };
                if let Some(l) = self.start_lookup(kind, id.to_hex(), id, false, now) {
                    self.step(l, now, now_ms);
                }
            }
        }
    }

    /// `self.directory.get`: the value at `key` (a boxId of a node in the table is answered
    /// from it).
    pub fn get(&mut self, key: &str, origin: Origin, now: Instant, now_ms: f64) {
        if let Ok(b) = key.parse::<BoxId>() {
            if let Some(c) = self.table.get(&NodeId::of_box_id(key)) {
                if c.box_id == b {
                    let value = serde_json::Value::String(c.sign_id.to_string());
                    self.events.push_back(KadEvent::Value {
                        key: key.to_owned(),
                        origin,
                        result: Ok(value),
                    });
                    return;
                }
            }
        }
        let target = NodeId::of_key(key);
        match self.start_lookup(Kind::Get { origin }, key.to_owned(), target, true, now) {
            Some(l) => self.step(l, now, now_ms),
            None => self.events.push_back(KadEvent::Value {
                key: key.to_owned(),
                origin,
                result: Err("too many lookups".into()),
            }),
        }
    }

    /// `self.directory.put`: stores `value` at `key` (at the `k` closest nodes, and here).
    pub fn put(&mut self, key: &str, value: &serde_json::Value, now: Instant, now_ms: f64) {
        let value = JsValue::from_serde(value);
        self.put_js(key, value, self.me.id.to_hex(), now_ms, true, now, now_ms);
    }

    #[allow(clippy::too_many_arguments)]
    fn put_js(
        &mut self,
        key: &str,
        value: JsValue,
        publisher: String,
        timestamp: f64,
        local: bool,
        now: Instant,
        now_ms: f64,
    ) {
        if key.len() > self.cfg.max_key_bytes || value.stringify().len() > self.cfg.max_value_bytes
        {
            self.events.push_back(KadEvent::Stored {
                key: key.to_owned(),
                acks: 0,
            });
            return;
        }
        let item = Item {
            bytes: value.stringify().len(),
            value,
            publisher,
            timestamp,
        };
        let js = item.to_js(key);
        if local {
            self.store_local(key, item);
        }
        let target = NodeId::of_key(key);
        if let Some(l) =
            self.start_lookup(Kind::Put { item: js }, key.to_owned(), target, false, now)
        {
            self.step(l, now, now_ms);
        }
    }

    fn store_local(&mut self, key: &str, item: Item) -> bool {
        if !self.items.contains_key(key) && self.items.len() >= self.cfg.max_items {
            return false;
        }
        self.items.insert(key.to_owned(), item);
        self.dirty = true;
        true
    }

    /// A message received on topic `kademlia` from the node whose box key CurveCP
    /// authenticated (`from_box`; `from_sign` when the platform knows its signId).
    pub fn handle_message(
        &mut self,
        from_box: BoxId,
        from_sign: Option<SignId>,
        payload: &[u8],
        now: Instant,
        now_ms: f64,
    ) {
        let opened = match rpc::open(payload, &mut self.keys, now_ms) {
            Ok(o) => o,
            Err(e) => {
                log::debug!("kademlia: message from {from_box} refused: {e}");
                self.stats.refused += 1;
                return;
            }
        };
        if opened.contact.box_id != from_box
            || from_sign.is_some_and(|s| s != opened.contact.sign_id)
        {
            log::debug!("kademlia: contact is not the sender {from_box}; refused");
            self.stats.refused += 1;
            return;
        }
        if opened.contact.id == self.me.id {
            self.stats.refused += 1;
            return;
        }
        let mut tag = [0u8; 32];
        tag.copy_from_slice(&opened.signature[..32]);
        if self.replay.contains_key(&tag) {
            log::debug!("kademlia: replayed message from {from_box} refused");
            self.stats.refused += 1;
            return;
        }
        if self.replay.len() >= self.cfg.replay_cache {
            self.replay
                .retain(|_, t| now_ms - *t <= rpc::NONCE_WINDOW_MS);
            if self.replay.len() >= self.cfg.replay_cache {
                // Still full of live entries: forget the oldest half. A replay of one of those
                // can only repeat an RPC that was already valid a few seconds ago.
                let mut ts: Vec<f64> = self.replay.values().copied().collect();
                ts.sort_by(f64::total_cmp);
                let cut = ts[ts.len() / 2];
                self.replay.retain(|_, t| *t > cut);
            }
        }
        self.replay.insert(tag, opened.nonce);
        self.stats.accepted += 1;
        self.seen(opened.contact.clone(), now, now_ms);
        match opened.method.clone() {
            Some(m) => self.handle_request(&m, opened, now, now_ms),
            None => self.handle_response(opened, now, now_ms),
        }
    }

    /// A contact heard from directly: into the table, reported to the platform.
    fn seen(&mut self, c: Contact, now: Instant, now_ms: f64) {
        self.dead.remove(&c.id);
        self.report(&c);
        match self.table.update(c, now_ms, ms(self.cfg.ping_ttl)) {
            Update::Added => {
                self.dirty = true;
                // kad's 'connect': the first contact makes a node that is not joining through
                // anyone (the first node of a DHT) part of it.
                if !self.joined && !self.lookups.values().any(|l| matches!(l.kind, Kind::Join)) {
                    self.joined = true;
                    self.events.push_back(KadEvent::Joined);
                    self.publish_records(now, now_ms);
                }
            }
            Update::Refreshed(changed) => self.dirty |= changed,
            Update::Dropped => {}
            Update::PingHead(bucket, head) => {
                let params = JsValue::obj().with("contact", self.me.to_js());
                if let Some(id) = self.send_request(
                    &head,
                    "PING",
                    params,
                    Purpose::PingHead(bucket),
                    now,
                    now_ms,
                ) {
                    self.table.bucket_mut(bucket).pinging = Some(id);
                }
            }
        }
    }

    /// Tells the platform about a nodeInfo, once per change.
    fn report(&mut self, c: &Contact) {
        if self
            .reported
            .get(&c.box_id)
            .is_some_and(|r| r.node_info == c.node_info)
        {
            return;
        }
        if self.reported.len() >= 4096 {
            self.reported.clear();
        }
        self.reported.insert(c.box_id, c.clone());
        self.events
            .push_back(KadEvent::NodeInfo(c.node_info.to_serde()));
    }

    fn reply(&mut self, to: &Contact, id: &JsValue, result: JsValue, now_ms: f64) {
        self.reply_message(to, rpc::response(id, result), now_ms);
    }

    fn reply_message(&mut self, to: &Contact, msg: JsValue, now_ms: f64) {
        let payload = rpc::seal(msg, now_ms.floor(), &self.sign);
        self.stats.sent += 1;
        self.out.push_back(Transmit {
            to: to.clone(),
            payload,
        });
    }

    fn nodes_js(&self, key: &str, requester: &NodeId) -> JsValue {
        let near = self
            .table
            .closest(&NodeId::of_key(key), self.cfg.k, Some(requester));
        JsValue::Arr(near.iter().map(Contact::to_js).collect())
    }

    fn handle_request(&mut self, method: &str, m: Opened, now: Instant, now_ms: f64) {
        let from = m.contact.clone();
        let me = self.me.to_js();
        match method {
            "PING" => self.reply(&from, &m.id, JsValue::obj().with("contact", me), now_ms),
            "FIND_NODE" => {
                let Some(key) = m.body.get("key").and_then(JsValue::as_str) else {
                    self.stats.refused += 1;
                    return;
                };
                let nodes = self.nodes_js(key, &from.id);
                let result = JsValue::obj().with("nodes", nodes).with("contact", me);
                self.reply(&from, &m.id, result, now_ms);
            }
            "FIND_VALUE" => {
                let Some(key) = m.body.get("key").and_then(JsValue::as_str) else {
                    self.stats.refused += 1;
                    return;
                };
                self.expire_item(key, now_ms);
                let result = match self.items.get(key) {
                    Some(item) => JsValue::obj()
                        .with("item", item.to_js(key))
                        .with("contact", me),
                    None => JsValue::obj()
                        .with("nodes", self.nodes_js(key, &from.id))
                        .with("contact", me),
                };
                self.reply(&from, &m.id, result, now_ms);
            }
            "STORE" => {
                if self.accept_store(&m, now_ms) {
                    self.reply(&from, &m.id, JsValue::obj().with("contact", me), now_ms);
                } else {
                    // kad answers nothing to a STORE it refuses, and its sender then drops us
                    // from its table as unresponsive. We answer with an error (kad's form,
                    // which kad takes as an answer), so refusing a record costs nobody a contact.
                    self.stats.stores_refused += 1;
                    let error = JsValue::obj()
                        .with("code", JsValue::Num(-32603.0))
                        .with("message", JsValue::Str("STORE refused".into()));
                    let msg = rpc::response(&m.id, JsValue::obj().with("contact", me))
                        .with("error", error);
                    self.reply_message(&from, msg, now_ms);
                }
            }
            _ => {}
        }
        let _ = now;
    }

    /// A STORE: the item's checks (as `kad`'s `Item` and ours), the record rules, the bounds.
    /// The timestamp becomes ours, as `kad` does.
    fn accept_store(&mut self, m: &Opened, now_ms: f64) -> bool {
        let Some(item) = m.body.get("item") else {
            return false;
        };
        let (Some(key), Some(value), Some(publisher)) = (
            item.get("key").and_then(JsValue::as_str),
            item.get("value"),
            item.get("publisher").and_then(JsValue::as_str),
        ) else {
            return false;
        };
        if NodeId::from_hex(publisher).is_none() || key.len() > self.cfg.max_key_bytes {
            return false;
        }
        let bytes = value.stringify().len();
        if bytes > self.cfg.max_value_bytes {
            return false;
        }
        if !self.record_allowed(key, value, Some(&m.contact)) {
            log::debug!("kademlia: record for {key:?} refused");
            return false;
        }
        self.store_local(
            key,
            Item {
                value: value.clone(),
                publisher: publisher.to_owned(),
                timestamp: now_ms.floor(),
                bytes,
            },
        )
    }

    /// The record rules of the module docs. `storer`: who sends the STORE (`None`: a
    /// value found by a lookup, checked the same way except for who stored it).
    fn record_allowed(&mut self, key: &str, value: &JsValue, storer: Option<&Contact>) -> bool {
        if let Some(sign_text) = key.strip_prefix(NODE_INFO_PREFIX) {
            let Ok(sign) = sign_text.parse::<SignId>() else {
                return false;
            };
            let Some(c) = Contact::from_node_info(value, &mut self.keys, 0.0) else {
                return false;
            };
            return c.sign_id == sign && storer.is_none_or(|s| s.sign_id == sign);
        }
        if key.starts_with(RELAY_PREFIX) {
            return self
                .relay_record(key, value)
                .is_some_and(|c| storer.is_none_or(|s| s.sign_id == c.sign_id));
        }
        if key.len() == 44 {
            if let Ok(k_box) = key.parse::<BoxId>() {
                let Some(v) = value.as_str() else {
                    return false;
                };
                // signId -> boxId
                if let Ok(sign) = key.parse::<SignId>() {
                    if self.keys.box_id(&sign).is_some_and(|b| b.to_string() == v) {
                        return true;
                    }
                }
                // boxId -> signId
                if let Ok(sign) = v.parse::<SignId>() {
                    if sign.to_string() == v && self.keys.box_id(&sign) == Some(k_box) {
                        return true;
                    }
                }
                return false;
            }
        }
        true
    }

    /// The relay named by a `relay:<slot>` record, if the record is one: a valid nodeInfo
    /// offering relaying, in its node's slot.
    fn relay_record(&mut self, key: &str, value: &JsValue) -> Option<Contact> {
        let slot: u8 = key.strip_prefix(RELAY_PREFIX)?.parse().ok()?;
        if key != relay_key(slot) || slot >= RELAY_SLOTS || !offers_relay(value) {
            return None;
        }
        let c = Contact::from_node_info(value, &mut self.keys, 0.0)?;
        (relay_slot(&c.sign_id) == slot).then_some(c)
    }

    /// Looks for relays: a lookup of each relay slot (see "Relays" in the module docs); the
    /// relays found are reported as [`KadEvent::NodeInfo`]. Not started while an earlier
    /// search runs, nor before the node knows any other.
    pub fn find_relays(&mut self, now: Instant, now_ms: f64) {
        let running = self.lookups.values().any(|l| {
            matches!(
                l.kind,
                Kind::Get {
                    origin: Origin::Relay
                }
            )
        });
        if running || self.table.is_empty() {
            return;
        }
        for slot in 0..RELAY_SLOTS {
            self.get(&relay_key(slot), Origin::Relay, now, now_ms);
        }
    }

    /// Stores our relay record if our nodeInfo offers relaying (and plans the next time).
    fn announce_relay(&mut self, now: Instant, now_ms: f64) {
        let key = relay_key(relay_slot(&self.me.sign_id));
        if !offers_relay(&self.me.node_info) {
            // No longer a relay: our copy is not republished (others' expire).
            let me = self.me.id.to_hex();
            if self.items.get(&key).is_some_and(|i| i.publisher == me) {
                self.items.remove(&key);
                self.dirty = true;
            }
            self.next_relay_announce = None;
            return;
        }
        log::debug!("kademlia: announcing ourselves as a relay under {key}");
        let (info, me) = (self.me.node_info.clone(), self.me.id.to_hex());
        self.put_js(&key, info, me, now_ms.floor(), true, now, now_ms);
        self.next_relay_announce = Some(now + self.cfg.relay_announce);
    }

    fn expire_item(&mut self, key: &str, now_ms: f64) {
        if let Some(i) = self.items.get(key) {
            if now_ms >= i.timestamp + ms(self.cfg.expire) {
                self.items.remove(key);
                self.dirty = true;
            }
        }
    }

    fn handle_response(&mut self, m: Opened, now: Instant, now_ms: f64) {
        let Some(id) = m.id.as_str() else {
            return;
        };
        let Some(p) = self.pending.get(id) else {
            log::debug!("kademlia: late or unknown response dropped");
            return;
        };
        if p.to != m.contact.id {
            log::debug!("kademlia: response from another node than asked; dropped");
            return;
        }
        let p = self.pending.remove(id).expect("checked");
        match p.purpose {
            Purpose::Lookup(l) => self.lookup_answer(l, &m, now, now_ms),
            Purpose::PingHead(b) => {
                let bucket = self.table.bucket_mut(b);
                bucket.pinging = None;
                bucket.candidate = None;
            }
            Purpose::Store(Some(l)) => self.store_answer(l, !m.error, now),
            Purpose::Store(None) => {}
        }
    }

    /// A STORE of a put was answered (`ok`) or timed out.
    fn store_answer(&mut self, id: u64, ok: bool, now: Instant) {
        let Some(p) = self.puts.get_mut(&id) else {
            return;
        };
        p.outstanding = p.outstanding.saturating_sub(1);
        p.acks += usize::from(ok);
        if p.outstanding == 0 {
            let p = self.puts.remove(&id).expect("present");
            self.end_put(p, now);
        }
    }

    fn send_request(
        &mut self,
        to: &Contact,
        method: &str,
        params: JsValue,
        purpose: Purpose,
        now: Instant,
        now_ms: f64,
    ) -> Option<String> {
        if self.pending.len() >= self.cfg.max_pending {
            self.stats.pending_full += 1;
            return None;
        }
        let id = rpc::new_id();
        let payload = rpc::seal(
            rpc::request(&id, method, params),
            now_ms.floor(),
            &self.sign,
        );
        self.pending.insert(
            id.clone(),
            Pending {
                to: to.id,
                purpose,
                deadline: now + self.cfg.rpc_timeout,
            },
        );
        self.stats.sent += 1;
        self.report(to);
        self.out.push_back(Transmit {
            to: to.clone(),
            payload,
        });
        Some(id)
    }

    fn start_lookup(
        &mut self,
        kind: Kind,
        key: String,
        target: NodeId,
        value: bool,
        now: Instant,
    ) -> Option<u64> {
        if self.lookups.len() >= self.cfg.max_lookups {
            log::debug!("kademlia: too many lookups; {key:?} not looked up");
            return None;
        }
        let id = self.next_lookup;
        self.next_lookup += 1;
        let mut l = Lookup {
            kind,
            key,
            target,
            value,
            shortlist: Vec::new(),
            in_flight: 0,
            rpcs: 0,
            started: now,
            found: None,
        };
        // Twice k from our own table: room to go around nodes that stall.
        let mut near = self.table.closest(&target, 2 * self.cfg.k, None);
        near.retain(|c| c.id == target || !self.is_dead(&c.id, now));
        add_candidates(&mut l, near.into_iter(), self.me.id, 3 * self.cfg.k);
        self.lookups.insert(id, l);
        Some(id)
    }

    fn lookup_answer(&mut self, lid: u64, m: &Opened, now: Instant, now_ms: f64) {
        let Some(mut l) = self.lookups.remove(&lid) else {
            return;
        };
        l.in_flight = l.in_flight.saturating_sub(1);
        let from = m.contact.id;
        if let Some(c) = l.shortlist.iter_mut().find(|c| c.contact.id == from) {
            c.state = if m.error {
                CandState::Failed
            } else {
                CandState::Answered
            };
            // First-hand nodeInfo replaces what others said.
            c.contact = m.contact.clone();
        }
        let mut found = None;
        if l.value {
            if let Some(item) = m.body.get("item") {
                let key_ok = item.get("key").and_then(JsValue::as_str) == Some(l.key.as_str());
                match item.get("value") {
                    Some(v) if key_ok && self.record_allowed(&l.key, v, None) => {
                        found = Some(item.clone());
                        if let Some(c) = l.shortlist.iter_mut().find(|c| c.contact.id == from) {
                            c.has_value = true;
                        }
                    }
                    _ => {
                        log::debug!("kademlia: invalid value for {:?} ignored", l.key);
                    }
                }
            }
        }
        if found.is_none() {
            if let Some(JsValue::Arr(nodes)) = m.body.get("nodes") {
                let mut fresh = Vec::new();
                for n in nodes.iter().take(2 * self.cfg.k) {
                    if let Some(c) = rpc::parse_listed_contact(n, &mut self.keys) {
                        // The node looked for is asked even if it failed to answer before.
                        if c.id == l.target || !self.is_dead(&c.id, now) {
                            fresh.push(c);
                        }
                    }
                }
                add_candidates(&mut l, fresh.into_iter(), self.me.id, 3 * self.cfg.k);
            }
        }
        if found.is_some() && l.found.is_none() {
            l.found = found;
        }
        self.lookups.insert(lid, l);
        self.step(lid, now, now_ms);
    }

    /// Sends what a lookup may send, or ends it.
    fn step(&mut self, lid: u64, now: Instant, now_ms: f64) {
        let Some(mut l) = self.lookups.remove(&lid) else {
            return;
        };
        let k = self.cfg.k;
        let done = if l.found.is_some() {
            true
        } else if let Kind::Resolve { target, .. } = l.kind {
            l.shortlist
                .iter()
                .any(|c| c.contact.box_id == target && c.state == CandState::Answered)
        } else {
            false
        };
        if !done {
            let wait_stalled = wait_stalled(&l, k);
            loop {
                let active = l
                    .shortlist
                    .iter()
                    .filter(|c| c.state == CandState::InFlight && !c.stalled)
                    .count();
                if active >= self.cfg.alpha {
                    break;
                }
                // The next unasked among the k closest that neither failed nor stalled (a
                // lookup keeps asking others while it waits for stalled RPCs).
                let next = l
                    .shortlist
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| usable(c, false))
                    .take(k)
                    .find(|(_, c)| c.state == CandState::New)
                    .map(|(i, _)| i);
                let Some(idx) = next else { break };
                let contact = l.shortlist[idx].contact.clone();
                let method = if l.value { "FIND_VALUE" } else { "FIND_NODE" };
                let params = JsValue::obj()
                    .with("key", JsValue::Str(l.key.clone()))
                    .with("contact", self.me.to_js());
                match self.send_request(&contact, method, params, Purpose::Lookup(lid), now, now_ms)
                {
                    Some(_) => {
                        l.shortlist[idx].state = CandState::InFlight;
                        l.shortlist[idx].sent = Some(now);
                        l.in_flight += 1;
                        l.rpcs += 1;
                    }
                    None => {
                        l.shortlist[idx].state = CandState::Failed;
                    }
                }
            }
            // Wait for the RPCs that did not stall (for a value lookup: all of them); stalled
            // ones may still answer meanwhile.
            let waiting = l
                .shortlist
                .iter()
                .any(|c| c.state == CandState::InFlight && (wait_stalled || !c.stalled));
            if waiting && now < l.started + self.cfg.lookup_timeout {
                self.lookups.insert(lid, l);
                return;
            }
        }
        self.finish(l, now, now_ms);
    }

    fn finish(&mut self, l: Lookup, now: Instant, now_ms: f64) {
        let k = self.cfg.k;
        let mut record = LookupRecord {
            kind: LookupKindTag::Join,
            duration: now.saturating_duration_since(l.started),
            rpcs: l.rpcs,
            found: true,
        };
        let closest: Vec<Contact> = l
            .shortlist
            .iter()
            .filter(|c| usable(c, wait_stalled(&l, k)))
            .take(k)
            .map(|c| c.contact.clone())
            .collect();
        match l.kind {
            Kind::Join => {
                record.found = l.shortlist.iter().any(|c| c.state == CandState::Answered);
                if record.found {
                    let first = !self.joined;
                    self.joined = true;
                    if first {
                        self.events.push_back(KadEvent::Joined);
                        self.publish_records(now, now_ms);
                    }
                    // kad: refresh the buckets beyond the closest one known.
                    let occupied = self.table.occupied();
                    if let Some(least) = occupied.first().copied() {
                        for index in occupied.into_iter().filter(|i| *i > least) {
                            self.refresh_bucket(index, now, now_ms);
                        }
                    }
                }
            }
            Kind::Refresh => record.kind = LookupKindTag::Refresh,
            Kind::Resolve { target, sign } => {
                record.kind = LookupKindTag::Resolve;
                let hit = l
                    .shortlist
                    .iter()
                    .filter(|c| c.state != CandState::Failed)
                    .find(|c| c.contact.box_id == target)
                    .map(|c| c.contact.clone());
                record.found = hit.is_some();
                match hit {
                    Some(c) => {
                        self.reported.remove(&c.box_id);
                        self.report(&c);
                    }
                    None => {
                        // The node's own nodeInfo record, when we know its signId.
                        match sign {
                            Some(s) => self.get(
                                &format!("{NODE_INFO_PREFIX}{s}"),
                                Origin::Resolution,
                                now,
                                now_ms,
                            ),
                            None => self
                                .events
                                .push_back(KadEvent::NotFound(target.to_string())),
                        }
                    }
                }
            }
            Kind::Get { origin } => {
                record.kind = LookupKindTag::Get;
                let value = l
                    .found
                    .as_ref()
                    .and_then(|i| i.get("value").cloned())
                    .or_else(|| self.items.get(&l.key).map(|i| i.value.clone()));
                record.found = value.is_some();
                if let (Some(item), Some(c)) = (
                    l.found.as_ref(),
                    l.shortlist
                        .iter()
                        .find(|c| c.state == CandState::Answered && !c.has_value),
                ) {
                    // kad: store the value at the closest node that answered without it.
                    let params = JsValue::obj()
                        .with("item", item.clone())
                        .with("contact", self.me.to_js());
                    let c = c.contact.clone();
                    self.send_request(&c, "STORE", params, Purpose::Store(None), now, now_ms);
                }
                if origin == Origin::Relay {
                    record.kind = LookupKindTag::Relay;
                    let relay = value.and_then(|v| self.relay_record(&l.key, &v));
                    record.found = relay.is_some();
                    if let Some(c) = relay.filter(|c| c.id != self.me.id) {
                        self.reported.remove(&c.box_id);
                        self.report(&c);
                    }
                } else if origin == Origin::Resolution {
                    match value.and_then(|v| Contact::from_node_info(&v, &mut self.keys, now_ms)) {
                        Some(c) => {
                            self.reported.remove(&c.box_id);
                            self.report(&c);
                        }
                        None => self.events.push_back(KadEvent::NotFound(l.key.clone())),
                    }
                } else {
                    self.events.push_back(KadEvent::Value {
                        key: l.key.clone(),
                        origin,
                        result: value
                            .map(|v| v.to_serde())
                            .ok_or_else(|| format!("no value found for key {}", l.key)),
                    });
                }
            }
            Kind::Put { ref item } => {
                // The nodes are found: STORE at the k closest; the put ends with their answers.
                let params = JsValue::obj()
                    .with("item", item.clone())
                    .with("contact", self.me.to_js());
                let id = self.next_lookup;
                self.next_lookup += 1;
                let mut sent = 0;
                for c in &closest {
                    let purpose = Purpose::Store(Some(id));
                    if self
                        .send_request(c, "STORE", params.clone(), purpose, now, now_ms)
                        .is_some()
                    {
                        sent += 1;
                    }
                }
                let wait = PutWait {
                    key: l.key.clone(),
                    outstanding: sent,
                    acks: 0,
                    rpcs: l.rpcs + sent as u32,
                    started: l.started,
                };
                if sent > 0 {
                    self.puts.insert(id, wait);
                } else {
                    self.end_put(wait, now);
                }
                return;
            }
        }
        if self.finished.len() >= 4096 {
            self.finished.pop_front();
        }
        self.finished.push_back(record);
    }

    fn refresh_bucket(&mut self, index: usize, now: Instant, now_ms: f64) {
        let target = self.me.id.random_in_bucket(index);
        if let Some(l) = self.start_lookup(Kind::Refresh, target.to_hex(), target, false, now) {
            self.step(l, now, now_ms);
        }
    }

    /// Stores our records: `signId -> boxId` (as the original), `boxId -> signId`, and our
    /// nodeInfo under `nodeInfo:<signId>`.
    fn publish_records(&mut self, now: Instant, now_ms: f64) {
        let sign = self.me.sign_id.to_string();
        let boxid = self.me.box_id.to_string();
        let me = self.me.id.to_hex();
        let t = now_ms.floor();
        self.put_js(
            &sign,
            JsValue::Str(boxid.clone()),
            me.clone(),
            t,
            true,
            now,
            now_ms,
        );
        self.put_js(
            &boxid,
            JsValue::Str(sign.clone()),
            me.clone(),
            t,
            true,
            now,
            now_ms,
        );
        let info = self.me.node_info.clone();
        self.put_js(
            &format!("{NODE_INFO_PREFIX}{sign}"),
            info,
            me,
            t,
            true,
            now,
            now_ms,
        );
        self.announce_relay(now, now_ms);
    }

    /// Timers: RPC timeouts, lookups, refresh, replication, expiry.
    pub fn handle_timeout(&mut self, now: Instant, now_ms: f64) {
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            self.stats.timeouts += 1;
            if self.dead.len() >= 4096 {
                let dead_for = self.cfg.dead_for;
                self.dead
                    .retain(|_, t| now.saturating_duration_since(*t) < dead_for);
                if self.dead.len() >= 4096 {
                    self.dead.clear();
                }
            }
            self.dead.insert(p.to, now);
            // kad: a contact that does not answer leaves the table.
            if self.table.remove(&p.to) {
                self.dirty = true;
            }
            match p.purpose {
                Purpose::Lookup(l) => {
                    if let Some(look) = self.lookups.get_mut(&l) {
                        look.in_flight = look.in_flight.saturating_sub(1);
                        if let Some(c) = look.shortlist.iter_mut().find(|c| c.contact.id == p.to) {
                            c.state = CandState::Failed;
                        }
                    }
                    self.step(l, now, now_ms);
                }
                Purpose::PingHead(b) => {
                    // Removing the head put the candidate in its place.
                    self.table.bucket_mut(b).pinging = None;
                }
                Purpose::Store(Some(l)) => self.store_answer(l, false, now),
                Purpose::Store(None) => {}
            }
        }
        // Lookups whose RPCs stalled go on with other nodes.
        let stall = self.cfg.stall;
        let mut stalled = Vec::new();
        for (id, l) in self.lookups.iter_mut() {
            let mut any = false;
            for c in l.shortlist.iter_mut() {
                if c.state == CandState::InFlight
                    && !c.stalled
                    && c.sent.is_some_and(|t| t + stall <= now)
                {
                    c.stalled = true;
                    any = true;
                }
            }
            if any {
                stalled.push(*id);
            }
        }
        for id in stalled {
            self.step(id, now, now_ms);
        }
        let overdue: Vec<u64> = self
            .lookups
            .iter()
            .filter(|(_, l)| now >= l.started + self.cfg.lookup_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(l) = self.lookups.remove(&id) {
                self.finish(l, now, now_ms);
            }
        }
        if now >= self.next_refresh {
            self.next_refresh = now + self.cfg.refresh;
            for index in self.table.occupied() {
                self.refresh_bucket(index, now, now_ms);
            }
        }
        if now >= self.next_replicate {
            self.next_replicate = now + self.cfg.replicate;
            self.replicate(now, now_ms);
        }
        if self.joined && self.next_relay_announce.is_some_and(|t| now >= t) {
            self.announce_relay(now, now_ms);
        }
    }

    fn end_put(&mut self, l: PutWait, now: Instant) {
        self.events.push_back(KadEvent::Stored {
            key: l.key.clone(),
            acks: l.acks,
        });
        if self.finished.len() >= 4096 {
            self.finished.pop_front();
        }
        self.finished.push_back(LookupRecord {
            kind: LookupKindTag::Put,
            duration: now.saturating_duration_since(l.started),
            rpcs: l.rpcs,
            found: l.acks > 0,
        });
    }

    /// `kad`'s replication: expired items go; others' items are stored again at the `k`
    /// closest nodes, ours once older than [`Config::republish`].
    fn replicate(&mut self, now: Instant, now_ms: f64) {
        let expire = ms(self.cfg.expire);
        let before = self.items.len();
        self.items.retain(|_, i| now_ms < i.timestamp + expire);
        self.dirty |= self.items.len() != before;
        let me = self.me.id.to_hex();
        let all: Vec<(String, Item)> = self
            .items
            .iter()
            .map(|(k, i)| (k.clone(), i.clone()))
            .collect();
        for (key, item) in all {
            // Another node's nodeInfo or relay record is only accepted from that node: not
            // ours to replicate.
            if item.publisher != me
                && (key.starts_with(NODE_INFO_PREFIX) || key.starts_with(RELAY_PREFIX))
            {
                continue;
            }
            if item.publisher != me {
                self.put_js(
                    &key,
                    item.value,
                    item.publisher,
                    item.timestamp,
                    false,
                    now,
                    now_ms,
                );
            } else if now_ms >= item.timestamp + ms(self.cfg.republish) {
                self.put_js(
                    &key,
                    item.value,
                    me.clone(),
                    now_ms.floor(),
                    true,
                    now,
                    now_ms,
                );
            }
        }
    }

    /// The next instant [`Self::handle_timeout`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.next_refresh.min(self.next_replicate);
        if let Some(t) = self.next_relay_announce {
            next = next.min(t);
        }
        for p in self.pending.values() {
            next = next.min(p.deadline);
        }
        for l in self.lookups.values() {
            next = next.min(l.started + self.cfg.lookup_timeout);
            for c in &l.shortlist {
                if let (CandState::InFlight, false, Some(t)) = (c.state, c.stalled, c.sent) {
                    next = next.min(t + self.cfg.stall);
                }
            }
        }
        Some(next)
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<KadEvent> {
        self.events.pop_front()
    }

    /// Finished lookups since the last call (at most 4096 kept).
    pub fn take_finished(&mut self) -> Vec<LookupRecord> {
        self.finished.drain(..).collect()
    }

    /// Whether the table or the items changed since the last [`Self::snapshot`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// What a restart needs: `{"contacts":[nodeInfo...],"items":[{key,value,publisher,
    /// timestamp}...]}` as JSON text (JavaScript's serialisation, so values keep their form).
    pub fn snapshot(&mut self) -> String {
        self.dirty = false;
        let contacts = JsValue::Arr(self.table.iter().map(|c| c.node_info.clone()).collect());
        let items = JsValue::Arr(self.items.iter().map(|(k, i)| i.to_js(k)).collect());
        JsValue::obj()
            .with("contacts", contacts)
            .with("items", items)
            .stringify()
    }

    /// Restores a [`Self::snapshot`]: items (unexpired, checked as any STORE), and the
    /// contacts, each joined through as a seed (so the table fills with those that answer).
    pub fn restore(&mut self, text: &[u8], now: Instant, now_ms: f64) {
        let Some(v) = JsValue::parse(text) else {
            log::warn!("kademlia: stored state unreadable; starting empty");
            return;
        };
        if let Some(JsValue::Arr(items)) = v.get("items") {
            for i in items.iter().take(self.cfg.max_items) {
                let (Some(key), Some(value), Some(publisher), Some(ts)) = (
                    i.get("key").and_then(JsValue::as_str),
                    i.get("value"),
                    i.get("publisher").and_then(JsValue::as_str),
                    i.get("timestamp").and_then(JsValue::as_f64),
                ) else {
                    continue;
                };
                if now_ms >= ts + ms(self.cfg.expire) || !self.record_allowed(key, value, None) {
                    continue;
                }
                let bytes = value.stringify().len();
                self.store_local(
                    key,
                    Item {
                        value: value.clone(),
                        publisher: publisher.to_owned(),
                        timestamp: ts,
                        bytes,
                    },
                );
            }
        }
        if let Some(JsValue::Arr(contacts)) = v.get("contacts") {
            let infos: Vec<serde_json::Value> = contacts
                .iter()
                .take(3 * self.cfg.k)
                .map(JsValue::to_serde)
                .collect();
            self.connect_many(&infos, now, now_ms);
        }
        self.dirty = false;
    }

    /// Bytes of values stored here (for tests of the bounds).
    pub fn items_bytes(&self) -> usize {
        self.items.values().map(|i| i.bytes).sum()
    }
}

/// Whether a candidate counts among a lookup's closest: not failed, and not stalled (unless it
/// answered since) when the lookup no longer waits for stalled RPCs ([`wait_stalled`]).
fn usable(c: &Candidate, wait_stalled: bool) -> bool {
    c.state != CandState::Failed && (wait_stalled || !(c.stalled && c.state == CandState::InFlight))
}

/// Whether a lookup still counts its stalled RPCs among the closest: a value lookup always
/// (the closest nodes hold the value), a node lookup until `k` nodes have answered it (so a
/// slow network, where many RPCs stall, does not end lookups with a handful of nodes).
fn wait_stalled(l: &Lookup, k: usize) -> bool {
    l.value
        || l.shortlist
            .iter()
            .filter(|c| c.state == CandState::Answered)
            .count()
            < k
}

/// Adds candidates to a lookup's shortlist (no duplicates, not us), keeping it sorted by
/// distance and at most `cap` long (farthest unqueried ones dropped first).
fn add_candidates(l: &mut Lookup, cs: impl Iterator<Item = Contact>, me: NodeId, cap: usize) {
    for c in cs {
        if c.id == me || l.shortlist.iter().any(|x| x.contact.id == c.id) {
            continue;
        }
        let distance = c.id.distance(&l.target);
        let at = l
            .shortlist
            .iter()
            .position(|x| x.distance > distance)
            .unwrap_or(l.shortlist.len());
        if at >= cap {
            continue;
        }
        l.shortlist.insert(
            at,
            Candidate {
                contact: c,
                distance,
                state: CandState::New,
                has_value: false,
                sent: None,
                stalled: false,
            },
        );
        if l.shortlist.len() > cap {
            if let Some(i) = l.shortlist.iter().rposition(|x| x.state == CandState::New) {
                l.shortlist.remove(i);
            } else {
                l.shortlist.pop();
            }
        }
    }
}
