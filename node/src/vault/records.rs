//! The vault's own records in the `Meta` column: volumes, dedup domains, key material,
//! the dedup index and the snapshot listing. Each value is `version:u8 | postcard(record)`.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{NodeError, Result};

/// Version of the record encoding.
pub const RECORD_FORMAT_VERSION: u8 = 1;

/// A volume's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// 128 random bits.
    pub id: [u8; 16],
    /// The user's name for it.
    pub name: String,
    /// Erasure layout k.
    pub data_shards: u16,
    /// Erasure layout m.
    pub parity_shards: u16,
    /// Name of its dedup domain.
    pub domain: String,
    /// Whether its keys are wrapped to a passphrase instead of the node.
    pub encrypted: bool,
    /// Creation time, ns since the epoch.
    pub created_ns: i64,
}

/// The chunker a domain cuts with. Version 1: FastCDC 2020 (`fastcdc` pinned exactly),
/// normalization level 1, the gear table seeded from the domain key; its cut points are
/// pinned by a known-answer test. Another algorithm or table is another version: a cid
/// must never change because a dependency did.
pub const CHUNKER_VERSION: u8 = 1;

/// The version of the domain record that carries [`DomainRecord::chunker_version`]
/// (version 1 records, without it, were all cut by chunker version 1).
pub const DOMAIN_RECORD_VERSION: u8 = 2;

/// A dedup domain: chunker parameters and (unless private to an encrypted volume) its key
/// wrapped to this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRecord {
    /// The chunker version its chunks were cut with ([`CHUNKER_VERSION`]).
    pub chunker_version: u8,
    /// 128 random bits; scopes the dedup index.
    pub id: [u8; 16],
    /// Chunk size bounds.
    pub chunk_min_bytes: u32,
    /// Average chunk size.
    pub chunk_avg_bytes: u32,
    /// Maximum chunk size.
    pub chunk_max_bytes: u32,
    /// A `Domain` key envelope to this node; `None` for a domain private to an encrypted
    /// volume (its key travels only inside that volume's passphrase-protected keys).
    pub key_envelope: Option<Vec<u8>>,
}

/// A domain record as version 1 stored it (no chunker version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DomainRecordV1 {
    id: [u8; 16],
    chunk_min_bytes: u32,
    chunk_avg_bytes: u32,
    chunk_max_bytes: u32,
    key_envelope: Option<Vec<u8>>,
}

impl DomainRecord {
    /// Encodes as record version [`DOMAIN_RECORD_VERSION`].
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(DOMAIN_RECORD_VERSION, self)
    }

    /// Decodes version 2, or version 1 (chunker version 1).
    ///
    /// # Errors
    /// [`NodeError::CorruptRecord`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        match bytes.first() {
            Some(&DOMAIN_RECORD_VERSION) => {
                decode_versioned("domain", DOMAIN_RECORD_VERSION, bytes)
            }
            _ => {
                let old: DomainRecordV1 = decode("domain", bytes)?;
                Ok(Self {
                    chunker_version: 1,
                    id: old.id,
                    chunk_min_bytes: old.chunk_min_bytes,
                    chunk_avg_bytes: old.chunk_avg_bytes,
                    chunk_max_bytes: old.chunk_max_bytes,
                    key_envelope: old.key_envelope,
                })
            }
        }
    }
}

/// How a volume's keys are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeKeys {
    /// A writer envelope wrapped to this node's ML-KEM + X25519 key.
    WrappedToNode(Vec<u8>),
    /// Writer contents protected by the user's passphrase (Argon2id).
    Passphrase(Vec<u8>),
}

/// A snapshot's entry in its volume's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotListing {
    /// Commit time, ns since the epoch.
    pub time_ns: i64,
    /// File bytes in the snapshot.
    pub logical_bytes: u64,
    /// Files in the snapshot.
    pub file_count: u64,
}

/// The signed head of a snapshot's reference index: plaintext, so a vault without keys can
/// find and verify every cid the snapshot reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexHead {
    /// Root node id of the reference index.
    pub root: [u8; 32],
    /// The node that signed it.
    pub author: [u8; 32],
    /// ML-DSA-65 signature (domain `Snapshot`) over [`IndexHead::signed_message`].
    pub signature: Vec<u8>,
}

impl IndexHead {
    /// The bytes signed: a label, the volume, the snapshot and the index root.
    #[must_use]
    /// (One definition, in forge-mesh: a vault receiving a sync checks heads with it.)
    pub fn signed_message(volume: &[u8; 16], snapshot: &[u8; 32], root: &[u8; 32]) -> Vec<u8> {
        forge_mesh::sync::index_head_message(volume, snapshot, root)
    }
}

/// The working tree of a read-write mount as of its last fsync: what the next mount of the
/// branch recovers after a crash. Deleted once committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingState {
    /// Root tree of the working state (stored, with everything it reaches).
    pub root: [u8; 32],
    /// The branch head the mount started from.
    pub base: Option<[u8; 32]>,
}

/// Keys of what stays in this node's own engine (the `Meta` column). What a volume group
/// replicates (volume, key and domain records, listings, index heads, working states)
/// lives in the metadata store's record spaces (`forge_store::metadata::RecordSpace`).
pub mod keys {
    /// `dedup/<domain id><plaintext hash>` → cid: a cache of this node's chunks.
    pub const DEDUP: &[u8] = b"dedup/";

    /// Joins a prefix and parts into a key.
    #[must_use]
    pub fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        let mut key = prefix.to_vec();
        for part in parts {
            key.extend_from_slice(part);
        }
        key
    }
}

/// Encodes a record with its version byte.
#[must_use]
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    encode_versioned(RECORD_FORMAT_VERSION, record)
}

fn encode_versioned<T: Serialize>(version: u8, record: &T) -> Vec<u8> {
    let mut bytes = vec![version];
    bytes.extend_from_slice(&postcard::to_stdvec(record).expect("records serialize with postcard"));
    bytes
}

/// Decodes a record, rejecting other versions and trailing bytes.
///
/// # Errors
/// [`NodeError::CorruptRecord`].
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    decode_versioned(what, RECORD_FORMAT_VERSION, bytes)
}

fn decode_versioned<T: DeserializeOwned>(
    what: &'static str,
    expected: u8,
    bytes: &[u8],
) -> Result<T> {
    let corrupt = |reason: String| NodeError::CorruptRecord { what, reason };
    let (&version, body) = bytes.split_first().ok_or_else(|| corrupt("empty".into()))?;
    if version != expected {
        return Err(corrupt(format!("unsupported record version {version}")));
    }
    let (record, rest) =
        postcard::take_from_bytes(body).map_err(|error| corrupt(error.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", rest.len())));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_domain_record_reads_as_chunker_version_1() {
        let old = DomainRecordV1 {
            id: [4; 16],
            chunk_min_bytes: 16 << 10,
            chunk_avg_bytes: 64 << 10,
            chunk_max_bytes: 256 << 10,
            key_envelope: Some(vec![1, 2, 3]),
        };
        let read = DomainRecord::decode(&encode(&old)).unwrap();
        assert_eq!(read.chunker_version, 1);
        assert_eq!(read.id, old.id);
        assert_eq!(DomainRecord::decode(&read.encode()).unwrap(), read);
        assert!(DomainRecord::decode(&[9, 1, 2]).is_err());
        assert!(DomainRecord::decode(&[]).is_err());
    }
}
