//! The routing table: 160 buckets of at most `k` contacts, least recently seen first, as `kad`
//! 1.6 keeps them, with its rule for a full bucket (the newcomer is dropped unless the head has
//! not been heard from for [`super::Config::ping_ttl`]; then the head is pinged and replaced if
//! it does not answer). Only contacts heard from directly (the authenticated sender of a valid
//! message) enter the table; contacts that others mention are lookup candidates only. Memory is
//! bounded by 160 x `k` contacts plus one waiting newcomer per bucket.

use super::id::{NodeId, ID_BITS};
use super::rpc::Contact;

/// One bucket.
#[derive(Debug, Default, Clone)]
pub struct Bucket {
    /// Least recently seen first.
    pub contacts: Vec<Contact>,
    /// A newcomer waiting for the head's answer to a PING.
    pub candidate: Option<Contact>,
    /// The id of the PING sent to the head, if one is out.
    pub pinging: Option<String>,
}

/// What [`Table::update`] did.
#[derive(Debug, PartialEq)]
pub enum Update {
    /// Already there: moved to the tail (its nodeInfo replaced if it changed; `true` then).
    Refreshed(bool),
    /// Added.
    Added,
    /// Bucket full and its head recently seen: dropped (kept as the bucket's candidate).
    Dropped,
    /// Bucket full and its head stale: the caller must PING this head (bucket index given).
    PingHead(usize, Contact),
}

/// The table (see the module docs).
#[derive(Debug, Clone)]
pub struct Table {
    me: NodeId,
    k: usize,
    /// Bucket `i` (`kad`'s index: 159 minus the bits shared with `me`) is at
    /// `buckets[159 - i]`, and only slots up to the nearest bucket used exist: most contacts
    /// are in the far buckets (half of all ids in bucket 159, slot 0), so an empty table
    /// allocates nothing and a small one is cheap to clone (the fuzz target clones a node per
    /// input).
    buckets: Vec<Bucket>,
}

/// Where bucket `index` is in [`Table`]'s `buckets`.
fn slot(index: usize) -> usize {
    ID_BITS - 1 - index.min(ID_BITS - 1)
}

impl Table {
    /// An empty table for node `me`, `k` contacts a bucket.
    pub fn new(me: NodeId, k: usize) -> Table {
        Table {
            me,
            k: k.max(1),
            buckets: Vec::new(),
        }
    }

    /// Our id.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Number of contacts.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.contacts.len()).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|b| b.contacts.is_empty())
    }

    /// A bucket (made if it did not exist yet).
    pub fn bucket_mut(&mut self, index: usize) -> &mut Bucket {
        let s = slot(index);
        if self.buckets.len() <= s {
            self.buckets.resize_with(s + 1, Bucket::default);
        }
        &mut self.buckets[s]
    }

    /// Indexes of the non-empty buckets, in increasing order.
    pub fn occupied(&self) -> Vec<usize> {
        (0..self.buckets.len())
            .rev()
            .filter(|s| !self.buckets[*s].contacts.is_empty())
            .map(slot)
            .collect()
    }

    /// The contact with this id.
    pub fn get(&self, id: &NodeId) -> Option<&Contact> {
        let b = self.buckets.get(slot(self.me.bucket_index(id)))?;
        b.contacts.iter().find(|c| c.id == *id)
    }

    /// Every contact.
    pub fn iter(&self) -> impl Iterator<Item = &Contact> {
        self.buckets.iter().flat_map(|b| b.contacts.iter())
    }

    /// A contact was heard from at `now_ms` (`kad`'s `updateContact`).
    pub fn update(&mut self, mut c: Contact, now_ms: f64, ping_ttl_ms: f64) -> Update {
        if c.id == self.me {
            return Update::Dropped;
        }
        c.last_seen = now_ms;
        let k = self.k;
        let index = self.me.bucket_index(&c.id);
        let b = self.bucket_mut(index);
        if let Some(i) = b.contacts.iter().position(|x| x.id == c.id) {
            let old = b.contacts.remove(i);
            let changed = old.node_info != c.node_info;
            b.contacts.push(c);
            return Update::Refreshed(changed);
        }
        if b.contacts.len() < k {
            b.contacts.push(c);
            return Update::Added;
        }
        let head = &mut b.contacts[0];
        if now_ms - head.last_seen < ping_ttl_ms || b.pinging.is_some() {
            b.candidate = Some(c);
            return Update::Dropped;
        }
        // kad pretends to have seen the head, so a busy bucket does not ping it to death.
        head.last_seen = now_ms;
        let head = head.clone();
        b.candidate = Some(c);
        Update::PingHead(index, head)
    }

    /// Removes a contact (it did not answer); its bucket's candidate, if any, takes its place.
    /// Returns whether it was there.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        let Some(b) = self.buckets.get_mut(slot(self.me.bucket_index(id))) else {
            return false;
        };
        let Some(i) = b.contacts.iter().position(|x| x.id == *id) else {
            return false;
        };
        b.contacts.remove(i);
        if let Some(c) = b.candidate.take() {
            b.contacts.push(c);
        }
        true
    }

    /// The `limit` contacts closest to `target`, closest first, without `exclude`.
    pub fn closest(&self, target: &NodeId, limit: usize, exclude: Option<&NodeId>) -> Vec<Contact> {
        let mut all: Vec<(&Contact, [u8; 20])> = self
            .iter()
            .filter(|c| Some(&c.id) != exclude)
            .map(|c| (c, c.id.distance(target)))
            .collect();
        all.sort_by_key(|a| a.1);
        all.into_iter()
            .take(limit)
            .map(|(c, _)| c.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::services::kademlia::json::JsValue;

    fn contact(id: NodeId) -> Contact {
        let who = Identity::generate();
        Contact {
            id,
            sign_id: who.sign_id(),
            box_id: who.box_id(),
            node_info: JsValue::obj(),
            last_seen: 0.0,
        }
    }

    #[test]
    fn buckets_are_made_as_used_and_keep_kads_indexes() {
        let me = NodeId::of_key("me");
        let mut t = Table::new(me, 2);
        assert!(t.is_empty() && t.occupied().is_empty());
        let far = me.random_in_bucket(159);
        assert!(!t.remove(&far) && t.get(&far).is_none());
        for (index, n) in [(159, 3), (3, 1), (0, 1), (100, 2)] {
            for _ in 0..n {
                t.update(contact(me.random_in_bucket(index)), 1.0, 1e9);
            }
        }
        // k = 2: the third contact of bucket 159 waits as its candidate.
        assert_eq!(t.len(), 6);
        assert_eq!(t.occupied(), vec![0, 3, 100, 159]);
        assert!(t.bucket_mut(159).candidate.is_some());
        let near = t.iter().find(|c| me.bucket_index(&c.id) == 3).unwrap().id;
        assert_eq!(t.get(&near).map(|c| c.id), Some(near));
        assert!(t.remove(&near));
        assert_eq!(t.occupied(), vec![0, 100, 159]);
        // A stale head of a full bucket is named with its bucket's index.
        let next = contact(me.random_in_bucket(159));
        match t.update(next, 1e10, 1.0) {
            Update::PingHead(159, head) => assert_eq!(me.bucket_index(&head.id), 159),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.closest(&me, 10, None).len(), 5, "every contact is found");
    }
}
