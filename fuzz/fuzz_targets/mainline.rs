//! Fuzzes the Mainline DHT input: the KRPC decoder (whatever decodes re-encodes to a datagram
//! that decodes to the same message) and the sans-IO client, read-only and serving, in the
//! IPv4 DHT and (serving) in the IPv6 one of BEP 32, fed the datagram from its bootstrap node
//! and from a stranger. Nothing panics; the tables, the store
//! and what is published stay within their bounds; what a serving client sends the stranger
//! in answer (replies and its ping) is no more than the datagram's length plus one source's
//! answer budget (`budget::SOURCE_BURST`: no reflection amplification).
//!
//! The two clients are made once, their bootstrap lookup started (encoding its queries was
//! most of the cost of an input), and every input starts from clones of them at the same
//! instant: the same input always meets the same state, transaction ids included.
#![no_main]
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use mm_platform::proto::mainline::budget::SOURCE_BURST;
use mm_platform::proto::mainline::krpc::{decode, encode, Kind, Method};
use mm_platform::proto::mainline::state::{MainlineState, Options, Timing};

/// The bootstrap node and the stranger of each family.
fn addrs(v6: bool) -> (SocketAddr, SocketAddr) {
    if v6 {
        (
            (Ipv6Addr::LOCALHOST, 6881).into(),
            (Ipv6Addr::LOCALHOST, 7000).into(),
        )
    } else {
        (
            (Ipv4Addr::LOCALHOST, 6881).into(),
            (Ipv4Addr::LOCALHOST, 7000).into(),
        )
    }
}

struct Setup {
    now: Instant,
    timing: Timing,
    /// Read-only, serving, serving in the IPv6 DHT; each with its bootstrap lookup under way.
    clients: [(MainlineState, bool); 3],
}

thread_local! {
    // Not a static: a client is not Sync; libFuzzer runs one thread.
    static SETUP: Setup = {
        let now = Instant::now();
        let timing = Timing::default();
        let client = |serve, v6| {
            let options = Options {
                bootstrap: vec![addrs(v6).0],
                salt: Vec::new(),
                serve,
                timing,
            };
            let mut m = MainlineState::new(options, None, now);
            m.handle_timeout(now);
            while m.poll_transmit().is_some() {}
            (m, v6)
        };
        Setup {
            now,
            timing,
            clients: [client(false, false), client(true, false), client(true, true)],
        }
    };
}

fuzz_target!(|data: &[u8]| SETUP.with(|s| {
    if let Ok(m) = decode(data) {
        let again = encode(&m).expect("a decoded message encodes");
        assert_eq!(decode(&again).expect("and decodes again"), m);
    }
    let now = s.now;
    for (client, v6) in &s.clients {
        let (boot, stranger) = addrs(*v6);
        let mut m = client.clone();
        m.handle_datagram(data, boot, now);
        while m.poll_transmit().is_some() {}
        m.handle_datagram(data, stranger, now);
        let mut answered = 0;
        while let Some((to, bytes)) = m.poll_transmit() {
            if to != stranger {
                continue;
            }
            let kind = decode(&bytes).expect("what we send decodes").kind;
            if matches!(
                kind,
                Kind::Response | Kind::Error(..) | Kind::Query(Method::Ping)
            ) {
                answered += bytes.len();
            }
        }
        assert!(
            answered <= data.len() + SOURCE_BURST,
            "{answered} B for {} B",
            data.len()
        );
        m.handle_timeout(now);
        while m.poll_transmit().is_some() {}
        while let Some(v) = m.poll_publication() {
            assert!(v.is_object());
        }
        assert!(m.stats().stored <= s.timing.max_stored);
    }
}));
