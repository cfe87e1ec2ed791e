//! Serving without becoming a reflection amplifier, sans-IO: how many bytes beyond what they
//! sent the Mainline service may send to addresses that have not proven they are who they
//! claim.
//!
//! UDP source addresses can be forged. A node that answers a 100-byte `get` with a 700-byte
//! item (or a `find_node` with eight nodes, or a query with a ping of its own) sends several
//! times more bytes than it received to whoever the forger named: a reflector. Dropping every
//! answer larger than its query would make a serving node useless to read-only resolvers
//! (BEP 43 clients never enter any routing table), so instead:
//!
//! - An address in our routing table answered one of our queries (it received our random
//!   transaction id, so it is not forged): it gets full answers.
//! - Any other address gets bytes beyond the length of the query it sent (the *excess*) only
//!   from a budget: each source ([`Source`]: an IPv4 /24 on the Internet, an address on a
//!   loopback testnet) has [`SOURCE_BURST`] bytes, refilled at [`SOURCE_RATE`] a second, and all
//!   such sources together [`TOTAL_BURST`], refilled at [`TOTAL_RATE`]. A resolver asking for a
//!   few items is never held back; a forger aiming our answers at one network gets about 1 KiB
//!   a second more than it sent, and at all networks together 16 KiB a second.
//! - Without budget the answer is trimmed to the query's length (the value withheld, then
//!   fewer nodes, then no token) or, if even an answer with only our id is longer, not sent.
//!
//! At most [`MAX_SOURCES`] sources are remembered; one whose budget is full again carries no
//! state and is forgotten first; when all are in use, a new source gets no excess at all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::table::Scope;

/// Excess bytes one source may receive at once.
pub const SOURCE_BURST: usize = 4096;
/// Excess bytes a second one source's budget refills by.
pub const SOURCE_RATE: usize = 1024;
/// Excess bytes all unproven sources together may receive at once.
pub const TOTAL_BURST: usize = 65_536;
/// Excess bytes a second the shared budget refills by.
pub const TOTAL_RATE: usize = 16_384;
/// Sources whose budget is remembered at most.
pub const MAX_SOURCES: usize = 1024;

/// Who shares one budget: on the Internet scope, an IPv4 /24 or an IPv6 /48 (a forger names
/// addresses in the network it attacks; one host there or another makes no difference); on a
/// loopback testnet, where every node is `127.0.0.1` (or `::1`), the address itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The first three bytes of an IPv4 Internet address.
    Net24([u8; 3]),
    /// The first six bytes of an IPv6 Internet address.
    Net48([u8; 6]),
    /// A whole loopback address.
    Addr(SocketAddr),
}

impl Source {
    /// The source `addr` belongs to in `scope`.
    pub fn of(addr: &SocketAddr, scope: Scope) -> Source {
        if scope.is_loopback() {
            return Source::Addr(*addr);
        }
        match addr.ip() {
            IpAddr::V4(ip) => {
                let [a, b, c, _] = ip.octets();
                Source::Net24([a, b, c])
            }
            IpAddr::V6(ip) => {
                let o = ip.octets();
                Source::Net48([o[0], o[1], o[2], o[3], o[4], o[5]])
            }
        }
    }
}

/// A token bucket of bytes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: usize, now: Instant) -> Bucket {
        Bucket {
            level: burst as f64,
            at: now,
        }
    }

    /// The level at `now` (without changing the bucket).
    fn level_at(&self, burst: usize, rate: usize, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.level + elapsed * rate as f64).min(burst as f64)
    }

    fn refill(&mut self, burst: usize, rate: usize, now: Instant) {
        self.level = self.level_at(burst, rate, now);
        self.at = now;
    }
}

/// The excess budgets (see the module docs).
#[derive(Debug, Clone)]
pub struct AnswerBudget {
    sources: HashMap<Source, Bucket>,
    total: Bucket,
}

impl AnswerBudget {
    /// Full budgets at `now`.
    pub fn new(now: Instant) -> AnswerBudget {
        AnswerBudget {
            sources: HashMap::new(),
            total: Bucket::full(TOTAL_BURST, now),
        }
    }

    /// Takes `excess` bytes from `source`'s budget and the shared one if both have them;
    /// otherwise takes nothing and returns `false`.
    pub fn take(&mut self, source: Source, excess: usize, now: Instant) -> bool {
        if excess == 0 {
            return true;
        }
        let need = excess as f64;
        self.total.refill(TOTAL_BURST, TOTAL_RATE, now);
        if self.total.level < need {
            return false;
        }
        if !self.sources.contains_key(&source) {
            if self.sources.len() >= MAX_SOURCES {
                let full = SOURCE_BURST as f64;
                self.sources
                    .retain(|_, b| b.level_at(SOURCE_BURST, SOURCE_RATE, now) < full);
            }
            if self.sources.len() >= MAX_SOURCES {
                return false;
            }
            self.sources.insert(source, Bucket::full(SOURCE_BURST, now));
        }
        let Some(b) = self.sources.get_mut(&source) else {
            return false;
        };
        b.refill(SOURCE_BURST, SOURCE_RATE, now);
        if b.level < need {
            return false;
        }
        b.level -= need;
        self.total.level -= need;
        true
    }

    /// Sources remembered now.
    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    fn net(i: u32) -> Source {
        Source::of(
            &SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + (i << 8)), 6881)),
            Scope::Internet,
        )
    }

    #[test]
    fn sources_are_networks_on_the_internet_and_addresses_on_loopback() {
        let a = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 7), 1));
        let b = SocketAddr::from((Ipv4Addr::new(203, 0, 113, 200), 2));
        assert_eq!(
            Source::of(&a, Scope::Internet),
            Source::of(&b, Scope::Internet)
        );
        let l1 = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let l2 = SocketAddr::from((Ipv4Addr::LOCALHOST, 2));
        assert_ne!(
            Source::of(&l1, Scope::Loopback),
            Source::of(&l2, Scope::Loopback)
        );
    }

    #[test]
    fn one_source_gets_its_burst_then_its_rate() {
        let now = Instant::now();
        let mut b = AnswerBudget::new(now);
        assert!(b.take(net(1), SOURCE_BURST, now));
        assert!(!b.take(net(1), 1, now), "empty");
        assert!(b.take(net(2), 100, now), "another source has its own");
        let later = now + Duration::from_secs(1);
        assert!(b.take(net(1), SOURCE_RATE, later));
        assert!(!b.take(net(1), 1, later));
        // A refused take takes nothing.
        let much_later = later + Duration::from_secs(100);
        assert!(!b.take(net(1), SOURCE_BURST + 1, much_later));
        assert!(b.take(net(1), SOURCE_BURST, much_later));
    }

    #[test]
    fn all_sources_together_get_the_shared_budget_and_the_table_is_bounded() {
        let now = Instant::now();
        let mut b = AnswerBudget::new(now);
        let mut given = 0;
        for i in 0..10 * MAX_SOURCES as u32 {
            if b.take(net(i), 1000, now) {
                given += 1000;
            }
            assert!(b.sources() <= MAX_SOURCES);
        }
        assert!(given <= TOTAL_BURST, "{given}");
        assert!(given > TOTAL_BURST - 1000);
        // Later, sources whose budget refilled are forgotten to make room for new ones.
        let later = now + Duration::from_secs(3600);
        for i in 0..2 * MAX_SOURCES as u32 {
            b.take(net(100_000 + i), 1, later);
            assert!(b.sources() <= MAX_SOURCES);
        }
    }
}
