//! The client side of the control socket: a connection to the process that owns a data
//! directory, over which [`super::remote::RemoteApi`] makes typed calls. A failed call
//! says what happened to that process (it ended, nothing was acknowledged) rather than
//! leaving a transport error.

use tonic::{Request, Response, Status};

use crate::datadir::DataDir;
use crate::error::{MountFault, NodeError, Result};
use crate::owner::socket_path;

/// A client's connection to the process owning a data directory: the channel on its
/// control socket, and what a call needs to say what happened if that process dies.
pub struct Connection {
    runtime: tokio::runtime::Runtime,
    channel: tonic::transport::Channel,
    data_dir: DataDir,
    /// The owner's pid when we connected: if it is gone after a failed call, the call
    /// failed because the process ended.
    owner: Option<u32>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Connection")
            .field("data_dir", &self.data_dir)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to the process owning `data_dir`, if one serves a control socket; `None`
    /// when nobody does (the caller opens the vault itself).
    ///
    /// # Errors
    /// A socket this user may not open; one that exists but does not answer.
    pub fn open(data_dir: &DataDir) -> Result<Option<Self>> {
        let socket = socket_path(data_dir);
        if crate::owner::running_mounts(data_dir)?.is_empty()
            && crate::owner::running(data_dir).is_none()
        {
            return Ok(None);
        }
        // A host registers its first mount just before its socket is up: give it a moment.
        for _ in 0..250 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !socket.exists() {
            return Ok(None);
        }
        // Connecting needs write access to the socket (mode 0600: its owner only); say so
        // rather than a transport error.
        if let Err(nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) =
            nix::unistd::access(&socket, nix::unistd::AccessFlags::W_OK)
        {
            return Err(NodeError::SocketPermission {
                owner: crate::config::owner_of(&socket),
                socket,
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NodeError::io("starting", "the control client"))?;
        let owner = crate::owner::owner(data_dir).ok().flatten();
        let unreachable = |reason: String| MountFault::Unreachable {
            data_dir: data_dir.path().to_owned(),
            socket: socket.clone(),
            reason,
        };
        let channel = runtime.block_on(async {
            tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))
                .map_err(|error| unreachable(error.to_string()))?
                .connect()
                .await
                .map_err(|error| unreachable(error.to_string()))
        })?;
        Ok(Some(Self {
            runtime,
            channel,
            data_dir: data_dir.clone(),
            owner,
        }))
    }

    /// The channel, for a service's client.
    #[must_use]
    pub fn channel(&self) -> tonic::transport::Channel {
        self.channel.clone()
    }

    /// `message` as a request carrying this client's version and, if it has one, its
    /// passphrase (`FORGE_PASSPHRASE`), in metadata.
    #[must_use]
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(
            forge_proto::VERSION_METADATA,
            tonic::metadata::MetadataValue::from_static(env!("CARGO_PKG_VERSION")),
        );
        if let Some(passphrase) = std::env::var_os(crate::passphrase::PASSPHRASE_ENV) {
            metadata.insert_bin(
                forge_proto::PASSPHRASE_METADATA,
                tonic::metadata::MetadataValue::from_bytes(passphrase.as_encoded_bytes()),
            );
        }
        request
    }

    /// Runs one call to completion. A status becomes forge's error: the one-line message
    /// and the exit code the server sent, or, when the owner died under the call, an error
    /// saying so (not "transport error").
    ///
    /// # Errors
    /// The call's.
    pub fn call<T>(
        &self,
        call: impl std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    ) -> Result<T> {
        match self.runtime.block_on(call) {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => Err(self.error_of(&status)),
        }
    }

    /// Runs a server-streaming call to its end, giving each message to `each`.
    ///
    /// # Errors
    /// The call's, as [`Connection::call`] maps them, or `each`'s.
    pub fn stream<T>(
        &self,
        call: impl std::future::Future<
            Output = std::result::Result<Response<tonic::Streaming<T>>, Status>,
        >,
        mut each: impl FnMut(T) -> Result<()>,
    ) -> Result<()> {
        self.runtime.block_on(async {
            let mut stream = call
                .await
                .map_err(|status| self.error_of(&status))?
                .into_inner();
            while let Some(message) = stream
                .message()
                .await
                .map_err(|status| self.error_of(&status))?
            {
                each(message)?;
            }
            Ok(())
        })
    }

    /// Runs `future` on this connection's runtime (a call the helpers above do not fit:
    /// a bidirectional stream).
    pub(crate) fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A failed call's status as forge's error (see [`Connection::call`]).
    pub(crate) fn error_of(&self, status: &Status) -> NodeError {
        if let Some(code) = status
            .metadata()
            .get(forge_proto::EXIT_CODE_METADATA)
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse::<u8>().ok())
        {
            return NodeError::Forwarded {
                message: status.message().to_owned(),
                exit_code: code,
                report: None,
            };
        }
        let error = NodeError::from(MountFault::Control {
            reason: status.message().to_owned(),
        });
        match self.owner {
            // The owner died under the call (killed, crashed): say so. A killed process
            // closes its sockets before it is gone, so the call can fail a moment before
            // the process is seen dead: give it that moment.
            Some(pid) if owner_ends_soon(pid) => NodeError::OwnerEnded {
                pid,
                data_dir: self.data_dir.path().to_owned(),
                reason: error.to_string(),
            },
            _ => error,
        }
    }
}

/// Whether process `pid` is gone, or goes within half a second.
fn owner_ends_soon(pid: u32) -> bool {
    for _ in 0..50 {
        if !crate::owner::process_alive(pid) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}
