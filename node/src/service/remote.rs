//! The typed calls made on the control socket of the process that owns the data
//! directory (a daemon or a mount host): the same [`VolumeService`] as in-process, so the
//! CLI renders the same replies whichever way they came.

use forge_proto::v1::maintenance_client::MaintenanceClient;
use forge_proto::v1::mesh_client::MeshClient;
use forge_proto::v1::mount_client::MountClient;
use forge_proto::v1::node_client::NodeClient;
use forge_proto::v1::snapshot_client::SnapshotClient;
use forge_proto::v1::volume_client::VolumeClient;
use forge_proto::v1::{
    CommitReply, CommitRequest, CreateBranchReply, CreateBranchRequest, CreateVolumeReply,
    CreateVolumeRequest, DeleteSnapshotReply, DeleteSnapshotRequest, DiffRequest, ExportReply,
    ExportRequest, FsckReply, FsckRequest, GcReply, GcRequest, ImportReply, ImportRequest,
    ListSnapshotsReply, ListSnapshotsRequest, ListVolumesReply, ListVolumesRequest,
    NodeStatusReply, NodeStatusRequest, ScrubReply, ScrubRequest, StopNodeReply, StopNodeRequest,
    VaultStatsReply, VaultStatsRequest, VolumeStatsReply, VolumeStatsRequest,
};
use forge_proto::v1::{MountReply, MountRequest, diff_entry};

use super::client::Connection;
use super::{MaintenanceService, MountService, NodeService, SnapshotService, VolumeService};
use crate::error::{NodeError, Result};
use crate::progress::Progress;
use crate::vault::snapshots::DiffChange;

/// One event of a streamed call, whatever the call: every stream's `oneof` has these three.
enum Streamed<R> {
    Progress(forge_proto::v1::Progress),
    Totals(forge_proto::v1::Progress),
    Done(R),
}

/// Reads `$event` (a streamed call's event, whose `oneof` lives in `forge_proto::v1::$module`)
/// as a [`Streamed`].
macro_rules! streamed_event {
    ($event:expr, $module:ident) => {
        $event.event.map(|event| match event {
            forge_proto::v1::$module::Event::Progress(done) => Streamed::Progress(done),
            forge_proto::v1::$module::Event::Totals(totals) => Streamed::Totals(totals),
            forge_proto::v1::$module::Event::Done(reply) => Streamed::Done(reply),
        })
    };
}

/// The typed services over a connection to the owning process.
#[derive(Debug)]
pub struct RemoteApi<'a> {
    connection: &'a Connection,
}

impl<'a> RemoteApi<'a> {
    /// Calls over `connection`.
    #[must_use]
    pub fn new(connection: &'a Connection) -> Self {
        Self { connection }
    }

    fn volumes(&self) -> VolumeClient<tonic::transport::Channel> {
        VolumeClient::new(self.connection.channel())
    }

    fn snapshots(&self) -> SnapshotClient<tonic::transport::Channel> {
        SnapshotClient::new(self.connection.channel())
    }

    fn maintenance(&self) -> MaintenanceClient<tonic::transport::Channel> {
        MaintenanceClient::new(self.connection.channel())
    }

    fn node(&self) -> NodeClient<tonic::transport::Channel> {
        NodeClient::new(self.connection.channel())
    }

    /// Runs a streamed call: its progress and totals go into `progress`, its reply (the
    /// last event) is returned. `event_of` reads one event of the call's type.
    fn streamed<E, R>(
        &self,
        method: &'static str,
        call: impl std::future::Future<
            Output = std::result::Result<tonic::Response<tonic::Streaming<E>>, tonic::Status>,
        >,
        progress: &Progress,
        event_of: impl Fn(E) -> Option<Streamed<R>>,
    ) -> Result<R> {
        let mut reply = None;
        self.connection.stream(call, |event| {
            match event_of(event) {
                Some(Streamed::Progress(done)) => progress.set_done(done.files, done.bytes),
                Some(Streamed::Totals(totals)) => {
                    progress.set_expected(totals.files, totals.bytes);
                }
                Some(Streamed::Done(done)) => reply = Some(done),
                None => {}
            }
            Ok(())
        })?;
        reply.ok_or_else(|| without_reply(method))
    }

    /// Mounts a volume in the process serving the connection (`forge.v1.Mount/Mount`):
    /// only a running host mounts for another process, so this has no in-process twin.
    ///
    /// # Errors
    /// The host's: unknown volume, branch or snapshot; a branch mounted read-write
    /// already; FUSE failures.
    pub fn mount(&self, request: MountRequest) -> Result<MountReply> {
        let request = self.connection.request(request);
        self.connection
            .call(MountClient::new(self.connection.channel()).mount(request))
    }
}

impl VolumeService for RemoteApi<'_> {
    fn list(&self, request: ListVolumesRequest) -> Result<ListVolumesReply> {
        let request = self.connection.request(request);
        self.connection.call(self.volumes().list(request))
    }

    fn create(&self, request: CreateVolumeRequest) -> Result<CreateVolumeReply> {
        let request = self.connection.request(request);
        self.connection.call(self.volumes().create(request))
    }

    fn stats(&self, request: VolumeStatsRequest) -> Result<VolumeStatsReply> {
        let request = self.connection.request(request);
        self.connection.call(self.volumes().stats(request))
    }

    fn import(&self, request: ImportRequest, progress: &Progress) -> Result<ImportReply> {
        let request = self.connection.request(request);
        self.streamed(
            "Volume.Import",
            self.volumes().import(request),
            progress,
            |event| streamed_event!(event, import_event),
        )
    }

    fn export(&self, request: ExportRequest, progress: &Progress) -> Result<ExportReply> {
        let request = self.connection.request(request);
        self.streamed(
            "Volume.Export",
            self.volumes().export(request),
            progress,
            |event| streamed_event!(event, export_event),
        )
    }
}

impl SnapshotService for RemoteApi<'_> {
    fn list(&self, request: ListSnapshotsRequest) -> Result<ListSnapshotsReply> {
        let request = self.connection.request(request);
        self.connection.call(self.snapshots().list(request))
    }

    fn branch(&self, request: CreateBranchRequest) -> Result<CreateBranchReply> {
        let request = self.connection.request(request);
        self.connection.call(self.snapshots().branch(request))
    }

    fn delete(&self, request: DeleteSnapshotRequest) -> Result<DeleteSnapshotReply> {
        let request = self.connection.request(request);
        self.connection.call(self.snapshots().delete(request))
    }

    fn diff(&self, request: DiffRequest, each: &mut dyn FnMut(DiffChange, &str)) -> Result<()> {
        let request = self.connection.request(request);
        self.connection
            .stream(self.snapshots().diff(request), |batch| {
                for entry in batch.entries {
                    let change = match diff_entry::Change::try_from(entry.change) {
                        Ok(diff_entry::Change::Added) => DiffChange::Added,
                        Ok(diff_entry::Change::Removed) => DiffChange::Removed,
                        Ok(diff_entry::Change::Modified) => DiffChange::Modified,
                        _ => {
                            return Err(NodeError::InvalidArgument {
                                what: "reply",
                                value: format!("change {}", entry.change),
                                reason: "Snapshot.Diff sent a change of no known kind".into(),
                            });
                        }
                    };
                    each(change, &String::from_utf8_lossy(&entry.path));
                }
                Ok(())
            })
    }
}

impl MaintenanceService for RemoteApi<'_> {
    fn fsck(&self, request: FsckRequest, progress: &Progress) -> Result<FsckReply> {
        let request = self.connection.request(request);
        self.streamed(
            "Maintenance.Fsck",
            self.maintenance().fsck(request),
            progress,
            |event| streamed_event!(event, fsck_event),
        )
    }

    fn gc(&self, request: GcRequest, progress: &Progress) -> Result<GcReply> {
        let request = self.connection.request(request);
        self.streamed(
            "Maintenance.Gc",
            self.maintenance().gc(request),
            progress,
            |event| streamed_event!(event, gc_event),
        )
    }

    fn scrub(&self, request: ScrubRequest, progress: &Progress) -> Result<ScrubReply> {
        let request = self.connection.request(request);
        self.streamed(
            "Maintenance.Scrub",
            self.maintenance().scrub(request),
            progress,
            |event| streamed_event!(event, scrub_event),
        )
    }

    fn stats(&self, request: VaultStatsRequest) -> Result<VaultStatsReply> {
        let request = self.connection.request(request);
        self.connection.call(self.maintenance().stats(request))
    }
}

impl NodeService for RemoteApi<'_> {
    fn status(&self, request: NodeStatusRequest) -> Result<NodeStatusReply> {
        let request = self.connection.request(request);
        self.connection.call(self.node().status(request))
    }

    fn stop(&self, request: StopNodeRequest) -> Result<StopNodeReply> {
        let request = self.connection.request(request);
        self.connection.call(self.node().stop(request))
    }
}

impl MountService for RemoteApi<'_> {
    fn commit(&self, request: CommitRequest) -> Result<CommitReply> {
        let request = self.connection.request(request);
        self.connection
            .call(MountClient::new(self.connection.channel()).commit(request))
    }
}

/// A stream that ended without its reply: a server that broke the API.
fn without_reply(method: &str) -> NodeError {
    NodeError::InvalidArgument {
        what: "reply",
        value: method.to_owned(),
        reason: "the stream ended without the call's reply".into(),
    }
}

impl RemoteApi<'_> {
    fn mesh(&self) -> MeshClient<tonic::transport::Channel> {
        MeshClient::new(self.connection.channel())
    }
}

impl super::mesh::MeshService for RemoteApi<'_> {
    fn addresses(
        &self,
        request: forge_proto::v1::NodeAddrRequest,
    ) -> Result<forge_proto::v1::NodeAddrReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().addresses(request))
    }

    fn add_peer(
        &self,
        request: forge_proto::v1::AddPeerRequest,
    ) -> Result<forge_proto::v1::PeerInfo> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().add_peer(request))
    }

    fn list_peers(
        &self,
        request: forge_proto::v1::ListPeersRequest,
    ) -> Result<forge_proto::v1::ListPeersReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().list_peers(request))
    }

    fn trust_peer(
        &self,
        request: forge_proto::v1::TrustPeerRequest,
    ) -> Result<forge_proto::v1::PeerInfo> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().trust_peer(request))
    }

    fn revoke_peer(
        &self,
        request: forge_proto::v1::RevokePeerRequest,
    ) -> Result<forge_proto::v1::PeerInfo> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().revoke_peer(request))
    }

    fn share(
        &self,
        request: forge_proto::v1::ShareVolumeRequest,
    ) -> Result<forge_proto::v1::ShareVolumeReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().share(request))
    }

    fn unshare(
        &self,
        request: forge_proto::v1::UnshareVolumeRequest,
    ) -> Result<forge_proto::v1::UnshareVolumeReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().unshare(request))
    }

    fn sync(
        &self,
        request: forge_proto::v1::SyncVolumeRequest,
        progress: &Progress,
    ) -> Result<forge_proto::v1::SyncVolumeReply> {
        let request = self.connection.request(request);
        self.streamed("Mesh.Sync", self.mesh().sync(request), progress, |event| {
            streamed_event!(event, sync_volume_event)
        })
    }

    fn audit(
        &self,
        request: forge_proto::v1::AuditVolumeRequest,
    ) -> Result<forge_proto::v1::AuditVolumeReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().audit(request))
    }

    fn follow(
        &self,
        request: forge_proto::v1::FollowVolumeRequest,
        _progress: &Progress,
    ) -> Result<forge_proto::v1::FollowVolumeReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().follow(request))
    }

    fn list_proofs(
        &self,
        request: forge_proto::v1::ListProofsRequest,
    ) -> Result<forge_proto::v1::ListProofsReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().list_proofs(request))
    }

    fn export_proof(
        &self,
        request: forge_proto::v1::ExportProofRequest,
    ) -> Result<forge_proto::v1::ExportProofReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().export_proof(request))
    }

    fn cluster_init(
        &self,
        request: forge_proto::v1::ClusterInitRequest,
    ) -> Result<forge_proto::v1::ClusterStatusReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().cluster_init(request))
    }

    fn cluster_join(
        &self,
        request: forge_proto::v1::ClusterJoinRequest,
    ) -> Result<forge_proto::v1::ClusterStatusReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().cluster_join(request))
    }

    fn cluster_status(
        &self,
        request: forge_proto::v1::ClusterStatusRequest,
    ) -> Result<forge_proto::v1::ClusterStatusReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().cluster_status(request))
    }

    fn cluster_leave(
        &self,
        request: forge_proto::v1::ClusterLeaveRequest,
    ) -> Result<forge_proto::v1::ClusterStatusReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().cluster_leave(request))
    }

    fn create_group(
        &self,
        request: forge_proto::v1::CreateGroupRequest,
    ) -> Result<forge_proto::v1::GroupInfo> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().create_group(request))
    }

    fn create_group_volume(
        &self,
        request: forge_proto::v1::CreateGroupVolumeRequest,
    ) -> Result<forge_proto::v1::CreateVolumeReply> {
        let request = self.connection.request(request);
        self.connection
            .call(self.mesh().create_group_volume(request))
    }

    fn repair_group(
        &self,
        request: forge_proto::v1::RepairGroupRequest,
    ) -> Result<forge_proto::v1::RepairGroupReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().repair_group(request))
    }

    fn gc_group(
        &self,
        request: forge_proto::v1::GroupGcRequest,
    ) -> Result<forge_proto::v1::GroupGcReply> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().gc_group(request))
    }

    fn add_group_node(
        &self,
        request: forge_proto::v1::GroupNodeRequest,
    ) -> Result<forge_proto::v1::GroupInfo> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().add_group_node(request))
    }

    fn remove_group_node(
        &self,
        request: forge_proto::v1::GroupNodeRequest,
    ) -> Result<forge_proto::v1::GroupInfo> {
        let request = self.connection.request(request);
        self.connection.call(self.mesh().remove_group_node(request))
    }
}

impl RemoteApi<'_> {
    fn trust(&self) -> forge_proto::v1::trust_client::TrustClient<tonic::transport::Channel> {
        forge_proto::v1::trust_client::TrustClient::new(self.connection.channel())
    }
}

/// A unary `forge.v1.Trust` call on the control socket.
macro_rules! trust_call {
    ($self:ident, $request:ident, $method:ident) => {{
        let request = $self.connection.request($request);
        $self.connection.call($self.trust().$method(request))
    }};
}

impl super::trust::TrustService for RemoteApi<'_> {
    fn new_contract(
        &self,
        request: forge_proto::v1::NewContractRequest,
    ) -> Result<forge_proto::v1::ContractText> {
        trust_call!(self, request, new_contract)
    }

    fn sign_contract(
        &self,
        request: forge_proto::v1::ContractText,
    ) -> Result<forge_proto::v1::ContractText> {
        trust_call!(self, request, sign_contract)
    }

    fn attach_contract(
        &self,
        request: forge_proto::v1::AttachContractRequest,
    ) -> Result<forge_proto::v1::ContractInfo> {
        trust_call!(self, request, attach_contract)
    }

    fn show_contract(
        &self,
        request: forge_proto::v1::ShowContractRequest,
    ) -> Result<forge_proto::v1::ContractInfo> {
        trust_call!(self, request, show_contract)
    }

    fn trust_check(
        &self,
        request: forge_proto::v1::TrustCheckRequest,
    ) -> Result<forge_proto::v1::TrustCheckReply> {
        trust_call!(self, request, trust_check)
    }

    fn seal(
        &self,
        request: forge_proto::v1::SealVolumeRequest,
    ) -> Result<forge_proto::v1::SealVolumeReply> {
        trust_call!(self, request, seal)
    }

    fn unfreeze(
        &self,
        request: forge_proto::v1::UnfreezeVolumeRequest,
    ) -> Result<forge_proto::v1::UnfreezeVolumeReply> {
        trust_call!(self, request, unfreeze)
    }
}
