//! The typed calls made on the control socket of the process that owns the data
//! directory (a daemon or a mount host): the same [`VolumeService`] as in-process, so the
//! CLI renders the same replies whichever way they came.

use forge_proto::v1::volume_client::VolumeClient;
use forge_proto::v1::{
    CreateVolumeReply, CreateVolumeRequest, ListVolumesReply, ListVolumesRequest, VolumeStatsReply,
    VolumeStatsRequest,
};

use super::VolumeService;
use crate::control::Connection;
use crate::error::Result;

/// `forge.v1.Volume` over a connection to the owning process.
#[derive(Debug)]
pub struct RemoteVolumes<'a> {
    connection: &'a Connection,
}

impl<'a> RemoteVolumes<'a> {
    /// Calls over `connection`.
    #[must_use]
    pub fn new(connection: &'a Connection) -> Self {
        Self { connection }
    }

    fn client(&self) -> VolumeClient<tonic::transport::Channel> {
        VolumeClient::new(self.connection.channel())
    }
}

impl VolumeService for RemoteVolumes<'_> {
    fn list(&self, request: ListVolumesRequest) -> Result<ListVolumesReply> {
        let request = self.connection.request(request);
        self.connection.call(self.client().list(request))
    }

    fn create(&self, request: CreateVolumeRequest) -> Result<CreateVolumeReply> {
        let request = self.connection.request(request);
        self.connection.call(self.client().create(request))
    }

    fn stats(&self, request: VolumeStatsRequest) -> Result<VolumeStatsReply> {
        let request = self.connection.request(request);
        self.connection.call(self.client().stats(request))
    }
}
