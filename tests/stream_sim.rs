//! Two CurveCP message-layer streams over a deterministic simulated network with a fake clock:
//! loss, duplication, reordering and jitter over many seeds, slow readers, vanishing peers,
//! hostile messages and a peer that behaves like the reference `curvecpmessage`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use mm_platform::proto::curvecp::congestion;
use mm_platform::proto::curvecp::message::{data_message_len, Message, MessageHeader, Stop};
use mm_platform::proto::curvecp::stream::{Eof, Stream, StreamConfig, StreamError};

/// splitmix64: a small deterministic PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Network conditions.
#[derive(Clone, Copy)]
struct Net {
    loss: u64,
    dup: u64,
    delay: Duration,
    jitter: Duration,
}

const LOSSY: Net = Net {
    loss: 10,
    dup: 5,
    delay: Duration::from_millis(5),
    jitter: Duration::from_millis(5),
};

/// One packet in flight: (delivery time, sequence, destination, bytes).
type InFlight = Reverse<(Instant, u64, usize, Vec<u8>)>;

struct Wire {
    rng: Rng,
    net: Net,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    /// Drop everything sent to these endpoints' peers (a vanished endpoint).
    cut: [bool; 2],
}

impl Wire {
    fn new(seed: u64, net: Net) -> Wire {
        Wire {
            rng: Rng(seed),
            net,
            queue: BinaryHeap::new(),
            seq: 0,
            cut: [false, false],
        }
    }

    fn send(&mut self, from: usize, bytes: Vec<u8>, now: Instant) {
        if self.cut[from] || self.rng.chance(self.net.loss) {
            return;
        }
        let copies = if self.rng.chance(self.net.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let jitter = self.rng.below(self.net.jitter.as_nanos() as u64 + 1);
            let at = now + self.net.delay + Duration::from_nanos(jitter);
            self.seq += 1;
            self.queue
                .push(Reverse((at, self.seq, 1 - from, bytes.clone())));
        }
    }

    fn next_time(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((t, ..))| *t)
    }

    fn pop_due(&mut self, now: Instant) -> Option<(usize, Vec<u8>)> {
        if self.next_time()? <= now {
            let Reverse((_, _, to, b)) = self.queue.pop().expect("peeked");
            Some((to, b))
        } else {
            None
        }
    }
}

/// The application on one side: bytes to send, then an EOF; everything read is kept.
struct App {
    out: Vec<u8>,
    written: usize,
    eof: Eof,
    got: Vec<u8>,
    reading: bool,
    /// When set, writes come in pieces of random size, about half of them handed over whole
    /// (`Stream::write_owned`, after a few bytes of junk to skip) instead of copied.
    mixed: Option<Rng>,
    /// Owned buffers the stream gave back once acknowledged.
    spent: usize,
}

impl App {
    fn new(out: Vec<u8>, eof: Eof) -> App {
        App {
            out,
            written: 0,
            eof,
            got: Vec::new(),
            reading: true,
            mixed: None,
            spent: 0,
        }
    }

    /// Writes the next piece: all that fits, or in mixed mode a random piece, copied or owned.
    fn write(&mut self, s: &mut Stream) -> usize {
        let rest = &self.out[self.written..];
        let Some(rng) = self.mixed.as_mut() else {
            return s.write(rest);
        };
        let n = (1 + rng.below(40_000) as usize).min(rest.len());
        if !rng.chance(50) {
            return s.write(&rest[..n]);
        }
        let skip = rng.below(3) as usize;
        let mut buf = rng.bytes(skip);
        buf.extend_from_slice(&rest[..n]);
        s.write_owned(buf, skip).unwrap_or(0)
    }

    fn run(&mut self, s: &mut Stream) {
        while s.take_spent().is_some() {
            self.spent += 1;
        }
        if self.written < self.out.len() {
            self.written += self.write(s);
            if self.written == self.out.len() {
                s.finish(self.eof);
            }
        } else if self.written == 0 {
            s.finish(self.eof);
        }
        if self.reading {
            let mut buf = [0u8; 4096];
            for _ in 0..1000 {
                let n = s.read(&mut buf);
                if n == 0 {
                    break;
                }
                self.got.extend_from_slice(&buf[..n]);
            }
        }
    }
}

struct Sim {
    t0: Instant,
    now: Instant,
    streams: [Stream; 2],
    apps: [App; 2],
    wire: Wire,
    heard: [bool; 2],
    steps: usize,
}

impl Sim {
    fn new(seed: u64, net: Net, cfgs: [StreamConfig; 2], apps: [App; 2]) -> Sim {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            streams: [Stream::new(&cfgs[0], t0), Stream::new(&cfgs[1], t0)],
            apps,
            wire: Wire::new(seed, net),
            heard: [false, false],
            steps: 0,
        }
    }

    /// One event: applications act, streams send what is due, the clock jumps to the next event,
    /// due packets are delivered. Returns false when nothing can ever happen again.
    fn step(&mut self) -> bool {
        self.steps += 1;
        for i in 0..2 {
            self.apps[i].run(&mut self.streams[i]);
            // Endpoint 0 is the client: 640-byte messages until the server has spoken.
            let max_len = if i == 0 && !self.heard[0] { 640 } else { 1088 };
            let mut out = [0u8; 1088];
            for _ in 0..10_000 {
                let Some(n) = self.streams[i].poll_message(self.now, max_len, &mut out) else {
                    break;
                };
                assert!(
                    n <= max_len && n % 16 == 0 && n >= 48,
                    "bad message size {n}"
                );
                self.wire.send(i, out[..n].to_vec(), self.now);
            }
            // Memory stays bounded: receive ring (window rounded up to a power of two), send
            // buffer, block queue and hole list.
            assert!(self.streams[i].buffer_bytes() <= 2 * 262_144 + 65_536);
            // poll_timeout is exact: once poll_message has nothing, nothing is due now.
            if let Some(t) = self.streams[i].poll_timeout() {
                assert!(
                    t > self.now,
                    "busy loop: due {:?} at {:?}",
                    t - self.t0,
                    self.now - self.t0
                );
            }
        }
        let next = [
            self.wire.next_time(),
            self.streams[0].poll_timeout(),
            self.streams[1].poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(next) = next else { return false };
        if next > self.now {
            self.now = next;
        }
        while let Some((to, bytes)) = self.wire.pop_due(self.now) {
            if self.streams[to].handle_message(&bytes, self.now) {
                self.heard[to] = true;
            }
        }
        true
    }

    fn done(&self) -> bool {
        self.streams.iter().all(|s| s.is_done())
    }

    fn run_until_done(&mut self, max_steps: usize) {
        while !self.done() {
            assert!(
                self.steps < max_steps,
                "no completion after {max_steps} steps"
            );
            // The applications may finish reading inside the last step.
            // The applications may finish reading inside the last step.
            assert!(self.step() || self.done(), "stalled: nothing scheduled");
            for s in &self.streams {
                assert_eq!(s.error(), None);
            }
        }
        for _ in 0..10 {
            self.apps[0].run(&mut self.streams[0]);
            self.apps[1].run(&mut self.streams[1]);
        }
    }

    fn check_delivery(&self) {
        for i in 0..2 {
            let j = 1 - i;
            assert_eq!(
                self.apps[j].got.len(),
                self.apps[i].out.len(),
                "length {i}->{j}"
            );
            assert!(self.apps[j].got == self.apps[i].out, "bytes {i}->{j}");
            assert_eq!(self.streams[j].peer_eof(), Some(self.apps[i].eof));
            assert!(self.streams[i].all_acked());
        }
    }
}

fn configs(factory: congestion::CongestionFactory) -> [StreamConfig; 2] {
    let mut c = StreamConfig::client();
    let mut s = StreamConfig::server();
    c.congestion = factory.clone();
    s.congestion = factory;
    [c, s]
}

fn lossy_transfer(seed: u64, factory: congestion::CongestionFactory, max_size: u64) -> Sim {
    let mut rng = Rng(seed ^ 0xABCD);
    let size = |rng: &mut Rng| match rng.below(5) {
        0 => 0,
        1 => rng.below(3) as usize,
        2 => rng.below(5000) as usize,
        _ => rng.below(max_size) as usize,
    };
    let eof = |rng: &mut Rng| {
        if rng.chance(50) {
            Eof::Success
        } else {
            Eof::Failure
        }
    };
    let (na, nb) = (size(&mut rng), size(&mut rng));
    let apps = [
        App::new(rng.bytes(na), eof(&mut rng)),
        App::new(rng.bytes(nb), eof(&mut rng)),
    ];
    let mut sim = Sim::new(seed, LOSSY, configs(factory), apps);
    sim.run_until_done(2_000_000);
    sim.check_delivery();
    sim
}

#[test]
fn lossy_network_many_seeds_default_controller() {
    for seed in 0..200 {
        lossy_transfer(seed, congestion::default_factory(), 400_000);
    }
}

/// Copied and owned writes mixed, through loss, duplication and reordering: every byte arrives
/// once and in order, and owned buffers come back once acknowledged.
#[test]
fn lossy_network_with_owned_and_copied_writes() {
    let mut spent = 0;
    for seed in 2000..2040 {
        let mut rng = Rng(seed);
        let (na, nb) = (100_000 + rng.below(300_000), rng.below(200_000));
        let mut apps = [
            App::new(rng.bytes(na as usize), Eof::Success),
            App::new(rng.bytes(nb as usize), Eof::Success),
        ];
        for (i, app) in apps.iter_mut().enumerate() {
            app.mixed = Some(Rng(seed * 2 + i as u64));
        }
        let mut sim = Sim::new(seed, LOSSY, configs(congestion::default_factory()), apps);
        sim.run_until_done(2_000_000);
        sim.check_delivery();
        for (app, s) in sim.apps.iter_mut().zip(&mut sim.streams) {
            while s.take_spent().is_some() {
                app.spent += 1;
            }
            spent += app.spent;
        }
    }
    assert!(spent > 100, "owned buffers come back: {spent}");
}

#[test]
fn lossy_network_many_seeds_chicago() {
    for seed in 1000..1060 {
        lossy_transfer(seed, congestion::chicago(), 100_000);
    }
}

#[test]
fn clean_network_transfer_is_exact_and_takes_few_retransmissions() {
    let net = Net {
        loss: 0,
        dup: 0,
        delay: Duration::from_millis(2),
        jitter: Duration::ZERO,
    };
    let mut rng = Rng(5);
    let apps = [
        App::new(rng.bytes(200_000), Eof::Success),
        App::new(rng.bytes(150_000), Eof::Success),
    ];
    let mut sim = Sim::new(5, net, configs(congestion::default_factory()), apps);
    sim.run_until_done(200_000);
    sim.check_delivery();
    for s in &sim.streams {
        let st = s.stats();
        assert_eq!(st.retransmissions, 0);
        assert!(st.srtt.is_some());
    }
}

#[test]
fn slow_reader_fills_the_window_then_catches_up() {
    for seed in 0..5 {
        let mut rng = Rng(seed + 77);
        let apps = [
            App::new(rng.bytes(600_000), Eof::Success),
            App::new(Vec::new(), Eof::Success),
        ];
        let mut sim = Sim::new(seed, LOSSY, configs(congestion::default_factory()), apps);
        sim.apps[1].reading = false;
        let stop_at = sim.t0 + Duration::from_secs(5);
        while sim.now < stop_at {
            assert!(sim.steps < 500_000);
            assert!(sim.step());
        }
        // The receiver holds at most its window; the sender is blocked, not failed.
        assert!(sim.streams[1].readable() <= StreamConfig::server().recv_window);
        assert!(sim.streams[1].readable() > 0);
        assert_eq!(sim.streams[0].error(), None);
        assert!(sim.streams[0].writable() == 0 || sim.apps[0].written == 600_000);
        sim.apps[1].reading = true;
        sim.run_until_done(2_000_000);
        sim.check_delivery();
    }
}

#[test]
fn vanished_peer_makes_the_stream_fail() {
    let mut rng = Rng(9);
    let apps = [
        App::new(rng.bytes(100_000), Eof::Success),
        App::new(Vec::new(), Eof::Success),
    ];
    let mut cfgs = configs(congestion::default_factory());
    cfgs[0].dead_after = Duration::from_secs(20);
    let mut sim = Sim::new(9, LOSSY, cfgs, apps);
    for _ in 0..200 {
        assert!(sim.step());
    }
    sim.wire.cut[1] = true; // endpoint 1 vanishes: nothing it sends arrives
    let cut_at = sim.now;
    while sim.streams[0].error().is_none() {
        assert!(sim.steps < 100_000, "never failed");
        sim.step();
    }
    assert_eq!(sim.streams[0].error(), Some(StreamError::PeerUnresponsive));
    assert!(sim.now >= cut_at + Duration::from_secs(20) - Duration::from_secs(1));
    assert_eq!(sim.streams[0].poll_timeout(), None);
    let mut out = [0u8; 1088];
    assert_eq!(
        sim.streams[0].poll_message(sim.now + Duration::from_secs(1), 1088, &mut out),
        None
    );
}

/// What can be observed of a stream from outside.
fn snapshot(s: &Stream) -> String {
    let st = s.stats();
    format!(
        "{} {} {} {} {:?} {:?} {:?} {} {} {} {}",
        s.readable(),
        s.writable(),
        s.all_acked(),
        s.is_done(),
        s.peer_eof(),
        s.poll_timeout(),
        s.error(),
        st.bytes_sent,
        st.bytes_received,
        st.messages_sent,
        st.messages_received
    )
}

#[test]
fn garbage_truncated_and_forged_messages_change_nothing() {
    let mut rng = Rng(42);
    let apps = [
        App::new(rng.bytes(50_000), Eof::Success),
        App::new(rng.bytes(30_000), Eof::Failure),
    ];
    let mut sim = Sim::new(42, LOSSY, configs(congestion::default_factory()), apps);
    let mut fed = 0;
    while !sim.done() {
        assert!(sim.steps < 1_000_000);
        assert!(sim.step());
        if !sim.steps.is_multiple_of(7) {
            continue;
        }
        for i in 0..2 {
            let s = &mut sim.streams[i];
            let before = snapshot(s);
            // Garbage of a wrong length.
            let mut len = rng.below(1200) as usize;
            if (48..=1088).contains(&len) && len.is_multiple_of(16) {
                len += 1;
            }
            assert!(!s.handle_message(&rng.bytes(len), sim.now));
            // A valid-looking message truncated to a length that is not a multiple of 16.
            let mut h = MessageHeader {
                id: 5,
                ..Default::default()
            };
            h.set_data(10, None);
            let mut buf = [0u8; 192];
            h.encode(b"0123456789", 192, &mut buf).unwrap();
            let cut = 48 + rng.below(143) as usize;
            let cut = if cut.is_multiple_of(16) { cut + 1 } else { cut };
            assert!(!s.handle_message(&buf[..cut], sim.now));
            assert!(!s.handle_message(&buf[..32], sim.now));
            // A forged acknowledgement of far more than was ever sent, with data.
            let mut f = MessageHeader {
                id: rng.next() as u32 | 1,
                ack_id: rng.next() as u32,
                ack_end: 1 << 40,
                pos: rng.below(1000),
                ..Default::default()
            };
            f.set_data(10, Some(Stop::Success));
            let mut fb = [0u8; 192];
            f.encode(b"forgedxxxx", 192, &mut fb).unwrap();
            assert!(!s.handle_message(&fb, sim.now));
            assert_eq!(snapshot(s), before);
            fed += 4;
        }
    }
    assert!(fed > 100);
    sim.run_until_done(1_000_000);
    sim.check_delivery();
}

#[test]
fn hostile_but_well_formed_messages_never_panic_or_corrupt_bounds() {
    // Well-formed messages with arbitrary fields (what a buggy or malicious authenticated peer
    // could send): the stream must not panic, and must stay within its bounds.
    let t0 = Instant::now();
    let mut rng = Rng(3);
    for round in 0..200u64 {
        let mut s = Stream::new(&StreamConfig::client(), t0);
        let n = rng.below(20_000) as usize;
        s.write(&rng.bytes(n));
        let mut now = t0;
        let mut out = [0u8; 1088];
        for k in 0..200 {
            now += Duration::from_millis(rng.below(50));
            while s.poll_message(now, 1088, &mut out).is_some() {}
            let d = rng.below(1100) as usize;
            let len = (48 + d).div_ceil(16) * 16;
            let len = len.min(1088);
            let mut m = rng.bytes(len);
            if rng.chance(50) {
                // Plausible positions and acks.
                m[8..16].copy_from_slice(&rng.below(30_000).to_le_bytes());
                m[40..48].copy_from_slice(&rng.below(300_000).to_le_bytes());
                let dl = (rng.below(1025) as u16).min((len - 48) as u16);
                let fl = dl | [0u16, 2048, 4096][rng.below(3) as usize];
                m[38..40].copy_from_slice(&fl.to_le_bytes());
            }
            s.handle_message(&m, now);
            assert!(
                s.readable() <= StreamConfig::client().recv_window,
                "round {round} {k}"
            );
            let mut buf = [0u8; 2048];
            s.read(&mut buf);
        }
    }
}

/// A peer that behaves like the reference `curvecpmessage`: it handles at most one message per
/// millisecond (64 queued at most, the rest dropped), acknowledges every message with a nonzero
/// ID separately with a 192-byte acknowledgement and never sends ranges, drops data beyond its
/// 128 KiB window, and sends one 5-byte block with the success STOP, retransmitted every second
/// until acknowledged.
struct RefPeer {
    queue: VecDeque<Vec<u8>>,
    next_process: Instant,
    received: Vec<u8>,
    valid: Vec<bool>,
    contiguous: u64,
    eof_total: Option<u64>,
    acks: VecDeque<Vec<u8>>,
    hello_acked: bool,
    hello_sent: Option<Instant>,
    next_id: u32,
}

impl RefPeer {
    const WINDOW: u64 = 131_072;

    fn new(now: Instant) -> RefPeer {
        RefPeer {
            queue: VecDeque::new(),
            next_process: now,
            received: Vec::new(),
            valid: Vec::new(),
            contiguous: 0,
            eof_total: None,
            acks: VecDeque::new(),
            hello_acked: false,
            hello_sent: None,
            next_id: 1,
        }
    }

    fn deliver(&mut self, m: Vec<u8>) {
        if self.queue.len() < 64 {
            self.queue.push_back(m);
        }
    }

    fn process(&mut self, now: Instant) {
        if now < self.next_process {
            return;
        }
        let Some(m) = self.queue.pop_front() else {
            return;
        };
        self.next_process = now + Duration::from_millis(1);
        let Some(msg) = Message::parse(&m) else {
            return;
        };
        let h = msg.header;
        if h.ack_end >= 6 {
            self.hello_acked = true;
        }
        let Some(d) = msg.data else { return };
        let end = h.pos + d.len() as u64;
        if end > self.contiguous + Self::WINDOW {
            return;
        }
        if h.stop().is_some() {
            self.eof_total = Some(end);
        }
        let need = end as usize;
        if self.received.len() < need {
            self.received.resize(need, 0);
            self.valid.resize(need, false);
        }
        for (k, &b) in d.iter().enumerate() {
            let at = h.pos as usize + k;
            self.received[at] = b;
            self.valid[at] = true;
        }
        while (self.contiguous as usize) < self.valid.len() && self.valid[self.contiguous as usize]
        {
            self.contiguous += 1;
        }
        if h.id == 0 {
            return;
        }
        let a1 = match self.eof_total {
            Some(t) if t == self.contiguous => t + 1,
            _ => self.contiguous,
        };
        let ack = MessageHeader {
            ack_id: h.id,
            ack_end: a1,
            ..Default::default()
        };
        let mut b = vec![0u8; 192];
        ack.encode(&[], 192, &mut b).unwrap();
        self.acks.push_back(b);
    }

    fn poll(&mut self, now: Instant) -> Option<Vec<u8>> {
        if let Some(a) = self.acks.pop_front() {
            return Some(a);
        }
        let due = self
            .hello_sent
            .is_none_or(|t| now >= t + Duration::from_secs(1));
        if !self.hello_acked && due {
            self.hello_sent = Some(now);
            let mut h = MessageHeader {
                id: self.next_id,
                ..Default::default()
            };
            self.next_id += 1;
            h.set_data(5, Some(Stop::Success));
            let len = data_message_len(5).unwrap();
            let mut b = vec![0u8; len];
            h.encode(b"HELLO", len, &mut b).unwrap();
            return Some(b);
        }
        None
    }

    fn next_time(&self) -> Option<Instant> {
        let mut t = None;
        if !self.queue.is_empty() || !self.acks.is_empty() {
            t = Some(self.next_process);
        }
        if !self.hello_acked {
            let h = self
                .hello_sent
                .map_or(self.next_process, |s| s + Duration::from_secs(1));
            t = Some(t.map_or(h, |x: Instant| x.min(h)));
        }
        t
    }
}

fn against_reference_peer(seed: u64, net: Net, factory: congestion::CongestionFactory) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut rng = Rng(seed);
    let data = rng.bytes(300_000);
    let mut cfg = StreamConfig::client();
    cfg.congestion = factory;
    let mut ours = Stream::new(&cfg, t0);
    let mut peer = RefPeer::new(t0);
    let mut wire = Wire::new(seed, net);
    let mut written = 0;
    let mut got = Vec::new();
    let mut heard = false;
    let mut steps = 0;
    while !(ours.is_done() && peer.eof_total == Some(peer.contiguous)) {
        steps += 1;
        assert!(steps < 3_000_000, "no completion");
        assert_eq!(ours.error(), None);
        if written < data.len() {
            written += ours.write(&data[written..]);
            if written == data.len() {
                ours.finish(Eof::Success);
            }
        }
        let mut buf = [0u8; 64];
        let n = ours.read(&mut buf);
        got.extend_from_slice(&buf[..n]);
        let mut out = [0u8; 1088];
        let max_len = if heard { 1088 } else { 640 };
        while let Some(n) = ours.poll_message(now, max_len, &mut out) {
            wire.send(0, out[..n].to_vec(), now);
        }
        peer.process(now);
        while let Some(m) = peer.poll(now) {
            wire.send(1, m, now);
        }
        let next = [wire.next_time(), ours.poll_timeout(), peer.next_time()]
            .into_iter()
            .flatten()
            .min()
            .expect("something scheduled");
        now = now.max(next);
        while let Some((to, b)) = wire.pop_due(now) {
            if to == 0 {
                heard |= ours.handle_message(&b, now);
            } else {
                peer.deliver(b);
            }
        }
    }
    assert_eq!(&peer.received[..], &data[..]);
    assert_eq!(got, b"HELLO");
    assert_eq!(ours.peer_eof(), Some(Eof::Success));
}

#[test]
fn reference_like_peer_without_ranges() {
    let clean = Net {
        loss: 0,
        dup: 0,
        delay: Duration::from_micros(100),
        jitter: Duration::from_micros(50),
    };
    against_reference_peer(1, clean, congestion::default_factory());
    against_reference_peer(2, clean, congestion::chicago());
    for seed in 10..16 {
        against_reference_peer(seed, LOSSY, congestion::default_factory());
    }
}

#[test]
fn an_idle_stream_is_small() {
    let mut rng = Rng(11);
    let apps = [
        App::new(rng.bytes(300_000), Eof::Success),
        App::new(rng.bytes(300_000), Eof::Success),
    ];
    let mut sim = Sim::new(11, LOSSY, configs(congestion::default_factory()), apps);
    sim.run_until_done(1_000_000);
    sim.check_delivery();
    // An emptied large receive ring is kept `RING_IDLE` for more data, then released at the
    // next poll (which `poll_timeout` asks for).
    let later = sim.now + mm_platform::proto::curvecp::stream::RING_IDLE;
    for s in &mut sim.streams {
        assert!(s.poll_timeout().is_some_and(|t| t <= later));
        let mut out = [0u8; 1184];
        while s.poll_message(later, 1088, &mut out).is_some() {}
    }
    for s in &mut sim.streams {
        // Large buffers were released as they emptied; the rest goes on request.
        assert!(s.buffer_bytes() <= 3 * 8192 + 8192, "{}", s.buffer_bytes());
        s.shrink_to_fit();
        assert_eq!(s.buffer_bytes(), 0);
    }
    assert!(
        std::mem::size_of::<Stream>() < 1024,
        "{}",
        std::mem::size_of::<Stream>()
    );
}

/// Runs our stream against the reference `curvecpmessage` over its fd 8/9 pipe interface
/// (the reference tools' message-layer interface): `mode` is `-s` (it runs `cat` as its server program) or `-c` (it runs
/// `cat <&6 >&7`). It echoes what we send; we check the echo and the EOF both ways. Real pipes
/// and the real clock, bounded by a generous deadline (no timing assertion).
fn against_curvecpmessage(mode: &str, size: usize, factory: congestion::CongestionFactory) {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;

    // The program stores everything it receives, then sends it back: an echo that does not
    // couple the two directions (a plain `cat` can deadlock the reference itself: it processes
    // no acknowledgement while its pipe to the child is full, and the child blocks on output
    // that waits for acknowledgements).
    let dir = std::env::temp_dir().join(format!(
        "mm-stream-sim-{}-{mode}-{size}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("in");
    let file = file.to_str().expect("utf-8 path");
    let prog = if mode == "-c" {
        format!("cat <&6 > {file} && exec cat {file} >&7")
    } else {
        format!("cat > {file} && exec cat {file}")
    };
    let script =
        format!("exec 8<&0 9>&1 </dev/null >&2; exec curvecpmessage -q {mode} sh -c '{prog}'");
    let mut child = Reaper(
        Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn curvecpmessage"),
    );
    let mut to_ref = child.0.stdin.take().expect("stdin");
    let mut from_ref = child.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut len = [0u8; 1];
        // Bounded: at most this many frames.
        for _ in 0..10_000_000u64 {
            if from_ref.read_exact(&mut len).is_err() {
                break;
            }
            let n = 16 * usize::from(len[0]);
            let mut m = vec![0u8; n];
            if from_ref.read_exact(&mut m).is_err() || tx.send(m).is_err() {
                break;
            }
        }
    });

    let mut rng = Rng(size as u64);
    let data = rng.bytes(size);
    let mut cfg = if mode == "-c" {
        StreamConfig::server()
    } else {
        StreamConfig::client()
    };
    cfg.congestion = factory;
    let start = Instant::now();
    let mut s = Stream::new(&cfg, start);
    let mut written = 0;
    let mut echo = Vec::new();
    let mut heard = false;
    let deadline = start + Duration::from_secs(120);
    let mut out = [0u8; 1089];
    for _ in 0..10_000_000u64 {
        let now = Instant::now();
        assert!(
            now < deadline,
            "no completion against curvecpmessage {mode}"
        );
        assert_eq!(
            s.error(),
            None,
            "failed after {:?}: {:?}",
            start.elapsed(),
            s.stats()
        );
        if s.is_done() {
            break;
        }
        if written < data.len() {
            written += s.write(&data[written..]);
            if written == data.len() {
                s.finish(Eof::Success);
            }
        } else if data.is_empty() {
            s.finish(Eof::Success);
        }
        let mut buf = [0u8; 8192];
        loop {
            let n = s.read(&mut buf);
            if n == 0 {
                break;
            }
            echo.extend_from_slice(&buf[..n]);
        }
        // Client role: 640-byte messages until the peer has spoken.
        let max_len = if mode == "-s" && !heard { 640 } else { 1088 };
        while let Some(n) = s.poll_message(now, max_len, &mut out[1..]) {
            out[0] = (n / 16) as u8;
            to_ref
                .write_all(&out[..=n])
                .expect("write to curvecpmessage");
        }
        let wait = s
            .poll_timeout()
            .map_or(Duration::from_millis(100), |t| {
                t.saturating_duration_since(now)
            })
            .min(Duration::from_millis(100));
        if let Ok(m) = rx.recv_timeout(wait) {
            heard |= s.handle_message(&m, Instant::now());
            while let Ok(m) = rx.try_recv() {
                heard |= s.handle_message(&m, Instant::now());
            }
        }
    }
    assert!(s.is_done(), "stream not done");
    assert_eq!(echo.len(), data.len());
    assert!(echo == data, "echo differs");
    assert_eq!(s.peer_eof(), Some(Eof::Success));
    // Give the reference time to see our final acknowledgement and exit; keep acknowledging.
    let end = Instant::now() + Duration::from_secs(15);
    let mut exited = None;
    while Instant::now() < end {
        if let Some(st) = child.0.try_wait().expect("wait") {
            exited = Some(st);
            break;
        }
        if let Ok(m) = rx.recv_timeout(Duration::from_millis(20)) {
            s.handle_message(&m, Instant::now());
            while let Some(n) = s.poll_message(Instant::now(), 1088, &mut out[1..]) {
                out[0] = (n / 16) as u8;
                let _ = to_ref.write_all(&out[..=n]);
            }
        }
    }
    drop(to_ref);
    drop(child);
    let _ = reader.join();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        exited.is_some_and(|st| st.success()),
        "curvecpmessage {mode} did not exit cleanly"
    );
}

/// Kills and reaps a child process when dropped (also when a test assertion fails).
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn reference_tools_present() -> bool {
    // Looked up on PATH, the way the test's shell finds it.
    let present = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("curvecpmessage").is_file()))
        .unwrap_or(false);
    if !present {
        assert!(
            std::env::var("MM_REQUIRE_REFERENCE").as_deref() != Ok("1"),
            "MM_REQUIRE_REFERENCE=1 but curvecpmessage is not on PATH: install nacl-tools"
        );
        mm_platform::proto::skip_test(
            "interop_with_reference_curvecpmessage_over_pipes",
            "curvecpmessage not installed (apt-get install nacl-tools); \
             CI sets MM_REQUIRE_REFERENCE=1.",
        );
    }
    present
}

#[test]
fn interop_with_reference_curvecpmessage_over_pipes() {
    if !reference_tools_present() {
        return;
    }
    against_curvecpmessage("-s", 300_000, congestion::default_factory());
    against_curvecpmessage("-c", 300_000, congestion::default_factory());
    against_curvecpmessage("-s", 0, congestion::default_factory());
    against_curvecpmessage("-c", 50_000, congestion::chicago());
}

/// One step of an endless bulk transfer from stream 0 to stream 1: top up the sender, drain
/// the receiver, put every due message on the wire, advance to the next event and deliver what
/// is due. Returns the new time.
fn bulk_step(streams: &mut [Stream; 2], wire: &mut Wire, now: Instant) -> Instant {
    let chunk = [0x5Au8; 65536];
    let mut sink = [0u8; 65536];
    streams[0].write(&chunk);
    while streams[1].read(&mut sink) > 0 {}
    for (i, s) in streams.iter_mut().enumerate() {
        let mut out = [0u8; 1088];
        while let Some(n) = s.poll_message(now, 1088, &mut out) {
            wire.send(i, out[..n].to_vec(), now);
        }
    }
    let next = [
        wire.next_time(),
        streams[0].poll_timeout(),
        streams[1].poll_timeout(),
    ]
    .into_iter()
    .flatten()
    .min()
    .expect("something scheduled");
    let now = now.max(next);
    while let Some((to, b)) = wire.pop_due(now) {
        streams[to].handle_message(&b, now);
    }
    now
}

#[test]
fn default_controller_backs_off_under_loss_and_recovers() {
    // One endless bulk stream from 0 to 1 over a 10 ms RTT path: clean, then 5% loss, then
    // clean again. The rate (bytes acknowledged per fake second) must drop under loss and rise
    // again afterwards.
    let clean = Net {
        loss: 0,
        dup: 0,
        delay: Duration::from_millis(5),
        jitter: Duration::from_micros(200),
    };
    let cfgs = configs(congestion::default_factory());
    let t0 = Instant::now();
    let mut now = t0;
    let mut streams = [Stream::new(&cfgs[0], t0), Stream::new(&cfgs[1], t0)];
    let mut wire = Wire::new(17, clean);
    let mut rates = Vec::new();
    let mut steps = 0u64;
    for (phase, loss, secs) in [(0, 0, 2u64), (1, 5, 2), (2, 0, 4)] {
        wire.net.loss = loss;
        let start_acked = streams[0].bytes_acked();
        let end = now + Duration::from_secs(secs);
        while now < end {
            steps += 1;
            assert!(steps < 3_000_000, "too many steps in phase {phase}");
            now = bulk_step(&mut streams, &mut wire, now);
            assert_eq!(streams[0].error(), None);
        }
        // Rate of the last second of the phase would be nicer, but the whole phase is enough
        // to show the trend.
        rates.push((streams[0].bytes_acked() - start_acked) / secs);
    }
    assert!(rates[1] * 2 < rates[0], "no back-off under loss: {rates:?}");
    assert!(rates[2] > rates[1] * 2, "no recovery after loss: {rates:?}");
}

#[test]
fn harsh_networks_and_tiny_buffers() {
    let nets = [
        // Heavy loss and duplication, jitter far above the delay (heavy reordering).
        Net {
            loss: 30,
            dup: 20,
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(20),
        },
        // A fast, nearly clean path.
        Net {
            loss: 2,
            dup: 0,
            delay: Duration::from_micros(30),
            jitter: Duration::from_micros(100),
        },
        // Half the packets duplicated.
        Net {
            loss: 5,
            dup: 50,
            delay: Duration::from_micros(10),
            jitter: Duration::from_millis(5),
        },
    ];
    for (k, net) in nets.into_iter().enumerate() {
        for seed in 0..60u64 {
            let mut rng = Rng(seed ^ 0x5555 ^ k as u64);
            let size = |rng: &mut Rng| match rng.below(4) {
                0 => rng.below(3) as usize,
                1 => rng.below(3000) as usize,
                _ => rng.below(200_000) as usize,
            };
            let (na, nb) = (size(&mut rng), size(&mut rng));
            let apps = [
                App::new(rng.bytes(na), Eof::Success),
                App::new(rng.bytes(nb), Eof::Failure),
            ];
            let f = if seed % 3 == 0 {
                congestion::chicago()
            } else {
                congestion::default_factory()
            };
            let mut cf = configs(f);
            // Under 30% loss each way a 30 s silence can really happen: this test is about
            // delivery, not about giving up.
            for c in &mut cf {
                c.dead_after = Duration::from_secs(600);
            }
            if seed % 2 == 1 {
                // Windows and buffers far below a block (a window is raised to one block).
                for c in &mut cf {
                    c.recv_window = 1 + rng.below(5000) as usize;
                    c.send_buffer = 1 + rng.below(3000) as usize;
                }
            }
            let mut sim = Sim::new(seed, net, cf, apps);
            sim.run_until_done(3_000_000);
            sim.check_delivery();
        }
    }
}

#[test]
fn default_controller_backs_off_when_the_rtt_rises_and_recovers() {
    // One endless bulk stream from 0 to 1: a 10 ms RTT path, then the same path with up to
    // 40 ms more delay each way (a queue elsewhere: rising RTT, no loss), then 10 ms again. The
    // controller's window (simulated time only) must shrink while the RTT stands high and grow
    // back afterwards; every byte still arrives in order.
    let base = Net {
        loss: 0,
        dup: 0,
        delay: Duration::from_millis(5),
        jitter: Duration::from_micros(200),
    };
    let cfgs = configs(congestion::default_factory());
    let t0 = Instant::now();
    let mut now = t0;
    let mut streams = [Stream::new(&cfgs[0], t0), Stream::new(&cfgs[1], t0)];
    let mut wire = Wire::new(23, base);
    let mut windows = Vec::new();
    let mut lowest = Vec::new();
    let mut steps = 0u64;
    for (phase, delay_ms, secs) in [(0, 5u64, 2u64), (1, 45, 3), (2, 5, 3)] {
        let from = wire.net.delay;
        let to = Duration::from_millis(delay_ms);
        let start = now;
        let end = now + Duration::from_secs(secs);
        let mut low = usize::MAX;
        while now < end {
            // The delay moves to its new value over the first second of the phase.
            let f = (now - start).as_secs_f64().min(1.0);
            wire.net.delay = from.mul_f64(1.0 - f) + to.mul_f64(f);
            steps += 1;
            assert!(steps < 3_000_000, "too many steps in phase {phase}");
            now = bulk_step(&mut streams, &mut wire, now);
            assert_eq!(streams[0].error(), None);
            low = low.min(streams[0].stats().window);
        }
        windows.push(streams[0].stats().window);
        lowest.push(low);
    }
    let st = streams[0].stats();
    assert!(
        st.retransmissions * 100 < st.messages_sent,
        "few retransmissions on a path without loss: {st:?}"
    );
    assert!(
        lowest[1] * 4 < windows[0],
        "no back-off when the RTT rose: end of phases {windows:?}, lowest {lowest:?}"
    );
    assert!(
        windows[2] > lowest[1] * 4,
        "no recovery once the RTT fell: end of phases {windows:?}, lowest {lowest:?}"
    );
    // In order and complete: everything acknowledged was read as the same bytes.
    assert!(streams[1].stats().bytes_received >= streams[0].bytes_acked());
}

#[test]
fn default_controller_reaches_full_speed_within_tens_of_milliseconds() {
    // A clean LAN-like path (2 ms RTT): bytes acknowledged per 10 ms of simulated time. From
    // the third slot on (20 ms) the rate must be within 80% of the best slot, that is full
    // speed (128 KiB per RTT, the window the reference's receiver allows) after a few round
    // trips of slow start.
    let lan = Net {
        loss: 0,
        dup: 0,
        delay: Duration::from_millis(1),
        jitter: Duration::from_micros(20),
    };
    let cfgs = configs(congestion::default_factory());
    let t0 = Instant::now();
    let mut now = t0;
    let mut streams = [Stream::new(&cfgs[0], t0), Stream::new(&cfgs[1], t0)];
    let mut wire = Wire::new(5, lan);
    let chunk = [0x77u8; 65536];
    let mut sink = [0u8; 65536];
    let slot = Duration::from_millis(10);
    let mut per_slot = Vec::new();
    let mut steps = 0u64;
    for _ in 0..20 {
        let start_acked = streams[0].bytes_acked();
        let end = now + slot;
        while now < end {
            steps += 1;
            assert!(steps < 2_000_000, "too many steps");
            streams[0].write(&chunk);
            while streams[1].read(&mut sink) > 0 {}
            for (i, s) in streams.iter_mut().enumerate() {
                let mut out = [0u8; 1088];
                while let Some(n) = s.poll_message(now, 1088, &mut out) {
                    wire.send(i, out[..n].to_vec(), now);
                }
            }
            let next = [
                wire.next_time(),
                streams[0].poll_timeout(),
                streams[1].poll_timeout(),
                Some(end),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("something scheduled");
            now = now.max(next);
            while let Some((to, b)) = wire.pop_due(now) {
                streams[to].handle_message(&b, now);
            }
        }
        per_slot.push(streams[0].bytes_acked() - start_acked);
    }
    let best = *per_slot.iter().max().unwrap();
    // Full speed is the window per RTT: 128 KiB per 2 ms is 640 KiB per slot; allow for the
    // time acknowledgements take.
    assert!(best > 400 * 1024, "slow even at best: {per_slot:?}");
    for (i, &b) in per_slot.iter().enumerate().skip(2) {
        assert!(
            b * 10 >= best * 8,
            "slot {i} below 80% of full speed: {per_slot:?}"
        );
    }
    assert_eq!(streams[0].stats().retransmissions, 0);
}
