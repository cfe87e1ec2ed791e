//! CurveCP, sans-IO: packets, the client and server handshakes, and the message layer.
//!
//! Nothing in this module touches a socket or a clock. Every entry point takes the bytes that
//! arrived and `now`, and hands back bytes to send and the next deadline; the drivers in
//! [`crate::transport`] own the sockets and the clock. This is what makes the deterministic
//! loss/reorder tests in `tests/` possible.
//!
//! - [`packet`]: byte layouts of Hello, Cookie, Initiate, server Message and client Message,
//!   with every length, magic and extension check, and the DNS server-name encoding.
//! - [`cookie`]: the server's minute keys and cookies.
//! - [`client`] / [`server`]: the crypto-layer state machines.
//! - [`message`]: the message-layer codec (16..1088-byte messages inside the boxes).
//! - [`stream`]: the reliable byte stream built from messages (acknowledgements,
//!   retransmission, windows, EOF); its unacknowledged bytes, copied or owned, live in
//!   `sendbuf`.
//! - [`congestion`]: congestion controllers behind the [`congestion::Congestion`] trait.

pub mod client;
pub mod congestion;
pub mod cookie;
pub mod message;
pub mod packet;
mod sendbuf;
pub mod server;
pub mod stream;

/// A 16-byte CurveCP extension (server or client).
pub type Extension = [u8; 16];

/// The largest packet either side sends or accepts (a client Initiate with a 640-byte message
/// or a client Message with a 1088-byte message). Driver buffers are this size.
pub const MAX_PACKET: usize = 1184;
/// The largest message a Message packet carries.
pub const MAX_MESSAGE: usize = 1088;
/// The largest message an Initiate carries (the client's limit until the server has spoken).
pub const MAX_INITIATE_MESSAGE: usize = 640;
/// The most blocks (sent and not yet removed from the head of the queue) a [`stream::Stream`]
/// keeps; [`congestion::FastStart`]'s window stops at twice this. Here, not in [`stream`], so
/// that the congestion controllers need nothing of the stream that consults them.
pub const MAX_BLOCKS: usize = 128;
