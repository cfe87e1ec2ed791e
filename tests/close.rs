//! `Platform::close`: a sender that closes before it is dropped loses nothing. With the
//! receiver up, 1 MiB over `bt` and 100 non-real-time messages all arrive although the sender
//! is dropped right after `close`; with the receiver down, the non-real-time messages stay in
//! the sender's storage and arrive after both restart (the real-time one is reported dropped).

mod support;

use mm_platform::Shared;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use support::{offline, quick};

use mm_platform::identity::Identity;
use mm_platform::storage::FileStore;
use mm_platform::{DeliveryError, Platform, SendOptions};

const BULK: usize = 1 << 20;
const MESSAGES: usize = 100;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mm-close-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs a receiver on its own thread (its platform is built there): sends its nodeInfo on
/// `info`, then polls until it has `bulk` bytes and `MESSAGES` messages or `limit` passed.
/// Returns (bytes, messages in order of arrival).
fn receiver(
    id: Identity,
    store: std::path::PathBuf,
    info: mpsc::Sender<serde_json::Value>,
    bulk: usize,
    limit: Duration,
) -> thread::JoinHandle<(usize, Vec<i64>)> {
    thread::spawn(move || {
        let mut b = Platform::builder()
            .identity(id)
            .storage(FileStore::open(&store).unwrap())
            .build()
            .unwrap();
        let bytes = Shared::new(0usize);
        let n = bytes.clone();
        b.torrenting()
            .on_bytes("public.bulk.*", move |_c, _m, data| {
                n.set(n.get() + data.len())
            });
        let (_, rx) = b.messaging().on_channel("public.note.*", 2 * MESSAGES);
        info.send(b.node_info().to_json()).unwrap();
        let mut got = Vec::new();
        let end = Instant::now() + limit;
        while (bytes.get() < bulk || got.len() < MESSAGES) && Instant::now() < end {
            b.poll(Some(Duration::from_millis(5))).unwrap();
            got.extend(rx.try_iter().map(|m| m.json::<i64>().unwrap()));
        }
        // A little longer: nothing arrives twice.
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            b.poll(Some(Duration::from_millis(5))).unwrap();
            got.extend(rx.try_iter().map(|m| m.json::<i64>().unwrap()));
        }
        (bytes.get(), got)
    })
}

type Outcome = Shared<Option<Result<(), DeliveryError>>>;

/// Sends `BULK` bytes over `bt` (real-time) and `MESSAGES` non-real-time messages; returns the
/// bulk message's delivery outcome and the number of messages whose delivery succeeded (their
/// callbacks, through `messaging().send_with_callback`).
fn send_all(a: &mut Platform, to: &Identity) -> (Outcome, Shared<usize>) {
    let outcome = Shared::new(None);
    let o = outcome.clone();
    let st = a.torrenting().send_with_callback(
        "bulk.file",
        to.sign_id(),
        &vec![7u8; BULK],
        SendOptions::default(),
        move |_c, r| *o.borrow_mut() = Some(r),
    );
    st.expect("queued");
    let delivered = Shared::new(0);
    for i in 0..MESSAGES {
        let d = delivered.clone();
        let st = a.messaging().send_with_callback(
            "note.n",
            to.sign_id(),
            &(i as i64),
            offline(),
            move |_c, r| {
                if r.is_ok() {
                    d.set(d.get() + 1);
                }
            },
        );
        st.expect("queued");
    }
    (outcome, delivered)
}

#[test]
fn what_was_sent_before_close_arrives_after_the_sender_is_dropped() {
    let (da, db) = (dir("up-a"), dir("up-b"));
    let ib = Identity::generate();
    let (tx, rx) = mpsc::channel();
    let recv = receiver(ib.clone(), db.clone(), tx, BULK, Duration::from_secs(30));
    let b_info = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut a = Platform::builder()
        .storage(FileStore::open(&da).unwrap())
        .net(quick())
        .build()
        .unwrap();
    let _ = a.messaging().send("transports.nodeInfo", "local", &b_info);
    let (bulk, delivered) = send_all(&mut a, &ib);
    let report = a.close(Instant::now() + Duration::from_secs(20)).unwrap();
    assert_eq!(
        delivered.get(),
        MESSAGES,
        "every delivery callback ran, with success"
    );
    let outcome = bulk.borrow().clone();
    assert!(
        matches!(outcome, Some(Ok(()))),
        "bulk acknowledged: {outcome:?}"
    );
    assert!(report.idle, "{report:?}");
    assert_eq!(report.delivered, MESSAGES as u64, "{report:?}");
    assert_eq!(report.persisted, 0);
    assert_eq!(report.dropped, 0);
    assert_eq!(report.unacknowledged_bytes, 0);
    assert!(a.is_idle());
    assert_eq!(a.offline_pending(), 0);
    drop(a);
    let (bytes, got) = recv.join().unwrap();
    assert_eq!(bytes, BULK, "every byte");
    assert_eq!(
        got,
        (0..MESSAGES as i64).collect::<Vec<_>>(),
        "every message, once"
    );
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}

#[test]
fn with_the_receiver_down_close_keeps_the_non_realtime_messages_for_the_next_run() {
    let (da, db) = (dir("down-a"), dir("down-b"));
    let ib = Identity::generate();
    // B runs once (its store keeps its listen addresses), then goes down.
    let b_info = {
        let b0 = Platform::builder()
            .identity(ib.clone())
            .storage(FileStore::open(&db).unwrap())
            .build()
            .unwrap();
        b0.node_info().to_json()
    };
    {
        let mut a = Platform::builder()
            .storage(FileStore::open(&da).unwrap())
            .net(quick())
            .build()
            .unwrap();
        let _ = a.messaging().send("transports.nodeInfo", "local", &b_info);
        let (bulk, _) = send_all(&mut a, &ib);
        let report = a.close(Instant::now() + Duration::from_secs(2)).unwrap();
        assert!(!report.idle, "{report:?}");
        assert_eq!(report.delivered, 0, "{report:?}");
        assert_eq!(report.persisted, MESSAGES, "{report:?}");
        // The real-time message is reported: still queued (dropped), or failed already
        // (its destination failed all its connection attempts).
        let outcome = bulk.borrow().clone();
        match outcome {
            None => assert_eq!(report.dropped, 1, "{report:?}"),
            Some(r) => assert!(r.is_err(), "{r:?}"),
        }
    }
    // Both restart; nobody publishes B's nodeInfo again.
    let a = Platform::builder()
        .storage(FileStore::open(&da).unwrap())
        .net(quick())
        .build()
        .unwrap();
    assert_eq!(a.offline_pending(), MESSAGES);
    let (tx, rx) = mpsc::channel();
    let recv = receiver(ib.clone(), db.clone(), tx, 0, Duration::from_secs(20));
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut a = a;
    let end = Instant::now() + Duration::from_secs(20);
    while a.offline_pending() > 0 && Instant::now() < end {
        a.poll(Some(Duration::from_millis(5))).unwrap();
    }
    let report = a.close(Instant::now() + Duration::from_secs(5)).unwrap();
    assert!(report.idle, "{report:?}");
    drop(a);
    let (bytes, got) = recv.join().unwrap();
    assert_eq!(bytes, 0, "the real-time message was dropped, as reported");
    assert_eq!(
        got,
        (0..MESSAGES as i64).collect::<Vec<_>>(),
        "every message, once"
    );
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}
