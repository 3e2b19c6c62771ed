//! The errors of forge-node, each with the process exit code it maps to.

use std::io;
use std::path::PathBuf;

use forge_crypto::CryptoError;
use forge_store::Cid;

/// Process exit codes of the `forge` binary (documented in README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// The command did what was asked.
    Success = 0,
    /// Any error not listed below.
    Error = 1,
    /// The command line was wrong.
    Usage = 2,
    /// Stored data failed verification: corruption found.
    Integrity = 3,
    /// A conflict with existing state, or the data directory is busy.
    Conflict = 4,
}

/// Everything forge-node can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// `forge init` on a data directory that already holds a vault.
    #[error("{path} already holds a Forge vault (node {node_id}); nothing was changed")]
    AlreadyInitialized { path: PathBuf, node_id: String },

    /// `forge node status` (or another call for the owning process) found none running.
    #[error(
        "no daemon running for {data_dir}: no forge process owns it (a `forge volume mount` starts one)"
    )]
    NoDaemon { data_dir: PathBuf },

    /// `forge node start` in the background: the daemon exited before it served.
    #[error("the daemon did not start ({status}): {reason} (its log: {log})")]
    DaemonFailed {
        status: String,
        reason: String,
        log: PathBuf,
    },

    /// `forge node stop`: the process asked to stop is still running at the deadline.
    #[error(
        "forge process {pid} has not exited after {seconds} s: it was unmounting and committing ({waiting_for}); wait, or run `forge node stop` again with a longer --timeout"
    )]
    StopTimedOut {
        pid: u32,
        seconds: u64,
        waiting_for: String,
    },

    /// `DATA_DIR/forge.toml` is unreadable, malformed, or names an unknown key.
    #[error("configuration {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    /// The data directory (mode 0700, its control socket 0600) belongs to someone else.
    #[error(
        "permission denied: {data_dir} belongs to {owner}, and only its owner may use it or its control socket {data_dir}/control.sock (run forge as that user, or pass --data-dir for your own vault)"
    )]
    DataDirPermission { data_dir: PathBuf, owner: String },

    /// The control socket of the process owning the data directory is someone else's.
    #[error(
        "permission denied: the control socket {socket} belongs to {owner} (mode 0600: only its owner may connect); run forge as that user"
    )]
    SocketPermission { socket: PathBuf, owner: String },

    /// The metrics listener's address is taken or cannot be bound.
    #[error(
        "cannot listen for metrics on {address}: {reason} (choose another with --metrics-listen or forge.toml's metrics_listen, or `off`)"
    )]
    MetricsListen {
        address: std::net::SocketAddr,
        reason: String,
    },

    /// The process running a forwarded command ended before it answered.
    #[error(
        "forge process {pid} owning {data_dir} ended before the command finished ({reason}): it was killed or crashed, so nothing it was doing was acknowledged; the next command recovers the data directory (run `forge fsck` to check it)"
    )]
    OwnerEnded {
        pid: u32,
        data_dir: PathBuf,
        reason: String,
    },

    /// A command that needs a vault found none.
    #[error(
        "no Forge vault at {path}: run `forge init` first, or pass --data-dir / set FORGE_DATA_DIR"
    )]
    NotInitialized { path: PathBuf },

    /// The path exists but is neither empty nor a vault; we never write into it.
    #[error(
        "{path} is not empty and is not a Forge vault; refusing to write into it (choose another --data-dir)"
    )]
    NotAVault { path: PathBuf },

    /// The data directory was written by a newer (or unknown) format.
    #[error(
        "data directory {path} has format {found:?}; this forge reads format version {supported}"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: String,
        supported: u32,
    },

    /// A stored file failed to decode or verify.
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    /// No passphrase could be obtained.
    #[error("a passphrase is needed: set FORGE_PASSPHRASE or run on a terminal")]
    PassphraseUnavailable,

    /// The two passphrase entries differed.
    #[error("the passphrases did not match; nothing was changed")]
    PassphraseMismatch,

    /// No default data directory can be worked out.
    #[error(
        "cannot choose a data directory: HOME is not set; pass --data-dir or set FORGE_DATA_DIR"
    )]
    NoDataDir,

    /// An operating-system I/O error, with what we were doing.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A cryptographic failure (wrong passphrase, bad signature, ...).
    #[error(transparent)]
    Crypto(#[from] CryptoError),

    /// A vault record did not decode.
    #[error("vault {what} record is corrupt: {reason}")]
    CorruptRecord { what: &'static str, reason: String },

    /// `forge volume create` with a name in use.
    #[error("volume {name:?} already exists")]
    VolumeExists { name: String },

    /// No volume by that name.
    #[error("no volume named {name:?} (see `forge volume list`)")]
    UnknownVolume { name: String },

    /// No snapshot matches the id or prefix.
    #[error("volume {volume:?} has no snapshot {id:?} (see `forge snapshot list {volume}`)")]
    UnknownSnapshot { volume: String, id: String },

    /// A snapshot prefix that matches several snapshots.
    #[error("snapshot prefix {id:?} is ambiguous in volume {volume:?}: give more characters")]
    AmbiguousSnapshot { volume: String, id: String },

    /// No branch by that name.
    #[error("volume {volume:?} has no branch {branch:?}")]
    UnknownBranch { volume: String, branch: String },

    /// A name or argument that cannot be used.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: String,
    },

    /// Export into a directory that holds something already.
    #[error("{path} is not empty: export needs an empty or absent directory")]
    DestinationNotEmpty { path: PathBuf },

    /// A branch moved under us (another import finished first).
    #[error(
        "branch moved while importing: {0}; the data written is kept and a re-import reuses it"
    )]
    BranchMoved(String),

    /// `snapshot branch` onto a branch that exists.
    #[error(
        "volume {volume:?} already has a branch {branch:?}; pick another name (or delete \
         that branch's snapshots first)"
    )]
    BranchExists { volume: String, branch: String },

    /// Data past a limit of the format, refused where it is written (so nothing stored
    /// is ever unreadable).
    #[error("{what} is too large: {detail}; nothing was published")]
    TooLarge { what: String, detail: String },

    /// Something that runs one at a time is already running.
    #[error("{what} is busy: {reason}")]
    Busy { what: String, reason: String },

    /// A snapshot about to be published names a cid that is no longer stored. The fence
    /// against gc makes this impossible; the check guards against a bug ever publishing
    /// a snapshot that cannot be read.
    #[error(
        "integrity failure: {cid}, which the snapshot being written names, is no longer \
         stored (removed while it was written); nothing was published and the branch did not \
         move, so retry the command (and please report this)"
    )]
    MissingWhileWriting { cid: String },

    /// A metadata update whose condition did not hold, or a malformed record.
    #[error(transparent)]
    Metadata(forge_store::metadata::MetadataError),

    /// A signature by a node this vault does not trust.
    #[error(
        "integrity failure: {what} is signed by node {node}, which is not in this vault's \
         keyring (only its own and trusted nodes' signatures verify)"
    )]
    UntrustedSigner { what: String, node: String },

    /// Stored data failed verification: what was found, to match on.
    #[error("integrity failure: {0}")]
    Integrity(#[from] IntegrityFault),

    /// A check found damage; `report` is what it printed (its whole report).
    #[error("integrity failure: {summary}")]
    Damaged {
        summary: String,
        report: Box<crate::output::Output>,
    },

    /// A check found no damage, but the passphrase given did not open a volume's keys.
    #[error(
        "the passphrase given did not open volume {volume:?} (wrong passphrase?): its data \
         was checked without its keys and is intact; run again with its passphrase to check \
         its snapshots too"
    )]
    PassphraseDidNotOpen {
        volume: String,
        report: Box<crate::output::Output>,
    },

    /// A branch already has its read-write mount.
    #[error(
        "volume {volume:?} branch {branch:?} is already mounted read-write at {mountpoint} \
         (pid {pid}); unmount it first (forge volume unmount {mountpoint}) or mount read-only"
    )]
    AlreadyMounted {
        volume: String,
        branch: String,
        mountpoint: String,
        pid: u32,
    },

    /// A volume's contract refuses what was asked (a mount, a run, attaching it): the
    /// clause that failed. `integrity`: the contract itself does not verify.
    #[error("volume {volume:?}: refused by its contract: {clause}")]
    ContractRefused {
        volume: String,
        clause: String,
        integrity: bool,
    },

    /// A sealed volume asked for a read-write mount or run.
    #[error(
        "volume {volume:?} is sealed since {since} ({reason}): it mounts read-write again \
         once `forge volume trust-check {volume}` passes (read-only mounts of its snapshots \
         stay possible)"
    )]
    Sealed {
        volume: String,
        since: String,
        reason: String,
    },

    /// A frozen volume (the behaviour detector flagged it) asked for a write.
    #[error(
        "volume {volume:?} is frozen since {since}: {kind} ({evidence}); review it (its \
         pre-attack state is on branch {quarantine}), then `forge volume unfreeze {volume}`"
    )]
    Frozen {
        volume: String,
        since: String,
        kind: String,
        evidence: String,
        quarantine: String,
    },

    /// `forge volume trust-check` found a check failing: the first one.
    #[error("trust-check of volume {volume:?} failed: {check}: {reason}")]
    TrustCheckFailed {
        volume: String,
        check: String,
        reason: String,
        report: Box<crate::output::Output>,
    },

    /// Mounting, unmounting or reaching the process that serves a mount failed.
    #[error("mount: {0}")]
    Mount(#[from] MountFault),

    /// A command run by the process that owns the data directory (through its control
    /// socket) failed there; `report` is what it printed before failing, if anything.
    #[error("{message}")]
    Forwarded {
        message: String,
        exit_code: u8,
        report: Option<Box<crate::output::Output>>,
    },

    /// The storage engine failed.
    #[error(transparent)]
    Kv(#[from] forge_store::KvError),

    /// Chunking failed.
    #[error(transparent)]
    Chunker(#[from] forge_store::chunker::ChunkerError),

    /// An erasure layout was refused.
    #[error(transparent)]
    Erasure(#[from] forge_store::erasure::ErasureError),

    /// A peer, the network or a transfer proof.
    #[error(transparent)]
    Mesh(#[from] forge_mesh::MeshError),
    /// A Raft group failed (no quorum, a conflict, storage).
    #[error(transparent)]
    Consensus(#[from] forge_consensus::ConsensusError),
    /// A cluster call that cannot be done as asked (names what to do instead).
    #[error("{reason}")]
    Cluster {
        /// What is wrong, and what to do.
        reason: String,
    },

    /// `forge run` could not run the workload as asked (names what to change).
    #[error("run: {reason}")]
    Run {
        /// What is wrong, and what to do.
        reason: String,
    },

    /// A volume this vault holds without its key (a zero-knowledge copy).
    #[error(
        "no key for volume {name} on this node: it holds the volume's ciphertext only (ask a \
         node that can read it to run `forge volume share {name} --to {node}`)"
    )]
    NoVolumeKey { name: String, node: String },

    /// This vault refused a sync offered to it (the peer sees this).
    #[error("{reason}; nothing was stored")]
    SyncRefused { reason: String },

    /// A peer that is not in `forge peer list`.
    #[error(
        "no peer {peer:?} here (see `forge peer list`; add one with `forge peer add MULTIADDR`)"
    )]
    UnknownPeer { peer: String },

    /// Networking needs the daemon (it owns the node's network).
    #[error(
        "{what} needs this node's network: start it with `forge node start` (it listens on \
         {listen} by default)"
    )]
    NeedsDaemon { what: String, listen: String },
}

/// What a verification of stored data found wrong. Every case is corruption or loss of
/// stored data (exit code 3); `forge fsck` reports the whole extent of it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IntegrityFault {
    /// An object a tree, manifest or snapshot names is not stored.
    #[error("object {cid} is missing")]
    MissingObject { cid: Cid },

    /// A chunk a file's manifest names is not stored.
    #[error("chunk {cid} of {file:?} is missing")]
    MissingChunk { cid: Cid, file: String },

    /// An object is stored but does not open (wrong key or damaged) or decode.
    #[error("object {cid} is unreadable: {reason}")]
    UnreadableObject { cid: Cid, reason: String },

    /// A chunk is stored but does not open.
    #[error("chunk {cid} is unreadable: {reason}")]
    UnreadableChunk { cid: Cid, reason: String },

    /// A chunk opened to another length than its manifest records.
    #[error("chunk {cid} has {found} bytes, its manifest says {expected}")]
    ChunkLength {
        cid: Cid,
        found: usize,
        expected: u64,
    },

    /// An object of one kind where another belongs (a manifest where a tree is named).
    #[error("object {cid} is a {found}, where a {expected} belongs")]
    WrongKind {
        cid: Cid,
        found: &'static str,
        expected: &'static str,
    },

    /// Index objects nested past the format's bound.
    #[error("object {cid}: a {expected} index nested deeper than {levels} levels")]
    IndexTooDeep {
        cid: Cid,
        expected: &'static str,
        levels: usize,
    },

    /// A tree split into parts whose entries are not in name order.
    #[error("tree {cid}: its parts' entries are not in name order")]
    TreeOutOfOrder { cid: Cid },

    /// A file's manifest holds another size than its tree entry.
    #[error("the manifest of {path} does not match its entry's size")]
    SizeMismatch { path: std::path::PathBuf },

    /// A signature that does not verify.
    #[error("{what}: {reason}")]
    BadSignature { what: String, reason: String },

    /// A snapshot commit signed for another volume.
    #[error("snapshot {cid} belongs to another volume")]
    ForeignSnapshot { cid: Cid },

    /// A snapshot without its signed reference index head.
    #[error("snapshot {snapshot} has no reference index head")]
    MissingIndexHead { snapshot: Cid },

    /// A snapshot's reference index is damaged or incomplete.
    #[error("the reference index of snapshot {snapshot} is damaged: {reason}")]
    BrokenIndex { snapshot: Cid, reason: String },

    /// Chunks that scrub found damaged beyond what their parity repairs.
    #[error("{summary}: {}", chunks.join("; "))]
    Unrecoverable {
        summary: String,
        chunks: Vec<String>,
    },

    /// A stored chunk failed verification.
    #[error(transparent)]
    Chunk(forge_store::chunkstore::ChunkStoreError),

    /// A stored object failed verification.
    #[error(transparent)]
    Object(forge_store::object::ObjectError),

    /// A stored object that does not open with its key (damaged, or another key).
    #[error("object does not open: {0}")]
    ObjectDoesNotOpen(CryptoError),

    /// A branch ref that does not decode.
    #[error(transparent)]
    Ref(forge_store::metadata::MetadataError),
}

/// Why mounting, unmounting or reaching a mount's process failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountFault {
    /// The kernel refused the FUSE mount.
    #[error("mounting at {mountpoint}: {reason}")]
    Refused {
        mountpoint: std::path::PathBuf,
        reason: String,
    },

    /// A mount point whose serving process is gone (killed, crashed).
    #[error(
        "{mountpoint} is still mounted but its process is gone (killed?); clear it with \
         forge volume unmount {mountpoint}, then mount again (fsynced data comes back)"
    )]
    Stale { mountpoint: std::path::PathBuf },

    /// A mount point that a forge mount already serves.
    #[error("{mountpoint} is already a forge mount")]
    AlreadyMounted { mountpoint: std::path::PathBuf },

    /// `forge volume mount --background` whose mount process failed to start.
    #[error("the background mount at {mountpoint} failed ({status}): {reason}")]
    BackgroundFailed {
        mountpoint: std::path::PathBuf,
        status: String,
        reason: String,
    },

    /// fusermount3 refused to unmount.
    #[error("unmounting {mountpoint}: {reason}")]
    UnmountRefused {
        mountpoint: std::path::PathBuf,
        reason: String,
    },

    /// The mount ended, but committing its changes failed (its working state is kept
    /// for the next mount when it could be recorded; `reason` says).
    #[error("{reason}")]
    CommitFailed { reason: String },

    /// The forge process owning the data directory does not answer its control socket.
    #[error("the forge process owning {data_dir} does not answer on {socket}: {reason}")]
    Unreachable {
        data_dir: std::path::PathBuf,
        socket: std::path::PathBuf,
        reason: String,
    },

    /// A command forwarded to the owning process failed in transport.
    #[error("control socket: {reason}")]
    Control { reason: String },

    /// A broken invariant of forge itself, not of the input: please report it.
    #[error("internal error: {what} (please report this)")]
    Internal { what: String },
}

impl From<forge_store::chunkstore::ChunkStoreError> for NodeError {
    fn from(error: forge_store::chunkstore::ChunkStoreError) -> Self {
        match error {
            forge_store::chunkstore::ChunkStoreError::Kv(kv) => Self::Kv(kv),
            other => Self::Integrity(IntegrityFault::Chunk(other)),
        }
    }
}

impl From<forge_store::object::ObjectError> for NodeError {
    fn from(error: forge_store::object::ObjectError) -> Self {
        match error {
            forge_store::object::ObjectError::Crypto(crypto) => {
                Self::Integrity(IntegrityFault::ObjectDoesNotOpen(crypto))
            }
            other => Self::Integrity(IntegrityFault::Object(other)),
        }
    }
}

impl From<forge_store::metadata::MetadataError> for NodeError {
    fn from(error: forge_store::metadata::MetadataError) -> Self {
        match error {
            forge_store::metadata::MetadataError::Kv(kv) => Self::Kv(kv),
            conflict @ forge_store::metadata::MetadataError::Conflict { .. } => {
                Self::BranchMoved(conflict.to_string())
            }
            corrupt @ forge_store::metadata::MetadataError::CorruptRef { .. } => {
                Self::Integrity(IntegrityFault::Ref(corrupt))
            }
            other => Self::Metadata(other),
        }
    }
}

impl NodeError {
    /// What the failed command printed before failing (a check's whole report).
    #[must_use]
    pub fn report(&self) -> Option<&crate::output::Output> {
        match self {
            Self::Damaged { report, .. }
            | Self::PassphraseDidNotOpen { report, .. }
            | Self::TrustCheckFailed { report, .. } => Some(report),
            Self::Forwarded { report, .. } => report.as_deref(),
            _ => None,
        }
    }

    /// The exit code this error ends the process with.
    #[must_use]
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::AlreadyInitialized { .. }
            | Self::VolumeExists { .. }
            | Self::BranchMoved(_)
            | Self::AlreadyMounted { .. }
            | Self::BranchExists { .. }
            | Self::Busy { .. }
            | Self::Metadata(forge_store::metadata::MetadataError::RecordConflict { .. })
            | Self::Consensus(forge_consensus::ConsensusError::Conflict { .. }) => {
                ExitCode::Conflict
            }
            Self::Kv(forge_store::KvError::Busy { .. }) => ExitCode::Conflict,
            Self::Corrupt { .. }
            | Self::CorruptRecord { .. }
            | Self::Integrity(_)
            | Self::Damaged { .. }
            | Self::UntrustedSigner { .. }
            | Self::MissingWhileWriting { .. }
            | Self::TrustCheckFailed { .. }
            | Self::ContractRefused {
                integrity: true, ..
            }
            | Self::Mesh(forge_mesh::MeshError::InvalidProof { .. }) => ExitCode::Integrity,
            Self::Kv(forge_store::KvError::Corruption { .. }) => ExitCode::Integrity,
            Self::Forwarded { exit_code, .. } => match exit_code {
                2 => ExitCode::Usage,
                3 => ExitCode::Integrity,
                4 => ExitCode::Conflict,
                _ => ExitCode::Error,
            },
            _ => ExitCode::Error,
        }
    }

    /// Wraps an I/O error with the action and path it concerns.
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;
