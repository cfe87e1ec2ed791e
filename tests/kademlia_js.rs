//! The Kademlia service against the genuine `mm-services-kademlia` 0.6.5 (on `kad` 1.6.5) from
//! the npm registry, run by `tests/js/peer.js --kademlia` on the genuine transport libraries:
//!
//! - two JS nodes, the second joining through the first; a Rust node joins through the first;
//! - the first JS node finds the Rust node (its service's `requestNodeInfo`) and delivers a
//!   message to it;
//! - the Rust node finds the second JS node, which it was never told about, through the DHT
//!   (a nodeInfo with source `kademlia`) and delivers a message to it;
//! - records cross both ways: the JS node's `directory.get` finds the `signId -> boxId` record
//!   the Rust node stored, and the Rust node finds the one the JS node stored;
//! - the JS nodes' kad transports dropped none of the Rust node's messages (their signatures
//!   verify on the JS side, ours on this side), and no JS process died.
//!
//! - relay records live on JS nodes: a Rust relay's `relay:<slot>` record is stored by the
//!   JS nodes (their `directory.get` returns it), and after the relay has gone a Rust node that
//!   joined through the other JS node finds it there with a relay search.
//!
//! Every JS node gets explicit seeds (the package's default seeds are public hosts).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use mm_platform::services::kademlia::{Kademlia, KademliaConfig};
use mm_platform::{Event, Platform};
use support::js::{js_available, JsPeer};

const LIMIT: Duration = Duration::from_secs(40);

/// The nodeInfos in a JS node's routing table, and how many messages its kad transport
/// dropped (bad signature or nonce, unknown method, late response).
fn kad_contacts(peer: &mut JsPeer, mut pump: impl FnMut()) -> (Vec<Value>, u64) {
    peer.cmd(json!({"cmd": "kadContacts"}));
    let v = peer.wait_for(LIMIT, &mut pump, |v| v["event"] == "kadContacts");
    let contacts = v["contacts"].as_array().cloned().unwrap_or_default();
    (contacts, v["drops"].as_u64().unwrap_or(0))
}

/// Asks JS node `a` for `directory.get` of `key` (again after each `per_try` without an
/// answer, at most [`LIMIT`] in all) while `rust` runs; returns the value of the answer.
fn js_directory_get(
    a: &mut JsPeer,
    b: &mut JsPeer,
    rust: &mut Platform,
    key: &str,
    per_try: Duration,
) -> Value {
    let end = Instant::now() + LIMIT;
    loop {
        a.cmd(json!({"cmd": "local", "topic": "directory.get", "payload": key}));
        let deadline = Instant::now() + per_try;
        while Instant::now() < deadline {
            rust.poll(Some(Duration::from_millis(5))).unwrap();
            a.drain();
            b.drain();
            let hit = a.backlog.iter().position(|v| {
                v["event"] == "local"
                    && v["topic"] == "directory.getReply"
                    && v["payload"]["key"] == key
            });
            if let Some(i) = hit {
                return a.backlog.remove(i)["payload"]["value"].clone();
            }
        }
        assert!(
            Instant::now() < end,
            "A never answered directory.get of {key}"
        );
    }
}

/// Two JS Kademlia nodes, the second joined through the first.
fn two_js_nodes() -> (JsPeer, JsPeer) {
    let mut a = JsPeer::spawn(&["--kademlia", "[]"]);
    let seeds_a = serde_json::to_string(&json!([a.node_info.clone()])).unwrap();
    let b = JsPeer::spawn(&["--kademlia", &seeds_a]);
    // B joined through A: each has the other in its routing table.
    let end = Instant::now() + LIMIT;
    loop {
        let (ca, _) = kad_contacts(&mut a, || {});
        if ca.iter().any(|c| c["boxId"] == b.box_id()) {
            break;
        }
        assert!(Instant::now() < end, "B never joined A");
        std::thread::sleep(Duration::from_millis(200));
    }
    (a, b)
}

/// A Rust node with the Kademlia service joining through `seed`, polled until it joined.
#[cfg(feature = "relay")]
fn rust_kad_node(seed: &Value, net: mm_platform::NetConfig, peers: &mut [&mut JsPeer]) -> Platform {
    let dht = Kademlia::new(KademliaConfig::new(vec![seed.clone()]));
    let info = dht.info_handle();
    let mut p = Platform::builder().net(net).service(dht).build().unwrap();
    let end = Instant::now() + LIMIT;
    while !(info.borrow().joined && info.borrow().table_len >= 1) {
        assert!(Instant::now() < end, "never joined: {:?}", info.borrow());
        p.poll(Some(Duration::from_millis(10))).unwrap();
        for peer in peers.iter_mut() {
            peer.drain();
        }
    }
    p
}

#[cfg(feature = "relay")]
#[test]
fn relay_records_live_on_genuine_js_nodes() {
    use mm_platform::proto::kademlia::state::{relay_key, relay_slot};
    use mm_platform::NetConfig;
    if !js_available("relay_records_live_on_genuine_js_nodes") {
        return;
    }
    let (mut a, mut b) = two_js_nodes();
    let relay_net = NetConfig {
        relay: Some(Default::default()),
        ..NetConfig::default()
    };
    let seed_a = a.node_info.clone();
    let mut relay = rust_kad_node(&seed_a, relay_net, &mut [&mut a, &mut b]);
    let relay_sign = relay.sign_id();
    let key = relay_key(relay_slot(&relay_sign));
    // A (JS) holds the relay's record: its directory.get of the key returns the nodeInfo.
    let got = js_directory_get(&mut a, &mut b, &mut relay, &key, Duration::from_secs(5));
    assert_eq!(got["signId"], relay_sign.to_string());
    // The relay goes; a Rust node joining through B finds it in the JS nodes' records (it
    // never hears from the relay itself: only the relay search can name it).
    drop(relay);
    let seed_b = b.node_info.clone();
    let mut f = rust_kad_node(&seed_b, NetConfig::default(), &mut [&mut a, &mut b]);
    let _ = f.messaging().send("transports.findRelay", "local", &"");
    let end = Instant::now() + LIMIT;
    let mut found = false;
    while !found {
        assert!(Instant::now() < end, "the relay search found nothing");
        f.poll(Some(Duration::from_millis(10))).unwrap();
        a.drain();
        b.drain();
        found = f.drain_events().into_iter().any(|e| {
            matches!(e, Event::NodeInfo { node_info, source }
                if source == "kademlia" && node_info["signId"] == relay_sign.to_string())
        });
    }
    assert!(a.alive() && b.alive());
}

#[test]
fn a_rust_node_joins_a_dht_of_genuine_js_nodes() {
    if !js_available("a_rust_node_joins_a_dht_of_genuine_js_nodes") {
        return;
    }
    let (mut a, mut b) = two_js_nodes();

    // The Rust node joins through A only.
    let dht = Kademlia::new(KademliaConfig::new(vec![a.node_info.clone()]));
    let info = dht.info_handle();
    let mut rust = Platform::builder().service(dht).build().unwrap();
    let (_, inbox) = rust.messaging().on_channel("public.test.hello", 16);
    let (_, values) = rust.messaging().on_channel("self.dht.value", 16);
    let mut found_by_rust: Vec<Value> = Vec::new();
    let rust_box = rust.box_id().to_string();
    let rust_sign = rust.sign_id().to_string();
    let end = Instant::now() + LIMIT;
    while !(info.borrow().joined && info.borrow().table_len >= 1) {
        assert!(
            Instant::now() < end,
            "the Rust node never joined: {:?}",
            info.borrow()
        );
        rust.poll(Some(Duration::from_millis(10))).unwrap();
        a.drain();
        b.drain();
    }
    eprintln!("joined: {:?}", info.borrow().stats);

    // A finds the Rust node in its DHT and delivers a message to it.
    let end = Instant::now() + LIMIT;
    loop {
        a.cmd(json!({"cmd": "kadLookup", "key": rust_box}));
        let r = a.wait_for(
            LIMIT,
            || rust.poll(Some(Duration::from_millis(5))).unwrap(),
            |v| v["event"] == "kadLookup",
        );
        if r["found"]
            .as_array()
            .is_some_and(|f| f.iter().any(|n| n["signId"] == rust_sign.as_str()))
        {
            break;
        }
        assert!(Instant::now() < end, "A never found the Rust node");
        for _ in 0..20 {
            rust.poll(Some(Duration::from_millis(10))).unwrap();
        }
    }
    a.cmd(
        json!({"cmd": "send", "id": 1, "to": rust_box, "topic": "test.hello",
                 "protocol": "ms", "payload": {"from": "A"}}),
    );
    let end = Instant::now() + LIMIT;
    let msg = loop {
        rust.poll(Some(Duration::from_millis(10))).unwrap();
        a.drain();
        if let Ok(m) = inbox.try_recv() {
            break m;
        }
        assert!(Instant::now() < end, "A's message never arrived");
    };
    assert_eq!(msg.json::<Value>().unwrap(), json!({"from": "A"}));

    // The Rust node finds B, which nobody told it about, and delivers a message to it.
    let b_sign: mm_platform::SignId = b.sign_id().parse().unwrap();
    let status = rust
        .messaging()
        .send("test.hello", b_sign, &json!({"from": "rust"}));
    status.expect("queued");
    let got = b.wait_for(
        LIMIT,
        || {
            rust.poll(Some(Duration::from_millis(5))).unwrap();
            for e in rust.drain_events() {
                if let Event::NodeInfo { node_info, source } = e {
                    if source == "kademlia" {
                        found_by_rust.push(node_info);
                    }
                }
            }
        },
        |v| v["event"] == "message" && v["topic"] == "test.hello",
    );
    assert_eq!(got["payload"], json!({"from": "rust"}));
    assert_eq!(got["sender"], rust_box.as_str());
    assert!(
        found_by_rust
            .iter()
            .any(|n| n["signId"] == b.sign_id().as_str()),
        "B's nodeInfo came from the DHT"
    );

    // Records both ways: A's directory.get of the Rust node's signId finds the boxId the Rust
    // node stored (the original's record); the Rust node finds the one A stored.
    let got = js_directory_get(
        &mut a,
        &mut b,
        &mut rust,
        &rust_sign,
        Duration::from_secs(8),
    );
    assert_eq!(got, rust_box.as_str());
    let _ = rust.messaging().send("dht.get", "local", &a.sign_id());
    let end = Instant::now() + LIMIT;
    let v: Value = loop {
        rust.poll(Some(Duration::from_millis(5))).unwrap();
        a.drain();
        b.drain();
        if let Ok(m) = values.try_recv() {
            break m.json().unwrap();
        }
        assert!(Instant::now() < end, "no answer to dht.get");
    };
    assert_eq!(v["value"], a.box_id().as_str(), "{v}");

    let stats = info.borrow().stats;
    eprintln!("rust node: {stats:?}");
    assert_eq!(stats.refused, 0, "every JS message verified");
    // Both JS nodes accepted every message of the Rust node (kad's transport drops a message
    // whose signature or nonce fails its checks), and both have it in their routing tables.
    for peer in [&mut a, &mut b] {
        let (contacts, drops) = kad_contacts(peer, || rust.poll(Some(Duration::ZERO)).unwrap());
        assert_eq!(drops, 0, "a JS node dropped a message");
        assert!(contacts.iter().any(|c| c["signId"] == rust_sign.as_str()));
    }
    a.drain();
    b.drain();
    assert!(a.alive() && b.alive());
    // The original's doubly wrapped contacts (a JSON contact inside a JSON string), which peer.js's guard skipped
    // instead of dying on them: among JS nodes, never about the Rust node.
    for (name, peer) in [("A", &a), ("B", &b)] {
        let guarded: Vec<&Value> = peer
            .backlog
            .iter()
            .filter(|v| v["event"] == "guarded")
            .collect();
        eprintln!(
            "JS node {name}: {} sends skipped by the guard",
            guarded.len()
        );
    }
}

/// The signatures depend on our JSON text being exactly what `JSON.stringify` writes for what
/// `JSON.parse` read: numbers of every magnitude, strings with escapes and non-ASCII, keys that
/// are array indices, repeated keys, nesting. Node itself is the reference here.
#[test]
fn our_json_text_is_javascripts() {
    if !js_available("our_json_text_is_javascripts") {
        return;
    }
    use mm_platform::proto::kademlia::json::JsValue;
    use std::io::{BufRead, BufReader, Write};
    let mut corpus: Vec<String> = vec![
        r#"{"b":1,"a":2,"10":3,"2":4,"b":5,"01":6,"4294967294":7,"4294967295":8,"-1":9}"#.into(),
        r#"["\u0000\u001f\u007f\u2028\u2029\ud83d\ude00","\/\"\\\b\f\n\r\t","é漢"]"#.into(),
        r#"[0,-0,0.0,1e0,1E+2,1e-7,123e-20,1.7976931348623157e308,5e-324,2.2250738585072014e-308]"#
            .into(),
        r#"[100000000000000000000,1000000000000000000000,0.000001,0.0000001,9007199254740993]"#
            .into(),
        r#"{"nested":{"deep":[{"x":[[[1.5]]]}],"empty":{},"arr":[]},"t":true,"f":false,"n":null}"#
            .into(),
    ];
    // Pseudo-random doubles over the whole range of exponents.
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..200 {
        let mut line = String::from("[");
        for i in 0..20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if !f.is_finite() {
                continue;
            }
            if i > 0 && !line.ends_with('[') {
                line.push(',');
            }
            line.push_str(&format!("{f:e}"));
            line.push(',');
            // And integers and short decimals, which messages mostly carry.
            line.push_str(&format!(
                "{},{}.{}",
                x % 10_000_000_000_000,
                x % 1000,
                x % 97
            ));
        }
        line.push(']');
        corpus.push(line);
    }
    let mut child = std::process::Command::new("node")
        .arg("-e")
        .arg(
            "const rl=require('readline').createInterface({input:process.stdin});\
             rl.on('line',l=>process.stdout.write(JSON.stringify(JSON.parse(l))+'\\n'))",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node");
    let mut stdin = child.stdin.take().unwrap();
    let input = corpus.join("\n") + "\n";
    let writer = std::thread::spawn(move || {
        stdin.write_all(input.as_bytes()).unwrap();
    });
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut n = 0;
    for (line, js) in corpus.iter().zip(out.lines()) {
        let js = js.unwrap();
        let ours = JsValue::parse(line.as_bytes())
            .unwrap_or_else(|| panic!("we refused {line}"))
            .stringify();
        assert_eq!(ours, js, "for {line}");
        n += 1;
    }
    writer.join().unwrap();
    let _ = child.wait();
    assert_eq!(n, corpus.len());
}
