//! Reachability without relays: the crate was built without the cargo feature `relay`, so
//! `relay.rs` (the relay we use, serving reservations, hole punching) is compiled out and
//! this stands in for it with the same methods. Such a node publishes only its direct
//! endpoints (with the address a dial-back proved, as with the feature), takes no relay
//! whatever it learns, refuses reservations (`mm`/`relay.no`, logged) and never punches.

use std::net::SocketAddr;
use std::time::Instant;

use super::{BoxId, Endpoint, Net, NodeInfo, Path};
use crate::platform::connections::{Cx, RelayInUse};
use crate::storage::Storage;
use crate::transport::ServerDriver;
use crate::NetConfig;

/// The relay side of a node's reachability: nothing without the `relay` feature.
pub(super) struct Relays;

impl Relays {
    /// Nothing to hold.
    pub(super) fn new() -> Relays {
        Relays
    }

    /// No relayed endpoint is ever published.
    pub(super) fn endpoints(&self) -> Option<Vec<Endpoint>> {
        None
    }

    /// No relay was chosen in an earlier run (a record left by a build with the feature is
    /// left alone).
    pub(in crate::platform::connections) fn restore_choice(&mut self, _storage: &mut dyn Storage) {}

    /// No relay is ever used.
    pub(in crate::platform::connections) fn in_use(&self) -> Option<RelayInUse> {
        None
    }
}

/// Our UDP endpoint never offers relaying.
pub(in crate::platform::connections) fn offers_relay(_cfg: &NetConfig) -> bool {
    false
}

/// No relay role, no who-is answers.
pub(in crate::platform::connections) fn serve_whois(
    _cfg: &NetConfig,
    _server: &mut ServerDriver,
    _sign: crate::identity::SignId,
) {
}

/// The listeners never relay.
pub(in crate::platform::connections) fn serve_relay(_cfg: &NetConfig, _server: &mut ServerDriver) {}

impl Net {
    /// A nodeInfo arrived: relays are compiled out, so a node offering relaying is not
    /// remembered.
    pub(in crate::platform::connections) fn learn_relay(
        &mut self,
        _info: &NodeInfo,
        _now: Instant,
    ) {
    }

    /// No punch: no connection comes through a relay.
    pub(super) fn relay_on_active(
        &mut self,
        _k: usize,
        _b: BoxId,
        _path: Option<Path>,
        _now: Instant,
    ) {
    }

    /// Relays are compiled out: addresses of relays are not asked who they are.
    pub(crate) fn relay_addresses(&mut self, _addrs: &[SocketAddr]) {}

    /// Never raised: no who-is question is asked.
    pub(in crate::platform::connections) fn relay_identified(
        &mut self,
        _addr: SocketAddr,
        _sign: [u8; 32],
        _now: Instant,
    ) {
    }

    /// No reservation held or served.
    pub(super) fn relay_conn_lost(&mut self, _b: BoxId, _was_active: bool, _now: Instant) {}

    /// No relay is searched for, nor a choice stored.
    pub(in crate::platform::connections) fn relay_pump(&mut self, _cx: &mut Cx<'_>) {}

    /// No relay to leave or take.
    pub(super) fn relay_check_ended(&mut self, _now: Instant) {}

    /// Never raised: no relay is bound without the feature.
    pub(super) fn relay_bound(&mut self, _relay: SocketAddr, _observed: SocketAddr, _now: Instant) {
    }

    /// A reservation request is refused (we cannot relay); the other relay and punch frames
    /// are ignored.
    pub(super) fn relay_mm(
        &mut self,
        _k: usize,
        b: BoxId,
        topic: &str,
        _text: Option<&str>,
        now: Instant,
    ) {
        if topic == "relay.reserve" {
            log::debug!("{b} asked for a relay reservation: built without the relay feature");
            self.queue_mm(b, "relay.no", Vec::new(), now);
        }
    }
}
