//! The bus through the platform: wildcard semantics, once/off/subscribe during dispatch,
//! re-entrant sends, ordering, channels, protocol filters and send statuses.

use mm_platform::Shared;
use std::time::Duration;

use mm_platform::api::RawCodec;
use mm_platform::identity::Identity;
use mm_platform::platform::RESERVED_PROTOCOL;
use mm_platform::{
    check_pattern, check_topic, Limits, Platform, SendError, SubscriptionId, TopicError,
};

type Log = Shared<Vec<String>>;

fn platform() -> Platform {
    let mut p = Platform::builder().build().unwrap();
    // Deliver the start-up messages so tests see only their own.
    p.poll(Some(Duration::ZERO)).unwrap();
    p
}

fn turn(p: &mut Platform) {
    p.poll(Some(Duration::ZERO)).unwrap();
}

fn recorder(p: &mut Platform, pattern: &str, name: &'static str, log: &Log) -> SubscriptionId {
    let log = log.clone();
    p.on(pattern, move |_ctx, msg| {
        log.borrow_mut()
            .push(format!("{name}:{}", msg.scoped_topic()));
    })
}

fn send(p: &mut Platform, topic: &str) {
    assert_eq!(p.send("ms", topic, "local", b"{}".to_vec()), Ok(()));
}

#[test]
fn wildcard_semantics_of_the_original() {
    let mut p = platform();
    let log: Log = Default::default();
    recorder(&mut p, "self.room.*", "room*", &log);
    recorder(&mut p, "self.a.*.c", "a*c", &log);
    recorder(&mut p, "self.room", "room", &log);
    for t in [
        "room.a", "room.a.b", "room", "a.b.c", "a.c", "a.b.b.c", "rooms.x",
    ] {
        send(&mut p, t);
    }
    turn(&mut p);
    assert_eq!(
        *log.borrow(),
        vec![
            "room*:self.room.a",
            "room*:self.room.a.b",
            "room:self.room",
            "a*c:self.a.b.c",
        ]
    );
}

#[test]
fn once_fires_exactly_once_even_for_its_own_resend() {
    let mut p = platform();
    let count = Shared::new(0);
    let c = count.clone();
    p.once("self.ping", move |ctx, _msg| {
        *c.borrow_mut() += 1;
        let _ = ctx.send("ms", "ping", "local", b"1".to_vec());
    });
    send(&mut p, "ping");
    send(&mut p, "ping");
    for _ in 0..3 {
        turn(&mut p);
    }
    assert_eq!(*count.borrow(), 1);
}

#[test]
fn off_during_dispatch_takes_effect_when_the_callback_returns() {
    let mut p = platform();
    let log: Log = Default::default();
    let victim: Shared<Option<SubscriptionId>> = Default::default();
    let v = victim.clone();
    let l = log.clone();
    let killer = p.on("self.t", move |ctx, _msg| {
        l.borrow_mut().push("killer".into());
        if let Some(id) = v.borrow_mut().take() {
            assert!(ctx.off(id));
        }
    });
    *victim.borrow_mut() = Some(recorder(&mut p, "self.t", "victim", &log));
    // A subscription that removes itself.
    let me: Shared<Option<SubscriptionId>> = Default::default();
    let m = me.clone();
    let l = log.clone();
    *me.borrow_mut() = Some(p.on("self.*", move |ctx, _msg| {
        l.borrow_mut().push("self-remover".into());
        let id = m.borrow().unwrap();
        ctx.off(id);
    }));
    send(&mut p, "t");
    send(&mut p, "t");
    turn(&mut p);
    assert_eq!(*log.borrow(), vec!["killer", "self-remover", "killer"]);
    assert!(p.off(killer));
    assert!(!p.off(killer));
}

#[test]
fn subscribe_during_dispatch_sees_only_later_messages() {
    let mut p = platform();
    let log: Log = Default::default();
    let l = log.clone();
    let mut added = false;
    p.on("self.t", move |ctx, msg| {
        l.borrow_mut().push(format!("first:{}", msg.payload[0]));
        if !added {
            added = true;
            let l2 = l.clone();
            ctx.on("self.t", move |_ctx, msg| {
                l2.borrow_mut().push(format!("late:{}", msg.payload[0]));
            });
        }
    });
    let _ = p.send("ms", "t", "local", vec![1]);
    let _ = p.send("ms", "t", "local", vec![2]);
    turn(&mut p);
    assert_eq!(*log.borrow(), vec!["first:1", "first:2", "late:2"]);
}

#[test]
fn reentrant_sends_are_delivered_in_later_turns() {
    let mut p = platform();
    let log: Log = Default::default();
    for (me, other) in [("ping", "pong"), ("pong", "ping")] {
        let l = log.clone();
        p.on(&format!("self.{me}"), move |ctx, msg| {
            let n = msg.payload[0];
            l.borrow_mut().push(format!("{me}{n}"));
            if n < 5 {
                assert!(ctx.send("ms", other, "local", vec![n + 1]).is_ok());
            }
        });
    }
    let _ = p.send("ms", "ping", "local", vec![0]);
    assert!(log.borrow().is_empty(), "never delivered inside send");
    let mut per_turn = Vec::new();
    for _ in 0..10 {
        let before = log.borrow().len();
        turn(&mut p);
        per_turn.push(log.borrow().len() - before);
    }
    assert_eq!(
        *log.borrow(),
        vec!["ping0", "pong1", "ping2", "pong3", "ping4", "pong5"]
    );
    assert_eq!(&per_turn[..7], &[1, 1, 1, 1, 1, 1, 0]);
}

#[test]
fn delivery_order_is_send_order_and_subscription_order() {
    let mut p = platform();
    let log: Log = Default::default();
    recorder(&mut p, "self.*", "b", &log);
    recorder(&mut p, "self.x.*", "c", &log);
    recorder(&mut p, "self.x.1", "a", &log);
    let (_, rx) = p.on_channel("self.x.*", 1000);
    for i in 0..500 {
        let _ = p.send(
            "ms",
            format!("x.{}", i % 3),
            "local",
            (i as u32).to_le_bytes().to_vec(),
        );
    }
    turn(&mut p);
    let got: Vec<u32> = rx
        .try_iter()
        .map(|m| u32::from_le_bytes(m.payload[..4].try_into().unwrap()))
        .collect();
    assert_eq!(got, (0..500).collect::<Vec<u32>>());
    let log = log.borrow();
    assert_eq!(
        &log[..4],
        &["b:self.x.0", "c:self.x.0", "b:self.x.1", "c:self.x.1"]
    );
    assert_eq!(log[4], "a:self.x.1");
}

#[test]
fn channel_delivery_to_another_thread() {
    let mut p = platform();
    let (_, rx) = p.messaging().on_channel("self.work.*", 256);
    let consumer = std::thread::spawn(move || {
        let mut got = Vec::new();
        while got.len() < 200 {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(m) => got.push(m.json::<u64>().unwrap()),
                Err(_) => break,
            }
        }
        got
    });
    for i in 0..200u64 {
        let _ = p.messaging().send("work.item", "local", &i);
        if i % 50 == 49 {
            turn(&mut p);
        }
    }
    let got = consumer.join().unwrap();
    assert_eq!(p.stats().channel_drops, 0);
    assert_eq!(got, (0..200).collect::<Vec<u64>>());
}

#[test]
fn a_full_channel_never_blocks_and_a_dropped_receiver_unsubscribes() {
    let mut p = platform();
    let (_, rx) = p.on_channel("self.*", 2);
    for _ in 0..10 {
        send(&mut p, "flood");
    }
    turn(&mut p);
    assert_eq!(rx.try_iter().count(), 2);
    assert_eq!(p.stats().channel_drops, 8);
    let (id, rx2) = p.on_channel("self.*", 2);
    drop(rx2);
    send(&mut p, "flood");
    turn(&mut p);
    assert!(!p.off(id), "removed when its receiver was dropped");
}

#[test]
fn protocol_apis_see_only_their_protocol() {
    let mut p = platform();
    let log: Log = Default::default();
    let l = log.clone();
    p.messaging()
        .on("self.t.*", move |_c, m, v: serde_json::Value| {
            l.borrow_mut().push(format!("ms:{}:{v}", m.topic))
        });
    let l = log.clone();
    p.torrenting().on("self.t.*", move |_c, m, v| {
        l.borrow_mut().push(format!("bt:{}:{}", m.topic, v.len()))
    });
    // The borrowing subscription sees the same bytes, and only `bt` messages.
    let l = log.clone();
    p.torrenting().on_bytes("self.t.*", move |_c, m, b| {
        assert_eq!(b, &m.payload[..]);
        l.borrow_mut().push(format!(
            "bt-bytes:{}:{}",
            m.topic,
            b.iter().map(|&x| x as usize).sum::<usize>()
        ))
    });
    let _ = p
        .messaging()
        .send("t.json", "local", &serde_json::json!({"a": 1}));
    let _ = p.torrenting().send("t.hash", "local", &[1u8; 20]);
    let _ = p.send("ms", "t.broken", "local", b"{not json".to_vec());
    turn(&mut p);
    assert_eq!(
        *log.borrow(),
        vec!["ms:t.json:{\"a\":1}", "bt:t.hash:20", "bt-bytes:t.hash:20"]
    );
    assert_eq!(p.stats().malformed, 1);
}

#[test]
fn typed_messaging_round_trip() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Move {
        x: i32,
        y: i32,
    }
    let mut p = platform();
    let got = Shared::new(None);
    let g = got.clone();
    p.messaging()
        .once("self.game.move", move |_c, _m, mv: Move| {
            *g.borrow_mut() = Some(mv)
        });
    let _ = p
        .messaging()
        .send("game.move", "local", &Move { x: 1, y: -2 });
    turn(&mut p);
    assert_eq!(*got.borrow(), Some(Move { x: 1, y: -2 }));
}

#[test]
fn send_statuses() {
    let mut p = Platform::builder()
        .transports(false)
        .limits(Limits {
            local_queue: 4,
            max_message_size: 100,
            ..Limits::default()
        })
        .build()
        .unwrap();
    turn(&mut p); // start-up messages
    let stranger = Identity::generate().sign_id();
    assert_eq!(
        p.send("ms", "t", "local", vec![0; 200]),
        Err(SendError::TooLarge {
            size: 203,
            limit: 100
        })
    );
    assert_eq!(
        p.send("ms", "t", "nobody", vec![]),
        Err(SendError::InvalidDestination)
    );
    assert_eq!(
        p.send("ms", "t", stranger, vec![]),
        Err(SendError::NoTransport)
    );
    let me = p.sign_id().to_string();
    assert_eq!(p.send("ms", "t", me.as_str(), vec![]), Ok(()));
    for _ in 0..3 {
        assert_eq!(p.send("ms", "t", "local", vec![]), Ok(()));
    }
    assert_eq!(
        p.send("ms", "t", "local", vec![]),
        Err(SendError::BufferFull)
    );
    let (_, rx) = p.on_channel("self.t", 8);
    turn(&mut p);
    let msgs: Vec<_> = rx.try_iter().collect();
    assert_eq!(msgs.len(), 4);
    assert!(msgs.iter().all(|m| m.sender == mm_platform::Address::Local));
    assert_eq!(p.send("ms", "t", "local", vec![]), Ok(()));
}

#[test]
fn start_up_messages_take_no_room_of_the_local_queue() {
    // Issue 21: with `local_queue: 4` every send made before the first poll was refused, the
    // platform's own start-up messages having filled the queue.
    let mut p = Platform::builder()
        .transports(false)
        .limits(Limits {
            local_queue: 4,
            ..Limits::default()
        })
        .build()
        .unwrap();
    let (_, rx) = p.on_channel("self.app.*", 8);
    let (_, builtin) = p.on_channel("self.transports.myNodeInfo", 8);
    for i in 0..4 {
        let topic = format!("app.m{i}");
        assert_eq!(p.send("ms", topic, "local", vec![]), Ok(()));
    }
    assert_eq!(
        p.send("ms", "app.m4", "local", vec![]),
        Err(SendError::BufferFull)
    );
    turn(&mut p);
    let topics: Vec<String> = rx.try_iter().map(|m| m.topic).collect();
    assert_eq!(topics, ["app.m0", "app.m1", "app.m2", "app.m3"]);
    assert_eq!(
        builtin.try_iter().count(),
        1,
        "the start-up messages still arrive"
    );
}

#[test]
fn invalid_topics_are_refused_on_every_send_path() {
    let mut p = platform();
    let (_, rx) = p.on_channel("*", 64);
    let bad = [
        ("", TopicError::Empty),
        ("chat..say", TopicError::EmptySegment),
        (".chat", TopicError::EmptySegment),
        ("chat.", TopicError::EmptySegment),
        ("chat.*", TopicError::Wildcard),
        ("chat.a*", TopicError::Wildcard),
        ("has space", TopicError::Whitespace),
        ("tab\there", TopicError::Whitespace),
        ("a\0b", TopicError::Control),
        ("a\u{7f}b", TopicError::Control),
    ];
    let handle = p.handle();
    for (topic, why) in bad {
        let refusal = SendError::InvalidTopic(why);
        let want = Err(refusal);
        assert_eq!(p.send("ms", topic, "local", vec![]), want, "{topic:?}");
        assert_eq!(p.messaging().send(topic, "local", &1), want, "{topic:?}");
        assert_eq!(p.torrenting().send(topic, "local", &[1]), want, "{topic:?}");
        assert_eq!(handle.send("bt", topic, "local", vec![]), want, "{topic:?}");
        assert!(refusal.to_string().starts_with("invalid topic: "));
    }
    // What the platform, its services and the original JavaScript nodes use stays valid.
    for topic in [
        "test.testMessage",
        "transports.nodeInfo",
        "kademlia-v1.ping",
        "room#42.say",
        "x",
    ] {
        assert_eq!(check_topic(topic), Ok(()), "{topic:?}");
        assert!(p.send("ms", topic, "local", vec![]).is_ok(), "{topic:?}");
    }
    turn(&mut p);
    assert_eq!(
        rx.try_iter().count(),
        5,
        "only the valid topics were delivered"
    );
}

#[test]
fn invalid_patterns_are_refused() {
    for good in ["*", "self.*", "a.*.c", "public.chat.room"] {
        assert_eq!(check_pattern(good), Ok(()), "{good:?}");
    }
    let bad = [
        ("", TopicError::Empty),
        ("**", TopicError::Wildcard),
        ("a.b*", TopicError::Wildcard),
        ("a..b", TopicError::EmptySegment),
        ("a b", TopicError::Whitespace),
    ];
    for (pattern, why) in bad {
        assert_eq!(check_pattern(pattern), Err(why), "{pattern:?}");
        let caught = std::panic::catch_unwind(|| {
            let mut p = Platform::builder().transports(false).build().unwrap();
            p.on(pattern, |_, _| {});
        });
        let err = caught.expect_err("an invalid pattern panics");
        let text = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("invalid subscription pattern"), "{text}");
    }
}

#[test]
fn the_platforms_own_protocol_is_refused() {
    let mut p = platform();
    assert_eq!(
        p.send("mm", "identify", "local", vec![]),
        Err(SendError::ReservedProtocol)
    );
    assert_eq!(
        p.api(RawCodec::new(RESERVED_PROTOCOL))
            .send("ack", "local", &[]),
        Err(SendError::ReservedProtocol)
    );
    assert_eq!(
        p.handle().send("mm", "x", "local", vec![]),
        Err(SendError::ReservedProtocol)
    );
    assert!(p.send("mmx", "x", "local", vec![]).is_ok());
}

#[test]
fn message_debug_shows_a_short_payload() {
    let mut p = platform();
    let (_, rx) = p.on_channel("self.*", 4);
    let _ = p.send("bt", "bin", "local", vec![0xff; 1000]);
    let _ = p.messaging().send("json", "local", &"hello");
    turn(&mut p);
    let bin = format!("{:?}", rx.try_recv().unwrap());
    assert!(
        bin.contains(&format!("payload: 1000 bytes {}…", "ff".repeat(32))),
        "{bin}"
    );
    assert!(bin.len() < 300, "{bin}");
    let json = format!("{:?}", rx.try_recv().unwrap());
    assert!(json.contains(r#"payload: 7 bytes "\"hello\"""#), "{json}");
}
