//! Dual-stack listeners and Happy Eyeballs dialling (RFC 8305), on the loopback addresses of
//! both families (`::1`, `127.0.0.1`; nothing leaves the machine): a peer listening on `::`
//! takes both families and sees IPv4 peers as IPv4 addresses; a peer published on both
//! families is reached over IPv6 when both answer, and over IPv4 within a second when its IPv6
//! address is a black hole (a socket that never answers, so no ICMP error hurries the
//! fallback); single-family peers are reached on their family.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use mm_platform::{ConnectionStats, Message, NetConfig, Platform};
use serde_json::{json, Value};

fn poll_all(ps: &mut [&mut Platform]) {
    for p in ps.iter_mut() {
        p.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

/// Whether this machine has IPv6 loopback (containers may not).
fn have_ipv6(test: &str) -> bool {
    if UdpSocket::bind("[::1]:0").is_ok() {
        return true;
    }
    if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: no IPv6 loopback (::1) and MM_REQUIRE_NETNS=1");
    }
    mm_platform::proto::skip_test(test, "no IPv6 loopback address (::1)");
    false
}

/// A platform whose UDP listener is `udp` (native framing), no TCP.
fn listening(udp: &str) -> Platform {
    let addr: SocketAddr = udp.parse().unwrap();
    Platform::builder()
        .connection_info(json!([{"transportType": "udp",
            "transportInfo": {"address": addr.ip().to_string(), "port": addr.port(),
                "framing": "native"}}]))
        .build()
        .unwrap()
}

/// `b`'s nodeInfo with its endpoints replaced by native UDP ones at `addrs`.
fn info_with(b: &Platform, addrs: &[SocketAddr]) -> Value {
    let mut info = b.node_info().to_json();
    info["connectionInfo"] = addrs
        .iter()
        .map(|a| {
            json!({"transportType": "udp",
                "transportInfo": {"address": a.ip().to_string(), "port": a.port(),
                    "framing": "native"}})
        })
        .collect();
    info
}

/// The port `p` listens on (UDP).
fn udp_port(p: &Platform) -> u16 {
    p.connection_info()[0]["transportInfo"]["port"]
        .as_u64()
        .unwrap() as u16
}

/// `a` sends one message to `b`, given `b`'s nodeInfo with its endpoints at `addrs`; returns the time to delivery and `a`'s
/// connection to `b`.
fn deliver(
    a: &mut Platform,
    b: &mut Platform,
    addrs: &[SocketAddr],
) -> (Duration, ConnectionStats) {
    let info = info_with(b, addrs);
    let _ = a.messaging().send("transports.nodeInfo", "local", &info);
    let (_, rx) = b.messaging().on_channel("public.he.*", 4);
    let start = Instant::now();
    a.messaging().send("he.hello", b.sign_id(), &1).unwrap();
    let mut got: Vec<Message> = Vec::new();
    let end = start + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < end {
        poll_all(&mut [a, b]);
        got.extend(rx.try_iter());
    }
    let took = start.elapsed();
    assert_eq!(got.len(), 1, "not delivered in 10 s");
    let conns = a.connections();
    let c = conns
        .into_iter()
        .find(|c| c.active && c.peer == Some(b.sign_id()))
        .expect("an active connection to b");
    (took, c)
}

#[test]
fn a_dual_stack_peer_is_reached_over_ipv6_and_sees_ipv4_peers_as_ipv4() {
    let test = "happy eyeballs: dual stack";
    if !have_ipv6(test) {
        return;
    }
    // A port free on both families (a node on `::` publishes no endpoint until a peer tells
    // it its address, so the port is chosen here).
    let port = {
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let mut b = listening(&format!("[::]:{port}"));
    // Listed IPv4 first: the order of the nodeInfo does not matter, IPv6 is tried first.
    let both = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ];
    let mut a = Platform::builder().build().unwrap();
    let (_, c) = deliver(&mut a, &mut b, &both);
    assert_eq!(c.remote, Some(both[1]), "{c:?}");
    assert!(!c.relayed);

    // An IPv4 peer of the dual-stack listener is seen at its IPv4 address (not ::ffff:...).
    let mut v4 = Platform::builder().build().unwrap();
    let (_, c) = deliver(&mut v4, &mut b, &both[..1]);
    assert_eq!(c.remote, Some(both[0]), "{c:?}");
    let seen = b
        .connections()
        .into_iter()
        .find(|c| c.peer == Some(v4.sign_id()))
        .expect("b's connection from the IPv4 peer");
    let remote = seen.remote.expect("remote");
    assert!(remote.is_ipv4(), "{remote}");
    assert!(remote.ip().is_loopback(), "{remote}");
}

#[test]
fn a_blackholed_ipv6_endpoint_falls_back_to_ipv4_within_a_second() {
    let test = "happy eyeballs: IPv6 black hole";
    if !have_ipv6(test) {
        return;
    }
    let mut b = listening("127.0.0.1:0");
    let v4 = SocketAddr::from(([127, 0, 0, 1], udp_port(&b)));
    // Bound and never read: datagrams vanish, no ICMP error comes back.
    let hole = UdpSocket::bind("[::1]:0").unwrap();
    let v6 = hole.local_addr().unwrap();
    let mut a = Platform::builder()
        .net(NetConfig {
            connect_timeout: Duration::from_secs(5),
            ..NetConfig::default()
        })
        .build()
        .unwrap();
    let (took, c) = deliver(&mut a, &mut b, &[v6, v4]);
    assert_eq!(c.remote, Some(v4), "{c:?}");
    // The head start is 250 ms; without the race this would wait the 5 s connect timeout.
    eprintln!("black-holed IPv6: delivered over IPv4 after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    drop(hole);

    // Without Happy Eyeballs the black hole costs a whole connection attempt.
    let mut slow = Platform::builder()
        .net(NetConfig {
            connect_timeout: Duration::from_millis(1500),
            happy_eyeballs: None,
            ..NetConfig::default()
        })
        .build()
        .unwrap();
    let hole = UdpSocket::bind("[::1]:0").unwrap();
    let v6 = hole.local_addr().unwrap();
    let (took, c) = deliver(&mut slow, &mut b, &[v6, v4]);
    eprintln!("black-holed IPv6, no race: delivered over IPv4 after {took:?}");
    assert_eq!(c.remote, Some(v4), "{c:?}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
}

#[test]
fn single_family_peers_are_reached_on_their_family() {
    let test = "happy eyeballs: single family";
    if !have_ipv6(test) {
        return;
    }
    let mut a = Platform::builder().build().unwrap();
    let mut v6_only = listening("[::1]:0");
    let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, udp_port(&v6_only)));
    let (_, c) = deliver(&mut a, &mut v6_only, &[v6]);
    assert_eq!(c.remote, Some(v6));
    let mut v4_only = listening("127.0.0.1:0");
    let v4 = SocketAddr::from(([127, 0, 0, 1], udp_port(&v4_only)));
    let (_, c) = deliver(&mut a, &mut v4_only, &[v4]);
    assert_eq!(c.remote, Some(v4));
}

#[test]
fn a_listener_on_0_0_0_0_takes_both_families_unless_ipv6_is_off() {
    let test = "happy eyeballs: 0.0.0.0 widened";
    if !have_ipv6(test) {
        return;
    }
    let free = || {
        let s = UdpSocket::bind("[::]:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let v6 = |port| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let v4 = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let port = free();
    let mut b = listening(&format!("0.0.0.0:{port}"));
    let mut a = Platform::builder().build().unwrap();
    let (_, c) = deliver(&mut a, &mut b, &[v6(port)]);
    assert_eq!(c.remote, Some(v6(port)), "reached over IPv6");
    let mut a4 = Platform::builder().build().unwrap();
    let (_, c) = deliver(&mut a4, &mut b, &[v4(port)]);
    assert_eq!(c.remote, Some(v4(port)), "and over IPv4");

    // IPv6 off: 0.0.0.0 stays IPv4 only, and a dialler skips IPv6 endpoints.
    let port = free();
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let mut b = Platform::builder()
        .net(NetConfig {
            ipv6: false,
            ..NetConfig::default()
        })
        .connection_info(json!([{"transportType": "udp",
            "transportInfo": {"address": "0.0.0.0", "port": addr.port(), "framing": "native"}}]))
        .build()
        .unwrap();
    assert!(
        UdpSocket::bind(v6(port)).is_ok(),
        "nothing listens on IPv6 at that port"
    );
    let mut a = Platform::builder()
        .net(NetConfig {
            ipv6: false,
            ..NetConfig::default()
        })
        .build()
        .unwrap();
    let (_, c) = deliver(&mut a, &mut b, &[v6(port), v4(port)]);
    assert_eq!(c.remote, Some(v4(port)), "{c:?}");
}
