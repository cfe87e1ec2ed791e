//! `connectionInfo`: the JSON list of endpoints a node publishes in its nodeInfo (docs/ARCHITECTURE.md §4.7),
//! parsed into typed [`Endpoint`]s and written back.
//!
//! The form is the original's:
//! `[{"transportType":"udp","transportInfo":{"address":"127.0.0.1","port":20000,"framing":"native"}}, ...]`.
//! The extra `"framing": "native"` field of `transportInfo` marks an endpoint that speaks the
//! native framing of docs/ARCHITECTURE.md §4.2 (one datagram or one netstring per CurveCP packet); JS nodes
//! ignore it. Endpoints without the mark (`native: false`) are reached with the JS
//! compatibility framing ([`Endpoint::framing`], [`super::onetp`]) and tried last.
//!
//! Two more shapes for reaching nodes behind NATs ([`super::relay`]):
//! - `{"transportType":"mm-relay","transportInfo":{"address":...,"port":...}}`: the node is
//!   reached through the relay listening (UDP, native framing) at that address, which forwards
//!   packets addressed to the node's box key ([`Endpoint::relayed`]). JS nodes skip endpoints
//!   whose transportType none of their transports has (1tp's `Socket.connect` matches
//!   `transportType` against its registered transports), so they ignore these; tried last.
//! - `"relay": true` in a native UDP endpoint's `transportInfo`: the node offers relaying
//!   there ([`Endpoint::offers_relay`]).
//!
//! IPv6 endpoints are written with the transport types `udp6` and `tcp6`: the original JS
//! nodes open IPv4 sockets only, and one given a `udp` endpoint with an IPv6 address dies of
//! it (1tp's send fails with `EINVAL`, unhandled; `tests/js_nodes.rs`), while a transport type
//! they do not know they skip. `udp` and `tcp` entries with IPv6 addresses are still read.
//!
//! Parsing input from the network is bounded: at most [`MAX_ENDPOINTS`] entries are kept,
//! entries of unknown transport types or with invalid addresses are skipped.

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};

use super::{Framing, TransportKind};

/// Most endpoints kept from one connectionInfo.
pub const MAX_ENDPOINTS: usize = 16;

/// One way to reach a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// UDP or TCP.
    pub kind: TransportKind,
    /// Address and port.
    pub addr: SocketAddr,
    /// Whether the endpoint advertises the native framing.
    pub native: bool,
    /// `addr` is a relay that forwards to the node (`mm-relay`).
    pub relayed: bool,
    /// The node offers relaying at this (native UDP) endpoint.
    pub offers_relay: bool,
}

impl Endpoint {
    /// A native-framing endpoint.
    pub fn native(kind: TransportKind, addr: SocketAddr) -> Endpoint {
        Endpoint {
            kind,
            addr,
            native: true,
            relayed: false,
            offers_relay: false,
        }
    }

    /// A relayed endpoint: the node is reached through the relay at `relay`.
    pub fn relayed(relay: SocketAddr) -> Endpoint {
        Endpoint {
            kind: TransportKind::Udp,
            addr: relay,
            native: true,
            relayed: true,
            offers_relay: false,
        }
    }

    /// The framing a client uses to reach this endpoint: native if it carries the mark, the
    /// compatibility framing otherwise.
    pub fn framing(&self) -> Framing {
        if self.native {
            Framing::Native
        } else {
            Framing::Compat
        }
    }

    /// The JSON form of this endpoint.
    pub fn to_json(&self) -> Value {
        let kind = match (self.kind, self.relayed, self.addr.is_ipv6()) {
            (_, true, _) => "mm-relay",
            (TransportKind::Udp, _, false) => "udp",
            (TransportKind::Tcp, _, false) => "tcp",
            (TransportKind::Udp, _, true) => "udp6",
            (TransportKind::Tcp, _, true) => "tcp6",
        };
        let mut info = json!({
            "address": self.addr.ip().to_string(),
            "port": self.addr.port(),
        });
        if self.native && !self.relayed {
            info["framing"] = json!("native");
        }
        if self.offers_relay {
            info["relay"] = json!(true);
        }
        json!({"transportType": kind, "transportInfo": info})
    }

    /// Parses one entry; `None` if it is not a UDP or TCP endpoint with a valid address.
    pub fn from_json(v: &Value) -> Option<Endpoint> {
        let (kind, relayed, v6) = match v.get("transportType")?.as_str()? {
            "udp" => (TransportKind::Udp, false, false),
            "tcp" => (TransportKind::Tcp, false, false),
            "udp6" => (TransportKind::Udp, false, true),
            "tcp6" => (TransportKind::Tcp, false, true),
            "mm-relay" => (TransportKind::Udp, true, false),
            _ => return None,
        };
        let info = v.get("transportInfo")?;
        let ip: IpAddr = info.get("address")?.as_str()?.parse().ok()?;
        if v6 && !ip.is_ipv6() {
            return None;
        }
        let port = u16::try_from(info.get("port")?.as_u64()?).ok()?;
        let native = relayed || info.get("framing").and_then(Value::as_str) == Some("native");
        let offers_relay = native
            && !relayed
            && kind == TransportKind::Udp
            && info.get("relay").and_then(Value::as_bool) == Some(true);
        Some(Endpoint {
            kind,
            addr: SocketAddr::new(ip, port),
            native,
            relayed,
            offers_relay,
        })
    }
}

/// Parses a connectionInfo array (anything else gives an empty list). Invalid entries are
/// skipped; at most [`MAX_ENDPOINTS`] are kept, in their order.
pub fn parse(v: &Value) -> Vec<Endpoint> {
    let Some(list) = v.as_array() else {
        return Vec::new();
    };
    list.iter()
        .take(MAX_ENDPOINTS)
        .filter_map(Endpoint::from_json)
        .collect()
}

/// The JSON array of `endpoints`.
pub fn to_json(endpoints: &[Endpoint]) -> Value {
    Value::Array(endpoints.iter().map(Endpoint::to_json).collect())
}

/// The order in which a client tries endpoints: direct native ones first, UDP before TCP
/// within each group, IPv6 before IPv4 within those (RFC 8305), then unmarked
/// (compatibility) ones, relayed ones last (stable otherwise). Without the cargo feature
/// `relay` relayed ones are left out: this build cannot dial them.
pub fn connect_order(endpoints: &[Endpoint]) -> Vec<Endpoint> {
    let mut v = endpoints.to_vec();
    v.retain(|e| cfg!(feature = "relay") || !e.relayed);
    v.sort_by_key(|e| {
        (
            e.relayed,
            !e.native,
            e.kind == TransportKind::Tcp,
            e.addr.is_ipv4(),
        )
    });
    v
}

/// [`connect_order`] for a node that offers relaying (an endpoint says `"relay": true`):
/// IPv4 before IPv6. A relay is for IPv4 NAT traversal: what it observes of us, the dial-back
/// it does and the reservation we hold with it are IPv4's, so we talk to it over IPv4 even
/// when it is dual-stack (and [`race_partner`] is not used for it).
pub fn connect_order_for_relay(endpoints: &[Endpoint]) -> Vec<Endpoint> {
    let mut v = connect_order(endpoints);
    v.sort_by_key(|e| {
        (
            e.relayed,
            !e.native,
            e.kind == TransportKind::Tcp,
            e.addr.is_ipv6(),
        )
    });
    v
}

/// Whether a nodeInfo's endpoints say that the node offers relaying.
pub fn offers_relay(endpoints: &[Endpoint]) -> bool {
    endpoints.iter().any(|e| e.offers_relay)
}

/// The endpoint to race against `ep` (Happy Eyeballs): for a direct native UDP endpoint, the
/// first one of `order` like it in the other address family.
pub fn race_partner(ep: &Endpoint, order: &[Endpoint]) -> Option<Endpoint> {
    let raceable = |e: &Endpoint| e.kind == TransportKind::Udp && e.native && !e.relayed;
    if !raceable(ep) {
        return None;
    }
    order
        .iter()
        .find(|e| raceable(e) && e.addr.is_ipv4() != ep.addr.is_ipv4())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let eps = vec![
            Endpoint::native(TransportKind::Tcp, "127.0.0.1:2".parse().unwrap()),
            Endpoint {
                kind: TransportKind::Udp,
                addr: "10.0.0.1:3".parse().unwrap(),
                native: false,
                relayed: false,
                offers_relay: false,
            },
            Endpoint::native(TransportKind::Udp, "[::1]:1".parse().unwrap()),
        ];
        let j = to_json(&eps);
        assert_eq!(j[0]["transportInfo"]["framing"], "native");
        assert!(j[1]["transportInfo"].get("framing").is_none());
        assert_eq!(parse(&j), eps);
        let order = connect_order(&eps);
        assert_eq!(order[0].kind, TransportKind::Udp);
        assert!(order[0].native);
        assert_eq!(order[1].kind, TransportKind::Tcp);
        assert!(!order[2].native);
        assert_eq!(order[0].framing(), Framing::Native);
        assert_eq!(order[2].framing(), Framing::Compat);
    }

    #[test]
    fn relayed_and_relay_offering_endpoints() {
        let relay: SocketAddr = "203.0.113.10:4000".parse().unwrap();
        let mut offer = Endpoint::native(TransportKind::Udp, relay);
        offer.offers_relay = true;
        let eps = vec![
            Endpoint::relayed(relay),
            offer,
            Endpoint::native(TransportKind::Tcp, relay),
        ];
        let j = to_json(&eps);
        assert_eq!(j[0]["transportType"], "mm-relay");
        assert!(j[0]["transportInfo"].get("framing").is_none());
        assert_eq!(j[1]["transportInfo"]["relay"], true);
        assert_eq!(parse(&j), eps);
        let order = connect_order(&eps);
        if cfg!(feature = "relay") {
            assert!(order[2].relayed, "relayed endpoints are tried last");
        } else {
            assert_eq!(order.len(), 2, "relayed endpoints cannot be dialled");
            assert!(order.iter().all(|e| !e.relayed));
        }
        // "relay" on an unmarked or TCP endpoint means nothing.
        let odd = json!([
            {"transportType": "udp", "transportInfo": {"address": "1.2.3.4", "port": 1, "relay": true}},
            {"transportType": "tcp", "transportInfo": {"address": "1.2.3.4", "port": 1, "framing": "native", "relay": true}},
            {"transportType": "mm-relay", "transportInfo": {"address": "1.2.3.4"}}
        ]);
        let p = parse(&odd);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|e| !e.offers_relay));
    }

    #[test]
    fn hostile_input_is_skipped_and_bounded() {
        assert!(parse(&json!({"not": "a list"})).is_empty());
        let bad = json!([
            {"transportType": "udp", "transportInfo": {"address": "nope", "port": 1}},
            {"transportType": "udp", "transportInfo": {"address": "1.2.3.4", "port": 70000}},
            {"transportType": "carrier-pigeon", "transportInfo": {"address": "1.2.3.4", "port": 1}},
            {"transportType": "tcp"},
            7
        ]);
        assert!(parse(&bad).is_empty());
        let many: Vec<Value> = (0..100)
            .map(|i| json!({"transportType": "udp", "transportInfo": {"address": "127.0.0.1", "port": i}}))
            .collect();
        assert_eq!(parse(&Value::Array(many)).len(), MAX_ENDPOINTS);
    }

    #[test]
    fn ipv6_first_relays_over_ipv4_and_race_partners_in_the_other_family() {
        let v4 = Endpoint::native(TransportKind::Udp, "192.0.2.1:4000".parse().unwrap());
        let v6 = Endpoint::native(TransportKind::Udp, "[2001:db8::1]:4000".parse().unwrap());
        let tcp6 = Endpoint::native(TransportKind::Tcp, "[2001:db8::1]:4001".parse().unwrap());
        let order = connect_order(&[v4, tcp6, v6]);
        assert_eq!(order, vec![v6, v4, tcp6]);
        assert_eq!(race_partner(&v6, &order), Some(v4));
        assert_eq!(race_partner(&v4, &order), Some(v6));
        assert_eq!(race_partner(&tcp6, &order), None, "TCP is not raced");
        assert_eq!(race_partner(&v4, &[v4]), None);
        let (r4, r6) = (
            Endpoint {
                offers_relay: true,
                ..v4
            },
            Endpoint {
                offers_relay: true,
                ..v6
            },
        );
        assert!(offers_relay(&[r6, r4]) && !offers_relay(&[v4, v6]));
        assert_eq!(connect_order_for_relay(&[r6, r4]), vec![r4, r6]);
    }

    #[test]
    fn ipv6_endpoints_have_their_own_transport_types() {
        let u = Endpoint::native(TransportKind::Udp, "[2001:db8::1]:4000".parse().unwrap());
        let t = Endpoint::native(TransportKind::Tcp, "[2001:db8::1]:4001".parse().unwrap());
        let r = Endpoint::relayed("[2001:db8::10]:4000".parse().unwrap());
        let j = to_json(&[u, t, r]);
        assert_eq!(j[0]["transportType"], "udp6");
        assert_eq!(j[1]["transportType"], "tcp6");
        assert_eq!(j[2]["transportType"], "mm-relay");
        assert_eq!(parse(&j), vec![u, t, r]);
        // `udp` with an IPv6 address is read too; `udp6` with an IPv4 one is not.
        let lenient = json!([{"transportType": "udp", "transportInfo": {"address": "::1", "port": 1}},
            {"transportType": "udp6", "transportInfo": {"address": "127.0.0.1", "port": 1}}]);
        let p = parse(&lenient);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].addr, "[::1]:1".parse::<SocketAddr>().unwrap());
    }
}
