//! Sans-IO tests of the CurveCP crypto layer: our Client and Server exchanging packets in
//! memory under a fake clock, every packet check a CurveCP server must make against ours, the client-side
//! checks, limits, policy, replay refusal and a flood.

mod common_hs;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common_hs::{ack_fields, data_msg, Raw};
use mm_platform::proto::crypto::{self, BoxKeyPair, BoxPublicKey, CipherBackend};
use mm_platform::proto::curvecp::client::{Client, ClientConfig, ClientError, ClientState};
use mm_platform::proto::curvecp::packet::ServerName;
use mm_platform::proto::curvecp::server::{ConnectionId, Server, ServerConfig, ServerEvent};
use mm_platform::proto::curvecp::stream::Eof;
use mm_platform::proto::curvecp::MAX_PACKET;

const SEXT: [u8; 16] = *b"0123456789abcdef";

fn name() -> ServerName {
    ServerName::from_dns("test.example.org").unwrap()
}

fn server_config() -> ServerConfig {
    let mut c = ServerConfig::new(BoxKeyPair::generate());
    c.name = name();
    c.extension = SEXT;
    c
}

fn client_config(server: BoxPublicKey) -> ClientConfig {
    let mut c = ClientConfig::new(server);
    c.server_name = name();
    c.server_extension = SEXT;
    c
}

/// A server under test plus a fake clock and buffers.
struct Rig {
    server: Server<usize>,
    start: Instant,
    now: Instant,
    reply: Vec<u8>,
    out: Vec<u8>,
}

impl Rig {
    fn new(config: ServerConfig) -> Rig {
        let now = Instant::now();
        Rig {
            server: Server::new(config, now),
            start: now,
            now,
            reply: vec![0; MAX_PACKET],
            out: vec![0; MAX_PACKET],
        }
    }

    fn server_start(&self) -> Instant {
        self.start
    }

    fn raw(&self) -> Raw {
        Raw::new(self.server.public_key(), SEXT, name())
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// Feeds a packet from path `from`; returns the immediate reply.
    fn feed(&mut self, pkt: &[u8], from: usize) -> Option<Vec<u8>> {
        let now = self.now;
        self.server
            .handle_packet(pkt, from, now, &mut self.reply)
            .map(|n| self.reply[..n].to_vec())
    }

    /// Everything the server sends at the current time.
    fn drain(&mut self) -> Vec<(usize, Vec<u8>)> {
        let mut v = Vec::new();
        for _ in 0..10_000 {
            let now = self.now;
            match self.server.poll_transmit(now, &mut self.out) {
                Some((p, n)) => v.push((p, self.out[..n].to_vec())),
                None => break,
            }
        }
        v
    }

    /// A raw client through Hello and Cookie.
    fn cookied(&mut self) -> Raw {
        let mut raw = self.raw();
        let h = raw.hello();
        let c = self.feed(&h, 0).expect("a Cookie");
        assert!(raw.take_cookie(&c));
        raw
    }

    /// A raw client with an accepted connection (Initiate carrying ID 1, "abc").
    fn connected(&mut self, path: usize) -> (Raw, ConnectionId) {
        let mut raw = self.cookied();
        let i = raw.initiate(&data_msg(1, 0, b"abc", false));
        assert!(self.feed(&i, path).is_none());
        let id = self.accepted_id().expect("accepted");
        (raw, id)
    }

    fn accepted_id(&mut self) -> Option<ConnectionId> {
        let mut found = None;
        while let Some(ev) = self.server.poll_event() {
            if let ServerEvent::Accepted(id) = ev {
                found = Some(id);
            }
        }
        found
    }

    fn dropped(&self) -> u64 {
        self.server.stats().dropped
    }

    /// The messages the raw client can open from what the server sends now.
    fn messages_for(&mut self, raw: &mut Raw) -> Vec<Vec<u8>> {
        self.drain()
            .into_iter()
            .filter_map(|(_, p)| raw.open_server(&p))
            .collect()
    }
}

fn hello_valid(rig: &mut Rig) -> Vec<u8> {
    rig.raw().hello()
}

// ---------------------------------------------------------------- §9 rows 1-7: Hello

#[test]
fn row01_hello_wrong_lengths_dropped() {
    let mut rig = Rig::new(server_config());
    let h = hello_valid(&mut rig);
    let mut longer = h.clone();
    longer.extend_from_slice(&[0; 16]);
    for p in [&h[..223], &h[..208], &longer[..]] {
        assert!(rig.feed(p, 0).is_none());
    }
    assert_eq!(rig.dropped(), 3);
    assert!(rig.feed(&h, 0).is_some(), "the genuine one is answered");
    assert_eq!(rig.server.connection_count(), 0);
}

#[test]
fn row02_hello_bad_magic_dropped() {
    let mut rig = Rig::new(server_config());
    let h = hello_valid(&mut rig);
    let mut a = h.clone();
    a[0] ^= 1;
    let mut b = h.clone();
    b[7] = b'X';
    assert!(rig.feed(&a, 0).is_none());
    assert!(rig.feed(&b, 0).is_none());
    assert_eq!(rig.server.stats().cookies_sent, 0);
}

#[test]
fn row03_hello_wrong_server_extension_dropped() {
    let mut rig = Rig::new(server_config());
    let mut h = hello_valid(&mut rig);
    h[8] ^= 0x80;
    assert!(rig.feed(&h, 0).is_none());
    assert_eq!(rig.dropped(), 1);
}

#[test]
fn row04_hello_bit_flip_or_nonce_change_dropped() {
    let mut rig = Rig::new(server_config());
    let h = hello_valid(&mut rig);
    let mut a = h.clone();
    a[200] ^= 4;
    let mut b = h.clone();
    b[136] ^= 1;
    let mut c = h.clone();
    c[50] ^= 1; // C' changed: the box no longer opens under it
    for p in [a, b, c] {
        assert!(rig.feed(&p, 0).is_none());
    }
    assert_eq!(rig.server.stats().cookies_sent, 0);
}

/// Row 5: the reference answers a Hello with non-zero padding; we are stricter and drop it
/// (honest clients, the reference one included, always send zeros there).
#[test]
fn row05_hello_nonzero_padding_dropped_by_choice() {
    let mut rig = Rig::new(server_config());
    let mut h = hello_valid(&mut rig);
    h[72..136].fill(1);
    assert!(rig.feed(&h, 0).is_none());
    assert_eq!(rig.dropped(), 1);
}

#[test]
fn row06_client_extension_echoed() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.raw();
    raw.cext = [42; 16];
    let h = raw.hello();
    let c = rig.feed(&h, 0).unwrap();
    assert_eq!(c.len(), 200);
    assert_eq!(&c[..8], b"RL3aNMXK");
    assert_eq!(&c[8..24], &[42; 16]);
    assert_eq!(&c[24..40], &SEXT);
    assert!(raw.take_cookie(&c));
}

/// No amplification (issue 25): the server's one reply before a client is authenticated, the
/// Cookie, goes to an address anyone can forge, so it is never longer than the Hello it answers
/// (200 bytes for 224), for any client key and extension; nothing shorter is answered at all.
#[test]
fn cookie_is_shorter_than_the_hello() {
    let mut rig = Rig::new(server_config());
    for i in 0..16u8 {
        let mut raw = rig.raw();
        raw.cext = [i; 16];
        let h = raw.hello();
        let c = rig.feed(&h, usize::from(i)).expect("a Cookie");
        assert!(
            c.len() <= h.len(),
            "a {}-byte Cookie for a {}-byte Hello",
            c.len(),
            h.len()
        );
        assert_eq!((c.len(), h.len()), (200, 224));
        for cut in [0, 1, 8, 199, 200, 223] {
            assert!(rig.feed(&h[..cut], usize::from(i)).is_none());
        }
    }
}

#[test]
fn row07_same_hello_twice_two_different_cookies() {
    let mut rig = Rig::new(server_config());
    let h = hello_valid(&mut rig);
    let a = rig.feed(&h, 0).unwrap();
    rig.advance(Duration::from_millis(10));
    let b = rig.feed(&h, 0).unwrap();
    assert_ne!(a, b);
    assert_eq!(rig.server.connection_count(), 0);
    assert_eq!(rig.server.queues().send_queue, 0);
}

// ---------------------------------------------------------------- rows 8-12: bad Initiates

#[test]
fn row08_initiate_wrong_name_dropped() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let vouch = raw.vouch_with(&raw.long, &raw.server);
    let cookie = raw.cookie;
    let other = ServerName::from_dns("test.example.com").unwrap();
    let i = raw.initiate_custom(&data_msg(1, 0, b"abc", false), &other, &vouch, &cookie);
    assert!(rig.feed(&i, 0).is_none());
    assert_eq!(rig.server.connection_count(), 0);
    // The same client with the right name still gets in (nothing was remembered).
    let i = raw.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 0);
    assert_eq!(rig.server.connection_count(), 1);
}

#[test]
fn row09_initiate_cookie_byte_flipped_dropped() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let name = raw.name;
    let vouch = raw.vouch_with(&raw.long, &raw.server);
    for i in [0usize, 20, 95] {
        let mut cookie = raw.cookie;
        cookie[i] ^= 1;
        let p = raw.initiate_custom(&data_msg(1, 0, b"abc", false), &name, &vouch, &cookie);
        assert!(rig.feed(&p, 0).is_none());
    }
    assert_eq!(rig.server.connection_count(), 0);
    assert!(rig.accepted_id().is_none());
}

#[test]
fn row10_initiate_with_anothers_cookie_dropped() {
    let mut rig = Rig::new(server_config());
    let a = rig.cookied();
    let mut b = rig.cookied();
    // b presents a's cookie (b's own box key, so only the cookie's C' check can catch it).
    let name = b.name;
    let vouch = b.vouch_with(&b.long, &b.server);
    let p = b.initiate_custom(&data_msg(1, 0, b"abc", false), &name, &vouch, &a.cookie);
    assert!(rig.feed(&p, 0).is_none());
    assert_eq!(rig.server.connection_count(), 0);
}

#[test]
fn row11_initiate_vouch_under_wrong_key_dropped() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let name = raw.name;
    let cookie = raw.cookie;
    // Vouched by another long-term key than the C in the Initiate.
    let other = BoxKeyPair::generate();
    let vouch = raw.vouch_with(&other, &raw.server);
    let p = raw.initiate_custom(&data_msg(1, 0, b"abc", false), &name, &vouch, &cookie);
    assert!(rig.feed(&p, 0).is_none());
    // Vouched for another server.
    let vouch = raw.vouch_with(&raw.long, &BoxKeyPair::generate().public);
    let p = raw.initiate_custom(&data_msg(1, 0, b"abc", false), &name, &vouch, &cookie);
    assert!(rig.feed(&p, 0).is_none());
    assert_eq!(rig.server.connection_count(), 0);
}

#[test]
fn row12_initiate_without_message_dropped() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let i = raw.initiate(&data_msg(1, 0, b"abc", false));
    assert!(rig.feed(&i[..544], 0).is_none());
    assert_eq!(rig.server.connection_count(), 0);
}

// ---------------------------------------------------------------- rows 13-20: a connection

#[test]
fn row13_valid_initiate_is_acknowledged() {
    let mut rig = Rig::new(server_config());
    let (mut raw, id) = rig.connected(7);
    assert_eq!(rig.server.path(id), Some(7));
    assert_eq!(rig.server.client_key(id), Some(raw.long.public));
    let msgs = rig.messages_for(&mut raw);
    assert!(!msgs.is_empty(), "the server speaks at once");
    assert_eq!(ack_fields(msgs.last().unwrap()), (1, 3));
    let mut buf = [0u8; 16];
    let n = rig.server.stream_mut(id).unwrap().read(&mut buf);
    assert_eq!(&buf[..n], b"abc");
}

#[test]
fn row14_identical_initiate_resent_dropped() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let i = raw.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 0);
    let _ = rig.messages_for(&mut raw);
    let d = rig.dropped();
    rig.feed(&i, 0);
    assert_eq!(rig.dropped(), d + 1);
    assert!(
        rig.messages_for(&mut raw).is_empty(),
        "no answer to a replay"
    );
    assert_eq!(rig.server.connection_count(), 1);
    assert_eq!(rig.server.stats().accepted, 1);
}

#[test]
fn row15_second_initiate_higher_nonce_same_cookie_accepted() {
    let mut rig = Rig::new(server_config());
    let (mut raw, _) = rig.connected(0);
    let _ = rig.messages_for(&mut raw);
    let i2 = raw.initiate(&data_msg(2, 3, b"def", false));
    rig.feed(&i2, 0);
    let msgs = rig.messages_for(&mut raw);
    assert_eq!(ack_fields(msgs.last().unwrap()), (2, 6));
    assert_eq!(rig.server.connection_count(), 1);
}

#[test]
fn row16_client_message_before_any_server_message_accepted() {
    let mut rig = Rig::new(server_config());
    let (mut raw, _) = rig.connected(0);
    // The server has not sent anything yet.
    let m = raw.message(&data_msg(2, 3, b"def", false));
    let d = rig.dropped();
    rig.feed(&m, 0);
    assert_eq!(rig.dropped(), d);
    let msgs = rig.messages_for(&mut raw);
    assert!(msgs.iter().any(|m| ack_fields(m).1 == 6));
}

#[test]
fn row17_client_message_replayed_or_lower_nonce_dropped() {
    let mut rig = Rig::new(server_config());
    let (mut raw, _) = rig.connected(0);
    let m = raw.message(&data_msg(2, 3, b"def", false));
    rig.feed(&m, 0);
    let _ = rig.messages_for(&mut raw);
    let d = rig.dropped();
    rig.feed(&m, 0);
    let lower = raw.counter - 1;
    let m2 = raw.message_with_nonce(&data_msg(3, 6, b"ghi", false), lower);
    rig.feed(&m2, 0);
    assert_eq!(rig.dropped(), d + 2);
    assert!(rig.messages_for(&mut raw).is_empty());
}

#[test]
fn row18_client_message_nonce_jump_accepted() {
    let mut rig = Rig::new(server_config());
    let (mut raw, _) = rig.connected(0);
    raw.counter += 1000;
    let m = raw.message(&data_msg(2, 3, b"def", false));
    let d = rig.dropped();
    rig.feed(&m, 0);
    assert_eq!(rig.dropped(), d);
    let msgs = rig.messages_for(&mut raw);
    assert_eq!(ack_fields(msgs.last().unwrap()), (2, 6));
}

#[test]
fn row19_client_message_truncated_or_misaligned_dropped() {
    let mut rig = Rig::new(server_config());
    let (mut raw, _) = rig.connected(0);
    let _ = rig.messages_for(&mut raw);
    let m = raw.message(&data_msg(2, 3, b"def", false));
    let d = rig.dropped();
    rig.feed(&m[..m.len() - 16], 0);
    rig.feed(&m[..m.len() - 1], 0);
    let mut longer = m.clone();
    longer.push(0);
    rig.feed(&longer, 0);
    assert_eq!(rig.dropped(), d + 3);
    assert!(rig.messages_for(&mut raw).is_empty());
    // The untouched packet still works: the failures changed no state.
    rig.feed(&m, 0);
    assert_eq!(
        ack_fields(rig.messages_for(&mut raw).last().unwrap()),
        (2, 6)
    );
}

#[test]
fn row20_message_with_unknown_client_key_dropped() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let m = raw.message(&data_msg(1, 0, b"abc", false));
    assert!(rig.feed(&m, 0).is_none());
    assert_eq!(rig.dropped(), 1);
    assert_eq!(rig.server.connection_count(), 0);
}

// ---------------------------------------------------------------- rows 21-23: time and replay

#[test]
fn row21_cookie_125s_old_dropped() {
    let mut rig = Rig::new(server_config());
    rig.advance(Duration::from_secs(1));
    let mut raw = rig.cookied();
    rig.advance(Duration::from_secs(125));
    let i = raw.initiate(&data_msg(1, 0, b"abc", false));
    assert!(rig.feed(&i, 0).is_none());
    assert_eq!(rig.server.connection_count(), 0);
    // A fresh cookie at the same time works at once.
    let mut raw2 = rig.cookied();
    let i = raw2.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 0);
    assert_eq!(rig.server.connection_count(), 1);
}

#[test]
fn row22_cookie_60_to_120s_old_only_under_previous_key() {
    let mut rig = Rig::new(server_config());
    // Issued at 50 s (first key), used at 110 s (first key is now the previous one): accepted.
    rig.advance(Duration::from_secs(50));
    let mut a = rig.cookied();
    // Issued at 59 s (first key), used at 121 s (first key destroyed at 120 s): dropped.
    rig.advance(Duration::from_secs(9));
    let mut b = rig.cookied();
    // Issued at 61 s (second key), used at 125 s (64 s old, second key is previous): accepted.
    rig.advance(Duration::from_secs(2));
    let mut c = rig.cookied();
    rig.advance(Duration::from_secs(49)); // 110 s
    let p = a.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&p, 0);
    assert_eq!(rig.server.connection_count(), 1, "69 s old, previous key");
    rig.advance(Duration::from_secs(11)); // 121 s
    let p = b.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&p, 1);
    assert_eq!(rig.server.connection_count(), 1, "62 s old, key gone");
    rig.advance(Duration::from_secs(4)); // 125 s
    let p = c.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&p, 2);
    assert_eq!(rig.server.connection_count(), 2, "64 s old, previous key");
}

#[test]
fn row23_replayed_initiate_after_session_end_refused() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let i = raw.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 0);
    let id = rig.accepted_id().unwrap();
    let _ = rig.messages_for(&mut raw);
    rig.advance(Duration::from_secs(1));
    rig.server.remove(id);
    assert_eq!(rig.server.poll_event(), Some(ServerEvent::Closed(id)));
    assert!(rig.server.stream_mut(id).is_none(), "stale id");
    rig.advance(Duration::from_secs(1));
    assert!(rig.feed(&i, 0).is_none());
    assert_eq!(rig.server.connection_count(), 0);
    assert_eq!(rig.server.stats().replays_refused, 1);
    assert!(rig.server.poll_event().is_none());
    // Later the cookie is dead anyway and the remembered key is forgotten.
    rig.advance(Duration::from_secs(125));
    assert!(rig.feed(&i, 0).is_none());
    assert_eq!(rig.server.connection_count(), 0);
    assert_eq!(rig.server.queues().ended, 0);
}

#[test]
fn replay_set_full_replaces_minute_keys() {
    let mut rig = Rig::new(server_config());
    rig.server.set_replay_capacity(2);
    let mut recorded = Vec::new();
    for path in 0..3 {
        let (mut raw, id) = rig.connected(path);
        recorded.push(raw.initiate(&data_msg(2, 3, b"def", false)));
        let _ = rig.messages_for(&mut raw);
        rig.server.remove(id);
    }
    assert!(rig.server.queues().ended <= 2);
    // Every recorded Initiate is refused: remembered, or its cookie is dead.
    for i in &recorded {
        assert!(rig.feed(i, 9).is_none());
    }
    assert_eq!(rig.server.connection_count(), 0);
    // New clients still get in.
    let _ = rig.connected(5);
    assert_eq!(rig.server.connection_count(), 1);
}

// ---------------------------------------------------------------- limits and policy

#[test]
fn connection_limit() {
    let mut cfg = server_config();
    cfg.max_connections = 2;
    let mut rig = Rig::new(cfg);
    let (_, a) = rig.connected(0);
    let _ = rig.connected(1);
    let mut c = rig.cookied();
    let i = c.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 2);
    assert_eq!(rig.server.connection_count(), 2);
    assert_eq!(rig.server.stats().table_full, 1);
    rig.server.remove(a);
    let i = c.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 2);
    assert_eq!(rig.server.connection_count(), 2);
    assert!(rig.accepted_id().is_some());
}

#[test]
fn accept_client_policy() {
    let allowed = BoxKeyPair::generate();
    let allowed_pk = allowed.public;
    let mut cfg = server_config();
    cfg.accept_client = Some(Arc::new(move |k: &BoxPublicKey| *k == allowed_pk));
    let mut rig = Rig::new(cfg);
    let mut stranger = rig.cookied();
    let i = stranger.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 0);
    assert_eq!(rig.server.connection_count(), 0);
    assert_eq!(rig.server.stats().policy_refused, 1);
    let mut friend = rig.raw();
    friend.long = allowed;
    let h = friend.hello();
    let c = rig.feed(&h, 1).unwrap();
    assert!(friend.take_cookie(&c));
    let i = friend.initiate(&data_msg(1, 0, b"abc", false));
    rig.feed(&i, 1);
    let id = rig.accepted_id().unwrap();
    assert_eq!(rig.server.client_key(id), Some(allowed_pk));
}

// ---------------------------------------------------------------- our client and our server

/// Pumps packets between one server and several clients under a fake clock.
struct Net {
    server: Server<usize>,
    clients: Vec<Client>,
    now: Instant,
    buf: Vec<u8>,
    reply: Vec<u8>,
    /// Every packet a client sent, by client.
    sent: Vec<Vec<Vec<u8>>>,
    /// Rounds run.
    steps: usize,
    /// Drop one packet in `loss` (each direction) when nonzero, by a deterministic PRNG.
    loss: u64,
    rng: u64,
}

impl Net {
    fn new(server_cfg: ServerConfig, n: usize, now: Instant) -> Net {
        let server = Server::new(server_cfg, now);
        let pk = server.public_key();
        let clients = (0..n)
            .map(|_| Client::new(client_config(pk), now))
            .collect();
        Net {
            server,
            clients,
            now,
            buf: vec![0; MAX_PACKET],
            reply: vec![0; MAX_PACKET],
            sent: vec![Vec::new(); n],
            steps: 0,
            loss: 0,
            rng: 0x2545f4914f6cdd1d,
        }
    }

    fn lost(&mut self) -> bool {
        if self.loss == 0 {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng.is_multiple_of(self.loss)
    }

    /// One round: every client's packets to the server, the server's packets to the clients.
    /// Returns whether any packet moved.
    fn round(&mut self) -> bool {
        let now = self.now;
        let mut moved = false;
        for i in 0..self.clients.len() {
            for _ in 0..1000 {
                let Some(n) = self.clients[i].poll_transmit(now, &mut self.buf) else {
                    break;
                };
                moved = true;
                if self.sent[i].len() < 64 {
                    self.sent[i].push(self.buf[..n].to_vec());
                }
                if self.lost() {
                    continue;
                }
                if let Some(r) = self
                    .server
                    .handle_packet(&self.buf[..n], i, now, &mut self.reply)
                {
                    if !self.lost() {
                        self.clients[i].handle_packet(&self.reply[..r], now);
                    }
                }
            }
        }
        for _ in 0..100_000 {
            let Some((p, n)) = self.server.poll_transmit(now, &mut self.buf) else {
                break;
            };
            moved = true;
            if !self.lost() {
                self.clients[p].handle_packet(&self.buf[..n], now);
            }
        }
        moved
    }

    /// Moves the clock to the next deadline when nothing moved.
    fn tick(&mut self) {
        self.steps += 1;
        if self.round() {
            return;
        }
        let mut next = self.server.poll_timeout();
        for c in &self.clients {
            if let Some(t) = c.poll_timeout() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        let next = next.unwrap_or(self.now + Duration::from_secs(1));
        self.now = next.max(self.now + Duration::from_micros(1));
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + seed * 7 + i / 251) % 256) as u8)
        .collect()
}

/// Clients upload, the server sends a different download to each, both sides finish.
fn transfer(n_clients: usize, up: usize, down: usize) {
    transfer_lossy(n_clients, up, down, 0, 0);
}

/// [`transfer`] over a network losing one packet in `loss` (0: none), PRNG seeded by `seed`.
fn transfer_lossy(n_clients: usize, up: usize, down: usize, loss: u64, seed: u64) {
    let t0 = Instant::now();
    let mut net = Net::new(server_config(), n_clients, t0);
    net.loss = loss;
    net.rng ^= seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let (mut readable_events, mut writable_events) = (0, 0);
    let uploads: Vec<Vec<u8>> = (0..n_clients).map(|i| pattern(i, up + i)).collect();
    let downloads: Vec<Vec<u8>> = (0..n_clients).map(|i| pattern(100 + i, down + i)).collect();
    let mut up_pos = vec![0usize; n_clients];
    let mut up_done = vec![false; n_clients];
    let mut down_done = vec![false; n_clients];
    let mut got_down: Vec<Vec<u8>> = vec![Vec::new(); n_clients];
    // Server side, by path (= client index).
    let mut ids: Vec<Option<ConnectionId>> = vec![None; n_clients];
    let mut down_pos = vec![0usize; n_clients];
    let mut got_up: Vec<Vec<u8>> = vec![Vec::new(); n_clients];
    let mut up_eof = vec![false; n_clients];
    let mut closed = 0;
    let mut buf = vec![0u8; 65536];
    for _ in 0..200_000 {
        // Client applications.
        for (i, c) in net.clients.iter_mut().enumerate() {
            let s = c.stream_mut();
            if !up_done[i] {
                up_pos[i] += s.write(&uploads[i][up_pos[i]..]);
                if up_pos[i] == uploads[i].len() {
                    s.finish(Eof::Success);
                    up_done[i] = true;
                }
            }
            loop {
                let n = s.read(&mut buf);
                if n == 0 {
                    break;
                }
                got_down[i].extend_from_slice(&buf[..n]);
            }
        }
        // Server application.
        while let Some(ev) = net.server.poll_event() {
            match ev {
                ServerEvent::Accepted(id) => {
                    let p = net.server.path(id).unwrap();
                    assert!(ids[p].is_none(), "one connection per client");
                    ids[p] = Some(id);
                }
                ServerEvent::Closed(_) => closed += 1,
                ServerEvent::Readable(_) => readable_events += 1,
                ServerEvent::Writable(_) => writable_events += 1,
            }
        }
        for p in 0..n_clients {
            let Some(id) = ids[p] else { continue };
            let Some(s) = net.server.stream_mut(id) else {
                continue;
            };
            if !down_done[p] {
                down_pos[p] += s.write(&downloads[p][down_pos[p]..]);
                if down_pos[p] == downloads[p].len() {
                    s.finish(Eof::Success);
                    down_done[p] = true;
                }
            }
            loop {
                let n = s.read(&mut buf);
                if n == 0 {
                    break;
                }
                got_up[p].extend_from_slice(&buf[..n]);
            }
            if s.peer_eof() == Some(Eof::Success) {
                up_eof[p] = true;
            }
        }
        if closed == n_clients && net.clients.iter().all(|c| c.state() == ClientState::Closed) {
            break;
        }
        net.tick();
    }
    for i in 0..n_clients {
        assert_eq!(got_up[i].len(), uploads[i].len(), "upload {i} length");
        assert!(got_up[i] == uploads[i], "upload {i} bytes");
        assert!(up_eof[i], "upload {i} EOF");
        assert!(got_down[i] == downloads[i], "download {i} bytes");
        assert_eq!(net.clients[i].stream().peer_eof(), Some(Eof::Success));
        assert_eq!(net.clients[i].state(), ClientState::Closed);
    }
    assert_eq!(
        closed, n_clients,
        "the server removed every finished connection"
    );
    if up > 0 {
        assert!(readable_events > 0);
    }
    if down > 131_072 && loss == 0 {
        assert!(
            writable_events > 0,
            "Writable after the send buffer was full"
        );
    }
    assert_eq!(net.server.connection_count(), 0);
    let q = net.server.queues();
    assert_eq!((q.send_queue, q.events), (0, 0));

    // Row 23 end to end: every recorded Initiate, replayed now, is refused.
    for i in 0..n_clients {
        let init = net.sent[i]
            .iter()
            .find(|p| p[7] == b'I')
            .expect("an Initiate was sent")
            .clone();
        let now = net.now;
        assert!(net
            .server
            .handle_packet(&init, i, now, &mut net.reply)
            .is_none());
    }
    assert_eq!(net.server.connection_count(), 0);
    assert_eq!(net.server.stats().replays_refused, n_clients as u64);
}

#[test]
fn end_to_end_through_loss() {
    for seed in 0..6 {
        transfer_lossy(2, 20_000, 30_000, 10, seed);
    }
}

#[test]
fn silent_client_removed_after_idle_timeout() {
    let mut rig = Rig::new(server_config());
    rig.server.set_idle_timeout(Duration::from_secs(10));
    let (mut raw, id) = rig.connected(0);
    let _ = rig.messages_for(&mut raw);
    let mut closed = false;
    for _ in 0..100 {
        let t = rig.server.poll_timeout().unwrap();
        assert!(t >= rig.now);
        rig.now = t;
        let _ = rig.drain();
        if rig.server.connection_count() == 0 {
            closed = true;
            break;
        }
    }
    assert!(closed);
    assert!(rig.now >= rig.server_start() + Duration::from_secs(10));
    assert_eq!(rig.server.poll_event(), Some(ServerEvent::Closed(id)));
    assert_eq!(rig.server.queues().send_queue, 0);
}

#[test]
fn unresponsive_client_fails_the_stream_and_is_removed() {
    let mut rig = Rig::new(server_config());
    let (mut raw, id) = rig.connected(0);
    let _ = rig.messages_for(&mut raw);
    rig.server.stream_mut(id).unwrap().write(&[1u8; 5000]);
    let mut sent = 0;
    for _ in 0..10_000 {
        sent += rig.drain().len();
        if rig.server.connection_count() == 0 {
            break;
        }
        let t = rig.server.poll_timeout().unwrap();
        rig.now = t.max(rig.now);
    }
    assert!(sent > 0);
    assert_eq!(rig.server.connection_count(), 0);
    let mut evs = Vec::new();
    while let Some(e) = rig.server.poll_event() {
        evs.push(e);
    }
    assert!(evs.contains(&ServerEvent::Closed(id)));
}

#[test]
fn client_fails_when_server_vanishes() {
    let t0 = Instant::now();
    let mut net = Net::new(server_config(), 1, t0);
    for _ in 0..1000 {
        if net.clients[0].state() == ClientState::Established {
            break;
        }
        net.tick();
    }
    assert_eq!(net.clients[0].state(), ClientState::Established);
    net.clients[0].stream_mut().write(&[7u8; 3000]);
    let mut out = vec![0u8; MAX_PACKET];
    let mut now = net.now;
    for _ in 0..10_000 {
        while net.clients[0].poll_transmit(now, &mut out).is_some() {}
        match net.clients[0].poll_timeout() {
            Some(t) => now = t.max(now),
            None => break,
        }
    }
    assert!(matches!(
        net.clients[0].state(),
        ClientState::Failed(ClientError::Stream(_))
    ));
    assert!(net.clients[0].poll_timeout().is_none());
}

#[test]
fn end_to_end_one_client_both_directions() {
    transfer(1, 100_000, 150_000);
}

#[test]
fn end_to_end_several_clients_at_once() {
    transfer(5, 20_000, 30_000);
}

#[test]
fn end_to_end_empty_streams() {
    transfer(1, 0, 0);
}

// ---------------------------------------------------------------- client-side checks

#[test]
fn client_hello_schedule_then_no_response() {
    let t0 = Instant::now();
    let server = BoxKeyPair::generate();
    let mut c = Client::new(client_config(server.public), t0);
    let mut now = t0;
    let mut out = vec![0u8; MAX_PACKET];
    let mut sends = Vec::new();
    for _ in 0..100 {
        while let Some(n) = c.poll_transmit(now, &mut out) {
            assert_eq!(n, 224);
            assert_eq!(&out[..8], b"QvnQ5XlH");
            let nonce = u64::from_le_bytes(out[136..144].try_into().unwrap());
            sends.push((now, nonce));
        }
        match c.poll_timeout() {
            Some(t) => {
                assert!(t > now, "no busy loop");
                now = t;
            }
            None => break,
        }
    }
    assert_eq!(c.state(), ClientState::Failed(ClientError::NoResponse));
    assert_eq!(sends.len(), 8);
    assert!(sends[0].1 < 1 << 48);
    let mut w = Duration::from_secs(1);
    for k in 1..8 {
        assert_eq!(
            sends[k].1,
            sends[k - 1].1 + 1,
            "one counter, new nonce each"
        );
        let gap = sends[k].0 - sends[k - 1].0;
        assert!(gap >= w && gap < w * 2, "gap {k}: {gap:?} vs {w:?}");
        w = w * 3 / 2;
    }
    assert_eq!(sends[0].0, t0, "first Hello at once");
    let mut buf = [0u8; MAX_PACKET];
    assert!(c
        .poll_transmit(now + Duration::from_secs(100), &mut buf)
        .is_none());
}

/// The client accepts a Cookie only at exactly 200 bytes, with the magic, both extensions and
/// a box that opens; then it sends Initiates (M <= 640) until the first server Message, then
/// Messages; H, I and M share one counter; server nonces must increase.
#[test]
fn client_checks_cookie_and_server_messages() {
    let t0 = Instant::now();
    let mut server: Server<usize> = Server::new(server_config(), t0);
    let mut client = Client::new(client_config(server.public_key()), t0);
    let mut out = vec![0u8; MAX_PACKET];
    let mut reply = vec![0u8; MAX_PACKET];
    let n = client.poll_transmit(t0, &mut out).unwrap();
    let hello_nonce = u64::from_le_bytes(out[136..144].try_into().unwrap());
    let r = server.handle_packet(&out[..n], 0, t0, &mut reply).unwrap();
    let cookie = reply[..r].to_vec();

    let mut bad: Vec<Vec<u8>> = Vec::new();
    bad.push(cookie[..184].to_vec());
    let mut longer = cookie.clone();
    longer.extend_from_slice(&[0; 16]);
    bad.push(longer);
    for i in [0usize, 7, 8, 23, 24, 39, 40, 100, 199] {
        let mut b = cookie.clone();
        b[i] ^= 1;
        bad.push(b);
    }
    for b in &bad {
        client.handle_packet(b, t0);
        assert_eq!(client.state(), ClientState::Hello);
    }
    assert_eq!(client.stats().dropped, bad.len() as u64);
    client.handle_packet(&cookie, t0);
    assert_eq!(client.state(), ClientState::Initiate);

    // Initiates until the server speaks.
    let n = client.poll_transmit(t0, &mut out).unwrap();
    assert_eq!(&out[..8], b"QvnQ5XlI");
    assert!(n - 544 <= 640 && n >= 560);
    let init_nonce = u64::from_le_bytes(out[168..176].try_into().unwrap());
    assert_eq!(init_nonce, hello_nonce + 1);
    assert!(server.handle_packet(&out[..n], 0, t0, &mut reply).is_none());
    let (_, sn) = server.poll_transmit(t0, &mut reply).unwrap();
    let server_msg = reply[..sn].to_vec();

    // Malformed server Messages are dropped before the genuine one.
    let d = client.stats().dropped;
    client.handle_packet(&server_msg[..sn - 16], t0);
    client.handle_packet(&server_msg[..sn - 1], t0);
    let mut flipped = server_msg.clone();
    flipped[sn - 1] ^= 1;
    client.handle_packet(&flipped, t0);
    let mut ext = server_msg.clone();
    ext[30] ^= 1;
    client.handle_packet(&ext, t0);
    assert_eq!(client.stats().dropped, d + 4);
    assert_eq!(client.state(), ClientState::Initiate);
    client.handle_packet(&server_msg, t0);
    assert_eq!(client.state(), ClientState::Established);
    // The same server Message again: nonce not increasing.
    client.handle_packet(&server_msg, t0);
    assert_eq!(client.stats().dropped, d + 5);
    assert_eq!(client.stats().messages_received, 1);

    // From now on, client Messages, on the same counter.
    client.stream_mut().write(&[5u8; 2000]);
    let n = client.poll_transmit(t0, &mut out).unwrap();
    assert_eq!(&out[..8], b"QvnQ5XlM");
    assert!(n <= MAX_PACKET);
    let m_nonce = u64::from_le_bytes(out[72..80].try_into().unwrap());
    assert_eq!(m_nonce, init_nonce + 1);
    assert_eq!(client.nonce_counter(), m_nonce);
}

// ---------------------------------------------------------------- flood

#[test]
fn flood_of_hellos_and_garbage_leaves_no_state_and_a_client_gets_through() {
    let t0 = Instant::now();
    let mut net = Net::new(server_config(), 1, t0);
    let pk = net.server.public_key();
    let mut raws: Vec<Raw> = (0..16).map(|_| Raw::new(pk, SEXT, name())).collect();
    let mut reply = vec![0u8; MAX_PACKET];
    let mut rng: u64 = 0x9e3779b97f4a7c15;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut garbage = vec![0u8; 1300];
    let mut client_done = false;
    let mut written = false;
    const N: usize = 100_000;
    for k in 0..N {
        let now = net.now;
        // A valid Hello.
        let h = raws[k % 16].hello();
        assert!(net
            .server
            .handle_packet(&h, 1000, now, &mut reply)
            .is_some());
        // Garbage: random length and bytes, a third of it with a valid prefix and extension.
        let len = (next() % 1300) as usize;
        for b in garbage[..len].iter_mut() {
            *b = next() as u8;
        }
        if k % 3 == 0 && len >= 24 {
            garbage[..7].copy_from_slice(b"QvnQ5Xl");
            garbage[7] = [b'H', b'I', b'M'][k % 9 / 3];
            garbage[8..24].copy_from_slice(&SEXT);
        }
        assert!(net
            .server
            .handle_packet(&garbage[..len], 1001, now, &mut reply)
            .is_none());
        // The legitimate client, in the middle of the flood.
        if k >= N / 4 && k % 50 == 0 && !client_done {
            if !written && net.clients[0].state() == ClientState::Established {
                net.clients[0].stream_mut().write(b"ping");
                net.clients[0].stream_mut().finish(Eof::Success);
                written = true;
            }
            net.tick();
            while let Some(ev) = net.server.poll_event() {
                if let ServerEvent::Readable(id) | ServerEvent::Accepted(id) = ev {
                    let s = net.server.stream_mut(id).unwrap();
                    let mut b = [0u8; 16];
                    while s.read(&mut b) > 0 {}
                    if s.peer_eof().is_some() {
                        s.finish(Eof::Success);
                    }
                }
            }
            client_done = net.clients[0].state() == ClientState::Closed;
        }
        if k % 1000 == 999 {
            net.now += Duration::from_millis(1);
        }
    }
    assert!(client_done, "the client finished during the flood");
    assert_eq!(
        net.server.stats().cookies_sent as usize,
        N + net.clients[0].stats().hellos_sent as usize
    );
    // Run out the linger; then nothing is left.
    for _ in 0..1000 {
        if net.server.connection_count() == 0 {
            break;
        }
        net.tick();
    }
    while net.server.poll_event().is_some() {}
    let q = net.server.queues();
    assert_eq!(q.connections, 0);
    assert_eq!(q.send_queue, 0);
    assert_eq!(q.events, 0);
    assert_eq!(q.timers, 0);
}

/// A JS node's Initiate carries a 64-byte all-zero message (ID 0); the server must still speak
/// first so that such a client proceeds.
#[test]
fn js_style_initiate_with_zero_message_gets_an_answer() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let i = raw.initiate(&[0u8; 64]);
    rig.feed(&i, 0);
    assert_eq!(rig.server.connection_count(), 1);
    let mut msgs = rig.messages_for(&mut raw);
    for _ in 0..100 {
        if !msgs.is_empty() {
            break;
        }
        rig.now = rig.server.poll_timeout().unwrap().max(rig.now);
        msgs = rig.messages_for(&mut raw);
    }
    assert!(!msgs.is_empty(), "the server spoke first");
}

/// Every single-bit change of a valid Initiate is dropped, except in the client extension
/// (24..40), which is not authenticated by CurveCP and is only echoed back.
#[test]
fn every_byte_of_initiate_and_message_is_checked() {
    every_byte_checked();
}

fn every_byte_checked() {
    let mut rig = Rig::new(server_config());
    let mut raw = rig.cookied();
    let i = raw.initiate(&data_msg(1, 0, b"abc", false));
    for pos in (0..i.len()).filter(|p| !(24..40).contains(p)) {
        let mut t = i.clone();
        t[pos] ^= 0x10;
        assert!(rig.feed(&t, 0).is_none());
        assert_eq!(rig.server.connection_count(), 0, "flip at {pos} accepted");
    }
    rig.feed(&i, 0);
    assert_eq!(rig.server.connection_count(), 1);
    let _ = rig.messages_for(&mut raw);
    let m = raw.message(&data_msg(2, 3, b"def", false));
    let before = rig.dropped();
    let mut tried = 0;
    for pos in (0..m.len()).filter(|p| !(24..40).contains(p)) {
        let mut t = m.clone();
        t[pos] ^= 0x10;
        rig.feed(&t, 0);
        tried += 1;
    }
    assert_eq!(rig.dropped(), before + tried);
    assert!(rig.messages_for(&mut raw).is_empty());
    rig.feed(&m, 0);
    assert_eq!(
        ack_fields(rig.messages_for(&mut raw).last().unwrap()),
        (2, 6)
    );
}

// ---------------------------------------------------------------- each cipher backend

/// Runs `f` with every key made on this thread (both ends here: the test is sans-IO) sealing
/// and opening its message boxes with `backend`. A backend this machine cannot run is skipped
/// loudly, or fails under `MM_REQUIRE_AVX512=1` (set in CI where the CPU has AVX-512 IFMA).
fn with_backend(backend: CipherBackend, f: impl FnOnce()) {
    if let Err(e) = crypto::with_message_cipher(backend, f) {
        if std::env::var_os("MM_REQUIRE_AVX512").is_some_and(|v| v != "0") {
            panic!("{e}, and MM_REQUIRE_AVX512 is set");
        }
        let test = std::thread::current()
            .name()
            .unwrap_or("handshake")
            .to_owned();
        mm_platform::proto::skip_test(&test, &e.to_string());
    }
}

/// Full and short message boxes both ways, clean and lossy (boxes out of order, resent), and
/// every flipped byte refused: the connection-level tests, once per backend.
fn connections_with(backend: CipherBackend) {
    with_backend(backend, || {
        transfer(2, 100_000, 150_000);
        transfer_lossy(2, 20_000, 30_000, 10, 7);
        every_byte_checked();
    });
}

#[test]
fn connections_with_libsodium() {
    connections_with(CipherBackend::Libsodium);
}

#[test]
fn connections_with_avx512() {
    connections_with(CipherBackend::Avx512);
}

#[test]
fn connections_with_avx512_ifma() {
    connections_with(CipherBackend::Avx512Ifma);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

        /// Arbitrary datagrams, raw or behind a valid client prefix and our extension, never
        /// panic, never get an answer and never create state.
        #[test]
        fn arbitrary_packets_leave_no_trace(
            packets in proptest::collection::vec(
                (any::<bool>(), prop::sample::select(vec![b'H', b'I', b'M', b'Z']),
                 proptest::collection::vec(any::<u8>(), 0..1300)),
                1..20,
            )
        ) {
            let mut rig = Rig::new(server_config());
            for (prefixed, kind, mut p) in packets {
                if prefixed && p.len() >= 24 {
                    p[..7].copy_from_slice(b"QvnQ5Xl");
                    p[7] = kind;
                    p[8..24].copy_from_slice(&SEXT);
                }
                prop_assert!(rig.feed(&p, 0).is_none());
            }
            prop_assert!(rig.drain().is_empty());
            prop_assert_eq!(rig.server.queues(), Default::default());
            prop_assert_eq!(rig.server.stats().cookies_sent, 0);
        }
    }
}
