//! `curvecp`: a command-line tool that mirrors DJB's reference CurveCP tools, so that ours and
//! theirs can be swapped in tests.
//!
//! ```text
//! curvecp makekey DIR
//! curvecp printkey DIR
//! curvecp server NAME KEYDIR IP PORT EXT [--tcp] [--max-connections N] -- PROG [ARGS...]
//! curvecp client NAME SERVERKEYHEX IP PORT EXT [--tcp]
//! ```
//!
//! - Key directories have the layout of `curvecpmakekey`: `publickey` (32 raw bytes) and
//!   `.expertsonly/secretkey` (32 raw bytes, mode 0600). `makekey` also writes the
//!   `.expertsonly/{lock,noncekey,noncecounter}` files the reference server expects, so the
//!   reference tools can use keys made here.
//! - `server` serves clients concurrently until killed. For each connection it runs PROG with
//!   the incoming stream on its stdin and its stdout as the outgoing stream; EOF is passed both
//!   ways (PROG's stdin is closed at the client's EOF; PROG closing its stdout ends our stream).
//! - `client` sends its stdin then EOF, writes the server's stream to stdout until the server's
//!   EOF, and exits 0. On failure (no answer after the Hello schedule, connection lost, a failure
//!   EOF from the server) it exits 1 with a one-line reason on stderr. Usage errors exit 100.
//!   While it waits for a silent server it probes it every 5 s, so a server that vanished is
//!   detected (after the stream's 30 s `dead_after`) rather than waited for forever.
//!
//! NAME is a DNS name (the empty name `""` allowed), EXT 32 hex digits, keys 64 hex digits.
//! `--tcp` carries the packets as netstrings over TCP instead of UDP datagrams. Logging goes to
//! stderr through `env_logger` (`RUST_LOG=debug`).

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, TryRecvError};
use mio::unix::pipe;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use mm_platform::proto::crypto::{self, BoxKeyPair, BoxPublicKey};
use mm_platform::proto::curvecp::client::{ClientConfig, ClientState};
use mm_platform::proto::curvecp::packet::ServerName;
use mm_platform::proto::curvecp::server::{ConnectionId, ServerConfig, ServerEvent};
use mm_platform::proto::curvecp::stream::Eof;
use mm_platform::proto::curvecp::Extension;
use mm_platform::proto::transport::{ClientDriver, ServerDriver, TransportKind};

const USAGE: &str = "usage:
  curvecp makekey DIR
  curvecp printkey DIR
  curvecp server NAME KEYDIR IP PORT EXT [--tcp] [--max-connections N] -- PROG [ARGS...]
  curvecp client NAME SERVERKEYHEX IP PORT EXT [--tcp]";

/// A usage error (exit 100) or a failure (exit 1), each with a one-line reason.
enum Failure {
    Usage(String),
    Fatal(String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Fatal(e.to_string())
    }
}

fn fatal<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Fatal(msg.into()))
}

fn usage<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure::Usage(msg.into()))
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .target(env_logger::Target::Stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("makekey") if args.len() == 2 => makekey(Path::new(&args[1])),
        Some("printkey") if args.len() == 2 => printkey(Path::new(&args[1])),
        Some("server") => server(&args[1..]),
        Some("client") => client(&args[1..]),
        _ => usage("unknown command"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("curvecp: {m}\n{USAGE}");
            ExitCode::from(100)
        }
        Err(Failure::Fatal(m)) => {
            eprintln!("curvecp: {m}");
            ExitCode::from(1)
        }
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn makekey(dir: &Path) -> Result<(), Failure> {
    let kp = BoxKeyPair::generate();
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .map_err(|e| Failure::Fatal(format!("unable to create {}: {e}", dir.display())))?;
    let expert = dir.join(".expertsonly");
    fs::DirBuilder::new().mode(0o700).create(&expert)?;
    write_file(&expert.join("secretkey"), kp.secret_bytes(), 0o600)?;
    write_file(&expert.join("lock"), &[0], 0o600)?;
    let mut noncekey = [0u8; 32];
    crypto::random_bytes(&mut noncekey);
    write_file(&expert.join("noncekey"), &noncekey, 0o600)?;
    write_file(&expert.join("noncecounter"), &[0; 8], 0o600)?;
    write_file(&dir.join("publickey"), kp.public.as_bytes(), 0o644)?;
    Ok(())
}

fn read_key(path: &Path) -> Result<[u8; 32], Failure> {
    let bytes = fs::read(path)
        .map_err(|e| Failure::Fatal(format!("unable to read {}: {e}", path.display())))?;
    bytes
        .try_into()
        .map_err(|_| Failure::Fatal(format!("{} is not a 32-byte key", path.display())))
}

fn printkey(dir: &Path) -> Result<(), Failure> {
    let pk = read_key(&dir.join("publickey"))?;
    println!("{}", crypto::to_hex(&pk));
    Ok(())
}

/// The arguments shared by `server` and `client`: name, address, extension, transport.
fn parse_common(
    name: &str,
    ip: &str,
    port: &str,
    ext: &str,
) -> Result<(ServerName, SocketAddr, Extension), Failure> {
    let name = match ServerName::from_dns(name) {
        Ok(n) => n,
        Err(e) => return usage(format!("bad server name {name:?}: {e:?}")),
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return usage(format!("bad IP address {ip:?}"));
    };
    let Ok(port) = port.parse::<u16>() else {
        return usage(format!("bad port {port:?}"));
    };
    let mut extension = [0u8; 16];
    if !crypto::from_hex_into(ext, &mut extension) {
        return usage(format!("bad extension {ext:?} (32 hex digits)"));
    }
    Ok((name, SocketAddr::new(ip, port), extension))
}

// ---------------------------------------------------------------------------------------------
// server

const CHILD_TOKENS: usize = 1 << 24;
const PIPE_CHUNK: usize = 64 * 1024;

/// One connection's handler process and the bytes in transit between it and the stream.
struct Handler {
    conn: ConnectionId,
    child: Child,
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    to_child: Vec<u8>,
    to_child_pos: usize,
    from_child: Vec<u8>,
    from_child_pos: usize,
    finished: bool,
}

fn server(args: &[String]) -> Result<(), Failure> {
    let Some(sep) = args.iter().position(|a| a == "--") else {
        return usage("server needs `-- PROG [ARGS...]`");
    };
    let (opts, prog) = (&args[..sep], &args[sep + 1..]);
    if prog.is_empty() {
        return usage("server needs a program to run");
    }
    let mut positional = Vec::new();
    let mut tcp = false;
    let mut max_connections = 100usize;
    let mut it = opts.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tcp" => tcp = true,
            "--max-connections" => {
                max_connections = match it.next().and_then(|v| v.parse().ok()) {
                    Some(n) if n > 0 => n,
                    _ => return usage("--max-connections takes a positive number"),
                }
            }
            _ => positional.push(a.as_str()),
        }
    }
    let [name, keydir, ip, port, ext] = positional[..] else {
        return usage("server takes NAME KEYDIR IP PORT EXT");
    };
    let (name, addr, extension) = parse_common(name, ip, port, ext)?;
    let secret = read_key(&Path::new(keydir).join(".expertsonly/secretkey"))?;
    let mut config = ServerConfig::new(BoxKeyPair::from_secret(secret));
    config.name = name;
    config.extension = extension;
    config.max_connections = max_connections;

    let mut poll = Poll::new()?;
    let (udp, tcp_addr) = if tcp {
        (None, Some(addr))
    } else {
        (Some(addr), None)
    };
    let mut driver = ServerDriver::bind(
        poll.registry(),
        Token(0),
        config,
        udp,
        tcp_addr,
        Instant::now(),
    )
    .map_err(|e| Failure::Fatal(format!("unable to bind {addr}: {e}")))?;
    let mut handlers: Slab<Handler> = Slab::new();
    let mut reaping: Vec<Child> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        let now = Instant::now();
        let mut timeout = driver
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        if !reaping.is_empty() {
            // Exited handlers are collected on a short timer (SIGCHLD is not wired in).
            timeout = Some(timeout.map_or(Duration::from_millis(50), |t| {
                t.min(Duration::from_millis(50))
            }));
        }
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        let now = Instant::now();
        for event in events.iter() {
            if driver.owns(event.token()) {
                driver.handle_event(poll.registry(), event, now)?;
            }
            // Pipe events need no bookkeeping: every handler is pumped below.
        }
        while let Some(ev) = driver.poll_event() {
            match ev {
                ServerEvent::Accepted(id) => match spawn_handler(&poll, &mut handlers, id, prog) {
                    Ok(()) => {}
                    Err(e) => {
                        eprintln!("curvecp: unable to run {}: {e}", prog[0]);
                        driver.server_mut().remove(id);
                    }
                },
                ServerEvent::Closed(id) => {
                    if let Some(k) = handlers.iter().find(|(_, h)| h.conn == id).map(|(k, _)| k) {
                        let mut h = handlers.remove(k);
                        drop(h.stdin.take());
                        drop(h.stdout.take());
                        if !h.finished {
                            // The connection died before the handler finished its output.
                            let _ = h.child.kill();
                        }
                        reaping.push(h.child);
                    }
                }
                ServerEvent::Readable(_) | ServerEvent::Writable(_) => {}
            }
        }
        for (_, h) in handlers.iter_mut() {
            pump_handler(&poll, &mut driver, h, &mut buf);
        }
        reaping.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        driver.flush(poll.registry(), Instant::now())?;
    }
}

fn spawn_handler(
    poll: &Poll,
    handlers: &mut Slab<Handler>,
    conn: ConnectionId,
    prog: &[String],
) -> io::Result<()> {
    let mut child = Command::new(&prog[0])
        .args(&prog[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = pipe::Sender::from(child.stdin.take().expect("piped"));
    let mut stdout = pipe::Receiver::from(child.stdout.take().expect("piped"));
    stdin.set_nonblocking(true)?;
    stdout.set_nonblocking(true)?;
    let entry = handlers.vacant_entry();
    let k = entry.key();
    poll.registry()
        .register(&mut stdin, Token(CHILD_TOKENS + 2 * k), Interest::WRITABLE)?;
    poll.registry().register(
        &mut stdout,
        Token(CHILD_TOKENS + 2 * k + 1),
        Interest::READABLE,
    )?;
    entry.insert(Handler {
        conn,
        child,
        stdin: Some(stdin),
        stdout: Some(stdout),
        to_child: Vec::new(),
        to_child_pos: 0,
        from_child: Vec::new(),
        from_child_pos: 0,
        finished: false,
    });
    Ok(())
}

/// Moves bytes both ways between one connection's stream and its handler's pipes, as far as
/// the pipes and the stream's buffers allow (every call is non-blocking).
fn pump_handler(poll: &Poll, driver: &mut ServerDriver, h: &mut Handler, buf: &mut [u8]) {
    let Some(stream) = driver.server_mut().stream_mut(h.conn) else {
        return;
    };
    // Stream -> handler's stdin.
    while let Some(stdin) = h.stdin.as_mut() {
        if h.to_child_pos == h.to_child.len() {
            h.to_child.clear();
            h.to_child_pos = 0;
            let n = stream.read(buf);
            if n == 0 {
                if stream.peer_eof().is_some() {
                    // The client's EOF: close the handler's stdin.
                    let mut s = h.stdin.take().expect("present");
                    let _ = poll.registry().deregister(&mut s);
                }
                break;
            }
            h.to_child.extend_from_slice(&buf[..n]);
        }
        match stdin.write(&h.to_child[h.to_child_pos..]) {
            Ok(n) => h.to_child_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // The handler closed its stdin: discard what the client still sends.
                h.stdin = None;
                h.to_child.clear();
                h.to_child_pos = 0;
            }
        }
    }
    if h.stdin.is_none() {
        // Keep draining the stream so the client's data is acknowledged.
        while stream.read(buf) > 0 {}
    }
    // Handler's stdout -> stream.
    loop {
        if h.from_child_pos < h.from_child.len() {
            let n = stream.write(&h.from_child[h.from_child_pos..]);
            h.from_child_pos += n;
            if h.from_child_pos < h.from_child.len() {
                break; // the stream is full: wait for room
            }
        }
        h.from_child.clear();
        h.from_child_pos = 0;
        let Some(stdout) = h.stdout.as_mut() else {
            if !h.finished {
                h.finished = true;
                stream.finish(Eof::Success);
            }
            break;
        };
        let want = stream.writable().min(buf.len());
        if want == 0 {
            break;
        }
        match stdout.read(&mut buf[..want]) {
            Ok(0) => {
                let mut s = h.stdout.take().expect("present");
                let _ = poll.registry().deregister(&mut s);
            }
            Ok(n) => h.from_child.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => h.stdout = None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// client

const WAKER: Token = Token(1);
/// How long the client waits in silence before probing the server.
const CLIENT_KEEPALIVE: Duration = Duration::from_secs(5);
const SOCKET: Token = Token(0);

/// Reads stdin on its own thread (stdin may be a file, which epoll cannot watch) and hands
/// chunks to the loop; an empty chunk is EOF. The channel is bounded: a slow connection
/// stops the reader.
fn spawn_stdin_reader(waker: Waker) -> Receiver<Vec<u8>> {
    let (tx, rx) = bounded::<Vec<u8>>(16);
    thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        loop {
            let mut chunk = vec![0u8; PIPE_CHUNK];
            let n = match stdin.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            chunk.truncate(n);
            if tx.send(chunk).is_err() {
                return;
            }
            let _ = waker.wake();
            if n == 0 {
                return;
            }
        }
    });
    rx
}

fn client(args: &[String]) -> Result<(), Failure> {
    let tcp = args.iter().any(|a| a == "--tcp");
    let positional: Vec<&str> = args
        .iter()
        .filter(|a| *a != "--tcp")
        .map(String::as_str)
        .collect();
    let [name, key, ip, port, ext] = positional[..] else {
        return usage("client takes NAME SERVERKEYHEX IP PORT EXT");
    };
    let (name, addr, extension) = parse_common(name, ip, port, ext)?;
    let Some(server_key) = BoxPublicKey::from_hex(key) else {
        return usage(format!("bad server key {key:?} (64 hex digits)"));
    };
    let mut config = ClientConfig::new(server_key);
    config.server_name = name;
    config.server_extension = extension;
    // Probe a server that has gone quiet while we wait for its stream, so that a server that
    // vanished (CurveCP has no close packet) ends the client with an error after
    // `dead_after` instead of a wait without end.
    config.stream.keepalive = Some(CLIENT_KEEPALIVE);

    let mut poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    let kind = if tcp {
        TransportKind::Tcp
    } else {
        TransportKind::Udp
    };
    let mut driver =
        ClientDriver::connect(poll.registry(), SOCKET, kind, addr, config, Instant::now())
            .map_err(|e| Failure::Fatal(format!("unable to reach {addr}: {e}")))?;
    let input = spawn_stdin_reader(waker);
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_pos = 0;
    let mut input_done = false;
    let mut stdout = io::stdout().lock();
    let mut events = Events::with_capacity(64);
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        let now = Instant::now();
        let timeout = driver
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        let now = Instant::now();
        for event in events.iter() {
            driver.handle_event(poll.registry(), event, now);
        }
        if let Some(reason) = driver.transport_error() {
            return fatal(reason.to_string());
        }
        let stream = driver.client_mut().stream_mut();
        // stdin -> stream.
        while !input_done {
            if pending_pos < pending.len() {
                pending_pos += stream.write(&pending[pending_pos..]);
                if pending_pos < pending.len() {
                    break;
                }
            }
            match input.try_recv() {
                Ok(chunk) if chunk.is_empty() => {
                    input_done = true;
                    stream.finish(Eof::Success);
                }
                Ok(chunk) => {
                    pending = chunk;
                    pending_pos = 0;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    input_done = true;
                    stream.finish(Eof::Success);
                }
            }
        }
        // stream -> stdout.
        loop {
            let n = stream.read(&mut buf);
            if n == 0 {
                break;
            }
            stdout
                .write_all(&buf[..n])
                .map_err(|e| Failure::Fatal(format!("unable to write stdout: {e}")))?;
        }
        stdout.flush()?;
        let peer_eof = stream.peer_eof();
        let done = stream.is_done();
        driver.flush(poll.registry(), Instant::now())?;
        match driver.client().state() {
            ClientState::Failed(e) => return fatal(format!("connection failed: {e}")),
            _ if peer_eof == Some(Eof::Failure) && done => {
                return fatal("the server ended its stream with failure")
            }
            ClientState::Closed => return Ok(()),
            _ if done => return Ok(()),
            _ => {}
        }
    }
}
