//! A dudect-style constant-time check of Poly1305 (`cargo bench --bench poly1305_timing`):
//! one JSON line per backend with Welch's t statistic between the cycle counts of two input
//! classes, interleaved at random. Class 0: random blocks. Class 1: blocks whose accumulator
//! ends at or just above p = 2¹³⁰ − 5, so the final reduction takes the other side of its
//! secret-dependent select in every run (with random blocks it almost never does). Both use
//! r = 1, s = 0 and 128 bytes (eight blocks: the vector path and its final reduction under
//! `avx512-ifma`) or 32 bytes (below the vector code's minimum: libsodium under every backend,
//! a reference). |t| below about 4.5 is no evidence of a timing difference (dudect's
//! threshold); a larger one is worth a look, and a look at the load (`uptime`) first.
//!
//! A figure, never a test: timings are not asserted anywhere.

use std::hint::black_box;

use mm_platform::proto::crypto::{poly1305_tag_with, random_bytes, CipherBackend};

/// Samples per class per figure.
const SAMPLES: usize = 200_000;

#[cfg(target_arch = "x86_64")]
fn cycles() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn cycles() -> u64 {
    use std::time::Instant;
    thread_local!(static T0: Instant = Instant::now());
    T0.with(|t| t.elapsed().as_nanos() as u64)
}

/// A message of `len` bytes (32 or 128) whose blocks, each plus 2¹²⁸, sum to p + δ (δ in
/// 0..4) when `near_p`, random blocks otherwise.
fn message(len: usize, near_p: bool, delta: u8) -> Vec<u8> {
    let mut msg = vec![0u8; len];
    if !near_p {
        random_bytes(&mut msg);
        return msg;
    }
    let d = delta as u128 % 4;
    if len == 32 {
        // 2·2¹²⁸ + (2¹²⁸ − 1) + (2¹²⁸ − 4 + δ) = 2¹³⁰ − 5 + δ.
        msg[..16].copy_from_slice(&u128::MAX.to_le_bytes());
        msg[16..].copy_from_slice(&(u128::MAX - 3 + d).to_le_bytes());
    } else {
        // Eight blocks: 8·2¹²⁸ + 3·(2¹²⁸ − 1) + (2¹²⁸ − 12 + δ) ≡ p + δ (2¹³¹ ≡ 10).
        for i in 0..3 {
            msg[16 * i..16 * i + 16].copy_from_slice(&u128::MAX.to_le_bytes());
        }
        msg[48..64].copy_from_slice(&(u128::MAX - 11 + d).to_le_bytes());
    }
    msg
}

/// Welch's t between the two classes' cycle counts, each cropped at the pooled 95th percentile
/// (dudect's way of cutting interrupts and migrations).
fn welch_t(samples: &[(bool, u64)]) -> f64 {
    let mut all: Vec<u64> = samples.iter().map(|s| s.1).collect();
    all.sort_unstable();
    let cap = all[all.len() * 95 / 100];
    let stats = |class: bool| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 == class && s.1 <= cap)
            .map(|s| s.1 as f64)
            .collect();
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        (n, mean, var)
    };
    let (n0, m0, v0) = stats(false);
    let (n1, m1, v1) = stats(true);
    (m0 - m1) / (v0 / n0 + v1 / n1).sqrt()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("benches/poly1305_timing.rs: run it with `cargo bench --bench poly1305_timing`");
        return;
    }
    let mut key = [0u8; 32];
    key[0] = 1; // r = 1, s = 0
    for backend in CipherBackend::ALL {
        if !backend.supported() {
            eprintln!("SKIPPING {backend}: not supported on this machine or build");
            continue;
        }
        for len in [32usize, 128] {
            // Inputs made beforehand, classes in random order.
            let mut coin = vec![0u8; SAMPLES * 2];
            random_bytes(&mut coin);
            let inputs: Vec<(bool, Vec<u8>)> = coin
                .iter()
                .map(|&c| (c & 1 == 1, message(len, c & 1 == 1, c >> 1)))
                .collect();
            let mut samples = Vec::with_capacity(inputs.len());
            for (class, msg) in &inputs {
                let t0 = cycles();
                let tag = poly1305_tag_with(backend, black_box(&key), black_box(msg));
                let t1 = cycles();
                black_box(tag.ok());
                samples.push((*class, t1.wrapping_sub(t0)));
            }
            let t = welch_t(&samples);
            println!(
                "{}",
                serde_json::json!({
                    "name": format!("poly1305_dudect_t_{}_{len}B", backend.name()),
                    "value": (t * 100.0).round() / 100.0,
                    "unit": "t",
                })
            );
        }
    }
}
