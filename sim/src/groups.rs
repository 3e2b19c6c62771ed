//! Volume groups under the simulator: whole vaults with their cluster node (Raft groups,
//! shard placement and transfer) on the simulated network and disks, the vault's
//! synchronous work run in lockstep with the runtime (`forge_node::lockstep`).
//!
//! [`smoke`]: three nodes form a cluster, make a 2+1 volume group and a volume in it; one
//! member imports a tree (its chunks' shards spread over the three through the group);
//! every member then exports the snapshot byte-exact (reading the shards it lacks from
//! the others), and the two others again once the third is down.
//!
//! [`run`] (`forge-sim --scenario groups`): 3–7 nodes in one volume group of k+m shards
//! (m = f, the crashes a 2f+1 group survives), a workload of imports onto two branches,
//! snapshot deletes, exports, group gc, repair and membership changes through any
//! member, up to three at once (the seed chooses), while the nemesis partitions, crashes
//! (power cuts: unsynced writes lost) and restarts members (at most f down at once,
//! never one running a step), damages shards at rest (at most m of a chunk between two
//! whole repairs), and fault points inside the node code fire. Checked: members at
//! the same applied index of a Raft group hold the same records (after every step); no
//! export returns other bytes than were imported; after heal, within bounds of simulated
//! time: the steps in progress end, repair makes every chunk whole (each of its k+m shards
//! intact on the member placement names, counted on the members' disks, not from
//! repair's own report), a group gc succeeds, and every acknowledged snapshot not
//! deleted exports byte-exact on every member, with every member's branches equal.
//!
//! Deterministic: the same seed gives the same snapshot ids, network trace and simulated
//! time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forge_crypto::{Cid, NodeId, NodeIdentity, NodeSecrets};
use forge_mesh::MeshError;
use forge_mesh::memory::{FaultPlan, MemoryNetwork, MemoryPeer};
use forge_mesh::net::{BoxFuture, PeerNet};
use forge_mesh::sync::{Incoming, TransferConfig, send_volume, serve_volumes};
use forge_node::clock::{SeededRandomness, SteppingClock};
use forge_node::daemon::cluster::{AddressBook, ClusterNode, ClusterParts};
use forge_node::datadir::DataDir;
use forge_node::progress::Progress;
use forge_node::vault::export::SnapshotSelector;
use forge_node::vault::transfer::VaultVolumeHost;
use forge_node::vault::{ExportOptions, ImportOptions, Vault, VaultParts, no_passphrase};
use forge_store::erasure::ShardRecord;
use forge_store::kv::{Column, Durability, KvEngine, MemKv, WriteBatch};

use crate::SimRng;
use crate::sites::{FaultSet, Log, SitesFailure, SitesReport, Tree};

/// The simulated network needs no addresses: a member is reached by its id.
struct NoAddresses(Arc<MemoryPeer>, Vec<NodeId>);

impl AddressBook for NoAddresses {
    fn remember<'a>(&'a self, _node: NodeId, _addresses: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn own(&self) -> BoxFuture<'_, Result<Vec<String>, MeshError>> {
        Box::pin(async move { Ok(vec![format!("sim:{}", self.0.local_id())]) })
    }

    fn connected(&self) -> BoxFuture<'_, Result<Vec<NodeId>, MeshError>> {
        Box::pin(async move { Ok(self.1.clone()) })
    }
}

/// One node: its vault and its cluster node.
struct Node {
    vault: Arc<Vault>,
    cluster: Arc<ClusterNode>,
    /// The volume sync protocol, where the run has a second site.
    volumes: Option<Volumes>,
}

/// A node's side of volume syncs: its host (sending and receiving) and the tasks serving
/// the protocol.
#[derive(Clone)]
struct Volumes {
    net: Arc<dyn PeerNet>,
    host: Arc<VaultVolumeHost>,
    incoming: Incoming,
    tasks: Arc<Vec<tokio::task::JoinHandle<()>>>,
    /// Following, as the daemon runs it: announcing the heads others follow here,
    /// pulling on the announcements of what this node follows.
    follow: Arc<forge_node::daemon::mesh::Follow>,
}

impl Volumes {
    fn serve(vault: &Arc<Vault>, peer: &Arc<MemoryPeer>) -> Result<Self, String> {
        let incoming = Incoming::default();
        let host = Arc::new(VaultVolumeHost::new(vault.clone(), incoming.clone(), None));
        let net: Arc<dyn PeerNet> = peer.clone();
        let tasks = serve_volumes(net.clone(), host.clone(), incoming.clone(), sync_config())
            .map_err(|error| error.to_string())?;
        let follow = forge_node::daemon::mesh::Follow::start(
            net.clone(),
            None,
            vault.clone(),
            incoming.clone(),
        )
        .map_err(|error| error.to_string())?;
        Ok(Self {
            net,
            host,
            incoming,
            tasks: Arc::new(tasks.into()),
            follow,
        })
    }

    fn stop(&self) {
        for task in self.tasks.iter() {
            task.abort();
        }
        self.follow.stop();
    }
}

/// The sync protocol between the sites, with short deadlines. Store work that waits on
/// a group (a receiver's publish, a sender's reads of what its member lacks) goes through
/// the lockstep runner; the rest of a send runs in a lockstep closure (see [`sync_to`]).
fn sync_config() -> TransferConfig {
    let mut config = TransferConfig {
        control_deadline: Duration::from_secs(10),
        receive_workers: 2,
        ..TransferConfig::default()
    };
    config.push.blocking_reads = true;
    config.push.deadline = Duration::from_secs(5);
    config.push.attempts = 6;
    config
}

fn node_identity(seed: u64, index: usize) -> NodeSecrets {
    let mut secret = [0u8; 128];
    let mut rng = SimRng::new(seed ^ (index as u64 + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
    for byte in &mut secret {
        *byte = rng.next_u64().to_le_bytes()[0];
    }
    NodeSecrets::from_seed_bytes(secret)
}

/// What a run of the smoke scenario saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupsReport {
    /// The imported snapshot.
    pub snapshot: Cid,
    /// The network's trace hash.
    pub trace: [u8; 32],
    /// Simulated time it took.
    pub simulated: Duration,
}

/// Retries `attempt` (an async step that may need the cluster to settle) every 100 ms of
/// simulated time, for at most a minute.
async fn settle<T, F, Fut>(what: &str, attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    settle_within(
        what,
        Duration::from_secs(60),
        Duration::from_millis(100),
        attempt,
    )
    .await
}

/// Retries `attempt` every `every` of simulated time until it succeeds, for at most
/// `bound`; then fails with `what` and the last attempt's error.
async fn settle_within<T, F, Fut>(
    what: &str,
    bound: Duration,
    every: Duration,
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("{what}: {error}"));
            }
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// A tree of a few files (one large enough to be several chunks), with fixed times.
fn tree(seed: u64) -> crate::sites::Tree {
    let mut rng = SimRng::new(seed);
    let big: Vec<u8> = (0..600_000).map(|_| rng.next_u64() as u8).collect();
    crate::sites::Tree::from([
        ("big.bin".to_owned(), big),
        ("sub/note.txt".to_owned(), b"a note\n".to_vec()),
    ])
}

/// Exports `snapshot` of the volume on node `index` (in lockstep; retried while its
/// watch loop has not adopted the volume yet) and compares it with `expected`.
async fn export_matches(
    index: usize,
    vault: &Arc<Vault>,
    snapshot: Cid,
    expected: &crate::sites::Tree,
    root: &Path,
) -> Result<(), String> {
    let out = root.join(format!("out-{index}"));
    let exported = settle("exporting on every member", || {
        let (vault, out) = (vault.clone(), out.clone());
        async move {
            export_tree(vault, snapshot, out)
                .await
                .map_err(|error| format!("node {index}: {error}"))
        }
    })
    .await?;
    if &exported == expected {
        Ok(())
    } else {
        Err(format!("node {index} exported another tree"))
    }
}

/// Whether a sync's summary says the receiver took the head it was sent (moved to it,
/// or had it already). A receiver ahead keeps its own head: the sent one may be only a
/// name in its lineage, never listed there (seed 305166285: the head was deleted at the
/// sender's site before the receiver's follow pulled a later one).
fn receiver_took_the_head(summary: &str) -> bool {
    !summary.starts_with("ReceiverAhead")
}

/// Exports `snapshot` of the volume on `vault` into `out` (emptied first), in lockstep,
/// and reads the tree back.
async fn export_tree(vault: Arc<Vault>, snapshot: Cid, out: PathBuf) -> Result<Tree, String> {
    let into = out.clone();
    forge_node::lockstep::run(move || {
        let _ = std::fs::remove_dir_all(&into);
        vault
            .export(
                VOLUME,
                &into,
                &SnapshotSelector::Id(snapshot.to_hex()),
                &ExportOptions::default(),
                &no_passphrase,
                &Progress::new("export", false),
            )
            .map_err(|error| error.to_string())
    })
    .await?;
    crate::sites::read_tree(&out)
}

/// Runs the smoke scenario for `seed` on its own deterministic runtime.
///
/// # Errors
/// What went wrong, in words.
pub fn smoke(seed: u64) -> Result<GroupsReport, String> {
    let scratch = crate::scratch_dir().map_err(|error| error.to_string())?;
    let root: PathBuf = scratch.path().to_owned();
    // A thread of its own, marked as the simulator's: the cluster's blocking work runs
    // in lockstep on it.
    std::thread::spawn(move || {
        forge_node::lockstep::simulate_on_this_thread();
        let runtime = crate::runtime(seed).map_err(|error| error.to_string())?;
        runtime.block_on(smoke_on(seed, &root))
    })
    .join()
    .map_err(|_| "the scenario panicked".to_owned())?
}

async fn smoke_on(seed: u64, root: &Path) -> Result<GroupsReport, String> {
    let started = tokio::time::Instant::now();
    let network = MemoryNetwork::new(seed);
    let secrets: Vec<NodeSecrets> = (0..3).map(|index| node_identity(seed, index)).collect();
    let ids: Vec<NodeId> = secrets
        .iter()
        .map(|secrets| NodeIdentity::from_secrets(secrets).node_id())
        .collect();
    let mut members = Vec::new();
    for (index, secrets) in secrets.iter().enumerate() {
        members.push(Member::new(
            seed, index, secrets, &network, &ids, root, false,
        )?);
    }
    let nodes = members
        .iter()
        .map(Member::node)
        .collect::<Result<Vec<&Node>, String>>()?;
    // Every node knows the others' keys (as `forge peer add` would make it).
    for (index, node) in nodes.iter().enumerate() {
        for (other, secrets) in secrets.iter().enumerate() {
            if other != index {
                let keys = NodeIdentity::from_secrets(secrets).public_keys().clone();
                node.vault
                    .trust_node(&keys)
                    .and_then(|()| node.vault.set_cluster_trust(&keys.node_id(), true))
                    .map_err(|error| error.to_string())?;
            }
        }
    }
    nodes[0]
        .cluster
        .init()
        .await
        .map_err(|error| format!("cluster init: {error}"))?;
    for node in &nodes[1..] {
        node.cluster
            .join(ids[0])
            .await
            .map_err(|error| format!("join: {error}"))?;
    }
    settle("creating the group", || async {
        nodes[0]
            .cluster
            .create_group("g", ids.clone(), 2, 1)
            .await
            .map_err(|error| error.to_string())
    })
    .await?;
    settle("creating the group volume", || async {
        nodes[0]
            .cluster
            .create_group_volume("data", "g")
            .await
            .map_err(|error| error.to_string())
    })
    .await?;
    let source = root.join("source");
    let expected = tree(seed);
    crate::sites::write_tree(&source, &expected)?;
    let importer = nodes[0].vault.clone();
    let from = source.clone();
    let imported = forge_node::lockstep::run(move || {
        importer.import(
            "data",
            &from,
            &ImportOptions {
                message: "first".into(),
                branch: "main".into(),
                dna: std::collections::BTreeMap::new(),
                atime: false,
            },
            &no_passphrase,
            &Progress::new("import", false),
        )
    })
    .await
    .map_err(|error| format!("import: {error}"))?;
    for (index, node) in nodes.iter().enumerate() {
        export_matches(index, &node.vault, imported.snapshot, &expected, root).await?;
    }
    // One member down (a 2+1 layout loses one shard of each chunk): the others still
    // export byte-exact, their reads going around it.
    network.crash(ids[2]);
    for (index, node) in nodes.iter().enumerate().take(2) {
        export_matches(index, &node.vault, imported.snapshot, &expected, root).await?;
    }
    for node in &nodes {
        node.cluster.shutdown().await;
    }
    Ok(GroupsReport {
        snapshot: imported.snapshot,
        trace: network.trace(),
        simulated: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------
// The groups scenario under faults.
// ---------------------------------------------------------------------------------------

/// The volume group's name and its volume's, in every run.
const GROUP: &str = "g";
const VOLUME: &str = "data";
/// Nodes of the second site, where a run has one (one 2+1 group).
const REMOTE_NODES: usize = 3;
/// Mixed into the seed of the second site's nodes.
const REMOTE_STREAMS: u64 = 0x5173_0000_0000_0002;

/// The branch the second site writes (the first never does) and syncs back.
const REMOTE_BRANCH: &str = "remote";

/// A step on node `i` of the second site is recorded as run by "member" `REMOTE_STEP + i`
/// (never a first-site member's index).
const REMOTE_STEP: usize = 1_000;
/// How long after heal the operation still running may take to end: past every deadline
/// the node code sets on one step (a repair asks members with an hour's deadline).
const OPERATION_BOUND_AFTER_HEAL: Duration = Duration::from_secs(2 * 3600);
/// How long after heal repair may take to make every chunk whole, and gc to succeed.
const SETTLE_AFTER_HEAL: Duration = Duration::from_secs(600);

/// What a seed chose for the groups scenario, and what the command line fixed.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupsConfig {
    /// Members of the one volume group (and of the cluster).
    pub nodes: usize,
    /// The group's data shards (k).
    pub data_shards: u32,
    /// The group's parity shards (m = f: a chunk survives the f members a 2f+1 Raft
    /// group may lose).
    pub parity_shards: u32,
    /// Simulated length of the workload phase.
    pub duration: Duration,
    /// The faults allowed.
    pub faults: FaultSet,
    /// The network's per-message faults (loss, delay, duplication; no corruption: QUIC
    /// authenticates every packet between members, so a flipped byte never arrives).
    pub plan: FaultPlan,
    /// Chance per step that the nemesis acts (percent).
    pub nemesis_percent: u64,
    /// Steps of the workload running at once, each through its own member (1 to 3):
    /// imports racing imports, gc and membership changes.
    pub concurrency: usize,
    /// A member whose vault disk acknowledges fsyncs it never did (`MemKv::ignore_fsyncs`):
    /// a power cut loses shards it said were stored, within the damage budget. Never the
    /// Raft disk: a voter that forgets its vote or acknowledged log breaks Raft's safety
    /// whatever the others do.
    pub lying_disk: Option<usize>,
    /// The fault points inside the node code armed for the run, with their odds
    /// (percent per pass), until heal.
    pub fault_points: Vec<(&'static str, u64)>,
    /// A second site: a cluster of its own (three nodes, one 2+1 group) that the first
    /// site's members sync the volume to, over the same faulty network, and whose
    /// group must end up holding it whole; it imports onto a branch of its own and
    /// syncs that back, and its nodes crash and have shards damaged.
    pub remote_site: bool,
}

impl GroupsConfig {
    /// The configuration `seed` chooses; `nodes` fixes the member count (3 to 7).
    #[must_use]
    pub fn from_seed(
        seed: u64,
        nodes: Option<usize>,
        faults: FaultSet,
        duration: Duration,
    ) -> Self {
        let mut rng = SimRng::new(seed ^ 0x6701_6701);
        let chosen = if rng.chance(70) { 3 } else { 5 };
        let nodes = nodes.unwrap_or(chosen).clamp(3, 7);
        let tolerated = (nodes - 1) / 2;
        let parity_shards = u32::try_from(tolerated).unwrap_or(1).max(1);
        // A spare member where the group has one: a shard whose owner is down goes to it.
        let data_shards = if nodes > 3 {
            u32::try_from(nodes).unwrap_or(3) - parity_shards - 1
        } else {
            2
        }
        .max(1);
        let plan = FaultPlan {
            loss: if faults.network {
                rng.range(0, 4) as f64 / 100.0
            } else {
                0.0
            },
            delay_min: Duration::ZERO,
            delay_max: if faults.network {
                Duration::from_millis(rng.range(0, 40))
            } else {
                Duration::ZERO
            },
            duplicate: if faults.network {
                rng.range(0, 3) as f64 / 100.0
            } else {
                0.0
            },
            corrupt_request: 0.0,
            corrupt_response: 0.0,
        };
        Self {
            nodes,
            data_shards,
            parity_shards,
            duration,
            faults,
            plan,
            nemesis_percent: rng.range(15, 40),
            concurrency: match rng.range(0, 10) {
                0..=2 => 1,
                3..=6 => 2,
                _ => 3,
            },
            lying_disk: None,
            fault_points: Vec::new(),
            // Drawn apart, so that the other choices stay what they were for a seed.
            remote_site: SimRng::new(seed ^ 0x5173_5173).chance(40),
        }
        .with_fault_points(&mut rng)
        .with_lying_disk(&mut rng)
    }

    /// With `lost-fsyncs` (and crashes) among the faults, one member in three seeds gets
    /// a vault disk that ignores fsyncs. It found that a power cut brought back the local
    /// listing of an import the group refused (its forgetting was lost), so repair on
    /// that member counted chunks the group never took, and that the import's stand-in
    /// shards, their group mark lost, were never swept (both fixed).
    fn with_lying_disk(mut self, rng: &mut SimRng) -> Self {
        if self.faults.lost_fsyncs && self.faults.crashes && rng.chance(33) {
            self.lying_disk = usize::try_from(rng.range(0, self.nodes as u64)).ok();
        }
        self
    }

    /// Arms each fault point the faults allow with even odds, at a few percent (a slow
    /// answer more often): runs differ in which points fire, as FoundationDB's BUGGIFY.
    fn with_fault_points(mut self, rng: &mut SimRng) -> Self {
        let allowed = [
            ("shard-store-fails", self.faults.disk, 5),
            ("shard-answer-slow", self.faults.network, 10),
            ("gather-fails", self.faults.network, 5),
            ("publish-answer-lost", self.faults.network, 10),
        ];
        for (point, allowed, most) in allowed {
            if allowed && rng.chance(50) {
                self.fault_points.push((point, rng.range(1, most + 1)));
            }
        }
        self
    }

    fn tolerated_down(&self) -> usize {
        (self.nodes - 1) / 2
    }

    fn width(&self) -> usize {
        (self.data_shards + self.parity_shards) as usize
    }
}

/// A shard a power cut took from a disk that ignored fsyncs: its chunk and index.
type LostShard = (Vec<u8>, u16);

/// One member: its disks (vault and Raft engines) survive a crash, its process does not.
struct Member {
    index: usize,
    id: NodeId,
    secrets: NodeSecrets,
    kv: Arc<MemKv>,
    raft_kv: Arc<MemKv>,
    clock: Arc<SteppingClock>,
    dir: PathBuf,
    peer: Arc<MemoryPeer>,
    everyone: Vec<NodeId>,
    /// None while crashed.
    running: Option<Node>,
    boots: u64,
    /// Serves the volume sync protocol (a run with a second site).
    serves_volumes: bool,
}

impl Member {
    /// Node `index` of `everyone`, on fresh disks, started.
    fn new(
        seed: u64,
        index: usize,
        secrets: &NodeSecrets,
        network: &MemoryNetwork,
        everyone: &[NodeId],
        root: &Path,
        serves_volumes: bool,
    ) -> Result<Self, String> {
        let dir = root.join(format!("node-{index}"));
        std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
        let mut member = Self {
            index,
            id: everyone[index],
            secrets: secrets.clone(),
            kv: Arc::new(MemKv::new()),
            raft_kv: Arc::new(MemKv::new()),
            // Clock skew: each member's clock starts up to two minutes off.
            clock: Arc::new(SteppingClock::new(
                1_800_000_000_000_000_000
                    + i64::try_from(SimRng::new(seed ^ index as u64).range(0, 120)).unwrap_or(0)
                        * 1_000_000_000,
                1_000_000,
            )),
            dir,
            peer: network.join(everyone[index]),
            everyone: everyone.to_vec(),
            running: None,
            boots: 0,
            serves_volumes,
        };
        member.start(seed)?;
        Ok(member)
    }

    fn start(&mut self, seed: u64) -> Result<(), String> {
        self.boots += 1;
        let parts = VaultParts {
            kv: self.kv.clone(),
            metadata: None,
            clock: self.clock.clone(),
            // A new stream per boot: nonces are never drawn twice from one stream.
            randomness: Arc::new(SeededRandomness::new(
                seed ^ (self.index as u64) << 32 ^ self.boots << 48,
            )),
            threads: 1,
        };
        let vault = Arc::new(
            Vault::from_parts(
                &DataDir::new(self.dir.clone()),
                NodeIdentity::from_secrets(&self.secrets),
                parts,
            )
            .map_err(|error| format!("member {} did not open: {error}", self.index))?,
        );
        let cluster = ClusterNode::start_with(
            vault.clone(),
            ClusterParts {
                net: self.peer.clone(),
                addresses: Arc::new(NoAddresses(self.peer.clone(), self.everyone.clone())),
                raft_kv: self.raft_kv.clone(),
                syncer: None,
                seed: Some(
                    seed ^ (self.index as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)
                        ^ self.boots << 56,
                ),
            },
        )
        .map_err(|error| format!("member {}'s cluster did not start: {error}", self.index))?;
        let volumes = if self.serves_volumes {
            Some(Volumes::serve(&vault, &self.peer)?)
        } else {
            None
        };
        self.running = Some(Node {
            vault,
            cluster,
            volumes,
        });
        Ok(())
    }

    fn node(&self) -> Result<&Node, String> {
        self.running
            .as_ref()
            .ok_or_else(|| format!("member {} is down", self.index))
    }

    /// A power cut: the network drops it, its Raft groups stop, and both its engines
    /// keep only what was durable (plus `surviving` unsynced logged batches of each). The
    /// dead process's engines fail every later call, so a blocking task of it that still
    /// runs writes nothing the next boot sees.
    async fn crash(&mut self, network: &MemoryNetwork, surviving: usize) {
        network.crash(self.id);
        if let Some(node) = self.running.take() {
            if let Some(volumes) = &node.volumes {
                volumes.stop();
            }
            node.cluster.shutdown().await;
        }
        self.kv = Arc::new(self.kv.power_cut(surviving));
        self.raft_kv = Arc::new(self.raft_kv.power_cut(surviving));
    }
}

/// One workload step, run on one member while the nemesis goes on.
#[derive(Debug, Clone)]
enum Operation {
    Import {
        branch: String,
        tree: Tree,
    },
    Delete(Cid),
    Export(Cid),
    Gc,
    Repair,
    /// Cluster node `.0` into the group.
    AddMember(usize, NodeId),
    /// Member `.0` out of the group.
    RemoveMember(usize, NodeId),
    /// `main` sent to node `to` of the second site (its id `peer`); `head` and `tree`:
    /// the sender's head as the step began, if an acknowledged import made it.
    Sync {
        to: usize,
        peer: NodeId,
        head: Option<(Cid, Tree)>,
    },
    /// An import on a node of the second site onto its own branch ([`REMOTE_BRANCH`]).
    RemoteImport {
        tree: Tree,
    },
    /// [`REMOTE_BRANCH`] sent back from a node of the second site to member `to` of the
    /// first (its id `peer`); `head`: the sender's head of it as the step began, if an
    /// acknowledged import made it.
    SyncBack {
        to: usize,
        peer: NodeId,
        head: Option<(Cid, Tree)>,
    },
    /// A node of the second site follows `main` at member `to` of the first (its id
    /// `peer`): from then on it pulls each head that member announces.
    Follow {
        to: usize,
        peer: NodeId,
    },
}

/// How a step ended.
#[derive(Debug)]
enum Outcome {
    Imported(Cid),
    Deleted,
    Exported(Tree),
    Collected(u64),
    Repaired { whole: bool, summary: String },
    Membership(Vec<String>),
    Synced(String),
    Followed,
    Failed(String),
}

/// The step in progress: who runs it, what it is, its task.
struct Running {
    member: usize,
    operation: Operation,
    task: tokio::task::JoinHandle<Outcome>,
    started: tokio::time::Instant,
}

/// Runs the groups scenario for `seed`: see the module's documentation.
///
/// # Errors
/// The invariant that broke, with the event log.
pub fn run(seed: u64, config: &GroupsConfig) -> Result<SitesReport, SitesFailure> {
    let failure = move |reason: String, events: Vec<String>| SitesFailure {
        seed,
        reason,
        events,
    };
    let scratch = crate::scratch_dir()
        .map_err(|error| failure(format!("no scratch directory: {error}"), Vec::new()))?;
    let root = scratch.path().to_owned();
    let config = config.clone();
    // A thread of its own, marked as the simulator's: the nodes' blocking work runs in
    // lockstep on it.
    std::thread::spawn(move || {
        forge_node::lockstep::simulate_on_this_thread();
        // Fault points inside the node code: armed on this thread, shared with the
        // threads that run in lockstep with it, calmed at heal.
        forge_store::faults::points::arm(seed, &config.fault_points);
        let runtime =
            crate::runtime(seed).map_err(|error| failure(error.to_string(), Vec::new()))?;
        runtime.block_on(async {
            let log = Log::starting_now();
            let mut world = match GroupWorld::new(seed, &config, &root, log.clone()).await {
                Ok(world) => world,
                Err(reason) => return Err(failure(reason, log.snapshot())),
            };
            let outcome = world.run().await;
            let mut report = std::mem::take(&mut world.report);
            report.seed = seed;
            report.simulated = log.started.elapsed();
            let stats = world.network.stats();
            report.message_faults = stats.lost + stats.duplicated + stats.corrupted;
            report.faults += forge_store::faults::points::disarm();
            report.events = log.snapshot();
            let mut hasher = blake3::Hasher::new();
            for event in &report.events {
                hasher.update(event.as_bytes());
                hasher.update(b"\n");
            }
            hasher.update(&world.network.trace());
            report.trace = *hasher.finalize().as_bytes();
            world.stop().await;
            match outcome {
                Ok(()) => Ok(report),
                Err(reason) => Err(failure(reason, report.events)),
            }
        })
    })
    .join()
    .map_err(|_| SitesFailure {
        seed,
        reason: "the scenario panicked".into(),
        events: Vec::new(),
    })?
}

/// A cluster of `members` and its volume group on the first `group_size` of them, as an
/// operator makes them.
async fn form_cluster(
    members: &[Member],
    secrets: &[NodeSecrets],
    ids: &[NodeId],
    group_size: usize,
    data_shards: u32,
    parity_shards: u32,
) -> Result<(), String> {
    for member in members {
        let node = member.node()?;
        for (other, secrets) in secrets.iter().enumerate() {
            if other != member.index {
                let keys = NodeIdentity::from_secrets(secrets).public_keys().clone();
                node.vault
                    .trust_node(&keys)
                    .and_then(|()| node.vault.set_cluster_trust(&keys.node_id(), true))
                    .map_err(|error| error.to_string())?;
            }
        }
    }
    let first = members[0].node()?.cluster.clone();
    first
        .init()
        .await
        .map_err(|error| format!("cluster init: {error}"))?;
    for member in &members[1..] {
        let cluster = member.node()?.cluster.clone();
        settle("joining the cluster", || async {
            cluster
                .join(ids[0])
                .await
                .map_err(|error| error.to_string())
        })
        .await?;
    }
    settle("creating the group", || async {
        first
            .create_group(
                GROUP,
                ids[..group_size].to_vec(),
                data_shards,
                parity_shards,
            )
            .await
            .map_err(|error| error.to_string())
    })
    .await?;
    Ok(())
}

/// `members` (of one cluster) at the same applied index of a Raft group hold the same
/// records.
fn replicas_agree(members: &[Member], who: &str) -> Result<(), String> {
    let mut seen: BTreeMap<(u64, u64), (usize, forge_consensus::ReplicaState)> = BTreeMap::new();
    for member in members {
        let Some(node) = &member.running else {
            continue;
        };
        // A member whose engine is mid-restart may fail a read: not a divergence.
        let Ok(states) = node.cluster.replica_states() else {
            continue;
        };
        for (group, state) in states {
            let Some(applied) = state.0 else { continue };
            match seen.get(&(group, applied)) {
                Some((other, theirs)) if theirs.1 != state.1 => {
                    return Err(format!(
                        "{who} {other} and {} differ in Raft group {group} at applied index {applied}: {} and {} records",
                        member.index,
                        theirs.1.len(),
                        state.1.len()
                    ));
                }
                Some(_) => {}
                None => {
                    seen.insert((group, applied), (member.index, state));
                }
            }
        }
    }
    Ok(())
}

struct GroupWorld {
    seed: u64,
    config: GroupsConfig,
    rng: SimRng,
    network: MemoryNetwork,
    members: Vec<Member>,
    scratch: PathBuf,
    log: Log,
    report: SitesReport,
    /// Each branch's last acknowledged import (its snapshot and tree).
    branches: BTreeMap<String, (Cid, Tree)>,
    /// Every acknowledged snapshot not deleted (nor possibly deleted) since.
    kept: BTreeMap<Cid, Tree>,
    /// Shards damaged at rest since the last repair that made every chunk whole:
    /// chunk → (member, shard index).
    damaged: BTreeMap<Vec<u8>, BTreeSet<(usize, u16)>>,
    /// Crashed members and when they come back.
    down_until: BTreeMap<usize, tokio::time::Instant>,
    partitioned: bool,
    /// A node lost for good (its disks gone): never restarted; the group must replace it
    /// (the spare in, it out) and make every chunk whole without it.
    lost: Option<usize>,
    /// The steps running (at most `config.concurrency`), in the order they started.
    running: Vec<Running>,
    steps: u64,
    /// The second site's nodes (empty without one): its own cluster and group.
    remote: Vec<Member>,
    /// Heads of `main` (acknowledged imports, with their trees) that a sync acknowledged
    /// at the second site: each must restore there byte-exact after heal.
    synced: BTreeMap<Cid, Tree>,
    /// The second site's crashed nodes and when they come back (one of its three at a
    /// time, its group's f).
    remote_down_until: BTreeMap<usize, tokio::time::Instant>,
    /// Shards damaged at rest on the second site's nodes (chunk → (node, shard index)):
    /// at most its m (1) per chunk, for the whole run (its repair runs at the end).
    remote_damaged: BTreeMap<Vec<u8>, BTreeSet<(usize, u16)>>,
    /// The nemesis's draws for the second site, a stream apart: a seed without one
    /// draws as it did before the second site had faults of its own.
    remote_rng: SimRng,
    /// The draws for clock jumps and slow disks, a stream apart for the same reason.
    machine_rng: SimRng,
    /// Whether a partition flaps, and how fast: a stream apart for the same reason.
    flap_rng: SimRng,
    /// The flapping partition, if one flaps (dropping it stops it).
    flapping: Option<crate::Flapping>,
    /// Nodes whose disks are slow now (as [`GroupWorld::machine`] numbers them).
    slow_disks: BTreeSet<usize>,
    /// The second site's branch: its last acknowledged import, and every one kept.
    remote_head: Option<(Cid, Tree)>,
    remote_kept: BTreeMap<Cid, Tree>,
    /// Heads of the second site's branch a sync back acknowledged: each must restore on
    /// the first site byte-exact after heal.
    synced_back: BTreeMap<Cid, Tree>,
    /// A node of the second site that follows `main` at a member of the first:
    /// (its index, the member's).
    following: Option<(usize, usize)>,
}

impl GroupWorld {
    async fn new(seed: u64, config: &GroupsConfig, root: &Path, log: Log) -> Result<Self, String> {
        let network = MemoryNetwork::new(seed);
        // One cluster node more than the group: the spare that membership changes add.
        let secrets: Vec<NodeSecrets> = (0..=config.nodes)
            .map(|index| node_identity(seed, index))
            .collect();
        let ids: Vec<NodeId> = secrets
            .iter()
            .map(|secrets| NodeIdentity::from_secrets(secrets).node_id())
            .collect();
        let mut members = Vec::new();
        for (index, secrets) in secrets.iter().enumerate() {
            let member = Member::new(
                seed,
                index,
                secrets,
                &network,
                &ids,
                root,
                config.remote_site,
            )?;
            members.push(member);
        }
        // The second site: identities past the first's, a cluster of its own.
        let remote_secrets: Vec<NodeSecrets> = if config.remote_site {
            (0..REMOTE_NODES)
                .map(|offset| node_identity(seed, config.nodes + 1 + offset))
                .collect()
        } else {
            Vec::new()
        };
        let remote_ids: Vec<NodeId> = remote_secrets
            .iter()
            .map(|secrets| NodeIdentity::from_secrets(secrets).node_id())
            .collect();
        let mut remote = Vec::new();
        for (offset, secrets) in remote_secrets.iter().enumerate() {
            remote.push(Member::new(
                // Streams of their own (nonces, election timeouts), apart from the first
                // site's nodes at the same positions.
                seed ^ REMOTE_STREAMS,
                offset,
                secrets,
                &network,
                &remote_ids,
                &root.join("remote"),
                true,
            )?);
        }
        let mut world = Self {
            seed,
            config: config.clone(),
            rng: SimRng::new(seed ^ 0x0067_7270),
            network,
            members,
            scratch: root.to_owned(),
            log,
            report: SitesReport::default(),
            branches: BTreeMap::new(),
            kept: BTreeMap::new(),
            damaged: BTreeMap::new(),
            down_until: BTreeMap::new(),
            partitioned: false,
            lost: None,
            running: Vec::new(),
            steps: 0,
            remote,
            synced: BTreeMap::new(),
            remote_down_until: BTreeMap::new(),
            remote_damaged: BTreeMap::new(),
            remote_rng: SimRng::new(seed ^ 0x0b51_7e5b),
            machine_rng: SimRng::new(seed ^ 0xc10c_d15c),
            flap_rng: SimRng::new(seed ^ 0xf1a9_f1a9),
            flapping: None,
            slow_disks: BTreeSet::new(),
            remote_head: None,
            remote_kept: BTreeMap::new(),
            synced_back: BTreeMap::new(),
            following: None,
        };
        let (k, m) = (world.config.data_shards, world.config.parity_shards);
        form_cluster(&world.members, &secrets, &ids, world.config.nodes, k, m).await?;
        world.form_volume().await?;
        if world.config.remote_site {
            form_cluster(
                &world.remote,
                &remote_secrets,
                &remote_ids,
                REMOTE_NODES,
                2,
                1,
            )
            .await?;
            world.connect_sites().await?;
        }
        // Faults from here on: forming the cluster is the operator's setup.
        world.network.set_faults(config.plan);
        if let Some(index) = config.lying_disk {
            world.members[index].kv.ignore_fsyncs();
            world
                .log
                .note(format!("member {index}'s vault disk ignores fsyncs"));
        }
        Ok(world)
    }

    /// The group's volume, as an operator makes it.
    async fn form_volume(&mut self) -> Result<(), String> {
        let first = self.members[0].node()?.cluster.clone();
        settle("creating the group volume", || async {
            first
                .create_group_volume(VOLUME, GROUP)
                .await
                .map_err(|error| error.to_string())
        })
        .await?;
        let (k, m) = (self.config.data_shards, self.config.parity_shards);
        self.log.note(format!(
            "{} nodes, group {GROUP} of {k}+{m} shards on the first {}, volume {VOLUME}",
            self.members.len(),
            self.config.nodes
        ));
        Ok(())
    }

    /// The two sites introduced, as their operators do: each node of the second site
    /// trusts each of the first to send it new volumes, which go into its group (the
    /// first site's members author the snapshots, so each is trusted as one), and the
    /// volume is shared with each of its nodes, to write (they keep its dedup domain).
    async fn connect_sites(&mut self) -> Result<(), String> {
        for receiver in &self.remote {
            let vault = receiver.node()?.vault.clone();
            for sender in &self.members {
                let keys = NodeIdentity::from_secrets(&sender.secrets)
                    .public_keys()
                    .clone();
                vault
                    .add_peer(&keys, None, Some(&format!("site-a-{}", sender.index)))
                    .and_then(|_| vault.trust_peer(&sender.id, None, false, true))
                    .and_then(|_| vault.set_new_volume_group(&sender.id, Some(GROUP)))
                    .map_err(|error| {
                        format!("remote {}: trusting a sender: {error}", receiver.index)
                    })?;
                let keys = NodeIdentity::from_secrets(&receiver.secrets)
                    .public_keys()
                    .clone();
                sender
                    .node()?
                    .vault
                    .add_peer(&keys, None, Some(&format!("site-b-{}", receiver.index)))
                    .map_err(|error| format!("member {}: adding a peer: {error}", sender.index))?;
            }
        }
        let owner = self.members[0].node()?.vault.clone();
        let receivers: Vec<NodeId> = self.remote.iter().map(|member| member.id).collect();
        settle("sharing the volume with the second site", || {
            let (owner, receivers) = (owner.clone(), receivers.clone());
            async move {
                forge_node::lockstep::run(move || {
                    for receiver in &receivers {
                        owner.share_volume(VOLUME, receiver, true, &no_passphrase)?;
                    }
                    Ok::<_, forge_node::error::NodeError>(())
                })
                .await
                .map_err(|error| error.to_string())
            }
        })
        .await?;
        self.log.note(format!(
            "a second site: {REMOTE_NODES} nodes, group {GROUP} of 2+1 shards; {VOLUME} shared with each"
        ));
        Ok(())
    }

    fn pick(&mut self, count: usize) -> usize {
        usize::try_from(self.rng.range(0, count as u64)).unwrap_or(0)
    }

    async fn run(&mut self) -> Result<(), String> {
        let end = self.log.started + self.config.duration;
        self.trace_chunk_holdings();
        loop {
            let now = tokio::time::Instant::now();
            if now >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(self.rng.range(50, 1_500))).await;
            self.steps += 1;
            self.restart_due()?;
            self.check_replicas()?;
            self.collect().await?;
            if self.rng.chance(self.config.nemesis_percent) {
                self.nemesis().await;
                if self.config.remote_site {
                    self.remote_nemesis().await;
                }
                self.machine_nemesis();
            } else if self.running.len() < self.config.concurrency {
                self.start_operation().await?;
            }
        }
        self.heal().await?;
        self.check().await
    }

    /// With `FORGE_SIM_TRACE_CHUNK=<hex prefix>`: prints (to stderr) which shards of the
    /// chunks with that prefix each member holds, whenever that changes (`!` marks a shard
    /// that does not decode), polled every 5 ms of simulated time. For chasing a lost
    /// chunk; the polling task shifts the schedule, so the run differs from one without.
    fn trace_chunk_holdings(&self) {
        let Ok(prefix) = std::env::var("FORGE_SIM_TRACE_CHUNK") else {
            return;
        };
        let disks: Vec<Arc<MemKv>> = self
            .members
            .iter()
            .map(|member| member.kv.clone())
            .collect();
        let started = self.log.started;
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                let mut now = String::new();
                for (index, disk) in disks.iter().enumerate() {
                    let held: Vec<String> = disk
                        .scan(Column::Shards, &[], None, usize::MAX)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|(key, record)| {
                            let chunk: String = key
                                .get(..32)?
                                .iter()
                                .map(|byte| format!("{byte:02x}"))
                                .collect();
                            let &[high, low] = key.get(32..34)? else {
                                return None;
                            };
                            let bad = if ShardRecord::decode(&record).is_ok() {
                                ""
                            } else {
                                "!"
                            };
                            chunk.starts_with(&prefix).then(|| {
                                format!("{}:{}{bad}", &chunk[..8], u16::from_be_bytes([high, low]))
                            })
                        })
                        .collect();
                    now.push_str(&format!("member {index} {held:?}  "));
                }
                if now != last {
                    eprintln!("{:>9} ms shards: {now}", started.elapsed().as_millis());
                    last = now;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }

    fn restart_due(&mut self) -> Result<(), String> {
        let now = tokio::time::Instant::now();
        let due: Vec<usize> = self
            .down_until
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(index, _)| *index)
            .collect();
        for index in due {
            self.down_until.remove(&index);
            self.network.restart(self.members[index].id);
            self.members[index].start(self.seed)?;
            self.log.note(format!("member {index} restarted"));
        }
        let due: Vec<usize> = self
            .remote_down_until
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(index, _)| *index)
            .collect();
        for index in due {
            self.restart_remote(index)?;
        }
        Ok(())
    }

    fn restart_remote(&mut self, index: usize) -> Result<(), String> {
        self.remote_down_until.remove(&index);
        self.network.restart(self.remote[index].id);
        self.remote[index].start(self.seed)?;
        self.log
            .note(format!("the second site's node {index} restarted"));
        Ok(())
    }

    /// The second site's own faults, drawn from its own stream when the nemesis acts:
    /// a node crashes (one of three at a time), or a shard at rest there is damaged (at
    /// most one per chunk).
    async fn remote_nemesis(&mut self) {
        let faults = self.config.faults;
        match self.remote_rng.range(0, 6) {
            0 if faults.crashes && self.remote_down_until.is_empty() => {
                let index = usize::try_from(self.remote_rng.range(0, self.remote.len() as u64))
                    .unwrap_or(0);
                // As on the first site: not under a step of its own.
                if self
                    .running
                    .iter()
                    .any(|running| running.member == REMOTE_STEP + index)
                {
                    return;
                }
                let surviving = usize::try_from(self.remote_rng.range(0, 3)).unwrap_or(0);
                self.remote[index].crash(&self.network, surviving).await;
                let back = tokio::time::Instant::now()
                    + Duration::from_millis(self.remote_rng.range(500, 8_000));
                self.remote_down_until.insert(index, back);
                self.report.faults += 1;
                self.log.note(format!(
                    "the second site's node {index} crashed ({surviving} unsynced batches survive)"
                ));
            }
            1 if faults.disk => {
                let index = usize::try_from(self.remote_rng.range(0, self.remote.len() as u64))
                    .unwrap_or(0);
                let kv = self.remote[index].kv.clone();
                let Ok(shards) = kv.scan(Column::Shards, &[], None, usize::MAX) else {
                    return;
                };
                if shards.is_empty() {
                    return;
                }
                let pick =
                    usize::try_from(self.remote_rng.range(0, shards.len() as u64)).unwrap_or(0);
                let (key, mut value) = shards[pick].clone();
                let (Some(chunk), Some(&[high, low])) = (key.get(..32), key.get(32..34)) else {
                    return;
                };
                // Its group is 2+1: one bad shard per chunk at most.
                if self.remote_damaged.contains_key(chunk) || value.is_empty() {
                    return;
                }
                let shard = u16::from_be_bytes([high, low]);
                let at = usize::try_from(self.remote_rng.range(0, value.len() as u64)).unwrap_or(0);
                value[at] ^= 0x40;
                let chunk = chunk.to_vec();
                let mut batch = WriteBatch::new();
                batch.put(Column::Shards, key, value);
                if kv.write(batch, Durability::Synced).is_ok() {
                    self.remote_damaged
                        .entry(chunk)
                        .or_default()
                        .insert((index, shard));
                    self.report.faults += 1;
                    self.log.note(format!(
                        "the second site's node {index}: shard {shard} of a chunk damaged at rest"
                    ));
                }
            }
            _ => {}
        }
    }

    /// Faults of a node's machine, from a stream of their own: its wall clock steps
    /// forward or back by up to a quarter of an hour (an operator or NTP correcting it;
    /// the vault's clock, not the runtime's timers), or its disks (vault and Raft) turn
    /// slow, each synced write, flush and sync costing 20 ms to 1.5 s, or fast again.
    fn machine_nemesis(&mut self) {
        let faults = self.config.faults;
        let nodes = self.members.len() + self.remote.len();
        if faults.clock_jumps && self.machine_rng.chance(25) {
            let pick = usize::try_from(self.machine_rng.range(0, nodes as u64)).unwrap_or(0);
            let seconds = i64::try_from(self.machine_rng.range(1, 900)).unwrap_or(1);
            let by_ns = if self.machine_rng.chance(50) {
                -seconds
            } else {
                seconds
            } * 1_000_000_000;
            let (node, name) = self.machine(pick);
            node.clock.jump(by_ns);
            self.report.faults += 1;
            self.log
                .note(format!("{name}'s clock jumped {} s", by_ns / 1_000_000_000));
        }
        if faults.slow_disks && self.machine_rng.chance(25) {
            let pick = usize::try_from(self.machine_rng.range(0, nodes as u64)).unwrap_or(0);
            let per_sync = Duration::from_millis(self.machine_rng.range(20, 1_500));
            let slow = !self.slow_disks.remove(&pick);
            let (node, name) = self.machine(pick);
            let per_sync = slow.then_some(per_sync);
            node.kv.set_slow(per_sync);
            node.raft_kv.set_slow(per_sync);
            if slow {
                self.slow_disks.insert(pick);
                self.report.faults += 1;
                self.log.note(format!(
                    "{name}'s disks turned slow: {} ms a sync",
                    per_sync.unwrap_or_default().as_millis()
                ));
            } else {
                self.log.note(format!("{name}'s disks are fast again"));
            }
        }
    }

    /// Node `pick` of both sites (the first site's members, then the second site's
    /// nodes), and how the log names it.
    fn machine(&self, pick: usize) -> (&Member, String) {
        match pick.checked_sub(self.members.len()) {
            None => (&self.members[pick], format!("member {pick}")),
            Some(index) => (
                &self.remote[index],
                format!("the second site's node {index}"),
            ),
        }
    }

    /// Members at the same applied index of a Raft group hold the same records.
    fn check_replicas(&self) -> Result<(), String> {
        replicas_agree(&self.members, "members")?;
        replicas_agree(&self.remote, "the second site's nodes")
    }

    /// Picks the next step and starts it on a node that is up (a member of the group, but
    /// for membership changes, which any cluster node may ask for).
    async fn start_operation(&mut self) -> Result<(), String> {
        let (group, retiring) = self.membership().await;
        // Each step through a member of its own: two on one vault cannot run in lockstep
        // (the vault's one pool thread, held by a step waiting on the group, would block
        // the other step's thread outside the runtime's turn).
        let up: Vec<usize> = (0..self.members.len())
            .filter(|index| {
                self.members[*index].running.is_some()
                    && group.contains(index)
                    && !self.running.iter().any(|running| running.member == *index)
            })
            .collect();
        if self.config.remote_site && self.remote_rng.chance(12) {
            return self.start_remote_step(&group);
        }
        if up.is_empty() {
            return Ok(());
        }
        let member = up[self.pick(up.len())];
        let operation = if self.config.remote_site && self.rng.chance(15) {
            self.sync_step(member)?
        } else {
            self.local_step(&group, &retiring)
        };
        self.report.operations += 1;
        self.log
            .note(format!("member {member}: {} started", describe(&operation)));
        let node = self.members[member].node()?;
        let task = tokio::spawn(perform(
            node,
            operation.clone(),
            self.scratch
                .join(format!("step-{}", self.report.operations)),
        ));
        self.running.push(Running {
            member,
            operation,
            task,
            started: tokio::time::Instant::now(),
        });
        Ok(())
    }

    /// A step on a node of the second site (one that is up and runs no step): an import
    /// onto its own branch, or that branch synced back to a member of the first site's
    /// group, trusted there first to write the volume (each member's trust is its own).
    fn start_remote_step(&mut self, group: &[usize]) -> Result<(), String> {
        let idle: Vec<usize> = (0..self.remote.len())
            .filter(|index| {
                self.remote[*index].running.is_some()
                    && !self
                        .running
                        .iter()
                        .any(|running| running.member == REMOTE_STEP + *index)
            })
            .collect();
        if idle.is_empty() || group.is_empty() {
            return Ok(());
        }
        let at = idle[usize::try_from(self.remote_rng.range(0, idle.len() as u64)).unwrap_or(0)];
        let operation = if self.following.is_none() && self.remote_rng.chance(20) {
            let to =
                group[usize::try_from(self.remote_rng.range(0, group.len() as u64)).unwrap_or(0)];
            self.trust_for_follow(at, to)?;
            Operation::Follow {
                to,
                peer: self.members[to].id,
            }
        } else if self.remote_rng.chance(50) {
            let previous = self.remote_head.as_ref().map(|(_, tree)| tree.clone());
            Operation::RemoteImport {
                tree: crate::sites::next_tree(&mut self.remote_rng, previous.as_ref()),
            }
        } else {
            let to =
                group[usize::try_from(self.remote_rng.range(0, group.len() as u64)).unwrap_or(0)];
            if let Ok(node) = self.members[to].node() {
                for remote in &self.remote {
                    trust_to_write(&node.vault, &remote.id).map_err(|error| {
                        format!("member {to}: trusting the second site's node: {error}")
                    })?;
                }
            }
            let head = branch_head(&self.remote[at].node()?.vault, REMOTE_BRANCH)
                .and_then(|head| self.remote_kept.get(&head).map(|tree| (head, tree.clone())));
            Operation::SyncBack {
                to,
                peer: self.members[to].id,
                head,
            }
        };
        self.report.operations += 1;
        self.log.note(format!(
            "the second site's node {at}: {} started",
            describe(&operation)
        ));
        let performed = match &operation {
            Operation::RemoteImport { tree, .. } => Operation::Import {
                branch: REMOTE_BRANCH.to_owned(),
                tree: tree.clone(),
            },
            other => other.clone(),
        };
        let node = self.remote[at].node()?;
        let task = tokio::spawn(perform(
            node,
            performed,
            self.scratch
                .join(format!("step-{}", self.report.operations)),
        ));
        self.running.push(Running {
            member: REMOTE_STEP + at,
            operation,
            task,
            started: tokio::time::Instant::now(),
        });
        Ok(())
    }

    /// The trust following needs, as operators give it: member `to` lets node `at` of the
    /// second site read the volume, and that node lets the member write it there (its
    /// pushes of what it announces), each once it holds the volume.
    fn trust_for_follow(&self, at: usize, to: usize) -> Result<(), String> {
        let (member, remote) = (&self.members[to], &self.remote[at]);
        for (node, peer, who) in [
            (member.node(), remote.id, "member"),
            (remote.node(), member.id, "remote"),
        ] {
            if let Ok(node) = node {
                trust_to_write(&node.vault, &peer)
                    .map_err(|error| format!("{who}: trust for following: {error}"))?;
            }
        }
        Ok(())
    }

    /// A step on the first site's group: imports, deletes, exports, gc, repair, and
    /// membership changes.
    fn local_step(&mut self, group: &[usize], retiring: &[usize]) -> Operation {
        match self.rng.range(0, 11) {
            // Membership changes under load: the spare in, or (with it in) a member out;
            // a removal that could not finish (a member down) is asked for again.
            // One membership change at a time, as an operator would.
            10 if self.running.iter().any(|running| {
                matches!(
                    running.operation,
                    Operation::AddMember(..) | Operation::RemoveMember(..)
                )
            }) =>
            {
                Operation::Repair
            }
            10 => {
                let outside: Vec<usize> = (0..self.members.len())
                    .filter(|index| !group.contains(index))
                    .collect();
                let lost_member = self.lost.filter(|lost| group.contains(lost));
                if let Some(lost) = lost_member {
                    // Replace it: the spare in first when the layout needs every member.
                    match outside
                        .iter()
                        .copied()
                        .find(|index| Some(*index) != self.lost)
                    {
                        Some(spare) if group.len() - 1 < self.config.width() => {
                            Operation::AddMember(spare, self.members[spare].id)
                        }
                        _ => Operation::RemoveMember(lost, self.members[lost].id),
                    }
                } else if let Some(index) = retiring.first().copied() {
                    Operation::RemoveMember(index, self.members[index].id)
                } else if group.len() > self.config.nodes {
                    let index = group[self.pick(group.len())];
                    Operation::RemoveMember(index, self.members[index].id)
                } else if let Some(index) = outside
                    .iter()
                    .copied()
                    .find(|index| Some(*index) != self.lost)
                {
                    Operation::AddMember(index, self.members[index].id)
                } else {
                    Operation::Repair
                }
            }
            0..=3 => self.next_import("main"),
            4 => self.next_import("side"),
            5 | 6 => match self.old_snapshot() {
                Some(victim) if self.rng.chance(50) => Operation::Delete(victim),
                _ => match self.kept_snapshot() {
                    Some(snapshot) => Operation::Export(snapshot),
                    None => self.next_import("main"),
                },
            },
            7 => Operation::Gc,
            8 => Operation::Repair,
            _ => match self.kept_snapshot() {
                Some(snapshot) => Operation::Export(snapshot),
                None => Operation::Repair,
            },
        }
    }

    /// A sync of `main` from `member` to a node of the second site, trusted there first
    /// to write the volume once that node holds it (the operator's `forge peer trust
    /// NODE --volume data --write`).
    fn sync_step(&mut self, member: usize) -> Result<Operation, String> {
        let to = self.pick(self.remote.len());
        let sender = self.members[member].id;
        // A receiver that is down fails the sync (the sender's to see).
        if let Ok(node) = self.remote[to].node() {
            trust_to_write(&node.vault, &sender)
                .map_err(|error| format!("remote {to}: trusting member {member}: {error}"))?;
        }
        let head = branch_head(&self.members[member].node()?.vault, "main")
            .and_then(|head| self.kept.get(&head).map(|tree| (head, tree.clone())));
        Ok(Operation::Sync {
            to,
            peer: self.remote[to].id,
            head,
        })
    }

    fn next_import(&mut self, branch: &str) -> Operation {
        let previous = self.branches.get(branch).map(|(_, tree)| tree.clone());
        Operation::Import {
            branch: branch.to_owned(),
            tree: crate::sites::next_tree(&mut self.rng, previous.as_ref()),
        }
    }

    /// A kept snapshot no branch's last acknowledged import left at its head.
    fn old_snapshot(&mut self) -> Option<Cid> {
        let heads: Vec<Cid> = self.branches.values().map(|(cid, _)| *cid).collect();
        let old: Vec<Cid> = self
            .kept
            .keys()
            .filter(|cid| !heads.contains(cid))
            .copied()
            .collect();
        (!old.is_empty()).then(|| old[self.pick(old.len())])
    }

    fn kept_snapshot(&mut self) -> Option<Cid> {
        let kept: Vec<Cid> = self.kept.keys().copied().collect();
        (!kept.is_empty()).then(|| kept[self.pick(kept.len())])
    }

    /// Takes the finished steps' outcomes into the oracle, in the order they started.
    async fn collect(&mut self) -> Result<(), String> {
        let mut index = 0;
        while index < self.running.len() {
            if !self.running[index].task.is_finished() {
                index += 1;
                continue;
            }
            let running = self.running.remove(index);
            let outcome = running
                .task
                .await
                .unwrap_or_else(|error| Outcome::Failed(format!("the step's task ended: {error}")));
            self.settle_outcome(running.member, running.operation, outcome)?;
        }
        Ok(())
    }

    fn settle_outcome(
        &mut self,
        member: usize,
        operation: Operation,
        outcome: Outcome,
    ) -> Result<(), String> {
        let what = describe(&operation);
        if member >= REMOTE_STEP {
            let at = member - REMOTE_STEP;
            match (operation, outcome) {
                (Operation::RemoteImport { tree, .. }, Outcome::Imported(snapshot)) => {
                    self.report.imports += 1;
                    self.log.note(format!(
                        "the second site's node {at}: {what}: {snapshot} acknowledged"
                    ));
                    self.remote_kept.insert(snapshot, tree.clone());
                    self.remote_head = Some((snapshot, tree));
                }
                (Operation::Follow { to, .. }, Outcome::Followed) => {
                    self.log
                        .note(format!("the second site's node {at}: {what}: following"));
                    self.following = Some((at, to));
                }
                (Operation::SyncBack { head, .. }, Outcome::Synced(summary)) => {
                    self.log
                        .note(format!("the second site's node {at}: {what}: {summary}"));
                    if let Some((snapshot, tree)) = head
                        && receiver_took_the_head(&summary)
                    {
                        self.synced_back.insert(snapshot, tree);
                    }
                }
                (_, Outcome::Failed(reason)) => {
                    self.log.note(format!(
                        "the second site's node {at}: {what} failed: {reason}"
                    ));
                }
                (operation, outcome) => {
                    return Err(format!(
                        "{} ended with an outcome of another step: {outcome:?}",
                        describe(&operation)
                    ));
                }
            }
            return Ok(());
        }
        match (operation, outcome) {
            (Operation::Import { branch, tree }, Outcome::Imported(snapshot)) => {
                self.report.imports += 1;
                self.log.note(format!(
                    "member {member}: {what}: {snapshot} acknowledged ({} files)",
                    tree.len()
                ));
                self.kept.insert(snapshot, tree.clone());
                self.branches.insert(branch, (snapshot, tree));
            }
            (Operation::Delete(snapshot), Outcome::Deleted) => {
                self.log.note(format!("member {member}: {what}: done"));
                self.kept.remove(&snapshot);
            }
            (Operation::Delete(snapshot), Outcome::Failed(reason)) => {
                // It may have been decided before the answer was lost: no longer required.
                self.log
                    .note(format!("member {member}: {what} failed: {reason}"));
                self.kept.remove(&snapshot);
            }
            (Operation::Export(snapshot), Outcome::Exported(found)) => {
                let Some(expected) = self.kept.get(&snapshot) else {
                    return Ok(());
                };
                if &found != expected {
                    return Err(format!(
                        "member {member} exported acknowledged snapshot {snapshot} with other contents: {}",
                        crate::sites::describe_difference(expected, &found)
                    ));
                }
                self.log
                    .note(format!("member {member}: {what}: byte-exact"));
            }
            (_, Outcome::Collected(epoch)) => {
                self.log
                    .note(format!("member {member}: {what}: swept (epoch {epoch})"));
            }
            (_, Outcome::Repaired { whole, summary }) => {
                if whole {
                    // A damaged shard counts no more once its member holds it intact
                    // again. Not every one a "whole" repair reports: it counts only the
                    // chunks of listed snapshots (seed 659422620: a chunk of an import not
                    // yet published kept its damage, and losing a node then left it
                    // short of k).
                    let members = &self.members;
                    self.damaged.retain(|chunk, shards| {
                        shards.retain(|(member, index)| {
                            let key = [chunk.as_slice(), &index.to_be_bytes()].concat();
                            members[*member]
                                .kv
                                .get(Column::Shards, &key)
                                .ok()
                                .flatten()
                                .is_none_or(|record| ShardRecord::decode(&record).is_err())
                        });
                        !shards.is_empty()
                    });
                }
                self.log.note(format!("member {member}: {what}: {summary}"));
            }
            (_, Outcome::Membership(nodes)) => {
                let members: Vec<String> = nodes
                    .iter()
                    .filter_map(|node| self.position_of_hex(node))
                    .map(|index| index.to_string())
                    .collect();
                self.log.note(format!(
                    "member {member}: {what}: the group is nodes {}",
                    members.join(", ")
                ));
            }
            (Operation::Sync { head, .. }, Outcome::Synced(summary)) => {
                self.log.note(format!("member {member}: {what}: {summary}"));
                // The head read as the step began, or a later one (the receiver then
                // holds it as an ancestor).
                if let Some((snapshot, tree)) = head
                    && receiver_took_the_head(&summary)
                {
                    self.synced.insert(snapshot, tree);
                }
            }
            (_, Outcome::Failed(reason)) => {
                self.log
                    .note(format!("member {member}: {what} failed: {reason}"));
            }
            (operation, outcome) => {
                return Err(format!(
                    "{} ended with an outcome of another step: {outcome:?}",
                    describe(&operation)
                ));
            }
        }
        Ok(())
    }

    async fn nemesis(&mut self) {
        let faults = self.config.faults;
        match self.rng.range(0, 4) {
            0 if faults.partitions => {
                if self.partitioned {
                    self.flapping = None;
                    self.network.heal();
                    self.partitioned = false;
                    self.log.note("healed");
                } else if self.config.remote_site && self.rng.chance(25) {
                    // The link between the sites down: each site whole, syncs failing.
                    let first: Vec<NodeId> = self.members.iter().map(|member| member.id).collect();
                    let second: Vec<NodeId> = self.remote.iter().map(|member| member.id).collect();
                    self.network.partition(&first, &second);
                    self.log.note("the sites cut apart");
                    self.partitioned = true;
                    self.report.faults += 1;
                } else {
                    let count = self.members.len();
                    let a = self.pick(count);
                    let b = (a + 1 + self.pick(count - 1)) % count;
                    let (cut, what) = match self.rng.range(0, 3) {
                        0 => (
                            crate::Cut::OneWay(self.members[a].id, self.members[b].id),
                            format!("partition {a}->{b} one way"),
                        ),
                        1 => (
                            crate::Cut::Apart(vec![self.members[a].id], vec![self.members[b].id]),
                            format!("partition {a}|{b}"),
                        ),
                        _ => {
                            let others: Vec<NodeId> = self
                                .members
                                .iter()
                                .filter(|member| member.index != a)
                                .map(|member| member.id)
                                .collect();
                            (
                                crate::Cut::Apart(vec![self.members[a].id], others),
                                format!("member {a} isolated"),
                            )
                        }
                    };
                    let (flapping, line) =
                        crate::make_partition(&self.network, &mut self.flap_rng, cut, what);
                    self.flapping = flapping;
                    self.log.note(line);
                    self.partitioned = true;
                    self.report.faults += 1;
                }
            }
            1 if faults.crashes => {
                let index = self.pick(self.members.len());
                let busy = self.running.iter().any(|running| running.member == index);
                if self.down_until.contains_key(&index)
                    || busy
                    || self.lost == Some(index)
                    || self.down_until.len() + usize::from(self.lost.is_some())
                        >= self.config.tolerated_down()
                {
                    return;
                }
                let mut surviving = usize::try_from(self.rng.range(0, 3)).unwrap_or(0);
                let mut lost_shards = Vec::new();
                if self.config.lying_disk == Some(index) {
                    // Its disk loses what it acknowledged since its last real flush: cut
                    // with a torn log that keeps the damage within budget, else not now.
                    let Some((within, lost)) = self.cut_within_budget(index, surviving) else {
                        return;
                    };
                    (surviving, lost_shards) = (within, lost);
                }
                self.members[index].crash(&self.network, surviving).await;
                for (chunk, shard) in &lost_shards {
                    self.damaged
                        .entry(chunk.clone())
                        .or_default()
                        .insert((index, *shard));
                }
                if !lost_shards.is_empty() {
                    self.log.note(format!(
                        "member {index}'s disk lost {} shards it had acknowledged",
                        lost_shards.len()
                    ));
                }
                let back =
                    tokio::time::Instant::now() + Duration::from_millis(self.rng.range(500, 8_000));
                self.down_until.insert(index, back);
                self.report.faults += 1;
                self.log.note(format!(
                    "member {index} crashed ({surviving} unsynced batches survive)"
                ));
            }
            2 if faults.disk => self.damage_shard(),
            // A node lost for good, once per run, within the crash budget.
            // (Only with no damage since the last whole repair: its shards count as bad.)
            3 if faults.crashes
                && self.lost.is_none()
                && self.damaged.is_empty()
                && self.rng.chance(20) =>
            {
                let index = self.pick(self.members.len());
                let busy = self.running.iter().any(|running| running.member == index);
                if self.down_until.contains_key(&index)
                    || busy
                    || self.down_until.len() + 1 > self.config.tolerated_down()
                {
                    return;
                }
                self.members[index].crash(&self.network, 0).await;
                self.lost = Some(index);
                self.report.faults += 1;
                self.log
                    .note(format!("node {index} lost for good (its disks gone)"));
            }
            _ => {}
        }
    }

    /// For a power cut of member `index`, whose disk ignores fsyncs: the shortest torn
    /// log, at least `surviving` batches, whose losses fit the damage budget (the worst
    /// such a drive may do within it), and the shards (chunk, index) the cut loses;
    /// `None` when even the whole log would put a chunk past the budget (its unlogged
    /// writes are lost whatever survives).
    fn cut_within_budget(&self, index: usize, surviving: usize) -> Option<(usize, Vec<LostShard>)> {
        let kv = &self.members[index].kv;
        let now = kv.scan(Column::Shards, &[], None, usize::MAX).ok()?;
        let budget = self.config.parity_shards as usize - usize::from(self.lost.is_some());
        let losses = |candidate: usize| -> Option<Vec<LostShard>> {
            let disk = kv.fork().power_cut(candidate);
            let lost: Vec<LostShard> = now
                .iter()
                .filter(|(key, value)| {
                    disk.get(Column::Shards, key).ok().flatten().as_ref() != Some(value)
                })
                .filter_map(|(key, _)| match (key.get(..32), key.get(32..34)) {
                    (Some(chunk), Some(&[high, low])) => {
                        Some((chunk.to_vec(), u16::from_be_bytes([high, low])))
                    }
                    _ => None,
                })
                .collect();
            let mut bad = self.damaged.clone();
            for (chunk, shard) in &lost {
                bad.entry(chunk.clone())
                    .or_default()
                    .insert((index, *shard));
            }
            bad.values()
                .all(|shards| shards.len() <= budget)
                .then_some(lost)
        };
        // Fewer surviving batches lose more: search the fewest that stay within budget.
        let (mut low, mut high) = (surviving, usize::MAX);
        let mut best = (high, losses(high)?);
        while low < high {
            let middle = low + (high - low) / 2;
            match losses(middle) {
                Some(lost) => {
                    best = (middle, lost);
                    high = middle;
                }
                None => low = middle + 1,
            }
        }
        Some(best)
    }

    /// Flips a byte of one shard at rest on one member, keeping every chunk within m bad
    /// shards since the last whole repair.
    fn damage_shard(&mut self) {
        let index = self.pick(self.members.len());
        let kv = self.members[index].kv.clone();
        let Ok(shards) = kv.scan(Column::Shards, &[], None, usize::MAX) else {
            return;
        };
        if shards.is_empty() {
            return;
        }
        let (key, mut value) = shards[self.pick(shards.len())].clone();
        let (Some(chunk), Some(&[high, low])) = (key.get(..32), key.get(32..34)) else {
            return;
        };
        let shard = u16::from_be_bytes([high, low]);
        // A node lost for good took one shard of every chunk with it: one less to damage.
        let budget = self.config.parity_shards as usize - usize::from(self.lost.is_some());
        // A shard missing from the member placement names now is as bad as a damaged
        // one: a chunk whose members changed while it was published may be one short
        // until its shards are placed again (or a repair does so).
        let bad = self
            .damaged
            .get(chunk)
            .map_or(0, BTreeSet::len)
            .max(self.shards_missing_from_placement(chunk));
        if bad >= budget || value.is_empty() {
            return;
        }
        let at = self.pick(value.len());
        value[at] ^= 0x40;
        let chunk = chunk.to_vec();
        let mut batch = WriteBatch::new();
        batch.put(Column::Shards, key, value);
        if kv.write(batch, Durability::Synced).is_ok() {
            self.damaged
                .entry(chunk)
                .or_default()
                .insert((index, shard));
            self.report.faults += 1;
            self.log.note(format!(
                "member {index}: shard {shard} of a chunk damaged at rest"
            ));
        }
    }

    /// How many of `chunk`'s shards the member that placement names for each (the group's
    /// members as the first running member has them) does not hold intact: all of them
    /// when no member can say.
    fn shards_missing_from_placement(&self, chunk: &[u8]) -> usize {
        let width = self.config.width();
        let Ok(cid) = <[u8; 32]>::try_from(chunk).map(Cid::from_bytes) else {
            return width;
        };
        let record = self
            .members
            .iter()
            .filter_map(|member| member.running.as_ref())
            .find_map(|node| node.cluster.groups().ok())
            .and_then(|groups| {
                groups
                    .into_iter()
                    .find(|(name, _)| name == GROUP)
                    .map(|(_, record)| record)
            });
        let Some(record) = record else {
            return width;
        };
        let nodes: Vec<NodeId> = record
            .nodes
            .iter()
            .map(|node| NodeId::from_bytes(*node))
            .collect();
        let owners = forge_store::placement::place_shards(&cid, width, &nodes);
        owners
            .iter()
            .enumerate()
            .filter(|(index, owner)| {
                let Some(member) = self.members.iter().find(|member| member.id == **owner) else {
                    return true;
                };
                let Ok(index16) = u16::try_from(*index) else {
                    return true;
                };
                let mut key = chunk.to_vec();
                key.extend_from_slice(&index16.to_be_bytes());
                !member
                    .kv
                    .get(Column::Shards, &key)
                    .ok()
                    .flatten()
                    .is_some_and(|value| {
                        ShardRecord::decode(&value).is_ok_and(|record| record.index.get() == *index)
                    })
            })
            .count()
    }

    /// Everything back: partitions healed, per-message faults off, crashed members
    /// restarted; the steps in progress must then end within a bound.
    async fn heal(&mut self) -> Result<(), String> {
        forge_store::faults::points::calm();
        for pick in std::mem::take(&mut self.slow_disks) {
            let (node, _) = self.machine(pick);
            node.kv.set_slow(None);
            node.raft_kv.set_slow(None);
        }
        self.flapping = None;
        self.network.heal();
        self.partitioned = false;
        self.network.set_faults(FaultPlan::NONE);
        let indexes: Vec<usize> = self.down_until.keys().copied().collect();
        for index in indexes {
            self.down_until.remove(&index);
            self.network.restart(self.members[index].id);
            self.members[index].start(self.seed)?;
        }
        let remote: Vec<usize> = self.remote_down_until.keys().copied().collect();
        for index in remote {
            self.restart_remote(index)?;
        }
        self.log.note("healed: every member up, no faults");
        let deadline = tokio::time::Instant::now() + OPERATION_BOUND_AFTER_HEAL;
        while let Some(running) = self
            .running
            .iter()
            .find(|running| !running.task.is_finished())
        {
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "member {}'s {} (started {} ms in) still runs {} s (simulated) after heal",
                    running.member,
                    describe(&running.operation),
                    (running.started - self.log.started).as_millis(),
                    OPERATION_BOUND_AFTER_HEAL.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.collect().await
    }

    async fn check(&mut self) -> Result<(), String> {
        self.check_replicas()?;
        self.replace_lost().await?;
        let group = self.finish_removals().await?;
        let Some(&coordinator) = group.first() else {
            return Err("the group has no members left".into());
        };
        let cluster = self.members[coordinator].node()?.cluster.clone();
        // Liveness: repair makes every chunk whole within the bound.
        let within = format!(
            "within {} s (simulated) of heal",
            SETTLE_AFTER_HEAL.as_secs()
        );
        let repaired = self
            .repair_makes_whole(
                &cluster,
                &format!("repair did not make every chunk whole {within}"),
            )
            .await
            .map_err(|reason| {
                format!("{reason}; {}; {}", self.shards_not_whole(), self.diagnose())
            })?;
        self.log.note(format!("repair: {repaired}"));
        self.log.note("repair reports every chunk whole");
        // Garbage from failed imports and deleted snapshots goes; nothing reachable may.
        gc_succeeds(&cluster, &format!("group gc did not succeed {within}")).await?;
        self.log.note("group gc swept");
        // The members again, as every node has them now (a change may have gone in
        // with its answer lost, and a repair in the background moved shards for it).
        let (group, _) = self.agreed_membership().await?;
        self.check_placement(&group)?;
        self.log
            .note("every chunk's k+m shards are intact on the members placement names");
        // Every member agrees on the branches, each at least where its last acknowledged
        // import left it (a later import whose answer was lost may have moved it on).
        let mut heads: Option<Vec<(String, Cid)>> = None;
        for member in group.iter().map(|index| &self.members[*index]) {
            let vault = member.node()?.vault.clone();
            let expected = heads.clone();
            let branches = settle("reading the branches", || {
                let (vault, expected) = (vault.clone(), expected.clone());
                async move {
                    let branches = vault.branches(VOLUME).map_err(|error| error.to_string())?;
                    // The mirror catches up on its watch loop's next pass.
                    match &expected {
                        Some(expected) if *expected != branches => Err(format!(
                            "{branches:?} where another member has {expected:?}"
                        )),
                        _ => Ok(branches),
                    }
                }
            })
            .await
            .map_err(|reason| format!("member {}: {reason}", member.index))?;
            heads.get_or_insert(branches);
        }
        let heads = heads.unwrap_or_default();
        for (branch, (snapshot, _)) in &self.branches {
            if !heads.iter().any(|(name, _)| name == branch) {
                return Err(format!(
                    "branch {branch} is gone, though an import onto it was acknowledged ({snapshot})"
                ));
            }
        }
        // Every acknowledged snapshot restores byte-exact on every member.
        for member in group.iter().map(|index| &self.members[*index]) {
            let vault = member.node()?.vault.clone();
            for (snapshot, tree) in &self.kept {
                export_matches(member.index, &vault, *snapshot, tree, &self.scratch)
                    .await
                    .map_err(|reason| format!("acknowledged snapshot {snapshot}: {reason}"))?;
            }
        }
        self.log.note(format!(
            "every acknowledged snapshot ({}) restores byte-exact on every member",
            self.kept.len()
        ));
        if self.config.remote_site {
            let head = heads
                .iter()
                .find(|(branch, _)| branch == "main")
                .map(|(_, head)| *head);
            self.check_remote(coordinator, head).await?;
            self.check_sync_back(&group).await?;
        }
        Ok(())
    }

    /// Following after heal: the node of the second site that follows `main` at a member
    /// of the first has it at the first site's head, by the member's announcements alone
    /// (before any last sync). Not checked when that member left the group (it mirrors
    /// the group's records no more, so it announces a stale head).
    async fn check_following(&mut self, head: Cid) -> Result<(), String> {
        let Some((at, to)) = self.following else {
            return Ok(());
        };
        let (group, _) = self.membership().await;
        if !group.contains(&to) {
            self.log.note(format!(
                "the followed member {to} left the group: following not checked"
            ));
            return Ok(());
        }
        if self.config.lying_disk == Some(to) {
            // Its disk loses acknowledged writes in a power cut: the record that the node
            // follows it too (and its announcement floor), after which it announces
            // nothing (seed 61848970). Within that fault's terms, so not checked.
            self.log.note(format!(
                "the followed member {to} has a disk that ignores fsyncs: following not checked"
            ));
            return Ok(());
        }
        self.trust_for_follow(at, to)?;
        branch_reaches(
            &self.remote[at].node()?.vault,
            "main",
            head,
            &format!(
                "the second site's node {at}, following main at member {to}, did not reach {head} within {} s (simulated) of heal",
                SETTLE_AFTER_HEAL.as_secs()
            ),
        )
        .await?;
        self.log.note(format!(
            "the second site's node {at} follows main at member {to}: it reached {head}"
        ));
        Ok(())
    }

    /// The first site after heal, for the second site's branch: a last sync back from the
    /// second site converges (every member of the first site's group has the branch at
    /// the head sent), and every head a sync back acknowledged restores byte-exact on
    /// each member. Nothing to check while the second site imported nothing.
    async fn check_sync_back(&mut self, group: &[usize]) -> Result<(), String> {
        let sender = self.remote[0].node()?;
        let (vault, volumes) = (
            sender.vault.clone(),
            sender
                .volumes
                .clone()
                .ok_or("the second site's nodes serve no syncs")?,
        );
        let Some(head) = branch_head(&vault, REMOTE_BRANCH) else {
            return Ok(());
        };
        let within = format!(
            "within {} s (simulated) of heal",
            SETTLE_AFTER_HEAL.as_secs()
        );
        let Some(&receiver) = group.first() else {
            return Ok(());
        };
        let remote_ids: Vec<NodeId> = self.remote.iter().map(|node| node.id).collect();
        for index in group {
            let vault = self.members[*index].node()?.vault.clone();
            for id in &remote_ids {
                trust_to_write(&vault, id).map_err(|error| {
                    format!("member {index}: trusting the second site: {error}")
                })?;
            }
        }
        let peer = self.members[receiver].id;
        let summary = settle_within(
            &format!("a last sync back to the first site did not succeed {within}"),
            SETTLE_AFTER_HEAL,
            Duration::from_secs(2),
            || sync_to(&volumes, peer, REMOTE_BRANCH),
        )
        .await?;
        self.log
            .note(format!("last sync back to the first site: {summary:?}"));
        let tree = tree_of(
            vault,
            head,
            self.remote_kept.get(&head),
            &self.scratch,
            "the second site's node 0",
        )
        .await?;
        let mut expected = self.synced_back.clone();
        expected.insert(head, tree);
        for index in group {
            let vault = self.members[*index].node()?.vault.clone();
            branch_reaches(
                &vault,
                REMOTE_BRANCH,
                head,
                &format!("member {index} did not see {REMOTE_BRANCH} at {head} {within}"),
            )
            .await?;
            for (snapshot, tree) in &expected {
                export_matches(*index, &vault, *snapshot, tree, &self.scratch)
                    .await
                    .map_err(|reason| {
                        format!("member {index}, snapshot {snapshot} synced back: {reason}")
                    })?;
            }
        }
        self.log.note(format!(
            "the first site holds {REMOTE_BRANCH} at {head} and {} synced-back snapshot(s) byte-exact on every member",
            expected.len()
        ));
        Ok(())
    }

    /// The second site after heal: a last sync from the first converges (its group's
    /// `main` is the first's), every head a sync acknowledged restores byte-exact on each
    /// of its nodes, its repair finds every chunk whole, and its replicas agree.
    async fn check_remote(&mut self, sender: usize, head: Option<Cid>) -> Result<(), String> {
        let Some(head) = head else {
            return Ok(());
        };
        let within = format!(
            "within {} s (simulated) of heal",
            SETTLE_AFTER_HEAL.as_secs()
        );
        let volumes = self.members[sender]
            .node()?
            .volumes
            .clone()
            .ok_or("the first site's members serve no syncs")?;
        self.check_following(head).await?;
        let peer = self.remote[0].id;
        let (receiver, sender_id) = (
            self.remote[0].node()?.vault.clone(),
            self.members[sender].id,
        );
        let summary = settle_within(
            &format!("a last sync to the second site did not succeed {within}"),
            SETTLE_AFTER_HEAL,
            Duration::from_secs(2),
            || {
                // As the operator is told to when the receiver refuses: once the
                // receiver holds the volume (its group may have taken it from an earlier
                // sync), the sender is trusted to write it.
                let _ = trust_to_write(&receiver, &sender_id);
                sync_to(&volumes, peer, "main")
            },
        )
        .await?;
        self.log
            .note(format!("last sync to the second site: {summary:?}"));
        // The tree of the head: acknowledged (the oracle's), or as the first site exports it.
        let tree = tree_of(
            self.members[sender].node()?.vault.clone(),
            head,
            self.kept.get(&head),
            &self.scratch,
            &format!("member {sender}"),
        )
        .await?;
        let mut expected = self.synced.clone();
        expected.insert(head, tree);
        for (to, receiver) in self.remote.iter().enumerate() {
            let vault = receiver.node()?.vault.clone();
            branch_reaches(
                &vault,
                "main",
                head,
                &format!("the second site's node {to} did not see main at {head} {within}"),
            )
            .await?;
            for (snapshot, tree) in &expected {
                export_matches(100 + to, &vault, *snapshot, tree, &self.scratch)
                    .await
                    .map_err(|reason| {
                        format!("the second site's node {to}, synced snapshot {snapshot}: {reason}")
                    })?;
            }
        }
        let cluster = self.remote[0].node()?.cluster.clone();
        let repaired = self
            .repair_makes_whole(
                &cluster,
                &format!("the second site's repair did not make every chunk whole {within}"),
            )
            .await?;
        // Its gc too: a sync abandoned mid-way (its sender timed out) held a session, and
        // with it a pin, until the receiver ended it as idle.
        gc_succeeds(
            &cluster,
            &format!("the second site's group gc did not succeed {within}"),
        )
        .await?;
        replicas_agree(&self.remote, "the second site's nodes")?;
        self.log.note(format!(
            "the second site holds main at {head} and {} synced snapshot(s) byte-exact, and its gc swept; its repair: {repaired}",
            expected.len()
        ));
        Ok(())
    }

    /// Repairs the group through `cluster` until every member answers and holds all
    /// k+m shards of every chunk, within the bound after heal; `failure` says what did
    /// not happen. What the last repair reported.
    async fn repair_makes_whole(
        &self,
        cluster: &ClusterNode,
        failure: &str,
    ) -> Result<String, String> {
        settle_within(
            failure,
            SETTLE_AFTER_HEAL,
            Duration::from_secs(2),
            || async {
                let reply = cluster
                    .repair_group(GROUP)
                    .await
                    .map_err(|error| error.to_string())?;
                let width = u64::from(reply.data_shards + reply.parity_shards);
                let failed: Vec<&str> = reply
                    .members
                    .iter()
                    .map(|member| member.error.as_str())
                    .filter(|error| !error.is_empty())
                    .collect();
                if failed.is_empty() && reply.shards_held == reply.chunks * width {
                    Ok(self.describe_repair(&reply))
                } else {
                    Err(format!(
                        "{} of {} shards held ({}), errors: {failed:?}",
                        reply.shards_held,
                        reply.chunks * width,
                        self.describe_repair(&reply)
                    ))
                }
            },
        )
        .await
    }

    /// The node at position `hex` (a NodeId in hex) among the cluster's nodes.
    fn position_of_hex(&self, hex: &str) -> Option<usize> {
        self.members
            .iter()
            .position(|member| member.id.to_hex() == hex)
    }

    /// The group's members and retiring members (node positions), as the first node up
    /// has the cluster's record applied.
    async fn membership(&self) -> (Vec<usize>, Vec<usize>) {
        for member in &self.members {
            let Some(node) = &member.running else {
                continue;
            };
            let Ok(status) = node.cluster.status().await else {
                continue;
            };
            let Some(info) = status.groups.iter().find(|group| group.name == GROUP) else {
                continue;
            };
            let positions = |nodes: &[String]| -> Vec<usize> {
                nodes
                    .iter()
                    .filter_map(|node| self.position_of_hex(node))
                    .collect()
            };
            return (positions(&info.nodes), positions(&info.retiring));
        }
        ((0..self.config.nodes).collect(), Vec::new())
    }

    /// The group's members and retiring members once every node up has applied the same
    /// record of it (one node's view may lag a change just made).
    async fn agreed_membership(&self) -> Result<(Vec<usize>, Vec<usize>), String> {
        settle("agreeing on the group's members", || async {
            let mut seen: Option<(Vec<String>, Vec<String>)> = None;
            for member in &self.members {
                let Some(node) = &member.running else {
                    continue;
                };
                let status = node
                    .cluster
                    .status()
                    .await
                    .map_err(|error| error.to_string())?;
                let info = status
                    .groups
                    .iter()
                    .find(|group| group.name == GROUP)
                    .ok_or_else(|| format!("node {} does not know the group", member.index))?;
                let view = (info.nodes.clone(), info.retiring.clone());
                match &seen {
                    Some(first) if *first != view => {
                        return Err(format!("node {} has another view", member.index));
                    }
                    Some(_) => {}
                    None => seen = Some(view),
                }
            }
            let (nodes, retiring) = seen.ok_or("no node is up")?;
            let positions = |nodes: &[String]| -> Vec<usize> {
                nodes
                    .iter()
                    .filter_map(|node| self.position_of_hex(node))
                    .collect()
            };
            Ok((positions(&nodes), positions(&retiring)))
        })
        .await
    }

    /// Liveness after heal: a node lost for good leaves the group (the spare added first
    /// when the layout needs every member), its shards rebuilt on the others.
    async fn replace_lost(&self) -> Result<(), String> {
        let Some(lost) = self.lost else {
            return Ok(());
        };
        let replaced = settle_within(
            &format!(
                "lost node {lost} was not replaced within {} s (simulated) of heal",
                SETTLE_AFTER_HEAL.as_secs()
            ),
            SETTLE_AFTER_HEAL,
            Duration::from_secs(2),
            || async {
                let (group, retiring) = self.agreed_membership().await?;
                if !group.contains(&lost) && !retiring.contains(&lost) {
                    self.log.note(format!("node {lost} is out of the group"));
                    return Ok(());
                }
                let Some(&asker) = group.iter().find(|index| **index != lost) else {
                    return Err("the group has no members but the lost node".into());
                };
                let cluster = self.members[asker].node()?.cluster.clone();
                let spare =
                    (0..self.members.len()).find(|index| !group.contains(index) && *index != lost);
                let outcome = match spare {
                    Some(spare) if group.len() - 1 < self.config.width() => cluster
                        .add_group_node(GROUP, self.members[spare].id)
                        .await
                        .map(|_| format!("node {spare} added")),
                    _ => cluster
                        .remove_group_node(GROUP, self.members[lost].id)
                        .await
                        .map(|_| format!("node {lost} removed")),
                };
                self.log.note(format!(
                    "member {asker}: replacing lost node {lost}: {}",
                    outcome
                        .as_ref()
                        .map_or_else(ToString::to_string, Clone::clone)
                ));
                // A step done: look again (the lost node may be in the group still).
                outcome.map_err(|error| error.to_string())?;
                Err("a step of the replacement done".into())
            },
        )
        .await;
        match replaced {
            Ok(()) => Ok(()),
            Err(reason) => Err(format!("{reason}; {}", self.explain_stuck().await)),
        }
    }

    /// Liveness after heal: a removal left unfinished (a member was down) finishes when
    /// asked again. Returns the group's members then.
    async fn finish_removals(&self) -> Result<Vec<usize>, String> {
        let finished = settle_within(
            &format!(
                "a removal did not finish within {} s (simulated) of heal",
                SETTLE_AFTER_HEAL.as_secs()
            ),
            SETTLE_AFTER_HEAL,
            Duration::from_secs(2),
            || async {
                let (group, retiring) = self.agreed_membership().await?;
                let Some(&index) = retiring.first() else {
                    return Ok(group);
                };
                let Some(&asker) = group.first() else {
                    return Err("the group has no members left".into());
                };
                let cluster = self.members[asker].node()?.cluster.clone();
                let outcome = cluster
                    .remove_group_node(GROUP, self.members[index].id)
                    .await;
                self.log.note(format!(
                    "member {asker}: finishing the removal of node {index}: {}",
                    outcome
                        .as_ref()
                        .map_or_else(ToString::to_string, |_| "done".to_owned())
                ));
                outcome.map_err(|error| error.to_string())?;
                Err(format!("node {index} removed: looking again"))
            },
        )
        .await;
        match finished {
            Ok(group) => Ok(group),
            Err(reason) => Err(format!("{reason}; {}", self.explain_stuck().await)),
        }
    }

    /// Why a membership change cannot finish, for a failure's report: what each member's
    /// repair says now (a member failing shows its reason), which chunks are short of
    /// shards on the disks, and what each member holds.
    async fn explain_stuck(&self) -> String {
        let asker = self
            .members
            .iter()
            .find(|member| member.running.is_some() && self.lost != Some(member.index));
        let repair = match asker.map(Member::node) {
            Some(Ok(node)) => match node.cluster.repair_group(GROUP).await {
                Ok(reply) => format!("repair now: {}", self.describe_repair(&reply)),
                Err(error) => format!("repair now: {error}"),
            },
            _ => "no member up to repair".to_owned(),
        };
        format!("{repair}; {}; {}", self.shards_not_whole(), self.diagnose())
    }

    /// Each member's part of a group repair, named by node position.
    fn describe_repair(&self, reply: &forge_proto::v1::RepairGroupReply) -> String {
        reply
            .members
            .iter()
            .map(|member| {
                let position = self
                    .position_of_hex(&member.node_id)
                    .map_or_else(|| member.node_id.clone(), |index| index.to_string());
                if !member.error.is_empty() {
                    return format!("{position}: failed: {}", member.error);
                }
                format!(
                    "{position}: {} chunks, {} held, {} rebuilt, {} released, {} in backlog",
                    member.chunks, member.held, member.rebuilt, member.released, member.backlog
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// What each member holds, for a failure's report: its snapshots of the volume and
    /// each Raft group's applied index.
    fn diagnose(&self) -> String {
        let mut lines = Vec::new();
        for member in &self.members {
            let Some(node) = &member.running else {
                lines.push(format!("member {}: down", member.index));
                continue;
            };
            let snapshots = node
                .vault
                .list_snapshots(VOLUME, &no_passphrase)
                .map(|listed| listed.len().to_string())
                .unwrap_or_else(|error| error.to_string());
            let applied: Vec<String> = node
                .cluster
                .replica_states()
                .map(|states| {
                    states
                        .iter()
                        .map(|(group, state)| format!("group {group} at {:?}", state.0))
                        .collect()
                })
                .unwrap_or_default();
            lines.push(format!(
                "member {} ({}): {snapshots} snapshots listed, {}",
                member.index,
                &member.id.to_hex()[..8],
                applied.join(", ")
            ));
        }
        lines.join("; ")
    }

    /// The chunks not whole on the disks of the nodes still running (the lost node's
    /// counted as gone): which shard each member holds intact or damaged. A failure that
    /// repair cannot mend shows here whether the data was still recoverable.
    fn shards_not_whole(&self) -> String {
        let width = self.config.width();
        let mut held: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
        let mut intact: BTreeMap<Vec<u8>, BTreeSet<usize>> = BTreeMap::new();
        for member in &self.members {
            if self.lost == Some(member.index) {
                continue;
            }
            let Ok(records) = member.kv.scan(Column::Shards, &[], None, usize::MAX) else {
                continue;
            };
            for (key, value) in records {
                let (Some(chunk), Some(&[high, low])) = (key.get(..32), key.get(32..34)) else {
                    continue;
                };
                let index = usize::from(u16::from_be_bytes([high, low]));
                let whole =
                    ShardRecord::decode(&value).is_ok_and(|record| record.index.get() == index);
                if whole {
                    intact.entry(chunk.to_vec()).or_default().insert(index);
                }
                held.entry(chunk.to_vec()).or_default().push(format!(
                    "{index}@{}{}",
                    member.index,
                    if whole { "" } else { " (damaged)" }
                ));
            }
        }
        let short: Vec<String> = held
            .iter()
            .filter(|(chunk, _)| intact.get(*chunk).map_or(0, BTreeSet::len) < width)
            .map(|(chunk, shards)| {
                let prefix: String = chunk
                    .iter()
                    .take(4)
                    .map(|byte| format!("{byte:02x}"))
                    .collect();
                format!("{prefix}: {}", shards.join(", "))
            })
            .collect();
        if short.is_empty() {
            "every chunk has all its shards intact somewhere".into()
        } else {
            format!(
                "chunks short of shards (shard@member): {}",
                short.join("; ")
            )
        }
    }

    /// Repair's own report aside: every chunk of the group any member holds a shard of has
    /// each of its k+m shards intact (its record decodes, checksum and index) on the member placement
    /// names for it.
    fn check_placement(&self, group: &[usize]) -> Result<(), String> {
        let nodes: Vec<NodeId> = group.iter().map(|index| self.members[*index].id).collect();
        let width = self.config.width();
        let mut intact: BTreeSet<(Vec<u8>, usize, usize)> = BTreeSet::new();
        let mut chunks: BTreeSet<Vec<u8>> = BTreeSet::new();
        // A node out of the group keeps what it held (nothing sweeps it): only members'
        // disks name the chunks the group must hold. And only chunks some member marks as
        // the group's: a write a crash cut off before its publish (a sync being received)
        // leaves its chunks whole on that member, unmarked, for the vault's own gc.
        let grouped = |chunk: &[u8]| {
            let key = [b"grouped/".as_slice(), chunk].concat();
            group.iter().any(|index| {
                self.members[*index]
                    .kv
                    .get(Column::Meta, &key)
                    .ok()
                    .flatten()
                    .is_some()
            })
        };
        for member in group.iter().map(|index| &self.members[*index]) {
            let records = member
                .kv
                .scan(Column::Shards, &[], None, usize::MAX)
                .map_err(|error| error.to_string())?;
            for (key, value) in records {
                let (Some(chunk), Some(&[high, low])) = (key.get(..32), key.get(32..34)) else {
                    continue;
                };
                let index = usize::from(u16::from_be_bytes([high, low]));
                if !chunks.contains(chunk) && !grouped(chunk) {
                    continue;
                }
                chunks.insert(chunk.to_vec());
                if ShardRecord::decode(&value).is_ok_and(|record| record.index.get() == index) {
                    intact.insert((chunk.to_vec(), index, member.index));
                }
            }
        }
        for chunk in &chunks {
            let cid = Cid::from_slice(chunk).map_err(|error| error.to_string())?;
            let owners = forge_store::placement::place_shards(&cid, width, &nodes);
            for (index, owner) in owners.iter().enumerate() {
                let Some(holder) = self.members.iter().position(|member| member.id == *owner)
                else {
                    return Err(format!(
                        "placement named a node outside the group for {cid}"
                    ));
                };
                if !intact.contains(&(chunk.clone(), index, holder)) {
                    let held: Vec<String> = intact
                        .iter()
                        .filter(|(held, _, _)| held == chunk)
                        .map(|(_, index, member)| format!("shard {index} on member {member}"))
                        .collect();
                    return Err(format!(
                        "chunk {cid}: member {holder}, placed to hold shard {index}, has no intact copy of it after repair reported every chunk whole (intact: {})",
                        held.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Stops every member (the run is over).
    async fn stop(&mut self) {
        for running in self.running.drain(..) {
            running.task.abort();
        }
        for member in self.members.iter_mut().chain(&mut self.remote) {
            if let Some(node) = member.running.take() {
                if let Some(volumes) = &node.volumes {
                    volumes.stop();
                }
                node.cluster.shutdown().await;
            }
        }
    }
}

fn describe(operation: &Operation) -> String {
    match operation {
        Operation::Import { branch, .. } => format!("import onto {branch}"),
        Operation::Delete(snapshot) => format!("delete of snapshot {snapshot}"),
        Operation::Export(snapshot) => format!("export of snapshot {snapshot}"),
        Operation::Gc => "group gc".into(),
        Operation::Repair => "group repair".into(),
        Operation::AddMember(index, _) => format!("adding node {index} to the group"),
        Operation::RemoveMember(index, _) => format!("removing node {index} from the group"),
        Operation::Sync { to, .. } => format!("sync of main to the second site's node {to}"),
        Operation::RemoteImport { .. } => format!("import onto {REMOTE_BRANCH}"),
        Operation::SyncBack { to, .. } => format!("sync of {REMOTE_BRANCH} back to member {to}"),
        Operation::Follow { to, .. } => format!("following main at member {to}"),
    }
}

/// Runs one step on a member.
fn perform(
    node: &Node,
    operation: Operation,
    scratch: PathBuf,
) -> impl std::future::Future<Output = Outcome> + use<> {
    let (vault, cluster, volumes) = (
        node.vault.clone(),
        node.cluster.clone(),
        node.volumes.clone(),
    );
    async move { perform_on(vault, cluster, volumes, operation, scratch).await }
}

async fn perform_on(
    vault: Arc<Vault>,
    cluster: Arc<ClusterNode>,
    volumes: Option<Volumes>,
    operation: Operation,
    scratch: PathBuf,
) -> Outcome {
    let outcome = match operation {
        Operation::Import { branch, tree } => {
            let source = scratch.join("source");
            if let Err(reason) = crate::sites::write_tree(&source, &tree) {
                return Outcome::Failed(reason);
            }
            forge_node::lockstep::run(move || {
                vault
                    .import(
                        VOLUME,
                        &source,
                        &ImportOptions {
                            message: String::new(),
                            branch,
                            dna: BTreeMap::new(),
                            atime: false,
                        },
                        &no_passphrase,
                        &Progress::new("import", false),
                    )
                    .map(|report| Outcome::Imported(report.snapshot))
                    .map_err(|error| error.to_string())
            })
            .await
        }
        Operation::Delete(snapshot) => forge_node::lockstep::run(move || {
            vault
                .delete_snapshot(VOLUME, &snapshot.to_hex())
                .map(|_| Outcome::Deleted)
                .map_err(|error| error.to_string())
        })
        .await,
        Operation::Export(snapshot) => export_tree(vault, snapshot, scratch.join("out"))
            .await
            .map(Outcome::Exported),
        Operation::Gc => cluster
            .group_gc(GROUP)
            .await
            .map(|reply| Outcome::Collected(reply.epoch))
            .map_err(|error| error.to_string()),
        Operation::AddMember(_, node) => cluster
            .add_group_node(GROUP, node)
            .await
            .map(|info| Outcome::Membership(info.nodes))
            .map_err(|error| error.to_string()),
        Operation::RemoveMember(_, node) => cluster
            .remove_group_node(GROUP, node)
            .await
            .map(|info| Outcome::Membership(info.nodes))
            .map_err(|error| error.to_string()),
        Operation::Repair => cluster
            .repair_group(GROUP)
            .await
            .map(|reply| {
                let width = u64::from(reply.data_shards + reply.parity_shards);
                let errors = reply
                    .members
                    .iter()
                    .filter(|member| !member.error.is_empty())
                    .count();
                Outcome::Repaired {
                    whole: errors == 0 && reply.shards_held == reply.chunks * width,
                    summary: format!(
                        "{} of {} shards held by their owners, {} rebuilt, {errors} members not answering",
                        reply.shards_held,
                        reply.chunks * width,
                        reply.members.iter().map(|member| member.rebuilt).sum::<u64>()
                    ),
                }
            })
            .map_err(|error| error.to_string()),
        Operation::Sync { peer, .. } => match volumes {
            Some(volumes) => sync_to(&volumes, peer, "main").await,
            None => Err("this member serves no volume syncs".to_owned()),
        },
        Operation::SyncBack { peer, .. } => match volumes {
            Some(volumes) => sync_to(&volumes, peer, REMOTE_BRANCH).await,
            None => Err("this node serves no volume syncs".to_owned()),
        },
        Operation::Follow { peer, .. } => match volumes {
            Some(volumes) => follow_main(&vault, &volumes, peer).await,
            None => Err("this node serves no volume syncs".to_owned()),
        },
        Operation::RemoteImport { .. } => {
            Err("an import of the second site runs as an import onto its branch".to_owned())
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    outcome.unwrap_or_else(Outcome::Failed)
}

/// The head of `branch` of the volume on `vault`, if it has one.
fn branch_head(vault: &Vault, branch: &str) -> Option<Cid> {
    vault
        .branches(VOLUME)
        .ok()?
        .into_iter()
        .find(|(name, _)| name == branch)
        .map(|(_, head)| head)
}

/// Waits, within the bound after heal, until `vault` has `branch` at `head`; `failure`
/// says what did not happen.
async fn branch_reaches(
    vault: &Arc<Vault>,
    branch: &'static str,
    head: Cid,
    failure: &str,
) -> Result<(), String> {
    settle_within(failure, SETTLE_AFTER_HEAL, Duration::from_secs(1), || {
        let vault = vault.clone();
        async move {
            match branch_head(&vault, branch) {
                Some(found) if found == head => Ok(()),
                other => Err(format!("{branch} at {other:?}")),
            }
        }
    })
    .await
}

/// The tree of snapshot `head`: the oracle's (`known`), else as `vault` exports it
/// (`who` names that node in an error).
async fn tree_of(
    vault: Arc<Vault>,
    head: Cid,
    known: Option<&Tree>,
    scratch: &Path,
    who: &str,
) -> Result<Tree, String> {
    if let Some(tree) = known {
        return Ok(tree.clone());
    }
    let out = scratch.join("head");
    let tree = export_tree(vault, head, out.clone())
        .await
        .map_err(|error| format!("{who}: exporting the head {head}: {error}"))?;
    let _ = std::fs::remove_dir_all(&out);
    Ok(tree)
}

/// Lets `peer` write the volume on `vault` once `vault` holds it (the operator's `forge
/// peer trust PEER --volume data --write`).
fn trust_to_write(vault: &Vault, peer: &NodeId) -> Result<(), String> {
    if vault
        .volume_record(VOLUME)
        .map_err(|error| error.to_string())?
        .is_some()
    {
        vault
            .trust_peer(peer, Some(VOLUME), true, false)
            .map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// Runs the group's gc through `cluster` until every member swept, within the bound
/// after heal; `failure` says what did not happen.
async fn gc_succeeds(cluster: &ClusterNode, failure: &str) -> Result<(), String> {
    settle_within(
        failure,
        SETTLE_AFTER_HEAL,
        Duration::from_secs(2),
        || async {
            match cluster.group_gc(GROUP).await {
                Ok(reply) if reply.members.iter().all(|member| member.error.is_empty()) => Ok(()),
                outcome => Err(format!("{outcome:?}")),
            }
        },
    )
    .await
}

/// Follows `main` at `peer` as the daemon's `forge volume follow` does: asked of the
/// peer, recorded here, and listened for.
async fn follow_main(
    vault: &Arc<Vault>,
    volumes: &Volumes,
    peer: NodeId,
) -> Result<Outcome, String> {
    let volume =
        forge_mesh::sync::follow_volume(&*volumes.net, peer, VOLUME, "main", true, &sync_config())
            .await
            .map_err(|error| error.to_string())?;
    let following = forge_node::vault::peers::Following {
        volume,
        name: VOLUME.to_owned(),
        branch: "main".to_owned(),
        local_name: VOLUME.to_owned(),
    };
    let recorder = vault.clone();
    forge_node::lockstep::run(move || recorder.set_following(&peer, &following, true))
        .await
        .map_err(|error| error.to_string())?;
    volumes.follow.listen(volume);
    Ok(Outcome::Followed)
}

/// Sends `branch` to `peer` as the daemon's `forge volume sync --peer` does.
async fn sync_to(volumes: &Volumes, peer: NodeId, branch: &'static str) -> Result<Outcome, String> {
    let _turn = volumes.incoming.push_turn(peer).await;
    let (net, host) = (volumes.net.clone(), volumes.host.clone());
    // The sender's store work (its offer, the index nodes and chunks it reads) waits on
    // its group for what is not held here: the whole send runs in a lockstep closure,
    // which may block.
    forge_node::lockstep::run(move || {
        forge_node::lockstep::block_on(send_volume(
            net,
            host,
            peer,
            VOLUME,
            branch,
            VOLUME,
            &sync_config(),
        ))
    })
    .await
    .map(|summary| {
        Outcome::Synced(format!(
            "{:?}, {} chunks sent",
            summary.moved, summary.chunks_sent
        ))
    })
    .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_group_volume_round_trips_on_every_member_and_the_same_seed_replays() {
        let first = smoke(11).unwrap();
        let again = smoke(11).unwrap();
        assert_eq!(first, again);
        assert_ne!(smoke(12).unwrap().snapshot, first.snapshot);
    }
}
