//! The sync protocol's messages on the wire (`/forge/sync/1`), versioned, each ending with
//! a 16-byte BLAKE3 check of everything before it: a damaged message is refused as a whole
//! (QUIC already protects the bytes; the check keeps the protocol honest on any transport,
//! and lets the in-process network's corruption fault stand for a bug that damages them).
//!
//! ```text
//! message  = "FS" | version:u8=1 | kind:u8 | body | check[16]
//! Have     (kind 1) = count:u32le | (tag:u8 (0 node, 1 data) | cid[32]) * count
//! PutData  (kind 2) = count:u32le | (cid[32] | what:u8 (0 object, 1 chunk) | len:u32le
//!                     | bytes) * count
//! PutNode  (kind 3) = cid[32] | len:u32le | bytes
//! Held     (kind 129) = count:u32le | bitmap[ceil(count / 8)] (bit i: item i is held)
//! Stored   (kind 130) = count:u32le | outcome:u8 * count (0 stored, 1 wrong bytes for
//!                       its cid, 2 a node whose children are not all held)
//! ```

use forge_crypto::Cid;

use super::walker::Item;
use crate::bytes::Reader;
use crate::net::MeshError;

/// Version of the sync messages.
pub const SYNC_WIRE_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"FS";
const CHECK_BYTES: usize = 16;
/// Items in one Have or PutData (bounds the decoder's allocations).
pub const ITEMS_MAX: usize = 65_536;

/// What a piece of data is: the receiver stores an object as it is and a chunk's
/// ciphertext as shards of its own erasure layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// A sealed object (commit, tree, manifest) or an index node.
    Object,
    /// A chunk's ciphertext.
    Chunk,
}

/// What happened to one item a sender put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Durable at the receiver.
    Stored,
    /// Its bytes do not hash to its cid: not stored (send it again).
    WrongBytes,
    /// An index node whose children are not all held: not stored.
    ChildrenMissing,
}

/// A sync message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Which of these does the receiver hold?
    Have(Vec<Item>),
    /// Chunks or objects, each with its cid and kind.
    PutData(Vec<(Cid, DataKind, Vec<u8>)>),
    /// One index node.
    PutNode(Cid, Vec<u8>),
    /// The answer to `Have`, in its order.
    Held(Vec<bool>),
    /// The answer to `PutData` or `PutNode`, in its order.
    Stored(Vec<PutOutcome>),
}

fn malformed(reason: impl Into<String>) -> MeshError {
    MeshError::Local {
        what: format!("a malformed sync message: {}", reason.into()),
    }
}

fn push_len(bytes: &mut Vec<u8>, len: usize) {
    // Lengths are bounded by the protocol's size caps, far below 4 GiB.
    bytes.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
}

impl Message {
    /// The message's encoding, check included.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(MAGIC);
        bytes.push(SYNC_WIRE_VERSION);
        match self {
            Self::Have(items) => {
                bytes.push(1);
                push_len(&mut bytes, items.len());
                for item in items {
                    bytes.push(match item {
                        Item::Node(_) => 0,
                        Item::Data(_) => 1,
                    });
                    bytes.extend_from_slice(item.cid().as_bytes());
                }
            }
            Self::PutData(entries) => {
                bytes.push(2);
                push_len(&mut bytes, entries.len());
                for (cid, kind, data) in entries {
                    bytes.extend_from_slice(cid.as_bytes());
                    bytes.push(match kind {
                        DataKind::Object => 0,
                        DataKind::Chunk => 1,
                    });
                    push_len(&mut bytes, data.len());
                    bytes.extend_from_slice(data);
                }
            }
            Self::PutNode(cid, data) => {
                bytes.push(3);
                bytes.extend_from_slice(cid.as_bytes());
                push_len(&mut bytes, data.len());
                bytes.extend_from_slice(data);
            }
            Self::Held(held) => {
                bytes.push(129);
                push_len(&mut bytes, held.len());
                let mut bitmap = vec![0u8; held.len().div_ceil(8)];
                for (index, _) in held.iter().enumerate().filter(|(_, held)| **held) {
                    bitmap[index / 8] |= 1 << (index % 8);
                }
                bytes.extend_from_slice(&bitmap);
            }
            Self::Stored(outcomes) => {
                bytes.push(130);
                push_len(&mut bytes, outcomes.len());
                bytes.extend(outcomes.iter().map(|outcome| match outcome {
                    PutOutcome::Stored => 0u8,
                    PutOutcome::WrongBytes => 1,
                    PutOutcome::ChildrenMissing => 2,
                }));
            }
        }
        let check = blake3::hash(&bytes);
        bytes.extend_from_slice(&check.as_bytes()[..CHECK_BYTES]);
        bytes
    }

    /// Decodes a message, rejecting a damaged one, another version, or garbage.
    ///
    /// # Errors
    /// [`MeshError::Local`] naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, MeshError> {
        if bytes.len() < MAGIC.len() + 2 + CHECK_BYTES {
            return Err(malformed("too short"));
        }
        let (body, check) = bytes.split_at(bytes.len() - CHECK_BYTES);
        if blake3::hash(body).as_bytes()[..CHECK_BYTES] != *check {
            return Err(malformed("its check does not match (damaged in transit)"));
        }
        let mut reader = Reader::new(body, malformed);
        reader.header(MAGIC, SYNC_WIRE_VERSION)?;
        let message = match reader.u8()? {
            1 => {
                let count = count(&mut reader)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    let tag = reader.u8()?;
                    let cid = cid(&mut reader)?;
                    items.push(match tag {
                        0 => Item::Node(cid),
                        1 => Item::Data(cid),
                        other => return Err(malformed(format!("item tag {other}"))),
                    });
                }
                Self::Have(items)
            }
            2 => {
                let count = count(&mut reader)?;
                let mut entries = Vec::with_capacity(count.min(1024));
                for _ in 0..count {
                    let cid = cid(&mut reader)?;
                    let kind = match reader.u8()? {
                        0 => DataKind::Object,
                        1 => DataKind::Chunk,
                        other => return Err(malformed(format!("data kind {other}"))),
                    };
                    let len = reader.u32_len()?;
                    entries.push((cid, kind, reader.take(len)?.to_vec()));
                }
                Self::PutData(entries)
            }
            3 => {
                let cid = cid(&mut reader)?;
                let len = reader.u32_len()?;
                Self::PutNode(cid, reader.take(len)?.to_vec())
            }
            129 => {
                let count = count(&mut reader)?;
                let bitmap = reader.take(count.div_ceil(8))?;
                if count % 8 != 0 && bitmap[count / 8] >> (count % 8) != 0 {
                    return Err(malformed("bits set past the count"));
                }
                Self::Held(
                    (0..count)
                        .map(|index| bitmap[index / 8] & (1 << (index % 8)) != 0)
                        .collect(),
                )
            }
            130 => {
                let count = count(&mut reader)?;
                let outcomes = reader
                    .take(count)?
                    .iter()
                    .map(|byte| match byte {
                        0 => Ok(PutOutcome::Stored),
                        1 => Ok(PutOutcome::WrongBytes),
                        2 => Ok(PutOutcome::ChildrenMissing),
                        other => Err(malformed(format!("outcome {other}"))),
                    })
                    .collect::<Result<_, _>>()?;
                Self::Stored(outcomes)
            }
            other => return Err(malformed(format!("kind {other}"))),
        };
        reader.end()?;
        Ok(message)
    }
}

/// An item count, bounded (so a decoder allocates no more than the input justifies).
fn count(reader: &mut Reader<'_>) -> Result<usize, MeshError> {
    let count = reader.u32_len()?;
    if count > ITEMS_MAX {
        return Err(malformed(format!("{count} items (at most {ITEMS_MAX})")));
    }
    Ok(count)
}

fn cid(reader: &mut Reader<'_>) -> Result<Cid, MeshError> {
    Ok(Cid::from_bytes(reader.array32()?))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cid_strategy() -> impl Strategy<Value = Cid> {
        any::<[u8; 32]>().prop_map(Cid::from_bytes)
    }

    fn message_strategy() -> impl Strategy<Value = Message> {
        prop_oneof![
            proptest::collection::vec(
                (any::<bool>(), cid_strategy()).prop_map(|(node, cid)| if node {
                    Item::Node(cid)
                } else {
                    Item::Data(cid)
                }),
                0..40
            )
            .prop_map(Message::Have),
            proptest::collection::vec(
                (
                    cid_strategy(),
                    prop_oneof![Just(DataKind::Object), Just(DataKind::Chunk)],
                    proptest::collection::vec(any::<u8>(), 0..300)
                ),
                0..8
            )
            .prop_map(Message::PutData),
            (
                cid_strategy(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(cid, bytes)| Message::PutNode(cid, bytes)),
            proptest::collection::vec(any::<bool>(), 0..70).prop_map(Message::Held),
            proptest::collection::vec(
                prop_oneof![
                    Just(PutOutcome::Stored),
                    Just(PutOutcome::WrongBytes),
                    Just(PutOutcome::ChildrenMissing)
                ],
                0..20
            )
            .prop_map(Message::Stored),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips_and_any_damage_is_refused(
            message in message_strategy(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let bytes = message.encode();
            prop_assert_eq!(Message::decode(&bytes).expect("decodes"), message);
            let mut damaged = bytes.clone();
            let at = flip.index(damaged.len());
            damaged[at] ^= 1 << bit;
            prop_assert!(Message::decode(&damaged).is_err());
            prop_assert!(Message::decode(&bytes[..bytes.len() - 1]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Message::decode(&bytes);
        }
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let mut bytes = Message::Held(vec![true]).encode();
        bytes[2] = 2;
        let body_len = bytes.len() - CHECK_BYTES;
        let check = blake3::hash(&bytes[..body_len]);
        bytes[body_len..].copy_from_slice(&check.as_bytes()[..CHECK_BYTES]);
        let error = Message::decode(&bytes).expect_err("version 2");
        assert!(error.to_string().contains("version 2"), "{error}");
    }
}
