//! The directory remembers the nodeInfos of the peers a node talked to or holds offline
//! messages for, in its storage: an offline message is delivered after both ends restart
//! without the application publishing the receiver's nodeInfo again.

mod support;

use std::time::{Duration, Instant};
use support::{offline, quick};

use mm_platform::identity::Identity;
use mm_platform::storage::FileStore;
use mm_platform::Platform;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mm-peers-remembered-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn an_offline_message_arrives_after_both_nodes_restart_without_the_applications_help() {
    let (da, db) = (dir("a"), dir("b"));
    let ib = Identity::generate();
    // B runs once (its store keeps its listen addresses), then goes down.
    let b_info = {
        let b0 = Platform::builder()
            .identity(ib.clone())
            .storage(FileStore::open(&db).unwrap())
            .build()
            .unwrap();
        b0.node_info()
    };
    // A learns B's nodeInfo from the application, sends while B is down, and stops.
    {
        let mut a = Platform::builder()
            .storage(FileStore::open(&da).unwrap())
            .net(quick())
            .build()
            .unwrap();
        let _ = a.messaging().send("transports.nodeInfo", "local", &b_info);
        let st = a
            .messaging()
            .send_with("test.later", ib.sign_id(), &"hello", offline());
        assert!(st.is_ok());
        let until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < until {
            a.poll(Some(Duration::from_millis(5))).unwrap();
        }
        assert_eq!(a.offline_pending(), 1);
    }
    // Both restart; nobody publishes B's nodeInfo.
    let mut a = Platform::builder()
        .storage(FileStore::open(&da).unwrap())
        .net(quick())
        .build()
        .unwrap();
    assert_eq!(a.offline_pending(), 1, "the record survived");
    let mut b = Platform::builder()
        .identity(ib)
        .storage(FileStore::open(&db).unwrap())
        .build()
        .unwrap();
    let (_, rx) = b.messaging().on_channel("public.test.later", 8);
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    while (got.is_empty() || a.offline_pending() > 0) && Instant::now() < end {
        a.poll(Some(Duration::from_millis(2))).unwrap();
        b.poll(Some(Duration::from_millis(2))).unwrap();
        got.extend(rx.try_iter());
    }
    assert_eq!(got.len(), 1, "delivered after both restarted");
    assert_eq!(got[0].json::<String>().unwrap(), "hello");
    assert_eq!(a.offline_pending(), 0, "and acknowledged");
    let _ = std::fs::remove_dir_all(&da);
    let _ = std::fs::remove_dir_all(&db);
}
