//! Relays found through the Kademlia DHT and chosen by RTT, in the NAT lab of `tests/nat.rs`
//! (network namespaces of this test, documentation addresses only; `tests/support/nat.rs`):
//!
//! ```text
//!   ha 192.0.2.2 ── ra (NAT) 203.0.113.2 ─┐                 ┌─ r1 203.0.113.10
//!                                          ├── br0 in "pub" ─┤
//!   hb 198.51.100.2 ── rb (NAT) 203.0.113.3┘                 └─ r2 203.0.113.11
//! ```
//!
//! - No relay handed to anyone: S (r1) is a plain DHT node, the only one the others know; R
//!   (r2) offers relaying and announces itself in the DHT. B, behind a random-port NAT, finds
//!   R there, reserves at it and publishes the relayed endpoint; A, behind the other NAT,
//!   finds B's nodeInfo through the DHT and reaches B through R. R's relay record is in the
//!   DHT. B restarted with neither a DHT nor a bootstrap list takes R back from its storage.
//! - Two relays, the one listed first behind a forwarder that delays each datagram by 40 ms
//!   (`tests/support/udp_delay.py`): B measures both and reserves at the other; the relayed
//!   endpoint works.

mod support;

use std::time::Duration;

use serde_json::{json, Value};

use mm_platform::proto::kademlia::state::{relay_key, relay_slot};
use mm_platform::SignId;
use support::nat::{bootstrap, deliver, node, ready_info, relayed_via, wait_relayed, Nat, LIMIT};
use support::{JsonProc, TempDir};

#[test]
fn a_node_behind_a_nat_finds_a_relay_in_the_dht_and_keeps_it_across_restarts() {
    let Some(nat) = Nat::build("relay_dht: found in the DHT", true) else {
        return;
    };
    let dir = TempDir::new("relay-dht");
    let s = node(&nat.r1, &dir, "s", "203.0.113.10:4000", &["--dht"]);
    let boot = bootstrap(&dir, &[ready_info(&s)]);
    let mut r = node(
        &nat.r2,
        &dir,
        "r",
        "203.0.113.11:4000",
        &["--relay", "--dht", "--bootstrap", &boot],
    );
    let r_sign = ready_info(&r)["signId"].as_str().unwrap().to_owned();
    // R announces itself once joined (through S).
    let key = relay_key(relay_slot(&r_sign.parse::<SignId>().unwrap()));
    r.wait_for(LIMIT, |v| v["event"] == "peer");
    let dht = ["--dht", "--bootstrap", boot.as_str()];
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &dht);
    let b_info = wait_relayed(&mut b, "203.0.113.11:4000");
    let b_id = b_info["signId"].clone();
    b.cmd(json!({"cmd": "connections"}));
    let relay = b.wait_for(LIMIT, |v| v["event"] == "connections")["relay"].clone();
    assert_eq!(relay["signId"], r_sign.as_str(), "{relay}");
    assert_eq!(relay["address"], "203.0.113.11:4000", "{relay}");

    // A finds B through the DHT alone (no nodeInfo given) and reaches it through R.
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &dht);
    // (A get before A has joined finds nothing: asked again, at most 20 times.)
    let mut got = Value::Null;
    for _ in 0..20 {
        a.seen.retain(|v| v["event"] != "value");
        a.cmd(json!({"cmd": "get", "key": key}));
        got = a.wait_for(LIMIT, |v| v["event"] == "value" && v["key"] == key.as_str());
        if got.get("value").is_some() {
            break;
        }
        a.collect_for(Duration::from_millis(500));
    }
    assert_eq!(got["value"]["signId"], r_sign.as_str(), "{got}");
    a.cmd(json!({"cmd": "send", "topic": "dht.ab", "to": b_id, "payload": 1}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.dht.ab"
    });
    let path = a.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == b_id);
    assert_eq!(path["path"], "relayed", "{path}");
    assert_eq!(path["remote"], "203.0.113.11:4000", "{path}");

    // B restarted with no DHT and no bootstrap list: its choice of relay is kept.
    b.quit(Duration::from_secs(5));
    a.wait_for(LIMIT, |v| v["event"] == "disconnected" && v["peer"] == b_id);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &[]);
    let b_info2 = wait_relayed(&mut b, "203.0.113.11:4000");
    assert_eq!(b_info2["signId"], b_id);
    let path = deliver(&mut a, &mut b, &b_info2, "dht.again");
    assert_eq!(path["path"], "relayed", "{path}");
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
    r.quit(Duration::from_secs(5));
    s.quit(Duration::from_secs(5));
}

/// Runs `tests/support/udp_delay.py` in `ns`: UDP to `listen` is forwarded to `target` and
/// back, each datagram `delay_ms` late.
fn delay_forwarder(ns: &support::Netns, listen: &str, target: &str, delay_ms: u32) -> JsonProc {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/udp_delay.py");
    let mut cmd = ns.command("python3");
    cmd.args([script, listen, target, &delay_ms.to_string()]);
    let mut p = JsonProc::spawn("udp_delay", &mut cmd);
    p.wait_for(LIMIT, |v| v["event"] == "ready");
    p
}

#[test]
fn of_two_relays_the_one_with_the_smaller_rtt_is_chosen() {
    let Some(nat) = Nat::build("relay_dht: ranked by RTT", true) else {
        return;
    };
    let dir = TempDir::new("relay-rtt");
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let r2 = node(&nat.r2, &dir, "r2", "203.0.113.11:4000", &["--relay"]);
    // R1 as B knows it: behind a forwarder on its host that delays every datagram by 40 ms.
    let _slow = delay_forwarder(&nat.r1, "203.0.113.10:4100", "203.0.113.10:4000", 40);
    let mut r1_info: Value = ready_info(&r1);
    r1_info["connectionInfo"][0]["transportInfo"]["port"] = json!(4100);
    // Listed first: without measuring, B would take it.
    let boot = bootstrap(&dir, &[r1_info, ready_info(&r2)]);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let b_info = wait_relayed(&mut b, "203.0.113.11:4000");
    b.cmd(json!({"cmd": "connections"}));
    let relay = b.wait_for(LIMIT, |v| v["event"] == "connections")["relay"].clone();
    assert_eq!(relay["address"], "203.0.113.11:4000", "{relay}");
    assert!(relay["rttUs"].as_u64().is_some(), "measured: {relay}");
    assert!(
        !b.seen.iter().any(|v| v["event"] == "nodeInfo"
            && relayed_via(&v["nodeInfo"]).as_deref() == Some("203.0.113.10:4100")),
        "B never published the slow relay"
    );
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let path = deliver(&mut a, &mut b, &b_info, "rtt.ab");
    assert_eq!(path["remote"], "203.0.113.11:4000", "{path}");
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
    r1.quit(Duration::from_secs(5));
    r2.quit(Duration::from_secs(5));
}
