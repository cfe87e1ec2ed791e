//! Nodes behind real NATs built in network namespaces of this test (removed when it ends, pass
//! or fail; addresses from the documentation ranges only, nothing routed off the machine):
//!
//! ```text
//!   ha 192.0.2.2 ── ra (NAT) 203.0.113.2 ─┐                 ┌─ r1 203.0.113.10 (relay)
//!                                          ├── br0 in "pub" ─┤
//!   hb 198.51.100.2 ── rb (NAT) 203.0.113.3┘                 └─ r2 203.0.113.11 (relay)
//! ```
//!
//! The routers masquerade (port-preserving, or `masquerade random`: a fresh port per
//! destination) and drop new inbound flows before conntrack confirms them (prerouting filter
//! at priority -150, `iifname "wan0" ct state new drop`), like a home router. The lab itself
//! is `tests/support/nat.rs` (shared with `benches/nat.rs`, which measures these paths).
//!
//! - Port-preserving NATs, knowing only a public relay: A's first message reaches B through the
//!   relay, the connection moves to a punched direct path within seconds, and 10,000 messages
//!   sent across the move arrive exactly once and in order.
//! - Dial-back: a public node bound to 0.0.0.0 publishes its public address, a node behind a
//!   NAT is found unreachable and takes a relay, a node behind a port forward publishes the
//!   forwarded endpoint and takes none; A reaches both published endpoints directly.
//! - Random-port NATs: the punch fails, messages go through the relay both ways, and the
//!   relay's memory and output never hold the plaintext marker; the relay going away makes both
//!   nodes move to the second relay, through which they talk again.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::nat::{
    bootstrap, count_messages, memory_contains, node, ready_info, relayed_via, udp_endpoints,
    wait_relayed, Nat, LIMIT,
};
use support::TempDir;

#[test]
fn port_preserving_nats_relay_first_then_punch_a_direct_path_losing_nothing() {
    let Some(nat) = Nat::build("nat: port-preserving", false) else {
        return;
    };
    let dir = TempDir::new("nat-pp");
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let a_info = wait_relayed(&mut a, "203.0.113.10:4000");
    let b_info = wait_relayed(&mut b, "203.0.113.10:4000");
    // Behind a NAT a node publishes only the relayed endpoint.
    assert_eq!(b_info["connectionInfo"].as_array().unwrap().len(), 1);
    let b_id = b_info["signId"].clone();
    let a_id = a_info["signId"].clone();
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));

    // The first message goes through the relay.
    a.cmd(json!({"cmd": "send", "topic": "nat.first", "to": b_id, "payload": {"n": -1}}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.nat.first"
    });
    let p = a.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == b_id);
    assert_eq!(p["path"], "relayed", "{p}");
    assert_eq!(p["remote"], "203.0.113.10:4000");

    // 10,000 messages, paced over about 2 s while the path moves.
    let n = 10_000;
    for i in 0..n {
        a.cmd(json!({"cmd": "send", "topic": "nat.seq", "to": b_id, "payload": {"n": i}}));
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let direct = a.wait_for(LIMIT, |v| {
        v["event"] == "path" && v["peer"] == b_id && v["path"] == "direct"
    });
    assert_eq!(direct["remote"], "203.0.113.3:4000", "{direct}");
    let end = Instant::now() + Duration::from_secs(60);
    while count_messages(&b, "public.nat.seq") < n && Instant::now() < end {
        b.collect_for(Duration::from_millis(200));
    }
    let got: Vec<i64> = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["topic"] == "public.nat.seq")
        .map(|v| v["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(got.len(), n, "every message exactly once");
    assert!(
        got.iter().enumerate().all(|(i, &x)| x == i as i64),
        "in order"
    );
    // B's side followed the move, and the move happened while the messages flowed.
    let moved = b
        .seen
        .iter()
        .position(|v| v["event"] == "path" && v["peer"] == a_id && v["path"] == "direct")
        .expect("B saw the direct path");
    let before = b.seen[..moved]
        .iter()
        .filter(|v| v["event"] == "message" && v["topic"] == "public.nat.seq")
        .count();
    assert!(
        before < n,
        "the switch came before the last message ({before} before it)"
    );
    b.cmd(json!({"cmd": "connections"}));
    let list = b.wait_for(LIMIT, |v| v["event"] == "connections")["list"].clone();
    let to_a = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["peer"] == a_id && c["active"] == true)
        .expect("connection to A listed")
        .clone();
    assert_eq!(to_a["path"], "direct", "{list}");
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
    r1.quit(Duration::from_secs(5));
}

#[test]
fn random_port_nats_stay_relayed_both_ways_relay_sees_no_plaintext_and_is_replaced() {
    let Some(nat) = Nat::build("nat: random ports", true) else {
        return;
    };
    let dir = TempDir::new("nat-rand");
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let r2 = node(&nat.r2, &dir, "r2", "203.0.113.11:4000", &["--relay"]);
    let boot = bootstrap(&dir, &[ready_info(&r1), ready_info(&r2)]);
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);
    // Both pick a relay (the first candidate that answers: r1 or r2).
    let pick = |v: &Value| v["event"] == "nodeInfo" && relayed_via(&v["nodeInfo"]).is_some();
    let a_info = a.wait_for(LIMIT, pick)["nodeInfo"].clone();
    let b_info = b.wait_for(LIMIT, pick)["nodeInfo"].clone();
    let (a_id, b_id) = (a_info["signId"].clone(), b_info["signId"].clone());
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    b.cmd(json!({"cmd": "nodeInfo", "nodeInfo": a_info}));

    let marker = "PLAINTEXT-MARKER-5b1e0c7d";
    a.cmd(json!({"cmd": "send", "topic": "nat.ab", "to": b_id, "payload": {"m": marker}}));
    let got = b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.nat.ab"
    });
    assert_eq!(got["payload"]["m"], marker);
    b.cmd(json!({"cmd": "send", "topic": "nat.ba", "to": a_id, "payload": {"m": marker}}));
    a.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.nat.ba"
    });
    // The punch (about 4 s of probes) cannot work: the path stays relayed, no retry storm.
    a.collect_for(Duration::from_secs(6));
    assert!(
        !a.seen
            .iter()
            .any(|v| v["event"] == "path" && v["peer"] == b_id && v["path"] == "direct"),
        "random-port NATs cannot be punched"
    );
    a.cmd(json!({"cmd": "connections"}));
    let list = a.wait_for(LIMIT, |v| v["event"] == "connections")["list"].clone();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|c| c["peer"] == b_id && c["path"] == "relayed"),
        "{list}"
    );
    for _ in 0..20 {
        a.cmd(json!({"cmd": "send", "topic": "nat.more", "to": b_id, "payload": {"m": marker}}));
    }
    let end = Instant::now() + LIMIT;
    while count_messages(&b, "public.nat.more") < 20 && Instant::now() < end {
        b.collect_for(Duration::from_millis(200));
    }
    assert_eq!(count_messages(&b, "public.nat.more"), 20);
    // Neither relay holds the marker in memory or prints it.
    for r in [&r1, &r2] {
        assert!(
            !memory_contains(r.proc.id(), marker.as_bytes()),
            "{} holds plaintext",
            r.proc.name
        );
        assert!(!r.seen.iter().any(|v| v.to_string().contains(marker)));
    }
    // The control: A's own memory does hold it (so the scan can find it).
    assert!(memory_contains(a.proc.id(), marker.as_bytes()));

    // The relay B uses goes away: B (and A, if it used it) move to the other one, and they
    // talk again through it.
    let b_relay = relayed_via(&b_info).unwrap();
    let (gone, other) = if b_relay == "203.0.113.10:4000" {
        (r1, "203.0.113.11:4000")
    } else {
        (r2, "203.0.113.10:4000")
    };
    drop(gone);
    let b_info2 = wait_relayed(&mut b, other);
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info2}));
    // A message written on A's old connection before A finds it dead fails with
    // "connection lost" (real-time messages are not retried): A sends again then, at most 5
    // times.
    for id in 0..5 {
        a.cmd(
            json!({"cmd": "send", "id": id, "topic": "nat.after", "to": b_id, "payload": {"m": 1}}),
        );
        let sent = a.wait_for(Duration::from_secs(60), |v| {
            v["event"] == "sent" && v["id"] == id
        });
        if sent["ok"] == true {
            break;
        }
        eprintln!("nat.after: attempt {id} failed: {sent}");
    }
    b.wait_for(Duration::from_secs(60), |v| {
        v["event"] == "message" && v["topic"] == "public.nat.after"
    });
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
}

/// The UDP endpoints (`ip:port`) of a nodeInfo.
#[test]
fn dial_back_finds_public_natted_and_port_forwarded_nodes() {
    // B's router forwards UDP 4000 to B; A's does not.
    let Some(nat) = Nat::build_with("nat: dial-back", false, Some(4000)) else {
        return;
    };
    let dir = TempDir::new("nat-dialback");
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    // P: a public host (r2's namespace) bound to 0.0.0.0, which publishes no UDP endpoint
    // until a dial-back tells it its address.
    let mut p = node(&nat.r2, &dir, "p", "0.0.0.0:4000", &["--bootstrap", &boot]);
    assert!(udp_endpoints(&ready_info(&p)).is_empty());
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);

    let published = |want: &'static str| {
        move |v: &Value| v["event"] == "nodeInfo" && udp_endpoints(&v["nodeInfo"]) == [want]
    };
    let p_info = p.wait_for(LIMIT, published("203.0.113.11:4000"))["nodeInfo"].clone();
    let b_info = b.wait_for(LIMIT, published("203.0.113.3:4000"))["nodeInfo"].clone();
    // A, behind a NAT that drops new inbound flows, is found unreachable and takes the relay.
    let a_info = wait_relayed(&mut a, "203.0.113.10:4000");
    assert!(udp_endpoints(&a_info).is_empty(), "{a_info}");
    // Neither reachable node takes a relay (give one time to show up).
    p.collect_for(Duration::from_secs(2));
    b.collect_for(Duration::from_millis(100));
    for (x, info) in [(&p, &p_info), (&b, &b_info)] {
        assert!(relayed_via(info).is_none(), "{info}");
        assert!(
            !x.seen
                .iter()
                .any(|v| v["event"] == "nodeInfo" && relayed_via(&v["nodeInfo"]).is_some()),
            "{} took a relay",
            x.proc.name
        );
    }
    // The published endpoints work: A reaches P and B directly through them.
    let (p_id, b_id) = (p_info["signId"].clone(), b_info["signId"].clone());
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": p_info}));
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    a.cmd(json!({"cmd": "send", "topic": "nat.p", "to": p_id, "payload": 1}));
    a.cmd(json!({"cmd": "send", "topic": "nat.b", "to": b_id, "payload": 2}));
    p.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.nat.p"
    });
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.nat.b"
    });
    for (id, remote) in [(&p_id, "203.0.113.11:4000"), (&b_id, "203.0.113.3:4000")] {
        let path = a.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == *id);
        assert_eq!(path["path"], "direct", "{path}");
        assert_eq!(path["remote"], remote, "{path}");
    }
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
    p.quit(Duration::from_secs(5));
    r1.quit(Duration::from_secs(5));
}
