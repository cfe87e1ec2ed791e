//! The CurveCP message layer of one connection: a reliable, ordered byte stream each way, built
//! from the messages of [`super::message`] (docs/ARCHITECTURE.md §4.1), sans-IO.
//!
//! The crypto layer feeds every decrypted message to [`Stream::handle_message`], asks
//! [`Stream::poll_message`] for messages to box and send (written straight into its packet
//! buffer), and sleeps until [`Stream::poll_timeout`]. The application side is
//! [`Stream::write`] / [`Stream::finish`] and [`Stream::read`] / [`Stream::peer_eof`].
//!
//! Sending: bytes are queued in a send buffer bounded by [`StreamConfig::send_buffer`] (copied
//! into a ring grown on demand and released when empty, or whole buffers handed over with
//! [`Stream::write_owned`]; see `sendbuf`), cut into blocks of up to 1024 bytes (`initial_block` until the
//! peer has spoken, and never more than fits the caller's `max_len`), at most [`MAX_BLOCKS`]
//! blocks queued and never beyond the peer's range 1 + [`SEND_WINDOW`] (the reference drops
//! anything further). Every transmission gets a new message ID. RTT samples come only from an
//! acknowledgement naming the latest transmission of a still-unacknowledged block (Karn). A
//! block is retransmitted when a block sent at least [`DUP_THRESHOLD`] transmissions after it
//! is known to have arrived (from ranges or from the acknowledged ID) and either a block sent
//! more than a quarter of the smoothed RTT after it has arrived too or it has been out for
//! 1.25 smoothed RTTs (a time-based reordering window, so reordered blocks are not resent), or
//! when its retransmission timeout expires (doubled on each timeout until progress, at most
//! [`MAX_RTO`] unless the controller asks for more). The congestion controller
//! ([`super::congestion`]) sets the window and the pacing. EOF rides on the last block or in an
//! empty STOP block and counts as acknowledged only when range 1 reaches N + 1. If blocks are
//! outstanding and nothing has been acknowledged for [`StreamConfig::dead_after`], the stream
//! fails with [`StreamError::PeerUnresponsive`] and sends nothing more.
//!
//! Receiving: data is accepted up to [`StreamConfig::recv_window`] bytes beyond the read
//! position (further data is dropped and not acknowledged), kept out of order in a ring buffer
//! grown on demand and released once it has stayed empty for [`RING_IDLE`] (at most
//! [`MAX_HOLES`] separate ranges), delivered in order, duplicates ignored. Every accepted message with a non-zero ID is acknowledged promptly (one
//! acknowledgement covers all messages handled before the next `poll_message`), and so is the
//! very first message from the peer even with ID 0. Acknowledgements ride on data when data is
//! due anyway, carry ranges 2..6 when there are holes, and otherwise go out as 64-byte messages
//! with ID 0.
//!
//! Hostile input: a message of the wrong size, or whose range 1 acknowledges bytes we never
//! sent, is dropped whole with no state change. A data part that is malformed, contradicts an
//! earlier EOF, or lies beyond the window is ignored (its acknowledgement fields still count,
//! as in the reference).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::congestion::{self, Congestion, CongestionFactory};
use super::message::{self, Message, MessageHeader, Stop, ACK_LEN, MAX_DATA};
use super::sendbuf::SendBuf;

pub use super::MAX_BLOCKS;
/// Never send data past the peer's range 1 plus this many bytes (the reference's receive
/// buffer: it drops anything further).
pub const SEND_WINDOW: u64 = 131_072;
/// The most separate out-of-order ranges kept by the receiver (further data is dropped).
pub const MAX_HOLES: usize = 128;
/// A block is deemed lost when a block sent this many transmissions later has arrived.
pub const DUP_THRESHOLD: u64 = 3;
/// The retransmission timeout backoff stops growing here, or at a third of
/// [`StreamConfig::dead_after`] if that is shorter (unless the controller's own timeout is
/// longer).
pub const MAX_RTO: Duration = Duration::from_secs(4);
/// The largest stream position the protocol allows (2^60).
const MAX_STREAM: u64 = 1 << 60;
/// An emptied receive ring is kept this long for more data, then released (at the next
/// `poll_message`, which `poll_timeout` asks for): a bulk receiver that reads everything each
/// turn would otherwise free and zero-allocate (and grow by doubling) its ring every turn, and
/// an idle connection keeps no ring at all.
pub const RING_IDLE: Duration = Duration::from_millis(200);

/// How a stream ends: the STOP flag of the message layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eof {
    /// Normal end of stream (flag 2048).
    Success,
    /// Failure (flag 4096).
    Failure,
}

impl From<Eof> for Stop {
    fn from(e: Eof) -> Stop {
        match e {
            Eof::Success => Stop::Success,
            Eof::Failure => Stop::Failure,
        }
    }
}

impl From<Stop> for Eof {
    fn from(s: Stop) -> Eof {
        match s {
            Stop::Success => Eof::Success,
            Stop::Failure => Eof::Failure,
        }
    }
}

/// Why a stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// Nothing from the peer acknowledged our data for `StreamConfig::dead_after`.
    PeerUnresponsive,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::PeerUnresponsive => f.write_str("peer unresponsive"),
        }
    }
}

impl std::error::Error for StreamError {}

/// Settings of one stream.
#[derive(Clone)]
pub struct StreamConfig {
    /// Bytes the application may queue for sending before `write` accepts no more.
    pub send_buffer: usize,
    /// Bytes beyond the application's read position we accept from the peer (the reference
    /// uses 131072 and its peers never send beyond that). At least 1024 is used.
    pub recv_window: usize,
    /// Send an empty block at once (the client does, so that its Initiate leaves promptly).
    pub initial_ping: bool,
    /// Largest block (data bytes per message) before anything arrives from the peer: 512 for a
    /// client (so the message fits an Initiate), 1024 for a server.
    pub initial_block: usize,
    /// Fail the stream when data is outstanding and, for this long, nothing has been
    /// acknowledged and nothing at all has been heard from the peer. A peer whose receive
    /// window is full still answers our blocks (with acknowledgements of what it has), so a
    /// slow reader is not taken for a dead peer; a peer that restarted (and so ignores the old
    /// session's packets) is.
    pub dead_after: Duration,
    /// While we wait for the peer (its EOF has not arrived) with nothing of ours in flight,
    /// send an empty block that the peer must acknowledge after this long without hearing from
    /// it, so that `dead_after` also catches a peer that vanished while we only wait for it
    /// (CurveCP has no close packet). `None` (the default) sends no such probes: the platform
    /// has keepalives of its own, and JavaScript peers never acknowledge empty blocks.
    pub keepalive: Option<Duration>,
    /// Never send a data block of exactly one byte (default `false`). The JavaScript
    /// implementation (curvecp 1.2.1) never acknowledges such a block, so its sender would
    /// retransmit it until the stream dies, and it drops every later block as out of order. With
    /// this set, a lone unsent byte waits for more (a frame is never one byte, so more comes),
    /// and a block that would leave exactly one byte behind carries one byte less. A final byte
    /// with the EOF still goes.
    pub no_one_byte_blocks: bool,
    /// Makes the congestion controller of each new stream.
    pub congestion: CongestionFactory,
}

impl StreamConfig {
    /// Client defaults: an immediate ping, 512-byte first blocks, 128 KiB send buffer, 256 KiB
    /// receive window, 30 s dead-peer timeout, the default congestion controller.
    pub fn client() -> StreamConfig {
        StreamConfig {
            send_buffer: 131_072,
            recv_window: 262_144,
            initial_ping: true,
            initial_block: 512,
            dead_after: Duration::from_secs(30),
            keepalive: None,
            no_one_byte_blocks: false,
            congestion: congestion::default_factory(),
        }
    }

    /// Server defaults: as [`StreamConfig::client`] but no ping and 1024-byte blocks at once.
    pub fn server() -> StreamConfig {
        StreamConfig {
            initial_ping: false,
            initial_block: MAX_DATA,
            ..StreamConfig::client()
        }
    }
}

impl Default for StreamConfig {
    /// The server defaults.
    fn default() -> Self {
        StreamConfig::server()
    }
}

impl std::fmt::Debug for StreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConfig")
            .field("send_buffer", &self.send_buffer)
            .field("recv_window", &self.recv_window)
            .field("initial_ping", &self.initial_ping)
            .field("initial_block", &self.initial_block)
            .field("dead_after", &self.dead_after)
            .field("keepalive", &self.keepalive)
            .field("no_one_byte_blocks", &self.no_one_byte_blocks)
            .finish_non_exhaustive()
    }
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
    /// The congestion controller's window now, in blocks.
    pub window: usize,
    /// The controller's pacing interval now (zero: no pacing).
    pub pacing: Duration,
}

/// One block of our stream that has been sent and not yet removed from the queue.
#[derive(Debug, Clone, Copy)]
struct Block {
    /// Stream position of its first byte.
    pos: u64,
    /// Data bytes.
    len: u16,
    /// Carries our EOF (then it ends at the end of the stream).
    eof: bool,
    /// Message ID of the latest transmission.
    id: u32,
    /// Time of the latest transmission.
    sent_at: Instant,
    /// Transmission sequence number of the latest transmission.
    seq: u64,
    /// Acknowledged by the peer's ranges.
    acked: bool,
}

impl Block {
    fn end(&self) -> u64 {
        self.pos + u64::from(self.len)
    }
}

/// The message layer of one connection: a reliable, ordered byte stream each way.
pub struct Stream {
    // Settings.
    send_buffer: usize,
    recv_window: usize,
    dead_after: Duration,
    keepalive: Option<Duration>,
    no_one_byte_blocks: bool,
    /// When the latest valid message from the peer arrived.
    last_heard: Instant,
    cc: Box<dyn Congestion>,
    error: Option<StreamError>,
    /// Latest `now` seen (what "immediately" means for `poll_timeout`).
    last_now: Instant,
    /// `last_now` before the latest call that moved it: when the caller last touched the
    /// stream before the current turn (acknowledgements read now arrived after it).
    prev_touch: Instant,
    /// Latest `max_len` passed to `poll_message`.
    last_max_len: usize,
    /// Largest block now (`initial_block`, then 1024 once the peer has spoken).
    max_block: usize,
    heard_from_peer: bool,

    // Send side.
    /// Bytes `[sbuf.start(), sbuf.end())` of our stream (`end` is where the next write goes).
    sbuf: SendBuf,
    /// First byte not yet cut into a block.
    next_pos: u64,
    eof: Option<Eof>,
    eof_cut: bool,
    eof_acked: bool,
    ping_pending: bool,
    blocks: VecDeque<Block>,
    in_flight: usize,
    next_id: u32,
    next_seq: u64,
    /// Highest transmission sequence number known to have arrived.
    delivered_seq: u64,
    /// Latest send time of any block known to have arrived (for the reordering window).
    delivered_sent: Option<Instant>,
    /// Highest range-1 end the peer reported (excluding the EOF's +1).
    peer_ack: u64,
    /// Virtual time of the latest block on the pacing schedule: the next block may go at
    /// `pace_v + pacing`; after a pause it is pulled forward so that at most `burst` blocks go
    /// at once.
    pace_v: Option<Instant>,
    /// Cap on the controller's burst ([`Stream::set_max_burst`]).
    max_burst: u32,
    /// The latest `poll_message` left new data unsent (held by the pacing or the window), or
    /// the send buffer full: the stream has been waiting on its schedule since, not idle. The schedule then runs on from
    /// `pace_v` instead of being pulled forward to `now`, so a caller that comes back late (an
    /// application polling once a frame) sends what a punctual one would have sent meanwhile,
    /// up to the window, instead of one burst a call. Idle streams keep the burst cap.
    backlogged: bool,
    backoff: u32,
    last_progress: Instant,
    /// Lower bounds of the send time and the transmission sequence number of every
    /// unacknowledged block (exact right after [`Stream::refresh_oldest`]); they let
    /// `poll_message` skip scanning the queue for losses and timeouts when none can be due.
    oldest_lb: Option<(Instant, u64)>,

    // Receive side.
    /// Ring buffer (length 0 or a power of two) holding stream bytes from `read_pos`.
    rbuf: Vec<u8>,
    /// Since when the ring has been empty (released after `RING_IDLE`).
    rbuf_idle_since: Option<Instant>,
    rhead: usize,
    read_pos: u64,
    /// All bytes below this have arrived.
    recv_contig: u64,
    /// Out-of-order ranges above `recv_contig`: sorted, disjoint, not adjacent.
    holes: Vec<(u64, u64)>,
    /// Largest end of any data received.
    recv_max: u64,
    peer_eof: Option<(Eof, u64)>,
    /// Since when an acknowledgement is due.
    ack_pending: Option<Instant>,
    /// Latest non-zero ID to name in the next acknowledgement.
    ack_id: u32,

    stats: StreamStats,
}

impl Stream {
    /// A new stream (`now` starts its clocks).
    pub fn new(config: &StreamConfig, now: Instant) -> Stream {
        let mut cc = (config.congestion)();
        cc.init(now);
        Stream {
            send_buffer: config.send_buffer,
            // At least one full block, or a block could never be accepted.
            recv_window: config.recv_window.max(MAX_DATA),
            dead_after: config.dead_after,
            keepalive: config.keepalive,
            no_one_byte_blocks: config.no_one_byte_blocks,
            last_heard: now,
            cc,
            error: None,
            last_now: now,
            prev_touch: now,
            last_max_len: message::MAX_MESSAGE,
            max_block: config.initial_block.clamp(1, MAX_DATA),
            heard_from_peer: false,
            sbuf: SendBuf::default(),
            next_pos: 0,
            eof: None,
            eof_cut: false,
            eof_acked: false,
            ping_pending: config.initial_ping,
            blocks: VecDeque::new(),
            in_flight: 0,
            next_id: 1,
            next_seq: 1,
            delivered_seq: 0,
            delivered_sent: None,
            peer_ack: 0,
            pace_v: None,
            max_burst: u32::MAX,
            backlogged: false,
            backoff: 0,
            last_progress: now,
            oldest_lb: None,
            rbuf: Vec::new(),
            rbuf_idle_since: None,
            rhead: 0,
            read_pos: 0,
            recv_contig: 0,
            holes: Vec::new(),
            recv_max: 0,
            peer_eof: None,
            ack_pending: None,
            ack_id: 0,
            stats: StreamStats::default(),
        }
    }

    /// Sets [`StreamConfig::no_one_byte_blocks`] on a running stream (a server learns that its
    /// peer is a JavaScript node from the framing its packets came in).
    pub fn set_no_one_byte_blocks(&mut self, on: bool) {
        self.no_one_byte_blocks = on;
    }

    /// Replaces the congestion controller (before anything was sent: a server learns from the
    /// framing of its peer's packets what kind of peer it serves).
    pub fn set_congestion(&mut self, factory: &CongestionFactory, now: Instant) {
        let mut cc = factory();
        cc.init(now);
        self.cc = cc;
    }

    /// Caps how many blocks go back to back after a pause, whatever the congestion controller
    /// allows ([`Congestion::burst`]): the transport knows what its path likes (see
    /// [`crate::transport::tcp::TCP_MAX_BURST`]).
    pub fn set_max_burst(&mut self, blocks: u32) {
        self.max_burst = blocks.max(1);
    }

    /// Queues bytes for sending; returns how many were taken (0 when the send buffer is full or
    /// the stream was finished: backpressure).
    pub fn write(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.writable());
        self.sbuf.write(&data[..n]);
        n
    }

    /// Queues `buf[from..]` for sending without copying it, whole, when the send buffer has any
    /// room (it then holds up to this buffer more than [`StreamConfig::send_buffer`]); gives it
    /// back when there is none or the stream was finished. Once all of it is acknowledged the
    /// buffer can be had back for reuse from [`Stream::take_spent`].
    ///
    /// Worth it for large buffers the caller is done with (a platform frame of a megabyte);
    /// small writes are better copied with [`Stream::write`], which packs them together.
    pub fn write_owned(&mut self, buf: Vec<u8>, from: usize) -> Result<usize, Vec<u8>> {
        let n = buf.len().saturating_sub(from);
        let max_more = MAX_STREAM.saturating_sub(self.sbuf.end());
        if self.writable() == 0 || n as u64 > max_more {
            return Err(buf);
        }
        self.sbuf.write_owned(buf, from);
        Ok(n)
    }

    /// A buffer given to [`Stream::write_owned`] whose bytes have all been acknowledged (its
    /// contents unspecified), for the caller to reuse. The stream keeps one, and only while
    /// another such buffer is still held: take each as it comes; the last of a burst is freed,
    /// so a quiet stream holds none.
    pub fn take_spent(&mut self) -> Option<Vec<u8>> {
        self.sbuf.take_spent()
    }

    /// Room left in the send buffer.
    pub fn writable(&self) -> usize {
        if self.eof.is_some() || self.error.is_some() {
            return 0;
        }
        let room = self.send_buffer.saturating_sub(self.sbuf.len());
        let max_more = MAX_STREAM.saturating_sub(self.sbuf.end());
        room.min(usize::try_from(max_more).unwrap_or(usize::MAX))
    }

    /// Ends our side of the stream after the queued bytes.
    pub fn finish(&mut self, eof: Eof) {
        if self.eof.is_none() {
            self.eof = Some(eof);
        }
    }

    /// Copies received in-order bytes into `buf`; returns how many (0 when none are ready).
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.readable());
        if n == 0 {
            return 0;
        }
        let cap = self.rbuf.len();
        let first = n.min(cap - self.rhead);
        buf[..first].copy_from_slice(&self.rbuf[self.rhead..self.rhead + first]);
        buf[first..n].copy_from_slice(&self.rbuf[..n - first]);
        self.consumed(n);
        n
    }

    /// Appends up to `max` received in-order bytes to `out` (no zero-filled buffer in between);
    /// returns how many.
    pub fn read_append(&mut self, out: &mut Vec<u8>, max: usize) -> usize {
        let n = max.min(self.readable());
        if n == 0 {
            return 0;
        }
        let cap = self.rbuf.len();
        let first = n.min(cap - self.rhead);
        out.extend_from_slice(&self.rbuf[self.rhead..self.rhead + first]);
        out.extend_from_slice(&self.rbuf[..n - first]);
        self.consumed(n);
        n
    }

    /// Moves the read position past `n` bytes taken from the ring.
    fn consumed(&mut self, n: usize) {
        let cap = self.rbuf.len();
        self.rhead = (self.rhead + n) & (cap - 1);
        self.read_pos += n as u64;
        self.stats.bytes_received += n as u64;
        if self.read_pos == self.recv_max {
            // Released by `poll_message` after `RING_IDLE` unless more data comes.
            self.rbuf_idle_since.get_or_insert(self.last_now);
        }
    }

    /// Releases a receive ring that has been empty for `RING_IDLE`.
    fn release_idle_ring(&mut self, now: Instant) {
        if let Some(t) = self.rbuf_idle_since {
            if self.read_pos != self.recv_max {
                self.rbuf_idle_since = None;
            } else if now >= t + RING_IDLE {
                self.rbuf = Vec::new();
                self.rhead = 0;
                self.rbuf_idle_since = None;
            }
        }
    }

    /// In-order bytes ready to read.
    pub fn readable(&self) -> usize {
        (self.recv_contig - self.read_pos) as usize
    }

    /// The peer's EOF, once every byte before it has been read.
    pub fn peer_eof(&self) -> Option<Eof> {
        match self.peer_eof {
            Some((e, total)) if self.read_pos == total => Some(e),
            _ => None,
        }
    }

    /// The caller handed us `now`: the stream's clock moves on (never back), remembering
    /// when it was last touched before.
    fn touch(&mut self, now: Instant) {
        if now > self.last_now {
            self.prev_touch = self.last_now;
            self.last_now = now;
        }
    }

    /// The last sign of life from the peer: progress on our data, or any valid message.
    fn last_alive(&self) -> Instant {
        self.last_progress.max(self.last_heard)
    }

    /// Feeds one decrypted message (16..1088 bytes) from the peer. A malformed one is dropped
    /// with no state change; returns whether it was accepted.
    pub fn handle_message(&mut self, msg: &[u8], now: Instant) -> bool {
        self.touch(now);
        if self.error.is_some() {
            return false;
        }
        let Some(m) = Message::parse(msg) else {
            log::debug!("stream: dropped a message of {} bytes", msg.len());
            return false;
        };
        let h = m.header;
        let sent_end = self.next_pos + u64::from(self.eof_cut);
        if h.ack_end > sent_end {
            log::debug!(
                "stream: dropped a message acknowledging {} of {} bytes sent",
                h.ack_end,
                sent_end
            );
            return false;
        }
        // Validate the data part before changing anything.
        let data = m.data.and_then(|d| self.check_data(&h, d));
        // A block dropped only because our window is full is still answered (acknowledging
        // what we have, not it): the peer then knows we are alive, only slow.
        let beyond_window = data.is_none()
            && m.data.is_some_and(|d| {
                h.pos.saturating_add(d.len() as u64)
                    > self.read_pos.saturating_add(self.recv_window as u64)
            });

        // Acknowledgement fields.
        self.apply_acks(&h, sent_end, now);

        // Data. A message with an ID is acknowledged, except an acknowledgement that carries
        // an ID itself (no data, no STOP, a non-zero acknowledged ID: the JavaScript
        // implementation's acknowledgements look like this; answering them could start an
        // endless exchange of acknowledgements). The reference's acknowledgements have ID 0 and
        // its blocks never carry an acknowledged ID, so this changes nothing for it.
        let id_ack = h.ack_id != 0 && h.data_len() == 0 && h.stop().is_none();
        let mut ack = h.id != 0 && (data.is_some() || beyond_window) && !id_ack;
        if let Some(d) = data {
            self.store(&h, d);
        }
        self.last_heard = self.last_heard.max(now);
        if !self.heard_from_peer {
            self.heard_from_peer = true;
            self.max_block = MAX_DATA;
            ack = true;
        }
        if ack {
            self.ack_pending.get_or_insert(now);
            if h.id != 0 && data.is_some() {
                self.ack_id = h.id;
            }
        }
        self.stats.messages_received += 1;
        true
    }

    /// Checks a message's data part; returns it when it may be stored.
    fn check_data<'a>(&self, h: &MessageHeader, d: &'a [u8]) -> Option<&'a [u8]> {
        let end = h.pos.checked_add(d.len() as u64)?;
        if end > MAX_STREAM {
            log::debug!("stream: data beyond 2^60");
            return None;
        }
        if let Some((kind, total)) = self.peer_eof {
            if end > total
                || (h.stop().is_some() && (end != total || Some(kind) != h.stop().map(Eof::from)))
            {
                log::debug!("stream: data contradicting the peer's EOF at {total}");
                return None;
            }
        } else if h.stop().is_some() && end < self.recv_max {
            log::debug!("stream: EOF at {end} before data already received");
            return None;
        }
        if end > self.read_pos.saturating_add(self.recv_window as u64) {
            log::debug!(
                "stream: data up to {end} beyond the receive window, dropped ({} bytes unread)",
                self.recv_contig - self.read_pos
            );
            return None;
        }
        if end > self.recv_contig && !self.hole_fits(h.pos.max(self.recv_contig), end) {
            log::debug!("stream: too many out-of-order ranges, data dropped");
            return None;
        }
        Some(d)
    }

    /// Whether recording `[start, end)` (start ≥ recv_contig) keeps at most MAX_HOLES ranges.
    fn hole_fits(&self, start: u64, end: u64) -> bool {
        if start == self.recv_contig || self.holes.len() < MAX_HOLES {
            return true;
        }
        // Full: fits only if it touches an existing range.
        self.holes.iter().any(|&(s, e)| start <= e && end >= s)
    }

    fn apply_acks(&mut self, h: &MessageHeader, sent_end: u64, now: Instant) {
        // RTT sample from the acknowledged ID (only the latest transmission of a block that is
        // still unacknowledged).
        if h.ack_id != 0 {
            if let Some(b) = self.blocks.iter().find(|b| b.id == h.ack_id) {
                if !b.acked {
                    let rtt = now.saturating_duration_since(b.sent_at);
                    // The acknowledgement arrived after the stream was last touched before
                    // this call, or after the block went: anything earlier it may have spent
                    // waiting for our caller.
                    let waited = now.saturating_duration_since(self.prev_touch.max(b.sent_at));
                    self.cc.on_rtt_sample_waited(rtt, waited, now);
                    self.last_progress = now;
                }
                self.delivered_seq = self.delivered_seq.max(b.seq);
                self.delivered_sent = self.delivered_sent.max(Some(b.sent_at));
            }
        }
        let ranges = h.ranges();
        let range1 = ranges[0].stop;
        self.peer_ack = self.peer_ack.max(range1.min(self.next_pos));
        let mut blocks = 0;
        let mut bytes = 0;
        let mut latest: Option<Instant> = None;
        for b in self.blocks.iter_mut().filter(|b| !b.acked) {
            let hit = if b.eof {
                range1 > b.end()
            } else {
                ranges
                    .iter()
                    .map(|r| (r.start, r.stop.min(sent_end)))
                    .any(|(s, e)| s <= b.pos && b.end() <= e)
            };
            if hit {
                b.acked = true;
                blocks += 1;
                bytes += usize::from(b.len);
                self.delivered_seq = self.delivered_seq.max(b.seq);
                latest = latest.max(Some(b.sent_at));
            }
        }
        self.delivered_sent = self.delivered_sent.max(latest);
        if blocks > 0 {
            self.in_flight -= blocks;
            if self.in_flight == 0 {
                self.oldest_lb = None;
            }
            self.cc.on_ack(blocks, bytes, now);
            self.backoff = 0;
            self.last_progress = now;
            while self.blocks.front().is_some_and(|b| b.acked) {
                let b = self.blocks.pop_front().expect("front exists");
                if b.eof {
                    self.eof_acked = true;
                }
            }
            let new_start = self.blocks.front().map_or(self.next_pos, |b| b.pos);
            if new_start > self.sbuf.start() {
                self.sbuf.release_to(new_start);
            }
        }
    }

    /// Stores a validated data part.
    fn store(&mut self, h: &MessageHeader, d: &[u8]) {
        let end = h.pos + d.len() as u64;
        if let Some(stop) = h.stop() {
            self.peer_eof = Some((stop.into(), end));
        }
        if end <= self.recv_contig {
            return; // duplicate
        }
        let start = h.pos.max(self.recv_contig);
        let data = &d[(start - h.pos) as usize..];
        self.ring_write(start, data);
        self.recv_max = self.recv_max.max(end);
        self.add_range(start, end);
    }

    fn ring_write(&mut self, start: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.rbuf_idle_since = None;
        let need = (start + data.len() as u64 - self.read_pos) as usize;
        if need > self.rbuf.len() {
            let new_cap = need.next_power_of_two().max(4096);
            let mut nb = vec![0u8; new_cap];
            let old = self.rbuf.len();
            if old > 0 {
                let first = old - self.rhead;
                nb[..first].copy_from_slice(&self.rbuf[self.rhead..]);
                nb[first..old].copy_from_slice(&self.rbuf[..self.rhead]);
            }
            self.rbuf = nb;
            self.rhead = 0;
        }
        let cap = self.rbuf.len();
        let at = (self.rhead + (start - self.read_pos) as usize) & (cap - 1);
        let first = data.len().min(cap - at);
        self.rbuf[at..at + first].copy_from_slice(&data[..first]);
        self.rbuf[..data.len() - first].copy_from_slice(&data[first..]);
    }

    fn add_range(&mut self, start: u64, end: u64) {
        if start <= self.recv_contig {
            self.recv_contig = self.recv_contig.max(end);
        } else {
            // Merge into the sorted, disjoint list.
            let i = self.holes.partition_point(|&(_, e)| e < start);
            let mut s = start;
            let mut e = end;
            let mut j = i;
            while j < self.holes.len() && self.holes[j].0 <= e {
                s = s.min(self.holes[j].0);
                e = e.max(self.holes[j].1);
                j += 1;
            }
            self.holes.splice(i..j, std::iter::once((s, e)));
        }
        while let Some(&(s, e)) = self.holes.first() {
            if s > self.recv_contig {
                break;
            }
            self.recv_contig = self.recv_contig.max(e);
            self.holes.remove(0);
        }
    }

    /// Range 1 as we report it: bytes received in order, +1 once the peer's EOF and every byte
    /// before it have arrived.
    fn our_ack_end(&self) -> u64 {
        match self.peer_eof {
            Some((_, total)) if self.recv_contig == total => total + 1,
            _ => self.recv_contig,
        }
    }

    /// Fills the acknowledgement fields of an outgoing message.
    fn ack_header(&self) -> MessageHeader {
        let mut h = MessageHeader {
            ack_id: if self.ack_pending.is_some() {
                self.ack_id
            } else {
                0
            },
            ack_end: self.our_ack_end(),
            ..Default::default()
        };
        let mut stop = h.ack_end;
        for (k, &(s, e)) in self.holes.iter().take(5).enumerate() {
            let gap = s - stop;
            let len = (e - s).min(u64::from(u16::MAX));
            if k == 0 {
                let Ok(g) = u32::try_from(gap) else { break };
                h.gap2 = g;
                h.len2 = len as u16;
            } else {
                let Ok(g) = u16::try_from(gap) else { break };
                h.more[k - 1] = (g, len as u16);
            }
            stop = s + len;
        }
        h
    }

    fn rto(&self) -> Duration {
        let base = self.cc.rto();
        let backed = base.saturating_mul(1u32 << self.backoff.min(16));
        // At least three tries within `dead_after`, so that one lost probe (or its answer)
        // does not make a live peer look dead.
        let cap = MAX_RTO.min(self.dead_after / 3);
        backed.min(cap.max(base))
    }

    fn fits(max_len: usize, b: &Block) -> bool {
        message::data_message_len(usize::from(b.len)).is_some_and(|l| l <= max_len)
    }

    /// Recomputes `oldest_lb` exactly from the queue.
    fn refresh_oldest(&mut self) {
        self.oldest_lb =
            self.blocks
                .iter()
                .filter(|b| !b.acked)
                .fold(None, |acc: Option<(Instant, u64)>, b| match acc {
                    None => Some((b.sent_at, b.seq)),
                    Some((t, q)) => Some((t.min(b.sent_at), q.min(b.seq))),
                });
    }

    /// Lowers `oldest_lb` for a block sent at `now` as transmission `seq`.
    fn note_sent(&mut self, now: Instant, seq: u64) {
        self.oldest_lb = Some(match self.oldest_lb {
            None => (now, seq),
            Some((t, q)) => (t.min(now), q.min(seq)),
        });
    }

    /// Whether a lost block may exist (from the lower bounds: may say yes wrongly, never no).
    fn maybe_lost(&self) -> bool {
        self.oldest_lb
            .is_some_and(|(_, q)| q + DUP_THRESHOLD <= self.delivered_seq)
    }

    /// Whether a block may have timed out at `now` (may say yes wrongly, never no).
    fn maybe_timed_out(&self, now: Instant) -> bool {
        self.oldest_lb.is_some_and(|(t, _)| now >= t + self.rto())
    }

    /// When block `b` counts as lost, if a block sent at least [`DUP_THRESHOLD`] transmissions
    /// after it has arrived: at once when a block sent more than a reordering window (a quarter
    /// of the smoothed RTT) after it has arrived, otherwise once it has been out for a smoothed
    /// RTT plus that window (so blocks merely reordered, such as blocks of one burst, are not
    /// resent, yet a loss inside a burst is found well before the retransmission timeout).
    fn loss_time(&self, b: &Block) -> Option<Instant> {
        if b.acked || b.seq + DUP_THRESHOLD > self.delivered_seq {
            return None;
        }
        let srtt = self.cc.srtt().unwrap_or(Duration::ZERO);
        let reorder = srtt / 4;
        if self.delivered_sent.is_some_and(|d| b.sent_at + reorder < d) {
            Some(b.sent_at)
        } else {
            Some(b.sent_at + srtt + reorder)
        }
    }

    /// A block found lost from later deliveries by `now` ([`Stream::loss_time`]).
    fn lost_block(&self, max_len: usize, now: Instant) -> Option<usize> {
        self.blocks
            .iter()
            .position(|b| Self::fits(max_len, b) && self.loss_time(b).is_some_and(|t| t <= now))
    }

    /// The earliest time a block counts as lost.
    fn next_loss_time(&self, max_len: usize) -> Option<Instant> {
        self.blocks
            .iter()
            .filter(|b| Self::fits(max_len, b))
            .filter_map(|b| self.loss_time(b))
            .min()
    }

    /// The unacknowledged block sent longest ago.
    fn oldest_block(&self, max_len: usize) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.acked || !Self::fits(max_len, b) {
                continue;
            }
            if best.is_none_or(|j| b.sent_at < self.blocks[j].sent_at) {
                best = Some(i);
            }
        }
        best
    }

    /// The next new block: (data length, carries EOF), if one may be sent.
    fn new_block(&self, max_len: usize) -> Option<(usize, bool)> {
        if self.blocks.len() >= MAX_BLOCKS || self.in_flight >= self.cc.window().max(1) {
            return None;
        }
        let limit = self.max_block.min(message::max_data_for(max_len));
        if limit == 0 {
            return None;
        }
        let unsent = self.sbuf.end() - self.next_pos;
        // Everything below `sbuf_start` is acknowledged (by any range), so it is a safe base too.
        let base = self.peer_ack.max(self.sbuf.start());
        let room = (base + SEND_WINDOW).saturating_sub(self.next_pos);
        if unsent > 0 {
            let mut want = unsent.min(limit as u64);
            if self.no_one_byte_blocks && self.eof.is_none() {
                if unsent - want == 1 {
                    // Leave two bytes behind rather than one.
                    want -= 1;
                }
                if want < 2 {
                    return None;
                }
            }
            if room < want {
                return None;
            }
            let eof = self.eof.is_some() && self.next_pos + want == self.sbuf.end();
            return Some((want as usize, eof));
        }
        if self.eof.is_some() && !self.eof_cut {
            return Some((0, true));
        }
        if self.ping_pending {
            // After our EOF, a probe repeats the EOF (an empty STOP block at the end), which
            // every peer acknowledges; before it, an empty block.
            return Some((0, self.eof_cut));
        }
        None
    }

    /// When a keepalive probe is due: we wait for the peer (no EOF from it yet), nothing of
    /// ours is in flight or waiting to be cut, and the peer has been silent for `keepalive`.
    fn keepalive_due(&self) -> Option<Instant> {
        let k = self.keepalive?;
        if self.error.is_some()
            || self.peer_eof.is_some()
            || self.in_flight > 0
            || self.ping_pending
            || self.sbuf.end() > self.next_pos
            || (self.eof.is_some() && !self.eof_cut)
        {
            return None;
        }
        Some(self.last_heard + k)
    }

    fn take_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        if self.next_id == 0 {
            self.next_id = 1;
        }
        id
    }

    /// Encodes block `b` into `out` with the current acknowledgement fields.
    fn encode_block(&mut self, b: &Block, out: &mut [u8]) -> Option<usize> {
        let mut h = self.ack_header();
        h.id = b.id;
        h.pos = b.pos;
        let len = usize::from(b.len);
        if len == 0 && !b.eof {
            // An empty block naming an acknowledged ID looks like a JavaScript peer's
            // acknowledgement, which receivers do not acknowledge; a ping must not.
            h.ack_id = 0;
        }
        h.set_data(
            len,
            if b.eof {
                self.eof.map(Stop::from)
            } else {
                None
            },
        );
        let msg_len = message::data_message_len(len)?;
        if out.len() < msg_len {
            return None;
        }
        let data_at = msg_len - len;
        // Copy the data straight from the send buffer to the end of the message.
        self.sbuf.copy_out(b.pos, &mut out[data_at..msg_len]);
        // Header and padding around the data already in place.
        h.encode_in_place(msg_len, out)
    }

    fn sent_block(&mut self, now: Instant) {
        let p = self.cc.pacing_interval();
        let b = self.cc.burst().min(self.max_burst).max(1);
        let floor = if self.backlogged && self.cc.burst() > 1 {
            // Waiting on the schedule, not idle: catch up with it (the window still caps what
            // is in flight). Controllers that never send two blocks back to back opt out.
            now.checked_sub(p.saturating_mul(self.cc.window() as u32))
                .unwrap_or(now)
        } else {
            now.checked_sub(p.saturating_mul(b - 1)).unwrap_or(now)
        };
        self.pace_v = Some(self.pace_v.map_or(floor, |v| (v + p).max(floor)));
        self.ack_pending = None;
        self.stats.messages_sent += 1;
    }

    /// Writes the next message to send at `now` into `out` (at most `max_len` bytes, a multiple
    /// of 16, at most 1088) and returns its length, or `None` when nothing is due.
    pub fn poll_message(&mut self, now: Instant, max_len: usize, out: &mut [u8]) -> Option<usize> {
        self.touch(now);
        self.release_idle_ring(now);
        if self.error.is_some() {
            return None;
        }
        let max_len = max_len.min(out.len()).min(message::MAX_MESSAGE);
        self.last_max_len = max_len;
        if self.in_flight > 0 && now >= self.last_alive() + self.dead_after {
            log::debug!("stream: peer unresponsive for {:?}", self.dead_after);
            self.error = Some(StreamError::PeerUnresponsive);
            self.ack_pending = None;
            return None;
        }
        if self.keepalive_due().is_some_and(|due| now >= due) {
            self.ping_pending = true;
        }
        let pace_ok = self
            .pace_v
            .is_none_or(|v| now >= v + self.cc.pacing_interval());
        if pace_ok {
            if self.maybe_lost() || self.maybe_timed_out(now) {
                self.refresh_oldest();
            }
            let resend = if let Some(i) = self
                .maybe_lost()
                .then(|| self.lost_block(max_len, now))
                .flatten()
            {
                self.cc.on_loss(now);
                Some(i)
            } else if let Some(i) = self
                .maybe_timed_out(now)
                .then(|| self.oldest_block(max_len))
                .flatten()
                .filter(|&i| now >= self.blocks[i].sent_at + self.rto())
            {
                self.cc.on_timeout(now);
                self.backoff = (self.backoff + 1).min(16);
                Some(i)
            } else {
                None
            };
            if let Some(i) = resend {
                let id = self.take_id();
                let seq = self.next_seq;
                self.next_seq += 1;
                let b = &mut self.blocks[i];
                b.id = id;
                b.sent_at = now;
                b.seq = seq;
                let b = *b;
                // Retransmissions are rare: keep the bounds exact.
                self.refresh_oldest();
                let n = self.encode_block(&b, out)?;
                self.stats.retransmissions += 1;
                self.sent_block(now);
                return Some(n);
            }
            if let Some((len, eof)) = self.new_block(max_len) {
                let b = Block {
                    pos: self.next_pos,
                    len: len as u16,
                    eof,
                    id: self.take_id(),
                    sent_at: now,
                    seq: self.next_seq,
                    acked: false,
                };
                let n = self.encode_block(&b, out)?;
                self.note_sent(now, b.seq);
                self.next_seq += 1;
                if self.in_flight == 0 {
                    self.last_progress = now;
                }
                self.in_flight += 1;
                self.blocks.push_back(b);
                self.next_pos += len as u64;
                self.stats.bytes_sent += len as u64;
                if eof {
                    self.eof_cut = true;
                }
                // Any block does what the ping is for.
                self.ping_pending = false;
                self.sent_block(now);
                return Some(n);
            }
        }
        // Nothing more goes now: if new data is waiting (on the pacing or the window), or the
        // writer is (on a full send buffer), the next call catches up with the schedule.
        self.backlogged = self.sbuf.end() > self.next_pos || self.writable() == 0;
        if self.ack_pending.is_some() && max_len >= ACK_LEN {
            let h = self.ack_header();
            let n = h.encode(&[], ACK_LEN, out)?;
            self.ack_pending = None;
            self.stats.messages_sent += 1;
            return Some(n);
        }
        None
    }

    /// When `poll_message` may next produce something, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.error.is_some() {
            return None;
        }
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| {
            t = Some(t.map_or(x, |y| y.min(x)));
        };
        if let Some(a) = self.ack_pending {
            if self.last_max_len >= ACK_LEN {
                at(a);
            }
        }
        let pace_at = self
            .pace_v
            .map_or(self.last_now, |v| v + self.cc.pacing_interval());
        let max_len = self.last_max_len;
        if self.new_block(max_len).is_some() {
            at(pace_at);
        }
        if self.maybe_lost() {
            if let Some(l) = self.next_loss_time(max_len) {
                at(pace_at.max(l));
            }
        }
        if let Some((t, _)) = self.oldest_lb {
            let due = t + self.rto();
            if due > self.last_now {
                // A lower bound: at worst one early turn, which makes the bound exact.
                at(pace_at.max(due));
            } else if let Some(i) = self.oldest_block(max_len) {
                at(pace_at.max(self.blocks[i].sent_at + self.rto()));
            }
        }
        if let Some(due) = self.keepalive_due() {
            at(due);
        }
        if let Some(idle) = self.rbuf_idle_since {
            at(idle + RING_IDLE);
        }
        if self.in_flight > 0 {
            at(self.last_alive() + self.dead_after);
        }
        t
    }

    /// Our EOF acknowledged, the peer's EOF received and every byte before it read, and no
    /// acknowledgement left to send (so a driver that stops once this holds has sent its last
    /// acknowledgement; it should still linger a little to answer retransmissions, since that
    /// acknowledgement may be lost).
    pub fn is_done(&self) -> bool {
        self.eof_acked && self.peer_eof().is_some() && self.ack_pending.is_none()
    }

    /// Every byte written (and our EOF, if finished) has been acknowledged.
    pub fn all_acked(&self) -> bool {
        self.blocks.is_empty()
            && self.next_pos == self.sbuf.end()
            && (self.eof.is_none() || self.eof_acked)
    }

    /// Stream position below which every byte we wrote has been acknowledged by the peer (a
    /// platform can release stored messages up to here).
    pub fn bytes_acked(&self) -> u64 {
        self.sbuf.start()
    }

    /// Bytes written so far (the stream position of the next byte `write` takes).
    pub fn bytes_written(&self) -> u64 {
        self.sbuf.end()
    }

    /// Set once the stream has failed; it then sends nothing more.
    pub fn error(&self) -> Option<StreamError> {
        self.error
    }

    /// Releases every buffer that is currently empty (a driver may call this on an idle
    /// connection; buffers are allocated again on demand). Send buffers above 8 KiB are
    /// already released automatically when they empty, and the receive ring once it has stayed
    /// empty for [`RING_IDLE`] (at the next `poll_message`, which `poll_timeout` asks for).
    pub fn shrink_to_fit(&mut self) {
        if self.read_pos == self.recv_max {
            self.rbuf = Vec::new();
            self.rhead = 0;
            self.rbuf_idle_since = None;
        }
        self.sbuf.shrink_to_fit();
        if self.blocks.is_empty() {
            self.blocks = VecDeque::new();
        }
        if self.holes.is_empty() {
            self.holes = Vec::new();
        }
    }

    /// Bytes of heap memory held by this stream's buffers (for memory budgets and tests).
    pub fn buffer_bytes(&self) -> usize {
        self.rbuf.capacity()
            + self.sbuf.buffer_bytes()
            + self.blocks.capacity() * std::mem::size_of::<Block>()
            + self.holes.capacity() * std::mem::size_of::<(u64, u64)>()
    }

    /// Counters.
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            srtt: self.cc.srtt(),
            window: self.cc.window(),
            pacing: self.cc.pacing_interval(),
            ..self.stats.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvecp::message::{data_message_len, FLAG_SUCCESS};

    fn data_msg(id: u32, pos: u64, data: &[u8], stop: Option<Stop>) -> Vec<u8> {
        let mut h = MessageHeader {
            id,
            pos,
            ..Default::default()
        };
        h.set_data(data.len(), stop);
        let len = data_message_len(data.len()).unwrap();
        let mut out = vec![0u8; len];
        h.encode(data, len, &mut out).unwrap();
        out
    }

    fn poll(s: &mut Stream, now: Instant) -> Option<Vec<u8>> {
        let mut out = [0u8; 1088];
        s.poll_message(now, 1088, &mut out)
            .map(|n| out[..n].to_vec())
    }

    /// Moves every message `from` has due at `now` to `to`; returns how many.
    fn exchange(from: &mut Stream, to: &mut Stream, now: Instant) -> usize {
        let mut n = 0;
        while let Some(m) = poll(from, now) {
            to.handle_message(&m, now);
            n += 1;
            assert!(n < 1000, "poll_message does not settle");
        }
        n
    }

    #[test]
    fn no_one_byte_blocks_for_javascript_peers() {
        let t = Instant::now();
        let cfg = StreamConfig {
            no_one_byte_blocks: true,
            ..StreamConfig::server()
        };
        let mut a = Stream::new(&cfg, t);
        let mut b = Stream::new(&StreamConfig::client(), t);
        let lens = |a: &mut Stream, now| {
            let mut v = Vec::new();
            while let Some(m) = poll(a, now) {
                let h = Message::parse(&m).unwrap().header;
                if h.data_len() > 0 || h.id != 0 {
                    v.push(h.data_len());
                }
                assert!(v.len() < 100);
            }
            v
        };
        // A lone byte waits for more.
        assert_eq!(a.write(b"x"), 1);
        assert!(lens(&mut a, t).is_empty());
        assert!(
            a.poll_timeout().is_none(),
            "no busy deadline for a withheld byte"
        );
        // 1,025 bytes in all: not 1,024 + 1 but 1,023 + 2.
        a.write(&[7u8; 1024]);
        assert_eq!(lens(&mut a, t), vec![1023, 2]);
        // Everything arrives in order.
        let mut a2 = Stream::new(&cfg, t);
        a2.write(&[1u8; 1025]);
        exchange(&mut a2, &mut b, t);
        let mut buf = [0u8; 2048];
        assert_eq!(b.read(&mut buf), 1025);
        // With the EOF, a final single byte goes.
        let mut c = Stream::new(&cfg, t);
        c.write(b"y");
        c.finish(Eof::Success);
        assert_eq!(lens(&mut c, t), vec![1]);
    }

    /// A sender polled once a frame, as an application's 60 Hz loop does: every frame it reads
    /// the acknowledgements the receiver wrote during the previous one and sends what it may.
    /// A backlogged stream catches up with its pacing schedule (up to the window) instead of
    /// sending one burst a frame, and the acknowledgements' wait for the frame is not read as
    /// a queue; a stream that was idle still starts with one burst.
    #[test]
    fn a_sender_polled_once_a_frame_sends_its_window_each_frame() {
        let t0 = Instant::now();
        let frame = Duration::from_micros(16_667);
        let mut a = Stream::new(&StreamConfig::client(), t0);
        let mut b = Stream::new(&StreamConfig::server(), t0);
        // A short exchange while both are polled often: a sub-millisecond minimum RTT.
        a.write(b"hello");
        exchange(&mut a, &mut b, t0);
        let t1 = t0 + Duration::from_micros(300);
        exchange(&mut b, &mut a, t1);
        let mut buf = vec![0u8; 1 << 20];
        b.read(&mut buf);
        let total = 1usize << 20;
        let mut written = 0;
        let mut read = 0;
        let mut acks: Vec<Vec<u8>> = Vec::new();
        let mut now = t1 + Duration::from_millis(5);
        let mut frames = 0;
        let mut per_frame = Vec::new();
        while read < total {
            frames += 1;
            assert!(frames < 200, "no progress: {per_frame:?}");
            for m in acks.drain(..) {
                a.handle_message(&m, now);
            }
            written += a.write(&buf[..total - written]);
            let mut sent = 0;
            while let Some(m) = poll(&mut a, now) {
                b.handle_message(&m, now);
                sent += 1;
                assert!(sent < 1000);
            }
            per_frame.push(sent);
            loop {
                let n = b.read(&mut buf);
                if n == 0 {
                    break;
                }
                read += n;
            }
            while let Some(m) = poll(&mut b, now) {
                acks.push(m);
            }
            now += frame;
        }
        // 1,024 blocks at most 128 (the reference's receive buffer) a frame: 8 frames at best;
        // one burst a frame would take 64.
        assert!(frames <= 10, "{frames} frames: {per_frame:?}");
        // The frame-long wait of each acknowledgement did not shrink the window.
        assert!(a.cc.window() >= MAX_BLOCKS, "window {}", a.cc.window());
        // Idle for a second, then a new write: the first poll sends one burst, not a window.
        for m in acks.drain(..) {
            a.handle_message(&m, now);
        }
        now += Duration::from_secs(1);
        a.write(&buf[..64 * 1024]);
        let burst = a.cc.burst() as usize;
        let mut first = 0;
        while poll(&mut a, now).is_some() {
            first += 1;
            assert!(first < 1000);
        }
        assert!(
            first <= burst + 1,
            "{first} blocks after a pause, burst {burst}"
        );
    }

    /// Drives A (sending) and B (never reading) from deadline to deadline until `until`;
    /// `b_alive` says whether B still answers. Returns A's error, if any.
    fn drive_stalled(
        a: &mut Stream,
        b: &mut Stream,
        t: Instant,
        until: Instant,
        b_alive: bool,
    ) -> (Option<StreamError>, Instant) {
        let mut now = t;
        for _ in 0..10_000 {
            while let Some(m) = poll(a, now) {
                if b_alive {
                    b.handle_message(&m, now);
                }
            }
            if b_alive {
                exchange(b, a, now);
            }
            if a.error().is_some() {
                return (a.error(), now);
            }
            // The next deadline (one due now but idle, such as pacing, moves time a little).
            let next = [a.poll_timeout(), b.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .map(|d| d.max(now + Duration::from_millis(1)));
            match next {
                Some(n) if n <= until => now = n,
                _ => break,
            }
        }
        (a.error(), now)
    }

    #[test]
    fn a_peer_whose_window_is_full_is_slow_not_dead() {
        let t = Instant::now();
        let cfg = StreamConfig {
            dead_after: Duration::from_secs(5),
            ..StreamConfig::client()
        };
        let small = StreamConfig {
            recv_window: 4096,
            ..StreamConfig::server()
        };
        // B never reads: its window fills, and A's later blocks go beyond it. B answers them
        // (acknowledging what it holds), so A keeps the stream for a minute and more.
        let (mut a, mut b) = (Stream::new(&cfg, t), Stream::new(&small, t));
        a.write(&[3u8; 64 * 1024]);
        let (err, mut now) = drive_stalled(&mut a, &mut b, t, t + Duration::from_secs(60), true);
        assert_eq!(err, None, "a live but slow reader is not dead");
        assert!(now >= t + Duration::from_secs(55), "driven for a minute");
        assert!(b.readable() > 0 && !a.all_acked());
        // Once B reads, the data flows again.
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        for _ in 0..1000 {
            got += b.read(&mut buf[got..]);
            exchange(&mut b, &mut a, now);
            exchange(&mut a, &mut b, now);
            if got == buf.len() {
                break;
            }
            now += Duration::from_millis(10);
        }
        assert_eq!(got, 64 * 1024);
        // The same with B gone silent (it restarted, say): A gives up after `dead_after`.
        let (mut a, mut b) = (Stream::new(&cfg, t), Stream::new(&small, t));
        a.write(&[3u8; 64 * 1024]);
        let (err, at) = drive_stalled(&mut a, &mut b, t, t + Duration::from_secs(60), false);
        assert_eq!(err, Some(StreamError::PeerUnresponsive));
        assert!(
            at <= t + Duration::from_secs(6),
            "given up after dead_after"
        );
    }

    #[test]
    fn keepalive_probes_a_silent_peer_and_detects_that_it_vanished() {
        let t = Instant::now();
        let cfg = StreamConfig {
            keepalive: Some(Duration::from_secs(5)),
            dead_after: Duration::from_secs(20),
            ..StreamConfig::client()
        };
        let mut a = Stream::new(&cfg, t);
        let mut b = Stream::new(&StreamConfig::server(), t);
        a.write(b"request");
        a.finish(Eof::Success);
        // Everything of A's arrives and is acknowledged; B never answers with data or EOF.
        for _ in 0..4 {
            exchange(&mut a, &mut b, t);
            exchange(&mut b, &mut a, t);
        }
        assert!(a.all_acked());
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf), 7);
        // A waits for B: a probe is due 5 s after B was last heard, not before.
        let due = a.poll_timeout().expect("a keepalive deadline");
        assert_eq!(due, t + Duration::from_secs(5));
        assert_eq!(poll(&mut a, due - Duration::from_millis(1)), None);
        // The probe repeats A's EOF (an empty STOP block) and B acknowledges it.
        let probe = poll(&mut a, due).expect("a probe");
        let h = Message::parse(&probe).unwrap().header;
        assert_ne!(h.id, 0);
        assert_eq!(h.data_len(), 0);
        assert!(h.stop().is_some());
        assert!(b.handle_message(&probe, due));
        exchange(&mut b, &mut a, due);
        assert!(a.error().is_none());
        assert_eq!(a.poll_timeout(), Some(due + Duration::from_secs(5)));
        // B vanishes: the next probes go unanswered and A fails after `dead_after`.
        let mut now = due;
        for _ in 0..100 {
            now = match a.poll_timeout() {
                Some(next) => next.max(now),
                None => break,
            };
            while poll(&mut a, now).is_some() {}
        }
        assert_eq!(a.error(), Some(StreamError::PeerUnresponsive));
        assert!(
            now <= due + Duration::from_secs(5) + Duration::from_secs(20) + Duration::from_secs(1)
        );
    }

    #[test]
    fn keepalive_before_our_eof_is_an_empty_block_the_peer_acknowledges() {
        let t = Instant::now();
        let cfg = StreamConfig {
            keepalive: Some(Duration::from_secs(1)),
            ..StreamConfig::client()
        };
        let mut a = Stream::new(&cfg, t);
        let mut b = Stream::new(&StreamConfig::server(), t);
        a.write(b"x");
        for _ in 0..4 {
            exchange(&mut a, &mut b, t);
            exchange(&mut b, &mut a, t);
        }
        let due = a.poll_timeout().expect("keepalive");
        let probe = poll(&mut a, due).expect("probe");
        let h = Message::parse(&probe).unwrap().header;
        // No acknowledged ID, or the peer would take it for a JavaScript acknowledgement.
        assert_eq!((h.data_len(), h.stop(), h.ack_id), (0, None, 0));
        assert!(b.handle_message(&probe, due));
        assert!(
            exchange(&mut b, &mut a, due) > 0,
            "the probe is acknowledged"
        );
        assert!(a.error().is_none());
        // Without a keepalive, a stream that only waits has no deadline at all.
        let mut c = Stream::new(&StreamConfig::client(), t);
        let mut d = Stream::new(&StreamConfig::server(), t);
        for _ in 0..4 {
            exchange(&mut c, &mut d, t);
            exchange(&mut d, &mut c, t);
        }
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn hello_world_with_stop_is_acknowledged_with_a1_13() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        let msg = data_msg(1, 0, b"hello world\n", Some(Stop::Success));
        assert_eq!(msg.len(), 192);
        assert!(s.handle_message(&msg, t));
        assert_eq!(s.poll_timeout(), Some(t));
        let ack = poll(&mut s, t).unwrap();
        let h = Message::parse(&ack).unwrap().header;
        assert_eq!(h.id, 0);
        assert_eq!(h.ack_id, 1);
        assert_eq!(h.ack_end, 13);
        assert_eq!((h.gap2, h.len2), (0, 0));
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf), 12);
        assert_eq!(&buf[..12], b"hello world\n");
        assert_eq!(s.peer_eof(), Some(Eof::Success));
        // Nothing more to send: no busy loop; the emptied ring goes after `RING_IDLE`.
        assert_eq!(poll(&mut s, t), None);
        assert_eq!(s.poll_timeout(), Some(t + RING_IDLE));
        assert!(s.buffer_bytes() > 0);
        assert_eq!(poll(&mut s, t + RING_IDLE), None);
        assert_eq!(s.buffer_bytes(), 0);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn data_beyond_a_gap_leaves_a1_and_sends_a_range() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        assert!(s.handle_message(&data_msg(1, 0, b"0123456789", None), t));
        assert!(s.handle_message(&data_msg(2, 30, b"abc", None), t));
        let h = Message::parse(&poll(&mut s, t).unwrap()).unwrap().header;
        assert_eq!(h.ack_end, 10);
        assert_eq!(h.ack_id, 2);
        assert_eq!((h.gap2, h.len2), (20, 3));
        assert_eq!(s.readable(), 10);
        // Filling the gap delivers everything in order.
        assert!(s.handle_message(&data_msg(3, 10, &[b'x'; 20], None), t));
        assert_eq!(s.readable(), 33);
        let h = Message::parse(&poll(&mut s, t).unwrap()).unwrap().header;
        assert_eq!(h.ack_end, 33);
        assert_eq!((h.gap2, h.len2), (0, 0));
    }

    #[test]
    fn pure_acks_are_not_acknowledged_but_the_first_message_is() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        // A JavaScript client's Initiate carries 64 zero bytes: ID 0, but the server must speak.
        assert!(s.handle_message(&[0u8; 64], t));
        let m = poll(&mut s, t).unwrap();
        assert_eq!(m.len(), ACK_LEN);
        assert!(s.handle_message(&[0u8; 64], t));
        assert_eq!(poll(&mut s, t), None);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn first_client_block_fits_an_initiate_then_grows() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::client(), t);
        let mut out = [0u8; 1088];
        // The ping goes at once.
        assert_eq!(s.poll_timeout(), Some(t));
        let n = s.poll_message(t, 640, &mut out).unwrap();
        let h = Message::parse(&out[..n]).unwrap().header;
        assert_eq!((n, h.data_len(), h.id), (192, 0, 1));
        // Then 512-byte blocks in 576-byte messages.
        assert_eq!(s.write(&[7u8; 5000]), 5000);
        let n = s.poll_message(t, 640, &mut out).unwrap();
        assert_eq!(n, 576);
        let h = Message::parse(&out[..n]).unwrap().header;
        assert_eq!((h.data_len(), h.pos, h.id), (512, 0, 2));
        // The server speaks (acknowledging the ping): blocks become 1024 bytes.
        let mut ack = [0u8; 64];
        MessageHeader {
            ack_id: 1,
            ..Default::default()
        }
        .encode(&[], 64, &mut ack)
        .unwrap();
        assert!(s.handle_message(&ack, t));
        let n = s.poll_message(t, 1088, &mut out).unwrap();
        assert_eq!(n, 1088);
        let h = Message::parse(&out[..n]).unwrap().header;
        assert_eq!((h.data_len(), h.pos), (1024, 512));
    }

    #[test]
    fn eof_is_acknowledged_only_through_range_one() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        s.write(b"hello");
        s.finish(Eof::Success);
        let m = poll(&mut s, t).unwrap();
        let h = Message::parse(&m).unwrap().header;
        assert_eq!(h.flags, 5 | FLAG_SUCCESS);
        let ack = |end: u64, len2: u16| {
            let mut b = [0u8; 64];
            MessageHeader {
                ack_end: end,
                gap2: 0,
                len2,
                ..Default::default()
            }
            .encode(&[], 64, &mut b)
            .unwrap();
            b
        };
        // A range 2 covering the EOF position does not count; range 1 = 5 neither.
        assert!(s.handle_message(&ack(5, 1), t));
        assert!(!s.all_acked());
        // Range 1 beyond what we sent is forged: dropped.
        assert!(!s.handle_message(&ack(7, 0), t));
        assert!(!s.all_acked());
        assert!(s.handle_message(&ack(6, 0), t));
        assert!(s.all_acked());
    }

    #[test]
    fn retransmits_with_a_new_id_after_the_timeout_and_fails_when_dead() {
        let t = Instant::now();
        let cfg = StreamConfig {
            dead_after: Duration::from_secs(10),
            ..StreamConfig::server()
        };
        let mut s = Stream::new(&cfg, t);
        s.write(b"abc");
        let first = Message::parse(&poll(&mut s, t).unwrap()).unwrap().header.id;
        let due = s.poll_timeout().unwrap();
        assert_eq!(due, t + Duration::from_secs(1));
        assert_eq!(poll(&mut s, due - Duration::from_millis(1)), None);
        let m = poll(&mut s, due).unwrap();
        let h = Message::parse(&m).unwrap().header;
        assert_ne!(h.id, first);
        assert_eq!(h.pos, 0);
        assert_eq!(s.stats().retransmissions, 1);
        // Backoff: the next one is 2 s later.
        assert_eq!(s.poll_timeout(), Some(due + Duration::from_secs(2)));
        let mut now = due;
        for _ in 0..100 {
            match s.poll_timeout() {
                Some(next) => {
                    assert!(next >= now);
                    now = next;
                    poll(&mut s, now);
                }
                None => break,
            }
        }
        assert_eq!(s.error(), Some(StreamError::PeerUnresponsive));
        assert!(now >= t + Duration::from_secs(10));
        assert_eq!(poll(&mut s, now + Duration::from_secs(100)), None);
        assert_eq!(s.write(b"x"), 0);
    }

    #[test]
    fn selective_ranges_trigger_a_prompt_retransmission_of_the_hole() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        s.write(&[9u8; 5000]);
        let mut ids = Vec::new();
        while let Some(m) = poll(&mut s, t) {
            let h = Message::parse(&m).unwrap().header;
            ids.push((h.id, h.pos, h.data_len()));
        }
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[4], (5, 4096, 904));
        // The peer got blocks 2..5 but not block 1.
        let mut ack = [0u8; 64];
        MessageHeader {
            ack_id: 5,
            ack_end: 0,
            gap2: 1024,
            len2: 5000 - 1024,
            ..Default::default()
        }
        .encode(&[], 64, &mut ack)
        .unwrap();
        let t0 = t + Duration::from_millis(10);
        assert!(s.handle_message(&ack, t0));
        assert_eq!(s.stats().srtt, Some(Duration::from_millis(10)));
        // Block 1 went in the same burst as the others, so it may merely be late: it counts as
        // lost once out for an RTT plus a quarter (long before the retransmission timeout).
        // (First the acknowledgement every first message from a peer gets.)
        let first = Message::parse(&poll(&mut s, t0).unwrap()).unwrap().header;
        assert_eq!((first.id, first.data_len()), (0, 0));
        let t1 = s.poll_timeout().unwrap();
        assert_eq!(t1, t + Duration::from_micros(12_500));
        assert_eq!(poll(&mut s, t1 - Duration::from_micros(1)), None);
        let h = Message::parse(&poll(&mut s, t1).unwrap()).unwrap().header;
        assert_eq!((h.pos, h.data_len()), (0, 1024));
        assert_eq!(h.id, 6);
        assert_eq!(s.stats().retransmissions, 1);
        // Only the hole was resent; nothing else is due before its timeout.
        assert_eq!(poll(&mut s, t1), None);
        assert!(s.poll_timeout().unwrap() > t1);
        assert!(!s.all_acked());
        let mut ack = [0u8; 64];
        MessageHeader {
            ack_id: 6,
            ack_end: 5000,
            ..Default::default()
        }
        .encode(&[], 64, &mut ack)
        .unwrap();
        assert_eq!(s.bytes_acked(), 0);
        assert!(s.handle_message(&ack, t1 + Duration::from_millis(10)));
        assert!(s.all_acked());
        assert_eq!((s.bytes_acked(), s.bytes_written()), (5000, 5000));
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn acknowledgements_carrying_an_id_are_not_acknowledged() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        s.write(b"hello");
        assert!(poll(&mut s, t).is_some());
        // A JavaScript-style acknowledgement: ID 7, acknowledging ID 1 and 5 bytes.
        let mut m = [0u8; 64];
        MessageHeader {
            id: 7,
            ack_id: 1,
            ack_end: 5,
            ..Default::default()
        }
        .encode(&[], 64, &mut m)
        .unwrap();
        assert!(s.handle_message(&m, t));
        assert!(s.all_acked());
        // Answered only because it is the first message from the peer.
        assert!(poll(&mut s, t).is_some());
        assert!(s.handle_message(&m, t));
        assert_eq!(poll(&mut s, t), None);
        // An empty block with an ID and no acknowledged ID (the reference's ping) is answered.
        let mut ping = [0u8; 192];
        MessageHeader {
            id: 8,
            ..Default::default()
        }
        .encode(&[], 192, &mut ping)
        .unwrap();
        assert!(s.handle_message(&ping, t));
        let h = Message::parse(&poll(&mut s, t).unwrap()).unwrap().header;
        assert_eq!(h.ack_id, 8);
    }

    #[test]
    fn duplicates_are_acknowledged_and_delivered_once() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        let m = data_msg(1, 0, b"abc", None);
        assert!(s.handle_message(&m, t));
        assert!(poll(&mut s, t).is_some());
        let m2 = data_msg(2, 0, b"abc", None);
        assert!(s.handle_message(&m2, t));
        let h = Message::parse(&poll(&mut s, t).unwrap()).unwrap().header;
        assert_eq!((h.ack_id, h.ack_end), (2, 3));
        let mut buf = [0u8; 10];
        assert_eq!(s.read(&mut buf), 3);
        assert_eq!(s.read(&mut buf), 0);
    }

    #[test]
    fn oversized_data_part_is_ignored_but_its_acknowledgement_counts() {
        let t = Instant::now();
        let mut s = Stream::new(&StreamConfig::server(), t);
        // The first message is always answered; get that out of the way.
        assert!(s.handle_message(&[0u8; 48], t));
        assert!(poll(&mut s, t).is_some());
        s.write(b"xyz");
        assert!(poll(&mut s, t).is_some());
        let mut m = [0u8; 1088];
        m[0..4].copy_from_slice(&9u32.to_le_bytes());
        m[8..16].copy_from_slice(&3u64.to_le_bytes());
        m[38..40].copy_from_slice(&1025u16.to_le_bytes());
        assert!(s.handle_message(&m, t));
        assert!(s.all_acked());
        assert_eq!(s.readable(), 0);
        // Not acknowledged: the data part was rejected.
        assert_eq!(poll(&mut s, t), None);
        // 48 + D > length: same.
        m[0..4].copy_from_slice(&10u32.to_le_bytes());
        m[38..40].copy_from_slice(&100u16.to_le_bytes());
        assert!(s.handle_message(&m[..128], t));
        assert_eq!(s.readable(), 0);
        assert_eq!(poll(&mut s, t), None);
    }

    #[test]
    fn send_buffer_gives_backpressure_and_receive_window_drops() {
        let t = Instant::now();
        let cfg = StreamConfig {
            send_buffer: 1000,
            recv_window: 2048,
            ..StreamConfig::server()
        };
        let mut s = Stream::new(&cfg, t);
        assert_eq!(s.write(&[1u8; 1500]), 1000);
        assert_eq!(s.write(&[1u8; 10]), 0);
        assert_eq!(s.writable(), 0);
        // Data beyond the window: dropped and not acknowledged (the answer acknowledges only
        // what is held).
        assert!(s.handle_message(&data_msg(1, 2000, &[5u8; 100], None), t));
        let _first_answer = poll(&mut s, t); // the first message is always answered
        assert!(s.handle_message(&data_msg(2, 2000, &[5u8; 100], None), t));
        assert_eq!(s.readable(), 0);
        assert!(s.holes.is_empty());
        while let Some(m) = poll(&mut s, t) {
            let h = Message::parse(&m).unwrap().header;
            assert_ne!(h.ack_id, 2);
        }
    }
}
