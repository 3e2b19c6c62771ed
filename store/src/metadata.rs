//! `MetadataStore`: branch refs with compare-and-swap. Local (one `KvEngine`) now; the
//! cluster issue implements it on Raft without changing callers.

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
    /// A ref value that is not a cid.
    #[error("ref {branch:?} is corrupt")]
    CorruptRef { branch: String },
    /// The engine failed.
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Named refs per volume, moved only by compare-and-swap.
pub trait MetadataStore: Send + Sync {
    /// The snapshot a branch points at.
    ///
    /// # Errors
    /// Engine failures or a corrupt ref.
    fn get_ref(&self, volume: &VolumeId, branch: &str) -> Result<Option<Cid>, MetadataError>;

    /// Every branch of a volume, sorted by name.
    ///
    /// # Errors
    /// Engine failures or a corrupt ref.
    fn list_refs(&self, volume: &VolumeId) -> Result<Vec<(String, Cid)>, MetadataError>;

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
    ) -> Result<(), MetadataError>;
}

/// The single-node `MetadataStore`: refs in the `Refs` column, serialized by a mutex.
#[derive(Debug)]
pub struct LocalMetadataStore {
    kv: Arc<dyn KvEngine>,
    swap_lock: Mutex<()>,
}

impl LocalMetadataStore {
    /// A store over `kv`.
    #[must_use]
    pub fn new(kv: Arc<dyn KvEngine>) -> Self {
        Self {
            kv,
            swap_lock: Mutex::new(()),
        }
    }
}

fn ref_key(volume: &VolumeId, branch: &str) -> Vec<u8> {
    let mut key = volume.as_bytes().to_vec();
    key.extend_from_slice(branch.as_bytes());
    key
}

fn decode_ref(branch: &str, value: &[u8]) -> Result<Cid, MetadataError> {
    Cid::from_slice(value).map_err(|_| MetadataError::CorruptRef {
        branch: branch.to_owned(),
    })
}

fn show(cid: Option<Cid>) -> String {
    cid.map_or_else(|| "no snapshot".to_owned(), |cid| cid.to_hex())
}

impl MetadataStore for LocalMetadataStore {
    fn get_ref(&self, volume: &VolumeId, branch: &str) -> Result<Option<Cid>, MetadataError> {
        self.kv
            .get(Column::Refs, &ref_key(volume, branch))?
            .map(|value| decode_ref(branch, &value))
            .transpose()
    }

    fn list_refs(&self, volume: &VolumeId) -> Result<Vec<(String, Cid)>, MetadataError> {
        let end = prefix_end(volume.as_bytes());
        let pairs = self
            .kv
            .scan(Column::Refs, volume.as_bytes(), end.as_deref(), usize::MAX)?;
        pairs
            .into_iter()
            .map(|(key, value)| {
                let branch = String::from_utf8_lossy(&key[16..]).into_owned();
                let cid = decode_ref(&branch, &value)?;
                Ok((branch, cid))
            })
            .collect()
    }

    fn compare_and_swap_ref(
        &self,
        volume: &VolumeId,
        branch: &str,
        expected: Option<Cid>,
        new: Option<Cid>,
    ) -> Result<(), MetadataError> {
        let _guard = self
            .swap_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = self.get_ref(volume, branch)?;
        if current != expected {
            return Err(MetadataError::Conflict {
                branch: branch.to_owned(),
                expected: show(expected),
                found: show(current),
            });
        }
        let mut batch = WriteBatch::new();
        match new {
            Some(cid) => batch.put(
                Column::Refs,
                ref_key(volume, branch),
                cid.as_bytes().to_vec(),
            ),
            None => batch.delete(Column::Refs, ref_key(volume, branch)),
        }
        // The ref update is what acknowledges a snapshot: it is synced before returning.
        self.kv.write(batch, Durability::Synced)?;
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
}
