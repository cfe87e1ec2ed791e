//! # mm-platform
//!
//! Peer-to-peer encrypted messaging for programs without an async runtime: the Rust
//! implementation of the MicroMinion platform (JavaScript `mm-platform` 0.7.5).
//!
//! - Nodes have ed25519 identities ([`identity`]) and talk CurveCP ([`curvecp`]) over UDP and
//!   TCP ([`transport`]), wire-compatible with DJB's reference tools.
//! - A local publish/subscribe bus with dot-namespaced topics, `*` wildcards and trust scopes
//!   (`self`, `friends`, `public`), driven by one synchronous mio reactor ([`Platform`]) that the
//!   application polls from its own loop, with callbacks or crossbeam channels.
//! - `messaging` (JSON) and `torrenting` (raw bytes) APIs, and room for more ([`api`]).
//!
//! Layers (each knows only the one below): [`api`] over [`offline`] (the persistent buffer of
//! non-real-time messages) and [`platform`] (reactor, bus, scopes, timers, events, [`Handle`],
//! connection manager and directory) over [`envelope`] (frames on a stream) over [`curvecp`]
//! (sans-IO packets, handshakes and reliable stream) over [`transport`] (mio UDP and TCP).
//! Beside them: [`identity`], [`storage`] and [`crypto`] (the only module that calls
//! libsodium).
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
pub mod crypto;
pub mod curvecp;
pub mod envelope;
pub mod identity;
pub mod netstring;
pub mod offline;
pub mod platform;
pub(crate) mod prefault;
pub mod services;
pub mod storage;
pub mod transport;

pub use bus::SubscriptionId;
pub use identity::{BoxId, SignId};
pub use platform::{
    Address, BuildError, CloseReport, ConnectionStats, Context, DeliveryError, Event, Handle,
    Limits, Message, MessageId, NetConfig, NodeInfo, Platform, PlatformBuilder, Scope, SendOptions,
    SendStatus, Stats,
};
