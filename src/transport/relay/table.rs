//! The relay role, sans-IO: the forwarding table of a node that relays for others
//! ([`Relay`]), with its limits ([`RelayLimits`], see the limits in [`super`]'s docs). Cargo
//! feature `relay`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;

/// The limits of a relay (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Most reserving nodes at once.
    pub max_reservations: usize,
    /// Most client addresses per reservation at once.
    pub max_sessions: usize,
    /// Bytes forwarded per second per reservation, both ways together.
    pub bytes_per_sec: u64,
    /// How long a client address may use a reservation, from its first packet.
    pub session_lifetime: Duration,
    /// A reservation whose node has not bound for this long stops forwarding until it binds
    /// again (its NAT mapping is presumably gone).
    pub bind_ttl: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            max_reservations: 128,
            max_sessions: 16,
            bytes_per_sec: 4 << 20,
            session_lifetime: Duration::from_secs(3600),
            bind_ttl: Duration::from_secs(60),
        }
    }
}

/// Counters of a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Packets forwarded (both ways).
    pub forwarded: u64,
    /// Bytes of CurveCP packets forwarded.
    pub forwarded_bytes: u64,
    /// Datagrams dropped: malformed, unknown target or token, not bound, not a session.
    pub dropped: u64,
    /// Datagrams dropped by a bandwidth, session or lifetime limit.
    pub limited: u64,
    /// Reservations refused because the table was full.
    pub refused: u64,
}

struct Reservation {
    token: [u8; TOKEN_LEN],
    bound: Option<SocketAddr>,
    last_bind: Instant,
    tokens: f64,
    refilled: Instant,
    /// Client address → when its first packet came.
    sessions: HashMap<SocketAddr, Instant>,
}

/// What [`Relay::handle`] asks the caller to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward {
    /// Bytes written at the start of the output buffer.
    pub len: usize,
    /// Where they go.
    pub to: SocketAddr,
}

/// A relay's forwarding table (sans-IO).
pub struct Relay {
    limits: RelayLimits,
    by_target: HashMap<[u8; 32], Reservation>,
    by_addr: HashMap<SocketAddr, [u8; 32]>,
    stats: RelayStats,
}

impl Relay {
    /// An empty table.
    pub fn new(limits: RelayLimits) -> Relay {
        Relay {
            limits,
            by_target: HashMap::new(),
            by_addr: HashMap::new(),
            stats: RelayStats::default(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> RelayLimits {
        self.limits
    }

    /// Counters.
    pub fn stats(&self) -> RelayStats {
        self.stats
    }

    /// Reservations held.
    pub fn reservations(&self) -> usize {
        self.by_target.len()
    }

    /// Client sessions held, all reservations together (at most `max_reservations` times
    /// `max_sessions`).
    pub fn sessions(&self) -> usize {
        self.by_target.values().map(|r| r.sessions.len()).sum()
    }

    /// Reserves for `target` (a node authenticated by CurveCP) with a fresh token, or renews
    /// its reservation (same token). `None` when the table is full.
    pub fn reserve(&mut self, target: [u8; 32], now: Instant) -> Option<[u8; TOKEN_LEN]> {
        if let Some(r) = self.by_target.get(&target) {
            return Some(r.token);
        }
        if self.by_target.len() >= self.limits.max_reservations {
            self.stats.refused += 1;
            return None;
        }
        let mut token = [0u8; TOKEN_LEN];
        crate::crypto::random_bytes(&mut token);
        let burst = self.burst();
        self.by_target.insert(
            target,
            Reservation {
                token,
                bound: None,
                last_bind: now,
                tokens: burst,
                refilled: now,
                sessions: HashMap::new(),
            },
        );
        Some(token)
    }

    /// Ends `target`'s reservation (its connection to us ended).
    pub fn release(&mut self, target: &[u8; 32]) {
        if let Some(r) = self.by_target.remove(target) {
            if let Some(a) = r.bound {
                self.by_addr.remove(&a);
            }
        }
    }

    fn burst(&self) -> f64 {
        (self.limits.bytes_per_sec as f64).max(64.0 * 1024.0)
    }

    /// Takes `n` bytes from `r`'s bucket; `false` if it is empty.
    fn spend(
        limits: &RelayLimits,
        burst: f64,
        r: &mut Reservation,
        n: usize,
        now: Instant,
    ) -> bool {
        let dt = now.saturating_duration_since(r.refilled).as_secs_f64();
        r.refilled = now;
        r.tokens = (r.tokens + dt * limits.bytes_per_sec as f64).min(burst);
        if r.tokens < n as f64 {
            return false;
        }
        r.tokens -= n as f64;
        true
    }

    /// Handles a datagram from `from`; what to send (if anything) is written into `out`
    /// (which must hold at least a CurveCP packet plus [`OVERHEAD`]).
    pub fn handle(
        &mut self,
        d: &[u8],
        from: SocketAddr,
        now: Instant,
        out: &mut [u8],
    ) -> Option<Forward> {
        let burst = self.burst();
        let limits = self.limits;
        let drop = |s: &mut RelayStats| {
            s.dropped += 1;
            None
        };
        match parse(d) {
            Some(Datagram::Bind { token }) => {
                let Some((target, r)) = self.by_target.iter_mut().find(|(_, r)| r.token == token)
                else {
                    return drop(&mut self.stats);
                };
                if r.bound != Some(from) {
                    if let Some(old) = r.bound.replace(from) {
                        self.by_addr.remove(&old);
                    }
                    // Another reservation bound from this address loses it.
                    if let Some(other) = self.by_addr.insert(from, *target) {
                        if other != *target {
                            if let Some(o) = self.by_target.get_mut(&other) {
                                o.bound = None;
                            }
                        }
                    }
                }
                let r = self.by_target.get_mut(&self.by_addr[&from])?;
                r.last_bind = now;
                let mut a = [0u8; ADDR_LEN];
                encode_addr(from, &mut a);
                let mut head = [0u8; TOKEN_LEN + ADDR_LEN];
                head[..TOKEN_LEN].copy_from_slice(&token);
                head[TOKEN_LEN..].copy_from_slice(&a);
                let len = wrap(BOUND, &head, &[], out)?;
                Some(Forward { len, to: from })
            }
            Some(Datagram::To { target, packet }) => {
                let Some(r) = self.by_target.get_mut(&target) else {
                    return drop(&mut self.stats);
                };
                let Some(to) = r.bound else {
                    return drop(&mut self.stats);
                };
                if now.saturating_duration_since(r.last_bind) > limits.bind_ttl {
                    return drop(&mut self.stats);
                }
                match r.sessions.get(&from) {
                    Some(&since) => {
                        if now.saturating_duration_since(since) > limits.session_lifetime {
                            self.stats.limited += 1;
                            return None;
                        }
                    }
                    None => {
                        r.sessions.retain(|_, since| {
                            now.saturating_duration_since(*since) <= limits.session_lifetime
                        });
                        if r.sessions.len() >= limits.max_sessions {
                            self.stats.limited += 1;
                            return None;
                        }
                        r.sessions.insert(from, now);
                    }
                }
                if !Self::spend(&limits, burst, r, packet.len(), now) {
                    self.stats.limited += 1;
                    return None;
                }
                let mut a = [0u8; ADDR_LEN];
                encode_addr(from, &mut a);
                let len = wrap(FROM, &a, packet, out)?;
                self.stats.forwarded += 1;
                self.stats.forwarded_bytes += packet.len() as u64;
                Some(Forward { len, to })
            }
            Some(Datagram::Back { peer, packet }) => {
                let Some(target) = self.by_addr.get(&from) else {
                    return drop(&mut self.stats);
                };
                let Some(r) = self.by_target.get_mut(target) else {
                    return drop(&mut self.stats);
                };
                let live = r
                    .sessions
                    .get(&peer)
                    .is_some_and(|s| now.saturating_duration_since(*s) <= limits.session_lifetime);
                if !live {
                    return drop(&mut self.stats);
                }
                if !Self::spend(&limits, burst, r, packet.len(), now) {
                    self.stats.limited += 1;
                    return None;
                }
                let o = out.get_mut(..packet.len())?;
                o.copy_from_slice(packet);
                self.stats.forwarded += 1;
                self.stats.forwarded_bytes += packet.len() as u64;
                Some(Forward {
                    len: packet.len(),
                    to: peer,
                })
            }
            // Meant for the ends, not for a relay.
            _ => drop(&mut self.stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn relay(limits: RelayLimits) -> (Relay, [u8; TOKEN_LEN], Instant) {
        let now = Instant::now();
        let mut r = Relay::new(limits);
        let token = r.reserve([9; 32], now).unwrap();
        let mut out = [0u8; 2048];
        let f = r.handle(
            &bind_datagram(&token),
            a("198.51.100.7:4000"),
            now,
            &mut out,
        );
        let f = f.expect("bound");
        assert_eq!(f.to, a("198.51.100.7:4000"));
        assert_eq!(
            parse(&out[..f.len]),
            Some(Datagram::Bound {
                token,
                observed: a("198.51.100.7:4000")
            })
        );
        (r, token, now)
    }

    #[test]
    fn forwards_both_ways_and_only_as_reserved() {
        let (mut r, _, now) = relay(RelayLimits::default());
        let mut out = [0u8; 2048];
        let mut d = [0u8; 2048];
        let client = a("192.0.2.9:5555");
        let n = wrap_to(&[9; 32], b"QvnQ5XlH-ciphertext", &mut d).unwrap();
        let f = r.handle(&d[..n], client, now, &mut out).unwrap();
        assert_eq!(f.to, a("198.51.100.7:4000"));
        assert_eq!(
            parse(&out[..f.len]),
            Some(Datagram::From {
                peer: client,
                packet: b"QvnQ5XlH-ciphertext"
            })
        );
        let n = wrap_back(client, b"RL3aNMXM-reply", &mut d).unwrap();
        let f = r
            .handle(&d[..n], a("198.51.100.7:4000"), now, &mut out)
            .unwrap();
        assert_eq!((f.to, &out[..f.len]), (client, &b"RL3aNMXM-reply"[..]));
        let before = r.stats();
        // Unknown target, BACK from a stranger, BACK to a non-session, bad token, junk.
        let n = wrap_to(&[8; 32], b"Qx", &mut d).unwrap();
        assert!(r.handle(&d[..n], client, now, &mut out).is_none());
        let n = wrap_back(client, b"Rx", &mut d).unwrap();
        assert!(r
            .handle(&d[..n], a("203.0.113.66:1"), now, &mut out)
            .is_none());
        let n = wrap_back(a("192.0.2.10:1"), b"Rx", &mut d).unwrap();
        assert!(r
            .handle(&d[..n], a("198.51.100.7:4000"), now, &mut out)
            .is_none());
        assert!(r
            .handle(&bind_datagram(&[0; 16]), client, now, &mut out)
            .is_none());
        assert!(r
            .handle(b"MMpunch1xxxxxxxx", client, now, &mut out)
            .is_none());
        assert_eq!(r.stats().dropped, before.dropped + 5);
        assert_eq!(r.stats().forwarded, before.forwarded);
        // After release nothing is forwarded.
        r.release(&[9; 32]);
        let n = wrap_to(&[9; 32], b"Qy", &mut d).unwrap();
        assert!(r.handle(&d[..n], client, now, &mut out).is_none());
        assert_eq!(r.reservations(), 0);
    }

    #[test]
    fn limits_hold_against_a_flood() {
        let limits = RelayLimits {
            max_reservations: 1,
            max_sessions: 2,
            bytes_per_sec: 100_000,
            session_lifetime: Duration::from_secs(10),
            bind_ttl: Duration::from_secs(60),
        };
        let (mut r, _, now) = relay(limits);
        assert!(r.reserve([1; 32], now).is_none(), "table full");
        let mut out = [0u8; 2048];
        let mut d = [0u8; 2048];
        let pkt = [b'Q'; 1000];
        let n = wrap_to(&[9; 32], &pkt, &mut d).unwrap();
        // 10,000 packets in one instant: the bucket (burst: one second's worth, 100 kB) lets
        // through 100 of them.
        let mut passed = 0;
        for _ in 0..10_000 {
            passed += r.handle(&d[..n], a("192.0.2.9:1"), now, &mut out).is_some() as usize;
        }
        assert_eq!(passed, 100);
        assert_eq!(r.stats().limited, 10_000 - 100);
        // One second later, 100 kB more.
        let later = now + Duration::from_secs(1);
        let mut passed = 0;
        for _ in 0..1000 {
            passed += r
                .handle(&d[..n], a("192.0.2.9:1"), later, &mut out)
                .is_some() as usize;
        }
        assert_eq!(passed, 100);
        // Sessions: two addresses at most; a session past its lifetime stops.
        let later = later + Duration::from_secs(5);
        let small = wrap_to(&[9; 32], b"Q1", &mut d).unwrap();
        assert!(r
            .handle(&d[..small], a("192.0.2.9:2"), later, &mut out)
            .is_some());
        assert!(r
            .handle(&d[..small], a("192.0.2.9:3"), later, &mut out)
            .is_none());
        let end = now + Duration::from_secs(11);
        assert!(r
            .handle(&d[..small], a("192.0.2.9:1"), end, &mut out)
            .is_none());
        // A reservation that stopped binding stops forwarding.
        let stale = now + Duration::from_secs(61);
        assert!(r
            .handle(&d[..small], a("192.0.2.9:2"), stale, &mut out)
            .is_none());
    }

    #[test]
    fn a_relay_forwards_nothing_for_a_dial_back_datagram() {
        let d = dial_back_datagram(&[7u8; DIAL_BACK_NONCE_LEN]);
        let (mut r, _, now) = relay(RelayLimits::default());
        let mut out = [0u8; 64];
        let before = r.stats().dropped;
        assert!(r.handle(&d, a("192.0.2.9:1"), now, &mut out).is_none());
        assert_eq!(r.stats().dropped, before + 1);
    }
}
