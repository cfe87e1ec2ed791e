//! The Mainline DHT service against another implementation: a testnet of 20 `bittorrent-dht`
//! 11.0.9 nodes on 127.0.0.1 (`tests/js/mainline_testnet.js`, no public bootstrap routers), and
//! `examples/node.rs` nodes given only testnet addresses (`--mainline`):
//!
//! - a Rust node publishes its nodeInfo (`--mainline-publish`); a JS client of the testnet
//!   reads the item and verifies its signature with tweetnacl, and it is that node's nodeInfo;
//! - another Rust node that knows only the testnet resolves it (a `peer` event with source
//!   `mainline`) and delivers a message to it;
//! - the reverse: an item a JS client puts (a nodeInfo signed with its own key) is resolved
//!   and checked by a Rust node; one whose nodeInfo names another key is never reported;
//! - the testnet never crashed on our packets.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{js_dir, node_bin, JsonProc, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

fn testnet(js: &std::path::Path) -> (JsonProc, Vec<String>) {
    let mut cmd = std::process::Command::new("node");
    cmd.arg(js.join("mainline_testnet.js"))
        .args(["--nodes", "20"])
        .current_dir(js)
        .stderr(std::process::Stdio::inherit());
    let mut net = JsonProc::spawn("mainline_testnet.js", &mut cmd);
    let ready = net.wait_for(LIMIT, |v| v["js"] == "ready");
    let nodes: Vec<String> = ready["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| format!("{}:{}", n["host"].as_str().unwrap(), n["port"]))
        .collect();
    assert_eq!(nodes.len(), 20);
    assert!(nodes.iter().all(|n| n.starts_with("127.0.0.1:")));
    (net, nodes)
}

fn start_node(dir: &TempDir, name: &str, bootstrap: &[String], publish: bool) -> (JsonProc, Value) {
    let mut cmd = std::process::Command::new(node_bin());
    cmd.arg("--data")
        .arg(dir.path(name))
        .arg("--mainline")
        .arg(bootstrap.join(","))
        .stderr(std::process::Stdio::null());
    if publish {
        cmd.arg("--mainline-publish");
    }
    let mut p = JsonProc::spawn(name, &mut cmd);
    let info = p.wait_for(LIMIT, |v| v["event"] == "ready")["nodeInfo"].clone();
    (p, info)
}

/// Asks the testnet for `sign_id`'s item until it is found (at most `limit`).
fn js_get(net: &mut JsonProc, sign_id: &str, limit: Duration) -> Value {
    let end = Instant::now() + limit;
    let mut n = 0;
    loop {
        n += 1;
        net.cmd(json!({"cmd": "get", "id": n, "signId": sign_id}));
        let got = net.wait_for(LIMIT, |v| v["js"] == "got" && v["id"] == n);
        if got["found"] == true {
            return got;
        }
        assert!(Instant::now() < end, "the item of {sign_id} never appeared");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn rust_and_bittorrent_dht_publish_and_resolve_each_others_nodeinfo() {
    let Some(js) = js_dir("mainline interop with bittorrent-dht 11") else {
        return;
    };
    let (mut net, nodes) = testnet(&js);
    let dir = TempDir::new("mainline-js");

    // A Rust node publishes; a JS client reads and verifies the item.
    let (mut a, a_info) = start_node(&dir, "a", &nodes[..2], true);
    let a_id = a_info["signId"].as_str().unwrap().to_owned();
    let got = js_get(&mut net, &a_id, LIMIT);
    assert_eq!(got["verified"], true, "{got}");
    assert!(
        got["seq"].as_i64().unwrap() > 1_600_000_000,
        "time-based seq: {got}"
    );
    let published: Value = serde_json::from_str(got["value"].as_str().unwrap()).unwrap();
    assert_eq!(published["signId"], a_info["signId"]);
    assert_eq!(published["boxId"], a_info["boxId"]);
    assert_eq!(published["connectionInfo"], a_info["connectionInfo"]);

    // Another Rust node that knows only the testnet finds it and delivers a message.
    let (mut b, _) = start_node(&dir, "b", &nodes[10..11], false);
    b.cmd(
        json!({"cmd": "send", "id": 1, "topic": "test.hello", "to": a_id,
        "payload": {"via": "mainline"}}),
    );
    let peer = b.wait_for(LIMIT, |v| {
        v["event"] == "peer" && v["nodeInfo"]["signId"] == a_id
    });
    assert_eq!(peer["source"], "mainline");
    assert_eq!(peer["nodeInfo"], published);
    let msg = a.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.test.hello"
    });
    assert_eq!(msg["payload"], json!({"via": "mainline"}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "sent" && v["id"] == 1 && v["ok"] == true
    });

    // The reverse: a JS client's item, resolved and checked by the Rust node.
    let ci = json!([{"transportType": "udp",
        "transportInfo": {"address": "127.0.0.1", "port": 9, "framing": "native"}}]);
    net.cmd(json!({"cmd": "put", "id": 100, "connectionInfo": ci, "seq": 7}));
    let put = net.wait_for(LIMIT, |v| {
        v["id"] == 100 && (v["js"] == "put" || v["js"] == "error")
    });
    assert_eq!(put["ok"], true, "{put}");
    assert!(put["nodes"].as_u64().unwrap() >= 1);
    let js_id = put["signId"].as_str().unwrap().to_owned();
    // A forged one: signed by one key, naming another.
    net.cmd(json!({"cmd": "put", "id": 101, "connectionInfo": ci, "forge": true}));
    let forged = net.wait_for(LIMIT, |v| v["id"] == 101 && v["js"] == "put");
    let forged_key = forged["signId"].as_str().unwrap().to_owned();
    assert_ne!(forged["nodeInfo"]["signId"], forged["signId"]);
    for (id, to) in [(2, &forged_key), (3, &js_id)] {
        b.cmd(
            json!({"cmd": "send", "id": id, "topic": "test.js", "to": to,
            "payload": 1, "realtime": false}),
        );
    }
    let peer = b.wait_for(LIMIT, |v| {
        v["event"] == "peer" && v["nodeInfo"]["signId"] == js_id
    });
    assert_eq!(peer["source"], "mainline");
    assert_eq!(peer["nodeInfo"], put["nodeInfo"]);
    // By now the forged lookup ran as long as the genuine one; wait a little more anyway.
    b.collect_for(Duration::from_secs(3));
    for v in &b.seen {
        if v["event"] == "peer" {
            let id = &v["nodeInfo"]["signId"];
            assert!(
                id == &json!(a_id) || id == &json!(js_id),
                "unexpected peer {v}"
            );
        }
    }

    // The testnet survived our packets.
    assert!(net.seen.iter().all(|v| v["js"] != "fatal"));
    net.cmd(json!({"cmd": "get", "id": 999, "signId": a_id}));
    net.wait_for(LIMIT, |v| v["js"] == "got" && v["id"] == 999);
    a.quit(LIMIT);
    b.quit(LIMIT);
}
