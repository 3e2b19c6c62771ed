//! Reed-Solomon erasure coding of chunk ciphertext into k data + m parity shards, and the
//! versioned shard record that stores each shard with its own BLAKE3, so scrub can find
//! bit-rot in any single shard and rebuild it from the others.
//!
//! ```text
//! shard record = version:u8=1 | k:u16le | m:u16le | index:u16le | ciphertext_len:u32le
//!              | checksum[32] | payload
//! checksum     = BLAKE3(the 11 header bytes before it || payload)
//! ```
//!
//! The checksum covers the header too, so a flipped layout or index byte is caught, not
//! just a flipped payload byte.

use std::fmt;
use std::str::FromStr;

use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::ids::ShardIdx;

/// Version of the shard record format.
pub const SHARD_FORMAT_VERSION: u8 = 1;
const SHARD_HEADER_BYTES: usize = 1 + 2 + 2 + 2 + 4 + 32;
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
    /// Encodes the record with a BLAKE3 of its payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(SHARD_HEADER_BYTES + self.payload.len());
        bytes.push(SHARD_FORMAT_VERSION);
        bytes.extend_from_slice(&self.layout.data_shards.to_le_bytes());
        bytes.extend_from_slice(&self.layout.parity_shards.to_le_bytes());
        bytes.extend_from_slice(
            &u16::try_from(self.index.get())
                .expect("a ShardIdx is below 256")
                .to_le_bytes(),
        );
        bytes.extend_from_slice(&self.ciphertext_len.to_le_bytes());
        let checksum = shard_checksum(&bytes, &self.payload);
        bytes.extend_from_slice(&checksum);
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    /// Decodes and verifies a record: format, layout, length and payload hash.
    ///
    /// # Errors
    /// [`ErasureError::CorruptShard`] naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, ErasureError> {
        let corrupt = |reason: String| ErasureError::CorruptShard { reason };
        if bytes.len() < SHARD_HEADER_BYTES {
            return Err(corrupt(format!(
                "{} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header",
                bytes.len()
            )));
        }
        if bytes[0] != SHARD_FORMAT_VERSION {
            return Err(corrupt(format!("unsupported version {}", bytes[0])));
        }
        let word = |offset: usize| u16::from_le_bytes([bytes[offset], bytes[offset + 1]]);
        let layout = ErasureLayout::new(usize::from(word(1)), usize::from(word(3)))
            .map_err(|error| corrupt(error.to_string()))?;
        let index = usize::from(word(5));
        if index >= layout.total_shards() {
            return Err(corrupt(format!("index {index} outside layout {layout}")));
        }
        let ciphertext_len = u32::from_le_bytes([bytes[7], bytes[8], bytes[9], bytes[10]]);
        let payload = &bytes[SHARD_HEADER_BYTES..];
        let expected_len = layout.shard_len(ciphertext_len as usize);
        if payload.len() != expected_len {
            return Err(corrupt(format!(
                "payload of {} bytes, expected {expected_len}",
                payload.len()
            )));
        }
        if shard_checksum(&bytes[..11], payload) != bytes[11..SHARD_HEADER_BYTES] {
            return Err(corrupt("checksum mismatch (bit rot or tampering)".into()));
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
