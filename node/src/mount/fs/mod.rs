//! The mounted file system: an inode table over the volume's working tree, served to the
//! kernel through `fuser` on several threads.
//!
//! Locks: `inodes` guards names, attributes and which content a file has, and is held only
//! for short metadata steps. File bytes are read outside it (chunks through the cache), so
//! readers of different files never wait on each other. A staged file's own lock is taken
//! before `inodes` whenever both are needed (writes, truncation, chunking).
//!
//! Here: the types and the core of [`MountedFs`]. Its other parts: `inodes` (the table),
//! `staging` (file contents being written, read-ahead), `tree` (storing the working tree),
//! `xattr`, and `fuse` (the kernel's requests).

mod fuse;
mod inodes;
mod staging;
mod tree;
mod watch;
mod xattr;

pub use fuse::FuseAdapter;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use forge_crypto::Cid;
use forge_store::object::{
    EntryContent, EntryMeta, Extent, Tree, TreeEntry, XATTR_BYTES_MAX, Xattr,
};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use super::content::{
    BaseContent, ChunkCache, Staged, read_overlay, rechunk, seek_data, seek_hole,
};
use super::requests::FuseMetrics;
use crate::error::{MountFault, NodeError, Result};
use crate::progress::Progress;
use crate::vault::fence::WriteSession;
use crate::vault::import::{Importer, too_deep};
use crate::vault::posix::{self, OwnerNames};
use crate::vault::{OpenVolume, Vault};
use inodes::{children, children_mut, file_node, file_type, file_type_of_content, stored_entry};

const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
const BLOCK_BYTES: u32 = 4096;
/// Chunks decrypted ahead of a sequential reader.
const READ_AHEAD_CHUNKS: usize = 16;
/// Threads fetching chunks ahead. More than the cores: a cold chunk waits on the disk, and
/// several in flight keep it busy.
const READ_AHEAD_THREADS: usize = 8;

/// The largest file a mount accepts (1 TiB): a write or truncate past it fails with EFBIG.
/// (Until manifests become trees, a file whose manifest is over the object limit, about
/// 57 GiB at 64 KiB chunks, is also refused when it is committed.)
pub const FILE_BYTES_MAX: u64 = 1 << 40;

/// A directory's entries as opendir saw them: inode, kind, name.
type Listing = Vec<(u64, FileType, Vec<u8>)>;

/// What kind of node an inode is, with its content.
#[derive(Debug)]
enum NodeKind {
    Directory(Directory),
    File(FileNode),
    Symlink(Vec<u8>),
    /// A FIFO, socket or device from the tree, served and committed as it is.
    Special(EntryContent),
}

#[derive(Debug, Default)]
struct Directory {
    /// The stored tree this directory was loaded from (None: new, or changed since).
    tree: Option<Cid>,
    /// Entries by name; None until first needed (directories load lazily).
    children: Option<BTreeMap<Vec<u8>, u64>>,
    /// The entries of the tree `children` was loaded from. A child's inode is made from
    /// its entry only when first used (a lookup), so listing a large directory costs its
    /// names, not an inode each (see [`MountedFs::materialize`]).
    stored: Option<Arc<StoredEntries>>,
}

/// A directory's entries as its tree holds them, numbered: entry `i` is inode
/// `first_ino + i` (numbers given out at load, so a listing shows the inode a later lookup
/// makes).
#[derive(Debug)]
struct StoredEntries {
    first_ino: u64,
    entries: Vec<TreeEntry>,
}

impl StoredEntries {
    /// The entry numbered `ino`, if it is one of these.
    fn entry(&self, ino: u64) -> Option<&TreeEntry> {
        let index = usize::try_from(ino.checked_sub(self.first_ino)?).ok()?;
        self.entries.get(index)
    }
}

#[derive(Debug)]
struct FileNode {
    base: Arc<BaseContent>,
    staged: Option<Arc<Staged>>,
    size: u64,
    /// Open handles that may write.
    writers: u32,
    /// Open handles of any kind: an unlinked file's staged bytes go when the last closes.
    handles: u32,
    /// Bumped on every change, so the kernel's page cache is kept only for unchanged files.
    version: u64,
    cached_version: u64,
}

#[derive(Debug)]
struct Inode {
    /// The directory holding this inode's first name (0: it has no name left, unlinked).
    parent: u64,
    name: Vec<u8>,
    /// Further names of a hard-linked file, symlink or special file: (directory, name).
    /// Directories have one name.
    more_names: Vec<(u64, Vec<u8>)>,
    mode: u32,
    mtime_ns: i64,
    ctime_ns: i64,
    kind: NodeKind,
    /// Owners, extended attributes and the like, kept from the tree through commits.
    meta: EntryMeta,
    /// References the kernel holds (lookups not yet forgotten): an inode nobody references
    /// can leave the table (see [`MountedFs::forget`]).
    lookups: u64,
}

impl Inode {
    /// Names this inode has (`st_nlink` of a non-directory).
    fn link_count(&self) -> u32 {
        if self.parent == 0 {
            0
        } else {
            u32::try_from(1 + self.more_names.len()).unwrap_or(u32::MAX)
        }
    }

    /// The directories holding its names (one each, even if several names are in one).
    fn parents(&self) -> Vec<u64> {
        let mut parents: Vec<u64> = std::iter::once(self.parent)
            .filter(|parent| *parent != 0)
            .chain(self.more_names.iter().map(|(parent, _)| *parent))
            .collect();
        parents.sort_unstable();
        parents.dedup();
        parents
    }

    /// Drops name `name` in directory `parent` (the first name's place goes to the next).
    fn remove_name(&mut self, parent: u64, name: &[u8]) {
        if self.parent == parent && self.name == name {
            if self.more_names.is_empty() {
                self.parent = 0;
            } else {
                (self.parent, self.name) = self.more_names.remove(0);
            }
        } else if let Some(at) = self
            .more_names
            .iter()
            .position(|(other_parent, other)| *other_parent == parent && other == name)
        {
            self.more_names.remove(at);
        }
    }

    /// Name `from` becomes `to`.
    fn rename(&mut self, from: (u64, &[u8]), to: (u64, &[u8])) {
        if self.parent == from.0 && self.name == from.1 {
            (self.parent, self.name) = (to.0, to.1.to_vec());
        } else if let Some(slot) = self
            .more_names
            .iter_mut()
            .find(|(parent, name)| *parent == from.0 && name == from.1)
        {
            *slot = (to.0, to.1.to_vec());
        }
    }
}

/// The most names one inode may have (ext4's limit): past it, link fails with EMLINK.
const LINK_COUNT_MAX: u32 = 65_000;

#[derive(Debug, Default)]
struct Inodes {
    nodes: BTreeMap<u64, Inode>,
    next: u64,
    /// The inode serving each hard-link group met so far, with the content its first
    /// name had in the tree (a name of the group with other content is its own file).
    link_groups: BTreeMap<u64, (u64, EntryContent)>,
    /// Whether every directory of the working tree holding a hard-linked name is loaded
    /// (done once, the first time a mount meets one): from then on all names of a group
    /// are in the table, so they share one inode and `st_nlink` counts them.
    links_loaded: bool,
    /// Bumped by every change to the working tree.
    generation: u64,
    /// The generation the last commit captured: nothing made after it is committed.
    committed_generation: u64,
}

/// The behaviour detector of a read-write mount and the samples it needed.
#[derive(Debug)]
struct Watch {
    detector: crate::mount::detector::Detector,
    /// The entropy of each file's committed content, once measured.
    priors: BTreeMap<u64, f32>,
}

/// One mounted volume.
pub struct MountedFs {
    /// Its requests' times, by operation, and its cache's hits (the host's series).
    metrics: FuseMetrics,
    /// What this mount's requests did (a run's DNA records it).
    io: crate::mount::requests::IoFingerprint,
    vault: Arc<Vault>,
    volume: Arc<OpenVolume>,
    read_only: bool,
    /// The volume's contract is append-only: bytes already chunked (committed, or closed
    /// and chunked) are never changed, and no name is removed or replaced (EPERM).
    append_only: bool,
    /// The DNA its commits carry (the workload: `interactive` for a plain mount).
    dna: BTreeMap<String, String>,
    /// The behaviour detector (read-write mounts).
    watch: Option<Mutex<Watch>>,
    /// Set when the detector tripped: every write fails with EROFS from then on.
    frozen: std::sync::atomic::AtomicBool,
    inodes: Mutex<Inodes>,
    cache: ChunkCache,
    staging_dir: PathBuf,
    next_handle: AtomicU64,
    /// Directory listings taken at opendir, so offsets survive concurrent changes.
    listings: Mutex<BTreeMap<u64, Arc<Listing>>>,
    /// The mounting user, owner of the root and of entries a tree has no owner for.
    uid: u32,
    gid: u32,
    owner_names: OwnerNames,
    /// The branch a read-write mount commits to (None when read-only).
    work: Option<Mutex<super::WorkTarget>>,
    /// This mount's write session: pins what it serves, claims what it stages.
    session: WriteSession,
    /// Where read-ahead runs (None if the pool could not start: no read-ahead).
    read_ahead_pool: Option<rayon::ThreadPool>,
}

impl std::fmt::Debug for MountedFs {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MountedFs")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// How a mount serves: writable or not, its cache, where its writes are staged.
#[derive(Debug, Clone)]
pub(crate) struct FsConfig {
    /// Writes fail with EROFS.
    pub read_only: bool,
    /// Append-only (the volume's contract): see [`MountedFs`]'s field.
    pub append_only: bool,
    /// The DNA its commits carry.
    pub dna: BTreeMap<String, String>,
    /// The behaviour detector's thresholds (None: no detector).
    pub detector: Option<forge_store::contract::DetectorThresholds>,
    /// Bytes of decrypted chunks kept in memory.
    pub cache_bytes: usize,
    /// Where written data is staged.
    pub staging_dir: PathBuf,
    /// Where its requests and cache are counted (the host's /metrics series).
    pub metrics: FuseMetrics,
}

/// Numbers of a built tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeTotals {
    /// File bytes.
    pub logical_bytes: u64,
    /// Regular files.
    pub files: u64,
}

/// The errno a failed operation returns: the operating system's own when there is one
/// (ENOSPC stays ENOSPC, EMFILE stays EMFILE), EIO only for what has no better name.
fn errno_of(error: &NodeError) -> Errno {
    match error {
        NodeError::Io { source, .. } => match source.raw_os_error() {
            Some(code) => Errno::from_i32(code),
            None => errno_of_kind(source.kind()),
        },
        NodeError::Kv(forge_store::KvError::NoSpace { .. }) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

fn errno_of_kind(kind: std::io::ErrorKind) -> Errno {
    use std::io::ErrorKind;
    match kind {
        ErrorKind::StorageFull => Errno::ENOSPC,
        ErrorKind::QuotaExceeded => Errno::EDQUOT,
        ErrorKind::FileTooLarge => Errno::EFBIG,
        ErrorKind::PermissionDenied => Errno::EACCES,
        ErrorKind::NotFound => Errno::ENOENT,
        ErrorKind::OutOfMemory => Errno::ENOMEM,
        _ => Errno::EIO,
    }
}

fn log_error(what: &str, error: &NodeError) -> Errno {
    tracing::error!(%error, "{what} failed");
    errno_of(error)
}

fn system_time(ns: i64) -> SystemTime {
    let ns = u64::try_from(ns).unwrap_or(0);
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn time_ns(time: TimeOrNow, now_ns: i64) -> i64 {
    match time {
        TimeOrNow::Now => now_ns,
        TimeOrNow::SpecificTime(time) => time.duration_since(UNIX_EPOCH).map_or(0, |elapsed| {
            i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX)
        }),
    }
}

impl MountedFs {
    /// A file system over the tree `root` (None: an empty volume).
    ///
    /// # Errors
    /// Creating the staging directory.
    pub(crate) fn new(
        vault: Arc<Vault>,
        volume: Arc<OpenVolume>,
        root: Option<Cid>,
        config: FsConfig,
        work: Option<Mutex<super::WorkTarget>>,
        session: WriteSession,
    ) -> Result<Self> {
        let FsConfig {
            read_only,
            append_only,
            dna,
            detector,
            cache_bytes,
            staging_dir,
            metrics,
        } = config;
        std::fs::create_dir_all(&staging_dir)
            .map_err(NodeError::io("creating staging directory", &staging_dir))?;
        let now = vault.now_ns();
        let mut inodes = Inodes {
            next: ROOT + 1,
            ..Inodes::default()
        };
        inodes.nodes.insert(
            ROOT,
            Inode {
                parent: ROOT,
                name: Vec::new(),
                more_names: Vec::new(),
                mode: 0o755,
                mtime_ns: now,
                ctime_ns: now,
                kind: NodeKind::Directory(Directory {
                    tree: root,
                    children: root.is_none().then(BTreeMap::new),
                    stored: None,
                }),
                meta: EntryMeta::default(),
                lookups: 0,
            },
        );
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let watch = match detector.filter(|_| !read_only) {
            Some(thresholds) => Some(Mutex::new(Watch {
                // The rate the volume's earlier mounts taught it.
                detector: crate::mount::detector::Detector::new(thresholds)
                    .with_baseline(vault.detector_baseline(&volume.id)?),
                priors: BTreeMap::new(),
            })),
            None => None,
        };
        Ok(Self {
            vault,
            volume,
            read_only,
            append_only,
            dna,
            watch,
            frozen: std::sync::atomic::AtomicBool::new(false),
            inodes: Mutex::new(inodes),
            cache: ChunkCache::new(cache_bytes)
                .counting(metrics.cache_hits.clone(), metrics.cache_misses.clone()),
            metrics,
            io: crate::mount::requests::IoFingerprint::default(),
            staging_dir,
            next_handle: AtomicU64::new(1),
            listings: Mutex::new(BTreeMap::new()),
            uid,
            gid,
            owner_names: OwnerNames::default(),
            work,
            session,
            read_ahead_pool: rayon::ThreadPoolBuilder::new()
                .num_threads(READ_AHEAD_THREADS)
                .thread_name(|index| format!("forge-read-ahead-{index}"))
                .build()
                .ok(),
        })
    }

    /// The vault.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The mounted volume.
    pub(crate) fn volume(&self) -> &OpenVolume {
        &self.volume
    }

    /// The mount's write session (gc fence).
    pub(crate) fn session(&self) -> &WriteSession {
        &self.session
    }

    /// Where a read-write mount commits.
    pub fn work(&self) -> Option<&Mutex<super::WorkTarget>> {
        self.work.as_ref()
    }

    /// Marks the working tree as changed (a recovered state must be committed).
    pub fn mark_changed(&self) {
        self.lock().generation += 1;
    }

    /// Marks the working tree as committed up to `generation`, the one its commit
    /// captured with `MountedFs::store_tree`: a change made since stays uncommitted.
    pub fn mark_committed(&self, generation: u64) {
        let mut inodes = self.lock();
        inodes.committed_generation = inodes.committed_generation.max(generation);
    }

    fn lock(&self) -> MutexGuard<'_, Inodes> {
        self.inodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether anything changed since the last commit.
    pub fn has_changes(&self) -> bool {
        let inodes = self.lock();
        inodes.generation > inodes.committed_generation
    }

    fn attr(&self, ino: u64, node: &Inode) -> FileAttr {
        let mut rdev = 0;
        let mut data_bytes = None;
        let (kind, size, nlink) = match &node.kind {
            NodeKind::Directory(_) => (FileType::Directory, 0, 2),
            NodeKind::File(file) => {
                // Holes take no blocks (a sparse image shows what it holds). A file with
                // writes since its last chunking counts its size (its staging state is
                // not read here: that lock is taken before this one elsewhere).
                if file.staged.is_none() {
                    data_bytes = Some(file.base.data_bytes().min(file.size));
                }
                (FileType::RegularFile, file.size, node.link_count())
            }
            NodeKind::Symlink(target) => {
                (FileType::Symlink, target.len() as u64, node.link_count())
            }
            NodeKind::Special(content) => {
                let kind = match content {
                    EntryContent::CharDevice { major, minor } => {
                        rdev = device_number(*major, *minor);
                        FileType::CharDevice
                    }
                    EntryContent::BlockDevice { major, minor } => {
                        rdev = device_number(*major, *minor);
                        FileType::BlockDevice
                    }
                    EntryContent::Socket => FileType::Socket,
                    _ => FileType::NamedPipe,
                };
                (kind, 0, node.link_count())
            }
        };
        let mtime = system_time(node.mtime_ns);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: data_bytes.unwrap_or(size).div_ceil(512),
            // Reads do not move it (as `noatime`); a utimensat does, and it is kept.
            atime: node.meta.atime_ns.map_or(mtime, system_time),
            mtime,
            ctime: system_time(node.ctime_ns),
            crtime: mtime,
            kind,
            perm: u16::try_from(node.mode & 0o7777).unwrap_or(0o644),
            nlink,
            uid: node.meta.uid.unwrap_or(self.uid),
            gid: node.meta.gid.unwrap_or(self.gid),
            rdev,
            blksize: BLOCK_BYTES,
            flags: 0,
        }
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.read_only || self.frozen.load(Ordering::SeqCst) {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// The DNA its commits carry.
    pub fn dna(&self) -> &BTreeMap<String, String> {
        &self.dna
    }

    /// What this mount's requests did so far.
    pub fn io(&self) -> &crate::mount::requests::IoFingerprint {
        &self.io
    }

    /// Counts a request of `operation` in the fingerprint and times it on /metrics until
    /// the guard drops.
    pub(crate) fn request(
        &self,
        operation: &'static str,
    ) -> crate::mount::requests::RequestTimer<'_> {
        self.io.count(operation);
        self.metrics.time(operation)
    }

    /// Refuses, on an append-only volume, what would remove or replace a name.
    fn may_remove_names(&self) -> Result<(), Errno> {
        if self.append_only {
            Err(Errno::EPERM)
        } else {
            Ok(())
        }
    }

    /// Refuses, on an append-only volume, a change of file `ino` below `offset` that
    /// reaches bytes already chunked (what a commit holds): only appends are allowed.
    fn may_change_below(&self, ino: u64, offset: u64) -> Result<(), Errno> {
        if !self.append_only {
            return Ok(());
        }
        let inodes = self.lock();
        match inodes.nodes.get(&ino).map(|node| &node.kind) {
            Some(NodeKind::File(file)) if offset < file.base.size() => Err(Errno::EPERM),
            _ => Ok(()),
        }
    }

    fn check_name(name: &OsStr) -> Result<&[u8], Errno> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        if bytes.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        Ok(bytes)
    }

    fn path_of(&self, inodes: &Inodes, ino: u64) -> PathBuf {
        const SHOWN_AT_EACH_END: usize = 3;
        let mut names = Vec::new();
        let mut current = ino;
        while current != ROOT {
            let Some(inode) = inodes.nodes.get(&current) else {
                break;
            };
            names.push(String::from_utf8_lossy(&inode.name).into_owned());
            current = inode.parent;
        }
        names.reverse();
        if names.len() > 2 * SHOWN_AT_EACH_END + 1 {
            let omitted = names.len() - 2 * SHOWN_AT_EACH_END;
            names.splice(
                SHOWN_AT_EACH_END..names.len() - SHOWN_AT_EACH_END,
                [format!("... {omitted} levels ...")],
            );
        }
        std::iter::once("/".to_owned()).chain(names).collect()
    }
}

/// What a setattr asks to change (`None`: leave it).
#[derive(Debug, Clone, Copy)]
struct AttrChange {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
}

/// How a setxattr treats an attribute that is there, or is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XattrSet {
    /// Create or replace.
    Any,
    /// `XATTR_CREATE`: EEXIST if it is there.
    Create,
    /// `XATTR_REPLACE`: ENODATA if it is not.
    Replace,
}

/// A device number as `st_rdev` holds it.
fn device_number(major: u32, minor: u32) -> u32 {
    u32::try_from(nix::sys::stat::makedev(major.into(), minor.into())).unwrap_or(0)
}

/// Whether the process behind `req` is root or a member of group `gid` (its supplementary
/// groups read from `/proc/PID/status`: a FUSE request carries only the primary group).
fn in_group_or_root(req: &Request, gid: u32) -> bool {
    if req.uid() == 0 || req.gid() == gid {
        return true;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", req.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .any(|group| group.parse::<u32>() == Ok(gid))
        })
}

#[cfg(test)]
mod tests;
