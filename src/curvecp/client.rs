//! The CurveCP client crypto layer (docs/ARCHITECTURE.md §4.1), sans-IO.
//!
//! A [`Client`] owns one connection: the short-term key pair C', the single nonce counter
//! shared by Hello, Initiate and Message (random start below 2^48, incremented before every
//! packet, failure instead of a wrap), the Hello schedule (8 Hellos, waits of 1, 1.5, 2.25, ...
//! seconds plus a uniform random extra of up to the same again), the Cookie check, the vouch,
//! Initiates (messages of at most 640 bytes) until the first valid server Message and client
//! Messages (up to 1088 bytes) after it, and the strictly increasing server nonces (checked
//! before decryption, stored after the box opens). The message layer is a
//! [`Stream`]; its messages are written straight into the packet buffer.
//!
//! The driver feeds packets that came from the server's address ([`Client::handle_packet`]),
//! calls [`Client::poll_transmit`] until it returns `None`, and sleeps until
//! [`Client::poll_timeout`]. Malformed or forged packets are dropped (logged at debug level)
//! and change nothing.
//!
//! Once the connection is established, the cookie and the vouch are wiped. [`ClientState::Closed`]
//! is reported once the stream is done and `poll_transmit` has handed out everything due (the
//! final acknowledgement included). The client still answers packets after that, so a driver
//! that keeps it a few more seconds re-acknowledges a peer whose copy of that last
//! acknowledgement was lost (the reference peer then exits cleanly instead of timing out).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::packet::{
    build_hello, counter_nonce, long_nonce, parse_cookie, parse_server_message,
    seal_client_message, seal_initiate, InitiateFields, ParseError, ServerName,
    CLIENT_MESSAGE_NONCE, CLIENT_MESSAGE_OFFSET, COOKIE_LEN, COOKIE_NONCE, INITIATE_MESSAGE_OFFSET,
    SERVER_MESSAGE_NONCE, VOUCH_LEN, VOUCH_NONCE,
};
use super::stream::{Stream, StreamConfig, StreamError};
use super::{Extension, MAX_INITIATE_MESSAGE, MAX_MESSAGE};
use crate::crypto::{
    random_below, random_bytes, wipe, BoxKeyPair, BoxPublicKey, SharedKey, KEY_LEN, TAG_LEN,
};

/// beforenm(S, c) for recent (client long-term key, server key) pairs, shared by all clients
/// of the process: a node connecting again to the same server saves a scalar multiplication
/// (tens of microseconds) on its handshake. Bounded; emptied when full.
static VOUCH_KEYS: Mutex<Option<VouchKeys>> = Mutex::new(None);
/// (client long-term public key, server public key) → beforenm(S, c).
type VouchKeys = HashMap<([u8; KEY_LEN], [u8; KEY_LEN]), SharedKey>;
/// Entries of [`VOUCH_KEYS`].
const VOUCH_KEY_CACHE: usize = 64;

/// The vouch key between a configured long-term key `c` and the server key `s`, cached.
fn vouch_key(c: &BoxKeyPair, s: &BoxPublicKey) -> SharedKey {
    let id = (c.public.0, s.0);
    if let Ok(mut guard) = VOUCH_KEYS.lock() {
        let map = guard.get_or_insert_with(HashMap::new);
        if let Some(k) = map.get(&id) {
            return k.clone();
        }
        let k = c.shared_key(s);
        if map.len() >= VOUCH_KEY_CACHE {
            map.clear();
        }
        map.insert(id, k.clone());
        return k;
    }
    c.shared_key(s)
}

/// How many Hellos are sent before giving up.
pub const HELLO_ATTEMPTS: u32 = 8;
/// The first Hello wait; each next one is 1.5 times longer.
pub const FIRST_HELLO_WAIT: Duration = Duration::from_secs(1);

/// Settings of a client connection.
#[derive(Clone)]
pub struct ClientConfig {
    /// The server's long-term public key S.
    pub server_key: BoxPublicKey,
    /// The server's name.
    pub server_name: ServerName,
    /// The server's extension.
    pub server_extension: Extension,
    /// Our extension.
    pub client_extension: Extension,
    /// Our long-term key pair C; a fresh random one when `None`.
    pub long_term: Option<BoxKeyPair>,
    /// The stream's settings (`initial_ping` true, `initial_block` 512 for a client).
    pub stream: StreamConfig,
}

impl ClientConfig {
    /// Settings for a server with long-term key `server_key`: the empty name, zero extensions,
    /// a fresh long-term key, [`StreamConfig::client`].
    pub fn new(server_key: BoxPublicKey) -> ClientConfig {
        ClientConfig::with_stream(server_key, StreamConfig::client())
    }

    /// Settings for a server with long-term key `server_key` and the given stream settings:
    /// the empty name, zero extensions, a fresh long-term key.
    pub fn with_stream(server_key: BoxPublicKey, stream: StreamConfig) -> ClientConfig {
        ClientConfig {
            server_key,
            server_name: ServerName::empty(),
            server_extension: [0; 16],
            client_extension: [0; 16],
            long_term: None,
            stream,
        }
    }
}

/// Why a client connection failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientError {
    /// No valid Cookie after the whole Hello schedule (8 Hellos).
    NoResponse,
    /// The stream failed (peer unresponsive).
    Stream(StreamError),
    /// The nonce counter would wrap.
    NonceExhausted,
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NoResponse => f.write_str("no response from the server"),
            ClientError::Stream(e) => write!(f, "connection lost: {e}"),
            ClientError::NonceExhausted => f.write_str("nonce counter exhausted"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Where a client connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Sending Hellos, waiting for a Cookie.
    Hello,
    /// Cookie accepted; sending Initiates until the first server Message.
    Initiate,
    /// A server Message has been accepted.
    Established,
    /// Both directions finished and acknowledged.
    Closed,
    /// Gave up.
    Failed(ClientError),
}

/// Counters of a client connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Hellos sent.
    pub hellos_sent: u32,
    /// Initiates sent.
    pub initiates_sent: u64,
    /// Client Messages sent.
    pub messages_sent: u64,
    /// Server Messages accepted.
    pub messages_received: u64,
    /// Packets dropped (malformed, forged, replayed, unexpected).
    pub dropped: u64,
}

/// A CurveCP client connection.
pub struct Client {
    server_extension: Extension,
    client_extension: Extension,
    name: ServerName,
    long_term: BoxKeyPair,
    short_term: BoxKeyPair,
    /// beforenm(S, c'): Hello and Cookie boxes.
    key_hello: SharedKey,
    /// beforenm(S, c): the vouch. Dropped once the vouch is built.
    key_vouch: Option<SharedKey>,
    /// beforenm(S', c'), once a Cookie is accepted.
    key_session: Option<SharedKey>,
    cookie: [u8; COOKIE_LEN],
    vouch: [u8; VOUCH_LEN],
    /// The last nonce used (incremented before each packet).
    counter: u64,
    hellos_sent: u32,
    next_hello: Instant,
    hello_wait: Duration,
    last_server_nonce: Option<u64>,
    state: ClientState,
    stream: Stream,
    scratch: Box<[u8]>,
    stats: ClientStats,
}

impl Client {
    /// A new connection; the first Hello is due at `now`.
    pub fn new(config: ClientConfig, now: Instant) -> Client {
        let key_vouch = config
            .long_term
            .as_ref()
            .map(|c| vouch_key(c, &config.server_key));
        let long_term = config.long_term.unwrap_or_else(BoxKeyPair::generate);
        let key_vouch = key_vouch.unwrap_or_else(|| long_term.shared_key(&config.server_key));
        let short_term = BoxKeyPair::generate();
        let key_hello = short_term.shared_key(&config.server_key);
        Client {
            server_extension: config.server_extension,
            client_extension: config.client_extension,
            name: config.server_name,
            long_term,
            short_term,
            key_hello,
            key_vouch: Some(key_vouch),
            key_session: None,
            cookie: [0; COOKIE_LEN],
            vouch: [0; VOUCH_LEN],
            counter: random_below(1 << 48),
            hellos_sent: 0,
            next_hello: now,
            hello_wait: FIRST_HELLO_WAIT,
            last_server_nonce: None,
            state: ClientState::Hello,
            stream: Stream::new(&config.stream, now),
            scratch: vec![0u8; MAX_MESSAGE + TAG_LEN].into_boxed_slice(),
            stats: ClientStats::default(),
        }
    }

    /// Feeds one packet that came from the server's address (the driver checks the address).
    pub fn handle_packet(&mut self, packet: &[u8], now: Instant) {
        match self.state() {
            ClientState::Hello => self.handle_cookie(packet),
            ClientState::Initiate | ClientState::Established | ClientState::Closed => {
                self.handle_server_message(packet, now)
            }
            ClientState::Failed(_) => {
                self.stats.dropped += 1;
                log::debug!("curvecp client: packet after failure dropped");
            }
        }
    }

    fn drop_packet(&mut self, why: &'static str, detail: Option<ParseError>) {
        self.stats.dropped += 1;
        log::debug!("curvecp client: dropped packet: {why} {detail:?}");
    }

    fn handle_cookie(&mut self, packet: &[u8]) {
        let view = match parse_cookie(packet, &self.client_extension, &self.server_extension) {
            Ok(v) => v,
            Err(e) => return self.drop_packet("not a Cookie", Some(e)),
        };
        let plain = &mut self.scratch[..view.boxed.len() - TAG_LEN];
        if self
            .key_hello
            .open_into(&long_nonce(COOKIE_NONCE, view.nonce), view.boxed, plain)
            .is_err()
        {
            return self.drop_packet("Cookie box does not open", None);
        }
        let server_short = BoxPublicKey(plain[..KEY_LEN].try_into().expect("32 bytes"));
        self.cookie
            .copy_from_slice(&plain[KEY_LEN..KEY_LEN + COOKIE_LEN]);
        wipe(plain);
        let mut key_session = self.short_term.shared_key(&server_short);
        // Every Message box of the session uses one of these prefixes: their subkeys once.
        key_session.cache_nonce_prefix(CLIENT_MESSAGE_NONCE);
        key_session.cache_nonce_prefix(SERVER_MESSAGE_NONCE);
        self.key_session = Some(key_session);
        // The vouch: Vn || box(K(C,S), "CurveCPV" || Vn, C').
        let mut vn = [0u8; 16];
        random_bytes(&mut vn);
        self.vouch[..16].copy_from_slice(&vn);
        let key_vouch = self
            .key_vouch
            .take()
            .expect("vouch key kept until the Cookie");
        key_vouch.seal_into(
            &long_nonce(VOUCH_NONCE, &vn),
            &self.short_term.public.0,
            &mut self.vouch[16..],
        );
        self.state = ClientState::Initiate;
        log::debug!("curvecp client: Cookie accepted, sending Initiates");
    }

    fn handle_server_message(&mut self, packet: &[u8], now: Instant) {
        let view =
            match parse_server_message(packet, &self.client_extension, &self.server_extension) {
                Ok(v) => v,
                Err(e) => return self.drop_packet("not a server Message", Some(e)),
            };
        if let Some(last) = self.last_server_nonce {
            if view.nonce <= last {
                return self.drop_packet("server nonce not increasing", None);
            }
        }
        let Some(key) = self.key_session.as_ref() else {
            return self.drop_packet("no session key", None);
        };
        let m = view.boxed.len() - TAG_LEN;
        let plain = &mut self.scratch[..m];
        if key
            .open_into(
                &counter_nonce(SERVER_MESSAGE_NONCE, view.nonce),
                view.boxed,
                plain,
            )
            .is_err()
        {
            return self.drop_packet("server Message box does not open", None);
        }
        self.last_server_nonce = Some(view.nonce);
        self.stats.messages_received += 1;
        if self.state == ClientState::Initiate {
            self.state = ClientState::Established;
            // The server has spoken: the cookie and vouch are no longer needed.
            wipe(&mut self.cookie);
            wipe(&mut self.vouch);
            log::debug!("curvecp client: established");
        }
        self.stream.handle_message(&self.scratch[..m], now);
    }

    /// Writes the next packet due at `now` into `out` (at least `MAX_PACKET` bytes) and returns
    /// its length.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        match self.state() {
            ClientState::Failed(_) => None,
            ClientState::Hello => self.poll_hello(now, out),
            ClientState::Initiate => self.poll_stream(now, out, true),
            ClientState::Established | ClientState::Closed => self.poll_stream(now, out, false),
        }
    }

    fn next_nonce(&mut self) -> Option<u64> {
        match self.counter.checked_add(1) {
            Some(n) => {
                self.counter = n;
                Some(n)
            }
            None => {
                self.state = ClientState::Failed(ClientError::NonceExhausted);
                log::debug!("curvecp client: nonce counter exhausted");
                None
            }
        }
    }

    fn poll_hello(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        if now < self.next_hello {
            return None;
        }
        if self.hellos_sent >= HELLO_ATTEMPTS {
            self.state = ClientState::Failed(ClientError::NoResponse);
            log::debug!("curvecp client: no Cookie after {HELLO_ATTEMPTS} Hellos");
            return None;
        }
        let n = self.next_nonce()?;
        let len = build_hello(
            out,
            &self.server_extension,
            &self.client_extension,
            &self.short_term.public.0,
            n,
            &self.key_hello,
        );
        self.hellos_sent += 1;
        self.stats.hellos_sent += 1;
        let w = self.hello_wait;
        let extra = Duration::from_nanos(random_below(w.as_nanos() as u64));
        self.next_hello = now + w + extra;
        self.hello_wait = w * 3 / 2;
        Some(len)
    }

    fn poll_stream(&mut self, now: Instant, out: &mut [u8], initiate: bool) -> Option<usize> {
        if self.counter == u64::MAX {
            self.state = ClientState::Failed(ClientError::NonceExhausted);
            return None;
        }
        let (offset, max_len) = if initiate {
            (INITIATE_MESSAGE_OFFSET, MAX_INITIATE_MESSAGE)
        } else {
            (CLIENT_MESSAGE_OFFSET, MAX_MESSAGE)
        };
        let Some(m) = self
            .stream
            .poll_message(now, max_len, &mut out[offset..offset + max_len])
        else {
            if self.state == ClientState::Established && self.stream.is_done() {
                // Everything, the last acknowledgement included, has been handed out.
                self.state = ClientState::Closed;
                log::debug!("curvecp client: closed");
            }
            return None;
        };
        if !(16..=max_len).contains(&m) || m % 16 != 0 {
            // The stream's contract rules this out; never put a malformed packet on the wire.
            log::debug!("curvecp client: stream produced a {m}-byte message, not sent");
            return None;
        }
        let n = self.next_nonce()?;
        let key = self
            .key_session
            .as_ref()
            .expect("session key after the Cookie");
        let len = if initiate {
            self.stats.initiates_sent += 1;
            let fields = InitiateFields {
                server_extension: &self.server_extension,
                client_extension: &self.client_extension,
                client_short: &self.short_term.public.0,
                cookie: &self.cookie,
                client_long: &self.long_term.public.0,
                vouch: &self.vouch,
                name: &self.name.0,
            };
            seal_initiate(out, &fields, n, key, m)
        } else {
            self.stats.messages_sent += 1;
            seal_client_message(
                out,
                &self.server_extension,
                &self.client_extension,
                &self.short_term.public.0,
                n,
                key,
                m,
            )
        };
        Some(len)
    }

    /// When `poll_transmit` may next produce something, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state() {
            ClientState::Failed(_) => None,
            ClientState::Hello => Some(self.next_hello),
            _ => self.stream.poll_timeout(),
        }
    }

    /// Where the connection is.
    pub fn state(&self) -> ClientState {
        match self.state {
            ClientState::Initiate | ClientState::Established | ClientState::Closed => {
                if let Some(e) = self.stream.error() {
                    ClientState::Failed(ClientError::Stream(e))
                } else {
                    self.state
                }
            }
            s => s,
        }
    }

    /// The stream.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The stream, to write to or read from.
    pub fn stream_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }

    /// Our long-term public key C.
    pub fn long_term_key(&self) -> BoxPublicKey {
        self.long_term.public
    }

    /// Our short-term public key C' (how the server names this connection).
    pub fn short_term_key(&self) -> BoxPublicKey {
        self.short_term.public
    }

    /// Counters.
    pub fn stats(&self) -> ClientStats {
        self.stats
    }

    /// The last nonce counter value used (tests check that H, I and M share it).
    pub fn nonce_counter(&self) -> u64 {
        self.counter
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("state", &self.state())
            .field("short_term", &self.short_term.public)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_counter_never_wraps() {
        let now = Instant::now();
        let server = BoxKeyPair::generate();
        let mut c = Client::new(ClientConfig::new(server.public), now);
        assert!(c.nonce_counter() < 1 << 48);
        c.counter = u64::MAX;
        let mut out = vec![0u8; super::super::MAX_PACKET];
        assert!(c.poll_transmit(now, &mut out).is_none());
        assert_eq!(c.state(), ClientState::Failed(ClientError::NonceExhausted));
        assert!(c.poll_timeout().is_none());
    }

    #[test]
    fn cookie_and_vouch_wiped_once_established() {
        use crate::curvecp::server::{Server, ServerConfig};
        let now = Instant::now();
        let mut server: Server<u8> = Server::new(ServerConfig::new(BoxKeyPair::generate()), now);
        let mut c = Client::new(ClientConfig::new(server.public_key()), now);
        let mut out = vec![0u8; super::super::MAX_PACKET];
        let mut reply = vec![0u8; super::super::MAX_PACKET];
        let n = c.poll_transmit(now, &mut out).unwrap();
        let r = server.handle_packet(&out[..n], 0, now, &mut reply).unwrap();
        c.handle_packet(&reply[..r], now);
        assert_eq!(c.state(), ClientState::Initiate);
        assert!(c.cookie.iter().any(|&b| b != 0));
        assert!(c.vouch.iter().any(|&b| b != 0));
        let n = c.poll_transmit(now, &mut out).unwrap();
        assert!(server
            .handle_packet(&out[..n], 0, now, &mut reply)
            .is_none());
        let (_, r) = server.poll_transmit(now, &mut reply).unwrap();
        c.handle_packet(&reply[..r], now);
        assert_eq!(c.state(), ClientState::Established);
        assert_eq!(c.cookie, [0u8; COOKIE_LEN]);
        assert_eq!(c.vouch, [0u8; VOUCH_LEN]);
    }
}
