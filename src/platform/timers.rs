//! Timers: a binary heap of deadlines with cancellation, no scan of all timers per turn.
//!
//! Cancelled timers leave their heap entry behind; it is recognised by its generation and
//! skipped. The heap's top is always a live timer (stale entries are popped as soon as they
//! reach the top), so [`Timers::next_deadline`] is exact, and the heap is rebuilt when stale
//! entries outnumber live ones, so memory stays proportional to the live timers.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use slab::Slab;

/// Identifies a scheduled timer, for cancelling it. Ids of fired or cancelled timers are
/// recognised as stale even when their slot is reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TimerId {
    key: u32,
    gen: u32,
}

/// A heap of timers carrying a `T` each.
pub(crate) struct Timers<T> {
    heap: BinaryHeap<Reverse<(Instant, u64, u32, u32)>>,
    slots: Slab<(u32, T)>,
    next_gen: u32,
    next_seq: u64,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Timers {
            heap: BinaryHeap::new(),
            slots: Slab::new(),
            next_gen: 0,
            next_seq: 0,
        }
    }
}

impl<T> Timers<T> {
    /// Schedules `value` for `at`. Timers with the same deadline fire in scheduling order.
    pub(crate) fn schedule(&mut self, at: Instant, value: T) -> TimerId {
        self.next_gen = self.next_gen.wrapping_add(1);
        self.next_seq += 1;
        let gen = self.next_gen;
        let key = self.slots.insert((gen, value)) as u32;
        self.heap.push(Reverse((at, self.next_seq, key, gen)));
        TimerId { key, gen }
    }

    /// Cancels a timer; `None` if it already fired or was cancelled.
    pub(crate) fn cancel(&mut self, id: TimerId) -> Option<T> {
        match self.slots.get(id.key as usize) {
            Some((gen, _)) if *gen == id.gen => {}
            _ => return None,
        }
        let (_, value) = self.slots.remove(id.key as usize);
        self.clean_top();
        if self.heap.len() > 2 * self.slots.len() + 64 {
            let slots = &self.slots;
            self.heap.retain(
                |Reverse((_, _, k, g))| matches!(slots.get(*k as usize), Some((sg, _)) if sg == g),
            );
        }
        Some(value)
    }

    fn is_live(&self, key: u32, gen: u32) -> bool {
        matches!(self.slots.get(key as usize), Some((g, _)) if *g == gen)
    }

    fn clean_top(&mut self) {
        while let Some(Reverse((_, _, k, g))) = self.heap.peek() {
            if self.is_live(*k, *g) {
                break;
            }
            self.heap.pop();
        }
    }

    /// The earliest deadline of a live timer.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, ..))| *at)
    }

    /// The earliest live timer: its deadline and value.
    pub(crate) fn peek(&self) -> Option<(Instant, &T)> {
        let Reverse((at, _, key, _)) = self.heap.peek()?;
        self.slots.get(*key as usize).map(|(_, v)| (*at, v))
    }

    /// Removes and returns the earliest timer due at `now` that was scheduled before sequence
    /// number `before_seq` (so timers scheduled while firing wait for the next turn).
    pub(crate) fn pop_due(&mut self, now: Instant, before_seq: u64) -> Option<T> {
        let Reverse((at, seq, key, gen)) = *self.heap.peek()?;
        if at > now || seq >= before_seq {
            return None;
        }
        self.heap.pop();
        debug_assert!(self.is_live(key, gen));
        let (_, value) = self.slots.remove(key as usize);
        self.clean_top();
        Some(value)
    }

    /// The sequence number the next scheduled timer will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq + 1
    }

    /// Number of live timers.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fire_in_deadline_order_and_cancel() {
        let t0 = Instant::now();
        let mut t: Timers<u32> = Timers::default();
        let a = t.schedule(t0 + Duration::from_secs(3), 3);
        t.schedule(t0 + Duration::from_secs(1), 1);
        t.schedule(t0 + Duration::from_secs(2), 2);
        t.schedule(t0 + Duration::from_secs(2), 22);
        assert_eq!(t.cancel(a), Some(3));
        assert_eq!(t.cancel(a), None);
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let limit = t.next_seq();
        assert_eq!(t.pop_due(t0, limit), None);
        let now = t0 + Duration::from_secs(5);
        let mut fired = Vec::new();
        while let Some(v) = t.pop_due(now, limit) {
            fired.push(v);
        }
        assert_eq!(fired, vec![1, 2, 22]);
        assert_eq!(t.next_deadline(), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn cancelled_entries_do_not_accumulate() {
        let t0 = Instant::now();
        let mut t: Timers<u32> = Timers::default();
        let keep = t.schedule(t0, 0);
        for i in 0..10_000 {
            let id = t.schedule(t0 + Duration::from_secs(1 + i), 1);
            t.cancel(id);
        }
        assert!(t.heap.len() <= 2 * t.slots.len() + 65);
        assert_eq!(t.next_deadline(), Some(t0));
        assert_eq!(t.cancel(keep), Some(0));
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn timers_scheduled_while_firing_wait() {
        let t0 = Instant::now();
        let mut t: Timers<u32> = Timers::default();
        t.schedule(t0, 1);
        let limit = t.next_seq();
        assert_eq!(t.pop_due(t0, limit), Some(1));
        t.schedule(t0, 2);
        assert_eq!(t.pop_due(t0, limit), None);
        assert_eq!(t.pop_due(t0, t.next_seq()), Some(2));
    }
}
