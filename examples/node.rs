//! A node driven by JSON lines, so that any language can script the platform.
//!
//! ```text
//! cargo run --example node -- --data DIR [--udp ADDR:PORT|off] [--tcp ADDR:PORT|off]
//!     [--connect-timeout MS] [--retry MS] [--keepalive MS] [--dead-after MS]
//!     [--mdns] [--mdns-interface ADDR] [--bootstrap FILE]
//!     [--relay] [--relay-bps BYTES] [--no-relays] [--no-punch] [--no-portmap]
//!     [--mainline BOOTSTRAP_ADDR,...] [--mainline6 [ADDR]:PORT,...] [--mainline-publish]
//!     [--dht] [--new-identity] [--max-line BYTES]
//! ```
//!
//! The optional timings set the [`NetConfig`] fields of the same names (tests use short ones).
//! `--mdns` adds the mDNS discovery service (on 127.0.0.1 unless `--mdns-interface` gives the
//! IPv4 address of another interface); `--bootstrap FILE` adds the static bootstrap service
//! with the nodeInfos of FILE (a JSON array). `--relay` offers relaying to nodes behind NATs
//! (`--relay-bps` sets its per-reservation bandwidth); `--no-relays` never uses a relay,
//! `--no-punch` never punches a direct path (NetConfig `relay`, `use_relays`, `hole_punching`;
//! these four need the cargo feature `relay`, on by default). `--no-portmap` never asks the
//! gateway to map our UDP port (NetConfig `port_mapping`).
//! `--mainline HOST:PORT,...` adds the Mainline DHT
//! service, joining the DHT at those nodes (there is no default list; pass public routers for
//! the real DHT, a testnet's nodes for a test), resolving nodeInfos there;
//! `--mainline6 [ADDR]:PORT,...` joins the IPv6 DHT (BEP 32) at those nodes, beside the IPv4
//! one or alone. `--mainline-publish` also publishes ours (and, with `--relay`, announces the node as a
//! relay there; a node behind a NAT searches there for a relay when it knows none).
//! `--dht` adds the Kademlia DHT service (wire-compatible with the original
//! `mm-services-kademlia`); it has no seeds of its own and joins through the nodes that
//! `--bootstrap` and `--mdns` find (or that join it); its routing table and records are kept in
//! `DIR`. With `--relay` the node announces itself there as a relay; a node behind a NAT that
//! knows no relay finds one there (and keeps its choice in `DIR` for the next run).
//!
//! `DIR` is a [`FileStore`] (created if missing) holding the identity, the listen addresses of
//! the last run and the offline buffer. Without `--udp`/`--tcp` the node listens where it did
//! last time, else on 127.0.0.1 with OS-chosen ports. A `DIR` whose identity is gone but that
//! holds other state is refused (exit 1) unless `--new-identity` allows a new identity there
//! (PlatformBuilder `allow_new_identity`).
//!
//! `--max-line BYTES` bounds a command line (not counting its `\n`); the default is twice
//! [`NetConfig::max_frame`] (32 MiB), room for a `send` whose payload is as large as the
//! platform sends (16 MiB) even with JSON escapes. A longer line is discarded as it streams in
//! (at most `BYTES` of it are ever held) and answered with an error naming the bound; memory
//! taken by a large line is given back to the system once it is done (the line buffer
//! shrinks; with glibc, blocks of 1 MiB or more are mapped on their own). A line may also hold at most one JSON
//! value per 32 of `BYTES` (1,048,576 by default), as a parsed value takes far more memory
//! than its text (`0,` is 2 bytes). Lines are read ahead of the reactor up to about one more
//! line's worth (`BYTES` and 4,096 lines).
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
//!   once per send that carried an id: `ok:false` at once when the platform refuses the send
//!   (`"message of N bytes is larger than the limit of M bytes"` beyond 16 MiB, `"send buffer
//!   full"`, `"unknown destination"`, ...), later when it is not delivered (expired,
//!   unreachable, ...)
//! - `{"event":"nodeInfo","nodeInfo":{...}}` whenever our published nodeInfo changes
//! - `{"event":"path","peer":"<signId>","path":"direct"|"relayed","remote":"ADDR:PORT"}`
//!   when a connection's path is first known and whenever it changes
//! - `{"event":"connections","id":ID,"list":[{"peer":...,"path":...,"remote":...,"family":"ipv4"|"ipv6","rttUs":...,"active":...}],"relay":{"signId":...,"address":"ADDR:PORT","rttUs":...},"mappedPort":PORT,"mappedTcpPort":PORT,"mappedBy":"pcp"|"natpmp"|"upnp"}`
//!   answering `{"cmd":"connections"}` (`id` when the command had one; `relay` is the relay
//!   we use behind a NAT, with the RTT measured when it was chosen among several;
//!   `mappedPort` is the public port our gateway forwards to our UDP listener and `mappedBy`
//!   the protocol that got it, `mappedTcpPort` the one it forwards to our TCP listener;
//!   `null` without)
//! - `{"event":"value","key":K,"value":V}` or `{"event":"value","key":K,"error":"..."}`
//!   answering `{"cmd":"get"}`, and `{"event":"stored","key":K,"acks":N}` (nodes that took
//!   the value) answering `{"cmd":"put"}` (with `--dht`)
//! - `{"event":"storageFault","kind":"reading"|"writing"|"deleting"|"damaged record","key":K,"cause":"...","keptAs":K2|null}`
//!   when the storage fails or holds a damaged record and the node goes on (a full or
//!   read-only disk, a damaged offline record kept aside as `keptAs`)
//! - `{"event":"error","line":N,"cmd":C,"id":ID,"field":F,"error":"..."}` for input that is
//!   not a well-formed command; the node goes on with the next line. `line` numbers the lines
//!   of stdin from 1 (blank lines count); `cmd`, `id` and `field` are there when known:
//!   - a line longer than `--max-line`, with too many JSON values, not UTF-8, not JSON, or
//!     not a JSON object: `line` and `error` only (`"line 2: 20000071 bytes, longer than the
//!     --max-line bound of 1048576 bytes; discarded"`, `"line 1: not UTF-8 (invalid byte at
//!     offset 27)"`);
//!   - `cmd` missing, not a string or unknown: `field` is `"cmd"`;
//!   - a field the command does not take, one missing, or one of the wrong kind: `field`
//!     names it and `error` starts with its name (`"expireAfter: not a non-negative integer
//!     (milliseconds)"`; inside a nodeInfo `nodeInfo.signId`, `nodeInfo.boxId`,
//!     `nodeInfo.connectionInfo`; in a list of keys `keys[I]`);
//!   - `put` or `get` on a node started without `--dht`: `field` `"cmd"`, the text names
//!     `--dht`;
//!   - a command the local bus refused (its queue full), or a send without an `id` that the
//!     platform refused: no `field`.
//!
//! stdin, one JSON object per line (UTF-8); every command may carry an `"id"` (any JSON value),
//! echoed in its `sent`, `connections` and `error` events; fields other than those listed are
//! refused:
//! - `{"cmd":"nodeInfo","nodeInfo":{"signId":S,"boxId":B,"connectionInfo":[...]}}`: S a
//!   signId, B its box key (the conversion of S, checked), `connectionInfo` optional, an array
//!   (entries the platform does not know are skipped)
//! - `{"cmd":"send","id":ID,"topic":"test.hello","to":"<signId>"|"<boxId>"|"local","payload":<json>,"realtime":true|false,"expireAfter":MS}`
//!   `topic` and `to` required (strings); `payload` any JSON (default `null`); `realtime` a
//!   boolean (default `true`); `expireAfter` a non-negative integer of milliseconds (default:
//!   the platform's). A boxId names a node whose nodeInfo or connection is known, as
//!   JavaScript nodes address each other.
//! - `{"cmd":"friends","keys":[...]}`, `{"cmd":"devices","keys":[...]}`: every key a signId
//!   (the circle is replaced as a whole)
//! - `{"cmd":"connections"}`
//! - `{"cmd":"put","key":K,"value":V}`, `{"cmd":"get","key":K}` (with `--dht`: K a string,
//!   V any JSON, required)
//! - `{"cmd":"quit"}`; the end of input also quits, once the commands before it have run (a
//!   last line without its `\n` included).

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Write};
use std::time::Duration;

use serde_json::{json, Value};

use mm_platform::identity::KeyCache;
use mm_platform::platform::directory::NodeInfoError;
use mm_platform::platform::{NodeInfo, ToAddress};
use mm_platform::services::bootstrap::Bootstrap;
use mm_platform::services::kademlia::{Kademlia, KademliaConfig};
use mm_platform::services::mainline::{Mainline, MainlineConfig};
use mm_platform::services::mdns::{Mdns, MdnsConfig};
use mm_platform::storage::FileStore;
use mm_platform::{
    Address, BoxId, Context, Event, Limits, NetConfig, Platform, PortMapProtocol, SendError,
    SendOptions, SendResult, SignId,
};

/// The internal topic on which stdin lines reach the reactor (never printed).
const STDIN_TOPIC: &str = "node-example.stdin";
/// Its protocol.
const STDIN_PROTOCOL: &str = "node-example";

fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The flags, one per line (`--help`).
const HELP: &str = "\
usage: node --data DIR [FLAGS]

A node of the mm-platform driven by JSON lines: commands on stdin, events on stdout (every
command and event is described at the top of examples/node.rs). Logs go to stderr with
RUST_LOG (e.g. RUST_LOG=mm_platform=debug).

  --data DIR               the node's storage (identity, listen addresses, offline buffer);
                           created if missing; one node per directory
  --udp ADDR:PORT|off      listen for CurveCP over UDP there (default: where it did last time,
                           else 127.0.0.1 with an OS-chosen port; 0.0.0.0 and [::] take IPv6
                           and IPv4 on one socket)
  --tcp ADDR:PORT|off      the same for TCP
  --connect-timeout MS     one connection attempt may take this long (default 5000)
  --happy-eyeballs MS|off  a peer on IPv6 and IPv4 is dialled on IPv4 too after MS without an
                           IPv6 answer (default 250); off: one address at a time, IPv6 first
  --no-ipv6                keep 0.0.0.0 IPv4-only and never dial peers' IPv6 endpoints
  --interface-refresh MS   how often a node on [::] reads its IPv6 addresses (default 60000)
  --retry MS               longest wait before a failed destination is tried again (default 5000)
  --keepalive MS           an idle connection pings after this long (default 10000)
  --dead-after MS          a peer silent this long with data in flight is dead (default 5000)
  --mdns                   discover peers with mDNS (on 127.0.0.1 unless --mdns-interface)
  --mdns-interface ADDR    the IPv4 address of the interface mDNS uses
  --bootstrap FILE         nodeInfos (a JSON array) to start from
  --relay                  relay for nodes behind NATs
  --relay-bps BYTES        bandwidth per relay reservation
  --no-relays              never use a relay
  --no-punch               never punch a direct path through NATs
  --no-portmap             never ask the gateway to map our port (PCP, NAT-PMP, UPnP)
  --mainline HOST:PORT,..  join the Mainline DHT at these nodes (no default list)
  --mainline6 [A]:PORT,..  join the IPv6 Mainline DHT (BEP 32) at these nodes
  --mainline-publish       also publish our nodeInfo there
  --dht                    run the Kademlia DHT service (mm-services-kademlia compatible)
  --new-identity           allow a new identity in a DIR whose identity is gone
  --max-line BYTES         longest command line (default 32 MiB)
  -h, --help               this text
";

/// A bad command line: what is wrong, then how to get help; exit code 2.
fn bad_args(why: &str) -> ! {
    eprintln!("node: {why}\nusage: node --data DIR [FLAGS]; `node --help` lists them");
    std::process::exit(2);
}

fn main() {
    // Diagnostics on stderr with RUST_LOG (e.g. RUST_LOG=mm_platform=debug); stdout stays
    // JSON lines.
    let _ = env_logger::Builder::from_default_env()
        .target(env_logger::Target::Stderr)
        .try_init();
    large_blocks_are_returned();
    let mut data = None;
    let mut udp: Option<String> = None;
    let mut tcp: Option<String> = None;
    let mut net = NetConfig::default();
    let mut mdns: Option<MdnsConfig> = None;
    let mut bootstrap: Option<String> = None;
    let mut mainline: Option<String> = None;
    let mut mainline6: Option<String> = None;
    let mut mainline_publish = false;
    let mut dht = false;
    let mut new_identity = false;
    let mut max_line = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let flag = a.clone();
        let mut value = |what: &str| -> String {
            args.next()
                .unwrap_or_else(|| bad_args(&format!("{flag} needs {what}")))
        };
        let mut ms = || -> Duration {
            let v = value("a number of milliseconds");
            match v.parse() {
                Ok(n) => Duration::from_millis(n),
                Err(_) => bad_args(&format!("{flag} needs a number of milliseconds, not {v:?}")),
            }
        };
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--data" => data = Some(value("a directory")),
            "--udp" => udp = Some(value("ADDR:PORT or off")),
            "--tcp" => tcp = Some(value("ADDR:PORT or off")),
            "--connect-timeout" => net.connect_timeout = ms(),
            "--happy-eyeballs" => {
                let v = value("a number of milliseconds or off");
                net.happy_eyeballs = match v.as_str() {
                    "off" => None,
                    v => Some(Duration::from_millis(v.parse().unwrap_or_else(|_| {
                        bad_args(&format!("--happy-eyeballs: {v:?} is not a number or off"))
                    }))),
                };
            }
            "--retry" => net.offline_retry = ms(),
            "--keepalive" => net.keepalive = ms(),
            "--dead-after" => net.dead_after = ms(),
            "--mdns" => {
                mdns.get_or_insert_with(MdnsConfig::default);
            }
            "--mdns-interface" => {
                let v = value("an IPv4 address");
                let Ok(addr) = v.parse() else {
                    bad_args(&format!(
                        "--mdns-interface needs an IPv4 address, not {v:?}"
                    ))
                };
                mdns.get_or_insert_with(MdnsConfig::default).interface = addr;
            }
            "--bootstrap" => bootstrap = Some(value("a file")),
            #[cfg(feature = "relay")]
            "--relay" => {
                net.relay.get_or_insert_with(Default::default);
            }
            #[cfg(feature = "relay")]
            "--relay-bps" => {
                let v = value("a number of bytes per second");
                let Ok(bps) = v.parse() else {
                    bad_args(&format!(
                        "--relay-bps needs a number of bytes per second, not {v:?}"
                    ))
                };
                net.relay.get_or_insert_with(Default::default).bytes_per_sec = bps;
            }
            #[cfg(feature = "relay")]
            "--no-relays" => net.use_relays = false,
            "--new-identity" => new_identity = true,
            #[cfg(feature = "relay")]
            "--no-punch" => net.hole_punching = false,
            "--no-portmap" => net.port_mapping = false,
            "--no-ipv6" => net.ipv6 = false,
            "--interface-refresh" => net.interface_refresh = ms(),
            "--mainline" => mainline = Some(value("HOST:PORT,...")),
            "--mainline6" => mainline6 = Some(value("[ADDR]:PORT,...")),
            "--mainline-publish" => mainline_publish = true,
            "--dht" => dht = true,
            "--max-line" => {
                let v = value("a number of bytes");
                match v.parse::<usize>() {
                    Ok(n) if n > 0 => max_line = Some(n),
                    _ => bad_args(&format!(
                        "--max-line needs a positive number of bytes, not {v:?}"
                    )),
                }
            }
            other => bad_args(&format!("unknown flag {other:?}")),
        }
    }
    let Some(data) = data else {
        bad_args("--data DIR is required")
    };
    let max_line = max_line.unwrap_or(2 * net.max_frame);
    let store = match FileStore::open(&data) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot open {data}: {e}");
            std::process::exit(1);
        }
    };
    // Events are taken by the callbacks below; the batch for `drain_events` (never drained
    // here) would keep up to 1,024 delivered messages, payloads and all.
    let limits = Limits {
        event_batch: 0,
        ..Limits::default()
    };
    let mut builder = Platform::builder()
        .storage(store)
        .net(net)
        .limits(limits)
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
    let parsed = (
        mainline.as_deref().map(MainlineConfig::parse_bootstrap),
        mainline6.as_deref().map(MainlineConfig::parse_bootstrap6),
    );
    match (parsed, mainline_publish) {
        ((Some(Err(e)), _), _) => {
            eprintln!("--mainline: {e}");
            std::process::exit(2);
        }
        ((_, Some(Err(e))), _) => {
            eprintln!("--mainline6: {e}");
            std::process::exit(2);
        }
        ((Some(Ok(v4)), _), _) if v4.is_empty() => {
            eprintln!("--mainline needs at least one bootstrap address");
            std::process::exit(2);
        }
        ((_, Some(Ok(v6))), _) if v6.is_empty() => {
            eprintln!("--mainline6 needs at least one bootstrap address");
            std::process::exit(2);
        }
        ((None, None), true) => {
            eprintln!("--mainline-publish needs --mainline or --mainline6 BOOTSTRAP_ADDR,...");
            std::process::exit(2);
        }
        ((None, None), false) => {}
        ((v4, v6), publish) => {
            let config = MainlineConfig::new(v4.and_then(Result::ok).unwrap_or_default())
                .ipv6(v6.and_then(Result::ok).unwrap_or_default())
                .publish(publish);
            builder = builder.service(Mainline::new(config));
        }
    }
    if dht {
        builder = builder.service(Kademlia::new(KademliaConfig::new(Vec::new())));
    }
    let mut platform = match builder.build() {
        Ok(p) => p,
        Err(e) => {
            let listen = [("udp", &udp), ("tcp", &tcp)]
                .iter()
                .filter_map(|(k, a)| a.as_deref().map(|a| format!("--{k} {a}")))
                .collect::<Vec<_>>()
                .join(", ");
            if listen.is_empty() {
                eprintln!("node: cannot start: {e}");
            } else {
                eprintln!("node: cannot start ({listen}): {e}");
            }
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
    let inbox = std::sync::Arc::new(Inbox::new(max_line));
    let reader = inbox.clone();
    std::thread::spawn(move || {
        let stdin = BufReader::with_capacity(KEEP_LINE_CAPACITY, io::stdin());
        let mut deliver = |input| {
            if !reader.push(input) {
                return true;
            }
            // The queue was empty: wake the reactor (it takes everything queued by then). A
            // full channel is drained by the reactor's next turn: wait for room.
            loop {
                match handle.send(STDIN_PROTOCOL, STDIN_TOPIC, "local", Vec::new()) {
                    Err(SendError::BufferFull) => std::thread::sleep(Duration::from_millis(1)),
                    Ok(()) => return true,
                    Err(other) => {
                        eprintln!("stdin: the reactor is gone ({other})");
                        return false;
                    }
                }
            }
        };
        // The end of input quits after the commands before it.
        if read_commands(stdin, max_line, &mut deliver) && !deliver(Input::End) {
            handle.shutdown();
        }
    });
    let mut state = State {
        dht,
        keys: KeyCache::new(4096),
    };
    platform.on(&format!("self.{STDIN_TOPIC}"), move |ctx, msg| {
        if msg.protocol != STDIN_PROTOCOL || msg.sender != Address::Local {
            return;
        }
        for input in inbox.take() {
            match input {
                Input::Unreadable { line, error } => {
                    emit(json!({"event": "error", "line": line, "error": error}))
                }
                Input::End => {
                    ctx.shutdown();
                    return;
                }
                Input::Command { line, value, .. } => {
                    let quit = value.get("cmd").and_then(Value::as_str) == Some("quit");
                    if let Err(fault) = command(ctx, &mut state, &value) {
                        let mut out = json!({"event": "error", "line": line,
                            "error": fault.error});
                        if let Some(name) = value.get("cmd").filter(|c| c.is_string()) {
                            out["cmd"] = name.clone();
                        }
                        if let Some(id) = value.get("id") {
                            out["id"] = id.clone();
                        }
                        if let Some(field) = fault.field {
                            out["field"] = field.into();
                        }
                        emit(out);
                    } else if quit {
                        return;
                    }
                }
            }
        }
    });
    if let Err(e) = platform.run() {
        eprintln!("reactor failed: {e}");
        std::process::exit(1);
    }
}

/// Line buffer capacity kept between lines; a larger one (after a large line) is given back.
const KEEP_LINE_CAPACITY: usize = 64 * 1024;
/// Most lines read ahead of the reactor (besides the byte bound, `--max-line`).
const MAX_QUEUED_LINES: usize = 4096;

/// A line may hold one JSON value per this many of its `--max-line` bytes. Parsed, a value
/// takes 32 bytes and more (arrays and maps add their own), while `0,` is 2 bytes of input:
/// without this bound a line of small numbers would take 16 times its size once parsed.
const BYTES_PER_VALUE: usize = 32;

/// The number of JSON values in `bytes` (valid UTF-8), counted without parsing: every value
/// but the first follows a `[`, `,` or `:` outside strings. Over-counts only `[]` (one value
/// for none), which is harmless for a bound.
fn json_values(bytes: &[u8]) -> usize {
    let (mut n, mut in_string, mut escaped) = (1usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b',' | b':' => n += 1,
                _ => {}
            }
        }
    }
    n
}

/// What the reader thread makes of one line of stdin.
enum Input {
    /// A JSON object, to run as a command; `len` is the line's size in bytes.
    Command { line: u64, value: Value, len: usize },
    /// A line that is too long, not UTF-8, not JSON or not an object.
    Unreadable { line: u64, error: String },
    /// The end of input (or a read error): quit.
    End,
}

impl Input {
    /// The bytes it stands for in the read-ahead bound.
    fn weight(&self) -> usize {
        match self {
            Input::Command { len, .. } => *len,
            Input::Unreadable { .. } | Input::End => 0,
        }
    }
}

/// Lines read from stdin and not yet taken by the reactor: at most [`MAX_QUEUED_LINES`] and
/// `--max-line` bytes of them (one line of any allowed size is always taken), so that reading
/// ahead never holds more than about two maximal lines (this queue and the line being read).
struct Inbox {
    queue: std::sync::Mutex<(VecDeque<Input>, usize)>,
    room: std::sync::Condvar,
    max_bytes: usize,
}

impl Inbox {
    fn new(max_bytes: usize) -> Inbox {
        Inbox {
            queue: Default::default(),
            room: std::sync::Condvar::new(),
            max_bytes,
        }
    }

    /// Queues `input`, waiting for room; returns whether the queue was empty (the reactor must
    /// be woken).
    fn push(&self, input: Input) -> bool {
        let weight = input.weight();
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        while !q.0.is_empty() && (q.0.len() >= MAX_QUEUED_LINES || q.1 + weight > self.max_bytes) {
            q = self.room.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        let was_empty = q.0.is_empty();
        q.0.push_back(input);
        q.1 += weight;
        was_empty
    }

    /// Everything queued, in order.
    fn take(&self) -> VecDeque<Input> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let taken = std::mem::take(&mut q.0);
        q.1 = 0;
        self.room.notify_all();
        taken
    }
}

/// Reads `input` line by line (bytes, up to `\n` or the end) and hands `deliver` each
/// non-blank line as an [`Input`], numbered from 1 (blank lines count). A line longer than
/// `max_line` bytes (not counting the `\n`) is discarded as it streams in: it is never held
/// beyond `max_line` bytes. Returns `true` at the end of input or on a read error, `false` when
/// `deliver` returns `false`.
fn read_commands(
    mut input: impl BufRead,
    max_line: usize,
    mut deliver: impl FnMut(Input) -> bool,
) -> bool {
    let mut buf: Vec<u8> = Vec::with_capacity(KEEP_LINE_CAPACITY);
    let mut len = 0usize;
    let mut line = 0u64;
    loop {
        let chunk = match input.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("stdin: {e}");
                return true;
            }
        };
        let end = chunk.is_empty();
        let (part, newline) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], true),
            None => (chunk, false),
        };
        len = len.saturating_add(part.len());
        if len <= max_line {
            if buf.capacity() < len {
                // Grow by doubling, but never beyond the bound.
                let want = (buf.capacity() * 2).clamp(len, max_line);
                buf.reserve_exact(want - buf.len());
            }
            buf.extend_from_slice(part);
        } else {
            buf.clear();
        }
        let used = part.len() + usize::from(newline);
        input.consume(used);
        // A line ends at its `\n`, or at the end of input if anything came since the last.
        let complete = newline || (end && len > 0);
        if !complete {
            if end {
                return true;
            }
            continue;
        }
        line += 1;
        let parsed = if len > max_line {
            Some(Input::Unreadable {
                line,
                error: format!(
                    "line {line}: {len} bytes, longer than the --max-line bound of \
                     {max_line} bytes; discarded"
                ),
            })
        } else {
            parse_line(line, &buf, max_line / BYTES_PER_VALUE)
        };
        if buf.capacity() > KEEP_LINE_CAPACITY {
            buf = Vec::with_capacity(KEEP_LINE_CAPACITY);
        } else {
            buf.clear();
        }
        len = 0;
        if let Some(input) = parsed {
            if !deliver(input) {
                return false;
            }
        }
        if end {
            return true;
        }
    }
}

/// One complete line: `None` if blank, else a command or why it is unreadable. A line of more
/// than `max_values` JSON values is refused before it is parsed.
fn parse_line(line: u64, bytes: &[u8], max_values: usize) -> Option<Input> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let error = match std::str::from_utf8(bytes) {
        Err(e) => format!(
            "line {line}: not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ),
        Ok(_) if json_values(bytes) > max_values => format!(
            "line {line}: more than {max_values} JSON values (--max-line / {BYTES_PER_VALUE}); \
             discarded"
        ),
        Ok(_) => match serde_json::from_slice::<Value>(bytes) {
            Err(e) => format!("line {line}: not JSON: {e}"),
            Ok(v) if !v.is_object() => format!("line {line}: not a JSON object"),
            Ok(value) => {
                return Some(Input::Command {
                    line,
                    value,
                    len: bytes.len(),
                })
            }
        },
    };
    Some(Input::Unreadable { line, error })
}

/// Makes the allocator give large buffers (lines, payloads) back to the system when they are
/// freed. glibc raises its mmap threshold to the size of the largest block freed (up to
/// 32 MiB), after which such blocks come from its heaps and their pages stay with the process
/// (measured: 13 MB before large lines, 35 MB after one 32 MiB line, not released); a fixed
/// threshold keeps every block of 1 MiB or more mapped on its own.
fn large_blocks_are_returned() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes a tuning parameter; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// What the commands need besides the context.
struct State {
    /// Whether the DHT service runs (`--dht`): `put` and `get` need it.
    dht: bool,
    /// signId-to-boxId conversions, to check nodeInfos and circle keys.
    keys: KeyCache,
}

/// Why a command was refused: the field at fault (if one is) and what is wrong.
struct Fault {
    field: Option<String>,
    error: String,
}

impl Fault {
    /// `field` is at fault; the text starts with its name.
    fn field(field: impl Into<String>, why: impl std::fmt::Display) -> Fault {
        let field = field.into();
        Fault {
            error: format!("{field}: {why}"),
            field: Some(field),
        }
    }

    /// The command as a whole failed.
    fn other(error: impl Into<String>) -> Fault {
        Fault {
            field: None,
            error: error.into(),
        }
    }
}

/// The fields each command takes besides `cmd` and `id`.
fn fields_of(cmd: &str) -> Option<&'static [&'static str]> {
    Some(match cmd {
        "nodeInfo" => &["nodeInfo"],
        "friends" | "devices" => &["keys"],
        "send" => &["topic", "to", "payload", "realtime", "expireAfter"],
        "put" => &["key", "value"],
        "get" => &["key"],
        "connections" | "quit" => &[],
        _ => return None,
    })
}

/// A string field that must be present.
fn string<'a>(v: &'a Value, field: &str) -> Result<&'a str, Fault> {
    string_in(v, "", field)
}

/// [`string`] of an object inside the command, named `prefix` + `field` in errors.
fn string_in<'a>(v: &'a Value, prefix: &str, field: &str) -> Result<&'a str, Fault> {
    match v.get(field) {
        None => Err(Fault::field(format!("{prefix}{field}"), "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Fault::field(format!("{prefix}{field}"), "not a string")),
    }
}

/// Reports a local bus message the platform did not take.
fn queued(status: SendResult, what: &str) -> Result<(), Fault> {
    status.map_err(|e| Fault::other(format!("{what} not taken by the local bus: {e}")))
}

/// Checks and runs one command (a JSON object) on the reactor's thread.
fn command(ctx: &mut Context<'_>, state: &mut State, v: &Value) -> Result<(), Fault> {
    let name = match v.get("cmd") {
        None => return Err(Fault::field("cmd", "missing")),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(Fault::field("cmd", "not a string")),
    };
    let Some(fields) = fields_of(name) else {
        return Err(Fault::field(
            "cmd",
            format!(
                "unknown command {name:?} (nodeInfo, send, friends, devices, connections, put, \
                 get, quit)"
            ),
        ));
    };
    if let Some(obj) = v.as_object() {
        if let Some(other) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "cmd" | "id") && !fields.contains(&k.as_str()))
        {
            return Err(Fault::field(
                other.as_str(),
                format!(
                    "unknown field of {name} (it takes id, {})",
                    fields.join(", ")
                ),
            ));
        }
    }
    match name {
        "nodeInfo" => {
            let info = v
                .get("nodeInfo")
                .ok_or_else(|| Fault::field("nodeInfo", "missing"))?;
            check_node_info(info, &mut state.keys)?;
            queued(
                ctx.messaging().send("transports.nodeInfo", "local", info),
                "nodeInfo",
            )
        }
        "friends" | "devices" => {
            let keys = match v.get("keys") {
                None => return Err(Fault::field("keys", "missing")),
                Some(Value::Array(keys)) => keys,
                Some(_) => return Err(Fault::field("keys", "not an array of signIds")),
            };
            for (i, k) in keys.iter().enumerate() {
                let id = k.as_str().and_then(|s| s.parse::<SignId>().ok());
                if id.and_then(|id| state.keys.box_id(&id)).is_none() {
                    return Err(Fault::field(
                        format!("keys[{i}]"),
                        "not a signId (a base64 ed25519 public key)",
                    ));
                }
            }
            queued(
                ctx.messaging()
                    .send(&format!("{name}.update"), "local", keys),
                name,
            )
        }
        "quit" => {
            ctx.shutdown();
            Ok(())
        }
        "send" => send(ctx, v),
        "put" | "get" if !state.dht => Err(Fault::field(
            "cmd",
            format!("{name} needs the DHT: start the node with --dht"),
        )),
        "put" => {
            let key = string(v, "key")?;
            let value = v
                .get("value")
                .ok_or_else(|| Fault::field("value", "missing"))?;
            queued(
                ctx.messaging()
                    .send("dht.put", "local", &json!({"key": key, "value": value})),
                "put",
            )
        }
        "get" => {
            let key = string(v, "key")?;
            queued(ctx.messaging().send("dht.get", "local", &key), "get")
        }
        "connections" => {
            let list: Vec<Value> = ctx
                .connections()
                .iter()
                .map(|c| {
                    json!({"peer": c.peer.map(|p| p.to_string()),
                        "path": if c.relayed { "relayed" } else { "direct" },
                        "remote": c.remote.map(|r| r.to_string()),
                        "family": c.remote.map(|r| if r.is_ipv4() { "ipv4" } else { "ipv6" }),
                        "rttUs": c.rtt.map(|r| r.as_micros() as u64),
                        "active": c.active})
                })
                .collect();
            let mapping = ctx.port_mapping();
            let relay = ctx.relay().map(|r| {
                json!({"signId": r.sign_id.to_string(), "address": r.addr.to_string(),
                    "rttUs": r.rtt.map(|t| t.as_micros() as u64)})
            });
            let mut out = json!({"event": "connections", "list": list, "relay": relay,
            "mappedTcpPort": ctx.tcp_port_mapping().map(|m| m.external_port),
            "mappedPort": mapping.map(|m| m.external_port),
            "mappedBy": mapping.map(|m| match m.protocol {
                PortMapProtocol::Pcp => "pcp",
                PortMapProtocol::NatPmp => "natpmp",
                PortMapProtocol::UpnpIgd => "upnp",
            })});
            if let Some(id) = v.get("id") {
                out["id"] = id.clone();
            }
            emit(out);
            Ok(())
        }
        _ => unreachable!("fields_of knows {name}"),
    }
}

/// Checks a nodeInfo as the platform will ([`NodeInfo::from_json`]), naming the field at
/// fault; endpoints the platform does not know are skipped there, not refused.
fn check_node_info(info: &Value, keys: &mut KeyCache) -> Result<(), Fault> {
    if !info.is_object() {
        return Err(Fault::field("nodeInfo", "not an object"));
    }
    let sign_id: SignId = string_in(info, "nodeInfo.", "signId")?
        .parse()
        .map_err(|_| Fault::field("nodeInfo.signId", "not a base64 ed25519 public key"))?;
    let box_id: BoxId = string_in(info, "nodeInfo.", "boxId")?
        .parse()
        .map_err(|_| Fault::field("nodeInfo.boxId", "not a base64 curve25519 public key"))?;
    if info.get("connectionInfo").is_some_and(|c| !c.is_array()) {
        return Err(Fault::field("nodeInfo.connectionInfo", "not an array"));
    }
    match NodeInfo::from_json(info, keys) {
        Ok(_) => Ok(()),
        Err(NodeInfoError::KeyMismatch) => Err(Fault::field(
            "nodeInfo.boxId",
            format!("{box_id} is not the conversion of signId {sign_id}"),
        )),
        Err(e) => Err(Fault::field("nodeInfo.signId", e)),
    }
}

/// `send`: checks the fields, sends, and reports the outcome (`sent` events for a send with an
/// id; a refusal of one without an id as an error).
fn send(ctx: &mut Context<'_>, v: &Value) -> Result<(), Fault> {
    let id = v.get("id").cloned();
    let topic = string(v, "topic")?;
    let to = string(v, "to")?;
    if to.to_address().is_none() {
        return Err(Fault::field(
            "to",
            format!("{to:?} is not \"local\", a signId or a boxId"),
        ));
    }
    let realtime = match v.get("realtime") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Fault::field("realtime", "not true or false")),
    };
    let expire_after = match v.get("expireAfter") {
        None => None,
        Some(ms) => Some(Duration::from_millis(ms.as_u64().ok_or_else(|| {
            Fault::field("expireAfter", "not a non-negative integer (milliseconds)")
        })?)),
    };
    let payload = serde_json::to_vec(v.get("payload").unwrap_or(&Value::Null))
        .map_err(|e| Fault::field("payload", e))?;
    let options = SendOptions {
        realtime,
        expire_after,
    };
    let cb_id = id.clone();
    let status = ctx.send_with_callback("ms", topic, to, payload, options, move |_ctx, r| {
        if let Some(id) = cb_id {
            match r {
                Ok(()) => emit(json!({"event": "sent", "id": id, "ok": true})),
                Err(e) => {
                    emit(json!({"event": "sent", "id": id, "ok": false, "error": e.to_string()}))
                }
            }
        }
    });
    match (status, id) {
        (Ok(()), _) => Ok(()),
        (Err(e), Some(id)) => {
            emit(json!({"event": "sent", "id": id, "ok": false, "error": e.to_string()}));
            Ok(())
        }
        (Err(e), None) => Err(Fault::other(format!("send refused: {e}"))),
    }
}
