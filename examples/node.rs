//! A node driven by JSON lines, so that any language can script the platform.
//!
//! ```text
//! cargo run --example node -- --data DIR [--udp ADDR:PORT|off] [--tcp ADDR:PORT|off]
//!     [--connect-timeout MS] [--retry MS] [--keepalive MS] [--dead-after MS]
//!     [--mdns] [--mdns-interface ADDR] [--bootstrap FILE]
//!     [--relay] [--relay-bps BYTES] [--no-relays] [--no-punch]
//!     [--mainline BOOTSTRAP_ADDR,...] [--mainline-publish] [--dht] [--new-identity]
//! ```
//!
//! The optional timings set the [`NetConfig`] fields of the same names (tests use short ones).
//! `--mdns` adds the mDNS discovery service (on 127.0.0.1 unless `--mdns-interface` gives the
//! IPv4 address of another interface); `--bootstrap FILE` adds the static bootstrap service
//! with the nodeInfos of FILE (a JSON array). `--relay` offers relaying to nodes behind NATs
//! (`--relay-bps` sets its per-reservation bandwidth); `--no-relays` never uses a relay,
//! `--no-punch` never punches a direct path (NetConfig `relay`, `use_relays`, `hole_punching`).
//! `--mainline HOST:PORT,...` adds the Mainline DHT
//! service, joining the DHT at those nodes (there is no default list; pass public routers for
//! the real DHT, a testnet's nodes for a test), resolving nodeInfos there;
//! `--mainline-publish` also publishes ours.
//! `--dht` adds the Kademlia DHT service (wire-compatible with the original
//! `mm-services-kademlia`); it has no seeds of its own and joins through the nodes that
//! `--bootstrap` and `--mdns` find (or that join it); its routing table and records are kept in
//! `DIR`.
//!
//! `DIR` is a [`FileStore`] (created if missing) holding the identity, the listen addresses of
//! the last run and the offline buffer. Without `--udp`/`--tcp` the node listens where it did
//! last time, else on 127.0.0.1 with OS-chosen ports. A `DIR` whose identity is gone but that
//! holds other state is refused (exit 1) unless `--new-identity` allows a new identity there
//! (PlatformBuilder `allow_new_identity`).
//!
//! stdout, one JSON object per line (flushed):
//! - `{"event":"ready","nodeInfo":{...}}`
//! - `{"event":"message","topic":"public.test.hello","sender":"<signId>|<boxId>|local","protocol":"ms","payload":<json>}`
//!   (a JavaScript node's messages carry its boxId until its signId is known; a message sent
//!   with `realtime:false` also carries `"messageId":"<32 hex digits>"`, the same in every
//!   copy of it: see "Delivery guarantee" in the `offline` module docs)
//!   for every delivery except the platform's own `self.transports.*`, `self.directory.*`,
//!   `self.friends.*`, `self.devices.*` (a payload that is not JSON is given as a string)
//! - `{"event":"connection","peer":"<signId>"}`, `{"event":"disconnected","peer":"<signId>"}`
//! - `{"event":"peer","nodeInfo":{...},"source":"mdns"|"bootstrap"|...}` when a service
//!   publishes a nodeInfo that is new or changed (not for our own; at most 4,096 remembered)
//! - `{"event":"sent","id":ID,"ok":true}` or `{"event":"sent","id":ID,"ok":false,"error":"..."}`
//!   once per send that carried an id
//! - `{"event":"nodeInfo","nodeInfo":{...}}` whenever our published nodeInfo changes
//! - `{"event":"path","peer":"<signId>","path":"direct"|"relayed","remote":"ADDR:PORT"}`
//!   when a connection's path is first known and whenever it changes
//! - `{"event":"connections","list":[{"peer":...,"path":...,"remote":...,"rttUs":...,"active":...}]}`
//!   answering `{"cmd":"connections"}`
//! - `{"event":"value","key":K,"value":V}` or `{"event":"value","key":K,"error":"..."}`
//!   answering `{"cmd":"get"}`, and `{"event":"stored","key":K,"acks":N}` (nodes that took
//!   the value) answering `{"cmd":"put"}` (with `--dht`)
//! - `{"event":"storageFault","kind":"reading"|"writing"|"deleting"|"damaged record","key":K,"cause":"...","keptAs":K2|null}`
//!   when the storage fails or holds a damaged record and the node goes on (a full or
//!   read-only disk, a damaged offline record kept aside as `keptAs`)
//! - `{"event":"error","error":"..."}` for a bad command (the node keeps running)
//!
//! stdin, one JSON command per line:
//! - `{"cmd":"nodeInfo","nodeInfo":{...}}`
//! - `{"cmd":"send","id":ID,"topic":"test.hello","to":"<signId>"|"<boxId>"|"local","payload":<json>,"realtime":true|false,"expireAfter":MS}`
//!   (a boxId names a node whose nodeInfo or connection is known, as JavaScript nodes address
//!   each other)
//! - `{"cmd":"friends","keys":[...]}`, `{"cmd":"devices","keys":[...]}`
//! - `{"cmd":"connections"}`
//! - `{"cmd":"put","key":K,"value":V}`, `{"cmd":"get","key":K}` (with `--dht`: K a string,
//!   V any JSON)
//! - `{"cmd":"quit"}`; end of input also quits.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::time::Duration;

use serde_json::{json, Value};

use mm_platform::services::bootstrap::Bootstrap;
use mm_platform::services::kademlia::{Kademlia, KademliaConfig};
use mm_platform::services::mainline::{Mainline, MainlineConfig};
use mm_platform::services::mdns::{Mdns, MdnsConfig};
use mm_platform::storage::FileStore;
use mm_platform::{Address, Context, Event, NetConfig, Platform, SendOptions};

/// The internal topic on which stdin lines reach the reactor (never printed).
const STDIN_TOPIC: &str = "node-example.stdin";
/// Its protocol.
const STDIN_PROTOCOL: &str = "node-example";

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn usage() -> ! {
    eprintln!(
        "usage: node --data DIR [--udp ADDR:PORT|off] [--tcp ADDR:PORT|off] \
         [--connect-timeout MS] [--retry MS] [--keepalive MS] [--dead-after MS] \
         [--mdns] [--mdns-interface ADDR] [--bootstrap FILE] \
         [--relay] [--relay-bps BYTES] [--no-relays] [--no-punch] \
         [--mainline BOOTSTRAP_ADDR,...] [--mainline-publish] [--dht] [--new-identity]"
    );
    std::process::exit(2);
}

fn main() {
    // Diagnostics on stderr with RUST_LOG (e.g. RUST_LOG=mm_platform=debug); stdout stays
    // JSON lines.
    let _ = env_logger::Builder::from_default_env()
        .target(env_logger::Target::Stderr)
        .try_init();
    let mut data = None;
    let mut udp: Option<String> = None;
    let mut tcp: Option<String> = None;
    let mut net = NetConfig::default();
    let mut mdns: Option<MdnsConfig> = None;
    let mut bootstrap: Option<String> = None;
    let mut mainline: Option<String> = None;
    let mut mainline_publish = false;
    let mut dht = false;
    let mut new_identity = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut ms = || -> Duration {
            match args.next().and_then(|v| v.parse().ok()) {
                Some(n) => Duration::from_millis(n),
                None => usage(),
            }
        };
        match a.as_str() {
            "--data" => data = args.next(),
            "--udp" => udp = args.next(),
            "--tcp" => tcp = args.next(),
            "--connect-timeout" => net.connect_timeout = ms(),
            "--retry" => net.offline_retry = ms(),
            "--keepalive" => net.keepalive = ms(),
            "--dead-after" => net.dead_after = ms(),
            "--mdns" => {
                mdns.get_or_insert_with(MdnsConfig::default);
            }
            "--mdns-interface" => {
                let Some(addr) = args.next().and_then(|a| a.parse().ok()) else {
                    usage()
                };
                mdns.get_or_insert_with(MdnsConfig::default).interface = addr;
            }
            "--bootstrap" => bootstrap = args.next(),
            "--relay" => {
                net.relay.get_or_insert_with(Default::default);
            }
            "--relay-bps" => {
                let Some(bps) = args.next().and_then(|v| v.parse().ok()) else {
                    usage()
                };
                net.relay.get_or_insert_with(Default::default).bytes_per_sec = bps;
            }
            "--no-relays" => net.use_relays = false,
            "--new-identity" => new_identity = true,
            "--no-punch" => net.hole_punching = false,
            "--mainline" => mainline = args.next(),
            "--mainline-publish" => mainline_publish = true,
            "--dht" => dht = true,
            _ => usage(),
        }
    }
    let Some(data) = data else { usage() };
    let store = match FileStore::open(&data) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open {data}: {e}");
            std::process::exit(1);
        }
    };
    let mut builder = Platform::builder()
        .storage(store)
        .net(net)
        .allow_new_identity(new_identity);
    if udp.is_some() || tcp.is_some() {
        let mut listen = Vec::new();
        for (kind, arg, default) in [("udp", &udp, "127.0.0.1:0"), ("tcp", &tcp, "127.0.0.1:0")] {
            let a = arg.as_deref().unwrap_or(default);
            if a == "off" {
                continue;
            }
            let Ok(addr) = a.parse::<std::net::SocketAddr>() else {
                eprintln!("invalid address {a}");
                std::process::exit(2);
            };
            listen.push(json!({"transportType": kind,
                "transportInfo": {"address": addr.ip().to_string(), "port": addr.port()}}));
        }
        if listen.is_empty() {
            builder = builder.transports(false);
        }
        builder = builder.connection_info(Value::Array(listen));
    }
    if let Some(file) = bootstrap {
        let list = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|text| Bootstrap::from_json(&text));
        match list {
            Ok(service) => builder = builder.service(service),
            Err(e) => {
                eprintln!("cannot use bootstrap list {file}: {e}");
                std::process::exit(2);
            }
        }
    }
    if let Some(config) = mdns {
        builder = builder.service(Mdns::new(config));
    }
    match (mainline, mainline_publish) {
        (Some(list), publish) => match MainlineConfig::parse_bootstrap(&list) {
            Ok(addrs) if !addrs.is_empty() => {
                let config = MainlineConfig::new(addrs).publish(publish);
                builder = builder.service(Mainline::new(config));
            }
            Ok(_) => {
                eprintln!("--mainline needs at least one bootstrap address");
                std::process::exit(2);
            }
            Err(e) => {
                eprintln!("--mainline: {e}");
                std::process::exit(2);
            }
        },
        (None, true) => {
            eprintln!("--mainline-publish needs --mainline BOOTSTRAP_ADDR,...");
            std::process::exit(2);
        }
        (None, false) => {}
    }
    if dht {
        builder = builder.service(Kademlia::new(KademliaConfig::new(Vec::new())));
    }
    let mut platform = match builder.build() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cannot start: {e}");
            std::process::exit(1);
        }
    };

    platform.on_message(|_ctx, msg| {
        if msg.protocol == STDIN_PROTOCOL {
            return;
        }
        let topic = msg.scoped_topic();
        for own in [
            "self.transports.",
            "self.directory.",
            "self.friends.",
            "self.devices.",
            "self.dht.",
        ] {
            if topic.starts_with(own) {
                return;
            }
        }
        let payload = serde_json::from_slice::<Value>(&msg.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&msg.payload).into()));
        let mut event = json!({"event": "message", "topic": topic,
            "sender": msg.sender.to_string(), "protocol": msg.protocol, "payload": payload});
        if let Some(id) = msg.id {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            event["messageId"] = Value::String(hex);
        }
        emit(event);
    });
    platform.on(&format!("self.{STDIN_TOPIC}"), |ctx, msg| {
        if msg.protocol != STDIN_PROTOCOL || msg.sender != Address::Local {
            return;
        }
        if let Err(e) = command(ctx, &msg.payload) {
            emit(json!({"event": "error", "error": e}));
        }
    });
    platform.on("self.dht.*", |_ctx, msg| {
        if msg.sender != Address::Local {
            return;
        }
        let Ok(v) = msg.json::<Value>() else { return };
        match msg.topic.as_str() {
            "dht.value" => {
                let mut out = json!({"event": "value", "key": v["key"]});
                for field in ["value", "error"] {
                    if let Some(x) = v.get(field) {
                        out[field] = x.clone();
                    }
                }
                emit(out);
            }
            "dht.stored" => emit(json!({"event": "stored", "key": v["key"], "acks": v["acks"]})),
            _ => {}
        }
    });
    let info = platform.node_info();
    let own = platform.sign_id().to_string();
    let mut peers: HashMap<String, Value> = HashMap::new();
    platform.on_event(move |_ctx, event| match event {
        Event::Ready => emit(json!({"event": "ready", "nodeInfo": info})),
        Event::NodeInfo { node_info, source } => {
            let Some(id) = node_info.get("signId").and_then(Value::as_str) else {
                return;
            };
            if id == own || peers.get(id) == Some(node_info) {
                return;
            }
            if peers.len() >= 4096 && !peers.contains_key(id) {
                peers.clear();
            }
            peers.insert(id.to_owned(), node_info.clone());
            emit(json!({"event": "peer", "nodeInfo": node_info, "source": source}));
        }
        Event::Connection(p) => emit(json!({"event": "connection", "peer": p.to_string()})),
        Event::Disconnected(p) => emit(json!({"event": "disconnected", "peer": p.to_string()})),
        Event::MyNodeInfo(info) => emit(json!({"event": "nodeInfo", "nodeInfo": info})),
        Event::Path {
            peer,
            relayed,
            remote,
        } => emit(json!({"event": "path", "peer": peer.to_string(),
            "path": if *relayed { "relayed" } else { "direct" }, "remote": remote.to_string()})),
        Event::StorageFault(f) => emit(json!({"event": "storageFault", "kind": f.kind.to_string(),
            "key": f.key, "cause": f.cause, "keptAs": f.kept_as})),
        _ => {}
    });

    let handle = platform.handle();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            // A full channel: wait for the reactor to make room (bounded retries per line).
            for _ in 0..100_000 {
                match handle.send("local", STDIN_PROTOCOL, STDIN_TOPIC, line.as_bytes()) {
                    mm_platform::SendStatus::BufferFull => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    _ => break,
                }
            }
        }
        handle.shutdown();
    });
    if let Err(e) = platform.run() {
        eprintln!("reactor failed: {e}");
        std::process::exit(1);
    }
}

/// Runs one command line on the reactor's thread.
fn command(ctx: &mut Context<'_>, line: &[u8]) -> Result<(), String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("cmd").and_then(Value::as_str) {
        Some("nodeInfo") => {
            let info = v.get("nodeInfo").ok_or("nodeInfo missing")?;
            let _ = ctx.messaging().send("transports.nodeInfo", "local", info);
            Ok(())
        }
        Some(which @ ("friends" | "devices")) => {
            let keys = v
                .get("keys")
                .filter(|k| k.is_array())
                .ok_or("keys missing")?;
            let _ = ctx
                .messaging()
                .send(&format!("{which}.update"), "local", keys);
            Ok(())
        }
        Some("quit") => {
            ctx.shutdown();
            Ok(())
        }
        Some("send") => send(ctx, &v),
        Some("put") => {
            let key = v.get("key").and_then(Value::as_str).ok_or("key missing")?;
            let value = v.get("value").ok_or("value missing")?;
            let _ = ctx
                .messaging()
                .send("dht.put", "local", &json!({"key": key, "value": value}));
            Ok(())
        }
        Some("get") => {
            let key = v.get("key").and_then(Value::as_str).ok_or("key missing")?;
            let _ = ctx.messaging().send("dht.get", "local", &key);
            Ok(())
        }
        Some("connections") => {
            let list: Vec<Value> = ctx
                .connections()
                .iter()
                .map(|c| {
                    json!({"peer": c.peer.map(|p| p.to_string()),
                        "path": if c.relayed { "relayed" } else { "direct" },
                        "remote": c.remote.map(|r| r.to_string()),
                        "rttUs": c.rtt.map(|r| r.as_micros() as u64),
                        "active": c.active})
                })
                .collect();
            emit(json!({"event": "connections", "list": list}));
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}")),
        None => Err("cmd missing".into()),
    }
}

fn send(ctx: &mut Context<'_>, v: &Value) -> Result<(), String> {
    let id = v.get("id").cloned();
    let topic = v
        .get("topic")
        .and_then(Value::as_str)
        .ok_or("topic missing")?;
    let to = v.get("to").and_then(Value::as_str).ok_or("to missing")?;
    let payload =
        serde_json::to_vec(v.get("payload").unwrap_or(&Value::Null)).map_err(|e| e.to_string())?;
    let options = SendOptions {
        realtime: v.get("realtime").and_then(Value::as_bool).unwrap_or(true),
        expire_after: v
            .get("expireAfter")
            .and_then(Value::as_u64)
            .map(Duration::from_millis),
    };
    let cb_id = id.clone();
    let status = ctx.send_with_callback(to, "ms", topic, payload, options, move |_ctx, r| {
        if let Some(id) = cb_id {
            match r {
                Ok(()) => emit(json!({"event": "sent", "id": id, "ok": true})),
                Err(e) => {
                    emit(json!({"event": "sent", "id": id, "ok": false, "error": e.to_string()}))
                }
            }
        }
    });
    if !status.is_queued() {
        if let Some(id) = id {
            emit(json!({"event": "sent", "id": id, "ok": false, "error": status.to_string()}));
        }
    }
    Ok(())
}
