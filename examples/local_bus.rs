//! Every example of the original README (mm-platform 0.7.5), in Rust, on the local bus.
//!
//! Run: `cargo run --example local_bus`. It prints what each subscriber sees and exits by
//! itself after a bounded number of reactor turns.

use std::time::Duration;

use mm_platform::storage::FileStore;
use mm_platform::{Event, Platform, SendOptions, SendResult};
use serde_json::{json, Value};

fn turns(platform: &mut Platform, n: usize) {
    for _ in 0..n {
        platform.poll(Some(Duration::ZERO)).expect("poll");
    }
}

fn main() {
    // var platform = new MicroMinionPlatform()
    let mut platform = Platform::builder().build().expect("platform");
    println!("our signId: {}", platform.sign_id());
    println!("our boxId:  {}", platform.box_id());

    // Events: ready / connection / disconnected / message.
    platform.on_event(|_ctx, event| match event {
        Event::Ready => println!("[event] ready"),
        Event::Connection(peer) => println!("[event] connection {peer}"),
        Event::Disconnected(peer) => println!("[event] disconnected {peer}"),
        _ => {}
    });

    // platform.messaging.on('self.test.testMessage', function(topic, sender, messageDictionary) {...})
    platform
        .messaging()
        .on("self.test.testMessage", |_ctx, msg, dict: Value| {
            println!(
                "[messaging] {} from {}: {dict}",
                msg.scoped_topic(),
                msg.sender
            );
        });

    // platform.messaging.on('self.transports.myNodeInfo', ...)
    platform.messaging().on(
        "self.transports.myNodeInfo",
        |_ctx, msg, node_info: Value| {
            println!(
                "[myNodeInfo] {} from {}: {node_info}",
                msg.scoped_topic(),
                msg.sender
            );
        },
    );

    // platform.messaging.on('self.transports.requestNodeInfo', ...): the platform asks the
    // world for a peer's nodeInfo. A toy directory service answers from a static list.
    let known_peer = mm_platform::identity::Identity::generate();
    let peer_info = json!({
        "signId": known_peer.sign_id().to_string(),
        "boxId": known_peer.box_id().to_string(),
        "connectionInfo": [{"transportType": "udp",
                            "transportInfo": {"address": "127.0.0.1", "port": 20000}}],
    });
    let answer = peer_info.clone();
    platform.messaging().on(
        "self.transports.requestNodeInfo",
        move |ctx, msg, node_id: String| {
            println!(
                "[requestNodeInfo] {} from {}: {node_id}",
                msg.scoped_topic(),
                msg.sender
            );
            if answer["signId"] == node_id {
                let _ = ctx
                    .messaging()
                    .send("transports.nodeInfo", "local", &answer);
            }
        },
    );
    platform
        .messaging()
        .on("self.transports.nodeInfo", |_ctx, _msg, info: Value| {
            println!("[nodeInfo] learned {}", info["signId"]);
        });

    // platform.messaging.on('self.directory.get', ...) answered with 'directory.getReply'.
    let (box_id, sign_id) = (
        known_peer.box_id().to_string(),
        known_peer.sign_id().to_string(),
    );
    platform
        .messaging()
        .on("self.directory.get", move |ctx, msg, key: String| {
            println!(
                "[directory.get] {} from {}: {key}",
                msg.scoped_topic(),
                msg.sender
            );
            if key == box_id {
                let reply = json!({"key": key, "value": sign_id});
                let _ = ctx.messaging().send("directory.getReply", "local", &reply);
            }
        });
    platform
        .messaging()
        .on("self.directory.getReply", |_ctx, _msg, reply: Value| {
            println!(
                "[directory.getReply] {} -> {}",
                reply["key"], reply["value"]
            );
        });

    // platform.on('message', function(message) {...}): the low-level API sees everything.
    platform.on_message(|_ctx, message| {
        println!(
            "[message] topic={} sender={} scope={} protocol={} payload={}",
            message.topic,
            message.sender,
            message.scope,
            message.protocol,
            String::from_utf8_lossy(&message.payload)
        );
    });

    // platform.messaging.send('test.testMessage', 'local', {test: 'Test String'},
    //                         {realtime: true, expireAfter: 15000})
    let status = platform.messaging().send_with(
        "test.testMessage",
        "local",
        &json!({"test": "Test String"}),
        SendOptions {
            realtime: true,
            expire_after: Some(Duration::from_millis(15_000)),
        },
    );
    show("messaging.send", status);

    // platform.messaging.send('transports.nodeInfo', 'local', nodeInfo) with our own nodeInfo.
    let ours = json!({
        "boxId": platform.box_id().to_string(),
        "signId": platform.sign_id().to_string(),
        "connectionInfo": [],
    });
    show(
        "send our nodeInfo",
        platform
            .messaging()
            .send("transports.nodeInfo", "local", &ours),
    );

    // What the directory does when it needs a peer: ask the bus.
    let ask = known_peer.sign_id().to_string();
    show(
        "requestNodeInfo",
        platform
            .messaging()
            .send("transports.requestNodeInfo", "local", &ask),
    );
    let key = known_peer.box_id().to_string();
    show(
        "directory.get",
        platform.messaging().send("directory.get", "local", &key),
    );

    // platform.send({destination: 'local', topic: 'test', protocol: 'ms', payload: 'test'})
    show(
        "send",
        platform.send("ms", "test", "local", &b"\"test\""[..]),
    );

    // Torrenting: protocol 'bt', topic = the torrent's info hash, payload = bytes.
    platform.torrenting().on("self.*", |_ctx, msg, bytes| {
        println!("[torrenting] {} got {} bytes", msg.topic, bytes.len());
    });
    let hash = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a";
    show(
        "torrenting.send",
        platform.torrenting().send(hash, "local", &[19u8; 68]),
    );

    // A remote destination needs the transports (the next layer): the send says so honestly.
    show(
        "send to a remote peer",
        platform
            .messaging()
            .send("test.hello", known_peer.sign_id(), &"hi"),
    );

    turns(&mut platform, 4);
    println!("stats: {:?}", platform.stats());

    // Building services on top of the platform, with persistent storage (kad-fs's role):
    // the identity is created on first use and found again on restart.
    let dir = std::env::temp_dir().join(format!("mm-local-bus-example-{}", std::process::id()));
    let first = {
        let p = Platform::builder()
            .storage(FileStore::open(dir.join("platform")).expect("store"))
            .build()
            .expect("platform");
        p.sign_id()
    };
    let again = Platform::builder()
        .storage(FileStore::open(dir.join("platform")).expect("store"))
        .build()
        .expect("platform");
    println!(
        "identity with FileStore: {first} then {} (same: {})",
        again.sign_id(),
        first == again.sign_id()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Prints what became of a send.
fn show(what: &str, status: SendResult) {
    match status {
        Ok(()) => println!("{what} -> queued"),
        Err(e) => println!("{what} -> refused: {e}"),
    }
}
