//! Destinations given as a boxId (as the JavaScript nodes address each other): a key the
//! directory does not know is looked up with `transports.requestNodeInfo` carrying that key,
//! and the answer, the nodeInfo whose boxId it is, gets the message delivered. Both cases of
//! the resolution: the key is also a valid ed25519 point (so it was first taken for a signId and
//! the waiting messages are re-keyed), and it is not. Real sockets on 127.0.0.1, bounded waits.

use std::time::{Duration, Instant};

use mm_platform::identity::{Identity, SignId};
use mm_platform::storage::MemStore;
use mm_platform::{Address, Platform};

fn node(identity: Identity) -> Platform {
    Platform::builder()
        .identity(identity)
        .storage(MemStore::new())
        .build()
        .unwrap()
}

/// An identity whose box key, read as an ed25519 key, is (or is not) a valid point.
fn identity_whose_box_key_is_a_valid_sign_key(valid: bool) -> Identity {
    for _ in 0..256 {
        let id = Identity::generate();
        let as_sign = SignId(mm_platform::proto::crypto::SignPublicKey(id.box_id().0 .0));
        if as_sign.to_box_id().is_ok() == valid {
            return id;
        }
    }
    panic!("no such identity in 256 tries");
}

fn pump(a: &mut Platform, b: &mut Platform, limit: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < end, "timed out");
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

fn deliver_to_unknown_box_id(valid_point: bool) {
    let mut a = node(Identity::generate());
    let mut b = node(identity_whose_box_key_is_a_valid_sign_key(valid_point));
    let (_, asks) = a.on_channel("self.transports.requestNodeInfo", 4);
    let (_, rx) = b.on_channel("public.hi", 4);
    let b_box = b.box_id().to_string();
    assert!(a.messaging().send("hi", b_box.as_str(), &42).is_ok());
    let mut ask = None;
    pump(&mut a, &mut b, Duration::from_secs(5), || {
        ask = asks.try_recv().ok();
        ask.is_some()
    });
    assert_eq!(ask.unwrap().json::<String>().unwrap(), b_box);
    let info = b.node_info();
    assert!(a
        .messaging()
        .send("transports.nodeInfo", "local", &info)
        .is_ok());
    let mut got = None;
    pump(&mut a, &mut b, Duration::from_secs(10), || {
        got = rx.try_recv().ok();
        got.is_some()
    });
    let got = got.unwrap();
    assert_eq!(got.sender, Address::Node(a.sign_id()));
    assert_eq!(got.json::<i32>().unwrap(), 42);
}

#[test]
fn unknown_box_id_that_is_also_a_valid_sign_key_is_resolved_by_lookup() {
    deliver_to_unknown_box_id(true);
}

#[test]
fn unknown_box_id_that_is_no_sign_key_is_resolved_by_lookup() {
    deliver_to_unknown_box_id(false);
}

#[test]
fn known_box_id_is_sent_to_directly() {
    let mut a = node(Identity::generate());
    let mut b = node(Identity::generate());
    let info = b.node_info();
    assert!(a
        .messaging()
        .send("transports.nodeInfo", "local", &info)
        .is_ok());
    let (_, rx) = b.on_channel("public.hi", 4);
    let (_, asks) = a.on_channel("self.transports.requestNodeInfo", 4);
    pump(&mut a, &mut b, Duration::from_secs(1), || true);
    a.poll(Some(Duration::ZERO)).unwrap();
    assert!(a.messaging().send("hi", b.box_id(), &7).is_ok());
    let mut got = None;
    pump(&mut a, &mut b, Duration::from_secs(10), || {
        got = rx.try_recv().ok();
        got.is_some()
    });
    assert_eq!(got.unwrap().json::<i32>().unwrap(), 7);
    assert!(asks.try_recv().is_err(), "a known boxId needs no lookup");
}

/// The nodeInfo is handed over before the send but dispatched after it (both in one turn, as
/// an application does at start-up): the first attempt finds the key is that node's boxId and
/// sends, with no lookup for a key nobody would answer. Both kinds of key.
fn node_info_dispatched_between_send_and_attempt(valid_point: bool) {
    let mut a = node(Identity::generate());
    let mut b = node(identity_whose_box_key_is_a_valid_sign_key(valid_point));
    let (_, asks) = a.on_channel("self.transports.requestNodeInfo", 4);
    let (_, rx) = b.on_channel("public.hi", 4);
    let info = b.node_info();
    assert!(a
        .messaging()
        .send("transports.nodeInfo", "local", &info)
        .is_ok());
    let b_box = b.box_id().to_string();
    assert!(a.messaging().send("hi", b_box.as_str(), &7).is_ok());
    let mut got = None;
    pump(&mut a, &mut b, Duration::from_secs(10), || {
        got = rx.try_recv().ok();
        got.is_some()
    });
    assert_eq!(got.unwrap().json::<i32>().unwrap(), 7);
    assert!(asks.try_recv().is_err(), "no lookup was needed");
}

#[test]
fn node_info_dispatched_after_the_send_serves_a_box_id_that_is_a_valid_sign_key() {
    node_info_dispatched_between_send_and_attempt(true);
}

#[test]
fn node_info_dispatched_after_the_send_serves_a_box_id_that_is_no_sign_key() {
    node_info_dispatched_between_send_and_attempt(false);
}
