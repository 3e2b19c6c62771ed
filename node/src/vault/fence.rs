//! The gc fence: how gc runs while imports and mount commits are in flight, and never
//! removes what they are about to publish.
//!
//! Writers open a [`WriteSession`]. It is recorded as a pin in the metadata store
//! ([`RecordSpace::PINS`]: kind, volume, the gc epoch it started in) and registered here,
//! where it holds *claims*: every chunk and object cid the writer has staged or decided to
//! reuse, and *pinned roots*: snapshots or trees whose whole reach it serves (a mount's
//! base). The protocol, in the order each side takes its steps:
//!
//! - A writer claims a cid **before** it checks that the cid is stored (dedup) or stages
//!   it; a cid it found missing after claiming is written again.
//! - gc opens a sweep by moving the epoch ([`RecordSpace::GC`]) to the next odd value,
//!   marks from refs, listings, working states and every pinned root, then deletes in
//!   batches. Each batch is filtered against all claims under this fence's lock, and is
//!   redone after walking any root pinned since the mark. A session that ends during a
//!   sweep leaves its claims here until that sweep closes (the epoch moves to even),
//!   because its snapshot was not in the mark.
//! - A writer publishes (moves a ref) only if the epoch is the one it last validated
//!   against: when a sweep overlapped the session, it first checks that every cid its
//!   snapshot names is still stored, then publishes with "epoch unchanged" as a condition
//!   of the same atomic metadata update. With claims this check never fails; it is the
//!   release-mode guard that a bug elsewhere can never publish a snapshot naming missing
//!   data, and the part of the protocol that carries over to a replicated gc, whose writers
//!   may sit on other nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use forge_crypto::Cid;
use forge_store::VolumeId;
use forge_store::metadata::{
    Change, Expected, MetadataError, MetadataStore, RecordSpace, RecordUpdate,
};
use serde::{Deserialize, Serialize};

use super::records;
use crate::error::{NodeError, Result};

/// The key of gc's epoch in [`RecordSpace::GC`].
const EPOCH_KEY: &[u8] = b"epoch";

/// What a writer pins: the reach of a snapshot, or of a tree (a recovered working state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PinnedRoot {
    /// A snapshot commit: its trees and its reference index.
    Snapshot([u8; 32]),
    /// A root tree.
    Tree([u8; 32]),
}

/// A writer's pin as recorded in [`RecordSpace::PINS`] (versioned record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinRecord {
    /// What writes: "import", "mount".
    pub kind: String,
    /// The volume written.
    pub volume: [u8; 16],
    /// The node whose process holds the session.
    pub node: [u8; 32],
    /// The process holding it (a pin whose process is gone is stale).
    pub pid: u32,
    /// The gc epoch when the session started.
    pub started_epoch: u64,
}

/// Claims and pinned roots of every open session, and the sweep in progress.
#[derive(Debug)]
pub(crate) struct GcFence {
    metadata: Arc<dyn MetadataStore>,
    state: Mutex<FenceState>,
}

#[derive(Debug, Default)]
struct FenceState {
    next_session: u64,
    sessions: BTreeMap<u64, SessionState>,
    /// Whether a sweep is running in this process.
    sweeping: bool,
    /// Claims of sessions that ended (or were re-pinned) during the running sweep.
    retired: BTreeSet<Cid>,
    /// Held index nodes of sessions that ended during the running sweep.
    retired_index_nodes: BTreeSet<Cid>,
    /// Bumped whenever a root is pinned: a sweep that marked before must walk it.
    roots_generation: u64,
}

#[derive(Debug, Default)]
struct SessionState {
    claims: BTreeSet<Cid>,
    roots: Vec<(VolumeId, PinnedRoot)>,
    /// Reference index nodes a sync found held: their whole subtree is the session's
    /// (the sender skips it), so gc walks it as live.
    index_nodes: BTreeSet<Cid>,
}

impl GcFence {
    pub(crate) fn new(metadata: Arc<dyn MetadataStore>) -> Self {
        Self {
            metadata,
            state: Mutex::new(FenceState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// gc's current epoch (odd while a sweep runs).
    pub(crate) fn epoch(&self) -> Result<u64> {
        read_epoch(self.metadata.as_ref())
    }

    /// Forgets pins and closes a sweep left by a process that no longer runs. Only valid
    /// while holding the data directory's lock (no other process can be writing).
    pub(crate) fn recover(&self) -> Result<()> {
        let mut updates = Vec::new();
        for (key, _) in self.metadata.scan_records(RecordSpace::PINS, b"")? {
            updates.push(RecordUpdate::new(
                RecordSpace::PINS,
                key,
                Expected::Any,
                Change::Delete,
            ));
        }
        let epoch = self.epoch()?;
        if epoch % 2 == 1 {
            updates.push(epoch_update(epoch, epoch + 1));
        }
        if !updates.is_empty() {
            tracing::info!(
                pins = updates.len(),
                "cleared write pins and gc state an earlier process left"
            );
            self.metadata.apply(&updates)?;
        }
        Ok(())
    }

    /// Opens a write session on `volume`, recorded as a pin.
    pub(crate) fn open_session(
        self: &Arc<Self>,
        kind: &str,
        volume: VolumeId,
        node: [u8; 32],
    ) -> Result<WriteSession> {
        let id = {
            let mut state = self.lock();
            state.next_session += 1;
            let id = state.next_session;
            state.sessions.insert(id, SessionState::default());
            id
        };
        let started_epoch = self.epoch()?;
        let record = PinRecord {
            kind: kind.to_owned(),
            volume: *volume.as_bytes(),
            node,
            pid: std::process::id(),
            started_epoch,
        };
        let session = WriteSession {
            fence: self.clone(),
            id,
            pin_key: pin_key(id),
            validated_epoch: Mutex::new(started_epoch),
            group_pin: None,
        };
        self.metadata.apply(&[RecordUpdate::new(
            RecordSpace::PINS,
            session.pin_key.clone(),
            Expected::Any,
            Change::Put(records::encode(&record)),
        )])?;
        Ok(session)
    }

    /// Runs `work` only while no write session is open in this vault, holding off any
    /// that would open meanwhile; None (and `work` not run) while one is open.
    pub(crate) fn while_idle<T>(&self, work: impl FnOnce() -> T) -> Option<T> {
        let state = self.lock();
        if !state.sessions.is_empty() {
            return None;
        }
        let output = work();
        drop(state);
        Some(output)
    }

    /// Starts a sweep: the epoch moves to the next odd value. Returns it.
    pub(crate) fn begin_sweep(&self) -> Result<u64> {
        {
            let mut state = self.lock();
            if state.sweeping {
                return Err(NodeError::Busy {
                    what: "gc".into(),
                    reason: "another gc is running in this process; wait for it to finish".into(),
                });
            }
            state.sweeping = true;
            state.retired.clear();
            state.retired_index_nodes.clear();
        }
        let moved = (|| {
            let epoch = self.epoch()?;
            let next = if epoch % 2 == 0 { epoch + 1 } else { epoch + 2 };
            self.metadata.apply(&[epoch_update(epoch, next)])?;
            Ok(next)
        })();
        if moved.is_err() {
            self.lock().sweeping = false;
        }
        moved
    }

    /// Ends the sweep: the epoch moves to even, and retired claims are dropped.
    pub(crate) fn end_sweep(&self) -> Result<()> {
        let ended = (|| {
            let epoch = self.epoch()?;
            if epoch % 2 == 1 {
                self.metadata.apply(&[epoch_update(epoch, epoch + 1)])?;
            }
            Ok(())
        })();
        let mut state = self.lock();
        state.sweeping = false;
        state.retired.clear();
        state.retired_index_nodes.clear();
        ended
    }

    /// The roots pinned now, with the generation they are as of.
    pub(crate) fn pinned_roots(&self) -> (u64, Vec<(VolumeId, PinnedRoot)>) {
        let state = self.lock();
        let mut roots: Vec<(VolumeId, PinnedRoot)> = state
            .sessions
            .values()
            .flat_map(|session| session.roots.iter().copied())
            .collect();
        roots.sort();
        roots.dedup();
        (state.roots_generation, roots)
    }

    /// The index nodes sessions hold whole (see [`WriteSession::hold_index_node`]).
    pub(crate) fn held_index_nodes(&self) -> BTreeSet<Cid> {
        let state = self.lock();
        let mut nodes = state.retired_index_nodes.clone();
        for session in state.sessions.values() {
            nodes.extend(session.index_nodes.iter().copied());
        }
        nodes
    }

    /// Deletes what `delete` is given of `candidates`, minus everything claimed, while
    /// holding the fence (so no claim can slip between the filter and the delete).
    /// Returns `None`, deleting nothing, when roots were pinned since `generation`: the
    /// caller must walk them and retry.
    pub(crate) fn delete_unclaimed<T>(
        &self,
        generation: u64,
        candidates: Vec<(Cid, T)>,
        delete: impl FnOnce(Vec<(Cid, T)>) -> Result<()>,
    ) -> Result<Option<()>> {
        let state = self.lock();
        if state.roots_generation != generation {
            return Ok(None);
        }
        let unclaimed: Vec<(Cid, T)> = candidates
            .into_iter()
            .filter(|(cid, _)| {
                !state.retired.contains(cid)
                    && !state
                        .sessions
                        .values()
                        .any(|session| session.claims.contains(cid))
            })
            .collect();
        if !unclaimed.is_empty() {
            delete(unclaimed)?;
        }
        drop(state);
        Ok(Some(()))
    }

    fn end_session(&self, id: u64, pin_key: &[u8]) {
        {
            let mut state = self.lock();
            if let Some(session) = state.sessions.remove(&id)
                && state.sweeping
            {
                state.retired.extend(session.claims);
                state.retired_index_nodes.extend(session.index_nodes);
            }
        }
        if let Err(error) = self.metadata.apply(&[RecordUpdate::new(
            RecordSpace::PINS,
            pin_key.to_vec(),
            Expected::Any,
            Change::Delete,
        )]) {
            // Harmless (a full disk, say, whose error the writer reports itself): the next
            // open of the vault clears pins of processes gone.
            tracing::debug!(%error, "could not remove a write pin");
        }
    }
}

/// An open writer (an import, a mount): what it claims is safe from gc until it ends.
#[derive(Debug)]
pub struct WriteSession {
    fence: Arc<GcFence>,
    id: u64,
    pin_key: Vec<u8>,
    /// The last epoch at which everything this session names was known to be stored.
    validated_epoch: Mutex<u64>,
    /// For a grouped volume: the pin in the group's Raft state that keeps the group's gc
    /// from sweeping while this session writes (dropped with the session).
    pub(crate) group_pin: Option<super::groups::GroupPin>,
}

impl WriteSession {
    /// Claims `cid`: gc keeps it from now until the session ends. Call before checking
    /// that it is stored or staging it.
    pub(crate) fn claim(&self, cid: Cid) {
        if let Some(session) = self.fence.lock().sessions.get_mut(&self.id) {
            session.claims.insert(cid);
        }
    }

    /// Claims reference index node `node` with everything under it: a sync that finds a
    /// node held skips its subtree, which may be unreachable here until the sync
    /// publishes (left by an earlier sync a crash interrupted). gc walks it as live; a
    /// sweep that marked before walks it before deleting.
    pub(crate) fn hold_index_node(&self, node: Cid) {
        let mut state = self.fence.lock();
        let added = state
            .sessions
            .get_mut(&self.id)
            .is_some_and(|session| session.claims.insert(node) | session.index_nodes.insert(node));
        if added {
            state.roots_generation += 1;
        }
    }

    /// Every cid this session claimed so far.
    pub(crate) fn claimed(&self) -> Vec<Cid> {
        self.fence
            .lock()
            .sessions
            .get(&self.id)
            .map(|session| session.claims.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Pins the whole reach of `root` in `volume` (a mount's base), replacing earlier
    /// pinned roots; claims made so far that `covered` names are released (the new root
    /// reaches them). Pin before resolving what the root names is still stored.
    pub(crate) fn pin_root(&self, volume: VolumeId, root: PinnedRoot, covered: &[Cid]) {
        let mut state = self.fence.lock();
        let sweeping = state.sweeping;
        state.roots_generation += 1;
        let mut released = Vec::new();
        if let Some(session) = state.sessions.get_mut(&self.id) {
            session.roots = vec![(volume, root)];
            for cid in covered {
                if session.claims.remove(cid) {
                    released.push(*cid);
                }
            }
        }
        if sweeping {
            // The running sweep marked before this root was pinned, and may already have
            // walked past it: the released claims stay until that sweep ends.
            state.retired.extend(released);
        }
    }

    /// Publishes a snapshot: applies `updates` (a ref move) only while gc's epoch is one at
    /// which everything in `named` was stored. When a sweep overlapped the session,
    /// `is_stored` re-checks `named` first; a missing cid fails the publish (nothing moves).
    ///
    /// # Errors
    /// [`NodeError::MissingWhileWriting`] when a named cid is missing; metadata conflicts (the ref
    /// moved) as [`MetadataError`]; engine errors.
    pub(crate) fn publish(
        &self,
        updates: &[RecordUpdate],
        named: &[Cid],
        is_stored: &dyn Fn(&Cid) -> Result<bool>,
    ) -> Result<()> {
        let mut validated = self
            .validated_epoch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            let epoch = self.fence.epoch()?;
            // Odd: a sweep is running, and may have deleted before our claims were made.
            if epoch != *validated || epoch % 2 == 1 {
                tracing::debug!(epoch, "gc swept during this write: checking what it names");
                for cid in named {
                    if !is_stored(cid)? {
                        return Err(NodeError::MissingWhileWriting { cid: cid.to_hex() });
                    }
                }
                *validated = epoch;
            }
            let mut all = updates.to_vec();
            all.push(RecordUpdate::new(
                RecordSpace::GC,
                EPOCH_KEY.to_vec(),
                expected_epoch(epoch),
                Change::Keep,
            ));
            match self.fence.metadata.apply(&all) {
                Ok(()) => return Ok(()),
                // The epoch moved between the check and the update: check again.
                Err(MetadataError::RecordConflict { space, .. })
                    if space == RecordSpace::GC.name() => {}
                Err(other) => return Err(other.into()),
            }
        }
    }
}

impl Drop for WriteSession {
    fn drop(&mut self) {
        self.fence.end_session(self.id, &self.pin_key);
    }
}

fn pin_key(id: u64) -> Vec<u8> {
    format!("{}-{id}", std::process::id()).into_bytes()
}

fn read_epoch(metadata: &dyn MetadataStore) -> Result<u64> {
    match metadata.get_record(RecordSpace::GC, EPOCH_KEY)? {
        None => Ok(0),
        Some(bytes) => {
            let array: [u8; 8] =
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| NodeError::CorruptRecord {
                        what: "gc epoch",
                        reason: format!("{} bytes, expected 8", bytes.len()),
                    })?;
            Ok(u64::from_le_bytes(array))
        }
    }
}

/// The epoch as stored before any gc ran is absent, which reads as 0.
fn expected_epoch(epoch: u64) -> Expected {
    if epoch == 0 {
        Expected::Absent
    } else {
        Expected::Value(epoch.to_le_bytes().to_vec())
    }
}

fn epoch_update(from: u64, to: u64) -> RecordUpdate {
    RecordUpdate::new(
        RecordSpace::GC,
        EPOCH_KEY.to_vec(),
        expected_epoch(from),
        Change::Put(to.to_le_bytes().to_vec()),
    )
}

#[cfg(test)]
mod tests {
    //! Each test interleaves a writer and gc at the point where, before the fence, gc
    //! removed what the writer was about to publish.
    use std::collections::BTreeMap;
    use std::path::Path;

    use forge_store::chunkstore::has_first_shard;
    use forge_store::metadata::ref_update;
    use forge_store::object::FileManifest;

    use super::*;
    use crate::progress::Progress;
    use crate::test_support::{new_vault, no_passphrase};
    use crate::vault::import::{ImportOptions, Importer, NewSnapshot};
    use crate::vault::{CreateVolumeOptions, Vault};

    fn vault(temp: &Path) -> Vault {
        let vault = new_vault(temp);
        vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        vault
    }

    fn import_dir(vault: &Vault, source: &Path, files: &[(&str, Vec<u8>)]) -> Cid {
        std::fs::create_dir_all(source).unwrap();
        for (name, content) in files {
            std::fs::write(source.join(name), content).unwrap();
        }
        let options = ImportOptions {
            message: String::new(),
            branch: "main".into(),
            dna: BTreeMap::new(),
            atime: false,
        };
        vault
            .import(
                "v",
                source,
                &options,
                &no_passphrase,
                &Progress::new("test", false),
            )
            .unwrap()
            .snapshot
    }

    fn pseudo_random(seed: u8, len: usize) -> Vec<u8> {
        crate::test_support::pseudo_random(len, u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Publishes a snapshot of one file whose chunks are `manifest`'s, onto `main`.
    fn publish_file(vault: &Vault, importer: &Importer<'_>, manifest: FileManifest) -> Result<Cid> {
        use forge_store::object::{EntryContent, Object, Tree, TreeEntry};
        let size = manifest.size;
        let root = importer.store_object(&Object::Tree(Tree {
            entries: vec![TreeEntry {
                name: b"file".to_vec(),
                mode: 0o644,
                mtime_ns: 0,
                size,
                content: EntryContent::InlineFile(manifest),
                meta: forge_store::object::EntryMeta::default(),
            }],
        }))?;
        let index_root = importer.stage_reference_index()?;
        importer.write_pending()?;
        let volume = vault.open_volume("v", &no_passphrase)?;
        let head = vault.refs().get_ref(&volume.id, "main")?;
        let snapshot = importer.write_snapshot(&NewSnapshot {
            root,
            index_root,
            parent: head,
            message: String::new(),
            dna: BTreeMap::new(),
            logical_bytes: size,
            file_count: 1,
        })?;
        importer.publish(&[ref_update(&volume.id, "main", head, Some(snapshot))])?;
        Ok(snapshot)
    }

    fn assert_clean(vault: &Vault) {
        let report = vault.fsck(None, &Progress::new("test", false)).unwrap();
        assert!(report.problems.is_empty(), "fsck: {:?}", report.problems);
    }

    #[test]
    fn gc_keeps_chunks_an_import_staged_but_has_not_published() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault(temp.path());
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let session = vault.open_write_session("import", volume.id).unwrap();
        let progress = Progress::new("test", false);
        let importer = Importer::new(&vault, &volume, &session, &progress).unwrap();
        let mut manifest = FileManifest::default();
        importer
            .add_chunk(&mut manifest, &pseudo_random(1, 50_000))
            .unwrap();
        importer.write_pending().unwrap();
        let staged = manifest.chunks().next().unwrap().cid();

        // Before the fence, this gc swept the staged chunk: nothing named it yet.
        vault
            .gc(&no_passphrase, &Progress::new("test", false))
            .unwrap();
        assert!(has_first_shard(vault.kv(), &staged).unwrap());

        publish_file(&vault, &importer, manifest).unwrap();
        drop(session);
        assert_clean(&vault);
        vault
            .gc(&no_passphrase, &Progress::new("test", false))
            .unwrap();
        assert!(
            has_first_shard(vault.kv(), &staged).unwrap(),
            "published: live"
        );
        assert_clean(&vault);
    }

    #[test]
    fn gc_keeps_a_chunk_an_import_reuses_from_a_deleted_snapshot() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault(temp.path());
        let shared = pseudo_random(2, 40_000);
        let first = import_dir(&vault, &temp.path().join("a"), &[("x", shared.clone())]);
        import_dir(
            &vault,
            &temp.path().join("b"),
            &[("y", pseudo_random(3, 1000))],
        );
        vault.delete_snapshot("v", &first.to_hex()).unwrap();
        // The chunk of `x` is garbage now, but still stored and in the dedup index.

        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let session = vault.open_write_session("import", volume.id).unwrap();
        let progress = Progress::new("test", false);
        let importer = Importer::new(&vault, &volume, &session, &progress).unwrap();
        let mut manifest = FileManifest::default();
        importer.add_chunk(&mut manifest, &shared).unwrap();
        importer.write_pending().unwrap();
        let reused = manifest.chunks().next().unwrap().cid();

        vault
            .gc(&no_passphrase, &Progress::new("test", false))
            .unwrap();
        assert!(
            has_first_shard(vault.kv(), &reused).unwrap(),
            "a chunk the import deduplicated against was swept"
        );
        publish_file(&vault, &importer, manifest).unwrap();
        drop(session);
        assert_clean(&vault);
    }

    #[test]
    fn claims_of_a_session_that_ends_during_a_sweep_last_until_the_sweep_ends() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault(temp.path());
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let fence = vault.fence();
        let cid = Cid::of(b"published after the mark");
        fence.begin_sweep().unwrap();
        let (generation, _) = fence.pinned_roots();
        // A writer publishes and ends after gc marked: its snapshot is not in the mark.
        let session = vault.open_write_session("import", volume.id).unwrap();
        session.claim(cid);
        drop(session);
        let mut deleted = Vec::new();
        fence
            .delete_unclaimed(generation, vec![(cid, ())], |unclaimed| {
                deleted = unclaimed;
                Ok(())
            })
            .unwrap();
        assert!(
            deleted.is_empty(),
            "swept a cid whose writer ended during the sweep"
        );
        fence.end_sweep().unwrap();
        // A later sweep marks from the published ref; the claim is not needed any more.
        fence.begin_sweep().unwrap();
        fence
            .delete_unclaimed(generation, vec![(cid, ())], |unclaimed| {
                deleted = unclaimed;
                Ok(())
            })
            .unwrap();
        assert_eq!(deleted.len(), 1);
        fence.end_sweep().unwrap();
    }

    #[test]
    fn a_root_pinned_after_the_mark_is_walked_before_the_next_delete() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault(temp.path());
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let fence = vault.fence();
        fence.begin_sweep().unwrap();
        let (generation, _) = fence.pinned_roots();
        let session = vault.open_write_session("mount", volume.id).unwrap();
        session.pin_root(volume.id, PinnedRoot::Snapshot([7; 32]), &[]);
        let outcome = fence
            .delete_unclaimed(generation, vec![(Cid::of(b"x"), ())], |_| Ok(()))
            .unwrap();
        assert!(outcome.is_none(), "deleted without walking the new root");
        let (now, roots) = fence.pinned_roots();
        assert_eq!(roots, vec![(volume.id, PinnedRoot::Snapshot([7; 32]))]);
        assert!(
            fence
                .delete_unclaimed(now, vec![(Cid::of(b"x"), ())], |_| Ok(()))
                .unwrap()
                .is_some()
        );
        fence.end_sweep().unwrap();
    }

    #[test]
    fn publish_after_an_overlapping_sweep_refuses_a_snapshot_naming_missing_data() {
        let temp = tempfile::tempdir().unwrap();
        let vault = vault(temp.path());
        let volume = vault.open_volume("v", &no_passphrase).unwrap();
        let session = vault.open_write_session("import", volume.id).unwrap();
        let missing = Cid::of(b"never stored");
        let fake = Cid::of(b"snapshot");
        let update = [ref_update(&volume.id, "main", None, Some(fake))];
        // No sweep since the session began: nothing to check.
        let is_stored = |_: &Cid| -> Result<bool> { Ok(false) };
        vault.fence().begin_sweep().unwrap();
        vault.fence().end_sweep().unwrap();
        let error = session
            .publish(&update, &[missing], &is_stored)
            .unwrap_err();
        assert!(
            matches!(error, NodeError::MissingWhileWriting { .. }),
            "{error}"
        );
        assert_eq!(vault.refs().get_ref(&volume.id, "main").unwrap(), None);
        // Pins are recorded through the metadata store while the session is open.
        assert_eq!(
            vault
                .refs()
                .scan_records(RecordSpace::PINS, b"")
                .unwrap()
                .len(),
            1
        );
        drop(session);
        assert!(
            vault
                .refs()
                .scan_records(RecordSpace::PINS, b"")
                .unwrap()
                .is_empty()
        );
    }
}
