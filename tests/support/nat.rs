//! The NAT lab of `tests/nat.rs` and `benches/nat.rs`: seven network namespaces wired as two
//! home networks behind NAT routers and two public relay hosts (removed when dropped, pass or
//! fail; addresses from the documentation ranges only, nothing routed off the machine):
//!
//! ```text
//!   ha 192.0.2.2 ── ra (NAT) 203.0.113.2 ─┐                 ┌─ r1 203.0.113.10 (relay)
//!                                          ├── br0 in "pub" ─┤
//!   hb 198.51.100.2 ── rb (NAT) 203.0.113.3┘                 └─ r2 203.0.113.11 (relay)
//! ```
//!
//! The routers masquerade (port-preserving, or `masquerade random`: a fresh port per
//! destination) and drop new inbound flows before conntrack confirms them (prerouting filter
//! at priority -150, `iifname "wan0" ct state new drop`), like a home router; B's router may
//! also forward a UDP port to B ([`Nat::build_with`]). With [`Nat::build_ipv6`] every host also
//! has a global IPv6 address, routed without NAT or firewall (as most home routers give their
//! LAN): the public side 2001:db8::/64 (ra ::2, rb ::3, r1 ::10, r2 ::11), A's LAN
//! 2001:db8:a::/64 and B's LAN 2001:db8:b::/64 (router ::1, host ::2). Also the helpers that
//! drive `examples/node.rs` processes in it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{node_bin, JsonProc, Netns, Proc, TempDir};

/// How long a test waits for one event.
pub const LIMIT: Duration = Duration::from_secs(30);

/// The namespaces of one topology (each removed on drop by [`Netns`]).
pub struct Nat {
    pub public: Netns,
    pub ra: Netns,
    pub rb: Netns,
    pub ha: Netns,
    pub hb: Netns,
    pub r1: Netns,
    pub r2: Netns,
}

/// Runs a command; its stderr in the error.
pub fn run(args: &[&str]) -> Result<(), String> {
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

/// Waits until no IPv6 address in `namespaces` is tentative (at most 10 s). The links' own
/// (link-local) addresses, which neighbour discovery sends from, are tentative for a second or
/// two after the links come up: until then the first packets to a new neighbour are lost.
pub fn wait_no_tentative(namespaces: &[&Netns]) -> Result<(), String> {
    let end = Instant::now() + Duration::from_secs(10);
    for ns in namespaces {
        loop {
            let out = ns
                .command("ip")
                .args(["-6", "addr", "show", "tentative"])
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.stdout.is_empty() {
                break;
            }
            if Instant::now() > end {
                return Err(format!(
                    "addresses still tentative in {}: {}",
                    ns.name,
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Makes `router` a stateful IPv6 firewall: new inbound flows from its WAN side are dropped.
pub fn ipv6_firewall(router: &Netns) {
    nft(
        router,
        "table ip6 fw {\n chain inbound {\n  type filter hook forward priority 0; policy accept;\n  iifname \"wan0\" ct state new drop\n }\n}\n",
    )
    .expect("the firewall's rules");
}

/// `info` with its relayed (`mm-relay`) endpoints only.
pub fn relayed_only(info: &Value) -> Value {
    let mut info = info.clone();
    let relayed: Vec<Value> = info["connectionInfo"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["transportType"] == "mm-relay")
        .cloned()
        .collect();
    info["connectionInfo"] = Value::Array(relayed);
    info
}

/// Loads nftables `rules` inside `ns`.
pub fn nft(ns: &Netns, rules: &str) -> Result<(), String> {
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
    pub fn build(test: &str, random: bool) -> Option<Nat> {
        Self::build_with(test, random, None)
    }

    /// [`Nat::build`], and with `forward_b = Some(port)` B's router forwards UDP `port` of its
    /// public address to B's host (a DNAT rule, exempt from the drop of new inbound flows), like
    /// a home router with a port forward.
    pub fn build_with(test: &str, random: bool, forward_b: Option<u16>) -> Option<Nat> {
        Self::build_lab(test, random, forward_b, false, false)
    }

    /// [`Nat::build`] with random-port NATs where B's router is a home router with UPnP: its
    /// firewall drops new inbound flows unless a port mapping forwards them (a filter on the
    /// forward hook after DNAT, and one on the input hook), and it holds the empty nftables
    /// chains `miniupnpd` fills (its nftables backend's default table and chain names). Start
    /// the daemon with [`Nat::start_miniupnpd`]. R2 gets a second address, 203.0.113.12, for
    /// the STUN responder miniupnpd checks its external address with.
    pub fn build_upnp(test: &str) -> Option<Nat> {
        Self::build_lab(test, true, None, true, false)
    }

    /// [`Nat::build`] with random-port NATs for IPv4, and routed IPv6 everywhere (see the
    /// module docs).
    #[allow(dead_code)]
    pub fn build_ipv6(test: &str) -> Option<Nat> {
        Self::build_lab(test, true, None, false, true)
    }

    fn build_lab(
        test: &str,
        random: bool,
        forward_b: Option<u16>,
        upnp_b: bool,
        ipv6: bool,
    ) -> Option<Nat> {
        let have_nft = Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have_nft {
            if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("{test}: `nft` not found and MM_REQUIRE_NETNS=1");
            }
            mm_platform::proto::skip_test(test, "`nft` (nftables) not found");
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
        if let Err(e) = nat.wire(random, forward_b, upnp_b) {
            panic!("{test}: building the NAT topology failed: {e}");
        }
        if ipv6 {
            if let Err(e) = nat.wire_ipv6() {
                panic!("{test}: adding IPv6 to the NAT topology failed: {e}");
            }
        }
        Some(nat)
    }

    fn wire(&self, random: bool, forward_b: Option<u16>, upnp_b: bool) -> Result<(), String> {
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
            let (dnat, exempt) = match forward_b {
                Some(port) if router.name == self.rb.name => (
                    format!(
                        "table ip portfwd {{\n chain pre {{\n type nat hook prerouting priority -100; policy accept;\n iifname \"wan0\" udp dport {port} dnat to {net}.2:{port}\n }}\n}}\n"
                    ),
                    format!(" iifname \"wan0\" udp dport {port} accept\n"),
                ),
                _ => (String::new(), String::new()),
            };
            let masquerade = format!(
                "table ip nat {{\n chain post {{\n type nat hook postrouting priority 100; policy accept;\n oifname \"wan0\" masquerade{flags}\n }}\n}}\n"
            );
            if upnp_b && router.name == self.rb.name {
                // The LAN's flows only: the router's own (miniupnpd's STUN check) leave
                // from its public address as they are.
                let lan_only = format!(
                    "table ip nat {{\n chain post {{\n type nat hook postrouting priority 100; policy accept;\n oifname \"wan0\" ip saddr {net}.0/24 masquerade{flags}\n }}\n}}\n"
                );
                nft(router, &format!("{lan_only}{UPNP_ROUTER}"))?;
                continue;
            }
            nft(
                router,
                &format!(
                    "{masquerade}table ip filter {{\n chain pre {{\n type filter hook prerouting priority -150; policy accept;\n{exempt} iifname \"wan0\" ct state new drop\n }}\n}}\n{dnat}"
                ),
            )?;
        }
        if upnp_b {
            run(&[
                "ip",
                "-n",
                &self.r2.name,
                "addr",
                "add",
                "203.0.113.12/24",
                "dev",
                "eth0",
            ])?;
        }
        Ok(())
    }

    /// Global IPv6 on every host, routed without NAT (see the module docs). Addresses skip
    /// duplicate address detection (`nodad`) so that they work at once.
    fn wire_ipv6(&self) -> Result<(), String> {
        let addr = |ns: &Netns, a: &str, dev: &str| {
            run(&[
                "ip", "-n", &ns.name, "-6", "addr", "add", a, "dev", dev, "nodad",
            ])
        };
        let route = |ns: &Netns, to: &str, via: &str| {
            run(&["ip", "-n", &ns.name, "-6", "route", "add", to, "via", via])
        };
        addr(&self.ra, "2001:db8::2/64", "wan0")?;
        addr(&self.rb, "2001:db8::3/64", "wan0")?;
        addr(&self.r1, "2001:db8::10/64", "eth0")?;
        addr(&self.r2, "2001:db8::11/64", "eth0")?;
        for (router, host, net, wan) in [
            (&self.ra, &self.ha, "2001:db8:a", "2001:db8::2"),
            (&self.rb, &self.hb, "2001:db8:b", "2001:db8::3"),
        ] {
            addr(router, &format!("{net}::1/64"), "lan0")?;
            addr(host, &format!("{net}::2/64"), "eth0")?;
            route(host, "default", &format!("{net}::1"))?;
            run(&[
                "ip",
                "netns",
                "exec",
                &router.name,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.forwarding=1",
            ])?;
            for other in [&self.r1, &self.r2] {
                route(other, &format!("{net}::/64"), wan)?;
            }
        }
        route(&self.ra, "2001:db8:b::/64", "2001:db8::3")?;
        route(&self.rb, "2001:db8:a::/64", "2001:db8::2")?;
        wait_no_tentative(&[
            &self.public,
            &self.ra,
            &self.rb,
            &self.ha,
            &self.hb,
            &self.r1,
            &self.r2,
        ])
    }

    /// Starts the STUN responder on R2 and the real `miniupnpd` (Debian's
    /// `miniupnpd-nftables`) on B's router, UPnP IGD, NAT-PMP and PCP on, serving its LAN side
    /// only, in secure mode (a client maps only to itself); returns both processes (killed on
    /// drop) once the daemon listens and its STUN check enabled port forwarding. `None` (after a
    /// loud SKIPPING line) without the daemon or `python3`, unless `MM_REQUIRE_NETNS=1`.
    pub fn start_miniupnpd(&self, test: &str, dir: &TempDir) -> Option<(Proc, Proc)> {
        self.start_miniupnpd_with(test, dir, true)
    }

    /// [`Self::start_miniupnpd`] with NAT-PMP and PCP off: the router speaks UPnP IGD only
    /// (nothing listens on its port 5351).
    #[allow(dead_code)]
    pub fn start_miniupnpd_upnp_only(&self, test: &str, dir: &TempDir) -> Option<(Proc, Proc)> {
        self.start_miniupnpd_with(test, dir, false)
    }

    fn start_miniupnpd_with(&self, test: &str, dir: &TempDir, pmp: bool) -> Option<(Proc, Proc)> {
        let daemon = "/usr/sbin/miniupnpd";
        let python = "/usr/bin/python3";
        for need in [daemon, python] {
            if !std::path::Path::new(need).exists() {
                if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
                    panic!("{test}: {need} not found and MM_REQUIRE_NETNS=1 (apt-get install miniupnpd-nftables python3)");
                }
                mm_platform::proto::skip_test(
                    test,
                    &format!("{need} not found (apt-get install miniupnpd-nftables python3)"),
                );
                return None;
            }
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/lab_stun.py");
        let mut stun_cmd = self.r2.command(python);
        stun_cmd
            .args([script, "203.0.113.11", "203.0.113.12"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut stun = Proc::spawn("lab STUN responder", &mut stun_cmd);
        wait_line(&mut stun, |l| l.starts_with("ready"), "the STUN responder");
        let conf = dir.path("miniupnpd.conf");
        std::fs::write(
            &conf,
            format!(
                "ext_ifname=wan0\nlistening_ip=lan0\nport=0\nenable_upnp=yes\nenable_natpmp={}\n\
             secure_mode=yes\nsystem_uptime=yes\nuuid=3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b\n\
             ext_perform_stun=yes\next_stun_host=203.0.113.11\next_stun_port=3478\n\
             allow 1024-65535 198.51.100.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
                if pmp { "yes" } else { "no" }
            ),
        )
        .expect("miniupnpd.conf");
        let pid = dir.path("miniupnpd.pid");
        let mut cmd = self.rb.command(daemon);
        cmd.arg("-f")
            .arg(&conf)
            .arg("-P")
            .arg(&pid)
            .arg("-d")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut upnp = Proc::spawn("miniupnpd", &mut cmd);
        wait_line(
            &mut upnp,
            |l| {
                if pmp {
                    l.contains("Listening for NAT-PMP/PCP traffic")
                } else {
                    l.contains("HTTP listening on port")
                }
            },
            "miniupnpd",
        );
        Some((stun, upnp))
    }
}

/// B's router's rules beside its masquerade when it runs miniupnpd: new inbound flows are
/// dropped unless a mapping's DNAT took them (forward hook); new inbound flows to the router
/// itself are dropped too (input hook), except from the lab's STUN server, whose answers from
/// its other address and port are what miniupnpd's check of its external address waits for;
/// and the chains miniupnpd fills.
const UPNP_ROUTER: &str = "table ip gate {
 chain forward_in {
  type filter hook forward priority 0; policy accept;
  iifname \"wan0\" ct state new ct status & dnat == 0 drop
 }
 chain local_in {
  type filter hook input priority 0; policy accept;
  iifname \"wan0\" ip saddr != { 203.0.113.11, 203.0.113.12 } ct state new drop
 }
}
table inet filter {
 chain forward {
  type filter hook forward priority -10; policy accept;
  jump miniupnpd
 }
 chain miniupnpd {
 }
 chain prerouting {
  type nat hook prerouting priority -100; policy accept;
  jump prerouting_miniupnpd
 }
 chain postrouting {
  type nat hook postrouting priority 100; policy accept;
  jump postrouting_miniupnpd
 }
 chain prerouting_miniupnpd {
 }
 chain postrouting_miniupnpd {
 }
}
";

/// Reads `p`'s stdout (else stderr) until a line satisfies `done`; panics with what was read
/// if the process ends or 20 s pass first.
fn wait_line(p: &mut Proc, done: impl Fn(&str) -> bool, what: &str) {
    use std::io::BufRead;
    let child = p.child.as_mut().expect("running");
    let out: Box<dyn Read + Send> = match (child.stdout.take(), child.stderr.take()) {
        (Some(o), _) => Box::new(o),
        (None, Some(e)) => Box::new(e),
        (None, None) => panic!("{what}: no output to read"),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < end {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if std::env::var("MM_TEST_NODE_STDERR").as_deref() == Ok("1") {
                    eprintln!("{line}");
                }
                let hit = done(&line);
                seen.push(line);
                if hit {
                    // Keep draining so the process never blocks on a full pipe (shown with the
                    // nodes' logs, MM_TEST_NODE_STDERR=1).
                    let show = std::env::var("MM_TEST_NODE_STDERR").as_deref() == Ok("1");
                    std::thread::spawn(move || {
                        while let Ok(line) = rx.recv() {
                            if show {
                                eprintln!("{line}");
                            }
                        }
                    });
                    return;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    panic!("{what} did not get ready; its output:\n{}", seen.join("\n"));
}

/// Starts a node in `ns` listening on UDP `udp` (no TCP) with short timings.
pub fn node(ns: &Netns, dir: &TempDir, name: &str, udp: &str, extra: &[&str]) -> JsonProc {
    let mut cmd = ns.command(node_bin());
    cmd.arg("--data")
        .arg(dir.path(name))
        .args(["--udp", udp, "--tcp", "off"])
        .args(["--keepalive", "1000", "--dead-after", "4000"])
        .args(["--connect-timeout", "3000", "--retry", "1000"])
        .args(extra);
    // MM_TEST_NODE_STDERR=1 shows the nodes' logs (with RUST_LOG=mm_platform=debug).
    if std::env::var("MM_TEST_NODE_STDERR").as_deref() != Ok("1") {
        cmd.stderr(Stdio::null());
    }
    let mut p = JsonProc::spawn(name, &mut cmd);
    p.wait_for(LIMIT, |v| v["event"] == "ready");
    p
}

/// The relay address (`ip:port`) of a nodeInfo's `mm-relay` endpoint, if any.
pub fn relayed_via(info: &Value) -> Option<String> {
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

/// The UDP endpoints (`ip:port`; `udp6` ones as `[ip]:port`) of a nodeInfo.
pub fn udp_endpoints(info: &Value) -> Vec<String> {
    info["connectionInfo"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter(|e| e["transportType"] == "udp" || e["transportType"] == "udp6")
                .map(|e| {
                    let ip = e["transportInfo"]["address"].as_str().unwrap_or("");
                    let port = &e["transportInfo"]["port"];
                    if ip.contains(':') {
                        format!("[{ip}]:{port}")
                    } else {
                        format!("{ip}:{port}")
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for a nodeInfo event whose relayed endpoint is `relay`.
pub fn wait_relayed(p: &mut JsonProc, relay: &str) -> Value {
    let r = relay.to_owned();
    p.wait_for(LIMIT, move |v| {
        v["event"] == "nodeInfo" && relayed_via(&v["nodeInfo"]).as_deref() == Some(&r)
    })["nodeInfo"]
        .clone()
}

/// `from`, given `info` (another node's nodeInfo), sends that node one message on `topic`;
/// waits until `to` (that node) has it, and returns `from`'s `path` event for it (direct or
/// relayed, and the remote address).
#[allow(dead_code)]
pub fn deliver(from: &mut JsonProc, to: &mut JsonProc, info: &Value, topic: &str) -> Value {
    let id = info["signId"].clone();
    from.cmd(json!({"cmd": "nodeInfo", "nodeInfo": info}));
    from.cmd(json!({"cmd": "send", "topic": topic, "to": id, "payload": 1}));
    let want = format!("public.{topic}");
    to.wait_for(LIMIT, |v| {
        v["event"] == "message" && v["topic"] == want.as_str()
    });
    from.wait_for(LIMIT, |v| v["event"] == "path" && v["peer"] == id)
}

/// The nodeInfo of a node's `ready` event.
pub fn ready_info(p: &JsonProc) -> Value {
    p.seen
        .iter()
        .find(|v| v["event"] == "ready")
        .expect("ready seen")["nodeInfo"]
        .clone()
}

/// Writes a bootstrap file with `infos` and returns its path.
pub fn bootstrap(dir: &TempDir, infos: &[Value]) -> String {
    let f = dir.path("bootstrap.json");
    std::fs::write(
        &f,
        serde_json::to_vec(&Value::Array(infos.to_vec())).unwrap(),
    )
    .unwrap();
    f.to_string_lossy().into_owned()
}

/// Messages seen on `topic`.
pub fn count_messages(p: &JsonProc, topic: &str) -> usize {
    p.seen
        .iter()
        .filter(|v| v["event"] == "message" && v["topic"] == topic)
        .count()
}

/// Whether the process's writable memory holds `needle` (read through /proc as root).
pub fn memory_contains(pid: u32, needle: &[u8]) -> bool {
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

/// Messages of a [`transfer`] sent but not yet acknowledged, at most: 8 MiB, half of A's
/// default queue bound for one peer (`NetConfig::peer_queue_bytes`). Sending all at once
/// overran it (the platform refused the rest with `BufferFull`, as it should).
const TRANSFER_WINDOW: usize = 256;

/// Sends `n` messages of 32 KiB from `a` to `b_id`, at most [`TRANSFER_WINDOW`] of them
/// unacknowledged at a time (A's `sent` events), and returns how long until `b` had them all
/// (checked in order).
pub fn transfer(
    a: &mut JsonProc,
    b: &mut JsonProc,
    b_id: &Value,
    topic: &str,
    n: usize,
) -> Duration {
    let blob = "x".repeat(32 * 1024);
    let t = Instant::now();
    let end = Instant::now() + Duration::from_secs(120);
    let (mut acked, mut scanned) = (0usize, a.seen.len());
    for i in 0..n {
        while i - acked >= TRANSFER_WINDOW && Instant::now() < end {
            a.collect_for(Duration::from_millis(1));
            for v in &a.seen[scanned..] {
                if v["event"] == "sent" && v["id"][0] == topic {
                    assert_eq!(v["ok"], true, "a send of the transfer failed: {v}");
                    acked += 1;
                }
            }
            scanned = a.seen.len();
        }
        a.cmd(
            json!({"cmd": "send", "id": [topic, i], "topic": topic, "to": b_id,
            "payload": {"n": i, "blob": blob}}),
        );
    }
    let full = format!("public.{topic}");
    while count_messages(b, &full) < n && Instant::now() < end {
        b.collect_for(Duration::from_millis(50));
    }
    let took = t.elapsed();
    // What A refused (a full queue says BufferFull), to name the cause of a gap.
    a.collect_for(Duration::from_millis(10));
    let refused: Vec<String> = a
        .seen
        .iter()
        .filter(|v| v["event"] == "error")
        .map(|v| v["error"].to_string())
        .take(3)
        .collect();
    let got: Vec<i64> = b
        .seen
        .iter()
        .filter(|v| v["event"] == "message" && v["topic"] == full.as_str())
        .map(|v| v["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        got,
        (0..n as i64).collect::<Vec<_>>(),
        "all, once, in order (A refused: {refused:?})"
    );
    // Drop the big events kept so far.
    b.seen.retain(|v| v["topic"] != full.as_str());
    took
}
