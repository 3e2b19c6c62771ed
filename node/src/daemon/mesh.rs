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
use forge_proto::v1::{
    ClusterInitRequest, ClusterJoinRequest, ClusterLeaveRequest, ClusterStatusReply,
    ClusterStatusRequest, CreateGroupRequest, GroupInfo,
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
    follow: Arc<Follow>,
    host: Arc<VaultVolumeHost>,
    incoming: Incoming,
    vault: Arc<Vault>,
    daemon: Weak<Host>,
    cluster: Arc<crate::daemon::cluster::ClusterNode>,
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
            shared.clone(),
            host.clone(),
            incoming.clone(),
            TransferConfig::default(),
        )
        .map_err(mesh_error)?;
        let follow = Follow::start(
            shared.clone(),
            Some(net.clone()),
            vault.clone(),
            incoming.clone(),
        )?;
        // Where each peer was reached: a request that finds no connection dials there.
        for (node, record) in vault.peers()? {
            if let Some(address) = record
                .addresses
                .iter()
                .find_map(|address| address.parse::<Multiaddr>().ok())
            {
                let net = net.clone();
                tokio::spawn(async move { net.remember(node, address).await });
            }
        }
        let audits = net
            .serve(forge_mesh::audit::AUDIT_PROTOCOL)
            .map_err(mesh_error)?;
        let rules = vault.clone();
        tokio::spawn(forge_mesh::audit::serve_audits(
            audits,
            Arc::new(crate::vault::sync::VaultReader::new(vault.clone())),
            // Only a peer trusted with something here may make this vault read for it.
            move |from| match rules.peer(from) {
                Ok(Some(peer)) if peer.new_volumes || !peer.volumes.is_empty() => Ok(()),
                _ => Err(format!("node {from} is trusted with nothing here")),
            },
        ));
        let cluster = crate::daemon::cluster::ClusterNode::start(vault.clone(), net.clone())?;
        drop(_entered);
        Ok(Self {
            runtime,
            net,
            follow,
            host,
            incoming,
            vault,
            daemon: Arc::downgrade(daemon),
            cluster,
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

    /// The cluster's member count and the status of every Raft group this node runs, by
    /// name (for /metrics).
    ///
    /// # Errors
    /// The network stopped; corrupt cluster records.
    pub fn group_statuses(&self) -> Result<(usize, Vec<super::cluster::GroupMetrics>)> {
        let cluster = self.cluster.clone();
        self.run(async move { cluster.group_statuses() })?
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
        let (net, vault, node) = (self.net.clone(), self.vault.clone(), *node);
        self.run(async move { reach(&net, &vault, node).await })?
            .map_err(mesh_error)
    }

    fn daemon(&self) -> Result<Arc<Host>> {
        self.daemon.upgrade().ok_or_else(|| {
            NodeError::Mesh(MeshError::Local {
                what: "the daemon is stopping".into(),
            })
        })
    }
}

/// Makes sure `net` has a verified connection to `node`, dialing the addresses its peer
/// record knows.
async fn reach(net: &QuicNet, vault: &Vault, node: NodeId) -> std::result::Result<(), MeshError> {
    if net.connected().await?.contains(&node) {
        return Ok(());
    }
    let addresses = vault
        .peer(&node)
        .ok()
        .flatten()
        .map(|record| record.addresses)
        .unwrap_or_default();
    let mut last = None;
    for address in &addresses {
        let Ok(parsed) = address.parse::<Multiaddr>() else {
            last = Some(format!("{address} is not a multiaddr"));
            continue;
        };
        match net.connect(parsed, CONNECT_DEADLINE).await {
            Ok(reached) if reached == node => return Ok(()),
            Ok(reached) => last = Some(format!("{address} is now node {reached}")),
            Err(error) => last = Some(format!("{address}: {error}")),
        }
    }
    Err(MeshError::Unreachable {
        peer: node,
        reason: last
            .unwrap_or_else(|| "no address is known for it (forge peer add MULTIADDR)".to_owned()),
    })
}

/// Following: this node announces new heads of branches others follow here (checked
/// every [`ANNOUNCE_EVERY`]), takes announcements from the peers it follows, and pulls
/// on each (and once when it starts, for what it missed while down). Over any
/// [`PeerNet`] (the daemon's QUIC, the simulator's network).
pub struct Follow {
    net: Arc<dyn PeerNet>,
    /// The daemon's QUIC network, which dials a followed peer it lost (gossip reaches
    /// only connected nodes). `None`: a network that needs no dialing.
    quic: Option<QuicNet>,
    vault: Arc<Vault>,
    incoming: Incoming,
    /// Pulls running, by (peer, volume): true when another announcement came meanwhile.
    pulling: std::sync::Mutex<std::collections::BTreeMap<(NodeId, [u8; 16]), bool>>,
    /// The sequences of this node's announcements (never going back: a follower would
    /// ignore them).
    sequence: std::sync::Mutex<forge_mesh::announce::SequenceClock>,
    /// Its long-running tasks (the announcing loop, the listeners), for [`Follow::stop`].
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// How often this node looks for new heads to announce.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// What was announced last: (volume, branch) → (head, when).
type Announced =
    std::collections::BTreeMap<([u8; 16], String), (forge_crypto::Cid, tokio::time::Instant)>;

/// How often a followed branch's unchanged head is announced again. A publish that
/// gossipsub accepts may still miss a follower whose subscription it has not grafted yet,
/// so this bounds how late a follower learns of a head; a follower that has it does
/// nothing with the repeat (one small message per followed branch).
const ANNOUNCE_AGAIN: Duration = Duration::from_secs(5);

/// How often a follower checks it is still connected to the peers it follows.
const KEEP_CONNECTED_EVERY: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Follow {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Follow").finish_non_exhaustive()
    }
}

impl Follow {
    /// Starts following on `net` (from a task of the runtime it runs on): listens to each
    /// followed volume's announcements, announces the heads others follow here, keeps
    /// the followed peers connected (with `quic`; a reconnect pulls what was missed),
    /// and pulls each followed branch once now, for what was announced while down.
    /// `incoming` is the one the volume protocol's server shares (a pull's push lands
    /// there).
    ///
    /// # Errors
    /// The vault's followings cannot be read.
    pub fn start(
        net: Arc<dyn PeerNet>,
        quic: Option<QuicNet>,
        vault: Arc<Vault>,
        incoming: Incoming,
    ) -> Result<Arc<Self>> {
        let followings = vault.followings()?;
        let sequence = forge_mesh::announce::SequenceClock::resume(vault.announcement_floor()?);
        let follow = Arc::new(Self {
            net,
            quic,
            vault,
            incoming,
            sequence: std::sync::Mutex::new(sequence),
            pulling: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        for (_, following) in &followings {
            follow.listen(following.volume);
        }
        if follow.quic.is_some() {
            let task = tokio::spawn(follow.clone().keep_connected());
            follow.keep(task);
        }
        let task = tokio::spawn(follow.clone().announce_loop());
        follow.keep(task);
        for (peer, following) in followings {
            tokio::spawn(follow.clone().pull(peer, following.volume));
        }
        Ok(follow)
    }

    fn keep(&self, task: tokio::task::JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    /// Stops announcing and listening (the node is going away; a pull in progress ends
    /// on its own).
    pub fn stop(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }

    /// Publishes each followed branch's head on its volume's topic when it changes, and
    /// again every [`ANNOUNCE_AGAIN`] (gossip is best effort; a follower that already has
    /// the head does nothing with it). Not published while no follower is reachable: it
    /// is tried again at the next look.
    async fn announce_loop(self: Arc<Self>) {
        let mut announced = Announced::new();
        loop {
            tokio::time::sleep(ANNOUNCE_EVERY).await;
            let Ok(followers) = self.vault.followers() else {
                continue;
            };
            let branches: std::collections::BTreeSet<([u8; 16], String)> = followers
                .into_iter()
                .map(|(volume, _, branch)| (volume, branch))
                .collect();
            for (volume, branch) in branches {
                let head = self
                    .vault
                    .refs()
                    .get_ref(&forge_store::VolumeId::from_bytes(volume), &branch);
                let Ok(Some(head)) = head else { continue };
                let key = (volume, branch.clone());
                if announced
                    .get(&key)
                    .is_some_and(|(last, at)| *last == head && at.elapsed() < ANNOUNCE_AGAIN)
                {
                    continue;
                }
                match self.announce(volume, &branch, head).await {
                    Ok(()) => {
                        announced.insert(key, (head, tokio::time::Instant::now()));
                    }
                    Err(error) => {
                        tracing::debug!(%error, "announcing a head: will try again");
                    }
                }
            }
        }
    }

    async fn announce(
        &self,
        volume: [u8; 16],
        branch: &str,
        head: forge_crypto::Cid,
    ) -> std::result::Result<(), MeshError> {
        let local = |error: NodeError| MeshError::Local {
            what: error.to_string(),
        };
        let record = self
            .vault
            .list_volumes()
            .map_err(local)?
            .into_iter()
            .find(|record| record.id == volume)
            .ok_or_else(|| MeshError::Local {
                what: "a followed volume that is gone".into(),
            })?;
        let index = self.vault.index_head(&record, &head).map_err(local)?;
        let now = self.vault.now_ns();
        let sequence = self
            .sequence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next(now, |floor| self.vault.set_announcement_floor(floor))
            .map_err(local)?;
        let signed = forge_mesh::announce::Announcement {
            volume,
            branch: branch.to_owned(),
            head,
            index_root: forge_crypto::Cid::from_bytes(index.root),
            author: self.vault.identity().node_id(),
            sequence,
            time_ns: now,
        }
        .sign(self.vault.identity())?;
        forge_mesh::announce::announce(&*self.net, &volume, &signed).await
    }

    /// Takes announcements of `volume` from the peers this vault follows it at: each new
    /// head this vault does not have yet is pulled. Called when a follow is set up (from
    /// a task of the runtime it runs on).
    pub fn listen(self: &Arc<Self>, volume: [u8; 16]) {
        let topic = forge_mesh::announce::topic(&volume);
        let subscription = match self.net.subscribe(&topic) {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(%error, "subscribing to a followed volume's heads");
                return;
            }
        };
        let (keys_vault, taker) = (self.vault.clone(), self.clone());
        let task = tokio::spawn(forge_mesh::announce::serve_announcements(
            subscription,
            // Taken only from a peer this vault follows the volume at.
            move |author| {
                let followed = keys_vault
                    .followings()
                    .ok()?
                    .iter()
                    .any(|(peer, following)| peer == author && following.volume == volume);
                if !followed {
                    return None;
                }
                keys_vault.peer_keys(author).ok().flatten()
            },
            move |announcement| {
                let held = taker
                    .vault
                    .refs()
                    .get_ref(
                        &forge_store::VolumeId::from_bytes(announcement.volume),
                        &announcement.branch,
                    )
                    .ok()
                    .flatten();
                if held != Some(announcement.head) {
                    tokio::spawn(taker.clone().pull(announcement.author, announcement.volume));
                }
            },
        ));
        self.keep(task);
    }

    /// Keeps a connection to every peer this vault follows something at (gossip reaches
    /// only connected nodes); a peer reached again after losing it is pulled from, for
    /// what it announced meanwhile.
    async fn keep_connected(self: Arc<Self>) {
        let Some(quic) = self.quic.clone() else {
            return;
        };
        loop {
            tokio::time::sleep(KEEP_CONNECTED_EVERY).await;
            let Ok(followings) = self.vault.followings() else {
                continue;
            };
            let Ok(connected) = quic.connected().await else {
                continue;
            };
            for (peer, following) in followings {
                if connected.contains(&peer) {
                    continue;
                }
                if reach(&quic, &self.vault, peer).await.is_ok() {
                    tokio::spawn(self.clone().pull(peer, following.volume));
                }
            }
        }
    }

    /// Pulls the followed branch of `volume` from `peer`, again while announcements keep
    /// coming during the pull.
    async fn pull(self: Arc<Self>, peer: NodeId, volume: [u8; 16]) {
        {
            let mut pulling = self
                .pulling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(again) = pulling.get_mut(&(peer, volume)) {
                *again = true;
                return;
            }
            pulling.insert((peer, volume), false);
        }
        loop {
            let following = self.vault.followings().ok().and_then(|all| {
                all.into_iter()
                    .find(|(node, following)| *node == peer && following.volume == volume)
            });
            if let Some((_, following)) = following {
                let names = [
                    following.name.as_str(),
                    following.branch.as_str(),
                    following.local_name.as_str(),
                ];
                let reached = match &self.quic {
                    Some(quic) => reach(quic, &self.vault, peer).await,
                    None => Ok(()),
                };
                let pulled = match reached {
                    Ok(()) => {
                        let config = TransferConfig::default();
                        pull_volume(&*self.net, &self.incoming, peer, names, &config).await
                    }
                    Err(error) => Err(error),
                };
                match pulled {
                    Ok(summary) => tracing::info!(
                        volume = following.local_name,
                        %peer,
                        chunks = summary.chunks_sent,
                        moved = summary.moved.describe(),
                        "pulled a followed branch"
                    ),
                    Err(error) => tracing::warn!(%error, %peer, "pulling a followed branch"),
                }
            }
            let mut pulling = self
                .pulling
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if pulling.get(&(peer, volume)) == Some(&true) {
                pulling.insert((peer, volume), false);
                continue;
            }
            pulling.remove(&(peer, volume));
            return;
        }
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

impl DaemonMesh<'_> {
    /// A node named on the command line for a group: this node, or a peer.
    fn group_member(&self, text: &str) -> Result<NodeId> {
        let me = self.api.vault.shared_identity().node_id();
        if NodeId::parse(text).is_ok_and(|node| node == me) {
            return Ok(me);
        }
        peer_node(self.api.vault, text, true)
    }
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

    fn unshare(
        &self,
        request: forge_proto::v1::UnshareVolumeRequest,
    ) -> Result<forge_proto::v1::UnshareVolumeReply> {
        self.api.unshare(request)
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
            // A pull's data arrives here: its progress is what this vault has stored.
            let (pulling, incoming) = (request.pull, &self.node.incoming);
            scope.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    wake.recv_timeout(Duration::from_millis(200))
                {
                    let (chunks, bytes) = if pulling {
                        incoming.received(&node)
                    } else {
                        (
                            sampled.0.load(Ordering::Relaxed),
                            sampled.1.load(Ordering::Relaxed),
                        )
                    };
                    progress.set_done(chunks, bytes);
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
                let incoming = self.node.incoming.clone();
                self.node.run(async move {
                    let [name, branch, as_name] = &names;
                    let _turn = incoming.push_turn(node).await;
                    send_volume(net, host, node, name, branch, as_name, &config).await
                })
            };
            drop(finished);
            outcome
        })?;
        if !request.pull {
            progress.set_done(
                sent.0.load(Ordering::Relaxed),
                sent.1.load(Ordering::Relaxed),
            );
        }
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

    fn follow(
        &self,
        request: forge_proto::v1::FollowVolumeRequest,
        progress: &Progress,
    ) -> Result<forge_proto::v1::FollowVolumeReply> {
        let vault = self.api.vault;
        let node = peer_node(vault, &request.peer, false)?;
        self.node.reach(&node)?;
        let branch = if request.branch.is_empty() {
            DEFAULT_BRANCH.to_owned()
        } else {
            request.branch.clone()
        };
        let on = !request.unfollow;
        let net = self.node.net.clone();
        let (name, asked_branch) = (request.volume.clone(), branch.clone());
        let volume = self
            .node
            .run(async move {
                let config = TransferConfig::default();
                forge_mesh::sync::follow_volume(&net, node, &name, &asked_branch, on, &config).await
            })?
            .map_err(mesh_error)?;
        let following = crate::vault::peers::Following {
            volume,
            name: request.volume.clone(),
            branch: branch.clone(),
            local_name: request
                .as_name
                .clone()
                .unwrap_or_else(|| request.volume.clone()),
        };
        vault.set_following(&node, &following, on)?;
        if on {
            let (follow, volume) = (self.node.follow.clone(), following.volume);
            self.node.run(async move { follow.listen(volume) })?;
        }
        let pulled = if on {
            Some(self.sync(
                SyncVolumeRequest {
                    volume: request.volume.clone(),
                    peer: node.to_hex(),
                    pull: true,
                    branch,
                    as_name: request.as_name.clone(),
                },
                progress,
            )?)
        } else {
            None
        };
        Ok(forge_proto::v1::FollowVolumeReply {
            volume_id: forge_store::VolumeId::from_bytes(volume).to_string(),
            following: on,
            pulled,
        })
    }

    fn list_proofs(&self, request: ListProofsRequest) -> Result<ListProofsReply> {
        self.api.list_proofs(request)
    }

    fn audit(
        &self,
        request: forge_proto::v1::AuditVolumeRequest,
    ) -> Result<forge_proto::v1::AuditVolumeReply> {
        use forge_mesh::audit::{Verdict, audit};
        let vault = self.api.vault;
        let node = peer_node(vault, &request.peer, false)?;
        let branch = if request.branch.is_empty() {
            DEFAULT_BRANCH
        } else {
            &request.branch
        };
        let wanted = if request.samples == 0 {
            32
        } else {
            request.samples as usize
        };
        let (head, samples) = vault.audit_samples(&request.volume, branch, wanted)?;
        self.node.reach(&node)?;
        let net = self.node.net.clone();
        let asked = samples.clone();
        let verdicts = self
            .node
            .run(async move {
                let deadline = Duration::from_secs(120);
                audit(&net, node, &asked, deadline).await
            })?
            .map_err(mesh_error)?;
        let mut reply = forge_proto::v1::AuditVolumeReply {
            volume: request.volume,
            peer: node.to_hex(),
            snapshot: head.to_hex(),
            ..forge_proto::v1::AuditVolumeReply::default()
        };
        for (asked, verdict) in samples.iter().zip(verdicts) {
            let (result, reason) = match verdict {
                Verdict::Passed => ("passed", String::new()),
                Verdict::Missing => ("missing", "the peer does not hold it".to_owned()),
                Verdict::Failed(reason) => ("failed", reason),
            };
            if result == "passed" {
                reply.passed += 1;
            } else {
                reply.failed += 1;
            }
            reply.samples.push(forge_proto::v1::AuditSample {
                cid: asked.cid.to_hex(),
                first_kib: asked.first_kib,
                result: result.to_owned(),
                reason,
            });
        }
        if let Ok(daemon) = self.node.daemon() {
            daemon
                .metrics()
                .count_audit(&node, reply.passed, reply.failed);
        }
        Ok(reply)
    }

    fn export_proof(&self, request: ExportProofRequest) -> Result<ExportProofReply> {
        self.api.export_proof(request)
    }

    fn cluster_init(&self, _request: ClusterInitRequest) -> Result<ClusterStatusReply> {
        let cluster = self.node.cluster.clone();
        self.node.run(async move { cluster.init().await })?
    }

    fn cluster_join(&self, request: ClusterJoinRequest) -> Result<ClusterStatusReply> {
        let peer = peer_node(self.api.vault, &request.peer, false)?;
        self.node.reach(&peer)?;
        let cluster = self.node.cluster.clone();
        self.node.run(async move { cluster.join(peer).await })?
    }

    fn cluster_status(&self, _request: ClusterStatusRequest) -> Result<ClusterStatusReply> {
        let cluster = self.node.cluster.clone();
        self.node.run(async move { cluster.status().await })?
    }

    fn cluster_leave(&self, _request: ClusterLeaveRequest) -> Result<ClusterStatusReply> {
        let cluster = self.node.cluster.clone();
        self.node.run(async move { cluster.leave().await })?
    }

    fn create_group(&self, request: CreateGroupRequest) -> Result<GroupInfo> {
        let nodes = request
            .nodes
            .iter()
            .map(|text| self.group_member(text))
            .collect::<Result<Vec<NodeId>>>()?;
        let cluster = self.node.cluster.clone();
        self.node.run(async move {
            cluster
                .create_group(
                    &request.name,
                    nodes,
                    request.data_shards,
                    request.parity_shards,
                )
                .await
        })?
    }

    fn create_group_volume(
        &self,
        request: forge_proto::v1::CreateGroupVolumeRequest,
    ) -> Result<forge_proto::v1::CreateVolumeReply> {
        let cluster = self.node.cluster.clone();
        let record = self.node.run(async move {
            cluster
                .create_group_volume(&request.name, &request.group)
                .await
        })??;
        Ok(forge_proto::v1::CreateVolumeReply {
            volume: Some(crate::service::volume_info(&record)),
        })
    }

    fn repair_group(
        &self,
        request: forge_proto::v1::RepairGroupRequest,
    ) -> Result<forge_proto::v1::RepairGroupReply> {
        let cluster = self.node.cluster.clone();
        self.node
            .run(async move { cluster.repair_group(&request.name).await })?
    }

    fn gc_group(
        &self,
        request: forge_proto::v1::GroupGcRequest,
    ) -> Result<forge_proto::v1::GroupGcReply> {
        let cluster = self.node.cluster.clone();
        self.node
            .run(async move { cluster.group_gc(&request.name).await })?
    }

    fn add_group_node(&self, request: forge_proto::v1::GroupNodeRequest) -> Result<GroupInfo> {
        let node = self.group_member(&request.node)?;
        let cluster = self.node.cluster.clone();
        self.node
            .run(async move { cluster.add_group_node(&request.name, node).await })?
    }

    fn remove_group_node(&self, request: forge_proto::v1::GroupNodeRequest) -> Result<GroupInfo> {
        let node = self.group_member(&request.node)?;
        let cluster = self.node.cluster.clone();
        self.node
            .run(async move { cluster.remove_group_node(&request.name, node).await })?
    }
}
