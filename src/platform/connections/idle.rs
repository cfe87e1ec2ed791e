//! What the connection manager still holds that the peers have not acknowledged: queued
//! frames, bytes written into streams and not acknowledged, offline records, delivery
//! acknowledgements to send ([`super::super::Platform::close`] waits for all of it).

use super::{stream_ref, Net};
use crate::curvecp::stream::Stream;

/// What is not yet acknowledged by the peers (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Outstanding {
    /// Real-time frames waiting in the destinations' queues (messages, and our own `mm`
    /// frames); offline records taken for sending are counted in `offline`.
    pub(crate) realtime_queued: usize,
    /// Bytes of frames begun or written into streams and not yet acknowledged by the peer's
    /// CurveCP stream.
    pub(crate) unacked_bytes: u64,
    /// Records in the offline buffer (not yet delivery-acknowledged).
    pub(crate) offline: usize,
    /// Delivery acknowledgements waiting for the de-duplication memory to be stored.
    pub(crate) acks_due: usize,
}

impl Outstanding {
    /// Nothing outstanding.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Outstanding::default()
    }
}

impl Net {
    /// What is outstanding now. Costs a pass over the peers with queued frames and over the
    /// connections: for [`super::super::Platform::close`] and `is_idle`, not for every turn.
    pub(crate) fn outstanding(&self) -> Outstanding {
        let realtime_queued = self
            .peers
            .values()
            .flat_map(|p| p.queue.iter())
            .filter(|m| m.track.offline.is_none())
            .count();
        let unacked_bytes = self
            .conns
            .iter()
            .map(|(_, c)| {
                let acked = stream_ref(&self.server, &c.link).map_or(0, Stream::bytes_acked);
                let begun = c.partial.len().saturating_sub(c.partial_pos) as u64;
                c.written.saturating_sub(acked) + begun
            })
            .sum();
        Outstanding {
            realtime_queued,
            unacked_bytes,
            offline: self.offline.len(),
            acks_due: self.acks_due.len(),
        }
    }

    /// Offline records deleted because their delivery was acknowledged, since start.
    pub(crate) fn records_delivered(&self) -> u64 {
        self.records_delivered
    }
}
