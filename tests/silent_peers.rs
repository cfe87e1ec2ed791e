//! Peers that never answer cost the reactor nothing: for each discovery service and for the
//! connection manager, a node whose peers are black holes (UDP sockets on 127.0.0.1 that read
//! every datagram and never answer, or addresses where nothing listens) runs for a few seconds,
//! and the number of turns of its reactor stays small. A count, not a timing: a reactor woken
//! again and again by a deadline already past (one that nothing consumes) turns tens of
//! thousands of times in that time, one that sleeps until its next real deadline a few dozen.
//!
//! Each run polls with a cap of [`POLL_CAP`], so an idle reactor still turns about
//! `RUN / POLL_CAP` times; the bounds leave room for those and for the services' genuine
//! timers (queries timing out, lookups stepping on), and are far below what a busy loop makes.

use mm_platform::Shared;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use mm_platform::identity::Identity;
use mm_platform::services::bootstrap::Bootstrap;
use mm_platform::services::kademlia::{Kademlia, KademliaConfig};
use mm_platform::services::mainline::{Mainline, MainlineConfig};
use mm_platform::services::mdns::{Mdns, MdnsConfig};
use mm_platform::services::{Service, ServiceContext};
use mm_platform::{Platform, Stats};

/// How long each node runs.
const RUN: Duration = Duration::from_secs(4);
/// The longest one poll waits (the test's own wake-ups).
const POLL_CAP: Duration = Duration::from_millis(250);

/// UDP sockets on 127.0.0.1 that read whatever arrives and never answer.
struct BlackHoles {
    addrs: Vec<SocketAddrV4>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BlackHoles {
    fn new(n: usize) -> BlackHoles {
        let socks: Vec<UdpSocket> = (0..n)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("bind a black hole");
                s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                s
            })
            .collect();
        let addrs = socks
            .iter()
            .map(|s| match s.local_addr().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                std::net::SocketAddr::V6(_) => unreachable!("bound on 127.0.0.1"),
            })
            .collect();
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st) = (received.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            // Bounded: the test sets `stop` when it ends (and at the latest after a minute).
            let end = Instant::now() + Duration::from_secs(60);
            while !st.load(Ordering::SeqCst) && Instant::now() < end {
                for s in &socks {
                    while s.recv_from(&mut buf).is_ok() {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        BlackHoles {
            addrs,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams swallowed so far.
    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for BlackHoles {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// nodeInfos of nodes that never answer: each a fresh identity whose endpoints are a black
/// hole (UDP, native framing) and a TCP listener on 127.0.0.1 that never accepts (the kernel
/// completes the connection; nothing is ever read or answered). The listeners are returned to
/// be kept open.
fn silent_nodes(holes: &BlackHoles) -> (Vec<Value>, Vec<TcpListener>) {
    let mut listeners = Vec::new();
    let infos = holes
        .addrs
        .iter()
        .map(|udp| {
            let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let tcp_port = tcp.local_addr().unwrap().port();
            listeners.push(tcp);
            let id = Identity::generate();
            json!({"signId": id.sign_id().to_string(), "boxId": id.box_id().to_string(),
                "connectionInfo": [
                    {"transportType": "udp", "transportInfo":
                        {"address": "127.0.0.1", "port": udp.port(), "framing": "native"}},
                    {"transportType": "tcp", "transportInfo":
                        {"address": "127.0.0.1", "port": tcp_port, "framing": "native"}}]})
        })
        .collect();
    (infos, listeners)
}

/// Prints what woke the turns and returns their number.
fn report(what: &str, p: &Platform, before: &Stats, after: &Stats) -> u64 {
    let turns = after.turns - before.turns;
    eprintln!(
        "{what}: {turns} turns in {RUN:?}; woken by {:?}; services {:?}",
        after.woken,
        p.service_wakes()
    );
    turns
}

/// Polls `p` for [`RUN`] (at most [`POLL_CAP`] a wait); returns its stats before and after.
fn run(p: &mut Platform) -> (Stats, Stats) {
    let before = p.stats();
    let end = Instant::now() + RUN;
    // Bounded by time; a busy reactor makes many short turns, an idle one a few long ones.
    while Instant::now() < end {
        p.poll(Some(POLL_CAP)).unwrap();
    }
    (before, p.stats())
}

/// A node publishing and resolving on a Mainline DHT whose every node is a black hole.
#[test]
fn mainline_with_silent_dht_nodes_sleeps() {
    let holes = BlackHoles::new(8);
    let service = Mainline::new(MainlineConfig::new(holes.addrs.clone()).publish(true));
    let stats = service.stats_handle();
    let mut p = Platform::builder().service(service).build().unwrap();
    // Something to resolve too: a signId nobody publishes.
    let other = mm_platform::identity::Identity::generate();
    let _ = p.messaging().send(
        "transports.requestNodeInfo",
        "local",
        &other.sign_id().to_string(),
    );
    let (before, after) = run(&mut p);
    let turns = after.turns - before.turns;
    let s = stats.get();
    eprintln!(
        "mainline, 8 silent nodes: {turns} turns in {RUN:?}; {} queries sent, {} timed out, \
         {} datagrams swallowed; woken by {:?}, services {:?}",
        s.queries_sent,
        s.timeouts,
        holes.received(),
        after.woken,
        p.service_wakes(),
    );
    assert!(s.queries_sent >= 8, "the node did query the DHT: {s:?}");
    assert!(s.timeouts > 0, "queries went unanswered: {s:?}");
    assert!(
        turns < 150,
        "{turns} turns in {RUN:?} with silent DHT nodes"
    );
}

/// A node with the Kademlia DHT whose every seed never answers, asked to get and put.
#[test]
fn kademlia_with_silent_seeds_sleeps() {
    let holes = BlackHoles::new(8);
    let (seeds, _tcp) = silent_nodes(&holes);
    let mut p = Platform::builder()
        .service(Kademlia::new(KademliaConfig::new(seeds)))
        .build()
        .unwrap();
    let _ = p.messaging().send("dht.get", "local", "some key");
    let _ = p
        .messaging()
        .send("dht.put", "local", &json!({"key": "k", "value": "v"}));
    let (before, after) = run(&mut p);
    let turns = report("kademlia, 8 silent seeds", &p, &before, &after);
    assert!(holes.received() > 0, "the node did try the seeds");
    assert!(turns < 150, "{turns} turns in {RUN:?} with silent seeds");
}

/// The connection manager alone: messages to eight nodes that never answer (UDP and TCP).
#[test]
fn connections_to_silent_nodes_sleep() {
    let holes = BlackHoles::new(8);
    let (nodes, _tcp) = silent_nodes(&holes);
    let mut p = Platform::builder().build().unwrap();
    for info in &nodes {
        let _ = p.messaging().send("transports.nodeInfo", "local", info);
    }
    for round in 0..3 {
        for info in &nodes {
            let to = info["signId"].as_str().unwrap();
            let status = p
                .messaging()
                .send("test.hello", to, &json!({"round": round}));
            status.expect("queued");
        }
    }
    let (before, after) = run(&mut p);
    let turns = report("connections, 8 silent nodes", &p, &before, &after);
    assert!(holes.received() > 0, "the node did try to connect");
    assert!(turns < 150, "{turns} turns in {RUN:?} with silent nodes");
}

/// The static bootstrap list, every node of it silent, with the Kademlia DHT joining through
/// it (what `examples/node --bootstrap FILE --dht` runs).
#[test]
fn bootstrap_list_of_silent_nodes_sleeps() {
    let holes = BlackHoles::new(8);
    let (nodes, _tcp) = silent_nodes(&holes);
    let mut p = Platform::builder()
        .service(Bootstrap::new(nodes))
        .service(Kademlia::new(KademliaConfig::new(Vec::new())))
        .build()
        .unwrap();
    let (before, after) = run(&mut p);
    let turns = report("bootstrap, 8 silent nodes", &p, &before, &after);
    assert!(holes.received() > 0, "the node did try the bootstrap nodes");
    assert!(
        turns < 150,
        "{turns} turns in {RUN:?} with a silent bootstrap list"
    );
}

/// Runs `f` on a thread of its own in a fresh network namespace (only `lo`, multicast on and
/// routed, as tests/mdns.rs does), which disappears with the thread. `None` if that cannot be
/// done.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's namespaces.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return None;
        }
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "set", "lo", "multicast", "on"],
            &["route", "add", "224.0.0.0/4", "dev", "lo"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
        }
        Some(f())
    })
    .join()
    .expect("test thread")
}

/// mDNS querying for a node that nobody on the link knows (nobody answers), in a namespace.
#[test]
fn mdns_with_nobody_answering_sleeps() {
    let outcome = in_private_netns(|| {
        let mdns = Mdns::new(MdnsConfig::default());
        let stats = mdns.stats_handle();
        let mut p = Platform::builder().service(mdns).build().unwrap();
        let other = Identity::generate();
        let _ = p.messaging().send(
            "transports.requestNodeInfo",
            "local",
            &other.sign_id().to_string(),
        );
        let (before, after) = run(&mut p);
        let turns = report("mdns, nobody answering", &p, &before, &after);
        (turns, stats.get())
    });
    let Some((turns, stats)) = outcome else {
        if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("cannot unshare a network namespace and MM_REQUIRE_NETNS=1");
        }
        mm_platform::proto::skip_test(
            "mdns with nobody answering",
            "cannot unshare a network namespace (not root?)",
        );
        return;
    };
    assert!(stats.queries_sent > 0, "{stats:?}");
    assert!(
        turns < 150,
        "{turns} turns in {RUN:?} with nobody answering"
    );
}

/// A service that asks, every time it runs, to run again at an instant already past (the
/// class of bug): every turn it wakes is counted under its name, and a debug build names it in
/// a warning.
struct Spinner {
    runs: Shared<u64>,
}

impl Service for Spinner {
    fn name(&self) -> &str {
        "spinner"
    }

    fn start(&mut self, ctx: &mut ServiceContext<'_>) -> std::io::Result<()> {
        let at = ctx.now();
        ctx.set_wake(Some(at));
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut ServiceContext<'_>) {
        self.runs.set(self.runs.get() + 1);
        // The bug: a deadline from the past, set again and again.
        let at = ctx.now() - Duration::from_millis(1);
        ctx.set_wake(Some(at));
    }
}

/// Collects warnings (this test binary's logger).
struct Warnings(std::sync::Mutex<Vec<String>>);

impl log::Log for Warnings {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            self.0.lock().unwrap().push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

static WARNINGS: Warnings = Warnings(std::sync::Mutex::new(Vec::new()));

#[test]
fn turns_are_counted_by_what_woke_them_and_a_spinning_service_is_named() {
    let _ = log::set_logger(&WARNINGS);
    log::set_max_level(log::LevelFilter::Warn);
    let runs = Shared::new(0);
    let mut p = Platform::builder()
        .transports(false)
        .service(Spinner { runs: runs.clone() })
        .build()
        .unwrap();
    let before = p.stats();
    // Bounded: 3,000 turns (each returns at once, the deadline being past).
    for _ in 0..3000 {
        p.poll(Some(POLL_CAP)).unwrap();
    }
    let after = p.stats();
    let w = after.woken;
    assert_eq!(after.turns - before.turns, 3000);
    assert_eq!(
        w.io + w.work + w.timers + w.services + w.connections + w.idle,
        after.turns,
        "each turn counted once: {w:?}"
    );
    assert!(w.services >= 2990, "{w:?}");
    assert_eq!(p.service_wakes(), vec![("spinner".to_string(), w.services)]);
    assert!(runs.get() >= 2990);
    let warned: Vec<String> = WARNINGS
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.contains("\"spinner\""))
        .cloned()
        .collect();
    if cfg!(debug_assertions) {
        assert_eq!(warned.len(), 1, "one warning for one run: {warned:?}");
        assert!(warned[0].contains("already past"), "{warned:?}");
    } else {
        assert!(warned.is_empty(), "{warned:?}");
    }
}
