//! The host: the process that owns a data directory while it serves (a daemon, or a mount
//! started with no daemon running), with the open vault and every mount it serves; and the
//! client side of `forge volume mount` and `unmount` (ask the owner, or become it).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forge_crypto::Cid;
use forge_proto::v1::{
    CommitOutcome as CommitOutcomeMessage, CommitReply, CommitRequest, MountInfo, NodeStatusReply,
    NodeStatusRequest, StopNodeReply, StopNodeRequest,
};

use crate::datadir::DataDir;
use crate::error::{MountFault, NodeError, Result};
use crate::mount::fs::{self, FuseAdapter, MountedFs};
use crate::mount::requests;
use crate::mount::working::{recoverable_working_state, unmount_commit, working_state};
use crate::mount::{CommitOutcome, WorkTarget, nothing_to_commit};
use crate::owner::{MountRecord, process_alive, registry_dir, running_mounts, socket_path};
use crate::vault::fence::PinnedRoot;
use crate::vault::trust::{DNA_WORKLOAD, MountIntent};
use crate::vault::{DEFAULT_BRANCH, OpenVolume, PassphraseSource, Vault, validate_name};
use forge_store::contract::{INTERACTIVE, Workload};

/// Environment variable marking the child process of `mount --background`.
const BACKGROUND_CHILD_ENV: &str = "FORGE_MOUNT_BACKGROUND_CHILD";
/// First word of the line a mount prints once it is ready.
const READY_WORD: &str = "mounted";

/// What to mount and how.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Volume name.
    pub volume: String,
    /// Where.
    pub mountpoint: PathBuf,
    /// Branch to mount read-write (default `main`).
    pub branch: Option<String>,
    /// Snapshot to mount read-only.
    pub snapshot: Option<String>,
    /// Mount a branch read-only.
    pub read_only: bool,
    /// Return once mounted, serving from a background process.
    pub background: bool,
    /// Bytes of decrypted chunks kept in memory.
    pub cache_bytes: usize,
}

/// Mounts a volume. If a forge process already owns the data directory, it serves the new
/// mount too (the request goes through its control socket) and this returns at once.
/// Otherwise this process becomes the mount host: in the foreground it returns when its
/// mounts are all unmounted; with `--background` a detached child hosts them and this
/// returns once the mount is ready.
///
/// # Errors
/// Unknown volume, branch or snapshot; a branch already mounted read-write; FUSE failures.
pub fn mount(
    data_dir: &DataDir,
    options: &MountOptions,
    passphrase: PassphraseSource<'_>,
) -> Result<String> {
    let (mountpoint, _, _) = check_options(options)?;
    if let Some(summary) = mount_remotely(data_dir, options, &mountpoint)? {
        return Ok(summary);
    }
    if options.background && std::env::var_os(BACKGROUND_CHILD_ENV).is_none() {
        return spawn_background(data_dir, &mountpoint);
    }
    // Before any thread starts (RocksDB's, the file systems'): every thread inherits the
    // mask, so SIGINT/SIGTERM reach only the thread that unmounts cleanly.
    block_termination_signals();
    // Another mount or daemon may be starting at this very moment: it holds the lock
    // before its socket is up. Ask it once it serves, rather than wait for it to exit.
    let started = std::time::Instant::now();
    let host = loop {
        match Host::open(data_dir, passphrase) {
            Ok(host) => break Arc::new(host),
            Err(NodeError::Busy { .. }) if started.elapsed() < OWNER_STARTS_WITHIN => {
                std::thread::sleep(Duration::from_millis(50));
                if let Some(summary) = mount_remotely(data_dir, options, &mountpoint)? {
                    return Ok(summary);
                }
            }
            Err(error) => return Err(error),
        }
    };
    let ready = host.mount(options, passphrase)?;
    // Other commands on this data directory now run here, through the control socket: it
    // is up before anyone is told the mount is ready.
    let control = crate::daemon::control::serve(host.clone())?;
    {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{ready}");
        let _ = stdout.flush();
    }
    let signalled = host.clone();
    std::thread::spawn(move || {
        wait_for_termination_signal();
        signalled.unmount_all();
    });
    let last = host.wait_until_idle(control);
    // The last summaries are published only after the host is dropped here. The vault
    // itself closes when the process exits (the signal thread holds the host too): the
    // next command waits on the data-directory lock until then.
    let pending = host.take_pending_summaries();
    drop(host);
    for (id, text) in pending {
        publish_summary(data_dir, id, &text);
    }
    match last {
        Some(Ok(text)) => Ok(text),
        Some(Err(reason)) => Err(MountFault::CommitFailed { reason }.into()),
        None => Ok(format!("unmounted {}", mountpoint.display())),
    }
}

/// How long a starting owner (daemon or mount host) may hold the lock before its socket
/// serves; a mount waits that long for it before saying the directory is busy.
const OWNER_STARTS_WITHIN: Duration = Duration::from_secs(10);

/// Asks the process owning the data directory, if one serves, to mount; its summary.
fn mount_remotely(
    data_dir: &DataDir,
    options: &MountOptions,
    mountpoint: &Path,
) -> Result<Option<String>> {
    let Some(connection) = crate::service::client::Connection::open(data_dir)? else {
        return Ok(None);
    };
    let reply = crate::service::remote::RemoteApi::new(&connection).mount(
        forge_proto::v1::MountRequest {
            volume: options.volume.clone(),
            mountpoint: mountpoint.to_owned().into_os_string().into_encoded_bytes(),
            branch: options.branch.clone(),
            snapshot: options.snapshot.clone(),
            read_only: options.read_only,
            cache_bytes: options.cache_bytes as u64,
        },
    )?;
    Ok(Some(reply.summary))
}

/// Validates the options: the mount point (resolved), read-only-ness and branch.
fn check_options(options: &MountOptions) -> Result<(PathBuf, bool, String)> {
    if let Some(branch) = &options.branch {
        validate_name("branch name", branch)?;
    }
    let metadata = match std::fs::metadata(&options.mountpoint) {
        Ok(metadata) => metadata,
        Err(error) if error.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountFault::Stale {
                mountpoint: options.mountpoint.clone(),
            }
            .into());
        }
        Err(error) => {
            return Err(NodeError::io("reading mount point", &options.mountpoint)(
                error,
            ));
        }
    };
    if !metadata.is_dir() {
        return Err(NodeError::InvalidArgument {
            what: "mount point",
            value: options.mountpoint.display().to_string(),
            reason: "not a directory".into(),
        });
    }
    let mountpoint = options
        .mountpoint
        .canonicalize()
        .map_err(NodeError::io("resolving", &options.mountpoint))?;
    let read_only = options.read_only || options.snapshot.is_some();
    let branch = options
        .branch
        .clone()
        .unwrap_or_else(|| DEFAULT_BRANCH.to_owned());
    Ok((mountpoint, read_only, branch))
}

/// Starts this same command again as a detached child and waits for its ready line.
fn spawn_background(data_dir: &DataDir, mountpoint: &Path) -> Result<String> {
    let arguments: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|argument| argument != "--background")
        .collect();
    let log_path = registry_dir(data_dir).join("mount.log");
    match crate::daemon::spawn_detached(
        data_dir,
        &arguments,
        (BACKGROUND_CHILD_ENV, "1"),
        &log_path,
        READY_WORD,
    )? {
        crate::daemon::Detached::Ready(line) => Ok(line),
        crate::daemon::Detached::Failed { status, reason } => Err(MountFault::BackgroundFailed {
            mountpoint: mountpoint.to_owned(),
            status,
            reason,
        }
        .into()),
    }
}

/// The process that owns a data directory while volumes are mounted: the open vault and
/// every mount it serves.
pub struct Host {
    data_dir: DataDir,
    vault: Arc<Vault>,
    state: Mutex<HostState>,
    changed: std::sync::Condvar,
    /// Held while a mount is checked and set up: two requests for the same branch cannot
    /// both pass the one-read-write-mount check.
    mounting: Mutex<()>,
    /// When the host opened the vault (for `forge node status`'s uptime).
    started: std::time::Instant,
    /// The daemon's metrics registry (served only when a listener is configured).
    metrics: crate::daemon::metrics::Metrics,
    /// What every mount of this host records its requests into (registered in `metrics`).
    fuse_metrics: requests::FuseMetrics,
    /// Where /metrics is served, if anywhere.
    metrics_address: Mutex<Option<std::net::SocketAddr>>,
    /// The node's network (a daemon's; a mount host has none).
    mesh: std::sync::OnceLock<crate::daemon::mesh::MeshNode>,
}

#[derive(Default)]
struct HostState {
    next_id: u64,
    active: Vec<Arc<ActiveMount>>,
    /// The summary of the mount that finished last.
    last_summary: Option<std::result::Result<String, String>>,
    /// Finished mounts whose summary is not published yet (the last ones wait for the
    /// vault to close).
    unpublished: Vec<(u64, String)>,
    /// Started by `forge node start`: serves until stopped, not only while mounts last.
    persistent: bool,
    /// `forge node stop` or a termination signal arrived: unmount everything and exit.
    stopping: bool,
    /// `forge run`s under way: each holds the host until it committed and sealed.
    runs: usize,
}

impl HostState {
    /// Whether the host still has a reason to serve.
    fn serving(&self) -> bool {
        !self.active.is_empty() || self.runs > 0 || (self.persistent && !self.stopping)
    }
}

/// One mount a host serves.
struct ActiveMount {
    id: u64,
    record: MountRecord,
    fs: Arc<MountedFs>,
    unmounter: Mutex<Option<fuser::SessionUnmounter>>,
    /// The run this mount serves (its mount namespace is the run's: it is stopped by
    /// stopping the workload, which unmounts it).
    run: Option<Arc<crate::daemon::run::RunStop>>,
}

/// Who a mount serves.
pub(crate) enum MountUse {
    /// A person (`forge volume mount`): the workload `interactive`.
    Interactive,
    /// A `forge run` workload: its digest, the DNA its commits carry, and how the host
    /// stops it. Mounted in the calling thread's mount namespace.
    Run {
        workload: Workload,
        dna: BTreeMap<String, String>,
        stop: Arc<crate::daemon::run::RunStop>,
    },
}

/// A mount being served.
pub(crate) struct Mounted {
    /// The line saying what is mounted where.
    pub ready: String,
    /// Its file system.
    pub fs: Arc<MountedFs>,
    /// Where it is mounted (resolved).
    pub mountpoint: PathBuf,
    /// The thread serving it: it ends once the mount is unmounted and committed.
    pub served: std::thread::JoinHandle<()>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Host")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Opens the vault of `data_dir` to host mounts, as its owner.
    ///
    /// # Errors
    /// [`NodeError::Busy`] when another process holds the directory; as [`Vault::open`].
    pub fn open(data_dir: &DataDir, passphrase: PassphraseSource<'_>) -> Result<Self> {
        let vault = Arc::new(Vault::open_owned(data_dir, passphrase)?);
        let fuse_metrics = requests::FuseMetrics::default();
        // We own the directory now: staging files of earlier hosts are leftovers of a
        // crash (their fsynced data lives in the vault, the rest was never acknowledged).
        if let Ok(entries) = std::fs::read_dir(data_dir.path().join("staging")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self {
            data_dir: data_dir.clone(),
            vault,
            state: Mutex::new(HostState::default()),
            changed: std::sync::Condvar::new(),
            mounting: Mutex::new(()),
            started: std::time::Instant::now(),
            metrics: crate::daemon::metrics::Metrics::new(&fuse_metrics),
            fuse_metrics,
            metrics_address: Mutex::new(None),
            mesh: std::sync::OnceLock::new(),
        })
    }

    /// Starts the node's network on `listen` (see [`crate::daemon::mesh::MeshNode::start`]).
    ///
    /// # Errors
    /// The address cannot be listened on.
    pub fn start_mesh(self: &Arc<Self>, listen: &str, configured: bool) -> Result<()> {
        let node = crate::daemon::mesh::MeshNode::start(self, listen, configured)?;
        let _ = self.mesh.set(node);
        Ok(())
    }

    /// The node's network, if this host runs one.
    #[must_use]
    pub fn mesh(&self) -> Option<&crate::daemon::mesh::MeshNode> {
        self.mesh.get()
    }

    /// The metrics registry.
    #[must_use]
    pub fn metrics(&self) -> &crate::daemon::metrics::Metrics {
        &self.metrics
    }

    /// Where /metrics is served (None: no listener).
    #[must_use]
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        *self
            .metrics_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records where /metrics is served.
    pub(crate) fn set_metrics_address(&self, address: std::net::SocketAddr) {
        *self
            .metrics_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(address);
    }

    /// Makes this host serve until [`Host::stop`] (a daemon), not only while it has mounts.
    pub(crate) fn keep_running(&self) {
        self.lock().persistent = true;
    }

    /// Unmounts (and so commits) every mount and lets the host exit once they are done;
    /// returns the mounts it is unmounting.
    pub fn stop(&self) -> Vec<MountRecord> {
        let mounts = {
            let mut state = self.lock();
            state.stopping = true;
            state
                .active
                .iter()
                .map(|active| active.record.clone())
                .collect()
        };
        self.changed.notify_all();
        self.unmount_all();
        mounts
    }

    /// How long this host has served, and the mounts it serves now (in the order they
    /// were made).
    #[must_use]
    pub fn status(&self) -> (std::time::Duration, Vec<MountRecord>) {
        let mounts = self
            .lock()
            .active
            .iter()
            .map(|active| active.record.clone())
            .collect();
        (self.started.elapsed(), mounts)
    }

    /// The open vault.
    #[must_use]
    pub fn vault(&self) -> &Arc<Vault> {
        &self.vault
    }

    /// Counts a run under way until the guard drops (the host serves until it ends).
    pub(crate) fn hold_for_run(&self) -> RunHold<'_> {
        self.lock().runs += 1;
        RunHold { host: self }
    }

    /// Whether the host is stopping (a run must not start).
    pub(crate) fn stopping(&self) -> bool {
        self.lock().stopping
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Mounts a volume and serves it on a thread of its own; returns the ready line.
    ///
    /// # Errors
    /// As [`mount`].
    pub fn mount(
        self: &Arc<Self>,
        options: &MountOptions,
        passphrase: PassphraseSource<'_>,
    ) -> Result<String> {
        Ok(self
            .mount_as(options, passphrase, MountUse::Interactive)?
            .ready)
    }

    /// [`Host::mount`] for `usage`.
    pub(crate) fn mount_as(
        self: &Arc<Self>,
        options: &MountOptions,
        passphrase: PassphraseSource<'_>,
        usage: MountUse,
    ) -> Result<Mounted> {
        let (mountpoint, read_only, branch) = check_options(options)?;
        let (workload, dna, run) = match usage {
            MountUse::Interactive => (
                Workload::Interactive,
                BTreeMap::from([(DNA_WORKLOAD.to_owned(), INTERACTIVE.to_owned())]),
                None,
            ),
            MountUse::Run {
                workload,
                dna,
                stop,
            } => (workload, dna, Some(stop)),
        };
        let _mounting = self
            .mounting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for active in &self.lock().active {
            let record = &active.record;
            // Each run mounts in a namespace of its own: its paths meet only its own.
            let same_namespace = match (&active.run, &run) {
                (None, None) => true,
                (Some(theirs), Some(ours)) => Arc::ptr_eq(theirs, ours),
                _ => false,
            };
            if same_namespace && record.mountpoint == mountpoint {
                return Err(MountFault::AlreadyMounted {
                    mountpoint: mountpoint.clone(),
                }
                .into());
            }
            if record.volume == options.volume
                && record.branch.as_deref() == Some(branch.as_str())
                && !record.read_only
                && !read_only
            {
                return Err(NodeError::AlreadyMounted {
                    volume: record.volume.clone(),
                    branch,
                    mountpoint: record.mountpoint.display().to_string(),
                    pid: record.pid,
                });
            }
        }
        let vault = &self.vault;
        let volume = Arc::new(vault.open_volume(&options.volume, passphrase)?);
        // The volume's contract, seal and freeze, before anything is served: a refusal
        // names the clause, never a silent mount.
        let policy = vault.check_mount(
            &volume.record,
            MountIntent {
                read_only,
                workload: &workload,
            },
        )?;
        // The session starts before anything is resolved, so what the mount serves is
        // pinned against gc before we check it is still there (see vault/fence.rs).
        let session = vault.open_write_session("mount", volume.id)?;
        let mut notes = Vec::new();
        // What the mount serves, to pin: a snapshot, or a recovered working tree.
        let mut served: Option<PinnedRoot>;
        let (root, work) = if let Some(snapshot) = &options.snapshot {
            let snapshot = vault.resolve_snapshot(&volume.record, snapshot)?;
            let commit = vault.read_commit(&volume, &snapshot)?;
            served = Some(PinnedRoot::Snapshot(*snapshot.as_bytes()));
            (Some(Cid::from_bytes(commit.root)), None)
        } else {
            let head = vault.refs().get_ref(&volume.id, &branch)?;
            if head.is_none() && branch != DEFAULT_BRANCH {
                return Err(NodeError::UnknownBranch {
                    volume: options.volume.clone(),
                    branch,
                });
            }
            let mut root = match head {
                Some(head) => Some(Cid::from_bytes(vault.read_commit(&volume, &head)?.root)),
                None => None,
            };
            let mut base = head;
            served = head.map(|head| PinnedRoot::Snapshot(*head.as_bytes()));
            if !read_only
                && let Some(state) = recoverable_working_state(vault, &volume, &branch, root)?
            {
                root = Some(Cid::from_bytes(state.root));
                served = Some(PinnedRoot::Tree(state.root));
                base = state.base.map(Cid::from_bytes);
                notes.push(
                    "recovered the working state a previous mount left (fsynced data is back)",
                );
            }
            let work = (!read_only).then(|| WorkTarget {
                branch: branch.clone(),
                base,
            });
            (root, work)
        };
        if let Some(served) = served {
            pin_served_root(vault, &volume, &session, served, &branch)?;
        }
        let id = {
            let mut state = self.lock();
            state.next_id += 1;
            state.next_id
        };
        let staging = self
            .data_dir
            .path()
            .join("staging")
            .join(format!("{}-{id}", std::process::id()));
        let fs = Arc::new(MountedFs::new(
            vault.clone(),
            volume,
            root,
            fs::FsConfig {
                read_only,
                append_only: policy.append_only,
                // FORGE_DETECTOR=off in the host's environment mounts without the behaviour
                // detector (what bench-mount.sh measures it against).
                detector: (std::env::var("FORGE_DETECTOR").as_deref() != Ok("off"))
                    .then_some(policy.detector),
                dna,
                cache_bytes: options.cache_bytes,
                staging_dir: staging.clone(),
                metrics: self.fuse_metrics.clone(),
            },
            work.map(Mutex::new),
            session,
        )?);
        if !notes.is_empty() {
            fs.mark_changed();
        }
        let mut mount_options = vec![
            fuser::MountOption::FSName(format!("forge:{}", options.volume)),
            fuser::MountOption::Subtype("forge".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
        ];
        mount_options.push(if read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        });
        let mut config = fuser::Config::default();
        config.mount_options = mount_options;
        // Mounted by root, a volume serves every user (`allow_other`; the kernel checks
        // each request against the owners and modes the volume keeps:
        // `default_permissions`).
        if nix::unistd::geteuid().is_root() {
            config.acl = fuser::SessionACL::All;
        }
        config.n_threads = Some(4);
        config.clone_fd = true;
        let mut session = fuser::Session::new(FuseAdapter(fs.clone()), &mountpoint, &config)
            .map_err(|error| MountFault::Refused {
                mountpoint: mountpoint.clone(),
                reason: error.to_string(),
            })?;
        let record = MountRecord {
            pid: std::process::id(),
            id,
            volume: options.volume.clone(),
            branch: options.snapshot.is_none().then(|| branch.clone()),
            mountpoint: mountpoint.clone(),
            read_only,
            cache_bytes: options.cache_bytes,
            private: run.is_some(),
        };
        let registry = registry_dir(&self.data_dir);
        std::fs::create_dir_all(&registry).map_err(NodeError::io("creating", &registry))?;
        let record_path = registry.join(format!("{}-{id}.json", record.pid));
        std::fs::write(
            &record_path,
            serde_json::to_vec(&record).map_err(|error| MountFault::Internal {
                what: format!("encoding the mount record: {error}"),
            })?,
        )
        .map_err(NodeError::io("writing", &record_path))?;
        let active = Arc::new(ActiveMount {
            id,
            record,
            fs: fs.clone(),
            unmounter: Mutex::new(Some(session.unmount_callable())),
            run,
        });
        let pending = {
            let mut state = self.lock();
            state.active.push(active.clone());
            // A summary held back for the vault to close can go out now: it stays open.
            std::mem::take(&mut state.unpublished)
        };
        for (id, text) in pending {
            publish_summary(&self.data_dir, id, &text);
        }
        let host = self.clone();
        // Spawned from this thread, the session's threads share its mount namespace (a
        // run's private one).
        let served = std::thread::spawn(move || {
            let served = session.run();
            host.finish(&active, served, &staging, &record_path);
        });
        let what = match (&options.snapshot, read_only) {
            (Some(snapshot), _) => format!("snapshot {snapshot} of {} read-only", options.volume),
            (None, true) => format!("{} branch {branch} read-only", options.volume),
            (None, false) => format!("{} branch {branch} read-write", options.volume),
        };
        let mut ready = format!("{READY_WORD} {what} at {}", mountpoint.display());
        for note in &notes {
            ready.push_str("; ");
            ready.push_str(note);
        }
        Ok(Mounted {
            ready,
            fs,
            mountpoint,
            served,
        })
    }

    /// After a mount's session ended: commit, record the summary, forget the mount.
    fn finish(
        &self,
        active: &ActiveMount,
        served: std::io::Result<()>,
        staging: &Path,
        record_path: &Path,
    ) {
        let mountpoint = &active.record.mountpoint;
        active.fs.save_detector_baseline();
        let summary = match (served, active.record.read_only) {
            (Err(error), _) => Err(format!("serving {}: {error}", mountpoint.display())),
            (Ok(()), true) => Ok(format!("unmounted {}", mountpoint.display())),
            (Ok(()), false) => unmount_commit(&active.fs, mountpoint),
        };
        if let Err(error) = &summary {
            tracing::error!(%error, "mount at {} ended badly", mountpoint.display());
        }
        let _ = std::fs::remove_dir_all(staging);
        let text = match &summary {
            Ok(text) => text.clone(),
            Err(error) => format!("error: {error}"),
        };
        let mut state = self.lock();
        state.active.retain(|other| other.id != active.id);
        state.last_summary = Some(summary);
        if !state.serving() {
            // The last mount of a host about to exit: its summary waits until the vault
            // is closed.
            state.unpublished.push((active.id, text));
        } else {
            publish_summary(&self.data_dir, active.id, &text);
        }
        let _ = std::fs::remove_file(record_path);
        drop(state);
        self.changed.notify_all();
    }

    /// Unmounts every mount (on SIGINT/SIGTERM).
    pub fn unmount_all(&self) {
        let active: Vec<Arc<ActiveMount>> = self.lock().active.clone();
        for mount in active {
            if let Some(run) = &mount.run {
                // Unmounted in the run's namespace once its workload ends.
                run.stop();
                continue;
            }
            let unmounter = mount
                .unmounter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(mut unmounter) = unmounter {
                let _ = unmounter.unmount();
            }
        }
    }

    /// Waits until no mount is left, then stops the control socket (re-checking, so a
    /// mount that arrived meanwhile is served too). Returns the last mount's summary.
    pub(crate) fn wait_until_idle(
        &self,
        control: crate::daemon::control::ControlHandle,
    ) -> Option<std::result::Result<String, String>> {
        let mut control = Some(control);
        loop {
            let mut state = self.lock();
            while state.serving() {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            drop(state);
            // No command may run beside the final commits or after the vault closes.
            drop(control.take());
            if !self.lock().serving() {
                break;
            }
        }
        self.lock().last_summary.clone()
    }

    pub(crate) fn take_pending_summaries(&self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.lock().unpublished)
    }

    /// Commits the working state of every read-write mount of `volume`.
    ///
    /// # Errors
    /// Storage errors; the volume is not mounted read-write here.
    pub fn commit_volume(
        &self,
        volume: &str,
        message: &str,
        dna: &BTreeMap<String, String>,
    ) -> Result<Vec<Option<CommitOutcome>>> {
        let mounts: Vec<Arc<MountedFs>> = self
            .lock()
            .active
            .iter()
            .filter(|active| active.record.volume == volume && !active.record.read_only)
            .map(|active| active.fs.clone())
            .collect();
        if mounts.is_empty() {
            return Err(nothing_to_commit(volume));
        }
        mounts
            .iter()
            .map(|fs| crate::mount::working::commit_with_dna(fs, message, dna))
            .collect()
    }
}

/// A run under way (see [`Host::hold_for_run`]).
pub(crate) struct RunHold<'a> {
    host: &'a Host,
}

impl Drop for RunHold<'_> {
    fn drop(&mut self) {
        self.host.lock().runs -= 1;
        self.host.changed.notify_all();
    }
}

/// Pins the root a new mount serves, then checks it is still stored: a snapshot still
/// listed (or a working state still recorded) after the pin was live when any running gc
/// marked, so none of it can be collected while the mount runs.
fn pin_served_root(
    vault: &Vault,
    volume: &OpenVolume,
    session: &crate::vault::fence::WriteSession,
    served: PinnedRoot,
    branch: &str,
) -> Result<()> {
    session.pin_root(volume.id, served, &[]);
    match served {
        PinnedRoot::Snapshot(snapshot) => {
            let snapshot = Cid::from_bytes(snapshot);
            if !vault.is_listed(volume, &snapshot)? {
                return Err(NodeError::UnknownSnapshot {
                    volume: volume.record.name.clone(),
                    id: snapshot.to_hex(),
                });
            }
        }
        PinnedRoot::Tree(root) => {
            let still =
                working_state(vault, volume, branch)?.is_some_and(|state| state.root == root);
            if !still {
                return Err(NodeError::Busy {
                    what: format!("volume {} branch {branch}", volume.record.name),
                    reason: "its working state changed while mounting; mount again".into(),
                });
            }
        }
    }
    Ok(())
}

/// Writes a finished mount's summary for `unmount` to read (whole, then renamed).
pub(crate) fn publish_summary(data_dir: &DataDir, id: u64, text: &str) {
    let registry = registry_dir(data_dir);
    let done = registry.join(format!("{}-{id}.done", std::process::id()));
    let partial = registry.join(format!("{}-{id}.done.partial", std::process::id()));
    if std::fs::write(&partial, text).is_ok() {
        let _ = std::fs::rename(&partial, &done);
    }
}

/// Unmounts `mountpoint` and waits for its mount process to commit and exit.
///
/// # Errors
/// Not a forge mount; the file system is busy; the mount process failed.
pub fn unmount(data_dir: &DataDir, mountpoint: &Path) -> Result<String> {
    let resolved = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_owned());
    // A run's mount at the same path is in its own namespace: not this one.
    let record = running_mounts(data_dir)?
        .into_iter()
        .find(|record| record.mountpoint == resolved && !record.private);
    let output = Command::new("fusermount3")
        .arg("-u")
        .arg(&resolved)
        .output()
        .map_err(NodeError::io("running", "fusermount3"))?;
    if !output.status.success() {
        let reason = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(MountFault::UnmountRefused {
            mountpoint: resolved,
            reason: if reason.is_empty() {
                "fusermount3 failed".to_owned()
            } else {
                reason
            },
        }
        .into());
    }
    let Some(record) = record else {
        return Ok(format!(
            "unmounted {} (no forge process was serving it)",
            resolved.display()
        ));
    };
    // The mount process commits the working tree, writes its summary, then exits. (An
    // exited process can linger as a zombie until its new parent reaps it: the summary
    // file is the signal.)
    let done_path = registry_dir(data_dir).join(format!("{}-{}.done", record.pid, record.id));
    let started = std::time::Instant::now();
    let mut told = false;
    while process_alive(record.pid) && !done_path.exists() {
        if !told && started.elapsed() > Duration::from_secs(1) {
            // A large working tree takes a while to chunk and commit: say what we wait for.
            let _ = writeln!(
                std::io::stderr(),
                "forge: waiting for the mount at {} to commit its changes ...",
                resolved.display()
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let summary = std::fs::read_to_string(&done_path).unwrap_or_default();
    let _ = std::fs::remove_file(&done_path);
    match summary.strip_prefix("error: ") {
        Some(reason) => Err(MountFault::CommitFailed {
            reason: reason.to_owned(),
        }
        .into()),
        None if summary.is_empty() => Ok(format!("unmounted {}", resolved.display())),
        None => Ok(summary),
    }
}

pub(crate) fn termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread and every thread it starts later, so
/// only [`wait_for_termination_signal`] receives them.
pub(crate) fn block_termination_signals() {
    let _ = termination_signals().thread_block();
}

pub(crate) fn wait_for_termination_signal() {
    let _ = termination_signals().wait();
}

/// `forge.v1.Node`: what the host is and serves, and its stop.
impl crate::service::NodeService for Host {
    fn status(&self, _request: NodeStatusRequest) -> Result<NodeStatusReply> {
        let vault = self.vault();
        let (uptime, mounts) = Host::status(self);
        Ok(NodeStatusReply {
            node_id: vault.identity().node_id().to_hex(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: uptime.as_secs(),
            volumes: vault
                .list_volumes()?
                .into_iter()
                .map(|record| record.name)
                .collect(),
            mounts: mounts.iter().map(mount_info).collect(),
            socket: socket_path(vault.data_dir()).into_os_string().into_vec(),
            metrics_address: self.metrics_address().map(|address| address.to_string()),
        })
    }

    fn stop(&self, _request: StopNodeRequest) -> Result<StopNodeReply> {
        let mounts = Host::stop(self);
        Ok(StopNodeReply {
            pid: std::process::id(),
            mounts: mounts.iter().map(mount_info).collect(),
        })
    }
}

/// `forge.v1.Mount`: commits of the host's read-write mounts.
impl crate::service::MountService for Host {
    fn commit(&self, request: CommitRequest) -> Result<CommitReply> {
        let dna: BTreeMap<String, String> = request.dna.into_iter().collect();
        if let Err(reason) = crate::vault::trust::snapshot_workload(&dna) {
            return Err(NodeError::InvalidArgument {
                what: "--dna",
                value: format!("{DNA_WORKLOAD}=..."),
                reason,
            });
        }
        let outcomes = self.commit_volume(&request.volume, &request.message, &dna)?;
        Ok(CommitReply {
            outcomes: outcomes
                .into_iter()
                .map(|outcome| match outcome {
                    Some(outcome) => CommitOutcomeMessage {
                        nothing_changed: false,
                        snapshot: outcome.snapshot.as_bytes().to_vec(),
                        branch: outcome.branch,
                        conflict: outcome.conflict,
                    },
                    None => CommitOutcomeMessage {
                        nothing_changed: true,
                        ..CommitOutcomeMessage::default()
                    },
                })
                .collect(),
        })
    }
}

/// A mount's registry record as the API shows it.
#[must_use]
pub fn mount_info(record: &MountRecord) -> MountInfo {
    MountInfo {
        pid: record.pid,
        id: record.id,
        volume: record.volume.clone(),
        branch: record.branch.clone(),
        mountpoint: record.mountpoint.clone().into_os_string().into_vec(),
        read_only: record.read_only,
        cache_bytes: record.cache_bytes as u64,
        private: record.private,
    }
}
