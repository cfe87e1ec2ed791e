//! 160-bit Kademlia ids as `kad` 1.6 computes them: node ids derived from a boxId (the
//! original's `MMContact`), keys hashed with SHA-1 unless they already are 40 characters long
//! (`kad`'s `utils.createID`), XOR distance and bucket index (`utils.getBucketIndex`).

use std::fmt;

use crate::crypto;

/// Bytes in an id.
pub const ID_LEN: usize = 20;
/// Bits in an id (`kad`'s `B`).
pub const ID_BITS: usize = 160;

/// A node id or a hashed key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; ID_LEN]);

impl NodeId {
    /// The id of the node with this boxId (its base64 text): RIPEMD-160 of SHA-256 of the text.
    pub fn of_box_id(box_id_text: &str) -> NodeId {
        NodeId(crypto::ripemd160(&crypto::sha256(box_id_text.as_bytes())))
    }

    /// `kad`'s `createID(key)`: a key of exactly 40 characters (UTF-16 code units) is taken as
    /// hexadecimal itself (as Node's `Buffer.write(hex)` decodes it: up to the first pair that
    /// is not hex, the rest zero); any other key is hashed with SHA-1 of its UTF-8 bytes.
    pub fn of_key(key: &str) -> NodeId {
        if key.encode_utf16().count() == 2 * ID_LEN {
            let mut out = [0u8; ID_LEN];
            let b = key.as_bytes();
            // 40 UTF-16 units that are all hex digits are 40 bytes; otherwise decoding stops at
            // the first non-hex pair.
            for (i, slot) in out.iter_mut().enumerate() {
                let pair = b.get(2 * i..2 * i + 2);
                match pair.and_then(|p| std::str::from_utf8(p).ok()) {
                    Some(p) => match u8::from_str_radix(p, 16) {
                        Ok(v) if p.bytes().all(|c| c.is_ascii_hexdigit()) => *slot = v,
                        _ => break,
                    },
                    None => break,
                }
            }
            return NodeId(out);
        }
        NodeId(crypto::sha1(&[key.as_bytes()]))
    }

    /// Parses 40 hexadecimal digits (either case).
    pub fn from_hex(s: &str) -> Option<NodeId> {
        let mut out = [0u8; ID_LEN];
        (s.len() == 2 * ID_LEN && crypto::from_hex_into(s, &mut out)).then_some(NodeId(out))
    }

    /// Lowercase hexadecimal, as the JavaScript side writes ids.
    pub fn to_hex(&self) -> String {
        crypto::to_hex(&self.0)
    }

    /// XOR distance.
    pub fn distance(&self, other: &NodeId) -> [u8; ID_LEN] {
        let mut d = [0u8; ID_LEN];
        for (i, x) in d.iter_mut().enumerate() {
            *x = self.0[i] ^ other.0[i];
        }
        d
    }

    /// The routing-table bucket of `other` seen from `self` (`kad`'s `getBucketIndex`):
    /// 159 minus the number of leading equal bits; 0 for the same id.
    pub fn bucket_index(&self, other: &NodeId) -> usize {
        let d = self.distance(other);
        for (i, b) in d.iter().enumerate() {
            if *b != 0 {
                return ID_BITS - 1 - (i * 8 + b.leading_zeros() as usize);
            }
        }
        0
    }

    /// A random id whose bucket index seen from `self` is `index`.
    pub fn random_in_bucket(&self, index: usize) -> NodeId {
        let mut r = [0u8; ID_LEN];
        crypto::random_bytes(&mut r);
        let index = index.min(ID_BITS - 1);
        // Distance: bit `index` set, higher bits clear, lower bits random.
        let top = ID_BITS - 1 - index; // bit position from the most significant end
        let mut d = [0u8; ID_LEN];
        for (i, byte) in d.iter_mut().enumerate() {
            for bit in 0..8 {
                let pos = i * 8 + bit;
                let mask = 0x80u8 >> bit;
                if pos == top || (pos > top && r[i] & mask != 0) {
                    *byte |= mask;
                }
            }
        }
        let mut out = [0u8; ID_LEN];
        for i in 0..ID_LEN {
            out[i] = self.0[i] ^ d[i];
        }
        NodeId(out)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_as_kad_computes_them() {
        // Node 20: crypto.createHash('sha1').update('hello').digest('hex')
        assert_eq!(
            NodeId::of_key("hello").to_hex(),
            "aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d"
        );
        let hex40 = "00112233445566778899aabbccddeeff00112233";
        assert_eq!(NodeId::of_key(hex40).to_hex(), hex40);
        // 40 characters, not hex from the third pair on: the rest stays zero.
        let odd = "0011zz33445566778899aabbccddeeff00112233";
        assert_eq!(
            NodeId::of_key(odd).to_hex(),
            "0011000000000000000000000000000000000000"
        );
    }

    #[test]
    fn buckets_and_random_ids_agree() {
        let me = NodeId::of_key("me");
        assert_eq!(me.bucket_index(&me), 0);
        for index in [0, 1, 7, 8, 9, 100, 159] {
            for _ in 0..20 {
                assert_eq!(me.bucket_index(&me.random_in_bucket(index)), index);
            }
        }
    }
}
