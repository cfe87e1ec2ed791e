//! End-to-end tests of remote messaging: real sockets on 127.0.0.1, two platforms driven in
//! one thread, over UDP and over TCP, both directions.

use mm_platform::Shared;
use std::time::{Duration, Instant};

use mm_platform::identity::Identity;
use mm_platform::storage::MemStore;
use mm_platform::{DeliveryError, Event, Message, NetConfig, Platform, Scope, SendOptions};
use serde_json::{json, Value};

fn node(identity: Identity, cfg: NetConfig, listen: Value) -> Platform {
    Platform::builder()
        .identity(identity)
        .storage(MemStore::new())
        .net(cfg)
        .connection_info(listen)
        .build()
        .unwrap()
}

fn udp_only() -> Value {
    json!([{"transportType": "udp", "transportInfo": {"address": "127.0.0.1", "port": 0}}])
}

fn tcp_only() -> Value {
    json!([{"transportType": "tcp", "transportInfo": {"address": "127.0.0.1", "port": 0}}])
}

/// Polls both platforms until `done` or the time limit.
fn pump(a: &mut Platform, b: &mut Platform, limit: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    for _ in 0..1_000_000 {
        if done() || Instant::now() > end {
            return;
        }
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

fn tell(p: &mut Platform, other: &Platform) {
    p.add_peer(&other.node_info());
}

fn exchange(listen: fn() -> Value) {
    let ia = Identity::generate();
    let ib = Identity::generate();
    let mut a = node(ia.clone(), NetConfig::default(), listen());
    let mut b = Platform::builder()
        .identity(ib)
        .friends([ia.sign_id()])
        .connection_info(listen())
        .build()
        .unwrap();
    assert_eq!(a.connection_info().as_array().unwrap().len(), 1);
    tell(&mut a, &b);
    tell(&mut b, &a);
    let (_, rx_b) = b.messaging().on_channel("*.test.*", 1024);
    let (_, rx_a) = a.messaging().on_channel("*.test.*", 1024);
    let acked = Shared::new(Vec::new());
    let bid = b.sign_id();
    for i in 0..100 {
        let ack = acked.clone();
        let st = a.send_with_callback(
            "ms",
            "test.hello",
            bid,
            serde_json::to_vec(&json!({"n": i})).unwrap(),
            SendOptions::default(),
            move |_ctx, r| ack.borrow_mut().push(r),
        );
        assert!(st.is_ok());
    }
    let mut got_b: Vec<Message> = Vec::new();
    pump(&mut a, &mut b, Duration::from_secs(20), || {
        got_b.extend(rx_b.try_iter());
        got_b.len() == 100 && acked.borrow().len() == 100
    });
    assert_eq!(got_b.len(), 100);
    for (i, m) in got_b.iter().enumerate() {
        assert_eq!(m.json::<Value>().unwrap()["n"], i as u64, "in order");
        assert_eq!(m.sender, a.sign_id().into());
        assert_eq!(m.scope, Scope::Friends, "a is in b's friends circle");
        assert_eq!(m.topic, "test.hello");
    }
    assert!(acked.borrow().iter().all(|r| r.is_ok()));
    // The other direction, on the same connection: b is a stranger to a.
    let aid = a.sign_id();
    assert!(b.messaging().send("test.back", aid, &"hi").is_ok());
    let mut got_a: Vec<Message> = Vec::new();
    pump(&mut a, &mut b, Duration::from_secs(10), || {
        got_a.extend(rx_a.try_iter());
        !got_a.is_empty()
    });
    assert_eq!(got_a.len(), 1);
    assert_eq!(got_a[0].scope, Scope::Public);
    assert_eq!(got_a[0].sender, b.sign_id().into());
    let ca = a.connections();
    assert_eq!(ca.len(), 1, "one connection per peer: {ca:?}");
    assert_eq!(ca[0].peer, Some(b.sign_id()));
    assert!(ca[0].messages_sent >= 101);
    assert!(ca[0].bytes_sent > 0);
    assert_eq!(b.connections().len(), 1);
    let events: Vec<Event> = a.drain_events().collect();
    assert!(events.contains(&Event::Connection(b.sign_id())));
}

#[test]
fn two_nodes_over_udp_both_directions() {
    exchange(udp_only);
}

#[test]
fn two_nodes_over_tcp_both_directions() {
    exchange(tcp_only);
}

#[test]
fn devices_get_scope_self_and_strangers_never_do() {
    let ia = Identity::generate();
    let ib = Identity::generate();
    let ic = Identity::generate();
    let mut b = Platform::builder()
        .identity(ib)
        .devices([ia.sign_id()])
        .build()
        .unwrap();
    let mut a = node(ia, NetConfig::default(), json!([]));
    let mut c = node(ic, NetConfig::default(), json!([]));
    tell(&mut a, &b);
    tell(&mut c, &b);
    let (_, rx) = b.on_channel("*.secret.*", 64);
    let (_, disguised) = b.on_channel("*.self.secret.*", 64);
    let bid = b.sign_id();
    // c tries hard: a topic starting with "self" only lands under its real scope.
    assert!(c.send("ms", "secret.cmd", bid, b"1".to_vec()).is_ok());
    assert!(c.send("ms", "self.secret.cmd", bid, b"2".to_vec()).is_ok());
    assert!(a.send("ms", "secret.cmd", bid, b"3".to_vec()).is_ok());
    let mut got: Vec<Message> = Vec::new();
    let mut got2: Vec<Message> = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while (got.len() < 2 || got2.is_empty()) && Instant::now() < end {
        for p in [&mut a, &mut b, &mut c] {
            p.poll(Some(Duration::from_millis(1))).unwrap();
        }
        got.extend(rx.try_iter());
        got2.extend(disguised.try_iter());
    }
    let mut scopes: Vec<(Vec<u8>, Scope)> =
        got.iter().map(|m| (m.payload.clone(), m.scope)).collect();
    scopes.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        scopes,
        vec![(b"1".to_vec(), Scope::Public), (b"3".to_vec(), Scope::Own)]
    );
    assert_eq!(got2.len(), 1);
    assert_eq!(got2[0].scope, Scope::Public);
    assert_eq!(got2[0].scoped_topic(), "public.self.secret.cmd");
}

#[test]
fn unknown_destination_fails_after_the_lookup_timeout() {
    let cfg = NetConfig {
        lookup_timeout: Duration::from_millis(300),
        ..NetConfig::default()
    };
    let mut a = node(Identity::generate(), cfg, json!([]));
    let (_, req) = a
        .messaging()
        .on_channel("self.transports.requestNodeInfo", 8);
    let (_, failed) = a.messaging().on_channel("self.transports.failed", 8);
    let nobody = Identity::generate().sign_id();
    let result = Shared::new(None);
    let r = result.clone();
    for _ in 0..3 {
        let _ = a.send("ms", "x.y", nobody, b"1".to_vec());
    }
    let st = a.send_with_callback(
        "ms",
        "x.y",
        nobody,
        b"1".to_vec(),
        SendOptions::default(),
        move |_c, res| *r.borrow_mut() = Some(res),
    );
    assert!(st.is_ok());
    let end = Instant::now() + Duration::from_secs(5);
    while result.borrow().is_none() && Instant::now() < end {
        a.poll(Some(Duration::from_millis(10))).unwrap();
    }
    assert!(matches!(
        result.borrow().as_ref(),
        Some(Err(DeliveryError::Unreachable(_)))
    ));
    a.poll(Some(Duration::ZERO)).unwrap();
    let reqs: Vec<Message> = req.try_iter().collect();
    assert_eq!(reqs.len(), 1, "lookups are coalesced");
    assert_eq!(reqs[0].json::<String>().unwrap(), nobody.to_string());
    let f: Vec<Message> = failed.try_iter().collect();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].json::<String>().unwrap(), nobody.to_string());
}

#[test]
fn poisoned_node_info_is_refused() {
    let mut a = node(Identity::generate(), NetConfig::default(), json!([]));
    let victim = Identity::generate();
    let attacker = Identity::generate();
    let before = a.stats().malformed;
    let poisoned = json!({"signId": victim.sign_id().to_string(),
        "boxId": attacker.box_id().to_string(),
        "connectionInfo": [{"transportType": "udp", "transportInfo": {"address": "127.0.0.1", "port": 9}}]});
    let _ = a
        .messaging()
        .send("transports.nodeInfo", "local", &poisoned);
    a.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(a.stats().malformed, before + 1);
}

#[test]
fn a_handle_on_another_thread_sends_to_a_remote_node() {
    let mut a = Platform::builder().build().unwrap();
    let mut b = Platform::builder().build().unwrap();
    tell(&mut a, &b);
    let (_, rx) = b.messaging().on_channel("public.thread.*", 64);
    let h = a.handle();
    let bid = b.sign_id();
    let t = std::thread::spawn(move || {
        for i in 0..10 {
            assert!(h.send_json("thread.msg", bid, &i).is_ok());
        }
    });
    t.join().unwrap();
    let mut got = Vec::new();
    pump(&mut a, &mut b, Duration::from_secs(10), || {
        got.extend(rx.try_iter().map(|m| m.json::<i64>().unwrap()));
        got.len() == 10
    });
    assert_eq!(got, (0..10).collect::<Vec<i64>>());
}

#[test]
fn an_application_directory_answers_lookups_without_the_bus() {
    use mm_platform::platform::{Directory, NodeInfo};
    use std::collections::HashMap;
    struct Static(HashMap<mm_platform::SignId, NodeInfo>);
    impl Directory for Static {
        fn lookup(&mut self, id: &mm_platform::SignId) -> Option<NodeInfo> {
            self.0.get(id).cloned()
        }
    }
    let mut b = Platform::builder().build().unwrap();
    let info = b.node_info();
    let mut a = Platform::builder()
        .directory(Static(HashMap::from([(b.sign_id(), info)])))
        .build()
        .unwrap();
    let (_, req) = a
        .messaging()
        .on_channel("self.transports.requestNodeInfo", 4);
    let (_, rx) = b.messaging().on_channel("public.dir.*", 4);
    assert!(a.messaging().send("dir.hi", b.sign_id(), &1).is_ok());
    let mut got = Vec::new();
    pump(&mut a, &mut b, Duration::from_secs(10), || {
        got.extend(rx.try_iter());
        !got.is_empty()
    });
    assert_eq!(got.len(), 1);
    assert!(req.try_iter().next().is_none(), "no bus lookup was needed");
}
