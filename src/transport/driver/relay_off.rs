//! The drivers without relays: the crate was built without the cargo feature `relay`, so
//! `relayed.rs` (relayed and punched paths, the relay role) is compiled out and these types
//! stand in for it with the same methods. A client never has a relayed path
//! ([`ClientRelay`] has no values), and a server drops every relay and punch datagram
//! ([`ServerRelays`], logged). The dial-back probe is not relay code and still works.

use std::collections::VecDeque;

use super::inbound::Reply;
use super::*;
use crate::transport::relay::Datagram;

/// A client's path through a relay: none exists without the `relay` feature (no value of
/// this type can be made, so its methods are never called).
pub(super) enum ClientRelay {}

impl ClientRelay {
    pub(super) fn relayed(&self) -> bool {
        match *self {}
    }

    pub(super) fn is_relay(&self, _from: SocketAddr) -> bool {
        match *self {}
    }

    pub(super) fn datagram(&mut self, _d: &[u8], _from: SocketAddr) {
        match *self {}
    }

    pub(super) fn after_read(&mut self, _u: &mut UdpEndpoint) -> Option<SocketAddr> {
        match *self {}
    }

    pub(super) fn transmit(
        &mut self,
        _client: &mut Client,
        _u: &mut UdpEndpoint,
        _peer: SocketAddr,
        _bufs: (&mut [u8], &mut [u8]),
        _now: Instant,
    ) -> io::Result<bool> {
        match *self {}
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        match *self {}
    }
}

/// A server's relayed paths without the `relay` feature: no relay role, no reservation, no
/// punch; every relay and punch datagram is dropped (and logged).
#[derive(Default)]
pub(super) struct ServerRelays;

impl ServerRelays {
    /// Drops a relay or punch datagram: relays are compiled out.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn datagram<'b>(
        &mut self,
        _server: &mut Server<Path>,
        _bufs: (&mut [u8], &'b mut [u8]),
        _d: &[u8],
        _parsed: Datagram<'_>,
        from: SocketAddr,
        _now: Instant,
        _events: &mut VecDeque<NatEvent>,
    ) -> Option<Reply<'b>> {
        debug!("server: dropped a relay datagram from {from} (built without the relay feature)");
        None
    }

    /// Nothing to send: no punch runs.
    pub(super) fn send_probes(&mut self, _u: &mut UdpEndpoint, _now: Instant) {}

    /// No probe is ever due.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        None
    }
}
