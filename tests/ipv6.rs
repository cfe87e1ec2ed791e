//! IPv6 beside IPv4 NATs, in the NAT lab of `tests/support/nat.rs` built with routed IPv6
//! (network namespaces of this test, documentation addresses 2001:db8::/32 and the IPv4 ones;
//! nothing leaves the machine):
//!
//! ```text
//!   ha 192.0.2.2, 2001:db8:a::2 ── ra (random-port NAT; routes IPv6) ─┐     ┌─ r1 203.0.113.10
//!                                                                    ├ br0 ┤   (relay, IPv4)
//!   hb 198.51.100.2, 2001:db8:b::2 ── rb (random-port NAT; routes IPv6)┘     └─ r2 203.0.113.11
//! ```
//!
//! Behind random-port NATs two nodes stay relayed over IPv4 (`tests/nat.rs`). With a global
//! IPv6 address each, nodes listening on `[::]:4000` publish it beside their relayed endpoint,
//! and reach each other directly over IPv6; an IPv4-only peer still reaches them through the
//! relay, which is dual-stack (nodes talk to a relay over IPv4, where its view of them
//! matters), and serves across families: an IPv6-only peer reaches an IPv4-only node behind a
//! NAT through the relay's IPv6 address. Behind a router whose IPv6 firewall drops inbound
//! flows, the IPv6 address is withdrawn once a dial-back over IPv6 never arrives; a renumbered
//! address is published in place of the old one. A peer whose IPv6 address has no route, or
//! is black-holed, is reached over IPv4 within a second (Happy Eyeballs).

mod support;

use std::time::Duration;

use serde_json::json;

use support::nat::{bootstrap, deliver, node, ready_info, relayed_via, udp_endpoints, Nat, LIMIT};
use support::{Netns, TempDir};

/// Runs `ip ARGS` in `ns`; panics if it fails.
fn ip(ns: &Netns, args: &[&str]) {
    let st = ns.command("ip").args(args).status().expect("ip");
    assert!(st.success(), "ip {args:?}");
}

/// A relay on R1 listening on `[::]:4000`, and a bootstrap file listing it at both its
/// addresses (a node on `::` publishes its IPv4 address only once a peer's dial-back proved
/// it, so the list is written here).
fn dual_stack_relay(nat: &Nat, dir: &TempDir) -> (support::JsonProc, String) {
    let r1 = node(&nat.r1, dir, "r1", "[::]:4000", &["--relay"]);
    let mut r1_info = ready_info(&r1);
    r1_info["connectionInfo"] = json!([
        {"transportType": "udp", "transportInfo": {"address": "2001:db8::10", "port": 4000,
            "framing": "native", "relay": true}},
        {"transportType": "udp", "transportInfo": {"address": "203.0.113.10", "port": 4000,
            "framing": "native", "relay": true}},
    ]);
    let boot = bootstrap(dir, &[r1_info]);
    (r1, boot)
}

#[test]
fn nodes_behind_ipv4_nats_reach_each_other_directly_over_ipv6() {
    let test = "ipv6: beside IPv4 NATs";
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    let dir = TempDir::new("ipv6");
    let (r1, boot) = dual_stack_relay(&nat, &dir);
    let args = ["--bootstrap", &boot, "--no-portmap"];
    let mut a = node(&nat.ha, &dir, "a", "[::]:4000", &args);
    let mut b = node(&nat.hb, &dir, "b", "[::]:4000", &args);
    let v6_b = "[2001:db8:b::2]:4000";

    // B is relayed over IPv4 and lists its IPv6 address beside the relay.
    let b_info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo"
            && relayed_via(&v["nodeInfo"]).as_deref() == Some("203.0.113.10:4000")
            && udp_endpoints(&v["nodeInfo"]).contains(&v6_b.to_string())
    })["nodeInfo"]
        .clone();
    assert_eq!(udp_endpoints(&b_info), [v6_b], "{b_info}");

    // A reaches B directly over IPv6.
    let path = deliver(&mut a, &mut b, &b_info, "v6.hello");
    assert_eq!(path["path"], "direct", "{path}");
    assert_eq!(path["remote"], v6_b, "{path}");

    // An IPv4-only peer (R2 without its IPv6 address) reaches B through the relay.
    ip(
        &nat.r2,
        &["-6", "addr", "del", "2001:db8::11/64", "dev", "eth0"],
    );
    let mut c = node(
        &nat.r2,
        &dir,
        "c",
        "203.0.113.11:4000",
        &["--bootstrap", &boot],
    );
    let path = deliver(&mut c, &mut b, &b_info, "v6.from4");
    assert_eq!(path["path"], "relayed", "{path}");

    for p in [a, b, c, r1] {
        p.quit(Duration::from_secs(5));
    }
}

#[test]
fn ipv6_addresses_behind_a_firewall_that_drops_inbound_are_withdrawn() {
    let test = "ipv6: firewalled";
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    // B's router drops new inbound IPv6 flows, as a stateful firewall does.
    support::nat::ipv6_firewall(&nat.rb);

    let dir = TempDir::new("ipv6-fw");
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    let args = ["--bootstrap", &boot, "--no-portmap"];
    let mut a = node(&nat.ha, &dir, "a", "[::]:4000", &args);
    let mut b = node(&nat.hb, &dir, "b", "[::]:4000", &args);
    let v6_b = "[2001:db8:b::2]:4000".to_string();
    assert!(
        udp_endpoints(&ready_info(&b)).contains(&v6_b),
        "listed unproven at first"
    );

    // B talks to A over IPv6 (outbound passes the firewall): A tells B where it sees it
    // from, B asks A to dial that back, A's probe is dropped, and B withdraws its IPv6
    // address, relayed over IPv4 alone.
    let a_info = ready_info(&a);
    deliver(&mut b, &mut a, &a_info, "fw.hello");
    let info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo"
            && relayed_via(&v["nodeInfo"]).is_some()
            && !udp_endpoints(&v["nodeInfo"]).contains(&v6_b)
    })["nodeInfo"]
        .clone();
    assert_eq!(udp_endpoints(&info), Vec::<String>::new(), "{info}");
    for p in [a, b, r1] {
        p.quit(Duration::from_secs(5));
    }
}

#[test]
fn an_ipv6_only_peer_reaches_an_ipv4_only_node_through_a_dual_stack_relay() {
    let test = "ipv6: relay across families";
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    let dir = TempDir::new("ipv6-relay");
    let (r1, boot) = dual_stack_relay(&nat, &dir);
    // B uses IPv4 alone, behind its random-port NAT: relayed, and it lists the relay at both
    // of the relay's addresses.
    let mut b = node(
        &nat.hb,
        &dir,
        "b",
        "0.0.0.0:4000",
        &["--bootstrap", &boot, "--no-portmap", "--no-ipv6"],
    );
    let relayed = |info: &serde_json::Value| -> Vec<String> {
        info["connectionInfo"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["transportType"] == "mm-relay")
            .map(|e| {
                e["transportInfo"]["address"]
                    .as_str()
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    };
    let b_info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo" && relayed(&v["nodeInfo"]).len() == 2
    })["nodeInfo"]
        .clone();
    assert_eq!(
        relayed(&b_info),
        ["203.0.113.10", "2001:db8::10"],
        "{b_info}"
    );
    assert!(udp_endpoints(&b_info).is_empty(), "{b_info}");

    // D has IPv6 alone (R2 without its IPv4 address): it reaches B through the relay's
    // IPv6 address, the relay forwarding to B's IPv4 binding.
    ip(&nat.r2, &["addr", "del", "203.0.113.11/24", "dev", "eth0"]);
    let mut d = node(&nat.r2, &dir, "d", "[::]:4000", &[]);
    let path = deliver(&mut d, &mut b, &b_info, "v6.relayed");
    assert_eq!(path["path"], "relayed", "{path}");
    assert_eq!(path["remote"], "[2001:db8::10]:4000", "{path}");
    for p in [b, d, r1] {
        p.quit(Duration::from_secs(5));
    }
}

#[test]
fn a_renumbered_ipv6_address_is_published_in_place_of_the_old_one() {
    let test = "ipv6: renumbered";
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    let dir = TempDir::new("ipv6-renumber");
    let (r1, boot) = dual_stack_relay(&nat, &dir);
    let mut b = node(
        &nat.hb,
        &dir,
        "b",
        "[::]:4000",
        &[
            "--bootstrap",
            &boot,
            "--no-portmap",
            "--interface-refresh",
            "300",
        ],
    );
    assert!(udp_endpoints(&ready_info(&b)).contains(&"[2001:db8:b::2]:4000".to_string()));
    // B's network is renumbered: its address changes under it.
    ip(
        &nat.hb,
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:b::99/64",
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip(
        &nat.hb,
        &["-6", "addr", "del", "2001:db8:b::2/64", "dev", "eth0"],
    );
    let info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo"
            && udp_endpoints(&v["nodeInfo"]).contains(&"[2001:db8:b::99]:4000".to_string())
    })["nodeInfo"]
        .clone();
    assert!(
        !udp_endpoints(&info).contains(&"[2001:db8:b::2]:4000".to_string()),
        "{info}"
    );
    for p in [b, r1] {
        p.quit(Duration::from_secs(5));
    }
}

#[test]
fn an_unroutable_or_blackholed_ipv6_address_falls_back_to_ipv4_within_a_second() {
    let test = "ipv6: fallback to IPv4";
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    let dir = TempDir::new("ipv6-fallback");
    // S on R1, both families on one socket; R1 silently drops IPv6 datagrams to its port.
    let mut s = node(&nat.r1, &dir, "s", "[::]:4000", &[]);
    let s_ready = ready_info(&s);
    support::nat::nft(
        &nat.r1,
        "table ip6 bh {\n chain input {\n  type filter hook input priority 0; policy accept;\n  udp dport 4000 drop\n }\n}\n",
    )
    .expect("the black hole's rule");
    let s_info = |v6: &str| {
        let mut info = s_ready.clone();
        info["connectionInfo"] = json!([
            {"transportType": "udp6", "transportInfo": {"address": v6, "port": 4000,
                "framing": "native"}},
            {"transportType": "udp", "transportInfo": {"address": "203.0.113.10", "port": 4000,
                "framing": "native"}},
        ]);
        info
    };
    // From R2: 2001:db8:ffff::1 has no route there (the send fails at once); 2001:db8::10 is
    // routed, and black-holed.
    for (name, v6) in [("x", "2001:db8:ffff::1"), ("y", "2001:db8::10")] {
        let mut x = node(&nat.r2, &dir, name, "[::]:4000", &[]);
        // Timed from the nodeInfo on: the send follows it at once.
        let t = std::time::Instant::now();
        let path = deliver(&mut x, &mut s, &s_info(v6), &format!("fallback.{name}"));
        let took = t.elapsed();
        assert_eq!(path["remote"], "203.0.113.10:4000", "{path}");
        eprintln!("{v6}: delivered over IPv4 after {took:?}");
        assert!(took < Duration::from_secs(1), "{v6}: {took:?}");
        x.quit(Duration::from_secs(5));
    }
    s.quit(Duration::from_secs(5));
}

#[test]
fn behind_ipv6_firewalls_a_relayed_pair_punches_a_direct_ipv6_path() {
    let test = "ipv6: punched through stateful firewalls";
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    // Both routers drop new inbound IPv6 flows (stateful firewalls) and NAT IPv4 to a random
    // port per destination: no direct path is reachable from outside either way.
    support::nat::ipv6_firewall(&nat.ra);
    support::nat::ipv6_firewall(&nat.rb);
    let dir = TempDir::new("ipv6-punch");
    let (r1, boot) = dual_stack_relay(&nat, &dir);
    let args = ["--bootstrap", &boot, "--no-portmap"];
    let mut a = node(&nat.ha, &dir, "a", "[::]:4000", &args);
    let mut b = node(&nat.hb, &dir, "b", "[::]:4000", &args);
    // B's relayed endpoint only (its IPv6 address would not take a new flow anyway).
    let b_info = support::nat::relayed_only(
        &b.wait_for(LIMIT, |v| {
            v["event"] == "nodeInfo" && relayed_via(&v["nodeInfo"]).is_some()
        })["nodeInfo"],
    );
    let b_id = b_info["signId"].clone();
    let path = deliver(&mut a, &mut b, &b_info, "punch6.first");
    assert_eq!(path["path"], "relayed", "{path}");
    // The punch: A's connection moves to B's IPv6 address, directly.
    let direct = a.wait_for(LIMIT, |v| {
        v["event"] == "path" && v["peer"] == b_id && v["path"] == "direct"
    });
    assert_eq!(direct["remote"], "[2001:db8:b::2]:4000", "{direct}");
    // And it carries messages both ways.
    a.cmd(json!({"cmd": "send", "topic": "punch6.ab", "to": b_id, "payload": 2}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.punch6.ab"
    });
    for p in [a, b, r1] {
        p.quit(Duration::from_secs(5));
    }
}
