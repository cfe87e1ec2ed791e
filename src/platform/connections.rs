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
//! by [`NetConfig::max_connections`]; incoming frames are limited to [`NetConfig::max_frame`]
//! bytes (a larger one closes that connection only); a connection stops reading while the
//! local delivery queue is full (the peer is then flow-controlled by CurveCP).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Registry, Token};
use slab::Slab;

use super::directory::{Directory, DirectoryCache, Lookup, NodeInfo};
use super::{
    Address, Context, Core, Event, Message, SendOptions, SendStatus, CONNECTION_TOKEN_BASE,
};
use crate::crypto::BoxKeyPair;
use crate::curvecp::client::{ClientConfig, ClientState};
use crate::curvecp::server::{ConnectionId, ServerConfig, ServerEvent};
use crate::curvecp::stream::{Eof, Stream, StreamConfig};
use crate::envelope::{Envelope, FrameReader, DEFAULT_MAX_FRAME};
use crate::identity::{BoxId, SignId};
use crate::offline::{AddError, Dedup, OfflineBuffer, OfflineLimits, RecordKey};
use crate::storage::Storage;
use crate::transport::connection_info::{self, Endpoint};
use crate::transport::{ClientDriver, ServerDriver, TransportKind};

/// The longest an offline message may wait (DESIGN §6).
pub const MAX_OFFLINE_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// The storage key of the listen addresses of the last run.
pub const CONNECTION_INFO_KEY: &str = "connectionInfo";
/// How often the connection manager checks its timeouts.
const TICK: Duration = Duration::from_millis(100);

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
    /// Bounds of the offline buffer.
    pub offline: OfflineLimits,
    /// Message ids remembered for de-duplication. Default 65,536.
    pub dedup: usize,
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
            offline: OfflineLimits::default(),
            dedup: 65_536,
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

struct Conn {
    link: Link,
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
    partial: Vec<u8>,
    partial_pos: usize,
    partial_track: Track,
    written: u64,
    inflight: VecDeque<(u64, Track)>,
    msgs_in: u64,
    msgs_out: u64,
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
    next_tick: Instant,
    next_retry: Instant,
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
        let config = ServerConfig::with_stream(our_box.clone(), stream);
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
        Ok(Net {
            dir: DirectoryCache::new(cfg.node_info_ttl, cfg.lookup_timeout),
            dedup: Dedup::load(cfg.dedup, storage).unwrap_or_else(|e| {
                log::debug!("de-duplication memory could not be loaded: {e}");
                Dedup::new(cfg.dedup)
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
            next_tick: now,
            next_retry: now,
            next_dedup_flush: now,
            scratch: vec![0; 64 * 1024],
        })
    }

    /// Our endpoints (as bound).
    pub(crate) fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Hands a readiness event to the driver it belongs to.
    pub(crate) fn handle_event(&mut self, event: &mio::event::Event, now: Instant) {
        let t = event.token();
        if t.0 >= CONNECTION_TOKEN_BASE {
            if let Some(c) = self.conns.get_mut(t.0 - CONNECTION_TOKEN_BASE) {
                if let Link::Client(d) = &mut c.link {
                    d.handle_event(&self.registry, event, now);
                }
            }
        } else if self.server.owns(t) {
            if let Err(e) = self.server.handle_event(&self.registry, event, now) {
                log::debug!("listener error: {e}");
            }
        }
    }

    /// When the manager next needs a turn.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let mut d = self.server.next_deadline();
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                d = Some(d.map_or(x, |y: Instant| y.min(x)));
            }
        };
        for (_, c) in self.conns.iter() {
            if let Link::Client(drv) = &c.link {
                at(drv.next_deadline());
            }
        }
        if !self.fired.is_empty() {
            at(Some(Instant::now()));
        }
        if !self.conns.is_empty() || !self.peers.is_empty() || !self.offline.is_empty() {
            at(Some(self.next_tick));
        }
        d
    }

    /// Whether completed deliveries wait for their callbacks.
    pub(crate) fn has_fired(&self) -> bool {
        !self.fired.is_empty()
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

    /// When the next check of timeouts is due: soon while something is pending (queued
    /// messages that may expire, lookups, handshakes, closing connections), otherwise only as
    /// often as keepalives and offline retries need.
    fn schedule_tick(&mut self, now: Instant) {
        let busy = self
            .peers
            .values()
            .any(|p| !p.queue.is_empty() || p.waiting_lookup)
            || self
                .conns
                .iter()
                .any(|(_, c)| c.peer.is_none() || c.closing.is_some())
            || self.dedup.is_dirty();
        let idle = (self.cfg.keepalive / 2).clamp(TICK, Duration::from_secs(1));
        let mut next = now + if busy { TICK } else { idle };
        if !self.offline.is_empty() {
            next = next.min(self.next_retry.max(now + TICK));
        }
        self.next_tick = next;
    }

    /// Makes the next timeout check come soon (new work that may time out).
    fn tick_soon(&mut self, now: Instant) {
        self.next_tick = self.next_tick.min(now + TICK);
    }

    fn is_online(&self, b: &BoxId) -> bool {
        self.peers.get(b).is_some_and(|p| p.online)
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
            peer.retry_at = None;
            peer.queued_bytes += frame.len();
            let cb = callback.map(|c| net.callbacks.insert(c));
            let expires = now + options.expire_after.unwrap_or(net.cfg.realtime_expiry);
            peer.queue.push_back(Pending {
                frame,
                expires: Some(expires),
                track: Track { cb, offline: None },
            });
            net.tick_soon(now);
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
        net.tick_soon(now);
        let online = net.is_online(&b);
        let peer = net.peers.entry(b).or_default();
        peer.sign.get_or_insert(dest);
        peer.retry_at = None;
        if online {
            for (k, frame) in net.offline.take_idle(&dest) {
                let peer = net.peers.entry(b).or_default();
                peer.queued_bytes += frame.len();
                peer.queue.push_back(Pending {
                    frame,
                    expires: None,
                    track: Track {
                        cb: None,
                        offline: Some(k),
                    },
                });
            }
        }
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
    /// in the same turn: listener events, ended connections, frames read into the queue.
    pub(crate) fn net_receive(&mut self) {
        if self.net.is_none() {
            return;
        }
        self.server_events();
        self.client_states();
        let keys: Vec<usize> = self
            .net
            .as_ref()
            .map(|n| n.conns.iter().map(|(k, _)| k).collect())
            .unwrap_or_default();
        for k in keys {
            self.read_conn(k);
        }
    }

    /// One turn of the connection manager: listener events, timeouts, connection set-up,
    /// reading, writing, acknowledgements, driver flushes, then delivery callbacks.
    pub(crate) fn net_pump(&mut self) {
        if self.net.is_none() {
            return;
        }
        let now = self.now;
        self.server_events();
        self.client_states();
        let tick = self.net.as_ref().is_some_and(|n| now >= n.next_tick);
        if tick {
            self.net_tick(now);
        }
        self.ensure_connections(now);
        let keys: Vec<usize> = self
            .net
            .as_ref()
            .map(|n| n.conns.iter().map(|(k, _)| k).collect())
            .unwrap_or_default();
        for k in keys {
            self.read_conn(k);
            self.write_conn(k, now);
            self.check_acks(k);
        }
        if let Some(net) = self.net.as_mut() {
            if let Err(e) = net.server.flush(&net.registry, now) {
                log::debug!("listener flush failed: {e}");
            }
            for (_, c) in net.conns.iter_mut() {
                if let Link::Client(d) = &mut c.link {
                    if let Err(e) = d.flush(&net.registry, now) {
                        log::debug!("connection flush failed: {e}");
                    }
                }
            }
        }
        self.server_events();
        self.client_states();
        self.run_fired();
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

    fn server_events(&mut self) {
        loop {
            let Some(net) = self.net.as_mut() else { return };
            let Some(ev) = net.server.poll_event() else {
                return;
            };
            match ev {
                ServerEvent::Accepted(id) => self.on_accept(id),
                ServerEvent::Closed(id) => {
                    if let Some(k) = self.net.as_mut().and_then(|n| n.by_server.remove(&id)) {
                        self.conn_lost(k, "closed");
                    }
                }
                _ => {}
            }
        }
    }

    fn on_accept(&mut self, id: ConnectionId) {
        let now = self.now;
        let Some(net) = self.net.as_mut() else { return };
        let Some(key) = net.server.server().client_key(id) else {
            return;
        };
        if net.conns.len() >= net.cfg.max_connections {
            log::debug!("too many connections: incoming one refused");
            net.server.server_mut().remove(id);
            return;
        }
        let kind = match net.server.server().path(id) {
            Some(crate::transport::driver::Path::Tcp { .. }) => TransportKind::Tcp,
            _ => TransportKind::Udp,
        };
        let k = net.conns.insert(Conn {
            link: Link::Server(id),
            kind,
            peer_box: BoxId(key),
            peer: None,
            outbound: false,
            active: false,
            closing: None,
            opened: now,
            last_write: now,
            reader: FrameReader::new(net.cfg.max_frame),
            partial: net.identify.clone(),
            partial_pos: 0,
            partial_track: Track::default(),
            written: 0,
            inflight: VecDeque::new(),
            msgs_in: 0,
            msgs_out: 0,
        });
        net.by_server.insert(id, k);
        net.tick_soon(now);
    }

    fn client_states(&mut self) {
        let Some(net) = self.net.as_ref() else { return };
        let dead: Vec<(usize, String)> = net
            .conns
            .iter()
            .filter_map(|(k, c)| match &c.link {
                Link::Client(d) => {
                    if let Some(e) = d.transport_error() {
                        return Some((k, e.to_owned()));
                    }
                    match d.client().state() {
                        ClientState::Failed(e) => Some((k, format!("{e:?}"))),
                        ClientState::Closed => Some((k, "closed".into())),
                        _ => None,
                    }
                }
                Link::Server(_) => None,
            })
            .collect();
        for (k, why) in dead {
            self.conn_lost(k, &why);
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
        if let Link::Server(id) = c.link {
            net.by_server.remove(&id);
            net.server.server_mut().remove(id);
        }
        let mut lost: Vec<Track> = c.inflight.drain(..).map(|(_, t)| t).collect();
        if c.partial_pos > 0 || !c.partial_track.is_none() {
            lost.push(c.partial_track);
        }
        for t in lost {
            complete(net, storage, t, Err(DeliveryError::ConnectionLost));
        }
        let mut offline_sign = None;
        if let Some(p) = net.peers.get_mut(&c.peer_box) {
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
        p.retry_at = Some(now + net.cfg.offline_retry);
        p.queued_bytes = 0;
        let msgs: Vec<Pending> = p.queue.drain(..).collect();
        for m in msgs {
            let r = Err(DeliveryError::Unreachable(why.to_owned()));
            complete(net, storage, m.track, r);
        }
        log::debug!("destination {sign:?} failed: {why}");
        if let Some(s) = sign {
            self.emit_peer("transports.failed", s);
        }
    }

    fn net_tick(&mut self, now: Instant) {
        let storage = &mut *self.storage;
        let Some(net) = self.net.as_mut() else { return };
        net.next_tick = now + TICK;
        // Real-time messages past their expiry.
        for p in net.peers.values_mut() {
            if p.queue.iter().all(|m| m.expires.map_or(true, |e| e > now)) {
                continue;
            }
            let mut keep = VecDeque::with_capacity(p.queue.len());
            let mut expired = Vec::new();
            for m in p.queue.drain(..) {
                if m.expires.is_some_and(|e| e <= now) {
                    p.queued_bytes -= m.frame.len();
                    expired.push(m.track);
                } else {
                    keep.push_back(m);
                }
            }
            p.queue = keep;
            for t in expired {
                if let Some(cb) = t.cb {
                    net.fired.push((cb, Err(DeliveryError::Expired)));
                }
            }
        }
        // Connections that did not identify in time, and closing ones that linger.
        let slow: Vec<usize> = net
            .conns
            .iter()
            .filter(|(_, c)| {
                let age = now.saturating_duration_since(c.opened);
                (c.peer.is_none() && age >= net.cfg.connect_timeout)
                    || c.closing
                        .is_some_and(|t| now.saturating_duration_since(t) >= net.cfg.dead_after)
            })
            .map(|(k, _)| k)
            .collect();
        // Keepalives.
        for (_, c) in net.conns.iter_mut() {
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
        }
        // The de-duplication memory, at most every half second.
        if net.dedup.is_dirty() && now >= net.next_dedup_flush {
            net.next_dedup_flush = now + Duration::from_millis(500);
            if let Err(e) = net.dedup.flush(storage) {
                log::debug!("de-duplication memory could not be stored: {e}");
            }
        }
        // Offline retries and expiry.
        let retry = now >= net.next_retry;
        let mut expired_keys = Vec::new();
        if retry {
            net.next_retry = now + net.cfg.offline_retry;
            expired_keys = net.offline.expire(storage, wall_ms());
            for dest in net.offline.idle_destinations() {
                let Ok(b) = dest.to_box_id() else { continue };
                let p = net.peers.entry(b).or_default();
                p.sign.get_or_insert(dest);
                if p.retry_at.is_some_and(|t| t <= now) {
                    p.retry_at = None;
                }
            }
        }
        for (key, _) in expired_keys {
            if let Some(cb) = net.offline_cbs.remove(&key) {
                net.fired.push((cb, Err(DeliveryError::Expired)));
            }
        }
        let lookups = net.dir.expired_lookups(now);
        // Forget idle peers.
        let offline_dests: Vec<SignId> = if net.peers.len() > 64 {
            net.offline.idle_destinations()
        } else {
            Vec::new()
        };
        if !offline_dests.is_empty() || net.peers.len() > 64 {
            net.peers.retain(|_, p| {
                p.conn.is_some()
                    || !p.queue.is_empty()
                    || p.waiting_lookup
                    || p.sign.is_some_and(|s| offline_dests.contains(&s))
            });
        }
        for k in slow {
            self.conn_lost(k, "timed out");
        }
        for s in lookups {
            let Ok(b) = s.to_box_id() else { continue };
            let waiting = self
                .net
                .as_ref()
                .and_then(|n| n.peers.get(&b))
                .is_some_and(|p| p.waiting_lookup);
            if waiting {
                self.fail_peer(b, "nodeInfo lookup timed out", now);
            }
        }
        if let Some(net) = self.net.as_mut() {
            net.schedule_tick(now);
        }
    }

    fn ensure_connections(&mut self, now: Instant) {
        let Some(net) = self.net.as_ref() else { return };
        let offline_dests = if net.offline.is_empty() {
            Vec::new()
        } else {
            net.offline.idle_destinations()
        };
        let wanted: Vec<BoxId> = net
            .peers
            .iter()
            .filter(|(_, p)| {
                p.conn.is_none()
                    && !p.waiting_lookup
                    && p.retry_at.map_or(true, |t| t <= now)
                    && (!p.queue.is_empty() || p.sign.is_some_and(|s| offline_dests.contains(&s)))
            })
            .map(|(b, _)| *b)
            .collect();
        for b in wanted {
            self.connect_peer(b, now);
        }
        // Online peers with idle offline records (retry after a failed attempt).
        let Some(net) = self.net.as_mut() else { return };
        for dest in offline_dests {
            let Ok(b) = dest.to_box_id() else { continue };
            if !net.is_online(&b) {
                continue;
            }
            for (k, frame) in net.offline.take_idle(&dest) {
                let p = net.peers.entry(b).or_default();
                p.queued_bytes += frame.len();
                p.queue.push_back(Pending {
                    frame,
                    expires: None,
                    track: Track {
                        cb: None,
                        offline: Some(k),
                    },
                });
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
            return; // retried next turn
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
                entry.insert(Conn {
                    link: Link::Client(Box::new(d)),
                    kind: ep.kind,
                    peer_box: b,
                    peer: None,
                    outbound: true,
                    active: false,
                    closing: None,
                    opened: now,
                    last_write: now,
                    reader: FrameReader::new(net.cfg.max_frame),
                    partial: net.identify.clone(),
                    partial_pos: 0,
                    partial_track: Track::default(),
                    written: 0,
                    inflight: VecDeque::new(),
                    msgs_in: 0,
                    msgs_out: 0,
                });
                p.conn = Some(k);
                net.tick_soon(now);
                log::debug!("connecting to {sign} over {:?} at {}", ep.kind, ep.addr);
            }
            Err(e) => {
                log::debug!("connecting to {} failed: {e}", ep.addr);
                p.endpoint += 1;
            }
        }
    }

    /// Reads complete frames from connection `k` into the local queue.
    fn read_conn(&mut self, k: usize) {
        for _ in 0..1024 {
            // Frames already buffered first.
            loop {
                if self.queue.len() >= self.limits.local_queue {
                    return;
                }
                let Some(net) = self.net.as_mut() else { return };
                let Some(c) = net.conns.get_mut(k) else {
                    return;
                };
                match c.reader.next_envelope() {
                    Ok(Some(env)) => {
                        if !self.handle_envelope(k, env) {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("connection {k}: bad frame ({e}); closing it");
                        self.conn_lost(k, "protocol error");
                        return;
                    }
                }
            }
            let Some(net) = self.net.as_mut() else { return };
            let Some(c) = net.conns.get_mut(k) else {
                return;
            };
            let room = c.reader.room().min(net.scratch.len());
            let Some(stream) = stream_of(&mut net.server, &mut c.link) else {
                return;
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
                return;
            }
            c.reader.push(&net.scratch[..n]);
        }
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
            if !net.dedup.first_time(id) {
                self.stats.duplicates += 1;
                log::debug!("duplicate message from {sign} dropped");
                return true;
            }
            net.next_tick = net.next_tick.min(self.now + TICK);
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
        peer.retry_at = None;
        if let Some(o) = demote {
            let identified = net.conns[o].peer.is_some();
            if identified {
                let c = &mut net.conns[o];
                c.active = false;
                c.closing = Some(now);
                if let Some(s) = stream_of(&mut net.server, &mut c.link) {
                    s.finish(Eof::Success);
                }
            } else {
                // An attempt still in its handshake: drop it (it was not active, so no event).
                if let Some(p) = net.peers.get_mut(&b) {
                    p.conn = Some(k);
                }
                let c = net.conns.remove(o);
                if let Link::Server(id) = c.link {
                    net.by_server.remove(&id);
                    net.server.server_mut().remove(id);
                }
            }
        }
        // Offline records for this peer join its queue.
        for (key, frame) in net.offline.take_idle(&sign) {
            let p = net.peers.entry(b).or_default();
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
        } else {
            net.offline.release(&key);
        }
    }
    if let Some(cb) = t.cb {
        net.fired.push((cb, result));
    }
}
