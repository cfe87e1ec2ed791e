//! Fuzzes the Mainline DHT input: the KRPC decoder (whatever decodes re-encodes to a datagram
//! that decodes to the same message) and the sans-IO client, read-only and serving, fed the
//! datagram from its bootstrap node and from a stranger. Nothing panics; the tables, the store
//! and what is published stay within their bounds; what a serving client sends the stranger
//! in answer (replies and its ping) is no more than the datagram's length plus one source's
//! answer budget (`budget::SOURCE_BURST`: no reflection amplification).
//!
//! The two clients are made once, their bootstrap lookup started (encoding its queries was
//! most of the cost of an input), and every input starts from clones of them at the same
//! instant: the same input always meets the same state, transaction ids included.
#![no_main]
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use mm_platform::proto::mainline::budget::SOURCE_BURST;
use mm_platform::proto::mainline::krpc::{decode, encode, Kind, Method};
use mm_platform::proto::mainline::state::{MainlineState, Options, Timing};

const BOOT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 6881);

struct Setup {
    now: Instant,
    timing: Timing,
    /// Read-only, then serving; each with its bootstrap lookup under way.
    clients: [MainlineState; 2],
}

thread_local! {
    // Not a static: a client is not Sync; libFuzzer runs one thread.
    static SETUP: Setup = {
        let now = Instant::now();
        let timing = Timing::default();
        let client = |serve| {
            let options = Options {
                bootstrap: vec![BOOT],
                salt: Vec::new(),
                serve,
                timing,
            };
            let mut m = MainlineState::new(options, None, now);
            m.handle_timeout(now);
            while m.poll_transmit().is_some() {}
            m
        };
        Setup { now, timing, clients: [client(false), client(true)] }
    };
}

fuzz_target!(|data: &[u8]| SETUP.with(|s| {
    if let Ok(m) = decode(data) {
        let again = encode(&m).expect("a decoded message encodes");
        assert_eq!(decode(&again).expect("and decodes again"), m);
    }
    let stranger = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7000));
    let now = s.now;
    for client in &s.clients {
        let mut m = client.clone();
        m.handle_datagram(data, SocketAddr::V4(BOOT), now);
        while m.poll_transmit().is_some() {}
        m.handle_datagram(data, stranger, now);
        let mut answered = 0;
        while let Some((to, bytes)) = m.poll_transmit() {
            if SocketAddr::V4(to) != stranger {
                continue;
            }
            let kind = decode(&bytes).expect("what we send decodes").kind;
            if matches!(kind, Kind::Response | Kind::Error(..) | Kind::Query(Method::Ping)) {
                answered += bytes.len();
            }
        }
        assert!(answered <= data.len() + SOURCE_BURST, "{answered} B for {} B", data.len());
        m.handle_timeout(now);
        while m.poll_transmit().is_some() {}
        while let Some(v) = m.poll_publication() {
            assert!(v.is_object());
        }
        assert!(m.stats().stored <= s.timing.max_stored);
    }
}));
