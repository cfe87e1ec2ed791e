//! The bytes a stream has been given to send and the peer has not yet acknowledged, sans-IO.
//!
//! [`super::stream::Stream`] keeps its unacknowledged bytes here, in stream order, and copies
//! each block out of it straight into the packet it seals ([`SendBuf::copy_out`]). Bytes arrive
//! two ways:
//!
//! - copied ([`SendBuf::write`]) into one ring buffer, the way small writes and byte-stream
//!   users (the TCP framing, the bare bulk sender) hand them over;
//! - as whole buffers the caller gives away ([`SendBuf::write_owned`]): a platform frame of a
//!   megabyte is queued as it is instead of being copied into the ring a window at a time,
//!   which took 6% of a bulk sender's time (one copy of every byte out of a frame that had gone
//!   cold in the queue), and goes back to the caller once acknowledged
//!   ([`SendBuf::take_spent`]) so that its pages are reused rather than faulted in anew (while
//!   the next one is being sent; the last of a burst is freed, so a quiet stream keeps none).
//!
//! The store is a queue of segments, each a run of the ring or one owned buffer; consecutive
//! copied writes share one segment, so the usual queue holds one or a few segments and finding
//! a block is a short search.

use std::collections::VecDeque;

/// Ring buffers larger than this are released when they become empty.
const KEEP_CAPACITY: usize = 8 * 1024;

/// Where a segment's bytes live.
enum Data {
    /// In the ring, from this count of ring bytes ever removed or held ([`Mixed::ring_base`]).
    Ring { at: u64 },
    /// In this buffer, from this index.
    Owned { buf: Vec<u8>, off: usize },
}

/// A run of stream bytes `[pos, pos + len)` held in one place.
struct Seg {
    pos: u64,
    len: usize,
    data: Data,
}

/// The segment queue, kept only while an owned buffer is held or waits to be taken back.
struct Mixed {
    segs: VecDeque<Seg>,
    /// Ring bytes removed from the front since this queue was made (the count of the ring's
    /// first byte).
    ring_base: u64,
    /// An owned buffer whose bytes are all acknowledged, for the caller to reuse. One is kept,
    /// and only while another owned buffer is held (a caller that reuses them takes each
    /// before the next is acknowledged): the last one of a burst is freed with the queue, so
    /// a stream that has gone quiet holds no spent buffer whoever forgets to take it.
    spent: Option<Vec<u8>>,
}

/// Unacknowledged stream bytes: see the module docs.
///
/// Without owned buffers (`mixed` is `None`, the usual case and every idle connection) every
/// byte held is in the ring, in order, and the structure is a ring and two positions.
#[derive(Default)]
pub(crate) struct SendBuf {
    /// Copied bytes of every ring segment, in order.
    ring: VecDeque<u8>,
    /// Stream position of the first byte held.
    start: u64,
    /// Stream position after the last byte held.
    end: u64,
    mixed: Option<Box<Mixed>>,
}

/// Copies `out.len()` bytes of `ring` from index `from`.
fn copy_from_ring(ring: &VecDeque<u8>, from: usize, out: &mut [u8]) {
    let n = out.len();
    let (a, b) = ring.as_slices();
    if from + n <= a.len() {
        out.copy_from_slice(&a[from..from + n]);
    } else if from >= a.len() {
        out.copy_from_slice(&b[from - a.len()..from - a.len() + n]);
    } else {
        let k = a.len() - from;
        out[..k].copy_from_slice(&a[from..]);
        out[k..].copy_from_slice(&b[..n - k]);
    }
}

impl SendBuf {
    /// Bytes held.
    pub(crate) fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Stream position of the first byte held (every byte below it is acknowledged).
    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// Stream position after the last byte held (where the next write goes).
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Copies `data` in at the end.
    pub(crate) fn write(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some(m) = self.mixed.as_deref_mut() {
            match m.segs.back_mut() {
                Some(s) if matches!(s.data, Data::Ring { .. }) => s.len += data.len(),
                _ => m.segs.push_back(Seg {
                    pos: self.end,
                    len: data.len(),
                    data: Data::Ring {
                        at: m.ring_base + self.ring.len() as u64,
                    },
                }),
            }
        }
        self.ring.extend(data);
        self.end += data.len() as u64;
    }

    /// Queues `buf[off..]` at the end without copying it; `buf` comes back from
    /// [`SendBuf::take_spent`] once all of it is acknowledged.
    pub(crate) fn write_owned(&mut self, buf: Vec<u8>, off: usize) {
        let len = buf.len().saturating_sub(off);
        if len == 0 {
            return;
        }
        let m = self.mixed.get_or_insert_with(|| {
            // The bytes held so far are all in the ring: one segment.
            let mut segs = VecDeque::new();
            if !self.ring.is_empty() {
                segs.push_back(Seg {
                    pos: self.start,
                    len: self.ring.len(),
                    data: Data::Ring { at: 0 },
                });
            }
            Box::new(Mixed {
                segs,
                ring_base: 0,
                spent: None,
            })
        });
        m.segs.push_back(Seg {
            pos: self.end,
            len,
            data: Data::Owned { buf, off },
        });
        self.end += len as u64;
    }

    /// Copies the bytes at stream position `pos` into all of `dst`. They must be held:
    /// `start() <= pos` and `pos + dst.len() <= start() + len()`.
    pub(crate) fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        debug_assert!(pos >= self.start && pos + dst.len() as u64 <= self.end);
        let Some(m) = self.mixed.as_deref() else {
            copy_from_ring(&self.ring, (pos - self.start) as usize, dst);
            return;
        };
        let mut i = m.segs.partition_point(|s| s.pos + s.len as u64 <= pos);
        let mut pos = pos;
        let mut done = 0;
        while done < dst.len() {
            let Some(s) = m.segs.get(i) else { return };
            let skip = (pos - s.pos) as usize;
            let n = (s.len - skip).min(dst.len() - done);
            let out = &mut dst[done..done + n];
            match &s.data {
                Data::Owned { buf, off } => {
                    let at = off + skip;
                    out.copy_from_slice(&buf[at..at + n]);
                    prefetch(&buf[(at + n).min(buf.len())..]);
                }
                Data::Ring { at } => {
                    copy_from_ring(&self.ring, (at - m.ring_base) as usize + skip, out)
                }
            }
            done += n;
            pos += n as u64;
            i += 1;
        }
    }

    /// Drops every byte below stream position `to` (acknowledged); owned buffers emptied this
    /// way become spent.
    pub(crate) fn release_to(&mut self, to: u64) {
        let to = to.min(self.end);
        if to > self.start {
            match self.mixed.as_deref_mut() {
                None => {
                    self.ring.drain(..(to - self.start) as usize);
                    self.start = to;
                }
                Some(m) => {
                    while self.start < to {
                        let Some(s) = m.segs.front_mut() else { break };
                        let n = ((to - self.start) as usize).min(s.len);
                        s.pos += n as u64;
                        s.len -= n;
                        match &mut s.data {
                            Data::Ring { at } => {
                                self.ring.drain(..n);
                                m.ring_base += n as u64;
                                *at += n as u64;
                            }
                            Data::Owned { off, .. } => *off += n,
                        }
                        self.start += n as u64;
                        if s.len == 0 {
                            if let Some(Seg {
                                data: Data::Owned { buf, .. },
                                ..
                            }) = m.segs.pop_front()
                            {
                                if buf.capacity() > 0 {
                                    m.spent.get_or_insert(buf);
                                }
                            }
                        }
                    }
                    self.maybe_unmix();
                }
            }
        }
        if self.ring.is_empty() && self.ring.capacity() > KEEP_CAPACITY {
            self.ring = VecDeque::new();
        }
    }

    /// Drops the segment queue, and a spent buffer with it, once no owned buffer is held:
    /// every byte left is then in the ring, in order.
    fn maybe_unmix(&mut self) {
        if let Some(m) = self.mixed.as_deref() {
            if !m.segs.iter().any(|s| matches!(s.data, Data::Owned { .. })) {
                self.mixed = None;
            }
        }
    }

    /// An owned buffer whose bytes have all been acknowledged (its contents unspecified), for
    /// the caller to reuse. One is kept while another owned buffer is held; further ones, and
    /// the last of a burst, are freed.
    pub(crate) fn take_spent(&mut self) -> Option<Vec<u8>> {
        self.mixed.as_deref_mut()?.spent.take()
    }

    /// Releases the ring if it is empty, and a spent buffer.
    pub(crate) fn shrink_to_fit(&mut self) {
        if self.ring.is_empty() {
            self.ring = VecDeque::new();
        }
        if let Some(m) = self.mixed.as_deref_mut() {
            m.spent = None;
        }
    }

    /// Bytes of heap memory held.
    pub(crate) fn buffer_bytes(&self) -> usize {
        let mixed = self.mixed.as_deref().map_or(0, |m| {
            let owned: usize = (m.segs.iter())
                .map(|s| match &s.data {
                    Data::Owned { buf, .. } => buf.capacity(),
                    Data::Ring { .. } => 0,
                })
                .sum();
            std::mem::size_of::<Mixed>()
                + m.segs.capacity() * std::mem::size_of::<Seg>()
                + owned
                + m.spent.as_ref().map_or(0, Vec::capacity)
        });
        self.ring.capacity() + mixed
    }
}

/// How far ahead of the block being sealed an owned buffer is fetched into the cache.
const PREFETCH: usize = 2048;

/// Asks the CPU to bring the first [`PREFETCH`] bytes of `next` into its cache: an owned buffer
/// was written when it was queued, often megabytes earlier, and has left the core's cache by the
/// time its blocks are sealed; fetched while the block before it is sealed, its bytes are there
/// when they are copied.
#[inline]
fn prefetch(next: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in next[..next.len().min(PREFETCH)].chunks(64) {
        // SAFETY: a prefetch is a hint that reads nothing a program observes, and the address
        // lies inside `next`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = next;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write(Vec<u8>),
        Owned(Vec<u8>, usize),
        Release(usize),
        Read(usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Op::Write),
            (proptest::collection::vec(any::<u8>(), 0..300), 0usize..320)
                .prop_map(|(v, o)| Op::Owned(v, o)),
            (0usize..400).prop_map(Op::Release),
            (0usize..2000, 0usize..1100).prop_map(|(a, b)| Op::Read(a, b)),
        ]
    }

    proptest! {
        /// Whatever mix of copied and owned writes, releases and reads: every read gives the
        /// bytes a plain vector of everything written holds at that position.
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec(op(), 1..60)) {
            let mut b = SendBuf::default();
            let mut model: Vec<u8> = Vec::new();
            let mut start = 0usize;
            for op in ops {
                match op {
                    Op::Write(v) => {
                        b.write(&v);
                        model.extend_from_slice(&v);
                    }
                    Op::Owned(v, off) => {
                        if off < v.len() {
                            model.extend_from_slice(&v[off..]);
                        }
                        b.write_owned(v, off);
                    }
                    Op::Release(n) => {
                        start = (start + n).min(model.len());
                        b.release_to(start as u64);
                    }
                    Op::Read(at, n) => {
                        let held = model.len() - start;
                        if held > 0 {
                            let at = start + at % held;
                            let n = n.min(model.len() - at);
                            let mut out = vec![0; n];
                            b.copy_out(at as u64, &mut out);
                            prop_assert_eq!(&out[..], &model[at..at + n]);
                        }
                    }
                }
                prop_assert_eq!(b.len(), model.len() - start);
                prop_assert_eq!(b.start(), start as u64);
            }
        }
    }

    #[test]
    fn owned_buffers_come_back_once_acknowledged_and_memory_is_released() {
        let mut b = SendBuf::default();
        b.write(&[1; 100]);
        b.write_owned(vec![2; 20_000], 0);
        b.write(&[3; 50]);
        b.write_owned(vec![4; 30_000], 10_000);
        assert_eq!(b.len(), 100 + 20_000 + 50 + 20_000);
        let mut out = [0u8; 4];
        b.copy_out(98, &mut out);
        assert_eq!(out, [1, 1, 2, 2]);
        b.copy_out(20_098, &mut out);
        assert_eq!(out, [2, 2, 3, 3]);
        b.copy_out(20_148, &mut out);
        assert_eq!(out, [3, 3, 4, 4]);
        b.release_to(20_099);
        assert!(b.take_spent().is_none());
        b.release_to(20_100);
        assert_eq!(b.take_spent().map(|v| v.capacity()), Some(20_000));
        // Two more spent while one is held: the first is kept, the second freed.
        b.write_owned(vec![5; 100], 0);
        b.write_owned(vec![6; 100], 0);
        b.release_to(b.start() + 20_050 + 100);
        assert_eq!(b.take_spent().map(|v| v.len()), Some(30_000), "one is kept");
        assert!(b.take_spent().is_none());
        // The last owned buffer of a burst goes with the queue: nothing is left behind.
        b.write(&[7; 10]);
        b.release_to(u64::MAX);
        assert_eq!(b.len(), 0);
        assert!(b.take_spent().is_none());
        assert!(b.mixed.is_none());
        assert!(b.buffer_bytes() > 0, "the ring stays (it is small)");
        b.shrink_to_fit();
        assert_eq!(b.buffer_bytes(), 0);
    }

    #[test]
    fn copied_writes_share_one_segment_and_the_queue_goes_with_the_last_owned_buffer() {
        let mut b = SendBuf::default();
        b.write(&[1; 10]);
        assert!(b.mixed.is_none(), "copies alone need no segments");
        b.write_owned(vec![2; 10], 0);
        for i in 0..1000u32 {
            b.write(&i.to_le_bytes());
        }
        let segs = |b: &SendBuf| b.mixed.as_ref().map(|m| m.segs.len());
        assert_eq!(segs(&b), Some(3));
        b.release_to(20);
        assert!(
            b.mixed.is_none(),
            "no owned buffer left: no segments, no spent buffer"
        );
        assert!(b.take_spent().is_none());
        let mut out = [0; 4];
        b.copy_out(20 + 4 * 999, &mut out);
        assert_eq!(out, 999u32.to_le_bytes());
    }
}
