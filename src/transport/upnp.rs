//! UPnP IGD port mapping: the third way to ask the home router for a public port (after PCP
//! and NAT-PMP, [`crate::transport::portmap`]), the one most consumer routers speak. Sans-IO:
//! [`UpnpClient`] takes SSDP datagrams, HTTP responses and `now`; it hands out the SSDP search
//! to multicast, the HTTP requests to make (one at a time, each on a new TCP connection the
//! caller opens and closes) and its next deadline, and reports
//! [`PortMapEvent`](crate::transport::portmap::PortMapEvent)s.
//!
//! The steps:
//! 1. *Discovery*: an SSDP `M-SEARCH` for an `InternetGatewayDevice` sent to
//!    [`SSDP_ADDR`] (the caller sends it on the LAN interface only, TTL 2), three times
//!    (0 s, 0.5 s, 1.5 s), answers awaited until 3 s. The first valid answer from the
//!    gateway's address whose `LOCATION` is on the gateway too is taken.
//! 2. *Description*: `GET` of that location; the first `WANIPConnection:2`,
//!    `WANIPConnection:1` or `WANPPPConnection:1` service's control URL (on the gateway) is
//!    kept. Discovery and description run as soon as the client is made, so that they cost
//!    nothing once PCP and NAT-PMP turn out to be missing.
//! 3. *Mapping*, once [`UpnpClient::map`] allowed it: `AddPortMapping` of our UDP port
//!    (external port equal to it, then two others on a conflict, `718`), lease
//!    [`LIFETIME`](crate::transport::portmap::LIFETIME) (a router that answers
//!    `725 OnlyPermanentLeasesSupported` is asked for a permanent one). Renewed (asked again)
//!    at half the lease, retried every 5 s until it expires ([`PortMapEvent::Lost`]).
//!    [`UpnpClient::close`] gives the `DeletePortMapping` request.
//!
//! Every input is hostile: an SSDP answer from another address than the gateway, longer than
//! [`MAX_SSDP_ANSWER`], not an HTTP `200` with a `LOCATION`, or pointing at another host is
//! dropped and counted; an HTTP response is read at most [`MAX_HTTP_RESPONSE`] bytes, one for
//! another request (by id) is dropped, and a malformed one, a description without a WAN
//! connection service, or a SOAP fault ends that step with the reason. URLs are only
//! `http://<gateway's IPv4 address>[:port]/path`, the path printable ASCII without spaces: a
//! description cannot send our requests to another host or smuggle a header into them. The
//! service type put into our requests is one of the three constants above, never the text the
//! router sent.
//!
//! UPnP has no nonce: a host on the LAN that spoofs the gateway's address could answer the
//! search and serve a description of its own. What it can make us do is ask it (at the
//! gateway's address) for a mapping; the connection manager publishes a mapped endpoint only
//! once a peer's probe came in through it, so a forged mapping publishes nothing.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::portmap::{Mapping, PortMapEvent, Protocol, LIFETIME};
use super::TransportKind;

/// SSDP's multicast group and port.
pub const SSDP_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// The largest SSDP answer read.
pub const MAX_SSDP_ANSWER: usize = 2048;
/// The most bytes of an HTTP response read (descriptions are a few KiB).
pub const MAX_HTTP_RESPONSE: usize = 64 * 1024;
/// How long one HTTP exchange (connect, request, response) may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// The search's sends, from the client's start.
const SEARCH_AT: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(1500),
];
/// When discovery gives up, from the client's start.
const SEARCH_UNTIL: Duration = Duration::from_secs(3);
/// The wait between renewals that failed.
const RENEW_RETRY: Duration = Duration::from_secs(5);
/// External ports tried on conflicts (ours first).
const MAX_PORT_TRIES: usize = 3;
/// The longest control path kept.
const MAX_PATH: usize = 512;
/// The mapping's description on the router.
const DESCRIPTION: &str = "mm-platform";

/// The WAN connection services that map ports, preferred first.
const SERVICES: [&str; 3] = [
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
];

/// A request to make: open a TCP connection to `to`, write `bytes`, read until the router
/// closes it (at most [`MAX_HTTP_RESPONSE`] + 1 bytes), and give the result to
/// [`UpnpClient::handle_http`] with `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    /// Names this exchange in [`UpnpClient::handle_http`].
    pub id: u64,
    /// The router's HTTP server.
    pub to: SocketAddrV4,
    /// The whole request (it asks the server to close the connection after answering).
    pub bytes: Vec<u8>,
}

/// Counters of an [`UpnpClient`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpnpStats {
    /// SSDP searches sent.
    pub searches: u64,
    /// HTTP requests handed out.
    pub requests: u64,
    /// SSDP datagrams from another address than the gateway.
    pub foreign: u64,
    /// SSDP datagrams from the gateway that were malformed, not an IGD, pointed elsewhere,
    /// or came when no search was out; HTTP results of another exchange.
    pub dropped: u64,
}

/// An `http://` URL on the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Url {
    addr: SocketAddrV4,
    path: String,
}

/// What the client is doing.
#[derive(Clone, Debug)]
enum Phase {
    /// Searching; `sent` searches so far.
    Searching { sent: usize },
    /// The description was asked for.
    Describing,
    /// A WAN connection service was found; mapping waits for [`UpnpClient::map`].
    Found,
    /// `AddPortMapping` for `external_port` is out (`tries` ports tried so far).
    Adding {
        external_port: u16,
        tries: usize,
        permanent: bool,
    },
    /// Mapped; renewed from `renew_at`.
    Mapped {
        mapping: Mapping,
        permanent: bool,
        renew_at: Instant,
        expires_at: Instant,
    },
    /// Renewing a mapping still valid until `expires_at` (a request is out, or the next
    /// try is at `retry_at`).
    Renewing {
        mapping: Mapping,
        permanent: bool,
        retry_at: Option<Instant>,
        expires_at: Instant,
    },
    /// Nothing more to do.
    Done,
}

/// The client side of UPnP IGD port mapping for one UDP port (see the module docs).
pub struct UpnpClient {
    gateway: Ipv4Addr,
    client_ip: Ipv4Addr,
    port: u16,
    transport: TransportKind,
    /// Other external ports to try on conflicts.
    spare_ports: [u16; MAX_PORT_TRIES - 1],
    started: Instant,
    phase: Phase,
    /// Mapping is allowed (PCP and NAT-PMP had none).
    may_map: bool,
    control: Option<(Url, &'static str)>,
    /// Where the description came from (its relative URLs resolve against it).
    described_at: Option<Url>,
    /// The request to hand out, and the one out (its id and deadline).
    due_http: Option<HttpRequest>,
    out: Option<(u64, Instant)>,
    next_id: u64,
    due_search: bool,
    events: VecDeque<PortMapEvent>,
    stats: UpnpStats,
}

impl UpnpClient {
    /// A client that finds `gateway`'s IGD and (once allowed) maps our UDP `port` for
    /// `client_ip` (our address on the gateway's network); `seed` picks the external ports
    /// tried after a conflict. The first search is due at `now`.
    pub fn new(
        gateway: Ipv4Addr,
        client_ip: Ipv4Addr,
        port: u16,
        seed: u64,
        now: Instant,
    ) -> UpnpClient {
        let spare = |i: u32| 1024 + ((seed >> (16 * i)) & 0xffff) as u16 % (65535 - 1024);
        UpnpClient {
            gateway,
            client_ip,
            port,
            transport: TransportKind::Udp,
            spare_ports: [spare(0), spare(1)],
            started: now,
            phase: Phase::Searching { sent: 0 },
            may_map: false,
            control: None,
            described_at: None,
            due_http: None,
            out: None,
            next_id: 1,
            due_search: false,
            events: VecDeque::new(),
            stats: UpnpStats::default(),
        }
    }

    /// A client for our `transport` listener's `port` on the service this one found (no
    /// search of its own), allowed to map when this one is; `None` before a service is found.
    pub fn sibling(
        &self,
        transport: TransportKind,
        port: u16,
        seed: u64,
        now: Instant,
    ) -> Option<UpnpClient> {
        let control = self.control.clone()?;
        let mut c = UpnpClient::new(self.gateway, self.client_ip, port, seed, now);
        c.transport = transport;
        c.control = Some(control);
        c.phase = Phase::Found;
        if self.may_map {
            c.map(now);
        }
        Some(c)
    }

    /// The name of our transport in SOAP arguments.
    fn proto_name(&self) -> &'static str {
        match self.transport {
            TransportKind::Udp => "UDP",
            TransportKind::Tcp => "TCP",
        }
    }

    /// The counters.
    pub fn stats(&self) -> UpnpStats {
        self.stats
    }

    /// The current mapping, if any.
    pub fn mapping(&self) -> Option<Mapping> {
        match self.phase {
            Phase::Mapped { mapping, .. } | Phase::Renewing { mapping, .. } => Some(mapping),
            _ => None,
        }
    }

    /// Whether the gateway answered the search and the client is still at work (describing,
    /// waiting for [`Self::map`], or mapping): a mapping is likely to come.
    pub fn gateway_found(&self) -> bool {
        !matches!(self.phase, Phase::Searching { .. } | Phase::Done)
    }

    /// Whether the client has given up or was closed.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<PortMapEvent> {
        self.events.pop_front()
    }

    /// An SSDP search to send to [`SSDP_ADDR`] now, if one is due.
    pub fn poll_search(&mut self, now: Instant) -> Option<Vec<u8>> {
        self.handle_timeout(now);
        if !std::mem::take(&mut self.due_search) {
            return None;
        }
        self.stats.searches += 1;
        Some(
            concat!(
                "M-SEARCH * HTTP/1.1\r\n",
                "HOST: 239.255.255.250:1900\r\n",
                "MAN: \"ssdp:discover\"\r\n",
                "MX: 1\r\n",
                "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n",
                "\r\n"
            )
            .as_bytes()
            .to_vec(),
        )
    }

    /// An HTTP request to make now, if one is due (it replaces any exchange still open).
    pub fn poll_http(&mut self, now: Instant) -> Option<HttpRequest> {
        self.handle_timeout(now);
        let r = self.due_http.take();
        if r.is_some() {
            self.stats.requests += 1;
        }
        r
    }

    /// The id of the HTTP exchange the client waits for (an open connection with another
    /// id may be dropped).
    pub fn http_outstanding(&self) -> Option<u64> {
        self.out.map(|(id, _)| id)
    }

    /// When [`Self::poll_search`] / [`Self::poll_http`] should next be called (`None`: only
    /// on input).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.due_search || self.due_http.is_some() {
            return Some(self.started);
        }
        let out = self.out.map(|(_, at)| at);
        let phase = match self.phase {
            Phase::Searching { sent } => Some(
                SEARCH_AT
                    .get(sent)
                    .map_or(self.started + SEARCH_UNTIL, |d| self.started + *d),
            ),
            Phase::Mapped { renew_at, .. } => Some(renew_at),
            Phase::Renewing {
                retry_at,
                expires_at,
                ..
            } => Some(retry_at.map_or(expires_at, |r| r.min(expires_at))),
            _ => None,
        };
        match (out, phase) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Allows mapping (PCP and NAT-PMP had none to give): a found service is asked at once,
    /// one still being found when it is.
    pub fn map(&mut self, now: Instant) {
        self.may_map = true;
        if let Phase::Found = self.phase {
            self.add(self.port, 1, false, now);
        }
    }

    /// Stops; a mapping held is removed with the request returned (best effort: the caller
    /// need not wait for its answer).
    pub fn close(&mut self) -> Option<HttpRequest> {
        let req = self.mapping().and_then(|m| {
            let (url, service) = self.control.clone()?;
            let body = format!(
                "<NewRemoteHost></NewRemoteHost><NewExternalPort>{}</NewExternalPort>\
                 <NewProtocol>{}</NewProtocol>",
                m.external_port,
                self.proto_name()
            );
            Some(self.soap(&url, service, "DeletePortMapping", &body))
        });
        self.phase = Phase::Done;
        self.due_http = None;
        self.out = None;
        req
    }

    /// Deadlines: searches, giving up, HTTP time-outs, renewal, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((_, deadline)) = self.out {
            if now >= deadline {
                self.out = None;
                self.http_failed("no answer in time".into(), now);
            }
        }
        match self.phase {
            Phase::Searching { sent } => {
                if let Some(at) = SEARCH_AT.get(sent) {
                    if now >= self.started + *at {
                        self.due_search = true;
                        self.phase = Phase::Searching { sent: sent + 1 };
                    }
                } else if now >= self.started + SEARCH_UNTIL {
                    self.unavailable(format!("no UPnP IGD answered at {}", self.gateway));
                }
            }
            Phase::Mapped {
                mapping,
                permanent,
                renew_at,
                expires_at,
            } if now >= renew_at => self.renew(mapping, permanent, expires_at, now),
            Phase::Renewing {
                mapping,
                permanent,
                retry_at,
                expires_at,
            } => {
                if now >= expires_at {
                    log::debug!("upnp: mapping of port {} expired unrenewed", self.port);
                    self.phase = Phase::Done;
                    self.out = None;
                    self.due_http = None;
                    self.events.push_back(PortMapEvent::Lost);
                } else if retry_at.is_some_and(|r| now >= r) {
                    self.renew(mapping, permanent, expires_at, now);
                }
            }
            _ => {}
        }
    }

    /// Asks for `mapping` again (it holds until `expires_at`).
    fn renew(&mut self, mapping: Mapping, permanent: bool, expires_at: Instant, now: Instant) {
        self.phase = Phase::Renewing {
            mapping,
            permanent,
            retry_at: None,
            expires_at,
        };
        self.ask_add(mapping.external_port, permanent, now);
    }

    /// A datagram that arrived on the search socket from `from`.
    pub fn handle_datagram(&mut self, from: SocketAddr, data: &[u8], now: Instant) {
        if from.ip() != self.gateway {
            self.stats.foreign += 1;
            return;
        }
        if !matches!(self.phase, Phase::Searching { .. }) {
            // Late or repeated answers (every search is answered).
            self.stats.dropped += 1;
            return;
        }
        let Some(location) = parse_ssdp_answer(data).and_then(|l| self.gateway_url(&l, None))
        else {
            self.stats.dropped += 1;
            return;
        };
        log::debug!(
            "upnp: {} answered the search, description at {}{}",
            self.gateway,
            location.addr,
            location.path
        );
        self.phase = Phase::Describing;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            location.path, location.addr
        );
        let id = self.take_id();
        self.issue(
            HttpRequest {
                id,
                to: location.addr,
                bytes: req.into_bytes(),
            },
            now,
        );
        self.described_at = Some(location);
    }

    /// The result of exchange `id`: the raw response (at most [`MAX_HTTP_RESPONSE`] + 1
    /// bytes), or why there is none (connection refused, reset, ...).
    pub fn handle_http(&mut self, id: u64, result: Result<&[u8], String>, now: Instant) {
        match self.out {
            Some((out, _)) if out == id => self.out = None,
            _ => {
                self.stats.dropped += 1;
                return;
            }
        }
        let response = result.and_then(parse_http_response);
        match (self.phase.clone(), response) {
            (_, Err(why)) => self.http_failed(why, now),
            (Phase::Describing, Ok((200, body))) => {
                let base = self.described_at.clone();
                let found = find_control(&body).and_then(|(control, service)| {
                    Some((self.gateway_url(&control, base.as_ref())?, service))
                });
                match found {
                    Some((url, service)) => {
                        log::debug!(
                            "upnp: {service} at {}{} on {}",
                            url.addr,
                            url.path,
                            self.gateway
                        );
                        self.control = Some((url, service));
                        self.phase = Phase::Found;
                        if self.may_map {
                            self.add(self.port, 1, false, now);
                        }
                    }
                    None => self.unavailable(format!(
                        "{}'s description has no usable WAN connection service",
                        self.gateway
                    )),
                }
            }
            (Phase::Describing, Ok((status, _))) => {
                self.unavailable(format!("description: HTTP status {status}"))
            }
            (
                Phase::Adding {
                    external_port,
                    tries,
                    permanent,
                },
                Ok((status, body)),
            ) => match soap_result(status, &body) {
                Ok(()) => {
                    // A permanent lease is asked again on the same schedule: a router that
                    // restarted forgets it.
                    let lifetime = LIFETIME;
                    let mapping = Mapping {
                        external_port,
                        external_ip: None,
                        lifetime,
                        protocol: Protocol::UpnpIgd,
                        transport: self.transport,
                    };
                    log::debug!(
                        "upnp: {} maps external port {external_port} to our port {}{}",
                        self.gateway,
                        self.port,
                        if permanent { " (permanent lease)" } else { "" }
                    );
                    self.phase = Phase::Mapped {
                        mapping,
                        permanent,
                        renew_at: now + lifetime / 2,
                        expires_at: now + lifetime,
                    };
                    self.events.push_back(PortMapEvent::Mapped(mapping));
                }
                Err(Some((725, _))) if !permanent => {
                    self.add(external_port, tries, true, now);
                }
                Err(Some((718, _))) if tries < MAX_PORT_TRIES => {
                    let next = self.spare_ports[tries - 1];
                    log::debug!("upnp: external port {external_port} taken, trying {next}");
                    self.add(next, tries + 1, permanent, now);
                }
                Err(e) => self.unavailable(format!("AddPortMapping refused: {}", fault(e))),
            },
            (
                Phase::Renewing {
                    mapping, permanent, ..
                },
                Ok((status, body)),
            ) => match soap_result(status, &body) {
                Ok(()) => {
                    self.phase = Phase::Mapped {
                        mapping,
                        permanent,
                        renew_at: now + mapping.lifetime / 2,
                        expires_at: now + mapping.lifetime,
                    };
                    self.events.push_back(PortMapEvent::Mapped(mapping));
                }
                Err(e) => self.http_failed(format!("renewal refused: {}", fault(e)), now),
            },
            // An answer that arrived after the step it answered ended.
            _ => self.stats.dropped += 1,
        }
    }

    /// An HTTP exchange failed (`why`): a renewal is tried again later, anything else ends.
    fn http_failed(&mut self, why: String, now: Instant) {
        match self.phase {
            Phase::Renewing {
                mapping,
                permanent,
                expires_at,
                ..
            } => {
                log::debug!("upnp: renewal failed: {why}");
                self.phase = Phase::Renewing {
                    mapping,
                    permanent,
                    retry_at: Some(now + RENEW_RETRY),
                    expires_at,
                };
            }
            Phase::Describing | Phase::Adding { .. } => self.unavailable(why),
            _ => {}
        }
    }

    fn add(&mut self, external_port: u16, tries: usize, permanent: bool, now: Instant) {
        self.phase = Phase::Adding {
            external_port,
            tries,
            permanent,
        };
        self.ask_add(external_port, permanent, now);
    }

    /// Hands out an `AddPortMapping` request for `external_port`.
    fn ask_add(&mut self, external_port: u16, permanent: bool, now: Instant) {
        let Some((url, service)) = self.control.clone() else {
            return;
        };
        let lease = if permanent { 0 } else { LIFETIME.as_secs() };
        let body = format!(
            "<NewRemoteHost></NewRemoteHost><NewExternalPort>{external_port}</NewExternalPort>\
             <NewProtocol>{}</NewProtocol><NewInternalPort>{}</NewInternalPort>\
             <NewInternalClient>{}</NewInternalClient><NewEnabled>1</NewEnabled>\
             <NewPortMappingDescription>{DESCRIPTION}</NewPortMappingDescription>\
             <NewLeaseDuration>{lease}</NewLeaseDuration>",
            self.proto_name(),
            self.port,
            self.client_ip
        );
        let req = self.soap(&url, service, "AddPortMapping", &body);
        self.issue(req, now);
    }

    /// Hands out `req` and waits for its answer until [`HTTP_TIMEOUT`].
    fn issue(&mut self, req: HttpRequest, now: Instant) {
        self.out = Some((req.id, now + HTTP_TIMEOUT));
        self.due_http = Some(req);
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// A SOAP request for `action` of `service` at `url` with the arguments `args`.
    fn soap(&mut self, url: &Url, service: &str, action: &str, args: &str) -> HttpRequest {
        let body = format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
             <u:{action} xmlns:u=\"{service}\">{args}</u:{action}></s:Body></s:Envelope>\r\n"
        );
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\n\
             Content-Length: {}\r\nSOAPAction: \"{service}#{action}\"\r\nConnection: close\r\n\r\n",
            url.path,
            url.addr,
            body.len()
        );
        HttpRequest {
            id: self.take_id(),
            to: url.addr,
            bytes: [head.into_bytes(), body.into_bytes()].concat(),
        }
    }

    fn unavailable(&mut self, why: String) {
        log::debug!("upnp: unavailable: {why}");
        self.phase = Phase::Done;
        self.due_http = None;
        self.due_search = false;
        self.out = None;
        self.events.push_back(PortMapEvent::Unavailable(why));
    }

    /// `text` as a URL on the gateway: absolute (`http://<gateway>[:port]/path`), or a path
    /// resolved against `base`; `None` for anything else.
    fn gateway_url(&self, text: &str, base: Option<&Url>) -> Option<Url> {
        let text = text.trim();
        let (addr, path) = if let Some(rest) = text.strip_prefix("http://") {
            let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let (ip, port) = match host.rsplit_once(':') {
                Some((ip, port)) => (ip, port.parse::<u16>().ok()?),
                None => (host, 80),
            };
            let ip: Ipv4Addr = ip.parse().ok()?;
            if ip != self.gateway || port == 0 {
                return None;
            }
            let path = if path.is_empty() { "/" } else { path };
            (SocketAddrV4::new(ip, port), path.to_string())
        } else {
            let base = base?;
            if text.starts_with('/') {
                (base.addr, text.to_string())
            } else {
                let dir = &base.path[..base.path.rfind('/').map_or(0, |i| i + 1)];
                (base.addr, format!("{dir}{text}"))
            }
        };
        let clean = path.len() <= MAX_PATH
            && path.starts_with('/')
            && path.bytes().all(|b| b.is_ascii_graphic());
        clean.then_some(Url { addr, path })
    }
}

/// A SOAP fault: the UPnP error code and description, if the body had them.
type Fault = Option<(u16, String)>;

fn fault(f: Fault) -> String {
    match f {
        Some((code, desc)) => format!("UPnP error {code} {desc}"),
        None => "no UPnP error code".into(),
    }
}

/// A SOAP action's outcome: `200` is success, anything else a fault.
fn soap_result(status: u16, body: &[u8]) -> Result<(), Fault> {
    if status == 200 {
        return Ok(());
    }
    let text = String::from_utf8_lossy(body);
    let code = element(&text, "errorCode").and_then(|c| c.trim().parse().ok());
    let desc = element(&text, "errorDescription").unwrap_or_default();
    let desc: String = desc.chars().filter(|c| !c.is_control()).take(80).collect();
    Err(code
        .map(|c| (c, desc))
        .or(Some((status, "(HTTP status)".into()))))
}

/// The text of the first `<name>...</name>` (any namespace prefix) in `xml`.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = xml[from..].find('<') {
        let start = from + i + 1;
        let end = start + xml[start..].find('>')?;
        let tag = &xml[start..end];
        let local = tag.rsplit(':').next().unwrap_or(tag);
        if local == name {
            let rest = &xml[end + 1..];
            let close = rest.find("</")?;
            return Some(&rest[..close]);
        }
        from = end + 1;
    }
    None
}

/// The control URL of the preferred WAN connection service in a device description, with
/// the service type (our constant).
fn find_control(body: &[u8]) -> Option<(String, &'static str)> {
    let xml = std::str::from_utf8(body).ok()?;
    let mut best: Option<(usize, String)> = None;
    for block in xml.split("<service>").skip(1) {
        let block = block.split("</service>").next().unwrap_or(block);
        let (Some(ty), Some(control)) =
            (element(block, "serviceType"), element(block, "controlURL"))
        else {
            continue;
        };
        let Some(rank) = SERVICES.iter().position(|s| *s == ty.trim()) else {
            continue;
        };
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, control.trim().to_string()));
        }
    }
    best.map(|(rank, control)| (control, SERVICES[rank]))
}

/// The `LOCATION` of an SSDP answer that is an HTTP `200` about an IGD (or its WAN
/// services), or `None`.
fn parse_ssdp_answer(data: &[u8]) -> Option<String> {
    if data.len() > MAX_SSDP_ANSWER {
        return None;
    }
    let text = std::str::from_utf8(data).ok()?;
    let mut lines = text.split("\r\n");
    let status = lines.next()?;
    let mut parts = status.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") || parts.next()? != "200" {
        return None;
    }
    let (mut location, mut st) = (None, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "location" => location = Some(value.trim().to_string()),
            "st" => st = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let st = st?;
    let igd = st.contains(":device:InternetGatewayDevice:")
        || st.contains(":service:WANIPConnection:")
        || st.contains(":service:WANPPPConnection:");
    igd.then_some(location?)
}

/// An HTTP/1.x response: the status and the body (by `Content-Length`, chunked, or to the
/// end), or why it is not one.
fn parse_http_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    if raw.len() > MAX_HTTP_RESPONSE {
        return Err(format!("response longer than {MAX_HTTP_RESPONSE} bytes"));
    }
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete HTTP header")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "HTTP header not UTF-8")?;
    let body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next().unwrap_or("").split_whitespace();
    if !status_line.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err("not an HTTP/1 response".into());
    }
    let status: u16 = status_line
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or("no HTTP status")?;
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                length = Some(
                    value
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| "bad Content-Length")?,
                )
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or("response shorter than its Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

/// The body of a chunked transfer encoding.
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size = std::str::from_utf8(&b[..eol]).map_err(|_| "bad chunk size")?;
        let size = size.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if size > b.len() {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    const ME: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    fn ssdp_answer(location: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n\
             ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
             USN: uuid:x::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
             EXT:\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\nLOCATION: {location}\r\n\r\n"
        )
        .into_bytes()
    }

    /// A description shaped like miniupnpd's: nested devices, a WANIPConnection:2 service
    /// after others.
    fn description(control: &str, service: &str) -> Vec<u8> {
        let body = format!(
            "<?xml version=\"1.0\"?><root xmlns=\"urn:schemas-upnp-org:device-1-0\">\
             <device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2</deviceType>\
             <serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>\
             <controlURL>/ctl/L3F</controlURL></service></serviceList><deviceList><device>\
             <serviceList><service><serviceType>urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1</serviceType>\
             <controlURL>/ctl/CmnIfCfg</controlURL></service></serviceList><deviceList><device>\
             <serviceList><service>\n  <serviceType>{service}</serviceType>\n\
             <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>\
             <controlURL> {control} </controlURL><eventSubURL>/evt/IPConn</eventSubURL>\
             </service></serviceList></device></deviceList></device></deviceList></device></root>"
        );
        http(200, &body)
    }

    fn http(status: u16, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    fn soap_fault(code: u16, desc: &str) -> Vec<u8> {
        http(
            500,
            &format!(
                "<?xml version=\"1.0\"?><s:Envelope><s:Body><s:Fault><faultcode>s:Client</faultcode>\
                 <faultstring>UPnPError</faultstring><detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\">\
                 <errorCode>{code}</errorCode><errorDescription>{desc}</errorDescription></UPnPError>\
                 </detail></s:Fault></s:Body></s:Envelope>"
            ),
        )
    }

    fn from_gw() -> SocketAddr {
        SocketAddr::from((GW, 1900))
    }

    /// A client that found the gateway's WANIPConnection:2 at /ctl/IPConn (port 5000).
    fn found(t: Instant) -> UpnpClient {
        let mut c = UpnpClient::new(GW, ME, 4000, 0x1111_2222_3333, t);
        let search = c.poll_search(t).expect("a search at once");
        let text = String::from_utf8(search).unwrap();
        assert!(text.starts_with("M-SEARCH * HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1"));
        c.handle_datagram(
            from_gw(),
            &ssdp_answer("http://198.51.100.1:5000/rootDesc.xml"),
            t,
        );
        let get = c.poll_http(t).expect("the description asked for");
        assert_eq!(get.to, "198.51.100.1:5000".parse().unwrap());
        assert!(get
            .bytes
            .starts_with(b"GET /rootDesc.xml HTTP/1.1\r\nHost: 198.51.100.1:5000\r\n"));
        c.handle_http(get.id, Ok(&description("/ctl/IPConn", SERVICES[0])), t);
        assert!(c.gateway_found());
        c
    }

    fn text(r: &HttpRequest) -> String {
        String::from_utf8(r.bytes.clone()).unwrap()
    }

    #[test]
    fn finds_the_igd_maps_when_allowed_renews_and_removes_on_close() {
        let t = Instant::now();
        let mut c = found(t);
        // Nothing is mapped before PCP and NAT-PMP have had their chance.
        assert!(c.poll_http(t).is_none());
        assert!(c.poll_event().is_none());
        c.map(t);
        let add = c.poll_http(t).expect("AddPortMapping");
        let s = text(&add);
        assert!(s.starts_with("POST /ctl/IPConn HTTP/1.1\r\n"), "{s}");
        assert!(s.contains(
            "SOAPAction: \"urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping\""
        ));
        for want in [
            "<NewExternalPort>4000</NewExternalPort>",
            "<NewProtocol>UDP</NewProtocol>",
            "<NewInternalPort>4000</NewInternalPort>",
            "<NewInternalClient>198.51.100.2</NewInternalClient>",
            "<NewLeaseDuration>7200</NewLeaseDuration>",
        ] {
            assert!(s.contains(want), "{want} in {s}");
        }
        let (head, body) = s.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        c.handle_http(add.id, Ok(&http(200, "<ok/>")), t);
        let m = match c.poll_event() {
            Some(PortMapEvent::Mapped(m)) => m,
            e => panic!("{e:?}"),
        };
        assert_eq!((m.external_port, m.protocol), (4000, Protocol::UpnpIgd));
        assert_eq!(c.mapping(), Some(m));
        // Renewed at half the lease.
        let half = t + LIFETIME / 2;
        assert_eq!(c.poll_timeout(), Some(half));
        assert!(c.poll_http(half - Duration::from_secs(1)).is_none());
        let renew = c.poll_http(half).expect("renewal");
        assert!(text(&renew).contains("<NewExternalPort>4000</NewExternalPort>"));
        assert_eq!(c.mapping(), Some(m), "still held while renewing");
        c.handle_http(renew.id, Ok(&http(200, "")), half);
        assert!(matches!(c.poll_event(), Some(PortMapEvent::Mapped(_))));
        let del = c.close().expect("DeletePortMapping");
        let s = text(&del);
        assert!(s.contains("#DeletePortMapping\""), "{s}");
        assert!(s.contains("<NewExternalPort>4000</NewExternalPort><NewProtocol>UDP</NewProtocol>"));
        assert!(c.is_done() && c.mapping().is_none());
    }

    #[test]
    fn mapping_allowed_early_starts_once_the_service_is_found() {
        let t = Instant::now();
        let mut c = UpnpClient::new(GW, ME, 4000, 7, t);
        c.map(t);
        c.poll_search(t).unwrap();
        c.handle_datagram(
            from_gw(),
            &ssdp_answer("http://198.51.100.1:80/d/root.xml"),
            t,
        );
        let get = c.poll_http(t).unwrap();
        assert_eq!(get.to.port(), 80);
        // A relative control URL resolves against the description's directory; WANPPP is
        // taken when it is the only WAN service.
        c.handle_http(get.id, Ok(&description("ctl", SERVICES[2])), t);
        let add = c.poll_http(t).expect("asked at once");
        assert!(text(&add).starts_with("POST /d/ctl HTTP/1.1\r\n"));
        assert!(text(&add).contains("WANPPPConnection:1#AddPortMapping"));
    }

    #[test]
    fn no_answer_to_the_search_is_unavailable_after_three_searches() {
        let t = Instant::now();
        let mut c = UpnpClient::new(GW, ME, 4000, 7, t);
        let mut now = t;
        let mut searches = 0;
        for _ in 0..100 {
            while c.poll_search(now).is_some() {
                searches += 1;
            }
            match c.poll_timeout() {
                Some(at) => now = at.max(now),
                None => break,
            }
            if c.is_done() {
                break;
            }
        }
        assert_eq!(searches, 3);
        assert!(matches!(c.poll_event(), Some(PortMapEvent::Unavailable(_))));
        assert!(now - t <= SEARCH_UNTIL);
        assert_eq!(c.poll_timeout(), None, "idle once done");
    }

    #[test]
    fn forged_or_malformed_search_answers_change_nothing() {
        let t = Instant::now();
        let mut c = UpnpClient::new(GW, ME, 4000, 7, t);
        c.poll_search(t).unwrap();
        let good = ssdp_answer("http://198.51.100.1:5000/rootDesc.xml");
        // From another host on the LAN.
        c.handle_datagram("198.51.100.66:1900".parse().unwrap(), &good, t);
        assert_eq!(c.stats().foreign, 1);
        let mut long = good.clone();
        long.resize(MAX_SSDP_ANSWER + 1, b' ');
        let bad: Vec<Vec<u8>> = vec![
            // Pointing at another host, or at the gateway by name.
            ssdp_answer("http://198.51.100.66:5000/rootDesc.xml"),
            ssdp_answer("http://router.local:5000/rootDesc.xml"),
            ssdp_answer("https://198.51.100.1/rootDesc.xml"),
            ssdp_answer("http://198.51.100.1:5000/a b"),
            ssdp_answer("http://198.51.100.1:5000/x\ty"),
            ssdp_answer("http://198.51.100.1:5000/x\u{7f}"),
            ssdp_answer("http://198.51.100.1:0/rootDesc.xml"),
            good.replace_st("urn:schemas-upnp-org:device:MediaServer:1"),
            b"HTTP/1.1 404 Not Found\r\nLOCATION: http://198.51.100.1:5000/\r\n\r\n".to_vec(),
            b"NOTIFY * HTTP/1.1\r\n\r\n".to_vec(),
            long,
            vec![0xff; 300],
            Vec::new(),
        ];
        for b in &bad {
            c.handle_datagram(from_gw(), b, t);
        }
        assert_eq!(c.stats().dropped, bad.len() as u64);
        assert!(c.poll_http(t).is_none() && !c.gateway_found());
        // The real answer still works.
        c.handle_datagram(from_gw(), &good, t);
        assert!(c.poll_http(t).is_some());
        // Answers to the other searches come late: dropped.
        c.handle_datagram(from_gw(), &good, t);
        assert_eq!(c.stats().dropped, bad.len() as u64 + 1);
    }

    trait ReplaceSt {
        fn replace_st(&self, st: &str) -> Vec<u8>;
    }
    impl ReplaceSt for Vec<u8> {
        fn replace_st(&self, st: &str) -> Vec<u8> {
            String::from_utf8(self.clone())
                .unwrap()
                .replace("urn:schemas-upnp-org:device:InternetGatewayDevice:1", st)
                .into_bytes()
        }
    }

    #[test]
    fn a_description_that_points_elsewhere_or_has_no_wan_service_ends_the_client() {
        for (control, service) in [
            ("http://198.51.100.66:5000/ctl", SERVICES[0]),
            ("/ctl/a b", SERVICES[0]),
            (
                "/ctl/IPConn",
                "urn:schemas-upnp-org:service:WANIPConnection:9",
            ),
            (
                "/ctl/IPConn",
                "urn:schemas-upnp-org:service:Layer3Forwarding:1",
            ),
        ] {
            let t = Instant::now();
            let mut c = UpnpClient::new(GW, ME, 4000, 7, t);
            c.map(t);
            c.poll_search(t).unwrap();
            c.handle_datagram(from_gw(), &ssdp_answer("http://198.51.100.1:5000/r.xml"), t);
            let get = c.poll_http(t).unwrap();
            c.handle_http(get.id, Ok(&description(control, service)), t);
            assert!(
                matches!(c.poll_event(), Some(PortMapEvent::Unavailable(_))),
                "{control} {service}"
            );
            assert!(c.poll_http(t).is_none() && c.is_done());
        }
    }

    #[test]
    fn conflicts_try_other_ports_and_permanent_only_routers_get_a_permanent_lease() {
        let t = Instant::now();
        let mut c = found(t);
        c.map(t);
        let add = c.poll_http(t).unwrap();
        c.handle_http(
            add.id,
            Ok(&soap_fault(725, "OnlyPermanentLeasesSupported")),
            t,
        );
        let add = c.poll_http(t).unwrap();
        assert!(text(&add).contains("<NewLeaseDuration>0</NewLeaseDuration>"));
        assert!(text(&add).contains("<NewExternalPort>4000</NewExternalPort>"));
        c.handle_http(add.id, Ok(&soap_fault(718, "ConflictInMappingEntry")), t);
        let add = c.poll_http(t).unwrap();
        let spare = c.spare_ports[0];
        assert_ne!(spare, 4000);
        assert!(text(&add).contains(&format!("<NewExternalPort>{spare}</NewExternalPort>")));
        assert!(text(&add).contains("<NewLeaseDuration>0</NewLeaseDuration>"));
        c.handle_http(add.id, Ok(&soap_fault(718, "ConflictInMappingEntry")), t);
        let add = c.poll_http(t).unwrap();
        c.handle_http(add.id, Ok(&soap_fault(718, "ConflictInMappingEntry")), t);
        match c.poll_event() {
            Some(PortMapEvent::Unavailable(why)) => assert!(why.contains("718"), "{why}"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_refusal_ends_with_its_code_and_stale_or_late_answers_are_dropped() {
        let t = Instant::now();
        let mut c = found(t);
        c.map(t);
        let add = c.poll_http(t).unwrap();
        // Another exchange's answer.
        c.handle_http(add.id + 100, Ok(&http(200, "")), t);
        assert_eq!(c.stats().dropped, 1);
        assert!(c.poll_event().is_none());
        c.handle_http(add.id, Ok(&soap_fault(606, "Action not authorized")), t);
        match c.poll_event() {
            Some(PortMapEvent::Unavailable(why)) => {
                assert!(why.contains("606 Action not authorized"), "{why}")
            }
            e => panic!("{e:?}"),
        }
        c.handle_http(add.id, Ok(&http(200, "")), t);
        assert_eq!(c.stats().dropped, 2);
        assert!(c.mapping().is_none());
    }

    #[test]
    fn an_unanswered_request_times_out_and_a_failed_renewal_is_retried_until_expiry() {
        let t = Instant::now();
        let mut c = UpnpClient::new(GW, ME, 4000, 7, t);
        c.poll_search(t).unwrap();
        c.handle_datagram(from_gw(), &ssdp_answer("http://198.51.100.1:5000/r.xml"), t);
        let get = c.poll_http(t).unwrap();
        assert_eq!(c.http_outstanding(), Some(get.id));
        assert_eq!(c.poll_timeout(), Some(t + HTTP_TIMEOUT));
        assert!(c.poll_http(t + HTTP_TIMEOUT).is_none());
        assert!(matches!(c.poll_event(), Some(PortMapEvent::Unavailable(_))));
        assert_eq!(c.http_outstanding(), None);

        let mut c = found(t);
        c.map(t);
        let add = c.poll_http(t).unwrap();
        c.handle_http(add.id, Ok(&http(200, "")), t);
        c.poll_event().unwrap();
        let mut now = t + LIFETIME / 2;
        let mut tries = 0;
        for _ in 0..10_000 {
            if let Some(r) = c.poll_http(now) {
                tries += 1;
                c.handle_http(r.id, Err("connection refused".into()), now);
            }
            if let Some(e) = c.poll_event() {
                assert_eq!(e, PortMapEvent::Lost);
                break;
            }
            now = c.poll_timeout().expect("a deadline while renewing");
        }
        assert!(c.is_done() && c.mapping().is_none());
        assert_eq!(now, t + LIFETIME);
        // One try every 5 s over the second half of the lease.
        let expect = (LIFETIME / 2).as_secs() / RENEW_RETRY.as_secs();
        assert!(
            tries as u64 >= expect && tries as u64 <= expect + 1,
            "{tries}"
        );
    }

    #[test]
    fn http_responses_are_parsed_with_length_chunks_or_to_the_end() {
        assert_eq!(
            parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").unwrap(),
            (200, b"abc".to_vec())
        );
        assert_eq!(
            parse_http_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
            )
            .unwrap(),
            (200, b"abcde".to_vec())
        );
        assert_eq!(
            parse_http_response(b"HTTP/1.0 500 X\r\n\r\nall of it").unwrap(),
            (500, b"all of it".to_vec())
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"",
        ] {
            assert!(
                parse_http_response(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        long.resize(MAX_HTTP_RESPONSE + 1, b'x');
        assert!(parse_http_response(&long).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse_http_response(&data);
            let _ = parse_ssdp_answer(&data);
            let _ = find_control(&data);
            let t = Instant::now();
            let mut c = found(t);
            c.map(t);
            let add = c.poll_http(t).unwrap();
            c.handle_http(add.id, Ok(&data), t);
            let mut c = UpnpClient::new(GW, ME, 4000, 7, t);
            c.handle_datagram(from_gw(), &data, t);
        }
    }
}
