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
//! server in two threads on 127.0.0.1; it prints the CPU time per data packet of each thread,
//! allocations and system calls per packet, and the cipher alone) and `perf record` of the
//! same run, on a 2-core Xeon VM shared with other work (load average about 2.5 while
//! measuring: the CPU times, not the wall-clock speeds, are the figures to trust). "Before" is
//! the code of issue 13's start, "after" this one; medians of three interleaved runs. A data
//! packet carries 1024 bytes of stream data in a 1088-byte message, 1184 bytes on the wire.
//!
//! | per data packet, UDP | sender (client thread) | receiver (server thread) |
//! | --- | --- | --- |
//! | CPU time before | 2.06 us | 2.28 us |
//! | CPU time after | 1.54 us | 1.55 us |
//! | of which the cipher (Salsa20 and Poly1305; XSalsa20's HSalsa20 is now once per connection) | about 70% | about 70% |
//! | of which the kernel (UDP send or receive, loopback) | 12-14% (was 30%) | 10-13% (was 18-28%) |
//! | of which `memcpy`/`memset` (packet into the send batch; box to plaintext, ring, application read) | 4-5% | 4-5% |
//! | of which the message layer (stream, acknowledgements, pacing, congestion control) | 5-8% | 2% |
//! | of which the packet layer and the driver | 2% | 6-8% |
//! | system calls per datagram | 0.064 (GSO `sendmsg`, up to 32 packets each) | 0.064 (GRO `recvmsg`, a GSO burst each; was one `recvfrom` per datagram) |
//! | heap allocations per packet (both threads) | 0.02 (was 0.05) | |
//!
//! Over TCP the CPU time per packet went from 1.68 / 1.78 us to 1.54 / 1.49 us (sender /
//! receiver; about 0.3 system calls per packet in all: the netstrings of a turn go out in one
//! write and are read 64 KiB at a time). The cipher alone (`curvecp_seal_1088B_ns`,
//! `curvecp_open_1088B_ns`, with a connection's cached subkey) takes about 1.1 us to seal or
//! open a full block on that machine, so one thread per side can never move more than about
//! 900 MB/s whatever the rest costs; the rest is now about a quarter of each side's time. The
//! wire format fixes the cipher.
//!
//! What went: per-datagram receive system calls, and on loopback the kernel's cutting of GSO
//! bursts into datagrams (bulk receive with GRO, [`udp`]); one HSalsa20 per box
//! ([`crate::crypto::SharedKey::cache_nonce_prefix`]); a receive ring freed and zero-allocated
//! again every turn by a reader that drains it ([`crate::curvecp::stream::RING_IDLE`], which
//! also lets an idle connection keep no ring: the server's heap per idle connection went from
//! 5.3 to 1.8 KB, `curvecp_scale` and `curvecp_idle_memory`). At the
//! platform level, a send refused for a full queue no longer copies the payload (twice)
//! first, and the frame reader reserves a large frame once.

pub mod connection_info;
pub mod driver;
pub mod onetp;
pub mod relay;
pub mod tcp;
pub mod udp;

pub use driver::{ClientDriver, Framing, Path, ServerDriver, TransportKind};
