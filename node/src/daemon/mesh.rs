//! The daemon's network: libp2p over QUIC ([`QuicNet`]) on the address `forge.toml`'s
//! `listen` or `node start --listen` gives, serving the volume and sync protocols for the
//! vault, and the calls of `forge.v1.Mesh` that need it (addresses, adding a peer,
//! syncing). It runs on a tokio runtime of its own; the control server's blocking calls
//! hand it futures and wait for their results.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use forge_crypto::NodeId;
use forge_mesh::quic::{Multiaddr, QuicNet};
use forge_mesh::sync::{
    Incoming, TransferConfig, TransferSummary, pull_volume, send_volume, serve_volumes,
};
use forge_mesh::{MeshError, PeerNet};
use forge_proto::v1::{
    AddPeerRequest, ExportProofReply, ExportProofRequest, ListPeersReply, ListPeersRequest,
    ListProofsReply, ListProofsRequest, NodeAddrReply, NodeAddrRequest, PeerInfo,
    RevokePeerRequest, ShareVolumeReply, ShareVolumeRequest, SyncVolumeReply, SyncVolumeRequest,
    TrustPeerRequest,
};

use crate::daemon::host::Host;
use crate::error::{NodeError, Result};
use crate::progress::Progress;
use crate::service::LocalApi;
use crate::service::mesh::{MeshService, peer_info, peer_node};
use crate::vault::transfer::VaultVolumeHost;
use crate::vault::{DEFAULT_BRANCH, Vault};

/// How long connecting to a peer may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(20);

/// The daemon's network and the protocols it serves.
pub struct MeshNode {
    runtime: tokio::runtime::Runtime,
    net: QuicNet,
    host: Arc<VaultVolumeHost>,
    incoming: Incoming,
    vault: Arc<Vault>,
    daemon: Weak<Host>,
}

impl std::fmt::Debug for MeshNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MeshNode")
            .field("net", &self.net)
            .finish_non_exhaustive()
    }
}

fn mesh_error(error: MeshError) -> NodeError {
    NodeError::Mesh(error)
}

impl MeshNode {
    /// Starts listening on `listen` (a QUIC multiaddr). When it is taken and was not
    /// `configured` (the default port, a second vault on this host), another port of the
    /// same address is used, and the log says so.
    ///
    /// # Errors
    /// A bad address; an address that cannot be listened on.
    pub fn start(daemon: &Arc<Host>, listen: &str, configured: bool) -> Result<Self> {
        let vault = daemon.vault().clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("forge-mesh")
            .enable_all()
            .build()
            .map_err(NodeError::io("starting", "the network"))?;
        let address: Multiaddr = listen.parse().map_err(|error| NodeError::InvalidArgument {
            what: "listen address",
            value: listen.to_owned(),
            reason: format!("{error}"),
        })?;
        let identity = vault.shared_identity();
        let seed = identity.transport_seed();
        let now = vault.now_ns();
        let _entered = runtime.enter();
        let net = match QuicNet::start(&identity, seed, &address, now) {
            Ok(net) => net,
            Err(error) if !configured => {
                let any_port: Multiaddr = listen
                    .replace(&format!("/udp/{}/", udp_port(listen)), "/udp/0/")
                    .parse()
                    .map_err(|_| mesh_error(error.clone()))?;
                tracing::warn!(%error, "the default peer port is taken: listening on another (see `forge node addr`)");
                QuicNet::start(&identity, seed, &any_port, now).map_err(mesh_error)?
            }
            Err(error) => return Err(mesh_error(error)),
        };
        let incoming = Incoming::default();
        let weak = Arc::downgrade(daemon);
        let counter: crate::vault::transfer::TransferCounter =
            Arc::new(move |peer, sent, chunks, bytes| {
                if let Some(daemon) = weak.upgrade() {
                    daemon.metrics().count_sync(&peer, sent, chunks, bytes);
                }
            });
        let host = Arc::new(VaultVolumeHost::new(
            vault.clone(),
            incoming.clone(),
            Some(counter),
        ));
        let shared: Arc<dyn PeerNet> = Arc::new(net.clone());
        serve_volumes(
            shared,
            host.clone(),
            incoming.clone(),
            TransferConfig::default(),
        )
        .map_err(mesh_error)?;
        drop(_entered);
        Ok(Self {
            runtime,
            net,
            host,
            incoming,
            vault,
            daemon: Arc::downgrade(daemon),
        })
    }

    /// Runs `work` on the network's runtime and waits for it (from a blocking thread).
    fn run<T: Send + 'static>(&self, work: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let (sender, receiver) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = sender.send(work.await);
        });
        receiver.recv().map_err(|_| {
            NodeError::Mesh(MeshError::Local {
                what: "the network stopped".into(),
            })
        })
    }

    /// The nodes connected now.
    ///
    /// # Errors
    /// The network stopped.
    pub fn connected(&self) -> Result<Vec<NodeId>> {
        let net = self.net.clone();
        self.run(async move { net.connected().await })?
            .map_err(mesh_error)
    }

    /// Connects to `address`; the node and keys its Hello proved.
    fn connect(&self, address: &str) -> Result<(NodeId, forge_crypto::NodePublicKeys)> {
        let parsed: Multiaddr = address
            .parse()
            .map_err(|error| NodeError::InvalidArgument {
                what: "peer address",
                value: address.to_owned(),
                reason: format!(
                    "not a multiaddr ({error}); `forge node addr` on the peer prints its own"
                ),
            })?;
        let net = self.net.clone();
        self.run(async move {
            let node = net.connect(parsed, CONNECT_DEADLINE).await?;
            let keys = net
                .peer_keys(node)
                .await?
                .ok_or_else(|| MeshError::Handshake {
                    reason: "its keys were not kept".into(),
                })?;
            Ok::<_, MeshError>((node, keys))
        })?
        .map_err(mesh_error)
    }

    /// Makes sure there is a verified connection to `node`, dialing its known addresses.
    fn reach(&self, node: &NodeId) -> Result<()> {
        if self.connected()?.contains(node) {
            return Ok(());
        }
        let addresses = self
            .vault
            .peer(node)?
            .map(|record| record.addresses)
            .unwrap_or_default();
        let mut last = None;
        for address in &addresses {
            match self.connect(address) {
                Ok((reached, _)) if reached == *node => return Ok(()),
                Ok((reached, _)) => {
                    last = Some(format!("{address} is now node {reached}"));
                }
                Err(error) => last = Some(format!("{address}: {error}")),
            }
        }
        Err(NodeError::Mesh(MeshError::Unreachable {
            peer: *node,
            reason: last.unwrap_or_else(|| {
                "no address is known for it (forge peer add MULTIADDR)".to_owned()
            }),
        }))
    }

    fn daemon(&self) -> Result<Arc<Host>> {
        self.daemon.upgrade().ok_or_else(|| {
            NodeError::Mesh(MeshError::Local {
                what: "the daemon is stopping".into(),
            })
        })
    }
}

/// The `forge.v1.Mesh` calls as the daemon serves them: records through the vault as in
/// any process, network calls through its [`MeshNode`].
pub struct DaemonMesh<'a> {
    /// The record calls.
    pub api: LocalApi<'a>,
    /// The network.
    pub node: &'a MeshNode,
}

impl std::fmt::Debug for DaemonMesh<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("DaemonMesh").finish_non_exhaustive()
    }
}

/// The port of a `/udp/PORT/` multiaddr (0 if none).
fn udp_port(address: &str) -> u16 {
    address
        .split("/udp/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or(0)
}

impl MeshService for DaemonMesh<'_> {
    fn addresses(&self, _request: NodeAddrRequest) -> Result<NodeAddrReply> {
        let net = self.node.net.clone();
        let addresses = self
            .node
            .run(async move { net.addresses().await })?
            .map_err(mesh_error)?;
        Ok(NodeAddrReply {
            node_id: self.api.vault.identity().node_id().to_hex(),
            addresses: addresses.iter().map(ToString::to_string).collect(),
        })
    }

    fn add_peer(&self, request: AddPeerRequest) -> Result<PeerInfo> {
        let (node, keys) = self.node.connect(&request.address)?;
        if let Some(expected) = &request.expect
            && !node.to_hex().starts_with(&expected.to_ascii_lowercase())
        {
            return Err(NodeError::InvalidArgument {
                what: "peer",
                value: request.address,
                reason: format!(
                    "its Hello proves node {node}, not {expected} as --expect says; nothing \
                     was added"
                ),
            });
        }
        let record =
            self.api
                .vault
                .add_peer(&keys, Some(&request.address), request.name.as_deref())?;
        peer_info(self.api.vault, &node, &record)
    }

    fn list_peers(&self, request: ListPeersRequest) -> Result<ListPeersReply> {
        self.api.list_peers(request)
    }

    fn trust_peer(&self, request: TrustPeerRequest) -> Result<PeerInfo> {
        self.api.trust_peer(request)
    }

    fn revoke_peer(&self, request: RevokePeerRequest) -> Result<PeerInfo> {
        self.api.revoke_peer(request)
    }

    fn share(&self, request: ShareVolumeRequest) -> Result<ShareVolumeReply> {
        self.api.share(request)
    }

    fn sync(&self, request: SyncVolumeRequest, progress: &Progress) -> Result<SyncVolumeReply> {
        let started = Instant::now();
        let vault = self.api.vault;
        let node = if request.peer.starts_with('/') {
            // A multiaddr: met now (its keys kept, no name, no trust).
            let (node, keys) = self.node.connect(&request.peer)?;
            vault.add_peer(&keys, Some(&request.peer), None)?;
            node
        } else {
            peer_node(vault, &request.peer, false)?
        };
        self.node.reach(&node)?;
        let branch = if request.branch.is_empty() {
            DEFAULT_BRANCH.to_owned()
        } else {
            request.branch.clone()
        };
        let as_name = request
            .as_name
            .clone()
            .unwrap_or_else(|| request.volume.clone());
        // The transfer counts into atomics on the network's threads; this thread copies
        // them into `progress` while it waits.
        let sent = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let sink = sent.clone();
        let config = TransferConfig {
            progress: Some(Arc::new(move |chunks, bytes| {
                sink.0.store(chunks, Ordering::Relaxed);
                sink.1.store(bytes, Ordering::Relaxed);
            })),
            ..TransferConfig::default()
        };
        let net: Arc<dyn PeerNet> = Arc::new(self.node.net.clone());
        let names = [request.volume.clone(), branch.clone(), as_name.clone()];
        let (finished, wake) = std::sync::mpsc::channel::<()>();
        let outcome = std::thread::scope(|scope| {
            let sampled = &sent;
            scope.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    wake.recv_timeout(Duration::from_millis(200))
                {
                    progress.set_done(
                        sampled.0.load(Ordering::Relaxed),
                        sampled.1.load(Ordering::Relaxed),
                    );
                }
            });
            let outcome = if request.pull {
                let incoming = self.node.incoming.clone();
                self.node.run(async move {
                    let [name, branch, as_name] = &names;
                    pull_volume(&*net, &incoming, node, [name, branch, as_name], &config).await
                })
            } else {
                let host: Arc<dyn forge_mesh::sync::VolumeHost> = self.node.host.clone();
                self.node.run(async move {
                    let [name, branch, as_name] = &names;
                    send_volume(net, host, node, name, branch, as_name, &config).await
                })
            };
            drop(finished);
            outcome
        })?;
        progress.set_done(
            sent.0.load(Ordering::Relaxed),
            sent.1.load(Ordering::Relaxed),
        );
        let summary: TransferSummary = match outcome {
            Ok(summary) => summary,
            Err(error) => {
                if let Ok(daemon) = self.node.daemon() {
                    daemon.metrics().count_sync_error(request.pull);
                }
                return Err(mesh_error(error));
            }
        };
        let proof =
            forge_mesh::TransferProof::decode_verified(&summary.proof).map_err(mesh_error)?;
        Ok(SyncVolumeReply {
            volume: request.volume,
            peer: node.to_hex(),
            pull: request.pull,
            moved: summary.moved.describe().to_owned(),
            branch: summary.branch,
            chunks_sent: summary.chunks_sent,
            bytes_sent: summary.bytes_sent,
            chunks_skipped: summary.chunks_skipped,
            seconds: started.elapsed().as_secs_f64(),
            proof: crate::vault::peers::proof_id(&summary.proof),
            snapshot: proof.receipt.snapshot.to_hex(),
        })
    }

    fn list_proofs(&self, request: ListProofsRequest) -> Result<ListProofsReply> {
        self.api.list_proofs(request)
    }

    fn export_proof(&self, request: ExportProofRequest) -> Result<ExportProofReply> {
        self.api.export_proof(request)
    }
}
