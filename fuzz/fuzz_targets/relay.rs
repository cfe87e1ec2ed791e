//! Fuzzes the relayed and punched paths (`transport::relay`): the datagram parser, a relay's
//! forwarding table fed a sequence of datagrams from a handful of addresses over time, and
//! the hole-punching prober. None panics; whatever parses re-encodes to its input; the relay
//! only ever sends to its bound node or to one of its sessions, never more than a packet plus
//! its header, and its tables stay within their limits; a prober opens only on its own nonce.
//!
//! No amplification: what goes back to a datagram's source address (which anyone can forge)
//! is never longer than that datagram. The relay's only longer answer, BOUND (42 bytes) to a
//! BIND (24), needs the reservation's secret token, handed to the reserving node over its
//! authenticated connection; the input cannot know it (it is random per run). A prober answers
//! a 16-byte probe with a 16-byte answer, and only from the address it punches towards. A
//! who-is question (64 bytes) gets a 56-byte answer.
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mm_platform::proto::curvecp::MAX_PACKET;
use mm_platform::proto::transport::relay::{
    self, bind_datagram, parse, probe_datagram, Datagram, ProbeInput, Prober, Relay, RelayLimits,
    OVERHEAD,
};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i % 8], 4000 + u16::from(i % 3)))
}

fuzz_target!(|data: &[u8]| {
    // The parser: what parses re-encodes to the same bytes.
    let mut out = vec![0u8; MAX_PACKET + OVERHEAD];
    match parse(data) {
        Some(Datagram::Bind { token }) => assert_eq!(&bind_datagram(&token)[..], data),
        Some(Datagram::To { target, packet }) => {
            assert!(packet.len() <= MAX_PACKET);
            let n = relay::wrap_to(&target, packet, &mut out).unwrap();
            assert_eq!(&out[..n], data);
        }
        Some(Datagram::Back { peer, packet }) | Some(Datagram::From { peer, packet }) => {
            assert!(!packet.is_empty() && packet.len() <= MAX_PACKET);
            assert_ne!(peer.port(), 0);
        }
        Some(Datagram::Punch(n)) => assert_eq!(&probe_datagram(relay::PUNCH, &n)[..], data),
        Some(Datagram::PunchAck(n)) => {
            assert_eq!(&probe_datagram(relay::PUNCH_ACK, &n)[..], data)
        }
        Some(Datagram::DialBack(n)) => assert_eq!(&relay::dial_back_datagram(&n)[..], data),
        // Who-is: the answer (what a relay sends back to the source) is shorter.
        Some(Datagram::Who(n)) => {
            assert_eq!(&relay::who_datagram(&n)[..], data);
            assert!(relay::iam_datagram(&n, &[0; 32]).len() < data.len());
        }
        Some(Datagram::Iam { nonce, sign }) => {
            assert_eq!(&relay::iam_datagram(&nonce, &sign)[..], data)
        }
        Some(Datagram::Bound { .. }) | None => {}
    }

    // A relay with one bound reservation, fed the input as datagrams: each starts with a
    // header byte (source address, time step), then a length byte.
    let limits = RelayLimits {
        max_reservations: 2,
        max_sessions: 3,
        bytes_per_sec: 10_000,
        session_lifetime: Duration::from_secs(5),
        bind_ttl: Duration::from_secs(3),
    };
    let t0 = Instant::now();
    let mut r = Relay::new(limits);
    let target = [7u8; 32];
    let token = r.reserve(target, t0).unwrap();
    let node = addr(0);
    assert!(r
        .handle(&bind_datagram(&token), node, t0, &mut out)
        .is_some());
    let mut sessions = std::collections::HashSet::new();
    let mut now = t0;
    let mut rest = data;
    while let [head, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (d, more) = tail.split_at(n);
        rest = more;
        now += Duration::from_millis(u64::from(head >> 4) * 100);
        let from = addr(*head);
        // Every client that sent a TO for the target may hold a session (even when a limit
        // kept its packet back).
        if matches!(parse(d), Some(Datagram::To { target: t, .. }) if t == target) {
            sessions.insert(from);
        }
        if let Some(f) = r.handle(d, from, now, &mut out) {
            assert!(f.len <= d.len() + OVERHEAD);
            if f.to == from {
                assert!(
                    f.len <= d.len(),
                    "a {}-byte reply to {} bytes",
                    f.len,
                    d.len()
                );
            }
            assert!(
                f.to == node || f.to == from || sessions.contains(&f.to),
                "{f:?}"
            );
        }
        // The same bytes wrapped for the reserved target also go through the table.
        let mut w = vec![0u8; d.len() + OVERHEAD];
        if let Some(n) = relay::wrap_to(&target, d, &mut w) {
            if parse(&w[..n]).is_some() {
                sessions.insert(from);
            }
            if let Some(f) = r.handle(&w[..n], from, now, &mut out) {
                assert_eq!(f.to, node);
                assert!(f.to != from || f.len <= n);
            }
        }
        assert!(r.reservations() <= limits.max_reservations);
        assert!(r.sessions() <= limits.max_reservations * limits.max_sessions);
    }

    // A prober: input from its target is answered only if it is a probe; it opens only on
    // its own nonce, which the input cannot know.
    let mut p = Prober::new(addr(1), t0);
    let probe = p.poll_transmit(t0).unwrap();
    match p.handle(data, addr(1)) {
        ProbeInput::Answer(a) => {
            assert!(a.len() <= data.len());
            assert!(matches!(parse(data), Some(Datagram::Punch(_))));
            assert!(matches!(parse(&a), Some(Datagram::PunchAck(_))));
        }
        ProbeInput::Open => {
            assert_eq!(
                data,
                &probe_datagram(relay::PUNCH_ACK, probe[8..].try_into().unwrap())[..]
            )
        }
        ProbeInput::Ignored => {}
    }
    assert_eq!(p.handle(data, addr(2)), ProbeInput::Ignored);
});
