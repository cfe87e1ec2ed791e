//! Hostile input on the bus: arbitrary topics, protocols, payloads and sender keys from peers
//! never panic, never change the circles unless sent with scope `self`, and are counted when
//! undecodable.

use std::time::Duration;

use mm_platform::identity::Identity;
use mm_platform::proto::crypto::SignPublicKey;
use mm_platform::{Limits, Platform, Scope, SignId};
use proptest::prelude::*;

fn platform(friend: &Identity) -> Platform {
    let mut p = Platform::builder()
        .friends([friend.sign_id()])
        .limits(Limits {
            local_queue: 64,
            event_batch: 8,
            ..Limits::default()
        })
        .build()
        .unwrap();
    p.messaging()
        .on("*", |_ctx, _msg, _v: serde_json::Value| {});
    p.messaging()
        .on("public.a.*.c", |_ctx, _msg, _v: Vec<String>| {});
    p.torrenting().on("*", |_ctx, _msg, _v| {});
    let _ = p.on_channel("friends.*", 4);
    p.poll(Some(Duration::ZERO)).unwrap();
    p
}

fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c.*]{0,12}",
        Just("friends.update".to_string()),
        Just("devices.update".to_string()),
        Just("transports.requestMyNodeInfo".to_string()),
        ".{0,40}",
    ]
}

fn protocol() -> impl Strategy<Value = String> {
    prop_oneof![Just("ms".to_string()), Just("bt".to_string()), ".{0,4}"]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn arbitrary_peer_messages_are_harmless(
        msgs in prop::collection::vec(
            (any::<[u8; 32]>(), any::<bool>(), protocol(), topic(), prop::collection::vec(any::<u8>(), 0..64)),
            1..40,
        )
    ) {
        let friend = Identity::generate();
        let stranger = Identity::generate();
        let mut p = platform(&friend);
        for (key, use_stranger, protocol, topic, payload) in msgs {
            let sender = if use_stranger { stranger.sign_id() } else { SignId(SignPublicKey(key)) };
            let _ = p.receive_from_peer(sender, protocol, topic, payload);
            p.poll(Some(Duration::ZERO)).unwrap();
            let _ = p.drain_events().count();
        }
        // Nothing a peer outside the devices circle sends changes the circles.
        prop_assert_eq!(p.scope_of(&friend.sign_id()), Some(Scope::Friends));
        prop_assert_eq!(p.scope_of(&stranger.sign_id()), Some(Scope::Public));
        prop_assert_eq!(p.circles().friends_len(), 1);
        prop_assert_eq!(p.circles().devices_len(), 0);
    }

    #[test]
    fn arbitrary_local_payloads_are_harmless(
        msgs in prop::collection::vec((protocol(), topic(), prop::collection::vec(any::<u8>(), 0..64)), 1..40)
    ) {
        let friend = Identity::generate();
        let mut p = platform(&friend);
        let before = p.stats().messages;
        let mut expected = 0;
        for (protocol, topic, payload) in msgs {
            let answered = protocol == "ms" && topic == "transports.requestMyNodeInfo";
            if p.send(protocol, topic, "local", payload).is_ok() {
                // A request for our nodeInfo is answered with one more message.
                expected += if answered { 2 } else { 1 };
            }
        }
        for _ in 0..3 {
            p.poll(Some(Duration::ZERO)).unwrap();
        }
        prop_assert_eq!(p.stats().messages - before, expected);
    }
}
