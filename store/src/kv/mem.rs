//! `MemKv`: an in-memory `KvEngine` with a crash model, for tests and the simulator.
//!
//! It keeps what a reader sees apart from what would survive a crash, with RocksDB's rules:
//! a synced write (and every logged write before it) survives; an unsynced logged write may
//! survive as a prefix of the log; an unlogged write survives only once its column family
//! has been flushed. [`MemKv::crash`] drops everything else, as a power cut would.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::{
    BatchOp, Column, ColumnUsage, Durability, KeyValue, KvEngine, KvError, KvView, ViewReader,
    WriteBatch, bounds, in_range,
};

type Table = BTreeMap<Vec<u8>, Vec<u8>>;
/// Durable state keeps each key's sequence number, so a flush that makes an older unlogged
/// write durable never overwrites a newer value that a sync already made durable.
type DurableTable = BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>;

#[derive(Debug, Default, Clone)]
struct State {
    visible: BTreeMap<Column, Table>,
    visible_bytes: usize,
    durable: BTreeMap<Column, DurableTable>,
    /// Durable range deletes still needed: a pending write older than one, made durable
    /// later (an unlogged put flushed after a synced range delete), must stay deleted.
    durable_ranges: Vec<DurableRange>,
    pending: Vec<PendingBatch>,
    next_sequence: u64,
    capacity_bytes: Option<usize>,
    /// Writes (and flushes, syncs) left before the process "dies" (None: never).
    writes_before_death: Option<usize>,
    /// The process died at a crash point: every call fails until [`MemKv::crash`].
    dead: bool,
    /// The disk acknowledges syncs from its cache (see [`MemKv::ignore_fsyncs`]).
    fsyncs_ignored: bool,
    /// What each synced write, flush and sync costs (see [`MemKv::set_slow`]).
    #[cfg(feature = "simulation")]
    slow: Option<std::time::Duration>,
}

#[derive(Debug, Clone)]
struct DurableRange {
    column: Column,
    start: Vec<u8>,
    end: Vec<u8>,
    sequence: u64,
}

#[derive(Debug, Clone)]
struct PendingBatch {
    sequence: u64,
    ops: Vec<BatchOp>,
    logged: bool,
}

/// In-memory engine with a crash model. Cheap to clone handles via `Arc`.
#[derive(Debug, Default)]
pub struct MemKv {
    state: Mutex<State>,
}

impl MemKv {
    /// An empty store with no capacity limit.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that refuses writes (with [`KvError::NoSpace`]) once its live keys
    /// and values would exceed `capacity_bytes`: a disk-full test without a real disk.
    #[must_use]
    pub fn with_capacity_bytes(capacity_bytes: usize) -> Self {
        let store = Self::default();
        store.lock().capacity_bytes = Some(capacity_bytes);
        store
    }

    /// Arms a crash point: after `writes` more writes, flushes or syncs, the next one and
    /// every call after it fail with [`KvError::Crashed`], as if the process died there,
    /// until [`MemKv::crash`] restarts the store.
    pub fn die_after_writes(&self, writes: usize) {
        self.lock().writes_before_death = Some(writes);
    }

    /// Makes this store a disk whose write cache acknowledges log syncs it never did (a
    /// drive without power-loss protection, or one that ignores barriers): a synced write
    /// is kept only as a logged one and `sync` makes nothing durable, so a power cut keeps
    /// what was durable before plus a prefix of the log. A flush of a column (whole
    /// files written and closed) still lands. It stays so across power cuts (the same
    /// drive).
    pub fn ignore_fsyncs(&self) {
        self.lock().fsyncs_ignored = true;
    }

    /// Makes this store a slow disk (None: a fast one again): each synced write, flush
    /// and sync costs `per_sync` of simulated time, owed by the work that called it and
    /// paid where that work holds no lock (see [`crate::faults::slow_disks`]).
    #[cfg(feature = "simulation")]
    pub fn set_slow(&self, per_sync: Option<std::time::Duration>) {
        self.lock().slow = per_sync;
    }

    /// A copy of this store as it is now (what a reader sees and what a crash would
    /// keep): a simulator cuts the power on the copy to see what the disk would lose.
    #[must_use]
    pub fn fork(&self) -> Self {
        Self {
            state: Mutex::new(self.lock().clone()),
        }
    }

    /// Whether an armed crash point was reached.
    #[must_use]
    pub fn died(&self) -> bool {
        self.lock().dead
    }

    /// Simulates a power cut and restart: every write that was not durable is lost, except
    /// the first `surviving_unsynced_logged_batches` logged-but-unsynced batches (a torn log
    /// keeps a prefix). Batches stay atomic.
    pub fn crash(&self, surviving_unsynced_logged_batches: usize) {
        let mut state = self.lock();
        state.dead = false;
        state.writes_before_death = None;
        let pending = std::mem::take(&mut state.pending);
        let surviving = pending
            .into_iter()
            .filter(|batch| batch.logged)
            .take(surviving_unsynced_logged_batches);
        for batch in surviving {
            state.make_durable(batch.sequence, &batch.ops);
        }
        state.forget_spent_ranges();
        let mut visible: BTreeMap<Column, Table> = BTreeMap::new();
        let mut visible_bytes = 0;
        for (column, table) in &state.durable {
            let live = visible.entry(*column).or_default();
            for (key, (_, value)) in table {
                if let Some(value) = value {
                    visible_bytes += key.len() + value.len();
                    live.insert(key.clone(), value.clone());
                }
            }
        }
        state.visible = visible;
        state.visible_bytes = visible_bytes;
    }

    /// A power cut that ends the process using this store: the store returned is the
    /// disk as the next boot finds it (as [`MemKv::crash`] leaves it), and this one is dead
    /// for good, every call failing with [`KvError::Crashed`]. A thread of the dead process
    /// that is still running (the simulator cannot stop a blocking call half way) then
    /// writes nothing the next boot sees.
    #[must_use]
    pub fn power_cut(&self, surviving_unsynced_logged_batches: usize) -> Self {
        let mut state = self.lock();
        let disk = std::mem::take(&mut *state);
        state.dead = true;
        // Never armed again: `dead` stays set (nothing calls `crash` on a replaced store).
        state.writes_before_death = None;
        drop(state);
        let next = Self {
            state: Mutex::new(disk),
        };
        next.crash(surviving_unsynced_logged_batches);
        next
    }

    /// Bytes of live keys and values.
    #[must_use]
    pub fn live_bytes(&self) -> usize {
        self.lock().visible_bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent map (every mutation below is
        // completed before returning), so a poisoned lock is safe to keep using.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    /// A synced write, flush or sync on a slow disk: its cost is owed (see
    /// [`MemKv::set_slow`]).
    fn waits_for_the_disk(&self) {
        #[cfg(feature = "simulation")]
        if let Some(per_sync) = self.slow {
            crate::faults::slow_disks::owe(per_sync);
        }
    }

    /// Counts one write towards an armed crash point; fails once the process is dead.
    fn write_point(&mut self) -> Result<(), KvError> {
        if self.dead {
            return Err(KvError::Crashed);
        }
        match &mut self.writes_before_death {
            Some(0) => {
                self.dead = true;
                Err(KvError::Crashed)
            }
            Some(left) => {
                *left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn alive(&self) -> Result<(), KvError> {
        if self.dead {
            Err(KvError::Crashed)
        } else {
            Ok(())
        }
    }

    fn make_durable(&mut self, sequence: u64, ops: &[BatchOp]) {
        for op in ops {
            let (column, key, value) = match op {
                BatchOp::Put { column, key, value } => (*column, key, Some(value.clone())),
                BatchOp::Delete { column, key } => (*column, key, None),
                BatchOp::DeleteRange { column, start, end } => {
                    let table = self.durable.entry(*column).or_default();
                    for (_, entry) in table.range_mut::<[u8], _>(bounds(start, Some(end))) {
                        if entry.0 < sequence {
                            *entry = (sequence, None);
                        }
                    }
                    self.durable_ranges.push(DurableRange {
                        column: *column,
                        start: start.clone(),
                        end: end.clone(),
                        sequence,
                    });
                    continue;
                }
            };
            let deleted_later = self.durable_ranges.iter().any(|range| {
                range.column == column
                    && range.sequence > sequence
                    && in_range(key, &range.start, Some(&range.end))
            });
            if deleted_later {
                continue;
            }
            let table = self.durable.entry(column).or_default();
            match table.get(key) {
                Some((existing, _)) if *existing > sequence => {}
                _ => {
                    table.insert(key.clone(), (sequence, value));
                }
            }
        }
    }

    /// Drops the durable range deletes no pending write is older than (nothing can be
    /// made durable under them any more). Called once `pending` is whole again.
    fn forget_spent_ranges(&mut self) {
        let oldest_pending = self.pending.iter().map(|batch| batch.sequence).min();
        self.durable_ranges
            .retain(|range| oldest_pending.is_some_and(|oldest| oldest < range.sequence));
    }

    fn remove_visible_range(&mut self, column: Column, start: &[u8], end: &[u8]) {
        let Some(table) = self.visible.get_mut(&column) else {
            return;
        };
        let doomed: Vec<Vec<u8>> = table
            .range::<[u8], _>(bounds(start, Some(end)))
            .map(|(key, _)| key.clone())
            .collect();
        for key in doomed {
            if let Some(value) = table.remove(&key) {
                self.visible_bytes = self.visible_bytes.saturating_sub(key.len() + value.len());
            }
        }
    }

    fn sync_logged(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for batch in pending {
            if batch.logged {
                self.make_durable(batch.sequence, &batch.ops);
            } else {
                self.pending.push(batch);
            }
        }
        self.forget_spent_ranges();
    }

    /// The live bytes after `batch` (an estimate when one batch writes a key twice).
    fn size_after(&self, batch: &WriteBatch) -> usize {
        let mut size = self.visible_bytes;
        for op in batch.ops() {
            let (column, key) = match op {
                BatchOp::Put { column, key, .. } | BatchOp::Delete { column, key } => {
                    (*column, key)
                }
                BatchOp::DeleteRange { column, start, end } => {
                    let removed: usize = self
                        .visible
                        .get(column)
                        .into_iter()
                        .flat_map(|table| table.range::<[u8], _>(bounds(start, Some(end))))
                        .map(|(key, value)| key.len() + value.len())
                        .sum();
                    size = size.saturating_sub(removed);
                    continue;
                }
            };
            if let Some(old) = self.visible.get(&column).and_then(|table| table.get(key)) {
                size = size.saturating_sub(key.len() + old.len());
            }
            if let BatchOp::Put { value, .. } = op {
                size += key.len() + value.len();
            }
        }
        size
    }
}

impl KvEngine for MemKv {
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let state = self.lock();
        state.alive()?;
        Ok(get_in(&state.visible, column, key))
    }

    fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), KvError> {
        let mut state = self.lock();
        state.write_point()?;
        let size_after = state.size_after(&batch);
        if state
            .capacity_bytes
            .is_some_and(|capacity| size_after > capacity)
        {
            return Err(KvError::NoSpace {
                path: "memory".into(),
            });
        }
        for op in batch.ops() {
            match op {
                BatchOp::Put { column, key, value } => {
                    state
                        .visible
                        .entry(*column)
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                BatchOp::Delete { column, key } => {
                    if let Some(table) = state.visible.get_mut(column) {
                        table.remove(key);
                    }
                }
                BatchOp::DeleteRange { column, start, end } => {
                    state.remove_visible_range(*column, start, end);
                }
            }
        }
        state.visible_bytes = size_after;
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        match durability {
            Durability::Unlogged => state.pending.push(PendingBatch {
                sequence,
                ops: batch.ops,
                logged: false,
            }),
            Durability::Logged => state.pending.push(PendingBatch {
                sequence,
                ops: batch.ops,
                logged: true,
            }),
            // A disk that ignores fsyncs keeps the write in its cache, as a logged one.
            Durability::Synced if state.fsyncs_ignored => state.pending.push(PendingBatch {
                sequence,
                ops: batch.ops,
                logged: true,
            }),
            Durability::Synced => {
                state.waits_for_the_disk();
                state.sync_logged();
                state.make_durable(sequence, &batch.ops);
                state.forget_spent_ranges();
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        let state = self.lock();
        state.alive()?;
        Ok(scan_in(&state.visible, column, start, end, limit))
    }

    fn last_in_range(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Option<KeyValue>, KvError> {
        let state = self.lock();
        state.alive()?;
        if end.is_some_and(|end| end <= start) {
            return Ok(None);
        }
        Ok(state.visible.get(&column).and_then(|table| {
            table
                .range::<[u8], _>(bounds(start, end))
                .next_back()
                .map(|(key, value)| (key.clone(), value.clone()))
        }))
    }

    fn read_view(&self, read: &mut ViewReader<'_>) -> Result<(), KvError> {
        let view = {
            let state = self.lock();
            state.alive()?;
            MemView {
                tables: state.visible.clone(),
            }
        };
        read(&view)
    }

    fn flush(&self, columns: &[Column]) -> Result<(), KvError> {
        let mut state = self.lock();
        state.write_point()?;
        state.waits_for_the_disk();
        let pending = std::mem::take(&mut state.pending);
        for mut batch in pending {
            let (flushed, kept): (Vec<BatchOp>, Vec<BatchOp>) = batch
                .ops
                .into_iter()
                .partition(|op| columns.contains(&op.column()));
            state.make_durable(batch.sequence, &flushed);
            if !kept.is_empty() {
                batch.ops = kept;
                state.pending.push(batch);
            }
        }
        state.forget_spent_ranges();
        Ok(())
    }

    fn sync(&self) -> Result<(), KvError> {
        let mut state = self.lock();
        state.write_point()?;
        state.waits_for_the_disk();
        if !state.fsyncs_ignored {
            state.sync_logged();
        }
        Ok(())
    }

    fn compact(&self, _column: Column) -> Result<(), KvError> {
        Ok(())
    }

    fn usage(&self, column: Column) -> Result<ColumnUsage, KvError> {
        let state = self.lock();
        let mut usage = ColumnUsage::default();
        for (key, value) in state.visible.get(&column).into_iter().flatten() {
            usage.keys += 1;
            let bytes = (key.len() + value.len()) as u64;
            if column.holds_large_values() && value.len() >= LARGE_VALUE_BYTES {
                usage.blob_bytes += bytes;
            } else {
                usage.table_bytes += bytes;
            }
        }
        Ok(usage)
    }
}

/// A copy of what was visible when the view was taken.
struct MemView {
    tables: BTreeMap<Column, Table>,
}

impl KvView for MemView {
    fn get(&self, column: Column, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        Ok(get_in(&self.tables, column, key))
    }

    fn scan(
        &self,
        column: Column,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, KvError> {
        Ok(scan_in(&self.tables, column, start, end, limit))
    }
}

/// A key's value in `tables` (the live store's, or a view's copy).
fn get_in(tables: &BTreeMap<Column, Table>, column: Column, key: &[u8]) -> Option<Vec<u8>> {
    tables
        .get(&column)
        .and_then(|table| table.get(key))
        .cloned()
}

/// Up to `limit` pairs of `[start, end)` in `tables`, in key order.
fn scan_in(
    tables: &BTreeMap<Column, Table>,
    column: Column,
    start: &[u8],
    end: Option<&[u8]>,
    limit: usize,
) -> Vec<KeyValue> {
    if end.is_some_and(|end| end <= start) {
        return Vec::new();
    }
    tables
        .get(&column)
        .into_iter()
        .flat_map(|table| table.range::<[u8], _>(bounds(start, end)))
        .take(limit)
        .inspect(|(key, _)| debug_assert!(in_range(key, start, end)))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Where MemKv counts a value as a blob in [`ColumnUsage`]: RocksKv's default minimum blob size.
const LARGE_VALUE_BYTES: usize = 1024;
