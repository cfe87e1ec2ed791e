//! Differential fuzzing of the message-box cipher: every vector backend this CPU runs
//! (`avx512`, `avx512-ifma`) against libsodium, for any key, nonce, length and alignment.
//! Boxes must be byte-identical, each side must open the other's, a flipped bit must be refused
//! by both, consecutive nonces (the keystream tail cache) must agree too, and the Poly1305 tag
//! of the raw input must be libsodium's. Any mismatch aborts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mm_platform::proto::crypto::{poly1305_tag_with, CipherBackend, SharedKey, TAG_LEN};

/// Bytes of input before the message: key 32, nonce 24, alignment, count, flip (2), mode.
const HEAD: usize = 32 + 24 + 1 + 1 + 2 + 1;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEAD {
        return;
    }
    let key: [u8; 32] = data[..32].try_into().unwrap();
    let nonce: [u8; 24] = data[32..56].try_into().unwrap();
    let align = (data[56] % 64) as usize;
    let count = 1 + (data[57] % 10) as u64;
    let flip = u16::from_le_bytes([data[58], data[59]]) as usize;
    let mode = data[60];
    let mut msg = data[HEAD..].to_vec();
    // Mode: stretch the input to a full 1088-byte message box (the tail cache's length) or fill
    // it with ones (limbs and carries at their bounds), so short inputs reach those paths.
    if mode & 1 != 0 {
        msg.resize(1088, mode);
    }
    if mode & 2 != 0 {
        msg.iter_mut().for_each(|b| *b = 0xff);
    }

    let poly_key: [u8; 32] = data[..32].try_into().unwrap();
    let want_tag = poly1305_tag_with(CipherBackend::Libsodium, &poly_key, &msg).unwrap();

    let mut reference = SharedKey::from_bytes(key);
    reference
        .set_cipher_backend(CipherBackend::Libsodium)
        .unwrap();
    for backend in [CipherBackend::Avx512, CipherBackend::Avx512Ifma] {
        let mut ours = SharedKey::from_bytes(key);
        if ours.set_cipher_backend(backend).is_err() {
            continue;
        }
        assert_eq!(
            poly1305_tag_with(backend, &poly_key, &msg).unwrap(),
            want_tag,
            "{backend}: Poly1305 tag differs"
        );
        ours.cache_nonce_prefix(nonce[..16].try_into().unwrap());
        let len = TAG_LEN + msg.len();
        for c in 0..count {
            let mut n = nonce;
            let counter = u64::from_le_bytes(n[16..].try_into().unwrap()).wrapping_add(c);
            n[16..].copy_from_slice(&counter.to_le_bytes());
            let mut a = vec![0u8; align + len];
            a[align + TAG_LEN..].copy_from_slice(&msg);
            let mut b = a.clone();
            ours.seal_in_place(&n, &mut a[align..]);
            reference.seal_in_place(&n, &mut b[align..]);
            assert!(a == b, "{backend}: boxes differ ({} bytes)", msg.len());
            let mut out = vec![0u8; msg.len()];
            reference.open_into(&n, &a[align..], &mut out).unwrap();
            assert!(out == msg, "{backend}: libsodium opens to other bytes");
            let mut opened = b.clone();
            ours.open_in_place(&n, &mut opened[align..]).unwrap();
            assert!(
                opened[align + TAG_LEN..] == msg[..],
                "{backend}: opens to other bytes"
            );
            let bit = flip % (8 * len);
            let mut bad = a.clone();
            bad[align + bit / 8] ^= 1 << (bit % 8);
            assert!(ours.open_into(&n, &bad[align..], &mut out).is_err());
            assert!(
                out.iter().all(|&x| x == 0),
                "{backend}: not wiped on failure"
            );
            assert!(reference
                .open_in_place(&n, &mut bad.clone()[align..])
                .is_err());
            assert!(ours.open_in_place(&n, &mut bad[align..]).is_err());
        }
    }
});
