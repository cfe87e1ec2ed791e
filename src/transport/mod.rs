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
//!
//! # Where the time per packet goes
//!
//! Measured with `cargo bench --bench figures -- curvecp_bulk` (one 100 MB stream, client and
//! server in two threads on 127.0.0.1, which print CPU time per data packet of each thread,
//! allocations and system calls per packet) and `perf record` of the same run, on a 2-core
//! Xeon VM shared with other work (load average 3-4 while measuring, so the CPU times, not the
//! wall-clock speeds, are the figures to trust). A data packet carries 1024 bytes of stream
//! data in a 1088-byte message, 1184 bytes on the wire.
//!
//! | per data packet | sender (client thread) | receiver (server thread) |
//! | --- | --- | --- |
//! | CPU time, before bulk receive | about 2.0-2.5 us | about 2.2-2.7 us |
//! | CPU time, with bulk receive (GRO) | about 1.9 us | about 2.0-2.1 us |
//! | of which the cipher (libsodium XSalsa20-Poly1305: Salsa20, Poly1305, HSalsa20 key derivation) | 75% (1.4 us) | 77% (1.6 us) |
//! | of which the kernel (UDP send / receive, loopback) | 13% (was 30%) | 7% (was 18-28%) |
//! | of which `memcpy`/`memset` (packet into the send batch; box to plaintext, ring buffer, application read) | 3% | 7% |
//! | of which the message layer (stream, acknowledgements, pacing, congestion control) | 4.5% | 1% |
//! | of which the packet layer and the driver | 1% | 5% |
//! | system calls per datagram | 0.065 (GSO `sendmsg`, up to 32 packets each) | 0.065 (GRO `recvmsg`, a GSO burst each; was 1 `recvfrom` per datagram) |
//! | heap allocations per packet | about 0.06 (both threads) | |
//!
//! The cipher alone (`curvecp_seal_1088B_ns`, `curvecp_open_1088B_ns`) takes 1.5 us to seal
//! and 1.8 us to open a full block on that machine, so one thread per side can move at most
//! about 550-650 MB/s whatever the rest costs; the rest is now about a fifth of each side's
//! time. The wire format fixes the cipher; a faster one would need a new protocol. TCP is in
//! the same place (cipher 72-75%, kernel 11-12%, copies 7-9%, about 0.3 system calls per
//! packet in all: netstrings of a turn go out in one write and are read 64 KiB at a time).
//!
//! What went: per-datagram receive system calls (bulk receive, [`udp`]); on the receiving
//! side the kernel no longer cuts GSO bursts into datagrams on loopback, which also took most
//! of the sender's kernel time. At the platform level, a send refused for a full queue no
//! longer copies the payload (twice) first, and the frame reader reserves a large frame once.

pub mod connection_info;
pub mod driver;
pub mod onetp;
pub mod relay;
pub mod tcp;
pub mod udp;

pub use driver::{ClientDriver, Framing, Path, ServerDriver, TransportKind};
