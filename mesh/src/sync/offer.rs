//! What a sender offers at the start of a volume sync, and the pure checks a receiver runs
//! on it before anything is stored: which snapshots come (every one reachable from the
//! head, with its signed index head), who wrote them (their public keys, each hashing to
//! its NodeId), the volume's layout and dedup domain (not secret), and the key envelopes
//! that travel with the volume.
//!
//! ```text
//! offer    = nonce[32] | volume[16] | name:str16 | branch:str16 | head[32]
//!            | data_shards:u16le | parity_shards:u16le
//!            | domain_id[16] | chunker_version:u8 | chunk_min:u32le | chunk_avg:u32le
//!            | chunk_max:u32le
//!            | authors:u16le | (len:u32le | NodePublicKeys) * authors
//!            | envelopes:u16le | (node[32] | len:u32le | envelope) * envelopes
//!            | chain:u16le | (generation:u32le | len:u32le | sealed key) * chain
//!            | snapshots:u32le | snapshot * snapshots            (oldest first)
//! snapshot = id[32] | parents:u8 | parent[32] * parents | time_ns:i64le
//!            | logical_bytes:u64le | files:u64le | index_root[32] | author[32]
//!            | signature (ML-DSA-65, Snapshot domain, over index_head_message)
//! str16    = len:u16le | UTF-8
//! ```

use std::collections::{BTreeMap, BTreeSet};

use forge_crypto::{Cid, NodeId, NodePublicKeys, Signature, SignatureDomain};

use crate::bytes::{Reader, put_blob32, put_str16};
use crate::net::MeshError;

/// The most snapshots one offer carries (bounds the decoder; about 3.5 KiB each).
pub const OFFER_SNAPSHOTS_MAX: usize = 4_096;
/// The most parents a snapshot names.
const PARENTS_MAX: usize = 16;
/// The most authors or envelopes one offer carries.
const AUTHORS_MAX: usize = 256;

/// The message a snapshot's author signs (Snapshot domain) over its reference index's
/// root: a vault without the volume's keys checks with it that an index belongs to a
/// snapshot of that volume, written by that author. Frozen: stored heads are signed so.
#[must_use]
pub fn index_head_message(volume: &[u8; 16], snapshot: &[u8; 32], root: &[u8; 32]) -> Vec<u8> {
    let mut message = b"forge-vault reference index head v1".to_vec();
    message.extend_from_slice(volume);
    message.extend_from_slice(snapshot);
    message.extend_from_slice(root);
    message
}

/// One snapshot a sync carries: its id (the cid of its sealed commit), the lineage the
/// sender states, its listing figures and its signed index head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The snapshot id.
    pub id: Cid,
    /// Its parents, as the sender states them (a receiver holding the volume's key checks
    /// them against the commit).
    pub parents: Vec<Cid>,
    /// Commit time, ns since the epoch.
    pub time_ns: i64,
    /// File bytes in the snapshot.
    pub logical_bytes: u64,
    /// Files in the snapshot.
    pub file_count: u64,
    /// Root of its reference index.
    pub index_root: Cid,
    /// Who wrote (and signed) it.
    pub author: NodeId,
    /// The author's signature over [`index_head_message`].
    pub signature: Vec<u8>,
}

/// A volume's dedup domain as another vault needs it: chunks of the same domain dedup
/// across vaults only if they were cut and keyed alike. Not secret (the key is not here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    /// The domain's id.
    pub id: [u8; 16],
    /// Its chunker's version.
    pub chunker_version: u8,
    /// Smallest chunk.
    pub chunk_min_bytes: u32,
    /// Average chunk.
    pub chunk_avg_bytes: u32,
    /// Largest chunk.
    pub chunk_max_bytes: u32,
}

/// The start of a volume sync.
#[derive(Debug, Clone)]
pub struct Offer {
    /// Chosen by the sender; the receipt repeats it.
    pub nonce: [u8; 32],
    /// The volume's id (the same on every vault).
    pub volume: [u8; 16],
    /// The name the sender asks the receiver to use for a volume it does not have yet.
    pub name: String,
    /// The branch synced.
    pub branch: String,
    /// Its head at the sender.
    pub head: Cid,
    /// The sender's erasure layout (a new volume at the receiver starts with it).
    pub data_shards: u16,
    /// Parity shards of that layout.
    pub parity_shards: u16,
    /// The volume's dedup domain.
    pub domain: DomainInfo,
    /// Public keys of every author of a snapshot here.
    pub authors: Vec<NodePublicKeys>,
    /// Key envelopes of the volume, by the node they are wrapped to.
    pub envelopes: Vec<(NodeId, Vec<u8>)>,
    /// The volume's key chain (generation, the key before it sealed under its key): a
    /// holder of the newest key reads what older keys sealed.
    pub key_chain: Vec<(u32, Vec<u8>)>,
    /// Every snapshot reachable from the head, oldest first (the head last).
    pub snapshots: Vec<SnapshotEntry>,
    /// Snapshots deleted at the sender that the head's history passes through, with their
    /// parents (kept in the sender's lineage records). Not sent as entries (their data
    /// may be gone); they only let a receiver whose branch is at or behind one of them
    /// see the head as a fast-forward. Unsigned: a receiver prefers what it knows itself.
    /// On the wire: an optional trailing section, absent when empty (offers without it
    /// decode as before).
    pub deleted_ancestry: Vec<(Cid, Vec<Cid>)>,
    /// The volume's contract at the sender (`forge_store::contract::SignedContract`
    /// encoding) and when it was attached there: a receiver that trusts its signer
    /// attaches it when it is newer than its own. On the wire: a second optional
    /// trailing section after the deleted ancestry (whose count is then written even
    /// when zero); the decoder checks it decodes as a signed contract.
    pub contract: Option<Box<OfferedContract>>,
}

/// A contract travelling with an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedContract {
    /// The `SignedContract` encoding.
    pub signed: Vec<u8>,
    /// When the sender attached it, ns since the epoch.
    pub attached_ns: i64,
}

impl PartialEq for Offer {
    fn eq(&self, other: &Self) -> bool {
        // Keys compare by their encoding; so does the rest.
        self.encode() == other.encode()
    }
}

impl Eq for Offer {}

fn malformed(reason: impl Into<String>) -> MeshError {
    let reason = reason.into();
    MeshError::Local {
        what: format!("a malformed sync offer: {reason}"),
    }
}

fn count(bytes: &mut Vec<u8>, len: usize, wide: bool) {
    if wide {
        bytes.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    } else {
        bytes.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    }
}

/// A snapshot's parents on the wire: a count (u8), then each id.
fn put_parents(bytes: &mut Vec<u8>, parents: &[Cid]) {
    bytes.push(u8::try_from(parents.len()).unwrap_or(u8::MAX));
    for parent in parents.iter().take(usize::from(u8::MAX)) {
        bytes.extend_from_slice(parent.as_bytes());
    }
}

/// Reads what [`put_parents`] wrote, refusing more than [`PARENTS_MAX`].
fn read_parents(reader: &mut Reader<'_>) -> Result<Vec<Cid>, MeshError> {
    let parents_len = usize::from(reader.u8()?);
    if parents_len > PARENTS_MAX {
        return Err(reader.fail(format!("a snapshot with {parents_len} parents")));
    }
    (0..parents_len)
        .map(|_| reader.array32().map(Cid::from_bytes))
        .collect()
}

impl Offer {
    /// The offer's encoding (inside a volume message).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(256 + self.snapshots.len() * 3_600);
        bytes.extend_from_slice(&self.nonce);
        bytes.extend_from_slice(&self.volume);
        put_str16(&mut bytes, &self.name);
        put_str16(&mut bytes, &self.branch);
        bytes.extend_from_slice(self.head.as_bytes());
        bytes.extend_from_slice(&self.data_shards.to_le_bytes());
        bytes.extend_from_slice(&self.parity_shards.to_le_bytes());
        bytes.extend_from_slice(&self.domain.id);
        bytes.push(self.domain.chunker_version);
        for size in [
            self.domain.chunk_min_bytes,
            self.domain.chunk_avg_bytes,
            self.domain.chunk_max_bytes,
        ] {
            bytes.extend_from_slice(&size.to_le_bytes());
        }
        count(&mut bytes, self.authors.len(), false);
        for keys in &self.authors {
            put_blob32(&mut bytes, &keys.encode());
        }
        count(&mut bytes, self.envelopes.len(), false);
        for (node, envelope) in &self.envelopes {
            bytes.extend_from_slice(node.as_bytes());
            put_blob32(&mut bytes, envelope);
        }
        count(&mut bytes, self.key_chain.len(), false);
        for (generation, sealed) in &self.key_chain {
            bytes.extend_from_slice(&generation.to_le_bytes());
            put_blob32(&mut bytes, sealed);
        }
        count(&mut bytes, self.snapshots.len(), true);
        for entry in &self.snapshots {
            bytes.extend_from_slice(entry.id.as_bytes());
            put_parents(&mut bytes, &entry.parents);
            bytes.extend_from_slice(&entry.time_ns.to_le_bytes());
            bytes.extend_from_slice(&entry.logical_bytes.to_le_bytes());
            bytes.extend_from_slice(&entry.file_count.to_le_bytes());
            bytes.extend_from_slice(entry.index_root.as_bytes());
            bytes.extend_from_slice(entry.author.as_bytes());
            count(&mut bytes, entry.signature.len(), false);
            bytes.extend_from_slice(&entry.signature);
        }
        if !self.deleted_ancestry.is_empty() || self.contract.is_some() {
            count(&mut bytes, self.deleted_ancestry.len(), true);
            for (id, parents) in &self.deleted_ancestry {
                bytes.extend_from_slice(id.as_bytes());
                put_parents(&mut bytes, parents);
            }
        }
        if let Some(contract) = &self.contract {
            bytes.extend_from_slice(&contract.attached_ns.to_le_bytes());
            put_blob32(&mut bytes, &contract.signed);
        }
        bytes
    }

    /// Decodes an offer (the signatures are checked by [`Offer::verify`]).
    ///
    /// # Errors
    /// Garbage: truncated, over a bound, trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, MeshError> {
        let mut reader = Reader::new(bytes, malformed);
        let nonce = reader.array32()?;
        let volume = reader.array16()?;
        let name = reader.str16("volume name")?;
        let branch = reader.str16("branch name")?;
        let head = Cid::from_bytes(reader.array32()?);
        let data_shards = u16::from_le_bytes([reader.u8()?, reader.u8()?]);
        let parity_shards = u16::from_le_bytes([reader.u8()?, reader.u8()?]);
        let domain = DomainInfo {
            id: reader.array16()?,
            chunker_version: reader.u8()?,
            chunk_min_bytes: u32::try_from(reader.u32_len()?).unwrap_or(u32::MAX),
            chunk_avg_bytes: u32::try_from(reader.u32_len()?).unwrap_or(u32::MAX),
            chunk_max_bytes: u32::try_from(reader.u32_len()?).unwrap_or(u32::MAX),
        };
        let authors_len = reader.u16_len()?;
        if authors_len > AUTHORS_MAX {
            return Err(reader.fail(format!("{authors_len} authors")));
        }
        let mut authors = Vec::with_capacity(authors_len);
        for _ in 0..authors_len {
            let len = reader.u32_len()?;
            authors.push(
                NodePublicKeys::decode(reader.take(len)?)
                    .map_err(|error| reader.fail(format!("an author's keys: {error}")))?,
            );
        }
        let envelopes_len = reader.u16_len()?;
        if envelopes_len > AUTHORS_MAX {
            return Err(reader.fail(format!("{envelopes_len} envelopes")));
        }
        let mut envelopes = Vec::with_capacity(envelopes_len);
        for _ in 0..envelopes_len {
            let node = NodeId::from_bytes(reader.array32()?);
            let len = reader.u32_len()?;
            envelopes.push((node, reader.take(len)?.to_vec()));
        }
        let chain_len = reader.u16_len()?;
        if chain_len > AUTHORS_MAX {
            return Err(reader.fail(format!("{chain_len} key chain entries")));
        }
        let mut key_chain = Vec::with_capacity(chain_len);
        for _ in 0..chain_len {
            let generation = u32::try_from(reader.u32_len()?).unwrap_or(u32::MAX);
            let len = reader.u32_len()?;
            key_chain.push((generation, reader.take(len)?.to_vec()));
        }
        let snapshots_len = reader.u32_len()?;
        if snapshots_len > OFFER_SNAPSHOTS_MAX {
            return Err(reader.fail(format!(
                "{snapshots_len} snapshots (at most {OFFER_SNAPSHOTS_MAX})"
            )));
        }
        let mut snapshots = Vec::with_capacity(snapshots_len);
        for _ in 0..snapshots_len {
            let id = Cid::from_bytes(reader.array32()?);
            let parents = read_parents(&mut reader)?;
            let time_ns = reader.i64()?;
            let logical_bytes = reader.u64()?;
            let file_count = reader.u64()?;
            let index_root = Cid::from_bytes(reader.array32()?);
            let author = NodeId::from_bytes(reader.array32()?);
            let signature_len = reader.u16_len()?;
            let signature = reader.take(signature_len)?.to_vec();
            snapshots.push(SnapshotEntry {
                id,
                parents,
                time_ns,
                logical_bytes,
                file_count,
                index_root,
                author,
                signature,
            });
        }
        let mut deleted_ancestry = Vec::new();
        let mut contract = None;
        if reader.remaining() > 0 {
            let len = reader.u32_len()?;
            if len > OFFER_SNAPSHOTS_MAX {
                return Err(reader.fail(format!("{len} deleted snapshots in the history")));
            }
            deleted_ancestry.reserve(len);
            for _ in 0..len {
                let id = Cid::from_bytes(reader.array32()?);
                deleted_ancestry.push((id, read_parents(&mut reader)?));
            }
            if reader.remaining() > 0 {
                let attached_ns = reader.i64()?;
                let signed_len = reader.u32_len()?;
                if signed_len > forge_store::contract::SIGNED_CONTRACT_BYTES_MAX {
                    return Err(reader.fail(format!("a contract of {signed_len} bytes")));
                }
                let signed = reader.take(signed_len)?.to_vec();
                forge_store::contract::SignedContract::decode(&signed)
                    .map_err(|error| reader.fail(format!("its contract: {error}")))?;
                contract = Some(Box::new(OfferedContract {
                    signed,
                    attached_ns,
                }));
            } else if len == 0 {
                // One encoding per offer: an empty section is written only before a contract.
                return Err(reader.fail("an empty deleted-ancestry section without a contract"));
            }
        }
        reader.end()?;
        Ok(Self {
            nonce,
            volume,
            name,
            branch,
            head,
            data_shards,
            parity_shards,
            domain,
            authors,
            envelopes,
            key_chain,
            snapshots,
            deleted_ancestry,
            contract,
        })
    }

    /// The head's entry.
    #[must_use]
    pub fn head_entry(&self) -> Option<&SnapshotEntry> {
        self.snapshots.iter().find(|entry| entry.id == self.head)
    }

    /// Checks what a receiver must know before storing anything: the head is among the
    /// snapshots, every author's keys hash to its NodeId and `trusted` accepts it, and every
    /// snapshot's index head is signed by its author. The refusal names what failed.
    ///
    /// # Errors
    /// A reason to refuse the offer (the sender sees it).
    pub fn verify(&self, trusted: impl Fn(&NodeId) -> bool) -> Result<(), String> {
        if self.head_entry().is_none() {
            return Err(format!(
                "the head {} is not among the offered snapshots",
                self.head
            ));
        }
        let keys: BTreeMap<NodeId, &NodePublicKeys> = self
            .authors
            .iter()
            .map(|keys| (keys.node_id(), keys))
            .collect();
        let mut seen = BTreeSet::new();
        for entry in &self.snapshots {
            if !seen.insert(entry.id) {
                return Err(format!("snapshot {} is offered twice", entry.id));
            }
            if !trusted(&entry.author) {
                return Err(format!(
                    "snapshot {} was written by node {}, which this vault does not trust for \
                     the volume (forge peer trust {} --volume NAME)",
                    entry.id, entry.author, entry.author
                ));
            }
            let Some(author_keys) = keys.get(&entry.author) else {
                return Err(format!(
                    "the keys of node {}, author of snapshot {}, are not in the offer",
                    entry.author, entry.id
                ));
            };
            let signature = Signature::from_bytes(&entry.signature)
                .map_err(|error| format!("snapshot {}: {error}", entry.id))?;
            author_keys
                .verify(
                    SignatureDomain::Snapshot,
                    &index_head_message(
                        &self.volume,
                        entry.id.as_bytes(),
                        entry.index_root.as_bytes(),
                    ),
                    &signature,
                )
                .map_err(|_| {
                    format!(
                        "the index head of snapshot {} does not verify with the keys of its \
                         author {}",
                        entry.id, entry.author
                    )
                })?;
        }
        Ok(())
    }

    /// Every snapshot the head reaches through the stated parents (the head included).
    #[must_use]
    pub fn lineage_of_head(&self) -> BTreeSet<Cid> {
        self.lineage_of_head_knowing(|_| None)
    }

    /// The same, where `known` gives the parents the receiver itself knows of a snapshot
    /// (they win over the sender's deleted ancestry; entries are checked separately).
    #[must_use]
    pub fn lineage_of_head_knowing(
        &self,
        known: impl Fn(&Cid) -> Option<Vec<Cid>>,
    ) -> BTreeSet<Cid> {
        let parents: BTreeMap<Cid, &[Cid]> = self
            .snapshots
            .iter()
            .map(|entry| (entry.id, entry.parents.as_slice()))
            .collect();
        let deleted: BTreeMap<Cid, &[Cid]> = self
            .deleted_ancestry
            .iter()
            .map(|(id, parents)| (*id, parents.as_slice()))
            .collect();
        ancestors(self.head, |id| {
            parents
                .get(id)
                .map(|list| list.to_vec())
                .or_else(|| known(id))
                .or_else(|| deleted.get(id).map(|list| list.to_vec()))
        })
    }
}

/// `start` and every snapshot reachable from it through `parents_of` (None: unknown, its
/// history ends there).
pub fn ancestors(start: Cid, parents_of: impl Fn(&Cid) -> Option<Vec<Cid>>) -> BTreeSet<Cid> {
    let mut reached = BTreeSet::from([start]);
    let mut pending = vec![start];
    while let Some(id) = pending.pop() {
        for parent in parents_of(&id).unwrap_or_default() {
            if reached.insert(parent) {
                pending.push(parent);
            }
        }
    }
    reached
}

/// What the receiver does with its branch when a sync ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefMove {
    /// The branch did not exist: created at the incoming head.
    Create,
    /// The local head is an ancestor of the incoming one: moved forward.
    FastForward,
    /// The heads are the same.
    UpToDate,
    /// The incoming head is an ancestor of the local one: the receiver is ahead; unmoved.
    ReceiverAhead,
    /// Neither contains the other: the incoming head goes to a new branch, the local one
    /// is never overwritten.
    Diverged,
}

impl RefMove {
    /// Decides the move from the local head (if any), the incoming head, every snapshot
    /// the incoming head reaches and every one the local head reaches. Pure: the same
    /// inputs give the same answer on every vault.
    #[must_use]
    pub fn decide(
        local: Option<Cid>,
        incoming: Cid,
        incoming_lineage: &BTreeSet<Cid>,
        local_lineage: &BTreeSet<Cid>,
    ) -> Self {
        match local {
            None => Self::Create,
            Some(local) if local == incoming => Self::UpToDate,
            Some(local) if incoming_lineage.contains(&local) => Self::FastForward,
            Some(_) if local_lineage.contains(&incoming) => Self::ReceiverAhead,
            Some(_) => Self::Diverged,
        }
    }

    /// Its code on the wire.
    #[must_use]
    pub fn code(self) -> u8 {
        match self {
            Self::Create => 0,
            Self::FastForward => 1,
            Self::UpToDate => 2,
            Self::ReceiverAhead => 3,
            Self::Diverged => 4,
        }
    }

    /// From its code on the wire.
    #[must_use]
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            0 => Self::Create,
            1 => Self::FastForward,
            2 => Self::UpToDate,
            3 => Self::ReceiverAhead,
            4 => Self::Diverged,
            _ => return None,
        })
    }

    /// How a user reads it.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::Create => "created",
            Self::FastForward => "fast-forwarded",
            Self::UpToDate => "up to date",
            Self::ReceiverAhead => "receiver ahead, unchanged",
            Self::Diverged => "diverged, kept on a new branch",
        }
    }
}

#[cfg(test)]
mod tests {
    use forge_crypto::NodeIdentity;

    use super::*;

    fn cid(byte: u8) -> Cid {
        Cid::of(&[byte])
    }

    fn signed_offer(author: &NodeIdentity) -> Offer {
        let volume = [7; 16];
        let entry = |id: Cid, parents: Vec<Cid>| {
            let root = Cid::of(id.as_bytes());
            SnapshotEntry {
                id,
                parents,
                time_ns: 5,
                logical_bytes: 10,
                file_count: 2,
                index_root: root,
                author: author.node_id(),
                signature: author
                    .sign(
                        SignatureDomain::Snapshot,
                        &index_head_message(&volume, id.as_bytes(), root.as_bytes()),
                    )
                    .unwrap()
                    .as_bytes()
                    .to_vec(),
            }
        };
        Offer {
            nonce: [3; 32],
            volume,
            name: "photos".into(),
            branch: "main".into(),
            head: cid(2),
            data_shards: 4,
            parity_shards: 2,
            domain: DomainInfo {
                id: [9; 16],
                chunker_version: 1,
                chunk_min_bytes: 16 << 10,
                chunk_avg_bytes: 64 << 10,
                chunk_max_bytes: 256 << 10,
            },
            authors: vec![author.public_keys().clone()],
            envelopes: vec![(NodeId::from_bytes([5; 32]), vec![1, 2, 3])],
            key_chain: vec![(1, vec![4; 40])],
            snapshots: vec![entry(cid(1), vec![]), entry(cid(2), vec![cid(1)])],
            deleted_ancestry: Vec::new(),
            contract: None,
        }
    }

    #[test]
    fn deleted_ancestry_round_trips_and_carries_the_history_past_deleted_snapshots() {
        let (author, _) = NodeIdentity::generate().unwrap();
        let mut offer = signed_offer(&author);
        // cid(1)'s parent cid(8) was deleted at the sender; cid(8) descends from cid(7),
        // deleted too, which descends from cid(6).
        offer.snapshots[0].parents = vec![cid(8)];
        offer.deleted_ancestry = vec![(cid(8), vec![cid(7)]), (cid(7), vec![cid(6)])];
        let bytes = offer.encode();
        let decoded = Offer::decode(&bytes).unwrap();
        assert_eq!(decoded, offer);
        assert_eq!(
            decoded.lineage_of_head(),
            BTreeSet::from([cid(1), cid(2), cid(6), cid(7), cid(8)])
        );
        // What the receiver knows itself wins over the sender's claim.
        let knowing = decoded.lineage_of_head_knowing(|id| (*id == cid(8)).then(|| vec![cid(5)]));
        assert_eq!(knowing, BTreeSet::from([cid(1), cid(2), cid(5), cid(8)]));
        let mut plain = offer.clone();
        plain.deleted_ancestry.clear();
        for len in 0..bytes.len() {
            // Cut exactly before the optional section, it is an offer without it; every
            // other cut is refused.
            if Offer::decode(&bytes[..len]).is_ok() {
                assert_eq!(len, plain.encode().len());
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Offer::decode(&longer).is_err());
    }

    #[test]
    fn a_contract_travels_after_the_deleted_ancestry_and_garbage_is_refused() {
        use forge_store::contract::{
            AccessMode, DetectorThresholds, SignedContract, VolumeContract,
        };
        let (author, _) = NodeIdentity::generate().unwrap();
        let contract = VolumeContract {
            volume: [1; 16],
            volume_name: "photos".into(),
            workloads: Vec::new(),
            mode: AccessMode::AppendOnly,
            expires_ns: None,
            detector: DetectorThresholds::default(),
            signer: *author.node_id().as_bytes(),
            created_ns: 7,
        };
        let signed = SignedContract {
            contract: contract.encode(),
            signature: vec![2; 3309],
        }
        .encode();
        for ancestry in [Vec::new(), vec![(cid(8), vec![cid(7)])]] {
            let mut offer = signed_offer(&author);
            offer.deleted_ancestry = ancestry;
            offer.contract = Some(Box::new(OfferedContract {
                signed: signed.clone(),
                attached_ns: -5,
            }));
            let bytes = offer.encode();
            assert_eq!(Offer::decode(&bytes).unwrap(), offer);
            // A cut anywhere in the contract section is refused.
            let without = {
                let mut plain = offer.clone();
                plain.contract = None;
                plain.encode().len()
            };
            for len in without + 1..bytes.len() {
                assert!(Offer::decode(&bytes[..len]).is_err(), "cut at {len}");
            }
            // Garbage where the contract goes is refused, naming it.
            let mut damaged = bytes.clone();
            let at = bytes.len() - signed.len() + 1;
            damaged[at] ^= 0xff;
            let error = Offer::decode(&damaged).unwrap_err().to_string();
            assert!(error.contains("its contract"), "{error}");
        }
        // An empty ancestry section with nothing after it is not this encoder's.
        let mut bytes = signed_offer(&author).encode();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        assert!(Offer::decode(&bytes).is_err());
    }

    #[test]
    fn an_offer_round_trips_and_verifies_only_with_trusted_authors() {
        let (author, _) = NodeIdentity::generate().unwrap();
        let offer = signed_offer(&author);
        let decoded = Offer::decode(&offer.encode()).unwrap();
        assert_eq!(decoded, offer);
        decoded.verify(|node| *node == author.node_id()).unwrap();
        let refused = decoded.verify(|_| false).unwrap_err();
        assert!(refused.contains("does not trust"), "{refused}");
        assert_eq!(decoded.lineage_of_head(), BTreeSet::from([cid(1), cid(2)]));
        // Every truncation is refused; so are trailing bytes.
        let bytes = offer.encode();
        for len in 0..bytes.len() {
            assert!(Offer::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Offer::decode(&longer).is_err());
    }

    #[test]
    fn a_changed_index_root_or_foreign_keys_do_not_verify() {
        let (author, _) = NodeIdentity::generate().unwrap();
        let (other, _) = NodeIdentity::generate().unwrap();
        let mut offer = signed_offer(&author);
        offer.snapshots[0].index_root = cid(99);
        let refused = offer.verify(|_| true).unwrap_err();
        assert!(refused.contains("does not verify"), "{refused}");
        let mut offer = signed_offer(&author);
        offer.authors = vec![other.public_keys().clone()];
        let refused = offer.verify(|_| true).unwrap_err();
        assert!(refused.contains("are not in the offer"), "{refused}");
        let mut offer = signed_offer(&author);
        offer.head = cid(42);
        assert!(offer.verify(|_| true).is_err());
    }

    #[test]
    fn the_ref_move_fast_forwards_only_an_ancestor_and_never_overwrites_a_divergence() {
        let (a, b, c, d) = (cid(1), cid(2), cid(3), cid(4));
        // a <- b <- c, and a <- d.
        let lineage = |head: Cid| {
            ancestors(head, |id| {
                Some(match *id {
                    x if x == b => vec![a],
                    x if x == c => vec![b],
                    x if x == d => vec![a],
                    _ => vec![],
                })
            })
        };
        let decide = |local: Option<Cid>, incoming: Cid| {
            RefMove::decide(
                local,
                incoming,
                &lineage(incoming),
                &local.map(lineage).unwrap_or_default(),
            )
        };
        assert_eq!(decide(None, c), RefMove::Create);
        assert_eq!(decide(Some(c), c), RefMove::UpToDate);
        assert_eq!(decide(Some(a), c), RefMove::FastForward);
        assert_eq!(decide(Some(c), b), RefMove::ReceiverAhead);
        assert_eq!(decide(Some(d), c), RefMove::Diverged);
        assert_eq!(decide(Some(c), d), RefMove::Diverged);
        for code in 0..=255 {
            if let Some(found) = RefMove::from_code(code) {
                assert_eq!(found.code(), code);
            }
        }
    }
}
