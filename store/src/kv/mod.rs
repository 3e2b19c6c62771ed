//! `KvEngine`: the only door to storage. RocksDB in production ([`RocksKv`]), memory with a
//! crash model in tests and the simulator ([`MemKv`]). Raft log, state machine and chunk
//! store are written once, on top of this trait.
//!
//! Durability is explicit, because the snapshot is the unit of acknowledgement:
//! chunk shards are written [`Durability::Unlogged`] (no write-ahead log, so their bytes
//! reach the disk once, in blob files) and made durable by [`KvEngine::flush`]; the ref
//! update that publishes a snapshot is written [`Durability::Synced`] afterwards.

mod mem;
#[cfg(feature = "rocksdb")]
mod rocks;
mod syncer;

use std::ops::Bound;

pub use mem::MemKv;
#[cfg(feature = "rocksdb")]
pub use rocks::{RocksKv, RocksKvOptions, UnfinishedBlobFiles, remove_unfinished_blob_files};
pub use syncer::{SyncDone, Syncer};

/// The column families. Each is an independent ordered key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Column {
    /// Erasure shards of chunk ciphertext, keyed by cid and shard index. Large values:
    /// RocksDB keeps them in blob files.
    Shards,
    /// Sealed objects (manifests, trees, snapshot commits) and reference-index nodes.
    Objects,
    /// Branch refs, updated by compare-and-swap.
    Refs,
    /// Everything else small: volume records, domain records, dedup index, counters.
    Meta,
    /// Raft log entries (the cluster issue).
    RaftLog,
    /// Raft hard state and state-machine snapshots (the cluster issue).
    RaftState,
}

impl Column {
    /// Every column family, in a fixed order.
    pub const ALL: [Self; 6] = [
        Self::Shards,
        Self::Objects,
        Self::Refs,
        Self::Meta,
        Self::RaftLog,
        Self::RaftState,
    ];

    /// The column family's name on disk. Frozen: renaming one orphans its data.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Shards => "shards",
            Self::Objects => "objects",
            Self::Refs => "refs",
            Self::Meta => "meta",
            Self::RaftLog => "raft_log",
            Self::RaftState => "raft_state",
        }
    }

    /// Whether values in this column are large enough to live in blob files.
    #[must_use]
    pub const fn holds_large_values(self) -> bool {
        matches!(self, Self::Shards | Self::Objects)
    }
}

/// How durable a write is when [`KvEngine::write`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Not logged: lost on a crash until a later [`KvEngine::flush`] of its columns. Used
    /// for bulk chunk data, so its bytes are written once (blob file), not twice (log + blob).
    Unlogged,
    /// Logged but not synced: survives a process crash, not a power cut, until
    /// [`KvEngine::sync`] or a later synced write.
    Logged,
    /// Logged and synced before returning.
    Synced,
}

/// One operation in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Insert or overwrite.
    Put {
        column: Column,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// Remove (absent keys are fine).
    Delete { column: Column, key: Vec<u8> },
    /// Remove every key in `[start, end)` (a Raft log's truncation and purge, a group's
    /// state replaced by a snapshot): one operation whatever the number of keys.
    DeleteRange {
        column: Column,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

impl BatchOp {
    /// The column it writes.
    #[must_use]
    pub fn column(&self) -> Column {
        match self {
            Self::Put { column, .. }
            | Self::Delete { column, .. }
            | Self::DeleteRange { column, .. } => *column,
        }
    }
}

/// An atomic group of writes: all apply, or (after a crash) none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<BatchOp>,
    payload_bytes: usize,
}

impl WriteBatch {
    /// An empty batch.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, column: Column, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let (key, value) = (key.into(), value.into());
        self.payload_bytes += key.len() + value.len();
        self.ops.push(BatchOp::Put { column, key, value });
    }

    /// Adds a delete.
    pub fn delete(&mut self, column: Column, key: impl Into<Vec<u8>>) {
        let key = key.into();
        self.payload_bytes += key.len();
        self.ops.push(BatchOp::Delete { column, key });
    }

    /// Adds a delete of every key in `[start, end)` of `column` (nothing when `end <= start`).
    pub fn delete_range(
        &mut self,
        column: Column,
        start: impl Into<Vec<u8>>,
        end: impl Into<Vec<u8>>,
    ) {
        let (start, end) = (start.into(), end.into());
        if end <= start {
            return;
        }
        self.payload_bytes += start.len() + end.len();
        self.ops.push(BatchOp::DeleteRange { column, start, end });
    }

    /// Moves every operation of `other` to the end of this batch.
    pub fn append(&mut self, other: WriteBatch) {
        self.payload_bytes += other.payload_bytes;
        self.ops.extend(other.ops);
    }

    /// Takes the operations out, leaving this batch empty.
    #[must_use]
    pub fn take(&mut self) -> WriteBatch {
        std::mem::take(self)
    }

    /// The operations, in order.
    #[must_use]
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }

    /// Number of operations.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no operations.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Key and value bytes in the batch, for sizing batches.
    #[must_use]
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }
}

/// A key-value pair returned by a scan.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Errors of a storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Another process holds the database (RocksDB admits one per directory).
    #[error("the store at {path} is in use by another process")]
    Busy { path: String },
    /// The device is full; the write did not happen.
    #[error(
        "no space left on the device holding {path}: free space and retry (nothing was half-written)"
    )]
    NoSpace { path: String },
    /// The engine reported corruption.
    #[error("storage corruption: {detail}")]
    Corruption { detail: String },
    /// A simulated crash: the engine is unusable until reopened (MemKv only).
    #[error("the store crashed (simulated) and must be reopened")]
    Crashed,
    /// Any other engine failure.
    #[error("storage engine error: {detail}")]
    Engine { detail: String },
}

/// A consistent point-in-time view of an engine: every read sees the store as it was when
/// the view was taken, whatever is written meanwhile (a state-machine snapshot is built
/// from one while the group goes on applying).
pub trait KvView {
    /// Reads one value as of the view.
    ///
    /// # Errors
    /// Engine failures.
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;

    /// Up to `limit` pairs with keys in `[start, end)` (or to the end) as of the view, in
    /// key order.
    ///
    /// # Errors
    /// Engine failures.
    fn scan(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, KvError>;
}

/// What [`KvEngine::read_view`] runs against the view.
pub type ViewReader<'a> = dyn FnMut(&dyn KvView) -> Result<(), KvError> + 'a;

/// The storage seam. Implementations are cheap to share across threads.
pub trait KvEngine: Send + Sync + std::fmt::Debug {
    /// Reads one value.
    ///
    /// # Errors
    /// Engine failures.
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;

    /// Whether `key` is stored in `column`. Cheaper than [`KvEngine::get`] when the
    /// answer is usually no: RocksKv asks its bloom filters before touching a value.
    ///
    /// # Errors
    /// Engine failures.
    fn contains(&self, column: Column, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.get(column, key)?.is_some())
    }

    /// Applies a batch atomically with the given durability.
    ///
    /// # Errors
    /// Engine failures, [`KvError::NoSpace`] when the disk is full (nothing applied).
    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), KvError>;

    /// Up to `limit` pairs with keys in `[start, end)` (or to the end), in key order.
    ///
    /// # Errors
    /// Engine failures.
    fn scan(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, KvError>;

    /// The pair with the greatest key in `[start, end)` (or to the end), if any: a Raft
    /// log's last entry without reading the log.
    ///
    /// # Errors
    /// Engine failures.
    fn last_in_range(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Option<KeyValue>, KvError>;

    /// Runs `read` against a consistent point-in-time view of the whole store, released
    /// when it returns.
    ///
    /// # Errors
    /// Engine failures, or what `read` returns.
    fn read_view(&self, read: &mut ViewReader<'_>) -> Result<(), KvError>;

    /// Makes every earlier write to `columns`, unlogged ones included, durable.
    ///
    /// # Errors
    /// Engine failures.
    fn flush(&self, columns: &[Column]) -> Result<(), KvError>;

    /// Makes every earlier logged write durable.
    ///
    /// # Errors
    /// Engine failures.
    fn sync(&self) -> Result<(), KvError>;

    /// Reclaims space of deleted values (compaction and blob garbage collection).
    ///
    /// # Errors
    /// Engine failures.
    fn compact(&self, column: Column) -> Result<(), KvError>;

    /// What `column` occupies: where the bytes go is what an operator (and the stored-bytes
    /// benchmark) needs to see.
    ///
    /// # Errors
    /// Engine failures.
    fn usage(&self, column: Column) -> Result<ColumnUsage, KvError>;
}

/// Space used by one column family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ColumnUsage {
    /// Keys, estimated by the engine.
    pub keys: u64,
    /// Bytes in table files (keys, small values, indexes, filters); for [`MemKv`], live
    /// keys and values that are not large.
    pub table_bytes: u64,
    /// Bytes in blob files (large values, garbage not yet collected included).
    pub blob_bytes: u64,
    /// Bytes the engine estimates its compactions must still rewrite (0 for [`MemKv`]):
    /// a backlog that grows under a sustained import means writes outrun compaction.
    pub pending_compaction_bytes: u64,
}

/// The exclusive upper bound of all keys that start with `prefix` (None: no bound).
#[must_use]
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub(crate) fn in_range(key: &[u8], start: &[u8], end: Option<&[u8]>) -> bool {
    key >= start && end.is_none_or(|end| key < end)
}

pub(crate) fn bounds<'a>(
    start: &'a [u8],
    end: Option<&'a [u8]>,
) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (
        Bound::Included(start),
        end.map_or(Bound::Unbounded, Bound::Excluded),
    )
}
