//! CONTRACT SKELETON (owned by the handshake helper).
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;

use super::packet::ServerName;
use super::stream::{Stream, StreamConfig};
use super::Extension;
use crate::crypto::{BoxKeyPair, BoxPublicKey};

/// Settings of a server.
#[derive(Clone)]
pub struct ServerConfig {
    /// The long-term key pair S.
    pub keypair: BoxKeyPair,
    /// The name clients must use.
    pub name: ServerName,
    /// The server extension; packets with another are ignored.
    pub extension: Extension,
    /// Most connections at once; Initiates beyond it are dropped.
    pub max_connections: usize,
    /// Accept only clients whose long-term key passes this check (all when `None`).
    pub accept_client: Option<Arc<dyn Fn(&BoxPublicKey) -> bool + Send + Sync>>,
    /// The stream settings of each connection (`initial_ping` false, `initial_block` 1024).
    pub stream: StreamConfig,
}

/// Names one connection of a [`Server`] (stale ids are detected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    index: usize,
    generation: u64,
}

/// What happened on a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerEvent {
    /// A valid Initiate created this connection.
    Accepted(ConnectionId),
    /// The connection's stream has bytes or an EOF to read.
    Readable(ConnectionId),
    /// The stream has room for more bytes after being full.
    Writable(ConnectionId),
    /// The connection is gone (finished, failed or removed); its id is now stale.
    Closed(ConnectionId),
}

/// A CurveCP server, generic over the path a packet came on (`SocketAddr` for UDP, a
/// connection token for TCP).
pub struct Server<A> {
    _a: std::marker::PhantomData<A>,
}

impl<A: Copy + Eq + Hash + Debug> Server<A> {
    /// A new server; the minute keys rotate from `now`.
    pub fn new(config: ServerConfig, now: Instant) -> Server<A> {
        todo!()
    }
    /// Feeds one packet from `from`. Returns the length of an immediate reply written into
    /// `reply` (a Cookie, to be sent to `from`).
    pub fn handle_packet(
        &mut self,
        packet: &[u8],
        from: A,
        now: Instant,
        reply: &mut [u8],
    ) -> Option<usize> {
        todo!()
    }
    /// The next packet due at `now` for any connection, written into `out`, with its path.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut [u8]) -> Option<(A, usize)> {
        todo!()
    }
    /// When `poll_transmit` (or a key rotation) next needs a turn.
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }
    /// The next event.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        todo!()
    }
    /// A connection's stream, to read or write (marks it for `poll_transmit`).
    pub fn stream_mut(&mut self, id: ConnectionId) -> Option<&mut Stream> {
        todo!()
    }
    /// The client's long-term key C of a connection.
    pub fn client_key(&self, id: ConnectionId) -> Option<BoxPublicKey> {
        todo!()
    }
    /// The path a connection replies on.
    pub fn path(&self, id: ConnectionId) -> Option<A> {
        todo!()
    }
    /// Forgets a connection now (a `Closed` event follows).
    pub fn remove(&mut self, id: ConnectionId) {
        todo!()
    }
    /// Connections in the table.
    pub fn connection_count(&self) -> usize {
        todo!()
    }
}
