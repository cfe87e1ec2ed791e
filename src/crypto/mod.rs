//! Cryptographic primitives: the only module that calls `sodiumoxide` (and its `libsodium-sys`,
//! for the one function sodiumoxide does not wrap: HSalsa20).
//!
//! Everything the protocol needs from NaCl/libsodium is here, behind small typed wrappers, so
//! that the binding can be replaced (sodiumoxide is no longer maintained upstream) without
//! touching protocol code:
//!
//! - curve25519 box key pairs ([`BoxKeyPair`], [`BoxPublicKey`]) and the precomputed shared key
//!   of `crypto_box_beforenm` ([`SharedKey`]), sealing and opening in place in the compact
//!   wire form (16-byte Poly1305 tag, then the ciphertext), exactly what libsodium's
//!   `crypto_box_easy_afternm` produces;
//! - secret-key boxes (`crypto_secretbox`, [`SecretBoxKey`]) with the same layout;
//! - ed25519 signing keys ([`SignKeyPair`], [`SignPublicKey`]) and their conversion to
//!   curve25519 box keys;
//! - random bytes;
//! - SHA-1 (`sha1`, through `sha1_smol`; built with the `mainline` or `kademlia` feature),
//!   which the Mainline DHT uses for its 160-bit ids, BEP 44 targets and tokens (the BEP 44
//!   item signature itself is ed25519: [`SignKeyPair::sign`], [`SignPublicKey::verify`]) and
//!   the Kademlia service for its key hashes;
//! - a checksum for stored records ([`checksum`], libsodium's BLAKE2b generic hash, 16 bytes);
//! - SHA-256 and SHA-512 (`sha256`, `sha512`, libsodium's) and RIPEMD-160 (`ripemd160`,
//!   through `ripemd`), built with the `kademlia` feature, which the Kademlia service needs to
//!   be wire-compatible with the original (node ids are RIPEMD-160 of SHA-256 of the boxId
//!   text; messages are signed over SHA-512 of their JSON text).
//!
//! Two primitives are not left to libsodium for the boxes of CurveCP messages (the bulk of all
//! traffic), on CPUs that have the instructions: the Salsa20 keystream with AVX-512
//! (`crypto/salsa20x.rs`) and Poly1305 with AVX-512 IFMA (`crypto/poly1305x.rs`). libsodium
//! 1.0.18 stops at AVX2 and SSE2 for them, and together they were about two thirds of each
//! side's time in a bulk transfer. Which code runs is a [`CipherBackend`]: each [`SharedKey`]
//! takes the thread's choice when it is made ([`with_message_cipher`]; tests use it to run
//! every box, packet and connection test with each backend) or else the process default
//! ([`CipherBackend::detected`]: the fastest this CPU has, libsodium when the environment
//! variable `MM_CRYPTO_LIBSODIUM=1` is set). Building without the default `simd` feature
//! leaves the hand-written code out altogether. All backends give the same bytes: tests and a
//! differential fuzz target (`fuzz/fuzz_targets/cipher.rs`) compare them with libsodium.
//!
//! Tests of a vector backend this machine cannot run print `SKIPPING`; with
//! `MM_REQUIRE_AVX512=1` (CI sets it where the CPU has AVX-512F, VL and IFMA) they fail instead.
//!
//! Secret material is wiped from memory when its owner is dropped.

use std::fmt;
use std::sync::{Once, OnceLock};

#[cfg(all(feature = "simd", target_arch = "x86_64"))]
mod poly1305x;
#[cfg(all(feature = "simd", target_arch = "x86_64"))]
mod salsa20x;

use sodiumoxide::crypto::box_::curve25519xsalsa20poly1305 as nacl_box;
use sodiumoxide::crypto::onetimeauth::poly1305 as nacl_poly1305;
use sodiumoxide::crypto::scalarmult::curve25519 as nacl_scalarmult;
use sodiumoxide::crypto::secretbox::xsalsa20poly1305 as nacl_secretbox;
use sodiumoxide::crypto::sign::ed25519 as nacl_sign;
use sodiumoxide::crypto::stream::salsa20 as nacl_salsa20;

/// Length of every public and secret curve25519 key, and of a secretbox key.
pub(crate) const KEY_LEN: usize = 32;
/// Length of a Poly1305 authentication tag: a box is this much longer than its plaintext.
pub const TAG_LEN: usize = 16;
/// Length of a box or secretbox nonce.
pub(crate) const NONCE_LEN: usize = 24;
/// Length of an ed25519 secret key in libsodium's form (seed followed by public key).
pub(crate) const SIGN_SECRET_LEN: usize = 64;
/// Length of an ed25519 signature.
pub(crate) const SIGNATURE_LEN: usize = 64;

/// A 24-byte nonce.
pub(crate) type Nonce = [u8; NONCE_LEN];

static INIT: Once = Once::new();

/// Initialises libsodium once per process. Every constructor here calls it; calling it again is
/// cheap.
pub(crate) fn init() {
    INIT.call_once(|| {
        // sodium_init only fails when the system has no usable source of randomness; nothing in
        // this library can work then, and silently continuing would produce predictable keys.
        sodiumoxide::init().expect("libsodium initialisation failed (no system randomness?)");
    });
}

/// The error of every failed authentication: a box or signature that does not verify, or a
/// key that cannot be converted. It carries no detail on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoError;

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("authentication failed")
    }
}

impl std::error::Error for CryptoError {}

/// Which code seals and opens the boxes of CurveCP messages (XSalsa20-Poly1305 under a
/// [`SharedKey`] with a cached nonce prefix). All give the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherBackend {
    /// libsodium's Salsa20 and Poly1305 throughout: every CPU, and every build.
    Libsodium,
    /// Salsa20 16 blocks at a time with AVX-512F and VL, libsodium's Poly1305: what a CPU with
    /// AVX-512 but without IFMA runs.
    Avx512,
    /// Salsa20 with AVX-512F and VL, and Poly1305 8 blocks at a time with AVX-512 IFMA.
    Avx512Ifma,
}

impl CipherBackend {
    /// Every backend, libsodium first.
    pub const ALL: [CipherBackend; 3] = [
        CipherBackend::Libsodium,
        CipherBackend::Avx512,
        CipherBackend::Avx512Ifma,
    ];

    /// Its name: `"libsodium"`, `"avx512"` or `"avx512-ifma"`.
    pub fn name(self) -> &'static str {
        match self {
            CipherBackend::Libsodium => "libsodium",
            CipherBackend::Avx512 => "avx512",
            CipherBackend::Avx512Ifma => "avx512-ifma",
        }
    }

    /// Whether this build (the `simd` feature) and this CPU can run it.
    pub fn supported(self) -> bool {
        Engine::of(self).is_some()
    }

    /// The process default: libsodium when the environment variable `MM_CRYPTO_LIBSODIUM` is
    /// set to anything but `0` (read once), else the fastest backend this build and CPU run.
    pub fn detected() -> CipherBackend {
        static DETECTED: OnceLock<CipherBackend> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let off = std::env::var_os("MM_CRYPTO_LIBSODIUM").is_some_and(|v| v != "0");
            if off {
                return CipherBackend::Libsodium;
            }
            [CipherBackend::Avx512Ifma, CipherBackend::Avx512]
                .into_iter()
                .find(|b| b.supported())
                .unwrap_or(CipherBackend::Libsodium)
        })
    }
}

impl fmt::Display for CipherBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A [`CipherBackend`] asked for where this build or CPU cannot run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsupportedBackend(pub CipherBackend);

impl fmt::Display for UnsupportedBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cipher backend {} unsupported (this CPU lacks the instructions, or the build lacks \
             the simd feature)",
            self.0
        )
    }
}

impl std::error::Error for UnsupportedBackend {}

/// A [`CipherBackend`] made runnable: the vector variants carry the CPU-feature tokens their
/// code requires, so holding one proves the check was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Libsodium,
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    Vector {
        salsa: salsa20x::Avx512,
        poly: Option<poly1305x::Ifma>,
    },
}

impl Engine {
    /// The engine of `backend`, if this build and CPU run it.
    fn of(backend: CipherBackend) -> Option<Engine> {
        match backend {
            CipherBackend::Libsodium => Some(Engine::Libsodium),
            #[cfg(all(feature = "simd", target_arch = "x86_64"))]
            CipherBackend::Avx512 => Some(Engine::Vector {
                salsa: salsa20x::Avx512::detect()?,
                poly: None,
            }),
            #[cfg(all(feature = "simd", target_arch = "x86_64"))]
            CipherBackend::Avx512Ifma => Some(Engine::Vector {
                salsa: salsa20x::Avx512::detect()?,
                poly: Some(poly1305x::Ifma::detect()?),
            }),
            #[cfg(not(all(feature = "simd", target_arch = "x86_64")))]
            CipherBackend::Avx512 | CipherBackend::Avx512Ifma => None,
        }
    }

    fn backend(self) -> CipherBackend {
        match self {
            Engine::Libsodium => CipherBackend::Libsodium,
            #[cfg(all(feature = "simd", target_arch = "x86_64"))]
            Engine::Vector { poly: None, .. } => CipherBackend::Avx512,
            #[cfg(all(feature = "simd", target_arch = "x86_64"))]
            Engine::Vector { poly: Some(_), .. } => CipherBackend::Avx512Ifma,
        }
    }

    /// The engine a key made now takes: the thread's [`with_message_cipher`] choice, else the
    /// process default.
    fn current() -> Engine {
        THREAD_ENGINE.with(|e| e.get()).unwrap_or_else(|| {
            static DEFAULT: OnceLock<Engine> = OnceLock::new();
            *DEFAULT.get_or_init(|| {
                Engine::of(CipherBackend::detected()).expect("detected() is supported")
            })
        })
    }
}

thread_local! {
    /// The backend [`with_message_cipher`] set on this thread.
    static THREAD_ENGINE: std::cell::Cell<Option<Engine>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every [`SharedKey`] made on this thread during it using `backend` (keys made
/// before keep theirs; other threads are not affected). Tests use it to run the same
/// connection once per backend; [`SharedKey::set_cipher_backend`] sets one key's.
pub fn with_message_cipher<T>(
    backend: CipherBackend,
    f: impl FnOnce() -> T,
) -> Result<T, UnsupportedBackend> {
    let engine = Engine::of(backend).ok_or(UnsupportedBackend(backend))?;
    /// Puts the previous choice back, also when `f` panics.
    struct Restore(Option<Engine>);
    impl Drop for Restore {
        fn drop(&mut self) {
            THREAD_ENGINE.with(|e| e.set(self.0));
        }
    }
    let _restore = Restore(THREAD_ENGINE.with(|e| e.replace(Some(engine))));
    Ok(f())
}

/// The name of the process default [`CipherBackend`] ([`CipherBackend::detected`]):
/// `"avx512-ifma"`, `"avx512"` or `"libsodium"`.
pub fn message_cipher_backend() -> &'static str {
    CipherBackend::detected().name()
}

/// The Poly1305 tag of `msg` under the one-time `key` (r, then s) computed by `backend`'s
/// Poly1305 (`crypto_onetimeauth` for libsodium and [`CipherBackend::Avx512`]). For
/// differential tests, fuzzing and timing: protocol code never needs it.
pub fn poly1305_tag_with(
    backend: CipherBackend,
    key: &[u8; 32],
    msg: &[u8],
) -> Result<[u8; TAG_LEN], UnsupportedBackend> {
    let engine = Engine::of(backend).ok_or(UnsupportedBackend(backend))?;
    Ok(poly1305_tag(engine, key, msg))
}

/// Test support: a test of a path this machine cannot run says so, and fails when the
/// environment variable `MM_REQUIRE_AVX512=1` is set (CI sets it where the CPU has AVX-512F,
/// VL and IFMA), so a broken detection or build cannot pass as skipped. A build without the
/// `simd` feature has no vector backends by choice: its tests of them skip whatever the switch
/// says (the switch is about the CPU, and CI also tests that build).
#[cfg(test)]
pub(crate) fn cannot_run(what: &str) {
    if !cfg!(feature = "simd") {
        crate::proto::skip_test(what, "built without the `simd` feature");
        return;
    }
    if std::env::var_os("MM_REQUIRE_AVX512").is_some_and(|v| v != "0") {
        panic!("{what}: cannot run here, and MM_REQUIRE_AVX512 is set");
    }
    crate::proto::skip_test(what, "cannot run on this machine");
}

/// Overwrites `buf` with zeros in a way the optimiser does not remove (`sodium_memzero`, a
/// word-wide `explicit_bzero`: on the per-packet path, a byte-wise volatile loop cost about 5%
/// of a bulk transfer).
pub(crate) fn wipe(buf: &mut [u8]) {
    sodiumoxide::utils::memzero(buf);
}

/// Fills `buf` with cryptographically secure random bytes.
pub fn random_bytes(buf: &mut [u8]) {
    init();
    sodiumoxide::randombytes::randombytes_into(buf);
}

/// Length of a SHA-1 digest (a Mainline DHT node id or target).
#[cfg(any(feature = "kademlia", feature = "mainline"))]
pub(crate) const SHA1_LEN: usize = 20;

/// SHA-1 of the concatenation of `parts`. Only for the Mainline DHT's ids, targets and tokens
/// and the Kademlia service's key hashes, where the protocol fixes the hash; never for anything
/// that needs collision resistance.
#[cfg(any(feature = "kademlia", feature = "mainline"))]
pub(crate) fn sha1(parts: &[&[u8]]) -> [u8; SHA1_LEN] {
    let mut h = sha1_smol::Sha1::new();
    for p in parts {
        h.update(p);
    }
    h.digest().bytes()
}

/// Length of a SHA-256 digest.
#[cfg(feature = "kademlia")]
pub(crate) const SHA256_LEN: usize = 32;
/// Length of a SHA-512 digest.
#[cfg(feature = "kademlia")]
pub(crate) const SHA512_LEN: usize = 64;
/// Length of a RIPEMD-160 digest (a Kademlia node id).
#[cfg(feature = "kademlia")]
pub(crate) const RIPEMD160_LEN: usize = 20;

/// SHA-256 of `data`.
#[cfg(feature = "kademlia")]
pub(crate) fn sha256(data: &[u8]) -> [u8; SHA256_LEN] {
    init();
    sodiumoxide::crypto::hash::sha256::hash(data).0
}

/// SHA-512 of `data`.
#[cfg(feature = "kademlia")]
pub(crate) fn sha512(data: &[u8]) -> [u8; SHA512_LEN] {
    init();
    sodiumoxide::crypto::hash::sha512::hash(data).0
}

/// Length of a [`checksum`]: 16 bytes (128 bits).
pub(crate) const CHECKSUM_LEN: usize = 16;

/// A checksum of the concatenation of `parts`: libsodium's generic hash (BLAKE2b) with a
/// 16-byte output. For detecting damage to stored data (a flipped bit, a torn or garbled
/// record), not for authentication: it has no key.
pub(crate) fn checksum(parts: &[&[u8]]) -> [u8; CHECKSUM_LEN] {
    use sodiumoxide::crypto::generichash;
    init();
    let mut state =
        generichash::State::new(Some(CHECKSUM_LEN), None).expect("16 is a valid digest length");
    for p in parts {
        state.update(p).expect("generichash update");
    }
    let digest = state.finalize().expect("generichash finalize");
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(digest.as_ref());
    out
}

/// RIPEMD-160 of `data`. Only for the Kademlia node ids the original derives with it.
#[cfg(feature = "kademlia")]
pub(crate) fn ripemd160(data: &[u8]) -> [u8; RIPEMD160_LEN] {
    use ripemd::Digest;
    let mut h = ripemd::Ripemd160::new();
    h.update(data);
    h.finalize().into()
}

/// A cryptographically secure random `u64`.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    random_bytes(&mut b);
    u64::from_le_bytes(b)
}

/// A uniformly distributed random number in `[0, upper)`; `0` when `upper` is 0.
pub fn random_below(upper: u64) -> u64 {
    if upper == 0 {
        return 0;
    }
    // Rejection sampling: draw from the largest multiple of `upper` that fits in u64.
    let zone = u64::MAX - (u64::MAX % upper);
    loop {
        let v = random_u64();
        if v < zone {
            return v % upper;
        }
    }
}

/// A curve25519 public key (a CurveCP long-term or short-term key, or a node's `boxId`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoxPublicKey(pub [u8; KEY_LEN]);

impl BoxPublicKey {
    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Reads a key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<BoxPublicKey> {
        bytes.try_into().ok().map(BoxPublicKey)
    }

    /// The key as 64 lowercase hexadecimal digits (the form `curvecpprintkey` prints).
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// Parses 64 hexadecimal digits, either case.
    pub fn from_hex(s: &str) -> Option<BoxPublicKey> {
        let mut out = [0u8; KEY_LEN];
        from_hex_into(s, &mut out).then_some(BoxPublicKey(out))
    }
}

impl fmt::Debug for BoxPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BoxPublicKey({})", &self.to_hex()[..16])
    }
}

/// A curve25519 key pair. The secret half is wiped on drop and never printed.
#[derive(Clone)]
pub struct BoxKeyPair {
    /// The public key.
    pub public: BoxPublicKey,
    secret: [u8; KEY_LEN],
}

impl BoxKeyPair {
    /// A fresh random key pair.
    pub fn generate() -> BoxKeyPair {
        init();
        let (pk, sk) = nacl_box::gen_keypair();
        BoxKeyPair {
            public: BoxPublicKey(pk.0),
            secret: sk.0,
        }
    }

    /// The key pair whose secret key is `secret` (the public key is derived from it).
    pub fn from_secret(secret: [u8; KEY_LEN]) -> BoxKeyPair {
        init();
        let sk = nacl_scalarmult::Scalar(secret);
        let pk = nacl_scalarmult::scalarmult_base(&sk);
        BoxKeyPair {
            public: BoxPublicKey(pk.0),
            secret,
        }
    }

    /// The raw secret key, for storing it (for example in a CurveCP key directory).
    pub fn secret_bytes(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }

    /// Precomputes the key shared with `their_public` (`crypto_box_beforenm`).
    pub fn shared_key(&self, their_public: &BoxPublicKey) -> SharedKey {
        SharedKey::new(their_public, self)
    }
}

impl Drop for BoxKeyPair {
    fn drop(&mut self) {
        wipe(&mut self.secret);
    }
}

impl fmt::Debug for BoxKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// A precomputed box key (`crypto_box_beforenm(their_public, my_secret)`), used with a nonce
/// for every box between two key pairs. Computing it costs a scalar multiplication (tens of
/// microseconds): do it once per pair, not per packet.
///
/// A box with a 24-byte nonce is XSalsa20-Poly1305: HSalsa20 turns the key and the nonce's
/// first 16 bytes into a Salsa20 subkey, and Salsa20 with that subkey and the nonce's last 8
/// bytes encrypts (its first 32 bytes of keystream are the Poly1305 key). When every nonce of a
/// key shares its first 16 bytes (CurveCP's Message nonces: `CurveCP-client-M` or
/// `CurveCP-server-M` and a counter), [`SharedKey::cache_nonce_prefix`] computes that subkey
/// once, and sealing and opening with such a nonce skip the HSalsa20 (about 6% of a 1 KiB box).
/// The bytes are the same either way.
#[derive(Clone)]
pub struct SharedKey {
    key: nacl_box::PrecomputedKey,
    /// Salsa20 subkeys for up to two nonce prefixes.
    subkeys: [Option<Subkey>; 2],
    /// The code that seals and opens with those subkeys.
    engine: Engine,
}

/// The XSalsa20 subkey of a [`SharedKey`] for one 16-byte nonce prefix.
#[derive(Clone)]
struct Subkey {
    prefix: [u8; 16],
    key: nacl_salsa20::Key,
    /// Keystream tails of the next full message boxes (`salsa20x::TailCache`).
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    tail: salsa20x::TailSlot,
}

/// Seals `buf[TAG_LEN..]` in place with Salsa20 `key` and 8-byte nonce `n` (the second half
/// of XSalsa20-Poly1305, as `crypto_secretbox_detached` does it after HSalsa20).
fn seal_with_subkey(engine: Engine, sub: &Subkey, n: &[u8], buf: &mut [u8]) {
    let key = &sub.key;
    let n = nacl_salsa20::Nonce(n.try_into().expect("8-byte nonce"));
    let (tag, body) = buf.split_at_mut(TAG_LEN);
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    if let Engine::Vector { salsa, .. } = engine {
        let mut poly_key = [0u8; 32];
        salsa20x::xor_after_poly_key_cached(salsa, &key.0, &n.0, body, &sub.tail, |k, _| {
            poly_key = *k;
            true
        });
        tag.copy_from_slice(&poly1305_tag(engine, &poly_key, body));
        wipe(&mut poly_key);
        return;
    }
    let _ = engine;
    let first = body.len().min(32);
    // Keystream block 0: the Poly1305 key, then 32 bytes for the first message bytes.
    let mut block0 = [0u8; 64];
    block0[32..32 + first].copy_from_slice(&body[..first]);
    nacl_salsa20::stream_xor_ic_inplace(&mut block0[..32 + first], &n, 0, key);
    body[..first].copy_from_slice(&block0[32..32 + first]);
    if body.len() > first {
        nacl_salsa20::stream_xor_ic_inplace(&mut body[first..], &n, 1, key);
    }
    let poly_key = nacl_poly1305::Key(block0[..32].try_into().expect("32 bytes"));
    wipe(&mut block0);
    tag.copy_from_slice(&nacl_poly1305::authenticate(body, &poly_key).0);
}

/// The Poly1305 tag of `msg` under the one-time `key`: eight blocks at a time with AVX-512
/// IFMA for long messages when `engine` has it (`crypto/poly1305x.rs`), libsodium's otherwise.
fn poly1305_tag(engine: Engine, key: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    if let Engine::Vector {
        poly: Some(ifma), ..
    } = engine
    {
        if msg.len() >= poly1305x::MIN_LEN {
            return poly1305x::tag(ifma, key, msg);
        }
    }
    let _ = engine;
    let mut k = nacl_poly1305::Key(*key);
    let t = nacl_poly1305::authenticate(msg, &k).0;
    wipe(&mut k.0);
    t
}

/// Opens what [`seal_with_subkey`] sealed, in place; the tag is checked before anything is
/// decrypted.
fn open_with_subkey(
    engine: Engine,
    key: &Subkey,
    n: &[u8],
    buf: &mut [u8],
) -> Result<(), CryptoError> {
    if buf.len() < TAG_LEN {
        return Err(CryptoError);
    }
    let (tag, body) = buf.split_at_mut(TAG_LEN);
    open_detached_with_subkey(engine, key, n, tag, body)
}

/// [`open_with_subkey`] with the tag apart from the ciphertext `body`.
fn open_detached_with_subkey(
    engine: Engine,
    sub: &Subkey,
    n: &[u8],
    tag: &[u8],
    body: &mut [u8],
) -> Result<(), CryptoError> {
    let key = &sub.key;
    let n = nacl_salsa20::Nonce(n.try_into().expect("8-byte nonce"));
    let tag = nacl_poly1305::Tag(tag.try_into().map_err(|_| CryptoError)?);
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    if let Engine::Vector { salsa, .. } = engine {
        let opened = salsa20x::xor_after_poly_key_cached(
            salsa,
            &key.0,
            &n.0,
            body,
            &sub.tail,
            |k, ciphertext| {
                sodiumoxide::utils::memcmp(&poly1305_tag(engine, k, ciphertext), &tag.0)
            },
        );
        return if opened { Ok(()) } else { Err(CryptoError) };
    }
    let _ = engine;
    let first = body.len().min(32);
    let mut block0 = [0u8; 64];
    block0[32..32 + first].copy_from_slice(&body[..first]);
    nacl_salsa20::stream_xor_ic_inplace(&mut block0[..32 + first], &n, 0, key);
    let poly_key = nacl_poly1305::Key(block0[..32].try_into().expect("32 bytes"));
    if !nacl_poly1305::verify(&tag, body, &poly_key) {
        wipe(&mut block0);
        return Err(CryptoError);
    }
    body[..first].copy_from_slice(&block0[32..32 + first]);
    wipe(&mut block0);
    if body.len() > first {
        nacl_salsa20::stream_xor_ic_inplace(&mut body[first..], &n, 1, key);
    }
    Ok(())
}

impl SharedKey {
    /// Precomputes the key between `their_public` and `mine`.
    pub fn new(their_public: &BoxPublicKey, mine: &BoxKeyPair) -> SharedKey {
        init();
        let pk = nacl_box::PublicKey(their_public.0);
        let sk = nacl_box::SecretKey(mine.secret);
        SharedKey::wrap(nacl_box::precompute(&pk, &sk))
    }

    fn wrap(key: nacl_box::PrecomputedKey) -> SharedKey {
        SharedKey {
            key,
            subkeys: [None, None],
            engine: Engine::current(),
        }
    }

    /// A precomputed key from its 32 bytes (the output of `crypto_box_beforenm`), for tests
    /// and fuzzing; real keys come from [`SharedKey::new`] or [`BoxKeyPair::shared_key`].
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SharedKey {
        init();
        SharedKey::wrap(nacl_box::PrecomputedKey(bytes))
    }

    /// The backend that seals and opens this key's message boxes.
    pub fn cipher_backend(&self) -> CipherBackend {
        self.engine.backend()
    }

    /// Makes `backend` seal and open this key's message boxes from now on (tests, and
    /// measuring one against another).
    pub fn set_cipher_backend(&mut self, backend: CipherBackend) -> Result<(), UnsupportedBackend> {
        self.engine = Engine::of(backend).ok_or(UnsupportedBackend(backend))?;
        Ok(())
    }

    /// Computes and keeps the subkey for nonces starting with `prefix` (at most two prefixes
    /// are kept; a third replaces the second). Sealing and opening with such nonces then skip
    /// the per-box HSalsa20.
    pub fn cache_nonce_prefix(&mut self, prefix: &[u8; 16]) {
        if self.subkey(prefix).is_some() {
            return;
        }
        let mut out = [0u8; 32];
        // SAFETY: `out` has 32 writable bytes, `prefix` 16 and the key 32 readable ones, as
        // crypto_core_hsalsa20 requires; a null constant selects the standard "expand
        // 32-byte k".
        unsafe {
            libsodium_sys::crypto_core_hsalsa20(
                out.as_mut_ptr(),
                prefix.as_ptr(),
                self.key.0.as_ptr(),
                std::ptr::null(),
            );
        }
        let sub = Subkey {
            prefix: *prefix,
            key: nacl_salsa20::Key(out),
            #[cfg(all(feature = "simd", target_arch = "x86_64"))]
            tail: salsa20x::TailSlot::default(),
        };
        wipe(&mut out);
        let slot = if self.subkeys[0].is_none() { 0 } else { 1 };
        self.subkeys[slot] = Some(sub);
    }

    fn subkey(&self, prefix: &[u8]) -> Option<&Subkey> {
        self.subkeys
            .iter()
            .flatten()
            .find(|s| s.prefix[..] == *prefix)
    }

    /// Precomputes the key between `their_public` and a raw secret key `my_secret`, without
    /// deriving the public half (a server restoring its short-term secret from a cookie saves a
    /// scalar multiplication this way).
    pub fn from_secret(their_public: &BoxPublicKey, my_secret: &[u8; KEY_LEN]) -> SharedKey {
        init();
        let pk = nacl_box::PublicKey(their_public.0);
        let sk = nacl_box::SecretKey(*my_secret);
        SharedKey::wrap(nacl_box::precompute(&pk, &sk))
    }

    /// Seals `buf[TAG_LEN..]` in place: on return `buf` holds the tag then the ciphertext, the
    /// compact wire form. `buf` must be at least `TAG_LEN` long.
    pub fn seal_in_place(&self, nonce: &Nonce, buf: &mut [u8]) {
        if let Some(sub) = self.subkey(&nonce[..16]) {
            return seal_with_subkey(self.engine, sub, &nonce[16..], buf);
        }
        let (tag, body) = buf.split_at_mut(TAG_LEN);
        let t = nacl_box::seal_detached_precomputed(body, &nacl_box::Nonce(*nonce), &self.key);
        tag.copy_from_slice(&t.0);
    }

    /// Opens a compact box in place: on success `buf[TAG_LEN..]` holds the plaintext. On
    /// failure `buf` is unspecified (the caller must treat it as garbage).
    pub fn open_in_place(&self, nonce: &Nonce, buf: &mut [u8]) -> Result<(), CryptoError> {
        if buf.len() < TAG_LEN {
            return Err(CryptoError);
        }
        if let Some(sub) = self.subkey(&nonce[..16]) {
            return open_with_subkey(self.engine, sub, &nonce[16..], buf);
        }
        let (tag, body) = buf.split_at_mut(TAG_LEN);
        let tag = nacl_box::Tag(tag.try_into().expect("tag length"));
        nacl_box::open_detached_precomputed(body, &tag, &nacl_box::Nonce(*nonce), &self.key)
            .map_err(|_| CryptoError)
    }

    /// Seals `plaintext` into `out`, which must be exactly `plaintext.len() + TAG_LEN` long.
    pub fn seal_into(&self, nonce: &Nonce, plaintext: &[u8], out: &mut [u8]) {
        assert_eq!(out.len(), plaintext.len() + TAG_LEN, "box output length");
        out[TAG_LEN..].copy_from_slice(plaintext);
        self.seal_in_place(nonce, out);
    }

    /// Opens the compact box `boxed` into `out`, which must be exactly `boxed.len() - TAG_LEN`
    /// long. On failure `out` is zeroed.
    pub fn open_into(
        &self,
        nonce: &Nonce,
        boxed: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoError> {
        if boxed.len() < TAG_LEN || out.len() != boxed.len() - TAG_LEN {
            return Err(CryptoError);
        }
        let r = match self.subkey(&nonce[..16]) {
            Some(sub) => {
                out.copy_from_slice(&boxed[TAG_LEN..]);
                open_detached_with_subkey(self.engine, sub, &nonce[16..], &boxed[..TAG_LEN], out)
            }
            None => {
                out.copy_from_slice(&boxed[TAG_LEN..]);
                let tag = nacl_box::Tag(boxed[..TAG_LEN].try_into().expect("tag length"));
                nacl_box::open_detached_precomputed(out, &tag, &nacl_box::Nonce(*nonce), &self.key)
                    .map_err(|_| CryptoError)
            }
        };
        if r.is_err() {
            wipe(out);
            return Err(CryptoError);
        }
        Ok(())
    }
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedKey(..)")
    }
}

/// A `crypto_secretbox` key (XSalsa20-Poly1305), such as a CurveCP minute key.
#[derive(Clone)]
pub(crate) struct SecretBoxKey([u8; KEY_LEN]);

impl SecretBoxKey {
    /// A fresh random key.
    pub fn generate() -> SecretBoxKey {
        let mut k = [0u8; KEY_LEN];
        random_bytes(&mut k);
        SecretBoxKey(k)
    }

    /// A key with the given bytes (known-answer tests).
    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> SecretBoxKey {
        SecretBoxKey(bytes)
    }

    /// Seals `buf[TAG_LEN..]` in place into the compact form (tag, then ciphertext).
    pub fn seal_in_place(&self, nonce: &Nonce, buf: &mut [u8]) {
        init();
        let (tag, body) = buf.split_at_mut(TAG_LEN);
        let t = nacl_secretbox::seal_detached(
            body,
            &nacl_secretbox::Nonce(*nonce),
            &nacl_secretbox::Key(self.0),
        );
        tag.copy_from_slice(&t.0);
    }

    /// Opens a compact secretbox in place; on success `buf[TAG_LEN..]` is the plaintext.
    pub fn open_in_place(&self, nonce: &Nonce, buf: &mut [u8]) -> Result<(), CryptoError> {
        init();
        if buf.len() < TAG_LEN {
            return Err(CryptoError);
        }
        let (tag, body) = buf.split_at_mut(TAG_LEN);
        let tag = nacl_secretbox::Tag(tag.try_into().expect("tag length"));
        nacl_secretbox::open_detached(
            body,
            &tag,
            &nacl_secretbox::Nonce(*nonce),
            &nacl_secretbox::Key(self.0),
        )
        .map_err(|_| CryptoError)
    }
}

impl Drop for SecretBoxKey {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl fmt::Debug for SecretBoxKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretBoxKey(..)")
    }
}

/// An ed25519 public key (a node's `signId` is its base64 form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SignPublicKey(pub [u8; KEY_LEN]);

impl SignPublicKey {
    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Reads a key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<SignPublicKey> {
        bytes.try_into().ok().map(SignPublicKey)
    }

    /// The curve25519 public key this ed25519 key converts to
    /// (`crypto_sign_ed25519_pk_to_curve25519`). Fails for bytes that are not a valid point.
    /// This costs tens of microseconds: cache the result.
    pub fn to_box_public(&self) -> Result<BoxPublicKey, CryptoError> {
        init();
        nacl_sign::to_curve25519_pk(&nacl_sign::PublicKey(self.0))
            .map(|pk| BoxPublicKey(pk.0))
            .map_err(|_| CryptoError)
    }

    /// Checks a detached signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8; SIGNATURE_LEN]) -> bool {
        init();
        let sig = nacl_sign::Signature::from_bytes(signature).expect("64-byte signature");
        nacl_sign::verify_detached(&sig, message, &nacl_sign::PublicKey(self.0))
    }
}

impl fmt::Debug for SignPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SignPublicKey({})", &to_hex(&self.0)[..16])
    }
}

/// An ed25519 key pair. The secret half (libsodium's 64-byte form: seed then public key) is
/// wiped on drop and never printed.
#[derive(Clone)]
pub struct SignKeyPair {
    /// The public key.
    pub public: SignPublicKey,
    secret: [u8; SIGN_SECRET_LEN],
}

impl SignKeyPair {
    /// A fresh random key pair.
    pub fn generate() -> SignKeyPair {
        init();
        let (pk, sk) = nacl_sign::gen_keypair();
        SignKeyPair {
            public: SignPublicKey(pk.0),
            secret: sk.0,
        }
    }

    /// The key pair of a 64-byte libsodium secret key (seed followed by public key). The
    /// public key is re-derived from the seed and must match the stored half.
    pub fn from_secret_bytes(secret: &[u8]) -> Result<SignKeyPair, CryptoError> {
        init();
        let secret: [u8; SIGN_SECRET_LEN] = secret.try_into().map_err(|_| CryptoError)?;
        let seed = nacl_sign::Seed::from_slice(&secret[..32]).ok_or(CryptoError)?;
        let (pk, sk) = nacl_sign::keypair_from_seed(&seed);
        if sk.0 != secret {
            return Err(CryptoError);
        }
        Ok(SignKeyPair {
            public: SignPublicKey(pk.0),
            secret,
        })
    }

    /// The 64-byte secret key, for storing it.
    pub fn secret_bytes(&self) -> &[u8; SIGN_SECRET_LEN] {
        &self.secret
    }

    /// A detached signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        init();
        let sk = nacl_sign::SecretKey(self.secret);
        nacl_sign::sign_detached(message, &sk).to_bytes()
    }

    /// The curve25519 box key pair derived from this signing key pair (the node's `boxId`).
    pub fn to_box_keypair(&self) -> BoxKeyPair {
        init();
        let sk = nacl_sign::to_curve25519_sk(&nacl_sign::SecretKey(self.secret))
            .expect("a valid ed25519 secret key always converts");
        BoxKeyPair::from_secret(sk.0)
    }
}

impl Drop for SignKeyPair {
    fn drop(&mut self) {
        wipe(&mut self.secret);
    }
}

impl fmt::Debug for SignKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignKeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Lowercase hexadecimal of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses exactly `2 * out.len()` hexadecimal digits (either case) into `out`; returns whether
/// it succeeded (on failure `out` is unspecified).
pub fn from_hex_into(s: &str, out: &mut [u8]) -> bool {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return false;
    }
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    for (i, o) in out.iter_mut().enumerate() {
        match (digit(s[2 * i]), digit(s[2 * i + 1])) {
            (Some(h), Some(l)) => *o = (h << 4) | l,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "kademlia")]
    #[test]
    fn hash_test_vectors() {
        // FIPS 180-2 "abc".
        assert_eq!(
            to_hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(to_hex(&sha512(b"abc")).starts_with("ddaf35a193617abacc417349ae204131"));
    }

    #[cfg(feature = "kademlia")]
    #[test]
    fn ripemd160_test_vector() {
        // The RIPEMD-160 paper's "abc".
        assert_eq!(
            to_hex(&ripemd160(b"abc")),
            "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc"
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        let mut v = vec![0u8; s.len() / 2];
        assert!(from_hex_into(s, &mut v));
        v
    }

    // The NaCl test vectors (tests/box.c and tests/secretbox.c of NaCl 20110221, the same as
    // libsodium's): Alice's secret key, Bob's public key, the nonce, the 131-byte message and
    // the expected box, given here in the compact form (tag then ciphertext).
    const ALICE_SK: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const BOB_PK: &str = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f";
    const BOB_SK: &str = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb";
    const NONCE: &str = "69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37";
    const MSG: &str = "be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffce5ecbaaf33bd751a1ac728d45e6c61296cdc3c01233561f41db66cce314adb310e3be8250c46f06dceea3a7fa1348057e2f6556ad6b1318a024a838f21af1fde048977eb48f59ffd4924ca1c60902e52f0a089bc76897040e082f937763848645e0705";
    const BOXED: &str = "f3ffc7703f9400e52a7dfb4b3d3305d98e993b9f48681273c29650ba32fc76ce48332ea7164d96a4476fb8c531a1186ac0dfc17c98dce87b4da7f011ec48c97271d2c20f9b928fe2270d6fb863d51738b48eeee314a7cc8ab932164548e526ae90224368517acfeabd6bb3732bc0e9da99832b61ca01b6de56244a9e88d5f9b37973f622a43d14a6599b1f654cb45a74e355a5";

    fn key(s: &str) -> [u8; 32] {
        hex(s).try_into().unwrap()
    }

    /// Runs `test` with `backend` (every key it makes takes it), or says it cannot.
    fn on(backend: CipherBackend, test: fn(CipherBackend)) {
        if !backend.supported() {
            cannot_run(&format!("the {backend} box tests"));
            return;
        }
        with_message_cipher(backend, || test(backend)).expect("supported");
    }

    /// Each named test function `fn(CipherBackend)` becomes a module of three tests, one per
    /// backend (`name::libsodium`, `name::avx512`, `name::avx512_ifma`), so the test output
    /// counts each path.
    macro_rules! per_backend {
        ($($name:ident),* $(,)?) => {$(
            mod $name {
                use super::*;
                #[test]
                fn libsodium() {
                    on(CipherBackend::Libsodium, super::$name)
                }
                #[test]
                fn avx512() {
                    on(CipherBackend::Avx512, super::$name)
                }
                #[test]
                fn avx512_ifma() {
                    on(CipherBackend::Avx512Ifma, super::$name)
                }
            }
        )*};
    }

    per_backend!(
        box_known_answer,
        cached_nonce_prefixes_give_the_same_boxes,
        consecutive_message_boxes_match_libsodium_in_any_order,
        box_rejects_any_flipped_bit,
        boxes_match_libsodium_for_any_input,
        poly1305_tags_match_libsodium_for_any_input,
    );

    #[test]
    fn backends_are_named_and_chosen_per_thread() {
        assert_eq!(CipherBackend::detected(), CipherBackend::detected());
        assert!(CipherBackend::Libsodium.supported());
        assert!(CipherBackend::detected().supported());
        assert_eq!(message_cipher_backend(), CipherBackend::detected().name());
        for b in CipherBackend::ALL {
            match with_message_cipher(b, || SharedKey::from_bytes([1; 32]).cipher_backend()) {
                Ok(got) => assert_eq!(got, b),
                Err(e) => {
                    assert_eq!(e, UnsupportedBackend(b));
                    assert!(!b.supported());
                    cannot_run(&format!("choosing {b}"));
                }
            }
        }
        // Outside, keys take the default again.
        assert_eq!(
            SharedKey::from_bytes([1; 32]).cipher_backend(),
            CipherBackend::detected()
        );
        let mut k = SharedKey::from_bytes([1; 32]);
        k.set_cipher_backend(CipherBackend::Libsodium).unwrap();
        assert_eq!(k.cipher_backend(), CipherBackend::Libsodium);
    }

    /// The CPU flags say AVX-512F, VL and IFMA: then the vector backends must be supported
    /// (a broken detection or a build without `simd` fails here under `MM_REQUIRE_AVX512=1`).
    #[test]
    fn vector_backends_run_where_the_cpu_has_them() {
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|w| w == f);
        if has("avx512f") && has("avx512vl") {
            if !CipherBackend::Avx512.supported() {
                cannot_run("the avx512 backend, though /proc/cpuinfo lists avx512f and avx512vl");
            }
            if has("avx512ifma") && !CipherBackend::Avx512Ifma.supported() {
                cannot_run("the avx512-ifma backend, though /proc/cpuinfo lists avx512ifma");
            }
        }
    }

    fn box_known_answer(backend: CipherBackend) {
        let alice = BoxKeyPair::from_secret(key(ALICE_SK));
        assert_eq!(
            alice.public.to_hex(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        let k = alice.shared_key(&BoxPublicKey(key(BOB_PK)));
        let nonce: Nonce = hex(NONCE).try_into().unwrap();
        let msg = hex(MSG);
        let mut out = vec![0u8; msg.len() + TAG_LEN];
        k.seal_into(&nonce, &msg, &mut out);
        assert_eq!(to_hex(&out), BOXED);

        // Bob opens it with his own precomputed key.
        let bob = BoxKeyPair::from_secret(key(BOB_SK));
        let kb = bob.shared_key(&alice.public);
        let mut plain = vec![0u8; msg.len()];
        kb.open_into(&nonce, &out, &mut plain).unwrap();
        assert_eq!(plain, msg);

        // In place.
        let mut buf = out.clone();
        kb.open_in_place(&nonce, &mut buf).unwrap();
        assert_eq!(&buf[TAG_LEN..], &msg[..]);

        // The same through a cached nonce prefix: the backend's own code.
        let mut kc = alice.shared_key(&BoxPublicKey(key(BOB_PK)));
        kc.cache_nonce_prefix(nonce[..16].try_into().unwrap());
        assert_eq!(kc.cipher_backend(), backend);
        let mut again = vec![0u8; msg.len() + TAG_LEN];
        kc.seal_into(&nonce, &msg, &mut again);
        assert_eq!(to_hex(&again), BOXED);
        let mut buf = again.clone();
        kc.open_in_place(&nonce, &mut buf).unwrap();
        assert_eq!(&buf[TAG_LEN..], &msg[..]);
    }

    /// A key with cached nonce prefixes seals to the same bytes as libsodium's box (every
    /// length around the 32-byte first-block split, up to a full CurveCP message), opens
    /// libsodium's boxes, refuses a flipped bit, and other prefixes still take the plain path.
    fn cached_nonce_prefixes_give_the_same_boxes(backend: CipherBackend) {
        let a = BoxKeyPair::generate();
        let b = BoxKeyPair::generate();
        let mut plain_key = SharedKey::new(&b.public, &a);
        plain_key
            .set_cipher_backend(CipherBackend::Libsodium)
            .unwrap();
        let mut fast = SharedKey::new(&a.public, &b);
        assert_eq!(fast.cipher_backend(), backend);
        fast.cache_nonce_prefix(b"CurveCP-client-M");
        fast.cache_nonce_prefix(b"CurveCP-server-M");
        fast.cache_nonce_prefix(b"CurveCP-server-M");
        for (i, prefix) in [
            &b"CurveCP-client-M",
            &b"CurveCP-server-M",
            &b"CurveCP-client-H",
        ]
        .iter()
        .enumerate()
        {
            for len in [
                0, 1, 16, 31, 32, 33, 63, 64, 65, 100, 511, 512, 513, 991, 992, 993, 1087, 1088,
                1100, 2015, 2016, 2017, 3000,
            ] {
                let mut nonce = [0u8; NONCE_LEN];
                nonce[..16].copy_from_slice(&prefix[..]);
                nonce[16..].copy_from_slice(&(len as u64 * 7919 + i as u64).to_le_bytes());
                let msg: Vec<u8> = (0..len).map(|k| (k * 13 + len) as u8).collect();
                let mut x = vec![0u8; TAG_LEN + len];
                x[TAG_LEN..].copy_from_slice(&msg);
                let mut y = x.clone();
                plain_key.seal_in_place(&nonce, &mut x);
                fast.seal_in_place(&nonce, &mut y);
                assert_eq!(x, y, "prefix {i}, {len} bytes");
                let mut out = vec![0u8; len];
                fast.open_into(&nonce, &x, &mut out).unwrap();
                assert_eq!(out, msg);
                plain_key.open_in_place(&nonce, &mut y).unwrap();
                assert_eq!(&y[TAG_LEN..], &msg[..]);
                for bit in [0, 8 * TAG_LEN + 3, 8 * (TAG_LEN + len) - 1] {
                    if bit >= 8 * x.len() {
                        continue;
                    }
                    let mut z = x.clone();
                    z[bit / 8] ^= 1 << (bit % 8);
                    assert!(fast.open_in_place(&nonce, &mut z).is_err());
                    assert!(fast.open_into(&nonce, &z, &mut out).is_err());
                }
            }
        }
    }

    /// A connection's boxes in a row (consecutive nonces, full and short messages mixed) seal
    /// to libsodium's bytes with the cached prefix and its keystream tails, and open in any
    /// order, replays included.
    fn consecutive_message_boxes_match_libsodium_in_any_order(backend: CipherBackend) {
        let a = BoxKeyPair::generate();
        let b = BoxKeyPair::generate();
        let mut plain = SharedKey::new(&b.public, &a);
        plain.set_cipher_backend(CipherBackend::Libsodium).unwrap();
        plain.cache_nonce_prefix(b"CurveCP-client-M");
        let mut fast = SharedKey::new(&a.public, &b);
        fast.cache_nonce_prefix(b"CurveCP-client-M");
        let mut opener = SharedKey::new(&a.public, &b);
        opener.cache_nonce_prefix(b"CurveCP-client-M");
        assert_eq!(
            (fast.cipher_backend(), opener.cipher_backend()),
            (backend, backend)
        );
        let nonce_of = |c: u64| {
            let mut n = [0u8; NONCE_LEN];
            n[..16].copy_from_slice(b"CurveCP-client-M");
            n[16..].copy_from_slice(&c.to_le_bytes());
            n
        };
        let mut boxes = Vec::new();
        for c in 5000u64..5100 {
            let len = if c % 13 == 0 { 160 } else { 1088 };
            let msg: Vec<u8> = (0..len).map(|i| (i as u64 ^ c) as u8).collect();
            let mut x = vec![0u8; TAG_LEN + len];
            x[TAG_LEN..].copy_from_slice(&msg);
            let mut y = x.clone();
            plain.seal_in_place(&nonce_of(c), &mut x);
            fast.seal_in_place(&nonce_of(c), &mut y);
            assert_eq!(x, y, "nonce {c}");
            boxes.push((c, x, msg));
        }
        // Open in a scrambled order, some twice.
        let order: Vec<usize> = (0..150).map(|i| (i * 37 + i / 7) % boxes.len()).collect();
        for i in order {
            let (c, x, msg) = &boxes[i];
            let mut z = x.clone();
            opener.open_in_place(&nonce_of(*c), &mut z).unwrap();
            assert_eq!(&z[TAG_LEN..], &msg[..], "nonce {c}");
        }
    }

    fn box_rejects_any_flipped_bit(backend: CipherBackend) {
        let a = BoxKeyPair::generate();
        let b = BoxKeyPair::generate();
        // Plain, then with the nonce prefix cached (the backend's code); a short box and a
        // full message box (its keystream tail cached).
        for (cached, len) in [(false, 40), (true, 40), (true, 200), (true, 1088)] {
            let mut k = a.shared_key(&b.public);
            assert_eq!(k.cipher_backend(), backend);
            let nonce = [7u8; 24];
            if cached {
                k.cache_nonce_prefix(&[7u8; 16]);
            }
            let msg = vec![1u8; len];
            let mut sealed = vec![0u8; 16 + len];
            k.seal_into(&nonce, &msg, &mut sealed);
            for i in 0..sealed.len() * 8 {
                let mut bad = sealed.clone();
                bad[i / 8] ^= 1 << (i % 8);
                let mut out = vec![0u8; len];
                assert!(k.open_into(&nonce, &bad, &mut out).is_err());
                assert!(out.iter().all(|&x| x == 0), "wiped on failure");
                assert!(k.open_in_place(&nonce, &mut bad).is_err());
            }
            let mut other_nonce = nonce;
            other_nonce[23] ^= 1;
            let mut out = vec![0u8; len];
            assert!(k.open_into(&other_nonce, &sealed, &mut out).is_err());
            assert!(k.open_into(&nonce, &sealed[..10], &mut [0u8; 0]).is_err());
            k.open_into(&nonce, &sealed, &mut out).unwrap();
            assert_eq!(out, msg);
        }
    }

    /// One differential case: `key` (a precomputed box key), `nonce`, `msg` placed at byte
    /// `align` of its buffer, sealed and opened by `backend` (the nonce prefix cached) and by
    /// libsodium (not cached), then `count` consecutive nonces (the keystream tail cache) and a
    /// flipped bit refused by both.
    fn differential_case(
        backend: CipherBackend,
        key: [u8; 32],
        nonce: Nonce,
        msg: &[u8],
        align: usize,
        count: u64,
        flip: usize,
    ) {
        let mut ours = SharedKey::from_bytes(key);
        ours.set_cipher_backend(backend).unwrap();
        ours.cache_nonce_prefix(nonce[..16].try_into().unwrap());
        let mut theirs = SharedKey::from_bytes(key);
        theirs.set_cipher_backend(CipherBackend::Libsodium).unwrap();
        let len = TAG_LEN + msg.len();
        for c in 0..count {
            let mut n = nonce;
            let counter = u64::from_le_bytes(n[16..].try_into().unwrap()).wrapping_add(c);
            n[16..].copy_from_slice(&counter.to_le_bytes());
            let mut a = vec![0u8; align + len];
            a[align + TAG_LEN..].copy_from_slice(msg);
            let mut b = a.clone();
            ours.seal_in_place(&n, &mut a[align..]);
            theirs.seal_in_place(&n, &mut b[align..]);
            assert!(
                a == b,
                "{backend}: sealed boxes differ ({} bytes)",
                msg.len()
            );
            let mut opened = a.clone();
            ours.open_in_place(&n, &mut opened[align..]).unwrap();
            assert!(opened[align + TAG_LEN..] == *msg);
            let mut out = vec![0u8; msg.len()];
            theirs.open_into(&n, &a[align..], &mut out).unwrap();
            assert!(out == msg);
            let mut bad = a.clone();
            let bit = flip % (8 * len);
            bad[align + bit / 8] ^= 1 << (bit % 8);
            assert!(ours.open_into(&n, &bad[align..], &mut out).is_err());
            assert!(theirs.open_in_place(&n, &mut bad[align..]).is_err());
        }
    }

    fn boxes_match_libsodium_for_any_input(backend: CipherBackend) {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 200,
            ..Default::default()
        });
        let lengths = prop_oneof![0usize..2200, 1000usize..1100, Just(1088usize)];
        let strategy = (
            any::<[u8; 32]>(),
            any::<[u8; 24]>(),
            lengths.prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n)),
            0usize..64,
            1u64..12,
            any::<usize>(),
            any::<bool>(),
        );
        runner
            .run(&strategy, |(key, nonce, msg, align, count, flip, ones)| {
                let msg = if ones { vec![0xff; msg.len()] } else { msg };
                differential_case(backend, key, nonce, &msg, align, count, flip);
                Ok(())
            })
            .unwrap();
    }

    fn poly1305_tags_match_libsodium_for_any_input(backend: CipherBackend) {
        use proptest::prelude::*;
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 500,
            ..Default::default()
        });
        let strategy = (
            any::<[u8; 32]>(),
            (0usize..2200).prop_flat_map(|n| proptest::collection::vec(any::<u8>(), n)),
            0u8..4,
        );
        runner
            .run(&strategy, |(key, msg, extreme)| {
                // Extremes push limbs and carries to their bounds: all-ones messages, r at its
                // clamp, s all ones.
                let mut key = key;
                let msg = match extreme {
                    1 => vec![0xff; msg.len()],
                    2 => {
                        key[..16].fill(0xff);
                        vec![0xff; msg.len()]
                    }
                    3 => {
                        key[16..].fill(0xff);
                        msg
                    }
                    _ => msg,
                };
                let want = nacl_poly1305::authenticate(&msg, &nacl_poly1305::Key(key)).0;
                prop_assert_eq!(poly1305_tag_with(backend, &key, &msg).unwrap(), want);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn secretbox_known_answer() {
        // NaCl's secretbox test uses the box test's shared key as its key.
        let firstkey = "1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389";
        let k = SecretBoxKey::from_bytes(key(firstkey));
        let nonce: Nonce = hex(NONCE).try_into().unwrap();
        let msg = hex(MSG);
        let mut buf = vec![0u8; TAG_LEN];
        buf.extend_from_slice(&msg);
        k.seal_in_place(&nonce, &mut buf);
        assert_eq!(to_hex(&buf), BOXED);
        k.open_in_place(&nonce, &mut buf).unwrap();
        assert_eq!(&buf[TAG_LEN..], &msg[..]);
        buf[3] ^= 1;
        assert!(k.open_in_place(&nonce, &mut buf).is_err());
    }

    #[test]
    fn ed25519_roundtrip_and_conversion() {
        let kp = SignKeyPair::generate();
        let again = SignKeyPair::from_secret_bytes(kp.secret_bytes()).unwrap();
        assert_eq!(again.public, kp.public);
        let sig = kp.sign(b"hello");
        assert!(kp.public.verify(b"hello", &sig));
        assert!(!kp.public.verify(b"hellp", &sig));
        // The converted secret key's public key is the converted public key.
        let bx = kp.to_box_keypair();
        assert_eq!(bx.public, kp.public.to_box_public().unwrap());
        // A 64-byte secret whose public half does not match is refused.
        let mut bad = *kp.secret_bytes();
        bad[40] ^= 1;
        assert!(SignKeyPair::from_secret_bytes(&bad).is_err());
        assert!(SignKeyPair::from_secret_bytes(&bad[..63]).is_err());
    }

    #[test]
    fn ed25519_known_answer() {
        // RFC 8032 test 1.
        let seed = key("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let mut secret = [0u8; 64];
        secret[..32].copy_from_slice(&seed);
        secret[32..].copy_from_slice(&key(
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        ));
        let kp = SignKeyPair::from_secret_bytes(&secret).unwrap();
        let sig = kp.sign(b"");
        assert_eq!(to_hex(&sig), "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b");
    }

    #[test]
    fn checksum_is_blake2b_128_of_the_concatenation() {
        // BLAKE2b-128 of the empty string and of "abc" (RFC 7693 parameters, 16-byte output).
        assert_eq!(to_hex(&checksum(&[])), "cae66941d9efbd404e4d88758ea67670");
        assert_eq!(
            to_hex(&checksum(&[b"a", b"bc"])),
            to_hex(&checksum(&[b"abc"]))
        );
        assert_eq!(
            to_hex(&checksum(&[b"abc"])),
            "cf4ab791c62b8d2b2109c90275287816"
        );
        let mut data = b"a record".to_vec();
        let sum = checksum(&[&data]);
        data[3] ^= 1;
        assert_ne!(checksum(&[&data]), sum, "one flipped bit changes it");
    }

    #[cfg(any(feature = "kademlia", feature = "mainline"))]
    #[test]
    fn sha1_known_answer() {
        // FIPS 180 "abc", split across parts.
        assert_eq!(
            to_hex(&sha1(&[b"a", b"bc"])),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            to_hex(&sha1(&[])),
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
    }

    #[test]
    fn hex_and_random() {
        let pk = BoxPublicKey([0xab; 32]);
        assert_eq!(BoxPublicKey::from_hex(&pk.to_hex()), Some(pk));
        assert_eq!(
            BoxPublicKey::from_hex(&pk.to_hex().to_uppercase()),
            Some(pk)
        );
        assert_eq!(BoxPublicKey::from_hex("abc"), None);
        assert_eq!(BoxPublicKey::from_hex(&"g".repeat(64)), None);
        for _ in 0..1000 {
            assert!(random_below(10) < 10);
        }
        assert_eq!(random_below(0), 0);
        let mut a = [0u8; 32];
        random_bytes(&mut a);
        assert_ne!(a, [0u8; 32]);
    }
}
