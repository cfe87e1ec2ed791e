//! mm-platform
#![deny(missing_docs)]
pub mod api;
pub(crate) mod bus;
pub mod crypto;
pub mod identity;
pub mod platform;
pub mod storage;
pub use bus::SubscriptionId;
pub use identity::{BoxId, SignId};
pub use platform::{
    Address, BuildError, Context, Event, Handle, Limits, Message, Platform, PlatformBuilder, Scope,
    SendOptions, SendStatus, Stats,
};
