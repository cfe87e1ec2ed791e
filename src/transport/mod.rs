//! Transports: the sockets under CurveCP, in mio, and the drivers that connect them to the
//! sans-IO state machines of [`crate::curvecp`].
//!
//! - [`udp`]: one datagram is one CurveCP packet, byte for byte (what the reference tools
//!   speak): the endpoint with its send batches and bulk receive.
//! - [`tcp`]: one netstring is one CurveCP packet, over a non-blocking stream with bounded
//!   buffers (and, for the compatibility framing, one frame per write).
//! - `socket` (private): the system calls under [`udp`] and [`tcp`] (GSO and `sendmmsg`
//!   sends, GRO and `recvmmsg` receives on Linux with a portable path elsewhere, socket
//!   options, the raw TCP `recv`); the only file of the transports with raw pointers.
//! - [`onetp`]: the 1tp compatibility framing of the original JS nodes (docs/ARCHITECTURE.md
//!   §4.4), sans-IO: the session datagram and socket-layer codecs, the stateless accepting
//!   side, and the connecting side's [`onetp::Dialer`].
//! - [`relay`]: relayed and punched UDP paths and dial-back probes (docs/ARCHITECTURE.md §4.3,
//!   §7.3), sans-IO: their datagrams, the relay's forwarding table, the hole-punching prober
//!   (those two, and the drivers' relayed paths, only with the cargo feature `relay`).
//! - [`portmap`]: asking the home router for a port mapping (PCP, then NAT-PMP), sans-IO.
//! - [`upnp`]: the same with UPnP IGD (SSDP discovery, SOAP over HTTP), sans-IO.
//! - `dispatch` (private): the one function, sans-IO, that sorts a UDP datagram or a TCP
//!   stream's first frame into the handler it belongs to (native CurveCP, 1tp, relay), used by
//!   both read paths of the server driver (docs/ARCHITECTURE.md §4.3).
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
//! allocations and system calls per packet, and the cipher alone beside libsodium's) and
//! `perf record` of the same run, on a 2-core Xeon VM (Sapphire Rapids, AVX-512 with IFMA)
//! shared with other work: its speed changes by a third from one minute to the next, so only
//! interleaved runs are compared. "Before" is the code of issue 13's second session start
//! (commit 921b7e4), "after" this one: medians of five interleaved runs of each binary. A data
//! packet carries 1024 bytes of stream data in a 1088-byte message, 1184 bytes on the wire.
//!
//! | per data packet | UDP sender | UDP receiver | TCP sender | TCP receiver |
//! | --- | --- | --- | --- | --- |
//! | CPU time before | 1.93 us | 1.73 us | 2.10 us | 2.06 us |
//! | CPU time after | 1.19 us | 0.99 us | 1.38 us | 1.22 us |
//! | of which the cipher | 56% | 55% | 33% | 42% |
//! | of which the kernel | 20% | 21% | 45% | 35% |
//! | of which `memcpy`/`memset` | 8% | 6% | 9% | 11% |
//! | of which the message layer (stream, acknowledgements, pacing, congestion control) | 10% | 3% | 8% | 3% |
//! | of which the packet layer and the driver | 6% | 15% | 4% | 9% |
//!
//! Bulk throughput in the same interleaved runs: UDP 513 -> 807 MB/s, TCP 361 -> 547 MB/s (in
//! a faster minute of the machine, UDP 462 -> 976 and TCP 364 -> 583). The shares of each
//! side's time are from `perf` of one run. System calls: over UDP 0.031 per datagram each way
//! (GSO `sendmsg` and GRO `recvmsg`, a burst each, now up to 64 datagrams: the congestion
//! controller's bursts hold about a millisecond at its rate); over TCP one write per turn of
//! at most 16 blocks, and reads of 64 KiB.
//!
//! The cipher: XSalsa20-Poly1305, fixed by the wire format. libsodium 1.0.18 seals or opens a
//! full message box in about 1.1 us here (`curvecp_seal_1088B_libsodium_ns`): AVX2 Salsa20
//! that finishes a box's last blocks one at a time, and SSE2 Poly1305. On CPUs with AVX-512 the
//! crate's own code does it in about 0.5 us (`curvecp_seal_1088B_ns`): Salsa20 16 blocks at a
//! time in `zmm` lanes, the last two blocks of the next eight boxes of a connection in one
//! shared pass (their nonces count up), and Poly1305 eight blocks at a time with IFMA
//! (`crate::crypto`, tested byte for byte against libsodium).
//!
//! The kernel: over TCP most of the sender's kernel time is the copy into the socket (12% of
//! its samples) and, in this VM, waking the receiving thread (11% at the IRQ-restoring unlock
//! where the hypervisor's cost of the wake-up lands, 6% in the task switch); larger writes did
//! not help (whole-window bursts overflowed the write buffer and halved the speed), nor did a
//! larger window or finer pacing waits.
//!
//! What did help over TCP was overlap. A receiver drained its socket until `WouldBlock`
//! before it sent anything back, so a fast sender's whole 128-block window was read before one
//! acknowledgement left (about 100 blocks per acknowledgement): the two sides took turns, and
//! about a third of the two cores sat idle. Both drivers now read TCP frames 32 at a time
//! ([`tcp::FramedStream::read_frames_up_to`]), sending what is due between groups as over
//! UDP, and at most 64 per turn before the application reads (two turns' worth and a window
//! in flight fit the 256 KiB receive window). Five interleaved runs against the code before
//! (commit 72ade0b): TCP 518 -> 752 MB/s, CPU per data packet 1.45 -> 1.33 us (sender) and
//! 1.31 -> 1.13 us (receiver); UDP within the noise.
//!
//! Earlier: per-datagram receive system calls, and on loopback the kernel's cutting of GSO
//! bursts into datagrams, went with bulk receive ([`udp`]); one HSalsa20 per box with
//! [`crate::crypto::SharedKey::cache_nonce_prefix`]; a receive ring freed and zero-allocated
//! again every turn by a reader that drains it ([`crate::curvecp::stream::RING_IDLE`], which
//! also lets an idle connection keep no ring: the server's heap per idle connection went from
//! 5.3 to 1.8 KB, `curvecp_scale` and `curvecp_idle_memory`); a TCP read buffer zero-filled on
//! every wake-up ([`tcp::FramedStream::read_frames`] reads into spare capacity). At the
//! platform level, a send refused for a full queue copies nothing, a `bt` payload is copied
//! once into its frame, large frame and payload buffers are reused both ways (fresh ones are
//! faulted in with one system call), an incoming frame is read straight from the stream and a
//! large payload takes over its frame's buffer, and `torrenting().on_bytes` lends the payload
//! to the callback instead of copying it. A frame of 16 KiB or more goes into the stream whole
//! ([`crate::curvecp::stream::Stream::write_owned`]) instead of being copied into its send
//! buffer, and is fetched into the cache a block ahead while the block before it is sealed:
//! it was written when it was queued, up to 16 MiB earlier, and without the prefetch reading it
//! cold cost what the copy had saved. In ten interleaved `nodes_bt` runs against the code
//! before (68dd66d, which also lacked the frame pool fix), `bt` as a share of bare bulk went
//! 81.7 -> 83.5% (UDP) and 77.5 -> 81.2% (TCP).

pub mod connection_info;
mod dispatch;
pub mod driver;
pub mod onetp;
pub mod portmap;
pub mod relay;
mod socket;
pub(crate) use socket::interface_ipv6_addrs;
pub mod tcp;
pub mod udp;
pub mod upnp;

pub use driver::{ClientDriver, Framing, Path, ServerDriver, TransportKind};

/// Where a connection comes from, as per-source limits count it: an IPv4 address (IPv4-mapped
/// IPv6 ones included), or the /64 prefix of an IPv6 one (one host usually owns a whole /64).
/// Used by the TCP listener's admission
/// ([`driver::ServerDriverLimits::max_unauthenticated_tcp_per_source`]) and the connection
/// manager's [`crate::NetConfig::max_inbound_per_ip`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum SourceKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl SourceKey {
    /// The key of `ip`.
    pub(crate) fn of(ip: std::net::IpAddr) -> SourceKey {
        use std::net::IpAddr;
        match ip {
            IpAddr::V4(a) => SourceKey::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.octets()),
                None => {
                    let mut p = [0; 8];
                    p.copy_from_slice(&a.octets()[..8]);
                    SourceKey::V6(p)
                }
            },
        }
    }
}
