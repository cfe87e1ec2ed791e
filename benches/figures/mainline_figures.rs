//! Mainline DHT figure group of the bench (`mainline_*`): in a testnet of 20 `bittorrent-dht`
//! nodes on 127.0.0.1 (`tests/js/mainline_testnet.js`), the time for a new node to publish its
//! nodeInfo (from the start of the publication, a `get` lookup toward its target, to the last
//! `put` answered) and for a running node to resolve a signId (from `requestNodeInfo` to the
//! nodeInfo published on the bus), median and p99 over [`ROUNDS`] nodes. Skipped with a note
//! on stderr without `node` or the installed test packages.
//!
//! Reading the figures: `bittorrent-dht` 11 (through `k-rpc`) adds every node that queries it
//! to its routing table, ignoring BEP 43's read-only flag, so each earlier round leaves a node
//! that no longer answers in the testnet's tables (50 such against 20 live nodes by the end).
//! Lookups then meet unanswered queries, each of which holds a slot for a few smoothed round
//! trips ([`MainlineState::slow_after`](mm_platform::proto::mainline::state::MainlineState::slow_after),
//! at least 100 ms) before the lookup goes past it. The public DHT has the same kind of churn.
//!
//! The testnet matrix (`mainline_resolve_via_*`, [`mainline_testnets`]): the same measure
//! against three other implementations, each a testnet of [`MATRIX_NODES`] nodes on
//! 127.0.0.1 — `bittorrent-dht` 11 (`tests/js/mainline_testnet.js`), libtorrent-rasterbar 2.0
//! (`tests/libtorrent_testnet.py` under `/usr/bin/python3`, Debian's `python3-libtorrent`) and
//! pubky's `mainline` 8 (the helper crate `tests/pubky-mainline/`, built here as the test
//! builds it: a debug build) — where [`MATRIX_ROUNDS`] nodes of ours publish and one of ours,
//! joined at another testnet node, resolves each of them: the median of those resolves. A
//! testnet that cannot run here is skipped with a note on stderr.

use std::io::{BufRead, BufReader};
use std::net::SocketAddrV4;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mm_platform::services::mainline::{Mainline, MainlineConfig};
use mm_platform::{Event, Platform};

use super::Bench;

/// Nodes published and resolved.
const ROUNDS: usize = 50;
/// Longest wait of any loop here.
const LIMIT: Duration = Duration::from_secs(60);

fn pct_ms(v: &mut [Duration], p: usize) -> f64 {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e3
}

/// Starts the testnet; `None` (with a note) when it cannot run here.
fn testnet(count: usize) -> Option<(std::process::Child, Vec<SocketAddrV4>)> {
    let js = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("js");
    if !js.join("node_modules").join("bittorrent-dht").is_dir() {
        eprintln!(
            "mainline: skipped (tests/js/node_modules missing: cd tests/js && npm ci --ignore-scripts)"
        );
        return None;
    }
    let mut child = match Command::new("node")
        .arg(js.join("mainline_testnet.js"))
        .args(["--nodes", &count.to_string()])
        .current_dir(&js)
        .env("MM_JS_LIFETIME_MS", "900000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mainline: skipped (cannot run node: {e})");
            return None;
        }
    };
    let stdout = child.stdout.take()?;
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        let _ = child.kill();
        return None;
    }
    // Keep reading (the testnet reports errors there; a closed pipe would end it).
    std::thread::spawn(move || {
        for l in reader.lines() {
            let Ok(l) = l else { break };
            eprintln!("mainline testnet: {l}");
        }
    });
    let ready: serde_json::Value = serde_json::from_str(&line).ok()?;
    let nodes: Vec<SocketAddrV4> = ready["nodes"]
        .as_array()?
        .iter()
        .filter_map(|n| {
            format!("{}:{}", n["host"].as_str()?, n["port"])
                .parse()
                .ok()
        })
        .collect();
    if nodes.len() != count {
        eprintln!("mainline: skipped (testnet did not start: {line})");
        let _ = child.kill();
        return None;
    }
    Some((child, nodes))
}

pub fn mainline(bench: &Bench) {
    const NAMES: [&str; 4] = [
        "mainline_publish_median",
        "mainline_publish_p99",
        "mainline_resolve_median",
        "mainline_resolve_p99",
    ];
    if !NAMES.iter().any(|n| bench.wants(n)) {
        return;
    }
    let Some((mut child, nodes)) = testnet(20) else {
        return;
    };
    // Publish: a new node each round, joining at two testnet nodes.
    let mut publish = Vec::with_capacity(ROUNDS);
    let mut ids = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let boot = vec![nodes[i % 20], nodes[(i + 7) % 20]];
        let service = Mainline::new(MainlineConfig::new(boot).publish(true));
        let stats = service.stats_handle();
        let mut p = Platform::builder()
            .service(service)
            .build()
            .expect("platform");
        let end = Instant::now() + LIMIT;
        while stats.get().publishes == 0 && Instant::now() < end {
            p.poll(Some(Duration::from_millis(5))).expect("poll");
        }
        let s = stats.get();
        match s.last_publish_took {
            Some(t) if s.last_publish_stored > 0 => publish.push(t),
            _ => {
                eprintln!("mainline: publication {i} failed: {s:?}");
                let _ = child.kill();
                return;
            }
        }
        ids.push(p.sign_id().to_string());
    }
    // Resolve: one running node (bootstrapped first) asks for each of them.
    let service = Mainline::new(MainlineConfig::new(vec![nodes[3]]));
    let stats = service.stats_handle();
    let mut r = Platform::builder()
        .transports(false)
        .service(service)
        .build()
        .expect("platform");
    let end = Instant::now() + LIMIT;
    while stats.get().table < 8 && Instant::now() < end {
        r.poll(Some(Duration::from_millis(5))).expect("poll");
    }
    let mut resolve = Vec::with_capacity(ROUNDS);
    for id in &ids {
        let _ = r.drain_events().count();
        let start = Instant::now();
        let _ = r
            .messaging()
            .send("transports.requestNodeInfo", "local", id);
        let end = start + LIMIT;
        let mut found = false;
        while !found && Instant::now() < end {
            r.poll(Some(Duration::from_millis(1))).expect("poll");
            found = r.drain_events().any(|e| {
                matches!(e, Event::NodeInfo { ref source, ref node_info }
                    if source == "mainline" && node_info["signId"] == id.as_str())
            });
        }
        if !found {
            eprintln!("mainline: {id} not resolved: {:?}", stats.get());
            let _ = child.kill();
            return;
        }
        resolve.push(start.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();
    bench.emit(NAMES[0], pct_ms(&mut publish, 50), "ms");
    bench.emit(NAMES[1], pct_ms(&mut publish, 99), "ms");
    bench.emit(NAMES[2], pct_ms(&mut resolve, 50), "ms");
    bench.emit(NAMES[3], pct_ms(&mut resolve, 99), "ms");
}

/// Nodes of each testnet of the matrix.
const MATRIX_NODES: usize = 10;
/// Nodes published and resolved in each testnet of the matrix.
const MATRIX_ROUNDS: usize = 10;

/// A child process whose first stdout line is JSON; the rest of its output is read (and
/// shown) by a thread so that a full pipe never stops it. Killed when dropped.
struct Testnet {
    child: std::process::Child,
}

impl Drop for Testnet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` (stdin and stdout piped; stdin stays open, the testnets quit when it closes)
/// and returns it with its first line parsed, or `None` (with a note) if it did not start.
fn spawn_testnet(name: &str, cmd: &mut Command) -> Option<(Testnet, serde_json::Value)> {
    let mut child = match cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mainline_resolve_via_{name}: skipped (cannot start it: {e})");
            return None;
        }
    };
    let stdout = child.stdout.take()?;
    let net = Testnet { child };
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        eprintln!("mainline_resolve_via_{name}: skipped (no first line)");
        return None;
    }
    let tag = name.to_string();
    std::thread::spawn(move || {
        for l in reader.lines() {
            let Ok(l) = l else { break };
            eprintln!("mainline_resolve_via_{tag} testnet: {l}");
        }
    });
    match serde_json::from_str(&line) {
        Ok(v) => Some((net, v)),
        Err(_) => {
            eprintln!("mainline_resolve_via_{name}: skipped (testnet said {line:?})");
            None
        }
    }
}

fn addrs_of(list: &serde_json::Value) -> Vec<SocketAddrV4> {
    list.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// `bittorrent-dht` 11.
fn bittorrent_dht_testnet() -> Option<(Testnet, Vec<SocketAddrV4>)> {
    let (child, nodes) = testnet(MATRIX_NODES)?;
    Some((Testnet { child }, nodes))
}

/// libtorrent-rasterbar 2.0 through Debian's python3-libtorrent.
fn libtorrent_testnet() -> Option<(Testnet, Vec<SocketAddrV4>)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libtorrent_testnet.py");
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script)
        .arg(MATRIX_NODES.to_string())
        .env("MM_LT_LIFETIME_S", "900")
        .stderr(Stdio::inherit());
    let (net, ready) = spawn_testnet("libtorrent", &mut cmd)?;
    if ready["lt"] != "ready" {
        eprintln!("mainline_resolve_via_libtorrent: skipped (testnet said {ready})");
        return None;
    }
    Some((net, addrs_of(&ready["nodes"])))
}

/// pubky's `mainline` 8: the helper crate, built as tests/mainline_pubky.rs builds it.
fn pubky_testnet() -> Option<(Testnet, Vec<SocketAddrV4>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("pubky-mainline");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--quiet", "--manifest-path"])
        .arg(root.join("tests/pubky-mainline/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status();
    let bin = target.join("debug").join("pubky-mainline");
    if !matches!(built, Ok(ref st) if st.success()) || !bin.is_file() {
        eprintln!(
            "mainline_resolve_via_pubky: skipped (cannot build tests/pubky-mainline: {built:?})"
        );
        return None;
    }
    let mut cmd = Command::new(bin);
    cmd.arg(MATRIX_NODES.to_string()).stderr(Stdio::inherit());
    let (net, ready) = spawn_testnet("pubky", &mut cmd)?;
    Some((net, addrs_of(&ready["bootstrap"])))
}

/// [`MATRIX_ROUNDS`] nodes of ours publish through `nodes` (each joining at two of them), then
/// one of ours joined at another resolves each; returns the resolve times, or `None` (with a
/// note) if a publication or a resolve failed.
fn resolve_times(name: &str, nodes: &[SocketAddrV4]) -> Option<Vec<Duration>> {
    let n = nodes.len();
    let mut ids = Vec::with_capacity(MATRIX_ROUNDS);
    for i in 0..MATRIX_ROUNDS {
        let boot = vec![nodes[i % n], nodes[(i + 3) % n]];
        let service = Mainline::new(MainlineConfig::new(boot).publish(true));
        let stats = service.stats_handle();
        let mut p = Platform::builder()
            .transports(false)
            .service(service)
            .build()
            .expect("platform");
        let end = Instant::now() + LIMIT;
        while stats.get().publishes == 0 && Instant::now() < end {
            p.poll(Some(Duration::from_millis(5))).expect("poll");
        }
        let s = stats.get();
        if s.publishes == 0 || s.last_publish_stored == 0 {
            eprintln!("mainline_resolve_via_{name}: publication {i} failed: {s:?}");
            return None;
        }
        ids.push(p.sign_id().to_string());
    }
    let service = Mainline::new(MainlineConfig::new(vec![nodes[n - 1]]));
    let stats = service.stats_handle();
    let mut r = Platform::builder()
        .transports(false)
        .service(service)
        .build()
        .expect("platform");
    let end = Instant::now() + LIMIT;
    while (stats.get().table < 8 || stats.get().lookups > 0) && Instant::now() < end {
        r.poll(Some(Duration::from_millis(5))).expect("poll");
    }
    let mut times = Vec::with_capacity(MATRIX_ROUNDS);
    for id in &ids {
        let _ = r.drain_events().count();
        let start = Instant::now();
        let _ = r
            .messaging()
            .send("transports.requestNodeInfo", "local", id);
        let end = start + LIMIT;
        let mut found = false;
        while !found && Instant::now() < end {
            r.poll(Some(Duration::from_millis(1))).expect("poll");
            found = r.drain_events().any(|e| {
                matches!(e, Event::NodeInfo { ref source, ref node_info }
                    if source == "mainline" && node_info["signId"] == id.as_str())
            });
        }
        if !found {
            eprintln!(
                "mainline_resolve_via_{name}: {id} not resolved: {:?}",
                stats.get()
            );
            return None;
        }
        times.push(start.elapsed());
    }
    Some(times)
}

/// The testnet matrix: resolve time through each other implementation's testnet.
pub fn mainline_testnets(bench: &Bench) {
    type Start = fn() -> Option<(Testnet, Vec<SocketAddrV4>)>;
    const MATRIX: [(&str, Start); 3] = [
        ("bittorrent_dht", bittorrent_dht_testnet),
        ("libtorrent", libtorrent_testnet),
        ("pubky", pubky_testnet),
    ];
    for (name, start) in MATRIX {
        let figure = format!("mainline_resolve_via_{name}_median");
        if !bench.wants(&figure) {
            continue;
        }
        let Some((net, nodes)) = start() else {
            continue;
        };
        if nodes.len() != MATRIX_NODES || !nodes.iter().all(|a| a.ip().is_loopback()) {
            eprintln!("mainline_resolve_via_{name}: skipped (testnet nodes {nodes:?})");
            continue;
        }
        let times = resolve_times(name, &nodes);
        drop(net);
        if let Some(mut t) = times {
            bench.emit(&figure, pct_ms(&mut t, 50), "ms");
        }
    }
}
