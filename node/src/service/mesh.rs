//! Calls on this node's place in the mesh (`forge.v1.Mesh`): peers and their trust, key
//! shares and transfer proofs (records of the vault: served in this process too), and
//! the calls that need the node's network (its addresses, adding a peer, syncing), which
//! only the daemon serves (`daemon/mesh.rs`); here they say to start it.

use std::fmt::Write as _;

use forge_crypto::NodeId;
use forge_mesh::TransferProof;
use forge_proto::v1::{
    AddPeerRequest, AuditVolumeReply, AuditVolumeRequest, ClusterInitRequest, ClusterJoinRequest,
    ClusterLeaveRequest, ClusterStatusReply, ClusterStatusRequest, CreateGroupRequest,
    ExportProofReply, ExportProofRequest, FollowVolumeReply, FollowVolumeRequest, GroupInfo,
    ListPeersReply, ListPeersRequest, ListProofsReply, ListProofsRequest, NodeAddrReply,
    NodeAddrRequest, PeerInfo, PeerVolumeTrust, ProofInfo, RevokePeerRequest, ShareVolumeReply,
    ShareVolumeRequest, SyncVolumeReply, SyncVolumeRequest, TrustPeerRequest, UnshareVolumeReply,
    UnshareVolumeRequest,
};
use forge_store::VolumeId;
use serde_json::json;

use super::LocalApi;
use crate::clock::format_utc_time;
use crate::config::DEFAULT_LISTEN;
use crate::error::{NodeError, Result};
use crate::output::Output;
use crate::progress::{Progress, human_bytes};
use crate::vault::Vault;
use crate::vault::peers::PeerRecord;

/// Calls on the mesh (`forge.v1.Mesh`).
pub trait MeshService {
    /// This node's dialable addresses.
    ///
    /// # Errors
    /// No network here (no daemon).
    fn addresses(&self, request: NodeAddrRequest) -> Result<NodeAddrReply>;

    /// Connects to a multiaddr, verifies the peer's Hello and records it.
    ///
    /// # Errors
    /// Unreachable, a Hello that does not verify, a NodeId other than the one expected.
    fn add_peer(&self, request: AddPeerRequest) -> Result<PeerInfo>;

    /// Every peer.
    ///
    /// # Errors
    /// Storage errors.
    fn list_peers(&self, request: ListPeersRequest) -> Result<ListPeersReply>;

    /// Trusts a peer with a volume, or with new volumes.
    ///
    /// # Errors
    /// Unknown peer or volume.
    fn trust_peer(&self, request: TrustPeerRequest) -> Result<PeerInfo>;

    /// Takes every trust from a peer.
    ///
    /// # Errors
    /// Unknown peer.
    fn revoke_peer(&self, request: RevokePeerRequest) -> Result<PeerInfo>;

    /// Wraps a volume's key to a node.
    ///
    /// # Errors
    /// Unknown volume or node, keys that do not open.
    fn share(&self, request: ShareVolumeRequest) -> Result<ShareVolumeReply>;

    /// Drops a node's envelope and rotates the volume key for new snapshots.
    ///
    /// # Errors
    /// Not shared with it; keys that do not open.
    fn unshare(&self, request: UnshareVolumeRequest) -> Result<UnshareVolumeReply>;

    /// Syncs a volume with a peer, counting chunks and bytes into `progress`.
    ///
    /// # Errors
    /// No network here; the peer refused or failed; nothing is published then.
    fn sync(&self, request: SyncVolumeRequest, progress: &Progress) -> Result<SyncVolumeReply>;

    /// Follows a peer's branch (and pulls it now), or stops following it.
    ///
    /// # Errors
    /// No network here; the peer refused (not trusted to read).
    fn follow(
        &self,
        request: FollowVolumeRequest,
        progress: &Progress,
    ) -> Result<FollowVolumeReply>;

    /// Audits a peer: random ranges of the volume's chunks it should hold, proved against
    /// their cids.
    ///
    /// # Errors
    /// No network here; the peer refused or is unreachable.
    fn audit(&self, request: AuditVolumeRequest) -> Result<AuditVolumeReply>;

    /// The transfer proofs kept.
    ///
    /// # Errors
    /// Unknown volume; a kept proof that no longer verifies.
    fn list_proofs(&self, request: ListProofsRequest) -> Result<ListProofsReply>;

    /// One proof's file.
    ///
    /// # Errors
    /// No such proof.
    fn export_proof(&self, request: ExportProofRequest) -> Result<ExportProofReply>;

    /// Forms a cluster of this node alone.
    ///
    /// # Errors
    /// No network here; already in a cluster.
    fn cluster_init(&self, request: ClusterInitRequest) -> Result<ClusterStatusReply>;

    /// Joins a peer's cluster.
    ///
    /// # Errors
    /// No network here; already in a cluster; the peer refused (no `--cluster` trust).
    fn cluster_join(&self, request: ClusterJoinRequest) -> Result<ClusterStatusReply>;

    /// The cluster as this node sees it.
    ///
    /// # Errors
    /// No network here.
    fn cluster_status(&self, request: ClusterStatusRequest) -> Result<ClusterStatusReply>;

    /// Leaves the cluster.
    ///
    /// # Errors
    /// No network here; not in a cluster; no quorum to agree on it.
    fn cluster_leave(&self, request: ClusterLeaveRequest) -> Result<ClusterStatusReply>;

    /// Creates a volume group.
    ///
    /// # Errors
    /// No network here; not in a cluster; a bad layout or node list; a name taken.
    fn create_group(&self, request: CreateGroupRequest) -> Result<GroupInfo>;

    /// Creates a volume in a volume group (the daemon's: it needs the group's Raft).
    ///
    /// # Errors
    /// No daemon; an unknown group or one this node is not in; the name taken; no quorum.
    fn create_group_volume(
        &self,
        request: forge_proto::v1::CreateGroupVolumeRequest,
    ) -> Result<forge_proto::v1::CreateVolumeReply>;

    /// Adds a cluster member to a volume group.
    ///
    /// # Errors
    /// No daemon; not a member; in the group already; no quorum.
    fn add_group_node(&self, request: forge_proto::v1::GroupNodeRequest) -> Result<GroupInfo>;

    /// Takes a member out of a volume group once its shards have new owners.
    ///
    /// # Errors
    /// No daemon; not in the group; too few left; shards not moved yet.
    fn remove_group_node(&self, request: forge_proto::v1::GroupNodeRequest) -> Result<GroupInfo>;

    /// Collects a volume group's garbage on every member.
    ///
    /// # Errors
    /// No daemon; writes in progress; an unknown group; no quorum.
    fn gc_group(
        &self,
        request: forge_proto::v1::GroupGcRequest,
    ) -> Result<forge_proto::v1::GroupGcReply>;

    /// Repairs a volume group now on every member that answers, and sums their reports.
    ///
    /// # Errors
    /// No daemon; an unknown group or one this node is not in.
    fn repair_group(
        &self,
        request: forge_proto::v1::RepairGroupRequest,
    ) -> Result<forge_proto::v1::RepairGroupReply>;
}

fn needs_daemon(what: &str) -> NodeError {
    NodeError::NeedsDaemon {
        what: what.to_owned(),
        listen: DEFAULT_LISTEN.to_owned(),
    }
}

/// The NodeId `text` names: a peer's name, its NodeId or a unique prefix, or (with
/// `any_node`) a full NodeId not added as a peer (an author met through another).
///
/// # Errors
/// [`NodeError::UnknownPeer`].
pub(crate) fn peer_node(vault: &Vault, text: &str, any_node: bool) -> Result<NodeId> {
    match vault.resolve_peer(text) {
        Ok((node, _)) => Ok(node),
        Err(NodeError::UnknownPeer { .. }) if any_node && text.len() == 64 => {
            data_encoding::HEXLOWER_PERMISSIVE
                .decode(text.as_bytes())
                .ok()
                .and_then(|bytes| NodeId::from_slice(&bytes).ok())
                .ok_or_else(|| NodeError::UnknownPeer {
                    peer: text.to_owned(),
                })
        }
        Err(error) => Err(error),
    }
}

/// A peer as the API shows it.
pub(crate) fn peer_info(vault: &Vault, node: &NodeId, record: &PeerRecord) -> Result<PeerInfo> {
    let volumes = vault.list_volumes()?;
    Ok(PeerInfo {
        node_id: node.to_hex(),
        name: record.name.clone(),
        addresses: record.addresses.clone(),
        new_volumes: record.new_volumes,
        volumes: record
            .volumes
            .iter()
            .map(|trust| PeerVolumeTrust {
                volume: volumes
                    .iter()
                    .find(|volume| volume.id == trust.volume)
                    .map(|volume| volume.name.clone())
                    .unwrap_or_default(),
                volume_id: VolumeId::from_bytes(trust.volume).to_string(),
                write: trust.write,
            })
            .collect(),
        keys_known: record.keys_known,
        cluster: vault.cluster_trusted(node)?,
        new_volumes_group: vault.new_volume_group(node)?,
    })
}

fn proof_info(vault: &Vault, id: String, proof: &TransferProof) -> Result<ProofInfo> {
    let receipt = &proof.receipt;
    Ok(ProofInfo {
        id,
        volume_id: VolumeId::from_bytes(receipt.volume).to_string(),
        volume: vault
            .list_volumes()?
            .into_iter()
            .find(|volume| volume.id == receipt.volume)
            .map(|volume| volume.name),
        snapshot: receipt.snapshot.to_hex(),
        sender: receipt.sender.to_hex(),
        receiver: receipt.receiver.to_hex(),
        chunks: receipt.chunks,
        bytes: receipt.bytes,
        time_ns: receipt.time_ns,
    })
}

impl MeshService for LocalApi<'_> {
    fn addresses(&self, _request: NodeAddrRequest) -> Result<NodeAddrReply> {
        Err(needs_daemon("`forge node addr`"))
    }

    fn add_peer(&self, _request: AddPeerRequest) -> Result<PeerInfo> {
        Err(needs_daemon("`forge peer add`"))
    }

    fn list_peers(&self, _request: ListPeersRequest) -> Result<ListPeersReply> {
        Ok(ListPeersReply {
            peers: self
                .vault
                .peers()?
                .iter()
                .map(|(node, record)| peer_info(self.vault, node, record))
                .collect::<Result<_>>()?,
        })
    }

    fn trust_peer(&self, request: TrustPeerRequest) -> Result<PeerInfo> {
        if request.group.is_some() && !request.new_volumes {
            return Err(NodeError::InvalidArgument {
                what: "trust",
                value: request.peer,
                reason: "--group names where its new volumes go: give --new-volumes with it".into(),
            });
        }
        if request.volume.is_none() && !request.new_volumes && !request.cluster {
            return Err(NodeError::InvalidArgument {
                what: "trust",
                value: request.peer,
                reason: "say what with: --volume NAME [--read|--write], --new-volumes or --cluster"
                    .into(),
            });
        }
        let node = peer_node(self.vault, &request.peer, true)?;
        let record = if request.volume.is_some() || request.new_volumes {
            self.vault.trust_peer(
                &node,
                request.volume.as_deref(),
                request.write,
                request.new_volumes,
            )?
        } else {
            self.vault.peer(&node)?.unwrap_or_default()
        };
        if request.cluster {
            self.vault.set_cluster_trust(&node, true)?;
        }
        if request.new_volumes {
            self.vault
                .set_new_volume_group(&node, request.group.as_deref())?;
        }
        peer_info(self.vault, &node, &record)
    }

    fn revoke_peer(&self, request: RevokePeerRequest) -> Result<PeerInfo> {
        let node = peer_node(self.vault, &request.peer, true)?;
        let record = self.vault.revoke_peer(&node)?;
        self.vault.set_cluster_trust(&node, false)?;
        self.vault.set_new_volume_group(&node, None)?;
        peer_info(self.vault, &node, &record)
    }

    fn share(&self, request: ShareVolumeRequest) -> Result<ShareVolumeReply> {
        let node = peer_node(self.vault, &request.to, true)?;
        self.vault
            .share_volume(&request.volume, &node, request.write, self.passphrase)?;
        Ok(ShareVolumeReply {
            node_id: node.to_hex(),
            write: request.write,
        })
    }

    fn unshare(&self, request: UnshareVolumeRequest) -> Result<UnshareVolumeReply> {
        let node = peer_node(self.vault, &request.from, true)?;
        let not_rewrapped = self
            .vault
            .unshare_volume(&request.volume, &node, self.passphrase)?;
        Ok(UnshareVolumeReply {
            node_id: node.to_hex(),
            not_rewrapped: not_rewrapped as u64,
        })
    }

    fn sync(&self, _request: SyncVolumeRequest, _progress: &Progress) -> Result<SyncVolumeReply> {
        Err(needs_daemon("`forge volume sync`"))
    }

    fn audit(&self, _request: AuditVolumeRequest) -> Result<AuditVolumeReply> {
        Err(needs_daemon("`forge volume audit`"))
    }

    fn follow(
        &self,
        _request: FollowVolumeRequest,
        _progress: &Progress,
    ) -> Result<FollowVolumeReply> {
        Err(needs_daemon("`forge volume follow`"))
    }

    fn list_proofs(&self, request: ListProofsRequest) -> Result<ListProofsReply> {
        Ok(ListProofsReply {
            proofs: self
                .vault
                .proofs(request.volume.as_deref())?
                .into_iter()
                .map(|(id, proof)| proof_info(self.vault, id, &proof))
                .collect::<Result<_>>()?,
        })
    }

    fn export_proof(&self, request: ExportProofRequest) -> Result<ExportProofReply> {
        let proof = self.vault.proof_file(&request.id)?;
        Ok(ExportProofReply {
            id: crate::vault::peers::proof_id(&proof),
            proof,
        })
    }

    fn cluster_init(&self, _request: ClusterInitRequest) -> Result<ClusterStatusReply> {
        Err(needs_daemon("`forge cluster init`"))
    }

    fn cluster_join(&self, _request: ClusterJoinRequest) -> Result<ClusterStatusReply> {
        Err(needs_daemon("`forge cluster join`"))
    }

    fn cluster_status(&self, _request: ClusterStatusRequest) -> Result<ClusterStatusReply> {
        Err(needs_daemon("`forge cluster status`"))
    }

    fn cluster_leave(&self, _request: ClusterLeaveRequest) -> Result<ClusterStatusReply> {
        Err(needs_daemon("`forge cluster leave`"))
    }

    fn create_group(&self, _request: CreateGroupRequest) -> Result<GroupInfo> {
        Err(needs_daemon("`forge group create`"))
    }

    fn create_group_volume(
        &self,
        _request: forge_proto::v1::CreateGroupVolumeRequest,
    ) -> Result<forge_proto::v1::CreateVolumeReply> {
        Err(needs_daemon("`forge volume create --group`"))
    }

    fn repair_group(
        &self,
        _request: forge_proto::v1::RepairGroupRequest,
    ) -> Result<forge_proto::v1::RepairGroupReply> {
        Err(needs_daemon("`forge group repair`"))
    }

    fn gc_group(
        &self,
        _request: forge_proto::v1::GroupGcRequest,
    ) -> Result<forge_proto::v1::GroupGcReply> {
        Err(needs_daemon("`forge group gc`"))
    }

    fn add_group_node(&self, _request: forge_proto::v1::GroupNodeRequest) -> Result<GroupInfo> {
        Err(needs_daemon("`forge group add-node`"))
    }

    fn remove_group_node(&self, _request: forge_proto::v1::GroupNodeRequest) -> Result<GroupInfo> {
        Err(needs_daemon("`forge group remove-node`"))
    }
}

fn peer_json(peer: &PeerInfo) -> serde_json::Value {
    json!({
        "node_id": peer.node_id,
        "name": peer.name,
        "addresses": peer.addresses,
        "new_volumes": peer.new_volumes,
        "keys_known": peer.keys_known,
        "cluster": peer.cluster,
        "new_volumes_group": peer.new_volumes_group,
        "volumes": peer.volumes.iter().map(|trust| json!({
            "volume": trust.volume,
            "volume_id": trust.volume_id,
            "access": if trust.write { "write" } else { "read" },
        })).collect::<Vec<_>>(),
    })
}

fn describe_trust(peer: &PeerInfo) -> String {
    let mut trusts: Vec<String> = peer
        .volumes
        .iter()
        .map(|trust| {
            let name = if trust.volume.is_empty() {
                &trust.volume_id
            } else {
                &trust.volume
            };
            format!("{name} ({})", if trust.write { "write" } else { "read" })
        })
        .collect();
    if peer.new_volumes {
        trusts.push("new volumes".into());
    }
    if peer.cluster {
        trusts.push("joining the cluster".into());
    }
    if trusts.is_empty() {
        "nothing".into()
    } else {
        trusts.join(", ")
    }
}

/// What `forge peer add|trust|revoke` prints.
#[must_use]
pub fn render_peer(verb: &str, peer: &PeerInfo) -> Output {
    let name = peer
        .name
        .as_deref()
        .map_or_else(String::new, |name| format!(" ({name})"));
    Output {
        human: format!(
            "{verb} peer {}{name}; trusted with {}",
            peer.node_id,
            describe_trust(peer)
        ),
        json: peer_json(peer),
    }
}

/// What `forge peer list` prints.
#[must_use]
pub fn render_peers(reply: &ListPeersReply) -> Output {
    let mut human = String::new();
    for peer in &reply.peers {
        let _ = writeln!(
            human,
            "{} {:<16} trusted with {}{}",
            peer.node_id,
            peer.name.as_deref().unwrap_or("-"),
            describe_trust(peer),
            peer.addresses
                .first()
                .map_or_else(String::new, |address| format!("\n    at {address}")),
        );
    }
    if reply.peers.is_empty() {
        human.push_str("no peers yet: forge peer add MULTIADDR (see `forge node addr` there)");
    }
    Output {
        human: human.trim_end().to_owned(),
        json: serde_json::Value::Array(reply.peers.iter().map(peer_json).collect()),
    }
}

/// What `forge node addr` prints.
#[must_use]
pub fn render_addresses(reply: &NodeAddrReply) -> Output {
    Output {
        human: reply.addresses.join("\n"),
        json: json!({"node_id": reply.node_id, "addresses": reply.addresses}),
    }
}

/// What `forge volume share` prints.
#[must_use]
pub fn render_share(volume: &str, reply: &ShareVolumeReply) -> Output {
    let access = if reply.write {
        "read and write"
    } else {
        "read"
    };
    Output {
        human: format!(
            "volume {volume}'s key is wrapped to node {} (it may {access}); the envelope travels \
             with the volume's next sync to it",
            reply.node_id
        ),
        json: json!({"volume": volume, "node_id": reply.node_id, "write": reply.write}),
    }
}

/// What `forge volume sync` prints.
#[must_use]
pub fn render_sync(reply: &SyncVolumeReply) -> Output {
    let direction = if reply.pull {
        "pulled from"
    } else {
        "pushed to"
    };
    let rate = if reply.seconds > 0.0 {
        format!(
            ", {:.1} MB/s",
            reply.bytes_sent as f64 / 1e6 / reply.seconds
        )
    } else {
        String::new()
    };
    Output {
        human: format!(
            "{} {direction} {}: {} chunks sent ({}), {} already there, in {:.1} s{rate}\n\
             branch {} {} at {}\nproof {} (forge proof export {} FILE)",
            reply.volume,
            reply.peer,
            reply.chunks_sent,
            human_bytes(reply.bytes_sent),
            reply.chunks_skipped,
            reply.seconds,
            reply.branch,
            reply.moved,
            reply.snapshot,
            reply.proof,
            reply.proof
        ),
        json: json!({
            "volume": reply.volume,
            "peer": reply.peer,
            "pull": reply.pull,
            "moved": reply.moved,
            "branch": reply.branch,
            "snapshot": reply.snapshot,
            "chunks_sent": reply.chunks_sent,
            "bytes_sent": reply.bytes_sent,
            "chunks_skipped": reply.chunks_skipped,
            "seconds": reply.seconds,
            "proof": reply.proof,
        }),
    }
}

/// What `forge proof list` prints.
#[must_use]
pub fn render_proofs(reply: &ListProofsReply) -> Output {
    let mut human = String::new();
    for proof in &reply.proofs {
        let _ = writeln!(
            human,
            "{}  {}  {} snapshot {}  {} chunks ({})  {} -> {}",
            proof.id,
            format_utc_time(proof.time_ns),
            proof.volume.as_deref().unwrap_or(&proof.volume_id),
            &proof.snapshot[..16.min(proof.snapshot.len())],
            proof.chunks,
            human_bytes(proof.bytes),
            &proof.sender[..12.min(proof.sender.len())],
            &proof.receiver[..12.min(proof.receiver.len())],
        );
    }
    if reply.proofs.is_empty() {
        human.push_str("no transfer proofs yet (a `forge volume sync` leaves one on both sides)");
    }
    Output {
        human: human.trim_end().to_owned(),
        json: serde_json::Value::Array(
            reply
                .proofs
                .iter()
                .map(|proof| {
                    json!({
                        "id": proof.id,
                        "volume_id": proof.volume_id,
                        "volume": proof.volume,
                        "snapshot": proof.snapshot,
                        "sender": proof.sender,
                        "receiver": proof.receiver,
                        "chunks": proof.chunks,
                        "bytes": proof.bytes,
                        "time": format_utc_time(proof.time_ns),
                    })
                })
                .collect(),
        ),
    }
}

/// What `forge volume follow|unfollow` prints.
#[must_use]
pub fn render_follow(volume: &str, peer: &str, reply: &FollowVolumeReply) -> Output {
    let pulled = reply.pulled.as_ref().map(render_sync);
    let human = if reply.following {
        format!(
            "following {volume} at {peer}: each head it announces is pulled{}",
            pulled
                .as_ref()
                .map_or_else(String::new, |output| format!("\n{}", output.human))
        )
    } else {
        format!("no longer following {volume} at {peer}")
    };
    Output {
        human,
        json: json!({
            "volume": volume,
            "peer": peer,
            "volume_id": reply.volume_id,
            "following": reply.following,
            "pulled": pulled.map(|output| output.json),
        }),
    }
}

/// What `forge volume audit` prints.
///
/// # Errors
/// [`NodeError::Damaged`] (exit 3) when a sample failed, carrying the whole report.
pub fn render_audit(reply: &AuditVolumeReply) -> Result<Output> {
    let mut human = String::new();
    for sample in &reply.samples {
        let _ = writeln!(
            human,
            "{} {} (KiB {}){}",
            sample.result,
            sample.cid,
            sample.first_kib,
            if sample.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", sample.reason)
            }
        );
    }
    let summary = format!(
        "audit of {} at {}: {} of {} chunks proved, {} failed (snapshot {})",
        reply.volume,
        reply.peer,
        reply.passed,
        reply.samples.len(),
        reply.failed,
        reply.snapshot
    );
    human.push_str(&summary);
    let output = Output {
        human,
        json: json!({
            "volume": reply.volume,
            "peer": reply.peer,
            "snapshot": reply.snapshot,
            "passed": reply.passed,
            "failed": reply.failed,
            "samples": reply.samples.iter().map(|sample| json!({
                "cid": sample.cid,
                "first_kib": sample.first_kib,
                "result": sample.result,
                "reason": sample.reason,
            })).collect::<Vec<_>>(),
        }),
    };
    if reply.failed > 0 {
        return Err(NodeError::Damaged {
            summary: format!(
                "peer {} failed {} of {} audited chunks of volume {}",
                reply.peer,
                reply.failed,
                reply.samples.len(),
                reply.volume
            ),
            report: Box::new(output),
        });
    }
    Ok(output)
}

/// What `forge volume unshare` prints.
#[must_use]
pub fn render_unshare(volume: &str, reply: &UnshareVolumeReply) -> Output {
    let mut human = format!(
        "volume {volume} is no longer shared with node {}: its key is rotated, and snapshots \
         made from now on are sealed with the new one (the node keeps what it could read \
         before: the older snapshots, and for a writer the dedup domain's key)",
        reply.node_id
    );
    if reply.not_rewrapped > 0 {
        let _ = write!(
            human,
            "\n{} other share(s) could not be wrapped again (their nodes' keys are unknown \
             here: forge peer add them, then forge volume share again)",
            reply.not_rewrapped
        );
    }
    Output {
        human,
        json: json!({
            "volume": volume,
            "node_id": reply.node_id,
            "not_rewrapped": reply.not_rewrapped,
        }),
    }
}
