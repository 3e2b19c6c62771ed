//! `MetadataStore`: the records a volume group replicates, in named record spaces, changed
//! only by atomic multi-record compare-and-swap. Refs are one space; gc's epoch and the
//! writers' pins are others; later kinds (contracts, seals, peers) add a space name, not a
//! method. Local (one `KvEngine`) now; the cluster issue implements the same trait on Raft
//! without changing callers.

use std::sync::{Arc, Mutex};

use forge_crypto::Cid;

use crate::ids::VolumeId;
use crate::kv::{Column, Durability, KvEngine, KvError, WriteBatch, prefix_end};

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// The ref moved since the caller read it.
    #[error("branch {branch:?} moved: expected {expected}, found {found}")]
    Conflict {
        branch: String,
        expected: String,
        found: String,
    },
    /// A record other than a ref did not hold the value the caller expected: nothing of
    /// the update was applied.
    #[error("metadata record {space}/{key} changed meanwhile; nothing was applied")]
    RecordConflict { space: &'static str, key: String },
    /// A ref value that is not a cid.
    #[error("ref {branch:?} is corrupt")]
    CorruptRef { branch: String },
    /// A record space name that cannot be stored.
    #[error("invalid record space name {name:?}: lower-case ASCII letters and '-' only")]
    InvalidSpace { name: &'static str },
    /// The engine failed.
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Records as returned by a scan: (key within the space, value), sorted by key.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// A named space of metadata records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordSpace(&'static str);

impl RecordSpace {
    /// Branch refs: key = volume id (16 bytes) ‖ branch name, value = snapshot cid.
    pub const REFS: Self = Self("refs");
    /// gc's fencing state (the sweep epoch).
    pub const GC: Self = Self("gc");
    /// Writers' pins: one record per open write session (an import, a mount).
    pub const PINS: Self = Self("pins");
    /// Volume records: key = volume name.
    pub const VOLUMES: Self = Self("volumes");
    /// Volume keys (wrapped to a node or a passphrase): key = volume id.
    pub const VOLUME_KEYS: Self = Self("volume-keys");
    /// Dedup domain records: key = domain name.
    pub const DOMAINS: Self = Self("domains");
    /// Snapshot listings: key = volume id ‖ snapshot cid.
    pub const SNAPSHOTS: Self = Self("snapshots");
    /// Signed reference-index heads: key = volume id ‖ snapshot cid.
    pub const INDEX_HEADS: Self = Self("index-heads");
    /// Mounts' working states: key = volume id ‖ branch.
    pub const WORKING: Self = Self("working");

    /// A space by name (lower-case ASCII letters and '-'; checked when used).
    #[must_use]
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    /// The space's name.
    #[must_use]
    pub const fn name(self) -> &'static str {
        self.0
    }

    fn check(self) -> Result<(), MetadataError> {
        let valid = !self.0.is_empty()
            && self
                .0
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte == b'-');
        if valid {
            Ok(())
        } else {
            Err(MetadataError::InvalidSpace { name: self.0 })
        }
    }
}

/// What a record must hold for an update to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// Anything, or nothing.
    Any,
    /// Nothing.
    Absent,
    /// Exactly these bytes.
    Value(Vec<u8>),
}

/// What an update does to its record once every condition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing: the update is a pure condition (e.g. "gc's epoch is still 4").
    Keep,
    /// Store these bytes.
    Put(Vec<u8>),
    /// Remove the record.
    Delete,
}

/// One record's condition and change within an atomic [`MetadataStore::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordUpdate {
    /// The record's space.
    pub space: RecordSpace,
    /// The record's key within its space.
    pub key: Vec<u8>,
    /// What it must hold.
    pub expected: Expected,
    /// What happens to it.
    pub change: Change,
}

impl RecordUpdate {
    /// An update of `key` in `space`.
    #[must_use]
    pub fn new(
        space: RecordSpace,
        key: impl Into<Vec<u8>>,
        expected: Expected,
        change: Change,
    ) -> Self {
        Self {
            space,
            key: key.into(),
            expected,
            change,
        }
    }
}

/// The key of branch `branch` of `volume` in [`RecordSpace::REFS`].
#[must_use]
pub fn ref_key(volume: &VolumeId, branch: &str) -> Vec<u8> {
    let mut key = volume.as_bytes().to_vec();
    key.extend_from_slice(branch.as_bytes());
    key
}

/// The update that moves a ref from `expected` to `new` (None: absent).
#[must_use]
pub fn ref_update(
    volume: &VolumeId,
    branch: &str,
    expected: Option<Cid>,
    new: Option<Cid>,
) -> RecordUpdate {
    RecordUpdate::new(
        RecordSpace::REFS,
        ref_key(volume, branch),
        expected.map_or(Expected::Absent, |cid| {
            Expected::Value(cid.as_bytes().to_vec())
        }),
        new.map_or(Change::Delete, |cid| Change::Put(cid.as_bytes().to_vec())),
    )
}

/// Records in named spaces, changed atomically. Refs are the records everybody uses, so
/// they have typed helpers built on the three required methods.
pub trait MetadataStore: Send + Sync + std::fmt::Debug {
    /// One record.
    ///
    /// # Errors
    /// Engine failures; an invalid space name.
    fn get_record(&self, space: RecordSpace, key: &[u8]) -> Result<Option<Vec<u8>>, MetadataError>;

    /// Every record of `space` whose key starts with `prefix`, sorted by key.
    ///
    /// # Errors
    /// As [`MetadataStore::get_record`].
    fn scan_records(&self, space: RecordSpace, prefix: &[u8]) -> Result<Records, MetadataError>;

    /// Applies every update, durably, if every condition holds; otherwise changes nothing
    /// and fails with [`MetadataError::RecordConflict`] naming the first record that did
    /// not hold what was expected (a ref: [`MetadataError::Conflict`]).
    ///
    /// Each record appears at most once in `updates`.
    ///
    /// # Errors
    /// As above, and engine failures.
    fn apply(&self, updates: &[RecordUpdate]) -> Result<(), MetadataError>;

    /// The snapshot a branch points at.
    ///
    /// # Errors
    /// Engine failures or a corrupt ref.
    fn get_ref(&self, volume: &VolumeId, branch: &str) -> Result<Option<Cid>, MetadataError> {
        self.get_record(RecordSpace::REFS, &ref_key(volume, branch))?
            .map(|value| decode_ref(branch, &value))
            .transpose()
    }

    /// Every branch of a volume, sorted by name.
    ///
    /// # Errors
    /// Engine failures or a corrupt ref.
    fn list_refs(&self, volume: &VolumeId) -> Result<Vec<(String, Cid)>, MetadataError> {
        self.scan_records(RecordSpace::REFS, volume.as_bytes())?
            .into_iter()
            .map(|(key, value)| {
                let branch = String::from_utf8_lossy(&key[16..]).into_owned();
                let cid = decode_ref(&branch, &value)?;
                Ok((branch, cid))
            })
            .collect()
    }

    /// Moves `branch` from `expected` to `new` (None: absent), durably, or fails with
    /// [`MetadataError::Conflict`] changing nothing.
    ///
    /// # Errors
    /// As above.
    fn compare_and_swap_ref(
        &self,
        volume: &VolumeId,
        branch: &str,
        expected: Option<Cid>,
        new: Option<Cid>,
    ) -> Result<(), MetadataError> {
        self.apply(&[ref_update(volume, branch, expected, new)])
    }
}

/// The single-node `MetadataStore`: refs in the `Refs` column and the volume, key, domain,
/// listing, index-head and working-state spaces in `Meta` under the prefixes they have had
/// since data-directory format 1 (so no data directory needs migrating), every other space
/// in `Meta` under `rec/<space>/`; updates serialized by a mutex and written synced.
#[derive(Debug)]
pub struct LocalMetadataStore {
    kv: Arc<dyn KvEngine>,
    apply_lock: Mutex<()>,
}

impl LocalMetadataStore {
    /// A store over `kv`.
    #[must_use]
    pub fn new(kv: Arc<dyn KvEngine>) -> Self {
        Self {
            kv,
            apply_lock: Mutex::new(()),
        }
    }

    fn location(space: RecordSpace, key: &[u8]) -> Result<(Column, Vec<u8>), MetadataError> {
        space.check()?;
        if space == RecordSpace::REFS {
            return Ok((Column::Refs, key.to_vec()));
        }
        let format_1_prefix: Option<&[u8]> = match space {
            RecordSpace::VOLUMES => Some(b"volume/"),
            RecordSpace::VOLUME_KEYS => Some(b"volkeys/"),
            RecordSpace::DOMAINS => Some(b"domain/"),
            RecordSpace::SNAPSHOTS => Some(b"snapshot/"),
            RecordSpace::INDEX_HEADS => Some(b"refindex/"),
            RecordSpace::WORKING => Some(b"mountwork/"),
            _ => None,
        };
        if let Some(prefix) = format_1_prefix {
            return Ok((Column::Meta, [prefix, key].concat()));
        }
        let mut stored = Vec::with_capacity(5 + space.0.len() + key.len());
        stored.extend_from_slice(b"rec/");
        stored.extend_from_slice(space.0.as_bytes());
        stored.push(b'/');
        stored.extend_from_slice(key);
        Ok((Column::Meta, stored))
    }
}

fn decode_ref(branch: &str, value: &[u8]) -> Result<Cid, MetadataError> {
    Cid::from_slice(value).map_err(|_| MetadataError::CorruptRef {
        branch: branch.to_owned(),
    })
}

fn show(value: Option<&[u8]>) -> String {
    match value {
        None => "no snapshot".to_owned(),
        Some(bytes) => {
            Cid::from_slice(bytes).map_or_else(|_| "a corrupt ref".to_owned(), |cid| cid.to_hex())
        }
    }
}

impl MetadataStore for LocalMetadataStore {
    fn get_record(&self, space: RecordSpace, key: &[u8]) -> Result<Option<Vec<u8>>, MetadataError> {
        let (column, stored) = Self::location(space, key)?;
        Ok(self.kv.get(column, &stored)?)
    }

    fn scan_records(&self, space: RecordSpace, prefix: &[u8]) -> Result<Records, MetadataError> {
        let (column, start) = Self::location(space, prefix)?;
        let skip = start.len() - prefix.len();
        let end = prefix_end(&start);
        let pairs = self.kv.scan(column, &start, end.as_deref(), usize::MAX)?;
        Ok(pairs
            .into_iter()
            .map(|(mut key, value)| (key.split_off(skip), value))
            .collect())
    }

    fn apply(&self, updates: &[RecordUpdate]) -> Result<(), MetadataError> {
        let _guard = self
            .apply_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = WriteBatch::new();
        for update in updates {
            let (column, stored) = Self::location(update.space, &update.key)?;
            let current = self.kv.get(column, &stored)?;
            let holds = match &update.expected {
                Expected::Any => true,
                Expected::Absent => current.is_none(),
                Expected::Value(value) => current.as_ref() == Some(value),
            };
            if !holds {
                return Err(if update.space == RecordSpace::REFS {
                    let branch = String::from_utf8_lossy(update.key.get(16..).unwrap_or_default())
                        .into_owned();
                    let expected = match &update.expected {
                        Expected::Value(value) => show(Some(value)),
                        _ => show(None),
                    };
                    MetadataError::Conflict {
                        branch,
                        expected,
                        found: show(current.as_deref()),
                    }
                } else {
                    MetadataError::RecordConflict {
                        space: update.space.0,
                        key: String::from_utf8_lossy(&update.key).into_owned(),
                    }
                });
            }
            match &update.change {
                Change::Keep => {}
                Change::Put(value) => batch.put(column, stored, value.clone()),
                Change::Delete => batch.delete(column, stored),
            }
        }
        if !batch.is_empty() {
            // A metadata update is what acknowledges a snapshot: synced before returning.
            self.kv.write(batch, Durability::Synced)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;

    #[test]
    fn compare_and_swap_moves_only_from_the_expected_value() {
        let kv = Arc::new(MemKv::new());
        let store = LocalMetadataStore::new(kv.clone());
        let volume = VolumeId::from_bytes([1; 16]);
        let (a, b) = (Cid::of(b"a"), Cid::of(b"b"));
        store
            .compare_and_swap_ref(&volume, "main", None, Some(a))
            .unwrap();
        assert!(matches!(
            store.compare_and_swap_ref(&volume, "main", None, Some(b)),
            Err(MetadataError::Conflict { .. })
        ));
        store
            .compare_and_swap_ref(&volume, "main", Some(a), Some(b))
            .unwrap();
        store
            .compare_and_swap_ref(&volume, "dev", None, Some(a))
            .unwrap();
        assert_eq!(
            store.list_refs(&volume).unwrap(),
            vec![("dev".to_owned(), a), ("main".to_owned(), b)]
        );
        kv.crash(0);
        assert_eq!(
            store.get_ref(&volume, "main").unwrap(),
            Some(b),
            "ref updates are durable when acknowledged"
        );
        store
            .compare_and_swap_ref(&volume, "dev", Some(a), None)
            .unwrap();
        assert_eq!(store.get_ref(&volume, "dev").unwrap(), None);
        assert!(
            store
                .list_refs(&VolumeId::from_bytes([2; 16]))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn apply_is_all_or_nothing_across_spaces() {
        let kv = Arc::new(MemKv::new());
        let store = LocalMetadataStore::new(kv.clone());
        let volume = VolumeId::from_bytes([3; 16]);
        let a = Cid::of(b"a");
        let epoch = RecordSpace::GC;
        store
            .apply(&[RecordUpdate::new(
                epoch,
                b"epoch".to_vec(),
                Expected::Absent,
                Change::Put(vec![1]),
            )])
            .unwrap();
        // The ref would move, but the gc epoch is not what the caller saw: nothing applies.
        let stale = [
            ref_update(&volume, "main", None, Some(a)),
            RecordUpdate::new(
                epoch,
                b"epoch".to_vec(),
                Expected::Value(vec![0]),
                Change::Keep,
            ),
        ];
        assert!(matches!(
            store.apply(&stale),
            Err(MetadataError::RecordConflict { space: "gc", .. })
        ));
        assert_eq!(store.get_ref(&volume, "main").unwrap(), None);
        let fresh = [
            ref_update(&volume, "main", None, Some(a)),
            RecordUpdate::new(
                epoch,
                b"epoch".to_vec(),
                Expected::Value(vec![1]),
                Change::Keep,
            ),
            RecordUpdate::new(
                RecordSpace::PINS,
                b"p1".to_vec(),
                Expected::Any,
                Change::Put(b"x".to_vec()),
            ),
        ];
        store.apply(&fresh).unwrap();
        kv.crash(0);
        assert_eq!(store.get_ref(&volume, "main").unwrap(), Some(a));
        assert_eq!(
            store.scan_records(RecordSpace::PINS, b"").unwrap(),
            vec![(b"p1".to_vec(), b"x".to_vec())]
        );
        assert!(
            store
                .scan_records(RecordSpace::new("other"), b"")
                .unwrap()
                .is_empty()
        );
        assert!(matches!(
            store.get_record(RecordSpace::new("Bad/Name"), b"k"),
            Err(MetadataError::InvalidSpace { .. })
        ));
    }
}
