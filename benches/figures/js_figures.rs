//! Figures against the original JavaScript nodes (`tests/js/peer.js`, a node wired like
//! mm-platform 0.7.5 on the genuine 1tp, curvecp and protobufjs packages): `ms` messages per
//! second Rust to JavaScript, JavaScript to Rust, and JavaScript to JavaScript, in one run, over
//! UDP on 127.0.0.1. Each rate is timed from the first send of a burst (after a warm-up message
//! has set the connection up) until the receiver counted the whole burst. Skipped, with a note
//! on stderr, without node or `tests/js/node_modules` (`cd tests/js && npm ci --ignore-scripts`).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Bench;
use mm_platform::Platform;
use mm_platform::Shared;

/// Messages per burst (each about 100 bytes of JSON).
const BURST: usize = 2_000;
/// Longest a burst may take before the figure is given up.
const LIMIT: Duration = Duration::from_secs(120);

struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<Value>,
    info: Value,
}

impl Peer {
    fn start() -> Option<Peer> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js/peer.js");
        let mut child = Command::new("node")
            .arg(script)
            .args(["--no-tcp", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdin = child.stdin.take()?;
        let stdout = child.stdout.take()?;
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        let mut p = Peer {
            child,
            stdin,
            lines,
            info: Value::Null,
        };
        let ready = p.wait(Duration::from_secs(20), || {}, |v| v["event"] == "ready")?;
        p.info = ready["nodeInfo"].clone();
        Some(p)
    }

    fn box_id(&self) -> String {
        self.info["boxId"].as_str().unwrap_or_default().to_owned()
    }

    fn cmd(&mut self, v: Value) {
        let _ = writeln!(self.stdin, "{v}");
        let _ = self.stdin.flush();
    }

    fn wait(
        &mut self,
        limit: Duration,
        mut pump: impl FnMut(),
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            pump();
            if let Ok(v) = self.lines.recv_timeout(Duration::from_millis(1)) {
                if pred(&v) {
                    return Some(v);
                }
            }
        }
        None
    }

    /// Messages it received so far.
    fn received(&mut self, pump: impl FnMut()) -> Option<u64> {
        self.cmd(json!({"cmd": "stats"}));
        self.wait(Duration::from_secs(10), pump, |v| v["event"] == "stats")
            .and_then(|v| v["received"].as_u64())
    }

    /// Polls its counter (while `pump` runs) until it reaches `n`; the time it took from
    /// `since`.
    fn until_received(&mut self, n: u64, since: Instant, mut pump: impl FnMut()) -> Option<f64> {
        while since.elapsed() < LIMIT {
            if self.received(&mut pump)? >= n {
                return Some(since.elapsed().as_secs_f64());
            }
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(5) {
                pump();
            }
        }
        None
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_available() -> bool {
    let modules = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js/node_modules/1tp");
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    node && modules.is_dir()
}

fn rust_node() -> Platform {
    Platform::builder()
        .connection_info(json!([{"transportType": "udp",
            "transportInfo": {"address": "127.0.0.1", "port": 0}}]))
        .build()
        .expect("platform")
}

fn poll(p: &mut Platform) {
    let _ = p.poll(Some(Duration::ZERO));
}

/// `js_*_messages_per_s`: Rust to JS, JS to Rust, JS to JS.
pub fn js_messages(bench: &Bench) {
    if !["js_rust_to_js", "js_js_to_rust", "js_js_to_js"]
        .iter()
        .any(|n| bench.wants(n))
    {
        return;
    }
    if !node_available() {
        eprintln!("js_*: skipped (node or tests/js/node_modules missing)");
        return;
    }
    let (Some(mut js), Some(mut js2)) = (Peer::start(), Peer::start()) else {
        eprintln!("js_*: skipped (tests/js/peer.js did not start)");
        return;
    };
    let mut rust = rust_node();
    let rust_info = rust.node_info();
    for p in [&mut js, &mut js2] {
        p.cmd(json!({"cmd": "nodeInfo", "nodeInfo": rust_info}));
    }
    let (i1, i2) = (js.info.clone(), js2.info.clone());
    js.cmd(json!({"cmd": "nodeInfo", "nodeInfo": i2}));
    js2.cmd(json!({"cmd": "nodeInfo", "nodeInfo": i1}));
    let _ = rust
        .messaging()
        .send("transports.nodeInfo", "local", &js.info);
    let got = Shared::new(0u64);
    let g = got.clone();
    rust.on("public.bench.*", move |_ctx, _m| g.set(g.get() + 1));
    let pad = "x".repeat(80);
    let payload = |i: usize| json!({"n": i, "pad": pad});
    let js_box = js.box_id();
    let rust_box = rust.box_id().to_string();

    // Rust to JS.
    if bench.wants("js_rust_to_js") {
        let _ = rust
            .messaging()
            .send("bench.warm", js_box.as_str(), &payload(0));
        let warm = js.until_received(1, Instant::now(), || poll(&mut rust));
        let t = Instant::now();
        for i in 0..BURST {
            let _ = rust
                .messaging()
                .send("bench.burst", js_box.as_str(), &payload(i));
        }
        match warm.and(js.until_received(1 + BURST as u64, t, || poll(&mut rust))) {
            Some(secs) => bench.emit("js_rust_to_js_messages_per_s", BURST as f64 / secs, "msg/s"),
            None => eprintln!("js_rust_to_js_messages_per_s: did not complete"),
        }
    }
    // JS to Rust.
    if bench.wants("js_js_to_rust") {
        js.cmd(
            json!({"cmd": "flood", "id": 1, "to": rust_box, "count": 1, "size": 80,
            "topic": "bench.warm"}),
        );
        let end = Instant::now() + LIMIT;
        while got.get() < 1 && Instant::now() < end {
            poll(&mut rust);
        }
        got.set(0);
        let t = Instant::now();
        js.cmd(
            json!({"cmd": "flood", "id": 2, "to": rust_box, "count": BURST, "size": 80,
            "topic": "bench.burst"}),
        );
        while got.get() < BURST as u64 && t.elapsed() < LIMIT {
            poll(&mut rust);
        }
        if got.get() >= BURST as u64 {
            let secs = t.elapsed().as_secs_f64();
            bench.emit("js_js_to_rust_messages_per_s", BURST as f64 / secs, "msg/s");
        } else {
            eprintln!("js_js_to_rust_messages_per_s: did not complete");
        }
    }
    // JS to JS, for comparison.
    if bench.wants("js_js_to_js") {
        let to = js2.box_id();
        js.cmd(
            json!({"cmd": "flood", "id": 3, "to": to, "count": 1, "size": 80,
            "topic": "bench.warm"}),
        );
        let warm = js2.until_received(1, Instant::now(), || {});
        let t = Instant::now();
        js.cmd(
            json!({"cmd": "flood", "id": 4, "to": to, "count": BURST, "size": 80,
            "topic": "bench.burst"}),
        );
        match warm.and(js2.until_received(1 + BURST as u64, t, || {})) {
            Some(secs) => bench.emit("js_js_to_js_messages_per_s", BURST as f64 / secs, "msg/s"),
            None => eprintln!("js_js_to_js_messages_per_s: did not complete"),
        }
    }
}
