//! Fuzzes the 1tp compatibility-framing parsers: session datagrams, socket-layer packets, the
//! stateless accepting side and the dialer. None panics; whatever parses lies within the bounds,
//! and every reply of the accepting side is a valid datagram no larger than its input.
#![no_main]
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use mm_platform::proto::curvecp::MAX_PACKET;
use mm_platform::proto::transport::onetp::{
    accept_datagram, Datagram, Dialer, Inbound, SocketPacket, MAX_DATAGRAM, MAX_SESSION_ID,
    MAX_SOCKET_PACKET,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Datagram::parse(data) {
        assert!(!d.session.is_empty() && d.session.len() <= MAX_SESSION_ID);
        assert!(d.payload.len() <= MAX_SOCKET_PACKET);
    }
    if let Ok(SocketPacket::Data(p)) = SocketPacket::parse(data) {
        assert!(p.len() <= MAX_PACKET);
    }
    let mut out = [0u8; MAX_DATAGRAM];
    match accept_datagram(data, &mut out) {
        Ok(Inbound::Reply(n)) | Ok(Inbound::Reset { ack: n, .. }) => {
            assert!(n <= data.len());
            assert!(Datagram::parse(&out[..n]).is_ok());
        }
        Ok(Inbound::Packet { packet, .. }) => assert!(packet.len() <= MAX_PACKET),
        _ => {}
    }
    let now = Instant::now();
    let mut udp = Dialer::udp(now);
    assert!(udp.handle(data, now).is_none());
    let mut tcp = Dialer::tcp(now);
    let _ = tcp.handle(data, now);
    while tcp.poll_transmit(now, &mut out).is_some() {}
});
