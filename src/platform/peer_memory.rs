//! The directory's memory of peers across restarts: the nodeInfos of the peers this node
//! connected to (or tried to, to deliver offline messages), kept in storage so that a node
//! that restarts can still reach them, and deliver its offline buffer, before anyone
//! publishes their nodeInfo again.
//!
//! - One storage record per peer, key `peer-<64 hex digits of its signId>`; layout: `MMP1`
//!   (4 bytes), the time it was last used (milliseconds since the Unix epoch, 8, big-endian),
//!   the nodeInfo as JSON, then a 16-byte checksum ([`crate::crypto::checksum`]) of everything
//!   before it.
//! - Bounded: at most [`REMEMBERED_PEERS`] records; a new peer beyond that replaces the one
//!   used least recently. Aged: a record not used for [`REMEMBER_FOR`] is deleted.
//! - Written when it changes (a new peer, other endpoints) or when its last use is more than
//!   [`TOUCH_EVERY`] old, never per message.
//! - Loaded at start, each record checked like hostile input: size, format, checksum, strict
//!   JSON, [`NodeInfo::from_json`] (the boxId must be the signId's conversion) and the key
//!   must name the record's signId. A record that fails any check is deleted and logged.

use std::collections::HashMap;
use std::time::Duration;

use super::node_info::NodeInfo;
use crate::crypto::{checksum, to_hex, CHECKSUM_LEN};
use crate::identity::{BoxId, KeyCache, SignId};
use crate::storage::Storage;

/// Most peers remembered.
pub const REMEMBERED_PEERS: usize = 1024;
/// A peer not used for this long is forgotten.
pub const REMEMBER_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// A remembered peer's last use is written again at most this often.
pub const TOUCH_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Prefix of the storage keys of remembered peers.
pub const KEY_PREFIX: &str = "peer-";
const MAGIC: &[u8; 4] = b"MMP1";
/// Largest record read (a nodeInfo lists a few endpoints: far less).
const MAX_RECORD: usize = 16 * 1024;

/// The storage key of a peer's record.
fn key_of(sign: &SignId) -> String {
    format!("{KEY_PREFIX}{}", to_hex(&sign.0 .0))
}

pub(crate) fn encode(info: &NodeInfo, used_ms: u64) -> Vec<u8> {
    let json = info.to_json().to_string();
    let mut out = Vec::with_capacity(12 + json.len() + CHECKSUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&used_ms.to_be_bytes());
    out.extend_from_slice(json.as_bytes());
    let sum = checksum(&[&out]);
    out.extend_from_slice(&sum);
    out
}

/// Decodes and checks a record (see the module docs).
pub(crate) fn decode(bytes: &[u8], keys: &mut KeyCache) -> Result<(NodeInfo, u64), String> {
    if bytes.len() > MAX_RECORD {
        return Err(format!("{} bytes, more than {MAX_RECORD}", bytes.len()));
    }
    if bytes.len() < 12 + CHECKSUM_LEN {
        return Err("truncated".into());
    }
    if &bytes[..4] != MAGIC {
        return Err("unknown format".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if checksum(&[body]) != sum {
        return Err("checksum mismatch".into());
    }
    let used = u64::from_be_bytes(body[4..12].try_into().expect("8 bytes"));
    let v: serde_json::Value =
        serde_json::from_slice(&body[12..]).map_err(|e| format!("bad JSON: {e}"))?;
    let info = NodeInfo::from_json(&v, keys).map_err(|e| e.to_string())?;
    Ok((info, used))
}

/// The remembered peers (see the module docs).
#[derive(Default)]
pub(crate) struct PeerMemory {
    peers: HashMap<BoxId, (NodeInfo, u64)>,
}

impl PeerMemory {
    /// Loads the records in `storage`, deleting those that are damaged, aged or beyond the
    /// bound (the least recently used first).
    pub(crate) fn load(storage: &mut dyn Storage, keys: &mut KeyCache, now_ms: u64) -> Self {
        let mut mem = PeerMemory::default();
        let names = match storage.keys() {
            Ok(k) => k,
            Err(e) => {
                log::warn!("remembered peers could not be listed: {e}");
                return mem;
            }
        };
        let mut drop_keys = Vec::new();
        for name in names.into_iter().filter(|k| k.starts_with(KEY_PREFIX)) {
            let checked = match storage.get(&name) {
                Ok(Some(bytes)) => decode(&bytes, keys),
                Ok(None) => continue,
                Err(e) => {
                    log::warn!("remembered peer {name} could not be read: {e}");
                    continue;
                }
            };
            match checked {
                Ok((info, _)) if key_of(&info.sign_id) != name => {
                    log::warn!("remembered peer {name}: the record names another node; deleted");
                    drop_keys.push(name);
                }
                Ok((_, used)) if now_ms.saturating_sub(used) > REMEMBER_FOR.as_millis() as u64 => {
                    drop_keys.push(name);
                }
                Ok((info, used)) => {
                    mem.peers.insert(info.box_id, (info, used));
                }
                Err(why) => {
                    log::warn!("remembered peer {name} is damaged ({why}); deleted");
                    drop_keys.push(name);
                }
            }
        }
        while mem.peers.len() > REMEMBERED_PEERS {
            if let Some(b) = mem.least_recent() {
                if let Some((info, _)) = mem.peers.remove(&b) {
                    drop_keys.push(key_of(&info.sign_id));
                }
            }
        }
        for name in drop_keys {
            if let Err(e) = storage.del(&name) {
                log::warn!("remembered peer {name} could not be deleted: {e}");
            }
        }
        mem
    }

    fn least_recent(&self) -> Option<BoxId> {
        self.peers
            .iter()
            .min_by_key(|(_, (_, used))| *used)
            .map(|(b, _)| *b)
    }

    /// The remembered nodeInfo of the node with box key `b`.
    pub(crate) fn get(&self, b: &BoxId) -> Option<&NodeInfo> {
        self.peers.get(b).map(|(info, _)| info)
    }

    /// Remembers `info` as used now; writes its record only when it is new, changed, or its
    /// last use is older than [`TOUCH_EVERY`].
    pub(crate) fn remember(&mut self, storage: &mut dyn Storage, info: &NodeInfo, now_ms: u64) {
        if let Some((known, used)) = self.peers.get(&info.box_id) {
            if known == info && now_ms.saturating_sub(*used) < TOUCH_EVERY.as_millis() as u64 {
                return;
            }
        } else if self.peers.len() >= REMEMBERED_PEERS {
            if let Some(b) = self.least_recent() {
                if let Some((old, _)) = self.peers.remove(&b) {
                    if let Err(e) = storage.del(&key_of(&old.sign_id)) {
                        log::warn!("a forgotten peer's record could not be deleted: {e}");
                    }
                }
            }
        }
        if let Err(e) = storage.put(&key_of(&info.sign_id), &encode(info, now_ms)) {
            log::warn!("peer {} could not be remembered: {e}", info.sign_id);
        }
        self.peers.insert(info.box_id, (info.clone(), now_ms));
    }

    /// Number of remembered peers.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::storage::MemStore;
    use serde_json::json;

    fn info_of(id: &Identity, port: u16) -> NodeInfo {
        let v = json!({"signId": id.sign_id().to_string(), "boxId": id.box_id().to_string(),
            "connectionInfo": [{"transportType": "udp",
                "transportInfo": {"address": "127.0.0.1", "port": port}}]});
        NodeInfo::from_json(&v, &mut KeyCache::new(4)).unwrap()
    }

    #[test]
    fn peers_survive_a_reload_and_writes_happen_only_on_change() {
        let mut s = MemStore::new();
        let mut keys = KeyCache::new(16);
        let a = Identity::generate();
        let mut m = PeerMemory::load(&mut s, &mut keys, 1_000);
        m.remember(&mut s, &info_of(&a, 9), 1_000);
        let first = s.get(&key_of(&a.sign_id())).unwrap().unwrap();
        m.remember(&mut s, &info_of(&a, 9), 2_000);
        assert_eq!(
            s.get(&key_of(&a.sign_id())).unwrap().unwrap(),
            first,
            "unchanged"
        );
        m.remember(&mut s, &info_of(&a, 10), 3_000);
        let m2 = PeerMemory::load(&mut s, &mut keys, 4_000);
        assert_eq!(m2.get(&a.box_id()), Some(&info_of(&a, 10)));
    }

    #[test]
    fn damaged_mismatched_and_aged_records_are_deleted_on_load() {
        let mut s = MemStore::new();
        let mut keys = KeyCache::new(16);
        let (a, b, c, d) = (
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
            Identity::generate(),
        );
        let now = REMEMBER_FOR.as_millis() as u64 * 2;
        // Every flipped bit and every truncation of a good record is refused.
        let good = encode(&info_of(&a, 9), now);
        for i in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode(&bad, &mut keys).is_err(), "bit {i}");
        }
        for n in 0..good.len() {
            assert!(decode(&good[..n], &mut keys).is_err(), "length {n}");
        }
        let mut flipped = good.clone();
        flipped[20] ^= 4;
        s.put(&key_of(&a.sign_id()), &flipped).unwrap();
        // b's record under c's key.
        s.put(&key_of(&c.sign_id()), &encode(&info_of(&b, 9), now))
            .unwrap();
        // A poisoned nodeInfo with a valid checksum.
        let mut poisoned = MAGIC.to_vec();
        poisoned.extend_from_slice(&now.to_be_bytes());
        poisoned.extend_from_slice(
            json!({"signId": d.sign_id().to_string(), "boxId": a.box_id().to_string()})
                .to_string()
                .as_bytes(),
        );
        let sum = checksum(&[&poisoned]);
        poisoned.extend_from_slice(&sum);
        s.put(&key_of(&d.sign_id()), &poisoned).unwrap();
        // An aged one.
        s.put(&key_of(&b.sign_id()), &encode(&info_of(&b, 9), 1))
            .unwrap();
        s.put(&format!("{KEY_PREFIX}huge"), &vec![0; MAX_RECORD + 1])
            .unwrap();
        let m = PeerMemory::load(&mut s, &mut keys, now);
        assert_eq!(m.len(), 0);
        assert!(s.keys().unwrap().iter().all(|k| !k.starts_with(KEY_PREFIX)));
    }

    #[test]
    fn the_bound_holds_and_the_least_recently_used_goes() {
        let mut s = MemStore::new();
        let mut keys = KeyCache::new(16);
        let mut m = PeerMemory::default();
        let ids: Vec<Identity> = (0..REMEMBERED_PEERS + 1)
            .map(|_| Identity::generate())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            m.remember(&mut s, &info_of(id, 9), 1_000 + i as u64);
        }
        assert_eq!(m.len(), REMEMBERED_PEERS);
        assert!(m.get(&ids[0].box_id()).is_none(), "the oldest went");
        let m2 = PeerMemory::load(&mut s, &mut keys, 5_000);
        assert_eq!(m2.len(), REMEMBERED_PEERS);
    }
}
