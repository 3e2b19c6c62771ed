//! What the consensus examples share: forge nodes in this process on loopback QUIC, each
//! with its own RocksDB in a temporary directory, its own Syncer and a Raft server, as the
//! daemon has them, connected to each other.

use std::sync::Arc;
use std::time::Duration;

use forge_consensus::{GroupHandle, GroupOptions, GroupTable, RAFT_PROTOCOL};
use forge_crypto::{NodeIdentity, NodeSecrets};
use forge_mesh::net::PeerNet;
use forge_mesh::quic::{Multiaddr, QuicNet};
use forge_store::kv::{KvEngine, RocksKv, RocksKvOptions, Syncer};

/// One node.
pub struct LoopbackNode {
    /// The node's main engine (the vault's, in the daemon).
    kv: Arc<dyn KvEngine>,
    /// The engine its Raft groups use: the main one, or one of their own (as the daemon).
    raft_kv: Arc<dyn KvEngine>,
    syncer: Arc<Syncer>,
    table: GroupTable,
    /// Its network.
    pub net: Arc<dyn PeerNet>,
    _dir: tempfile::TempDir,
}

impl LoopbackNode {
    /// Its storage engine (shared by its groups, as in the daemon).
    #[allow(dead_code)] // Not every example writes beside the groups.
    pub fn kv(&self) -> Arc<dyn KvEngine> {
        self.kv.clone()
    }

    /// Starts group `group` on this node.
    pub async fn start_group(&self, group: u64) -> GroupHandle {
        GroupHandle::start(
            &self.table,
            group,
            self.raft_kv.clone(),
            Some(self.syncer.clone()),
            self.net.clone(),
            GroupOptions::default(),
        )
        .await
        .unwrap()
    }
}

/// `count` nodes (identities seeded from `seed`), every one connected to every other,
/// their Raft groups on an engine of their own as in the daemon.
#[allow(dead_code)] // Not every example uses both.
pub async fn loopback_nodes(count: u8, seed: u8) -> Vec<LoopbackNode> {
    loopback_nodes_with(count, seed, true).await
}

/// The same, with Raft on its own engine or on the node's main one.
pub async fn loopback_nodes_with(
    count: u8,
    seed: u8,
    raft_engine_of_its_own: bool,
) -> Vec<LoopbackNode> {
    let mut nets = Vec::new();
    let mut nodes = Vec::new();
    for index in 0..count {
        let secrets = NodeSecrets::from_seed_bytes([seed.wrapping_add(index); 128]);
        let identity = Arc::new(NodeIdentity::from_secrets(&secrets));
        let listen: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        let quic = QuicNet::start(&identity, secrets.transport_seed(), &listen, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kv: Arc<dyn KvEngine> =
            Arc::new(RocksKv::open(&dir.path().join("db"), &RocksKvOptions::default()).unwrap());
        let raft_kv: Arc<dyn KvEngine> = if raft_engine_of_its_own {
            Arc::new(RocksKv::open(&dir.path().join("raft"), &RocksKvOptions::default()).unwrap())
        } else {
            kv.clone()
        };
        let syncer = Arc::new(Syncer::start(raft_kv.clone()).unwrap());
        let table = GroupTable::new();
        let net: Arc<dyn PeerNet> = Arc::new(quic.clone());
        let inbound = net.serve(RAFT_PROTOCOL).unwrap();
        tokio::spawn(forge_consensus::serve_raft(inbound, table.clone(), |_| {
            Ok(())
        }));
        nets.push(quic);
        nodes.push(LoopbackNode {
            kv,
            raft_kv,
            syncer,
            table,
            net,
            _dir: dir,
        });
    }
    for (index, quic) in nets.iter().enumerate() {
        for other in nets.iter().skip(index + 1) {
            let address = loop {
                if let Some(address) = other.addresses().await.unwrap().first() {
                    break address.clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            quic.connect(address, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }
    nodes
}
