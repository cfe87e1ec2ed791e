//! The platform: one reactor owning a `mio::Poll`, the bus and its subscribers, the local send
//! queue, timers, circles, events and the [`Handle`] other threads use.
//!
//! # A turn
//!
//! [`Platform::poll`] does one turn:
//!
//! 1. waits for readiness, a [`Handle`] wake-up or the next timer, never longer than the
//!    timeout (and not at all when work is already pending, or when the timeout is zero);
//! 2. takes the commands queued by handles (only as many as the local queue has room for: the
//!    rest wait in the handle channel, whose senders see `BufferFull` when it fills up);
//! 3. fires due timers (a timer scheduled while timers fire waits for the next turn), runs the
//!    services' socket events and timers, and runs the connection manager's receiving pass:
//!    the listeners' events, and the frames that arrived from other nodes read into the
//!    delivery queue (each connection with input read once);
//! 4. delivers the messages that were queued when delivery began, in send order; what the
//!    callbacks send is queued and delivered in a later turn, so a callback never runs inside
//!    `send` and two callbacks that answer each other cannot starve the loop; then the ids of
//!    delivered messages that wait for a delivery acknowledgement are stored and their
//!    acknowledgements queued;
//! 5. runs the connection manager's pump: its due timers, connection set-up, writes what was
//!    sent to other nodes into their CurveCP streams (each dirty connection visited once),
//!    settles acknowledged messages, sends packets; then publishes our nodeInfo if our
//!    endpoints changed and runs the delivery callbacks whose outcome is known (see
//!    [`connections`]);
//! 6. hands the turn's events to event callbacks, event channels and the event batch.
//!
//! The platform calls the connection manager only when it has transports, each time with a
//! narrow context (the turn's time, storage, key cache, circles, counters, room in the
//! delivery queue), and applies what it hands back (messages to deliver, built-in messages
//! to publish, events) in order once the call returns.
//!
//! Each turn is counted in [`Stats::turns`] and, under what woke it, in [`Stats::woken`] (see
//! [`turns`]); in debug builds a run of turns woken by a deadline already past that did nothing
//! logs a warning naming the deadline's owner.
//!
//! # Polling from an application's loop
//!
//! A program with a loop of its own (a game at 60 Hz, a GUI's idle handler) calls
//! `poll(Some(Duration::ZERO))` once a frame; a program with nothing else to do calls
//! [`Platform::run`], or `poll` with the time until its next own deadline. Either way a turn
//! does all the work that is ready: it reads everything that arrived since the last turn,
//! applies the acknowledgements and sends what each stream's congestion window allows, so bulk
//! transfers are not held to one burst a call. A stream that waited on its pacing since the
//! last turn catches up with its schedule (up to its window), and the time acknowledgements
//! spent waiting for the next poll is not taken for congestion. What limits a frame-polled
//! transfer is then the round trip, one frame when both nodes are polled by the same loop:
//! at most 128 KiB in flight a connection (the reference CurveCP receive buffer), so about
//! 7.5 MiB/s at 60 Hz; 1 MiB over `bt` between two nodes polled at 60 Hz takes 10 frames
//! (`cargo bench --bench figures -- nodes_bt_ticks` measures it at 60 Hz, 250 Hz and free
//! running). Polling again within a frame while [`Platform::next_deadline`] has passed gains
//! nothing for bulk work (the acknowledgements come with the peer's next poll), but does no
//! harm. Poll more often, or run the platform on a thread of its own (below), for more.
//!
//! # Threads
//!
//! A [`Platform`] and its [`PlatformBuilder`] are `Send`: build it on one thread, move it to
//! another and poll it there (a network thread beside a render loop). So everything it owns
//! is `Send` too: subscription, event, timer and delivery callbacks, [`crate::storage::Storage`],
//! [`Directory`], services and codecs. A callback that updates state the program reads uses a
//! [`crate::Shared`] value (or an atomic, or a channel) where a single-threaded program would
//! use `Rc<RefCell<_>>`. A platform is not `Sync`: one thread polls it; other threads send
//! through a [`Handle`] (cheap to clone, never blocks) or read its channel subscriptions.
//!
//! # Callbacks and their context
//!
//! Callbacks run on the reactor's thread and receive a [`Context`], through which they can do
//! what the platform itself can: send, subscribe, unsubscribe, set timers, stop the loop. A
//! subscription made during a delivery does not receive the message being delivered; an `off`
//! takes effect as soon as the callback returns (an unsubscribed callback is never called
//! again, not even for the rest of the current message's subscribers). A `once` subscription is
//! removed before its callback runs. Subscribers of one message are called in the order they
//! subscribed.
//!
//! # Channel subscribers
//!
//! [`Platform::on_channel`] returns a bounded `crossbeam_channel::Receiver`. The reactor never
//! blocks on it: a message for a full channel is dropped for that subscriber and counted in
//! [`Stats::channel_drops`]; a subscription whose receiver was dropped is removed.
//!
//! # Built-in local messages
//!
//! The platform's own local messages wait in a queue of their own, delivered before the
//! application's in each turn, and never take room of [`Limits::local_queue`]: an application
//! can queue that many messages before the first turn. At start the platform queues `friends.updateRequest` and `devices.updateRequest` (payload
//! `{}`), `transports.myNodeInfo` (our nodeInfo) and `transports.requestBootstrapNodeInfo`
//! (payload `{}`: discovery services answer it with `transports.nodeInfoBootstrap`), all
//! protocol `ms`, sender `local`, scope `self`; it republishes myNodeInfo every 5 minutes and on
//! `self.transports.requestMyNodeInfo`, asks for bootstrap nodes again every
//! [`BOOTSTRAP_INTERVAL`] while it has no connection, and replaces its circles on
//! `self.friends.update` / `self.devices.update` (see [`Circles`]). (The original platform
//! never asked for bootstrap nodes itself: its Kademlia service did, once at start. Asking from
//! the platform lets any discovery service, mDNS alone included, find peers.)
//!
//! # Services
//!
//! [`PlatformBuilder::service`] and [`Platform::add_service`] host a
//! [`crate::services::Service`]: a bus client whose sockets and timer are this reactor's (see
//! [`crate::services`]). Their socket events and timers run after the platform's own timers,
//! before the turn's deliveries.
//!
//! # Tokens
//!
//! The `mio::Poll` uses `WAKER_TOKEN` (0) for handle wake-ups; tokens
//! `LISTENER_TOKEN_BASE..SERVICE_TOKEN_BASE` are the listeners' (UDP, TCP listener, accepted
//! TCP streams, at most [`crate::transport::driver::ServerDriverLimits::max_tcp_streams`]), tokens
//! `SERVICE_TOKEN_BASE..CONNECTION_TOKEN_BASE` the services' (a block of
//! [`SERVICE_TOKEN_BLOCK`] per service, in the order they were added) and tokens from
//! `CONNECTION_TOKEN_BASE` up outgoing connections (slab key + base). Incoming messages from authenticated peers enter the bus with their scope from the
//! circles (see [`connections`]; an application with its own transport uses
//! [`Platform::receive_from_peer`]).
//!
//! # Remote messages
//!
//! Sends to another node go through the connection manager ([`connections`]): per-destination
//! queues, directory lookups ([`directory`]), CurveCP connections over UDP and TCP, and the
//! persistent offline buffer ([`crate::offline`]) for messages sent with `realtime: false`.
//! [`Platform::send_with_callback`] reports delivery (every byte acknowledged; for messages
//! sent with `realtime: false`, delivered to the peer's subscribers) or failure once.
//!
//! # Closing
//!
//! [`Platform::close`] runs turns until everything sent is acknowledged (or a deadline) and
//! reports what was delivered, what stays in the offline buffer and what real-time traffic is
//! lost ([`CloseReport`]); [`Platform::is_idle`] says whether dropping now loses anything.
//! Dropping the platform stops its services and stores the de-duplication memory; it deletes
//! nothing: non-real-time messages were written to storage before their send returned and are
//! sent by the next run on the same storage.
//!
//! ```
//! use mm_platform::{Event, Platform, Shared};
//! use serde_json::json;
//! use std::time::Duration;
//!
//! let mut platform = Platform::builder().build().unwrap();
//! let seen = Shared::new(Vec::new());
//! let s = seen.clone();
//! platform
//!     .messaging()
//!     .on("self.test.*", move |_ctx, msg, value: serde_json::Value| {
//!         s.borrow_mut().push((msg.scoped_topic(), value));
//!     });
//! let status = platform
//!     .messaging()
//!     .send("test.testMessage", "local", &json!({"test": "Test String"}));
//! assert!(status.is_ok());
//! assert!(seen.borrow().is_empty()); // never delivered inside send
//! platform.poll(Some(Duration::ZERO)).unwrap();
//! assert_eq!(seen.borrow()[0].0, "self.test.testMessage");
//! assert_eq!(seen.borrow()[0].1["test"], "Test String");
//! assert!(platform.drain_events().any(|e| e == Event::Ready));
//! ```

pub(crate) mod bytes_form;
mod circles;
mod close;
pub mod connections;
mod crash_points;
pub mod directory;
mod events;
mod handle;
mod host;
mod message;
mod node_info;
mod peer_memory;
mod timers;
pub mod turns;

pub use circles::Circles;
pub use close::CloseReport;
pub use connections::{ConnectionStats, DeliveryCallback, DeliveryError, NetConfig, RelayInUse};
pub use directory::{Directory, NodeInfo};
pub use events::Event;
pub use handle::Handle;
pub use host::{Service, ServiceContext, ServiceId, MAX_SERVICES, SERVICE_TOKEN_BLOCK};
pub use message::{
    Address, Message, MessageId, Scope, SendError, SendOptions, SendResult, ToAddress,
    RESERVED_PROTOCOL,
};
pub use timers::TimerId;
pub use turns::Woken;

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io;
#[cfg(unix)]
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::{Poll, Token, Waker};

use crate::bus::{Bus, Match, SubscriptionId};
use crate::identity::{BoxId, Identity, IdentityError, KeyCache, SignId};
use crate::storage::{MemStore, Storage};
use circles::Circle;
use connections::{Cx, Output};
use handle::{Command, Outgoing, Shared};
use timers::Timers;
use turns::{Cause, Owner, SpinWatch};

/// The token of the handles' `mio::Waker`.
pub(crate) const WAKER_TOKEN: Token = Token(0);
/// First token of the listeners: the UDP socket, then the TCP listener, then one token per
/// accepted TCP stream (see [`crate::transport::ServerDriver`]).
pub(crate) const LISTENER_TOKEN_BASE: usize = 1;
/// First token of outgoing connections: connection `k` uses `Token(k + base)`. High enough
/// that the listener's TCP streams below it never reach it.
pub(crate) const CONNECTION_TOKEN_BASE: usize = 1 << 30;

/// How often our nodeInfo is republished on the local bus.
pub const NODE_INFO_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// How often `transports.requestBootstrapNodeInfo` is published again while the platform has
/// no connection.
pub const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Most built-in local messages waiting for delivery (beyond it one is dropped and logged; the
/// platform queues a handful per turn at most).
const BUILTIN_QUEUE: usize = 1_024;

/// A message callback.
pub(crate) type Callback = Box<dyn FnMut(&mut Context<'_>, &Message) + Send>;
type EventCallback = Box<dyn FnMut(&mut Context<'_>, &Event) + Send>;
type TimerCallback = Box<dyn FnOnce(&mut Context<'_>) + Send>;

/// What a subscription delivers to.
pub(crate) enum Target {
    Callback(Callback),
    Channel(Sender<Message>),
    /// A hosted service (its slot).
    Service(usize),
}

enum TimerAction {
    User(TimerCallback),
    PublishNodeInfo,
    RequestBootstrap,
    /// A hosted service's wake-up (its slot).
    Service(usize),
}

/// Bounds on the platform's memory. Every queue is bounded; sends beyond a bound return a
/// [`SendError::BufferFull`] instead of growing memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (protocol + topic + payload bytes) accepted by a send. Default 16 MiB.
    /// A larger one gets [`SendError::TooLarge`] (as does a message to another node larger
    /// than its queues can ever take, see [`NetConfig::max_frame`]).
    pub max_message_size: usize,
    /// Messages waiting for local delivery. Default 65,536. The platform's own start-up and
    /// built-in messages do not count (see "Built-in local messages" in [`crate::platform`]).
    pub local_queue: usize,
    /// Commands waiting in the handles' channel. Default 65,536.
    pub handle_queue: usize,
    /// Events kept for [`Platform::drain_events`]; 0 disables the batch. Default 1,024.
    pub event_batch: usize,
    /// Cached signId-to-boxId conversions. Default 4,096.
    pub key_cache: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: 16 << 20,
            local_queue: 65_536,
            handle_queue: 65_536,
            event_batch: 1_024,
            key_cache: 4_096,
        }
    }
}

/// Counters of what the platform did and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Turns of the reactor.
    pub turns: u64,
    /// What woke those turns (one count per turn).
    pub woken: Woken,
    /// Messages dispatched on the bus.
    pub messages: u64,
    /// Deliveries to subscribers (callbacks run and channel sends that succeeded).
    pub deliveries: u64,
    /// Deliveries dropped because a subscriber's channel was full.
    pub channel_drops: u64,
    /// Events dropped because an event channel or the event batch was full.
    pub events_dropped: u64,
    /// Payloads a protocol API could not decode, and refused built-in messages.
    pub malformed: u64,
    /// Messages from peers dropped (queue full or invalid sender key).
    pub peer_drops: u64,
    /// Messages from peers dropped as duplicates (same message id, a retry of the offline
    /// buffer after a lost acknowledgement).
    pub duplicates: u64,
    /// Connection visits of the connection manager (one per connection a turn handled:
    /// socket event, queued frames or due timer; idle connections cost none).
    pub conn_visits: u64,
    /// Peers the connection manager looked at (wanted ones: something to send, a retry due,
    /// offline records; peers with nothing to do cost none).
    pub peer_visits: u64,
    /// The most bytes of partly received frames reserved at once from
    /// [`NetConfig::frame_budget`] (beyond each connection's 64 KiB floor).
    pub frame_bytes_peak: u64,
}

/// Why a platform could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// The identity could not be loaded or stored.
    Identity(IdentityError),
    /// Creating the poll or its waker failed.
    Io(io::Error),
    /// A service added on the builder failed to start.
    Service {
        /// Its name.
        name: String,
        /// Why.
        error: io::Error,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Identity(e) => write!(f, "{e}"),
            BuildError::Io(e) => write!(f, "reactor setup: {e}"),
            BuildError::Service { name, error } => write!(f, "service {name}: {error}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Identity(e) => Some(e),
            BuildError::Io(e) => Some(e),
            BuildError::Service { error, .. } => Some(error),
        }
    }
}

/// Builds a [`Platform`]; every option has a default (the original's constructor options).
///
/// ```
/// use mm_platform::{Limits, Platform};
/// use mm_platform::identity::Identity;
/// use mm_platform::storage::MemStore;
///
/// let friend = Identity::generate();
/// let platform = Platform::builder()
///     .storage(MemStore::new())
///     .friends([friend.sign_id()])
///     .limits(Limits { local_queue: 1_000, ..Limits::default() })
///     .build()
///     .unwrap();
/// assert!(platform.circles().is_friend(&friend.box_id()));
/// ```
pub struct PlatformBuilder {
    storage: Option<Box<dyn Storage>>,
    identity: Option<Identity>,
    friends: Vec<SignId>,
    devices: Vec<SignId>,
    connection_info: serde_json::Value,
    limits: Limits,
    net: NetConfig,
    directory: Option<Box<dyn Directory>>,
    accept: Option<Vec<SignId>>,
    services: Vec<Box<dyn Service>>,
    allow_new_identity: bool,
}

impl PlatformBuilder {
    /// Adds a service (see [`crate::services`]), started at build in the order added; it sees
    /// the start-up messages. A service that fails to start fails the build
    /// ([`BuildError::Service`]).
    pub fn service(mut self, service: impl Service + 'static) -> Self {
        self.services.push(Box::new(service));
        self
    }

    /// The store for the identity and (later) the offline buffer. Default: a [`MemStore`].
    pub fn storage(mut self, storage: impl Storage + 'static) -> Self {
        self.storage = Some(Box::new(storage));
        self
    }

    /// Uses this identity instead of the one in storage (it is not written to storage).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Allows a new identity to be created when the storage has none but holds other state
    /// (queued offline messages, de-duplication memory, the listen addresses of an earlier
    /// run). Default `false`: such a build fails with
    /// [`crate::identity::IdentityError::Missing`], because a lost identity replaced in silence
    /// makes the node someone else while it goes on sending the old node's queued messages.
    /// With `true`, the new identity is created and stored, and the state is kept as the new
    /// node's (its queued offline messages are sent from the new identity).
    pub fn allow_new_identity(mut self, allow: bool) -> Self {
        self.allow_new_identity = allow;
        self
    }

    /// The initial friends circle (default empty; replaced by `self.friends.update`).
    pub fn friends(mut self, ids: impl IntoIterator<Item = SignId>) -> Self {
        self.friends = ids.into_iter().collect();
        self
    }

    /// The initial devices circle (default empty; replaced by `self.devices.update`).
    pub fn devices(mut self, ids: impl IntoIterator<Item = SignId>) -> Self {
        self.devices = ids.into_iter().collect();
        self
    }

    /// Where to listen, in the original's connectionInfo JSON form (an array; the first UDP
    /// and the first TCP entry are used; port 0 lets the OS choose; `0.0.0.0` listens on IPv6
    /// too, see [`NetConfig::ipv6`]). Default: the addresses of
    /// the last run (storage key `connectionInfo`), else UDP and TCP on `127.0.0.1` with
    /// OS-chosen ports. The nodeInfo we publish lists the addresses actually bound. Without
    /// transports ([`NetConfig::enabled`] false) this is published as given.
    pub fn connection_info(mut self, info: serde_json::Value) -> Self {
        self.connection_info = info;
        self
    }

    /// Timeouts and bounds of the connection manager (see [`NetConfig`]).
    pub fn net(mut self, config: NetConfig) -> Self {
        self.net = config;
        self
    }

    /// Enables or disables the transports (default enabled): without them nothing listens
    /// and remote sends return [`SendError::NoTransport`].
    pub fn transports(mut self, enabled: bool) -> Self {
        self.net.enabled = enabled;
        self
    }

    /// A directory the platform asks before looking a destination up on the bus.
    pub fn directory(mut self, directory: impl Directory + 'static) -> Self {
        self.directory = Some(Box::new(directory));
        self
    }

    /// Accepts incoming connections only from these nodes (default: from anyone). The
    /// signIds are converted to box keys once, at build; the listeners' CurveCP server then
    /// refuses any other client's Initiate (no connection is created, nothing is delivered).
    /// Outgoing connections are not restricted.
    pub fn accept_peers(mut self, ids: impl IntoIterator<Item = SignId>) -> Self {
        self.accept = Some(ids.into_iter().collect());
        self
    }

    /// Memory bounds.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Loads or creates the identity, creates the poll and queues the start-up messages.
    pub fn build(self) -> Result<Platform, BuildError> {
        let mut limits = self.limits;
        limits.local_queue = limits.local_queue.max(1);
        let mut storage = self.storage.unwrap_or_else(|| Box::new(MemStore::new()));
        let identity = match self.identity {
            Some(id) => id,
            None => Identity::load_or_create_with(&mut *storage, self.allow_new_identity)
                .map_err(BuildError::Identity)?,
        };
        let poll = Poll::new().map_err(BuildError::Io)?;
        let waker = Waker::new(poll.registry(), WAKER_TOKEN).map_err(BuildError::Io)?;
        let service_registry = poll.registry().try_clone().map_err(BuildError::Io)?;
        let shared = Arc::new(Shared {
            waker,
            wake_pending: AtomicBool::new(false),
            stop_requested: AtomicBool::new(false),
        });
        let (handle_tx, handle_rx) = crossbeam_channel::bounded(self.limits.handle_queue.max(1));
        let mut keys = KeyCache::new(self.limits.key_cache);
        let mut circles = Circles::default();
        if !circles.replace(Circle::Friends, &self.friends, &mut keys)
            || !circles.replace(Circle::Devices, &self.devices, &mut keys)
        {
            log::debug!("an initial circle member is not a valid key; circle left empty");
        }
        let now = Instant::now();
        let mut connection_info = self.connection_info;
        let net = if self.net.enabled {
            let mut listen = crate::transport::connection_info::parse(&connection_info);
            if listen.is_empty() {
                if let Ok(Some(v)) = storage.get(connections::CONNECTION_INFO_KEY) {
                    let stored = serde_json::from_slice(&v).unwrap_or_default();
                    // A stored address this machine no longer has (or a corrupted record) must
                    // not keep the node from starting: only addresses that can be bound count.
                    listen = crate::transport::connection_info::parse(&stored);
                    listen.retain(|e| {
                        let any_port = std::net::SocketAddr::new(e.addr.ip(), 0);
                        std::net::UdpSocket::bind(any_port).is_ok()
                    });
                }
            }
            if listen.is_empty() {
                let lo: std::net::SocketAddr = "127.0.0.1:0".parse().expect("literal");
                listen = vec![
                    crate::transport::connection_info::Endpoint::native(
                        crate::transport::TransportKind::Udp,
                        lo,
                    ),
                    crate::transport::connection_info::Endpoint::native(
                        crate::transport::TransportKind::Tcp,
                        lo,
                    ),
                ];
            }
            let registry = poll.registry().try_clone().map_err(BuildError::Io)?;
            let accept = self.accept.map(|ids| {
                let allowed: HashSet<BoxId> = ids.iter().filter_map(|s| keys.box_id(s)).collect();
                let policy: crate::curvecp::server::ClientPolicy =
                    Arc::new(move |k| allowed.contains(&BoxId(*k)));
                policy
            });
            let args = connections::BindArgs {
                registry,
                base: Token(LISTENER_TOKEN_BASE),
                our_box: identity.box_keypair().clone(),
                our_sign: identity.sign_id(),
                listen: &listen,
                storage: &mut *storage,
                custom_dir: self.directory,
                accept,
                now,
            };
            let net = connections::Net::bind(self.net, args).map_err(BuildError::Io)?;
            connection_info = crate::transport::connection_info::to_json(net.published_endpoints());
            Some(net)
        } else {
            None
        };
        let mut core = Core {
            identity,
            storage,
            bus: Bus::default(),
            queue: VecDeque::new(),
            builtin: VecDeque::new(),
            limits,
            timers: Timers::default(),
            circles,
            keys,
            pending_events: VecDeque::new(),
            event_batch: Vec::new(),
            event_callbacks: Vec::new(),
            event_channels: Vec::new(),
            stats: Stats::default(),
            shutdown: false,
            now,
            connection_info,
            match_buf: Vec::new(),
            net,
            net_out: Vec::new(),
            registry: service_registry,
            services: host::Services::default(),
        };
        core.pending_events.push_back(Event::Ready);
        core.publish_local("friends.updateRequest", &serde_json::json!({}));
        core.publish_local("devices.updateRequest", &serde_json::json!({}));
        core.publish_local("transports.myNodeInfo", &core.node_info().to_json());
        core.publish_local(
            "transports.requestBootstrapNodeInfo",
            &serde_json::json!({}),
        );
        core.timers
            .schedule(now + NODE_INFO_INTERVAL, TimerAction::PublishNodeInfo);
        core.timers
            .schedule(now + BOOTSTRAP_INTERVAL, TimerAction::RequestBootstrap);
        for service in self.services {
            let name = service.name().to_owned();
            host::add(&mut core, service).map_err(|error| BuildError::Service { name, error })?;
        }
        Ok(Platform {
            poll,
            events: mio::Events::with_capacity(256),
            shared,
            handle_tx,
            handle_rx,
            core,
            spin: SpinWatch::default(),
        })
    }
}

/// Everything callbacks may touch through a [`Context`].
pub(crate) struct Core {
    identity: Identity,
    storage: Box<dyn Storage>,
    bus: Bus<Target>,
    /// Local messages waiting for delivery (bounded by [`Limits::local_queue`]).
    queue: VecDeque<Message>,
    /// The platform's built-in local messages, delivered before `queue` (bounded by
    /// [`BUILTIN_QUEUE`]).
    builtin: VecDeque<Message>,
    limits: Limits,
    timers: Timers<TimerAction>,
    circles: Circles,
    keys: KeyCache,
    pending_events: VecDeque<Event>,
    event_batch: Vec<Event>,
    event_callbacks: Vec<EventCallback>,
    event_channels: Vec<Sender<Event>>,
    pub(crate) stats: Stats,
    shutdown: bool,
    now: Instant,
    connection_info: serde_json::Value,
    match_buf: Vec<Match>,
    /// The connection manager (`None` without transports).
    net: Option<connections::Net>,
    /// The connection manager's outputs of the current call (kept for its capacity).
    net_out: Vec<Output>,
    /// Where services register their sockets (a clone of the poll's registry).
    registry: mio::Registry,
    services: host::Services,
}

impl Core {
    /// The low-level send every API ends in.
    pub(crate) fn send(
        &mut self,
        dest: Option<Address>,
        protocol: Cow<'static, str>,
        topic: String,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> SendResult {
        self.send_tracked(dest, protocol, topic, payload, options, None)
    }

    /// [`Core::send`] of a payload of `len` bytes that `write` appends to a buffer (returning
    /// `false` if it cannot): a real-time send to another node writes it straight into the
    /// message's frame, one copy; any other send into the message's own payload.
    pub(crate) fn send_encoded(
        &mut self,
        dest: Option<Address>,
        protocol: Cow<'static, str>,
        topic: &str,
        len: usize,
        options: SendOptions,
        write: &mut dyn FnMut(&mut Vec<u8>) -> bool,
    ) -> SendResult {
        if let Some(d) = dest.filter(|d| options.realtime && !self.is_own_address(d)) {
            if let Some(refused) = self.refuse_invalid(&d, &protocol, topic, len, options) {
                return Err(refused);
            }
            let now = Instant::now();
            return self
                .with_net(|n, cx| {
                    n.send_remote_written(cx, d, &protocol, topic, len, options, write, now)
                })
                .unwrap_or(Err(SendError::NoTransport));
        }
        let mut payload = Vec::with_capacity(len);
        if !write(&mut payload) {
            return Err(SendError::EncodeFailed);
        }
        self.send(dest, protocol, topic.to_owned(), payload, options)
    }

    /// Whether `a` names this node (or the local bus).
    fn is_own_address(&self, a: &Address) -> bool {
        match *a {
            Address::Local => true,
            Address::Node(id) => {
                id == self.identity.sign_id() || id.0 .0 == self.identity.box_id().0 .0
            }
            Address::Box(id) => id == self.identity.box_id(),
        }
    }

    /// The status a send of a `payload_len`-byte payload would get now if it is certain to be
    /// refused: an invalid one ([`Core::refuse_invalid`]), or a real-time message to a remote
    /// destination whose queue is full. `None`: go ahead (the send itself decides). Lets a
    /// codec skip encoding a value that would be dropped.
    pub(crate) fn refuses(
        &mut self,
        dest: Option<Address>,
        protocol: &str,
        topic: &str,
        payload_len: usize,
        options: SendOptions,
    ) -> Option<SendError> {
        let dest = dest?;
        if let Some(refused) = self.refuse_invalid(&dest, protocol, topic, payload_len, options) {
            return Some(refused);
        }
        if !options.realtime {
            return None;
        }
        match dest {
            Address::Local => None,
            Address::Node(id) if id == self.identity.sign_id() => None,
            Address::Node(id) if id.0 .0 == self.identity.box_id().0 .0 => None,
            Address::Box(id) if id == self.identity.box_id() => None,
            remote => {
                let frame_len =
                    crate::envelope::Envelope::frame_len(topic.len(), protocol.len(), payload_len);
                self.with_net(|n, cx| n.remote_queue_full(cx, remote, frame_len))
                    .unwrap_or(false)
                    .then_some(SendError::BufferFull)
            }
        }
    }

    /// [`Core::send`] with an optional delivery callback (called once, in a later turn, unless
    /// the send returns an error).
    pub(crate) fn send_tracked(
        &mut self,
        dest: Option<Address>,
        protocol: Cow<'static, str>,
        topic: String,
        payload: Vec<u8>,
        options: SendOptions,
        callback: Option<DeliveryCallback>,
    ) -> SendResult {
        let Some(dest) = dest else {
            return Err(SendError::InvalidDestination);
        };
        if let Some(refused) = self.refuse_invalid(&dest, &protocol, &topic, payload.len(), options)
        {
            return Err(refused);
        }
        if !self.is_own_address(&dest) {
            let now = Instant::now();
            return self
                .with_net(|n, cx| {
                    n.send_remote(cx, dest, protocol, topic, payload, options, callback, now)
                })
                .unwrap_or(Err(SendError::NoTransport));
        }
        if self.queue.len() >= self.limits.local_queue {
            return Err(SendError::BufferFull);
        }
        if let Some(cb) = callback {
            self.fire_local(cb);
        }
        self.queue.push_back(Message {
            sender: Address::Local,
            protocol,
            topic,
            scope: Scope::Own,
            payload,
            id: None,
        });
        Ok(())
    }

    /// The status of a send that no retry can make succeed, checked before anything is
    /// queued: a topic that breaks the rule, the reserved protocol, or a message larger than
    /// its path to `dest` ever takes (see [`message::refuse_invalid`]). `None`: go on.
    fn refuse_invalid(
        &self,
        dest: &Address,
        protocol: &str,
        topic: &str,
        payload_len: usize,
        options: SendOptions,
    ) -> Option<SendError> {
        let frame_cap = match self.net.as_ref() {
            Some(net) if !self.is_own_address(dest) => Some(net.largest_frame(options.realtime)),
            _ => None,
        };
        message::refuse_invalid(
            protocol,
            topic,
            payload_len,
            self.limits.max_message_size,
            frame_cap,
        )
    }

    /// Counts a turn under its cause (and under its service when a service's wake-up).
    fn count_turn(&mut self, cause: Cause) {
        self.stats.woken.count(cause);
        if let Cause::Deadline(Owner::Service(slot)) = cause {
            self.services.count_wake(slot);
        }
    }

    /// Calls the connection manager (when the platform has one) with its context
    /// ([`connections::Cx`]), then applies, in order, what it handed back.
    fn with_net<R>(
        &mut self,
        f: impl FnOnce(&mut connections::Net, &mut Cx<'_>) -> R,
    ) -> Option<R> {
        let net = self.net.as_mut()?;
        let mut out = std::mem::take(&mut self.net_out);
        let room = self.limits.local_queue.saturating_sub(self.queue.len());
        let mut cx = Cx::new(
            self.now,
            &mut *self.storage,
            &mut self.keys,
            &self.circles,
            &mut self.stats,
            room,
            &mut out,
        );
        let r = f(net, &mut cx);
        for o in out.drain(..) {
            match o {
                Output::Deliver(msg) => self.queue.push_back(msg),
                Output::Publish(topic, key) => {
                    self.publish_local(topic, &serde_json::Value::String(key))
                }
                Output::Emit(event) => self.emit(event),
            }
        }
        self.net_out = out;
        Some(r)
    }

    /// The connection manager's receiving pass, before the turn's deliveries.
    fn net_receive(&mut self) {
        self.with_net(|n, cx| n.receive(cx));
    }

    /// The delivery acknowledgements due after the turn's deliveries.
    fn settle_acks(&mut self) {
        let clock = Instant::now();
        self.with_net(|n, cx| n.settle_acks(cx, clock));
    }

    /// The connection manager's pump, after the turn's deliveries; then our nodeInfo if our
    /// endpoints changed, and the delivery callbacks whose outcome is known.
    fn net_pump(&mut self) {
        self.with_net(|n, cx| n.pump(cx));
        self.sync_node_info();
        self.run_fired();
    }

    /// Publishes our nodeInfo if the connection manager's endpoints changed.
    fn sync_node_info(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        if !net.take_endpoints_changed() {
            return;
        }
        self.connection_info =
            crate::transport::connection_info::to_json(net.published_endpoints());
        let info = self.node_info();
        self.publish_local("transports.myNodeInfo", &info.to_json());
        self.emit(Event::MyNodeInfo(info));
    }

    /// Runs the delivery callbacks whose outcome the connection manager knows.
    fn run_fired(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        let now = self.now;
        for (cb, r) in net.take_fired() {
            cb(&mut Context { core: self, now }, r);
        }
    }

    /// Registers a callback to run (with `Ok`) after the current turn's deliveries (at once
    /// without a connection manager).
    fn fire_local(&mut self, callback: DeliveryCallback) {
        match self.net.as_mut() {
            Some(net) => net.fire_local(callback),
            None => {
                let now = self.now;
                callback(&mut Context { core: self, now }, Ok(()));
            }
        }
    }

    /// A `self.transports.nodeInfo` message; `false` if it is refused.
    fn on_node_info(&mut self, payload: &[u8]) -> bool {
        let Some(info) = connections::parse_node_info(payload, &mut self.keys) else {
            return false;
        };
        self.add_peer(&info);
        true
    }

    /// A `self.directory.getReply` message; `false` if it is refused.
    fn on_directory_reply(&mut self, payload: &[u8]) -> bool {
        let Some((b, s)) = connections::parse_directory_reply(payload, &mut self.keys) else {
            return false;
        };
        self.with_net(|n, cx| n.learn_reverse(cx, b, s));
        true
    }

    /// The signId of a box key if known; otherwise `self.directory.get` is published.
    fn resolve_box_id(&mut self, b: &BoxId) -> Option<SignId> {
        self.with_net(|n, cx| n.resolve_box_id(cx, b)).flatten()
    }

    /// A message from another node was handed to its subscribers (its delivery may be
    /// acknowledged).
    fn message_dispatched(&mut self, sender: &Address, id: MessageId) {
        let b = match sender {
            Address::Node(s) => self.keys.box_id(s),
            Address::Box(b) => Some(*b),
            Address::Local => None,
        };
        if let Some(b) = b {
            let clock = Instant::now();
            self.with_net(|n, cx| n.message_dispatched(cx, b, id, clock));
        }
    }

    /// Queues a built-in local message (protocol `ms`, sender `local`) in the built-ins' own
    /// queue.
    fn publish_local(&mut self, topic: &str, value: &serde_json::Value) {
        if self.builtin.len() >= BUILTIN_QUEUE {
            log::debug!("built-in message {topic} dropped: {BUILTIN_QUEUE} already wait");
            return;
        }
        self.builtin.push_back(Message {
            sender: Address::Local,
            protocol: Cow::Borrowed("ms"),
            topic: topic.to_owned(),
            scope: Scope::Own,
            payload: serde_json::to_vec(value).unwrap_or_default(),
            id: None,
        });
    }

    /// Our nodeInfo: our ids and the endpoints of [`Core::connection_info`].
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            sign_id: self.identity.sign_id(),
            box_id: self.identity.box_id(),
            endpoints: crate::transport::connection_info::parse(&self.connection_info),
        }
    }

    /// Learns another node's nodeInfo, as a `self.transports.nodeInfo` message does (our own
    /// is ignored).
    fn add_peer(&mut self, info: &NodeInfo) {
        if info.sign_id != self.identity.sign_id() {
            self.with_net(|n, cx| n.learn_node_info(cx, info.clone()));
        }
    }

    /// Subscribes `target` to `pattern`.
    ///
    /// # Panics
    ///
    /// If `pattern` breaks the pattern rule ([`crate::TopicError`]): patterns are written by
    /// the programmer, and a bad one is a bug like an index out of bounds
    /// ([`crate::check_pattern`] checks one built at run time first).
    #[track_caller]
    pub(crate) fn subscribe(
        &mut self,
        pattern: &str,
        protocol: Option<Cow<'static, str>>,
        once: bool,
        target: Target,
    ) -> SubscriptionId {
        if let Err(e) = crate::bus::check_pattern(pattern) {
            panic!("invalid subscription pattern {pattern:?}: {e}");
        }
        self.bus.insert(pattern, protocol, once, target)
    }

    #[track_caller]
    pub(crate) fn subscribe_channel(
        &mut self,
        pattern: &str,
        protocol: Option<Cow<'static, str>>,
        capacity: usize,
    ) -> (SubscriptionId, Receiver<Message>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        let id = self.subscribe(pattern, protocol, false, Target::Channel(tx));
        (id, rx)
    }

    fn emit(&mut self, event: Event) {
        self.pending_events.push_back(event);
    }

    /// Raises the storage faults the connection manager met (already logged) as events.
    fn raise_storage_faults(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        for fault in net.take_storage_faults() {
            self.emit(Event::StorageFault(fault));
        }
    }

    fn wants_message_events(&self) -> bool {
        self.limits.event_batch > 0
            || !self.event_callbacks.is_empty()
            || !self.event_channels.is_empty()
    }

    /// The platform's own handling of `self` messages of protocol `ms`.
    fn builtin(&mut self, msg: &Message) {
        match msg.topic.as_str() {
            "friends.update" | "devices.update" => {
                let which = if msg.topic.starts_with('f') {
                    Circle::Friends
                } else {
                    Circle::Devices
                };
                if !self
                    .circles
                    .apply_update(which, &msg.payload, &mut self.keys)
                {
                    self.stats.malformed += 1;
                }
            }
            "transports.requestMyNodeInfo" => {
                let info = self.node_info().to_json();
                self.publish_local("transports.myNodeInfo", &info);
            }
            "transports.relayAddresses" => {
                // A relay search's bare addresses (the Mainline service): asked who they are.
                let addrs: Option<Vec<std::net::SocketAddr>> =
                    serde_json::from_slice::<Vec<String>>(&msg.payload)
                        .ok()
                        .and_then(|l| l.iter().take(64).map(|a| a.parse().ok()).collect());
                match addrs {
                    Some(addrs) => {
                        self.with_net(|n, _| n.relay_addresses(&addrs));
                    }
                    None => self.stats.malformed += 1,
                }
            }
            "transports.nodeInfo" | "directory.getReply" => {
                let ok = if msg.topic.starts_with('t') {
                    self.on_node_info(&msg.payload)
                } else {
                    self.on_directory_reply(&msg.payload)
                };
                if !ok {
                    self.stats.malformed += 1;
                }
            }
            _ => {}
        }
    }

    /// Delivers one message to the built-ins and every matching subscriber.
    fn dispatch(&mut self, msg: Message) {
        self.stats.messages += 1;
        if msg.scope == Scope::Own && msg.protocol == "ms" {
            self.builtin(&msg);
        }
        let mut matches = std::mem::take(&mut self.match_buf);
        matches.clear();
        let segments = std::iter::once(msg.scope.as_str()).chain(msg.topic.split('.'));
        self.bus.collect(segments, &msg.protocol, &mut matches);
        if matches.len() > 1 {
            matches.sort_unstable();
        }
        for &(_, id) in &matches {
            let Some((target, once)) = self.bus.take(id) else {
                continue;
            };
            match target {
                Target::Callback(mut cb) => {
                    self.stats.deliveries += 1;
                    let now = self.now;
                    cb(&mut Context { core: self, now }, &msg);
                    if !once {
                        self.bus.restore(id, Target::Callback(cb));
                    }
                }
                Target::Service(slot) => {
                    self.stats.deliveries += 1;
                    host::with_service(self, slot, |s, ctx| s.on_message(ctx, &msg));
                    if !once {
                        self.bus.restore(id, Target::Service(slot));
                    }
                }
                Target::Channel(tx) => {
                    match tx.try_send(msg.clone()) {
                        Ok(()) => self.stats.deliveries += 1,
                        Err(TrySendError::Full(_)) => {
                            self.stats.channel_drops += 1;
                            log::debug!("subscriber channel full: message dropped for it");
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            self.bus.remove(id);
                            continue;
                        }
                    }
                    if !once {
                        self.bus.restore(id, Target::Channel(tx));
                    }
                }
            }
        }
        self.match_buf = matches;
        if let Some(id) = msg.id {
            self.message_dispatched(&msg.sender, id);
        }
        if self.wants_message_events() {
            self.emit(Event::Message(msg));
        } else {
            if let Some(net) = self.net.as_mut() {
                net.recycle_payload(msg.payload, self.now);
            }
        }
    }

    /// Hands pending events to callbacks, channels and the batch.
    fn flush_events(&mut self) {
        let n = self.pending_events.len();
        for _ in 0..n {
            let Some(event) = self.pending_events.pop_front() else {
                break;
            };
            if !self.event_callbacks.is_empty() {
                let mut callbacks = std::mem::take(&mut self.event_callbacks);
                let now = self.now;
                for cb in callbacks.iter_mut() {
                    cb(&mut Context { core: self, now }, &event);
                }
                // Callbacks registered meanwhile go after the existing ones.
                let added = std::mem::replace(&mut self.event_callbacks, callbacks);
                self.event_callbacks.extend(added);
            }
            let mut dropped = 0;
            self.event_channels
                .retain(|tx| match tx.try_send(event.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        dropped += 1;
                        true
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                });
            if self.limits.event_batch > 0 {
                if self.event_batch.len() < self.limits.event_batch {
                    self.event_batch.push(event);
                } else {
                    dropped += 1;
                }
            }
            if dropped > 0 {
                log::debug!("event dropped for {dropped} full consumer(s)");
                self.stats.events_dropped += dropped;
            }
        }
    }

    fn fire_timers(&mut self) {
        let limit = self.timers.next_seq();
        while let Some(action) = self.timers.pop_due(self.now, limit) {
            match action {
                TimerAction::User(cb) => {
                    let now = self.now;
                    cb(&mut Context { core: self, now });
                }
                TimerAction::PublishNodeInfo => {
                    let info = self.node_info().to_json();
                    self.publish_local("transports.myNodeInfo", &info);
                    self.timers
                        .schedule(self.now + NODE_INFO_INTERVAL, TimerAction::PublishNodeInfo);
                }
                TimerAction::RequestBootstrap => {
                    let connected = self.net.as_ref().is_some_and(|n| n.has_connections());
                    if !connected {
                        self.publish_local(
                            "transports.requestBootstrapNodeInfo",
                            &serde_json::json!({}),
                        );
                    }
                    self.timers
                        .schedule(self.now + BOOTSTRAP_INTERVAL, TimerAction::RequestBootstrap);
                }
                TimerAction::Service(slot) => host::on_timer(self, slot),
            }
        }
    }
}

/// Generates the methods [`Platform`] and [`Context`] share.
macro_rules! shared_methods {
    () => {
        /// Our node id (base64 ed25519 public key).
        pub fn sign_id(&self) -> SignId {
            self.core_ref().identity.sign_id()
        }

        /// Our box key (base64 curve25519 public key derived from the signing key).
        pub fn box_id(&self) -> BoxId {
            self.core_ref().identity.box_id()
        }

        /// Our identity (both key pairs).
        pub fn identity(&self) -> &Identity {
            &self.core_ref().identity
        }

        /// The trust circles.
        pub fn circles(&self) -> &Circles {
            &self.core_ref().circles
        }

        /// The scope a message from `sender` gets now; `None` if `sender` is not a valid key.
        pub fn scope_of(&mut self, sender: &SignId) -> Option<Scope> {
            let core = self.core_mut();
            let b = core.keys.box_id(sender)?;
            Some(core.circles.scope_of(&b))
        }

        /// Sends a message of any protocol (the original's low-level `send`). Local messages
        /// (`"local"` or our own signId) are delivered in a later turn, never inside this call.
        ///
        /// Every send of the crate takes its arguments in one order: the protocol (here, where
        /// no API implies it), the topic, the destination, the payload, then options and a
        /// delivery callback; `messaging().send(topic, dest, value)` is this with `"ms"`.
        ///
        /// ```
        /// # use mm_platform::Platform;
        /// # fn f(platform: &mut Platform) -> Result<(), mm_platform::SendError> {
        /// platform.send("bt", "files.chunk", "local", &b"bytes"[..])?;
        /// # Ok(()) }
        /// ```
        ///
        /// The topic must follow the topic rule ([`crate::TopicError`]; else
        /// [`SendError::InvalidTopic`]), the protocol must not be the platform's own
        /// ([`RESERVED_PROTOCOL`]; else [`SendError::ReservedProtocol`]), and the message
        /// must fit its path ([`SendError::TooLarge`]). The same holds for every send of the
        /// platform, its contexts, handles and protocol APIs.
        pub fn send(
            &mut self,
            protocol: impl Into<Cow<'static, str>>,
            topic: impl Into<String>,
            dest: impl ToAddress,
            payload: impl Into<Vec<u8>>,
        ) -> SendResult {
            self.send_with(protocol, topic, dest, payload, SendOptions::default())
        }

        /// [`Self::send`] with options.
        pub fn send_with(
            &mut self,
            protocol: impl Into<Cow<'static, str>>,
            topic: impl Into<String>,
            dest: impl ToAddress,
            payload: impl Into<Vec<u8>>,
            options: SendOptions,
        ) -> SendResult {
            self.core_mut().send(
                dest.to_address(),
                protocol.into(),
                topic.into(),
                payload.into(),
                options,
            )
        }

        /// [`Self::send_with`] with a delivery callback, called exactly once in a later turn: `Ok`
        /// once the peer's CurveCP stream acknowledged every byte of the message (real-time),
        /// once the peer acknowledged its delivery to its subscribers with its id stored
        /// (`realtime: false`, see "Delivery guarantee" in [`crate::offline`]), or once it is
        /// queued for delivery (local destination); otherwise the [`DeliveryError`]. When the
        /// send returns an error, the callback is dropped without being called.
        pub fn send_with_callback<F>(
            &mut self,
            protocol: impl Into<Cow<'static, str>>,
            topic: impl Into<String>,
            dest: impl ToAddress,
            payload: impl Into<Vec<u8>>,
            options: SendOptions,
            callback: F,
        ) -> SendResult
        where
            F: FnOnce(&mut Context<'_>, Result<(), DeliveryError>) + Send + 'static,
        {
            self.core_mut().send_tracked(
                dest.to_address(),
                protocol.into(),
                topic.into(),
                payload.into(),
                options,
                Some(Box::new(callback)),
            )
        }

        /// The signId of a box key, if the directory knows it; otherwise `None`, and
        /// `self.directory.get` is published (its answer, `self.directory.getReply`, is
        /// checked and remembered).
        pub fn sign_id_of(&mut self, box_id: &BoxId) -> Option<SignId> {
            self.core_mut().resolve_box_id(box_id)
        }

        /// Statistics of every connection to other nodes (RTT, bytes and messages each way,
        /// retransmissions).
        pub fn connections(&self) -> Vec<ConnectionStats> {
            self.core_ref()
                .net
                .as_ref()
                .map(|n| n.connections())
                .unwrap_or_default()
        }

        /// The public port our gateway forwards to our UDP listener while it does (see
        /// [`NetConfig::port_mapping`]); `None` without a mapping.
        pub fn mapped_port(&self) -> Option<u16> {
            self.port_mapping().map(|m| m.external_port)
        }

        /// The mapping our gateway holds for our UDP listener (its port, lifetime and the
        /// protocol that made it: PCP, NAT-PMP or UPnP IGD); `None` without one.
        pub fn port_mapping(&self) -> Option<crate::PortMapping> {
            self.core_ref().net.as_ref().and_then(|n| n.port_mapping())
        }

        /// The mapping our gateway holds for our TCP listener (asked for beside the UDP one
        /// when the TCP listener is on `0.0.0.0`/`::` or a private address); `None` without one.
        pub fn tcp_port_mapping(&self) -> Option<crate::PortMapping> {
            self.core_ref()
                .net
                .as_ref()
                .and_then(|n| n.tcp_port_mapping())
        }

        /// The relay we use while behind a NAT, once it confirmed our reservation (see
        /// [`NetConfig::use_relays`]); `None` without one (always without the cargo feature
        /// `relay`).
        pub fn relay(&self) -> Option<crate::RelayInUse> {
            self.core_ref().net.as_ref().and_then(|n| n.relay_in_use())
        }

        /// Messages waiting in the offline buffer (persisted, not yet acknowledged).
        pub fn offline_pending(&self) -> usize {
            self.core_ref().net.as_ref().map_or(0, |n| n.offline_len())
        }

        /// Real-time messages waiting in memory for `dest`.
        pub fn queued_for(&mut self, dest: &SignId) -> usize {
            let core = self.core_mut();
            let Some(b) = core.keys.box_id(dest) else {
                return 0;
            };
            core.net.as_ref().map_or(0, |n| n.queued_for(&b))
        }

        /// Bytes of messages waiting in memory for all destinations together (bounded by
        /// [`NetConfig::send_queue_bytes`]; sends beyond return [`SendError::BufferFull`]).
        /// Bytes already written into a stream are not counted, acknowledged or not: zero does
        /// not mean delivered (see [`Platform::is_idle`] and [`Platform::close`]).
        pub fn queued_bytes(&self) -> usize {
            self.core_ref().net.as_ref().map_or(0, |n| n.queued_bytes())
        }

        /// Our endpoints, in connectionInfo JSON form (as bound).
        pub fn connection_info(&self) -> serde_json::Value {
            self.core_ref().connection_info.clone()
        }

        /// Our nodeInfo: ids and endpoints, as published (its JSON form, the payload of
        /// `self.transports.myNodeInfo`, is [`NodeInfo::to_json`]). Another node learns it with
        /// [`Self::add_peer`].
        pub fn node_info(&self) -> NodeInfo {
            self.core_ref().node_info()
        }

        /// Introduces another node: its endpoints are remembered, so that messages to it can
        /// be sent without a lookup. The same as publishing its nodeInfo on
        /// `self.transports.nodeInfo` (what discovery services do), but typed and at once. Our
        /// own nodeInfo, and any nodeInfo without transports, are ignored.
        ///
        /// ```
        /// use mm_platform::Platform;
        ///
        /// let mut a = Platform::builder().build().unwrap();
        /// let b = Platform::builder().build().unwrap();
        /// a.add_peer(&b.node_info());
        /// assert!(a.messaging().send("chat.say", b.sign_id(), &"hi").is_ok());
        /// ```
        pub fn add_peer(&mut self, info: &NodeInfo) {
            self.core_mut().add_peer(info)
        }

        /// Subscribes a callback to every message (any protocol) whose scoped topic matches
        /// `pattern`.
        ///
        /// # Panics
        ///
        /// If `pattern` is not a valid pattern (see [`crate::TopicError`]; the same holds for
        /// every subscription of the platform, its contexts and its protocol APIs). Check a
        /// pattern built at run time with [`crate::check_pattern`].
        #[track_caller]
        pub fn on<F>(&mut self, pattern: &str, callback: F) -> SubscriptionId
        where
            F: FnMut(&mut Context<'_>, &Message) + Send + 'static,
        {
            self.core_mut()
                .subscribe(pattern, None, false, Target::Callback(Box::new(callback)))
        }

        /// Like [`Self::on`], for the first matching message only.
        #[track_caller]
        pub fn once<F>(&mut self, pattern: &str, callback: F) -> SubscriptionId
        where
            F: FnMut(&mut Context<'_>, &Message) + Send + 'static,
        {
            self.core_mut()
                .subscribe(pattern, None, true, Target::Callback(Box::new(callback)))
        }

        /// Subscribes a bounded channel (`capacity` messages, at least 1) to `pattern`. The
        /// reactor never blocks on it: when full, messages are dropped for this subscriber.
        /// Panics for an invalid pattern, as [`Self::on`].
        #[track_caller]
        pub fn on_channel(
            &mut self,
            pattern: &str,
            capacity: usize,
        ) -> (SubscriptionId, Receiver<Message>) {
            self.core_mut().subscribe_channel(pattern, None, capacity)
        }

        /// Every message delivered on the bus, any protocol (the original's
        /// `platform.on('message')`).
        pub fn on_message<F>(&mut self, callback: F) -> SubscriptionId
        where
            F: FnMut(&mut Context<'_>, &Message) + Send + 'static,
        {
            self.on("*", callback)
        }

        /// Removes a subscription; `false` if it was already gone.
        pub fn off(&mut self, id: SubscriptionId) -> bool {
            self.core_mut().bus.remove(id)
        }

        /// Runs `callback` on the reactor's thread once `delay` has passed (in the first turn at
        /// or after that time).
        ///
        /// ```
        /// use std::time::Duration;
        /// use mm_platform::Platform;
        ///
        /// let mut platform = Platform::builder().build().unwrap();
        /// platform.after(Duration::from_millis(1), |ctx| ctx.shutdown());
        /// platform.run().unwrap(); // returns once the timer fired
        /// ```
        pub fn after<F>(&mut self, delay: Duration, callback: F) -> TimerId
        where
            F: FnOnce(&mut Context<'_>) + Send + 'static,
        {
            let at = self.clock() + delay;
            self.core_mut()
                .timers
                .schedule(at, TimerAction::User(Box::new(callback)))
        }

        /// Cancels a timer; `false` if it already fired or was cancelled.
        pub fn cancel_timer(&mut self, id: TimerId) -> bool {
            self.core_mut().timers.cancel(id).is_some()
        }

        /// The store.
        pub fn storage(&mut self) -> &mut dyn Storage {
            &mut *self.core_mut().storage
        }

        /// Counters of what the platform did and dropped.
        pub fn stats(&self) -> Stats {
            self.core_ref().stats
        }
    };
}

/// What a callback gets: the platform's API, usable from inside the reactor. Effects (sends,
/// subscriptions, timers) take effect after the callback returns: sends are delivered in a
/// later turn.
pub struct Context<'a> {
    core: &'a mut Core,
    now: Instant,
}

impl Context<'_> {
    fn core_ref(&self) -> &Core {
        self.core
    }

    /// The core (also for the protocol APIs' accessors in [`crate::api`]).
    pub(crate) fn core_mut(&mut self) -> &mut Core {
        self.core
    }

    fn clock(&self) -> Instant {
        self.now
    }

    pub(crate) fn core_stats(&mut self) -> &mut Stats {
        &mut self.core.stats
    }

    /// The time this turn started.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Stops the loop: [`Platform::run`] returns after this turn.
    pub fn shutdown(&mut self) {
        self.core.shutdown = true;
    }

    shared_methods!();
}

/// The platform: a reactor owning one `mio::Poll`, the bus, timers and (later) every socket.
/// See the [module docs](crate::platform) for what a turn does.
pub struct Platform {
    poll: Poll,
    events: mio::Events,
    shared: Arc<Shared>,
    handle_tx: Sender<Command>,
    handle_rx: Receiver<Command>,
    core: Core,
    spin: SpinWatch,
}

impl Platform {
    /// A builder with every default.
    pub fn builder() -> PlatformBuilder {
        PlatformBuilder {
            storage: None,
            identity: None,
            friends: Vec::new(),
            devices: Vec::new(),
            connection_info: serde_json::Value::Array(Vec::new()),
            limits: Limits::default(),
            net: NetConfig::default(),
            directory: None,
            accept: None,
            services: Vec::new(),
            allow_new_identity: false,
        }
    }

    fn core_ref(&self) -> &Core {
        &self.core
    }

    /// The core (also for the protocol APIs' accessors in [`crate::api`]).
    pub(crate) fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }

    fn clock(&self) -> Instant {
        Instant::now()
    }

    shared_methods!();

    /// A handle for other threads: send messages and stop the loop.
    pub fn handle(&self) -> Handle {
        Handle {
            tx: self.handle_tx.clone(),
            shared: self.shared.clone(),
            own: self.core.identity.sign_id(),
            max_message_size: self.core.limits.max_message_size,
            frame_caps: self
                .core
                .net
                .as_ref()
                .map(|n| (n.largest_frame(true), n.largest_frame(false))),
        }
    }

    fn has_work(&self) -> bool {
        !self.core.queue.is_empty()
            || !self.core.builtin.is_empty()
            || !self.core.pending_events.is_empty()
            || (!self.handle_rx.is_empty() && self.core.queue.len() < self.core.limits.local_queue)
            || self.shared.stop_requested.load(Ordering::SeqCst)
            || self.core.net.as_ref().is_some_and(|n| n.has_work())
    }

    /// Whether the only pending work is the connection manager's.
    fn local_work_only_net(&self) -> bool {
        self.core.queue.is_empty()
            && self.core.builtin.is_empty()
            && self.core.pending_events.is_empty()
            && self.handle_rx.is_empty()
            && !self.shared.stop_requested.load(Ordering::SeqCst)
    }

    fn earliest_deadline(&self) -> Option<Instant> {
        self.earliest_due().map(|(at, _)| at)
    }

    /// The earliest deadline and who set it.
    fn earliest_due(&self) -> Option<(Instant, Owner)> {
        let t = self.core.timers.peek().map(|(at, action)| match action {
            TimerAction::Service(slot) => (at, Owner::Service(*slot)),
            _ => (at, Owner::Timers),
        });
        let n = self
            .core
            .net
            .as_ref()
            .and_then(|n| n.next_deadline())
            .map(|at| (at, Owner::Connections));
        match (t, n) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// Names a deadline's owner (for the busy-turn warning).
    fn owner_name(&self, owner: Owner) -> String {
        match owner {
            Owner::Timers => "the platform's timers".into(),
            Owner::Service(slot) => format!("service {:?}", self.core.services.name(slot)),
            Owner::Connections => "the connection manager".into(),
        }
    }

    /// Which hosted service's wake-ups woke how many turns (name, turns), in the order the
    /// services were added. Their sum is [`Woken::services`] in [`Stats::woken`].
    pub fn service_wakes(&self) -> Vec<(String, u64)> {
        self.core.services.wakes()
    }

    /// When the reactor next needs a turn: now if work is pending, else the next timer.
    /// `None` means only I/O or a handle can create work.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.has_work() {
            return Some(Instant::now());
        }
        self.earliest_deadline()
    }

    /// One turn of the reactor (see the module docs). Waits at most `timeout` (`None`: until
    /// something happens); `Some(Duration::ZERO)` never blocks.
    pub fn poll(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let now = Instant::now();
        let mut wait = timeout;
        let work = self.has_work();
        // Work pending before the poll: the connection manager's alone counts as its wake-up.
        let net_work_only = work
            && self.local_work_only_net()
            && self.core.net.as_ref().is_some_and(|n| n.has_work());
        let due = if work { None } else { self.earliest_due() };
        if work {
            wait = Some(Duration::ZERO);
        } else if let Some((at, _)) = due {
            let until = at.saturating_duration_since(now);
            wait = Some(wait.map_or(until, |w| w.min(until)));
        }
        match self.poll.poll(&mut self.events, wait) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let io_now = Instant::now();
        let mut service_events = false;
        let (mut ready, mut woken) = (false, work && !net_work_only);
        for event in self.events.iter() {
            if event.token() == WAKER_TOKEN {
                woken = true;
                continue; // handled below, whatever woke us
            }
            ready = true;
            if host::service_of(event.token()).is_some() {
                service_events = true;
                continue; // after the timers, below
            }
            match self.core.net.as_mut() {
                Some(net) => net.handle_event(event, io_now),
                None => log::debug!("readiness for unknown token {:?}", event.token()),
            }
        }
        self.core.now = Instant::now();
        self.core.stats.turns += 1;
        let cause = match due {
            _ if ready => Cause::Io,
            _ if woken => Cause::Work,
            _ if work => Cause::Deadline(Owner::Connections),
            Some((at, owner)) if at <= io_now => Cause::Deadline(owner),
            _ => Cause::Idle,
        };
        self.core.count_turn(cause);
        let messages = self.core.stats.messages;
        self.take_commands();
        self.core.fire_timers();
        if service_events {
            host::on_io(&mut self.core, &self.events);
        }
        self.core.net_receive();
        // The built-in messages first: they were queued before (or in answer to) the rest.
        let builtin = self.core.builtin.len();
        for _ in 0..builtin {
            let Some(msg) = self.core.builtin.pop_front() else {
                break;
            };
            self.core.dispatch(msg);
        }
        let n = self.core.queue.len();
        for _ in 0..n {
            let Some(msg) = self.core.queue.pop_front() else {
                break;
            };
            self.core.dispatch(msg);
        }
        self.core.settle_acks();
        self.core.net_pump();
        self.core.raise_storage_faults();
        self.core.flush_events();
        if cfg!(debug_assertions) {
            // Woken by a deadline that was already past when the turn began, and nothing
            // moved: one such turn is harmless, a long run of them is a busy loop.
            let spun = match (cause, due) {
                (Cause::Deadline(o), Some((at, _)))
                    if at <= now && self.core.stats.messages == messages =>
                {
                    Some(o)
                }
                _ => None,
            };
            if let Some(owner) = self.spin.turn(spun) {
                log::warn!(
                    "{} turns in a row woken by a deadline already past that did nothing; \
                     the deadline's owner: {}",
                    turns::SPIN_WARN_TURNS,
                    self.owner_name(owner)
                );
            }
        }
        Ok(())
    }

    fn take_commands(&mut self) {
        if self.shared.stop_requested.swap(false, Ordering::SeqCst) {
            self.core.shutdown = true;
        }
        self.shared.wake_pending.store(false, Ordering::SeqCst);
        while self.core.queue.len() < self.core.limits.local_queue {
            let Ok(cmd) = self.handle_rx.try_recv() else {
                break;
            };
            match cmd {
                Command::Send(Outgoing {
                    dest,
                    protocol,
                    topic,
                    payload,
                    options,
                }) => {
                    let status = self
                        .core
                        .send(Some(dest), protocol, topic, payload, options);
                    if let Err(e) = status {
                        log::debug!("message from a handle not queued: {e}");
                    }
                }
            }
        }
        if !self.handle_rx.is_empty() {
            // Left for the next turn: make sure that turn does not wait.
            self.shared.wake_pending.store(true, Ordering::SeqCst);
        }
    }

    /// Adds and starts a service (see [`crate::services`]). Added after the first turn, it
    /// does not see the start-up messages (it can read `ctx.node_info()` in
    /// [`Service::start`]). If it fails to start, the error is returned and nothing of it
    /// remains.
    pub fn add_service(&mut self, service: impl Service + 'static) -> io::Result<ServiceId> {
        self.core.now = Instant::now();
        host::add(&mut self.core, Box::new(service))
    }

    /// Runs turns until [`Platform::shutdown`] (or a handle's or callback's shutdown).
    pub fn run(&mut self) -> io::Result<()> {
        while !self.core.shutdown {
            self.poll(None)?;
        }
        Ok(())
    }

    /// Stops [`Platform::run`] after the current turn.
    pub fn shutdown(&mut self) {
        self.core.shutdown = true;
    }

    /// Whether shutdown was requested.
    pub fn is_shut_down(&self) -> bool {
        self.core.shutdown || self.shared.stop_requested.load(Ordering::SeqCst)
    }

    /// Takes the events collected since the last call (at most [`Limits::event_batch`]; the
    /// excess is counted in [`Stats::events_dropped`]).
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.core.event_batch.drain(..)
    }

    /// Calls `callback` for every event, on the reactor's thread, at the end of each turn.
    ///
    /// ```
    /// use std::time::Duration;
    /// use mm_platform::{Event, Platform};
    ///
    /// let mut platform = Platform::builder().build().unwrap();
    /// platform.on_event(|ctx, event| {
    ///     if *event == Event::Ready {
    ///         let _ = ctx.messaging().send("app.started", "local", &true);
    ///     }
    /// });
    /// let events = platform.event_channel(64);
    /// platform.poll(Some(Duration::ZERO)).unwrap();
    /// platform.poll(Some(Duration::ZERO)).unwrap();
    /// let topics: Vec<String> = events
    ///     .try_iter()
    ///     .filter_map(|e| match e {
    ///         Event::Message(m) => Some(m.topic),
    ///         _ => None,
    ///     })
    ///     .collect();
    /// assert!(topics.contains(&"app.started".to_string()));
    /// ```
    pub fn on_event<F>(&mut self, callback: F)
    where
        F: FnMut(&mut Context<'_>, &Event) + Send + 'static,
    {
        self.core.event_callbacks.push(Box::new(callback));
    }

    /// A bounded channel (`capacity` events, at least 1) receiving every event; full means
    /// dropped for this channel, never blocking the reactor.
    pub fn event_channel(&mut self, capacity: usize) -> Receiver<Event> {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        self.core.event_channels.push(tx);
        rx
    }

    /// Queues a message received from an authenticated peer (the transports' entry point; an
    /// application with its own transport may call it once it has authenticated `sender`). Its
    /// scope comes from the circles. Returns `false` (and drops the message) if the local queue
    /// is full or `sender` is not a valid key.
    ///
    /// ```
    /// use std::time::Duration;
    /// use mm_platform::identity::Identity;
    /// use mm_platform::{Platform, Scope};
    ///
    /// let friend = Identity::generate();
    /// let mut platform = Platform::builder().friends([friend.sign_id()]).build().unwrap();
    /// let (_, rx) = platform.on_channel("friends.chat.*", 8);
    /// assert!(platform.receive_from_peer(friend.sign_id(), "ms", "chat.say", b"\"hi\"".to_vec()));
    /// platform.poll(Some(Duration::ZERO)).unwrap();
    /// let msg = rx.try_recv().unwrap();
    /// assert_eq!(msg.scope, Scope::Friends);
    /// assert_eq!(msg.sender, friend.sign_id().into());
    /// ```
    pub fn receive_from_peer(
        &mut self,
        sender: SignId,
        protocol: impl Into<Cow<'static, str>>,
        topic: impl Into<String>,
        payload: Vec<u8>,
    ) -> bool {
        let core = &mut self.core;
        let Some(b) = core.keys.box_id(&sender) else {
            log::debug!("message from an invalid key dropped");
            core.stats.peer_drops += 1;
            return false;
        };
        if core.queue.len() >= core.limits.local_queue {
            core.stats.peer_drops += 1;
            return false;
        }
        let scope = core.circles.scope_of(&b);
        core.queue.push_back(Message {
            sender: Address::Node(sender),
            protocol: protocol.into(),
            topic: topic.into(),
            scope,
            payload,
            id: None,
        });
        true
    }

    // The three methods below are the transports' hooks (next layer); unused until then.
    #[allow(dead_code)]
    /// Records a new connection (for the transports): emits [`Event::Connection`].
    pub(crate) fn connected(&mut self, peer: SignId) {
        self.core.emit(Event::Connection(peer));
    }

    #[allow(dead_code)]
    /// Records a lost connection (for the transports): emits [`Event::Disconnected`].
    pub(crate) fn disconnected(&mut self, peer: SignId) {
        self.core.emit(Event::Disconnected(peer));
    }

    #[allow(dead_code)]
    /// The poll's registry, where the transports register their sockets.
    pub(crate) fn registry(&self) -> &mio::Registry {
        self.poll.registry()
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        host::stop_all(self);
        if let Some(net) = self.net.as_mut() {
            net.save(&mut *self.storage);
            // The gateway forwards our port no longer than we listen on it.
            net.portmap_close();
        }
    }
}

#[cfg(unix)]
impl AsRawFd for Platform {
    /// The `mio::Poll` file descriptor (epoll), for hosts that embed the reactor in their own
    /// event loop: when it is readable (or at [`Platform::next_deadline`]), call
    /// `poll(Some(Duration::ZERO))`.
    fn as_raw_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Platform")
            .field("sign_id", &self.core.identity.sign_id())
            .field("subscriptions", &self.core.bus.len())
            .field("queued", &(self.core.queue.len() + self.core.builtin.len()))
            .field("timers", &self.core.timers.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_events_reach_every_consumer() {
        let mut p = Platform::builder().build().unwrap();
        let rx = p.event_channel(8);
        p.poll(Some(Duration::ZERO)).unwrap();
        let _ = p.drain_events().count();
        let _ = rx.try_iter().count();
        let peer = Identity::generate().sign_id();
        p.connected(peer);
        p.disconnected(peer);
        assert!(p.next_deadline().unwrap() <= Instant::now());
        p.poll(Some(Duration::ZERO)).unwrap();
        let batch: Vec<Event> = p.drain_events().collect();
        assert_eq!(
            batch,
            vec![Event::Connection(peer), Event::Disconnected(peer)]
        );
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), batch);
        // The transports register their sockets in the reserved token range.
        let mut sock = mio::net::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        p.registry()
            .register(
                &mut sock,
                Token(LISTENER_TOKEN_BASE),
                mio::Interest::READABLE,
            )
            .unwrap();
        p.poll(Some(Duration::ZERO)).unwrap();
        p.registry().deregister(&mut sock).unwrap();
    }
}
