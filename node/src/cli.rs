//! The `forge` command line: argument definitions and the commands behind them.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use forge_crypto::KdfParams;
use serde_json::json;

use crate::config::{NodeConfig, parse_size};
use crate::datadir::{DATA_FORMAT_VERSION, DataDir, SecretProtection};
use crate::error::{MountFault, NodeError, Result};
pub use crate::output::Output;
use crate::passphrase;
use crate::progress::Progress;
use crate::service::remote::RemoteApi;
use crate::service::{
    self, LocalApi, MaintenanceService, MountService, NodeService, SnapshotService, VolumeService,
};
use crate::vault::Vault;
use crate::vault::snapshots::DiffChange;
use forge_proto::v1::{
    CommitRequest, CreateBranchRequest, CreateVolumeRequest, DeleteSnapshotRequest, DiffRequest,
    ExportRequest, FsckRequest, GcRequest, ImportRequest, ListSnapshotsRequest, ListVolumesRequest,
    NodeStatusRequest, ScrubRequest, VaultStatsRequest, VolumeStatsRequest,
};
use forge_store::erasure::ErasureLayout;

/// Forge Vault: deduplicated, encrypted, erasure-coded storage for edge sites.
///
/// With no cluster configured, forge runs as a single embedded vault in its data directory.
#[derive(Debug, Parser)]
#[command(
    name = "forge",
    version,
    propagate_version = true,
    disable_version_flag = false
)]
pub struct Cli {
    /// The data directory [default: $FORGE_DATA_DIR, else ~/.local/share/forge].
    #[arg(
        long,
        global = true,
        env = "FORGE_DATA_DIR",
        value_name = "DIR",
        hide_env = true
    )]
    pub data_dir: Option<PathBuf>,

    /// Machine-readable output: JSON on stdout; errors as one JSON line on stderr.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version of forge and of the formats it reads and writes.
    Version,
    /// Create a new vault: the data directory, its format marker and this node's keys.
    Init(InitArgs),
    /// This node's identity.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Volumes: create, list, import, export, statistics.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of a volume.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Statistics of the whole vault (bytes on disk).
    Stats,
    /// Verify every object, shard and reference (exit 3 when something is wrong).
    Fsck {
        /// List every problem (by default: a count per volume and snapshot, and the first
        /// few; --json always lists all).
        #[arg(long)]
        verbose: bool,
    },
    /// Remove chunks and objects no snapshot reaches; report the bytes freed.
    Gc,
    /// Verify every chunk; with --repair, rebuild damaged shards from parity.
    Scrub {
        /// Rewrite damaged shards rebuilt from parity.
        #[arg(long)]
        repair: bool,
    },
}

/// `forge volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume.
    Create {
        /// Its name: letters, digits, '.', '_', '-'.
        name: String,
        /// Erasure layout K+M: K data and M parity shards per chunk (default 1+0).
        #[arg(long, value_name = "K+M")]
        ec: Option<ErasureLayout>,
        /// Dedup domain (default: the vault's default domain; a new name creates one;
        /// "public" is the shared public domain).
        #[arg(long, value_name = "D")]
        domain: Option<String>,
        /// Average chunk size of a new domain (e.g. 64K, 1M).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        chunk_avg: Option<u32>,
        /// Wrap the volume's keys to a passphrase (FORGE_PASSPHRASE or prompted), in a
        /// dedup domain of its own: the host cannot read it without you.
        #[arg(long)]
        encrypted: bool,
    },
    /// List volumes.
    List,
    /// Import a directory as a new snapshot.
    Import {
        /// The volume.
        name: String,
        /// The directory to import.
        source: PathBuf,
        /// Snapshot message.
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
        /// Branch to move (default main).
        #[arg(long, default_value = "main")]
        branch: String,
        /// DNA fingerprint of the producing workload, KEY=VALUE (repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
        dna: Vec<(String, String)>,
        /// Keep access times too (reading the source changes them, so a re-import stores
        /// every directory read since anew).
        #[arg(long)]
        atime: bool,
    },
    /// Export a snapshot into an empty or absent directory.
    Export {
        /// The volume.
        name: String,
        /// Destination directory (empty or absent).
        destination: PathBuf,
        /// Snapshot id (or unique prefix of 8+ characters).
        #[arg(long, conflicts_with = "branch")]
        snapshot: Option<String>,
        /// Branch whose head to export (default main).
        #[arg(long)]
        branch: Option<String>,
        /// Restore owners by their recorded ids, not by the user and group names this
        /// machine has (as root; a normal user's export leaves files its own).
        #[arg(long)]
        numeric_owner: bool,
    },
    /// Statistics of a volume.
    Stats {
        /// The volume.
        name: String,
    },
    /// Mount a branch read-write (default main), or a snapshot read-only, with FUSE.
    ///
    /// In the foreground it stays until unmounted (Ctrl-C or SIGTERM unmount cleanly);
    /// unmounting commits the changes as a snapshot.
    Mount {
        /// The volume.
        name: String,
        /// An existing directory to mount on.
        mountpoint: PathBuf,
        /// The branch to mount (read-write unless --read-only).
        #[arg(long, conflicts_with = "snapshot")]
        branch: Option<String>,
        /// A snapshot to mount read-only (id or unique prefix).
        #[arg(long)]
        snapshot: Option<String>,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Return once mounted; a background process serves it until unmounted.
        #[arg(long)]
        background: bool,
        /// Memory for decrypted chunks (e.g. 256M; default: forge.toml's
        /// mount.cache_size, 256M without one).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        cache_size: Option<u32>,
    },
    /// Unmount a forge mount, waiting until its changes are committed.
    Unmount {
        /// The mount point.
        mountpoint: PathBuf,
    },
}

impl VolumeCommand {
    /// The options of a `mount` command (None for any other).
    #[must_use]
    pub fn mount_options(&self, config: &NodeConfig) -> Option<crate::mount::MountOptions> {
        let Self::Mount {
            name,
            mountpoint,
            branch,
            snapshot,
            read_only,
            background,
            cache_size,
        } = self
        else {
            return None;
        };
        Some(crate::mount::MountOptions {
            volume: name.clone(),
            mountpoint: mountpoint.clone(),
            branch: branch.clone(),
            snapshot: snapshot.clone(),
            read_only: *read_only,
            background: *background,
            cache_bytes: cache_size.map_or(config.mount_cache_bytes, |size| size as usize),
        })
    }
}

/// `forge snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List a volume's snapshots, oldest first.
    List {
        /// The volume.
        name: String,
    },
    /// Paths added, removed and modified from snapshot A to snapshot B.
    Diff {
        /// The volume.
        name: String,
        /// The older snapshot (id or unique prefix).
        a: String,
        /// The newer snapshot.
        b: String,
    },
    /// Write a snapshot into an empty or absent directory.
    Restore {
        /// The volume.
        name: String,
        /// The snapshot (id or unique prefix).
        id: String,
        /// Destination directory.
        destination: PathBuf,
        /// Restore owners by their recorded ids, not by name.
        #[arg(long)]
        numeric_owner: bool,
    },
    /// Create a branch at a snapshot (default: the head of main).
    Branch {
        /// The volume.
        name: String,
        /// The new branch.
        new: String,
        /// The snapshot to start from.
        #[arg(long)]
        from: Option<String>,
    },
    /// Commit the working state of a mounted volume as a snapshot.
    Create {
        /// The volume.
        name: String,
        /// Snapshot message.
        #[arg(short = 'm', long = "message", default_value = "")]
        message: String,
    },
    /// Drop a snapshot from the volume's list (its data is freed by `forge gc`).
    Delete {
        /// The volume.
        name: String,
        /// The snapshot (id or unique prefix).
        id: String,
    },
}

/// Arguments of `forge init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Protect the node's secret keys with a passphrase (from FORGE_PASSPHRASE, or prompted).
    #[arg(long)]
    pub passphrase: bool,
}

/// `forge node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Print this node's id (with --json, also its public keys).
    Id,
    /// Show the forge process that owns this data directory (the daemon, or a mount
    /// host), its mounts and its socket; exit 1 when none runs.
    Status,
    /// Start the daemon: it owns the data directory, hosts every mount and serves the
    /// control socket until stopped. Returns once it serves (log in DATA_DIR/logs/).
    Start {
        /// Stay attached: serve in this process until SIGINT/SIGTERM or `node stop`.
        #[arg(long)]
        foreground: bool,
        /// Serve Prometheus metrics on this address (`off`: none; default: forge.toml's
        /// metrics_listen, 127.0.0.1:9464 without one).
        #[arg(long, value_name = "ADDR|off")]
        metrics_listen: Option<String>,
    },
    /// Print the configuration in effect (DATA_DIR/forge.toml over the defaults).
    Config,
    /// Stop the daemon (or mount host): unmount and commit every mount, close the vault,
    /// exit; waits for it.
    Stop {
        /// Seconds to wait for it to exit.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

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
            Command::Init(args) => init(&self.data_dir()?, args),
            Command::Node(NodeCommand::Id) => node_id(&self.data_dir()?),
            Command::Node(NodeCommand::Start {
                foreground,
                metrics_listen,
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
                let line =
                    crate::daemon::start(&data_dir, *foreground, metrics_listen, &ask_passphrase)?;
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
            Command::Snapshot(SnapshotCommand::Create { name, message }) => {
                // Only the process serving the mounts can commit them.
                let data_dir = self.data_dir()?;
                let Some(connection) = crate::control::Connection::open(&data_dir)? else {
                    return Err(crate::mount::nothing_to_commit(name));
                };
                service::render_commit(
                    name,
                    &RemoteApi::new(&connection).commit(CommitRequest {
                        volume: name.clone(),
                        message: message.clone(),
                    })?,
                )
            }
            Command::Node(NodeCommand::Status) => {
                let data_dir = self.data_dir()?;
                let Some(connection) = crate::control::Connection::open(&data_dir)? else {
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
                let summary = crate::mount::mount(&data_dir, &options, &ask_passphrase)?;
                Ok(Output {
                    json: json!({"summary": summary}),
                    human: summary,
                })
            }
            Command::Volume(VolumeCommand::Unmount { mountpoint }) => {
                let summary = crate::mount::unmount(&self.data_dir()?, mountpoint)?;
                Ok(Output {
                    json: json!({"summary": summary}),
                    human: summary,
                })
            }
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
                self.with_api(|api| maintenance_call(api, &self.command, passphrase_given))
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
    fn with_api(&self, call: impl FnOnce(&dyn service::Api) -> Result<Output>) -> Result<Output> {
        let data_dir = self.data_dir()?;
        if let Some(connection) = crate::control::Connection::open(&data_dir)? {
            return call(&RemoteApi::new(&connection));
        }
        let vault = Vault::open(&data_dir, &ask_passphrase)?;
        call(&LocalApi {
            vault: &vault,
            passphrase: &ask_passphrase,
        })
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
) -> Result<Output> {
    match command {
        Command::Gc => Ok(service::render_gc(&service.gc(GcRequest {})?)),
        Command::Fsck { verbose } => service::render_fsck(
            &service.fsck(FsckRequest {
                use_passphrase: passphrase_given,
            })?,
            *verbose,
        ),
        Command::Scrub { repair } => {
            service::render_scrub(&service.scrub(ScrubRequest { repair: *repair })?)
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

fn parse_key_value(text: &str) -> std::result::Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{text:?} has an empty key"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// `forge node stop`, run by the process that owns the data directory: it starts
/// unmounting everything and replies at once; the client waits for it to exit.
/// `forge node config`: the configuration in effect, as forge.toml text.
fn node_config(data_dir: &DataDir) -> Result<Output> {
    let config = NodeConfig::load(data_dir)?;
    let source = config.source.as_ref().map_or_else(
        || {
            format!(
                "# no {}: the defaults",
                data_dir.path().join(crate::config::CONFIG_FILE).display()
            )
        },
        |path| format!("# {}", path.display()),
    );
    Ok(Output {
        human: format!("{source}\n{}", config.to_toml().trim_end()),
        json: json!({
            "source": config.source,
            "log_level": config.log_level,
            "metrics_listen": config.metrics_listen,
            "mount": {"cache_size_bytes": config.mount_cache_bytes},
        }),
    })
}

/// `forge node status`, answered by the process that owns the data directory.
fn version() -> Output {
    let version = env!("CARGO_PKG_VERSION");
    Output {
        human: format!(
            "forge {version}\ndata directory format {DATA_FORMAT_VERSION}, seal format {}, envelope format {}",
            forge_crypto::seal::SEAL_FORMAT_VERSION,
            forge_crypto::envelope::ENVELOPE_FORMAT_VERSION,
        ),
        json: json!({
            "version": version,
            "data_format_version": DATA_FORMAT_VERSION,
            "seal_format_version": forge_crypto::seal::SEAL_FORMAT_VERSION,
            "envelope_format_version": forge_crypto::envelope::ENVELOPE_FORMAT_VERSION,
        }),
    }
}

fn init(data_dir: &DataDir, args: &InitArgs) -> Result<Output> {
    let protection = if args.passphrase {
        SecretProtection::Passphrase {
            passphrase: passphrase::obtain("New passphrase for this node's keys", true)?,
            params: KdfParams::DEFAULT,
        }
    } else {
        SecretProtection::FileMode
    };
    let report = data_dir.init(&protection)?;
    let node_id = report.public_keys.node_id().to_hex();
    let mut human = format!(
        "Initialized Forge vault in {}\nnode id: {node_id}",
        data_dir.path().display()
    );
    if report.passphrase_protected {
        let _ = write!(human, "\nsecret keys are passphrase-protected");
    }
    Ok(Output {
        human,
        json: json!({
            "data_dir": data_dir.path(),
            "node_id": node_id,
            "data_format_version": DATA_FORMAT_VERSION,
            "passphrase_protected": report.passphrase_protected,
        }),
    })
}

fn node_id(data_dir: &DataDir) -> Result<Output> {
    let keys = data_dir.public_keys()?;
    let hex = data_encoding::HEXLOWER;
    Ok(Output {
        human: keys.node_id().to_hex(),
        json: json!({
            "node_id": keys.node_id().to_hex(),
            "ml_dsa_65_public_key": hex.encode(keys.ml_dsa_public_key()),
            "ml_kem_768_public_key": hex.encode(keys.ml_kem_public_key()),
            "x25519_public_key": hex.encode(keys.x25519_public_key()),
            "passphrase_protected": data_dir.secrets_are_protected(),
        }),
    })
}
