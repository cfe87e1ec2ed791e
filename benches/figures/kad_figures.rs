//! Kademlia figure group of the bench (`kad_*`): a DHT of [`NODES`] platforms with the Kademlia
//! service on 127.0.0.1 in this process (each joined through one random earlier node, the
//! simulation of `tests/kademlia.rs`), then, one at a time:
//!
//! - value lookups (`dht.get` of keys other nodes stored, from random nodes): the time from the
//!   request to the answer on the bus, and the RPCs the lookup sent (`kad_get_*`);
//! - value lookups of keys nobody stored (`kad_miss_*`: until the "not found" answer): every
//!   node closest to the key is asked, and waited for;
//! - node lookups of ids nobody has (`kad_walk_*`: resolutions of nodes that do not exist, as
//!   the lookup records them): full walks to the `k` closest;
//! - resolutions (`transports.requestNodeInfo` of random other nodes' signIds): the time until
//!   the service publishes the nodeInfo, whether from its routing table or by a lookup, and the
//!   RPCs of those that needed a lookup (`kad_resolve_*`);
//!
//! and the same after a third of the nodes left without a word (`kad_gone_*`): lookups then
//! wait for RPC timeouts (1.5 s here, as in the test) on the departed nodes they still know.

use std::time::{Duration, Instant};

use serde_json::json;

use mm_platform::identity::Identity;
use mm_platform::services::kademlia::{Kademlia, KademliaConfig, KademliaInfo, LookupKindTag};
use mm_platform::Shared;
use mm_platform::{Event, Message, NetConfig, Platform};

use super::Bench;

/// Nodes in the DHT.
const NODES: usize = 100;
/// Lookups of each kind measured, before and after.
const ROUNDS: usize = 100;
/// Keys stored.
const KEYS: usize = 20;
/// Longest wait of any loop here.
const LIMIT: Duration = Duration::from_secs(60);

struct Node {
    p: Platform,
    info: Shared<KademliaInfo>,
    values: crossbeam_channel::Receiver<Message>,
}

fn node(seed: Option<serde_json::Value>) -> Node {
    let mut c = KademliaConfig::new(seed.into_iter().collect());
    c.kad.rpc_timeout = Duration::from_millis(1500);
    c.kad.stall = Duration::from_millis(500);
    c.kad.lookup_timeout = Duration::from_secs(20);
    let dht = Kademlia::new(c);
    let info = dht.info_handle();
    let net = NetConfig {
        max_inbound_per_ip: 4096,
        connect_timeout: Duration::from_secs(2),
        max_attempts: 1,
        ..NetConfig::default()
    };
    let mut p = Platform::builder()
        .net(net)
        .service(dht)
        .build()
        .expect("platform");
    let (_, values) = p.messaging().on_channel("self.dht.value", 64);
    Node { p, info, values }
}

fn turn(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.p.poll(Some(Duration::ZERO)).expect("poll");
    }
}

fn run(nodes: &mut [Node], limit: Duration, mut done: impl FnMut(&mut [Node]) -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        turn(nodes);
        for n in nodes.iter_mut() {
            n.p.drain_events().for_each(drop);
        }
        if done(nodes) {
            return true;
        }
    }
    false
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn pct_ms(v: &mut [Duration], p: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e3
}

fn mean(v: &[u32]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64
}

/// Measures value lookups and resolutions; emits them with `prefix`.
fn measure(bench: &Bench, nodes: &mut [Node], keys: &[String], rng: &mut Rng, prefix: &str) {
    let (mut get_t, mut get_rpcs, mut failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..ROUNDS {
        let i = rng.below(nodes.len());
        let key = &keys[rng.below(keys.len())];
        nodes[i].info.borrow_mut().lookups.clear();
        let _ = nodes[i].values.try_iter().count();
        let start = Instant::now();
        let _ = nodes[i].p.messaging().send("dht.get", "local", key);
        let mut answer = None;
        run(nodes, LIMIT, |n| {
            answer = n[i].values.try_recv().ok();
            answer.is_some()
        });
        let took = start.elapsed();
        let ok = answer
            .and_then(|m| m.json::<serde_json::Value>().ok())
            .is_some_and(|v| v["value"] == json!(format!("value of {key}")));
        if !ok {
            failed += 1;
            continue;
        }
        get_t.push(took);
        let info = nodes[i].info.borrow();
        if let Some(r) = info.lookups.iter().find(|r| r.kind == LookupKindTag::Get) {
            get_rpcs.push(r.rpcs);
        }
    }
    // Value lookups of keys nobody stored: every node closest to the key is asked.
    let (mut miss_t, mut miss_rpcs) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS / 2 {
        let i = rng.below(nodes.len());
        let key = format!("{prefix} absent key {r}");
        nodes[i].info.borrow_mut().lookups.clear();
        let _ = nodes[i].values.try_iter().count();
        let start = Instant::now();
        let _ = nodes[i].p.messaging().send("dht.get", "local", &key);
        let mut answer = None;
        run(nodes, LIMIT, |n| {
            answer = n[i].values.try_recv().ok();
            answer.is_some()
        });
        if answer.is_some() {
            miss_t.push(start.elapsed());
        }
        let info = nodes[i].info.borrow();
        if let Some(r) = info.lookups.iter().find(|r| r.kind == LookupKindTag::Get) {
            miss_rpcs.push(r.rpcs);
        }
    }
    // Node lookups of ids nobody has (a resolution of a node that does not exist): full walks.
    let (mut walk_t, mut walk_rpcs) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let i = rng.below(nodes.len());
        let unknown = Identity::generate().sign_id().to_string();
        nodes[i].info.borrow_mut().lookups.clear();
        let _ = nodes[i]
            .p
            .messaging()
            .send("transports.requestNodeInfo", "local", &unknown);
        let mut record = None;
        run(nodes, LIMIT, |n| {
            record = n[i]
                .info
                .borrow()
                .lookups
                .iter()
                .find(|r| r.kind == LookupKindTag::Resolve)
                .copied();
            record.is_some()
        });
        if let Some(r) = record {
            walk_t.push(r.duration);
            walk_rpcs.push(r.rpcs);
        }
    }
    let (mut res_t, mut res_rpcs, mut res_failed) = (Vec::new(), Vec::new(), 0);
    for _ in 0..ROUNDS {
        let i = rng.below(nodes.len());
        let j = loop {
            let j = rng.below(nodes.len());
            if j != i {
                break j;
            }
        };
        let target = nodes[j].p.sign_id().to_string();
        nodes[i].info.borrow_mut().lookups.clear();
        let start = Instant::now();
        let _ = nodes[i]
            .p
            .messaging()
            .send("transports.requestNodeInfo", "local", &target);
        let end = start + LIMIT;
        let mut found = false;
        while !found && Instant::now() < end {
            turn(nodes);
            for (k, n) in nodes.iter_mut().enumerate() {
                let hit = n.p.drain_events().any(|e| {
                    matches!(e, Event::NodeInfo { ref source, ref node_info }
                        if source == "kademlia" && node_info["signId"] == target.as_str())
                });
                found |= k == i && hit;
            }
        }
        if !found {
            res_failed += 1;
            continue;
        }
        res_t.push(start.elapsed());
        let info = nodes[i].info.borrow();
        if let Some(r) = info
            .lookups
            .iter()
            .find(|r| r.kind == LookupKindTag::Resolve)
        {
            res_rpcs.push(r.rpcs);
        }
    }
    if failed + res_failed > 0 {
        eprintln!("kad: {prefix}: {failed} value lookups and {res_failed} resolutions failed");
    }
    bench.emit(
        &format!("{prefix}_get_median"),
        pct_ms(&mut get_t, 50),
        "ms",
    );
    bench.emit(&format!("{prefix}_get_p99"), pct_ms(&mut get_t, 99), "ms");
    bench.emit(
        &format!("{prefix}_get_messages"),
        mean(&get_rpcs),
        "rpcs/lookup",
    );
    bench.emit(
        &format!("{prefix}_miss_median"),
        pct_ms(&mut miss_t, 50),
        "ms",
    );
    bench.emit(&format!("{prefix}_miss_p99"), pct_ms(&mut miss_t, 99), "ms");
    bench.emit(
        &format!("{prefix}_miss_messages"),
        mean(&miss_rpcs),
        "rpcs/lookup",
    );
    bench.emit(
        &format!("{prefix}_walk_median"),
        pct_ms(&mut walk_t, 50),
        "ms",
    );
    bench.emit(&format!("{prefix}_walk_p99"), pct_ms(&mut walk_t, 99), "ms");
    bench.emit(
        &format!("{prefix}_walk_messages"),
        mean(&walk_rpcs),
        "rpcs/lookup",
    );
    bench.emit(
        &format!("{prefix}_resolve_median"),
        pct_ms(&mut res_t, 50),
        "ms",
    );
    bench.emit(
        &format!("{prefix}_resolve_p99"),
        pct_ms(&mut res_t, 99),
        "ms",
    );
    bench.emit(
        &format!("{prefix}_resolve_lookup_share"),
        100.0 * res_rpcs.len() as f64 / res_t.len().max(1) as f64,
        "%",
    );
    bench.emit(
        &format!("{prefix}_resolve_messages"),
        mean(&res_rpcs),
        "rpcs/lookup",
    );
}

/// The figure names after the prefix (`kad` or `kad_gone`).
const FIGURES: [&str; 13] = [
    "get_median",
    "get_p99",
    "get_messages",
    "miss_median",
    "miss_p99",
    "miss_messages",
    "walk_median",
    "walk_p99",
    "walk_messages",
    "resolve_median",
    "resolve_p99",
    "resolve_lookup_share",
    "resolve_messages",
];

pub fn kad(bench: &Bench) {
    let wanted = ["kad", "kad_gone"]
        .iter()
        .any(|p| FIGURES.iter().any(|f| bench.wants(&format!("{p}_{f}"))));
    if !wanted {
        return;
    }
    let started = Instant::now();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut nodes = vec![node(None)];
    for i in 1..NODES {
        let seed = nodes[rng.below(i)].p.node_info().to_json();
        nodes.push(node(Some(seed)));
        if i % 10 == 9
            && !run(&mut nodes, LIMIT, |n| {
                n.iter().skip(1).all(|x| x.info.borrow().joined)
            })
        {
            eprintln!("kad: nodes did not join; figures skipped");
            return;
        }
    }
    let keys: Vec<String> = (0..KEYS).map(|i| format!("bench key {i}")).collect();
    for k in &keys {
        let i = rng.below(NODES);
        let v = json!({"key": k, "value": format!("value of {k}")});
        let _ = nodes[i].p.messaging().send("dht.put", "local", &v);
    }
    run(&mut nodes, Duration::from_secs(5), |_| false);
    eprintln!("kad: {NODES} nodes up in {:?}", started.elapsed());
    measure(bench, &mut nodes, &keys, &mut rng, "kad");
    // A third leaves, without a word.
    let mut i = 0;
    nodes.retain(|_| {
        i += 1;
        i % 3 != 0
    });
    measure(bench, &mut nodes, &keys, &mut rng, "kad_gone");
}
