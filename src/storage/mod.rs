//! Storage: the small synchronous key-value interface the platform keeps its state in (the role
//! of the original's kad-fs), with an in-memory store ([`MemStore`], the default) and a
//! directory of files ([`FileStore`]) written atomically.
//!
//! Keys are arbitrary strings, values arbitrary bytes. The platform stores its identity under
//! the key `identity` (see [`crate::identity`]); later layers (the offline buffer) store their
//! records under their own prefixes.

mod file;
mod mem;

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
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io(e) => write!(f, "storage I/O error: {e}"),
            StorageError::InvalidKey(k) => write!(f, "key cannot be stored: {k:?}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io(e) => Some(e),
            StorageError::InvalidKey(_) => None,
        }
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
pub trait Storage {
    /// The value stored under `key`, or `None`.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Stores `value` under `key`, replacing any previous value atomically.
    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError>;
    /// Removes `key`; removing a missing key is not an error.
    fn del(&mut self, key: &str) -> Result<(), StorageError>;
    /// Every key currently stored, in no particular order.
    fn keys(&self) -> Result<Vec<String>, StorageError>;
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
}
