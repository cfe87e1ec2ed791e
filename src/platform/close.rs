//! Closing without loss: [`Platform::close`] runs the reactor until the peers acknowledged
//! everything sent (or a deadline), and [`Platform::is_idle`] /
//! [`Platform::unacknowledged_bytes`] say how far that is.

use std::io;
use std::time::{Duration, Instant};

use super::Platform;

/// The longest one turn of [`Platform::close`] waits (it checks for idleness after each).
const CLOSE_STEP: Duration = Duration::from_millis(50);

/// What [`Platform::close`] achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseReport {
    /// Everything was acknowledged before the deadline: nothing is lost by dropping the
    /// platform now.
    pub idle: bool,
    /// Non-real-time messages (`realtime: false`) whose delivery the receivers acknowledged
    /// during the close (their records are deleted).
    pub delivered: u64,
    /// Non-real-time messages left in the offline buffer: they are in storage, and are sent
    /// when the platform runs again on the same storage (until they expire).
    pub persisted: usize,
    /// Real-time frames still waiting in memory at the deadline (remote destinations), and
    /// local messages not yet delivered: lost when the platform is dropped. Their delivery
    /// callbacks, if any, are not called.
    pub dropped: usize,
    /// Bytes written into CurveCP streams (real-time messages, or offline records, which are
    /// still in `persisted`) that the peers had not acknowledged at the deadline: they may or
    /// may not have arrived.
    pub unacknowledged_bytes: u64,
}

impl Platform {
    /// Runs the reactor until every message sent is acknowledged, or until `deadline`
    /// (in the spirit of quinn's `wait_idle` and ZeroMQ's linger); then the platform can be
    /// dropped without losing what was acknowledged. "Acknowledged" means: a real-time
    /// message's bytes acknowledged by the peer's CurveCP stream; a non-real-time one's
    /// delivery acknowledged by the peer (see "Delivery guarantee" in [`crate::offline`]); a
    /// local one delivered to its subscribers. At least one turn runs, so what was sent just
    /// before is written out.
    ///
    /// What is not acknowledged by the deadline:
    ///
    /// - non-real-time messages stay in the offline buffer, in storage (they were written
    ///   there before their send returned): [`CloseReport::persisted`]. Dropping the platform
    ///   never deletes them; with a persistent store ([`crate::storage::FileStore`]) the next
    ///   run sends them. A destination that is unreachable keeps the close waiting until the
    ///   deadline, since its records cannot be acknowledged.
    /// - real-time messages are dropped: they are real-time, and are not written to storage.
    ///   [`CloseReport::dropped`] counts those still queued,
    ///   [`CloseReport::unacknowledged_bytes`] the bytes in flight.
    ///
    /// The platform stays usable after `close` (it is a flush, not a shutdown). Its peers
    /// must be running their own reactors meanwhile to acknowledge anything.
    ///
    /// Why it is needed: [`Platform::queued_bytes`] counts what waits in memory before it is
    /// written into a stream; a 1 MiB message leaves that queue in one turn while most of its
    /// bytes are still unacknowledged in the stream (and are lost if the platform is dropped
    /// then). [`Platform::is_idle`] answers the question "may I drop it now?".
    pub fn close(&mut self, deadline: Instant) -> io::Result<CloseReport> {
        let delivered_before = self.records_delivered();
        let mut first = true;
        loop {
            let now = Instant::now();
            if !first && (self.is_idle() || now >= deadline) {
                break;
            }
            first = false;
            self.poll(Some(
                deadline.saturating_duration_since(now).min(CLOSE_STEP),
            ))?;
        }
        let out = self.core.net.as_ref().map(|n| n.outstanding());
        let local = self.core.queue.len() + self.handle_rx.len();
        if let Some(net) = self.core.net.as_mut() {
            net.save(&mut *self.core.storage);
        }
        Ok(CloseReport {
            idle: self.is_idle(),
            delivered: self.records_delivered() - delivered_before,
            persisted: out.map_or(0, |o| o.offline),
            dropped: out.map_or(0, |o| o.realtime_queued) + local,
            unacknowledged_bytes: out.map_or(0, |o| o.unacked_bytes),
        })
    }

    /// Whether nothing sent is still unacknowledged (see [`Platform::close`]): no local message
    /// waits for delivery, no frame waits in memory, every byte written into a stream was
    /// acknowledged by the peer, and the offline buffer is empty (every non-real-time message
    /// was delivery-acknowledged). Dropping an idle platform loses nothing.
    /// [`Platform::queued_bytes`] `== 0` is not enough: it says nothing about bytes in flight.
    pub fn is_idle(&self) -> bool {
        !self.has_work()
            && self
                .core
                .net
                .as_ref()
                .is_none_or(|n| n.outstanding().is_empty())
    }

    /// Bytes written into streams to other nodes (or begun) that the peers have not
    /// acknowledged yet; unlike [`Platform::queued_bytes`], which counts what waits before it is
    /// written.
    pub fn unacknowledged_bytes(&self) -> u64 {
        self.core
            .net
            .as_ref()
            .map_or(0, |n| n.outstanding().unacked_bytes)
    }

    fn records_delivered(&self) -> u64 {
        self.core.net.as_ref().map_or(0, |n| n.records_delivered())
    }
}
