//! The two dialects a connection speaks, and every difference between them: [`Dialect::Native`]
//! (nodes of this crate) and [`Dialect::Js`] (the original JavaScript nodes, over their 1tp
//! framing).
//!
//! | | native | JavaScript |
//! | --- | --- | --- |
//! | transport framing | native ([`Framing::Native`]) | 1tp ([`Framing::Compat`]) |
//! | identification | `mm`/`identify` frame with the signId, checked | the CurveCP handshake alone (box key) |
//! | first frame limit | 1 KiB until identified | the configured maximum |
//! | `mm` frames (ping, reachability, delivery acks) | yes | none |
//! | pacing | the default congestion control | no one-byte blocks; over TCP at most [`JS_TCP_WINDOW`] blocks in flight, [`JS_TCP_BLOCK_INTERVAL`] apart |
//! | frames sent | as encoded | no message id; a `bt` payload as a string of one character per byte |
//! | two connections to one peer | one is kept | both stay open |
//!
//! A queued message is encoded once, for the dialect of the peer (that of its active or
//! opening connection) when that is known ([`Body::Frame`]); a message queued before any
//! connection to its peer says which dialect the peer speaks is kept as an envelope and encoded
//! once, when written, for the connection that writes it ([`Body::Message`]). Only a frame
//! encoded for one dialect and written to a connection of the other is decoded and encoded
//! again: an offline record (stored as a native frame) going to a JavaScript node, a payload
//! its codec wrote straight into a native frame before the peer's dialect was known (the bulk
//! path stays one copy for native peers), a peer reached over both dialects.

use std::time::{Duration, Instant};

use crate::curvecp::congestion::{self, CongestionFactory};
use crate::curvecp::stream::Stream;
use crate::envelope::Envelope;
use crate::netstring;
use crate::transport::connection_info::Endpoint;
use crate::transport::driver::Path;
use crate::transport::{Framing, TransportKind};

/// The largest frame read before the peer has identified itself (its identify frame is about
/// 60 bytes): an unidentified peer must not make a connection buffer up to `max_frame` bytes.
const IDENTIFY_MAX_FRAME: usize = 1024;
/// Blocks to a JavaScript node over TCP go at least this far apart, at most
/// [`JS_TCP_WINDOW`] in flight: its TCP reader takes one netstring per read and drops frames
/// that arrive together (see `congestion::Gentle`).
pub(super) const JS_TCP_BLOCK_INTERVAL: Duration = Duration::from_millis(1);
/// Blocks in flight to a JavaScript node over TCP.
pub(super) const JS_TCP_WINDOW: usize = 8;

/// What a connection's peer speaks (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dialect {
    /// A node of this crate.
    Native,
    /// An original JavaScript node (1tp framing; no `mm` frames, no message ids).
    Js,
}

impl Dialect {
    /// The dialect of an endpoint we connect to: one without the native mark is a JavaScript
    /// node's.
    pub(super) fn of_endpoint(ep: &Endpoint) -> Dialect {
        if ep.native {
            Dialect::Native
        } else {
            Dialect::Js
        }
    }

    /// The dialect of an incoming connection, from the framing its packets came in.
    pub(super) fn of_path(path: Option<Path>) -> Dialect {
        match path.map(|p| p.framing()) {
            Some(Framing::Compat) => Dialect::Js,
            _ => Dialect::Native,
        }
    }

    /// The transport framing it goes over.
    pub(super) fn framing(self) -> Framing {
        match self {
            Dialect::Native => Framing::Native,
            Dialect::Js => Framing::Compat,
        }
    }

    /// Whether the peer speaks `mm` frames: identify, ping, the reachability frames, delivery
    /// acknowledgements. A JavaScript node is identified by its CurveCP handshake alone.
    pub(super) fn speaks_mm(self) -> bool {
        self == Dialect::Native
    }

    /// Whether a second connection of the peer leaves the first open (a JavaScript node opens
    /// one of its own to send, does not reply on ours, and knows nothing of closing one of
    /// two).
    pub(super) fn keeps_both_connections(self) -> bool {
        self == Dialect::Js
    }

    /// The largest frame read until the peer has identified itself.
    pub(super) fn first_frame_limit(self, max_frame: usize) -> usize {
        match self {
            Dialect::Native => IDENTIFY_MAX_FRAME.min(max_frame),
            Dialect::Js => max_frame,
        }
    }

    /// What a new connection writes first: our identify frame (native), nothing (JavaScript).
    pub(super) fn greeting(self, identify: &[u8]) -> &[u8] {
        match self {
            Dialect::Native => identify,
            Dialect::Js => &[],
        }
    }

    /// Whether its stream must never send one-byte blocks (a JavaScript node's reader takes
    /// them for something else).
    pub(super) fn no_one_byte_blocks(self) -> bool {
        self == Dialect::Js
    }

    /// The congestion control of its streams over `kind`.
    pub(super) fn congestion(self, kind: TransportKind) -> CongestionFactory {
        match (self, kind) {
            (Dialect::Js, TransportKind::Tcp) => {
                congestion::gentle(JS_TCP_BLOCK_INTERVAL, JS_TCP_WINDOW)
            }
            _ => congestion::default_factory(),
        }
    }

    /// Sets the pacing of an accepted connection's stream (a client's comes with its
    /// configuration, [`Dialect::congestion`]).
    pub(super) fn pace(self, stream: &mut Stream, kind: TransportKind, now: Instant) {
        if self == Dialect::Native {
            return;
        }
        stream.set_no_one_byte_blocks(self.no_one_byte_blocks());
        if kind == TransportKind::Tcp {
            stream.set_congestion(&self.congestion(kind), now);
        }
    }

    /// The frame of `topic`, `protocol` and a payload of `len` bytes that `write` appends, for
    /// this dialect, appended to `out`; `false` (and `out` unchanged) if `write` fails.
    pub(super) fn encode_with(
        self,
        topic: &str,
        protocol: &str,
        len: usize,
        out: &mut Vec<u8>,
        write: &mut dyn FnMut(&mut Vec<u8>) -> bool,
    ) -> bool {
        match self {
            Dialect::Js if protocol == "bt" => {
                let mut raw = Vec::with_capacity(len);
                if !write(&mut raw) || raw.len() != len {
                    return false;
                }
                encode_js(topic, protocol, &raw, out);
                true
            }
            _ => Envelope::encode_frame_with(topic, protocol, len, out, write),
        }
    }

    /// The frame of `env` for this dialect: a native one as it is, with its id; a JavaScript
    /// one without the id and with a `bt` payload written as a string of one character per
    /// byte.
    pub(super) fn frame_of(self, env: &Envelope) -> Vec<u8> {
        let mut out = Vec::with_capacity(env.encoded_len() + 12);
        match self {
            Dialect::Native => env.encode_frame(&mut out),
            Dialect::Js => encode_js(&env.topic, &env.protocol, &env.payload, &mut out),
        }
        out
    }

    /// A queued message as the bytes this dialect's connection writes (see the module docs).
    pub(super) fn bytes_of(self, body: Body) -> Vec<u8> {
        match body {
            Body::Frame(frame, d) if d == self => frame,
            Body::Frame(frame, other) => {
                // Encoded for the other dialect: decoded (its payload as it was given to
                // us), encoded again for this one.
                let decoded = netstring::decode(&frame, usize::MAX)
                    .ok()
                    .flatten()
                    .and_then(|f| Envelope::decode_protobuf(&frame[f.payload]).ok());
                match decoded {
                    Some(mut env) => {
                        env.payload = other.payload_in(&env.protocol, env.payload);
                        self.frame_of(&env)
                    }
                    None => frame,
                }
            }
            Body::Message(env) => self.frame_of(&env),
        }
    }

    /// The payload of a frame received in this dialect, as our subscribers get it: a
    /// JavaScript node's `bt` payload is a string of one character per byte.
    pub(super) fn payload_in(self, protocol: &str, payload: Vec<u8>) -> Vec<u8> {
        if self == Dialect::Js && protocol == "bt" {
            if let Some(bytes) = narrow(&payload) {
                return bytes;
            }
        }
        payload
    }
}

/// Appends the JavaScript frame of a message: no id, a `bt` payload widened ([`widen_into`]).
fn encode_js(topic: &str, protocol: &str, payload: &[u8], out: &mut Vec<u8>) {
    if protocol == "bt" {
        let wide = payload.len() + payload.iter().filter(|&&b| b >= 0x80).count();
        Envelope::encode_frame_with(topic, protocol, wide, out, |o| {
            widen_into(payload, o);
            true
        });
    } else {
        Envelope::encode_frame_with(topic, protocol, payload.len(), out, |o| {
            o.extend_from_slice(payload);
            true
        });
    }
}

/// A message waiting in a peer's queue.
pub(super) enum Body {
    /// Encoded for this dialect (the peer's when it was queued).
    Frame(Vec<u8>, Dialect),
    /// Not encoded yet: the peer's dialect was not known when it was queued.
    Message(Envelope),
}

/// Appends bytes as a JavaScript string of one character per byte (U+0000 to U+00FF) in UTF-8:
/// the bytes below 0x80 as themselves, the others as two bytes. That is how a `bt` payload
/// crosses to a JavaScript node: the original's `bt` payload is a protobuf *string* (its API
/// takes a JavaScript string, which protobufjs writes as UTF-8).
fn widen_into(bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(bytes.len() + bytes.len() / 2);
    for &b in bytes {
        if b < 0x80 {
            out.push(b);
        } else {
            out.push(0xc0 | (b >> 6));
            out.push(0x80 | (b & 0x3f));
        }
    }
}

/// The reverse of [`widen_into`]: the bytes of a string of characters U+0000 to U+00FF;
/// `None` if `utf8` is not UTF-8 or holds a character above U+00FF (a JavaScript application's
/// text, which is then delivered as its UTF-8 bytes).
fn narrow(utf8: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(utf8).ok()?;
    text.chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{narrow, widen_into, Body, Dialect};
    use crate::envelope::Envelope;
    use crate::netstring;

    fn decode(frame: &[u8]) -> Envelope {
        let n = netstring::decode(frame, 1 << 20).unwrap().unwrap();
        Envelope::decode_protobuf(&frame[n.payload]).unwrap()
    }

    #[test]
    fn bt_bytes_cross_to_javascript_as_one_char_per_byte() {
        let all: Vec<u8> = (0..=255u8).collect();
        let mut js = Vec::new();
        widen_into(&all, &mut js);
        assert_eq!(std::str::from_utf8(&js).unwrap().chars().count(), 256);
        assert_eq!(narrow(&js).unwrap(), all);
        assert_eq!(narrow(b""), Some(Vec::new()));
        // Text beyond U+00FF (or not UTF-8) is not a byte string.
        assert_eq!(narrow("\u{263a}".as_bytes()), None);
        assert_eq!(narrow(&[0xff, 0xfe]), None);
        assert_eq!(Dialect::Js.payload_in("bt", js.clone()), all);
        assert_eq!(Dialect::Native.payload_in("bt", js.clone()), js);
        assert_eq!(Dialect::Js.payload_in("ms", js.clone()), js);
    }

    #[test]
    fn a_javascript_frame_has_no_id_and_a_wide_bt_payload() {
        let mut env = Envelope::new("t", "bt", vec![0x80, 1]);
        env.id = Some(vec![9; 16]);
        let native = Dialect::Native.frame_of(&env);
        assert_eq!(decode(&native), env);
        let js = Dialect::Js.frame_of(&env);
        let back = decode(&js);
        assert_eq!(back.id, None);
        assert_eq!(back.payload, vec![0xc2, 0x80, 1]);
        // The same bytes whichever way the frame was made.
        assert_eq!(
            Dialect::Js.bytes_of(Body::Frame(native.clone(), Dialect::Native)),
            js
        );
        assert_eq!(Dialect::Js.bytes_of(Body::Message(env.clone())), js);
        assert_eq!(Dialect::Native.bytes_of(Body::Message(env.clone())), native);
        // A JavaScript frame going to a native node after all: its payload as it was given.
        let back = decode(&Dialect::Native.bytes_of(Body::Frame(js.clone(), Dialect::Js)));
        assert_eq!((back.payload, back.id), (env.payload, None));
        let mut written = Vec::new();
        assert!(
            Dialect::Js.encode_with("t", "bt", 2, &mut written, &mut |o| {
                o.extend_from_slice(&[0x80, 1]);
                true
            })
        );
        assert_eq!(written, js);
        // Other protocols are untouched; a frame that does not decode is written as it is.
        let ms = Envelope::new("t", "ms", b"{}".to_vec());
        assert_eq!(Dialect::Js.frame_of(&ms), Dialect::Native.frame_of(&ms));
        let junk = Body::Frame(b"junk".to_vec(), Dialect::Native);
        assert_eq!(Dialect::Js.bytes_of(junk), b"junk".to_vec());
    }
}
