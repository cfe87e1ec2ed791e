//! The KRPC wire codec of the Mainline DHT (BEP 5, with the BEP 43 `ro` flag and the BEP 44
//! `get`/`put` arguments), sans-IO: bytes in, a typed [`Message`] out, and back.
//!
//! A KRPC message is one bencoded dictionary per UDP datagram: `t` (transaction id), `y`
//! (`q` query, `r` response, `e` error), for a query `q` (method) and `a` (arguments), for a
//! response `r`, for an error `e` (`[code, text]`); optionally `ro` (BEP 43) and `ip` (BEP 42,
//! the address the responder saw us at). The argument and response dictionaries share one
//! shape here, [`Fields`].
//!
//! Decoding is strict and bounded, since every datagram is hostile until checked: datagrams
//! over [`MAX_DATAGRAM`] bytes, non-canonical bencode (the `bendy` decoder refuses unsorted or
//! repeated keys and leading zeros), nesting deeper than [`MAX_DEPTH`], trailing bytes, known
//! keys of the wrong type or length (`id` not 20 bytes, `nodes` not a multiple of 26, ...),
//! tokens, transaction ids or salts over their limits: all are [`DecodeError`]s. Unknown keys
//! are skipped. A value `v` is kept as its raw bencoded bytes (what a BEP 44 signature covers).

use std::net::{Ipv4Addr, SocketAddrV4};

use bendy::decoding::{Decoder, DictDecoder, Object};
use bendy::encoding::{Encoder, SingleItemEncoder};
use bendy::value::Value as BValue;

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
/// Longest method name or error text kept.
const MAX_NAME: usize = 64;

/// A node as it appears in `nodes`: its id and IPv4 endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompactNode {
    /// Its id.
    pub id: NodeId,
    /// Where it listens.
    pub addr: SocketAddrV4,
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
    /// `nodes`: compact IPv4 nodes (at most [`MAX_NODES`] kept).
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
    pub ip: Option<SocketAddrV4>,
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

impl From<bendy::decoding::Error> for DecodeError {
    fn from(_: bendy::decoding::Error) -> Self {
        DecodeError::Malformed
    }
}

fn bytes<'a>(o: Object<'_, 'a>) -> Result<&'a [u8], DecodeError> {
    match o {
        Object::Bytes(b) => Ok(b),
        _ => Err(DecodeError::Malformed),
    }
}

fn int(o: Object<'_, '_>) -> Result<i64, DecodeError> {
    match o {
        Object::Integer(s) => s.parse().map_err(|_| DecodeError::Malformed),
        _ => Err(DecodeError::Malformed),
    }
}

fn fixed<const N: usize>(o: Object<'_, '_>) -> Result<[u8; N], DecodeError> {
    bytes(o)?.try_into().map_err(|_| DecodeError::Malformed)
}

fn limited(o: Object<'_, '_>, max: usize) -> Result<Vec<u8>, DecodeError> {
    let b = bytes(o)?;
    if b.len() > max {
        return Err(DecodeError::Malformed);
    }
    Ok(b.to_vec())
}

fn non_negative(o: Object<'_, '_>) -> Result<i64, DecodeError> {
    let n = int(o)?;
    if n < 0 {
        return Err(DecodeError::Malformed);
    }
    Ok(n)
}

/// The raw bencoded bytes of any object.
fn raw(o: Object<'_, '_>) -> Result<Vec<u8>, DecodeError> {
    Ok(match o {
        Object::Bytes(b) => encode_bytes(b),
        Object::Integer(s) => format!("i{s}e").into_bytes(),
        Object::List(l) => l.into_raw()?.to_vec(),
        Object::Dict(d) => d.into_raw()?.to_vec(),
    })
}

/// The bencoding of a byte string: `len:bytes`.
pub fn encode_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = format!("{}:", b.len()).into_bytes();
    out.extend_from_slice(b);
    out
}

/// Parses compact IPv4 nodes (`nodes`): a multiple of 26 bytes, at most [`MAX_NODES`] kept.
pub fn parse_nodes(b: &[u8]) -> Result<Vec<CompactNode>, DecodeError> {
    if !b.len().is_multiple_of(COMPACT_NODE_LEN) {
        return Err(DecodeError::Malformed);
    }
    Ok(b.chunks_exact(COMPACT_NODE_LEN)
        .take(MAX_NODES)
        .map(|c| {
            let mut id = [0u8; ID_LEN];
            id.copy_from_slice(&c[..ID_LEN]);
            CompactNode {
                id,
                addr: compact_addr(&c[ID_LEN..]),
            }
        })
        .collect())
}

fn compact_addr(c: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(c[0], c[1], c[2], c[3]),
        u16::from_be_bytes([c[4], c[5]]),
    )
}

fn addr_bytes(a: &SocketAddrV4) -> [u8; 6] {
    let o = a.ip().octets();
    let p = a.port().to_be_bytes();
    [o[0], o[1], o[2], o[3], p[0], p[1]]
}

fn decode_fields(mut d: DictDecoder<'_, '_>) -> Result<Fields, DecodeError> {
    let mut f = Fields::default();
    while let Some((key, o)) = d.next_pair()? {
        match key {
            b"id" => f.id = Some(fixed(o)?),
            b"target" => f.target = Some(fixed(o)?),
            b"info_hash" => f.info_hash = Some(fixed(o)?),
            b"token" => f.token = Some(limited(o, MAX_TOKEN)?),
            b"nodes" => f.nodes = parse_nodes(bytes(o)?)?,
            b"v" => {
                let v = raw(o)?;
                if v.len() > MAX_VALUE {
                    return Err(DecodeError::Malformed);
                }
                f.v = Some(v);
            }
            b"k" => f.k = Some(fixed(o)?),
            b"sig" => f.sig = Some(fixed(o)?),
            b"seq" => f.seq = Some(non_negative(o)?),
            b"cas" => f.cas = Some(non_negative(o)?),
            b"salt" => f.salt = Some(limited(o, MAX_SALT)?),
            // Anything else (nodes6, values, want, port, implied_port, ...) is skipped; its
            // structure is still checked by the decoder.
            _ => drop(o),
        }
    }
    Ok(f)
}

/// Decodes one datagram (see the module docs for what is refused).
pub fn decode(datagram: &[u8]) -> Result<Message, DecodeError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(DecodeError::TooLarge);
    }
    let mut dec = Decoder::new(datagram).with_max_depth(MAX_DEPTH);
    let mut t = None;
    let mut y = None;
    let mut q = None;
    let mut fields = None;
    let mut error = None;
    let mut ro = false;
    let mut ip = None;
    {
        let Some(Object::Dict(mut d)) = dec.next_object()? else {
            return Err(DecodeError::Malformed);
        };
        while let Some((key, o)) = d.next_pair()? {
            match key {
                b"t" => t = Some(limited(o, MAX_TXID)?),
                b"y" => y = Some(limited(o, 1)?),
                b"q" => q = Some(Method::from_name(bytes(o)?)),
                b"a" | b"r" => match o {
                    Object::Dict(inner) => fields = Some(decode_fields(inner)?),
                    _ => return Err(DecodeError::Malformed),
                },
                b"e" => match o {
                    Object::List(mut l) => {
                        let code = l.next_object()?.ok_or(DecodeError::Malformed)?;
                        let code = int(code)?;
                        let text = match l.next_object()? {
                            Some(o) => {
                                let b = bytes(o)?;
                                b[..b.len().min(MAX_NAME)].to_vec()
                            }
                            None => Vec::new(),
                        };
                        l.consume_all()?;
                        error = Some((code, text));
                    }
                    _ => return Err(DecodeError::Malformed),
                },
                b"ro" => ro = int(o)? == 1,
                b"ip" => {
                    let b = bytes(o)?;
                    // BEP 42 `ip`: 6 bytes for IPv4; an IPv6 form (18 bytes) is ignored.
                    if b.len() == 6 {
                        ip = Some(compact_addr(b));
                    }
                }
                _ => drop(o),
            }
        }
    }
    // Exactly one message: nothing may follow it.
    if dec.next_object()?.is_some() {
        return Err(DecodeError::Malformed);
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

fn emit_fields(f: &Fields, e: SingleItemEncoder<'_>) -> Result<(), bendy::encoding::Error> {
    e.emit_unsorted_dict(|d| {
        if let Some(id) = &f.id {
            d.emit_pair_with(b"id", |e| e.emit_bytes(&id[..]))?;
        }
        if let Some(t) = &f.target {
            d.emit_pair_with(b"target", |e| e.emit_bytes(&t[..]))?;
        }
        if let Some(h) = &f.info_hash {
            d.emit_pair_with(b"info_hash", |e| e.emit_bytes(&h[..]))?;
        }
        if let Some(t) = &f.token {
            d.emit_pair_with(b"token", |e| e.emit_bytes(&t[..]))?;
        }
        if !f.nodes.is_empty() {
            let mut nodes = Vec::with_capacity(f.nodes.len() * COMPACT_NODE_LEN);
            for n in &f.nodes {
                nodes.extend_from_slice(&n.id);
                nodes.extend_from_slice(&addr_bytes(&n.addr));
            }
            d.emit_pair_with(b"nodes", |e| e.emit_bytes(&nodes[..]))?;
        }
        if let Some(v) = &f.v {
            // The raw bytes were produced by this codec or checked by the decoder: they are
            // one canonical bencoded value, which re-encodes to the same bytes.
            let value =
                BValue::from_bencode(v).map_err(bendy::encoding::Error::malformed_content)?;
            d.emit_pair(b"v", value)?;
        }
        if let Some(k) = &f.k {
            d.emit_pair_with(b"k", |e| e.emit_bytes(&k[..]))?;
        }
        if let Some(s) = &f.sig {
            d.emit_pair_with(b"sig", |e| e.emit_bytes(&s[..]))?;
        }
        if let Some(s) = f.seq {
            d.emit_pair(b"seq", s)?;
        }
        if let Some(c) = f.cas {
            d.emit_pair(b"cas", c)?;
        }
        if let Some(s) = &f.salt {
            d.emit_pair_with(b"salt", |e| e.emit_bytes(&s[..]))?;
        }
        Ok(())
    })
}

use bendy::decoding::FromBencode as _;

/// Encodes a message. `None` only if a raw `v` is not one bencoded value (never for values
/// this crate built or decoded).
pub fn encode(m: &Message) -> Option<Vec<u8>> {
    let mut enc = Encoder::new().with_max_depth(MAX_DEPTH);
    enc.emit_with(|e| {
        e.emit_unsorted_dict(|d| {
            d.emit_pair_with(b"t", |e| e.emit_bytes(&m.t[..]))?;
            match &m.kind {
                Kind::Query(method) => {
                    d.emit_pair_with(b"y", |e| e.emit_bytes(b"q"))?;
                    d.emit_pair_with(b"q", |e| e.emit_bytes(method.name()))?;
                    d.emit_pair_with(b"a", |e| emit_fields(&m.fields, e))?;
                }
                Kind::Response => {
                    d.emit_pair_with(b"y", |e| e.emit_bytes(b"r"))?;
                    d.emit_pair_with(b"r", |e| emit_fields(&m.fields, e))?;
                }
                Kind::Error(code, text) => {
                    d.emit_pair_with(b"y", |e| e.emit_bytes(b"e"))?;
                    d.emit_pair_with(b"e", |e| {
                        e.emit_list(|l| {
                            l.emit_int(*code)?;
                            l.emit_bytes(text)
                        })
                    })?;
                }
            }
            if m.ro {
                d.emit_pair(b"ro", 1)?;
            }
            if let Some(ip) = &m.ip {
                d.emit_pair_with(b"ip", |e| e.emit_bytes(&addr_bytes(ip)))?;
            }
            Ok(())
        })
    })
    .ok()?;
    enc.get_output().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
