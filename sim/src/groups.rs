//! Volume groups under the simulator: whole vaults with their cluster node (Raft groups,
//! shard placement and transfer) on the simulated network and disks, the vault's
//! synchronous work run in lockstep with the runtime (`forge_node::lockstep`).
//!
//! What runs today (the first step of issue 14's group scenario): three nodes form a
//! cluster, make a 2+1 volume group and a volume in it; one member imports a tree (its
//! chunks' shards spread over the three through the group); every member then exports
//! the snapshot byte-exact (reading the shards it lacks from the others), and the two
//! others again once the third is down. Deterministic: the same seed gives the same
//! snapshot ids, network trace and simulated time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forge_crypto::{Cid, NodeId, NodeIdentity, NodeSecrets};
use forge_mesh::MeshError;
use forge_mesh::memory::{MemoryNetwork, MemoryPeer};
use forge_mesh::net::{BoxFuture, PeerNet};
use forge_node::clock::{SeededRandomness, SteppingClock};
use forge_node::daemon::cluster::{AddressBook, ClusterNode, ClusterParts};
use forge_node::datadir::DataDir;
use forge_node::progress::Progress;
use forge_node::vault::export::SnapshotSelector;
use forge_node::vault::{ExportOptions, ImportOptions, Vault, VaultParts, no_passphrase};
use forge_store::kv::MemKv;

use crate::SimRng;

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
}

fn node_identity(seed: u64, index: usize) -> NodeSecrets {
    let mut secret = [0u8; 128];
    let mut rng = SimRng::new(seed ^ (index as u64 + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
    for byte in &mut secret {
        *byte = rng.next_u64().to_le_bytes()[0];
    }
    NodeSecrets::from_seed_bytes(secret)
}

fn start_node(
    seed: u64,
    index: usize,
    secrets: &NodeSecrets,
    peer: Arc<MemoryPeer>,
    everyone: Vec<NodeId>,
    root: &Path,
) -> Result<Node, String> {
    let dir = root.join(format!("node-{index}"));
    std::fs::create_dir_all(&dir).map_err(|error| error.to_string())?;
    let parts = VaultParts {
        kv: Arc::new(MemKv::new()),
        metadata: None,
        clock: Arc::new(SteppingClock::new(
            1_800_000_000_000_000_000 + i64::try_from(index).unwrap_or(0) * 1_000_000_000,
            1_000_000,
        )),
        randomness: Arc::new(SeededRandomness::new(seed ^ (index as u64) << 40)),
        threads: 1,
    };
    let vault = Arc::new(
        Vault::from_parts(
            &DataDir::new(dir),
            NodeIdentity::from_secrets(secrets),
            parts,
        )
        .map_err(|error| format!("node {index} did not open: {error}"))?,
    );
    let cluster = ClusterNode::start_with(
        vault.clone(),
        ClusterParts {
            net: peer.clone(),
            addresses: Arc::new(NoAddresses(peer, everyone)),
            raft_kv: Arc::new(MemKv::new()),
            syncer: None,
            seed: Some(seed ^ (index as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)),
        },
    )
    .map_err(|error| format!("node {index}'s cluster did not start: {error}"))?;
    Ok(Node { vault, cluster })
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
async fn settle<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("{what}: {error}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
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
    settle("exporting on every member", || {
        let (vault, out) = (vault.clone(), out.clone());
        async move {
            forge_node::lockstep::run(move || {
                let _ = std::fs::remove_dir_all(&out);
                vault
                    .export(
                        "data",
                        &out,
                        &SnapshotSelector::Id(snapshot.to_hex()),
                        &ExportOptions::default(),
                        &no_passphrase,
                        &Progress::new("export", false),
                    )
                    .map(|_| ())
                    .map_err(|error| format!("node {index}: {error}"))
            })
            .await
        }
    })
    .await?;
    if &crate::sites::read_tree(&out)? == expected {
        Ok(())
    } else {
        Err(format!("node {index} exported another tree"))
    }
}

/// Runs the smoke scenario for `seed` on its own deterministic runtime.
///
/// # Errors
/// What went wrong, in words.
pub fn smoke(seed: u64) -> Result<GroupsReport, String> {
    let scratch = tempfile::tempdir().map_err(|error| error.to_string())?;
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
    let mut nodes = Vec::new();
    for (index, secrets) in secrets.iter().enumerate() {
        let peer = network.join(ids[index]);
        nodes.push(start_node(seed, index, secrets, peer, ids.clone(), root)?);
    }
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
