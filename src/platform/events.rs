//! Platform events, the original's `ready` / `connection` / `disconnected` / `message`.
//!
//! Events are owned values (`Send`), available three ways: callbacks
//! ([`crate::Platform::on_event`]), bounded channels ([`crate::Platform::event_channel`]) and a
//! bounded batch drained after a turn ([`crate::Platform::drain_events`]). When a channel or the
//! batch is full, the event is dropped for that consumer and counted in
//! [`crate::Stats::events_dropped`]: a slow consumer never blocks the reactor or grows memory.
//!
//! Events implement serde's `Serialize` / `Deserialize` (externally tagged: `"Ready"`,
//! `{"Connection": "<signId>"}`, `{"Message": {...}}` with the [`Message`] form, ...).

use serde::{Deserialize, Serialize};

use crate::identity::SignId;
use crate::platform::message::Message;
use crate::platform::node_info::NodeInfo;
use crate::storage::StorageFault;

/// Something that happened on the platform.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// The identity is loaded and the listeners are up. Fires once, in the first turn.
    Ready,
    /// A connection to this peer was established (incoming or outgoing).
    Connection(SignId),
    /// The connection to this peer is gone.
    Disconnected(SignId),
    /// A message was delivered on the bus (local or remote).
    Message(Message),
    /// A service published a nodeInfo it found (`transports.nodeInfo`, see
    /// [`crate::services::ServiceContext::publish_node_info`]). Raised on every publication,
    /// changed or not; the platform checks the nodeInfo itself when it is delivered. It is
    /// what the service found on the network, unchecked, hence JSON rather than a
    /// [`NodeInfo`].
    NodeInfo {
        /// The nodeInfo as published.
        node_info: serde_json::Value,
        /// The publishing service's [`crate::services::Service::name`] (`mdns`, `bootstrap`).
        source: String,
    },
    /// Our published nodeInfo changed (its endpoints: a relay bound or lost); also published
    /// as `self.transports.myNodeInfo` (in its JSON form, [`NodeInfo::to_json`]).
    MyNodeInfo(NodeInfo),
    /// The path of the active connection to `peer` changed (or was first known): its packets
    /// now go to `remote`, a relay's address when `relayed`.
    Path {
        /// The peer.
        peer: SignId,
        /// Through a relay (never without the cargo feature `relay`).
        relayed: bool,
        /// The peer's address, or the relay's.
        remote: std::net::SocketAddr,
    },
    /// The storage failed or held damaged data, and the platform went on (see
    /// [`StorageFault`]): an offline record that was delivered but cannot be deleted, a
    /// damaged offline record (kept aside, never delivered), the de-duplication memory that
    /// cannot be written (raised when it starts failing, not at every retry). Also logged at
    /// warn level.
    StorageFault(StorageFault),
}
