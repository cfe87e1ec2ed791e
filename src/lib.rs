//! # mm-platform
//!
//! Peer-to-peer encrypted messaging for programs without an async runtime: the Rust
//! implementation of the MicroMinion platform (JavaScript `mm-platform` 0.7.5).
//!
//! - Nodes have ed25519 identities ([`identity`]) and talk CurveCP over UDP and TCP,
//!   wire-compatible with DJB's reference tools.
//! - A local publish/subscribe bus with dot-namespaced topics, `*` wildcards and trust scopes
//!   (`self`, `friends`, `public`), driven by one synchronous mio reactor ([`Platform`]) that the
//!   application polls from its own loop, with callbacks or crossbeam channels.
//! - `messaging` (JSON) and `torrenting` (raw bytes) APIs, and room for more ([`api`]).
//! - Discovery services, each behind a cargo feature ([`services`]).
//!
//! # What an application uses
//!
//! The crate root ([`Platform`], [`PlatformBuilder`], [`Message`], [`Address`], [`SignId`],
//! [`NetConfig`], [`Event`], ...) and the modules [`api`] (the typed messaging and torrenting
//! APIs), [`identity`] (identities and their keys), [`storage`] (where a node keeps its state,
//! [`storage::FileStore`] with its crash guarantees), [`offline`] (how non-real-time messages
//! are kept and delivered), [`services`] (discovery services and the `Service` trait) and
//! [`platform`] (the reactor and its configuration).
//!
//! [`proto`] exposes the protocol internals (CurveCP, transports, cryptography, envelopes,
//! the services' wire codecs and sans-IO cores) for tools, tests, fuzzing and benchmarks. It
//! carries no stability promise and may change in any release.
//!
//! Layers (each knows only the one below): [`api`] over [`offline`] (the persistent buffer of
//! non-real-time messages) and [`platform`] (reactor, bus, scopes, timers, events, [`Handle`],
//! connection manager and directory) over envelopes (frames on a stream) over CurveCP
//! (sans-IO packets, handshakes and reliable stream) over the UDP and TCP transports (mio).
//! Beside them: [`identity`], [`storage`] and the cryptography module (the only one that calls
//! libsodium). `docs/ARCHITECTURE.md` in the repository describes how they fit together.
//!
//! # Cargo features
//!
//! All on by default:
//!
//! - `mdns`: [`services::mdns`] (local network discovery; DNS messages through `domain`).
//! - `kademlia`: [`services::kademlia`] (the original's Kademlia DHT; RIPEMD-160 through
//!   `ripemd`, SHA-1 through `sha1_smol`).
//! - `mainline`: [`services::mainline`] (nodeInfos on the BitTorrent Mainline DHT; bencode
//!   with a strict codec of our own, SHA-1 through `sha1_smol`).
//! - `relay`: NAT traversal through relays, no dependencies of its own: serving as a relay
//!   ([`NetConfig::relay`], [`RelayLimits`]), reserving a slot at one and publishing the
//!   relayed (`mm-relay`) endpoint (relays found through the DHT services when none is
//!   known, chosen by round trip, remembered across restarts), dialling others' relayed
//!   endpoints, and hole punching (IPv4 and IPv6), which uses the relay as its rendezvous ([`NetConfig::use_relays`],
//!   [`NetConfig::relay_bind_interval`], [`NetConfig::hole_punching`]); in `proto`, the
//!   relay's forwarding table and the punch prober of the transport's `relay` module and the
//!   drivers' relayed paths. Without it a node still learns its observed address and whether
//!   it can be dialled (dial-back), and publishes what that proves, but a node behind a NAT
//!   that drops inbound flows cannot be reached by others at all: it neither uses a relay nor
//!   punches, skips relayed endpoints, refuses reservations and drops relay datagrams.
//! - `simd`: the hand-written AVX-512 Salsa20 and AVX-512 IFMA Poly1305 for the boxes of
//!   CurveCP messages, used at run time only on CPUs that have the instructions.
//!
//! With `default-features = false` the crate is the platform, CurveCP, the transports (direct
//! paths only) and the static bootstrap service ([`services::bootstrap`]), with libsodium's
//! cipher code only.
//!
//! # Supported platforms
//!
//! Linux (x86-64), the only system CI builds and tests. The crate is Unix-only: it uses
//! `std::os::unix` and `libc` (file modes, `flock`, raw descriptors). Linux-specific are UDP
//! generic segmentation and receive offload (`UDP_SEGMENT`, `UDP_GRO`), `sendmmsg` /
//! `recvmmsg`, `MADV_POPULATE_WRITE`, and the mDNS socket's `IP_MULTICAST_ALL`; the UDP
//! transport and the mDNS service have fall-backs for other Unix systems, but no other system
//! is built or tested.
//!
//! ```
//! use mm_platform::Platform;
//! use serde_json::json;
//! use std::time::Duration;
//!
//! let mut platform = Platform::builder().build().unwrap();
//! platform.messaging().on("self.test.*", |_ctx, msg, value: serde_json::Value| {
//!     println!("{} from {}: {value}", msg.scoped_topic(), msg.sender);
//! });
//! platform.messaging().send("test.hello", "local", &json!({"hello": "world"}));
//! platform.poll(Some(Duration::ZERO)).unwrap(); // delivered here, never inside send
//! ```
#![deny(missing_docs)]

pub mod api;
pub(crate) mod bus;
mod crypto;
mod curvecp;
mod envelope;
pub mod identity;
mod netstring;
pub mod offline;
pub mod platform;
pub(crate) mod prefault;
pub mod services;
mod shared;
pub mod storage;
mod transport;

pub use bus::{check_pattern, check_topic, SubscriptionId, TopicError};
pub use identity::{BoxId, SignId};
pub use platform::{
    Address, BuildError, CloseReport, ConnectionStats, Context, DeliveryError, Event, Handle,
    Limits, Message, MessageId, NetConfig, NodeInfo, Platform, PlatformBuilder, RelayInUse, Scope,
    SendError, SendOptions, SendResult, Stats,
};
pub use shared::Shared;
// The transport types the platform's configuration and statistics name ([`NetConfig`],
// [`NodeInfo::endpoints`], [`ConnectionStats`], `Context::port_mapping`); the transports themselves are in [`proto`].
pub use transport::connection_info::Endpoint;
pub use transport::driver::ServerDriverLimits;
pub use transport::portmap::{Mapping as PortMapping, Protocol as PortMapProtocol};
#[cfg(feature = "relay")]
pub use transport::relay::RelayLimits;
pub use transport::{Framing, TransportKind};

pub mod proto {
    //! Protocol internals for tools, tests, fuzzing and benchmarks: no stability promise; may
    //! change in any release.
    //!
    //! An application needs none of this: it uses the crate root and the modules beside this
    //! one. What is here is what the repository's own tests, fuzz targets, benchmarks and
    //! CurveCP tools (`examples/curvecp.rs`) reach below the platform: every public item of
    //! the crate's internal modules, under the same paths below `proto`.

    /// Test support: reports that test `test` is skipped because something it needs is missing
    /// on this machine (`why`; its first line is the reason, further lines may say how to get
    /// it). Prints `*** SKIPPING test: why` to stderr and, when the environment variable
    /// `MM_SKIPPED_FILE` names a file, appends the line `test: reason` to it in one write to a
    /// file opened for appending, so test processes running in parallel never mix their lines.
    /// `.ci/skipped` sets it for one `cargo test` run and lists the lines at the end.
    pub fn skip_test(test: &str, why: &str) {
        use std::io::Write;
        eprintln!("\n*** SKIPPING {test}: {why}\n");
        if let Some(path) = std::env::var_os("MM_SKIPPED_FILE") {
            let reason = why.lines().next().unwrap_or_default();
            let line = format!("{test}: {reason}\n");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path);
            if let Err(e) = file.and_then(|mut f| f.write_all(line.as_bytes())) {
                eprintln!("*** cannot record the skip in MM_SKIPPED_FILE: {e}");
            }
        }
    }

    /// A module of `proto` that re-exports every public item of a crate-private module.
    macro_rules! internals {
        ($(#[$doc:meta])* $name:ident => $($path:ident)::+) => {
            $(#[$doc])*
            pub mod $name {
                pub use crate::$($path)::+::*;
            }
        };
    }

    internals!(
        /// Cryptographic primitives: the only module that calls libsodium (boxes, secretbox,
        /// ed25519, hashes, randomness), and the hand-written AVX-512 cipher backends.
        crypto => crypto
    );
    internals!(
        /// CurveCP, sans-IO: packets, cookies, the client and server handshakes, the message
        /// layer (reliable stream) and congestion control.
        curvecp => curvecp
    );
    internals!(
        /// The sockets under CurveCP (UDP, TCP, the JavaScript nodes' 1tp framing, the relay)
        /// and the drivers that run the CurveCP state machines over them.
        transport => transport
    );
    internals!(
        /// Envelopes: platform messages as frames (`netstring(protobuf Message)`) on a CurveCP
        /// stream.
        envelope => envelope
    );
    internals!(
        /// Netstrings (`<decimal length>:<bytes>,`): the framing of CurveCP packets on TCP and
        /// of envelopes on a CurveCP stream.
        netstring => netstring
    );
    /// The mDNS service's sans-IO core and DNS message codec.
    #[cfg(feature = "mdns")]
    pub mod mdns {
        internals!(
            /// The mDNS protocol machine: announcements, queries, answers, timing.
            state => services::mdns::state
        );
        internals!(
            /// DNS messages of the mDNS service (through `domain`), with every bound checked.
            wire => services::mdns::wire
        );
    }

    /// The Kademlia service's sans-IO core.
    #[cfg(feature = "kademlia")]
    pub mod kademlia {
        internals!(
            /// 160-bit node ids and key hashes.
            id => services::kademlia::id
        );
        internals!(
            /// JSON exactly as the JavaScript side parses and writes it (the signatures need it).
            json => services::kademlia::json
        );
        internals!(
            /// RPC messages, their signatures and contacts.
            rpc => services::kademlia::rpc
        );
        internals!(
            /// The protocol machine: lookups, handlers, stored items, timers.
            state => services::kademlia::state
        );
        internals!(
            /// The routing table.
            table => services::kademlia::table
        );
    }

    /// The Mainline DHT service's sans-IO core.
    #[cfg(feature = "mainline")]
    pub mod mainline {
        internals!(
            /// The byte budget that keeps a serving node from amplifying toward forged sources.
            budget => services::mainline::budget
        );
        internals!(
            /// BEP 44 mutable items: targets, signatures, the nodeInfo they carry.
            item => services::mainline::item
        );
        internals!(
            /// KRPC messages in bencode (a strict codec of our own).
            krpc => services::mainline::krpc
        );
        internals!(
            /// The protocol machine: lookups, publication, serving, timers.
            state => services::mainline::state
        );
        internals!(
            /// The routing table.
            table => services::mainline::table
        );
    }
}

/// The README's snippet (`examples/readme.rs`, shown verbatim in README.md as
/// `tests/readme.rs` checks), run as a doctest with warnings denied, so what a new user copies
/// keeps compiling without warnings and working.
#[cfg(doctest)]
#[doc = concat!(
    "```\n#![deny(warnings)]\n",
    include_str!("../examples/readme.rs"),
    "```"
)]
pub struct ReadmeSnippet;
