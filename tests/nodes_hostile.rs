//! A peer that completes the CurveCP handshake with its own key but lies in its identify frame
//! (or skips it) is disconnected and none of its frames is delivered; directory replies that do
//! not check out are refused; a peer that has not identified itself cannot make the node buffer
//! a large frame.

use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use mm_platform::identity::Identity;
use mm_platform::proto::curvecp::client::ClientConfig;
use mm_platform::proto::envelope::Envelope;
use mm_platform::proto::transport::{ClientDriver, TransportKind};
use mm_platform::{BoxId, NetConfig, Platform};
use serde_json::json;

/// Connects to `target` over UDP as `me`, writes `frames`, and drives both sides for a second.
fn raw_peer(target: &mut Platform, me: &Identity, frames: &[Envelope]) {
    let mut bytes = Vec::new();
    for f in frames {
        f.encode_frame(&mut bytes);
    }
    raw_peer_bytes(target, me, &bytes, Duration::from_secs(1));
}

/// Connects to `target` over UDP as `me`, writes `bytes` on the stream, and drives both sides
/// for `time`; returns how many of the bytes the target's side acknowledged.
fn raw_peer_bytes(target: &mut Platform, me: &Identity, bytes: &[u8], time: Duration) -> u64 {
    let info = target.node_info().to_json();
    let port = info["connectionInfo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["transportType"] == "udp")
        .unwrap()["transportInfo"]["port"]
        .as_u64()
        .unwrap() as u16;
    let mut poll = Poll::new().unwrap();
    let mut config = ClientConfig::new(target.box_id().0);
    config.long_term = Some(me.box_keypair().clone());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = ClientDriver::connect(
        poll.registry(),
        Token(1),
        TransportKind::Udp,
        addr,
        config,
        Instant::now(),
    )
    .unwrap();
    let mut written = 0;
    let mut events = Events::with_capacity(16);
    let mut buf = [0u8; 4096];
    let end = Instant::now() + time;
    while Instant::now() < end {
        poll.poll(&mut events, Some(Duration::from_millis(1)))
            .unwrap();
        let now = Instant::now();
        for ev in events.iter() {
            client.handle_event(poll.registry(), ev, now);
        }
        let s = client.client_mut().stream_mut();
        written += s.write(&bytes[written..]);
        while s.read(&mut buf) > 0 {}
        client.flush(poll.registry(), now).unwrap();
        target.poll(Some(Duration::from_millis(1))).unwrap();
    }
    client.client_mut().stream_mut().bytes_acked()
}

#[test]
fn a_forged_identify_is_refused() {
    let victim = Identity::generate();
    let mallory = Identity::generate();
    let mut b = Platform::builder()
        .devices([victim.sign_id()])
        .build()
        .unwrap();
    let (_, rx) = b.on_channel("*.*", 64);
    let (_, rx2) = b.on_channel("*.*.*", 64);
    let frames = [
        Envelope::new("identify", "mm", victim.sign_id().to_string().into_bytes()),
        Envelope::new("cmd", "ms", b"\"rm -rf\"".to_vec()),
    ];
    raw_peer(&mut b, &mallory, &frames);
    assert!(
        b.connections().is_empty(),
        "the forger's connection was closed"
    );
    let got: Vec<_> = rx
        .try_iter()
        .chain(rx2.try_iter())
        .filter(|m| m.sender != mm_platform::Address::Local)
        .collect();
    assert!(
        got.is_empty(),
        "nothing from the forger is delivered: {got:?}"
    );
    // Control: the victim itself, same frames, is heard with scope self.
    raw_peer(&mut b, &victim, &frames);
    let got: Vec<_> = rx.try_iter().filter(|m| m.topic == "cmd").collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].scope, mm_platform::Scope::Own);
    assert_eq!(b.connections().len(), 1);
}

#[test]
fn a_peer_that_skips_identify_is_refused_and_an_honest_raw_peer_is_heard() {
    let mallory = Identity::generate();
    let mut b = Platform::builder().build().unwrap();
    let (_, rx) = b.on_channel("public.*", 64);
    let frames = [Envelope::new("cmd", "ms", b"1".to_vec())];
    raw_peer(&mut b, &mallory, &frames);
    assert!(rx.try_iter().next().is_none());
    assert!(b.connections().is_empty());
    // The same peer telling the truth is heard, with its own id as sender.
    let honest = [
        Envelope::new("identify", "mm", mallory.sign_id().to_string().into_bytes()),
        Envelope::new("cmd", "ms", b"2".to_vec()),
    ];
    raw_peer(&mut b, &mallory, &honest);
    let got: Vec<_> = rx.try_iter().collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"2");
    assert_eq!(got[0].sender, mallory.sign_id().into());
}

#[test]
fn directory_replies_are_checked() {
    let mut a = Platform::builder().build().unwrap();
    let (_, gets) = a.messaging().on_channel("self.directory.get", 8);
    let x = Identity::generate();
    let y = Identity::generate();
    let bx: BoxId = x.box_id();
    assert_eq!(a.sign_id_of(&bx), None);
    a.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(
        gets.try_recv().unwrap().json::<String>().unwrap(),
        bx.to_string()
    );
    let before = a.stats().malformed;
    let lie = json!({"key": bx.to_string(), "value": y.sign_id().to_string()});
    let _ = a.messaging().send("directory.getReply", "local", &lie);
    a.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(a.stats().malformed, before + 1);
    assert_eq!(a.sign_id_of(&bx), None);
    let truth = json!({"key": bx.to_string(), "value": x.sign_id().to_string()});
    let _ = a.messaging().send("directory.getReply", "local", &truth);
    a.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(a.sign_id_of(&bx), Some(x.sign_id()));
}

#[test]
fn an_unidentified_peer_cannot_announce_a_large_frame() {
    let mallory = Identity::generate();
    let mut b = Platform::builder()
        .net(NetConfig {
            // Long enough that only the frame limit can end the connection during the test.
            connect_timeout: Duration::from_secs(120),
            ..NetConfig::default()
        })
        .build()
        .unwrap();
    // A frame announcing 1 MB (allowed after identify), then the first bytes of it: closed at
    // once, not buffered until the identify timeout.
    let mut bytes = b"1000000:".to_vec();
    bytes.resize(64 * 1024, b'x');
    let acked = raw_peer_bytes(&mut b, &mallory, &bytes, Duration::from_secs(3));
    assert!(
        acked < bytes.len() as u64,
        "the connection was closed on the oversized first frame, not fed ({acked} bytes taken)"
    );
    assert!(b.connections().is_empty());
}

/// An `mm`/`delivered` frame deletes only records addressed to the peer that sends it:
/// another node naming their ids, malformed frames and unknown ids change nothing.
#[test]
fn delivery_acknowledgements_settle_only_the_acknowledging_peers_records() {
    use mm_platform::storage::{FileStore, Storage};
    use mm_platform::SendOptions;
    let dir = std::env::temp_dir().join(format!("mm-hostile-acks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut alice = Platform::builder()
        .storage(FileStore::open(&dir).unwrap())
        .build()
        .unwrap();
    let bob = Identity::generate();
    let later = SendOptions {
        realtime: false,
        expire_after: None,
    };
    for i in 0..3 {
        assert!(alice
            .messaging()
            .send_with("t.note", bob.sign_id(), &i, later)
            .is_ok());
    }
    alice.poll(Some(Duration::from_millis(10))).unwrap();
    assert_eq!(alice.offline_pending(), 3);
    // The records' ids, from their storage keys (`offline-<hex id>`; Alice holds the lock).
    let store = FileStore::open_unlocked(&dir).unwrap();
    let mut ids = Vec::new();
    for key in store.keys().unwrap() {
        if let Some(hex) = key.strip_prefix("offline-") {
            for i in 0..16 {
                ids.push(u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap());
            }
        }
    }
    assert_eq!(ids.len(), 48);
    let identify = |who: &Identity| Envelope {
        id: Some(b"mm-delivery-acks/1".to_vec()),
        ..Envelope::new("identify", "mm", who.sign_id().to_string().into_bytes())
    };
    let delivered = |p: Vec<u8>| Envelope::new("delivered", "mm", p);
    let mallory = Identity::generate();
    let frames = [
        identify(&mallory),
        delivered(ids.clone()),
        delivered(ids[..15].to_vec()),
        delivered(vec![7; 16 * 1025]),
        delivered(vec![9; 32]),
    ];
    raw_peer(&mut alice, &mallory, &frames);
    assert_eq!(
        alice.offline_pending(),
        3,
        "another node's acknowledgement deletes nothing"
    );
    // Control: Bob, who announces delivery acknowledgements, takes the records; only his
    // acknowledgement (not the stream's) settles them.
    raw_peer(&mut alice, &bob, &[identify(&bob)]);
    assert_eq!(alice.offline_pending(), 3, "received is not delivered");
    raw_peer(&mut alice, &bob, &[identify(&bob), delivered(ids)]);
    assert_eq!(
        alice.offline_pending(),
        0,
        "Bob's acknowledgement settles them"
    );
    drop(alice);
    let _ = std::fs::remove_dir_all(&dir);
}
