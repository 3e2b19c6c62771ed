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

/// A dedup domain: chunker parameters and (unless private to an encrypted volume) its key
/// wrapped to this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainRecord {
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
    pub fn signed_message(volume: &[u8; 16], snapshot: &[u8; 32], root: &[u8; 32]) -> Vec<u8> {
        let mut message = b"forge-vault reference index head v1".to_vec();
        message.extend_from_slice(volume);
        message.extend_from_slice(snapshot);
        message.extend_from_slice(root);
        message
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

/// Key prefixes in the `Meta` column.
pub mod keys {
    /// `volume/<name>` → [`super::VolumeRecord`].
    pub const VOLUME: &[u8] = b"volume/";
    /// `volkeys/<volume id>` → [`super::VolumeKeys`].
    pub const VOLUME_KEYS: &[u8] = b"volkeys/";
    /// `domain/<name>` → [`super::DomainRecord`].
    pub const DOMAIN: &[u8] = b"domain/";
    /// `dedup/<domain id><plaintext hash>` → cid.
    pub const DEDUP: &[u8] = b"dedup/";
    /// `snapshot/<volume id><cid>` → [`super::SnapshotListing`].
    pub const SNAPSHOT: &[u8] = b"snapshot/";
    /// `refindex/<volume id><cid>` → [`super::IndexHead`].
    pub const INDEX_HEAD: &[u8] = b"refindex/";

    /// `mountwork/<volume id><branch>` → [`super::WorkingState`].
    pub const WORKING_STATE: &[u8] = b"mountwork/";

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
    let mut bytes = vec![RECORD_FORMAT_VERSION];
    bytes.extend_from_slice(&postcard::to_stdvec(record).expect("records serialize with postcard"));
    bytes
}

/// Decodes a record, rejecting other versions and trailing bytes.
///
/// # Errors
/// [`NodeError::CorruptRecord`].
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    let corrupt = |reason: String| NodeError::CorruptRecord { what, reason };
    let (&version, body) = bytes.split_first().ok_or_else(|| corrupt("empty".into()))?;
    if version != RECORD_FORMAT_VERSION {
        return Err(corrupt(format!("unsupported record version {version}")));
    }
    let (record, rest) =
        postcard::take_from_bytes(body).map_err(|error| corrupt(error.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", rest.len())));
    }
    Ok(record)
}
