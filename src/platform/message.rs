//! Messages and addressing: the owned [`Message`] the bus delivers, its [`Scope`], the
//! [`Address`] of a sender or destination, the options and the [`SendStatus`] of a send.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::identity::{BoxId, ParseIdError, SignId};

/// The trust level of a message's sender, the first segment of the topic subscribers see.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Scope {
    /// `self`: sent locally, or by one of our own devices (the `devices` circle).
    Own,
    /// `friends`: sent by a node in the `friends` circle.
    Friends,
    /// `public`: sent by any other node.
    Public,
}

impl Scope {
    /// The topic prefix: `self`, `friends` or `public`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Own => "self",
            Scope::Friends => "friends",
            Scope::Public => "public",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message comes from or goes to: this node (`local`) or a node id.
///
/// Nodes are named by their signId. The original JavaScript nodes name each other by boxId
/// instead, and send no signId of their own: a message from such a node is reported with its
/// signId when a known nodeInfo (or a `directory.getReply`) maps its box key, and as
/// [`Address::Box`] otherwise. As a destination, a key given as text is resolved by the
/// connection manager: a box key of a node it knows (by nodeInfo or connection) is taken as a
/// boxId, any other key as a signId (or as a boxId when it is not a valid ed25519 key).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Address {
    /// This node: written `local`, as in the original API.
    Local,
    /// Another node (or, as a destination, our own id, which is delivered locally).
    Node(SignId),
    /// Another node known only by its box key (curve25519, the CurveCP long-term key): a
    /// JavaScript node whose signId is not known (yet). Written as the base64 boxId.
    Box(BoxId),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Local => f.write_str("local"),
            Address::Node(id) => id.fmt(f),
            Address::Box(id) => id.fmt(f),
        }
    }
}

impl FromStr for Address {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "local" {
            Ok(Address::Local)
        } else {
            s.parse().map(Address::Node)
        }
    }
}

impl From<SignId> for Address {
    fn from(id: SignId) -> Self {
        Address::Node(id)
    }
}

/// Anything usable as a destination: an [`Address`], a [`SignId`], a [`BoxId`], or text
/// (`"local"`, or a base64 signId or boxId: see [`Address`] for how a key is resolved). Text that is neither makes the send return
/// [`SendStatus::InvalidDestination`].
pub trait ToAddress {
    /// The address, or `None` if this is not a valid one.
    fn to_address(&self) -> Option<Address>;
}

impl ToAddress for Address {
    fn to_address(&self) -> Option<Address> {
        Some(*self)
    }
}

impl ToAddress for SignId {
    fn to_address(&self) -> Option<Address> {
        Some(Address::Node(*self))
    }
}

impl ToAddress for BoxId {
    fn to_address(&self) -> Option<Address> {
        Some(Address::Box(*self))
    }
}

impl ToAddress for str {
    fn to_address(&self) -> Option<Address> {
        self.parse().ok()
    }
}

impl ToAddress for String {
    fn to_address(&self) -> Option<Address> {
        self.parse().ok()
    }
}

impl<T: ToAddress + ?Sized> ToAddress for &T {
    fn to_address(&self) -> Option<Address> {
        (**self).to_address()
    }
}

/// A message as delivered: owned and `Send`, so it can cross threads through a channel.
///
/// `topic` is the topic as sent (`test.testMessage`); subscribers match against the scoped
/// topic `"<scope>.<topic>"` ([`Message::scoped_topic`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Message {
    /// Who sent it: `local` for this node, otherwise the authenticated node id.
    pub sender: Address,
    /// The protocol code (`ms` for JSON messaging, `bt` for torrenting, or an application's).
    pub protocol: Cow<'static, str>,
    /// The topic as sent, without the scope.
    pub topic: String,
    /// The sender's trust level.
    pub scope: Scope,
    /// The payload bytes (for `ms`, JSON text).
    pub payload: Vec<u8>,
    /// The message's id, for messages another node sent with `realtime: false` (through its
    /// offline buffer); `None` for real-time and local messages.
    ///
    /// Such a message is delivered once in the normal case, but a receiver that crashes after
    /// its subscribers saw the message and before the id was stored (see
    /// [`crate::offline`], "Delivery guarantee") sees it again after the restart, with the
    /// same id: an application that must not act twice keeps the ids it has acted upon.
    pub id: Option<MessageId>,
}

/// The id of a message sent through the offline buffer: 16 random bytes chosen by the sender,
/// the same in every retry of that message.
pub type MessageId = [u8; 16];

impl Message {
    /// `"<scope>.<topic>"`, the topic subscriptions are matched against.
    pub fn scoped_topic(&self) -> String {
        format!("{}.{}", self.scope.as_str(), self.topic)
    }

    /// Decodes a JSON payload.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// Options of a send, as the original's options object.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SendOptions {
    /// Real-time messages (the default) are kept in memory only and fail after `expire_after`;
    /// the others go through the persistent offline buffer (remote destinations only: local
    /// delivery is immediate in the next turn either way).
    pub realtime: bool,
    /// How long a remote message may wait for delivery; `None` for the platform's default
    /// ([`crate::NetConfig::realtime_expiry`], 60 s, or [`crate::NetConfig::offline_expiry`],
    /// 7 days, the most an offline message may wait).
    pub expire_after: Option<Duration>,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            realtime: true,
            expire_after: None,
        }
    }
}

/// What became of a send. Sends never block: like a non-blocking socket, they either accept
/// the message or say why not.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[must_use]
#[non_exhaustive]
pub enum SendStatus {
    /// Accepted: local messages are delivered in a later turn of the reactor.
    Queued,
    /// Topic, protocol and payload together exceed the platform's maximum message size.
    TooLarge,
    /// The queue towards that destination is full; try again after a turn of the reactor.
    BufferFull,
    /// The destination is neither `local` nor a valid signId.
    InvalidDestination,
    /// The payload could not be encoded by the API's codec.
    EncodeFailed,
    /// The destination is a remote node but this platform has no transport to reach it.
    NoTransport,
    /// The destination's connection information is unknown and cannot be looked up.
    UnknownDestination,
    /// The platform this [`crate::Handle`] belongs to is gone.
    Closed,
    /// A not-real-time message could not be written to storage, for this cause (shown as the
    /// OS says it: `No space left on device (os error 28)`, `Read-only file system (os error
    /// 30)`).
    StorageFailed(crate::storage::StorageCause),
}

impl SendStatus {
    /// Whether the message was accepted.
    pub fn is_queued(&self) -> bool {
        matches!(self, SendStatus::Queued)
    }
}

impl fmt::Display for SendStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            SendStatus::Queued => "queued",
            SendStatus::TooLarge => "message too large",
            SendStatus::BufferFull => "send buffer full",
            SendStatus::InvalidDestination => "invalid destination",
            SendStatus::EncodeFailed => "payload could not be encoded",
            SendStatus::NoTransport => "no transport to reach remote nodes",
            SendStatus::UnknownDestination => "unknown destination",
            SendStatus::Closed => "platform closed",
            SendStatus::StorageFailed(cause) => {
                return write!(f, "offline buffer storage failed: {cause}");
            }
        };
        f.write_str(text)
    }
}
