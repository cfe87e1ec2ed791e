//! A platform is `Send`: built on one thread, polled on another (a game's network thread, a
//! GUI's worker), with its callbacks, storage, directory and services moving with it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mm_platform::storage::MemStore;
use mm_platform::{Platform, PlatformBuilder};

fn assert_send<T: Send>() {}

#[test]
fn platform_and_builder_are_send() {
    assert_send::<Platform>();
    assert_send::<PlatformBuilder>();
    assert_send::<mm_platform::Handle>();
}

#[test]
fn a_platform_built_on_one_thread_runs_on_another() {
    let got = Arc::new(AtomicUsize::new(0));
    let g = got.clone();
    let builder = Platform::builder().storage(MemStore::new());
    // The builder crosses a thread, then the platform another.
    let mut platform = std::thread::spawn(move || builder.build().expect("platform"))
        .join()
        .expect("build thread");
    platform
        .messaging()
        .on("self.work.item", move |_ctx, _msg, n: usize| {
            g.fetch_add(n, Ordering::SeqCst);
        });
    let handle = platform.handle();
    let seen = got.clone();
    let worker = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.load(Ordering::SeqCst) < 6 && Instant::now() < deadline {
            platform
                .poll(Some(Duration::from_millis(10)))
                .expect("poll");
        }
        platform
    });
    for n in [1usize, 2, 3] {
        assert!(handle.send_json("work.item", "local", &n).is_ok());
    }
    let platform = worker.join().expect("worker thread");
    assert_eq!(got.load(Ordering::SeqCst), 6);
    drop(platform);
}
