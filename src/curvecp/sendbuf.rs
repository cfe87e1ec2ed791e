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
//!   ([`SendBuf::take_spent`]) so that its pages are reused rather than faulted in anew.
//!
//! The store is a queue of segments, each a run of the ring or one owned buffer; consecutive
//! copied writes share one segment, so the usual queue holds one or a few segments and finding
//! a block is a short search.

use std::collections::VecDeque;

/// Ring buffers larger than this are released when they become empty.
const KEEP_CAPACITY: usize = 8 * 1024;
/// The most acknowledged owned buffers kept for [`SendBuf::take_spent`]; further ones are freed.
const MAX_SPENT: usize = 2;

/// Where a segment's bytes live.
enum Data {
    /// In the ring, from this count of ring bytes ever written.
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

/// Unacknowledged stream bytes: see the module docs.
#[derive(Default)]
pub(crate) struct SendBuf {
    /// Copied bytes of every ring segment, in order.
    ring: VecDeque<u8>,
    /// Ring bytes ever removed from the front (the count of the ring's first byte).
    ring_base: u64,
    segs: VecDeque<Seg>,
    /// Stream position of the first byte held.
    start: u64,
    /// Stream position after the last byte held.
    end: u64,
    /// Owned buffers whose bytes are all acknowledged, for the caller to reuse.
    spent: Vec<Vec<u8>>,
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

    /// Copies `data` in at the end.
    pub(crate) fn write(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self.segs.back_mut() {
            Some(s) if matches!(s.data, Data::Ring { .. }) => s.len += data.len(),
            _ => self.segs.push_back(Seg {
                pos: self.end,
                len: data.len(),
                data: Data::Ring {
                    at: self.ring_base + self.ring.len() as u64,
                },
            }),
        }
        self.ring.extend(data);
        self.end += data.len() as u64;
    }

    /// Queues `buf[off..]` at the end without copying it; `buf` comes back from
    /// [`SendBuf::take_spent`] once all of it is acknowledged.
    pub(crate) fn write_owned(&mut self, buf: Vec<u8>, off: usize) {
        let len = buf.len().saturating_sub(off);
        if len == 0 {
            self.keep_spent(buf);
            return;
        }
        self.segs.push_back(Seg {
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
        let mut i = if self.segs.len() == 1 {
            0
        } else {
            self.segs.partition_point(|s| s.pos + s.len as u64 <= pos)
        };
        let mut pos = pos;
        let mut done = 0;
        while done < dst.len() {
            let Some(s) = self.segs.get(i) else { return };
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
                    let from = (at - self.ring_base) as usize + skip;
                    let (a, b) = self.ring.as_slices();
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
        while self.start < to {
            let Some(s) = self.segs.front_mut() else {
                break;
            };
            let n = ((to - self.start) as usize).min(s.len);
            s.pos += n as u64;
            s.len -= n;
            match &mut s.data {
                Data::Ring { at } => {
                    self.ring.drain(..n);
                    self.ring_base += n as u64;
                    *at += n as u64;
                }
                Data::Owned { off, .. } => *off += n,
            }
            self.start += n as u64;
            if s.len == 0 {
                if let Some(Seg {
                    data: Data::Owned { buf, .. },
                    ..
                }) = self.segs.pop_front()
                {
                    self.keep_spent(buf);
                }
            }
        }
        if self.ring.is_empty() && self.ring.capacity() > KEEP_CAPACITY {
            self.ring = VecDeque::new();
        }
    }

    fn keep_spent(&mut self, buf: Vec<u8>) {
        if self.spent.len() < MAX_SPENT && buf.capacity() > 0 {
            self.spent.push(buf);
        }
    }

    /// An owned buffer whose bytes have all been acknowledged (its contents unspecified), for
    /// the caller to reuse; the buffer keeps at most two.
    pub(crate) fn take_spent(&mut self) -> Option<Vec<u8>> {
        self.spent.pop()
    }

    /// Releases the ring and spent buffers if nothing is held in the ring.
    pub(crate) fn shrink_to_fit(&mut self) {
        if self.ring.is_empty() {
            self.ring = VecDeque::new();
        }
        self.spent = Vec::new();
        if self.segs.is_empty() {
            self.segs = VecDeque::new();
        }
    }

    /// Bytes of heap memory held.
    pub(crate) fn buffer_bytes(&self) -> usize {
        let owned: usize = self
            .segs
            .iter()
            .map(|s| match &s.data {
                Data::Owned { buf, .. } => buf.capacity(),
                Data::Ring { .. } => 0,
            })
            .sum();
        let spent: usize = self.spent.iter().map(Vec::capacity).sum();
        self.ring.capacity()
            + owned
            + spent
            + self.segs.capacity() * std::mem::size_of::<Seg>()
            + self.spent.capacity() * std::mem::size_of::<Vec<u8>>()
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
        b.release_to(u64::MAX);
        assert_eq!(b.len(), 0);
        assert_eq!(b.take_spent().map(|v| v.len()), Some(30_000));
        assert!(b.buffer_bytes() > 0);
        b.shrink_to_fit();
        assert_eq!(b.buffer_bytes(), 0);
    }

    #[test]
    fn copied_writes_share_one_segment() {
        let mut b = SendBuf::default();
        for i in 0..1000u32 {
            b.write(&i.to_le_bytes());
        }
        assert_eq!(b.segs.len(), 1);
        b.release_to(4000);
        assert!(b.segs.is_empty());
        b.write(&[5]);
        assert_eq!(b.segs.len(), 1);
    }
}
