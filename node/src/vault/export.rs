//! Export: a snapshot becomes a directory tree again, byte-exact, with permission bits,
//! mtimes, symlinks (not followed) and any names. Every chunk is verified against its cid
//! (and rebuilt from parity when a shard is damaged) before a byte of it is written.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use forge_crypto::Cid;
use forge_crypto::seal;
use forge_store::chunkstore::read_chunk;
use forge_store::object::{ChunkRef, EntryContent, Extent, FileManifest, TreeEntry};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, futimens, makedev, mkdirat,
    mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::symlinkat;
use rayon::prelude::*;

use super::{CHUNK_AAD, OpenVolume, PassphraseSource, Vault};
use crate::error::{NodeError, Result};
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
    /// Wall time.
    pub elapsed_seconds: f64,
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
        let read = read_chunk(self.kv(), &cid)?;
        let plaintext = seal::open(&chunk.key, &read.ciphertext, CHUNK_AAD, chunk.len as usize)
            .map_err(|error| NodeError::Integrity(format!("chunk {cid}: {error}")))?;
        if plaintext.len() != chunk.len as usize {
            return Err(NodeError::Integrity(format!(
                "chunk {cid} has {} bytes, its manifest says {}",
                plaintext.len(),
                chunk.len
            )));
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
        passphrase: PassphraseSource<'_>,
        progress: &Progress,
    ) -> Result<ExportReport> {
        let snapshot = self.select_snapshot(name, selector)?;
        let volume = self.open_volume(name, passphrase)?;
        let commit = self.read_commit(&volume, &snapshot)?;
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
        };
        let root = openat(
            nix::fcntl::AT_FDCWD,
            destination,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(at_error("opening", destination))?;
        // In the vault's pool: its threads' stacks are sized for the deepest tree.
        self.in_pool(|| exporter.export_tree(&Cid::from_bytes(commit.root), &root, destination))?;
        let (files, bytes) = progress.totals();
        Ok(ExportReport {
            snapshot,
            files,
            bytes,
            elapsed_seconds: progress.elapsed().as_secs_f64(),
        })
    }
}

struct Exporter<'a> {
    vault: &'a Vault,
    volume: &'a OpenVolume,
    progress: &'a Progress,
}

/// An errno from a `*at` call as the I/O error of `action` on `path`.
fn at_error(action: &'static str, path: &Path) -> impl FnOnce(nix::errno::Errno) -> NodeError {
    let path = path.to_owned();
    move |errno| NodeError::io(action, &path)(std::io::Error::from(errno))
}

/// Sets the access and modification times of `name` in `parent` (a symlink itself, never
/// what it points to).
fn set_mtime_at(parent: &OwnedFd, name: &OsStr, mtime: &TimeSpec, path: &Path) -> Result<()> {
    utimensat(parent, name, mtime, mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(at_error("setting mtime of", path))
}

fn timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

impl Exporter<'_> {
    /// Writes the entries of `tree` into the directory open as `directory` (shown as
    /// `path`). Everything is created relative to its parent's descriptor (mkdirat,
    /// openat, symlinkat, mknodat), so the depth of a tree never meets the path limit.
    fn export_tree(&self, tree: &Cid, directory: &OwnedFd, path: &Path) -> Result<()> {
        let entries = self.vault.read_tree(self.volume, tree)?;
        entries.par_iter().try_for_each(|entry| {
            self.export_entry(entry, directory, &path.join(OsStr::from_bytes(&entry.name)))
        })
    }

    fn export_entry(&self, entry: &TreeEntry, parent: &OwnedFd, path: &Path) -> Result<()> {
        let name = OsStr::from_bytes(&entry.name);
        let mtime = timespec(entry.mtime_ns);
        let mode = Mode::from_bits_truncate(entry.mode);
        match &entry.content {
            EntryContent::Directory { tree } => {
                mkdirat(parent, name, Mode::from_bits_truncate(0o700))
                    .map_err(at_error("creating", path))?;
                let directory = openat(
                    parent,
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(at_error("opening", path))?;
                self.export_tree(&Cid::from_bytes(*tree), &directory, path)?;
                // Permissions and times last: writing the children changed the mtime, and a
                // read-only directory must still receive its children first.
                fchmod(&directory, mode).map_err(at_error("setting permissions of", path))?;
                futimens(&directory, &mtime, &mtime).map_err(at_error("setting mtime of", path))?;
            }
            EntryContent::Symlink { target } => {
                symlinkat(OsStr::from_bytes(target), parent, name)
                    .map_err(at_error("creating symlink", path))?;
                set_mtime_at(parent, name, &mtime, path)?;
            }
            EntryContent::InlineFile(manifest) => self.write_file(
                FileBytes::Extents(manifest),
                parent,
                name,
                path,
                mode,
                mtime,
            )?,
            EntryContent::InlineData(data) => {
                self.write_file(FileBytes::Inline(data), parent, name, path, mode, mtime)?
            }
            EntryContent::File { manifest } => {
                let manifest = self
                    .vault
                    .read_manifest(self.volume, &Cid::from_bytes(*manifest))?;
                if manifest.size != entry.size {
                    return Err(NodeError::Integrity(format!(
                        "manifest of {} does not match its entry's size",
                        path.display()
                    )));
                }
                self.write_file(
                    FileBytes::Extents(&manifest),
                    parent,
                    name,
                    path,
                    mode,
                    mtime,
                )?;
            }
            EntryContent::Fifo
            | EntryContent::CharDevice { .. }
            | EntryContent::BlockDevice { .. } => {
                let (kind, device) = match entry.content {
                    EntryContent::CharDevice { major, minor } => {
                        (SFlag::S_IFCHR, makedev(major.into(), minor.into()))
                    }
                    EntryContent::BlockDevice { major, minor } => {
                        (SFlag::S_IFBLK, makedev(major.into(), minor.into()))
                    }
                    _ => (SFlag::S_IFIFO, 0),
                };
                mknodat(parent, name, kind, mode, device)
                    .map_err(at_error("creating special file", path))?;
                // mknod applies the umask: set the bits exactly.
                fchmodat(parent, name, mode, FchmodatFlags::FollowSymlink)
                    .map_err(at_error("setting permissions of", path))?;
                set_mtime_at(parent, name, &mtime, path)?;
            }
            EntryContent::Socket => {
                // A socket is only a name: the process that listens on it makes it anew.
                tracing::info!(path = %path.display(), "socket entry not recreated");
            }
        }
        Ok(())
    }

    fn write_file(
        &self,
        content: FileBytes<'_>,
        parent: &OwnedFd,
        name: &OsStr,
        path: &Path,
        mode: Mode,
        mtime: TimeSpec,
    ) -> Result<()> {
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
        fchmod(&file, mode).map_err(at_error("setting permissions of", path))?;
        futimens(&file, &mtime, &mtime).map_err(at_error("setting mtime of", path))?;
        self.progress.file_done(size);
        Ok(())
    }
}

/// Where a file's bytes come from.
#[derive(Clone, Copy)]
enum FileBytes<'a> {
    Inline(&'a [u8]),
    Extents(&'a FileManifest),
}
