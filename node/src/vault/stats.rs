//! Statistics: per volume (what its snapshots reach) and for the whole vault (disk use).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use forge_crypto::Cid;
use forge_store::erasure::ShardRecord;
use forge_store::kv::{Column, ColumnUsage, prefix_end};

use super::{PassphraseSource, Vault};
use crate::error::{IntegrityFault, NodeError, Result};

/// Numbers about one volume.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeStats {
    /// File bytes over all its snapshots.
    pub logical_bytes: u64,
    /// Bytes on disk of the distinct shards and objects its snapshots reach (parity
    /// included, shared chunks counted in full).
    pub stored_bytes: u64,
    /// Distinct data chunks.
    pub unique_chunks: u64,
    /// logical bytes / plaintext bytes of the unique chunks.
    pub dedup_ratio: f64,
    /// plaintext bytes / ciphertext bytes of the unique chunks.
    pub compression_ratio: f64,
    /// Snapshots listed.
    pub snapshots: u64,
}

/// Numbers about the whole vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultStats {
    /// Bytes of files under the data directory.
    pub physical_bytes: u64,
    /// Volumes.
    pub volumes: u64,
    /// What each column family of the store occupies, by name.
    pub columns: Vec<(&'static str, ColumnUsage)>,
}

impl Vault {
    /// Statistics of volume `name`.
    ///
    /// # Errors
    /// Unknown volume, integrity errors while walking.
    pub fn volume_stats(
        &self,
        name: &str,
        passphrase: PassphraseSource<'_>,
    ) -> Result<VolumeStats> {
        let volume = self.open_volume(name, passphrase)?;
        let listings = self.snapshot_listings(&volume.record)?;
        let mut objects = BTreeSet::new();
        let mut chunks: BTreeMap<Cid, u64> = BTreeMap::new();
        let mut logical_bytes = 0;
        for (snapshot, listing) in &listings {
            logical_bytes += listing.logical_bytes;
            objects.insert(*snapshot);
            let commit = self.read_commit(&volume, snapshot)?;
            self.walk_tree(
                &volume,
                Cid::from_bytes(commit.root),
                &mut objects,
                &mut |_, chunk| {
                    chunks.insert(chunk.cid(), u64::from(chunk.len));
                    Ok(())
                },
            )?;
        }
        let mut stored_bytes = 0;
        for cid in &objects {
            let stored = self
                .kv()
                .get(Column::Objects, cid.as_bytes())?
                .ok_or(IntegrityFault::MissingObject { cid: *cid })?;
            stored_bytes += stored.len() as u64;
        }
        let (mut plaintext_bytes, mut ciphertext_bytes) = (0u64, 0u64);
        for (cid, plaintext_len) in &chunks {
            plaintext_bytes += plaintext_len;
            let end = prefix_end(cid.as_bytes());
            for (_, value) in
                self.kv()
                    .scan(Column::Shards, cid.as_bytes(), end.as_deref(), usize::MAX)?
            {
                stored_bytes += value.len() as u64;
                if let Ok(record) = ShardRecord::decode(&value)
                    && record.index.get() == 0
                {
                    ciphertext_bytes += u64::from(record.ciphertext_len);
                }
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let ratio = |numerator: u64, denominator: u64| {
            if denominator == 0 {
                1.0
            } else {
                numerator as f64 / denominator as f64
            }
        };
        Ok(VolumeStats {
            logical_bytes,
            stored_bytes,
            unique_chunks: chunks.len() as u64,
            dedup_ratio: ratio(logical_bytes, plaintext_bytes),
            compression_ratio: ratio(plaintext_bytes, ciphertext_bytes),
            snapshots: listings.len() as u64,
        })
    }

    /// What can be counted of volume `name` without its keys, from its snapshot listings
    /// and their signed reference indexes (what a daemon, which cannot prompt, shows for an
    /// encrypted volume): logical and stored bytes, unique chunks, snapshots. The ratios
    /// need the chunks' plaintext lengths, which only the keys reveal: they stay 0.
    ///
    /// # Errors
    /// Unknown volume, a broken index, engine errors.
    pub fn volume_stats_keyless(&self, name: &str) -> Result<VolumeStats> {
        let record = self.require_volume(name)?;
        let listings = self.snapshot_listings(&record)?;
        let mut reached: BTreeSet<Cid> = BTreeSet::new();
        let mut logical_bytes = 0;
        for (snapshot, listing) in &listings {
            logical_bytes += listing.logical_bytes;
            // The commit is not in its own index (the index is written first).
            reached.insert(*snapshot);
            reached.extend(self.walk_index(&record, snapshot)?.0);
        }
        let (mut stored_bytes, mut unique_chunks) = (0, 0);
        for cid in &reached {
            if let Some(object) = self.kv().get(Column::Objects, cid.as_bytes())? {
                stored_bytes += object.len() as u64;
                continue;
            }
            let end = prefix_end(cid.as_bytes());
            let shards =
                self.kv()
                    .scan(Column::Shards, cid.as_bytes(), end.as_deref(), usize::MAX)?;
            if !shards.is_empty() {
                unique_chunks += 1;
                stored_bytes += shards
                    .iter()
                    .map(|(_, value)| value.len() as u64)
                    .sum::<u64>();
            }
        }
        Ok(VolumeStats {
            logical_bytes,
            stored_bytes,
            unique_chunks,
            dedup_ratio: 0.0,
            compression_ratio: 0.0,
            snapshots: listings.len() as u64,
        })
    }

    /// Statistics of the whole vault.
    ///
    /// # Errors
    /// I/O errors reading the data directory.
    pub fn vault_stats(&self) -> Result<VaultStats> {
        Ok(VaultStats {
            physical_bytes: disk_usage(self.data_dir.path())?,
            volumes: self.list_volumes()?.len() as u64,
            columns: Column::ALL
                .iter()
                .map(|column| Ok((column.name(), self.kv().usage(*column)?)))
                .collect::<Result<_>>()?,
        })
    }
}

/// Bytes of the files under `path`. Files come and go while it counts (a mount's staging
/// files, RocksDB's compactions): one that vanished between listing and stat counts as
/// nothing, never as an error. Iterative, so no depth meets the stack.
fn disk_usage(path: &Path) -> Result<u64> {
    let vanished = |error: &std::io::Error| error.kind() == std::io::ErrorKind::NotFound;
    let mut total = 0;
    let mut pending = vec![path.to_owned()];
    while let Some(directory) = pending.pop() {
        let entries = match std::fs::read_dir(&directory) {
            Ok(entries) => entries,
            Err(error) if vanished(&error) && directory != path => continue,
            Err(error) => return Err(NodeError::io("reading", &directory)(error)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) if vanished(&error) => continue,
                Err(error) => return Err(NodeError::io("reading", &directory)(error)),
            };
            match entry.metadata() {
                Ok(metadata) if metadata.is_dir() => pending.push(entry.path()),
                Ok(metadata) => total += metadata.len(),
                Err(error) if vanished(&error) => {}
                Err(error) => return Err(NodeError::io("reading", entry.path())(error)),
            }
        }
    }
    Ok(total)
}
