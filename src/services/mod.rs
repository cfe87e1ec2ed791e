//! Services (docs/ARCHITECTURE.md §5.3, "Services"): bus clients that the platform's reactor
//! drives, the way the original's `mm-services-*` packages were plain clients of its messaging
//! object. This module owns the [`Service`] trait every service implements and the services
//! that come with the crate: [`mdns`] (local network discovery, wire-compatible with
//! `mm-services-mdns` 0.6.8), [`bootstrap`] (a static list of nodeInfos), [`kademlia`] (the
//! original's Kademlia DHT, wire-compatible with `mm-services-kademlia` 0.6.5) and [`mainline`]
//! (nodeInfos published and resolved on the BitTorrent Mainline DHT as BEP 44 items).
//!
//! # What a service is
//!
//! A value implementing [`Service`], handed to the platform with one call,
//! [`crate::PlatformBuilder::service`] or [`crate::Platform::add_service`]. The platform never
//! names a particular service; it only hosts them:
//!
//! - **No threads, no second loop.** A service's sockets are registered with the platform's
//!   `mio::Poll` through [`ServiceContext::register`], in a block of tokens of its own
//!   ([`crate::platform::SERVICE_TOKEN_BLOCK`] tokens each, asked for with
//!   [`ServiceContext::token`]); readiness arrives in [`Service::on_io`] on the reactor's thread. The poll is
//!   edge-triggered: read until `WouldBlock`, or, to bound the work of one turn, stop early and
//!   ask for a turn right away with [`ServiceContext::set_wake`]`(Some(ctx.now()))`.
//! - **One timer.** [`ServiceContext::set_wake`] sets (or clears) the single instant at which
//!   [`Service::on_timer`] runs; a service with several deadlines asks for the earliest, the way
//!   a sans-IO state machine reports its next deadline.
//! - **The bus, and nothing else.** A service talks to the platform only through the built-in
//!   messages of docs/ARCHITECTURE.md §5.1: it subscribes ([`ServiceContext::subscribe`]; the messages arrive in
//!   [`Service::on_message`]) to `self.transports.myNodeInfo`, `self.transports.requestNodeInfo`,
//!   `self.transports.requestBootstrapNodeInfo`, and publishes `transports.nodeInfo` /
//!   `transports.nodeInfoBootstrap` with [`ServiceContext::publish_node_info`]. Through
//!   [`ServiceContext`]'s `Deref` to [`crate::Context`] it can also send any message
//!   (`ctx.messaging().send(..)`, also to other nodes, as a DHT does), read our nodeInfo and
//!   identity, and use the platform's storage.
//! - **Its source tag.** Each nodeInfo published with [`ServiceContext::publish_node_info`]
//!   also raises [`crate::Event::NodeInfo`] carrying the service's [`Service::name`], so an
//!   application can tell where a peer came from (`examples/node.rs` prints it as
//!   `{"event":"peer",...,"source":"mdns"}`) without the platform knowing any service.
//!
//! # When things run
//!
//! [`Service::start`] runs when the service is added (for the builder: while the platform is
//! built, before its first turn, so the service sees the start-up messages:
//! `transports.myNodeInfo` and `transports.requestBootstrapNodeInfo`). A service added with
//! [`crate::Platform::add_service`] after the first turn does not see them again: it reads
//! `ctx.node_info()` in `start`. In each turn, services' socket readiness and timers are handled
//! after the platform's own timers and before the turn's deliveries, so what they publish is
//! delivered in the same turn. Everything a service sends is queued, never delivered inside the
//! call. [`Service::stop`] runs when the platform is dropped.
//!
//! # Writing one
//!
//! ```
//! use std::time::Duration;
//! use mm_platform::services::{Service, ServiceContext};
//! use mm_platform::{Event, Message, Platform};
//! use serde_json::Value;
//!
//! /// Answers every lookup with one fixed nodeInfo, a second after it was asked.
//! struct Fixed {
//!     info: Value,
//!     asked: bool,
//! }
//!
//! impl Service for Fixed {
//!     fn name(&self) -> &str {
//!         "fixed"
//!     }
//!     fn start(&mut self, ctx: &mut ServiceContext<'_>) -> std::io::Result<()> {
//!         ctx.subscribe("self.transports.requestNodeInfo");
//!         Ok(())
//!     }
//!     fn on_message(&mut self, ctx: &mut ServiceContext<'_>, _msg: &Message) {
//!         self.asked = true;
//!         let at = ctx.now() + Duration::from_secs(1);
//!         ctx.set_wake(Some(at));
//!     }
//!     fn on_timer(&mut self, ctx: &mut ServiceContext<'_>) {
//!         if std::mem::take(&mut self.asked) {
//!             let info = self.info.clone();
//!             let _ = ctx.publish_node_info(&info, false);
//!         }
//!     }
//! }
//!
//! let other = Platform::builder().transports(false).build().unwrap();
//! let mut platform = Platform::builder()
//!     .transports(false)
//!     .service(Fixed { info: other.node_info().to_json(), asked: false })
//!     .build()
//!     .unwrap();
//! let _ = platform
//!     .messaging()
//!     .send("transports.requestNodeInfo", "local", &other.sign_id().to_string());
//! let end = std::time::Instant::now() + Duration::from_secs(5);
//! let mut found = None;
//! while found.is_none() && std::time::Instant::now() < end {
//!     platform.poll(Some(Duration::from_millis(50))).unwrap();
//!     found = platform.drain_events().find_map(|e| match e {
//!         Event::NodeInfo { source, node_info } => Some((source, node_info)),
//!         _ => None,
//!     });
//! }
//! let (source, node_info) = found.unwrap();
//! assert_eq!(source, "fixed");
//! assert_eq!(node_info["signId"], other.sign_id().to_string());
//! ```

pub mod bootstrap;
#[cfg(feature = "kademlia")]
pub mod kademlia;
#[cfg(feature = "mainline")]
pub mod mainline;
#[cfg(feature = "mdns")]
pub mod mdns;

pub use crate::platform::{Service, ServiceContext, ServiceId};

pub use crate::shared::Shared;
