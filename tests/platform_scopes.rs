//! Scopes and circles: local messages are `self`, peers are `public` unless in a circle,
//! circles are replaced by `self.friends.update` / `self.devices.update` and compared by box key.

use std::time::Duration;

use mm_platform::identity::Identity;
use mm_platform::{Address, Message, Platform, Scope, SignId};

fn turn(p: &mut Platform) {
    p.poll(Some(Duration::ZERO)).unwrap();
}

fn scopes_of(p: &mut Platform, senders: &[SignId]) -> Vec<(String, Scope)> {
    let (id, rx) = p.on_channel("*", 64);
    for s in senders {
        assert!(p.receive_from_peer(*s, "ms", "chat.say", b"\"hi\"".to_vec()));
    }
    turn(p);
    p.off(id);
    rx.try_iter()
        .map(|m: Message| (m.scoped_topic(), m.scope))
        .collect()
}

#[test]
fn local_is_self_and_strangers_are_public() {
    let mut p = Platform::builder().build().unwrap();
    turn(&mut p);
    let (_, rx) = p.on_channel("self.chat.*", 4);
    let _ = p.messaging().send("chat.say", "local", &"me");
    turn(&mut p);
    let m = rx.try_recv().unwrap();
    assert_eq!((m.scope, m.sender), (Scope::Own, Address::Local));
    let stranger = Identity::generate().sign_id();
    assert_eq!(
        scopes_of(&mut p, &[stranger]),
        vec![("public.chat.say".to_string(), Scope::Public)]
    );
}

#[test]
fn circles_from_the_builder_and_from_update_messages() {
    let (friend, device, other) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let mut p = Platform::builder()
        .friends([friend.sign_id()])
        .build()
        .unwrap();
    turn(&mut p);
    let got = scopes_of(&mut p, &[friend.sign_id(), device.sign_id()]);
    assert_eq!(got[0].1, Scope::Friends);
    assert_eq!(got[1].1, Scope::Public);

    let _ = p
        .messaging()
        .send("devices.update", "local", &[device.sign_id().to_string()]);
    let _ = p.messaging().send(
        "friends.update",
        "local",
        &[other.sign_id().to_string(), friend.sign_id().to_string()],
    );
    turn(&mut p);
    let got = scopes_of(
        &mut p,
        &[friend.sign_id(), device.sign_id(), other.sign_id()],
    );
    assert_eq!(
        got,
        vec![
            ("friends.chat.say".to_string(), Scope::Friends),
            ("self.chat.say".to_string(), Scope::Own),
            ("friends.chat.say".to_string(), Scope::Friends),
        ]
    );
    assert_eq!(p.scope_of(&device.sign_id()), Some(Scope::Own));

    // An update is a replacement; an empty list empties the circle.
    let _ = p
        .messaging()
        .send("friends.update", "local", &Vec::<String>::new());
    turn(&mut p);
    assert_eq!(p.circles().friends_len(), 0);
    assert_eq!(p.scope_of(&friend.sign_id()), Some(Scope::Public));
}

#[test]
fn malformed_updates_change_nothing() {
    let friend = Identity::generate();
    let mut p = Platform::builder()
        .friends([friend.sign_id()])
        .build()
        .unwrap();
    turn(&mut p);
    let before = p.stats().malformed;
    let mut not_a_point = [0u8; 32];
    not_a_point[0] = 2;
    let bad_key = SignId(mm_platform::proto::crypto::SignPublicKey(not_a_point)).to_string();
    for payload in [
        serde_json::json!("not an array"),
        serde_json::json!([1, 2]),
        serde_json::json!([friend.sign_id().to_string(), "garbage"]),
        serde_json::json!([bad_key]),
        serde_json::json!({"a": 1}),
    ] {
        let _ = p.messaging().send("friends.update", "local", &payload);
    }
    let _ = p.send("ms", "friends.update", "local", b"\xff\xfe".to_vec());
    turn(&mut p);
    assert_eq!(p.stats().malformed - before, 6);
    assert!(p.circles().is_friend(&friend.box_id()));
    assert_eq!(p.circles().friends_len(), 1);
}

#[test]
fn only_self_scoped_messages_update_circles() {
    let (stranger, device) = (Identity::generate(), Identity::generate());
    let mut p = Platform::builder()
        .devices([device.sign_id()])
        .build()
        .unwrap();
    turn(&mut p);
    // A stranger cannot make itself a device or a friend.
    let list = serde_json::to_vec(&[stranger.sign_id().to_string()]).unwrap();
    assert!(p.receive_from_peer(stranger.sign_id(), "ms", "devices.update", list.clone()));
    assert!(p.receive_from_peer(stranger.sign_id(), "ms", "friends.update", list.clone()));
    turn(&mut p);
    assert_eq!(p.scope_of(&stranger.sign_id()), Some(Scope::Public));
    // One of our own devices can (its messages are scoped `self`).
    assert!(p.receive_from_peer(device.sign_id(), "ms", "friends.update", list));
    turn(&mut p);
    assert_eq!(p.scope_of(&stranger.sign_id()), Some(Scope::Friends));
}

#[test]
fn circles_compare_box_keys() {
    // Flipping the sign bit of an ed25519 key negates the point: a different signId whose
    // curve25519 conversion is the same box key, so it must land in the same circle.
    let friend = Identity::generate();
    let mut p = Platform::builder()
        .friends([friend.sign_id()])
        .build()
        .unwrap();
    turn(&mut p);
    let mut negated = *friend.sign_id().as_bytes();
    negated[31] ^= 0x80;
    let negated = SignId(mm_platform::proto::crypto::SignPublicKey(negated));
    assert_ne!(negated, friend.sign_id());
    assert_eq!(negated.to_box_id().unwrap(), friend.box_id());
    assert_eq!(p.scope_of(&negated), Some(Scope::Friends));
    // A key that is not a point is not in any scope, and its messages are dropped.
    let mut bad = [0u8; 32];
    bad[0] = 2;
    let bad = SignId(mm_platform::proto::crypto::SignPublicKey(bad));
    assert_eq!(p.scope_of(&bad), None);
    assert!(!p.receive_from_peer(bad, "ms", "x", vec![]));
    assert_eq!(p.stats().peer_drops, 1);
}

#[test]
fn startup_requests_and_node_info() {
    let mut p = Platform::builder()
        .connection_info(serde_json::json!([{"transportType": "udp", "transportInfo": {"address": "127.0.0.1", "port": 20000}}]))
        .build()
        .unwrap();
    let (_, req) = p.messaging().on_channel("self.*.updateRequest", 4);
    let (_, info) = p.messaging().on_channel("self.transports.myNodeInfo", 4);
    turn(&mut p);
    let topics: Vec<String> = req.try_iter().map(|m| m.topic).collect();
    assert_eq!(
        topics,
        vec!["friends.updateRequest", "devices.updateRequest"]
    );
    let ni: serde_json::Value = info.try_recv().unwrap().json().unwrap();
    assert_eq!(ni["signId"], p.sign_id().to_string());
    assert_eq!(ni["boxId"], p.box_id().to_string());
    assert_eq!(ni["connectionInfo"][0]["transportInfo"]["port"], 20000);
    let _ = p.messaging().send(
        "transports.requestMyNodeInfo",
        "local",
        &serde_json::json!({}),
    );
    turn(&mut p);
    turn(&mut p);
    assert_eq!(info.try_iter().count(), 1);
}
