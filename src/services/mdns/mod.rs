//! mDNS discovery of nodes on the local network, wire-compatible with the original
//! `mm-services-mdns` 0.6.8 (on `multicast-dns` 6.1.0 and `dns-packet` 1.3.4).
//!
//! This module owns the reactor-facing part: the multicast socket and its wiring to the bus.
//! The protocol is sans-IO, in modules exposed (without stability promise) in
//! [`crate::proto::mdns`]: `state` (schedule, rate limits, checks, memory bounds) and `wire`
//! (the packets, through the `domain` crate).
//!
//! - Socket: UDP bound to `0.0.0.0:5353` (port configurable) with `SO_REUSEADDR` and
//!   `SO_REUSEPORT` (other mDNS responders and nodes on the same host share the port),
//!   membership of 224.0.0.251 and `IP_MULTICAST_IF` on the configured interface address
//!   ([`MdnsConfig::interface`], default 127.0.0.1: by default nothing leaves the machine),
//!   multicast loop on (nodes on one host hear each other), TTL 255, and
//!   `IP_MULTICAST_ALL` off on Linux (only the groups this socket joined, on its interface;
//!   other systems have no such option and are not tested). With a
//!   loopback interface, datagrams from sources other than 127.0.0.0/8 and 0.0.0.0 (what a
//!   socket without a multicast interface sends from over `lo`) are dropped too.
//! - Bus: subscribes to `self.transports.myNodeInfo` (what we answer with),
//!   `self.transports.requestBootstrapNodeInfo` and `self.transports.requestNodeInfo` (start
//!   querying), from `local` only; publishes what others answer as `transports.nodeInfo` and
//!   `transports.nodeInfoBootstrap` with the source tag `mdns`.
//! - Reading is bounded per turn ([`READ_BUDGET`] datagrams; the rest in the next turn).
//!
//! ```no_run
//! use mm_platform::services::mdns::{Mdns, MdnsConfig};
//! use mm_platform::Platform;
//!
//! let mut platform = Platform::builder()
//!     .service(Mdns::new(MdnsConfig::default()))
//!     .build()
//!     .unwrap();
//! platform.run().unwrap();
//! ```

pub(crate) mod state;
pub(crate) mod wire;

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use mio::Interest;
use socket2::{Domain, Protocol, Socket, Type};

use super::{Service, ServiceContext};
use crate::platform::{Address, Message};
use state::MdnsState;
pub use state::{MdnsStats, Timing};

/// Datagrams read in one turn at most.
pub const READ_BUDGET: usize = 64;

/// Options of the mDNS service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MdnsConfig {
    /// Address of the interface to use: multicast membership and `IP_MULTICAST_IF`. Default
    /// 127.0.0.1 (the machine only); a LAN address makes the node discoverable there.
    pub interface: Ipv4Addr,
    /// The UDP port (5353, mDNS; the original's nodes use it).
    pub port: u16,
    /// Schedule and bounds (the original's by default).
    pub timing: Timing,
}

impl Default for MdnsConfig {
    fn default() -> Self {
        MdnsConfig {
            interface: Ipv4Addr::LOCALHOST,
            port: wire::MDNS_PORT,
            timing: Timing::default(),
        }
    }
}

/// The mDNS service (see the [module docs](self)).
pub struct Mdns {
    config: MdnsConfig,
    state: MdnsState,
    socket: Option<mio::net::UdpSocket>,
    buf: Vec<u8>,
    stats: super::Shared<MdnsStats>,
}

impl Mdns {
    /// A service with these options (the socket is opened when the platform starts it).
    pub fn new(config: MdnsConfig) -> Mdns {
        Mdns {
            config,
            state: MdnsState::new(config.timing, crate::crypto::random_u64()),
            socket: None,
            buf: vec![0; wire::MAX_PACKET + 1],
            stats: super::Shared::new(MdnsStats::default()),
        }
    }

    /// A view of the service's counters, updated after each of its turns (the service itself
    /// moves into the platform).
    pub fn stats_handle(&self) -> super::Shared<MdnsStats> {
        self.stats.clone()
    }

    fn open(&self) -> io::Result<mio::net::UdpSocket> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, self.config.port).into())?;
        s.join_multicast_v4(&wire::MDNS_GROUP, &self.config.interface)?;
        s.set_multicast_if_v4(&self.config.interface)?;
        s.set_multicast_loop_v4(true)?;
        s.set_multicast_ttl_v4(255)?;
        #[cfg(target_os = "linux")]
        s.set_multicast_all_v4(false)?;
        Ok(mio::net::UdpSocket::from_std(s.into()))
    }

    /// Whether a datagram from `from` may be read: with a loopback interface, only from this
    /// machine. That includes source 0.0.0.0: a process whose socket has no multicast
    /// interface (the original's) sends through a route on `lo` with no source address.
    fn source_ok(&self, from: SocketAddr) -> bool {
        !self.config.interface.is_loopback()
            || from.ip().is_loopback()
            || from.ip().is_unspecified()
    }

    /// Reads up to [`READ_BUDGET`] datagrams; `true` if more may be waiting.
    fn read(&mut self, ctx: &mut ServiceContext<'_>) -> bool {
        let now = ctx.now();
        for _ in 0..READ_BUDGET {
            let Some(sock) = self.socket.as_ref() else {
                return false;
            };
            match sock.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    if self.source_ok(from) {
                        self.state.handle_packet(&self.buf[..n], now);
                    } else {
                        self.state.count_foreign();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("mdns: receive failed: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Sends what the machine wants sent, publishes what it found, sets the next wake-up.
    fn flush(&mut self, ctx: &mut ServiceContext<'_>, more: bool) {
        let now = ctx.now();
        self.state.handle_timeout(now);
        let dest = SocketAddr::from((wire::MDNS_GROUP, self.config.port));
        while let Some(pkt) = self.state.poll_transmit() {
            if let Some(sock) = self.socket.as_ref() {
                if let Err(e) = sock.send_to(&pkt, dest) {
                    log::debug!("mdns: send failed: {e}");
                }
            }
        }
        while let Some(info) = self.state.poll_publication() {
            let status = ctx.publish_node_info(&info, true);
            if let Err(e) = status {
                log::debug!("mdns: nodeInfo not queued: {e}");
            }
        }
        let wake = if more {
            Some(now)
        } else {
            self.state.next_deadline()
        };
        ctx.set_wake(wake);
        self.stats.set(self.state.stats());
    }
}

impl Service for Mdns {
    fn name(&self) -> &str {
        "mdns"
    }

    fn start(&mut self, ctx: &mut ServiceContext<'_>) -> io::Result<()> {
        let mut sock = self.open()?;
        ctx.register(&mut sock, 0, Interest::READABLE)?;
        self.socket = Some(sock);
        ctx.subscribe("self.transports.myNodeInfo");
        ctx.subscribe("self.transports.requestBootstrapNodeInfo");
        ctx.subscribe("self.transports.requestNodeInfo");
        // Our nodeInfo is known from the start (the listeners are bound at build).
        let info = ctx.node_info().to_json();
        let now = ctx.now();
        self.state.set_my_node_info(&info, now);
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
        match msg.topic.as_str() {
            "transports.myNodeInfo" => {
                self.state.set_my_node_info(&value, now);
            }
            "transports.requestBootstrapNodeInfo" => self.state.request_bootstrap(now),
            "transports.requestNodeInfo" => self.state.request_node_info(&value, now),
            _ => return,
        }
        self.flush(ctx, false);
    }

    fn on_io(&mut self, ctx: &mut ServiceContext<'_>, _local: usize, _event: &mio::event::Event) {
        let more = self.read(ctx);
        self.flush(ctx, more);
    }

    fn on_timer(&mut self, ctx: &mut ServiceContext<'_>) {
        let more = self.read(ctx);
        self.flush(ctx, more);
    }

    fn stop(&mut self, ctx: &mut ServiceContext<'_>) {
        if let Some(mut sock) = self.socket.take() {
            let _ = ctx.deregister(&mut sock);
        }
    }
}
