//! Messages and addressing: the owned [`Message`] the bus delivers, its [`Scope`], the
//! [`Address`] of a sender or destination, the options and the [`SendResult`] of a send.
//!
//! [`Scope`], [`Address`] and [`Message`] implement serde's `Serialize` / `Deserialize` in
//! their text forms (see each type), so they can be logged, stored or handed to another
//! process as JSON.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bus::TopicError;
use crate::identity::{BoxId, ParseIdError, SignId};

/// The trust level of a message's sender, the first segment of the topic subscribers see.
/// Serialized as its topic prefix (`"self"`, `"friends"`, `"public"`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Scope {
    /// `self`: sent locally, or by one of our own devices (the `devices` circle).
    #[serde(rename = "self")]
    Own,
    /// `friends`: sent by a node in the `friends` circle.
    #[serde(rename = "friends")]
    Friends,
    /// `public`: sent by any other node.
    #[serde(rename = "public")]
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
        } else if let Some(b) = s.strip_prefix(BOX_PREFIX) {
            b.parse().map(Address::Box)
        } else {
            s.parse().map(Address::Node)
        }
    }
}

/// `local`, the signId, or `box:` and the boxId for [`Address::Box`] (so that a round trip
/// keeps the kind of key; [`FromStr`] accepts the same forms).
impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Address::Box(id) => s.collect_str(&format_args!("{BOX_PREFIX}{id}")),
            other => s.collect_str(other),
        }
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The prefix of a boxId in an [`Address`]'s text form (`box:<base64>`).
const BOX_PREFIX: &str = "box:";

impl From<SignId> for Address {
    fn from(id: SignId) -> Self {
        Address::Node(id)
    }
}

/// Anything usable as a destination: an [`Address`], a [`SignId`], a [`BoxId`], or text
/// (`"local"`, a base64 signId or boxId: see [`Address`] for how a key is resolved; or
/// `box:` and a base64 boxId, always taken as a boxId). Text that is none of these makes the
/// send return [`SendError::InvalidDestination`].
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
///
/// Its `Debug` shows the payload's length and a short prefix (as text if it is UTF-8, else
/// as hex), never the whole payload. Serialized with serde as a map of its fields; in
/// human-readable formats (JSON) `payload` and `id` are standard base64 strings, in binary
/// formats byte strings; `sender` and `scope` are in their text forms.
///
/// ```
/// use mm_platform::{Address, Message, Scope};
///
/// let msg = Message {
///     sender: Address::Local,
///     protocol: "ms".into(),
///     topic: "chat.say".into(),
///     scope: Scope::Own,
///     payload: b"[1,2]".to_vec(),
///     id: None,
/// };
/// let json = serde_json::to_value(&msg).unwrap();
/// assert_eq!(json["sender"], "local");
/// assert_eq!(json["payload"], "WzEsMl0=");
/// assert_eq!(serde_json::from_value::<Message>(json).unwrap(), msg);
/// assert!(format!("{msg:?}").contains("payload: 5 bytes \"[1,2]\""));
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(with = "crate::platform::bytes_form")]
    pub payload: Vec<u8>,
    /// The message's id, for messages another node sent with `realtime: false` (through its
    /// offline buffer); `None` for real-time and local messages.
    ///
    /// Such a message is delivered once in the normal case, but a receiver that crashes after
    /// its subscribers saw the message and before the id was stored (see
    /// [`crate::offline`], "Delivery guarantee") sees it again after the restart, with the
    /// same id: an application that must not act twice keeps the ids it has acted upon.
    #[serde(with = "crate::platform::bytes_form::id", default)]
    pub id: Option<MessageId>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("sender", &self.sender)
            .field("protocol", &self.protocol)
            .field("topic", &self.topic)
            .field("scope", &self.scope)
            .field(
                "payload",
                &crate::platform::bytes_form::Short(&self.payload),
            )
            .field("id", &self.id)
            .finish()
    }
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

/// The protocol of the platform's own frames between nodes; sends of it are refused with
/// [`SendError::ReservedProtocol`].
pub const RESERVED_PROTOCOL: &str = "mm";

/// What every send returns: `Ok(())` when the message was accepted (local messages are
/// delivered in a later turn of the reactor; what becomes of a remote one later, a delivery
/// callback says), or why it was not. Sends never block: like a non-blocking socket, they
/// either accept the message or say why not. Works with `?`:
///
/// ```
/// use mm_platform::{Platform, SendError};
///
/// fn greet(platform: &mut Platform) -> Result<(), SendError> {
///     platform.messaging().send("greeting", "local", "hello")?;
///     platform.messaging().send("greeting", "local", "again")?;
///     Ok(())
/// }
/// let mut platform = Platform::builder().build().unwrap();
/// greet(&mut platform).unwrap();
/// ```
pub type SendResult = Result<(), SendError>;

/// Why a send was refused (see [`SendResult`]). [`SendError::BufferFull`] alone is worth a
/// retry after a turn of the reactor; the others name something to fix (or, for
/// [`SendError::Closed`], that the platform is gone).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum SendError {
    /// The message can never be sent to that destination: protocol, topic and payload
    /// together (`size` bytes) exceed `limit`, the largest message the destination's path
    /// takes. Locally that is [`crate::Limits::max_message_size`]; for another node also what
    /// its queues can ever take (the larger of [`crate::NetConfig::max_frame`] and the queue
    /// bounds [`crate::NetConfig::peer_queue_bytes`] / [`crate::NetConfig::send_queue_bytes`],
    /// less the frame's own overhead).
    TooLarge {
        /// The message's size: protocol, topic and payload bytes.
        size: usize,
        /// The largest size that path takes.
        limit: usize,
    },
    /// The queue towards that destination is full; a retry after a turn of the reactor can
    /// succeed (a message that could never fit is [`SendError::TooLarge`] instead).
    BufferFull,
    /// The topic breaks the topic rule (see [`TopicError`]); nothing was sent.
    InvalidTopic(TopicError),
    /// The protocol is reserved to the platform: `mm`, the protocol of the platform's own
    /// frames between nodes (acknowledgements, identification), cannot be sent by an
    /// application or a service ([`RESERVED_PROTOCOL`]).
    ReservedProtocol,
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

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            SendError::TooLarge { size, limit } => {
                return write!(
                    f,
                    "message of {size} bytes is larger than the limit of {limit} bytes"
                );
            }
            SendError::BufferFull => "send buffer full",
            SendError::InvalidTopic(e) => return write!(f, "invalid topic: {e}"),
            SendError::ReservedProtocol => "protocol reserved to the platform",
            SendError::InvalidDestination => "invalid destination",
            SendError::EncodeFailed => "payload could not be encoded",
            SendError::NoTransport => "no transport to reach remote nodes",
            SendError::UnknownDestination => "unknown destination",
            SendError::Closed => "platform closed",
            SendError::StorageFailed(cause) => {
                return write!(f, "offline buffer storage failed: {cause}");
            }
        };
        f.write_str(text)
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::InvalidTopic(e) => Some(e),
            _ => None,
        }
    }
}

/// The refusal of a send that no retry can make succeed, or `None`: `topic` breaks the topic
/// rule, `protocol` is [`RESERVED_PROTOCOL`], or the message is larger than its path ever
/// takes: `max_message_size`, and for another node `frame_cap`, the largest frame its queues
/// take (the limit reported is then the largest message of this topic and protocol whose
/// frame fits). Shared by the reactor's sends and [`crate::Handle`]'s.
pub(crate) fn refuse_invalid(
    protocol: &str,
    topic: &str,
    payload_len: usize,
    max_message_size: usize,
    frame_cap: Option<usize>,
) -> Option<SendError> {
    if let Err(e) = crate::bus::check_topic(topic) {
        return Some(SendError::InvalidTopic(e));
    }
    if protocol == RESERVED_PROTOCOL {
        return Some(SendError::ReservedProtocol);
    }
    let size = protocol
        .len()
        .saturating_add(topic.len())
        .saturating_add(payload_len);
    let mut limit = max_message_size;
    if let Some(cap) = frame_cap {
        let frame = crate::envelope::Envelope::frame_len(topic.len(), protocol.len(), payload_len);
        let overhead = frame.saturating_sub(size);
        limit = limit.min(cap.saturating_sub(overhead));
    }
    (size > limit).then_some(SendError::TooLarge { size, limit })
}
