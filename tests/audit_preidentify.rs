//! Audit: a peer that completed the CurveCP handshake but has not identified itself cannot make
//! the node buffer a large frame: before the identify frame only small frames are accepted, so
//! a frame announcing a megabyte closes that connection at once instead of being buffered until
//! the identify timeout. Real sockets on 127.0.0.1; every loop is bounded.

use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use mm_platform::curvecp::client::ClientConfig;
use mm_platform::identity::Identity;
use mm_platform::transport::{ClientDriver, TransportKind};
use mm_platform::{NetConfig, Platform};

/// Connects to `target` over UDP as `me` and writes `bytes` on the stream, driving both sides
/// until all of them are acknowledged or `max` passed; returns how many were acknowledged.
fn raw_peer(target: &mut Platform, me: &Identity, bytes: &[u8], max: Duration) -> u64 {
    let info = target.node_info();
    let port = info["connectionInfo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["transportType"] == "udp")
        .unwrap()["transportInfo"]["port"]
        .as_u64()
        .unwrap() as u16;
    let mut poll = Poll::new().unwrap();
    let mut config = ClientConfig::new(target.box_id().0);
    config.long_term = Some(me.box_keypair().clone());
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut client = ClientDriver::connect(
        poll.registry(),
        Token(1),
        TransportKind::Udp,
        addr,
        config,
        Instant::now(),
    )
    .unwrap();
    let mut written = 0;
    let mut events = Events::with_capacity(16);
    let mut buf = [0u8; 4096];
    let end = Instant::now() + max;
    while Instant::now() < end {
        poll.poll(&mut events, Some(Duration::from_millis(1)))
            .unwrap();
        let now = Instant::now();
        for ev in events.iter() {
            client.handle_event(poll.registry(), ev, now);
        }
        let s = client.client_mut().stream_mut();
        written += s.write(&bytes[written..]);
        while s.read(&mut buf) > 0 {}
        if s.bytes_acked() >= bytes.len() as u64 {
            break;
        }
        client.flush(poll.registry(), now).unwrap();
        target.poll(Some(Duration::from_millis(1))).unwrap();
    }
    client.client_mut().stream_mut().bytes_acked()
}

#[test]
fn an_unidentified_peer_cannot_announce_a_large_frame() {
    let mallory = Identity::generate();
    let mut b = Platform::builder()
        .net(NetConfig {
            // Long enough that only the frame limit can end the connection during the test.
            connect_timeout: Duration::from_secs(120),
            ..NetConfig::default()
        })
        .build()
        .unwrap();
    // A frame announcing 1 MB (allowed after identify), then the first bytes of it.
    let mut bytes = b"1000000:".to_vec();
    bytes.resize(64 * 1024, b'x');
    let acked = raw_peer(&mut b, &mallory, &bytes, Duration::from_secs(5));
    assert!(
        acked < bytes.len() as u64,
        "the connection was closed on the oversized first frame, not fed ({acked} bytes taken)"
    );
    assert!(b.connections().is_empty());
}
