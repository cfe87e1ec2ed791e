//! Partly received frames share one memory budget (`NetConfig::frame_budget`): several peers
//! sending large frames at once never make the receiver reserve more than the budget, and
//! every frame still arrives (connections paused for the budget are woken up again).

use std::time::{Duration, Instant};

use mm_platform::{NetConfig, Platform};

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
            assert!(s.send(rid, "ms", "big", vec![i; BIG]).is_queued());
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
