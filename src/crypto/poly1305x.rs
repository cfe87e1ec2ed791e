//! Poly1305 eight blocks at a time with AVX-512 IFMA, for the tags of long message boxes.
//!
//! Why this exists: once the Salsa20 keystream was vectorised (`salsa20x.rs`), libsodium
//! 1.0.18's Poly1305 (SSE2, about 0.8 cycles per byte here) became the largest single cost of a
//! bulk transfer.
//!
//! How: numbers mod 2¹³⁰ − 5 are three limbs of 44, 44 and 42 bits; AVX-512 IFMA's 52-bit
//! multiply-adds (`vpmadd52luq`/`vpmadd52huq`) give the low and high halves of each limb
//! product, nine products per multiplication. The accumulator is split across eight 64-bit
//! lanes, each lane taking every eighth 16-byte block and multiplying by r⁸ (Horner's rule in
//! r⁸); at the end lane j is multiplied by r^(8−j) and the lanes are summed, which is the value
//! of the sequential `h = (h + c)·r` over those blocks. When the number of whole blocks is not
//! a multiple of eight the first group is topped up in front with zero blocks (no 2¹²⁸ bit),
//! which add nothing. A trailing partial block, and the powers of r, use the same limbs in
//! scalar 128-bit arithmetic. Nothing branches on secret values: the final reduction selects
//! with an arithmetic mask that passes through `core::hint::black_box`, so the optimiser cannot
//! see that it is all zeros or all ones and turn the select into a branch.
//!
//! Limb bounds (the invariants that make each carry pass enough; `debug_assert!`ed in debug
//! builds, where the tests run):
//!
//! - [`mul`] takes limbs below 2⁴⁶ (an accumulator plus a block) times limbs below 2⁴⁵ (r and
//!   its powers): each of the three products summed per limb is below 2⁴⁶·20·2⁴⁵ < 2⁹⁶, so the
//!   sums fit `u128`; it returns limb 0 below 2⁴⁴, limb 1 below 2⁴⁴ + 2¹⁰ (the last carry out of
//!   limb 0, at most (2⁹³ / 2⁴²)·5 / 2⁴⁴ < 2¹⁰) and limb 2 below 2⁴².
//! - [`mul8`] reads 52 bits of each lane (IFMA): its inputs stay below 2⁴⁶ (an accumulator
//!   limb below 2⁴⁵ plus a block limb below 2⁴⁴), its multipliers (20 times a limb below 2⁴⁵)
//!   below 2⁵⁰; its column sums are below 2⁵⁸, and two carry passes leave every limb below
//!   2⁴⁵.
//! - [`carry`] takes limbs below 2⁶³ and leaves limbs 0 and 2 within their widths, limb 1 below
//!   2⁴⁴ + 2²⁰; [`finish`] carries twice more, so every limb is within its width before the
//!   select.
//!
//! Key material: r and the accumulator are overwritten with volatile writes (and a compiler
//! fence), and the array of powers r¹ … r⁸ with `sodium_memzero`, before [`tag`] returns, as
//! libsodium wipes its state. The intermediate powers and the eight lane
//! accumulators and the lane multipliers of the vector loop live in registers: a volatile
//! write to them would force them into memory for the whole loop (measured: about a tenth of a
//! full box) only to wipe that copy. Register contents and spills the compiler makes on its
//! own are out of reach of any such wipe (libsodium's too).
//!
//! Used for messages of at least [`MIN_LEN`] bytes; shorter ones stay with libsodium. Every
//! entry point takes an [`Ifma`] token, which only [`Ifma::detect`] makes after checking the
//! CPU. Tests compare every tag with libsodium's.

use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Messages shorter than this keep libsodium's Poly1305 (below one group of eight blocks
/// there is nothing to vectorise). Sealing a whole box here, against libsodium throughout:
/// 64 bytes 246 against 327 ns, 240 bytes 368 against 805 ns, 1088 bytes 606 against 1126 ns
/// (with this module's Salsa20 too; one run).
pub(super) const MIN_LEN: usize = 128;

const M44: u64 = (1 << 44) - 1;
const M42: u64 = (1 << 42) - 1;

/// A number mod 2¹³⁰ − 5 in limbs of 44, 44 and 42 bits (each a little above its width
/// between steps).
type Limbs = [u64; 3];

/// Proof that this CPU has AVX-512F and AVX-512 IFMA: a zero-sized token that only
/// [`Ifma::detect`] makes, and only after checking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ifma(());

impl Ifma {
    /// The token, when this CPU has AVX-512F and AVX-512 IFMA (checked once per process).
    pub(super) fn detect() -> Option<Ifma> {
        static HAS: OnceLock<bool> = OnceLock::new();
        let has = *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512ifma")
        });
        has.then_some(Ifma(()))
    }
}

/// Overwrites `x` with `zero` through a volatile write the optimiser cannot drop as a dead
/// store, then a compiler fence so it is not moved past what follows.
#[inline(always)]
fn wipe_value<T>(x: &mut T, zero: T) {
    // SAFETY: `x` is an exclusive, aligned reference to a live `T`; `T` here is plain data
    // (integers or vectors) with nothing to drop.
    unsafe { std::ptr::write_volatile(x, zero) };
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// The Poly1305 tag of `msg` under the one-time `key` (r, then s).
pub(super) fn tag(_cpu: Ifma, key: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    let mut r = clamp_r(key[..16].try_into().expect("16 bytes"));
    let whole = msg.len() / 16 * 16;
    let mut h: Limbs = [0; 3];
    let mut done = 0;
    if whole >= 128 {
        // SAFETY: the token proves the CPU has AVX-512F and AVX-512 IFMA.
        h = unsafe { whole_blocks(&r, &msg[..whole]) };
        done = whole;
    }
    let mut rest = msg[done..].chunks_exact(16);
    for b in &mut rest {
        h = mul(
            &add(&h, &block(b.try_into().expect("16 bytes"), 1 << 40)),
            &r,
        );
    }
    let last = rest.remainder();
    if !last.is_empty() {
        let mut b = [0u8; 16];
        b[..last.len()].copy_from_slice(last);
        b[last.len()] = 1;
        h = mul(&add(&h, &block(&b, 0)), &r);
    }
    let t = finish(&mut h, key[16..].try_into().expect("16 bytes"));
    wipe_value(&mut r, [0; 3]);
    wipe_value(&mut h, [0; 3]);
    t
}

/// r with Poly1305's clamping, in limbs.
fn clamp_r(r: &[u8; 16]) -> Limbs {
    let lo = u64::from_le_bytes(r[..8].try_into().expect("8 bytes")) & 0x0fff_fffc_0fff_ffff;
    let hi = u64::from_le_bytes(r[8..].try_into().expect("8 bytes")) & 0x0fff_fffc_0fff_fffc;
    [lo & M44, ((lo >> 44) | (hi << 20)) & M44, hi >> 24]
}

/// A 16-byte block in limbs, plus `hibit` (2¹²⁸ for a whole block: 2⁴⁰ in the top limb).
fn block(b: &[u8; 16], hibit: u64) -> Limbs {
    let lo = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let hi = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
    [
        lo & M44,
        ((lo >> 44) | (hi << 20)) & M44,
        (hi >> 24) | hibit,
    ]
}

fn add(a: &Limbs, b: &Limbs) -> Limbs {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

/// a·b mod 2¹³⁰ − 5, partly reduced (limbs below their widths but the second, which may be
/// a few units over 2⁴⁴). 2¹³² ≡ 20, so the products past limb 2 fold back times 20.
fn mul(a: &Limbs, b: &Limbs) -> Limbs {
    debug_assert!(a.iter().all(|&x| x < 1 << 46), "mul: a limb over 2^46");
    debug_assert!(b.iter().all(|&x| x < 1 << 45), "mul: r limb over 2^45");
    let w = |x: u64| x as u128;
    let (s1, s2) = (w(b[1] * 20), w(b[2] * 20));
    let d0 = w(a[0]) * w(b[0]) + w(a[1]) * s2 + w(a[2]) * s1;
    let d1 = w(a[0]) * w(b[1]) + w(a[1]) * w(b[0]) + w(a[2]) * s2;
    let d2 = w(a[0]) * w(b[2]) + w(a[1]) * w(b[1]) + w(a[2]) * w(b[0]);
    let mut h = [0u64; 3];
    let mut c = d0 >> 44;
    h[0] = (d0 as u64) & M44;
    let d1 = d1 + c;
    c = d1 >> 44;
    h[1] = (d1 as u64) & M44;
    let d2 = d2 + c;
    c = d2 >> 42;
    h[2] = (d2 as u64) & M42;
    let h0 = h[0] as u128 + c * 5;
    h[0] = (h0 as u64) & M44;
    h[1] += (h0 >> 44) as u64;
    debug_assert!(h[0] <= M44 && h[1] < (1 << 44) + (1 << 10) && h[2] <= M42);
    h
}

/// One carry pass: limb 0 into 1, 1 into 2, 2 folded into 0 (times 5, as 2¹³⁰ ≡ 5), and 0
/// into 1 again. From limbs below 2⁶³ it leaves them within their widths but limb 1, which may
/// be a few units over 2⁴⁴.
fn carry(h: &mut Limbs) {
    debug_assert!(h.iter().all(|&x| x < 1 << 63), "carry: a limb over 2^63");
    let c = h[0] >> 44;
    h[0] &= M44;
    h[1] += c;
    let c = h[1] >> 44;
    h[1] &= M44;
    h[2] += c;
    let c = h[2] >> 42;
    h[2] &= M42;
    h[0] += c * 5;
    let c = h[0] >> 44;
    h[0] &= M44;
    h[1] += c;
    debug_assert!(h[0] <= M44 && h[1] < (1 << 44) + (1 << 20) && h[2] <= M42);
}

/// h fully reduced mod 2¹³⁰ − 5, plus s, mod 2¹²⁸: the tag. `h` is left reduced (the caller
/// wipes it).
fn finish(h: &mut Limbs, s: &[u8; 16]) -> [u8; 16] {
    carry(h);
    carry(h);
    carry(h);
    let c = h[1] >> 44;
    h[1] &= M44;
    h[2] += c;
    // Every limb within its width now, but h[2] may reach 2⁴² when h ≥ 2¹³⁰ (then g is taken).
    // g = h + 5 − 2¹³⁰; take g when h + 5 reaches 2¹³⁰ (h ≥ p).
    let g0 = h[0] + 5;
    let g1 = h[1] + (g0 >> 44);
    let g2 = h[2] + (g1 >> 44);
    debug_assert!(h[0] <= M44 && h[1] <= M44 && h[2] <= M42 + 1);
    // All ones when g ≥ 2¹³⁰. `black_box` hides that it can only be 0 or all ones, so the
    // selects below stay arithmetic (no branch on this secret bit) whatever the optimiser does.
    let take_g = std::hint::black_box(((g2 >> 42) & 1).wrapping_neg());
    let h0 = (h[0] & !take_g) | (g0 & M44 & take_g);
    let h1 = (h[1] & !take_g) | (g1 & M44 & take_g);
    let h2 = (h[2] & !take_g) | (g2 & M42 & take_g);
    let v = h0 as u128 | (h1 as u128) << 44 | (h2 as u128) << 88;
    h[0] = h0;
    h[1] = h1;
    h[2] = h2;
    let t = v.wrapping_add(u128::from_le_bytes(*s));
    t.to_le_bytes()
}

/// r⁸ … r¹ limb-major: `[i][j]` is limb i of r^(8 − j), lane j's multiplier at the end.
fn powers(r: &Limbs) -> [[u64; 8]; 3] {
    let r2 = mul(r, r);
    let r3 = mul(&r2, r);
    let r4 = mul(&r2, &r2);
    let p = [
        mul(&r4, &r4),
        mul(&r4, &r3),
        mul(&r4, &r2),
        mul(&r4, r),
        r4,
        r3,
        r2,
        *r,
    ];
    // The intermediate powers stay in registers (the caller wipes the array it gets).
    std::array::from_fn(|i| std::array::from_fn(|j| p[j][i]))
}

/// The limbs of eight 16-byte blocks (128 bytes at `p`), block j in lane j, with `hibit`
/// added to the top limb.
///
/// # Safety
/// The CPU must have AVX-512F; `p` must point to 128 readable bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load8(p: *const u8, hibit: __m512i) -> [__m512i; 3] {
    // SAFETY: `p` has 128 readable bytes (the caller's promise); loadu needs no alignment.
    let (a, b) = unsafe {
        (
            _mm512_loadu_si512(p.cast()),
            _mm512_loadu_si512(p.add(64).cast()),
        )
    };
    let lo = _mm512_permutex2var_epi64(a, _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0), b);
    let hi = _mm512_permutex2var_epi64(a, _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1), b);
    let m44 = _mm512_set1_epi64(M44 as i64);
    [
        _mm512_and_si512(lo, m44),
        _mm512_and_si512(
            _mm512_or_si512(_mm512_srli_epi64::<44>(lo), _mm512_slli_epi64::<20>(hi)),
            m44,
        ),
        _mm512_or_si512(_mm512_srli_epi64::<24>(hi), hibit),
    ]
}

/// Lane vectors of a multiplier: its limbs, and 20 times limbs 1 and 2.
struct Mult {
    r: [__m512i; 3],
    s1: __m512i,
    s2: __m512i,
}

impl Mult {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new(r: [__m512i; 3]) -> Mult {
        let times20 = |x| _mm512_add_epi64(_mm512_slli_epi64::<4>(x), _mm512_slli_epi64::<2>(x));
        Mult {
            s1: times20(r[1]),
            s2: times20(r[2]),
            r,
        }
    }
}

/// a·b mod 2¹³⁰ − 5 lane by lane, partly reduced as [`mul`]. Each limb product is below 2⁹⁴:
/// its low 52 bits land in the limb's sum, its high half 2⁵² up, that is 2⁸ times the next
/// limb's weight (past limb 2, 2⁸·20 times limb 0's).
#[inline]
#[target_feature(enable = "avx512f,avx512ifma")]
fn mul8(a: &[__m512i; 3], b: &Mult) -> [__m512i; 3] {
    let z = _mm512_setzero_si512();
    let lo = |acc, x, y| _mm512_madd52lo_epu64(acc, x, y);
    let hi = |acc, x, y| _mm512_madd52hi_epu64(acc, x, y);
    let l0 = lo(lo(lo(z, a[0], b.r[0]), a[1], b.s2), a[2], b.s1);
    let h0 = hi(hi(hi(z, a[0], b.r[0]), a[1], b.s2), a[2], b.s1);
    let l1 = lo(lo(lo(z, a[0], b.r[1]), a[1], b.r[0]), a[2], b.s2);
    let h1 = hi(hi(hi(z, a[0], b.r[1]), a[1], b.r[0]), a[2], b.s2);
    let l2 = lo(lo(lo(z, a[0], b.r[2]), a[1], b.r[1]), a[2], b.r[0]);
    let h2 = hi(hi(hi(z, a[0], b.r[2]), a[1], b.r[1]), a[2], b.r[0]);
    let add = |x, y| _mm512_add_epi64(x, y);
    // h2·2⁸·20 = h2·5120 = h2·2¹² + h2·2¹⁰.
    let t0 = add(
        l0,
        add(_mm512_slli_epi64::<12>(h2), _mm512_slli_epi64::<10>(h2)),
    );
    let t1 = add(l1, _mm512_slli_epi64::<8>(h0));
    let t2 = add(l2, _mm512_slli_epi64::<8>(h1));
    // Carry: sums are below 2⁵⁸; one pass over all limbs at once, then a second, leaves each
    // a few units above its width at most.
    let pass = |t: [__m512i; 3]| {
        let m44 = _mm512_set1_epi64(M44 as i64);
        let m42 = _mm512_set1_epi64(M42 as i64);
        let c0 = _mm512_srli_epi64::<44>(t[0]);
        let c1 = _mm512_srli_epi64::<44>(t[1]);
        let c2 = _mm512_srli_epi64::<42>(t[2]);
        let c2x5 = add(c2, _mm512_slli_epi64::<2>(c2));
        [
            add(_mm512_and_si512(t[0], m44), c2x5),
            add(_mm512_and_si512(t[1], m44), c0),
            add(_mm512_and_si512(t[2], m42), c1),
        ]
    };
    pass(pass([t0, t1, t2]))
}

/// The Poly1305 accumulator after `msg` (whole blocks, at least eight), from zero.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512 IFMA.
#[target_feature(enable = "avx512f,avx512ifma")]
unsafe fn whole_blocks(r: &Limbs, msg: &[u8]) -> Limbs {
    debug_assert!(msg.len() >= 128 && msg.len().is_multiple_of(16));
    let mut p = powers(r);
    let r8 = Mult::new(std::array::from_fn(|i| _mm512_set1_epi64(p[i][0] as i64)));
    let hibit = _mm512_set1_epi64(1 << 40);

    let head = (msg.len() / 16) % 8;
    let mut acc = if head == 0 {
        // SAFETY: `msg` has at least 128 bytes.
        unsafe { load8(msg.as_ptr(), hibit) }
    } else {
        let mut first = [0u8; 128];
        first[128 - 16 * head..].copy_from_slice(&msg[..16 * head]);
        let bits: [i64; 8] = std::array::from_fn(|j| if j >= 8 - head { 1 << 40 } else { 0 });
        // SAFETY: `first` is 128 bytes, `bits` 64.
        unsafe { load8(first.as_ptr(), _mm512_loadu_si512(bits.as_ptr().cast())) }
    };
    let from = if head == 0 { 128 } else { 16 * head };
    for group in msg[from..].chunks_exact(128) {
        let prod = mul8(&acc, &r8);
        // SAFETY: each group is 128 readable bytes of `msg`.
        let m = unsafe { load8(group.as_ptr(), hibit) };
        for i in 0..3 {
            acc[i] = _mm512_add_epi64(prod[i], m[i]);
        }
    }
    // Lane j times r^(8 - j), then the lanes summed.
    // SAFETY: each `p[i]` is 8 u64s, 64 readable bytes.
    let f = Mult::new(std::array::from_fn(|i| unsafe {
        _mm512_loadu_si512(p[i].as_ptr().cast())
    }));
    debug_assert!(
        lanes_below(&acc, 1 << 46),
        "whole_blocks: a lane limb over 2^46"
    );
    let last = mul8(&acc, &f);
    debug_assert!(
        lanes_below(&last, 1 << 45),
        "whole_blocks: a lane limb over 2^45"
    );
    let mut h: Limbs = std::array::from_fn(|i| _mm512_reduce_add_epi64(last[i]) as u64);
    // Each lane's limb is below 2⁴⁵: the sums stay far below 2⁶⁴; one carry pass.
    carry(&mut h);
    // Wipe the powers of r (in memory: the loads above read them), with `sodium_memzero` (a
    // volatile write of the whole array cost about 30 ns a box). The lane vectors live in
    // registers; a volatile write to them would only force them into memory for the whole
    // loop (it cost about a tenth of a full box) and wipe that copy.
    // SAFETY: `p` is 24 initialised u64s, 192 bytes any of whose bit patterns is valid; the
    // byte view is its only use until it goes out of scope.
    super::wipe(unsafe {
        std::slice::from_raw_parts_mut(p.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(&p))
    });
    h
}

/// Whether every lane of every limb is below `bound` (debug checks of the limb bounds).
#[target_feature(enable = "avx512f")]
fn lanes_below(v: &[__m512i; 3], bound: u64) -> bool {
    v.iter().all(|x| {
        let mut lanes = [0u64; 8];
        // SAFETY: `lanes` is 64 writable bytes; storeu needs no alignment.
        unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), *x) };
        lanes.iter().all(|&l| l < bound)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sodiumoxide::crypto::onetimeauth::poly1305 as nacl_poly1305;

    fn libsodium(key: &[u8; 32], msg: &[u8]) -> [u8; 16] {
        nacl_poly1305::authenticate(msg, &nacl_poly1305::Key(*key)).0
    }

    /// The token, or `None` after saying so (a failure under `MM_REQUIRE_AVX512=1`).
    fn cpu() -> Option<Ifma> {
        super::super::init();
        let cpu = Ifma::detect();
        if cpu.is_none() {
            super::super::cannot_run(
                "the AVX-512 IFMA Poly1305 tests (no AVX-512F/IFMA on this CPU)",
            );
        }
        cpu
    }

    /// RFC 8439 section 2.5.2's example (34 bytes: the scalar path alone).
    #[test]
    fn rfc8439_vector() {
        let Some(cpu) = cpu() else { return };
        let key: [u8; 32] = [
            0x85, 0xd6, 0xbe, 0x78, 0x57, 0x55, 0x6d, 0x33, 0x7f, 0x44, 0x52, 0xfe, 0x42, 0xd5,
            0x06, 0xa8, 0x01, 0x03, 0x80, 0x8a, 0xfb, 0x0d, 0xb2, 0xfd, 0x4a, 0xbf, 0xf6, 0xaf,
            0x41, 0x49, 0xf5, 0x1b,
        ];
        let want = [
            0xa8, 0x06, 0x1d, 0xc1, 0x30, 0x51, 0x36, 0xc6, 0xc2, 0x2b, 0x8b, 0xaf, 0x0c, 0x01,
            0x27, 0xa9,
        ];
        assert_eq!(tag(cpu, &key, b"Cryptographic Forum Research Group"), want);
    }

    /// Every length up to 2,100 bytes with pseudo-random keys and messages, and the extremes
    /// (all-ones keys and messages push every limb and carry to its bound): libsodium's tags.
    #[test]
    fn tags_are_libsodiums() {
        let Some(cpu) = cpu() else { return };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for len in 0..2100 {
            let key: [u8; 32] = std::array::from_fn(|_| next());
            let msg: Vec<u8> = (0..len).map(|_| next()).collect();
            assert_eq!(tag(cpu, &key, &msg), libsodium(&key, &msg), "{len} bytes");
        }
        for fill in [0x00u8, 0xff, 0xfe, 0x80, 0x01] {
            for kfill in [0x00u8, 0xff, 0x01, 0xfa] {
                let key = [kfill; 32];
                for len in [
                    0, 1, 15, 16, 17, 127, 128, 129, 255, 256, 1024, 1088, 2048, 4096,
                ] {
                    let msg = vec![fill; len];
                    assert_eq!(
                        tag(cpu, &key, &msg),
                        libsodium(&key, &msg),
                        "{fill:#x} {kfill:#x} {len}"
                    );
                }
            }
        }
    }

    /// Random messages of every CurveCP message box length, many keys.
    #[test]
    fn message_box_lengths_match() {
        let Some(cpu) = cpu() else { return };
        let mut key = [0u8; 32];
        for i in 0..20_000usize {
            crate::crypto::random_bytes(&mut key);
            let len = 16 * (1 + i % 68);
            let mut msg = vec![0u8; len];
            crate::crypto::random_bytes(&mut msg);
            if i % 5 == 0 {
                msg.iter_mut().step_by(3).for_each(|b| *b = 0xff);
            }
            assert_eq!(tag(cpu, &key, &msg), libsodium(&key, &msg), "{len} bytes");
        }
    }

    /// Accumulators around p before the final reduction. With r = 1 and s = 0 the tag is the
    /// sum of the blocks (each plus 2¹²⁸) mod p, mod 2¹²⁸: two scalar blocks summing to p + δ,
    /// and eight vector blocks whose sum is ≡ p + δ (2¹³¹ ≡ 10).
    #[test]
    fn reduction_edges() {
        let Some(cpu) = cpu() else { return };
        let mut key = [0u8; 32];
        key[0] = 1; // r = 1, s = 0
        let block = |v: u128| v.to_le_bytes();
        for delta in -3i128..=3 {
            // Two blocks: 2·2¹²⁸ + (2¹²⁸ − 1) + b2 = p + δ → b2 = 2¹²⁸ − 4 + δ − 2¹²⁸ ... kept
            // in range by taking b1 = 2¹²⁸ − 1 and b2 = 2¹²⁸ − 4 + δ (sum 2¹³⁰ − 5 + δ).
            let b2 = (u128::MAX - 3).wrapping_add(delta as u128);
            let mut two = Vec::new();
            two.extend_from_slice(&block(u128::MAX));
            two.extend_from_slice(&block(b2));
            assert_eq!(
                tag(cpu, &key, &two),
                libsodium(&key, &two),
                "two blocks, delta {delta}"
            );
            // Eight blocks: three of 2¹²⁸ − 1, one of 2¹²⁸ − 12 + δ, four of 0.
            let mut eight = Vec::new();
            for _ in 0..3 {
                eight.extend_from_slice(&block(u128::MAX));
            }
            eight.extend_from_slice(&block((u128::MAX - 11).wrapping_add(delta as u128)));
            eight.resize(128, 0);
            assert_eq!(
                tag(cpu, &key, &eight),
                libsodium(&key, &eight),
                "eight blocks, delta {delta}"
            );
            // The same after a vector prefix of zero blocks and before a partial block.
            let mut long = vec![0u8; 256];
            long.extend_from_slice(&eight);
            long.push(7);
            assert_eq!(
                tag(cpu, &key, &long),
                libsodium(&key, &long),
                "long, delta {delta}"
            );
        }
        // The largest accumulator before reduction: all-ones blocks and r at its clamp.
        let mut key = [0xffu8; 32];
        key[16..].fill(0);
        for len in [128, 256, 1088, 1089] {
            let msg = vec![0xffu8; len];
            assert_eq!(tag(cpu, &key, &msg), libsodium(&key, &msg), "{len} bytes");
        }
    }
}
