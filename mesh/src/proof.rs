//! Transfer proofs: at the end of a sync the receiver signs a **receipt** (what arrived:
//! volume, snapshot, index root, chunk and byte counts, both NodeIds, time, a nonce) with
//! ML-DSA-65 in the Receipt domain, and the sender countersigns it. The **proof file**
//! carries the receipt, both signatures and both nodes' public keys, so anyone can verify
//! it offline: each key must hash to the NodeId the receipt names, and each signature
//! must verify. Changing any byte makes it invalid.
//!
//! ```text
//! receipt    = "FGRC" | version:u8=1 | volume[16] | snapshot[32] | index_root[32]
//!              | chunks:u64le | bytes:u64le | sender[32] | receiver[32] | time_ns:i64le
//!              | nonce[32]
//! receiver signs   receipt                                   (Receipt domain)
//! sender signs     "FGRS" | version | BLAKE3(receipt) | receiver's signature
//!                  | BLAKE3(receiver's NodePublicKeys) | BLAKE3(sender's NodePublicKeys)
//! (A NodeId hashes only the ML-DSA key: the countersignature also covers the ML-KEM and
//! X25519 keys the file carries, so no byte of the file goes unchecked.)
//! proof file = "FGPF" | version:u8=1 | receipt | receiver sig | sender sig
//!              | len:u32le | receiver's NodePublicKeys | len:u32le | sender's NodePublicKeys
//! ```

use forge_crypto::{Cid, NodeId, NodeIdentity, NodePublicKeys, Signature, SignatureDomain};

use crate::bytes::Reader;
use crate::net::MeshError;

/// Version of the receipt and proof encodings.
pub const PROOF_FORMAT_VERSION: u8 = 1;
const RECEIPT_MAGIC: &[u8; 4] = b"FGRC";
const COUNTERSIGN_MAGIC: &[u8; 4] = b"FGRS";
const PROOF_MAGIC: &[u8; 4] = b"FGPF";
const RECEIPT_BYTES: usize = 4 + 1 + 16 + 32 + 32 + 8 + 8 + 32 + 32 + 8 + 32;

fn invalid(reason: impl Into<String>) -> MeshError {
    MeshError::InvalidProof {
        reason: reason.into(),
    }
}

/// What a sync transferred, as both sides sign it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The volume (its VolumeId's bytes).
    pub volume: [u8; 16],
    /// The snapshot the receiver now holds.
    pub snapshot: Cid,
    /// Its reference index's root.
    pub index_root: Cid,
    /// Chunks and objects sent.
    pub chunks: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Who sent.
    pub sender: NodeId,
    /// Who received (and signs first).
    pub receiver: NodeId,
    /// When the receiver signed (ns since the epoch).
    pub time_ns: i64,
    /// Chosen by the sender for this transfer, so no two receipts are alike.
    pub nonce: [u8; 32],
}

impl Receipt {
    /// The receipt's encoding (what the receiver signs).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(RECEIPT_BYTES);
        bytes.extend_from_slice(RECEIPT_MAGIC);
        bytes.push(PROOF_FORMAT_VERSION);
        bytes.extend_from_slice(&self.volume);
        bytes.extend_from_slice(self.snapshot.as_bytes());
        bytes.extend_from_slice(self.index_root.as_bytes());
        bytes.extend_from_slice(&self.chunks.to_le_bytes());
        bytes.extend_from_slice(&self.bytes.to_le_bytes());
        bytes.extend_from_slice(self.sender.as_bytes());
        bytes.extend_from_slice(self.receiver.as_bytes());
        bytes.extend_from_slice(&self.time_ns.to_le_bytes());
        bytes.extend_from_slice(&self.nonce);
        debug_assert_eq!(bytes.len(), RECEIPT_BYTES);
        bytes
    }

    /// Decodes a receipt.
    ///
    /// # Errors
    /// [`MeshError::InvalidProof`] for garbage or another version.
    pub fn decode(bytes: &[u8]) -> Result<Self, MeshError> {
        if bytes.len() != RECEIPT_BYTES {
            return Err(invalid(format!(
                "a receipt is {RECEIPT_BYTES} bytes, not {}",
                bytes.len()
            )));
        }
        let mut reader = Reader::new(bytes, |reason| invalid(format!("the receipt: {reason}")));
        reader.header(RECEIPT_MAGIC, PROOF_FORMAT_VERSION)?;
        let volume = reader.array16()?;
        let snapshot = Cid::from_bytes(reader.array32()?);
        let index_root = Cid::from_bytes(reader.array32()?);
        let chunks = reader.u64()?;
        let sent_bytes = reader.u64()?;
        let sender = NodeId::from_bytes(reader.array32()?);
        let receiver = NodeId::from_bytes(reader.array32()?);
        let time_ns = reader.i64()?;
        let nonce = reader.array32()?;
        reader.end()?;
        Ok(Self {
            volume,
            snapshot,
            index_root,
            chunks,
            bytes: sent_bytes,
            sender,
            receiver,
            time_ns,
            nonce,
        })
    }

    /// The receiver's signature over the receipt.
    ///
    /// # Errors
    /// `identity` is not the receipt's receiver; the OS RNG failing.
    pub fn sign_as_receiver(&self, identity: &NodeIdentity) -> Result<Signature, MeshError> {
        if identity.node_id() != self.receiver {
            return Err(invalid("only the receipt's receiver signs it first"));
        }
        identity
            .sign(SignatureDomain::Receipt, &self.encode())
            .map_err(|error| invalid(format!("signing the receipt: {error}")))
    }

    fn countersigned_message(
        &self,
        receiver_signature: &Signature,
        receiver_keys: &NodePublicKeys,
        sender_keys: &NodePublicKeys,
    ) -> Vec<u8> {
        let mut message = Vec::with_capacity(4 + 1 + 32 * 3 + Signature::BYTES);
        message.extend_from_slice(COUNTERSIGN_MAGIC);
        message.push(PROOF_FORMAT_VERSION);
        message.extend_from_slice(blake3::hash(&self.encode()).as_bytes());
        message.extend_from_slice(receiver_signature.as_bytes());
        message.extend_from_slice(blake3::hash(&receiver_keys.encode()).as_bytes());
        message.extend_from_slice(blake3::hash(&sender_keys.encode()).as_bytes());
        message
    }

    /// The sender's countersignature, after checking the receiver's signature with the
    /// receiver's keys.
    ///
    /// # Errors
    /// `identity` is not the sender; the receiver's signature or keys do not check.
    pub fn countersign(
        &self,
        identity: &NodeIdentity,
        receiver_keys: &NodePublicKeys,
        receiver_signature: &Signature,
    ) -> Result<Signature, MeshError> {
        if identity.node_id() != self.sender {
            return Err(invalid("only the receipt's sender countersigns it"));
        }
        if receiver_keys.node_id() != self.receiver {
            return Err(invalid("the receiver's keys are not the receiver's"));
        }
        receiver_keys
            .verify(SignatureDomain::Receipt, &self.encode(), receiver_signature)
            .map_err(|_| invalid("the receiver's signature does not verify"))?;
        identity
            .sign(
                SignatureDomain::Receipt,
                &self.countersigned_message(
                    receiver_signature,
                    receiver_keys,
                    identity.public_keys(),
                ),
            )
            .map_err(|error| invalid(format!("countersigning the receipt: {error}")))
    }
}

/// A receipt with both signatures and both nodes' keys: verifiable offline.
#[derive(Debug, Clone)]
pub struct TransferProof {
    /// What was transferred.
    pub receipt: Receipt,
    /// The receiver's signature.
    pub receiver_signature: Signature,
    /// The sender's countersignature.
    pub sender_signature: Signature,
    /// The receiver's public keys.
    pub receiver_keys: NodePublicKeys,
    /// The sender's public keys.
    pub sender_keys: NodePublicKeys,
}

impl TransferProof {
    /// The proof file's bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let receiver_keys = self.receiver_keys.encode();
        let sender_keys = self.sender_keys.encode();
        let mut bytes = Vec::with_capacity(
            5 + RECEIPT_BYTES + 2 * Signature::BYTES + 8 + receiver_keys.len() + sender_keys.len(),
        );
        bytes.extend_from_slice(PROOF_MAGIC);
        bytes.push(PROOF_FORMAT_VERSION);
        bytes.extend_from_slice(&self.receipt.encode());
        bytes.extend_from_slice(self.receiver_signature.as_bytes());
        bytes.extend_from_slice(self.sender_signature.as_bytes());
        for keys in [&receiver_keys, &sender_keys] {
            // Key encodings are a few KiB.
            bytes.extend_from_slice(&u32::try_from(keys.len()).unwrap_or(u32::MAX).to_le_bytes());
            bytes.extend_from_slice(keys);
        }
        bytes
    }

    /// Decodes a proof file and verifies it: both keys hash to the NodeIds the receipt
    /// names, the receiver's signature and the sender's countersignature verify.
    ///
    /// # Errors
    /// [`MeshError::InvalidProof`] naming the first thing wrong.
    pub fn decode_verified(bytes: &[u8]) -> Result<Self, MeshError> {
        let fixed = PROOF_MAGIC.len() + 1 + RECEIPT_BYTES + 2 * Signature::BYTES;
        if bytes.len() < fixed + 8 || &bytes[..4] != PROOF_MAGIC {
            return Err(invalid("not a forge transfer proof"));
        }
        let mut reader = Reader::new(bytes, |reason| invalid(format!("the proof: {reason}")));
        reader.header(PROOF_MAGIC, PROOF_FORMAT_VERSION)?;
        let receipt = Receipt::decode(reader.take(RECEIPT_BYTES)?)?;
        let mut signature = || {
            Signature::from_bytes(reader.take(Signature::BYTES)?)
                .map_err(|error| invalid(error.to_string()))
        };
        let receiver_signature = signature()?;
        let sender_signature = signature()?;
        let mut keys = Vec::with_capacity(2);
        for whose in ["receiver", "sender"] {
            let len = reader.u32_len()?;
            keys.push(
                NodePublicKeys::decode(reader.take(len)?)
                    .map_err(|error| invalid(format!("the {whose}'s keys: {error}")))?,
            );
        }
        reader.end()?;
        let sender_keys = keys.pop().ok_or_else(|| invalid("no sender keys"))?;
        let receiver_keys = keys.pop().ok_or_else(|| invalid("no receiver keys"))?;
        if receiver_keys.node_id() != receipt.receiver {
            return Err(invalid(format!(
                "the receiver's keys hash to {}, not to the receiver {} the receipt names",
                receiver_keys.node_id(),
                receipt.receiver
            )));
        }
        if sender_keys.node_id() != receipt.sender {
            return Err(invalid(format!(
                "the sender's keys hash to {}, not to the sender {} the receipt names",
                sender_keys.node_id(),
                receipt.sender
            )));
        }
        receiver_keys
            .verify(
                SignatureDomain::Receipt,
                &receipt.encode(),
                &receiver_signature,
            )
            .map_err(|_| {
                invalid(format!(
                    "the receiver {}'s signature does not verify",
                    receipt.receiver
                ))
            })?;
        sender_keys
            .verify(
                SignatureDomain::Receipt,
                &receipt.countersigned_message(&receiver_signature, &receiver_keys, &sender_keys),
                &sender_signature,
            )
            .map_err(|_| {
                invalid(format!(
                    "the sender {}'s countersignature does not verify",
                    receipt.sender
                ))
            })?;
        Ok(Self {
            receipt,
            receiver_signature,
            sender_signature,
            receiver_keys,
            sender_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use forge_crypto::NodeSecrets;

    use super::*;

    fn identity(byte: u8) -> NodeIdentity {
        NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([byte; 128]))
    }

    fn proof(sender: &NodeIdentity, receiver: &NodeIdentity) -> TransferProof {
        let receipt = Receipt {
            volume: [7; 16],
            snapshot: Cid::of(b"snapshot"),
            index_root: Cid::of(b"index"),
            chunks: 1234,
            bytes: 56_789_000,
            sender: sender.node_id(),
            receiver: receiver.node_id(),
            time_ns: 1_780_000_000_000_000_000,
            nonce: [9; 32],
        };
        let receiver_signature = receipt.sign_as_receiver(receiver).expect("sign");
        let sender_signature = receipt
            .countersign(sender, receiver.public_keys(), &receiver_signature)
            .expect("countersign");
        TransferProof {
            receipt,
            receiver_signature,
            sender_signature,
            receiver_keys: receiver.public_keys().clone(),
            sender_keys: sender.public_keys().clone(),
        }
    }

    #[test]
    fn a_proof_verifies_offline_and_names_both_nodes() {
        let (sender, receiver) = (identity(1), identity(2));
        let bytes = proof(&sender, &receiver).encode();
        let verified = TransferProof::decode_verified(&bytes).expect("valid");
        assert_eq!(verified.receipt.sender, sender.node_id());
        assert_eq!(verified.receipt.receiver, receiver.node_id());
        assert_eq!(verified.receipt.chunks, 1234);
        assert_eq!(verified.encode(), bytes);
    }

    #[test]
    fn changing_any_byte_of_a_proof_makes_it_invalid() {
        let (sender, receiver) = (identity(1), identity(2));
        let bytes = proof(&sender, &receiver).encode();
        // Every byte position, each flipped one way (about 13,000 verifications).
        for at in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[at] ^= 0x01;
            assert!(
                TransferProof::decode_verified(&tampered).is_err(),
                "byte {at} of {} flipped: still valid",
                bytes.len()
            );
        }
        assert!(TransferProof::decode_verified(&bytes[..bytes.len() - 1]).is_err());
        assert!(TransferProof::decode_verified(&[bytes.as_slice(), &[0]].concat()).is_err());
    }

    #[test]
    fn only_the_named_nodes_sign_and_keys_must_match_their_ids() {
        let (sender, receiver, mallory) = (identity(1), identity(2), identity(3));
        let good = proof(&sender, &receiver);
        assert!(good.receipt.sign_as_receiver(&mallory).is_err());
        assert!(
            good.receipt
                .countersign(&mallory, receiver.public_keys(), &good.receiver_signature)
                .is_err()
        );
        // Mallory swaps in her keys and her signature: the keys do not hash to the sender.
        let mut forged = good.clone();
        forged.sender_keys = mallory.public_keys().clone();
        let error = TransferProof::decode_verified(&forged.encode()).expect_err("forged");
        assert!(error.to_string().contains("not to the sender"), "{error}");
    }
}
