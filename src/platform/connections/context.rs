//! The connection manager's boundary with the platform: what it is given for one call
//! ([`Cx`]: the turn's time, storage, the key cache, the circles, the counters it updates, the
//! room left in the local delivery queue) and what it hands back ([`Output`]: messages to
//! deliver, messages to publish on the local bus, events), which the platform applies, in
//! order, once the call returns.

use std::fmt::Display;
use std::time::Instant;

use super::super::{Circles, Event, Message, Stats};
use crate::identity::KeyCache;
use crate::storage::Storage;

/// What the platform does for the connection manager after a call.
pub(crate) enum Output {
    /// A message from another node, for the local delivery queue.
    Deliver(Message),
    /// A built-in message on the local bus (protocol `ms`): the topic, and the key (signId or
    /// boxId) that is its payload, as a JSON string.
    Publish(&'static str, String),
    /// An event for the application.
    Emit(Event),
}

/// What the connection manager is given for one call.
pub(crate) struct Cx<'a> {
    /// The time of this turn.
    pub(crate) now: Instant,
    /// The platform's store (offline buffer, de-duplication memory, remembered peers).
    pub(crate) storage: &'a mut dyn Storage,
    /// signId-to-boxId conversions.
    pub(crate) keys: &'a mut KeyCache,
    /// Who is a friend or a device (scopes, connection slots).
    pub(crate) circles: &'a Circles,
    /// The counters the manager updates.
    pub(crate) stats: &'a mut Stats,
    /// Messages the local delivery queue can still take (counting what this call queued).
    room: usize,
    out: &'a mut Vec<Output>,
}

impl<'a> Cx<'a> {
    /// The context of one call; `room` is what the local delivery queue can take, `out` where
    /// the outputs go.
    pub(crate) fn new(
        now: Instant,
        storage: &'a mut dyn Storage,
        keys: &'a mut KeyCache,
        circles: &'a Circles,
        stats: &'a mut Stats,
        room: usize,
        out: &'a mut Vec<Output>,
    ) -> Cx<'a> {
        Cx {
            now,
            storage,
            keys,
            circles,
            stats,
            room,
            out,
        }
    }

    /// Whether the local delivery queue is full.
    pub(super) fn queue_full(&self) -> bool {
        self.room == 0
    }

    /// Queues a message for local delivery (the caller checked [`Cx::queue_full`]).
    pub(super) fn deliver(&mut self, msg: Message) {
        self.room = self.room.saturating_sub(1);
        self.out.push(Output::Deliver(msg));
    }

    /// Publishes `topic` on the local bus with `key` (a signId or boxId) as its payload.
    pub(super) fn publish(&mut self, topic: &'static str, key: impl Display) {
        self.room = self.room.saturating_sub(1);
        self.out.push(Output::Publish(topic, key.to_string()));
    }

    /// Raises an event.
    pub(super) fn emit(&mut self, event: Event) {
        self.out.push(Output::Emit(event));
    }
}
