//! [`ClientDriver`]: one CurveCP client over a UDP socket or a TCP stream, in either framing,
//! with the relayed path and hole punch of a client (their code is in `relayed.rs`, cargo
//! feature `relay`).

use super::relayed::ClientRelay;
use super::*;
use crate::transport::dispatch::{self, Carrier, Handler};

pub(super) enum ClientLink {
    Udp(UdpEndpoint),
    Tcp(FramedStream),
}

/// Runs one [`Client`] over UDP or TCP, in the native or the compatibility framing.
pub struct ClientDriver {
    pub(super) client: Client,
    pub(super) link: ClientLink,
    token: Token,
    pub(super) peer: SocketAddr,
    pub(super) buf: Box<[u8; MAX_PACKET]>,
    /// The compatibility framing's connecting side (`None`: native framing).
    dialer: Option<Dialer>,
    /// Wrapped packets and the dialer's control packets ([`MAX_DATAGRAM`] bytes; empty for
    /// the native framing).
    pub(super) wrapped: Vec<u8>,
    more_to_read: bool,
    /// The latest read delivered at least one packet.
    read_some: bool,
    /// `flush` read packets (the application has not had a turn since).
    read_in_flush: bool,
    closed: Option<String>,
    /// Started through a relay (`peer` is the relay while relayed): that path and its hole
    /// punch ([`ClientDriver::connect_relayed`]; never without the `relay` feature).
    pub(super) relay: Option<ClientRelay>,
    /// Dialling two addresses of the server, until one answers (`race.rs`).
    pub(super) race: Option<super::race::Race>,
}

impl ClientDriver {
    /// Where packets go now (the relay's address while relayed) and whether through a relay.
    pub fn path(&self) -> (SocketAddr, bool) {
        (
            self.peer,
            self.relay.as_ref().is_some_and(ClientRelay::relayed),
        )
    }

    /// Opens a socket (UDP bound to an ephemeral port of the same family, or a TCP
    /// connection) to `peer`, registers it under `token`, and starts `client`, in the native
    /// framing.
    pub fn connect(
        registry: &Registry,
        token: Token,
        kind: TransportKind,
        peer: SocketAddr,
        config: ClientConfig,
        now: Instant,
    ) -> io::Result<ClientDriver> {
        Self::connect_with_framing(registry, token, kind, Framing::Native, peer, config, now)
    }

    /// [`ClientDriver::connect`] in the given framing. With [`Framing::Compat`] the driver
    /// first runs a 1tp [`Dialer`] on its own ephemeral socket (UDP) or stream (TCP), and the
    /// CurveCP client sends nothing until the dialer is open.
    pub fn connect_with_framing(
        registry: &Registry,
        token: Token,
        kind: TransportKind,
        framing: Framing,
        peer: SocketAddr,
        config: ClientConfig,
        now: Instant,
    ) -> io::Result<ClientDriver> {
        Self::connect_from(registry, token, kind, framing, peer, None, config, now)
    }

    /// [`ClientDriver::connect_with_framing`], a UDP socket bound to `local` when given.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn connect_from(
        registry: &Registry,
        token: Token,
        kind: TransportKind,
        framing: Framing,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        config: ClientConfig,
        now: Instant,
    ) -> io::Result<ClientDriver> {
        let compat = framing == Framing::Compat;
        let max_frame = if compat {
            onetp::MAX_SOCKET_PACKET
        } else {
            MAX_PACKET
        };
        let link = match kind {
            TransportKind::Udp => {
                let any: SocketAddr = if peer.is_ipv4() {
                    "0.0.0.0:0".parse().expect("literal")
                } else {
                    "[::]:0".parse().expect("literal")
                };
                let local = match local {
                    Some(a) => a,
                    None if peer.ip().is_loopback() => SocketAddr::new(peer.ip(), 0),
                    None => any,
                };
                ClientLink::Udp(UdpEndpoint::bind(registry, token, local)?)
            }
            TransportKind::Tcp => {
                let mut s = FramedStream::connect(registry, token, peer, max_frame)?;
                s.set_frame_per_write(compat);
                ClientLink::Tcp(s)
            }
        };
        let dialer = match (framing, kind) {
            (Framing::Native, _) => None,
            (Framing::Compat, TransportKind::Udp) => Some(Dialer::udp(now)),
            (Framing::Compat, TransportKind::Tcp) => Some(Dialer::tcp(now)),
        };
        let mut client = Client::new(config, now);
        if kind == TransportKind::Tcp {
            client
                .stream_mut()
                .set_max_burst(crate::transport::tcp::TCP_MAX_BURST);
        }
        Ok(ClientDriver {
            client,
            link,
            token,
            peer,
            buf: Box::new([0; MAX_PACKET]),
            dialer,
            wrapped: if compat {
                vec![0; MAX_DATAGRAM]
            } else {
                Vec::new()
            },
            more_to_read: false,
            read_some: false,
            read_in_flush: false,
            closed: None,
            relay: None,
            race: None,
        })
    }

    /// The token the driver's socket is registered under.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Counters of the UDP socket (`None` over TCP).
    pub fn udp_stats(&self) -> Option<crate::transport::udp::UdpStats> {
        match &self.link {
            ClientLink::Udp(u) => Some(u.stats()),
            ClientLink::Tcp(_) => None,
        }
    }

    /// The state machine.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The state machine, to use its stream.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// The local address of the UDP socket (`None` over TCP).
    pub fn udp_local_addr(&self) -> Option<SocketAddr> {
        match &self.link {
            ClientLink::Udp(u) => u.local_addr().ok(),
            ClientLink::Tcp(_) => None,
        }
    }

    /// Why the transport under the client failed (TCP closed or broken, or the 1tp dialer
    /// gave up or was reset), if it did.
    pub fn transport_error(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// The framing the driver speaks.
    pub fn framing(&self) -> Framing {
        if self.dialer.is_some() {
            Framing::Compat
        } else {
            Framing::Native
        }
    }

    /// The 1tp dialer of the compatibility framing (`None` for the native one).
    pub fn dialer(&self) -> Option<&Dialer> {
        self.dialer.as_ref()
    }

    /// Hands one datagram or frame from the server to the client, through the dialer if any.
    fn deliver(client: &mut Client, dialer: &mut Option<Dialer>, input: &[u8], now: Instant) {
        match dialer {
            None => client.handle_packet(input, now),
            Some(d) => {
                if let Some(pkt) = d.handle(input, now) {
                    client.handle_packet(pkt, now);
                }
            }
        }
    }

    /// Handles readiness of the driver's socket: reads every packet and feeds the client.
    pub fn handle_event(&mut self, registry: &Registry, event: &Event, now: Instant) {
        if event.token() != self.token {
            return;
        }
        if event.is_writable() {
            if let ClientLink::Tcp(s) = &mut self.link {
                if let Ok(Some(e)) | Err(e) = s.take_error() {
                    self.closed = Some(format!("tcp connection failed: {e}"));
                    return;
                }
                if let Err(e) = s.flush(registry, self.token) {
                    self.closed = Some(format!("tcp write failed: {e}"));
                }
            }
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read(registry, now);
        }
    }

    fn read(&mut self, registry: &Registry, now: Instant) {
        let client = &mut self.client;
        let dialer = &mut self.dialer;
        let mut peer = self.peer;
        let relay = &mut self.relay;
        let race = &self.race;
        let mut winner = None;
        match &mut self.link {
            ClientLink::Udp(u) => {
                let mut total = 0;
                loop {
                    let read = u.recv_all(TRANSMIT_EVERY, |pkt, from| {
                        if dispatch::sort(Carrier::Datagram, pkt) == Handler::Relay {
                            if let Some(r) = relay.as_mut() {
                                r.datagram(pkt, from);
                            }
                        } else if from == peer || relay.as_ref().is_some_and(|r| r.is_relay(from)) {
                            if race.is_some() && winner.is_none() {
                                winner = Some(from);
                            }
                            Self::deliver(client, dialer, pkt, now);
                        } else if race.as_ref().is_some_and(|r| r.answered_from(from)) {
                            if winner.is_none() {
                                winner = Some(from);
                            }
                            Self::deliver(client, dialer, pkt, now);
                        } else {
                            debug!("client: dropped a datagram from {from}, not the server");
                        }
                    });
                    let n = match read {
                        Ok(n) => n,
                        Err(e) => {
                            self.closed = Some(format!("udp receive failed: {e}"));
                            break;
                        }
                    };
                    total += n;
                    if n < TRANSMIT_EVERY || total >= READ_BATCH {
                        // Drained (or a batch's worth read: `more_to_read`).
                        break;
                    }
                    // More may be waiting: answer what arrived so far first (to the address
                    // that answered, when a race is on).
                    if let Some(w) = winner {
                        peer = w;
                    }
                    let bufs = (&mut self.buf[..], &mut self.wrapped[..]);
                    if let Err(e) = Self::transmit_udp(client, dialer, u, peer, bufs, now) {
                        self.closed = Some(format!("udp send failed: {e}"));
                        break;
                    }
                }
                self.more_to_read = total >= READ_BATCH;
                self.read_some = total > 0;
                if let Some(direct) = self.relay.as_mut().and_then(|r| r.after_read(u)) {
                    self.peer = direct;
                }
                if let Some(w) = winner {
                    self.settle_race(w);
                }
            }
            ClientLink::Tcp(s) => {
                // As over UDP: what is due goes out after every `TRANSMIT_EVERY` frames, and a
                // batch's worth leaves the rest for `flush` after the application's turn.
                let mut total = 0;
                let mut batches = 0;
                loop {
                    let status = s.read_frames_up_to(TRANSMIT_EVERY, |f| {
                        total += 1;
                        Self::deliver(client, dialer, f, now)
                    });
                    match status {
                        Ok(ReadStatus::More) => batches += TRANSMIT_EVERY,
                        Ok(ReadStatus::Open) => break,
                        Ok(ReadStatus::Closed) => {
                            self.closed = Some("tcp connection closed by the server".into());
                            break;
                        }
                        Ok(ReadStatus::Invalid(e)) => {
                            self.closed = Some(format!("tcp framing: {e}"));
                            break;
                        }
                        Err(e) => {
                            self.closed = Some(format!("tcp receive failed: {e}"));
                            break;
                        }
                    }
                    if batches >= TCP_READ_BATCH {
                        break;
                    }
                    let bufs = (&mut self.buf[..], &mut self.wrapped[..]);
                    if let Err(e) =
                        Self::transmit_tcp(client, dialer, s, bufs, registry, self.token, now)
                    {
                        self.closed = Some(format!("tcp write failed: {e}"));
                        break;
                    }
                }
                self.more_to_read = batches >= TCP_READ_BATCH;
                self.read_some = total > 0;
            }
        }
    }

    /// Sends every packet the client has due at `now`.
    pub fn flush(&mut self, registry: &Registry, now: Instant) -> io::Result<()> {
        // Packets read here may carry data the application has not seen yet: `read_in_flush`
        // makes `next_deadline` ask for one more turn.
        self.read_in_flush = false;
        if self.more_to_read {
            self.read(registry, now);
            self.read_in_flush = self.read_some;
        }
        if self.closed.is_some() {
            return Ok(());
        }
        if let Some(mut race) = self.race.take() {
            let peer = self.peer;
            race.transmit(self, peer, now);
            self.race = Some(race);
            return Ok(());
        }
        let client = &mut self.client;
        let dialer = &mut self.dialer;
        match &mut self.link {
            ClientLink::Udp(u) => {
                let established = matches!(
                    client.state(),
                    crate::curvecp::client::ClientState::Established
                );
                let peer = self.peer;
                let mut sent = || -> io::Result<()> {
                    let bufs = (&mut self.buf[..], &mut self.wrapped[..]);
                    let relayed = match self.relay.as_mut() {
                        Some(r) => r.transmit(client, u, peer, bufs, now)?,
                        None => false,
                    };
                    if !relayed {
                        let bufs = (&mut self.buf[..], &mut self.wrapped[..]);
                        Self::transmit_udp(client, dialer, u, peer, bufs, now)?
                    }
                    Ok(())
                };
                match sent() {
                    // Before the handshake is done, an address this system cannot send to
                    // (no route, no such family) ends the attempt at once, with the cause,
                    // rather than at the connect timeout. Later, the error may pass.
                    Err(e) if !established && unusable_destination(&e) => {
                        self.closed = Some(format!("udp send to {peer} failed: {e}"));
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
            }
            ClientLink::Tcp(s) => {
                let bufs = (&mut self.buf[..], &mut self.wrapped[..]);
                if let Err(e) =
                    Self::transmit_tcp(client, dialer, s, bufs, registry, self.token, now)
                {
                    self.closed = Some(format!("tcp write failed: {e}"));
                }
            }
        }
        if let Some(e) = self.dialer.as_ref().and_then(Dialer::failed) {
            if self.closed.is_none() {
                self.closed = Some(e.to_string());
            }
        }
        Ok(())
    }

    /// Queues every packet due at `now` on the TCP stream (with the compatibility framing the
    /// dialer's frames first, then, once it is open, the client's packets wrapped) and writes
    /// them. `bufs` are the packet and wrapping buffers.
    fn transmit_tcp(
        client: &mut Client,
        dialer: &mut Option<Dialer>,
        s: &mut FramedStream,
        bufs: (&mut [u8], &mut [u8]),
        registry: &Registry,
        token: Token,
        now: Instant,
    ) -> io::Result<()> {
        let (buf, wrapped) = bufs;
        if let Some(d) = dialer.as_mut() {
            while let Some(n) = d.poll_transmit(now, wrapped) {
                s.queue_frame(&wrapped[..n]);
            }
        }
        // The client waits for an open dialer.
        if dialer.as_ref().is_none_or(Dialer::is_open) {
            while let Some(n) = client.poll_transmit(now, buf) {
                match dialer.as_ref() {
                    None => {
                        s.queue_frame(&buf[..n]);
                    }
                    Some(d) => match d.wrap(&buf[..n], wrapped) {
                        Some(m) => {
                            s.queue_frame(&wrapped[..m]);
                        }
                        None => debug!("client: a {n}-byte packet cannot be wrapped"),
                    },
                }
            }
        }
        s.flush(registry, token)
    }

    /// Sends every packet due at `now` over UDP: native ones batched; with the compatibility
    /// framing the dialer's control datagrams, then (once it is open) the client's packets
    /// wrapped, one `send_to` each. `bufs` are the packet and wrapping buffers.
    fn transmit_udp(
        client: &mut Client,
        dialer: &mut Option<Dialer>,
        u: &mut UdpEndpoint,
        peer: SocketAddr,
        bufs: (&mut [u8], &mut [u8]),
        now: Instant,
    ) -> io::Result<()> {
        let Some(d) = dialer.as_mut() else {
            while let Some(n) = client.poll_transmit(now, u.batch_slot()) {
                u.batch_commit(n, peer)?;
            }
            return u.batch_flush();
        };
        let (buf, wrapped) = bufs;
        while let Some(n) = d.poll_transmit(now, wrapped) {
            u.send_to(&wrapped[..n], peer)?;
        }
        if !d.is_open() {
            return Ok(());
        }
        while let Some(n) = client.poll_transmit(now, buf) {
            match d.wrap(&buf[..n], wrapped) {
                Some(m) => u.send_to(&wrapped[..m], peer)?,
                None => debug!("client: a {n}-byte packet cannot be wrapped"),
            }
        }
        Ok(())
    }

    /// When the driver next needs `flush` without any socket event. With the compatibility
    /// framing, until the dialer is open this is the dialer's deadline alone (`None` once it
    /// has given up).
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.more_to_read || self.read_in_flush {
            return Some(Instant::now());
        }
        let probe = match (
            self.relay.as_ref().and_then(ClientRelay::next_deadline),
            self.race.as_ref().and_then(|r| r.next_deadline()),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match &self.dialer {
            None => match (self.client.poll_timeout(), probe) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            Some(d) if !d.is_open() => d.next_deadline(),
            Some(d) => match (d.next_deadline(), self.client.poll_timeout()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// Whether a send error says that this system cannot reach the destination at all (no route,
/// an address family it lacks, an address it cannot send from), as opposed to a passing
/// condition (a full buffer, an ICMP error of an earlier packet).
fn unusable_destination(e: &io::Error) -> bool {
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
        return true;
    }
    matches!(
        e.kind(),
        io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::InvalidInput
    )
}
