//! Content-defined chunking: FastCDC (2020 variant) with a gear table seeded per dedup
//! domain, streaming from any reader with memory bounded by the maximum chunk size.

use std::io::Read;

use fastcdc::v2020::{self, Normalization, StreamCDC};

/// Chunk-size bounds of a dedup domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    /// No chunk is shorter (except a file's last).
    pub min_bytes: u32,
    /// The target average.
    pub avg_bytes: u32,
    /// No chunk is longer.
    pub max_bytes: u32,
}

impl ChunkerParams {
    /// The default: 16 / 64 / 256 KiB.
    pub const DEFAULT: Self = Self {
        min_bytes: 16 << 10,
        avg_bytes: 64 << 10,
        max_bytes: 256 << 10,
    };

    /// Bounds derived from an average, in the default's 1:4:16 ratio.
    ///
    /// # Errors
    /// [`ChunkerError::InvalidParams`] when the result is outside what FastCDC accepts.
    pub fn from_average(avg_bytes: u32) -> Result<Self, ChunkerError> {
        let params = Self {
            min_bytes: avg_bytes / 4,
            avg_bytes,
            max_bytes: avg_bytes.saturating_mul(4),
        };
        params.validate()?;
        Ok(params)
    }

    /// Checks the bounds against FastCDC's limits and each other.
    ///
    /// # Errors
    /// [`ChunkerError::InvalidParams`] naming the violated bound.
    pub fn validate(self) -> Result<(), ChunkerError> {
        let reject = |reason: String| Err(ChunkerError::InvalidParams { reason });
        if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&self.min_bytes) {
            return reject(format!(
                "minimum {} outside {}..={}",
                self.min_bytes,
                v2020::MINIMUM_MIN,
                v2020::MINIMUM_MAX
            ));
        }
        if !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&self.avg_bytes) {
            return reject(format!(
                "average {} outside {}..={}",
                self.avg_bytes,
                v2020::AVERAGE_MIN,
                v2020::AVERAGE_MAX
            ));
        }
        if !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&self.max_bytes) {
            return reject(format!(
                "maximum {} outside {}..={}",
                self.max_bytes,
                v2020::MAXIMUM_MIN,
                v2020::MAXIMUM_MAX
            ));
        }
        if !(self.min_bytes <= self.avg_bytes && self.avg_bytes <= self.max_bytes) {
            return reject(format!(
                "need min <= avg <= max, got {}/{}/{}",
                self.min_bytes, self.avg_bytes, self.max_bytes
            ));
        }
        Ok(())
    }
}

impl Default for ChunkerParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Errors of chunking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkerError {
    /// Bounds outside what FastCDC accepts.
    #[error("invalid chunk sizes: {reason}")]
    InvalidParams { reason: String },
    /// Reading the source failed.
    #[error("reading input: {0}")]
    Read(#[from] std::io::Error),
}

/// A domain's chunker: its size bounds and its gear-table seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunker {
    params: ChunkerParams,
    seed: u64,
}

/// One chunk of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk in the stream.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

impl Chunker {
    /// A chunker with validated bounds and the domain's seed
    /// ([`forge_crypto::DomainKey::chunker_seed`]).
    ///
    /// # Errors
    /// [`ChunkerError::InvalidParams`].
    pub fn new(params: ChunkerParams, seed: u64) -> Result<Self, ChunkerError> {
        params.validate()?;
        Ok(Self { params, seed })
    }

    /// The size bounds.
    #[must_use]
    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Cut points of `data` already in memory, as (offset, length) pairs. The same
    /// boundaries as [`Self::chunks`] gives for the same bytes, without the streaming
    /// buffer (which costs a zeroed maximum-size allocation per file).
    pub fn cut_points(&self, data: &[u8]) -> Vec<(usize, usize)> {
        if data.len() <= self.params.min_bytes as usize {
            return if data.is_empty() {
                Vec::new()
            } else {
                vec![(0, data.len())]
            };
        }
        fastcdc::v2020::FastCDC::with_level_and_seed(
            data,
            self.params.min_bytes,
            self.params.avg_bytes,
            self.params.max_bytes,
            Normalization::Level1,
            self.seed,
        )
        .map(|chunk| (chunk.offset, chunk.length))
        .collect()
    }

    /// Cuts `reader` into chunks, holding at most one maximum-size chunk in memory.
    pub fn chunks<R: Read>(&self, reader: R) -> impl Iterator<Item = Result<Chunk, ChunkerError>> {
        StreamCDC::with_level_and_seed(
            reader,
            self.params.min_bytes,
            self.params.avg_bytes,
            self.params.max_bytes,
            Normalization::Level1,
            self.seed,
        )
        .map(|result| match result {
            Ok(chunk) => Ok(Chunk {
                offset: chunk.offset,
                data: chunk.data,
            }),
            Err(v2020::Error::IoError(error)) => Err(ChunkerError::Read(error)),
            Err(other) => Err(ChunkerError::Read(std::io::Error::other(other.to_string()))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u8) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        blake3::Hasher::new()
            .update(&[seed])
            .finalize_xof()
            .fill(&mut bytes);
        bytes
    }

    #[test]
    fn rejects_bad_bounds() {
        assert!(
            ChunkerParams {
                min_bytes: 10,
                ..ChunkerParams::DEFAULT
            }
            .validate()
            .is_err()
        );
        assert!(
            ChunkerParams {
                min_bytes: 128 << 10,
                ..ChunkerParams::DEFAULT
            }
            .validate()
            .is_err()
        );
        assert!(ChunkerParams::from_average(1 << 30).is_err());
        assert_eq!(
            ChunkerParams::from_average(64 << 10).unwrap(),
            ChunkerParams::DEFAULT
        );
    }

    #[test]
    fn sizes_respect_bounds_and_the_seed_moves_boundaries() {
        let data = pseudo_random(4 << 20, 1);
        let cut = |seed| -> Vec<u64> {
            Chunker::new(ChunkerParams::DEFAULT, seed)
                .unwrap()
                .chunks(&data[..])
                .map(|c| c.unwrap().offset)
                .collect()
        };
        let chunks: Vec<Chunk> = Chunker::new(ChunkerParams::DEFAULT, 7)
            .unwrap()
            .chunks(&data[..])
            .map(Result::unwrap)
            .collect();
        let (last, body) = chunks.split_last().unwrap();
        for chunk in body {
            assert!(
                (16 << 10..=256 << 10).contains(&chunk.data.len()),
                "{}",
                chunk.data.len()
            );
        }
        assert!(last.data.len() <= 256 << 10);
        let average = data.len() / chunks.len();
        assert!(
            (32 << 10..=128 << 10).contains(&average),
            "average {average}"
        );
        assert_ne!(cut(7), cut(8), "another domain's seed cuts elsewhere");
        assert_eq!(cut(7), cut(7));
    }

    #[test]
    fn an_insertion_only_disturbs_nearby_chunks() {
        let original = pseudo_random(2 << 20, 2);
        let mut edited = original.clone();
        edited.splice(1 << 20..1 << 20, b"inserted".iter().copied());
        let chunker = Chunker::new(ChunkerParams::DEFAULT, 3).unwrap();
        let hashes = |data: &[u8]| -> std::collections::BTreeSet<[u8; 32]> {
            chunker
                .chunks(data)
                .map(|c| *blake3::hash(&c.unwrap().data).as_bytes())
                .collect()
        };
        let (before, after) = (hashes(&original), hashes(&edited));
        let shared = before.intersection(&after).count();
        assert!(
            shared + 3 >= before.len(),
            "shared {shared} of {}",
            before.len()
        );
    }

    #[test]
    fn in_memory_cuts_match_streaming_cuts() {
        let chunker = Chunker::new(ChunkerParams::DEFAULT, 11).unwrap();
        for len in [0, 1, 16 << 10, (16 << 10) + 1, 200_000, 256 << 10, 3 << 20] {
            let data = pseudo_random(len, 4);
            let streamed: Vec<(usize, usize)> = chunker
                .chunks(&data[..])
                .map(|c| c.unwrap())
                .map(|c| (c.offset as usize, c.data.len()))
                .collect();
            assert_eq!(chunker.cut_points(&data), streamed, "len {len}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn chunks_concatenate_to_the_input(len in 0usize..600_000, seed in any::<u64>(), data_seed in any::<u8>()) {
            let data = pseudo_random(len, data_seed);
            let chunker = Chunker::new(ChunkerParams { min_bytes: 4096, avg_bytes: 16384, max_bytes: 65536 }, seed).unwrap();
            let mut joined = Vec::with_capacity(len);
            for chunk in chunker.chunks(&data[..]) {
                let chunk = chunk.unwrap();
                prop_assert_eq!(chunk.offset as usize, joined.len());
                prop_assert!(chunk.data.len() <= 65536);
                joined.extend_from_slice(&chunk.data);
            }
            prop_assert_eq!(joined, data);
        }
    }
}
