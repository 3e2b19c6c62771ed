//! Identifiers shared by every crate: volumes and shard positions. Content and node ids come
//! from forge-crypto ([`Cid`](forge_crypto::Cid), [`NodeId`](forge_crypto::NodeId)) and are
//! re-exported from this crate's root.

use std::fmt;
use std::str::FromStr;

/// Bytes in a volume id.
pub const VOLUME_ID_BYTES: usize = 16;

/// Errors parsing or building shared identifiers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// A volume id was not 32 hexadecimal characters.
    #[error("invalid volume id {input:?}: expected {expected} lower-case hex characters")]
    InvalidVolumeId { input: String, expected: usize },
    /// A shard index outside what any erasure layout allows.
    #[error("shard index {index} out of range: at most {max} shards per chunk")]
    ShardIndexOutOfRange { index: usize, max: usize },
}

/// A volume's id: 128 random bits chosen at creation, stable across renames and sites.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId([u8; VOLUME_ID_BYTES]);

impl VolumeId {
    /// Wraps raw bytes (the caller supplies randomness: this crate reads no RNG).
    #[must_use]
    pub const fn from_bytes(bytes: [u8; VOLUME_ID_BYTES]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; VOLUME_ID_BYTES] {
        &self.0
    }

    /// Lower-case hex, 32 characters.
    #[must_use]
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_hex())
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "VolumeId({})", self.to_hex())
    }
}

impl FromStr for VolumeId {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, IdError> {
        let invalid = || IdError::InvalidVolumeId {
            input: text.chars().take(80).collect(),
            expected: 2 * VOLUME_ID_BYTES,
        };
        if text.len() != 2 * VOLUME_ID_BYTES {
            return Err(invalid());
        }
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .map_err(|_| invalid())?;
        bytes.try_into().map(Self).map_err(|_| invalid())
    }
}

/// The position of a shard within its chunk's erasure layout: data shards `0..k`, then
/// parity shards `k..k+m`. k + m is at most [`ShardIdx::COUNT_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardIdx(u8);

impl ShardIdx {
    /// The most shards one chunk may have (Reed-Solomon over GF(2^8)).
    pub const COUNT_MAX: usize = 256;
    /// Shard 0, which every layout has.
    pub const FIRST: Self = Self(0);

    /// A shard index, checked against [`Self::COUNT_MAX`].
    ///
    /// # Errors
    /// [`IdError::ShardIndexOutOfRange`] for `index >= 256`.
    pub fn new(index: usize) -> Result<Self, IdError> {
        u8::try_from(index)
            .map(Self)
            .map_err(|_| IdError::ShardIndexOutOfRange {
                index,
                max: Self::COUNT_MAX,
            })
    }

    /// The index as a `usize`, for slicing.
    #[must_use]
    pub const fn get(self) -> usize {
        self.0 as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_round_trips_and_rejects_garbage() {
        let id = VolumeId::from_bytes([0xab; 16]);
        assert_eq!(id.to_string().parse::<VolumeId>().unwrap(), id);
        for bad in ["", "ab", &"g".repeat(32), &"a".repeat(33)] {
            assert!(bad.parse::<VolumeId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shard_index_bounds() {
        assert_eq!(ShardIdx::new(255).unwrap().get(), 255);
        assert!(ShardIdx::new(256).is_err());
    }
}
