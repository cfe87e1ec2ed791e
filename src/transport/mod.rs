//! Transports: the sockets under CurveCP, in mio, and the drivers that connect them to the
//! sans-IO state machines of [`crate::curvecp`].
//!
//! - [`udp`]: one datagram is one CurveCP packet, byte for byte (what the reference tools
//!   speak).
//! - [`tcp`]: one netstring is one CurveCP packet, over a non-blocking stream with bounded
//!   buffers (and, for the compatibility framing, one frame per write).
//! - [`onetp`]: the 1tp compatibility framing of the original JS nodes (DESIGN §4,
//!   `js-compat.md`), sans-IO: the session datagram and socket-layer codecs, the stateless
//!   accepting side, and the connecting side's [`onetp::Dialer`].
//! - [`driver`]: [`driver::ClientDriver`] and [`driver::ServerDriver`], which own sockets and
//!   the clock and move packets between them and a [`crate::curvecp::client::Client`] or
//!   [`crate::curvecp::server::Server`]. They are registered into a `mio::Poll` the caller owns,
//!   so an application (or the platform's reactor) can drive several of them in one loop.
//!   Both speak either [`Framing`]: a server tells them apart per datagram and per TCP stream
//!   (a connection's [`driver::Path::framing`]), a client is told which to use
//!   ([`driver::ClientDriver::connect_with_framing`]).
//! - [`connection_info`]: the endpoints a node publishes, with the native-framing mark.
//!
//! This is the only layer, with the platform's reactor, that reads the clock or touches a
//! socket.

pub mod connection_info;
pub mod driver;
pub mod onetp;
pub mod relay;
pub mod tcp;
pub mod udp;

pub use driver::{ClientDriver, Framing, Path, ServerDriver, TransportKind};
