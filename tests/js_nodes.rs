//! Talking to the original JavaScript nodes: a Rust platform and `tests/js/peer.js` (a node
//! wired like mm-platform 0.7.5 on the genuine 1tp 0.21.0, curvecp 1.2.1 and protobufjs 5.0.1)
//! exchange `ms` and `bt` messages in both directions over UDP and over TCP, with the senders,
//! scopes and order each side expects; one Rust node serves a JavaScript peer and a Rust peer on
//! the same ports at once while Rust-to-Rust traffic keeps the native framing; a data directory
//! written by a JavaScript node opens as its identity. Everything runs on 127.0.0.1; every wait
//! is bounded. A JavaScript node given a nodeInfo with an `mm-relay` endpoint and
//! `"relay": true` skips the one and ignores the other; one given IPv6 endpoints beside the
//! IPv4 one of a dual-stack Rust node keeps working. Skipped loudly without node and
//! `tests/js/node_modules` (CI sets MM_REQUIRE_JS=1).

mod support;

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use crossbeam_channel::Receiver;
use serde_json::{json, Value};

use mm_platform::identity::Identity;
use mm_platform::storage::{FileStore, MemStore};
use mm_platform::{Address, Message, Platform, Scope};
use support::js::{js_available, JsPeer};
use support::{random_data, TempDir};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One JavaScript test at a time: the JavaScript nodes do their cryptography in JavaScript and
/// take a core each while moving a megabyte; two such tests side by side on a small machine
/// (and whatever else it runs) make each other time out.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `None` when JavaScript is missing (a loud skip, or a failure under `MM_REQUIRE_JS=1`);
/// else the turn of test `name`, held until it ends.
fn js_turn(name: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if !js_available(name) {
        return None;
    }
    // The platform's debug log is shown for a test that fails (RUST_LOG picks the level).
    let _ = env_logger::builder().is_test(true).try_init();
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()))
}

fn rust_node(identity: Identity, friends: &[&str]) -> Platform {
    Platform::builder()
        .identity(identity)
        .storage(MemStore::new())
        .friends(friends.iter().map(|s| s.parse().expect("signId")))
        .build()
        .expect("platform")
}

/// `info` with only the endpoints of one transport type ("udp" or "tcp").
fn only(info: &Value, transport: &str) -> Value {
    let mut info = info.clone();
    let list: Vec<Value> = info["connectionInfo"]
        .as_array()
        .expect("connectionInfo")
        .iter()
        .filter(|e| e["transportType"] == transport)
        .cloned()
        .collect();
    assert!(!list.is_empty(), "no {transport} endpoint in {info}");
    info["connectionInfo"] = Value::Array(list);
    info
}

fn tell_rust(p: &mut Platform, info: &Value) {
    assert!(p
        .messaging()
        .send("transports.nodeInfo", "local", info)
        .is_ok());
}

fn tell_js(js: &mut JsPeer, info: &Value) {
    js.cmd(json!({"cmd": "nodeInfo", "nodeInfo": info}));
    js.wait_for(
        Duration::from_secs(5),
        || {},
        |v| v["event"] == "ok" && v["cmd"] == "nodeInfo",
    );
}

fn poll(p: &mut Platform) {
    p.poll(Some(Duration::from_millis(1))).expect("poll");
}

/// Polls `p` until `done` (at most `limit`; panics with `what` on time-out).
fn pump_until(p: &mut Platform, limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        poll(p);
    }
}

/// Both sides know each other; the JavaScript side only the Rust node's `transport` endpoint.
fn introduce(rust: &mut Platform, js: &mut JsPeer, transport: &str) {
    tell_rust(rust, &js.node_info.clone());
    let info = only(&rust.node_info().to_json(), transport);
    tell_js(js, &info);
}

fn js_flags(transport: &str) -> &'static [&'static str] {
    match transport {
        "udp" => &["--no-tcp"],
        _ => &["--no-udp"],
    }
}

fn ms_both_ways(transport: &str) {
    let mut js = JsPeer::spawn(js_flags(transport));
    let mut rust = rust_node(Identity::generate(), &[&js.sign_id()]);
    introduce(&mut rust, &mut js, transport);
    let (_, rx) = rust.on_channel("*.test.*", 64);

    // Rust to JS: the JavaScript node names us by our boxId; we are a stranger to it.
    let js_box = js.box_id();
    assert!(rust
        .messaging()
        .send(
            "test.fromRust",
            js_box.as_str(),
            &json!({"hello": "js", "n": 1})
        )
        .is_ok());
    let our_box = rust.box_id().to_string();
    let got = {
        let r = &mut rust;
        js.wait_for(
            Duration::from_secs(20),
            || poll(r),
            |v| v["event"] == "message" && v["topic"] == "test.fromRust",
        )
    };
    assert_eq!(got["sender"], our_box.as_str());
    assert_eq!(got["scope"], "public");
    assert_eq!(got["protocol"], "ms");
    assert_eq!(got["payload"], json!({"hello": "js", "n": 1}));

    // JS to Rust: reported with its signId (its nodeInfo is known), in the friends scope.
    js.cmd(
        json!({"cmd": "send", "id": 1, "to": our_box, "topic": "test.fromJs",
        "protocol": "ms", "payload": {"hello": "rust"}}),
    );
    let msg = recv_within(
        &mut rust,
        &mut js,
        &rx,
        Duration::from_secs(20),
        "the JS message",
    );
    assert_eq!(msg.sender, Address::Node(js.sign_id().parse().unwrap()));
    assert_eq!(msg.scope, Scope::Friends);
    assert_eq!(msg.topic, "test.fromJs");
    assert_eq!(msg.json::<Value>().unwrap(), json!({"hello": "rust"}));
    {
        let r = &mut rust;
        js.wait_for(
            Duration::from_secs(20),
            || poll(r),
            |v| v["event"] == "sent" && v["id"] == 1,
        );
    }
    // Every connection of ours to or from it used the requested transport.
    let kinds: HashSet<String> = rust
        .connections()
        .iter()
        .map(|c| format!("{:?}", c.transport).to_lowercase())
        .collect();
    assert_eq!(kinds, HashSet::from([transport.to_owned()]));
    assert!(js.alive());
}

#[test]
fn ms_messages_both_ways_over_udp() {
    if let Some(_turn) = js_turn("ms_messages_both_ways_over_udp") {
        ms_both_ways("udp");
    }
}

#[test]
fn ms_messages_both_ways_over_tcp() {
    if let Some(_turn) = js_turn("ms_messages_both_ways_over_tcp") {
        ms_both_ways("tcp");
    }
}

/// `bt` payloads of arbitrary bytes, 0 to 1 MiB, both ways. (The original carries a `bt`
/// payload as a protobuf string; see `envelope` for how bytes cross to a JavaScript node.)
fn bt_both_ways(transport: &str) {
    let mut js = JsPeer::spawn(js_flags(transport));
    let mut rust = rust_node(Identity::generate(), &[]);
    introduce(&mut rust, &mut js, transport);
    let (_, rx) = rust.on_channel("public.*", 64);
    let js_box = js.box_id();
    let our_box = rust.box_id().to_string();
    let sizes = [0usize, 1, 2, 1023, 1025, 70_000, 1 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let data = random_data(n, 7 + i as u64);
        let topic = format!("torrent{i}");
        let t = Instant::now();
        assert!(rust
            .torrenting()
            .send(&topic, js_box.as_str(), &data)
            .is_ok());
        let got = {
            let r = &mut rust;
            js.wait_for(
                Duration::from_secs(180),
                || poll(r),
                |v| v["event"] == "message" && v["topic"] == topic.as_str(),
            )
        };
        assert_eq!(got["protocol"], "bt");
        eprintln!(
            "bt: {n} bytes Rust to JS over {transport} in {:?}",
            t.elapsed()
        );
        let bytes = B64
            .decode(got["payloadBase64"].as_str().expect("payloadBase64"))
            .unwrap();
        assert!(bytes == data, "{n} bytes Rust to JS arrived changed");

        js.cmd(
            json!({"cmd": "send", "id": 100 + i, "to": our_box, "topic": topic,
            "protocol": "bt", "payloadBase64": B64.encode(&data)}),
        );
        let msg = recv_within(
            &mut rust,
            &mut js,
            &rx,
            Duration::from_secs(180),
            "a bt payload",
        );
        eprintln!(
            "bt: {n} bytes JS to Rust over {transport} in {:?}",
            t.elapsed()
        );
        assert_eq!(msg.protocol, "bt");
        assert_eq!(msg.topic, topic);
        assert!(msg.payload == data, "{n} bytes JS to Rust arrived changed");
    }
    assert!(js.alive());
}

#[test]
fn bt_payloads_both_ways_over_udp() {
    if let Some(_turn) = js_turn("bt_payloads_both_ways_over_udp") {
        bt_both_ways("udp");
    }
}

#[test]
fn bt_payloads_both_ways_over_tcp() {
    if let Some(_turn) = js_turn("bt_payloads_both_ways_over_tcp") {
        bt_both_ways("tcp");
    }
}

/// 1,000 messages each way arrive complete and in order.
#[test]
fn a_thousand_messages_each_way_in_order() {
    let Some(_turn) = js_turn("a_thousand_messages_each_way_in_order") else {
        return;
    };
    const N: u64 = 1000;
    let mut js = JsPeer::spawn(&["--no-tcp"]);
    let mut rust = rust_node(Identity::generate(), &[]);
    introduce(&mut rust, &mut js, "udp");
    let (_, rx) = rust.on_channel("public.seq.*", 2 * N as usize);
    let js_box = js.box_id();
    for i in 0..N {
        assert!(rust
            .messaging()
            .send("seq.r2j", js_box.as_str(), &json!({"n": i}))
            .is_ok());
    }
    let mut next = 0;
    let end = Instant::now() + Duration::from_secs(120);
    while next < N {
        assert!(
            Instant::now() < end,
            "Rust to JS: only {next} of {N} arrived"
        );
        let v = {
            let r = &mut rust;
            js.wait_for(
                Duration::from_secs(60),
                || poll(r),
                |v| v["event"] == "message" && v["topic"] == "seq.r2j",
            )
        };
        assert_eq!(v["payload"]["n"], next, "Rust to JS out of order");
        next += 1;
    }
    let our_box = rust.box_id().to_string();
    js.cmd(
        json!({"cmd": "flood", "id": 9, "to": our_box, "count": N, "size": 10,
        "topic": "seq.j2r"}),
    );
    let mut next = 0;
    pump_until(
        &mut rust,
        Duration::from_secs(120),
        "1,000 JS messages",
        || {
            js.drain();
            while let Ok(m) = rx.try_recv() {
                assert_eq!(m.topic, "seq.j2r");
                assert_eq!(
                    m.json::<Value>().unwrap()["n"],
                    next,
                    "JS to Rust out of order"
                );
                next += 1;
            }
            next == N
        },
    );
    assert!(js.alive());
}

/// A UDP relay between a Rust client and a Rust node that records the first byte of every
/// datagram the client sends (a CurveCP client packet starts with `Q`, a 1tp one with 0..=5).
struct Recorder {
    addr: SocketAddr,
    first_bytes: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn start(target: SocketAddr) -> Recorder {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let first_bytes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (fb, st) = (first_bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
            upstream
                .set_read_timeout(Some(Duration::from_millis(1)))
                .unwrap();
            let mut client: Option<SocketAddr> = None;
            let mut buf = [0u8; 2048];
            let end = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::Relaxed) && Instant::now() < end {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    client = Some(from);
                    fb.lock().unwrap().push(buf[0]);
                    let _ = upstream.send_to(&buf[..n], target);
                }
                while let Ok((n, _)) = upstream.recv_from(&mut buf) {
                    if let Some(c) = client {
                        let _ = sock.send_to(&buf[..n], c);
                    }
                }
            }
        });
        Recorder {
            addr,
            first_bytes,
            stop,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One Rust node serves a JavaScript peer and a Rust peer on the same ports at once; the Rust
/// peer's packets are native CurveCP (checked on the wire), the JavaScript peer's are 1tp.
#[test]
fn one_port_serves_js_and_rust_peers_at_once() {
    let Some(_turn) = js_turn("one_port_serves_js_and_rust_peers_at_once") else {
        return;
    };
    let mut js = JsPeer::spawn(&["--no-tcp"]);
    let mut server = rust_node(Identity::generate(), &[]);
    let mut other = Platform::builder()
        .storage(MemStore::new())
        .connection_info(json!([{"transportType": "udp",
            "transportInfo": {"address": "127.0.0.1", "port": 0}}]))
        .build()
        .unwrap();
    let server_info = only(&server.node_info().to_json(), "udp");
    tell_js(&mut js, &server_info);
    tell_rust(&mut server, &js.node_info.clone());
    // The Rust peer reaches the server through the recorder.
    let udp: SocketAddr = format!(
        "{}:{}",
        server_info["connectionInfo"][0]["transportInfo"]["address"]
            .as_str()
            .unwrap(),
        server_info["connectionInfo"][0]["transportInfo"]["port"]
    )
    .parse()
    .unwrap();
    let rec = Recorder::start(udp);
    let mut via = server_info.clone();
    via["connectionInfo"][0]["transportInfo"]["port"] = json!(rec.addr.port());
    tell_rust(&mut other, &via);
    let (_, rx) = server.on_channel("public.both.*", 16);
    let server_box = server.box_id().to_string();
    let server_sign = server.sign_id();
    // Both send at once.
    js.cmd(
        json!({"cmd": "send", "id": 1, "to": server_box, "topic": "both.js",
        "protocol": "ms", "payload": "from js"}),
    );
    assert!(other
        .messaging()
        .send("both.rust", server_sign, &"from rust")
        .is_ok());
    let mut seen = HashSet::new();
    let end = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 {
        assert!(Instant::now() < end, "only {seen:?} arrived");
        poll(&mut server);
        poll(&mut other);
        js.drain();
        while let Ok(m) = rx.try_recv() {
            let who = match m.sender {
                Address::Node(s) if s == other.sign_id() => "rust",
                Address::Node(s) if s.to_string() == js.sign_id() => "js",
                ref s => panic!("unexpected sender {s}"),
            };
            assert_eq!(m.topic, format!("both.{who}"));
            seen.insert(who);
        }
    }
    // And replies go back on each peer's own framing.
    let (_, back) = other.on_channel("public.back", 4);
    assert!(server.messaging().send("back", other.sign_id(), &1).is_ok());
    assert!(server
        .messaging()
        .send("back", js.box_id().as_str(), &2)
        .is_ok());
    let mut got_rust = false;
    let end = Instant::now() + Duration::from_secs(20);
    while !got_rust {
        assert!(
            Instant::now() < end,
            "the reply to the Rust peer did not arrive"
        );
        poll(&mut server);
        poll(&mut other);
        js.drain();
        got_rust |= back.try_recv().is_ok();
    }
    {
        let s = &mut server;
        js.wait_for(
            Duration::from_secs(20),
            || poll(s),
            |v| v["event"] == "message" && v["topic"] == "back",
        );
    }
    let bytes = rec.first_bytes.lock().unwrap().clone();
    assert!(!bytes.is_empty());
    assert!(
        bytes.iter().all(|&b| b == b'Q'),
        "Rust-to-Rust datagrams must be native CurveCP client packets: {bytes:?}"
    );
    assert!(js.alive());
}

/// A JavaScript node we have no nodeInfo of is reported by its boxId (and `directory.get` is
/// asked); once the directory maps it, by its signId.
#[test]
fn unknown_js_sender_is_reported_by_box_id_until_mapped() {
    let Some(_turn) = js_turn("unknown_js_sender_is_reported_by_box_id_until_mapped") else {
        return;
    };
    let mut js = JsPeer::spawn(&["--no-tcp"]);
    let mut rust = rust_node(Identity::generate(), &[]);
    tell_js(&mut js, &only(&rust.node_info().to_json(), "udp"));
    let (_, rx) = rust.on_channel("public.who.*", 8);
    let (_, asks) = rust.on_channel("self.directory.get", 8);
    let our_box = rust.box_id().to_string();
    js.cmd(
        json!({"cmd": "send", "id": 1, "to": our_box, "topic": "who.first",
        "protocol": "ms", "payload": 1}),
    );
    let first = recv(&mut rust, &mut js, &rx);
    let js_box: mm_platform::identity::BoxId = js.box_id().parse().unwrap();
    assert_eq!(first.sender, Address::Box(js_box));
    assert_eq!(first.sender.to_string(), js.box_id());
    let ask = asks.try_recv().expect("directory.get asked");
    assert_eq!(ask.json::<String>().unwrap(), js.box_id());
    // A reply to the boxId goes out on what we know (its connection to us).
    assert!(rust
        .messaging()
        .send(
            "directory.getReply",
            "local",
            &json!({"key": js.box_id(), "value": js.sign_id()})
        )
        .is_ok());
    js.cmd(
        json!({"cmd": "send", "id": 2, "to": our_box, "topic": "who.second",
        "protocol": "ms", "payload": 2}),
    );
    let second = recv(&mut rust, &mut js, &rx);
    assert_eq!(second.sender, Address::Node(js.sign_id().parse().unwrap()));
}

fn recv(rust: &mut Platform, js: &mut JsPeer, rx: &Receiver<Message>) -> Message {
    recv_within(rust, js, rx, Duration::from_secs(20), "a message")
}

/// The next message `rx` gets while the Rust node and the JS peer both run, within `limit`.
fn recv_within(
    rust: &mut Platform,
    js: &mut JsPeer,
    rx: &Receiver<Message>,
    limit: Duration,
    what: &str,
) -> Message {
    let mut msg = None;
    pump_until(rust, limit, what, || {
        js.drain();
        msg = rx.try_recv().ok();
        msg.is_some()
    });
    msg.unwrap()
}

/// A data directory written by a JavaScript node (kad-fs: one file per key, `identity` the
/// base64 of the 64-byte secret key) opens as that node's identity.
#[test]
fn js_data_directory_opens_as_its_identity() {
    let Some(_turn) = js_turn("js_data_directory_opens_as_its_identity") else {
        return;
    };
    let dir = TempDir::new("js-data");
    let data = dir.path("node");
    let sign = {
        let mut js = JsPeer::spawn(&["--data", data.to_str().unwrap(), "--no-tcp"]);
        let s = js.sign_id();
        js.cmd(json!({"cmd": "quit"}));
        // Its files are complete once it has exited (reading them earlier raced its writes:
        // once, `Identity(Corrupt)`).
        assert!(
            js.wait_exit(Duration::from_secs(10)),
            "the JS node did not quit"
        );
        s
    };
    assert!(data.join("identity").is_file());
    let p = Platform::builder()
        .storage(FileStore::open(&data).unwrap())
        .transports(false)
        .build()
        .unwrap();
    assert_eq!(p.sign_id().to_string(), sign);
    // And the JavaScript node still opens it after we did.
    drop(p);
    let mut js = JsPeer::spawn(&["--data", data.to_str().unwrap(), "--no-tcp"]);
    assert_eq!(js.sign_id(), sign);
    assert!(js.alive());
}

/// A Rust node offering relaying (`"relay": true` on its UDP endpoint), described to a
/// JavaScript node by a nodeInfo that lists an `mm-relay` endpoint first (a transport type no
/// JS node knows) and then that UDP endpoint: the JS node neither crashes on it nor on the
/// unknown field, and reaches the Rust node through the UDP endpoint; messages go both ways.
/// Needs the cargo feature `relay` (the Rust node offers relaying).
#[cfg(feature = "relay")]
#[test]
fn js_node_skips_relayed_endpoints_and_uses_the_udp_one() {
    let Some(_turn) = js_turn("js_node_skips_relayed_endpoints_and_uses_the_udp_one") else {
        return;
    };
    let mut js = JsPeer::spawn(js_flags("udp"));
    let net = mm_platform::NetConfig {
        relay: Some(Default::default()),
        ..Default::default()
    };
    let mut rust = Platform::builder()
        .identity(Identity::generate())
        .storage(MemStore::new())
        .friends([js.sign_id().parse().expect("signId")])
        .net(net)
        .build()
        .expect("platform");
    tell_rust(&mut rust, &js.node_info.clone());
    let mut info = only(&rust.node_info().to_json(), "udp");
    assert_eq!(
        info["connectionInfo"][0]["transportInfo"]["relay"], true,
        "{info}"
    );
    // A relayed endpoint through a "relay" that only counts what reaches it (nothing must).
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    relay.set_nonblocking(true).unwrap();
    let relayed = json!({"transportType": "mm-relay",
        "transportInfo": {"address": "127.0.0.1", "port": relay.local_addr().unwrap().port()}});
    info["connectionInfo"]
        .as_array_mut()
        .unwrap()
        .insert(0, relayed);
    tell_js(&mut js, &info);
    assert!(js.alive(), "the JS node survived the nodeInfo");
    let (_, rx) = rust.on_channel("*.test.*", 64);

    // JS to Rust: through the UDP endpoint.
    let our_box = rust.box_id().to_string();
    js.cmd(
        json!({"cmd": "send", "id": 1, "to": our_box, "topic": "test.viaUdp",
        "protocol": "ms", "payload": {"n": 1}}),
    );
    let msg = recv_within(
        &mut rust,
        &mut js,
        &rx,
        Duration::from_secs(20),
        "the JS message",
    );
    assert_eq!(msg.sender, Address::Node(js.sign_id().parse().unwrap()));
    assert_eq!(msg.json::<Value>().unwrap(), json!({"n": 1}));
    {
        let r = &mut rust;
        js.wait_for(
            Duration::from_secs(20),
            || poll(r),
            |v| v["event"] == "sent" && v["id"] == 1,
        );
    }
    // Rust to JS.
    let js_box = js.box_id();
    assert!(rust
        .messaging()
        .send("test.back", js_box.as_str(), &json!({"n": 2}))
        .is_ok());
    {
        let r = &mut rust;
        js.wait_for(
            Duration::from_secs(20),
            || poll(r),
            |v| v["event"] == "message" && v["topic"] == "test.back",
        );
    }
    // Only the UDP endpoint was used: no connection went to the relayed one.
    for c in rust.connections() {
        assert_eq!(
            c.transport,
            mm_platform::proto::transport::TransportKind::Udp
        );
        assert!(!c.relayed, "{c:?}");
    }
    let mut buf = [0u8; 2048];
    assert!(
        relay.recv_from(&mut buf).is_err(),
        "nothing was sent to the relayed endpoint"
    );
    assert!(js.alive());
}

#[test]
fn js_node_given_ipv6_endpoints_keeps_working_over_ipv4() {
    let Some(_turn) = js_turn("js_node_given_ipv6_endpoints_keeps_working_over_ipv4") else {
        return;
    };
    if UdpSocket::bind("[::1]:0").is_err() {
        if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("no IPv6 loopback (::1) and MM_REQUIRE_NETNS=1");
        }
        mm_platform::proto::skip_test(
            "js_node_given_ipv6_endpoints_keeps_working_over_ipv4",
            "no IPv6 loopback address (::1)",
        );
        return;
    }
    // A dual-stack Rust node (listening on `::`), published as a node on `0.0.0.0` with a
    // global IPv6 address publishes itself: its IPv6 endpoint (`udp6`, which the JS node must
    // skip: given `udp` with an IPv6 address, 1tp's send fails with EINVAL and the process
    // dies) beside the IPv4 one, in each order.
    let port = UdpSocket::bind("[::]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for v6_first in [true, false] {
        let mut js = JsPeer::spawn(js_flags("udp"));
        let mut rust = Platform::builder()
            .identity(Identity::generate())
            .storage(MemStore::new())
            .friends([js.sign_id().parse().expect("signId")])
            .connection_info(json!([{"transportType": "udp",
                "transportInfo": {"address": "::", "port": port, "framing": "native"}}]))
            .build()
            .expect("platform");
        tell_rust(&mut rust, &js.node_info.clone());
        let mut info = rust.node_info().to_json();
        let v4 = json!({"transportType": "udp",
            "transportInfo": {"address": "127.0.0.1", "port": port, "framing": "native"}});
        let v6 = mm_platform::Endpoint::native(
            mm_platform::TransportKind::Udp,
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        )
        .to_json();
        assert_eq!(v6["transportType"], "udp6");
        info["connectionInfo"] = if v6_first {
            json!([v6, v4])
        } else {
            json!([v4, v6])
        };
        tell_js(&mut js, &info);
        assert!(js.alive(), "the JS node survived the nodeInfo");
        let (_, rx) = rust.on_channel("*.test.*", 64);
        let our_box = rust.box_id().to_string();
        js.cmd(
            json!({"cmd": "send", "id": 1, "to": our_box, "topic": "test.dual",
            "protocol": "ms", "payload": {"v6First": v6_first}}),
        );
        let msg = recv_within(
            &mut rust,
            &mut js,
            &rx,
            Duration::from_secs(20),
            "the JS message",
        );
        assert_eq!(msg.json::<Value>().unwrap(), json!({"v6First": v6_first}));
        // And back, to the JS node's IPv4 endpoint, from the dual-stack socket.
        assert!(rust
            .messaging()
            .send("test.dualBack", js.box_id().as_str(), &json!({"n": 2}))
            .is_ok());
        {
            let r = &mut rust;
            js.wait_for(
                Duration::from_secs(20),
                || poll(r),
                |v| v["event"] == "message" && v["topic"] == "test.dualBack",
            );
        }
        assert!(js.alive());
    }
}
