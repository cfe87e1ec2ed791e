//! The `curvecp_scale` group: one server (one `ServerDriver`, one UDP socket, its own
//! `mio::Poll`) holding 10,000 established idle connections (each client has its own socket and
//! sent 100 bytes, all acknowledged), and 10 busy ones that stream data to it. Client and server
//! run in this one thread, each with its own poll; only the server's turns are timed (poll with
//! a zero timeout, events, reading the streams, flush, `next_deadline`).
//!
//! Figures:
//! - `curvecp_scale_idle_memory_per_connection`: heap bytes the server holds per idle
//!   connection (the counting allocator, after the clients are dropped);
//! - `curvecp_scale_turn_all_idle_ns`: a server turn with 10,000 idle connections and nothing
//!   arriving (median of 2000);
//! - `curvecp_scale_turn_10_busy_us` and `curvecp_scale_turn_10_busy_no_idle_us`: a server turn
//!   while 10 clients send as fast as they can, with the 10,000 idle connections and before they
//!   exist (median over 1 s of turns), and `_us_per_packet`: the server's turn time per packet
//!   received, the same two ways.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use mm_platform::proto::crypto::{self, BoxKeyPair};
use mm_platform::proto::curvecp::client::ClientState;
use mm_platform::proto::curvecp::packet::ServerName;
use mm_platform::proto::curvecp::server::{ServerConfig, ServerEvent};
use mm_platform::proto::transport::{ClientDriver, ServerDriver, TransportKind};

use super::cc::{client_config, REF_NAME};
use super::{Bench, ALLOCATED};

const IDLE: usize = 10_000;
const BUSY: usize = 10;
/// Clients connecting at once while the idle set is built.
const CHUNK: usize = 500;
const LIMIT: Duration = Duration::from_secs(120);

struct Rig {
    server_poll: Poll,
    server_events: Events,
    server: ServerDriver,
    client_poll: Poll,
    client_events: Events,
    /// Busy clients first (tokens 0..BUSY), then the idle ones (dropped once the server's memory
    /// is measured; the server keeps their connections).
    clients: Vec<ClientDriver>,
    buf: Vec<u8>,
    pattern: Vec<u8>,
    /// Bytes the server read.
    received: u64,
}

impl Rig {
    /// One server turn; returns how long it took and the datagrams it read.
    fn server_turn(&mut self) -> (Duration, u64) {
        let before = self.server.udp_stats().map_or(0, |s| s.received);
        let t = Instant::now();
        self.server_poll
            .poll(&mut self.server_events, Some(Duration::ZERO))
            .expect("poll");
        let now = Instant::now();
        for ev in self.server_events.iter() {
            self.server
                .handle_event(self.server_poll.registry(), ev, now)
                .expect("server event");
        }
        while let Some(ev) = self.server.poll_event() {
            if let ServerEvent::Readable(id) = ev {
                if let Some(s) = self.server.server_mut().stream_mut(id) {
                    loop {
                        let n = s.read(&mut self.buf);
                        if n == 0 {
                            break;
                        }
                        self.received += n as u64;
                    }
                }
            }
        }
        self.server
            .flush(self.server_poll.registry(), Instant::now())
            .expect("flush");
        let _ = self.server.next_deadline();
        let took = t.elapsed();
        let after = self.server.udp_stats().map_or(0, |s| s.received);
        (took, after - before)
    }

    /// One client turn: events, then the busy clients (if `busy`) write what they can, then
    /// the clients with events or busy flush.
    fn client_turn(&mut self, busy: bool, touched: &mut Vec<usize>) {
        self.client_poll
            .poll(&mut self.client_events, Some(Duration::ZERO))
            .expect("poll");
        let now = Instant::now();
        touched.clear();
        for ev in self.client_events.iter() {
            let k = ev.token().0;
            if let Some(c) = self.clients.get_mut(k) {
                c.handle_event(self.client_poll.registry(), ev, now);
                touched.push(k);
            }
        }
        if busy {
            for c in self.clients[..BUSY].iter_mut() {
                let s = c.client_mut().stream_mut();
                while s.write(&self.pattern) > 0 {}
            }
            touched.extend(0..BUSY);
        }
        for &k in touched.iter() {
            self.clients[k]
                .flush(self.client_poll.registry(), now)
                .expect("flush");
        }
    }

    /// Connects clients `from..to` (each sending 100 bytes) and turns until all are
    /// established with everything acknowledged.
    fn connect(&mut self, from: usize, to: usize, client_key: &BoxKeyPair) {
        let addr = self.server.udp_addr().expect("udp");
        let server_key = self.server.server().public_key();
        for i in from..to {
            let mut config = client_config(server_key);
            config.long_term = Some(client_key.clone());
            let mut c = ClientDriver::connect(
                self.client_poll.registry(),
                Token(i),
                TransportKind::Udp,
                addr,
                config,
                Instant::now(),
            )
            .expect("connect");
            c.client_mut().stream_mut().write(&[1u8; 100]);
            c.flush(self.client_poll.registry(), Instant::now())
                .expect("flush");
            self.clients.push(c);
        }
        let start = Instant::now();
        let mut touched = Vec::new();
        let settled = |cs: &[ClientDriver]| {
            cs.iter().all(|c| {
                c.client().state() == ClientState::Established && c.client().stream().all_acked()
            })
        };
        while !settled(&self.clients[from..to]) && start.elapsed() < LIMIT {
            self.client_turn(false, &mut touched);
            // Clients with timers due (Hello and Initiate retries).
            let now = Instant::now();
            for c in self.clients[from..to].iter_mut() {
                if c.next_deadline().is_some_and(|d| d <= now) {
                    c.flush(self.client_poll.registry(), now).expect("flush");
                }
            }
            self.server_turn();
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(settled(&self.clients[from..to]), "clients established");
    }

    /// Server turns while the busy clients send, for `d`; (median turn, time per packet).
    fn busy_turns(&mut self, d: Duration) -> (f64, f64) {
        let mut touched = Vec::new();
        let mut turns = Vec::new();
        let (mut total, mut packets) = (Duration::ZERO, 0u64);
        let start = Instant::now();
        while start.elapsed() < d {
            self.client_turn(true, &mut touched);
            let (t, n) = self.server_turn();
            turns.push(t.as_secs_f64() * 1e6);
            total += t;
            packets += n;
        }
        // Let the busy clients' data drain (their send buffers empty, all acknowledged).
        let drain = Instant::now();
        while drain.elapsed() < Duration::from_secs(10)
            && !self.clients[..BUSY]
                .iter()
                .all(|c| c.client().stream().all_acked())
        {
            self.client_turn(false, &mut touched);
            for c in self.clients[..BUSY].iter_mut() {
                c.flush(self.client_poll.registry(), Instant::now())
                    .expect("flush");
            }
            self.server_turn();
        }
        turns.sort_by(f64::total_cmp);
        (
            turns[turns.len() / 2],
            total.as_secs_f64() * 1e6 / packets.max(1) as f64,
        )
    }
}

pub fn curvecp_scale(bench: &Bench) {
    let names = [
        "curvecp_scale_idle_memory_per_connection",
        "curvecp_scale_turn_all_idle_ns",
        "curvecp_scale_turn_10_busy_us",
        "curvecp_scale_turn_10_busy_no_idle_us",
    ];
    if !names.iter().any(|n| bench.wants(n)) {
        return;
    }
    let server_poll = Poll::new().expect("poll");
    let keypair = BoxKeyPair::generate();
    let mut config = ServerConfig::new(keypair);
    config.name = ServerName::from_dns(REF_NAME).expect("name");
    config.max_connections = 1 << 20;
    let server = ServerDriver::bind(
        server_poll.registry(),
        Token(0),
        config,
        Some("127.0.0.1:0".parse().expect("literal")),
        None,
        Instant::now(),
    )
    .expect("bind");
    let mut pattern = vec![0u8; 64 * 1024];
    crypto::random_bytes(&mut pattern);
    let mut rig = Rig {
        server_poll,
        server_events: Events::with_capacity(1024),
        server,
        client_poll: Poll::new().expect("poll"),
        client_events: Events::with_capacity(1024),
        clients: Vec::with_capacity(BUSY + IDLE),
        buf: vec![0u8; 64 * 1024],
        pattern,
        received: 0,
    };
    let client_key = BoxKeyPair::generate();
    rig.connect(0, BUSY, &client_key);
    let (busy_alone, busy_alone_pp) = rig.busy_turns(Duration::from_secs(1));
    // The idle connections; the server's heap share is measured once the clients are gone.
    let base = ALLOCATED.load(Ordering::Relaxed);
    let clients_before = rig.clients.len();
    let mut from = BUSY;
    while from < BUSY + IDLE {
        let to = (from + CHUNK).min(BUSY + IDLE);
        rig.connect(from, to, &client_key);
        from = to;
    }
    assert_eq!(rig.server.server().connection_count(), BUSY + IDLE);
    // Settle: acknowledgements out, no timers due.
    let settle = Instant::now();
    let mut touched = Vec::new();
    while settle.elapsed() < Duration::from_millis(300) {
        rig.client_turn(false, &mut touched);
        rig.server_turn();
    }
    let mut idle = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let (t, _) = rig.server_turn();
        idle.push(t.as_secs_f64() * 1e9);
    }
    idle.sort_by(f64::total_cmp);
    let with_clients = ALLOCATED.load(Ordering::Relaxed);
    // The server keeps its connections: CurveCP has no close packet.
    rig.clients.truncate(clients_before);
    let without_idle_clients = ALLOCATED.load(Ordering::Relaxed);
    let server_share = without_idle_clients.saturating_sub(base);
    let (busy, busy_pp) = rig.busy_turns(Duration::from_secs(1));
    eprintln!(
        "curvecp_scale: {} connections, server heap +{} KiB for the idle ones, idle clients' \
         heap {} KiB; turns all idle p50 {:.0} ns p99 {:.0} ns",
        rig.server.server().connection_count(),
        server_share / 1024,
        with_clients.saturating_sub(without_idle_clients) / 1024,
        idle[idle.len() / 2],
        idle[idle.len() * 99 / 100],
    );
    bench.emit(names[0], server_share as f64 / IDLE as f64, "bytes");
    bench.emit(names[1], idle[idle.len() / 2], "ns");
    bench.emit(names[2], busy, "us");
    bench.emit(&format!("{}_per_packet", names[2]), busy_pp, "us");
    bench.emit(names[3], busy_alone, "us");
    bench.emit(&format!("{}_per_packet", names[3]), busy_alone_pp, "us");
}
