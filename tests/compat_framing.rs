//! The 1tp compatibility framing over real sockets on 127.0.0.1: compat client drivers and a
//! server driver complete CurveCP handshakes and echo data over UDP and TCP; one server serves
//! native and compat clients on the same ports at once; the bytes a compat UDP client puts on
//! the wire are those of the 1tp framing (docs/ARCHITECTURE.md §4.4) while native traffic is unchanged; hostile input (every
//! type byte, truncated and oversized netstrings, wrong and unknown sessions, a flood of 10,000
//! SYNs) is dropped with the server's state bounded and a legitimate client still served; an
//! RST ends the session's connection; a dialer facing silence gives up with a clear error and
//! stops sending. Every loop is bounded by a deadline or a count.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use mm_platform::proto::crypto::BoxKeyPair;
use mm_platform::proto::curvecp::client::{Client, ClientConfig, ClientState};
use mm_platform::proto::curvecp::server::{ConnectionId, ServerConfig, ServerEvent};
use mm_platform::proto::curvecp::MAX_PACKET;
use mm_platform::proto::transport::onetp::{
    Datagram, Dialer, SessionId, SessionType, SocketPacket, MAX_DATAGRAM, VERSION,
};
use mm_platform::proto::transport::{ClientDriver, Framing, Path, ServerDriver, TransportKind};

const STEP: Duration = Duration::from_millis(10);

/// A server driver with an echo application, in its own poll.
struct Rig {
    poll: Poll,
    events: Events,
    server: ServerDriver,
    key: mm_platform::proto::crypto::BoxPublicKey,
    accepted: Vec<(ConnectionId, Path)>,
    closed: Vec<ConnectionId>,
    /// Bytes read and not yet written back, per connection.
    pending: HashMap<ConnectionId, Vec<u8>>,
}

impl Rig {
    fn new() -> Rig {
        let poll = Poll::new().unwrap();
        let keys = BoxKeyPair::generate();
        let key = keys.public;
        let server = ServerDriver::bind(
            poll.registry(),
            Token(0),
            ServerConfig::new(keys),
            Some("127.0.0.1:0".parse().unwrap()),
            Some("127.0.0.1:0".parse().unwrap()),
            Instant::now(),
        )
        .unwrap();
        Rig {
            poll,
            events: Events::with_capacity(256),
            server,
            key,
            accepted: Vec::new(),
            closed: Vec::new(),
            pending: HashMap::new(),
        }
    }

    fn udp(&self) -> SocketAddr {
        self.server.udp_addr().unwrap()
    }

    fn tcp(&self) -> SocketAddr {
        self.server.tcp_addr().unwrap()
    }

    fn client(&self, token: usize, kind: TransportKind, framing: Framing) -> ClientDriver {
        let peer = match kind {
            TransportKind::Udp => self.udp(),
            TransportKind::Tcp => self.tcp(),
        };
        ClientDriver::connect_with_framing(
            self.poll.registry(),
            Token(token),
            kind,
            framing,
            peer,
            ClientConfig::new(self.key),
            Instant::now(),
        )
        .unwrap()
    }

    /// One loop turn for the server and `clients` (at most `STEP` of waiting).
    fn turn(&mut self, clients: &mut [&mut ClientDriver]) {
        let now = Instant::now();
        let mut deadline = self.server.next_deadline();
        for c in clients.iter() {
            deadline = match (deadline, c.next_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let timeout = deadline
            .map(|d| d.saturating_duration_since(now))
            .unwrap_or(STEP)
            .min(STEP);
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        let now = Instant::now();
        for ev in self.events.iter() {
            if self.server.owns(ev.token()) {
                self.server
                    .handle_event(self.poll.registry(), ev, now)
                    .unwrap();
            } else {
                for c in clients.iter_mut() {
                    if c.token() == ev.token() {
                        c.handle_event(self.poll.registry(), ev, now);
                    }
                }
            }
        }
        let mut buf = [0u8; 65536];
        while let Some(ev) = self.server.poll_event() {
            match ev {
                ServerEvent::Accepted(id) => {
                    let path = self.server.server().path(id).unwrap();
                    self.accepted.push((id, path));
                }
                ServerEvent::Readable(id) => {
                    if let Some(s) = self.server.server_mut().stream_mut(id) {
                        let p = self.pending.entry(id).or_default();
                        for _ in 0..64 {
                            let n = s.read(&mut buf);
                            if n == 0 {
                                break;
                            }
                            p.extend_from_slice(&buf[..n]);
                        }
                    }
                }
                ServerEvent::Closed(id) => self.closed.push(id),
                _ => {}
            }
        }
        for (id, p) in self.pending.iter_mut() {
            if let Some(s) = self.server.server_mut().stream_mut(*id) {
                let n = s.write(p);
                p.drain(..n);
            }
        }
        self.server.flush(self.poll.registry(), now).unwrap();
        for c in clients.iter_mut() {
            c.flush(self.poll.registry(), now).unwrap();
        }
    }

    /// Turns until `done` holds; panics after `limit`.
    fn turn_until(
        &mut self,
        clients: &mut [&mut ClientDriver],
        limit: Duration,
        mut done: impl FnMut(&Rig, &[&mut ClientDriver]) -> bool,
    ) {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if done(self, clients) {
                return;
            }
            self.turn(clients);
        }
        panic!("condition not reached within {limit:?}");
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `data[k]` on `clients[k]` and reads the echoes until each has come back whole.
fn echo_all(rig: &mut Rig, clients: &mut [&mut ClientDriver], data: &[Vec<u8>]) {
    let mut written = vec![0usize; clients.len()];
    let mut got: Vec<Vec<u8>> = vec![Vec::new(); clients.len()];
    let end = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 65536];
    while got.iter().zip(data).any(|(g, d)| g.len() < d.len()) {
        assert!(
            Instant::now() < end,
            "echo incomplete: {:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
        for (k, c) in clients.iter_mut().enumerate() {
            assert_eq!(c.transport_error(), None);
            let s = c.client_mut().stream_mut();
            written[k] += s.write(&data[k][written[k]..]);
            for _ in 0..64 {
                let n = s.read(&mut buf);
                if n == 0 {
                    break;
                }
                got[k].extend_from_slice(&buf[..n]);
            }
        }
        rig.turn(clients);
    }
    assert_eq!(got, data);
}

fn established(c: &ClientDriver) -> bool {
    c.client().state() == ClientState::Established
}

#[test]
fn compat_udp_client_handshakes_and_echoes() {
    let mut rig = Rig::new();
    let mut c = rig.client(1000, TransportKind::Udp, Framing::Compat);
    assert_eq!(c.framing(), Framing::Compat);
    echo_all(&mut rig, &mut [&mut c], &[pattern(100_000, 1)]);
    assert!(established(&c));
    assert!(c.dialer().unwrap().is_open());
    assert_eq!(rig.accepted.len(), 1);
    let (_, path) = rig.accepted[0];
    assert_eq!(path.framing(), Framing::Compat);
    assert_eq!(path.kind(), TransportKind::Udp);
    match path {
        Path::UdpCompat { addr, session } => {
            assert_eq!(Some(session), c.dialer().unwrap().session());
            assert_eq!(rig.server.peer_ip(path), Some(addr.ip()));
        }
        p => panic!("not a compat UDP path: {p:?}"),
    }
    let st = rig.server.compat_stats();
    assert!(st.replies >= 2, "at least a SYN_ACK and a PONG: {st:?}");
    assert_eq!(st.dropped, 0);
}

#[test]
fn compat_tcp_client_handshakes_and_echoes() {
    let mut rig = Rig::new();
    let mut c = rig.client(1000, TransportKind::Tcp, Framing::Compat);
    echo_all(&mut rig, &mut [&mut c], &[pattern(100_000, 2)]);
    assert!(established(&c));
    let (_, path) = rig.accepted[0];
    assert!(matches!(
        path,
        Path::Tcp {
            framing: Framing::Compat,
            ..
        }
    ));
    assert!(rig.server.peer_ip(path).is_some());
    let st = rig.server.compat_stats();
    assert_eq!(st.tcp_streams, 1);
    assert!(st.replies >= 1, "a PONG: {st:?}");
    assert_eq!(st.dropped, 0);
}

#[test]
fn one_server_serves_native_and_compat_clients_at_once() {
    let mut rig = Rig::new();
    let mut a = rig.client(1000, TransportKind::Udp, Framing::Native);
    let mut b = rig.client(1001, TransportKind::Udp, Framing::Compat);
    let mut c = rig.client(1002, TransportKind::Tcp, Framing::Native);
    let mut d = rig.client(1003, TransportKind::Tcp, Framing::Compat);
    let data: Vec<Vec<u8>> = (0..4)
        .map(|k| pattern(50_000 + k * 1000, k as u8))
        .collect();
    echo_all(&mut rig, &mut [&mut a, &mut b, &mut c, &mut d], &data);
    let mut seen: Vec<(TransportKind, Framing)> = rig
        .accepted
        .iter()
        .map(|(_, p)| (p.kind(), p.framing()))
        .collect();
    seen.sort_by_key(|&(k, f)| (k == TransportKind::Tcp, f == Framing::Compat));
    assert_eq!(
        seen,
        [
            (TransportKind::Udp, Framing::Native),
            (TransportKind::Udp, Framing::Compat),
            (TransportKind::Tcp, Framing::Native),
            (TransportKind::Tcp, Framing::Compat),
        ]
    );
    assert_eq!(rig.server.server().connection_count(), 4);
}

/// Waits up to `limit` for a datagram on a raw socket.
fn recv(
    sock: &UdpSocket,
    poll: &mut dyn FnMut(),
    limit: Duration,
) -> Option<(Vec<u8>, SocketAddr)> {
    sock.set_nonblocking(true).unwrap();
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => return Some((buf[..n].to_vec(), from)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => poll(),
            Err(e) => panic!("{e}"),
        }
    }
    None
}

/// A client driver alone in a poll, for a raw socket acting as the server.
struct Lone {
    poll: Poll,
    events: Events,
    client: ClientDriver,
}

impl Lone {
    fn new(kind: TransportKind, framing: Framing, peer: SocketAddr) -> Lone {
        let poll = Poll::new().unwrap();
        let client = ClientDriver::connect_with_framing(
            poll.registry(),
            Token(1),
            kind,
            framing,
            peer,
            ClientConfig::new(BoxKeyPair::generate().public),
            Instant::now(),
        )
        .unwrap();
        Lone {
            poll,
            events: Events::with_capacity(16),
            client,
        }
    }

    /// A client dialling a plain listener over TCP, and the accepted stream (reads time out
    /// after 5 ms).
    fn over_tcp(framing: Framing) -> (Lone, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let lone = Lone::new(TransportKind::Tcp, framing, listener.local_addr().unwrap());
        let (peer, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        (lone, peer)
    }

    /// Turns and collects what `peer` receives while `go` holds, within `limit`.
    fn read_tcp_while(
        &mut self,
        peer: &mut TcpStream,
        limit: Duration,
        go: impl Fn(&Lone, &[u8]) -> bool,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let end = Instant::now() + limit;
        while go(self, &got) && Instant::now() < end {
            self.turn();
            if let Ok(n) = peer.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        got
    }

    fn turn(&mut self) {
        let now = Instant::now();
        let timeout = self
            .client
            .next_deadline()
            .map(|d| d.saturating_duration_since(now))
            .unwrap_or(STEP)
            .min(STEP);
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        let now = Instant::now();
        for ev in self.events.iter() {
            self.client.handle_event(self.poll.registry(), ev, now);
        }
        self.client.flush(self.poll.registry(), now).unwrap();
    }
}

fn is_lower_hex(b: &[u8]) -> bool {
    b.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

#[test]
fn compat_udp_client_bytes_on_the_wire_match_js_compat() {
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut lone = Lone::new(
        TransportKind::Udp,
        Framing::Compat,
        raw.local_addr().unwrap(),
    );
    let mut turn = || lone.turn();

    // SYN: 00 ns("0.21.0") ns(8 lowercase hex) ns(2 hex), from an ephemeral port.
    let (syn, client_addr) = recv(&raw, &mut turn, Duration::from_secs(2)).expect("a SYN");
    assert_eq!(syn.len(), 26, "{syn:?}");
    assert_eq!(&syn[..12], b"\x006:0.21.0,8:");
    let session = syn[12..20].to_vec();
    assert!(is_lower_hex(&session), "{syn:?}");
    assert_eq!(&syn[20..23], b",2:");
    let tid = syn[23..25].to_vec();
    assert!(is_lower_hex(&tid), "{syn:?}");
    assert_eq!(syn[25], b',');
    // Unanswered, the same SYN comes again after about 150 ms.
    let t = Instant::now();
    let (again, _) = recv(&raw, &mut turn, Duration::from_secs(2)).expect("a second SYN");
    assert_eq!(again, syn);
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );

    // SYN_ACK (same session and transaction ids) → ACK, then DATA(PING).
    let mut synack = syn.clone();
    synack[0] = 0x01;
    raw.send_to(&synack, client_addr).unwrap();
    let mut next = || loop {
        let (d, _) = recv(&raw, &mut turn, Duration::from_secs(2)).expect("a datagram");
        if d != syn {
            return d;
        }
    };
    let ack = next();
    let mut want = syn.clone();
    want[0] = 0x05;
    assert_eq!(ack, want);
    let ping = next();
    let mut want = b"\x026:0.21.0,8:".to_vec();
    want.extend_from_slice(&session);
    want.extend_from_slice(b",1:\x08,");
    assert_eq!(ping, want);

    // PONG → DATA(Hello): 02 ns(version) ns(session) ns(02 ns(224-byte Hello)).
    let mut pong = want.clone();
    let at = pong.len() - 2;
    pong[at] = 0x09;
    raw.send_to(&pong, client_addr).unwrap();
    let hello = loop {
        let d = next();
        if d != ping {
            break d;
        }
    };
    let mut prefix = b"\x026:0.21.0,8:".to_vec();
    prefix.extend_from_slice(&session);
    prefix.extend_from_slice(b",230:\x02224:QvnQ5XlH");
    assert_eq!(&hello[..prefix.len()], &prefix[..], "{hello:?}");
    assert_eq!(hello.len(), 1 + 9 + 11 + 4 + 1 + 4 + 224 + 1 + 1);
    assert_eq!(&hello[hello.len() - 2..], b",,");
}

#[test]
fn native_traffic_is_unchanged() {
    // UDP: the first datagram is a bare 224-byte Hello.
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut lone = Lone::new(
        TransportKind::Udp,
        Framing::Native,
        raw.local_addr().unwrap(),
    );
    assert_eq!(lone.client.framing(), Framing::Native);
    assert!(lone.client.dialer().is_none());
    let (hello, _) = recv(&raw, &mut || lone.turn(), Duration::from_secs(2)).expect("a Hello");
    assert_eq!(hello.len(), 224);
    assert_eq!(&hello[..8], b"QvnQ5XlH");

    // TCP: the first bytes are the netstring of a bare Hello.
    let (mut lone, mut peer) = Lone::over_tcp(Framing::Native);
    let got = lone.read_tcp_while(&mut peer, Duration::from_secs(2), |l, got| {
        got.len() < 229 && l.client.transport_error().is_none()
    });
    assert_eq!(&got[..12], b"224:QvnQ5XlH");
}

#[test]
fn a_dialer_facing_silence_gives_up_and_stops_sending() {
    // UDP: six SYNs, then the error, then nothing.
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut lone = Lone::new(
        TransportKind::Udp,
        Framing::Compat,
        raw.local_addr().unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(5);
    while lone.client.transport_error().is_none() && Instant::now() < end {
        lone.turn();
    }
    assert_eq!(
        lone.client.transport_error(),
        Some("1tp: no SYN_ACK after 6 SYNs")
    );
    assert_eq!(lone.client.next_deadline(), None);
    let mut syns = 0;
    while let Some((d, _)) = recv(&raw, &mut || lone.turn(), Duration::from_millis(300)) {
        assert_eq!(d[0], 0x00, "only SYNs: {d:?}");
        syns += 1;
    }
    assert_eq!(syns, 6);
    assert_eq!(
        lone.client.client().stats().hellos_sent,
        0,
        "CurveCP held back"
    );

    // TCP: six PINGs (one frame each), then the error, then nothing.
    let (mut lone, mut peer) = Lone::over_tcp(Framing::Compat);
    let mut got = lone.read_tcp_while(&mut peer, Duration::from_secs(10), |l, _| {
        l.client.transport_error().is_none()
    });
    assert_eq!(
        lone.client.transport_error(),
        Some("1tp: no PONG after 6 PINGs")
    );
    // Nothing more while it keeps turning.
    got.extend(lone.read_tcp_while(&mut peer, Duration::from_millis(150), |_, _| true));
    assert_eq!(got, b"1:\x08,".repeat(6));
    assert_eq!(lone.client.next_deadline(), None);
}

/// A JS-like peer built from the sans-IO parts on a raw socket: a [`Dialer`] and a CurveCP
/// [`Client`].
struct ManualPeer {
    sock: UdpSocket,
    server: SocketAddr,
    dialer: Dialer,
    client: Client,
    /// Every datagram received, raw.
    received: Vec<Vec<u8>>,
}

impl ManualPeer {
    fn new(rig: &Rig) -> ManualPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let now = Instant::now();
        ManualPeer {
            sock,
            server: rig.udp(),
            dialer: Dialer::udp(now),
            client: Client::new(ClientConfig::new(rig.key), now),
            received: Vec::new(),
        }
    }

    fn step(&mut self) {
        let now = Instant::now();
        let mut out = [0u8; MAX_DATAGRAM];
        let mut buf = [0u8; 4096];
        for _ in 0..1000 {
            match self.sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    self.received.push(buf[..n].to_vec());
                    if let Some(p) = self.dialer.handle(&buf[..n], now) {
                        self.client.handle_packet(p, now);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        while let Some(n) = self.dialer.poll_transmit(now, &mut out) {
            self.sock.send_to(&out[..n], self.server).unwrap();
        }
        if self.dialer.is_open() {
            let mut pkt = [0u8; MAX_PACKET];
            while let Some(n) = self.client.poll_transmit(now, &mut pkt) {
                let m = self.dialer.wrap(&pkt[..n], &mut out).unwrap();
                self.sock.send_to(&out[..m], self.server).unwrap();
            }
        }
    }

    fn control(&self, kind: SessionType, tid: &[u8]) {
        let mut out = [0u8; MAX_DATAGRAM];
        let n = Datagram {
            kind,
            version: VERSION,
            session: self.dialer.session().unwrap().as_bytes(),
            payload: tid,
        }
        .encode(&mut out)
        .unwrap();
        self.sock.send_to(&out[..n], self.server).unwrap();
    }
}

#[test]
fn fin_is_acknowledged_and_rst_ends_the_sessions_connection() {
    let mut rig = Rig::new();
    let mut peer = ManualPeer::new(&rig);
    let end = Instant::now() + Duration::from_secs(10);
    while !(peer.client.state() == ClientState::Established && rig.accepted.len() == 1) {
        assert!(Instant::now() < end, "no connection");
        peer.step();
        rig.turn(&mut []);
    }
    let (id, path) = rig.accepted[0];
    assert_eq!(path.framing(), Framing::Compat);

    // FIN: ACKed, the connection stays.
    peer.received.clear();
    peer.control(SessionType::Fin, b"a7");
    let end = Instant::now() + Duration::from_secs(5);
    let mut ack = b"\x056:0.21.0,8:".to_vec();
    ack.extend_from_slice(peer.dialer.session().unwrap().as_bytes());
    ack.extend_from_slice(b",2:a7,");
    while !peer.received.contains(&ack) {
        assert!(Instant::now() < end, "no ACK for the FIN");
        rig.turn(&mut []);
        peer.step();
    }
    assert_eq!(rig.server.server().connection_count(), 1);

    // RST from another session id: ACKed (stateless) but ends nothing.
    let other = Datagram {
        kind: SessionType::Rst,
        version: VERSION,
        session: b"00000000",
        payload: b"b1",
    };
    let mut out = [0u8; MAX_DATAGRAM];
    let n = other.encode(&mut out).unwrap();
    peer.sock.send_to(&out[..n], peer.server).unwrap();
    // RST of the session: ACKed, and its connection ends.
    peer.control(SessionType::Rst, b"b2");
    let end = Instant::now() + Duration::from_secs(5);
    while !rig.closed.contains(&id) {
        assert!(Instant::now() < end, "the connection did not end");
        rig.turn(&mut []);
        peer.step();
    }
    assert_eq!(rig.server.server().connection_count(), 0);
    assert_eq!(rig.server.compat_stats().resets, 2);
    let acks: Vec<&Vec<u8>> = peer.received.iter().filter(|d| d[0] == 0x05).collect();
    assert!(acks.iter().any(|d| d.ends_with(b",2:b2,")), "{acks:?}");
}

/// Sends `datagrams` from `sock` to the server, turning it until it has seen them all.
fn flood(rig: &mut Rig, sock: &UdpSocket, datagrams: &[Vec<u8>]) {
    let to = rig.udp();
    for chunk in datagrams.chunks(200) {
        let before = rig.server.udp_stats().unwrap().received;
        for d in chunk {
            sock.send_to(d, to).unwrap();
        }
        let want = before + chunk.len() as u64;
        rig.turn_until(&mut [], Duration::from_secs(10), |r, _| {
            r.server.udp_stats().unwrap().received >= want
        });
    }
}

/// Reads every reply waiting on `sock`; each must be a datagram a JS node understands.
fn replies_are_valid(sock: &UdpSocket) -> usize {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let mut n = 0;
    for _ in 0..100_000 {
        match sock.recv_from(&mut buf) {
            Ok((len, _)) => {
                let d = Datagram::parse(&buf[..len]).expect("a valid 1tp datagram");
                if d.kind == SessionType::Data {
                    assert!(SocketPacket::parse(d.payload).is_ok());
                }
                n += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    n
}

#[test]
fn hostile_compat_input_is_dropped_and_state_stays_bounded() {
    let mut rig = Rig::new();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut bad: Vec<Vec<u8>> = Vec::new();
    // Every first byte, followed by a well-formed header and an empty payload (no transaction
    // id, no socket packet: malformed for every type).
    for b in 0..=255u8 {
        let mut d = vec![b];
        d.extend_from_slice(b"6:0.21.0,8:0a1b2c3d,0:,");
        bad.push(d);
    }
    // A DATA carrying an unknown socket-layer type.
    bad.push(b"\x026:0.21.0,8:0a1b2c3d,1:\x07,".to_vec());
    let ok_head = b"\x006:0.21.0,8:0a1b2c3d,";
    // Truncated netstrings at every cut of a SYN and of a DATA(PING).
    let syn = b"\x006:0.21.0,8:0a1b2c3d,2:7f,";
    let ping = b"\x026:0.21.0,8:0a1b2c3d,1:\x08,";
    for cut in 0..syn.len() {
        bad.push(syn[..cut].to_vec());
    }
    for cut in 0..ping.len() {
        bad.push(ping[..cut].to_vec());
    }
    // Wrong session ids: empty, too long; an over-long version; trailing bytes.
    bad.push(b"\x006:0.21.0,0:,2:7f,".to_vec());
    bad.push(b"\x006:0.21.0,17:0123456789abcdef0,2:7f,".to_vec());
    bad.push(b"\x0017:0.21.0.0.0.0.0.0.0,8:0a1b2c3d,2:7f,".to_vec());
    bad.push([&syn[..], b"x"].concat());
    // Huge length fields.
    bad.push(b"\x0299999999999999999999999:".to_vec());
    bad.push([&ok_head[..], b"18446744073709551616:"].concat());
    bad.push(b"\x026:0.21.0,8:0a1b2c3d,1198:\x021191:".to_vec());
    // A DATA whose CurveCP packet is longer than any CurveCP packet.
    let mut long = b"\x026:0.21.0,8:0a1b2c3d,1192:\x021185:".to_vec();
    long.extend_from_slice(&[b'Q'; 1185]);
    long.extend_from_slice(b",,");
    bad.push(long);
    // Those starting with a session type byte are the compatibility framing's to drop; the
    // rest (`Q`..., 0x06-0xff, empty datagrams) go to the CurveCP server, which drops them,
    // except those starting with `M`: relay datagrams (transport::relay), dropped there.
    let n_bad = bad
        .iter()
        .filter(|d| d.first().is_some_and(|&b| b <= 5))
        .count() as u64;
    let n_relay = bad.iter().filter(|d| d.first() == Some(&b'M')).count() as u64;
    let n_native = bad.len() as u64 - n_bad - n_relay;
    // Valid framing for sessions the server never saw: DATA carrying junk CurveCP packets
    // (dropped by the CurveCP server), ACK, SYN_ACK and PONG (nothing to do), FIN and RST
    // (acknowledged, statelessly).
    let mut odd: Vec<Vec<u8>> = Vec::new();
    let mut out = [0u8; MAX_DATAGRAM];
    for k in 0..20u32 {
        let sid = format!("{k:08x}");
        let s = SessionId::new(sid.as_bytes()).unwrap();
        let junk = [b'Q'; 300];
        let n = mm_platform::proto::transport::onetp::wrap_udp(
            &s,
            &junk[..(k as usize * 15)],
            &mut out,
        )
        .unwrap();
        odd.push(out[..n].to_vec());
        for kind in [
            SessionType::Ack,
            SessionType::SynAck,
            SessionType::Fin,
            SessionType::Rst,
        ] {
            let d = Datagram {
                kind,
                version: VERSION,
                session: sid.as_bytes(),
                payload: b"7f",
            };
            let n = d.encode(&mut out).unwrap();
            odd.push(out[..n].to_vec());
        }
    }
    let all: Vec<Vec<u8>> = bad.iter().chain(&odd).cloned().collect();
    flood(&mut rig, &sock, &all);
    let st = rig.server.compat_stats();
    assert_eq!(st.datagrams, n_bad + odd.len() as u64, "{st:?}");
    assert_eq!(st.dropped, n_bad, "{st:?}");
    assert_eq!(
        st.replies, 40,
        "a FIN's and an RST's ACK per session: {st:?}"
    );
    assert_eq!(st.resets, 20, "{st:?}");
    // The junk CurveCP packets carried by DATA, and the native junk, are the CurveCP server's.
    assert_eq!(rig.server.server().stats().dropped, n_native + 20);
    assert_eq!(rig.server.server().connection_count(), 0);
    assert_eq!(replies_are_valid(&sock), 40);

    // TCP: first frames that fit neither framing, truncated and oversized netstrings, junk
    // after a compat PING: every such stream is closed (or its frames dropped), none kept.
    let mut streams = Vec::new();
    let first_bytes: Vec<u8> = (0..=255u8)
        .filter(|b| ![b'Q', 0x08, 0x02].contains(b))
        .step_by(5)
        .collect();
    for &b in &first_bytes {
        let mut s = TcpStream::connect(rig.tcp()).unwrap();
        s.write_all(&[b'1', b':', b, b',']).unwrap();
        streams.push(s);
    }
    for bytes in [
        &b"99999999999999999999999:"[..],
        b"1192:",
        b"x:",
        b"1:\x08;",
        b"0:,",
    ] {
        let mut s = TcpStream::connect(rig.tcp()).unwrap();
        s.write_all(bytes).unwrap();
        streams.push(s);
    }
    let refused = first_bytes.len() as u64 + 1; // "0:," has no first byte either.
    rig.turn_until(&mut [], Duration::from_secs(10), |r, _| {
        r.server.compat_stats().tcp_refused >= refused && r.server.tcp_streams() == 0
    });
    // A compat stream sending junk frames after its PING: PONG, the junk dropped, still open
    // until the idle time.
    let mut s = TcpStream::connect(rig.tcp()).unwrap();
    s.write_all(b"1:\x08,1:\x07,3:\x021:,4:\x021:a,1:Q,")
        .unwrap();
    rig.turn_until(&mut [], Duration::from_secs(10), |r, _| {
        r.server.compat_stats().dropped >= st.dropped + 4
    });
    assert_eq!(rig.server.compat_stats().tcp_streams, 1);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"1:\x09,");
    assert_eq!(rig.server.server().connection_count(), 0);
    drop(streams);

    // Legitimate clients, compat and native, are still served.
    let mut a = rig.client(1000, TransportKind::Udp, Framing::Compat);
    let mut b = rig.client(1001, TransportKind::Tcp, Framing::Compat);
    let mut c = rig.client(1002, TransportKind::Udp, Framing::Native);
    echo_all(
        &mut rig,
        &mut [&mut a, &mut b, &mut c],
        &[pattern(5000, 7), pattern(5000, 8), pattern(5000, 9)],
    );
}

#[test]
fn a_flood_of_10000_syns_from_many_ports_costs_no_state() {
    let mut rig = Rig::new();
    let socks: Vec<UdpSocket> = (0..50)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for (k, sock) in socks.iter().enumerate() {
        let syns: Vec<Vec<u8>> = (0..200)
            .map(|i| {
                let sid = format!("{:08x}", k * 1000 + i);
                let mut out = [0u8; MAX_DATAGRAM];
                let n = Datagram {
                    kind: SessionType::Syn,
                    version: VERSION,
                    session: sid.as_bytes(),
                    payload: b"7f",
                }
                .encode(&mut out)
                .unwrap();
                out[..n].to_vec()
            })
            .collect();
        flood(&mut rig, sock, &syns);
    }
    let st = rig.server.compat_stats();
    assert_eq!(st.datagrams, 10_000);
    assert_eq!(st.replies, 10_000, "every SYN answered by a SYN_ACK");
    assert_eq!(st.dropped, 0);
    assert_eq!(rig.server.server().connection_count(), 0);
    assert_eq!(rig.server.tcp_streams(), 0);
    // Replies are SYN_ACKs of the same size as the SYNs (no amplification); a sample is read.
    let mut buf = [0u8; 256];
    socks[0].set_nonblocking(true).unwrap();
    let (n, _) = socks[0].recv_from(&mut buf).unwrap();
    assert_eq!(n, 26);
    assert_eq!(buf[0], 0x01);

    // A legitimate compat client connects afterwards.
    let mut c = rig.client(1000, TransportKind::Udp, Framing::Compat);
    echo_all(&mut rig, &mut [&mut c], &[pattern(10_000, 3)]);
    rig.turn_until(&mut [&mut c], Duration::from_secs(1), |r, _| {
        r.server.server().connection_count() == 1
    });
}
