//! The Mainline DHT service against libtorrent-rasterbar 2.0 (Debian's `python3-libtorrent`),
//! a real other side: a testnet of libtorrent `session` objects on 127.0.0.1 driven by
//! `tests/libtorrent_testnet.py` (no DHT bootstrap routers, no UPnP, NAT-PMP or LSD, and the
//! one-node-per-IP and node-id checks off for loopback: nothing it sends leaves 127.0.0.1).
//!
//! - Our node publishes its nodeInfo through the testnet, and libtorrent reads the BEP 44
//!   item back with `dht_get_mutable_item` (it checks the item's signature against the key
//!   itself before taking it): the value is our nodeInfo, at our `seq`.
//! - A second node of ours that knows only the testnet resolves the first through it and
//!   delivers a message to it.
//! - Relays (BEP 5): our relay announces its port under the relay info-hash and libtorrent's
//!   `dht_get_peers` finds it there; a libtorrent session announces itself there too (as a
//!   client of a torrent with that info-hash), and our node's relay search
//!   (`transports.findRelay`) finds both (`transports.relayAddresses`), asks them who they
//!   are, and connects to our relay, whose key only its who-is answer gave (libtorrent
//!   answers nothing).
//! - libtorrent checks BEP 44 signatures itself: a `put` (with a valid token) whose value does
//!   not match its signature is refused with error 206, the same `put` correctly signed is
//!   stored.
//!
//! The module is importable only by `/usr/bin/python3` (the interpreter Debian builds it
//! for), so that is what runs the driver. Without it the tests print a loud skip message, or
//! fail when `MM_REQUIRE_LIBTORRENT=1` (CI).

mod support;

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use mm_platform::identity::Identity;
use mm_platform::proto::mainline::item::{self, MutableItem};
use mm_platform::proto::mainline::krpc::{self, Fields, Kind, Message, Method};
use mm_platform::services::mainline::MainlineConfig;
use support::mainline::{hex, publisher, resolve_and_message, unhex};
use support::JsonProc;
use support::{libtorrent_available, PYTHON};

const LIMIT: Duration = Duration::from_secs(30);
/// Sessions of the libtorrent testnet.
const NODES: usize = 10;

/// A libtorrent testnet of [`NODES`] sessions on 127.0.0.1; returns it with the sessions'
/// addresses.
fn testnet(test: &str) -> Option<(JsonProc, Vec<SocketAddrV4>)> {
    testnet_on(test, false)
}

/// The same on `::1`: the IPv6 DHT of BEP 32.
fn testnet6(test: &str) -> Option<(JsonProc, Vec<std::net::SocketAddrV6>)> {
    testnet_on(test, true)
}

fn testnet_on<A: std::str::FromStr + std::fmt::Debug>(
    test: &str,
    ipv6: bool,
) -> Option<(JsonProc, Vec<A>)>
where
    A::Err: std::fmt::Debug,
{
    if !libtorrent_available(test) {
        return None;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/libtorrent_testnet.py");
    let mut cmd = Command::new(PYTHON);
    cmd.arg(script)
        .arg(NODES.to_string())
        .args(ipv6.then_some("ipv6"))
        .stderr(Stdio::inherit());
    let mut p = JsonProc::spawn("libtorrent_testnet.py", &mut cmd);
    let ready = p.wait_for(LIMIT, |v| v["lt"] == "ready");
    let names: Vec<&str> = ready["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(names.len(), NODES);
    let host = if ipv6 { "[::1]:" } else { "127.0.0.1:" };
    assert!(names.iter().all(|a| a.starts_with(host)), "{names:?}");
    let addrs: Vec<A> = names.iter().map(|a| a.parse().unwrap()).collect();
    eprintln!("{test}: libtorrent {} testnet {addrs:?}", ready["version"]);
    Some((p, addrs))
}

/// Asks the testnet for the item under `key` until one is found (at most `limit`).
fn lt_get(net: &mut JsonProc, key: &str, limit: Duration) -> Value {
    let end = Instant::now() + limit;
    let mut n = 0;
    loop {
        n += 1;
        net.cmd(json!({"cmd": "get", "id": n, "key": key, "timeout": 15}));
        let got = net.wait_for(LIMIT, |v| v["lt"] == "got" && v["id"] == n);
        if got["found"] == true {
            return got;
        }
        assert!(
            Instant::now() < end,
            "libtorrent never found the item of {key}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Asks the testnet's `dht_get_peers` for `info_hash` until `want` is among the peers (at
/// most `limit`); returns them.
#[cfg(feature = "relay")]
fn lt_peers_with(net: &mut JsonProc, info_hash: &str, want: &str, limit: Duration) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut n = 1000;
    loop {
        n += 1;
        net.cmd(json!({"cmd": "get_peers", "id": n, "info_hash": info_hash, "timeout": 3}));
        let got = net.wait_for(LIMIT, |v| v["lt"] == "peers" && v["id"] == n);
        let peers: Vec<String> = got["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_owned())
            .collect();
        if peers.iter().any(|p| p == want) {
            return peers;
        }
        assert!(
            Instant::now() < end,
            "libtorrent never found {want}: {peers:?}"
        );
    }
}

#[cfg(feature = "relay")]
#[test]
fn relays_announced_to_libtorrent_are_found_there_and_asked_who_they_are() {
    use mm_platform::proto::mainline::state::relay_info_hash;
    use mm_platform::services::mainline::Mainline;
    use mm_platform::{NetConfig, Platform};

    let test = "libtorrent mainline relays";
    let Some((mut net, addrs)) = testnet(test) else {
        return;
    };
    let service = Mainline::new(MainlineConfig::new(addrs[..3].to_vec()).publish(true));
    let stats = service.stats_handle();
    let relay_net = NetConfig {
        relay: Some(Default::default()),
        ..NetConfig::default()
    };
    let mut relay = Platform::builder()
        .net(relay_net)
        .service(service)
        .build()
        .unwrap();
    let relay_udp = relay
        .node_info()
        .endpoints
        .iter()
        .find(|e| e.offers_relay)
        .expect("a relay endpoint")
        .addr
        .to_string();
    let end = Instant::now() + LIMIT;
    while stats.get().relay_announces_acked == 0 {
        assert!(Instant::now() < end, "never announced: {:?}", stats.get());
        relay.poll(Some(Duration::from_millis(10))).unwrap();
    }
    eprintln!("{test}: relay {relay_udp} announced: {:?}", stats.get());
    // libtorrent finds our announcement; one of its sessions announces a port too.
    let ih = hex(&relay_info_hash());
    lt_peers_with(&mut net, &ih, &relay_udp, LIMIT);
    net.cmd(json!({"cmd": "announce", "id": 1, "info_hash": ih}));
    let lt_peer = net.wait_for(LIMIT, |v| v["lt"] == "announced")["peer"]
        .as_str()
        .unwrap()
        .to_owned();
    lt_peers_with(&mut net, &ih, &lt_peer, LIMIT);

    // Our node's relay search finds both through libtorrent's nodes only.
    let service = Mainline::new(MainlineConfig::new(addrs[6..].to_vec()));
    let fstats = service.stats_handle();
    let mut finder = Platform::builder().service(service).build().unwrap();
    let (_, found) = finder.on_channel("self.transports.relayAddresses", 8);
    let end = Instant::now() + LIMIT;
    let mut seen: Vec<String> = Vec::new();
    let mut asked_at = None::<Instant>;
    while !(seen.contains(&relay_udp) && seen.contains(&lt_peer)) {
        assert!(
            Instant::now() < end,
            "search found {seen:?}: {:?}",
            fstats.get()
        );
        // A search that found nothing yet (libtorrent's announcement spreads) is asked again.
        if asked_at.is_none_or(|t| t.elapsed() > Duration::from_secs(3)) {
            let _ = finder
                .messaging()
                .send("transports.findRelay", "local", &"");
            asked_at = Some(Instant::now());
        }
        finder.poll(Some(Duration::from_millis(10))).unwrap();
        relay.poll(Some(Duration::from_millis(5))).unwrap();
        while let Ok(m) = found.try_recv() {
            seen.extend(m.json::<Vec<String>>().unwrap());
        }
    }
    // The finder asked who they are: the relay answered, and the finder connects to it
    // with the key from that answer (a probe of the candidate).
    let relay_sign = relay.sign_id();
    let end = Instant::now() + LIMIT;
    while !finder
        .connections()
        .iter()
        .any(|c| c.peer == Some(relay_sign))
    {
        assert!(
            Instant::now() < end,
            "the finder never connected to the relay"
        );
        finder.poll(Some(Duration::from_millis(10))).unwrap();
        relay.poll(Some(Duration::from_millis(10))).unwrap();
    }
    eprintln!("{test}: found {seen:?}: {:?}", fstats.get());
    net.quit(LIMIT);
}

#[test]
fn over_ipv6_libtorrent_reads_our_item_and_ours_resolves_through_its_dht() {
    use mm_platform::services::mainline::Mainline;
    use mm_platform::Platform;

    let test = "libtorrent mainline interop over IPv6 (BEP 32)";
    let Some((mut net, addrs)) = testnet6(test) else {
        return;
    };
    // Our node joins the IPv6 DHT only, and publishes there.
    let config = MainlineConfig::new(Vec::new())
        .ipv6(addrs[..3].to_vec())
        .publish(true);
    let service = Mainline::new(config);
    let stats6 = service.stats6_handle();
    let mut publisher = Platform::builder().service(service).build().unwrap();
    let end = Instant::now() + LIMIT;
    while stats6.get().last_publish_stored == 0 {
        assert!(Instant::now() < end, "no publication: {:?}", stats6.get());
        publisher.poll(Some(Duration::from_millis(10))).unwrap();
    }
    let s = stats6.get();
    eprintln!(
        "{test}: stored on {} IPv6 nodes: {s:?}",
        s.last_publish_stored
    );
    // libtorrent's IPv6 sessions read it back (signature checked on their side).
    let key = hex(publisher.sign_id().as_bytes());
    let got = lt_get(&mut net, &key, LIMIT);
    assert_eq!(got["seq"].as_i64(), Some(s.seq), "{got}");
    let value: Value = serde_json::from_slice(&unhex(got["value"].as_str().unwrap()))
        .expect("our item's value is a JSON nodeInfo");
    assert_eq!(value["signId"], publisher.node_info().to_json()["signId"]);
    // A node that knows only other IPv6 sessions resolves ours and delivers a message.
    let r = resolve_and_message(
        test,
        &mut publisher,
        MainlineConfig::new(Vec::new()).ipv6(addrs[6..].to_vec()),
        "libtorrent over IPv6",
        LIMIT,
    );
    assert!(r.replies > 0, "{r:?}");
    net.poll_lines();
    assert!(
        !net.seen.iter().any(|v| v["lt"] == "error"),
        "the driver reported errors: {:?}",
        net.seen
    );
    net.quit(LIMIT);
}

#[test]
fn libtorrent_reads_our_item_and_resolves_ours_for_a_message() {
    let test = "libtorrent mainline interop";
    let Some((mut net, addrs)) = testnet(test) else {
        return;
    };
    // Our node publishes through the libtorrent testnet.
    let (mut publisher, s) = publisher(test, MainlineConfig::new(addrs[..3].to_vec()), LIMIT);

    // libtorrent reads our item (dht_get_mutable_item checks the signature itself).
    let key = hex(publisher.sign_id().as_bytes());
    let got = lt_get(&mut net, &key, LIMIT);
    eprintln!("{test}: libtorrent got {got}");
    assert_eq!(got["seq"].as_i64(), Some(s.seq), "{got}");
    assert_eq!(got["signature"].as_str().map(str::len), Some(128), "{got}");
    let value: Value = serde_json::from_slice(&unhex(got["value"].as_str().unwrap()))
        .expect("our item's value is a JSON nodeInfo");
    let ours = publisher.node_info().to_json();
    assert_eq!(value["signId"], ours["signId"], "{value}");
    assert_eq!(value["boxId"], ours["boxId"], "{value}");
    assert_eq!(value["connectionInfo"], ours["connectionInfo"], "{value}");

    // A node that knows only the libtorrent testnet (other sessions than the publisher's
    // bootstrap) resolves ours through it, then talks to it.
    let r = resolve_and_message(
        test,
        &mut publisher,
        MainlineConfig::new(addrs[6..].to_vec()),
        "libtorrent",
        LIMIT,
    );
    assert!(r.replies > 0, "{r:?}");
    net.poll_lines();
    assert!(
        !net.seen.iter().any(|v| v["lt"] == "error"),
        "the driver reported errors: {:?}",
        net.seen
    );
    net.quit(LIMIT);
}

/// Sends `q` to `to` and returns its answer (within two seconds, or `None`).
fn ask(sock: &UdpSocket, to: SocketAddrV4, q: &Message) -> Option<Message> {
    sock.send_to(&krpc::encode(q).unwrap(), to).unwrap();
    let mut buf = [0u8; 1500];
    let end = Instant::now() + Duration::from_secs(2);
    // Bounded: two seconds of reads.
    while Instant::now() < end {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from == SocketAddr::V4(to) {
                let m = krpc::decode(&buf[..n]).expect("its answer decodes");
                if m.t == q.t {
                    return Some(m);
                }
            }
        }
    }
    None
}

#[test]
fn libtorrent_refuses_a_put_whose_signature_does_not_verify() {
    let test = "libtorrent checks BEP 44 signatures";
    let Some((net, addrs)) = testnet(test) else {
        return;
    };
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let me = [0x5a; 20];
    let who = Identity::generate();
    let signed = MutableItem::sign(
        who.sign_keypair(),
        b"",
        7,
        item::string_value(br#"{"genuine":true}"#),
    )
    .unwrap();
    // A token for the item's target, from the node we put to.
    let get = Message::query(
        vec![1, 2, 3, 4],
        Method::Get,
        Fields {
            id: Some(me),
            target: Some(signed.target()),
            ..Fields::default()
        },
        false,
    );
    let got = ask(&sock, addrs[2], &get).expect("libtorrent answers a get");
    assert_eq!(got.kind, Kind::Response, "{got:?}");
    let token = got.fields.token.clone().expect("a token");
    let put = |t: u8, v: Vec<u8>| {
        let mut f = Fields {
            id: Some(me),
            token: Some(token.clone()),
            ..Fields::default()
        };
        signed.fill(&mut f);
        f.v = Some(v);
        Message::query(vec![t, 0, 0, 1], Method::Put, f, false)
    };
    // The signature is over another value than the one sent.
    let forged = ask(
        &sock,
        addrs[2],
        &put(5, item::string_value(br#"{"genuine":false}"#)),
    )
    .expect("libtorrent answers a forged put");
    eprintln!("{test}: forged put -> {:?}", forged.kind);
    assert!(
        matches!(forged.kind, Kind::Error(206, _)),
        "a bad signature is refused: {forged:?}"
    );
    let genuine = ask(
        &sock,
        addrs[2],
        &put(6, item::string_value(br#"{"genuine":true}"#)),
    )
    .expect("libtorrent answers the genuine put");
    eprintln!("{test}: genuine put -> {:?}", genuine.kind);
    assert_eq!(genuine.kind, Kind::Response, "{genuine:?}");
    net.quit(LIMIT);
}
