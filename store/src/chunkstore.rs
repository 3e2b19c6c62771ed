//! Chunk storage on a `KvEngine`: each chunk's ciphertext as k+m shard records in the
//! `Shards` column, keyed `cid || shard index`, and reading back with verification and
//! Reed-Solomon repair. A read never returns bytes that do not hash to the cid.

use forge_crypto::Cid;

use crate::erasure::{ErasureCoder, ErasureError, ShardRecord};
use crate::ids::ShardIdx;
use crate::kv::{Column, KvEngine, KvError, WriteBatch, prefix_end};

/// Errors reading or writing chunks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkStoreError {
    /// No shard of the chunk is stored.
    #[error("chunk {cid} is missing from the store")]
    Missing { cid: Cid },
    /// Too many shards are damaged or missing to rebuild the chunk.
    #[error(
        "chunk {cid} is unreadable: {intact} intact shards, {needed} needed ({damaged} damaged)"
    )]
    Unrecoverable {
        cid: Cid,
        intact: usize,
        needed: usize,
        damaged: usize,
    },
    /// Erasure coding failed.
    #[error(transparent)]
    Erasure(#[from] ErasureError),
    /// The engine failed.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A shard index out of range (a layout bug, never user input).
    #[error(transparent)]
    Id(#[from] crate::ids::IdError),
    /// Bytes offered under a cid they do not hash to (from a peer, say): refused, never
    /// stored.
    #[error("bytes offered as chunk {cid} hash to {actual}: refused")]
    CidMismatch { cid: Cid, actual: Cid },
}

/// Ciphertext together with its cid, checked: the only thing [`stage_chunk`] stores.
/// Bytes this process sealed are hashed to get their cid ([`VerifiedChunk::hashed`]);
/// bytes from anywhere else are checked against the cid they came with
/// ([`VerifiedChunk::check`]), in release builds too.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedChunk<'a> {
    cid: Cid,
    ciphertext: &'a [u8],
}

impl<'a> VerifiedChunk<'a> {
    /// Bytes sealed here: their cid is their hash.
    #[must_use]
    pub fn hashed(ciphertext: &'a [u8]) -> Self {
        Self {
            cid: Cid::of(ciphertext),
            ciphertext,
        }
    }

    /// Bytes that arrived named `cid`.
    ///
    /// # Errors
    /// [`ChunkStoreError::CidMismatch`] when they hash to something else.
    pub fn check(cid: Cid, ciphertext: &'a [u8]) -> Result<Self, ChunkStoreError> {
        let actual = Cid::of(ciphertext);
        if actual != cid {
            return Err(ChunkStoreError::CidMismatch { cid, actual });
        }
        Ok(Self { cid, ciphertext })
    }

    /// `ciphertext` taken to be `cid`'s without checking: the simulator's injected bug
    /// `sync-skips-cid-check`, never anything else.
    #[cfg(feature = "simulation")]
    #[must_use]
    pub fn unchecked(cid: Cid, ciphertext: &'a [u8]) -> Self {
        Self { cid, ciphertext }
    }

    /// The chunk's cid.
    #[must_use]
    pub fn cid(&self) -> Cid {
        self.cid
    }
}

/// The key of shard `index` of chunk `cid`.
#[must_use]
pub fn shard_key(cid: &Cid, index: ShardIdx) -> Vec<u8> {
    let mut key = Vec::with_capacity(34);
    key.extend_from_slice(cid.as_bytes());
    key.extend_from_slice(
        &u16::try_from(index.get())
            .expect("a ShardIdx is below 256")
            .to_be_bytes(),
    );
    key
}

/// Adds the shards of a verified chunk to `batch`; returns bytes staged.
///
/// # Errors
/// Erasure errors (a ciphertext over 4 GiB).
pub fn stage_chunk(
    batch: &mut WriteBatch,
    coder: &ErasureCoder,
    chunk: VerifiedChunk<'_>,
) -> Result<usize, ChunkStoreError> {
    let (cid, ciphertext) = (&chunk.cid, chunk.ciphertext);
    debug_assert!(
        cid.matches(ciphertext),
        "a cid is the BLAKE3 of its ciphertext"
    );
    let ciphertext_len = u32::try_from(ciphertext.len()).map_err(|_| ErasureError::TooLarge {
        len: ciphertext.len(),
    })?;
    if coder.layout().total_shards() == 1 {
        let record =
            ShardRecord::encode_parts(coder.layout(), ShardIdx::FIRST, ciphertext_len, ciphertext);
        let staged = record.len();
        batch.put(Column::Shards, shard_key(cid, ShardIdx::FIRST), record);
        return Ok(staged);
    }
    let mut staged = 0;
    for (index, payload) in coder.encode(ciphertext)?.into_iter().enumerate() {
        let index = ShardIdx::new(index)?;
        let record = ShardRecord {
            layout: coder.layout(),
            index,
            ciphertext_len,
            payload,
        }
        .encode();
        staged += record.len();
        batch.put(Column::Shards, shard_key(cid, index), record);
    }
    Ok(staged)
}

/// Whether any shard of chunk `cid` is stored (a cheap existence check for dedup).
///
/// # Errors
/// Engine errors.
pub fn has_chunk(kv: &dyn KvEngine, cid: &Cid) -> Result<bool, ChunkStoreError> {
    let end = prefix_end(cid.as_bytes());
    Ok(!kv
        .scan(Column::Shards, cid.as_bytes(), end.as_deref(), 1)?
        .is_empty())
}

/// Whether shard 0 of chunk `cid` is stored: the dedup check of a write path. Cheaper than
/// [`has_chunk`] (a point lookup behind bloom filters, where `has_chunk` must scan), and a
/// chunk that lost shard 0 counts as absent, so writing it again heals it.
///
/// # Errors
/// Engine errors.
pub fn has_first_shard(kv: &dyn KvEngine, cid: &Cid) -> Result<bool, ChunkStoreError> {
    Ok(kv.contains(Column::Shards, &shard_key(cid, ShardIdx::FIRST))?)
}

/// What reading a chunk found.
#[derive(Debug)]
pub struct ChunkRead {
    /// The verified ciphertext.
    pub ciphertext: Vec<u8>,
    /// Shards that were missing or damaged and were rebuilt (index, record bytes), for the
    /// caller to write back when repairing.
    pub rebuilt: Vec<(ShardIdx, Vec<u8>)>,
}

/// Reads and verifies chunk `cid`, rebuilding from parity when shards are damaged.
///
/// # Errors
/// [`ChunkStoreError::Missing`] or [`ChunkStoreError::Unrecoverable`]; engine errors.
pub fn read_chunk(kv: &dyn KvEngine, cid: &Cid) -> Result<ChunkRead, ChunkStoreError> {
    // The common case, a 1+0 chunk, is one point lookup: cheaper than the scan below
    // (which creates an iterator over every level). Anything else takes the full path.
    if let Some(value) = kv.get(Column::Shards, &shard_key(cid, ShardIdx::FIRST))?
        && let Ok(record) = ShardRecord::decode(&value)
        && record.layout.total_shards() == 1
        && cid.matches(&record.payload)
    {
        return Ok(ChunkRead {
            ciphertext: record.payload,
            rebuilt: Vec::new(),
        });
    }
    let end = prefix_end(cid.as_bytes());
    let stored = kv.scan(
        Column::Shards,
        cid.as_bytes(),
        end.as_deref(),
        ShardIdx::COUNT_MAX,
    )?;
    if stored.is_empty() {
        return Err(ChunkStoreError::Missing { cid: *cid });
    }
    let shards: Vec<(usize, Vec<u8>)> = stored
        .into_iter()
        .map(|(key, value)| {
            // The index the key names; a key of another shape matches no record.
            let index = match key.get(32..) {
                Some([high, low]) => usize::from(u16::from_be_bytes([*high, *low])),
                _ => usize::MAX,
            };
            (index, value)
        })
        .collect();
    chunk_from_shards(cid, &shards)
}

/// Rebuilds chunk `cid` from shard records gathered anywhere (this engine, other members
/// of a volume group): each `(index, record)` is the index its holder filed it under and
/// the record. A record that does not decode, or names another index, layout or length
/// than the rest, counts as damaged. The ciphertext is returned only if it hashes to
/// `cid`, with the records of the shards that were missing rebuilt.
///
/// # Errors
/// [`ChunkStoreError::Missing`] for no records; [`ChunkStoreError::Unrecoverable`] when
/// too few are intact or the whole fails its cid.
pub fn chunk_from_shards(
    cid: &Cid,
    stored: &[(usize, Vec<u8>)],
) -> Result<ChunkRead, ChunkStoreError> {
    if stored.is_empty() {
        return Err(ChunkStoreError::Missing { cid: *cid });
    }
    let mut records = Vec::with_capacity(stored.len());
    let mut damaged = 0;
    for (index, value) in stored {
        match ShardRecord::decode(value) {
            Ok(record) if record.index.get() == *index => records.push(record),
            _ => damaged += 1,
        }
    }
    let Some(first) = records.first() else {
        return Err(ChunkStoreError::Unrecoverable {
            cid: *cid,
            intact: 0,
            needed: 1,
            damaged,
        });
    };
    let (layout, ciphertext_len) = (first.layout, first.ciphertext_len);
    let needed = layout.data_shards();
    let mut slots: Vec<Option<Vec<u8>>> = vec![None; layout.total_shards()];
    for record in records {
        if record.layout == layout && record.ciphertext_len == ciphertext_len {
            // The same shard twice (from two holders) fills one slot.
            slots[record.index.get()] = Some(record.payload);
        } else {
            damaged += 1;
        }
    }
    let intact = slots.iter().filter(|slot| slot.is_some()).count();
    let missing: Vec<usize> = (0..slots.len())
        .filter(|index| slots[*index].is_none())
        .collect();
    let unrecoverable = || ChunkStoreError::Unrecoverable {
        cid: *cid,
        intact,
        needed,
        damaged,
    };
    let coder = ErasureCoder::new(layout)?;
    let ciphertext = coder
        .reconstruct(&mut slots, ciphertext_len as usize)
        .map_err(|_| unrecoverable())?;
    if !cid.matches(&ciphertext) {
        if layout.total_shards() == 1 {
            // A 1+0 record has no checksum of its own: the cid is its hash, and it failed.
            return Err(ChunkStoreError::Unrecoverable {
                cid: *cid,
                intact: 0,
                needed,
                damaged: damaged + 1,
            });
        }
        // Every shard passed its checksum, yet the whole does not hash to the cid: the
        // chunk was stored wrong. Never hand such bytes out.
        return Err(unrecoverable());
    }
    let mut rebuilt = Vec::with_capacity(missing.len());
    for index in missing {
        let payload = slots[index].take().unwrap_or_default();
        let index = ShardIdx::new(index)?;
        rebuilt.push((
            index,
            ShardRecord {
                layout,
                index,
                ciphertext_len,
                payload,
            }
            .encode(),
        ));
    }
    Ok(ChunkRead {
        ciphertext,
        rebuilt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erasure::ErasureLayout;
    use crate::kv::{Durability, MemKv};

    fn store_chunk(kv: &MemKv, layout: &str, ciphertext: &[u8]) -> Cid {
        let coder = ErasureCoder::new(layout.parse().unwrap()).unwrap();
        let cid = Cid::of(ciphertext);
        let mut batch = WriteBatch::new();
        stage_chunk(
            &mut batch,
            &coder,
            VerifiedChunk::check(cid, ciphertext).unwrap(),
        )
        .unwrap();
        kv.write(batch, Durability::Synced).unwrap();
        cid
    }

    fn corrupt(kv: &MemKv, cid: &Cid, index: usize) {
        let key = shard_key(cid, ShardIdx::new(index).unwrap());
        let mut value = kv.get(Column::Shards, &key).unwrap().unwrap();
        let last = value.len() - 1;
        value[last] ^= 0x55;
        let mut batch = WriteBatch::new();
        batch.put(Column::Shards, key, value);
        kv.write(batch, Durability::Synced).unwrap();
    }

    #[test]
    fn reads_repair_from_parity_and_refuse_when_they_cannot() {
        let kv = MemKv::new();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let cid = store_chunk(&kv, "3+2", &data);
        assert_eq!(read_chunk(&kv, &cid).unwrap().ciphertext, data);
        corrupt(&kv, &cid, 0);
        corrupt(&kv, &cid, 4);
        let read = read_chunk(&kv, &cid).unwrap();
        assert_eq!(read.ciphertext, data);
        assert_eq!(
            read.rebuilt
                .iter()
                .map(|(index, _)| index.get())
                .collect::<Vec<_>>(),
            vec![0, 4]
        );
        corrupt(&kv, &cid, 1);
        assert!(matches!(
            read_chunk(&kv, &cid),
            Err(ChunkStoreError::Unrecoverable {
                intact: 2,
                needed: 3,
                ..
            })
        ));
        assert!(matches!(
            read_chunk(&kv, &Cid::of(b"nothing")),
            Err(ChunkStoreError::Missing { .. })
        ));
    }

    #[test]
    fn single_shard_corruption_without_parity_names_the_chunk() {
        let kv = MemKv::new();
        let cid = store_chunk(&kv, "1+0", b"some ciphertext");
        corrupt(&kv, &cid, 0);
        let error = read_chunk(&kv, &cid).unwrap_err();
        assert!(error.to_string().contains(&cid.to_hex()), "{error}");
        assert!(
            matches!(
                error,
                ChunkStoreError::Unrecoverable {
                    intact: 0,
                    needed: 1,
                    damaged: 1,
                    ..
                }
            ),
            "{error:?}"
        );
        // Every single-byte flip, header or payload, is refused.
        let key = shard_key(&cid, ShardIdx::new(0).unwrap());
        let pristine = ShardRecord {
            layout: ErasureLayout::SINGLE,
            index: ShardIdx::new(0).unwrap(),
            ciphertext_len: 15,
            payload: b"some ciphertext".to_vec(),
        }
        .encode();
        for at in 0..pristine.len() {
            let mut damaged = pristine.clone();
            damaged[at] ^= 0x04;
            let mut batch = WriteBatch::new();
            batch.put(Column::Shards, key.clone(), damaged);
            kv.write(batch, Durability::Synced).unwrap();
            assert!(
                read_chunk(&kv, &cid).is_err(),
                "flip at {at} went unnoticed"
            );
        }
    }

    #[test]
    fn bytes_that_do_not_hash_to_their_cid_are_refused_in_release_builds_too() {
        let claimed = Cid::of(b"what the peer said it sent");
        let error = VerifiedChunk::check(claimed, b"what it sent").unwrap_err();
        assert!(matches!(error, ChunkStoreError::CidMismatch { cid, .. } if cid == claimed));
        assert!(VerifiedChunk::check(Cid::of(b"same"), b"same").is_ok());
    }
}
