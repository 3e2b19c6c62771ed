//! A group's Raft log and hard state on the shared `KvEngine`.
//!
//! Appends are written logged (not synced) and reported durable only once the engine's
//! [`Syncer`] has synced them: many groups appending together share one fsync, and no
//! Raft task blocks on the disk. Without a syncer (the simulator, MemKv) the append syncs
//! in place. The vote is written synced before it returns: a node must never vote twice
//! in a term, even across a power cut.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use forge_store::kv::{Column, Durability, KvEngine, Syncer, WriteBatch};
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};

use crate::keys::{COMMITTED, PURGED, VOTE, decode, encode, index_of, log_end, log_key, state_key};
use crate::types::{GroupId, TypeConfig};

pub(crate) fn io_error(error: impl std::fmt::Display) -> io::Error {
    io::Error::other(error.to_string())
}

/// One group's log. Cheap to clone (the reader is a clone).
#[derive(Clone)]
pub struct KvLogStore {
    kv: Arc<dyn KvEngine>,
    group: GroupId,
    syncer: Option<Arc<Syncer>>,
}

impl Debug for KvLogStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KvLogStore")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl KvLogStore {
    /// The log of `group` in `kv`; `syncer` batches its fsyncs (None: sync in place).
    #[must_use]
    pub fn new(kv: Arc<dyn KvEngine>, group: GroupId, syncer: Option<Arc<Syncer>>) -> Self {
        Self { kv, group, syncer }
    }

    fn read_state<T: serde::de::DeserializeOwned>(
        &self,
        kind: u8,
        what: &str,
    ) -> io::Result<Option<T>> {
        self.kv
            .get(Column::RaftState, &state_key(kind, self.group))
            .map_err(io_error)?
            .map(|bytes| decode(&bytes, what))
            .transpose()
    }

    fn write(&self, batch: WriteBatch, durability: Durability) -> io::Result<()> {
        self.kv.write(batch, durability).map_err(io_error)
    }
}

impl RaftLogReader<TypeConfig> for KvLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => index.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(index) => index.checked_add(1).map_or_else(
                || log_end(self.group),
                |end| log_key(self.group, end).to_vec(),
            ),
            Bound::Excluded(index) => log_key(self.group, *index).to_vec(),
            Bound::Unbounded => log_end(self.group),
        };
        let pairs = self
            .kv
            .scan(
                Column::RaftLog,
                &log_key(self.group, start),
                Some(&end),
                usize::MAX,
            )
            .map_err(io_error)?;
        pairs
            .iter()
            .map(|(key, value)| {
                let index = index_of(key)?;
                decode(value, &format!("log entry {index} of group {}", self.group))
            })
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.read_state(VOTE, "the vote")
    }
}

impl RaftLogStorage<TypeConfig> for KvLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogIdOf<TypeConfig>> = self.read_state(PURGED, "the purged log id")?;
        let last = self
            .kv
            .last_in_range(
                Column::RaftLog,
                &log_key(self.group, 0),
                Some(&log_end(self.group)),
            )
            .map_err(io_error)?;
        let last_log_id = match last {
            Some((key, value)) => {
                let index = index_of(&key)?;
                let entry: EntryOf<TypeConfig> = decode(
                    &value,
                    &format!("log entry {index} of group {}", self.group),
                )?;
                Some(entry.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        let mut batch = WriteBatch::new();
        batch.put(
            Column::RaftState,
            state_key(VOTE, self.group),
            encode(vote)?,
        );
        on_the_disk(|| self.write(batch, Durability::Synced)).await
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let mut batch = WriteBatch::new();
        batch.put(
            Column::RaftState,
            state_key(COMMITTED, self.group),
            encode(&committed)?,
        );
        self.write(batch, Durability::Logged)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .read_state::<Option<LogIdOf<TypeConfig>>>(COMMITTED, "the committed log id")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = WriteBatch::new();
        for entry in entries {
            if forge_store::injected_bug!("apply-uncommitted") {
                apply_at_append(&mut batch, self.group, &entry);
            }
            batch.put(
                Column::RaftLog,
                log_key(self.group, entry.log_id.index),
                encode(&entry)?,
            );
        }
        self.write(batch, Durability::Logged)?;
        match &self.syncer {
            Some(syncer) => syncer.after_sync(Box::new(move |outcome| {
                callback.io_completed(outcome.map_err(io_error));
            })),
            None => callback.io_completed(on_the_disk(|| self.kv.sync()).await.map_err(io_error)),
        }
        Ok(())
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let first_removed = last_log_id.map_or(0, |log_id| log_id.index.saturating_add(1));
        let mut batch = WriteBatch::new();
        batch.delete_range(
            Column::RaftLog,
            log_key(self.group, first_removed).to_vec(),
            log_end(self.group),
        );
        // Logged: the next append's sync makes it durable before anything after it is
        // reported durable (the log keeps write order).
        self.write(batch, Durability::Logged)
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        let mut batch = WriteBatch::new();
        batch.put(
            Column::RaftState,
            state_key(PURGED, self.group),
            encode(&log_id)?,
        );
        batch.delete_range(
            Column::RaftLog,
            log_key(self.group, 0).to_vec(),
            log_key(self.group, log_id.index.saturating_add(1)).to_vec(),
        );
        self.write(batch, Durability::Logged)
    }
}

/// Runs synchronous disk `work`; under the simulator it then waits what a slow disk made
/// it owe (`forge_store::faults::slow_disks`): nothing is held here, openraft awaits its
/// storage call, so a slow vote or log sync delays what waits on it and nothing else.
pub(crate) async fn on_the_disk<T>(work: impl FnOnce() -> T) -> T {
    #[cfg(feature = "simulation")]
    {
        let (output, owed) = forge_store::faults::slow_disks::collect(work);
        if !owed.is_zero() {
            tokio::time::sleep(owed).await;
        }
        output
    }
    #[cfg(not(feature = "simulation"))]
    work()
}

/// The simulator's injected bug `apply-uncommitted`: an entry's writes reach the state
/// machine's records as soon as it is appended, before it is committed (a later
/// truncation leaves them behind).
#[cfg(feature = "simulation")]
fn apply_at_append(batch: &mut WriteBatch, group: GroupId, entry: &EntryOf<TypeConfig>) {
    if let openraft::EntryPayload::Normal(crate::types::Command::Apply(updates)) = &entry.payload {
        for update in updates {
            let key = crate::keys::record_key(group, &update.space, &update.key);
            match &update.write {
                crate::types::Write::Keep => {}
                crate::types::Write::Put(value) => {
                    batch.put(Column::RaftState, key, value.clone());
                }
                crate::types::Write::Delete => batch.delete(Column::RaftState, key),
            }
        }
    }
}

#[cfg(not(feature = "simulation"))]
fn apply_at_append(_: &mut WriteBatch, _: GroupId, _: &EntryOf<TypeConfig>) {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use forge_store::kv::{MemKv, RocksKv, RocksKvOptions};
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;
    use crate::state_machine::KvStateMachine;

    /// Each build: a fresh engine (RocksDB in a temporary directory, or memory), with
    /// another group's state beside it, which must not leak into the one under test.
    struct Engines {
        rocks: bool,
        syncer: bool,
    }

    impl StoreBuilder<TypeConfig, KvLogStore, KvStateMachine, Option<tempfile::TempDir>> for Engines {
        async fn build(
            &self,
        ) -> Result<(Option<tempfile::TempDir>, KvLogStore, KvStateMachine), StorageError<TypeConfig>>
        {
            let (dir, kv): (_, Arc<dyn KvEngine>) = if self.rocks {
                let dir = tempfile::tempdir().unwrap();
                let kv = RocksKv::open(dir.path(), &RocksKvOptions::default()).unwrap();
                (Some(dir), Arc::new(kv))
            } else {
                (None, Arc::new(MemKv::new()))
            };
            let syncer = self
                .syncer
                .then(|| Arc::new(Syncer::start(kv.clone()).unwrap()));
            // A neighbour group's log entry and record, in the same columns.
            let mut batch = WriteBatch::new();
            batch.put(Column::RaftLog, log_key(8, 1), b"garbage".to_vec());
            batch.put(Column::RaftLog, log_key(6, 900), b"garbage".to_vec());
            batch.put(
                Column::RaftState,
                crate::keys::record_key(6, "refs", b"x"),
                b"y".to_vec(),
            );
            kv.write(batch, Durability::Synced).unwrap();
            Ok((
                dir,
                KvLogStore::new(kv.clone(), 7, syncer),
                KvStateMachine::new(kv, 7),
            ))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_and_state_machine_pass_openraft_storage_suite_on_memory() {
        Suite::test_all(Engines {
            rocks: false,
            syncer: false,
        })
        .await
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_and_state_machine_pass_openraft_storage_suite_on_rocksdb_with_the_syncer() {
        Suite::test_all(Engines {
            rocks: true,
            syncer: true,
        })
        .await
        .unwrap();
    }
}
