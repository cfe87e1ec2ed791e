//! Disk faults are reported, never passed in silence: a full disk on send, a read-only disk
//! when delivered records are deleted, a failing de-duplication flush, offline records emptied,
//! truncated, garbled or with one flipped bit (reported, kept aside, never delivered corrupted),
//! and a deleted identity while other state remains (refused).
//!
//! Two ways of injecting faults: [`FaultStore`], a `Storage` wrapper returning io errors with
//! the raw OS codes ENOSPC / EROFS on demand (deterministic, no privileges), and, where root is
//! available, a real tiny tmpfs filled up or remounted read-only ([`Tmpfs`], unmounted when
//! dropped, pass or fail). Without root the tmpfs tests print a loud SKIPPING line, unless
//! `MM_REQUIRE_NETNS=1` (CI's "root tests required" switch), where they fail.

mod support;

use mm_platform::Shared;
use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{offline, quick};

use mm_platform::identity::{Identity, IdentityError, IDENTITY_KEY};
use mm_platform::storage::{
    FileStore, MemStore, Storage, StorageError, StorageFault, StorageFaultKind,
};
use mm_platform::{BuildError, Event, Message, Platform, SendError};
use serde_json::Value;

use support::TempDir;

/// Linux's "No space left on device".
const ENOSPC: i32 = 28;
/// Linux's "Read-only file system".
const EROFS: i32 = 30;

/// Which operations of a [`FaultStore`] fail, with which raw OS error (shared with the test).
#[derive(Clone, Default)]
struct Faults {
    put: Shared<Option<i32>>,
    del: Shared<Option<i32>>,
    /// Operations refused so far.
    refused: Shared<usize>,
}

/// A `Storage` around a shared [`MemStore`] whose `put` / `del` fail on demand.
struct FaultStore {
    inner: Shared<MemStore>,
    faults: Faults,
}

impl FaultStore {
    fn new() -> (FaultStore, Shared<MemStore>, Faults) {
        let inner = Shared::new(MemStore::new());
        let faults = Faults::default();
        let store = FaultStore {
            inner: inner.clone(),
            faults: faults.clone(),
        };
        (store, inner, faults)
    }

    fn check(&self, fault: &Shared<Option<i32>>) -> Result<(), StorageError> {
        match fault.get() {
            Some(code) => {
                self.faults.refused.set(self.faults.refused.get() + 1);
                Err(StorageError::Io(io::Error::from_raw_os_error(code)))
            }
            None => Ok(()),
        }
    }
}

impl Storage for FaultStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.borrow().get(key)
    }
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.check(&self.faults.put)?;
        self.inner.borrow_mut().put(key, value)
    }
    fn del(&mut self, key: &str) -> Result<(), StorageError> {
        self.check(&self.faults.del)?;
        self.inner.borrow_mut().del(key)
    }
    fn keys(&self) -> Result<Vec<String>, StorageError> {
        self.inner.borrow().keys()
    }
}

/// A tiny tmpfs mounted on a fresh directory; unmounted (and the directory removed) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts one of `size` (e.g. `"256k"`). Without the privilege to mount: a loud SKIPPING
    /// line and `None`, or a panic when `MM_REQUIRE_NETNS=1`.
    fn mount(test: &str, size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(format!(
            "mm-tmpfs-{test}-{}-{:x}",
            std::process::id(),
            mm_platform::proto::crypto::random_u64()
        ));
        fs::create_dir_all(&dir).expect("create mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output();
        let err = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => format!("mount: {e}"),
        };
        let _ = fs::remove_dir(&dir);
        if std::env::var("MM_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("{test}: cannot mount a tmpfs ({err}) and MM_REQUIRE_NETNS=1");
        }
        mm_platform::proto::skip_test(
            test,
            &format!(
                "cannot mount a tmpfs ({err}).\n\
                 *** Real-disk fault tests need root; CI sets MM_REQUIRE_NETNS=1."
            ),
        );
        None
    }

    fn remount(&self, mode: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "remount {mode} of {}", self.dir.display());
    }

    /// Fills the file system: writes a filler file until the write fails with ENOSPC.
    fn fill(&self) {
        use std::io::Write;
        let mut f = fs::File::create(self.dir.join(".filler")).expect("create filler");
        let block = [0u8; 4096];
        for _ in 0..1_000_000 {
            match f.write_all(&block) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(ENOSPC), "filling: {e}");
                    return;
                }
            }
        }
        panic!("the tmpfs never filled up");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a test failed while something had a file open): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// A node that ran once (so its ports and nodeInfo are known) and is now down.
struct DownPeer {
    id: Identity,
    info: Value,
    listen: Value,
}

fn down_peer() -> DownPeer {
    let id = Identity::generate();
    let b0 = Platform::builder().identity(id.clone()).build().unwrap();
    let (info, listen) = (b0.node_info().to_json(), b0.connection_info());
    drop(b0);
    DownPeer { id, info, listen }
}

impl DownPeer {
    fn start(&self, storage: impl Storage + 'static) -> Platform {
        Platform::builder()
            .identity(self.id.clone())
            .storage(storage)
            .connection_info(self.listen.clone())
            .build()
            .unwrap()
    }
}

fn sender(storage: impl Storage + 'static, peer: &DownPeer) -> Platform {
    let mut a = Platform::builder()
        .storage(storage)
        .net(quick())
        .build()
        .unwrap();
    let _ = a
        .messaging()
        .send("transports.nodeInfo", "local", &peer.info);
    a
}

/// Polls both until `done` or `limit`; returns the messages `b` got on `rx`.
fn exchange(
    a: &mut Platform,
    b: &mut Platform,
    rx: &crossbeam_channel::Receiver<Message>,
    limit: Duration,
    mut done: impl FnMut(&[Message], &Platform) -> bool,
) -> Vec<Message> {
    let mut got = Vec::new();
    let end = Instant::now() + limit;
    while !done(&got, a) && Instant::now() < end {
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
        got.extend(rx.try_iter());
    }
    got
}

/// The storage faults among `events`.
fn storage_faults(events: &[Event]) -> Vec<StorageFault> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StorageFault(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Full disk on send
// ---------------------------------------------------------------------------------------------

#[test]
fn a_send_on_a_full_disk_names_the_cause() {
    let peer = down_peer();
    let (store, inner, faults) = FaultStore::new();
    let mut a = sender(store, &peer);
    faults.put.set(Some(ENOSPC));
    let st = a
        .messaging()
        .send_with("test.full", peer.id.sign_id(), &1, offline());
    assert!(
        matches!(st, Err(SendError::StorageFailed(c)) if c.raw_os_error() == Some(ENOSPC)),
        "{st:?}"
    );
    let text = st.unwrap_err().to_string().to_lowercase();
    assert!(
        text.contains("no space left on device"),
        "the status names the cause: {text:?}"
    );
    assert_eq!(a.offline_pending(), 0, "nothing half-buffered");
    assert!(
        !inner
            .borrow()
            .keys()
            .unwrap()
            .iter()
            .any(|k| k.starts_with("offline-")),
        "no record written"
    );
    // Read-only: the other cause.
    faults.put.set(Some(EROFS));
    let st = a
        .messaging()
        .send_with("test.full", peer.id.sign_id(), &2, offline());
    let text = st.unwrap_err().to_string().to_lowercase();
    assert!(text.contains("read-only file system"), "{text}");
    // The disk has room again: the next send is buffered.
    faults.put.set(None);
    let st = a
        .messaging()
        .send_with("test.full", peer.id.sign_id(), &3, offline());
    st.expect("queued");
    assert_eq!(a.offline_pending(), 1);
}

#[test]
fn a_send_on_a_real_full_tmpfs_names_the_cause() {
    let Some(tmp) = Tmpfs::mount("full_tmpfs_send", "256k") else {
        return;
    };
    let peer = down_peer();
    let mut a = sender(FileStore::open(&tmp.dir).unwrap(), &peer);
    let st = a
        .messaging()
        .send_with("test.full", peer.id.sign_id(), &0, offline());
    st.expect("room before the disk fills: queued");
    tmp.fill();
    let st = a
        .messaging()
        .send_with("test.full", peer.id.sign_id(), &vec![7u8; 8192], offline());
    assert!(
        matches!(st, Err(SendError::StorageFailed(c)) if c.raw_os_error() == Some(ENOSPC)),
        "{st:?}"
    );
    let text = st.unwrap_err().to_string().to_lowercase();
    assert!(text.contains("no space left on device"), "{text}");
    assert_eq!(a.offline_pending(), 1, "only the first one");
    let temps: Vec<String> = file_names(&tmp.dir)
        .into_iter()
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "no temp file left: {temps:?}");
}

// ---------------------------------------------------------------------------------------------
// Read-only disk when delivered records are deleted
// ---------------------------------------------------------------------------------------------

/// Sends `n` offline messages from `a` to the down `peer`, brings the peer up and waits until
/// all arrived and were settled. Returns the peer and the events `a` raised meanwhile.
fn deliver_offline(
    a: &mut Platform,
    peer: &DownPeer,
    n: i64,
    before_up: impl FnOnce(),
) -> (Platform, Vec<i64>, Vec<Event>) {
    for i in 0..n {
        let st = a
            .messaging()
            .send_with("test.ro", peer.id.sign_id(), &i, offline());
        st.expect("queued");
    }
    a.poll(Some(Duration::ZERO)).unwrap();
    let _ = a.drain_events().count();
    before_up();
    let mut b = peer.start(MemStore::new());
    let (_, rx) = b.messaging().on_channel("*.test.ro", 64);
    let got = exchange(a, &mut b, &rx, Duration::from_secs(30), |got, a| {
        got.len() as i64 >= n && a.offline_pending() == 0
    });
    // A few more turns for the events of the last settlements.
    for _ in 0..20 {
        a.poll(Some(Duration::from_millis(1))).unwrap();
    }
    let values = got.iter().map(|m| m.json::<i64>().unwrap()).collect();
    let events = a.drain_events().collect();
    (b, values, events)
}

#[test]
fn a_delivered_record_that_cannot_be_deleted_is_reported() {
    let peer = down_peer();
    let (store, inner, faults) = FaultStore::new();
    let mut a = sender(store, &peer);
    let (_b, got, events) = deliver_offline(&mut a, &peer, 5, || faults.del.set(Some(EROFS)));
    assert_eq!(got, (0..5).collect::<Vec<i64>>(), "delivered once each");
    assert!(faults.refused.get() >= 5, "the deletes were tried");
    let reported = storage_faults(&events);
    assert_eq!(reported.len(), 5, "one report per record: {events:?}");
    for f in &reported {
        assert_eq!(f.kind, StorageFaultKind::Delete, "{f}");
        assert_eq!(f.os_error, Some(EROFS), "{f}");
        assert!(f.key.starts_with("offline-"), "{f}");
        assert!(f.to_string().contains("Read-only file system"), "{f}");
    }
    let left = inner
        .borrow()
        .keys()
        .unwrap()
        .into_iter()
        .filter(|k| k.starts_with("offline-"))
        .count();
    assert_eq!(
        left, 5,
        "still on disk (a restart resends, the receiver drops)"
    );
}

#[test]
fn a_real_read_only_remount_after_delivery_is_reported() {
    let Some(tmp) = Tmpfs::mount("ro_tmpfs_delete", "1m") else {
        return;
    };
    let peer = down_peer();
    let mut a = sender(FileStore::open(&tmp.dir).unwrap(), &peer);
    let (_b, got, events) = deliver_offline(&mut a, &peer, 5, || tmp.remount("ro"));
    assert_eq!(got, (0..5).collect::<Vec<i64>>());
    let reported = storage_faults(&events);
    assert_eq!(reported.len(), 5, "{events:?}");
    for f in &reported {
        assert_eq!(
            (f.kind, f.os_error),
            (StorageFaultKind::Delete, Some(EROFS)),
            "{f}"
        );
        assert!(f.cause.contains("Read-only file system"), "{f}");
    }
    let left = file_names(&tmp.dir)
        .into_iter()
        .filter(|n| n.starts_with("offline-"))
        .count();
    assert_eq!(left, 5);
    tmp.remount("rw");
}

// ---------------------------------------------------------------------------------------------
// Damaged offline records
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Damage {
    Emptied,
    Truncated,
    Garbled,
    FlippedPayloadBit,
}

/// The payload marker of message `i`: found in its record to damage it.
fn payload(i: usize) -> String {
    format!("payload-{i:04}-abcdefghijklmnopqrstuvwxyz")
}

/// Buffers `n` messages in a `FileStore`, damages the records of the first `damages.len()`
/// messages on disk, restarts the sender and delivers. Returns what arrived, the sender's
/// events and its directory's files afterwards.
fn damage_and_deliver(
    test: &str,
    n: usize,
    damages: &[Damage],
) -> (Vec<String>, Vec<Event>, Vec<String>, TempDir) {
    let dir = TempDir::new(test);
    let peer = down_peer();
    {
        let mut a = sender(FileStore::open(&dir.0).unwrap(), &peer);
        for i in 0..n {
            let st =
                a.messaging()
                    .send_with("test.damaged", peer.id.sign_id(), &payload(i), offline());
            st.expect("queued");
        }
    }
    for (i, damage) in damages.iter().enumerate() {
        let marker = payload(i);
        let path = file_names(&dir.0)
            .into_iter()
            .filter(|n| n.starts_with("offline-"))
            .map(|n| dir.0.join(n))
            .find(|p| {
                let v = fs::read(p).unwrap();
                v.windows(marker.len()).any(|w| w == marker.as_bytes())
            })
            .expect("the record of the message");
        let mut v = fs::read(&path).unwrap();
        match damage {
            Damage::Emptied => v.clear(),
            Damage::Truncated => v.truncate(v.len() / 2),
            Damage::Garbled => {
                let mid = v.len() / 3;
                for (k, b) in v[mid..mid + 20].iter_mut().enumerate() {
                    *b = (k as u8).wrapping_mul(97) ^ 0x5a;
                }
            }
            Damage::FlippedPayloadBit => {
                let at = v
                    .windows(marker.len())
                    .position(|w| w == marker.as_bytes())
                    .unwrap();
                v[at + 8] ^= 0x01; // "payload-0000-..." becomes "payload-1000-..."
            }
        }
        fs::write(&path, &v).unwrap();
    }
    let mut a = sender(FileStore::open(&dir.0).unwrap(), &peer);
    let mut b = peer.start(MemStore::new());
    let (_, rx) = b.messaging().on_channel("*.test.damaged", 64);
    let want = n - damages.len();
    let got = exchange(&mut a, &mut b, &rx, Duration::from_secs(30), |got, a| {
        got.len() >= want && a.offline_pending() == 0
    });
    // Anything else that might still arrive (it must not).
    let end = Instant::now() + Duration::from_millis(700);
    let mut late = Vec::new();
    while Instant::now() < end {
        a.poll(Some(Duration::from_millis(1))).unwrap();
        b.poll(Some(Duration::from_millis(1))).unwrap();
        late.extend(rx.try_iter());
    }
    let values = got
        .iter()
        .chain(&late)
        .map(|m| m.json::<String>().unwrap())
        .collect();
    let events = a.drain_events().collect();
    let files = file_names(&dir.0);
    (values, events, files, dir)
}

#[test]
fn emptied_truncated_and_garbled_records_are_reported_and_kept_aside() {
    let damages = [Damage::Emptied, Damage::Truncated, Damage::Garbled];
    let (got, events, files, _dir) = damage_and_deliver("damaged", 10, &damages);
    let expected: HashSet<String> = (3..10).map(payload).collect();
    assert_eq!(
        got.iter().cloned().collect::<HashSet<_>>(),
        expected,
        "the intact records, each once, nothing damaged: {got:?}"
    );
    assert_eq!(got.len(), 7);
    let kept: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("damaged-offline-"))
        .collect();
    assert_eq!(kept.len(), 3, "kept aside: {files:?}");
    let reported = storage_faults(&events);
    assert_eq!(
        reported.len(),
        3,
        "one report per damaged record: {events:?}"
    );
    for f in &reported {
        assert_eq!(f.kind, StorageFaultKind::Damaged, "{f}");
        let aside = format!("damaged-{}", f.key);
        assert_eq!(f.kept_as.as_deref(), Some(&aside[..]), "{f}");
        assert!(kept.contains(&&aside), "{aside} in {kept:?}");
    }
    let mut causes: Vec<&str> = reported.iter().map(|f| f.cause.as_str()).collect();
    causes.sort();
    assert_eq!(
        causes,
        [
            "checksum mismatch (damaged or truncated record)",
            "checksum mismatch (damaged or truncated record)",
            "empty record"
        ]
    );
    assert!(
        !files.iter().any(|f| f.starts_with("offline-")),
        "no damaged record left in the buffer: {files:?}"
    );
}

#[test]
fn one_flipped_payload_bit_is_detected_and_never_delivered() {
    let (got, events, files, _dir) = damage_and_deliver("bitflip", 3, &[Damage::FlippedPayloadBit]);
    assert_eq!(
        got,
        vec![payload(1), payload(2)],
        "the corrupted payload is not delivered"
    );
    assert_eq!(
        files
            .iter()
            .filter(|f| f.starts_with("damaged-offline-"))
            .count(),
        1,
        "{files:?}"
    );
    let reported = storage_faults(&events);
    assert_eq!(reported.len(), 1, "{events:?}");
    assert_eq!(reported[0].kind, StorageFaultKind::Damaged);
    assert!(reported[0].cause.contains("checksum"), "{}", reported[0]);
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

#[test]
fn a_deleted_identity_is_refused_while_other_state_exists() {
    let dir = TempDir::new("lost-identity");
    let peer = down_peer();
    let first = {
        let mut a = sender(FileStore::open(&dir.0).unwrap(), &peer);
        let st = a
            .messaging()
            .send_with("test.id", peer.id.sign_id(), &1, offline());
        assert!(st.is_ok());
        a.sign_id()
    };
    fs::remove_file(dir.0.join("identity")).unwrap();
    let before = file_names(&dir.0);
    let err = match Platform::builder()
        .storage(FileStore::open(&dir.0).unwrap())
        .build()
    {
        Ok(p) => panic!("a new identity {} replaced {first} in silence", p.sign_id()),
        Err(e) => e,
    };
    assert!(
        matches!(
            &err,
            BuildError::Identity(IdentityError::Missing { keys: 2, .. })
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("identity") && text.contains("connectionInfo") && text.contains("offline-"),
        "{text}"
    );
    assert!(
        text.contains("allow_new_identity"),
        "says what to do: {text}"
    );
    assert_eq!(file_names(&dir.0), before, "nothing written by the refusal");
    // Asked for explicitly: a new node, which keeps the state (its queued message).
    let p = Platform::builder()
        .storage(FileStore::open(&dir.0).unwrap())
        .allow_new_identity(true)
        .build()
        .unwrap();
    assert_ne!(p.sign_id(), first);
    assert_eq!(p.offline_pending(), 1);
    assert!(
        dir.0.join(IDENTITY_KEY).is_file(),
        "the new identity is stored"
    );
    let new = p.sign_id();
    drop(p);
    // And it is the node's identity from now on.
    let again = Platform::builder()
        .storage(FileStore::open(&dir.0).unwrap())
        .build()
        .unwrap();
    assert_eq!(again.sign_id(), new);
}

#[test]
fn a_receiver_whose_identity_was_deleted_is_refused_too() {
    let (mut store, _inner, _faults) = FaultStore::new();
    store.put("dedup2-0", &[0; 8]).unwrap();
    let err = Platform::builder().storage(store).build().err();
    assert!(
        matches!(
            err,
            Some(BuildError::Identity(IdentityError::Missing { keys: 1, .. }))
        ),
        "{err:?}"
    );
    // An empty storage is a new node: no question asked.
    assert!(Platform::builder().storage(MemStore::new()).build().is_ok());
}

// ---------------------------------------------------------------------------------------------
// De-duplication memory of a receiver on a full disk
// ---------------------------------------------------------------------------------------------

#[test]
fn a_failing_dedup_flush_is_reported_and_its_ids_are_written_later() {
    let peer = down_peer();
    let (store, inner, faults) = FaultStore::new();
    let mut b = peer.start(store);
    faults.put.set(Some(ENOSPC));
    let mut a = sender(MemStore::new(), &peer);
    let (_, rx) = b.messaging().on_channel("*.test.dedup", 64);
    for i in 0..3 {
        let st = a
            .messaging()
            .send_with("test.dedup", peer.id.sign_id(), &i, offline());
        assert!(st.is_ok());
    }
    let got = exchange(&mut a, &mut b, &rx, Duration::from_secs(30), |got, a| {
        got.len() >= 3 && a.offline_pending() == 0
    });
    assert_eq!(got.len(), 3);
    // The flush runs on a half-second timer.
    let end = Instant::now() + Duration::from_secs(3);
    let mut events = Vec::new();
    while storage_faults(&events).is_empty() && Instant::now() < end {
        a.poll(Some(Duration::from_millis(5))).unwrap();
        b.poll(Some(Duration::from_millis(5))).unwrap();
        events.extend(b.drain_events());
    }
    // A few more flush periods with messages arriving: still failing, not reported again.
    let mut sent = 3;
    let end = Instant::now() + Duration::from_millis(1200);
    let mut next = Instant::now();
    while Instant::now() < end && sent < 40 {
        if Instant::now() >= next {
            let st = a
                .messaging()
                .send_with("test.dedup", peer.id.sign_id(), &sent, offline());
            st.expect("queued");
            sent += 1;
            next += Duration::from_millis(50);
        }
        a.poll(Some(Duration::from_millis(5))).unwrap();
        b.poll(Some(Duration::from_millis(5))).unwrap();
        events.extend(b.drain_events());
    }
    let rest = exchange(&mut a, &mut b, &rx, Duration::from_secs(30), |got, a| {
        got.len() + 3 >= sent && a.offline_pending() == 0
    });
    assert_eq!(rest.len() + 3, sent, "every message delivered once");
    events.extend(b.drain_events());
    let reported = storage_faults(&events);
    assert_eq!(reported.len(), 1, "reported once: {reported:?}");
    let f = &reported[0];
    assert_eq!(
        (f.kind, f.os_error),
        (StorageFaultKind::Write, Some(ENOSPC)),
        "{f}"
    );
    assert!(f.key.starts_with("dedup2-"), "names the key: {f}");
    assert!(f.cause.contains("No space left on device"), "{f}");
    assert!(
        !inner
            .borrow()
            .keys()
            .unwrap()
            .iter()
            .any(|k| k.starts_with("dedup2-")),
        "nothing written yet"
    );
    // Room again: the next message's flush writes the earlier ids too.
    faults.put.set(None);
    let st = a
        .messaging()
        .send_with("test.dedup", peer.id.sign_id(), &sent, offline());
    assert!(st.is_ok());
    sent += 1;
    // Chunk layout: sequence (8), then per id: sender (32), length (1), id (16).
    let ids_stored = || -> usize {
        let store = inner.borrow();
        store
            .keys()
            .unwrap()
            .iter()
            .filter(|k| k.starts_with("dedup2-"))
            .map(|k| (store.get(k).unwrap().unwrap().len() - 8) / (32 + 1 + 16))
            .sum()
    };
    let end = Instant::now() + Duration::from_secs(10);
    while ids_stored() < sent && Instant::now() < end {
        a.poll(Some(Duration::from_millis(5))).unwrap();
        b.poll(Some(Duration::from_millis(5))).unwrap();
    }
    assert_eq!(
        ids_stored(),
        sent,
        "every id written, none lost to the failures"
    );
    assert_eq!(
        storage_faults(&b.drain_events().collect::<Vec<_>>()).len(),
        0
    );
}
