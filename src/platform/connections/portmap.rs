//! Port mapping's IO: the sockets and timer of the [`PortMapper`] (PCP and NAT-PMP,
//! [`crate::transport::portmap`]) and of the [`UpnpClient`] (UPnP IGD,
//! [`crate::transport::upnp`]), and what a mapping changes in `reach`.
//!
//! When it runs: [`crate::NetConfig::port_mapping`] is on (the default), the UDP listener is
//! bound to an unspecified address (`0.0.0.0`, or `::`, which takes IPv4 too) or to a private or documentation-range IPv4
//! address (a node listening on loopback or on a public address has nothing to map), and the
//! system has a default IPv4 gateway (Linux: `/proc/net/route`). It asks that gateway only;
//! answers from any other address are dropped. An ICMP "port unreachable" from the gateway
//! (nothing listens on 5351) ends the asking at once; otherwise a silent gateway is given up
//! after about 12 s (PCP, then NAT-PMP).
//!
//! UPnP IGD runs beside them from the start: an SSDP search sent on the LAN interface only
//! (the socket is bound to our address on the gateway's network, `IP_MULTICAST_IF` set to
//! it, TTL 2), answers taken from the gateway's address only, then the device description
//! fetched over HTTP from the gateway. It asks for a mapping only once PCP and NAT-PMP have
//! none to give, so a router that speaks all three is asked once. Its HTTP exchanges are one
//! non-blocking TCP connection at a time, bound to the same address (routers in "secure mode"
//! map only for the address that asks), read to the router's close, at most 64 KiB, 3 s each.
//!
//! A TCP listener on `0.0.0.0`/`::` or a private address is mapped too: its PCP/NAT-PMP
//! requests go out of the same socket (each mapper drops the other's answers by protocol; an
//! ICMP error, read or reported on a send, ends both), and UPnP maps it on the service the UDP
//! client found. It has no dial-back of its own: its endpoint is published with the address
//! the UDP check proved, once it did (the same gateway forwards both).
//!
//! The first reachability check waits for the gateway's first answer, at most 1 s, so that it
//! checks the mapped port when there is one, and 3 s more when a UPnP gateway answered the
//! search by then, so that the check waits for its mapping. A gateway that answers nothing
//! costs the first check 1 s; one that refuses PCP (ICMP) and answers no search costs it the
//! same (the search is still out).
//!
//! What a mapping does: the mapped external port becomes the port of our dial-back requests
//! (one the peer refuses, its once-per-30-s dial-back of our address being spent, is asked
//! again 30 s later), so a peer that sees us from the gateway's public address dials that
//! address at the mapped port; when the probe arrives we are reachable, and the published UDP endpoint carries the
//! address the peer saw with the *mapped* port (the gateway's own claim about its address is
//! only logged: behind a second NAT it is wrong). That proof is also what keeps a forged answer
//! harmless: NAT-PMP answers carry no nonce, so a host on the LAN that spoofs the gateway's
//! address could invent a mapping, but an endpoint is published only once a peer's probe came
//! in through it. Being reachable, the node takes no relay and
//! leaves the one it had. A mapping that is lost (renewals unanswered) makes the node
//! unreachable again, so it takes a relay. Dropping the platform asks the gateway to remove the
//! mapping (`Platform::close` does not: the platform stays usable after it); UPnP's
//! `DeletePortMapping` is a short blocking exchange on the LAN then (at most 250 ms to
//! connect, 250 ms to write, 250 ms for the answer, which is only logged). A process killed
//! (SIGKILL) leaves its mapping on the gateway until the lifetime asked for (2 h) runs out; the
//! next run asks for the same port again, which PCP and NAT-PMP servers (and UPnP ones, for
//! the same internal client) grant to the same client. A UPnP router that only takes
//! permanent leases (error 725) keeps a killed node's mapping until the node's next run
//! replaces or removes it, or the router restarts.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use socket2::{Domain, Socket, Type};

use super::{Net, NetTimer};
use crate::platform::timers::TimerId;
use crate::transport::portmap::{default_gateway, Mapping, PortMapEvent, PortMapper, MAX_ANSWER};
use crate::transport::upnp::{
    HttpRequest, UpnpClient, MAX_HTTP_RESPONSE, MAX_SSDP_ANSWER, SSDP_ADDR,
};
use crate::transport::TransportKind;

/// The mapper's socket token: the top of the listeners' range (their accepted streams count
/// up from its bottom).
pub(crate) const PORTMAP_TOKEN: Token = Token(crate::platform::host::SERVICE_TOKEN_BASE - 1);
/// The UPnP search socket's token (below the mapper's).
pub(crate) const SSDP_TOKEN: Token = Token(crate::platform::host::SERVICE_TOKEN_BASE - 2);
/// The UPnP HTTP connection's token (the UDP listener's mapping).
pub(crate) const UPNP_HTTP_TOKEN: Token = Token(crate::platform::host::SERVICE_TOKEN_BASE - 3);
/// The UPnP HTTP connection's token for the TCP listener's mapping.
pub(crate) const UPNP_HTTP_TCP_TOKEN: Token = Token(crate::platform::host::SERVICE_TOKEN_BASE - 4);

/// How long the first reachability check waits for the gateway's first answer.
const MAPPING_WAIT: Duration = Duration::from_secs(1);
/// How much longer it waits for a UPnP mapping under way.
const UPNP_EXTRA_WAIT: Duration = Duration::from_secs(3);
/// The bounds of the blocking `DeletePortMapping` exchange on drop (each step).
const DELETE_STEP: Duration = Duration::from_millis(250);

/// The mappers, their sockets and their timer.
pub(super) struct PortMap {
    /// PCP and NAT-PMP: the socket is connected to the gateway's server port.
    socket: UdpSocket,
    mapper: PortMapper,
    /// PCP and NAT-PMP have no mapping to give.
    pcp_unavailable: bool,
    /// UPnP IGD, until it gives up or PCP maps.
    upnp: Option<Upnp>,
    /// The TCP listener's mapping, when it has one worth mapping: PCP and NAT-PMP through the
    /// same socket (answers are told apart by protocol), then UPnP on the service the UDP
    /// client found.
    tcp: Option<TcpMap>,
    /// The first check's wait was extended for UPnP.
    wait_extended: bool,
    timer: Option<TimerId>,
}

/// The TCP listener's mappers.
struct TcpMap {
    mapper: PortMapper,
    port: u16,
    pcp_unavailable: bool,
    upnp: Option<Upnp>,
    /// UPnP was tried (or is not to be: PCP mapped).
    upnp_tried: bool,
}

/// A UPnP client, its search socket (none for a sibling, which uses the service another
/// client found) and its HTTP exchange.
struct Upnp {
    ssdp: Option<UdpSocket>,
    client: UpnpClient,
    client_ip: Ipv4Addr,
    http: Option<HttpConn>,
    http_token: Token,
}

/// A random seed for a UPnP client's spare ports.
fn seed() -> u64 {
    let mut seed = [0u8; 8];
    crate::crypto::random_bytes(&mut seed);
    u64::from_le_bytes(seed)
}

/// One HTTP exchange with the router.
struct HttpConn {
    id: u64,
    stream: TcpStream,
    out: Vec<u8>,
    written: usize,
    response: Vec<u8>,
}

/// Whether a listener on `ip` may sit behind a gateway that maps ports.
fn worth_mapping(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_unspecified() || a.is_private() || is_documentation(a),
        // `::` takes IPv4 too (dual-stack): its IPv4 side may be behind the gateway.
        IpAddr::V6(a) => a.is_unspecified(),
    }
}

/// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24 (the addresses of test networks).
fn is_documentation(a: Ipv4Addr) -> bool {
    matches!(
        a.octets(),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _]
    )
}

impl PortMap {
    /// Starts asking the default gateway to map the UDP listener at `udp`, or `None` when
    /// there is nothing to ask (see the module docs) or no socket towards the gateway.
    pub(super) fn start(
        registry: &Registry,
        udp: SocketAddr,
        tcp: Option<SocketAddr>,
        now: Instant,
    ) -> Option<PortMap> {
        if !worth_mapping(udp.ip()) {
            return None;
        }
        let table = std::fs::read_to_string("/proc/net/route").ok()?;
        let gateway = default_gateway(&table)?;
        match Self::open(
            registry,
            gateway,
            udp,
            tcp.filter(|t| worth_mapping(t.ip())),
            now,
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                log::debug!("portmap: no socket towards gateway {gateway}: {e}");
                None
            }
        }
    }

    fn open(
        registry: &Registry,
        gateway: Ipv4Addr,
        udp: SocketAddr,
        tcp: Option<SocketAddr>,
        now: Instant,
    ) -> io::Result<PortMap> {
        let bind_ip = match udp.ip() {
            IpAddr::V4(a) if !a.is_unspecified() => a,
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let mut socket = UdpSocket::bind(SocketAddr::from((bind_ip, 0)))?;
        let server = SocketAddr::from((gateway, crate::transport::portmap::SERVER_PORT));
        socket.connect(server)?;
        let client_ip = match socket.local_addr()?.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => return Err(io::Error::other("no IPv4 source address")),
        };
        registry.register(&mut socket, PORTMAP_TOKEN, Interest::READABLE)?;
        let mut nonce = [0u8; 12];
        crate::crypto::random_bytes(&mut nonce);
        log::debug!(
            "portmap: asking {gateway} to map UDP port {} (from {client_ip})",
            udp.port()
        );
        let upnp = match Upnp::open(registry, gateway, client_ip, udp.port(), now) {
            Ok(u) => Some(u),
            Err(e) => {
                log::debug!("upnp: no search socket: {e}");
                None
            }
        };
        let tcp = tcp.map(|t| {
            let mut nonce = [0u8; 12];
            crate::crypto::random_bytes(&mut nonce);
            log::debug!("portmap: asking {gateway} to map TCP port {} too", t.port());
            TcpMap {
                mapper: PortMapper::new_for(
                    TransportKind::Tcp,
                    gateway,
                    client_ip,
                    t.port(),
                    nonce,
                    now,
                ),
                port: t.port(),
                pcp_unavailable: false,
                upnp: None,
                upnp_tried: false,
            }
        });
        Ok(PortMap {
            socket,
            mapper: PortMapper::new(gateway, client_ip, udp.port(), nonce, now),
            pcp_unavailable: false,
            upnp,
            tcp,
            wait_extended: false,
            timer: None,
        })
    }

    /// The gateway's ICMP "port unreachable" to one of our requests, reported on the connected
    /// socket (by a receive or by a later send): no PCP or NAT-PMP server there, for either
    /// mapper.
    fn gateway_unreachable(&mut self) {
        self.mapper.handle_unreachable();
        if let Some(t) = self.tcp.as_mut() {
            t.mapper.handle_unreachable();
        }
    }

    /// Stops UPnP (PCP mapped, or UPnP gave up): its sockets are closed.
    fn drop_upnp(&mut self, registry: &Registry) {
        if let Some(u) = self.upnp.take() {
            u.close(registry);
        }
    }
}

impl Upnp {
    fn open(
        registry: &Registry,
        gateway: Ipv4Addr,
        client_ip: Ipv4Addr,
        port: u16,
        now: Instant,
    ) -> io::Result<Upnp> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(socket2::Protocol::UDP))?;
        s.set_nonblocking(true)?;
        // The LAN interface only: bound to our address there, multicast sent from it, and
        // not routed beyond the next router.
        s.bind(&SocketAddr::from((client_ip, 0)).into())?;
        s.set_multicast_if_v4(&client_ip)?;
        s.set_multicast_ttl_v4(2)?;
        s.set_multicast_loop_v4(false)?;
        let mut ssdp = UdpSocket::from_std(s.into());
        registry.register(&mut ssdp, SSDP_TOKEN, Interest::READABLE)?;
        Ok(Upnp {
            ssdp: Some(ssdp),
            client: UpnpClient::new(gateway, client_ip, port, seed(), now),
            client_ip,
            http: None,
            http_token: UPNP_HTTP_TOKEN,
        })
    }

    /// A client for the TCP listener's `port` on the service this one found (`None` before
    /// it found one).
    fn tcp_sibling(&self, port: u16, now: Instant) -> Option<Upnp> {
        Some(Upnp {
            ssdp: None,
            client: self.client.sibling(TransportKind::Tcp, port, seed(), now)?,
            client_ip: self.client_ip,
            http: None,
            http_token: UPNP_HTTP_TCP_TOKEN,
        })
    }

    /// Closes its sockets.
    fn close(mut self, registry: &Registry) {
        self.close_http(registry);
        if let Some(mut s) = self.ssdp.take() {
            let _ = registry.deregister(&mut s);
        }
    }

    /// Sends due searches, opens the due HTTP exchange, drops one the client stopped
    /// waiting for. An exchange that cannot even start is failed at once.
    fn flush(&mut self, registry: &Registry, now: Instant) {
        while let Some(d) = self.client.poll_search(now) {
            let Some(ssdp) = self.ssdp.as_ref() else {
                break;
            };
            if let Err(e) = ssdp.send_to(&d, SocketAddr::V4(SSDP_ADDR)) {
                log::debug!("upnp: search not sent: {e}");
            }
        }
        // Bounded: each failure to start moves the client on (to its next step or its end).
        for _ in 0..8 {
            let Some(req) = self.client.poll_http(now) else {
                break;
            };
            self.close_http(registry);
            match self.connect(registry, &req) {
                Ok(c) => self.http = Some(c),
                Err(e) => {
                    self.client.handle_http(
                        req.id,
                        Err(format!("connect to {}: {e}", req.to)),
                        now,
                    );
                }
            }
        }
        if self.http.as_ref().map(|c| c.id) != self.client.http_outstanding() {
            self.close_http(registry);
        }
    }

    fn connect(&self, registry: &Registry, req: &HttpRequest) -> io::Result<HttpConn> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((self.client_ip, 0)).into())?;
        match s.connect(&SocketAddr::V4(req.to).into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(s.into());
        registry.register(
            &mut stream,
            self.http_token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(HttpConn {
            id: req.id,
            stream,
            out: req.bytes.clone(),
            written: 0,
            response: Vec::new(),
        })
    }

    fn close_http(&mut self, registry: &Registry) {
        if let Some(mut c) = self.http.take() {
            let _ = registry.deregister(&mut c.stream);
        }
    }

    /// The HTTP connection is ready: writes what is left of the request, reads what came;
    /// at the router's close (or past the size bound, or on an error) the client has the
    /// result.
    fn http_ready(&mut self, registry: &Registry, now: Instant) {
        let Some(c) = self.http.as_mut() else {
            return;
        };
        let result = c.drive();
        if let Some(result) = result {
            let id = c.id;
            self.close_http(registry);
            match result {
                Ok(bytes) => self.client.handle_http(id, Ok(&bytes), now),
                Err(e) => self.client.handle_http(id, Err(e), now),
            }
        }
    }
}

impl HttpConn {
    /// Writes and reads until blocked; `Some` once the exchange is over.
    fn drive(&mut self) -> Option<Result<Vec<u8>, String>> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Some(Err("connection closed while sending".into())),
                Ok(n) => self.written += n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::NotConnected =>
                {
                    return None
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e.to_string())),
            }
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Some(Ok(std::mem::take(&mut self.response))),
                Ok(n) => {
                    self.response.extend_from_slice(&buf[..n]);
                    if self.response.len() > MAX_HTTP_RESPONSE {
                        // The client refuses it as too long.
                        return Some(Ok(std::mem::take(&mut self.response)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e.to_string())),
            }
        }
    }
}

/// `req` sent with blocking calls, each step bounded by [`DELETE_STEP`]; the answer's status
/// line is logged (best effort: errors are only logged).
fn send_blocking(req: &HttpRequest, from: Ipv4Addr) {
    let attempt = || -> io::Result<String> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.bind(&SocketAddr::from((from, 0)).into())?;
        s.connect_timeout(&SocketAddr::V4(req.to).into(), DELETE_STEP)?;
        let mut stream: std::net::TcpStream = s.into();
        stream.set_write_timeout(Some(DELETE_STEP))?;
        stream.set_read_timeout(Some(DELETE_STEP))?;
        stream.write_all(&req.bytes)?;
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        Ok(text.lines().next().unwrap_or("").to_string())
    };
    match attempt() {
        Ok(status) => log::debug!("upnp: mapping removed: {status}"),
        Err(e) => log::debug!("upnp: mapping not removed: {e}"),
    }
}

impl Net {
    /// Starts port mapping if it applies (called once the listeners are bound).
    pub(super) fn portmap_start(&mut self, now: Instant) {
        if !self.cfg.port_mapping {
            return;
        }
        let Some(udp) = self.server.udp_addr() else {
            return;
        };
        let tcp = self.server.tcp_addr();
        self.portmap = PortMap::start(&self.registry, udp, tcp, now);
        if self.portmap.is_some() {
            // The first reachability check waits for the gateway's answer, but not long:
            // PCP and NAT-PMP servers answer at once, and a silent gateway must not hold up a
            // node that a peer could reach anyway.
            self.reach_mapping_pending(true);
            self.timers
                .schedule(now + MAPPING_WAIT, NetTimer::MappingWait);
        }
        self.portmap_flush(now);
    }

    /// The mapper's socket is readable: every datagram (at most [`MAX_ANSWER`] bytes of each)
    /// goes to the mapper.
    pub(super) fn portmap_readable(&mut self, now: Instant) {
        let Some(p) = self.portmap.as_mut() else {
            return;
        };
        let mut buf = [0u8; MAX_ANSWER + 1];
        // Bounded: a flood is read at most this many datagrams a turn (the rest next turn,
        // edge-triggered readiness repeats only on new data, so drain to WouldBlock).
        for _ in 0..64 {
            match p.socket.recv_from(&mut buf) {
                // A longer datagram arrives cut to MAX_ANSWER + 1 bytes: the mapper drops it as
                // too long, and counts it.
                // Each mapper takes the answers to its own requests (by protocol) and drops
                // the others'.
                Ok((n, from)) => {
                    p.mapper.handle_datagram(from, &buf[..n], now);
                    if let Some(t) = p.tcp.as_mut() {
                        t.mapper.handle_datagram(from, &buf[..n], now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => p.gateway_unreachable(),
                Err(e) => {
                    log::debug!("portmap: {e}");
                    break;
                }
            }
        }
        self.portmap_flush(now);
    }

    /// The UPnP search socket is readable: every datagram (at most [`MAX_SSDP_ANSWER`] + 1
    /// bytes of each, a longer one is dropped as too long) goes to the client.
    pub(super) fn ssdp_readable(&mut self, now: Instant) {
        let Some(u) = self.portmap.as_mut().and_then(|p| p.upnp.as_mut()) else {
            return;
        };
        let Some(ssdp) = u.ssdp.as_ref() else {
            return;
        };
        let mut buf = [0u8; MAX_SSDP_ANSWER + 1];
        for _ in 0..64 {
            match ssdp.recv_from(&mut buf) {
                Ok((n, from)) => u.client.handle_datagram(from, &buf[..n], now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("upnp: {e}");
                    break;
                }
            }
        }
        self.portmap_flush(now);
    }

    /// A UPnP HTTP connection is ready (`tcp`: the TCP listener's client's).
    pub(super) fn upnp_http_ready(&mut self, tcp: bool, now: Instant) {
        let registry = &self.registry;
        let u = self.portmap.as_mut().and_then(|p| {
            if tcp {
                p.tcp.as_mut().and_then(|t| t.upnp.as_mut())
            } else {
                p.upnp.as_mut()
            }
        });
        if let Some(u) = u {
            u.http_ready(registry, now);
        }
        self.portmap_flush(now);
    }

    /// The mappers' timer.
    pub(super) fn portmap_due(&mut self, now: Instant) {
        if let Some(p) = self.portmap.as_mut() {
            p.timer = None;
        }
        self.portmap_flush(now);
    }

    /// The first check's wait is over: it goes now, unless a UPnP mapping is under way (the
    /// gateway answered the search), which it waits for 3 s more.
    pub(super) fn mapping_wait_due(&mut self, now: Instant) {
        if let Some(p) = self.portmap.as_mut() {
            let upnp_coming = p.upnp.as_ref().is_some_and(|u| u.client.gateway_found());
            if upnp_coming && !p.wait_extended {
                p.wait_extended = true;
                self.timers
                    .schedule(now + UPNP_EXTRA_WAIT, NetTimer::MappingWait);
                return;
            }
        }
        self.mapping_settled(now);
    }

    /// Sends what is due, acts on the mappers' events, re-arms their timer.
    fn portmap_flush(&mut self, now: Instant) {
        // Bounded: a pass that allows UPnP to map runs once more (that happens once for each
        // listener).
        for _ in 0..4 {
            let mut again = false;
            let mut pcp_events = Vec::new();
            let mut upnp_events = Vec::new();
            let mut tcp_events = Vec::new();
            {
                let Some(p) = self.portmap.as_mut() else {
                    return;
                };
                // Both mappers' requests go out of the one socket.
                let mut refused = false;
                let tcp_mapper = p.tcp.as_mut().map(|t| &mut t.mapper);
                for (m, what) in
                    std::iter::once((&mut p.mapper, "UDP")).chain(tcp_mapper.map(|m| (m, "TCP")))
                {
                    while let Some(d) = m.poll_transmit(now) {
                        if let Err(e) = p.socket.send(&d) {
                            refused |= e.kind() == io::ErrorKind::ConnectionRefused;
                            log::debug!("portmap: {what} request not sent: {e}");
                        }
                    }
                }
                if refused {
                    p.gateway_unreachable();
                }
                while let Some(e) = p.mapper.poll_event() {
                    pcp_events.push(e);
                }
                if let Some(u) = p.upnp.as_mut() {
                    u.flush(&self.registry, now);
                    while let Some(e) = u.client.poll_event() {
                        upnp_events.push(e);
                    }
                }
                if let Some(t) = p.tcp.as_mut() {
                    while let Some(e) = t.mapper.poll_event() {
                        tcp_events.push((e, false));
                    }
                    // PCP and NAT-PMP had no TCP mapping: UPnP, on the UDP client's service,
                    // once that client found one.
                    if t.pcp_unavailable && !t.upnp_tried {
                        if let Some(s) = p.upnp.as_ref().and_then(|u| u.tcp_sibling(t.port, now)) {
                            t.upnp = Some(s);
                            t.upnp_tried = true;
                        } else if p.upnp.is_none() {
                            t.upnp_tried = true;
                        }
                    }
                    if let Some(u) = t.upnp.as_mut() {
                        u.flush(&self.registry, now);
                        while let Some(e) = u.client.poll_event() {
                            tcp_events.push((e, true));
                        }
                    }
                }
                if let Some(id) = p.timer.take() {
                    self.timers.cancel(id);
                }
                let at = [
                    p.mapper.poll_timeout(),
                    p.upnp.as_ref().and_then(|u| u.client.poll_timeout()),
                    p.tcp.as_ref().and_then(|t| t.mapper.poll_timeout()),
                    p.tcp
                        .as_ref()
                        .and_then(|t| t.upnp.as_ref())
                        .and_then(|u| u.client.poll_timeout()),
                ]
                .into_iter()
                .flatten()
                .min();
                p.timer = at.map(|at| self.timers.schedule(at, NetTimer::PortMap));
            }
            for (e, upnp) in tcp_events {
                again |= self.on_tcp_portmap_event(e, upnp);
            }
            for e in pcp_events {
                again |= self.on_portmap_event(e, false, now);
            }
            for e in upnp_events {
                self.on_portmap_event(e, true, now);
            }
            if !again {
                return;
            }
        }
    }

    /// One mapper's event; `true` when UPnP was allowed to map (its requests are due).
    fn on_portmap_event(&mut self, e: PortMapEvent, upnp: bool, now: Instant) -> bool {
        let Some(p) = self.portmap.as_mut() else {
            return false;
        };
        match e {
            PortMapEvent::Mapped(m) => {
                if let Some(ip) = m.external_ip {
                    log::debug!("portmap: the gateway says its address is {ip}");
                }
                if !upnp {
                    // PCP or NAT-PMP mapped: UPnP is not needed (it has asked for nothing).
                    p.drop_upnp(&self.registry);
                }
                log::info!(
                    "portmap: the gateway forwards its port {} to us ({:?})",
                    m.external_port,
                    m.protocol
                );
                self.on_port_mapped(Some(m.external_port), now);
                self.mapping_settled(now);
            }
            PortMapEvent::Lost => {
                log::info!("portmap: the gateway stopped renewing our mapping");
                self.on_port_mapped(None, now);
            }
            PortMapEvent::Unavailable(why) if !upnp => {
                log::debug!("portmap: no PCP or NAT-PMP mapping: {why}");
                p.pcp_unavailable = true;
                match p.upnp.as_mut() {
                    Some(u) if !u.client.is_done() => {
                        u.client.map(now);
                        return true;
                    }
                    _ => {
                        self.on_port_mapped(None, now);
                        self.mapping_settled(now);
                    }
                }
            }
            PortMapEvent::Unavailable(why) => {
                log::debug!("upnp: no mapping: {why}");
                p.drop_upnp(&self.registry);
                if p.pcp_unavailable {
                    self.on_port_mapped(None, now);
                    self.mapping_settled(now);
                }
            }
        }
        false
    }

    /// One event of the TCP listener's mappers (`upnp`: UPnP's); `true` when a flush should
    /// run again (a UPnP client may be due to start).
    fn on_tcp_portmap_event(&mut self, e: PortMapEvent, upnp: bool) -> bool {
        let Some(t) = self.portmap.as_mut().and_then(|p| p.tcp.as_mut()) else {
            return false;
        };
        match e {
            PortMapEvent::Mapped(m) => {
                if !upnp {
                    t.upnp_tried = true;
                }
                log::info!(
                    "portmap: the gateway forwards its TCP port {} to us ({:?})",
                    m.external_port,
                    m.protocol
                );
                self.on_tcp_port_mapped(Some(m.external_port));
                false
            }
            PortMapEvent::Lost => {
                log::info!("portmap: the gateway stopped renewing our TCP mapping");
                self.on_tcp_port_mapped(None);
                false
            }
            PortMapEvent::Unavailable(why) if !upnp => {
                log::debug!("portmap: no PCP or NAT-PMP mapping of TCP: {why}");
                t.pcp_unavailable = true;
                true
            }
            PortMapEvent::Unavailable(why) => {
                log::debug!("upnp: no TCP mapping: {why}");
                if let Some(u) = t.upnp.take() {
                    u.close(&self.registry);
                }
                false
            }
        }
    }

    /// Asks the gateway to remove our mapping (best effort: one datagram, or UPnP's short
    /// blocking exchange, no answer awaited) and stops mapping.
    pub(crate) fn portmap_close(&mut self) {
        let Some(mut p) = self.portmap.take() else {
            return;
        };
        p.mapper.close();
        if let Some(d) = p.mapper.poll_transmit(Instant::now()) {
            let _ = p.socket.send(&d);
        }
        if let Some(u) = p.upnp.as_mut() {
            if let Some(req) = u.client.close() {
                send_blocking(&req, u.client_ip);
            }
        }
        p.drop_upnp(&self.registry);
        if let Some(mut t) = p.tcp.take() {
            t.mapper.close();
            if let Some(d) = t.mapper.poll_transmit(Instant::now()) {
                let _ = p.socket.send(&d);
            }
            if let Some(mut u) = t.upnp.take() {
                if let Some(req) = u.client.close() {
                    send_blocking(&req, u.client_ip);
                }
                u.close(&self.registry);
            }
        }
        if let Some(id) = p.timer.take() {
            self.timers.cancel(id);
        }
        let _ = self.registry.deregister(&mut p.socket);
    }

    /// The mapping of our TCP listener, while one holds.
    pub(crate) fn tcp_port_mapping(&self) -> Option<Mapping> {
        let t = self.portmap.as_ref()?.tcp.as_ref()?;
        t.mapper
            .mapping()
            .or_else(|| t.upnp.as_ref().and_then(|u| u.client.mapping()))
    }

    /// The mapping of our UDP listener, while one holds.
    pub(crate) fn port_mapping(&self) -> Option<Mapping> {
        let p = self.portmap.as_ref()?;
        p.mapper
            .mapping()
            .or_else(|| p.upnp.as_ref().and_then(|u| u.client.mapping()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listeners_that_may_sit_behind_a_gateway_are_mapped() {
        for ip in ["0.0.0.0", "::", "192.168.1.5", "10.0.0.2", "198.51.100.2"] {
            assert!(worth_mapping(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "8.8.8.8", "::1", "2001:db8::1"] {
            assert!(!worth_mapping(ip.parse().unwrap()), "{ip}");
        }
    }
}
