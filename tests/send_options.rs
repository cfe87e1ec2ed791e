//! Send options and statuses: an option the application may reasonably pass
//! (`expire_after: Duration::MAX`, "never expire") must not panic the reactor by overflowing
//! the clock; a message that can never be sent is `TooLarge` whatever its destination; the
//! public types round-trip through serde.

use std::time::Duration;

use mm_platform::identity::Identity;
use mm_platform::platform::directory::NodeInfoError;
use mm_platform::{
    Address, Event, Limits, Message, NodeInfo, Platform, Scope, SendError, SendOptions, SignId,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

#[test]
fn a_real_time_send_that_never_expires_does_not_overflow_the_clock() {
    let mut p = Platform::builder().build().unwrap();
    let dest = Identity::generate().sign_id();
    let status = p.messaging().send_with(
        "a.b",
        dest,
        &1,
        SendOptions {
            realtime: true,
            expire_after: Some(Duration::MAX),
        },
    );
    status.expect("queued");
    p.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(p.queued_for(&dest), 1);
}

/// Issue 21: a 17 MiB `bt` send to another node returned `BufferFull` with an empty queue,
/// forever, while the same to `local` was too large. One rule now: what can never be sent is
/// `TooLarge`, with the limit of its path, wherever it goes.
#[test]
fn a_message_too_large_for_its_path_is_too_large_locally_and_remotely() {
    let mut p = Platform::builder().build().unwrap();
    let dest = Identity::generate().sign_id();
    let big = vec![0u8; 17 << 20];
    let size = 2 + 4 + big.len();
    let local = Limits::default().max_message_size;
    let want = Err(SendError::TooLarge { size, limit: local });
    assert_eq!(p.torrenting().send("bulk", "local", &big), want);
    assert_eq!(p.send("bt", "bulk", "local", big.clone()), want);
    let remote = p.torrenting().send("bulk", dest, &big);
    let Err(SendError::TooLarge { size: s, limit }) = remote else {
        panic!("a 17 MiB send to a remote node: {remote:?}");
    };
    assert_eq!(s, size);
    // The frame's own bytes leave a little less than the local limit.
    assert!(limit < local && limit > local - 64, "{limit}");
    assert_eq!(
        remote.unwrap_err().to_string(),
        format!("message of {size} bytes is larger than the limit of {limit} bytes")
    );
    assert_eq!(p.send("bt", "bulk", dest, big.clone()), remote);
    assert_eq!(p.handle().send("bt", "bulk", dest, big), remote);
    // The largest message that path takes is queued, one byte more never is.
    let fits = vec![0u8; limit - 6];
    assert_eq!(
        p.torrenting().send("bulk", dest, &vec![0u8; limit - 5]),
        Err(SendError::TooLarge {
            size: limit + 1,
            limit
        })
    );
    assert!(p.torrenting().send("bulk", dest, &fits).is_ok());
    // A second one waits for room: that is what BufferFull means, a retry can succeed.
    assert_eq!(
        p.torrenting().send("bulk", dest, &fits),
        Err(SendError::BufferFull)
    );
    assert_eq!(p.queued_for(&dest), 1);
}

#[test]
fn ids_addresses_scopes_node_infos_messages_and_events_round_trip_through_serde() {
    fn round<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) -> Value {
        let json = serde_json::to_value(v).unwrap();
        assert_eq!(&serde_json::from_value::<T>(json.clone()).unwrap(), v);
        json
    }
    let id = Identity::generate();
    assert_eq!(round(&id.sign_id()), json!(id.sign_id().to_string()));
    assert_eq!(round(&id.box_id()), json!(id.box_id().to_string()));
    assert!(serde_json::from_value::<SignId>(json!("not a key")).is_err());
    assert_eq!(round(&Address::Local), json!("local"));
    assert_eq!(
        round(&Address::Node(id.sign_id())),
        json!(id.sign_id().to_string())
    );
    assert_eq!(
        round(&Address::Box(id.box_id())),
        json!(format!("box:{}", id.box_id()))
    );
    assert_eq!(round(&Scope::Own), json!("self"));
    assert_eq!(round(&Scope::Friends), json!("friends"));
    assert_eq!(round(&Scope::Public), json!("public"));

    let p = Platform::builder().identity(id.clone()).build().unwrap();
    let info: NodeInfo = p.node_info();
    assert!(!info.endpoints.is_empty());
    assert_eq!(round(&info), info.to_json());
    // Deserializing checks the nodeInfo: a poisoned one is refused.
    let mut poisoned = info.to_json();
    poisoned["boxId"] = json!(Identity::generate().box_id().to_string());
    assert!(serde_json::from_value::<NodeInfo>(poisoned.clone()).is_err());
    assert_eq!(NodeInfo::parse(&poisoned), Err(NodeInfoError::KeyMismatch));

    let msg = Message {
        sender: Address::Box(id.box_id()),
        protocol: "bt".into(),
        topic: "files.chunk".into(),
        scope: Scope::Public,
        payload: vec![0, 1, 2, 255],
        id: Some([7; 16]),
    };
    let json = round(&msg);
    assert_eq!(json["payload"], "AAEC/w==");
    assert_eq!(json["scope"], "public");
    let local = Message {
        id: None,
        sender: Address::Local,
        ..msg.clone()
    };
    round(&local);
    for event in [
        Event::Ready,
        Event::Connection(id.sign_id()),
        Event::Message(msg),
        Event::MyNodeInfo(info.clone()),
        Event::NodeInfo {
            node_info: info.to_json(),
            source: "mdns".into(),
        },
        Event::Path {
            peer: id.sign_id(),
            relayed: true,
            remote: "127.0.0.1:9".parse().unwrap(),
        },
    ] {
        round(&event);
    }
    assert_eq!(round(&Event::Ready), json!("Ready"));
}

/// Every send takes its arguments in one order (protocol where there is one, topic,
/// destination, payload), `torrenting()` takes any byte slice, and a refusal is an `Error`
/// that works with `?` and names its cause.
#[test]
fn sends_share_one_argument_order_take_byte_slices_and_work_with_question_mark() {
    fn all(p: &mut Platform) -> Result<(), SendError> {
        let bytes = vec![1u8, 2, 3];
        p.torrenting().send("files.a", "local", &bytes)?;
        p.torrenting().send("files.b", "local", &bytes[1..])?;
        p.torrenting().send("files.c", "local", b"xyz")?;
        p.messaging().send("notes.a", "local", "text")?;
        p.send("bt", "files.d", "local", &b"low"[..])?;
        p.handle().send("bt", "files.e", "local", vec![9u8])?;
        p.handle().send_json("notes.b", "local", &json!({"n": 1}))?;
        Ok(())
    }
    let mut p = Platform::builder().build().unwrap();
    let (_, files) = p.torrenting().on_channel("self.files.*", 16);
    let (_, notes) = p.messaging().on_channel("self.notes.*", 16);
    all(&mut p).unwrap();
    for _ in 0..4 {
        p.poll(Some(Duration::ZERO)).unwrap();
    }
    let got: Vec<(String, Vec<u8>)> = files.try_iter().map(|m| (m.topic, m.payload)).collect();
    assert_eq!(
        got,
        vec![
            ("files.a".to_string(), vec![1, 2, 3]),
            ("files.b".to_string(), vec![2, 3]),
            ("files.c".to_string(), b"xyz".to_vec()),
            ("files.d".to_string(), b"low".to_vec()),
            ("files.e".to_string(), vec![9]),
        ]
    );
    assert_eq!(notes.try_iter().count(), 2);
    // A refusal through `?`: a boxed error naming the cause, and the topic error as source.
    fn bad(p: &mut Platform) -> Result<(), Box<dyn std::error::Error>> {
        p.messaging().send("chat..say", "local", "x")?;
        Ok(())
    }
    let e = bad(&mut p).unwrap_err();
    assert!(e.to_string().starts_with("invalid topic: "), "{e}");
    assert!(e.source().is_some());
}
