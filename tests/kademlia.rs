//! The Kademlia DHT service (issue 11), without JavaScript:
//!
//! - sans-IO, on `KadState` driven directly: nodes join and find each other and values;
//!   forged, replayed, stale and malformed RPCs and contacts are ignored (the counters say so
//!   and nothing answers); a node cannot store a nodeInfo record for someone else's signId nor
//!   a wrong signId/boxId mapping; a flood of STOREs keeps the store bounded; lookups and
//!   pending RPCs stay bounded;
//! - a simulation of 100 platforms with real sockets on 127.0.0.1 in this one process, each
//!   knowing one seed: every node resolves random others through the DHT and delivers a message
//!   to them, values stored by some are found by others, and after a third of the nodes leave,
//!   every lookup of the rest still succeeds; a restarted node rejoins from its stored table.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use mm_platform::identity::{BoxId, Identity, SignId};
use mm_platform::proto::kademlia::id::NodeId;
use mm_platform::proto::kademlia::json::JsValue;
use mm_platform::proto::kademlia::rpc;
use mm_platform::proto::kademlia::state::{
    relay_key, relay_slot, Config, KadEvent, KadState, LookupKindTag, Origin, Transmit, RELAY_SLOTS,
};
use mm_platform::services::kademlia::{Kademlia, KademliaConfig, KademliaInfo};
use mm_platform::storage::{FileStore, MemStore};
use mm_platform::{Message, NetConfig, Platform};

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
}

// ------------------------------------------------------------------------------- sans-IO

struct Node {
    st: KadState,
    id: Identity,
    info: Value,
}

/// A nodeInfo endpoint offering relaying (as a node with `NetConfig::relay` lists it).
fn relay_endpoint() -> Value {
    json!({"transportType": "udp", "transportInfo":
        {"address": "192.0.2.7", "port": 4000, "framing": "native", "relay": true}})
}

impl Node {
    fn new(cfg: Config) -> Node {
        Node::with_endpoints(cfg, vec![])
    }

    fn with_endpoints(cfg: Config, endpoints: Vec<Value>) -> Node {
        let id = Identity::generate();
        let info = json!({
            "signId": id.sign_id().to_string(),
            "boxId": id.box_id().to_string(),
            "connectionInfo": endpoints,
        });
        let st = KadState::new(
            cfg,
            id.sign_keypair().clone(),
            &info,
            Instant::now(),
            now_ms(),
        )
        .expect("valid nodeInfo");
        Node { st, id, info }
    }

    fn box_id(&self) -> BoxId {
        self.id.box_id()
    }

    fn sign_id(&self) -> SignId {
        self.id.sign_id()
    }

    fn transmits(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.st.poll_transmit()).collect()
    }

    /// Positive responses among the messages to send (requests of its own, such as the
    /// records a node stores once it has a first contact, and error answers left out).
    fn responses(&mut self) -> usize {
        self.transmits()
            .iter()
            .filter(|t| {
                JsValue::parse(t.payload.as_bytes())
                    .is_some_and(|v| v.get("result").is_some() && v.get("error").is_none())
            })
            .count()
    }

    fn events(&mut self) -> Vec<KadEvent> {
        std::iter::from_fn(|| self.st.poll_event()).collect()
    }

    /// A message from `from`, as the platform hands it (authenticated sender).
    fn receive(&mut self, from: &Node, payload: &str) {
        self.st.handle_message(
            from.box_id(),
            Some(from.sign_id()),
            payload.as_bytes(),
            Instant::now(),
            now_ms(),
        );
    }
}

/// Delivers `batch`, sent by node `from`, then everything that follows.
fn deliver(nodes: &mut [Node], from: usize, batch: Vec<Transmit>) {
    for t in batch {
        if let Some(to) = nodes.iter().position(|x| x.box_id() == t.to.box_id) {
            let (b, sgn) = (nodes[from].box_id(), nodes[from].sign_id());
            nodes[to].st.handle_message(
                b,
                Some(sgn),
                t.payload.as_bytes(),
                Instant::now(),
                now_ms(),
            );
        }
    }
    pump(nodes);
}

/// Delivers every message between `nodes` until none is left; returns how many.
fn pump(nodes: &mut [Node]) -> usize {
    pump_without(nodes, &[]).len()
}

/// [`pump`], with the nodes of `gone` silent: what is sent to them is lost, they send nothing.
/// Returns every (sender, destination) of the messages sent.
fn pump_without(nodes: &mut [Node], gone: &[usize]) -> Vec<(usize, usize)> {
    let mut n = Vec::new();
    for _ in 0..10_000 {
        let mut batch = Vec::new();
        for (i, node) in nodes.iter_mut().enumerate() {
            for t in node.transmits() {
                if !gone.contains(&i) {
                    batch.push((i, t));
                }
            }
        }
        if batch.is_empty() {
            return n;
        }
        for (from, t) in batch {
            let Some(to) = nodes.iter().position(|x| x.box_id() == t.to.box_id) else {
                continue;
            };
            n.push((from, to));
            if gone.contains(&to) {
                continue;
            }
            let (sender_box, sender_sign) = (nodes[from].box_id(), nodes[from].sign_id());
            nodes[to].st.handle_message(
                sender_box,
                Some(sender_sign),
                t.payload.as_bytes(),
                Instant::now(),
                now_ms(),
            );
        }
    }
    panic!("messages never stopped");
}

fn small_net(n: usize, cfg: Config) -> Vec<Node> {
    let mut nodes: Vec<Node> = (0..n).map(|_| Node::new(cfg)).collect();
    for i in 1..n {
        let seed = nodes[i / 2].info.clone();
        nodes[i].st.connect(&seed, Instant::now(), now_ms());
        pump(&mut nodes);
    }
    for node in nodes.iter_mut() {
        node.events();
    }
    nodes
}

fn values(node: &mut Node) -> Vec<(String, Result<Value, String>)> {
    node.events()
        .into_iter()
        .filter_map(|e| match e {
            KadEvent::Value { key, result, .. } => Some((key, result)),
            _ => None,
        })
        .collect()
}

#[test]
fn sans_io_nodes_join_resolve_and_find_values() {
    let mut nodes = small_net(30, Config::default());
    assert!(nodes.iter().all(|n| n.st.is_joined()));
    assert!(nodes.iter().all(|n| n.st.table_len() >= 5));
    // Node 29 resolves node 1 (which it may not have in its table) by a lookup.
    let target = nodes[1].sign_id().to_string();
    nodes[29]
        .st
        .request_node_info(&target, Instant::now(), now_ms());
    pump(&mut nodes);
    let found: Vec<Value> = nodes[29]
        .events()
        .into_iter()
        .filter_map(|e| match e {
            KadEvent::NodeInfo(v) => Some(v),
            _ => None,
        })
        .collect();
    assert!(found.iter().any(|v| v["signId"] == target), "{found:?}");
    // A value put by node 3 is found by node 20, and the records every node publishes
    // (signId -> boxId, boxId -> signId) are there.
    nodes[3].st.put(
        "greeting",
        &json!({"b": 1, "a": [1.5, "x"]}),
        Instant::now(),
        now_ms(),
    );
    pump(&mut nodes);
    nodes[20]
        .st
        .get("greeting", Origin::Api, Instant::now(), now_ms());
    let boxid = nodes[7].box_id().to_string();
    nodes[20]
        .st
        .get(&boxid, Origin::Directory, Instant::now(), now_ms());
    pump(&mut nodes);
    let got = values(&mut nodes[20]);
    assert!(got.contains(&("greeting".into(), Ok(json!({"b": 1, "a": [1.5, "x"]})))));
    assert!(got.contains(&(boxid, Ok(json!(nodes[7].sign_id().to_string())))));
    nodes[20]
        .st
        .get("nobody stored this", Origin::Api, Instant::now(), now_ms());
    pump(&mut nodes);
    let got = values(&mut nodes[20]);
    assert!(matches!(&got[..], [(_, Err(_))]), "{got:?}");
}

/// A signed request from `from` as a JavaScript node would build it, with `params` (the
/// contact is added) and a chosen nonce.
fn request_from(from: &Node, method: &str, params: JsValue, nonce: f64) -> String {
    let contact = rpc::Contact::from_node_info(
        &JsValue::from_serde(&from.info),
        &mut mm_platform::identity::KeyCache::new(4),
        now_ms(),
    )
    .unwrap();
    let params = params.with("contact", contact.to_js());
    rpc::seal(
        rpc::request(&rpc::new_id(), method, params),
        nonce,
        from.id.sign_keypair(),
    )
}

/// A PING signed by `from` whose contact is `contact`, whatever it claims.
fn ping_claiming(from: &Node, contact: JsValue) -> String {
    rpc::seal(
        rpc::request(
            &rpc::new_id(),
            "PING",
            JsValue::obj().with("contact", contact),
        ),
        now_ms(),
        from.id.sign_keypair(),
    )
}

fn ping(from: &Node) -> String {
    request_from(from, "PING", JsValue::obj(), now_ms().floor())
}

#[test]
fn forged_replayed_stale_and_malformed_rpcs_are_ignored() {
    let mut a = Node::new(Config::default());
    let b = Node::new(Config::default());
    let c = Node::new(Config::default());
    // Genuine: answered, counted.
    let good = ping(&b);
    a.receive(&b, &good);
    assert_eq!(a.responses(), 1);
    assert_eq!(a.st.stats().accepted, 1);
    // Replayed: refused.
    a.receive(&b, &good);
    assert_eq!(a.responses(), 0);
    // Forged: one character of the signed text changed.
    let forged = ping(&b)
        .replacen("PING", "PINg", 1)
        .replacen("PINg", "PING", 0);
    let tampered = forged.replacen("\"lastSeen\":", "\"lastSeen\":1", 1);
    a.receive(&b, &tampered);
    // Signed by b but delivered as coming from c (not the authenticated sender).
    a.receive(&c, &ping(&b));
    // Stale (11 s old) and from the future (11 s ahead).
    a.receive(
        &b,
        &request_from(&b, "PING", JsValue::obj(), now_ms() - 11_000.0),
    );
    a.receive(
        &b,
        &request_from(&b, "PING", JsValue::obj(), now_ms() + 11_000.0),
    );
    // Unknown method, missing signature, not JSON, not an object, too deep, empty.
    a.receive(&b, &request_from(&b, "DELETE", JsValue::obj(), now_ms()));
    let unsigned = ping(&b);
    let cut = unsigned.find(",\"__signature\"").unwrap();
    a.receive(&b, &(unsigned[..cut].to_string() + "}}"));
    for junk in [
        "not json".to_string(),
        "[1,2,3]".into(),
        "{}".into(),
        "[".repeat(100_000),
        String::new(),
    ] {
        a.receive(&b, &junk);
    }
    assert_eq!(a.responses(), 0, "nothing bad was answered");
    assert_eq!(a.st.stats().accepted, 1);
    assert!(a.st.stats().refused >= 11, "{:?}", a.st.stats());
    assert_eq!(a.st.table_len(), 1, "only b, from its genuine message");
}

#[test]
fn forged_contacts_are_ignored() {
    let mut a = Node::new(Config::default());
    let b = Node::new(Config::default());
    let c = Node::new(Config::default());
    // b signs a message whose contact claims c's boxId with b's signId.
    let mut bad_info = b.info.clone();
    bad_info["boxId"] = json!(c.box_id().to_string());
    let contact = JsValue::obj()
        .with("nodeInfo", JsValue::from_serde(&bad_info))
        .with("lastSeen", JsValue::Num(now_ms()));
    let msg = ping_claiming(&b, contact);
    a.receive(&b, &msg);
    // A genuine contact with a nodeID that is not derived from its boxId.
    let contact = JsValue::obj()
        .with("nodeInfo", JsValue::from_serde(&b.info))
        .with("nodeID", JsValue::Str("00".repeat(20)))
        .with("lastSeen", JsValue::Num(now_ms()));
    let msg = ping_claiming(&b, contact);
    a.receive(&b, &msg);
    // The original's doubly wrapped contact.
    let inner = JsValue::obj().with("nodeInfo", JsValue::from_serde(&b.info));
    let contact = JsValue::obj().with("nodeInfo", inner);
    let msg = ping_claiming(&b, contact);
    a.receive(&b, &msg);
    assert!(a.transmits().is_empty());
    assert_eq!(a.st.table_len(), 0);
    assert_eq!(a.st.stats().refused, 3);
    // A FIND_NODE answer listing forged contacts: they never become candidates that are sent to.
    let mut net = small_net(3, Config::default());
    let asker = 2;
    net[asker]
        .st
        .request_node_info(&c.sign_id().to_string(), Instant::now(), now_ms());
    let sent = net[asker].transmits();
    assert!(!sent.is_empty());
    assert!(sent.iter().all(|t| t.to.box_id != c.box_id()));
}

fn store_item(key: &str, value: JsValue, publisher: &Node) -> JsValue {
    JsValue::obj().with(
        "item",
        JsValue::obj()
            .with("key", JsValue::Str(key.into()))
            .with("value", value)
            .with(
                "publisher",
                JsValue::Str(
                    mm_platform::proto::kademlia::id::NodeId::of_box_id(
                        &publisher.box_id().to_string(),
                    )
                    .to_hex(),
                ),
            )
            .with("timestamp", JsValue::Num(now_ms())),
    )
}

#[test]
fn nobody_stores_a_record_for_someone_elses_id() {
    let mut a = Node::new(Config::default());
    let b = Node::new(Config::default());
    let c = Node::new(Config::default());
    let send = |a: &mut Node, key: &str, value: JsValue| {
        let before = a.st.stats().stores_refused;
        a.receive(
            &b,
            &request_from(&b, "STORE", store_item(key, value, &b), now_ms()),
        );
        let answered = a.responses() > 0;
        assert_eq!(answered, a.st.stats().stores_refused == before);
        answered
    };
    let c_sign = c.sign_id().to_string();
    let c_box = c.box_id().to_string();
    let b_sign = b.sign_id().to_string();
    // c's nodeInfo record, stored by b (even with c's genuine nodeInfo): refused.
    assert!(!send(
        &mut a,
        &format!("nodeInfo:{c_sign}"),
        JsValue::from_serde(&c.info)
    ));
    // b's nodeInfo under c's key, and a nodeInfo record that is not b's own: refused.
    assert!(!send(
        &mut a,
        &format!("nodeInfo:{c_sign}"),
        JsValue::from_serde(&b.info)
    ));
    let mut fake = b.info.clone();
    fake["boxId"] = json!(c_box);
    assert!(!send(
        &mut a,
        &format!("nodeInfo:{b_sign}"),
        JsValue::from_serde(&fake)
    ));
    // Wrong mappings under a node's id: refused; the true ones are accepted from anyone.
    assert!(!send(&mut a, &c_sign, JsValue::Str(b.box_id().to_string())));
    assert!(!send(&mut a, &c_box, JsValue::Str(b_sign.clone())));
    assert!(!send(&mut a, &c_box, JsValue::obj()));
    assert!(send(&mut a, &c_sign, JsValue::Str(c_box.clone())));
    assert!(send(&mut a, &c_box, JsValue::Str(c_sign.clone())));
    // b's own nodeInfo record: accepted.
    assert!(send(
        &mut a,
        &format!("nodeInfo:{b_sign}"),
        JsValue::from_serde(&b.info)
    ));
    // Plus a's own three records, stored when b became its first contact.
    assert_eq!(a.st.items_len(), 6);
}

/// The signIds among the nodeInfos a node reported.
fn reported(node: &mut Node) -> Vec<String> {
    node.events()
        .into_iter()
        .filter_map(|e| match e {
            KadEvent::NodeInfo(v) => v["signId"].as_str().map(str::to_owned),
            _ => None,
        })
        .collect()
}

#[test]
fn a_node_finds_a_relay_it_never_met_through_the_relay_records() {
    // A small k, so that a join meets only part of the 60 nodes.
    let cfg = Config {
        k: 3,
        ..Config::default()
    };
    let mut nodes = small_net(60, cfg);
    let mut relay = Node::with_endpoints(cfg, vec![relay_endpoint()]);
    let relay_sign = relay.sign_id().to_string();
    relay.st.connect(&nodes[0].info, Instant::now(), now_ms());
    nodes.push(relay);
    pump(&mut nodes);
    let r = nodes.len() - 1;
    assert!(nodes[r].st.is_joined());
    let slot = relay_slot(&nodes[r].sign_id());
    assert!(
        nodes[r].st.local_value(&relay_key(slot)).is_some(),
        "the relay announced itself"
    );
    // Nodes that have not heard of the relay: neither reported it nor hold it.
    let strangers: Vec<usize> = (1..r)
        .filter(|&i| {
            let heard = reported(&mut nodes[i]).contains(&relay_sign);
            !heard
                && !nodes[i]
                    .st
                    .contacts()
                    .iter()
                    .any(|c| c["signId"] == relay_sign)
        })
        .collect();
    assert!(strangers.len() >= 10, "only {} strangers", strangers.len());
    for &f in strangers.iter().take(5) {
        nodes[f].st.find_relays(Instant::now(), now_ms());
        pump(&mut nodes);
        let found = reported(&mut nodes[f]);
        assert!(found.contains(&relay_sign), "node {f} found {found:?}");
        let lookups = nodes[f].st.take_finished();
        let relay_lookups: Vec<_> = lookups
            .iter()
            .filter(|l| l.kind == LookupKindTag::Relay)
            .collect();
        assert_eq!(relay_lookups.len(), usize::from(RELAY_SLOTS));
        assert_eq!(relay_lookups.iter().filter(|l| l.found).count(), 1);
    }
    // A search already running is not started twice; none starts without contacts.
    let f = strangers[5];
    nodes[f].st.find_relays(Instant::now(), now_ms());
    let running = nodes[f].st.lookups_len();
    nodes[f].st.find_relays(Instant::now(), now_ms());
    assert_eq!(nodes[f].st.lookups_len(), running);
    pump(&mut nodes);
    let mut alone = Node::new(cfg);
    alone.st.find_relays(Instant::now(), now_ms());
    assert_eq!(alone.st.lookups_len(), 0);
    assert!(alone.transmits().is_empty());
}

#[test]
fn relay_records_are_only_stored_by_the_relay_in_its_slot() {
    let mut a = Node::new(Config::default());
    let relay = Node::with_endpoints(Config::default(), vec![relay_endpoint()]);
    let plain = Node::new(Config::default());
    let send = |a: &mut Node, from: &Node, key: &str, value: &Value| {
        let before = a.st.stats().stores_refused;
        let item = store_item(key, JsValue::from_serde(value), from);
        a.receive(from, &request_from(from, "STORE", item, now_ms()));
        let answered = a.responses() > 0;
        assert_eq!(answered, a.st.stats().stores_refused == before);
        answered
    };
    let slot = relay_slot(&relay.sign_id());
    let other = (slot + 1) % RELAY_SLOTS;
    // The relay's record, by someone else: refused; in another slot: refused.
    assert!(!send(&mut a, &plain, &relay_key(slot), &relay.info));
    assert!(!send(&mut a, &relay, &relay_key(other), &relay.info));
    // A node that offers no relaying, in its own slot: refused.
    let plain_slot = relay_slot(&plain.sign_id());
    assert!(!send(&mut a, &plain, &relay_key(plain_slot), &plain.info));
    // Not a nodeInfo, a slot out of range or written otherwise: refused.
    assert!(!send(&mut a, &relay, &relay_key(slot), &json!("x")));
    assert!(!send(&mut a, &relay, "relay:8", &relay.info));
    assert!(!send(
        &mut a,
        &relay,
        &format!("relay:0{slot}"),
        &relay.info
    ));
    // The relay's own record in its slot: accepted.
    assert!(send(&mut a, &relay, &relay_key(slot), &relay.info));
    assert_eq!(
        a.st.local_value(&relay_key(slot)).as_ref(),
        Some(&relay.info)
    );
}

#[test]
fn a_flood_of_stores_keeps_memory_bounded() {
    let cfg = Config {
        max_items: 500,
        max_value_bytes: 1024,
        ..Config::default()
    };
    let mut a = Node::new(cfg);
    let b = Node::new(cfg);
    let big = JsValue::Str("x".repeat(900));
    for i in 0..3000 {
        let msg = request_from(
            &b,
            "STORE",
            store_item(&format!("k{i}"), big.clone(), &b),
            now_ms(),
        );
        a.receive(&b, &msg);
    }
    let oversized = JsValue::Str("x".repeat(2000));
    a.receive(
        &b,
        &request_from(&b, "STORE", store_item("huge", oversized, &b), now_ms()),
    );
    assert_eq!(a.st.items_len(), 500);
    assert!(a.st.items_bytes() <= 500 * 1024);
    assert!(a.st.local_value("huge").is_none());
    assert!(a.st.stats().stores_refused >= 2501);
    // Overwriting a stored key still works when full.
    let msg = request_from(
        &b,
        "STORE",
        store_item("k1", JsValue::Num(1.0), &b),
        now_ms(),
    );
    a.receive(&b, &msg);
    assert_eq!(a.st.local_value("k1"), Some(json!(1)));
    // Lookups and pending RPCs stay bounded however many are asked for.
    let cfg = Config {
        max_lookups: 16,
        max_pending: 32,
        ..Config::default()
    };
    let mut net = small_net(25, cfg);
    for i in 0..1000 {
        net[0]
            .st
            .get(&format!("key {i}"), Origin::Api, Instant::now(), now_ms());
    }
    assert!(net[0].st.lookups_len() <= 16);
    assert!(net[0].st.pending_len() <= 32);
    let refused = values(&mut net[0])
        .into_iter()
        .filter(|(_, r)| r.is_err())
        .count();
    assert!(refused >= 1000 - 16, "{refused}");
}

// ------------------------------------------------------------------------- 100 platforms

/// Short timers for the simulation.
fn sim_config(seed: Option<Value>) -> KademliaConfig {
    let mut c = KademliaConfig::new(seed.into_iter().collect());
    // Short, yet with room for a loaded machine: all 100 nodes share one thread here.
    c.kad.rpc_timeout = Duration::from_millis(2500);
    c.kad.stall = Duration::from_millis(1000);
    c.kad.lookup_timeout = Duration::from_secs(20);
    c
}

fn sim_net() -> NetConfig {
    NetConfig {
        max_inbound_per_ip: 4096,
        connect_timeout: Duration::from_secs(2),
        max_attempts: 1,
        ..NetConfig::default()
    }
}

struct SimNode {
    p: Platform,
    info: mm_platform::services::Shared<KademliaInfo>,
    inbox: crossbeam_channel::Receiver<Message>,
    values: crossbeam_channel::Receiver<Message>,
}

fn sim_node(seed: Option<Value>, storage: Option<MemStore>) -> SimNode {
    let dht = Kademlia::new(sim_config(seed));
    let info = dht.info_handle();
    let mut b = Platform::builder().net(sim_net()).service(dht);
    if let Some(s) = storage {
        b = b.storage(s);
    }
    let mut p = b.build().unwrap();
    let (_, inbox) = p.messaging().on_channel("public.sim.hello", 1024);
    let (_, values) = p.messaging().on_channel("self.dht.value", 1024);
    SimNode {
        p,
        info,
        inbox,
        values,
    }
}

fn turn(nodes: &mut [SimNode]) {
    for n in nodes.iter_mut() {
        n.p.poll(Some(Duration::ZERO)).unwrap();
        n.p.drain_events().for_each(drop);
    }
}

fn run_until(
    nodes: &mut [SimNode],
    limit: Duration,
    mut done: impl FnMut(&mut [SimNode]) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        turn(nodes);
        if done(nodes) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Each of `senders` sends a message to `per` random targets among `targets` (by signId,
/// unknown to nothing but the DHT); returns (sent, delivered).
fn resolve_and_deliver(
    nodes: &mut [SimNode],
    live: &[usize],
    per: usize,
    tag: &str,
) -> (usize, usize) {
    let mut expected: HashMap<(usize, String), usize> = HashMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ tag.len() as u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut sent = 0;
    for &i in live {
        for r in 0..per {
            let j = loop {
                let j = live[(next() % live.len() as u64) as usize];
                if j != i {
                    break j;
                }
            };
            let to = nodes[j].p.sign_id();
            let body = format!("{tag}:{i}:{r}");
            let status = nodes[i].p.messaging().send("sim.hello", to, &body);
            status.expect("queued");
            *expected.entry((j, body)).or_default() += 1;
            sent += 1;
        }
    }
    let mut delivered = 0;
    run_until(nodes, Duration::from_secs(45), |nodes| {
        for &j in live {
            for m in nodes[j].inbox.try_iter() {
                let body: String = m.json().unwrap();
                if let Some(n) = expected.get_mut(&(j, body)) {
                    if *n > 0 {
                        *n -= 1;
                        delivered += 1;
                    }
                }
            }
        }
        delivered == sent
    });
    (sent, delivered)
}

/// Every node in `askers` gets every key; returns (asked, found).
fn get_all(nodes: &mut [SimNode], askers: &[usize], keys: &[String]) -> (usize, usize) {
    for &i in askers {
        for k in keys {
            let _ = nodes[i].p.messaging().send("dht.get", "local", k);
        }
    }
    let asked = askers.len() * keys.len();
    let (mut answered, mut found) = (0, 0);
    run_until(nodes, Duration::from_secs(60), |nodes| {
        for &i in askers {
            for m in nodes[i].values.try_iter() {
                let v: Value = m.json().unwrap();
                answered += 1;
                if v["value"].as_str() == Some(&format!("value of {}", v["key"].as_str().unwrap()))
                {
                    found += 1;
                }
            }
        }
        answered >= asked
    });
    (asked, found)
}

#[test]
fn a_hundred_nodes_resolve_deliver_store_and_survive_a_third_leaving() {
    const N: usize = 100;
    let started = Instant::now();
    let mut nodes: Vec<SimNode> = vec![sim_node(None, None)];
    // Each node knows one seed: a random node that joined before it.
    let mut rng = 12345u64;
    for i in 1..N {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let seed = (rng >> 33) as usize % i;
        let info = nodes[seed].p.node_info().to_json();
        nodes.push(sim_node(Some(info), None));
        if i % 10 == 9 {
            let ok = run_until(&mut nodes, Duration::from_secs(30), |n| {
                n.iter().skip(1).all(|x| x.info.borrow().joined)
            });
            assert!(ok, "nodes up to {i} joined");
        }
    }
    // Let the joins' bucket refreshes settle.
    run_until(&mut nodes, Duration::from_secs(5), |_| false);
    let sizes: Vec<usize> = nodes.iter().map(|n| n.info.borrow().table_len).collect();
    eprintln!(
        "joined {N} nodes in {:?}; routing table sizes min {} max {}",
        started.elapsed(),
        sizes.iter().min().unwrap(),
        sizes.iter().max().unwrap()
    );
    for n in nodes.iter() {
        n.info.borrow_mut().lookups.clear();
    }

    let all: Vec<usize> = (0..N).collect();
    let (sent, delivered) = resolve_and_deliver(&mut nodes, &all, 3, "before");
    eprintln!(
        "resolve and deliver: {delivered}/{sent} in {:?}",
        started.elapsed()
    );
    assert!(delivered * 100 >= sent * 99, "{delivered}/{sent} delivered");

    // Values stored by 10 nodes, found by 20 others.
    let keys: Vec<String> = (0..10).map(|i| format!("sim key {i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let v = json!({"key": k, "value": format!("value of {k}")});
        let _ = nodes[i * 7 + 3].p.messaging().send("dht.put", "local", &v);
    }
    run_until(&mut nodes, Duration::from_secs(5), |_| false);
    let askers: Vec<usize> = (0..20).map(|i| i * 5 + 1).collect();
    let (asked, found) = get_all(&mut nodes, &askers, &keys);
    eprintln!("values: {found}/{asked} found");
    assert!(found * 100 >= asked * 99, "{found}/{asked} values found");

    // A third of the nodes leave (dropped: sockets closed, nothing said).
    let leaving: Vec<usize> = (0..N).filter(|i| i % 3 == 2).collect();
    for &i in leaving.iter().rev() {
        drop(nodes.remove(i));
    }
    let live: Vec<usize> = (0..nodes.len()).collect();
    let (sent, delivered) = resolve_and_deliver(&mut nodes, &live, 2, "after");
    eprintln!("after a third left: resolve and deliver {delivered}/{sent}");
    assert_eq!(delivered, sent, "no lookup of the remaining nodes broke");
    let askers: Vec<usize> = (0..20).map(|i| i * 3).collect();
    let (asked, found) = get_all(&mut nodes, &askers, &keys);
    eprintln!(
        "after a third left: values {found}/{asked} found in {:?}",
        started.elapsed()
    );
    assert_eq!(found, asked, "every value is still found");
}

#[test]
fn a_restarted_node_rejoins_from_its_stored_table() {
    let mut nodes: Vec<SimNode> = vec![sim_node(None, None)];
    for i in 1..8 {
        let info = nodes[i / 2].p.node_info().to_json();
        nodes.push(sim_node(Some(info), None));
    }
    assert!(run_until(&mut nodes, Duration::from_secs(20), |n| {
        n.iter()
            .skip(1)
            .all(|x| x.info.borrow().joined && x.info.borrow().table_len >= 3)
    }));
    // A node with its own storage joins through node 0, then stops (the table is persisted).
    let dir = support::TempDir::new("kad-restart");
    let identity = Identity::generate();
    let start = |seed: Option<Value>| {
        let store = FileStore::open(dir.path("kad")).unwrap();
        let dht = Kademlia::new(sim_config(seed).storage(store));
        let info = dht.info_handle();
        let p = Platform::builder()
            .net(sim_net())
            .identity(identity.clone())
            .service(dht)
            .build()
            .unwrap();
        let (_, inbox) = crossbeam_channel::bounded(1);
        let (_, values) = crossbeam_channel::bounded(1);
        SimNode {
            p,
            info,
            inbox,
            values,
        }
    };
    nodes.push(start(Some(nodes[0].p.node_info().to_json())));
    assert!(run_until(&mut nodes, Duration::from_secs(20), |n| {
        let x = n.last().unwrap().info.borrow();
        x.joined && x.table_len >= 5
    }));
    drop(nodes.pop());
    // Restarted with no seed at all: it rejoins through the contacts it stored.
    nodes.push(start(None));
    let t = Instant::now();
    assert!(run_until(&mut nodes, Duration::from_secs(20), |n| {
        let x = n.last().unwrap().info.borrow();
        x.joined && x.table_len >= 5
    }));
    eprintln!("rejoined in {:?}", t.elapsed());
    assert!(
        nodes.last().unwrap().info.borrow().items >= 3,
        "its records were restored"
    );
}

#[test]
fn the_node_example_puts_and_gets_with_dht() {
    use support::{node_bin, JsonProc, TempDir};
    const LIMIT: Duration = Duration::from_secs(30);
    let dir = TempDir::new("kad-node");
    let start = |name: &str, extra: &[&str]| {
        let mut cmd = std::process::Command::new(node_bin());
        cmd.arg("--data")
            .arg(dir.path(name))
            .arg("--dht")
            .args(extra)
            .stderr(std::process::Stdio::null());
        let mut p = JsonProc::spawn(name, &mut cmd);
        let info = p.wait_for(LIMIT, |v| v["event"] == "ready")["nodeInfo"].clone();
        (p, info)
    };
    let (mut a, info_a) = start("a", &[]);
    let list = dir.path("bootstrap.json");
    std::fs::write(&list, serde_json::to_vec(&json!([info_a])).unwrap()).unwrap();
    let (mut b, info_b) = start("b", &["--bootstrap", list.to_str().unwrap()]);
    // B joins through A (its bootstrap list); a put before it has any contact would stay local.
    b.wait_for(LIMIT, |v| {
        v["event"] == "peer" && v["nodeInfo"]["signId"] == info_a["signId"]
    });
    std::thread::sleep(Duration::from_secs(1));
    b.cmd(json!({"cmd": "put", "key": "k1", "value": {"x": [1, 2.5, "three"]}}));
    let stored = b.wait_for(LIMIT, |v| v["event"] == "stored" && v["key"] == "k1");
    assert!(stored["acks"].as_u64().unwrap() >= 1, "{stored}");
    a.cmd(json!({"cmd": "get", "key": "k1"}));
    let got = a.wait_for(LIMIT, |v| v["event"] == "value" && v["key"] == "k1");
    assert_eq!(got["value"], json!({"x": [1, 2.5, "three"]}));
    // The records every node stores: signId -> boxId.
    a.cmd(json!({"cmd": "get", "key": info_b["signId"]}));
    let got = a.wait_for(LIMIT, |v| {
        v["event"] == "value" && v["key"] == info_b["signId"]
    });
    assert_eq!(got["value"], info_b["boxId"]);
    a.cmd(json!({"cmd": "get", "key": "nobody stored this"}));
    let got = a.wait_for(LIMIT, |v| {
        v["event"] == "value" && v["key"] == "nobody stored this"
    });
    assert!(
        got["error"].is_string() && got.get("value").is_none(),
        "{got}"
    );
    // Each found the other through the DHT (a peer event with source kademlia).
    a.wait_for(LIMIT, |v| {
        v["event"] == "peer"
            && v["source"] == "kademlia"
            && v["nodeInfo"]["signId"] == info_b["signId"]
    });
    a.quit(LIMIT);
    b.quit(LIMIT);
}

#[test]
fn items_expire_are_replicated_and_buckets_refreshed_on_their_timers() {
    let cfg = Config {
        refresh: Duration::from_secs(10),
        replicate: Duration::from_secs(5),
        republish: Duration::from_secs(20),
        expire: Duration::from_secs(30),
        ..Config::default()
    };
    let mut nodes = small_net(6, cfg);
    let t0 = Instant::now();
    let ms0 = now_ms();
    // Node 1 stores a value; node 4 holds a copy it did not publish.
    nodes[1].st.put("timed", &json!("v"), t0, ms0);
    pump(&mut nodes);
    assert_eq!(nodes[4].st.local_value("timed"), Some(json!("v")));
    // At the replication time node 4 stores its copy at the closest nodes again (kad's
    // T_REPLICATE), and node 1 does not republish yet (younger than T_REPUBLISH).
    nodes[4]
        .st
        .handle_timeout(t0 + Duration::from_secs(6), ms0 + 6000.0);
    let sent = nodes[4].transmits();
    assert!(sent.iter().any(|t| t.payload.contains("\"key\":\"timed\"")));
    deliver(&mut nodes, 4, sent);
    nodes[1]
        .st
        .handle_timeout(t0 + Duration::from_secs(6), ms0 + 6000.0);
    let sent = nodes[1].transmits();
    assert!(!sent.iter().any(|t| t.payload.contains("\"key\":\"timed\"")));
    deliver(&mut nodes, 1, sent);
    assert!(
        nodes
            .iter()
            .all(|n| n.st.pending_len() == 0 && n.st.table_len() == 5),
        "replication cost no contact"
    );
    // After T_REPUBLISH, node 1 publishes its own item again.
    nodes[1]
        .st
        .handle_timeout(t0 + Duration::from_secs(21), ms0 + 21_000.0);
    let sent = nodes[1].transmits();
    assert!(sent.iter().any(|t| t.payload.contains("\"key\":\"timed\"")));
    // Past T_EXPIRE every copy goes, and a refresh looks up random ids in the buckets.
    let n = nodes[4].st.items_len();
    nodes[4]
        .st
        .handle_timeout(t0 + Duration::from_secs(31), ms0 + 31_000.0);
    assert!(nodes[4].st.local_value("timed").is_none());
    assert!(nodes[4].st.items_len() < n);
    assert!(nodes[4].st.lookups_len() > 0, "refresh lookups started");
}

/// Seven nodes, node 0 holding at least 5 of the others (with a small `k` a bucket may
/// overflow: built again until it does).
fn little_net(cfg: Config) -> Vec<Node> {
    loop {
        let nodes = small_net(7, cfg);
        if nodes[0].st.table_len() >= 5 {
            return nodes;
        }
    }
}

/// The nodes node 0 holds, closest to `target` first.
fn by_distance(nodes: &mut [Node], target: &NodeId) -> Vec<usize> {
    let held: Vec<Value> = nodes[0].st.contacts();
    let mut order: Vec<usize> = (1..nodes.len())
        .filter(|&i| {
            held.iter()
                .any(|c| c["signId"] == nodes[i].sign_id().to_string())
        })
        .collect();
    order.sort_by_key(|&i| NodeId::of_box_id(&nodes[i].box_id().to_string()).distance(target));
    order
}

#[test]
fn lookups_go_around_silent_nodes_and_then_leave_them_out() {
    let cfg = Config {
        k: 3,
        rpc_timeout: Duration::from_secs(5),
        stall: Duration::from_secs(1),
        ..Config::default()
    };
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // A node lookup (a boxId that is no signId: one resolution) whose closest node is silent:
    // it waits for it until the RPC stalls (1 s), asks others meanwhile, and then ends without
    // it, long before the 5 s RPC timeout.
    let mut nodes = little_net(cfg);
    let key = loop {
        let id = Identity::generate().box_id().to_string();
        let s: SignId = id.parse().unwrap();
        if s.to_box_id().is_err() {
            break id;
        }
    };
    let order = by_distance(&mut nodes, &NodeId::of_box_id(&key));
    let gone = [order[0]];
    let ended = |n: &mut Node| {
        n.events()
            .into_iter()
            .any(|e| matches!(e, KadEvent::NotFound(_)))
    };
    nodes[0].st.request_node_info(&key, t0, now_ms());
    let sent = pump_without(&mut nodes, &gone);
    assert!(sent.contains(&(0, order[0])), "the silent node was asked");
    assert!(!ended(&mut nodes[0]), "waiting for it");
    nodes[0].st.handle_timeout(at(1100), now_ms());
    pump_without(&mut nodes, &gone);
    assert!(ended(&mut nodes[0]), "ended without it after the stall");
    // At its timeout it leaves the table.
    nodes[0].st.handle_timeout(at(5100), now_ms());
    let silent = nodes[order[0]].sign_id().to_string();
    assert!(!nodes[0].st.contacts().iter().any(|c| c["signId"] == silent));

    // A value lookup whose closest node is silent waits for it until the timeout (the
    // closest nodes hold the values), and the next one leaves it out.
    let mut nodes = little_net(cfg);
    let order = by_distance(&mut nodes, &NodeId::of_key("absent"));
    let gone = [order[0]];
    nodes[0].st.get("absent", Origin::Api, t0, now_ms());
    let sent = pump_without(&mut nodes, &gone);
    assert!(sent.contains(&(0, order[0])), "the silent node was asked");
    nodes[0].st.handle_timeout(at(1100), now_ms());
    pump_without(&mut nodes, &gone);
    assert!(values(&mut nodes[0]).is_empty(), "still waiting for it");
    nodes[0].st.handle_timeout(at(5100), now_ms());
    pump_without(&mut nodes, &gone);
    let got = values(&mut nodes[0]);
    assert!(
        matches!(&got[..], [(k, Err(_))] if k == "absent"),
        "{got:?}"
    );
    nodes[0].st.get("absent", Origin::Api, at(6000), now_ms());
    let sent = pump_without(&mut nodes, &gone);
    assert!(sent.iter().any(|(from, _)| *from == 0));
    assert!(
        !sent.contains(&(0, order[0])),
        "a node that timed out was asked again"
    );
}
