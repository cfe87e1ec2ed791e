//! The main demonstration: two nodes on this machine exchange messages through the platform's
//! API, over UDP and then over TCP on 127.0.0.1, and one of them goes offline for a while so
//! the persistent offline buffer shows its worth.
//!
//! ```text
//! cargo run --release --example demo
//! ```
//!
//! 1. Alice and Bob (UDP only) learn each other's nodeInfo, connect, exchange a greeting in both
//!    directions, then Alice sends a burst of 100-byte JSON messages (messages per second) and
//!    plays ping-pong with Bob (round trip p50 / p99).
//! 2. The same over TCP, with a new pair.
//! 3. Carol sends non-real-time messages to Dave while Dave is down: they are written to
//!    Carol's storage and retried; Dave comes back on the same address and gets each one once,
//!    and Carol's delivery callbacks report success.
//!
//! Everything runs in this one thread: the demo polls the platforms in turn. It ends by itself
//! and exits 0 when every step succeeded.

use mm_platform::Shared;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use mm_platform::identity::Identity;
use mm_platform::storage::MemStore;
use mm_platform::{Event, NetConfig, Platform, SendOptions};

const BURST: usize = 20_000;
const PINGS: usize = 500;

fn listen(kind: &str) -> Value {
    json!([{"transportType": kind, "transportInfo": {"address": "127.0.0.1", "port": 0}}])
}

fn node(kind: &str, cfg: NetConfig) -> Platform {
    Platform::builder()
        .storage(MemStore::new())
        .connection_info(listen(kind))
        .net(cfg)
        .build()
        .expect("platform")
}

fn short(p: &Platform) -> String {
    p.sign_id().to_string()[..8].to_string()
}

fn introduce(a: &mut Platform, b: &Platform) {
    a.add_peer(&b.node_info());
}

/// Polls every platform until `done` holds; fails after `limit`.
fn run_until(
    ps: &mut [&mut Platform],
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let end = Instant::now() + limit;
    loop {
        if done() {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("step did not finish within {limit:?}"));
        }
        for p in ps.iter_mut() {
            p.poll(Some(Duration::ZERO)).map_err(|e| e.to_string())?;
        }
    }
}

struct Figures {
    transport: &'static str,
    setup: Duration,
    rate: f64,
    p50: Duration,
    p99: Duration,
}

fn exchange(kind: &'static str) -> Result<Figures, String> {
    println!("\n== {} ==", kind.to_uppercase());
    let mut alice = node(kind, NetConfig::default());
    let mut bob = node(kind, NetConfig::default());
    println!(
        "alice {} listens on {}",
        short(&alice),
        alice.connection_info()[0]["transportInfo"]
    );
    println!(
        "bob   {} listens on {}",
        short(&bob),
        bob.connection_info()[0]["transportInfo"]
    );
    introduce(&mut alice, &bob);
    introduce(&mut bob, &alice);
    let (_, bob_rx) = bob.messaging().on_channel("public.demo.*", BURST + 16);
    let (_, alice_rx) = alice.messaging().on_channel("public.demo.*", 64);

    let start = Instant::now();
    let bid = bob.sign_id();
    let aid = alice.sign_id();
    let _ = alice
        .messaging()
        .send("demo.hello", bid, &json!({"text": "hello Bob"}));
    let mut greeting = None;
    run_until(&mut [&mut alice, &mut bob], Duration::from_secs(10), || {
        greeting = greeting.take().or_else(|| bob_rx.try_recv().ok());
        greeting.is_some()
    })?;
    let setup = start.elapsed();
    let g = greeting.expect("received");
    println!(
        "bob got {} from {}: {} (connection set-up and first message: {:.1} ms)",
        g.scoped_topic(),
        &g.sender.to_string()[..8],
        String::from_utf8_lossy(&g.payload),
        setup.as_secs_f64() * 1e3
    );
    let _ = bob
        .messaging()
        .send("demo.hello", aid, &json!({"text": "hello Alice"}));
    run_until(
        &mut [&mut alice, &mut bob],
        Duration::from_secs(10),
        || match alice_rx.try_recv() {
            Ok(m) => {
                println!(
                    "alice got {}: {}",
                    m.scoped_topic(),
                    String::from_utf8_lossy(&m.payload)
                );
                true
            }
            Err(_) => false,
        },
    )?;
    for e in alice.drain_events() {
        if let Event::Connection(p) = e {
            println!("alice: connection event for {}", &p.to_string()[..8]);
        }
    }

    // Burst: 100-byte JSON messages.
    let pad = "x".repeat(100 - r#"{"n":00000,"pad":""}"#.len());
    let t0 = Instant::now();
    let mut sent = 0;
    let mut got = 0;
    let end = t0 + Duration::from_secs(30);
    while got < BURST {
        if Instant::now() > end {
            return Err(format!(
                "burst: only {got} of {BURST} messages arrived in 30 s"
            ));
        }
        while sent < BURST {
            let msg = json!({"n": 10_000 + sent, "pad": pad});
            if alice.messaging().send("demo.burst", bid, &msg).is_err() {
                break;
            }
            sent += 1;
        }
        alice
            .poll(Some(Duration::ZERO))
            .map_err(|e| e.to_string())?;
        bob.poll(Some(Duration::ZERO)).map_err(|e| e.to_string())?;
        got += bob_rx.try_iter().count();
    }
    let rate = BURST as f64 / t0.elapsed().as_secs_f64();
    println!(
        "burst: {BURST} messages of 100 bytes in {:.0} ms: {rate:.0} messages/s",
        t0.elapsed().as_secs_f64() * 1e3
    );

    // Ping-pong: Bob answers every ping from a callback.
    bob.messaging().on("public.demo.ping", |ctx, msg, n: u64| {
        let _ = ctx.messaging().send("demo.pong", msg.sender, &n);
    });
    let (_, pong_rx) = alice.messaging().on_channel("public.demo.pong", 4);
    let mut rtts = Vec::with_capacity(PINGS);
    for i in 0..PINGS {
        let t = Instant::now();
        let _ = alice.messaging().send("demo.ping", bid, &i);
        run_until(&mut [&mut alice, &mut bob], Duration::from_secs(10), || {
            pong_rx.try_recv().is_ok()
        })?;
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let p50 = rtts[PINGS / 2];
    let p99 = rtts[PINGS * 99 / 100];
    println!(
        "ping-pong: {PINGS} round trips, p50 {:.0} us, p99 {:.0} us",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    let stats = &alice.connections()[0];
    println!(
        "alice's connection: {} frames out, {} in, {} bytes out, rtt {:?}, {} retransmissions",
        stats.messages_sent,
        stats.messages_received,
        stats.bytes_sent,
        stats.rtt.unwrap_or_default(),
        stats.retransmissions
    );
    Ok(Figures {
        transport: kind,
        setup,
        rate,
        p50,
        p99,
    })
}

fn offline_buffer() -> Result<(), String> {
    println!("\n== OFFLINE BUFFER ==");
    let quick = NetConfig {
        connect_timeout: Duration::from_millis(200),
        offline_retry: Duration::from_millis(300),
        ..NetConfig::default()
    };
    let dave_id = Identity::generate();
    let dave0 = Platform::builder()
        .identity(dave_id.clone())
        .connection_info(listen("udp"))
        .build()
        .map_err(|e| e.to_string())?;
    let (dave_info, dave_addr) = (dave0.node_info(), dave0.connection_info());
    drop(dave0);
    println!("dave {} is offline", &dave_id.sign_id().to_string()[..8]);
    let mut carol = node("udp", quick);
    carol.add_peer(&dave_info);
    let (_, failed) = carol.messaging().on_channel("self.transports.failed", 64);
    let delivered = Shared::new(0);
    const N: usize = 10;
    for i in 0..N {
        let d = delivered.clone();
        let payload = serde_json::to_vec(&json!({"note": i})).expect("json");
        let options = SendOptions {
            realtime: false,
            expire_after: Some(Duration::from_secs(3600)),
        };
        let status = carol.send_with_callback(
            "ms",
            "demo.note",
            dave_id.sign_id(),
            payload,
            options,
            move |_ctx, r| {
                if r.is_ok() {
                    *d.borrow_mut() += 1;
                } else {
                    println!("carol: note {i} failed: {r:?}");
                }
            },
        );
        status.map_err(|e| format!("send refused: {e}"))?;
    }
    println!(
        "carol queued {N} notes for dave; {} wait in her storage",
        carol.offline_pending()
    );
    let until = Instant::now() + Duration::from_millis(1500);
    run_until(&mut [&mut carol], Duration::from_secs(5), || {
        Instant::now() >= until
    })?;
    println!(
        "after 1.5 s: {} failed connection rounds reported, {} notes still buffered",
        failed.try_iter().count(),
        carol.offline_pending()
    );
    let mut dave = Platform::builder()
        .identity(dave_id)
        .connection_info(dave_addr)
        .build()
        .map_err(|e| e.to_string())?;
    println!("dave is back on the same address");
    let (_, notes) = dave.messaging().on_channel("public.demo.note", 64);
    let t = Instant::now();
    let mut received = Vec::new();
    run_until(
        &mut [&mut carol, &mut dave],
        Duration::from_secs(20),
        || {
            received.extend(notes.try_iter());
            received.len() >= N && *delivered.borrow() >= N
        },
    )?;
    println!(
        "dave got {} notes in {:.0} ms, each once and in order: {}; carol's callbacks: {} delivered; buffer now {}",
        received.len(),
        t.elapsed().as_secs_f64() * 1e3,
        received
            .iter()
            .enumerate()
            .all(|(i, m)| m.json::<Value>().map(|v| v["note"] == i).unwrap_or(false)),
        delivered.borrow(),
        carol.offline_pending()
    );
    if carol.offline_pending() != 0 {
        return Err("the buffer was not emptied".into());
    }
    Ok(())
}

fn main() {
    let t = Instant::now();
    let mut figures = Vec::new();
    for kind in ["udp", "tcp"] {
        match exchange(kind) {
            Ok(f) => figures.push(f),
            Err(e) => {
                eprintln!("demo failed over {kind}: {e}");
                std::process::exit(1);
            }
        }
    }
    if let Err(e) = offline_buffer() {
        eprintln!("demo failed in the offline step: {e}");
        std::process::exit(1);
    }
    println!("\n== FIGURES ==");
    for f in &figures {
        println!(
            "{}: set-up + first message {:.1} ms, {:.0} messages/s (100-byte JSON), round trip p50 {:.0} us p99 {:.0} us",
            f.transport,
            f.setup.as_secs_f64() * 1e3,
            f.rate,
            f.p50.as_secs_f64() * 1e6,
            f.p99.as_secs_f64() * 1e6
        );
    }
    println!("demo finished in {:.1} s", t.elapsed().as_secs_f64());
}
