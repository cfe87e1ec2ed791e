//! Fuzzes a CurveCP server with arbitrary datagrams: no panic, no connection created (nothing
//! here can forge a valid Initiate), and a Cookie as the only possible reply.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mm_platform::crypto::BoxKeyPair;
use mm_platform::curvecp::server::{Server, ServerConfig};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut server: Server<u8> = Server::new(ServerConfig::new(BoxKeyPair::generate()), start);
    let mut reply = [0u8; 1184];
    let mut out = [0u8; 1184];
    let mut rest = data;
    let mut step = 0u64;
    while let Some((&l, tail)) = rest.split_first() {
        let len = (usize::from(l) * 8).min(tail.len());
        let (pkt, tail) = tail.split_at(len);
        rest = tail;
        step += 1;
        let now = start + Duration::from_millis(step * 100);
        if let Some(n) = server.handle_packet(pkt, 1, now, &mut reply) {
            assert_eq!(n, 200);
        }
        assert!(server.poll_transmit(now, &mut out).is_none());
        assert_eq!(server.connection_count(), 0);
    }
});
