//! TCP admission on the listener ([`ServerDriverLimits`]): streams whose CurveCP handshake has
//! not completed are capped per source address and closed at a short handshake deadline, and
//! the oldest of them is evicted when a source or the whole table is full, so idle streams
//! from one address never lock the listener. Real sockets on 127.0.0.1, 127.0.0.2 and
//! 127.0.0.3 (Linux routes all of 127.0.0.0/8 to the loopback interface); every loop is
//! bounded.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};

use mm_platform::proto::crypto::BoxKeyPair;
use mm_platform::proto::curvecp::client::ClientConfig;
use mm_platform::proto::curvecp::server::{ServerConfig, ServerEvent};
use mm_platform::proto::transport::driver::ServerDriverLimits;
use mm_platform::proto::transport::{ClientDriver, ServerDriver, TransportKind};
use mm_platform::{Message, Platform};

/// Descriptors the flood test needs at once: the attacker's sockets, the node's accepted
/// streams, the rest of the process.
const FDS_NEEDED: libc::rlim_t = 4096;

/// Raises the soft limit of open files to what the test needs (up to the hard limit).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < FDS_NEEDED {
            lim.rlim_cur = FDS_NEEDED.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn tcp_only() -> Value {
    json!([{"transportType": "tcp", "transportInfo": {"address": "127.0.0.1", "port": 0}}])
}

fn tcp_node() -> Platform {
    Platform::builder()
        .connection_info(tcp_only())
        .build()
        .unwrap()
}

fn tcp_addr(p: &Platform) -> SocketAddr {
    let info = p.node_info().to_json();
    let e = info["connectionInfo"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["transportType"] == "tcp")
        .unwrap()
        .clone();
    let ip: IpAddr = e["transportInfo"]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let port = e["transportInfo"]["port"].as_u64().unwrap() as u16;
    SocketAddr::new(ip, port)
}

/// A TCP connection from `from` (any port) to `to`, non-blocking: the connect is under way
/// when this returns.
fn connect_from(from: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.set_nonblocking(true)?;
    match s.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// The state of a non-blocking attacker socket.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SockState {
    Connecting,
    Established,
    /// Closed or reset by the other side (after it was established or not).
    Closed {
        was_established: bool,
    },
}

fn probe(s: &TcpStream) -> SockState {
    let mut b = [0u8; 1];
    match s.peek(&mut b) {
        // FIN: it was established.
        Ok(0) => SockState::Closed {
            was_established: true,
        },
        Ok(_) => SockState::Established,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if s.peer_addr().is_ok() {
                SockState::Established
            } else {
                SockState::Connecting
            }
        }
        // A reset of an established connection; a refused or failed connect.
        Err(e) => SockState::Closed {
            was_established: e.kind() == io::ErrorKind::ConnectionReset,
        },
    }
}

/// What the attacker thread reports.
#[derive(Default)]
struct Flood {
    stop: AtomicBool,
    /// Rounds over all its sockets done.
    rounds: AtomicU64,
    /// Connections established so far (the node's kernel completed their handshake).
    established: AtomicU64,
    /// Connections the node closed that were opened again.
    reopened: AtomicU64,
    /// Sockets open (connected or connecting) at the end of the last round.
    open: AtomicUsize,
}

/// Holds `n` idle TCP connections from `from` to `to` open, opening each one again as soon as
/// it is seen closed (every 10 ms), until told to stop (or after a minute).
fn flood(from: IpAddr, to: SocketAddr, n: usize, state: Arc<Flood>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        // Each socket, and whether it was seen established.
        let mut socks: Vec<Option<(TcpStream, bool)>> = (0..n).map(|_| None).collect();
        let mut ever = vec![false; n];
        let end = Instant::now() + Duration::from_secs(60);
        while !state.stop.load(Ordering::Relaxed) && Instant::now() < end {
            for s in socks.iter_mut() {
                let Some((sock, established)) = s.as_mut() else {
                    continue;
                };
                let st = probe(sock);
                let now_established = matches!(
                    st,
                    SockState::Established
                        | SockState::Closed {
                            was_established: true
                        }
                );
                if now_established && !*established {
                    *established = true;
                    state.established.fetch_add(1, Ordering::Relaxed);
                }
                match st {
                    SockState::Closed { .. } => *s = None,
                    SockState::Connecting | SockState::Established => {}
                }
            }
            let mut open = 0;
            for (i, s) in socks.iter_mut().enumerate() {
                if s.is_none() {
                    if let Ok(sock) = connect_from(from, to) {
                        *s = Some((sock, false));
                        if ever[i] {
                            state.reopened.fetch_add(1, Ordering::Relaxed);
                        }
                        ever[i] = true;
                    }
                }
                open += usize::from(s.is_some());
            }
            state.open.store(open, Ordering::Relaxed);
            state.rounds.fetch_add(1, Ordering::Relaxed);
            thread::sleep(Duration::from_millis(10));
        }
    })
}

/// A TCP-only node stays reachable for a legitimate TCP peer while 1,100 idle connections
/// from one other address (127.0.0.2) are held open and re-opened as they get closed. Before
/// TCP admission, the node held the first 1,024 of them for 120 s and refused the peer's.
#[test]
fn a_tcp_only_node_is_reachable_while_one_address_floods_its_listener() {
    raise_nofile();
    let mut b = tcp_node();
    let mut a = tcp_node();
    let b_addr = tcp_addr(&b);
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    let state = Arc::new(Flood::default());
    let handle = flood(attacker, b_addr, 1100, state.clone());

    // The node serves the flood until it has seen all 1,100 connections, and a little more.
    let end = Instant::now() + Duration::from_secs(20);
    while state.established.load(Ordering::Relaxed) < 1100 && Instant::now() < end {
        b.poll(Some(Duration::from_millis(1))).unwrap();
    }
    assert!(
        state.established.load(Ordering::Relaxed) >= 1100,
        "the attacker established its connections: {} of {} open, {} rounds",
        state.established.load(Ordering::Relaxed),
        state.open.load(Ordering::Relaxed),
        state.rounds.load(Ordering::Relaxed)
    );
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        b.poll(Some(Duration::from_millis(1))).unwrap();
    }

    // The peer sends a message over TCP while the flood goes on.
    let info = b.node_info().to_json();
    assert!(a
        .messaging()
        .send("transports.nodeInfo", "local", &info)
        .is_ok());
    let (_, rx) = b.messaging().on_channel("public.hello", 4);
    let (_, failed) = a.messaging().on_channel("self.transports.failed", 4);
    assert!(a.messaging().send("hello", b.sign_id(), &"through").is_ok());
    let mut got: Vec<Message> = Vec::new();
    let mut fails = 0;
    let started = Instant::now();
    let end = started + Duration::from_secs(30);
    while got.is_empty() && Instant::now() < end {
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
        got.extend(rx.try_iter());
        fails += failed.try_iter().count();
    }
    let took = started.elapsed();
    state.stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    let reopened = state.reopened.load(Ordering::Relaxed);
    let open = state.open.load(Ordering::Relaxed);
    eprintln!(
        "flood: {} rounds, {} connections established, {reopened} re-opened, {open} open at \
         the end; the peer's message {} after {took:?} ({fails} failures reported)",
        state.rounds.load(Ordering::Relaxed),
        state.established.load(Ordering::Relaxed),
        if got.is_empty() {
            "did not arrive"
        } else {
            "arrived"
        },
    );
    assert_eq!(got.len(), 1, "the peer's message arrives during the flood");
    assert_eq!(got[0].json::<String>().unwrap(), "through");
    assert_eq!(fails, 0, "the peer's destination did not fail");
    // The flood was real: the node closed the attacker's connections and they came back.
    assert!(
        reopened > 0,
        "the node closed some of the attacker's connections"
    );
}

// Driver-level tests: a `ServerDriver` with small limits, its handshake deadlines on a fake
// clock (`t0` plus offsets), raw idle streams and a real CurveCP client over TCP.

/// A server listening on TCP only (127.0.0.1), with `limits`, started at `t0`.
fn tcp_server(poll: &Poll, limits: ServerDriverLimits, t0: Instant) -> (ServerDriver, BoxKeyPair) {
    let keys = BoxKeyPair::generate();
    let server = ServerDriver::bind_with_limits(
        poll.registry(),
        Token(0),
        ServerConfig::new(keys.clone()),
        None,
        Some("127.0.0.1:0".parse().unwrap()),
        limits,
        t0,
    )
    .unwrap();
    (server, keys)
}

/// Limits with the given table size, per-source cap and handshake deadline.
fn limits(max: usize, per_source: usize, handshake: Duration) -> ServerDriverLimits {
    ServerDriverLimits {
        max_tcp_streams: max,
        max_unauthenticated_tcp_per_source: per_source,
        tcp_handshake_timeout: handshake,
        ..ServerDriverLimits::default()
    }
}

/// Drives the server (at the fake time `now`, flushing too) and the clients (at the real
/// time) until `done` holds; what the server's connections read is appended to `got`.
fn drive(
    poll: &mut Poll,
    server: &mut ServerDriver,
    clients: &mut [&mut ClientDriver],
    now: Instant,
    got: &mut Vec<u8>,
    done: impl Fn(&ServerDriver, &[u8]) -> bool,
) {
    let mut events = Events::with_capacity(256);
    let mut buf = [0u8; 4096];
    for _ in 0..1000 {
        if done(server, got) {
            return;
        }
        poll.poll(&mut events, Some(Duration::from_millis(5)))
            .unwrap();
        for ev in events.iter() {
            if server.owns(ev.token()) {
                server.handle_event(poll.registry(), ev, now).unwrap();
            }
            for c in clients.iter_mut() {
                if c.token() == ev.token() {
                    c.handle_event(poll.registry(), ev, Instant::now());
                }
            }
        }
        while let Some(ev) = server.poll_event() {
            if let ServerEvent::Readable(id) = ev {
                if let Some(s) = server.server_mut().stream_mut(id) {
                    loop {
                        let n = s.read(&mut buf);
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                }
            }
        }
        server.flush(poll.registry(), now).unwrap();
        for c in clients.iter_mut() {
            c.flush(poll.registry(), Instant::now()).unwrap();
        }
    }
    panic!(
        "condition not reached: {} streams, {:?}",
        server.tcp_streams(),
        server.tcp_stats()
    );
}

/// A CurveCP client over TCP (from 127.0.0.1) to `server`, with `data` written on its stream.
fn client(
    poll: &Poll,
    server: &ServerDriver,
    keys: &BoxKeyPair,
    token: usize,
    data: &[u8],
) -> ClientDriver {
    let mut c = ClientDriver::connect(
        poll.registry(),
        Token(token),
        TransportKind::Tcp,
        server.tcp_addr().unwrap(),
        ClientConfig::new(keys.public),
        Instant::now(),
    )
    .unwrap();
    assert_eq!(c.client_mut().stream_mut().write(data), data.len());
    c
}

/// Connects an idle stream from `from` and has the server accept (or refuse) it at `now`.
fn idle_from(from: &str, poll: &mut Poll, server: &mut ServerDriver, now: Instant) -> TcpStream {
    let seen = |s: &ServerDriver| s.tcp_stats().accepted + s.tcp_stats().refused;
    let before = seen(server);
    let s = connect_from(from.parse().unwrap(), server.tcp_addr().unwrap()).unwrap();
    drive(poll, server, &mut [], now, &mut Vec::new(), |s, _| {
        seen(s) > before
    });
    s
}

/// Whether the server closed (reset) `s`, waiting up to 5 s for it to show.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
        ),
    }
}

/// Whether `s` is still open (nothing to read, no reset).
fn still_open(s: &TcpStream) -> bool {
    probe(s) == SockState::Established
}

/// A stream that completes no CurveCP handshake (idle, or sending only packets the server
/// drops) is closed exactly at its handshake deadline; an authenticated one stays.
#[test]
fn an_unauthenticated_stream_is_closed_at_the_handshake_deadline() {
    let mut poll = Poll::new().unwrap();
    let t0 = Instant::now();
    let handshake = Duration::from_secs(3);
    let (mut server, keys) = tcp_server(&poll, limits(16, 8, handshake), t0);
    let mut idle = idle_from("127.0.0.1", &mut poll, &mut server, t0);
    let mut junk = idle_from("127.0.0.1", &mut poll, &mut server, t0);
    junk.set_nonblocking(false).unwrap();
    // A well-formed frame that is no valid CurveCP packet: dropped.
    junk.write_all(b"3:Qbc,").unwrap();
    let dropped = server.server().stats().dropped;
    let mut c = client(&poll, &server, &keys, 100, b"hello");
    let mut got = Vec::new();
    drive(
        &mut poll,
        &mut server,
        &mut [&mut c],
        t0,
        &mut got,
        |s, got| got == b"hello" && s.server().stats().dropped > dropped,
    );
    assert_eq!(server.tcp_streams(), 3);
    assert_eq!(server.tcp_unauthenticated(), 2);
    assert_eq!(server.tcp_stats().authenticated, 1);
    // The reactor is woken for the deadline (or earlier, for the connection's own timers).
    let deadline = t0 + handshake;
    assert!(server.next_deadline().unwrap() <= deadline);

    // Just before: nothing closed. At the deadline: both unauthenticated streams.
    server
        .flush(poll.registry(), deadline - Duration::from_millis(1))
        .unwrap();
    assert_eq!(server.tcp_streams(), 3);
    server.flush(poll.registry(), deadline).unwrap();
    assert_eq!(server.tcp_streams(), 1, "the authenticated stream stays");
    assert_eq!(server.tcp_unauthenticated(), 0);
    assert_eq!(server.tcp_stats().handshake_timeouts, 2);
    assert!(closed_by_server(&mut idle), "the idle stream was closed");
    assert!(closed_by_server(&mut junk), "the junk stream was closed");
    // No handshake deadline is left to wake up for.
    server.flush(poll.registry(), deadline).unwrap();
    assert!(server
        .next_deadline()
        .is_none_or(|d| d > deadline || server.server().poll_timeout() == Some(d)));
}

/// A source at its cap of unauthenticated streams has its oldest one evicted by each new one;
/// other sources' streams are untouched.
#[test]
fn a_new_stream_evicts_the_oldest_unauthenticated_one_of_its_source() {
    let mut poll = Poll::new().unwrap();
    let t0 = Instant::now();
    let (mut server, _) = tcp_server(&poll, limits(64, 4, Duration::from_secs(60)), t0);
    let ms = Duration::from_millis(1);
    let mut a: Vec<TcpStream> = (0..4)
        .map(|i| idle_from("127.0.0.2", &mut poll, &mut server, t0 + ms * i))
        .collect();
    let b: Vec<TcpStream> = (0..2)
        .map(|i| idle_from("127.0.0.3", &mut poll, &mut server, t0 + ms * (4 + i)))
        .collect();
    assert_eq!(server.tcp_unauthenticated(), 6);
    assert_eq!(server.tcp_stats().evicted_per_source, 0);
    // Five more from 127.0.0.2: each evicts that source's oldest.
    for i in 0..5 {
        a.push(idle_from(
            "127.0.0.2",
            &mut poll,
            &mut server,
            t0 + ms * (10 + i),
        ));
    }
    assert_eq!(server.tcp_stats().evicted_per_source, 5);
    assert_eq!(server.tcp_streams(), 6);
    assert_eq!(server.tcp_unauthenticated(), 6);
    for (i, s) in a.iter_mut().enumerate() {
        if i < 5 {
            assert!(closed_by_server(s), "stream {i} of 127.0.0.2 was evicted");
        } else {
            assert!(still_open(s), "stream {i} of 127.0.0.2 is open");
        }
    }
    for s in &b {
        assert!(still_open(s), "127.0.0.3's streams are untouched");
    }
    assert_eq!(server.tcp_stats().evicted_table_full, 0);
}

/// A table full of idle streams, some from the legitimate client's own address: the client's
/// stream evicts the oldest unauthenticated one, completes its handshake and is heard; a table
/// full of authenticated streams refuses a new one instead.
#[test]
fn a_full_table_evicts_its_oldest_unauthenticated_stream_for_a_legit_client() {
    let mut poll = Poll::new().unwrap();
    let t0 = Instant::now();
    let ms = Duration::from_millis(1);
    let (mut server, keys) = tcp_server(&poll, limits(8, 16, Duration::from_secs(60)), t0);
    let mut idle: Vec<TcpStream> = (0..8)
        .map(|i| idle_from("127.0.0.1", &mut poll, &mut server, t0 + ms * i))
        .collect();
    assert_eq!(server.tcp_streams(), 8);
    let mut c = client(&poll, &server, &keys, 100, b"hello");
    let mut got = Vec::new();
    drive(
        &mut poll,
        &mut server,
        &mut [&mut c],
        t0 + ms * 10,
        &mut got,
        |_, got| got == b"hello",
    );
    let stats = server.tcp_stats();
    assert_eq!(stats.evicted_table_full, 1);
    assert_eq!(stats.evicted_per_source, 0);
    assert_eq!(stats.authenticated, 1);
    assert_eq!(server.tcp_streams(), 8);
    assert!(
        closed_by_server(&mut idle[0]),
        "the oldest stream was evicted"
    );
    assert!(idle[1..].iter().all(still_open));

    // Only authenticated streams: a new one is refused.
    let t1 = t0 + Duration::from_secs(1);
    let (mut server, keys) = tcp_server(&poll, limits(1, 8, Duration::from_secs(60)), t1);
    let mut c = client(&poll, &server, &keys, 101, b"first");
    let mut got = Vec::new();
    drive(
        &mut poll,
        &mut server,
        &mut [&mut c],
        t1,
        &mut got,
        |_, got| got == b"first",
    );
    let mut late = idle_from("127.0.0.2", &mut poll, &mut server, t1);
    assert!(closed_by_server(&mut late), "the new stream was refused");
    assert_eq!(server.tcp_stats().refused, 1);
    assert_eq!(server.tcp_streams(), 1);
    assert_eq!(server.tcp_stats().authenticated, 1);
}
