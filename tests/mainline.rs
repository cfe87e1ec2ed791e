//! The Mainline DHT service on real sockets, without JavaScript:
//!
//! - a DHT made of our own services in serving mode (not read-only): one platform publishes
//!   its nodeInfo, another resolves it (source `mainline`), and the items sit on 8 nodes;
//! - hostile replies on a real socket from a fake DHT node (malformed, oversized, floods of
//!   replies with unknown transaction ids, forged items, nodes lists pointing off this
//!   machine): nothing invalid is published, the counters say why, outstanding queries stay
//!   bounded, and a genuine item afterwards is still resolved;
//! - the service refuses to start without bootstrap addresses (there is no default list).

mod support;

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::Value;

use mm_platform::identity::Identity;
use mm_platform::proto::mainline::item;
use mm_platform::proto::mainline::krpc::{self, CompactNode, Fields, Kind, Message, Method};
use mm_platform::services::mainline::{Mainline, MainlineConfig, MainlineStats, Timing};
use mm_platform::{Event, Platform};

const LIMIT: Duration = Duration::from_secs(30);

fn node_infos(p: &mut Platform) -> Vec<(String, Value)> {
    p.drain_events()
        .filter_map(|e| match e {
            Event::NodeInfo { source, node_info } => Some((source, node_info)),
            _ => None,
        })
        .collect()
}

/// Twelve serving DHT nodes on 127.0.0.1, each bootstrapped from the others, with their
/// addresses and counters. The ports are chosen free and then bound: another test may take
/// one in between, so a set that cannot be bound is chosen again (at most 5 times).
fn serving_dht() -> (
    Vec<Platform>,
    Vec<SocketAddrV4>,
    Vec<mm_platform::services::Shared<MainlineStats>>,
) {
    for _ in 0..5 {
        let ports: Vec<u16> = (0..12).map(|_| support::free_port(false)).collect();
        let addrs: Vec<SocketAddrV4> = ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect();
        let mut stats = Vec::new();
        let built: Result<Vec<Platform>, _> = addrs
            .iter()
            .map(|a| {
                let mut c = MainlineConfig::new(addrs.iter().copied().filter(|b| b != a).collect());
                c.serve = true;
                c.bind = Some(*a);
                let s = Mainline::new(c);
                stats.push(s.stats_handle());
                Platform::builder().transports(false).service(s).build()
            })
            .collect();
        match built {
            Ok(dht) => return (dht, addrs, stats),
            Err(e) => eprintln!("a DHT node could not bind ({e}); choosing ports again"),
        }
    }
    panic!("no set of free ports could be bound");
}

#[test]
fn a_dht_of_our_serving_services_stores_and_returns_nodeinfo() {
    let (mut dht, addrs, stats) = serving_dht();
    // Let the DHT nodes find each other first.
    let end = Instant::now() + LIMIT;
    while stats.iter().any(|s| s.get().table < 8) {
        assert!(Instant::now() < end, "the DHT did not form");
        for p in dht.iter_mut() {
            p.poll(Some(Duration::from_millis(1))).unwrap();
        }
    }
    let publisher_service = Mainline::new(MainlineConfig::new(addrs[..2].to_vec()).publish(true));
    let pub_stats = publisher_service.stats_handle();
    let mut publisher = Platform::builder()
        .service(publisher_service)
        .build()
        .unwrap();
    let end = Instant::now() + LIMIT;
    while pub_stats.get().publishes == 0 {
        assert!(
            Instant::now() < end,
            "no publication: {:?}",
            pub_stats.get()
        );
        publisher.poll(Some(Duration::from_millis(1))).unwrap();
        for p in dht.iter_mut() {
            p.poll(Some(Duration::ZERO)).unwrap();
        }
    }
    assert_eq!(
        pub_stats.get().last_publish_stored,
        8,
        "{:?}",
        pub_stats.get()
    );
    assert_eq!(stats.iter().map(|s| s.get().stored).sum::<usize>(), 8);

    let resolver_service = Mainline::new(MainlineConfig::new(vec![addrs[7]]));
    let mut resolver = Platform::builder()
        .transports(false)
        .service(resolver_service)
        .build()
        .unwrap();
    let _ = resolver.messaging().send(
        "transports.requestNodeInfo",
        "local",
        &publisher.sign_id().to_string(),
    );
    let end = Instant::now() + LIMIT;
    let found = loop {
        assert!(Instant::now() < end, "not resolved");
        resolver.poll(Some(Duration::from_millis(1))).unwrap();
        publisher.poll(Some(Duration::ZERO)).unwrap();
        for p in dht.iter_mut() {
            p.poll(Some(Duration::ZERO)).unwrap();
        }
        if let Some(f) = node_infos(&mut resolver).into_iter().next() {
            break f;
        }
    };
    assert_eq!(found.0, "mainline");
    assert_eq!(found.1, publisher.node_info().to_json());

    // No bootstrap addresses: the service is refused.
    let err = Platform::builder()
        .transports(false)
        .service(Mainline::new(MainlineConfig::new(Vec::new())))
        .build();
    assert!(err.is_err());
}

/// A fake DHT node: reads our service's queries, answers as told.
struct Fake {
    sock: UdpSocket,
    addr: SocketAddrV4,
}

impl Fake {
    fn new() -> Fake {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let addr = match sock.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        Fake { sock, addr }
    }

    /// The next query of the given method, polling `p` meanwhile.
    fn next(&self, p: &mut Platform, method: Method) -> (Message, std::net::SocketAddr) {
        let end = Instant::now() + LIMIT;
        let mut buf = [0u8; 2048];
        loop {
            assert!(Instant::now() < end, "no {method:?} query");
            p.poll(Some(Duration::from_millis(1))).unwrap();
            if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
                let m = krpc::decode(&buf[..n]).expect("our queries decode");
                assert!(m.ro, "read-only");
                if m.kind == Kind::Query(method.clone()) {
                    return (m, from);
                }
            }
        }
    }

    fn reply(&self, to: std::net::SocketAddr, q: &Message, fields: Fields) {
        let b = krpc::encode(&Message::response(q.t.clone(), fields)).unwrap();
        self.sock.send_to(&b, to).unwrap();
    }
}

fn item_fields(signer: &Identity, info: &Value, seq: i64) -> Fields {
    let v = item::string_value(&serde_json::to_vec(info).unwrap());
    let it = item::MutableItem::sign(signer.sign_keypair(), b"", seq, v).unwrap();
    let mut f = Fields {
        id: Some([7; 20]),
        token: Some(b"tk".to_vec()),
        ..Fields::default()
    };
    it.fill(&mut f);
    f
}

fn settle(p: &mut Platform, stats: &mm_platform::services::Shared<MainlineStats>) -> MainlineStats {
    for _ in 0..50 {
        p.poll(Some(Duration::from_millis(2))).unwrap();
    }
    stats.get()
}

#[test]
fn hostile_replies_on_a_real_socket_change_nothing() {
    let fake = Fake::new();
    let mut config = MainlineConfig::new(vec![fake.addr]);
    config.timing = Timing {
        query_timeout: Duration::from_millis(500),
        slow_after: Duration::from_millis(200),
        ..Timing::default()
    };
    let service = Mainline::new(config);
    let stats = service.stats_handle();
    let mut p = Platform::builder()
        .transports(false)
        .service(service)
        .build()
        .unwrap();
    let (boot, from) = fake.next(&mut p, Method::FindNode);

    // Junk, oversized, and a flood of replies with transaction ids never used.
    for junk in [
        &b"garbage"[..],
        b"d1:t2:",
        b"le",
        &[b'd'; 1400],
        &[b'x'; 1600],
    ] {
        fake.sock.send_to(junk, from).unwrap();
    }
    for i in 0..5_000u32 {
        let f = Fields {
            id: Some([1; 20]),
            ..Fields::default()
        };
        let b = krpc::encode(&Message::response((i + 70_000).to_be_bytes().to_vec(), f)).unwrap();
        let _ = fake.sock.send_to(&b, from);
        if i % 100 == 0 {
            p.poll(Some(Duration::ZERO)).unwrap();
        }
    }
    // (The kernel may drop some of the flood when the socket's buffer is full.)
    let s = settle(&mut p, &stats);
    assert_eq!(s.malformed, 5, "{s:?}");
    assert!(s.unexpected >= 1_000, "{s:?}");
    assert_eq!(s.replies, 0, "{s:?}");
    // The bootstrap reply: nodes off this machine, and the fake itself.
    let nodes = (0..16u8)
        .map(|i| CompactNode {
            id: [i + 1; 20],
            addr: SocketAddrV4::new(std::net::Ipv4Addr::new(203, 0, 113, i), 6881).into(),
        })
        .collect();
    fake.reply(
        from,
        &boot,
        Fields {
            id: Some([9; 20]),
            nodes,
            ..Fields::default()
        },
    );
    let s = settle(&mut p, &stats);
    assert_eq!(s.replies, 1, "{s:?}");
    assert_eq!(s.table, 1, "only the node that answered: {s:?}");
    assert_eq!(
        s.queries_sent, 1,
        "nothing sent to the off-machine nodes: {s:?}"
    );
    assert!(node_infos(&mut p).is_empty());

    // Forged items, one per lookup, then the genuine one.
    let a = Identity::generate();
    let c = Identity::generate();
    let good = serde_json::json!({"signId": a.sign_id().to_string(), "boxId": a.box_id().to_string(),
        "connectionInfo": [{"transportType": "udp", "transportInfo": {"address": "127.0.0.1", "port": 9}}]});
    let mut bad_sig = item_fields(&a, &good, 5);
    bad_sig.sig.as_mut().unwrap()[1] ^= 4;
    let theirs = serde_json::json!({"signId": c.sign_id().to_string(), "boxId": c.box_id().to_string(),
        "connectionInfo": []});
    let forged = [
        bad_sig,
        item_fields(&a, &theirs, 5),
        item_fields(&c, &theirs, 5),
    ];
    for f in forged {
        let _ = p.messaging().send(
            "transports.requestNodeInfo",
            "local",
            &a.sign_id().to_string(),
        );
        let (get, from) = fake.next(&mut p, Method::Get);
        fake.reply(from, &get, f);
        let s = settle(&mut p, &stats);
        assert!(s.outstanding <= Timing::default().max_outstanding);
        assert_eq!(s.lookups, 0, "{s:?}");
        assert!(node_infos(&mut p).is_empty());
    }
    let s = stats.get();
    assert_eq!(s.items_bad_signature, 1, "{s:?}");
    assert_eq!(s.wrong_key, 1, "{s:?}");
    assert_eq!(s.items_wrong_target, 1, "{s:?}");
    assert_eq!(s.resolved, 0);

    let _ = p.messaging().send(
        "transports.requestNodeInfo",
        "local",
        &a.sign_id().to_string(),
    );
    let (get, from) = fake.next(&mut p, Method::Get);
    fake.reply(from, &get, item_fields(&a, &good, 5));
    let end = Instant::now() + LIMIT;
    let found = loop {
        assert!(Instant::now() < end, "genuine item not resolved");
        p.poll(Some(Duration::from_millis(2))).unwrap();
        if let Some(f) = node_infos(&mut p).into_iter().next() {
            break f;
        }
    };
    assert_eq!(found, ("mainline".to_owned(), good));
}
