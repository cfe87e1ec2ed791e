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
//! at priority -150, `iifname "wan0" ct state new drop`), like a home router.
//!
//! - Port-preserving NATs, knowing only a public relay: A's first message reaches B through the
//!   relay, the connection moves to a punched direct path within seconds, and 10,000 messages
//!   sent across the move arrive exactly once and in order; figures printed.
//! - Random-port NATs: the punch fails, messages go through the relay both ways, and the
//!   relay's memory and output never hold the plaintext marker; the relay going away makes both
//!   nodes move to the second relay, through which they talk again.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use support::{node_bin, JsonProc, Netns, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

/// The namespaces of one topology (each removed on drop by [`Netns`]).
struct Nat {
    public: Netns,
    ra: Netns,
    rb: Netns,
    ha: Netns,
    hb: Netns,
    r1: Netns,
    r2: Netns,
}

fn run(args: &[&str]) -> Result<(), String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

fn nft(ns: &Netns, rules: &str) -> Result<(), String> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    c.stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())
        .map_err(|e| e.to_string())?;
    let o = c.wait_with_output().map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Nat {
    /// Builds the topology; `None` (after a loud SKIPPING line) without root, `ip` or `nft`,
    /// unless `MM_REQUIRE_NETNS=1`.
    fn build(test: &str, random: bool) -> Option<Nat> {
        let have_nft = Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have_nft {
            if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("{test}: `nft` not found and MM_REQUIRE_NETNS=1");
            }
            eprintln!("\n*** SKIPPING {test}: `nft` (nftables) not found.\n");
            return None;
        }
        let nat = Nat {
            public: Netns::create(test)?,
            ra: Netns::create(test)?,
            rb: Netns::create(test)?,
            ha: Netns::create(test)?,
            hb: Netns::create(test)?,
            r1: Netns::create(test)?,
            r2: Netns::create(test)?,
        };
        if let Err(e) = nat.wire(random) {
            panic!("{test}: building the NAT topology failed: {e}");
        }
        Some(nat)
    }

    fn wire(&self, random: bool) -> Result<(), String> {
        let p = &self.public.name;
        run(&["ip", "-n", p, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", p, "link", "set", "br0", "up"])?;
        let publics = [
            (&self.ra, "wan0", "203.0.113.2/24"),
            (&self.rb, "wan0", "203.0.113.3/24"),
            (&self.r1, "eth0", "203.0.113.10/24"),
            (&self.r2, "eth0", "203.0.113.11/24"),
        ];
        for (i, (ns, ifname, addr)) in publics.iter().enumerate() {
            let port = format!("p{i}");
            run(&[
                "ip", "-n", p, "link", "add", &port, "type", "veth", "peer", "name", ifname,
                "netns", &ns.name,
            ])?;
            run(&["ip", "-n", p, "link", "set", &port, "master", "br0", "up"])?;
            run(&["ip", "-n", &ns.name, "addr", "add", addr, "dev", ifname])?;
            run(&["ip", "-n", &ns.name, "link", "set", ifname, "up"])?;
        }
        let lans = [
            (&self.ra, &self.ha, "192.0.2"),
            (&self.rb, &self.hb, "198.51.100"),
        ];
        for (router, host, net) in lans {
            run(&[
                "ip",
                "-n",
                &router.name,
                "link",
                "add",
                "lan0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &host.name,
            ])?;
            run(&[
                "ip",
                "-n",
                &router.name,
                "addr",
                "add",
                &format!("{net}.1/24"),
                "dev",
                "lan0",
            ])?;
            run(&["ip", "-n", &router.name, "link", "set", "lan0", "up"])?;
            run(&[
                "ip",
                "-n",
                &host.name,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &host.name, "link", "set", "eth0", "up"])?;
            run(&[
                "ip",
                "-n",
                &host.name,
                "route",
                "add",
                "default",
                "via",
                &format!("{net}.1"),
            ])?;
            run(&[
                "ip",
                "netns",
                "exec",
                &router.name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])?;
            let flags = if random { " random" } else { "" };
            nft(
                router,
                &format!(
                    "table ip nat {{\n chain post {{\n type nat hook postrouting priority 100; policy accept;\n oifname \"wan0\" masquerade{flags}\n }}\n}}\n\
                     table ip filter {{\n chain pre {{\n type filter hook prerouting priority -150; policy accept;\n iifname \"wan0\" ct state new drop\n }}\n}}\n"
                ),
            )?;
        }
        Ok(())
    }
}

/// Starts a node in `ns` listening on UDP `udp` (no TCP) with short timings.
fn node(ns: &Netns, dir: &TempDir, name: &str, udp: &str, extra: &[&str]) -> JsonProc {
    let mut cmd = ns.command(node_bin());
    cmd.arg("--data")
        .arg(dir.path(name))
        .args(["--udp", udp, "--tcp", "off"])
        .args(["--keepalive", "1000", "--dead-after", "4000"])
        .args(["--connect-timeout", "3000", "--retry", "1000"])
        .args(extra)
        .stderr(Stdio::null());
    let mut p = JsonProc::spawn(name, &mut cmd);
    p.wait_for(LIMIT, |v| v["event"] == "ready");
    p
}

fn relayed_via(info: &Value) -> Option<String> {
    info["connectionInfo"].as_array()?.iter().find_map(|e| {
        (e["transportType"] == "mm-relay").then(|| {
            format!(
                "{}:{}",
                e["transportInfo"]["address"].as_str().unwrap_or(""),
                e["transportInfo"]["port"]
            )
        })
    })
}

/// Waits for a nodeInfo event whose relayed endpoint is `relay`.
fn wait_relayed(p: &mut JsonProc, relay: &str) -> Value {
    let r = relay.to_owned();
    p.wait_for(LIMIT, move |v| {
        v["event"] == "nodeInfo" && relayed_via(&v["nodeInfo"]).as_deref() == Some(&r)
    })["nodeInfo"]
        .clone()
}

fn ready_info(p: &JsonProc) -> Value {
    p.seen
        .iter()
        .find(|v| v["event"] == "ready")
        .expect("ready seen")["nodeInfo"]
        .clone()
}

fn bootstrap(dir: &TempDir, infos: &[Value]) -> String {
    let f = dir.path("bootstrap.json");
    std::fs::write(
        &f,
        serde_json::to_vec(&Value::Array(infos.to_vec())).unwrap(),
    )
    .unwrap();
    f.to_string_lossy().into_owned()
}

fn count_messages(p: &JsonProc, topic: &str) -> usize {
    p.seen
        .iter()
        .filter(|v| v["event"] == "message" && v["topic"] == topic)
        .count()
}

/// Whether the process's writable memory holds `needle` (read through /proc as root).
fn memory_contains(pid: u32, needle: &[u8]) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut buf = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if b - a > 1 << 30 {
            continue;
        }
        buf.resize((b - a) as usize, 0);
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if buf.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    false
}

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
    let t0 = Instant::now();
    a.cmd(json!({"cmd": "send", "topic": "nat.first", "to": b_id, "payload": {"n": -1}}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.nat.first"
    });
    let first = t0.elapsed();
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
    let to_direct = t0.elapsed();
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
    eprintln!(
        "NAT figures (port-preserving): first message through the relay {:?}, direct path after {:?}, \
         {before} of {n} messages arrived before B's side moved",
        first, to_direct
    );
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
    a.cmd(json!({"cmd": "send", "topic": "nat.after", "to": b_id, "payload": {"m": 1}}));
    b.wait_for(Duration::from_secs(60), |v| {
        v["event"] == "message" && v["topic"] == "public.nat.after"
    });
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
}

/// Sends `n` messages of `size` bytes from `a` to `b_id` and returns how long until `b` had
/// them all (checked in order).
fn transfer(a: &mut JsonProc, b: &mut JsonProc, b_id: &Value, topic: &str, n: usize) -> Duration {
    let blob = "x".repeat(32 * 1024);
    let t = Instant::now();
    for i in 0..n {
        a.cmd(
            json!({"cmd": "send", "topic": topic, "to": b_id, "payload": {"n": i, "blob": blob}}),
        );
    }
    let full = format!("public.{topic}");
    let end = Instant::now() + Duration::from_secs(120);
    while count_messages(b, &full) < n && Instant::now() < end {
        b.collect_for(Duration::from_millis(50));
    }
    let took = t.elapsed();
    let got: Vec<i64> = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["topic"] == full.as_str())
        .map(|v| v["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        got,
        (0..n as i64).collect::<Vec<_>>(),
        "all, once, in order"
    );
    // Drop the big events kept so far.
    b.seen.retain(|v| v["topic"] != full.as_str());
    took
}

/// Figures, not a timed assertion: `cargo test --release --test nat -- --ignored --nocapture`.
/// Time to the first message through a relay (connection set-up included), time until the
/// path is direct, and relayed throughput as a fraction of direct (1,000 messages of 32 KiB).
#[test]
#[ignore]
fn bench_relayed_and_direct_paths() {
    let Some(nat) = Nat::build("nat: bench", false) else {
        return;
    };
    let dir = TempDir::new("nat-bench");
    // The relay's bandwidth limit (4 MiB/s per reservation by default) lifted: the path's own
    // throughput is measured.
    let r1 = node(
        &nat.r1,
        &dir,
        "r1",
        "203.0.113.10:4000",
        &["--relay-bps", "1000000000"],
    );
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let b_info = wait_relayed(&mut b, "203.0.113.10:4000");
    let b_id = b_info["signId"].clone();
    let n = 1000;
    let bytes = (n * 32 * 1024) as f64;

    // Relayed: A never punches.
    let mut a = node(
        &nat.ha,
        &dir,
        "a",
        "0.0.0.0:4000",
        &["--bootstrap", &boot, "--no-punch"],
    );
    wait_relayed(&mut a, "203.0.113.10:4000");
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    let t = Instant::now();
    a.cmd(json!({"cmd": "send", "topic": "bench.first", "to": b_id, "payload": 0}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.bench.first"
    });
    let first = t.elapsed();
    let relayed = transfer(&mut a, &mut b, &b_id, "bench.relayed", n);
    a.quit(Duration::from_secs(5));

    // Direct: the same node, punching.
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    wait_relayed(&mut a, "203.0.113.10:4000");
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    let t = Instant::now();
    a.cmd(json!({"cmd": "send", "topic": "bench.first2", "to": b_id, "payload": 0}));
    a.wait_for(LIMIT, |v| {
        v["event"] == "path" && v["peer"] == b_id && v["path"] == "direct"
    });
    let to_direct = t.elapsed();
    let direct = transfer(&mut a, &mut b, &b_id, "bench.direct", n);
    let mbps = |d: Duration| bytes / d.as_secs_f64() / 1e6;
    eprintln!(
        "NAT bench: first message through the relay {first:?}; direct path {to_direct:?} after \
         the first send; relayed {:.1} MB/s, direct {:.1} MB/s, relayed/direct {:.2}",
        mbps(relayed),
        mbps(direct),
        direct.as_secs_f64() / relayed.as_secs_f64()
    );
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));
}
