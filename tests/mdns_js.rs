//! mDNS interoperability with the original: a JS process running the genuine
//! `mm-services-mdns` 0.6.8 from `tests/js/node_modules` (with the stand-in for the platform's
//! messaging object in `tests/js/mdns_peer.js`) and `examples/node.rs` nodes started with
//! `--mdns` find each other's nodeInfo, both ways, inside a private network namespace:
//!
//! - a Rust node already running hears the JS node's announcement, and the JS node gets the
//!   Rust node's answer to its queries (our raw-JSON TXT record, which it `JSON.parse`s);
//! - a Rust node started later gets the JS node's answer to its queries, and the JS node
//!   hears its announcement;
//! - the JS node is still alive at the end (our packets never made it throw).

mod support;

use std::time::Duration;

use serde_json::Value;

use support::{js_dir, start_mdns_node, JsonProc, Netns, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

fn js_found<'a>(id: &'a Value, topic: &'static str) -> impl Fn(&Value) -> bool + 'a {
    move |v: &Value| {
        v["js"] == "send"
            && v["topic"] == topic
            && v["destination"] == "local"
            && v["payload"]["signId"] == *id
    }
}

#[test]
fn the_original_mdns_service_and_rust_nodes_find_each_other_both_ways() {
    let Some(js) = js_dir("mdns interop with mm-services-mdns 0.6.8") else {
        return;
    };
    let Some(ns) = Netns::create("mdns interop with mm-services-mdns 0.6.8") else {
        return;
    };
    let dir = TempDir::new("mdns-js");
    let (mut early, early_info) = start_mdns_node(&ns, &dir, "early");
    let early_id = early_info["signId"].clone();

    let mut cmd = ns.command("node");
    cmd.arg(js.join("mdns_peer.js"))
        .current_dir(&js)
        .env("MM_JS_LIFETIME_MS", "90000")
        .stderr(std::process::Stdio::inherit());
    let mut peer = JsonProc::spawn("mdns_peer.js", &mut cmd);
    let js_info = peer.wait_for(LIMIT, |v| v["js"] == "ready")["nodeInfo"].clone();
    let js_id = js_info["signId"].clone();

    // The JS node's announcement reaches the Rust node, which checks and publishes it.
    let found = early.wait_for(LIMIT, |v| {
        v["event"] == "peer" && v["nodeInfo"]["signId"] == js_id
    });
    assert_eq!(found["source"], "mdns");
    assert_eq!(found["nodeInfo"], js_info);
    // The Rust node's answer reaches the JS node, which publishes it both ways, as it does.
    let got = peer.wait_for(LIMIT, js_found(&early_id, "transports.nodeInfo"));
    assert_eq!(got["payload"], early_info);
    peer.wait_for(LIMIT, js_found(&early_id, "transports.nodeInfoBootstrap"));

    // A Rust node started later: its queries are answered by the JS node, and the JS node
    // hears its announcement.
    let (mut late, late_info) = start_mdns_node(&ns, &dir, "late");
    let late_id = late_info["signId"].clone();
    let found = late.wait_for(LIMIT, |v| {
        v["event"] == "peer" && v["nodeInfo"]["signId"] == js_id
    });
    assert_eq!(found["nodeInfo"], js_info);
    peer.wait_for(LIMIT, js_found(&late_id, "transports.nodeInfo"));

    // The JS node never received anything that made it throw.
    let alive = peer.proc.child.as_mut().unwrap().try_wait().unwrap();
    assert!(alive.is_none(), "the JS node died: {alive:?}");
    // It never reported its own nodeInfo, nor any nodeInfo that is not one of ours.
    for v in peer.seen.iter().filter(|v| v["js"] == "send") {
        let id = &v["payload"]["signId"];
        assert!(id == &early_id || id == &late_id, "unexpected {v}");
    }
    for p in [early, late] {
        p.quit(LIMIT);
    }
}
