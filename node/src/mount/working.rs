//! The working tree of a read-write mount: its commit as a snapshot (to the branch, or to
//! a conflict branch when the branch moved meanwhile), its durable record at fsync (so the
//! next mount of the branch after a crash recovers every fsynced byte), and the walk that
//! totals and reaches a tree for the reference index.

use std::collections::BTreeMap;
use std::path::Path;

use forge_crypto::Cid;
use forge_store::kv::Column;
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate, ref_update};
use forge_store::object::EntryContent;

use super::fs::{MountedFs, TreeTotals};
use crate::error::{NodeError, Result};
use crate::vault::fence::PinnedRoot;
use crate::vault::import::{Importer, NewSnapshot};
use crate::vault::records::{self, WorkingState};
use crate::vault::{OpenVolume, Vault};

/// The commit that ends a read-write mount, as the unmount's summary. When it fails (a
/// full disk, say) the working tree is recorded as far as it can be, and the summary says
/// what the next mount of the branch starts from: nothing that reached the vault is lost.
pub(crate) fn unmount_commit(fs: &MountedFs, mountpoint: &Path) -> Result<String, String> {
    match commit(fs, "unmount") {
        Ok(Some(CommitOutcome {
            snapshot,
            branch,
            conflict: false,
        })) => Ok(format!(
            "unmounted {}; snapshot {snapshot} committed to {branch}",
            mountpoint.display()
        )),
        Ok(Some(CommitOutcome {
            snapshot,
            branch,
            conflict: true,
        })) if branch.contains("-frozen-") => Ok(format!(
            "unmounted {}; the volume is frozen (ransomware-like writes), so snapshot {snapshot} \
             was committed beside, to branch {branch}, for review",
            mountpoint.display()
        )),
        Ok(Some(CommitOutcome {
            snapshot,
            branch,
            conflict: true,
        })) => Ok(format!(
            "unmounted {}; the branch moved meanwhile, so snapshot {snapshot} was committed to a new branch {branch}",
            mountpoint.display()
        )),
        Ok(None) => Ok(format!(
            "unmounted {}; nothing changed",
            mountpoint.display()
        )),
        Err(error) => {
            let branch = fs.work().map_or_else(String::new, |work| {
                work.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .branch
                    .clone()
            });
            let kept = match persist_working(fs) {
                Ok(()) => "every change that reached the vault (written files that were \
                           closed or fsynced, and the directory tree) is kept as the working \
                           state"
                    .to_owned(),
                Err(second) => format!(
                    "recording the rest failed too ({second}); the working state of the last \
                     successful fsync is kept"
                ),
            };
            Err(format!(
                "unmounted {}, but the commit failed: {error}. Nothing is lost: {kept}; \
                 free space and mount branch {branch} again to continue from it, then commit",
                mountpoint.display()
            ))
        }
    }
}

/// `forge snapshot create` on a volume that is not mounted read-write.
#[must_use]
pub fn nothing_to_commit(volume: &str) -> NodeError {
    NodeError::InvalidArgument {
        what: "volume",
        value: volume.to_owned(),
        reason: "it is not mounted read-write, so there is nothing to commit; to snapshot a \
                 directory use forge volume import NAME DIR"
            .into(),
    }
}

/// What a commit of the working tree did.
#[derive(Debug, Clone)]
pub struct CommitOutcome {
    /// The new snapshot.
    pub snapshot: Cid,
    /// The branch that now points at it.
    pub branch: String,
    /// Whether it went to a new conflict branch because the original moved.
    pub conflict: bool,
}

/// Commits the working tree of a read-write mount as a snapshot (None: nothing changed).
///
/// Commits of one mount run one at a time (the work target's lock is held throughout), so
/// a branch never moves backwards to an older root. The commit captures the tree with its
/// change generation: a change made while it runs stays uncommitted for the next one.
///
/// # Errors
/// Storage errors.
pub fn commit(fs: &MountedFs, message: &str) -> Result<Option<CommitOutcome>> {
    commit_with(fs, message, &BTreeMap::new(), &mut || {})
}

/// [`commit`] with DNA of its own (`forge snapshot create --dna`): its keys over the
/// mount's.
///
/// # Errors
/// As [`commit`].
pub fn commit_with_dna(
    fs: &MountedFs,
    message: &str,
    dna: &BTreeMap<String, String>,
) -> Result<Option<CommitOutcome>> {
    commit_with(fs, message, dna, &mut || {})
}

/// [`commit`], running `after_capture` once the tree is captured (tests change the tree
/// there, as a concurrent FUSE request would).
pub(crate) fn commit_with(
    fs: &MountedFs,
    message: &str,
    extra_dna: &BTreeMap<String, String>,
    after_capture: &mut dyn FnMut(),
) -> Result<Option<CommitOutcome>> {
    let Some(work) = fs.work() else {
        return Ok(None);
    };
    let mut work = work
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    fs.chunk_all()?;
    if !fs.has_changes() {
        return Ok(None);
    }
    let (vault, volume) = (fs.vault(), fs.volume());
    let progress = crate::progress::Progress::new("commit", false);
    let importer = Importer::new(vault, volume, fs.session(), &progress)?;
    let (root, generation) = fs.store_tree(&importer)?;
    after_capture();
    // The trees must be readable before walking them for the reference index.
    importer.write_pending()?;
    let totals = reach_tree(vault, volume, &importer, root)?;
    let index_root = importer.stage_reference_index()?;
    importer.write_pending()?;
    let snapshot = importer.write_snapshot(&NewSnapshot {
        root,
        index_root,
        parent: work.base,
        message: message.to_owned(),
        dna: {
            let mut dna = fs.dna().clone();
            dna.extend(
                extra_dna
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone())),
            );
            dna
        },
        logical_bytes: totals.logical_bytes,
        file_count: totals.files,
    })?;
    // The working state is a snapshot once it is published: its record goes in the same
    // atomic update as the ref (a process killed between the two would leave a state
    // older than the head, recovered and committed again beside it).
    let original = work.branch.clone();
    let forget_working = RecordUpdate::new(
        RecordSpace::WORKING,
        working_key(volume, &original),
        Expected::Any,
        Change::Delete,
    );
    // A branch of its own beside `work.branch`, named by `label` and the time.
    let beside = |label: &str, work: &mut super::WorkTarget| -> Result<()> {
        let time = crate::clock::format_compact_utc_time(vault.now_ns());
        let mut branch = format!("{}-{label}-{time}", work.branch);
        let mut attempt = 1;
        while vault.refs().get_ref(&volume.id, &branch)?.is_some() {
            attempt += 1;
            branch = format!("{}-{label}-{time}-{attempt}", work.branch);
        }
        importer.publish(&[
            ref_update(&volume.id, &branch, None, Some(snapshot)),
            forget_working.clone(),
        ])?;
        work.branch = branch;
        Ok(())
    };
    // A frozen mount (the behaviour detector tripped) never moves its branch: what it
    // holds goes beside, for review.
    let conflict = if fs.is_frozen() {
        if !work.branch.contains("-frozen-") {
            beside("frozen", &mut work)?;
        } else {
            importer.publish(&[
                ref_update(&volume.id, &work.branch, work.base, Some(snapshot)),
                forget_working.clone(),
            ])?;
        }
        true
    } else {
        match importer.publish(&[
            ref_update(&volume.id, &work.branch, work.base, Some(snapshot)),
            forget_working.clone(),
        ]) {
            Ok(()) => false,
            Err(NodeError::BranchMoved(_)) => {
                beside("conflict", &mut work)?;
                true
            }
            Err(other) => return Err(other),
        }
    };
    work.base = Some(snapshot);
    // From now on the mount builds on the new snapshot: pin it, and release the claims it
    // covers (a mount's claims would otherwise grow for as long as it runs).
    fs.session().pin_root(
        volume.id,
        PinnedRoot::Snapshot(*snapshot.as_bytes()),
        &importer.take_named(),
    );
    fs.mark_committed(generation);
    Ok(Some(CommitOutcome {
        snapshot,
        branch: work.branch.clone(),
        conflict,
    }))
}

/// Stores the working tree and records it durably, so a crash loses nothing fsynced.
///
/// # Errors
/// Storage errors.
pub fn persist_working(fs: &MountedFs) -> Result<()> {
    let Some(work) = fs.work() else {
        return Ok(());
    };
    // Serialized with commits: a working state recorded after a commit is never older
    // than that commit's tree.
    let work = work
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (vault, volume) = (fs.vault(), fs.volume());
    let progress = crate::progress::Progress::new("fsync", false);
    let importer = Importer::new(vault, volume, fs.session(), &progress)?;
    let (root, _) = fs.store_tree(&importer)?;
    importer.write_pending()?;
    vault
        .kv()
        .flush(&[Column::Shards, Column::Objects, Column::Meta])?;
    let state = WorkingState {
        root: *root.as_bytes(),
        base: work.base.map(|base| *base.as_bytes()),
    };
    vault.refs().apply(&[RecordUpdate::new(
        RecordSpace::WORKING,
        working_key(volume, &work.branch),
        Expected::Any,
        Change::Put(records::encode(&state)),
    )])?;
    Ok(())
}

/// The key of a branch's working state in [`RecordSpace::WORKING`].
fn working_key(volume: &OpenVolume, branch: &str) -> Vec<u8> {
    [volume.id.as_bytes().as_slice(), branch.as_bytes()].concat()
}

pub(crate) fn working_state(
    vault: &Vault,
    volume: &OpenVolume,
    branch: &str,
) -> Result<Option<WorkingState>> {
    vault
        .refs()
        .get_record(RecordSpace::WORKING, &working_key(volume, branch))?
        .map(|value| records::decode("working state", &value))
        .transpose()
}

/// The working state a previous mount of `branch` left, if it still holds something to
/// recover. A state whose tree is the branch head's own tree was committed already: the
/// process died after the commit was published and before the record was removed. That
/// record is removed here and the head is mounted as it is; recovering it would commit the
/// same tree again at the next unmount, to a conflict branch (the branch moved from the
/// state's base to that very commit).
///
/// # Errors
/// Engine errors; a corrupt record.
pub(crate) fn recoverable_working_state(
    vault: &Vault,
    volume: &OpenVolume,
    branch: &str,
    head_root: Option<Cid>,
) -> Result<Option<WorkingState>> {
    let Some(state) = working_state(vault, volume, branch)? else {
        return Ok(None);
    };
    if head_root.is_some_and(|root| *root.as_bytes() == state.root) {
        vault.refs().apply(&[RecordUpdate::new(
            RecordSpace::WORKING,
            working_key(volume, branch),
            Expected::Any,
            Change::Delete,
        )])?;
        return Ok(None);
    }
    Ok(Some(state))
}

/// Every cid the tree at `root` reaches (marked on `importer` for the reference index),
/// and its totals.
///
/// # Errors
/// Integrity errors reading objects.
pub(crate) fn reach_tree(
    vault: &Vault,
    volume: &OpenVolume,
    importer: &Importer<'_>,
    root: Cid,
) -> Result<TreeTotals> {
    /// A directory being walked: its entries still to visit and the totals so far.
    struct Frame {
        tree: Cid,
        entries: std::vec::IntoIter<forge_store::object::TreeEntry>,
        totals: TreeTotals,
    }
    let open = |tree: Cid| -> Result<Frame> {
        let entries = vault.read_tree_with(volume, &tree, &mut |part| importer.reach(part))?;
        Ok(Frame {
            tree,
            entries: entries.into_iter(),
            totals: TreeTotals::default(),
        })
    };
    let add = |totals: &mut TreeTotals, more: TreeTotals| {
        totals.logical_bytes += more.logical_bytes;
        totals.files += more.files;
    };
    // Depth-first with an explicit stack (a tree may be as deep as the depth limit, far
    // more than the committing thread's stack holds recursing); a subtree met again (the
    // same directory content elsewhere) is counted from the memo, not walked again.
    let mut memo: BTreeMap<Cid, TreeTotals> = BTreeMap::new();
    let mut stack = vec![open(root)?];
    while let Some(frame) = stack.last_mut() {
        let Some(entry) = frame.entries.next() else {
            let done = stack
                .pop()
                .unwrap_or_else(|| unreachable!("the loop saw a frame"));
            memo.insert(done.tree, done.totals);
            match stack.last_mut() {
                Some(parent) => add(&mut parent.totals, done.totals),
                None => return Ok(done.totals),
            }
            continue;
        };
        let manifest = match entry.content {
            EntryContent::Directory { tree } => {
                let tree = Cid::from_bytes(tree);
                match memo.get(&tree) {
                    Some(below) => add(&mut frame.totals, *below),
                    None => stack.push(open(tree)?),
                }
                continue;
            }
            EntryContent::InlineData(data) => {
                add(
                    &mut frame.totals,
                    TreeTotals {
                        logical_bytes: data.len() as u64,
                        files: 1,
                    },
                );
                continue;
            }
            content => match vault.entry_manifest(volume, &content, &mut |part| {
                importer.reach(part);
            })? {
                Some(manifest) => manifest,
                None => continue,
            },
        };
        for chunk in manifest.chunks() {
            importer.reach(chunk.cid());
        }
        add(
            &mut frame.totals,
            TreeTotals {
                logical_bytes: manifest.size,
                files: 1,
            },
        );
    }
    unreachable!("the walk returns when its root's frame is done")
}
