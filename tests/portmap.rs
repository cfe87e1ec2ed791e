//! Port mapping against the real `miniupnpd` (Debian's `miniupnpd-nftables`, UPnP IGD, NAT-PMP
//! and PCP on) on a home router of the NAT lab (`tests/support/nat.rs`: network namespaces of
//! this test, documentation addresses only, nothing leaves the machine):
//!
//! ```text
//!   ha 192.0.2.2 ── ra (random-port NAT) 203.0.113.2 ─┐        ┌─ r1 203.0.113.10 (relay)
//!                                                      ├─ br0 ─┤
//!   hb 198.51.100.2 ── rb (random-port NAT            ─┘        └─ r2 203.0.113.11/.12
//!                          + miniupnpd) 203.0.113.3                  (STUN for miniupnpd)
//! ```
//!
//! Behind random-port NATs two nodes cannot punch a path and stay relayed (`tests/nat.rs`).
//! Here B's router maps ports on request: B asks it (PCP), gets a mapping, proves it with a
//! dial-back through the relay node, publishes the mapped endpoint and takes no relay, and A
//! reaches it directly. With the daemon stopped, a node behind the same router falls back to
//! the relay. A second node behind that router, whose check the relay node refuses (it dials
//! one address back once per 30 s, and B's check just used it), is checked again 30 s later
//! and then reached directly too. A router whose daemon speaks UPnP IGD only (NAT-PMP and PCP
//! off) maps B's port through SSDP and SOAP, and removes the mapping when B closes.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::nat::{
    bootstrap, deliver, node, ready_info, relayed_via, udp_endpoints, wait_relayed, Nat, LIMIT,
};
use support::{JsonProc, Proc, TempDir};

/// What each test here starts with: the NAT lab, miniupnpd on B's router (with PCP and NAT-PMP,
/// or UPnP IGD only), a relay node on r1 and a bootstrap file naming it; `None` when the test
/// is skipped.
fn lab(
    test: &str,
    name: &str,
    upnp_only: bool,
) -> Option<(Nat, TempDir, Proc, Proc, JsonProc, String)> {
    let nat = Nat::build_upnp(test)?;
    let dir = TempDir::new(name);
    let (stun, upnp) = if upnp_only {
        nat.start_miniupnpd_upnp_only(test, &dir)?
    } else {
        nat.start_miniupnpd(test, &dir)?
    };
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    Some((nat, dir, stun, upnp, r1, boot))
}

/// B behind the lab's router, listening on UDP 0.0.0.0:4000 and TCP 0.0.0.0:4001.
fn b_with_tcp(nat: &Nat, dir: &TempDir, boot: &str) -> JsonProc {
    node(
        &nat.hb,
        dir,
        "b",
        "0.0.0.0:4000",
        &["--bootstrap", boot, "--tcp", "0.0.0.0:4001"],
    )
}

#[test]
fn a_node_behind_a_upnp_router_maps_its_port_and_is_reached_directly() {
    let test = "portmap: miniupnpd";
    let Some((nat, dir, stun, mut upnp, r1, boot)) = lab(test, "portmap", false) else {
        return;
    };
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);

    // B publishes its router's public address with the mapped port (miniupnpd grants the
    // port asked for, 4000), once a dial-back through it reached B.
    let b_info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo" && udp_endpoints(&v["nodeInfo"]) == ["203.0.113.3:4000"]
    })["nodeInfo"]
        .clone();
    assert!(relayed_via(&b_info).is_none(), "{b_info}");
    b.cmd(json!({"cmd": "connections"}));
    let conns = b.wait_for(LIMIT, |v| v["event"] == "connections");
    assert_eq!(conns["mappedPort"], 4000, "{conns}");
    // A's router maps nothing: A is relayed.
    let a_info = wait_relayed(&mut a, "203.0.113.10:4000");
    assert!(udp_endpoints(&a_info).is_empty(), "{a_info}");

    // A reaches B directly at the mapped endpoint.
    let path = deliver(&mut a, &mut b, &b_info, "map.hello");
    assert_eq!(path["path"], "direct", "{path}");
    assert_eq!(path["remote"], "203.0.113.3:4000", "{path}");
    // B never took a relay.
    assert!(
        !b.seen
            .iter()
            .any(|v| v["event"] == "nodeInfo" && relayed_via(&v["nodeInfo"]).is_some()),
        "B took a relay"
    );

    // The daemon stops: a node that starts behind the same router now gets no mapping and
    // takes the relay, through which A reaches it.
    drop(upnp.child.take().map(|mut c| {
        let _ = c.kill();
        c.wait()
    }));
    let mut c = node(&nat.hb, &dir, "c", "0.0.0.0:4001", &["--bootstrap", &boot]);
    let c_info = wait_relayed(&mut c, "203.0.113.10:4000");
    assert!(udp_endpoints(&c_info).is_empty(), "{c_info}");
    c.cmd(json!({"cmd": "connections"}));
    let conns = c.wait_for(LIMIT, |v| v["event"] == "connections");
    assert_eq!(conns["mappedPort"], Value::Null, "{conns}");
    let path = deliver(&mut a, &mut c, &c_info, "map.relayed");
    assert_eq!(path["path"], "relayed", "{path}");

    for p in [a, b, c, r1] {
        p.quit(Duration::from_secs(5));
    }
    drop(stun);
}

#[test]
fn a_second_node_behind_the_same_router_is_checked_again_after_the_refusal() {
    let test = "portmap: two nodes, one router";
    let Some((nat, dir, _stun, _upnp, r1, boot)) = lab(test, "portmap-two", false) else {
        return;
    };
    let mapped = |port: &'static str| {
        move |v: &Value| v["event"] == "nodeInfo" && udp_endpoints(&v["nodeInfo"]) == [port]
    };
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);
    b.wait_for(LIMIT, mapped("203.0.113.3:4000"));
    // B2 maps 4001 at once, but r1 refuses to dial 203.0.113.3 again so soon: B2 takes the
    // relay meanwhile, and publishes its mapped endpoint once the check is asked again.
    let t = Instant::now();
    let mut b2 = node(&nat.hb, &dir, "b2", "0.0.0.0:4001", &["--bootstrap", &boot]);
    wait_relayed(&mut b2, "203.0.113.10:4000");
    let info = b2.wait_for(Duration::from_secs(60), mapped("203.0.113.3:4001"))["nodeInfo"].clone();
    assert!(relayed_via(&info).is_none(), "{info}");
    assert!(t.elapsed() >= Duration::from_secs(25), "{:?}", t.elapsed());
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let path = deliver(&mut a, &mut b2, &info, "map.two");
    assert_eq!(path["path"], "direct", "{path}");
    assert_eq!(path["remote"], "203.0.113.3:4001", "{path}");
    for p in [a, b, b2, r1] {
        p.quit(Duration::from_secs(5));
    }
}

/// The UDP port forwards miniupnpd has put into `router`'s nftables (its DNAT chain).
fn upnp_forwards(router: &support::Netns) -> String {
    let out = router
        .command("nft")
        .args(["list", "chain", "inet", "filter", "prerouting_miniupnpd"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_node_behind_a_upnp_only_router_maps_with_upnp_igd_and_removes_it_on_close() {
    let test = "portmap: UPnP IGD only";
    let Some((nat, dir, _stun, _upnp, r1, boot)) = lab(test, "portmap-upnp", true) else {
        return;
    };
    let mut b = b_with_tcp(&nat, &dir, &boot);
    // PCP finds nothing on the router's port 5351; SSDP finds the IGD, SOAP maps the port,
    // a dial-back through it proves it: B publishes the mapped endpoint, with no relay.
    let b_info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo" && udp_endpoints(&v["nodeInfo"]) == ["203.0.113.3:4000"]
    })["nodeInfo"]
        .clone();
    assert!(relayed_via(&b_info).is_none(), "{b_info}");
    b.cmd(json!({"cmd": "connections"}));
    let conns = b.wait_for(LIMIT, |v| v["event"] == "connections");
    assert_eq!(conns["mappedPort"], 4000, "{conns}");
    assert_eq!(conns["mappedBy"], "upnp", "{conns}");
    // The TCP listener too, on the service the UDP client found (asked until it is there).
    let mut tcp_port = Value::Null;
    for i in 0..50 {
        b.cmd(json!({"cmd": "connections", "id": i}));
        let conns = b.wait_for(LIMIT, move |v| v["event"] == "connections" && v["id"] == i);
        tcp_port = conns["mappedTcpPort"].clone();
        if tcp_port == 4001 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tcp_port, 4001);
    assert!(
        !b.seen
            .iter()
            .any(|v| v["event"] == "nodeInfo" && relayed_via(&v["nodeInfo"]).is_some()),
        "B took a relay"
    );
    let forwards = upnp_forwards(&nat.rb);
    // miniupnpd matches the IP protocol field (0x11 UDP, 0x6 TCP) and the port.
    assert!(forwards.contains("0x11 th dport 4000"), "{forwards}");
    assert!(forwards.contains("0x6 th dport 4001"), "{forwards}");

    // A, behind a router that maps nothing, reaches B directly.
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let path = deliver(&mut a, &mut b, &b_info, "map.upnp");
    assert_eq!(path["path"], "direct", "{path}");
    assert_eq!(path["remote"], "203.0.113.3:4000", "{path}");

    // B closes: its DeletePortMapping requests remove the forwards.
    b.quit(Duration::from_secs(5));
    let forwards = upnp_forwards(&nat.rb);
    assert!(!forwards.contains("dport 4000"), "{forwards}");
    assert!(!forwards.contains("dport 4001"), "{forwards}");
    for p in [a, r1] {
        p.quit(Duration::from_secs(5));
    }
}

/// The TCP endpoints (`ip:port`) of a nodeInfo.
fn tcp_endpoints(info: &Value) -> Vec<String> {
    info["connectionInfo"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["transportType"] == "tcp")
        .map(|e| {
            format!(
                "{}:{}",
                e["transportInfo"]["address"].as_str().unwrap_or(""),
                e["transportInfo"]["port"]
            )
        })
        .collect()
}

#[test]
fn a_tcp_listener_is_mapped_too_and_reached_over_tcp() {
    let test = "portmap: TCP";
    let Some((nat, dir, _stun, _upnp, r1, boot)) = lab(test, "portmap-tcp", false) else {
        return;
    };
    let mut b = b_with_tcp(&nat, &dir, &boot);
    // Once the UDP mapping is proven, the TCP one is published with the same address.
    let b_info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo"
            && udp_endpoints(&v["nodeInfo"]) == ["203.0.113.3:4000"]
            && tcp_endpoints(&v["nodeInfo"]) == ["203.0.113.3:4001"]
    })["nodeInfo"]
        .clone();
    b.cmd(json!({"cmd": "connections"}));
    let conns = b.wait_for(LIMIT, |v| v["event"] == "connections");
    assert_eq!(conns["mappedTcpPort"], 4001, "{conns}");
    assert_eq!(conns["mappedBy"], "pcp", "{conns}");

    // A, given only B's TCP endpoint, reaches it over TCP through the mapping.
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let mut tcp_only = b_info.clone();
    tcp_only["connectionInfo"] = json!(b_info["connectionInfo"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["transportType"] == "tcp")
        .cloned()
        .collect::<Vec<_>>());
    let path = deliver(&mut a, &mut b, &tcp_only, "map.tcp");
    assert_eq!(path["path"], "direct", "{path}");
    assert_eq!(path["remote"], "203.0.113.3:4001", "{path}");
    for p in [a, b, r1] {
        p.quit(Duration::from_secs(5));
    }
}
