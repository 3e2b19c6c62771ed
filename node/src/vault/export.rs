//! Export: a snapshot becomes a directory tree again, byte-exact, with permission bits,
//! mtimes, symlinks (not followed) and any names. Every chunk is verified against its cid
//! (and rebuilt from parity when a shard is damaged) before a byte of it is written.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use forge_crypto::Cid;
use forge_crypto::seal;
use forge_store::object::{ChunkRef, EntryContent, Extent, FileManifest, TreeEntry};
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, futimens, makedev, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchown, fchownat, getegid, geteuid, linkat, symlinkat};

use super::posix::{self, OwnerMap};
use super::post_order::{self, PostOrderWalk, TreePath, Visit};
use super::{CHUNK_AAD, OpenVolume, PassphraseSource, Vault};
use crate::error::{IntegrityFault, NodeError, Result};
use crate::progress::Progress;

/// What an export did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The snapshot exported.
    pub snapshot: Cid,
    /// Regular files written.
    pub files: u64,
    /// File bytes written.
    pub bytes: u64,
    /// Entries restored without something the volume holds (a device a normal user cannot
    /// create, attributes the destination refused), with what.
    pub not_restored: Vec<(PathBuf, String)>,
    /// Entries left owned by the exporting user: only root gives files other owners.
    pub owners_not_restored: u64,
    /// Wall time.
    pub elapsed_seconds: f64,
}

/// How an export restores what the volume recorded.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Owners by their recorded ids, never mapped through the names this machine has for
    /// them (tar's `--numeric-owner`).
    pub numeric_owner: bool,
}

/// Which snapshot to export.
#[derive(Debug, Clone)]
pub enum SnapshotSelector {
    /// A snapshot id or unique prefix.
    Id(String),
    /// The head of a branch.
    Branch(String),
}

impl Vault {
    /// The plaintext of one chunk: its shards gathered (and repaired from parity when
    /// needed) and checked against the cid, the seal opened with the manifest's chunk key,
    /// and the length checked. Never returns bytes that failed a check.
    ///
    /// # Errors
    /// [`NodeError::Integrity`] naming the cid; engine errors.
    pub(crate) fn read_chunk_plaintext(&self, chunk: &ChunkRef) -> Result<Vec<u8>> {
        let cid = chunk.cid();
        // From a volume group's members when this node holds too few of its shards.
        let ciphertext = self.read_ciphertext(&cid)?;
        let plaintext = seal::open(&chunk.key, &ciphertext, CHUNK_AAD, chunk.len as usize)
            .map_err(|error| IntegrityFault::UnreadableChunk {
                cid,
                reason: error.to_string(),
            })?;
        if plaintext.len() != chunk.len as usize {
            return Err(IntegrityFault::ChunkLength {
                cid,
                found: plaintext.len(),
                expected: u64::from(chunk.len),
            }
            .into());
        }
        Ok(plaintext)
    }

    /// Resolves a selector to a snapshot id.
    ///
    /// # Errors
    /// Unknown volume, snapshot or branch.
    pub fn select_snapshot(&self, name: &str, selector: &SnapshotSelector) -> Result<Cid> {
        let record = self.require_volume(name)?;
        match selector {
            SnapshotSelector::Id(id) => self.resolve_snapshot(&record, id),
            SnapshotSelector::Branch(branch) => self
                .refs()
                .get_ref(&forge_store::VolumeId::from_bytes(record.id), branch)?
                .ok_or_else(|| NodeError::UnknownBranch {
                    volume: name.to_owned(),
                    branch: branch.clone(),
                }),
        }
    }

    /// Writes snapshot `selector` of volume `name` into `destination` (empty or absent).
    ///
    /// # Errors
    /// [`NodeError::DestinationNotEmpty`], unknown names, I/O errors, integrity errors
    /// naming the cid that failed verification.
    pub fn export(
        &self,
        name: &str,
        destination: &Path,
        selector: &SnapshotSelector,
        options: &ExportOptions,
        passphrase: PassphraseSource<'_>,
        progress: &Progress,
    ) -> Result<ExportReport> {
        let snapshot = self.select_snapshot(name, selector)?;
        let volume = self.open_volume(name, passphrase)?;
        let commit = self.read_commit(&volume, &snapshot)?;
        // The commit says what the export will write: progress shows the share and an ETA.
        progress.set_expected(commit.file_count, commit.logical_bytes);
        match fs::read_dir(destination) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(NodeError::DestinationNotEmpty {
                        path: destination.to_owned(),
                    });
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(destination).map_err(NodeError::io("creating", destination))?;
            }
            Err(error) => return Err(NodeError::io("reading", destination)(error)),
        }
        let exporter = Exporter {
            vault: self,
            volume: &volume,
            progress,
            owners: OwnerMap::new(options.numeric_owner),
            as_root: geteuid().is_root(),
            links: Mutex::new(BTreeMap::new()),
            not_restored: Mutex::new(Vec::new()),
            owners_not_restored: AtomicU64::new(0),
        };
        let root = openat(
            nix::fcntl::AT_FDCWD,
            destination,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(at_error("opening", destination))?;
        // On the vault's threads, which the walk keeps busy (post_order.rs).
        self.in_pool(|| {
            post_order::walk(
                &exporter,
                ExportDirectory {
                    at: ExportAt::Root(root),
                    tree: Cid::from_bytes(commit.root),
                    path: TreePath::root(destination),
                },
            )
        })?;
        let (files, bytes) = progress.totals();
        let mut not_restored = exporter
            .not_restored
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        not_restored.sort();
        Ok(ExportReport {
            snapshot,
            files,
            bytes,
            not_restored,
            owners_not_restored: exporter.owners_not_restored.into_inner(),
            elapsed_seconds: progress.elapsed().as_secs_f64(),
        })
    }
}

struct Exporter<'a> {
    vault: &'a Vault,
    volume: &'a OpenVolume,
    progress: &'a Progress,
    owners: OwnerMap,
    /// Owners, devices and `trusted.*` attributes are restored only by root.
    as_root: bool,
    /// The first name written of each hard-link group, for its other names to link to.
    links: Mutex<BTreeMap<u64, Arc<Mutex<Option<LinkSource>>>>>,
    not_restored: Mutex<Vec<(PathBuf, String)>>,
    owners_not_restored: AtomicU64,
}

/// The first name of a hard-link group, written whole: what it holds and where it is.
struct LinkSource {
    /// Only a name with this same content links to it (a tree whose group names differ
    /// in content gets separate files, not one of them twice).
    content: EntryContent,
    at: LinkAt,
}

/// Where the first name of a hard-link group was written.
enum LinkAt {
    /// Its directory (still open) and name: linked relative to it, whatever the depth.
    Open(OwnedFd, OsString),
    /// Its path (past [`LINK_SOURCES_OPEN_MAX`] groups, not to hold a descriptor each).
    Path(PathBuf),
}

/// Hard-link groups whose first name keeps its directory open, at most.
const LINK_SOURCES_OPEN_MAX: usize = 1024;

/// An errno from a `*at` call as the I/O error of `action` on `path`.
fn at_error(action: &'static str, path: &Path) -> impl FnOnce(nix::errno::Errno) -> NodeError {
    let path = path.to_owned();
    move |errno| NodeError::io(action, &path)(std::io::Error::from(errno))
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// A directory to export.
struct ExportDirectory {
    at: ExportAt,
    /// Its tree.
    tree: Cid,
    /// Shown in messages.
    path: TreePath,
}

/// Where a directory is exported.
enum ExportAt {
    /// The destination, open.
    Root(OwnedFd),
    /// A new directory for `entry` in the directory open as the descriptor: made when its
    /// job runs, so directories waiting for a thread hold no descriptor.
    In(Arc<OwnedFd>, Box<TreeEntry>),
}

/// A directory being exported: its descriptor, its entries, and (below the root) its
/// parent's descriptor and its own entry, for its owner, mode and times once it is full.
struct ExportOpen {
    directory: Arc<OwnedFd>,
    entries: Vec<TreeEntry>,
    own: Option<(Arc<OwnedFd>, TreeEntry)>,
    path: TreePath,
}

impl PostOrderWalk for Exporter<'_> {
    type Directory = ExportDirectory;
    type Open = ExportOpen;
    type Item = ();

    fn open(
        &self,
        directory: ExportDirectory,
        depth: usize,
    ) -> Result<Option<(ExportOpen, usize)>> {
        let ExportDirectory { at, tree, path } = directory;
        let depth_max = self.vault.limits().tree_depth_max;
        if depth > depth_max {
            return Err(super::import::too_deep(&path.to_path(), depth_max));
        }
        let (directory, own) = match at {
            ExportAt::Root(directory) => (directory, None),
            ExportAt::In(parent, entry) => {
                let name = OsStr::from_bytes(&entry.name);
                mkdirat(&*parent, name, Mode::from_bits_truncate(0o700))
                    .map_err(|errno| at_error("creating", &path.to_path())(errno))?;
                let directory = openat(
                    &*parent,
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|errno| at_error("opening", &path.to_path())(errno))?;
                (directory, Some((parent, *entry)))
            }
        };
        let entries = self.vault.read_tree(self.volume, &tree)?;
        let count = entries.len();
        Ok(Some((
            ExportOpen {
                directory: Arc::new(directory),
                entries,
                own,
                path,
            },
            count,
        )))
    }

    fn visit(&self, open: &ExportOpen, index: usize) -> Result<Visit<ExportDirectory, ()>> {
        let entry = &open.entries[index];
        let name = OsStr::from_bytes(&entry.name);
        if let EntryContent::Directory { tree } = &entry.content {
            return Ok(Visit::Descend(ExportDirectory {
                at: ExportAt::In(Arc::clone(&open.directory), Box::new(entry.clone())),
                tree: Cid::from_bytes(*tree),
                path: open.path.child(name),
            }));
        }
        self.export_entry(entry, &open.directory, &open.path.join(name))?;
        Ok(Visit::Done(()))
    }

    /// Owner, permissions and times last: writing the children changed the mtime, and a
    /// read-only directory must still receive its children first.
    fn finish(&self, open: &ExportOpen, _items: Vec<Option<()>>) -> Result<Option<()>> {
        if let Some((parent, entry)) = &open.own {
            let name = OsStr::from_bytes(&entry.name);
            let path = open.path.to_path();
            self.restore_metadata(entry, (parent, name), Some(&open.directory), &path)?;
        }
        Ok(Some(()))
    }
}

impl Exporter<'_> {
    fn export_entry(&self, entry: &TreeEntry, parent: &OwnedFd, path: &Path) -> Result<()> {
        let Some(group) = entry.meta.link_group else {
            return self.create_entry(entry, parent, path);
        };
        // The first name of a group is written while its group is held; the others wait
        // for it, then link to it (no bytes written twice, one inode as in the source).
        let slot = Arc::clone(
            self.links
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(group)
                .or_default(),
        );
        let mut source = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let name = OsStr::from_bytes(&entry.name);
        match &*source {
            Some(first) if first.content != entry.content => self.create_entry(entry, parent, path),
            Some(LinkSource {
                at: LinkAt::Open(directory, first),
                ..
            }) => linkat(directory, first.as_os_str(), parent, name, AtFlags::empty())
                .map_err(at_error("linking", path)),
            Some(LinkSource {
                at: LinkAt::Path(first),
                ..
            }) => linkat(AT_FDCWD, first.as_path(), parent, name, AtFlags::empty())
                .map_err(at_error("linking", path)),
            None => {
                self.create_entry(entry, parent, path)?;
                let open = self
                    .links
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
                    <= LINK_SOURCES_OPEN_MAX;
                let at = match parent.try_clone() {
                    Ok(directory) if open => LinkAt::Open(directory, name.to_owned()),
                    _ => LinkAt::Path(path.to_owned()),
                };
                *source = Some(LinkSource {
                    content: entry.content.clone(),
                    at,
                });
                Ok(())
            }
        }
    }

    /// Creates one entry other than a directory, then gives it its owner, permissions,
    /// extended attributes and times.
    fn create_entry(&self, entry: &TreeEntry, parent: &OwnedFd, path: &Path) -> Result<()> {
        let name = OsStr::from_bytes(&entry.name);
        // The entry's own descriptor when it has one (a file or directory): metadata is
        // set through it, with no second lookup by name.
        let open: Option<OwnedFd> = match &entry.content {
            EntryContent::Directory { .. } => {
                unreachable!("a directory is exported by the walk (ExportAt::In), never here")
            }
            EntryContent::Symlink { target } => {
                symlinkat(OsStr::from_bytes(target), parent, name)
                    .map_err(at_error("creating symlink", path))?;
                None
            }
            EntryContent::InlineFile(manifest) => {
                Some(self.write_file(FileBytes::Extents(manifest), parent, name, path)?)
            }
            EntryContent::InlineData(data) => {
                Some(self.write_file(FileBytes::Inline(data), parent, name, path)?)
            }
            EntryContent::File { manifest } => {
                let manifest = self
                    .vault
                    .read_manifest(self.volume, &Cid::from_bytes(*manifest))?;
                if manifest.size != entry.size {
                    return Err(IntegrityFault::SizeMismatch {
                        path: path.to_owned(),
                    }
                    .into());
                }
                Some(self.write_file(FileBytes::Extents(&manifest), parent, name, path)?)
            }
            EntryContent::Fifo
            | EntryContent::Socket
            | EntryContent::CharDevice { .. }
            | EntryContent::BlockDevice { .. } => {
                let (kind, device) = match entry.content {
                    EntryContent::CharDevice { major, minor } => {
                        (SFlag::S_IFCHR, makedev(major.into(), minor.into()))
                    }
                    EntryContent::BlockDevice { major, minor } => {
                        (SFlag::S_IFBLK, makedev(major.into(), minor.into()))
                    }
                    // A socket is restored as the inode it is (as rsync does); the process
                    // that listens on it binds anew.
                    EntryContent::Socket => (SFlag::S_IFSOCK, 0),
                    _ => (SFlag::S_IFIFO, 0),
                };
                match mknodat(parent, name, kind, Mode::from_bits_truncate(0o600), device) {
                    Ok(()) => {}
                    // Only root makes devices: say so and go on with the rest.
                    Err(nix::errno::Errno::EPERM) if !self.as_root => {
                        self.not_restored(path, "device not created: only root creates devices");
                        return Ok(());
                    }
                    Err(errno) => return Err(at_error("creating special file", path)(errno)),
                }
                None
            }
        };
        self.restore_metadata(entry, (parent, name), open.as_ref(), path)
    }

    /// Owner first (a chown clears setuid and setgid), then permission bits, extended
    /// attributes (an ACL after the bits it refines) and times last (each change before
    /// would touch them).
    fn restore_metadata(
        &self,
        entry: &TreeEntry,
        (parent, name): (&OwnedFd, &OsStr),
        open: Option<&OwnedFd>,
        path: &Path,
    ) -> Result<()> {
        let symlink = matches!(entry.content, EntryContent::Symlink { .. });
        let (uid, gid) = self.owners.owner(&entry.meta);
        // What this process creates is its own (no directory is setgid while its children
        // are written): a chown to that is skipped, which is most of a typical tree.
        let (our_uid, our_gid) = (geteuid().as_raw(), getegid().as_raw());
        let chown_needed =
            uid.is_some_and(|uid| uid != our_uid) || gid.is_some_and(|gid| gid != our_gid);
        if chown_needed {
            if self.as_root {
                let (uid, gid) = (uid.map(Uid::from_raw), gid.map(Gid::from_raw));
                match open {
                    Some(descriptor) => fchown(descriptor, uid, gid),
                    None => fchownat(parent, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW),
                }
                .map_err(at_error("setting the owner of", path))?;
            } else if uid.is_some_and(|uid| uid != our_uid) {
                self.owners_not_restored.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !symlink {
            // Linux has no permission bits on symlinks (and fchmodat cannot skip them).
            let mode = Mode::from_bits_truncate(entry.mode);
            match open {
                Some(descriptor) => fchmod(descriptor, mode),
                None => fchmodat(parent, name, mode, FchmodatFlags::FollowSymlink),
            }
            .map_err(at_error("setting permissions of", path))?;
        }
        if !entry.meta.xattrs.is_empty() {
            let xattrs = &entry.meta.xattrs;
            // trusted.* is root's alone: a normal user's restore says it skipped them.
            let (settable, skipped): (Vec<_>, Vec<_>) = xattrs
                .iter()
                .cloned()
                .partition(|xattr| self.as_root || !xattr.name.starts_with(b"trusted."));
            if let Err(error) = posix::write_xattrs(&posix::entry_path(parent, name), &settable) {
                self.not_restored(path, &error.to_string());
            }
            if !skipped.is_empty() {
                self.not_restored(
                    path,
                    &format!(
                        "{} trusted.* extended attributes not restored: only root sets them",
                        skipped.len()
                    ),
                );
            }
        }
        let mtime = timespec(entry.mtime_ns);
        let atime = entry.meta.atime_ns.map_or(mtime, timespec);
        match open {
            Some(descriptor) => futimens(descriptor, &atime, &mtime),
            None => utimensat(
                parent,
                name,
                &atime,
                &mtime,
                UtimensatFlags::NoFollowSymlink,
            ),
        }
        .map_err(at_error("setting mtime of", path))
    }

    fn not_restored(&self, path: &Path, what: &str) {
        tracing::warn!(path = %path.display(), what, "not restored");
        self.not_restored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((path.to_owned(), what.to_owned()));
    }

    fn write_file(
        &self,
        content: FileBytes<'_>,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
    ) -> Result<OwnedFd> {
        let mut file = File::from(
            openat(
                parent,
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(at_error("creating", path))?,
        );
        let size = match content {
            FileBytes::Inline(data) => {
                file.write_all(data)
                    .map_err(NodeError::io("writing", path))?;
                data.len() as u64
            }
            FileBytes::Extents(manifest) => {
                for extent in &manifest.extents {
                    match extent {
                        Extent::Chunk(chunk) => {
                            let plaintext = self.vault.read_chunk_plaintext(chunk)?;
                            file.write_all(&plaintext)
                                .map_err(NodeError::io("writing", path))?;
                        }
                        // Holes stay holes: skip over them (the length is set below).
                        Extent::Hole { len } => {
                            let offset = i64::try_from(*len).unwrap_or(i64::MAX);
                            file.seek(std::io::SeekFrom::Current(offset))
                                .map_err(NodeError::io("writing", path))?;
                        }
                    }
                }
                file.set_len(manifest.size)
                    .map_err(NodeError::io("writing", path))?;
                manifest.size
            }
        };
        self.progress.file_done(size);
        let totals = self.vault.counters();
        super::OperationCounters::count_file(&totals.export_files, &totals.export_bytes, size);
        Ok(OwnedFd::from(file))
    }
}

/// Where a file's bytes come from.
#[derive(Clone, Copy)]
enum FileBytes<'a> {
    Inline(&'a [u8]),
    Extents(&'a FileManifest),
}
