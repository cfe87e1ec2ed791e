//! How the public types show and serialize payload bytes: a short `Debug` form ([`Short`]:
//! length and prefix, never the whole payload) and the serde form of [`crate::Message`]'s
//! `payload` and `id` (standard base64 text in human-readable formats such as JSON, byte
//! strings in binary formats; either is accepted, as is a sequence of numbers).

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Most payload bytes a `Debug` form shows.
const PREFIX: usize = 32;

/// `Debug` of payload bytes: `N bytes "text"` when the shown prefix is UTF-8, else
/// `N bytes 0a1b2c`; `…` marks a cut.
pub(crate) struct Short<'a>(pub(crate) &'a [u8]);

impl fmt::Debug for Short<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        let head = &b[..b.len().min(PREFIX)];
        let cut = if head.len() < b.len() { "…" } else { "" };
        write!(f, "{} bytes ", b.len())?;
        let text = match std::str::from_utf8(head) {
            Ok(t) => Some(t),
            // Cut inside a character: the text up to it.
            Err(e) if e.error_len().is_none() && !cut.is_empty() => {
                std::str::from_utf8(&head[..e.valid_up_to()]).ok()
            }
            Err(_) => None,
        };
        match text {
            Some(t) => write!(f, "{t:?}{cut}"),
            None => {
                for x in head {
                    write!(f, "{x:02x}")?;
                }
                f.write_str(cut)
            }
        }
    }
}

/// Serializes bytes: base64 text when human-readable, a byte string otherwise.
pub(crate) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    if s.is_human_readable() {
        s.serialize_str(&STANDARD.encode(bytes))
    } else {
        s.serialize_bytes(bytes)
    }
}

/// Deserializes bytes from base64 text, a byte string or a sequence of numbers.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct Bytes;
    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("base64 text or bytes")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            STANDARD.decode(v).map_err(E::custom)
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // Bounded by the input itself: each element was read from it.
            let mut v = Vec::new();
            while let Some(x) = seq.next_element()? {
                v.push(x);
            }
            Ok(v)
        }
    }
    if d.is_human_readable() {
        d.deserialize_str(Bytes)
    } else {
        d.deserialize_byte_buf(Bytes)
    }
}

/// The serde form of an optional message id (16 bytes), as bytes above.
pub(crate) mod id {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::platform::MessageId;

    /// Serializes the id's bytes, or none.
    pub(crate) fn serialize<S: Serializer>(
        id: &Option<MessageId>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_some(&Form(id)),
            None => s.serialize_none(),
        }
    }

    /// Deserializes an id of exactly 16 bytes, or none.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<MessageId>, D::Error> {
        let Some(Owned(bytes)) = Option::<Owned>::deserialize(d)? else {
            return Ok(None);
        };
        let id = MessageId::try_from(bytes.as_slice())
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"16 bytes"))?;
        Ok(Some(id))
    }

    struct Form<'a>(&'a [u8]);

    impl serde::Serialize for Form<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::serialize(self.0, s)
        }
    }

    struct Owned(Vec<u8>);

    impl<'de> Deserialize<'de> for Owned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::deserialize(d).map(Owned)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(b: &[u8]) -> String {
        format!("{:?}", Short(b))
    }

    #[test]
    fn short_forms() {
        assert_eq!(short(b""), "0 bytes \"\"");
        assert_eq!(short(b"{\"a\":1}"), "7 bytes \"{\\\"a\\\":1}\"");
        assert_eq!(short(&[0xff, 0x00, 0x10]), "3 bytes ff0010");
        let long = vec![b'x'; 100];
        assert_eq!(short(&long), format!("100 bytes \"{}\"…", "x".repeat(32)));
        assert_eq!(short(&[0xab; 40]), format!("40 bytes {}…", "ab".repeat(32)));
        // A cut inside a character keeps the text before it.
        let mut t = "a".repeat(31).into_bytes();
        t.extend_from_slice("é and more".as_bytes());
        assert_eq!(
            short(&t),
            format!("{} bytes \"{}\"…", t.len(), "a".repeat(31))
        );
    }
}
