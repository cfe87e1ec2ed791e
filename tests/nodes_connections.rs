//! Connection management with real sockets on 127.0.0.1: simultaneous connects end with one
//! connection, transports fall back, dead peers are detected, real-time messages expire,
//! per-destination queues are bounded, oversized frames close only their connection.

use mm_platform::Shared;
use std::time::{Duration, Instant};

use mm_platform::identity::Identity;
use mm_platform::{DeliveryError, Event, Message, NetConfig, Platform, SendError, SendOptions};
use serde_json::json;

fn poll_all(ps: &mut [&mut Platform]) {
    for p in ps.iter_mut() {
        p.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

fn introduce(a: &mut Platform, b: &Platform) {
    let info = b.node_info().to_json();
    let _ = a.messaging().send("transports.nodeInfo", "local", &info);
}

#[test]
fn simultaneous_connects_end_with_one_active_connection_each_way() {
    for _ in 0..3 {
        let mut a = Platform::builder().build().unwrap();
        let mut b = Platform::builder().build().unwrap();
        introduce(&mut a, &b);
        introduce(&mut b, &a);
        a.poll(Some(Duration::ZERO)).unwrap();
        b.poll(Some(Duration::ZERO)).unwrap();
        let (_, ra) = a.messaging().on_channel("public.x.*", 64);
        let (_, rb) = b.messaging().on_channel("public.x.*", 64);
        let (aid, bid) = (a.sign_id(), b.sign_id());
        // Both send in the same turn: both connect.
        assert!(a.messaging().send("x.a", bid, &1).is_ok());
        assert!(b.messaging().send("x.b", aid, &2).is_ok());
        let (mut na, mut nb) = (0, 0);
        let end = Instant::now() + Duration::from_secs(20);
        while (na < 1 || nb < 1) && Instant::now() < end {
            poll_all(&mut [&mut a, &mut b]);
            na += ra.try_iter().count();
            nb += rb.try_iter().count();
        }
        assert_eq!((na, nb), (1, 1));
        // Let the losing connection wind down, then send more: still exactly once.
        let settle = Instant::now() + Duration::from_millis(500);
        while Instant::now() < settle {
            poll_all(&mut [&mut a, &mut b]);
        }
        let active_a: Vec<_> = a.connections().into_iter().filter(|c| c.active).collect();
        let active_b: Vec<_> = b.connections().into_iter().filter(|c| c.active).collect();
        assert_eq!(active_a.len(), 1, "{:?}", a.connections());
        assert_eq!(active_b.len(), 1, "{:?}", b.connections());
        assert_ne!(
            active_a[0].outbound, active_b[0].outbound,
            "both sides kept the same connection"
        );
        for i in 0..10 {
            assert!(a.messaging().send("x.more", bid, &i).is_ok());
        }
        let mut more = 0;
        let end = Instant::now() + Duration::from_secs(10);
        while more < 10 && Instant::now() < end {
            poll_all(&mut [&mut a, &mut b]);
            more += rb.try_iter().count();
        }
        assert_eq!(more, 10);
        let events: Vec<Event> = a.drain_events().collect();
        let conns = events
            .iter()
            .filter(|e| matches!(e, Event::Connection(_)))
            .count();
        assert_eq!(conns, 1, "one Connection event for the peer: {events:?}");
    }
}

#[test]
fn falls_back_from_a_dead_udp_endpoint_to_tcp() {
    let cfg = NetConfig {
        connect_timeout: Duration::from_millis(300),
        ..NetConfig::default()
    };
    let mut a = Platform::builder().net(cfg).build().unwrap();
    let mut b = Platform::builder().build().unwrap();
    let mut info = b.node_info().to_json();
    // A UDP endpoint where nobody listens, listed first; then b's real TCP endpoint.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let tcp = info["connectionInfo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["transportType"] == "tcp")
        .unwrap()
        .clone();
    info["connectionInfo"] = json!([
        {"transportType": "udp", "transportInfo": {"address": "127.0.0.1", "port": dead_port, "framing": "native"}},
        tcp
    ]);
    let _ = a.messaging().send("transports.nodeInfo", "local", &info);
    let (_, rb) = b.messaging().on_channel("public.y", 4);
    assert!(a.messaging().send("y", b.sign_id(), &"via tcp").is_ok());
    let mut got: Vec<Message> = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < end {
        poll_all(&mut [&mut a, &mut b]);
        got.extend(rb.try_iter());
    }
    assert_eq!(got.len(), 1);
    let c = a.connections();
    assert_eq!(c.len(), 1);
    assert_eq!(
        c[0].transport,
        mm_platform::proto::transport::TransportKind::Tcp
    );
}

#[test]
fn a_dead_peer_is_detected_and_queued_realtime_messages_fail() {
    let cfg = NetConfig {
        keepalive: Duration::from_millis(100),
        dead_after: Duration::from_millis(600),
        connect_timeout: Duration::from_millis(200),
        ..NetConfig::default()
    };
    let mut a = Platform::builder().net(cfg).build().unwrap();
    let mut b = Platform::builder().build().unwrap();
    introduce(&mut a, &b);
    let bid = b.sign_id();
    let (_, online) = a.messaging().on_channel("self.transports.online", 4);
    let (_, offline) = a.messaging().on_channel("self.transports.offline", 4);
    let (_, failed) = a.messaging().on_channel("self.transports.failed", 4);
    assert!(a.messaging().send("z", bid, &1).is_ok());
    let end = Instant::now() + Duration::from_secs(10);
    let mut up = 0;
    while up == 0 && Instant::now() < end {
        poll_all(&mut [&mut a, &mut b]);
        up += online.try_iter().count();
    }
    assert_eq!(up, 1);
    drop(b); // gone without a word
    let mut down = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while down.is_empty() && Instant::now() < end {
        a.poll(Some(Duration::from_millis(10))).unwrap();
        down.extend(offline.try_iter());
    }
    assert_eq!(down.len(), 1);
    assert_eq!(down[0].json::<String>().unwrap(), bid.to_string());
    assert!(a.drain_events().any(|e| e == Event::Disconnected(bid)));
    // Messages to it now fail after the attempts (5 x 200 ms).
    let res = Shared::new(None);
    let r = res.clone();
    let st = a.send_with_callback(
        "ms",
        "z",
        bid,
        b"2".to_vec(),
        SendOptions::default(),
        move |_c, x| *r.borrow_mut() = Some(x),
    );
    assert!(st.is_ok());
    let end = Instant::now() + Duration::from_secs(10);
    while res.borrow().is_none() && Instant::now() < end {
        a.poll(Some(Duration::from_millis(10))).unwrap();
    }
    assert!(matches!(
        res.borrow().as_ref(),
        Some(Err(DeliveryError::Unreachable(_)))
    ));
    a.poll(Some(Duration::ZERO)).unwrap(); // the failure notice is delivered in a later turn
    assert_eq!(failed.try_iter().count(), 1);
}

#[test]
fn the_bytes_waiting_for_all_destinations_together_are_bounded() {
    let cfg = NetConfig {
        peer_queue_bytes: 2_000,
        send_queue_bytes: 3_000,
        lookup_timeout: Duration::from_secs(30),
        ..NetConfig::default()
    };
    let mut a = Platform::builder().net(cfg).build().unwrap();
    // Unknown destinations: their messages wait in memory for a lookup.
    let (one, two) = (
        Identity::generate().sign_id(),
        Identity::generate().sign_id(),
    );
    let soon = SendOptions {
        realtime: true,
        expire_after: Some(Duration::from_millis(100)),
    };
    assert!(a.send_with("bt", "t", one, vec![1; 1_500], soon).is_ok());
    let first = a.queued_bytes();
    assert!((1_500..2_000).contains(&first), "{first}");
    // Within the destination's own bound, but not within what is left of the total.
    let big = vec![2; 3_000 - first];
    assert_eq!(
        a.send("bt", "t", two, big.clone()),
        Err(SendError::BufferFull)
    );
    assert_eq!(a.queued_for(&two), 0);
    assert!(a.send_with("bt", "t", two, vec![3; 500], soon).is_ok());
    let both = a.queued_bytes();
    assert!(both > first && both <= 3_000, "{both}");
    // Once the messages expire the total is free again.
    let end = Instant::now() + Duration::from_secs(5);
    while a.queued_bytes() > 0 && Instant::now() < end {
        a.poll(Some(Duration::from_millis(10))).unwrap();
    }
    assert_eq!(a.queued_bytes(), 0);
    assert!(a.send("bt", "t", two, big).is_ok());
}

#[test]
fn realtime_messages_expire_and_queues_are_bounded() {
    let cfg = NetConfig {
        peer_queue_messages: 3,
        lookup_timeout: Duration::from_secs(30),
        ..NetConfig::default()
    };
    let mut a = Platform::builder().net(cfg).build().unwrap();
    let nobody = Identity::generate().sign_id();
    let res = Shared::new(Vec::new());
    for i in 0..3 {
        let r = res.clone();
        let st = a.send_with_callback(
            "ms",
            "t",
            nobody,
            vec![],
            SendOptions {
                realtime: true,
                expire_after: Some(Duration::from_millis(100 * (i + 1))),
            },
            move |_c, x| r.borrow_mut().push((i, x)),
        );
        assert!(st.is_ok());
    }
    assert_eq!(
        a.send("ms", "t", nobody, vec![]),
        Err(SendError::BufferFull)
    );
    assert_eq!(a.queued_for(&nobody), 3);
    let end = Instant::now() + Duration::from_secs(5);
    while res.borrow().len() < 3 && Instant::now() < end {
        a.poll(Some(Duration::from_millis(10))).unwrap();
    }
    let got = res.borrow().clone();
    assert_eq!(
        got,
        vec![
            (0, Err(DeliveryError::Expired)),
            (1, Err(DeliveryError::Expired)),
            (2, Err(DeliveryError::Expired))
        ]
    );
    assert_eq!(a.queued_for(&nobody), 0);
    assert!(a.send("ms", "t", nobody, vec![]).is_ok(), "room again");
}

#[test]
fn an_oversized_frame_closes_only_its_connection() {
    let small = NetConfig {
        max_frame: 1000,
        ..NetConfig::default()
    };
    let mut b = Platform::builder().net(small).build().unwrap();
    let mut a = Platform::builder().build().unwrap();
    let mut c = Platform::builder().build().unwrap();
    introduce(&mut a, &b);
    introduce(&mut c, &b);
    let bid = b.sign_id();
    let (_, rb) = b.on_channel("public.*", 64);
    assert!(c.send("ms", "fine", bid, b"1".to_vec()).is_ok());
    assert!(a.send("ms", "fine", bid, b"2".to_vec()).is_ok());
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while got.len() < 2 && Instant::now() < end {
        poll_all(&mut [&mut a, &mut b, &mut c]);
        got.extend(rb.try_iter());
    }
    assert_eq!(got.len(), 2);
    assert_eq!(b.connections().len(), 2);
    // a sends a frame over b's limit: b closes a's connection, c's stays.
    assert!(a.send("ms", "big", bid, vec![b'x'; 5000]).is_ok());
    let end = Instant::now() + Duration::from_secs(10);
    while b.connections().len() != 1 && Instant::now() < end {
        poll_all(&mut [&mut a, &mut b, &mut c]);
    }
    assert_eq!(b.connections().len(), 1);
    assert!(rb.try_iter().all(|m| m.topic != "big"));
    assert!(c.send("ms", "still", bid, b"3".to_vec()).is_ok());
    let mut after = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while after.is_empty() && Instant::now() < end {
        poll_all(&mut [&mut a, &mut b, &mut c]);
        after.extend(rb.try_iter().filter(|m| m.topic == "still"));
    }
    assert_eq!(after.len(), 1);
}

#[test]
fn a_peer_that_restarts_and_reconnects_replaces_the_dead_connection() {
    let cfg = NetConfig {
        connect_timeout: Duration::from_millis(200),
        ..NetConfig::default()
    };
    // Both key orders: the tie-break rule must not keep the dead connection in either.
    for a_smaller in [true, false] {
        let (ia, ib) = loop {
            let (x, y) = (Identity::generate(), Identity::generate());
            if (x.box_id() < y.box_id()) == a_smaller {
                break (x, y);
            }
        };
        let mut a = Platform::builder().identity(ia).net(cfg).build().unwrap();
        let b = Platform::builder()
            .identity(ib.clone())
            .net(cfg)
            .build()
            .unwrap();
        let (b_info, b_listen) = (b.node_info().to_json(), b.connection_info());
        let mut b = b;
        introduce(&mut a, &b);
        let (_, rb) = b.messaging().on_channel("public.r.*", 64);
        assert!(a.messaging().send("r.one", b.sign_id(), &1).is_ok());
        let end = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        while n == 0 && Instant::now() < end {
            poll_all(&mut [&mut a, &mut b]);
            n += rb.try_iter().count();
        }
        assert_eq!(n, 1);
        drop(b);
        let pause = Instant::now() + Duration::from_millis(300);
        while Instant::now() < pause {
            a.poll(Some(Duration::from_millis(5))).unwrap();
        }
        // b is back (same key, same ports) and speaks first.
        let mut b2 = Platform::builder()
            .identity(ib)
            .net(cfg)
            .connection_info(b_listen)
            .build()
            .unwrap();
        assert_eq!(b2.node_info().to_json(), b_info);
        introduce(&mut b2, &a);
        let (_, ra) = a.messaging().on_channel("public.r.*", 64);
        let (_, rb2) = b2.messaging().on_channel("public.r.*", 64);
        assert!(b2.messaging().send("r.back", a.sign_id(), &2).is_ok());
        let end = Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        while n == 0 && Instant::now() < end {
            poll_all(&mut [&mut a, &mut b2]);
            n += ra.try_iter().count();
        }
        assert_eq!(n, 1);
        // a answers well before its old connection could be declared dead (30 s).
        assert!(a.messaging().send("r.again", b2.sign_id(), &3).is_ok());
        let end = Instant::now() + Duration::from_secs(5);
        let mut n = 0;
        while n == 0 && Instant::now() < end {
            poll_all(&mut [&mut a, &mut b2]);
            n += rb2.try_iter().count();
        }
        assert_eq!(n, 1, "a_smaller = {a_smaller}");
    }
}
