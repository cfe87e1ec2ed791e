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
//! matters). Behind a router whose IPv6 firewall drops inbound flows, the IPv6 address is
//! withdrawn once a dial-back over IPv6 never arrives.

mod support;

use std::time::Duration;

use serde_json::json;

use support::nat::{bootstrap, node, ready_info, relayed_via, udp_endpoints, Nat, LIMIT};
use support::TempDir;

#[test]
fn nodes_behind_ipv4_nats_reach_each_other_directly_over_ipv6() {
    let test = "ipv6: beside IPv4 NATs";
    let Some(nat) = Nat::build_ipv6(test) else {
        return;
    };
    let dir = TempDir::new("ipv6");
    // A dual-stack relay, listed at both its addresses (a node on `::` publishes its IPv4
    // address only once a peer's dial-back proved it, so the list is written here).
    let r1 = node(&nat.r1, &dir, "r1", "[::]:4000", &["--relay"]);
    let mut r1_info = ready_info(&r1);
    r1_info["connectionInfo"] = json!([
        {"transportType": "udp", "transportInfo": {"address": "2001:db8::10", "port": 4000,
            "framing": "native", "relay": true}},
        {"transportType": "udp", "transportInfo": {"address": "203.0.113.10", "port": 4000,
            "framing": "native", "relay": true}},
    ]);
    let boot = bootstrap(&dir, &[r1_info]);
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
    let b_id = b_info["signId"].clone();
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    a.cmd(json!({"cmd": "send", "topic": "v6.hello", "to": b_id, "payload": 1}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.v6.hello"
    });
    let path = a.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == b_id);
    assert_eq!(path["path"], "direct", "{path}");
    assert_eq!(path["remote"], v6_b, "{path}");

    // An IPv4-only peer (R2 without its IPv6 address) reaches B through the relay.
    let st = nat
        .r2
        .command("ip")
        .args(["-6", "addr", "del", "2001:db8::11/64", "dev", "eth0"])
        .status()
        .expect("ip");
    assert!(st.success());
    let mut c = node(
        &nat.r2,
        &dir,
        "c",
        "203.0.113.11:4000",
        &["--bootstrap", &boot],
    );
    c.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    c.cmd(json!({"cmd": "send", "topic": "v6.from4", "to": b_id, "payload": 2}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.v6.from4"
    });
    let path = c.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == b_id);
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
    support::nat::nft(
        &nat.rb,
        "table ip6 fw {\n chain inbound {\n  type filter hook forward priority 0; policy accept;\n  iifname \"wan0\" ct state new drop\n }\n}\n",
    )
    .expect("the firewall's rules");

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
    let a_id = a_info["signId"].clone();
    b.cmd(json!({"cmd": "nodeInfo", "nodeInfo": a_info}));
    b.cmd(json!({"cmd": "send", "topic": "fw.hello", "to": a_id, "payload": 1}));
    a.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.fw.hello"
    });
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
