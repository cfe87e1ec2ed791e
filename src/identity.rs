//! Node identity: the ed25519 signing key pair (`signId`), the curve25519 box key pair derived
//! from it (`boxId`), their typed base64 forms, loading/creating the identity in storage, and a
//! bounded cache of ed25519-to-curve25519 conversions of other nodes' keys.
//!
//! The identity is stored under the storage key [`IDENTITY_KEY`] as the standard base64 (with
//! padding) of the 64-byte ed25519 secret key, as the original did with tweetnacl-util, so a data
//! directory keeps its node id across restarts. A storage that has no identity but holds other
//! keys (queued offline messages, de-duplication memory, listen addresses: the state of a node
//! whose identity was lost) does not get a new identity unless that is explicitly allowed
//! ([`Identity::load_or_create_with`], [`IdentityError::Missing`]).
//!
//! The key types an identity is made of ([`SignKeyPair`], [`SignPublicKey`], [`BoxKeyPair`],
//! [`BoxPublicKey`]) are re-exported here; the rest of the cryptography (boxes, shared keys,
//! cipher backends) is a protocol internal, in [`crate::proto::crypto`].

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

pub use crate::crypto::{BoxKeyPair, BoxPublicKey, CryptoError, SignKeyPair, SignPublicKey};
use crate::storage::{Storage, StorageError};

/// The storage key holding the identity's secret key.
pub const IDENTITY_KEY: &str = "identity";

/// A node id: an ed25519 public key, shown and parsed as standard base64 (44 characters; also
/// its serde form).
///
/// ```
/// use mm_platform::identity::Identity;
/// use mm_platform::SignId;
///
/// let id = Identity::generate();
/// let text = id.sign_id().to_string();
/// assert_eq!(text.len(), 44);
/// let parsed: SignId = text.parse().unwrap();
/// assert_eq!(parsed, id.sign_id());
/// assert!("not base64!".parse::<SignId>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SignId(pub SignPublicKey);

/// A node's encryption key: a curve25519 public key, shown and parsed as standard base64
/// (also its serde form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoxId(pub BoxPublicKey);

/// The error of parsing a [`SignId`] or [`BoxId`]: not base64 of exactly 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseIdError;

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a base64-encoded 32-byte key")
    }
}

impl std::error::Error for ParseIdError {}

fn decode_key(s: &str) -> Result<[u8; 32], ParseIdError> {
    // 32 bytes are 44 base64 characters; refuse anything longer before decoding.
    if s.len() != 44 {
        return Err(ParseIdError);
    }
    let mut out = [0u8; 33];
    let n = STANDARD
        .decode_slice(s.as_bytes(), &mut out)
        .map_err(|_| ParseIdError)?;
    if n != 32 {
        return Err(ParseIdError);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&out[..32]);
    Ok(key)
}

impl SignId {
    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// Converts to the matching [`BoxId`] (`crypto_sign_ed25519_pk_to_curve25519`). Fails for
    /// bytes that are not a valid ed25519 point. This costs tens of microseconds: the platform
    /// caches it ([`KeyCache`]).
    pub fn to_box_id(&self) -> Result<BoxId, CryptoError> {
        self.0.to_box_public().map(BoxId)
    }
}

impl BoxId {
    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }
}

impl fmt::Display for SignId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.as_bytes()))
    }
}

impl fmt::Debug for SignId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignId({self})")
    }
}

impl fmt::Display for BoxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.as_bytes()))
    }
}

impl fmt::Debug for BoxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BoxId({self})")
    }
}

impl FromStr for SignId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(|k| SignId(SignPublicKey(k)))
    }
}

impl FromStr for BoxId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(|k| BoxId(BoxPublicKey(k)))
    }
}

/// serde in the ids' text form (standard base64 of the 32 bytes), parsed as [`FromStr`] does.
macro_rules! serde_as_text {
    ($($ty:ty),*) => {$(
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_text!(SignId, BoxId);

/// Why the identity could not be loaded or created.
#[derive(Debug)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the store failed.
    Storage(StorageError),
    /// The stored value is not base64 of a valid 64-byte ed25519 secret key. It is left
    /// untouched: replacing it silently would change the node's id.
    Corrupt,
    /// There is no identity in the storage, but other keys are there: the state of a node
    /// whose identity was lost (deleted, or never stored because it was given to the builder).
    /// A new identity is not created in its place unless that is explicitly allowed
    /// ([`crate::PlatformBuilder::allow_new_identity`]).
    Missing {
        /// How many other keys the storage holds.
        keys: usize,
        /// A few of them (sorted), for the message.
        examples: Vec<String>,
    },
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Storage(e) => write!(f, "identity storage: {e}"),
            IdentityError::Corrupt => f.write_str("the stored identity is not a valid secret key"),
            IdentityError::Missing { keys, examples } => write!(
                f,
                "the identity (storage key {IDENTITY_KEY:?}) is missing, but the storage holds \
                 the state of a node ({keys} keys: {}{}); refusing to replace a lost identity \
                 with a new one in silence: restore the identity, or allow a new one \
                 (PlatformBuilder::allow_new_identity)",
                examples.join(", "),
                if *keys > examples.len() { ", ..." } else { "" }
            ),
        }
    }
}

impl std::error::Error for IdentityError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IdentityError::Storage(e) => Some(e),
            IdentityError::Corrupt | IdentityError::Missing { .. } => None,
        }
    }
}

impl From<StorageError> for IdentityError {
    fn from(e: StorageError) -> Self {
        IdentityError::Storage(e)
    }
}

/// A node's key pairs: ed25519 for signing (its [`SignId`]) and the curve25519 pair derived
/// from it for CurveCP (its [`BoxId`]). The derived pair is computed once, at construction.
///
/// ```
/// use mm_platform::identity::Identity;
/// use mm_platform::storage::MemStore;
///
/// let mut store = MemStore::new();
/// let first = Identity::load_or_create(&mut store).unwrap();
/// let again = Identity::load_or_create(&mut store).unwrap();
/// assert_eq!(first.sign_id(), again.sign_id());
/// assert_eq!(first.sign_id().to_box_id().unwrap(), first.box_id());
/// ```
#[derive(Clone)]
pub struct Identity {
    sign: SignKeyPair,
    boxes: BoxKeyPair,
    sign_id: SignId,
    box_id: BoxId,
}

impl Identity {
    /// The identity of an ed25519 key pair.
    pub fn from_sign_keypair(sign: SignKeyPair) -> Identity {
        let boxes = sign.to_box_keypair();
        Identity {
            sign_id: SignId(sign.public),
            box_id: BoxId(boxes.public),
            sign,
            boxes,
        }
    }

    /// A fresh random identity.
    pub fn generate() -> Identity {
        Identity::from_sign_keypair(SignKeyPair::generate())
    }

    /// Parses the stored form: base64 of the 64-byte ed25519 secret key.
    pub fn from_stored(text: &[u8]) -> Result<Identity, IdentityError> {
        let end = text
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let text = &text[..end];
        if text.len() > 100 {
            return Err(IdentityError::Corrupt);
        }
        let mut raw = [0u8; 75];
        let n = STANDARD
            .decode_slice(text, &mut raw)
            .map_err(|_| IdentityError::Corrupt)?;
        let result = SignKeyPair::from_secret_bytes(&raw[..n]).map_err(|_| IdentityError::Corrupt);
        crate::crypto::wipe(&mut raw);
        result.map(Identity::from_sign_keypair)
    }

    /// The stored form: standard base64 of the 64-byte secret key.
    pub fn to_stored(&self) -> String {
        STANDARD.encode(self.sign.secret_bytes())
    }

    /// Loads the identity stored under [`IDENTITY_KEY`], or creates one and stores it if the
    /// storage is empty. A storage without identity that holds other keys is refused
    /// ([`IdentityError::Missing`]); see [`Identity::load_or_create_with`].
    pub fn load_or_create<S: Storage + ?Sized>(storage: &mut S) -> Result<Identity, IdentityError> {
        Identity::load_or_create_with(storage, false)
    }

    /// Loads the identity stored under [`IDENTITY_KEY`], or creates one and stores it. When
    /// there is none but the storage holds other keys, a new identity is created only if
    /// `allow_new` (logged at warn level: the node becomes another node, and its state, queued
    /// offline messages included, is the new node's); otherwise [`IdentityError::Missing`].
    ///
    /// ```
    /// use mm_platform::identity::{Identity, IdentityError};
    /// use mm_platform::storage::{MemStore, Storage};
    ///
    /// let mut store = MemStore::new();
    /// store.put("offline-00", b"a queued message").unwrap();
    /// let refused = Identity::load_or_create(&mut store);
    /// assert!(matches!(refused, Err(IdentityError::Missing { keys: 1, .. })));
    /// let new = Identity::load_or_create_with(&mut store, true).unwrap();
    /// assert_eq!(Identity::load_or_create(&mut store).unwrap().sign_id(), new.sign_id());
    /// ```
    pub fn load_or_create_with<S: Storage + ?Sized>(
        storage: &mut S,
        allow_new: bool,
    ) -> Result<Identity, IdentityError> {
        if let Some(stored) = storage.get(IDENTITY_KEY)? {
            return Identity::from_stored(&stored);
        }
        let mut others: Vec<String> = storage
            .keys()?
            .into_iter()
            .filter(|k| k != IDENTITY_KEY)
            .collect();
        if !others.is_empty() {
            others.sort();
            let keys = others.len();
            others.truncate(4);
            if !allow_new {
                return Err(IdentityError::Missing {
                    keys,
                    examples: others,
                });
            }
            log::warn!(
                "no identity in a storage holding {keys} other keys ({}...): a new identity \
                 is created as allowed, and that state is now the new node's",
                others.join(", ")
            );
        }
        let id = Identity::generate();
        let mut text = id.to_stored().into_bytes();
        let result = storage.put(IDENTITY_KEY, &text);
        crate::crypto::wipe(&mut text);
        result?;
        log::debug!("created a new identity {}", id.sign_id());
        Ok(id)
    }

    /// The node id (ed25519 public key).
    pub fn sign_id(&self) -> SignId {
        self.sign_id
    }

    /// The encryption key (curve25519 public key derived from the signing key).
    pub fn box_id(&self) -> BoxId {
        self.box_id
    }

    /// The signing key pair.
    pub fn sign_keypair(&self) -> &SignKeyPair {
        &self.sign
    }

    /// The curve25519 key pair (the CurveCP long-term key).
    pub fn box_keypair(&self) -> &BoxKeyPair {
        &self.boxes
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("sign_id", &self.sign_id)
            .finish_non_exhaustive()
    }
}

/// A bounded cache of `SignId -> BoxId` conversions (each costs tens of microseconds), including
/// failed ones (an invalid point stays invalid). When full it is cleared, which bounds memory
/// whatever ids the network sends.
#[derive(Debug, Clone)]
pub struct KeyCache {
    map: HashMap<SignId, Option<BoxId>>,
    capacity: usize,
}

impl KeyCache {
    /// A cache holding at most `capacity` conversions (at least 1).
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            map: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The box key of `id`, or `None` when `id` is not a valid ed25519 key.
    pub fn box_id(&mut self, id: &SignId) -> Option<BoxId> {
        if let Some(v) = self.map.get(id) {
            return *v;
        }
        let v = id.to_box_id().ok();
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        self.map.insert(*id, v);
        v
    }

    /// Number of cached conversions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStore;

    #[test]
    fn stored_form_round_trips_and_is_standard_base64() {
        let id = Identity::generate();
        let text = id.to_stored();
        assert_eq!(text.len(), 88);
        assert!(text.ends_with("=="));
        let back = Identity::from_stored(text.as_bytes()).unwrap();
        assert_eq!(back.sign_id(), id.sign_id());
        assert_eq!(back.box_id(), id.box_id());
    }

    #[test]
    fn corrupt_identity_is_refused_and_kept() {
        let mut store = MemStore::new();
        for bad in [&b"garbage"[..], b"", &[b'A'; 5000][..], b"AAAA"] {
            store.put(IDENTITY_KEY, bad).unwrap();
            assert!(matches!(
                Identity::load_or_create(&mut store),
                Err(IdentityError::Corrupt)
            ));
            assert_eq!(store.get(IDENTITY_KEY).unwrap().as_deref(), Some(bad));
        }
        // 64 bytes whose public half does not match the seed.
        let id = Identity::generate();
        let mut raw = id.sign_keypair().secret_bytes().to_vec();
        raw[40] ^= 1;
        assert!(Identity::from_stored(STANDARD.encode(&raw).as_bytes()).is_err());
    }

    #[test]
    fn ids_parse_strictly() {
        let id = Identity::generate();
        let s = id.box_id().to_string();
        assert_eq!(s.parse::<BoxId>().unwrap(), id.box_id());
        assert!(s[..43].parse::<BoxId>().is_err());
        assert!(format!("{s}A").parse::<SignId>().is_err());
        assert!("".parse::<SignId>().is_err());
        // 33 bytes encoded: 44 chars without padding is not a 32-byte key.
        let long = STANDARD.encode([7u8; 33]);
        assert!(long.parse::<SignId>().is_err());
    }

    #[test]
    fn key_cache_is_bounded_and_caches_failures() {
        let mut cache = KeyCache::new(2);
        let a = Identity::generate();
        assert_eq!(cache.box_id(&a.sign_id()), Some(a.box_id()));
        // Not a valid point (y = 2 is not on the curve).
        let mut bad = [0u8; 32];
        bad[0] = 2;
        let bad = SignId(SignPublicKey(bad));
        assert_eq!(cache.box_id(&bad), None);
        assert_eq!(cache.len(), 2);
        let b = Identity::generate();
        assert_eq!(cache.box_id(&b.sign_id()), Some(b.box_id()));
        assert!(cache.len() <= 2);
    }
}
