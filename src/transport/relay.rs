//! Relayed and punched UDP paths and dial-back probes, sans-IO: the datagrams that carry
//! CurveCP packets through a relay node, the relay's forwarding table with its limits
//! (`table`), the hole-punching prober (`punch`), and the dial-back guard.
//!
//! The wire format and dial-back are always compiled (a node learns whether it can be dialled
//! whatever it does about it); the forwarding table ([`Relay`], [`RelayLimits`]) and the
//! prober ([`Prober`]) only with the cargo feature `relay` (on by default). Without it the
//! codec still recognises every datagram below, but nothing uses a relay or punch one: the
//! server driver drops them.
//!
//! # Wire format
//!
//! Every datagram here starts with an 8-byte magic beginning with `MM` (0x4D), a first byte no
//! CurveCP client packet (`Q`) and no 1tp session datagram (0x00-0x05) has, so a node's
//! listening UDP socket tells them apart by their first byte (docs/ARCHITECTURE.md §4.3). Addresses are 18
//! bytes: the IPv6 address (IPv4 as v4-mapped) and the port, big-endian.
//!
//! | magic | from → to | rest |
//! |---|---|---|
//! | `MMrlyBND` | reserving node's listening socket → relay | token (16) |
//! | `MMrlyBOK` | relay → reserving node | token (16), the address the relay sees it from (18) |
//! | `MMrlyTO1` | a client → relay | target box key (32), CurveCP packet |
//! | `MMrlyFR1` | relay → reserving node | client's address as the relay sees it (18), CurveCP packet |
//! | `MMrlyBK1` | reserving node → relay | client address (18), CurveCP packet (the relay sends it on bare) |
//! | `MMpunch1` | either end of a punch | nonce (8) |
//! | `MMpunchA` | answer to a probe | the probe's nonce (8) |
//! | `MMdialB1` | a peer's fresh socket → a node's listener (dial-back) | the node's nonce (16) |
//! | `MMwhoRl1` | anyone → a relay's listener | nonce (16), zeros (40): 64 bytes in all |
//! | `MMiamRl1` | a relay → the asker | the nonce (16), the relay's signId (32): 56 bytes |
//!
//! `MMwhoRl1` asks a node found only by its address (a Mainline DHT relay search yields bare
//! addresses) who it is: a node offering relaying answers with its signId, which gives the box
//! key to connect to (CurveCP then authenticates it: a forged answer costs one failed
//! connection). The answer is shorter than the question, so the relay is no amplifier, and
//! answers are rate-limited ([`WHO_ANSWERS_PER_SEC`]); the asker takes an answer only from
//! the address it asked, with its nonce.
//!
//! A relay only ever moves CurveCP packets between the two ends: it has no key of their
//! connection, so it can neither read nor forge them (the end points' CurveCP authenticates
//! every packet). The token of a reservation is handed to the reserving node over its
//! authenticated CurveCP connection to the relay ([`Relay::reserve`]); a BIND proves that the
//! datagram's source address belongs to that node (or to someone it gave the token to).
//!
//! # Limits ([`RelayLimits`])
//!
//! At most `max_reservations` reserving nodes; per reservation at most `max_sessions` client
//! addresses, each for at most `session_lifetime` from its first packet; per reservation a
//! token bucket of `bytes_per_sec` (burst: one second's worth, at least 64 KiB) over the bytes
//! forwarded both ways. A BACK goes only from the reservation's bound address to one of its
//! live sessions (the relay is no reflector). Anything else is dropped and counted.
//!
//! # Hole punching ([`Prober`])
//!
//! Both ends send probes with their own random nonce to the other's observed address every
//! [`PROBE_INTERVAL`], at most [`PROBE_TRIES`] times; an end answers a probe from the address
//! it punches towards with an answer carrying the probe's nonce. An answer to one's own nonce
//! proves the path both ways: [`Prober::handle`] then reports success. Probes that NATs drop
//! cost nothing; a NAT that maps a fresh port per destination never lets an answer through,
//! and the prober gives up after its tries.
//!
//! # Dial-back ([`DialBackGuard`])
//!
//! A node learns whether it can be dialled by asking a connected peer (over their
//! authenticated connection) to send a `MMdialB1` datagram with a random nonce to its listening
//! port, from a fresh socket (so no NAT mapping or conntrack entry of theirs can let it in).
//! The nonce arriving at the listener proves that strangers can reach it there. The serving
//! side dials only the requester's own address as its connection shows it (never an address
//! the request names: no reflection), sends [`DIAL_BACK_COPIES`] datagrams of 24 bytes, and
//! is rate-limited per source address and overall by a [`DialBackGuard`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

#[cfg(feature = "relay")]
mod punch;
#[cfg(feature = "relay")]
mod table;
#[cfg(feature = "relay")]
pub use punch::{ProbeInput, Prober, PROBE_INTERVAL, PROBE_TRIES};
#[cfg(feature = "relay")]
pub use table::{Forward, Relay, RelayLimits, RelayStats};

/// Who-is question to a relay.
pub const WHO: &[u8; 8] = b"MMwhoRl1";
/// A relay's answer: its signId.
pub const IAM: &[u8; 8] = b"MMiamRl1";
/// Length of a who-is question (padded, so that the answer is shorter).
pub const WHO_LEN: usize = 64;
/// Length of a relay's answer.
pub const IAM_LEN: usize = MAGIC_LEN + WHO_NONCE_LEN + 32;
/// Length of a who-is nonce.
pub const WHO_NONCE_LEN: usize = 16;
/// Who-is questions a relay answers per second at most.
pub const WHO_ANSWERS_PER_SEC: u32 = 64;

/// Length of every magic.
pub const MAGIC_LEN: usize = 8;
/// A reservation's bind datagram.
pub const BIND: &[u8; 8] = b"MMrlyBND";
/// The relay's answer to a bind.
pub const BOUND: &[u8; 8] = b"MMrlyBOK";
/// A client's packet for a reserving node.
pub const TO: &[u8; 8] = b"MMrlyTO1";
/// A client's packet, forwarded to the reserving node.
pub const FROM: &[u8; 8] = b"MMrlyFR1";
/// A reserving node's packet for a client.
pub const BACK: &[u8; 8] = b"MMrlyBK1";
/// A hole-punching probe.
pub const PUNCH: &[u8; 8] = b"MMpunch1";
/// The answer to a probe.
pub const PUNCH_ACK: &[u8; 8] = b"MMpunchA";
/// A dial-back probe.
pub const DIAL_BACK: &[u8; 8] = b"MMdialB1";
/// Length of a dial-back nonce.
pub const DIAL_BACK_NONCE_LEN: usize = 16;
/// Datagrams sent per dial-back (one lost datagram must not make a node look unreachable).
pub const DIAL_BACK_COPIES: usize = 3;
/// Length of an encoded address.
pub const ADDR_LEN: usize = 18;
/// Length of a reservation token.
pub const TOKEN_LEN: usize = 16;
/// Bytes a relay adds to a CurveCP packet (the larger of the TO and FROM/BACK headers).
pub const OVERHEAD: usize = MAGIC_LEN + 32;

/// Whether a datagram's first byte makes it one of this module's.
pub fn is_relay_datagram(first: u8) -> bool {
    first == b'M'
}

/// Writes `addr` as 18 bytes.
pub fn encode_addr(addr: SocketAddr, out: &mut [u8]) {
    let v6 = match addr.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    out[..16].copy_from_slice(&v6.octets());
    out[16..18].copy_from_slice(&addr.port().to_be_bytes());
}

/// Reads an address written by [`encode_addr`]; `None` if `b` is too short or the port is 0.
pub fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    let b = b.get(..ADDR_LEN)?;
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let v6 = Ipv6Addr::from(ip);
    let port = u16::from_be_bytes([b[16], b[17]]);
    if port == 0 {
        return None;
    }
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    Some(SocketAddr::new(ip, port))
}

/// `magic ‖ head ‖ packet` into `out`; `None` if it does not fit.
pub fn wrap(magic: &[u8; 8], head: &[u8], packet: &[u8], out: &mut [u8]) -> Option<usize> {
    let n = MAGIC_LEN + head.len() + packet.len();
    let out = out.get_mut(..n)?;
    out[..MAGIC_LEN].copy_from_slice(magic);
    out[MAGIC_LEN..MAGIC_LEN + head.len()].copy_from_slice(head);
    out[MAGIC_LEN + head.len()..].copy_from_slice(packet);
    Some(n)
}

/// A client's packet for `target` through a relay (`TO`).
pub fn wrap_to(target: &[u8; 32], packet: &[u8], out: &mut [u8]) -> Option<usize> {
    wrap(TO, target, packet, out)
}

/// A reserving node's packet for client `peer` (`BACK`).
pub fn wrap_back(peer: SocketAddr, packet: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut a = [0u8; ADDR_LEN];
    encode_addr(peer, &mut a);
    wrap(BACK, &a, packet, out)
}

/// A bind datagram for `token`.
pub fn bind_datagram(token: &[u8; TOKEN_LEN]) -> [u8; MAGIC_LEN + TOKEN_LEN] {
    let mut d = [0u8; MAGIC_LEN + TOKEN_LEN];
    d[..MAGIC_LEN].copy_from_slice(BIND);
    d[MAGIC_LEN..].copy_from_slice(token);
    d
}

/// A probe or an answer: `magic ‖ nonce`.
pub fn probe_datagram(magic: &[u8; 8], nonce: &[u8; 8]) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(magic);
    d[8..].copy_from_slice(nonce);
    d
}

/// A dial-back probe carrying `nonce`.
pub fn dial_back_datagram(
    nonce: &[u8; DIAL_BACK_NONCE_LEN],
) -> [u8; MAGIC_LEN + DIAL_BACK_NONCE_LEN] {
    let mut d = [0u8; MAGIC_LEN + DIAL_BACK_NONCE_LEN];
    d[..MAGIC_LEN].copy_from_slice(DIAL_BACK);
    d[MAGIC_LEN..].copy_from_slice(nonce);
    d
}

/// A who-is question carrying `nonce`.
pub fn who_datagram(nonce: &[u8; WHO_NONCE_LEN]) -> [u8; WHO_LEN] {
    let mut d = [0u8; WHO_LEN];
    d[..MAGIC_LEN].copy_from_slice(WHO);
    d[MAGIC_LEN..MAGIC_LEN + WHO_NONCE_LEN].copy_from_slice(nonce);
    d
}

/// A relay's answer to the question with `nonce`: its signId `sign`.
pub fn iam_datagram(nonce: &[u8; WHO_NONCE_LEN], sign: &[u8; 32]) -> [u8; IAM_LEN] {
    let mut d = [0u8; IAM_LEN];
    d[..MAGIC_LEN].copy_from_slice(IAM);
    d[MAGIC_LEN..MAGIC_LEN + WHO_NONCE_LEN].copy_from_slice(nonce);
    d[MAGIC_LEN + WHO_NONCE_LEN..].copy_from_slice(sign);
    d
}

/// One datagram of this module, parsed (borrowing from the input).
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A reservation's bind.
    Bind {
        /// The reservation token.
        token: [u8; TOKEN_LEN],
    },
    /// The relay's answer to a bind.
    Bound {
        /// The token bound.
        token: [u8; TOKEN_LEN],
        /// The address the relay sees the binding socket from.
        observed: SocketAddr,
    },
    /// A client's packet for a reserving node.
    To {
        /// The reserving node's box key.
        target: [u8; 32],
        /// The CurveCP packet.
        packet: &'a [u8],
    },
    /// A client's packet as forwarded.
    From {
        /// The client's address as the relay sees it.
        peer: SocketAddr,
        /// The CurveCP packet.
        packet: &'a [u8],
    },
    /// A reserving node's packet for a client.
    Back {
        /// The client.
        peer: SocketAddr,
        /// The CurveCP packet.
        packet: &'a [u8],
    },
    /// A probe.
    Punch([u8; 8]),
    /// A probe's answer.
    PunchAck([u8; 8]),
    /// A dial-back probe.
    DialBack([u8; DIAL_BACK_NONCE_LEN]),
    /// A who-is question.
    Who([u8; WHO_NONCE_LEN]),
    /// A relay's answer to a who-is question.
    Iam {
        /// The question's nonce.
        nonce: [u8; WHO_NONCE_LEN],
        /// The relay's signId.
        sign: [u8; 32],
    },
}

/// Parses a datagram; `None` for anything malformed (unknown magic, short, empty packet).
pub fn parse(d: &[u8]) -> Option<Datagram<'_>> {
    let magic: &[u8; 8] = d.get(..MAGIC_LEN)?.try_into().ok()?;
    let rest = &d[MAGIC_LEN..];
    let fixed = |n: usize| (rest.len() == n).then_some(rest);
    let packet = |head: usize| {
        let p = rest.get(head..)?;
        (!p.is_empty() && p.len() <= crate::curvecp::MAX_PACKET).then_some(p)
    };
    Some(match magic {
        BIND => Datagram::Bind {
            token: fixed(TOKEN_LEN)?.try_into().ok()?,
        },
        BOUND => {
            let r = fixed(TOKEN_LEN + ADDR_LEN)?;
            Datagram::Bound {
                token: r[..TOKEN_LEN].try_into().ok()?,
                observed: decode_addr(&r[TOKEN_LEN..])?,
            }
        }
        TO => Datagram::To {
            target: rest.get(..32)?.try_into().ok()?,
            packet: packet(32)?,
        },
        FROM => Datagram::From {
            peer: decode_addr(rest)?,
            packet: packet(ADDR_LEN)?,
        },
        BACK => Datagram::Back {
            peer: decode_addr(rest)?,
            packet: packet(ADDR_LEN)?,
        },
        PUNCH => Datagram::Punch(fixed(8)?.try_into().ok()?),
        PUNCH_ACK => Datagram::PunchAck(fixed(8)?.try_into().ok()?),
        DIAL_BACK => Datagram::DialBack(fixed(DIAL_BACK_NONCE_LEN)?.try_into().ok()?),
        WHO => {
            let r = fixed(WHO_LEN - MAGIC_LEN)?;
            if r[WHO_NONCE_LEN..].iter().any(|&b| b != 0) {
                return None;
            }
            Datagram::Who(r[..WHO_NONCE_LEN].try_into().ok()?)
        }
        IAM => {
            let r = fixed(IAM_LEN - MAGIC_LEN)?;
            Datagram::Iam {
                nonce: r[..WHO_NONCE_LEN].try_into().ok()?,
                sign: r[WHO_NONCE_LEN..].try_into().ok()?,
            }
        }
        _ => return None,
    })
}

/// The serving side's bound on dial-backs (see the module docs): at most one per source IP
/// address per [`DialBackGuard::PER_IP_EVERY`], at most [`DialBackGuard::MAX_PER_WINDOW`] in
/// any [`DialBackGuard::WINDOW`] overall; it remembers at most [`DialBackGuard::MAX_IPS`]
/// addresses (forgetting the oldest), so its memory is bounded whatever asks.
#[derive(Debug, Default)]
pub struct DialBackGuard {
    last_by_ip: HashMap<IpAddr, Instant>,
    window: std::collections::VecDeque<Instant>,
    refused: u64,
}

impl DialBackGuard {
    /// One dial-back per source address this often.
    pub const PER_IP_EVERY: Duration = Duration::from_secs(30);
    /// The overall window.
    pub const WINDOW: Duration = Duration::from_secs(10);
    /// Dial-backs in one window.
    pub const MAX_PER_WINDOW: usize = 16;
    /// Source addresses remembered.
    pub const MAX_IPS: usize = 1024;

    /// An empty guard.
    pub fn new() -> DialBackGuard {
        DialBackGuard::default()
    }

    /// Whether a dial-back to `ip` may go at `now` (and counts it if so).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        while self
            .window
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Self::WINDOW)
        {
            self.window.pop_front();
        }
        let recent = self
            .last_by_ip
            .get(&ip)
            .is_some_and(|t| now.saturating_duration_since(*t) < Self::PER_IP_EVERY);
        if recent || self.window.len() >= Self::MAX_PER_WINDOW {
            self.refused += 1;
            return false;
        }
        if self.last_by_ip.len() >= Self::MAX_IPS && !self.last_by_ip.contains_key(&ip) {
            self.last_by_ip
                .retain(|_, t| now.saturating_duration_since(*t) < Self::PER_IP_EVERY);
            if self.last_by_ip.len() >= Self::MAX_IPS {
                self.refused += 1;
                return false;
            }
        }
        self.last_by_ip.insert(ip, now);
        self.window.push_back(now);
        true
    }

    /// Dial-backs refused so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Source addresses remembered now.
    pub fn remembered(&self) -> usize {
        self.last_by_ip.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_round_trip() {
        for s in ["203.0.113.5:4000", "[2001:db8::1]:9", "192.0.2.1:65535"] {
            let mut b = [0u8; ADDR_LEN];
            encode_addr(a(s), &mut b);
            assert_eq!(decode_addr(&b), Some(a(s)));
        }
        assert_eq!(decode_addr(&[0u8; 17]), None);
        assert_eq!(decode_addr(&[0u8; 18]), None, "port 0");
    }

    #[test]
    fn malformed_datagrams_parse_to_nothing() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"MMrlyBN"), None);
        assert_eq!(parse(b"MMrlyXXX0123456789abcdef"), None);
        assert_eq!(parse(&[b'M'; 8]), None);
        // Bind with a short or long token.
        assert_eq!(parse(&[BIND.as_slice(), &[1; 15]].concat()), None);
        assert_eq!(parse(&[BIND.as_slice(), &[1; 17]].concat()), None);
        // TO without a packet, FROM with a bad address, oversized packets.
        assert_eq!(parse(&[TO.as_slice(), &[1; 32]].concat()), None);
        assert_eq!(parse(&[FROM.as_slice(), &[0; 18], &[1]].concat()), None);
        let big = vec![7u8; crate::curvecp::MAX_PACKET + 1];
        assert_eq!(parse(&[TO.as_slice(), &[1; 32], &big].concat()), None);
        assert_eq!(parse(&[PUNCH.as_slice(), &[1; 9]].concat()), None);
    }

    #[test]
    fn dial_back_datagrams_round_trip_and_junk_is_refused() {
        let n = [7u8; DIAL_BACK_NONCE_LEN];
        let d = dial_back_datagram(&n);
        assert_eq!(parse(&d), Some(Datagram::DialBack(n)));
        assert_eq!(parse(&d[..d.len() - 1]), None, "short nonce");
        assert_eq!(parse(&[d.as_slice(), &[0]].concat()), None, "long nonce");
    }

    #[test]
    fn who_is_datagrams_round_trip_the_answer_is_shorter_and_junk_is_refused() {
        let n = [9u8; WHO_NONCE_LEN];
        let q = who_datagram(&n);
        assert_eq!(parse(&q), Some(Datagram::Who(n)));
        let a = iam_datagram(&n, &[3; 32]);
        assert_eq!(
            parse(&a),
            Some(Datagram::Iam {
                nonce: n,
                sign: [3; 32]
            })
        );
        assert!(a.len() < q.len(), "no amplification");
        assert_eq!(parse(&q[..q.len() - 1]), None, "short question");
        assert_eq!(parse(&[q.as_slice(), &[0]].concat()), None, "long question");
        let mut dirty = q;
        dirty[WHO_LEN - 1] = 1;
        assert_eq!(parse(&dirty), None, "padding not zero");
        assert_eq!(parse(&a[..a.len() - 1]), None, "short answer");
        assert_eq!(parse(&[a.as_slice(), &[0]].concat()), None, "long answer");
    }

    #[test]
    fn dial_back_guard_limits_per_address_and_overall_with_bounded_memory() {
        let now = Instant::now();
        let mut g = DialBackGuard::new();
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xC000_0200 + i));
        assert!(g.allow(ip(1), now));
        assert!(
            !g.allow(ip(1), now + Duration::from_secs(1)),
            "one per address"
        );
        // The overall window: 16 at once, then nothing until it slides.
        let mut passed = 1;
        for i in 2..100 {
            passed += g.allow(ip(i), now) as usize;
        }
        assert_eq!(passed, DialBackGuard::MAX_PER_WINDOW);
        assert!(!g.allow(ip(200), now + Duration::from_secs(9)));
        let later = now + DialBackGuard::WINDOW;
        assert!(g.allow(ip(200), later));
        assert!(!g.allow(ip(1), later), "still one per address");
        assert!(g.allow(ip(1), now + DialBackGuard::PER_IP_EVERY));
        // Memory: a flood of distinct addresses over a long time keeps at most MAX_IPS.
        let mut t = later;
        for i in 0..20_000u32 {
            t += Duration::from_millis(700);
            g.allow(ip(1000 + i), t);
            assert!(g.remembered() <= DialBackGuard::MAX_IPS);
        }
        assert!(g.refused() > 0);
    }
}
