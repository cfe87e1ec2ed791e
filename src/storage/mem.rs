//! The in-memory store, the platform's default: nothing survives the process.

use std::collections::BTreeMap;

use super::{Storage, StorageError};

/// A [`Storage`] kept in memory (a sorted map). Cheap, never fails, forgets everything on drop.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    map: BTreeMap<String, Vec<u8>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl Storage for MemStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.map.get(key).cloned())
    }

    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.map.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn del(&mut self, key: &str) -> Result<(), StorageError> {
        self.map.remove(key);
        Ok(())
    }

    fn keys(&self) -> Result<Vec<String>, StorageError> {
        Ok(self.map.keys().cloned().collect())
    }
}
