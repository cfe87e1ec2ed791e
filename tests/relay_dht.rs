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
//! - Through the Mainline DHT (a libtorrent testnet on R1's address, `tests/libtorrent_testnet.py`)
//!   and with routed IPv6 (`Nat::build_ipv6`): B is dual-stack and knows only a dual-stack
//!   public peer, to which it talks over IPv6, so it never hears anything of its IPv4 side;
//!   having settled its IPv6 side it searches the DHT for a relay, gets R's bare address
//!   (R announced itself there), asks it who it is, and by it learns it is behind a NAT over
//!   IPv4: it reserves at R and an IPv4-only peer reaches it through R.

mod support;

use std::time::Duration;

use serde_json::{json, Value};

use mm_platform::proto::kademlia::state::{relay_key, relay_slot};
use mm_platform::SignId;
use support::nat::{bootstrap, deliver, node, ready_info, relayed_via, wait_relayed, Nat, LIMIT};
use support::{libtorrent_available, JsonProc, TempDir, PYTHON};

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

#[test]
fn a_dual_stack_node_finds_a_relay_in_the_mainline_dht_for_its_ipv4_side() {
    let test = "relay_dht: Mainline, IPv4 side of a dual-stack node";
    if !libtorrent_available(test) {
        return;
    }
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    let dir = TempDir::new("relay-mainline");
    // The DHT: libtorrent sessions on R1's public address.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libtorrent_testnet.py");
    let mut cmd = nat.r1.command(PYTHON);
    cmd.args([script, "6", "203.0.113.10"]);
    let mut lt = JsonProc::spawn("libtorrent_testnet.py", &mut cmd);
    let ready = lt.wait_for(LIMIT, |v| v["lt"] == "ready");
    let boot: Vec<&str> = ready["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let boot = boot.join(",");
    // R offers relaying on R2 and announces itself in the DHT.
    let mut r = node(
        &nat.r2,
        &dir,
        "r",
        "203.0.113.11:4000",
        &["--relay", "--mainline", &boot, "--mainline-publish"],
    );
    let r_sign = ready_info(&r)["signId"].clone();
    // P: a plain dual-stack public node on R1 (not a relay), listed at both addresses.
    let mut p = node(&nat.r1, &dir, "p", "[::]:4001", &[]);
    let mut p_info = ready_info(&p);
    p_info["connectionInfo"] = json!([
        {"transportType": "udp6", "transportInfo": {"address": "2001:db8::10", "port": 4001,
            "framing": "native"}},
        {"transportType": "udp", "transportInfo": {"address": "203.0.113.10", "port": 4001,
            "framing": "native"}},
    ]);
    let boot_p = bootstrap(&dir, &[p_info]);
    // Give R's announcement a moment to land (R polls its DHT from start).
    r.collect_for(Duration::from_secs(2));
    // B: dual-stack behind a random-port IPv4 NAT, knowing P and the DHT only.
    let mut b = node(
        &nat.hb,
        &dir,
        "b",
        "[::]:4000",
        &["--bootstrap", &boot_p, "--mainline", &boot, "--no-portmap"],
    );
    // B talks to P (over IPv6: Happy Eyeballs).
    let p_sign = ready_info(&p)["signId"].clone();
    b.cmd(json!({"cmd": "send", "topic": "mainline.bp", "to": p_sign, "payload": 1}));
    let b_info = wait_relayed(&mut b, "203.0.113.11:4000");
    b.cmd(json!({"cmd": "connections"}));
    let relay = b.wait_for(LIMIT, |v| v["event"] == "connections")["relay"].clone();
    assert_eq!(relay["signId"], r_sign, "{relay}");
    // Its connection to P went over IPv6 (nothing there told it of its IPv4 side).
    let p_path = b
        .seen
        .iter()
        .find(|v| v["event"] == "path" && v["remote"].as_str().is_some_and(|a| a.contains("4001")))
        .cloned();
    assert!(
        p_path
            .as_ref()
            .is_some_and(|v| v["remote"] == "[2001:db8::10]:4001"),
        "{p_path:?}"
    );
    p.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.mainline.bp"
    });
    // An IPv4-only peer behind the other NAT reaches B through R.
    let mut a = node(
        &nat.ha,
        &dir,
        "a",
        "0.0.0.0:4000",
        &["--no-ipv6", "--no-portmap"],
    );
    let path = deliver(&mut a, &mut b, &b_info, "mainline.ab");
    assert_eq!(path["remote"], "203.0.113.11:4000", "{path}");
    for x in [a, b, r, p] {
        x.quit(Duration::from_secs(5));
    }
    lt.quit(LIMIT);
}
