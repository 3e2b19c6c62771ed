//! A group's state machine: metadata records on the shared `KvEngine`, changed only by
//! applying committed [`Command`]s, each an all-or-nothing multi-record compare-and-swap.
//!
//! It is persistent: each entry's records and the last applied log id are written in one
//! batch, so a restart resumes from what was applied (openraft re-applies the committed
//! entries after it). A snapshot is built from a point-in-time view of the group's
//! records while the group goes on applying; installing one replaces them in one batch.

use std::fmt::Debug;
use std::io::{self, Cursor};
use std::sync::Arc;

use forge_store::kv::{Column, Durability, KvEngine, WriteBatch};
use futures_util::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{EntryPayload, StoredMembership};
use serde::{Deserialize, Serialize};

use crate::keys::{
    APPLIED, SNAPSHOT, decode, encode, record_key, records_end, records_start, state_key,
};
use crate::log_store::io_error;
use crate::types::{Command, Expect, GroupId, Outcome, TypeConfig, Update, Write};

/// A replica's applied log index and every record of the group (key within the group,
/// value), read at one point in time.
pub type ReplicaState = (Option<u64>, Vec<forge_store::kv::KeyValue>);

/// What `a` ‖ group holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    log_id: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
}

/// A snapshot's data: the applied state and every record (key within the group).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotData {
    records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What `s` ‖ group holds: the current snapshot.
#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
}

/// One group's state machine. Cheap to clone.
#[derive(Clone)]
pub struct KvStateMachine {
    kv: Arc<dyn KvEngine>,
    group: GroupId,
}

impl Debug for KvStateMachine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KvStateMachine")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl KvStateMachine {
    /// The state machine of `group` in `kv`.
    #[must_use]
    pub fn new(kv: Arc<dyn KvEngine>, group: GroupId) -> Self {
        Self { kv, group }
    }

    /// One record as applied here (not linearizable by itself: see
    /// [`crate::GroupHandle::read_record`]).
    ///
    /// # Errors
    /// Engine failures.
    pub fn record(&self, space: &str, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.kv
            .get(Column::RaftState, &record_key(self.group, space, key))
            .map_err(io_error)
    }

    /// Every record of `space` whose key starts with `prefix`, as applied here.
    ///
    /// # Errors
    /// Engine failures.
    pub fn records(
        &self,
        space: &str,
        prefix: &[u8],
    ) -> io::Result<forge_store::metadata::Records> {
        let start = record_key(self.group, space, prefix);
        let end = forge_store::kv::prefix_end(&start);
        let skip = record_key(self.group, space, b"").len();
        Ok(self
            .kv
            .scan(Column::RaftState, &start, end.as_deref(), usize::MAX)
            .map_err(io_error)?
            .into_iter()
            .map(|(key, value)| (key[skip..].to_vec(), value))
            .collect())
    }

    fn applied(&self) -> io::Result<Applied> {
        Ok(self
            .kv
            .get(Column::RaftState, &state_key(APPLIED, self.group))
            .map_err(io_error)?
            .map(|bytes| decode(&bytes, "the applied state"))
            .transpose()?
            .unwrap_or_default())
    }

    /// The applied state and every record of the group (full keys), read at one point in
    /// time: whatever is applied meanwhile is in neither or both.
    fn applied_and_records(&self) -> io::Result<(Applied, Vec<forge_store::kv::KeyValue>)> {
        let mut taken = None;
        let group = self.group;
        self.kv
            .read_view(&mut |view| {
                let applied = view.get(Column::RaftState, &state_key(APPLIED, group))?;
                let records = view.scan(
                    Column::RaftState,
                    &records_start(group),
                    Some(&records_end(group)),
                    usize::MAX,
                )?;
                taken = Some((applied, records));
                Ok(())
            })
            .map_err(io_error)?;
        let (applied, records) = taken.unwrap_or_default();
        let applied: Applied = match applied {
            Some(bytes) => decode(&bytes, "the applied state")?,
            None => Applied::default(),
        };
        Ok((applied, records))
    }

    /// The applied log index and every record of the group, read at one point in time
    /// (what the simulator compares across replicas at equal applied indexes).
    pub(crate) fn applied_view(&self) -> io::Result<ReplicaState> {
        let (applied, records) = self.applied_and_records()?;
        Ok((applied.log_id.map(|log_id| log_id.index), records))
    }

    /// Checks every condition of `updates`; the first that fails.
    fn conflict(&self, updates: &[Update]) -> io::Result<Option<Outcome>> {
        for update in updates {
            let current = self.record(&update.space, &update.key)?;
            let holds = match &update.expect {
                Expect::Any => true,
                Expect::Absent => current.is_none(),
                Expect::Value(value) => current.as_ref() == Some(value),
            };
            if !holds {
                return Ok(Some(Outcome::Conflict {
                    space: update.space.clone(),
                    key: update.key.clone(),
                }));
            }
        }
        Ok(None)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for KvStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(
        &mut self,
    ) -> Result<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>, io::Error> {
        // One view: the applied state and the records it describes, whatever is applied
        // while the snapshot is written.
        let (applied, records) = self.applied_and_records()?;
        let group = self.group;
        let skip = records_start(group).len();
        let data = encode(&SnapshotData {
            records: records
                .into_iter()
                .map(|(key, value)| (key[skip..].to_vec(), value))
                .collect(),
        })?;
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id: applied.log_id,
            last_membership: applied.membership,
        };
        let mut batch = WriteBatch::new();
        batch.put(
            Column::RaftState,
            state_key(SNAPSHOT, group),
            encode(&StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            })?,
        );
        self.kv.write(batch, Durability::Logged).map_err(io_error)?;
        Ok(SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> {
            meta,
            snapshot: Cursor::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for KvStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let applied = self.applied()?;
        Ok((applied.log_id, applied.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut applied = self.applied()?;
        while let Some((entry, responder)) = entries.try_next().await? {
            debug_assert!(
                applied
                    .log_id
                    .as_ref()
                    .is_none_or(|last| last.index < entry.log_id.index),
                "entries apply in log order, once"
            );
            let mut batch = WriteBatch::new();
            let outcome = match &entry.payload {
                EntryPayload::Blank => Outcome::None,
                EntryPayload::Membership(membership) => {
                    applied.membership =
                        StoredMembership::new(Some(entry.log_id), membership.clone());
                    Outcome::None
                }
                EntryPayload::Normal(Command::Apply(updates)) => match self.conflict(updates)? {
                    Some(conflict) => conflict,
                    None => {
                        for update in updates {
                            let key = record_key(self.group, &update.space, &update.key);
                            match &update.write {
                                Write::Keep => {}
                                Write::Put(value) => {
                                    batch.put(Column::RaftState, key, value.clone());
                                }
                                Write::Delete => batch.delete(Column::RaftState, key),
                            }
                        }
                        Outcome::Applied
                    }
                },
            };
            applied.log_id = Some(entry.log_id);
            batch.put(
                Column::RaftState,
                state_key(APPLIED, self.group),
                encode(&applied)?,
            );
            // Logged, not synced: the entry is durable in a quorum's logs already, and a
            // record lost to a power cut is applied again from the log at restart.
            self.kv.write(batch, Durability::Logged).map_err(io_error)?;
            if let Some(responder) = responder {
                responder.send(outcome);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let data = snapshot.into_inner();
        let decoded: SnapshotData = decode(&data, "a received snapshot")?;
        let mut batch = WriteBatch::new();
        batch.delete_range(
            Column::RaftState,
            records_start(self.group),
            records_end(self.group),
        );
        let prefix = records_start(self.group);
        for (key, value) in decoded.records {
            let mut full = prefix.clone();
            full.extend_from_slice(&key);
            batch.put(Column::RaftState, full, value);
        }
        batch.put(
            Column::RaftState,
            state_key(APPLIED, self.group),
            encode(&Applied {
                log_id: meta.last_log_id,
                membership: meta.last_membership.clone(),
            })?,
        );
        batch.put(
            Column::RaftState,
            state_key(SNAPSHOT, self.group),
            encode(&StoredSnapshot {
                meta: meta.clone(),
                data,
            })?,
        );
        crate::log_store::on_the_disk(|| self.kv.write(batch, Durability::Synced))
            .await
            .map_err(io_error)
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>, io::Error> {
        let Some(bytes) = self
            .kv
            .get(Column::RaftState, &state_key(SNAPSHOT, self.group))
            .map_err(io_error)?
        else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(&bytes, "the current snapshot")?;
        Ok(Some(SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> {
            meta: stored.meta,
            snapshot: Cursor::new(stored.data),
        }))
    }
}
