//! The typed API: every operation once, with typed requests and replies (the messages of
//! `proto/forge/v1/*.proto`). The CLI calls it through [`LocalApi`] in its own process
//! when no daemon owns the data directory, and through `remote::RemoteApi` on the
//! control socket when one does; the daemon serves the socket with the same
//! [`LocalApi`] over its open vault. So a reply is the same whichever way it came, and
//! the CLI renders it the same way (`render_*`).
//!
//! Layering: this module uses the vault and nothing above it; the daemon (`daemon/`) and
//! the CLI (`cli/`) use it. `client` is the control socket's client side, `remote` the
//! typed calls over it.

pub mod client;
pub mod cluster;
pub mod mesh;
pub mod remote;
mod render;
pub mod trust;

pub use render::{
    FSCK_PROBLEMS_SHOWN, describe_stop, render_branch, render_commit, render_create, render_delete,
    render_export, render_fsck, render_gc, render_import, render_list, render_node_status,
    render_scrub, render_snapshots, render_stats, render_vault_stats,
};

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use forge_crypto::Cid;
use forge_proto::v1::{
    ColumnStats, CommitReply, CommitRequest, CreateBranchReply, CreateBranchRequest,
    CreateVolumeReply, CreateVolumeRequest, DeleteSnapshotReply, DeleteSnapshotRequest,
    DiffRequest, EntryNote, ExportReply, ExportRequest, FsckReply, FsckRequest, GcReply, GcRequest,
    ImportReply, ImportRequest, KeysNotOpened, ListSnapshotsReply, ListSnapshotsRequest,
    ListVolumesReply, ListVolumesRequest, MountInfo, NodeStatusReply, NodeStatusRequest,
    ScrubReply, ScrubRequest, SnapshotInfo, StopNodeReply, StopNodeRequest, VaultStatsReply,
    VaultStatsRequest, VolumeInfo, VolumeStatsReply, VolumeStatsRequest,
};
use forge_store::erasure::ErasureLayout;
use serde_json::json;

use crate::clock::format_utc_time;
use crate::error::{IntegrityFault, NodeError, Result};
use crate::output::Output;
use crate::progress::{Progress, human_bytes};
use crate::vault::export::SnapshotSelector;
use crate::vault::records::VolumeRecord;
use crate::vault::snapshots::DiffChange;
use crate::vault::{
    CreateVolumeOptions, DEFAULT_BRANCH, ExportOptions, ImportOptions, PassphraseSource, Vault,
};

/// Calls on volumes (`forge.v1.Volume`).
pub trait VolumeService {
    /// Every volume, by name.
    ///
    /// # Errors
    /// Storage errors.
    fn list(&self, request: ListVolumesRequest) -> Result<ListVolumesReply>;

    /// Creates a volume.
    ///
    /// # Errors
    /// A taken or invalid name, a bad layout or domain, storage errors.
    fn create(&self, request: CreateVolumeRequest) -> Result<CreateVolumeReply>;

    /// A volume's numbers.
    ///
    /// # Errors
    /// An unknown volume, keys that do not open, storage errors.
    fn stats(&self, request: VolumeStatsRequest) -> Result<VolumeStatsReply>;

    /// Imports a directory as a new snapshot, counting files and bytes into `progress` as
    /// it goes (and its totals, if the request asks for them to be counted).
    ///
    /// # Errors
    /// A relative or unreadable source, an unknown volume, a branch moved meanwhile,
    /// storage errors (nothing is published then).
    fn import(&self, request: ImportRequest, progress: &Progress) -> Result<ImportReply>;

    /// Writes a snapshot into an empty or absent directory, counting into `progress`
    /// (whose totals are the snapshot's, known from its commit).
    ///
    /// # Errors
    /// A relative or non-empty destination, unknown names, I/O errors, integrity errors
    /// naming what failed verification (nothing unverified is written).
    fn export(&self, request: ExportRequest, progress: &Progress) -> Result<ExportReply>;
}

/// Calls on a volume's snapshots and branches (`forge.v1.Snapshot`).
pub trait SnapshotService {
    /// A volume's snapshots, oldest first.
    ///
    /// # Errors
    /// An unknown volume, keys that do not open, integrity errors.
    fn list(&self, request: ListSnapshotsRequest) -> Result<ListSnapshotsReply>;

    /// Makes a branch at a snapshot.
    ///
    /// # Errors
    /// An unknown volume or snapshot, a branch that exists, storage errors.
    fn branch(&self, request: CreateBranchRequest) -> Result<CreateBranchReply>;

    /// Deletes a snapshot no branch stands on.
    ///
    /// # Errors
    /// An unknown volume or snapshot, a snapshot that is a branch's head.
    fn delete(&self, request: DeleteSnapshotRequest) -> Result<DeleteSnapshotReply>;

    /// Gives `each` every path that differs between two snapshots, in path order (a
    /// directory as `path/`, before what is below it), as it is found.
    ///
    /// # Errors
    /// Unknown names, integrity errors.
    fn diff(&self, request: DiffRequest, each: &mut dyn FnMut(DiffChange, &str)) -> Result<()>;
}

/// The calls both transports serve (in this process over an open vault, or on a daemon's
/// control socket): what the CLI runs a vault command on. (The mesh's network calls are
/// served only by a daemon; in this process they say to start one.)
pub trait Api:
    VolumeService + SnapshotService + MaintenanceService + mesh::MeshService + trust::TrustService
{
}

impl<
    T: VolumeService + SnapshotService + MaintenanceService + mesh::MeshService + trust::TrustService,
> Api for T
{
}

/// Calls on the whole vault (`forge.v1.Maintenance`).
pub trait MaintenanceService {
    /// Verifies every object, shard and reference: the report, problems included.
    /// `progress` counts the items checked (objects, chunks, snapshots) and their bytes.
    ///
    /// # Errors
    /// Storage errors (what was found is the reply).
    fn fsck(&self, request: FsckRequest, progress: &Progress) -> Result<FsckReply>;

    /// Removes what no snapshot reaches (fenced against concurrent writers). `progress`
    /// counts the entries swept.
    ///
    /// # Errors
    /// Keys that do not open, storage errors.
    fn gc(&self, request: GcRequest, progress: &Progress) -> Result<GcReply>;

    /// Verifies every chunk's shards, rebuilding damaged ones from parity if asked.
    /// `progress` counts chunks checked against their total.
    ///
    /// # Errors
    /// Storage errors (unrecoverable chunks are in the reply).
    fn scrub(&self, request: ScrubRequest, progress: &Progress) -> Result<ScrubReply>;

    /// The vault's numbers.
    ///
    /// # Errors
    /// Storage errors.
    fn stats(&self, request: VaultStatsRequest) -> Result<VaultStatsReply>;
}

/// Calls on the daemon itself (`forge.v1.Node`): only a running daemon or mount host
/// answers them (control.rs), so there is no in-process implementation.
pub trait NodeService {
    /// What the process is and serves.
    ///
    /// # Errors
    /// Storage errors reading the volume list.
    fn status(&self, request: NodeStatusRequest) -> Result<NodeStatusReply>;

    /// Starts stopping: every mount is unmounted and committed, then the process exits.
    ///
    /// # Errors
    /// Only a transport's.
    fn stop(&self, request: StopNodeRequest) -> Result<StopNodeReply>;
}

/// Calls on the mounts a daemon serves (`forge.v1.Mount`): only that process answers
/// them (control.rs); with none, nothing is mounted and there is nothing to commit.
pub trait MountService {
    /// Commits the working tree of each read-write mount of a volume as a snapshot.
    ///
    /// # Errors
    /// The volume is not mounted read-write here; storage errors.
    fn commit(&self, request: CommitRequest) -> Result<CommitReply>;
}

/// The calls served by an open vault in this process.
pub struct LocalApi<'a> {
    /// The vault.
    pub vault: &'a Vault,
    /// Where a passphrase comes from when a volume's keys need one.
    pub passphrase: PassphraseSource<'a>,
}

impl std::fmt::Debug for LocalApi<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LocalApi")
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

impl VolumeService for LocalApi<'_> {
    fn list(&self, _request: ListVolumesRequest) -> Result<ListVolumesReply> {
        Ok(ListVolumesReply {
            volumes: self.vault.list_volumes()?.iter().map(volume_info).collect(),
        })
    }

    fn create(&self, request: CreateVolumeRequest) -> Result<CreateVolumeReply> {
        let layout = match (request.data_shards, request.parity_shards) {
            (0, 0) => None,
            (data, parity) => Some(ErasureLayout::new(data as usize, parity as usize).map_err(
                |error| NodeError::InvalidArgument {
                    what: "erasure layout",
                    value: format!("{data}+{parity}"),
                    reason: error.to_string(),
                },
            )?),
        };
        let options = CreateVolumeOptions {
            layout,
            domain: (!request.domain.is_empty()).then_some(request.domain),
            chunk_avg_bytes: (request.chunk_avg_bytes != 0).then_some(request.chunk_avg_bytes),
            encrypted: request.encrypted,
        };
        let record = self
            .vault
            .create_volume(&request.name, &options, self.passphrase)?;
        Ok(CreateVolumeReply {
            volume: Some(volume_info(&record)),
        })
    }

    fn import(&self, request: ImportRequest, progress: &Progress) -> Result<ImportReply> {
        let source = absolute_path("source", request.source)?;
        let branch = if request.branch.is_empty() {
            DEFAULT_BRANCH.to_owned()
        } else {
            request.branch
        };
        let options = ImportOptions {
            message: request.message,
            branch: branch.clone(),
            dna: request.dna.into_iter().collect(),
            atime: request.atime,
        };
        // A second thread counts what the import will read, so progress can show the
        // share done and an ETA (it stops when the import ends).
        let counted = std::sync::atomic::AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            if request.count_totals {
                scope.spawn(|| {
                    if let Some((files, bytes)) = crate::progress::count_tree(&source, &counted) {
                        progress.set_expected(files, bytes);
                    }
                });
            }
            let result = self.vault.import(
                &request.volume,
                &source,
                &options,
                self.passphrase,
                progress,
            );
            counted.store(true, std::sync::atomic::Ordering::Relaxed);
            result
        });
        let mut report = result?;
        report.skipped.sort();
        report.incomplete.sort();
        Ok(ImportReply {
            snapshot: report.snapshot.as_bytes().to_vec(),
            branch,
            files: report.files,
            logical_bytes: report.logical_bytes,
            new_chunks: report.new_chunks,
            reused_chunks: report.reused_chunks,
            written_bytes: report.written_bytes,
            elapsed_seconds: report.elapsed_seconds,
            skipped: entry_notes(report.skipped),
            incomplete: entry_notes(report.incomplete),
        })
    }

    fn export(&self, request: ExportRequest, progress: &Progress) -> Result<ExportReply> {
        let destination = absolute_path("destination", request.destination)?;
        let selector = if request.snapshot.is_empty() {
            SnapshotSelector::Branch(if request.branch.is_empty() {
                DEFAULT_BRANCH.to_owned()
            } else {
                request.branch
            })
        } else {
            SnapshotSelector::Id(request.snapshot)
        };
        let options = ExportOptions {
            numeric_owner: request.numeric_owner,
        };
        let mut report = self.vault.export(
            &request.volume,
            &destination,
            &selector,
            &options,
            self.passphrase,
            progress,
        )?;
        report.not_restored.sort();
        Ok(ExportReply {
            snapshot: report.snapshot.as_bytes().to_vec(),
            destination: destination.into_os_string().into_vec(),
            files: report.files,
            bytes: report.bytes,
            elapsed_seconds: report.elapsed_seconds,
            owners_not_restored: report.owners_not_restored,
            not_restored: entry_notes(report.not_restored),
        })
    }

    fn stats(&self, request: VolumeStatsRequest) -> Result<VolumeStatsReply> {
        let record = self.vault.require_volume(&request.name)?;
        // A zero-knowledge copy: what its reference indexes tell (no plaintext ratios).
        let stats = if self.vault.holds_volume_keys(&record)? {
            self.vault.volume_stats(&request.name, self.passphrase)?
        } else {
            self.vault.volume_stats_keyless(&request.name)?
        };
        Ok(VolumeStatsReply {
            logical_bytes: stats.logical_bytes,
            stored_bytes: stats.stored_bytes,
            unique_chunks: stats.unique_chunks,
            dedup_ratio: stats.dedup_ratio,
            compression_ratio: stats.compression_ratio,
            snapshots: stats.snapshots,
        })
    }
}

impl SnapshotService for LocalApi<'_> {
    fn list(&self, request: ListSnapshotsRequest) -> Result<ListSnapshotsReply> {
        let snapshots = self
            .vault
            .list_snapshots(&request.volume, self.passphrase)?;
        Ok(ListSnapshotsReply {
            snapshots: snapshots
                .into_iter()
                .map(|snapshot| SnapshotInfo {
                    id: snapshot.id.as_bytes().to_vec(),
                    parents: snapshot
                        .parents
                        .iter()
                        .map(|parent| parent.as_bytes().to_vec())
                        .collect(),
                    time_ns: snapshot.time_ns,
                    message: snapshot.message,
                    branches: snapshot.branches,
                    logical_bytes: snapshot.logical_bytes,
                    files: snapshot.file_count,
                    dna: snapshot.dna.into_iter().collect(),
                    author: snapshot.author.to_vec(),
                })
                .collect(),
        })
    }

    fn branch(&self, request: CreateBranchRequest) -> Result<CreateBranchReply> {
        let from = (!request.from.is_empty()).then_some(request.from.as_str());
        let target = self
            .vault
            .create_branch(&request.volume, &request.branch, from)?;
        Ok(CreateBranchReply {
            snapshot: target.as_bytes().to_vec(),
        })
    }

    fn diff(&self, request: DiffRequest, each: &mut dyn FnMut(DiffChange, &str)) -> Result<()> {
        self.vault.diff_snapshots_each(
            &request.volume,
            (&request.from, &request.to),
            self.passphrase,
            each,
        )
    }

    fn delete(&self, request: DeleteSnapshotRequest) -> Result<DeleteSnapshotReply> {
        let snapshot = self
            .vault
            .delete_snapshot(&request.volume, &request.snapshot)?;
        Ok(DeleteSnapshotReply {
            snapshot: snapshot.as_bytes().to_vec(),
        })
    }
}

impl MaintenanceService for LocalApi<'_> {
    fn fsck(&self, request: FsckRequest, progress: &Progress) -> Result<FsckReply> {
        let report = self
            .vault
            .fsck(request.use_passphrase.then_some(self.passphrase), progress)?;
        Ok(FsckReply {
            objects_checked: report.objects_checked,
            chunks_checked: report.chunks_checked,
            snapshots_checked: report.snapshots_checked,
            problems: report
                .problems
                .into_iter()
                .map(|problem| forge_proto::v1::FsckProblem {
                    volume: problem.volume,
                    snapshot: problem.snapshot,
                    detail: problem.detail,
                })
                .collect(),
            repairable_shards: report.repairable_shards,
            skipped_volumes: report.skipped_volumes,
            keys_not_opened: report
                .keys_not_opened
                .into_iter()
                .map(|(volume, reason)| KeysNotOpened { volume, reason })
                .collect(),
        })
    }

    fn gc(&self, _request: GcRequest, progress: &Progress) -> Result<GcReply> {
        let report = self.vault.gc(self.passphrase, progress)?;
        Ok(GcReply {
            chunks_removed: report.chunks_removed,
            objects_removed: report.objects_removed,
            bytes_freed: report.bytes_freed,
            disk_bytes_before: report.disk_bytes_before,
            disk_bytes_after: report.disk_bytes_after,
        })
    }

    fn scrub(&self, request: ScrubRequest, progress: &Progress) -> Result<ScrubReply> {
        let report = self.vault.scrub(request.repair, progress)?;
        Ok(ScrubReply {
            chunks_checked: report.chunks_checked,
            damaged_shards: report.damaged_shards,
            repaired_shards: report.repaired_shards,
            unrecoverable: report.unrecoverable,
        })
    }

    fn stats(&self, _request: VaultStatsRequest) -> Result<VaultStatsReply> {
        let stats = self.vault.vault_stats()?;
        Ok(VaultStatsReply {
            physical_bytes: stats.physical_bytes,
            volumes: stats.volumes,
            columns: stats
                .columns
                .into_iter()
                .map(|(name, usage)| ColumnStats {
                    name: name.to_owned(),
                    keys: usage.keys,
                    table_bytes: usage.table_bytes,
                    blob_bytes: usage.blob_bytes,
                    pending_compaction_bytes: usage.pending_compaction_bytes,
                })
                .collect(),
        })
    }
}

/// A path from a request: absolute, or refused (whoever serves the call has a working
/// directory of its own; the CLI makes its paths absolute before calling).
pub(crate) fn absolute_path(what: &'static str, bytes: Vec<u8>) -> Result<PathBuf> {
    let path = PathBuf::from(OsString::from_vec(bytes));
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(NodeError::InvalidArgument {
            what,
            value: path.display().to_string(),
            reason: "the service takes absolute paths only (the CLI makes them so)".into(),
        })
    }
}

/// Entries with what happened to each, as a reply carries them.
fn entry_notes(entries: Vec<(PathBuf, String)>) -> Vec<EntryNote> {
    entries
        .into_iter()
        .map(|(path, reason)| EntryNote {
            path: path.into_os_string().into_vec(),
            reason,
        })
        .collect()
}

/// A snapshot id from a reply (32 bytes).
///
/// # Errors
/// Another length: a reply that breaks the API.
fn reply_cid(bytes: &[u8]) -> Result<Cid> {
    <[u8; 32]>::try_from(bytes)
        .map(Cid::from_bytes)
        .map_err(|_| NodeError::InvalidArgument {
            what: "reply",
            value: format!("{} bytes", bytes.len()),
            reason: "a snapshot id is 32 bytes".into(),
        })
}

/// A volume record as the API shows it.
#[must_use]
pub fn volume_info(record: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        name: record.name.clone(),
        id: record.id.to_vec(),
        data_shards: u32::from(record.data_shards),
        parity_shards: u32::from(record.parity_shards),
        domain: record.domain.clone(),
        encrypted: record.encrypted,
    }
}
