//! Sorting what arrives on a listening socket by framing, sans-IO (docs/ARCHITECTURE.md §4.3).
//!
//! A node's UDP socket and TCP listener carry three kinds of input: native CurveCP, the 1tp
//! compatibility framing of the JavaScript nodes ([`super::onetp`]), and (UDP only) the relay,
//! hole-punching and dial-back datagrams of [`super::relay`]. [`sort`] names the handler that a
//! UDP datagram, or an accepted TCP stream by its first frame, belongs to; the server driver
//! reads and hands each unit to that handler, and the handlers parse strictly. It looks at the
//! first byte only, which tells the kinds apart:
//!
//! | first byte | datagram | first frame of a TCP stream |
//! |---|---|---|
//! | `M` (0x4D) | [`Handler::Relay`] | [`Handler::Drop`] |
//! | 0x00, 0x01, 0x03-0x05 (1tp session types) | [`Handler::Compat`] | [`Handler::Drop`] |
//! | 0x02 (1tp DATA) | [`Handler::Compat`] | [`Handler::Compat`] |
//! | 0x08 (1tp PING) | [`Handler::Native`] | [`Handler::Compat`] |
//! | `Q` (0x51) | [`Handler::Native`] | [`Handler::Native`] |
//! | anything else, or nothing | [`Handler::Native`] | [`Handler::Drop`] |
//!
//! A datagram nothing else claims goes to the CurveCP server, which drops (and counts) what is
//! not a valid client packet; a TCP stream whose first frame fits neither framing is closed. A
//! TCP stream keeps the framing its first frame chose: later frames are not sorted again.

use super::{onetp, relay};

/// What carried the bytes to sort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carrier {
    /// One UDP datagram.
    Datagram,
    /// The first frame (netstring payload) of an accepted TCP stream.
    StreamStart,
}

/// The handler an incoming unit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handler {
    /// The CurveCP server, native framing: the datagram, or each frame of the stream, is one
    /// CurveCP packet.
    Native,
    /// The compatibility framing: the stateless 1tp accepting side for a session datagram
    /// ([`onetp::accept_datagram`]); on TCP each frame of the stream is a socket-layer packet
    /// ([`onetp::SocketPacket`]).
    Compat,
    /// Relay, punch and dial-back datagrams ([`relay::parse`]).
    Relay,
    /// No handler: drop it (a TCP stream is closed).
    Drop,
}

/// The handler of `bytes`, arrived on `carrier` (see the module docs).
pub(crate) fn sort(carrier: Carrier, bytes: &[u8]) -> Handler {
    let first = bytes.first().copied();
    match carrier {
        Carrier::Datagram => match first {
            Some(b) if relay::is_relay_datagram(b) => Handler::Relay,
            Some(b) if onetp::is_session_datagram(b) => Handler::Compat,
            _ => Handler::Native,
        },
        Carrier::StreamStart => match first {
            Some(b'Q') => Handler::Native,
            Some(onetp::PING | onetp::DATA) => Handler::Compat,
            _ => Handler::Drop,
        },
    }
}

// The relay role is the handler these tests feed relay datagrams to.
#[cfg(all(test, feature = "relay"))]
mod tests {
    use super::*;
    use crate::crypto::BoxKeyPair;
    use crate::curvecp::server::{Server, ServerConfig};
    use crate::transport::relay::{Relay, RelayLimits};
    use std::net::SocketAddr;
    use std::time::Instant;

    /// The sans-IO handlers a listening socket feeds, as a server driver holds them.
    struct Handlers {
        server: Server<SocketAddr>,
        relay: Relay,
        now: Instant,
    }

    impl Handlers {
        fn new() -> Handlers {
            let now = Instant::now();
            Handlers {
                server: Server::new(ServerConfig::new(BoxKeyPair::generate()), now),
                relay: Relay::new(RelayLimits::default()),
                now,
            }
        }

        /// Sorts a datagram and hands it to its handler; returns the handler and whether
        /// anything would be sent back.
        fn datagram(&mut self, d: &[u8]) -> (Handler, bool) {
            let from: SocketAddr = "192.0.2.1:4000".parse().unwrap();
            let mut out = vec![0u8; onetp::MAX_DATAGRAM.max(2048)];
            let handler = sort(Carrier::Datagram, d);
            let reply = match handler {
                Handler::Native => self
                    .server
                    .handle_packet(d, from, self.now, &mut out)
                    .is_some(),
                Handler::Compat => onetp::accept_datagram(d, &mut out).is_ok(),
                Handler::Relay => self.relay.handle(d, from, self.now, &mut out).is_some(),
                Handler::Drop => false,
            };
            (handler, reply)
        }

        /// Nothing was created: no connection, no reservation.
        fn untouched(&self) -> bool {
            self.server.connection_count() == 0 && self.relay.reservations() == 0
        }
    }

    #[test]
    fn each_framing_goes_to_its_handler() {
        let mut h = Handlers::new();
        // A 1tp SYN: the accepting side answers it.
        let syn = b"\x006:0.21.0,8:0a1b2c3d,2:7f,";
        assert_eq!(h.datagram(syn), (Handler::Compat, true));
        // Every session type byte is the compatibility framing's.
        for b in 0..=5u8 {
            assert_eq!(sort(Carrier::Datagram, &[b, b'x']), Handler::Compat);
        }
        // A relay bind from a node without a reservation: the relay's, dropped there.
        let bind = relay::bind_datagram(&[7; relay::TOKEN_LEN]);
        assert_eq!(h.datagram(&bind), (Handler::Relay, false));
        assert_eq!(h.relay.stats().dropped, 1);
        // A Hello's magic: the CurveCP server's (a short one is dropped there, counted).
        assert_eq!(h.datagram(b"QvnQ5XlH"), (Handler::Native, false));
        assert_eq!(h.server.stats().dropped, 1);
        // TCP: the first frame chooses the framing.
        assert_eq!(sort(Carrier::StreamStart, b"QvnQ5XlH"), Handler::Native);
        assert_eq!(sort(Carrier::StreamStart, &[onetp::PING]), Handler::Compat);
        assert_eq!(sort(Carrier::StreamStart, b"\x024:QvnQ,"), Handler::Compat);
        assert!(h.untouched());
    }

    #[test]
    fn garbage_is_dropped_without_state_change() {
        let mut h = Handlers::new();
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![b'Q'],
            vec![b'M'],
            b"MMrlyFR1".to_vec(),
            vec![0x00],
            vec![0x02; 3],
            vec![0xff; 9],
            vec![b'Q'; 70_000],
            vec![b'M'; 70_000],
            [&[0x00][..], &[b'9'; 70_000]].concat(),
        ];
        // Random bytes of random lengths (a fixed seed: reproducible).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let len = (next() % 1400) as usize;
            cases.push((0..len).map(|_| next() as u8).collect());
        }
        for d in &cases {
            let (handler, reply) = h.datagram(d);
            assert!(!reply, "{handler:?} answered {} bytes", d.len());
            // A TCP stream starting with anything but `Q`, PING or DATA is closed.
            let expect = match d.first() {
                Some(b'Q') => Handler::Native,
                Some(&onetp::PING | &onetp::DATA) => Handler::Compat,
                _ => Handler::Drop,
            };
            assert_eq!(sort(Carrier::StreamStart, d), expect);
        }
        assert!(h.untouched());
        let dropped = h.server.stats().dropped + h.relay.stats().dropped;
        let compat = cases
            .iter()
            .filter(|d| sort(Carrier::Datagram, d) == Handler::Compat)
            .count() as u64;
        assert_eq!(dropped + compat, cases.len() as u64);
    }
}
