//! The offline buffer end to end: messages sent while the destination is down are persisted,
//! retried, delivered exactly once when it comes back, also after the sender restarts; and
//! hostile bytes on the listeners disturb nothing.

mod support;

use mm_platform::Shared;
use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};
use support::{offline, quick};

use mm_platform::identity::Identity;
use mm_platform::storage::{FileStore, MemStore};
use mm_platform::{DeliveryError, Message, Platform, SendOptions};
use serde_json::{json, Value};

fn poll_all(ps: &mut [&mut Platform]) {
    for p in ps.iter_mut() {
        p.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

#[test]
fn messages_to_a_node_that_is_down_arrive_once_it_is_up() {
    let ib = Identity::generate();
    // B runs once to learn its nodeInfo (ports), then goes down.
    let b0 = Platform::builder().identity(ib.clone()).build().unwrap();
    let b_info = b0.node_info();
    let b_listen = b0.connection_info();
    drop(b0);
    let mut a = Platform::builder()
        .storage(MemStore::new())
        .net(quick())
        .build()
        .unwrap();
    let _ = a.messaging().send("transports.nodeInfo", "local", &b_info);
    let results = Shared::new(Vec::new());
    for i in 0..50 {
        let r = results.clone();
        let st = a.send_with_callback(
            "ms",
            "test.later",
            ib.sign_id(),
            serde_json::to_vec(&i).unwrap(),
            offline(),
            move |_c, res| r.borrow_mut().push((i, res)),
        );
        assert!(st.is_ok());
    }
    assert_eq!(a.offline_pending(), 50);
    // A few seconds of failing attempts (several rounds of the retry).
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        a.poll(Some(Duration::from_millis(5))).unwrap();
    }
    assert!(
        results.borrow().is_empty(),
        "offline messages do not fail on unreachability"
    );
    assert_eq!(a.offline_pending(), 50);
    // B comes back on the same addresses.
    let mut b = Platform::builder()
        .identity(ib)
        .connection_info(b_listen)
        .build()
        .unwrap();
    let (_, rx) = b.messaging().on_channel("public.test.later", 128);
    let mut got: Vec<Message> = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    while (got.len() < 50 || results.borrow().len() < 50) && Instant::now() < end {
        poll_all(&mut [&mut a, &mut b]);
        got.extend(rx.try_iter());
    }
    let values: Vec<i64> = got.iter().map(|m| m.json().unwrap()).collect();
    assert_eq!(values, (0..50).collect::<Vec<i64>>(), "each once, in order");
    assert_eq!(results.borrow().len(), 50);
    assert!(results.borrow().iter().all(|(_, r)| r.is_ok()));
    assert_eq!(a.offline_pending(), 0);
    // Nothing more arrives later (no duplicate from a retry).
    let until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < until {
        poll_all(&mut [&mut a, &mut b]);
    }
    assert_eq!(rx.try_iter().count(), 0);
    assert_eq!(results.borrow().len(), 50, "callbacks fire exactly once");
}

#[test]
fn the_buffer_survives_a_restart_of_the_sender() {
    let dir = std::env::temp_dir().join(format!("mm-nodes-offline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ib = Identity::generate();
    let b0 = Platform::builder().identity(ib.clone()).build().unwrap();
    let (b_info, b_listen) = (b0.node_info(), b0.connection_info());
    drop(b0);
    let a_id;
    {
        let mut a = Platform::builder()
            .storage(FileStore::open(&dir).unwrap())
            .net(quick())
            .build()
            .unwrap();
        a_id = a.sign_id();
        let _ = a.messaging().send("transports.nodeInfo", "local", &b_info);
        for i in 0..20 {
            let st = a
                .messaging()
                .send_with("test.persist", ib.sign_id(), &i, offline());
            assert!(st.is_ok());
        }
        a.poll(Some(Duration::ZERO)).unwrap();
        // A is dropped here without any goodbye: what it did not deliver is in its directory.
    }
    let mut a = Platform::builder()
        .storage(FileStore::open(&dir).unwrap())
        .net(quick())
        .build()
        .unwrap();
    assert_eq!(a.sign_id(), a_id, "same identity from the same store");
    assert_eq!(a.offline_pending(), 20);
    let _ = a.messaging().send("transports.nodeInfo", "local", &b_info);
    let mut b = Platform::builder()
        .identity(ib)
        .connection_info(b_listen)
        .build()
        .unwrap();
    let (_, rx) = b.messaging().on_channel("*.test.persist", 64);
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(30);
    while (got.len() < 20 || a.offline_pending() > 0) && Instant::now() < end {
        poll_all(&mut [&mut a, &mut b]);
        got.extend(rx.try_iter().map(|m| m.json::<i64>().unwrap()));
    }
    assert_eq!(got, (0..20).collect::<Vec<i64>>());
    assert_eq!(a.offline_pending(), 0);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("offline"))
        .collect();
    assert!(left.is_empty(), "delivered records are deleted: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn offline_messages_expire_with_an_error() {
    let mut a = Platform::builder().net(quick()).build().unwrap();
    let nobody = Identity::generate().sign_id();
    let result = Shared::new(Vec::new());
    let r = result.clone();
    let st = a.send_with_callback(
        "ms",
        "t",
        nobody,
        b"1".to_vec(),
        SendOptions {
            realtime: false,
            expire_after: Some(Duration::from_millis(200)),
        },
        move |_c, res| r.borrow_mut().push(res),
    );
    assert!(st.is_ok());
    let end = Instant::now() + Duration::from_secs(5);
    while result.borrow().is_empty() && Instant::now() < end {
        a.poll(Some(Duration::from_millis(10))).unwrap();
    }
    assert_eq!(*result.borrow(), vec![Err(DeliveryError::Expired)]);
    assert_eq!(a.offline_pending(), 0);
}

#[test]
fn garbage_on_the_listeners_disturbs_nothing() {
    let mut a = Platform::builder().build().unwrap();
    let mut b = Platform::builder().build().unwrap();
    let info = b.node_info();
    let _ = a.messaging().send("transports.nodeInfo", "local", &info);
    let ci = b.connection_info();
    let port = |kind: &str| -> u16 {
        ci.as_array()
            .unwrap()
            .iter()
            .find(|e| e["transportType"] == kind)
            .unwrap()["transportInfo"]["port"]
            .as_u64()
            .unwrap() as u16
    };
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port("tcp"))).unwrap();
    let mut tcp2 = std::net::TcpStream::connect(("127.0.0.1", port("tcp"))).unwrap();
    let (_, rx) = b.messaging().on_channel("public.test.*", 1024);
    let bid = b.sign_id();
    let mut seen = HashSet::new();
    let mut garbage = [0u8; 1200];
    let end = Instant::now() + Duration::from_secs(20);
    let mut sent = 0;
    let mut round = 0u32;
    while seen.len() < 200 && Instant::now() < end {
        round += 1;
        if sent < 200 && round.is_multiple_of(2) {
            assert!(a.messaging().send("test.n", bid, &json!(sent)).is_ok());
            sent += 1;
        }
        // Random bytes, truncated and mutated CurveCP-looking packets, huge netstrings.
        mm_platform::proto::crypto::random_bytes(&mut garbage);
        let len = (round as usize * 37) % garbage.len();
        if round.is_multiple_of(3) {
            garbage[..8].copy_from_slice(b"QvnQ5XlH");
        }
        let _ = udp.send_to(&garbage[..len], ("127.0.0.1", port("udp")));
        let _ = tcp.write_all(&garbage[..len.min(64)]);
        let _ = tcp2.write_all(b"999999999:");
        poll_all(&mut [&mut a, &mut b]);
        for m in rx.try_iter() {
            seen.insert(m.json::<Value>().unwrap().as_i64().unwrap());
        }
    }
    assert_eq!(seen.len(), 200, "every message arrived despite the garbage");
    assert_eq!(b.connections().len(), 1);
}
