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
    buckets: Vec<Bucket>,
}

impl Table {
    /// An empty table for node `me`, `k` contacts a bucket.
    pub fn new(me: NodeId, k: usize) -> Table {
        Table {
            me,
            k: k.max(1),
            buckets: vec![Bucket::default(); ID_BITS],
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

    /// A bucket.
    pub fn bucket_mut(&mut self, index: usize) -> &mut Bucket {
        &mut self.buckets[index.min(ID_BITS - 1)]
    }

    /// Indexes of the non-empty buckets.
    pub fn occupied(&self) -> Vec<usize> {
        (0..ID_BITS)
            .filter(|i| !self.buckets[*i].contacts.is_empty())
            .collect()
    }

    /// The contact with this id.
    pub fn get(&self, id: &NodeId) -> Option<&Contact> {
        let b = &self.buckets[self.me.bucket_index(id)];
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
        let b = &mut self.buckets[self.me.bucket_index(&c.id)];
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
        Update::PingHead(self.me.bucket_index(&head.id), head)
    }

    /// Removes a contact (it did not answer); its bucket's candidate, if any, takes its place.
    /// Returns whether it was there.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        let b = &mut self.buckets[self.me.bucket_index(id)];
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
