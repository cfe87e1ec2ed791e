//! A fixed 60 Hz game loop that drives the platform with `poll(Some(Duration::ZERO))` once a
//! frame (never blocking), while another thread sends input through a `Handle`.
//!
//! Run: `cargo run --example game_loop`. It runs 120 frames (about two seconds) and exits.

use mm_platform::Shared;
use std::time::{Duration, Instant};

use mm_platform::Platform;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Input {
    frame_hint: u32,
    dx: i32,
    dy: i32,
}

const FRAMES: u32 = 120;
const FRAME: Duration = Duration::from_nanos(1_000_000_000 / 60);

fn main() {
    let mut platform = Platform::builder().build().expect("platform");
    let (_, inputs) = platform.messaging().on_channel("self.input.*", 1024);

    // The game's own per-frame state is updated by a callback too.
    let position = Shared::new((0i32, 0i32));
    let pos = position.clone();
    platform
        .messaging()
        .on("self.input.move", move |_ctx, _msg, input: Input| {
            let (x, y) = pos.get();
            pos.set((x + input.dx, y + input.dy));
        });

    // Input thread: sends a move every ~10 ms for a second, then stops.
    let handle = platform.handle();
    let input_thread = std::thread::spawn(move || {
        let mut sent = 0;
        for i in 0..100u32 {
            let input = Input {
                frame_hint: i,
                dx: 1,
                dy: if i % 2 == 0 { 1 } else { -1 },
            };
            if handle.send_json("input.move", "local", &input).is_ok() {
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        sent
    });

    let start = Instant::now();
    let mut next_frame = start;
    let mut received = 0usize;
    let mut busy_frames = 0;
    for frame in 0..FRAMES {
        platform.poll(Some(Duration::ZERO)).expect("poll");
        let n = inputs.try_iter().count();
        received += n;
        if n > 0 {
            busy_frames += 1;
        }
        if frame % 30 == 0 {
            println!(
                "frame {frame:3}: {received} inputs so far, position {:?}",
                position.get()
            );
        }
        next_frame += FRAME;
        let now = Instant::now();
        if next_frame > now {
            std::thread::sleep(next_frame - now);
        }
    }
    let sent = input_thread.join().expect("input thread");
    // Deliver whatever arrived during the last frame.
    platform.poll(Some(Duration::ZERO)).expect("poll");
    received += inputs.try_iter().count();
    println!(
        "{FRAMES} frames in {:.2?}: {sent} inputs sent, {received} received over {busy_frames} frames, final position {:?}",
        start.elapsed(),
        position.get()
    );
}
