//! Happy Eyeballs (RFC 8305) for a CurveCP client over UDP: a server published on both IPv6
//! and IPv4 is dialled on both from one dual-stack socket. Hellos go to the IPv6 address
//! first, and to the IPv4 one as well once a head start has passed without an answer; the
//! first answer (a Cookie) settles the race, and everything after goes to the address that
//! answered. CurveCP makes the loser free: a server keeps no state for a Hello, so the other
//! address is simply not used again (no connection to close).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;
use mio::{Registry, Token};

use super::client::{ClientDriver, ClientLink};
use crate::curvecp::client::ClientConfig;
use crate::curvecp::packet::HELLO_MAGIC;
use crate::transport::{Framing, TransportKind};

/// A race in progress.
pub(super) struct Race {
    /// The address tried second (the first is the driver's `peer`).
    alt: SocketAddr,
    /// When Hellos start going to `alt` too.
    alt_at: Instant,
    /// The latest Hello sent to the first address (sent to `alt` at `alt_at`).
    hello: Vec<u8>,
    /// Hellos go to `alt` too.
    both: bool,
    /// Sending to the first address failed (no route): only `alt` is tried.
    first_dead: bool,
    /// The head start (for the log).
    head_start: Duration,
}

impl Race {
    /// Whether `from` is the address tried second.
    pub(super) fn answered_from(&self, from: SocketAddr) -> bool {
        from == self.alt
    }

    /// When the second address is to be tried (`None` once it is).
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        (!self.both).then_some(self.alt_at)
    }

    /// Sends every packet the client has due: Hellos to the first address (and to `alt` once
    /// its time has come, or at once when the first address cannot be sent to: no route, an
    /// IPv6-less network), then the latest Hello to `alt` when that time comes. A send that
    /// fails is that path lost, not the connection: the other may still answer (when both
    /// fail, the client's connect timeout ends it).
    pub(super) fn transmit(&mut self, d: &mut ClientDriver, u_peer: SocketAddr, now: Instant) {
        let ClientLink::Udp(u) = &mut d.link else {
            return;
        };
        let mut send = |pkt: &[u8], to: SocketAddr| match u.send_to(pkt, to) {
            Ok(()) => true,
            Err(e) => {
                debug!("happy eyeballs: cannot send to {to}: {e}");
                false
            }
        };
        let buf = &mut d.buf[..];
        while let Some(n) = d.client.poll_transmit(now, buf) {
            let pkt = &buf[..n];
            if !self.first_dead && !send(pkt, u_peer) {
                self.first_dead = true;
                self.both = true;
            }
            if pkt.starts_with(HELLO_MAGIC) {
                self.hello.clear();
                self.hello.extend_from_slice(pkt);
                if self.both {
                    send(pkt, self.alt);
                }
            }
        }
        if !self.both && now >= self.alt_at && !self.hello.is_empty() {
            debug!(
                "happy eyeballs: no answer from {u_peer} in {:?}, trying {} too",
                self.head_start, self.alt
            );
            self.both = true;
            send(&self.hello, self.alt);
        }
    }
}

impl ClientDriver {
    /// Dials a server published at `first` (IPv6) and `alt` (IPv4) over UDP in the native
    /// framing, Happy Eyeballs style (see the module docs): `alt` is tried too once
    /// `head_start` has passed without an answer from `first`.
    pub fn connect_racing(
        registry: &Registry,
        token: Token,
        first: SocketAddr,
        alt: SocketAddr,
        head_start: Duration,
        config: ClientConfig,
        now: Instant,
    ) -> io::Result<ClientDriver> {
        let mut d = Self::connect_from(
            registry,
            token,
            TransportKind::Udp,
            Framing::Native,
            first,
            Some("[::]:0".parse().expect("literal")),
            config,
            now,
        )?;
        d.race = Some(Race {
            alt,
            alt_at: now + head_start,
            hello: Vec::new(),
            both: false,
            first_dead: false,
            head_start,
        });
        Ok(d)
    }

    /// The race is over: `winner` answered first.
    pub(super) fn settle_race(&mut self, winner: SocketAddr) {
        if let Some(r) = self.race.take() {
            let loser = if winner == r.alt { self.peer } else { r.alt };
            debug!("happy eyeballs: {winner} answered first, {loser} dropped");
            self.peer = winner;
        }
    }

    /// Whether a race is still on.
    pub fn racing(&self) -> bool {
        self.race.is_some()
    }
}
