//! The wire of `mm-services-kademlia` 0.6.5 on `kad` 1.6.5: JSON-RPC 2.0 messages carried as
//! `ms` payloads on topic `kademlia`, signed the original's way, and the contacts inside them.
//!
//! # Messages
//!
//! A request is `{"jsonrpc":"2.0","id":ID,"method":M,"params":{...,"contact":C,"__nonce":N,
//! "__signature":S}}` (`M` one of `PING`, `STORE`, `FIND_NODE`, `FIND_VALUE`), a response
//! `{"jsonrpc":"2.0","id":ID,"result":{...,"contact":C,"__nonce":N,"__signature":S}}`. `N` is
//! the sender's clock in milliseconds; `S` is the hex ed25519 signature, by the contact's
//! signId, of SHA-512 of `JSON.stringify` of the message without `__signature`.
//!
//! # Opening a received message, exactly as the JavaScript receiver reads it
//!
//! The receiver does not check the bytes it got: `kad` rebuilds a `Message` from the parsed
//! JSON (`jsonrpc` forced to `"2.0"`, other top-level keys dropped, a response's `result`
//! shallow-copied, an `error` reduced to `{code:-32603, message}`), `JSON.parse`'s reviver turns
//! `{"type":"Buffer",...}` objects into Buffers, `__signature` is deleted, and the rest is
//! serialised again. [`open`] does the same with [`JsValue`] (JavaScript's key order and number
//! formatting), so a message a JavaScript node accepts is accepted here and the reverse. It is
//! stricter where the original is unsafe:
//!
//! - the contact must be well formed, its boxId the conversion of its signId and its nodeID
//!   derived from that boxId ([`parse_contact`]); the caller also checks that it is the node
//!   that CurveCP authenticated as the sender;
//! - the nonce must be a number within [`NONCE_WINDOW_MS`] of our clock, in the past (as the
//!   original) *or the future* (the original accepts any future nonce, so a message signed with
//!   a clock set ahead replays for ever); the caller refuses replays within the window;
//! - `{"type":"Buffer"}` objects are accepted only in the form a Buffer serialises to
//!   (`data` an array of bytes), so the re-serialisation is the text received;
//! - sizes are bounded ([`MAX_MESSAGE`], [`MAX_NODE_INFO`]).

use std::fmt;

use super::id::NodeId;
use super::json::JsValue;
use crate::crypto::{self, SignKeyPair, SIGNATURE_LEN};
use crate::identity::{BoxId, KeyCache, SignId};

/// Largest message accepted (bytes of JSON text).
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Largest nodeInfo accepted in a contact (bytes of its JSON text).
pub const MAX_NODE_INFO: usize = 4096;
/// How far a nonce may be from our clock (the original's `NONCE_EXPIRE`, 10 s).
pub const NONCE_WINDOW_MS: f64 = 10_000.0;
/// The four methods.
pub const METHODS: [&str; 4] = ["PING", "STORE", "FIND_NODE", "FIND_VALUE"];

/// A node as the DHT knows it: its nodeInfo (as received, key order kept), and the ids derived
/// from it.
#[derive(Clone, Debug, PartialEq)]
pub struct Contact {
    /// hex(RIPEMD-160(SHA-256(boxId text))).
    pub id: NodeId,
    /// Its signId.
    pub sign_id: SignId,
    /// Its boxId (checked to be the conversion of the signId).
    pub box_id: BoxId,
    /// The nodeInfo object.
    pub node_info: JsValue,
    /// When it was last heard from (ms since the epoch), as `kad` keeps it.
    pub last_seen: f64,
}

impl Contact {
    /// The JSON form `kad` sends: `{"nodeInfo":{...},"nodeID":hex,"lastSeen":ms}` (never the
    /// doubly wrapped shape the original sometimes produces).
    pub fn to_js(&self) -> JsValue {
        JsValue::obj()
            .with("nodeInfo", self.node_info.clone())
            .with("nodeID", JsValue::Str(self.id.to_hex()))
            .with("lastSeen", JsValue::Num(self.last_seen))
    }

    /// A contact from a nodeInfo (checked as in [`parse_contact`]).
    pub fn from_node_info(info: &JsValue, keys: &mut KeyCache, now_ms: f64) -> Option<Contact> {
        parse_contact(
            &JsValue::obj()
                .with("nodeInfo", info.clone())
                .with("lastSeen", JsValue::Num(now_ms)),
            keys,
        )
    }
}

/// Parses and checks a contact: an object whose `nodeInfo` is an object with a valid `signId`
/// and a `boxId` that is its conversion (written canonically), whose `nodeID`, when present, is
/// the one derived from the boxId, and whose `lastSeen`, when present, is a number.
pub fn parse_contact(v: &JsValue, keys: &mut KeyCache) -> Option<Contact> {
    let info = v.get("nodeInfo")?;
    if !matches!(info, JsValue::Obj(_)) || info.stringify().len() > MAX_NODE_INFO {
        return None;
    }
    let sign_text = info.get("signId")?.as_str()?;
    let box_text = info.get("boxId")?.as_str()?;
    let sign_id: SignId = sign_text.parse().ok()?;
    let box_id: BoxId = box_text.parse().ok()?;
    if sign_id.to_string() != sign_text || box_id.to_string() != box_text {
        return None;
    }
    if keys.box_id(&sign_id)? != box_id {
        return None;
    }
    let id = NodeId::of_box_id(box_text);
    match v.get("nodeID") {
        None => {}
        Some(JsValue::Str(s)) if *s == id.to_hex() => {}
        Some(_) => return None,
    }
    let last_seen = match v.get("lastSeen") {
        None => 0.0,
        Some(JsValue::Num(n)) => *n,
        Some(_) => return None,
    };
    Some(Contact {
        id,
        sign_id,
        box_id,
        node_info: info.clone(),
        last_seen,
    })
}

/// A contact listed in a `FIND_NODE` / `FIND_VALUE` answer: as [`parse_contact`], and also
/// the original's doubly wrapped shape (`{"nodeInfo":{"nodeInfo":{...},"nodeID":..},..}`, which
/// `kad`'s `aggressiveCache` produces among JavaScript nodes), unwrapped: the inner contact is
/// checked the same way, so nothing unchecked gets through, and the node is not lost.
pub fn parse_listed_contact(v: &JsValue, keys: &mut KeyCache) -> Option<Contact> {
    parse_contact(v, keys).or_else(|| {
        let inner = v.get("nodeInfo")?;
        inner.get("nodeInfo")?;
        parse_contact(inner, keys)
    })
}

/// Why a received message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not JSON, too large, or neither a request nor a response as `kad` defines them.
    Malformed,
    /// An unknown method.
    Method,
    /// Missing, invalid or forged contact.
    Contact,
    /// No valid `__nonce`, or one outside the window.
    Stale,
    /// Missing or wrong signature.
    Signature,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refused::Malformed => "malformed message",
            Refused::Method => "unknown method",
            Refused::Contact => "invalid contact",
            Refused::Stale => "stale or missing nonce",
            Refused::Signature => "bad signature",
        })
    }
}

/// A received message that passed [`open`].
#[derive(Debug, Clone)]
pub struct Opened {
    /// The message id (as sent: usually 40 hex characters).
    pub id: JsValue,
    /// `Some(method)` for a request.
    pub method: Option<String>,
    /// The request's `params` or the response's `result`, without `__signature`.
    pub body: JsValue,
    /// Whether a response carried an `error`.
    pub error: bool,
    /// The sender's contact.
    pub contact: Contact,
    /// The signature (for replay detection).
    pub signature: [u8; SIGNATURE_LEN],
    /// The nonce (ms).
    pub nonce: f64,
}

/// Whether every `{"type":"Buffer"}` object in `v` is in the form a Buffer serialises to.
fn buffers_canonical(v: &JsValue) -> bool {
    match v {
        JsValue::Arr(items) => items.iter().all(buffers_canonical),
        JsValue::Obj(entries) => {
            if v.get("type").and_then(JsValue::as_str) == Some("Buffer") {
                let data_ok = match v.get("data") {
                    Some(JsValue::Arr(bytes)) => bytes.iter().all(|b| {
                        b.as_f64()
                            .is_some_and(|n| n.fract() == 0.0 && (0.0..=255.0).contains(&n))
                    }),
                    _ => false,
                };
                return data_ok && entries.len() == 2 && entries[0].0 == "type";
            }
            entries.iter().all(|(_, v)| buffers_canonical(v))
        }
        _ => true,
    }
}

/// Opens a received message (see the module docs). `now_ms` is our clock.
pub fn open(payload: &[u8], keys: &mut KeyCache, now_ms: f64) -> Result<Opened, Refused> {
    if payload.len() > MAX_MESSAGE {
        return Err(Refused::Malformed);
    }
    let parsed = JsValue::parse(payload).ok_or(Refused::Malformed)?;
    if !matches!(parsed, JsValue::Obj(_)) || !buffers_canonical(&parsed) {
        return Err(Refused::Malformed);
    }
    let truthy = |k: &str| parsed.get(k).is_some_and(JsValue::truthy);
    let id = parsed.get("id").cloned().unwrap_or(JsValue::Null);
    // A request with a falsy id gets a random one from kad, which its signature cannot cover.
    if !id.truthy() {
        return Err(Refused::Malformed);
    }
    let (mut rebuilt, method, body_key) = if truthy("method") && truthy("params") {
        let method = parsed.get("method").and_then(JsValue::as_str);
        let method = method.ok_or(Refused::Method)?;
        if !METHODS.contains(&method) {
            return Err(Refused::Method);
        }
        let m = JsValue::obj()
            .with("jsonrpc", JsValue::Str("2.0".into()))
            .with("id", id.clone())
            .with("method", JsValue::Str(method.to_owned()))
            .with(
                "params",
                parsed.get("params").cloned().unwrap_or(JsValue::Null),
            );
        (m, Some(method.to_owned()), "params")
    } else if truthy("result") || truthy("error") {
        let mut m = JsValue::obj()
            .with("jsonrpc", JsValue::Str("2.0".into()))
            .with("id", id.clone())
            .with(
                "result",
                parsed.get("result").cloned().unwrap_or(JsValue::obj()),
            );
        if let Some(e) = parsed.get("error").filter(|e| e.truthy()) {
            let mut err = JsValue::obj().with("code", JsValue::Num(-32603.0));
            if let Some(msg) = e.get("message") {
                err.set("message", msg.clone());
            }
            m.set("error", err);
        }
        (m, None, "result")
    } else {
        return Err(Refused::Malformed);
    };
    let error = rebuilt.get("error").is_some();
    let Some(JsValue::Obj(_)) = rebuilt.get(body_key) else {
        return Err(Refused::Malformed);
    };
    let body = match &mut rebuilt {
        JsValue::Obj(entries) => &mut entries.iter_mut().find(|(k, _)| k == body_key).unwrap().1,
        _ => unreachable!("built as an object"),
    };
    let signature = body.remove("__signature");
    let nonce = body
        .get("__nonce")
        .and_then(JsValue::as_f64)
        .ok_or(Refused::Stale)?;
    if !(now_ms - nonce <= NONCE_WINDOW_MS && nonce - now_ms <= NONCE_WINDOW_MS) {
        return Err(Refused::Stale);
    }
    let contact = body
        .get("contact")
        .and_then(|c| parse_contact(c, keys))
        .ok_or(Refused::Contact)?;
    let body = body.clone();
    let mut sig = [0u8; SIGNATURE_LEN];
    match signature {
        Some(JsValue::Str(s))
            if s.len() == 2 * SIGNATURE_LEN && crypto::from_hex_into(&s, &mut sig) => {}
        _ => return Err(Refused::Signature),
    }
    let digest = crypto::sha512(rebuilt.stringify().as_bytes());
    if !contact.sign_id.0.verify(&digest, &sig) {
        return Err(Refused::Signature);
    }
    Ok(Opened {
        id,
        method,
        body,
        error,
        contact,
        signature: sig,
        nonce,
    })
}

/// Signs and serialises a message the way the original's `sign` hook does: `__nonce` added to
/// `params` (request) or `result` (response), SHA-512 of `JSON.stringify` signed, `__signature`
/// added, the whole serialised again.
pub fn seal(mut message: JsValue, nonce_ms: f64, key: &SignKeyPair) -> String {
    let body_key = if message.get("method").is_some() {
        "params"
    } else {
        "result"
    };
    let set_in_body = |m: &mut JsValue, k: &str, v: JsValue| {
        if let JsValue::Obj(entries) = m {
            if let Some((_, body)) = entries.iter_mut().find(|(name, _)| name == body_key) {
                body.set(k, v);
            }
        }
    };
    set_in_body(&mut message, "__nonce", JsValue::Num(nonce_ms));
    let digest = crypto::sha512(message.stringify().as_bytes());
    let sig = key.sign(&digest);
    set_in_body(
        &mut message,
        "__signature",
        JsValue::Str(crypto::to_hex(&sig)),
    );
    message.stringify()
}

/// A request message (before [`seal`]).
pub fn request(id: &str, method: &str, params: JsValue) -> JsValue {
    JsValue::obj()
        .with("jsonrpc", JsValue::Str("2.0".into()))
        .with("id", JsValue::Str(id.to_owned()))
        .with("method", JsValue::Str(method.to_owned()))
        .with("params", params)
}

/// A response message (before [`seal`]).
pub fn response(id: &JsValue, result: JsValue) -> JsValue {
    JsValue::obj()
        .with("jsonrpc", JsValue::Str("2.0".into()))
        .with("id", id.clone())
        .with("result", result)
}

/// A fresh message id: 40 random hex characters (what `kad`'s `hat.rack(160)` gives).
pub fn new_id() -> String {
    let mut b = [0u8; 20];
    crypto::random_bytes(&mut b);
    crypto::to_hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    #[test]
    fn doubly_wrapped_contacts_are_unwrapped_only_in_lists() {
        let id = Identity::generate();
        let info = JsValue::obj()
            .with("signId", JsValue::Str(id.sign_id().to_string()))
            .with("boxId", JsValue::Str(id.box_id().to_string()));
        let mut keys = KeyCache::new(4);
        let c = Contact::from_node_info(&info, &mut keys, 1.0).unwrap();
        let wrapped = JsValue::obj()
            .with("nodeInfo", c.to_js())
            .with("nodeID", JsValue::Str(c.id.to_hex()))
            .with("lastSeen", JsValue::Num(2.0));
        assert!(parse_contact(&wrapped, &mut keys).is_none());
        let un = parse_listed_contact(&wrapped, &mut keys).unwrap();
        assert_eq!((un.id, un.sign_id), (c.id, c.sign_id));
        // A wrapped contact whose inner nodeInfo is forged stays refused.
        let mut forged = info.clone();
        forged.set(
            "boxId",
            JsValue::Str(Identity::generate().box_id().to_string()),
        );
        let inner = JsValue::obj().with("nodeInfo", forged);
        let wrapped = JsValue::obj().with("nodeInfo", inner);
        assert!(parse_listed_contact(&wrapped, &mut keys).is_none());
    }
}
