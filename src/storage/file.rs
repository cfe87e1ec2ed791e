//! The file store ([`FileStore`]): one file per key in a directory, every write atomic. Its
//! layout and crash guarantees are in the type's docs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{Storage, StorageError};

/// Longest escaped key accepted (file systems commonly allow 255 bytes; the temp-file prefix and
/// suffix need the rest).
const MAX_NAME: usize = 240;

/// A [`Storage`] that keeps one file per key in a directory, every write atomic.
///
/// # Layout and crash guarantees
///
/// - A key becomes a file name by escaping: ASCII letters, digits, `-` and `_` stand for
///   themselves, every other byte of the key's UTF-8 form becomes `%XX` (two upper-case hex
///   digits). The empty key is the file `%`. So any string is a safe file name (no `/`, no `.`
///   or `..`, no hidden files) and [`Storage::keys`] gives back exactly the keys that were put.
///   A key whose escaped form is longer than 240 bytes is refused with
///   [`StorageError::InvalidKey`].
/// - `put` writes a temporary file (`.tmp-<name>-<random>`) created with mode 0600, fsyncs it,
///   renames it over the target and fsyncs the directory, so after a crash a key holds either
///   its old or its new value, never a mix. Every file is created with mode 0600: the store
///   holds the node's secret key and its queued messages, none of which other users should read.
/// - Names starting with `.` (temporary files left by a crash) and names that are not valid
///   escapes are ignored by `get` and `keys`; a later `put` of the same key simply replaces the
///   target.
/// - `del` removes the file and fsyncs the directory; `rename` renames the file (no free space
///   needed) and fsyncs the directory.
/// - Errors carry the OS error (`No space left on device`, `Read-only file system`, ...).
/// - One process at a time: [`FileStore::open`] takes an exclusive `flock` on the file `.lock`
///   in the directory (and writes its process id there) and holds it as long as the store
///   lives; the kernel releases it when the process ends, however it ends. A second open fails
///   with [`StorageError::Locked`] naming the directory and the holder's pid, so two nodes never
///   run on one identity and one offline buffer. [`FileStore::open_unlocked`] skips the lock,
///   for tools that only look at a directory.
///
/// # Example
///
/// ```
/// use mm_platform::storage::{FileStore, Storage};
///
/// let dir = std::env::temp_dir().join(format!("mm-doc-filestore-{}", std::process::id()));
/// let mut store = FileStore::open(&dir).unwrap();
/// store.put("a/b c", b"value").unwrap();
/// // Held by `store`: a second open is refused, naming the directory and our pid.
/// let err = FileStore::open(&dir).unwrap_err();
/// assert!(err.to_string().contains("in use by process"));
/// drop(store);
/// let reopened = FileStore::open(&dir).unwrap();
/// assert_eq!(reopened.get("a/b c").unwrap().as_deref(), Some(&b"value"[..]));
/// std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    /// The locked `.lock` file (`None` for [`FileStore::open_unlocked`]); the lock goes with it.
    _lock: Option<File>,
}

/// The lock file's name (a dot name: never a key).
const LOCK_NAME: &str = ".lock";

impl FileStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) if it does not exist, and
    /// locks it for this process (see the type's docs): if another process (or another
    /// `FileStore` of this one) holds it, [`StorageError::Locked`].
    pub fn open(dir: impl AsRef<Path>) -> Result<FileStore, StorageError> {
        let mut store = FileStore::open_unlocked(dir)?;
        store._lock = Some(store.lock()?);
        Ok(store)
    }

    /// Opens the store in `dir` without taking its lock: for tools that read a directory a
    /// node may be using. Writing through it while a node runs there mixes their state.
    pub fn open_unlocked(dir: impl AsRef<Path>) -> Result<FileStore, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            let mut builder = fs::DirBuilder::new();
            builder.recursive(true);
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(&dir)?;
        }
        Ok(FileStore { dir, _lock: None })
    }

    /// Takes the exclusive lock of the directory, and writes our pid into the lock file. The
    /// descriptor held is read-only (a file system with a file open for writing cannot be
    /// remounted read-only); the pid goes in through another, closed at once.
    fn lock(&self) -> Result<File, StorageError> {
        let path = self.dir.join(LOCK_NAME);
        let created = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path);
        // A read-only file system: the lock file of an earlier run still locks (reads work).
        let read_only = matches!(&created, Err(e) if e.raw_os_error() == Some(libc::EROFS));
        if !read_only {
            created?;
        }
        let mut f = File::open(&path)?;
        // SAFETY: flock(2) on a descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e.into());
            }
            let mut text = String::new();
            let pid = f
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(StorageError::Locked {
                dir: self.dir.clone(),
                pid,
            });
        }
        if !read_only {
            let mut w = OpenOptions::new().write(true).truncate(true).open(&path)?;
            write!(w, "{}", std::process::id())?;
        }
        Ok(f)
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key: &str) -> Result<(String, PathBuf), StorageError> {
        let name = escape_key(key);
        if name.len() > MAX_NAME {
            return Err(StorageError::InvalidKey(key.to_owned()));
        }
        let path = self.dir.join(&name);
        Ok((name, path))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Storage for FileStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let (_, path) = self.path_of(key)?;
        match fs::read(&path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        let (name, path) = self.path_of(key)?;
        let tmp = self
            .dir
            .join(format!(".tmp-{name}-{:016x}", crate::crypto::random_u64()));
        let result = (|| -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(value)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
            self.sync_dir()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(Into::into)
    }

    fn del(&mut self, key: &str) -> Result<(), StorageError> {
        let (_, path) = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(self.sync_dir()?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn rename(&mut self, from: &str, to: &str) -> Result<(), StorageError> {
        let (_, src) = self.path_of(from)?;
        let (_, dst) = self.path_of(to)?;
        match fs::rename(&src, &dst) {
            Ok(()) => Ok(self.sync_dir()?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn keys(&self) -> Result<Vec<String>, StorageError> {
        let mut keys = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') {
                continue;
            }
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Some(key) = unescape_key(name) {
                keys.push(key);
            }
        }
        Ok(keys)
    }
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The file name of `key` (see the `FileStore` docs).
pub(crate) fn escape_key(key: &str) -> String {
    if key.is_empty() {
        return "%".to_owned();
    }
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 15) as usize] as char);
        }
    }
    out
}

/// The key of a file name, or `None` when the name is not a canonical escape.
pub(crate) fn unescape_key(name: &str) -> Option<String> {
    if name == "%" {
        return Some(String::new());
    }
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_plain(b) {
            out.push(b);
            i += 1;
        } else if b == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            };
            let v = hex(bytes[i + 1])? << 4 | hex(bytes[i + 2])?;
            if is_plain(v) {
                return None; // not canonical
            }
            out.push(v);
            i += 3;
        } else {
            return None;
        }
    }
    let key = String::from_utf8(out).ok()?;
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips() {
        for key in [
            "",
            "identity",
            "a/b",
            "..",
            ".",
            "%41",
            "offline.1234",
            "héllo wörld",
            "\u{0}\n",
            "-_",
        ] {
            let name = escape_key(key);
            assert!(!name.contains('/') && !name.starts_with('.'), "{name}");
            assert_eq!(unescape_key(&name).as_deref(), Some(key), "{name}");
        }
    }

    #[test]
    fn non_canonical_names_are_rejected() {
        for name in ["%41", "%4", "%", "a%zz", "a.b", "%2e", "%FF"] {
            if name == "%" {
                continue;
            }
            assert_eq!(unescape_key(name), None, "{name}");
        }
    }
}
