//! CONTRACT SKELETON (replace bodies; keep signatures unless agreed).
use std::time::{Duration, Instant};

use super::congestion::CongestionFactory;

/// How a stream ends: the STOP flag of the message layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eof {
    /// Normal end of stream (flag 2048).
    Success,
    /// Failure (flag 4096).
    Failure,
}

/// Why a stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// Nothing from the peer acknowledged our data for `StreamConfig::dead_after`.
    PeerUnresponsive,
}

/// Settings of one stream.
#[derive(Clone)]
pub struct StreamConfig {
    /// Bytes the application may queue for sending before `write` accepts no more.
    pub send_buffer: usize,
    /// Bytes beyond the application's read position we accept from the peer (the reference
    /// uses 131072 and its peers never send beyond that).
    pub recv_window: usize,
    /// Send an empty block at once (the client does, so that its Initiate leaves promptly).
    pub initial_ping: bool,
    /// Largest block (data bytes per message) before anything arrives from the peer: 512 for a
    /// client (so the message fits an Initiate), 1024 for a server.
    pub initial_block: usize,
    /// Fail the stream when data is outstanding and nothing has been acknowledged for this long.
    pub dead_after: Duration,
    /// Makes the congestion controller of each new stream.
    pub congestion: CongestionFactory,
}

/// Counters of one stream.
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    /// Smoothed round-trip time, once sampled.
    pub srtt: Option<Duration>,
    /// Application bytes sent (first transmissions).
    pub bytes_sent: u64,
    /// Application bytes delivered to the reader.
    pub bytes_received: u64,
    /// Messages sent (data, acknowledgements, retransmissions).
    pub messages_sent: u64,
    /// Messages received and accepted.
    pub messages_received: u64,
    /// Blocks sent again.
    pub retransmissions: u64,
}

/// The message layer of one connection: a reliable, ordered byte stream each way.
pub struct Stream {}

impl Stream {
    /// A new stream (`now` starts its clocks).
    pub fn new(config: &StreamConfig, now: Instant) -> Stream {
        todo!()
    }
    /// Queues bytes for sending; returns how many were taken (0 when the send buffer is full or
    /// the stream was finished: backpressure).
    pub fn write(&mut self, data: &[u8]) -> usize {
        todo!()
    }
    /// Room left in the send buffer.
    pub fn writable(&self) -> usize {
        todo!()
    }
    /// Ends our side of the stream after the queued bytes.
    pub fn finish(&mut self, eof: Eof) {
        todo!()
    }
    /// Copies received in-order bytes into `buf`; returns how many (0 when none are ready).
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        todo!()
    }
    /// In-order bytes ready to read.
    pub fn readable(&self) -> usize {
        todo!()
    }
    /// The peer's EOF, once every byte before it has been read.
    pub fn peer_eof(&self) -> Option<Eof> {
        todo!()
    }
    /// Feeds one decrypted message (16..1088 bytes) from the peer. A malformed one is dropped
    /// with no state change; returns whether it was accepted.
    pub fn handle_message(&mut self, msg: &[u8], now: Instant) -> bool {
        todo!()
    }
    /// Writes the next message to send at `now` into `out` (at most `max_len` bytes, a multiple
    /// of 16, at most 1088) and returns its length, or `None` when nothing is due.
    pub fn poll_message(&mut self, now: Instant, max_len: usize, out: &mut [u8]) -> Option<usize> {
        todo!()
    }
    /// When `poll_message` may next produce something, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }
    /// Our EOF acknowledged, and the peer's EOF received and every byte before it read.
    pub fn is_done(&self) -> bool {
        todo!()
    }
    /// Every byte written (and our EOF, if finished) has been acknowledged.
    pub fn all_acked(&self) -> bool {
        todo!()
    }
    /// Set once the stream has failed; it then sends nothing more.
    pub fn error(&self) -> Option<StreamError> {
        todo!()
    }
    /// Counters.
    pub fn stats(&self) -> StreamStats {
        todo!()
    }
}
