//! Fuzzes a CurveCP server with arbitrary datagrams: no panic, no connection created (nothing
//! here can forge a valid Initiate), and a Cookie as the only possible reply.
//!
//! No amplification: a reply sent before the client is authenticated goes to an address anyone
//! can forge, so it is never longer than the datagram it answers. Only a Hello (224 bytes) is
//! answered, by a Cookie (200 bytes); a genuine Hello needs the server's key, which the input
//! cannot know, so the Cookie path is checked by `cookie_is_shorter_than_the_hello` in
//! tests/handshake.rs instead.
//!
//! The server's long-term key is made once (generating one per input was most of the cost of
//! an input); the server itself is new per input.
#![no_main]
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mm_platform::proto::crypto::BoxKeyPair;
use mm_platform::proto::curvecp::server::{Server, ServerConfig};
use mm_platform::proto::curvecp::MAX_PACKET;

fn key() -> &'static BoxKeyPair {
    static KEY: OnceLock<BoxKeyPair> = OnceLock::new();
    KEY.get_or_init(BoxKeyPair::generate)
}

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut server: Server<u8> = Server::new(ServerConfig::new(key().clone()), start);
    let mut reply = [0u8; MAX_PACKET];
    let mut out = [0u8; MAX_PACKET];
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
            assert!(n <= pkt.len(), "a {n}-byte reply to {} bytes", pkt.len());
        }
        assert!(server.poll_transmit(now, &mut out).is_none());
        assert_eq!(server.connection_count(), 0);
    }
});
