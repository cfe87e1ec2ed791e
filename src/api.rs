//! Protocol APIs: the original's syntactic sugar over the low-level `send` / `on`.
//!
//! - [`Messaging`] (protocol `ms`): JSON payloads, as `serde_json::Value` or any `Serialize` /
//!   `DeserializeOwned` type.
//! - torrenting (protocol `bt`): raw bytes, a [`ProtocolApi`] with the [`RawCodec`].
//! - user-defined protocols: implement [`Codec`] and use [`crate::Platform::api`].
//!
//! Each API only sees messages of its own protocol. A payload its codec cannot decode is
//! dropped for that subscriber, logged at debug level and counted in
//! [`crate::Stats::malformed`]. The APIs are short-lived borrows of the platform (or of a
//! callback's [`Context`]): `platform.messaging().send(...)`.
//!
//! Their sends are checked as [`crate::Platform::send`]'s (topic rule, reserved protocol,
//! size), and their subscriptions panic on an invalid pattern as [`crate::Platform::on`]'s
//! do (see [`crate::TopicError`]).
//!
//! ```
//! use std::borrow::Cow;
//! use std::time::Duration;
//! use mm_platform::api::{Codec, CodecError};
//! use mm_platform::Platform;
//!
//! /// A protocol whose payload is a little-endian u32.
//! #[derive(Clone)]
//! struct Counter;
//!
//! impl Codec for Counter {
//!     type Value = u32;
//!     type Input = u32;
//!     fn protocol(&self) -> Cow<'static, str> {
//!         "ct".into()
//!     }
//!     fn encode(&self, v: &u32) -> Result<Vec<u8>, CodecError> {
//!         Ok(v.to_le_bytes().to_vec())
//!     }
//!     fn decode(&self, b: &[u8]) -> Result<u32, CodecError> {
//!         let b: [u8; 4] = b.try_into().map_err(|_| CodecError::new("need 4 bytes"))?;
//!         Ok(u32::from_le_bytes(b))
//!     }
//! }
//!
//! let mut platform = Platform::builder().build().unwrap();
//! let rx = platform.api(Counter).on_channel("self.count", 8).1;
//! platform.api(Counter).on("self.count", |ctx, _msg, n| {
//!     if n < 3 {
//!         let _ = ctx.api(Counter).send("count", "local", &(n + 1));
//!     }
//! });
//! let _ = platform.api(Counter).send("count", "local", &0);
//! for _ in 0..5 {
//!     platform.poll(Some(Duration::ZERO)).unwrap();
//! }
//! let seen: Vec<u32> = rx.try_iter().map(|m| Counter.decode(&m.payload).unwrap()).collect();
//! assert_eq!(seen, vec![0, 1, 2, 3]);
//! ```

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use crossbeam_channel::Receiver;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::SubscriptionId;
use crate::platform::{
    Callback, Context, Core, DeliveryError, Message, Platform, SendError, SendOptions, SendResult,
    Target, ToAddress,
};

/// The protocol APIs' accessors of [`Platform`] and [`Context`] (both borrow the platform's
/// core for as long as the API value lives).
macro_rules! protocol_accessors {
    ($($ty:ty),*) => {$(
        impl $ty {
            /// The JSON messaging API (protocol `ms`).
            pub fn messaging(&mut self) -> Messaging<'_> {
                Messaging::new(self.core_mut())
            }

            /// The torrenting API (protocol `bt`, raw bytes: sends take any `&[u8]`).
            pub fn torrenting(&mut self) -> ProtocolApi<'_, RawCodec> {
                ProtocolApi::new(self.core_mut(), RawCodec::new("bt"))
            }

            /// A user-defined protocol API with its own codec.
            pub fn api<C: Codec + Clone>(&mut self, codec: C) -> ProtocolApi<'_, C> {
                ProtocolApi::new(self.core_mut(), codec)
            }
        }
    )*};
}

protocol_accessors!(Platform, Context<'_>);

/// A payload that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError(String);

impl CodecError {
    /// An error with this reason.
    pub fn new(reason: impl Into<String>) -> CodecError {
        CodecError(reason.into())
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "codec error: {}", self.0)
    }
}

impl std::error::Error for CodecError {}

/// How a protocol API turns values into payload bytes and back. `decode` gets untrusted bytes
/// from the network: it must fail cleanly, never panic.
///
/// `Send`, as the subscriptions that hold a codec are (a platform can move to another thread).
pub trait Codec: Send + 'static {
    /// The values this protocol carries.
    type Value;
    /// What a send takes, by reference: `Self::Value` for most codecs, an unsized borrowed
    /// form where there is one (`[u8]` for [`RawCodec`], so a send takes any `&[u8]`, a
    /// `&Vec<u8>` included).
    type Input: ?Sized;
    /// The protocol code on the wire (`ms`, `bt`, ...).
    fn protocol(&self) -> Cow<'static, str>;
    /// The payload of a value.
    fn encode(&self, value: &Self::Input) -> Result<Vec<u8>, CodecError>;
    /// The value of a payload.
    fn decode(&self, bytes: &[u8]) -> Result<Self::Value, CodecError>;
    /// The length of `encode(value)` if it is known without encoding (`None`, the default:
    /// unknown). With it a send that a full queue would refuse is refused before encoding.
    fn encoded_len(&self, _value: &Self::Input) -> Option<usize> {
        None
    }
    /// Appends the payload of `value` (what [`Codec::encode`] returns) to `out`. The default
    /// calls `encode`; a codec that can write in place overrides it (as [`RawCodec`] does):
    /// with [`Codec::encoded_len`] known, a remote send then builds its frame around the
    /// payload and copies it once.
    fn encode_into(&self, value: &Self::Input, out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(&self.encode(value)?);
        Ok(())
    }
}

/// Bytes as they are (the torrenting API's codec).
#[derive(Debug, Clone)]
pub struct RawCodec {
    protocol: Cow<'static, str>,
}

impl RawCodec {
    /// A raw-bytes codec for `protocol`.
    pub fn new(protocol: impl Into<Cow<'static, str>>) -> RawCodec {
        RawCodec {
            protocol: protocol.into(),
        }
    }
}

impl Codec for RawCodec {
    type Value = Vec<u8>;
    type Input = [u8];
    fn protocol(&self) -> Cow<'static, str> {
        self.protocol.clone()
    }
    fn encode(&self, value: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(value.to_vec())
    }
    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        // A large payload's fresh pages are faulted in with one system call, not one fault each.
        let mut v = crate::prefault::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        Ok(v)
    }
    fn encoded_len(&self, value: &[u8]) -> Option<usize> {
        Some(value.len())
    }
    fn encode_into(&self, value: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
        out.extend_from_slice(value);
        Ok(())
    }
}

/// JSON of a fixed type `T`, for user-defined JSON protocols.
pub struct JsonCodec<T> {
    protocol: Cow<'static, str>,
    _t: PhantomData<fn() -> T>,
}

impl<T> JsonCodec<T> {
    /// A JSON codec for `protocol`.
    pub fn new(protocol: impl Into<Cow<'static, str>>) -> JsonCodec<T> {
        JsonCodec {
            protocol: protocol.into(),
            _t: PhantomData,
        }
    }
}

impl<T> Clone for JsonCodec<T> {
    fn clone(&self) -> Self {
        JsonCodec::new(self.protocol.clone())
    }
}

impl<T: Serialize + DeserializeOwned + 'static> Codec for JsonCodec<T> {
    type Value = T;
    type Input = T;
    fn protocol(&self) -> Cow<'static, str> {
        self.protocol.clone()
    }
    fn encode(&self, value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError::new(e.to_string()))
    }
    fn decode(&self, bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError::new(e.to_string()))
    }
}

/// The JSON messaging API (protocol `ms`), `platform.messaging` of the original.
pub struct Messaging<'c> {
    core: &'c mut Core,
}

impl<'c> Messaging<'c> {
    pub(crate) fn new(core: &'c mut Core) -> Messaging<'c> {
        Messaging { core }
    }

    /// Sends `value` as JSON on `topic` (unscoped, e.g. `test.testMessage`) to `dest`
    /// (`"local"`, a signId, or an [`crate::Address`]).
    pub fn send<T: Serialize + ?Sized>(
        &mut self,
        topic: &str,
        dest: impl ToAddress,
        value: &T,
    ) -> SendResult {
        self.send_with(topic, dest, value, SendOptions::default())
    }

    /// [`Messaging::send`] with options (`realtime`, `expire_after`).
    pub fn send_with<T: Serialize + ?Sized>(
        &mut self,
        topic: &str,
        dest: impl ToAddress,
        value: &T,
        options: SendOptions,
    ) -> SendResult {
        let Ok(payload) = serde_json::to_vec(value) else {
            return Err(SendError::EncodeFailed);
        };
        self.core.send(
            dest.to_address(),
            Cow::Borrowed("ms"),
            topic.to_owned(),
            payload,
            options,
        )
    }

    /// [`Messaging::send_with`] with a delivery callback, called exactly once in a later turn
    /// with the outcome (see [`crate::Platform::send_with_callback`]); not called when the
    /// send returns an error.
    pub fn send_with_callback<T, F>(
        &mut self,
        topic: &str,
        dest: impl ToAddress,
        value: &T,
        options: SendOptions,
        callback: F,
    ) -> SendResult
    where
        T: Serialize + ?Sized,
        F: FnOnce(&mut Context<'_>, Result<(), DeliveryError>) + Send + 'static,
    {
        let Ok(payload) = serde_json::to_vec(value) else {
            return Err(SendError::EncodeFailed);
        };
        self.core.send_tracked(
            dest.to_address(),
            Cow::Borrowed("ms"),
            topic.to_owned(),
            payload,
            options,
            Some(Box::new(callback)),
        )
    }

    #[track_caller]
    fn subscribe<T, F>(&mut self, pattern: &str, once: bool, mut f: F) -> SubscriptionId
    where
        T: DeserializeOwned + 'static,
        F: FnMut(&mut Context<'_>, &Message, T) + Send + 'static,
    {
        let cb: Callback =
            Box::new(
                move |ctx, msg| match serde_json::from_slice::<T>(&msg.payload) {
                    Ok(v) => f(ctx, msg, v),
                    Err(e) => {
                        log::debug!("undecodable JSON on {}: {e}", msg.topic);
                        ctx.core_stats().malformed += 1;
                    }
                },
            );
        self.core.subscribe(
            pattern,
            Some(Cow::Borrowed("ms")),
            once,
            Target::Callback(cb),
        )
    }

    /// Subscribes to JSON messages whose scoped topic matches `pattern` (e.g.
    /// `self.test.testMessage`, `public.chat.*`). The callback gets the context, the message
    /// (for its sender, scope and topic) and the decoded payload; messages whose payload does
    /// not decode as `T` are skipped.
    #[track_caller]
    pub fn on<T, F>(&mut self, pattern: &str, f: F) -> SubscriptionId
    where
        T: DeserializeOwned + 'static,
        F: FnMut(&mut Context<'_>, &Message, T) + Send + 'static,
    {
        self.subscribe(pattern, false, f)
    }

    /// Like [`Messaging::on`], for the first matching message only.
    #[track_caller]
    pub fn once<T, F>(&mut self, pattern: &str, f: F) -> SubscriptionId
    where
        T: DeserializeOwned + 'static,
        F: FnMut(&mut Context<'_>, &Message, T) + Send + 'static,
    {
        self.subscribe(pattern, true, f)
    }

    /// A bounded channel of the JSON messages matching `pattern` (decode them with
    /// [`Message::json`]).
    #[track_caller]
    pub fn on_channel(
        &mut self,
        pattern: &str,
        capacity: usize,
    ) -> (SubscriptionId, Receiver<Message>) {
        self.core
            .subscribe_channel(pattern, Some(Cow::Borrowed("ms")), capacity)
    }
}

/// A protocol API with codec `C`: the torrenting API ([`RawCodec`], protocol `bt`) and
/// user-defined ones.
pub struct ProtocolApi<'c, C: Codec> {
    core: &'c mut Core,
    codec: C,
}

impl<'c, C: Codec + Clone> ProtocolApi<'c, C> {
    pub(crate) fn new(core: &'c mut Core, codec: C) -> ProtocolApi<'c, C> {
        ProtocolApi { core, codec }
    }

    /// Sends `value` on `topic` to `dest`.
    pub fn send(&mut self, topic: &str, dest: impl ToAddress, value: &C::Input) -> SendResult {
        self.send_with(topic, dest, value, SendOptions::default())
    }

    /// [`ProtocolApi::send`] with options.
    pub fn send_with(
        &mut self,
        topic: &str,
        dest: impl ToAddress,
        value: &C::Input,
        options: SendOptions,
    ) -> SendResult {
        let dest = dest.to_address();
        if let Some(len) = self.codec.encoded_len(value) {
            let protocol = self.codec.protocol();
            if let Some(refused) = self.core.refuses(dest, &protocol, topic, len, options) {
                // Nothing copied for a send that would be dropped.
                return Err(refused);
            }
            // The payload is written where it goes (a remote frame, or the local message).
            let codec = &self.codec;
            return self
                .core
                .send_encoded(dest, protocol, topic, len, options, &mut |out| {
                    codec.encode_into(value, out).is_ok()
                });
        }
        let Ok(payload) = self.codec.encode(value) else {
            return Err(SendError::EncodeFailed);
        };
        self.core.send(
            dest,
            self.codec.protocol(),
            topic.to_owned(),
            payload,
            options,
        )
    }

    /// [`ProtocolApi::send_with`] with a delivery callback, called exactly once in a later
    /// turn with the outcome (see [`crate::Platform::send_with_callback`]); not called when the
    /// send returns an error.
    pub fn send_with_callback<F>(
        &mut self,
        topic: &str,
        dest: impl ToAddress,
        value: &C::Input,
        options: SendOptions,
        callback: F,
    ) -> SendResult
    where
        F: FnOnce(&mut Context<'_>, Result<(), DeliveryError>) + Send + 'static,
    {
        let Ok(payload) = self.codec.encode(value) else {
            return Err(SendError::EncodeFailed);
        };
        self.core.send_tracked(
            dest.to_address(),
            self.codec.protocol(),
            topic.to_owned(),
            payload,
            options,
            Some(Box::new(callback)),
        )
    }

    #[track_caller]
    fn subscribe<F>(&mut self, pattern: &str, once: bool, mut f: F) -> SubscriptionId
    where
        F: FnMut(&mut Context<'_>, &Message, C::Value) + Send + 'static,
    {
        let codec = self.codec.clone();
        let cb: Callback = Box::new(move |ctx, msg| match codec.decode(&msg.payload) {
            Ok(v) => f(ctx, msg, v),
            Err(e) => {
                log::debug!("undecodable {} payload on {}: {e}", msg.protocol, msg.topic);
                ctx.core_stats().malformed += 1;
            }
        });
        let protocol = self.codec.protocol();
        self.core
            .subscribe(pattern, Some(protocol), once, Target::Callback(cb))
    }

    /// Subscribes to this protocol's messages whose scoped topic matches `pattern`.
    #[track_caller]
    pub fn on<F>(&mut self, pattern: &str, f: F) -> SubscriptionId
    where
        F: FnMut(&mut Context<'_>, &Message, C::Value) + Send + 'static,
    {
        self.subscribe(pattern, false, f)
    }

    /// Like [`ProtocolApi::on`], for the first matching message only.
    #[track_caller]
    pub fn once<F>(&mut self, pattern: &str, f: F) -> SubscriptionId
    where
        F: FnMut(&mut Context<'_>, &Message, C::Value) + Send + 'static,
    {
        self.subscribe(pattern, true, f)
    }

    /// A bounded channel of this protocol's messages matching `pattern`.
    #[track_caller]
    pub fn on_channel(
        &mut self,
        pattern: &str,
        capacity: usize,
    ) -> (SubscriptionId, Receiver<Message>) {
        let protocol = self.codec.protocol();
        self.core
            .subscribe_channel(pattern, Some(protocol), capacity)
    }
}

impl ProtocolApi<'_, RawCodec> {
    /// Like [`ProtocolApi::on`], but the callback borrows the payload where it lies instead of
    /// getting a copy of its own: for receivers that consume the bytes in the callback (write
    /// them out, hash them, parse them). With 1 MiB payloads the copy and its fresh memory
    /// were about a tenth of a bulk receiver's time.
    ///
    /// ```
    /// # use mm_platform::Platform;
    /// let mut p = Platform::builder().build().unwrap();
    /// let mut total = 0usize;
    /// p.torrenting().on_bytes("public.files.*", move |_ctx, _msg, bytes| {
    ///     total += bytes.len();
    /// });
    /// ```
    #[track_caller]
    pub fn on_bytes<F>(&mut self, pattern: &str, mut f: F) -> SubscriptionId
    where
        F: FnMut(&mut Context<'_>, &Message, &[u8]) + Send + 'static,
    {
        let cb: Callback = Box::new(move |ctx, msg| f(ctx, msg, &msg.payload));
        let protocol = self.codec.protocol();
        self.core
            .subscribe(pattern, Some(protocol), false, Target::Callback(cb))
    }
}
