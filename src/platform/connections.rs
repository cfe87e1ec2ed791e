//! The connection manager: CurveCP connections to other nodes, per-destination send queues,
//! the directory's lookups and the offline buffer, driven by the platform's reactor.
//!
//! # Listeners and connections
//!
//! One [`ServerDriver`] listens on UDP and TCP (native framing, DESIGN §4) with the node's box
//! key pair as CurveCP long-term key (server name: 256 zero bytes, zero extensions). Its
//! sockets use the tokens from [`super::LISTENER_TOKEN_BASE`] (UDP, then the TCP listener,
//! then one per accepted TCP stream); outgoing connections ([`ClientDriver`]s, also keyed by
//! our box key pair) use `Token(CONNECTION_TOKEN_BASE + slot)`. Listen addresses come from
//! [`super::PlatformBuilder::connection_info`], else from the storage key `connectionInfo`
//! (written with the addresses actually bound, so a restarted node keeps its ports), else
//! `127.0.0.1` with OS-chosen ports for both UDP and TCP. The default address is the loopback
//! one on purpose: a node is only reachable from other machines when the application says on
//! which address (e.g. `0.0.0.0:4000`).
//!
//! # One connection per peer, identify
//!
//! Each side's first frame is `mm`/`identify` with its signId; the receiver checks that the
//! signId converts to the long-term key CurveCP authenticated and closes the connection
//! otherwise. Only then is the connection *active*: `Connection` fires, `transports.online` is
//! published and queued messages flow. When two connections to one peer become active and were
//! opened within [`NetConfig::connect_timeout`] of each other (both sides connected at once),
//! both sides keep the one initiated by the node with the smaller box key; otherwise (the peer
//! restarted, the old connection died silently) the newer one wins. The other finishes what it
//! was writing and closes gracefully (a connection whose peer ends it is ended too, so two sides
//! that disagree settle on a fresh connection). Frames on non-active connections are still
//! delivered.
//!
//! Outgoing connections try the peer's endpoints in [`connection_info::connect_order`]
//! (native UDP, native TCP, then unmarked ones), one per attempt, each given
//! [`NetConfig::connect_timeout`] to become active. After [`NetConfig::max_attempts`] attempts
//! (or a lookup timeout) the destination *fails*: its queued real-time messages fail with
//! [`DeliveryError::Unreachable`] and `self.transports.failed` (payload the signId) is
//! published. Offline messages stay and are retried.
//!
//! # Liveness
//!
//! An active connection that wrote nothing for [`NetConfig::keepalive`] sends an `mm`/`ping`
//! frame; a peer that acknowledges nothing for [`NetConfig::dead_after`] fails the CurveCP
//! stream, which ends the connection (`Disconnected`, `transports.offline`).
//!
//! # Which peers may connect
//!
//! [`super::PlatformBuilder::accept_peers`] restricts incoming connections to listed nodes:
//! their signIds are converted to box keys once and the listeners' CurveCP server refuses any
//! other client's Initiate (`ServerConfig::accept_client`).
//!
//! Known peers are forgotten as they become idle (no connection, nothing queued, no lookup,
//! no offline record) once more than 64 are known.
//!
//! # The event-driven turn
//!
//! A turn does work in proportion to what happened, never a scan of every connection or peer
//! (DESIGN §9); idle connections and peers cost nothing, and an idle node sleeps until its
//! nearest real deadline.
//!
//! - *Dirty connections.* A connection is queued (once: a flag dedups it) for this turn's
//!   visit when its socket had a readiness event (outgoing connections: their token), when
//!   the listeners' server names it (`ServerEvent::Accepted`, `Readable`, `Writable`), when
//!   the application queued frames for its peer, when it was demoted or closed by the
//!   simultaneous-connect rule, or when its timer fired. A visit reads frames, writes the
//!   partial frame and the peer's queue, settles acknowledged messages, flushes the driver,
//!   ends it if its handshake or transport failed, and moves its timer to its next deadline.
//!   `net_receive` reads the dirty connections before the turn's deliveries; `net_pump`
//!   visits them after. A connection that stopped reading because the local delivery queue
//!   is full waits in a list until the queue has room; one whose read budget ran out stays
//!   dirty for the next turn. Server-side connections with unacknowledged tracked messages
//!   are also checked when the listeners had input, because the server reports no event for
//!   a bare acknowledgement.
//! - *Deadlines* sit in one timer heap (`timers::Timers`; cancelled entries are invalidated
//!   lazily): per connection the earliest of its client driver's deadline, the connect
//!   timeout (until identified), the closing linger and the keepalive; per peer the retry
//!   time after a failure and the earliest expiry of its queued real-time messages; each
//!   directory lookup's timeout; the offline buffer's retry (only while it holds records);
//!   the de-duplication memory's flush. Server-side stream timers are the listeners' own
//!   (`ServerDriver::next_deadline`). The manager's next deadline is the earliest of both, exact
//!   ([`super::Platform::next_deadline`]); there is no periodic tick.
//! - *Wanted peers.* `ensure_connections` looks only at peers flagged (once) as wanting
//!   attention: a message queued for a peer without a connection, a retry time reached,
//!   offline records that became idle again or are due for their periodic retry, a nodeInfo
//!   that answered a lookup, a connection that ended, a connection slot that freed up.
//! - [`super::Stats::conn_visits`] and [`super::Stats::peer_visits`] count this work.
//!
//! # Delivery accounting
//!
//! Each connection counts the bytes written to its stream; a message that needs a report (a
//! delivery callback or an offline record) is remembered with the stream offset of its last
//! byte, and completes when [`crate::curvecp::stream::Stream::bytes_acked`] reaches it. If
//! the connection ends first, a real-time message fails with [`DeliveryError::ConnectionLost`]
//! (its bytes may or may not have arrived) and an offline record becomes idle again.
//!
//! # Bounds
//!
//! Per destination at most [`NetConfig::peer_queue_messages`] messages and
//! [`NetConfig::peer_queue_bytes`] bytes wait in memory (sends beyond return
//! [`SendStatus::BufferFull`]); the offline buffer has its own bounds; connections are capped
//! by [`NetConfig::max_connections`], of which [`NetConfig::reserved_outbound`] slots are
//! kept from incoming connections of peers outside our friends and devices circles (any
//! identity costs nothing to make, so strangers must not be able to fill the table and block
//! our own connections), and strangers' incoming connections are capped per source address
//! ([`NetConfig::max_inbound_per_ip`]; IPv6 per /64) — refused ones are dropped from the
//! CurveCP server at once; incoming frames are limited to [`NetConfig::max_frame`]
//! bytes (a larger one closes that connection only), and to 1 KiB until the peer has
//! identified itself; a connection stops reading while the
//! local delivery queue is full (the peer is then flow-controlled by CurveCP).
//!
//! Partly received frames share one memory budget, [`NetConfig::frame_budget`] (64 MiB by
//! default, at least one maximal frame): each connection may buffer 64 KiB (`FRAME_FLOOR`)
//! outside it, so small frames always flow; a larger frame reserves its whole size (learnt
//! from its length prefix) from the budget before its bytes beyond the floor are read, so
//! partial frames can never hold the budget in a deadlock. A connection whose frame does not
//! fit stops reading (the bytes stay in the CurveCP receive window and the peer is
//! flow-controlled) and waits in a list; every release of reserved bytes (a frame completed,
//! a connection ended) makes the waiting connections dirty, so none misses its wake-up.
//! [`super::Stats::frame_bytes_peak`] reports the most bytes ever reserved at once.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Registry, Token};
use slab::Slab;

use super::directory::{Directory, DirectoryCache, Lookup, NodeInfo};
use super::timers::{TimerId, Timers};
use super::{
    Address, Context, Core, Event, Message, SendOptions, SendStatus, CONNECTION_TOKEN_BASE,
};
use crate::crypto::BoxKeyPair;
use crate::curvecp::client::{ClientConfig, ClientState};
use crate::curvecp::server::{ClientPolicy, ConnectionId, ServerConfig, ServerEvent};
use crate::curvecp::stream::{Eof, Stream, StreamConfig};
use crate::envelope::{Envelope, FrameReader, DEFAULT_MAX_FRAME};
use crate::identity::{BoxId, SignId};
use crate::offline::{
    AddError, Dedup, OfflineBuffer, OfflineLimits, RecordKey, DEFAULT_DEDUP_PER_PEER,
};
use crate::storage::Storage;
use crate::transport::connection_info::{self, Endpoint};
use crate::transport::{ClientDriver, ServerDriver, TransportKind};

/// The longest an offline message may wait (DESIGN §6).
pub const MAX_OFFLINE_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// The storage key of the listen addresses of the last run.
pub const CONNECTION_INFO_KEY: &str = "connectionInfo";

/// The largest frame read before the peer has identified itself (its identify frame is about
/// 60 bytes): an unidentified peer must not make a connection buffer up to `max_frame` bytes.
const IDENTIFY_MAX_FRAME: usize = 1024;
/// The de-duplication memory is written at most this often while messages arrive.
const DEDUP_FLUSH_EVERY: Duration = Duration::from_millis(500);
/// Bytes of a partly received frame every connection may buffer outside
/// [`NetConfig::frame_budget`] (so small frames always flow, whatever large ones are pending).
const FRAME_FLOOR: usize = 64 * 1024;
/// Known peers beyond which idle ones (no connection, nothing queued, no lookup, no offline
/// record) are forgotten as soon as they become idle.
const KEEP_IDLE_PEERS: usize = 64;

/// The source of an incoming connection, as counted for [`NetConfig::max_inbound_per_ip`]: an
/// IPv4 address, or the /64 prefix of an IPv6 one (one host usually owns a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum IpKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

impl IpKey {
    fn of(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(a) => IpKey::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => IpKey::V4(v4.octets()),
                None => {
                    let mut p = [0; 8];
                    p.copy_from_slice(&a.octets()[..8]);
                    IpKey::V6(p)
                }
            },
        }
    }
}

/// Settings of the connection manager (timeouts and bounds); every field has a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// Run listeners and connect to other nodes (default `true`). Without, remote sends return
    /// [`SendStatus::NoTransport`].
    pub enabled: bool,
    /// A lookup with no answer fails after this long. Default 10 s.
    pub lookup_timeout: Duration,
    /// A cached nodeInfo is used for this long. Default 1 hour.
    pub node_info_ttl: Duration,
    /// One connection attempt (handshake and identify) may take this long. Default 5 s.
    pub connect_timeout: Duration,
    /// Attempts before a destination fails. Default 5 (the original's cap).
    pub max_attempts: u32,
    /// An idle active connection sends a ping after this long. Default 10 s.
    pub keepalive: Duration,
    /// A connection whose peer acknowledges nothing for this long is dead. Default 30 s.
    pub dead_after: Duration,
    /// Default `expire_after` of real-time messages. Default 60 s.
    pub realtime_expiry: Duration,
    /// Default `expire_after` of offline messages (at most 7 days). Default 7 days.
    pub offline_expiry: Duration,
    /// Offline messages are retried this often. Default 10 s.
    pub offline_retry: Duration,
    /// Largest incoming frame. Default 16 MiB.
    pub max_frame: usize,
    /// Messages waiting in memory per destination. Default 65,536.
    pub peer_queue_messages: usize,
    /// Bytes waiting in memory per destination. Default 64 MiB.
    pub peer_queue_bytes: usize,
    /// Most connections (both directions). Default 1,024.
    pub max_connections: usize,
    /// Slots of `max_connections` that incoming connections from peers outside our friends
    /// and devices circles cannot take: kept for our outgoing connections (and for incoming
    /// ones from our circles). Default 128.
    pub reserved_outbound: usize,
    /// Incoming connections from one source address (IPv6: one /64 prefix) at once, not
    /// counting peers in our friends and devices circles. Default 64 (tests running many
    /// nodes on 127.0.0.1 raise it).
    pub max_inbound_per_ip: usize,
    /// Bounds of the offline buffer.
    pub offline: OfflineLimits,
    /// Message ids remembered for de-duplication, all senders together. Past it, the least
    /// recently active sender's ids are forgotten. Default 65,536.
    pub dedup: usize,
    /// Message ids remembered per sender (its latest ones; a sender flooding ids only evicts
    /// its own). Default 4,096.
    pub dedup_per_peer: usize,
    /// Bytes of partly received frames buffered across all connections, beyond the first
    /// 64 KiB of each connection. A connection whose frame in progress
    /// does not fit stops reading its stream (the peer is flow-controlled by CurveCP) until
    /// other frames complete or connections end. Raised to at least one maximal frame
    /// ([`NetConfig::max_frame`]) so that any frame can be received. Default 64 MiB.
    pub frame_budget: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            enabled: true,
            lookup_timeout: Duration::from_secs(10),
            node_info_ttl: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 5,
            keepalive: Duration::from_secs(10),
            dead_after: Duration::from_secs(30),
            realtime_expiry: Duration::from_secs(60),
            offline_expiry: MAX_OFFLINE_EXPIRY,
            offline_retry: Duration::from_secs(10),
            max_frame: DEFAULT_MAX_FRAME,
            peer_queue_messages: 65_536,
            peer_queue_bytes: 64 << 20,
            max_connections: 1024,
            reserved_outbound: 128,
            max_inbound_per_ip: 64,
            offline: OfflineLimits::default(),
            dedup: 65_536,
            dedup_per_peer: DEFAULT_DEDUP_PER_PEER,
            frame_budget: 64 << 20,
        }
    }
}

/// Why a message was not delivered (what a delivery callback gets).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryError {
    /// Its `expire_after` passed before delivery.
    Expired,
    /// The destination could not be reached (lookup timeout or attempts exhausted).
    Unreachable(String),
    /// The connection ended before every byte was acknowledged (the peer may have it).
    ConnectionLost,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::Expired => f.write_str("expired before delivery"),
            DeliveryError::Unreachable(why) => write!(f, "destination unreachable: {why}"),
            DeliveryError::ConnectionLost => f.write_str("connection lost before acknowledgement"),
        }
    }
}

impl std::error::Error for DeliveryError {}

/// A delivery callback: called once, on the reactor's thread, with the outcome.
pub type DeliveryCallback = Box<dyn FnOnce(&mut Context<'_>, Result<(), DeliveryError>)>;

/// Statistics of one connection, from [`super::Platform::connections`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStats {
    /// The peer (once identified).
    pub peer: Option<SignId>,
    /// UDP or TCP.
    pub transport: TransportKind,
    /// We initiated it.
    pub outbound: bool,
    /// It is the peer's active connection.
    pub active: bool,
    /// Smoothed round-trip time, once measured.
    pub rtt: Option<Duration>,
    /// Stream bytes written by us (first transmissions).
    pub bytes_sent: u64,
    /// Stream bytes received.
    pub bytes_received: u64,
    /// Frames written.
    pub messages_sent: u64,
    /// Frames received.
    pub messages_received: u64,
    /// CurveCP blocks sent again.
    pub retransmissions: u64,
}

/// What to report when a message's bytes are acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Track {
    cb: Option<usize>,
    offline: Option<RecordKey>,
}

impl Track {
    fn is_none(&self) -> bool {
        self.cb.is_none() && self.offline.is_none()
    }
}

struct Pending {
    frame: Vec<u8>,
    /// `None` for offline records (their expiry is the buffer's business).
    expires: Option<Instant>,
    track: Track,
}

enum Link {
    Client(Box<ClientDriver>),
    Server(ConnectionId),
}

/// What a deadline of the connection manager's timer heap is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NetTimer {
    /// A connection: its driver's deadline, connect timeout, closing linger or keepalive.
    Conn(usize),
    /// A failed destination may be tried again.
    Retry(BoxId),
    /// The earliest expiry of a destination's queued real-time messages.
    Expiry(BoxId),
    /// A directory lookup times out.
    Lookup(SignId),
    /// The offline buffer's periodic retry and expiry.
    OfflineRetry,
    /// The de-duplication memory is written.
    DedupFlush,
}

/// How far [`Core::read_conn`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadOutcome {
    /// Everything readable was read (or the connection ended).
    Done,
    /// The local delivery queue is full: read the rest once it has room.
    Blocked,
    /// The per-visit budget ran out with more to read: visit again next turn.
    More,
    /// The frame in progress does not fit in [`NetConfig::frame_budget`]: read again once
    /// reserved frame bytes are released (the connection waits in [`Net::budget_waiters`]).
    Starved,
}

struct Conn {
    link: Link,
    /// In [`Net::dirty`] (visited this turn).
    dirty: bool,
    /// In [`Net::watch`] (unacknowledged tracked messages on a server-side stream).
    watched: bool,
    /// Its entry in the timer heap and the deadline it is for.
    timer: Option<(TimerId, Instant)>,
    kind: TransportKind,
    peer_box: BoxId,
    peer: Option<SignId>,
    outbound: bool,
    active: bool,
    /// Since when it is winding down (no new frames; closed once the streams are done).
    closing: Option<Instant>,
    opened: Instant,
    last_write: Instant,
    reader: FrameReader,
    /// Bytes of [`Net::frame_used`] reserved for the frame in progress (beyond the floor).
    reserved: usize,
    /// In [`Net::budget_waiters`].
    budget_wait: bool,
    /// Counted in [`Net::inbound_per_ip`] under this source.
    inbound_from: Option<IpKey>,
    partial: Vec<u8>,
    partial_pos: usize,
    partial_track: Track,
    written: u64,
    inflight: VecDeque<(u64, Track)>,
    msgs_in: u64,
    msgs_out: u64,
}

impl Conn {
    /// A connection that has not identified yet: it sends our identify frame first and accepts
    /// only small frames until the peer's arrives. Outgoing when `link` is a client driver.
    fn new(
        link: Link,
        kind: TransportKind,
        peer_box: BoxId,
        inbound_from: Option<IpKey>,
        (max_frame, identify): (usize, &[u8]),
        now: Instant,
    ) -> Conn {
        Conn {
            outbound: matches!(link, Link::Client(_)),
            link,
            dirty: false,
            watched: false,
            timer: None,
            kind,
            peer_box,
            peer: None,
            active: false,
            closing: None,
            opened: now,
            last_write: now,
            reader: FrameReader::new(IDENTIFY_MAX_FRAME.min(max_frame)),
            reserved: 0,
            budget_wait: false,
            inbound_from,
            partial: identify.to_vec(),
            partial_pos: 0,
            partial_track: Track::default(),
            written: 0,
            inflight: VecDeque::new(),
            msgs_in: 0,
            msgs_out: 0,
        }
    }
}

#[derive(Default)]
struct Peer {
    sign: Option<SignId>,
    conn: Option<usize>,
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    attempts: u32,
    endpoint: usize,
    online: bool,
    waiting_lookup: bool,
    retry_at: Option<Instant>,
    /// In [`Net::want`] (ensure_connections looks at it this turn).
    wanted: bool,
    retry_timer: Option<TimerId>,
    /// The timer of the earliest expiry of `queue`, and that expiry.
    expiry_timer: Option<(TimerId, Instant)>,
}

/// The connection manager's state (owned by the platform's core).
pub(crate) struct Net {
    cfg: NetConfig,
    registry: Registry,
    server: ServerDriver,
    endpoints: Vec<Endpoint>,
    our_box: BoxKeyPair,
    conns: Slab<Conn>,
    by_server: HashMap<ConnectionId, usize>,
    peers: HashMap<BoxId, Peer>,
    dir: DirectoryCache,
    custom_dir: Option<Box<dyn Directory>>,
    offline: OfflineBuffer,
    offline_cbs: HashMap<RecordKey, usize>,
    dedup: Dedup,
    callbacks: Slab<DeliveryCallback>,
    fired: Vec<(usize, Result<(), DeliveryError>)>,
    identify: Vec<u8>,
    ping: Vec<u8>,
    /// Every deadline: connections, peers, lookups, offline retry, dedup flush.
    timers: Timers<NetTimer>,
    /// Connections to visit in this turn's pump (socket events, application writes, timers).
    dirty: Vec<usize>,
    /// Server-side connections with unacknowledged tracked messages (checked when the
    /// listeners had input: the server reports no event for a bare acknowledgement).
    watch: Vec<usize>,
    /// Connections that stopped reading because the local delivery queue was full.
    read_blocked: Vec<usize>,
    /// Frame bytes reserved by all connections (at most `frame_budget`).
    frame_used: usize,
    /// `cfg.frame_budget`, raised to at least one maximal frame.
    frame_budget: usize,
    /// Connections waiting for room in the frame budget (made dirty when some is released).
    budget_waiters: Vec<usize>,
    /// Incoming connections from strangers per source address (see `max_inbound_per_ip`).
    inbound_per_ip: HashMap<IpKey, usize>,
    /// Peers to look at in `ensure_connections` (something to send, retry due, ...).
    want: Vec<BoxId>,
    /// Destinations whose offline records went back to idle (become `want`).
    released: Vec<SignId>,
    /// Peers that could not connect because of `max_connections`.
    conn_waiters: Vec<BoxId>,
    /// The listeners had socket input (or work left over) since the last pump.
    server_io: bool,
    offline_timer: Option<TimerId>,
    dedup_timer: Option<TimerId>,
    next_dedup_flush: Instant,
    scratch: Vec<u8>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn frame_of(env: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(env.encoded_len() + 12);
    env.encode_frame(&mut out);
    out
}

fn stream_of<'a>(server: &'a mut ServerDriver, link: &'a mut Link) -> Option<&'a mut Stream> {
    match link {
        Link::Client(d) => Some(d.client_mut().stream_mut()),
        Link::Server(id) => server.server_mut().stream_mut(*id),
    }
}

fn stream_ref<'a>(server: &'a ServerDriver, link: &'a Link) -> Option<&'a Stream> {
    match link {
        Link::Client(d) => Some(d.client().stream()),
        Link::Server(id) => server.server().stream(*id),
    }
}

impl Net {
    /// Binds the listeners. `listen` are the requested endpoints (first UDP and first TCP used).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bind(
        cfg: NetConfig,
        registry: Registry,
        base: Token,
        our_box: BoxKeyPair,
        our_sign: SignId,
        listen: &[Endpoint],
        storage: &mut dyn Storage,
        custom_dir: Option<Box<dyn Directory>>,
        accept: Option<ClientPolicy>,
        now: Instant,
    ) -> io::Result<Net> {
        let udp = listen
            .iter()
            .find(|e| e.kind == TransportKind::Udp)
            .map(|e| e.addr);
        let tcp = listen
            .iter()
            .find(|e| e.kind == TransportKind::Tcp)
            .map(|e| e.addr);
        let stream = StreamConfig {
            dead_after: cfg.dead_after,
            ..StreamConfig::server()
        };
        let mut config = ServerConfig::with_stream(our_box.clone(), stream);
        config.accept_client = accept;
        let server = match ServerDriver::bind(&registry, base, config.clone(), udp, tcp, now) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                // A stored port may be taken now: take any port on the same addresses.
                log::debug!("listen addresses in use ({e}); binding OS-chosen ports");
                let any = |a: Option<SocketAddr>| a.map(|a| SocketAddr::new(a.ip(), 0));
                ServerDriver::bind(&registry, base, config, any(udp), any(tcp), now)?
            }
            Err(e) => return Err(e),
        };
        let mut endpoints = Vec::new();
        if let Some(a) = server.udp_addr() {
            endpoints.push(Endpoint::native(TransportKind::Udp, a));
        }
        if let Some(a) = server.tcp_addr() {
            endpoints.push(Endpoint::native(TransportKind::Tcp, a));
        }
        let stored = serde_json::to_vec(&connection_info::to_json(&endpoints)).unwrap_or_default();
        if storage.get(CONNECTION_INFO_KEY).ok().flatten().as_deref() != Some(&stored[..]) {
            if let Err(e) = storage.put(CONNECTION_INFO_KEY, &stored) {
                log::debug!("could not store the listen addresses: {e}");
            }
        }
        let offline = match OfflineBuffer::load(storage, cfg.offline, wall_ms()) {
            Ok((b, dropped)) => {
                if dropped > 0 {
                    log::debug!("offline buffer: {dropped} expired or invalid records dropped");
                }
                b
            }
            Err(e) => {
                log::debug!("offline buffer could not be loaded: {e}");
                OfflineBuffer::new(cfg.offline, wall_ms())
            }
        };
        let identify = frame_of(&Envelope::new(
            "identify",
            "mm",
            our_sign.to_string().into_bytes(),
        ));
        let ping = frame_of(&Envelope::new("ping", "mm", Vec::new()));
        let mut timers = Timers::default();
        // Records of the last run: retried (and expired) at once.
        let offline_timer =
            (!offline.is_empty()).then(|| timers.schedule(now, NetTimer::OfflineRetry));
        Ok(Net {
            dir: DirectoryCache::new(cfg.node_info_ttl, cfg.lookup_timeout),
            dedup: Dedup::load_with_per_peer(cfg.dedup, cfg.dedup_per_peer, storage)
                .unwrap_or_else(|e| {
                    log::debug!("de-duplication memory could not be loaded: {e}");
                    Dedup::with_per_peer(cfg.dedup, cfg.dedup_per_peer)
                }),
            cfg,
            registry,
            server,
            endpoints,
            our_box,
            conns: Slab::new(),
            by_server: HashMap::new(),
            peers: HashMap::new(),
            custom_dir,
            offline,
            offline_cbs: HashMap::new(),
            callbacks: Slab::new(),
            fired: Vec::new(),
            identify,
            ping,
            timers,
            dirty: Vec::new(),
            watch: Vec::new(),
            read_blocked: Vec::new(),
            frame_used: 0,
            frame_budget: cfg
                .frame_budget
                .max(crate::netstring::encoded_len(cfg.max_frame).saturating_sub(FRAME_FLOOR)),
            budget_waiters: Vec::new(),
            inbound_per_ip: HashMap::new(),
            want: Vec::new(),
            released: Vec::new(),
            conn_waiters: Vec::new(),
            server_io: false,
            offline_timer,
            dedup_timer: None,
            next_dedup_flush: now,
            scratch: vec![0; 64 * 1024],
        })
    }

    /// Our endpoints (as bound).
    pub(crate) fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Hands a readiness event to the driver it belongs to; an outgoing connection's event
    /// makes it dirty (visited in this turn's pump).
    pub(crate) fn handle_event(&mut self, event: &mio::event::Event, now: Instant) {
        let t = event.token();
        if t.0 >= CONNECTION_TOKEN_BASE {
            let k = t.0 - CONNECTION_TOKEN_BASE;
            if let Some(c) = self.conns.get_mut(k) {
                if let Link::Client(d) = &mut c.link {
                    d.handle_event(&self.registry, event, now);
                    if !c.dirty {
                        c.dirty = true;
                        self.dirty.push(k);
                    }
                }
            }
        } else if self.server.owns(t) {
            self.server_io = true;
            if let Err(e) = self.server.handle_event(&self.registry, event, now) {
                log::debug!("listener error: {e}");
            }
        }
    }

    /// When the manager next needs a turn: the earliest of the timer heap and the server's
    /// own deadline (exact: no periodic tick). Pending work is reported by [`Net::has_work`].
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match (self.server.next_deadline(), self.timers.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the next turn has work at once: dirty connections, wanted peers, completed
    /// deliveries waiting for their callbacks.
    pub(crate) fn has_work(&self) -> bool {
        !self.fired.is_empty()
            || !self.dirty.is_empty()
            || !self.want.is_empty()
            || !self.released.is_empty()
    }

    /// Queues connection `k` for this turn's pump (once).
    fn mark_dirty(&mut self, k: usize) {
        if let Some(c) = self.conns.get_mut(k) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(k);
            }
        }
    }

    /// Gives `bytes` of the frame budget back and wakes the connections waiting for it.
    fn release_frame_bytes(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.frame_used -= bytes;
        for k in std::mem::take(&mut self.budget_waiters) {
            if let Some(c) = self.conns.get_mut(k) {
                c.budget_wait = false;
            }
            self.mark_dirty(k);
        }
    }

    /// Undoes everything that refers to connection `k` outside the slab, once it has been
    /// taken out of it: its timer, its places in the watch and read-blocked lists, its shares
    /// of the per-address and frame budgets, and its CurveCP server connection.
    fn unlink(&mut self, k: usize, c: &mut Conn) {
        if let Some((id, _)) = c.timer.take() {
            self.timers.cancel(id);
        }
        if c.watched {
            self.watch.retain(|&w| w != k);
        }
        self.read_blocked.retain(|&w| w != k);
        self.drop_shares(k, c);
        if let Link::Server(id) = c.link {
            self.by_server.remove(&id);
            self.server.server_mut().remove(id);
        }
    }

    /// Connection `k` (already out of `conns`) ends: its share of the frame budget and its
    /// count in the per-source table go back.
    fn drop_shares(&mut self, k: usize, c: &Conn) {
        if let Some(ip) = c.inbound_from {
            if let Some(n) = self.inbound_per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.inbound_per_ip.remove(&ip);
                }
            }
        }
        if c.budget_wait {
            self.budget_waiters.retain(|&w| w != k);
        }
        self.release_frame_bytes(c.reserved);
    }

    /// Queues peer `b` for `ensure_connections` (once).
    fn want_peer(&mut self, b: BoxId) {
        if let Some(p) = self.peers.get_mut(&b) {
            if !p.wanted {
                p.wanted = true;
                self.want.push(b);
            }
        }
    }

    /// The peer has work: its active connection is visited, or it is wanted (connect).
    fn kick_peer(&mut self, b: BoxId) {
        let conn = self
            .peers
            .get(&b)
            .and_then(|p| if p.online { p.conn } else { None });
        match conn {
            Some(k) => self.mark_dirty(k),
            None => self.want_peer(b),
        }
    }

    /// Puts connection `k`'s timer at its current deadline (a no-op when unchanged).
    fn reschedule_conn(&mut self, k: usize, now: Instant) {
        let Some(c) = self.conns.get_mut(k) else {
            return;
        };
        let cfg = &self.cfg;
        let mut d = match &c.link {
            Link::Client(drv) => drv.next_deadline(),
            Link::Server(_) => None,
        };
        let mut at = |x: Instant| d = Some(d.map_or(x, |y| y.min(x)));
        if c.peer.is_none() {
            at(c.opened + cfg.connect_timeout);
        }
        match c.closing {
            Some(t) => at(t + cfg.dead_after),
            None => {
                if c.active && c.partial_pos >= c.partial.len() {
                    at((c.last_write + cfg.keepalive).max(now));
                }
            }
        }
        if c.timer.map(|t| t.1) == d {
            return;
        }
        if let Some((id, _)) = c.timer.take() {
            self.timers.cancel(id);
        }
        if let Some(d) = d {
            c.timer = Some((self.timers.schedule(d, NetTimer::Conn(k)), d));
        }
    }

    /// Makes the earliest expiry of peer `b`'s queue (at least `expires`) have a timer.
    fn expiry_at(&mut self, b: BoxId, expires: Instant) {
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        if p.expiry_timer.is_some_and(|(_, at)| at <= expires) {
            return;
        }
        if let Some((id, _)) = p.expiry_timer.take() {
            self.timers.cancel(id);
        }
        p.expiry_timer = Some((self.timers.schedule(expires, NetTimer::Expiry(b)), expires));
    }

    /// Peer `b` may be tried again at `at` (after a failure).
    fn retry_peer_at(&mut self, b: BoxId, at: Instant) {
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        if let Some(id) = p.retry_timer.take() {
            self.timers.cancel(id);
        }
        p.retry_at = Some(at);
        p.retry_timer = Some(self.timers.schedule(at, NetTimer::Retry(b)));
    }

    /// Forgets a failure of peer `b` (a new send, a retry): it may connect at once.
    fn clear_retry(&mut self, b: BoxId) {
        let Some(p) = self.peers.get_mut(&b) else {
            return;
        };
        p.retry_at = None;
        if let Some(id) = p.retry_timer.take() {
            self.timers.cancel(id);
        }
    }

    /// Peer `b`'s queue is empty: its expiry timer goes.
    fn queue_drained(&mut self, b: &BoxId) {
        if let Some(p) = self.peers.get_mut(b) {
            if p.queue.is_empty() {
                if let Some((id, _)) = p.expiry_timer.take() {
                    self.timers.cancel(id);
                }
            }
        }
    }

    /// The offline buffer holds records: make sure its periodic retry is scheduled.
    fn offline_retry_soon(&mut self, now: Instant) {
        if self.offline_timer.is_none() && !self.offline.is_empty() {
            let at = now + self.cfg.offline_retry;
            self.offline_timer = Some(self.timers.schedule(at, NetTimer::OfflineRetry));
        }
    }

    /// Forgets peer `b` if many are known and it is idle (see [`KEEP_IDLE_PEERS`]).
    fn maybe_forget(&mut self, b: &BoxId) {
        if self.peers.len() <= KEEP_IDLE_PEERS {
            return;
        }
        let Some(p) = self.peers.get(b) else { return };
        let idle = p.conn.is_none()
            && p.queue.is_empty()
            && !p.waiting_lookup
            && !p.wanted
            && !p.sign.is_some_and(|s| self.offline.has_idle(&s));
        if !idle {
            return;
        }
        if let Some(p) = self.peers.remove(b) {
            if let Some(id) = p.retry_timer {
                self.timers.cancel(id);
            }
            if let Some((id, _)) = p.expiry_timer {
                self.timers.cancel(id);
            }
        }
    }

    fn conn_stats(&self, c: &Conn) -> ConnectionStats {
        let s = stream_ref(&self.server, &c.link).map(Stream::stats);
        ConnectionStats {
            peer: c.peer,
            transport: c.kind,
            outbound: c.outbound,
            active: c.active,
            rtt: s.as_ref().and_then(|s| s.srtt),
            bytes_sent: s.as_ref().map_or(0, |s| s.bytes_sent),
            bytes_received: s.as_ref().map_or(0, |s| s.bytes_received),
            messages_sent: c.msgs_out,
            messages_received: c.msgs_in,
            retransmissions: s.as_ref().map_or(0, |s| s.retransmissions),
        }
    }

    /// Statistics of every connection.
    pub(crate) fn connections(&self) -> Vec<ConnectionStats> {
        self.conns.iter().map(|(_, c)| self.conn_stats(c)).collect()
    }

    /// Records waiting in the offline buffer.
    pub(crate) fn offline_len(&self) -> usize {
        self.offline.len()
    }

    /// Messages waiting in memory for `dest`.
    pub(crate) fn queued_for(&self, dest: &BoxId) -> usize {
        self.peers.get(dest).map_or(0, |p| p.queue.len())
    }

    fn is_online(&self, b: &BoxId) -> bool {
        self.peers.get(b).is_some_and(|p| p.online)
    }

    /// Moves the idle offline records of `dest` (box key `b`) into its queue.
    fn take_offline(&mut self, b: BoxId, dest: &SignId) {
        if !self.offline.has_idle(dest) {
            return;
        }
        for (key, frame) in self.offline.take_idle(dest) {
            let p = self.peers.entry(b).or_default();
            p.queued_bytes += frame.len();
            p.queue.push_back(Pending {
                frame,
                expires: None,
                track: Track {
                    cb: None,
                    offline: Some(key),
                },
            });
        }
    }
}

impl Core {
    fn net_mut(&mut self) -> Option<&mut Net> {
        self.net.as_mut()
    }

    /// Sends a message to another node (the remote half of [`Core::send`]).
    pub(crate) fn send_remote(
        &mut self,
        dest: SignId,
        protocol: Cow<'static, str>,
        topic: String,
        payload: Vec<u8>,
        options: SendOptions,
        callback: Option<DeliveryCallback>,
    ) -> SendStatus {
        let Some(b) = self.keys.box_id(&dest) else {
            return SendStatus::InvalidDestination;
        };
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else {
            return SendStatus::NoTransport;
        };
        let now = Instant::now();
        let env = Envelope {
            topic,
            protocol: protocol.into_owned(),
            payload,
            id: None,
        };
        if options.realtime {
            let frame = frame_of(&env);
            let peer = net.peers.entry(b).or_default();
            if peer.queue.len() >= net.cfg.peer_queue_messages
                || peer.queued_bytes + frame.len() > net.cfg.peer_queue_bytes
            {
                return SendStatus::BufferFull;
            }
            peer.sign.get_or_insert(dest);
            peer.queued_bytes += frame.len();
            let cb = callback.map(|c| net.callbacks.insert(c));
            let after = options.expire_after.unwrap_or(net.cfg.realtime_expiry);
            // `Duration::MAX` ("never") must not overflow the clock: about 136 years will do.
            let expires = now
                .checked_add(after)
                .unwrap_or_else(|| now + Duration::from_secs(1 << 32));
            peer.queue.push_back(Pending {
                frame,
                expires: Some(expires),
                track: Track { cb, offline: None },
            });
            net.clear_retry(b);
            net.expiry_at(b, expires);
            net.kick_peer(b);
            return SendStatus::Queued;
        }
        let after = options
            .expire_after
            .unwrap_or(net.cfg.offline_expiry)
            .min(MAX_OFFLINE_EXPIRY);
        let expires_ms = wall_ms().saturating_add(after.as_millis() as u64);
        let key = match net.offline.add(storage, dest, env, expires_ms) {
            Ok(k) => k,
            Err(AddError::Full) => return SendStatus::BufferFull,
            Err(AddError::Storage(e)) => {
                log::debug!("offline buffer: storing a message failed: {e}");
                return SendStatus::StorageFailed;
            }
        };
        if let Some(c) = callback {
            let id = net.callbacks.insert(c);
            net.offline_cbs.insert(key, id);
        }
        net.offline_retry_soon(now);
        let online = net.is_online(&b);
        let peer = net.peers.entry(b).or_default();
        peer.sign.get_or_insert(dest);
        net.clear_retry(b);
        if online {
            net.take_offline(b, &dest);
        }
        net.kick_peer(b);
        SendStatus::Queued
    }

    /// Registers a callback to run (with `Ok`) after the current turn's deliveries.
    pub(crate) fn fire_local(&mut self, callback: DeliveryCallback) {
        match self.net.as_mut() {
            Some(net) => {
                let id = net.callbacks.insert(callback);
                net.fired.push((id, Ok(())));
            }
            None => {
                let now = self.now;
                callback(&mut Context { core: self, now }, Ok(()));
            }
        }
    }

    /// A `self.transports.nodeInfo` message.
    pub(crate) fn on_node_info(&mut self, payload: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        let info = match NodeInfo::from_json(&v, &mut self.keys) {
            Ok(i) => i,
            Err(e) => {
                log::debug!("nodeInfo refused: {e}");
                return false;
            }
        };
        if info.sign_id == self.identity.sign_id() {
            return true;
        }
        let now = self.now;
        if let Some(net) = self.net_mut() {
            let b = info.box_id;
            net.dir.insert(info, now);
            if let Some(p) = net.peers.get_mut(&b) {
                p.waiting_lookup = false;
                net.want_peer(b);
            }
        }
        true
    }

    /// A `self.directory.getReply` message: `{"key": boxId, "value": signId}`.
    pub(crate) fn on_directory_reply(&mut self, payload: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return false;
        };
        let key: Option<BoxId> = v.get("key").and_then(|k| k.as_str()?.parse().ok());
        let value: Option<SignId> = v.get("value").and_then(|k| k.as_str()?.parse().ok());
        let (Some(b), Some(s)) = (key, value) else {
            return false;
        };
        if self.keys.box_id(&s) != Some(b) {
            log::debug!("directory.getReply refused: signId does not convert to boxId");
            return false;
        }
        if let Some(net) = self.net_mut() {
            net.dir.learn_reverse(b, s);
        }
        true
    }

    /// The signId of a box key if known; otherwise publishes `self.directory.get` (the answer,
    /// `self.directory.getReply`, is remembered).
    pub(crate) fn resolve_box_id(&mut self, b: &BoxId) -> Option<SignId> {
        let known = self.net.as_ref().and_then(|n| n.dir.reverse(b));
        if known.is_none() && self.net.is_some() {
            self.publish_local("directory.get", &serde_json::json!(b.to_string()));
        }
        known
    }

    fn emit_peer(&mut self, topic: &str, sign: SignId) {
        self.publish_local(topic, &serde_json::json!(sign.to_string()));
    }

    /// The receiving half, run before the turn's deliveries so that what arrived is delivered
    /// in the same turn: listener events, ended connections, frames read from the connections
    /// that had input (the dirty ones).
    pub(crate) fn net_receive(&mut self) {
        if self.net.is_none() {
            return;
        }
        self.server_events();
        let dirty: Vec<usize> = self
            .net
            .as_ref()
            .map(|n| n.dirty.clone())
            .unwrap_or_default();
        for k in dirty {
            if !self.client_alive(k) {
                continue;
            }
            if self.read_conn(k) == ReadOutcome::Blocked {
                break;
            }
            // Starved: it waits in `budget_waiters`; the others read on.
        }
    }

    /// One turn of the connection manager (see the module docs): listener events, due
    /// timers, wanted peers, then a visit of each dirty connection (read, write,
    /// acknowledgements, flush, next deadline), the listeners' flush, delivery callbacks.
    pub(crate) fn net_pump(&mut self) {
        if self.net.is_none() {
            return;
        }
        let now = self.now;
        self.server_events();
        self.fire_net_timers(now);
        self.ensure_connections(now);
        let Some(net) = self.net.as_mut() else { return };
        if !net.read_blocked.is_empty() && self.queue.len() < self.limits.local_queue {
            for k in std::mem::take(&mut net.read_blocked) {
                net.mark_dirty(k);
            }
        }
        let batch = std::mem::take(&mut net.dirty);
        for &k in &batch {
            if let Some(c) = net.conns.get_mut(k) {
                c.dirty = false;
            }
        }
        for k in batch {
            self.visit(k, now);
        }
        let Some(net) = self.net.as_mut() else { return };
        if std::mem::take(&mut net.server_io) && !net.watch.is_empty() {
            let watch = std::mem::take(&mut net.watch);
            for &k in &watch {
                if let Some(c) = net.conns.get_mut(k) {
                    c.watched = false;
                }
            }
            for k in watch {
                self.check_acks(k);
            }
        }
        let Some(net) = self.net.as_mut() else { return };
        if let Err(e) = net.server.flush(&net.registry, now) {
            log::debug!("listener flush failed: {e}");
        }
        // Packets left unread (a full batch) or due at once: look again next turn.
        if net.server.next_deadline().is_some_and(|d| d <= now) {
            net.server_io = true;
        }
        self.server_events();
        self.run_fired();
    }

    /// One connection's share of the turn.
    fn visit(&mut self, k: usize, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        if !net.conns.contains(k) {
            return;
        }
        self.stats.conn_visits += 1;
        if !self.client_alive(k) {
            return;
        }
        match self.read_conn(k) {
            ReadOutcome::Done | ReadOutcome::Starved => {}
            ReadOutcome::More => {
                if let Some(net) = self.net.as_mut() {
                    net.mark_dirty(k);
                }
            }
            ReadOutcome::Blocked => {
                if let Some(net) = self.net.as_mut() {
                    if net.conns.contains(k) && !net.read_blocked.contains(&k) {
                        net.read_blocked.push(k);
                    }
                }
            }
        }
        self.write_conn(k, now);
        self.check_acks(k);
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        if let Link::Client(d) = &mut c.link {
            if let Err(e) = d.flush(&net.registry, now) {
                log::debug!("connection flush failed: {e}");
            }
        }
        if self.client_alive(k) {
            if let Some(net) = self.net.as_mut() {
                net.reschedule_conn(k, now);
            }
        }
    }

    fn run_fired(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        if net.fired.is_empty() {
            return;
        }
        let fired = std::mem::take(&mut net.fired);
        let mut cbs = Vec::with_capacity(fired.len());
        for (id, r) in fired {
            if let Some(cb) = net.callbacks.try_remove(id) {
                cbs.push((cb, r));
            }
        }
        let now = self.now;
        for (cb, r) in cbs {
            cb(&mut Context { core: self, now }, r);
        }
    }

    /// Takes the server's events: accepted and closed connections, and the ones with
    /// something to read or room to write (made dirty).
    fn server_events(&mut self) {
        loop {
            let Some(net) = self.net.as_mut() else { return };
            let Some(ev) = net.server.poll_event() else {
                return;
            };
            match ev {
                ServerEvent::Accepted(id) => self.on_accept(id),
                ServerEvent::Closed(id) => {
                    if let Some(k) = net.by_server.remove(&id) {
                        self.conn_lost(k, "closed");
                    }
                }
                ServerEvent::Readable(id) | ServerEvent::Writable(id) => {
                    if let Some(&k) = net.by_server.get(&id) {
                        net.mark_dirty(k);
                    }
                }
            }
        }
    }

    fn on_accept(&mut self, id: ConnectionId) {
        let now = self.now;
        let Some(net) = self.net.as_mut() else { return };
        let Some(key) = net.server.server().client_key(id) else {
            return;
        };
        // Peers in our circles may take any slot; strangers leave `reserved_outbound` free
        // and are capped per source address.
        let circle = self.circles.is_friend(&BoxId(key)) || self.circles.is_device(&BoxId(key));
        let path = net.server.server().path(id);
        let source = match (circle, path) {
            (false, Some(p)) => net.server.peer_ip(p).map(IpKey::of),
            _ => None,
        };
        let limit = if circle {
            net.cfg.max_connections
        } else {
            net.cfg
                .max_connections
                .saturating_sub(net.cfg.reserved_outbound)
        };
        let from_source = source.map_or(0, |s| net.inbound_per_ip.get(&s).copied().unwrap_or(0));
        if net.conns.len() >= limit || (!circle && from_source >= net.cfg.max_inbound_per_ip) {
            log::debug!("too many connections (or from {source:?}): incoming one refused");
            net.server.server_mut().remove(id);
            return;
        }
        if let Some(s) = source {
            *net.inbound_per_ip.entry(s).or_insert(0) += 1;
        }
        let kind = match path {
            Some(crate::transport::driver::Path::Tcp { .. }) => TransportKind::Tcp,
            _ => TransportKind::Udp,
        };
        let frames = (net.cfg.max_frame, &net.identify[..]);
        let conn = Conn::new(Link::Server(id), kind, BoxId(key), source, frames, now);
        let k = net.conns.insert(conn);
        net.by_server.insert(id, k);
        net.mark_dirty(k);
    }

    /// Whether connection `k` still exists; an outgoing one whose transport or handshake
    /// failed, or that closed, is ended here.
    fn client_alive(&mut self, k: usize) -> bool {
        let Some(c) = self.net.as_ref().and_then(|n| n.conns.get(k)) else {
            return false;
        };
        let why = match &c.link {
            Link::Client(d) => match (d.transport_error(), d.client().state()) {
                (Some(e), _) => Some(e.to_owned()),
                (None, ClientState::Failed(e)) => Some(format!("{e:?}")),
                (None, ClientState::Closed) => Some("closed".into()),
                _ => None,
            },
            Link::Server(_) => None,
        };
        match why {
            Some(why) => {
                self.conn_lost(k, &why);
                false
            }
            None => true,
        }
    }

    /// Ends connection `k`: reports its unacknowledged messages, and if it was the peer's
    /// active one, `Disconnected` and `transports.offline`.
    fn conn_lost(&mut self, k: usize, why: &str) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(mut c) = net.conns.try_remove(k) else {
            return;
        };
        log::debug!("connection {k} to {:?} ended: {why}", c.peer);
        net.unlink(k, &mut c);
        let mut lost: Vec<Track> = c.inflight.drain(..).map(|(_, t)| t).collect();
        if c.partial_pos > 0 || !c.partial_track.is_none() {
            lost.push(c.partial_track);
        }
        for t in lost {
            complete(net, storage, t, Err(DeliveryError::ConnectionLost));
        }
        // A slot is free: peers that hit max_connections may try again.
        for b in std::mem::take(&mut net.conn_waiters) {
            net.want_peer(b);
        }
        let b = c.peer_box;
        let mut offline_sign = None;
        if let Some(p) = net.peers.get_mut(&b) {
            if p.conn == Some(k) {
                p.conn = None;
                if c.outbound && c.peer.is_none() {
                    p.endpoint += 1;
                }
                if p.online {
                    p.online = false;
                    offline_sign = p.sign;
                    // Offline records waiting in memory go back to the buffer.
                    let mut keep = VecDeque::with_capacity(p.queue.len());
                    for m in p.queue.drain(..) {
                        match m.track.offline {
                            Some(key) => {
                                p.queued_bytes -= m.frame.len();
                                net.offline.release(&key);
                            }
                            None => keep.push_back(m),
                        }
                    }
                    p.queue = keep;
                }
                // Whatever is still queued (or buffered offline) wants a new connection.
                net.want_peer(b);
                net.queue_drained(&b);
            }
        }
        if let Some(s) = offline_sign {
            self.emit(Event::Disconnected(s));
            self.emit_peer("transports.offline", s);
        }
    }

    /// Fails a destination: its real-time messages fail, offline ones wait for the retry.
    fn fail_peer(&mut self, b: BoxId, why: &str, now: Instant) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(p) = net.peers.get_mut(&b) else {
            return;
        };
        let sign = p.sign;
        p.attempts = 0;
        p.endpoint = 0;
        p.waiting_lookup = false;
        p.queued_bytes = 0;
        let msgs: Vec<Pending> = p.queue.drain(..).collect();
        let retry = now + net.cfg.offline_retry;
        net.retry_peer_at(b, retry);
        net.queue_drained(&b);
        for m in msgs {
            let r = Err(DeliveryError::Unreachable(why.to_owned()));
            complete(net, storage, m.track, r);
        }
        log::debug!("destination {sign:?} failed: {why}");
        net.maybe_forget(&b);
        if let Some(s) = sign {
            self.emit_peer("transports.failed", s);
        }
    }

    /// Fires the connection manager's due timers (those scheduled while firing wait for the
    /// next turn).
    fn fire_net_timers(&mut self, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let limit = net.timers.next_seq();
        loop {
            let Some(net) = self.net.as_mut() else { return };
            let Some(t) = net.timers.pop_due(now, limit) else {
                return;
            };
            match t {
                NetTimer::Conn(k) => self.conn_timer(k, now),
                NetTimer::Retry(b) => {
                    if let Some(p) = net.peers.get_mut(&b) {
                        p.retry_timer = None;
                        net.want_peer(b);
                    }
                }
                NetTimer::Expiry(b) => self.expire_queue(b, now),
                NetTimer::Lookup(sign) => {
                    if !net.dir.lookup_expired(&sign, now) {
                        continue;
                    }
                    let Some(b) = self.keys.box_id(&sign) else {
                        continue;
                    };
                    let waiting = self
                        .net
                        .as_ref()
                        .and_then(|n| n.peers.get(&b))
                        .is_some_and(|p| p.waiting_lookup);
                    if waiting {
                        self.fail_peer(b, "nodeInfo lookup timed out", now);
                    }
                }
                NetTimer::OfflineRetry => {
                    net.offline_timer = None;
                    self.offline_retry(now);
                }
                NetTimer::DedupFlush => {
                    net.dedup_timer = None;
                    net.next_dedup_flush = now + DEDUP_FLUSH_EVERY;
                    if let Err(e) = net.dedup.flush(&mut *self.storage) {
                        log::debug!("de-duplication memory could not be stored: {e}");
                    }
                }
            }
        }
    }

    /// Connection `k`'s deadline: a handshake or identify that took too long, a closing
    /// connection that lingers, a keepalive; in any case a visit (the driver's timers).
    fn conn_timer(&mut self, k: usize, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        c.timer = None;
        let age = now.saturating_duration_since(c.opened);
        let slow = (c.peer.is_none() && age >= net.cfg.connect_timeout)
            || c.closing
                .is_some_and(|t| now.saturating_duration_since(t) >= net.cfg.dead_after);
        if slow {
            self.conn_lost(k, "timed out");
            return;
        }
        if c.active
            && c.closing.is_none()
            && c.partial_pos >= c.partial.len()
            && now.saturating_duration_since(c.last_write) >= net.cfg.keepalive
        {
            c.partial.clear();
            c.partial.extend_from_slice(&net.ping);
            c.partial_pos = 0;
            c.partial_track = Track::default();
        }
        net.mark_dirty(k);
    }

    /// Fails the real-time messages of peer `b` whose expiry passed; the timer moves to the
    /// next expiry.
    fn expire_queue(&mut self, b: BoxId, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(p) = net.peers.get_mut(&b) else {
            return;
        };
        p.expiry_timer = None;
        let mut keep = VecDeque::with_capacity(p.queue.len());
        let mut next: Option<Instant> = None;
        for m in p.queue.drain(..) {
            match m.expires {
                Some(e) if e <= now => {
                    p.queued_bytes -= m.frame.len();
                    if let Some(cb) = m.track.cb {
                        net.fired.push((cb, Err(DeliveryError::Expired)));
                    }
                }
                e => {
                    if let Some(e) = e {
                        next = Some(next.map_or(e, |n| n.min(e)));
                    }
                    keep.push_back(m);
                }
            }
        }
        p.queue = keep;
        if let Some(e) = next {
            net.expiry_at(b, e);
        }
        net.maybe_forget(&b);
    }

    /// The offline buffer's periodic work: expired records are deleted (their callbacks
    /// fail), destinations with idle records are tried again.
    fn offline_retry(&mut self, now: Instant) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        for (key, _) in net.offline.expire(storage, wall_ms()) {
            if let Some(cb) = net.offline_cbs.remove(&key) {
                net.fired.push((cb, Err(DeliveryError::Expired)));
            }
        }
        let dests = net.offline.idle_destinations();
        for dest in dests {
            let Some(b) = self.keys.box_id(&dest) else {
                continue;
            };
            let Some(net) = self.net.as_mut() else { return };
            self.stats.peer_visits += 1;
            let p = net.peers.entry(b).or_default();
            p.sign.get_or_insert(dest);
            if p.retry_at.is_some_and(|t| t <= now) {
                net.clear_retry(b);
            }
            net.want_peer(b);
        }
        if let Some(net) = self.net.as_mut() {
            net.offline_retry_soon(now);
        }
    }

    /// Looks at the wanted peers only: one without a connection that has something to send
    /// (and no failure to wait out) connects; an online one takes its idle offline records.
    fn ensure_connections(&mut self, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        for s in std::mem::take(&mut net.released) {
            if let Some(b) = self.keys.box_id(&s) {
                if let Some(net) = self.net.as_mut() {
                    net.want_peer(b);
                }
            }
        }
        let Some(net) = self.net.as_mut() else { return };
        let want = std::mem::take(&mut net.want);
        for b in want {
            let Some(net) = self.net.as_mut() else { return };
            let Some(p) = net.peers.get_mut(&b) else {
                continue;
            };
            p.wanted = false;
            self.stats.peer_visits += 1;
            let idle = p.sign.is_some_and(|s| net.offline.has_idle(&s));
            if p.conn.is_none() {
                if !p.waiting_lookup
                    && p.retry_at.map_or(true, |t| t <= now)
                    && (!p.queue.is_empty() || idle)
                {
                    self.connect_peer(b, now);
                } else {
                    net.maybe_forget(&b);
                }
            } else if p.online && idle {
                if let (Some(s), Some(k)) = (p.sign, p.conn) {
                    net.take_offline(b, &s);
                    net.mark_dirty(k);
                }
            }
        }
    }

    fn connect_peer(&mut self, b: BoxId, now: Instant) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(sign) = net.peers.get(&b).and_then(|p| p.sign) else {
            return;
        };
        let mut info = net.custom_dir.as_mut().and_then(|d| d.lookup(&sign));
        if let Some(i) = &info {
            if i.box_id != b {
                log::debug!("custom directory answered a mismatched nodeInfo");
                info = None;
            }
        }
        let info = match info {
            Some(i) => i,
            None => match net.dir.lookup(&sign, now) {
                Lookup::Found(i) => i,
                Lookup::Pending => {
                    if let Some(p) = net.peers.get_mut(&b) {
                        p.waiting_lookup = true;
                    }
                    return;
                }
                Lookup::Unknown => {
                    if !net.dir.start_lookup(sign, now) {
                        self.fail_peer(b, "too many lookups pending", now);
                        return;
                    }
                    let at = now + net.cfg.lookup_timeout;
                    net.timers.schedule(at, NetTimer::Lookup(sign));
                    if let Some(p) = net.peers.get_mut(&b) {
                        p.waiting_lookup = true;
                    }
                    self.emit_peer("transports.requestNodeInfo", sign);
                    return;
                }
            },
        };
        let order = connection_info::connect_order(&info.endpoints);
        let Some(p) = net.peers.get_mut(&b) else {
            return;
        };
        if order.is_empty() {
            self.fail_peer(b, "nodeInfo lists no usable endpoint", now);
            return;
        }
        if p.attempts >= net.cfg.max_attempts {
            let why = format!("{} connection attempts failed", p.attempts);
            self.fail_peer(b, &why, now);
            return;
        }
        if net.conns.len() >= net.cfg.max_connections {
            // Tried again when a connection ends.
            if !net.conn_waiters.contains(&b) {
                net.conn_waiters.push(b);
            }
            return;
        }
        p.attempts += 1;
        let ep = order[p.endpoint % order.len()];
        let entry = net.conns.vacant_entry();
        let k = entry.key();
        let mut config = ClientConfig::with_stream(
            b.0,
            StreamConfig {
                dead_after: net.cfg.dead_after,
                ..StreamConfig::client()
            },
        );
        config.long_term = Some(net.our_box.clone());
        let token = Token(CONNECTION_TOKEN_BASE + k);
        match ClientDriver::connect(&net.registry, token, ep.kind, ep.addr, config, now) {
            Ok(d) => {
                let frames = (net.cfg.max_frame, &net.identify[..]);
                let link = Link::Client(Box::new(d));
                let mut conn = Conn::new(link, ep.kind, b, None, frames, now);
                conn.dirty = true;
                entry.insert(conn);
                p.conn = Some(k);
                net.dirty.push(k);
                log::debug!("connecting to {sign} over {:?} at {}", ep.kind, ep.addr);
            }
            Err(e) => {
                log::debug!("connecting to {} failed: {e}", ep.addr);
                p.endpoint += 1;
                net.want_peer(b);
            }
        }
    }

    /// Reads complete frames from connection `k` into the local queue.
    fn read_conn(&mut self, k: usize) -> ReadOutcome {
        for _ in 0..1024 {
            // Frames already buffered first.
            loop {
                if self.queue.len() >= self.limits.local_queue {
                    return ReadOutcome::Blocked;
                }
                let Some(net) = self.net.as_mut() else {
                    return ReadOutcome::Done;
                };
                let Some(c) = net.conns.get_mut(k) else {
                    return ReadOutcome::Done;
                };
                match c.reader.next_envelope() {
                    Ok(Some(env)) => {
                        if !self.handle_envelope(k, env) {
                            return ReadOutcome::Done;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("connection {k}: bad frame ({e}); closing it");
                        self.conn_lost(k, "protocol error");
                        return ReadOutcome::Done;
                    }
                }
            }
            // The frame in progress: beyond the floor, its whole size is reserved from the
            // frame budget before its bytes are read (no deadlock between partial frames).
            let Some(net) = self.net.as_mut() else {
                return ReadOutcome::Done;
            };
            let Some(c) = net.conns.get_mut(k) else {
                return ReadOutcome::Done;
            };
            let buffered = c.reader.buffered();
            let want = buffered
                .max(c.reader.frame_len().unwrap_or(0))
                .saturating_sub(FRAME_FLOOR);
            if want < c.reserved {
                let give = c.reserved - want;
                c.reserved = want;
                net.release_frame_bytes(give);
            } else if want > c.reserved {
                let more = want - c.reserved;
                if net.frame_used + more > net.frame_budget {
                    log::debug!("connection {k}: frame budget exhausted; reading paused");
                    if !c.budget_wait {
                        c.budget_wait = true;
                        net.budget_waiters.push(k);
                    }
                    return ReadOutcome::Starved;
                }
                c.reserved = want;
                net.frame_used += more;
                let used = net.frame_used as u64;
                self.stats.frame_bytes_peak = self.stats.frame_bytes_peak.max(used);
            }
            let Some(net) = self.net.as_mut() else {
                return ReadOutcome::Done;
            };
            let Some(c) = net.conns.get_mut(k) else {
                return ReadOutcome::Done;
            };
            let limit = (FRAME_FLOOR + c.reserved).saturating_sub(c.reader.buffered());
            let room = c.reader.room().min(net.scratch.len()).min(limit);
            if room == 0 {
                return ReadOutcome::Done;
            }
            let Some(stream) = stream_of(&mut net.server, &mut c.link) else {
                return ReadOutcome::Done;
            };
            let n = stream.read(&mut net.scratch[..room]);
            if n == 0 {
                if stream.peer_eof().is_some() && c.closing.is_none() {
                    // The peer winds this connection down (it lost the simultaneous-connect
                    // tie-break, or it is leaving): finish ours too.
                    stream.finish(Eof::Success);
                    c.closing = Some(self.now);
                    if c.active {
                        self.conn_lost(k, "peer closed the connection");
                    }
                }
                return ReadOutcome::Done;
            }
            c.reader.push(&net.scratch[..n]);
        }
        ReadOutcome::More
    }

    /// Handles one frame; `false` if the connection was closed.
    fn handle_envelope(&mut self, k: usize, env: Envelope) -> bool {
        let Some(net) = self.net.as_mut() else {
            return false;
        };
        let Some(c) = net.conns.get_mut(k) else {
            return false;
        };
        c.msgs_in += 1;
        let Some(sign) = c.peer else {
            let ok = env.protocol == "mm" && env.topic == "identify";
            let sign = std::str::from_utf8(&env.payload)
                .ok()
                .and_then(|s| s.parse::<SignId>().ok());
            let peer_box = c.peer_box;
            match sign {
                Some(s) if ok && self.keys.box_id(&s) == Some(peer_box) => {
                    c.peer = Some(s);
                    c.reader.set_max_frame(net.cfg.max_frame);
                    net.dir.learn_reverse(peer_box, s);
                    self.activate(k);
                    return true;
                }
                _ => {
                    log::debug!("connection {k}: missing or forged identify; closing it");
                    self.conn_lost(k, "identify failed");
                    return false;
                }
            }
        };
        if env.protocol == "mm" {
            return true; // identify repeated, ping
        }
        if let Some(id) = &env.id {
            if !net.dedup.first_time_from(c.peer_box.0.as_bytes(), id) {
                self.stats.duplicates += 1;
                log::debug!("duplicate message from {sign} dropped");
                return true;
            }
            if net.dedup_timer.is_none() {
                let at = net.next_dedup_flush.max(self.now);
                net.dedup_timer = Some(net.timers.schedule(at, NetTimer::DedupFlush));
            }
        }
        let scope = self.circles.scope_of(&c.peer_box);
        let protocol: Cow<'static, str> = match env.protocol.as_str() {
            "ms" => Cow::Borrowed("ms"),
            "bt" => Cow::Borrowed("bt"),
            _ => Cow::Owned(env.protocol),
        };
        self.queue.push_back(Message {
            sender: Address::Node(sign),
            protocol,
            topic: env.topic,
            scope,
            payload: env.payload,
        });
        true
    }

    /// Connection `k` identified its peer: make it the active one (or not, see module docs).
    fn activate(&mut self, k: usize) {
        let Some(net) = self.net.as_mut() else { return };
        let c = &net.conns[k];
        let (b, sign) = (c.peer_box, c.peer.expect("identified"));
        let ours = net.our_box.public;
        let initiator = |c: &Conn| if c.outbound { ours } else { b.0 };
        let peer = net.peers.entry(b).or_default();
        peer.sign = Some(sign);
        let mut demote = None;
        match peer.conn {
            Some(o) if o != k && net.conns.contains(o) => {
                let (co, ck) = (&net.conns[o], &net.conns[k]);
                // Opened close together: a simultaneous connect, settled by the key rule.
                // Otherwise the newer one wins (the peer restarted, or the old one died).
                let gap = if ck.opened > co.opened {
                    ck.opened - co.opened
                } else {
                    co.opened - ck.opened
                };
                let keep_new = if co.outbound == ck.outbound || gap >= net.cfg.connect_timeout {
                    true
                } else {
                    initiator(ck) < initiator(co)
                };
                if keep_new {
                    demote = Some(o);
                } else {
                    demote = Some(k);
                }
            }
            _ => {}
        }
        let now = self.now;
        if demote == Some(k) {
            let c = &mut net.conns[k];
            c.closing = Some(now);
            if let Some(s) = stream_of(&mut net.server, &mut c.link) {
                s.finish(Eof::Success);
            }
            return;
        }
        peer.conn = Some(k);
        net.conns[k].active = true;
        let was_online = peer.online;
        peer.online = true;
        peer.attempts = 0;
        peer.endpoint = 0;
        if let Some(o) = demote {
            let identified = net.conns[o].peer.is_some();
            if identified {
                let c = &mut net.conns[o];
                c.active = false;
                c.closing = Some(now);
                if let Some(s) = stream_of(&mut net.server, &mut c.link) {
                    s.finish(Eof::Success);
                }
                net.mark_dirty(o);
            } else {
                // An attempt still in its handshake: drop it (it was not active, so no event).
                if let Some(p) = net.peers.get_mut(&b) {
                    p.conn = Some(k);
                }
                let mut c = net.conns.remove(o);
                net.unlink(o, &mut c);
            }
        }
        // Offline records for this peer join its queue.
        net.take_offline(b, &sign);
        net.clear_retry(b);
        net.mark_dirty(k);
        if !was_online {
            self.emit(Event::Connection(sign));
            self.emit_peer("transports.online", sign);
        }
    }

    /// Writes the partial frame and queued messages of connection `k` into its stream.
    fn write_conn(&mut self, k: usize, now: Instant) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        let Some(stream) = stream_of(&mut net.server, &mut c.link) else {
            return;
        };
        let mut expired = Vec::new();
        loop {
            if c.partial_pos < c.partial.len() {
                let n = stream.write(&c.partial[c.partial_pos..]);
                if n > 0 {
                    c.last_write = now;
                }
                c.partial_pos += n;
                c.written += n as u64;
                if c.partial_pos < c.partial.len() {
                    break;
                }
                c.msgs_out += 1;
                if !c.partial_track.is_none() {
                    c.inflight.push_back((c.written, c.partial_track));
                }
                c.partial_track = Track::default();
            }
            if !c.active || c.closing.is_some() {
                break;
            }
            let Some(p) = net.peers.get_mut(&c.peer_box) else {
                break;
            };
            let Some(m) = p.queue.pop_front() else { break };
            p.queued_bytes -= m.frame.len();
            if m.expires.is_some_and(|e| e <= now) {
                expired.push(m.track);
                continue;
            }
            c.partial = m.frame;
            c.partial_pos = 0;
            c.partial_track = m.track;
        }
        if c.partial_pos >= c.partial.len() && c.partial.capacity() > 4096 {
            c.partial = Vec::new();
            c.partial_pos = 0;
        }
        let b = c.peer_box;
        net.queue_drained(&b);
        for t in expired {
            complete(net, storage, t, Err(DeliveryError::Expired));
        }
    }

    fn check_acks(&mut self, k: usize) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        let Some(c) = net.conns.get_mut(k) else {
            return;
        };
        if c.inflight.is_empty() {
            return;
        }
        let Some(acked) = stream_ref(&net.server, &c.link).map(Stream::bytes_acked) else {
            return;
        };
        let mut done = Vec::new();
        while c.inflight.front().is_some_and(|(end, _)| *end <= acked) {
            if let Some((_, t)) = c.inflight.pop_front() {
                done.push(t);
            }
        }
        // A server-side stream reports no event for a bare acknowledgement: watch it.
        if !c.inflight.is_empty() && !c.watched && matches!(c.link, Link::Server(_)) {
            c.watched = true;
            net.watch.push(k);
        }
        for t in done {
            complete(net, storage, t, Ok(()));
        }
    }
}

impl Net {
    /// Persists what must survive (called when the platform is dropped).
    pub(crate) fn save(&mut self, storage: &mut dyn Storage) {
        if let Err(e) = self.dedup.flush(storage) {
            log::debug!("de-duplication memory could not be stored: {e}");
        }
    }
}

/// Settles one tracked message: offline records are deleted (delivered) or released (lost),
/// callbacks are queued with the outcome.
fn complete(net: &mut Net, storage: &mut dyn Storage, t: Track, result: Result<(), DeliveryError>) {
    if let Some(key) = t.offline {
        if result.is_ok() {
            net.offline.delivered(storage, &key);
            if let Some(cb) = net.offline_cbs.remove(&key) {
                net.fired.push((cb, Ok(())));
            }
        } else if let Some(dest) = net.offline.release(&key) {
            // Tried again (now if the peer is still online, else when it connects).
            net.released.push(dest);
        }
    }
    if let Some(cb) = t.cb {
        net.fired.push((cb, result));
    }
}
