//! A Testnet of pubky's `mainline` DHT nodes on 127.0.0.1, for tests/mainline_pubky.rs.
//!
//! Usage: `pubky-mainline NODES`. Builds `Testnet::builder(NODES)` (127.0.0.1 only, routing
//! tables seeded with each other) and a client bootstrapped from it only and bound to
//! 127.0.0.1 (never the crate's default public routers), then speaks JSON lines: it prints
//! `{"bootstrap": ["127.0.0.1:PORT", ...]}` and answers each command read from stdin with one
//! line:
//!
//! - `{"cmd": "get", "key": HEX}` (the 32-byte ed25519 public key, no salt): the most recent
//!   BEP 44 mutable item under that key that the client finds, which the crate has checked
//!   (signature, target) before returning it: `{"item": {"seq": N, "value": HEX}}`, or
//!   `{"item": null}`.
//!
//! It exits when stdin closes (or on `{"cmd": "quit"}`).

use std::io::{BufRead, Write};
use std::net::Ipv4Addr;

use mainline::{Dht, Testnet};
use serde_json::{json, Value};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[allow(deprecated)] // the blocking API is what a line-at-a-time helper wants
fn main() {
    let nodes: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let testnet = Testnet::builder(nodes)
        .bind_address(Ipv4Addr::LOCALHOST)
        .build()
        .expect("testnet");
    let client = Dht::builder()
        .bootstrap(&testnet.bootstrap)
        .bind_address(Ipv4Addr::LOCALHOST)
        .build()
        .expect("client");
    let mut out = std::io::stdout().lock();
    let say = |out: &mut std::io::StdoutLock<'_>, v: Value| {
        writeln!(out, "{v}").unwrap();
        out.flush().unwrap();
    };
    say(&mut out, json!({ "bootstrap": testnet.bootstrap }));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let cmd: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        match cmd["cmd"].as_str() {
            Some("get") => {
                let Some(key) = cmd["key"].as_str().and_then(unhex32) else {
                    say(&mut out, json!({"error": "key: 64 hex digits"}));
                    continue;
                };
                let item = client
                    .get_mutable_most_recent(&key, None)
                    .map(|i| json!({"seq": i.seq(), "value": hex(i.value())}));
                say(&mut out, json!({ "item": item }));
            }
            Some("quit") => break,
            _ => say(
                &mut out,
                json!({"error": format!("unknown command {line:?}")}),
            ),
        }
    }
}
