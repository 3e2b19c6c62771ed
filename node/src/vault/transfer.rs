//! The vault behind a volume sync (forge-mesh's `VolumeHost`): what it offers when it
//! sends, the rules by which it accepts a sync (trust, names, authors), and how it
//! publishes one (history records, key envelopes, the ref move, never overwriting a
//! diverged branch).
//!
//! A vault that receives a volume without a key envelope for itself holds its ciphertext
//! only (a zero-knowledge copy): it checks everything by cid and by the authors'
//! signatures over the reference-index heads, and can serve the volume onward.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use forge_crypto::{Cid, NodeId, NodeIdentity};
use forge_mesh::sync::{
    DomainInfo, Incoming, Offer, Outgoing, Published, RefMove, SnapshotEntry, SyncStore,
    VolumeHost, ancestors,
};
use forge_mesh::{MeshError, TransferProof};
use forge_store::VolumeId;
use forge_store::erasure::ErasureLayout;
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate, ref_update};

use super::peers::{LINEAGE, SHARES};
use super::records::{self, DomainRecord, IndexHead, SnapshotListing, VolumeKeys, VolumeRecord};
use super::sync::VaultSyncStore;
use super::{Vault, no_passphrase, validate_name};
use crate::clock::format_compact_utc_time;
use crate::error::{NodeError, Result};

/// Counts what syncs moved, per peer (the daemon's /metrics reads it).
pub type TransferCounter = Arc<dyn Fn(NodeId, bool, u64, u64) + Send + Sync>;

/// A vault as the sync protocol sees it.
pub struct VaultVolumeHost {
    vault: Arc<Vault>,
    incoming: Incoming,
    /// The syncs being received, by sender.
    receiving: Mutex<BTreeMap<NodeId, Receiving>>,
    counter: Option<TransferCounter>,
}

/// A sync being received.
struct Receiving {
    /// The accepted offer's nonce: a sender that offers again replaces its session, and
    /// what ends the old one (idle, a failed publish) must not end the new one.
    nonce: [u8; 32],
    /// Its store (its write session publishes).
    store: Arc<VaultSyncStore>,
    /// The volume record the offer was accepted for (checked once, at the offer).
    record: VolumeRecord,
}

impl std::fmt::Debug for VaultVolumeHost {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VaultVolumeHost")
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

/// Deleted snapshots an offer carries at most (the receiver's decoder bounds the section
/// like the listed ones): the nearest to the listed history. A receiver further behind
/// than that sees a divergence and keeps the incoming head on a new branch.
const DELETED_ANCESTRY_MAX: usize = forge_mesh::sync::offer::OFFER_SNAPSHOTS_MAX;

fn local(error: impl std::fmt::Display) -> MeshError {
    MeshError::Local {
        what: error.to_string(),
    }
}

impl VaultVolumeHost {
    /// The host of `vault`, sharing `incoming` with the protocol's server.
    #[must_use]
    pub fn new(vault: Arc<Vault>, incoming: Incoming, counter: Option<TransferCounter>) -> Self {
        Self {
            vault,
            incoming,
            receiving: Mutex::new(BTreeMap::new()),
            counter,
        }
    }

    fn receiving(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Receiving>> {
        self.receiving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The local volume with id `id`, if any.
    fn volume_by_id(&self, id: &[u8; 16]) -> Result<Option<VolumeRecord>> {
        Ok(self
            .vault
            .list_volumes()?
            .into_iter()
            .find(|record| &record.id == id))
    }

    fn build_offer(
        &self,
        name: &str,
        branch: &str,
        as_name: &str,
    ) -> Result<(Offer, VolumeRecord, u64)> {
        let vault = &*self.vault;
        let record = vault.require_volume(name)?;
        let volume = VolumeId::from_bytes(record.id);
        let head =
            vault
                .refs()
                .get_ref(&volume, branch)?
                .ok_or_else(|| NodeError::UnknownBranch {
                    volume: name.to_owned(),
                    branch: branch.to_owned(),
                })?;
        let listings: BTreeMap<Cid, SnapshotListing> =
            vault.snapshot_listings(&record)?.into_iter().collect();
        // The head's whole history: listed snapshots become entries; snapshots deleted
        // here are walked through by their lineage records (which outlive a deletion) and
        // sent as deleted ancestry. Without them a receiver whose branch is at a snapshot
        // deleted here since, or behind one, would see a plain fast-forward as a
        // divergence (the simulator found this). A deleted snapshot without a lineage
        // record ends the history there.
        let mut parents = BTreeMap::new();
        let mut deleted = BTreeMap::new();
        let mut pending = vec![head];
        while let Some(snapshot) = pending.pop() {
            if parents.contains_key(&snapshot) || deleted.contains_key(&snapshot) {
                continue;
            }
            if listings.contains_key(&snapshot) {
                let of = vault.parents_of(&record, &snapshot)?;
                pending.extend(of.iter().copied());
                parents.insert(snapshot, of);
            } else if deleted.len() < DELETED_ANCESTRY_MAX
                && let Some(of) = vault.recorded_lineage(&volume, &snapshot)?
            {
                pending.extend(of.iter().copied());
                deleted.insert(snapshot, of);
            }
        }
        let deleted_ancestry: Vec<(Cid, Vec<Cid>)> = deleted.into_iter().collect();
        let mut snapshots = Vec::with_capacity(parents.len());
        let mut authors = BTreeMap::new();
        for (snapshot, of) in parents {
            let listing = &listings[&snapshot];
            let head_record = vault.index_head(&record, &snapshot)?;
            let author = NodeId::from_bytes(head_record.author);
            if let std::collections::btree_map::Entry::Vacant(slot) = authors.entry(author) {
                slot.insert(
                    vault.trusted_keys(&head_record.author, &format!("snapshot {snapshot}"))?,
                );
            }
            snapshots.push(SnapshotEntry {
                id: snapshot,
                parents: of,
                time_ns: listing.time_ns,
                logical_bytes: listing.logical_bytes,
                file_count: listing.file_count,
                index_root: Cid::from_bytes(head_record.root),
                author,
                signature: head_record.signature,
            });
        }
        snapshots.sort_by_key(|entry| (entry.time_ns, entry.id));
        let domain =
            vault
                .domain_record(&record.domain)?
                .ok_or_else(|| NodeError::CorruptRecord {
                    what: "domain",
                    reason: format!("domain {:?} missing", record.domain),
                })?;
        let head_chunks = vault.walk_index(&record, &head)?.0.len() as u64;
        let offer = Offer {
            nonce: vault.random_array()?,
            volume: record.id,
            name: as_name.to_owned(),
            branch: branch.to_owned(),
            head,
            data_shards: record.data_shards,
            parity_shards: record.parity_shards,
            domain: DomainInfo {
                id: domain.id,
                chunker_version: domain.chunker_version,
                chunk_min_bytes: domain.chunk_min_bytes,
                chunk_avg_bytes: domain.chunk_avg_bytes,
                chunk_max_bytes: domain.chunk_max_bytes,
            },
            authors: authors.into_values().collect(),
            envelopes: vault.volume_shares(&volume)?,
            key_chain: vault.key_chain(&volume)?,
            snapshots,
            deleted_ancestry,
            contract: vault.attached_contract(&record)?.map(|(attached, _, _)| {
                Box::new(forge_mesh::sync::offer::OfferedContract {
                    signed: attached.signed,
                    attached_ns: attached.attached_ns,
                })
            }),
        };
        Ok((offer, record, head_chunks))
    }

    /// Whether `author` may have written snapshots of volume `id` received from `from`.
    fn trusted_author(&self, from: NodeId, id: &[u8; 16], author: &NodeId) -> bool {
        if *author == self.vault.identity().node_id() || *author == from {
            return true;
        }
        self.vault
            .peer(author)
            .ok()
            .flatten()
            .is_some_and(|peer| peer.trust(id).is_some_and(|trust| trust.write) || peer.new_volumes)
    }

    fn check_offer(&self, from: NodeId, offer: &Offer) -> Result<VolumeRecord> {
        validate_name("volume name", &offer.name)?;
        validate_name("branch name", &offer.branch)?;
        let peer = self.vault.peer(&from)?;
        let asked = self.incoming.pull_expected(from, &offer.name);
        let refuse = |reason: String| NodeError::SyncRefused { reason };
        let record = match self.volume_by_id(&offer.volume)? {
            Some(record) => {
                let may_write = peer
                    .as_ref()
                    .and_then(|peer| peer.trust(&record.id))
                    .is_some_and(|trust| trust.write);
                if !may_write && !asked {
                    return Err(refuse(format!(
                        "node {from} is not trusted to write volume {} here (forge peer trust \
                         {from} --volume {} --write)",
                        record.name, record.name
                    )));
                }
                record
            }
            None => {
                if !asked && !peer.as_ref().is_some_and(|peer| peer.new_volumes) {
                    return Err(refuse(format!(
                        "node {from} may not push new volumes here (forge peer trust {from} \
                         --new-volumes)"
                    )));
                }
                if let Some(taken) = self.vault.volume_record(&offer.name)? {
                    return Err(refuse(format!(
                        "a volume named {} exists here already, with another id ({}); sync it \
                         under another name with --as NAME",
                        taken.name,
                        VolumeId::from_bytes(taken.id)
                    )));
                }
                // Into this vault's volume group when the peer's new volumes go into one:
                // its chunks arrive in the group's layout.
                let layout = self.vault.layout_for_new_volume(
                    &from,
                    ErasureLayout::new(
                        usize::from(offer.data_shards),
                        usize::from(offer.parity_shards),
                    )?,
                )?;
                if offer.domain.chunker_version != records::CHUNKER_VERSION {
                    return Err(refuse(format!(
                        "its chunks were cut by chunker version {}; this forge has version {}",
                        offer.domain.chunker_version,
                        records::CHUNKER_VERSION
                    )));
                }
                VolumeRecord {
                    id: offer.volume,
                    name: offer.name.clone(),
                    data_shards: u16::try_from(layout.data_shards()).unwrap_or(u16::MAX),
                    parity_shards: u16::try_from(layout.parity_shards()).unwrap_or(u16::MAX),
                    domain: String::new(),
                    encrypted: false,
                    created_ns: self.vault.now_ns(),
                }
            }
        };
        offer
            .verify(|author| self.trusted_author(from, &offer.volume, author))
            .map_err(refuse)?;
        Ok(record)
    }

    fn publish_offer(&self, from: NodeId, offer: &Offer) -> Result<Published> {
        let vault = &*self.vault;
        let (store, accepted) = self
            .receiving()
            .get(&from)
            .filter(|receiving| receiving.nonce == offer.nonce)
            .map(|receiving| (receiving.store.clone(), receiving.record.clone()))
            .ok_or_else(|| NodeError::InvalidArgument {
                what: "sync",
                value: offer.name.clone(),
                reason: format!("no sync from node {from} with this offer is open"),
            })?;
        // Everything arrived: each snapshot's commit and whole index (holding an index
        // node means holding its subtree).
        for entry in &offer.snapshots {
            for (what, cid) in [("commit", entry.id), ("reference index", entry.index_root)] {
                if !store.holds(&cid).map_err(NodeError::Mesh)? {
                    return Err(NodeError::SyncRefused {
                        reason: format!(
                            "the {what} {cid} of snapshot {} did not arrive (run the sync \
                             again: what arrived is kept)",
                            entry.id
                        ),
                    });
                }
            }
        }
        let volume = VolumeId::from_bytes(offer.volume);
        let mut updates = Vec::new();
        let existing = self.volume_by_id(&offer.volume)?;
        let me = vault.identity().node_id();
        let record = match &existing {
            Some(record) => record.clone(),
            None if let Some(group) = vault.new_volume_group(&from)? => {
                // A volume of this vault's group from now on: recorded in the group with
                // its keys wrapped to every member, adopted here.
                let domain = DomainRecord {
                    chunker_version: offer.domain.chunker_version,
                    id: offer.domain.id,
                    chunk_min_bytes: offer.domain.chunk_min_bytes,
                    chunk_avg_bytes: offer.domain.chunk_avg_bytes,
                    chunk_max_bytes: offer.domain.chunk_max_bytes,
                    key_envelope: None,
                };
                let envelope = offer
                    .envelopes
                    .iter()
                    .find(|(node, _)| *node == me)
                    .map(|(_, envelope)| envelope.as_slice());
                vault.push_into_group(&group, accepted, domain, envelope)?
            }
            None => {
                // As accepted at the offer; a volume named so since then fails the update
                // (Expected::Absent), nothing is overwritten.
                let domain = self.domain_for(&offer.domain, &mut updates)?;
                let mut record = accepted;
                record.domain = domain;
                updates.push(RecordUpdate::new(
                    RecordSpace::VOLUMES,
                    record.name.as_bytes().to_vec(),
                    Expected::Absent,
                    Change::Put(records::encode(&record)),
                ));
                record
            }
        };
        let held_chain = vault.key_chain(&volume)?;
        for (generation, sealed) in &offer.key_chain {
            // A generation this vault has keeps its entry (the chain only grows).
            if !held_chain.iter().any(|(held, _)| held == generation) {
                updates.push(RecordUpdate::new(
                    super::peers::KEY_CHAIN,
                    super::peers::chain_key(&volume, *generation),
                    Expected::Absent,
                    Change::Put(sealed.clone()),
                ));
            }
        }
        let has_keys = match vault
            .refs()
            .get_record(RecordSpace::VOLUME_KEYS, &offer.volume)?
        {
            None => false,
            // Keys held, but the offered envelope may carry a newer key (rotated there).
            Some(_) => !self.offered_key_is_newer(offer, &volume)?,
        };
        for (node, envelope) in &offer.envelopes {
            if *node == me {
                if !has_keys {
                    // The envelope opens with this node's key: it is this vault's key now.
                    forge_crypto::envelope::unwrap(
                        vault.identity(),
                        envelope,
                        &super::volume_binding(&volume),
                    )?;
                    updates.push(RecordUpdate::new(
                        RecordSpace::VOLUME_KEYS,
                        offer.volume.to_vec(),
                        Expected::Any,
                        Change::Put(records::encode(&VolumeKeys::WrappedToNode(
                            envelope.clone(),
                        ))),
                    ));
                }
            } else {
                // Kept to travel onward with the volume.
                updates.push(RecordUpdate::new(
                    SHARES,
                    [offer.volume.as_slice(), node.as_bytes()].concat(),
                    Expected::Any,
                    Change::Put(envelope.clone()),
                ));
            }
        }
        for keys in &offer.authors {
            if keys.node_id() != me && !vault.knows_keys(&keys.node_id())? {
                vault.trust_node(keys)?;
            }
        }
        for entry in &offer.snapshots {
            let key = [offer.volume.as_slice(), entry.id.as_bytes()].concat();
            updates.push(RecordUpdate::new(
                RecordSpace::SNAPSHOTS,
                key.clone(),
                Expected::Any,
                Change::Put(records::encode(&SnapshotListing {
                    time_ns: entry.time_ns,
                    logical_bytes: entry.logical_bytes,
                    file_count: entry.file_count,
                })),
            ));
            updates.push(RecordUpdate::new(
                RecordSpace::INDEX_HEADS,
                key.clone(),
                Expected::Any,
                Change::Put(records::encode(&IndexHead {
                    root: *entry.index_root.as_bytes(),
                    author: *entry.author.as_bytes(),
                    signature: entry.signature.clone(),
                })),
            ));
            updates.push(RecordUpdate::new(
                LINEAGE,
                key,
                Expected::Any,
                Change::Put(records::encode(
                    &entry
                        .parents
                        .iter()
                        .map(|parent| *parent.as_bytes())
                        .collect::<Vec<_>>(),
                )),
            ));
        }
        vault.refs().apply(&updates)?;
        if existing.is_none() && !self.incoming.pull_expected(from, &offer.name) {
            // Pushed as a new volume: its source keeps pushing it (trusted to write it).
            if let Some(mut peer) = vault.peer(&from)? {
                peer.volumes.retain(|trust| trust.volume != offer.volume);
                peer.volumes.push(super::peers::VolumeTrust {
                    volume: offer.volume,
                    write: true,
                });
                vault.put_peer(&from, &peer)?;
            }
        }
        // With the volume's key at hand, each commit is checked too: its signature, its
        // volume, and the parents the sender stated.
        if let Ok(open) = vault.open_volume(&record.name, &no_passphrase) {
            for entry in &offer.snapshots {
                let commit = match vault.read_commit(&open, &entry.id) {
                    Ok(commit) => commit,
                    // Sealed with a key this node was not given (rotated after an
                    // unshare): held as ciphertext, checked by its signed index head only.
                    Err(NodeError::Integrity(crate::error::IntegrityFault::UnreadableObject {
                        ..
                    })) => continue,
                    Err(error) => return Err(error),
                };
                let parents: Vec<Cid> =
                    commit.parents.iter().map(|p| Cid::from_bytes(*p)).collect();
                if parents != entry.parents {
                    return Err(NodeError::SyncRefused {
                        reason: format!(
                            "snapshot {} has other parents than the sender stated",
                            entry.id
                        ),
                    });
                }
            }
        }
        let local = vault.refs().get_ref(&volume, &offer.branch)?;
        // Through snapshots deleted at the sender: what this vault recorded of them wins
        // over the sender's claim.
        let incoming_lineage =
            offer.lineage_of_head_knowing(|id| vault.recorded_lineage(&volume, id).ok().flatten());
        let local_lineage = match local {
            Some(head) => ancestors(head, |id| vault.parents_of(&record, id).ok()),
            None => BTreeSet::new(),
        };
        let moved = RefMove::decide(local, offer.head, &incoming_lineage, &local_lineage);
        let named: Vec<Cid> = offer
            .snapshots
            .iter()
            .flat_map(|entry| [entry.id, entry.index_root])
            .collect();
        let branch = match moved {
            RefMove::Create | RefMove::FastForward => {
                store.publish(
                    &[ref_update(&volume, &offer.branch, local, Some(offer.head))],
                    &named,
                )?;
                offer.branch.clone()
            }
            RefMove::UpToDate | RefMove::ReceiverAhead => offer.branch.clone(),
            RefMove::Diverged => {
                let peer_name = vault
                    .peer(&from)?
                    .and_then(|peer| peer.name)
                    .unwrap_or_else(|| from.to_hex()[..12].to_owned());
                let branch = format!(
                    "{}-from-{peer_name}-{}",
                    offer.branch,
                    format_compact_utc_time(vault.now_ns())
                );
                store.publish(
                    &[ref_update(&volume, &branch, None, Some(offer.head))],
                    &named,
                )?;
                branch
            }
        };
        // The sender's contract, when this vault trusts its signer with the volume and it
        // is newer than the one here. Never fails the sync: the data is in either way.
        if let Some(contract) = &offer.contract {
            match vault.take_offered_contract(&record, &contract.signed, contract.attached_ns) {
                Ok(true) => tracing::info!(volume = %record.name, %from, "contract received"),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(volume = %record.name, %from, %error, "contract not taken");
                }
            }
        }
        Ok(Published { moved, branch })
    }

    /// Whether the offer's envelope for this node holds a newer key than the one it has
    /// (its key was rotated at the sender): the newest chain entry opens with the offered
    /// key and not with the held one. A passphrase-protected key is never replaced.
    fn offered_key_is_newer(&self, offer: &Offer, volume: &VolumeId) -> Result<bool> {
        let vault = &*self.vault;
        let me = vault.identity().node_id();
        let Some((_, offered)) = offer.envelopes.iter().find(|(node, _)| *node == me) else {
            return Ok(false);
        };
        let Some((generation, newest)) = offer.key_chain.iter().max_by_key(|(g, _)| *g) else {
            return Ok(false);
        };
        let binding = super::volume_binding(volume);
        let Some(stored) = vault
            .refs()
            .get_record(RecordSpace::VOLUME_KEYS, volume.as_bytes())?
        else {
            return Ok(true);
        };
        let VolumeKeys::WrappedToNode(held) =
            records::decode::<VolumeKeys>("volume keys", &stored)?
        else {
            return Ok(false);
        };
        let key_of = |envelope: &[u8]| -> Option<forge_crypto::VolumeKey> {
            forge_crypto::envelope::unwrap(vault.identity(), envelope, &binding)
                .ok()?
                .volume_key()
                .cloned()
        };
        let opens = |key: &Option<forge_crypto::VolumeKey>| {
            key.as_ref()
                .is_some_and(|key| super::peers::opens_chain(key, volume, *generation, newest))
        };
        Ok(opens(&key_of(offered)) && !opens(&key_of(&held)))
    }

    /// The name of the local domain with the offer's domain id, creating its record (no
    /// key: the key arrives in a writer's envelope, if ever) when there is none.
    fn domain_for(&self, info: &DomainInfo, updates: &mut Vec<RecordUpdate>) -> Result<String> {
        for (name, value) in self.vault.refs().scan_records(RecordSpace::DOMAINS, b"")? {
            if DomainRecord::decode(&value)?.id == info.id {
                return String::from_utf8(name).map_err(|_| NodeError::CorruptRecord {
                    what: "domain",
                    reason: "a name that is not UTF-8".into(),
                });
            }
        }
        let name = format!("peer-{}", data_encoding::HEXLOWER.encode(&info.id));
        updates.push(RecordUpdate::new(
            RecordSpace::DOMAINS,
            name.as_bytes().to_vec(),
            Expected::Absent,
            Change::Put(
                DomainRecord {
                    chunker_version: info.chunker_version,
                    id: info.id,
                    chunk_min_bytes: info.chunk_min_bytes,
                    chunk_avg_bytes: info.chunk_avg_bytes,
                    chunk_max_bytes: info.chunk_max_bytes,
                    key_envelope: None,
                }
                .encode(),
            ),
        ));
        Ok(name)
    }
}

impl Vault {
    /// A snapshot's parents: recorded with it, or read from its commit (which needs the
    /// volume's key).
    ///
    /// # Errors
    /// Neither is at hand; integrity errors.
    /// Audit samples of `branch`'s head of volume `name`: up to `wanted` of the head's
    /// chunks this vault holds, each with a random kibibyte to prove (the daemon's
    /// `forge volume audit` and the simulator ask a peer for them). The head, and the
    /// samples.
    ///
    /// # Errors
    /// Unknown names; [`NodeError::InvalidArgument`] when this vault holds none of the
    /// head's chunks; integrity errors reading one.
    pub fn audit_samples(
        &self,
        name: &str,
        branch: &str,
        wanted: usize,
    ) -> Result<(Cid, Vec<forge_mesh::audit::Sample>)> {
        use forge_mesh::audit::{pick, sample};
        let record = self.require_volume(name)?;
        let head = self
            .refs()
            .get_ref(&VolumeId::from_bytes(record.id), branch)?
            .ok_or_else(|| NodeError::UnknownBranch {
                volume: name.to_owned(),
                branch: branch.to_owned(),
            })?;
        // The head's chunks this vault holds (it reads each sampled one for its size).
        let (cids, _) = self.walk_index(&record, &head)?;
        let mut chunks = Vec::with_capacity(cids.len());
        for cid in cids {
            if self.chunk_stored(&cid)? {
                chunks.push(cid);
            }
        }
        if chunks.is_empty() {
            return Err(NodeError::InvalidArgument {
                what: "audit",
                value: name.to_owned(),
                reason: "this vault holds none of the head's chunks to audit against".into(),
            });
        }
        let mut random = || {
            self.random_array::<8>()
                .map(u64::from_le_bytes)
                .unwrap_or_default()
        };
        let mut samples = Vec::new();
        for cid in pick(&chunks, wanted, &mut random) {
            let size = self.read_ciphertext(&cid)?.len() as u64;
            samples.push(sample(cid, size, &mut random));
        }
        Ok((head, samples))
    }

    pub(crate) fn parents_of(&self, record: &VolumeRecord, snapshot: &Cid) -> Result<Vec<Cid>> {
        let volume = VolumeId::from_bytes(record.id);
        if let Some(parents) = self.recorded_lineage(&volume, snapshot)? {
            return Ok(parents);
        }
        let open = self.open_volume(&record.name, &no_passphrase)?;
        Ok(self
            .read_commit(&open, snapshot)?
            .parents
            .into_iter()
            .map(Cid::from_bytes)
            .collect())
    }
}

impl VolumeHost for VaultVolumeHost {
    fn identity(&self) -> &NodeIdentity {
        self.vault.identity()
    }

    fn now_ns(&self) -> i64 {
        self.vault.now_ns()
    }

    fn outgoing(
        &self,
        _peer: NodeId,
        name: &str,
        branch: &str,
        as_name: &str,
    ) -> std::result::Result<Outgoing, MeshError> {
        let (offer, record, head_chunks) =
            self.build_offer(name, branch, as_name).map_err(local)?;
        let layout = ErasureLayout::new(
            usize::from(record.data_shards),
            usize::from(record.parity_shards),
        )
        .map_err(local)?;
        let store =
            VaultSyncStore::open(self.vault.clone(), VolumeId::from_bytes(record.id), layout)
                .map_err(local)?;
        Ok(Outgoing {
            offer,
            store: Arc::new(store),
            head_chunks,
        })
    }

    fn accept(
        &self,
        from: NodeId,
        offer: &Offer,
    ) -> std::result::Result<Arc<dyn SyncStore>, String> {
        let record = self
            .check_offer(from, offer)
            .map_err(|error| error.to_string())?;
        let layout = ErasureLayout::new(
            usize::from(record.data_shards),
            usize::from(record.parity_shards),
        )
        .map_err(|error| error.to_string())?;
        let store = Arc::new(
            VaultSyncStore::open(
                self.vault.clone(),
                VolumeId::from_bytes(offer.volume),
                layout,
            )
            .map_err(|error| format!("this vault cannot receive now: {error}"))?,
        );
        // A session this one replaces ends after the lock is let go (its pin may
        // release through a group).
        let replaced = self.receiving().insert(
            from,
            Receiving {
                nonce: offer.nonce,
                store: store.clone(),
                record,
            },
        );
        drop(replaced);
        Ok(store)
    }

    fn publish(&self, from: NodeId, offer: &Offer) -> std::result::Result<Published, MeshError> {
        self.publish_offer(from, offer)
            .map_err(|error| match error {
                NodeError::Mesh(error) => error,
                other => MeshError::Remote {
                    peer: self.vault.identity().node_id(),
                    protocol: forge_mesh::sync::VOLUME_PROTOCOL.name,
                    message: other.to_string(),
                },
            })
    }

    fn keep_proof(&self, proof: &TransferProof) -> std::result::Result<(), MeshError> {
        self.vault.keep_proof(proof).map_err(local)?;
        // The receiving side is over: that offer's session (and claims) end.
        if proof.receipt.receiver == self.vault.identity().node_id() {
            self.end(proof.receipt.sender, &proof.receipt.nonce);
        }
        Ok(())
    }

    fn end(&self, from: NodeId, nonce: &[u8; 32]) {
        // Dropped after the lock is let go (its pin may release through a group).
        let ended = {
            let mut receiving = self.receiving();
            if receiving
                .get(&from)
                .is_some_and(|receiving| &receiving.nonce == nonce)
            {
                receiving.remove(&from)
            } else {
                None
            }
        };
        drop(ended);
    }

    fn may_pull(&self, from: NodeId, name: &str) -> std::result::Result<(), String> {
        let record = self
            .vault
            .require_volume(name)
            .map_err(|error| error.to_string())?;
        let trusted = self
            .vault
            .peer(&from)
            .map_err(|error| error.to_string())?
            .is_some_and(|peer| peer.trust(&record.id).is_some());
        if trusted {
            Ok(())
        } else {
            Err(format!(
                "node {from} is not trusted to read volume {name} here (forge peer trust {from} \
                 --volume {name} --read)"
            ))
        }
    }

    fn follow(
        &self,
        from: NodeId,
        name: &str,
        branch: &str,
        on: bool,
    ) -> std::result::Result<[u8; 16], String> {
        if on {
            self.may_pull(from, name)?;
            validate_name("branch name", branch).map_err(|error| error.to_string())?;
        }
        let record = self
            .vault
            .require_volume(name)
            .map_err(|error| error.to_string())?;
        self.vault
            .set_follower(&record.id, &from, branch, on)
            .map_err(|error| error.to_string())?;
        Ok(record.id)
    }

    fn count(&self, peer: NodeId, sent: bool, chunks: u64, bytes: u64) {
        if let Some(counter) = &self.counter {
            counter(peer, sent, chunks, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use forge_mesh::memory::MemoryNetwork;
    use forge_mesh::sync::{
        TransferConfig, TransferSummary, pull_volume, send_volume, serve_volumes,
    };
    use forge_mesh::{PeerNet, TransferProof};

    use super::*;
    use crate::progress::Progress;
    use crate::test_support::{new_vault, no_passphrase, pseudo_random};
    use crate::vault::export::SnapshotSelector;
    use crate::vault::{CreateVolumeOptions, ExportOptions, ImportOptions};

    /// A vault on an in-process network, serving syncs.
    struct Site {
        vault: Arc<Vault>,
        net: Arc<dyn PeerNet>,
        host: Arc<VaultVolumeHost>,
        incoming: Incoming,
    }

    /// Sites `a` and `b` on `network`: `a` holds volume `v`, `b` takes new volumes from it.
    fn a_pushing_to_b(network: &MemoryNetwork, root: &Path) -> (Site, Site) {
        let a = Site::join(network, &root.join("a"));
        let b = Site::join(network, &root.join("b"));
        a.vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        b.meet(&a, "site-a");
        b.vault.trust_peer(&a.id(), None, false, true).unwrap();
        (a, b)
    }

    impl Site {
        fn join(network: &MemoryNetwork, root: &Path) -> Self {
            let vault = Arc::new(new_vault(root));
            let net: Arc<dyn PeerNet> = network.join(vault.identity().node_id());
            let incoming = Incoming::default();
            let host = Arc::new(VaultVolumeHost::new(vault.clone(), incoming.clone(), None));
            serve_volumes(net.clone(), host.clone(), incoming.clone(), config()).unwrap();
            Self {
                vault,
                net,
                host,
                incoming,
            }
        }

        fn id(&self) -> NodeId {
            self.vault.identity().node_id()
        }

        /// Adds `other` as a peer named `name` (its keys, as its Hello would prove them).
        fn meet(&self, other: &Site, name: &str) {
            self.vault
                .add_peer(other.vault.identity().public_keys(), None, Some(name))
                .unwrap();
        }

        async fn send(
            &self,
            to: &Site,
            volume: &str,
        ) -> std::result::Result<TransferSummary, MeshError> {
            let _turn = self.incoming.push_turn(to.id()).await;
            send_volume(
                self.net.clone(),
                self.host.clone(),
                to.id(),
                volume,
                "main",
                volume,
                &config(),
            )
            .await
        }

        fn import(&self, volume: &str, source: &Path) -> Cid {
            self.try_import(volume, source).unwrap()
        }

        fn try_import(&self, volume: &str, source: &Path) -> Result<Cid> {
            let options = ImportOptions {
                message: String::new(),
                branch: "main".into(),
                dna: BTreeMap::new(),
                atime: false,
            };
            self.vault
                .import(
                    volume,
                    source,
                    &options,
                    &no_passphrase,
                    &Progress::new("test", false),
                )
                .map(|report| report.snapshot)
        }

        fn export(&self, volume: &str, branch: &str, to: &Path) -> Result<()> {
            self.vault
                .export(
                    volume,
                    to,
                    &SnapshotSelector::Branch(branch.into()),
                    &ExportOptions::default(),
                    &no_passphrase,
                    &Progress::new("test", false),
                )
                .map(|_| ())
        }
    }

    fn config() -> TransferConfig {
        TransferConfig {
            control_deadline: Duration::from_secs(30),
            ..TransferConfig::default()
        }
    }

    fn write_tree(root: &Path, seed: u64, files: u64) {
        std::fs::create_dir_all(root.join("d")).unwrap();
        for file in 0..files {
            std::fs::write(
                root.join("d").join(format!("f{file}")),
                pseudo_random(usize::try_from(20_000 + file * 9_000).unwrap(), seed + file),
            )
            .unwrap();
        }
    }

    fn same_tree(a: &Path, b: &Path) {
        let mut names: Vec<_> = std::fs::read_dir(a.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        let mut other: Vec<_> = std::fs::read_dir(b.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        other.sort();
        assert_eq!(names, other);
        for name in names {
            assert_eq!(
                std::fs::read(a.join("d").join(&name)).unwrap(),
                std::fs::read(b.join("d").join(&name)).unwrap(),
                "{name:?}"
            );
        }
    }

    /// Found by the simulator: on a node a volume was unshared from, the snapshots made
    /// after it (sealed with a key it was not given) made gc fail for the whole vault and
    /// fsck report them as damaged.
    /// Ending a sync (idle, or its publish failed) ends that offer's session only: the
    /// sender may have offered anew in that moment, and its new sync must still publish.
    #[test]
    fn ending_an_old_offer_leaves_the_senders_new_one_open() {
        let temp = tempfile::tempdir().unwrap();
        let vault = Arc::new(new_vault(temp.path()));
        let record = vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let host = VaultVolumeHost::new(vault.clone(), Incoming::default(), None);
        let sender = NodeId::from_bytes([5; 32]);
        let open = |nonce: u8| Receiving {
            nonce: [nonce; 32],
            store: Arc::new(
                VaultSyncStore::open(
                    vault.clone(),
                    VolumeId::from_bytes(record.id),
                    ErasureLayout::SINGLE,
                )
                .unwrap(),
            ),
            record: record.clone(),
        };
        host.receiving().insert(sender, open(1));
        // The sender offers again: its new session replaces the old one.
        host.receiving().insert(sender, open(2));
        // What ends the old one comes late.
        host.end(sender, &[1; 32]);
        assert_eq!(
            host.receiving()
                .get(&sender)
                .map(|receiving| receiving.nonce),
            Some([2; 32])
        );
        host.end(sender, &[2; 32]);
        assert!(host.receiving().get(&sender).is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_a_volume_was_unshared_from_keeps_gc_and_fsck_working() {
        let temp = tempfile::tempdir().unwrap();
        let network = MemoryNetwork::new(9);
        let (a, b) = a_pushing_to_b(&network, temp.path());
        a.meet(&b, "site-b");
        a.vault
            .share_volume("v", &b.id(), false, &no_passphrase)
            .unwrap();
        let tree = temp.path().join("tree");
        write_tree(&tree, 1, 4);
        a.import("v", &tree);
        assert_eq!(a.send(&b, "v").await.unwrap().moved, RefMove::Create);
        a.vault
            .unshare_volume("v", &b.id(), &no_passphrase)
            .unwrap();
        write_tree(&tree, 2, 4);
        let after = a.import("v", &tree);
        assert_eq!(a.send(&b, "v").await.unwrap().moved, RefMove::FastForward);
        // b holds the new snapshot as ciphertext only, and keeps all of it.
        assert!(b.export("v", "main", &temp.path().join("out")).is_err());
        b.vault
            .gc(&no_passphrase, &Progress::new("gc", false))
            .unwrap();
        let checked = b.vault.fsck(None, &Progress::new("fsck", false)).unwrap();
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
        let record = b.vault.require_volume("v").unwrap();
        let (cids, _) = b.vault.walk_index(&record, &after).unwrap();
        for cid in &cids {
            assert!(b.vault.stores(cid).unwrap(), "{cid} kept by gc");
        }
    }

    /// A volume's contract travels with its syncs: taken when the receiver trusts its
    /// signer with the volume and it is newer; a receiver then refuses mounts by it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_contract_travels_with_the_volume_and_binds_the_receiver() {
        use crate::vault::trust::{MountIntent, NewContract};
        use forge_store::contract::{AccessMode, Workload};
        let temp = tempfile::tempdir().unwrap();
        let network = MemoryNetwork::new(11);
        let (a, b) = a_pushing_to_b(&network, temp.path());
        let tree = temp.path().join("tree");
        write_tree(&tree, 1, 3);
        a.import("v", &tree);
        let contract = |mode: &str| {
            let file = a
                .vault
                .new_contract(
                    "v",
                    &NewContract {
                        mode: Some(mode.into()),
                        ..NewContract::default()
                    },
                )
                .unwrap();
            a.vault.sign_contract(&file).unwrap()
        };
        a.vault.attach_contract("v", &contract("ro")).unwrap();
        assert_eq!(a.send(&b, "v").await.unwrap().moved, RefMove::Create);
        let record = b.vault.require_volume("v").unwrap();
        let (_, _, taken) = b.vault.attached_contract(&record).unwrap().unwrap();
        assert_eq!(taken.mode, AccessMode::ReadOnly);
        let write = MountIntent {
            read_only: false,
            workload: &Workload::Interactive,
        };
        let error = b.vault.check_mount(&record, write).unwrap_err();
        assert!(error.to_string().contains("read-only use only"), "{error}");
        // A newer contract replaces it with the next sync (nothing new to send but it).
        a.vault.attach_contract("v", &contract("append")).unwrap();
        write_tree(&tree, 2, 3);
        a.import("v", &tree);
        a.send(&b, "v").await.unwrap();
        assert!(b.vault.check_mount(&record, write).unwrap().append_only);
        assert_eq!(b.vault.contract_history(&record).unwrap().len(), 2);
        // A contract signed by a node the receiver does not know is not taken: it keeps
        // its own, and the data still arrives.
        let c = Site::join(&network, &temp.path().join("c"));
        a.vault
            .trust_node(c.vault.identity().public_keys())
            .unwrap();
        a.vault.trust_peer(&c.id(), Some("v"), true, false).unwrap();
        let unsigned = a
            .vault
            .new_contract(
                "v",
                &NewContract {
                    mode: Some("rw".into()),
                    ..NewContract::default()
                },
            )
            .unwrap();
        a.vault
            .attach_contract("v", &c.vault.sign_contract(&unsigned).unwrap())
            .unwrap();
        write_tree(&tree, 3, 3);
        let head = a.import("v", &tree);
        a.send(&b, "v").await.unwrap();
        assert_eq!(
            b.vault.branches("v").unwrap(),
            vec![("main".to_owned(), head)]
        );
        let (_, _, held) = b.vault.attached_contract(&record).unwrap().unwrap();
        assert_eq!(held.mode, AccessMode::AppendOnly);
    }

    /// Found by the simulator: snapshots deleted at the sender between the receiver's head
    /// and the new head made a plain fast-forward look like a divergence.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fast_forward_past_snapshots_deleted_at_the_sender_is_still_one() {
        let temp = tempfile::tempdir().unwrap();
        let network = MemoryNetwork::new(5);
        let (a, b) = a_pushing_to_b(&network, temp.path());
        let tree = temp.path().join("tree");
        let mut snapshots = Vec::new();
        for version in 0..4u64 {
            write_tree(&tree, version, 3);
            snapshots.push(a.import("v", &tree));
            if version == 0 {
                assert_eq!(a.send(&b, "v").await.unwrap().moved, RefMove::Create);
            }
        }
        // b is at the first; the two between it and the head go, and so does the first.
        for deleted in &snapshots[..3] {
            a.vault.delete_snapshot("v", &deleted.to_string()).unwrap();
        }
        a.vault
            .gc(&no_passphrase, &Progress::new("gc", false))
            .unwrap();
        let pushed = a.send(&b, "v").await.unwrap();
        assert_eq!(pushed.moved, RefMove::FastForward, "{pushed:?}");
        assert_eq!(
            b.vault.branches("v").unwrap(),
            vec![("main".into(), snapshots[3])]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pushed_volume_arrives_keyless_then_incrementally_then_readable_once_shared() {
        let temp = tempfile::tempdir().unwrap();
        let network = MemoryNetwork::new(3);
        let a = Site::join(&network, &temp.path().join("a"));
        let b = Site::join(&network, &temp.path().join("b"));
        a.vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let first_tree = temp.path().join("first");
        write_tree(&first_tree, 1, 12);
        let first = a.import("v", &first_tree);

        // Nothing is taken from a node b does not trust; nothing is stored.
        let refused = a.send(&b, "v").await.unwrap_err();
        assert!(refused.to_string().contains("--new-volumes"), "{refused}");
        assert!(b.vault.volume_record("v").unwrap().is_none());

        b.meet(&a, "site-a");
        b.vault.trust_peer(&a.id(), None, false, true).unwrap();
        let pushed = a.send(&b, "v").await.unwrap();
        assert_eq!(pushed.moved, RefMove::Create);
        assert!(pushed.chunks_sent >= 12, "{pushed:?}");
        let record = b.vault.require_volume("v").unwrap();
        assert!(!b.vault.holds_volume_keys(&record).unwrap());
        assert_eq!(b.vault.branches("v").unwrap(), vec![("main".into(), first)]);
        // A zero-knowledge copy: no export, but gc keeps all of it.
        let refused = b
            .export("v", "main", &temp.path().join("out0"))
            .unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("no key for volume v on this node"),
            "{refused}"
        );
        b.vault
            .gc(&no_passphrase, &Progress::new("gc", false))
            .unwrap();
        let checked = b.vault.fsck(None, &Progress::new("fsck", false)).unwrap();
        assert!(checked.problems.is_empty(), "{:?}", checked.problems);
        assert!(checked.chunks_checked >= 12);
        let (cids, _) = b.vault.walk_index(&record, &first).unwrap();
        for cid in &cids {
            assert!(b.vault.stores(cid).unwrap(), "{cid} kept by gc");
        }

        // One file changed: the next push sends about that much.
        let second_tree = temp.path().join("second");
        write_tree(&second_tree, 1, 12);
        std::fs::write(second_tree.join("d/f3"), pseudo_random(40_000, 999)).unwrap();
        let second = a.import("v", &second_tree);
        let pushed = a.send(&b, "v").await.unwrap();
        assert_eq!(pushed.moved, RefMove::FastForward);
        assert!(
            pushed.chunks_sent <= 6,
            "only the changed file's chunks: {pushed:?}"
        );
        assert!(pushed.chunks_skipped >= 11, "{pushed:?}");
        assert_eq!(
            b.vault.branches("v").unwrap(),
            vec![("main".into(), second)]
        );

        // Shared for writing: the envelope travels with the next sync; b reads and writes.
        let unknown = a
            .vault
            .share_volume("v", &b.id(), true, &no_passphrase)
            .unwrap_err();
        assert!(unknown.to_string().contains("forge peer add"), "{unknown}");
        a.meet(&b, "site-b");
        a.vault
            .share_volume("v", &b.id(), true, &no_passphrase)
            .unwrap();
        let pushed = a.send(&b, "v").await.unwrap();
        assert_eq!(pushed.moved, RefMove::UpToDate);
        assert_eq!(pushed.chunks_sent, 0, "{pushed:?}");
        let out = temp.path().join("out");
        b.export("v", "main", &out).unwrap();
        same_tree(&second_tree, &out);
        assert_eq!(
            b.vault.list_snapshots("v", &no_passphrase).unwrap().len(),
            2
        );

        // Both keep every proof; each verifies offline and names the transfer.
        let (sent, received) = (a.vault.proofs(None).unwrap(), b.vault.proofs(None).unwrap());
        assert_eq!(sent.len(), 3);
        assert_eq!(
            sent.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            received.iter().map(|(id, _)| id).collect::<Vec<_>>()
        );
        for (id, proof) in &sent {
            let file = a.vault.proof_file(id).unwrap();
            let verified = TransferProof::decode_verified(&file).unwrap();
            assert_eq!(verified.receipt, proof.receipt);
            assert_eq!(
                (proof.receipt.sender, proof.receipt.receiver),
                (a.id(), b.id())
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_diverged_branch_is_kept_beside_and_a_pull_needs_read_trust() {
        let temp = tempfile::tempdir().unwrap();
        let network = MemoryNetwork::new(4);
        let a = Site::join(&network, &temp.path().join("a"));
        let b = Site::join(&network, &temp.path().join("b"));
        a.vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let tree = temp.path().join("t1");
        write_tree(&tree, 5, 4);
        a.import("v", &tree);
        a.meet(&b, "site-b");
        b.meet(&a, "site-a");
        a.vault
            .share_volume("v", &b.id(), true, &no_passphrase)
            .unwrap();

        // b pulls: refused until a trusts b to read the volume.
        let pulling = config();
        let pull = || pull_volume(&*b.net, &b.incoming, a.id(), ["v", "main", "v"], &pulling);
        let refused = pull().await.unwrap_err();
        assert!(
            refused.to_string().contains("not trusted to read volume v"),
            "{refused}"
        );
        a.vault
            .trust_peer(&b.id(), Some("v"), false, false)
            .unwrap();
        let pulled = pull().await.unwrap();
        assert_eq!(pulled.moved, RefMove::Create);

        // Both write: a's next push diverges from b's head and lands beside it.
        let mine = temp.path().join("t2");
        write_tree(&mine, 6, 4);
        let b_head = b.import("v", &mine);
        let theirs = temp.path().join("t3");
        write_tree(&theirs, 7, 4);
        let a_head = a.import("v", &theirs);
        b.vault.trust_peer(&a.id(), Some("v"), true, false).unwrap();
        let pushed = a.send(&b, "v").await.unwrap();
        assert_eq!(pushed.moved, RefMove::Diverged);
        assert!(
            pushed.branch.starts_with("main-from-site-a-"),
            "{}",
            pushed.branch
        );
        let branches: BTreeMap<String, Cid> = b.vault.branches("v").unwrap().into_iter().collect();
        assert_eq!(branches["main"], b_head, "never overwritten");
        assert_eq!(branches[&pushed.branch], a_head);
        let out = temp.path().join("out");
        b.export("v", &pushed.branch, &out).unwrap();
        same_tree(&theirs, &out);

        // A node b trusts for nothing is refused, and stores nothing.
        b.vault.revoke_peer(&a.id()).unwrap();
        let again = temp.path().join("t4");
        write_tree(&again, 8, 2);
        a.import("v", &again);
        let refused = a.send(&b, "v").await.unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("not trusted to write volume v"),
            "{refused}"
        );
        assert_eq!(b.vault.branches("v").unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unshared_node_keeps_the_old_snapshots_and_cannot_read_the_new_ones() {
        let temp = tempfile::tempdir().unwrap();
        let network = MemoryNetwork::new(6);
        let a = Site::join(&network, &temp.path().join("a"));
        let b = Site::join(&network, &temp.path().join("b"));
        let c = Site::join(&network, &temp.path().join("c"));
        a.vault
            .create_volume("v", &CreateVolumeOptions::default(), &no_passphrase)
            .unwrap();
        let old_tree = temp.path().join("old");
        write_tree(&old_tree, 9, 5);
        let old = a.import("v", &old_tree);
        for (site, name) in [(&b, "b"), (&c, "c")] {
            a.meet(site, name);
            site.meet(&a, "a");
            site.vault.trust_peer(&a.id(), None, false, true).unwrap();
        }
        a.vault
            .share_volume("v", &b.id(), true, &no_passphrase)
            .unwrap();
        a.vault
            .share_volume("v", &c.id(), false, &no_passphrase)
            .unwrap();
        for site in [&b, &c] {
            a.send(site, "v").await.unwrap();
            let out = temp.path().join(format!("first-{}", site.id()));
            site.export("v", "main", &out).unwrap();
            same_tree(&old_tree, &out);
        }
        // A reader's share cannot write.
        let refused = c.try_import("v", &old_tree);
        assert!(refused.unwrap_err().to_string().contains("may only read"));

        assert_eq!(
            a.vault
                .unshare_volume("v", &b.id(), &no_passphrase)
                .unwrap(),
            0
        );
        let new_tree = temp.path().join("new");
        write_tree(&new_tree, 10, 5);
        a.import("v", &new_tree);
        for site in [&b, &c] {
            a.send(site, "v").await.unwrap();
        }
        let export_old = |site: &Site, to: &str| {
            site.vault
                .export(
                    "v",
                    &temp.path().join(to),
                    &SnapshotSelector::Id(old.to_hex()),
                    &ExportOptions::default(),
                    &no_passphrase,
                    &Progress::new("test", false),
                )
                .map(|_| ())
        };
        // c, still shared, got the new key: it reads both.
        let out = temp.path().join("c-new");
        c.export("v", "main", &out).unwrap();
        same_tree(&new_tree, &out);
        export_old(&c, "c-old").unwrap();
        same_tree(&old_tree, &temp.path().join("c-old"));
        // b keeps what it had, not what came after.
        export_old(&b, "b-old").unwrap();
        let refused = b
            .export("v", "main", &temp.path().join("b-new"))
            .unwrap_err();
        assert!(refused.to_string().contains("unreadable"), "{refused}");
        // a reads both through the key chain.
        export_old(&a, "a-old").unwrap();
        a.export("v", "main", &temp.path().join("a-new")).unwrap();
        let again = a
            .vault
            .unshare_volume("v", &b.id(), &no_passphrase)
            .unwrap_err();
        assert!(again.to_string().contains("not shared"), "{again}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_volumes_pushed_to_one_peer_at_once_both_arrive() {
        let temp = tempfile::tempdir().unwrap();
        let network = MemoryNetwork::new(8);
        let a = Site::join(&network, &temp.path().join("a"));
        let b = Site::join(&network, &temp.path().join("b"));
        b.meet(&a, "a");
        b.vault.trust_peer(&a.id(), None, false, true).unwrap();
        for (name, seed) in [("v", 30), ("w", 40)] {
            a.vault
                .create_volume(name, &CreateVolumeOptions::default(), &no_passphrase)
                .unwrap();
            let tree = temp.path().join(name);
            write_tree(&tree, seed, 6);
            a.import(name, &tree);
        }
        // The receiver keeps one session per sender: the pushes take turns.
        let (v, w) = tokio::join!(a.send(&b, "v"), a.send(&b, "w"));
        assert_eq!(v.unwrap().moved, RefMove::Create);
        assert_eq!(w.unwrap().moved, RefMove::Create);
        assert_eq!(b.vault.list_volumes().unwrap().len(), 2);
    }
}
