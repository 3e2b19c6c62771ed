//! The behaviour detector in a read-write mount's request path (`mount/detector.rs` is
//! the state machine): what each write, removal and rename tells it, the entropy samples
//! it needs, and what a trip does. On a trip the mount turns read-only at once (EROFS,
//! the tripping request included), the branch's last commit is kept on a branch
//! `BRANCH-quarantine-TIME` (the pre-attack state: every file overwritten since holds its
//! committed pre-image there; changes since the last commit are not in it), the volume is
//! flagged and frozen (in its group's Raft state for a grouped volume), the event is
//! logged with its evidence and counted on /metrics (`forge_anomalies_total`), and the
//! mount's commit at unmount goes to `BRANCH-frozen-TIME`, never to the branch.

use std::sync::atomic::Ordering;

use super::*;
use crate::mount::detector::{
    ENTROPY_SAMPLE_BYTES, JUDGED_WRITE_BYTES, Observation, Trip, shannon_entropy,
};
use crate::vault::trust::AnomalyFlag;

/// How much of a file's committed content is read for its prior entropy.
const PRIOR_SAMPLE_BYTES: u32 = 4096;

fn extension(name: &[u8]) -> &[u8] {
    name.iter()
        .rposition(|byte| *byte == b'.')
        .filter(|at| *at > 0)
        .map_or(&[][..], |at| &name[at + 1..])
}

impl FuseAdapter {
    /// The size of the committed content of `ino` when it is a file.
    fn base_size(&self, ino: u64) -> Option<u64> {
        let inodes = self.0.lock();
        match inodes.nodes.get(&ino).map(|node| &node.kind) {
            Some(NodeKind::File(file)) => Some(file.base.size()),
            _ => None,
        }
    }

    /// The entropy of the first bytes of `ino` as it reads now (its committed content
    /// where nothing was written over it yet).
    fn sampled_entropy(&self, ino: u64) -> Result<f32, Errno> {
        Ok(shannon_entropy(&self.do_read(
            ino,
            0,
            PRIOR_SAMPLE_BYTES,
        )?))
    }

    /// Tells the detector about a write of `data` at `offset` of `ino` (before it is
    /// staged). EROFS when the volume is frozen, this write included.
    pub(super) fn watch_write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let Some(watch) = &self.0.watch else {
            return Ok(());
        };
        let Some(base_size) = self.base_size(ino) else {
            return Ok(());
        };
        let judged = data.len() >= JUDGED_WRITE_BYTES;
        let entropy = shannon_entropy(&data[..data.len().min(ENTROPY_SAMPLE_BYTES)]);
        let observation = if offset < base_size {
            if !judged {
                return Ok(());
            }
            let (judged, known) = {
                let watch = lock(watch);
                (
                    watch.detector.judges_overwrite_of(ino),
                    watch.priors.get(&ino).copied(),
                )
            };
            if !judged {
                return Ok(());
            }
            let prior = match known {
                Some(prior) => prior,
                None => {
                    let prior = self.sampled_entropy(ino)?;
                    lock(watch).priors.insert(ino, prior);
                    prior
                }
            };
            Observation::Overwrite {
                file: ino,
                entropy,
                prior,
            }
        } else {
            Observation::Fresh {
                file: ino,
                entropy: judged.then_some(entropy),
                end: offset + data.len() as u64,
            }
        };
        self.observe(&observation)
    }

    /// Tells the detector that `name` in `parent` is about to lose its name (an unlink,
    /// or a rename of `by` over it).
    pub(super) fn watch_removal(
        &self,
        parent: u64,
        name: &[u8],
        by: Option<u64>,
    ) -> Result<(), Errno> {
        let Some(watch) = &self.0.watch else {
            return Ok(());
        };
        let child = {
            let mut inodes = self.0.lock();
            self.0.child(&mut inodes, parent, name)?
        };
        let Some(child) = child else {
            return Ok(());
        };
        let size = match self.base_size(child) {
            Some(size) if size > 0 => size,
            _ => return Ok(()),
        };
        let wanted = lock(watch)
            .detector
            .wants_removed_prior(self.0.vault.now_ns(), by);
        // Unjudged, it still counts towards the rate of destructive operations.
        let prior = if wanted {
            self.sampled_entropy(child)?
        } else {
            8.0
        };
        self.observe(&Observation::Removed { prior, size, by })
    }

    /// Tells the detector about a rename of `file` from `name` to `new_name`.
    pub(super) fn watch_rename(
        &self,
        file: u64,
        name: &[u8],
        new_name: &[u8],
    ) -> Result<(), Errno> {
        if self.0.watch.is_none() {
            return Ok(());
        }
        self.observe(&Observation::Renamed {
            file,
            new_extension: extension(name) != extension(new_name),
        })
    }

    fn observe(&self, observation: &Observation) -> Result<(), Errno> {
        let Some(watch) = &self.0.watch else {
            return Ok(());
        };
        let trip = lock(watch)
            .detector
            .observe(self.0.vault.now_ns(), observation);
        if let Some(trip) = trip {
            self.0.freeze(&trip);
        }
        self.0.writable()
    }
}

fn lock(watch: &Mutex<Watch>) -> MutexGuard<'_, Watch> {
    watch
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MountedFs {
    /// Keeps what the detector learned of the volume's rate of destructive operations
    /// for its next mount (not after a trip: an attack is not a baseline).
    pub fn save_detector_baseline(&self) {
        let Some(watch) = &self.watch else {
            return;
        };
        if self.is_frozen() {
            return;
        }
        let rate = watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .detector
            .baseline_per_second();
        if let Err(error) = self.vault.save_detector_baseline(&self.volume.id, rate) {
            tracing::warn!(%error, "keeping the behaviour detector's baseline");
        }
    }

    /// Whether the detector froze this mount.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// What a trip does (see the module documentation). Runs once.
    pub(super) fn freeze(&self, trip: &Trip) {
        if self.frozen.swap(true, Ordering::SeqCst) {
            return;
        }
        let volume = self.volume.record.name.clone();
        let now = self.vault.now_ns();
        let time = crate::clock::format_compact_utc_time(now);
        let (branch, base) = match &self.work {
            Some(work) => {
                let work = work
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                (work.branch.clone(), work.base)
            }
            None => (crate::vault::DEFAULT_BRANCH.to_owned(), None),
        };
        let quarantine = base.and_then(|base| {
            let name = format!("{branch}-quarantine-{time}");
            match self
                .vault
                .create_branch(&volume, &name, Some(&base.to_hex()))
            {
                Ok(_) => Some(name),
                Err(error) => {
                    tracing::error!(%volume, %error, "could not keep the pre-attack state on a branch");
                    None
                }
            }
        });
        tracing::error!(
            %volume,
            %branch,
            kind = trip.kind,
            evidence = %trip.evidence,
            quarantine = quarantine.as_deref().unwrap_or("(none: nothing committed yet)"),
            "ransomware-like writes: the mount is read-only and the volume frozen (review, then `forge volume unfreeze {volume}`)"
        );
        self.metrics
            .anomalies
            .get_or_create(&vec![
                ("volume".to_owned(), volume.clone()),
                ("kind".to_owned(), trip.kind.to_owned()),
            ])
            .inc();
        let flag = AnomalyFlag {
            kind: trip.kind.to_owned(),
            evidence: trip.evidence.clone(),
            flagged_ns: now,
            node: *self.vault.identity().node_id().as_bytes(),
            quarantine_branch: quarantine,
            resolved_ns: None,
        };
        if let Err(error) = self.vault.flag_anomaly(&volume, &flag) {
            tracing::error!(%volume, %error, "could not record the anomaly flag (the mount stays read-only)");
        }
    }
}
