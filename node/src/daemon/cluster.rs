//! The daemon's cluster: the cluster-wide Raft group (group 0: members and their
//! addresses, the registry of volume groups) and the volume groups this node is in, all
//! sharing the vault's RocksDB (one [`Syncer`] batches their fsyncs) and the node's QUIC
//! network (`/forge/raft/2`).
//!
//! Forming: `cluster init` starts group 0 with this node as its only voter. Joining: the
//! joiner asks a member for the member list (`/forge/cluster/1`, which the member answers
//! only for a node it trusts with `--cluster`), starts group 0 unformed and accepting
//! Raft messages from those members, and asks to join; the member records the joiner's
//! addresses in group 0 and adds it as a learner, then a voter, through the leader.
//! A watch loop on every member keeps the network's address book in step with group 0's
//! member records, and starts the volume groups the registry lists this node in (the
//! lowest-NodeId member of a new group forms it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use forge_consensus::cluster::{
    self, CLUSTER_PROTOCOL, ClusterReply, ClusterRequest, GroupRecord, MemberRecord,
};
use forge_consensus::{CLUSTER_GROUP, GroupHandle, GroupOptions, GroupStatus, GroupTable};
use forge_crypto::NodeId;
use forge_mesh::MeshError;
use forge_mesh::PeerNet;
use forge_mesh::net::BoxFuture;
use forge_mesh::quic::{Multiaddr, QuicNet};
use forge_proto::v1::{ClusterMember, ClusterStatusReply, FollowerLag, GroupInfo};
use forge_store::kv::{Column, KvEngine, RocksKv, RocksKvOptions, Syncer};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};

use crate::error::{NodeError, Result};
use crate::vault::Vault;
use crate::vault::cluster::ClusterMembership;

/// Members, groups and the next group id: record spaces of the cluster group.
const MEMBERS: RecordSpace = RecordSpace::new(cluster::MEMBERS);
const GROUPS: RecordSpace = RecordSpace::new(cluster::GROUPS);
const GROUP_IDS: RecordSpace = RecordSpace::new(cluster::GROUP_IDS);

/// How long a join may take (the leader adds the joiner as a learner and waits for it to
/// catch up before making it a voter).
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
/// How often a run clears again, in each group, the write pins its earlier runs left.
const STALE_PIN_CLEARING: Duration = Duration::from_secs(60);

/// The engine Raft's logs and state machines live in: a RocksDB of their own beside the
/// vault's (`DATA_DIR/raft`), so a Raft append's fsync never waits behind an import's
/// 8 MiB unlogged batches and their flushes in the vault's engine (measured with the
/// consensus example `raft_under_import`: one shared engine made the p99 commit 4x
/// slower beside an import). A vault whose engine already holds Raft state (a cluster
/// formed before the split) keeps it there.
fn raft_engine(vault: &Vault) -> Result<Arc<dyn KvEngine>> {
    let shared = vault.shared_kv();
    let legacy = !shared.scan(Column::RaftLog, &[], None, 1)?.is_empty()
        || !shared.scan(Column::RaftState, &[], None, 1)?.is_empty();
    if legacy {
        tracing::warn!(
            "this vault's Raft state is in its main engine (a cluster formed before Raft got \
             an engine of its own): kept there"
        );
        return Ok(shared);
    }
    let path = vault.data_dir().path().join("raft");
    Ok(Arc::new(RocksKv::open(&path, &RocksKvOptions::default())?))
}

pub(crate) fn cluster_error(reason: impl Into<String>) -> NodeError {
    NodeError::Cluster {
        reason: reason.into(),
    }
}

/// A Raft group run here, for /metrics.
#[derive(Debug, Clone)]
pub struct GroupMetrics {
    /// Its name ("cluster" for group 0).
    pub name: String,
    /// Its Raft state here.
    pub status: GroupStatus,
    /// This node's repair of it (volume groups).
    pub repair: Option<super::groups::RepairState>,
}

/// The network's addresses, as the cluster sees them: this node's (for its member
/// record), members' (learnt from their records), and who is connected now.
pub trait AddressBook: Send + Sync {
    /// Remembers `addresses` (as a member record lists them) for `node`.
    fn remember<'a>(&'a self, node: NodeId, addresses: &'a [String]) -> BoxFuture<'a, ()>;

    /// The addresses this node is reached at.
    fn own(&self) -> BoxFuture<'_, std::result::Result<Vec<String>, MeshError>>;

    /// The peers connected now.
    fn connected(&self) -> BoxFuture<'_, std::result::Result<Vec<NodeId>, MeshError>>;
}

/// The QUIC network's address book: multiaddrs (the first of a record's that parses).
impl AddressBook for QuicNet {
    fn remember<'a>(&'a self, node: NodeId, addresses: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(address) = addresses
                .iter()
                .find_map(|address| address.parse::<Multiaddr>().ok())
            {
                let _ = QuicNet::remember(self, node, address).await;
            }
        })
    }

    fn own(&self) -> BoxFuture<'_, std::result::Result<Vec<String>, MeshError>> {
        Box::pin(async move {
            Ok(QuicNet::addresses(self)
                .await?
                .iter()
                .map(ToString::to_string)
                .collect())
        })
    }

    fn connected(&self) -> BoxFuture<'_, std::result::Result<Vec<NodeId>, MeshError>> {
        Box::pin(QuicNet::connected(self))
    }
}

/// What a cluster node runs on: the daemon's QUIC network and a RocksDB of its own for
/// Raft ([`ClusterNode::start`]), or the simulator's network and disks.
pub struct ClusterParts {
    /// The node's network.
    pub net: Arc<dyn PeerNet>,
    /// How members' addresses reach the network.
    pub addresses: Arc<dyn AddressBook>,
    /// The engine of every Raft group here.
    pub raft_kv: Arc<dyn KvEngine>,
    /// Batches the groups' fsyncs (None: each append syncs itself, as in the simulator,
    /// whose disks have no threads).
    pub syncer: Option<Arc<Syncer>>,
    /// The seed of the groups' election timeouts, mixed with this boot's and the
    /// group's; None (the daemon) draws them from the OS.
    pub seed: Option<u64>,
}

impl std::fmt::Debug for ClusterParts {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClusterParts")
            .field("node", &self.net.local_id())
            .field("syncer", &self.syncer.is_some())
            .finish_non_exhaustive()
    }
}

/// The cluster side of a daemon.
pub struct ClusterNode {
    vault: Arc<Vault>,
    net: Arc<dyn PeerNet>,
    addresses: Arc<dyn AddressBook>,
    table: GroupTable,
    /// The engine of every Raft group here (see [`raft_engine`]).
    raft_kv: Arc<dyn KvEngine>,
    syncer: Option<Arc<Syncer>>,
    options: GroupOptions,
    /// Members a join in progress accepts Raft messages from before it has group 0's
    /// member records.
    joining: Mutex<BTreeSet<NodeId>>,
    /// The members as last read from the cluster group (every Raft message is checked
    /// against it; reading the records for each heartbeat would be the hot path).
    known: Mutex<BTreeSet<NodeId>>,
    watching: Mutex<bool>,
    /// Each volume group's repair here (see groups.rs).
    repairs: Mutex<BTreeMap<u64, super::groups::RepairState>>,
    /// This daemon run (random): names the group write pins it takes, so that the next
    /// run knows the ones a crash left behind.
    boot: u64,
    /// When this run last cleared, in each group, the pins its earlier runs left.
    pins_cleared: Mutex<BTreeMap<u64, tokio::time::Instant>>,
    /// Members a shard request just failed to reach, and when: reads ask them last for a
    /// while (a read of a group with a member down would otherwise wait on it per chunk).
    suspects: Mutex<BTreeMap<NodeId, tokio::time::Instant>>,
    this: Weak<ClusterNode>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClusterNode")
            .field("groups", &self.table.ids())
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Serves the Raft and cluster protocols on `net` and, if this vault is in a cluster,
    /// starts its groups. Call inside the network's runtime.
    ///
    /// # Errors
    /// The protocols are served already; storage errors.
    pub fn start(vault: Arc<Vault>, net: QuicNet) -> Result<Arc<Self>> {
        let raft_kv = raft_engine(&vault)?;
        let syncer = Arc::new(Syncer::start(raft_kv.clone())?);
        let net = Arc::new(net);
        Self::start_with(
            vault,
            ClusterParts {
                net: net.clone(),
                addresses: net,
                raft_kv,
                syncer: Some(syncer),
                seed: None,
            },
        )
    }

    /// [`ClusterNode::start`] on `parts` (the simulator's network and disks).
    ///
    /// # Errors
    /// As [`ClusterNode::start`].
    pub fn start_with(vault: Arc<Vault>, parts: ClusterParts) -> Result<Arc<Self>> {
        let ClusterParts {
            net,
            addresses,
            raft_kv,
            syncer,
            seed,
        } = parts;
        let boot = u64::from_le_bytes(vault.random_array()?);
        let shared = net.clone();
        let node = Arc::new_cyclic(|this| Self {
            vault,
            net,
            addresses,
            table: GroupTable::new(),
            raft_kv,
            syncer,
            options: GroupOptions {
                seed: seed.map(|seed| seed ^ boot),
                ..GroupOptions::default()
            },
            joining: Mutex::new(BTreeSet::new()),
            known: Mutex::new(BTreeSet::new()),
            watching: Mutex::new(false),
            repairs: Mutex::new(BTreeMap::new()),
            boot,
            pins_cleared: Mutex::new(BTreeMap::new()),
            suspects: Mutex::new(BTreeMap::new()),
            this: this.clone(),
        });
        let raft = shared
            .serve(forge_consensus::RAFT_PROTOCOL)
            .map_err(NodeError::Mesh)?;
        let rules = Arc::downgrade(&node);
        tokio::spawn(forge_consensus::serve_raft(
            raft,
            node.table.clone(),
            move |from| match rules.upgrade() {
                Some(node) => node.raft_allowed(from),
                None => Err("the node is stopping".into()),
            },
        ));
        let requests = shared.serve(CLUSTER_PROTOCOL).map_err(NodeError::Mesh)?;
        tokio::spawn(serve_cluster(requests, Arc::downgrade(&node)));
        let shards = shared
            .serve(forge_consensus::shards::SHARDS_PROTOCOL)
            .map_err(NodeError::Mesh)?;
        tokio::spawn(super::groups::serve_shards(shards, Arc::downgrade(&node)));
        node.vault
            .set_group_storage(Arc::new(super::groups::DaemonGroupStorage {
                node: Arc::downgrade(&node),
                runtime: tokio::runtime::Handle::current(),
            }));
        if node.vault.cluster_membership()?.is_some() {
            let booting = node.clone();
            tokio::spawn(async move {
                match booting.start_group(CLUSTER_GROUP).await {
                    Ok(_) => booting.watch(),
                    Err(error) => tracing::error!(%error, "starting the cluster group"),
                }
            });
        }
        Ok(node)
    }

    pub(crate) fn vault(&self) -> &Vault {
        &self.vault
    }

    pub(crate) fn vault_arc(&self) -> Arc<Vault> {
        self.vault.clone()
    }

    pub(crate) fn table(&self) -> &GroupTable {
        &self.table
    }

    pub(crate) fn peer_net(&self) -> Arc<dyn PeerNet> {
        self.net.clone()
    }

    pub(crate) fn repairs(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<u64, super::groups::RepairState>> {
        lock(&self.repairs)
    }

    pub(crate) fn weak(&self) -> Weak<ClusterNode> {
        self.this.clone()
    }

    /// Notes that `node` did not answer a shard request just now.
    pub(crate) fn suspect(&self, node: NodeId) {
        lock(&self.suspects).insert(node, tokio::time::Instant::now());
    }

    /// Whether `node` failed a shard request in the last 10 s.
    pub(crate) fn is_suspect(&self, node: &NodeId) -> bool {
        lock(&self.suspects)
            .get(node)
            .is_some_and(|since| since.elapsed() < Duration::from_secs(10))
    }

    pub(crate) fn boot(&self) -> u64 {
        self.boot
    }

    /// Whether it is time to clear, in `group`, the pins this node's earlier runs left
    /// (marks it done now): at the first pass of this run, then every
    /// [`STALE_PIN_CLEARING`]. Again later, because a pin the crashed run asked for may
    /// reach the group's log only after this run cleared (its proposal in flight at the
    /// leader).
    pub(crate) fn pin_clearing_due(&self, group: u64) -> bool {
        let now = tokio::time::Instant::now();
        let mut cleared = lock(&self.pins_cleared);
        match cleared.get(&group) {
            Some(last) if now.duration_since(*last) < STALE_PIN_CLEARING => false,
            _ => {
                cleared.insert(group, now);
                true
            }
        }
    }

    fn raft_allowed(&self, from: &NodeId) -> std::result::Result<(), String> {
        if lock(&self.known).contains(from) || lock(&self.joining).contains(from) {
            return Ok(());
        }
        // Not a member seen before: this node left, or the sender joined since the last
        // look at the records. Read them again.
        if self.vault.cluster_membership().ok().flatten().is_none() {
            return Err("this node is not in a cluster".into());
        }
        if self.vault.cluster_trusted(from).unwrap_or(false) {
            return Ok(());
        }
        let members = self.members().map_err(|error| error.to_string())?;
        let found = members.contains_key(from);
        *lock(&self.known) = members.into_keys().collect();
        if found {
            Ok(())
        } else {
            Err(format!(
                "node {from} is not a member of this node's cluster"
            ))
        }
    }

    async fn start_group(&self, id: u64) -> Result<GroupHandle> {
        if let Some(running) = self.table.get(id) {
            return Ok(running);
        }
        Ok(GroupHandle::start(
            &self.table,
            id,
            self.raft_kv.clone(),
            self.syncer.clone(),
            self.net.clone(),
            GroupOptions {
                // Each group its own choices.
                seed: self
                    .options
                    .seed
                    .map(|seed| seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                ..self.options
            },
        )
        .await?)
    }

    fn cluster_group(&self) -> Result<GroupHandle> {
        self.table.get(CLUSTER_GROUP).ok_or_else(|| {
            cluster_error(
                "this node is not in a cluster: `forge cluster init` forms one, `forge cluster join PEER` joins one",
            )
        })
    }

    /// Group 0's members, as applied here.
    pub(crate) fn members(&self) -> Result<BTreeMap<NodeId, MemberRecord>> {
        let Some(group) = self.table.get(CLUSTER_GROUP) else {
            return Ok(BTreeMap::new());
        };
        group
            .local_records(MEMBERS.name(), b"")?
            .into_iter()
            .map(|(key, value)| {
                let node = NodeId::from_slice(&key).map_err(|error| NodeError::CorruptRecord {
                    what: "cluster member",
                    reason: error.to_string(),
                })?;
                Ok((node, MemberRecord::decode(&value)?))
            })
            .collect()
    }

    /// The volume groups, as applied here.
    ///
    /// # Errors
    /// A record that does not decode; engine errors.
    pub fn groups(&self) -> Result<Vec<(String, GroupRecord)>> {
        let Some(group) = self.table.get(CLUSTER_GROUP) else {
            return Ok(Vec::new());
        };
        group
            .local_records(GROUPS.name(), b"")?
            .into_iter()
            .map(|(key, value)| {
                Ok((
                    String::from_utf8_lossy(&key).into_owned(),
                    GroupRecord::decode(&value)?,
                ))
            })
            .collect()
    }

    async fn own_member_record(&self) -> Result<MemberRecord> {
        let addresses = self.addresses.own().await.map_err(NodeError::Mesh)?;
        Ok(MemberRecord {
            addresses,
            joined_ns: self.vault.now_ns(),
            keys: self.vault.identity().public_keys().encode(),
        })
    }

    /// Forms a cluster of this node alone.
    ///
    /// # Errors
    /// Already in a cluster; storage or Raft failures.
    pub async fn init(&self) -> Result<ClusterStatusReply> {
        if self.vault.cluster_membership()?.is_some() {
            return Err(cluster_error(
                "this node is in a cluster already (`forge cluster status`)",
            ));
        }
        let me = self.net.local_id();
        self.vault.set_cluster_membership(Some(&ClusterMembership {
            since_ns: self.vault.now_ns(),
            through: None,
        }))?;
        let group = self.start_group(CLUSTER_GROUP).await?;
        group.initialize(&[me]).await?;
        let record = self.own_member_record().await?;
        set_member(&group, &me, Some(&record)).await?;
        self.watch();
        self.status().await
    }

    /// Joins the cluster `peer` is in.
    ///
    /// # Errors
    /// Already in a cluster; the peer refused or is unreachable.
    pub async fn join(&self, peer: NodeId) -> Result<ClusterStatusReply> {
        if self.vault.cluster_membership()?.is_some() {
            return Err(cluster_error(
                "this node is in a cluster already (`forge cluster status`)",
            ));
        }
        let me = self.net.local_id();
        let members = match self.ask(peer, &ClusterRequest::Members).await? {
            ClusterReply::Members(members) => members,
            ClusterReply::Joined => return Err(cluster_error("the peer answered out of turn")),
        };
        {
            let mut joining = lock(&self.joining);
            joining.insert(peer);
            joining.extend(members.iter().map(|member| NodeId::from_bytes(*member)));
        }
        self.vault.set_cluster_membership(Some(&ClusterMembership {
            since_ns: self.vault.now_ns(),
            through: Some(*peer.as_bytes()),
        }))?;
        let joined = async {
            let group = self.start_group(CLUSTER_GROUP).await?;
            let record = self.own_member_record().await?;
            self.ask(
                peer,
                &ClusterRequest::Join {
                    addresses: record.addresses,
                    keys: record.keys,
                },
            )
            .await?;
            // Joined once this node has applied its own member record.
            for _ in 0..600 {
                if self.members()?.contains_key(&me) {
                    return Ok(group);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(cluster_error(
                "the cluster accepted this node but did not replicate to it within 60 s",
            ))
        }
        .await;
        lock(&self.joining).clear();
        match joined {
            Ok(_) => {
                self.watch();
                self.status().await
            }
            Err(error) => {
                if let Some(group) = self.table.get(CLUSTER_GROUP) {
                    let _ = group.shutdown().await;
                }
                let _ = self.table.drain();
                lock(&self.known).clear();
                self.vault.set_cluster_membership(None)?;
                Err(error)
            }
        }
    }

    async fn ask(&self, peer: NodeId, request: &ClusterRequest) -> Result<ClusterReply> {
        let answer = self
            .net
            .request(peer, CLUSTER_PROTOCOL, request.encode()?, JOIN_DEADLINE)
            .await?;
        Ok(ClusterReply::decode(&answer)?)
    }

    /// Leaves the cluster.
    ///
    /// # Errors
    /// Not in a cluster; this node still runs a volume group; no quorum.
    pub async fn leave(&self) -> Result<ClusterStatusReply> {
        let group = self.cluster_group()?;
        let me = self.net.local_id();
        if let Some((name, _)) = self.groups()?.into_iter().find(|(_, record)| {
            record.nodes.contains(me.as_bytes()) || record.retiring.contains(me.as_bytes())
        }) {
            return Err(cluster_error(format!(
                "this node is in volume group {name}: moving a group's data off a node is not supported yet, so it cannot leave"
            )));
        }
        // Out of the voters first, while the others still take this node's requests
        // (they accept Raft messages from members only), then out of the records.
        group.remove_member(&me).await?;
        set_member(&group, &me, None).await?;
        for running in self.table.drain() {
            let _ = running.shutdown().await;
        }
        lock(&self.known).clear();
        self.vault.set_cluster_membership(None)?;
        self.status().await
    }

    /// Creates a volume group.
    ///
    /// # Errors
    /// Not in a cluster; a bad name, layout or node list; the name taken; no quorum.
    pub async fn create_group(
        &self,
        name: &str,
        nodes: Vec<NodeId>,
        data_shards: u32,
        parity_shards: u32,
    ) -> Result<GroupInfo> {
        let group = self.cluster_group()?;
        crate::vault::validate_name("group", name)?;
        forge_store::erasure::ErasureLayout::new(data_shards as usize, parity_shards as usize)?;
        let mut nodes = nodes;
        nodes.sort_unstable();
        nodes.dedup();
        let width = data_shards as usize + parity_shards as usize;
        if width > nodes.len() {
            return Err(cluster_error(format!(
                "a {data_shards}+{parity_shards} layout puts each chunk's {width} shards on {width} different nodes: name at least {width} (got {})",
                nodes.len()
            )));
        }
        let members = self.members()?;
        if let Some(stranger) = nodes.iter().find(|node| !members.contains_key(node)) {
            return Err(cluster_error(format!(
                "node {stranger} is not a cluster member (`forge cluster status` lists them)"
            )));
        }
        loop {
            let next = group.read_record(GROUP_IDS.name(), b"next").await?;
            let id = match &next {
                Some(bytes) => u64::from_be_bytes(bytes.as_slice().try_into().map_err(|_| {
                    NodeError::CorruptRecord {
                        what: "next group id",
                        reason: format!("{} bytes", bytes.len()),
                    }
                })?),
                None => 1,
            };
            let record = GroupRecord {
                id,
                data_shards,
                parity_shards,
                nodes: nodes.iter().map(|node| *node.as_bytes()).collect(),
                founders: nodes.iter().map(|node| *node.as_bytes()).collect(),
                retiring: Vec::new(),
            };
            let updates = [
                RecordUpdate::new(
                    GROUPS,
                    name.as_bytes().to_vec(),
                    Expected::Absent,
                    Change::Put(record.encode()?),
                ),
                RecordUpdate::new(
                    GROUP_IDS,
                    b"next".to_vec(),
                    next.map_or(Expected::Absent, Expected::Value),
                    Change::Put((id + 1).to_be_bytes().to_vec()),
                ),
            ];
            match group.apply(&updates).await {
                Ok(()) => {
                    self.reconcile().await;
                    return Ok(self.group_info(name, &record));
                }
                Err(forge_consensus::ConsensusError::Conflict { space, .. })
                    if space == GROUPS.name() =>
                {
                    return Err(cluster_error(format!("a volume group named {name} exists")));
                }
                // Another creation took the id meanwhile: take the next.
                Err(forge_consensus::ConsensusError::Conflict { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
    }

    pub(crate) fn group_info(&self, name: &str, record: &GroupRecord) -> GroupInfo {
        let mut info = GroupInfo {
            name: name.to_owned(),
            id: record.id,
            data_shards: record.data_shards,
            parity_shards: record.parity_shards,
            nodes: record
                .nodes
                .iter()
                .map(|node| NodeId::from_bytes(*node).to_hex())
                .collect(),
            retiring: record
                .retiring
                .iter()
                .map(|node| NodeId::from_bytes(*node).to_hex())
                .collect(),
            ..GroupInfo::default()
        };
        if let Some(running) = self.table.get(record.id) {
            fill_status(&mut info, &running.status());
        }
        if let Some(repair) = lock(&self.repairs).get(&record.id) {
            info.repair_running = repair.running;
            info.repair_backlog = repair.last.as_ref().map_or(0, |last| last.backlog);
            info.repair_rebuilt = repair.rebuilt_total;
        }
        info
    }

    /// The cluster as this node sees it.
    ///
    /// # Errors
    /// Storage errors.
    pub async fn status(&self) -> Result<ClusterStatusReply> {
        let member = self.vault.cluster_membership()?.is_some();
        let me = self.net.local_id();
        let connected: BTreeSet<NodeId> = self
            .addresses
            .connected()
            .await
            .map_err(NodeError::Mesh)?
            .into_iter()
            .collect();
        let members = self
            .members()?
            .into_iter()
            .map(|(node, record)| ClusterMember {
                node_id: node.to_hex(),
                addresses: record.addresses,
                reachable: node == me || connected.contains(&node),
                this_node: node == me,
            })
            .collect();
        let mut groups = Vec::new();
        if let Some(cluster) = self.table.get(CLUSTER_GROUP) {
            let status = cluster.status();
            let mut info = GroupInfo {
                name: "cluster".into(),
                id: CLUSTER_GROUP,
                nodes: status.voters.iter().map(NodeId::to_hex).collect(),
                ..GroupInfo::default()
            };
            fill_status(&mut info, &status);
            groups.push(info);
        }
        for (name, record) in self.groups()? {
            groups.push(self.group_info(&name, &record));
        }
        Ok(ClusterStatusReply {
            member,
            members,
            groups,
        })
    }

    /// The member count and each group this node runs, by name ("cluster" for group 0),
    /// with this node's repair of it (volume groups only).
    ///
    /// # Errors
    /// Corrupt cluster records.
    pub fn group_statuses(&self) -> Result<(usize, Vec<GroupMetrics>)> {
        let mut statuses = Vec::new();
        if let Some(cluster) = self.table.get(CLUSTER_GROUP) {
            statuses.push(GroupMetrics {
                name: "cluster".to_owned(),
                status: cluster.status(),
                repair: None,
            });
        }
        for (name, record) in self.groups()? {
            if let Some(running) = self.table.get(record.id) {
                statuses.push(GroupMetrics {
                    name,
                    status: running.status(),
                    repair: Some(
                        lock(&self.repairs)
                            .get(&record.id)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                });
            }
        }
        Ok((self.members()?.len(), statuses))
    }

    /// Every group running here (the cluster group first, then the volume groups by id)
    /// with its applied index and records, read at one point in time each: members at the
    /// same applied index of a group must hold the same records (the simulator checks it).
    ///
    /// # Errors
    /// Engine failures.
    pub fn replica_states(&self) -> Result<Vec<(u64, forge_consensus::ReplicaState)>> {
        // In id order (the table is a sorted map): the cluster group, 0, first.
        let ids = self.table.ids();
        let mut states = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(group) = self.table.get(id) {
                states.push((id, group.replica_state()?));
            }
        }
        Ok(states)
    }

    /// Starts the watch loop (once).
    fn watch(&self) {
        let mut watching = lock(&self.watching);
        if *watching {
            return;
        }
        *watching = true;
        let this = self.this.clone();
        tokio::spawn(async move {
            loop {
                let Some(node) = this.upgrade() else { return };
                if node.vault.cluster_membership().ok().flatten().is_none() {
                    *lock(&node.watching) = false;
                    return;
                }
                node.reconcile().await;
                drop(node);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// Brings this node in step with group 0: members' addresses known to the network,
    /// the volume groups it is listed in running (and formed, by their lowest member).
    pub(crate) async fn reconcile(&self) {
        let me = self.net.local_id();
        if let Ok(members) = self.members() {
            *lock(&self.known) = members.keys().copied().collect();
            for (node, record) in members {
                if node == me {
                    continue;
                }
                self.addresses.remember(node, &record.addresses).await;
            }
        }
        let groups = match self.groups() {
            Ok(groups) => groups,
            Err(error) => {
                tracing::warn!(%error, "reading the volume groups");
                return;
            }
        };
        for (name, record) in groups {
            if !record.nodes.contains(me.as_bytes()) && !record.retiring.contains(me.as_bytes()) {
                // Removed from it: stop running it here.
                if let Some(removed) = self.table.remove(record.id) {
                    let _ = removed.shutdown().await;
                    tracing::info!(group = %name, "this node left the volume group");
                }
                continue;
            }
            let running = self.table.get(record.id).is_some();
            let group = match self.start_group(record.id).await {
                Ok(group) => {
                    if !running {
                        tracing::info!(group = %name, id = record.id, "volume group started on this node");
                    }
                    group
                }
                Err(error) => {
                    tracing::warn!(%error, group = %name, "starting a volume group");
                    continue;
                }
            };
            let first = record.founders.iter().min().copied();
            if first == Some(*me.as_bytes()) && group.status().voters.is_empty() {
                let nodes: Vec<NodeId> = record
                    .nodes
                    .iter()
                    .map(|node| NodeId::from_bytes(*node))
                    .collect();
                if let Err(error) = group.initialize(&nodes).await {
                    tracing::debug!(%error, group = %name, "forming a volume group");
                }
            }
            // Write pins an earlier run of this node left (a crash) would keep the
            // group's gc from ever running: cleared at the first pass, and now and then.
            if let Ok(view) = self.view_of(name.clone(), &record)
                && self.pin_clearing_due(record.id)
                && let Err(error) = self.clear_stale_pins(&view).await
            {
                lock(&self.pins_cleared).remove(&record.id);
                tracing::debug!(%error, group = %name, "clearing this node's stale write pins");
            }
            // Its volumes adopted here, their refs and listings mirrored: read after a
            // read-index barrier (so every publish acknowledged before is in what is read),
            // and not written if a publish here wrote meanwhile (the mirror epoch moved).
            let view = self.view_of(name.clone(), &record);
            let epoch = self.vault().mirror_epoch();
            if let Ok(view) = &view
                && let Err(error) = tokio::time::timeout(
                    Duration::from_secs(2),
                    view.handle.barrier(Duration::from_secs(2)),
                )
                .await
                .unwrap_or(Err(forge_consensus::ConsensusError::NoLeader {
                    group: record.id,
                }))
            {
                tracing::debug!(%error, group = %name, "mirroring without a barrier");
            }
            let this = self.this.clone();
            let reconciled = crate::lockstep::spawn_blocking(move || {
                let node = this.upgrade().ok_or_else(|| cluster_error("stopping"))?;
                node.reconcile_volumes(&view?, Some(epoch), false)
            })
            .await;
            self.repair_in_background(record.id);
            match reconciled {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, group = %name, "mirroring the group's volumes")
                }
                Err(error) => {
                    tracing::warn!(%error, group = %name, "mirroring the group's volumes")
                }
            }
        }
    }

    /// Stops every group (the daemon is stopping).
    pub async fn shutdown(&self) {
        for group in self.table.drain() {
            let _ = group.shutdown().await;
        }
    }
}

/// A lock whose holder never leaves its value half-changed: a poisoned one is usable.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fill_status(info: &mut GroupInfo, status: &GroupStatus) {
    info.running_here = true;
    info.leader = status.leader.map(|leader| leader.to_hex());
    info.term = status.term;
    info.committed = status.committed;
    info.applied = status.applied;
    info.lag = status
        .lag
        .iter()
        .map(|(node, entries)| FollowerLag {
            node_id: node.to_hex(),
            entries: *entries,
        })
        .collect();
}

/// Applies `updates`, retrying while the group elects a leader (a new cluster's first
/// seconds, a leader change).
pub(crate) async fn apply_with_retry(group: &GroupHandle, updates: &[RecordUpdate]) -> Result<()> {
    let mut last = None;
    for _ in 0..100 {
        match group.apply(updates).await {
            Ok(()) => return Ok(()),
            Err(
                error @ (forge_consensus::ConsensusError::NoLeader { .. }
                | forge_consensus::ConsensusError::Network(_)
                | forge_consensus::ConsensusError::Raft { .. }),
            ) => {
                last = Some(error);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    Err(last.map_or_else(|| cluster_error("no leader"), NodeError::from))
}

/// Records `node` as a member (Some) or takes its record out (None).
async fn set_member(
    group: &GroupHandle,
    node: &NodeId,
    record: Option<&MemberRecord>,
) -> Result<()> {
    let change = match record {
        Some(record) => Change::Put(record.encode()?),
        None => Change::Delete,
    };
    let update = RecordUpdate::new(MEMBERS, node.as_bytes().to_vec(), Expected::Any, change);
    apply_with_retry(group, &[update]).await
}

/// Answers joiners: the member list, then adding them, for nodes trusted with `--cluster`.
async fn serve_cluster(mut inbound: forge_mesh::Inbound, node: Weak<ClusterNode>) {
    while let Some(request) = inbound.next().await {
        let Some(cluster) = node.upgrade() else {
            return;
        };
        let from = request.from;
        if !cluster.vault.cluster_trusted(&from).unwrap_or(false) {
            request.refuse(format!(
                "node {from} may not join this cluster through this node (on it: `forge peer trust {from} --cluster`)"
            ));
            continue;
        }
        tokio::spawn(async move {
            let answer = async {
                let group = cluster.cluster_group()?;
                let message = ClusterRequest::decode(&request.body)?;
                match message {
                    ClusterRequest::Members => Ok(ClusterReply::Members(
                        cluster
                            .members()?
                            .keys()
                            .map(|node| *node.as_bytes())
                            .collect(),
                    )),
                    ClusterRequest::Join { addresses, keys } => {
                        // The keys must be the asker's own (its NodeId is their hash):
                        // they are what group volumes' keys get wrapped to.
                        let decoded = forge_crypto::NodePublicKeys::decode(&keys)?;
                        if decoded.node_id() != from {
                            return Err(cluster_error(format!(
                                "node {from} sent public keys of node {}",
                                decoded.node_id()
                            )));
                        }
                        // Reachable from here at once (the leader learns the addresses
                        // from the record, through its watch loop).
                        cluster.addresses.remember(from, &addresses).await;
                        let record = MemberRecord {
                            addresses,
                            joined_ns: cluster.vault.now_ns(),
                            keys,
                        };
                        set_member(&group, &from, Some(&record)).await?;
                        cluster.reconcile().await;
                        group.add_member(&from).await?;
                        Ok::<_, NodeError>(ClusterReply::Joined)
                    }
                }
            }
            .await;
            match answer {
                Ok(reply) => match reply.encode() {
                    Ok(bytes) => request.respond(bytes),
                    Err(error) => request.fail(error.to_string()),
                },
                Err(error) => request.fail(error.to_string()),
            }
        });
    }
}
