//! Volumes in volume groups, the daemon's side (the vault's is `vault/groups.rs`).
//!
//! - A group volume is a record in its group's Raft state machine ([`VOLUMES`]: name →
//!   `GroupVolume`, keys wrapped to every member); each member's watch loop adopts it into
//!   its vault and mirrors the group's refs, listings, index heads and lineage of it.
//! - Publishing a snapshot ([`ClusterNode::distribute`]): each chunk's k+m shard records go
//!   to the members placement names (`forge_store::placement`), objects to every member, in
//!   batched requests pipelined per member (`/forge/shards/1`); a member answers once its
//!   write is synced. A shard whose member does not take it goes to the next member in that
//!   shard's rendezvous order not holding a shard of the chunk. Only when every shard of
//!   every chunk is durable on distinct members does the ref move, by compare-and-swap
//!   through Raft; otherwise the publish fails naming the members that did not answer.
//!   Shards of a chunk that are no longer here (sent by an earlier try) are confirmed with
//!   their owners, and when the members changed while the publish waited on Raft, its
//!   shards are placed again on the members of now before it answers.
//! - Reading a chunk this node holds too few shards of ([`ClusterNode::gather_chunk`]): the
//!   owners of the data shards are asked first, the rest after [`HEDGE_AFTER`] or at the
//!   first failure; any k intact shards rebuild it, and it is returned only if it hashes to
//!   its cid.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use forge_consensus::GroupHandle;
use forge_consensus::cluster::GroupRecord;
use forge_consensus::shards::{
    CIDS_PER_REQUEST_MAX, HeldShards, ObjectPut, PUT_BYTES_MAX, RepairSummary, SHARDS_PROTOCOL,
    ShardPut, ShardReply, ShardRequest,
};
use forge_crypto::{Cid, NodeId, NodePublicKeys};
use forge_mesh::net::{Inbound, InboundRequest, request_idempotent};
use forge_store::VolumeId;
use forge_store::chunkstore::{chunk_from_shards, shard_key};
use forge_store::erasure::{ErasureLayout, ShardRecord};
use forge_store::kv::{Column, Durability, WriteBatch, prefix_end};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};
use forge_store::placement::{place_shards, rank_for_position};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;

use super::cluster::{ClusterNode, apply_with_retry, cluster_error};
use crate::error::{IntegrityFault, NodeError, Result};
use crate::vault::Vault;
use crate::vault::groups::{DELISTED, GroupStorage, GroupVolume};
use crate::vault::records::VolumeRecord;

/// A volume group's volumes, in its state machine: name → `GroupVolume`.
pub const VOLUMES: RecordSpace = RecordSpace::new("volumes");

/// A volume group's gc fence, in its state machine: `epoch` (u64 BE, odd while a sweep
/// runs), `pin-count` (u64 BE, bumped by every pin), `pin/<node><boot><seq>` → [`PinInfo`].
///
/// A writer of a group volume (import, mount, sync) pins the group for its whole session
/// with one compare-and-swap: "epoch unchanged (even), pin-count +1, pin absent → put".
/// The group's gc opens a sweep with one compare-and-swap: "no pins seen, pin-count
/// unchanged, epoch +1 (odd)". Raft orders the two: a pin taken first makes the sweep's
/// swap fail; a sweep opened first makes the pin's fail, and the writer waits for the
/// sweep to end. So no sweep overlaps a writer, which may have deduplicated against any
/// chunk the group holds, and no snapshot ever names what a sweep deleted.
pub const GROUP_GC: RecordSpace = RecordSpace::new("group-gc");
const EPOCH_KEY: &[u8] = b"epoch";
const PIN_COUNT_KEY: &[u8] = b"pin-count";
const PIN_PREFIX: &[u8] = b"pin/";
/// How long a writer waits for a sweep to end before failing, naming it.
const SWEEP_WAIT: Duration = Duration::from_secs(120);
/// A pin older than this is taken as left behind (a node gone for good) by the gc.
const PIN_STALE_AFTER_NS: i64 = 24 * 3600 * 1_000_000_000;

/// A writer's pin, as the group records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinInfo {
    /// The node writing.
    pub node: [u8; 32],
    /// The daemon run that took it.
    pub boot: u64,
    /// What writes: import, mount, sync.
    pub kind: String,
    /// When, ns since the epoch.
    pub since_ns: i64,
}

fn decode_u64(value: Option<&[u8]>, what: &'static str) -> Result<u64> {
    match value {
        None => Ok(0),
        Some(bytes) => {
            bytes
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| NodeError::CorruptRecord {
                    what,
                    reason: format!("{} bytes", bytes.len()),
                })
        }
    }
}

fn expected_of(value: Option<Vec<u8>>) -> Expected {
    value.map_or(Expected::Absent, Expected::Value)
}

/// The records of a group volume the members mirror (keys start with the volume's id).
/// Seals and contracts are read through the group where a decision depends on them (a
/// mount's check), so a mirror's lag (or a lifted seal still mirrored) decides nothing.
const MIRRORED: [RecordSpace; 9] = [
    RecordSpace::REFS,
    crate::vault::peers::SHARES,
    RecordSpace::SNAPSHOTS,
    RecordSpace::INDEX_HEADS,
    crate::vault::peers::LINEAGE,
    crate::vault::trust::CONTRACTS,
    crate::vault::trust::CONTRACT_HISTORY,
    crate::vault::trust::SEALS,
    crate::vault::trust::ANOMALIES,
];

/// How long one shard request may take (a batch of up to 8 MiB written and synced).
const SHARD_DEADLINE: Duration = Duration::from_secs(60);
/// How long a read waits on the owners of the data shards before asking the others too.
pub const HEDGE_AFTER: Duration = Duration::from_millis(250);
/// How long a member may take to repair or sweep its copy of a group.
const LONG_DEADLINE: Duration = Duration::from_secs(3600);
/// Batches in flight to one member while publishing.
const PUTS_IN_FLIGHT: usize = 4;
/// Shard bytes gathered before a window of them is sent (bounds a publish's memory).
const WINDOW_BYTES: usize = 64 << 20;

/// How often each group's background repair runs here (the first run follows the first
/// look at the group after the daemon starts: a member back from a crash pulls what it
/// missed at once). `FORGE_REPAIR_INTERVAL_SECS` changes it.
const REPAIR_INTERVAL_DEFAULT: Duration = Duration::from_secs(300);
/// The rate repair rebuilds at, in bytes of shards per second
/// (`FORGE_REPAIR_BYTES_PER_SEC`): it shares the disks and the network with the users.
const REPAIR_BYTES_PER_SEC_DEFAULT: u64 = 64 << 20;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

/// A group's repair on this node.
#[derive(Debug, Clone, Default)]
pub struct RepairState {
    /// A run is in progress.
    pub running: bool,
    /// When the last run started.
    pub started: Option<tokio::time::Instant>,
    /// What the last finished run did.
    pub last: Option<RepairSummary>,
    /// Shards rebuilt since the daemon started.
    pub rebuilt_total: u64,
}

/// A volume group as this node sees it: its layout, members, and Raft handle.
#[derive(Clone)]
pub(crate) struct GroupView {
    pub id: u64,
    pub name: String,
    pub layout: ErasureLayout,
    /// Placement's members.
    pub nodes: Vec<NodeId>,
    /// Members being removed: read from, never placed on.
    pub retiring: Vec<NodeId>,
    pub handle: GroupHandle,
}

impl GroupView {
    /// Every member that may hold shards: placement's and the retiring.
    fn holders(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().chain(&self.retiring).copied()
    }
}

/// The shards of chunks being published that this node does not hold: each must be on
/// the member placement names for it, or be rebuilt and sent there.
#[derive(Default)]
struct PlacementGaps {
    /// Shards to confirm with their owners (by owner).
    held_elsewhere: BTreeMap<NodeId, BTreeSet<(Cid, u16)>>,
    /// Chunks to rebuild: a shard of each is owned here and missing, or its owner lacks it.
    rebuild: BTreeSet<Cid>,
}

impl PlacementGaps {
    /// Notes the shards of `cid` not in `here` (the indexes held on this node, `me`),
    /// given the `owners` placement names.
    fn note(&mut self, me: NodeId, cid: Cid, owners: &[NodeId], here: &BTreeSet<usize>) {
        for (index, owner) in owners.iter().enumerate() {
            if here.contains(&index) {
                continue;
            }
            match u16::try_from(index) {
                Ok(index) if *owner != me => {
                    self.held_elsewhere
                        .entry(*owner)
                        .or_default()
                        .insert((cid, index));
                }
                _ => {
                    self.rebuild.insert(cid);
                }
            }
        }
    }
}

/// How long a publish waits for the cluster group's latest state to learn whether the
/// group's members changed while it published.
const PLACEMENT_CATCH_UP: Duration = Duration::from_secs(3);

/// What one window of a publish sends: shards per member, objects to all.
#[derive(Default)]
struct Window {
    shards: BTreeMap<NodeId, Vec<ShardPut>>,
    objects: Vec<ObjectPut>,
    /// Keys of the shards this node sent away (dropped here once every member took its).
    sent_keys: Vec<Vec<u8>>,
    bytes: usize,
}

impl Window {
    /// Shard `index` of `cid` (`record`, under `key` here) goes to `owner`.
    fn send(&mut self, owner: NodeId, key: Vec<u8>, cid: Cid, index: u16, record: Vec<u8>) {
        self.bytes += record.len();
        self.sent_keys.push(key);
        self.shards.entry(owner).or_default().push(ShardPut {
            cid: *cid.as_bytes(),
            index,
            record,
        });
    }
}

impl ClusterNode {
    /// Volume group `id`: it must list this node and run here.
    pub(crate) fn group_view(&self, id: u64) -> Result<GroupView> {
        let (name, record) = self
            .groups()?
            .into_iter()
            .find(|(_, record)| record.id == id)
            .ok_or_else(|| cluster_error(format!("no volume group has id {id}")))?;
        self.view_of(name, &record)
    }

    pub(crate) fn view_of(&self, name: String, record: &GroupRecord) -> Result<GroupView> {
        let handle = self.table().get(record.id).ok_or_else(|| {
            cluster_error(format!(
                "volume group {name} does not run on this node (`forge cluster status`)"
            ))
        })?;
        Ok(GroupView {
            id: record.id,
            name,
            layout: ErasureLayout::new(record.data_shards as usize, record.parity_shards as usize)?,
            nodes: record
                .nodes
                .iter()
                .map(|node| NodeId::from_bytes(*node))
                .collect(),
            retiring: record
                .retiring
                .iter()
                .map(|node| NodeId::from_bytes(*node))
                .collect(),
            handle,
        })
    }

    /// The public keys of `nodes`, from their member records (checked against their ids).
    fn member_keys(&self, nodes: &[NodeId]) -> Result<Vec<NodePublicKeys>> {
        let members = self.members()?;
        nodes
            .iter()
            .map(|node| {
                let record = members
                    .get(node)
                    .ok_or_else(|| cluster_error(format!("node {node} is not a cluster member")))?;
                let keys = NodePublicKeys::decode(&record.keys)?;
                if keys.node_id() != *node {
                    return Err(cluster_error(format!(
                        "the member record of {node} holds another node's keys"
                    )));
                }
                Ok(keys)
            })
            .collect()
    }

    /// Creates volume `name` in volume group `group_name` (this node must be in it).
    ///
    /// # Errors
    /// Unknown group, a group this node is not in, the name taken (here or in the group),
    /// no quorum.
    pub async fn create_group_volume(&self, name: &str, group_name: &str) -> Result<VolumeRecord> {
        let (_, record) = self
            .groups()?
            .into_iter()
            .find(|(name, _)| name == group_name)
            .ok_or_else(|| {
                cluster_error(format!(
                    "no volume group named {group_name} (`forge cluster status` lists them)"
                ))
            })?;
        if !record
            .nodes
            .contains(self.vault().identity().node_id().as_bytes())
        {
            return Err(cluster_error(format!(
                "this node is not in volume group {group_name}: create the volume on one of its nodes"
            )));
        }
        if self.vault().volume_record(name)?.is_some() {
            return Err(NodeError::VolumeExists {
                name: name.to_owned(),
            });
        }
        let view = self.view_of(group_name.to_owned(), &record)?;
        let keys = self.member_keys(&view.nodes)?;
        let volume = self.vault().new_group_volume(name, view.layout, &keys)?;
        self.record_group_volume(&view, &volume).await?;
        self.vault().adopt_group_volume(view.id, &volume, &keys)?;
        Ok(volume.volume)
    }

    /// Records `volume` in group `view` (a name is the group's once).
    async fn record_group_volume(&self, view: &GroupView, volume: &GroupVolume) -> Result<()> {
        let name = &volume.volume.name;
        let update = RecordUpdate::new(
            VOLUMES,
            name.as_bytes().to_vec(),
            Expected::Absent,
            Change::Put(volume.encode()),
        );
        match apply_with_retry(&view.handle, &[update]).await {
            Ok(()) => Ok(()),
            Err(NodeError::Consensus(forge_consensus::ConsensusError::Conflict { .. })) => {
                Err(cluster_error(format!(
                    "volume group {} has a volume named {name} already",
                    view.name
                )))
            }
            Err(error) => Err(error),
        }
    }

    /// Adopts group `view`'s volumes into this vault and mirrors their records (the watch
    /// loop, every half second).
    /// `read_at_epoch`: the vault's mirror epoch before the group's state was brought up
    /// to date here (None: no publish can run meanwhile, a gc sweep's fence). `confirmed`:
    /// that state was confirmed current with the leader, so listings it lacks are this
    /// member's alone and go (see [`Vault::forget_listings_the_group_lacks`]).
    pub(crate) fn reconcile_volumes(
        &self,
        view: &GroupView,
        read_at_epoch: Option<u64>,
        confirmed: bool,
    ) -> Result<()> {
        let volumes = view.handle.local_records(VOLUMES.name(), b"")?;
        if volumes.is_empty() {
            return Ok(());
        }
        let keys = self.member_keys(&view.nodes)?;
        for (_, value) in volumes {
            let volume = GroupVolume::decode(&value)?;
            if self.vault().adopt_group_volume(view.id, &volume, &keys)? {
                tracing::info!(volume = %volume.volume.name, group = %view.name, "group volume adopted");
            }
            let mut records = Vec::new();
            for space in MIRRORED {
                for (key, value) in view.handle.local_records(space.name(), &volume.volume.id)? {
                    records.push((space, key, value));
                }
            }
            // The keys of the snapshots' authors (members, and other sites' nodes whose
            // snapshots came in by sync).
            for (author, keys) in view
                .handle
                .local_records(crate::vault::KEYRING.name(), b"")?
            {
                let Ok(node) = NodeId::from_slice(&author) else {
                    continue;
                };
                if !self.vault().knows_keys(&node)? {
                    let keys = NodePublicKeys::decode(&keys)?;
                    if keys.node_id() == node {
                        self.vault().trust_node(&keys)?;
                    }
                }
            }
            let delisted: Vec<Vec<u8>> = view
                .handle
                .local_records(DELISTED.name(), &volume.volume.id)?
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            self.vault()
                .mirror_group_records(&records, &delisted, read_at_epoch)?;
            if confirmed {
                let listed: BTreeSet<Vec<u8>> = records
                    .iter()
                    .filter(|(space, _, _)| *space == RecordSpace::SNAPSHOTS)
                    .map(|(_, key, _)| key.clone())
                    .collect();
                self.vault().forget_listings_the_group_lacks(
                    &VolumeId::from_bytes(volume.volume.id),
                    &listed,
                    read_at_epoch,
                )?;
            }
        }
        Ok(())
    }

    /// Makes everything `named` durable on group `view` (see the module documentation).
    /// Returns the chunks whose shards it placed (those not published before, stored as
    /// shards), for [`Self::place_again_if_moved`].
    ///
    /// # Errors
    /// [`NodeError::Cluster`] naming members that did not take their shards; a named cid
    /// not held here; engine errors.
    fn distribute(
        &self,
        runtime: &tokio::runtime::Handle,
        view: &GroupView,
        named: &[Cid],
    ) -> Result<Vec<Cid>> {
        let vault = self.vault();
        let me = vault.identity().node_id();
        let total = view.layout.total_shards();
        let mut window = Window::default();
        let mut placed = Vec::new();
        // Shards of these chunks not held here: confirmed on their owners before the
        // publish (see `restore_placement`).
        let mut gaps = PlacementGaps::default();
        for cid in named {
            // Published: the group holds it whole (a mark from a shard put alone does not
            // say so: that publish may have been refused with members down).
            if vault.is_published(cid)? {
                continue;
            }
            if let Some(bytes) = vault.kv().get(Column::Objects, cid.as_bytes())? {
                window.bytes += bytes.len();
                window.objects.push(ObjectPut {
                    cid: *cid.as_bytes(),
                    bytes,
                });
            } else {
                let end = prefix_end(cid.as_bytes());
                let stored =
                    vault
                        .kv()
                        .scan(Column::Shards, cid.as_bytes(), end.as_deref(), total + 1)?;
                if stored.is_empty() {
                    return Err(NodeError::MissingWhileWriting { cid: cid.to_hex() });
                }
                let owners = place_shards(cid, total, &view.nodes);
                let here: BTreeSet<usize> = stored
                    .iter()
                    .filter_map(|(key, _)| key.get(32..34))
                    .map(|bytes| usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
                    .collect();
                gaps.note(me, *cid, &owners, &here);
                placed.push(*cid);
                for (key, record) in stored {
                    let Some(index) = key
                        .get(32..34)
                        .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
                    else {
                        continue;
                    };
                    let Some(owner) = owners.get(usize::from(index)) else {
                        continue;
                    };
                    if *owner == me {
                        continue;
                    }
                    window.send(*owner, key, *cid, index, record);
                }
            }
            if window.bytes >= WINDOW_BYTES {
                self.send_window(runtime, view, std::mem::take(&mut window))?;
            }
        }
        self.send_window(runtime, view, window)?;
        self.restore_placement(runtime, view, gaps)?;
        Ok(placed)
    }

    /// After a publish distributed the shards of `distributed` under `distributed_on`:
    /// when the group's members are not those any more (one added or removed while the
    /// publish waited on Raft), each of their shards goes where placement names it now
    /// (see `restore_placement`).
    fn place_again_if_moved(
        &self,
        runtime: &tokio::runtime::Handle,
        distributed_on: &GroupView,
        distributed: &[Cid],
    ) -> Result<()> {
        // The members as the cluster has them now, caught up for a moment at most: a
        // cluster group without a leader changes no membership either, and the publish
        // is not held up by it (the state applied here then decides).
        if let Some(cluster) = self.table().get(forge_consensus::CLUSTER_GROUP) {
            // The timer is made inside the runtime: this thread (a vault thread in the
            // daemon) has no runtime context of its own.
            let _ = wait(runtime, async {
                tokio::time::timeout(
                    PLACEMENT_CATCH_UP,
                    catch_up_async(&cluster, "the cluster group"),
                )
                .await
            });
        }
        let (_, record) = self
            .groups()?
            .into_iter()
            .find(|(group, _)| *group == distributed_on.name)
            .ok_or_else(|| {
                cluster_error(format!("no volume group named {}", distributed_on.name))
            })?;
        let view = self.view_of(distributed_on.name.clone(), &record)?;
        if view.nodes == distributed_on.nodes {
            return Ok(());
        }
        let vault = self.vault();
        let me = vault.identity().node_id();
        let total = view.layout.total_shards();
        let mut gaps = PlacementGaps::default();
        for cid in distributed {
            let end = prefix_end(cid.as_bytes());
            let here: BTreeSet<usize> = vault
                .kv()
                .scan(Column::Shards, cid.as_bytes(), end.as_deref(), total + 1)?
                .iter()
                .filter_map(|(key, _)| key.get(32..34))
                .map(|bytes| usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
                .collect();
            gaps.note(me, *cid, &place_shards(cid, total, &view.nodes), &here);
        }
        self.restore_placement(runtime, &view, gaps)
    }

    /// Makes sure each shard of a chunk being published that this node does not hold is
    /// on the member placement names for it now, rebuilding (from any k intact shards the
    /// members hold) and sending those that are not.
    ///
    /// A chunk's shards leave the importer when they land, before the publish: when the
    /// publish fails (or its answer is lost) and is tried again, the shards are where the
    /// members of that first attempt placed them. A member added or removed since moves
    /// the placement, and the repair that would move them walks published snapshots only.
    /// The simulator found a snapshot acknowledged with one shard of a chunk on a node
    /// removed from the group meanwhile, the chunk one lost shard from gone (seed 1800474).
    fn restore_placement(
        &self,
        runtime: &tokio::runtime::Handle,
        view: &GroupView,
        gaps: PlacementGaps,
    ) -> Result<()> {
        let PlacementGaps {
            held_elsewhere,
            mut rebuild,
        } = gaps;
        if held_elsewhere.is_empty() && rebuild.is_empty() {
            return Ok(());
        }
        let net = self.peer_net();
        for (owner, expected) in held_elsewhere {
            let expected: Vec<(Cid, u16)> = expected.into_iter().collect();
            for part in expected.chunks(CIDS_PER_REQUEST_MAX) {
                let cids: Vec<Cid> = part
                    .iter()
                    .map(|(cid, _)| *cid)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let request = ShardRequest::Has {
                    group: view.id,
                    cids: cids.iter().map(|cid| *cid.as_bytes()).collect(),
                };
                let answer = wait(
                    runtime,
                    call_member(&*net, owner, &request, SHARD_DEADLINE, Retry::Idempotent),
                );
                // Not answering counts as not holding: the put below then fails over
                // as any put does.
                let held: BTreeSet<(Cid, u16)> = match answer {
                    Ok(ShardReply::Held(held)) => cids
                        .iter()
                        .zip(held)
                        .flat_map(|(cid, indexes)| indexes.into_iter().map(|index| (*cid, index)))
                        .collect(),
                    _ => BTreeSet::new(),
                };
                rebuild.extend(
                    part.iter()
                        .filter(|shard| !held.contains(*shard))
                        .map(|(cid, _)| *cid),
                );
            }
        }
        if rebuild.is_empty() {
            return Ok(());
        }
        let vault = self.vault();
        let me = vault.identity().node_id();
        let total = view.layout.total_shards();
        let coder = forge_store::erasure::ErasureCoder::new(view.layout)?;
        let mut window = Window::default();
        for cid in rebuild {
            let local = intact_local_shards(vault, &cid)?;
            let ciphertext = wait(runtime, self.gather_chunk(view, cid, local.clone()))?;
            let payloads = coder.encode(&ciphertext)?;
            let ciphertext_len = u32::try_from(ciphertext.len()).unwrap_or(u32::MAX);
            let owners = place_shards(&cid, total, &view.nodes);
            // Every shard not intact here goes (again) to its owner: a put of a shard the
            // owner holds already writes the same record.
            let mut batch = WriteBatch::new();
            for (index, owner) in owners.iter().enumerate() {
                if local.iter().any(|(held, _)| *held == index) {
                    continue;
                }
                let shard = forge_store::ids::ShardIdx::new(index)
                    .map_err(forge_store::chunkstore::ChunkStoreError::from)?;
                let record = ShardRecord {
                    layout: view.layout,
                    index: shard,
                    ciphertext_len,
                    payload: payloads[index].clone(),
                }
                .encode();
                // Kept here until its owner has it (a stand-in if it never takes it).
                let key = shard_key(&cid, shard);
                batch.put(Column::Shards, key.clone(), record.clone());
                if *owner == me {
                    continue;
                }
                window.send(
                    *owner,
                    key,
                    cid,
                    u16::try_from(index).unwrap_or(u16::MAX),
                    record,
                );
            }
            vault.kv().write(batch, Durability::Synced)?;
            if window.bytes >= WINDOW_BYTES {
                self.send_window(runtime, view, std::mem::take(&mut window))?;
            }
        }
        self.send_window(runtime, view, window)
    }

    /// Sends one window and waits until every shard is durable on a distinct member;
    /// then drops here the shards that went elsewhere.
    fn send_window(
        &self,
        runtime: &tokio::runtime::Handle,
        view: &GroupView,
        window: Window,
    ) -> Result<()> {
        if window.shards.is_empty() && window.objects.is_empty() {
            return Ok(());
        }
        let me = self.vault().identity().node_id();
        let others: Vec<NodeId> = view
            .nodes
            .iter()
            .copied()
            .filter(|node| *node != me)
            .collect();
        let Window {
            shards,
            objects,
            sent_keys,
            ..
        } = window;
        let failed = wait(runtime, async {
            let mut sends = FuturesUnordered::new();
            for node in &others {
                let mine = shards.get(node).cloned().unwrap_or_default();
                sends.push(self.put_all(view.id, *node, mine, objects.clone()));
            }
            let mut failed: BTreeMap<NodeId, (Vec<ShardPut>, String)> = BTreeMap::new();
            while let Some((node, outcome)) = sends.next().await {
                if let Err((unsent, reason)) = outcome {
                    failed.insert(node, (unsent, reason));
                }
            }
            failed
        });
        let kept = if failed.is_empty() {
            BTreeSet::new()
        } else {
            self.place_elsewhere(runtime, view, &shards, &failed)?
        };
        // Every shard is durable on its member: this node keeps only its own, and those
        // it stands in for.
        let mut batch = WriteBatch::new();
        for key in sent_keys {
            if !kept.contains(&key) {
                batch.delete(Column::Shards, key);
            }
        }
        self.vault().kv().write(batch, Durability::Logged)?;
        Ok(())
    }

    /// Shards whose members did not take them go to the next member in each shard's
    /// rendezvous order that holds no shard of that chunk (this node too: it then keeps
    /// the shard). Returns the keys of the shards this node keeps as a stand-in.
    fn place_elsewhere(
        &self,
        runtime: &tokio::runtime::Handle,
        view: &GroupView,
        placed: &BTreeMap<NodeId, Vec<ShardPut>>,
        failed: &BTreeMap<NodeId, (Vec<ShardPut>, String)>,
    ) -> Result<BTreeSet<Vec<u8>>> {
        let mut kept = BTreeSet::new();
        let me = self.vault().identity().node_id();
        let down: BTreeSet<NodeId> = failed.keys().copied().collect();
        // Who holds a shard of each chunk now (this node holds those placed on it).
        let mut holders: BTreeMap<[u8; 32], BTreeSet<NodeId>> = BTreeMap::new();
        for (node, puts) in placed {
            if down.contains(node) {
                continue;
            }
            for put in puts {
                holders.entry(put.cid).or_default().insert(*node);
            }
        }
        let mut moved: BTreeMap<NodeId, Vec<ShardPut>> = BTreeMap::new();
        for (node, (puts, _)) in failed {
            for put in puts {
                let cid = Cid::from_bytes(put.cid);
                let owners = place_shards(&cid, view.layout.total_shards(), &view.nodes);
                let holding = holders.entry(put.cid).or_default();
                holding.extend(owners.iter().filter(|owner| **owner == me));
                let next = rank_for_position(&cid, usize::from(put.index), &view.nodes)
                    .into_iter()
                    .find(|candidate| {
                        candidate != node
                            && !down.contains(candidate)
                            && !holding.contains(candidate)
                    });
                let Some(next) = next else {
                    return Err(self.publish_failed(view, failed));
                };
                holding.insert(next);
                if next == me {
                    let index = forge_store::ids::ShardIdx::new(usize::from(put.index))
                        .map_err(forge_store::chunkstore::ChunkStoreError::from)?;
                    kept.insert(shard_key(&cid, index));
                } else {
                    moved.entry(next).or_default().push(put.clone());
                }
            }
        }
        let refused = wait(runtime, async {
            let mut sends = FuturesUnordered::new();
            for (node, puts) in moved {
                sends.push(self.put_all(view.id, node, puts, Vec::new()));
            }
            let mut refused = Vec::new();
            while let Some((node, outcome)) = sends.next().await {
                if outcome.is_err() {
                    refused.push(node);
                }
            }
            refused
        });
        if refused.is_empty() {
            tracing::warn!(
                group = %view.name,
                members = ?down,
                "members did not take their shards: placed on the next ones (repair moves them back)"
            );
            Ok(kept)
        } else {
            Err(self.publish_failed(view, failed))
        }
    }

    fn publish_failed(
        &self,
        view: &GroupView,
        failed: &BTreeMap<NodeId, (Vec<ShardPut>, String)>,
    ) -> NodeError {
        let named: Vec<String> = failed
            .iter()
            .map(|(node, (_, reason))| format!("{node} ({reason})"))
            .collect();
        cluster_error(format!(
            "the snapshot was not published: too few members of volume group {} took their shards to keep {} on distinct nodes; not answering: {}",
            view.name,
            view.layout,
            named.join(", ")
        ))
    }

    /// Sends `shards` and `objects` to `node` in batches, a few in flight; on failure,
    /// what was not acknowledged and why.
    async fn put_all(
        &self,
        group: u64,
        node: NodeId,
        shards: Vec<ShardPut>,
        objects: Vec<ObjectPut>,
    ) -> (NodeId, std::result::Result<(), (Vec<ShardPut>, String)>) {
        let mut batches: Vec<(Vec<ShardPut>, Vec<ObjectPut>)> = Vec::new();
        let mut current = (Vec::new(), Vec::new());
        let mut bytes = 0;
        for put in shards {
            if bytes + put.record.len() > PUT_BYTES_MAX
                && !(current.0.is_empty() && current.1.is_empty())
            {
                batches.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += put.record.len();
            current.0.push(put);
        }
        for object in objects {
            if bytes + object.bytes.len() > PUT_BYTES_MAX
                && !(current.0.is_empty() && current.1.is_empty())
            {
                batches.push(std::mem::take(&mut current));
                bytes = 0;
            }
            bytes += object.bytes.len();
            current.1.push(object);
        }
        if !(current.0.is_empty() && current.1.is_empty()) {
            batches.push(current);
        }
        let net = self.peer_net();
        let results: Vec<(Vec<ShardPut>, std::result::Result<(), String>)> =
            futures_util::stream::iter(batches.into_iter().map(|(shards, objects)| {
                let net = net.clone();
                async move {
                    let request = ShardRequest::Put {
                        group,
                        shards: shards.clone(),
                        objects,
                    };
                    // A put is idempotent (the same records under the same keys).
                    let outcome =
                        match call_member(&*net, node, &request, SHARD_DEADLINE, Retry::Idempotent)
                            .await
                        {
                            Ok(ShardReply::Stored { .. }) => Ok(()),
                            Ok(other) => Err(unexpected_reply(node, "a put", &other).to_string()),
                            Err(error) => Err(error.to_string()),
                        };
                    (shards, outcome)
                }
            }))
            .buffer_unordered(PUTS_IN_FLIGHT)
            .collect()
            .await;
        let mut unsent = Vec::new();
        let mut reason = None;
        for (shards, outcome) in results {
            if let Err(error) = outcome {
                unsent.extend(shards);
                reason.get_or_insert(error);
            }
        }
        match reason {
            None => (node, Ok(())),
            Some(reason) => (node, Err((unsent, reason))),
        }
    }

    /// Chunk `cid` of group `view`, from the shards held here and gathered from the
    /// members (see the module documentation).
    ///
    /// # Errors
    /// [`IntegrityFault`] when too few intact shards could be gathered.
    async fn gather_chunk(
        &self,
        view: &GroupView,
        cid: Cid,
        local: Vec<(usize, Vec<u8>)>,
    ) -> Result<Vec<u8>> {
        if forge_store::fault_point!("gather-fails") {
            return Err(cluster_error(format!(
                "chunk {cid}: no member answered (a simulated fault)"
            )));
        }
        let me = self.vault().identity().node_id();
        let total = view.layout.total_shards();
        let needed = view.layout.data_shards();
        let owners = place_shards(&cid, total, &view.nodes);
        let mut have: Vec<(usize, Vec<u8>)> = local;
        // The owners of the data shards first (no decoding when they all answer).
        // Members that just failed a request are asked last, only if the others fall short.
        let mut first: Vec<NodeId> = Vec::new();
        for (index, owner) in owners.iter().enumerate().take(needed) {
            if *owner != me
                && !have.iter().any(|(held, _)| *held == index)
                && !first.contains(owner)
                && !self.is_suspect(owner)
            {
                first.push(*owner);
            }
        }
        let (suspects, mut rest): (Vec<NodeId>, Vec<NodeId>) = view
            .holders()
            .filter(|node| *node != me && !first.contains(node))
            .partition(|node| self.is_suspect(node));
        let mut last_resort = suspects;
        if first.is_empty() {
            // Every data owner is suspect: the others at once.
            first = std::mem::take(&mut rest);
        }
        let net = self.peer_net();
        let ask = |node: NodeId| {
            let net = net.clone();
            async move {
                let request = ShardRequest::Get {
                    group: view.id,
                    cids: vec![*cid.as_bytes()],
                };
                let outcome = async {
                    match call_member(&*net, node, &request, SHARD_DEADLINE, Retry::Idempotent)
                        .await?
                    {
                        ShardReply::Shards(held) => Ok(held),
                        other => Err(unexpected_reply(node, "a read", &other)),
                    }
                }
                .await;
                (node, outcome)
            }
        };
        let mut asking = FuturesUnordered::new();
        for node in &first {
            asking.push(ask(*node));
        }
        let mut hedged = rest.is_empty();
        // Who answered: a first-asked member still silent when the hedge fires is treated
        // as failed for a while (a killed member's requests do not fail, they wait out
        // their deadline: without this every chunk read waited the hedge for it).
        let mut answered: Vec<NodeId> = Vec::new();
        let hedge = tokio::time::sleep(HEDGE_AFTER);
        tokio::pin!(hedge);
        let mut last_error = None;
        loop {
            if have.len() >= needed {
                match chunk_from_shards(&cid, &have) {
                    Ok(read) => return Ok(read.ciphertext),
                    // A damaged shard among them: wait for more.
                    Err(error) => last_error = Some(error.to_string()),
                }
            }
            if asking.is_empty() {
                if hedged {
                    if last_resort.is_empty() {
                        break;
                    }
                    for node in std::mem::take(&mut last_resort) {
                        asking.push(ask(node));
                    }
                    continue;
                }
                hedged = true;
                for node in &rest {
                    asking.push(ask(*node));
                }
                continue;
            }
            tokio::select! {
                reply = asking.next() => {
                    let Some((node, outcome)) = reply else { continue };
                    answered.push(node);
                    match outcome {
                        Ok(held) => {
                            for HeldShards { cid: held_cid, shards } in held {
                                if held_cid != *cid.as_bytes() {
                                    continue;
                                }
                                for (index, record) in shards {
                                    let index = usize::from(index);
                                    if !have.iter().any(|(held, _)| *held == index)
                                        && ShardRecord::decode(&record).is_ok_and(|decoded| decoded.index.get() == index)
                                    {
                                        have.push((index, record));
                                    }
                                }
                            }
                        }
                        Err(error) => {
                            tracing::debug!(%node, %error, "a member did not answer a shard read");
                            if matches!(
                                error,
                                NodeError::Mesh(
                                    forge_mesh::net::MeshError::Unreachable { .. }
                                        | forge_mesh::net::MeshError::ConnectionLost { .. }
                                        | forge_mesh::net::MeshError::Timeout { .. }
                                )
                            ) {
                                self.suspect(node);
                            }
                            last_error = Some(error.to_string());
                            if !hedged {
                                hedged = true;
                                for node in &rest {
                                    asking.push(ask(*node));
                                }
                            }
                        }
                    }
                }
                () = &mut hedge, if !hedged => {
                    hedged = true;
                    for node in first.iter().filter(|node| !answered.contains(node)) {
                        self.suspect(*node);
                    }
                    for node in &rest {
                        asking.push(ask(*node));
                    }
                }
            }
        }
        Err(IntegrityFault::UnreadableChunk {
            cid,
            reason: format!(
                "{} of {total} shards could be gathered from volume group {} ({needed} needed){}",
                have.len(),
                view.name,
                last_error
                    .map(|error| format!("; last: {error}"))
                    .unwrap_or_default()
            ),
        }
        .into())
    }

    /// Object `cid` from the first member of `view` that has it.
    async fn gather_object(&self, view: &GroupView, cid: Cid) -> Result<Vec<u8>> {
        let me = self.vault().identity().node_id();
        let net = self.peer_net();
        let mut asking: FuturesUnordered<_> = view
            .holders()
            .filter(|node| *node != me)
            .map(|node| {
                let net = net.clone();
                async move {
                    let request = ShardRequest::Objects {
                        group: view.id,
                        cids: vec![*cid.as_bytes()],
                    };
                    match call_member(&*net, node, &request, SHARD_DEADLINE, Retry::Idempotent)
                        .await?
                    {
                        ShardReply::Objects(mut objects) => Ok(objects.pop().flatten()),
                        other => Err(unexpected_reply(node, "an object read", &other)),
                    }
                }
            })
            .collect();
        while let Some(outcome) = asking.next().await {
            if let Ok(Some(bytes)) = outcome
                && Cid::of(&bytes) == cid
            {
                return Ok(bytes);
            }
        }
        Err(IntegrityFault::MissingObject { cid }.into())
    }

    /// Starts a background repair of group `id` unless one runs or ran within the interval.
    pub(crate) fn repair_in_background(&self, id: u64) {
        let interval = env_u64("FORGE_REPAIR_INTERVAL_SECS")
            .map_or(REPAIR_INTERVAL_DEFAULT, Duration::from_secs);
        {
            let repairs = self.repairs();
            if let Some(state) = repairs.get(&id)
                && (state.running
                    || state
                        .started
                        .is_some_and(|started| started.elapsed() < interval))
            {
                return;
            }
        }
        let this = self.weak();
        let runtime = tokio::runtime::Handle::current();
        crate::lockstep::spawn_blocking(move || {
            let Some(node) = this.upgrade() else { return };
            if let Err(error) = node.repair(&runtime, id) {
                tracing::warn!(%error, group = id, "repair");
            }
        });
    }

    /// Repairs group `id` here: for each chunk of the group's volumes (every listed
    /// snapshot walked, objects this node lacks fetched on the way), rebuilds the shards
    /// placement gives this node that it lacks, from any k the others hold, at the repair
    /// rate; and drops the shards it holds for another owner once that owner holds them.
    /// One run at a time per group (another waits for it).
    ///
    /// # Errors
    /// Another run in progress; the group not running here; engine errors. Chunks that
    /// cannot be rebuilt now are counted in the backlog, not errors.
    pub(crate) fn repair(
        &self,
        runtime: &tokio::runtime::Handle,
        id: u64,
    ) -> Result<RepairSummary> {
        // One run at a time: a run asked for while another goes on (the background one)
        // waits for it, then runs itself (what it must see may have changed meanwhile).
        let waiting_since = tokio::time::Instant::now();
        loop {
            {
                let mut repairs = self.repairs();
                let state = repairs.entry(id).or_default();
                if !state.running {
                    state.running = true;
                    state.started = Some(tokio::time::Instant::now());
                    break;
                }
            }
            if waiting_since.elapsed() > Duration::from_secs(3600) {
                return Err(cluster_error(format!(
                    "a repair of volume group {id} has been running on this node for an hour; try again later"
                )));
            }
            crate::lockstep::sleep(Duration::from_millis(100));
        }
        let outcome = self.repair_run(runtime, id);
        let mut repairs = self.repairs();
        let state = repairs.entry(id).or_default();
        state.running = false;
        if let Ok(summary) = &outcome {
            state.rebuilt_total += summary.rebuilt;
            state.last = Some(summary.clone());
        }
        outcome
    }

    fn repair_run(&self, runtime: &tokio::runtime::Handle, id: u64) -> Result<RepairSummary> {
        // The members as the cluster has them now (a node added or retiring just before
        // changes every placement).
        if let Some(cluster) = self.table().get(forge_consensus::CLUSTER_GROUP) {
            catch_up(runtime, &cluster, "the cluster group");
        }
        let view = self.group_view(id)?;
        let vault = self.vault();
        let me = vault.identity().node_id();
        let total = view.layout.total_shards();
        let coder = forge_store::erasure::ErasureCoder::new(view.layout)?;
        let rate = env_u64("FORGE_REPAIR_BYTES_PER_SEC")
            .unwrap_or(REPAIR_BYTES_PER_SEC_DEFAULT)
            .max(1);
        let mut summary = RepairSummary::default();
        // Everything the group committed before now applied and mirrored here first, so
        // no snapshot published just before is missed.
        let epoch = vault.mirror_epoch();
        let confirmed = catch_up(runtime, &view.handle, &view.name);
        self.reconcile_volumes(&view, Some(epoch), confirmed)?;
        let objects_before = vault
            .counters()
            .group_objects_fetched
            .load(std::sync::atomic::Ordering::Relaxed);
        let listed: BTreeSet<Vec<u8>> = view
            .handle
            .local_records(RecordSpace::SNAPSHOTS.name(), b"")?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let chunks = vault.group_chunks(id, &listed)?;
        let started = tokio::time::Instant::now();
        // Owners that did not answer this run are not asked again in it.
        let mut unreachable = BTreeSet::new();
        for cid in chunks {
            summary.chunks += 1;
            let owners = place_shards(&cid, total, &view.nodes);
            let mine: Vec<usize> = if forge_store::injected_bug!("repair-wrong-node") {
                (0..total)
                    .filter(|index| owners[(*index + 1) % total] == me)
                    .collect()
            } else {
                (0..total).filter(|index| owners[*index] == me).collect()
            };
            let local = intact_local_shards(vault, &cid)?;
            let missing: Vec<usize> = mine
                .iter()
                .copied()
                .filter(|index| !local.iter().any(|(held, _)| held == index))
                .collect();
            let stand_ins: Vec<usize> = local
                .iter()
                .map(|(index, _)| *index)
                .filter(|index| !mine.contains(index))
                .collect();
            if !missing.is_empty() {
                match wait(runtime, self.gather_chunk(&view, cid, local.clone())) {
                    Ok(ciphertext) => {
                        let payloads = coder.encode(&ciphertext)?;
                        let ciphertext_len = u32::try_from(ciphertext.len()).unwrap_or(u32::MAX);
                        let mut batch = WriteBatch::new();
                        for index in &missing {
                            let shard = forge_store::ids::ShardIdx::new(*index)
                                .map_err(forge_store::chunkstore::ChunkStoreError::from)?;
                            let record = ShardRecord {
                                layout: view.layout,
                                index: shard,
                                ciphertext_len,
                                payload: payloads[*index].clone(),
                            }
                            .encode();
                            summary.rebuilt_bytes += record.len() as u64;
                            batch.put(Column::Shards, shard_key(&cid, shard), record);
                        }
                        // A listed snapshot reaches it (see the upgrade below).
                        Vault::mark_grouped(&mut batch, id, &[cid], true);
                        vault.kv().write(batch, Durability::Synced)?;
                        summary.rebuilt += missing.len() as u64;
                        summary.held += mine.len() as u64;
                        // At the repair rate: sleep off what ran ahead of it.
                        let due =
                            Duration::from_secs_f64(summary.rebuilt_bytes as f64 / rate as f64);
                        if let Some(ahead) = due.checked_sub(started.elapsed()) {
                            crate::lockstep::sleep(ahead);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, %cid, "repair could not gather a chunk");
                        summary.backlog += missing.len() as u64;
                        summary.held += (mine.len() - missing.len()) as u64;
                    }
                }
            } else {
                summary.held += mine.len() as u64;
                // A listed snapshot reaches it and this node's shards are whole: an import
                // or sync here may skip it from now on. (Marks from shard puts alone are
                // not published; see `GroupMark`.)
                if !vault.is_published(&cid)? {
                    let mut batch = WriteBatch::new();
                    Vault::mark_grouped(&mut batch, id, &[cid], true);
                    vault.kv().write(batch, Durability::Logged)?;
                }
            }
            if !stand_ins.is_empty() {
                summary.released += self.release_stand_ins(
                    runtime,
                    &view,
                    cid,
                    &owners,
                    &stand_ins,
                    &mut unreachable,
                )?;
            }
        }
        summary.objects_fetched = vault
            .counters()
            .group_objects_fetched
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(objects_before);
        if summary.rebuilt > 0 || summary.released > 0 || summary.backlog > 0 {
            tracing::info!(group = %view.name, ?summary, "repair");
        }
        Ok(summary)
    }

    /// Drops the shards of `cid` this node holds for another owner, each once its owner
    /// says it holds it. Returns how many were dropped.
    fn release_stand_ins(
        &self,
        runtime: &tokio::runtime::Handle,
        view: &GroupView,
        cid: Cid,
        owners: &[NodeId],
        stand_ins: &[usize],
        unreachable: &mut BTreeSet<NodeId>,
    ) -> Result<u64> {
        let net = self.peer_net();
        let mut released = WriteBatch::new();
        let mut count = 0;
        for index in stand_ins {
            let Some(owner) = owners.get(*index) else {
                continue;
            };
            let request = ShardRequest::Has {
                group: view.id,
                cids: vec![*cid.as_bytes()],
            };
            if unreachable.contains(owner) {
                continue;
            }
            let answer = wait(
                runtime,
                call_member(&*net, *owner, &request, SHARD_DEADLINE, Retry::Once),
            );
            if answer.is_err() {
                unreachable.insert(*owner);
            }
            let Ok(ShardReply::Held(held)) = answer else {
                continue;
            };
            // Only while the owner holds no other shard of the chunk: a node holding two
            // (its own and one it stands in for) would take both with it if lost (the
            // simulator lost a chunk so, seed 30588678: a stand-in released to a node
            // that still stood in for a member added but not yet caught up).
            if held
                .first()
                .is_some_and(|indexes| indexes.len() == 1 && usize::from(indexes[0]) == *index)
            {
                let shard = forge_store::ids::ShardIdx::new(*index)
                    .map_err(forge_store::chunkstore::ChunkStoreError::from)?;
                released.delete(Column::Shards, shard_key(&cid, shard));
                count += 1;
            }
        }
        if count > 0 {
            self.vault().kv().write(released, Durability::Synced)?;
        }
        Ok(count)
    }

    /// Group `name` with its members as the cluster has them now (caught up with the
    /// cluster group first: a member just added or removed counts).
    async fn current_view(&self, name: &str) -> Result<(GroupRecord, GroupView)> {
        if let Some(cluster) = self.table().get(forge_consensus::CLUSTER_GROUP) {
            catch_up_async(&cluster, "the cluster group").await;
        }
        let (_, record) = self
            .groups()?
            .into_iter()
            .find(|(group, _)| group == name)
            .ok_or_else(|| cluster_error(format!("no volume group named {name}")))?;
        let view = self.view_of(name.to_owned(), &record)?;
        Ok((record, view))
    }

    /// Repairs group `name` on every member (this one and each other, asked over the
    /// shard protocol), and sums what they report.
    ///
    /// # Errors
    /// Unknown group, one this node is not in; this node's own repair failing.
    pub async fn repair_group(&self, name: &str) -> Result<forge_proto::v1::RepairGroupReply> {
        let (record, view) = self.current_view(name).await?;
        // A member without a volume's keys, or outside the Raft group, cannot adopt the
        // volume, so holds none of its shards.
        if let Err(error) = self.finish_interrupted_adds(&view).await {
            tracing::warn!(%error, group = %name, "repair could not finish an interrupted add");
        }
        let me = self.vault().identity().node_id();
        let this = self.weak();
        let runtime = tokio::runtime::Handle::current();
        let id = view.id;
        let own = crate::lockstep::spawn_blocking(move || {
            this.upgrade()
                .ok_or_else(|| cluster_error("the daemon is stopping"))?
                .repair(&runtime, id)
        });
        let net = self.peer_net();
        let others: Vec<_> =
            view.holders()
                .filter(|node| *node != me)
                .map(|node| {
                    let net = net.clone();
                    async move {
                        let request = ShardRequest::Repair { group: id };
                        let outcome =
                            match call_member(&*net, node, &request, LONG_DEADLINE, Retry::Once)
                                .await
                            {
                                Ok(ShardReply::Repaired(summary)) => Ok(summary),
                                Ok(other) => Err(unexpected_reply(node, "a repair", &other)),
                                Err(error) => Err(error),
                            };
                        (node, outcome)
                    }
                })
                .collect();
        let others = futures_util::future::join_all(others).await;
        let own = own
            .await
            .map_err(|error| cluster_error(format!("the repair task failed: {error}")))??;
        let mut reply = forge_proto::v1::RepairGroupReply {
            group: name.to_owned(),
            data_shards: record.data_shards,
            parity_shards: record.parity_shards,
            chunks: own.chunks,
            shards_held: own.held,
            members: vec![member_repair(me, Ok(&own))],
        };
        for (node, outcome) in &others {
            if let Ok(summary) = outcome {
                reply.shards_held += summary.held;
            }
            reply.members.push(member_repair(
                *node,
                outcome.as_ref().map_err(ToString::to_string),
            ));
        }
        Ok(reply)
    }

    /// Changes group `name`'s record in the cluster group by compare-and-swap: `change`
    /// gets the record as the leader has it and returns the new one (or an error).
    async fn change_group_record(
        &self,
        name: &str,
        change: impl Fn(&GroupRecord) -> Result<GroupRecord>,
    ) -> Result<GroupRecord> {
        let cluster = self
            .table()
            .get(forge_consensus::CLUSTER_GROUP)
            .ok_or_else(|| cluster_error("this node is not in a cluster"))?;
        loop {
            let current =
                read_with_retry(&cluster, forge_consensus::cluster::GROUPS, name.as_bytes())
                    .await?
                    .ok_or_else(|| cluster_error(format!("no volume group named {name}")))?;
            let record = GroupRecord::decode(&current)?;
            let changed = change(&record)?;
            let update = RecordUpdate::new(
                RecordSpace::new(forge_consensus::cluster::GROUPS),
                name.as_bytes().to_vec(),
                Expected::Value(current),
                Change::Put(changed.encode()?),
            );
            match apply_with_retry(&cluster, &[update]).await {
                Ok(()) => return Ok(changed),
                // Changed meanwhile (another add or remove): again, from what it is now.
                Err(NodeError::Consensus(forge_consensus::ConsensusError::Conflict { .. })) => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Adds cluster member `node` to volume group `name`: it runs the group (a learner
    /// that catches up, then a voter), gets every group volume's keys, and shards move to
    /// it as placement now says, by repair in the background.
    ///
    /// # Errors
    /// Not a member; this node not in it; no quorum. Adding a node the group's record
    /// lists already finishes what an interrupted add left undone (its keys, its place
    /// in the Raft group) and succeeds.
    pub async fn add_group_node(
        &self,
        name: &str,
        node: NodeId,
    ) -> Result<forge_proto::v1::GroupInfo> {
        let me = self.vault().identity().node_id();
        if !self.members()?.contains_key(&node) {
            return Err(cluster_error(format!(
                "node {node} is not a cluster member (`forge cluster status` lists them)"
            )));
        }
        let keys = self.member_keys(&[node])?;
        let record = self
            .change_group_record(name, |record| {
                if !record.nodes.contains(me.as_bytes()) {
                    return Err(cluster_error(format!(
                        "this node is not in volume group {name}: add nodes from one of its members (it holds the keys to hand over)"
                    )));
                }
                if record.nodes.contains(node.as_bytes()) {
                    // In the record already: an add interrupted after it (its keys or
                    // its Raft membership not done, say an answer lost) finishes now.
                    return Ok(record.clone());
                }
                let mut changed = record.clone();
                changed.nodes.push(*node.as_bytes());
                changed.retiring.retain(|retiring| retiring != node.as_bytes());
                Ok(changed)
            })
            .await?;
        let view = self.view_of(name.to_owned(), &record)?;
        // Its keys first: it adopts the volumes as soon as it runs the group. Every
        // volume the group has, not only those applied here yet.
        confirm_latest(&view.handle, &view.name).await?;
        for (key, _) in view.handle.local_records(VOLUMES.name(), b"")? {
            self.wrap_volume_to(&view, &key, &keys[0]).await?;
        }
        view.handle.add_member(&node).await?;
        self.after_membership_change(name);
        Ok(self.group_info(name, &record))
    }

    /// Adds an envelope of group volume `key`'s keys for `member` (none if it has one),
    /// by compare-and-swap on the group's record of it, again from what it is now when
    /// it changed meanwhile (another writer, or this one's earlier try that went in with
    /// its answer lost: the simulator saw an add stop half done there).
    async fn wrap_volume_to(
        &self,
        view: &GroupView,
        key: &[u8],
        member: &NodePublicKeys,
    ) -> Result<()> {
        let holder = member.node_id();
        for _ in 0..20 {
            let Some(value) = read_with_retry(&view.handle, VOLUMES.name(), key).await? else {
                return Ok(());
            };
            let volume = GroupVolume::decode(&value)?;
            if volume
                .envelopes
                .iter()
                .any(|(node, _)| node == holder.as_bytes())
            {
                return Ok(());
            }
            let rewrapped = self.vault().wrap_group_volume_to(&volume, member)?;
            let update = RecordUpdate::new(
                VOLUMES,
                key.to_vec(),
                Expected::Value(value),
                Change::Put(rewrapped.encode()),
            );
            match apply_with_retry(&view.handle, &[update]).await {
                Ok(()) => return Ok(()),
                Err(NodeError::Consensus(forge_consensus::ConsensusError::Conflict { .. })) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error),
            }
        }
        Err(cluster_error(format!(
            "group volume {} kept changing while its keys were wrapped to node {holder}: run the add again",
            String::from_utf8_lossy(key)
        )))
    }

    /// Finishes what an add left undone, so every member placement names can adopt the
    /// group's volumes: wraps each volume's keys to every member without an envelope of
    /// them (an add that raced the volume's creation; a volume whose keys this node does
    /// not hold is left to a member that does), then adds to the Raft group each member
    /// the record names but the group does not have (an add that failed after changing
    /// the record, its leader lost: the simulator saw such a member hold no shard ever
    /// after, so no removal could finish).
    async fn finish_interrupted_adds(&self, view: &GroupView) -> Result<()> {
        catch_up_async(&view.handle, &view.name).await;
        let me = self.vault().identity().node_id();
        for (key, value) in view.handle.local_records(VOLUMES.name(), b"")? {
            let volume = GroupVolume::decode(&value)?;
            let has_keys = |node: &NodeId| {
                volume
                    .envelopes
                    .iter()
                    .any(|(holder, _)| holder == node.as_bytes())
            };
            if !has_keys(&me) {
                continue;
            }
            let without: Vec<NodeId> = view
                .nodes
                .iter()
                .filter(|node| !has_keys(node))
                .copied()
                .collect();
            for member in self.member_keys(&without)? {
                tracing::info!(volume = %volume.volume.name, node = %member.node_id(), "handing a group volume's keys to a member without them");
                self.wrap_volume_to(view, &key, &member).await?;
            }
        }
        let voters = view.handle.status().voters;
        for node in view.nodes.iter().filter(|node| !voters.contains(node)) {
            tracing::info!(%node, group = %view.name, "adding a member an interrupted add left out of the Raft group");
            view.handle.add_member(node).await?;
        }
        Ok(())
    }

    /// Takes `node` out of volume group `name`: out of placement at once (its shards get
    /// new owners by repair, run now on every member, reading from it meanwhile), and out
    /// of the Raft group and the record once every chunk is whole without it. When repair
    /// cannot finish now (a member down), the node stays *retiring* and the command says
    /// so; running it again finishes.
    ///
    /// # Errors
    /// Not in the group; too few members left for the layout; no quorum.
    pub async fn remove_group_node(
        &self,
        name: &str,
        node: NodeId,
    ) -> Result<forge_proto::v1::GroupInfo> {
        let record = self
            .change_group_record(name, |record| {
                let width = (record.data_shards + record.parity_shards) as usize;
                if record.retiring.contains(node.as_bytes()) {
                    return Ok(record.clone());
                }
                if !record.nodes.contains(node.as_bytes()) {
                    return Err(cluster_error(format!("node {node} is not in volume group {name}")));
                }
                if record.nodes.len() - 1 < width {
                    return Err(cluster_error(format!(
                        "volume group {name} keeps each chunk's {width} shards on {width} different nodes: it cannot go below {width} (add a node first)"
                    )));
                }
                let mut changed = record.clone();
                changed.nodes.retain(|member| member != node.as_bytes());
                changed.retiring.push(*node.as_bytes());
                Ok(changed)
            })
            .await?;
        // Every member sees the new placement before it repairs.
        self.reconcile().await;
        let repaired = self.repair_group(name).await?;
        let width = u64::from(record.data_shards + record.parity_shards);
        // The node going need not answer: its shards are counted at their new owners, and
        // a node removed because it died never will (the simulator found a dead member
        // could never be removed).
        let going = node.to_hex();
        let whole = repaired.shards_held == repaired.chunks * width
            && repaired
                .members
                .iter()
                .all(|member| member.error.is_empty() || member.node_id == going);
        if !whole {
            return Err(cluster_error(format!(
                "node {node} is retiring from volume group {name}, but its shards are not all moved yet ({} of {} held by their new owners): run `forge group repair {name}`, then `forge group remove-node` again",
                repaired.shards_held,
                repaired.chunks * width
            )));
        }
        let view = self.view_of(name.to_owned(), &record)?;
        view.handle.remove_member(&node).await?;
        let record = self
            .change_group_record(name, |record| {
                let mut changed = record.clone();
                changed
                    .retiring
                    .retain(|retiring| retiring != node.as_bytes());
                Ok(changed)
            })
            .await?;
        self.after_membership_change(name);
        Ok(self.group_info(name, &record))
    }

    /// After a membership change: every member repairs (in the background) to the new
    /// placement.
    fn after_membership_change(&self, name: &str) {
        let this = self.weak();
        let name = name.to_owned();
        tokio::spawn(async move {
            let Some(node) = this.upgrade() else { return };
            // The new member needs a moment to start the group and adopt its volumes.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(error) = node.repair_group(&name).await {
                tracing::warn!(%error, group = %name, "repair after a membership change");
            }
        });
    }

    /// The key of a new pin of this node (unique in this process's run).
    fn new_pin_key(&self) -> Vec<u8> {
        let me = self.vault().identity().node_id();
        let sequence = PIN_SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        [
            PIN_PREFIX,
            me.as_bytes().as_slice(),
            &self.boot().to_be_bytes(),
            &sequence.to_be_bytes(),
        ]
        .concat()
    }

    /// Pins group `view` for a writer (see [`GROUP_GC`]) under `key`.
    async fn pin_group(&self, view: &GroupView, kind: &str, key: &[u8]) -> Result<()> {
        let me = self.vault().identity().node_id();
        let info = PinInfo {
            node: *me.as_bytes(),
            boot: self.boot(),
            kind: kind.to_owned(),
            since_ns: self.vault().now_ns(),
        };
        let waiting_since = tokio::time::Instant::now();
        loop {
            let epoch = read_with_retry(&view.handle, GROUP_GC.name(), EPOCH_KEY).await?;
            if decode_u64(epoch.as_deref(), "group gc epoch")? % 2 == 1 {
                if waiting_since.elapsed() > SWEEP_WAIT {
                    return Err(cluster_error(format!(
                        "volume group {}'s gc has been sweeping for over {} s (a member that started it may have crashed: `forge group gc {}` finishes it)",
                        view.name,
                        SWEEP_WAIT.as_secs(),
                        view.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let count = read_with_retry(&view.handle, GROUP_GC.name(), PIN_COUNT_KEY).await?;
            let next = decode_u64(count.as_deref(), "group pin count")? + 1;
            let updates = [
                RecordUpdate::new(
                    GROUP_GC,
                    EPOCH_KEY.to_vec(),
                    expected_of(epoch),
                    Change::Keep,
                ),
                RecordUpdate::new(
                    GROUP_GC,
                    PIN_COUNT_KEY.to_vec(),
                    expected_of(count),
                    Change::Put(next.to_be_bytes().to_vec()),
                ),
                RecordUpdate::new(
                    GROUP_GC,
                    key.to_vec(),
                    Expected::Absent,
                    Change::Put(crate::vault::records::encode(&info)),
                ),
            ];
            match apply_with_retry(&view.handle, &updates).await {
                Ok(()) => return Ok(()),
                Err(NodeError::Consensus(forge_consensus::ConsensusError::Conflict { .. })) => {
                    // An earlier try may have gone in with its answer lost (the retry then
                    // conflicts on the pin itself, every time: the simulator saw an import
                    // spin here for good). The key is this pin's alone.
                    if read_with_retry(&view.handle, GROUP_GC.name(), key)
                        .await?
                        .is_some()
                    {
                        return Ok(());
                    }
                    // A sweep opened, or another pin went in: look again, shortly.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Removes pins this node's earlier runs left in group `view` (a crash).
    ///
    /// # Errors
    /// The group not confirming what this replica holds is current (the caller tries
    /// again later); no quorum.
    pub(crate) async fn clear_stale_pins(&self, view: &GroupView) -> Result<()> {
        // Read after a barrier: a pin the group committed just before the crash may not
        // have reached this replica's log yet. Read without, it was missed, and this run
        // never looked again: the group's gc stayed refused for good (the simulator, a
        // second-site node that crashed while receiving a sync, seed 940020).
        view.handle.barrier(Duration::from_secs(5)).await?;
        let me = self.vault().identity().node_id();
        let prefix = [PIN_PREFIX, me.as_bytes().as_slice()].concat();
        let stale: Vec<RecordUpdate> = view
            .handle
            .local_records(GROUP_GC.name(), &prefix)?
            .into_iter()
            .filter(|(key, _)| {
                key.get(prefix.len()..prefix.len() + 8) != Some(&self.boot().to_be_bytes()[..])
            })
            .map(|(key, _)| RecordUpdate::new(GROUP_GC, key, Expected::Any, Change::Delete))
            .collect();
        if !stale.is_empty() {
            tracing::info!(group = %view.name, pins = stale.len(), "clearing write pins an earlier run left");
            apply_with_retry(&view.handle, &stale).await?;
        }
        Ok(())
    }

    /// Collects group `name`'s garbage: opens a sweep (refused while writers hold pins),
    /// has every member delete its shards and objects of the group that no listed
    /// snapshot of its volumes reaches, and closes the sweep. A member that does not
    /// answer keeps its garbage until the next run.
    ///
    /// # Errors
    /// Writers in progress (named); unknown group; no quorum.
    pub async fn group_gc(&self, name: &str) -> Result<forge_proto::v1::GroupGcReply> {
        let (_, view) = self.current_view(name).await?;
        let now = self.vault().now_ns();
        let epoch = loop {
            // The pin count before the pins: a pin that goes in after this read bumps it,
            // so opening the sweep below conflicts. Read after the pins, a pin could slip
            // in between unseen, and the sweep then took the shards an import was
            // publishing (the simulator, seed 376960463).
            let count = read_with_retry(&view.handle, GROUP_GC.name(), PIN_COUNT_KEY).await?;
            view.handle.barrier(Duration::from_secs(30)).await?;
            let mut pins = Vec::new();
            let mut stale = Vec::new();
            for (key, value) in view.handle.local_records(GROUP_GC.name(), PIN_PREFIX)? {
                let info: PinInfo = crate::vault::records::decode("group pin", &value)?;
                let member = view.holders().any(|node| node.as_bytes() == &info.node);
                if !member || now.saturating_sub(info.since_ns) > PIN_STALE_AFTER_NS {
                    stale.push(RecordUpdate::new(
                        GROUP_GC,
                        key,
                        Expected::Any,
                        Change::Delete,
                    ));
                } else {
                    pins.push(info);
                }
            }
            if !stale.is_empty() {
                apply_with_retry(&view.handle, &stale).await?;
            }
            if !pins.is_empty() {
                let writers: Vec<String> = pins
                    .iter()
                    .map(|pin| {
                        format!(
                            "{} on {}",
                            pin.kind,
                            &NodeId::from_bytes(pin.node).to_hex()[..16]
                        )
                    })
                    .collect();
                return Err(cluster_error(format!(
                    "volume group {name} has writes in progress ({}): its gc runs once they end (a mount counts until it is unmounted)",
                    writers.join(", ")
                )));
            }
            let epoch_value = read_with_retry(&view.handle, GROUP_GC.name(), EPOCH_KEY).await?;
            let epoch = decode_u64(epoch_value.as_deref(), "group gc epoch")?;
            if epoch % 2 == 1 {
                // A sweep a crashed member opened: this run finishes it.
                break epoch;
            }
            let updates = [
                RecordUpdate::new(
                    GROUP_GC,
                    EPOCH_KEY.to_vec(),
                    expected_of(epoch_value),
                    Change::Put((epoch + 1).to_be_bytes().to_vec()),
                ),
                RecordUpdate::new(
                    GROUP_GC,
                    PIN_COUNT_KEY.to_vec(),
                    expected_of(count),
                    Change::Keep,
                ),
            ];
            match apply_with_retry(&view.handle, &updates).await {
                Ok(()) => break epoch + 1,
                // A writer pinned meanwhile, or another gc opened: look again.
                Err(NodeError::Consensus(forge_consensus::ConsensusError::Conflict { .. })) => {}
                Err(error) => return Err(error),
            }
        };
        let me = self.vault().identity().node_id();
        let net = self.peer_net();
        let id = view.id;
        let sweeps: Vec<_> = view
            .holders()
            .map(|node| {
                let net = net.clone();
                let this = self.weak();
                async move {
                    let outcome = if node == me {
                        match this.upgrade() {
                            Some(cluster) => cluster.sweep_here(id, epoch).await,
                            None => Err(cluster_error("the daemon is stopping")),
                        }
                    } else {
                        async {
                            let request = ShardRequest::Sweep { group: id, epoch };
                            match call_member(&*net, node, &request, LONG_DEADLINE, Retry::Once)
                                .await?
                            {
                                reply @ ShardReply::Swept { .. } => Ok(reply),
                                other => Err(unexpected_reply(node, "a sweep", &other)),
                            }
                        }
                        .await
                    };
                    (node, outcome)
                }
            })
            .collect();
        let swept = futures_util::future::join_all(sweeps).await;
        apply_with_retry(
            &view.handle,
            &[RecordUpdate::new(
                GROUP_GC,
                EPOCH_KEY.to_vec(),
                Expected::Value(epoch.to_be_bytes().to_vec()),
                Change::Put((epoch + 1).to_be_bytes().to_vec()),
            )],
        )
        .await?;
        let mut reply = forge_proto::v1::GroupGcReply {
            group: name.to_owned(),
            epoch: epoch + 1,
            members: Vec::new(),
        };
        for (node, outcome) in swept {
            reply.members.push(match outcome {
                Ok(ShardReply::Swept {
                    chunks,
                    objects,
                    bytes,
                }) => forge_proto::v1::MemberSweep {
                    node_id: node.to_hex(),
                    error: String::new(),
                    chunks,
                    objects,
                    bytes,
                },
                Ok(_) => forge_proto::v1::MemberSweep::default(),
                Err(error) => forge_proto::v1::MemberSweep {
                    node_id: node.to_hex(),
                    error: error.to_string(),
                    ..forge_proto::v1::MemberSweep::default()
                },
            });
        }
        Ok(reply)
    }

    /// This member's part of sweep `epoch` of group `id`: only while that sweep is open,
    /// and only from a mirror confirmed current (a sweep must never guess what is live).
    async fn sweep_here(&self, id: u64, epoch: u64) -> Result<ShardReply> {
        let view = self.group_view(id)?;
        view.handle.barrier(Duration::from_secs(30)).await?;
        let current = view.handle.local_records(GROUP_GC.name(), EPOCH_KEY)?;
        let current = decode_u64(
            current.first().map(|(_, value)| value.as_slice()),
            "group gc epoch",
        )?;
        if current != epoch || epoch.is_multiple_of(2) {
            return Err(cluster_error(format!(
                "sweep {epoch} of volume group {} is not open (its gc epoch is {current})",
                view.name
            )));
        }
        let this = self.weak();
        crate::lockstep::spawn_blocking(move || {
            let node = this
                .upgrade()
                .ok_or_else(|| cluster_error("the daemon is stopping"))?;
            // Writers are fenced off while a sweep is open: nothing to skip for.
            node.reconcile_volumes(&view, None, true)?;
            let live = node.vault().group_live(id)?;
            let (chunks, objects, bytes) = node.vault().sweep_group(id, &live)?;
            tracing::info!(group = %view.name, chunks, objects, bytes, "group gc swept");
            Ok(ShardReply::Swept {
                chunks,
                objects,
                bytes,
            })
        })
        .await
        .map_err(|error| cluster_error(format!("the sweep's task failed: {error}")))?
    }

    /// Answers one shard request from `from`.
    async fn answer_shards(self: Arc<Self>, from: NodeId, body: Vec<u8>) -> Result<Vec<u8>> {
        let request = ShardRequest::decode(&body)?;
        let group = request.group();
        let me = self.vault().identity().node_id();
        let record = self
            .groups()?
            .into_iter()
            .map(|(_, record)| record)
            .find(|record| record.id == group)
            .ok_or_else(|| cluster_error(format!("no volume group {group} here")))?;
        let serves = |node: &NodeId| {
            record.nodes.contains(node.as_bytes()) || record.retiring.contains(node.as_bytes())
        };
        if !serves(&from) || !serves(&me) {
            return Err(cluster_error(format!(
                "node {from} and this node are not both in volume group {group}"
            )));
        }
        if let ShardRequest::Sweep { group, epoch } = request {
            return Ok(self.sweep_here(group, epoch).await?.encode()?);
        }
        if let ShardRequest::Repair { group } = request {
            let this = self.weak();
            let runtime = tokio::runtime::Handle::current();
            let summary = crate::lockstep::spawn_blocking(move || {
                this.upgrade()
                    .ok_or_else(|| cluster_error("the daemon is stopping"))?
                    .repair(&runtime, group)
            })
            .await
            .map_err(|error| cluster_error(format!("the repair task failed: {error}")))??;
            return Ok(ShardReply::Repaired(summary).encode()?);
        }
        let vault = self.vault_arc();
        let reply =
            crate::lockstep::spawn_blocking(move || serve_shard_request(&vault, group, request))
                .await
                .map_err(|error| {
                    cluster_error(format!("the shard request's task failed: {error}"))
                })??;
        Ok(reply.encode()?)
    }
}

fn member_repair(
    node: NodeId,
    outcome: std::result::Result<&RepairSummary, String>,
) -> forge_proto::v1::MemberRepair {
    match outcome {
        Ok(summary) => forge_proto::v1::MemberRepair {
            node_id: node.to_hex(),
            error: String::new(),
            chunks: summary.chunks,
            held: summary.held,
            rebuilt: summary.rebuilt,
            rebuilt_bytes: summary.rebuilt_bytes,
            released: summary.released,
            backlog: summary.backlog,
            objects_fetched: summary.objects_fetched,
        },
        Err(error) => forge_proto::v1::MemberRepair {
            node_id: node.to_hex(),
            error,
            ..forge_proto::v1::MemberRepair::default()
        },
    }
}

/// Whether a shard request may go again after its connection broke.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Reads and puts: doing them twice does no harm.
    Idempotent,
    /// Repairs, sweeps, probes: once (the caller decides what a failure means).
    Once,
}

/// The shards of `cid` held on this node whose records decode under their index, as
/// (index, record).
fn intact_local_shards(vault: &Vault, cid: &Cid) -> Result<Vec<(usize, Vec<u8>)>> {
    let end = prefix_end(cid.as_bytes());
    Ok(vault
        .kv()
        .scan(Column::Shards, cid.as_bytes(), end.as_deref(), 256)?
        .into_iter()
        .filter_map(|(key, record)| match key.get(32..34) {
            Some([high, low]) => Some((usize::from(u16::from_be_bytes([*high, *low])), record)),
            _ => None,
        })
        .filter(|(index, record)| {
            ShardRecord::decode(record).is_ok_and(|decoded| decoded.index.get() == *index)
        })
        .collect())
}

/// Sends `request` to member `node` and decodes its reply.
async fn call_member(
    net: &dyn forge_mesh::PeerNet,
    node: NodeId,
    request: &ShardRequest,
    deadline: Duration,
    retry: Retry,
) -> Result<ShardReply> {
    let body = request.encode()?;
    let answer = match retry {
        Retry::Idempotent => request_idempotent(net, node, SHARDS_PROTOCOL, body, deadline).await?,
        Retry::Once => net.request(node, SHARDS_PROTOCOL, body, deadline).await?,
    };
    Ok(ShardReply::decode(&answer)?)
}

/// A member answered `asked` with another kind of reply.
fn unexpected_reply(node: NodeId, asked: &str, reply: &ShardReply) -> NodeError {
    cluster_error(format!(
        "member {node} answered {asked} with {}",
        reply_kind(reply)
    ))
}

fn reply_kind(reply: &ShardReply) -> &'static str {
    match reply {
        ShardReply::Repaired(_) => "repaired",
        ShardReply::Swept { .. } => "swept",
        ShardReply::Stored { .. } => "stored",
        ShardReply::Shards(_) => "shards",
        ShardReply::Held(_) => "held",
        ShardReply::Objects(_) => "objects",
    }
}

/// The vault side of a shard request (on a blocking thread).
fn serve_shard_request(vault: &Vault, group: u64, request: ShardRequest) -> Result<ShardReply> {
    let kv = vault.kv();
    match request {
        ShardRequest::Put {
            shards, objects, ..
        } => {
            let mut batch = WriteBatch::new();
            let mut cids = Vec::with_capacity(shards.len() + objects.len());
            for put in &shards {
                let cid = Cid::from_bytes(put.cid);
                // A record that does not decode, or names another shard, is refused whole.
                let record = ShardRecord::decode(&put.record).map_err(|error| {
                    cluster_error(format!(
                        "shard {} of chunk {cid} does not decode: {error}",
                        put.index
                    ))
                })?;
                if record.index.get() != usize::from(put.index) {
                    return Err(cluster_error(format!(
                        "a record of shard {} of chunk {cid} was sent as shard {}",
                        record.index.get(),
                        put.index
                    )));
                }
                batch.put(
                    Column::Shards,
                    shard_key(&cid, record.index),
                    put.record.clone(),
                );
                cids.push(cid);
            }
            for object in &objects {
                let cid = Cid::from_bytes(object.cid);
                if Cid::of(&object.bytes) != cid {
                    return Err(cluster_error(format!(
                        "object {cid} was sent with other bytes"
                    )));
                }
                batch.put(Column::Objects, object.cid.to_vec(), object.bytes.clone());
                cids.push(cid);
            }
            cids.sort_unstable();
            cids.dedup();
            // Not published: the sender's publish may yet be refused.
            vault.mark_held(&mut batch, group, &cids)?;
            if forge_store::fault_point!("shard-store-fails") {
                return Err(cluster_error(
                    "this member's disk refused the shards (a simulated fault)",
                ));
            }
            // Acknowledged only once durable.
            kv.write(batch, Durability::Synced)?;
            Ok(ShardReply::Stored {
                shards: u32::try_from(shards.len()).unwrap_or(u32::MAX),
                objects: u32::try_from(objects.len()).unwrap_or(u32::MAX),
            })
        }
        ShardRequest::Get { cids, .. } => {
            check_count(cids.len())?;
            let mut held = Vec::with_capacity(cids.len());
            let mut bytes = 0;
            for cid in cids {
                let end = prefix_end(&cid);
                let mut shards = Vec::new();
                // Past the response's size, the rest come back empty (asked for again).
                if bytes < PUT_BYTES_MAX {
                    for (key, record) in kv.scan(Column::Shards, &cid, end.as_deref(), 256)? {
                        if let Some([high, low]) = key.get(32..34) {
                            bytes += record.len();
                            shards.push((u16::from_be_bytes([*high, *low]), record));
                        }
                    }
                }
                held.push(HeldShards { cid, shards });
            }
            Ok(ShardReply::Shards(held))
        }
        ShardRequest::Has { cids, .. } => {
            check_count(cids.len())?;
            let mut held = Vec::with_capacity(cids.len());
            for cid in cids {
                let end = prefix_end(&cid);
                held.push(
                    kv.scan(Column::Shards, &cid, end.as_deref(), 256)?
                        .into_iter()
                        .filter_map(|(key, _)| match key.get(32..34) {
                            Some([high, low]) => Some(u16::from_be_bytes([*high, *low])),
                            _ => None,
                        })
                        .collect(),
                );
            }
            Ok(ShardReply::Held(held))
        }
        ShardRequest::Repair { .. } | ShardRequest::Sweep { .. } => Err(cluster_error(
            "a repair is answered by the cluster, not the store",
        )),
        ShardRequest::Objects { cids, .. } => {
            check_count(cids.len())?;
            let mut objects = Vec::with_capacity(cids.len());
            for cid in cids {
                objects.push(kv.get(Column::Objects, &cid)?);
            }
            Ok(ShardReply::Objects(objects))
        }
    }
}

fn check_count(count: usize) -> Result<()> {
    if count > CIDS_PER_REQUEST_MAX {
        return Err(cluster_error(format!(
            "a request for {count} chunks (at most {CIDS_PER_REQUEST_MAX})"
        )));
    }
    Ok(())
}

/// Serves `/forge/shards/1` for the members of this node's groups.
pub(crate) async fn serve_shards(mut inbound: Inbound, node: Weak<ClusterNode>) {
    while let Some(request) = inbound.next().await {
        let Some(cluster) = node.upgrade() else {
            return;
        };
        tokio::spawn(answer(cluster, request));
    }
}

async fn answer(cluster: Arc<ClusterNode>, request: InboundRequest) {
    let InboundRequest { from, body, .. } = &request;
    let (from, body) = (*from, body.clone());
    if forge_store::fault_point!("shard-answer-slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    match cluster.answer_shards(from, body).await {
        Ok(reply) => request.respond(reply),
        Err(error) => request.fail(error.to_string()),
    }
}

/// Waits (a read-index barrier) until `group`'s state here includes every write
/// acknowledged before, retrying while a new leader is elected (its old one killed, say);
/// after about 20 s it goes on with the state as applied here, saying so: repair runs
/// again later, and what it does is right for any state it reads.
fn catch_up(runtime: &tokio::runtime::Handle, group: &GroupHandle, what: &str) -> bool {
    wait(runtime, catch_up_async(group, what))
}

/// A linearizable read of one record, retried for up to 30 s while the group has no
/// reachable leader (a leader that just restarted leaves followers a dead connection to
/// it for a moment).
async fn read_with_retry(group: &GroupHandle, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut last = None;
    for _ in 0..30 {
        match tokio::time::timeout(Duration::from_secs(3), group.read_record(space, key)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(
                error @ (forge_consensus::ConsensusError::NoLeader { .. }
                | forge_consensus::ConsensusError::Network(_)
                | forge_consensus::ConsensusError::Raft { .. }),
            )) => last = Some(NodeError::from(error)),
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => {
                last = Some(cluster_error(format!(
                    "group {} did not answer a read within 3 s",
                    group.id()
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last.unwrap_or_else(|| cluster_error("no leader")))
}

/// [`catch_up`] from async code. Whether the state here was confirmed current.
async fn catch_up_async(group: &GroupHandle, what: &str) -> bool {
    match confirm_latest(group, what).await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(
                group = what,
                %error,
                "could not confirm the latest state with the leader: going on with the state applied here"
            );
            false
        }
    }
}

/// Waits (a read-index barrier, retried for about 20 s while a leader is elected) until
/// `group`'s state here includes every write acknowledged before. For a change that
/// must not act on stale state (an add listing the volumes whose keys it hands over:
/// the simulator saw a follower that had not applied a volume's creation yet add a node
/// that then never got the volume's keys).
async fn confirm_latest(group: &GroupHandle, what: &str) -> Result<()> {
    let mut last = String::new();
    for _ in 0..5 {
        match tokio::time::timeout(
            Duration::from_secs(3),
            group.barrier(Duration::from_secs(3)),
        )
        .await
        {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => last = error.to_string(),
            Err(_) => last = "no answer within 3 s".to_owned(),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(cluster_error(format!(
        "could not confirm the latest state of {what} with its leader ({last}): try again once a majority of its members is up"
    )))
}

/// Runs `work` on the daemon's network runtime and waits for it: from a plain thread
/// directly, from inside a runtime's worker (a store read during a sync or an audit) by
/// first handing the worker's other tasks off (`block_in_place`); in the simulator, from
/// a lockstep closure's thread, in lockstep with the simulated runtime.
fn wait<T>(runtime: &tokio::runtime::Handle, work: impl std::future::Future<Output = T>) -> T {
    if let Some(lockstep) = crate::lockstep::current() {
        lockstep.block_on(work)
    } else if tokio::runtime::Handle::try_current().is_ok() {
        tokio::task::block_in_place(|| runtime.block_on(work))
    } else {
        runtime.block_on(work)
    }
}

/// Numbers the pins of this process.
static PIN_SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The vault's access to its groups, through this daemon's cluster (called from the
/// vault's threads: each call blocks on the daemon's runtime).
pub(crate) struct DaemonGroupStorage {
    pub node: Weak<ClusterNode>,
    pub runtime: tokio::runtime::Handle,
}

impl DaemonGroupStorage {
    fn wait<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        wait(&self.runtime, work)
    }

    /// Deletes pin `update` in the background, after `first` and then every 5 s for up
    /// to an hour (the delete is idempotent), finding the group anew each time: it runs
    /// here again once this node is added back.
    fn unpin_in_background(&self, group: u64, update: RecordUpdate, first: Duration) {
        let node = self.node.clone();
        self.runtime.spawn(async move {
            let mut delay = first;
            for _ in 0..720 {
                tokio::time::sleep(delay).await;
                delay = Duration::from_secs(5);
                let Some(view) = node.upgrade().and_then(|node| node.group_view(group).ok()) else {
                    continue;
                };
                if apply_with_retry(&view.handle, std::slice::from_ref(&update))
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        });
    }

    fn node(&self) -> Result<Arc<ClusterNode>> {
        self.node
            .upgrade()
            .ok_or_else(|| cluster_error("the daemon is stopping"))
    }
}

impl GroupStorage for DaemonGroupStorage {
    fn pin(&self, group: u64, kind: &str) -> Result<Vec<u8>> {
        let node = self.node()?;
        let view = node.group_view(group)?;
        let key = node.new_pin_key();
        match self.wait(node.pin_group(&view, kind, &key)) {
            Ok(()) => Ok(key),
            Err(error) => {
                // The pin's write may have gone in with its answer lost (a timeout, a
                // leader lost mid-write): nobody would drop it, and it would hold off the
                // group's gc for good (the simulator, seed 1700053). Deleting a pin that
                // never went in is harmless.
                let update = RecordUpdate::new(GROUP_GC, key, Expected::Any, Change::Delete);
                self.unpin_in_background(group, update, Duration::from_secs(5));
                Err(error)
            }
        }
    }

    fn read(&self, group: u64, space: RecordSpace, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let node = self.node()?;
        let view = node.group_view(group)?;
        self.wait(read_with_retry(&view.handle, space.name(), key))
    }

    fn unpin(&self, group: u64, key: &[u8]) -> Result<()> {
        let update = RecordUpdate::new(GROUP_GC, key.to_vec(), Expected::Any, Change::Delete);
        // A pin dropped on a task of a runtime that cannot block (the simulator's one
        // thread, where a sync's store can be dropped with its cancelled task) goes in
        // the background at once.
        let can_block = crate::lockstep::current().is_some()
            || tokio::runtime::Handle::try_current().map_or(true, |runtime| {
                runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            });
        if !can_block {
            self.unpin_in_background(group, update, Duration::ZERO);
            return Ok(());
        }
        let outcome = self.node().and_then(|node| {
            let view = node.group_view(group)?;
            self.wait(async { apply_with_retry(&view.handle, std::slice::from_ref(&update)).await })
        });
        if outcome.is_err() {
            // A pin left in holds off the group's gc (found by the simulator: after a
            // partition no gc ran again; and a member removed while it imported, then
            // added again, whose pin no gc took for a non-member's meanwhile).
            self.unpin_in_background(group, update, Duration::from_secs(5));
        }
        outcome
    }

    fn publish(
        &self,
        volume: &VolumeId,
        group: u64,
        named: &[Cid],
        updates: &[RecordUpdate],
    ) -> Result<()> {
        let node = self.node()?;
        let view = node.group_view(group)?;
        let placed = node.distribute(&self.runtime, &view, named)?;
        let outcome = self.wait(async { apply_with_retry(&view.handle, updates).await });
        if outcome.is_ok() {
            // Published: a member added or removed while the publish waited moved the
            // placement its shards went by (seed 1800474: a shard left on a node removed
            // meanwhile, its chunk acknowledged one lost shard from gone).
            node.place_again_if_moved(&self.runtime, &view, &placed)
                .map_err(|error| {
                    cluster_error(format!(
                        "the snapshot was published while the members of volume group {} changed, and its shards could not all be placed on the members of now ({error}); `forge group repair {}` places them once the members answer",
                        view.name, view.name
                    ))
                })?;
        }
        if outcome.is_ok() && forge_store::fault_point!("publish-answer-lost") {
            return Err(cluster_error(
                "the volume group did not confirm the publish (a simulated lost answer)",
            ));
        }
        match outcome {
            Err(NodeError::Consensus(forge_consensus::ConsensusError::Conflict {
                space, ..
            })) if space == RecordSpace::REFS.name() => {
                let branch = updates
                    .iter()
                    .find(|update| update.space == RecordSpace::REFS)
                    .and_then(|update| update.key.get(16..))
                    .map(|branch| String::from_utf8_lossy(branch).into_owned())
                    .unwrap_or_default();
                Err(NodeError::BranchMoved(format!(
                    "branch {branch:?} of volume {volume} moved in its volume group (another member published first)"
                )))
            }
            other => other,
        }
    }

    fn apply(&self, group: u64, updates: &[RecordUpdate]) -> Result<()> {
        let node = self.node()?;
        let view = node.group_view(group)?;
        self.wait(async { apply_with_retry(&view.handle, updates).await })
    }

    fn group_for_new_volume(
        &self,
        name: &str,
    ) -> Result<(u64, ErasureLayout, Vec<NodePublicKeys>)> {
        let node = self.node()?;
        let (_, record) = node
            .groups()?
            .into_iter()
            .find(|(group, _)| group == name)
            .ok_or_else(|| cluster_error(format!("no volume group named {name}")))?;
        if !record
            .nodes
            .contains(node.vault().identity().node_id().as_bytes())
        {
            return Err(cluster_error(format!(
                "this node is not in volume group {name}"
            )));
        }
        let view = node.view_of(name.to_owned(), &record)?;
        let keys = node.member_keys(&view.nodes)?;
        Ok((view.id, view.layout, keys))
    }

    fn create_volume(&self, group: u64, volume: &GroupVolume) -> Result<()> {
        let node = self.node()?;
        let view = node.group_view(group)?;
        self.wait(node.record_group_volume(&view, volume))
    }

    fn fetch_chunk(&self, group: u64, cid: &Cid) -> Result<Vec<u8>> {
        let node = self.node()?;
        let view = node.group_view(group)?;
        let end = prefix_end(cid.as_bytes());
        let local: Vec<(usize, Vec<u8>)> = node
            .vault()
            .kv()
            .scan(Column::Shards, cid.as_bytes(), end.as_deref(), 256)?
            .into_iter()
            .filter_map(|(key, record)| match key.get(32..34) {
                Some([high, low]) => Some((usize::from(u16::from_be_bytes([*high, *low])), record)),
                _ => None,
            })
            .collect();
        self.wait(async { node.gather_chunk(&view, *cid, local).await })
    }

    fn fetch_object(&self, group: u64, cid: &Cid) -> Result<Vec<u8>> {
        let node = self.node()?;
        let view = node.group_view(group)?;
        self.wait(async { node.gather_object(&view, *cid).await })
    }
}
