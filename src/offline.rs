//! The offline buffer (docs/ARCHITECTURE.md §6): persistent store-and-forward for messages that are not
//! real-time, and the receiver's de-duplication memory.
//!
//! Sending side (the offline buffer): each message is one storage record, written (durably, for
//! a [`crate::storage::FileStore`]) before the send returns, under the key
//! `offline-<32 hex digits of its id>`. A record holds the destination, the wall-clock expiry
//! (milliseconds since the Unix epoch, so it survives restarts), a creation sequence (records
//! to one destination are sent in that order, also after a restart) and the envelope with its
//! 16-byte random id (field 4). The platform takes the idle records of a destination when a
//! connection to it is up, writes them to the CurveCP stream, and deletes a record only once
//! the receiving node has acknowledged its *delivery* (below); if the connection dies first,
//! the record becomes idle again and is retried (whenever the destination comes online, and
//! at least every [`crate::NetConfig::offline_retry`]). Expired records are deleted and
//! reported. The buffer is bounded in records and bytes: a send beyond either bound is refused
//! ([`crate::SendError::BufferFull`]; limits in [`OfflineLimits`]).
//!
//! Record layout (format 2): `MMO2` (4 bytes), destination ed25519 key (32), expiry ms (8,
//! big-endian), sequence (8, big-endian), the protobuf envelope, then a 16-byte checksum
//! (BLAKE2b) of everything before it. Records of the first format
//! (`MMO1`, the same without the checksum) are still read, so a buffer written by an older
//! version is sent after an upgrade.
//!
//! Disk faults are reported, never passed in silence (see [`crate::storage::StorageFault`]):
//! a record that is empty, truncated, garbled or fails its checksum is never delivered; it is
//! moved aside to `damaged-<its key>` ([`DAMAGED_PREFIX`]), logged at warn level and reported
//! (if it cannot even be moved, it stays where it is, unread, and is reported again at the next
//! start). A delivered record that cannot be deleted (a read-only disk) is reported, and its
//! deletion retried later. Faults wait in a bounded queue that the platform turns into
//! [`crate::Event::StorageFault`].
//!
//! # Delivery guarantee
//!
//! Between two nodes of this crate (each says so in its identify frame), a message sent with
//! `realtime: false` is acknowledged end to end: the receiver sends `mm`/`delivered` with the
//! message's id only after the message was handed to its subscribers (callbacks returned,
//! channel sends done) *and* its id was written to the de-duplication memory (durable with a
//! [`crate::storage::FileStore`]; one write for all the messages delivered since the last,
//! made at the end of the turn and, while a turn keeps delivering, every 20 ms). Ids are
//! stored only once their message was delivered: a message read from the network but still
//! waiting in the delivery queue is remembered in memory only (a copy arriving meanwhile is
//! dropped), so a crash never makes a message that was not delivered look like one that was. The
//! sender deletes its record, and reports success to a delivery callback, only on that
//! acknowledgement: the stream's acknowledgement of the bytes only says they arrived. A copy
//! that arrives again (a retry) is dropped by the receiver and acknowledged again once its id
//! is stored.
//!
//! What a crash (SIGKILL, power loss) at each step can cause:
//!
//! | who dies, and when | outcome |
//! |---|---|
//! | sender, before the send returned `Ok` | not sent (the send reported no success) |
//! | sender, at any later point | sent after its restart; never lost; a receiver that already had it drops the copy |
//! | receiver, before its subscribers saw the message | sent again, delivered once |
//! | receiver, after its subscribers saw it, before its id was stored | **delivered again** after the restart, with the same [`crate::Message::id`] |
//! | receiver, after its id was stored | the copy sent again is dropped and acknowledged |
//!
//! So a message is never lost while its record lives (until it expires), and the one place
//! where it can be delivered twice is the receiver's window between handing it to its
//! subscribers and the write of its id: the messages delivered in the last 20 ms or so
//! before the crash (`tests/delivery_crash.rs` measures it). An application that must not act
//! twice on a message keeps the ids ([`crate::Message::id`]) of what it acted upon, durably
//! with its effects.
//! The other limits of the promise:
//!
//! - A subscriber channel that is full drops the message for that subscriber
//!   ([`crate::Stats::channel_drops`]); the message still counts as delivered.
//! - The receiver remembers the latest [`crate::NetConfig::dedup_per_peer`] ids per sender: a
//!   retry of a message older than that is delivered again.
//! - If the receiver cannot store ids (full or read-only disk), it delivers but does not
//!   acknowledge: the sender keeps its records and retries, and the receiver drops the copies
//!   it remembers in memory (until it restarts).
//! - JavaScript nodes, and nodes of this crate from before end-to-end acknowledgements, send
//!   none: to them a record is deleted when the stream acknowledged its bytes, so a crash of
//!   such a receiver right after can lose the message.
//! - The points of the table are exercised by `tests/delivery_crash.rs` through crash points
//!   (`MM_CRASH_AT`, see the platform's `crash_points` module).
//!
//! Receiving side (the de-duplication memory): a bounded memory of the ids of the latest
//! messages delivered, kept per sender (box key), so a message retried after a lost
//! acknowledgement is not delivered twice. Each sender keeps its latest `per_peer` ids (4,096 by default,
//! [`crate::NetConfig::dedup_per_peer`]) and all senders together at most `capacity` (65,536
//! by default, [`crate::NetConfig::dedup`]); past that the least recently active sender is
//! forgotten whole (so the number of senders tracked is bounded too). A peer flooding ids
//! therefore only evicts its own, never another sender's latest ids. The memory is persisted,
//! so a receiver that restarts still recognises retries: (sender, id) pairs are written in
//! chunks of [`DEDUP_CHUNK`] under the keys `dedup2-<n>` (a ring of as many chunks as the
//! capacity needs), the current chunk at most every half second while messages arrive and when
//! the platform is dropped. Only ids that arrived in the last half second before a crash can be
//! forgotten. A flush that fails (a full or read-only disk) keeps its ids for the next try, is
//! logged at warn level and reported when it starts failing (not at every retry). Chunk layout: sequence (8, big-endian), then per id the sender (32), the id's
//! length (1) and the id. Chunks of the first format (`dedup-<n>`: ids without sender) are
//! still read, as ids recognised from any sender, and deleted at the next flush; malformed
//! chunks are skipped.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use std::fmt;

use crate::crypto::{checksum, random_bytes, to_hex, SignPublicKey, CHECKSUM_LEN};
use crate::envelope::Envelope;
use crate::identity::SignId;
use crate::storage::{Storage, StorageCause, StorageError, StorageFault, StorageFaultKind};

/// Prefix of the storage keys of offline records.
pub const KEY_PREFIX: &str = "offline-";
/// Prefix put before the key of a damaged record when it is kept aside
/// (`damaged-offline-<id>`): such keys are never read as records.
pub const DAMAGED_PREFIX: &str = "damaged-";
/// The current record format (with a checksum).
const MAGIC: &[u8; 4] = b"MMO2";
/// The first record format (no checksum), still read.
const MAGIC_V1: &[u8; 4] = b"MMO1";
const HEADER: usize = 4 + 32 + 8 + 8;
/// Most storage faults waiting to be reported; beyond, they are only logged and counted.
const MAX_FAULTS: usize = 256;
/// Most delivered records whose deletion failed that are remembered for another try.
const MAX_UNDELETED: usize = 4096;

/// Why a stored offline record cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum RecordError {
    /// The record is empty.
    Empty,
    /// Shorter than its header and checksum.
    Truncated,
    /// Neither `MMO2` nor `MMO1` (a garbled header, or not a record).
    UnknownFormat,
    /// The checksum does not match: a bit flipped, or the record was garbled or truncated.
    Checksum,
    /// The envelope does not decode, or has no 16-byte id.
    BadEnvelope,
    /// The record's id is not the one its key names.
    KeyMismatch,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordError::Empty => "empty record",
            RecordError::Truncated => "truncated record",
            RecordError::UnknownFormat => "unknown record format (garbled header)",
            RecordError::Checksum => "checksum mismatch (damaged or truncated record)",
            RecordError::BadEnvelope => "undecodable envelope",
            RecordError::KeyMismatch => "record id does not match its key",
        })
    }
}

impl std::error::Error for RecordError {}

/// Identifies a record: creation sequence and id (records sort in sending order).
pub(crate) type RecordKey = (u64, [u8; 16]);

/// Bounds of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineLimits {
    /// Most records. Default 10,000.
    pub max_records: usize,
    /// Most bytes of envelopes. Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for OfflineLimits {
    fn default() -> Self {
        OfflineLimits {
            max_records: 10_000,
            max_bytes: 64 << 20,
        }
    }
}

/// Why a message could not be buffered.
#[derive(Debug)]
pub(crate) enum AddError {
    /// The buffer is at one of its bounds.
    Full,
    /// Writing the record failed.
    Storage(StorageError),
}

impl fmt::Display for AddError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddError::Full => f.write_str("offline buffer full"),
            AddError::Storage(e) => write!(f, "offline buffer storage failed: {e}"),
        }
    }
}

impl std::error::Error for AddError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AddError::Full => None,
            AddError::Storage(e) => Some(e),
        }
    }
}

/// A bounded queue of storage faults waiting to be reported (each is logged at warn level
/// when it is queued; past [`MAX_FAULTS`], faults are logged at debug level and counted).
#[derive(Default)]
struct Faults {
    queue: Vec<StorageFault>,
    dropped: usize,
}

impl Faults {
    fn report(&mut self, what: &str, fault: StorageFault) {
        if self.queue.len() < MAX_FAULTS {
            log::warn!("{what}: {fault}");
            self.queue.push(fault);
        } else {
            log::debug!("{what}: {fault}");
            self.dropped += 1;
        }
    }

    fn take(&mut self) -> Vec<StorageFault> {
        if self.dropped > 0 {
            log::warn!(
                "{} more storage faults were not reported (see the debug log)",
                self.dropped
            );
            self.dropped = 0;
        }
        std::mem::take(&mut self.queue)
    }
}

struct Entry {
    dest: SignId,
    expires_ms: u64,
    /// The envelope's netstring frame, ready to write to a stream.
    frame: Vec<u8>,
    busy: bool,
}

/// The storage key of a record id.
pub(crate) fn storage_key(id: &[u8; 16]) -> String {
    format!("{KEY_PREFIX}{}", to_hex(id))
}

/// Encodes a record (format 2, with its checksum).
pub(crate) fn encode_record(dest: &SignId, expires_ms: u64, seq: u64, env: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + env.encoded_len() + CHECKSUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(dest.as_bytes());
    out.extend_from_slice(&expires_ms.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    env.encode_protobuf(&mut out);
    let sum = checksum(&[&out]);
    out.extend_from_slice(&sum);
    out
}

/// Decodes a record of either format: destination, expiry, sequence, envelope (with a 16-byte
/// id). A record of format 2 whose checksum does not match is refused
/// ([`RecordError::Checksum`]).
pub(crate) fn decode_record(bytes: &[u8]) -> Result<(SignId, u64, u64, Envelope), RecordError> {
    if bytes.is_empty() {
        return Err(RecordError::Empty);
    }
    if bytes.len() < 4 {
        return Err(RecordError::Truncated);
    }
    let body = match &bytes[..4] {
        m if m == MAGIC => {
            if bytes.len() < HEADER + CHECKSUM_LEN {
                return Err(RecordError::Truncated);
            }
            let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
            if checksum(&[body]) != sum {
                return Err(RecordError::Checksum);
            }
            body
        }
        m if m == MAGIC_V1 => bytes,
        _ => return Err(RecordError::UnknownFormat),
    };
    if body.len() < HEADER {
        return Err(RecordError::Truncated);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&body[4..36]);
    let dest = SignId(SignPublicKey(key));
    let mut n = [0u8; 8];
    n.copy_from_slice(&body[36..44]);
    let expires = u64::from_be_bytes(n);
    n.copy_from_slice(&body[44..52]);
    let seq = u64::from_be_bytes(n);
    let env = Envelope::decode_protobuf(&body[HEADER..]).map_err(|_| RecordError::BadEnvelope)?;
    if env.id.as_ref().map(Vec::len) != Some(16) {
        return Err(RecordError::BadEnvelope);
    }
    Ok((dest, expires, seq, env))
}

/// The persistent buffer's in-memory index (the records themselves are in storage).
pub(crate) struct OfflineBuffer {
    entries: BTreeMap<RecordKey, Entry>,
    /// Idle records per destination (so "does `dest` have records to send" costs O(1)).
    idle: HashMap<SignId, usize>,
    bytes: usize,
    limits: OfflineLimits,
    next_seq: u64,
    /// Keys of delivered records whose deletion failed, tried again later (oldest first).
    undeleted: VecDeque<String>,
    faults: Faults,
    /// The sequence number of each record by id (delivery acknowledgements name ids).
    by_id: HashMap<[u8; 16], u64>,
}

impl OfflineBuffer {
    /// Loads every record from `storage`. Expired records are deleted; damaged ones (empty,
    /// truncated, garbled, failing their checksum, not matching their key) are moved aside to
    /// `damaged-<key>` and reported, never loaded; a record that cannot be read is reported
    /// and left alone. Returns the buffer and how many records were not loaded. Fails only if
    /// the keys cannot be listed.
    pub fn load(
        storage: &mut dyn Storage,
        limits: OfflineLimits,
        now_ms: u64,
    ) -> Result<(OfflineBuffer, usize), StorageError> {
        let mut buf = OfflineBuffer::new(limits, now_ms);
        let mut dropped = 0;
        for key in storage.keys()? {
            if !key.starts_with(KEY_PREFIX) {
                continue;
            }
            let value = match storage.get(&key) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    let fault = StorageFault::failed(StorageFaultKind::Read, &key, &e);
                    buf.faults
                        .report("offline buffer: a record cannot be read", fault);
                    dropped += 1;
                    continue;
                }
            };
            let record = decode_record(&value).and_then(|r| {
                let mut id = [0u8; 16];
                id.copy_from_slice(r.3.id.as_deref().unwrap_or(&[0; 16]));
                if storage_key(&id) == key {
                    Ok((r, id))
                } else {
                    Err(RecordError::KeyMismatch)
                }
            });
            match record {
                Ok(((_, exp, _, _), _)) if exp <= now_ms => {
                    log::debug!("offline buffer: dropping expired record {key}");
                    dropped += 1;
                    if let Err(e) = storage.del(&key) {
                        let fault = StorageFault::failed(StorageFaultKind::Delete, &key, &e);
                        buf.faults
                            .report("offline buffer: an expired record stays on disk", fault);
                    }
                }
                Ok(((dest, exp, seq, env), id)) => {
                    let mut frame = Vec::new();
                    env.encode_frame(&mut frame);
                    buf.bytes += frame.len();
                    buf.next_seq = buf.next_seq.max(seq.saturating_add(1));
                    *buf.idle.entry(dest).or_default() += 1;
                    buf.by_id.insert(id, seq);
                    buf.entries.insert(
                        (seq, id),
                        Entry {
                            dest,
                            expires_ms: exp,
                            frame,
                            busy: false,
                        },
                    );
                }
                Err(why) => {
                    dropped += 1;
                    buf.quarantine(storage, &key, why);
                }
            }
        }
        Ok((buf, dropped))
    }

    /// [`OfflineBuffer::load`] that always gives a buffer: if the records cannot be listed,
    /// the failure is logged at warn level and reported, and the buffer starts empty (the
    /// records stay on disk for the next start).
    pub fn open(storage: &mut dyn Storage, limits: OfflineLimits, now_ms: u64) -> OfflineBuffer {
        match OfflineBuffer::load(storage, limits, now_ms) {
            Ok((b, dropped)) => {
                if dropped > 0 {
                    log::debug!("offline buffer: {dropped} expired or damaged records not loaded");
                }
                b
            }
            Err(e) => {
                let mut b = OfflineBuffer::new(limits, now_ms);
                let fault = StorageFault::failed(StorageFaultKind::Read, KEY_PREFIX, &e);
                b.faults.report(
                    "offline buffer: the records cannot be listed, none is sent",
                    fault,
                );
                b
            }
        }
    }

    /// Moves the damaged record `key` aside (to `damaged-<key>`) and reports it; if it cannot
    /// be moved, it stays (unloaded) and the report says why.
    fn quarantine(&mut self, storage: &mut dyn Storage, key: &str, why: RecordError) {
        let aside = format!("{DAMAGED_PREFIX}{key}");
        let fault = match storage.rename(key, &aside) {
            Ok(()) => StorageFault {
                kind: StorageFaultKind::Damaged,
                key: key.to_owned(),
                cause: why.to_string(),
                os_error: None,
                kept_as: Some(aside),
            },
            Err(e) => StorageFault {
                kind: StorageFaultKind::Damaged,
                key: key.to_owned(),
                cause: format!("{why}; it could not be moved aside: {}", e.cause()),
                os_error: e.raw_os_error(),
                kept_as: None,
            },
        };
        self.faults
            .report("offline buffer: a damaged record is not delivered", fault);
    }

    /// The storage faults met since the last call (each already logged at warn level), for
    /// the platform to raise as [`crate::Event::StorageFault`].
    pub fn take_faults(&mut self) -> Vec<StorageFault> {
        self.faults.take()
    }

    /// Tries again to delete the delivered records whose deletion failed.
    fn retry_deletes(&mut self, storage: &mut dyn Storage) {
        while let Some(key) = self.undeleted.front() {
            if let Err(e) = storage.del(key) {
                log::debug!("offline buffer: {key} still cannot be deleted: {e}");
                return;
            }
            log::info!("offline buffer: delivered record {key} deleted after all");
            self.undeleted.pop_front();
        }
    }

    /// An empty buffer (nothing persisted yet).
    pub fn new(limits: OfflineLimits, now_ms: u64) -> OfflineBuffer {
        OfflineBuffer {
            entries: BTreeMap::new(),
            idle: HashMap::new(),
            bytes: 0,
            limits,
            next_seq: now_ms.saturating_mul(1000),
            undeleted: VecDeque::new(),
            faults: Faults::default(),
            by_id: HashMap::new(),
        }
    }

    /// Writes a new record for `dest` (a fresh id is put into `env`) and indexes it. A write
    /// that fails is returned ([`AddError::Storage`], naming the OS cause); the caller reports
    /// it to the sender.
    pub fn add(
        &mut self,
        storage: &mut dyn Storage,
        dest: SignId,
        mut env: Envelope,
        expires_ms: u64,
    ) -> Result<RecordKey, AddError> {
        let mut id = [0u8; 16];
        random_bytes(&mut id);
        env.id = Some(id.to_vec());
        let mut frame = Vec::new();
        env.encode_frame(&mut frame);
        if self.entries.len() >= self.limits.max_records
            || self.bytes + frame.len() > self.limits.max_bytes
        {
            return Err(AddError::Full);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        storage
            .put(
                &storage_key(&id),
                &encode_record(&dest, expires_ms, seq, &env),
            )
            .map_err(AddError::Storage)?;
        if !self.undeleted.is_empty() {
            self.retry_deletes(storage);
        }
        self.bytes += frame.len();
        *self.idle.entry(dest).or_default() += 1;
        self.by_id.insert(id, seq);
        self.entries.insert(
            (seq, id),
            Entry {
                dest,
                expires_ms,
                frame,
                busy: false,
            },
        );
        Ok((seq, id))
    }

    /// Marks every idle record of `dest` busy and returns them in sending order, each with a
    /// copy of its frame.
    pub fn take_idle(&mut self, dest: &SignId) -> Vec<(RecordKey, Vec<u8>)> {
        let mut out = Vec::new();
        if self.idle.remove(dest).is_none() {
            return out;
        }
        for (k, e) in self.entries.iter_mut() {
            if !e.busy && e.dest == *dest {
                e.busy = true;
                out.push((*k, e.frame.clone()));
            }
        }
        out
    }

    /// A busy record goes back to idle (its connection died before the acknowledgement).
    /// Returns the record's destination (`None` if the record is gone).
    pub fn release(&mut self, key: &RecordKey) -> Option<SignId> {
        let e = self.entries.get_mut(key)?;
        if e.busy {
            e.busy = false;
            *self.idle.entry(e.dest).or_default() += 1;
        }
        Some(e.dest)
    }

    /// Deletes a delivered record; `false` if it was already gone. If the deletion fails (a
    /// read-only disk), the fault is logged at warn level and reported
    /// ([`OfflineBuffer::take_faults`]), and the deletion is tried again later; the record is
    /// not sent again by this buffer (after a restart it would be, and the receiver's
    /// de-duplication drops it).
    pub fn delivered(&mut self, storage: &mut dyn Storage, key: &RecordKey) -> bool {
        let Some(e) = self.entries.remove(key) else {
            return false;
        };
        self.by_id.remove(&key.1);
        self.bytes -= e.frame.len();
        if !e.busy {
            if let Some(n) = self.idle.get_mut(&e.dest) {
                *n -= 1;
                if *n == 0 {
                    self.idle.remove(&e.dest);
                }
            }
        }
        let k = storage_key(&key.1);
        if let Err(e) = storage.del(&k) {
            let fault = StorageFault::failed(StorageFaultKind::Delete, &k, &e);
            self.faults.report(
                "offline buffer: a delivered record cannot be deleted",
                fault,
            );
            if self.undeleted.len() >= MAX_UNDELETED {
                self.undeleted.pop_front();
            }
            self.undeleted.push_back(k);
        }
        true
    }

    /// Deletes the idle records that expired at `now_ms` (and tries again the deletions that
    /// failed); returns their keys and destinations.
    pub fn expire(&mut self, storage: &mut dyn Storage, now_ms: u64) -> Vec<(RecordKey, SignId)> {
        self.retry_deletes(storage);
        let gone: Vec<(RecordKey, SignId)> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.busy && e.expires_ms <= now_ms)
            .map(|(k, e)| (*k, e.dest))
            .collect();
        for (k, _) in &gone {
            self.delivered(storage, k);
        }
        gone
    }

    /// Destinations that have idle records (sorted).
    pub fn idle_destinations(&self) -> Vec<SignId> {
        let mut v: Vec<SignId> = self.idle.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether `dest` has idle records (to send once a connection is up). O(1).
    pub fn has_idle(&self, dest: &SignId) -> bool {
        self.idle.contains_key(dest)
    }

    /// The key and destination of the record with this id, if it is held.
    pub fn find(&self, id: &[u8; 16]) -> Option<(RecordKey, SignId)> {
        let key = (*self.by_id.get(id)?, *id);
        self.entries.get(&key).map(|e| (key, e.dest))
    }

    /// Whether the record is held.
    pub fn contains(&self, key: &RecordKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Bounded memory of delivered message ids, kept per sender (see the module docs).
pub(crate) struct Dedup {
    peers: HashMap<[u8; 32], PeerIds>,
    /// Senders by last activity (oldest first): the key is the sender's activity tick.
    lru: BTreeMap<u64, [u8; 32]>,
    tick: u64,
    /// Ids remembered across all senders.
    total: usize,
    capacity: usize,
    per_peer: usize,
    /// Ids read from the unversioned format (no sender): recognised from any sender.
    legacy: HashSet<Vec<u8>>,
    /// Storage keys of that format, deleted at the next flush.
    legacy_keys: Vec<String>,
    /// Sequence number of the chunk being filled.
    chunk_seq: u64,
    /// Ids of the chunk being filled, with their senders.
    chunk: Vec<([u8; 32], Vec<u8>)>,
    dirty: bool,
    /// The cause of the failing flushes, while they fail (a fault is reported when it starts).
    failing: Option<StorageCause>,
    faults: Faults,
}

/// The ids remembered for one sender (oldest first in `order`).
#[derive(Default)]
struct PeerIds {
    seen: HashSet<Vec<u8>>,
    order: VecDeque<Vec<u8>>,
    tick: u64,
}

/// Ids per persisted chunk of the de-duplication memory.
pub const DEDUP_CHUNK: usize = 1024;
/// Prefix of the storage keys of the de-duplication memory (format 2: ids with their sender).
pub const DEDUP_PREFIX: &str = "dedup2-";
/// Prefix of the storage keys of the first format (ids without sender), still read.
pub const DEDUP_LEGACY_PREFIX: &str = "dedup-";
/// Default number of the latest ids remembered per sender.
pub const DEFAULT_DEDUP_PER_PEER: usize = 4096;

/// Longest id remembered; longer ids are not de-duplicated.
pub(crate) const MAX_ID_LEN: usize = 64;

/// The sender [`Dedup::first_time`] files ids under (no sender known).
const NO_SENDER: [u8; 32] = [0; 32];

impl Dedup {
    /// Remembers at most `capacity` ids (at least 1), at most [`DEFAULT_DEDUP_PER_PEER`] per
    /// sender.
    #[cfg(test)]
    pub fn new(capacity: usize) -> Dedup {
        Dedup::with_per_peer(capacity, DEFAULT_DEDUP_PER_PEER)
    }

    /// Remembers at most `capacity` ids (at least 1) in all, and the latest `per_peer` ids of
    /// each sender (at least 1, at most `capacity`).
    pub fn with_per_peer(capacity: usize, per_peer: usize) -> Dedup {
        let capacity = capacity.max(1);
        Dedup {
            peers: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            total: 0,
            capacity,
            per_peer: per_peer.clamp(1, capacity),
            legacy: HashSet::new(),
            legacy_keys: Vec::new(),
            chunk_seq: 0,
            chunk: Vec::new(),
            dirty: false,
            failing: None,
            faults: Faults::default(),
        }
    }

    fn chunks(&self) -> u64 {
        self.capacity.div_ceil(DEDUP_CHUNK) as u64
    }

    /// Loads the persisted ids with the default per-sender quota (malformed chunks are
    /// ignored).
    #[cfg(test)]
    pub fn load(capacity: usize, storage: &dyn Storage) -> Result<Dedup, StorageError> {
        Dedup::load_with_per_peer(capacity, DEFAULT_DEDUP_PER_PEER, storage)
    }

    /// Loads the persisted ids (malformed chunks are ignored; chunks of the first format are
    /// read as ids recognised from any sender, and their keys deleted at the next flush; a
    /// chunk that cannot be read is reported and skipped). Fails only if the keys cannot be
    /// listed.
    pub fn load_with_per_peer(
        capacity: usize,
        per_peer: usize,
        storage: &dyn Storage,
    ) -> Result<Dedup, StorageError> {
        let mut d = Dedup::with_per_peer(capacity, per_peer);
        let mut chunks = Vec::new();
        let mut legacy = Vec::new();
        for key in storage.keys()? {
            let current = key.starts_with(DEDUP_PREFIX);
            if !current && !key.starts_with(DEDUP_LEGACY_PREFIX) {
                continue;
            }
            let v = match storage.get(&key) {
                Ok(Some(v)) => v,
                Ok(None) => continue,
                Err(e) => {
                    let fault = StorageFault::failed(StorageFaultKind::Read, &key, &e);
                    d.faults.report(
                        "de-duplication memory: a chunk cannot be read (its ids are forgotten)",
                        fault,
                    );
                    continue;
                }
            };
            if !current {
                d.legacy_keys.push(key);
            }
            if v.len() < 8 {
                continue;
            }
            let seq = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
            let mut ids = Vec::new();
            let mut at = 8;
            let head = if current { 32 } else { 0 };
            while at + head < v.len() {
                let mut sender = NO_SENDER;
                sender[..head].copy_from_slice(&v[at..at + head]);
                let n = usize::from(v[at + head]);
                let from = at + head + 1;
                if n > MAX_ID_LEN || from + n > v.len() {
                    break;
                }
                ids.push((sender, v[from..from + n].to_vec()));
                at = from + n;
            }
            if current {
                chunks.push((seq, ids));
            } else {
                legacy.push((seq, ids));
            }
        }
        // Legacy ids: the latest `capacity` of them.
        legacy.sort_by_key(|c| c.0);
        let old: Vec<Vec<u8>> = legacy.into_iter().flat_map(|c| c.1).map(|e| e.1).collect();
        let skip = old.len().saturating_sub(d.capacity);
        d.legacy.extend(old.into_iter().skip(skip));
        chunks.sort_by_key(|c| c.0);
        for (seq, ids) in chunks {
            for (sender, id) in ids {
                d.remember(sender, id);
            }
            d.chunk_seq = d.chunk_seq.max(seq.saturating_add(1));
        }
        d.dirty = !d.legacy_keys.is_empty();
        Ok(d)
    }

    /// [`Dedup::load_with_per_peer`] that always gives a memory: if the chunks cannot be
    /// listed, the failure is logged at warn level and reported, and the memory starts empty.
    pub fn open(capacity: usize, per_peer: usize, storage: &dyn Storage) -> Dedup {
        Dedup::load_with_per_peer(capacity, per_peer, storage).unwrap_or_else(|e| {
            let mut d = Dedup::with_per_peer(capacity, per_peer);
            let fault = StorageFault::failed(StorageFaultKind::Read, DEDUP_PREFIX, &e);
            d.faults.report(
                "de-duplication memory cannot be loaded (retried messages may be delivered twice)",
                fault,
            );
            d
        })
    }

    /// The storage faults met since the last call (each already logged at warn level), for
    /// the platform to raise as [`crate::Event::StorageFault`].
    pub fn take_faults(&mut self) -> Vec<StorageFault> {
        self.faults.take()
    }

    /// Writes the chunk being filled, if it changed; starts a new chunk once it is full. If
    /// the write fails, the ids stay in the chunk for the next flush; the failure is logged at
    /// warn level and reported ([`Dedup::take_faults`]) when flushes start failing (or fail
    /// for another cause), at debug level while they go on failing.
    pub fn flush(&mut self, storage: &mut dyn Storage) -> Result<(), StorageError> {
        let result = self.write(storage);
        match &result {
            Ok(()) => {
                if self.failing.take().is_some() {
                    log::info!("de-duplication memory written again");
                }
            }
            Err((key, e)) => {
                if self.failing != Some(e.cause()) {
                    self.failing = Some(e.cause());
                    let kind = if key.starts_with(DEDUP_PREFIX) {
                        StorageFaultKind::Write
                    } else {
                        StorageFaultKind::Delete
                    };
                    let fault = StorageFault::failed(kind, key, e);
                    self.faults.report(
                        "de-duplication memory cannot be stored (kept for the next try)",
                        fault,
                    );
                } else {
                    log::debug!("de-duplication memory still cannot be stored ({key}): {e}");
                }
            }
        }
        result.map_err(|(_, e)| e)
    }

    /// The work of [`Dedup::flush`]; a failure names its key.
    fn write(&mut self, storage: &mut dyn Storage) -> Result<(), (String, StorageError)> {
        if !self.dirty {
            return Ok(());
        }
        let mut v = Vec::with_capacity(8 + self.chunk.len() * 50);
        v.extend_from_slice(&self.chunk_seq.to_be_bytes());
        for (sender, id) in &self.chunk {
            v.extend_from_slice(sender);
            v.push(id.len() as u8);
            v.extend_from_slice(id);
        }
        let key = format!("{DEDUP_PREFIX}{}", self.chunk_seq % self.chunks());
        storage.put(&key, &v).map_err(|e| (key, e))?;
        while let Some(k) = self.legacy_keys.last() {
            storage.del(k).map_err(|e| (k.clone(), e))?;
            self.legacy_keys.pop();
        }
        self.dirty = false;
        if self.chunk.len() >= DEDUP_CHUNK {
            self.chunk.clear();
            self.chunk_seq = self.chunk_seq.wrapping_add(1);
        }
        Ok(())
    }

    /// Whether ids arrived since the last flush.
    #[cfg(test)]
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Marks `sender` as the most recently active one.
    fn touch(&mut self, sender: [u8; 32]) {
        self.tick += 1;
        let tick = self.tick;
        let p = self.peers.entry(sender).or_default();
        if p.tick != 0 {
            self.lru.remove(&p.tick);
        }
        p.tick = tick;
        self.lru.insert(tick, sender);
    }

    /// Remembers `id` from `sender`; `false` if it was already remembered.
    fn remember(&mut self, sender: [u8; 32], id: Vec<u8>) -> bool {
        self.touch(sender);
        let per_peer = self.per_peer;
        let p = self.peers.entry(sender).or_default();
        if p.seen.contains(&id) {
            return false;
        }
        if p.order.len() >= per_peer {
            if let Some(old) = p.order.pop_front() {
                p.seen.remove(&old);
                self.total -= 1;
            }
        }
        p.seen.insert(id.clone());
        p.order.push_back(id);
        self.total += 1;
        // Over the global bound: the least recently active other sender is forgotten (the
        // sender just touched is the newest, and holds at most `per_peer <= capacity` ids).
        while self.total > self.capacity {
            let Some((&t, &old)) = self.lru.iter().next() else {
                break;
            };
            if old == sender {
                break;
            }
            self.lru.remove(&t);
            if let Some(gone) = self.peers.remove(&old) {
                self.total -= gone.order.len();
            }
        }
        true
    }

    /// `true` if `id` from `sender` (its 32-byte key) is new (and remembers it), `false` for
    /// a duplicate. Each sender's ids are kept apart: one sender's ids never evict another's
    /// beyond the least-recently-active rule.
    pub fn first_time_from(&mut self, sender: &[u8; 32], id: &[u8]) -> bool {
        if !self.seen_first_time(sender, id) {
            return false;
        }
        self.delivered(sender, id);
        true
    }

    /// The first half of [`Dedup::first_time_from`]: `true` if `id` from `sender` is new, and
    /// remembers it in memory only (a message read but not yet handed to its subscribers: a
    /// copy arriving meanwhile is a duplicate, but a crash must not make it one). Once the
    /// message is delivered, [`Dedup::delivered`] adds it to what the next flush stores.
    pub fn seen_first_time(&mut self, sender: &[u8; 32], id: &[u8]) -> bool {
        if id.len() > MAX_ID_LEN {
            return true;
        }
        if self.legacy.contains(id) {
            return false;
        }
        self.remember(*sender, id.to_vec())
    }

    /// A message (`id` from `sender`, seen with [`Dedup::seen_first_time`]) was delivered: its
    /// id goes into what the next [`Dedup::flush`] stores.
    pub fn delivered(&mut self, sender: &[u8; 32], id: &[u8]) {
        if id.len() > MAX_ID_LEN {
            return;
        }
        if self.chunk.len() >= self.capacity {
            // Never flushed (no storage at hand): keep it bounded anyway. A chunk may otherwise
            // grow past DEDUP_CHUNK until the next flush writes it whole and starts another.
            self.chunk.clear();
            self.chunk_seq = self.chunk_seq.wrapping_add(1);
        }
        self.chunk.push((*sender, id.to_vec()));
        self.dirty = true;
    }

    /// [`Dedup::first_time_from`] for an unknown sender (all such ids share one quota).
    #[cfg(test)]
    pub fn first_time(&mut self, id: &[u8]) -> bool {
        self.first_time_from(&NO_SENDER, id)
    }

    /// Ids remembered (all senders).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.total
    }

    /// Senders whose ids are remembered.
    #[cfg(test)]
    pub fn senders(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::storage::MemStore;

    const ENOSPC: i32 = 28;
    const EROFS: i32 = 30;

    /// A [`MemStore`] whose `put` / `del` fail with a raw OS error on demand.
    #[derive(Default)]
    struct FaultyStore {
        inner: MemStore,
        put_fails: Option<i32>,
        del_fails: Option<i32>,
    }

    impl Storage for FaultyStore {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
            self.inner.get(key)
        }
        fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
            match self.put_fails {
                Some(code) => Err(std::io::Error::from_raw_os_error(code).into()),
                None => self.inner.put(key, value),
            }
        }
        fn del(&mut self, key: &str) -> Result<(), StorageError> {
            match self.del_fails {
                Some(code) => Err(std::io::Error::from_raw_os_error(code).into()),
                None => self.inner.del(key),
            }
        }
        fn keys(&self) -> Result<Vec<String>, StorageError> {
            self.inner.keys()
        }
    }

    fn record(payload: &[u8]) -> (SignId, [u8; 16], Vec<u8>) {
        let dest = Identity::generate().sign_id();
        let mut env = Envelope::new("topic", "ms", payload.to_vec());
        let mut id = [0u8; 16];
        random_bytes(&mut id);
        env.id = Some(id.to_vec());
        (dest, id, encode_record(&dest, 9_000, 5, &env))
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_of_a_record_is_detected() {
        let (dest, id, rec) = record(b"the payload");
        let (d, exp, seq, env) = decode_record(&rec).unwrap();
        assert_eq!((d, exp, seq), (dest, 9_000, 5));
        assert_eq!(
            (env.payload.as_slice(), env.id.as_deref()),
            (&b"the payload"[..], Some(&id[..]))
        );
        for bit in 0..rec.len() * 8 {
            let mut bad = rec.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_record(&bad).is_err(), "bit {bit} flipped");
        }
        for len in 0..rec.len() {
            assert!(decode_record(&rec[..len]).is_err(), "truncated to {len}");
        }
        assert_eq!(decode_record(&[]), Err(RecordError::Empty));
        let mut garbled = rec.clone();
        garbled[..4].copy_from_slice(b"\x00\xffzz");
        assert_eq!(decode_record(&garbled), Err(RecordError::UnknownFormat));
        let mut flipped = rec.clone();
        let at = rec.len() - CHECKSUM_LEN - 3;
        flipped[at] ^= 0x10;
        assert_eq!(decode_record(&flipped), Err(RecordError::Checksum));
    }

    #[test]
    fn records_of_the_first_format_are_still_read() {
        let dest = Identity::generate().sign_id();
        let mut env = Envelope::new("old", "ms", b"from an older version".to_vec());
        let id = [3u8; 16];
        env.id = Some(id.to_vec());
        let mut v1 = Vec::new();
        v1.extend_from_slice(MAGIC_V1);
        v1.extend_from_slice(dest.as_bytes());
        v1.extend_from_slice(&9_000u64.to_be_bytes());
        v1.extend_from_slice(&4u64.to_be_bytes());
        env.encode_protobuf(&mut v1);
        let mut store = MemStore::new();
        store.put(&storage_key(&id), &v1).unwrap();
        let (mut b, dropped) =
            OfflineBuffer::load(&mut store, OfflineLimits::default(), 1_000).unwrap();
        assert_eq!((b.len(), dropped), (1, 0));
        assert!(b.take_faults().is_empty());
        let taken = b.take_idle(&dest);
        assert_eq!(taken[0].0, (4, id));
        let mut frame = Vec::new();
        env.encode_frame(&mut frame);
        assert_eq!(taken[0].1, frame);
    }

    #[test]
    fn damaged_records_are_kept_aside_and_reported_and_the_others_load() {
        let mut store = MemStore::new();
        let mut b = OfflineBuffer::new(OfflineLimits::default(), 1_000);
        let dest = Identity::generate().sign_id();
        let keys: Vec<String> = (0..4u8)
            .map(|i| {
                let k = b
                    .add(
                        &mut store,
                        dest,
                        Envelope::new("t", "ms", vec![i; 40]),
                        9_000,
                    )
                    .unwrap();
                storage_key(&k.1)
            })
            .collect();
        let damaged = |v: &[u8], i: usize| -> Vec<u8> {
            let mut v = v.to_vec();
            match i {
                0 => v.clear(),
                1 => v.truncate(v.len() - 5),
                _ => v[60] ^= 0x80, // in the payload
            }
            v
        };
        for (i, k) in keys.iter().enumerate().take(3) {
            let v = store.get(k).unwrap().unwrap();
            store.put(k, &damaged(&v, i)).unwrap();
        }
        let (mut r, dropped) =
            OfflineBuffer::load(&mut store, OfflineLimits::default(), 2_000).unwrap();
        assert_eq!((r.len(), dropped), (1, 3));
        let faults = r.take_faults();
        assert_eq!(faults.len(), 3);
        for f in &faults {
            let i = keys.iter().position(|k| *k == f.key).unwrap();
            assert!(i < 3);
            assert_eq!(f.kind, StorageFaultKind::Damaged);
            let aside = format!("damaged-{}", f.key);
            assert_eq!(f.kept_as.as_deref(), Some(&aside[..]));
            assert!(store.get(&f.key).unwrap().is_none());
            assert!(store.get(&aside).unwrap().is_some());
        }
        assert_eq!(r.take_idle(&dest).len(), 1, "only the intact one is sent");
        // At the next start, the kept-aside records are not records.
        let (r, dropped) =
            OfflineBuffer::load(&mut store, OfflineLimits::default(), 2_000).unwrap();
        assert_eq!((r.len(), dropped), (1, 0));
    }

    #[test]
    fn a_damaged_record_that_cannot_be_moved_stays_unread_and_is_reported() {
        let mut store = FaultyStore::default();
        let (_, id, mut rec) = record(b"x");
        rec[10] ^= 1;
        store.inner.put(&storage_key(&id), &rec).unwrap();
        store.put_fails = Some(EROFS);
        store.del_fails = Some(EROFS);
        let (mut b, dropped) =
            OfflineBuffer::load(&mut store, OfflineLimits::default(), 1_000).unwrap();
        assert_eq!((b.len(), dropped), (0, 1));
        let faults = b.take_faults();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].kept_as, None);
        assert_eq!(faults[0].os_error, Some(EROFS));
        assert!(
            faults[0].cause.contains("checksum mismatch"),
            "{}",
            faults[0]
        );
        assert!(
            faults[0].cause.contains("Read-only file system"),
            "{}",
            faults[0]
        );
        assert_eq!(
            store.get(&storage_key(&id)).unwrap(),
            Some(rec),
            "left as it was"
        );
    }

    #[test]
    fn a_failed_write_names_its_cause_and_a_failed_delete_is_reported_and_retried() {
        let mut store = FaultyStore::default();
        let dest = Identity::generate().sign_id();
        let mut b = OfflineBuffer::new(OfflineLimits::default(), 1_000);
        store.put_fails = Some(ENOSPC);
        let err = b
            .add(&mut store, dest, Envelope::new("t", "ms", vec![1]), 9_000)
            .unwrap_err();
        assert!(matches!(&err, AddError::Storage(e) if e.raw_os_error() == Some(ENOSPC)));
        assert!(err.to_string().contains("No space left on device"), "{err}");
        assert!(b.is_empty());
        store.put_fails = None;
        let k = b
            .add(&mut store, dest, Envelope::new("t", "ms", vec![1]), 9_000)
            .unwrap();
        store.del_fails = Some(EROFS);
        assert!(b.delivered(&mut store, &k));
        let faults = b.take_faults();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].kind, StorageFaultKind::Delete);
        assert_eq!(faults[0].key, storage_key(&k.1));
        assert_eq!(faults[0].os_error, Some(EROFS));
        assert!(b.is_empty(), "not sent again");
        b.expire(&mut store, 2_000);
        assert!(store.get(&storage_key(&k.1)).unwrap().is_some());
        assert!(
            b.take_faults().is_empty(),
            "a retry that fails is not reported again"
        );
        store.del_fails = None;
        b.expire(&mut store, 2_000);
        assert!(
            store.get(&storage_key(&k.1)).unwrap().is_none(),
            "deleted at the retry"
        );
    }

    #[test]
    fn a_failed_dedup_flush_keeps_its_ids_and_is_reported_once() {
        let mut store = FaultyStore::default();
        let mut d = Dedup::new(3000);
        for i in 0u32..10 {
            assert!(d.first_time_from(&[1; 32], &i.to_be_bytes()));
        }
        store.put_fails = Some(ENOSPC);
        for _ in 0..3 {
            let e = d.flush(&mut store).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(ENOSPC));
            assert!(d.is_dirty(), "still to be written");
        }
        let faults = d.take_faults();
        assert_eq!(
            faults.len(),
            1,
            "reported when it starts failing: {faults:?}"
        );
        assert_eq!(faults[0].kind, StorageFaultKind::Write);
        assert!(faults[0].key.starts_with(DEDUP_PREFIX));
        assert!(faults[0].cause.contains("No space left on device"));
        // Another cause is reported.
        store.put_fails = Some(EROFS);
        assert!(d.flush(&mut store).is_err());
        assert_eq!(d.take_faults().len(), 1);
        for i in 10u32..20 {
            assert!(d.first_time_from(&[1; 32], &i.to_be_bytes()));
        }
        store.put_fails = None;
        d.flush(&mut store).unwrap();
        assert!(!d.is_dirty());
        assert!(d.take_faults().is_empty());
        let mut r = Dedup::load(3000, &store).unwrap();
        for i in 0u32..20 {
            assert!(
                !r.first_time_from(&[1; 32], &i.to_be_bytes()),
                "id {i} kept"
            );
        }
        // Failing again after a success is a new fault.
        store.put_fails = Some(ENOSPC);
        assert!(d.first_time_from(&[1; 32], b"new"));
        assert!(d.flush(&mut store).is_err());
        assert_eq!(d.take_faults().len(), 1);
    }

    #[test]
    fn records_survive_reload_in_order_and_are_deleted_once_delivered() {
        let mut store = MemStore::new();
        let dest = Identity::generate().sign_id();
        let other = Identity::generate().sign_id();
        let mut b = OfflineBuffer::new(OfflineLimits::default(), 1_000);
        let k1 = b
            .add(
                &mut store,
                dest,
                Envelope::new("a", "ms", b"1".to_vec()),
                5_000,
            )
            .unwrap();
        let k2 = b
            .add(
                &mut store,
                dest,
                Envelope::new("b", "ms", b"2".to_vec()),
                9_000,
            )
            .unwrap();
        b.add(
            &mut store,
            other,
            Envelope::new("c", "ms", b"3".to_vec()),
            9_000,
        )
        .unwrap();
        store.put("unrelated", b"x").unwrap();
        store.put("offline-garbage", b"MMO1 not a record").unwrap();
        let (mut r, dropped) =
            OfflineBuffer::load(&mut store, OfflineLimits::default(), 2_000).unwrap();
        assert_eq!(dropped, 1);
        let faults = r.take_faults();
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].key, "offline-garbage");
        assert_eq!(faults[0].kind, StorageFaultKind::Damaged);
        assert_eq!(
            faults[0].kept_as.as_deref(),
            Some("damaged-offline-garbage")
        );
        assert_eq!(
            store.get("damaged-offline-garbage").unwrap().as_deref(),
            Some(&b"MMO1 not a record"[..]),
            "kept aside as it was"
        );
        assert_eq!(r.len(), 3);
        assert!(r.has_idle(&dest) && r.has_idle(&other));
        let taken = r.take_idle(&dest);
        assert_eq!(taken.iter().map(|t| t.0).collect::<Vec<_>>(), vec![k1, k2]);
        assert!(!r.has_idle(&dest));
        assert_eq!(r.idle_destinations(), vec![other]);
        assert!(r.take_idle(&dest).is_empty());
        assert_eq!(r.release(&k2), Some(dest));
        assert!(r.has_idle(&dest));
        assert!(r.delivered(&mut store, &k1));
        assert!(!r.delivered(&mut store, &k1));
        assert_eq!(r.idle_destinations().len(), 2);
        // k2 expires at 9000; k1 is gone.
        let gone = r.expire(&mut store, 9_000);
        assert_eq!(gone.len(), 2);
        assert!(r.is_empty());
        assert!(!r.has_idle(&dest) && !r.has_idle(&other));
        assert!(r.idle_destinations().is_empty());
        assert_eq!(
            store.keys().unwrap(),
            vec![
                "damaged-offline-garbage".to_string(),
                "unrelated".to_string()
            ]
        );
        assert!(r.take_faults().is_empty());
    }

    #[test]
    fn bounds_refuse_instead_of_growing() {
        let mut store = MemStore::new();
        let dest = Identity::generate().sign_id();
        let limits = OfflineLimits {
            max_records: 2,
            max_bytes: 1 << 20,
        };
        let mut b = OfflineBuffer::new(limits, 0);
        for _ in 0..2 {
            b.add(&mut store, dest, Envelope::new("t", "ms", vec![]), 10)
                .unwrap();
        }
        assert!(matches!(
            b.add(&mut store, dest, Envelope::new("t", "ms", vec![]), 10),
            Err(AddError::Full)
        ));
        let mut small = OfflineBuffer::new(
            OfflineLimits {
                max_records: 10,
                max_bytes: 10,
            },
            0,
        );
        assert!(matches!(
            small.add(&mut store, dest, Envelope::new("t", "ms", vec![0; 100]), 10),
            Err(AddError::Full)
        ));
    }

    #[test]
    fn dedup_memory_survives_a_restart() {
        let mut store = MemStore::new();
        let mut d = Dedup::new(3000);
        for i in 0u32..2500 {
            assert!(d.first_time(&i.to_be_bytes()));
            if i % 100 == 0 {
                d.flush(&mut store).unwrap();
            }
        }
        d.flush(&mut store).unwrap();
        assert!(!d.is_dirty());
        let keys = store.keys().unwrap();
        assert!(keys.len() <= 3, "a ring of chunks: {keys:?}");
        let mut r = Dedup::load(3000, &store).unwrap();
        for i in 0u32..2500 {
            assert!(!r.first_time(&i.to_be_bytes()), "id {i} remembered");
        }
        assert!(r.first_time(&9999u32.to_be_bytes()));
        store.put("dedup-1", b"short").unwrap();
        store
            .put("dedup-2", &[0, 0, 0, 0, 0, 0, 0, 9, 200, 1])
            .unwrap();
        assert!(
            Dedup::load(3000, &store).is_ok(),
            "malformed chunks are skipped"
        );
    }

    #[test]
    fn only_delivered_ids_are_stored() {
        let mut store = MemStore::new();
        let sender = [4u8; 32];
        let mut d = Dedup::new(100);
        assert!(d.seen_first_time(&sender, b"read-and-delivered"));
        assert!(d.seen_first_time(&sender, b"read-only"));
        assert!(
            !d.seen_first_time(&sender, b"read-only"),
            "a copy meanwhile is a duplicate"
        );
        d.delivered(&sender, b"read-and-delivered");
        d.flush(&mut store).unwrap();
        // After a crash: the delivered one is known, the one never delivered comes again.
        let mut r = Dedup::load(100, &store).unwrap();
        assert!(!r.first_time_from(&sender, b"read-and-delivered"));
        assert!(r.first_time_from(&sender, b"read-only"));
    }

    #[test]
    fn dedup_is_bounded() {
        let mut d = Dedup::new(2);
        assert!(d.first_time(b"a"));
        assert!(!d.first_time(b"a"));
        assert!(d.first_time(b"b"));
        assert!(d.first_time(b"c"));
        assert_eq!(d.len(), 2);
        assert!(d.first_time(b"a"), "oldest forgotten");
        assert!(d.first_time(&[0; 100]));
        assert!(d.first_time(&[0; 100]), "over-long ids are not remembered");
    }

    #[test]
    fn one_sender_flooding_ids_does_not_evict_another_senders_ids() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut d = Dedup::with_per_peer(100, 20);
        assert!(d.first_time_from(&b, b"retried"));
        for i in 0u32..10_000 {
            d.first_time_from(&a, &i.to_be_bytes());
        }
        assert!(
            !d.first_time_from(&b, b"retried"),
            "b's id survived a's flood"
        );
        assert!(d.len() <= 100 && d.senders() == 2);
        // The flood only evicted a's own oldest ids.
        assert!(d.first_time_from(&a, &0u32.to_be_bytes()));
        assert!(!d.first_time_from(&a, &9_999u32.to_be_bytes()));
        // The same id from another sender is a different message.
        assert!(d.first_time_from(&a, b"retried"));
    }

    #[test]
    fn the_least_recently_active_sender_goes_first_and_the_bound_holds() {
        let mut d = Dedup::with_per_peer(10, 5);
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        for i in 0u8..5 {
            assert!(d.first_time_from(&a, &[i]));
            assert!(d.first_time_from(&b, &[i]));
        }
        assert!(!d.first_time_from(&a, &[0]), "a active again");
        assert!(d.first_time_from(&c, &[0]));
        assert_eq!((d.len(), d.senders()), (6, 2), "b (least recent) forgotten");
        assert!(d.first_time_from(&b, &[1]));
        for s in 10u8..200 {
            d.first_time_from(&[s; 32], &[s]);
        }
        assert!(d.len() <= 10 && d.senders() <= 10);
    }

    #[test]
    fn per_sender_memory_survives_a_restart_and_old_data_is_read() {
        let mut store = MemStore::new();
        // First format: `seq | (len id)*` under `dedup-<n>`.
        let mut old = 3u64.to_be_bytes().to_vec();
        old.extend_from_slice(&[2, 7, 7]);
        store.put("dedup-0", &old).unwrap();
        store.put("dedup-1", b"junk").unwrap();
        let mut d = Dedup::load_with_per_peer(100, 10, &store).unwrap();
        assert!(
            !d.first_time_from(&[5; 32], &[7, 7]),
            "old ids still recognised"
        );
        assert!(d.first_time_from(&[5; 32], b"new"));
        d.flush(&mut store).unwrap();
        let keys = store.keys().unwrap();
        assert!(keys.iter().all(|k| !k.starts_with("dedup-")), "{keys:?}");
        let mut r = Dedup::load_with_per_peer(100, 10, &store).unwrap();
        assert!(!r.first_time_from(&[5; 32], b"new"));
        assert!(r.first_time_from(&[6; 32], b"new"), "kept per sender");
        store.put("dedup2-0", &[0, 0, 0, 0, 0, 0, 0, 1, 9]).unwrap();
        assert!(
            Dedup::load(100, &store).is_ok(),
            "malformed chunks are skipped"
        );
    }

    #[test]
    fn corrupted_sequence_numbers_do_not_crash_the_load() {
        let mut store = MemStore::new();
        let dest = Identity::generate().sign_id();
        let mut env = Envelope::new("a", "ms", b"1".to_vec());
        let id = [7u8; 16];
        env.id = Some(id.to_vec());
        store
            .put(
                &storage_key(&id),
                &encode_record(&dest, 9_000, u64::MAX, &env),
            )
            .unwrap();
        let mut chunk = u64::MAX.to_be_bytes().to_vec();
        chunk.extend_from_slice(&[1, 42]);
        store.put("dedup-0", &chunk).unwrap();
        let (mut b, dropped) =
            OfflineBuffer::load(&mut store, OfflineLimits::default(), 1_000).unwrap();
        assert_eq!((b.len(), dropped), (1, 0));
        b.add(&mut store, dest, Envelope::new("b", "ms", vec![]), 9_000)
            .unwrap();
        assert_eq!(b.len(), 2);
        let mut d = Dedup::load(16, &store).unwrap();
        assert!(!d.first_time(&[42]));
        assert!(d.first_time(&[43]));
        for i in 0u32..DEDUP_CHUNK as u32 {
            d.first_time(&i.to_be_bytes());
        }
        d.flush(&mut store).unwrap();
    }
}
