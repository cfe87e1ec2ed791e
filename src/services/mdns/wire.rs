//! The mDNS packets of the original's discovery, encoded and decoded with the `domain` crate.
//!
//! - A query: one question, `_mm.local` TXT (class IN), with an id of ours (the original sends
//!   id 0; receivers ignore ids, and ours let us recognise our own queries when they come back
//!   to us through multicast loop).
//! - An answer: a response (QR, AA) with one TXT record `_mm.local` whose RDATA is the nodeInfo
//!   JSON itself. That is what `dns-packet` 1.3.4 writes and reads: its TXT codec has no
//!   RFC 1035 character strings, and `mm-services-mdns` 0.6.8 `JSON.parse`s the raw RDATA (a
//!   length byte in front makes it throw). On reading we accept both that raw form and the
//!   standard character-string form (the strings concatenated).
//!
//! Decoding is bounded: packets over [`MAX_PACKET`] bytes are refused, at most
//! [`MAX_RECORDS`] questions and answers are looked at, and a nodeInfo text over
//! [`MAX_NODE_INFO`] bytes is skipped. Nothing here is trusted: the nodeInfo is checked by the
//! caller ([`super::state`]).

use domain::base::iana::{Class, Rtype};
use domain::base::name::ToName;
use domain::base::{Message, MessageBuilder, Name, UnknownRecordData};
use domain::rdata::Txt;

/// The multicast group (IPv4) of mDNS.
pub const MDNS_GROUP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(224, 0, 0, 251);
/// The mDNS port.
pub const MDNS_PORT: u16 = 5353;
/// The name the original's nodes ask and answer for.
pub const MM_NAME: &str = "_mm.local";
/// Largest packet read (RFC 6762's 9,000-byte limit for multicast DNS messages).
pub const MAX_PACKET: usize = 9000;
/// Most questions, and most answers, looked at in one packet.
pub const MAX_RECORDS: usize = 16;
/// Largest nodeInfo text accepted or sent.
pub const MAX_NODE_INFO: usize = 4096;

/// `_mm.local` in wire form.
const MM_WIRE: &[u8] = b"\x03_mm\x05local\x00";

fn mm_name() -> &'static Name<[u8]> {
    Name::from_slice(MM_WIRE).expect("a valid literal name")
}

/// What a received packet says, as far as the original's discovery is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A query; `asks_mm` if one of its questions is `_mm.local` TXT (or ANY).
    Query {
        /// The query id (ours are recognised by the caller).
        id: u16,
        /// Whether it asks for `_mm.local` TXT.
        asks_mm: bool,
    },
    /// A response carrying these `_mm.local` TXT texts (unchecked JSON bytes; empty for a
    /// record in neither form).
    Response(Vec<Vec<u8>>),
}

/// Why a packet was dropped.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum DecodeError {
    /// Over [`MAX_PACKET`] bytes.
    TooLarge,
    /// Not a DNS message (or a section failed to parse).
    Malformed,
}

/// Encodes the query `_mm.local` TXT with `id`.
pub fn encode_query(id: u16) -> Vec<u8> {
    let mut b = MessageBuilder::new_vec();
    b.header_mut().set_id(id);
    let mut q = b.question();
    q.push((mm_name(), Rtype::TXT, Class::IN))
        .expect("a one-question message fits a Vec");
    q.finish()
}

/// Encodes an answer carrying `json` as the raw RDATA of a `_mm.local` TXT record (the
/// original's form). `None` if `json` is over [`MAX_NODE_INFO`].
pub fn encode_answer(json: &[u8]) -> Option<Vec<u8>> {
    if json.len() > MAX_NODE_INFO {
        return None;
    }
    let mut b = MessageBuilder::new_vec();
    b.header_mut().set_qr(true);
    b.header_mut().set_aa(true);
    let mut a = b.answer();
    let data = UnknownRecordData::from_octets(Rtype::TXT, json).ok()?;
    a.push((mm_name(), Class::IN, 120u32, data)).ok()?;
    Some(a.finish())
}

/// The text of a TXT RDATA: the raw bytes if they are a JSON object (the original's form),
/// else the concatenated RFC 1035 character strings.
pub fn txt_text(rdata: &[u8]) -> Option<Vec<u8>> {
    if rdata.len() > MAX_NODE_INFO + MAX_NODE_INFO / 255 + 1 {
        return None;
    }
    if serde_json::from_slice::<serde_json::Value>(rdata).is_ok_and(|v| v.is_object()) {
        return (rdata.len() <= MAX_NODE_INFO).then(|| rdata.to_vec());
    }
    let txt = Txt::from_slice(rdata).ok()?;
    let mut text = Vec::with_capacity(rdata.len());
    for part in txt.iter() {
        text.extend_from_slice(part);
    }
    (text.len() <= MAX_NODE_INFO).then_some(text)
}

/// Decodes a received packet.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    if bytes.len() > MAX_PACKET {
        return Err(DecodeError::TooLarge);
    }
    let msg = Message::from_octets(bytes).map_err(|_| DecodeError::Malformed)?;
    let header = msg.header();
    if !header.qr() {
        let mut asks_mm = false;
        for q in msg.question().take(MAX_RECORDS) {
            let q = q.map_err(|_| DecodeError::Malformed)?;
            if q.qname().name_eq(mm_name()) && matches!(q.qtype(), Rtype::TXT | Rtype::ANY) {
                asks_mm = true;
            }
        }
        return Ok(Decoded::Query {
            id: header.id(),
            asks_mm,
        });
    }
    let answers = msg.answer().map_err(|_| DecodeError::Malformed)?;
    let mut texts = Vec::new();
    for rr in answers.take(MAX_RECORDS) {
        let rr = rr.map_err(|_| DecodeError::Malformed)?;
        if rr.rtype() != Rtype::TXT || !rr.owner().name_eq(mm_name()) {
            continue;
        }
        let Ok(Some(record)) = rr.to_record::<UnknownRecordData<&[u8]>>() else {
            return Err(DecodeError::Malformed);
        };
        // A text that is neither form is handed on empty, so the caller counts it as invalid.
        texts.push(txt_text(record.data().data()).unwrap_or_default());
    }
    Ok(Decoded::Response(texts))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes `dns-packet` 1.3.4 writes for `respond([{name:'_mm.local', type:'TXT',
    /// data: '{"a":1}'}])`: id 0, flags QR only, one answer, class IN, TTL 0, raw RDATA.
    fn js_answer(json: &[u8]) -> Vec<u8> {
        let mut p = vec![0, 0, 0x80, 0, 0, 0, 0, 1, 0, 0, 0, 0];
        p.extend_from_slice(MM_WIRE);
        p.extend_from_slice(&[0, 16, 0, 1, 0, 0, 0, 0]);
        p.extend_from_slice(&(json.len() as u16).to_be_bytes());
        p.extend_from_slice(json);
        p
    }

    #[test]
    fn answers_carry_raw_json_as_the_original_writes_and_reads() {
        let json = br#"{"signId":"x","boxId":"y","connectionInfo":[]}"#;
        let ours = encode_answer(json).unwrap();
        // The RDATA is the JSON itself: the packet ends with its 2-byte length and the text.
        let tail = &ours[ours.len() - json.len() - 2..];
        assert_eq!(&tail[..2], &(json.len() as u16).to_be_bytes());
        assert_eq!(&tail[2..], json);
        assert_eq!(decode(&ours), Ok(Decoded::Response(vec![json.to_vec()])));
        assert_eq!(
            decode(&js_answer(json)),
            Ok(Decoded::Response(vec![json.to_vec()]))
        );
    }

    #[test]
    fn standard_character_strings_are_read_too() {
        let json = br#"{"signId":"a-rather-long-value-to-need-two-strings","pad":"0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"}"#;
        assert!(json.len() > 255);
        let mut rdata = Vec::new();
        for chunk in json.chunks(255) {
            rdata.push(chunk.len() as u8);
            rdata.extend_from_slice(chunk);
        }
        assert_eq!(txt_text(&rdata), Some(json.to_vec()));
        assert_eq!(
            decode(&js_answer(&rdata)),
            Ok(Decoded::Response(vec![json.to_vec()]))
        );
    }

    #[test]
    fn queries_are_recognised() {
        let q = encode_query(0x1234);
        assert_eq!(
            decode(&q),
            Ok(Decoded::Query {
                id: 0x1234,
                asks_mm: true
            })
        );
        // The original's query: id 0, `_mm.local` TXT.
        let mut js = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        js.extend_from_slice(MM_WIRE);
        js.extend_from_slice(&[0, 16, 0, 1]);
        assert_eq!(
            decode(&js),
            Ok(Decoded::Query {
                id: 0,
                asks_mm: true
            })
        );
        // Another name, another type: not ours.
        let mut other = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        other.extend_from_slice(b"\x03_xx\x05local\x00");
        other.extend_from_slice(&[0, 16, 0, 1]);
        assert_eq!(
            decode(&other),
            Ok(Decoded::Query {
                id: 0,
                asks_mm: false
            })
        );
    }

    #[test]
    fn malformed_and_oversized_packets_are_refused_without_panic() {
        assert_eq!(decode(&[]), Err(DecodeError::Malformed));
        assert_eq!(decode(&[0; 5]), Err(DecodeError::Malformed));
        assert_eq!(decode(&vec![0; MAX_PACKET + 1]), Err(DecodeError::TooLarge));
        // Counts that promise more records than there are bytes.
        let mut lying = js_answer(b"{}");
        lying[7] = 200;
        assert_eq!(decode(&lying), Err(DecodeError::Malformed));
        // A compression pointer to itself.
        let mut looped = vec![0, 0, 0x80, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0xc0, 12];
        looped.extend_from_slice(&[0, 16, 0, 1, 0, 0, 0, 0, 0, 2, b'{', b'}']);
        assert!(decode(&looped).is_err());
        // Every truncation of a valid answer.
        let good = js_answer(br#"{"signId":"x"}"#);
        for n in 0..good.len() {
            let _ = decode(&good[..n]);
        }
        // Text that is neither JSON nor character strings, or too long.
        assert_eq!(txt_text(b"\x05ab"), None);
        assert_eq!(txt_text(&vec![b' '; MAX_NODE_INFO * 2]), None);
        assert!(encode_answer(&vec![b' '; MAX_NODE_INFO + 1]).is_none());
    }
}
