//! Storage: the small synchronous key-value interface the platform keeps its state in (the role
//! of the original's kad-fs), with an in-memory store ([`MemStore`], the default) and a
//! directory of files ([`FileStore`]) written atomically.
//!
//! Keys are arbitrary strings, values arbitrary bytes. The platform stores its identity under
//! the key `identity` (see [`crate::identity`]); later layers (the offline buffer) store their
//! records under their own prefixes.
//!
//! Failures name their cause: a [`StorageError`] carries the OS error (ENOSPC "No space left on
//! device", EROFS "Read-only file system", ...), [`StorageCause`] is its `Copy` summary (what a
//! refused send reports), and the faults the platform meets and survives (a record it cannot
//! delete, a damaged record it keeps aside, a memory it cannot write) are described by
//! [`StorageFault`] and raised as [`crate::Event::StorageFault`].
//!
//! [`FileStore`] is Unix-only (file modes, `flock`); its layout and crash guarantees are in its
//! docs.

#[cfg(unix)]
mod file;
mod mem;

#[cfg(unix)]
pub use file::FileStore;
pub use mem::MemStore;

use std::fmt;
use std::io;

/// Why a storage operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageError {
    /// The underlying file system failed.
    Io(io::Error),
    /// The key cannot be stored by this backend (for [`FileStore`]: its escaped form is longer
    /// than a file name may be).
    InvalidKey(String),
    /// The directory is a [`FileStore`] another process (or another `FileStore` value of this
    /// one) holds: two writers would interleave their offline records, de-duplication memory
    /// and listen addresses.
    Locked {
        /// The store's directory.
        dir: std::path::PathBuf,
        /// The holder's process id, as it wrote it into the lock file (if readable).
        pid: Option<u32>,
    },
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io(e) => write!(f, "storage I/O error: {e}"),
            StorageError::InvalidKey(k) => write!(f, "key cannot be stored: {k:?}"),
            StorageError::Locked { dir, pid } => {
                write!(f, "data directory {} is in use", dir.display())?;
                match pid {
                    Some(p) => write!(f, " by process {p}"),
                    None => write!(f, " by another process"),
                }
            }
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io(e) => Some(e),
            StorageError::InvalidKey(_) | StorageError::Locked { .. } => None,
        }
    }
}

impl StorageError {
    /// The cause, in a `Copy` form.
    pub fn cause(&self) -> StorageCause {
        match self {
            StorageError::Io(e) => match e.raw_os_error() {
                Some(code) => StorageCause::Os(code),
                None => StorageCause::Io(e.kind()),
            },
            StorageError::InvalidKey(_) => StorageCause::InvalidKey,
            StorageError::Locked { .. } => StorageCause::Locked,
        }
    }

    /// The OS error code (`ENOSPC`, `EROFS`, ...), if the file system gave one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageError::Io(e) => e.raw_os_error(),
            StorageError::InvalidKey(_) | StorageError::Locked { .. } => None,
        }
    }
}

/// Why a storage operation failed, small enough to copy (see [`StorageError::cause`]). Shown
/// as the OS's text: `No space left on device (os error 28)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum StorageCause {
    /// An OS error, by its raw code (`ENOSPC` 28 and `EROFS` 30 on Linux).
    Os(i32),
    /// An I/O error without an OS code.
    Io(io::ErrorKind),
    /// The key cannot be stored by this backend.
    InvalidKey,
    /// The store is held by another process ([`StorageError::Locked`]).
    Locked,
}

impl StorageCause {
    /// The OS error code, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            StorageCause::Os(code) => Some(*code),
            _ => None,
        }
    }
}

impl fmt::Display for StorageCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageCause::Os(code) => write!(f, "{}", io::Error::from_raw_os_error(*code)),
            StorageCause::Io(kind) => write!(f, "{kind}"),
            StorageCause::InvalidKey => f.write_str("key cannot be stored"),
            StorageCause::Locked => f.write_str("data directory in use by another process"),
        }
    }
}

/// What went wrong in a [`StorageFault`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum StorageFaultKind {
    /// Reading a key (or listing the keys) failed.
    Read,
    /// Writing a key failed.
    Write,
    /// Deleting a key failed (for an offline record: it was delivered, but stays on disk and
    /// would be sent again after a restart, which the receiver's de-duplication drops).
    Delete,
    /// A record is damaged (empty, truncated, garbled, failed its checksum): it is never
    /// delivered, and it is kept aside under [`StorageFault::kept_as`] when that could be
    /// written.
    Damaged,
}

impl fmt::Display for StorageFaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageFaultKind::Read => "reading",
            StorageFaultKind::Write => "writing",
            StorageFaultKind::Delete => "deleting",
            StorageFaultKind::Damaged => "damaged record",
        })
    }
}

/// A storage fault the platform met and went on after, raised as
/// [`crate::Event::StorageFault`] (and logged at warn level).
///
/// ```
/// use mm_platform::storage::{StorageFault, StorageFaultKind};
///
/// let f = StorageFault {
///     kind: StorageFaultKind::Damaged,
///     key: "offline-00".into(),
///     cause: "checksum mismatch".into(),
///     os_error: None,
///     kept_as: Some("damaged-offline-00".into()),
/// };
/// assert_eq!(
///     f.to_string(),
///     "damaged record offline-00: checksum mismatch (kept aside as damaged-offline-00)"
/// );
/// ```
#[derive(Clone, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct StorageFault {
    /// What went wrong.
    pub kind: StorageFaultKind,
    /// The storage key concerned.
    pub key: String,
    /// Why, in words (the OS error's text, or what is wrong with the record).
    pub cause: String,
    /// The OS error code (`ENOSPC`, `EROFS`, ...), when the file system gave one.
    pub os_error: Option<i32>,
    /// Where a damaged record was moved to (never delivered; for inspection or repair).
    pub kept_as: Option<String>,
}

impl StorageFault {
    /// A failed storage operation on `key`.
    pub fn failed(kind: StorageFaultKind, key: &str, error: &StorageError) -> StorageFault {
        StorageFault {
            kind,
            key: key.to_owned(),
            cause: error.cause().to_string(),
            os_error: error.raw_os_error(),
            kept_as: None,
        }
    }
}

impl fmt::Display for StorageFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.key, self.cause)?;
        if let Some(k) = &self.kept_as {
            write!(f, " (kept aside as {k})")?;
        }
        Ok(())
    }
}

impl From<io::Error> for StorageError {
    fn from(e: io::Error) -> Self {
        StorageError::Io(e)
    }
}

/// A synchronous key-value store.
///
/// Operations are expected to be durable when they return (a [`FileStore`] fsyncs). They run on
/// the reactor's thread, so a store should be fast; the platform only writes small records.
///
/// ```
/// use mm_platform::storage::{MemStore, Storage};
///
/// let mut store = MemStore::new();
/// store.put("greeting", b"hello").unwrap();
/// assert_eq!(store.get("greeting").unwrap().as_deref(), Some(&b"hello"[..]));
/// assert_eq!(store.keys().unwrap(), vec!["greeting".to_string()]);
/// store.del("greeting").unwrap();
/// assert_eq!(store.get("greeting").unwrap(), None);
/// ```
///
/// `Send`, like every part a [`crate::Platform`] owns (a platform can move to another thread).
pub trait Storage: Send {
    /// The value stored under `key`, or `None`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Stores `value` under `key`, replacing any previous value atomically.
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError>;
    /// Removes `key`; removing a missing key is not an error.
    fn del(&mut self, key: &str) -> Result<(), StorageError>;
    /// Every key currently stored, in no particular order.
    fn keys(&self) -> Result<Vec<String>, StorageError>;
    /// Moves the value of `from` to `to` (replacing `to`), so that `from` is gone. The default
    /// copies and deletes (`get`, `put`, `del`); a [`FileStore`] renames the file, which needs
    /// no free space (it works on a full disk).
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        if let Some(v) = self.get(from)? {
            self.put(to, &v)?;
        }
        self.del(from)
    }
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        (**self).get(key)
    }
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        (**self).put(key, value)
    }
    fn del(&mut self, key: &str) -> Result<(), StorageError> {
        (**self).del(key)
    }
    fn keys(&self) -> Result<Vec<String>, StorageError> {
        (**self).keys()
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        (**self).rename(from, to)
    }
}
