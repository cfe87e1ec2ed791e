//! The delivery guarantee of non-real-time messages under crashes (see "Delivery guarantee" in
//! the `offline` module docs), with real processes (`examples/node.rs`), real files and
//! SIGKILL:
//!
//! - at each crash point of the delivery path (`MM_CRASH_AT`, see
//!   `src/platform/crash_points.rs`), every message arrives, and a duplicate appears only where
//!   the guarantee says it can (the receiver died after its subscribers saw a message and
//!   before its id was stored), with the same message id as the first copy;
//! - a receiver killed again and again while it works through a backlog (its output read a
//!   little slower than it arrives, as an application's work would be) loses nothing that the
//!   sender reported delivered. The sizes are small here; `MM_BACKLOG_MESSAGES`,
//!   `MM_BACKLOG_KILLS` and `MM_BACKLOG_SEED` run the large version (3,000 messages, 25 kills).

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{free_port, node_bin, JsonProc, TempDir};

/// How one node is started: its data directory, fixed ports (so it restarts where its peer
/// knows it), and the crash point, if any.
struct Spec {
    name: &'static str,
    udp: u16,
    tcp: u16,
}

impl Spec {
    fn new(name: &'static str) -> Spec {
        Spec {
            name,
            udp: free_port(true),
            tcp: free_port(true),
        }
    }

    fn start(
        &self,
        dir: &TempDir,
        crash_at: Option<&str>,
        per_line: Duration,
    ) -> (JsonProc, Value) {
        let mut cmd = Command::new(node_bin());
        cmd.arg("--data")
            .arg(dir.path(self.name))
            .args(["--udp", &format!("127.0.0.1:{}", self.udp)])
            .args(["--tcp", &format!("127.0.0.1:{}", self.tcp)])
            .env_remove("MM_CRASH_AT")
            .env("RUST_LOG", "mm_platform=debug")
            .stderr(match std::env::var_os("MM_NODE_STDERR") {
                Some(dir) => {
                    let path = std::path::Path::new(&dir).join(format!(
                        "{}-{}.log",
                        self.name,
                        std::process::id()
                    ));
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .expect("log file");
                    Stdio::from(f)
                }
                None => Stdio::null(),
            });
        if let Some(p) = crash_at {
            cmd.env("MM_CRASH_AT", p);
        }
        let mut p = JsonProc::spawn_paced(self.name, &mut cmd, per_line);
        let info =
            p.wait_for(Duration::from_secs(20), |v| v["event"] == "ready")["nodeInfo"].clone();
        (p, info)
    }
}

/// The messages of topic `t.crash` a node printed: (payload number, message id).
fn received(seen: &[Value], topic: &str) -> Vec<(u64, String)> {
    seen.iter()
        .filter(|v| v["event"] == "message" && v["topic"] == topic)
        .map(|v| {
            let n = v["payload"]["n"].as_u64().expect("payload n");
            let id = v["messageId"].as_str().expect("messageId").to_owned();
            (n, id)
        })
        .collect()
}

/// Distinct payloads and duplicates; panics if two copies of one payload carry different ids.
fn tally(all: &[(u64, String)]) -> (HashSet<u64>, usize) {
    let mut ids: HashMap<u64, &str> = HashMap::new();
    let mut dups = 0;
    for (n, id) in all {
        match ids.get(n) {
            Some(first) => {
                assert_eq!(
                    *first, id,
                    "a duplicate of {n} carries the id of its first copy"
                );
                dups += 1;
            }
            None => {
                ids.insert(*n, id);
            }
        }
    }
    (ids.keys().copied().collect(), dups)
}

fn send(a: &mut JsonProc, to: &str, topic: &str, n: u64, pad: usize) {
    a.cmd(json!({"cmd": "send", "id": n, "topic": topic, "to": to,
        "payload": {"n": n, "pad": "x".repeat(pad)}, "realtime": false}));
}

/// Waits (bounded) for the process to die at its crash point.
fn wait_crash(p: &mut JsonProc, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        p.poll_lines();
        let child = p.proc.child.as_mut().expect("running");
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        assert!(
            Instant::now() < end,
            "{} never reached its crash point",
            p.proc.name
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p.kill_and_drain(Duration::from_millis(300));
}

/// 20 non-real-time messages from A to B; the process named by `who` dies at `point` the
/// `nth` time; it is restarted; every message arrives. Returns the duplicates B printed.
fn crash_at(who: &str, point: &str, nth: u32) -> usize {
    const N: u64 = 20;
    let dir = TempDir::new(&format!("delivery-crash-{}", point.replace('.', "-")));
    let (sa_spec, sb_spec) = (Spec::new("a"), Spec::new("b"));
    let crash = format!("{point}:{nth}");
    let (b_crash, a_crash) = match who {
        "receiver" => (Some(crash.as_str()), None),
        _ => (None, Some(crash.as_str())),
    };
    let (mut b, info_b) = sb_spec.start(&dir, b_crash, Duration::ZERO);
    let (mut a, info_a) = sa_spec.start(&dir, a_crash, Duration::ZERO);
    let sb = info_b["signId"].as_str().unwrap().to_owned();
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": info_b}));
    b.cmd(json!({"cmd": "nodeInfo", "nodeInfo": info_a}));
    for n in 1..=N {
        send(&mut a, &sb, "t.crash", n, 100);
    }
    let mut printed = Vec::new();
    if who == "receiver" {
        wait_crash(&mut b, Duration::from_secs(20));
        printed.extend(received(&b.seen, "public.t.crash"));
        b = sb_spec.start(&dir, None, Duration::ZERO).0;
    } else {
        wait_crash(&mut a, Duration::from_secs(20));
        a = sa_spec.start(&dir, None, Duration::ZERO).0;
    }
    // Everything arrives (within the dead-session detection and a retry).
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        b.poll_lines();
        let mut all = printed.clone();
        all.extend(received(&b.seen, "public.t.crash"));
        let (distinct, dups) = tally(&all);
        if distinct.len() as u64 == N {
            // Let late copies show, then count.
            b.collect_for(Duration::from_millis(1500));
            let mut all = printed.clone();
            all.extend(received(&b.seen, "public.t.crash"));
            let (distinct, dups) = tally(&all);
            assert_eq!(distinct.len() as u64, N);
            eprintln!("{point}:{nth}: {N} delivered, {dups} duplicates");
            a.quit(Duration::from_secs(5));
            b.quit(Duration::from_secs(5));
            return dups;
        }
        assert!(
            Instant::now() < end,
            "{point}: only {} of {N} messages arrived ({dups} duplicates)",
            distinct.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sender_dies_after_the_stream_acknowledged() {
    assert_eq!(crash_at("sender", "sender.stream_acked", 3), 0);
}

#[test]
fn receiver_dies_after_its_subscribers_saw_a_message() {
    // The one window of the guarantee: delivered, id not stored, so delivered again.
    let dups = crash_at("receiver", "receiver.dispatched", 5);
    assert!(
        (1..=5).contains(&dups),
        "the messages delivered before the crash (at most 5) come again: {dups}"
    );
}

#[test]
fn receiver_dies_after_storing_the_ids() {
    assert_eq!(crash_at("receiver", "receiver.stored", 1), 0);
}

#[test]
fn sender_dies_after_the_delivery_acknowledgement() {
    assert_eq!(crash_at("sender", "sender.acked", 3), 0);
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_receiver_killed_while_it_works_through_a_backlog_loses_nothing() {
    let n = env_or("MM_BACKLOG_MESSAGES", 300);
    let kills = env_or("MM_BACKLOG_KILLS", 6);
    let mut seed = env_or("MM_BACKLOG_SEED", 1);
    let mut rand = move |below: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % below
    };
    let dir = TempDir::new("delivery-backlog");
    let (sa_spec, sb_spec) = (Spec::new("a"), Spec::new("b"));
    // The consumer of B's output: a little slower than B prints 4 KB lines, so B blocks on
    // its stdout once the pipe is full, as an application busy with its messages would.
    let pace = Duration::from_micros(300);
    let (b0, info_b) = sb_spec.start(&dir, None, pace);
    b0.quit(Duration::from_secs(5));
    let (mut a, _) = sa_spec.start(&dir, None, Duration::ZERO);
    let sb = info_b["signId"].as_str().unwrap().to_owned();
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": info_b}));
    for i in 1..=n {
        send(&mut a, &sb, "t.crash", i, 4000);
    }
    let mut printed = Vec::new();
    // The payloads printed by runs that were killed: a duplicate's first copy must be one of
    // them (the window of the guarantee is a receiver dying after delivering).
    let mut before_a_kill: HashSet<u64> = HashSet::new();
    let mut killed = 0;
    let deadline = Instant::now() + Duration::from_secs(60 + 10 * kills);
    while killed < kills && Instant::now() < deadline {
        let (mut b, _) = sb_spec.start(&dir, None, pace);
        let before = printed.len();
        let first = Instant::now() + Duration::from_secs(20);
        while received(&b.seen, "public.t.crash").is_empty() && Instant::now() < first {
            b.collect_for(Duration::from_millis(5));
        }
        if received(&b.seen, "public.t.crash").is_empty() {
            b.kill_and_drain(Duration::from_millis(300));
            printed.extend(received(&b.seen, "public.t.crash"));
            break; // nothing left to deliver
        }
        // Killed 0-500 ms after its first delivery, or once it printed its share of the
        // backlog (so that a fast machine still meets every kill with messages left).
        let kill_at = Instant::now() + Duration::from_millis(rand(500));
        let share = (n / (kills + 1)).max(1) as usize;
        while Instant::now() < kill_at && received(&b.seen, "public.t.crash").len() < share {
            b.collect_for(Duration::from_millis(2));
        }
        b.kill_and_drain(Duration::from_millis(500));
        let run = received(&b.seen, "public.t.crash");
        before_a_kill.extend(run.iter().map(|(n, _)| *n));
        printed.extend(run);
        killed += 1;
        eprintln!(
            "kill {killed}: {} printed by this run",
            printed.len() - before
        );
    }
    // The last run: everything arrives, and A hears of every delivery exactly once.
    let (mut b, _) = sb_spec.start(&dir, None, pace);
    let end = Instant::now() + Duration::from_secs(120);
    let (distinct, dups) = loop {
        b.collect_for(Duration::from_millis(200));
        a.poll_lines();
        let mut all = printed.clone();
        all.extend(received(&b.seen, "public.t.crash"));
        let (distinct, dups) = tally(&all);
        let acked = a.seen.iter().filter(|v| v["event"] == "sent").count() as u64;
        if distinct.len() as u64 == n && acked == n {
            break (distinct, dups);
        }
        assert!(
            Instant::now() < end,
            "after {killed} kills: {} of {n} delivered, {acked} reported sent",
            distinct.len()
        );
    };
    let mut all = printed.clone();
    all.extend(received(&b.seen, "public.t.crash"));
    let mut first_seen = HashSet::new();
    for (n, _) in &all {
        if !first_seen.insert(*n) {
            assert!(
                before_a_kill.contains(n),
                "message {n} was duplicated although no receiver that had it was killed"
            );
        }
    }
    let sent: Vec<&Value> = a.seen.iter().filter(|v| v["event"] == "sent").collect();
    assert!(
        sent.iter().all(|v| v["ok"] == true),
        "every send reported delivered: {:?}",
        sent.iter().find(|v| v["ok"] != true)
    );
    let ids: HashSet<u64> = sent.iter().filter_map(|v| v["id"].as_u64()).collect();
    assert_eq!(ids.len() as u64, n, "one report per send");
    eprintln!(
        "backlog: {n} messages, {killed} receiver kills: lost {}, duplicated {dups}",
        n - distinct.len() as u64
    );
    assert!(
        killed >= kills.min(3),
        "the receiver was killed {killed} times"
    );
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
}
