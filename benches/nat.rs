//! Figures of the NAT traversal paths, measured in the namespace lab of `tests/nat.rs`
//! (`tests/support/nat.rs`: two port-preserving home NATs and public relays, documentation
//! addresses only, removed at the end). One JSON line per figure on stdout, as
//! `benches/figures.rs` prints them: `{"name":..,"value":..,"unit":..,"host":..,"cpu":..,"commit":..}`.
//!
//! Run (as root, with `ip` and `nft`): `cargo bench --bench nat`. Without them it prints a
//! SKIPPING note on stderr and exits successfully (with `MM_REQUIRE_NETNS=1` it fails).
//!
//! Figures:
//! - `nat_relay_first_message`: from A's send to B's delivery of its first message through a
//!   relay, connection set-up (handshake through the relay, identify) included;
//! - `nat_direct_path`: from A's first send until A's connection is on a punched direct path;
//! - `nat_relayed_throughput`, `nat_direct_throughput`: 1,000 messages of 32 KiB from A to B
//!   through a relay whose bandwidth limit is lifted (so the path itself is measured), and on
//!   the punched direct path; `nat_relayed_fraction_of_direct`: the first over the second;
//! - `nat_relayed_default_limit_throughput`: the same through a relay with the default limits
//!   (`RelayLimits::default`, 4 MiB/s per reservation).
//!
//! Then in the lab of `tests/portmap.rs` (random-port NATs, B's router running `miniupnpd`;
//! skipped with a note when it is not installed), the same node behind the same router with
//! port mapping and without:
//! - `nat_mapped_endpoint`: from starting B until it publishes its mapped endpoint (mapping,
//!   dial-back through it); `nat_relayed_endpoint`: from starting a node behind the same
//!   router with `--no-portmap` until it publishes a relayed endpoint; `nat_mapped_first_message`: from A's first send to B's delivery,
//!   connection set-up included, straight to the mapped endpoint (beside
//!   `nat_relay_first_message` above); `nat_mapped_throughput`: 1,000 messages of 32 KiB over
//!   that direct path (beside `nat_relayed_throughput` and `nat_direct_throughput`).
//!
//! Then with random-port NATs and the Kademlia DHT (`tests/relay_dht.rs`'s lab: a plain DHT
//! node and a relay that announces itself in the DHT): `nat_relayed_endpoint_handed`, from
//! starting a node behind the NAT that is given the relay's nodeInfo until it publishes its
//! relayed endpoint; `nat_relayed_endpoint_from_dht`, the same for a node given only the plain
//! DHT node, which finds the relay through the DHT.
//!
//! And behind stateful IPv6 firewalls (random-port IPv4 NATs too): `nat_ipv6_punched_path`,
//! from A's first send to B (known by its relayed endpoint only) until A's connection is on a
//! punched direct IPv6 path (beside `nat_direct_path`, the IPv4 punch).

#[path = "figures/machine.rs"]
mod machine;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use machine::machine;
use support::nat::{
    bootstrap, node, ready_info, transfer, udp_endpoints, wait_relayed, Nat, LIMIT,
};
use support::TempDir;

/// Messages (of 32 KiB) per throughput figure.
const N: usize = 1000;
/// Messages through the relay with default limits (about 4 s at 4 MiB/s).
const N_LIMITED: usize = 500;

fn emit(name: &str, value: f64, unit: &str) {
    let (host, cpu, commit) = machine();
    let line = json!({
        "name": name,
        "value": (value * 10.0).round() / 10.0,
        "unit": unit,
        "host": host,
        "cpu": cpu,
        "commit": commit,
    });
    println!("{line}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mbps(n: usize, d: Duration) -> f64 {
    (n * 32 * 1024) as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; any other run (`cargo test --benches`) measures nothing.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benches/nat.rs: run it with `cargo bench --bench nat`");
        return;
    }
    let Some(nat) = Nat::build("bench nat", false) else {
        return;
    };
    let dir = TempDir::new("nat-bench");
    // r1: the relay's bandwidth limit lifted, so the relayed path itself is measured.
    let r1 = node(
        &nat.r1,
        &dir,
        "r1",
        "203.0.113.10:4000",
        &["--relay", "--relay-bps", "1000000000"],
    );
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let b_info = wait_relayed(&mut b, "203.0.113.10:4000");
    let b_id = b_info["signId"].clone();

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
    emit("nat_relay_first_message", ms(t.elapsed()), "ms");
    let relayed = transfer(&mut a, &mut b, &b_id, "bench.relayed", N);
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
    emit("nat_direct_path", ms(t.elapsed()), "ms");
    let direct = transfer(&mut a, &mut b, &b_id, "bench.direct", N);
    emit("nat_relayed_throughput", mbps(N, relayed), "MB/s");
    emit("nat_direct_throughput", mbps(N, direct), "MB/s");
    emit(
        "nat_relayed_fraction_of_direct",
        100.0 * direct.as_secs_f64() / relayed.as_secs_f64(),
        "%",
    );
    a.quit(Duration::from_secs(5));
    b.quit(Duration::from_secs(5));

    // Through a relay with the default limits: a second pair of nodes (other ports on the
    // same hosts) that knows only r2.
    let r2 = node(&nat.r2, &dir, "r2", "203.0.113.11:4000", &["--relay"]);
    let boot2 = bootstrap(&dir, &[ready_info(&r2)]);
    let mut b2 = node(
        &nat.hb,
        &dir,
        "b2",
        "0.0.0.0:4001",
        &["--bootstrap", &boot2],
    );
    let b2_info: Value = wait_relayed(&mut b2, "203.0.113.11:4000");
    let b2_id = b2_info["signId"].clone();
    let mut a2 = node(
        &nat.ha,
        &dir,
        "a2",
        "0.0.0.0:4001",
        &["--bootstrap", &boot2, "--no-punch"],
    );
    wait_relayed(&mut a2, "203.0.113.11:4000");
    a2.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b2_info}));
    let limited = transfer(&mut a2, &mut b2, &b2_id, "bench.limited", N_LIMITED);
    emit(
        "nat_relayed_default_limit_throughput",
        mbps(N_LIMITED, limited),
        "MB/s",
    );
    a2.quit(Duration::from_secs(5));
    b2.quit(Duration::from_secs(5));
    r1.quit(Duration::from_secs(5));
    r2.quit(Duration::from_secs(5));
    drop(nat);
    mapped();
    ipv6();
    relay_from_dht();
    ipv6_punch();
}

/// Two nodes behind random-port IPv4 NATs and stateful IPv6 firewalls, relayed over IPv4:
/// the time from A's first send until its connection is on a punched direct IPv6 path.
fn ipv6_punch() {
    let Some(nat) = Nat::build_ipv6("bench nat: ipv6 punch") else {
        return;
    };
    support::nat::ipv6_firewall(&nat.ra);
    support::nat::ipv6_firewall(&nat.rb);
    let dir = TempDir::new("nat-bench-punch6");
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    let args = ["--bootstrap", &boot, "--no-portmap"];
    let mut a = node(&nat.ha, &dir, "a", "[::]:4000", &args);
    let mut b = node(&nat.hb, &dir, "b", "[::]:4000", &args);
    let b_info = support::nat::relayed_only(&wait_relayed(&mut b, "203.0.113.10:4000"));
    let b_id = b_info["signId"].clone();
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    let t = Instant::now();
    a.cmd(json!({"cmd": "send", "topic": "bench.punch6", "to": b_id, "payload": 0}));
    let direct = a.wait_for(LIMIT, |v| {
        v["event"] == "path" && v["peer"] == b_id && v["path"] == "direct"
    });
    assert!(
        direct["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with('[')),
        "{direct}"
    );
    emit("nat_ipv6_punched_path", ms(t.elapsed()), "ms");
    for p in [a, b, r1] {
        p.quit(Duration::from_secs(5));
    }
}

/// Time to a relayed endpoint for a node behind a random-port NAT, with the relay handed to
/// it and with the relay found through the Kademlia DHT.
fn relay_from_dht() {
    let Some(nat) = Nat::build("bench nat: relay from the DHT", true) else {
        return;
    };
    let dir = TempDir::new("nat-bench-dht");
    let s = node(&nat.r1, &dir, "s", "203.0.113.10:4000", &["--dht"]);
    let boot_s = bootstrap(&dir, &[ready_info(&s)]);
    let mut r = node(
        &nat.r2,
        &dir,
        "r",
        "203.0.113.11:4000",
        &["--relay", "--dht", "--bootstrap", &boot_s],
    );
    r.wait_for(LIMIT, |v| v["event"] == "peer");
    let r_info = ready_info(&r);
    let boot_r = dir.path("boot-r.json");
    std::fs::write(&boot_r, serde_json::to_vec(&json!([r_info])).unwrap()).unwrap();
    let boot_r = boot_r.to_string_lossy().into_owned();
    for (name, port, args, figure) in [
        (
            "b1",
            "4000",
            vec!["--bootstrap", &boot_r, "--no-portmap"],
            "nat_relayed_endpoint_handed",
        ),
        (
            "b2",
            "4001",
            vec!["--dht", "--bootstrap", &boot_s, "--no-portmap"],
            "nat_relayed_endpoint_from_dht",
        ),
    ] {
        let t = Instant::now();
        let mut b = node(&nat.hb, &dir, name, &format!("0.0.0.0:{port}"), &args);
        wait_relayed(&mut b, "203.0.113.11:4000");
        emit(figure, ms(t.elapsed()), "ms");
        b.quit(Duration::from_secs(5));
    }
    r.quit(Duration::from_secs(5));
    s.quit(Duration::from_secs(5));
}

/// The figures of a node behind a router that maps ports (`miniupnpd`).
fn mapped() {
    let test = "bench nat: mapped";
    let Some(nat) = Nat::build_upnp(test) else {
        return;
    };
    let dir = TempDir::new("nat-bench-mapped");
    let Some((stun, upnp)) = nat.start_miniupnpd(test, &dir) else {
        return;
    };
    let r1 = node(&nat.r1, &dir, "r1", "203.0.113.10:4000", &["--relay"]);
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    // Without port mapping, behind the same router: relayed (through r2, so that r1's
    // once-per-30-s dial-back of this address is left for B below).
    let r2 = node(&nat.r2, &dir, "r2", "203.0.113.11:4000", &["--relay"]);
    // Its own bootstrap file (`bootstrap` writes one name per directory).
    let dir2 = TempDir::new("nat-bench-mapped-r2");
    let boot2 = bootstrap(&dir2, &[ready_info(&r2)]);
    let t = Instant::now();
    let mut b0 = node(
        &nat.hb,
        &dir,
        "b0",
        "0.0.0.0:4001",
        &["--bootstrap", &boot2, "--no-portmap"],
    );
    wait_relayed(&mut b0, "203.0.113.11:4000");
    emit("nat_relayed_endpoint", ms(t.elapsed()), "ms");
    b0.quit(Duration::from_secs(5));
    r2.quit(Duration::from_secs(5));
    // With: the mapped endpoint.
    let t = Instant::now();
    let mut b = node(&nat.hb, &dir, "b", "0.0.0.0:4000", &["--bootstrap", &boot]);
    let b_info = b.wait_for(LIMIT, |v| {
        v["event"] == "nodeInfo" && udp_endpoints(&v["nodeInfo"]) == ["203.0.113.3:4000"]
    })["nodeInfo"]
        .clone();
    emit("nat_mapped_endpoint", ms(t.elapsed()), "ms");
    let b_id = b_info["signId"].clone();
    let mut a = node(&nat.ha, &dir, "a", "0.0.0.0:4000", &["--bootstrap", &boot]);
    wait_relayed(&mut a, "203.0.113.10:4000");
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    let t = Instant::now();
    a.cmd(json!({"cmd": "send", "topic": "bench.mapped", "to": b_id, "payload": 0}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.bench.mapped"
    });
    emit("nat_mapped_first_message", ms(t.elapsed()), "ms");
    let path = a.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == b_id);
    assert_eq!(path["path"], "direct", "{path}");
    let direct = transfer(&mut a, &mut b, &b_id, "bench.mapped.bulk", N);
    emit("nat_mapped_throughput", mbps(N, direct), "MB/s");
    for p in [a, b, r1] {
        p.quit(Duration::from_secs(5));
    }
    drop((upnp, stun));
}

/// The figures of nodes behind random-port IPv4 NATs that also have global IPv6 addresses
/// (`Nat::build_ipv6`): the direct IPv6 path beside the relayed IPv4 one.
fn ipv6() {
    let Some(nat) = Nat::build_ipv6("bench nat: ipv6") else {
        return;
    };
    let dir = TempDir::new("nat-bench-ipv6");
    let r1 = node(
        &nat.r1,
        &dir,
        "r1",
        "203.0.113.10:4000",
        &["--relay", "--relay-bps", "1000000000"],
    );
    let boot = bootstrap(&dir, &[ready_info(&r1)]);
    let args = ["--bootstrap", &boot, "--no-portmap"];
    let t = Instant::now();
    let mut b = node(&nat.hb, &dir, "b", "[::]:4000", &args);
    let v6_b = "[2001:db8:b::2]:4000".to_string();
    // Listed from the start (the `ready` event's nodeInfo), else once it changes.
    let ready = ready_info(&b);
    let b_info = if udp_endpoints(&ready).contains(&v6_b) {
        ready
    } else {
        b.wait_for(LIMIT, |v| {
            v["event"] == "nodeInfo" && udp_endpoints(&v["nodeInfo"]).contains(&v6_b)
        })["nodeInfo"]
            .clone()
    };
    emit("nat_ipv6_endpoint", ms(t.elapsed()), "ms");
    let b_id = b_info["signId"].clone();
    let mut a = node(&nat.ha, &dir, "a", "[::]:4000", &args);
    a.cmd(json!({"cmd": "nodeInfo", "nodeInfo": b_info}));
    let t = Instant::now();
    a.cmd(json!({"cmd": "send", "topic": "bench.v6", "to": b_id, "payload": 0}));
    b.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == "public.bench.v6"
    });
    emit("nat_ipv6_first_message", ms(t.elapsed()), "ms");
    let path = a.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == b_id);
    assert_eq!(path["remote"], v6_b.as_str(), "{path}");
    let direct = transfer(&mut a, &mut b, &b_id, "bench.v6.bulk", N);
    emit("nat_ipv6_throughput", mbps(N, direct), "MB/s");
    for p in [a, b, r1] {
        p.quit(Duration::from_secs(5));
    }
}
