//! mDNS discovery over real multicast sockets, always inside a private network namespace with
//! only `lo` (so no packet leaves the machine):
//!
//! - `examples/node.rs` processes started with `--mdns` and nothing else find each other,
//!   exchange messages both ways, find a node that joins later, and do not report a node that
//!   left when a fourth one asks;
//! - hostile packets on the real socket (bad JSON, forged keys, our own nodeInfo echoed,
//!   oversized datagrams, floods) publish nothing and cost bounded memory, while a valid
//!   answer is still published.

mod support;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use mm_platform::identity::Identity;
use mm_platform::proto::mdns::wire;
use mm_platform::services::mdns::{Mdns, MdnsConfig};
use mm_platform::{Event, Platform};
use support::{start_mdns_node, JsonProc, Netns, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

fn is_peer(id: &Value) -> impl Fn(&Value) -> bool + '_ {
    move |v: &Value| v["event"] == "peer" && v["nodeInfo"]["signId"] == *id
}

fn peer_events_for(p: &JsonProc, id: &Value) -> usize {
    p.seen.iter().filter(|v| is_peer(id)(v)).count()
}

#[test]
fn nodes_with_only_mdns_find_each_other_talk_find_a_newcomer_and_forget_a_leaver() {
    let Some(ns) = Netns::create("mdns nodes") else {
        return;
    };
    let dir = TempDir::new("mdns-nodes");
    let (mut a, a_info) = start_mdns_node(&ns, &dir, "a");
    let (mut b, b_info) = start_mdns_node(&ns, &dir, "b");
    let (a_id, b_id) = (a_info["signId"].clone(), b_info["signId"].clone());

    let found = a.wait_for(LIMIT, is_peer(&b_id));
    assert_eq!(found["source"], "mdns");
    assert_eq!(found["nodeInfo"], b_info);
    assert_eq!(b.wait_for(LIMIT, is_peer(&a_id))["nodeInfo"], a_info);

    // Messages both ways, with nothing but what mDNS found.
    a.cmd(json!({"cmd": "send", "id": 1, "topic": "test.hello", "to": b_id, "payload": {"from": "a"}}));
    let got = b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.test.hello"
    });
    assert_eq!(got["sender"], a_id);
    assert_eq!(got["payload"]["from"], "a");
    b.cmd(json!({"cmd": "send", "id": 2, "topic": "test.hello", "to": a_id, "payload": {"from": "b"}}));
    let got = a.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.test.hello"
    });
    assert_eq!(got["sender"], b_id);
    assert_eq!(got["payload"]["from"], "b");

    // A third node joining later is found by both, and finds both.
    let (mut c, c_info) = start_mdns_node(&ns, &dir, "c");
    let c_id = c_info["signId"].clone();
    a.wait_for(LIMIT, is_peer(&c_id));
    b.wait_for(LIMIT, is_peer(&c_id));
    c.wait_for(LIMIT, is_peer(&a_id));
    c.wait_for(LIMIT, is_peer(&b_id));

    // B leaves. A fourth node's queries are answered by A and C only: nobody reports B again.
    b.quit(LIMIT);
    let (mut d, _) = start_mdns_node(&ns, &dir, "d");
    d.wait_for(LIMIT, is_peer(&a_id));
    d.wait_for(LIMIT, is_peer(&c_id));
    let before = (peer_events_for(&a, &b_id), peer_events_for(&c, &b_id));
    // The whole first round of D's queries (10 x 400 ms) and the answers' rate limits.
    for p in [&mut a, &mut c, &mut d] {
        p.collect_for(Duration::from_secs(2));
    }
    d.collect_for(Duration::from_secs(3));
    assert_eq!(peer_events_for(&d, &b_id), 0, "d saw {:?}", d.seen);
    assert_eq!(
        (peer_events_for(&a, &b_id), peer_events_for(&c, &b_id)),
        before,
        "a node that left was reported again"
    );
    // Each node reported each other node once (nodeInfos did not change).
    assert_eq!(peer_events_for(&a, &c_id), 1);
    for p in [a, c, d] {
        p.quit(LIMIT);
    }
}

fn info_of(id: &Identity, port: u16) -> Value {
    json!({"signId": id.sign_id().to_string(), "boxId": id.box_id().to_string(),
        "connectionInfo": [{"transportType": "udp",
            "transportInfo": {"address": "127.0.0.1", "port": port}}]})
}

fn answer(v: &Value) -> Vec<u8> {
    wire::encode_answer(&serde_json::to_vec(v).unwrap()).unwrap()
}

/// Runs `f` on a thread of its own in a fresh network namespace (only `lo`, multicast on and
/// routed), which disappears with the thread. `None` if that cannot be done.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        // Children forked from this thread share its namespace.
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "set", "lo", "multicast", "on"],
            &["route", "add", "224.0.0.0/4", "dev", "lo"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
        }
        Some(f())
    })
    .join()
    .expect("test thread")
}

#[test]
fn hostile_packets_on_the_socket_publish_nothing_and_memory_stays_bounded() {
    let outcome = in_private_netns(|| {
        let mdns = Mdns::new(MdnsConfig::default());
        let stats = mdns.stats_handle();
        let mut p = Platform::builder().service(mdns).build().unwrap();
        let own = p.node_info().to_json();
        let tx = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        tx.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
        tx.set_multicast_loop_v4(true).unwrap();
        tx.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())
            .unwrap();
        let tx: UdpSocket = tx.into();
        let group = SocketAddr::from((wire::MDNS_GROUP, wire::MDNS_PORT));
        let a = Identity::generate();
        let b = Identity::generate();
        let forged = json!({"signId": a.sign_id().to_string(), "boxId": b.box_id().to_string(),
            "connectionInfo": []});
        let mut own_changed = own.clone();
        own_changed["connectionInfo"] = json!([]);
        let mut bad_json = wire::encode_answer(b"{\"signId\": nope").unwrap();
        let n = bad_json.len();
        bad_json[n - 1] = b'}';
        let hostile: Vec<Vec<u8>> = vec![
            bad_json,
            wire::encode_answer(b"\"just a string\"").unwrap(),
            answer(&forged),
            answer(&own),
            answer(&own_changed),
            b"\x00\x00\x84\x00garbage".to_vec(),
            vec![0u8; 9500],
        ];
        let mut events = Vec::new();
        let turn = |p: &mut Platform, events: &mut Vec<Event>| {
            p.poll(Some(Duration::from_millis(20))).unwrap();
            events.extend(p.drain_events());
        };
        for pkt in &hostile {
            tx.send_to(pkt, group).unwrap();
        }
        let end = Instant::now() + Duration::from_secs(5);
        let all_seen = |s: mm_platform::services::mdns::MdnsStats| {
            s.forged >= 1 && s.malformed_packets >= 2 && s.invalid_node_infos >= 2 && s.own >= 2
        };
        while !all_seen(stats.get()) && Instant::now() < end {
            turn(&mut p, &mut events);
        }
        let after_hostile = stats.get();
        let published_hostile = events
            .iter()
            .filter(|e| matches!(e, Event::NodeInfo { .. }))
            .count();
        // A flood of 2,000 distinct valid nodes, then one more valid answer after the burst.
        let flood: Vec<Vec<u8>> = (0..2000)
            .map(|i| answer(&info_of(&Identity::generate(), i as u16 + 1)))
            .collect();
        for pkt in &flood {
            let _ = tx.send_to(pkt, group);
        }
        // Until the socket is drained: no new packet for 300 ms (bounded).
        let end = Instant::now() + Duration::from_secs(10);
        let (mut last, mut quiet_since) = (stats.get().packets, Instant::now());
        while Instant::now() < end && quiet_since.elapsed() < Duration::from_millis(300) {
            turn(&mut p, &mut events);
            if stats.get().packets != last {
                last = stats.get().packets;
                quiet_since = Instant::now();
            }
        }
        (after_hostile, published_hostile, stats.get(), events)
    });
    let Some((hostile, published_hostile, flood, events)) = outcome else {
        if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("cannot unshare a network namespace and MM_REQUIRE_NETNS=1");
        }
        mm_platform::proto::skip_test(
            "hostile mdns packets",
            "cannot unshare a network namespace (not root?)",
        );
        return;
    };
    // Hostile packets: each counted, none published, nothing remembered.
    assert_eq!(published_hostile, 0, "{hostile:?}");
    assert_eq!(hostile.forged, 1, "{hostile:?}");
    assert!(hostile.own >= 2, "{hostile:?}");
    assert_eq!(hostile.invalid_node_infos, 2, "{hostile:?}");
    assert_eq!(hostile.malformed_packets, 2, "{hostile:?}");
    assert_eq!(hostile.remembered, 0);
    // The flood: memory and publications bounded, but valid nodes do get through.
    let timing = mm_platform::services::mdns::Timing::default();
    assert!(flood.heard > 0, "{flood:?}");
    assert!(flood.remembered <= timing.max_seen, "{flood:?}");
    let published = events
        .iter()
        .filter(|e| matches!(e, Event::NodeInfo { source, .. } if source == "mdns"))
        .count() as u64;
    assert_eq!(published, flood.published);
    assert!(published >= 1);
    assert!(
        published <= u64::from(timing.publish_burst) + 8 * u64::from(timing.publish_per_sec),
        "{flood:?}"
    );
}
