//! Drivers that run the sans-IO CurveCP state machines over mio sockets.
//!
//! A driver owns its sockets and reads the clock; the caller owns the `mio::Poll`, hands each
//! event to the driver whose token it is ([`ServerDriver::owns`]), then calls `flush` and
//! sleeps until the earliest `next_deadline`. That keeps several drivers (and other sources:
//! pipes, wakers) in one loop:
//!
//! ```no_run
//! use std::time::Instant;
//! use mio::{Events, Poll, Token};
//! use mm_platform::proto::crypto::BoxKeyPair;
//! use mm_platform::proto::curvecp::server::ServerConfig;
//! use mm_platform::proto::transport::ServerDriver;
//!
//! let mut poll = Poll::new()?;
//! let config = ServerConfig::new(BoxKeyPair::generate());
//! let mut server = ServerDriver::bind(
//!     poll.registry(), Token(0), config,
//!     Some("127.0.0.1:0".parse().unwrap()), Some("127.0.0.1:0".parse().unwrap()),
//!     Instant::now(),
//! )?;
//! let mut events = Events::with_capacity(256);
//! loop {
//!     let now = Instant::now();
//!     let timeout = server.next_deadline().map(|d| d.saturating_duration_since(now));
//!     poll.poll(&mut events, timeout)?;
//!     for event in events.iter() {
//!         server.handle_event(poll.registry(), event, Instant::now())?;
//!     }
//!     while let Some(_event) = server.poll_event() { /* read and write streams */ }
//!     server.flush(poll.registry(), Instant::now())?;
//! }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Batching: a driver turn's packets go out together (UDP through
//! [`UdpEndpoint::batch_commit`]: GSO or `sendmmsg`; TCP as one write per stream). Reading
//! stops after 128 datagrams so the application gets its turn (`next_deadline` then asks for
//! an immediate one), and while a socket is drained the packets due (acknowledgements above
//! all) go out after every 32 datagrams. After a `flush` that read packets, `next_deadline`
//! also asks for an immediate turn, so data read there reaches the application at once.
//!
//! Paths: a server connection replies on the path its Initiate came on, a UDP address, a 1tp
//! session on the UDP socket, or one TCP stream ([`Path`]). A TCP stream that closes, or sends
//! bytes that are not netstrings, is dropped alone; the CurveCP connection it carried then
//! times out in the state machine. When a CurveCP connection ends, the TCP stream that carried
//! it is closed.
//!
//! TCP admission: a UDP Hello costs the server no state (its Cookie is stateless), but an accepted TCP stream
//! holds a descriptor and a slot of [`ServerDriverLimits::max_tcp_streams`] from its
//! accept. So accepted streams are *unauthenticated* until the CurveCP handshake they carry
//! completes (the server accepted an Initiate on them: [`ServerEvent::Accepted`]), and those
//! are held on a short leash:
//! - at most [`ServerDriverLimits::max_unauthenticated_tcp_per_source`] per source address
//!   (an IPv4 address, or the /64 prefix of an IPv6 one, as the connection manager counts
//!   its per-address limit); a new stream from a source at its limit evicts that source's
//!   oldest unauthenticated stream, so one address can never hold more, and a legitimate peer
//!   sharing it still gets in;
//! - when the whole table is full, a new stream evicts the oldest unauthenticated stream of
//!   any source (only a table full of authenticated streams refuses it): a flood from many
//!   addresses slows handshakes down but never shuts newcomers out;
//! - each must complete its handshake within [`ServerDriverLimits::tcp_handshake_timeout`]
//!   of its accept (at most [`ServerDriverLimits::tcp_idle`]), or it is closed.
//!
//! Evicted, timed-out and refused streams are reset (`SO_LINGER` 0), so they leave no
//! `TIME_WAIT` behind. The unauthenticated streams are kept in accept order with their
//! deadlines, so evicting the oldest and closing the due ones cost a lookup per stream, and
//! [`ServerDriver::next_deadline`] includes the earliest handshake deadline exactly: no scan of
//! the streams, no periodic wake-up. Accepting stops after [`ACCEPT_BATCH`] streams per
//! event and goes on in `flush` (a fast flood must not keep the application from its turn).
//! [`ServerDriver::tcp_stats`] counts what admission did; each closing is logged (debug) with
//! its cause.
//!
//! Framings ([`Framing`], docs/ARCHITECTURE.md §4): the native one (one datagram or one
//! netstring per CurveCP packet) and the 1tp compatibility framing of the original JS nodes
//! ([`super::onetp`]).
//! - A [`ServerDriver`] serves both on the same ports. The transport's dispatcher sorts each
//!   datagram, and each TCP stream by its first frame, by its first byte (docs/ARCHITECTURE.md
//!   §4.3), and the driver hands it to that kind's handler (sans-IO, in this module's private
//!   `inbound`). UDP: a datagram whose first byte is a 1tp session type (0x00-0x05) goes to
//!   the stateless 1tp accepting side (SYN answered by SYN_ACK, PING by PONG, FIN and RST by
//!   ACK; an RST also removes the connection its session carried), and the CurveCP packets it
//!   carries get the path [`Path::UdpCompat`] (source address and session id); one starting
//!   with `M` is a relay, punch or dial-back datagram ([`super::relay`]; the relay and punch
//!   ones are dropped without the cargo feature `relay`); anything else is a
//!   native CurveCP packet. TCP: each stream decides by the first byte of its first frame
//!   (`Q`: native; PING 0x08 or DATA 0x02: compatibility; anything else: the stream is
//!   closed) and keeps that framing. A compat stream answers PING with PONG, unwraps DATA,
//!   wraps what it sends and writes one frame per write (the JS reader takes one netstring
//!   per read). A connection's framing is [`Path::framing`] of its path.
//! - A [`ClientDriver`] made with [`ClientDriver::connect_with_framing`] and
//!   [`Framing::Compat`] runs a [`Dialer`] first (UDP: SYN, SYN_ACK, ACK, then PING, PONG;
//!   TCP: PING, PONG) and holds its CurveCP client back until the dialer is open; then every
//!   packet is wrapped and unwrapped. A dialer that gives up is the driver's
//!   [`ClientDriver::transport_error`].
//!
//! Wrapped packets are up to [`onetp::MAX_DATAGRAM`] bytes, more than a [`MAX_PACKET`] batch
//! slot: compatibility packets on UDP bypass the send batch and go out with one `send_to`
//! each (the JS peers, which take about one block a second at first, set the pace there
//! anyway). TCP streams that may carry compat frames accept frames up to
//! [`onetp::MAX_SOCKET_PACKET`] bytes.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::debug;
use mio::event::Event;
use mio::net::TcpListener;
use mio::{Interest, Registry, Token};
use slab::Slab;

use super::onetp::{self, Dialer, SessionId, MAX_DATAGRAM};
use super::relay;
#[cfg(feature = "relay")]
use super::relay::{ProbeInput, Prober, Relay, RelayLimits};
use super::tcp::{FramedStream, ReadStatus};
use super::udp::UdpEndpoint;
use crate::curvecp::client::{Client, ClientConfig};
use crate::curvecp::server::{ConnectionId, Server, ServerConfig, ServerEvent};
use crate::curvecp::MAX_PACKET;

/// Which transport carries the packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// One datagram per packet.
    Udp,
    /// One netstring per packet on a TCP stream.
    Tcp,
}

/// Datagrams read from one socket per event before the driver yields to the rest of the loop
/// (edge-triggered readiness is then re-armed by the driver itself on the next `flush`). A
/// window's worth (128 blocks): the application then gets to read before more arrives, or a
/// fast sender (whose blocks are acknowledged during the batch) would overrun the receive
/// window while the application waits for its turn.
const READ_BATCH: usize = 128;
/// While draining a socket, due packets (acknowledgements above all) are sent after every this
/// many datagrams read, so that a long read batch does not hold the peer's window shut.
const TRANSMIT_EVERY: usize = 32;
/// Frames read from one TCP stream per event (or per `flush` that comes back to it) before
/// the application gets a turn. Half of [`READ_BATCH`]: a stream's frames keep arriving while
/// it is read, and `flush` may read a batch right after the event's batch, so up to two
/// batches wait unread besides a sender's window in flight; two halves of a window and the
/// window itself fit the default receive window (256 KiB), where two whole windows overran it.
const TCP_READ_BATCH: usize = READ_BATCH / 2;

/// How CurveCP packets are put on a transport (docs/ARCHITECTURE.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// One datagram, or one netstring on TCP, per CurveCP packet (Rust nodes, the reference
    /// tools).
    Native,
    /// The 1tp compatibility framing of the original JS nodes ([`super::onetp`]).
    Compat,
}

/// Where a server connection's packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// A UDP peer address (native framing).
    Udp(SocketAddr),
    /// A 1tp session on the UDP socket (compatibility framing): the peer's address and the
    /// session id its datagrams carry.
    UdpCompat {
        /// The peer's address.
        addr: SocketAddr,
        /// The 1tp session id.
        session: SessionId,
    },
    /// A client reached through a relay ([`super::relay`], native framing): the relay's
    /// address and the client's address as the relay sees it. Never without the cargo
    /// feature `relay`.
    Relayed {
        /// The relay's UDP address.
        relay: SocketAddr,
        /// The client's address as the relay sees it.
        peer: SocketAddr,
    },
    /// One accepted TCP stream (slot and generation, so a reused slot is not confused), with
    /// the framing its first frame chose.
    Tcp {
        /// The stream's slot.
        slot: usize,
        /// The slot's generation when the stream was accepted.
        generation: u64,
        /// The stream's framing.
        framing: Framing,
    },
}

impl Path {
    /// The framing packets on this path use.
    pub fn framing(&self) -> Framing {
        match self {
            Path::Udp(_) | Path::Relayed { .. } => Framing::Native,
            Path::UdpCompat { .. } => Framing::Compat,
            Path::Tcp { framing, .. } => *framing,
        }
    }

    /// The transport under this path.
    pub fn kind(&self) -> TransportKind {
        match self {
            Path::Udp(_) | Path::UdpCompat { .. } | Path::Relayed { .. } => TransportKind::Udp,
            Path::Tcp { .. } => TransportKind::Tcp,
        }
    }

    /// Where packets on this path go and whether through a relay: the relay's address, or
    /// the peer's own (`None` for a TCP stream, whose address the driver knows).
    pub fn remote(&self) -> Option<(SocketAddr, bool)> {
        match self {
            Path::Udp(a) | Path::UdpCompat { addr: a, .. } => Some((*a, false)),
            Path::Relayed { relay, .. } => Some((*relay, true)),
            Path::Tcp { .. } => None,
        }
    }
}

/// The burst cap of a stream on `path`: [`super::tcp::TCP_MAX_BURST`] over TCP, none
/// otherwise.
fn path_burst(path: &Path) -> Option<u32> {
    matches!(path, Path::Tcp { .. }).then_some(super::tcp::TCP_MAX_BURST)
}

/// The path changes a server connection's client may make (roaming): from a relayed path or a
/// native UDP address to a native UDP address (a punched path, a NAT that re-mapped), never
/// back to a relay and never across framings or onto TCP.
fn may_roam(old: &Path, new: &Path) -> bool {
    matches!(
        (old, new),
        (Path::Relayed { .. } | Path::Udp(_), Path::Udp(_))
    )
}

/// What a [`ServerDriver`] learnt from relay datagrams for the connection manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatEvent {
    /// A relay confirmed our reservation's bind and saw our listening socket from `observed`
    /// (never without the cargo feature `relay`).
    Bound {
        /// The relay's UDP address.
        relay: SocketAddr,
        /// Our listening socket's address as the relay sees it.
        observed: SocketAddr,
    },
    /// The dial-back probe we expect ([`ServerDriver::expect_dial_back`]) reached our
    /// listening UDP socket: strangers can dial us there.
    DialedBack {
        /// Where it came from (the dialling peer's fresh socket).
        from: SocketAddr,
    },
    /// A node we asked who it is ([`ServerDriver::ask_whois`]) answered from the address we
    /// asked, with our nonce: it offers relaying there, as the node `sign`.
    RelayIs {
        /// The address asked.
        addr: SocketAddr,
        /// The signId it gave.
        sign: [u8; 32],
    },
}

mod client;
mod inbound;
// The relayed and punched paths; without the `relay` feature, stand-ins that have none.
mod race;
#[cfg_attr(not(feature = "relay"), path = "relay_off.rs")]
mod relayed;
mod server;

pub use client::ClientDriver;
pub use inbound::CompatStats;
#[cfg(feature = "relay")]
pub use relayed::{MAX_BOUND_RELAYS, MAX_PUNCHES};
pub use server::{ServerDriver, ServerDriverLimits, TcpStats, ACCEPT_BATCH};
