//! The reactor: Handle wake-ups and shutdown from other threads, non-blocking polls, timers,
//! deadlines and events.

use mm_platform::Shared;
use std::time::Duration;

use mm_platform::{Event, Limits, Platform, SendError};

fn started() -> Platform {
    // Without transports: the listeners' key rotation would add its own deadlines.
    let mut p = Platform::builder().transports(false).build().unwrap();
    p.poll(Some(Duration::ZERO)).unwrap();
    p
}

#[test]
fn handle_wakes_a_blocked_poll() {
    let mut p = started();
    let (_, rx) = p.messaging().on_channel("self.wake", 4);
    let handle = p.handle();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        handle.send_json("wake", "local", &"up")
    });
    // Nothing is pending and there is no timer before a minute: only the waker can end this.
    p.poll(Some(Duration::from_secs(60))).unwrap();
    assert_eq!(t.join().unwrap(), Ok(()));
    // The wake-up may arrive while the reactor was between turns: allow a few bounded turns.
    for _ in 0..5 {
        if !rx.is_empty() {
            break;
        }
        p.poll(Some(Duration::from_secs(60))).unwrap();
    }
    assert_eq!(rx.try_recv().unwrap().json::<String>().unwrap(), "up");
}

#[test]
fn handle_shutdown_stops_run_and_messages_from_many_threads_arrive() {
    let mut p = started();
    let (_, rx) = p.on_channel("self.n.*", 1000);
    let handle = p.handle();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let h = handle.clone();
            std::thread::spawn(move || {
                for i in 0..100u32 {
                    assert_eq!(
                        h.send("ms", format!("n.{t}"), "local", i.to_le_bytes().to_vec()),
                        Ok(())
                    );
                }
            })
        })
        .collect();
    let stopper = std::thread::spawn(move || {
        for t in threads {
            t.join().unwrap();
        }
        handle.shutdown();
    });
    p.run().unwrap();
    stopper.join().unwrap();
    // Messages queued before the shutdown request may still be in the channel: drain them.
    for _ in 0..10 {
        p.poll(Some(Duration::ZERO)).unwrap();
    }
    let msgs: Vec<_> = rx.try_iter().collect();
    assert_eq!(msgs.len(), 400);
    for t in 0..4 {
        let seq: Vec<u32> = msgs
            .iter()
            .filter(|m| m.topic == format!("n.{t}"))
            .map(|m| u32::from_le_bytes(m.payload[..4].try_into().unwrap()))
            .collect();
        assert_eq!(seq, (0..100).collect::<Vec<u32>>(), "per-thread order kept");
    }
    assert!(p.is_shut_down());
}

#[test]
fn handle_reports_full_queue_remote_destinations_and_a_closed_platform() {
    let mut p = Platform::builder()
        .transports(false)
        .limits(Limits {
            handle_queue: 3,
            ..Limits::default()
        })
        .build()
        .unwrap();
    let h = p.handle();
    for _ in 0..3 {
        assert_eq!(h.send("ms", "x", "local", vec![]), Ok(()));
    }
    assert_eq!(
        h.send("ms", "x", "local", vec![]),
        Err(SendError::BufferFull)
    );
    let stranger = mm_platform::identity::Identity::generate().sign_id();
    assert_eq!(
        h.send("ms", "x", stranger, vec![]),
        Err(SendError::NoTransport)
    );
    assert_eq!(
        h.send("ms", "x", h.sign_id(), vec![]),
        Err(SendError::BufferFull)
    );
    p.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(h.send("ms", "x", h.sign_id(), vec![]), Ok(()));
    drop(p);
    assert_eq!(h.send("ms", "x", "local", vec![]), Err(SendError::Closed));
}

#[test]
fn handle_respects_a_full_local_queue() {
    let mut p = Platform::builder()
        .limits(Limits {
            local_queue: 10,
            ..Limits::default()
        })
        .build()
        .unwrap();
    p.poll(Some(Duration::ZERO)).unwrap();
    let (_, rx) = p.on_channel("self.q", 100);
    let h = p.handle();
    for _ in 0..25 {
        assert!(h.send("ms", "q", "local", vec![]).is_ok());
    }
    let mut per_turn = Vec::new();
    for _ in 0..4 {
        p.poll(Some(Duration::ZERO)).unwrap();
        per_turn.push(rx.try_iter().count());
    }
    assert_eq!(
        per_turn,
        vec![10, 10, 5, 0],
        "leftovers wait in the handle channel"
    );
}

#[test]
fn poll_zero_never_blocks_and_timers_fire_in_order() {
    let mut p = started();
    let fired = Shared::new(Vec::new());
    let f = fired.clone();
    let far = p.after(Duration::from_secs(3600), move |_ctx| {
        f.borrow_mut().push("far")
    });
    let deadline = p.next_deadline().unwrap();
    // The earliest timer is the 5-minute nodeInfo republication.
    assert!(deadline > std::time::Instant::now() + Duration::from_secs(200));
    // A blocking poll here would wait minutes; these return at once.
    for _ in 0..100 {
        p.poll(Some(Duration::ZERO)).unwrap();
    }
    assert!(fired.borrow().is_empty());
    assert!(p.cancel_timer(far));
    assert!(!p.cancel_timer(far));
    for (name, ms) in [("c", 3), ("a", 1), ("b", 2)] {
        let f = fired.clone();
        p.after(Duration::from_millis(ms), move |ctx| {
            f.borrow_mut().push(name);
            if name == "c" {
                let f2 = f.clone();
                ctx.after(Duration::ZERO, move |_| f2.borrow_mut().push("from-timer"));
            }
        });
    }
    for _ in 0..1000 {
        if fired.borrow().len() == 4 {
            break;
        }
        p.poll(Some(Duration::from_millis(100))).unwrap();
    }
    assert_eq!(*fired.borrow(), vec!["a", "b", "c", "from-timer"]);
}

#[test]
fn next_deadline_is_now_when_work_is_pending() {
    let mut p = started();
    let _ = p.send("ms", "x", "local", vec![]);
    let d = p.next_deadline().unwrap();
    assert!(d <= std::time::Instant::now());
    p.poll(Some(Duration::ZERO)).unwrap();
    // Only the 5-minute nodeInfo timer is left.
    assert!(p.next_deadline().unwrap() > std::time::Instant::now() + Duration::from_secs(200));
}

#[test]
fn events_by_batch_channel_and_callback() {
    let mut p = Platform::builder()
        .limits(Limits {
            event_batch: 5,
            ..Limits::default()
        })
        .build()
        .unwrap();
    let rx = p.event_channel(100);
    let seen = Shared::new(Vec::new());
    let s = seen.clone();
    p.on_event(move |_ctx, ev| {
        s.borrow_mut().push(match ev {
            Event::Ready => "ready".to_string(),
            Event::Message(m) => m.scoped_topic(),
            other => format!("{other:?}"),
        })
    });
    p.poll(Some(Duration::ZERO)).unwrap();
    let batch: Vec<Event> = p.drain_events().collect();
    assert_eq!(batch[0], Event::Ready);
    assert_eq!(batch.len(), 5); // Ready + 4 start-up messages
    assert_eq!(
        *seen.borrow(),
        vec![
            "ready",
            "self.friends.updateRequest",
            "self.devices.updateRequest",
            "self.transports.myNodeInfo",
            "self.transports.requestBootstrapNodeInfo"
        ]
    );
    assert_eq!(rx.try_iter().count(), 5);
    for _ in 0..10 {
        let _ = p.send("bt", "hash", "local", vec![1]);
    }
    p.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(p.drain_events().count(), 5);
    assert_eq!(p.stats().events_dropped, 5);
    p.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(p.drain_events().count(), 0);
    assert!(
        !seen.borrow().iter().skip(5).any(|e| e == "ready"),
        "Ready fires once"
    );
}

#[test]
fn poll_fd_is_exposed() {
    use std::os::unix::io::AsRawFd;
    let p = started();
    assert!(p.as_raw_fd() >= 0);
}

#[test]
fn callbacks_can_shut_the_loop_down() {
    let mut p = started();
    p.on("self.stop", |ctx, _| ctx.shutdown());
    let _ = p.send("ms", "stop", "local", vec![]);
    p.run().unwrap();
    assert!(p.is_shut_down());
}

#[test]
fn handles_messages_and_events_cross_threads() {
    fn send_clone<T: Send + Clone + 'static>() {}
    send_clone::<mm_platform::Handle>();
    send_clone::<mm_platform::Message>();
    send_clone::<Event>();
    let p = started();
    let h = p.handle();
    let id = std::thread::spawn(move || h.sign_id()).join().unwrap();
    assert_eq!(id, p.sign_id());
}
