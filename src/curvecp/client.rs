//! CONTRACT SKELETON (owned by the handshake helper).
use std::time::Instant;

use super::packet::ServerName;
use super::stream::{Stream, StreamConfig, StreamError};
use super::Extension;
use crate::crypto::{BoxKeyPair, BoxPublicKey};

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

/// A CurveCP client connection.
pub struct Client {}

impl Client {
    /// A new connection; the first Hello is due at `now`.
    pub fn new(config: ClientConfig, now: Instant) -> Client {
        todo!()
    }
    /// Feeds one packet that came from the server's address (the driver checks the address).
    pub fn handle_packet(&mut self, packet: &[u8], now: Instant) {
        todo!()
    }
    /// Writes the next packet due at `now` into `out` (at least `MAX_PACKET` bytes) and returns
    /// its length.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        todo!()
    }
    /// When `poll_transmit` may next produce something, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }
    /// Where the connection is.
    pub fn state(&self) -> ClientState {
        todo!()
    }
    /// The stream.
    pub fn stream(&self) -> &Stream {
        todo!()
    }
    /// The stream, to write to or read from.
    pub fn stream_mut(&mut self) -> &mut Stream {
        todo!()
    }
    /// Our long-term public key C.
    pub fn long_term_key(&self) -> BoxPublicKey {
        todo!()
    }
}
