//! Envelopes: how platform messages travel on a CurveCP stream.
//!
//! Each message is one frame `netstring(protobuf Message)`, with
//! `Message { topic: string = 1, protocol: string = 2, payload: bytes = 3, id: bytes = 4 }` as
//! in the JavaScript original (field 4, optional, carries a message id for de-duplication; the
//! original never sends it). The protobuf codec is written out here because the message is
//! tiny and fixed: fields are encoded in field order with varint lengths, and the decoder skips
//! unknown fields of every wire type, accepts fields in any order (the last occurrence wins, as
//! protobuf specifies), and refuses invalid UTF-8 in the string fields, groups, and lengths
//! beyond the frame.
//!
//! [`FrameReader`] cuts frames out of the stream's bytes with a bounded buffer: a frame
//! announcing more than the configured maximum (default [`DEFAULT_MAX_FRAME`]) is a protocol
//! error of that connection, detected from the length digits before the bytes arrive.

use std::fmt;
use std::ops::Range;

use crate::netstring::{self, NetstringError};

/// Default largest frame (the protobuf bytes of one message): 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// One platform message as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// Topic, without the scope prefix.
    pub topic: String,
    /// Protocol code (`ms`, `bt`, `mm`, ...).
    pub protocol: String,
    /// The payload, as the protocol encodes it.
    pub payload: Vec<u8>,
    /// Message id for de-duplication (field 4), if any.
    pub id: Option<Vec<u8>>,
}

/// Why bytes are not a valid envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeError {
    /// A varint longer than 10 bytes or a length beyond the input.
    Truncated,
    /// Wire type 3 or 4 (groups), or 6 and 7.
    BadWireType,
    /// Field number 0.
    BadField,
    /// Topic or protocol is not UTF-8.
    NotUtf8,
    /// A field that must be length-delimited came with another wire type.
    WrongType,
    /// The frame around it is invalid.
    Frame(NetstringError),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnvelopeError::Truncated => f.write_str("truncated protobuf"),
            EnvelopeError::BadWireType => f.write_str("unsupported protobuf wire type"),
            EnvelopeError::BadField => f.write_str("protobuf field number 0"),
            EnvelopeError::NotUtf8 => f.write_str("topic or protocol is not UTF-8"),
            EnvelopeError::WrongType => f.write_str("known field with the wrong wire type"),
            EnvelopeError::Frame(e) => write!(f, "frame: {e}"),
        }
    }
}

impl std::error::Error for EnvelopeError {}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn get_varint(buf: &[u8], at: &mut usize) -> Result<u64, EnvelopeError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*at).ok_or(EnvelopeError::Truncated)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(EnvelopeError::Truncated)
}

impl Envelope {
    /// A message without id.
    pub fn new(topic: impl Into<String>, protocol: impl Into<String>, payload: Vec<u8>) -> Self {
        Envelope {
            topic: topic.into(),
            protocol: protocol.into(),
            payload,
            id: None,
        }
    }

    /// The length of the protobuf encoding.
    pub fn encoded_len(&self) -> usize {
        let field = |len: usize| 1 + varint_len(len as u64) + len;
        field(self.topic.len())
            + field(self.protocol.len())
            + field(self.payload.len())
            + self.id.as_ref().map_or(0, |id| field(id.len()))
    }

    /// Bytes of the frame ([`Envelope::encode_frame`]) of an envelope without an id whose
    /// topic, protocol and payload have these lengths.
    pub fn frame_len(topic: usize, protocol: usize, payload: usize) -> usize {
        let field = |len: usize| 1 + varint_len(len as u64) + len;
        netstring::encoded_len(field(topic) + field(protocol) + field(payload))
    }

    /// [`Envelope::frame_len`] of this envelope (its id, if any, not counted).
    pub fn frame_len_without_id(&self) -> usize {
        Envelope::frame_len(self.topic.len(), self.protocol.len(), self.payload.len())
    }

    /// Appends the protobuf encoding (fields 1, 2, 3 and, with an id, 4) to `out`.
    pub fn encode_protobuf(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        let mut field = |tag: u8, bytes: &[u8]| {
            out.push(tag);
            put_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        };
        field(0x0a, self.topic.as_bytes());
        field(0x12, self.protocol.as_bytes());
        field(0x1a, &self.payload);
        if let Some(id) = &self.id {
            field(0x22, id);
        }
    }

    /// Appends the whole frame, `netstring(protobuf)`, to `out`.
    ///
    /// ```
    /// use mm_platform::proto::envelope::Envelope;
    /// let mut out = Vec::new();
    /// Envelope::new("test.hello", "ms", br#"{"hello":"world","n":42}"#.to_vec()).encode_frame(&mut out);
    /// // The bytes the JavaScript original puts on the stream for this message:
    /// assert!(out.starts_with(b"42:\x0a\x0atest.hello\x12\x02ms\x1a\x18{"));
    /// assert!(out.ends_with(b"42},"));
    /// ```
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let len = self.encoded_len();
        let mut h = [0u8; 21];
        let n = netstring::write_header(len, &mut h);
        out.reserve(n + len + 1);
        out.extend_from_slice(&h[..n]);
        self.encode_protobuf(out);
        out.push(b',');
    }

    /// Appends the frame of an envelope without id (what [`Envelope::encode_frame`] writes)
    /// whose payload `write` appends in place: exactly `payload_len` bytes, or the frame is
    /// taken back and this returns `false` (as it does when `write` fails). A remote send builds
    /// its frame around a payload this way, copying it once.
    ///
    /// ```
    /// use mm_platform::proto::envelope::Envelope;
    /// let mut a = Vec::new();
    /// Envelope::new("t", "bt", vec![1, 2, 3]).encode_frame(&mut a);
    /// let mut b = Vec::new();
    /// assert!(Envelope::encode_frame_with("t", "bt", 3, &mut b, |out| {
    ///     out.extend_from_slice(&[1, 2, 3]);
    ///     true
    /// }));
    /// assert_eq!(a, b);
    /// ```
    pub fn encode_frame_with(
        topic: &str,
        protocol: &str,
        payload_len: usize,
        out: &mut Vec<u8>,
        write: impl FnOnce(&mut Vec<u8>) -> bool,
    ) -> bool {
        let field = |len: usize| 1 + varint_len(len as u64) + len;
        let len = field(topic.len()) + field(protocol.len()) + field(payload_len);
        let start = out.len();
        let mut h = [0u8; 21];
        let n = netstring::write_header(len, &mut h);
        out.reserve(n + len + 1);
        out.extend_from_slice(&h[..n]);
        for (tag, bytes) in [(0x0a, topic.as_bytes()), (0x12, protocol.as_bytes())] {
            out.push(tag);
            put_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        }
        out.push(0x1a);
        put_varint(payload_len as u64, out);
        let before = out.len();
        if !write(out) || out.len() - before != payload_len {
            out.truncate(start);
            return false;
        }
        out.push(b',');
        true
    }

    /// Decodes the protobuf bytes of one message.
    pub fn decode_protobuf(buf: &[u8]) -> Result<Envelope, EnvelopeError> {
        let (mut env, payload) = Envelope::decode_fields(buf)?;
        if let Some(r) = payload {
            env.payload = buf[r].to_vec();
        }
        Ok(env)
    }

    /// Decodes every field but the payload, whose place in `buf` (the last field 3, as a
    /// protobuf decoder keeps the last of a repeated field) it returns instead.
    fn decode_fields(buf: &[u8]) -> Result<(Envelope, Option<Range<usize>>), EnvelopeError> {
        let mut env = Envelope::default();
        let mut payload = None;
        let mut at = 0;
        while at < buf.len() {
            let key = get_varint(buf, &mut at)?;
            let field = key >> 3;
            let wire = (key & 7) as u8;
            if field == 0 {
                return Err(EnvelopeError::BadField);
            }
            let bytes = match wire {
                0 => {
                    get_varint(buf, &mut at)?;
                    None
                }
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    if buf.len() - at < n {
                        return Err(EnvelopeError::Truncated);
                    }
                    at += n;
                    None
                }
                2 => {
                    let len = get_varint(buf, &mut at)?;
                    if len > (buf.len() - at) as u64 {
                        return Err(EnvelopeError::Truncated);
                    }
                    let s = &buf[at..at + len as usize];
                    at += len as usize;
                    Some(s)
                }
                _ => return Err(EnvelopeError::BadWireType),
            };
            if (1..=4).contains(&field) {
                let b = bytes.ok_or(EnvelopeError::WrongType)?;
                match field {
                    1 => {
                        env.topic = std::str::from_utf8(b)
                            .map_err(|_| EnvelopeError::NotUtf8)?
                            .to_owned()
                    }
                    2 => {
                        env.protocol = std::str::from_utf8(b)
                            .map_err(|_| EnvelopeError::NotUtf8)?
                            .to_owned()
                    }
                    3 => payload = Some(at - b.len()..at),
                    _ => env.id = Some(b.to_vec()),
                }
            }
        }
        Ok((env, payload))
    }
}

/// A payload at least this long, in a frame that fills the reader's buffer alone, takes the
/// buffer over instead of being copied out of it.
const STEAL_PAYLOAD: usize = 64 * 1024;

/// Cuts envelopes out of the bytes a stream delivers, with a bounded buffer.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
}

impl FrameReader {
    /// A reader accepting frames of at most `max_frame` protobuf bytes.
    pub fn new(max_frame: usize) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            max_frame,
        }
    }

    /// Changes the largest frame accepted from now on (e.g. raised once a peer has identified
    /// itself, so an unidentified peer cannot make the reader buffer a large frame).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Room for more input before a frame must be completed: the most bytes worth reading from
    /// the stream now. Reading no more than this keeps the buffer bounded by one maximal frame.
    pub fn room(&self) -> usize {
        netstring::encoded_len(self.max_frame).saturating_sub(self.buf.len() - self.start)
    }

    /// Appends bytes read from the stream (at most [`FrameReader::room`] of them; the excess is
    /// refused and the number taken returned).
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = self.push_with(bytes.len(), |buf, n| {
            buf.extend_from_slice(&bytes[..n]);
            n
        });
        // Room for the whole frame in progress at once, once its length is known: a large
        // frame then costs one allocation, not a chain of doublings each copying what came.
        if let Some(len) = self.short_of() {
            self.buf.reserve_exact(self.start + len - self.buf.len());
        }
        n
    }

    /// Appends bytes straight from their source: `fill(buf, n)` appends at most `n` bytes (the
    /// smaller of `max` and [`FrameReader::room`]) to `buf` and returns how many it appended,
    /// which this returns. Saves the copy through a caller's buffer (e.g. with
    /// [`crate::curvecp::stream::Stream::read_append`]). Unlike [`FrameReader::push`] it does
    /// not grow the buffer to the frame's length: the caller sees [`FrameReader::short_of`] and
    /// provides one ([`FrameReader::replace_buffer`]), or the buffer grows as bytes come.
    pub fn push_with(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut Vec<u8>, usize) -> usize,
    ) -> usize {
        let n = max.min(self.room());
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let before = self.buf.len();
        fill(&mut self.buf, n);
        // Whatever `fill` did, no more than `n` bytes are kept.
        self.buf.truncate(before + n);
        self.buf.len() - before
    }

    /// The next complete envelope, `Ok(None)` when more bytes are needed, or an error after
    /// which the connection must be closed. The buffer is given back to the allocator when
    /// nothing is left in it (see [`FrameReader::take_idle_buffer`] to keep it instead).
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        self.next_envelope_with(Vec::with_capacity)
    }

    /// [`FrameReader::next_envelope`], with the payload copied into `payload_buf(len)` (an
    /// empty buffer with room for `len` bytes: a reused one, say); but a payload of 64 KiB or more in a frame that
    /// fills the buffer alone takes the buffer itself (moved down over the frame's head), and
    /// the reader starts afresh.
    pub fn next_envelope_with(
        &mut self,
        payload_buf: impl FnOnce(usize) -> Vec<u8>,
    ) -> Result<Option<Envelope>, EnvelopeError> {
        match netstring::decode(&self.buf[self.start..], self.max_frame) {
            Ok(Some(f)) => {
                let body_at = self.start + f.payload.start;
                let body = &self.buf[body_at..self.start + f.payload.end];
                let env = match Envelope::decode_fields(body) {
                    Ok((mut env, Some(r)))
                        if self.start == 0
                            && f.consumed == self.buf.len()
                            && r.len() >= STEAL_PAYLOAD =>
                    {
                        // The buffer holds this frame alone: it becomes the payload, moved
                        // down over the frame's head (a few dozen bytes) while it is likely
                        // still in cache, rather than copied out into another buffer.
                        let mut v = std::mem::take(&mut self.buf);
                        v.truncate(body_at + r.end);
                        v.drain(..body_at + r.start);
                        env.payload = v;
                        self.start = 0;
                        return Ok(Some(env));
                    }
                    Ok((mut env, Some(r))) => {
                        let mut v = payload_buf(r.len());
                        v.clear();
                        v.extend_from_slice(&body[r]);
                        env.payload = v;
                        Ok(env)
                    }
                    Ok((env, None)) => Ok(env),
                    Err(e) => Err(e),
                };
                self.start += f.consumed;
                if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                env.map(Some)
            }
            Ok(None) => {
                if self.start == self.buf.len() && self.buf.capacity() > 64 * 1024 {
                    // Idle: give the memory back.
                    self.buf = Vec::new();
                    self.start = 0;
                }
                Ok(None)
            }
            Err(e) => Err(EnvelopeError::Frame(e)),
        }
    }

    /// The buffer, when nothing is left in it and it is larger than 64 KiB (a large frame's),
    /// for the caller to reuse or drop; the reader starts afresh. `None` otherwise.
    pub fn take_idle_buffer(&mut self) -> Option<Vec<u8>> {
        if self.start != self.buf.len() || self.buf.capacity() <= 64 * 1024 {
            return None;
        }
        self.start = 0;
        let mut v = std::mem::take(&mut self.buf);
        v.clear();
        Some(v)
    }

    /// The capacity the frame in progress needs, when its length is known and the buffer is
    /// too small for it (the caller may then [`FrameReader::replace_buffer`]).
    pub fn short_of(&self) -> Option<usize> {
        let len = self.frame_len()?;
        (self.start + len > self.buf.capacity()).then_some(len)
    }

    /// Moves the buffered bytes into `v` (its contents are discarded), which becomes the
    /// buffer, and returns the old one, empty.
    pub fn replace_buffer(&mut self, mut v: Vec<u8>) -> Vec<u8> {
        v.clear();
        v.extend_from_slice(&self.buf[self.start..]);
        self.start = 0;
        let mut old = std::mem::replace(&mut self.buf, v);
        old.clear();
        old
    }

    /// Bytes buffered and not yet returned as envelopes.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The whole encoded size (prefix, payload and comma) of the frame at the front of the
    /// buffer, once its length prefix has arrived and is valid (at most the reader's maximum);
    /// `None` before that, or when the prefix is invalid ([`FrameReader::next_envelope`] then
    /// reports the error). Lets a caller reserve memory for the whole frame before reading it.
    pub fn frame_len(&self) -> Option<usize> {
        let head = &self.buf[self.start..];
        let colon = head.iter().take(21).position(|&b| b == b':')?;
        let digits = &head[..colon];
        if digits.is_empty() || digits.len() > 20 || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        let mut len: usize = 0;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            len = len.checked_mul(10)?.checked_add(usize::from(d - b'0'))?;
        }
        (len <= self.max_frame).then(|| netstring::encoded_len(len))
    }
}

#[cfg(test)]
mod tests {
    use super::Envelope;

    /// The length computed before a send builds its frame (to refuse it without copying) is
    /// the frame's length, across the varint and netstring-digit boundaries.
    #[test]
    fn frame_len_matches_the_encoded_frame() {
        for payload in [0, 1, 127, 128, 16_383, 16_384, 99_999, 100_000, 1 << 20] {
            for topic in [0, 5, 200] {
                let env = Envelope {
                    topic: "t".repeat(topic),
                    protocol: "bt".into(),
                    payload: vec![7; payload],
                    id: None,
                };
                let mut frame = Vec::new();
                env.encode_frame(&mut frame);
                assert_eq!(Envelope::frame_len(topic, 2, payload), frame.len());
                assert_eq!(env.frame_len_without_id(), frame.len());
            }
        }
    }
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_len_is_known_once_the_prefix_arrived() {
        let mut r = FrameReader::new(100);
        assert_eq!(r.frame_len(), None);
        r.push(b"4");
        assert_eq!(r.frame_len(), None);
        r.push(b"2:");
        assert_eq!(r.frame_len(), Some(46));
        let mut big = FrameReader::new(10);
        big.push(b"42:");
        assert_eq!(big.frame_len(), None, "over the maximum");
        let mut bad = FrameReader::new(100);
        bad.push(b"0x:");
        assert_eq!(bad.frame_len(), None);
    }

    #[test]
    fn the_js_example_bytes() {
        let mut out = Vec::new();
        Envelope::new("test.hello", "ms", br#"{"hello":"world","n":42}"#.to_vec())
            .encode_frame(&mut out);
        let mut want = b"42:".to_vec();
        want.extend_from_slice(b"\x0a\x0atest.hello\x12\x02ms\x1a\x18");
        want.extend_from_slice(br#"{"hello":"world","n":42}"#);
        want.push(b',');
        assert_eq!(out, want);
    }

    #[test]
    fn unknown_fields_skipped_and_order_free() {
        let mut b = Vec::new();
        b.extend_from_slice(b"\x1a\x01X"); // payload first
        b.extend_from_slice(b"\x28\x96\x01"); // field 5 varint
        b.extend_from_slice(b"\x31\x01\x02\x03\x04\x05\x06\x07\x08"); // field 6 fixed64
        b.extend_from_slice(b"\x3d\x01\x02\x03\x04"); // field 7 fixed32
        b.extend_from_slice(b"\x42\x02zz"); // field 8 bytes
        b.extend_from_slice(b"\x0a\x01t\x12\x02ms\x22\x03abc");
        let e = Envelope::decode_protobuf(&b).unwrap();
        assert_eq!(e.topic, "t");
        assert_eq!(e.protocol, "ms");
        assert_eq!(e.payload, b"X");
        assert_eq!(e.id.as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn malformed_protobuf() {
        assert_eq!(
            Envelope::decode_protobuf(b"\x0a\x05ab"),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            Envelope::decode_protobuf(b"\x0a"),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            Envelope::decode_protobuf(b"\x0b"),
            Err(EnvelopeError::BadWireType)
        );
        assert_eq!(
            Envelope::decode_protobuf(b"\x02\x00"),
            Err(EnvelopeError::BadField)
        );
        assert_eq!(
            Envelope::decode_protobuf(b"\x08\x01"),
            Err(EnvelopeError::WrongType)
        );
        assert_eq!(
            Envelope::decode_protobuf(b"\x0a\x01\xff"),
            Err(EnvelopeError::NotUtf8)
        );
        assert_eq!(
            Envelope::decode_protobuf(b"\x28\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(Envelope::decode_protobuf(b""), Ok(Envelope::default()));
    }

    #[test]
    fn reader_bounds_frames() {
        let mut r = FrameReader::new(10);
        assert_eq!(r.push(b"11:"), 3);
        assert_eq!(
            r.next_envelope(),
            Err(EnvelopeError::Frame(NetstringError::TooLong))
        );
        let mut r = FrameReader::new(10);
        // The buffer never takes more than one maximal frame.
        assert_eq!(r.room(), netstring::encoded_len(10));
        assert_eq!(r.push(&[b'1'; 100]), netstring::encoded_len(10));
    }

    proptest! {
        #[test]
        fn roundtrip_through_split_stream(
            msgs in proptest::collection::vec(("[a-z.]{0,20}", "[a-z]{0,3}", proptest::collection::vec(any::<u8>(), 0..200), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16))), 0..6),
            cut in 1usize..50,
        ) {
            let mut stream = Vec::new();
            let envs: Vec<Envelope> = msgs.into_iter().map(|(t, p, pl, id)| Envelope { topic: t, protocol: p, payload: pl, id }).collect();
            for e in &envs {
                e.encode_frame(&mut stream);
            }
            let mut r = FrameReader::new(1000);
            let mut got = Vec::new();
            for chunk in stream.chunks(cut) {
                let mut c = chunk;
                while !c.is_empty() {
                    let n = r.push(c);
                    c = &c[n..];
                    while let Some(e) = r.next_envelope().unwrap() {
                        got.push(e);
                    }
                }
            }
            prop_assert_eq!(got, envs);
            prop_assert_eq!(r.buffered(), 0);
        }

        /// A large payload in a frame read alone takes over the reader's buffer; with an id
        /// after it, or a repeated payload field (the last one counts), the result is what
        /// the plain decoder gives.
        #[test]
        fn a_large_payload_read_alone_is_the_same_payload(
            n in 65_536usize..200_000,
            small in 0usize..100,
            shape in 0u8..3,
        ) {
            let big: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let field = |tag: u8, b: &[u8], out: &mut Vec<u8>| {
                out.push(tag);
                put_varint(b.len() as u64, out);
                out.extend_from_slice(b);
            };
            let mut body = Vec::new();
            field(0x0a, b"bench.bt", &mut body);
            field(0x12, b"bt", &mut body);
            match shape {
                // The payload, then an id.
                0 => {
                    field(0x1a, &big, &mut body);
                    field(0x22, b"an-id", &mut body);
                }
                // A small payload field, then the large one: the large one counts.
                1 => {
                    field(0x1a, &vec![7; small], &mut body);
                    field(0x1a, &big, &mut body);
                }
                // The large one, then a small one: the small one counts.
                _ => {
                    field(0x1a, &big, &mut body);
                    field(0x1a, &vec![7; small], &mut body);
                }
            }
            let want = Envelope::decode_protobuf(&body).unwrap();
            let mut frame = Vec::new();
            netstring::encode_into(&body, &mut frame);
            let mut r = FrameReader::new(1 << 20);
            prop_assert_eq!(r.push(&frame), frame.len());
            let got = r.next_envelope().unwrap().unwrap();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(got.payload.len(), if shape == 2 { small } else { n });
            prop_assert_eq!(r.buffered(), 0);
            prop_assert!(r.next_envelope().unwrap().is_none());
        }

        /// A damaged large frame read alone (bytes overwritten anywhere in its body, a length
        /// varint among them) gives what the plain decoder gives: the same envelope or an
        /// error, never a panic; and an error leaves nothing buffered to misread later.
        #[test]
        fn a_damaged_large_frame_read_alone_decodes_as_the_plain_decoder_does(
            n in 65_536usize..100_000,
            hits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut body = Vec::new();
            Envelope::new("bench.bt", "bt", vec![0x5a; n]).encode_protobuf(&mut body);
            for (at, b) in hits {
                // Mostly the head, where the fields' keys and lengths are.
                let i = if at % 2 == 0 { at % 32 } else { at % body.len() };
                body[i] = b;
            }
            let want = Envelope::decode_protobuf(&body);
            let mut frame = Vec::new();
            netstring::encode_into(&body, &mut frame);
            let mut r = FrameReader::new(1 << 20);
            prop_assert_eq!(r.push(&frame), frame.len());
            match (r.next_envelope(), want) {
                (Ok(Some(got)), Ok(want)) => prop_assert_eq!(got, want),
                (Err(EnvelopeError::Frame(_)), _) => prop_assert!(false, "the frame is whole"),
                (Err(_), Err(_)) => {}
                (got, want) => prop_assert!(false, "reader {:?}, plain {:?}", got.map(|_| ()), want.map(|_| ())),
            }
            prop_assert_eq!(r.buffered(), 0);
        }

        /// The platform's way of reading (bytes appended in place, the whole frame's buffer
        /// swapped in once its length is known, buffers taken back between frames, payloads
        /// in reused buffers) yields exactly what plain pushes yield.
        #[test]
        fn reading_with_reused_buffers_yields_the_same_envelopes(
            sizes in proptest::collection::vec(0usize..200_000, 1..6),
            cut in 1usize..100_000,
        ) {
            let envs: Vec<Envelope> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| Envelope::new(format!("t{i}"), "bt", vec![i as u8; n]))
                .collect();
            let mut stream = Vec::new();
            for e in &envs {
                e.encode_frame(&mut stream);
            }
            let mut r = FrameReader::new(1 << 20);
            let mut spares: Vec<Vec<u8>> = vec![vec![0xee; 7]];
            let take = |len: usize, spares: &mut Vec<Vec<u8>>| {
                let mut v = spares.pop().unwrap_or_default();
                v.reserve(len);
                v
            };
            let mut got = Vec::new();
            let mut at = 0;
            while at < stream.len() {
                let n = r.push_with(cut, |buf, n| {
                    let n = n.min(stream.len() - at);
                    buf.extend_from_slice(&stream[at..at + n]);
                    n
                });
                at += n;
                if let Some(len) = r.short_of() {
                    let v = take(len, &mut spares);
                    let old = r.replace_buffer(v);
                    prop_assert!(old.is_empty());
                    spares.push(old);
                    prop_assert!(r.short_of().is_none());
                }
                loop {
                    let mut pool = std::mem::take(&mut spares);
                    let e = r.next_envelope_with(|len| take(len, &mut pool)).unwrap();
                    spares = pool;
                    let Some(e) = e else { break };
                    if let Some(b) = r.take_idle_buffer() {
                        prop_assert!(b.is_empty() && b.capacity() > 64 * 1024);
                        spares.push(b);
                    }
                    got.push(e);
                }
            }
            prop_assert_eq!(got, envs);
            prop_assert_eq!(r.buffered(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Envelope::decode_protobuf(&bytes);
            let mut r = FrameReader::new(256);
            r.push(&bytes);
            for _ in 0..300 {
                match r.next_envelope() {
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
        }
    }
}
