//! The routing table of the Mainline DHT client (BEP 5), sans-IO: k-buckets of
//! [`BUCKET_SIZE`] nodes by XOR distance from our id, and the caution of who gets in.
//!
//! - **Only nodes that answered us.** A node enters the table when it answered one of our
//!   queries (never from a `nodes` list, never just because it queried us: a serving node
//!   pings it first), and only if it did not say it is read-only (BEP 43). Nodes named in `nodes` lists are only lookup candidates.
//! - **Address scope** ([`Scope`]). A DHT bootstrapped from loopback addresses (a testnet on
//!   this machine) only ever admits loopback addresses, and an Internet one never admits
//!   loopback, unspecified, multicast, broadcast, link-local or reserved addresses: nodes
//!   cannot point us at this machine's services, nor a testnet at the Internet. A scope is of
//!   one address family: the IPv6 DHT (BEP 32) is another table, of IPv6 addresses only
//!   (global unicast ones on the Internet scope; not IPv4-mapped, unique-local or link-local).
//! - **One IP cannot fill the table** (BEP 42's concern, without its id check): on the
//!   Internet scope, at most [`MAX_PER_IP`] nodes per IPv4 address (per IPv6 /64) in the whole
//!   table. A known
//!   id seen at a new address does not move (the old entry stays until it fails).
//! - **Old nodes first.** A full bucket takes a newcomer only in place of a node that failed
//!   to answer; nodes that failed [`MAX_FAILURES`] times in a row are removed.
//! - **Bounded.** 160 buckets of at most [`BUCKET_SIZE`]: at most 1,280 nodes.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::krpc::{CompactNode, NodeId, ID_LEN};

/// Nodes per bucket (BEP 5's k).
pub const BUCKET_SIZE: usize = 8;
/// Nodes per IPv4 address on the Internet scope.
pub const MAX_PER_IP: usize = 1;
/// Consecutive failures after which a node leaves the table.
pub const MAX_FAILURES: u8 = 3;

/// Which addresses the DHT may talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only 127.0.0.0/8 (every bootstrap address is a loopback one: a local testnet).
    Loopback,
    /// Only IPv4 addresses that can be on the Internet.
    Internet,
    /// Only `::1` (an IPv6 testnet on this machine).
    Loopback6,
    /// Only IPv6 addresses that can be on the Internet (global unicast, 2000::/3).
    Internet6,
}

impl Scope {
    /// The scope of a list of bootstrap addresses of one family: loopback if they all are;
    /// IPv6 if they all are IPv6 (and there is one).
    pub fn of(bootstrap: &[SocketAddr]) -> Scope {
        let loopback = !bootstrap.is_empty() && bootstrap.iter().all(|a| a.ip().is_loopback());
        let v6 = !bootstrap.is_empty() && bootstrap.iter().all(SocketAddr::is_ipv6);
        match (loopback, v6) {
            (true, false) => Scope::Loopback,
            (true, true) => Scope::Loopback6,
            (false, false) => Scope::Internet,
            (false, true) => Scope::Internet6,
        }
    }

    /// Whether this is an IPv6 scope.
    pub fn is_ipv6(&self) -> bool {
        matches!(self, Scope::Loopback6 | Scope::Internet6)
    }

    /// Whether this is a loopback scope (a testnet on this machine).
    pub fn is_loopback(&self) -> bool {
        matches!(self, Scope::Loopback | Scope::Loopback6)
    }

    /// Whether `addr` may be contacted in this scope.
    pub fn accepts(&self, addr: &SocketAddr) -> bool {
        if addr.port() == 0 {
            return false;
        }
        match (self, addr.ip()) {
            (Scope::Loopback, IpAddr::V4(ip)) => ip.is_loopback(),
            (Scope::Internet, IpAddr::V4(ip)) => {
                let first = ip.octets()[0];
                !(ip.is_loopback()
                    || ip.is_unspecified()
                    || ip.is_multicast()
                    || ip.is_broadcast()
                    || ip.is_link_local()
                    || first == 0
                    || first >= 240)
            }
            (Scope::Loopback6, IpAddr::V6(ip)) => ip.is_loopback(),
            // Global unicast (2000::/3) only: not loopback, unspecified, multicast,
            // link-local, unique-local or IPv4-mapped (all outside 2000::/3).
            (Scope::Internet6, IpAddr::V6(ip)) => ip.segments()[0] & 0xe000 == 0x2000,
            _ => false,
        }
    }
}

/// What [`MAX_PER_IP`] counts by: an IPv4 address, or an IPv6 /64.
fn ip_key(addr: &SocketAddr) -> u128 {
    match addr.ip() {
        IpAddr::V4(ip) => u128::from(u32::from(ip)),
        IpAddr::V6(ip) => u128::from(ip) >> 64 | 1 << 127,
    }
}

/// A node in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// Its id.
    pub id: NodeId,
    /// Its address.
    pub addr: SocketAddr,
    /// When it last answered.
    pub last_seen: Instant,
    /// Queries it failed to answer since.
    pub failures: u8,
}

/// XOR distance of two ids (compare as big-endian numbers).
pub fn distance(a: &NodeId, b: &NodeId) -> NodeId {
    let mut d = [0u8; ID_LEN];
    for i in 0..ID_LEN {
        d[i] = a[i] ^ b[i];
    }
    d
}

/// The routing table (see the module docs).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    own: NodeId,
    scope: Scope,
    /// Bucket `i` holds the nodes whose distance from us has `i` leading zero bits. Buckets
    /// exist up to the deepest one used (at most 160): an empty table allocates nothing, and
    /// cloning or dropping a small one is cheap (the fuzz target clones a client per input).
    buckets: Vec<Vec<Node>>,
}

impl RoutingTable {
    /// An empty table around our id `own`.
    pub fn new(own: NodeId, scope: Scope) -> RoutingTable {
        RoutingTable {
            own,
            scope,
            buckets: Vec::new(),
        }
    }

    /// Our id.
    pub fn own(&self) -> &NodeId {
        &self.own
    }

    /// The scope.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    fn bucket(&self, id: &NodeId) -> Option<usize> {
        let d = distance(&self.own, id);
        let zeros = d
            .iter()
            .position(|&b| b != 0)
            .map(|i| i * 8 + d[i].leading_zeros() as usize)?;
        Some(zeros)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(Vec::is_empty)
    }

    fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.buckets.iter().flatten()
    }

    /// A node answered a query of ours (and did not say it is read-only). Returns whether it
    /// is in the table now.
    pub fn heard(&mut self, id: NodeId, addr: SocketAddr, now: Instant) -> bool {
        if !self.scope.accepts(&addr) {
            return false;
        }
        let Some(b) = self.bucket(&id) else {
            return false; // our own id
        };
        // Known id: refresh it at its address; a different address is not believed.
        if let Some(n) = self
            .buckets
            .get_mut(b)
            .into_iter()
            .flatten()
            .find(|n| n.id == id)
        {
            if n.addr == addr {
                n.last_seen = now;
                n.failures = 0;
                return true;
            }
            return false;
        }
        // The same address under another id (a restarted node): the old entry goes.
        for bucket in &mut self.buckets {
            bucket.retain(|n| n.addr != addr);
        }
        if !self.scope.is_loopback()
            && self
                .nodes()
                .filter(|n| ip_key(&n.addr) == ip_key(&addr))
                .count()
                >= MAX_PER_IP
        {
            return false;
        }
        if self.buckets.len() <= b {
            self.buckets.resize_with(b + 1, Vec::new);
        }
        let bucket = &mut self.buckets[b];
        let node = Node {
            id,
            addr,
            last_seen: now,
            failures: 0,
        };
        if bucket.len() < BUCKET_SIZE {
            bucket.push(node);
            return true;
        }
        // Full: replace the worst node that failed, if any.
        if let Some(i) = bucket
            .iter()
            .enumerate()
            .filter(|(_, n)| n.failures > 0)
            .max_by_key(|(_, n)| n.failures)
            .map(|(i, _)| i)
        {
            bucket[i] = node;
            return true;
        }
        false
    }

    /// Whether the node `id` at `addr` is in the table.
    pub fn contains(&self, id: &NodeId, addr: &SocketAddr) -> bool {
        self.nodes().any(|n| n.id == *id && n.addr == *addr)
    }

    /// Whether some node in the table is at `addr` (it answered a query of ours from there).
    pub fn has_addr(&self, addr: &SocketAddr) -> bool {
        self.nodes().any(|n| n.addr == *addr)
    }

    /// A query to `addr` went unanswered.
    pub fn failed(&mut self, addr: &SocketAddr) {
        for bucket in &mut self.buckets {
            for n in bucket.iter_mut().filter(|n| n.addr == *addr) {
                n.failures = n.failures.saturating_add(1);
            }
            bucket.retain(|n| n.failures < MAX_FAILURES);
        }
    }

    /// The `n` nodes closest to `target`, closest first.
    pub fn closest(&self, target: &NodeId, n: usize) -> Vec<CompactNode> {
        let mut all: Vec<&Node> = self.nodes().collect();
        all.sort_by_key(|x| distance(&x.id, target));
        all.into_iter()
            .take(n)
            .map(|x| CompactNode {
                id: x.id,
                addr: x.addr,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(first: u8, rest: u8) -> NodeId {
        let mut i = [rest; ID_LEN];
        i[0] = first;
        i
    }

    #[test]
    fn scopes() {
        let lo: SocketAddr = "127.0.0.1:6881".parse().unwrap();
        let net: SocketAddr = "203.0.113.7:6881".parse().unwrap();
        assert_eq!(Scope::of(&[lo]), Scope::Loopback);
        assert_eq!(Scope::of(&[lo, net]), Scope::Internet);
        assert_eq!(Scope::of(&[]), Scope::Internet);
        assert!(Scope::Loopback.accepts(&lo) && !Scope::Loopback.accepts(&net));
        // IPv6 (BEP 32): a scope is of one family; on the Internet, global unicast only.
        let lo6: SocketAddr = "[::1]:6881".parse().unwrap();
        let net6: SocketAddr = "[2001:db8::7]:6881".parse().unwrap();
        assert_eq!(Scope::of(&[lo6]), Scope::Loopback6);
        assert_eq!(Scope::of(&[net6, lo6]), Scope::Internet6);
        assert!(Scope::Loopback6.accepts(&lo6) && !Scope::Loopback6.accepts(&lo));
        assert!(Scope::Internet6.accepts(&net6) && !Scope::Internet.accepts(&net6));
        assert!(!Scope::Internet6.accepts(&net) && !Scope::Internet6.accepts(&lo6));
        for bad in [
            "[fe80::1]:1",
            "[fd00::1]:1",
            "[ff02::1]:1",
            "[::ffff:1.2.3.4]:1",
            "[::]:1",
        ] {
            assert!(!Scope::Internet6.accepts(&bad.parse().unwrap()), "{bad}");
        }
        assert!(Scope::Internet.accepts(&net) && !Scope::Internet.accepts(&lo));
        for bad in [
            "0.0.0.0:1",
            "224.0.0.1:1",
            "255.255.255.255:1",
            "169.254.1.1:1",
            "0.1.2.3:1",
            "250.1.1.1:1",
            "203.0.113.7:0",
        ] {
            assert!(!Scope::Internet.accepts(&bad.parse().unwrap()), "{bad}");
        }
    }

    #[test]
    fn buckets_fill_and_one_ip_cannot_fill_the_table() {
        let now = Instant::now();
        let mut t = RoutingTable::new([0; ID_LEN], Scope::Internet);
        // 100 ids from one address: one entry.
        for i in 0..100u8 {
            t.heard(id(0x80, i), "203.0.113.1:1".parse().unwrap(), now);
            t.heard(
                id(0x80, i),
                format!("203.0.113.1:{}", 2 + u16::from(i)).parse().unwrap(),
                now,
            );
        }
        assert_eq!(t.len(), 1);
        // Many addresses, all in the farthest bucket: 8 kept.
        for i in 0..50u8 {
            t.heard(
                id(0x80, i),
                format!("198.51.100.{i}:1").parse().unwrap(),
                now,
            );
        }
        assert_eq!(t.len(), BUCKET_SIZE);
        // Loopback is refused on the Internet scope, our own id too.
        assert!(!t.heard(id(1, 1), "127.0.0.1:5".parse().unwrap(), now));
        assert!(!t.heard([0; ID_LEN], "198.51.100.200:1".parse().unwrap(), now));
        // A failing node is replaced by a newcomer, and removed after MAX_FAILURES.
        let victim = t.closest(&id(0x80, 0), 20)[0];
        assert!(!t.heard(id(0x80, 200), "192.0.2.200:1".parse().unwrap(), now));
        t.failed(&victim.addr);
        assert!(t.heard(id(0x80, 200), "192.0.2.200:1".parse().unwrap(), now));
        assert_eq!(t.len(), BUCKET_SIZE);
        let other = t.closest(&id(0x80, 200), 2)[1];
        for _ in 0..MAX_FAILURES {
            t.failed(&other.addr);
        }
        assert_eq!(t.len(), BUCKET_SIZE - 1);
    }

    #[test]
    fn closest_is_sorted_and_loopback_scope_allows_one_ip() {
        let now = Instant::now();
        let mut t = RoutingTable::new([0; ID_LEN], Scope::Loopback);
        for i in 1..=60u8 {
            t.heard(
                id(i, i),
                format!("127.0.0.1:{}", 1000 + u16::from(i))
                    .parse()
                    .unwrap(),
                now,
            );
        }
        assert!(t.len() > 30);
        assert!(!t.heard(id(99, 1), "203.0.113.1:1".parse().unwrap(), now));
        let c = t.closest(&id(7, 7), 8);
        assert_eq!(c.len(), 8);
        assert_eq!(c[0].id, id(7, 7));
        for w in c.windows(2) {
            assert!(distance(&w[0].id, &id(7, 7)) < distance(&w[1].id, &id(7, 7)));
        }
        // A known id at a new address is not believed.
        assert!(!t.heard(id(7, 7), "127.0.0.1:9".parse().unwrap(), now));
        assert_eq!(
            t.closest(&id(7, 7), 1)[0].addr,
            "127.0.0.1:1007".parse().unwrap()
        );
    }
}
