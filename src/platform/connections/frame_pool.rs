//! Spare buffers for large frames and payloads, both ways.
//!
//! A real-time message's frame is built in a buffer of its own, which lives in the peer's queue
//! until the stream has taken it; an incoming frame is gathered in its connection's frame
//! reader, and its payload is cut out into a buffer of its own. For large payloads (a 1 MiB
//! `bt` message) a fresh buffer per message meant fresh pages: glibc gives such blocks back to
//! the kernel when they are freed, and page faults were about 15% of a bulk sender's time and
//! 10% of a receiver's. The pool keeps up to [`SPARES`] buffers of
//! [`MIN_POOLED`]..=[`MAX_POOLED`] bytes between messages, and drops them once none was used
//! for [`IDLE`]: an idle node keeps nothing.
//!
//! A fresh large buffer (none spare fits, as in a burst of sends that fills a peer's queue) is
//! faulted in at once ([`crate::prefault`]) rather than one page fault per 4 KiB page as it is
//! first written. In `nodes_bt` the sender's CPU per 100 MiB fell from 0.15-0.19 s to 0.13-0.15 s.

use std::time::{Duration, Instant};

/// Buffers smaller than this are not kept (small allocations are cheap).
pub(super) const MIN_POOLED: usize = 64 * 1024;
/// Nor larger ones than this (a rare huge message does not pin its buffer).
pub(super) const MAX_POOLED: usize = 4 << 20;
/// Buffers kept at most: a frame being sent and one being received, with its payload, and one
/// to spare.
pub(super) const SPARES: usize = 4;
/// The spares are dropped after this long unused.
pub(super) const IDLE: Duration = Duration::from_secs(1);

/// The spare frame buffers.
#[derive(Debug, Default)]
pub(super) struct FramePool {
    spare: Vec<Vec<u8>>,
    last_used: Option<Instant>,
    /// Whether a release check is scheduled.
    armed: bool,
}

impl FramePool {
    /// An empty buffer with room for `len` bytes: a spare one when there is one that fits.
    pub(super) fn take(&mut self, len: usize, now: Instant) -> Vec<u8> {
        if len >= MIN_POOLED {
            // The smallest spare that fits, so that a large one stays for a large frame; of
            // equal ones the latest given back, whose bytes are likeliest still in the cache.
            let fit = (self.spare.iter().enumerate().rev())
                .filter(|(_, v)| v.capacity() >= len)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = fit {
                self.last_used = Some(now);
                let mut v = self.spare.remove(i);
                v.clear();
                return v;
            }
        }
        crate::prefault::with_capacity(len)
    }

    /// Takes back a buffer that is done with. Returns when to check for release if that check
    /// is not scheduled yet (the caller schedules it and calls [`FramePool::release_due`]).
    pub(super) fn give(&mut self, v: Vec<u8>, now: Instant) -> Option<Instant> {
        let cap = v.capacity();
        if !(MIN_POOLED..=MAX_POOLED).contains(&cap) {
            return None;
        }
        if self.spare.len() < SPARES {
            self.spare.push(v);
        } else {
            // Full: a larger buffer takes the smallest one's place. Spares too small for the
            // frames coming in (a frame reader's first 64 KiB) must not keep out the ones that
            // fit: they did, and a 1 MiB `bt` receiver took fresh pages for most payloads.
            let (i, smallest) = (self.spare.iter().enumerate())
                .map(|(i, s)| (i, s.capacity()))
                .min_by_key(|&(_, c)| c)
                .expect("the pool is full");
            if smallest >= cap {
                return None;
            }
            self.spare[i] = v;
        }
        self.last_used = Some(now);
        (!std::mem::replace(&mut self.armed, true)).then(|| now + IDLE)
    }

    /// [`FramePool::give`], scheduling the release check on `timers` when it is due.
    pub(super) fn give_scheduled(
        &mut self,
        v: Vec<u8>,
        now: Instant,
        timers: &mut crate::platform::timers::Timers<super::NetTimer>,
    ) {
        if let Some(at) = self.give(v, now) {
            timers.schedule(at, super::NetTimer::FramePool);
        }
    }

    /// The release check: drops the spares when none was used for [`IDLE`]; otherwise returns
    /// when to check again.
    pub(super) fn release_due(&mut self, now: Instant) -> Option<Instant> {
        self.armed = false;
        if self.spare.is_empty() {
            return None;
        }
        match self.last_used {
            Some(t) if now < t + IDLE => {
                self.armed = true;
                Some(t + IDLE)
            }
            _ => {
                self.spare = Vec::new();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_bounded_and_releases_when_idle() {
        let t = Instant::now();
        let mut p = FramePool::default();
        // Small buffers are not kept; large ones up to SPARES.
        assert_eq!(p.give(Vec::with_capacity(1000), t), None);
        assert_eq!(p.give(Vec::with_capacity(MAX_POOLED + 1), t), None);
        assert_eq!(p.give(Vec::with_capacity(1 << 20), t), Some(t + IDLE));
        assert_eq!(
            p.give(Vec::with_capacity(1 << 20), t),
            None,
            "already armed"
        );
        for _ in 2..SPARES {
            assert_eq!(p.give(Vec::with_capacity(1 << 20), t), None);
        }
        assert_eq!(p.give(Vec::with_capacity(1 << 20), t), None, "full");
        assert_eq!(p.spare.len(), SPARES);
        // A large request takes a spare that fits; a small one never does.
        let v = p.take(1 << 20, t + Duration::from_millis(500));
        assert!(v.capacity() >= 1 << 20 && v.is_empty());
        assert!(p.take(100, t).capacity() < MIN_POOLED);
        assert!(
            p.take(2 << 20, t).capacity() >= 2 << 20,
            "none fits: a fresh one"
        );
        // Used at +500 ms: the check at +1 s keeps it and asks again at +1.5 s.
        let next = p.release_due(t + IDLE);
        assert_eq!(next, Some(t + Duration::from_millis(1500)));
        assert_eq!(p.release_due(t + Duration::from_millis(1500)), None);
        assert!(p.spare.is_empty());
    }

    #[test]
    fn larger_buffers_displace_smaller_spares_and_the_best_fit_is_taken() {
        let t = Instant::now();
        let mut p = FramePool::default();
        for _ in 0..SPARES {
            p.give(Vec::with_capacity(MIN_POOLED), t);
        }
        // A full pool of reader-sized spares still takes a frame-sized one...
        p.give(Vec::with_capacity(1 << 20), t);
        assert_eq!(p.spare.len(), SPARES);
        p.give(Vec::with_capacity(2 << 20), t);
        // ...but not a smaller one than all it holds.
        p.give(Vec::with_capacity(MIN_POOLED), t);
        let mut caps: Vec<usize> = p.spare.iter().map(Vec::capacity).collect();
        caps.sort_unstable();
        assert_eq!(caps, [MIN_POOLED, MIN_POOLED, 1 << 20, 2 << 20]);
        // The smallest that fits: the 1 MiB one for a 1 MiB frame, the 2 MiB one stays.
        assert_eq!(p.take(1 << 20, t).capacity(), 1 << 20);
        assert_eq!(p.take(1 << 20, t).capacity(), 2 << 20);
        assert_eq!(p.take(MIN_POOLED, t).capacity(), MIN_POOLED);
    }
}
