//! [`ServerDriver`]: one CurveCP server over a UDP socket and a TCP listener with its accepted
//! streams, in either framing, with the relay role and the hole punches of a server (their
//! code is in `relayed.rs`, cargo feature `relay`).
//!
//! TCP admission (the per-source cap, eviction, the handshake deadline) is described in the
//! [`super`] module docs.
//!
//! This file is the IO side: reading the UDP socket and the TCP streams (in batches, sending
//! what is due between groups), accepting and admitting streams, sending, closing. What is
//! read is sorted by the transport's dispatcher and handed to the sans-IO handlers of
//! [`super::inbound`]; what they hand back is sent here.

use std::collections::BTreeMap;

use super::inbound::{self, Compat, CompatStats, Nat, StreamFrames};
use super::*;
use crate::transport::dispatch::{self, Carrier, Handler};
use crate::transport::{socket, SourceKey};

/// Limits of a [`ServerDriver`] beyond those of the state machine: the TCP listener's streams
/// (see TCP admission in [`crate::transport::driver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerDriverLimits {
    /// Most TCP streams open at once. When the table is full, a new stream evicts the oldest
    /// stream whose CurveCP handshake has not completed; only a table full of authenticated
    /// streams closes the new one on accept. Default 1,024.
    pub max_tcp_streams: usize,
    /// A TCP stream that carries no valid packet for this long is closed. Default 120 s.
    pub tcp_idle: Duration,
    /// A TCP stream must complete a CurveCP handshake (its Initiate accepted) within this long
    /// of its accept, or it is closed (never later than [`ServerDriverLimits::tcp_idle`]).
    /// Default 5 s (a handshake takes two round trips).
    pub tcp_handshake_timeout: Duration,
    /// Most TCP streams without a completed handshake from one source address (IPv6: one /64
    /// prefix) at once; a new one beyond evicts that source's oldest. At least 1 (0 is taken
    /// as 1). Default 64, as many as the connection manager lets one address hold
    /// (`NetConfig::max_inbound_per_ip`): a source may have that many handshakes in flight,
    /// and 16 sources at their cap fill the default table (then the oldest goes).
    pub max_unauthenticated_tcp_per_source: usize,
}

impl Default for ServerDriverLimits {
    fn default() -> Self {
        ServerDriverLimits {
            max_tcp_streams: 1024,
            tcp_idle: Duration::from_secs(120),
            tcp_handshake_timeout: Duration::from_secs(5),
            max_unauthenticated_tcp_per_source: 64,
        }
    }
}

/// Streams accepted per listener event (or per `flush` that goes on accepting) before the
/// application gets a turn.
pub const ACCEPT_BATCH: usize = 64;

/// Where an unauthenticated stream sits in the accept order: its handshake deadline, then its
/// generation (unique).
type UnauthKey = (Instant, u64);

struct TcpSlot {
    stream: FramedStream,
    generation: u64,
    last_active: Instant,
    /// Chosen by the stream's first frame.
    framing: Option<Framing>,
    /// Listed in `tcp_more` (stopped at a batch with frames perhaps still waiting).
    more: bool,
    /// The peer's address, as accepted.
    peer: SocketAddr,
    source: SourceKey,
    /// `Some` (its key in `unauth`) until the stream's CurveCP handshake completes.
    unauth: Option<UnauthKey>,
}

/// Counters of a [`ServerDriver`]'s TCP admission (see [`crate::transport::driver`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Streams accepted into the table.
    pub accepted: u64,
    /// Streams that completed a CurveCP handshake.
    pub authenticated: u64,
    /// Unauthenticated streams evicted because a newer one came from their source at
    /// [`ServerDriverLimits::max_unauthenticated_tcp_per_source`].
    pub evicted_per_source: u64,
    /// Unauthenticated streams evicted because the table was full.
    pub evicted_table_full: u64,
    /// New streams closed on accept: the table was full of authenticated streams.
    pub refused: u64,
    /// Streams closed at [`ServerDriverLimits::tcp_handshake_timeout`].
    pub handshake_timeouts: u64,
    /// Streams closed after [`ServerDriverLimits::tcp_idle`] without a valid packet.
    pub idle_closed: u64,
}

/// Runs one [`Server`] over a UDP socket and a TCP listener (either may be absent), serving
/// the native and the compatibility framing on both at once (see the module docs); a
/// connection's framing is [`Path::framing`] of [`Server::path`].
///
/// Tokens: `base` is the UDP socket, `base + 1` the TCP listener, `base + 2 + slot` each TCP
/// stream; [`ServerDriver::owns`] tells whether an event is the driver's.
pub struct ServerDriver {
    server: Server<Path>,
    pub(super) udp: Option<UdpEndpoint>,
    listener: Option<TcpListener>,
    tcp: Slab<TcpSlot>,
    generation: u64,
    base: usize,
    limits: ServerDriverLimits,
    /// Idle checks of authenticated streams: (when, slot, generation).
    idle_checks: VecDeque<(Instant, usize, u64)>,
    /// Unauthenticated streams in accept order (their handshake deadlines), to their slots.
    unauth: BTreeMap<UnauthKey, usize>,
    /// Unauthenticated streams per source, oldest first (at most
    /// `max_unauthenticated_tcp_per_source` each; sources without any are removed).
    unauth_by_source: HashMap<SourceKey, VecDeque<UnauthKey>>,
    /// The last accept stopped at [`ACCEPT_BATCH`]: `flush` accepts on.
    accept_more: bool,
    tcp_stats: TcpStats,
    paths: HashMap<ConnectionId, Path>,
    /// The compatibility framing's UDP sessions and counters.
    compat: Compat,
    events: VecDeque<ServerEvent>,
    buf: Box<[u8; MAX_PACKET]>,
    reply: Box<[u8; MAX_PACKET]>,
    /// Wrapped packets and replies of the compatibility framing.
    wrap: Box<[u8; MAX_DATAGRAM]>,
    udp_more: bool,
    /// TCP streams (slot, generation) that stopped at [`TCP_READ_BATCH`] frames: `flush` reads
    /// on.
    tcp_more: Vec<(usize, u64)>,
    /// `flush` read packets (the application has not had a turn since).
    read_in_flush: bool,
    /// TCP slots with frames queued in this `flush`.
    dirty: Vec<usize>,
    /// The relay role, bound relays, punches and dial-back.
    pub(super) nat: Nat,
    /// Relay datagrams (a packet and a relay header).
    rbuf: Box<[u8; MAX_PACKET + relay::OVERHEAD]>,
}

impl ServerDriver {
    /// Binds the listeners (at least one must be given) and starts the server.
    pub fn bind(
        registry: &Registry,
        base: Token,
        config: ServerConfig,
        udp: Option<SocketAddr>,
        tcp: Option<SocketAddr>,
        now: Instant,
    ) -> io::Result<ServerDriver> {
        Self::bind_with_limits(
            registry,
            base,
            config,
            udp,
            tcp,
            ServerDriverLimits::default(),
            now,
        )
    }

    /// [`ServerDriver::bind`] with explicit limits.
    pub fn bind_with_limits(
        registry: &Registry,
        base: Token,
        config: ServerConfig,
        udp: Option<SocketAddr>,
        tcp: Option<SocketAddr>,
        limits: ServerDriverLimits,
        now: Instant,
    ) -> io::Result<ServerDriver> {
        if udp.is_none() && tcp.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a server needs a UDP or a TCP address",
            ));
        }
        let udp = match udp {
            Some(a) => Some(UdpEndpoint::bind(registry, base, a)?),
            None => None,
        };
        let listener = match tcp {
            Some(a) => {
                let mut l = bind_tcp_listener(a)?;
                registry.register(&mut l, Token(base.0 + 1), Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        Ok(ServerDriver {
            server: Server::new(config, now),
            udp,
            listener,
            tcp: Slab::new(),
            generation: 0,
            base: base.0,
            limits,
            idle_checks: VecDeque::new(),
            unauth: BTreeMap::new(),
            unauth_by_source: HashMap::new(),
            accept_more: false,
            tcp_stats: TcpStats::default(),
            paths: HashMap::new(),
            compat: Compat::default(),
            events: VecDeque::new(),
            buf: Box::new([0; MAX_PACKET]),
            reply: Box::new([0; MAX_PACKET]),
            wrap: Box::new([0; MAX_DATAGRAM]),
            udp_more: false,
            tcp_more: Vec::new(),
            read_in_flush: false,
            dirty: Vec::new(),
            nat: Nat::default(),
            rbuf: Box::new([0; MAX_PACKET + relay::OVERHEAD]),
        })
        .map(|mut d| {
            d.server.set_roaming(may_roam);
            d.server.set_path_burst(path_burst);
            d
        })
    }

    /// The next thing learnt from relay datagrams.
    pub fn poll_nat_event(&mut self) -> Option<NatEvent> {
        self.nat.events.pop_front()
    }

    /// Waits for a dial-back probe carrying `nonce` (replacing any awaited one; `None`: stop
    /// waiting): when it reaches the listening UDP socket, [`NatEvent::DialedBack`] is raised
    /// once. Probes with any other nonce are dropped.
    pub fn expect_dial_back(&mut self, nonce: Option<[u8; relay::DIAL_BACK_NONCE_LEN]>) {
        self.nat.dial_back = nonce;
    }

    /// Dials `target` back for a peer that asked ([`relay::DialBackGuard`] is the caller's):
    /// [`relay::DIAL_BACK_COPIES`] probes with `nonce` from a fresh UDP socket (not the
    /// listening one, so no NAT mapping or conntrack entry of ours lets them through), which
    /// is closed at once.
    pub fn dial_back(
        &mut self,
        target: SocketAddr,
        nonce: &[u8; relay::DIAL_BACK_NONCE_LEN],
    ) -> io::Result<()> {
        let local: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(local)?;
        socket.set_nonblocking(true)?;
        let d = relay::dial_back_datagram(nonce);
        for _ in 0..relay::DIAL_BACK_COPIES {
            socket.send_to(&d, target)?;
        }
        Ok(())
    }

    /// Sends `datagram` from the listening UDP socket (a dial-back probe and the like).
    pub fn send_datagram(&mut self, datagram: &[u8], to: SocketAddr) -> io::Result<()> {
        match self.udp.as_mut() {
            Some(u) => u.send_to(datagram, to),
            None => Ok(()),
        }
    }

    /// Asks the node at `to` who it is (a who-is datagram from the listening UDP socket; see
    /// [`relay`]): a relay's answer raises [`NatEvent::RelayIs`]. At most
    /// 32 questions are awaited (the oldest is forgotten).
    pub fn ask_whois(&mut self, to: SocketAddr) -> io::Result<()> {
        let Some(u) = self.udp.as_mut() else {
            return Ok(());
        };
        let mut nonce = [0u8; relay::WHO_NONCE_LEN];
        crate::crypto::random_bytes(&mut nonce);
        let whois = &mut self.nat.whois;
        whois.retain(|w| w.0 != to);
        if whois.len() >= super::inbound::MAX_WHOIS {
            whois.pop_front();
        }
        whois.push_back((to, nonce));
        u.send_to(&relay::who_datagram(&nonce), to)
    }

    /// The UDP listener's address.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().and_then(|u| u.local_addr().ok())
    }

    /// The TCP listener's address.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Whether `token` belongs to this driver.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.base && token.0 < self.base + 2 + self.tcp.capacity().max(1)
    }

    /// The state machine.
    pub fn server(&self) -> &Server<Path> {
        &self.server
    }

    /// The state machine, to read and write connection streams.
    pub fn server_mut(&mut self) -> &mut Server<Path> {
        &mut self.server
    }

    /// The remote IP address of a connection's path: the UDP peer's, or the accepted TCP
    /// stream's (`None` once that stream is gone).
    pub fn peer_ip(&self, path: Path) -> Option<std::net::IpAddr> {
        match path {
            Path::Udp(a) | Path::UdpCompat { addr: a, .. } => Some(a.ip()),
            Path::Relayed { peer, .. } => Some(peer.ip()),
            Path::Tcp {
                slot, generation, ..
            } => self
                .tcp
                .get(slot)
                .filter(|t| t.generation == generation)
                .map(|t| t.peer.ip()),
        }
    }

    /// TCP streams open now.
    pub fn tcp_streams(&self) -> usize {
        self.tcp.len()
    }

    /// TCP streams open now whose CurveCP handshake has not completed.
    pub fn tcp_unauthenticated(&self) -> usize {
        self.unauth.len()
    }

    /// Counters of the TCP admission.
    pub fn tcp_stats(&self) -> TcpStats {
        self.tcp_stats
    }

    /// Counters of the UDP socket (`None` without one).
    pub fn udp_stats(&self) -> Option<crate::transport::udp::UdpStats> {
        self.udp.as_ref().map(UdpEndpoint::stats)
    }

    /// Counters of the compatibility framing.
    pub fn compat_stats(&self) -> CompatStats {
        self.compat.stats
    }

    /// The next server event (accepted, readable, writable, closed connections).
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.pump_events();
        self.events.pop_front()
    }

    fn pump_events(&mut self) {
        while let Some(ev) = self.server.poll_event() {
            match ev {
                ServerEvent::Accepted(id) => {
                    if let Some(p) = self.server.path(id) {
                        self.paths.insert(id, p);
                        match p {
                            Path::UdpCompat { .. } => {
                                self.compat.sessions.insert(p, id);
                            }
                            Path::Tcp {
                                slot, generation, ..
                            } => self.authenticate(slot, generation),
                            _ => {}
                        }
                    }
                }
                ServerEvent::Closed(id) => match self.paths.remove(&id) {
                    // The stream carried that one connection: close it.
                    Some(Path::Tcp {
                        slot, generation, ..
                    }) if self.tcp.get(slot).map(|s| s.generation) == Some(generation) => {
                        self.close_stream(None, slot, false);
                    }
                    Some(p @ Path::UdpCompat { .. })
                        if self.compat.sessions.get(&p) == Some(&id) =>
                    {
                        self.compat.sessions.remove(&p);
                    }
                    _ => {}
                },
                _ => {}
            }
            self.events.push_back(ev);
        }
    }

    /// Handles one readiness event of the driver's sockets.
    pub fn handle_event(
        &mut self,
        registry: &Registry,
        event: &Event,
        now: Instant,
    ) -> io::Result<()> {
        let t = event.token().0;
        if t == self.base {
            self.read_udp(registry, now)?;
            self.read_in_flush = false;
        } else if t == self.base + 1 {
            self.accept(registry, now)?;
        } else if t >= self.base + 2 {
            let slot = t - self.base - 2;
            self.tcp_event(registry, slot, event, now)?;
        }
        Ok(())
    }

    /// Reads up to a batch of datagrams, each handed to the handler [`dispatch::sort`] names
    /// for it; returns how many.
    fn read_udp(&mut self, registry: &Registry, now: Instant) -> io::Result<usize> {
        let mut read = 0;
        while read < READ_BATCH {
            let Some(udp) = self.udp.as_mut() else {
                return Ok(0);
            };
            let Some((d, from)) = udp.recv_one()? else {
                break;
            };
            read += 1;
            let (server, reply) = (&mut self.server, &mut self.reply[..]);
            let handler = dispatch::sort(Carrier::Datagram, d);
            let answer = match handler {
                Handler::Native => inbound::native_datagram(server, reply, d, from, now),
                Handler::Compat => {
                    self.compat
                        .datagram(server, reply, &mut self.wrap[..], d, from, now)
                }
                Handler::Relay => {
                    self.nat
                        .datagram(server, reply, &mut self.rbuf[..], d, from, now)
                }
                Handler::Drop => None,
            };
            // An answer goes to whatever address the datagram claimed: failing to reach it (no
            // route, refused by a firewall) loses that answer only and must not stop reading
            // the datagrams behind it.
            if let Some(a) = answer {
                if let Err(e) = udp.send_to(a.bytes, a.to) {
                    debug!("server: {} to {} not sent: {e}", a.what, a.to);
                }
            }
            // More may be waiting: answer what arrived so far first (relay datagrams aside, as
            // before the dispatcher).
            if handler != Handler::Relay && read % TRANSMIT_EVERY == 0 {
                self.transmit(registry, now)?;
            }
        }
        self.udp_more = read >= READ_BATCH;
        Ok(read)
    }

    /// Accepts up to [`ACCEPT_BATCH`] streams (then `flush` accepts on), admitting each
    /// ([`ServerDriver::admit`]).
    fn accept(&mut self, registry: &Registry, now: Instant) -> io::Result<()> {
        // Handshakes the server completed count before anything is evicted.
        self.pump_events();
        self.accept_more = false;
        let mut accepted = 0;
        while accepted < ACCEPT_BATCH {
            let Some(listener) = self.listener.as_ref() else {
                return Ok(());
            };
            match listener.accept() {
                Ok((stream, from)) => {
                    accepted += 1;
                    let from = crate::transport::udp::canonical(from);
                    self.admit(registry, stream, from, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A connection reset before accept, or out of descriptors: skip this one.
                Err(e) => {
                    debug!("server: accept failed: {e}");
                    return Ok(());
                }
            }
        }
        // More may be waiting (readiness is edge-triggered): `flush` comes back to them.
        self.accept_more = true;
        Ok(())
    }

    /// Takes an accepted stream into the table (TCP admission, see
    /// [`crate::transport::driver`]): makes room by evicting the oldest unauthenticated stream
    /// of its source (at the per-source limit) or of the whole table (when full), or refuses
    /// it when the table is full of authenticated streams.
    fn admit(
        &mut self,
        registry: &Registry,
        stream: mio::net::TcpStream,
        from: SocketAddr,
        now: Instant,
    ) {
        let source = SourceKey::of(from.ip());
        self.evict_for_source(registry, source, from);
        // Each turn takes a key out of `unauth`: bounded.
        while self.tcp.len() >= self.limits.max_tcp_streams {
            let Some(&oldest) = self.unauth.keys().next() else {
                debug!(
                    "server: refused a TCP stream from {from}: {} streams open, all \
                     authenticated",
                    self.tcp.len()
                );
                self.tcp_stats.refused += 1;
                socket::reset_on_close(&stream);
                return;
            };
            if let Some(peer) = self.close_unauth(registry, oldest) {
                debug!(
                    "server: evicted the oldest TCP stream without a CurveCP handshake (from \
                     {peer}) for one from {from}: {} streams were open",
                    self.tcp.len() + 1
                );
                self.tcp_stats.evicted_table_full += 1;
            }
        }
        let entry = self.tcp.vacant_entry();
        let slot = entry.key();
        let token = Token(self.base + 2 + slot);
        // Either framing: room for a wrapped packet.
        match FramedStream::new(registry, token, stream, onetp::MAX_SOCKET_PACKET) {
            Ok(stream) => {
                self.generation += 1;
                let deadline = now + self.limits.tcp_handshake_timeout.min(self.limits.tcp_idle);
                let key = (deadline, self.generation);
                entry.insert(TcpSlot {
                    stream,
                    generation: self.generation,
                    last_active: now,
                    framing: None,
                    more: false,
                    peer: from,
                    source,
                    unauth: Some(key),
                });
                self.unauth.insert(key, slot);
                self.unauth_by_source
                    .entry(source)
                    .or_default()
                    .push_back(key);
                self.tcp_stats.accepted += 1;
            }
            Err(e) => debug!("server: could not register a TCP stream from {from}: {e}"),
        }
    }

    /// Makes room for a stream from `from` (of `source`): at the per-source limit of
    /// unauthenticated streams, that source's oldest one is closed.
    fn evict_for_source(&mut self, registry: &Registry, source: SourceKey, from: SocketAddr) {
        let per_source = self.limits.max_unauthenticated_tcp_per_source.max(1);
        let held = self.unauth_by_source.get(&source).map_or(0, VecDeque::len);
        if held < per_source {
            return;
        }
        let Some(&oldest) = self.unauth_by_source.get(&source).and_then(|q| q.front()) else {
            return;
        };
        match self.close_unauth(registry, oldest) {
            Some(peer) => {
                debug!(
                    "server: evicted the oldest TCP stream from {peer} for one from {from}: \
                     {held} streams of that source without a CurveCP handshake"
                );
                self.tcp_stats.evicted_per_source += 1;
            }
            // No stream under it (ruled out by the bookkeeping): drop the entry.
            None => {
                if let Some(q) = self.unauth_by_source.get_mut(&source) {
                    q.pop_front();
                    if q.is_empty() {
                        self.unauth_by_source.remove(&source);
                    }
                }
            }
        }
    }

    /// The stream in `slot` (of `generation`) completed a CurveCP handshake: it leaves the
    /// unauthenticated ones, and its idle checks start.
    fn authenticate(&mut self, slot: usize, generation: u64) {
        let Some(s) = self.tcp.get(slot).filter(|s| s.generation == generation) else {
            return;
        };
        if s.unauth.is_none() {
            return;
        }
        let due = s.last_active + self.limits.tcp_idle;
        self.forget_unauth(slot);
        self.tcp_stats.authenticated += 1;
        self.idle_checks.push_back((due, slot, generation));
        // Checks of closed streams stay until due; keep them within a bound.
        if self.idle_checks.len() > 2 * self.tcp.len().max(32) {
            let tcp = &self.tcp;
            self.idle_checks
                .retain(|&(_, slot, g)| tcp.get(slot).is_some_and(|s| s.generation == g));
        }
    }

    /// Takes the stream in `slot` out of the unauthenticated ones (if it is one).
    fn forget_unauth(&mut self, slot: usize) {
        let Some(s) = self.tcp.get_mut(slot) else {
            return;
        };
        let Some(key) = s.unauth.take() else {
            return;
        };
        self.unauth.remove(&key);
        if let Some(q) = self.unauth_by_source.get_mut(&s.source) {
            if let Some(i) = q.iter().position(|k| *k == key) {
                q.remove(i);
            }
            if q.is_empty() {
                self.unauth_by_source.remove(&s.source);
            }
        }
    }

    /// Closes the stream in `slot` (deregistered when `registry` is given; the descriptor
    /// closes either way), with a reset when `reset` (no `TIME_WAIT` left behind).
    fn close_stream(&mut self, registry: Option<&Registry>, slot: usize, reset: bool) {
        if !self.tcp.contains(slot) {
            return;
        }
        self.forget_unauth(slot);
        let mut s = self.tcp.remove(slot);
        if reset {
            s.stream.reset_on_close();
        }
        if let Some(r) = registry {
            let _ = s.stream.deregister(r);
        }
    }

    /// Closes the unauthenticated stream under `key` with a reset and returns its peer's
    /// address. The key leaves `unauth` either way (`None`: no stream was under it, which
    /// the bookkeeping rules out, but a caller looping over `unauth` must not spin on it).
    fn close_unauth(&mut self, registry: &Registry, key: UnauthKey) -> Option<SocketAddr> {
        let slot = self.unauth.remove(&key)?;
        let peer = self.tcp.get(slot).filter(|s| s.unauth == Some(key))?.peer;
        self.close_stream(Some(registry), slot, true);
        Some(peer)
    }

    /// Closes the unauthenticated streams whose handshake deadline has come.
    fn close_unauthenticated(&mut self, registry: &Registry, now: Instant) {
        let timeout = self.limits.tcp_handshake_timeout.min(self.limits.tcp_idle);
        while let Some(&key) = self.unauth.keys().next() {
            if key.0 > now {
                break;
            }
            if let Some(peer) = self.close_unauth(registry, key) {
                debug!("server: closed the TCP stream from {peer}: no CurveCP handshake within {timeout:?}");
                self.tcp_stats.handshake_timeouts += 1;
            }
        }
    }

    fn tcp_event(
        &mut self,
        registry: &Registry,
        slot: usize,
        event: &Event,
        now: Instant,
    ) -> io::Result<()> {
        let Some(entry) = self.tcp.get_mut(slot) else {
            return Ok(());
        };
        if event.is_writable()
            && entry
                .stream
                .flush(registry, Token(self.base + 2 + slot))
                .is_err()
        {
            self.close_stream(Some(registry), slot, false);
            return Ok(());
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.tcp_read(registry, slot, now)?;
        }
        Ok(())
    }

    /// Reads a TCP stream's frames, up to [`TCP_READ_BATCH`] of them (then the slot is noted in
    /// `tcp_more` and `flush` comes back to it), sending what is due after every
    /// [`TRANSMIT_EVERY`]: a receiver that drained a fast sender's whole window before
    /// acknowledging any of it kept that sender waiting about half the time.
    fn tcp_read(&mut self, registry: &Registry, slot: usize, now: Instant) -> io::Result<()> {
        let mut total = 0;
        loop {
            if !self.tcp_read_some(registry, slot, now, TRANSMIT_EVERY) {
                return Ok(());
            }
            total += TRANSMIT_EVERY;
            if total >= TCP_READ_BATCH {
                // Listed once: an event and a `flush` may both stop at the batch in one turn.
                if let Some(s) = self.tcp.get_mut(slot).filter(|s| !s.more) {
                    s.more = true;
                    self.tcp_more.push((slot, s.generation));
                }
                return Ok(());
            }
            self.transmit(registry, now)?;
        }
    }

    /// Hands at most `max` frames of a TCP stream to the server ([`StreamFrames`]) and
    /// answers them; true when it stopped at `max` (more may be waiting), false when drained or
    /// closed.
    fn tcp_read_some(
        &mut self,
        registry: &Registry,
        slot: usize,
        now: Instant,
        max: usize,
    ) -> bool {
        let Some(entry) = self.tcp.get_mut(slot) else {
            return false;
        };
        let mut frames = StreamFrames::new(slot, entry.generation, entry.framing);
        let (server, reply) = (&mut self.server, &mut self.reply[..]);
        let status = entry
            .stream
            .read_frames_up_to(max, |f| frames.frame(server, reply, f, now));
        let mut close = self.answer_frames(registry, slot, &frames, now);
        let mut more = false;
        match status {
            Ok(ReadStatus::Open) => {}
            Ok(ReadStatus::More) => more = true,
            Ok(ReadStatus::Closed) => close = true,
            Ok(ReadStatus::Invalid(e)) => {
                debug!("server: closing a TCP stream: {e}");
                close = true;
            }
            Err(e) => {
                debug!("server: TCP read failed: {e}");
                close = true;
            }
        }
        if close {
            self.close_stream(Some(registry), slot, false);
            return false;
        }
        more
    }

    /// Settles one read of the stream in `slot`: notes its activity and the framing its first
    /// frame chose, counts, and writes the PONG and the reply its frames asked for. True when
    /// the stream must close (its first frame chose no framing, or the write failed).
    fn answer_frames(
        &mut self,
        registry: &Registry,
        slot: usize,
        frames: &StreamFrames,
        now: Instant,
    ) -> bool {
        let token = Token(self.base + 2 + slot);
        let Some(entry) = self.tcp.get_mut(slot) else {
            return true;
        };
        if frames.valid {
            entry.last_active = now;
        }
        let compat = &mut self.compat.stats;
        if frames.chosen == Some(Framing::Compat) && entry.framing.is_none() {
            compat.tcp_streams += 1;
            entry.stream.set_frame_per_write(true);
        }
        entry.framing = frames.chosen;
        compat.dropped += frames.dropped;
        if frames.pong {
            compat.replies += 1;
            entry.stream.queue_frame(&[onetp::PONG]);
        }
        if let Some(len) = frames.reply {
            let frame = match frames.chosen {
                Some(Framing::Compat) => {
                    onetp::wrap_tcp(&self.reply[..len], &mut self.wrap[..]).map(|m| &self.wrap[..m])
                }
                _ => Some(&self.reply[..len]),
            };
            if let Some(frame) = frame {
                entry.stream.queue_frame(frame);
            }
        }
        let mut close = false;
        if frames.pong || frames.reply.is_some() {
            close |= entry.stream.flush(registry, token).is_err();
        }
        if frames.refused {
            debug!("server: closing a TCP stream whose first frame is neither framing");
            compat.tcp_refused += 1;
            close = true;
        }
        close
    }

    /// Sends every packet due at `now`, accepts on after a full accept batch, closes TCP
    /// streams past their handshake deadline and idle ones, and returns; call it after
    /// handling a batch of events and whenever `next_deadline` passes.
    pub fn flush(&mut self, registry: &Registry, now: Instant) -> io::Result<()> {
        self.read_in_flush = false;
        if self.accept_more {
            self.accept(registry, now)?;
        }
        if self.udp_more {
            self.read_in_flush = self.read_udp(registry, now)? > 0;
        }
        if !self.tcp_more.is_empty() {
            let more = std::mem::take(&mut self.tcp_more);
            for &(slot, generation) in &more {
                if let Some(s) = self
                    .tcp
                    .get_mut(slot)
                    .filter(|s| s.generation == generation)
                {
                    s.more = false;
                    self.tcp_read(registry, slot, now)?;
                    self.read_in_flush = true;
                }
            }
        }
        self.transmit(registry, now)?;
        if let Some(u) = self.udp.as_mut() {
            self.nat.relays.send_probes(u, now);
        }
        self.pump_events();
        self.close_unauthenticated(registry, now);
        self.close_idle(registry, now);
        Ok(())
    }

    /// Sends every packet the server has due at `now`: UDP ones batched, TCP ones queued per
    /// stream and written once per stream.
    fn transmit(&mut self, registry: &Registry, now: Instant) -> io::Result<()> {
        loop {
            let buf = match self.udp.as_mut().map(|u| u.batch_slot()) {
                Some(slot) => slot,
                None => &mut self.buf[..],
            };
            let Some((path, n)) = self.server.poll_transmit(now, buf) else {
                break;
            };
            match path {
                Path::Udp(to) => {
                    if let Some(u) = self.udp.as_mut() {
                        u.batch_commit(n, to)?;
                    }
                }
                Path::Relayed { relay, peer } => {
                    let Some(u) = self.udp.as_mut() else {
                        continue;
                    };
                    match relay::wrap_back(peer, &u.batch_slot()[..n], &mut self.rbuf[..]) {
                        Some(m) => u.send_to(&self.rbuf[..m], relay)?,
                        None => debug!("server: a {n}-byte packet cannot be relayed"),
                    }
                }
                Path::UdpCompat { addr, session } => {
                    // Wrapped, it outgrows a batch slot: sent alone (the slot is reused).
                    let Some(u) = self.udp.as_mut() else {
                        continue;
                    };
                    match onetp::wrap_udp(&session, &u.batch_slot()[..n], &mut self.wrap[..]) {
                        Some(m) => u.send_to(&self.wrap[..m], addr)?,
                        None => debug!("server: a {n}-byte packet cannot be wrapped"),
                    }
                }
                Path::Tcp {
                    slot,
                    generation,
                    framing,
                } => self.queue_tcp(slot, generation, framing, n),
            }
        }
        if let Some(u) = self.udp.as_mut() {
            u.batch_flush()?;
        }
        // One write per TCP stream for everything queued above.
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            let token = Token(self.base + 2 + slot);
            let failed = match self.tcp.get_mut(slot) {
                Some(s) => s.stream.flush(registry, token).is_err(),
                None => false,
            };
            if failed {
                self.close_stream(Some(registry), slot, false);
            }
        }
        dirty.clear();
        self.dirty = dirty;
        Ok(())
    }

    /// Queues the `n`-byte packet `transmit` just wrote (into the UDP batch slot, or `buf`
    /// without a UDP socket) on the TCP stream in `slot`, if it is still of `generation`; the
    /// stream is written once the turn's packets are all queued.
    fn queue_tcp(&mut self, slot: usize, generation: u64, framing: Framing, n: usize) {
        let Some(s) = self
            .tcp
            .get_mut(slot)
            .filter(|s| s.generation == generation)
        else {
            return;
        };
        if s.stream.pending_write() == 0 {
            self.dirty.push(slot);
        }
        let pkt = match self.udp.as_mut().map(|u| u.batch_slot()) {
            Some(slot) => &slot[..n],
            None => &self.buf[..n],
        };
        match framing {
            Framing::Native => {
                s.stream.queue_frame(pkt);
            }
            Framing::Compat => match onetp::wrap_tcp(pkt, &mut self.wrap[..]) {
                Some(m) => {
                    s.stream.queue_frame(&self.wrap[..m]);
                }
                None => debug!("server: a {n}-byte packet cannot be wrapped"),
            },
        }
    }

    /// Closes authenticated TCP streams idle for too long (unauthenticated ones are closed by
    /// their handshake deadline first).
    fn close_idle(&mut self, registry: &Registry, now: Instant) {
        while let Some(&(when, slot, generation)) = self.idle_checks.front() {
            if when > now {
                break;
            }
            self.idle_checks.pop_front();
            let Some(s) = self.tcp.get(slot) else {
                continue;
            };
            if s.generation != generation {
                continue;
            }
            let due = s.last_active + self.limits.tcp_idle;
            if due <= now {
                debug!(
                    "server: closing the TCP stream from {}: no valid packet for {:?}",
                    s.peer, self.limits.tcp_idle
                );
                self.tcp_stats.idle_closed += 1;
                self.close_stream(Some(registry), slot, false);
            } else {
                self.idle_checks.push_back((due, slot, generation));
            }
        }
    }

    /// When the driver next needs `flush` without any socket event.
    pub fn next_deadline(&self) -> Option<Instant> {
        // Packets `flush` read may have raised events the application has not had a turn for.
        if self.udp_more || self.read_in_flush || !self.tcp_more.is_empty() || self.accept_more {
            return Some(Instant::now());
        }
        let idle = self.idle_checks.front().map(|c| c.0);
        let handshake = self.unauth.first_key_value().map(|(k, _)| k.0);
        let probe = self.nat.relays.next_deadline();
        [self.server.poll_timeout(), idle, handshake, probe]
            .into_iter()
            .flatten()
            .min()
    }
}

/// A listener on `addr`; on `::` it takes both families (whatever the system's
/// `bindv6only`), IPv4 peers appearing IPv4-mapped (made plain IPv4 at accept).
fn bind_tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    if !(addr.is_ipv6() && addr.ip().is_unspecified()) {
        return TcpListener::bind(addr);
    }
    let s = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_only_v6(false)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into()))
}
