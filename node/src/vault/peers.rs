//! Other vaults this one knows: peers (their addresses, names and what they are trusted
//! with), the key envelopes of volumes shared with other nodes, the lineage of snapshots
//! (so a vault without a volume's key can still serve its history onward), and the
//! transfer proofs this vault keeps. All are records of the metadata store.
//!
//! Trust is per volume (by VolumeId, the same on every vault): a peer trusted to *read* a
//! volume may pull it; one trusted to *write* it may push it (and counts as an author of
//! its snapshots); `new_volumes` lets a peer push volumes this vault does not have yet.

use forge_crypto::{Cid, NodeId, NodePublicKeys};
use forge_mesh::TransferProof;
use forge_store::VolumeId;
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};
use serde::{Deserialize, Serialize};

use super::records;
use super::{KEYRING, Vault, validate_name};
use crate::error::{NodeError, Result};

/// Peers: key = NodeId, value = [`PeerRecord`].
pub const PEERS: RecordSpace = RecordSpace::new("peers");
/// Key envelopes of a volume for other nodes: key = volume id ‖ NodeId.
pub const SHARES: RecordSpace = RecordSpace::new("shares");
/// A snapshot's parents: key = volume id ‖ snapshot, value = parents.
pub const LINEAGE: RecordSpace = RecordSpace::new("lineage");
/// Transfer proofs: key = proof id (8 bytes), value = the proof file.
pub const PROOFS: RecordSpace = RecordSpace::new("proofs");
/// A volume's key chain: key = volume id ‖ generation (u32 big-endian, from 1), value =
/// the key of the generation before, sealed under this generation's key. Whoever holds
/// the newest key reads every older snapshot; a node holding an older key (unshared)
/// does not read what was sealed after it.
pub const KEY_CHAIN: RecordSpace = RecordSpace::new("key-chain");

/// Nodes following a volume's branch here: key = volume id ‖ NodeId, value = branch.
pub const FOLLOWERS: RecordSpace = RecordSpace::new("followers");
/// Branches this vault follows at peers: key = NodeId ‖ volume id, value = [`Following`].
pub const FOLLOWING: RecordSpace = RecordSpace::new("following");

/// This vault's announcements: key [`ANNOUNCEMENT_FLOOR_KEY`], value `version 1 | floor
/// u64 BE`, the sequence its announcements are reserved up to (see
/// `forge_mesh::announce::SequenceClock`).
pub const ANNOUNCING: RecordSpace = RecordSpace::new("announcing");
const ANNOUNCEMENT_FLOOR_KEY: &[u8] = b"sequence-floor";
const ANNOUNCEMENT_FLOOR_VERSION: u8 = 1;

/// A branch this vault follows at a peer: pulled when the peer announces a new head,
/// and when the daemon starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Following {
    /// The volume's id.
    pub volume: [u8; 16],
    /// Its name at the peer.
    pub name: String,
    /// The branch.
    pub branch: String,
    /// Its name here.
    pub local_name: String,
}

/// What a peer may do with one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeTrust {
    /// The volume's id.
    pub volume: [u8; 16],
    /// Push (and author snapshots of) it, not only pull it.
    pub write: bool,
}

/// A peer.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The user's name for it.
    pub name: Option<String>,
    /// Where it was reached (multiaddrs).
    pub addresses: Vec<String>,
    /// When it was added, ns since the epoch.
    pub added_ns: i64,
    /// It may push volumes this vault does not have yet.
    pub new_volumes: bool,
    /// Volumes it is trusted with.
    pub volumes: Vec<VolumeTrust>,
    /// Whether its public keys are known (learned from its Hello or a sync).
    pub keys_known: bool,
}

impl PeerRecord {
    /// Its trust for `volume`, if any.
    #[must_use]
    pub fn trust(&self, volume: &[u8; 16]) -> Option<VolumeTrust> {
        self.volumes
            .iter()
            .find(|trust| &trust.volume == volume)
            .copied()
    }
}

/// A proof's id: the first 8 bytes of the BLAKE3 of its file, in hex.
#[must_use]
pub fn proof_id(proof: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Cid::of(proof).as_bytes()[..8])
}

impl Vault {
    /// Every peer, by NodeId.
    ///
    /// # Errors
    /// Metadata errors, corrupt records.
    pub fn peers(&self) -> Result<Vec<(NodeId, PeerRecord)>> {
        self.refs()
            .scan_records(PEERS, b"")?
            .into_iter()
            .map(|(key, value)| {
                let node = NodeId::from_slice(&key).map_err(|error| NodeError::CorruptRecord {
                    what: "peer",
                    reason: error.to_string(),
                })?;
                Ok((node, records::decode("peer", &value)?))
            })
            .collect()
    }

    /// One peer's record.
    ///
    /// # Errors
    /// Metadata errors, a corrupt record.
    pub fn peer(&self, node: &NodeId) -> Result<Option<PeerRecord>> {
        self.refs()
            .get_record(PEERS, node.as_bytes())?
            .map(|value| records::decode("peer", &value))
            .transpose()
    }

    /// The peer `text` names: its name, its NodeId, or a unique NodeId prefix of at least
    /// 8 hex characters.
    ///
    /// # Errors
    /// [`NodeError::UnknownPeer`]; an ambiguous prefix.
    pub fn resolve_peer(&self, text: &str) -> Result<(NodeId, PeerRecord)> {
        let peers = self.peers()?;
        if let Some(found) = peers
            .iter()
            .find(|(_, record)| record.name.as_deref() == Some(text))
        {
            return Ok(found.clone());
        }
        let lower = text.to_ascii_lowercase();
        let matches: Vec<_> = if lower.len() >= 8 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            peers
                .into_iter()
                .filter(|(node, _)| node.to_hex().starts_with(&lower))
                .collect()
        } else {
            Vec::new()
        };
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(NodeError::UnknownPeer {
                peer: text.to_owned(),
            }),
            _ => Err(NodeError::InvalidArgument {
                what: "peer",
                value: text.to_owned(),
                reason: "several peers' NodeIds start so: give more characters".into(),
            }),
        }
    }

    pub(crate) fn put_peer(&self, node: &NodeId, record: &PeerRecord) -> Result<()> {
        self.refs().apply(&[RecordUpdate::new(
            PEERS,
            node.as_bytes().to_vec(),
            Expected::Any,
            Change::Put(records::encode(record)),
        )])?;
        Ok(())
    }

    /// Adds (or updates) a peer whose keys its Hello proved: its keys go into the keyring,
    /// the address and name into its record.
    ///
    /// # Errors
    /// A name another peer has; metadata errors.
    pub fn add_peer(
        &self,
        keys: &NodePublicKeys,
        address: Option<&str>,
        name: Option<&str>,
    ) -> Result<PeerRecord> {
        let node = keys.node_id();
        if node == self.identity().node_id() {
            return Err(NodeError::InvalidArgument {
                what: "peer",
                value: address.unwrap_or_default().to_owned(),
                reason: "that address is this node itself".into(),
            });
        }
        if let Some(name) = name {
            validate_name("peer name", name)?;
            if let Some((other, _)) = self
                .peers()?
                .into_iter()
                .find(|(other, record)| *other != node && record.name.as_deref() == Some(name))
            {
                return Err(NodeError::InvalidArgument {
                    what: "peer name",
                    value: name.to_owned(),
                    reason: format!("peer {other} has it already"),
                });
            }
        }
        self.trust_node(keys)?;
        let mut record = self.peer(&node)?.unwrap_or_else(|| PeerRecord {
            added_ns: self.now_ns(),
            ..PeerRecord::default()
        });
        if let Some(address) = address
            && !record.addresses.iter().any(|known| known == address)
        {
            record.addresses.insert(0, address.to_owned());
        }
        if let Some(name) = name {
            record.name = Some(name.to_owned());
        }
        record.keys_known = true;
        self.put_peer(&node, &record)?;
        Ok(record)
    }

    /// Trusts `node` with `volume` (read, or write too), or with new volumes. A node not
    /// yet added gets a record without address (an author whose snapshots arrive through
    /// another peer).
    ///
    /// # Errors
    /// An unknown volume; metadata errors.
    pub fn trust_peer(
        &self,
        node: &NodeId,
        volume: Option<&str>,
        write: bool,
        new_volumes: bool,
    ) -> Result<PeerRecord> {
        let mut record = self.peer(node)?.unwrap_or_else(|| PeerRecord {
            added_ns: self.now_ns(),
            ..PeerRecord::default()
        });
        if let Some(name) = volume {
            let volume = self.require_volume(name)?;
            record.volumes.retain(|trust| trust.volume != volume.id);
            record.volumes.push(VolumeTrust {
                volume: volume.id,
                write,
            });
        }
        if new_volumes {
            record.new_volumes = true;
        }
        self.put_peer(node, &record)?;
        Ok(record)
    }

    /// Takes every trust from `node` (its record, name and addresses stay; snapshots it
    /// signed still verify, since its keys stay in the keyring).
    ///
    /// # Errors
    /// [`NodeError::UnknownPeer`]; metadata errors.
    pub fn revoke_peer(&self, node: &NodeId) -> Result<PeerRecord> {
        let mut record = self.peer(node)?.ok_or_else(|| NodeError::UnknownPeer {
            peer: node.to_hex(),
        })?;
        record.volumes.clear();
        record.new_volumes = false;
        self.put_peer(node, &record)?;
        Ok(record)
    }

    /// The key envelopes of a volume for other nodes.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn volume_shares(&self, volume: &VolumeId) -> Result<Vec<(NodeId, Vec<u8>)>> {
        self.refs()
            .scan_records(SHARES, volume.as_bytes())?
            .into_iter()
            .map(|(key, value)| {
                let node =
                    NodeId::from_slice(&key[16..]).map_err(|error| NodeError::CorruptRecord {
                        what: "share",
                        reason: error.to_string(),
                    })?;
                Ok((node, value))
            })
            .collect()
    }

    /// Shares volume `name` with node `to` (in the keyring: a peer added, or an author
    /// met in a sync): wraps its volume key (and, for a writer, its domain key) to that
    /// node's ML-KEM-768 + X25519 key. The envelope travels with the volume's next sync
    /// to any vault, and only `to` can open it.
    ///
    /// # Errors
    /// An unknown volume or node, keys that do not open, a reader's share asked to give
    /// write; metadata errors.
    pub fn share_volume(
        &self,
        name: &str,
        to: &NodeId,
        write: bool,
        passphrase: super::PassphraseSource<'_>,
    ) -> Result<()> {
        let open = self.open_volume(name, passphrase)?;
        let keys = match self.trusted_keys(to.as_bytes(), &format!("node {to}")) {
            Err(NodeError::UntrustedSigner { .. }) => {
                return Err(NodeError::UnknownPeer { peer: to.to_hex() });
            }
            other => other?,
        };
        let contents = if write {
            forge_crypto::EnvelopeContents::Writer {
                volume_key: open.volume_key.clone(),
                domain_key: open.domain_key()?.clone(),
            }
        } else {
            forge_crypto::EnvelopeContents::Reader {
                volume_key: open.volume_key.clone(),
            }
        };
        let envelope = self.wrap_to(&keys, &contents, &super::volume_binding(&open.id))?;
        // A grouped volume's share is the group's: any member may send the volume on
        // (the simulator's second site was refused a first sync from a member other than
        // the one that shared, seed 692461256).
        self.apply_volume_updates(
            &open.id,
            &[RecordUpdate::new(
                SHARES,
                [open.id.as_bytes().as_slice(), to.as_bytes()].concat(),
                Expected::Any,
                Change::Put(envelope),
            )],
        )?;
        Ok(())
    }

    /// Stops sharing volume `name` with node `from`: its envelope is dropped, the volume
    /// key is rotated (the old key, sealed under the new one, goes into the key chain),
    /// and this node's keys and every other share are wrapped again with the new key.
    /// Snapshots made from now on are sealed with it; `from` keeps what it could read
    /// before (the older snapshots, and for a writer the dedup domain's key). The number
    /// of other shares that could not be wrapped again (their node's keys unknown here:
    /// they keep reading only what came before).
    ///
    /// # Errors
    /// Not shared with `from`; keys that do not open; a reader's share (it cannot
    /// rotate); metadata errors.
    pub fn unshare_volume(
        &self,
        name: &str,
        from: &NodeId,
        passphrase: super::PassphraseSource<'_>,
    ) -> Result<usize> {
        let open = self.open_volume(name, passphrase)?;
        self.refuse_if_grouped(&open.id, "unsharing (it rotates the volume's key)")?;
        let shares = self.volume_shares(&open.id)?;
        if !shares.iter().any(|(node, _)| node == from) {
            return Err(NodeError::InvalidArgument {
                what: "unshare",
                value: from.to_hex(),
                reason: format!("volume {name} is not shared with that node here"),
            });
        }
        let domain_key = open.domain_key()?.clone();
        let chain = self.key_chain(&open.id)?;
        if let Some((generation, sealed)) = chain.last()
            && open_chain(&open.volume_key, &open.id, *generation, sealed).is_err()
        {
            return Err(NodeError::InvalidArgument {
                what: "unshare",
                value: name.to_owned(),
                reason: "this node does not hold the volume's newest key (it was rotated \
                         elsewhere): sync it from the node that rotated it first"
                    .into(),
            });
        }
        let new_key = forge_crypto::VolumeKey::from_bytes(self.random_array()?);
        let generation = u32::try_from(chain.len() + 1).unwrap_or(u32::MAX);
        let mut updates = vec![RecordUpdate::new(
            KEY_CHAIN,
            chain_key(&open.id, generation),
            Expected::Absent,
            Change::Put(forge_crypto::seal::seal(
                new_key.as_bytes(),
                open.volume_key.as_bytes(),
                &chain_aad(&open.id, generation),
                forge_crypto::Compression::Never,
            )),
        )];
        let writer = forge_crypto::EnvelopeContents::Writer {
            volume_key: new_key.clone(),
            domain_key: domain_key.clone(),
        };
        let binding = super::volume_binding(&open.id);
        let own = if open.record.encrypted {
            let secret = passphrase(&format!("Passphrase for volume {name}"), false)?;
            records::VolumeKeys::Passphrase(forge_crypto::passphrase::protect_with_randomness(
                secret.as_bytes(),
                &writer.to_bytes(),
                forge_crypto::KdfParams::DEFAULT,
                self.random_array()?,
                self.random_array()?,
            )?)
        } else {
            records::VolumeKeys::WrappedToNode(self.wrap_to(
                self.identity().public_keys(),
                &writer,
                &binding,
            )?)
        };
        updates.push(RecordUpdate::new(
            RecordSpace::VOLUME_KEYS,
            open.id.as_bytes().to_vec(),
            Expected::Any,
            Change::Put(records::encode(&own)),
        ));
        let mut not_rewrapped = 0;
        for (node, envelope) in shares {
            let key = [open.id.as_bytes().as_slice(), node.as_bytes()].concat();
            if node == *from {
                updates.push(RecordUpdate::new(
                    SHARES,
                    key,
                    Expected::Any,
                    Change::Delete,
                ));
                continue;
            }
            let Some(keys) = self.peer_keys(&node)? else {
                not_rewrapped += 1;
                continue;
            };
            let contents = if forge_crypto::EnvelopeHeader::parse(&envelope)?.is_writer {
                writer.clone()
            } else {
                forge_crypto::EnvelopeContents::Reader {
                    volume_key: new_key.clone(),
                }
            };
            updates.push(RecordUpdate::new(
                SHARES,
                key,
                Expected::Any,
                Change::Put(self.wrap_to(&keys, &contents, &binding)?),
            ));
        }
        self.refs().apply(&updates)?;
        Ok(not_rewrapped)
    }

    /// The keys older than `current` for volume `volume`, newest first, opened down its
    /// key chain from the generation `current` is.
    ///
    /// # Errors
    /// Metadata errors; a chain entry that does not open with the key above it.
    pub(crate) fn older_volume_keys(
        &self,
        volume: &VolumeId,
        current: &forge_crypto::VolumeKey,
    ) -> Result<Vec<forge_crypto::VolumeKey>> {
        let chain = self.key_chain(volume)?;
        // The generation `current` is: the newest entry it opens (none: the first key).
        let Some(start) = chain.iter().rposition(|(generation, sealed)| {
            open_chain(current, volume, *generation, sealed).is_ok()
        }) else {
            return Ok(Vec::new());
        };
        let mut keys = Vec::with_capacity(start + 1);
        let mut key = current.clone();
        for (generation, sealed) in chain[..=start].iter().rev() {
            key = open_chain(&key, volume, *generation, sealed)?;
            keys.push(key.clone());
        }
        Ok(keys)
    }

    /// A volume's key chain, oldest generation first.
    ///
    /// # Errors
    /// Metadata errors, a corrupt key.
    pub fn key_chain(&self, volume: &VolumeId) -> Result<Vec<(u32, Vec<u8>)>> {
        self.refs()
            .scan_records(KEY_CHAIN, volume.as_bytes())?
            .into_iter()
            .map(|(key, value)| {
                let generation = key
                    .get(16..20)
                    .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(|| NodeError::CorruptRecord {
                        what: "key chain",
                        reason: "a key without its generation".into(),
                    })?;
                Ok((generation, value))
            })
            .collect()
    }

    /// A snapshot's parents as recorded (None: not recorded; read its commit instead).
    ///
    /// # Errors
    /// Metadata errors, a corrupt record.
    pub(crate) fn recorded_lineage(
        &self,
        volume: &VolumeId,
        snapshot: &Cid,
    ) -> Result<Option<Vec<Cid>>> {
        let key = [volume.as_bytes().as_slice(), snapshot.as_bytes()].concat();
        Ok(self
            .refs()
            .get_record(LINEAGE, &key)?
            .map(|value| records::decode::<Vec<[u8; 32]>>("lineage", &value))
            .transpose()?
            .map(|parents| parents.into_iter().map(Cid::from_bytes).collect()))
    }

    /// Keeps a transfer proof; its id.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn keep_proof(&self, proof: &TransferProof) -> Result<String> {
        let bytes = proof.encode();
        let id = proof_id(&bytes);
        let key = data_encoding::HEXLOWER
            .decode(id.as_bytes())
            .map_err(|error| NodeError::CorruptRecord {
                what: "proof id",
                reason: error.to_string(),
            })?;
        self.refs().apply(&[RecordUpdate::new(
            PROOFS,
            key,
            Expected::Any,
            Change::Put(bytes),
        )])?;
        Ok(id)
    }

    /// Every proof kept, verified, oldest first; only those of `volume` if given.
    ///
    /// # Errors
    /// An unknown volume; metadata errors; a kept proof that no longer verifies.
    pub fn proofs(&self, volume: Option<&str>) -> Result<Vec<(String, TransferProof)>> {
        let volume = volume.map(|name| self.require_volume(name)).transpose()?;
        let mut proofs = Vec::new();
        for (_, bytes) in self.refs().scan_records(PROOFS, b"")? {
            let proof = TransferProof::decode_verified(&bytes)?;
            if volume
                .as_ref()
                .is_none_or(|record| record.id == proof.receipt.volume)
            {
                proofs.push((proof_id(&bytes), proof));
            }
        }
        proofs.sort_by_key(|(id, proof)| (proof.receipt.time_ns, id.clone()));
        Ok(proofs)
    }

    /// The file of the proof `id` names (its id or a unique prefix of it).
    ///
    /// # Errors
    /// No such proof, an ambiguous prefix, metadata errors.
    pub fn proof_file(&self, id: &str) -> Result<Vec<u8>> {
        let lower = id.to_ascii_lowercase();
        let found: Vec<Vec<u8>> = self
            .refs()
            .scan_records(PROOFS, b"")?
            .into_iter()
            .map(|(_, bytes)| bytes)
            .filter(|bytes| !lower.is_empty() && proof_id(bytes).starts_with(&lower))
            .collect();
        match found.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(NodeError::InvalidArgument {
                what: "proof id",
                value: id.to_owned(),
                reason: "no proof has it (see `forge proof list`)".into(),
            }),
            _ => Err(NodeError::InvalidArgument {
                what: "proof id",
                value: id.to_owned(),
                reason: "several proofs start so: give more characters".into(),
            }),
        }
    }

    /// Records that `node` follows volume `volume`'s `branch` (or no longer, `on` false).
    ///
    /// # Errors
    /// Metadata errors.
    pub fn set_follower(
        &self,
        volume: &[u8; 16],
        node: &NodeId,
        branch: &str,
        on: bool,
    ) -> Result<()> {
        let change = if on {
            Change::Put(branch.as_bytes().to_vec())
        } else {
            Change::Delete
        };
        self.refs().apply(&[RecordUpdate::new(
            FOLLOWERS,
            [volume.as_slice(), node.as_bytes()].concat(),
            Expected::Any,
            change,
        )])?;
        Ok(())
    }

    /// Every follower: (volume id, node, branch).
    ///
    /// # Errors
    /// Metadata errors, corrupt records.
    pub fn followers(&self) -> Result<Vec<([u8; 16], NodeId, String)>> {
        self.refs()
            .scan_records(FOLLOWERS, b"")?
            .into_iter()
            .map(|(key, value)| {
                let corrupt = |reason: String| NodeError::CorruptRecord {
                    what: "follower",
                    reason,
                };
                let volume: [u8; 16] = key
                    .get(..16)
                    .and_then(|bytes| bytes.try_into().ok())
                    .ok_or_else(|| corrupt("a short key".into()))?;
                let node = NodeId::from_slice(&key[16..]).map_err(|e| corrupt(e.to_string()))?;
                let branch = String::from_utf8(value).map_err(|e| corrupt(e.to_string()))?;
                Ok((volume, node, branch))
            })
            .collect()
    }

    /// Records that this vault follows `following` at `peer` (or no longer, `on` false).
    ///
    /// # Errors
    /// Metadata errors.
    pub fn set_following(&self, peer: &NodeId, following: &Following, on: bool) -> Result<()> {
        let change = if on {
            Change::Put(records::encode(following))
        } else {
            Change::Delete
        };
        self.refs().apply(&[RecordUpdate::new(
            FOLLOWING,
            [peer.as_bytes().as_slice(), following.volume.as_slice()].concat(),
            Expected::Any,
            change,
        )])?;
        Ok(())
    }

    /// The floor this vault's announcement sequences resume from (0: never announced).
    ///
    /// # Errors
    /// Metadata errors, a corrupt record.
    pub fn announcement_floor(&self) -> Result<u64> {
        let Some(value) = self.refs().get_record(ANNOUNCING, ANNOUNCEMENT_FLOOR_KEY)? else {
            return Ok(0);
        };
        match value.split_first() {
            Some((&ANNOUNCEMENT_FLOOR_VERSION, floor)) => floor
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| NodeError::CorruptRecord {
                    what: "announcement floor",
                    reason: format!("{} bytes, not 8", floor.len()),
                }),
            _ => Err(NodeError::CorruptRecord {
                what: "announcement floor",
                reason: "an unknown version".into(),
            }),
        }
    }

    /// Persists the floor this vault's announcement sequences resume from.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn set_announcement_floor(&self, floor: u64) -> Result<()> {
        let mut value = vec![ANNOUNCEMENT_FLOOR_VERSION];
        value.extend_from_slice(&floor.to_be_bytes());
        self.refs().apply(&[RecordUpdate::new(
            ANNOUNCING,
            ANNOUNCEMENT_FLOOR_KEY.to_vec(),
            Expected::Any,
            Change::Put(value),
        )])?;
        Ok(())
    }

    /// Every branch this vault follows: (peer, what).
    ///
    /// # Errors
    /// Metadata errors, corrupt records.
    pub fn followings(&self) -> Result<Vec<(NodeId, Following)>> {
        self.refs()
            .scan_records(FOLLOWING, b"")?
            .into_iter()
            .map(|(key, value)| {
                let node = NodeId::from_slice(&key[..32.min(key.len())]).map_err(|error| {
                    NodeError::CorruptRecord {
                        what: "following",
                        reason: error.to_string(),
                    }
                })?;
                Ok((node, records::decode("following", &value)?))
            })
            .collect()
    }

    /// The public keys of `node` if this vault knows them (its keyring).
    ///
    /// # Errors
    /// Metadata errors, a corrupt record.
    pub fn peer_keys(&self, node: &NodeId) -> Result<Option<NodePublicKeys>> {
        match self.trusted_keys(node.as_bytes(), "peer") {
            Ok(keys) => Ok(Some(keys)),
            Err(NodeError::UntrustedSigner { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Whether `node` is in the keyring (its signatures verify here).
    ///
    /// # Errors
    /// Metadata errors.
    pub(crate) fn knows_keys(&self, node: &NodeId) -> Result<bool> {
        Ok(self.refs().get_record(KEYRING, node.as_bytes())?.is_some())
    }
}

/// The record key of generation `generation` of `volume`'s key chain.
pub(crate) fn chain_key(volume: &VolumeId, generation: u32) -> Vec<u8> {
    [volume.as_bytes().as_slice(), &generation.to_be_bytes()].concat()
}

/// What a key chain entry's seal binds it to: its volume and generation.
fn chain_aad(volume: &VolumeId, generation: u32) -> Vec<u8> {
    let mut aad = b"forge-vault volume key chain v1".to_vec();
    aad.extend_from_slice(volume.as_bytes());
    aad.extend_from_slice(&generation.to_be_bytes());
    aad
}

/// Opens key chain entry `generation` with the key of that generation: the key before.
fn open_chain(
    key: &forge_crypto::VolumeKey,
    volume: &VolumeId,
    generation: u32,
    sealed: &[u8],
) -> Result<forge_crypto::VolumeKey> {
    let bytes =
        forge_crypto::seal::open(key.as_bytes(), sealed, &chain_aad(volume, generation), 64)?;
    let array: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| NodeError::CorruptRecord {
            what: "key chain",
            reason: format!("generation {generation} holds no 32-byte key"),
        })?;
    Ok(forge_crypto::VolumeKey::from_bytes(array))
}

/// Whether `key` is the key of chain generation `generation` (its entry opens with it).
pub(crate) fn opens_chain(
    key: &forge_crypto::VolumeKey,
    volume: &VolumeId,
    generation: u32,
    sealed: &[u8],
) -> bool {
    open_chain(key, volume, generation, sealed).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Arc;

    use crate::test_support::vault_on;

    #[test]
    fn the_announcement_floor_outlives_a_restart_and_garbage_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let kv: Arc<dyn forge_store::kv::KvEngine> = Arc::new(forge_store::kv::MemKv::new());
        let vault = vault_on(root.path(), kv.clone(), 1);
        assert_eq!(vault.announcement_floor().unwrap(), 0, "never announced");
        vault.set_announcement_floor(42 << 40).unwrap();
        drop(vault);
        let vault = vault_on(root.path(), kv, 2);
        assert_eq!(vault.announcement_floor().unwrap(), 42 << 40);
        for garbage in [vec![], vec![2, 0, 0, 0, 0, 0, 0, 0, 1], vec![1, 0, 0]] {
            vault
                .refs()
                .apply(&[RecordUpdate::new(
                    ANNOUNCING,
                    ANNOUNCEMENT_FLOOR_KEY.to_vec(),
                    Expected::Any,
                    Change::Put(garbage.clone()),
                )])
                .unwrap();
            assert!(
                matches!(
                    vault.announcement_floor(),
                    Err(NodeError::CorruptRecord { .. })
                ),
                "{garbage:?} read as a floor"
            );
        }
    }
}
