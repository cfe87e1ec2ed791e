//! The connection table cannot be filled by strangers: incoming connections from peers outside
//! our circles leave `NetConfig::reserved_outbound` slots free (for our own connections and
//! for our friends and devices), and are capped per source address
//! (`NetConfig::max_inbound_per_ip`).

use std::time::{Duration, Instant};

use mm_platform::identity::Identity;
use mm_platform::{NetConfig, Platform};

fn introduce(a: &mut Platform, b: &Platform) {
    let info = b.node_info();
    let _ = a.messaging().send("transports.nodeInfo", "local", &info);
}

fn inbound(p: &Platform) -> usize {
    p.connections()
        .iter()
        .filter(|c| !c.outbound && c.peer.is_some())
        .count()
}

/// Polls everyone for a bounded number of rounds (or until `done`).
fn poll_rounds(
    hub: &mut Platform,
    others: &mut [Platform],
    rounds: usize,
    mut done: impl FnMut(&Platform) -> bool,
) {
    let end = Instant::now() + Duration::from_secs(20);
    for _ in 0..rounds {
        if done(hub) || Instant::now() >= end {
            return;
        }
        hub.poll(Some(Duration::from_millis(1))).unwrap();
        for p in others.iter_mut() {
            p.poll(Some(Duration::ZERO)).unwrap();
        }
    }
}

/// `n` strangers connect to `hub` (each sends it a message).
fn strangers(hub: &Platform, n: usize) -> Vec<Platform> {
    let hub_id = hub.sign_id();
    (0..n)
        .map(|_| {
            let mut p = Platform::builder().build().unwrap();
            introduce(&mut p, hub);
            assert!(p.send("ms", "hi", hub_id, b"1".to_vec()).is_ok());
            p
        })
        .collect()
}

#[test]
fn strangers_cannot_take_the_slots_reserved_for_outgoing_and_circle_connections() {
    let friend = Identity::generate();
    let cfg = NetConfig {
        max_connections: 5,
        reserved_outbound: 2,
        max_inbound_per_ip: 100,
        ..NetConfig::default()
    };
    let mut hub = Platform::builder()
        .net(cfg)
        .friends([friend.sign_id()])
        .build()
        .unwrap();
    let mut others = strangers(&hub, 5);
    poll_rounds(&mut hub, &mut others, 3000, |h| inbound(h) >= 5);
    assert_eq!(inbound(&hub), 3, "strangers leave two slots free");
    // A friend still gets in.
    let mut f = Platform::builder().identity(friend).build().unwrap();
    introduce(&mut f, &hub);
    assert!(f.send("ms", "hi", hub.sign_id(), b"2".to_vec()).is_ok());
    others.push(f);
    poll_rounds(&mut hub, &mut others, 3000, |h| inbound(h) >= 4);
    assert_eq!(inbound(&hub), 4, "the friend took a reserved slot");
    // And our own outgoing connection gets the last one.
    let target = Platform::builder().build().unwrap();
    introduce(&mut hub, &target);
    assert!(hub
        .send("ms", "out", target.sign_id(), b"3".to_vec())
        .is_ok());
    others.push(target);
    let out = |h: &Platform| h.connections().iter().any(|c| c.outbound && c.active);
    poll_rounds(&mut hub, &mut others, 3000, out);
    assert!(
        out(&hub),
        "outgoing connection made: {:?}",
        hub.connections()
    );
}

#[test]
fn incoming_connections_are_capped_per_source_address() {
    let cfg = NetConfig {
        max_inbound_per_ip: 2,
        ..NetConfig::default()
    };
    let mut hub = Platform::builder().net(cfg).build().unwrap();
    let mut others = strangers(&hub, 4);
    poll_rounds(&mut hub, &mut others, 2000, |h| inbound(h) > 2);
    assert_eq!(inbound(&hub), 2, "two from 127.0.0.1");
}
