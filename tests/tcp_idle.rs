//! A TCP stream on the listener that carries only frames the CurveCP server drops
//! (garbage, forged packets) is still closed after the idle time, so an unauthenticated peer
//! cannot hold the listener's stream slots open by trickling junk. Real sockets on 127.0.0.1,
//! a fake clock for the idle time; every loop is bounded.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use mm_platform::proto::crypto::BoxKeyPair;
use mm_platform::proto::curvecp::server::ServerConfig;
use mm_platform::proto::transport::driver::ServerDriverLimits;
use mm_platform::proto::transport::ServerDriver;

/// Polls and hands events to the server (at the fake time `now`) until `done` holds.
fn turn_until(
    poll: &mut Poll,
    server: &mut ServerDriver,
    now: Instant,
    done: impl Fn(&ServerDriver) -> bool,
) {
    let mut events = Events::with_capacity(16);
    for _ in 0..500 {
        if done(server) {
            return;
        }
        poll.poll(&mut events, Some(Duration::from_millis(10)))
            .unwrap();
        for ev in events.iter() {
            server.handle_event(poll.registry(), ev, now).unwrap();
        }
    }
    panic!("condition not reached");
}

#[test]
fn junk_frames_do_not_keep_a_tcp_stream_alive() {
    let mut poll = Poll::new().unwrap();
    let t0 = Instant::now();
    let idle = Duration::from_secs(10);
    let mut server = ServerDriver::bind_with_limits(
        poll.registry(),
        Token(0),
        ServerConfig::new(BoxKeyPair::generate()),
        None,
        Some("127.0.0.1:0".parse().unwrap()),
        ServerDriverLimits {
            max_tcp_streams: 4,
            tcp_idle: idle,
            // Longer than the idle time: the idle time bounds an unauthenticated stream too.
            tcp_handshake_timeout: idle * 2,
            ..ServerDriverLimits::default()
        },
        t0,
    )
    .unwrap();
    let mut peer = TcpStream::connect(server.tcp_addr().unwrap()).unwrap();
    turn_until(&mut poll, &mut server, t0, |s| s.tcp_streams() == 1);

    // Well-formed netstrings whose payloads are not CurveCP packets, sent before the idle
    // time runs out. They start with `Q`, so the stream keeps the native framing (a first
    // frame that fits neither framing closes the stream at once: tests/compat_framing.rs).
    let t1 = t0 + idle / 2;
    peer.write_all(b"3:Qbc,").unwrap();
    turn_until(&mut poll, &mut server, t1, |s| {
        s.server().stats().dropped >= 1
    });
    assert_eq!(server.tcp_streams(), 1);

    // The idle time counted from the last valid packet (none: from the accept) has passed.
    server.flush(poll.registry(), t0 + idle + idle / 4).unwrap();
    assert_eq!(server.tcp_streams(), 0, "a stream of junk frames is closed");
}
