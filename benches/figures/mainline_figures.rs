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
//! trips ([`MainlineState::slow_after`](mm_platform::services::mainline::MainlineState::slow_after),
//! at least 100 ms) before the lookup goes past it. The public DHT has the same kind of churn.

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
fn testnet() -> Option<(std::process::Child, Vec<SocketAddrV4>)> {
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
        .args(["--nodes", "20"])
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
    if nodes.len() != 20 {
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
    let Some((mut child, nodes)) = testnet() else {
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
