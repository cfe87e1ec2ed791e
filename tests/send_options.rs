//! A send option the application may reasonably pass (`expire_after: Duration::MAX`,
//! "never expire") must not panic the reactor by overflowing the clock.

use std::time::Duration;

use mm_platform::identity::Identity;
use mm_platform::{Platform, SendOptions};

#[test]
fn a_real_time_send_that_never_expires_does_not_overflow_the_clock() {
    let mut p = Platform::builder().build().unwrap();
    let dest = Identity::generate().sign_id();
    let status = p.messaging().send_with(
        "a.b",
        dest,
        &1,
        SendOptions {
            realtime: true,
            expire_after: Some(Duration::MAX),
        },
    );
    assert!(status.is_queued(), "{status}");
    p.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(p.queued_for(&dest), 1);
}
