//! Publishing and resolving nodeInfos on the BitTorrent Mainline DHT (BEP 5), as BEP 44
//! mutable items signed with the node's own ed25519 key: its signId is the item's key, so
//! anyone who knows a signId can find that node's endpoints, with no server of ours.
//!
//! This module owns the reactor-facing part: the UDP socket, the wall clock used for `seq`,
//! the persisted `seq`, and the wiring to the bus. The protocol is sans-IO, in modules exposed
//! (without stability promise) in [`crate::proto::mainline`]: `state` (the client: lookups,
//! publication, resolution, serving when asked), `table` (the routing table), `item` (BEP 44
//! items and our nodeInfo as one) and `krpc` (the wire codec).
//!
//! - **Off unless added, and no default routers.** The application adds the service with the
//!   bootstrap addresses it chooses ([`MainlineConfig::new`]; an empty list is refused when
//!   the service starts). When every bootstrap address is a loopback one (a testnet on this
//!   machine), the service only ever talks to loopback addresses, binds 127.0.0.1, and
//!   publishes loopback endpoints; otherwise it never talks to loopback or other local-only
//!   addresses ([`table::Scope`]).
//! - **Sockets:** one IPv4 UDP socket ([`MainlineConfig::bind`]) for the IPv4 DHT, and with
//!   [`MainlineConfig::bootstrap6`] one IPv6-only socket ([`MainlineConfig::bind6`]) for the
//!   IPv6 DHT of BEP 32, each read at most [`READ_BUDGET`] datagrams per turn. The two DHTs
//!   are separate (BEP 32): each has its own machine, routing table and scope; our item is
//!   published in each, a resolution or relay search runs in each, and each one's findings
//!   are published as they come. An answer carries the nodes of the DHT it is asked in
//!   (`nodes` or `nodes6`); a `want` for the other family is not served (a node of one DHT
//!   does not hand out the other's table), as BEP 32 allows.
//! - **Bus:** subscribes to `self.transports.myNodeInfo` (what we publish, when
//!   [`MainlineConfig::publish`] is on), `self.transports.requestNodeInfo` (a signId to
//!   resolve) and `self.transports.findRelay` (a relay search), from `local` only; publishes
//!   what it resolves as `transports.nodeInfo` with the source tag `mainline`, and the
//!   addresses a relay search found as `transports.relayAddresses` (a JSON array of
//!   `"ip:port"`), which the platform asks who they are.
//! - **Relays:** when publishing and our nodeInfo offers relaying (an IPv4 UDP endpoint with
//!   `"relay": true`), that port is announced (BEP 5 `announce_peer`) under
//!   [`state::relay_info_hash`] every [`Timing::relay_announce`]; see `state`.
//! - **Storage:** the last `seq` signed, under [`SEQ_KEY`], so that a restarted node's `seq`
//!   keeps rising even if the clock went back.
//!
//! ```no_run
//! use mm_platform::services::mainline::{Mainline, MainlineConfig};
//! use mm_platform::Platform;
//!
//! // A testnet on this machine; real deployments pass routers of the public DHT.
//! let config = MainlineConfig::new(vec!["127.0.0.1:6881".parse().unwrap()]).publish(true);
//! let mut platform = Platform::builder()
//!     .service(Mainline::new(config))
//!     .build()
//!     .unwrap();
//! platform.run().unwrap();
//! ```

pub(crate) mod budget;
pub(crate) mod item;
pub(crate) mod krpc;
pub(crate) mod state;
pub(crate) mod table;

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{SystemTime, UNIX_EPOCH};

use mio::Interest;

use super::{Service, ServiceContext};
use crate::platform::{Address, Message};
use state::{MainlineState, Options};
pub use state::{MainlineStats, Timing};
use table::Scope;

/// Datagrams read in one turn at most.
pub const READ_BUDGET: usize = 64;
/// The storage key of the last `seq` signed.
pub const SEQ_KEY: &str = "mainline.seq";

/// Options of the Mainline service.
#[derive(Debug, Clone)]
pub struct MainlineConfig {
    /// Where to join the DHT: `host:port` of nodes (required; no default list).
    pub bootstrap: Vec<SocketAddrV4>,
    /// Publish our nodeInfo (off by default: resolve only).
    pub publish: bool,
    /// Answer other nodes' queries and store their items (off by default: read-only, BEP 43).
    /// Serving never makes the node a reflection amplifier: toward an address that is not in
    /// its routing table (source addresses can be forged), an answer is longer than the query
    /// only within a small byte budget (per IPv4 /24, 4 KiB at once and 1 KiB/s; all such
    /// networks together 64 KiB and 16 KiB/s), and is trimmed to the query's length beyond
    /// it (see [`crate::proto::mainline::budget`]).
    pub serve: bool,
    /// The socket's address; default 127.0.0.1:0 for a loopback testnet, 0.0.0.0:0 otherwise.
    pub bind: Option<SocketAddrV4>,
    /// Where to join the IPv6 DHT (BEP 32), beside the IPv4 one: `[host]:port` of nodes
    /// (default none: no IPv6 DHT). Either list may be empty, not both.
    pub bootstrap6: Vec<SocketAddrV6>,
    /// The IPv6 socket's address; default `[::1]:0` for a loopback testnet, `[::]:0`
    /// otherwise (IPv6 only).
    pub bind6: Option<SocketAddrV6>,
    /// BEP 44 salt of the items we publish and look up (default none: the target is SHA-1 of
    /// the signId; every node must use the same salt to find each other).
    pub salt: Vec<u8>,
    /// Timings and bounds.
    pub timing: Timing,
}

impl MainlineConfig {
    /// Options with these bootstrap addresses, resolving only, read-only.
    pub fn new(bootstrap: Vec<SocketAddrV4>) -> MainlineConfig {
        MainlineConfig {
            bootstrap,
            publish: false,
            serve: false,
            bind: None,
            bootstrap6: Vec::new(),
            bind6: None,
            salt: Vec::new(),
            timing: Timing::default(),
        }
    }

    /// Publish our nodeInfo or not.
    pub fn publish(mut self, on: bool) -> MainlineConfig {
        self.publish = on;
        self
    }

    /// Also join the IPv6 DHT (BEP 32) at these nodes.
    pub fn ipv6(mut self, bootstrap6: Vec<SocketAddrV6>) -> MainlineConfig {
        self.bootstrap6 = bootstrap6;
        self
    }

    /// [`MainlineConfig::parse_bootstrap`] for the IPv6 DHT: `[addr]:port` as they are, host
    /// names resolved to their IPv6 addresses.
    ///
    /// ```
    /// use mm_platform::services::mainline::MainlineConfig;
    ///
    /// let list = MainlineConfig::parse_bootstrap6("[::1]:6881").unwrap();
    /// assert_eq!(list.len(), 1);
    /// assert!(MainlineConfig::parse_bootstrap6("127.0.0.1:6881").is_err());
    /// ```
    pub fn parse_bootstrap6(list: &str) -> Result<Vec<SocketAddrV6>, String> {
        let mut out = Vec::new();
        for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(addr) = s.parse::<SocketAddrV6>() {
                out.push(addr);
                continue;
            }
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(format!("not host:port: {s:?}"));
            };
            if host.is_empty() || host.parse::<Ipv4Addr>().is_ok() || port.parse::<u16>().is_err() {
                return Err(format!("not [IPv6]:port or host:port: {s:?}"));
            }
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(s)
                .map_err(|e| format!("cannot resolve {s:?}: {e}"))?;
            let before = out.len();
            out.extend(resolved.filter_map(|a| match a {
                SocketAddr::V6(v6) => Some(v6),
                SocketAddr::V4(_) => None,
            }));
            if out.len() == before {
                return Err(format!("{s:?} has no IPv6 address"));
            }
        }
        Ok(out)
    }

    /// Parses `host:port,host:port,...`: IPv4 addresses as they are, host names (such as the
    /// public routers named in the README) resolved here to their IPv4 addresses. Resolving
    /// a name blocks on the system resolver, so call this while setting up, not from a turn.
    ///
    /// ```
    /// use mm_platform::services::mainline::MainlineConfig;
    ///
    /// let list = MainlineConfig::parse_bootstrap("127.0.0.1:6881, 127.0.0.1:6882").unwrap();
    /// assert_eq!(list.len(), 2);
    /// assert!(MainlineConfig::parse_bootstrap("127.0.0.1").is_err());
    /// ```
    pub fn parse_bootstrap(list: &str) -> Result<Vec<SocketAddrV4>, String> {
        let mut out = Vec::new();
        for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(addr) = s.parse::<SocketAddrV4>() {
                out.push(addr);
                continue;
            }
            // Only something shaped like `name:port` goes to the resolver.
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(format!("not host:port: {s:?}"));
            };
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("not host:port: {s:?}"));
            }
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(s)
                .map_err(|e| format!("cannot resolve {s:?}: {e}"))?;
            let before = out.len();
            out.extend(resolved.filter_map(|a| match a {
                SocketAddr::V4(v4) => Some(v4),
                SocketAddr::V6(_) => None,
            }));
            if out.len() == before {
                return Err(format!("{s:?} has no IPv4 address"));
            }
        }
        Ok(out)
    }
}

/// One DHT the service takes part in: the IPv4 one (BEP 5) or the IPv6 one (BEP 32), each
/// with its own socket and machine.
struct Lane {
    state: MainlineState,
    socket: mio::net::UdpSocket,
    stats: super::Shared<MainlineStats>,
}

/// The Mainline DHT service (see the [module docs](self)).
pub struct Mainline {
    config: MainlineConfig,
    /// The IPv4 lane (index 0, when `bootstrap` is set) and the IPv6 one (index 1, when
    /// `bootstrap6` is set).
    lanes: [Option<Lane>; 2],
    buf: Vec<u8>,
    stats: super::Shared<MainlineStats>,
    stats6: super::Shared<MainlineStats>,
}

/// The port of our nodeInfo's UDP endpoint of family `v6` that offers relaying, if any.
fn relay_port(info: &serde_json::Value, v6: bool) -> Option<u16> {
    info.get("connectionInfo")?
        .as_array()?
        .iter()
        .filter_map(crate::transport::connection_info::Endpoint::from_json)
        .find(|e| e.offers_relay && e.addr.is_ipv6() == v6)
        .map(|e| e.addr.port())
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Mainline {
    /// A service with these options (the sockets are opened when the platform starts it).
    pub fn new(config: MainlineConfig) -> Mainline {
        Mainline {
            config,
            lanes: [None, None],
            buf: vec![0; krpc::MAX_DATAGRAM + 1],
            stats: super::Shared::new(MainlineStats::default()),
            stats6: super::Shared::new(MainlineStats::default()),
        }
    }

    /// A view of the service's counters in the IPv4 DHT, updated after each of its turns.
    pub fn stats_handle(&self) -> super::Shared<MainlineStats> {
        self.stats.clone()
    }

    /// A view of the service's counters in the IPv6 DHT (BEP 32; all zero without
    /// [`MainlineConfig::bootstrap6`]).
    pub fn stats6_handle(&self) -> super::Shared<MainlineStats> {
        self.stats6.clone()
    }

    /// Reads up to [`READ_BUDGET`] datagrams of lane `i`; `true` if more may be waiting.
    fn read(&mut self, ctx: &mut ServiceContext<'_>, i: usize) -> bool {
        let now = ctx.now();
        let Some(lane) = self.lanes.get_mut(i).and_then(Option::as_mut) else {
            return false;
        };
        for _ in 0..READ_BUDGET {
            match lane.socket.recv_from(&mut self.buf) {
                // A datagram filling the buffer was longer than MAX_DATAGRAM: the codec
                // refuses it by its length.
                Ok((n, from)) => lane.state.handle_datagram(&self.buf[..n], from, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // ICMP errors surface here on Linux (port unreachable); keep reading.
                    log::debug!("mainline: receive failed: {e}");
                }
            }
        }
        true
    }

    /// Runs the machines, sends, publishes, persists, sets the next wake-up.
    fn flush(&mut self, ctx: &mut ServiceContext<'_>, more: bool) {
        let now = ctx.now();
        let mut wake: Option<std::time::Instant> = more.then_some(now);
        let mut seq = None;
        for lane in self.lanes.iter_mut().flatten() {
            let state = &mut lane.state;
            state.handle_timeout(now);
            while let Some((to, bytes)) = state.poll_transmit() {
                if let Err(e) = lane.socket.send_to(&bytes, to) {
                    log::debug!("mainline: send to {to} failed: {e}");
                }
            }
            while let Some(info) = state.poll_publication() {
                let status = ctx.publish_node_info(&info, false);
                if let Err(e) = status {
                    log::debug!("mainline: nodeInfo not queued: {e}");
                }
            }
            while let Some(peers) = state.poll_relay_peers() {
                let list: Vec<String> = peers.iter().map(ToString::to_string).collect();
                log::debug!("mainline: relay search found {}", list.join(", "));
                let status = ctx
                    .messaging()
                    .send("transports.relayAddresses", "local", &list);
                if let Err(e) = status {
                    log::debug!("mainline: relay addresses not queued: {e}");
                }
            }
            if let Some(s) = state.take_seq_to_persist() {
                seq = Some(seq.map_or(s, |q: i64| q.max(s)));
            }
            if !more {
                wake = match (wake, state.next_deadline()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            lane.stats.set(state.stats());
        }
        if let Some(seq) = seq {
            if let Err(e) = ctx.storage().put(SEQ_KEY, seq.to_string().as_bytes()) {
                log::warn!("mainline: cannot store seq: {e}");
            }
        }
        ctx.set_wake(wake);
    }

    /// Opens lane `i` (0: IPv4, 1: IPv6) bootstrapped from `bootstrap`, bound to `bind` or
    /// the scope's default.
    fn open_lane(
        &self,
        ctx: &mut ServiceContext<'_>,
        i: usize,
        bootstrap: Vec<SocketAddr>,
        bind: Option<SocketAddr>,
    ) -> io::Result<Lane> {
        let scope = Scope::of(&bootstrap);
        let bind = bind.unwrap_or(match scope {
            Scope::Loopback => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Scope::Internet => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            Scope::Loopback6 => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
            Scope::Internet6 => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        });
        let mut socket = if bind.is_ipv6() {
            // IPv6 only: the IPv4 DHT is the other lane's.
            crate::transport::udp::bind_v6(bind, true)?
        } else {
            mio::net::UdpSocket::bind(bind)?
        };
        ctx.register(&mut socket, i, Interest::READABLE)?;
        let signer = self
            .config
            .publish
            .then(|| ctx.identity().sign_keypair().clone());
        let mut state = MainlineState::new(
            Options {
                bootstrap,
                salt: self.config.salt.clone(),
                serve: self.config.serve,
                timing: self.config.timing,
            },
            signer,
            ctx.now(),
        );
        if let Ok(Some(stored)) = ctx.storage().get(SEQ_KEY) {
            if let Some(seq) = std::str::from_utf8(&stored)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
            {
                state.set_last_seq(seq);
            }
        }
        if self.config.publish {
            let info = ctx.node_info().to_json();
            state.set_my_node_info(&info, unix_secs(), ctx.now());
            state.set_relay_port(relay_port(&info, i == 1), ctx.now());
        }
        let stats = if i == 0 {
            self.stats.clone()
        } else {
            self.stats6.clone()
        };
        Ok(Lane {
            state,
            socket,
            stats,
        })
    }
}

impl Service for Mainline {
    fn name(&self) -> &str {
        "mainline"
    }

    fn start(&mut self, ctx: &mut ServiceContext<'_>) -> io::Result<()> {
        if self.config.bootstrap.is_empty() && self.config.bootstrap6.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mainline: no bootstrap addresses (there is no default list)",
            ));
        }
        if !self.config.bootstrap.is_empty() {
            let boot = self.config.bootstrap.iter().map(|a| (*a).into()).collect();
            let bind = self.config.bind.map(SocketAddr::V4);
            self.lanes[0] = Some(self.open_lane(ctx, 0, boot, bind)?);
        }
        if !self.config.bootstrap6.is_empty() {
            let boot = self.config.bootstrap6.iter().map(|a| (*a).into()).collect();
            let bind = self.config.bind6.map(SocketAddr::V6);
            self.lanes[1] = Some(self.open_lane(ctx, 1, boot, bind)?);
        }
        ctx.subscribe("self.transports.requestNodeInfo");
        ctx.subscribe("self.transports.findRelay");
        if self.config.publish {
            ctx.subscribe("self.transports.myNodeInfo");
        }
        self.flush(ctx, false);
        Ok(())
    }

    fn on_message(&mut self, ctx: &mut ServiceContext<'_>, msg: &Message) {
        if msg.sender != Address::Local || msg.protocol != "ms" {
            return;
        }
        let Ok(value) = msg.json::<serde_json::Value>() else {
            return;
        };
        let now = ctx.now();
        let topic = msg.topic.as_str();
        if !matches!(
            topic,
            "transports.myNodeInfo" | "transports.requestNodeInfo" | "transports.findRelay"
        ) {
            return;
        }
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            let Some(lane) = lane.as_mut() else { continue };
            let state = &mut lane.state;
            match topic {
                "transports.myNodeInfo" => {
                    state.set_my_node_info(&value, unix_secs(), now);
                    state.set_relay_port(relay_port(&value, i == 1), now);
                }
                "transports.requestNodeInfo" => state.request_node_info(&value, now),
                _ => state.find_relays(now),
            }
        }
        self.flush(ctx, false);
    }

    fn on_io(&mut self, ctx: &mut ServiceContext<'_>, local: usize, _event: &mio::event::Event) {
        let more = self.read(ctx, local);
        self.flush(ctx, more);
    }

    fn on_timer(&mut self, ctx: &mut ServiceContext<'_>) {
        let more = self.read(ctx, 0) | self.read(ctx, 1);
        self.flush(ctx, more);
    }

    fn stop(&mut self, ctx: &mut ServiceContext<'_>) {
        for lane in self.lanes.iter_mut().filter_map(Option::take) {
            let mut socket = lane.socket;
            let _ = ctx.deregister(&mut socket);
        }
    }
}
