//! A running relay (a [`ServerDriver`] with the relay role, real UDP sockets on 127.0.0.1)
//! under a flood: one client floods a reserved node with relayed packets from many source
//! ports, mixed with bogus datagrams (junk, unknown targets, bad tokens, BACKs from strangers
//! and to non-sessions); the relay's bandwidth and session limits hold, its tables stay
//! within their bounds, and the relayed traffic of another pair still flows both ways, every
//! packet. Also the dial-back probe: only the awaited nonce raises an event, once. Every loop
//! is bounded.

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use mm_platform::proto::crypto::BoxKeyPair;
use mm_platform::proto::curvecp::server::ServerConfig;
use mm_platform::proto::transport::driver::NatEvent;
use mm_platform::proto::transport::relay::{self, Datagram, RelayLimits};
use mm_platform::proto::transport::ServerDriver;

fn bind_server(poll: &Poll) -> ServerDriver {
    ServerDriver::bind(
        poll.registry(),
        Token(0),
        ServerConfig::new(BoxKeyPair::generate()),
        Some("127.0.0.1:0".parse().unwrap()),
        None,
        Instant::now(),
    )
    .unwrap()
}

/// One reactor turn of `server` (waiting at most `wait`).
fn turn(poll: &mut Poll, events: &mut Events, server: &mut ServerDriver, wait: Duration) {
    poll.poll(events, Some(wait)).unwrap();
    for ev in events.iter() {
        server
            .handle_event(poll.registry(), ev, Instant::now())
            .unwrap();
    }
    server.flush(poll.registry(), Instant::now()).unwrap();
    while server.poll_event().is_some() {}
}

/// Twenty short turns: what was sent has arrived and been handled.
fn settle(poll: &mut Poll, events: &mut Events, server: &mut ServerDriver) {
    for _ in 0..20 {
        turn(poll, events, server, Duration::from_millis(5));
    }
}

fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

/// Every datagram waiting on `s`, with its source.
fn drain(s: &UdpSocket) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        out.push((buf[..n].to_vec(), from));
    }
    out
}

#[test]
fn a_flooded_relay_keeps_its_limits_and_another_pair_still_flows() {
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(256);
    let mut server = bind_server(&poll);
    let limits = RelayLimits {
        max_reservations: 4,
        max_sessions: 3,
        bytes_per_sec: 200_000,
        ..RelayLimits::default()
    };
    server.enable_relay(limits);
    let relay_addr = server.udp_addr().unwrap();
    let now = Instant::now();
    // Two reserving nodes: V (the flood's victim) and B (the legitimate pair's server side).
    let (v_key, b_key) = ([1u8; 32], [2u8; 32]);
    let v_token = server.relay_mut().unwrap().reserve(v_key, now).unwrap();
    let b_token = server.relay_mut().unwrap().reserve(b_key, now).unwrap();
    let (v, b, c) = (socket(), socket(), socket());
    v.send_to(&relay::bind_datagram(&v_token), relay_addr)
        .unwrap();
    b.send_to(&relay::bind_datagram(&b_token), relay_addr)
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let (mut v_bound, mut b_bound) = (false, false);
    while !(v_bound && b_bound) {
        assert!(Instant::now() < end, "binds confirmed");
        turn(
            &mut poll,
            &mut events,
            &mut server,
            Duration::from_millis(10),
        );
        v_bound |= drain(&v)
            .iter()
            .any(|(d, _)| matches!(relay::parse(d), Some(Datagram::Bound { .. })));
        b_bound |= drain(&b)
            .iter()
            .any(|(d, _)| matches!(relay::parse(d), Some(Datagram::Bound { .. })));
    }

    // The flooder: 8 source ports, 1,000-byte packets for V, and bogus datagrams.
    let flooders: Vec<UdpSocket> = (0..8).map(|_| socket()).collect();
    let mut d = [0u8; 2048];
    let n_flood = relay::wrap_to(&v_key, &[b'Q'; 1000], &mut d).unwrap();
    let flood = d[..n_flood].to_vec();
    let mut bogus: Vec<Vec<u8>> = vec![
        b"MMrlyXXXjunkjunkjunk".to_vec(),
        b"M".to_vec(),
        relay::bind_datagram(&[0xee; relay::TOKEN_LEN]).to_vec(),
    ];
    let n = relay::wrap_to(&[9u8; 32], b"Qunknown-target", &mut d).unwrap();
    bogus.push(d[..n].to_vec());
    let n = relay::wrap_back(c.local_addr().unwrap(), b"Rnot-a-session", &mut d).unwrap();
    bogus.push(d[..n].to_vec());

    let flood_start = Instant::now();
    let mut flood_bytes_sent = 0usize;
    let mut legit_sent = 0u32;
    let mut to_b: HashSet<u32> = HashSet::new();
    let mut to_c: HashSet<u32> = HashSet::new();
    let mut v_bytes = 0usize;
    let mut v_sources: HashSet<SocketAddr> = HashSet::new();
    let legit = 100u32;
    let end = flood_start + Duration::from_secs(20);
    while (to_b.len() < legit as usize || to_c.len() < legit as usize) && Instant::now() < end {
        // A burst of flood (fits the relay's receive buffer: the flood is paced by the
        // relay's reading, as a real flood would be by the network's drops).
        for (i, f) in flooders.iter().enumerate() {
            for _ in 0..12 {
                if f.send_to(&flood, relay_addr).is_ok() {
                    flood_bytes_sent += flood.len();
                }
            }
            let junk = &bogus[i % bogus.len()];
            let _ = f.send_to(junk, relay_addr);
        }
        // The legitimate pair: C sends one numbered packet to B through the relay.
        if legit_sent < legit
            && flood_start.elapsed() >= Duration::from_millis(10 * legit_sent as u64)
        {
            let pkt = format!("Qlegit-{legit_sent:05}");
            let n = relay::wrap_to(&b_key, pkt.as_bytes(), &mut d).unwrap();
            c.send_to(&d[..n], relay_addr).unwrap();
            legit_sent += 1;
        }
        turn(
            &mut poll,
            &mut events,
            &mut server,
            Duration::from_millis(1),
        );
        for (dg, _) in drain(&v) {
            if let Some(Datagram::From { peer, packet }) = relay::parse(&dg) {
                v_bytes += packet.len();
                v_sources.insert(peer);
            }
        }
        // B answers each of C's packets through the relay (BACK to C's address).
        for (dg, _) in drain(&b) {
            if let Some(Datagram::From { peer, packet }) = relay::parse(&dg) {
                let text = std::str::from_utf8(packet).unwrap();
                let i: u32 = text["Qlegit-".len()..].parse().unwrap();
                to_b.insert(i);
                let reply = format!("Rlegit-{i:05}");
                let n = relay::wrap_back(peer, reply.as_bytes(), &mut d).unwrap();
                b.send_to(&d[..n], relay_addr).unwrap();
            }
        }
        for (dg, from) in drain(&c) {
            assert_eq!(from, relay_addr);
            let text = std::str::from_utf8(&dg).unwrap();
            to_c.insert(text["Rlegit-".len()..].parse().unwrap());
        }
    }
    let elapsed = flood_start.elapsed().as_secs_f64();
    let r = server.relay().unwrap();
    let stats = r.stats();
    // The legitimate pair: every packet, both ways.
    assert_eq!(
        to_b.len(),
        legit as usize,
        "C to B through the flooded relay"
    );
    assert_eq!(
        to_c.len(),
        legit as usize,
        "B to C through the flooded relay"
    );
    // Bandwidth: V got at most the burst plus the rate over the time (counted on the
    // reservation: what V received is a subset), far less than was sent.
    let allowed = 200_000.0 + 200_000.0 * elapsed;
    assert!(
        (v_bytes as f64) <= allowed,
        "{v_bytes} bytes reached V in {elapsed:.2} s (allowed {allowed})"
    );
    assert!(
        flood_bytes_sent > 4 * v_bytes,
        "the flood ({flood_bytes_sent} bytes) was mostly cut ({v_bytes} passed)"
    );
    // Sessions: at most 3 of the 8 flooding ports got through.
    assert!(v_sources.len() <= 3, "{v_sources:?}");
    assert!(stats.limited > 0 && stats.dropped > 0, "{stats:?}");
    // Tables stay within their bounds.
    assert_eq!(r.reservations(), 2);
    assert!(r.sessions() <= 3 + 1, "{} sessions", r.sessions());
}

#[test]
fn a_dial_back_probe_counts_only_with_the_awaited_nonce_and_once() {
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(64);
    let mut server = bind_server(&poll);
    let mut dialler = bind_server(&poll);
    let addr = server.udp_addr().unwrap();
    let nonce = [0x42u8; relay::DIAL_BACK_NONCE_LEN];
    let nat_events =
        |s: &mut ServerDriver| std::iter::from_fn(|| s.poll_nat_event()).collect::<Vec<_>>();
    // Before anything is awaited, even the right nonce raises nothing.
    let forger = socket();
    let probe = relay::dial_back_datagram(&nonce);
    forger.send_to(&probe, addr).unwrap();
    settle(&mut poll, &mut events, &mut server);
    assert!(nat_events(&mut server).is_empty());
    // Awaited: forged nonces and malformed probes raise nothing.
    server.expect_dial_back(Some(nonce));
    for junk in [
        relay::dial_back_datagram(&[0x41; relay::DIAL_BACK_NONCE_LEN]).to_vec(),
        probe[..20].to_vec(),
        [probe.as_slice(), &[0]].concat(),
    ] {
        forger.send_to(&junk, addr).unwrap();
    }
    settle(&mut poll, &mut events, &mut server);
    assert!(nat_events(&mut server).is_empty());
    // The real one: DIAL_BACK_COPIES datagrams from a fresh socket (not the dialler's
    // listener), one event.
    dialler.dial_back(addr, &nonce).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < end {
        turn(
            &mut poll,
            &mut events,
            &mut server,
            Duration::from_millis(5),
        );
        got = nat_events(&mut server);
    }
    let listener = dialler.udp_addr().unwrap();
    assert!(
        matches!(got[..], [NatEvent::DialedBack { from }] if from != listener),
        "{got:?}"
    );
    settle(&mut poll, &mut events, &mut server);
    assert!(
        nat_events(&mut server).is_empty(),
        "the copies raise nothing more"
    );
    // Once seen, the nonce is spent: a replay raises nothing.
    forger.send_to(&probe, addr).unwrap();
    settle(&mut poll, &mut events, &mut server);
    assert!(nat_events(&mut server).is_empty());
}

#[test]
fn who_is_is_answered_by_relays_only_within_a_rate_and_answers_count_only_as_asked() {
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(256);
    let nat_events =
        |s: &mut ServerDriver| std::iter::from_fn(|| s.poll_nat_event()).collect::<Vec<_>>();
    // A node without the relay role answers nothing, even with an identity to give.
    let mut plain = bind_server(&poll);
    plain.answer_whois([5; 32]);
    let asker = socket();
    let q = relay::who_datagram(&[1; relay::WHO_NONCE_LEN]);
    asker.send_to(&q, plain.udp_addr().unwrap()).unwrap();
    settle(&mut poll, &mut events, &mut plain);
    assert!(drain(&asker).is_empty());
    // A relay answers with its signId and the nonce, shorter than the question.
    let mut relay_node = bind_server(&poll);
    relay_node.enable_relay(RelayLimits::default());
    relay_node.answer_whois([7; 32]);
    let at = relay_node.udp_addr().unwrap();
    asker.send_to(&q, at).unwrap();
    settle(&mut poll, &mut events, &mut relay_node);
    let got = drain(&asker);
    assert_eq!(got.len(), 1);
    assert!(got[0].0.len() < q.len());
    assert_eq!(
        relay::parse(&got[0].0),
        Some(Datagram::Iam {
            nonce: [1; relay::WHO_NONCE_LEN],
            sign: [7; 32]
        })
    );
    // A flood of questions: at most WHO_ANSWERS_PER_SEC answers in a second.
    for _ in 0..300 {
        asker.send_to(&q, at).unwrap();
    }
    settle(&mut poll, &mut events, &mut relay_node);
    let answers = drain(&asker).len();
    assert!(
        answers <= relay::WHO_ANSWERS_PER_SEC as usize,
        "{answers} answers"
    );
    assert!(answers > 0);

    // The asking side: only the answer from the address asked, with its nonce, counts.
    let mut node = bind_server(&poll);
    let relay_sock = socket();
    let relay_at = relay_sock.local_addr().unwrap();
    node.ask_whois(relay_at).unwrap();
    settle(&mut poll, &mut events, &mut node);
    let (question, from) = drain(&relay_sock).pop().expect("asked");
    let Some(Datagram::Who(nonce)) = relay::parse(&question) else {
        panic!("not a who-is question");
    };
    // Forged: a wrong nonce from the right address, the right nonce from elsewhere.
    relay_sock
        .send_to(
            &relay::iam_datagram(&[0; relay::WHO_NONCE_LEN], &[9; 32]),
            from,
        )
        .unwrap();
    socket()
        .send_to(&relay::iam_datagram(&nonce, &[9; 32]), from)
        .unwrap();
    settle(&mut poll, &mut events, &mut node);
    assert!(nat_events(&mut node).is_empty());
    // The genuine answer, twice: one event.
    for _ in 0..2 {
        relay_sock
            .send_to(&relay::iam_datagram(&nonce, &[7; 32]), from)
            .unwrap();
    }
    settle(&mut poll, &mut events, &mut node);
    let evs = nat_events(&mut node);
    assert_eq!(
        evs,
        vec![NatEvent::RelayIs {
            addr: relay_at,
            sign: [7; 32]
        }]
    );
}
