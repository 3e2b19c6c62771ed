//! The server side of the control socket: while a long-lived forge process (a daemon or a
//! mount host) owns a data directory, every other `forge` command on it is a typed call
//! here (`forge.v1.Volume`, `Snapshot`, `Maintenance`, `Node`, `Mesh`, `Trust`, `Run`,
//! `Mount`; tonic over the Unix socket `<data-dir>/control.sock`, with reflection and
//! health). Each call runs the same
//! [`LocalApi`] the CLI runs in-process, on the host's open vault; long calls stream
//! progress and end with their reply. The socket is created mode 0600 inside the 0700
//! data directory: only the vault's owner can connect. A passphrase travels in request
//! metadata only, and is never logged.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use forge_proto::v1::control_server::{Control, ControlServer};
use forge_proto::v1::maintenance_server::{Maintenance, MaintenanceServer};
use forge_proto::v1::mesh_server::{Mesh, MeshServer};
use forge_proto::v1::mount_server::{Mount, MountServer};
use forge_proto::v1::node_server::{Node, NodeServer};
use forge_proto::v1::snapshot_server::{Snapshot, SnapshotServer};
use forge_proto::v1::volume_server::{Volume, VolumeServer};
use forge_proto::v1::{
    CommitReply, CommitRequest, CreateBranchReply, CreateBranchRequest, CreateVolumeReply,
    CreateVolumeRequest, DeleteSnapshotReply, DeleteSnapshotRequest, DiffBatch, DiffEntry,
    DiffRequest, ExportEvent, ExportRequest, FsckEvent, FsckRequest, GcEvent, GcRequest,
    ImportEvent, ImportRequest, ListSnapshotsReply, ListSnapshotsRequest, ListVolumesReply,
    ListVolumesRequest, NodeStatusReply, NodeStatusRequest, ScrubEvent, ScrubRequest,
    StopNodeReply, StopNodeRequest, SyncVolumeEvent, VaultStatsReply, VaultStatsRequest,
    VersionReply, VersionRequest, VolumeStatsReply, VolumeStatsRequest,
};
use forge_proto::v1::{MountReply, MountRequest};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::daemon::host::Host;
use crate::datadir::DATA_FORMAT_VERSION;
use crate::error::{ExitCode, MountFault, NodeError, Result};
use crate::service::{LocalApi, MaintenanceService, SnapshotService, VolumeService};
use crate::vault::PassphraseSource;

/// How a long call's stream says what it has to say.
struct StreamEvents<E, R> {
    /// Done so far.
    progress: fn(forge_proto::v1::Progress) -> E,
    /// The whole the work will reach.
    totals: fn(forge_proto::v1::Progress) -> E,
    /// The reply, last.
    done: fn(R) -> E,
}

// Function pointers only: copied whatever E and R are (a derive would ask them to be).
impl<E, R> Clone for StreamEvents<E, R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E, R> Copy for StreamEvents<E, R> {}

/// The [`StreamEvents`] of `$event`, whose `oneof` lives in `forge_proto::v1::$module`
/// (every streamed call's event has the same three cases).
macro_rules! stream_events {
    ($event:ident, $module:ident) => {
        StreamEvents {
            progress: |done| $event {
                event: Some(forge_proto::v1::$module::Event::Progress(done)),
            },
            totals: |totals| $event {
                event: Some(forge_proto::v1::$module::Event::Totals(totals)),
            },
            done: |reply| $event {
                event: Some(forge_proto::v1::$module::Event::Done(reply)),
            },
        }
    };
}

/// What a streamed call returns.
type EventStream<E> = tokio_stream::wrappers::ReceiverStream<std::result::Result<E, Status>>;

/// A forge error as a gRPC status: its one-line message, a status code by kind, and the
/// exit code in the metadata `forge-exit-code`.
#[must_use]
pub fn status_of(error: &NodeError) -> Status {
    let exit_code = error.exit_code();
    let code = match exit_code {
        ExitCode::Usage => tonic::Code::InvalidArgument,
        ExitCode::Integrity => tonic::Code::DataLoss,
        ExitCode::Conflict => tonic::Code::Aborted,
        _ => match error {
            NodeError::UnknownVolume { .. }
            | NodeError::UnknownSnapshot { .. }
            | NodeError::UnknownBranch { .. } => tonic::Code::NotFound,
            NodeError::VolumeExists { .. } | NodeError::BranchExists { .. } => {
                tonic::Code::AlreadyExists
            }
            NodeError::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            _ => tonic::Code::Unknown,
        },
    };
    let mut status = Status::new(code, error.to_string());
    status.metadata_mut().insert(
        forge_proto::EXIT_CODE_METADATA,
        tonic::metadata::MetadataValue::from(u32::from(exit_code as u8)),
    );
    status
}

/// How long a stopping control server waits for its clients to close their connections.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A running control server; dropping it stops it and removes the socket.
#[derive(Debug)]
pub struct ControlHandle {
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Serves the control socket of the host's data directory, on a thread of its own, until
/// the handle is dropped.
///
/// # Errors
/// The socket cannot be created.
pub fn serve(host: Arc<Host>) -> Result<ControlHandle> {
    let socket = crate::owner::socket_path(host.vault().data_dir());
    // A socket file left by a process that died is stale: we own the directory now.
    let _ = std::fs::remove_file(&socket);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(NodeError::io("starting", "the control server"))?;
    let listener = runtime
        .block_on(async { tokio::net::UnixListener::bind(&socket) })
        .map_err(NodeError::io("creating the control socket", &socket))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(NodeError::io("restricting", &socket))?;
    let (shutdown, stopped) = tokio::sync::watch::channel(false);
    let mut stopped_too = stopped.clone();
    let api = ApiGrpc { host: host.clone() };
    let service = ControlService { host };
    // Reflection lets a client list and call the services without the .proto files;
    // health answers SERVING for the control service while this socket is up.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(forge_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| MountFault::Internal {
            what: format!("building the reflection service: {error}"),
        })?;
    let (health, health_service) = tonic_health::server::health_reporter();
    runtime.block_on(async {
        health.set_serving::<ControlServer<ControlService>>().await;
        health.set_serving::<VolumeServer<ApiGrpc>>().await;
        health.set_serving::<SnapshotServer<ApiGrpc>>().await;
        health.set_serving::<MaintenanceServer<ApiGrpc>>().await;
        health.set_serving::<NodeServer<ApiGrpc>>().await;
        health.set_serving::<MountServer<ApiGrpc>>().await;
        health.set_serving::<MeshServer<ApiGrpc>>().await;
        health
            .set_serving::<forge_proto::v1::trust_server::TrustServer<ApiGrpc>>()
            .await;
        health
            .set_serving::<forge_proto::v1::run_server::RunServer<ApiGrpc>>()
            .await;
    });
    let thread = std::thread::spawn(move || {
        runtime.block_on(async move {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let mut stopped = stopped;
            let server = tonic::transport::Server::builder()
                .add_service(reflection)
                .add_service(health_service)
                .add_service(ControlServer::new(service))
                .add_service(VolumeServer::new(api.clone()))
                .add_service(SnapshotServer::new(api.clone()))
                .add_service(MaintenanceServer::new(api.clone()))
                .add_service(NodeServer::new(api.clone()))
                .add_service(MeshServer::new(api.clone()))
                .add_service(forge_proto::v1::trust_server::TrustServer::new(api.clone()))
                .add_service(forge_proto::v1::run_server::RunServer::new(api.clone()))
                .add_service(MountServer::new(api))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                });
            // A graceful stop waits for clients to close their connections; one that keeps
            // an idle connection open must not hold the daemon's stop: past the grace
            // period the server is dropped, closing whatever is left.
            let grace = async move {
                let _ = stopped_too.wait_for(|stop| *stop).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            };
            tokio::select! {
                result = server => {
                    if let Err(error) = result {
                        tracing::error!(%error, "control socket stopped");
                    }
                }
                () = grace => {
                    tracing::warn!("control socket: clients still connected {SHUTDOWN_GRACE:?} after the stop; closing their connections");
                }
            }
        });
    });
    Ok(ControlHandle {
        shutdown: Some(shutdown),
        thread: Some(thread),
        socket,
    })
}

struct ControlService {
    host: Arc<Host>,
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn version(
        &self,
        _request: Request<VersionRequest>,
    ) -> std::result::Result<Response<VersionReply>, Status> {
        Ok(Response::new(VersionReply {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            data_format_version: DATA_FORMAT_VERSION,
            node_id: self.host.vault().identity().node_id().to_string(),
        }))
    }
}

/// The passphrase a request carries in its metadata, if any.
fn passphrase_of<T>(
    request: &Request<T>,
) -> std::result::Result<Option<Zeroizing<String>>, Status> {
    request
        .metadata()
        .get_bin(forge_proto::PASSPHRASE_METADATA)
        .map(|value| {
            value
                .to_bytes()
                .map_err(|_| Status::invalid_argument("the passphrase metadata is not base64"))
                .and_then(|bytes| {
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| Status::invalid_argument("the passphrase is not UTF-8"))
                })
        })
        .transpose()
        .map(|passphrase| passphrase.map(Zeroizing::new))
}

/// Where a served call's passphrase comes from: the one the client sent, if any (this
/// process cannot prompt anyone).
fn passphrase_source(
    passphrase: Option<Zeroizing<String>>,
) -> impl Fn(&str, bool) -> Result<Zeroizing<String>> {
    move |_prompt: &str, _confirm: bool| -> Result<Zeroizing<String>> {
        passphrase.clone().ok_or_else(|| NodeError::InvalidArgument {
            what: "passphrase",
            value: String::new(),
            reason: "this command needs one and the forge process owning the vault cannot prompt: set FORGE_PASSPHRASE".into(),
        })
    }
}

/// The typed services (`forge.v1.Volume`, `forge.v1.Snapshot`), served with the vault of
/// the host: each call runs the same [`LocalApi`] the CLI runs when no daemon owns the
/// data directory.
#[derive(Clone)]
struct ApiGrpc {
    host: Arc<Host>,
}

impl ApiGrpc {
    /// Runs `call` on the host's vault off the async workers, with the request's
    /// passphrase, counting it on /metrics as `method`.
    async fn serve<T: Send + 'static, R: Send + 'static>(
        &self,
        method: &'static str,
        request: Request<T>,
        call: impl FnOnce(&LocalApi<'_>, T) -> Result<R> + Send + 'static,
    ) -> std::result::Result<Response<R>, Status> {
        self.serve_host(method, request, move |host, passphrase, message| {
            let service = LocalApi {
                vault: host.vault(),
                passphrase,
            };
            call(&service, message)
        })
        .await
    }

    /// Runs `call` on the host itself off the async workers, with the request's
    /// passphrase, counting it on /metrics as `method`.
    async fn serve_host<T: Send + 'static, R: Send + 'static>(
        &self,
        method: &'static str,
        request: Request<T>,
        call: impl FnOnce(&Arc<Host>, PassphraseSource<'_>, T) -> Result<R> + Send + 'static,
    ) -> std::result::Result<Response<R>, Status> {
        check_client_version(&request)?;
        let passphrase = passphrase_of(&request)?;
        let message = request.into_inner();
        let host = self.host.clone();
        let started = std::time::Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let source = passphrase_source(passphrase);
            let result = call(&host, &source, message);
            count_served(&host, method, &result, started);
            result
        })
        .await
        .map_err(|error| Status::internal(format!("{method} panicked: {error}")))?;
        result.map(Response::new).map_err(|error| status_of(&error))
    }
}

/// Counts a served call on /metrics by method and exit code, with its time.
fn count_served<R>(host: &Host, method: &str, result: &Result<R>, started: std::time::Instant) {
    let code = result
        .as_ref()
        .map_or_else(|error| u32::from(error.exit_code() as u8), |_| 0);
    host.metrics()
        .count_call(method, code, started.elapsed().as_secs_f64());
}

#[tonic::async_trait]
impl Mount for ApiGrpc {
    /// Mounts in this host, with the passphrase the call carried (an encrypted volume's
    /// keys need it), and answers with the ready line.
    async fn mount(
        &self,
        request: Request<MountRequest>,
    ) -> std::result::Result<Response<MountReply>, Status> {
        self.serve_host("Mount.Mount", request, |host, passphrase, message| {
            let options = crate::daemon::host::MountOptions {
                volume: message.volume,
                mountpoint: crate::service::absolute_path("mount point", message.mountpoint)?,
                branch: message.branch,
                snapshot: message.snapshot,
                read_only: message.read_only,
                background: false,
                cache_bytes: usize::try_from(message.cache_bytes).unwrap_or(usize::MAX),
            };
            let summary = host.mount(&options, passphrase)?;
            Ok(MountReply { summary })
        })
        .await
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> std::result::Result<Response<CommitReply>, Status> {
        self.serve_host("Mount.Commit", request, |host, _, message| {
            crate::service::MountService::commit(host.as_ref(), message)
        })
        .await
    }
}

#[tonic::async_trait]
impl forge_proto::v1::run_server::Run for ApiGrpc {
    type RunStream = EventStream<forge_proto::v1::RunOutput>;

    /// Runs the workload as the connecting user (the socket's peer credentials) on a
    /// thread of its own (it enters the run's mount namespace and ends with the run).
    async fn run(
        &self,
        request: Request<tonic::Streaming<forge_proto::v1::RunInput>>,
    ) -> std::result::Result<Response<Self::RunStream>, Status> {
        use forge_proto::v1::run_input::Input;
        use forge_proto::v1::run_output::Output as Out;
        use forge_proto::v1::{RunFinished, RunOutput, RunStarted, RunVolume};
        check_client_version(&request)?;
        let passphrase = passphrase_of(&request)?;
        let credentials = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| {
                Status::permission_denied("the control socket did not say who the client is")
            })?;
        let mut inputs = request.into_inner();
        let Some(forge_proto::v1::RunInput {
            input: Some(Input::Start(start)),
        }) = inputs.message().await?
        else {
            return Err(Status::invalid_argument("a run starts with its RunStart"));
        };
        let run_request = crate::daemon::run::RunRequest {
            mounts: start
                .mounts
                .into_iter()
                .map(|mount| {
                    Ok(crate::daemon::run::RunMount {
                        volume: mount.volume,
                        path: crate::service::absolute_path("run mount path", mount.path)?,
                        branch: mount.branch,
                        read_only: mount.read_only,
                    })
                })
                .collect::<Result<_>>()
                .map_err(|error| status_of(&error))?,
            command: start
                .command
                .into_iter()
                .map(crate::daemon::run::os_string)
                .collect(),
            environment: start
                .environment
                .into_iter()
                .map(|variable| {
                    (
                        crate::daemon::run::os_string(variable.name),
                        crate::daemon::run::os_string(variable.value),
                    )
                })
                .collect(),
            working_directory: std::path::PathBuf::from(crate::daemon::run::os_string(
                start.working_directory,
            )),
            manifest: start.manifest,
            cache_bytes: usize::try_from(start.cache_bytes).unwrap_or(usize::MAX),
            uid: credentials.uid(),
            gid: credentials.gid(),
        };
        let (input_sender, input) = std::sync::mpsc::channel();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inputs.message().await {
                let forwarded = match message.input {
                    Some(Input::Stdin(bytes)) => crate::daemon::run::RunInput::Stdin(bytes),
                    Some(Input::StdinClosed(_)) => crate::daemon::run::RunInput::StdinClosed,
                    Some(Input::Signal(signal)) => crate::daemon::run::RunInput::Signal(signal),
                    Some(Input::Start(_)) | None => continue,
                };
                if input_sender.send(forwarded).is_err() {
                    break;
                }
            }
        });
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let host = self.host.clone();
        std::thread::Builder::new()
            .name("forge-run".into())
            .spawn(move || {
                let started_at = std::time::Instant::now();
                let source = passphrase_source(passphrase);
                let output_sender = sender.clone();
                let output = Arc::new(move |stream, bytes: Vec<u8>| {
                    let output = match stream {
                        crate::daemon::run::RunStream::Stdout => Out::Stdout(bytes),
                        crate::daemon::run::RunStream::Stderr => Out::Stderr(bytes),
                    };
                    let _ = output_sender.blocking_send(Ok(RunOutput {
                        output: Some(output),
                    }));
                });
                let started_sender = sender.clone();
                let started = move |started: &crate::daemon::run::RunStarted| {
                    let _ = started_sender.blocking_send(Ok(RunOutput {
                        output: Some(Out::Started(RunStarted {
                            workload: started.workload.clone(),
                            mounted: started.mounted.clone(),
                        })),
                    }));
                };
                let result = host.run(
                    &run_request,
                    &source,
                    crate::daemon::run::RunStdio::Streams { input, output },
                    &started,
                );
                count_served(&host, "Run.Run", &result, started_at);
                let reply = result
                    .map(|outcome| RunOutput {
                        output: Some(Out::Finished(RunFinished {
                            exit_code: u32::from(outcome.exit_code),
                            signal: outcome.signal,
                            workload: outcome.workload,
                            volumes: outcome
                                .volumes
                                .into_iter()
                                .map(|volume| RunVolume {
                                    volume: volume.volume,
                                    branch: volume.branch,
                                    snapshot: volume
                                        .snapshot
                                        .map(|cid| cid.as_bytes().to_vec())
                                        .unwrap_or_default(),
                                    sealed: volume.sealed,
                                    summary: volume.summary,
                                })
                                .collect(),
                            dna: outcome.dna.into_iter().collect(),
                        })),
                    })
                    .map_err(|error| status_of(&error));
                let _ = sender.blocking_send(reply);
            })
            .map_err(|error| Status::internal(format!("starting the run's thread: {error}")))?;
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

#[tonic::async_trait]
impl Node for ApiGrpc {
    async fn status(
        &self,
        request: Request<NodeStatusRequest>,
    ) -> std::result::Result<Response<NodeStatusReply>, Status> {
        self.serve_host("Node.Status", request, |host, _, message| {
            crate::service::NodeService::status(host.as_ref(), message)
        })
        .await
    }

    async fn stop(
        &self,
        request: Request<StopNodeRequest>,
    ) -> std::result::Result<Response<StopNodeReply>, Status> {
        self.serve_host("Node.Stop", request, |host, _, message| {
            crate::service::NodeService::stop(host.as_ref(), message)
        })
        .await
    }
}

#[tonic::async_trait]
impl Maintenance for ApiGrpc {
    type FsckStream = EventStream<FsckEvent>;
    type GcStream = EventStream<GcEvent>;
    type ScrubStream = EventStream<ScrubEvent>;

    async fn fsck(
        &self,
        request: Request<FsckRequest>,
    ) -> std::result::Result<Response<Self::FsckStream>, Status> {
        self.serve_streaming(
            "Maintenance.Fsck",
            request,
            stream_events!(FsckEvent, fsck_event),
            |service, message, progress| service.fsck(message, progress),
        )
    }

    async fn gc(
        &self,
        request: Request<GcRequest>,
    ) -> std::result::Result<Response<Self::GcStream>, Status> {
        self.serve_streaming(
            "Maintenance.Gc",
            request,
            stream_events!(GcEvent, gc_event),
            |service, message, progress| service.gc(message, progress),
        )
    }

    async fn scrub(
        &self,
        request: Request<ScrubRequest>,
    ) -> std::result::Result<Response<Self::ScrubStream>, Status> {
        self.serve_streaming(
            "Maintenance.Scrub",
            request,
            stream_events!(ScrubEvent, scrub_event),
            |service, message, progress| service.scrub(message, progress),
        )
    }

    async fn stats(
        &self,
        request: Request<VaultStatsRequest>,
    ) -> std::result::Result<Response<VaultStatsReply>, Status> {
        self.serve("Maintenance.Stats", request, |service, message| {
            MaintenanceService::stats(service, message)
        })
        .await
    }
}

#[tonic::async_trait]
impl Snapshot for ApiGrpc {
    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> std::result::Result<Response<ListSnapshotsReply>, Status> {
        self.serve("Snapshot.List", request, |service, message| {
            SnapshotService::list(service, message)
        })
        .await
    }

    async fn branch(
        &self,
        request: Request<CreateBranchRequest>,
    ) -> std::result::Result<Response<CreateBranchReply>, Status> {
        self.serve("Snapshot.Branch", request, |service, message| {
            service.branch(message)
        })
        .await
    }

    async fn delete(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<DeleteSnapshotReply>, Status> {
        self.serve("Snapshot.Delete", request, |service, message| {
            service.delete(message)
        })
        .await
    }

    type DiffStream = EventStream<DiffBatch>;

    /// Streams the differences in batches of [`DIFF_BATCH_ENTRIES`] as the walk finds them:
    /// neither side holds a whole diff.
    async fn diff(
        &self,
        request: Request<DiffRequest>,
    ) -> std::result::Result<Response<Self::DiffStream>, Status> {
        use forge_proto::v1::diff_entry::Change;
        check_client_version(&request)?;
        let passphrase = passphrase_of(&request)?;
        let message = request.into_inner();
        let host = self.host.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let source = passphrase_source(passphrase);
            let service = LocalApi {
                vault: host.vault(),
                passphrase: &source,
            };
            let mut batch = Vec::with_capacity(DIFF_BATCH_ENTRIES);
            let mut client_gone = false;
            let result = service.diff(message, &mut |change, path| {
                if client_gone {
                    return;
                }
                let change = match change {
                    crate::vault::snapshots::DiffChange::Added => Change::Added,
                    crate::vault::snapshots::DiffChange::Removed => Change::Removed,
                    crate::vault::snapshots::DiffChange::Modified => Change::Modified,
                };
                batch.push(DiffEntry {
                    change: change.into(),
                    path: path.as_bytes().to_vec(),
                });
                if batch.len() == DIFF_BATCH_ENTRIES {
                    let entries =
                        std::mem::replace(&mut batch, Vec::with_capacity(DIFF_BATCH_ENTRIES));
                    client_gone = sender.blocking_send(Ok(DiffBatch { entries })).is_err();
                }
            });
            count_served(&host, "Snapshot.Diff", &result, started);
            let last = match result {
                Ok(()) if batch.is_empty() => return,
                Ok(()) => Ok(DiffBatch { entries: batch }),
                Err(error) => Err(status_of(&error)),
            };
            let _ = sender.blocking_send(last);
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

/// Paths a diff's stream sends per message.
const DIFF_BATCH_ENTRIES: usize = 1024;

/// How often a long call's stream reports progress.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

impl ApiGrpc {
    /// Runs a long call off the async workers with a progress nobody displays here; a
    /// second thread samples it every [`PROGRESS_INTERVAL`] into the stream (the totals
    /// once known), and the reply (or the error) ends it. A client that goes away does not
    /// stop the work: it completes (and an import publishes), as a killed client's would.
    fn serve_streaming<T, R, E>(
        &self,
        method: &'static str,
        request: Request<T>,
        events: StreamEvents<E, R>,
        call: impl FnOnce(&LocalApi<'_>, T, &crate::progress::Progress) -> Result<R> + Send + 'static,
    ) -> std::result::Result<Response<EventStream<E>>, Status>
    where
        T: Send + 'static,
        R: Send + 'static,
        E: Send + 'static,
    {
        self.serve_streaming_host(
            method,
            request,
            events,
            |host, passphrase, message, progress| {
                let service = LocalApi {
                    vault: host.vault(),
                    passphrase,
                };
                call(&service, message, progress)
            },
        )
    }

    /// [`ApiGrpc::serve_streaming`] of a call on the host itself.
    fn serve_streaming_host<T, R, E>(
        &self,
        method: &'static str,
        request: Request<T>,
        events: StreamEvents<E, R>,
        call: impl FnOnce(&Arc<Host>, PassphraseSource<'_>, T, &crate::progress::Progress) -> Result<R>
        + Send
        + 'static,
    ) -> std::result::Result<Response<EventStream<E>>, Status>
    where
        T: Send + 'static,
        R: Send + 'static,
        E: Send + 'static,
    {
        use forge_proto::v1::Progress as Done;
        check_client_version(&request)?;
        let passphrase = passphrase_of(&request)?;
        let message = request.into_inner();
        let host = self.host.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let source = passphrase_source(passphrase);
            let progress = crate::progress::Progress::new(method, false);
            // The sampler waits on this between samples: the call's end wakes it at once,
            // so the reply is not held back until the next tick.
            let (finished, wake) = std::sync::mpsc::channel::<()>();
            let (progress, sender) = (&progress, &sender);
            let result = std::thread::scope(|scope| {
                scope.spawn(move || {
                    let mut totals_sent = false;
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        wake.recv_timeout(PROGRESS_INTERVAL)
                    {
                        if !totals_sent && let Some((files, bytes)) = progress.expected() {
                            totals_sent = true;
                            let totals = (events.totals)(Done { files, bytes });
                            if sender.blocking_send(Ok(totals)).is_err() {
                                return;
                            }
                        }
                        let (files, bytes) = progress.totals();
                        let done = (events.progress)(Done { files, bytes });
                        if sender.blocking_send(Ok(done)).is_err() {
                            return;
                        }
                    }
                });
                let result = call(&host, &source, message, progress);
                drop(finished);
                result
            });
            // The final counts, so a client's line ends where the work did.
            let (files, bytes) = progress.totals();
            let _ = sender.blocking_send(Ok((events.progress)(Done { files, bytes })));
            count_served(&host, method, &result, started);
            let last = result.map(events.done).map_err(|error| status_of(&error));
            let _ = sender.blocking_send(last);
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

#[tonic::async_trait]
impl Volume for ApiGrpc {
    type ImportStream = EventStream<ImportEvent>;
    type ExportStream = EventStream<ExportEvent>;

    async fn import(
        &self,
        request: Request<ImportRequest>,
    ) -> std::result::Result<Response<Self::ImportStream>, Status> {
        self.serve_streaming(
            "Volume.Import",
            request,
            stream_events!(ImportEvent, import_event),
            |service, message, progress| VolumeService::import(service, message, progress),
        )
    }

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> std::result::Result<Response<Self::ExportStream>, Status> {
        self.serve_streaming(
            "Volume.Export",
            request,
            stream_events!(ExportEvent, export_event),
            |service, message, progress| service.export(message, progress),
        )
    }

    async fn list(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> std::result::Result<Response<ListVolumesReply>, Status> {
        self.serve("Volume.List", request, |service, message| {
            VolumeService::list(service, message)
        })
        .await
    }

    async fn create(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> std::result::Result<Response<CreateVolumeReply>, Status> {
        self.serve("Volume.Create", request, |service, message| {
            service.create(message)
        })
        .await
    }

    async fn stats(
        &self,
        request: Request<VolumeStatsRequest>,
    ) -> std::result::Result<Response<VolumeStatsReply>, Status> {
        self.serve("Volume.Stats", request, |service, message| {
            VolumeService::stats(service, message)
        })
        .await
    }
}

/// Refuses a client of another forge version (or one that does not say): the messages of
/// another version may mean something else.
fn check_client_version<T>(request: &Request<T>) -> std::result::Result<(), Status> {
    let ours = env!("CARGO_PKG_VERSION");
    let theirs = request
        .metadata()
        .get(forge_proto::VERSION_METADATA)
        .and_then(|value| value.to_str().ok());
    match theirs {
        Some(version) if version == ours => Ok(()),
        Some(version) => Err(Status::failed_precondition(format!(
            "this forge process runs version {ours} and the client is {version}: use the forge binary of the same version, or restart the daemon (`forge node stop`, `forge node start`)"
        ))),
        None => Err(Status::failed_precondition(format!(
            "the request does not say its forge version (metadata `{}`); this process runs {ours}",
            forge_proto::VERSION_METADATA
        ))),
    }
}

/// Runs a `forge.v1.Mesh` call on the host: through its network if it runs one (a
/// daemon), else in-process (a mount host: network calls say to start the daemon).
fn on_mesh<R>(
    host: &Arc<Host>,
    passphrase: PassphraseSource<'_>,
    call: impl FnOnce(&dyn crate::service::mesh::MeshService) -> Result<R>,
) -> Result<R> {
    let api = LocalApi {
        vault: host.vault(),
        passphrase,
    };
    match host.mesh() {
        Some(node) => call(&crate::daemon::mesh::DaemonMesh { api, node }),
        None => call(&api),
    }
}

/// A unary `forge.v1.Mesh` call: `$method` of the service on `$request`.
macro_rules! mesh_call {
    ($self:ident, $name:literal, $request:ident, $method:ident) => {
        $self
            .serve_host($name, $request, |host, passphrase, message| {
                on_mesh(host, passphrase, |service| service.$method(message))
            })
            .await
    };
}

#[tonic::async_trait]
impl Mesh for ApiGrpc {
    type SyncStream = EventStream<forge_proto::v1::SyncVolumeEvent>;

    async fn addresses(
        &self,
        request: Request<forge_proto::v1::NodeAddrRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::NodeAddrReply>, Status> {
        mesh_call!(self, "Mesh.Addresses", request, addresses)
    }

    async fn add_peer(
        &self,
        request: Request<forge_proto::v1::AddPeerRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::PeerInfo>, Status> {
        mesh_call!(self, "Mesh.AddPeer", request, add_peer)
    }

    async fn list_peers(
        &self,
        request: Request<forge_proto::v1::ListPeersRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ListPeersReply>, Status> {
        mesh_call!(self, "Mesh.ListPeers", request, list_peers)
    }

    async fn trust_peer(
        &self,
        request: Request<forge_proto::v1::TrustPeerRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::PeerInfo>, Status> {
        mesh_call!(self, "Mesh.TrustPeer", request, trust_peer)
    }

    async fn revoke_peer(
        &self,
        request: Request<forge_proto::v1::RevokePeerRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::PeerInfo>, Status> {
        mesh_call!(self, "Mesh.RevokePeer", request, revoke_peer)
    }

    async fn share(
        &self,
        request: Request<forge_proto::v1::ShareVolumeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ShareVolumeReply>, Status> {
        mesh_call!(self, "Mesh.Share", request, share)
    }

    async fn unshare(
        &self,
        request: Request<forge_proto::v1::UnshareVolumeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::UnshareVolumeReply>, Status> {
        mesh_call!(self, "Mesh.Unshare", request, unshare)
    }

    async fn sync(
        &self,
        request: Request<forge_proto::v1::SyncVolumeRequest>,
    ) -> std::result::Result<Response<Self::SyncStream>, Status> {
        self.serve_streaming_host(
            "Mesh.Sync",
            request,
            stream_events!(SyncVolumeEvent, sync_volume_event),
            |host, passphrase, message, progress| {
                on_mesh(host, passphrase, |service| service.sync(message, progress))
            },
        )
    }

    async fn audit(
        &self,
        request: Request<forge_proto::v1::AuditVolumeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::AuditVolumeReply>, Status> {
        mesh_call!(self, "Mesh.Audit", request, audit)
    }

    async fn follow(
        &self,
        request: Request<forge_proto::v1::FollowVolumeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::FollowVolumeReply>, Status> {
        self.serve_host("Mesh.Follow", request, |host, passphrase, message| {
            let progress = crate::progress::Progress::new("following", false);
            on_mesh(host, passphrase, |service| {
                service.follow(message, &progress)
            })
        })
        .await
    }

    async fn list_proofs(
        &self,
        request: Request<forge_proto::v1::ListProofsRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ListProofsReply>, Status> {
        mesh_call!(self, "Mesh.ListProofs", request, list_proofs)
    }

    async fn export_proof(
        &self,
        request: Request<forge_proto::v1::ExportProofRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ExportProofReply>, Status> {
        mesh_call!(self, "Mesh.ExportProof", request, export_proof)
    }

    async fn cluster_init(
        &self,
        request: Request<forge_proto::v1::ClusterInitRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ClusterStatusReply>, Status> {
        mesh_call!(self, "Mesh.ClusterInit", request, cluster_init)
    }

    async fn cluster_join(
        &self,
        request: Request<forge_proto::v1::ClusterJoinRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ClusterStatusReply>, Status> {
        mesh_call!(self, "Mesh.ClusterJoin", request, cluster_join)
    }

    async fn cluster_status(
        &self,
        request: Request<forge_proto::v1::ClusterStatusRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ClusterStatusReply>, Status> {
        mesh_call!(self, "Mesh.ClusterStatus", request, cluster_status)
    }

    async fn cluster_leave(
        &self,
        request: Request<forge_proto::v1::ClusterLeaveRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ClusterStatusReply>, Status> {
        mesh_call!(self, "Mesh.ClusterLeave", request, cluster_leave)
    }

    async fn create_group(
        &self,
        request: Request<forge_proto::v1::CreateGroupRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::GroupInfo>, Status> {
        mesh_call!(self, "Mesh.CreateGroup", request, create_group)
    }

    async fn create_group_volume(
        &self,
        request: Request<forge_proto::v1::CreateGroupVolumeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::CreateVolumeReply>, Status> {
        mesh_call!(self, "Mesh.CreateGroupVolume", request, create_group_volume)
    }

    async fn repair_group(
        &self,
        request: Request<forge_proto::v1::RepairGroupRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::RepairGroupReply>, Status> {
        mesh_call!(self, "Mesh.RepairGroup", request, repair_group)
    }

    async fn gc_group(
        &self,
        request: Request<forge_proto::v1::GroupGcRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::GroupGcReply>, Status> {
        mesh_call!(self, "Mesh.GcGroup", request, gc_group)
    }

    async fn add_group_node(
        &self,
        request: Request<forge_proto::v1::GroupNodeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::GroupInfo>, Status> {
        mesh_call!(self, "Mesh.AddGroupNode", request, add_group_node)
    }

    async fn remove_group_node(
        &self,
        request: Request<forge_proto::v1::GroupNodeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::GroupInfo>, Status> {
        mesh_call!(self, "Mesh.RemoveGroupNode", request, remove_group_node)
    }
}

/// A unary `forge.v1.Trust` call: `$method` of the service on `$request`.
macro_rules! trust_call {
    ($self:ident, $name:literal, $request:ident, $method:ident) => {
        $self
            .serve($name, $request, |service, message| {
                crate::service::trust::TrustService::$method(service, message)
            })
            .await
    };
}

#[tonic::async_trait]
impl forge_proto::v1::trust_server::Trust for ApiGrpc {
    async fn new_contract(
        &self,
        request: Request<forge_proto::v1::NewContractRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ContractText>, Status> {
        trust_call!(self, "Trust.NewContract", request, new_contract)
    }

    async fn sign_contract(
        &self,
        request: Request<forge_proto::v1::ContractText>,
    ) -> std::result::Result<Response<forge_proto::v1::ContractText>, Status> {
        trust_call!(self, "Trust.SignContract", request, sign_contract)
    }

    async fn attach_contract(
        &self,
        request: Request<forge_proto::v1::AttachContractRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ContractInfo>, Status> {
        trust_call!(self, "Trust.AttachContract", request, attach_contract)
    }

    async fn show_contract(
        &self,
        request: Request<forge_proto::v1::ShowContractRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::ContractInfo>, Status> {
        trust_call!(self, "Trust.ShowContract", request, show_contract)
    }

    async fn trust_check(
        &self,
        request: Request<forge_proto::v1::TrustCheckRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::TrustCheckReply>, Status> {
        trust_call!(self, "Trust.TrustCheck", request, trust_check)
    }

    async fn seal(
        &self,
        request: Request<forge_proto::v1::SealVolumeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::SealVolumeReply>, Status> {
        trust_call!(self, "Trust.Seal", request, seal)
    }

    async fn unfreeze(
        &self,
        request: Request<forge_proto::v1::UnfreezeVolumeRequest>,
    ) -> std::result::Result<Response<forge_proto::v1::UnfreezeVolumeReply>, Status> {
        trust_call!(self, "Trust.Unfreeze", request, unfreeze)
    }
}
