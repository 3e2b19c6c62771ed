//! `forge volume mount` and `unmount`: a volume's branch read-write, or a snapshot
//! read-only, as a FUSE file system (through `fuser`, no libfuse).
//!
//! The mount process owns the data directory for as long as it runs. Writes are staged in
//! files under `<data-dir>/staging/`; a closed file is chunked into the working tree; fsync
//! also stores the working tree and records it (`mountwork/` in the meta column), so the
//! next mount of the branch after a crash recovers every fsynced byte. Unmount commits the
//! working tree as a snapshot; if the branch moved meanwhile, to a new branch
//! `BRANCH-conflict-TIME`. Each running mount is registered in `<data-dir>/mounts/PID.json`
//! so `unmount` finds its process and a second read-write mount of a branch is refused.

pub mod content;
pub mod fs;
pub mod requests;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forge_crypto::Cid;
use forge_store::kv::Column;
use forge_store::object::EntryContent;
use serde::{Deserialize, Serialize};

use crate::datadir::DataDir;
use crate::error::{MountFault, NodeError, Result};
use crate::vault::fence::PinnedRoot;
use crate::vault::import::{Importer, NewSnapshot};
use crate::vault::records::{self, WorkingState};
use crate::vault::{DEFAULT_BRANCH, OpenVolume, PassphraseSource, Vault, validate_name};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate, ref_update};
use fs::{FuseAdapter, MountedFs, TreeTotals};

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

/// A registered running mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    /// The serving process.
    pub pid: u32,
    /// The mount's number within that process.
    pub id: u64,
    /// Volume name.
    pub volume: String,
    /// Branch (None for a snapshot mount).
    pub branch: Option<String>,
    /// Mount point (absolute).
    pub mountpoint: PathBuf,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Bytes of decrypted chunks it keeps in memory (0 in records of older versions).
    #[serde(default)]
    pub cache_bytes: usize,
}

/// The working target of a read-write mount: the branch and the snapshot it builds on.
#[derive(Debug)]
pub struct WorkTarget {
    /// Branch being written (a conflict branch after the original moved).
    pub branch: String,
    /// Its head as this mount last saw or wrote it.
    pub base: Option<Cid>,
}

fn registry_dir(data_dir: &DataDir) -> PathBuf {
    data_dir.path().join("mounts")
}

/// Whether process `pid` runs. A zombie does not: a killed daemon whose parent has not
/// reaped it (an init that never waits) would otherwise own its data directory forever.
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // Signal "none" only checks that the process exists (EPERM: it does, as another
    // user's).
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => {}
        Err(_) => return false,
    }
    // /proc/PID/stat: "PID (COMMAND) STATE ...", COMMAND may hold spaces and parentheses.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X")
    })
}

/// Running mounts of this data directory (stale records of dead processes are removed).
///
/// # Errors
/// I/O errors reading the registry.
pub fn running_mounts(data_dir: &DataDir) -> Result<Vec<MountRecord>> {
    let dir = registry_dir(data_dir);
    let mut mounts = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(mounts);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|extension| extension != "json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match serde_json::from_str::<MountRecord>(&text) {
            Ok(record) if process_alive(record.pid) => mounts.push(record),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(mounts)
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
    if let Some(connection) = crate::control::Connection::open(data_dir)? {
        let reply = crate::service::remote::RemoteApi::new(&connection).mount(
            forge_proto::v1::MountRequest {
                volume: options.volume.clone(),
                mountpoint: mountpoint.clone().into_os_string().into_encoded_bytes(),
                branch: options.branch.clone(),
                snapshot: options.snapshot.clone(),
                read_only: options.read_only,
                cache_bytes: options.cache_bytes as u64,
            },
        )?;
        return Ok(reply.summary);
    }
    if options.background && std::env::var_os(BACKGROUND_CHILD_ENV).is_none() {
        return spawn_background(data_dir, &mountpoint);
    }
    // Before any thread starts (RocksDB's, the file systems'): every thread inherits the
    // mask, so SIGINT/SIGTERM reach only the thread that unmounts cleanly.
    block_termination_signals();
    let host = Arc::new(Host::open(data_dir, passphrase)?);
    let ready = host.mount(options, passphrase)?;
    // Other commands on this data directory now run here, through the control socket: it
    // is up before anyone is told the mount is ready.
    let control = crate::control::serve(host.clone())?;
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
    metrics: crate::metrics::Metrics,
    /// What every mount of this host records its requests into (registered in `metrics`).
    fuse_metrics: requests::FuseMetrics,
    /// Where /metrics is served, if anywhere.
    metrics_address: Mutex<Option<std::net::SocketAddr>>,
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
}

impl HostState {
    /// Whether the host still has a reason to serve.
    fn serving(&self) -> bool {
        !self.active.is_empty() || (self.persistent && !self.stopping)
    }
}

/// One mount a host serves.
struct ActiveMount {
    id: u64,
    record: MountRecord,
    fs: Arc<MountedFs>,
    unmounter: Mutex<Option<fuser::SessionUnmounter>>,
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
    /// Opens the vault of `data_dir` to host mounts.
    ///
    /// # Errors
    /// As [`Vault::open`].
    pub fn open(data_dir: &DataDir, passphrase: PassphraseSource<'_>) -> Result<Self> {
        let vault = Arc::new(Vault::open(data_dir, passphrase)?);
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
            metrics: crate::metrics::Metrics::new(&fuse_metrics),
            fuse_metrics,
            metrics_address: Mutex::new(None),
        })
    }

    /// The metrics registry.
    #[must_use]
    pub fn metrics(&self) -> &crate::metrics::Metrics {
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
        let (mountpoint, read_only, branch) = check_options(options)?;
        let _mounting = self
            .mounting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for active in &self.lock().active {
            let record = &active.record;
            if record.mountpoint == mountpoint {
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
            if !read_only && let Some(state) = working_state(vault, &volume, &branch)? {
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
            fs,
            unmounter: Mutex::new(Some(session.unmount_callable())),
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
        std::thread::spawn(move || {
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
        Ok(ready)
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
        control: crate::control::ControlHandle,
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
    pub fn commit_volume(&self, volume: &str, message: &str) -> Result<Vec<Option<CommitOutcome>>> {
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
        mounts.iter().map(|fs| commit(fs, message)).collect()
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

/// The commit that ends a read-write mount, as the unmount's summary. When it fails (a
/// full disk, say) the working tree is recorded as far as it can be, and the summary says
/// what the next mount of the branch starts from: nothing that reached the vault is lost.
pub(crate) fn unmount_commit(fs: &MountedFs, mountpoint: &Path) -> Result<String, String> {
    match commit(fs, "unmount") {
        Ok(Some(CommitOutcome {
            snapshot,
            branch,
            conflict: false,
        })) => Ok(format!(
            "unmounted {}; snapshot {snapshot} committed to {branch}",
            mountpoint.display()
        )),
        Ok(Some(CommitOutcome {
            snapshot,
            branch,
            conflict: true,
        })) => Ok(format!(
            "unmounted {}; the branch moved meanwhile, so snapshot {snapshot} was committed to a new branch {branch}",
            mountpoint.display()
        )),
        Ok(None) => Ok(format!(
            "unmounted {}; nothing changed",
            mountpoint.display()
        )),
        Err(error) => {
            let branch = fs.work().map_or_else(String::new, |work| {
                work.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .branch
                    .clone()
            });
            let kept = match persist_working(fs) {
                Ok(()) => "every change that reached the vault (written files that were \
                           closed or fsynced, and the directory tree) is kept as the working \
                           state"
                    .to_owned(),
                Err(second) => format!(
                    "recording the rest failed too ({second}); the working state of the last \
                     successful fsync is kept"
                ),
            };
            Err(format!(
                "unmounted {}, but the commit failed: {error}. Nothing is lost: {kept}; \
                 free space and mount branch {branch} again to continue from it, then commit",
                mountpoint.display()
            ))
        }
    }
}

/// `forge snapshot create` on a volume that is not mounted read-write.
#[must_use]
pub fn nothing_to_commit(volume: &str) -> NodeError {
    NodeError::InvalidArgument {
        what: "volume",
        value: volume.to_owned(),
        reason: "it is not mounted read-write, so there is nothing to commit; to snapshot a \
                 directory use forge volume import NAME DIR"
            .into(),
    }
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

/// What a commit of the working tree did.
#[derive(Debug, Clone)]
pub struct CommitOutcome {
    /// The new snapshot.
    pub snapshot: Cid,
    /// The branch that now points at it.
    pub branch: String,
    /// Whether it went to a new conflict branch because the original moved.
    pub conflict: bool,
}

/// Commits the working tree of a read-write mount as a snapshot (None: nothing changed).
///
/// Commits of one mount run one at a time (the work target's lock is held throughout), so
/// a branch never moves backwards to an older root. The commit captures the tree with its
/// change generation: a change made while it runs stays uncommitted for the next one.
///
/// # Errors
/// Storage errors.
pub fn commit(fs: &MountedFs, message: &str) -> Result<Option<CommitOutcome>> {
    commit_with(fs, message, &mut || {})
}

/// [`commit`], running `after_capture` once the tree is captured (tests change the tree
/// there, as a concurrent FUSE request would).
pub(crate) fn commit_with(
    fs: &MountedFs,
    message: &str,
    after_capture: &mut dyn FnMut(),
) -> Result<Option<CommitOutcome>> {
    let Some(work) = fs.work() else {
        return Ok(None);
    };
    let mut work = work
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    fs.chunk_all()?;
    if !fs.has_changes() {
        return Ok(None);
    }
    let (vault, volume) = (fs.vault(), fs.volume());
    let progress = crate::progress::Progress::new("commit", false);
    let importer = Importer::new(vault, volume, fs.session(), &progress)?;
    let (root, generation) = fs.store_tree(&importer)?;
    after_capture();
    // The trees must be readable before walking them for the reference index.
    importer.write_pending()?;
    let totals = reach_tree(vault, volume, &importer, root)?;
    let index_root = importer.stage_reference_index()?;
    importer.write_pending()?;
    let snapshot = importer.write_snapshot(&NewSnapshot {
        root,
        index_root,
        parent: work.base,
        message: message.to_owned(),
        dna: BTreeMap::new(),
        logical_bytes: totals.logical_bytes,
        file_count: totals.files,
    })?;
    let original = work.branch.clone();
    let conflict = match importer.publish(&[ref_update(
        &volume.id,
        &work.branch,
        work.base,
        Some(snapshot),
    )]) {
        Ok(()) => false,
        Err(NodeError::BranchMoved(_)) => {
            let time = crate::clock::format_compact_utc_time(vault.now_ns());
            let mut conflict_branch = format!("{}-conflict-{time}", work.branch);
            let mut attempt = 1;
            while vault
                .refs()
                .get_ref(&volume.id, &conflict_branch)?
                .is_some()
            {
                attempt += 1;
                conflict_branch = format!("{}-conflict-{time}-{attempt}", work.branch);
            }
            importer.publish(&[ref_update(
                &volume.id,
                &conflict_branch,
                None,
                Some(snapshot),
            )])?;
            work.branch = conflict_branch;
            true
        }
        Err(other) => return Err(other),
    };
    work.base = Some(snapshot);
    // From now on the mount builds on the new snapshot: pin it, and release the claims it
    // covers (a mount's claims would otherwise grow for as long as it runs).
    fs.session().pin_root(
        volume.id,
        PinnedRoot::Snapshot(*snapshot.as_bytes()),
        &importer.take_named(),
    );
    // The working state is now a snapshot: nothing is left to recover.
    vault.refs().apply(&[RecordUpdate::new(
        RecordSpace::WORKING,
        working_key(volume, &original),
        Expected::Any,
        Change::Delete,
    )])?;
    fs.mark_committed(generation);
    Ok(Some(CommitOutcome {
        snapshot,
        branch: work.branch.clone(),
        conflict,
    }))
}

/// Stores the working tree and records it durably, so a crash loses nothing fsynced.
///
/// # Errors
/// Storage errors.
pub fn persist_working(fs: &MountedFs) -> Result<()> {
    let Some(work) = fs.work() else {
        return Ok(());
    };
    // Serialized with commits: a working state recorded after a commit is never older
    // than that commit's tree.
    let work = work
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (vault, volume) = (fs.vault(), fs.volume());
    let progress = crate::progress::Progress::new("fsync", false);
    let importer = Importer::new(vault, volume, fs.session(), &progress)?;
    let (root, _) = fs.store_tree(&importer)?;
    importer.write_pending()?;
    vault
        .kv()
        .flush(&[Column::Shards, Column::Objects, Column::Meta])?;
    let state = WorkingState {
        root: *root.as_bytes(),
        base: work.base.map(|base| *base.as_bytes()),
    };
    vault.refs().apply(&[RecordUpdate::new(
        RecordSpace::WORKING,
        working_key(volume, &work.branch),
        Expected::Any,
        Change::Put(records::encode(&state)),
    )])?;
    Ok(())
}

/// The key of a branch's working state in [`RecordSpace::WORKING`].
fn working_key(volume: &OpenVolume, branch: &str) -> Vec<u8> {
    [volume.id.as_bytes().as_slice(), branch.as_bytes()].concat()
}

fn working_state(vault: &Vault, volume: &OpenVolume, branch: &str) -> Result<Option<WorkingState>> {
    vault
        .refs()
        .get_record(RecordSpace::WORKING, &working_key(volume, branch))?
        .map(|value| records::decode("working state", &value))
        .transpose()
}

/// Every cid the tree at `root` reaches (marked on `importer` for the reference index),
/// and its totals.
///
/// # Errors
/// Integrity errors reading objects.
pub(crate) fn reach_tree(
    vault: &Vault,
    volume: &OpenVolume,
    importer: &Importer<'_>,
    root: Cid,
) -> Result<TreeTotals> {
    /// A directory being walked: its entries still to visit and the totals so far.
    struct Frame {
        tree: Cid,
        entries: std::vec::IntoIter<forge_store::object::TreeEntry>,
        totals: TreeTotals,
    }
    let open = |tree: Cid| -> Result<Frame> {
        let entries = vault.read_tree_with(volume, &tree, &mut |part| importer.reach(part))?;
        Ok(Frame {
            tree,
            entries: entries.into_iter(),
            totals: TreeTotals::default(),
        })
    };
    let add = |totals: &mut TreeTotals, more: TreeTotals| {
        totals.logical_bytes += more.logical_bytes;
        totals.files += more.files;
    };
    // Depth-first with an explicit stack (a tree may be as deep as the depth limit, far
    // more than the committing thread's stack holds recursing); a subtree met again (the
    // same directory content elsewhere) is counted from the memo, not walked again.
    let mut memo: BTreeMap<Cid, TreeTotals> = BTreeMap::new();
    let mut stack = vec![open(root)?];
    while let Some(frame) = stack.last_mut() {
        let Some(entry) = frame.entries.next() else {
            let done = stack
                .pop()
                .unwrap_or_else(|| unreachable!("the loop saw a frame"));
            memo.insert(done.tree, done.totals);
            match stack.last_mut() {
                Some(parent) => add(&mut parent.totals, done.totals),
                None => return Ok(done.totals),
            }
            continue;
        };
        let manifest = match entry.content {
            EntryContent::Directory { tree } => {
                let tree = Cid::from_bytes(tree);
                match memo.get(&tree) {
                    Some(below) => add(&mut frame.totals, *below),
                    None => stack.push(open(tree)?),
                }
                continue;
            }
            EntryContent::InlineData(data) => {
                add(
                    &mut frame.totals,
                    TreeTotals {
                        logical_bytes: data.len() as u64,
                        files: 1,
                    },
                );
                continue;
            }
            content => match vault.entry_manifest(volume, &content, &mut |part| {
                importer.reach(part);
            })? {
                Some(manifest) => manifest,
                None => continue,
            },
        };
        for chunk in manifest.chunks() {
            importer.reach(chunk.cid());
        }
        add(
            &mut frame.totals,
            TreeTotals {
                logical_bytes: manifest.size,
                files: 1,
            },
        );
    }
    unreachable!("the walk returns when its root's frame is done")
}

/// Unmounts `mountpoint` and waits for its mount process to commit and exit.
///
/// # Errors
/// Not a forge mount; the file system is busy; the mount process failed.
pub fn unmount(data_dir: &DataDir, mountpoint: &Path) -> Result<String> {
    let resolved = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_owned());
    let record = running_mounts(data_dir)?
        .into_iter()
        .find(|record| record.mountpoint == resolved);
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

fn termination_signals() -> nix::sys::signal::SigSet {
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
