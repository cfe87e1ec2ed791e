//! Salsa20 keystreams many blocks at a time with AVX-512, for the XSalsa20-Poly1305 boxes that
//! carry every CurveCP message.
//!
//! Why this exists: in a bulk transfer each side spends about two thirds of its time in the
//! cipher, and with libsodium 1.0.18's AVX2 Salsa20 (8 blocks at a time, then one block at a
//! time for the rest) the Salsa20 part of a 1088-byte message box (18 keystream blocks: the
//! Poly1305 key, then the message) was 38% of a whole bulk-transfer profile. Here the 64-byte
//! blocks are computed 16 at a time in the lanes of `zmm` registers (4 at a time in `xmm` ones
//! for a short tail), with AVX-512's one-instruction rotate, and written out through a 16×16
//! word transpose: the same keystream, about twice as fast.
//!
//! It is used only when the CPU has AVX-512F and AVX-512VL: every entry point takes an
//! [`Avx512`] token, which only [`Avx512::detect`] makes, after checking the CPU (once, at run
//! time), so no safe caller can reach an AVX-512 instruction on a CPU without it. The output
//! buffers of the block functions are [`Aligned`] (64-byte aligned by type), as the aligned
//! stores need. [`super`] decides whether to use it at all (`MM_CRYPTO_LIBSODIUM=1`, the
//! `simd` feature, an explicit backend) and otherwise calls libsodium. Salsa20 is add-rotate-xor only, so this code is
//! constant-time by construction: no table, no branch on key or data. Tests compare its
//! keystream with libsodium's byte for byte, for every length up to three chunks and for
//! counters that carry into the high word.
//!
//! This module only produces and applies keystream; the tag is `poly1305x.rs`'s or libsodium's.

use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Bytes of keystream produced per chunk (16 blocks).
const CHUNK: usize = 1024;

/// Proof that this CPU has AVX-512F and AVX-512VL: a zero-sized token that only
/// [`Avx512::detect`] makes, and only after checking. Every function here that executes AVX-512
/// takes one, so they are safe to call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Avx512(());

impl Avx512 {
    /// The token, when this CPU has AVX-512F and AVX-512VL (checked once per process).
    pub(super) fn detect() -> Option<Avx512> {
        static HAS: OnceLock<bool> = OnceLock::new();
        let has = *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl")
        });
        has.then_some(Avx512(()))
    }
}

/// Keystream blocks 16 and 17 (bytes 1024..1152, the end of a full 1088-byte CurveCP message
/// box) of up to [`TAIL_NONCES`] consecutive nonces, computed in one pass.
///
/// Why: a full message box needs 18 blocks, one 16-block pass and a second pass for the last
/// two, and the second pass cost nearly as much as the first (17.5% and 14.6% of a bulk
/// sender's profile). Message nonces count up by one per packet, so the tails of the next
/// seven are computed with this one's, and seven boxes in eight take one pass.
///
/// How long keystream lives here: when a nonce's tail is used, the tails of the nonces before
/// it are wiped (going back to one, a replay to be refused, computes it again), so the cache
/// holds the tails of the latest nonce used and of at most seven after it, all derived from
/// the subkey kept next to it anyway. A box that needs no tail (a shorter message: the
/// transfer is over, or the peer only acknowledges) drops the cache, and so does dropping the
/// key (the server drops an idle connection's at its idle timeout); an idle connection keeps
/// none past its next short box.
pub(super) struct TailCache {
    /// The nonce of the first cached tail.
    first: u64,
    /// Bit i set: the tail of nonce `first + i` is cached and not yet used.
    valid: u8,
    ks: Aligned,
}

/// Nonces whose tails one pass computes (two blocks each, 16 lanes).
pub(super) const TAIL_NONCES: u64 = 8;

impl Drop for TailCache {
    fn drop(&mut self) {
        super::wipe(&mut self.ks.0);
    }
}

/// A [`TailCache`] slot (one pointer): empty until a full box is sealed or opened; a clone
/// starts empty.
#[derive(Default)]
pub(super) struct TailSlot(std::cell::Cell<Option<Box<TailCache>>>);

impl Clone for TailSlot {
    fn clone(&self) -> TailSlot {
        TailSlot::default()
    }
}

impl TailSlot {
    /// Whether a cache is held (tests).
    #[cfg(test)]
    pub(super) fn is_held(&self) -> bool {
        let c = self.0.take();
        let held = c.is_some();
        self.0.set(c);
        held
    }

    /// How many tails are cached (tests).
    #[cfg(test)]
    pub(super) fn cached_tails(&self) -> u32 {
        let c = self.0.take();
        let n = c.as_ref().map_or(0, |c| c.valid.count_ones());
        self.0.set(c);
        n
    }
}

/// [`xor_after_poly_key`] for a message box whose nonce `n` counts up per box: full boxes
/// (17 or 18 keystream blocks) take their last blocks from `tail` (filled for the next
/// [`TAIL_NONCES`] nonces when it does not hold this one's); any other length drops the
/// cache and goes the plain way. Same bytes either way.
pub(super) fn xor_after_poly_key_cached(
    cpu: Avx512,
    key: &[u8; 32],
    n: &[u8; 8],
    body: &mut [u8],
    tail: &TailSlot,
    first: impl FnOnce(&[u8; 32], &[u8]) -> bool,
) -> bool {
    let blocks = (32 + body.len()).div_ceil(64);
    if !(17..=18).contains(&blocks) {
        if blocks <= 16 {
            drop(tail.0.take());
        }
        return xor_after_poly_key(cpu, key, n, body, first);
    }
    let st = State::new(key, n);
    let mut ks = Aligned([0u8; CHUNK]);
    keystream(cpu, &st, 0, 16, &mut ks);
    let mut poly = [0u8; 32];
    poly.copy_from_slice(&ks.0[..32]);
    let ok = first(&poly, body);
    super::wipe(&mut poly);
    if !ok {
        super::wipe(&mut ks.0);
        return false;
    }
    let (head, rest) = body.split_at_mut(CHUNK - 32);
    xor(head, &ks.0[32..]);
    super::wipe(&mut ks.0);

    let nonce = u64::from_le_bytes(*n);
    let mut cache = tail.0.take().unwrap_or_else(|| {
        Box::new(TailCache {
            first: 0,
            valid: 0,
            ks: Aligned([0u8; CHUNK]),
        })
    });
    let mut i = nonce.wrapping_sub(cache.first);
    if i >= TAIL_NONCES || cache.valid & (1 << i) == 0 {
        let mut n6 = [0u32; 16];
        let mut n7 = [0u32; 16];
        let mut c8 = [0u32; 16];
        let c9 = [0u32; 16];
        for l in 0..16 {
            let v = nonce.wrapping_add(l as u64 / 2);
            n6[l] = v as u32;
            n7[l] = (v >> 32) as u32;
            c8[l] = 16 + (l as u32 % 2);
        }
        tail_pass(cpu, &st, (&n6, &n7), (&c8, &c9), &mut cache.ks);
        cache.first = nonce;
        cache.valid = u8::MAX;
        i = 0;
    }
    let at = (i * 128) as usize;
    xor(rest, &cache.ks.0[at..at + rest.len()]);
    // The tails of earlier nonces are forgotten (going back to one computes it again); this
    // one's is kept, for a box sealed or opened twice in a row.
    for j in 0..i as usize {
        if cache.valid & (1 << j) != 0 {
            super::wipe(&mut cache.ks.0[j * 128..(j + 1) * 128]);
        }
    }
    cache.valid &= !((1u8 << i) - 1);
    tail.0.set(Some(cache));
    true
}

/// [`blocks16_lanes`] with the state's key and the given lanes.
fn tail_pass(
    _cpu: Avx512,
    st: &State,
    nonces: (&[u32; 16], &[u32; 16]),
    counters: (&[u32; 16], &[u32; 16]),
    out: &mut Aligned,
) {
    // SAFETY: the token proves the CPU has AVX-512F, the feature `blocks16_lanes` is compiled
    // for; its arguments are plain references (the output 64-byte aligned by type).
    unsafe { blocks16_lanes(st, Some(nonces), counters, out) }
}

/// Salsa20-encrypts (or decrypts) `body` in place with `key` and 8-byte nonce `n`, the
/// keystream starting at its byte 32 (block 0's first 32 bytes are the Poly1305 key of an
/// XSalsa20-Poly1305 box). `first` is called with those 32 bytes after they are computed and
/// before `body` is touched; if it returns false nothing is written and this returns false.
pub(super) fn xor_after_poly_key(
    cpu: Avx512,
    key: &[u8; 32],
    n: &[u8; 8],
    body: &mut [u8],
    first: impl FnOnce(&[u8; 32], &[u8]) -> bool,
) -> bool {
    let st = State::new(key, n);
    let mut ks = Aligned([0u8; CHUNK]);
    let total = 32 + body.len();
    let blocks = |from: usize| total.saturating_sub(from).div_ceil(64).min(16);

    // The first chunk: the Poly1305 key, then up to 992 bytes of body. A box longer than
    // one chunk starts with 4 blocks (the `xmm` pass) and continues with a `zmm` one: a
    // 1088-byte message costs two passes either way, and a forged one is refused after the
    // cheap pass.
    let nb = if total > CHUNK { 4 } else { blocks(0) };
    keystream(cpu, &st, 0, nb, &mut ks);
    let mut poly = [0u8; 32];
    poly.copy_from_slice(&ks.0[..32]);
    if !first(&poly, body) {
        super::wipe(&mut poly);
        super::wipe(&mut ks.0);
        return false;
    }
    super::wipe(&mut poly);
    let end = (nb * 64 - 32).min(body.len());
    xor(&mut body[..end], &ks.0[32..32 + end]);

    let mut pos = nb * 64; // keystream offset of the next chunk
    while pos < total {
        let nb = blocks(pos);
        keystream(cpu, &st, (pos / 64) as u64, nb, &mut ks);
        let from = pos - 32;
        let end = (from + nb * 64).min(body.len());
        xor(&mut body[from..end], &ks.0[..end - from]);
        pos += nb * 64;
    }
    super::wipe(&mut ks.0);
    true
}

/// Raw keystream: `out.len()` bytes from block `counter` on (tests compare it with
/// libsodium's).
#[cfg(test)]
pub(super) fn keystream_bytes(
    cpu: Avx512,
    key: &[u8; 32],
    n: &[u8; 8],
    counter: u64,
    out: &mut [u8],
) {
    let st = State::new(key, n);
    let mut ks = Aligned([0u8; CHUNK]);
    let mut block = counter;
    for piece in out.chunks_mut(CHUNK) {
        let nb = piece.len().div_ceil(64);
        keystream(cpu, &st, block, nb, &mut ks);
        piece.copy_from_slice(&ks.0[..piece.len()]);
        block = block.wrapping_add(nb as u64);
    }
}

/// `dst ^= src`, same lengths.
fn xor(dst: &mut [u8], src: &[u8]) {
    debug_assert_eq!(dst.len(), src.len());
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (a, b) in (&mut d).zip(&mut s) {
        let v = u64::from_ne_bytes((&*a).try_into().expect("8 bytes"))
            ^ u64::from_ne_bytes(b.try_into().expect("8 bytes"));
        a.copy_from_slice(&v.to_ne_bytes());
    }
    for (a, b) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *a ^= b;
    }
}

/// A chunk of keystream, 64-byte aligned by its type: the block functions store to it with
/// aligned 64- and 16-byte stores, so they take nothing else.
#[repr(align(64))]
pub(super) struct Aligned([u8; CHUNK]);

/// The sixteen input words of a Salsa20 block, but for the counter (words 8 and 9).
struct State {
    words: [u32; 16],
}

impl State {
    fn new(key: &[u8; 32], n: &[u8; 8]) -> State {
        let le = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let mut w = [0u32; 16];
        // "expand 32-byte k"
        w[0] = 0x6170_7865;
        w[5] = 0x3320_646e;
        w[10] = 0x7962_2d32;
        w[15] = 0x6b20_6574;
        for i in 0..4 {
            w[1 + i] = le(&key[4 * i..4 * i + 4]);
            w[11 + i] = le(&key[16 + 4 * i..16 + 4 * i + 4]);
        }
        w[6] = le(&n[..4]);
        w[7] = le(&n[4..]);
        State { words: w }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        for w in self.words.iter_mut() {
            // SAFETY: a plain aligned write to a live u32; volatile so it is not elided.
            unsafe { std::ptr::write_volatile(w, 0) };
        }
    }
}

/// The 20 rounds (10 double rounds) of Salsa20 on `$x`, an array of 16 vectors whose lanes are
/// independent blocks, with `$s::<R>(a, b, c)` computing `a ^ rotl(b + c, R)`.
macro_rules! salsa20_rounds {
    ($x:ident, $s:ident) => {
        for _ in 0..10 {
            // Column round.
            $x[4] = $s::<7>($x[4], $x[0], $x[12]);
            $x[8] = $s::<9>($x[8], $x[4], $x[0]);
            $x[12] = $s::<13>($x[12], $x[8], $x[4]);
            $x[0] = $s::<18>($x[0], $x[12], $x[8]);
            $x[9] = $s::<7>($x[9], $x[5], $x[1]);
            $x[13] = $s::<9>($x[13], $x[9], $x[5]);
            $x[1] = $s::<13>($x[1], $x[13], $x[9]);
            $x[5] = $s::<18>($x[5], $x[1], $x[13]);
            $x[14] = $s::<7>($x[14], $x[10], $x[6]);
            $x[2] = $s::<9>($x[2], $x[14], $x[10]);
            $x[6] = $s::<13>($x[6], $x[2], $x[14]);
            $x[10] = $s::<18>($x[10], $x[6], $x[2]);
            $x[3] = $s::<7>($x[3], $x[15], $x[11]);
            $x[7] = $s::<9>($x[7], $x[3], $x[15]);
            $x[11] = $s::<13>($x[11], $x[7], $x[3]);
            $x[15] = $s::<18>($x[15], $x[11], $x[7]);
            // Row round.
            $x[1] = $s::<7>($x[1], $x[0], $x[3]);
            $x[2] = $s::<9>($x[2], $x[1], $x[0]);
            $x[3] = $s::<13>($x[3], $x[2], $x[1]);
            $x[0] = $s::<18>($x[0], $x[3], $x[2]);
            $x[6] = $s::<7>($x[6], $x[5], $x[4]);
            $x[7] = $s::<9>($x[7], $x[6], $x[5]);
            $x[4] = $s::<13>($x[4], $x[7], $x[6]);
            $x[5] = $s::<18>($x[5], $x[4], $x[7]);
            $x[11] = $s::<7>($x[11], $x[10], $x[9]);
            $x[8] = $s::<9>($x[8], $x[11], $x[10]);
            $x[9] = $s::<13>($x[9], $x[8], $x[11]);
            $x[10] = $s::<18>($x[10], $x[9], $x[8]);
            $x[12] = $s::<7>($x[12], $x[15], $x[14]);
            $x[13] = $s::<9>($x[13], $x[12], $x[15]);
            $x[14] = $s::<13>($x[14], $x[13], $x[12]);
            $x[15] = $s::<18>($x[15], $x[14], $x[13]);
        }
    };
}

/// Writes `nb` (1..=16) keystream blocks, from block `counter` on, to `out[..nb * 64]`.
#[inline]
fn keystream(_cpu: Avx512, st: &State, counter: u64, nb: usize, out: &mut Aligned) {
    // SAFETY: the token proves the CPU has AVX-512F and AVX-512VL, the features
    // `keystream_avx512` is compiled for; its arguments are plain references.
    unsafe { keystream_avx512(st, counter, nb, out) }
}

/// [`keystream`] compiled for AVX-512: calling it needs `unsafe` and an [`Avx512`] token's
/// proof that the CPU has the features.
#[target_feature(enable = "avx512f,avx512vl")]
fn keystream_avx512(st: &State, counter: u64, nb: usize, out: &mut Aligned) {
    debug_assert!((1..=16).contains(&nb));
    if nb <= 4 {
        blocks4(st, counter, out)
    } else {
        blocks16(st, counter, out)
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
fn s16<const R: i32>(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    _mm512_xor_si512(a, _mm512_rol_epi32::<R>(_mm512_add_epi32(b, c)))
}

#[inline]
#[target_feature(enable = "avx512f,avx512vl")]
fn s4<const R: i32>(a: __m128i, b: __m128i, c: __m128i) -> __m128i {
    _mm_xor_si128(a, _mm_rol_epi32::<R>(_mm_add_epi32(b, c)))
}

/// Per-lane counter words (low, high) for `lanes` blocks from `counter` on.
fn counters<const L: usize>(counter: u64) -> ([u32; L], [u32; L]) {
    let mut lo = [0u32; L];
    let mut hi = [0u32; L];
    for l in 0..L {
        let c = counter.wrapping_add(l as u64);
        lo[l] = c as u32;
        hi[l] = (c >> 32) as u32;
    }
    (lo, hi)
}

/// 16 blocks from `counter` on into `out`, one block per lane of 16 `zmm` registers (register
/// `i` holds word `i` of every block), then a 16×16 transpose into block order.
#[target_feature(enable = "avx512f")]
fn blocks16(st: &State, counter: u64, out: &mut Aligned) {
    let (lo, hi) = counters::<16>(counter);
    blocks16_lanes(st, None, (&lo, &hi), out)
}

/// 16 blocks into `out`, lane L's block being that of nonce `nonces.0[L], nonces.1[L]`
/// (words 6 and 7; the state's own nonce when `None`) and counter `counters.0[L],
/// counters.1[L]` (words 8 and 9).
#[target_feature(enable = "avx512f")]
fn blocks16_lanes(
    st: &State,
    nonces: Option<(&[u32; 16], &[u32; 16])>,
    counters: (&[u32; 16], &[u32; 16]),
    out: &mut Aligned,
) {
    let mut init = [_mm512_setzero_si512(); 16];
    for (i, v) in init.iter_mut().enumerate() {
        *v = _mm512_set1_epi32(st.words[i] as i32);
    }
    // SAFETY: each array is 64 readable bytes; loadu has no alignment requirement.
    unsafe {
        if let Some((n6, n7)) = nonces {
            init[6] = _mm512_loadu_si512(n6.as_ptr().cast());
            init[7] = _mm512_loadu_si512(n7.as_ptr().cast());
        }
        init[8] = _mm512_loadu_si512(counters.0.as_ptr().cast());
        init[9] = _mm512_loadu_si512(counters.1.as_ptr().cast());
    }
    let mut x = init;
    salsa20_rounds!(x, s16);
    for i in 0..16 {
        x[i] = _mm512_add_epi32(x[i], init[i]);
    }

    // Transpose: 32-bit then 64-bit interleaves make t[4i + j]'s 128-bit lane k hold words
    // 4i..4i+4 of block 4k + j; two rounds of 128-bit lane shuffles then gather the four
    // quarters of each block.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let dst = out.0.as_mut_ptr().cast::<__m512i>();
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        let p = _mm512_shuffle_i32x4::<0x44>(a, b); // a0 a1 b0 b1
        let q = _mm512_shuffle_i32x4::<0x44>(c, d); // c0 c1 d0 d1
        let r = _mm512_shuffle_i32x4::<0xEE>(a, b); // a2 a3 b2 b3
        let s = _mm512_shuffle_i32x4::<0xEE>(c, d); // c2 c3 d2 d3
        let blocks = [
            _mm512_shuffle_i32x4::<0x88>(p, q), // block j
            _mm512_shuffle_i32x4::<0xDD>(p, q), // block 4 + j
            _mm512_shuffle_i32x4::<0x88>(r, s), // block 8 + j
            _mm512_shuffle_i32x4::<0xDD>(r, s), // block 12 + j
        ];
        for (k, v) in blocks.into_iter().enumerate() {
            // SAFETY: block 4k + j < 16 is a 64-byte slot inside `out` (1024 bytes), 64-byte
            // aligned because `Aligned` is.
            unsafe { _mm512_store_si512(dst.add(4 * k + j), v) };
        }
    }
}

/// 4 blocks from `counter` on into `out[..256]`, as [`blocks16`] with `xmm` registers.
#[target_feature(enable = "avx512f,avx512vl")]
fn blocks4(st: &State, counter: u64, out: &mut Aligned) {
    let (lo, hi) = counters::<4>(counter);
    let mut init = [_mm_setzero_si128(); 16];
    for (i, v) in init.iter_mut().enumerate() {
        *v = _mm_set1_epi32(st.words[i] as i32);
    }
    // SAFETY: `lo` and `hi` are 16 readable bytes each; loadu has no alignment requirement.
    unsafe {
        init[8] = _mm_loadu_si128(lo.as_ptr().cast());
        init[9] = _mm_loadu_si128(hi.as_ptr().cast());
    }
    let mut x = init;
    salsa20_rounds!(x, s4);
    for i in 0..16 {
        x[i] = _mm_add_epi32(x[i], init[i]);
    }
    let dst = out.0.as_mut_ptr().cast::<__m128i>();
    for i in 0..4 {
        let t0 = _mm_unpacklo_epi32(x[4 * i], x[4 * i + 1]);
        let t1 = _mm_unpackhi_epi32(x[4 * i], x[4 * i + 1]);
        let t2 = _mm_unpacklo_epi32(x[4 * i + 2], x[4 * i + 3]);
        let t3 = _mm_unpackhi_epi32(x[4 * i + 2], x[4 * i + 3]);
        let quarters = [
            _mm_unpacklo_epi64(t0, t2), // words 4i.. of block 0
            _mm_unpackhi_epi64(t0, t2), // block 1
            _mm_unpacklo_epi64(t1, t3), // block 2
            _mm_unpackhi_epi64(t1, t3), // block 3
        ];
        for (b, v) in quarters.into_iter().enumerate() {
            // SAFETY: quarter i of block b < 4 is a 16-byte slot inside `out`'s first 256
            // bytes, 16-byte aligned because `Aligned` is 64-byte aligned.
            unsafe { _mm_store_si128(dst.add(4 * b + i), v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sodiumoxide::crypto::stream::salsa20 as nacl_salsa20;

    /// The token, or `None` after saying so (a failure under `MM_REQUIRE_AVX512=1`).
    fn cpu() -> Option<Avx512> {
        super::super::init();
        let cpu = Avx512::detect();
        if cpu.is_none() {
            super::super::cannot_run("the AVX-512 Salsa20 tests (no AVX-512F/VL on this CPU)");
        }
        cpu
    }

    /// The keystream is libsodium's, byte for byte: every length up to three chunks and a
    /// block, from counters at 0, mid-range and just below the carry into word 9.
    #[test]
    fn keystream_is_libsodiums() {
        let Some(cpu) = cpu() else { return };
        let key: [u8; 32] = std::array::from_fn(|i| (i * 37 + 5) as u8);
        let n = [0xa5, 1, 2, 3, 4, 5, 6, 0xfe];
        for counter in [0u64, 1, 77, 0xffff_fff0, 0xffff_ffff, u64::MAX - 3] {
            for len in (0..=3 * CHUNK + 64)
                .step_by(7)
                .chain([64, 256, 257, 1024, 1088])
            {
                let mut ours = vec![0u8; len];
                keystream_bytes(cpu, &key, &n, counter, &mut ours);
                let mut theirs = vec![0u8; len];
                nacl_salsa20::stream_xor_ic_inplace(
                    &mut theirs,
                    &nacl_salsa20::Nonce(n),
                    counter,
                    &nacl_salsa20::Key(key),
                );
                assert!(ours == theirs, "counter {counter:#x}, {len} bytes");
            }
        }
    }

    /// Refusing at the Poly1305 key leaves the body untouched; the body is encrypted from
    /// keystream byte 32 on.
    #[test]
    fn xor_after_poly_key_offsets_and_refusal() {
        let Some(cpu) = cpu() else { return };
        let key = [9u8; 32];
        let n = [1u8; 8];
        for len in [0, 1, 31, 32, 33, 991, 992, 993, 1088, 2100] {
            let mut stream = vec![0u8; 32 + len];
            keystream_bytes(cpu, &key, &n, 0, &mut stream);
            let msg: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut body = msg.clone();
            assert!(!xor_after_poly_key(cpu, &key, &n, &mut body, |_, _| false));
            assert_eq!(body, msg, "{len} bytes: touched on refusal");
            let mut seen = [0u8; 32];
            assert!(xor_after_poly_key(cpu, &key, &n, &mut body, |k, c| {
                assert_eq!(c, &msg[..], "first sees the body before it changes");
                seen = *k;
                true
            }));
            assert_eq!(seen[..], stream[..32]);
            let want: Vec<u8> = msg.iter().zip(&stream[32..]).map(|(a, b)| a ^ b).collect();
            assert_eq!(body, want, "{len} bytes");
        }
    }

    /// The cached tails give the same bytes as the plain keystream whatever order the nonces
    /// come in (counting up, repeated, going back, jumping, wrapping past u64::MAX), a refused
    /// box leaves the cache alone, and a box without a tail drops it.
    #[test]
    fn tail_cache_gives_the_plain_keystream() {
        let Some(cpu) = cpu() else { return };
        let key: [u8; 32] = std::array::from_fn(|i| (i * 11 + 3) as u8);
        let slot = TailSlot::default();
        let mut nonces: Vec<u64> = (100..140).collect();
        nonces.extend([
            139,
            120,
            7,
            8,
            9,
            1000,
            999,
            1001,
            u64::MAX - 2,
            u64::MAX,
            0,
            1,
            2,
        ]);
        nonces.extend((0..50).map(|i| (i * 37) % 23));
        for (k, &nonce) in nonces.iter().enumerate() {
            let n = nonce.to_le_bytes();
            for len in [1088usize, 1072, 1040, 993] {
                let msg: Vec<u8> = (0..len).map(|i| (i + k) as u8).collect();
                let mut stream = vec![0u8; 32 + len];
                keystream_bytes(cpu, &key, &n, 0, &mut stream);
                let mut body = msg.clone();
                if k % 5 == 0 {
                    assert!(!xor_after_poly_key_cached(
                        cpu,
                        &key,
                        &n,
                        &mut body,
                        &slot,
                        |_, _| false
                    ));
                    assert_eq!(body, msg, "refused: untouched");
                }
                let mut seen = [0u8; 32];
                assert!(xor_after_poly_key_cached(
                    cpu,
                    &key,
                    &n,
                    &mut body,
                    &slot,
                    |p, c| {
                        assert_eq!(c, &msg[..]);
                        seen = *p;
                        true
                    }
                ));
                assert_eq!(seen[..], stream[..32], "nonce {nonce} poly key");
                let want: Vec<u8> = msg.iter().zip(&stream[32..]).map(|(a, b)| a ^ b).collect();
                assert!(body == want, "nonce {nonce}, {len} bytes");
            }
        }
        assert!(slot.is_held());
        // A box of 16 blocks or fewer drops the cache; a longer one than 18 leaves it alone.
        let mut long = vec![0u8; 2000];
        assert!(xor_after_poly_key_cached(
            cpu,
            &key,
            &[1; 8],
            &mut long,
            &slot,
            |_, _| true
        ));
        assert!(slot.is_held());
        let mut short = vec![0u8; 992];
        assert!(xor_after_poly_key_cached(
            cpu,
            &key,
            &[1; 8],
            &mut short,
            &slot,
            |_, _| true
        ));
        assert!(!slot.is_held());
    }

    /// Tails before the latest nonce used are wiped: eight consecutive full boxes leave eight,
    /// seven, ... one tails, and going back (those tails gone) still gets the right keystream.
    #[test]
    fn used_tails_are_wiped() {
        let Some(cpu) = cpu() else { return };
        let key = [0x42u8; 32];
        let slot = TailSlot::default();
        for (k, nonce) in (500u64..508).chain([503, 507, 508]).enumerate() {
            let n = nonce.to_le_bytes();
            let mut stream = vec![0u8; 32 + 1088];
            keystream_bytes(cpu, &key, &n, 0, &mut stream);
            let mut body = vec![0u8; 1088];
            assert!(xor_after_poly_key_cached(
                cpu,
                &key,
                &n,
                &mut body,
                &slot,
                |_, _| true
            ));
            assert!(body[..] == stream[32..], "nonce {nonce}");
            let left = match k {
                0..=7 => 8 - k as u32,
                // 503 again: recomputed from 503 on.
                8 => 8,
                // 507: 503..506 wiped, 507..510 kept.
                9 => 4,
                // 508: cached by the 503 pass; 507 wiped.
                _ => 3,
            };
            assert_eq!(slot.cached_tails(), left, "after nonce {nonce}");
        }
    }
}
