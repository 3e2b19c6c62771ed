//! Volumes in a volume group, as the vault sees them. The group's Raft state machine holds
//! the volume (its configuration and keys wrapped to every member), its refs, listings and
//! index heads; each member's vault keeps a local copy of those records (the *mirror*: what
//! `volume list`, `snapshot list` and export read), every object, and the shards placement
//! gives it. The daemon implements [`GroupStorage`] (Raft, the shard protocol); the vault
//! calls it where data leaves or enters this node:
//!
//! - publishing a snapshot of a grouped volume: everything it names is made durable on the
//!   group (k+m shards of each chunk on distinct members, objects on every member), then
//!   its ref moves by compare-and-swap through Raft, then the mirror here;
//! - reading a chunk or object not held here: gathered from the group (any k shards),
//!   verified against its cid, never served otherwise.
//!
//! Without a daemon (a command run on a stopped node's data directory) a grouped volume is
//! read-only here, saying why: its ref may move only through the group.

use std::sync::Arc;

use forge_crypto::{Cid, DomainKey, EnvelopeContents, NodeId, NodePublicKeys, VolumeKey};
use forge_store::VolumeId;
use forge_store::erasure::ErasureLayout;
use forge_store::kv::{Column, WriteBatch};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};
use serde::{Deserialize, Serialize};

use super::records::{self, DomainRecord, VolumeKeys, VolumeRecord};
use super::{Vault, volume_binding};
use crate::error::{NodeError, Result};

/// This vault's grouped volumes: volume id → group id (8 bytes, big-endian).
pub const GROUP_VOLUMES: RecordSpace = RecordSpace::new("group-volumes");

/// A grouped volume's delisted snapshots, in its group's state machine: volume id ‖
/// snapshot → empty. Members drop the listing and index head of each from their mirror
/// (a mirror only adds what the group holds, so a deletion needs a record of its own).
pub const DELISTED: RecordSpace = RecordSpace::new("delisted");

/// Peers whose new volumes go into a volume group: NodeId → group name.
pub const NEW_VOLUME_GROUPS: RecordSpace = RecordSpace::new("new-volume-groups");

/// `grouped/<cid>` → a [`GroupMark`] in the `Meta` column: the chunk or object is the
/// group's (its gc sweeps it here, a read of it gathers from the group).
const GROUPED: &[u8] = b"grouped/";

fn grouped_key(cid: &Cid) -> Vec<u8> {
    [GROUPED, cid.as_bytes().as_slice()].concat()
}

/// Version byte of a [`GroupMark`]'s encoding (the first, 8-byte form had none).
const GROUP_MARK_VERSION: u8 = 1;

/// What a node knows of a cid of group `group`.
///
/// Two kinds, because "this node holds a shard of it" is not "the group holds it whole": a
/// shard put from an import the group then refused (a member down) leaves shards on the
/// members that were up and none on the others. Had that counted for dedup, a later import
/// of the same data skipped the chunk, and the members that were down stayed short of
/// their shards until a repair (a CI flake in the 4+2 cluster test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupMark {
    /// The group's id.
    pub group: u64,
    /// A snapshot the group lists reaches it: this node's own publish was taken, or a
    /// repair here walked it. Only then may an import or a sync skip it as stored.
    pub published: bool,
}

impl GroupMark {
    fn encode(self) -> Vec<u8> {
        let mut value = Vec::with_capacity(10);
        value.push(GROUP_MARK_VERSION);
        value.push(u8::from(self.published));
        value.extend_from_slice(&self.group.to_be_bytes());
        value
    }

    /// `None` for a value that is no mark. The first form (8 bytes, the group id alone)
    /// reads as not published: the worst it costs is sending shards the group has.
    fn decode(value: &[u8]) -> Option<Self> {
        if let Ok(legacy) = <[u8; 8]>::try_from(value) {
            return Some(Self {
                group: u64::from_be_bytes(legacy),
                published: false,
            });
        }
        match value {
            [GROUP_MARK_VERSION, state @ (0 | 1), group @ ..] => Some(Self {
                group: u64::from_be_bytes(group.try_into().ok()?),
                published: *state == 1,
            }),
            _ => None,
        }
    }
}

/// A volume of a group, as the group's state machine records it (key: its name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVolume {
    /// Its configuration (the layout is the group's; `domain` is the creator's name for
    /// the domain, each member names its copy `group-<domain id>`).
    pub volume: VolumeRecord,
    /// Its dedup domain (shared by every member, so their chunks dedup and share cids).
    pub domain: DomainRecord,
    /// The volume and domain keys wrapped to each member (a `Writer` envelope).
    pub envelopes: Vec<([u8; 32], Vec<u8>)>,
}

impl GroupVolume {
    /// Versioned bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        records::encode(self)
    }

    /// Decodes what [`GroupVolume::encode`] wrote.
    ///
    /// # Errors
    /// [`NodeError::CorruptRecord`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        records::decode("group volume", bytes)
    }
}

/// A writer's pin in a group's Raft state (see `daemon/groups.rs`, "gc"): removed when
/// dropped (best effort: a pin left by a crash is cleared by its node's next start).
pub struct GroupPin {
    storage: Arc<dyn GroupStorage>,
    group: u64,
    key: Vec<u8>,
}

impl std::fmt::Debug for GroupPin {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GroupPin")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Drop for GroupPin {
    fn drop(&mut self) {
        if let Err(error) = self.storage.unpin(self.group, &self.key) {
            tracing::debug!(%error, group = self.group, "could not remove a group write pin");
        }
    }
}

/// What the daemon provides for grouped volumes (see the module documentation). Called
/// from the vault's threads, never from an async task.
pub trait GroupStorage: Send + Sync {
    /// Pins `group` for a writer of `kind`: waits while the group's gc sweeps, then
    /// records the pin (its gc does not start while pins are held). Returns its key.
    ///
    /// # Errors
    /// A sweep that does not end; no quorum.
    fn pin(&self, group: u64, kind: &str) -> Result<Vec<u8>>;

    /// Record `key` of `space` in `group`'s state, linearizably (read index).
    ///
    /// # Errors
    /// No quorum.
    fn read(&self, group: u64, space: RecordSpace, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Removes pin `key` of `group`.
    ///
    /// # Errors
    /// No quorum (the pin stays until this node's daemon starts again).
    fn unpin(&self, group: u64, key: &[u8]) -> Result<()>;

    /// Makes everything in `named` (chunks and objects held here) durable on the group of
    /// `volume`, then applies `updates` (a ref move, and the snapshot's listing, index head
    /// and lineage) through the group's Raft.
    ///
    /// # Errors
    /// [`NodeError::BranchMoved`] when the ref moved in the group; [`NodeError::Cluster`]
    /// naming the members that did not take their shards; network and Raft errors.
    fn publish(
        &self,
        volume: &VolumeId,
        group: u64,
        named: &[Cid],
        updates: &[RecordUpdate],
    ) -> Result<()>;

    /// Applies `updates` through the group's Raft (records only: a branch made, a snapshot
    /// delisted).
    ///
    /// # Errors
    /// [`NodeError::Consensus`] with a conflict naming the record; no quorum.
    fn apply(&self, group: u64, updates: &[RecordUpdate]) -> Result<()>;

    /// Volume group `name` for a volume pushed into it: its id, layout, and its members'
    /// public keys (this node must be one).
    ///
    /// # Errors
    /// No such group, or not one of this node's.
    fn group_for_new_volume(&self, name: &str)
    -> Result<(u64, ErasureLayout, Vec<NodePublicKeys>)>;

    /// Records `volume` in `group` (compare-and-swap on its name).
    ///
    /// # Errors
    /// [`NodeError::VolumeExists`] when the group has a volume of that name; no quorum.
    fn create_volume(&self, group: u64, volume: &GroupVolume) -> Result<()>;

    /// The ciphertext of chunk `cid` of a volume of `group`, gathered from its members
    /// (any k intact shards) and verified against the cid.
    ///
    /// # Errors
    /// [`NodeError::Integrity`] when too few shards could be gathered; network errors.
    fn fetch_chunk(&self, group: u64, cid: &Cid) -> Result<Vec<u8>>;

    /// The sealed bytes of object `cid` from a member of `group` (checked against the cid).
    ///
    /// # Errors
    /// No member has it; network errors.
    fn fetch_object(&self, group: u64, cid: &Cid) -> Result<Vec<u8>>;
}

impl Vault {
    fn lock_mirror_epoch(&self) -> std::sync::MutexGuard<'_, u64> {
        self.mirror_epoch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `write` (the local write of records a group just decided: a publish's ref
    /// move, an update's records) as one step against mirror refreshes, and bumps the
    /// mirror epoch: a refresh that read the group's state before cannot write over it.
    ///
    /// # Errors
    /// Whatever `write` fails with.
    pub(crate) fn write_decided<T>(&self, write: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut epoch = self.lock_mirror_epoch();
        let result = write();
        *epoch += 1;
        result
    }

    /// The mirror epoch now: what a refresh reads before the group's state.
    #[must_use]
    pub fn mirror_epoch(&self) -> u64 {
        *self.lock_mirror_epoch()
    }

    /// Installs the daemon's group storage (once the cluster runs).
    pub fn set_group_storage(&self, storage: Arc<dyn GroupStorage>) {
        *self
            .group_storage
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(storage);
    }

    fn group_storage(&self) -> Option<Arc<dyn GroupStorage>> {
        self.group_storage
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The head of `branch` of `volume`: for a grouped volume as its group has it now (the
    /// mirror here may lag a publish on another member by a moment), else as recorded here.
    ///
    /// # Errors
    /// No quorum; metadata errors.
    pub(crate) fn branch_head(&self, volume: &VolumeId, branch: &str) -> Result<Option<Cid>> {
        let Some(group) = self.volume_group(volume)? else {
            return Ok(self.metadata.get_ref(volume, branch)?);
        };
        let storage = self.require_group_storage(group)?;
        storage
            .read(
                group,
                RecordSpace::REFS,
                &forge_store::metadata::ref_key(volume, branch),
            )?
            .map(|value| {
                Cid::from_slice(&value).map_err(|_| NodeError::CorruptRecord {
                    what: "group ref",
                    reason: format!("{} bytes", value.len()),
                })
            })
            .transpose()
    }

    /// Pins `volume`'s group for a writer (None for a volume in no group).
    pub(crate) fn pin_group(&self, volume: &VolumeId, kind: &str) -> Result<Option<GroupPin>> {
        let Some(group) = self.volume_group(volume)? else {
            return Ok(None);
        };
        let storage = self.require_group_storage(group)?;
        let key = storage.pin(group, kind)?;
        Ok(Some(GroupPin {
            storage,
            group,
            key,
        }))
    }

    /// Deletes, from this node, the shards and objects of `group` that `live` does not
    /// name (the group's gc sweep on this member). Returns (chunks, objects, bytes).
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn sweep_group(
        &self,
        group: u64,
        live: &std::collections::BTreeSet<Cid>,
    ) -> Result<(u64, u64, u64)> {
        let end = forge_store::kv::prefix_end(GROUPED);
        let markers = self
            .kv
            .scan(Column::Meta, GROUPED, end.as_deref(), usize::MAX)?;
        let (mut chunks, mut objects, mut bytes) = (0, 0, 0);
        let mut batch = WriteBatch::new();
        for (key, value) in markers {
            if GroupMark::decode(&value).is_none_or(|mark| mark.group != group) {
                continue;
            }
            let Ok(cid) = Cid::from_slice(&key[GROUPED.len()..]) else {
                continue;
            };
            if live.contains(&cid) {
                continue;
            }
            if let Some(object) = self.kv.get(Column::Objects, cid.as_bytes())? {
                bytes += object.len() as u64;
                objects += 1;
                batch.delete(Column::Objects, cid.as_bytes().to_vec());
            }
            let shard_end = forge_store::kv::prefix_end(cid.as_bytes());
            let shards = self
                .kv
                .scan(Column::Shards, cid.as_bytes(), shard_end.as_deref(), 256)?;
            if !shards.is_empty() {
                chunks += 1;
            }
            for (shard_key, record) in shards {
                bytes += record.len() as u64;
                batch.delete(Column::Shards, shard_key);
            }
            batch.delete(Column::Meta, key);
        }
        self.kv.write(batch, forge_store::kv::Durability::Synced)?;
        Ok((chunks, objects, bytes))
    }

    /// The group `volume` is in, if any.
    ///
    /// # Errors
    /// Metadata errors, a corrupt record.
    pub fn volume_group(&self, volume: &VolumeId) -> Result<Option<u64>> {
        self.metadata
            .get_record(GROUP_VOLUMES, volume.as_bytes())?
            .map(|value| {
                value
                    .as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| NodeError::CorruptRecord {
                        what: "group volume",
                        reason: format!("a group id of {} bytes", value.len()),
                    })
            })
            .transpose()
    }

    /// Whether chunk or object `cid` is stored: whole here (its first shard, and no group
    /// mark), or on this node's group, published. Import's dedup check and a publish's
    /// re-check. A group chunk this node only holds shards of from a publish the group
    /// did not take is not stored: the import that meets it again stores and spreads it.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn chunk_stored(&self, cid: &Cid) -> Result<bool> {
        match self.kv.get(Column::Meta, &grouped_key(cid))? {
            // A value that is no mark: not known published.
            Some(value) => Ok(GroupMark::decode(&value).is_some_and(|mark| mark.published)),
            None => Ok(forge_store::chunkstore::has_first_shard(&*self.kv, cid)?),
        }
    }

    /// Whether `cid` is a group's here (any mark: its shards spread over the members, this
    /// node holding only its own).
    ///
    /// # Errors
    /// Engine errors.
    pub fn is_grouped(&self, cid: &Cid) -> Result<bool> {
        Ok(self.kv.contains(Column::Meta, &grouped_key(cid))?)
    }

    /// This node's mark of `cid`, if it has one that decodes.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn group_mark(&self, cid: &Cid) -> Result<Option<GroupMark>> {
        Ok(self
            .kv
            .get(Column::Meta, &grouped_key(cid))?
            .and_then(|value| GroupMark::decode(&value)))
    }

    /// Whether `cid` is marked published on its group (see [`GroupMark`]): the group
    /// holds it whole.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn is_published(&self, cid: &Cid) -> Result<bool> {
        Ok(self.group_mark(cid)?.is_some_and(|mark| mark.published))
    }

    /// Records, in `batch`, those of `cids` not marked yet as group `group`'s, not
    /// published (a shard put, a refused publish): a mark already here, maybe a publish
    /// the group took, stays.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn mark_held(&self, batch: &mut WriteBatch, group: u64, cids: &[Cid]) -> Result<()> {
        let mut unmarked = Vec::with_capacity(cids.len());
        for cid in cids {
            if !self.is_grouped(cid)? {
                unmarked.push(*cid);
            }
        }
        Self::mark_grouped(batch, group, &unmarked, false);
        Ok(())
    }

    /// Records `cids` as group `group`'s (in `batch`), published or not (see
    /// [`GroupMark`]). Unpublished marks go through [`Vault::mark_held`], so as not to
    /// take back a publish.
    pub(crate) fn mark_grouped(batch: &mut WriteBatch, group: u64, cids: &[Cid], published: bool) {
        let value = GroupMark { group, published }.encode();
        for cid in cids {
            batch.put(Column::Meta, grouped_key(cid), value.clone());
        }
    }

    /// The chunk's ciphertext from its group, for a chunk this node does not hold enough
    /// shards of. `None` when the chunk is not a group's.
    pub(crate) fn fetch_grouped_chunk(&self, cid: &Cid) -> Result<Option<Vec<u8>>> {
        if let Some(group) = self.grouped_in(cid)? {
            let storage = self.require_group_storage(group)?;
            return storage.fetch_chunk(group, cid).map(Some);
        }
        // Not marked: this node holds no shard of it (a group wider than its layout), or
        // it is no group's. Each group of this vault's grouped volumes is asked in turn.
        let mut groups: Vec<u64> = self
            .metadata
            .scan_records(GROUP_VOLUMES, b"")?
            .iter()
            .filter_map(|(_, value)| value.as_slice().try_into().ok().map(u64::from_be_bytes))
            .collect();
        groups.sort_unstable();
        groups.dedup();
        let mut last = None;
        for group in groups {
            let storage = self.require_group_storage(group)?;
            match storage.fetch_chunk(group, cid) {
                Ok(ciphertext) => return Ok(Some(ciphertext)),
                Err(error) => last = Some(error),
            }
        }
        last.map_or(Ok(None), Err)
    }

    /// Puts the new volumes `peer` pushes into volume group `group` (None: into this vault
    /// alone, as before).
    ///
    /// # Errors
    /// Metadata errors.
    pub fn set_new_volume_group(&self, peer: &NodeId, group: Option<&str>) -> Result<()> {
        let change = match group {
            Some(group) => {
                super::validate_name("group", group)?;
                Change::Put(group.as_bytes().to_vec())
            }
            None => Change::Delete,
        };
        self.metadata.apply(&[RecordUpdate::new(
            NEW_VOLUME_GROUPS,
            peer.as_bytes().to_vec(),
            Expected::Any,
            change,
        )])?;
        Ok(())
    }

    /// The volume group new volumes from `peer` go into, if one was set.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn new_volume_group(&self, peer: &NodeId) -> Result<Option<String>> {
        Ok(self
            .metadata
            .get_record(NEW_VOLUME_GROUPS, peer.as_bytes())?
            .map(|value| String::from_utf8_lossy(&value).into_owned()))
    }

    /// A volume pushed by a peer, made a volume of group `group_name`: the offered record
    /// with the group's layout, the offered domain, and the keys in `envelope` (this
    /// node's, from the offer) wrapped again to every member. Recorded in the group, then
    /// adopted here. Returns the record.
    ///
    /// # Errors
    /// No envelope for this node (a volume pushed into a group must carry keys: `forge
    /// volume share NAME --to THIS --write` at the sender); no such group; no quorum.
    pub(crate) fn push_into_group(
        &self,
        group_name: &str,
        mut record: VolumeRecord,
        domain: DomainRecord,
        envelope: Option<&[u8]>,
    ) -> Result<VolumeRecord> {
        let storage = self.group_storage().ok_or_else(|| NodeError::Cluster {
            reason: format!(
                "new volumes from this peer go into volume group {group_name}, which only the daemon reaches"
            ),
        })?;
        let id = VolumeId::from_bytes(record.id);
        let envelope = envelope.ok_or_else(|| NodeError::SyncRefused {
            reason: format!(
                "volume {} would go into volume group {group_name}, whose members need its keys: share it with this node first (`forge volume share {} --to NODE --write` at the sender)",
                record.name, record.name
            ),
        })?;
        let contents =
            forge_crypto::envelope::unwrap(&self.identity, envelope, &volume_binding(&id))?;
        let (group, layout, members) = storage.group_for_new_volume(group_name)?;
        record.data_shards = u16::try_from(layout.data_shards()).unwrap_or(u16::MAX);
        record.parity_shards = u16::try_from(layout.parity_shards()).unwrap_or(u16::MAX);
        record.domain = format!("group-{}", data_encoding::HEXLOWER.encode(&domain.id));
        let mut envelopes = Vec::with_capacity(members.len());
        for keys in &members {
            envelopes.push((
                *keys.node_id().as_bytes(),
                self.wrap_to(keys, &contents, &volume_binding(&id))?,
            ));
        }
        let volume = GroupVolume {
            volume: record,
            domain,
            envelopes,
        };
        storage.create_volume(group, &volume)?;
        self.adopt_group_volume(group, &volume, &members)?;
        Ok(volume.volume)
    }

    /// The layout new chunks of a volume pushed by `peer` are stored in: its group's when
    /// its new volumes go into one (asked before the data arrives), else `offered`.
    ///
    /// # Errors
    /// The group is unknown here; no daemon.
    pub(crate) fn layout_for_new_volume(
        &self,
        peer: &NodeId,
        offered: ErasureLayout,
    ) -> Result<ErasureLayout> {
        let Some(group) = self.new_volume_group(peer)? else {
            return Ok(offered);
        };
        let storage = self.group_storage().ok_or_else(|| NodeError::Cluster {
            reason: format!(
                "new volumes from this peer go into volume group {group}, which only the daemon reaches"
            ),
        })?;
        Ok(storage.group_for_new_volume(&group)?.1)
    }

    /// Chunk `cid`'s ciphertext, verified: from this node's shards, or gathered from its
    /// group when they are too few (what export, a sync's sender and an audit's answer
    /// read).
    ///
    /// # Errors
    /// Integrity errors naming the cid; engine errors.
    pub(crate) fn read_ciphertext(&self, cid: &Cid) -> Result<Vec<u8>> {
        use forge_store::chunkstore::{ChunkStoreError, read_chunk};
        match read_chunk(&*self.kv, cid) {
            Ok(read) => Ok(read.ciphertext),
            Err(
                error @ (ChunkStoreError::Missing { .. } | ChunkStoreError::Unrecoverable { .. }),
            ) => match self.fetch_grouped_chunk(cid)? {
                Some(ciphertext) => Ok(ciphertext),
                None => Err(error.into()),
            },
            Err(error) => Err(error.into()),
        }
    }

    /// The layout of the group chunk `cid` was made durable on (from one of its volumes).
    pub(crate) fn grouped_layout(&self, cid: &Cid) -> Result<Option<ErasureLayout>> {
        let Some(group) = self.grouped_in(cid)? else {
            return Ok(None);
        };
        for (id, value) in self.metadata.scan_records(GROUP_VOLUMES, b"")? {
            if value != group.to_be_bytes() {
                continue;
            }
            if let Some(record) = self
                .list_volumes()?
                .into_iter()
                .find(|record| record.id[..] == id[..])
            {
                return Ok(Some(ErasureLayout::new(
                    usize::from(record.data_shards),
                    usize::from(record.parity_shards),
                )?));
            }
        }
        Ok(None)
    }

    /// The object's sealed bytes from its group (and kept here), for an object of a
    /// grouped volume this node lacks (it was down when it was published).
    pub(crate) fn fetch_grouped_object(
        &self,
        volume: &VolumeId,
        cid: &Cid,
    ) -> Result<Option<Vec<u8>>> {
        let Some(group) = self.volume_group(volume)? else {
            return Ok(None);
        };
        let storage = self.require_group_storage(group)?;
        let bytes = storage.fetch_object(group, cid)?;
        if Cid::of(&bytes) != *cid {
            return Err(crate::error::IntegrityFault::UnreadableObject {
                cid: *cid,
                reason: "a member sent other bytes".into(),
            }
            .into());
        }
        let mut batch = WriteBatch::new();
        batch.put(Column::Objects, cid.as_bytes().to_vec(), bytes.clone());
        // From the group's records (a tree being read): a listed snapshot reaches it.
        Self::mark_grouped(&mut batch, group, &[*cid], true);
        self.kv.write(batch, forge_store::kv::Durability::Logged)?;
        self.counters
            .group_objects_fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Some(bytes))
    }

    /// The group chunk `cid` was made durable on, if any.
    fn grouped_in(&self, cid: &Cid) -> Result<Option<u64>> {
        Ok(self.group_mark(cid)?.map(|mark| mark.group))
    }

    pub(crate) fn require_group_storage(&self, group: u64) -> Result<Arc<dyn GroupStorage>> {
        self.group_storage().ok_or_else(|| NodeError::Cluster {
            reason: format!(
                "this volume is in volume group {group}: its data is spread over the group's members, reachable through this node's daemon (`forge node start`)"
            ),
        })
    }

    /// Routes a publish of a grouped volume through its group: the ref updates (and the
    /// snapshot records) go through Raft after the data is durable there; returns what
    /// to apply here (the mirror, whose ref moves whatever it was: the group decided).
    pub(crate) fn publish_to_group(
        &self,
        updates: &[RecordUpdate],
        named: &[Cid],
        stored: &[Cid],
    ) -> Result<Vec<RecordUpdate>> {
        let Some(volume) = updates
            .iter()
            .find(|update| update.space == RecordSpace::REFS)
            .and_then(|update| update.key.get(..16))
            .and_then(|id| <[u8; 16]>::try_from(id).ok())
            .map(VolumeId::from_bytes)
        else {
            return Ok(updates.to_vec());
        };
        let Some(group) = self.volume_group(&volume)? else {
            return Ok(updates.to_vec());
        };
        let storage = self.require_group_storage(group)?;
        // A mount's working state is this node's own: it is written here with the
        // publish, never replicated.
        let mut replicated: Vec<RecordUpdate> = updates
            .iter()
            .filter(|update| update.space != RecordSpace::WORKING)
            .cloned()
            .collect();
        // The records of each snapshot published (the new head, and every snapshot a sync
        // brought), written here before the publish, go along, with their authors' keys
        // so that every member verifies them.
        let mut snapshots: Vec<Cid> = updates
            .iter()
            .filter(|update| update.space == RecordSpace::REFS)
            .filter_map(|update| match &update.change {
                Change::Put(value) => Cid::from_slice(value).ok(),
                _ => None,
            })
            .collect();
        snapshots.extend(named.iter().copied());
        snapshots.sort_unstable();
        snapshots.dedup();
        let mut authors = std::collections::BTreeSet::new();
        for snapshot in snapshots {
            let key = [volume.as_bytes().as_slice(), snapshot.as_bytes()].concat();
            let Some(listing) = self.metadata.get_record(RecordSpace::SNAPSHOTS, &key)? else {
                continue;
            };
            replicated.push(RecordUpdate::new(
                RecordSpace::SNAPSHOTS,
                key.clone(),
                Expected::Any,
                Change::Put(listing),
            ));
            for space in [RecordSpace::INDEX_HEADS, super::peers::LINEAGE] {
                if let Some(record) = self.metadata.get_record(space, &key)? {
                    if space == RecordSpace::INDEX_HEADS {
                        let head: records::IndexHead = records::decode("index head", &record)?;
                        authors.insert(head.author);
                    }
                    replicated.push(RecordUpdate::new(
                        space,
                        key.clone(),
                        Expected::Any,
                        Change::Put(record),
                    ));
                }
            }
        }
        for author in authors {
            if let Some(keys) = self.metadata.get_record(super::KEYRING, &author)? {
                replicated.push(RecordUpdate::new(
                    super::KEYRING,
                    author.to_vec(),
                    Expected::Any,
                    Change::Put(keys),
                ));
            }
        }
        if let Err(error) = storage.publish(&volume, group, stored, &replicated) {
            self.forget_unpublished_heads(&volume, updates);
            // What it stored here is the group's to sweep: unmarked, the group's gc would
            // never free it (only a gc of this vault alone would).
            if let Err(error) = self.mark_grouped_durably(group, stored, false) {
                tracing::warn!(%error, "marking an unpublished snapshot's data for the group's gc");
            }
            return Err(error);
        }
        self.mark_grouped_durably(group, stored, true)?;
        Ok(updates
            .iter()
            .map(|update| {
                let mut mirrored = update.clone();
                mirrored.expected = Expected::Any;
                mirrored
            })
            .collect())
    }

    /// Marks `stored` as group `group`'s, published or not, as durably as the data it
    /// marks (flushed, as an import flushes its chunks): a mark a power cut took while the
    /// data stayed leaves shards no group gc ever sweeps (the simulator, with a disk that
    /// loses log syncs). Unpublished marks leave alone what is marked already (a publish
    /// the group took before is not taken back).
    fn mark_grouped_durably(&self, group: u64, stored: &[Cid], published: bool) -> Result<()> {
        let mut batch = WriteBatch::new();
        if published {
            Self::mark_grouped(&mut batch, group, stored, true);
        } else {
            self.mark_held(&mut batch, group, stored)?;
        }
        self.kv.write(batch, forge_store::kv::Durability::Synced)?;
        self.kv.flush(&[Column::Meta])?;
        Ok(())
    }

    /// After a publish the group did not take: removes here the listing, index head and
    /// lineage of each head it would have moved a ref to, written here just before it.
    /// Left, such a snapshot is listed on this member only: every repair here counts its
    /// chunks, whose shards the group never got, so the group never reads as whole again,
    /// and gc keeps them. If the group did take it (its answer lost), the watch loop's next
    /// mirror pass lists it here again.
    fn forget_unpublished_heads(&self, volume: &VolumeId, updates: &[RecordUpdate]) {
        let forgotten: Vec<RecordUpdate> = updates
            .iter()
            .filter(|update| update.space == RecordSpace::REFS)
            .filter_map(|update| match &update.change {
                Change::Put(value) => Cid::from_slice(value).ok(),
                _ => None,
            })
            .flat_map(|snapshot| {
                let key = [volume.as_bytes().as_slice(), snapshot.as_bytes()].concat();
                [
                    RecordSpace::SNAPSHOTS,
                    RecordSpace::INDEX_HEADS,
                    super::peers::LINEAGE,
                ]
                .map(|space| RecordUpdate::new(space, key.clone(), Expected::Any, Change::Delete))
            })
            .collect();
        if forgotten.is_empty() {
            return;
        }
        // A mirror pass never deletes and puts back only what the group holds: no lock
        // against it is needed.
        if let Err(error) = self.metadata.apply(&forgotten) {
            tracing::warn!(%error, "forgetting a snapshot the group did not take");
        }
    }

    /// Every chunk the listed snapshots of group `group`'s volumes reach here (their trees
    /// walked with the volumes' keys; objects and index nodes this node lacks are fetched
    /// from the group on the way and kept).
    ///
    /// Only snapshots the group lists count (`listed`: the listing keys, volume id ‖
    /// snapshot, from its records): one listed here alone (a sync abandoned before it
    /// published, a refused publish a lost write brought back) has chunks the group never
    /// took, and counting them, repair would never find the group whole.
    ///
    /// # Errors
    /// Keys that do not open; objects no member has; engine errors.
    pub(crate) fn group_chunks(
        &self,
        group: u64,
        listed: &std::collections::BTreeSet<Vec<u8>>,
    ) -> Result<std::collections::BTreeSet<Cid>> {
        let mut chunks = std::collections::BTreeSet::new();
        let mut walked = std::collections::BTreeSet::new();
        for record in self.list_volumes()? {
            let id = VolumeId::from_bytes(record.id);
            if self.volume_group(&id)? != Some(group) {
                continue;
            }
            let volume = self.open_volume(&record.name, &super::no_passphrase)?;
            for (snapshot, _) in self.snapshot_listings(&record)? {
                if !listed.contains(&[record.id.as_slice(), snapshot.as_bytes()].concat()) {
                    continue;
                }
                // The index nodes too: what a keyless check and a sync read.
                self.walk_index(&record, &snapshot)?;
                let commit = self.read_commit(&volume, &snapshot)?;
                self.walk_tree(
                    &volume,
                    Cid::from_bytes(commit.root),
                    &mut walked,
                    &mut |_, chunk| {
                        chunks.insert(chunk.cid());
                        Ok(())
                    },
                )?;
            }
        }
        Ok(chunks)
    }

    /// Every cid the listed snapshots of group `group`'s volumes reach (commits, and what
    /// each one's signed reference index names: trees, manifests, chunks, and the index's
    /// own nodes): what the group's gc keeps. Keyless; index nodes this node lacks are
    /// fetched from the group.
    ///
    /// # Errors
    /// A listed snapshot whose index cannot be read (the sweep must not guess).
    pub(crate) fn group_live(&self, group: u64) -> Result<std::collections::BTreeSet<Cid>> {
        let mut live = std::collections::BTreeSet::new();
        for record in self.list_volumes()? {
            let id = VolumeId::from_bytes(record.id);
            if self.volume_group(&id)? != Some(group) {
                continue;
            }
            for (snapshot, _) in self.snapshot_listings(&record)? {
                live.insert(snapshot);
                let (cids, nodes) = self.walk_index(&record, &snapshot)?;
                live.extend(cids);
                live.extend(nodes);
            }
        }
        Ok(live)
    }

    /// Applies `updates` of `volume`'s records: through its group first when it is in one
    /// (then here whatever the mirror held: the group decided), else here.
    ///
    /// # Errors
    /// Conflicts (as the group or the metadata store reports them); no daemon for a
    /// grouped volume; metadata errors.
    pub(crate) fn apply_volume_updates(
        &self,
        volume: &VolumeId,
        updates: &[RecordUpdate],
    ) -> Result<()> {
        let Some(group) = self.volume_group(volume)? else {
            self.metadata.apply(updates)?;
            return Ok(());
        };
        self.require_group_storage(group)?.apply(group, updates)?;
        let local: Vec<RecordUpdate> = updates
            .iter()
            .filter(|update| update.space != DELISTED)
            .map(|update| {
                let mut local = update.clone();
                local.expected = Expected::Any;
                local
            })
            .collect();
        self.write_decided(|| Ok(self.metadata.apply(&local)?))?;
        Ok(())
    }

    /// Refuses work on a grouped volume that is not replicated to its group yet (key
    /// rotation, shares), naming it.
    ///
    /// # Errors
    /// [`NodeError::Cluster`] for a grouped volume.
    pub(crate) fn refuse_if_grouped(&self, volume: &VolumeId, what: &str) -> Result<()> {
        match self.volume_group(volume)? {
            Some(group) => Err(NodeError::Cluster {
                reason: format!(
                    "{what} is not supported for a volume of a volume group yet (this one is in group {group}): its members hold its keys"
                ),
            }),
            None => Ok(()),
        }
    }

    /// A new volume for group `group` named `name` with the group's `layout`: fresh keys
    /// and a domain of its own, wrapped to each of `members`. Nothing is written here;
    /// the caller records it in the group, then every member (this one too) adopts it.
    ///
    /// # Errors
    /// A bad name, randomness, a member's keys that do not wrap.
    pub fn new_group_volume(
        &self,
        name: &str,
        layout: ErasureLayout,
        members: &[NodePublicKeys],
    ) -> Result<GroupVolume> {
        super::validate_name("volume name", name)?;
        let id = VolumeId::from_bytes(self.random_array()?);
        let volume_key = VolumeKey::from_bytes(self.random_array()?);
        let domain_key = DomainKey::from_bytes(self.random_array()?);
        let domain = self.domain_record_new(super::chunker_params(None)?)?;
        let contents = EnvelopeContents::Writer {
            volume_key,
            domain_key,
        };
        let mut envelopes = Vec::with_capacity(members.len());
        for keys in members {
            envelopes.push((
                *keys.node_id().as_bytes(),
                self.wrap_to(keys, &contents, &volume_binding(&id))?,
            ));
        }
        Ok(GroupVolume {
            volume: VolumeRecord {
                id: *id.as_bytes(),
                name: name.to_owned(),
                data_shards: u16::try_from(layout.data_shards()).unwrap_or(u16::MAX),
                parity_shards: u16::try_from(layout.parity_shards()).unwrap_or(u16::MAX),
                domain: format!("group-{}", data_encoding::HEXLOWER.encode(&domain.id)),
                encrypted: false,
                created_ns: self.now_ns(),
            },
            domain,
            envelopes,
        })
    }

    /// `volume` with its keys wrapped to `to` too (a member added to its group), from the
    /// envelope wrapped to this node.
    ///
    /// # Errors
    /// No envelope for this node, or one that does not open.
    pub fn wrap_group_volume_to(
        &self,
        volume: &GroupVolume,
        to: &NodePublicKeys,
    ) -> Result<GroupVolume> {
        let id = VolumeId::from_bytes(volume.volume.id);
        let me = self.identity.node_id();
        let mine = volume
            .envelopes
            .iter()
            .find(|(node, _)| node == me.as_bytes())
            .ok_or_else(|| NodeError::Cluster {
                reason: format!(
                    "volume {} carries no keys for this node: add nodes from a member that holds them",
                    volume.volume.name
                ),
            })?;
        let contents =
            forge_crypto::envelope::unwrap(&self.identity, &mine.1, &volume_binding(&id))?;
        let mut wrapped = volume.clone();
        wrapped
            .envelopes
            .retain(|(node, _)| node != to.node_id().as_bytes());
        wrapped.envelopes.push((
            *to.node_id().as_bytes(),
            self.wrap_to(to, &contents, &volume_binding(&id))?,
        ));
        Ok(wrapped)
    }

    /// Makes a group's volume a volume of this vault (its record, its keys from the
    /// envelope wrapped to this node, its domain), trusting the members' keys so their
    /// snapshots verify here. Returns false when it is here already.
    ///
    /// # Errors
    /// No envelope for this node, or one that does not open; a local volume of that name
    /// that is not this one; metadata errors.
    pub fn adopt_group_volume(
        &self,
        group: u64,
        volume: &GroupVolume,
        members: &[NodePublicKeys],
    ) -> Result<bool> {
        let id = VolumeId::from_bytes(volume.volume.id);
        if self.volume_group(&id)?.is_some() {
            return Ok(false);
        }
        let name = &volume.volume.name;
        if let Some(existing) = self.volume_record(name)?
            && existing.id != volume.volume.id
        {
            return Err(NodeError::Cluster {
                reason: format!(
                    "volume group {group} has a volume named {name}, and this node has another volume of that name: rename one"
                ),
            });
        }
        let me: NodeId = self.identity.node_id();
        let envelope = volume
            .envelopes
            .iter()
            .find(|(node, _)| node == me.as_bytes())
            .map(|(_, envelope)| envelope.clone())
            .ok_or_else(|| NodeError::Cluster {
                reason: format!("volume {name} of group {group} carries no keys for this node"),
            })?;
        // It must open with this node's key before it is kept as this volume's.
        forge_crypto::envelope::unwrap(&self.identity, &envelope, &volume_binding(&id))?;
        for keys in members {
            if keys.node_id() != me && !self.knows_keys(&keys.node_id())? {
                self.trust_node(keys)?;
            }
        }
        let domain_name = volume.volume.domain.clone();
        let mut domain = volume.domain.clone();
        domain.key_envelope = None;
        let mut updates = Vec::new();
        if self.domain_record(&domain_name)?.is_none() {
            updates.push(RecordUpdate::new(
                RecordSpace::DOMAINS,
                domain_name.as_bytes().to_vec(),
                Expected::Absent,
                Change::Put(domain.encode()),
            ));
        }
        updates.push(RecordUpdate::new(
            RecordSpace::VOLUME_KEYS,
            volume.volume.id.to_vec(),
            Expected::Any,
            Change::Put(records::encode(&VolumeKeys::WrappedToNode(envelope))),
        ));
        updates.push(RecordUpdate::new(
            RecordSpace::VOLUMES,
            name.as_bytes().to_vec(),
            Expected::Any,
            Change::Put(records::encode(&volume.volume)),
        ));
        updates.push(RecordUpdate::new(
            GROUP_VOLUMES,
            volume.volume.id.to_vec(),
            Expected::Absent,
            Change::Put(group.to_be_bytes().to_vec()),
        ));
        // The command that created the volume and the watch loop that saw it in the group
        // may adopt it at once: the second one's update conflicts (on the domain or the
        // group entry) and finds it adopted.
        match self.metadata.apply(&updates) {
            Ok(()) => Ok(true),
            Err(forge_store::metadata::MetadataError::RecordConflict { .. })
                if self.volume_group(&id)? == Some(group) =>
            {
                Ok(false)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Brings this vault's copy of a grouped volume's records in step with the group's
    /// (`records`: space name and key → value, as the group's state machine holds them
    /// for this volume; `delisted`: keys of its snapshots the group delisted). Returns how
    /// many records changed here.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn mirror_group_records(
        &self,
        records: &[(RecordSpace, Vec<u8>, Vec<u8>)],
        delisted: &[Vec<u8>],
        read_at_epoch: Option<u64>,
    ) -> Result<usize> {
        // A publish or update written here since the group's state was read: that state
        // may predate it (an older ref): skip this refresh, the next one reads anew.
        let epoch = self.lock_mirror_epoch();
        if read_at_epoch.is_some_and(|read| read != *epoch) {
            return Ok(0);
        }
        let mut updates = Vec::new();
        for key in delisted {
            for space in [RecordSpace::SNAPSHOTS, RecordSpace::INDEX_HEADS] {
                if self.metadata.get_record(space, key)?.is_some() {
                    updates.push(RecordUpdate::new(
                        space,
                        key.clone(),
                        Expected::Any,
                        Change::Delete,
                    ));
                }
            }
        }
        for (space, key, value) in records {
            // Read before the delistings: a snapshot delisted meanwhile stays delisted.
            if (*space == RecordSpace::SNAPSHOTS || *space == RecordSpace::INDEX_HEADS)
                && delisted.contains(key)
            {
                continue;
            }
            if self.metadata.get_record(*space, key)?.as_deref() != Some(value.as_slice()) {
                updates.push(RecordUpdate::new(
                    *space,
                    key.clone(),
                    Expected::Any,
                    Change::Put(value.clone()),
                ));
            }
        }
        if !updates.is_empty() {
            self.metadata.apply(&updates)?;
        }
        drop(epoch);
        // What the group now lists is whole there: the marks of its reach here that came
        // with shard puts are published (imports and syncs here skip it from now on).
        for update in &updates {
            if update.space != RecordSpace::INDEX_HEADS {
                continue;
            }
            let Change::Put(value) = &update.change else {
                continue;
            };
            let Ok(head) = records::decode::<records::IndexHead>("index head", value) else {
                continue;
            };
            if let Err(error) = self.publish_marks_under(&Cid::from_bytes(head.root)) {
                tracing::debug!(%error, "publishing the marks of a listed snapshot");
            }
        }
        Ok(updates.len())
    }

    /// Marks published the unpublished marks of the reach of reference index `root`, of
    /// a snapshot the group lists (see [`GroupMark`]): a listed snapshot's reach is whole
    /// on the group (its publish spread every shard, or found them published), and
    /// repair keeps it so. The walk stops at a node already published (its reach was
    /// done before) or not the group's here. Returns how many marks changed.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn publish_marks_under(&self, root: &Cid) -> Result<u64> {
        const BATCH_MARKS: usize = 4096;
        let mut pending = vec![*root];
        let mut batch = WriteBatch::new();
        let (mut in_batch, mut changed) = (0, 0u64);
        while let Some(id) = pending.pop() {
            let Some(mark) = self.group_mark(&id)? else {
                continue;
            };
            if mark.published {
                continue;
            }
            Self::mark_grouped(&mut batch, mark.group, &[id], true);
            in_batch += 1;
            if let Some(bytes) = self.kv.get(Column::Objects, id.as_bytes())?
                && let Ok(node) = forge_store::refindex::Node::decode(&id, &bytes)
            {
                if node.level == 0 {
                    for entry in node.entries {
                        if let Some(held) = self.group_mark(&entry)?
                            && !held.published
                        {
                            Self::mark_grouped(&mut batch, held.group, &[entry], true);
                            in_batch += 1;
                        }
                    }
                } else {
                    pending.extend(node.entries);
                }
            }
            if in_batch >= BATCH_MARKS {
                self.kv.write(
                    std::mem::take(&mut batch),
                    forge_store::kv::Durability::Logged,
                )?;
                changed += in_batch as u64;
                in_batch = 0;
            }
        }
        // Logged: a lost upgrade costs sending again what the group holds, no more.
        self.kv.write(batch, forge_store::kv::Durability::Logged)?;
        Ok(changed + in_batch as u64)
    }

    /// Drops the listings (listing, index head, lineage) of `volume`'s snapshots that the
    /// group's records (`listed`: its listing keys, read at mirror epoch
    /// `read_at_epoch`) lack. Such a listing is this member's alone: a publish the group
    /// refused whose forgetting a power cut took back (a disk that lost an acknowledged
    /// write). Left, every repair here counts chunks the group never took, so the group
    /// never reads as whole again. Only from a state confirmed current with the group's
    /// leader (a lagging replica lacks what others just published) and while no write is
    /// in progress here (an import writes its listing before it publishes). Returns how
    /// many snapshots were dropped.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn forget_listings_the_group_lacks(
        &self,
        volume: &VolumeId,
        listed: &std::collections::BTreeSet<Vec<u8>>,
        read_at_epoch: Option<u64>,
    ) -> Result<usize> {
        let epoch = self.lock_mirror_epoch();
        if read_at_epoch.is_some_and(|read| read != *epoch) {
            return Ok(0);
        }
        let forgotten = self.fence().while_idle(|| -> Result<usize> {
            let unlisted: Vec<Vec<u8>> = self
                .metadata
                .scan_records(RecordSpace::SNAPSHOTS, volume.as_bytes())?
                .into_iter()
                .map(|(key, _)| key)
                .filter(|key| !listed.contains(key))
                .collect();
            let updates: Vec<RecordUpdate> = unlisted
                .iter()
                .flat_map(|key| {
                    [
                        RecordSpace::SNAPSHOTS,
                        RecordSpace::INDEX_HEADS,
                        super::peers::LINEAGE,
                    ]
                    .map(|space| RecordUpdate::new(space, key.clone(), Expected::Any, Change::Delete))
                })
                .collect();
            if !updates.is_empty() {
                tracing::warn!(
                    volume = %volume,
                    snapshots = unlisted.len(),
                    "dropping listings of snapshots the group does not hold (a publish it refused, brought back by a lost write)"
                );
                self.metadata.apply(&updates)?;
            }
            Ok(unlisted.len())
        });
        drop(epoch);
        forgotten.unwrap_or(Ok(0))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use forge_store::kv::{KvEngine, MemKv};

    use super::*;
    use crate::error::IntegrityFault;
    use crate::test_support::vault_on;

    /// The command that created a group volume and the watch loop that saw it in the
    /// group both adopt it at once: one adopts it, the other finds it adopted (seen as
    /// `volume create --group` failing on its own domain record).
    #[test]
    fn a_group_volume_adopted_twice_at_once_is_adopted_once_without_error() {
        let temp = tempfile::tempdir().unwrap();
        let vault = Arc::new(vault_on(temp.path(), Arc::new(MemKv::new()), 1));
        let members = vec![vault.identity().public_keys().clone()];
        for round in 0..200 {
            let volume = vault
                .new_group_volume(&format!("v{round}"), ErasureLayout::SINGLE, &members)
                .unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let adopters: Vec<_> = (0..2)
                .map(|_| {
                    let (vault, volume, members, barrier) = (
                        vault.clone(),
                        volume.clone(),
                        members.clone(),
                        barrier.clone(),
                    );
                    std::thread::spawn(move || {
                        barrier.wait();
                        vault.adopt_group_volume(7, &volume, &members)
                    })
                })
                .collect();
            let adopted: Vec<bool> = adopters
                .into_iter()
                .map(|adopter| adopter.join().unwrap().unwrap())
                .collect();
            assert_eq!(
                adopted.iter().filter(|adopted| **adopted).count(),
                1,
                "round {round}: {adopted:?}"
            );
        }
    }

    /// A volume group as the importer sees it. Refusing: every publish is refused (its
    /// members unreachable). Accepting: every publish is taken, once each named chunk is
    /// one the daemon's `distribute` can spread: stored whole on the importer (an object,
    /// or its first shard), or published on the group already; `short` collects the
    /// others.
    struct TestGroup {
        /// The importer's store, when the group takes publishes.
        accepting: Option<Arc<dyn KvEngine>>,
        short: std::sync::Mutex<Vec<Cid>>,
    }

    impl TestGroup {
        fn refusing() -> Self {
            Self {
                accepting: None,
                short: std::sync::Mutex::new(Vec::new()),
            }
        }

        fn accepting(kv: Arc<dyn KvEngine>) -> Self {
            Self {
                accepting: Some(kv),
                short: std::sync::Mutex::new(Vec::new()),
            }
        }
    }

    impl GroupStorage for TestGroup {
        fn pin(&self, _group: u64, _kind: &str) -> Result<Vec<u8>> {
            Ok(b"pin".to_vec())
        }
        fn read(&self, _group: u64, _space: RecordSpace, _key: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(None)
        }
        fn unpin(&self, _group: u64, _key: &[u8]) -> Result<()> {
            Ok(())
        }
        fn publish(
            &self,
            _volume: &VolumeId,
            _group: u64,
            named: &[Cid],
            _updates: &[RecordUpdate],
        ) -> Result<()> {
            let Some(kv) = &self.accepting else {
                return Err(NodeError::Cluster {
                    reason: "too few members took their shards".into(),
                });
            };
            for cid in named {
                let published = kv
                    .get(Column::Meta, &grouped_key(cid))?
                    .and_then(|value| GroupMark::decode(&value))
                    .is_some_and(|mark| mark.published);
                let whole = kv.contains(Column::Objects, cid.as_bytes())?
                    || forge_store::chunkstore::has_first_shard(&**kv, cid)?;
                if !published && !whole {
                    self.short.lock().unwrap().push(*cid);
                }
            }
            Ok(())
        }
        fn apply(&self, _group: u64, _updates: &[RecordUpdate]) -> Result<()> {
            Ok(())
        }
        fn group_for_new_volume(
            &self,
            name: &str,
        ) -> Result<(u64, ErasureLayout, Vec<NodePublicKeys>)> {
            Err(NodeError::Cluster {
                reason: format!("no group {name}"),
            })
        }
        fn create_volume(&self, _group: u64, _volume: &GroupVolume) -> Result<()> {
            Ok(())
        }
        fn fetch_chunk(&self, _group: u64, cid: &Cid) -> Result<Vec<u8>> {
            Err(IntegrityFault::MissingObject { cid: *cid }.into())
        }
        fn fetch_object(&self, _group: u64, cid: &Cid) -> Result<Vec<u8>> {
            Err(IntegrityFault::MissingObject { cid: *cid }.into())
        }
    }

    /// A vault on `kv` holding volume `data` of group 7 (this node its one member), whose
    /// group refuses every publish.
    fn vault_with_a_refusing_group(root: &std::path::Path, kv: Arc<dyn KvEngine>) -> Arc<Vault> {
        let vault = Arc::new(vault_on(root, kv, 1));
        let members = vec![vault.identity().public_keys().clone()];
        let volume = vault
            .new_group_volume("data", ErasureLayout::SINGLE, &members)
            .unwrap();
        assert!(vault.adopt_group_volume(7, &volume, &members).unwrap());
        vault.set_group_storage(Arc::new(TestGroup::refusing()));
        vault
    }

    fn import_options() -> crate::vault::ImportOptions {
        crate::vault::ImportOptions {
            message: String::new(),
            branch: "main".into(),
            dna: std::collections::BTreeMap::new(),
            atime: false,
        }
    }

    /// An import the group refused (members down) left shards on the members that were
    /// up, each marked the group's. The next import of that data, on such a member, must
    /// store and spread the chunks again: skipped as stored, the members that were down
    /// never got their shards until a repair (a flake of the 4+2 cluster test, fsck
    /// finding a chunk "missing" on a member).
    #[test]
    fn a_chunk_marked_only_by_a_refused_publish_is_stored_again_by_the_next_import() {
        let temp = tempfile::tempdir().unwrap();
        let kv: Arc<dyn KvEngine> = Arc::new(MemKv::new());
        let vault = vault_with_a_refusing_group(temp.path(), kv.clone());
        let source = temp.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(source.join("file"), &data).unwrap();
        let progress = crate::progress::Progress::new("import", false);
        let import = || {
            vault.import(
                "data",
                &source,
                &import_options(),
                &crate::vault::no_passphrase,
                &progress,
            )
        };
        let refused = import();
        assert!(refused.is_err(), "{refused:?}");
        // This node as a member that holds, of those chunks, only what a shard put left:
        // a mark, and not the chunk whole.
        let shards = kv.scan(Column::Shards, b"", None, usize::MAX).unwrap();
        assert!(!shards.is_empty());
        let mut batch = WriteBatch::new();
        for (key, _) in shards {
            batch.delete(Column::Shards, key);
        }
        kv.write(batch, forge_store::kv::Durability::Synced)
            .unwrap();

        let group = Arc::new(TestGroup::accepting(kv.clone()));
        vault.set_group_storage(group.clone());
        let report = import().unwrap();
        let short = group.short.lock().unwrap().clone();
        assert!(
            short.is_empty(),
            "named, neither stored here nor published: {short:?}"
        );
        assert!(report.new_chunks > 0, "{report:?}");
        // Published now: the import after it dedups.
        let again = import().unwrap();
        assert_eq!(again.new_chunks, 0, "{again:?}");
        assert!(group.short.lock().unwrap().is_empty());
    }

    /// A snapshot the group lists is whole there: the marks its reach has here from shard
    /// puts become published, down to what this node holds, and no further than a node
    /// published before.
    #[test]
    fn the_reach_of_a_listed_index_is_marked_published() {
        let temp = tempfile::tempdir().unwrap();
        let kv: Arc<dyn KvEngine> = Arc::new(MemKv::new());
        let vault = vault_on(temp.path(), kv.clone(), 1);
        let group = 7;
        // Enough cids for a two-level index.
        let cids: Vec<Cid> = (0..3000u32).map(|i| Cid::of(&i.to_le_bytes())).collect();
        let mut batch = WriteBatch::new();
        let mut nodes = Vec::new();
        let root = forge_store::refindex::build(&cids, |id, bytes| {
            batch.put(Column::Objects, id.as_bytes().to_vec(), bytes);
            nodes.push(id);
        });
        assert!(nodes.len() > 2, "{} nodes", nodes.len());
        // Held from shard puts: every node, and every cid but the last (a chunk no shard
        // of which is here).
        Vault::mark_grouped(&mut batch, group, &nodes, false);
        Vault::mark_grouped(&mut batch, group, &cids[..cids.len() - 1], false);
        kv.write(batch, forge_store::kv::Durability::Synced)
            .unwrap();
        let marked = vault.publish_marks_under(&root).unwrap();
        assert_eq!(marked, (nodes.len() + cids.len() - 1) as u64);
        for cid in nodes.iter().chain(&cids[..cids.len() - 1]) {
            assert_eq!(
                vault.group_mark(cid).unwrap(),
                Some(GroupMark {
                    group,
                    published: true
                })
            );
        }
        assert_eq!(vault.group_mark(&cids[cids.len() - 1]).unwrap(), None);
        // Done once: a second walk stops at the root.
        assert_eq!(vault.publish_marks_under(&root).unwrap(), 0);
    }

    #[test]
    fn a_group_mark_decodes_what_it_encodes_and_rejects_garbage() {
        for mark in [
            GroupMark {
                group: 7,
                published: true,
            },
            GroupMark {
                group: u64::MAX,
                published: false,
            },
        ] {
            assert_eq!(GroupMark::decode(&mark.encode()), Some(mark));
        }
        // The first form: the group id alone, not known published.
        assert_eq!(
            GroupMark::decode(&9u64.to_be_bytes()),
            Some(GroupMark {
                group: 9,
                published: false
            })
        );
        for garbage in [
            &[][..],
            &[1, 1, 0][..],
            &[2, 1, 0, 0, 0, 0, 0, 0, 0, 7][..],
            &[1, 2, 0, 0, 0, 0, 0, 0, 0, 7][..],
            &[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 7][..],
        ] {
            assert_eq!(GroupMark::decode(garbage), None, "{garbage:?}");
        }
    }

    /// Found by the simulator (`--scenario groups --seed 2`): an import the group did not
    /// take left its snapshot listed on the importing member only, so that member's
    /// repair counted chunks no other member had a shard of and the group never read as
    /// whole again.
    #[test]
    fn an_import_the_group_refused_leaves_no_snapshot_listed_here() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault_with_a_refusing_group(temp.path(), Arc::new(MemKv::new()));
        let source = temp.path().join("source");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("file"), vec![7u8; 100_000]).unwrap();
        let refused = vault.import(
            "data",
            &source,
            &import_options(),
            &crate::vault::no_passphrase,
            &crate::progress::Progress::new("import", false),
        );
        assert!(refused.is_err(), "{refused:?}");
        let listed = vault
            .list_snapshots("data", &crate::vault::no_passphrase)
            .unwrap();
        assert!(listed.is_empty(), "still listed here: {listed:?}");
    }

    /// A listing the group lacks goes (a refused publish a lost write brought back),
    /// but not while a write is in progress here, nor from a state read before a local
    /// publish.
    #[test]
    fn a_listing_the_group_lacks_is_dropped_only_while_no_write_is_in_progress() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault_on(temp.path(), Arc::new(MemKv::new()), 1);
        let volume = VolumeId::from_bytes([7; 16]);
        let listing = |snapshot: u8| [volume.as_bytes().as_slice(), &[snapshot; 32]].concat();
        for snapshot in [1, 2] {
            vault
                .metadata
                .apply(&[
                    RecordUpdate::new(
                        RecordSpace::SNAPSHOTS,
                        listing(snapshot),
                        Expected::Any,
                        Change::Put(vec![snapshot]),
                    ),
                    RecordUpdate::new(
                        RecordSpace::INDEX_HEADS,
                        listing(snapshot),
                        Expected::Any,
                        Change::Put(vec![snapshot]),
                    ),
                ])
                .unwrap();
        }
        let listed: std::collections::BTreeSet<Vec<u8>> = [listing(1)].into();
        let session = vault.open_write_session("import", volume).unwrap();
        let read_at = vault.mirror_epoch();
        assert_eq!(
            vault
                .forget_listings_the_group_lacks(&volume, &listed, Some(read_at))
                .unwrap(),
            0
        );
        drop(session);
        let stale = vault.mirror_epoch();
        vault.write_decided(|| Ok(())).unwrap();
        assert_eq!(
            vault
                .forget_listings_the_group_lacks(&volume, &listed, Some(stale))
                .unwrap(),
            0
        );
        assert!(
            vault
                .metadata
                .get_record(RecordSpace::SNAPSHOTS, &listing(2))
                .unwrap()
                .is_some()
        );
        let read_at = vault.mirror_epoch();
        assert_eq!(
            vault
                .forget_listings_the_group_lacks(&volume, &listed, Some(read_at))
                .unwrap(),
            1
        );
        for space in [RecordSpace::SNAPSHOTS, RecordSpace::INDEX_HEADS] {
            assert!(
                vault
                    .metadata
                    .get_record(space, &listing(2))
                    .unwrap()
                    .is_none()
            );
            assert!(
                vault
                    .metadata
                    .get_record(space, &listing(1))
                    .unwrap()
                    .is_some()
            );
        }
    }

    /// A refresh of the mirror that read the group's state before a publish wrote here
    /// must not put the older ref back (seen as a sync offering a stale head).
    #[test]
    fn a_mirror_refresh_read_before_a_local_publish_writes_nothing() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault_on(temp.path(), Arc::new(MemKv::new()), 1);
        let key = b"volume-and-branch".to_vec();
        let old = vec![1u8; 32];
        let new = vec![2u8; 32];
        let read_at = vault.mirror_epoch();
        // The publish: the group decided `new`, written here.
        vault
            .write_decided(|| {
                Ok(vault.metadata.apply(&[RecordUpdate::new(
                    RecordSpace::REFS,
                    key.clone(),
                    Expected::Any,
                    Change::Put(new.clone()),
                )])?)
            })
            .unwrap();
        // The refresh, with what it read before: skipped.
        let records = [(RecordSpace::REFS, key.clone(), old.clone())];
        assert_eq!(
            vault
                .mirror_group_records(&records, &[], Some(read_at))
                .unwrap(),
            0
        );
        assert_eq!(
            vault.metadata.get_record(RecordSpace::REFS, &key).unwrap(),
            Some(new)
        );
        // A refresh read after it writes.
        let read_at = vault.mirror_epoch();
        assert_eq!(
            vault
                .mirror_group_records(&records, &[], Some(read_at))
                .unwrap(),
            1
        );
        assert_eq!(
            vault.metadata.get_record(RecordSpace::REFS, &key).unwrap(),
            Some(old)
        );
    }
}
