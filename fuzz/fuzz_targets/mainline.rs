//! Fuzzes the Mainline DHT input: the KRPC decoder (whatever decodes re-encodes to a datagram
//! that decodes to the same message) and the sans-IO client, read-only and serving, fed the
//! datagram from its bootstrap node and from a stranger. Nothing panics; the tables, the store
//! and what is published stay within their bounds.
#![no_main]
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use mm_platform::services::mainline::krpc::{decode, encode};
use mm_platform::services::mainline::{MainlineState, Options, Timing};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode(data) {
        let again = encode(&m).expect("a decoded message encodes");
        assert_eq!(decode(&again).expect("and decodes again"), m);
    }
    let boot = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 6881);
    let stranger = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 7000));
    for serve in [false, true] {
        let now = Instant::now();
        let timing = Timing::default();
        let mut m = MainlineState::new(
            Options {
                bootstrap: vec![boot],
                salt: Vec::new(),
                serve,
                timing,
            },
            None,
            now,
        );
        m.handle_timeout(now);
        m.handle_datagram(data, SocketAddr::V4(boot), now);
        m.handle_datagram(data, stranger, now);
        m.handle_timeout(now);
        while m.poll_transmit().is_some() {}
        while let Some(v) = m.poll_publication() {
            assert!(v.is_object());
        }
        let s = m.stats();
        assert!(s.stored <= timing.max_stored);
    }
});
