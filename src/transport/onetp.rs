//! The 1tp compatibility framing (docs/ARCHITECTURE.md §4.4), sans-IO: how the original
//! JavaScript nodes (mm-platform 0.7.5 over 1tp 0.21) wrap CurveCP packets on UDP and TCP.
//!
//! This module owns the bytes and the connecting side's state machine; the drivers in
//! [`super::driver`] own the sockets and the clock.
//!
//! Two layers:
//! - the socket layer, on both transports: [`SocketPacket`] `08` PING, `09` PONG, or
//!   `02 ns(curvecp packet)` DATA. On TCP each socket-layer packet is one netstring on the
//!   stream (the netstring is [`super::tcp::FramedStream`]'s job).
//! - on UDP only, the session layer: a [`Datagram`] is one type byte ([`SessionType`]), then
//!   `ns(version)`, `ns(session id)`, `ns(payload)`. The payload of a DATA datagram is one
//!   socket-layer packet; that of every other type is a transaction id.
//!
//! Parsing borrows its input and is strict: a version of at most [`MAX_VERSION`] bytes, a
//! session id of 1 to [`MAX_SESSION_ID`] bytes, a transaction id of 1 to
//! [`MAX_TRANSACTION_ID`] bytes, a DATA payload of at most [`MAX_SOCKET_PACKET`] bytes (one
//! wrapped CurveCP packet of at most [`MAX_PACKET`] bytes), canonical netstrings, and nothing
//! after the last field. Anything else is an [`OnetpError`]: the caller drops the input, and
//! no state changes. Encoding writes into a buffer the caller owns and never allocates; it
//! only ever produces the type bytes above (a JS node crashes on an unknown first byte).
//!
//! The connecting side is [`Dialer`]: on UDP a SYN (a random session id of 8 lowercase hex
//! characters and a transaction id of 2) resent every [`SYN_INTERVAL`] up to [`SYN_SENDS`]
//! times; a SYN_ACK of that session with that transaction id is answered by an ACK (every time
//! one comes: a JS node resends its SYN_ACK until it sees the ACK, and drops the session when
//! it gives up); then PING resent every [`PING_INTERVAL`] up to [`PING_SENDS`] times; a PONG or
//! any DATA opens it. On TCP the dialer starts at PING. A dialer whose retries run out fails
//! ([`DialError`]) and sends nothing more.
//!
//! The accepting side is stateless ([`accept_datagram`]), so a flood of SYNs costs no memory:
//! SYN → SYN_ACK with the same session and transaction ids, DATA(PING) → DATA(PONG),
//! DATA(`02 ns(pkt)`) → the CurveCP packet for the path (source address, session id), FIN →
//! ACK, RST → ACK (and the session's connection is over), ACK and DATA(PONG) → nothing. The
//! original keeps per-session state (it refuses DATA before a PING, and DATA for a session it
//! has not seen); here the CurveCP server's own checks stand in for that: a CurveCP packet
//! from an unknown session is as untrusted as one from an unknown address. 1tp's own sessions
//! never time out on their own; ours have no state to time out, and the CurveCP connection a
//! session carries times out in the CurveCP server.
//!
//! Replies are never larger than what provoked them (SYN_ACK = SYN, PONG = PING, ACK = FIN or
//! RST, all with the same ids), so the accepting side is no amplifier.

use std::fmt;
use std::time::{Duration, Instant};

use crate::crypto::random_bytes;
use crate::curvecp::MAX_PACKET;
use crate::netstring::{self, NetstringError};

/// The version 1tp 0.21 writes (a JS node checks only that the field is there).
pub const VERSION: &[u8] = b"0.21.0";
/// Longest version field accepted.
pub const MAX_VERSION: usize = 16;
/// Longest session id accepted (1tp writes 8 hex characters).
pub const MAX_SESSION_ID: usize = 16;
/// Longest transaction id accepted (1tp writes 2 hex characters).
pub const MAX_TRANSACTION_ID: usize = 16;

/// Socket-layer type byte of PING.
pub const PING: u8 = 0x08;
/// Socket-layer type byte of PONG.
pub const PONG: u8 = 0x09;
/// Socket-layer type byte of DATA.
pub const DATA: u8 = 0x02;

/// Encoded size of a netstring with a payload of `len` bytes (`len` below 10^6).
const fn ns_len(len: usize) -> usize {
    let digits = if len < 10 {
        1
    } else if len < 100 {
        2
    } else if len < 1000 {
        3
    } else if len < 10_000 {
        4
    } else if len < 100_000 {
        5
    } else {
        6
    };
    digits + 1 + len + 1
}

/// Longest socket-layer packet: DATA carrying a [`MAX_PACKET`]-byte CurveCP packet (1191
/// bytes). On TCP this is the longest netstring payload of the compatibility framing.
pub const MAX_SOCKET_PACKET: usize = 1 + ns_len(MAX_PACKET);
/// Longest session datagram accepted (or written): the DATA datagram of a
/// [`MAX_SOCKET_PACKET`] with the longest version and session id.
pub const MAX_DATAGRAM: usize =
    1 + ns_len(MAX_VERSION) + ns_len(MAX_SESSION_ID) + ns_len(MAX_SOCKET_PACKET);

/// Time between two SYNs of a [`Dialer`] (1tp: a 750 ms connect timeout over 5 retries).
pub const SYN_INTERVAL: Duration = Duration::from_millis(150);
/// SYNs a [`Dialer`] sends before it gives up.
pub const SYN_SENDS: u32 = 6;
/// Time between two PINGs of a [`Dialer`].
pub const PING_INTERVAL: Duration = Duration::from_millis(500);
/// PINGs a [`Dialer`] sends before it gives up.
pub const PING_SENDS: u32 = 6;

/// The type byte of a session datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionType {
    /// `00`: open a session (payload: transaction id).
    Syn,
    /// `01`: the session is accepted (payload: the SYN's transaction id).
    SynAck,
    /// `02`: one socket-layer packet.
    Data,
    /// `03`: the sender will write no more (payload: transaction id).
    Fin,
    /// `04`: the sender destroyed the session (payload: transaction id).
    Rst,
    /// `05`: acknowledges a SYN_ACK, FIN or RST (payload: its transaction id).
    Ack,
}

impl SessionType {
    /// The type of a first byte, if it is one of the six.
    pub fn from_byte(b: u8) -> Option<SessionType> {
        Some(match b {
            0 => SessionType::Syn,
            1 => SessionType::SynAck,
            2 => SessionType::Data,
            3 => SessionType::Fin,
            4 => SessionType::Rst,
            5 => SessionType::Ack,
            _ => return None,
        })
    }

    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            SessionType::Syn => 0,
            SessionType::SynAck => 1,
            SessionType::Data => 2,
            SessionType::Fin => 3,
            SessionType::Rst => 4,
            SessionType::Ack => 5,
        }
    }
}

/// Whether a UDP datagram starting with `first` is a 1tp session datagram (rather than a
/// native CurveCP packet, which starts with `Q` from a client and `R` from a server).
pub fn is_session_datagram(first: u8) -> bool {
    SessionType::from_byte(first).is_some()
}

/// Why bytes are not a valid compatibility-framing packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnetpError {
    /// No bytes at all.
    Empty,
    /// The first byte is not a known type.
    UnknownType(u8),
    /// A field's netstring is cut short.
    Truncated,
    /// A field is not a netstring (or announces more than its field allows).
    Netstring(NetstringError),
    /// The session id is empty.
    EmptySessionId,
    /// A control datagram's transaction id is empty.
    EmptyTransactionId,
    /// Bytes follow the last field.
    TrailingBytes,
    /// The accepting side's reply would not fit the caller's buffer or would be longer than
    /// the datagram it answers (the accepting side is no amplifier): nothing is sent.
    ReplyTooLarge,
}

impl fmt::Display for OnetpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnetpError::Empty => f.write_str("1tp: empty packet"),
            OnetpError::UnknownType(b) => write!(f, "1tp: unknown type byte {b:#04x}"),
            OnetpError::Truncated => f.write_str("1tp: truncated field"),
            OnetpError::Netstring(e) => write!(f, "1tp: {e}"),
            OnetpError::EmptySessionId => f.write_str("1tp: empty session id"),
            OnetpError::EmptyTransactionId => f.write_str("1tp: empty transaction id"),
            OnetpError::TrailingBytes => f.write_str("1tp: bytes after the last field"),
            OnetpError::ReplyTooLarge => {
                f.write_str("1tp: reply longer than the datagram it answers (not sent)")
            }
        }
    }
}

impl std::error::Error for OnetpError {}

/// Splits one netstring of at most `max` bytes off the front of `buf`.
fn take_ns(buf: &[u8], max: usize) -> Result<(&[u8], &[u8]), OnetpError> {
    match netstring::decode(buf, max) {
        Ok(Some(f)) => Ok((&buf[f.payload.clone()], &buf[f.consumed..])),
        Ok(None) => Err(OnetpError::Truncated),
        Err(e) => Err(OnetpError::Netstring(e)),
    }
}

/// Writes `ns(payload)` at `out[at..]`; returns the end, or `None` if it does not fit.
fn put_ns(out: &mut [u8], at: usize, payload: &[u8]) -> Option<usize> {
    let mut h = [0u8; 21];
    let n = netstring::write_header(payload.len(), &mut h);
    let end = at.checked_add(n + payload.len() + 1)?;
    if end > out.len() {
        return None;
    }
    out[at..at + n].copy_from_slice(&h[..n]);
    out[at + n..end - 1].copy_from_slice(payload);
    out[end - 1] = b',';
    Some(end)
}

/// A session id: 1 to [`MAX_SESSION_ID`] bytes, kept inline so paths stay `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    len: u8,
    bytes: [u8; MAX_SESSION_ID],
}

impl SessionId {
    /// A session id of these bytes; `None` if empty or longer than [`MAX_SESSION_ID`].
    pub fn new(id: &[u8]) -> Option<SessionId> {
        if id.is_empty() || id.len() > MAX_SESSION_ID {
            return None;
        }
        let mut bytes = [0u8; MAX_SESSION_ID];
        bytes[..id.len()].copy_from_slice(id);
        Some(SessionId {
            len: id.len() as u8,
            bytes,
        })
    }

    /// A fresh random id of 8 lowercase hex characters, as 1tp makes them.
    pub fn random() -> SessionId {
        let mut r = [0u8; 4];
        random_bytes(&mut r);
        let mut id = [0u8; 8];
        hex_into(&r, &mut id);
        SessionId::new(&id).expect("8 bytes")
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SessionId({:?})",
            String::from_utf8_lossy(self.as_bytes())
        )
    }
}

/// Writes the lowercase hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
}

/// One UDP session datagram, borrowing the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The type.
    pub kind: SessionType,
    /// The version field (1tp checks only that it is present).
    pub version: &'a [u8],
    /// The session id.
    pub session: &'a [u8],
    /// A socket-layer packet (DATA) or a transaction id (every other type).
    pub payload: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Parses one whole datagram (strict: see the module docs).
    pub fn parse(buf: &'a [u8]) -> Result<Datagram<'a>, OnetpError> {
        let (&first, rest) = buf.split_first().ok_or(OnetpError::Empty)?;
        let kind = SessionType::from_byte(first).ok_or(OnetpError::UnknownType(first))?;
        let (version, rest) = take_ns(rest, MAX_VERSION)?;
        let (session, rest) = take_ns(rest, MAX_SESSION_ID)?;
        if session.is_empty() {
            return Err(OnetpError::EmptySessionId);
        }
        let max = match kind {
            SessionType::Data => MAX_SOCKET_PACKET,
            _ => MAX_TRANSACTION_ID,
        };
        let (payload, rest) = take_ns(rest, max)?;
        if kind != SessionType::Data && payload.is_empty() {
            return Err(OnetpError::EmptyTransactionId);
        }
        if !rest.is_empty() {
            return Err(OnetpError::TrailingBytes);
        }
        Ok(Datagram {
            kind,
            version,
            session,
            payload,
        })
    }

    /// Writes the datagram into `out`; `None` if it does not fit or a field breaks the bounds
    /// [`Datagram::parse`] enforces (so what is written always parses back).
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        let max = match self.kind {
            SessionType::Data => MAX_SOCKET_PACKET,
            _ => MAX_TRANSACTION_ID,
        };
        let min = usize::from(self.kind != SessionType::Data);
        if self.version.len() > MAX_VERSION
            || !(1..=MAX_SESSION_ID).contains(&self.session.len())
            || !(min..=max).contains(&self.payload.len())
            || out.is_empty()
        {
            return None;
        }
        out[0] = self.kind.byte();
        let at = put_ns(out, 1, self.version)?;
        let at = put_ns(out, at, self.session)?;
        put_ns(out, at, self.payload)
    }
}

/// One socket-layer packet, borrowing the bytes it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPacket<'a> {
    /// `08`: the connecting side asks whether the other end is there.
    Ping,
    /// `09`: the answer to a PING.
    Pong,
    /// `02 ns(packet)`: one CurveCP packet (at most [`MAX_PACKET`] bytes).
    Data(&'a [u8]),
}

impl<'a> SocketPacket<'a> {
    /// Parses one whole socket-layer packet (strict: PING and PONG are one byte, DATA is
    /// exactly `02` and one netstring).
    pub fn parse(buf: &'a [u8]) -> Result<SocketPacket<'a>, OnetpError> {
        let (&first, rest) = buf.split_first().ok_or(OnetpError::Empty)?;
        let p = match first {
            PING => SocketPacket::Ping,
            PONG => SocketPacket::Pong,
            DATA => {
                let (pkt, rest) = take_ns(rest, MAX_PACKET)?;
                if !rest.is_empty() {
                    return Err(OnetpError::TrailingBytes);
                }
                return Ok(SocketPacket::Data(pkt));
            }
            b => return Err(OnetpError::UnknownType(b)),
        };
        if !rest.is_empty() {
            return Err(OnetpError::TrailingBytes);
        }
        Ok(p)
    }

    /// Writes the packet into `out`; `None` if it does not fit or a DATA packet is longer than
    /// [`MAX_PACKET`].
    pub fn encode(&self, out: &mut [u8]) -> Option<usize> {
        match self {
            SocketPacket::Ping | SocketPacket::Pong => {
                *out.first_mut()? = if *self == SocketPacket::Ping {
                    PING
                } else {
                    PONG
                };
                Some(1)
            }
            SocketPacket::Data(pkt) => {
                if pkt.len() > MAX_PACKET || out.is_empty() {
                    return None;
                }
                out[0] = DATA;
                put_ns(out, 1, pkt)
            }
        }
    }

    /// The encoded size.
    pub fn encoded_len(&self) -> usize {
        match self {
            SocketPacket::Ping | SocketPacket::Pong => 1,
            SocketPacket::Data(pkt) => 1 + netstring::encoded_len(pkt.len()),
        }
    }
}

/// Writes the TCP frame payload that carries one CurveCP packet (`02 ns(packet)`; the stream
/// adds the netstring around it). `None` if `packet` exceeds [`MAX_PACKET`] or `out` is short.
pub fn wrap_tcp(packet: &[u8], out: &mut [u8]) -> Option<usize> {
    SocketPacket::Data(packet).encode(out)
}

/// Writes the UDP DATA datagram of session `session` that carries one CurveCP packet:
/// `02 ns(version) ns(session) ns(02 ns(packet))`. `None` if `packet` exceeds [`MAX_PACKET`]
/// or `out` is short ([`MAX_DATAGRAM`] always suffices).
pub fn wrap_udp(session: &SessionId, packet: &[u8], out: &mut [u8]) -> Option<usize> {
    if packet.len() > MAX_PACKET || out.is_empty() {
        return None;
    }
    out[0] = SessionType::Data.byte();
    let at = put_ns(out, 1, VERSION)?;
    let at = put_ns(out, at, session.as_bytes())?;
    // The outer netstring's header, then the socket packet in place.
    let inner = SocketPacket::Data(packet).encoded_len();
    let mut h = [0u8; 21];
    let n = netstring::write_header(inner, &mut h);
    let end = at.checked_add(n + inner + 1)?;
    if end > out.len() {
        return None;
    }
    out[at..at + n].copy_from_slice(&h[..n]);
    let written = SocketPacket::Data(packet).encode(&mut out[at + n..end - 1])?;
    debug_assert_eq!(written, inner);
    out[end - 1] = b',';
    Some(end)
}

/// Writes a control datagram (`kind` other than DATA) of `session` with transaction id `tid`.
fn control(kind: SessionType, session: &[u8], tid: &[u8], out: &mut [u8]) -> Option<usize> {
    Datagram {
        kind,
        version: VERSION,
        session,
        payload: tid,
    }
    .encode(out)
}

/// Writes a DATA datagram of `session` carrying one socket-layer packet.
fn data_datagram(session: &[u8], packet: SocketPacket<'_>, out: &mut [u8]) -> Option<usize> {
    data_datagram_with(VERSION, session, packet, out)
}

/// Writes a DATA datagram with this version field, carrying one PING or PONG.
fn data_datagram_with(
    version: &[u8],
    session: &[u8],
    packet: SocketPacket<'_>,
    out: &mut [u8],
) -> Option<usize> {
    let mut inner = [0u8; 1];
    let n = match packet {
        SocketPacket::Data(_) => return None,
        p => p.encode(&mut inner)?,
    };
    Datagram {
        kind: SessionType::Data,
        version,
        session,
        payload: &inner[..n],
    }
    .encode(out)
}

/// Writes the accepting side's answer to `request`: `request` itself with only its type (or
/// its socket-layer PING) swapped, echoing the request's own version, session and transaction
/// ids. Parsing is canonical (canonical netstrings, nothing after the last field), so this is
/// exactly as long as the datagram `request` was parsed from, whatever version it carried; a
/// fixed version of our own would make the answer to a short version longer than the request.
/// `None` if `out` is too short or the answer would be longer than `input_len` (which the
/// construction rules out; checked anyway, as the no-amplification bound is the point).
fn answer(
    request: &Datagram<'_>,
    kind: SessionType,
    input_len: usize,
    out: &mut [u8],
) -> Option<usize> {
    let n = match kind {
        SessionType::Data => {
            data_datagram_with(request.version, request.session, SocketPacket::Pong, out)?
        }
        _ => Datagram { kind, ..*request }.encode(out)?,
    };
    (n <= input_len).then_some(n)
}

/// What one datagram means to the (stateless) accepting side: see [`accept_datagram`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// Send the first `len` bytes of `out` back to the source (a SYN_ACK for a SYN, a PONG for
    /// a PING, an ACK for a FIN).
    Reply(usize),
    /// A CurveCP packet carried by session `session`: the path is (source, `session`).
    Packet {
        /// The session that carried it.
        session: SessionId,
        /// The CurveCP packet.
        packet: &'a [u8],
    },
    /// The peer destroyed session `session`: send its ACK (the first `ack` bytes of `out`)
    /// back, and end whatever the session carried.
    Reset {
        /// The session reset.
        session: SessionId,
        /// Length of the ACK written into `out`.
        ack: usize,
    },
    /// Nothing to do (an ACK, a PONG, a SYN_ACK nobody asked for).
    Nothing,
}

/// The accepting side of the UDP session layer, without state: what to do with one datagram.
/// `out` receives any reply (a [`MAX_DATAGRAM`]-byte buffer always suffices: replies are no
/// larger than the datagram that provoked them). Malformed datagrams are errors, to be
/// dropped.
pub fn accept_datagram<'a>(input: &'a [u8], out: &mut [u8]) -> Result<Inbound<'a>, OnetpError> {
    let d = Datagram::parse(input)?;
    let session = SessionId::new(d.session).ok_or(OnetpError::EmptySessionId)?;
    // Every reply is the request re-encoded with its type swapped (see `answer`): never larger
    // than `input`, so it fits a MAX_DATAGRAM.
    let mut reply = |kind| answer(&d, kind, input.len(), out).ok_or(OnetpError::ReplyTooLarge);
    Ok(match d.kind {
        SessionType::Syn => Inbound::Reply(reply(SessionType::SynAck)?),
        SessionType::Fin => Inbound::Reply(reply(SessionType::Ack)?),
        SessionType::Rst => Inbound::Reset {
            session,
            ack: reply(SessionType::Ack)?,
        },
        SessionType::Ack | SessionType::SynAck => Inbound::Nothing,
        SessionType::Data => match SocketPacket::parse(d.payload)? {
            SocketPacket::Ping => Inbound::Reply(reply(SessionType::Data)?),
            SocketPacket::Pong => Inbound::Nothing,
            SocketPacket::Data(packet) => Inbound::Packet { session, packet },
        },
    })
}

/// Why a [`Dialer`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialError {
    /// No SYN_ACK after [`SYN_SENDS`] SYNs.
    NoSynAck,
    /// No PONG (nor DATA) after [`PING_SENDS`] PINGs.
    NoPong,
    /// The peer reset the session (RST).
    Reset,
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::NoSynAck => write!(f, "1tp: no SYN_ACK after {SYN_SENDS} SYNs"),
            DialError::NoPong => write!(f, "1tp: no PONG after {PING_SENDS} PINGs"),
            DialError::Reset => f.write_str("1tp: session reset by the peer (RST)"),
        }
    }
}

impl std::error::Error for DialError {}

/// Where a [`Dialer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialState {
    /// Sending SYNs, waiting for the SYN_ACK (UDP only).
    Syn,
    /// Sending PINGs, waiting for a PONG or DATA.
    Ping,
    /// Open: CurveCP packets go through [`Dialer::wrap`] and come out of [`Dialer::handle`].
    Open,
    /// Gave up.
    Failed(DialError),
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// A UDP session with our session id and the SYN's transaction id.
    Udp { session: SessionId, tid: [u8; 2] },
    /// A TCP stream (only the socket layer).
    Tcp,
}

/// The connecting side of the compatibility framing, sans-IO (see the module docs).
///
/// Feed it every datagram (UDP) or frame payload (TCP) from the peer with [`Dialer::handle`],
/// which hands back the CurveCP packets they carry once it is open; send what
/// [`Dialer::poll_transmit`] writes (its control datagrams or frames) until it returns `None`;
/// wrap every outgoing CurveCP packet with [`Dialer::wrap`]; come back at
/// [`Dialer::next_deadline`].
#[derive(Debug, Clone)]
pub struct Dialer {
    mode: Mode,
    state: DialState,
    /// SYNs or PINGs sent in the current state.
    sends: u32,
    /// When the next SYN or PING is due (or, after the last, when the dialer gives up).
    next_send: Instant,
    /// An ACK for the SYN_ACK is owed.
    ack_syn_ack: bool,
    /// An ACK for a FIN or RST is owed (the latest one's transaction id).
    ack_other: Option<([u8; MAX_TRANSACTION_ID], u8)>,
    /// The latest `now` seen.
    last_now: Instant,
}

impl Dialer {
    /// A UDP dialer with a fresh random session id and transaction id; its first SYN is due at
    /// `now`.
    pub fn udp(now: Instant) -> Dialer {
        let mut r = [0u8; 1];
        random_bytes(&mut r);
        let mut tid = [0u8; 2];
        hex_into(&r, &mut tid);
        Dialer::udp_with(SessionId::random(), tid, now)
    }

    /// A UDP dialer with the given session id and transaction id (tests use fixed ones).
    pub fn udp_with(session: SessionId, tid: [u8; 2], now: Instant) -> Dialer {
        Dialer::new(Mode::Udp { session, tid }, DialState::Syn, now)
    }

    /// A TCP dialer: its first PING is due at `now`.
    pub fn tcp(now: Instant) -> Dialer {
        Dialer::new(Mode::Tcp, DialState::Ping, now)
    }

    fn new(mode: Mode, state: DialState, now: Instant) -> Dialer {
        Dialer {
            mode,
            state,
            sends: 0,
            next_send: now,
            ack_syn_ack: false,
            ack_other: None,
            last_now: now,
        }
    }

    /// The session id (UDP only).
    pub fn session(&self) -> Option<SessionId> {
        match self.mode {
            Mode::Udp { session, .. } => Some(session),
            Mode::Tcp => None,
        }
    }

    /// Where the dialer is.
    pub fn state(&self) -> DialState {
        self.state
    }

    /// Whether CurveCP packets may flow.
    pub fn is_open(&self) -> bool {
        self.state == DialState::Open
    }

    /// Why the dialer gave up, if it did.
    pub fn failed(&self) -> Option<DialError> {
        match self.state {
            DialState::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Feeds one datagram (UDP) or frame payload (TCP) from the peer. Returns the CurveCP
    /// packet it carries, if the dialer is (or thereby becomes) open. Malformed input, another
    /// session's datagrams and unexpected types are dropped and change nothing.
    pub fn handle<'a>(&mut self, input: &'a [u8], now: Instant) -> Option<&'a [u8]> {
        if now > self.last_now {
            self.last_now = now;
        }
        let socket_packet = match self.mode {
            Mode::Tcp => input,
            Mode::Udp { session, tid } => {
                let d = match Datagram::parse(input) {
                    Ok(d) => d,
                    Err(e) => {
                        log::debug!("1tp dialer: dropped a datagram: {e}");
                        return None;
                    }
                };
                if d.session != session.as_bytes() {
                    log::debug!("1tp dialer: dropped a datagram of another session");
                    return None;
                }
                match d.kind {
                    SessionType::SynAck => {
                        if d.payload != tid {
                            log::debug!("1tp dialer: SYN_ACK with another transaction id");
                        } else if self.state == DialState::Syn {
                            self.state = DialState::Ping;
                            self.sends = 0;
                            self.next_send = now;
                            self.ack_syn_ack = true;
                        } else if matches!(self.state, DialState::Ping | DialState::Open) {
                            // Our ACK was lost: the peer asks again.
                            self.ack_syn_ack = true;
                        }
                        return None;
                    }
                    SessionType::Fin | SessionType::Rst => {
                        if self.state == DialState::Syn || self.failed().is_some() {
                            return None;
                        }
                        let mut t = [0u8; MAX_TRANSACTION_ID];
                        t[..d.payload.len()].copy_from_slice(d.payload);
                        self.ack_other = Some((t, d.payload.len() as u8));
                        if d.kind == SessionType::Rst {
                            self.state = DialState::Failed(DialError::Reset);
                        }
                        return None;
                    }
                    SessionType::Data if self.state != DialState::Syn => d.payload,
                    _ => {
                        log::debug!("1tp dialer: dropped a {:?} datagram", d.kind);
                        return None;
                    }
                }
            }
        };
        match SocketPacket::parse(socket_packet) {
            Ok(SocketPacket::Pong) => {
                if self.state == DialState::Ping {
                    self.state = DialState::Open;
                }
                None
            }
            Ok(SocketPacket::Data(pkt)) => match self.state {
                DialState::Ping | DialState::Open => {
                    self.state = DialState::Open;
                    Some(pkt)
                }
                _ => None,
            },
            Ok(SocketPacket::Ping) => None,
            Err(e) => {
                log::debug!("1tp dialer: dropped a socket packet: {e}");
                None
            }
        }
    }

    /// Writes the next control datagram (UDP) or frame payload (TCP) due at `now` into `out`
    /// ([`MAX_DATAGRAM`] bytes suffice) and returns its length.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        if now > self.last_now {
            self.last_now = now;
        }
        if let Mode::Udp { session, tid } = self.mode {
            if self.ack_syn_ack {
                self.ack_syn_ack = false;
                return control(SessionType::Ack, session.as_bytes(), &tid, out);
            }
            if let Some((t, len)) = self.ack_other.take() {
                return control(
                    SessionType::Ack,
                    session.as_bytes(),
                    &t[..usize::from(len)],
                    out,
                );
            }
        }
        let (limit, interval, error) = match self.state {
            DialState::Syn => (SYN_SENDS, SYN_INTERVAL, DialError::NoSynAck),
            DialState::Ping => (PING_SENDS, PING_INTERVAL, DialError::NoPong),
            DialState::Open | DialState::Failed(_) => return None,
        };
        if now < self.next_send {
            return None;
        }
        if self.sends >= limit {
            log::debug!("1tp dialer: {error}");
            self.state = DialState::Failed(error);
            return None;
        }
        let len = match (self.mode, self.state) {
            (Mode::Udp { session, tid }, DialState::Syn) => {
                control(SessionType::Syn, session.as_bytes(), &tid, out)
            }
            (Mode::Udp { session, .. }, _) => {
                data_datagram(session.as_bytes(), SocketPacket::Ping, out)
            }
            (Mode::Tcp, _) => SocketPacket::Ping.encode(out),
        }?;
        self.sends += 1;
        self.next_send = now + interval;
        Some(len)
    }

    /// Wraps one outgoing CurveCP packet into `out`: a DATA datagram of the session (UDP) or
    /// the frame payload `02 ns(packet)` (TCP). `None` if the packet exceeds [`MAX_PACKET`] or
    /// `out` is short ([`MAX_DATAGRAM`] bytes suffice).
    pub fn wrap(&self, packet: &[u8], out: &mut [u8]) -> Option<usize> {
        match self.mode {
            Mode::Udp { session, .. } => wrap_udp(&session, packet, out),
            Mode::Tcp => wrap_tcp(packet, out),
        }
    }

    /// When [`Dialer::poll_transmit`] next has something to do: at once while an ACK is owed,
    /// the next SYN or PING (or the moment of giving up) while connecting, never once open or
    /// failed.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.ack_syn_ack || self.ack_other.is_some() {
            return Some(self.last_now);
        }
        match self.state {
            DialState::Syn | DialState::Ping => Some(self.next_send),
            DialState::Open | DialState::Failed(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sid(s: &str) -> SessionId {
        SessionId::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn known_bytes() {
        let mut out = [0u8; MAX_DATAGRAM];
        let n = control(SessionType::Syn, b"0a1b2c3d", b"7f", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x006:0.21.0,8:0a1b2c3d,2:7f,");
        let n = data_datagram(b"0a1b2c3d", SocketPacket::Ping, &mut out).unwrap();
        assert_eq!(&out[..n], b"\x026:0.21.0,8:0a1b2c3d,1:\x08,");
        let n = wrap_udp(&sid("0a1b2c3d"), b"QvnQ", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x026:0.21.0,8:0a1b2c3d,8:\x024:QvnQ,,");
        let n = wrap_tcp(b"QvnQ", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x024:QvnQ,");
        // The longest packet fits the bounds exactly.
        let big = [7u8; MAX_PACKET];
        let n = wrap_udp(&sid("0a1b2c3d"), &big, &mut out).unwrap();
        let d = Datagram::parse(&out[..n]).unwrap();
        assert_eq!(d.payload.len(), MAX_SOCKET_PACKET);
        assert_eq!(
            SocketPacket::parse(d.payload),
            Ok(SocketPacket::Data(&big[..]))
        );
        assert!(wrap_udp(&sid("0a1b2c3d"), &[0u8; MAX_PACKET + 1], &mut out).is_none());
        assert!(wrap_udp(&sid("0a1b2c3d"), &big, &mut out[..n - 1]).is_none());
        assert_eq!(MAX_SOCKET_PACKET, 1191);
    }

    #[test]
    fn strict_parsing() {
        use OnetpError::*;
        let p = Datagram::parse;
        assert_eq!(p(b""), Err(Empty));
        assert_eq!(p(b"\x06").unwrap_err(), UnknownType(6));
        assert_eq!(p(b"Q").unwrap_err(), UnknownType(b'Q'));
        assert_eq!(p(b"\x006:0.21.0,8:0a1b2c3d,2:7f").unwrap_err(), Truncated);
        assert_eq!(
            p(b"\x006:0.21.0,8:0a1b2c3d,2:7f,x").unwrap_err(),
            TrailingBytes
        );
        assert_eq!(p(b"\x006:0.21.0,0:,2:7f,").unwrap_err(), EmptySessionId);
        assert_eq!(
            p(b"\x006:0.21.0,8:0a1b2c3d,0:,").unwrap_err(),
            EmptyTransactionId
        );
        assert_eq!(
            p(b"\x0017:01234567890123456,1:a,1:b,").unwrap_err(),
            Netstring(NetstringError::TooLong)
        );
        assert_eq!(
            p(b"\x000:,17:01234567890123456,1:b,").unwrap_err(),
            Netstring(NetstringError::TooLong)
        );
        assert_eq!(
            p(b"\x000:,1:a,17:01234567890123456,").unwrap_err(),
            Netstring(NetstringError::TooLong)
        );
        assert_eq!(
            p(b"\x020:,1:a,99999999999999999999999:").unwrap_err(),
            Netstring(NetstringError::TooLong)
        );
        // An empty version is present, so accepted (1tp checks presence only).
        assert!(p(b"\x050:,1:a,1:b,").is_ok());
        let s = SocketPacket::parse;
        assert_eq!(s(b""), Err(Empty));
        assert_eq!(s(b"\x08"), Ok(SocketPacket::Ping));
        assert_eq!(s(b"\x08\x08"), Err(TrailingBytes));
        assert_eq!(s(b"\x09"), Ok(SocketPacket::Pong));
        assert_eq!(s(b"\x03"), Err(UnknownType(3)));
        assert_eq!(s(b"\x021:a,,"), Err(TrailingBytes));
        assert_eq!(s(b"\x021:a"), Err(Truncated));
        assert_eq!(s(b"\x020:,"), Ok(SocketPacket::Data(b"")));
        assert_eq!(s(b"\x021185:"), Err(Netstring(NetstringError::TooLong)));
    }

    #[test]
    fn accepting_side_answers_without_state() {
        let mut out = [0u8; MAX_DATAGRAM];
        let syn = b"\x006:0.21.0,8:0a1b2c3d,2:7f,";
        assert_eq!(
            accept_datagram(syn, &mut out),
            Ok(Inbound::Reply(syn.len()))
        );
        assert_eq!(&out[..syn.len()], b"\x016:0.21.0,8:0a1b2c3d,2:7f,");
        let ping = b"\x026:0.21.0,8:0a1b2c3d,1:\x08,";
        assert_eq!(
            accept_datagram(ping, &mut out),
            Ok(Inbound::Reply(ping.len()))
        );
        assert_eq!(&out[..ping.len()], b"\x026:0.21.0,8:0a1b2c3d,1:\x09,");
        let fin = b"\x036:0.21.0,8:0a1b2c3d,2:a0,";
        assert_eq!(
            accept_datagram(fin, &mut out),
            Ok(Inbound::Reply(fin.len()))
        );
        assert_eq!(&out[..fin.len()], b"\x056:0.21.0,8:0a1b2c3d,2:a0,");
        let rst = b"\x046:0.21.0,8:0a1b2c3d,2:a1,";
        assert_eq!(
            accept_datagram(rst, &mut out),
            Ok(Inbound::Reset {
                session: sid("0a1b2c3d"),
                ack: rst.len()
            })
        );
        assert_eq!(&out[..rst.len()], b"\x056:0.21.0,8:0a1b2c3d,2:a1,");
        let ack = b"\x056:0.21.0,8:0a1b2c3d,2:7f,";
        assert_eq!(accept_datagram(ack, &mut out), Ok(Inbound::Nothing));
        let pong = b"\x026:0.21.0,8:0a1b2c3d,1:\x09,";
        assert_eq!(accept_datagram(pong, &mut out), Ok(Inbound::Nothing));
        let data = b"\x026:0.21.0,8:0a1b2c3d,8:\x024:QvnQ,,";
        assert_eq!(
            accept_datagram(data, &mut out),
            Ok(Inbound::Packet {
                session: sid("0a1b2c3d"),
                packet: b"QvnQ"
            })
        );
        // A DATA whose socket packet is unknown is malformed.
        assert_eq!(
            accept_datagram(b"\x026:0.21.0,8:0a1b2c3d,1:\x07,", &mut out),
            Err(OnetpError::UnknownType(7))
        );
    }

    /// Issue 25: the `onetp` fuzz target's crash input. A SYN with a 1-byte version, session
    /// and transaction id (13 bytes) was answered by a SYN_ACK carrying our own 6-byte version
    /// (18 bytes): a reflection amplifier. The answer echoes the request's fields instead.
    #[test]
    fn replies_are_never_longer_than_the_request() {
        let mut out = [0u8; MAX_DATAGRAM];
        let crash = b"\x001:\x01,1:\x01,1:\x01,";
        assert_eq!(crash.len(), 13);
        assert_eq!(accept_datagram(crash, &mut out), Ok(Inbound::Reply(13)));
        assert_eq!(&out[..13], b"\x011:\x01,1:\x01,1:\x01,");
        // The shortest requests of every kind that is answered: an empty version.
        for (req, rep) in [
            (&b"\x000:,1:s,1:t,"[..], &b"\x010:,1:s,1:t,"[..]),
            (b"\x030:,1:s,1:t,", b"\x050:,1:s,1:t,"),
            (b"\x040:,1:s,1:t,", b"\x050:,1:s,1:t,"),
            (b"\x020:,1:s,1:\x08,", b"\x020:,1:s,1:\x09,"),
        ] {
            let n = match accept_datagram(req, &mut out) {
                Ok(Inbound::Reply(n)) | Ok(Inbound::Reset { ack: n, .. }) => n,
                other => panic!("{req:?}: {other:?}"),
            };
            assert_eq!(&out[..n], rep);
        }
        // A buffer too short for the reply is refused, not overrun.
        assert_eq!(
            accept_datagram(crash, &mut out[..12]),
            Err(OnetpError::ReplyTooLarge)
        );
    }

    #[test]
    fn udp_dialer_runs_the_handshake() {
        let t0 = Instant::now();
        let mut d = Dialer::udp_with(sid("0a1b2c3d"), *b"7f", t0);
        let mut out = [0u8; MAX_DATAGRAM];
        let n = d.poll_transmit(t0, &mut out).unwrap();
        assert_eq!(&out[..n], b"\x006:0.21.0,8:0a1b2c3d,2:7f,");
        assert_eq!(d.poll_transmit(t0, &mut out), None);
        assert_eq!(d.next_deadline(), Some(t0 + SYN_INTERVAL));
        // Nothing passes before the SYN_ACK, and other sessions' or transactions' datagrams
        // change nothing.
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(
            d.handle(b"\x026:0.21.0,8:0a1b2c3d,8:\x024:QvnQ,,", t1),
            None
        );
        assert_eq!(d.handle(b"\x016:0.21.0,8:ffffffff,2:7f,", t1), None);
        assert_eq!(d.handle(b"\x016:0.21.0,8:0a1b2c3d,2:7e,", t1), None);
        assert_eq!(d.handle(b"\x046:0.21.0,8:0a1b2c3d,2:7e,", t1), None);
        assert_eq!(d.state(), DialState::Syn);
        assert_eq!(d.next_deadline(), Some(t0 + SYN_INTERVAL));
        // SYN_ACK: ACK, then PING at once.
        assert_eq!(d.handle(b"\x016:0.21.0,8:0a1b2c3d,2:7f,", t1), None);
        assert_eq!(d.next_deadline(), Some(t1));
        let n = d.poll_transmit(t1, &mut out).unwrap();
        assert_eq!(&out[..n], b"\x056:0.21.0,8:0a1b2c3d,2:7f,");
        let n = d.poll_transmit(t1, &mut out).unwrap();
        assert_eq!(&out[..n], b"\x026:0.21.0,8:0a1b2c3d,1:\x08,");
        assert_eq!(d.poll_transmit(t1, &mut out), None);
        assert_eq!(d.next_deadline(), Some(t1 + PING_INTERVAL));
        // A repeated SYN_ACK is ACKed again.
        d.handle(b"\x016:0.21.0,8:0a1b2c3d,2:7f,", t1);
        let n = d.poll_transmit(t1, &mut out).unwrap();
        assert_eq!(out[0], 5);
        assert_eq!(d.poll_transmit(t1, &mut out[..n]), None);
        // DATA opens it and passes through.
        assert!(!d.is_open());
        assert_eq!(
            d.handle(b"\x026:0.21.0,8:0a1b2c3d,8:\x024:RL3a,,", t1),
            Some(&b"RL3a"[..])
        );
        assert!(d.is_open());
        assert_eq!(d.next_deadline(), None);
        let n = d.wrap(b"QvnQ", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x026:0.21.0,8:0a1b2c3d,8:\x024:QvnQ,,");
        // FIN: ACKed, still open; RST: ACKed, failed.
        d.handle(b"\x036:0.21.0,8:0a1b2c3d,2:c4,", t1);
        let n = d.poll_transmit(t1, &mut out).unwrap();
        assert_eq!(&out[..n], b"\x056:0.21.0,8:0a1b2c3d,2:c4,");
        assert!(d.is_open());
        d.handle(b"\x046:0.21.0,8:0a1b2c3d,2:c5,", t1);
        assert_eq!(d.failed(), Some(DialError::Reset));
        let n = d.poll_transmit(t1, &mut out).unwrap();
        assert_eq!(&out[..n], b"\x056:0.21.0,8:0a1b2c3d,2:c5,");
        assert_eq!(d.poll_transmit(t1, &mut out), None);
        assert_eq!(d.next_deadline(), None);
        assert_eq!(
            d.handle(b"\x026:0.21.0,8:0a1b2c3d,8:\x024:RL3a,,", t1),
            None
        );
    }

    #[test]
    fn dialers_facing_silence_give_up_and_stop() {
        let t0 = Instant::now();
        let mut out = [0u8; MAX_DATAGRAM];
        let mut d = Dialer::udp(t0);
        let mut now = t0;
        let mut sent = 0;
        for _ in 0..100 {
            while d.poll_transmit(now, &mut out).is_some() {
                sent += 1;
            }
            match d.next_deadline() {
                Some(t) => now = t,
                None => break,
            }
        }
        assert_eq!(sent, SYN_SENDS);
        assert_eq!(d.failed(), Some(DialError::NoSynAck));
        assert_eq!(now, t0 + SYN_INTERVAL * SYN_SENDS);
        assert_eq!(
            d.failed().unwrap().to_string(),
            "1tp: no SYN_ACK after 6 SYNs"
        );
        assert_eq!(
            d.poll_transmit(now + Duration::from_secs(60), &mut out),
            None
        );

        let mut d = Dialer::tcp(t0);
        let mut now = t0;
        let mut sent = 0;
        for _ in 0..100 {
            while let Some(n) = d.poll_transmit(now, &mut out) {
                assert_eq!(&out[..n], &[PING]);
                sent += 1;
            }
            match d.next_deadline() {
                Some(t) => now = t,
                None => break,
            }
        }
        assert_eq!(sent, PING_SENDS);
        assert_eq!(d.failed(), Some(DialError::NoPong));
        assert_eq!(now, t0 + PING_INTERVAL * PING_SENDS);
    }

    #[test]
    fn tcp_dialer_opens_on_pong() {
        let t0 = Instant::now();
        let mut d = Dialer::tcp(t0);
        let mut out = [0u8; 16];
        assert_eq!(d.poll_transmit(t0, &mut out), Some(1));
        assert_eq!(d.handle(b"\x08", t0), None);
        assert_eq!(d.handle(b"junk", t0), None);
        assert!(!d.is_open());
        assert_eq!(d.handle(b"\x09", t0), None);
        assert!(d.is_open());
        assert_eq!(d.handle(b"\x024:RL3a,", t0), Some(&b"RL3a"[..]));
        let n = d.wrap(b"QvnQ", &mut out).unwrap();
        assert_eq!(&out[..n], b"\x024:QvnQ,");
        assert_eq!(d.session(), None);
    }

    #[test]
    fn random_ids_look_like_1tp_ones() {
        for _ in 0..50 {
            let s = SessionId::random();
            assert_eq!(s.as_bytes().len(), 8);
            assert!(s
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
            let d = Dialer::udp(Instant::now());
            let mut out = [0u8; MAX_DATAGRAM];
            let mut d2 = d.clone();
            let n = d2.poll_transmit(Instant::now(), &mut out).unwrap();
            let p = Datagram::parse(&out[..n]).unwrap();
            assert_eq!(p.payload.len(), 2);
            assert!(p.payload.iter().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(d.session().unwrap().as_bytes(), p.session);
        }
    }

    fn kind() -> impl Strategy<Value = SessionType> {
        (0u8..6).prop_map(|b| SessionType::from_byte(b).unwrap())
    }

    proptest! {
        #[test]
        fn datagram_round_trip(
            kind in kind(),
            version in proptest::collection::vec(any::<u8>(), 0..=MAX_VERSION),
            session in proptest::collection::vec(any::<u8>(), 1..=MAX_SESSION_ID),
            payload in proptest::collection::vec(any::<u8>(), 1..=MAX_SOCKET_PACKET),
        ) {
            let payload = if kind == SessionType::Data {
                &payload[..]
            } else {
                &payload[..payload.len().min(MAX_TRANSACTION_ID)]
            };
            let d = Datagram { kind, version: &version, session: &session, payload };
            let mut out = vec![0u8; MAX_DATAGRAM];
            let n = d.encode(&mut out).unwrap();
            prop_assert_eq!(Datagram::parse(&out[..n]), Ok(d));
            // Every strict prefix is malformed.
            for cut in [0, 1, n / 2, n - 1] {
                prop_assert!(Datagram::parse(&out[..cut]).is_err());
            }
            // A buffer one byte short is refused, not overrun.
            prop_assert_eq!(d.encode(&mut out[..n - 1]), None);
        }

        #[test]
        fn socket_packet_and_wrap_round_trip(
            pkt in proptest::collection::vec(any::<u8>(), 0..=MAX_PACKET),
            session in proptest::collection::vec(any::<u8>(), 1..=MAX_SESSION_ID),
        ) {
            let mut out = vec![0u8; MAX_DATAGRAM];
            let n = wrap_tcp(&pkt, &mut out).unwrap();
            prop_assert_eq!(SocketPacket::parse(&out[..n]), Ok(SocketPacket::Data(&pkt[..])));
            let s = SessionId::new(&session).unwrap();
            let n = wrap_udp(&s, &pkt, &mut out).unwrap();
            let mut reply = vec![0u8; MAX_DATAGRAM];
            prop_assert_eq!(
                accept_datagram(&out[..n], &mut reply),
                Ok(Inbound::Packet { session: s, packet: &pkt[..] })
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let mut out = vec![0u8; MAX_DATAGRAM];
            if let Ok(d) = Datagram::parse(&bytes) {
                prop_assert!(d.session.len() <= MAX_SESSION_ID && d.version.len() <= MAX_VERSION);
                prop_assert!(d.payload.len() <= MAX_SOCKET_PACKET);
            }
            if let Ok(SocketPacket::Data(p)) = SocketPacket::parse(&bytes) {
                prop_assert!(p.len() <= MAX_PACKET);
            }
            match accept_datagram(&bytes, &mut out) {
                Ok(Inbound::Reply(n)) | Ok(Inbound::Reset { ack: n, .. }) => {
                    // Never an amplifier (exactly the request's length), and always a type a
                    // JS node knows.
                    prop_assert_eq!(n, bytes.len());
                    prop_assert!(Datagram::parse(&out[..n]).is_ok());
                }
                _ => {}
            }
            let t = Instant::now();
            let mut d = Dialer::udp(t);
            let _ = d.handle(&bytes, t);
            let mut d = Dialer::tcp(t);
            let _ = d.handle(&bytes, t);
        }

        #[test]
        fn near_valid_datagrams_never_panic(
            kind in 0u8..8,
            fields in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..24), 0..5),
            cut in any::<usize>(),
        ) {
            // Well-formed netstrings of wrong sizes and counts, possibly cut short.
            let mut bytes = vec![kind];
            for f in &fields {
                netstring::encode_into(f, &mut bytes);
            }
            let cut = cut % (bytes.len() + 1);
            let mut out = vec![0u8; MAX_DATAGRAM];
            if let Ok(Inbound::Reply(n)) | Ok(Inbound::Reset { ack: n, .. }) =
                accept_datagram(&bytes[..cut], &mut out)
            {
                // No amplification, whatever the version's length (issue 25).
                prop_assert_eq!(n, cut);
            }
            let t = Instant::now();
            let mut d = Dialer::udp(t);
            prop_assert_eq!(d.handle(&bytes[..cut], t), None);
            prop_assert_eq!(d.state(), DialState::Syn);
        }
    }
}
