//! The server's minute keys and the cookies sealed under them (docs/ARCHITECTURE.md §4.1).
//!
//! [`MinuteKeys`] holds the current and the previous minute key. They rotate every 60 s,
//! counted from the server's start and driven only by the `now` the caller passes in: at each
//! rotation the current key becomes the previous one and a fresh random key becomes current,
//! and the old previous key is wiped (forward secrecy of the short-term server keys inside
//! cookies). A cookie therefore opens for at least 60 s and at most 120 s after it was sealed.
//!
//! A cookie is `X(16) || secretbox(t, "minute-k" || X, C'(32) || s'(32))`, 96 bytes, with X
//! 16 fresh random bytes (unique per key with overwhelming probability).

use std::time::{Duration, Instant};

use super::packet::{long_nonce, COOKIE_LEN, MINUTE_NONCE};
use crate::crypto::{random_bytes, wipe, SecretBoxKey, KEY_LEN, TAG_LEN};

/// How often the minute key changes.
pub const MINUTE: Duration = Duration::from_secs(60);

/// What a genuine cookie carries.
pub struct CookieContents {
    /// C', the client short-term key the cookie was issued to.
    pub client_short: [u8; KEY_LEN],
    /// s', the server short-term secret key made for that Hello.
    pub server_short_secret: [u8; KEY_LEN],
}

impl Drop for CookieContents {
    fn drop(&mut self) {
        wipe(&mut self.server_short_secret);
    }
}

/// The current and previous minute keys.
pub struct MinuteKeys {
    current: SecretBoxKey,
    previous: SecretBoxKey,
    next_rotation: Instant,
}

impl MinuteKeys {
    /// Two fresh random keys; the first rotation is 60 s after `now`.
    pub fn new(now: Instant) -> MinuteKeys {
        MinuteKeys {
            current: SecretBoxKey::generate(),
            previous: SecretBoxKey::generate(),
            next_rotation: now + MINUTE,
        }
    }

    /// When the next rotation is due.
    pub fn next_rotation(&self) -> Instant {
        self.next_rotation
    }

    /// Performs every rotation due at `now` (at most two are observable: after two, both keys
    /// are fresh, so later ones are skipped arithmetically).
    pub fn rotate_if_due(&mut self, now: Instant) {
        let mut done = 0;
        while now >= self.next_rotation {
            if done < 2 {
                self.previous = std::mem::replace(&mut self.current, SecretBoxKey::generate());
                done += 1;
                self.next_rotation += MINUTE;
            } else {
                // Both keys are already fresh: jump over the remaining whole periods.
                let behind = now.duration_since(self.next_rotation).as_secs() / 60 + 1;
                self.next_rotation += MINUTE * (behind.min(u32::MAX as u64) as u32);
            }
        }
    }

    /// Replaces both keys now (every outstanding cookie stops opening). The rotation schedule
    /// is unchanged.
    pub fn replace_both(&mut self) {
        self.current = SecretBoxKey::generate();
        self.previous = SecretBoxKey::generate();
    }

    /// Seals a cookie for C' and s' under the current key into `out`.
    pub fn seal(
        &self,
        client_short: &[u8; KEY_LEN],
        server_short_secret: &[u8; KEY_LEN],
        out: &mut [u8; COOKIE_LEN],
    ) {
        let mut x = [0u8; 16];
        random_bytes(&mut x);
        out[..16].copy_from_slice(&x);
        out[16..32].fill(0);
        out[32..64].copy_from_slice(client_short);
        out[64..96].copy_from_slice(server_short_secret);
        self.current
            .seal_in_place(&long_nonce(MINUTE_NONCE, &x), &mut out[16..]);
    }

    /// Opens a cookie under the current key, then the previous one.
    pub fn open(&self, cookie: &[u8; COOKIE_LEN]) -> Option<CookieContents> {
        let x: &[u8; 16] = cookie[..16].try_into().expect("16 bytes");
        let nonce = long_nonce(MINUTE_NONCE, x);
        let mut buf = [0u8; COOKIE_LEN - 16];
        for key in [&self.current, &self.previous] {
            buf.copy_from_slice(&cookie[16..]);
            if key.open_in_place(&nonce, &mut buf).is_ok() {
                let p = &buf[TAG_LEN..];
                let out = CookieContents {
                    client_short: p[..32].try_into().expect("32 bytes"),
                    server_short_secret: p[32..64].try_into().expect("32 bytes"),
                };
                wipe(&mut buf);
                return Some(out);
            }
        }
        wipe(&mut buf);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_lifetime_follows_rotation() {
        let t0 = Instant::now();
        let mut k = MinuteKeys::new(t0);
        let mut c = [0u8; COOKIE_LEN];
        k.seal(&[1; 32], &[2; 32], &mut c);
        let got = k.open(&c).unwrap();
        assert_eq!(got.client_short, [1; 32]);
        assert_eq!(got.server_short_secret, [2; 32]);
        k.rotate_if_due(t0 + Duration::from_secs(59));
        assert!(k.open(&c).is_some());
        k.rotate_if_due(t0 + Duration::from_secs(60));
        assert!(k.open(&c).is_some(), "previous key still opens");
        k.rotate_if_due(t0 + Duration::from_secs(119));
        assert!(k.open(&c).is_some());
        k.rotate_if_due(t0 + Duration::from_secs(120));
        assert!(k.open(&c).is_none(), "gone after two rotations");
        assert_eq!(k.next_rotation(), t0 + Duration::from_secs(180));
    }

    #[test]
    fn long_idle_skips_rotations_and_forgets() {
        let t0 = Instant::now();
        let mut k = MinuteKeys::new(t0);
        let mut c = [0u8; COOKIE_LEN];
        k.seal(&[1; 32], &[2; 32], &mut c);
        k.rotate_if_due(t0 + Duration::from_secs(3600 * 24));
        assert!(k.open(&c).is_none());
        assert!(k.next_rotation() > t0 + Duration::from_secs(3600 * 24));
        assert!(k.next_rotation() <= t0 + Duration::from_secs(3600 * 24 + 60));
    }

    #[test]
    fn tampered_cookie_and_nonce_uniqueness() {
        let t0 = Instant::now();
        let k = MinuteKeys::new(t0);
        let mut a = [0u8; COOKIE_LEN];
        let mut b = [0u8; COOKIE_LEN];
        k.seal(&[1; 32], &[2; 32], &mut a);
        k.seal(&[1; 32], &[2; 32], &mut b);
        assert_ne!(a[..16], b[..16], "fresh nonce per cookie");
        for i in 0..COOKIE_LEN {
            let mut t = a;
            t[i] ^= 1;
            assert!(k.open(&t).is_none(), "flip at {i}");
        }
        let mut k2 = MinuteKeys::new(t0);
        k2.replace_both();
        assert!(k2.open(&a).is_none());
    }
}
