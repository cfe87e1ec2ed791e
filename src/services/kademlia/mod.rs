//! A Kademlia DHT, wire-compatible with the original `mm-services-kademlia` 0.6.5 (on `kad`
//! 1.6.5): a Rust node joins a DHT of JavaScript nodes and serves in it, and Rust nodes alone
//! form the same DHT. Its RPCs are ordinary platform messages (protocol `ms`, topic
//! `kademlia`, to the contact's node), so they travel CurveCP-encrypted and authenticated.
//!
//! This module is the reactor-facing part (the bus, the wall clock, persistence); the protocol
//! is sans-IO, in modules exposed (without stability promise) in [`crate::proto::kademlia`]:
//! `state` (lookups, handlers, store, timers), `table` (routing table), `rpc` (messages,
//! signatures, contacts), `id` (160-bit ids) and `json` (JSON exactly as the JavaScript side
//! parses and writes it, which the signatures need).
//!
//! # On the bus
//!
//! - Receives `kademlia` from `public`, `friends` and `self` (never from `local`).
//! - `self.transports.requestNodeInfo` (a signId or a boxId): answered from the routing table,
//!   else by a lookup of the node's id; what it finds is published as `transports.nodeInfo`
//!   (source tag `kademlia`). So is every node the DHT hears from, and every seed, so that the
//!   platform can reach them.
//! - `self.directory.get` (a key): a lookup; a value found is answered with
//!   `directory.getReply` `{key, value}` (nothing when not found, as the original).
//!   `self.directory.put` `{key, value}`: stored in the DHT.
//! - `self.dht.get` (a key) and `self.dht.put` (`{key, value}`): the same, answered with
//!   `dht.value` `{key, value}` or `{key, error}`, and `dht.stored` `{key, acks}` (this
//!   service's own API, for applications such as `examples/node.rs`).
//! - `self.transports.myNodeInfo`: our contact carries the newest nodeInfo.
//! - `self.transports.nodeInfoBootstrap` (mDNS, the static list): joins through that node.
//! - `self.transports.findRelay` (the platform, when it needs a relay and knows none that
//!   works): looks the relay records up; each relay found is published as
//!   `transports.nodeInfo`. A node whose nodeInfo offers relaying announces itself there
//!   (see "Relays" in `state`, [`crate::proto::kademlia::state`]).
//!
//! # Records it stores
//!
//! Once joined, as the original: `signId -> boxId`. Also `boxId -> signId`, which is what the
//! platform's `directory.get` asks for (the original stores only the first, so its
//! `directory.get` of a boxId never finds anything), and `nodeInfo:<signId>` -> our nodeInfo,
//! a fallback for resolutions; see `state` ([`crate::proto::kademlia::state`]) for what others
//! may store.
//!
//! # Departures from the original, all on the safe side
//!
//! A contact whose boxId is not the conversion of its signId, whose nodeID is not derived from
//! its boxId, or that is not the node CurveCP authenticated as the sender, is ignored; nonces
//! too far in the future are refused like stale ones, and replays inside the window too; only
//! nodes heard from directly enter the routing table; records naming a node are checked;
//! everything is bounded. The original's `requestNodeInfo` only looks in its routing table;
//! this one also runs a lookup.
//!
//! # Storage
//!
//! The routing table's nodeInfos and the items stored here are kept under [`STATE_KEY`] in the
//! service's own [`Storage`] ([`KademliaConfig::storage`]; the platform's when none is given),
//! written at most every [`KademliaConfig::persist_every`] and when the platform stops. A
//! restarted node joins again through the contacts it had.
//!
//! ```no_run
//! use mm_platform::services::kademlia::{Kademlia, KademliaConfig};
//! use mm_platform::Platform;
//!
//! # let seed_node_info = serde_json::json!({});
//! let dht = Kademlia::new(KademliaConfig::new(vec![seed_node_info]));
//! let mut platform = Platform::builder().service(dht).build().unwrap();
//! platform.run().unwrap();
//! ```

pub(crate) mod id;
pub(crate) mod json;
pub(crate) mod rpc;
pub(crate) mod state;
pub(crate) mod table;

use std::io;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::{Service, ServiceContext};
use crate::platform::{Address, Message, SendOptions};
use crate::storage::Storage;
pub use state::{Config, KadStats, LookupKindTag, LookupRecord};
use state::{KadEvent, KadState, Origin};

/// The storage key of the persisted routing table and items.
pub const STATE_KEY: &str = "kademlia.state";

/// Options of the Kademlia service.
pub struct KademliaConfig {
    /// nodeInfos to join through. There is no default list (the original's defaults are public
    /// hosts); an empty list waits for `transports.nodeInfoBootstrap` or for others to join us.
    pub seeds: Vec<Value>,
    /// Protocol parameters.
    pub kad: Config,
    /// Where to persist; `None`: the platform's storage.
    pub storage: Option<Box<dyn Storage>>,
    /// Least time between two writes of the state (60 s).
    pub persist_every: Duration,
}

impl KademliaConfig {
    /// Options with these seeds and the defaults.
    pub fn new(seeds: Vec<Value>) -> KademliaConfig {
        KademliaConfig {
            seeds,
            kad: Config::default(),
            storage: None,
            persist_every: Duration::from_secs(60),
        }
    }

    /// Persist in this storage instead of the platform's.
    pub fn storage(mut self, storage: impl Storage + 'static) -> KademliaConfig {
        self.storage = Some(Box::new(storage));
        self
    }
}

/// What the service shares with its owner: counters and finished lookups.
#[derive(Debug, Default, Clone)]
pub struct KademliaInfo {
    /// Counters of the protocol machine.
    pub stats: KadStats,
    /// Contacts in the routing table.
    pub table_len: usize,
    /// Items stored here.
    pub items: usize,
    /// Whether the first join ended.
    pub joined: bool,
    /// Lookups finished (appended; the owner drains it; at most 4096 kept).
    pub lookups: Vec<LookupRecord>,
}

/// The Kademlia service (see the [module docs](self)).
pub struct Kademlia {
    config: KademliaConfig,
    state: Option<KadState>,
    info: super::Shared<KademliaInfo>,
    last_persist: Option<Instant>,
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_millis() as f64)
}

impl Kademlia {
    /// A service with these options.
    pub fn new(config: KademliaConfig) -> Kademlia {
        Kademlia {
            config,
            state: None,
            info: super::Shared::new(KademliaInfo::default()),
            last_persist: None,
        }
    }

    /// A view of the service's counters, updated after each of its turns.
    pub fn info_handle(&self) -> super::Shared<KademliaInfo> {
        self.info.clone()
    }

    fn persist(&mut self, ctx: &mut ServiceContext<'_>, force: bool) {
        let now = ctx.now();
        let Some(state) = self.state.as_mut() else {
            return;
        };
        let due = self
            .last_persist
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.persist_every);
        if !(state.is_dirty() && (due || force)) {
            return;
        }
        self.last_persist = Some(now);
        let text = state.snapshot();
        let result = match self.config.storage.as_mut() {
            Some(s) => s.put(STATE_KEY, text.as_bytes()),
            None => ctx.storage().put(STATE_KEY, text.as_bytes()),
        };
        if let Err(e) = result {
            log::warn!("kademlia: cannot persist state: {e}");
        }
    }

    /// Sends, publishes, persists, sets the next wake-up.
    fn flush(&mut self, ctx: &mut ServiceContext<'_>) {
        let now = ctx.now();
        let now_ms = unix_ms();
        let Some(state) = self.state.as_mut() else {
            return;
        };
        state.handle_timeout(now, now_ms);
        // Events first: nodeInfos published before the messages that need them.
        while let Some(ev) = state.poll_event() {
            match ev {
                KadEvent::NodeInfo(info) => {
                    let _ = ctx.publish_node_info(&info, false);
                }
                KadEvent::Value {
                    key,
                    origin,
                    result,
                } => match (origin, result) {
                    (Origin::Directory, Ok(value)) => {
                        let reply = json!({ "key": key, "value": value });
                        let _ = ctx.messaging().send("directory.getReply", "local", &reply);
                    }
                    (Origin::Directory, Err(e)) => log::debug!("kademlia: {e}"),
                    (Origin::Api, Ok(value)) => {
                        let reply = json!({ "key": key, "value": value });
                        let _ = ctx.messaging().send("dht.value", "local", &reply);
                    }
                    (Origin::Api, Err(e)) => {
                        let reply = json!({ "key": key, "error": e });
                        let _ = ctx.messaging().send("dht.value", "local", &reply);
                    }
                    (Origin::Resolution | Origin::Relay, _) => {}
                },
                KadEvent::Stored { key, acks } => {
                    let reply = json!({ "key": key, "acks": acks });
                    let _ = ctx.messaging().send("dht.stored", "local", &reply);
                }
                KadEvent::NotFound(b) => log::debug!("kademlia: node {b} not found"),
                KadEvent::Joined => log::debug!("kademlia: joined"),
            }
        }
        let options = SendOptions {
            realtime: true,
            expire_after: Some(Duration::from_secs(10)),
        };
        while let Some(t) = state.poll_transmit() {
            let status = ctx.send_with(
                "ms",
                "kademlia",
                Address::Node(t.to.sign_id),
                t.payload.into_bytes(),
                options,
            );
            if let Err(e) = status {
                log::debug!("kademlia: message to {} not queued: {e}", t.to.sign_id);
            }
        }
        let wake = state.next_deadline();
        {
            let mut info = self.info.borrow_mut();
            info.stats = state.stats();
            info.table_len = state.table_len();
            info.items = state.items_len();
            info.joined = state.is_joined();
            let done = state.take_finished();
            if info.lookups.len() + done.len() > 4096 {
                info.lookups.clear();
            }
            info.lookups.extend(done);
        }
        ctx.set_wake(wake);
        self.persist(ctx, false);
    }
}

impl Service for Kademlia {
    fn name(&self) -> &str {
        "kademlia"
    }

    fn start(&mut self, ctx: &mut ServiceContext<'_>) -> io::Result<()> {
        let now = ctx.now();
        let now_ms = unix_ms();
        let sign = ctx.identity().sign_keypair().clone();
        let info = ctx.node_info().to_json();
        let mut state = KadState::new(self.config.kad, sign, &info, now, now_ms)
            .ok_or_else(|| io::Error::other("kademlia: our nodeInfo is not valid"))?;
        let stored = match self.config.storage.as_mut() {
            Some(s) => s.get(STATE_KEY),
            None => ctx.storage().get(STATE_KEY),
        };
        if let Ok(Some(text)) = stored {
            state.restore(&text, now, now_ms);
        }
        for seed in &self.config.seeds {
            // The original publishes each seed as transports.nodeInfo and connects to it.
            state.connect(seed, now, now_ms);
        }
        self.state = Some(state);
        for topic in [
            "public.kademlia",
            "friends.kademlia",
            "self.kademlia",
            "self.transports.myNodeInfo",
            "self.transports.requestNodeInfo",
            "self.transports.nodeInfoBootstrap",
            "self.transports.findRelay",
            "self.directory.get",
            "self.directory.put",
            "self.dht.get",
            "self.dht.put",
        ] {
            ctx.subscribe(topic);
        }
        let _ = ctx
            .messaging()
            .send("transports.requestBootstrapNodeInfo", "local", &json!({}));
        self.flush(ctx);
        Ok(())
    }

    fn on_message(&mut self, ctx: &mut ServiceContext<'_>, msg: &Message) {
        if msg.protocol != "ms" {
            return;
        }
        let now = ctx.now();
        let now_ms = unix_ms();
        let Some(state) = self.state.as_mut() else {
            return;
        };
        if msg.topic == "kademlia" {
            let (from_box, from_sign) = match msg.sender {
                Address::Local => return,
                Address::Node(s) => match state.box_of(&s) {
                    Some(b) => (b, Some(s)),
                    None => return,
                },
                Address::Box(b) => (b, None),
            };
            state.handle_message(from_box, from_sign, &msg.payload, now, now_ms);
            self.flush(ctx);
            return;
        }
        if msg.sender != Address::Local {
            return;
        }
        let Ok(value) = msg.json::<Value>() else {
            return;
        };
        match msg.topic.as_str() {
            "transports.myNodeInfo" => state.set_my_node_info(&value, now, now_ms),
            "transports.nodeInfoBootstrap" => state.connect(&value, now, now_ms),
            "transports.findRelay" => state.find_relays(now, now_ms),
            "transports.requestNodeInfo" => {
                if let Some(key) = value.as_str() {
                    state.request_node_info(key, now, now_ms);
                }
            }
            "directory.get" | "dht.get" => {
                let origin = if msg.topic == "dht.get" {
                    Origin::Api
                } else {
                    Origin::Directory
                };
                if let Some(key) = value.as_str() {
                    state.get(key, origin, now, now_ms);
                }
            }
            "directory.put" | "dht.put" => {
                if let (Some(key), Some(v)) =
                    (value.get("key").and_then(Value::as_str), value.get("value"))
                {
                    state.put(key, v, now, now_ms);
                }
            }
            _ => return,
        }
        self.flush(ctx);
    }

    fn on_timer(&mut self, ctx: &mut ServiceContext<'_>) {
        self.flush(ctx);
    }

    fn stop(&mut self, ctx: &mut ServiceContext<'_>) {
        self.persist(ctx, true);
    }
}
