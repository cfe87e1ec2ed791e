//! The directory (docs/ARCHITECTURE.md §5.2): where a destination's nodeInfo comes from.
//!
//! - [`NodeInfo`] (its own module, shared with the memory of peers): `{"signId", "boxId",
//!   "connectionInfo"}`, parsed with the poisoning check: a nodeInfo whose `boxId` is not the
//!   curve25519 conversion of its `signId` is refused.
//! - A bounded cache of nodeInfo with an expiry ([`crate::NetConfig::node_info_ttl`]); when full,
//!   the entry closest to expiry is evicted.
//! - Entries and pending lookups are keyed by box key, which every node has (JavaScript
//!   nodes name each other by boxId; a signId converts to its box key), and coalesced: the
//!   first send to an unknown destination publishes `self.transports.requestNodeInfo` once
//!   (payload the signId when known, else the boxId, as the JavaScript nodes ask); every later
//!   send waits for the same answer (`self.transports.nodeInfo`) or the same timeout
//!   ([`crate::NetConfig::lookup_timeout`], 10 s by default).
//! - The reverse map boxId -> signId that `self.directory.getReply` feeds (each reply is
//!   checked: the signId must convert to the boxId).
//! - The [`Directory`] trait: an application that knows its peers answers lookups itself,
//!   synchronously; when it answers `None` the bus-based lookup runs as above.
//! - The memory of peers across restarts (the private `peer_memory` module): the nodeInfo of
//!   every peer the node connects to (to send it messages, offline ones included) is kept in
//!   storage, bounded (1,024 peers) and aged (forgotten after 30 days unused);
//!   a lookup that finds nothing in the cache uses it (and asks the bus for a fresher one at the
//!   same time), so offline messages reach their destination after both ends restart without
//!   the application publishing nodeInfos again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use super::node_info::{NodeInfo, NodeInfoError};
use super::peer_memory::PeerMemory;
use crate::identity::{BoxId, KeyCache, SignId};
use crate::storage::Storage;

/// Most nodeInfo entries cached, and most lookups pending at once.
pub const MAX_CACHED: usize = 4096;

/// A source of nodeInfo the application controls. The platform asks it first; `None` means
/// "ask the bus" (`self.transports.requestNodeInfo`).
///
/// ```
/// use std::collections::HashMap;
/// use mm_platform::platform::{Directory, NodeInfo};
/// use mm_platform::SignId;
///
/// struct Static(HashMap<SignId, NodeInfo>);
/// impl Directory for Static {
///     fn lookup(&mut self, id: &SignId) -> Option<NodeInfo> {
///         self.0.get(id).cloned()
///     }
/// }
/// let _d: Box<dyn Directory> = Box::new(Static(HashMap::new()));
/// ```
///
/// `Send`, like every part a [`crate::Platform`] owns.
pub trait Directory: Send {
    /// The nodeInfo of `id`, if this directory knows it now.
    fn lookup(&mut self, id: &SignId) -> Option<NodeInfo>;
}

/// What a lookup in the cache found.
pub(crate) enum Lookup {
    /// Known.
    Found(NodeInfo),
    /// Not in the cache, but remembered from an earlier run or connection (now cached again):
    /// usable, and worth a fresh lookup on the bus.
    Remembered(NodeInfo),
    /// A lookup for this id is already pending.
    Pending,
    /// Nothing known and nothing pending: the caller must start a lookup.
    Unknown,
}

/// The cache, the pending lookups and the reverse map.
pub(crate) struct DirectoryCache {
    entries: HashMap<BoxId, (NodeInfo, Instant)>,
    pending: HashMap<BoxId, Instant>,
    reverse: HashMap<BoxId, SignId>,
    ttl: Duration,
    timeout: Duration,
    /// The peers remembered in storage.
    memory: PeerMemory,
}

impl DirectoryCache {
    pub(crate) fn new(ttl: Duration, timeout: Duration) -> DirectoryCache {
        DirectoryCache {
            entries: HashMap::new(),
            pending: HashMap::new(),
            reverse: HashMap::new(),
            ttl,
            timeout,
            memory: PeerMemory::default(),
        }
    }

    /// The cache with the peers remembered in `storage` (see [`PeerMemory::load`]).
    pub(crate) fn with_memory(mut self, storage: &mut dyn Storage, now_ms: u64) -> Self {
        let mut keys = KeyCache::new(64);
        self.memory = PeerMemory::load(storage, &mut keys, now_ms);
        self
    }

    /// Remembers `info` in storage (written only when new or changed, see [`PeerMemory`]).
    pub(crate) fn remember(&mut self, storage: &mut dyn Storage, info: &NodeInfo, now_ms: u64) {
        self.memory.remember(storage, info, now_ms);
    }

    /// Looks the node with box key `id` up (expired entries are forgotten).
    pub(crate) fn lookup(&mut self, id: &BoxId, now: Instant) -> Lookup {
        if let Some((info, exp)) = self.entries.get(id) {
            if *exp > now {
                return Lookup::Found(info.clone());
            }
            self.entries.remove(id);
        }
        if self.pending.contains_key(id) {
            Lookup::Pending
        } else if let Some(info) = self.memory.get(id).cloned() {
            self.insert(info.clone(), now);
            Lookup::Remembered(info)
        } else {
            Lookup::Unknown
        }
    }

    /// Records that a lookup for `id` started; `false` if too many are pending (then the
    /// destination fails at once).
    pub(crate) fn start_lookup(&mut self, id: BoxId, now: Instant) -> bool {
        if self.pending.len() >= MAX_CACHED {
            return false;
        }
        self.pending.insert(id, now + self.timeout);
        true
    }

    /// Stores a checked nodeInfo; ends the pending lookup for it. Returns whether a lookup was
    /// pending.
    pub(crate) fn insert(&mut self, info: NodeInfo, now: Instant) -> bool {
        if self.entries.len() >= MAX_CACHED && !self.entries.contains_key(&info.box_id) {
            self.entries.retain(|_, (_, exp)| *exp > now);
            if self.entries.len() >= MAX_CACHED {
                if let Some(k) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, exp))| *exp)
                    .map(|(k, _)| *k)
                {
                    self.entries.remove(&k);
                }
            }
        }
        self.learn_reverse(info.box_id, info.sign_id);
        let id = info.box_id;
        self.entries.insert(id, (info, now + self.ttl));
        self.pending.remove(&id).is_some()
    }

    /// Ends the lookup for `id` if its time is up at `now`; `true` if it did (a lookup
    /// answered in time, or restarted later, is left alone).
    pub(crate) fn lookup_expired(&mut self, id: &BoxId, now: Instant) -> bool {
        match self.pending.get(id) {
            Some(d) if *d <= now => {
                self.pending.remove(id);
                true
            }
            _ => false,
        }
    }

    /// Records a checked boxId -> signId pair.
    pub(crate) fn learn_reverse(&mut self, b: BoxId, s: SignId) {
        if self.reverse.len() >= MAX_CACHED && !self.reverse.contains_key(&b) {
            self.reverse.clear();
        }
        self.reverse.insert(b, s);
    }

    /// The signId of a box key, if known.
    pub(crate) fn reverse(&self, b: &BoxId) -> Option<SignId> {
        self.reverse.get(b).copied()
    }

    /// Whether `b` is known as a node's box key (a cached nodeInfo or a checked mapping).
    pub(crate) fn knows_box(&self, b: &BoxId) -> bool {
        self.entries.contains_key(b) || self.reverse.contains_key(b) || self.memory.get(b).is_some()
    }

    /// Forgets a pending lookup (its peer was re-keyed).
    pub(crate) fn cancel_lookup(&mut self, id: &BoxId) {
        self.pending.remove(id);
    }

    /// Number of cached entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use serde_json::json;

    #[test]
    fn poisoned_node_info_is_refused() {
        let mut keys = KeyCache::new(16);
        let a = Identity::generate();
        let b = Identity::generate();
        let good = json!({"signId": a.sign_id().to_string(), "boxId": a.box_id().to_string(),
            "connectionInfo": [{"transportType": "udp", "transportInfo": {"address": "127.0.0.1", "port": 9}}]});
        let info = NodeInfo::from_json(&good, &mut keys).unwrap();
        assert_eq!(info.endpoints.len(), 1);
        let poisoned = json!({"signId": a.sign_id().to_string(), "boxId": b.box_id().to_string(),
            "connectionInfo": []});
        assert_eq!(
            NodeInfo::from_json(&poisoned, &mut keys),
            Err(NodeInfoError::KeyMismatch)
        );
        for bad in [
            json!(null),
            json!({"signId": 3}),
            json!({"signId": "x", "boxId": "y"}),
        ] {
            assert_eq!(
                NodeInfo::from_json(&bad, &mut keys),
                Err(NodeInfoError::Malformed)
            );
        }
    }

    #[test]
    fn lookups_coalesce_expire_and_cache_expires() {
        let t0 = Instant::now();
        let mut d = DirectoryCache::new(Duration::from_secs(60), Duration::from_secs(10));
        let a = Identity::generate();
        assert!(matches!(d.lookup(&a.box_id(), t0), Lookup::Unknown));
        assert!(d.start_lookup(a.box_id(), t0));
        assert!(matches!(d.lookup(&a.box_id(), t0), Lookup::Pending));
        assert!(!d.lookup_expired(&a.box_id(), t0 + Duration::from_secs(9)));
        assert!(d.lookup_expired(&a.box_id(), t0 + Duration::from_secs(10)));
        assert!(!d.lookup_expired(&a.box_id(), t0 + Duration::from_secs(11)));
        assert!(matches!(d.lookup(&a.box_id(), t0), Lookup::Unknown));
        let info = NodeInfo {
            sign_id: a.sign_id(),
            box_id: a.box_id(),
            endpoints: vec![],
        };
        assert!(d.start_lookup(a.box_id(), t0));
        assert!(d.insert(info, t0));
        assert_eq!(d.reverse(&a.box_id()), Some(a.sign_id()));
        assert!(matches!(d.lookup(&a.box_id(), t0), Lookup::Found(_)));
        assert!(matches!(
            d.lookup(&a.box_id(), t0 + Duration::from_secs(61)),
            Lookup::Unknown
        ));
        assert_eq!(d.len(), 0);
    }
}
