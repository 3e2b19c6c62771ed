//! `Vec<u8>` fields that serde reads as bytes, not as a sequence of `u8`.
//!
//! Derived serde code reads a `Vec<u8>` one element at a time, one visitor call per byte;
//! decoding a volume group's Raft log and its shard messages spent most of its time there.
//! `#[serde(with = "forge_store::byte_fields")]` asks for bytes instead. For postcard, the
//! encoding of every record and message here, bytes and a sequence of `u8` are the same
//! on the wire (a varint length, then the raw bytes), so existing logs, records and peers
//! read and write exactly as before (tested below); a self-describing format that hands a
//! sequence over is still read.

use serde::de::{SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Writes `bytes` as serde bytes.
///
/// # Errors
/// The serializer's.
pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// Reads serde bytes (or a sequence of `u8`).
///
/// # Errors
/// The deserializer's: anything else than bytes or a sequence of `u8`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_byte_buf(ByteBuf)
}

struct ByteBuf;

impl<'de> Visitor<'de> for ByteBuf {
    type Value = Vec<u8>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        Ok(bytes.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(bytes)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<Vec<u8>, A::Error> {
        // The hint is the sender's word: bounded, the vector grows past it if need be.
        let mut bytes = Vec::with_capacity(sequence.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(byte) = sequence.next_element()? {
            bytes.push(byte);
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsSequence {
        before: u32,
        bytes: Vec<u8>,
        after: Vec<u8>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct AsBytes {
        before: u32,
        #[serde(with = "super")]
        bytes: Vec<u8>,
        #[serde(with = "super")]
        after: Vec<u8>,
    }

    proptest! {
        /// The encoding is unchanged: what was written as a sequence reads as bytes, and
        /// the other way round, byte for byte.
        #[test]
        fn bytes_and_a_sequence_of_u8_are_the_same_postcard(
            before: u32,
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            after in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let old = AsSequence { before, bytes: bytes.clone(), after: after.clone() };
            let new = AsBytes { before, bytes, after };
            let old_wire = postcard::to_allocvec(&old).unwrap();
            prop_assert_eq!(&postcard::to_allocvec(&new).unwrap(), &old_wire);
            prop_assert_eq!(postcard::from_bytes::<AsBytes>(&old_wire).unwrap(), new);
            // Cut short: refused, not read past the end.
            for cut in 0..old_wire.len() {
                prop_assert!(postcard::from_bytes::<AsBytes>(&old_wire[..cut]).is_err());
            }
        }
    }
}
