//! Storage audits: a vault challenges a peer for random byte ranges of chunks the peer
//! should hold, and the peer answers with BLAKE3 verified-streaming proofs (bao-tree,
//! 1 KiB chunk groups) against each cid. A cid is the BLAKE3 of the chunk's ciphertext,
//! so the auditor checks possession of those bytes, and every hash on their path to the
//! root, without downloading whole chunks (a sample costs about 1.3 KiB). A peer that lost
//! a chunk, or answers with other bytes, fails that sample.
//!
//! ```text
//! request  = "FA" | version:u8=1 | count:u16le | (cid[32] | first_kib:u32le | kib:u16le) * count
//! response = "FA" | version:u8=1 | count:u16le | answer * count
//! answer   = 0 (held) | size:u64le | len:u32le | bao encoding of the range
//!          | 1 (not held)
//! ```
//!
//! The pure parts (choosing a challenge, checking answers) take no clock and no socket;
//! [`audit`] and [`serve_audits`] are their drivers over [`PeerNet`].

use std::time::Duration;

use bao_tree::io::BaoContentItem;
use bao_tree::io::outboard::PreOrderMemOutboard;
use bao_tree::io::sync::{DecodeResponseIter, encode_ranges_validated};
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges};
use forge_crypto::{Cid, NodeId};

use crate::bytes::Reader;
use crate::net::{Inbound, MeshError, PeerNet, Protocol, request_idempotent};
use crate::sync::{DataKind, Item, SyncStore};

/// The audit protocol.
pub const AUDIT_PROTOCOL: Protocol = Protocol {
    name: "/forge/audit/1",
    max_request_bytes: 1 << 20,
    max_response_bytes: 16 << 20,
    inbound_queue: 8,
};

const VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"FA";
/// The most samples one request carries.
pub const SAMPLES_MAX: usize = 4_096;
/// The most 1 KiB groups one sample asks for.
const SAMPLE_KIB_MAX: u16 = 64;
/// bao-tree's chunk group: 1 KiB, BLAKE3's own chunk, so the root is the plain BLAKE3.
const BLOCK: BlockSize = BlockSize::ZERO;

/// One sample: `kib` KiB of chunk `cid` from KiB `first_kib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The chunk.
    pub cid: Cid,
    /// First 1 KiB group asked for.
    pub first_kib: u32,
    /// How many groups.
    pub kib: u16,
}

impl Sample {
    fn ranges(&self) -> ChunkRanges {
        let start = u64::from(self.first_kib);
        ChunkRanges::from(ChunkNum(start)..ChunkNum(start + u64::from(self.kib)))
    }
}

/// Why a sample failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The proof verified against the cid.
    Passed,
    /// The peer says it does not hold the chunk.
    Missing,
    /// The proof does not verify (other bytes, other hashes, or garbage).
    Failed(String),
}

fn malformed(reason: impl Into<String>) -> MeshError {
    MeshError::Local {
        what: format!("a malformed audit message: {}", reason.into()),
    }
}

/// Picks `samples` distinct items of `candidates` at random (all of them when `samples`
/// is at least their number). `random` gives uniform 64-bit values (seeded in tests and
/// the simulator).
#[must_use]
pub fn pick<T: Clone>(candidates: &[T], samples: usize, mut random: impl FnMut() -> u64) -> Vec<T> {
    let mut pool = candidates.to_vec();
    let take = samples.min(pool.len()).min(SAMPLES_MAX);
    for index in 0..take {
        // Partial Fisher-Yates: distinct items, without replacement.
        let remaining = (pool.len() - index) as u64;
        let chosen = index + usize::try_from(random() % remaining).unwrap_or(0);
        pool.swap(index, chosen);
    }
    pool.truncate(take);
    pool
}

/// A sample of one random 1 KiB group of chunk `cid` of `size` bytes.
#[must_use]
pub fn sample(cid: Cid, size: u64, mut random: impl FnMut() -> u64) -> Sample {
    let groups = size.div_ceil(1024).max(1);
    Sample {
        cid,
        first_kib: u32::try_from(random() % groups).unwrap_or(u32::MAX),
        kib: 1,
    }
}

/// Chooses `samples` distinct chunks of `held` (cid, ciphertext size), each with a random
/// 1 KiB range inside it.
#[must_use]
pub fn choose(held: &[(Cid, u64)], samples: usize, mut random: impl FnMut() -> u64) -> Vec<Sample> {
    pick(held, samples, &mut random)
        .into_iter()
        .map(|(cid, size)| sample(cid, size, &mut random))
        .collect()
}

/// The start of a request or response: magic, version, and how many samples follow
/// (at most [`SAMPLES_MAX`], which fits a u16).
fn header(count: usize) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.push(VERSION);
    bytes.extend_from_slice(&u16::try_from(count).unwrap_or(u16::MAX).to_le_bytes());
    bytes
}

/// A challenge's encoding.
#[must_use]
pub fn encode_request(samples: &[Sample]) -> Vec<u8> {
    let mut bytes = header(samples.len());
    for sample in samples {
        bytes.extend_from_slice(sample.cid.as_bytes());
        bytes.extend_from_slice(&sample.first_kib.to_le_bytes());
        bytes.extend_from_slice(&sample.kib.to_le_bytes());
    }
    bytes
}

/// Decodes a challenge.
///
/// # Errors
/// Garbage, too many samples, too large a sample.
pub fn decode_request(bytes: &[u8]) -> Result<Vec<Sample>, MeshError> {
    let mut reader = Reader::new(bytes, malformed);
    reader.header(MAGIC, VERSION)?;
    let count = reader.u16_len()?;
    if count > SAMPLES_MAX {
        return Err(reader.fail(format!("{count} samples")));
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let cid = Cid::from_bytes(reader.array32()?);
        let first_kib = u32::try_from(reader.u32_len()?).unwrap_or(u32::MAX);
        let kib = u16::try_from(reader.u16_len()?).unwrap_or(u16::MAX);
        if kib == 0 || kib > SAMPLE_KIB_MAX {
            return Err(reader.fail(format!("a sample of {kib} KiB")));
        }
        samples.push(Sample {
            cid,
            first_kib,
            kib,
        });
    }
    reader.end()?;
    Ok(samples)
}

/// The peer's side: a proof for each sample from `store` (what it holds), or "not held".
///
/// # Errors
/// The store failing (other than not holding a chunk).
pub fn answer(store: &dyn SyncStore, samples: &[Sample]) -> Result<Vec<u8>, MeshError> {
    let mut bytes = header(samples.len());
    for sample in samples {
        let held = if store.holds(&sample.cid)? {
            match store.read(&Item::Data(sample.cid)) {
                Ok((DataKind::Chunk | DataKind::Object, data)) => Some(data),
                Err(_) => None,
            }
        } else {
            None
        };
        let Some(data) = held else {
            bytes.push(1);
            continue;
        };
        let outboard = PreOrderMemOutboard::create(&data, BLOCK);
        let mut encoded = Vec::new();
        // A range past the end yields the last group: the proof still commits to the size.
        let proved = encode_ranges_validated(&data[..], &outboard, &sample.ranges(), &mut encoded);
        if proved.is_err() {
            bytes.push(1);
            continue;
        }
        bytes.push(0);
        bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
        bytes.extend_from_slice(
            &u32::try_from(encoded.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        bytes.extend_from_slice(&encoded);
    }
    Ok(bytes)
}

/// The auditor's side: checks each answer against its sample's cid.
///
/// # Errors
/// A response that is not an answer to `samples` at all (each bad proof is a
/// [`Verdict::Failed`], not an error).
pub fn check(samples: &[Sample], response: &[u8]) -> Result<Vec<Verdict>, MeshError> {
    let mut reader = Reader::new(response, malformed);
    reader.header(MAGIC, VERSION)?;
    if reader.u16_len()? != samples.len() {
        return Err(reader.fail("another number of answers than samples"));
    }
    let mut verdicts = Vec::with_capacity(samples.len());
    for sample in samples {
        match reader.u8()? {
            1 => verdicts.push(Verdict::Missing),
            0 => {
                let size = reader.u64()?;
                let len = reader.u32_len()?;
                let encoded = reader.take(len)?;
                verdicts.push(verify(sample, size, encoded));
            }
            other => return Err(reader.fail(format!("answer kind {other}"))),
        }
    }
    reader.end()?;
    Ok(verdicts)
}

fn verify(sample: &Sample, size: u64, encoded: &[u8]) -> Verdict {
    let root = blake3::Hash::from_bytes(*sample.cid.as_bytes());
    let tree = BaoTree::new(size, BLOCK);
    let ranges = sample.ranges();
    let mut leaf_bytes = 0usize;
    let mut consumed = std::io::Cursor::new(encoded);
    for item in DecodeResponseIter::new(root, tree, &mut consumed, &ranges) {
        match item {
            Ok(BaoContentItem::Leaf(leaf)) => leaf_bytes += leaf.data.len(),
            Ok(BaoContentItem::Parent(_)) => {}
            Err(error) => return Verdict::Failed(format!("the proof does not verify: {error}")),
        }
    }
    if leaf_bytes == 0 {
        return Verdict::Failed("the proof proves no bytes".into());
    }
    if usize::try_from(consumed.position()).unwrap_or(usize::MAX) != encoded.len() {
        return Verdict::Failed("trailing bytes after the proof".into());
    }
    Verdict::Passed
}

/// Challenges `peer` with `samples`; a verdict per sample.
///
/// # Errors
/// The peer refused (not trusted) or is unreachable; its answer is not one.
pub async fn audit(
    net: &dyn PeerNet,
    peer: NodeId,
    samples: &[Sample],
    deadline: Duration,
) -> Result<Vec<Verdict>, MeshError> {
    // An audit only reads: safe to send again when its connection turns out dead.
    let response =
        request_idempotent(net, peer, AUDIT_PROTOCOL, encode_request(samples), deadline).await?;
    check(samples, &response)
}

/// Answers audits on `inbound` from `store`, for peers `allowed` accepts.
pub async fn serve_audits(
    mut inbound: Inbound,
    store: std::sync::Arc<dyn SyncStore>,
    allowed: impl Fn(&NodeId) -> Result<(), String>,
) {
    while let Some(request) = inbound.next().await {
        if let Err(rule) = allowed(&request.from) {
            request.refuse(rule);
            continue;
        }
        match decode_request(&request.body).and_then(|samples| answer(&*store, &samples)) {
            Ok(response) => request.respond(response),
            Err(error) => request.fail(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::memory::MemoryNetwork;

    #[derive(Default)]
    struct Chunks(Mutex<BTreeMap<Cid, Vec<u8>>>);

    impl SyncStore for Chunks {
        fn holds(&self, cid: &Cid) -> Result<bool, MeshError> {
            Ok(self.0.lock().unwrap().contains_key(cid))
        }
        fn read(&self, item: &Item) -> Result<(DataKind, Vec<u8>), MeshError> {
            self.0
                .lock()
                .unwrap()
                .get(&item.cid())
                .map(|bytes| (DataKind::Chunk, bytes.clone()))
                .ok_or_else(|| MeshError::Local {
                    what: "not held".into(),
                })
        }
        fn store(&self, _: Vec<(Item, DataKind, Vec<u8>)>) -> Result<(), MeshError> {
            Ok(())
        }
    }

    fn chunk(seed: u8, len: usize) -> (Cid, Vec<u8>) {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect();
        (Cid::of(&bytes), bytes)
    }

    #[tokio::test(start_paused = true)]
    async fn an_honest_peer_passes_a_lost_chunk_is_missing_and_other_bytes_fail() {
        let network = MemoryNetwork::new(5);
        let (auditor, peer) = (NodeId::from_bytes([1; 32]), NodeId::from_bytes([2; 32]));
        let net = network.join(auditor);
        let held = Arc::new(Chunks::default());
        let chunks: Vec<(Cid, Vec<u8>)> = (1..=6)
            .map(|seed| chunk(seed, 1000 + usize::from(seed) * 9000))
            .collect();
        for (cid, bytes) in &chunks {
            held.0.lock().unwrap().insert(*cid, bytes.clone());
        }
        let store: Arc<dyn SyncStore> = held.clone();
        tokio::spawn(serve_audits(
            network.join(peer).serve(AUDIT_PROTOCOL).unwrap(),
            store,
            |_| Ok(()),
        ));
        let sizes: Vec<(Cid, u64)> = chunks
            .iter()
            .map(|(cid, bytes)| (*cid, bytes.len() as u64))
            .collect();
        let mut state = 7u64;
        let mut random = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            state >> 11
        };
        let samples = choose(&sizes, 100, &mut random);
        assert_eq!(samples.len(), 6, "every chunk once");
        let verdicts = audit(&*net, peer, &samples, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            verdicts.iter().all(|verdict| *verdict == Verdict::Passed),
            "{verdicts:?}"
        );

        // One chunk lost, one replaced by other bytes (a lying peer).
        held.0.lock().unwrap().remove(&chunks[0].0);
        let mut other = chunks[1].1.clone();
        other[0] ^= 1;
        for byte in other.iter_mut().skip(1024) {
            *byte ^= 0x55;
        }
        held.0.lock().unwrap().insert(chunks[1].0, other);
        let verdicts = audit(&*net, peer, &samples, Duration::from_secs(5))
            .await
            .unwrap();
        for (sample, verdict) in samples.iter().zip(&verdicts) {
            if sample.cid == chunks[0].0 {
                assert_eq!(*verdict, Verdict::Missing);
            } else if sample.cid == chunks[1].0 {
                assert!(matches!(verdict, Verdict::Failed(_)), "{verdict:?}");
            } else {
                assert_eq!(*verdict, Verdict::Passed);
            }
        }
    }

    #[test]
    fn garbage_is_refused_and_requests_round_trip() {
        let samples = vec![Sample {
            cid: Cid::of(b"x"),
            first_kib: 3,
            kib: 1,
        }];
        let bytes = encode_request(&samples);
        assert_eq!(decode_request(&bytes).unwrap(), samples);
        for len in 0..bytes.len() {
            assert!(decode_request(&bytes[..len]).is_err());
        }
        assert!(check(&samples, b"FA\x01\x01\x00\x00").is_err());
        // A proof of garbage fails; it is not an error.
        let mut forged = b"FA\x01\x01\x00\x00".to_vec();
        forged.extend_from_slice(&4096u64.to_le_bytes());
        forged.extend_from_slice(&8u32.to_le_bytes());
        forged.extend_from_slice(&[7; 8]);
        assert!(matches!(
            check(&samples, &forged).unwrap()[0],
            Verdict::Failed(_)
        ));
    }
}
