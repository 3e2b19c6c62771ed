//! Snapshot operations: branch, delete, diff, and garbage collection of what no snapshot
//! reaches any more.

use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt as _;

use forge_crypto::Cid;
use forge_store::VolumeId;
use forge_store::kv::{Column, Durability, WriteBatch, prefix_end};
use forge_store::object::{EntryContent, TreeEntry};

use super::check::for_each_entry;
use super::records::{self, keys};
use super::{OpenVolume, PassphraseSource, Vault, validate_name};
use crate::error::{NodeError, Result};

/// Deletions per write batch during gc.
const GC_DELETE_BATCH_KEYS: usize = 10_000;

/// Paths that differ between two snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotDiff {
    /// Present only in the second.
    pub added: Vec<String>,
    /// Present only in the first.
    pub removed: Vec<String>,
    /// Present in both with other content, kind or metadata.
    pub modified: Vec<String>,
}

/// What gc removed.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Objects removed.
    pub objects_removed: u64,
    /// Bytes of shard and object values removed.
    pub bytes_freed: u64,
    /// Bytes on disk before and after (after compaction reclaimed the space).
    pub disk_bytes_before: u64,
    /// Bytes on disk after.
    pub disk_bytes_after: u64,
}

impl Vault {
    /// Creates branch `new` at snapshot `from` (default: the head of `main`).
    ///
    /// # Errors
    /// Unknown names, an existing branch ([`NodeError::BranchMoved`]).
    pub fn create_branch(&self, name: &str, new: &str, from: Option<&str>) -> Result<Cid> {
        validate_name("branch name", new)?;
        let record = self.require_volume(name)?;
        let volume_id = VolumeId::from_bytes(record.id);
        let target = match from {
            Some(id) => self.resolve_snapshot(&record, id)?,
            None => self
                .refs()
                .get_ref(&volume_id, super::DEFAULT_BRANCH)?
                .ok_or_else(|| NodeError::UnknownBranch {
                    volume: name.to_owned(),
                    branch: super::DEFAULT_BRANCH.to_owned(),
                })?,
        };
        self.refs()
            .compare_and_swap_ref(&volume_id, new, None, Some(target))?;
        Ok(target)
    }

    /// Removes a snapshot from its volume's listing (its data goes at the next gc). A
    /// snapshot that a branch points at is refused.
    ///
    /// # Errors
    /// Unknown names; [`NodeError::InvalidArgument`] for a branch head.
    pub fn delete_snapshot(&self, name: &str, id: &str) -> Result<Cid> {
        let record = self.require_volume(name)?;
        let snapshot = self.resolve_snapshot(&record, id)?;
        let heads: Vec<String> = self
            .refs()
            .list_refs(&VolumeId::from_bytes(record.id))?
            .into_iter()
            .filter(|(_, head)| *head == snapshot)
            .map(|(branch, _)| branch)
            .collect();
        if !heads.is_empty() {
            return Err(NodeError::InvalidArgument {
                what: "snapshot",
                value: snapshot.to_hex(),
                reason: format!(
                    "it is the head of branch {}; import onto it or delete the branch first",
                    heads.join(", ")
                ),
            });
        }
        let mut batch = WriteBatch::new();
        batch.delete(
            Column::Meta,
            keys::key(keys::SNAPSHOT, &[&record.id, snapshot.as_bytes()]),
        );
        batch.delete(
            Column::Meta,
            keys::key(keys::INDEX_HEAD, &[&record.id, snapshot.as_bytes()]),
        );
        self.kv().write(batch, Durability::Synced)?;
        Ok(snapshot)
    }

    /// Paths added, removed and modified from snapshot `a` to snapshot `b`. Subtrees with
    /// equal cids are skipped, so the work is proportional to the difference.
    ///
    /// # Errors
    /// Unknown names, integrity errors.
    pub fn diff_snapshots(
        &self,
        name: &str,
        a: &str,
        b: &str,
        passphrase: PassphraseSource<'_>,
    ) -> Result<SnapshotDiff> {
        let volume = self.open_volume(name, passphrase)?;
        let (first, second) = (
            self.resolve_snapshot(&volume.record, a)?,
            self.resolve_snapshot(&volume.record, b)?,
        );
        let (first, second) = (
            self.read_commit(&volume, &first)?,
            self.read_commit(&volume, &second)?,
        );
        let mut diff = SnapshotDiff::default();
        self.diff_trees(
            &volume,
            Some(Cid::from_bytes(first.root)),
            Some(Cid::from_bytes(second.root)),
            "",
            &mut diff,
        )?;
        Ok(diff)
    }

    fn diff_trees(
        &self,
        volume: &OpenVolume,
        a: Option<Cid>,
        b: Option<Cid>,
        prefix: &str,
        diff: &mut SnapshotDiff,
    ) -> Result<()> {
        if a == b {
            return Ok(());
        }
        let entries = |tree: Option<Cid>| -> Result<Vec<TreeEntry>> {
            Ok(match tree {
                Some(cid) => self.read_object(volume, &cid)?.into_tree()?.entries,
                None => Vec::new(),
            })
        };
        let (left, right) = (entries(a)?, entries(b)?);
        let (mut left, mut right) = (left.into_iter().peekable(), right.into_iter().peekable());
        loop {
            let order = match (left.peek(), right.peek()) {
                (None, None) => return Ok(()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(l), Some(r)) => l.name.cmp(&r.name),
            };
            match order {
                std::cmp::Ordering::Less => {
                    let entry = left.next().expect("peeked");
                    self.diff_side(volume, &entry, prefix, diff, false)?;
                }
                std::cmp::Ordering::Greater => {
                    let entry = right.next().expect("peeked");
                    self.diff_side(volume, &entry, prefix, diff, true)?;
                }
                std::cmp::Ordering::Equal => {
                    let (l, r) = (left.next().expect("peeked"), right.next().expect("peeked"));
                    let path = join(prefix, &l.name);
                    match (&l.content, &r.content) {
                        (
                            EntryContent::Directory { tree: lt },
                            EntryContent::Directory { tree: rt },
                        ) => {
                            if l.mode != r.mode {
                                diff.modified.push(format!("{path}/"));
                            }
                            self.diff_trees(
                                volume,
                                Some(Cid::from_bytes(*lt)),
                                Some(Cid::from_bytes(*rt)),
                                &path,
                                diff,
                            )?;
                        }
                        _ if l == r => {}
                        _ => diff.modified.push(path),
                    }
                }
            }
        }
    }

    fn diff_side(
        &self,
        volume: &OpenVolume,
        entry: &TreeEntry,
        prefix: &str,
        diff: &mut SnapshotDiff,
        added: bool,
    ) -> Result<()> {
        let path = join(prefix, &entry.name);
        if let EntryContent::Directory { tree } = &entry.content {
            let (a, b) = if added {
                (None, Some(Cid::from_bytes(*tree)))
            } else {
                (Some(Cid::from_bytes(*tree)), None)
            };
            (if added {
                &mut diff.added
            } else {
                &mut diff.removed
            })
            .push(format!("{path}/"));
            return self.diff_trees(volume, a, b, &path, diff);
        }
        (if added {
            &mut diff.added
        } else {
            &mut diff.removed
        })
        .push(path);
        Ok(())
    }

    /// Removes every chunk and object that no branch and no listed snapshot reaches, then
    /// compacts so the space is really returned to the filesystem.
    ///
    /// Safe against a crash at any point: deletions only remove unreachable data, and an
    /// import never trusts the dedup index without checking that the chunk is still there.
    /// Concurrent imports cannot interleave: one process owns the data directory.
    ///
    /// # Errors
    /// [`NodeError::InvalidArgument`] when an encrypted volume's keys are not at hand (its
    /// snapshots cannot be walked, so nothing could be collected safely); engine errors.
    pub fn gc(&self, passphrase: PassphraseSource<'_>) -> Result<GcReport> {
        let disk_bytes_before = self.vault_stats()?.physical_bytes;
        let mut live_objects = BTreeSet::new();
        let mut live_chunks = BTreeSet::new();
        for record in self.list_volumes()? {
            let volume = self
                .open_volume(&record.name, passphrase)
                .map_err(|error| NodeError::InvalidArgument {
                    what: "gc",
                    value: record.name.clone(),
                    reason: format!(
                        "cannot open this volume's keys, so its data cannot be traced: {error}"
                    ),
                })?;
            let mut roots: BTreeSet<Cid> = self
                .snapshot_listings(&record)?
                .into_iter()
                .map(|(cid, _)| cid)
                .collect();
            roots.extend(
                self.refs()
                    .list_refs(&volume.id)?
                    .into_iter()
                    .map(|(_, cid)| cid),
            );
            let mut trees = Vec::new();
            for snapshot in roots {
                live_objects.insert(snapshot);
                let (_, index_nodes) = self.walk_index(&record, &snapshot)?;
                live_objects.extend(index_nodes);
                trees.push(Cid::from_bytes(self.read_commit(&volume, &snapshot)?.root));
            }
            // A mount's working state left by a crash is recovered by the next mount: what
            // it reaches is live too.
            let prefix = keys::key(keys::WORKING_STATE, &[volume.id.as_bytes()]);
            let end = prefix_end(&prefix);
            for (_, value) in self
                .kv()
                .scan(Column::Meta, &prefix, end.as_deref(), usize::MAX)?
            {
                let state: records::WorkingState = records::decode("working state", &value)?;
                trees.push(Cid::from_bytes(state.root));
            }
            for tree in trees {
                self.walk_tree(&volume, tree, &mut live_objects, &mut |_, chunk| {
                    live_chunks.insert(chunk.cid());
                    Ok(())
                })?;
            }
        }
        let mut report = GcReport {
            disk_bytes_before,
            ..GcReport::default()
        };
        // Dedup index entries first: after a crash between the steps, the index may lack an
        // entry for a live chunk (costs a re-seal) but never names a removed one unchecked.
        let mut doomed: Vec<(Column, Vec<u8>)> = Vec::new();
        for_each_entry(self.kv(), Column::Meta, |key, value| {
            if key.starts_with(keys::DEDUP)
                && Cid::from_slice(value).map_or(true, |cid| !live_chunks.contains(&cid))
            {
                doomed.push((Column::Meta, key.to_vec()));
            }
        })?;
        self.delete_all(&mut doomed)?;
        for_each_entry(self.kv(), Column::Objects, |key, value| {
            if Cid::from_slice(key).map_or(true, |cid| !live_objects.contains(&cid)) {
                report.objects_removed += 1;
                report.bytes_freed += value.len() as u64;
                doomed.push((Column::Objects, key.to_vec()));
            }
        })?;
        let mut previous: Option<Cid> = None;
        for_each_entry(self.kv(), Column::Shards, |key, value| {
            let cid = Cid::from_slice(&key[..key.len().min(32)]).ok();
            if cid.is_some_and(|cid| live_chunks.contains(&cid)) {
                return;
            }
            if cid != previous {
                report.chunks_removed += 1;
                previous = cid;
            }
            report.bytes_freed += value.len() as u64;
            doomed.push((Column::Shards, key.to_vec()));
        })?;
        self.delete_all(&mut doomed)?;
        self.kv().compact(Column::Shards)?;
        self.kv().compact(Column::Objects)?;
        self.kv().compact(Column::Meta)?;
        report.disk_bytes_after = self.vault_stats()?.physical_bytes;
        Ok(report)
    }

    fn delete_all(&self, doomed: &mut Vec<(Column, Vec<u8>)>) -> Result<()> {
        for keys in doomed.chunks(GC_DELETE_BATCH_KEYS) {
            let mut batch = WriteBatch::new();
            for (column, key) in keys {
                batch.delete(*column, key.clone());
            }
            self.kv().write(batch, Durability::Synced)?;
        }
        doomed.clear();
        Ok(())
    }
}

fn join(prefix: &str, name: &[u8]) -> String {
    let name = std::ffi::OsStr::from_bytes(name).to_string_lossy();
    if prefix.is_empty() {
        name.into_owned()
    } else {
        format!("{prefix}/{name}")
    }
}
