//! Crash points: named steps of the delivery path where a test can make the process die as a
//! `SIGKILL` would (`MM_CRASH_AT=<point>[:<n>]` in the environment: the process kills itself
//! the `n`-th time, default the first, it reaches `<point>`).
//!
//! They exist so that the delivery guarantee (see [`crate::offline`]) is tested at every step
//! where a crash changes the outcome, with a real process death and real files, not a
//! simulation. Unset, a point costs one load of an initialised `OnceLock`.
//!
//! The points, in the order a non-real-time message passes them:
//!
//! - `sender.stream_acked`: the sender saw the receiver's stream acknowledge the message's
//!   bytes (its record is kept).
//! - `receiver.dispatched`: the receiver handed the message to its subscribers; its id is not
//!   stored yet, no acknowledgement sent.
//! - `receiver.stored`: the receiver stored the ids of the messages delivered; the delivery
//!   acknowledgement is not sent yet.
//! - `sender.acked`: the sender received the delivery acknowledgement; the record is not
//!   deleted yet.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Plan {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let v = std::env::var("MM_CRASH_AT").ok()?;
        let (point, nth) = match v.split_once(':') {
            Some((p, n)) => (p.to_owned(), n.parse().ok()?),
            None => (v, 1),
        };
        Some(Plan {
            point,
            nth,
            seen: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// Kills the process (SIGKILL: no destructor, no flush) if `MM_CRASH_AT` names this point and
/// this is the chosen time it is reached.
pub(crate) fn reach(point: &str) {
    let Some(p) = plan() else { return };
    if p.point != point {
        return;
    }
    if p.seen.fetch_add(1, Ordering::Relaxed) + 1 == p.nth {
        log::warn!("MM_CRASH_AT: crashing at {point}");
        // SAFETY: kill(2) on our own pid; no memory is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
