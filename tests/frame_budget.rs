//! Partly received frames share one memory budget (`NetConfig::frame_budget`): several peers
//! sending large frames at once never make the receiver reserve more than the budget, and
//! every frame still arrives (connections paused for the budget are woken up again). The
//! memory the receiver actually holds is counted too, by an allocator that counts per thread:
//! a frame's buffer is taken only once the frame is within the budget, not when its header
//! declares its size.

use std::cell::Cell;
use std::time::{Duration, Instant};

use mm_platform::{Limits, NetConfig, Platform};

/// Counts the bytes each thread has allocated and not freed, and their peak.
struct PerThread;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes in
// thread-local cells that need no allocation.
unsafe impl std::alloc::GlobalAlloc for PerThread {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        std::alloc::System.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        let p = std::alloc::System.realloc(ptr, layout, size);
        if !p.is_null() {
            count(size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: PerThread = PerThread;

const MAX_FRAME: usize = 1 << 20;
const BIG: usize = 900 * 1024;

fn poll_all(ps: &mut [Platform]) {
    for p in ps.iter_mut() {
        p.poll(Some(Duration::from_millis(1))).unwrap();
    }
}

/// Three senders each send two large messages to one receiver at the same time; returns the
/// messages received and the receiver's peak of reserved frame bytes.
fn run(frame_budget: usize) -> (usize, u64) {
    let cfg = NetConfig {
        max_frame: MAX_FRAME,
        frame_budget,
        ..NetConfig::default()
    };
    let mut r = Platform::builder().net(cfg).build().unwrap();
    let rid = r.sign_id();
    let info = r.node_info();
    let (_, rx) = r.on_channel("public.big", 16);
    let mut senders: Vec<Platform> = (0..3)
        .map(|_| Platform::builder().build().unwrap())
        .collect();
    for s in &mut senders {
        let _ = s.messaging().send("transports.nodeInfo", "local", &info);
        for i in 0..2u8 {
            assert!(s.send("ms", "big", rid, vec![i; BIG]).is_ok());
        }
    }
    let mut got = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while got < 6 && Instant::now() < end {
        r.poll(Some(Duration::from_millis(1))).unwrap();
        poll_all(&mut senders);
        for m in rx.try_iter() {
            assert_eq!(m.payload.len(), BIG);
            got += 1;
        }
    }
    (got, r.stats().frame_bytes_peak)
}

#[test]
fn large_frames_from_many_peers_stay_within_the_frame_budget() {
    // The scenario does make frames overlap: with a large budget, more than 1 MiB is reserved.
    let (got, peak) = run(64 << 20);
    assert_eq!(got, 6);
    assert!(
        peak > MAX_FRAME as u64,
        "frames in progress at once: {peak}"
    );
    // With a budget of one maximal frame, the others wait and are woken up again.
    let (got, peak) = run(MAX_FRAME);
    assert_eq!(got, 6, "every frame arrives (no lost wake-up)");
    assert!(peak <= MAX_FRAME as u64, "peak {peak} over the budget");
}

/// Six peers each start a 7 MiB message at once to a receiver whose budget holds one maximal
/// frame (8 MiB). Every message arrives, and the receiver's thread never holds much more than
/// the frame it is reading and the message it has just delivered: the frames waiting for the
/// budget cost their 64 KiB floor each, not their declared size.
#[test]
fn frames_waiting_for_the_budget_hold_no_memory_for_their_declared_size() {
    const PEERS: usize = 6;
    const SIZE: usize = 7 << 20;
    let cfg = NetConfig {
        max_frame: 8 << 20,
        frame_budget: 0,
        ..NetConfig::default()
    };
    let (info_tx, info_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        // No event batch: it would keep every message for `drain_events`.
        let limits = Limits {
            event_batch: 0,
            ..Limits::default()
        };
        let mut r = Platform::builder().net(cfg).limits(limits).build().unwrap();
        let (_, rx) = r.on_channel("public.big", 4);
        r.poll(Some(Duration::ZERO)).unwrap();
        info_tx.send((r.sign_id(), r.node_info())).unwrap();
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let mut got = 0;
        let end = Instant::now() + Duration::from_secs(60);
        while got < PEERS && Instant::now() < end {
            r.poll(Some(Duration::from_millis(1))).unwrap();
            for m in rx.try_iter() {
                assert_eq!(m.payload.len(), SIZE);
                got += 1;
            }
        }
        (got, PEAK.with(Cell::get) - base)
    });
    let (rid, info) = info_rx.recv().unwrap();
    let mut senders: Vec<Platform> = (0..PEERS)
        .map(|_| Platform::builder().build().unwrap())
        .collect();
    for s in &mut senders {
        let _ = s.messaging().send("transports.nodeInfo", "local", &info);
        assert!(s.send("ms", "big", rid, vec![7; SIZE]).is_ok());
    }
    let end = Instant::now() + Duration::from_secs(60);
    while !receiver.is_finished() && Instant::now() < end {
        poll_all(&mut senders);
    }
    let (got, peak) = receiver.join().unwrap();
    assert_eq!(got, PEERS, "every message arrives");
    eprintln!("receiver's peak of live heap bytes: {peak}");
    // One frame in progress and one delivered payload (7 MiB each), with room for rings and
    // tables; a buffer per waiting frame would be 42 MiB.
    assert!(peak < 20 << 20, "receiver held {peak} bytes");
}
