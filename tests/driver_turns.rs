//! Driver turns under load: a server that finds more datagrams waiting than one read batch
//! takes yields to the application, asks for an immediate turn, reads the rest in `flush`, and
//! asks for one more turn after that (so data read in `flush` reaches the application at once:
//! without it, data that arrived in that read waited for the next socket event, which could be
//! never). Real sockets on 127.0.0.1; every loop is bounded.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use mm_platform::proto::crypto::BoxKeyPair;
use mm_platform::proto::curvecp::server::ServerConfig;
use mm_platform::proto::transport::ServerDriver;

#[test]
fn a_flush_that_reads_asks_for_another_turn() {
    let mut poll = Poll::new().unwrap();
    let start = Instant::now();
    let mut server = ServerDriver::bind(
        poll.registry(),
        Token(0),
        ServerConfig::new(BoxKeyPair::generate()),
        Some("127.0.0.1:0".parse().unwrap()),
        None,
        start,
    )
    .unwrap();
    let addr = server.udp_addr().unwrap();
    // Nothing read yet: no immediate turn.
    assert!(server.next_deadline().unwrap() > Instant::now());

    // 200 garbage datagrams (more than one read batch), all waiting before the server looks.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        sock.send_to(&i.to_le_bytes(), addr).unwrap();
    }
    let mut events = Events::with_capacity(16);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut handled = false;
    while !handled && Instant::now() < deadline {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for ev in events.iter() {
            server
                .handle_event(poll.registry(), ev, Instant::now())
                .unwrap();
            handled = true;
        }
    }
    assert!(handled, "the server socket became readable");
    // One batch was read; the rest waits: an immediate turn is asked for.
    assert!(server.next_deadline().unwrap() <= Instant::now());
    // `flush` reads the rest (garbage: dropped), then asks for one more turn since it read.
    server.flush(poll.registry(), Instant::now()).unwrap();
    assert!(server.next_deadline().unwrap() <= Instant::now());
    // A flush that reads nothing leaves the deadline to the timers again.
    server.flush(poll.registry(), Instant::now()).unwrap();
    assert!(server.next_deadline().unwrap() > Instant::now());
    // Garbage starting with a 1tp type byte (0x00-0x05: six of them here) is dropped by the
    // compatibility framing, the rest by the CurveCP server.
    assert_eq!(server.compat_stats().dropped, 6);
    // Datagram 77 starts with `M`: a relay datagram (transport::relay), dropped there.
    assert_eq!(server.server().stats().dropped, 193);
}
