//! The project's benchmarks: one JSON line per figure, `{"name":..,"value":..,"unit":..}`.
//!
//! Run: `cargo bench --bench figures [-- FILTER]` (a `harness = false` bench; plain
//! `cargo bench` runs it along with `benches/nat.rs`), or the front end
//! `cargo run --release --example bench [FILTER]`, which includes this file. FILTER (optional) is
//! a substring of the figure names to run (e.g. `local_dispatch`, `curvecp_bulk`, `nodes`). Each
//! figure group is one function registered in `GROUPS`; figure names start with the group's
//! name. The figures are measured here, in this program, never asserted in tests. The quinn
//! comparison (`compare_quinn`) runs only when asked for: `MM_BENCH_QUINN=1`, or a FILTER naming
//! it. `RUST_LOG=mm_platform=debug` shows the library's log while the figures run (what was
//! dropped and why, for one).

use std::sync::atomic::{AtomicUsize, Ordering};

use mm_platform::Shared;
use std::time::{Duration, Instant};

use mm_platform::{Limits, Platform};

/// Counts heap bytes in use and their peak (for the memory figures).
struct CountingAlloc;

static ALLOCATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static ALLOC_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc(layout);
        ALLOC_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !p.is_null() {
            let now = ALLOCATED.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed)
                + layout.size();
            PEAK.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout);
        ALLOCATED.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Which figures to run.
struct Bench {
    filter: Option<String>,
}

impl Bench {
    fn wants(&self, name: &str) -> bool {
        match self.filter.as_deref() {
            None => true,
            Some(f) => name.contains(f),
        }
    }

    fn emit(&self, name: &str, value: f64, unit: &str) {
        let line = serde_json::json!({
            "name": name,
            // Ratios and small per-packet counts keep more decimals, everything else one.
            "value": match unit {
                "x" => (value * 100.0).round() / 100.0,
                "calls" | "allocations" => (value * 1000.0).round() / 1000.0,
                _ => (value * 10.0).round() / 10.0,
            },
            "unit": unit,
            "host": machine().0,
            "cpu": machine().1,
            "commit": machine().2,
        });
        println!("{line}");
    }
}

/// Figure groups, one function each, run in this order. Each checks `Bench::wants` for its
/// figures. Others add theirs here (curvecp_*, remote_*).
const GROUPS: &[fn(&Bench)] = &[
    local_dispatch,
    local_dispatch_handle,
    nodes,
    cc::curvecp_bulk,
    cc::curvecp_reference,
    cc::curvecp_handshake,
    cc::curvecp_connections,
    cc::curvecp_round_trip,
    cc::curvecp_idle_memory,
    js::js_messages,
    ml::mainline,
    ml::mainline_testnets,
    kad::kad,
    bt::nodes_bt,
    bt::nodes_bt_ticks,
    sc::curvecp_scale,
    qc::compare_quinn,
];

#[path = "figures/bt_figures.rs"]
mod bt;
#[path = "figures/machine.rs"]
mod machine;
use machine::machine;
#[path = "figures/curvecp_figures.rs"]
mod cc;
#[path = "figures/js_figures.rs"]
mod js;
#[path = "figures/kad_figures.rs"]
mod kad;
#[path = "figures/mainline_figures.rs"]
mod ml;
#[path = "figures/quinn_figures.rs"]
mod qc;
#[path = "figures/scale_figures.rs"]
mod sc;

/// The bench's entry point. `cargo bench` passes `--bench`; `cargo test --benches` runs this
/// binary without it, and it then measures nothing. (Unused when the example includes this file
/// as a module.)
#[allow(dead_code)]
fn main() {
    let _ = env_logger::try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("benches/figures.rs: run it with `cargo bench --bench figures [-- FILTER]`");
        return;
    }
    run(args.into_iter().find(|a| !a.starts_with("--")));
}

/// Runs every figure group whose figures' names contain `filter` (all without one).
pub fn run(filter: Option<String>) {
    let bench = Bench { filter };
    for run in GROUPS {
        run(&bench);
    }
}

const MESSAGES: usize = 2_000_000;
const BATCH: usize = 50_000;

fn dispatch_platform() -> Platform {
    let mut p = Platform::builder()
        .limits(Limits {
            event_batch: 0,
            local_queue: BATCH,
            ..Limits::default()
        })
        .build()
        .expect("platform");
    // Unrelated subscriptions, so the trie is not trivially small.
    for i in 0..100 {
        p.on(&format!("self.other{i}.*"), |_ctx, _msg| {});
        p.on(&format!("public.app.topic{i}"), |_ctx, _msg| {});
    }
    p.poll(Some(Duration::ZERO)).expect("poll");
    p
}

/// Sends MESSAGES local messages on `topic` in batches, turning the reactor after each batch;
/// `drain` runs after every turn. Returns messages per second.
fn run_dispatch(p: &mut Platform, topic: &str, mut drain: impl FnMut() -> usize) -> (f64, usize) {
    let start = Instant::now();
    let mut received = 0;
    let mut sent = 0;
    while sent < MESSAGES {
        for _ in 0..BATCH.min(MESSAGES - sent) {
            let status = p.send("ms", topic, "local", &b"12345678"[..]);
            debug_assert!(status.is_ok());
            sent += 1;
        }
        p.poll(Some(Duration::ZERO)).expect("poll");
        received += drain();
    }
    let secs = start.elapsed().as_secs_f64();
    (sent as f64 / secs, received)
}

/// Local dispatch: messages per second from `send` to a subscriber, callback or channel,
/// subscribed to the exact topic or through a wildcard.
fn local_dispatch(bench: &Bench) {
    for (kind, pattern, topic) in [
        ("exact", "self.bench.exact", "bench.exact"),
        ("wildcard", "self.bench.*", "bench.wild.card"),
    ] {
        let name = format!("local_dispatch_callback_{kind}");
        if bench.wants(&name) {
            let mut p = dispatch_platform();
            // An atomic counter: the callback must be `Send`, and a lock a message would be
            // part of the figure.
            let count = std::sync::Arc::new(AtomicUsize::new(0));
            let c = count.clone();
            p.on(pattern, move |_ctx, msg| {
                c.fetch_add(msg.payload.len() / 8, Ordering::Relaxed);
            });
            let (rate, _) = run_dispatch(&mut p, topic, || 0);
            assert_eq!(
                count.load(Ordering::Relaxed),
                MESSAGES,
                "every message delivered"
            );
            bench.emit(&name, rate, "messages/s");
        }
        let name = format!("local_dispatch_channel_{kind}");
        if bench.wants(&name) {
            let mut p = dispatch_platform();
            let (_, rx) = p.on_channel(pattern, BATCH);
            let (rate, received) = run_dispatch(&mut p, topic, || rx.try_iter().count());
            assert_eq!(received, MESSAGES, "every message delivered");
            bench.emit(&name, rate, "messages/s");
        }
    }
}

/// Local dispatch from another thread: messages per second sent through a `Handle` (retrying
/// when its bounded channel is full) to a callback subscriber, the reactor blocking in `poll`.
fn local_dispatch_handle(bench: &Bench) {
    let name = "local_dispatch_handle_callback_exact";
    if !bench.wants(name) {
        return;
    }
    const N: usize = 1_000_000;
    let mut p = dispatch_platform();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    p.on("self.bench.exact", move |_ctx, _msg| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    let handle = p.handle();
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut full = 0u64;
        for _ in 0..N {
            loop {
                match handle.send("ms", "bench.exact", "local", &b"12345678"[..]) {
                    Ok(()) => break,
                    Err(mm_platform::SendError::BufferFull) => {
                        full += 1;
                        std::thread::yield_now();
                    }
                    other => panic!("unexpected send status {other:?}"),
                }
            }
        }
        full
    });
    // Bounded: stop after N deliveries or a minute.
    while count.load(Ordering::Relaxed) < N && start.elapsed() < Duration::from_secs(60) {
        p.poll(Some(Duration::from_millis(100))).expect("poll");
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = sender.join();
    assert_eq!(count.load(Ordering::Relaxed), N, "every message delivered");
    bench.emit(name, N as f64 / secs, "messages/s");
}

/// Two nodes in this process over real sockets on 127.0.0.1 (UDP, then TCP): connection set-up
/// (first send to first delivery on a fresh pair), messages per second of 100-byte JSON
/// messages, round trip of a small message (ping answered from a callback) against a raw UDP
/// round trip measured in the same run.
fn nodes(bench: &Bench) {
    if !bench.wants("nodes") {
        return;
    }
    const BURST: usize = 200_000;
    const PINGS: usize = 2_000;
    fn pair(kind: &str) -> (Platform, Platform) {
        let listen = serde_json::json!([{"transportType": kind,
            "transportInfo": {"address": "127.0.0.1", "port": 0}}]);
        let mk = || {
            Platform::builder()
                .connection_info(listen.clone())
                .limits(Limits {
                    event_batch: 0,
                    ..Limits::default()
                })
                .build()
                .expect("platform")
        };
        let (mut a, mut b) = (mk(), mk());
        let (ia, ib) = (a.node_info(), b.node_info());
        let _ = a.messaging().send("transports.nodeInfo", "local", &ib);
        let _ = b.messaging().send("transports.nodeInfo", "local", &ia);
        (a, b)
    }
    fn turn(a: &mut Platform, b: &mut Platform) {
        a.poll(Some(Duration::ZERO)).expect("poll");
        b.poll(Some(Duration::ZERO)).expect("poll");
    }
    fn pct(v: &mut [Duration], p: usize) -> f64 {
        v.sort();
        v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e6
    }
    // Raw UDP round trip, one thread, blocking sockets.
    let s1 = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let s2 = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let (a1, a2) = (
        s1.local_addr().expect("addr"),
        s2.local_addr().expect("addr"),
    );
    let mut raw = Vec::with_capacity(PINGS);
    let mut buf = [0u8; 64];
    for _ in 0..PINGS {
        let t = Instant::now();
        s1.send_to(b"ping", a2).expect("send");
        let _ = s2.recv_from(&mut buf).expect("recv");
        s2.send_to(b"pong", a1).expect("send");
        let _ = s1.recv_from(&mut buf).expect("recv");
        raw.push(t.elapsed());
    }
    bench.emit("nodes_raw_udp_rtt_p50", pct(&mut raw, 50), "us");
    for kind in ["udp", "tcp"] {
        let (mut a, mut b) = pair(kind);
        turn(&mut a, &mut b);
        let got = Shared::new(0usize);
        let g = got.clone();
        b.on("public.bench.*", move |_ctx, _msg| g.set(g.get() + 1));
        let bid = b.sign_id();
        let t = Instant::now();
        let _ = a.send("ms", "bench.first", bid, &b"1"[..]);
        let end = t + Duration::from_secs(10);
        while got.get() == 0 && Instant::now() < end {
            turn(&mut a, &mut b);
        }
        bench.emit(
            &format!("nodes_{kind}_connect"),
            t.elapsed().as_secs_f64() * 1e3,
            "ms",
        );
        let pad = "x".repeat(100 - r#"{"n":000000,"pad":""}"#.len());
        let payloads: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!(r#"{{"n":{:06},"pad":"{pad}"}}"#, 100_000 + i).into_bytes())
            .collect();
        got.set(0);
        let (mut sent, t) = (0, Instant::now());
        let end = t + Duration::from_secs(60);
        while got.get() < BURST && Instant::now() < end {
            while sent < BURST {
                let st = a.send("ms", "bench.burst", bid, payloads[sent % 1000].clone());
                if st.is_err() {
                    break;
                }
                sent += 1;
            }
            turn(&mut a, &mut b);
        }
        let rate = got.get() as f64 / t.elapsed().as_secs_f64();
        bench.emit(&format!("nodes_{kind}_messages_per_s"), rate, "msg/s");
        b.on("public.ping", |ctx, msg| {
            let _ = ctx.send("ms", "pong", msg.sender, msg.payload.clone());
        });
        let pongs = Shared::new(0usize);
        let p2 = pongs.clone();
        a.on("public.pong", move |_ctx, _msg| p2.set(p2.get() + 1));
        let mut rtts = Vec::with_capacity(PINGS);
        for i in 0..PINGS {
            let t = Instant::now();
            let _ = a.send("ms", "ping", bid, &b"1"[..]);
            let end = t + Duration::from_secs(5);
            while pongs.get() <= i && Instant::now() < end {
                turn(&mut a, &mut b);
            }
            rtts.push(t.elapsed());
        }
        bench.emit(&format!("nodes_{kind}_rtt_p50"), pct(&mut rtts, 50), "us");
        bench.emit(&format!("nodes_{kind}_rtt_p99"), pct(&mut rtts, 99), "us");
    }
}
