//! Storage and identity: FileStore atomicity, crash leftovers, escaped names, permissions, and
//! an identity that survives a restart.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use mm_platform::identity::{Identity, IDENTITY_KEY};
use mm_platform::storage::{FileStore, Storage, StorageError};
use mm_platform::Platform;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "mm-platform-test-{}-{}-{:x}",
            name,
            std::process::id(),
            mm_platform::proto::crypto::random_u64()
        ));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn identity_survives_a_restart() {
    let dir = TempDir::new("restart");
    let first = {
        let p = Platform::builder()
            .storage(FileStore::open(&dir.0).unwrap())
            .build()
            .unwrap();
        (p.sign_id(), p.box_id())
    };
    let p = Platform::builder()
        .storage(FileStore::open(&dir.0).unwrap())
        .build()
        .unwrap();
    assert_eq!((p.sign_id(), p.box_id()), first);
    let stored = fs::read_to_string(dir.0.join("identity")).unwrap();
    assert_eq!(stored.len(), 88, "base64 of the 64-byte secret key");
    let id = Identity::from_stored(stored.as_bytes()).unwrap();
    assert_eq!(id.sign_id(), first.0);
    let mode = fs::metadata(dir.0.join("identity"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_corrupt_identity_fails_the_build_and_is_kept() {
    let dir = TempDir::new("corrupt");
    let mut store = FileStore::open(&dir.0).unwrap();
    store.put(IDENTITY_KEY, b"this is not a key").unwrap();
    assert!(Platform::builder().storage(store).build().is_err());
    assert_eq!(
        fs::read(dir.0.join("identity")).unwrap(),
        b"this is not a key"
    );
}

#[test]
fn leftover_temp_files_are_ignored() {
    let dir = TempDir::new("leftover");
    let mut store = FileStore::open(&dir.0).unwrap();
    store.put("identity", b"old value").unwrap();
    // What a crash between writing the temp file and renaming it leaves behind.
    fs::write(dir.0.join(".tmp-identity-0123456789abcdef"), b"half writ").unwrap();
    fs::write(dir.0.join(".tmp-newkey-0000000000000000"), b"x").unwrap();
    drop(store);
    let store = FileStore::open(&dir.0).unwrap();
    assert_eq!(
        store.get("identity").unwrap().as_deref(),
        Some(&b"old value"[..])
    );
    assert_eq!(store.keys().unwrap(), vec!["identity".to_string()]);
    assert_eq!(store.get("newkey").unwrap(), None);
    // Foreign files that are not canonical escapes are ignored too.
    fs::write(dir.0.join("not.an.escape"), b"x").unwrap();
    assert_eq!(store.keys().unwrap(), vec!["identity".to_string()]);
}

#[test]
fn put_replaces_atomically_and_leaves_no_temp_files() {
    let dir = TempDir::new("atomic");
    let mut store = FileStore::open(&dir.0).unwrap();
    for i in 0..20u32 {
        store.put("k", &i.to_le_bytes()).unwrap();
    }
    assert_eq!(store.get("k").unwrap().unwrap(), 19u32.to_le_bytes());
    let names: Vec<String> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec![".lock", "k"], "the lock file and the key");
    store.del("k").unwrap();
    store.del("k").unwrap();
    assert_eq!(store.get("k").unwrap(), None);
    assert!(store.keys().unwrap().is_empty());
}

#[test]
fn any_key_is_a_safe_file_name_and_round_trips() {
    let dir = TempDir::new("escape");
    let mut store = FileStore::open(&dir.0).unwrap();
    let keys = [
        "",
        ".",
        "..",
        "../escape",
        "/etc/passwd",
        "a/b/c",
        "offline.msg.1",
        "with space",
        "ünïcödé ✓",
        "%2F",
        "tab\tnew\nline",
        ".tmp-identity-0123",
    ];
    for (i, k) in keys.iter().enumerate() {
        store.put(k, &[i as u8]).unwrap();
    }
    let mut listed = store.keys().unwrap();
    listed.sort();
    let mut expected: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(store.get(k).unwrap(), Some(vec![i as u8]), "{k:?}");
    }
    // Nothing was written outside the directory, and every file is a plain entry in it.
    assert!(!dir.0.parent().unwrap().join("escape").exists());
    assert_eq!(
        fs::read_dir(&dir.0).unwrap().count(),
        keys.len() + 1,
        "and .lock"
    );
    for e in fs::read_dir(&dir.0).unwrap() {
        let e = e.unwrap();
        assert!(e.file_type().unwrap().is_file());
        assert_eq!(e.metadata().unwrap().permissions().mode() & 0o777, 0o600);
    }
    let long = "x".repeat(300);
    assert!(matches!(
        store.put(&long, b"v"),
        Err(StorageError::InvalidKey(_))
    ));
}

/// A real crash: a child process (this test binary, re-run in writer mode) replaces one key
/// with 64 KiB values as fast as it can and is killed with SIGKILL at an arbitrary moment. The
/// key must then hold one complete value, and no temporary file may show up as a key.
#[test]
fn sigkill_during_writes_leaves_a_complete_value() {
    const VALUE_LEN: usize = 64 * 1024;
    if let Ok(dir) = std::env::var("MM_FILESTORE_CRASH_DIR") {
        // Writer mode (child): bounded, but far longer than the parent waits.
        let mut store = FileStore::open(&dir).unwrap();
        for i in 0..1_000_000u32 {
            store.put("k", &vec![(i % 251) as u8; VALUE_LEN]).unwrap();
        }
        return;
    }
    let dir = TempDir::new("sigkill");
    for round in 0..3u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sigkill_during_writes_leaves_a_complete_value",
                "--nocapture",
            ])
            .env("MM_FILESTORE_CRASH_DIR", &dir.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait (bounded) until the writer has written at least once, then let it run a little.
        for _ in 0..1000 {
            if dir.0.join("k").exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(
            5 + mm_platform::proto::crypto::random_below(40) + round,
        ));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let store = FileStore::open(&dir.0).unwrap();
        let value = store.get("k").unwrap().expect("a value survives");
        assert_eq!(value.len(), VALUE_LEN);
        assert!(
            value.iter().all(|b| *b == value[0]),
            "never a mix of two writes"
        );
        assert_eq!(store.keys().unwrap(), vec!["k".to_string()]);
    }
}

/// One process at a time: a second open of a held directory is refused, naming the directory
/// and the holder's pid; the lock goes with the store (and with the process, however it ends).
#[test]
fn a_data_directory_is_held_by_one_store_at_a_time() {
    let dir = TempDir::new("lock");
    let mut first = FileStore::open(&dir.0).unwrap();
    first.put("k", b"v").unwrap();
    let err = FileStore::open(&dir.0).unwrap_err();
    match &err {
        mm_platform::storage::StorageError::Locked { dir: d, pid } => {
            assert_eq!(d, &dir.0);
            assert_eq!(*pid, Some(std::process::id()));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&dir.0.display().to_string())
            && text.contains(&std::process::id().to_string()),
        "{text}"
    );
    // A tool may look without the lock.
    let look = FileStore::open_unlocked(&dir.0).unwrap();
    assert_eq!(look.keys().unwrap(), vec!["k".to_string()]);
    // A platform on a held directory does not start.
    let held = FileStore::open(&dir.0);
    assert!(held.is_err());
    drop(first);
    let again = FileStore::open(&dir.0).unwrap();
    assert_eq!(again.get("k").unwrap().as_deref(), Some(&b"v"[..]));
}
