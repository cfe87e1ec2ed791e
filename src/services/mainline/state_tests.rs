//! Tests of the sans-IO client: a simulated DHT of serving machines (datagrams passed in
//! memory, time advanced to the next deadline), and hand-made hostile replies.

use super::*;
use crate::identity::Identity;
use crate::services::mainline::krpc::CompactNode;
use serde_json::json;

pub(super) fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))
}

pub(super) fn info_of(id: &Identity, port: u16) -> Value {
    json!({"signId": id.sign_id().to_string(), "boxId": id.box_id().to_string(),
        "connectionInfo": [{"transportType": "udp",
            "transportInfo": {"address": "127.0.0.1", "port": port, "framing": "native"}}]})
}

pub(super) fn options(bootstrap: Vec<SocketAddr>, serve: bool) -> Options {
    Options {
        bootstrap,
        salt: Vec::new(),
        serve,
        timing: Timing::default(),
    }
}

/// Machines at loopback addresses exchanging datagrams in memory.
struct Sim {
    nodes: Vec<(SocketAddr, MainlineState)>,
    now: Instant,
    delivered: u64,
}

impl Sim {
    /// `n` serving machines on ports 1000.., each bootstrapped from all the others.
    fn new(n: u16) -> Sim {
        Sim::on(n, std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// [`Sim::new`] at the loopback address `ip` (`::1`: the IPv6 DHT of BEP 32).
    fn on(n: u16, ip: IpAddr) -> Sim {
        let now = Instant::now();
        let all: Vec<SocketAddr> = (0..n).map(|i| SocketAddr::new(ip, 1000 + i)).collect();
        let nodes = all
            .iter()
            .map(|a| {
                let others = all.iter().copied().filter(|b| b != a).collect();
                (*a, MainlineState::new(options(others, true), None, now))
            })
            .collect();
        Sim {
            nodes,
            now,
            delivered: 0,
        }
    }

    fn add(&mut self, port: u16, m: MainlineState) -> usize {
        let ip = self.nodes[0].0.ip();
        self.nodes.push((SocketAddr::new(ip, port), m));
        self.nodes.len() - 1
    }

    /// Delivers until quiet, then advances time to the next deadline; at most `turns` times,
    /// or until `done` holds.
    fn run(&mut self, turns: usize, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        for _ in 0..turns {
            for _ in 0..10_000 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    let now = self.now;
                    self.nodes[i].1.handle_timeout(now);
                    let from = self.nodes[i].0;
                    while let Some((to, bytes)) = self.nodes[i].1.poll_transmit() {
                        assert!(to.ip().is_loopback(), "sent to {to}");
                        moved = true;
                        if let Some(j) = self.nodes.iter().position(|(a, _)| *a == to) {
                            self.nodes[j].1.handle_datagram(&bytes, from, now);
                            self.delivered += 1;
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
            if done(self) {
                return true;
            }
            let next = self
                .nodes
                .iter()
                .filter_map(|(_, m)| m.next_deadline())
                .min();
            match next {
                Some(t) if t > self.now => self.now = t,
                Some(_) => {}
                None => return done(self),
            }
        }
        false
    }
}

#[test]
fn publish_and_resolve_through_a_simulated_dht() {
    let mut sim = Sim::new(20);
    assert!(sim.run(50, |s| s.nodes.iter().all(|(_, m)| m.stats().table >= 8)));
    // All twenty started at once and spent their serving allowance (a burst of 200 queries)
    // on each other; a second later it is back, so no query of the publication is dropped.
    sim.now += Duration::from_secs(2);
    let a = Identity::generate();
    let boot = vec![addr(1003), addr(1011)];
    let mut pa = MainlineState::new(
        options(boot.clone(), false),
        Some(a.sign_keypair().clone()),
        sim.now,
    );
    assert!(pa.set_my_node_info(&info_of(&a, 7000), 1_000, sim.now));
    assert_eq!(pa.take_seq_to_persist(), Some(1_000));
    let ia = sim.add(2000, pa);
    assert!(sim.run(200, |s| s.nodes[ia].1.stats().publishes >= 1));
    let st = sim.nodes[ia].1.stats();
    assert_eq!(st.last_publish_stored, 8, "{st:?}");
    assert_eq!(st.seq, 1_000);
    // Servers do not put read-only nodes in their tables.
    assert!(sim.nodes[..20].iter().all(|(_, m)| {
        m.table
            .closest(&[0; 20], 2000)
            .iter()
            .all(|n| n.addr != addr(2000))
    }));
    let stored = sim.nodes[..20]
        .iter()
        .filter(|(_, m)| m.stats().stored == 1)
        .count();
    assert_eq!(stored, 8);

    // Another client that knows only two testnet nodes resolves it.
    let mut pb = MainlineState::new(options(boot, false), None, sim.now);
    pb.request_node_info(&json!(a.sign_id().to_string()), sim.now);
    let ib = sim.add(2001, pb);
    let mut got = Vec::new();
    assert!(sim.run(200, |s| {
        while let Some(v) = s.nodes[ib].1.poll_publication() {
            got.push(v);
        }
        !got.is_empty()
    }));
    assert_eq!(got, vec![info_of(&a, 7000)]);

    // A changed nodeInfo gets a higher seq; once B's cache expired, B finds the new one.
    let now = sim.now;
    assert!(sim.nodes[ia]
        .1
        .set_my_node_info(&info_of(&a, 7001), 900, now));
    assert_eq!(sim.nodes[ia].1.stats().seq, 1_001);
    assert!(sim.run(200, |s| s.nodes[ia].1.stats().publishes >= 2));
    assert_eq!(sim.nodes[ia].1.stats().last_publish_stored, 8);
    let now = sim.now;
    sim.nodes[ib]
        .1
        .request_node_info(&json!(a.sign_id().to_string()), now);
    assert_eq!(
        sim.nodes[ib].1.poll_publication(),
        Some(info_of(&a, 7000)),
        "cached"
    );
    let later = now + Timing::default().cache_ttl;
    sim.now = later;
    sim.nodes[ib]
        .1
        .request_node_info(&json!(a.sign_id().to_string()), later);
    let mut got = Vec::new();
    assert!(sim.run(200, |s| {
        while let Some(v) = s.nodes[ib].1.poll_publication() {
            got.push(v);
        }
        !got.is_empty()
    }));
    assert_eq!(got, vec![info_of(&a, 7001)]);

    // Unknown keys are not found, and the lookup ends.
    let ghost = Identity::generate();
    let now = sim.now;
    sim.nodes[ib]
        .1
        .request_node_info(&json!(ghost.sign_id().to_string()), now);
    assert!(sim.run(200, |s| s.nodes[ib].1.stats().not_found >= 1));
    assert_eq!(sim.nodes[ib].1.stats().lookups, 0);

    // Republished before items expire, without anything changing.
    let before = sim.nodes[ia].1.stats().publishes;
    let deadline = sim.now + Timing::default().republish + Duration::from_secs(60);
    assert!(sim.run(10_000, |s| s.nodes[ia].1.stats().publishes > before
        || s.now > deadline));
    assert!(sim.nodes[ia].1.stats().publishes > before);
    assert_eq!(sim.nodes[ia].1.stats().seq, 1_001);
}

#[test]
fn a_lost_seq_is_overtaken_and_persisted_seq_rises() {
    let mut sim = Sim::new(12);
    assert!(sim.run(50, |s| s.nodes.iter().all(|(_, m)| m.stats().table >= 8)));
    let a = Identity::generate();
    let boot = vec![addr(1001)];
    let mut first = MainlineState::new(
        options(boot.clone(), false),
        Some(a.sign_keypair().clone()),
        sim.now,
    );
    first.set_last_seq(5_000);
    first.set_my_node_info(&info_of(&a, 1), 10, sim.now);
    assert_eq!(first.stats().seq, 5_001);
    let i = sim.add(2000, first);
    assert!(sim.run(200, |s| s.nodes[i].1.stats().publishes >= 1));
    // The same identity restarted without its stored seq and with a clock far behind.
    let mut again = MainlineState::new(
        options(boot, false),
        Some(a.sign_keypair().clone()),
        sim.now,
    );
    again.set_my_node_info(&info_of(&a, 2), 10, sim.now);
    assert_eq!(again.stats().seq, 10);
    let j = sim.add(2001, again);
    assert!(sim.run(200, |s| s.nodes[j].1.stats().publishes >= 1));
    let st = sim.nodes[j].1.stats();
    assert_eq!(st.seq, 5_002, "signed again above what the DHT held");
    assert!(st.last_publish_stored >= 1);
    assert_eq!(sim.nodes[j].1.take_seq_to_persist(), Some(5_002));
}

/// A client whose only bootstrap node is `fake`; returns it with its outgoing queries.
fn client(fake: SocketAddr, now: Instant) -> MainlineState {
    let mut m = MainlineState::new(options(vec![fake], false), None, now);
    m.handle_timeout(now);
    m
}

fn queries(m: &mut MainlineState) -> Vec<(SocketAddr, Message)> {
    let mut out = Vec::new();
    while let Some((to, b)) = m.poll_transmit() {
        let msg = krpc::decode(&b).expect("our queries decode");
        assert!(msg.ro, "read-only by default");
        out.push((to, msg));
    }
    out
}

fn reply_to(q: &Message, fields: Fields) -> Vec<u8> {
    krpc::encode(&Message::response(q.t.clone(), fields)).unwrap()
}

fn item_fields(signer: &Identity, info: &Value, seq: i64) -> Fields {
    let v = item::string_value(&serde_json::to_vec(info).unwrap());
    let it = MutableItem::sign(signer.sign_keypair(), b"", seq, v).unwrap();
    let mut f = Fields {
        id: Some([7; 20]),
        token: Some(b"tk".to_vec()),
        ..Fields::default()
    };
    it.fill(&mut f);
    f
}

#[test]
fn forged_items_are_refused_without_harm() {
    let now = Instant::now();
    let fake = addr(1500);
    let a = Identity::generate();
    let c = Identity::generate();
    let good = info_of(&a, 9);
    // Each forged answer to the get query: nothing is published, counters say why.
    let mut bad_sig = item_fields(&a, &good, 3);
    bad_sig.sig.as_mut().unwrap()[5] ^= 0x10;
    let mut other_target = item_fields(&c, &info_of(&c, 9), 3);
    other_target.id = Some([7; 20]);
    let cases: Vec<(&str, Fields)> = vec![
        ("bad signature", bad_sig),
        (
            "another key's nodeInfo",
            item_fields(&a, &info_of(&c, 9), 3),
        ),
        ("another key's item", other_target),
        (
            "forged boxId",
            item_fields(
                &a,
                &json!({"signId": a.sign_id().to_string(), "boxId": c.box_id().to_string(),
                    "connectionInfo": []}),
                3,
            ),
        ),
    ];
    for (what, fields) in cases {
        let mut m = client(fake, now);
        m.request_node_info(&json!(a.sign_id().to_string()), now);
        m.handle_timeout(now);
        let qs = queries(&mut m);
        let (_, get) = qs
            .iter()
            .find(|(_, q)| q.kind == Kind::Query(Method::Get))
            .expect("a get");
        m.handle_datagram(&reply_to(get, fields), fake, now);
        m.handle_timeout(now);
        assert_eq!(m.poll_publication(), None, "{what}");
        let s = m.stats();
        assert_eq!(s.resolved, 0, "{what}");
        assert_eq!(
            s.items_bad_signature + s.wrong_key + s.items_wrong_target + s.not_node_info,
            1,
            "{what}: {s:?}"
        );
    }

    // Malformed and oversized datagrams, from the right address, change nothing.
    let mut m = client(fake, now);
    m.request_node_info(&json!(a.sign_id().to_string()), now);
    m.handle_timeout(now);
    let qs = queries(&mut m);
    let (_, get) = qs
        .iter()
        .find(|(_, q)| q.kind == Kind::Query(Method::Get))
        .unwrap()
        .clone();
    let before = m.stats();
    let mut big = get.clone();
    big.kind = Kind::Response;
    big.fields = item_fields(&a, &good, 3);
    let mut oversized = krpc::encode(&big).unwrap();
    oversized.extend(std::iter::repeat_n(b' ', krpc::MAX_DATAGRAM));
    let huge_v = {
        let mut s = format!("d1:rd2:id20:{}1:v1001:", "x".repeat(20)).into_bytes();
        s.extend(std::iter::repeat_n(b'y', 1001));
        s.extend_from_slice(format!("e1:t2:{}1:y1:re", String::from_utf8_lossy(&get.t)).as_bytes());
        s
    };
    for junk in [b"d1:t2:".to_vec(), b"\xff\xfe".to_vec(), oversized, huge_v] {
        m.handle_datagram(&junk, fake, now);
    }
    let after = m.stats();
    assert_eq!(after.malformed, before.malformed + 4);
    assert_eq!(after.replies, before.replies);
    assert_eq!(after.outstanding, before.outstanding);

    // The genuine item is accepted; then a lower seq from another node is stale.
    let mut first = item_fields(&a, &good, 10);
    let second = addr(1501);
    first.nodes = vec![CompactNode {
        id: {
            let mut t = target_of(&a.sign_id(), b"");
            t[19] ^= 1;
            t
        },
        addr: second,
    }];
    m.handle_datagram(&reply_to(&get, first), fake, now);
    m.handle_timeout(now);
    assert_eq!(m.poll_publication(), Some(good.clone()));
    let qs = queries(&mut m);
    let (_, get2) = qs
        .iter()
        .find(|(to, _)| *to == second)
        .expect("asks the node it learnt");
    m.handle_datagram(
        &reply_to(get2, item_fields(&a, &info_of(&a, 99), 9)),
        second,
        now,
    );
    m.handle_timeout(now);
    assert_eq!(m.poll_publication(), None);
    assert_eq!(m.stats().stale, 1);
    // The same reply again, and replies from an address never asked: unexpected.
    m.handle_datagram(&reply_to(get2, item_fields(&a, &good, 11)), second, now);
    m.handle_datagram(&reply_to(get2, item_fields(&a, &good, 11)), addr(1502), now);
    assert_eq!(m.poll_publication(), None);
    assert!(m.stats().unexpected >= 2);
}

#[test]
fn floods_cost_bounded_memory_and_bounded_queries() {
    let now = Instant::now();
    let fake = addr(1500);
    let t = Timing::default();
    let mut m = client(fake, now);
    // 1,000 requests: 64 wait, the rest are refused; 8 of them start.
    for _ in 0..1000 {
        m.request_node_info(&json!(Identity::generate().sign_id().to_string()), now);
    }
    m.handle_timeout(now);
    let s = m.stats();
    assert_eq!(s.lookups, t.max_lookups + 1, "resolves and the bootstrap");
    assert_eq!(s.waiting, t.max_waiting - t.max_lookups);
    assert_eq!(s.requests_refused, 1000 - t.max_waiting as u64);
    // Every query answered with 16 new nodes, some outside the scope, for many rounds: at
    // most max_outstanding queries at once, never a packet outside 127.0.0.0/8.
    let mut port = 3000u16;
    let mut clock = now;
    for _ in 0..300 {
        let qs = queries(&mut m);
        assert!(qs.len() <= t.max_outstanding);
        for (to, q) in qs {
            assert!(to.ip().is_loopback());
            let nodes = (0..16)
                .map(|i| {
                    port = port.wrapping_add(1).max(3000);
                    let ip = if i % 4 == 0 {
                        std::net::Ipv4Addr::new(203, 0, 113, 9)
                    } else {
                        std::net::Ipv4Addr::LOCALHOST
                    };
                    let mut id = [0u8; 20];
                    crypto::random_bytes(&mut id);
                    CompactNode {
                        id,
                        addr: SocketAddr::from((ip, port)),
                    }
                })
                .collect();
            let f = Fields {
                id: Some([9; 20]),
                nodes,
                token: Some(b"t".to_vec()),
                ..Fields::default()
            };
            m.handle_datagram(&reply_to(&q, f), to, clock);
        }
        m.handle_timeout(clock);
        let s = m.stats();
        assert!(s.outstanding <= t.max_outstanding);
        assert!(s.lookups <= t.max_lookups + 1);
        assert!(m.lookups.iter().all(|l| l.cands.len() <= MAX_CANDIDATES));
        assert!(m.lookups.iter().all(|l| l.queries <= t.max_queries));
        clock += Duration::from_millis(100);
    }
    // Everything ends: lookups time out, the table is bounded.
    m.handle_timeout(clock + t.lookup_timeout + t.query_timeout);
    m.handle_timeout(clock + 2 * (t.lookup_timeout + t.query_timeout));
    let s = m.stats();
    assert_eq!(s.waiting, 0);
    assert!(s.table <= 160 * super::super::table::BUCKET_SIZE);
    // 10,000 replies with unknown transaction ids: dropped.
    let mut m = client(fake, now);
    assert_eq!(queries(&mut m).len(), 1, "the bootstrap query");
    let before = m.stats();
    for i in 0..10_000u32 {
        let f = Fields {
            id: Some([3; 20]),
            nodes: vec![CompactNode {
                id: [4; 20],
                addr: addr(4000),
            }],
            ..Fields::default()
        };
        let bytes = krpc::encode(&Message::response(i.to_be_bytes().to_vec(), f)).unwrap();
        m.handle_datagram(&bytes, fake, now);
    }
    let s = m.stats();
    assert_eq!(s.unexpected, 10_000);
    assert_eq!(s.table, before.table);
    assert_eq!(s.outstanding, before.outstanding);
    // Queries to a read-only node are ignored.
    let q = Message::query(
        b"xy".to_vec(),
        Method::Ping,
        Fields {
            id: Some([5; 20]),
            ..Fields::default()
        },
        false,
    );
    m.handle_datagram(&krpc::encode(&q).unwrap(), fake, now);
    assert_eq!(m.stats().queries_ignored, 1);
    assert!(queries(&mut m).is_empty());
    // Datagrams from outside the scope are dropped before decoding.
    m.handle_datagram(b"junk", "203.0.113.1:5".parse().unwrap(), now);
    m.handle_datagram(b"junk", "[::1]:5".parse().unwrap(), now);
    assert_eq!(m.stats().foreign, 2);
}

#[test]
fn serving_checks_tokens_signatures_cas_and_seq_and_is_rate_limited() {
    let now = Instant::now();
    let mut srv = MainlineState::new(options(vec![addr(1)], true), None, now);
    let peer = addr(5000);
    let a = Identity::generate();
    let ask = |srv: &mut MainlineState, method: Method, f: Fields| -> Message {
        let q = Message::query(b"qq".to_vec(), method, f, true);
        srv.handle_datagram(&krpc::encode(&q).unwrap(), peer, now);
        let mut replies: Vec<Message> = Vec::new();
        while let Some((to, b)) = srv.poll_transmit() {
            if to == peer {
                replies.push(krpc::decode(&b).unwrap());
            }
        }
        assert_eq!(replies.len(), 1);
        replies.remove(0)
    };
    let target = target_of(&a.sign_id(), b"");
    let r = ask(
        &mut srv,
        Method::Get,
        Fields {
            id: Some([1; 20]),
            target: Some(target),
            ..Fields::default()
        },
    );
    let token = r.fields.token.clone().expect("a token");
    let put = |seq: i64, token: &[u8], cas: Option<i64>| {
        let mut f = item_fields(&a, &info_of(&a, seq as u16), seq);
        f.token = Some(token.to_vec());
        f.cas = cas;
        f
    };
    let code = |m: &Message| match m.kind {
        Kind::Error(c, _) => c,
        Kind::Response => 0,
        _ => -1,
    };
    assert_eq!(
        code(&ask(&mut srv, Method::Put, put(5, b"wrong", None))),
        203
    );
    assert_eq!(code(&ask(&mut srv, Method::Put, put(5, &token, None))), 0);
    assert_eq!(srv.stats().stored, 1);
    assert_eq!(code(&ask(&mut srv, Method::Put, put(4, &token, None))), 302);
    assert_eq!(
        code(&ask(&mut srv, Method::Put, put(6, &token, Some(4)))),
        301
    );
    let mut forged = put(7, &token, None);
    forged.sig.as_mut().unwrap()[0] ^= 1;
    assert_eq!(code(&ask(&mut srv, Method::Put, forged)), 206);
    assert_eq!(
        code(&ask(&mut srv, Method::Put, put(6, &token, Some(5)))),
        0
    );
    let r = ask(
        &mut srv,
        Method::Get,
        Fields {
            id: Some([1; 20]),
            target: Some(target),
            ..Fields::default()
        },
    );
    let got = MutableItem::from_fields(&r.fields, b"", Some(&target)).unwrap();
    assert_eq!(got.seq, 6);
    // An announce_peer without a token (see the test of announced peers below): refused.
    assert_eq!(
        code(&ask(
            &mut srv,
            Method::AnnouncePeer,
            Fields {
                id: Some([1; 20]),
                ..Fields::default()
            }
        )),
        203
    );
    // A flood of queries: answered up to the burst, then dropped.
    let mut answered = 0;
    for i in 0..1000u32 {
        let q = Message::query(
            i.to_be_bytes().to_vec(),
            Method::Ping,
            Fields {
                id: Some([2; 20]),
                ..Fields::default()
            },
            true,
        );
        srv.handle_datagram(&krpc::encode(&q).unwrap(), peer, now);
        while srv.poll_transmit().is_some() {
            answered += 1;
        }
    }
    assert!(
        answered <= 2 * Timing::default().queries_per_sec as usize,
        "{answered}"
    );
    assert!(srv.stats().queries_dropped >= 1000 - 200);
}

#[test]
fn an_unanswered_query_holds_a_lookup_only_a_few_round_trips() {
    let start = Instant::now();
    let fake = addr(1500);
    let mut m = client(fake, start);
    assert_eq!(
        m.slow_after(),
        Timing::default().slow_after,
        "untimed: the ceiling"
    );
    // The bootstrap node answers in 2 ms with ten nodes that will never answer.
    let qs = queries(&mut m);
    let (_, find) = qs
        .iter()
        .find(|(_, q)| q.kind == Kind::Query(Method::FindNode))
        .expect("a find_node");
    let dead: Vec<CompactNode> = (0..10)
        .map(|i| CompactNode {
            id: [0x40 + i as u8; 20],
            addr: addr(1600 + i),
        })
        .collect();
    let f = Fields {
        id: Some([0x11; 20]),
        nodes: dead.clone(),
        ..Fields::default()
    };
    let now = start + Duration::from_millis(2);
    m.handle_datagram(&reply_to(find, f), fake, now);
    m.handle_timeout(now);
    let floor = Timing::default().min_slow_after;
    assert_eq!(m.slow_after(), floor, "a 2 ms round trip: the floor");
    let first = queries(&mut m);
    assert_eq!(first.len(), Timing::default().alpha, "{first:?}");
    // Silence: the lookup goes past the dead nodes after the floor, not after a second.
    let due = m.next_deadline().expect("a deadline");
    assert!(due <= now + floor, "{:?}", due - now);
    m.handle_timeout(now + floor);
    let next = queries(&mut m);
    // The unanswered ones are sent once more, the same bytes under the same id...
    let (again, new): (Vec<_>, Vec<_>) = next
        .into_iter()
        .partition(|(to, q)| first.iter().any(|(f, fq)| f == to && fq.t == q.t));
    assert_eq!(again.len(), Timing::default().alpha, "{again:?}");
    assert_eq!(m.stats().resent, Timing::default().alpha as u64);
    // ...and no longer hold the lookup: as many go to other nodes.
    assert_eq!(new.len(), Timing::default().alpha, "{new:?}");
    assert!(new.iter().all(|(to, _)| first.iter().all(|(f, _)| f != to)));
    // Once only: nothing more is due for them before they time out.
    let due = m.next_deadline().expect("a deadline");
    m.handle_timeout(due);
    let later = queries(&mut m);
    assert!(
        later
            .iter()
            .all(|(to, _)| first.iter().all(|(f, _)| f != to)),
        "{later:?}"
    );

    // Slow replies raise the threshold, never past the ceiling.
    for i in 0..20 {
        m.time_reply(Duration::from_millis(if i % 2 == 0 { 300 } else { 900 }));
    }
    let s = m.slow_after();
    assert!(
        s > Duration::from_millis(600) && s <= Timing::default().slow_after,
        "{s:?}"
    );
}

#[test]
fn transaction_ids_are_four_bytes_counting_and_matched_whole() {
    let start = Instant::now();
    let fake = addr(1700);
    let mut m = client(fake, start);
    let qs = queries(&mut m);
    let (_, find) = qs
        .iter()
        .find(|(_, q)| q.kind == Kind::Query(Method::FindNode))
        .expect("a find_node");
    assert_eq!(find.t.len(), TXID_LEN, "{:?}", find.t);
    // The next query's id follows.
    m.request_node_info(&json!(Identity::generate().sign_id().to_string()), start);
    m.handle_timeout(start);
    let qs2 = queries(&mut m);
    let (_, get) = qs2.first().expect("a get");
    let n = |t: &[u8]| u32::from_be_bytes(t.try_into().unwrap());
    assert_eq!(n(&get.t), n(&find.t).wrapping_add(1));
    let f = || Fields {
        id: Some([0x11; 20]),
        ..Fields::default()
    };
    // Other lengths, or a part of ours, answer nothing of ours.
    for t in [
        &find.t[..2],
        &find.t[..3],
        &[find.t.clone(), vec![0]].concat()[..],
    ] {
        let bytes = krpc::encode(&Message::response(t.to_vec(), f())).unwrap();
        m.handle_datagram(&bytes, fake, start);
    }
    assert_eq!(m.stats().unexpected, 3);
    assert_eq!(m.stats().replies, 0);
    // The whole id does.
    m.handle_datagram(&reply_to(find, f()), fake, start);
    assert_eq!(m.stats().replies, 1);
    assert_eq!(m.stats().table, 1);
}

/// Steps a machine whose peers never answer from deadline to deadline for `span`: returns how
/// many steps it took, failing if a deadline it returns is already past after it ran.
fn steps_through_silence(m: &mut MainlineState, start: Instant, span: Duration) -> usize {
    let mut now = start;
    let mut steps = 0;
    // Bounded: 100,000 steps at most (a machine that never sleeps fails below long before).
    while steps < 100_000 {
        m.handle_timeout(now);
        while m.poll_transmit().is_some() {}
        steps += 1;
        let Some(next) = m.next_deadline() else {
            break;
        };
        assert!(
            next > now,
            "after step {steps} the next deadline is {:?} in the past: {:?}",
            now - next,
            m.stats()
        );
        if next > start + span {
            break;
        }
        now = next;
    }
    steps
}

#[test]
fn silent_peers_never_leave_a_deadline_in_the_past() {
    let start = Instant::now();
    let boot: Vec<SocketAddr> = (0..20).map(|i| addr(1800 + i)).collect();
    let a = Identity::generate();
    let mut m = MainlineState::new(options(boot, false), Some(a.sign_keypair().clone()), start);
    assert!(m.set_my_node_info(&info_of(&a, 7000), 1_000, start));
    m.request_node_info(&json!(Identity::generate().sign_id().to_string()), start);
    let steps = steps_through_silence(&mut m, start, Duration::from_secs(60));
    let s = m.stats();
    assert!(s.queries_sent >= 20, "{s:?}");
    assert!(s.timeouts >= 20, "{s:?}");
    // Each step has something due: a query going slow or timing out, a lookup ending or
    // starting; a few per query at most.
    assert!(
        (steps as u64) < 4 * s.queries_sent + 20,
        "{steps} steps for {} queries",
        s.queries_sent
    );
}

#[test]
fn a_publication_due_while_one_runs_waits_for_it_without_waking() {
    let start = Instant::now();
    let boot: Vec<SocketAddr> = (0..4).map(|i| addr(1900 + i)).collect();
    let a = Identity::generate();
    let mut m = MainlineState::new(options(boot, false), Some(a.sign_keypair().clone()), start);
    assert!(m.set_my_node_info(&info_of(&a, 7000), 1_000, start));
    m.handle_timeout(start);
    assert_eq!(m.stats().lookups, 2, "bootstrap and publish");
    // The value changes while the publish lookup runs: due now, but it must wait.
    let later = start + Duration::from_millis(10);
    assert!(m.set_my_node_info(&info_of(&a, 7001), 1_001, later));
    m.handle_timeout(later);
    let next = m.next_deadline().expect("a deadline");
    assert!(next > later, "{:?} in the past", later - next);
    // It does run once the lookup in progress has ended.
    let before = m.stats().queries_sent;
    steps_through_silence(&mut m, later, Duration::from_secs(30));
    assert!(m.stats().queries_sent > before);
}

#[test]
fn a_put_names_its_target() {
    let start = Instant::now();
    let fake = addr(1950);
    let a = Identity::generate();
    let mut m = MainlineState::new(
        options(vec![fake], false),
        Some(a.sign_keypair().clone()),
        start,
    );
    assert!(m.set_my_node_info(&info_of(&a, 7000), 1_000, start));
    m.handle_timeout(start);
    let (_, get) = queries(&mut m)
        .into_iter()
        .find(|(_, q)| q.kind == Kind::Query(Method::Get))
        .expect("a get");
    let f = Fields {
        id: Some([0x22; 20]),
        token: Some(b"tk".to_vec()),
        ..Fields::default()
    };
    let now = start + Duration::from_millis(5);
    m.handle_datagram(&reply_to(&get, f), fake, now);
    m.handle_timeout(now);
    let (to, put) = queries(&mut m)
        .into_iter()
        .find(|(_, q)| q.kind == Kind::Query(Method::Put))
        .expect("a put once the lookup ended");
    assert_eq!(to, fake);
    let target = target_of(&a.sign_id(), b"");
    assert_eq!(get.fields.target, Some(target));
    assert_eq!(put.fields.target, Some(target), "pubky's mainline needs it");
    assert_eq!(put.fields.token.as_deref(), Some(&b"tk"[..]));
}

/// A serving machine on the Internet scope holding one item (about a nodeInfo's size) put by
/// `a`; returns it with the item's target.
fn serving_with_item(a: &Identity, now: Instant) -> (MainlineState, NodeId) {
    let boot = SocketAddr::from((std::net::Ipv4Addr::new(198, 51, 100, 1), 6881));
    let mut srv = MainlineState::new(options(vec![boot], true), None, now);
    let putter = SocketAddr::from((std::net::Ipv4Addr::new(198, 51, 100, 9), 6881));
    let target = target_of(&a.sign_id(), b"");
    let token = srv.token_for(putter.ip(), 0);
    let mut f = item_fields(a, &info_of(a, 4000), 1);
    f.token = Some(token);
    let q = Message::query(b"pp".to_vec(), Method::Put, f, true);
    srv.handle_datagram(&krpc::encode(&q).unwrap(), putter, now);
    while srv.poll_transmit().is_some() {}
    assert_eq!(srv.stats().stored, 1);
    (srv, target)
}

/// Sends `n` `get` queries for `target`, one every 10 ms from `from(i)`; returns the bytes
/// received and the bytes sent back to those addresses, and the instant after.
fn get_flood(
    srv: &mut MainlineState,
    target: NodeId,
    n: u32,
    from: impl Fn(u32) -> SocketAddr,
    mut now: Instant,
) -> (usize, usize, Instant) {
    let (mut received, mut sent) = (0, 0);
    for i in 0..n {
        let f = Fields {
            id: Some([3; 20]),
            target: Some(target),
            ..Fields::default()
        };
        let q = krpc::encode(&Message::query(
            i.to_be_bytes().to_vec(),
            Method::Get,
            f,
            true,
        ));
        let q = q.unwrap();
        received += q.len();
        let src = from(i);
        srv.handle_datagram(&q, src, now);
        while let Some((to, b)) = srv.poll_transmit() {
            if Source::of(&to, Scope::Internet) == Source::of(&src, Scope::Internet) {
                sent += b.len();
            }
        }
        now += Duration::from_millis(10);
    }
    (received, sent, now)
}

#[test]
fn serving_reflects_no_more_than_a_small_budget_toward_unproven_addresses() {
    use crate::services::mainline::budget::{SOURCE_BURST, SOURCE_RATE, TOTAL_BURST, TOTAL_RATE};
    let now = Instant::now();
    let a = Identity::generate();
    let (mut srv, target) = serving_with_item(&a, now);
    let net =
        |c: u8, d: u8, port: u16| SocketAddr::from((std::net::Ipv4Addr::new(203, 0, c, d), port));
    // A resolver gets the item at once, whole.
    let resolver = net(1, 1, 6881);
    let (received, sent, now) = get_flood(&mut srv, target, 1, |_| resolver, now);
    assert!(
        sent > 4 * received,
        "the value came: {received} B in, {sent} B out"
    );
    // Forged queries naming one victim network (any host, any port), 2,000 over 20 s: it
    // gets its burst and its rate beyond what was sent, no more (4.4 times more before).
    let victim = |i: u32| net(113, (i % 250) as u8, 1000 + (i % 50) as u16);
    let (received, sent, now) = get_flood(&mut srv, target, 2000, victim, now);
    eprintln!("one network: {received} B in, {sent} B out");
    assert!(
        sent <= received + SOURCE_BURST + 20 * SOURCE_RATE,
        "{received} in, {sent} out"
    );
    assert!(srv.stats().answers_trimmed > 1900);
    // Forged queries naming a new network each time: all of them together get the shared
    // budget beyond what was sent.
    let many = |i: u32| SocketAddr::from((std::net::Ipv4Addr::from(0x0b00_0000 + (i << 8)), 6881));
    let (received, sent_many, now) = {
        let mut total_sent = 0;
        let mut total_received = 0;
        let mut t = now;
        for i in 0..2000u32 {
            let (r, s, t2) = get_flood(&mut srv, target, 1, |_| many(i), t);
            total_received += r;
            total_sent += s;
            t = t2;
        }
        (total_received, total_sent, t)
    };
    eprintln!("2,000 networks: {received} B in, {sent_many} B out");
    assert!(
        sent_many <= received + TOTAL_BURST + 20 * TOTAL_RATE,
        "{received} in, {sent_many} out"
    );
    // Every answer, trimmed or not, decodes and trimmed ones still carry our id.
    let (_, _, now) = get_flood(&mut srv, target, 1, victim, now);
    let q = Message::query(
        b"zz".to_vec(),
        Method::FindNode,
        Fields {
            id: Some([3; 20]),
            target: Some([9; 20]),
            ..Fields::default()
        },
        true,
    );
    let qb = krpc::encode(&q).unwrap();
    srv.handle_datagram(&qb, victim(1), now);
    let (_, b) = srv.poll_transmit().expect("a short answer still goes out");
    assert!(b.len() <= qb.len());
    assert!(krpc::decode(&b).unwrap().fields.id.is_some());
}

#[test]
fn proven_nodes_get_whole_answers_and_pings_count_as_excess() {
    let now = Instant::now();
    let a = Identity::generate();
    let (mut srv, target) = serving_with_item(&a, now);
    // A node that answered our ping is in the table: whole answers whatever the budget.
    let node = SocketAddr::from((std::net::Ipv4Addr::new(203, 0, 113, 5), 6881));
    let (_, _, now) = get_flood(&mut srv, target, 300, |_| node, now);
    let src = srv.source(&node);
    while srv.budget.take(src, 1, now) {}
    let q = Message::query(
        b"pg".to_vec(),
        Method::Ping,
        Fields {
            id: Some([5; 20]),
            ..Fields::default()
        },
        false,
    );
    srv.handle_datagram(&krpc::encode(&q).unwrap(), node, now);
    let mut ping = None;
    while let Some((to, b)) = srv.poll_transmit() {
        let m = krpc::decode(&b).unwrap();
        if matches!(m.kind, Kind::Query(Method::Ping)) && to == node {
            assert!(b.len() <= PING_BYTES, "{} B", b.len());
            ping = Some(m);
        }
    }
    // Its network's budget is spent: our ping to it was excess and not sent.
    assert!(ping.is_none(), "no ping toward a network without budget");
    let later = now + Duration::from_secs(60);
    srv.handle_datagram(&krpc::encode(&q).unwrap(), node, later);
    let mut ping = None;
    while let Some((to, b)) = srv.poll_transmit() {
        let m = krpc::decode(&b).unwrap();
        if matches!(m.kind, Kind::Query(Method::Ping)) && to == node {
            assert!(b.len() <= PING_BYTES, "{} B", b.len());
            ping = Some(m);
        }
    }
    let ping = ping.expect("pinged once the budget refilled");
    let pong = krpc::encode(&Message::response(
        ping.t.clone(),
        Fields {
            id: Some([5; 20]),
            ..Fields::default()
        },
    ))
    .unwrap();
    srv.handle_datagram(&pong, node, later);
    assert!(srv.table.has_addr(&node));
    let before = srv.stats().answers_trimmed;
    let (received, sent, _) = get_flood(&mut srv, target, 100, |_| node, later);
    assert_eq!(srv.stats().answers_trimmed, before);
    assert!(sent > 4 * received, "{received} in, {sent} out");
}

#[test]
fn a_relay_announced_through_a_simulated_dht_is_found_by_another_client() {
    let mut sim = Sim::new(20);
    assert!(sim.run(50, |s| s.nodes.iter().all(|(_, m)| m.stats().table >= 8)));
    sim.now += Duration::from_secs(2);
    let r = Identity::generate();
    let boot = vec![addr(1002), addr(1017)];
    let mut pr = MainlineState::new(
        options(boot.clone(), false),
        Some(r.sign_keypair().clone()),
        sim.now,
    );
    pr.set_relay_port(Some(4000), sim.now);
    let ir = sim.add(3000, pr);
    assert!(sim.run(200, |s| s.nodes[ir].1.stats().relay_announces_acked >= 8));
    let stored: usize = sim.nodes[..20]
        .iter()
        .map(|(_, m)| m.stats().peers_stored)
        .sum();
    assert_eq!(stored, 8, "announced to the k closest");
    // The relay port is announced from the relay's DHT address: its IP, the port given.
    let h = relay_info_hash();
    assert!(sim.nodes[..20].iter().any(|(_, m)| m
        .peers
        .get(&h)
        .is_some_and(|l| l.iter().any(|p| p.0 == addr(4000)))));

    // A read-only client that knows two other nodes finds it.
    let mut pf = MainlineState::new(options(vec![addr(1005), addr(1009)], false), None, sim.now);
    pf.find_relays(sim.now);
    let i_f = sim.add(3001, pf);
    let mut found = Vec::new();
    assert!(sim.run(200, |s| {
        while let Some(v) = s.nodes[i_f].1.poll_relay_peers() {
            found.extend(v);
        }
        !found.is_empty()
    }));
    assert_eq!(found, vec![addr(4000)]);
    assert_eq!(sim.nodes[i_f].1.stats().relay_searches, 1);
    // A search while one runs is not started twice; the announcement is repeated later.
    let now = sim.now;
    sim.nodes[i_f].1.find_relays(now);
    sim.nodes[i_f].1.find_relays(now);
    assert_eq!(sim.nodes[i_f].1.stats().lookups, 1);
    let before = sim.nodes[ir].1.stats().relay_announces;
    sim.now += Timing::default().relay_announce;
    assert!(sim.run(200, |s| s.nodes[ir].1.stats().relay_announces > before));
    // No longer a relay: no more announcements.
    let now = sim.now;
    sim.nodes[ir].1.set_relay_port(None, now);
    assert!(sim.nodes[ir].1.relay_announce_due.is_none());
}

#[test]
fn serving_stores_announced_peers_with_a_valid_token_within_bounds() {
    let now = Instant::now();
    let timing = Timing {
        max_stored: 20,
        ..Timing::default()
    };
    let mut srv = MainlineState::new(
        Options {
            timing,
            ..options(vec![addr(1)], true)
        },
        None,
        now,
    );
    let ask = |srv: &mut MainlineState, from: SocketAddr, method: Method, f: Fields| {
        let q = Message::query(b"qq".to_vec(), method, f, true);
        srv.handle_datagram(&krpc::encode(&q).unwrap(), from, now);
        let mut replies: Vec<Message> = Vec::new();
        while let Some((to, b)) = srv.poll_transmit() {
            if to == from {
                replies.push(krpc::decode(&b).unwrap());
            }
        }
        assert_eq!(replies.len(), 1);
        replies.remove(0)
    };
    let code = |m: &Message| match m.kind {
        Kind::Error(c, _) => c,
        Kind::Response => 0,
        _ => -1,
    };
    let h = relay_info_hash();
    let get_peers = Fields {
        id: Some([1; 20]),
        info_hash: Some(h),
        ..Fields::default()
    };
    let announce = |token: &[u8], port: Option<u16>, implied: bool| Fields {
        id: Some([1; 20]),
        info_hash: Some(h),
        token: Some(token.to_vec()),
        port,
        implied_port: implied,
        ..Fields::default()
    };
    let peer = addr(5000);
    let r = ask(&mut srv, peer, Method::GetPeers, get_peers.clone());
    assert!(r.fields.values.is_empty());
    let token = r.fields.token.clone().expect("a token");
    // A wrong token, a missing port: refused; nothing stored.
    let bad = ask(
        &mut srv,
        peer,
        Method::AnnouncePeer,
        announce(b"x", Some(4000), false),
    );
    assert_eq!(code(&bad), 203);
    let bad = ask(
        &mut srv,
        peer,
        Method::AnnouncePeer,
        announce(&token, None, false),
    );
    assert_eq!(code(&bad), 203);
    // Another address's token (tokens are per IP address): refused.
    let elsewhere = SocketAddr::from((std::net::Ipv4Addr::new(127, 0, 0, 2), 5000));
    let other = ask(
        &mut srv,
        elsewhere,
        Method::AnnouncePeer,
        announce(&token, Some(4000), false),
    );
    assert_eq!(code(&other), 203);
    assert_eq!(srv.stats().peers_stored, 0);
    // Valid: stored with the port given, or the source port when implied.
    let ok = ask(
        &mut srv,
        peer,
        Method::AnnouncePeer,
        announce(&token, Some(4000), false),
    );
    assert_eq!(code(&ok), 0);
    let ok = ask(
        &mut srv,
        peer,
        Method::AnnouncePeer,
        announce(&token, None, true),
    );
    assert_eq!(code(&ok), 0);
    let r = ask(&mut srv, addr(6000), Method::GetPeers, get_peers.clone());
    assert_eq!(r.fields.values, vec![addr(4000), addr(5000)]);
    // Again the same peer: not twice.
    ask(
        &mut srv,
        peer,
        Method::AnnouncePeer,
        announce(&token, Some(4000), false),
    );
    assert_eq!(srv.stats().peers_stored, 2);
    // Bounds: PEERS_PER_HASH per info-hash (the oldest goes), max_stored in all (refused).
    for p in 0..40u16 {
        let from = SocketAddr::from((std::net::Ipv4Addr::new(127, 0, 1, (p % 250) as u8), 7000));
        let t = ask(&mut srv, from, Method::GetPeers, get_peers.clone())
            .fields
            .token
            .unwrap();
        ask(
            &mut srv,
            from,
            Method::AnnouncePeer,
            announce(&t, Some(7000 + p), false),
        );
        // The rate limit (a burst of 200) is not what this tests.
        srv.allowance = 200.0;
    }
    assert_eq!(srv.peers.get(&h).unwrap().len(), PEERS_PER_HASH);
    let mut other_hash = get_peers.clone();
    other_hash.info_hash = Some([9; 20]);
    let mut refused = 0;
    for p in 0..20u16 {
        let from = SocketAddr::from((std::net::Ipv4Addr::new(127, 0, 2, p as u8 + 1), 7000));
        let t = ask(&mut srv, from, Method::GetPeers, other_hash.clone())
            .fields
            .token
            .unwrap();
        let mut f = announce(&t, Some(8000), false);
        f.info_hash = Some([9; 20]);
        if code(&ask(&mut srv, from, Method::AnnouncePeer, f)) == 202 {
            refused += 1;
        }
        srv.allowance = 200.0;
    }
    assert_eq!(srv.stats().peers_stored, 20);
    assert_eq!(refused, 20 - (20 - PEERS_PER_HASH));
    // Expired peers go with the token rotation.
    let later = now + PEER_TTL + TOKEN_ROTATION;
    srv.handle_timeout(later);
    assert_eq!(srv.stats().peers_stored, 0);
    assert!(srv.peers.is_empty());
}

#[test]
fn the_ipv6_dht_of_bep_32_publishes_resolves_and_stays_ipv6() {
    let six = |port: u16| SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port);
    let mut sim = Sim::on(20, std::net::Ipv6Addr::LOCALHOST.into());
    assert!(sim.run(50, |s| s.nodes.iter().all(|(_, m)| m.stats().table >= 8)));
    assert_eq!(sim.nodes[0].1.scope(), Scope::Loopback6);
    sim.now += Duration::from_secs(2);
    let a = Identity::generate();
    let mut pa = MainlineState::new(
        options(vec![six(1003), six(1011)], false),
        Some(a.sign_keypair().clone()),
        sim.now,
    );
    assert!(pa.set_my_node_info(&info_of(&a, 7000), 1_000, sim.now));
    let ia = sim.add(2000, pa);
    assert!(sim.run(200, |s| s.nodes[ia].1.stats().publishes >= 1));
    assert_eq!(sim.nodes[ia].1.stats().last_publish_stored, 8);
    let mut pb = MainlineState::new(options(vec![six(1005)], false), None, sim.now);
    pb.request_node_info(&json!(a.sign_id().to_string()), sim.now);
    let ib = sim.add(2001, pb);
    let mut got = Vec::new();
    assert!(sim.run(200, |s| {
        while let Some(v) = s.nodes[ib].1.poll_publication() {
            got.push(v);
        }
        !got.is_empty()
    }));
    assert_eq!(got, vec![info_of(&a, 7000)]);
    // Answers carry IPv6 nodes (nodes6), and IPv4 nodes offered to an IPv6 lane are left out.
    let now = sim.now;
    let mut m = MainlineState::new(options(vec![six(1)], false), None, now);
    m.handle_timeout(now);
    let (to, q) = queries(&mut m).pop().expect("a bootstrap query");
    assert_eq!(to, six(1));
    let reply = reply_to(
        &q,
        Fields {
            id: Some([3; 20]),
            nodes: vec![
                CompactNode {
                    id: [4; 20],
                    addr: addr(4000),
                },
                CompactNode {
                    id: [5; 20],
                    addr: six(5000),
                },
            ],
            ..Fields::default()
        },
    );
    m.handle_datagram(&reply, six(1), now);
    m.handle_timeout(now);
    let asked: Vec<SocketAddr> = queries(&mut m).into_iter().map(|(to, _)| to).collect();
    assert_eq!(asked, vec![six(5000)]);
    // A datagram from an IPv4 address is foreign to the IPv6 lane.
    let before = m.stats().foreign;
    m.handle_datagram(&reply, addr(1), now);
    assert_eq!(m.stats().foreign, before + 1);
}
