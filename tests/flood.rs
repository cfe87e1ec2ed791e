//! A flood of 100,000 valid Hellos and 100,000 garbage datagrams against our server process
//! leaves its memory flat, and a legitimate client still gets through while it lasts.
//!
//! The Hellos are built here by hand from the Hello's byte layout (docs/ARCHITECTURE.md §4.1: 224 bytes) (with
//! `crate::crypto` for the box), independently of the library's packet module. Every datagram
//! goes to 127.0.0.1; the flood is paced (a few tens of thousands of datagrams a second) and
//! bounded in count and time.

mod support;

use std::fs;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mm_platform::proto::crypto::{BoxKeyPair, BoxPublicKey, TAG_LEN};
use support::*;

const HELLOS: usize = 100_000;
const GARBAGE: usize = 100_000;

fn hello(server: &BoxPublicKey, ext: &[u8; 16], counter: u64) -> Vec<u8> {
    let short = BoxKeyPair::generate();
    let mut p = vec![0u8; 224];
    p[0..8].copy_from_slice(b"QvnQ5XlH");
    p[8..24].copy_from_slice(ext);
    p[40..72].copy_from_slice(short.public.as_bytes());
    p[136..144].copy_from_slice(&counter.to_le_bytes());
    let mut nonce = [0u8; 24];
    nonce[..16].copy_from_slice(b"CurveCP-client-H");
    nonce[16..].copy_from_slice(&counter.to_le_bytes());
    let zeros = [0u8; 64];
    short
        .shared_key(server)
        .seal_into(&nonce, &zeros, &mut p[144..144 + 64 + TAG_LEN]);
    p
}

/// Garbage of many shapes: random lengths and bytes, and packets with valid magics and
/// extension but nonsense inside (they pass the prefilter and must fail later).
fn garbage(i: usize, ext: &[u8; 16]) -> Vec<u8> {
    let mut v = random_data(16 + (i * 7919) % 1400, i as u64 + 1);
    match i % 4 {
        0 => {}
        1 => {
            v.resize(224, 0);
            v[..8].copy_from_slice(b"QvnQ5XlH");
            v[8..24].copy_from_slice(ext);
        }
        2 => {
            v.resize(560 + 16 * (i % 40), 0);
            v[..8].copy_from_slice(b"QvnQ5XlI");
            v[8..24].copy_from_slice(ext);
        }
        _ => {
            v.resize(112 + 16 * (i % 60), 0);
            v[..8].copy_from_slice(b"QvnQ5XlM");
            v[8..24].copy_from_slice(ext);
        }
    }
    v
}

fn rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

fn echo_client(key: &str, port: u16, input: &std::path::Path) -> std::process::Output {
    Proc::spawn(
        "legitimate client",
        Command::new(curvecp_bin())
            .args(["client", "test.example.org", key, "127.0.0.1"])
            .arg(port.to_string())
            .arg(EXT)
            // Its debug log is shown if it ever hangs.
            .env("RUST_LOG", "mm_platform=debug")
            .stdin(stdin_file(Some(input)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .output(Duration::from_secs(120))
}

#[test]
fn flood_leaves_memory_flat_and_a_client_gets_through() {
    let dir = TempDir::new("flood");
    let key = our_makekey(&dir.path("serverkey"));
    let server_pk = BoxPublicKey::from_hex(&key).unwrap();
    let mut ext = [0u8; 16];
    assert!(mm_platform::proto::crypto::from_hex_into(EXT, &mut ext));
    let port = free_port(false);
    let mut server = Proc::spawn(
        "our server",
        Command::new(curvecp_bin())
            .args(["server", "test.example.org"])
            .arg(dir.path("serverkey"))
            .args(["127.0.0.1", &port.to_string(), EXT, "--", "cat"])
            // Connection starts and ends (not the flood's dropped packets) for diagnosis.
            .env(
                "RUST_LOG",
                "mm_platform=debug/(accepted|removed|unresponsive)",
            )
            .stderr(Stdio::inherit()),
    );
    wait_for_udp_bind(port, &mut server);

    let data = random_data(64 * 1024, 99);
    let input = dir.path("in");
    fs::write(&input, &data).unwrap();
    // Warm up: one whole connection, so that whatever the server allocates once is allocated.
    let out = echo_client(&key, port, &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, data);
    let before = rss_kib(server.id());

    // A pool of distinct Hellos (each a fresh short-term key), cycled through.
    let pool: Vec<Vec<u8>> = (0..2000)
        .map(|i| hello(&server_pk, &ext, i as u64 + 1))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            sock.set_nonblocking(true).unwrap();
            let target = ("127.0.0.1", port);
            let started = Instant::now();
            let mut sent = 0usize;
            let mut cookies = 0usize;
            let mut drain = [0u8; 2048];
            for i in 0..HELLOS.max(GARBAGE) {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(90) {
                    break;
                }
                if i < HELLOS {
                    let _ = sock.send_to(&pool[i % pool.len()], target);
                    sent += 1;
                }
                if i < GARBAGE {
                    let _ = sock.send_to(&garbage(i, &ext), target);
                    sent += 1;
                }
                // Pace: about 20,000 Hellos and 20,000 garbage datagrams a second.
                if i % 200 == 199 {
                    while let Ok((n, _)) = sock.recv_from(&mut drain) {
                        if n == 200 && &drain[..8] == b"RL3aNMXK" {
                            cookies += 1;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            (sent, cookies)
        })
    };
    // A legitimate client during the flood.
    std::thread::sleep(Duration::from_millis(500));
    let during = echo_client(&key, port, &input);
    let (sent, cookies) = flooder.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(
        during.status.success(),
        "client during the flood failed: {}",
        String::from_utf8_lossy(&during.stderr)
    );
    assert_eq!(during.stdout, data, "echo during the flood");
    assert_eq!(sent, HELLOS + GARBAGE);
    // The flood reached the server and was worked on (not just dropped by the kernel): a good
    // share of the Hellos were answered with Cookies.
    eprintln!("flood: {sent} datagrams sent, {cookies} cookies received back");
    assert!(cookies > HELLOS / 10, "only {cookies} cookies came back");

    // Let the server work through its socket buffer, then measure.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(server.id());
    eprintln!("server RSS: {before} KiB before the flood, {after} KiB after");
    assert!(
        after < before + 8 * 1024,
        "server memory grew from {before} KiB to {after} KiB during the flood"
    );
    // And it still serves.
    let out = echo_client(&key, port, &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, data);
}
