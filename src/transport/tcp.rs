//! TCP: one netstring is one CurveCP packet.
//!
//! [`FramedStream`] is a non-blocking `mio::net::TcpStream` with a bounded read buffer (one
//! maximal frame plus its prefix, at least [`READ_CHUNK`] so one read takes many frames) and a
//! bounded write buffer (frames queued during a turn go out in one write). Reading goes until
//! `WouldBlock` and hands out every whole frame, or stops after a given number of frames
//! ([`FramedStream::read_frames_up_to`]) so that the caller can acknowledge what it has before
//! reading on; a frame that announces more than the maximum, or bytes that are not a netstring,
//! end the stream (the caller closes it). When the write buffer is full a
//! new packet is dropped, as a congested UDP socket would drop it: CurveCP retransmits, and
//! memory stays bounded.
//!
//! One frame per write ([`FramedStream::set_frame_per_write`]): the 1tp compatibility framing
//! talks to a JS reader that takes one netstring per read, so two frames glued in one write
//! reach it as garbage. A stream in that mode keeps the queued frames' boundaries and writes
//! each frame with its own system call (as far as the socket takes it), never two at once.
//!
//! The raw `recv` into the read buffer's spare capacity and the `SO_LINGER` option are in the
//! transport's private `socket` module, with the other system calls of the transports.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::socket;
use crate::netstring::{self, NetstringError};

/// Size of the read buffer while a stream has bytes to read (released when drained).
pub const READ_CHUNK: usize = 64 * 1024;

/// Most CurveCP blocks a stream over TCP sends back to back (the drivers cap TCP paths with
/// [`crate::curvecp::stream::Stream::set_max_burst`]): 16, what every path had before the
/// controller's bursts grew with its rate. Each turn's blocks go out in one write, and on
/// loopback larger writes did not pay: in interleaved runs of `curvecp_bulk_tcp_100MB`, bursts
/// of 32 moved as much as 16 in one set of six (548 against 554 MB/s) and 10% less in another,
/// bursts of 64 moved 19% less (partial writes, a fuller write buffer). Over UDP the larger
/// bursts are larger segmentation-offload batches, and they do pay.
pub const TCP_MAX_BURST: u32 = 16;

/// Default bound of the write buffer.
pub const DEFAULT_WRITE_BUFFER: usize = 256 * 1024;

/// What reading found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// The socket is drained; the stream stays open.
    Open,
    /// The peer closed its side (or reset).
    Closed,
    /// The peer sent bytes that are not a valid frame: close the stream.
    Invalid(NetstringError),
    /// [`FramedStream::read_frames_up_to`] handed out its maximum; more may be buffered or
    /// waiting in the socket. Call again.
    More,
}

/// A TCP stream carrying netstring frames.
#[derive(Debug)]
pub struct FramedStream {
    stream: TcpStream,
    max_frame: usize,
    /// Bytes read and not yet handed out (capacity: the read buffer, while reading).
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    max_write: usize,
    dropped: u64,
    interest_writable: bool,
    /// Whether each frame goes out in a write of its own.
    frame_per_write: bool,
    /// In that mode, the lengths of the frames queued from `wpos` on (the first may be partly
    /// written already).
    frames: VecDeque<usize>,
    /// Successful write system calls.
    writes: u64,
}

impl FramedStream {
    /// Wraps `stream` (already connected or connecting) and registers it under `token`.
    /// Frames up to `max_frame` bytes are accepted.
    pub fn new(
        registry: &Registry,
        token: Token,
        mut stream: TcpStream,
        max_frame: usize,
    ) -> io::Result<FramedStream> {
        registry.register(&mut stream, token, Interest::READABLE)?;
        let _ = stream.set_nodelay(true);
        Ok(FramedStream {
            stream,
            max_frame,
            // The read buffer is allocated on the first read: an idle stream stays small.
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            max_write: DEFAULT_WRITE_BUFFER,
            dropped: 0,
            interest_writable: false,
            frame_per_write: false,
            frames: VecDeque::new(),
            writes: 0,
        })
    }

    /// Starts a non-blocking connection to `addr`; frames sent before it is established are
    /// buffered.
    pub fn connect(
        registry: &Registry,
        token: Token,
        addr: SocketAddr,
        max_frame: usize,
    ) -> io::Result<FramedStream> {
        let stream = TcpStream::connect(addr)?;
        let mut s = FramedStream::new(registry, token, stream, max_frame)?;
        // Writable tells when the connection is established.
        s.set_writable_interest(registry, token, true)?;
        Ok(s)
    }

    fn set_writable_interest(
        &mut self,
        registry: &Registry,
        token: Token,
        on: bool,
    ) -> io::Result<()> {
        if self.interest_writable != on {
            let interest = if on {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            registry.reregister(&mut self.stream, token, interest)?;
            self.interest_writable = on;
        }
        Ok(())
    }

    /// Reads until `WouldBlock`, calling `f` with each whole frame's payload.
    pub fn read_frames(&mut self, f: impl FnMut(&[u8])) -> io::Result<ReadStatus> {
        self.read_frames_up_to(usize::MAX, f)
    }

    /// Like [`FramedStream::read_frames`], but hands out at most `max` frames and then returns
    /// [`ReadStatus::More`]: the caller answers what it was given (acknowledgements above all)
    /// and calls again. Frames already read stay buffered for that call; readiness is
    /// edge-triggered, so the caller must come back without waiting for an event.
    pub fn read_frames_up_to(
        &mut self,
        max: usize,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<ReadStatus> {
        // Room for many frames per read system call; at least one maximal frame. `rbuf`'s
        // length is the bytes read and not yet handed out; the kernel writes into its spare
        // capacity, so a buffer taken again after a drain is not zero-filled first (64 KiB of
        // memset per wake-up was 3% of a TCP bulk transfer).
        let cap = netstring::encoded_len(self.max_frame).max(READ_CHUNK);
        if self.rbuf.capacity() < cap {
            self.rbuf.reserve_exact(cap - self.rbuf.len());
        }
        let mut handed = 0usize;
        loop {
            // Whole frames already buffered go first (left over from a call that stopped at
            // `max`, or just read).
            let len = self.rbuf.len();
            let mut at = 0;
            while handed < max {
                match netstring::decode(&self.rbuf[at..len], self.max_frame) {
                    Ok(Some(frame)) => {
                        f(&self.rbuf[at + frame.payload.start..at + frame.payload.end]);
                        at += frame.consumed;
                        handed += 1;
                    }
                    Ok(None) => break,
                    Err(e) => return Ok(ReadStatus::Invalid(e)),
                }
            }
            if at > 0 {
                self.rbuf.copy_within(at..len, 0);
                self.rbuf.truncate(len - at);
            }
            if handed >= max {
                return Ok(ReadStatus::More);
            }
            if self.rbuf.len() >= cap {
                // Cannot happen with a valid peer: a maximal frame fits the buffer and a longer
                // one is refused from its length digits. Treat it as invalid rather than spin.
                return Ok(ReadStatus::Invalid(NetstringError::TooLong));
            }
            match socket::recv_into_spare(&mut self.stream, &mut self.rbuf, cap) {
                Ok(0) => return Ok(ReadStatus::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(ReadStatus::Closed)
                }
                Err(e) => return Err(e),
            }
        }
        if self.rbuf.is_empty() {
            // Give the buffer back while idle.
            self.rbuf = Vec::new();
        }
        Ok(ReadStatus::Open)
    }

    /// Queues one frame and tries to write it. Returns `Ok(false)` when the write buffer is
    /// full and the frame was dropped.
    pub fn send_frame(
        &mut self,
        registry: &Registry,
        token: Token,
        payload: &[u8],
    ) -> io::Result<bool> {
        if !self.queue_frame(payload) {
            return Ok(false);
        }
        self.flush(registry, token)?;
        Ok(true)
    }

    /// Queues one frame without writing (a driver queues a whole turn's packets, then calls
    /// [`FramedStream::flush`] once: one system call for many packets, or one per frame in
    /// one-frame-per-write mode). Returns `false` when
    /// the write buffer is full and the frame was dropped.
    pub fn queue_frame(&mut self, payload: &[u8]) -> bool {
        let need = netstring::encoded_len(payload.len());
        if self.wbuf.len() - self.wpos + need > self.max_write {
            self.dropped += 1;
            return false;
        }
        netstring::encode_into(payload, &mut self.wbuf);
        if self.frame_per_write {
            self.frames.push_back(need);
        }
        true
    }

    /// Turns one-frame-per-write on or off (see the module docs). Bytes already queued when it
    /// is turned on count as one frame.
    pub fn set_frame_per_write(&mut self, on: bool) {
        if on && !self.frame_per_write && self.pending_write() > 0 {
            self.frames.push_back(self.pending_write());
        }
        if !on {
            self.frames.clear();
        }
        self.frame_per_write = on;
    }

    /// Whether each frame goes out in a write of its own.
    pub fn frame_per_write(&self) -> bool {
        self.frame_per_write
    }

    /// Writes as much of the write buffer as the socket takes, and asks for writability while
    /// bytes remain.
    pub fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            let end = match self.frames.front() {
                Some(&len) if self.frame_per_write => self.wpos + len,
                _ => self.wbuf.len(),
            };
            match self.stream.write(&self.wbuf[self.wpos..end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.wpos += n;
                    self.writes += 1;
                    if let Some(front) = self.frames.front_mut().filter(|_| self.frame_per_write) {
                        *front -= n.min(*front);
                        if *front == 0 {
                            self.frames.pop_front();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Not connected yet: the writable event will come.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) => return Err(e),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
            if self.wbuf.capacity() > 64 * 1024 {
                self.wbuf = Vec::new();
            }
        } else if self.wpos > self.wbuf.len() / 2 {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        let pending = self.wpos < self.wbuf.len();
        self.set_writable_interest(registry, token, pending)
    }

    /// Bytes waiting to be written.
    pub fn pending_write(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Successful write system calls so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Frames dropped because the write buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The connection's error, if it failed (for example a refused connect).
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.stream.take_error()
    }

    /// The peer's address, once connected.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// Makes closing the stream (on drop) send a reset instead of a FIN (`SO_LINGER` 0): a
    /// server closing a stream it refuses leaves no `TIME_WAIT` behind that way.
    pub fn reset_on_close(&self) {
        socket::reset_on_close(&self.stream);
    }

    /// Removes the stream from `registry` (closing happens on drop).
    pub fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        registry.deregister(&mut self.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Poll;
    use std::io::Read;
    use std::time::{Duration, Instant};

    /// Connects a framed stream to a plain listener and returns both ends once connected.
    fn pair(poll: &Poll) -> (FramedStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = FramedStream::connect(poll.registry(), Token(0), addr, 2000).unwrap();
        let (peer, _) = listener.accept().unwrap();
        (s, peer)
    }

    fn read_all(peer: &mut std::net::TcpStream, want: usize) -> Vec<u8> {
        peer.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 4096];
        while got.len() < want && Instant::now() < deadline {
            if let Ok(n) = peer.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
        }
        got
    }

    #[test]
    fn frame_per_write_writes_each_frame_alone() {
        let poll = Poll::new().unwrap();
        let (mut s, mut peer) = pair(&poll);
        // Normal mode: three frames, one write (retried until the connect completes).
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in [&b"a"[..], b"bb", b"ccc"] {
            assert!(s.queue_frame(p));
        }
        while s.pending_write() > 0 && Instant::now() < deadline {
            s.flush(poll.registry(), Token(0)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(s.writes(), 1);
        assert_eq!(read_all(&mut peer, 15), b"1:a,2:bb,3:ccc,");
        // One frame per write: three frames, three writes, same bytes.
        s.set_frame_per_write(true);
        assert!(s.frame_per_write());
        for p in [&b"\x08"[..], b"\x09", b"\x024:QvnQ,"] {
            assert!(s.queue_frame(p));
        }
        s.flush(poll.registry(), Token(0)).unwrap();
        assert_eq!(s.pending_write(), 0);
        assert_eq!(s.writes(), 4);
        assert_eq!(read_all(&mut peer, 19), b"1:\x08,1:\x09,8:\x024:QvnQ,,");
        assert!(s.frames.is_empty());
    }

    #[test]
    fn read_frames_up_to_hands_out_the_rest_on_the_next_call() {
        use std::io::Write as _;
        let poll = Poll::new().unwrap();
        let (mut s, mut peer) = pair(&poll);
        // Ten frames and half of an eleventh, in one write: one read takes them all.
        let mut bytes = Vec::new();
        for i in 0..10u8 {
            bytes.extend_from_slice(format!("1:{},", char::from(b'0' + i)).as_bytes());
        }
        bytes.extend_from_slice(b"2:x");
        peer.write_all(&bytes).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = ReadStatus::Open;
        // The bytes may arrive in pieces: call until the first four are out.
        while got.len() < 4 && Instant::now() < deadline {
            status = s.read_frames_up_to(4, |f| got.push(f.to_vec())).unwrap();
        }
        assert_eq!(status, ReadStatus::More);
        assert_eq!(got.len(), 4);
        // Whatever is buffered comes out without new bytes, four at a time, then the partial
        // frame waits for its end.
        while got.len() < 10 && Instant::now() < deadline {
            let before = got.len();
            let st = s.read_frames_up_to(4, |f| got.push(f.to_vec())).unwrap();
            assert!(got.len() - before <= 4);
            assert!(st == ReadStatus::More || st == ReadStatus::Open);
        }
        let want: Vec<Vec<u8>> = (0..10u8).map(|i| vec![b'0' + i]).collect();
        assert_eq!(got, want);
        peer.write_all(b"y,").unwrap();
        while got.len() < 11 && Instant::now() < deadline {
            s.read_frames_up_to(4, |f| got.push(f.to_vec())).unwrap();
        }
        assert_eq!(got.last().map(Vec::as_slice), Some(&b"xy"[..]));
        // Junk after a frame: the frame is handed out, then the stream is invalid.
        peer.write_all(b"1:z,zz").unwrap();
        let mut st = ReadStatus::Open;
        while !matches!(st, ReadStatus::Invalid(_)) && Instant::now() < deadline {
            st = s.read_frames_up_to(4, |f| got.push(f.to_vec())).unwrap();
        }
        assert!(matches!(st, ReadStatus::Invalid(_)));
        assert_eq!(got.last().map(Vec::as_slice), Some(&b"z"[..]));
    }
}
