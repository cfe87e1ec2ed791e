//! Netstrings (`<decimal length>:<bytes>,`): the framing of CurveCP packets on TCP and of
//! envelopes on a CurveCP stream.
//!
//! The decoder works on a buffer the caller owns and never allocates: [`decode`] looks at the
//! front of the buffer and says whether a whole frame is there, how long it is, or that the
//! bytes can never become a valid frame. A length is rejected as soon as its digits show it is
//! larger than the caller's maximum, before any of its bytes arrive, so a hostile peer cannot
//! make the receiver buffer a frame it announced as huge.

use std::fmt;
use std::ops::Range;

/// The longest length prefix accepted: 20 digits cover every `u64`.
const MAX_DIGITS: usize = 20;

/// Why bytes can never form a valid netstring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetstringError {
    /// The length prefix has a character that is not a digit, or no digits.
    BadLength,
    /// The announced length is larger than the maximum the caller accepts.
    TooLong,
    /// The payload is not followed by `,`.
    MissingComma,
}

impl fmt::Display for NetstringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetstringError::BadLength => "malformed netstring length",
            NetstringError::TooLong => "netstring longer than allowed",
            NetstringError::MissingComma => "netstring not terminated by a comma",
        })
    }
}

impl std::error::Error for NetstringError {}

/// A complete frame found at the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Where the payload lies in the buffer.
    pub payload: Range<usize>,
    /// How many bytes of the buffer the whole frame takes (prefix, payload and comma).
    pub consumed: usize,
}

/// Looks for one netstring at the front of `buf`, with a payload of at most `max_len` bytes.
///
/// Returns `Ok(Some(frame))` when a whole frame is there, `Ok(None)` when more bytes are
/// needed, and an error when the bytes can never be a valid frame (the connection should then
/// be closed).
///
/// ```
/// use mm_platform::proto::netstring::decode;
/// let buf = b"5:hello,3:ab";
/// let f = decode(buf, 100).unwrap().unwrap();
/// assert_eq!(&buf[f.payload.clone()], b"hello");
/// assert_eq!(decode(&buf[f.consumed..], 100), Ok(None)); // the second one is incomplete
/// ```
pub fn decode(buf: &[u8], max_len: usize) -> Result<Option<Frame>, NetstringError> {
    let mut len: u64 = 0;
    let mut digits = 0;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'0'..=b'9' => {
                digits += 1;
                // A leading zero is only allowed for the length 0 itself ("0:,").
                if digits > MAX_DIGITS || (digits == 2 && len == 0) {
                    return Err(NetstringError::BadLength);
                }
                len = match len
                    .checked_mul(10)
                    .and_then(|l| l.checked_add(u64::from(b - b'0')))
                {
                    Some(l) if l <= max_len as u64 => l,
                    _ => return Err(NetstringError::TooLong),
                };
            }
            b':' if digits > 0 => {
                let start = i + 1;
                // `len <= max_len`, but with a huge `max_len` the end may not be addressable.
                let Some(end) = start.checked_add(len as usize) else {
                    return Err(NetstringError::TooLong);
                };
                if buf.len() <= end {
                    return Ok(None);
                }
                if buf[end] != b',' {
                    return Err(NetstringError::MissingComma);
                }
                return Ok(Some(Frame {
                    payload: start..end,
                    consumed: end + 1,
                }));
            }
            _ => return Err(NetstringError::BadLength),
        }
    }
    Ok(None)
}

/// Writes the prefix `<len>:` of a netstring into `out` and returns its length (at most 21).
pub fn write_header(len: usize, out: &mut [u8; 21]) -> usize {
    let mut digits = [0u8; 20];
    let text = decimal(len as u64, &mut digits);
    let d = text.len();
    out[..d].copy_from_slice(text);
    out[d] = b':';
    d + 1
}

/// The decimal digits of `n` (no sign, no leading zeros), written into `digits`, without
/// allocating: the length prefixes of netstrings and of bencode share it.
pub(crate) fn decimal(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        // n % 10 < 10: the cast cannot truncate.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &digits[i..]
}

/// Appends the netstring of `payload` to `out`.
///
/// ```
/// let mut v = Vec::new();
/// mm_platform::proto::netstring::encode_into(b"hi", &mut v);
/// assert_eq!(v, b"2:hi,");
/// ```
pub fn encode_into(payload: &[u8], out: &mut Vec<u8>) {
    let mut h = [0u8; 21];
    let n = write_header(payload.len(), &mut h);
    out.reserve(n + payload.len() + 1);
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
    out.push(b',');
}

/// The encoded size of a netstring with a payload of `len` bytes.
pub fn encoded_len(len: usize) -> usize {
    let mut h = [0u8; 21];
    (write_header(len, &mut h) + 1).saturating_add(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_frames() {
        assert_eq!(
            decode(b"0:,", 10),
            Ok(Some(Frame {
                payload: 2..2,
                consumed: 3
            }))
        );
        assert_eq!(decode(b"", 10), Ok(None));
        assert_eq!(decode(b"12", 100), Ok(None));
        assert_eq!(decode(b"3:ab", 100), Ok(None));
        assert_eq!(decode(b"3:abc", 100), Ok(None));
        assert_eq!(decode(b"3:abcd", 100), Err(NetstringError::MissingComma));
        assert_eq!(decode(b":abc", 100), Err(NetstringError::BadLength));
        assert_eq!(decode(b"x", 100), Err(NetstringError::BadLength));
        assert_eq!(decode(b"01:a,", 100), Err(NetstringError::BadLength));
        assert_eq!(decode(b"-1:", 100), Err(NetstringError::BadLength));
        // Too long is known from the digits alone, before the payload arrives.
        assert_eq!(decode(b"101", 100), Err(NetstringError::TooLong));
        assert_eq!(
            decode(b"99999999999999999999999", usize::MAX),
            Err(NetstringError::TooLong)
        );
    }

    #[test]
    fn lengths_near_the_address_space_do_not_overflow() {
        let max = usize::MAX.to_string();
        let header = format!("{max}:");
        assert_eq!(
            decode(format!("{header}x,").as_bytes(), usize::MAX),
            Err(NetstringError::TooLong)
        );
        assert_eq!(encoded_len(usize::MAX), usize::MAX);
        assert_eq!(decode(b"5:", usize::MAX), Ok(None));
    }

    #[test]
    fn header_sizes() {
        for n in [0usize, 9, 10, 99, 100, 1184, usize::MAX] {
            let mut h = [0u8; 21];
            let k = write_header(n, &mut h);
            assert_eq!(&h[..k], format!("{n}:").as_bytes());
            assert_eq!(
                encoded_len(n.min(10_000)),
                format!("{}:", n.min(10_000)).len() + n.min(10_000) + 1
            );
        }
    }

    proptest! {
        #[test]
        fn roundtrip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut buf = Vec::new();
            for p in &payloads {
                encode_into(p, &mut buf);
            }
            let mut at = 0;
            for p in &payloads {
                let f = decode(&buf[at..], 300).unwrap().unwrap();
                prop_assert_eq!(&buf[at + f.payload.start..at + f.payload.end], &p[..]);
                at += f.consumed;
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64), max in 0usize..2000) {
            if let Ok(Some(f)) = decode(&bytes, max) {
                prop_assert!(f.payload.end < bytes.len());
                prop_assert!(f.payload.len() <= max);
                prop_assert_eq!(f.consumed, f.payload.end + 1);
            }
        }

        #[test]
        fn every_prefix_of_a_frame_is_incomplete(p in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut buf = Vec::new();
            encode_into(&p, &mut buf);
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut], 100), Ok(None));
            }
        }
    }
}
