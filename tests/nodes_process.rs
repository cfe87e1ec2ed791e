//! Process-level test with `examples/node.rs`: a sender killed with SIGKILL right after it
//! queued non-real-time messages is restarted on the same data directory, and the receiver
//! gets every message exactly once.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
}

impl Node {
    fn start(bin: &PathBuf, dir: &PathBuf) -> Node {
        Node::start_with(bin, dir, &[])
    }

    fn start_with(bin: &PathBuf, dir: &PathBuf, extra: &[&str]) -> Node {
        let mut child = Command::new(bin)
            .arg("--data")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn node");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).expect("stdout is JSON lines");
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Node {
            child,
            stdin,
            lines,
        }
    }

    fn cmd(&mut self, v: Value) {
        writeln!(self.stdin, "{v}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits (bounded) for an event matching `pred`, collecting every line seen meanwhile.
    fn wait_for(
        &self,
        limit: Duration,
        seen: &mut Vec<Value>,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let v = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no matching event within {limit:?}; seen {seen:?}"));
            seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    fn kill(mut self) {
        // SIGKILL: no chance to flush or say goodbye.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Asks the node to quit; returns the lines it printed until it exited.
    fn quit(mut self) -> Vec<Value> {
        self.cmd(json!({"cmd": "quit"}));
        let mut rest = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match self.lines.recv_timeout(Duration::from_millis(20)) {
                Ok(v) => rest.push(v),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(_) => {}
            }
        }
        if self.child.try_wait().unwrap().is_none() {
            self.kill();
        } else {
            let _ = self.child.wait();
        }
        rest
    }
}

fn ready(n: &Node) -> Value {
    let mut seen = Vec::new();
    n.wait_for(Duration::from_secs(20), &mut seen, |v| {
        v["event"] == "ready"
    })["nodeInfo"]
        .clone()
}

#[test]
fn sigkill_after_queuing_then_restart_delivers_everything_exactly_once() {
    let bin = support::node_bin();
    let base = std::env::temp_dir().join(format!("mm-nodes-process-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (dir_a, dir_b) = (base.join("a"), base.join("b"));
    const N: u64 = 300;

    let b = Node::start(&bin, &dir_b);
    let b_info = ready(&b);
    let a = {
        let mut a = Node::start(&bin, &dir_a);
        let a_info = ready(&a);
        a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
        let to = b_info["signId"].as_str().unwrap();
        for i in 0..N {
            a.cmd(
                json!({"cmd": "send", "id": i, "topic": "test.crash", "to": to,
                "payload": {"n": i}, "realtime": false}),
            );
        }
        // Commands run in order: once this local send is reported, every send above returned.
        a.cmd(json!({"cmd": "send", "id": "marker", "topic": "test.marker", "to": "local", "payload": 1}));
        let mut seen = Vec::new();
        a.wait_for(Duration::from_secs(20), &mut seen, |v| {
            v["event"] == "sent" && v["id"] == "marker"
        });
        let refused: Vec<&Value> = seen
            .iter()
            .filter(|v| v["event"] == "sent" && v["ok"] == false)
            .collect();
        assert!(refused.is_empty(), "every send was queued: {refused:?}");
        // Kill the sender as soon as the receiver has the first message: the rest is in
        // flight, written to the stream but not acknowledged yet, or not sent at all.
        let mut seen_b = Vec::new();
        b.wait_for(Duration::from_secs(20), &mut seen_b, |v| {
            v["event"] == "message" && v["topic"] == "public.test.crash"
        });
        a.kill();
        (a_info, seen_b)
    };
    let (a, seen_b) = a;
    let records = |d: &PathBuf| {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("offline"))
            .count()
    };
    // Some were received (and maybe acknowledged) before the kill, the others not: both
    // kinds must end up delivered once.
    eprintln!("records left by the killed sender: {}", records(&dir_a));
    // Restart on the same directory: same identity, buffer reloaded.
    let mut a2 = Node::start(&bin, &dir_a);
    let a2_info = ready(&a2);
    assert_eq!(a2_info["signId"], a["signId"]);
    a2.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));

    let mut counts: HashMap<u64, u32> = HashMap::new();
    for v in &seen_b {
        if v["event"] == "message" && v["topic"] == "public.test.crash" {
            *counts
                .entry(v["payload"]["n"].as_u64().unwrap())
                .or_default() += 1;
        }
    }
    let end = Instant::now() + Duration::from_secs(60);
    while counts.len() < N as usize && Instant::now() < end {
        if let Ok(v) = b.lines.recv_timeout(Duration::from_millis(100)) {
            if v["event"] == "message" && v["topic"] == "public.test.crash" {
                assert_eq!(v["sender"], a["signId"]);
                *counts
                    .entry(v["payload"]["n"].as_u64().unwrap())
                    .or_default() += 1;
            }
        }
    }
    // A little longer, so that a late duplicate would be seen.
    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        if let Ok(v) = b.lines.recv_timeout(Duration::from_millis(100)) {
            if v["event"] == "message" && v["topic"] == "public.test.crash" {
                *counts
                    .entry(v["payload"]["n"].as_u64().unwrap())
                    .or_default() += 1;
            }
        }
    }
    assert_eq!(counts.len(), N as usize, "every message delivered");
    let dups: Vec<(&u64, &u32)> = counts.iter().filter(|(_, c)| **c != 1).collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    let _ = a2.quit();
    let _ = b.quit();
    assert_eq!(
        records(&dir_a),
        0,
        "the restarted sender deleted every delivered record"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

fn count_messages(counts: &mut HashMap<u64, u32>, lines: &[Value], topic: &str) {
    for v in lines {
        if v["event"] == "message" && v["topic"] == topic {
            *counts
                .entry(v["payload"]["n"].as_u64().unwrap())
                .or_default() += 1;
        }
    }
}

#[test]
fn a_receiver_that_restarts_mid_stream_still_gets_everything_exactly_once() {
    let bin = support::node_bin();
    let base = std::env::temp_dir().join(format!("mm-nodes-process-rx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (dir_a, dir_b) = (base.join("a"), base.join("b"));
    const N: u64 = 2000;
    let fast = [
        "--connect-timeout",
        "300",
        "--retry",
        "300",
        "--keepalive",
        "100",
        "--dead-after",
        "800",
    ];
    let b = Node::start_with(&bin, &dir_b, &fast);
    let b_info = ready(&b);
    let mut a = Node::start_with(&bin, &dir_a, &fast);
    ready(&a);
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    let to = b_info["signId"].as_str().unwrap().to_string();
    for i in 0..N {
        a.cmd(json!({"cmd": "send", "id": i, "topic": "test.rx", "to": to,
            "payload": {"n": i, "pad": "0123456789".repeat(20)}, "realtime": false}));
    }
    // b leaves (cleanly) while messages are arriving.
    let mut seen_b = Vec::new();
    b.wait_for(Duration::from_secs(20), &mut seen_b, |v| {
        v["event"] == "message" && v["topic"] == "public.test.rx"
    });
    seen_b.extend(b.quit());
    let mut counts: HashMap<u64, u32> = HashMap::new();
    count_messages(&mut counts, &seen_b, "public.test.rx");
    let before = counts.len();
    // b comes back on the same directory (same identity, same ports, same memory of ids).
    let b2 = Node::start_with(&bin, &dir_b, &fast);
    let b2_info = ready(&b2);
    assert_eq!(
        b2_info["connectionInfo"], b_info["connectionInfo"],
        "same ports"
    );
    let mut oks = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while (counts.len() < N as usize || oks < N) && Instant::now() < end {
        if let Ok(v) = b2.lines.recv_timeout(Duration::from_millis(10)) {
            count_messages(&mut counts, &[v], "public.test.rx");
        }
        while let Ok(v) = a.lines.try_recv() {
            if v["event"] == "sent" {
                assert_eq!(v["ok"], true, "{v}");
                oks += 1;
            }
        }
    }
    let settle = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < settle {
        if let Ok(v) = b2.lines.recv_timeout(Duration::from_millis(50)) {
            count_messages(&mut counts, &[v], "public.test.rx");
        }
    }
    eprintln!("b had {before} messages before it left");
    assert_eq!(counts.len(), N as usize, "every message delivered");
    let dups: Vec<(&u64, &u32)> = counts.iter().filter(|(_, c)| **c != 1).collect();
    assert!(dups.is_empty(), "delivered more than once: {dups:?}");
    assert_eq!(oks, N, "one successful delivery report per message");
    let _ = a.quit();
    let _ = b2.quit();
    std::fs::remove_dir_all(&base).unwrap();
}
