//! The CurveCP-level demonstration: two CurveCP endpoints on this machine exchange data over real
//! sockets on 127.0.0.1, first over UDP and then over TCP, in one single-threaded mio loop.
//!
//! A server with a fresh long-term key echoes every byte back; a client sends 1 MiB of random
//! bytes, reads the echo, checks it byte for byte, and both sides end their streams with EOF.
//! The demo prints each step and closing figures (handshake time, throughput).
//!
//! ```text
//! cargo run --release --example curvecp_demo
//! ```

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use mm_platform::proto::crypto::{self, BoxKeyPair};
use mm_platform::proto::curvecp::client::{ClientConfig, ClientState};
use mm_platform::proto::curvecp::server::{ServerConfig, ServerEvent};
use mm_platform::proto::curvecp::stream::Eof;
use mm_platform::proto::transport::{ClientDriver, ServerDriver, TransportKind};

const SIZE: usize = 1 << 20;
const SERVER: Token = Token(0);
const CLIENT: Token = Token(1 << 20);

fn main() -> io::Result<()> {
    let server_key = BoxKeyPair::generate();
    println!("server long-term key: {}", server_key.public.to_hex());
    for kind in [TransportKind::Udp, TransportKind::Tcp] {
        run(kind, &server_key)?;
    }
    println!("demo finished: every byte came back intact over UDP and TCP");
    Ok(())
}

fn run(kind: TransportKind, server_key: &BoxKeyPair) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let loopback = "127.0.0.1:0".parse().expect("literal");
    let (udp, tcp) = match kind {
        TransportKind::Udp => (Some(loopback), None),
        TransportKind::Tcp => (None, Some(loopback)),
    };
    let start = Instant::now();
    let mut server = ServerDriver::bind(
        poll.registry(),
        SERVER,
        ServerConfig::new(server_key.clone()),
        udp,
        tcp,
        start,
    )?;
    let addr = server.udp_addr().or(server.tcp_addr()).expect("bound");
    println!("\n[{kind:?}] server listening on {addr}");

    let mut data = vec![0u8; SIZE];
    crypto::random_bytes(&mut data);
    let mut client = ClientDriver::connect(
        poll.registry(),
        CLIENT,
        kind,
        addr,
        ClientConfig::new(server_key.public),
        start,
    )?;
    println!(
        "[{kind:?}] client connecting with a fresh key {}",
        &client.client().long_term_key().to_hex()[..16]
    );

    let mut sent = 0;
    let mut echoed = Vec::with_capacity(SIZE);
    let mut established_at = None;
    let mut conns = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = Events::with_capacity(256);
    let deadline = start + Duration::from_secs(120);
    loop {
        let now = Instant::now();
        if now > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "demo did not finish in 120 s",
            ));
        }
        let next = [
            server.next_deadline(),
            client.next_deadline(),
            Some(deadline),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("deadline");
        poll.poll(&mut events, Some(next.saturating_duration_since(now)))?;
        let now = Instant::now();
        for ev in events.iter() {
            if ev.token() == CLIENT {
                client.handle_event(poll.registry(), ev, now);
            } else if server.owns(ev.token()) {
                server.handle_event(poll.registry(), ev, now)?;
            }
        }
        if let Some(e) = client.transport_error() {
            return Err(io::Error::other(e.to_string()));
        }
        // Server: echo whatever arrives; end our side after the client's EOF.
        while let Some(ev) = server.poll_event() {
            match ev {
                ServerEvent::Accepted(id) => {
                    let key = server.server().client_key(id).expect("accepted");
                    println!(
                        "[{kind:?}] server accepted a connection from {}",
                        &key.to_hex()[..16]
                    );
                    conns.push(id);
                }
                ServerEvent::Closed(id) => conns.retain(|c| *c != id),
                _ => {}
            }
        }
        for &id in &conns {
            let stream = server.server_mut().stream_mut(id).expect("live");
            loop {
                let room = stream.writable().min(buf.len());
                let n = stream.read(&mut buf[..room]);
                if n == 0 {
                    break;
                }
                stream.write(&buf[..n]);
            }
            if stream.peer_eof().is_some() && stream.readable() == 0 {
                stream.finish(Eof::Success);
            }
        }
        // Client: send the data, then EOF; collect the echo.
        let c = client.client_mut();
        if established_at.is_none() && c.state() == ClientState::Established {
            let t = start.elapsed();
            established_at = Some(t);
            println!(
                "[{kind:?}] handshake done after {:.2} ms",
                t.as_secs_f64() * 1e3
            );
        }
        let stream = c.stream_mut();
        if sent < SIZE {
            sent += stream.write(&data[sent..]);
            if sent == SIZE {
                stream.finish(Eof::Success);
            }
        }
        loop {
            let n = stream.read(&mut buf);
            if n == 0 {
                break;
            }
            echoed.extend_from_slice(&buf[..n]);
        }
        let done = stream.is_done();
        if let ClientState::Failed(e) = c.state() {
            return Err(io::Error::other(format!("client failed: {e:?}")));
        }
        client.flush(poll.registry(), now)?;
        server.flush(poll.registry(), now)?;
        if done {
            break;
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(echoed, data, "echo differs");
    let stats = client.client().stream().stats();
    println!(
        "[{kind:?}] {} bytes sent and {} echoed back, identical; EOF both ways",
        sent,
        echoed.len()
    );
    println!(
        "[{kind:?}] {:.1} ms in all, {:.2} MB/s each way, srtt {:?}, {} retransmissions",
        elapsed.as_secs_f64() * 1e3,
        SIZE as f64 / elapsed.as_secs_f64() / 1e6,
        stats.srtt.unwrap_or_default(),
        stats.retransmissions
    );
    Ok(())
}
