//! IPv4-only, IPv6-only and dual-stack hosts on one bridge (network namespaces of this test,
//! documentation addresses only; nothing leaves the machine):
//!
//! ```text
//!   v4  192.0.2.1                 ─┐
//!   v6               2001:db8::2   ├── br0 (namespace "br")
//!   d1  192.0.2.3,   2001:db8::3   │
//!   d2  192.0.2.4,   2001:db8::4   │
//!   d3  192.0.2.5,   2001:db8::5  ─┘   (its firewall drops inbound IPv6: a black hole)
//! ```
//!
//! `v4` has IPv6 off altogether and `v6` has no IPv4 address; every node listens on its
//! host's addresses (`[::]:4000` on the dual-stack ones, one socket for both families) and is
//! given the others' nodeInfos listing each address it has. Every pair that shares a family
//! talks, over that family; a dual-stack pair uses IPv6; a pair with no family in common
//! fails with an error instead of hanging; a dual-stack peer whose IPv6 is black-holed is
//! reached over IPv4 within a second (Happy Eyeballs).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::nat::{deliver, node, ready_info, run, LIMIT};
use support::{JsonProc, Netns, TempDir};

/// The hosts: name, IPv4 address, IPv6 address.
const HOSTS: [(&str, Option<&str>, Option<&str>); 5] = [
    ("v4", Some("192.0.2.1"), None),
    ("v6", None, Some("2001:db8::2")),
    ("d1", Some("192.0.2.3"), Some("2001:db8::3")),
    ("d2", Some("192.0.2.4"), Some("2001:db8::4")),
    ("d3", Some("192.0.2.5"), Some("2001:db8::5")),
];

/// The bridge's namespace and one namespace per host (all removed when dropped).
struct Bridge {
    _br: Netns,
    hosts: Vec<Netns>,
}

fn build(test: &str) -> Option<Bridge> {
    let br = Netns::create(test)?;
    let mut hosts = Vec::new();
    for _ in HOSTS {
        hosts.push(Netns::create(test)?);
    }
    let wire = || -> Result<(), String> {
        run(&["ip", "-n", &br.name, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &br.name, "link", "set", "br0", "up"])?;
        for (i, ((_, v4, v6), ns)) in HOSTS.iter().zip(&hosts).enumerate() {
            let port = format!("p{i}");
            run(&[
                "ip", "-n", &ns.name, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                "netns", &br.name,
            ])?;
            run(&["ip", "-n", &br.name, "link", "set", &port, "master", "br0"])?;
            run(&["ip", "-n", &br.name, "link", "set", &port, "up"])?;
            if v6.is_none() {
                // No IPv6 at all on this host (not even link-local): an IPv4-only system.
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &ns.name,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                ])?;
            }
            if let Some(a) = v4 {
                run(&[
                    "ip",
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{a}/24"),
                    "dev",
                    "eth0",
                ])?;
            }
            if let Some(a) = v6 {
                run(&[
                    "ip",
                    "-n",
                    &ns.name,
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
            }
            run(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"])?;
        }
        let v6_hosts: Vec<&Netns> = HOSTS
            .iter()
            .zip(&hosts)
            .filter(|((_, _, v6), _)| v6.is_some())
            .map(|(_, ns)| ns)
            .collect();
        support::nat::wait_no_tentative(&v6_hosts)
    };
    if let Err(e) = wire() {
        panic!("{test}: building the bridge failed: {e}");
    }
    Some(Bridge { _br: br, hosts })
}

/// A node's nodeInfo listing each address of its host (UDP port 4000).
fn info_of(ready: &Value, v4: Option<&str>, v6: Option<&str>) -> Value {
    let mut list = Vec::new();
    if let Some(a) = v6 {
        list.push(json!({"transportType": "udp6",
            "transportInfo": {"address": a, "port": 4000, "framing": "native"}}));
    }
    if let Some(a) = v4 {
        list.push(json!({"transportType": "udp",
            "transportInfo": {"address": a, "port": 4000, "framing": "native"}}));
    }
    let mut info = ready.clone();
    info["connectionInfo"] = Value::Array(list);
    info
}

#[test]
fn hosts_of_each_family_on_one_bridge_talk_where_they_share_one() {
    let test = "address families on one bridge";
    let Some(bridge) = build(test) else {
        return;
    };
    let dir = TempDir::new("families");
    let mut nodes: Vec<JsonProc> = Vec::new();
    let mut infos: Vec<Value> = Vec::new();
    for ((name, v4, v6), ns) in HOSTS.iter().zip(&bridge.hosts) {
        let listen = match (v4, v6) {
            (Some(a), None) => format!("{a}:4000"),
            (None, Some(a)) => format!("[{a}]:4000"),
            _ => "[::]:4000".to_string(),
        };
        let p = node(ns, &dir, name, &listen, &["--no-portmap"]);
        infos.push(info_of(&ready_info(&p), *v4, *v6));
        nodes.push(p);
    }
    // D3's firewall drops inbound IPv6 (its address stays listed: a black hole).
    support::nat::nft(
        &bridge.hosts[4],
        "table ip6 bh {\n chain input {\n  type filter hook input priority 0; policy accept;\n  udp dport 4000 drop\n }\n}\n",
    )
    .expect("the black hole's rule");

    // Every pair that shares a family, one way and the other: over which family (the
    // address of the peer's host; the way back uses the first way's connection, whose remote
    // port is the dialling side's own).
    let v6_remote = |i: usize| format!("[{}]:", HOSTS[i].2.unwrap());
    let v4_remote = |i: usize| format!("{}:", HOSTS[i].1.unwrap());
    let pairs: [(usize, usize, String); 10] = [
        (0, 2, v4_remote(2)),
        (2, 0, v4_remote(0)),
        (0, 3, v4_remote(3)),
        (3, 0, v4_remote(0)),
        (1, 2, v6_remote(2)),
        (2, 1, v6_remote(1)),
        (1, 3, v6_remote(3)),
        (3, 1, v6_remote(1)),
        // A dual-stack pair: IPv6.
        (2, 3, v6_remote(3)),
        (3, 2, v6_remote(2)),
    ];
    for (from, to, remote) in pairs {
        let topic = format!("families.{}{}", HOSTS[from].0, HOSTS[to].0);
        let (a, b) = two(&mut nodes, from, to);
        let path = deliver(a, b, &infos[to], &topic);
        let at = path["remote"].as_str().unwrap_or("");
        assert!(at.starts_with(&remote), "{topic}: {path}");
    }

    // No family in common: the send fails, with a reason, within the connect timeout.
    let (v4, _) = two(&mut nodes, 0, 1);
    v4.cmd(json!({"cmd": "nodeInfo", "nodeInfo": infos[1]}));
    v4.cmd(
        json!({"cmd": "send", "id": 7, "topic": "families.none", "to": infos[1]["signId"],
        "payload": 1}),
    );
    let sent = v4.wait_for(LIMIT, |v| v["event"] == "sent" && v["id"] == 7);
    assert_eq!(sent["ok"], false, "{sent}");
    eprintln!("no family in common: {sent}");
    assert!(
        sent["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{sent}"
    );

    // D3's IPv6 is black-holed: D1 reaches it over IPv4, within a second.
    let (d1, d3) = two(&mut nodes, 2, 4);
    let t = Instant::now();
    let path = deliver(d1, d3, &infos[4], "families.blackhole");
    let took = t.elapsed();
    assert_eq!(path["remote"], "192.0.2.5:4000", "{path}");
    eprintln!("black-holed IPv6: delivered over IPv4 after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    for p in nodes {
        p.quit(Duration::from_secs(5));
    }
}

/// Mutable references to two different nodes.
fn two(nodes: &mut [JsonProc], a: usize, b: usize) -> (&mut JsonProc, &mut JsonProc) {
    assert_ne!(a, b);
    if a < b {
        let (l, r) = nodes.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = nodes.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}
