//! The mounted file system: an inode table over the volume's working tree, served to the
//! kernel through `fuser` on several threads.
//!
//! Locks: `inodes` guards names, attributes and which content a file has, and is held only
//! for short metadata steps. File bytes are read outside it (chunks through the cache), so
//! readers of different files never wait on each other. A staged file's own lock is taken
//! before `inodes` whenever both are needed (writes, truncation, chunking).

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

/// One mounted volume.
pub struct MountedFs {
    /// Its requests' times, by operation, and its cache's hits (the host's series).
    metrics: FuseMetrics,
    vault: Arc<Vault>,
    volume: Arc<OpenVolume>,
    read_only: bool,
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
        Ok(Self {
            vault,
            volume,
            read_only,
            inodes: Mutex::new(inodes),
            cache: ChunkCache::new(cache_bytes)
                .counting(metrics.cache_hits.clone(), metrics.cache_misses.clone()),
            metrics,
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

    /// Loads a directory's entries from its tree if not done yet.
    fn ensure_loaded(&self, inodes: &mut Inodes, ino: u64) -> Result<(), Errno> {
        let tree = match inodes.nodes.get(&ino).map(|node| &node.kind) {
            Some(NodeKind::Directory(directory)) => match (&directory.children, directory.tree) {
                (Some(_), _) => return Ok(()),
                (None, tree) => tree,
            },
            Some(_) => return Err(Errno::ENOTDIR),
            None => return Err(Errno::ENOENT),
        };
        let mut children = BTreeMap::new();
        let mut stored = None;
        if let Some(tree) = tree {
            let entries = self
                .vault
                .read_tree(&self.volume, &tree)
                .map_err(|error| log_error(&format!("reading tree {tree}"), &error))?;
            if !inodes.links_loaded && entries.iter().any(|entry| entry.meta.link_group.is_some()) {
                // The first hard link met: load every directory with one (this one too),
                // so each group is one inode with all its names before any is served.
                inodes.links_loaded = true;
                self.load_linked_directories(inodes)?;
                if self::children(inodes, ino).is_some() {
                    return Ok(());
                }
            }
            // Entries get their numbers now and their inodes when first used, but for
            // hard-linked names: all names of a group are one inode from the start.
            // Every linked entry's node first (reading a manifest may fail), then the
            // table: a failure leaves the table as it was.
            let mut linked_kinds = Vec::new();
            for (index, entry) in entries.iter().enumerate() {
                if entry.meta.link_group.is_some() {
                    linked_kinds.push((index, self.node_kind(entry.content.clone())?));
                }
            }
            let first_ino = inodes.next;
            inodes.next += entries.len() as u64;
            let mut linked_kinds = linked_kinds.into_iter().peekable();
            for (index, entry) in entries.iter().enumerate() {
                let child = first_ino + index as u64;
                let Some((_, kind)) = linked_kinds.next_if(|(linked, _)| *linked == index) else {
                    children.insert(entry.name.clone(), child);
                    continue;
                };
                let (group, content) = match entry.meta.link_group {
                    Some(group) => (group, &entry.content),
                    None => continue,
                };
                if let Some((known, known_content)) = inodes.link_groups.get(&group)
                    && known_content == content
                    && let Some(node) = inodes.nodes.get_mut(known)
                    && node.parent != 0
                {
                    // Another name of an inode already in the table.
                    node.more_names.push((ino, entry.name.clone()));
                    children.insert(entry.name.clone(), *known);
                    continue;
                }
                inodes.link_groups.insert(group, (child, content.clone()));
                inodes
                    .nodes
                    .insert(child, inode_of_entry(ino, entry.clone(), kind));
                children.insert(entry.name.clone(), child);
            }
            stored = Some(Arc::new(StoredEntries { first_ino, entries }));
        }
        if let Some(Inode {
            kind: NodeKind::Directory(directory),
            ..
        }) = inodes.nodes.get_mut(&ino)
        {
            directory.children = Some(children);
            directory.stored = stored;
        }
        Ok(())
    }

    /// The node serving an entry's content (a stored manifest is read here).
    fn node_kind(&self, content: EntryContent) -> Result<NodeKind, Errno> {
        Ok(match content {
            EntryContent::Directory { tree } => NodeKind::Directory(Directory {
                tree: Some(Cid::from_bytes(tree)),
                children: None,
                stored: None,
            }),
            EntryContent::InlineFile(manifest) => {
                NodeKind::File(file_node(BaseContent::new(manifest)))
            }
            EntryContent::InlineData(data) => NodeKind::File(file_node(BaseContent::inline(data))),
            EntryContent::File { manifest } => {
                let cid = Cid::from_bytes(manifest);
                let manifest = self
                    .vault
                    .read_manifest(&self.volume, &cid)
                    .map_err(|error| log_error(&format!("reading manifest {cid}"), &error))?;
                NodeKind::File(file_node(BaseContent::new(manifest)))
            }
            EntryContent::Symlink { target } => NodeKind::Symlink(target),
            special @ (EntryContent::Fifo
            | EntryContent::Socket
            | EntryContent::CharDevice { .. }
            | EntryContent::BlockDevice { .. }) => NodeKind::Special(special),
        })
    }

    /// Loads every directory of the working tree whose stored tree holds a hard-linked
    /// name (see [`Inodes::links_loaded`]). Reads each stored tree not loaded yet once,
    /// with the table locked: a one-time cost of the first mount that meets a hard link.
    fn load_linked_directories(&self, inodes: &mut Inodes) -> Result<(), Errno> {
        let mut has_links = BTreeMap::new();
        let mut pending = vec![ROOT];
        while let Some(ino) = pending.pop() {
            let unloaded_tree = match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::Directory(directory)) if directory.children.is_none() => {
                    directory.tree
                }
                Some(NodeKind::Directory(_)) => None,
                _ => continue,
            };
            if let Some(tree) = unloaded_tree {
                if !self.tree_has_links(tree, &mut has_links)? {
                    continue;
                }
                self.ensure_loaded(inodes, ino)?;
            }
            let subdirectories: Vec<u64> = children(inodes, ino)
                .into_iter()
                .flat_map(BTreeMap::values)
                .copied()
                .filter(|child| match inodes.nodes.get(child) {
                    Some(node) => matches!(node.kind, NodeKind::Directory(_)),
                    None => matches!(
                        stored_entry(inodes, ino, *child).map(|entry| &entry.content),
                        Some(EntryContent::Directory { .. })
                    ),
                })
                .collect();
            for child in subdirectories {
                self.materialize(inodes, ino, child)?;
                pending.push(child);
            }
        }
        Ok(())
    }

    /// Whether stored tree `top` or any tree below it has a hard-linked name (`memo` holds
    /// the answers found so far, by tree). Iterative: trees are as deep as the depth limit.
    fn tree_has_links(&self, top: Cid, memo: &mut BTreeMap<Cid, bool>) -> Result<bool, Errno> {
        // (tree, its subtrees once read)
        let mut pending: Vec<(Cid, Option<Vec<Cid>>)> = vec![(top, None)];
        while let Some((tree, subtrees)) = pending.pop() {
            if memo.contains_key(&tree) {
                continue;
            }
            if let Some(subtrees) = subtrees {
                let any = subtrees.iter().any(|sub| memo.get(sub) == Some(&true));
                memo.insert(tree, any);
                continue;
            }
            let entries = self
                .vault
                .read_tree(&self.volume, &tree)
                .map_err(|error| log_error(&format!("reading tree {tree}"), &error))?;
            if entries.iter().any(|entry| entry.meta.link_group.is_some()) {
                memo.insert(tree, true);
                continue;
            }
            let subtrees: Vec<Cid> = entries
                .iter()
                .filter_map(|entry| match entry.content {
                    EntryContent::Directory { tree } => Some(Cid::from_bytes(tree)),
                    _ => None,
                })
                .collect();
            let unknown: Vec<Cid> = subtrees
                .iter()
                .filter(|sub| !memo.contains_key(*sub))
                .copied()
                .collect();
            pending.push((tree, Some(subtrees)));
            pending.extend(unknown.into_iter().map(|sub| (sub, None)));
        }
        Ok(memo.get(&top) == Some(&true))
    }

    /// The inode of `name` in directory `parent`, made from its stored entry if this is
    /// its first use.
    fn child(&self, inodes: &mut Inodes, parent: u64, name: &[u8]) -> Result<Option<u64>, Errno> {
        self.ensure_loaded(inodes, parent)?;
        let Some(child) = children(inodes, parent).and_then(|children| children.get(name).copied())
        else {
            return Ok(None);
        };
        self.materialize(inodes, parent, child)?;
        Ok(Some(child))
    }

    /// Makes the inode of entry `ino` of directory `parent` from the directory's stored
    /// entries, unless it is in the table already (made before, or not a stored entry).
    fn materialize(&self, inodes: &mut Inodes, parent: u64, ino: u64) -> Result<(), Errno> {
        if inodes.nodes.contains_key(&ino) {
            return Ok(());
        }
        let Some(entry) = stored_entry(inodes, parent, ino).cloned() else {
            return Ok(());
        };
        let kind = self.node_kind(entry.content.clone())?;
        inodes
            .nodes
            .insert(ino, inode_of_entry(parent, entry, kind));
        Ok(())
    }

    /// A directory's entries changed: new mtime, and its trees up to the root must be rebuilt.
    fn touch_directory(inodes: &mut Inodes, ino: u64, now: i64) {
        if let Some(node) = inodes.nodes.get_mut(&ino) {
            node.mtime_ns = now;
            node.ctime_ns = now;
        }
        Self::invalidate_trees(inodes, ino);
    }

    /// Inode `ino` changed (content, attributes or names): the trees of every directory
    /// naming it, and their ancestors', no longer describe it.
    fn invalidate_names(inodes: &mut Inodes, ino: u64) {
        let parents = inodes
            .nodes
            .get(&ino)
            .map(Inode::parents)
            .unwrap_or_default();
        for parent in parents {
            Self::invalidate_trees(inodes, parent);
        }
    }

    /// Something under directory `ino` changed: its stored tree and its ancestors' no longer
    /// describe it.
    fn invalidate_trees(inodes: &mut Inodes, mut ino: u64) {
        inodes.generation += 1;
        loop {
            let Some(node) = inodes.nodes.get_mut(&ino) else {
                return;
            };
            if let NodeKind::Directory(directory) = &mut node.kind {
                directory.tree = None;
            }
            if ino == ROOT {
                return;
            }
            ino = node.parent;
        }
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
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

    /// Adds a new node under `parent`, owned by `creator` (the request's uid and gid) as
    /// Linux does: the group is the directory's when it has the setgid bit, and a new
    /// directory inherits that bit.
    ///
    /// `mode` is what the request asked for, before its `umask`: under a directory with a
    /// default ACL the ACL decides instead of the umask, and the new entry inherits it
    /// (the kernel leaves both to the file system: `FUSE_POSIX_ACL`, `FUSE_DONT_MASK`).
    fn insert(
        &self,
        parent: u64,
        name: &OsStr,
        (mut mode, umask): (u32, u32),
        kind: NodeKind,
        creator: (u32, u32),
    ) -> Result<(u64, FileAttr), Errno> {
        self.writable()?;
        let name = Self::check_name(name)?;
        let mut inodes = self.lock();
        if self.child(&mut inodes, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let mut xattrs = Vec::new();
        let default_acl = inodes.nodes.get(&parent).and_then(|directory| {
            directory
                .meta
                .xattrs
                .iter()
                .find(|xattr| xattr.name == posix::ACL_DEFAULT)
                .map(|xattr| xattr.value.clone())
        });
        let inherited = default_acl
            .filter(|_| !matches!(kind, NodeKind::Symlink(_)))
            .and_then(|default| Some((posix::inherit_acl(&default, mode)?, default)));
        match inherited {
            Some(((bits, access), default)) => {
                mode = (mode & 0o7000) | bits;
                if let Some(access) = access {
                    xattrs.push(Xattr {
                        name: posix::ACL_ACCESS.to_vec(),
                        value: access,
                    });
                }
                if matches!(kind, NodeKind::Directory(_)) {
                    xattrs.push(Xattr {
                        name: posix::ACL_DEFAULT.to_vec(),
                        value: default,
                    });
                }
            }
            None => mode &= !umask,
        }
        let (uid, mut gid) = creator;
        if let Some(directory) = inodes.nodes.get(&parent)
            && directory.mode & libc::S_ISGID != 0
        {
            gid = directory.meta.gid.unwrap_or(self.gid);
            if matches!(kind, NodeKind::Directory(_)) {
                mode |= libc::S_ISGID;
            }
        }
        let ino = inodes.next;
        inodes.next += 1;
        let now = self.vault.now_ns();
        let node = Inode {
            parent,
            name: name.to_vec(),
            more_names: Vec::new(),
            mode,
            mtime_ns: now,
            ctime_ns: now,
            kind,
            meta: EntryMeta {
                uid: Some(uid),
                gid: Some(gid),
                user: self.owner_names.user(uid),
                group: self.owner_names.group(gid),
                xattrs,
                ..EntryMeta::default()
            },
            lookups: 0,
        };
        let attr = self.attr(ino, &node);
        inodes.nodes.insert(ino, node);
        if let Some(children) = children_mut(&mut inodes, parent) {
            children.insert(name.to_vec(), ino);
        }
        Self::touch_directory(&mut inodes, parent, self.vault.now_ns());
        Ok((ino, attr))
    }

    /// Gives inode `ino` (not a directory) one more name, `name` in directory `parent`.
    /// (The kernel has checked the caller may: write access to `parent`, and with
    /// `fs.protected_hardlinks` ownership or read-write access to the file.)
    fn link(&self, ino: u64, parent: u64, name: &OsStr) -> Result<(u64, FileAttr), Errno> {
        self.writable()?;
        let name = Self::check_name(name)?;
        let mut inodes = self.lock();
        match inodes.nodes.get(&ino) {
            None => return Err(Errno::ENOENT),
            Some(node) if matches!(node.kind, NodeKind::Directory(_)) => {
                return Err(Errno::EPERM);
            }
            // An unlinked file cannot be named again (no O_TMPFILE here).
            Some(node) if node.parent == 0 => return Err(Errno::ENOENT),
            Some(node) if node.link_count() >= LINK_COUNT_MAX => return Err(Errno::EMLINK),
            Some(_) => {}
        }
        if self.child(&mut inodes, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let now = self.vault.now_ns();
        if let Some(children) = children_mut(&mut inodes, parent) {
            children.insert(name.to_vec(), ino);
        }
        let node = inodes.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        node.more_names.push((parent, name.to_vec()));
        node.ctime_ns = now;
        let attr = self.attr(ino, node);
        // Every name's entry gets the link group at the next commit.
        Self::invalidate_names(&mut inodes, ino);
        Self::touch_directory(&mut inodes, parent, now);
        Ok((ino, attr))
    }

    /// The staging file of file `ino`, created on first need.
    fn staged_for(&self, ino: u64) -> Result<Arc<Staged>, Errno> {
        let mut inodes = self.lock();
        let Some(Inode {
            kind: NodeKind::File(file),
            ..
        }) = inodes.nodes.get_mut(&ino)
        else {
            return Err(Errno::EISDIR);
        };
        if let Some(staged) = &file.staged {
            return Ok(staged.clone());
        }
        let path = self.staging_dir.join(format!("{ino}-{}", file.version));
        let staged = Arc::new(
            Staged::create(path, file.base.size()).map_err(|error| log_error("staging", &error))?,
        );
        file.staged = Some(staged.clone());
        Ok(staged)
    }

    /// Runs `change` with the file's staging state locked (retrying if it was retired by a
    /// concurrent chunking), then updates size and times.
    fn change_content(
        &self,
        ino: u64,
        change: impl Fn(&Staged, &mut super::content::StagedState, &mut u64) -> Result<(), Errno>,
    ) -> Result<FileAttr, Errno> {
        loop {
            let staged = self.staged_for(ino)?;
            let mut state = staged.lock();
            if state.retired {
                continue;
            }
            let mut inodes = self.lock();
            let Some(node) = inodes.nodes.get_mut(&ino) else {
                return Err(Errno::ENOENT);
            };
            let NodeKind::File(file) = &mut node.kind else {
                return Err(Errno::EISDIR);
            };
            change(&staged, &mut state, &mut file.size)?;
            file.version += 1;
            let now = self.vault.now_ns();
            node.mtime_ns = now;
            node.ctime_ns = now;
            let attr = self.attr(ino, node);
            Self::invalidate_names(&mut inodes, ino);
            return Ok(attr);
        }
    }

    /// Chunks a file's staged bytes into the working tree (on close, fsync and commit).
    ///
    /// # Errors
    /// Storage errors.
    pub fn chunk_file(&self, ino: u64) -> Result<()> {
        let Some(staged) = ({
            let inodes = self.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => file.staged.clone(),
                _ => None,
            }
        }) else {
            return Ok(());
        };
        let mut state = staged.lock();
        if state.retired {
            return Ok(());
        }
        let (base, size) = {
            let inodes = self.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => (file.base.clone(), file.size),
                _ => return Ok(()),
            }
        };
        let progress = Progress::new("mount", false);
        let importer = Importer::new(&self.vault, &self.volume, &self.session, &progress)?;
        let content = rechunk(
            &self.vault,
            &self.cache,
            &importer,
            &base,
            &staged,
            &state,
            size,
        )?;
        importer.write_pending()?;
        state.retired = true;
        {
            let mut inodes = self.lock();
            if let Some(Inode {
                kind: NodeKind::File(file),
                ..
            }) = inodes.nodes.get_mut(&ino)
            {
                file.base = Arc::new(content);
                file.staged = None;
                // A tree stored since the write (by an fsync of another file) still names
                // the old content: it must be stored again.
                Self::invalidate_names(&mut inodes, ino);
            }
        }
        drop(state);
        let _ = std::fs::remove_file(&staged.path);
        Ok(())
    }

    /// The kernel was given one more reference to `ino` (an entry or create reply).
    fn remember(&self, ino: u64) {
        if let Some(node) = self.lock().nodes.get_mut(&ino) {
            node.lookups += 1;
        }
    }

    /// The kernel dropped `count` references to `ino`. An inode nobody references leaves
    /// the table when it can be had again: an unlinked file with no open handle (gone for
    /// good), or an entry of a directory unchanged since its tree was stored, once none of
    /// that directory's entries is in use (the listing is dropped and reloaded from the
    /// tree when next needed). So a long mount's memory follows what is in use, not what
    /// was ever touched.
    pub(crate) fn forget(&self, ino: u64, count: u64) {
        let mut inodes = self.lock();
        let Some(node) = inodes.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups > 0 || ino == ROOT {
            return;
        }
        if node.parent == 0 {
            if let NodeKind::File(file) = &node.kind
                && file.handles == 0
            {
                inodes.nodes.remove(&ino);
            }
            return;
        }
        for parent in node.parents() {
            Self::drop_unused_listing(&mut inodes, parent);
        }
    }

    /// Drops the entries of directory `ino` if it is unchanged since its tree was stored and
    /// none of them is referenced, open, staged or a loaded directory.
    fn drop_unused_listing(inodes: &mut Inodes, ino: u64) {
        let Some(Inode {
            kind:
                NodeKind::Directory(Directory {
                    tree: Some(_),
                    children: Some(children),
                    ..
                }),
            ..
        }) = inodes.nodes.get(&ino)
        else {
            return;
        };
        // (A name of a hard-linked inode keeps its directory: all names of a group stay
        // in the table, see `Inodes::links_loaded`.)
        let unused = children.values().all(|child| {
            inodes.nodes.get(child).is_none_or(|node| {
                node.lookups == 0
                    && node.more_names.is_empty()
                    && match &node.kind {
                        NodeKind::File(file) => file.handles == 0 && file.staged.is_none(),
                        NodeKind::Directory(directory) => directory.children.is_none(),
                        NodeKind::Symlink(_) | NodeKind::Special(_) => true,
                    }
            })
        });
        if !unused {
            return;
        }
        let children: Vec<u64> = children.values().copied().collect();
        for child in children {
            inodes.nodes.remove(&child);
        }
        if let Some(Inode {
            kind: NodeKind::Directory(directory),
            ..
        }) = inodes.nodes.get_mut(&ino)
        {
            directory.children = None;
            directory.stored = None;
        }
    }

    /// How many inodes the table holds (for tests and the mount's statistics).
    #[must_use]
    pub fn inode_count(&self) -> usize {
        self.lock().nodes.len()
    }

    /// Drops the staged bytes of file `ino` if it is unlinked and no handle is open: its
    /// space is released at once, not at unmount.
    fn release_unlinked(&self, ino: u64) {
        let staged = {
            let mut inodes = self.lock();
            match inodes.nodes.get_mut(&ino) {
                Some(Inode {
                    parent: 0,
                    kind: NodeKind::File(file),
                    lookups,
                    ..
                }) if file.handles == 0 => {
                    let staged = file.staged.take();
                    if *lookups == 0 {
                        // Nothing names it and the kernel forgot it: it is gone.
                        inodes.nodes.remove(&ino);
                    }
                    staged
                }
                _ => None,
            }
        };
        if let Some(staged) = staged {
            // Retired under its own lock, so a concurrent chunking leaves it alone.
            staged.lock().retired = true;
            let _ = std::fs::remove_file(&staged.path);
        }
    }

    /// Chunks every staged file.
    ///
    /// # Errors
    /// Storage errors.
    pub fn chunk_all(&self) -> Result<()> {
        let staged: Vec<u64> = self
            .lock()
            .nodes
            .iter()
            .filter(|(_, node)| matches!(&node.kind, NodeKind::File(file) if file.staged.is_some()))
            .map(|(ino, _)| *ino)
            .collect();
        for ino in staged {
            self.chunk_file(ino)?;
        }
        Ok(())
    }

    /// Stages the working tree's changed directories (and large manifests) on `importer`
    /// and returns its root with the change generation it captures (taken under the same
    /// lock, so the root holds every change up to it and none after). Staged bytes not yet
    /// chunked are left out.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn store_tree(&self, importer: &Importer<'_>) -> Result<(Cid, u64)> {
        let mut inodes = self.lock();
        let root = self.store_directory(&mut inodes, importer, ROOT)?;
        Ok((root, inodes.generation))
    }

    /// Stores every changed directory under `top` (children before parents, with an
    /// explicit stack: a mount's tree may be as deep as the depth limit, far more than a
    /// FUSE thread's stack would hold recursing) and returns `top`'s tree.
    fn store_directory(
        &self,
        inodes: &mut Inodes,
        importer: &Importer<'_>,
        top: u64,
    ) -> Result<Cid> {
        let depth_max = self.vault.limits().tree_depth_max;
        // (inode, depth, whether its changed subdirectories are stored already)
        let mut pending = vec![(top, 0usize, false)];
        while let Some((ino, depth, children_stored)) = pending.pop() {
            let children = match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::Directory(directory)) if directory.tree.is_some() => continue,
                Some(NodeKind::Directory(directory)) => {
                    directory.children.clone().unwrap_or_default()
                }
                _ => {
                    return Err(MountFault::Internal {
                        what: format!("storing inode {ino} as a directory, which it is not"),
                    }
                    .into());
                }
            };
            if children_stored {
                self.store_one_directory(inodes, importer, ino, children)?;
                continue;
            }
            if depth > depth_max {
                return Err(too_deep(&self.path_of(inodes, ino), depth_max));
            }
            pending.push((ino, depth, true));
            for child in children.values() {
                if let Some(NodeKind::Directory(directory)) =
                    inodes.nodes.get(child).map(|node| &node.kind)
                    && directory.tree.is_none()
                {
                    pending.push((*child, depth + 1, false));
                }
            }
        }
        match inodes.nodes.get(&top).map(|node| &node.kind) {
            Some(NodeKind::Directory(Directory {
                tree: Some(tree), ..
            })) => Ok(*tree),
            _ => Err(MountFault::Internal {
                what: format!("directory inode {top} has no tree after storing it"),
            }
            .into()),
        }
    }

    /// The path of `ino` in the volume, for messages; a long one keeps its first and last
    /// components around an ellipsis.
    /// `RENAME_EXCHANGE`: `first` (its parent, name and inode) and the entry at `second`
    /// swap places atomically; both must exist, and neither may move under itself.
    fn exchange(
        &self,
        inodes: &mut Inodes,
        first: (u64, &[u8], u64),
        second: (u64, &[u8]),
    ) -> Result<(), Errno> {
        let (parent, name, moving) = first;
        let (new_parent, new_name) = second;
        let Some(other) = self.child(inodes, new_parent, new_name)? else {
            return Err(Errno::ENOENT);
        };
        if other == moving {
            return Ok(());
        }
        let mut ancestor = parent;
        while ancestor != ROOT {
            if ancestor == other {
                return Err(Errno::EINVAL);
            }
            ancestor = inodes.nodes.get(&ancestor).map_or(ROOT, |node| node.parent);
        }
        if let Some(entries) = children_mut(inodes, parent) {
            entries.insert(name.to_vec(), other);
        }
        if let Some(entries) = children_mut(inodes, new_parent) {
            entries.insert(new_name.to_vec(), moving);
        }
        let now = self.vault.now_ns();
        for (ino, from, to) in [
            (moving, (parent, name), (new_parent, new_name)),
            (other, (new_parent, new_name), (parent, name)),
        ] {
            if let Some(node) = inodes.nodes.get_mut(&ino) {
                node.rename(from, to);
                node.ctime_ns = now;
            }
            Self::invalidate_names(inodes, ino);
        }
        Self::touch_directory(inodes, parent, now);
        Self::touch_directory(inodes, new_parent, now);
        Ok(())
    }

    /// The value of extended attribute `name` of `ino`.
    fn xattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>, Errno> {
        let inodes = self.lock();
        let node = inodes.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        node.meta
            .xattrs
            .iter()
            .find(|xattr| xattr.name == name)
            .map(|xattr| xattr.value.clone())
            .ok_or(Errno::ENODATA)
    }

    /// The names of `ino`'s extended attributes, each ended by NUL (listxattr's form);
    /// `trusted.*` only when `privileged`.
    fn xattr_names(&self, ino: u64, privileged: bool) -> Result<Vec<u8>, Errno> {
        let inodes = self.lock();
        let node = inodes.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let mut names = Vec::new();
        // Listed namespace by namespace in ext4's order (user, ACLs, trusted, security),
        // so tools that archive attributes in listing order (tar) see what the source had.
        let rank = |name: &[u8]| {
            [
                &b"user."[..],
                b"system.posix_acl_access",
                b"system.posix_acl_default",
                b"trusted.",
                b"security.",
            ]
            .iter()
            .position(|prefix| name.starts_with(prefix))
            .unwrap_or(usize::MAX)
        };
        let mut xattrs: Vec<&Xattr> = node.meta.xattrs.iter().collect();
        xattrs.sort_by_key(|xattr| rank(&xattr.name));
        for xattr in xattrs {
            if !privileged && xattr.name.starts_with(b"trusted.") {
                continue;
            }
            names.extend_from_slice(&xattr.name);
            names.push(0);
        }
        Ok(names)
    }

    /// Sets (`Some`) or removes (`None`) extended attribute `name` of `ino`. The
    /// attributes of one entry are bounded as a volume stores them: past the bound,
    /// ENOSPC (as ext4 says when an inode's attributes are full).
    ///
    /// `keeps_setgid` says whether the caller may keep a file's setgid bit when it sets
    /// the file's access ACL (given the file's group): Linux clears the bit for a caller
    /// neither in that group nor privileged (`posix_acl_update_mode`). The kernel would
    /// send that as `FUSE_SETXATTR_ACL_KILL_SGID`, which needs the extended setxattr
    /// request fuser does not parse, so the mount decides it itself.
    fn change_xattr(
        &self,
        ino: u64,
        (name, value): (&[u8], Option<&[u8]>),
        how: XattrSet,
        keeps_setgid: impl Fn(u32) -> bool,
    ) -> Result<(), Errno> {
        self.writable()?;
        if name.is_empty() || name.len() > 255 {
            return Err(Errno::ERANGE);
        }
        let now = self.vault.now_ns();
        let mut inodes = self.lock();
        let node = inodes.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        let xattrs = &mut node.meta.xattrs;
        let at = xattrs.binary_search_by(|xattr| xattr.name.as_slice().cmp(name));
        match (value, at) {
            (None, Err(_)) => return Err(Errno::ENODATA),
            (None, Ok(index)) => {
                xattrs.remove(index);
            }
            (Some(_), Err(_)) if how == XattrSet::Replace => return Err(Errno::ENODATA),
            (Some(_), Ok(_)) if how == XattrSet::Create => return Err(Errno::EEXIST),
            (Some(value), _) if name == posix::ACL_DEFAULT && posix::parse_acl(value).is_none() => {
                return Err(Errno::EINVAL);
            }
            // An access ACL sets the permission bits; one the bits say all of is not kept.
            (Some(value), found) if name == posix::ACL_ACCESS => {
                let entries = posix::parse_acl(value).ok_or(Errno::EINVAL)?;
                let (bits, extended) = posix::mode_of_acl(&entries);
                node.mode = (node.mode & 0o7000) | bits;
                if !keeps_setgid(node.meta.gid.unwrap_or(self.gid)) {
                    node.mode &= !libc::S_ISGID;
                }
                match (extended, found) {
                    (true, Ok(index)) => xattrs[index].value = value.to_vec(),
                    (true, Err(index)) => xattrs.insert(
                        index,
                        Xattr {
                            name: name.to_vec(),
                            value: value.to_vec(),
                        },
                    ),
                    (false, Ok(index)) => {
                        xattrs.remove(index);
                    }
                    (false, Err(_)) => {}
                }
            }
            (Some(value), found) => {
                let others: usize = xattrs
                    .iter()
                    .filter(|xattr| xattr.name != name)
                    .map(|xattr| xattr.name.len() + xattr.value.len())
                    .sum();
                if others + name.len() + value.len() > XATTR_BYTES_MAX {
                    return Err(Errno::ENOSPC);
                }
                let xattr = Xattr {
                    name: name.to_vec(),
                    value: value.to_vec(),
                };
                match found {
                    Ok(index) => xattrs[index] = xattr,
                    Err(index) => xattrs.insert(index, xattr),
                }
            }
        }
        node.ctime_ns = now;
        // (The root's attributes are in no tree: served until unmount, not committed.)
        if ino != ROOT {
            Self::invalidate_names(&mut inodes, ino);
        }
        Ok(())
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

    /// Stores the tree of directory `ino`, whose changed subdirectories are stored.
    fn store_one_directory(
        &self,
        inodes: &mut Inodes,
        importer: &Importer<'_>,
        ino: u64,
        children: BTreeMap<Vec<u8>, u64>,
    ) -> Result<Cid> {
        let mut entries = Vec::with_capacity(children.len());
        let stored = match inodes.nodes.get(&ino).map(|node| &node.kind) {
            Some(NodeKind::Directory(directory)) => directory.stored.clone(),
            _ => None,
        };
        for (name, child) in children {
            if !inodes.nodes.contains_key(&child) {
                // Not used since its tree was loaded: stored again as it was.
                if let Some(entry) = stored.as_ref().and_then(|stored| stored.entry(child)) {
                    debug_assert_eq!(entry.name, name, "a stored entry keeps its name");
                    entries.push(entry.clone());
                }
                continue;
            }
            let content = match inodes.nodes.get(&child).map(|node| &node.kind) {
                Some(NodeKind::Directory(Directory {
                    tree: Some(tree), ..
                })) => EntryContent::Directory {
                    tree: *tree.as_bytes(),
                },
                Some(NodeKind::Directory(_)) => {
                    return Err(MountFault::Internal {
                        what: format!("directory inode {child} is not stored before its parent"),
                    }
                    .into());
                }
                Some(NodeKind::File(file)) => match file.base.inline_data() {
                    Some(data) => EntryContent::InlineData(data.to_vec()),
                    None => importer.file_content(file.base.manifest.clone())?,
                },
                Some(NodeKind::Symlink(target)) => EntryContent::Symlink {
                    target: target.clone(),
                },
                Some(NodeKind::Special(content)) => content.clone(),
                None => continue,
            };
            let link_group = self.link_group_of(inodes, child)?;
            let Some(node) = inodes.nodes.get(&child) else {
                continue;
            };
            let size = match &node.kind {
                NodeKind::File(file) => file.base.size(),
                NodeKind::Symlink(target) => target.len() as u64,
                NodeKind::Directory(_) | NodeKind::Special(_) => 0,
            };
            entries.push(TreeEntry {
                name,
                mode: node.mode & 0o7777,
                mtime_ns: node.mtime_ns,
                size,
                content,
                // A ctime equal to the mtime is what a missing one reads as: leave it out,
                // so an entry nobody touched encodes as it was.
                meta: EntryMeta {
                    ctime_ns: (node.ctime_ns != node.mtime_ns).then_some(node.ctime_ns),
                    link_group,
                    ..node.meta.clone()
                },
            });
        }
        let cid = importer.store_tree(Tree { entries })?;
        debug_assert!(
            inodes.nodes.contains_key(&ino),
            "a stored directory stays in the table"
        );
        if let Some(Inode {
            kind: NodeKind::Directory(directory),
            ..
        }) = inodes.nodes.get_mut(&ino)
        {
            directory.tree = Some(cid);
        }
        Ok(cid)
    }

    /// The hard-link group entry `ino`'s names are stored with: none for a single name;
    /// for several, the group it came with or, for links made through the mount, a new
    /// one from the vault's randomness (kept, so each of its directories stores the same
    /// group and later commits keep it).
    fn link_group_of(&self, inodes: &mut Inodes, ino: u64) -> Result<Option<u64>> {
        let Some(node) = inodes.nodes.get_mut(&ino) else {
            return Ok(None);
        };
        if node.link_count() < 2 {
            return Ok(None);
        }
        if let Some(group) = node.meta.link_group {
            return Ok(Some(group));
        }
        let group = u64::from_le_bytes(self.vault.random_array()?);
        node.meta.link_group = Some(group);
        Ok(Some(group))
    }

    /// Prefetches the chunks after `index` of `base` into the cache, off the request
    /// thread, each at most once at a time.
    fn read_ahead(self: &Arc<Self>, base: &Arc<BaseContent>, index: usize) {
        let Some(pool) = &self.read_ahead_pool else {
            return;
        };
        for next in index + 1..=index + READ_AHEAD_CHUNKS {
            let Some(extent) = base.manifest.extents.get(next) else {
                return;
            };
            let Extent::Chunk(chunk) = extent else {
                continue;
            };
            let cid = chunk.cid();
            if !self.cache.claim(&cid) {
                continue;
            }
            let (fs, base) = (self.clone(), base.clone());
            pool.spawn(move || {
                let loaded = match &base.manifest.extents[next] {
                    Extent::Chunk(chunk) => fs.vault.read_chunk_plaintext(chunk).ok(),
                    Extent::Hole { .. } => None,
                };
                if loaded.is_some() {
                    fs.metrics.read_ahead_chunks.inc();
                }
                fs.cache.complete(&cid, loaded.map(Arc::new));
            });
        }
    }
}

/// A device number as `st_rdev` holds it.
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

/// What readdir reports an entry as.
fn file_type(kind: &NodeKind) -> FileType {
    match kind {
        NodeKind::Directory(_) => FileType::Directory,
        NodeKind::File(_) => FileType::RegularFile,
        NodeKind::Symlink(_) => FileType::Symlink,
        NodeKind::Special(EntryContent::CharDevice { .. }) => FileType::CharDevice,
        NodeKind::Special(EntryContent::BlockDevice { .. }) => FileType::BlockDevice,
        NodeKind::Special(EntryContent::Socket) => FileType::Socket,
        NodeKind::Special(_) => FileType::NamedPipe,
    }
}

fn file_node(base: BaseContent) -> FileNode {
    let base = Arc::new(base);
    FileNode {
        size: base.size(),
        base,
        staged: None,
        writers: 0,
        handles: 0,
        version: 1,
        cached_version: 0,
    }
}

/// The inode a tree entry is served as, in directory `parent`.
fn inode_of_entry(parent: u64, entry: TreeEntry, kind: NodeKind) -> Inode {
    Inode {
        parent,
        name: entry.name,
        more_names: Vec::new(),
        mode: entry.mode,
        mtime_ns: entry.mtime_ns,
        ctime_ns: entry.meta.ctime_ns.unwrap_or(entry.mtime_ns),
        kind,
        meta: entry.meta,
        lookups: 0,
    }
}

/// The stored entry numbered `ino` of directory `parent` (see [`Directory::stored`]).
fn stored_entry(inodes: &Inodes, parent: u64, ino: u64) -> Option<&TreeEntry> {
    match inodes.nodes.get(&parent).map(|node| &node.kind) {
        Some(NodeKind::Directory(directory)) => directory.stored.as_ref()?.entry(ino),
        _ => None,
    }
}

/// What a listing shows for an entry not made an inode yet.
fn file_type_of_content(content: &EntryContent) -> FileType {
    match content {
        EntryContent::Directory { .. } => FileType::Directory,
        EntryContent::Symlink { .. } => FileType::Symlink,
        EntryContent::CharDevice { .. } => FileType::CharDevice,
        EntryContent::BlockDevice { .. } => FileType::BlockDevice,
        EntryContent::Socket => FileType::Socket,
        EntryContent::Fifo => FileType::NamedPipe,
        EntryContent::File { .. } | EntryContent::InlineFile(_) | EntryContent::InlineData(_) => {
            FileType::RegularFile
        }
    }
}

fn children(inodes: &Inodes, ino: u64) -> Option<&BTreeMap<Vec<u8>, u64>> {
    match inodes.nodes.get(&ino).map(|node| &node.kind) {
        Some(NodeKind::Directory(directory)) => directory.children.as_ref(),
        _ => None,
    }
}

fn children_mut(inodes: &mut Inodes, ino: u64) -> Option<&mut BTreeMap<Vec<u8>, u64>> {
    match inodes.nodes.get_mut(&ino).map(|node| &mut node.kind) {
        Some(NodeKind::Directory(directory)) => directory.children.as_mut(),
        _ => None,
    }
}

/// The file system as fuser serves it: the shared state behind an `Arc`, so request
/// handlers can hand work (read-ahead) to other threads.
#[derive(Debug, Clone)]
pub struct FuseAdapter(pub Arc<MountedFs>);

impl FuseAdapter {
    fn entry(&self, reply: ReplyEntry, result: Result<(u64, FileAttr), Errno>) {
        match result {
            Ok((ino, attr)) => {
                self.0.remember(ino);
                reply.entry(&TTL, &attr, Generation(0));
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn remove(&self, parent: u64, name: &OsStr, directory: bool) -> Result<(), Errno> {
        let fs = &self.0;
        fs.writable()?;
        let name = MountedFs::check_name(name)?;
        let mut inodes = fs.lock();
        let Some(child) = fs.child(&mut inodes, parent, name)? else {
            return Err(Errno::ENOENT);
        };
        match (inodes.nodes.get(&child).map(|node| &node.kind), directory) {
            (Some(NodeKind::Directory(_)), false) => return Err(Errno::EISDIR),
            (Some(NodeKind::Directory(_)), true) => {
                fs.ensure_loaded(&mut inodes, child)?;
                if children(&inodes, child).is_some_and(|entries| !entries.is_empty()) {
                    return Err(Errno::ENOTEMPTY);
                }
            }
            (Some(_), true) => return Err(Errno::ENOTDIR),
            (Some(_), false) => {}
            (None, _) => return Err(Errno::ENOENT),
        }
        if let Some(entries) = children_mut(&mut inodes, parent) {
            entries.remove(name);
        }
        // The inode stays: open handles (and its other names) keep working on it.
        let now = fs.vault.now_ns();
        if let Some(node) = inodes.nodes.get_mut(&child) {
            node.remove_name(parent, name);
            node.ctime_ns = now;
        }
        MountedFs::invalidate_names(&mut inodes, child);
        MountedFs::touch_directory(&mut inodes, parent, now);
        drop(inodes);
        fs.release_unlinked(child);
        Ok(())
    }

    fn do_rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let fs = &self.0;
        fs.writable()?;
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        if exchange && flags.contains(RenameFlags::RENAME_NOREPLACE) {
            return Err(Errno::EINVAL);
        }
        let (name, new_name) = (
            MountedFs::check_name(name)?,
            MountedFs::check_name(new_name)?,
        );
        let mut inodes = fs.lock();
        let Some(moving) = fs.child(&mut inodes, parent, name)? else {
            return Err(Errno::ENOENT);
        };
        fs.ensure_loaded(&mut inodes, new_parent)?;
        // A directory cannot move under itself.
        let mut ancestor = new_parent;
        while ancestor != ROOT {
            if ancestor == moving {
                return Err(Errno::EINVAL);
            }
            ancestor = inodes.nodes.get(&ancestor).map_or(ROOT, |node| node.parent);
        }
        if exchange {
            return fs.exchange(&mut inodes, (parent, name, moving), (new_parent, new_name));
        }
        let moving_is_dir = matches!(
            inodes.nodes.get(&moving).map(|node| &node.kind),
            Some(NodeKind::Directory(_))
        );
        let mut replaced = None;
        if let Some(target) = fs.child(&mut inodes, new_parent, new_name)? {
            if target == moving {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            let target_is_dir = matches!(
                inodes.nodes.get(&target).map(|node| &node.kind),
                Some(NodeKind::Directory(_))
            );
            match (moving_is_dir, target_is_dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) => {
                    fs.ensure_loaded(&mut inodes, target)?;
                    if children(&inodes, target).is_some_and(|entries| !entries.is_empty()) {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
                (false, false) => {}
            }
            if let Some(node) = inodes.nodes.get_mut(&target) {
                node.remove_name(new_parent, new_name);
                node.ctime_ns = fs.vault.now_ns();
            }
            MountedFs::invalidate_names(&mut inodes, target);
            replaced = Some(target);
        }
        if let Some(entries) = children_mut(&mut inodes, parent) {
            entries.remove(name);
        }
        if let Some(entries) = children_mut(&mut inodes, new_parent) {
            entries.insert(new_name.to_vec(), moving);
        }
        if let Some(node) = inodes.nodes.get_mut(&moving) {
            node.rename((parent, name), (new_parent, new_name));
            node.ctime_ns = fs.vault.now_ns();
        }
        MountedFs::invalidate_names(&mut inodes, moving);
        let now = fs.vault.now_ns();
        MountedFs::touch_directory(&mut inodes, parent, now);
        MountedFs::touch_directory(&mut inodes, new_parent, now);
        drop(inodes);
        if let Some(replaced) = replaced {
            fs.release_unlinked(replaced);
        }
        Ok(())
    }

    fn open_file(&self, ino: u64, flags: OpenFlags) -> Result<(FileHandle, FopenFlags), Errno> {
        let fs = &self.0;
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        if write {
            fs.writable()?;
        }
        let keep_cache = {
            let mut inodes = fs.lock();
            let Some(node) = inodes.nodes.get_mut(&ino) else {
                return Err(Errno::ENOENT);
            };
            let NodeKind::File(file) = &mut node.kind else {
                return Err(Errno::EISDIR);
            };
            if write {
                file.writers += 1;
            }
            file.handles += 1;
            // The kernel may keep its cached pages only if the file did not change since
            // they were read.
            let keep = file.cached_version == file.version;
            file.cached_version = file.version;
            keep
        };
        if write && flags.0 & libc::O_TRUNC != 0 {
            fs.change_content(ino, |staged, state, size| {
                state.dirty.truncate(0);
                state.base_limit = 0;
                *size = 0;
                staged.file.set_len(0).map_err(|_| Errno::EIO)
            })?;
        }
        let handle = fs.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut open_flags = FopenFlags::empty();
        if keep_cache {
            open_flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        // The handle number's low bit records write access, for release.
        Ok((FileHandle((handle << 1) | u64::from(write)), open_flags))
    }

    /// A change of attributes the kernel has allowed (`default_permissions`: it checks
    /// who may chown, chmod or set times, and asks to clear setuid and setgid as a chown
    /// or a write must, by sending the mode without them).
    fn do_setattr(&self, ino: u64, change: &AttrChange) -> Result<FileAttr, Errno> {
        let fs = &self.0;
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = *change;
        let metadata_changes =
            mode.is_some() || uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some();
        if metadata_changes || size.is_some() {
            fs.writable()?;
        }
        if let Some(new_size) = size {
            if new_size > FILE_BYTES_MAX {
                return Err(Errno::EFBIG);
            }
            fs.change_content(ino, |staged, state, file_size| {
                state.dirty.truncate(new_size);
                state.base_limit = state.base_limit.min(new_size);
                *file_size = new_size;
                staged.file.set_len(new_size).map_err(Errno::from)
            })?;
        }
        let mut inodes = fs.lock();
        let Some(node) = inodes.nodes.get_mut(&ino) else {
            return Err(Errno::ENOENT);
        };
        let now = fs.vault.now_ns();
        if let Some(mode) = mode {
            node.mode = mode & 0o7777;
            node.ctime_ns = now;
            // The access ACL follows the new bits (owner, mask, other).
            if let Some(acl) = node
                .meta
                .xattrs
                .iter_mut()
                .find(|xattr| xattr.name == posix::ACL_ACCESS)
                && let Some(updated) = posix::chmod_acl(&acl.value, mode)
            {
                acl.value = updated;
            }
        }
        if let Some(mtime) = mtime {
            node.mtime_ns = time_ns(mtime, now);
            node.ctime_ns = now;
        }
        if let Some(atime) = atime {
            node.meta.atime_ns = Some(time_ns(atime, now));
            node.ctime_ns = now;
        }
        if let Some(uid) = uid {
            node.meta.uid = Some(uid);
            node.meta.user = fs.owner_names.user(uid);
            node.ctime_ns = now;
        }
        if let Some(gid) = gid {
            node.meta.gid = Some(gid);
            node.meta.group = fs.owner_names.group(gid);
            node.ctime_ns = now;
        }
        let attr = fs.attr(ino, node);
        // The root's own attributes are in no tree (a snapshot is its root's entries): a
        // change to them is served until unmount, not committed.
        if metadata_changes && ino != ROOT {
            MountedFs::invalidate_names(&mut inodes, ino);
        }
        Ok(attr)
    }

    /// SEEK_DATA and SEEK_HOLE over the file's extents and its writes since chunking
    /// (other whences the kernel answers itself).
    fn do_lseek(&self, ino: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
        let fs = &self.0;
        let (base, staged, file_size) = {
            let inodes = fs.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => (file.base.clone(), file.staged.clone(), file.size),
                Some(_) => return Err(Errno::EINVAL),
                None => return Err(Errno::ENOENT),
            }
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let state = staged.as_ref().map(|staged| staged.lock());
        let found = match whence {
            libc::SEEK_DATA => seek_data(&base, state.as_deref(), file_size, offset),
            libc::SEEK_HOLE => seek_hole(&base, state.as_deref(), file_size, offset),
            _ => return Err(Errno::EINVAL),
        };
        // Past the end, or only a hole left for SEEK_DATA: ENXIO, as lseek(2) says.
        found
            .filter(|at| *at < file_size || whence == libc::SEEK_HOLE)
            .and_then(|at| i64::try_from(at).ok())
            .ok_or(Errno::ENXIO)
    }

    fn do_read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let fs = &self.0;
        let (base, staged, file_size) = {
            let inodes = fs.lock();
            match inodes.nodes.get(&ino).map(|node| &node.kind) {
                Some(NodeKind::File(file)) => (file.base.clone(), file.staged.clone(), file.size),
                Some(_) => return Err(Errno::EISDIR),
                None => return Err(Errno::ENOENT),
            }
        };
        let state = staged.as_ref().map(|staged| staged.lock());
        let overlay = staged.as_deref().zip(state.as_deref());
        let result = read_overlay(
            &fs.vault,
            &fs.cache,
            &base,
            overlay,
            file_size,
            offset,
            size as usize,
        );
        drop(state);
        if staged.is_none() {
            // Sequential readers find the next chunk decrypted by the time they reach it.
            let last = offset + u64::from(size).saturating_sub(1);
            if let Some(index) = base.chunk_at(last.min(file_size.saturating_sub(1))) {
                fs.read_ahead(&base, index);
            }
        }
        result.map_err(|error| log_error(&format!("read of inode {ino}"), &error))
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Large kernel read-ahead and writes: fewer requests per MiB.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        // Let the kernel keep more read-ahead requests in flight for the worker threads.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // ACLs enforced by the kernel against what the volume keeps; the file system keeps
        // mode and ACL in step and applies umask or default ACL itself (see `insert`).
        if config
            .add_capabilities(fuser::InitFlags::FUSE_DONT_MASK)
            .is_ok()
        {
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_POSIX_ACL);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = self.0.metrics.time("lookup");
        let fs = &self.0;
        let mut inodes = fs.lock();
        let result = fs
            .child(&mut inodes, parent.0, name.as_bytes())
            .and_then(|child| child.ok_or(Errno::ENOENT))
            .and_then(|child| {
                let node = inodes.nodes.get(&child).ok_or(Errno::ENOENT)?;
                Ok((child, fs.attr(child, node)))
            });
        drop(inodes);
        self.entry(reply, result);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let _timer = self.0.metrics.time("forget");
        self.0.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = self.0.metrics.time("getattr");
        let fs = &self.0;
        let inodes = fs.lock();
        match inodes.nodes.get(&ino.0) {
            Some(node) => reply.attr(&TTL, &fs.attr(ino.0, node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _timer = self.0.metrics.time("setattr");
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        match self.do_setattr(ino.0, &change) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = self.0.metrics.time("readlink");
        let inodes = self.0.lock();
        match inodes.nodes.get(&ino.0).map(|node| &node.kind) {
            Some(NodeKind::Symlink(target)) => reply.data(target),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.metrics.time("mkdir");
        let kind = NodeKind::Directory(Directory {
            tree: None,
            children: Some(BTreeMap::new()),
            stored: None,
        });
        self.entry(
            reply,
            self.0.insert(
                parent.0,
                name,
                (mode & 0o7777, umask),
                kind,
                (req.uid(), req.gid()),
            ),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.metrics.time("unlink");
        match self.remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.metrics.time("rmdir");
        match self.remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.metrics.time("symlink");
        let kind = NodeKind::Symlink(target.as_os_str().as_bytes().to_vec());
        self.entry(
            reply,
            self.0.insert(
                parent.0,
                link_name,
                (0o777, 0),
                kind,
                (req.uid(), req.gid()),
            ),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.metrics.time("rename");
        match self.do_rename(parent.0, name, newparent.0, newname, flags) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.metrics.time("link");
        self.entry(reply, self.0.link(ino.0, newparent.0, newname));
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _timer = self.0.metrics.time("lseek");
        match self.do_lseek(ino.0, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(errno) => reply.error(errno),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _timer = self.0.metrics.time("mknod");
        // The kernel has checked CAP_MKNOD for devices (and `nodev` keeps them inert).
        let (major, minor) = (
            u32::try_from(nix::sys::stat::major(rdev.into())).unwrap_or(0),
            u32::try_from(nix::sys::stat::minor(rdev.into())).unwrap_or(0),
        );
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NodeKind::File(file_node(BaseContent::default())),
            libc::S_IFIFO => NodeKind::Special(EntryContent::Fifo),
            libc::S_IFSOCK => NodeKind::Special(EntryContent::Socket),
            libc::S_IFCHR => NodeKind::Special(EntryContent::CharDevice { major, minor }),
            libc::S_IFBLK => NodeKind::Special(EntryContent::BlockDevice { major, minor }),
            _ => return reply.error(Errno::EINVAL),
        };
        self.entry(
            reply,
            self.0.insert(
                parent.0,
                name,
                (mode & 0o7777, umask),
                kind,
                (req.uid(), req.gid()),
            ),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = self.0.metrics.time("getxattr");
        match self.0.xattr(ino.0, name.as_bytes()) {
            Ok(value) => reply_xattr(reply, &value, size),
            Err(errno) => reply.error(errno),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = self.0.metrics.time("listxattr");
        // As local file systems do, trusted.* names are listed to root only (the kernel
        // already refuses their values to others).
        match self.0.xattr_names(ino.0, req.uid() == 0) {
            Ok(names) => reply_xattr(reply, &names, size),
            Err(errno) => reply.error(errno),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.metrics.time("setxattr");
        let how = if flags & libc::XATTR_CREATE != 0 {
            XattrSet::Create
        } else if flags & libc::XATTR_REPLACE != 0 {
            XattrSet::Replace
        } else {
            XattrSet::Any
        };
        match self
            .0
            .change_xattr(ino.0, (name.as_bytes(), Some(value)), how, |group| {
                in_group_or_root(req, group)
            }) {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _timer = self.0.metrics.time("removexattr");
        match self
            .0
            .change_xattr(ino.0, (name.as_bytes(), None), XattrSet::Any, |_| true)
        {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.0.metrics.time("open");
        match self.open_file(ino.0, flags) {
            Ok((handle, open_flags)) => reply.opened(handle, open_flags),
            Err(errno) => reply.error(errno),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let _timer = self.0.metrics.time("read");
        match self.do_read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let _timer = self.0.metrics.time("write");
        let result = self.0.writable().and_then(|()| {
            let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
            if end > FILE_BYTES_MAX {
                return Err(Errno::EFBIG);
            }
            self.0.change_content(ino.0, |staged, state, size| {
                staged
                    .file
                    .write_all_at(data, offset)
                    .map_err(Errno::from)?;
                let end = offset + data.len() as u64;
                state.dirty.insert(offset, end);
                *size = (*size).max(end);
                Ok(())
            })
        });
        match result {
            Ok(_) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.metrics.time("flush");
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.metrics.time("release");
        let fs = &self.0;
        let (last_writer, unlinked) = {
            let mut inodes = fs.lock();
            match inodes.nodes.get_mut(&ino.0) {
                Some(Inode {
                    parent,
                    kind: NodeKind::File(file),
                    ..
                }) => {
                    file.handles = file.handles.saturating_sub(1);
                    let mut last_writer = false;
                    if fh.0 & 1 == 1 {
                        file.writers = file.writers.saturating_sub(1);
                        last_writer = file.writers == 0;
                    }
                    (last_writer, *parent == 0)
                }
                _ => (false, false),
            }
        };
        if unlinked {
            // Nothing can name it any more: its staged bytes are garbage, and on a full
            // disk they are the space the user is trying to get back.
            fs.release_unlinked(ino.0);
            reply.ok();
            return;
        }
        // Closed files are chunked into the working tree.
        if last_writer && let Err(error) = fs.chunk_file(ino.0) {
            reply.error(log_error("chunking a closed file", &error));
            return;
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.metrics.time("fsync");
        let fs = &self.0;
        let result = fs
            .chunk_file(ino.0)
            .and_then(|()| super::persist_working(fs));
        match result {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_error("fsync", &error)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = self.0.metrics.time("opendir");
        let fs = &self.0;
        let mut inodes = fs.lock();
        if let Err(errno) = fs.ensure_loaded(&mut inodes, ino.0) {
            reply.error(errno);
            return;
        }
        let parent = inodes.nodes.get(&ino.0).map_or(ROOT, |node| node.parent);
        let mut listing = vec![
            (ino.0, FileType::Directory, b".".to_vec()),
            (parent.max(ROOT), FileType::Directory, b"..".to_vec()),
        ];
        for (name, child) in children(&inodes, ino.0).into_iter().flatten() {
            let kind = match inodes.nodes.get(child) {
                Some(node) => file_type(&node.kind),
                None => stored_entry(&inodes, ino.0, *child)
                    .map_or(FileType::RegularFile, |entry| {
                        file_type_of_content(&entry.content)
                    }),
            };
            listing.push((*child, kind, name.clone()));
        }
        drop(inodes);
        let handle = fs.next_handle.fetch_add(1, Ordering::Relaxed);
        fs.listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(handle, Arc::new(listing));
        reply.opened(FileHandle(handle), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timer = self.0.metrics.time("readdir");
        let listing = self
            .0
            .listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&fh.0)
            .cloned();
        let Some(listing) = listing else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, (child, kind, name)) in listing.iter().enumerate().skip(start) {
            if reply.add(
                INodeNo(*child),
                index as u64 + 1,
                *kind,
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.metrics.time("releasedir");
        self.0
            .listings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = self.0.metrics.time("fsyncdir");
        match super::persist_working(&self.0) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_error("fsyncdir", &error)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = self.0.metrics.time("statfs");
        // The vault's own file system bounds what can be written.
        let path = self.0.staging_dir.clone();
        match statvfs(&path) {
            Some((blocks, free, available, files, files_free, block_size)) => {
                reply.statfs(
                    blocks, free, available, files, files_free, block_size, 255, block_size,
                );
            }
            None => reply.statfs(0, 0, 0, 0, 0, BLOCK_BYTES, 255, BLOCK_BYTES),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _timer = self.0.metrics.time("create");
        let kind = NodeKind::File(file_node(BaseContent::default()));
        let created = self.0.insert(
            parent.0,
            name,
            (mode & 0o7777, umask),
            kind,
            (req.uid(), req.gid()),
        );
        match created.and_then(|(ino, attr)| {
            Ok((
                self.open_file(ino, OpenFlags(flags & !libc::O_TRUNC))?,
                attr,
            ))
        }) {
            Ok(((handle, open_flags), attr)) => {
                self.0.remember(attr.ino.0);
                reply.created(&TTL, &attr, Generation(0), handle, open_flags);
            }
            Err(errno) => reply.error(errno),
        }
    }
}

/// getxattr's and listxattr's reply: the size when asked for it (`size` 0), the bytes
/// when they fit, ERANGE when they do not.
fn reply_xattr(reply: ReplyXattr, bytes: &[u8], size: u32) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    if size == 0 {
        reply.size(len);
    } else if len <= size {
        reply.data(bytes);
    } else {
        reply.error(Errno::ERANGE);
    }
}

fn statvfs(path: &Path) -> Option<(u64, u64, u64, u64, u64, u32)> {
    let stats = nix::sys::statvfs::statvfs(path).ok()?;
    let block_size = u32::try_from(stats.fragment_size()).unwrap_or(BLOCK_BYTES);
    Some((
        stats.blocks(),
        stats.blocks_free(),
        stats.blocks_available(),
        stats.files(),
        stats.files_free(),
        block_size,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::mount::{WorkTarget, commit, commit_with};
    use crate::test_support::{new_vault, no_passphrase};
    use crate::vault::CreateVolumeOptions;

    fn mounted(temp: &Path) -> MountedFs {
        mounted_on(Arc::new(new_vault(temp)), temp)
    }

    fn mounted_on(vault: Arc<Vault>, temp: &Path) -> MountedFs {
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let volume = Arc::new(vault.open_volume("v", &no_passphrase).unwrap());
        let session = vault.open_write_session("mount", volume.id).unwrap();
        MountedFs::new(
            vault,
            volume,
            None,
            FsConfig {
                read_only: false,
                cache_bytes: 1 << 20,
                staging_dir: temp.join("staging"),
                metrics: Default::default(),
            },
            Some(Mutex::new(WorkTarget {
                branch: "main".into(),
                base: None,
            })),
            session,
        )
        .unwrap()
    }

    /// A second mount of the head of `main` of `fs`'s volume, as a later `forge volume
    /// mount` makes it.
    fn mount_head(fs: &MountedFs, temp: &Path) -> MountedFs {
        let head = fs
            .vault()
            .refs()
            .get_ref(&fs.volume().id, "main")
            .unwrap()
            .unwrap();
        let root = Cid::from_bytes(fs.vault().read_commit(fs.volume(), &head).unwrap().root);
        MountedFs::new(
            fs.vault.clone(),
            fs.volume.clone(),
            Some(root),
            FsConfig {
                read_only: false,
                cache_bytes: 1 << 20,
                staging_dir: temp.join("staging-2"),
                metrics: Default::default(),
            },
            Some(Mutex::new(WorkTarget {
                branch: "main".into(),
                base: Some(head),
            })),
            fs.vault()
                .open_write_session("mount 2", fs.volume().id)
                .unwrap(),
        )
        .unwrap()
    }

    fn mkdir(fs: &MountedFs, name: &str) {
        let kind = NodeKind::Directory(Directory {
            tree: None,
            children: Some(BTreeMap::new()),
            stored: None,
        });
        fs.insert(ROOT, OsStr::new(name), (0o755, 0), kind, (0, 0))
            .unwrap();
    }

    /// The names at the root of the branch head.
    fn committed_names(fs: &MountedFs) -> BTreeSet<String> {
        head_names(fs.vault(), fs.volume())
    }

    /// The names at the root of the head of `main`.
    fn head_names(vault: &Vault, volume: &OpenVolume) -> BTreeSet<String> {
        let head = vault.refs().get_ref(&volume.id, "main").unwrap().unwrap();
        let root = Cid::from_bytes(vault.read_commit(volume, &head).unwrap().root);
        vault
            .read_object(volume, &root)
            .unwrap()
            .into_tree()
            .unwrap()
            .entries
            .into_iter()
            .map(|entry| String::from_utf8(entry.name).unwrap())
            .collect()
    }

    /// A mount's commit stored directories recursing once per level on the calling (FUSE)
    /// thread: a deep tree made through a mount overflowed its stack. Now the walk is
    /// iterative (here on a 256 KiB stack, 2,000 levels down) and a tree past the depth
    /// limit is refused saying so, with nothing committed.
    #[test]
    fn a_deep_tree_commits_on_a_small_stack_and_one_past_the_limit_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let mut vault = new_vault(temp.path());
        vault.set_limits(crate::vault::VaultLimits {
            tree_depth_max: 3_000,
            ..crate::vault::VaultLimits::default()
        });
        let fs = Arc::new(mounted_on(Arc::new(vault), temp.path()));
        let chain = |fs: &MountedFs, top: &str, levels: usize| {
            let mut parent = ROOT;
            for level in 0..levels {
                let name = if level == 0 { top } else { "d" };
                let kind = NodeKind::Directory(Directory {
                    tree: None,
                    children: Some(BTreeMap::new()),
                    stored: None,
                });
                parent = fs
                    .insert(parent, OsStr::new(name), (0o755, 0), kind, (0, 0))
                    .unwrap()
                    .0;
            }
        };
        chain(&fs, "deep", 2_000);
        let on_small_stack = |fs: Arc<MountedFs>, message: &'static str| {
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || commit(&fs, message).map(|outcome| outcome.is_some()))
                .unwrap()
                .join()
                .expect("the commit overflowed its stack")
        };
        assert!(on_small_stack(fs.clone(), "deep").unwrap());
        let vault = fs.vault();
        let volume = fs.volume();
        let head = vault.refs().get_ref(&volume.id, "main").unwrap().unwrap();
        let mut tree = Cid::from_bytes(vault.read_commit(volume, &head).unwrap().root);
        let mut levels = 0;
        while let Some(entry) = vault.read_tree(volume, &tree).unwrap().into_iter().next() {
            let EntryContent::Directory { tree: below } = entry.content else {
                panic!("{entry:?}");
            };
            tree = Cid::from_bytes(below);
            levels += 1;
        }
        assert_eq!(levels, 2_000);

        chain(&fs, "too-deep", 3_002);
        let error = on_small_stack(fs.clone(), "too deep").unwrap_err();
        assert!(matches!(error, NodeError::TooLarge { .. }), "{error}");
        assert!(
            error.to_string().contains("nested deeper than 3000"),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("/too-deep/d/d/... 2995 levels .../d/d/d"),
            "{error}"
        );
        assert_eq!(
            vault.refs().get_ref(&volume.id, "main").unwrap(),
            Some(head),
            "nothing committed"
        );
        assert!(fs.has_changes(), "the change stays in the working tree");
    }

    /// Hard links were refused (ENOTSUP) and an imported group was served as separate
    /// files with `st_nlink` 1. Now a link made through a mount is one inode with several
    /// names, committed as a link group, and a later mount serves it as one inode again
    /// (all names, even one in a directory not yet opened, counted in `st_nlink`).
    #[test]
    fn hard_links_are_one_inode_through_commits_and_later_mounts() {
        let temp = tempfile::tempdir().unwrap();
        let fs = Arc::new(mounted(temp.path()));
        let adapter = FuseAdapter(fs.clone());
        mkdir(&fs, "a");
        mkdir(&fs, "b");
        let a = fs.child(&mut fs.lock(), ROOT, b"a").unwrap().unwrap();
        let b = fs.child(&mut fs.lock(), ROOT, b"b").unwrap().unwrap();
        let kind = NodeKind::Directory(Directory {
            tree: None,
            children: Some(BTreeMap::new()),
            stored: None,
        });
        let deep = fs
            .insert(b, OsStr::new("deep"), (0o755, 0), kind, (0, 0))
            .unwrap()
            .0;
        let kind = NodeKind::File(file_node(BaseContent::inline(b"shared bytes".to_vec())));
        let file = fs
            .insert(a, OsStr::new("x"), (0o644, 0), kind, (0, 0))
            .unwrap()
            .0;
        let (linked, attr) = fs.link(file, deep, OsStr::new("y")).unwrap();
        assert_eq!((linked, attr.nlink), (file, 2));
        assert_eq!(fs.link(a, b, OsStr::new("dir")).unwrap_err(), Errno::EPERM);
        assert_eq!(
            fs.link(file, a, OsStr::new("x")).unwrap_err(),
            Errno::EEXIST
        );
        commit(&fs, "linked").unwrap().unwrap();

        // A second mount of the committed tree: only `a` is opened, yet x knows of y.
        let again = Arc::new(mount_head(&fs, temp.path()));
        let lookup = |fs: &MountedFs, path: &[&str]| {
            let mut inodes = fs.lock();
            let mut ino = ROOT;
            for name in path {
                ino = fs
                    .child(&mut inodes, ino, name.as_bytes())
                    .unwrap()
                    .unwrap();
            }
            let attr = fs.attr(ino, inodes.nodes.get(&ino).unwrap());
            (ino, attr.nlink)
        };
        let (x, x_links) = lookup(&again, &["a", "x"]);
        assert_eq!(
            x_links, 2,
            "the name in b/deep is counted before b is opened"
        );
        let (y, y_links) = lookup(&again, &["b", "deep", "y"]);
        assert_eq!((y, y_links), (x, 2), "one inode");
        let again_adapter = FuseAdapter(again.clone());
        again
            .change_content(x, |staged, state, size| {
                staged
                    .file
                    .write_all_at(b"SHARED", 0)
                    .map_err(Errno::from)?;
                state.dirty.insert(0, 6);
                *size = (*size).max(6);
                Ok(())
            })
            .unwrap();
        assert_eq!(again_adapter.do_read(y, 0, 100).unwrap(), b"SHARED bytes");
        commit(&again, "changed through one name").unwrap().unwrap();
        drop(adapter);

        // Both names hold the new bytes, in one group; after an unlink the other name is
        // a plain file again.
        let read_entry = |fs: &MountedFs, path: &[&str]| {
            let head = fs
                .vault()
                .refs()
                .get_ref(&fs.volume().id, "main")
                .unwrap()
                .unwrap();
            let mut tree =
                Cid::from_bytes(fs.vault().read_commit(fs.volume(), &head).unwrap().root);
            let (last, directories) = path.split_last().unwrap();
            for name in directories {
                let entry = fs
                    .vault()
                    .read_tree(fs.volume(), &tree)
                    .unwrap()
                    .into_iter()
                    .find(|entry| entry.name == name.as_bytes())
                    .unwrap();
                let EntryContent::Directory { tree: below } = entry.content else {
                    panic!("{entry:?}");
                };
                tree = Cid::from_bytes(below);
            }
            fs.vault()
                .read_tree(fs.volume(), &tree)
                .unwrap()
                .into_iter()
                .find(|entry| entry.name == last.as_bytes())
                .unwrap()
        };
        let (first, second) = (
            read_entry(&again, &["a", "x"]),
            read_entry(&again, &["b", "deep", "y"]),
        );
        assert_eq!(
            first.content,
            EntryContent::InlineData(b"SHARED bytes".to_vec())
        );
        assert_eq!(first.content, second.content);
        assert!(first.meta.link_group.is_some());
        assert_eq!(first.meta.link_group, second.meta.link_group);
        again_adapter.remove(a, OsStr::new("x"), false).unwrap();
        assert_eq!(lookup(&again, &["b", "deep", "y"]).1, 1);
        commit(&again, "one name left").unwrap().unwrap();
        assert_eq!(
            read_entry(&again, &["b", "deep", "y"]).meta.link_group,
            None
        );
    }

    /// Before `forget`, every inode a mount ever made or loaded stayed in its table for as
    /// long as it ran (a long mount that creates and deletes millions of files grew without
    /// bound). Now an unlinked, closed, forgotten file leaves at once, and an unchanged
    /// directory's entries leave once none is referenced, to be reloaded from its tree.
    #[test]
    fn forgotten_inodes_leave_the_table() {
        let temp = tempfile::tempdir().unwrap();
        let fs = Arc::new(mounted(temp.path()));
        let adapter = FuseAdapter(fs.clone());
        mkdir(&fs, "d");
        let directory = fs.child(&mut fs.lock(), ROOT, b"d").unwrap().unwrap();
        for index in 0..200 {
            let kind = NodeKind::File(file_node(BaseContent::inline(
                format!("content {index}").into_bytes(),
            )));
            fs.insert(
                directory,
                OsStr::new(&format!("f{index}")),
                (0o644, 0),
                kind,
                (0, 0),
            )
            .unwrap();
        }
        commit(&fs, "two hundred files").unwrap().unwrap();
        assert_eq!(fs.inode_count(), 202);

        // The kernel looks every file up, reads some, and forgets them all.
        let mut looked_up = Vec::new();
        for index in 0..200 {
            let ino = fs
                .child(&mut fs.lock(), directory, format!("f{index}").as_bytes())
                .unwrap()
                .unwrap();
            fs.remember(ino);
            looked_up.push(ino);
        }
        assert_eq!(adapter.do_read(looked_up[7], 0, 100).unwrap(), b"content 7");
        for ino in &looked_up[..199] {
            fs.forget(*ino, 1);
        }
        assert_eq!(fs.inode_count(), 202, "one entry still referenced");
        fs.forget(looked_up[199], 1);
        assert_eq!(fs.inode_count(), 2, "the root and the directory remain");
        // Loaded again from the tree when next needed.
        let again = fs
            .child(&mut fs.lock(), directory, b"f123")
            .unwrap()
            .unwrap();
        assert_eq!(adapter.do_read(again, 0, 100).unwrap(), b"content 123");

        // Create and delete, many times: the table does not grow.
        let before = fs.inode_count();
        for round in 0..1_000 {
            let name = format!("scratch-{round}");
            let kind = NodeKind::File(file_node(BaseContent::default()));
            let (ino, _) = fs
                .insert(ROOT, OsStr::new(&name), (0o644, 0), kind, (0, 0))
                .unwrap();
            fs.remember(ino);
            adapter.remove(ROOT, OsStr::new(&name), false).unwrap();
            fs.forget(ino, 1);
        }
        assert_eq!(fs.inode_count(), before);
    }

    /// Before, loading a directory made an inode for every entry (with its manifest read
    /// and its bytes held): a read-only mount listing 300,000 entries peaked at 406 MB,
    /// ~1.35 KB per entry. Now a listing numbers the entries and an inode is made from its
    /// stored entry at first lookup; a commit stores the untouched entries as they were.
    #[test]
    fn a_listed_directory_makes_inodes_only_for_entries_looked_up() {
        let temp = tempfile::tempdir().unwrap();
        let fs = Arc::new(mounted(temp.path()));
        let adapter = FuseAdapter(fs.clone());
        mkdir(&fs, "d");
        let directory = fs.child(&mut fs.lock(), ROOT, b"d").unwrap().unwrap();
        for index in 0..2_000 {
            let kind = NodeKind::File(file_node(BaseContent::inline(
                format!("content {index}").into_bytes(),
            )));
            fs.insert(
                directory,
                OsStr::new(&format!("f{index:04}")),
                (0o644, 0),
                kind,
                (0, 0),
            )
            .unwrap();
        }
        mkdir(&fs, "e");
        commit(&fs, "two thousand files").unwrap().unwrap();
        let again = Arc::new(mount_head(&fs, temp.path()));
        let adapter_again = FuseAdapter(again.clone());
        let directory = again.child(&mut again.lock(), ROOT, b"d").unwrap().unwrap();
        again.ensure_loaded(&mut again.lock(), directory).unwrap();
        // The root and `d`: no inode for `e` nor for any of the 2,000 listed files.
        assert_eq!(again.inode_count(), 2);
        // A listing names each entry with the inode a lookup then gives it.
        let listed: BTreeMap<Vec<u8>, u64> = children(&again.lock(), directory).unwrap().clone();
        assert_eq!(listed.len(), 2_000);
        let ino = again
            .child(&mut again.lock(), directory, b"f1234")
            .unwrap()
            .unwrap();
        assert_eq!(ino, listed[b"f1234".as_slice()]);
        assert_eq!(adapter_again.do_read(ino, 0, 100).unwrap(), b"content 1234");
        assert_eq!(again.inode_count(), 3);
        // Change one entry and move another out: the commit keeps all the others as
        // they were.
        adapter_again
            .do_rename(
                directory,
                OsStr::new("f0007"),
                ROOT,
                OsStr::new("moved"),
                RenameFlags::empty(),
            )
            .unwrap();
        adapter_again
            .remove(directory, OsStr::new("f0008"), false)
            .unwrap();
        commit(&again, "one moved, one removed").unwrap().unwrap();
        assert!(again.inode_count() < 10, "{}", again.inode_count());
        let out = temp.path().join("out");
        fs.vault()
            .export(
                "v",
                &out,
                &crate::vault::export::SnapshotSelector::Branch("main".into()),
                &crate::vault::ExportOptions::default(),
                &no_passphrase,
                &crate::progress::Progress::new("test", false),
            )
            .unwrap();
        assert_eq!(std::fs::read_dir(out.join("d")).unwrap().count(), 1_998);
        assert_eq!(std::fs::read(out.join("d/f1999")).unwrap(), b"content 1999");
        assert_eq!(std::fs::read(out.join("moved")).unwrap(), b"content 7");
        assert!(!out.join("d/f0008").exists());
        assert!(out.join("e").is_dir());
        drop(adapter);
    }

    #[test]
    fn failures_keep_their_errno() {
        let io = |code| NodeError::Io {
            action: "writing",
            path: "staging".into(),
            source: std::io::Error::from_raw_os_error(code),
        };
        assert_eq!(errno_of(&io(libc::ENOSPC)), Errno::ENOSPC);
        assert_eq!(errno_of(&io(libc::EMFILE)), Errno::EMFILE);
        assert_eq!(errno_of(&io(libc::EDQUOT)), Errno::EDQUOT);
        let kind_only = NodeError::Io {
            action: "writing",
            path: "staging".into(),
            source: std::io::ErrorKind::StorageFull.into(),
        };
        assert_eq!(errno_of(&kind_only), Errno::ENOSPC);
        let full = NodeError::Kv(forge_store::KvError::NoSpace { path: "db".into() });
        assert_eq!(errno_of(&full), Errno::ENOSPC);
        assert_eq!(
            errno_of(&NodeError::Integrity(
                crate::IntegrityFault::MissingObject {
                    cid: Cid::from_bytes([0; 32])
                }
            )),
            Errno::EIO
        );
    }

    #[test]
    fn a_change_made_while_a_commit_builds_its_root_stays_uncommitted() {
        let temp = tempfile::tempdir().unwrap();
        let fs = mounted(temp.path());
        mkdir(&fs, "before");
        // The mkdir lands after the commit captured its tree, as a FUSE request running
        // beside `forge snapshot create` does.
        let outcome = commit_with(&fs, "first", &mut || mkdir(&fs, "during")).unwrap();
        assert!(outcome.is_some());
        assert_eq!(committed_names(&fs), BTreeSet::from(["before".to_owned()]));
        assert!(
            fs.has_changes(),
            "the mkdir made during the commit was marked committed"
        );
        commit(&fs, "second")
            .unwrap()
            .expect("the mkdir is committed next");
        assert_eq!(
            committed_names(&fs),
            BTreeSet::from(["before".to_owned(), "during".to_owned()])
        );
        assert!(!fs.has_changes());
        assert!(commit(&fs, "third").unwrap().is_none(), "nothing left");
    }

    /// Power cuts during a mount's commit and fsync (MemKv's crash model): after
    /// reopening, the store is consistent, and the branch holds at least every commit
    /// acknowledged before the cut.
    #[test]
    fn a_power_cut_during_a_mount_commit_loses_nothing_acknowledged() {
        use forge_store::kv::MemKv;
        let temp = tempfile::tempdir().unwrap();
        let mut died = 0;
        for seed in 0..30u64 {
            let kv = Arc::new(MemKv::new());
            let vault = Arc::new(crate::test_support::vault_on(temp.path(), kv.clone(), seed));
            let fs = mounted_on(vault.clone(), &temp.path().join(format!("m{seed}")));
            mkdir(&fs, "acknowledged");
            commit(&fs, "first").unwrap().unwrap();
            mkdir(&fs, "fsynced");
            kv.die_after_writes(usize::try_from(seed / 2 % 15).unwrap());
            let fsynced = super::super::persist_working(&fs).is_ok();
            mkdir(&fs, "late");
            let committed = fsynced && commit(&fs, "second").is_ok();
            if !committed {
                assert!(kv.died(), "seed {seed}: failed without dying");
                died += 1;
            }
            drop(fs);
            drop(vault);
            kv.crash(usize::try_from(seed % 3).unwrap());
            let vault = crate::test_support::vault_on(temp.path(), kv.clone(), seed + 100);
            let report = vault.fsck(Some(&no_passphrase)).unwrap();
            assert!(
                report.problems.is_empty(),
                "seed {seed}: {:?}",
                report.problems
            );
            let volume = vault.open_volume("v", &no_passphrase).unwrap();
            let names = head_names(&vault, &volume);
            assert!(names.contains("acknowledged"), "seed {seed}: {names:?}");
            // What fsync acknowledged comes back at the next mount: the recorded working
            // tree reads whole.
            match super::super::working_state(&vault, &volume, "main").unwrap() {
                Some(state) => {
                    let root = Cid::from_bytes(state.root);
                    vault
                        .walk_tree(&volume, root, &mut BTreeSet::new(), &mut |_, chunk| {
                            vault.read_chunk_plaintext(chunk).map(|_| ())
                        })
                        .unwrap_or_else(|error| panic!("seed {seed}: working state: {error}"));
                    let names = vault
                        .read_object(&volume, &root)
                        .unwrap()
                        .into_tree()
                        .unwrap();
                    assert!(
                        names.entries.iter().any(|entry| entry.name == b"fsynced"),
                        "seed {seed}"
                    );
                }
                None => assert!(
                    !fsynced || committed,
                    "seed {seed}: the fsynced state is gone"
                ),
            }
            if committed {
                assert!(
                    names.contains("late") && names.contains("fsynced"),
                    "seed {seed}"
                );
            }
        }
        assert!(
            died > 5 && died < 30,
            "{died} of 30 cuts fell inside the work (none or all: move the cut points)"
        );
    }

    /// An unmount whose commit fails (a full disk, here a dead engine) says what the next
    /// mount starts from, and the working state of the last fsync is really there.
    #[test]
    fn an_unmount_whose_commit_fails_keeps_the_working_state_and_says_so() {
        use forge_store::kv::MemKv;
        let temp = tempfile::tempdir().unwrap();
        let kv = Arc::new(MemKv::new());
        let vault = Arc::new(crate::test_support::vault_on(temp.path(), kv.clone(), 3));
        let fs = mounted_on(vault.clone(), &temp.path().join("m"));
        mkdir(&fs, "fsynced");
        super::super::persist_working(&fs).unwrap();
        mkdir(&fs, "late");
        kv.die_after_writes(0);
        let summary = super::super::unmount_commit(&fs, Path::new("/mnt/point")).unwrap_err();
        assert!(summary.contains("the commit failed"), "{summary}");
        assert!(summary.contains("mount branch main again"), "{summary}");
        assert!(summary.contains("Nothing is lost"), "{summary}");
        drop(fs);
        drop(vault);
        kv.crash(0);
        let vault = crate::test_support::vault_on(temp.path(), kv.clone(), 4);
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let state = super::super::working_state(&vault, &volume, "main")
            .unwrap()
            .expect("the working state is kept");
        let names: Vec<Vec<u8>> = vault
            .read_tree(&volume, &Cid::from_bytes(state.root))
            .unwrap()
            .into_iter()
            .map(|entry| entry.name)
            .collect();
        assert!(names.contains(&b"fsynced".to_vec()), "{names:?}");
    }

    #[test]
    fn concurrent_commits_never_move_the_branch_to_an_older_root() {
        let temp = tempfile::tempdir().unwrap();
        let fs = Arc::new(mounted(temp.path()));
        std::thread::scope(|scope| {
            let writer = {
                let fs = fs.clone();
                scope.spawn(move || {
                    for index in 0..300 {
                        mkdir(&fs, &format!("d{index:03}"));
                    }
                })
            };
            for _ in 0..2 {
                let fs = fs.clone();
                scope.spawn(move || {
                    for _ in 0..20 {
                        commit(&fs, "loop").unwrap();
                    }
                });
            }
            writer.join().unwrap();
        });
        commit(&fs, "last").unwrap();
        let names = committed_names(&fs);
        assert_eq!(names.len(), 300, "lost {} directories", 300 - names.len());
        // Every snapshot's parent is the one before it: the branch only moved forward.
        let vault = fs.vault();
        let volume = fs.volume();
        let mut snapshot = vault.refs().get_ref(&volume.id, "main").unwrap();
        let mut previous_count = usize::MAX;
        while let Some(cid) = snapshot {
            let commit = vault.read_commit(volume, &cid).unwrap();
            let root = Cid::from_bytes(commit.root);
            let entries = vault
                .read_object(volume, &root)
                .unwrap()
                .into_tree()
                .unwrap()
                .entries
                .len();
            assert!(
                entries <= previous_count,
                "a later snapshot has fewer entries"
            );
            previous_count = entries;
            snapshot = commit
                .parents
                .first()
                .map(|parent| Cid::from_bytes(*parent));
        }
    }
}
