//! BEP 44 mutable items, and our nodeInfo as one.
//!
//! A mutable item is stored under the target SHA-1(`k` ‖ `salt`), where `k` is an ed25519
//! public key: for us, a node's signId. Its signature is ed25519 over the bencoded
//! `salt`/`seq`/`v` pairs without the enclosing dictionary (`4:salt<len>:<salt>3:seqi<seq>e1:v<v>`,
//! the salt pair only when there is a salt), `v` being the raw bencoded value. Signing and
//! verifying go through [`crate::crypto`].
//!
//! Our value is the nodeInfo as a bencoded byte string of compact JSON
//! (`{"boxId":..,"connectionInfo":[..],"signId":..}`), at most [`MAX_VALUE`] bytes once
//! bencoded. Only endpoints others can use are published ([`publishable_node_info`]); a value
//! read from the DHT is accepted only if it is a valid nodeInfo ([`NodeInfo::from_json`]: boxId
//! the conversion of signId) whose signId is the key the item is signed with
//! ([`node_info_of`]).
//!
//! Salt: none by default (the target is SHA-1 of the signId's 32 bytes, so anyone who knows a
//! signId finds its nodeInfo); an application may use a fixed salt of its own
//! ([`super::MainlineConfig::salt`]), and then only nodes using the same salt find it.

use std::net::IpAddr;

use serde_json::Value;

use super::krpc::{self, encode_bytes, Fields, NodeId, MAX_SALT, MAX_VALUE};
use crate::crypto::{self, SignKeyPair, SignPublicKey, SIGNATURE_LEN};
use crate::identity::{KeyCache, SignId};
use crate::platform::directory::NodeInfo;
use crate::transport::connection_info::Endpoint;

/// A signed BEP 44 mutable item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MutableItem {
    /// The ed25519 public key it is stored under.
    pub k: [u8; 32],
    /// The salt (empty: none).
    pub salt: Vec<u8>,
    /// Its sequence number.
    pub seq: i64,
    /// The value, raw bencoded.
    pub v: Vec<u8>,
    /// The signature.
    pub sig: [u8; SIGNATURE_LEN],
}

/// Why an item was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemError {
    /// `k`, `sig`, `seq` or `v` missing.
    Incomplete,
    /// Value or salt over its limit, or a negative `seq`.
    TooLarge,
    /// SHA-1(`k` ‖ salt) is not the target asked for.
    WrongTarget,
    /// The signature does not verify.
    BadSignature,
    /// The value is not a valid nodeInfo.
    NotNodeInfo,
    /// The nodeInfo's signId is not the item's key (someone else's nodeInfo).
    WrongKey,
}

impl std::fmt::Display for ItemError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ItemError::Incomplete => "incomplete mutable item",
            ItemError::TooLarge => "value or salt too large",
            ItemError::WrongTarget => "item key does not hash to the target",
            ItemError::BadSignature => "bad signature",
            ItemError::NotNodeInfo => "value is not a valid nodeInfo",
            ItemError::WrongKey => "nodeInfo signId is not the item's key",
        })
    }
}

impl std::error::Error for ItemError {}

/// The target of the item of key `k` and `salt`: SHA-1(`k` ‖ `salt`).
pub fn target(k: &[u8; 32], salt: &[u8]) -> NodeId {
    crypto::sha1(&[k, salt])
}

/// The bytes a BEP 44 signature covers.
pub fn signed_bytes(salt: &[u8], seq: i64, v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + salt.len() + 32);
    if !salt.is_empty() {
        out.extend_from_slice(b"4:salt");
        out.extend_from_slice(&encode_bytes(salt));
    }
    out.extend_from_slice(format!("3:seqi{seq}e1:v").as_bytes());
    out.extend_from_slice(v);
    out
}

impl MutableItem {
    /// Signs `v` (raw bencoded) with `keys` under `salt` and `seq`.
    pub fn sign(
        keys: &SignKeyPair,
        salt: &[u8],
        seq: i64,
        v: Vec<u8>,
    ) -> Result<MutableItem, ItemError> {
        if v.len() > MAX_VALUE || salt.len() > MAX_SALT || seq < 0 {
            return Err(ItemError::TooLarge);
        }
        let sig = keys.sign(&signed_bytes(salt, seq, &v));
        Ok(MutableItem {
            k: *keys.public.as_bytes(),
            salt: salt.to_vec(),
            seq,
            v,
            sig,
        })
    }

    /// The item in a `get` response or `put` query, checked: complete, within limits, stored
    /// under `expected` (when given) with `salt`, and correctly signed.
    pub fn from_fields(
        f: &Fields,
        salt: &[u8],
        expected: Option<&NodeId>,
    ) -> Result<MutableItem, ItemError> {
        let (Some(k), Some(sig), Some(seq), Some(v)) = (f.k, f.sig, f.seq, f.v.as_ref()) else {
            return Err(ItemError::Incomplete);
        };
        if v.len() > MAX_VALUE || salt.len() > MAX_SALT || seq < 0 {
            return Err(ItemError::TooLarge);
        }
        if expected.is_some_and(|t| *t != target(&k, salt)) {
            return Err(ItemError::WrongTarget);
        }
        let item = MutableItem {
            k,
            salt: salt.to_vec(),
            seq,
            v: v.clone(),
            sig,
        };
        if !item.verify() {
            return Err(ItemError::BadSignature);
        }
        Ok(item)
    }

    /// Whether the signature verifies.
    pub fn verify(&self) -> bool {
        SignPublicKey(self.k).verify(&signed_bytes(&self.salt, self.seq, &self.v), &self.sig)
    }

    /// Its target.
    pub fn target(&self) -> NodeId {
        target(&self.k, &self.salt)
    }

    /// The `k`/`sig`/`seq`/`v` (and `salt`) fields of a `put` or `get` response.
    pub fn fill(&self, f: &mut Fields) {
        f.k = Some(self.k);
        f.sig = Some(self.sig);
        f.seq = Some(self.seq);
        f.v = Some(self.v.clone());
        if !self.salt.is_empty() {
            f.salt = Some(self.salt.clone());
        }
    }
}

/// Whether an endpoint address is worth publishing: never an unspecified, multicast or
/// broadcast address or port 0; loopback and link-local addresses only when `local` is set
/// (a testnet on one machine).
pub fn usable(ip: IpAddr, port: u16, local: bool) -> bool {
    if port == 0 || ip.is_unspecified() || ip.is_multicast() {
        return false;
    }
    let local_only = match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    if let IpAddr::V4(v4) = ip {
        if v4.is_broadcast() {
            return false;
        }
    }
    local || !local_only
}

/// Our nodeInfo as the value to publish: compact JSON of signId, boxId and the endpoints of
/// `connectionInfo` that others can use ([`usable`]); entries of kinds this module does not
/// know are kept as they are (their producer decides what is usable). Endpoints are dropped
/// from the end until the bencoded value fits in [`MAX_VALUE`] bytes. `None` if `info` is
/// not a valid nodeInfo.
pub fn publishable_node_info(info: &Value, keys: &mut KeyCache, local: bool) -> Option<Vec<u8>> {
    let parsed = NodeInfo::from_json(info, keys).ok()?;
    let mut entries: Vec<Value> = info
        .get("connectionInfo")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter(|e| match Endpoint::from_json(e) {
                    Some(ep) => usable(ep.addr.ip(), ep.addr.port(), local),
                    None => true,
                })
                .take(crate::transport::connection_info::MAX_ENDPOINTS)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    loop {
        let value = serde_json::json!({
            "signId": parsed.sign_id.to_string(),
            "boxId": parsed.box_id.to_string(),
            "connectionInfo": entries,
        });
        let json = serde_json::to_vec(&value).ok()?;
        let v = encode_bytes(&json);
        if v.len() <= MAX_VALUE {
            return Some(v);
        }
        entries.pop()?;
    }
}

/// The nodeInfo a checked item carries: `v` must be a byte string of JSON that is a valid
/// nodeInfo whose signId is `k`.
pub fn node_info_of(item: &MutableItem, keys: &mut KeyCache) -> Result<Value, ItemError> {
    let json = raw_string(&item.v).ok_or(ItemError::NotNodeInfo)?;
    let value: Value = serde_json::from_slice(json).map_err(|_| ItemError::NotNodeInfo)?;
    let info = NodeInfo::from_json(&value, keys).map_err(|_| ItemError::NotNodeInfo)?;
    if info.sign_id != SignId(SignPublicKey(item.k)) {
        return Err(ItemError::WrongKey);
    }
    Ok(value)
}

/// The content of a raw bencoded byte string (`len:bytes`), or `None` if `v` is anything else.
pub fn raw_string(v: &[u8]) -> Option<&[u8]> {
    let colon = v.iter().position(|&b| b == b':')?;
    let len: usize = std::str::from_utf8(&v[..colon]).ok()?.parse().ok()?;
    let body = &v[colon + 1..];
    // Canonical length (no leading zeros) and exact size.
    (body.len() == len && (colon == 1 || v[0] != b'0')).then_some(body)
}

/// A `v` holding `bytes` as a bencoded byte string.
pub fn string_value(bytes: &[u8]) -> Vec<u8> {
    krpc::encode_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use serde_json::json;

    fn info(id: &Identity, addrs: &[&str]) -> Value {
        let eps: Vec<Value> = addrs
            .iter()
            .map(|a| {
                let (ip, port) = a.rsplit_once(':').unwrap();
                json!({"transportType": "udp", "transportInfo": {"address": ip, "port": port.parse::<u16>().unwrap()}})
            })
            .collect();
        json!({"signId": id.sign_id().to_string(), "boxId": id.box_id().to_string(),
            "connectionInfo": eps})
    }

    #[test]
    fn bep44_test_vector_signature() {
        // BEP 44's mutable item test vector (public key, signature, target), without and with
        // the salt "foobar".
        let mut pk = [0u8; 32];
        assert!(crypto::from_hex_into(
            "77ff84905a91936367c01360803104f92432fcd904a43511876df5cdf3e7e548",
            &mut pk
        ));
        let mut sig = [0u8; 64];
        assert!(crypto::from_hex_into(
            "305ac8aeb6c9c151fa120f120ea2cfb923564e11552d06a5d856091e5e853cff\
             1260d3f39e4999684aa92eb73ffd136e6f4f3ecbfda0ce53a1608ecd7ae21f01",
            &mut sig
        ));
        let v = encode_bytes(b"Hello World!");
        assert_eq!(
            signed_bytes(b"", 1, &v),
            b"3:seqi1e1:v12:Hello World!".to_vec()
        );
        let item = MutableItem {
            k: pk,
            salt: Vec::new(),
            seq: 1,
            v,
            sig,
        };
        assert!(item.verify());
        assert_eq!(
            crypto::to_hex(&item.target()),
            "4a533d47ec9c7d95b1ad75f576cffc641853b750"
        );
        // With the vector's salt "foobar": the signed bytes and the target.
        assert_eq!(
            signed_bytes(b"foobar", 1, &item.v),
            b"4:salt6:foobar3:seqi1e1:v12:Hello World!".to_vec()
        );
        assert_eq!(
            crypto::to_hex(&target(&pk, b"foobar")),
            "411eba73b6f087ca51a3795d9c8c938d365e32c1"
        );
        let mut salted = item.clone();
        salted.salt = b"foobar".to_vec();
        let mut s2 = [0u8; 64];
        assert!(crypto::from_hex_into(
            "6834284b6b24c3204eb2fea824d82f88883a3d95e8b4a21b8c0ded553d17d17d\
             df9a8a7104b1258f30bed3787e6cb896fca78c58f8e03b5f18f14951a87d9a08",
            &mut s2
        ));
        salted.sig = s2;
        assert!(salted.verify());
    }

    #[test]
    fn signed_items_check_everything() {
        let me = Identity::generate();
        let other = Identity::generate();
        let mut keys = KeyCache::new(8);
        let v = publishable_node_info(&info(&me, &["127.0.0.1:5"]), &mut keys, true).unwrap();
        let item = MutableItem::sign(me.sign_keypair(), b"", 3, v).unwrap();
        let mut f = Fields::default();
        item.fill(&mut f);
        let t = target(me.sign_id().as_bytes(), b"");
        assert_eq!(
            MutableItem::from_fields(&f, b"", Some(&t)),
            Ok(item.clone())
        );
        assert_eq!(
            node_info_of(&item, &mut keys).unwrap()["signId"],
            me.sign_id().to_string()
        );
        // Wrong target (another key, or a salt), bad signature, incomplete.
        let t2 = target(other.sign_id().as_bytes(), b"");
        assert_eq!(
            MutableItem::from_fields(&f, b"", Some(&t2)),
            Err(ItemError::WrongTarget)
        );
        assert_eq!(
            MutableItem::from_fields(&f, b"x", None),
            Err(ItemError::BadSignature)
        );
        let mut bad = f.clone();
        bad.seq = Some(4);
        assert_eq!(
            MutableItem::from_fields(&bad, b"", Some(&t)),
            Err(ItemError::BadSignature)
        );
        let mut bad = f.clone();
        bad.sig.as_mut().unwrap()[0] ^= 1;
        assert_eq!(
            MutableItem::from_fields(&bad, b"", Some(&t)),
            Err(ItemError::BadSignature)
        );
        let mut bad = f.clone();
        bad.k = None;
        assert_eq!(
            MutableItem::from_fields(&bad, b"", Some(&t)),
            Err(ItemError::Incomplete)
        );
        // Someone else's nodeInfo, correctly signed by me: refused as a nodeInfo.
        let theirs = publishable_node_info(&info(&other, &[]), &mut keys, true).unwrap();
        let item = MutableItem::sign(me.sign_keypair(), b"", 4, theirs).unwrap();
        assert_eq!(node_info_of(&item, &mut keys), Err(ItemError::WrongKey));
        // Not a string, not JSON, a forged boxId.
        for v in [
            b"i5e".to_vec(),
            encode_bytes(b"nope"),
            encode_bytes(
                serde_json::to_string(&json!({"signId": me.sign_id().to_string(),
                    "boxId": other.box_id().to_string(), "connectionInfo": []}))
                .unwrap()
                .as_bytes(),
            ),
        ] {
            let item = MutableItem::sign(me.sign_keypair(), b"", 5, v).unwrap();
            assert_eq!(node_info_of(&item, &mut keys), Err(ItemError::NotNodeInfo));
        }
        // Oversized values are not signed.
        assert_eq!(
            MutableItem::sign(me.sign_keypair(), b"", 1, encode_bytes(&[b'x'; 1000])),
            Err(ItemError::TooLarge)
        );
    }

    #[test]
    fn only_usable_endpoints_are_published_within_the_limit() {
        let me = Identity::generate();
        let mut keys = KeyCache::new(8);
        let i = info(
            &me,
            &[
                "0.0.0.0:1",
                "127.0.0.1:2",
                "203.0.113.5:3",
                "224.0.0.1:4",
                "192.0.2.1:0",
            ],
        );
        let v = publishable_node_info(&i, &mut keys, false).unwrap();
        let s = String::from_utf8(raw_string(&v).unwrap().to_vec()).unwrap();
        assert!(s.contains("203.0.113.5") && !s.contains("127.0.0.1") && !s.contains("0.0.0.0"));
        assert!(!s.contains("224.0.0.1") && !s.contains("192.0.2.1"));
        let v = publishable_node_info(&i, &mut keys, true).unwrap();
        assert!(String::from_utf8_lossy(&v).contains("127.0.0.1"));
        // Many endpoints: trimmed to fit.
        let many: Vec<String> = (0..16)
            .map(|n| format!("203.0.113.{n}:{}", 40000 + n))
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let mut big = info(&me, &refs);
        for e in big["connectionInfo"].as_array_mut().unwrap() {
            e["transportInfo"]["framing"] = json!("native");
            e["transportInfo"]["padding"] = json!("x".repeat(40));
        }
        let v = publishable_node_info(&big, &mut keys, false).unwrap();
        assert!(v.len() <= MAX_VALUE);
        let back: Value = serde_json::from_slice(raw_string(&v).unwrap()).unwrap();
        assert!(!back["connectionInfo"].as_array().unwrap().is_empty());
        assert!(publishable_node_info(&json!({"signId": "x"}), &mut keys, false).is_none());
        assert_eq!(raw_string(b"3:abc"), Some(&b"abc"[..]));
        assert_eq!(raw_string(b"03:abc"), None);
        assert_eq!(raw_string(b"4:abc"), None);
    }
}
