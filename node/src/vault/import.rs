//! Import: a directory tree becomes a new snapshot.
//!
//! Directories are walked in name order and their entries processed in parallel (rayon).
//! Each file streams through the chunker; each chunk costs one keyed hash when it is a
//! duplicate, otherwise chunk key → zstd (when it pays) → seal → cid → shards. Writes go
//! out in unlogged batches of about [`BATCH_BYTES`]; at the end the shard, object and meta
//! columns are flushed, then the signed commit is written synced, then the branch moves by
//! compare-and-swap. Until that last step nothing of the import is visible, and whatever
//! was written is reused by the next import.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::ffi::OsStringExt as _;

use nix::fcntl::{AtFlags, OFlag, openat, readlinkat};
use nix::sys::stat::{Mode, SFlag, fstatat};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use forge_crypto::seal::{self, Compression};
use forge_crypto::{Cid, PlaintextHash, SignatureDomain};
use forge_store::chunker::{Chunker, ChunkerError};
use forge_store::chunkstore::{VerifiedChunk, stage_chunk};
use forge_store::erasure::ErasureCoder;
use forge_store::kv::{Column, Durability, WriteBatch};
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate, ref_update};
use forge_store::object::{
    ChunkRef, EntryContent, EntryMeta, FileManifest, INLINE_DATA_BYTES_MAX, Object, ObjectError,
    SignedCommit, SnapshotCommit, Tree, TreeEntry,
};
use forge_store::refindex;

use super::fence::WriteSession;
use super::posix::{self, OwnerNames};
use super::post_order::{self, PostOrderWalk, TreePath, Visit};
use super::records::{self, IndexHead, SnapshotListing, keys};
use super::{CHUNK_AAD, OpenVolume, PassphraseSource, Vault, validate_name};
use crate::error::{NodeError, Result};
use crate::progress::Progress;

/// Chunks of one large file cut and waiting to be sealed, at most (bounds its memory to
/// this many maximum-size chunks).
const LARGE_FILE_CHUNKS_IN_FLIGHT: usize = 32;

/// A large file's manifest as its chunks are sealed, in any order, and appended in order.
#[derive(Default)]
struct Assembly {
    manifest: FileManifest,
    /// The index of the next chunk to append.
    next: usize,
    /// Sealed chunks waiting for an earlier one: (length, cid, chunk key).
    done: BTreeMap<usize, (usize, Cid, [u8; 32])>,
    /// The first storage error (the import fails with it).
    error: Option<NodeError>,
}

/// The default deepest a volume's directory tree may be (the root is depth 0; see
/// [`VaultLimits::tree_depth_max`](super::VaultLimits)): an import or a mount's commit of a
/// deeper tree fails saying so, rather than storing what later walks could not handle.
/// Every walk is iterative (import and export as post-order jobs, the others with explicit
/// stacks), so this bounds what a tree costs to walk (a descriptor per level for export),
/// not a thread's stack.
pub const TREE_DEPTH_MAX: usize = 16_384;

/// The shortest hole recorded as a hole extent, by import (a gap between a file's data
/// regions) and by a mount (a run of never-written bytes); shorter ones are chunked with
/// their neighbours.
pub const HOLE_BYTES_MIN: u64 = 64 << 10;

/// Unlogged writes are sent to the engine in batches of about this many bytes.
pub const BATCH_BYTES: usize = 8 << 20;

/// Options of an import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The snapshot message.
    pub message: String,
    /// The branch to move.
    pub branch: String,
    /// DNA fingerprint entries.
    pub dna: BTreeMap<String, String>,
    /// Keep access times (off by default: reading a tree changes them, so every import
    /// would store every directory anew).
    pub atime: bool,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The new snapshot's id.
    pub snapshot: Cid,
    /// Regular files stored.
    pub files: u64,
    /// File bytes read.
    pub logical_bytes: u64,
    /// Chunks that were new.
    pub new_chunks: u64,
    /// Chunks found already stored (or earlier in this import).
    pub reused_chunks: u64,
    /// Bytes of shards and objects written.
    pub written_bytes: u64,
    /// Entries not stored, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
    /// Entries stored without something the source has (extended attributes that could
    /// not be read or are past the bound), with what and why.
    pub incomplete: Vec<(PathBuf, String)>,
    /// Wall time.
    pub elapsed_seconds: f64,
}

/// A file's content as import read it.
enum FileContent {
    /// Small enough to live in its directory's tree.
    Inline(Vec<u8>),
    /// Chunked and stored.
    Chunked(FileManifest),
}

/// Stages chunks and objects of one new snapshot (an import, or a mount's working tree).
pub(crate) struct Importer<'a> {
    vault: &'a Vault,
    volume: &'a OpenVolume,
    /// Claims every cid staged or reused, so a concurrent gc keeps it.
    session: &'a WriteSession,
    chunker: Chunker,
    coder: ErasureCoder,
    pending: Mutex<WriteBatch>,
    seen: Mutex<BTreeMap<PlaintextHash, Cid>>,
    counters: Mutex<Counters>,
    skipped: Mutex<Vec<(PathBuf, String)>>,
    incomplete: Mutex<Vec<(PathBuf, String)>>,
    /// Whether entries keep their access time.
    keep_atime: bool,
    owner_names: OwnerNames,
    /// The content of each hard-link group met so far: its other names are not read again.
    linked: Mutex<BTreeMap<u64, (u64, EntryContent)>>,
    /// Every chunk and object cid the snapshot reaches, for its reference index.
    reached: Mutex<Vec<Cid>>,
    /// What the snapshot names (sorted; index nodes included), once its index is staged:
    /// checked before publishing if gc swept meanwhile.
    named: Mutex<Vec<Cid>>,
    progress: &'a Progress,
}

#[derive(Debug, Default)]
struct Counters {
    files: u64,
    logical_bytes: u64,
    new_chunks: u64,
    reused_chunks: u64,
    written_bytes: u64,
}

impl Vault {
    /// Imports `source` as a new snapshot on `options.branch` of volume `name`.
    ///
    /// # Errors
    /// Unknown volume, unreadable source directory, engine errors (disk full: nothing is
    /// visible), [`NodeError::BranchMoved`] when another import moved the branch first.
    pub fn import(
        &self,
        name: &str,
        source: &Path,
        options: &ImportOptions,
        passphrase: PassphraseSource<'_>,
        progress: &Progress,
    ) -> Result<ImportReport> {
        validate_name("branch name", &options.branch)?;
        let volume = self.open_volume(name, passphrase)?;
        // An import writes the volume as a read-write mount does: frozen, sealed and the
        // contract (its workload: the DNA's, or a person's) are checked first.
        let workload = super::trust::snapshot_workload(&options.dna).map_err(|reason| {
            NodeError::InvalidArgument {
                what: "--dna",
                value: format!("{}=...", super::trust::DNA_WORKLOAD),
                reason,
            }
        })?;
        self.check_mount(
            &volume.record,
            super::trust::MountIntent {
                read_only: false,
                workload: &workload,
            },
        )?;
        let metadata = fs::metadata(source).map_err(NodeError::io("reading", source))?;
        if !metadata.is_dir() {
            return Err(NodeError::InvalidArgument {
                what: "source",
                value: source.display().to_string(),
                reason: "not a directory".into(),
            });
        }
        // The session (and its pin of a volume group) first, then the head it builds on.
        let session = self.open_write_session("import", volume.id)?;
        let head = self.branch_head(&volume.id, &options.branch)?;
        let mut importer = Importer::new(self, &volume, &session, progress)?;
        importer.keep_atime = options.atime;
        let source_directory = openat(
            nix::fcntl::AT_FDCWD,
            source,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|errno| NodeError::io("opening", source)(io::Error::from(errno)))?;
        let root = self
            .in_pool(|| importer.import_tree(source_directory, source))?
            .ok_or_else(|| NodeError::io("reading", source)(io::Error::other("unreadable")))?;
        tracing::debug!(elapsed = ?progress.elapsed(), "import: tree walked and chunks staged");
        let index_root = importer.stage_reference_index()?;
        importer.write_pending()?;
        tracing::debug!(elapsed = ?progress.elapsed(), "import: reference index staged");
        let counters = std::mem::take(&mut *importer.lock_counters());
        let snapshot = importer.write_snapshot(&NewSnapshot {
            root,
            index_root,
            parent: head,
            message: options.message.clone(),
            dna: options.dna.clone(),
            logical_bytes: counters.logical_bytes,
            file_count: counters.files,
        })?;
        // The acknowledgement: the branch moves only if nobody moved it since we started
        // (and nothing the snapshot names was collected meanwhile).
        importer.publish(&[ref_update(
            &volume.id,
            &options.branch,
            head,
            Some(snapshot),
        )])?;

        Ok(ImportReport {
            snapshot,
            files: counters.files,
            logical_bytes: counters.logical_bytes,
            new_chunks: counters.new_chunks,
            reused_chunks: counters.reused_chunks,
            written_bytes: counters.written_bytes,
            skipped: std::mem::take(
                &mut *importer
                    .skipped
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
            incomplete: std::mem::take(
                &mut *importer
                    .incomplete
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
            elapsed_seconds: progress.elapsed().as_secs_f64(),
        })
    }
}

/// What [`Vault::commit_snapshot`] publishes.
#[derive(Debug)]
pub(crate) struct NewSnapshot {
    /// Root tree (already stored, with everything it reaches).
    pub root: Cid,
    /// Root of the reference index of every cid the snapshot reaches (already stored).
    pub index_root: Cid,
    /// The snapshot it was built on (its parent).
    pub parent: Option<Cid>,
    pub message: String,
    pub dna: BTreeMap<String, String>,
    pub logical_bytes: u64,
    pub file_count: u64,
}

impl Importer<'_> {
    /// Writes a snapshot whose trees, chunks and index nodes were staged (unlogged):
    /// flushes them, then writes the signed commit, listing and index head synced. The
    /// caller then moves a branch to it with [`Importer::publish`]; until then nothing is
    /// visible.
    ///
    /// # Errors
    /// Engine errors.
    pub(crate) fn write_snapshot(&self, new: &NewSnapshot) -> Result<Cid> {
        let (vault, volume) = (self.vault, self.volume);
        // Chunks and objects must be durable before the snapshot that names them.
        if !forge_store::injected_bug!("ack-before-fsync") {
            vault
                .kv()
                .flush(&[Column::Shards, Column::Objects, Column::Meta])?;
        }
        tracing::debug!("snapshot: staged data flushed");
        let commit = SnapshotCommit {
            volume: *volume.id.as_bytes(),
            root: *new.root.as_bytes(),
            parents: new.parent.iter().map(|cid| *cid.as_bytes()).collect(),
            author: *vault.identity().node_id().as_bytes(),
            time_ns: vault.now_ns(),
            message: new.message.clone(),
            dna: new.dna.clone(),
            logical_bytes: new.logical_bytes,
            file_count: new.file_count,
        };
        let encoded = commit.encode();
        let signature = vault.sign(SignatureDomain::Snapshot, &encoded)?;
        let (snapshot, sealed) = Object::Commit(SignedCommit {
            commit: encoded,
            signature: signature.as_bytes().to_vec(),
        })
        .seal(&volume.volume_key);
        self.session.claim(snapshot);
        self.lock_named().push(snapshot);
        let mut batch = WriteBatch::new();
        batch.put(Column::Objects, snapshot.as_bytes().to_vec(), sealed);
        vault.kv().write(batch, Durability::Synced)?;
        let listing = SnapshotListing {
            time_ns: commit.time_ns,
            logical_bytes: commit.logical_bytes,
            file_count: commit.file_count,
        };

        let head_message = IndexHead::signed_message(
            volume.id.as_bytes(),
            snapshot.as_bytes(),
            new.index_root.as_bytes(),
        );
        let index_head = IndexHead {
            root: *new.index_root.as_bytes(),
            author: *vault.identity().node_id().as_bytes(),
            signature: vault
                .sign(SignatureDomain::Snapshot, &head_message)?
                .as_bytes()
                .to_vec(),
        };
        // The listing and the signed index head go through the metadata store (replicated
        // in a volume group); the commit object they name is durable already.
        let key = [volume.id.as_bytes().as_slice(), snapshot.as_bytes()].concat();
        vault.refs().apply(&[
            RecordUpdate::new(
                RecordSpace::SNAPSHOTS,
                key.clone(),
                Expected::Any,
                Change::Put(records::encode(&listing)),
            ),
            RecordUpdate::new(
                RecordSpace::INDEX_HEADS,
                key.clone(),
                Expected::Any,
                Change::Put(records::encode(&index_head)),
            ),
            // Its parents in plaintext: a vault holding the volume without its key serves
            // the history onward from them.
            RecordUpdate::new(
                super::peers::LINEAGE,
                key,
                Expected::Any,
                Change::Put(records::encode(&commit.parents)),
            ),
        ])?;
        Ok(snapshot)
    }

    /// Applies `updates` (the ref move that publishes the snapshot) through the gc fence:
    /// if gc swept while this snapshot was built, everything it names is checked first.
    ///
    /// # Errors
    /// [`NodeError::BranchMoved`] when the ref moved; [`NodeError::MissingWhileWriting`];
    /// engine errors.
    pub(crate) fn publish(&self, updates: &[RecordUpdate]) -> Result<()> {
        let named = self.lock_named();
        let updates = self.vault.publish_to_group(updates, &named, &named)?;
        self.vault.write_decided(|| {
            self.session
                .publish(&updates, &named, &|cid| self.vault.stores(cid))
        })
    }

    /// What the snapshot names (after it was published).
    pub(crate) fn take_named(&self) -> Vec<Cid> {
        std::mem::take(&mut *self.lock_named())
    }

    fn lock_named(&self) -> std::sync::MutexGuard<'_, Vec<Cid>> {
        self.named
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<'a> Importer<'a> {
    pub(crate) fn new(
        vault: &'a Vault,
        volume: &'a OpenVolume,
        session: &'a WriteSession,
        progress: &'a Progress,
    ) -> Result<Self> {
        Ok(Importer {
            vault,
            volume,
            session,
            chunker: volume.chunker()?,
            coder: volume.coder()?,
            pending: Mutex::new(WriteBatch::new()),
            seen: Mutex::new(BTreeMap::new()),
            counters: Mutex::new(Counters::default()),
            skipped: Mutex::new(Vec::new()),
            incomplete: Mutex::new(Vec::new()),
            keep_atime: false,
            owner_names: OwnerNames::default(),
            linked: Mutex::new(BTreeMap::new()),
            reached: Mutex::new(Vec::new()),
            named: Mutex::new(Vec::new()),
            progress,
        })
    }

    /// The vault it stages into.
    pub(crate) fn vault(&self) -> &Vault {
        self.vault
    }

    /// The volume's chunker.
    pub(crate) fn chunker(&self) -> &Chunker {
        &self.chunker
    }

    /// Stages the reference index of every cid reached so far (plaintext nodes beside the
    /// objects) and returns its root.
    pub(crate) fn stage_reference_index(&self) -> Result<Cid> {
        let reached = std::mem::take(
            &mut *self
                .reached
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut index_nodes = Vec::new();
        let index_root = refindex::build(&reached, |id, bytes| index_nodes.push((id, bytes)));
        let mut named = reached;
        for (id, bytes) in index_nodes {
            named.push(id);
            self.stage_object(id, bytes)?;
        }
        named.sort_unstable();
        named.dedup();
        self.lock_named().extend(named);
        Ok(index_root)
    }

    /// Marks `cid` as reached by the snapshot being built (for its reference index).
    pub(crate) fn reach(&self, cid: Cid) {
        self.reached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(cid);
    }
}

/// The error for a directory nested deeper than a volume holds.
pub(crate) fn too_deep(path: &Path, depth_max: usize) -> NodeError {
    NodeError::TooLarge {
        what: format!("the directory tree at {}", path.display()),
        detail: format!("it is nested deeper than {depth_max} levels, the most a volume holds"),
    }
}

/// A directory to import.
pub(crate) struct ImportDirectory {
    at: DirectoryAt,
    /// Shown in messages.
    path: TreePath,
    /// Its entry in its parent's tree, all but the content (the root's is a placeholder).
    entry: TreeEntry,
}

/// Where a directory to import is.
enum DirectoryAt {
    /// Open already (the root).
    Open(OwnedFd),
    /// `name` in the directory open as the descriptor: opened when its job runs, so
    /// directories waiting for a thread hold no descriptor.
    In(Arc<OwnedFd>, OsString),
}

/// A directory being imported: its descriptor and entry names, sorted.
pub(crate) struct ImportOpen {
    /// Closed once every entry was visited: a chain of directories holds one descriptor
    /// per level being listed, not one per level whose tree waits to be stored.
    directory: Mutex<Option<Arc<OwnedFd>>>,
    path: TreePath,
    names: Vec<OsString>,
    entry: TreeEntry,
}

/// What one entry of a directory became.
enum EntryImport {
    Stored(TreeEntry),
    Skipped,
    /// A directory: its entry, whose content is filled when its tree is stored.
    Directory(TreeEntry),
}

impl Importer<'_> {
    /// Stores the tree of the directory open as `directory` (shown as `path`) and of
    /// everything below it; `None` when it cannot be listed (skipped, and reported).
    /// Entries are opened relative to their directory's descriptor (openat), so depth
    /// never meets the path length limit, and the walk is iterative (post_order.rs), so
    /// it never meets a thread's stack.
    fn import_tree(&self, directory: OwnedFd, path: &Path) -> Result<Option<Cid>> {
        let root = ImportDirectory {
            at: DirectoryAt::Open(directory),
            path: TreePath::root(path),
            entry: TreeEntry {
                name: Vec::new(),
                mode: 0,
                mtime_ns: 0,
                size: 0,
                content: EntryContent::Directory { tree: [0; 32] },
                meta: EntryMeta::default(),
            },
        };
        Ok(
            post_order::walk(self, root)?.and_then(|entry| match entry.content {
                EntryContent::Directory { tree } => Some(Cid::from_bytes(tree)),
                _ => None,
            }),
        )
    }
}

impl PostOrderWalk for Importer<'_> {
    type Directory = ImportDirectory;
    type Open = ImportOpen;
    type Item = TreeEntry;

    fn open(
        &self,
        directory: ImportDirectory,
        depth: usize,
    ) -> Result<Option<(ImportOpen, usize)>> {
        let ImportDirectory { at, path, entry } = directory;
        let depth_max = self.vault.limits().tree_depth_max;
        if depth > depth_max {
            return Err(too_deep(&path.to_path(), depth_max));
        }
        let opened = match at {
            DirectoryAt::Open(directory) => Ok(directory),
            DirectoryAt::In(parent, name) => openat(
                &*parent,
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            ),
        };
        let directory = match opened {
            Ok(directory) => directory,
            Err(errno) => {
                self.skip(&path.to_path(), &io::Error::from(errno));
                return Ok(None);
            }
        };
        let listing = directory
            .try_clone()
            .map_err(|error| nix::errno::Errno::from_raw(error.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(nix::dir::Dir::from_fd);
        let mut listing = match listing {
            Ok(listing) => listing,
            Err(errno) => {
                self.skip(&path.to_path(), &io::Error::from(errno));
                return Ok(None);
            }
        };
        let mut names: Vec<OsString> = Vec::new();
        for listed in listing.iter() {
            match listed {
                Ok(listed) => {
                    let name = listed.file_name().to_bytes();
                    if name != b"." && name != b".." {
                        names.push(OsString::from_vec(name.to_vec()));
                    }
                }
                Err(errno) => self.skip(&path.to_path(), &io::Error::from(errno)),
            }
        }
        drop(listing);
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let count = names.len();
        let open = ImportOpen {
            directory: Mutex::new(Some(Arc::new(directory))),
            path,
            names,
            entry,
        };
        Ok(Some((open, count)))
    }

    fn visit(&self, open: &ImportOpen, index: usize) -> Result<Visit<ImportDirectory, TreeEntry>> {
        let name = &open.names[index];
        let path = open.path.join(name);
        let directory = open
            .directory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                NodeError::io("reading", &open.path.to_path())(io::Error::other("closed"))
            })?;
        Ok(match self.import_entry(&directory, &path, name)? {
            EntryImport::Stored(entry) => Visit::Done(entry),
            EntryImport::Skipped => Visit::Skipped,
            EntryImport::Directory(entry) => Visit::Descend(ImportDirectory {
                at: DirectoryAt::In(directory, name.clone()),
                path: open.path.child(name),
                entry,
            }),
        })
    }

    fn visited(&self, open: &ImportOpen) {
        open.directory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }

    fn finish(
        &self,
        open: &ImportOpen,
        items: Vec<Option<TreeEntry>>,
    ) -> Result<Option<TreeEntry>> {
        let tree = self.store_tree(Tree {
            entries: items.into_iter().flatten().collect(),
        })?;
        let mut entry = open.entry.clone();
        entry.content = EntryContent::Directory {
            tree: *tree.as_bytes(),
        };
        Ok(Some(entry))
    }
}

impl Importer<'_> {
    /// One entry of a directory: stored, skipped, or a directory to walk (its entry but
    /// the content).
    fn import_entry(&self, parent: &OwnedFd, path: &Path, name: &OsString) -> Result<EntryImport> {
        let metadata = match fstatat(parent, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(metadata) => metadata,
            Err(errno) => {
                self.skip(path, &io::Error::from(errno));
                return Ok(EntryImport::Skipped);
            }
        };
        let kind = SFlag::from_bits_truncate(metadata.st_mode & SFlag::S_IFMT.bits());
        let mode = metadata.st_mode & 0o7777;
        let mtime_ns = nanoseconds(metadata.st_mtime, metadata.st_mtime_nsec);
        // Names of one inode (hard links) share a group; a directory's links are its own.
        let link_group = (kind != SFlag::S_IFDIR && metadata.st_nlink > 1)
            .then(|| posix::link_group(metadata.st_dev, metadata.st_ino));
        let open = |flags: OFlag| {
            openat(
                parent,
                name.as_os_str(),
                flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
        };
        let (size, content) = if kind == SFlag::S_IFDIR {
            // Its tree is stored when everything below it is (post_order.rs).
            (0, EntryContent::Directory { tree: [0; 32] })
        } else if kind == SFlag::S_IFLNK {
            match readlinkat(parent, name.as_os_str()) {
                Ok(target) => {
                    let target = target.as_bytes().to_vec();
                    (target.len() as u64, EntryContent::Symlink { target })
                }
                Err(errno) => {
                    self.skip(path, &io::Error::from(errno));
                    return Ok(EntryImport::Skipped);
                }
            }
        } else if let Some((size, content)) =
            link_group.and_then(|group| self.linked_content(group))
        {
            // Another name of an inode already read: the same content, not read again.
            (size, content)
        } else if kind == SFlag::S_IFREG {
            let file = match open(OFlag::O_RDONLY) {
                Ok(file) => File::from(file),
                Err(errno) => {
                    self.skip(path, &io::Error::from(errno));
                    return Ok(EntryImport::Skipped);
                }
            };
            let size_hint = u64::try_from(metadata.st_size).unwrap_or(0);
            match self.import_file(file, size_hint)? {
                Ok(content) => {
                    let size = match &content {
                        FileContent::Inline(data) => data.len() as u64,
                        FileContent::Chunked(manifest) => manifest.size,
                    };
                    self.progress.file_done(size);
                    let mut counters = self.lock_counters();
                    counters.files += 1;
                    counters.logical_bytes += size;
                    drop(counters);
                    let totals = self.vault.counters();
                    super::OperationCounters::count_file(
                        &totals.import_files,
                        &totals.import_bytes,
                        size,
                    );
                    let content = match content {
                        FileContent::Inline(data) => EntryContent::InlineData(data),
                        FileContent::Chunked(manifest) => self.file_content(manifest)?,
                    };
                    if let Some(group) = link_group {
                        self.lock_linked().insert(group, (size, content.clone()));
                    }
                    (size, content)
                }
                Err(error) => {
                    self.skip(path, &error);
                    return Ok(EntryImport::Skipped);
                }
            }
        } else if kind == SFlag::S_IFIFO {
            (0, EntryContent::Fifo)
        } else if kind == SFlag::S_IFSOCK {
            (0, EntryContent::Socket)
        } else if kind == SFlag::S_IFCHR || kind == SFlag::S_IFBLK {
            let (major, minor) = (
                nix::sys::stat::major(metadata.st_rdev),
                nix::sys::stat::minor(metadata.st_rdev),
            );
            let (Ok(major), Ok(minor)) = (u32::try_from(major), u32::try_from(minor)) else {
                self.skip_reason(
                    path,
                    format!("device {major}:{minor}: numbers past 32 bits"),
                );
                return Ok(EntryImport::Skipped);
            };
            if kind == SFlag::S_IFCHR {
                (0, EntryContent::CharDevice { major, minor })
            } else {
                (0, EntryContent::BlockDevice { major, minor })
            }
        } else {
            self.skip_reason(path, format!("unknown file type {:o}", kind.bits()));
            return Ok(EntryImport::Skipped);
        };
        let xattrs = match posix::read_xattrs(&posix::entry_path(parent, name)) {
            Ok(xattrs) => xattrs,
            Err(error) => {
                self.incomplete(path, format!("extended attributes ({error})"));
                Vec::new()
            }
        };
        let (uid, gid) = (metadata.st_uid, metadata.st_gid);
        let meta = EntryMeta {
            uid: Some(uid),
            gid: Some(gid),
            user: self.owner_names.user(uid),
            group: self.owner_names.group(gid),
            atime_ns: self
                .keep_atime
                .then(|| nanoseconds(metadata.st_atime, metadata.st_atime_nsec)),
            // Not the source's ctime: a copy of a tree (cp -a, a restore, rsync) has new
            // ctimes everywhere, and keeping them made every tree of the copy new (its
            // second import stored 11x more). A mount reports ctime from mtime and keeps
            // the ctimes of its own changes.
            ctime_ns: None,
            xattrs,
            link_group,
        };
        let entry = TreeEntry {
            name: name.as_bytes().to_vec(),
            mode,
            mtime_ns,
            size,
            content,
            meta,
        };
        Ok(if kind == SFlag::S_IFDIR {
            EntryImport::Directory(entry)
        } else {
            EntryImport::Stored(entry)
        })
    }

    /// Chunks and stores one file (a small one is kept whole, for its tree). The outer
    /// error aborts the import (storage failed); the inner one skips this file (it could
    /// not be read).
    fn import_file(&self, mut file: File, size_hint: u64) -> Result<io::Result<FileContent>> {
        let mut manifest = FileManifest::default();
        // Most files fit in one maximum-size chunk: read them whole and cut in memory, which
        // avoids the streaming chunker's per-file buffer. Larger (or growing) files stream.
        if size_hint <= u64::from(self.chunker.params().max_bytes) {
            let mut data = Vec::with_capacity(usize::try_from(size_hint).unwrap_or(0) + 1);
            let limit = u64::from(self.chunker.params().max_bytes) + 1;
            if let Err(error) =
                io::Read::read_to_end(&mut io::Read::take(&mut file, limit), &mut data)
            {
                return Ok(Err(error));
            }
            if data.len() <= INLINE_DATA_BYTES_MAX {
                return Ok(Ok(FileContent::Inline(data)));
            }
            if data.len() as u64 <= u64::from(self.chunker.params().max_bytes) {
                for (offset, len) in self.chunker.cut_points(&data) {
                    self.add_chunk(&mut manifest, &data[offset..offset + len])?;
                }
                return Ok(Ok(FileContent::Chunked(manifest)));
            }
            // The file grew past one chunk while we read it: start over, streaming.
            if let Err(error) = io::Seek::rewind(&mut file) {
                return Ok(Err(error));
            }
        }
        self.import_sparse_file(file, size_hint)
    }

    /// A large file as its data regions (SEEK_DATA / SEEK_HOLE) with holes between them:
    /// each region is chunked on its own and every hole of at least
    /// [`HOLE_BYTES_MIN`] becomes a hole extent, so a
    /// sparse disk image costs what it holds, not its size. A file system that cannot tell
    /// holes gives one region, the whole file.
    fn import_sparse_file(&self, mut file: File, size: u64) -> Result<io::Result<FileContent>> {
        let regions = data_regions(&file, size);
        // SEEK_DATA and SEEK_HOLE move the file offset: back to the start.
        if let Err(error) = io::Seek::rewind(&mut file) {
            return Ok(Err(error));
        }
        if regions.len() == 1 && regions[0] == (0, size) {
            return self.import_large_file(file);
        }
        let mut manifest = FileManifest::default();
        for (start, end) in regions {
            manifest.push_hole(start - manifest.size);
            if let Err(error) = io::Seek::seek(&mut file, io::SeekFrom::Start(start)) {
                return Ok(Err(error));
            }
            let region = io::Read::take(&mut file, end - start);
            match self.import_large_file(region)? {
                Ok(FileContent::Chunked(part)) => {
                    for extent in part.extents {
                        manifest.push(extent);
                    }
                }
                Ok(FileContent::Inline(_)) => unreachable!("regions are chunked"),
                Err(error) => return Ok(Err(error)),
            }
        }
        manifest.push_hole(size.saturating_sub(manifest.size));
        Ok(Ok(FileContent::Chunked(manifest)))
    }

    /// Chunks and stores a file too large to read whole (a VM image, a database) with every
    /// core: this thread cuts it and hands each chunk to the pool to be hashed, compressed
    /// and sealed; while [`LARGE_FILE_CHUNKS_IN_FLIGHT`] chunks wait, it seals some itself
    /// (`rayon::yield_now`) instead of idling. Sealed chunks are appended in file order as
    /// they complete, so the manifest is the same whatever the thread count.
    fn import_large_file(&self, file: impl io::Read) -> Result<io::Result<FileContent>> {
        let assembly = Mutex::new(Assembly::default());
        let in_flight = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let mut read_error = None;
        rayon::in_place_scope(|scope| {
            for (index, chunk) in self.chunker.chunks(file).enumerate() {
                let data = match chunk {
                    Ok(chunk) => chunk.data,
                    Err(ChunkerError::Read(error)) => {
                        read_error = Some(Ok(error));
                        break;
                    }
                    Err(other) => {
                        read_error = Some(Err(NodeError::from(other)));
                        break;
                    }
                };
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                while in_flight.load(std::sync::atomic::Ordering::Acquire)
                    >= LARGE_FILE_CHUNKS_IN_FLIGHT
                {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::thread::yield_now();
                    }
                }
                in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let (assembly, in_flight, failed) = (&assembly, &in_flight, &failed);
                scope.spawn(move |_| {
                    if !failed.load(std::sync::atomic::Ordering::Relaxed) {
                        let stored = self.store_chunk(&data);
                        let mut assembly = assembly
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        match stored {
                            Ok((cid, key)) => {
                                assembly.done.insert(index, (data.len(), cid, key));
                                self.assemble(&mut assembly);
                            }
                            // Recorded at once, not in file order: chunks after it may
                            // never be sealed, and the file must not end where they start.
                            Err(error) => {
                                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                                assembly.error.get_or_insert(error);
                            }
                        }
                    }
                    in_flight.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                });
            }
        });
        let assembly = assembly
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(error) = assembly.error {
            return Err(error);
        }
        match read_error {
            Some(Ok(error)) => return Ok(Err(error)),
            Some(Err(error)) => return Err(error),
            None => {}
        }
        debug_assert!(assembly.done.is_empty(), "every sealed chunk was appended");
        Ok(Ok(FileContent::Chunked(assembly.manifest)))
    }

    /// Appends the sealed chunks that are next in file order.
    fn assemble(&self, assembly: &mut Assembly) {
        while let Some((len, cid, key)) = assembly.done.remove(&assembly.next) {
            assembly.next += 1;
            self.append_chunk(&mut assembly.manifest, len, cid, key);
        }
    }

    pub(crate) fn add_chunk(&self, manifest: &mut FileManifest, data: &[u8]) -> Result<()> {
        let (cid, key) = self.store_chunk(data)?;
        self.append_chunk(manifest, data.len(), cid, key);
        Ok(())
    }

    /// Appends a stored chunk to `manifest` (and to the snapshot's reach).
    fn append_chunk(&self, manifest: &mut FileManifest, len: usize, cid: Cid, key: [u8; 32]) {
        let len = u32::try_from(len).expect("chunks are at most 16 MiB");
        self.reach(cid);
        manifest.push_chunk(ChunkRef {
            cid: *cid.as_bytes(),
            len,
            key,
        });
    }

    /// Stores a chunk unless the domain already has it; returns its cid and key.
    pub(crate) fn store_chunk(&self, plaintext: &[u8]) -> Result<(Cid, [u8; 32])> {
        let domain_key = self.volume.domain_key()?;
        let hash = domain_key.plaintext_hash(plaintext);
        let key = *domain_key.chunk_key(&hash).as_bytes();
        let seen = self.lock_seen().get(&hash).copied();
        if let Some(cid) = seen {
            self.lock_counters().reused_chunks += 1;
            return Ok((cid, key));
        }
        let index_key = keys::key(keys::DEDUP, &[&self.volume.domain.id, hash.as_bytes()]);
        // Claim before checking that it is stored: from the claim on, gc keeps it (see
        // fence.rs); if gc removed it just before, the check below sees that.
        if let Some(value) = self.vault.kv().get(Column::Meta, &index_key)?
            && let Ok(cid) = Cid::from_slice(&value)
            && {
                self.session.claim(cid);
                self.vault.chunk_stored(&cid)?
            }
        {
            self.reuse(hash, cid);
            return Ok((cid, key));
        }
        let sealed = seal::seal(&key, plaintext, CHUNK_AAD, Compression::WhenSmaller);
        let chunk = VerifiedChunk::hashed(&sealed);
        let cid = chunk.cid();
        self.session.claim(cid);
        let mut batch = WriteBatch::new();
        batch.put(Column::Meta, index_key, cid.as_bytes().to_vec());
        // The index is a cache; the shards are the truth. Sealing is deterministic, so a
        // chunk whose index entry was lost (a crash, gc) is still found here and never
        // written twice.
        if self.vault.chunk_stored(&cid)? {
            self.reuse(hash, cid);
            self.stage(batch)?;
            return Ok((cid, key));
        }
        let written = stage_chunk(&mut batch, &self.coder, chunk)?;
        if self.lock_seen().insert(hash, cid).is_some() {
            // Another thread stored the same chunk meanwhile: writing it again is harmless
            // (same bytes), but count it once.
            self.lock_counters().reused_chunks += 1;
            return Ok((cid, key));
        }
        let mut counters = self.lock_counters();
        counters.new_chunks += 1;
        counters.written_bytes += written as u64;
        drop(counters);
        self.stage(batch)?;
        Ok((cid, key))
    }

    /// Records a chunk found already stored: later duplicates in this import cost one hash.
    fn reuse(&self, hash: PlaintextHash, cid: Cid) {
        self.lock_seen().insert(hash, cid);
        self.lock_counters().reused_chunks += 1;
    }

    pub(crate) fn store_object(&self, object: &Object) -> Result<Cid> {
        let limit = self.vault.limits().object_bytes_max;
        let (cid, sealed) =
            object
                .seal_within(&self.volume.volume_key, limit)
                .map_err(|error| match (error, object) {
                    (ObjectError::TooLarge { bytes, limit, .. }, Object::Manifest(manifest)) => {
                        NodeError::TooLarge {
                            what: format!(
                                "a file manifest part of {} bytes in {} extents",
                                manifest.size,
                                manifest.extents.len()
                            ),
                            detail: format!(
                                "it needs {bytes} bytes, over the {limit}-byte object limit"
                            ),
                        }
                    }
                    (ObjectError::TooLarge { bytes, limit, .. }, Object::Tree(tree)) => {
                        NodeError::TooLarge {
                            what: format!("a directory of {} entries", tree.entries.len()),
                            detail: format!(
                                "its tree needs {bytes} bytes, over the {limit}-byte object limit"
                            ),
                        }
                    }
                    (other, _) => other.into(),
                })?;
        self.reach(cid);
        self.stage_object(cid, sealed)?;
        Ok(cid)
    }

    /// Stores `object` if its encoding is at most `limit` bytes (at most the object limit);
    /// `None`, with nothing stored, when it is larger. One encoding serves the size check
    /// and the seal.
    pub(crate) fn store_object_if_within(
        &self,
        object: &Object,
        limit: usize,
    ) -> Result<Option<Cid>> {
        let limit = limit.min(self.vault.limits().object_bytes_max);
        match object.seal_within(&self.volume.volume_key, limit) {
            Ok((cid, sealed)) => {
                self.reach(cid);
                self.stage_object(cid, sealed)?;
                Ok(Some(cid))
            }
            Err(ObjectError::TooLarge { .. }) => Ok(None),
            Err(other) => Err(other.into()),
        }
    }

    /// Stages an object (or reference-index node) unless it is already stored: unchanged
    /// subtrees keep their cids, and writing them again would only cost disk until the next
    /// compaction.
    fn stage_object(&self, cid: Cid, bytes: Vec<u8>) -> Result<()> {
        self.session.claim(cid);
        if self
            .vault
            .kv()
            .get(Column::Objects, cid.as_bytes())?
            .is_some()
        {
            return Ok(());
        }
        self.lock_counters().written_bytes += bytes.len() as u64;
        let mut batch = WriteBatch::new();
        batch.put(Column::Objects, cid.as_bytes().to_vec(), bytes);
        self.stage(batch)
    }

    fn stage(&self, batch: WriteBatch) -> Result<()> {
        let full = {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.append(batch);
            (pending.payload_bytes() >= BATCH_BYTES).then(|| pending.take())
        };
        if let Some(full) = full {
            self.vault.kv().write(full, Durability::Unlogged)?;
        }
        Ok(())
    }

    pub(crate) fn write_pending(&self) -> Result<()> {
        let rest = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if !rest.is_empty() {
            self.vault.kv().write(rest, Durability::Unlogged)?;
        }
        Ok(())
    }

    fn skip(&self, path: &Path, error: &io::Error) {
        self.skip_reason(path, error.to_string());
    }

    fn skip_reason(&self, path: &Path, reason: String) {
        tracing::warn!(path = %path.display(), %reason, "skipped");
        self.skipped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((path.to_owned(), reason));
    }

    fn incomplete(&self, path: &Path, reason: String) {
        tracing::warn!(path = %path.display(), %reason, "stored incomplete");
        self.incomplete
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((path.to_owned(), reason));
    }

    fn linked_content(&self, group: u64) -> Option<(u64, EntryContent)> {
        self.lock_linked().get(&group).cloned()
    }

    fn lock_linked(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (u64, EntryContent)>> {
        self.linked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_seen(&self) -> std::sync::MutexGuard<'_, BTreeMap<PlaintextHash, Cid>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A `stat` time as nanoseconds since the Unix epoch (saturating far from it).
fn nanoseconds(seconds: i64, nanoseconds: i64) -> i64 {
    seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(nanoseconds)
}

/// The data regions of a file of `size` bytes, `(start, end)` in order, holes shorter than
/// [`HOLE_BYTES_MIN`] merged into their neighbours.
/// The whole file when the file system cannot tell (or the file changes while asked).
fn data_regions(file: &File, size: u64) -> Vec<(u64, u64)> {
    use nix::unistd::{Whence, lseek};
    let whole = vec![(0, size)];
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let Ok(offset) = i64::try_from(at) else {
            return whole;
        };
        let start = match lseek(file, offset, Whence::SeekData) {
            Ok(start) => u64::try_from(start).unwrap_or(size),
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(_) => return whole,
        };
        let Ok(from) = i64::try_from(start) else {
            return whole;
        };
        let end = match lseek(file, from, Whence::SeekHole) {
            Ok(end) => u64::try_from(end).unwrap_or(size).min(size),
            Err(_) => return whole,
        };
        if start >= end {
            break;
        }
        match regions.last_mut() {
            Some(last) if start - last.1 < HOLE_BYTES_MIN => last.1 = end,
            _ => regions.push((start, end)),
        }
        at = end;
    }
    if regions.is_empty() {
        // All hole (or empty): no data region at all.
        return Vec::new();
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{new_vault, no_passphrase, pseudo_random};
    use crate::vault::{CreateVolumeOptions, VaultLimits};

    /// Import options for `main`, with no message or DNA.
    fn main_branch() -> ImportOptions {
        ImportOptions {
            message: String::new(),
            branch: "main".into(),
            dna: BTreeMap::new(),
            atime: false,
        }
    }

    /// Exports snapshot `snapshot` of volume `v` into `out`, which must succeed.
    fn export_snapshot(vault: &Vault, snapshot: &Cid, out: &Path) {
        vault
            .export(
                "v",
                out,
                &crate::vault::export::SnapshotSelector::Id(snapshot.to_hex()),
                &crate::vault::ExportOptions::default(),
                &no_passphrase,
                &Progress::new("test", false),
            )
            .unwrap();
    }

    /// Before manifest and tree indexes, a file whose manifest was over the object limit
    /// imported with success and could never be read ("Destination buffer is too small"),
    /// and a directory over it could not be stored. Now both are split into parts under
    /// index objects (here two levels deep, with a small configured limit), read back
    /// byte-exact, and a one-file change re-stores a part, not the directory.
    #[test]
    fn files_and_directories_over_the_object_limit_are_split_and_read_back() {
        let temp = tempfile::tempdir().unwrap();
        let mut vault = new_vault(temp.path());
        vault.set_limits(VaultLimits {
            object_bytes_max: 2048,
            part_bytes_min: 256,
            ..VaultLimits::default()
        });
        let options = CreateVolumeOptions {
            domain: Some("small".into()),
            chunk_avg_bytes: Some(1024),
            ..CreateVolumeOptions::default()
        };
        vault.create_volume("v", &options, &no_passphrase).unwrap();
        let source = temp.path().join("source");
        let many = source.join("many");
        fs::create_dir_all(&many).unwrap();
        let big = pseudo_random(2_000_000, 0x2545_F491_4F6C_DD1D);
        fs::write(source.join("big.bin"), &big).unwrap();
        for index in 0..3_000u32 {
            let len = (index % 90) as usize;
            fs::write(
                many.join(format!("file-{index:05}")),
                pseudo_random(len, u64::from(index) + 1),
            )
            .unwrap();
        }
        let import = |vault: &Vault| {
            vault
                .import(
                    "v",
                    &source,
                    &ImportOptions {
                        message: String::new(),
                        branch: "main".into(),
                        dna: BTreeMap::new(),
                        atime: false,
                    },
                    &no_passphrase,
                    &Progress::new("test", false),
                )
                .unwrap()
        };
        let first = import(&vault);
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let root = Cid::from_bytes(vault.read_commit(&volume, &first.snapshot).unwrap().root);
        let entries = vault.read_tree(&volume, &root).unwrap();
        let kind_of = |name: &[u8]| {
            let entry = entries.iter().find(|entry| entry.name == name).unwrap();
            let cid = match &entry.content {
                EntryContent::File { manifest } => Cid::from_bytes(*manifest),
                EntryContent::Directory { tree } => Cid::from_bytes(*tree),
                other => panic!("{other:?}"),
            };
            match vault.read_object(&volume, &cid).unwrap() {
                Object::ManifestIndex(index) => {
                    let below = vault
                        .read_object(&volume, &Cid::from_bytes(index.parts[0].cid))
                        .unwrap();
                    format!("manifest index over {}", below.name())
                }
                other => other.name().to_owned(),
            }
        };
        assert_eq!(kind_of(b"big.bin"), "manifest index over manifest index");
        assert_eq!(kind_of(b"many"), "tree index");

        let out = temp.path().join("out");
        export_snapshot(&vault, &first.snapshot, &out);
        assert_eq!(fs::read(out.join("big.bin")).unwrap(), big);
        for index in (0..3_000u32).step_by(7) {
            let name = format!("file-{index:05}");
            assert_eq!(
                fs::read(out.join("many").join(&name)).unwrap(),
                fs::read(many.join(&name)).unwrap(),
                "{name}"
            );
        }
        assert_eq!(fs::read_dir(out.join("many")).unwrap().count(), 3_000);

        fs::write(many.join("file-01500"), b"changed").unwrap();
        let second = import(&vault);
        // The directory's trees are about 330 KB; one changed entry re-stores its part, the
        // index nodes above it, the root and the reference-index nodes that changed (their
        // number varies with where the new cids fall: 20-40 KB seen).
        assert!(
            second.written_bytes < 64 << 10,
            "one changed file re-stored {} bytes",
            second.written_bytes
        );
        let out2 = temp.path().join("out2");
        export_snapshot(&vault, &second.snapshot, &out2);
        assert_eq!(fs::read(out2.join("many/file-01500")).unwrap(), b"changed");
        let report = vault
            .fsck(Some(&no_passphrase), &Progress::new("test", false))
            .unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    /// Before, a sparse file was chunked whole (a 100 GiB image with little data took minutes
    /// of hashing zeros); now its holes are holes: imported as hole extents, exported as a
    /// sparse file, byte-exact.
    #[test]
    fn a_sparse_file_keeps_its_holes_through_import_and_export() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let temp = tempfile::tempdir().unwrap();
        let vault = new_vault(temp.path());
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let source = temp.path().join("source");
        fs::create_dir_all(&source).unwrap();
        let size: u64 = 8 << 30;
        let image = fs::File::create(source.join("disk.img")).unwrap();
        image.set_len(size).unwrap();
        let head = pseudo_random(300_000, 5);
        let middle = pseudo_random(200_000, 6);
        image.write_all_at(&head, 0).unwrap();
        image.write_all_at(&middle, 3 << 30).unwrap();
        image.write_all_at(b"the end", size - 7).unwrap();
        drop(image);
        let progress = Progress::new("test", false);
        let report = vault
            .import(
                "v",
                &source,
                &ImportOptions {
                    message: String::new(),
                    branch: "main".into(),
                    dna: BTreeMap::new(),
                    atime: false,
                },
                &no_passphrase,
                &progress,
            )
            .unwrap();
        assert_eq!(report.logical_bytes, size);
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let root = Cid::from_bytes(vault.read_commit(&volume, &report.snapshot).unwrap().root);
        let entry = vault.read_tree(&volume, &root).unwrap().remove(0);
        let manifest = vault
            .entry_manifest(&volume, &entry.content, &mut |_| {})
            .unwrap()
            .unwrap();
        let holes: u64 = manifest
            .extents
            .iter()
            .filter(|extent| matches!(extent, forge_store::object::Extent::Hole { .. }))
            .map(forge_store::object::Extent::len)
            .sum();
        assert!(
            holes > size - (16 << 20),
            "{holes} bytes of holes in {size}"
        );
        assert!(
            manifest.chunk_count() < 64,
            "{} chunks",
            manifest.chunk_count()
        );

        let out = temp.path().join("out");
        export_snapshot(&vault, &report.snapshot, &out);
        let exported = fs::File::open(out.join("disk.img")).unwrap();
        let metadata = exported.metadata().unwrap();
        assert_eq!(metadata.len(), size);
        assert!(
            metadata.blocks() * 512 < 64 << 20,
            "exported sparse: {} bytes allocated",
            metadata.blocks() * 512
        );
        let mut buffer = vec![0u8; head.len()];
        exported.read_exact_at(&mut buffer, 0).unwrap();
        assert_eq!(buffer, head);
        let mut buffer = vec![0u8; middle.len()];
        exported.read_exact_at(&mut buffer, 3 << 30).unwrap();
        assert_eq!(buffer, middle);
        let mut buffer = vec![1u8; 4096];
        exported.read_exact_at(&mut buffer, 1 << 30).unwrap();
        assert!(buffer.iter().all(|byte| *byte == 0));
        let mut buffer = vec![0u8; 7];
        exported.read_exact_at(&mut buffer, size - 7).unwrap();
        assert_eq!(&buffer, b"the end");
    }

    /// Makes a chain of `depth` directories named `dddddddd` under `root` (with `mkdirat`: the
    /// full path is longer than the kernel's path limit) and a file `leaf` at the bottom.
    fn deep_chain(root: &Path, depth: usize) {
        deep_chain_with(root, depth, b"at the bottom");
    }

    /// A chain of `depth` directories under `root` with a file `leaf` holding `leaf_bytes`
    /// at the bottom, made by descriptors (its path can be over PATH_MAX).
    fn deep_chain_with(root: &Path, depth: usize, leaf_bytes: &[u8]) {
        use nix::fcntl::{OFlag, openat};
        use nix::sys::stat::{Mode, mkdirat};
        fs::create_dir_all(root).unwrap();
        let mut directory = openat(
            nix::fcntl::AT_FDCWD,
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        for _ in 0..depth {
            mkdirat(&directory, "dddddddd", Mode::from_bits_truncate(0o755)).unwrap();
            directory = openat(
                &directory,
                "dddddddd",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
        }
        let leaf = openat(
            &directory,
            "leaf",
            OFlag::O_WRONLY | OFlag::O_CREAT,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        io::Write::write_all(&mut File::from(leaf), leaf_bytes).unwrap();
    }

    /// Before, diff recursed with each level's path and entries held (a 10,000-level chain
    /// peaked at 2.3 GB) and reported additions, removals and modifications in three
    /// groups. Now one iterative walk reports each difference in path order, a directory as
    /// `path/` before its contents, from a thread with a small stack.
    #[test]
    fn a_diff_walks_any_depth_reporting_changes_in_path_order() {
        use crate::vault::snapshots::DiffChange;
        let temp = tempfile::tempdir().unwrap();
        let vault = new_vault(temp.path());
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let options = main_branch();
        let progress = Progress::new("test", false);
        let (one, two) = (temp.path().join("one"), temp.path().join("two"));
        deep_chain_with(&one, 1_000, b"at the bottom");
        deep_chain_with(&two, 1_000, b"changed at the bottom");
        for root in [&one, &two] {
            fs::write(root.join("same.txt"), "same").unwrap();
            fs::create_dir_all(root.join("kept/inner")).unwrap();
            fs::write(root.join("kept/inner/file"), "kept").unwrap();
        }
        fs::write(one.join("edited.txt"), "before").unwrap();
        fs::write(two.join("edited.txt"), "after!").unwrap();
        fs::create_dir_all(one.join("gone/below")).unwrap();
        fs::write(one.join("gone/below/file"), "gone").unwrap();
        fs::create_dir_all(two.join("new")).unwrap();
        fs::write(two.join("new/file"), "new").unwrap();
        fs::create_dir(one.join("kind")).unwrap();
        fs::write(one.join("kind/inside"), "inside").unwrap();
        fs::write(two.join("kind"), "a file now").unwrap();
        fs::create_dir(one.join("moded")).unwrap();
        fs::create_dir(two.join("moded")).unwrap();
        // Explicit modes and times: the same names must differ only where the test says,
        // whatever the umask and however the writes fall on the file system's clock ticks.
        for (root, mode) in [(&one, 0o755), (&two, 0o700)] {
            fs::set_permissions(
                root.join("moded"),
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            )
            .unwrap();
            for same in ["same.txt", "kept/inner/file"] {
                fs::File::options()
                    .write(true)
                    .open(root.join(same))
                    .unwrap()
                    .set_modified(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
                    )
                    .unwrap();
            }
        }
        let first = vault
            .import("v", &one, &options, &no_passphrase, &progress)
            .unwrap()
            .snapshot
            .to_hex();
        let second = vault
            .import("v", &two, &options, &no_passphrase, &progress)
            .unwrap()
            .snapshot
            .to_hex();
        let changes = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn_scoped(scope, || {
                    let mut changes = Vec::new();
                    vault
                        .diff_snapshots_each(
                            "v",
                            (&first, &second),
                            &no_passphrase,
                            &mut |change, path| {
                                changes.push((change, path.to_owned()));
                            },
                        )
                        .unwrap();
                    changes
                })
                .unwrap()
                .join()
                .unwrap()
        });
        let chain_leaf = format!("{}leaf", "dddddddd/".repeat(1_000));
        let expected = [
            (DiffChange::Modified, chain_leaf.as_str()),
            (DiffChange::Modified, "edited.txt"),
            (DiffChange::Removed, "gone/"),
            (DiffChange::Removed, "gone/below/"),
            (DiffChange::Removed, "gone/below/file"),
            (DiffChange::Modified, "kind"),
            (DiffChange::Modified, "moded/"),
            (DiffChange::Added, "new/"),
            (DiffChange::Added, "new/file"),
        ];
        let found: Vec<(DiffChange, &str)> = changes
            .iter()
            .map(|(change, path)| (*change, path.as_str()))
            .collect();
        assert_eq!(found, expected);
        // The collecting form groups the same paths.
        let diff = vault
            .diff_snapshots("v", &first, &second, &no_passphrase)
            .unwrap();
        assert_eq!(diff.added, ["new/", "new/file"]);
        assert_eq!(diff.removed, ["gone/", "gone/below/", "gone/below/file"]);
        assert_eq!(
            diff.modified,
            [chain_leaf.as_str(), "edited.txt", "kind", "moded/"]
        );
        assert!(
            vault
                .diff_snapshots("v", &second, &second, &no_passphrase)
                .unwrap()
                == crate::vault::snapshots::SnapshotDiff::default()
        );
    }

    /// Before, import and export recursed once per directory level on the vault's threads
    /// (256 MiB stacks were reserved for it; on this test's 16 MiB ones a 10,000-level
    /// chain overflowed and killed the process). Now both are post-order walks of jobs:
    /// no thread's stack grows with the depth, and import holds no descriptor per level.
    #[test]
    fn a_ten_thousand_level_chain_imports_and_exports_whole_without_recursing() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        const LEVELS: usize = 10_000;
        // Export holds each level's directory open until its children are written (their
        // owner, mode and times are set last), as the forge binary allows (soft = hard).
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
        assert!(
            hard > 11_000,
            "this test needs 11,000 descriptors; the hard limit is {hard}"
        );
        let temp = tempfile::tempdir().unwrap();
        let vault = new_vault(temp.path());
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let options = main_branch();
        let deep = temp.path().join("deep");
        deep_chain(&deep, LEVELS);
        let report = vault
            .import(
                "v",
                &deep,
                &options,
                &no_passphrase,
                &Progress::new("test", false),
            )
            .unwrap();
        assert!(report.skipped.is_empty(), "{:?}", report.skipped.first());
        assert_eq!(report.files, 1, "the leaf at the bottom was captured");
        let out = temp.path().join("out");
        export_snapshot(&vault, &report.snapshot, &out);
        let open_directory = |at: &dyn std::os::fd::AsFd, name: &Path| {
            nix::fcntl::openat(
                at.as_fd(),
                name,
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )
        };
        let cwd = nix::fcntl::AT_FDCWD;
        let (mut directory, mut source) = (
            open_directory(&cwd, &out).unwrap(),
            open_directory(&cwd, &deep).unwrap(),
        );
        for level in 0..LEVELS {
            let name = Path::new("dddddddd");
            let below = open_directory(&directory, name)
                .unwrap_or_else(|errno| panic!("level {level}: {errno}"));
            source = open_directory(&source, name).unwrap();
            // Each level got its mode back once its children were written.
            let (exported, original) = (
                nix::sys::stat::fstat(&below).unwrap(),
                nix::sys::stat::fstat(&source).unwrap(),
            );
            assert_eq!(exported.st_mode, original.st_mode, "level {level}");
            directory = below;
        }
        let leaf = nix::fcntl::openat(
            &directory,
            "leaf",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        assert_eq!(
            io::read_to_string(File::from(leaf)).unwrap(),
            "at the bottom"
        );
        assert!(
            vault
                .fsck(Some(&no_passphrase), &Progress::new("test", false))
                .unwrap()
                .problems
                .is_empty()
        );
        // std's remove_dir_all recurses per level on this thread's stack: rm does not.
        for tree in [&deep, &out] {
            let status = std::process::Command::new("rm")
                .arg("-rf")
                .arg(tree)
                .status()
                .unwrap();
            assert!(status.success());
        }
    }

    /// Before, import opened entries by full path: a chain of 5,000 directories stopped at
    /// depth ~2,040 with "File name too long" and everything below was not captured.
    #[test]
    fn a_deep_chain_imports_whole_and_a_too_deep_one_is_refused_saying_so() {
        let temp = tempfile::tempdir().unwrap();
        let vault = new_vault(temp.path());
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let options = main_branch();
        let progress = Progress::new("test", false);
        // 1,000 levels of "dddddddd/": 9,000 bytes of path, past PATH_MAX (4,096).
        let deep = temp.path().join("deep");
        deep_chain(&deep, 1_000);
        let report = vault
            .import("v", &deep, &options, &no_passphrase, &progress)
            .unwrap();
        assert!(report.skipped.is_empty(), "{:?}", report.skipped.first());
        assert_eq!(report.files, 1, "the leaf at the bottom was captured");
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let mut tree = Cid::from_bytes(vault.read_commit(&volume, &report.snapshot).unwrap().root);
        let mut levels = 0;
        loop {
            let entries = vault
                .read_object(&volume, &tree)
                .unwrap()
                .into_tree()
                .unwrap()
                .entries;
            match &entries[0].content {
                EntryContent::Directory { tree: below } => {
                    tree = Cid::from_bytes(*below);
                    levels += 1;
                }
                EntryContent::InlineData(data) => {
                    assert_eq!(entries[0].name, b"leaf");
                    assert_eq!(data.len(), 13);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(levels, 1_000);
        // Export writes the chain back whole: relative to each directory's descriptor,
        // since its full path (9,000 bytes) is over the kernel's limit (before, export
        // failed with "File name too long").
        let out = temp.path().join("out");
        export_snapshot(&vault, &report.snapshot, &out);
        let mut directory = nix::fcntl::openat(
            nix::fcntl::AT_FDCWD,
            &out,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        for _ in 0..1_000 {
            directory = nix::fcntl::openat(
                &directory,
                "dddddddd",
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
                nix::sys::stat::Mode::empty(),
            )
            .unwrap();
        }
        let leaf = nix::fcntl::openat(
            &directory,
            "leaf",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        assert_eq!(
            io::read_to_string(File::from(leaf)).unwrap(),
            "at the bottom"
        );
        // The recursive walks (gc, fsck) handle the deepest tree a volume may hold.
        vault
            .gc(&no_passphrase, &Progress::new("test", false))
            .unwrap();
        assert!(
            vault
                .fsck(Some(&no_passphrase), &Progress::new("test", false))
                .unwrap()
                .problems
                .is_empty()
        );

        // Past the depth limit (a small one configured here; 16,384 by default, which
        // scripts/bench-limits.sh reaches with a 10,000-level chain) import refuses.
        let mut vault = vault;
        vault.set_limits(VaultLimits {
            tree_depth_max: 300,
            ..VaultLimits::default()
        });
        let too_deep = temp.path().join("too-deep");
        deep_chain(&too_deep, 302);
        let error = vault
            .import("v", &too_deep, &options, &no_passphrase, &progress)
            .unwrap_err();
        assert!(matches!(error, NodeError::TooLarge { .. }), "{error}");
        assert!(error.to_string().contains("nested deeper than"), "{error}");
        assert_eq!(
            vault.refs().get_ref(&volume.id, "main").unwrap(),
            Some(report.snapshot),
            "nothing published"
        );
    }
}
