//! Hole punching, sans-IO: the [`Prober`] of one end of a punch (see hole punching in
//! [`super`]'s docs). Cargo feature `relay`: a punch needs the relay as its rendezvous.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;

/// Probes are sent this often while punching.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Probes sent in one punch round.
pub const PROBE_TRIES: u32 = 40;

/// What a [`Prober`] learnt from a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum ProbeInput {
    /// Not from the target or not a probe: not the prober's.
    Ignored,
    /// A probe from the target: send this answer back to it.
    Answer([u8; 16]),
    /// The target answered our probe: the path works both ways.
    Open,
}

/// One end of a hole punch towards `target` (sans-IO; see the module docs).
#[derive(Debug)]
pub struct Prober {
    target: SocketAddr,
    nonce: [u8; 8],
    next: Instant,
    left: u32,
    open: bool,
}

impl Prober {
    /// Starts punching towards `target` at `now`.
    pub fn new(target: SocketAddr, now: Instant) -> Prober {
        let mut nonce = [0u8; 8];
        crate::crypto::random_bytes(&mut nonce);
        Prober {
            target,
            nonce,
            next: now,
            left: PROBE_TRIES,
            open: false,
        }
    }

    /// The address punched towards.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The path was confirmed.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Every probe was sent without an answer.
    pub fn gave_up(&self) -> bool {
        !self.open && self.left == 0
    }

    /// A probe due at `now`, if any (to send to [`Prober::target`]).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<[u8; 16]> {
        if self.open || self.left == 0 || now < self.next {
            return None;
        }
        self.left -= 1;
        self.next = now + PROBE_INTERVAL;
        Some(probe_datagram(PUNCH, &self.nonce))
    }

    /// When the next probe is due (`None` once done). After the last probe, one more
    /// interval is allowed for its answer.
    pub fn next_deadline(&self) -> Option<Instant> {
        (!self.open && self.left > 0).then_some(self.next)
    }

    /// A datagram from `from`.
    pub fn handle(&mut self, d: &[u8], from: SocketAddr) -> ProbeInput {
        if from != self.target {
            return ProbeInput::Ignored;
        }
        match parse(d) {
            Some(Datagram::Punch(n)) => ProbeInput::Answer(probe_datagram(PUNCH_ACK, &n)),
            Some(Datagram::PunchAck(n)) if n == self.nonce => {
                self.open = true;
                ProbeInput::Open
            }
            _ => ProbeInput::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn probers_meet() {
        let now = Instant::now();
        let (pa, pb) = (a("192.0.2.2:4000"), a("198.51.100.2:4000"));
        let mut x = Prober::new(pb, now);
        let mut y = Prober::new(pa, now);
        let px = x.poll_transmit(now).unwrap();
        assert!(x.poll_transmit(now).is_none(), "one per interval");
        assert_eq!(x.handle(&px, a("203.0.113.1:1")), ProbeInput::Ignored);
        let ProbeInput::Answer(ans) = y.handle(&px, pa) else {
            panic!("no answer")
        };
        assert_eq!(x.handle(&ans, pb), ProbeInput::Open);
        assert!(x.is_open());
        // A forged answer (wrong nonce) does not open y.
        assert_eq!(
            y.handle(&probe_datagram(PUNCH_ACK, &[0; 8]), pa),
            ProbeInput::Ignored
        );
        let mut t = now;
        let mut sent = 0;
        while let Some(d) = y.next_deadline() {
            t = t.max(d);
            sent += y.poll_transmit(t).is_some() as u32;
        }
        assert_eq!(sent, PROBE_TRIES);
        assert!(y.gave_up());
    }
}
