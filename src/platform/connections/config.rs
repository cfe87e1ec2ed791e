//! The connection manager's settings ([`NetConfig`]) and what it reports to the application:
//! delivery outcomes ([`DeliveryError`]) and per-connection statistics ([`ConnectionStats`]).

use std::fmt;
use std::time::Duration;

use super::MAX_OFFLINE_EXPIRY;
use crate::envelope::DEFAULT_MAX_FRAME;
use crate::identity::SignId;
use crate::offline::{OfflineLimits, DEFAULT_DEDUP_PER_PEER};
use crate::platform::Context;
use crate::transport::driver::ServerDriverLimits;
use crate::transport::TransportKind;

/// Settings of the connection manager (timeouts and bounds); every field has a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// Run listeners and connect to other nodes (default `true`). Without, remote sends return
    /// [`crate::SendError::NoTransport`].
    pub enabled: bool,
    /// A lookup with no answer fails after this long. Default 10 s.
    pub lookup_timeout: Duration,
    /// A cached nodeInfo is used for this long. Default 1 hour.
    pub node_info_ttl: Duration,
    /// One connection attempt (handshake and identify) may take this long. Default 5 s.
    pub connect_timeout: Duration,
    /// Attempts before a destination fails. Default 5 (the original's cap).
    pub max_attempts: u32,
    /// An idle active connection sends a ping after this long. Default 10 s.
    pub keepalive: Duration,
    /// A connection whose peer acknowledges nothing of what we sent for this long is dead,
    /// and is replaced by a new one if there is something to send. Default 5 s: this is also
    /// how long a peer that restarted (and so silently dropped the old session) waits for what
    /// was sent to it meanwhile; an idle connection is checked by its keepalive, so a dead idle
    /// one is noticed within `keepalive + dead_after`.
    pub dead_after: Duration,
    /// Default `expire_after` of real-time messages. Default 60 s.
    pub realtime_expiry: Duration,
    /// Default `expire_after` of offline messages (at most 7 days). Default 7 days.
    pub offline_expiry: Duration,
    /// Offline messages are retried at least this often, and this is the longest wait before a
    /// destination that failed is tried again: after its first failure it is tried again after
    /// 1 s, then 2 s, 4 s, ... up to this (the wait starts over once it connects). Default 5 s,
    /// so a peer that comes back is found within about 5 s plus a connection attempt.
    pub offline_retry: Duration,
    /// Largest incoming frame. Default 16 MiB.
    pub max_frame: usize,
    /// Messages waiting in memory per destination. Default 65,536.
    pub peer_queue_messages: usize,
    /// Bytes waiting in memory per destination. Default 16 MiB. An empty queue still takes one
    /// message up to a maximal frame ([`NetConfig::max_frame`]) whatever this bound.
    ///
    /// What a sender queues before its next turn it copies at once, and nothing goes on the
    /// wire meanwhile: with 64 MiB (the default before), a bulk sender that sends until
    /// `BufferFull` spent 21-33 ms copying 63 payloads of 1 MiB into fresh buffers before its
    /// first turn, 14-17% of a 100 MiB transfer (`nodes_bt`: 75% of the bare stream over UDP
    /// with 64 MiB, 80% with 32 MiB, 90% with 8 MiB), and an application's loop stalls that
    /// long. Raise it for peers that must absorb long bursts while connecting.
    pub peer_queue_bytes: usize,
    /// Bytes waiting in memory for all destinations together. Default 256 MiB. A real-time
    /// send that would go beyond it returns `BufferFull`, as one beyond
    /// [`NetConfig::peer_queue_bytes`] does, unless nothing waits at all (then one message up to
    /// a maximal frame is taken). Offline records loaded for sending and the platform's own
    /// messages count but are never refused for it. With the per-destination bound alone, an
    /// application sending to many peers at once could queue 16 MiB for each.
    pub send_queue_bytes: usize,
    /// Most connections (both directions). Default 1,024.
    pub max_connections: usize,
    /// Slots of `max_connections` that incoming connections from peers outside our friends
    /// and devices circles cannot take: kept for our outgoing connections (and for incoming
    /// ones from our circles). Default 128.
    pub reserved_outbound: usize,
    /// Incoming connections from one source address (IPv6: one /64 prefix) at once, not
    /// counting peers in our friends and devices circles. Default 64 (tests running many
    /// nodes on 127.0.0.1 raise it).
    pub max_inbound_per_ip: usize,
    /// Limits of the TCP listener's streams: how many, the idle time, and the admission of
    /// streams whose CurveCP handshake has not completed (a per-source cap with eviction of
    /// the oldest, a handshake deadline). Default [`ServerDriverLimits::default`].
    pub listener_limits: ServerDriverLimits,
    /// Bounds of the offline buffer.
    pub offline: OfflineLimits,
    /// Message ids remembered for de-duplication, all senders together. Past it, the least
    /// recently active sender's ids are forgotten. Default 65,536.
    pub dedup: usize,
    /// Message ids remembered per sender (its latest ones; a sender flooding ids only evicts
    /// its own). Default 4,096.
    pub dedup_per_peer: usize,
    /// Bytes of partly received frames buffered across all connections, beyond the first
    /// 64 KiB of each connection. A connection whose frame in progress
    /// does not fit stops reading its stream (the peer is flow-controlled by CurveCP) until
    /// other frames complete or connections end. Raised to at least one maximal frame
    /// ([`NetConfig::max_frame`]) so that any frame can be received. Default 64 MiB.
    pub frame_budget: usize,
    /// Ask the home router to forward a public port to our UDP listener (PCP, then NAT-PMP,
    /// then UPnP IGD; and one to our TCP listener, published once the UDP one is proven),
    /// publish the mapped endpoint once a dial-back proves it, and prefer it to a relay
    /// (default `true`). It asks only when the UDP listener is on `0.0.0.0` or a private
    /// address and the system has a default IPv4 gateway; a gateway that does not answer is
    /// not asked again. The mapping is renewed at half its lifetime and removed on close.
    pub port_mapping: bool,
    /// Happy Eyeballs (RFC 8305): a peer that publishes native UDP endpoints on both IPv6 and
    /// IPv4 is dialled on IPv6 first and on IPv4 as well once this long has passed without an
    /// answer; the first to answer carries the connection. Default 250 ms (RFC 8305's
    /// "Connection Attempt Delay"); `None` dials one endpoint at a time, IPv6 first.
    pub happy_eyeballs: Option<Duration>,
    /// Use IPv6 beside IPv4 (default `true`): a listen address `0.0.0.0` is taken as `::`
    /// (one dual-stack socket for both families; IPv4 alone where the system has no IPv6),
    /// and peers' IPv6 endpoints are dialled. `false` keeps `0.0.0.0` as given and dials
    /// IPv4 endpoints only (a listen address the application gives as `::` stays).
    pub ipv6: bool,
    /// How often a listener on `::` reads the system's global IPv6 addresses again (new ones
    /// are published, gone ones withdrawn). Default 60 s.
    pub interface_refresh: Duration,
    /// Offer relaying to nodes behind NATs, within these limits (`None`, the default: do
    /// not). The node's UDP endpoint then says so in its nodeInfo. Cargo feature `relay`.
    #[cfg(feature = "relay")]
    pub relay: Option<crate::transport::relay::RelayLimits>,
    /// A node that finds itself behind a NAT reserves a slot at a relay it knows of and
    /// publishes the relayed endpoint (default `true`; never while offering relaying). Of
    /// several candidates it takes the one of its last run first, else the nearest of up to
    /// three it measured (round trip); knowing none that works, it asks the DHT services for
    /// one (`self.transports.findRelay`). [`crate::Context::relay`] says which it uses.
    /// Cargo feature `relay`.
    #[cfg(feature = "relay")]
    pub use_relays: bool,
    /// A relay reservation is bound again this often (it keeps our NAT's mapping open).
    /// Default 10 s. Cargo feature `relay`.
    #[cfg(feature = "relay")]
    pub relay_bind_interval: Duration,
    /// Try to punch a direct UDP path for connections that go through a relay (default
    /// `true`). Cargo feature `relay`.
    #[cfg(feature = "relay")]
    pub hole_punching: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            enabled: true,
            lookup_timeout: Duration::from_secs(10),
            node_info_ttl: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 5,
            keepalive: Duration::from_secs(10),
            dead_after: Duration::from_secs(5),
            realtime_expiry: Duration::from_secs(60),
            offline_expiry: MAX_OFFLINE_EXPIRY,
            offline_retry: Duration::from_secs(5),
            max_frame: DEFAULT_MAX_FRAME,
            peer_queue_messages: 65_536,
            peer_queue_bytes: 16 << 20,
            send_queue_bytes: 256 << 20,
            max_connections: 1024,
            reserved_outbound: 128,
            max_inbound_per_ip: 64,
            listener_limits: ServerDriverLimits::default(),
            offline: OfflineLimits::default(),
            dedup: 65_536,
            dedup_per_peer: DEFAULT_DEDUP_PER_PEER,
            frame_budget: 64 << 20,
            port_mapping: true,
            happy_eyeballs: Some(Duration::from_millis(250)),
            ipv6: true,
            interface_refresh: Duration::from_secs(60),
            #[cfg(feature = "relay")]
            relay: None,
            #[cfg(feature = "relay")]
            use_relays: true,
            #[cfg(feature = "relay")]
            relay_bind_interval: Duration::from_secs(10),
            #[cfg(feature = "relay")]
            hole_punching: true,
        }
    }
}

/// Why a message was not delivered (what a delivery callback gets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryError {
    /// Its `expire_after` passed before delivery.
    Expired,
    /// The destination could not be reached (lookup timeout or attempts exhausted).
    Unreachable(String),
    /// The connection ended before every byte was acknowledged (the peer may have it).
    ConnectionLost,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::Expired => f.write_str("expired before delivery"),
            DeliveryError::Unreachable(why) => write!(f, "destination unreachable: {why}"),
            DeliveryError::ConnectionLost => f.write_str("connection lost before acknowledgement"),
        }
    }
}

impl std::error::Error for DeliveryError {}

/// A delivery callback: called once, on the reactor's thread, with the outcome.
pub type DeliveryCallback = Box<dyn FnOnce(&mut Context<'_>, Result<(), DeliveryError>) + Send>;

/// The relay a node behind a NAT uses, from `Context::relay` (cargo feature `relay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayInUse {
    /// The relay node.
    pub sign_id: SignId,
    /// Its relay address, where our relayed endpoint points.
    pub addr: std::net::SocketAddr,
    /// The round-trip time measured when it was chosen among several candidates (`None`:
    /// it was the only one, or our choice in an earlier run).
    pub rtt: Option<Duration>,
}

/// Statistics of one connection, from [`crate::platform::Platform::connections`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStats {
    /// The peer (once identified).
    pub peer: Option<SignId>,
    /// UDP or TCP.
    pub transport: TransportKind,
    /// We initiated it.
    pub outbound: bool,
    /// It is the peer's active connection.
    pub active: bool,
    /// Smoothed round-trip time, once measured.
    pub rtt: Option<Duration>,
    /// Stream bytes written by us (first transmissions).
    pub bytes_sent: u64,
    /// Stream bytes received.
    pub bytes_received: u64,
    /// Frames written.
    pub messages_sent: u64,
    /// Frames received.
    pub messages_received: u64,
    /// CurveCP blocks sent again.
    pub retransmissions: u64,
    /// Where its packets go (a TCP connection's peer, a relay while relayed), when known.
    pub remote: Option<std::net::SocketAddr>,
    /// Its packets go through a relay (never without the cargo feature `relay`).
    pub relayed: bool,
}
