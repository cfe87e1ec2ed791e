//! The connection manager: CurveCP connections to other nodes, per-destination send queues,
//! the directory's lookups and the offline buffer, driven by the platform's reactor.
//!
//! # Files
//!
//! The manager is one value, `Net`, owned by the platform's core, which calls it (when the
//! platform has transports) with a narrow context, `Cx` (`context`): the turn's `now`, the
//! storage, the key cache, the circles, the counters it updates and the room left in the local
//! delivery queue. What it has for the platform it hands back as outputs (`Output`: messages
//! to deliver, built-in messages to publish, events), which the platform applies in order
//! after each call; delivery callbacks wait in it until the platform takes them
//! (`Net::take_fired`) and runs them with its `Context`. The platform knows nothing of
//! connections, peers or frames.
//!
//! This module holds the state (`Net`, `Conn`, `Peer`, `Pending`) and its bookkeeping, and
//! binds the listeners; the work is split by what it is about: `dialect` (everything that
//! differs between native and JavaScript peers), `config` (settings and reports), `lifecycle`
//! (connections coming and going, the one-connection-per-peer rule), `sending` (queues,
//! writes, acknowledgements), `receiving` (frames in, delivery acknowledgements out, the
//! directory's bus messages), `reach` (reachability: observed addresses, dial-back, relays,
//! hole punching), `turn` (the two passes of a turn tying them together), `frame_pool`
//! (spare large buffers) and `idle` (what is still unacknowledged, for
//! [`super::Platform::close`]).
//!
//! # Listeners and connections
//!
//! One [`ServerDriver`] listens on UDP and TCP (native framing, docs/ARCHITECTURE.md §4.2) with the node's box
//! key pair as CurveCP long-term key (server name: 256 zero bytes, zero extensions). Its
//! sockets use the tokens from `LISTENER_TOKEN_BASE` (UDP, then the TCP listener,
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
//! (For a JavaScript peer, which speaks none of the `mm` frames below, see `dialect`.) Each
//! side's first frame is `mm`/`identify` with its signId; the receiver checks that the
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
//! (docs/ARCHITECTURE.md §9); idle connections and peers cost nothing, and an idle node sleeps until its
//! nearest real deadline.
//!
//! - *Two passes.* `Net::receive`, before the turn's deliveries, handles the listeners'
//!   events once (accepted and closed connections; those with input) and reads each
//!   *readable* connection once, so that what arrived is delivered in the same turn.
//!   `Net::pump`, after the deliveries, fires due timers, connects wanted peers and visits
//!   each *dirty* connection once, so that what the callbacks sent is written in the same
//!   turn; it ends with the listeners' flush, whose events (packets read in the flush,
//!   connections it closed) are handled at the start of the next turn's receiving pass, which
//!   `Net::has_work` makes immediate.
//! - *Readable connections.* A connection is queued (once: a flag dedups it) for the next
//!   receiving pass when its socket had a readiness event (outgoing connections: their token),
//!   when the listeners' server names it (`ServerEvent::Accepted`, `Readable`, `Writable`),
//!   or when frame budget it waited for was released. A connection whose read stopped because
//!   the local delivery queue is full (with those not reached because of it), or whose read
//!   budget ran out, stays readable for the next turn; one whose frame does not fit the frame
//!   budget waits for a release.
//! - *Dirty connections.* A connection is queued (once) for this turn's pump when it was read,
//!   when its socket had a readiness event, when the application queued frames for its peer,
//!   when it was demoted or closed by the simultaneous-connect rule, or when its timer fired.
//!   A visit identifies a JavaScript server whose handshake finished, writes the partial frame
//!   and the peer's queue, settles acknowledged messages, flushes the driver, ends it if its
//!   handshake or transport failed, and moves its timer to its next deadline. Server-side
//!   connections with unacknowledged tracked messages are also checked when the listeners had
//!   input, because the server reports no event for a bare acknowledgement.
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
//! byte. A real-time message completes when [`crate::curvecp::stream::Stream::bytes_acked`]
//! reaches it. An offline record then waits (in the connection's `awaiting` set) for the
//! peer's `mm`/`delivered` frame naming its id, sent once the peer delivered the message and
//! stored its id (see "Delivery guarantee" in [`crate::offline`]); a peer whose identify frame
//! does not announce such acknowledgements (a JavaScript node, an older node) settles it at
//! the stream's acknowledgement. If the connection ends first, a real-time message fails with
//! [`DeliveryError::ConnectionLost`] (its bytes may or may not have arrived) and an offline
//! record becomes idle again.
//!
//! On the receiving side, a message with an id from a peer that wants acknowledgements is
//! noted when it is read; once dispatched, its acknowledgement is due; at the end of the turn's
//! deliveries the de-duplication memory is written once and the due acknowledgements go out
//! (grouped per peer, at most 1,024 ids a frame, ahead of that peer's queue, on a live
//! connection only: a sender without one retries, and its retry is acknowledged as a
//! duplicate). If the write fails, no acknowledgement is sent; it is tried again at the
//! de-duplication timer.
//!
//! # A peer that restarted
//!
//! A peer that restarts loses its sessions without a word: over UDP our packets are ignored,
//! over TCP the connection is reset. Data in flight and unacknowledged for
//! [`NetConfig::dead_after`] (5 s by default; an idle connection's keepalive counts) ends the
//! connection, which releases its records and opens a new one at once if anything waits. A
//! destination whose attempts all failed is tried again after 1 s, 2 s, 4 s, ... at most
//! [`NetConfig::offline_retry`] (5 s), so a peer that comes back is found within about that
//! (`tests/peer_restart.rs`: UDP only, TCP only, both).
//!
//! # Bounds
//!
//! Per destination at most [`NetConfig::peer_queue_messages`] messages and
//! [`NetConfig::peer_queue_bytes`] bytes wait in memory, and [`NetConfig::send_queue_bytes`]
//! for all destinations together (sends beyond return [`crate::SendError::BufferFull`]; an empty
//! queue takes one message up to a maximal frame whatever the byte bounds); the offline buffer has its own bounds; connections are capped
//! by [`NetConfig::max_connections`], of which [`NetConfig::reserved_outbound`] slots are
//! kept from incoming connections of peers outside our friends and devices circles (any
//! identity costs nothing to make, so strangers must not be able to fill the table and block
//! our own connections), and strangers' incoming connections are capped per source address
//! ([`NetConfig::max_inbound_per_ip`]; IPv6 per /64) — refused ones are dropped from the
//! CurveCP server at once; incoming frames are limited to [`NetConfig::max_frame`]
//! bytes (a larger one closes that connection only), and to 1 KiB until the peer has
//! identified itself; a connection stops reading while the
//! local delivery queue is full (the peer is then flow-controlled by CurveCP); TCP streams
//! whose CurveCP handshake has not completed are capped per source address (the oldest is
//! evicted) and closed after a few seconds ([`NetConfig::listener_limits`], see
//! [`crate::transport::driver`]).
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

mod config;
mod context;
mod dialect;
mod frame_pool;
mod idle;
mod lifecycle;
mod portmap;
mod reach;
mod receiving;
mod sending;
mod turn;

pub use config::{ConnectionStats, DeliveryCallback, DeliveryError, NetConfig, RelayInUse};
pub(crate) use context::{Cx, Output};
pub(crate) use receiving::{parse_directory_reply, parse_node_info};

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Registry, Token};
use slab::Slab;

use super::directory::{Directory, DirectoryCache};
use super::timers::{TimerId, Timers};
use super::{MessageId, CONNECTION_TOKEN_BASE};
use crate::crypto::BoxKeyPair;
use crate::curvecp::server::{ClientPolicy, ConnectionId, ServerConfig, ServerEvent};
use crate::curvecp::stream::{Stream, StreamConfig};
use crate::envelope::{Envelope, FrameReader};
use crate::identity::{BoxId, SignId};
use crate::offline::{Dedup, OfflineBuffer, RecordKey};
use crate::storage::Storage;
use crate::transport::connection_info::{self, Endpoint};
use crate::transport::{ClientDriver, ServerDriver, SourceKey, TransportKind};
use dialect::{Body, Dialect};

/// The longest an offline message may wait (docs/ARCHITECTURE.md §6).
pub const MAX_OFFLINE_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// The storage key of the listen addresses of the last run.
pub const CONNECTION_INFO_KEY: &str = "connectionInfo";

/// The de-duplication memory is written at most this often while messages arrive (messages
/// that wait for a delivery acknowledgement have their ids written at the end of the turn that
/// delivered them).
const DEDUP_FLUSH_EVERY: Duration = Duration::from_millis(500);
/// The id of our identify frame: says that we acknowledge the delivery of messages sent
/// through an offline buffer (`mm`/`delivered`), and wait for that acknowledgement before
/// deleting our own records. A peer whose identify has no such id gets neither.
pub(crate) const DELIVERY_ACKS: &[u8] = b"mm-delivery-acks/1";
/// Ids per `mm`/`delivered` frame (16 bytes each). A frame with more, or whose length is not a
/// multiple of 16, is ignored whole.
const ACKS_PER_FRAME: usize = 1024;
/// Within a turn that delivers messages awaiting acknowledgement, their ids are stored (and
/// acknowledged) at least this often, not only at the end of the turn: the duplicates a crash
/// can cause are the messages delivered in the last this-long (see "Delivery guarantee" in
/// [`crate::offline`]).
const ACK_STORE_EVERY: Duration = Duration::from_millis(20);
/// Delivery acknowledgements waiting for the de-duplication memory to be stored, at most: past
/// that (storage failing for a long time) the oldest are dropped, and their senders retry.
const MAX_ACKS_DUE: usize = 65_536;
/// Bytes of a partly received frame every connection may buffer outside
/// [`NetConfig::frame_budget`] (so small frames always flow, whatever large ones are pending).
const FRAME_FLOOR: usize = 64 * 1024;
/// Most bytes moved from a connection's stream into its frame reader in one step.
const READ_STEP: usize = 64 * 1024;
/// Known peers beyond which idle ones (no connection, nothing queued, no lookup, no offline
/// record) are forgotten as soon as they become idle.
const KEEP_IDLE_PEERS: usize = 64;

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

/// A message waiting in a peer's queue.
struct Pending {
    body: Body,
    /// The bytes it counts for in the queue bounds (its frame's length when it was queued).
    len: usize,
    /// `None` for offline records (their expiry is the buffer's business).
    expires: Option<Instant>,
    track: Track,
}

impl Pending {
    /// A frame encoded for `dialect`.
    fn frame(frame: Vec<u8>, dialect: Dialect, expires: Option<Instant>, track: Track) -> Pending {
        Pending {
            len: frame.len(),
            body: Body::Frame(frame, dialect),
            expires,
            track,
        }
    }
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
    /// A directory lookup (keyed by the box key it is for) times out.
    Lookup(BoxId),
    /// The offline buffer's periodic retry and expiry.
    OfflineRetry,
    /// The de-duplication memory is written.
    DedupFlush,
    /// Our relay reservation is bound (again).
    #[cfg(feature = "relay")]
    RelayBind,
    /// Relay candidates are looked at again (a probe's deadline, the next search).
    #[cfg(feature = "relay")]
    RelayWait,
    /// A dial-back check's time is up.
    DialBack,
    /// The spare frame buffers may be released.
    FramePool,
    /// The port mapper's resend, renewal or expiry.
    PortMap,
    /// A refused check of our mapped port may be asked for again.
    DialBackRetry,
    /// The first reachability check waits no longer for the port mapper.
    MappingWait,
    /// A listener on `::` reads its global IPv6 addresses again.
    Interfaces,
}

/// How far [`Net::read_conn`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadOutcome {
    /// Everything readable was read (or the connection ended).
    Done,
    /// The local delivery queue is full: read the rest once it has room.
    Blocked,
    /// The per-visit budget ran out with more to read: read again next turn.
    More,
    /// The frame in progress does not fit in [`NetConfig::frame_budget`]: read again once
    /// reserved frame bytes are released (the connection waits in [`Net::budget_waiters`]).
    Starved,
}

struct Conn {
    link: Link,
    /// In [`Net::dirty`] (visited in this turn's pump).
    dirty: bool,
    /// In [`Net::readable`] (read in the next receiving pass).
    readable: bool,
    /// In [`Net::watch`] (unacknowledged tracked messages on a server-side stream).
    watched: bool,
    /// Its entry in the timer heap and the deadline it is for.
    timer: Option<(TimerId, Instant)>,
    kind: TransportKind,
    /// What the peer speaks (see [`dialect`]).
    dialect: Dialect,
    /// The peer is authenticated: its identify frame checked (native), or its CurveCP
    /// handshake done (JavaScript).
    identified: bool,
    /// The peer's identify announced delivery acknowledgements ([`DELIVERY_ACKS`]).
    peer_acks: bool,
    /// Offline records whose bytes the peer's stream acknowledged and that wait for its
    /// delivery acknowledgement (`peer_acks` only). Released if the connection ends first.
    awaiting: HashSet<RecordKey>,
    /// `directory.get` was asked for this (JavaScript) peer's signId.
    asked_sign: bool,
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
    inbound_from: Option<SourceKey>,
    partial: Vec<u8>,
    partial_pos: usize,
    partial_track: Track,
    written: u64,
    inflight: VecDeque<(u64, Track)>,
    msgs_in: u64,
    msgs_out: u64,
    /// Where its packets go and whether through a relay, as last reported (`Event::Path`).
    path: Option<(SocketAddr, bool)>,
    /// A hole punch was started for it (one round per connection).
    #[cfg(feature = "relay")]
    punched: bool,
    /// An IPv6 hole punch was started for it (one round per connection).
    #[cfg(feature = "relay")]
    punched6: bool,
}

impl Conn {
    /// A connection that has not identified yet: it writes its dialect's greeting first (our
    /// identify frame, or nothing) and reads frames up to its dialect's first-frame limit
    /// until the peer is identified. Outgoing when `link` is a client driver.
    fn new(
        link: Link,
        (kind, dialect): (TransportKind, Dialect),
        peer_box: BoxId,
        inbound_from: Option<SourceKey>,
        (max_frame, identify): (usize, &[u8]),
        now: Instant,
    ) -> Conn {
        Conn {
            dialect,
            identified: false,
            peer_acks: false,
            awaiting: HashSet::new(),
            asked_sign: false,
            outbound: matches!(link, Link::Client(_)),
            link,
            dirty: false,
            readable: false,
            watched: false,
            timer: None,
            kind,
            peer_box,
            peer: None,
            active: false,
            closing: None,
            opened: now,
            last_write: now,
            reader: FrameReader::new(dialect.first_frame_limit(max_frame)),
            reserved: 0,
            budget_wait: false,
            inbound_from,
            partial: dialect.greeting(identify).to_vec(),
            partial_pos: 0,
            partial_track: Track::default(),
            written: 0,
            inflight: VecDeque::new(),
            msgs_in: 0,
            msgs_out: 0,
            path: None,
            #[cfg(feature = "relay")]
            punched: false,
            #[cfg(feature = "relay")]
            punched6: false,
        }
    }
}

#[derive(Default)]
struct Peer {
    sign: Option<SignId>,
    conn: Option<usize>,
    /// The dialect of its latest connection (`None`: never connected): what its queued
    /// messages are encoded for.
    dialect: Option<Dialect>,
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    attempts: u32,
    endpoint: usize,
    /// Why the last connection attempt failed (named when the peer is given up).
    last_failure: Option<String>,
    online: bool,
    waiting_lookup: bool,
    retry_at: Option<Instant>,
    /// In [`Net::want`] (ensure_connections looks at it this turn).
    wanted: bool,
    /// Failures since it was last connected (the retry wait doubles with each).
    failures: u32,
    /// `Connection` and `transports.online` were reported for it (a JavaScript peer is
    /// reported once its signId is known).
    announced: bool,
    retry_timer: Option<TimerId>,
    /// The timer of the earliest expiry of `queue`, and that expiry.
    expiry_timer: Option<(TimerId, Instant)>,
}

/// The connection manager's state (owned by the platform's core, called with a [`Cx`]).
pub(crate) struct Net {
    /// Reachability: observed addresses, the relay we use, the endpoints we publish.
    reach: reach::Reach,
    /// Asking the gateway to map our UDP port, when that applies (`portmap`).
    portmap: Option<portmap::PortMap>,
    cfg: NetConfig,
    registry: Registry,
    server: ServerDriver,
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
    /// Connections to read in the next receiving pass: socket input, a read cut short (the
    /// local delivery queue full, the per-visit budget spent), room in the frame budget.
    readable: Vec<usize>,
    /// Server events raised by the listeners' flush at the end of a pump, handled at the start
    /// of the next receiving pass.
    server_backlog: VecDeque<ServerEvent>,
    /// Server-side connections with unacknowledged tracked messages (checked when the
    /// listeners had input: the server reports no event for a bare acknowledgement).
    watch: Vec<usize>,
    /// Frame bytes reserved by all connections (at most `frame_budget`).
    frame_used: usize,
    /// Bytes of frames waiting in all peers' queues (the sum of their `queued_bytes`; real-time
    /// sends refused beyond `cfg.send_queue_bytes`).
    queued_total: usize,
    /// `cfg.frame_budget`, raised to at least one maximal frame.
    frame_budget: usize,
    /// Connections waiting for room in the frame budget (made readable when some is released).
    budget_waiters: Vec<usize>,
    /// Incoming connections from strangers per source address (see `max_inbound_per_ip`).
    inbound_per_ip: HashMap<SourceKey, usize>,
    /// Peers to look at in `ensure_connections` (something to send, retry due, ...).
    want: Vec<BoxId>,
    /// Destinations whose offline records went back to idle (become `want`).
    released: Vec<SignId>,
    /// Peers that could not connect because of `max_connections`.
    conn_waiters: Vec<BoxId>,
    /// Lookups started for a destination key taken as a signId: the key, as a box key, to the
    /// peer entry waiting (a nodeInfo whose boxId is that key re-keys the entry: the key was a
    /// JavaScript node's boxId). Bounded by the pending lookups.
    aliases: HashMap<BoxId, BoxId>,
    /// The listeners had socket input (or work left over) since the last pump.
    server_io: bool,
    offline_timer: Option<TimerId>,
    dedup_timer: Option<TimerId>,
    /// Spare buffers for large outgoing frames.
    frames: frame_pool::FramePool,
    next_dedup_flush: Instant,
    /// Messages with a delivery acknowledgement to send once they are dispatched (sender, id).
    /// Bounded by the local delivery queue.
    ack_on_dispatch: HashSet<(BoxId, MessageId)>,
    /// Delivery acknowledgements to send once the de-duplication memory is stored, in order.
    acks_due: VecDeque<(BoxId, MessageId)>,
    /// Storing the de-duplication memory failed: acknowledgements wait for the next try (at the
    /// de-duplication timer), not for the next turn.
    ack_store_failed: bool,
    /// When the ids of delivered messages were last stored for acknowledgement.
    acks_stored_at: Instant,
    /// Offline records deleted on their delivery acknowledgement since start (for
    /// [`super::Platform::close`]'s report).
    records_delivered: u64,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The native frame of an `mm` message of ours.
fn mm_frame(topic: &str, payload: Vec<u8>) -> Vec<u8> {
    Dialect::Native.frame_of(&Envelope::new(topic, "mm", payload))
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

/// What [`Net::bind`] needs besides the settings.
pub(crate) struct BindArgs<'a> {
    /// Where the listeners' sockets are registered.
    pub(crate) registry: Registry,
    /// The listeners' first token.
    pub(crate) base: Token,
    /// Our box key pair (the CurveCP long-term key).
    pub(crate) our_box: BoxKeyPair,
    /// Our signId (announced in our identify frame).
    pub(crate) our_sign: SignId,
    /// The requested endpoints (first UDP and first TCP used).
    pub(crate) listen: &'a [Endpoint],
    /// The store of the offline buffer, de-duplication memory and remembered peers.
    pub(crate) storage: &'a mut dyn Storage,
    /// The application's directory, asked before the bus.
    pub(crate) custom_dir: Option<Box<dyn Directory>>,
    /// Which clients the listeners accept (`None`: any).
    pub(crate) accept: Option<ClientPolicy>,
    /// The time of the build.
    pub(crate) now: Instant,
}

impl Net {
    /// Binds the listeners and opens the offline buffer, the de-duplication memory and the
    /// directory's memory of peers.
    pub(crate) fn bind(cfg: NetConfig, args: BindArgs<'_>) -> io::Result<Net> {
        let BindArgs {
            registry,
            base,
            our_box,
            our_sign,
            listen,
            storage,
            custom_dir,
            accept,
            now,
        } = args;
        let server = bind_listeners(&cfg, &registry, base, &our_box, listen, accept, now)?;
        let endpoints = bound_endpoints(&cfg, &server);
        store_listen_addresses(storage, &endpoints);
        let offline = OfflineBuffer::open(storage, cfg.offline, wall_ms());
        let identify = Dialect::Native.frame_of(&Envelope {
            id: Some(DELIVERY_ACKS.to_vec()),
            ..Envelope::new("identify", "mm", our_sign.to_string().into_bytes())
        });
        let mut timers = Timers::default();
        // Records of the last run: retried (and expired) at once.
        let offline_timer =
            (!offline.is_empty()).then(|| timers.schedule(now, NetTimer::OfflineRetry));
        let mut net = Net {
            reach: reach::Reach::new(&endpoints),
            portmap: None,
            dir: DirectoryCache::new(cfg.node_info_ttl, cfg.lookup_timeout)
                .with_memory(storage, wall_ms()),
            dedup: Dedup::open(cfg.dedup, cfg.dedup_per_peer, storage),
            cfg,
            registry,
            server,
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
            ping: mm_frame("ping", Vec::new()),
            timers,
            dirty: Vec::new(),
            readable: Vec::new(),
            server_backlog: VecDeque::new(),
            watch: Vec::new(),
            frame_used: 0,
            queued_total: 0,
            frame_budget: cfg
                .frame_budget
                .max(crate::netstring::encoded_len(cfg.max_frame).saturating_sub(FRAME_FLOOR)),
            budget_waiters: Vec::new(),
            inbound_per_ip: HashMap::new(),
            want: Vec::new(),
            released: Vec::new(),
            conn_waiters: Vec::new(),
            aliases: HashMap::new(),
            server_io: false,
            offline_timer,
            dedup_timer: None,
            frames: frame_pool::FramePool::default(),
            next_dedup_flush: now,
            ack_on_dispatch: HashSet::new(),
            acks_due: VecDeque::new(),
            ack_store_failed: false,
            acks_stored_at: now,
            records_delivered: 0,
        };
        net.reach.restore_relay_choice(storage);
        reach::serve_whois(&net.cfg, &mut net.server, our_sign);
        net.portmap_start(now);
        net.interfaces_start(now);
        Ok(net)
    }

    /// Hands a readiness event to the driver it belongs to; an outgoing connection's event
    /// makes it readable and dirty (read in this turn's receiving pass, visited in its pump).
    pub(crate) fn handle_event(&mut self, event: &mio::event::Event, now: Instant) {
        let t = event.token();
        if t.0 >= CONNECTION_TOKEN_BASE {
            let k = t.0 - CONNECTION_TOKEN_BASE;
            if let Some(c) = self.conns.get_mut(k) {
                if let Link::Client(d) = &mut c.link {
                    d.handle_event(&self.registry, event, now);
                    self.mark_readable(k);
                    self.mark_dirty(k);
                }
            }
        } else if t == portmap::PORTMAP_TOKEN {
            self.portmap_readable(now);
        } else if t == portmap::SSDP_TOKEN {
            self.ssdp_readable(now);
        } else if t == portmap::UPNP_HTTP_TOKEN {
            self.upnp_http_ready(false, now);
        } else if t == portmap::UPNP_HTTP_TCP_TOKEN {
            self.upnp_http_ready(true, now);
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

    /// Whether the next turn has work at once: connections to read or visit, server events
    /// left from the last flush, wanted peers, completed deliveries waiting for their
    /// callbacks.
    pub(crate) fn has_work(&self) -> bool {
        !self.fired.is_empty()
            || !self.dirty.is_empty()
            || !self.readable.is_empty()
            || !self.server_backlog.is_empty()
            || !self.want.is_empty()
            || !self.released.is_empty()
            || (!self.acks_due.is_empty() && !self.ack_store_failed)
    }

    /// A delivery acknowledgement of message `id` to peer `b`, sent once the id is stored.
    fn queue_ack(&mut self, b: BoxId, id: MessageId) {
        if self.acks_due.len() >= MAX_ACKS_DUE {
            // Storage has failed for long: the oldest sender retries later.
            self.acks_due.pop_front();
        }
        self.acks_due.push_back((b, id));
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

    /// Queues connection `k` for the next receiving pass (once).
    fn mark_readable(&mut self, k: usize) {
        if let Some(c) = self.conns.get_mut(k) {
            if !c.readable {
                c.readable = true;
                self.readable.push(k);
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
            self.mark_readable(k);
        }
    }

    /// Undoes everything that refers to connection `k` outside the slab, once it has been
    /// taken out of it: its timer, its places in the watch and readable lists, its shares
    /// of the per-address and frame budgets, and its CurveCP server connection.
    fn unlink(&mut self, k: usize, c: &mut Conn) {
        if let Some((id, _)) = c.timer.take() {
            self.timers.cancel(id);
        }
        if c.watched {
            self.watch.retain(|&w| w != k);
        }
        if c.readable {
            self.readable.retain(|&w| w != k);
        }
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
        if !c.identified {
            at(c.opened + cfg.connect_timeout);
        }
        match c.closing {
            Some(t) => at(t + cfg.dead_after),
            None => {
                if c.active && c.dialect.speaks_mm() && c.partial_pos >= c.partial.len() {
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
            remote: c.path.map(|p| p.0),
            relayed: c.path.is_some_and(|p| p.1),
        }
    }

    /// Statistics of every connection.
    pub(crate) fn connections(&self) -> Vec<ConnectionStats> {
        self.conns.iter().map(|(_, c)| self.conn_stats(c)).collect()
    }

    /// Whether any connection exists.
    pub(crate) fn has_connections(&self) -> bool {
        !self.conns.is_empty()
    }

    /// Records waiting in the offline buffer.
    pub(crate) fn offline_len(&self) -> usize {
        self.offline.len()
    }

    /// The largest frame a message to another node can ever take, whatever it waits for (a
    /// larger one is `TooLarge`, never `BufferFull`): real-time, what an empty destination queue
    /// takes (the queue bounds, but always one frame up to `max_frame`; see `queue_refuses` in
    /// `sending`); non-real-time, a frame up to `max_frame`, what a peer with our settings
    /// receives.
    pub(crate) fn largest_frame(&self, realtime: bool) -> usize {
        let frame = crate::netstring::encoded_len(self.cfg.max_frame);
        if !realtime {
            return frame;
        }
        if self.cfg.peer_queue_messages == 0 {
            return 0;
        }
        let bound = |limit: usize| limit.max(frame);
        bound(self.cfg.peer_queue_bytes).min(bound(self.cfg.send_queue_bytes))
    }

    /// Messages waiting in memory for `dest`.
    pub(crate) fn queued_for(&self, dest: &BoxId) -> usize {
        self.peers.get(dest).map_or(0, |p| p.queue.len())
    }

    /// Bytes of frames waiting in memory for all destinations.
    pub(crate) fn queued_bytes(&self) -> usize {
        debug_assert_eq!(
            self.queued_total,
            self.peers.values().map(|p| p.queued_bytes).sum::<usize>()
        );
        self.queued_total
    }

    fn is_online(&self, b: &BoxId) -> bool {
        self.peers.get(b).is_some_and(|p| p.online)
    }

    /// Moves what waits for peer entry `from` (a destination key first taken as a signId) to
    /// the entry of box key `to` (the key was that JavaScript node's boxId): its queued
    /// messages, with their expiry timer. Nothing else of `from` is kept.
    fn rekey_peer(&mut self, from: BoxId, to: BoxId, now: Instant) {
        let Some(old) = self.peers.get(&from) else {
            return;
        };
        if old.conn.is_some() {
            return;
        }
        let Some(old) = self.peers.remove(&from) else {
            return;
        };
        self.dir.cancel_lookup(&from);
        if let Some(id) = old.retry_timer {
            self.timers.cancel(id);
        }
        if let Some((id, _)) = old.expiry_timer {
            self.timers.cancel(id);
        }
        let earliest = old.queue.iter().filter_map(|m| m.expires).min();
        let p = self.peers.entry(to).or_default();
        p.queued_bytes += old.queued_bytes;
        p.queue.extend(old.queue);
        if let Some(e) = earliest {
            self.expiry_at(to, e.max(now));
        }
        log::debug!("destination {from} was the boxId of {to}: its messages follow");
    }

    /// Moves the idle offline records of `dest` (box key `b`) into its queue (stored as native
    /// frames).
    fn take_offline(&mut self, b: BoxId, dest: &SignId) {
        if !self.offline.has_idle(dest) {
            return;
        }
        for (key, frame) in self.offline.take_idle(dest) {
            let p = self.peers.entry(b).or_default();
            p.queued_bytes += frame.len();
            self.queued_total += frame.len();
            let track = Track {
                cb: None,
                offline: Some(key),
            };
            p.queue
                .push_back(Pending::frame(frame, Dialect::Native, None, track));
        }
    }

    /// The storage faults of the offline buffer and the de-duplication memory since the last
    /// call (already logged), for [`crate::Event::StorageFault`].
    pub(crate) fn take_storage_faults(&mut self) -> Vec<crate::storage::StorageFault> {
        let mut faults = self.offline.take_faults();
        faults.append(&mut self.dedup.take_faults());
        faults
    }

    /// Persists what must survive (called when the platform is dropped).
    pub(crate) fn save(&mut self, storage: &mut dyn Storage) {
        if let Err(e) = self.dedup.flush(storage) {
            log::debug!("de-duplication memory could not be stored: {e}");
        }
    }
}

/// The listeners on the requested endpoints (first UDP and first TCP); stored ports that are
/// taken now are replaced by OS-chosen ones on the same addresses.
fn bind_listeners(
    cfg: &NetConfig,
    registry: &Registry,
    base: Token,
    our_box: &BoxKeyPair,
    listen: &[Endpoint],
    accept: Option<ClientPolicy>,
    now: Instant,
) -> io::Result<ServerDriver> {
    let first = |kind| listen.iter().find(|e| e.kind == kind).map(|e| e.addr);
    let (udp, tcp) = (first(TransportKind::Udp), first(TransportKind::Tcp));
    let stream = StreamConfig {
        dead_after: cfg.dead_after,
        ..StreamConfig::server()
    };
    let mut config = ServerConfig::with_stream(our_box.clone(), stream);
    config.accept_client = accept;
    let limits = cfg.listener_limits;
    let bind = |udp, tcp| -> io::Result<ServerDriver> {
        let bind = |udp, tcp| {
            ServerDriver::bind_with_limits(registry, base, config.clone(), udp, tcp, limits, now)
        };
        match bind(udp, tcp) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                // A stored port may be taken now: take any port on the same addresses.
                log::debug!("listen addresses in use ({e}); binding OS-chosen ports");
                let any = |a: Option<SocketAddr>| a.map(|a| SocketAddr::new(a.ip(), 0));
                bind(any(udp), any(tcp))
            }
            r => r,
        }
    };
    // `0.0.0.0` is taken as `::` (both families) unless IPv6 is off.
    let widen = |a: Option<SocketAddr>| {
        a.map(|a| match a.ip() {
            std::net::IpAddr::V4(ip) if cfg.ipv6 && ip.is_unspecified() => {
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, a.port()))
            }
            _ => a,
        })
    };
    let (wide_udp, wide_tcp) = (widen(udp), widen(tcp));
    let mut server = if (wide_udp, wide_tcp) != (udp, tcp) {
        match bind(wide_udp, wide_tcp) {
            Ok(s) => s,
            Err(e) => {
                log::info!("no IPv6 listener ({e}): listening on IPv4 only");
                bind(udp, tcp)?
            }
        }
    } else {
        bind(udp, tcp)?
    };
    reach::serve_relay(cfg, &mut server);
    Ok(server)
}

/// The endpoints the listeners are bound to (the UDP one offering relaying when we relay).
fn bound_endpoints(cfg: &NetConfig, server: &ServerDriver) -> Vec<Endpoint> {
    let mut endpoints = Vec::new();
    if let Some(a) = server.udp_addr() {
        let mut e = Endpoint::native(TransportKind::Udp, a);
        e.offers_relay = reach::offers_relay(cfg);
        endpoints.push(e);
    }
    if let Some(a) = server.tcp_addr() {
        endpoints.push(Endpoint::native(TransportKind::Tcp, a));
    }
    endpoints
}

/// Stores the bound addresses (when they changed), so that a restarted node keeps its ports.
fn store_listen_addresses(storage: &mut dyn Storage, endpoints: &[Endpoint]) {
    let stored = serde_json::to_vec(&connection_info::to_json(endpoints)).unwrap_or_default();
    if storage.get(CONNECTION_INFO_KEY).ok().flatten().as_deref() != Some(&stored[..]) {
        if let Err(e) = storage.put(CONNECTION_INFO_KEY, &stored) {
            log::debug!("could not store the listen addresses: {e}");
        }
    }
}
