//! CurveCP packet layouts (docs/ARCHITECTURE.md §4.1): constants, borrowing parsers with every
//! length, magic and extension check, and builders that write into a caller's buffer and box in
//! place.
//!
//! Parsers never decrypt: they only check the public framing and hand back borrowed views of
//! the fields (the caller opens the boxes with the right key). Builders take the packet buffer
//! with the plaintext message already written at the message offset (so the message layer can
//! write straight into the packet buffer) and fill in the header and the box in place.
//!
//! Also here: the 24-byte nonce helpers and [`ServerName`], the 256-byte DNS wire form of a
//! server name (docs/ARCHITECTURE.md §4.1: between nodes, the empty name).

use super::Extension;
use crate::crypto::{Nonce, SharedKey, KEY_LEN, NONCE_LEN, TAG_LEN};

/// Magic of a Hello (client to server).
pub const HELLO_MAGIC: &[u8; 8] = b"QvnQ5XlH";
/// Magic of an Initiate (client to server).
pub const INITIATE_MAGIC: &[u8; 8] = b"QvnQ5XlI";
/// Magic of a client Message.
pub const CLIENT_MESSAGE_MAGIC: &[u8; 8] = b"QvnQ5XlM";
/// Magic of a Cookie (server to client).
pub const COOKIE_MAGIC: &[u8; 8] = b"RL3aNMXK";
/// Magic of a server Message.
pub const SERVER_MESSAGE_MAGIC: &[u8; 8] = b"RL3aNMXM";
/// The first seven bytes of every client packet.
pub const CLIENT_PREFIX: &[u8; 7] = b"QvnQ5Xl";

/// Nonce prefix of the Hello box.
pub const HELLO_NONCE: &[u8; 16] = b"CurveCP-client-H";
/// Nonce prefix of the Initiate box.
pub const INITIATE_NONCE: &[u8; 16] = b"CurveCP-client-I";
/// Nonce prefix of a client Message box.
pub const CLIENT_MESSAGE_NONCE: &[u8; 16] = b"CurveCP-client-M";
/// Nonce prefix of a server Message box.
pub const SERVER_MESSAGE_NONCE: &[u8; 16] = b"CurveCP-server-M";
/// Nonce prefix of the Cookie box.
pub const COOKIE_NONCE: &[u8; 8] = b"CurveCPK";
/// Nonce prefix of the vouch.
pub const VOUCH_NONCE: &[u8; 8] = b"CurveCPV";
/// Nonce prefix of the minute-key secretbox inside a cookie.
pub const MINUTE_NONCE: &[u8; 8] = b"minute-k";

/// Length of a Hello.
pub const HELLO_LEN: usize = 224;
/// Length of a Cookie packet.
pub const COOKIE_PACKET_LEN: usize = 200;
/// Length of the opaque cookie a Cookie packet carries and an Initiate echoes.
pub const COOKIE_LEN: usize = 96;
/// Length of the vouch.
pub const VOUCH_LEN: usize = 64;
/// Length of a server name.
pub const NAME_LEN: usize = 256;
/// Smallest message in any packet.
pub const MIN_MESSAGE: usize = 16;

/// Offset of the message in an Initiate packet (after the header, the tag and the inner
/// fields C, vouch and name).
pub const INITIATE_MESSAGE_OFFSET: usize = 544;
/// Smallest Initiate (16-byte message).
pub const INITIATE_MIN_LEN: usize = INITIATE_MESSAGE_OFFSET + MIN_MESSAGE;
/// Largest Initiate (640-byte message).
pub const INITIATE_MAX_LEN: usize = INITIATE_MESSAGE_OFFSET + super::MAX_INITIATE_MESSAGE;
/// Offset of the message in a client Message packet.
pub const CLIENT_MESSAGE_OFFSET: usize = 96;
/// Smallest client Message packet.
pub const CLIENT_MESSAGE_MIN_LEN: usize = CLIENT_MESSAGE_OFFSET + MIN_MESSAGE;
/// Largest client Message packet.
pub const CLIENT_MESSAGE_MAX_LEN: usize = CLIENT_MESSAGE_OFFSET + super::MAX_MESSAGE;
/// Offset of the message in a server Message packet.
pub const SERVER_MESSAGE_OFFSET: usize = 64;
/// Smallest server Message packet.
pub const SERVER_MESSAGE_MIN_LEN: usize = SERVER_MESSAGE_OFFSET + MIN_MESSAGE;
/// Largest server Message packet.
pub const SERVER_MESSAGE_MAX_LEN: usize = SERVER_MESSAGE_OFFSET + super::MAX_MESSAGE;
/// Smallest client packet the server-side prefilter (the reference server's) lets through.
pub const PREFILTER_MIN_LEN: usize = 80;

/// `prefix(16) || counter as LE u64`: the nonce of Hello, Initiate and Message boxes.
pub fn counter_nonce(prefix: &[u8; 16], counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..16].copy_from_slice(prefix);
    n[16..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// `prefix(8) || suffix(16)`: the nonce of the Cookie box, the vouch and the minute-key box.
pub fn long_nonce(prefix: &[u8; 8], suffix: &[u8; 16]) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..8].copy_from_slice(prefix);
    n[8..].copy_from_slice(suffix);
    n
}

fn arr<const N: usize>(s: &[u8]) -> &[u8; N] {
    s.try_into().expect("slice length checked by the caller")
}

fn le_u64(s: &[u8]) -> u64 {
    u64::from_le_bytes(*arr::<8>(s))
}

/// A Hello, as the server sees it.
#[derive(Debug, Clone, Copy)]
pub struct HelloView<'a> {
    /// The client's extension (echoed in the Cookie).
    pub client_extension: &'a Extension,
    /// C', the client's short-term public key.
    pub client_short: &'a [u8; KEY_LEN],
    /// The 64 padding bytes at 72..136 (zero from an honest client).
    pub padding: &'a [u8; 64],
    /// The nonce counter N.
    pub nonce: u64,
    /// The 80-byte box of 64 zero bytes.
    pub boxed: &'a [u8; 80],
}

/// An Initiate, as the server sees it.
#[derive(Debug, Clone, Copy)]
pub struct InitiateView<'a> {
    /// The client's extension.
    pub client_extension: &'a Extension,
    /// C'.
    pub client_short: &'a [u8; KEY_LEN],
    /// The cookie, as the server issued it (if genuine).
    pub cookie: &'a [u8; COOKIE_LEN],
    /// The nonce counter N.
    pub nonce: u64,
    /// The box of C, vouch, name and message (368 + M bytes).
    pub boxed: &'a [u8],
}

/// A client Message, as the server sees it.
#[derive(Debug, Clone, Copy)]
pub struct ClientMessageView<'a> {
    /// The client's extension.
    pub client_extension: &'a Extension,
    /// C' (the connection's key in the server's table).
    pub client_short: &'a [u8; KEY_LEN],
    /// The nonce counter N.
    pub nonce: u64,
    /// The box of the message (16 + M bytes).
    pub boxed: &'a [u8],
}

/// A client packet that passed the server's prefilter and its type's length rule.
#[derive(Debug, Clone, Copy)]
pub enum ClientPacket<'a> {
    /// A Hello.
    Hello(HelloView<'a>),
    /// An Initiate.
    Initiate(InitiateView<'a>),
    /// A client Message.
    Message(ClientMessageView<'a>),
}

/// Why a client packet was not accepted by [`parse_client_packet`] (for debug logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The length is outside the allowed range or not a multiple of 16.
    Length,
    /// The magic is wrong.
    Magic,
    /// The extension differs from ours.
    Extension,
}

/// Parses a client packet with the reference server's prefilter (80 ≤ r ≤ 1184, r % 16 == 0,
/// client magic, our server extension at 8..24), then the type's own rule: Hello r == 224,
/// Initiate 560 ≤ r ≤ 1184, Message 112 ≤ r ≤ 1184.
pub fn parse_client_packet<'a>(
    p: &'a [u8],
    server_extension: &Extension,
) -> Result<ClientPacket<'a>, ParseError> {
    let r = p.len();
    if !(PREFILTER_MIN_LEN..=super::MAX_PACKET).contains(&r) || !r.is_multiple_of(16) {
        return Err(ParseError::Length);
    }
    if &p[..7] != CLIENT_PREFIX {
        return Err(ParseError::Magic);
    }
    if &p[8..24] != server_extension {
        return Err(ParseError::Extension);
    }
    let client_extension = arr::<16>(&p[24..40]);
    let client_short = arr::<32>(&p[40..72]);
    match p[7] {
        b'H' => {
            if r != HELLO_LEN {
                return Err(ParseError::Length);
            }
            Ok(ClientPacket::Hello(HelloView {
                client_extension,
                client_short,
                padding: arr(&p[72..136]),
                nonce: le_u64(&p[136..144]),
                boxed: arr(&p[144..224]),
            }))
        }
        b'I' => {
            if r < INITIATE_MIN_LEN {
                return Err(ParseError::Length);
            }
            Ok(ClientPacket::Initiate(InitiateView {
                client_extension,
                client_short,
                cookie: arr(&p[72..168]),
                nonce: le_u64(&p[168..176]),
                boxed: &p[176..],
            }))
        }
        b'M' => {
            if r < CLIENT_MESSAGE_MIN_LEN {
                return Err(ParseError::Length);
            }
            Ok(ClientPacket::Message(ClientMessageView {
                client_extension,
                client_short,
                nonce: le_u64(&p[72..80]),
                boxed: &p[80..],
            }))
        }
        _ => Err(ParseError::Magic),
    }
}

/// A Cookie packet, as the client sees it.
#[derive(Debug, Clone, Copy)]
pub struct CookieView<'a> {
    /// The 16-byte nonce suffix (prefix `CurveCPK`).
    pub nonce: &'a [u8; 16],
    /// The 144-byte box of S' and the cookie.
    pub boxed: &'a [u8; 144],
}

/// Parses a Cookie: exactly 200 bytes, the magic, our client extension at 8..24 and the server
/// extension at 24..40.
pub fn parse_cookie<'a>(
    p: &'a [u8],
    client_extension: &Extension,
    server_extension: &Extension,
) -> Result<CookieView<'a>, ParseError> {
    if p.len() != COOKIE_PACKET_LEN {
        return Err(ParseError::Length);
    }
    if &p[..8] != COOKIE_MAGIC {
        return Err(ParseError::Magic);
    }
    if &p[8..24] != client_extension || &p[24..40] != server_extension {
        return Err(ParseError::Extension);
    }
    Ok(CookieView {
        nonce: arr(&p[40..56]),
        boxed: arr(&p[56..200]),
    })
}

/// A server Message, as the client sees it.
#[derive(Debug, Clone, Copy)]
pub struct ServerMessageView<'a> {
    /// The nonce counter N.
    pub nonce: u64,
    /// The box of the message (16 + M bytes).
    pub boxed: &'a [u8],
}

/// Parses a server Message: 80 ≤ r ≤ 1152, r % 16 == 0, the magic and both extensions.
pub fn parse_server_message<'a>(
    p: &'a [u8],
    client_extension: &Extension,
    server_extension: &Extension,
) -> Result<ServerMessageView<'a>, ParseError> {
    let r = p.len();
    if !(SERVER_MESSAGE_MIN_LEN..=SERVER_MESSAGE_MAX_LEN).contains(&r) || !r.is_multiple_of(16) {
        return Err(ParseError::Length);
    }
    if &p[..8] != SERVER_MESSAGE_MAGIC {
        return Err(ParseError::Magic);
    }
    if &p[8..24] != client_extension || &p[24..40] != server_extension {
        return Err(ParseError::Extension);
    }
    Ok(ServerMessageView {
        nonce: le_u64(&p[40..48]),
        boxed: &p[48..],
    })
}

/// Writes a Hello into `out[..224]` and returns 224. `key` is beforenm(S, c').
pub fn build_hello(
    out: &mut [u8],
    server_extension: &Extension,
    client_extension: &Extension,
    client_short: &[u8; KEY_LEN],
    nonce: u64,
    key: &SharedKey,
) -> usize {
    let out = &mut out[..HELLO_LEN];
    out[..8].copy_from_slice(HELLO_MAGIC);
    out[8..24].copy_from_slice(server_extension);
    out[24..40].copy_from_slice(client_extension);
    out[40..72].copy_from_slice(client_short);
    out[72..136].fill(0);
    out[136..144].copy_from_slice(&nonce.to_le_bytes());
    out[144..224].fill(0);
    key.seal_in_place(&counter_nonce(HELLO_NONCE, nonce), &mut out[144..224]);
    HELLO_LEN
}

/// Writes a Cookie packet into `out[..200]` and returns 200. `key` is beforenm(C', s),
/// `box_nonce` the 16-byte suffix of the `CurveCPK` nonce.
pub fn build_cookie(
    out: &mut [u8],
    client_extension: &Extension,
    server_extension: &Extension,
    box_nonce: &[u8; 16],
    key: &SharedKey,
    server_short: &[u8; KEY_LEN],
    cookie: &[u8; COOKIE_LEN],
) -> usize {
    let out = &mut out[..COOKIE_PACKET_LEN];
    out[..8].copy_from_slice(COOKIE_MAGIC);
    out[8..24].copy_from_slice(client_extension);
    out[24..40].copy_from_slice(server_extension);
    out[40..56].copy_from_slice(box_nonce);
    out[72..104].copy_from_slice(server_short);
    out[104..200].copy_from_slice(cookie);
    key.seal_in_place(&long_nonce(COOKIE_NONCE, box_nonce), &mut out[56..200]);
    COOKIE_PACKET_LEN
}

/// The client's fixed Initiate fields.
#[derive(Clone, Copy)]
pub struct InitiateFields<'a> {
    /// The server extension.
    pub server_extension: &'a Extension,
    /// Our extension.
    pub client_extension: &'a Extension,
    /// C'.
    pub client_short: &'a [u8; KEY_LEN],
    /// The cookie from the Cookie packet.
    pub cookie: &'a [u8; COOKIE_LEN],
    /// C, our long-term public key.
    pub client_long: &'a [u8; KEY_LEN],
    /// The vouch.
    pub vouch: &'a [u8; VOUCH_LEN],
    /// The server name.
    pub name: &'a [u8; NAME_LEN],
}

/// Completes an Initiate whose `message_len`-byte message is already at
/// `out[INITIATE_MESSAGE_OFFSET..]`; returns the packet length. `key` is beforenm(S', c').
/// `message_len` must be a multiple of 16 in 16..=640.
pub fn seal_initiate(
    out: &mut [u8],
    f: &InitiateFields<'_>,
    nonce: u64,
    key: &SharedKey,
    message_len: usize,
) -> usize {
    debug_assert!(message_len >= MIN_MESSAGE && message_len.is_multiple_of(16));
    debug_assert!(message_len <= super::MAX_INITIATE_MESSAGE);
    let len = INITIATE_MESSAGE_OFFSET + message_len;
    let out = &mut out[..len];
    out[..8].copy_from_slice(INITIATE_MAGIC);
    out[8..24].copy_from_slice(f.server_extension);
    out[24..40].copy_from_slice(f.client_extension);
    out[40..72].copy_from_slice(f.client_short);
    out[72..168].copy_from_slice(f.cookie);
    out[168..176].copy_from_slice(&nonce.to_le_bytes());
    out[192..224].copy_from_slice(f.client_long);
    out[224..288].copy_from_slice(f.vouch);
    out[288..544].copy_from_slice(f.name);
    key.seal_in_place(&counter_nonce(INITIATE_NONCE, nonce), &mut out[176..len]);
    len
}

/// Completes a client Message whose `message_len`-byte message is already at
/// `out[CLIENT_MESSAGE_OFFSET..]`; returns the packet length. `key` is beforenm(S', c').
pub fn seal_client_message(
    out: &mut [u8],
    server_extension: &Extension,
    client_extension: &Extension,
    client_short: &[u8; KEY_LEN],
    nonce: u64,
    key: &SharedKey,
    message_len: usize,
) -> usize {
    debug_assert!(message_len >= MIN_MESSAGE && message_len.is_multiple_of(16));
    debug_assert!(message_len <= super::MAX_MESSAGE);
    let len = CLIENT_MESSAGE_OFFSET + message_len;
    let out = &mut out[..len];
    out[..8].copy_from_slice(CLIENT_MESSAGE_MAGIC);
    out[8..24].copy_from_slice(server_extension);
    out[24..40].copy_from_slice(client_extension);
    out[40..72].copy_from_slice(client_short);
    out[72..80].copy_from_slice(&nonce.to_le_bytes());
    key.seal_in_place(
        &counter_nonce(CLIENT_MESSAGE_NONCE, nonce),
        &mut out[80..len],
    );
    len
}

/// Completes a server Message whose `message_len`-byte message is already at
/// `out[SERVER_MESSAGE_OFFSET..]`; returns the packet length. `key` is beforenm(C', s').
pub fn seal_server_message(
    out: &mut [u8],
    client_extension: &Extension,
    server_extension: &Extension,
    nonce: u64,
    key: &SharedKey,
    message_len: usize,
) -> usize {
    debug_assert!(message_len >= MIN_MESSAGE && message_len.is_multiple_of(16));
    debug_assert!(message_len <= super::MAX_MESSAGE);
    let len = SERVER_MESSAGE_OFFSET + message_len;
    let out = &mut out[..len];
    out[..8].copy_from_slice(SERVER_MESSAGE_MAGIC);
    out[8..24].copy_from_slice(client_extension);
    out[24..40].copy_from_slice(server_extension);
    out[40..48].copy_from_slice(&nonce.to_le_bytes());
    key.seal_in_place(
        &counter_nonce(SERVER_MESSAGE_NONCE, nonce),
        &mut out[48..len],
    );
    len
}

/// Length of the plaintext of a box of `boxed_len` bytes.
pub const fn plain_len(boxed_len: usize) -> usize {
    boxed_len - TAG_LEN
}

/// A server name in DNS wire format, 256 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServerName(pub [u8; 256]);

/// Why a server name cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// A label longer than 63 bytes.
    LabelTooLong,
    /// The encoding does not fit in 256 bytes.
    TooLong,
}

impl ServerName {
    /// The empty name (256 zero bytes), the default, as the JS nodes use.
    pub fn empty() -> ServerName {
        ServerName([0; 256])
    }

    /// Encodes a dotted DNS name (empty labels dropped): each label as a length byte and its
    /// bytes, then a zero byte, then zeros to 256 bytes. Case is kept as given.
    pub fn from_dns(name: &str) -> Result<ServerName, NameError> {
        let mut out = [0u8; NAME_LEN];
        let mut pos = 0;
        for label in name.split('.').filter(|l| !l.is_empty()) {
            let l = label.as_bytes();
            if l.len() > 63 {
                return Err(NameError::LabelTooLong);
            }
            // The label, its length byte, and the final zero byte must all fit.
            if pos + 1 + l.len() + 1 > NAME_LEN {
                return Err(NameError::TooLong);
            }
            out[pos] = l.len() as u8;
            out[pos + 1..pos + 1 + l.len()].copy_from_slice(l);
            pos += 1 + l.len();
        }
        Ok(ServerName(out))
    }

    /// The 256 bytes.
    pub fn as_bytes(&self) -> &[u8; NAME_LEN] {
        &self.0
    }
}

impl Default for ServerName {
    fn default() -> ServerName {
        ServerName::empty()
    }
}

impl std::fmt::Debug for ServerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Print the dotted form of a well-formed name, the first bytes in hex otherwise.
        let mut s = String::new();
        let mut pos = 0;
        while pos < NAME_LEN && self.0[pos] != 0 {
            let l = self.0[pos] as usize;
            if pos + 1 + l > NAME_LEN {
                return write!(f, "ServerName({}..)", crate::crypto::to_hex(&self.0[..16]));
            }
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(&String::from_utf8_lossy(&self.0[pos + 1..pos + 1 + l]));
            pos += 1 + l;
        }
        write!(f, "ServerName({s:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{to_hex, BoxKeyPair};
    use proptest::prelude::*;

    const SEXT: Extension = [7u8; 16];
    const CEXT: Extension = [9u8; 16];

    #[test]
    fn name_encoding_matches_spec_vector() {
        let n = ServerName::from_dns("test.example.org").unwrap();
        let want = "0474657374076578616d706c65036f726700";
        assert_eq!(to_hex(&n.0[..18]), want);
        assert!(n.0[18..].iter().all(|&b| b == 0));
        assert_eq!(ServerName::from_dns("..test..example.org.").unwrap(), n);
        assert_eq!(ServerName::from_dns("").unwrap(), ServerName::empty());
        assert_eq!(ServerName::from_dns("...").unwrap(), ServerName::empty());
        assert_ne!(ServerName::from_dns("Test.example.org").unwrap(), n);
        assert_eq!(format!("{n:?}"), "ServerName(\"test.example.org\")");
    }

    #[test]
    fn name_limits() {
        let l63 = "a".repeat(63);
        assert!(ServerName::from_dns(&l63).is_ok());
        assert_eq!(
            ServerName::from_dns(&"a".repeat(64)),
            Err(NameError::LabelTooLong)
        );
        // Four 63-byte labels: 4 * 64 + 1 = 257 bytes, too long; three plus a 62: 256 fits.
        let four = [l63.as_str(); 4].join(".");
        assert_eq!(ServerName::from_dns(&four), Err(NameError::TooLong));
        let fits = format!("{l63}.{l63}.{l63}.{}", "b".repeat(62));
        let n = ServerName::from_dns(&fits).unwrap();
        assert_eq!(n.0[255], 0);
        assert_eq!(n.0[192], 62);
    }

    #[test]
    fn nonces() {
        let n = counter_nonce(HELLO_NONCE, 0x0102030405060708);
        assert_eq!(&n[..16], b"CurveCP-client-H");
        assert_eq!(&n[16..], &[8, 7, 6, 5, 4, 3, 2, 1]);
        let n = long_nonce(COOKIE_NONCE, &[0xab; 16]);
        assert_eq!(&n[..8], b"CurveCPK");
        assert_eq!(&n[8..], &[0xab; 16]);
    }

    #[test]
    fn hello_round_trip_and_box_opens() {
        let server = BoxKeyPair::generate();
        let cs = BoxKeyPair::generate();
        let k = cs.shared_key(&server.public);
        let mut buf = [0u8; 1184];
        let n = build_hello(&mut buf, &SEXT, &CEXT, &cs.public.0, 42, &k);
        assert_eq!(n, 224);
        let ClientPacket::Hello(h) = parse_client_packet(&buf[..n], &SEXT).unwrap() else {
            panic!("not a Hello")
        };
        assert_eq!(h.nonce, 42);
        assert_eq!(h.client_short, &cs.public.0);
        assert_eq!(h.client_extension, &CEXT);
        assert_eq!(h.padding, &[0u8; 64]);
        let ks = server.shared_key(&BoxPublicKey(*h.client_short));
        let mut plain = [0u8; 64];
        ks.open_into(&counter_nonce(HELLO_NONCE, 42), h.boxed, &mut plain)
            .unwrap();
        assert_eq!(plain, [0u8; 64]);
        // Wrong extension, wrong length, wrong magic.
        assert_eq!(
            parse_client_packet(&buf[..n], &[0; 16]).unwrap_err(),
            ParseError::Extension
        );
        assert!(parse_client_packet(&buf[..208], &SEXT).is_err());
        assert!(parse_client_packet(&buf[..240], &SEXT).is_err());
        buf[7] = b'X';
        assert_eq!(
            parse_client_packet(&buf[..n], &SEXT).unwrap_err(),
            ParseError::Magic
        );
    }

    use crate::crypto::BoxPublicKey;

    #[test]
    fn cookie_and_server_message_round_trip() {
        let a = BoxKeyPair::generate();
        let b = BoxKeyPair::generate();
        let k = a.shared_key(&b.public);
        let mut buf = [0u8; 1184];
        let n = build_cookie(&mut buf, &CEXT, &SEXT, &[3; 16], &k, &[4; 32], &[5; 96]);
        let v = parse_cookie(&buf[..n], &CEXT, &SEXT).unwrap();
        assert_eq!(v.nonce, &[3; 16]);
        let mut plain = [0u8; 128];
        b.shared_key(&a.public)
            .open_into(&long_nonce(COOKIE_NONCE, v.nonce), v.boxed, &mut plain)
            .unwrap();
        assert_eq!(&plain[..32], &[4; 32]);
        assert_eq!(&plain[32..], &[5; 96]);
        assert!(parse_cookie(&buf[..n], &SEXT, &SEXT).is_err());
        assert!(parse_cookie(&buf[..n], &CEXT, &CEXT).is_err());
        assert!(parse_cookie(&buf[..n + 16], &CEXT, &SEXT).is_err());

        buf[64..64 + 32].fill(0x77);
        let n = seal_server_message(&mut buf, &CEXT, &SEXT, 99, &k, 32);
        assert_eq!(n, 96);
        let v = parse_server_message(&buf[..n], &CEXT, &SEXT).unwrap();
        assert_eq!(v.nonce, 99);
        let mut plain = [0u8; 32];
        b.shared_key(&a.public)
            .open_into(
                &counter_nonce(SERVER_MESSAGE_NONCE, 99),
                v.boxed,
                &mut plain,
            )
            .unwrap();
        assert_eq!(plain, [0x77; 32]);
        assert!(parse_server_message(&buf[..n - 1], &CEXT, &SEXT).is_err());
        assert!(parse_server_message(&buf[..64], &CEXT, &SEXT).is_err());
    }

    #[test]
    fn initiate_and_client_message_round_trip() {
        let a = BoxKeyPair::generate();
        let b = BoxKeyPair::generate();
        let k = a.shared_key(&b.public);
        let mut buf = [0u8; 1184];
        buf[INITIATE_MESSAGE_OFFSET..INITIATE_MESSAGE_OFFSET + 640].fill(0x11);
        let name = ServerName::from_dns("x.y").unwrap();
        let f = InitiateFields {
            server_extension: &SEXT,
            client_extension: &CEXT,
            client_short: &a.public.0,
            cookie: &[6; 96],
            client_long: &[8; 32],
            vouch: &[10; 64],
            name: &name.0,
        };
        let n = seal_initiate(&mut buf, &f, 7, &k, 640);
        assert_eq!(n, 1184);
        let ClientPacket::Initiate(v) = parse_client_packet(&buf[..n], &SEXT).unwrap() else {
            panic!("not an Initiate")
        };
        assert_eq!(v.nonce, 7);
        assert_eq!(v.cookie, &[6; 96]);
        let mut plain = [0u8; 352 + 640];
        b.shared_key(&a.public)
            .open_into(&counter_nonce(INITIATE_NONCE, 7), v.boxed, &mut plain)
            .unwrap();
        assert_eq!(&plain[..32], &[8; 32]);
        assert_eq!(&plain[32..96], &[10; 64]);
        assert_eq!(&plain[96..352], &name.0[..]);
        assert_eq!(&plain[352..], &[0x11; 640][..]);
        // 544 bytes (M = 0) is refused.
        assert!(parse_client_packet(&buf[..544], &SEXT).is_err());

        buf[96..112].fill(0x22);
        let n = seal_client_message(&mut buf, &SEXT, &CEXT, &a.public.0, 1 << 40, &k, 16);
        assert_eq!(n, 112);
        let ClientPacket::Message(v) = parse_client_packet(&buf[..n], &SEXT).unwrap() else {
            panic!("not a Message")
        };
        assert_eq!(v.nonce, 1 << 40);
        let mut plain = [0u8; 16];
        b.shared_key(&a.public)
            .open_into(
                &counter_nonce(CLIENT_MESSAGE_NONCE, 1 << 40),
                v.boxed,
                &mut plain,
            )
            .unwrap();
        assert_eq!(plain, [0x22; 16]);
        assert!(parse_client_packet(&buf[..96], &SEXT).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = parse_client_packet(&data, &SEXT);
            let _ = parse_cookie(&data, &CEXT, &SEXT);
            let _ = parse_server_message(&data, &CEXT, &SEXT);
        }

        #[test]
        fn client_prefix_packets_never_panic(
            kind in prop::sample::select(vec![b'H', b'I', b'M', b'K', 0u8]),
            blocks in 0usize..80,
            fill in any::<u8>(),
        ) {
            let mut p = vec![fill; blocks * 16];
            if p.len() >= 24 {
                p[..7].copy_from_slice(CLIENT_PREFIX);
                p[7] = kind;
                p[8..24].copy_from_slice(&SEXT);
            }
            let r = parse_client_packet(&p, &SEXT);
            let ok = match kind {
                b'H' => p.len() == 224,
                b'I' => (560..=1184).contains(&p.len()),
                b'M' => (112..=1184).contains(&p.len()),
                _ => false,
            };
            prop_assert_eq!(r.is_ok(), ok);
        }

        #[test]
        fn server_message_round_trip(blocks in 1usize..=68, nonce in any::<u64>(), fill in any::<u8>()) {
            let a = BoxKeyPair::generate();
            let m = blocks * 16;
            let mut buf = [0u8; 1184];
            buf[64..64 + m].fill(fill);
            let k = a.shared_key(&a.public);
            let n = seal_server_message(&mut buf, &CEXT, &SEXT, nonce, &k, m);
            let v = parse_server_message(&buf[..n], &CEXT, &SEXT).unwrap();
            prop_assert_eq!(v.nonce, nonce);
            let mut plain = vec![0u8; m];
            k.open_into(&counter_nonce(SERVER_MESSAGE_NONCE, nonce), v.boxed, &mut plain).unwrap();
            prop_assert!(plain.iter().all(|&b| b == fill));
        }

        #[test]
        fn client_message_round_trip(blocks in 1usize..=68, nonce in any::<u64>(), fill in any::<u8>()) {
            let a = BoxKeyPair::generate();
            let m = blocks * 16;
            let mut buf = [0u8; 1184];
            buf[96..96 + m].fill(fill);
            let k = a.shared_key(&a.public);
            let n = seal_client_message(&mut buf, &SEXT, &CEXT, &a.public.0, nonce, &k, m);
            let ClientPacket::Message(v) = parse_client_packet(&buf[..n], &SEXT).unwrap() else {
                panic!("not a Message")
            };
            prop_assert_eq!(v.nonce, nonce);
            prop_assert_eq!(v.client_short, &a.public.0);
            let mut plain = vec![0u8; m];
            k.open_into(&counter_nonce(CLIENT_MESSAGE_NONCE, nonce), v.boxed, &mut plain).unwrap();
            prop_assert!(plain.iter().all(|&b| b == fill));
        }

        #[test]
        fn any_name_encodes_or_errs(name in "[a-zA-Z0-9.]{0,300}") {
            if let Ok(n) = ServerName::from_dns(&name) {
                // Decode and compare with the non-empty labels.
                let labels: Vec<&str> = name.split('.').filter(|l| !l.is_empty()).collect();
                let mut pos = 0;
                for l in &labels {
                    prop_assert_eq!(n.0[pos] as usize, l.len());
                    prop_assert_eq!(&n.0[pos + 1..pos + 1 + l.len()], l.as_bytes());
                    pos += 1 + l.len();
                }
                prop_assert_eq!(n.0[pos], 0);
            }
        }
    }
}
