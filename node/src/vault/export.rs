//! Export: a snapshot becomes a directory tree again, byte-exact, with permission bits,
//! mtimes, symlinks (not followed) and any names. Every chunk is verified against its cid
//! (and rebuilt from parity when a shard is damaged) before a byte of it is written.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use filetime::FileTime;
use forge_crypto::Cid;
use forge_crypto::seal;
use forge_store::chunkstore::read_chunk;
use forge_store::object::{ChunkRef, EntryContent, Extent, FileManifest, TreeEntry};
use nix::sys::stat::{Mode, SFlag};
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
        exporter.export_tree(&Cid::from_bytes(commit.root), destination)?;
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

impl Exporter<'_> {
    fn export_tree(&self, tree: &Cid, directory: &Path) -> Result<()> {
        let entries = self.vault.read_tree(self.volume, tree)?;
        entries.par_iter().try_for_each(|entry| {
            self.export_entry(entry, &directory.join(OsStr::from_bytes(&entry.name)))
        })
    }

    fn export_entry(&self, entry: &TreeEntry, path: &Path) -> Result<()> {
        let mtime = FileTime::from_unix_time(
            entry.mtime_ns.div_euclid(1_000_000_000),
            u32::try_from(entry.mtime_ns.rem_euclid(1_000_000_000)).unwrap_or(0),
        );
        match &entry.content {
            EntryContent::Directory { tree } => {
                fs::create_dir(path).map_err(NodeError::io("creating", path))?;
                self.export_tree(&Cid::from_bytes(*tree), path)?;
                // Permissions and times last: writing the children changed the mtime, and a
                // read-only directory must still receive its children first.
                fs::set_permissions(path, Permissions::from_mode(entry.mode))
                    .map_err(NodeError::io("setting permissions of", path))?;
                filetime::set_file_mtime(path, mtime)
                    .map_err(NodeError::io("setting mtime of", path))?;
            }
            EntryContent::Symlink { target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), path)
                    .map_err(NodeError::io("creating symlink", path))?;
                filetime::set_symlink_file_times(path, mtime, mtime)
                    .map_err(NodeError::io("setting mtime of", path))?;
            }
            EntryContent::InlineFile(manifest) => {
                self.write_file(FileBytes::Extents(manifest), path, entry.mode, mtime)?
            }
            EntryContent::InlineData(data) => {
                self.write_file(FileBytes::Inline(data), path, entry.mode, mtime)?
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
                self.write_file(FileBytes::Extents(&manifest), path, entry.mode, mtime)?;
            }
            EntryContent::Fifo
            | EntryContent::CharDevice { .. }
            | EntryContent::BlockDevice { .. } => {
                let (kind, device) = match entry.content {
                    EntryContent::CharDevice { major, minor } => (
                        SFlag::S_IFCHR,
                        nix::sys::stat::makedev(major.into(), minor.into()),
                    ),
                    EntryContent::BlockDevice { major, minor } => (
                        SFlag::S_IFBLK,
                        nix::sys::stat::makedev(major.into(), minor.into()),
                    ),
                    _ => (SFlag::S_IFIFO, 0),
                };
                nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(entry.mode), device)
                    .map_err(|errno| {
                        NodeError::io("creating special file", path)(std::io::Error::from(errno))
                    })?;
                fs::set_permissions(path, Permissions::from_mode(entry.mode))
                    .map_err(NodeError::io("setting permissions of", path))?;
                filetime::set_file_mtime(path, mtime)
                    .map_err(NodeError::io("setting mtime of", path))?;
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
        path: &Path,
        mode: u32,
        mtime: FileTime,
    ) -> Result<()> {
        let mut file: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(NodeError::io("creating", path))?;
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
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(NodeError::io("setting permissions of", path))?;
        filetime::set_file_handle_times(&file, Some(mtime), Some(mtime))
            .map_err(NodeError::io("setting mtime of", path))?;
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
