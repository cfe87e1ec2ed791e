//! The `nodes_bt` group: bulk through the platform, node to node. Node B (its own thread and
//! reactor) subscribes to `bt` messages; node A (this thread) sends 100 payloads of 1 MiB
//! through the torrenting API (retrying after a turn on `BufferFull`), timed from the first send
//! until B's subscriber has all 100 MiB. Over UDP and over TCP, interleaved with the bare
//! CurveCP bulk transfer of the same transport (`curvecp_bulk_*`: one stream, client and server
//! in two threads), three rounds; each figure the median of its three, and the platform's
//! figure as a percentage of the bare one.
//!
//! B subscribes with `torrenting().on_bytes` (the callback borrows each payload, as the bare
//! receiver reads into a buffer it reuses): `nodes_bt_{udp,tcp}_1MiB`. The same transfer with
//! `torrenting().on`, whose callback gets a copy of its own, is `..._owned`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mm_platform::proto::transport::TransportKind;
use mm_platform::Shared;
use mm_platform::{Limits, Platform};

use super::cc::{bulk_run, thread_cpu};
use super::qc::load;
use super::Bench;

const PAYLOAD: usize = 1 << 20;
const COUNT: usize = 100;
const LIMIT: Duration = Duration::from_secs(120);

fn node(kind: &str) -> Platform {
    let listen = serde_json::json!([{"transportType": kind,
        "transportInfo": {"address": "127.0.0.1", "port": 0}}]);
    Platform::builder()
        .connection_info(listen)
        .limits(Limits {
            event_batch: 0,
            ..Limits::default()
        })
        .build()
        .expect("platform")
}

/// One transfer of `COUNT` payloads of `PAYLOAD` bytes from A to B; MB/s.
fn bt_once(kind: &str, owned: bool) -> f64 {
    let (info_tx, info_rx) = crossbeam_channel::bounded(1);
    let (a_tx, a_rx) = crossbeam_channel::bounded::<serde_json::Value>(1);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let kind_b = kind.to_string();
    let b = thread::spawn(move || {
        let cpu0 = thread_cpu();
        let mut b = node(&kind_b);
        info_tx
            .send((b.node_info().to_json(), b.sign_id()))
            .expect("send info");
        let a_info = a_rx.recv().expect("A's info");
        let _ = b.messaging().send("transports.nodeInfo", "local", &a_info);
        let got = Shared::new(0usize);
        let g = got.clone();
        if owned {
            b.torrenting().on("public.bench.bt", move |_ctx, _msg, v| {
                g.set(g.get() + v.len())
            });
        } else {
            b.torrenting()
                .on_bytes("public.bench.bt", move |_ctx, _msg, v| {
                    g.set(g.get() + v.len())
                });
        }
        let start = Instant::now();
        while got.get() < COUNT * PAYLOAD && !flag.load(Ordering::Relaxed) {
            b.poll(Some(Duration::from_millis(10))).expect("poll");
            if start.elapsed() > LIMIT {
                break;
            }
        }
        let done = Instant::now();
        // Let the last acknowledgements go out.
        let linger = Instant::now() + Duration::from_millis(20);
        while Instant::now() < linger {
            b.poll(Some(Duration::from_millis(1))).expect("poll");
        }
        (got.get(), done, thread_cpu() - cpu0)
    });
    let mut a = node(kind);
    let (b_info, bid) = info_rx.recv().expect("B's info");
    a_tx.send(a.node_info().to_json()).expect("send info");
    let _ = a.messaging().send("transports.nodeInfo", "local", &b_info);
    a.poll(Some(Duration::ZERO)).expect("poll");
    let mut payload = vec![0u8; PAYLOAD];
    mm_platform::proto::crypto::random_bytes(&mut payload);
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut sent = 0;
    // The sends queued before the first turn (the queue's bound's worth) and how long their
    // copies into fresh frames took: nothing goes on the wire meanwhile.
    let mut first_burst = None;
    while sent < COUNT && start.elapsed() < LIMIT {
        let st = a.torrenting().send("bench.bt", bid, &payload);
        if st.is_ok() {
            sent += 1;
        } else {
            first_burst.get_or_insert((sent, start.elapsed()));
            a.poll(Some(Duration::from_millis(1))).expect("poll");
        }
    }
    if let Some((n, t)) = first_burst {
        eprintln!(
            "bt {kind}: {n} payloads queued before the first turn, in {:.1} ms",
            t.as_secs_f64() * 1e3
        );
    }
    while !b.is_finished() && start.elapsed() < LIMIT {
        a.poll(Some(Duration::from_millis(1))).expect("poll");
    }
    stop.store(true, Ordering::Relaxed);
    let cpu_a = thread_cpu() - cpu0;
    let (got, done, cpu_b) = b.join().expect("node B");
    assert_eq!(got, COUNT * PAYLOAD, "every payload delivered");
    let secs = (done - start).as_secs_f64();
    eprintln!(
        "bt {kind}{}: {secs:.3} s, CPU of sender {:.3} s, of receiver {:.3} s",
        if owned { " owned" } else { "" },
        cpu_a.as_secs_f64(),
        cpu_b.as_secs_f64()
    );
    (COUNT * PAYLOAD) as f64 / secs / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `nodes_bt_{udp,tcp}_1MiB` (MB/s), the bare `curvecp_bulk` of the same rounds, and the
/// platform's share of it in percent.
pub fn nodes_bt(bench: &Bench) {
    for (kind, tk) in [("udp", TransportKind::Udp), ("tcp", TransportKind::Tcp)] {
        let name = format!("nodes_bt_{kind}_1MiB");
        if !bench.wants(&name) {
            continue;
        }
        let (mut bt, mut bare, mut owned) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..3 {
            let b = bt_once(kind, false);
            let c = bulk_run(tk, 100_000_000).mbps;
            let o = bt_once(kind, true);
            eprintln!(
                "nodes_bt {kind} round {round}: bt {b:.1} MB/s, bare {c:.1} MB/s, bt with owned \
                 payloads {o:.1} MB/s (load {})",
                load()
            );
            bt.push(b);
            bare.push(c);
            owned.push(o);
        }
        let (b, c, o) = (median(bt), median(bare), median(owned));
        bench.emit(&name, b, "MB/s");
        bench.emit(&format!("{name}_bare_curvecp_bulk"), c, "MB/s");
        bench.emit(&format!("{name}_percent_of_bare"), 100.0 * b / c, "%");
        bench.emit(&format!("{name}_owned"), o, "MB/s");
        bench.emit(&format!("{name}_owned_percent_of_bare"), 100.0 * o / c, "%");
    }
}

/// One 1 MiB `bt` payload from A to B, both polled by one loop that calls
/// `poll(Some(Duration::ZERO))` on each once a tick, as a game or GUI loop would; at `hz` ticks
/// a second (sleeping to the next tick), or free-running (`None`: no sleep). The number of
/// ticks from the send to B's subscriber holding every byte, and the time it took.
///
/// With `drain`, each tick polls a node again while its `next_deadline()` is already past (at
/// most 64 turns a tick), as a loop that tries to finish all due work within the frame would.
fn bt_ticks(kind: &str, hz: Option<u32>, drain: bool) -> (u32, Duration) {
    let mut a = node(kind);
    let mut b = node(kind);
    let _ = a
        .messaging()
        .send("transports.nodeInfo", "local", &b.node_info().to_json());
    let _ = b
        .messaging()
        .send("transports.nodeInfo", "local", &a.node_info().to_json());
    let got = Shared::new(0usize);
    let g = got.clone();
    b.torrenting()
        .on_bytes("public.bench.ticks", move |_ctx, _msg, v| {
            g.set(g.get() + v.len())
        });
    // Connect first (a short message both ways), so the figure is the bulk alone.
    let (_, hello) = b.messaging().on_channel("public.bench.hello", 4);
    let _ = a
        .messaging()
        .send("bench.hello", b.sign_id(), &serde_json::json!(1));
    let setup = Instant::now();
    while hello.try_recv().is_err() && setup.elapsed() < LIMIT {
        a.poll(Some(Duration::from_millis(1))).expect("poll");
        b.poll(Some(Duration::from_millis(1))).expect("poll");
    }
    let mut payload = vec![0u8; PAYLOAD];
    mm_platform::proto::crypto::random_bytes(&mut payload);
    let tick = hz.map(|hz| Duration::from_secs(1) / hz);
    let start = Instant::now();
    assert!(a
        .torrenting()
        .send("bench.ticks", b.sign_id(), &payload)
        .is_ok());
    let mut ticks = 0;
    let mut next = start;
    while got.get() < PAYLOAD && start.elapsed() < LIMIT {
        for p in [&mut a, &mut b] {
            p.poll(Some(Duration::ZERO)).expect("poll");
            for _ in 0..64 {
                if !drain || p.next_deadline().is_none_or(|d| d > Instant::now()) {
                    break;
                }
                p.poll(Some(Duration::ZERO)).expect("poll");
            }
        }
        ticks += 1;
        if std::env::var_os("MM_BENCH_TRACE").is_some() {
            for c in a.connections() {
                eprintln!(
                    "tick {ticks} +{:?}: A sent {} bytes {} msgs, rtt {:?}, rexmit {}",
                    start.elapsed(),
                    c.bytes_sent,
                    c.messages_sent,
                    c.rtt,
                    c.retransmissions
                );
            }
        }
        if let Some(tick) = tick {
            next += tick;
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
        }
    }
    assert_eq!(got.get(), PAYLOAD, "the payload delivered");
    (ticks, start.elapsed())
}

/// `nodes_bt_ticks_{60hz,60hz_drain,250hz,free}`: the ticks a loop polling two nodes takes to
/// move 1 MiB over `bt` (UDP), and the milliseconds; the median of five.
pub fn nodes_bt_ticks(bench: &Bench) {
    for (label, hz, drain) in [
        ("60hz", Some(60), false),
        ("60hz_drain", Some(60), true),
        ("250hz", Some(250), false),
        ("free", None, false),
    ] {
        let name = format!("nodes_bt_ticks_{label}");
        if !bench.wants(&name) {
            continue;
        }
        let mut runs: Vec<(u32, Duration)> = (0..5).map(|_| bt_ticks("udp", hz, drain)).collect();
        eprintln!("nodes_bt_ticks {label}: {runs:?}");
        runs.sort();
        let (ticks, time) = runs[runs.len() / 2];
        bench.emit(&name, ticks as f64, "ticks");
        bench.emit(&format!("{name}_ms"), time.as_secs_f64() * 1e3, "ms");
    }
}
