//! Reed-Solomon erasure coding of chunk ciphertext into k data + m parity shards, and the
//! versioned shard record that stores each shard with its own BLAKE3, so scrub can find
//! bit-rot in any single shard and rebuild it from the others.
//!
//! ```text
//! shard record v2 = version:u8=2 | k-1:u8 | m:u8 | index:u8 | ciphertext_len:u32le
//!                 | checksum[32] (only when k+m > 1) | payload
//! checksum        = BLAKE3(the 8 header bytes before it || payload)
//! ```
//!
//! The checksum covers the header too, so a flipped layout or index byte is caught, not
//! just a flipped payload byte. A 1+0 record holds the whole ciphertext, whose BLAKE3 is
//! the cid its key already names, so it carries no second hash: the chunk store checks
//! the cid on every read (32 bytes saved per chunk on the default layout).
//!
//! Version 1 (`k:u16le | m:u16le | index:u16le | ciphertext_len:u32le | checksum[32]`,
//! checksum always present) is still read.

use std::fmt;
use std::str::FromStr;

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::ids::ShardIdx;

/// Version of the shard record format this build writes.
pub const SHARD_FORMAT_VERSION: u8 = 2;
const SHARD_V1: u8 = 1;
const SHARD_V1_HEADER_BYTES: usize = 1 + 2 + 2 + 2 + 4 + 32;
/// Header bytes of a v2 record before the (optional) checksum.
const SHARD_V2_FIXED_BYTES: usize = 1 + 1 + 1 + 1 + 4;
const CHECKSUM_BYTES: usize = 32;
/// The largest ciphertext a shard record can describe.
pub const CIPHERTEXT_BYTES_MAX: usize = u32::MAX as usize;

/// Errors of erasure coding and shard records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErasureError {
    /// A layout outside k >= 1, k + m <= 256.
    #[error("invalid erasure layout {data}+{parity}: need k >= 1 and k + m <= 256")]
    InvalidLayout { data: usize, parity: usize },
    /// `--ec` text that is not `K+M`.
    #[error("invalid erasure layout {input:?}: expected K+M, e.g. 4+2")]
    Unparsable { input: String },
    /// Fewer than k intact shards: the chunk cannot be rebuilt.
    #[error("only {available} of the {needed} shards needed are intact")]
    TooFewShards { available: usize, needed: usize },
    /// A shard record that does not decode or whose payload fails its hash.
    #[error("shard record is corrupt: {reason}")]
    CorruptShard { reason: String },
    /// The ciphertext is too large for a shard record.
    #[error("ciphertext of {len} bytes is too large to erasure-code")]
    TooLarge { len: usize },
}

/// k data shards + m parity shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErasureLayout {
    data_shards: u16,
    parity_shards: u16,
}

impl ErasureLayout {
    /// One shard, no parity: the single-node default.
    pub const SINGLE: Self = Self {
        data_shards: 1,
        parity_shards: 0,
    };

    /// A validated layout.
    ///
    /// # Errors
    /// [`ErasureError::InvalidLayout`] unless k >= 1 and k + m <= 256.
    pub fn new(data_shards: usize, parity_shards: usize) -> Result<Self, ErasureError> {
        let invalid = ErasureError::InvalidLayout {
            data: data_shards,
            parity: parity_shards,
        };
        if data_shards == 0 || data_shards.saturating_add(parity_shards) > ShardIdx::COUNT_MAX {
            return Err(invalid);
        }
        Ok(Self {
            data_shards: u16::try_from(data_shards).map_err(|_| invalid.clone())?,
            parity_shards: u16::try_from(parity_shards).map_err(|_| invalid)?,
        })
    }

    /// k.
    #[must_use]
    pub fn data_shards(self) -> usize {
        usize::from(self.data_shards)
    }

    /// m.
    #[must_use]
    pub fn parity_shards(self) -> usize {
        usize::from(self.parity_shards)
    }

    /// k + m.
    #[must_use]
    pub fn total_shards(self) -> usize {
        self.data_shards() + self.parity_shards()
    }

    /// Bytes in each shard of a ciphertext of `ciphertext_len` bytes.
    #[must_use]
    pub fn shard_len(self, ciphertext_len: usize) -> usize {
        ciphertext_len.div_ceil(self.data_shards()).max(1)
    }
}

impl fmt::Display for ErasureLayout {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}+{}", self.data_shards, self.parity_shards)
    }
}

impl FromStr for ErasureLayout {
    type Err = ErasureError;

    fn from_str(text: &str) -> Result<Self, ErasureError> {
        let unparsable = || ErasureError::Unparsable {
            input: text.chars().take(40).collect(),
        };
        let (data, parity) = text.split_once('+').ok_or_else(unparsable)?;
        let data = data.trim().parse::<usize>().map_err(|_| unparsable())?;
        let parity = parity.trim().parse::<usize>().map_err(|_| unparsable())?;
        Self::new(data, parity)
    }
}

/// An encoder/decoder for one layout. Building the Reed-Solomon matrices costs a little,
/// so keep one per layout rather than one per chunk.
pub struct ErasureCoder {
    layout: ErasureLayout,
    codec: Option<ReedSolomon>,
}

impl fmt::Debug for ErasureCoder {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ErasureCoder")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl ErasureCoder {
    /// A coder for `layout`.
    ///
    /// # Errors
    /// Only if the Reed-Solomon library refuses a validated layout (it does not).
    pub fn new(layout: ErasureLayout) -> Result<Self, ErasureError> {
        let codec = if layout.parity_shards() == 0 {
            None
        } else {
            Some(
                ReedSolomon::new(layout.data_shards(), layout.parity_shards()).map_err(|_| {
                    ErasureError::InvalidLayout {
                        data: layout.data_shards(),
                        parity: layout.parity_shards(),
                    }
                })?,
            )
        };
        Ok(Self { layout, codec })
    }

    /// The layout.
    #[must_use]
    pub fn layout(&self) -> ErasureLayout {
        self.layout
    }

    /// Splits `ciphertext` into k data shards (zero-padded) and computes m parity shards.
    ///
    /// # Errors
    /// [`ErasureError::TooLarge`] past 4 GiB.
    pub fn encode(&self, ciphertext: &[u8]) -> Result<Vec<Vec<u8>>, ErasureError> {
        if ciphertext.len() > CIPHERTEXT_BYTES_MAX {
            return Err(ErasureError::TooLarge {
                len: ciphertext.len(),
            });
        }
        let shard_len = self.layout.shard_len(ciphertext.len());
        let mut shards: Vec<Vec<u8>> = (0..self.layout.total_shards())
            .map(|index| {
                let start = (index * shard_len).min(ciphertext.len());
                let end = ((index + 1) * shard_len).min(ciphertext.len());
                let mut shard = if index < self.layout.data_shards() {
                    ciphertext[start..end].to_vec()
                } else {
                    Vec::new()
                };
                shard.resize(shard_len, 0);
                shard
            })
            .collect();
        if let Some(codec) = &self.codec {
            codec
                .encode(&mut shards)
                .map_err(|error| ErasureError::CorruptShard {
                    reason: format!("{error:?}"),
                })?;
        }
        Ok(shards)
    }

    /// Rebuilds the ciphertext from any k intact shards (`None` marks a missing or damaged
    /// one), filling in the missing shards so the caller can rewrite them.
    ///
    /// # Errors
    /// [`ErasureError::TooFewShards`] with fewer than k shards present.
    pub fn reconstruct(
        &self,
        shards: &mut [Option<Vec<u8>>],
        ciphertext_len: usize,
    ) -> Result<Vec<u8>, ErasureError> {
        let needed = self.layout.data_shards();
        let available = shards.iter().filter(|shard| shard.is_some()).count();
        if shards.len() != self.layout.total_shards() || available < needed {
            return Err(ErasureError::TooFewShards { available, needed });
        }
        if shards.iter().any(Option::is_none) {
            let codec = self
                .codec
                .as_ref()
                .ok_or(ErasureError::TooFewShards { available, needed })?;
            codec
                .reconstruct(shards)
                .map_err(|_| ErasureError::TooFewShards { available, needed })?;
        }
        let mut ciphertext = Vec::with_capacity(ciphertext_len);
        for shard in shards.iter().take(needed).flatten() {
            ciphertext.extend_from_slice(shard);
        }
        ciphertext.truncate(ciphertext_len);
        if ciphertext.len() != ciphertext_len {
            return Err(ErasureError::CorruptShard {
                reason: "shards shorter than the recorded length".into(),
            });
        }
        Ok(ciphertext)
    }
}

/// One stored shard: its place in the layout, the ciphertext length, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRecord {
    /// The layout the shard belongs to.
    pub layout: ErasureLayout,
    /// Its index (data shards first).
    pub index: ShardIdx,
    /// Length of the whole chunk ciphertext.
    pub ciphertext_len: u32,
    /// The shard's bytes.
    pub payload: Vec<u8>,
}

impl ShardRecord {
    /// Encodes the record (v2), with a BLAKE3 of header and payload unless the layout is
    /// a single shard (whose hash is the cid).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        Self::encode_parts(self.layout, self.index, self.ciphertext_len, &self.payload)
    }

    /// Encodes a record from its parts, borrowing the payload: a 1+0 chunk's only shard is
    /// its whole ciphertext, which need not be copied into a record first.
    #[must_use]
    pub fn encode_parts(
        layout: ErasureLayout,
        index: ShardIdx,
        ciphertext_len: u32,
        payload: &[u8],
    ) -> Vec<u8> {
        let checksummed = layout.total_shards() > 1;
        let mut bytes = Vec::with_capacity(
            SHARD_V2_FIXED_BYTES + usize::from(checksummed) * CHECKSUM_BYTES + payload.len(),
        );
        bytes.push(SHARD_FORMAT_VERSION);
        // k in 1..=256 and m, index in 0..=255: each fits a byte (k stored minus one).
        bytes.push(u8::try_from(layout.data_shards - 1).expect("k <= 256"));
        bytes.push(u8::try_from(layout.parity_shards).expect("m <= 255"));
        bytes.push(u8::try_from(index.get()).expect("a ShardIdx is below 256"));
        bytes.extend_from_slice(&ciphertext_len.to_le_bytes());
        if checksummed {
            let checksum = shard_checksum(&bytes, payload);
            bytes.extend_from_slice(&checksum);
        }
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Whether this record's payload is covered by its own checksum (every layout but
    /// 1+0, whose payload the caller must check against the cid).
    #[must_use]
    pub fn has_own_checksum(&self) -> bool {
        self.layout.total_shards() > 1
    }

    /// Decodes and verifies a record: format, layout, length and payload hash.
    ///
    /// # Errors
    /// [`ErasureError::CorruptShard`] naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, ErasureError> {
        let corrupt = |reason: String| ErasureError::CorruptShard { reason };
        let Some(&version) = bytes.first() else {
            return Err(corrupt("empty record".into()));
        };
        let (layout, index, ciphertext_len, header_len, checksummed) = match version {
            SHARD_FORMAT_VERSION => {
                if bytes.len() < SHARD_V2_FIXED_BYTES {
                    return Err(corrupt(format!(
                        "{} bytes, shorter than the {SHARD_V2_FIXED_BYTES}-byte header",
                        bytes.len()
                    )));
                }
                let layout = ErasureLayout::new(usize::from(bytes[1]) + 1, usize::from(bytes[2]))
                    .map_err(|error| corrupt(error.to_string()))?;
                let checksummed = layout.total_shards() > 1;
                let header_len = SHARD_V2_FIXED_BYTES + usize::from(checksummed) * CHECKSUM_BYTES;
                let ciphertext_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                (
                    layout,
                    usize::from(bytes[3]),
                    ciphertext_len,
                    header_len,
                    checksummed,
                )
            }
            SHARD_V1 => {
                if bytes.len() < SHARD_V1_HEADER_BYTES {
                    return Err(corrupt(format!(
                        "{} bytes, shorter than the {SHARD_V1_HEADER_BYTES}-byte v1 header",
                        bytes.len()
                    )));
                }
                let word = |offset: usize| u16::from_le_bytes([bytes[offset], bytes[offset + 1]]);
                let layout = ErasureLayout::new(usize::from(word(1)), usize::from(word(3)))
                    .map_err(|error| corrupt(error.to_string()))?;
                let ciphertext_len = u32::from_le_bytes([bytes[7], bytes[8], bytes[9], bytes[10]]);
                (
                    layout,
                    usize::from(word(5)),
                    ciphertext_len,
                    SHARD_V1_HEADER_BYTES,
                    true,
                )
            }
            other => return Err(corrupt(format!("unsupported version {other}"))),
        };
        if bytes.len() < header_len {
            return Err(corrupt(format!(
                "{} bytes, shorter than the {header_len}-byte header",
                bytes.len()
            )));
        }
        if index >= layout.total_shards() {
            return Err(corrupt(format!("index {index} outside layout {layout}")));
        }
        let payload = &bytes[header_len..];
        let expected_len = layout.shard_len(ciphertext_len as usize);
        if payload.len() != expected_len {
            return Err(corrupt(format!(
                "payload of {} bytes, expected {expected_len}",
                payload.len()
            )));
        }
        if checksummed {
            let checksum_at = header_len - CHECKSUM_BYTES;
            if shard_checksum(&bytes[..checksum_at], payload) != bytes[checksum_at..header_len] {
                return Err(corrupt("checksum mismatch (bit rot or tampering)".into()));
            }
        }
        Ok(Self {
            layout,
            index: ShardIdx::new(index).map_err(|error| corrupt(error.to_string()))?,
            ciphertext_len,
            payload: payload.to_vec(),
        })
    }
}

fn shard_checksum(header: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layouts_are_validated_and_parsed() {
        assert_eq!(
            "4+2".parse::<ErasureLayout>().unwrap(),
            ErasureLayout::new(4, 2).unwrap()
        );
        assert_eq!(
            "1+0".parse::<ErasureLayout>().unwrap(),
            ErasureLayout::SINGLE
        );
        assert!("0+2".parse::<ErasureLayout>().is_err());
        assert!("200+57".parse::<ErasureLayout>().is_err());
        assert!("256+0".parse::<ErasureLayout>().is_ok());
        assert!("4".parse::<ErasureLayout>().is_err());
        assert!("a+b".parse::<ErasureLayout>().is_err());
        assert_eq!(ErasureLayout::new(4, 2).unwrap().to_string(), "4+2");
    }

    #[test]
    fn shard_records_reject_garbage_and_bit_rot() {
        let record = ShardRecord {
            layout: ErasureLayout::new(2, 1).unwrap(),
            index: ShardIdx::new(2).unwrap(),
            ciphertext_len: 5,
            payload: vec![1, 2, 3],
        };
        let encoded = record.encode();
        assert_eq!(ShardRecord::decode(&encoded).unwrap(), record);
        for index in 0..encoded.len() {
            let mut damaged = encoded.clone();
            damaged[index] ^= 0x10;
            assert!(
                ShardRecord::decode(&damaged).is_err(),
                "flip at {index} went unnoticed"
            );
        }
        assert!(ShardRecord::decode(&encoded[..encoded.len() - 1]).is_err());
        assert!(ShardRecord::decode(&[]).is_err());
    }

    #[test]
    fn single_shard_records_carry_no_checksum_and_still_reject_header_damage() {
        let record = ShardRecord {
            layout: ErasureLayout::SINGLE,
            index: ShardIdx::new(0).unwrap(),
            ciphertext_len: 4,
            payload: vec![9, 8, 7, 6],
        };
        let encoded = record.encode();
        assert_eq!(encoded.len(), SHARD_V2_FIXED_BYTES + 4);
        assert!(!record.has_own_checksum());
        assert_eq!(ShardRecord::decode(&encoded).unwrap(), record);
        for index in 0..SHARD_V2_FIXED_BYTES {
            let mut damaged = encoded.clone();
            damaged[index] ^= 0x01;
            assert!(
                ShardRecord::decode(&damaged).is_err(),
                "flip at {index} went unnoticed"
            );
        }
    }

    #[test]
    fn version_1_records_are_still_read() {
        let payload = [1u8, 2, 3];
        let mut v1 = vec![SHARD_V1];
        for word in [2u16, 1, 2] {
            v1.extend_from_slice(&word.to_le_bytes());
        }
        v1.extend_from_slice(&5u32.to_le_bytes());
        let checksum = shard_checksum(&v1, &payload);
        v1.extend_from_slice(&checksum);
        v1.extend_from_slice(&payload);
        let record = ShardRecord::decode(&v1).unwrap();
        assert_eq!(record.layout, ErasureLayout::new(2, 1).unwrap());
        assert_eq!(record.index.get(), 2);
        assert_eq!(record.payload, payload);
        v1[20] ^= 1;
        assert!(ShardRecord::decode(&v1).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn any_k_shards_rebuild_the_chunk(data in proptest::collection::vec(any::<u8>(), 1..5000), k in 1usize..8, m in 0usize..5, lost_seed in any::<u64>()) {
            let coder = ErasureCoder::new(ErasureLayout::new(k, m).unwrap()).unwrap();
            let shards = coder.encode(&data).unwrap();
            prop_assert_eq!(shards.len(), k + m);
            // Lose up to m shards, chosen by the seed.
            let mut present: Vec<Option<Vec<u8>>> = shards.iter().cloned().map(Some).collect();
            let mut lost = 0;
            for (index, shard) in present.iter_mut().enumerate() {
                if lost < m && (lost_seed >> (index % 64)) & 1 == 1 {
                    *shard = None;
                    lost += 1;
                }
            }
            prop_assert_eq!(coder.reconstruct(&mut present, data.len()).unwrap(), data.clone());
            let rebuilt: Vec<Vec<u8>> = present.into_iter().map(Option::unwrap).collect();
            prop_assert_eq!(rebuilt, shards, "missing shards are rebuilt byte-exact");
        }

        #[test]
        fn more_than_m_losses_are_refused(data in proptest::collection::vec(any::<u8>(), 1..2000), k in 1usize..6, m in 0usize..3) {
            let coder = ErasureCoder::new(ErasureLayout::new(k, m).unwrap()).unwrap();
            let mut present: Vec<Option<Vec<u8>>> = coder.encode(&data).unwrap().into_iter().map(Some).collect();
            for shard in present.iter_mut().take(m + 1) {
                *shard = None;
            }
            let refused = matches!(coder.reconstruct(&mut present, data.len()), Err(ErasureError::TooFewShards { .. }));
            prop_assert!(refused);
        }
    }
}
