//! The bus: a trie of topic patterns and the table of subscriptions attached to them.
//!
//! Topics are dot-separated segments (`self.chat.room`). A pattern is matched segment by
//! segment with the original platform's wildcard semantics:
//!
//! - a literal segment matches the same segment;
//! - `*` matches exactly one segment when more pattern follows (`a.*.c` matches `a.b.c`, not
//!   `a.c` nor `a.b.b.c`);
//! - a trailing `*` matches one or more segments (`room.*` matches `room.a` and `room.a.b`, but
//!   not `room` alone); so the pattern `*` matches every topic.
//!
//! # Valid topics and patterns
//!
//! The one rule for what the local API accepts ([`check_topic`], [`check_pattern`]): a topic
//! is one or more segments separated by `.`, and a segment is non-empty and contains no `*`,
//! no whitespace ([`char::is_whitespace`]) and no control character ([`char::is_control`], `\0`
//! included). Anything else is allowed (`transports.nodeInfo`, `kademlia-v1.ping`,
//! `room#42.say` are valid). A pattern follows the same rule, except that a segment may be
//! exactly `*`. So `""`, `"chat..say"`, `".chat"`, `"chat.*"` (as a topic), `"has space"`,
//! `"a\0b"`, and the patterns `""`, `"**"`, `"a.b*"` are refused. Only local input is
//! checked (sends and subscriptions of the application and of services): topics arriving from
//! other nodes are delivered as they come (the original JavaScript nodes check nothing), and
//! simply match no pattern when they break the rule.
//!
//! Matching never allocates: the trie is walked with the topic's segment iterator and the
//! matches are appended to a buffer the caller reuses. A topic reaches each trie node at most
//! once, so a subscription matches a given topic at most once. Subscriptions carry an optional
//! protocol filter (the protocol APIs only see their own protocol) and a `once` flag.
//!
//! This module only stores and matches; delivering (running callbacks, feeding channels,
//! applying changes made by callbacks) is the reactor's job ([`crate::platform`]). Matches are
//! reported with the subscription's sequence number, so the reactor delivers to several
//! subscribers in the order they subscribed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use slab::Slab;

/// Identifies one subscription; returned by `on`/`once`, accepted by `off`. Stale ids (of a
/// subscription already removed) are recognised and ignored, even if the slot was reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SubscriptionId {
    key: u32,
    gen: u32,
}

/// What is wrong with a topic or a pattern.
///
/// The rule: a topic is one or more segments separated by `.`; a segment is non-empty and
/// contains no `*`, no whitespace ([`char::is_whitespace`]) and no control character
/// ([`char::is_control`], `\0` included); any other character is allowed. A pattern follows the
/// same rule, except that a segment may be exactly `*`. Only local input is checked (sends and
/// subscriptions); topics from other nodes are delivered as they come.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum TopicError {
    /// The topic or pattern is empty.
    Empty,
    /// A segment is empty: a leading, trailing or doubled `.`.
    EmptySegment,
    /// A `*` in a topic, or in a pattern segment that is not exactly `*`.
    Wildcard,
    /// A whitespace character (tab and newline included).
    Whitespace,
    /// A control character (`\0`, `\n`, DEL, ...).
    Control,
}

impl std::fmt::Display for TopicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TopicError::Empty => "empty topic",
            TopicError::EmptySegment => "empty topic segment (leading, trailing or doubled '.')",
            TopicError::Wildcard => "'*' is only allowed as a whole pattern segment",
            TopicError::Whitespace => "whitespace in a topic",
            TopicError::Control => "control character in a topic",
        })
    }
}

impl std::error::Error for TopicError {}

/// Checks `s` against the rule, segments of exactly `*` allowed when `pattern`.
fn check(s: &str, pattern: bool) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    for seg in s.split('.') {
        if seg.is_empty() {
            return Err(TopicError::EmptySegment);
        }
        if pattern && seg == "*" {
            continue;
        }
        for c in seg.chars() {
            if c == '*' {
                return Err(TopicError::Wildcard);
            }
            // Whitespace first: a tab or a newline is reported as whitespace.
            if c.is_whitespace() {
                return Err(TopicError::Whitespace);
            }
            if c.is_control() {
                return Err(TopicError::Control);
            }
        }
    }
    Ok(())
}

/// Whether `topic` is a valid topic to send on (the rule is in [`TopicError`]).
///
/// ```
/// use mm_platform::{check_topic, TopicError};
/// assert_eq!(check_topic("chat.say"), Ok(()));
/// assert_eq!(check_topic("chat..say"), Err(TopicError::EmptySegment));
/// assert_eq!(check_topic("chat.*"), Err(TopicError::Wildcard));
/// ```
pub fn check_topic(topic: &str) -> Result<(), TopicError> {
    check(topic, false)
}

/// Whether `pattern` is a valid pattern to subscribe to (the rule is in [`TopicError`]): a
/// subscription to an invalid one panics, so a pattern built at run time is checked first.
///
/// ```
/// use mm_platform::{check_pattern, TopicError};
/// assert_eq!(check_pattern("self.chat.*"), Ok(()));
/// assert_eq!(check_pattern("*"), Ok(()));
/// assert_eq!(check_pattern("**"), Err(TopicError::Wildcard));
/// assert_eq!(check_pattern(""), Err(TopicError::Empty));
/// ```
pub fn check_pattern(pattern: &str) -> Result<(), TopicError> {
    check(pattern, true)
}

/// FNV-1a: a fast hash for short topic segments. Only locally chosen patterns are stored in the
/// trie (the network can only make lookups), so hash flooding is not a concern.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

#[derive(Default)]
struct Node {
    children: FnvMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    /// Subscriptions whose pattern ends at this node (for a `*` node: ends with that `*`).
    subs: Vec<SubscriptionId>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.star.is_none() && self.subs.is_empty()
    }
}

struct Entry<T> {
    gen: u32,
    seq: u64,
    pattern: Box<str>,
    protocol: Option<Cow<'static, str>>,
    once: bool,
    target: Option<T>,
}

/// One match of a topic: the subscription's order of creation and its id.
pub(crate) type Match = (u64, SubscriptionId);

/// The subscription table and its trie. `T` is what a subscription delivers to.
pub(crate) struct Bus<T> {
    root: Node,
    entries: Slab<Entry<T>>,
    next_gen: u32,
    next_seq: u64,
}

impl<T> Default for Bus<T> {
    fn default() -> Self {
        Bus {
            root: Node::default(),
            entries: Slab::new(),
            next_gen: 0,
            next_seq: 0,
        }
    }
}

impl<T> Bus<T> {
    /// Adds a subscription to `pattern`, optionally only for messages of `protocol`.
    pub(crate) fn insert(
        &mut self,
        pattern: &str,
        protocol: Option<Cow<'static, str>>,
        once: bool,
        target: T,
    ) -> SubscriptionId {
        self.next_gen = self.next_gen.wrapping_add(1);
        self.next_seq += 1;
        let gen = self.next_gen;
        let key = self.entries.insert(Entry {
            gen,
            seq: self.next_seq,
            pattern: pattern.into(),
            protocol,
            once,
            target: Some(target),
        });
        let id = SubscriptionId {
            key: key as u32,
            gen,
        };
        let mut node = &mut self.root;
        for seg in pattern.split('.') {
            node = if seg == "*" {
                node.star.get_or_insert_with(Default::default)
            } else {
                node.children.entry(seg.into()).or_default()
            };
        }
        node.subs.push(id);
        id
    }

    fn live(&self, id: SubscriptionId) -> Option<&Entry<T>> {
        self.entries
            .get(id.key as usize)
            .filter(|e| e.gen == id.gen)
    }

    /// Whether `id` is a current subscription.
    #[cfg(test)]
    pub(crate) fn contains(&self, id: SubscriptionId) -> bool {
        self.live(id).is_some()
    }

    /// Removes a subscription; `false` if it was already gone. Its target is dropped (unless it
    /// is currently taken out for delivery, in which case [`Bus::restore`] drops it).
    pub(crate) fn remove(&mut self, id: SubscriptionId) -> bool {
        if self.live(id).is_none() {
            return false;
        }
        let entry = self.entries.remove(id.key as usize);
        let segs: Vec<&str> = entry.pattern.split('.').collect();
        remove_from(&mut self.root, &segs, id);
        true
    }

    /// Removes every subscription whose target satisfies `pred` (targets taken out for
    /// delivery are not seen). Returns how many were removed.
    pub(crate) fn remove_where(&mut self, mut pred: impl FnMut(&T) -> bool) -> usize {
        let ids: Vec<SubscriptionId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.target.as_ref().is_some_and(&mut pred))
            .map(|(k, e)| SubscriptionId {
                key: k as u32,
                gen: e.gen,
            })
            .collect();
        for id in &ids {
            self.remove(*id);
        }
        ids.len()
    }

    /// Number of subscriptions.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Appends to `out` every subscription matching the topic made of `segments` (which must
    /// yield at least one segment) for a message of `protocol`.
    pub(crate) fn collect<'s, I>(&self, segments: I, protocol: &str, out: &mut Vec<Match>)
    where
        I: Iterator<Item = &'s str> + Clone,
    {
        self.walk(&self.root, segments, true, protocol, out);
    }

    fn push_subs(&self, subs: &[SubscriptionId], protocol: &str, out: &mut Vec<Match>) {
        for &id in subs {
            if let Some(e) = self.live(id) {
                let wanted = match e.protocol.as_deref() {
                    None => true,
                    Some(p) => p == protocol,
                };
                if wanted {
                    out.push((e.seq, id));
                }
            }
        }
    }

    fn walk<'s, I>(
        &self,
        node: &Node,
        mut rest: I,
        terminal: bool,
        protocol: &str,
        out: &mut Vec<Match>,
    ) where
        I: Iterator<Item = &'s str> + Clone,
    {
        match rest.next() {
            None => {
                if terminal {
                    self.push_subs(&node.subs, protocol, out);
                }
            }
            Some(seg) => {
                if let Some(child) = node.children.get(seg) {
                    self.walk(child, rest.clone(), true, protocol, out);
                }
                if let Some(star) = &node.star {
                    // A pattern ending in this `*` matches this segment and everything after.
                    self.push_subs(&star.subs, protocol, out);
                    // A `*` followed by more pattern consumes exactly this segment.
                    self.walk(star, rest, false, protocol, out);
                }
            }
        }
    }

    /// Takes the target of `id` out for delivery. A `once` subscription is removed entirely
    /// (so it can never be delivered to again, even by messages its callback sends); otherwise
    /// the slot stays and [`Bus::restore`] puts the target back. `None` if `id` is gone.
    pub(crate) fn take(&mut self, id: SubscriptionId) -> Option<(T, bool)> {
        let entry = self.entries.get_mut(id.key as usize)?;
        if entry.gen != id.gen {
            return None;
        }
        if entry.once {
            let target = entry.target.take();
            self.remove(id);
            return target.map(|t| (t, true));
        }
        entry.target.take().map(|t| (t, false))
    }

    /// Returns a target taken by [`Bus::take`]; dropped if the subscription was removed
    /// meanwhile.
    pub(crate) fn restore(&mut self, id: SubscriptionId, target: T) {
        if let Some(entry) = self.entries.get_mut(id.key as usize) {
            if entry.gen == id.gen && entry.target.is_none() {
                entry.target = Some(target);
            }
        }
    }
}

fn remove_from(node: &mut Node, segs: &[&str], id: SubscriptionId) -> bool {
    match segs.split_first() {
        None => {
            if let Some(i) = node.subs.iter().position(|s| *s == id) {
                node.subs.remove(i);
            }
        }
        Some((&"*", rest)) => {
            if let Some(star) = node.star.as_deref_mut() {
                if remove_from(star, rest, id) {
                    node.star = None;
                }
            }
        }
        Some((seg, rest)) => {
            if let Some(child) = node.children.get_mut(*seg) {
                if remove_from(child, rest, id) {
                    node.children.remove(*seg);
                }
            }
        }
    }
    node.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(bus: &Bus<&'static str>, topic: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        bus.collect(topic.split('.'), "ms", &mut out);
        let mut names: Vec<&'static str> = out
            .iter()
            .map(|(_, id)| *bus.live(*id).unwrap().target.as_ref().unwrap())
            .collect();
        names.sort_unstable();
        names
    }

    fn bus_with(patterns: &[&'static str]) -> Bus<&'static str> {
        let mut bus = Bus::default();
        for p in patterns {
            bus.insert(p, None, false, *p);
        }
        bus
    }

    #[test]
    fn original_wildcard_semantics() {
        let bus = bus_with(&["room.*", "a.*.c", "room", "*", "x.y", "a.*", "a.*.*"]);
        assert_eq!(matches(&bus, "room.a"), vec!["*", "room.*"]);
        assert_eq!(matches(&bus, "room.a.b"), vec!["*", "room.*"]);
        assert_eq!(matches(&bus, "room"), vec!["*", "room"]);
        assert_eq!(matches(&bus, "a.b.c"), vec!["*", "a.*", "a.*.*", "a.*.c"]);
        assert_eq!(matches(&bus, "a.c"), vec!["*", "a.*"]);
        assert_eq!(matches(&bus, "a.b.b.c"), vec!["*", "a.*", "a.*.*"]);
        assert_eq!(matches(&bus, "x.y"), vec!["*", "x.y"]);
        assert_eq!(matches(&bus, "x.y.z"), vec!["*"]);
        assert_eq!(matches(&bus, "x"), vec!["*"]);
        assert_eq!(matches(&bus, "rooms.a"), vec!["*"]);
    }

    #[test]
    fn protocol_filter_and_order() {
        let mut bus: Bus<u32> = Bus::default();
        let b = bus.insert("t.*", Some("bt".into()), false, 1);
        let m = bus.insert("t.x", Some("ms".into()), false, 2);
        let any = bus.insert("t.x", None, false, 3);
        let mut out = Vec::new();
        bus.collect("t.x".split('.'), "ms", &mut out);
        out.sort_unstable();
        assert_eq!(out.iter().map(|m| m.1).collect::<Vec<_>>(), vec![m, any]);
        out.clear();
        bus.collect("t.x".split('.'), "bt", &mut out);
        out.sort_unstable();
        assert_eq!(out.iter().map(|m| m.1).collect::<Vec<_>>(), vec![b, any]);
    }

    #[test]
    fn remove_prunes_and_stale_ids_are_ignored() {
        let mut bus: Bus<u32> = Bus::default();
        let a = bus.insert("a.b.c", None, false, 1);
        let s = bus.insert("a.*", None, false, 2);
        assert!(bus.remove(a));
        assert!(!bus.remove(a));
        assert!(bus.root.children["a"].children.is_empty());
        assert!(bus.remove(s));
        assert!(bus.root.is_empty());
        // The slot is reused with a new generation: the old id stays dead.
        let c = bus.insert("a.b.c", None, false, 3);
        assert_ne!(a, c);
        assert!(!bus.remove(a));
        assert!(bus.contains(c));
        assert_eq!(bus.len(), 1);
    }

    #[test]
    fn once_is_removed_on_take() {
        let mut bus: Bus<u32> = Bus::default();
        let id = bus.insert("x", None, true, 7);
        assert_eq!(bus.take(id), Some((7, true)));
        assert!(!bus.contains(id));
        assert_eq!(bus.take(id), None);
        let id = bus.insert("x", None, false, 8);
        let (t, once) = bus.take(id).unwrap();
        assert!(!once);
        assert_eq!(bus.take(id), None);
        bus.restore(id, t);
        assert_eq!(bus.take(id), Some((8, false)));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// The specification, written the slow and obvious way.
    fn naive(pattern: &[&str], topic: &[&str]) -> bool {
        match (pattern.split_first(), topic.split_first()) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some((&"*", [])), Some(_)) => true,
            (Some((&"*", prest)), Some((_, trest))) => naive(prest, trest),
            (Some((p, prest)), Some((t, trest))) => p == t && naive(prest, trest),
        }
    }

    fn segs(
        alphabet: &'static [&'static str],
        max: usize,
    ) -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(prop::sample::select(alphabet), 1..=max)
    }

    proptest! {
        #[test]
        fn trie_matches_the_naive_definition(
            patterns in prop::collection::vec(segs(&["a", "b", "*", ""], 4), 1..12),
            topics in prop::collection::vec(segs(&["a", "b", "", "*"], 6), 1..12),
            removed in prop::collection::vec(any::<bool>(), 12),
        ) {
            let mut bus: Bus<usize> = Bus::default();
            let mut live = Vec::new();
            for (i, p) in patterns.iter().enumerate() {
                let id = bus.insert(&p.join("."), None, false, i);
                live.push((id, i));
            }
            // Remove some, to exercise pruning.
            live.retain(|(id, _)| {
                let remove = removed[id.key as usize % removed.len()];
                if remove {
                    assert!(bus.remove(*id));
                }
                !remove
            });
            for t in &topics {
                let topic = t.join(".");
                let mut out = Vec::new();
                bus.collect(topic.split('.'), "ms", &mut out);
                let mut got: Vec<usize> = out
                    .iter()
                    .map(|(_, id)| *bus.live(*id).unwrap().target.as_ref().unwrap())
                    .collect();
                got.sort_unstable();
                let topic_segs: Vec<&str> = topic.split('.').collect();
                let mut want: Vec<usize> = live
                    .iter()
                    .filter(|(_, i)| {
                        let p = patterns[*i].join(".");
                        let p: Vec<&str> = p.split('.').collect();
                        naive(&p, &topic_segs)
                    })
                    .map(|(_, i)| *i)
                    .collect();
                want.sort_unstable();
                prop_assert_eq!(got, want, "topic {:?}", topic);
            }
        }
    }
}
