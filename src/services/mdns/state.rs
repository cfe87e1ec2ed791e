//! The mDNS discovery state machine, sans-IO: packets and bus requests with a `now` in,
//! packets to multicast, nodeInfos to publish and the next deadline out. No socket, no clock.
//!
//! Behaviour (the original `mm-services-mdns` 0.6.8, bounded):
//!
//! - **Answering.** A query for `_mm.local` TXT is answered with our nodeInfo (once we know
//!   it), at most once per [`Timing::min_answer_interval`]; queries arriving faster are folded
//!   into one deferred answer. Our own queries (recognised by their id) are not answered.
//! - **Announcing.** When our nodeInfo changes (the first one included) it is multicast
//!   unasked, through the same rate limit. The original announces on every
//!   `transports.myNodeInfo`, also the unchanged 5-minute republications; we announce less,
//!   never more, since an answer reaching a JS node before it knows its own nodeInfo kills it.
//! - **Querying.** `requestBootstrapNodeInfo`, and `requestNodeInfo` for a node not already
//!   seen, start the original's schedule: a query every 400 ms, and after 10 a pause of 20 s,
//!   then again; it stops once a bootstrap request got an answer from another node and every
//!   requested node was found or its request expired ([`Timing::request_ttl`]). (The original
//!   stops at the first answer.) A request while a schedule runs does not start another.
//! - **Publishing.** A nodeInfo in an answer is checked ([`NodeInfo::from_json`]: valid keys,
//!   boxId the conversion of signId); ours and invalid ones are dropped. A valid one is
//!   published (as `transports.nodeInfo` and `transports.nodeInfoBootstrap`) when it is new,
//!   changed, requested, or last published more than [`Timing::republish_after`] ago; a
//!   token bucket ([`Timing::publish_burst`], [`Timing::publish_per_sec`]) bounds the rate.
//! - **Memory.** At most [`Timing::max_seen`] nodes remembered (the least recently heard
//!   forgotten first), [`Timing::max_requests`] pending requests, [`OUT_QUEUE`] packets and
//!   publications waiting; texts over [`super::wire::MAX_NODE_INFO`] are refused by the codec.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::wire::{self, DecodeError, Decoded};
use crate::identity::{BoxId, KeyCache, SignId};
use crate::platform::directory::{NodeInfo, NodeInfoError};

/// Most packets, and most publications, waiting to be taken.
pub const OUT_QUEUE: usize = 64;
/// How many of our recent query ids are remembered.
const OWN_IDS: usize = 16;

/// Timings and bounds of the machine. The defaults are the original's schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Between two queries of a round (400 ms).
    pub query_interval: Duration,
    /// Queries in a round (10).
    pub queries_per_round: u32,
    /// Pause after a round (20 s).
    pub round_pause: Duration,
    /// Least time between two answers or announcements of ours (1 s).
    pub min_answer_interval: Duration,
    /// An unchanged nodeInfo is published again after this long (60 s).
    pub republish_after: Duration,
    /// A `requestNodeInfo` keeps the queries going this long at most (60 s).
    pub request_ttl: Duration,
    /// Nodes remembered (128).
    pub max_seen: usize,
    /// Pending `requestNodeInfo` lookups (64).
    pub max_requests: usize,
    /// Publications allowed in a burst (32).
    pub publish_burst: u32,
    /// Publications per second after a burst (8).
    pub publish_per_sec: u32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            query_interval: Duration::from_millis(400),
            queries_per_round: 10,
            round_pause: Duration::from_secs(20),
            min_answer_interval: Duration::from_secs(1),
            republish_after: Duration::from_secs(60),
            request_ttl: Duration::from_secs(60),
            max_seen: 128,
            max_requests: 64,
            publish_burst: 32,
            publish_per_sec: 8,
        }
    }
}

/// Counters of what the machine received, sent and dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MdnsStats {
    /// Packets handed in.
    pub packets: u64,
    /// Packets refused: not DNS, truncated, or over the size limit.
    pub malformed_packets: u64,
    /// `_mm.local` texts that were not a valid nodeInfo (not JSON, bad keys).
    pub invalid_node_infos: u64,
    /// nodeInfos whose boxId is not their signId's (forged).
    pub forged: u64,
    /// Our own nodeInfo heard back, and our own queries.
    pub own: u64,
    /// Packets refused by the socket layer (from outside the interface's scope).
    pub foreign: u64,
    /// Valid nodeInfos from other nodes.
    pub heard: u64,
    /// nodeInfos published.
    pub published: u64,
    /// Publications dropped by the rate limit or a full queue.
    pub suppressed: u64,
    /// Queries sent.
    pub queries_sent: u64,
    /// Answers and announcements sent.
    pub answers_sent: u64,
    /// Nodes remembered now.
    pub remembered: usize,
    /// `requestNodeInfo` lookups pending now.
    pub requests: usize,
}

struct Mine {
    json: Vec<u8>,
    sign: SignId,
    boxid: BoxId,
}

struct Seen {
    json: Vec<u8>,
    boxid: BoxId,
    value: Value,
    published: Option<Instant>,
    heard: Instant,
}

/// The discovery state machine (see the module docs).
pub struct MdnsState {
    timing: Timing,
    keys: KeyCache,
    mine: Option<Mine>,
    announced: Option<Vec<u8>>,
    next_answer_at: Option<Instant>,
    answer_pending: bool,
    want_bootstrap: bool,
    wanted: HashMap<String, Instant>,
    next_query: Option<Instant>,
    sent_in_round: u32,
    own_ids: VecDeque<u16>,
    rng: u64,
    seen: HashMap<SignId, Seen>,
    tokens: f64,
    refilled: Option<Instant>,
    transmit: VecDeque<Vec<u8>>,
    publications: VecDeque<Value>,
    stats: MdnsStats,
}

impl MdnsState {
    /// A machine with these timings; `seed` picks our query ids.
    pub fn new(timing: Timing, seed: u64) -> MdnsState {
        MdnsState {
            timing,
            keys: KeyCache::new(timing.max_seen.max(16) * 2),
            mine: None,
            announced: None,
            next_answer_at: None,
            answer_pending: false,
            want_bootstrap: false,
            wanted: HashMap::new(),
            next_query: None,
            sent_in_round: 0,
            own_ids: VecDeque::with_capacity(OWN_IDS),
            rng: seed | 1,
            seen: HashMap::new(),
            tokens: f64::from(timing.publish_burst),
            refilled: None,
            transmit: VecDeque::new(),
            publications: VecDeque::new(),
            stats: MdnsStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> MdnsStats {
        MdnsStats {
            remembered: self.seen.len(),
            requests: self.wanted.len(),
            ..self.stats
        }
    }

    /// Our nodeInfo (from `self.transports.myNodeInfo`). A changed one is announced. Returns
    /// `false` if it is not a valid nodeInfo (then nothing changes).
    pub fn set_my_node_info(&mut self, info: &Value, now: Instant) -> bool {
        let Ok(parsed) = NodeInfo::from_json(info, &mut self.keys) else {
            return false;
        };
        let Ok(json) = serde_json::to_vec(info) else {
            return false;
        };
        if json.len() > wire::MAX_NODE_INFO {
            log::debug!("mdns: our nodeInfo is too large to announce");
            return false;
        }
        self.mine = Some(Mine {
            json: json.clone(),
            sign: parsed.sign_id,
            boxid: parsed.box_id,
        });
        if self.announced.as_ref() != Some(&json) {
            self.announced = Some(json);
            self.answer(now);
        }
        true
    }

    /// `self.transports.requestBootstrapNodeInfo`: find the nodes on the local network.
    pub fn request_bootstrap(&mut self, now: Instant) {
        self.want_bootstrap = true;
        self.start_queries(now);
    }

    /// `self.transports.requestNodeInfo` (payload a signId, or a boxId as the original's
    /// directory sends): published at once if that node was seen, otherwise asked for.
    pub fn request_node_info(&mut self, key: &Value, now: Instant) {
        let Some(key) = key.as_str().filter(|k| k.len() <= 64) else {
            return;
        };
        let found = self
            .seen
            .iter()
            .find(|(s, e)| s.to_string() == key || e.boxid.to_string() == key)
            .map(|(s, _)| *s);
        if let Some(sign) = found {
            self.publish(sign, now);
            return;
        }
        self.wanted.retain(|_, exp| *exp > now);
        if self.wanted.len() >= self.timing.max_requests && !self.wanted.contains_key(key) {
            log::debug!("mdns: too many pending lookups; request dropped");
            return;
        }
        self.wanted
            .insert(key.to_owned(), now + self.timing.request_ttl);
        self.start_queries(now);
    }

    /// A packet received on the mDNS socket.
    pub fn handle_packet(&mut self, bytes: &[u8], now: Instant) {
        self.stats.packets += 1;
        match wire::decode(bytes) {
            Err(DecodeError::TooLarge | DecodeError::Malformed) => {
                self.stats.malformed_packets += 1;
            }
            Ok(Decoded::Query { id, asks_mm }) => {
                if id != 0 && self.own_ids.contains(&id) {
                    self.stats.own += 1;
                } else if asks_mm {
                    self.answer(now);
                }
            }
            Ok(Decoded::Response(texts)) => {
                for text in texts {
                    self.handle_text(&text, now);
                }
            }
        }
    }

    /// Counts a packet the socket layer refused.
    pub fn count_foreign(&mut self) {
        self.stats.foreign += 1;
    }

    fn handle_text(&mut self, text: &[u8], now: Instant) {
        let Ok(value) = serde_json::from_slice::<Value>(text) else {
            self.stats.invalid_node_infos += 1;
            return;
        };
        let info = match NodeInfo::from_json(&value, &mut self.keys) {
            Ok(i) => i,
            Err(NodeInfoError::KeyMismatch) => {
                self.stats.forged += 1;
                return;
            }
            Err(_) => {
                self.stats.invalid_node_infos += 1;
                return;
            }
        };
        if self
            .mine
            .as_ref()
            .is_some_and(|m| m.sign == info.sign_id || m.boxid == info.box_id)
        {
            self.stats.own += 1;
            return;
        }
        self.stats.heard += 1;
        let json = serde_json::to_vec(&value).unwrap_or_default();
        self.want_bootstrap = false;
        let requested = self.wanted.remove(&info.sign_id.to_string()).is_some()
            | self.wanted.remove(&info.box_id.to_string()).is_some();
        let due = match self.seen.get_mut(&info.sign_id) {
            Some(s) => {
                s.heard = now;
                let changed = s.json != json;
                if changed {
                    s.json = json;
                    s.value = value;
                    s.boxid = info.box_id;
                }
                changed
                    || requested
                    || s.published.is_none_or(|t| {
                        now.saturating_duration_since(t) >= self.timing.republish_after
                    })
            }
            None => {
                if self.seen.len() >= self.timing.max_seen {
                    if let Some(oldest) = self
                        .seen
                        .iter()
                        .min_by_key(|(_, s)| s.heard)
                        .map(|(k, _)| *k)
                    {
                        self.seen.remove(&oldest);
                    }
                }
                self.seen.insert(
                    info.sign_id,
                    Seen {
                        json,
                        boxid: info.box_id,
                        value,
                        published: None,
                        heard: now,
                    },
                );
                true
            }
        };
        if due {
            self.publish(info.sign_id, now);
        }
    }

    /// Publishes a remembered node if the rate limit and the queue allow.
    fn publish(&mut self, sign: SignId, now: Instant) {
        let Some(s) = self.seen.get_mut(&sign) else {
            return;
        };
        let elapsed = self
            .refilled
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.refilled = Some(now);
        self.tokens = (self.tokens
            + elapsed.as_secs_f64() * f64::from(self.timing.publish_per_sec))
        .min(f64::from(self.timing.publish_burst));
        if self.tokens < 1.0 || self.publications.len() >= OUT_QUEUE {
            self.stats.suppressed += 1;
            return;
        }
        self.tokens -= 1.0;
        s.published = Some(now);
        self.publications.push_back(s.value.clone());
        self.stats.published += 1;
    }

    fn answer(&mut self, now: Instant) {
        if self.mine.is_none() {
            return;
        }
        if self.next_answer_at.is_some_and(|t| now < t) {
            self.answer_pending = true;
            return;
        }
        self.answer_pending = false;
        self.next_answer_at = Some(now + self.timing.min_answer_interval);
        let Some(pkt) = self
            .mine
            .as_ref()
            .and_then(|m| wire::encode_answer(&m.json))
        else {
            return;
        };
        if self.transmit.len() < OUT_QUEUE {
            self.transmit.push_back(pkt);
            self.stats.answers_sent += 1;
        }
    }

    fn active(&mut self, now: Instant) -> bool {
        self.wanted.retain(|_, exp| *exp > now);
        self.want_bootstrap || !self.wanted.is_empty()
    }

    fn start_queries(&mut self, now: Instant) {
        if self.next_query.is_none() {
            self.sent_in_round = 0;
            self.next_query = Some(now);
            self.handle_timeout(now);
        }
    }

    fn query_id(&mut self) -> u16 {
        loop {
            // xorshift64: only needs to differ from other nodes' ids and from 0.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let id = (self.rng >> 16) as u16;
            if id != 0 {
                return id;
            }
        }
    }

    /// Runs what is due at `now`: the next query of the schedule, a deferred answer.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_query.is_some_and(|t| t <= now) {
            if !self.active(now) {
                self.next_query = None;
            } else {
                let id = self.query_id();
                if self.own_ids.len() >= OWN_IDS {
                    self.own_ids.pop_front();
                }
                self.own_ids.push_back(id);
                if self.transmit.len() < OUT_QUEUE {
                    self.transmit.push_back(wire::encode_query(id));
                    self.stats.queries_sent += 1;
                }
                self.sent_in_round += 1;
                let mut next = now + self.timing.query_interval;
                if self.sent_in_round >= self.timing.queries_per_round {
                    self.sent_in_round = 0;
                    next += self.timing.round_pause;
                }
                self.next_query = Some(next);
            }
        }
        if self.answer_pending && self.next_answer_at.is_none_or(|t| t <= now) {
            self.answer(now);
        }
    }

    /// When [`MdnsState::handle_timeout`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let answer = if self.answer_pending {
            self.next_answer_at
        } else {
            None
        };
        match (self.next_query, answer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next packet to multicast.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next nodeInfo to publish (as `transports.nodeInfo` and
    /// `transports.nodeInfoBootstrap`).
    pub fn poll_publication(&mut self) -> Option<Value> {
        self.publications.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use serde_json::json;

    fn info_of(id: &Identity, port: u16) -> Value {
        json!({"signId": id.sign_id().to_string(), "boxId": id.box_id().to_string(),
            "connectionInfo": [{"transportType": "udp",
                "transportInfo": {"address": "127.0.0.1", "port": port}}]})
    }

    fn answer_with(v: &Value) -> Vec<u8> {
        wire::encode_answer(&serde_json::to_vec(v).unwrap()).unwrap()
    }

    fn drain(m: &mut MdnsState) -> (Vec<Decoded>, Vec<Value>) {
        let mut pkts = Vec::new();
        while let Some(p) = m.poll_transmit() {
            pkts.push(wire::decode(&p).unwrap());
        }
        let mut pubs = Vec::new();
        while let Some(p) = m.poll_publication() {
            pubs.push(p);
        }
        (pkts, pubs)
    }

    fn machine(now: Instant) -> (MdnsState, Identity) {
        let me = Identity::generate();
        let mut m = MdnsState::new(Timing::default(), 7);
        assert!(m.set_my_node_info(&info_of(&me, 1), now));
        (m, me)
    }

    #[test]
    fn announces_our_node_info_once_per_change_and_answers_queries_rate_limited() {
        let t0 = Instant::now();
        let (mut m, me) = machine(t0);
        let (pkts, _) = drain(&mut m);
        assert!(matches!(&pkts[..], [Decoded::Response(t)] if t.len() == 1));
        // The same nodeInfo again (the platform's 5-minute republication): no announcement.
        m.set_my_node_info(&info_of(&me, 1), t0 + Duration::from_secs(300));
        assert!(drain(&mut m).0.is_empty());
        // A changed one is announced.
        let t1 = t0 + Duration::from_secs(301);
        m.set_my_node_info(&info_of(&me, 2), t1);
        assert_eq!(drain(&mut m).0.len(), 1);
        // A burst of queries right after: one deferred answer, at the end of the interval.
        let q = wire::encode_query(0);
        for _ in 0..100 {
            m.handle_packet(&q, t1 + Duration::from_millis(10));
        }
        assert!(drain(&mut m).0.is_empty());
        assert_eq!(m.next_deadline(), Some(t1 + Duration::from_secs(1)));
        m.handle_timeout(t1 + Duration::from_secs(1));
        assert_eq!(drain(&mut m).0.len(), 1);
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn a_node_that_does_not_know_its_node_info_never_answers() {
        let t0 = Instant::now();
        let mut m = MdnsState::new(Timing::default(), 1);
        m.handle_packet(&wire::encode_query(0), t0);
        assert!(drain(&mut m).0.is_empty());
        assert!(!m.set_my_node_info(&json!({"signId": "nope"}), t0));
        assert!(drain(&mut m).0.is_empty());
    }

    #[test]
    fn queries_follow_the_original_schedule_and_stop_when_answered() {
        let t0 = Instant::now();
        let (mut m, _) = machine(t0);
        drain(&mut m);
        m.request_bootstrap(t0);
        let mut times = Vec::new();
        let mut now = t0;
        for _ in 0..25 {
            m.handle_timeout(now);
            for p in drain(&mut m).0 {
                if let Decoded::Query { asks_mm, .. } = p {
                    assert!(asks_mm);
                    times.push(now - t0);
                }
            }
            now = m.next_deadline().unwrap();
        }
        let ms: Vec<u128> = times.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            &ms[..11],
            &[0, 400, 800, 1200, 1600, 2000, 2400, 2800, 3200, 3600, 24000]
        );
        // A second request while the schedule runs does not start another one.
        m.request_bootstrap(now);
        assert!(drain(&mut m).0.is_empty());
        // Our own queries, looped back, are not answered.
        let own = m.own_ids.back().copied().unwrap();
        m.handle_packet(&wire::encode_query(own), now);
        assert!(drain(&mut m).0.is_empty());
        assert_eq!(m.stats().own, 1);
        // An answer from another node ends it.
        let other = Identity::generate();
        m.handle_packet(&answer_with(&info_of(&other, 9)), now);
        let (_, pubs) = drain(&mut m);
        assert_eq!(pubs, vec![info_of(&other, 9)]);
        let next = m.next_deadline().unwrap();
        m.handle_timeout(next);
        assert!(drain(&mut m).0.is_empty());
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn request_node_info_answers_from_memory_or_queries_until_found_or_expired() {
        let t0 = Instant::now();
        let (mut m, _) = machine(t0);
        drain(&mut m);
        let other = Identity::generate();
        m.request_node_info(&json!(other.sign_id().to_string()), t0);
        assert!(matches!(&drain(&mut m).0[..], [Decoded::Query { .. }]));
        m.handle_packet(&answer_with(&info_of(&other, 9)), t0);
        assert_eq!(drain(&mut m).1.len(), 1);
        // Known now: a request (by boxId too, as the original's directory asks) is answered
        // from memory, no query.
        m.request_node_info(&json!(other.box_id().to_string()), t0);
        let (pkts, pubs) = drain(&mut m);
        assert!(pkts.is_empty());
        assert_eq!(pubs.len(), 1);
        // An unknown node: queries until the request expires, then stop.
        let ghost = Identity::generate();
        m.request_node_info(&json!(ghost.sign_id().to_string()), t0);
        let mut now = t0;
        let mut queries = 0;
        for _ in 0..1000 {
            let Some(next) = m.next_deadline() else { break };
            now = next;
            m.handle_timeout(now);
            queries += drain(&mut m).0.len();
        }
        assert!(m.next_deadline().is_none(), "the schedule stopped");
        assert!(now - t0 <= Duration::from_secs(61) + Duration::from_secs(24));
        assert!((10..=40).contains(&queries), "{queries} queries");
        assert_eq!(m.stats().requests, 0);
    }

    #[test]
    fn hostile_answers_change_nothing() {
        let t0 = Instant::now();
        let (mut m, me) = machine(t0);
        drain(&mut m);
        let a = Identity::generate();
        let b = Identity::generate();
        let forged = json!({"signId": a.sign_id().to_string(), "boxId": b.box_id().to_string(),
            "connectionInfo": []});
        let texts: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"[1,2,3]".to_vec(),
            br#"{"signId":"x","boxId":"y"}"#.to_vec(),
            serde_json::to_vec(&forged).unwrap(),
            serde_json::to_vec(&info_of(&me, 1)).unwrap(),
            serde_json::to_vec(&info_of(&me, 77)).unwrap(),
        ];
        for t in &texts {
            // Raw and character-string forms both.
            m.handle_packet(&wire::encode_answer(t).unwrap(), t0);
        }
        m.handle_packet(b"\x00\x01garbage", t0);
        m.handle_packet(&vec![0u8; wire::MAX_PACKET + 1], t0);
        let (pkts, pubs) = drain(&mut m);
        assert!(pkts.is_empty() && pubs.is_empty());
        let s = m.stats();
        assert_eq!(s.forged, 1);
        assert_eq!(s.own, 2);
        assert_eq!(s.malformed_packets, 2);
        assert_eq!(s.invalid_node_infos, 3);
        assert_eq!(s.remembered, 0);
        assert_eq!(s.published, 0);
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn floods_cost_bounded_memory_and_bounded_publications() {
        let t0 = Instant::now();
        let (mut m, _) = machine(t0);
        drain(&mut m);
        let timing = Timing::default();
        // 500 distinct valid nodes in one instant: remembered up to max_seen, published up
        // to the burst.
        let nodes: Vec<Identity> = (0..500).map(|_| Identity::generate()).collect();
        for (i, n) in nodes.iter().enumerate() {
            m.handle_packet(&answer_with(&info_of(n, i as u16)), t0);
        }
        let s = m.stats();
        assert_eq!(s.remembered, timing.max_seen);
        assert_eq!(s.published, u64::from(timing.publish_burst));
        assert_eq!(s.suppressed, 500 - u64::from(timing.publish_burst));
        assert!(drain(&mut m).1.len() <= OUT_QUEUE);
        // The same node repeated: published once (not again before republish_after).
        let (mut m, _) = machine(t0);
        drain(&mut m);
        let n = Identity::generate();
        for i in 0..1000u64 {
            m.handle_packet(&answer_with(&info_of(&n, 5)), t0 + Duration::from_millis(i));
        }
        assert_eq!(drain(&mut m).1.len(), 1);
        // Once changed, it is published again.
        m.handle_packet(&answer_with(&info_of(&n, 6)), t0 + Duration::from_secs(2));
        assert_eq!(drain(&mut m).1, vec![info_of(&n, 6)]);
        // Floods of queries cost one answer per interval.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            m.handle_packet(&wire::encode_query(0), now);
            m.handle_timeout(now);
        }
        let answers = drain(&mut m).0.len();
        assert!((9..=11).contains(&answers), "{answers} answers in 10 s");
        // Pending lookups are bounded.
        for _ in 0..1000 {
            m.request_node_info(&json!(Identity::generate().sign_id().to_string()), t0);
        }
        assert_eq!(m.stats().requests, timing.max_requests);
    }
}
