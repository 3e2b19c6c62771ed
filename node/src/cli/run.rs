//! Running a parsed command: the typed ones through the service (on the daemon's socket
//! when a process owns the data directory, else on the vault opened here), the process
//! ones (node start and stop, mount and unmount) through the daemon, the rest locally.

use std::fmt::Write as _;

use serde_json::json;

use super::local::{init, node_config, node_id, proof_verify, version};
use super::*;
use crate::error::MountFault;
use crate::passphrase;
use crate::progress::Progress;
use crate::service::remote::RemoteApi;
use crate::service::{
    self, LocalApi, MaintenanceService, MountService, NodeService, SnapshotService, VolumeService,
};
use crate::vault::Vault;
use crate::vault::snapshots::DiffChange;
use forge_proto::v1::{
    AddPeerRequest, AuditVolumeRequest, ExportProofRequest, FollowVolumeRequest, ListPeersRequest,
    ListProofsRequest, NodeAddrRequest, RevokePeerRequest, ShareVolumeRequest, SyncVolumeRequest,
    TrustPeerRequest, UnshareVolumeRequest,
};
use forge_proto::v1::{
    ClusterInitRequest, ClusterJoinRequest, ClusterLeaveRequest, ClusterStatusRequest,
    CreateGroupRequest,
};
use forge_proto::v1::{
    CommitRequest, CreateBranchRequest, CreateVolumeRequest, DeleteSnapshotRequest, DiffRequest,
    ExportRequest, FsckRequest, GcRequest, ImportRequest, ListSnapshotsRequest, ListVolumesRequest,
    NodeStatusRequest, ScrubRequest, VaultStatsRequest, VolumeStatsRequest,
};

impl Cli {
    /// The data directory this invocation works on.
    ///
    /// # Errors
    /// [`crate::NodeError::NoDataDir`] when neither flag, variable nor `HOME` gives one.
    pub fn data_dir(&self) -> Result<DataDir> {
        match &self.data_dir {
            Some(path) => Ok(DataDir::new(path)),
            None => DataDir::default_path().map(DataDir::new),
        }
    }

    /// Runs the command.
    ///
    /// # Errors
    /// Whatever the command fails with; the binary maps it to an exit code.
    pub fn run(&self) -> Result<Output> {
        match &self.command {
            Command::Version => Ok(version()),
            Command::Run(args) if args.print_digest => print_digest(args),
            Command::Run(_) => self
                .run_workload()
                .unwrap_or_else(|| {
                    Err(MountFault::Internal {
                        what: "forge run reached the plain command path".into(),
                    }
                    .into())
                })
                .map(|outcome| render_run(&outcome)),
            Command::Proof(ProofCommand::Verify { file }) => proof_verify(file),
            Command::Init(args) => init(&self.data_dir()?, args),
            Command::Node(NodeCommand::Id) => node_id(&self.data_dir()?),
            Command::Node(NodeCommand::Start {
                foreground,
                metrics_listen,
                listen,
            }) => {
                let data_dir = self.data_dir()?;
                let metrics_listen = match metrics_listen {
                    Some(text) => crate::config::parse_listen(text).map_err(|reason| {
                        NodeError::InvalidArgument {
                            what: "--metrics-listen",
                            value: text.clone(),
                            reason,
                        }
                    })?,
                    None => NodeConfig::load(&data_dir)?.metrics_listen,
                };
                let line = crate::daemon::start(
                    &data_dir,
                    *foreground,
                    metrics_listen,
                    listen.as_deref(),
                    &ask_passphrase,
                )?;
                Ok(Output {
                    json: json!({"summary": line}),
                    human: line,
                })
            }
            Command::Node(NodeCommand::Stop { timeout }) => {
                let line = crate::daemon::stop(
                    &self.data_dir()?,
                    std::time::Duration::from_secs(*timeout),
                )?;
                Ok(Output {
                    json: json!({"summary": line}),
                    human: line,
                })
            }
            Command::Node(NodeCommand::Config) => Ok(node_config(&self.data_dir()?)?),
            Command::Node(NodeCommand::Addr) => self.with_api(|mesh| {
                Ok(service::mesh::render_addresses(
                    &mesh.addresses(NodeAddrRequest {})?,
                ))
            }),
            Command::Peer(command) => self.with_api(|mesh| peer_call(mesh, command)),
            Command::Cluster(command) => self.with_api(|mesh| {
                let reply = match command {
                    ClusterCommand::Init => mesh.cluster_init(ClusterInitRequest {})?,
                    ClusterCommand::Join { peer } => {
                        mesh.cluster_join(ClusterJoinRequest { peer: peer.clone() })?
                    }
                    ClusterCommand::Status => mesh.cluster_status(ClusterStatusRequest {})?,
                    ClusterCommand::Leave => mesh.cluster_leave(ClusterLeaveRequest {})?,
                };
                Ok(service::cluster::render_cluster(&reply))
            }),
            Command::Group(GroupCommand::Create { name, nodes, ec }) => self.with_api(|mesh| {
                let group = mesh.create_group(CreateGroupRequest {
                    name: name.clone(),
                    nodes: nodes.clone(),
                    data_shards: u32::try_from(ec.data_shards()).unwrap_or(u32::MAX),
                    parity_shards: u32::try_from(ec.parity_shards()).unwrap_or(u32::MAX),
                })?;
                Ok(service::cluster::render_group("created", &group))
            }),
            Command::Group(GroupCommand::AddNode { name, node }) => self.with_api(|mesh| {
                let group = mesh.add_group_node(forge_proto::v1::GroupNodeRequest {
                    name: name.clone(),
                    node: node.clone(),
                })?;
                Ok(service::cluster::render_group("grown", &group))
            }),
            Command::Group(GroupCommand::RemoveNode { name, node }) => self.with_api(|mesh| {
                let group = mesh.remove_group_node(forge_proto::v1::GroupNodeRequest {
                    name: name.clone(),
                    node: node.clone(),
                })?;
                Ok(service::cluster::render_group("shrunk", &group))
            }),
            Command::Group(GroupCommand::Gc { name }) => self.with_api(|mesh| {
                Ok(service::cluster::render_group_gc(&mesh.gc_group(
                    forge_proto::v1::GroupGcRequest { name: name.clone() },
                )?))
            }),
            Command::Group(GroupCommand::Repair { name }) => self.with_api(|mesh| {
                Ok(service::cluster::render_repair(&mesh.repair_group(
                    forge_proto::v1::RepairGroupRequest { name: name.clone() },
                )?))
            }),
            Command::Contract(command) => self.with_api(|api| contract_call(api, command)),
            Command::Volume(VolumeCommand::TrustCheck { name }) => self.with_api(|api| {
                service::trust::render_trust_check(&api.trust_check(
                    forge_proto::v1::TrustCheckRequest {
                        volume: name.clone(),
                    },
                )?)
            }),
            Command::Volume(VolumeCommand::Seal {
                name,
                branch,
                reason,
            }) => self.with_api(|api| {
                Ok(service::trust::render_seal(&api.seal(
                    forge_proto::v1::SealVolumeRequest {
                        volume: name.clone(),
                        branch: branch.clone().unwrap_or_default(),
                        reason: reason.clone(),
                    },
                )?))
            }),
            Command::Volume(VolumeCommand::Unfreeze { name }) => self.with_api(|api| {
                Ok(service::trust::render_unfreeze(&api.unfreeze(
                    forge_proto::v1::UnfreezeVolumeRequest {
                        volume: name.clone(),
                    },
                )?))
            }),
            Command::Proof(ProofCommand::List { volume }) => self.with_api(|mesh| {
                Ok(service::mesh::render_proofs(&mesh.list_proofs(
                    ListProofsRequest {
                        volume: volume.clone(),
                    },
                )?))
            }),
            Command::Proof(ProofCommand::Export { id, file }) => self.with_api(|mesh| {
                let reply = mesh.export_proof(ExportProofRequest { id: id.clone() })?;
                // Never over another file: a proof is evidence, and so may be what is there.
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(file)
                    .map_err(NodeError::io("creating", file))?;
                std::io::Write::write_all(&mut out, &reply.proof)
                    .and_then(|()| out.sync_all())
                    .map_err(NodeError::io("writing", file))?;
                Ok(Output {
                    human: format!("proof {} written to {}", reply.id, file.display()),
                    json: json!({"id": reply.id, "file": file}),
                })
            }),
            Command::Volume(VolumeCommand::Sync {
                name,
                peer,
                pull,
                branch,
                as_name,
            }) => self.with_api(|mesh| {
                let progress = Progress::counting("syncing", "chunks", !self.json);
                let reply = mesh.sync(
                    SyncVolumeRequest {
                        volume: name.clone(),
                        peer: peer.clone(),
                        pull: *pull,
                        branch: branch.clone(),
                        as_name: as_name.clone(),
                    },
                    &progress,
                );
                progress.finish();
                Ok(service::mesh::render_sync(&reply?))
            }),
            Command::Volume(VolumeCommand::Follow {
                name,
                peer,
                branch,
                as_name,
            }) => self.with_api(|mesh| {
                let progress = Progress::counting("pulling", "chunks", false);
                let reply = mesh.follow(
                    FollowVolumeRequest {
                        volume: name.clone(),
                        peer: peer.clone(),
                        branch: branch.clone(),
                        as_name: as_name.clone(),
                        unfollow: false,
                    },
                    &progress,
                )?;
                Ok(service::mesh::render_follow(name, peer, &reply))
            }),
            Command::Volume(VolumeCommand::Audit {
                name,
                peer,
                samples,
                branch,
            }) => self.with_api(|mesh| {
                service::mesh::render_audit(&mesh.audit(AuditVolumeRequest {
                    volume: name.clone(),
                    peer: peer.clone(),
                    samples: *samples,
                    branch: branch.clone(),
                })?)
            }),
            Command::Volume(VolumeCommand::Unfollow { name, peer, branch }) => {
                self.with_api(|mesh| {
                    let progress = Progress::counting("unfollowing", "chunks", false);
                    let reply = mesh.follow(
                        FollowVolumeRequest {
                            volume: name.clone(),
                            peer: peer.clone(),
                            branch: branch.clone(),
                            as_name: None,
                            unfollow: true,
                        },
                        &progress,
                    )?;
                    Ok(service::mesh::render_follow(name, peer, &reply))
                })
            }
            Command::Volume(VolumeCommand::Unshare { name, from }) => self.with_api(|mesh| {
                Ok(service::mesh::render_unshare(
                    name,
                    &mesh.unshare(UnshareVolumeRequest {
                        volume: name.clone(),
                        from: from.clone(),
                    })?,
                ))
            }),
            Command::Volume(VolumeCommand::Share { name, to, write }) => self.with_api(|mesh| {
                Ok(service::mesh::render_share(
                    name,
                    &mesh.share(ShareVolumeRequest {
                        volume: name.clone(),
                        to: to.clone(),
                        write: *write,
                    })?,
                ))
            }),
            Command::Snapshot(SnapshotCommand::Create { name, message, dna }) => {
                // Only the process serving the mounts can commit them.
                let data_dir = self.data_dir()?;
                let Some(connection) = crate::service::client::Connection::open(&data_dir)? else {
                    return Err(crate::mount::nothing_to_commit(name));
                };
                service::render_commit(
                    name,
                    &RemoteApi::new(&connection).commit(CommitRequest {
                        volume: name.clone(),
                        message: message.clone(),
                        dna: dna.iter().cloned().collect(),
                    })?,
                )
            }
            Command::Node(NodeCommand::Status) => {
                let data_dir = self.data_dir()?;
                let Some(connection) = crate::service::client::Connection::open(&data_dir)? else {
                    return Err(NodeError::NoDaemon {
                        data_dir: data_dir.path().to_owned(),
                    });
                };
                Ok(service::render_node_status(
                    &RemoteApi::new(&connection).status(NodeStatusRequest {})?,
                ))
            }
            Command::Volume(command @ VolumeCommand::Mount { .. }) => {
                let data_dir = self.data_dir()?;
                let options = command
                    .mount_options(&NodeConfig::load(&data_dir)?)
                    .ok_or_else(|| MountFault::Internal {
                        what: "a mount command without mount options".into(),
                    })?;
                let summary = crate::daemon::host::mount(&data_dir, &options, &ask_passphrase)?;
                Ok(Output {
                    json: json!({"summary": summary}),
                    human: summary,
                })
            }
            Command::Volume(VolumeCommand::Unmount { mountpoint }) => {
                let summary = crate::daemon::host::unmount(&self.data_dir()?, mountpoint)?;
                Ok(Output {
                    json: json!({"summary": summary}),
                    human: summary,
                })
            }
            Command::Volume(VolumeCommand::Create {
                name,
                group: Some(group),
                ..
            }) => self.with_api(|api| {
                service::render_create(&api.create_group_volume(
                    forge_proto::v1::CreateGroupVolumeRequest {
                        name: name.clone(),
                        group: group.clone(),
                    },
                )?)
            }),
            Command::Volume(
                command @ (VolumeCommand::List
                | VolumeCommand::Create { .. }
                | VolumeCommand::Stats { .. }
                | VolumeCommand::Import { .. }
                | VolumeCommand::Export { .. }),
            ) => self.with_api(|api| volume_call(api, command, self.json)),
            Command::Gc | Command::Stats | Command::Scrub { .. } | Command::Fsck { .. } => {
                // A passphrase given without being asked (FORGE_PASSPHRASE): fsck checks
                // every encrypted volume's snapshots with it, not only keylessly.
                let passphrase_given =
                    std::env::var_os(crate::passphrase::PASSPHRASE_ENV).is_some();
                self.with_api(|api| {
                    maintenance_call(api, &self.command, passphrase_given, self.json)
                })
            }
            Command::Snapshot(SnapshotCommand::Restore {
                name,
                id,
                destination,
                numeric_owner,
            }) => {
                // A restore is an export of one snapshot.
                let export = VolumeCommand::Export {
                    name: name.clone(),
                    destination: destination.clone(),
                    snapshot: Some(id.clone()),
                    branch: None,
                    numeric_owner: *numeric_owner,
                };
                self.with_api(|api| volume_call(api, &export, self.json))
            }
            Command::Snapshot(
                command @ (SnapshotCommand::List { .. }
                | SnapshotCommand::Branch { .. }
                | SnapshotCommand::Delete { .. }
                | SnapshotCommand::Diff { .. }),
            ) => self.with_api(|api| snapshot_call(api, command, self.json)),
        }
    }

    /// Runs `call` on the typed API: on the control socket when a process owns the data
    /// directory, else on the vault opened in this process; the same replies either way.
    /// `forge run` (None for any other command, and for `run --print-digest`): runs the
    /// workload through the process that owns the data directory, or in this one.
    /// Its output is the workload's; how it ended is returned.
    pub fn run_workload(&self) -> Option<Result<crate::daemon::run::RunOutcome>> {
        let Command::Run(args) = &self.command else {
            return None;
        };
        if args.print_digest {
            return None;
        }
        Some((|| {
            let data_dir = self.data_dir()?;
            let config = NodeConfig::load(&data_dir)?;
            let request = crate::daemon::run::RunRequest {
                mounts: args
                    .mounts
                    .iter()
                    .map(|text| crate::daemon::run::RunMount::parse(text))
                    .collect::<Result<_>>()?,
                command: args.command.clone(),
                environment: std::env::vars_os().collect(),
                working_directory: std::env::current_dir()
                    .map_err(NodeError::io("reading", "the working directory"))?,
                manifest: args
                    .manifest
                    .as_deref()
                    .map(crate::daemon::run::read_manifest)
                    .transpose()?,
                cache_bytes: args
                    .cache_size
                    .map_or(config.mount_cache_bytes, |size| size as usize),
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
            };
            if let Some(connection) = crate::service::client::Connection::open(&data_dir)? {
                return crate::daemon::run::run_remote(&connection, &request);
            }
            crate::daemon::run::run_here(&data_dir, &request, &ask_passphrase)
        })())
    }

    fn with_api(&self, call: impl FnOnce(&dyn service::Api) -> Result<Output>) -> Result<Output> {
        let data_dir = self.data_dir()?;
        if let Some(connection) = crate::service::client::Connection::open(&data_dir)? {
            return call(&RemoteApi::new(&connection));
        }
        let vault = Vault::open(&data_dir, &ask_passphrase)?;
        call(&LocalApi {
            vault: &vault,
            passphrase: &ask_passphrase,
        })
    }
}

/// `forge contract ...`: the files are read and written here, by the user running the
/// command; the vault (this process's or the daemon's) makes and signs what is in them.
fn contract_call(api: &dyn service::Api, command: &ContractCommand) -> Result<Output> {
    let read = |file: &PathBuf| {
        std::fs::read_to_string(file).map_err(NodeError::io("reading contract", file))
    };
    match command {
        ContractCommand::New {
            volume,
            workloads,
            mode,
            expires,
            max_entropy,
            output,
        } => {
            let text = api
                .new_contract(forge_proto::v1::NewContractRequest {
                    volume: volume.clone(),
                    workloads: workloads.clone(),
                    mode: mode.clone(),
                    expires: expires.clone().unwrap_or_default(),
                    max_entropy: *max_entropy,
                })?
                .text;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(output)
                .map_err(NodeError::io("creating", output))?;
            std::io::Write::write_all(&mut out, text.as_bytes())
                .map_err(NodeError::io("writing", output))?;
            Ok(Output {
                human: format!(
                    "contract for volume {volume} written to {} (unsigned): review it, then \
                     `forge contract sign {}`",
                    output.display(),
                    output.display()
                ),
                json: json!({"volume": volume, "file": output, "signed": false}),
            })
        }
        ContractCommand::Sign { file } => {
            let signed = api
                .sign_contract(forge_proto::v1::ContractText { text: read(file)? })?
                .text;
            // Written beside it and renamed over it: a crash leaves the old or the new.
            let temporary = file.with_extension("signing");
            std::fs::write(&temporary, signed.as_bytes())
                .and_then(|()| std::fs::rename(&temporary, file))
                .map_err(NodeError::io("writing", file))?;
            Ok(Output {
                human: format!(
                    "contract {} signed by this node: attach it with `forge contract attach \
                     VOLUME {}`",
                    file.display(),
                    file.display()
                ),
                json: json!({"file": file, "signed": true}),
            })
        }
        ContractCommand::Attach { name, file } => {
            let info = api.attach_contract(forge_proto::v1::AttachContractRequest {
                volume: name.clone(),
                text: read(file)?,
            })?;
            let mut output = service::trust::render_contract(&info);
            output.human = format!("contract attached to volume {name}\n{}", output.human);
            Ok(output)
        }
        ContractCommand::Show { name } => Ok(service::trust::render_contract(&api.show_contract(
            forge_proto::v1::ShowContractRequest {
                volume: name.clone(),
            },
        )?)),
    }
}

fn ask_passphrase(prompt: &str, confirm: bool) -> Result<zeroize::Zeroizing<String>> {
    passphrase::obtain(prompt, confirm)
}

/// Runs a typed maintenance command (gc, scrub, vault stats) on `service` (this process's
/// vault or the owning process's) and renders its reply.
fn maintenance_call(
    service: &dyn MaintenanceService,
    command: &Command,
    passphrase_given: bool,
    json: bool,
) -> Result<Output> {
    match command {
        Command::Gc => {
            let progress = Progress::counting("collecting", "entries", !json);
            let reply = service.gc(GcRequest {}, &progress);
            progress.finish();
            Ok(service::render_gc(&reply?))
        }
        Command::Fsck { verbose } => {
            let progress = Progress::counting("checking", "items", !json);
            let reply = service.fsck(
                FsckRequest {
                    use_passphrase: passphrase_given,
                },
                &progress,
            );
            progress.finish();
            service::render_fsck(&reply?, *verbose)
        }
        Command::Scrub { repair } => {
            let progress = Progress::counting("scrubbing", "chunks", !json);
            let reply = service.scrub(ScrubRequest { repair: *repair }, &progress);
            progress.finish();
            service::render_scrub(&reply?)
        }
        Command::Stats => Ok(service::render_vault_stats(
            &service.stats(VaultStatsRequest {})?,
        )),
        _ => Err(MountFault::Internal {
            what: "a command that is not a typed maintenance call".into(),
        }
        .into()),
    }
}

/// Runs a typed snapshot command on `service` (this process's vault or the owning
/// process's) and renders its reply.
fn snapshot_call(
    service: &dyn SnapshotService,
    command: &SnapshotCommand,
    json: bool,
) -> Result<Output> {
    match command {
        SnapshotCommand::Diff { name, a, b } => {
            let request = DiffRequest {
                volume: name.clone(),
                from: a.clone(),
                to: b.clone(),
            };
            // Only the form asked for is built: a diff can be as long as the volume.
            if json {
                let (mut added, mut removed, mut modified) = (Vec::new(), Vec::new(), Vec::new());
                service.diff(request, &mut |change, path| {
                    match change {
                        DiffChange::Added => &mut added,
                        DiffChange::Removed => &mut removed,
                        DiffChange::Modified => &mut modified,
                    }
                    .push(path.to_owned());
                })?;
                return Ok(Output {
                    human: String::new(),
                    json: json!({"added": added, "removed": removed, "modified": modified}),
                });
            }
            let mut human = String::new();
            service.diff(request, &mut |change, path| {
                let sign = match change {
                    DiffChange::Added => '+',
                    DiffChange::Removed => '-',
                    DiffChange::Modified => 'M',
                };
                let _ = writeln!(human, "{sign} {}", path.escape_debug());
            })?;
            if human.is_empty() {
                human.push_str("no differences");
            }
            human.truncate(human.trim_end().len());
            Ok(Output {
                human,
                json: serde_json::Value::Null,
            })
        }
        SnapshotCommand::List { name } => {
            service::render_snapshots(&service.list(ListSnapshotsRequest {
                volume: name.clone(),
            })?)
        }
        SnapshotCommand::Branch { name, new, from } => service::render_branch(
            name,
            new,
            &service.branch(CreateBranchRequest {
                volume: name.clone(),
                branch: new.clone(),
                from: from.clone().unwrap_or_default(),
            })?,
        ),
        SnapshotCommand::Delete { name, id } => service::render_delete(
            name,
            &service.delete(DeleteSnapshotRequest {
                volume: name.clone(),
                snapshot: id.clone(),
            })?,
        ),
        _ => Err(MountFault::Internal {
            what: "a command that is not a typed snapshot call".into(),
        }
        .into()),
    }
}

/// Runs a typed volume command on `service` (this process's vault or the owning
/// process's) and renders its reply.
fn volume_call(service: &dyn VolumeService, command: &VolumeCommand, json: bool) -> Result<Output> {
    let count = |shards: usize| u32::try_from(shards).unwrap_or(u32::MAX);
    match command {
        VolumeCommand::List => Ok(service::render_list(&service.list(ListVolumesRequest {})?)),
        VolumeCommand::Create {
            name,
            ec,
            domain,
            chunk_avg,
            encrypted,
            ..
        } => service::render_create(&service.create(CreateVolumeRequest {
            name: name.clone(),
            data_shards: ec.map_or(0, |layout| count(layout.data_shards())),
            parity_shards: ec.map_or(0, |layout| count(layout.parity_shards())),
            domain: domain.clone().unwrap_or_default(),
            chunk_avg_bytes: chunk_avg.unwrap_or(0),
            encrypted: *encrypted,
        })?),
        VolumeCommand::Stats { name } => Ok(service::render_stats(
            name,
            &service.stats(VolumeStatsRequest { name: name.clone() })?,
        )),
        VolumeCommand::Import {
            name,
            source,
            message,
            branch,
            dna,
            atime,
        } => {
            // The service takes absolute paths only: whoever serves it has its own cwd.
            let source = std::path::absolute(source).map_err(NodeError::io("resolving", source))?;
            let progress = Progress::new("importing", !json);
            let reply = service.import(
                ImportRequest {
                    volume: name.clone(),
                    source: source.into_os_string().into_encoded_bytes(),
                    message: message.clone(),
                    branch: branch.clone(),
                    dna: dna.iter().cloned().collect(),
                    atime: *atime,
                    count_totals: progress.is_live(),
                },
                &progress,
            );
            progress.finish();
            service::render_import(&reply?)
        }
        VolumeCommand::Export {
            name,
            destination,
            snapshot,
            branch,
            numeric_owner,
        } => {
            let destination = std::path::absolute(destination)
                .map_err(NodeError::io("resolving", destination))?;
            let progress = Progress::new("exporting", !json);
            let reply = service.export(
                ExportRequest {
                    volume: name.clone(),
                    destination: destination.into_os_string().into_encoded_bytes(),
                    snapshot: snapshot.clone().unwrap_or_default(),
                    branch: branch.clone().unwrap_or_default(),
                    numeric_owner: *numeric_owner,
                },
                &progress,
            );
            progress.finish();
            service::render_export(&reply?)
        }
        _ => Err(MountFault::Internal {
            what: "a command that is not a typed volume call".into(),
        }
        .into()),
    }
}

/// Runs a `forge peer` command on `mesh` and renders its reply.
fn peer_call(mesh: &dyn service::mesh::MeshService, command: &PeerCommand) -> Result<Output> {
    use service::mesh::{render_peer, render_peers};
    match command {
        PeerCommand::Add {
            address,
            name,
            expect,
        } => Ok(render_peer(
            "added",
            &mesh.add_peer(AddPeerRequest {
                address: address.clone(),
                name: name.clone(),
                expect: expect.clone(),
            })?,
        )),
        PeerCommand::List => Ok(render_peers(&mesh.list_peers(ListPeersRequest {})?)),
        PeerCommand::Trust {
            peer,
            volume,
            read: _,
            write,
            new_volumes,
            cluster,
            group,
        } => Ok(render_peer(
            "trusted",
            &mesh.trust_peer(TrustPeerRequest {
                peer: peer.clone(),
                volume: volume.clone(),
                write: *write,
                new_volumes: *new_volumes,
                cluster: *cluster,
                group: group.clone(),
            })?,
        )),
        PeerCommand::Revoke { peer } => Ok(render_peer(
            "revoked",
            &mesh.revoke_peer(RevokePeerRequest { peer: peer.clone() })?,
        )),
    }
}

/// `forge run --print-digest`: the workload digest of the command as it would run here.
fn print_digest(args: &RunArgs) -> Result<Output> {
    let program = args.command.first().ok_or_else(|| NodeError::Run {
        reason: "no command given (forge run ... -- COMMAND ARGS...)".into(),
    })?;
    let cwd = std::env::current_dir().map_err(NodeError::io("reading", "the working directory"))?;
    let manifest = args
        .manifest
        .as_deref()
        .map(crate::daemon::run::read_manifest)
        .transpose()?;
    let identity = crate::daemon::run::identify_workload(
        program,
        std::env::var_os("PATH").as_deref(),
        &cwd,
        manifest.as_deref(),
    )?;
    let program = identity.program;
    let digest = forge_store::contract::Workload::Digest(identity.digest).text();
    Ok(Output {
        human: digest.clone(),
        json: json!({"workload": digest, "program": program.display().to_string()}),
    })
}

/// How a run ended: what `forge run` prints on stderr (stdout is the workload's).
#[must_use]
pub fn render_run(outcome: &crate::daemon::run::RunOutcome) -> Output {
    let ended = if outcome.signal == 0 {
        format!("exited {}", outcome.exit_code)
    } else {
        format!("was killed by signal {}", outcome.signal)
    };
    let mut human = format!("forge run: workload {} {ended}", outcome.workload);
    for volume in &outcome.volumes {
        human.push_str("\n  ");
        human.push_str(&volume.summary);
    }
    Output {
        human,
        json: json!({
            "workload": outcome.workload,
            "exit_code": outcome.exit_code,
            "signal": outcome.signal,
            "volumes": outcome.volumes.iter().map(|volume| json!({
                "volume": volume.volume,
                "branch": volume.branch,
                "snapshot": volume.snapshot.map(|cid| cid.to_hex()),
                "sealed": volume.sealed,
                "summary": volume.summary,
            })).collect::<Vec<_>>(),
            "dna": outcome.dna,
        }),
    }
}
