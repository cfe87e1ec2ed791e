//! The KRPC wire codec of the Mainline DHT (BEP 5, with the BEP 43 `ro` flag and the BEP 44
//! `get`/`put` arguments), sans-IO: bytes in, a typed [`Message`] out, and back.
//!
//! BEP 32 (IPv6): `nodes6` (compact IPv6 nodes, 38 bytes each) is read beside `nodes` into
//! the same list (each [`CompactNode`] keeps its family) and written back by family; `values`
//! and `ip` take both forms (6 or 18 bytes); `want` (`n4`, `n6`) is read and written.
//!
//! A KRPC message is one bencoded dictionary per UDP datagram: `t` (transaction id), `y`
//! (`q` query, `r` response, `e` error), for a query `q` (method) and `a` (arguments), for a
//! response `r`, for an error `e` (`[code, text]`); optionally `ro` (BEP 43) and `ip` (BEP 42,
//! the address the responder saw us at). The argument and response dictionaries share one
//! shape here, [`Fields`].
//!
//! Decoding is strict and bounded, since every datagram is hostile until checked: datagrams
//! over [`MAX_DATAGRAM`] bytes, non-canonical bencode (unsorted or
//! repeated keys, leading zeros, `-0`, empty integers, integers outside `i64`, lengths past the
//! end), nesting deeper than [`MAX_DEPTH`], trailing bytes, known keys of the wrong type or
//! length (`id` not 20 bytes, `nodes` not a multiple of 26, ...), tokens, transaction ids or
//! salts over their limits: all are [`DecodeError`]s. Unknown keys are skipped, once their
//! structure is checked. A value `v` is kept as the raw bencoded bytes received (what a BEP 44
//! signature covers).
//!
//! The bencode itself is read and written by a small strict codec of this module's own
//! (`bencode`): checking a datagram allocates nothing, and decoding one allocates only the
//! fields kept.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

mod bencode;

use bencode::{put_bytes, put_int, put_string_header, DictWriter, Invalid, Value};

/// Length of a node id, a target, an info-hash (160 bits).
pub const ID_LEN: usize = 20;
/// A node id or a lookup target.
pub type NodeId = [u8; ID_LEN];
/// Largest datagram read; larger ones are refused whole.
pub const MAX_DATAGRAM: usize = 1500;
/// Deepest nesting accepted (a message is three levels deep; a stored value may nest more).
pub const MAX_DEPTH: usize = 12;
/// Longest transaction id accepted.
pub const MAX_TXID: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN: usize = 64;
/// Longest salt (BEP 44).
pub const MAX_SALT: usize = 64;
/// Longest bencoded value `v` (BEP 44: 1,000 bytes).
pub const MAX_VALUE: usize = 1000;
/// Most nodes read from one `nodes` field (the rest are ignored).
pub const MAX_NODES: usize = 16;
/// Length of one compact node: id, IPv4 address, port.
pub const COMPACT_NODE_LEN: usize = 26;
/// Length of one compact IPv6 node (`nodes6`, BEP 32): id, IPv6 address, port.
pub const COMPACT_NODE6_LEN: usize = 38;
/// Compact peers (`values`) kept from one response at most.
pub const MAX_VALUES: usize = 32;
/// Longest method name or error text kept.
const MAX_NAME: usize = 64;

/// A node as it appears in `nodes` (IPv4) or `nodes6` (IPv6): its id and endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompactNode {
    /// Its id.
    pub id: NodeId,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// A query's method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// `ping`.
    Ping,
    /// `find_node`.
    FindNode,
    /// `get_peers`.
    GetPeers,
    /// `announce_peer`.
    AnnouncePeer,
    /// `get` (BEP 44).
    Get,
    /// `put` (BEP 44).
    Put,
    /// Any other name (at most 64 bytes kept), answered with error 204.
    Other(Vec<u8>),
}

impl Method {
    fn name(&self) -> &[u8] {
        match self {
            Method::Ping => b"ping",
            Method::FindNode => b"find_node",
            Method::GetPeers => b"get_peers",
            Method::AnnouncePeer => b"announce_peer",
            Method::Get => b"get",
            Method::Put => b"put",
            Method::Other(n) => n,
        }
    }

    fn from_name(n: &[u8]) -> Method {
        match n {
            b"ping" => Method::Ping,
            b"find_node" => Method::FindNode,
            b"get_peers" => Method::GetPeers,
            b"announce_peer" => Method::AnnouncePeer,
            b"get" => Method::Get,
            b"put" => Method::Put,
            other => Method::Other(other[..other.len().min(MAX_NAME)].to_vec()),
        }
    }
}

/// The arguments of a query, or the body of a response (one shape for both; absent fields are
/// `None` or empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    /// The sender's node id (required in queries and responses).
    pub id: Option<NodeId>,
    /// `target` (`find_node`, `get`).
    pub target: Option<NodeId>,
    /// `info_hash` (`get_peers`, `announce_peer`).
    pub info_hash: Option<NodeId>,
    /// `token` (responses to `get`/`get_peers`; `put`/`announce_peer` arguments).
    pub token: Option<Vec<u8>>,
    /// `nodes` and `nodes6`: compact IPv4 and IPv6 nodes (at most [`MAX_NODES`] of each
    /// kept).
    pub nodes: Vec<CompactNode>,
    /// `v`, raw bencoded (at most [`MAX_VALUE`] bytes).
    pub v: Option<Vec<u8>>,
    /// `k`: an ed25519 public key (BEP 44).
    pub k: Option<[u8; 32]>,
    /// `sig`: an ed25519 signature (BEP 44).
    pub sig: Option<[u8; 64]>,
    /// `seq` (BEP 44), never negative.
    pub seq: Option<i64>,
    /// `cas` (BEP 44), never negative.
    pub cas: Option<i64>,
    /// `salt` (BEP 44, at most [`MAX_SALT`] bytes).
    pub salt: Option<Vec<u8>>,
    /// `values` (responses to `get_peers`, BEP 5): compact peers, IPv4 (6 bytes) or IPv6
    /// (18 bytes, BEP 32), at most [`MAX_VALUES`] kept; entries of another length skipped.
    pub values: Vec<SocketAddr>,
    /// `port` (`announce_peer`), 1 to 65535.
    pub port: Option<u16>,
    /// `implied_port` (`announce_peer`): the peer's port is the datagram's source port.
    pub implied_port: bool,
    /// `want` (BEP 32): the families of nodes asked for (`n4`, `n6`); other entries skipped.
    pub want: Want,
}

/// The `want` list of BEP 32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Want {
    /// `n4`: IPv4 nodes.
    pub n4: bool,
    /// `n6`: IPv6 nodes.
    pub n6: bool,
}

/// What a message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A query (`y` = `q`) with its arguments in [`Message::fields`].
    Query(Method),
    /// A response (`y` = `r`) with its body in [`Message::fields`].
    Response,
    /// An error (`y` = `e`): code and text.
    Error(i64, Vec<u8>),
}

/// One KRPC message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The transaction id.
    pub t: Vec<u8>,
    /// Query, response or error.
    pub kind: Kind,
    /// Arguments or response body.
    pub fields: Fields,
    /// BEP 43: the sender is read-only (do not query it, do not add it to a routing table).
    pub ro: bool,
    /// BEP 42: the address the responder saw the requester at.
    pub ip: Option<SocketAddr>,
}

impl Message {
    /// A query.
    pub fn query(t: Vec<u8>, method: Method, fields: Fields, ro: bool) -> Message {
        Message {
            t,
            kind: Kind::Query(method),
            fields,
            ro,
            ip: None,
        }
    }

    /// A response.
    pub fn response(t: Vec<u8>, fields: Fields) -> Message {
        Message {
            t,
            kind: Kind::Response,
            fields,
            ro: false,
            ip: None,
        }
    }

    /// An error.
    pub fn error(t: Vec<u8>, code: i64, text: &str) -> Message {
        Message {
            t,
            kind: Kind::Error(code, text.as_bytes().to_vec()),
            fields: Fields::default(),
            ro: false,
            ip: None,
        }
    }
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Over [`MAX_DATAGRAM`] bytes.
    TooLarge,
    /// Not canonical bencode, not a KRPC message, or a field of the wrong type or size.
    Malformed,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecodeError::TooLarge => "datagram too large",
            DecodeError::Malformed => "malformed KRPC message",
        })
    }
}

impl std::error::Error for DecodeError {}

impl From<Invalid> for DecodeError {
    fn from(_: Invalid) -> Self {
        DecodeError::Malformed
    }
}

fn bytes<'a>(o: Value<'a>) -> Result<&'a [u8], DecodeError> {
    o.bytes().ok_or(DecodeError::Malformed)
}

fn int(o: Value<'_>) -> Result<i64, DecodeError> {
    o.int().ok_or(DecodeError::Malformed)
}

fn fixed<const N: usize>(o: Value<'_>) -> Result<[u8; N], DecodeError> {
    bytes(o)?.try_into().map_err(|_| DecodeError::Malformed)
}

fn limited(o: Value<'_>, max: usize) -> Result<Vec<u8>, DecodeError> {
    let b = bytes(o)?;
    if b.len() > max {
        return Err(DecodeError::Malformed);
    }
    Ok(b.to_vec())
}

fn non_negative(o: Value<'_>) -> Result<i64, DecodeError> {
    let n = int(o)?;
    if n < 0 {
        return Err(DecodeError::Malformed);
    }
    Ok(n)
}

/// The bencoding of a byte string: `len:bytes`.
pub fn encode_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + 8);
    put_bytes(&mut out, b);
    out
}

/// Parses compact IPv4 nodes (`nodes`): a multiple of 26 bytes, at most [`MAX_NODES`] kept.
pub fn parse_nodes(b: &[u8]) -> Result<Vec<CompactNode>, DecodeError> {
    parse_compact_nodes(b, COMPACT_NODE_LEN)
}

/// Parses compact nodes of `len` bytes each (26: `nodes`; 38: `nodes6`).
fn parse_compact_nodes(b: &[u8], len: usize) -> Result<Vec<CompactNode>, DecodeError> {
    if !b.len().is_multiple_of(len) {
        return Err(DecodeError::Malformed);
    }
    Ok(b.chunks_exact(len)
        .take(MAX_NODES)
        .filter_map(|c| {
            let mut id = [0u8; ID_LEN];
            id.copy_from_slice(&c[..ID_LEN]);
            Some(CompactNode {
                id,
                addr: compact_addr(&c[ID_LEN..])?,
            })
        })
        .collect())
}

/// A compact address: 6 bytes (IPv4, port) or 18 (IPv6, port); `None` for another length.
fn compact_addr(c: &[u8]) -> Option<SocketAddr> {
    match c.len() {
        6 => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::new(c[0], c[1], c[2], c[3]),
            u16::from_be_bytes([c[4], c[5]]),
        ))),
        18 => {
            let ip: [u8; 16] = c[..16].try_into().ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                u16::from_be_bytes([c[16], c[17]]),
                0,
                0,
            )))
        }
        _ => None,
    }
}

/// A compact address: 6 bytes for IPv4, 18 for IPv6.
fn addr_bytes(a: &SocketAddr) -> Vec<u8> {
    let mut out = match a.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    out.extend_from_slice(&a.port().to_be_bytes());
    out
}

fn decode_fields(o: Value<'_>) -> Result<Fields, DecodeError> {
    let mut f = Fields::default();
    for (key, o) in o.dict().ok_or(DecodeError::Malformed)? {
        match key {
            b"id" => f.id = Some(fixed(o)?),
            b"target" => f.target = Some(fixed(o)?),
            b"info_hash" => f.info_hash = Some(fixed(o)?),
            b"token" => f.token = Some(limited(o, MAX_TOKEN)?),
            b"nodes" => f.nodes.extend(parse_nodes(bytes(o)?)?),
            b"nodes6" => f
                .nodes
                .extend(parse_compact_nodes(bytes(o)?, COMPACT_NODE6_LEN)?),
            b"want" => {
                for w in o.list().ok_or(DecodeError::Malformed)? {
                    match bytes(w)? {
                        b"n4" => f.want.n4 = true,
                        b"n6" => f.want.n6 = true,
                        _ => {}
                    }
                }
            }
            b"v" => {
                if o.raw().len() > MAX_VALUE {
                    return Err(DecodeError::Malformed);
                }
                f.v = Some(o.raw().to_vec());
            }
            b"k" => f.k = Some(fixed(o)?),
            b"sig" => f.sig = Some(fixed(o)?),
            b"seq" => f.seq = Some(non_negative(o)?),
            b"cas" => f.cas = Some(non_negative(o)?),
            b"salt" => f.salt = Some(limited(o, MAX_SALT)?),
            b"values" => {
                for v in o.list().ok_or(DecodeError::Malformed)? {
                    let b = bytes(v)?;
                    if f.values.len() < MAX_VALUES {
                        f.values.extend(compact_addr(b));
                    }
                }
            }
            b"port" => {
                let p = int(o)?;
                f.port = Some(
                    u16::try_from(p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(DecodeError::Malformed)?,
                );
            }
            b"implied_port" => f.implied_port = int(o)? == 1,
            // Anything else is skipped; its structure was checked with the whole datagram's.
            _ => {}
        }
    }
    Ok(f)
}

/// Decodes one datagram (see the module docs for what is refused).
pub fn decode(datagram: &[u8]) -> Result<Message, DecodeError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(DecodeError::TooLarge);
    }
    let top = bencode::parse(datagram, MAX_DEPTH)?;
    let mut t = None;
    let mut y = None;
    let mut q = None;
    let mut fields = None;
    let mut error = None;
    let mut ro = false;
    let mut ip = None;
    // `parse` checked the whole datagram: one canonical value, nothing after it.
    for (key, o) in top.dict().ok_or(DecodeError::Malformed)? {
        match key {
            b"t" => t = Some(limited(o, MAX_TXID)?),
            b"y" => y = Some(limited(o, 1)?),
            b"q" => q = Some(Method::from_name(bytes(o)?)),
            b"a" | b"r" => fields = Some(decode_fields(o)?),
            b"e" => {
                // `[code, text]`; a missing text is empty, further items are ignored.
                let mut l = o.list().ok_or(DecodeError::Malformed)?;
                let code = int(l.next().ok_or(DecodeError::Malformed)?)?;
                let text = match l.next() {
                    Some(o) => {
                        let b = bytes(o)?;
                        b[..b.len().min(MAX_NAME)].to_vec()
                    }
                    None => Vec::new(),
                };
                error = Some((code, text));
            }
            b"ro" => ro = int(o)? == 1,
            b"ip" => {
                // BEP 42 `ip`: 6 bytes for IPv4, 18 for IPv6; another length is ignored.
                ip = compact_addr(bytes(o)?);
            }
            _ => {}
        }
    }
    let t = t.ok_or(DecodeError::Malformed)?;
    let kind = match y.as_deref() {
        Some(b"q") => Kind::Query(q.ok_or(DecodeError::Malformed)?),
        Some(b"r") => Kind::Response,
        Some(b"e") => {
            let (code, text) = error.ok_or(DecodeError::Malformed)?;
            Kind::Error(code, text)
        }
        _ => return Err(DecodeError::Malformed),
    };
    let fields = match kind {
        Kind::Error(..) => Fields::default(),
        _ => fields.ok_or(DecodeError::Malformed)?,
    };
    if !matches!(kind, Kind::Error(..)) && fields.id.is_none() {
        return Err(DecodeError::Malformed);
    }
    Ok(Message {
        t,
        kind,
        fields,
        ro,
        ip,
    })
}

/// Appends the argument or response dictionary, keys in canonical order.
fn put_fields(f: &Fields, out: &mut Vec<u8>) {
    let mut d = DictWriter::begin(out);
    if let Some(c) = f.cas {
        put_int(d.key(b"cas"), c);
    }
    if let Some(id) = &f.id {
        put_bytes(d.key(b"id"), id);
    }
    if f.implied_port {
        put_int(d.key(b"implied_port"), 1);
    }
    if let Some(h) = &f.info_hash {
        put_bytes(d.key(b"info_hash"), h);
    }
    if let Some(k) = &f.k {
        put_bytes(d.key(b"k"), k);
    }
    let families: [(&'static [u8], bool, usize); 2] = [
        (b"nodes", true, COMPACT_NODE_LEN),
        (b"nodes6", false, COMPACT_NODE6_LEN),
    ];
    for (key, v4, len) in families {
        let count = f.nodes.iter().filter(|n| n.addr.is_ipv4() == v4).count();
        if count == 0 {
            continue;
        }
        let out = d.key(key);
        put_string_header(out, count * len);
        for n in f.nodes.iter().filter(|n| n.addr.is_ipv4() == v4) {
            out.extend_from_slice(&n.id);
            out.extend_from_slice(&addr_bytes(&n.addr));
        }
    }
    if let Some(p) = f.port {
        put_int(d.key(b"port"), i64::from(p));
    }
    if let Some(s) = &f.salt {
        put_bytes(d.key(b"salt"), s);
    }
    if let Some(s) = f.seq {
        put_int(d.key(b"seq"), s);
    }
    if let Some(s) = &f.sig {
        put_bytes(d.key(b"sig"), s);
    }
    if let Some(t) = &f.target {
        put_bytes(d.key(b"target"), t);
    }
    if let Some(t) = &f.token {
        put_bytes(d.key(b"token"), t);
    }
    if let Some(v) = &f.v {
        d.key(b"v").extend_from_slice(v);
    }
    if !f.values.is_empty() {
        let out = d.key(b"values");
        out.push(b'l');
        for a in &f.values {
            put_bytes(out, &addr_bytes(a));
        }
        out.push(b'e');
    }
    if f.want.n4 || f.want.n6 {
        let out = d.key(b"want");
        out.push(b'l');
        if f.want.n4 {
            put_bytes(out, b"n4");
        }
        if f.want.n6 {
            put_bytes(out, b"n6");
        }
        out.push(b'e');
    }
    d.end();
}

/// Encodes a message. `None` only if a raw `v` is not one canonical bencoded value that fits
/// within [`MAX_DEPTH`] in its message (never for values this crate built or decoded).
pub fn encode(m: &Message) -> Option<Vec<u8>> {
    if let Some(v) = &m.fields.v {
        // `v` sits two levels down: in the message, in its `a` or `r`.
        bencode::parse(v, MAX_DEPTH - 2).ok()?;
    }
    let f = &m.fields;
    let len = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(
        160 + m.t.len()
            + len(&f.token)
            + len(&f.v)
            + len(&f.salt)
            + f.nodes.len() * COMPACT_NODE_LEN,
    );
    let mut d = DictWriter::begin(&mut out);
    match &m.kind {
        Kind::Query(_) => put_fields(f, d.key(b"a")),
        Kind::Response => {}
        Kind::Error(code, text) => {
            let out = d.key(b"e");
            out.push(b'l');
            put_int(out, *code);
            put_bytes(out, text);
            out.push(b'e');
        }
    }
    if let Some(ip) = &m.ip {
        put_bytes(d.key(b"ip"), &addr_bytes(ip));
    }
    if let Kind::Query(method) = &m.kind {
        put_bytes(d.key(b"q"), method.name());
    }
    if let Kind::Response = m.kind {
        put_fields(f, d.key(b"r"));
    }
    if m.ro {
        put_int(d.key(b"ro"), 1);
    }
    put_bytes(d.key(b"t"), &m.t);
    let y: &[u8] = match m.kind {
        Kind::Query(_) => b"q",
        Kind::Response => b"r",
        Kind::Error(..) => b"e",
    };
    put_bytes(d.key(b"y"), y);
    d.end();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Message {
        Message::query(
            b"aa".to_vec(),
            Method::Put,
            Fields {
                id: Some([1; 20]),
                token: Some(b"tok".to_vec()),
                v: Some(encode_bytes(b"hello")),
                k: Some([2; 32]),
                sig: Some([3; 64]),
                seq: Some(7),
                cas: Some(6),
                salt: Some(b"s".to_vec()),
                nodes: vec![CompactNode {
                    id: [9; 20],
                    addr: "127.0.0.1:6881".parse().unwrap(),
                }],
                ..Fields::default()
            },
            true,
        )
    }

    #[test]
    fn round_trip_and_known_bytes() {
        let m = sample();
        let b = encode(&m).unwrap();
        assert_eq!(decode(&b).unwrap(), m);
        // BEP 5's ping example, byte for byte.
        let ping = Message::query(
            b"aa".to_vec(),
            Method::Ping,
            Fields {
                id: Some(*b"abcdefghij0123456789"),
                ..Fields::default()
            },
            false,
        );
        assert_eq!(
            encode(&ping).unwrap(),
            b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe".to_vec()
        );
        let err = b"d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee";
        assert_eq!(
            decode(err).unwrap().kind,
            Kind::Error(201, b"A Generic Error Ocurred".to_vec())
        );
        // BEP 5's announce_peer and get_peers examples, byte for byte.
        let announce = b"d1:ad2:id20:abcdefghij012345678912:implied_porti1e9:info_hash20:mnopqrstuvwxyz1234564:porti6881e5:token8:aoeusnthe1:q13:announce_peer1:t2:aa1:y1:qe";
        let m = decode(announce).unwrap();
        assert_eq!(m.kind, Kind::Query(Method::AnnouncePeer));
        assert_eq!(m.fields.port, Some(6881));
        assert!(m.fields.implied_port);
        assert_eq!(m.fields.info_hash, Some(*b"mnopqrstuvwxyz123456"));
        assert_eq!(encode(&m).unwrap(), announce.to_vec());
        let peers = b"d1:rd2:id20:abcdefghij01234567895:token8:aoeusnth6:valuesl6:axje.u6:idhtnmee1:t2:aa1:y1:re";
        let m = decode(peers).unwrap();
        assert_eq!(
            m.fields.values,
            vec![
                compact_addr(b"axje.u").unwrap(),
                compact_addr(b"idhtnm").unwrap()
            ]
        );
        assert_eq!(encode(&m).unwrap(), peers.to_vec());
        // An IPv6 peer (BEP 32, 18 bytes) is read too, an entry of another length skipped; a
        // port of 0 or beyond 65535 is refused.
        let mixed = b"d1:rd2:id20:abcdefghij01234567896:valuesl18:0123456789abcdefgh6:axje.u7:1234567ee1:t2:aa1:y1:re";
        let values = decode(mixed).unwrap().fields.values;
        assert_eq!(values.len(), 2);
        assert!(values[0].is_ipv6() && values[1].is_ipv4());
        // BEP 32: nodes6 (38 bytes each) beside nodes, and want.
        let mut six = [0u8; COMPACT_NODE6_LEN];
        six[..ID_LEN].copy_from_slice(&[7; ID_LEN]);
        six[ID_LEN..ID_LEN + 16].copy_from_slice(&Ipv6Addr::LOCALHOST.octets());
        six[COMPACT_NODE6_LEN - 2..].copy_from_slice(&6881u16.to_be_bytes());
        let r = [
            &b"d1:rd2:id20:abcdefghij01234567896:nodes638:"[..],
            &six,
            b"4:wantl2:n42:n6ee1:t2:aa1:y1:re",
        ]
        .concat();
        let m = decode(&r).unwrap();
        assert_eq!(
            m.fields.nodes,
            vec![CompactNode {
                id: [7; ID_LEN],
                addr: "[::1]:6881".parse().unwrap()
            }]
        );
        assert_eq!(m.fields.want, Want { n4: true, n6: true });
        assert_eq!(encode(&m).unwrap(), r);
        assert!(
            decode(&[&r[..50], &r[51..]].concat()).is_err(),
            "nodes6 not of 38s"
        );
        for bad in [&b"4:porti0e"[..], b"4:porti65536e", b"4:porti-1e"] {
            let head = b"d1:ad2:id20:abcdefghij0123456789";
            let d = [&head[..], bad, b"e1:q4:ping1:t2:aa1:y1:qe"].concat();
            assert!(decode(&d).is_err(), "{}", String::from_utf8_lossy(&d));
        }
        // A nested value keeps its raw bytes.
        let r = b"d1:rd2:id20:abcdefghij01234567891:vd1:ai1eee1:t1:x1:y1:re";
        assert_eq!(decode(r).unwrap().fields.v.unwrap(), b"d1:ai1ee".to_vec());
    }

    #[test]
    fn hostile_datagrams_are_refused() {
        let good = encode(&sample()).unwrap();
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"garbage".to_vec(),
            b"i1e".to_vec(),
            b"le".to_vec(),
            // unsorted keys, repeated keys, leading zero
            b"d1:y1:r1:t1:xe".to_vec(),
            b"d1:t1:x1:t1:xe".to_vec(),
            b"d1:rd2:id20:abcdefghij0123456789e1:t1:x1:y1:r2:roi01ee".to_vec(),
            // response without id, id of 19 bytes, nodes not a multiple of 26
            b"d1:rde1:t1:x1:y1:re".to_vec(),
            b"d1:rd2:id19:abcdefghij012345678e1:t1:x1:y1:re".to_vec(),
            b"d1:rd2:id20:abcdefghij01234567895:nodes3:abce1:t1:x1:y1:re".to_vec(),
            // negative seq, unknown y, query without q
            b"d1:rd2:id20:abcdefghij01234567893:seqi-1ee1:t1:x1:y1:re".to_vec(),
            b"d1:rd2:id20:abcdefghij0123456789e1:t1:x1:y1:ze".to_vec(),
            b"d1:ad2:id20:abcdefghij0123456789e1:t1:x1:y1:qe".to_vec(),
            // a string claiming more bytes than there are, an integer overflowing i64
            b"d1:t99999999999:x".to_vec(),
            b"d1:rd2:id20:abcdefghij01234567893:seqi99999999999999999999ee1:t1:x1:y1:re".to_vec(),
            // an integer past i64 inside `v` (bendy accepted it, then the message could not be
            // re-encoded: fuzz/seeds/mainline/issue25-v-integer-past-i64), `-0`, an empty
            // integer, a non-string key, a string length with a leading zero
            b"d1:rd2:id20:abcdefghij01234567891:vi18230804820697083285ee1:t1:x1:y1:re".to_vec(),
            b"d1:rd2:id20:abcdefghij01234567891:vi-0ee1:t1:x1:y1:re".to_vec(),
            b"d1:rd2:id20:abcdefghij01234567891:viee1:t1:x1:y1:re".to_vec(),
            b"d1:rd2:id20:abcdefghij01234567891:vdi1ei1eee1:t1:x1:y1:re".to_vec(),
            b"d1:rd2:id20:abcdefghij0123456789e1:t01:x1:y1:re".to_vec(),
        ];
        // Trailing bytes, a truncated message, oversized, deep nesting, a long token.
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"i1e");
        cases.push(trailing);
        cases.push(good[..good.len() - 1].to_vec());
        cases.push(vec![b'l'; MAX_DATAGRAM + 1]);
        let mut deep = b"d1:rd2:id20:abcdefghij01234567891:v".to_vec();
        deep.extend(std::iter::repeat_n(b'l', 40));
        deep.extend(std::iter::repeat_n(b'e', 40));
        deep.extend_from_slice(b"e1:t1:x1:y1:re");
        cases.push(deep);
        let mut long = sample();
        long.fields.token = Some(vec![0; MAX_TOKEN + 1]);
        cases.push(encode(&long).unwrap());
        let mut big = sample();
        big.fields.v = Some(encode_bytes(&[b'x'; MAX_VALUE]));
        cases.push(encode(&big).unwrap());
        for (i, c) in cases.iter().enumerate() {
            assert!(
                decode(c).is_err(),
                "case {i} accepted: {:?}",
                String::from_utf8_lossy(c)
            );
        }
        // Every truncation and every single-byte change of a good message either decodes or
        // is refused, without panicking.
        for n in 0..good.len() {
            let _ = decode(&good[..n]);
            for x in [0u8, b'e', b'd', b'9', 0xff] {
                let mut b = good.clone();
                b[n] = x;
                let _ = decode(&b);
            }
        }
    }

    #[test]
    fn nodes_are_capped() {
        let mut b = Vec::new();
        for i in 0..40u8 {
            b.extend_from_slice(&[i; 20]);
            b.extend_from_slice(&[127, 0, 0, 1, 0, i]);
        }
        let n = parse_nodes(&b).unwrap();
        assert_eq!(n.len(), MAX_NODES);
        assert_eq!(n[3].addr, "127.0.0.1:3".parse().unwrap());
    }

    fn message() -> impl Strategy<Value = Message> {
        let bytes = |n: usize| prop::collection::vec(any::<u8>(), 0..n);
        // IPv4 or IPv6 addresses (`nodes`/`nodes6`, 6- or 18-byte `values`).
        let address = || {
            prop_oneof![
                (any::<u32>(), any::<u16>())
                    .prop_map(|(a, p)| SocketAddr::from((Ipv4Addr::from(a), p))),
                (any::<u128>(), any::<u16>())
                    .prop_map(|(a, p)| SocketAddr::from((Ipv6Addr::from(a), p))),
            ]
        };
        let node = (any::<NodeId>(), address()).prop_map(|(id, addr)| CompactNode { id, addr });
        // A few stored values: strings, integers, a nested dictionary and list.
        let v = prop_oneof![
            bytes(40).prop_map(|b| encode_bytes(&b)),
            any::<i64>().prop_map(|n| format!("i{n}e").into_bytes()),
            Just(b"d1:ai-1e1:bl0:d1:cleeee".to_vec()),
        ];
        let fields = (
            (
                prop::option::of(any::<NodeId>()),
                prop::option::of(any::<NodeId>()),
                prop::option::of(any::<NodeId>()),
                prop::option::of(bytes(MAX_TOKEN)),
            ),
            (
                prop::collection::vec(node, 0..MAX_NODES),
                prop::option::of(v),
                prop::option::of(any::<[u8; 32]>()),
                prop::option::of(
                    prop::collection::vec(any::<u8>(), 64).prop_map(|s| s.try_into().unwrap()),
                ),
            ),
            (
                prop::option::of(0..i64::MAX),
                prop::option::of(0..i64::MAX),
                prop::option::of(bytes(MAX_SALT)),
            ),
            (
                prop::collection::vec(address(), 0..MAX_VALUES),
                prop::option::of(1..=u16::MAX),
                any::<bool>(),
                (any::<bool>(), any::<bool>()).prop_map(|(n4, n6)| Want { n4, n6 }),
            ),
        )
            .prop_map(
                |(
                    (id, target, info_hash, token),
                    (nodes, v, k, sig),
                    (seq, cas, salt),
                    (values, port, implied_port, want),
                )| Fields {
                    id,
                    target,
                    info_hash,
                    token,
                    nodes,
                    v,
                    k,
                    sig,
                    seq,
                    cas,
                    salt,
                    values,
                    port,
                    implied_port,
                    want,
                },
            );
        let kind = prop_oneof![
            prop::sample::select(vec![
                Method::Ping,
                Method::FindNode,
                Method::GetPeers,
                Method::AnnouncePeer,
                Method::Get,
                Method::Put,
            ])
            .prop_map(Kind::Query),
            bytes(MAX_NAME).prop_filter_map("a known name", |n| match Method::from_name(&n) {
                Method::Other(n) => Some(Kind::Query(Method::Other(n))),
                _ => None,
            }),
            Just(Kind::Response),
            (any::<i64>(), bytes(MAX_NAME)).prop_map(|(c, t)| Kind::Error(c, t)),
        ];
        let ip = prop::option::of((any::<u32>(), any::<u16>()));
        (bytes(MAX_TXID), kind, fields, any::<bool>(), ip).prop_map(
            |(t, kind, mut fields, ro, ip)| {
                // Decoding yields IPv4 nodes first (`nodes`, then `nodes6`).
                fields.nodes.sort_by_key(|n| n.addr.is_ipv6());
                if matches!(kind, Kind::Error(..)) {
                    fields = Fields::default();
                } else if fields.id.is_none() {
                    fields.id = Some([5; ID_LEN]);
                }
                Message {
                    t,
                    kind,
                    fields,
                    ro,
                    ip: ip.map(|(a, p)| SocketAddr::from((Ipv4Addr::from(a), p))),
                }
            },
        )
    }

    proptest! {
        #[test]
        fn messages_round_trip_and_v_is_the_bytes_received(m in message()) {
            let b = encode(&m).unwrap();
            let d = decode(&b).unwrap();
            prop_assert_eq!(&d, &m);
            if let Some(v) = &d.fields.v {
                // The value's bytes as they stand in the datagram: after its key, the last of
                // its dictionary but for `values`.
                let want = d.fields.want.n4 || d.fields.want.n6;
                let next: &[u8] = match (d.fields.values.is_empty(), want) {
                    (false, _) => b"6:values",
                    (true, true) => b"4:want",
                    (true, false) => b"e",
                };
                let there = [&b"1:v"[..], v, next].concat();
                prop_assert!(b.windows(there.len()).any(|w| w == there));
            }
            prop_assert_eq!(encode(&d).unwrap(), b);
        }

        #[test]
        fn changed_messages_never_panic(m in message(), at in any::<usize>(), byte in any::<u8>()) {
            let mut b = encode(&m).unwrap();
            let i = at % b.len();
            b[i] = byte;
            // Whatever still decodes re-encodes to a datagram that decodes to the same message.
            for b in [&b[..], &b[..i]] {
                if let Ok(d) = decode(b) {
                    prop_assert_eq!(decode(&encode(&d).unwrap()).unwrap(), d);
                }
            }
        }
    }
}
