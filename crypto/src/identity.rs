//! Node identities: an ML-DSA-65 signing key and an ML-KEM-768 + X25519 key pair, the
//! node id derived from them, and domain-separated detached signatures.

use std::fmt;

use x25519_dalek::{PublicKey as X25519Public, StaticSecret as X25519Secret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{CryptoError, Result, random_array};
use crate::id::NodeId;
use crate::pq::{ml_dsa_65, ml_kem_768};

/// What a signature is over. Each domain is a distinct FIPS 204 context string, so a
/// signature made for one kind of message can never be replayed as another kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SignatureDomain {
    /// A snapshot commit (and the reference index it names).
    Snapshot,
    /// A transfer receipt or its countersignature.
    Receipt,
    /// A volume contract (policy).
    Contract,
    /// A gossip announcement of a snapshot head.
    Announcement,
    /// A certificate binding another key (the libp2p key) to this node.
    Certificate,
    /// A volume's seal: its state when a workload detached, until trust-check passes.
    Seal,
}

impl SignatureDomain {
    /// The FIPS 204 context string for this domain. Frozen: changing it invalidates every
    /// signature ever made in the domain.
    #[must_use]
    pub const fn context(self) -> &'static [u8] {
        match self {
            Self::Snapshot => b"forge-vault/v1/snapshot",
            Self::Receipt => b"forge-vault/v1/receipt",
            Self::Contract => b"forge-vault/v1/contract",
            Self::Announcement => b"forge-vault/v1/announcement",
            Self::Certificate => b"forge-vault/v1/certificate",
            Self::Seal => b"forge-vault/v1/seal",
        }
    }

    /// A short name for messages.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::Receipt => "receipt",
            Self::Contract => "contract",
            Self::Announcement => "announcement",
            Self::Certificate => "certificate",
            Self::Seal => "seal",
        }
    }
}

/// A detached ML-DSA-65 signature.
#[derive(Clone, PartialEq, Eq)]
pub struct Signature(Vec<u8>);

impl Signature {
    /// Bytes in every signature.
    pub const BYTES: usize = ml_dsa_65::SIGNATURE_BYTES;

    /// Reads a signature, checking its length.
    ///
    /// # Errors
    /// [`CryptoError::Malformed`] for a wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != Self::BYTES {
            return Err(CryptoError::Malformed {
                what: "signature",
                reason: format!("expected {} bytes, found {}", Self::BYTES, bytes.len()),
            });
        }
        Ok(Self(bytes.to_vec()))
    }

    /// The raw signature bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "Signature({}…)",
            data_encoding::HEXLOWER.encode(&self.0[..8])
        )
    }
}

/// The secret seeds of a node, from which every key is derived. 128 bytes; this is what
/// the data directory stores (mode 0600, optionally passphrase-protected).
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct NodeSecrets {
    ml_dsa_seed: [u8; ml_dsa_65::SEED_BYTES],
    ml_kem_d: [u8; ml_kem_768::SEED_HALF_BYTES],
    ml_kem_z: [u8; ml_kem_768::SEED_HALF_BYTES],
    x25519_secret: [u8; 32],
}

const SECRETS_MAGIC: &[u8; 4] = b"FGNS";
/// Frozen: changing it changes every node's transport key (and PeerId).
const TRANSPORT_SEED_CONTEXT: &str = "forge-vault 2026 v1 node transport ed25519 seed";
const PUBLIC_MAGIC: &[u8; 4] = b"FGNP";
/// Version of the node-secrets and node-public-keys encodings.
pub const IDENTITY_FORMAT_VERSION: u8 = 1;
const SECRETS_ENCODED_BYTES: usize = 4 + 1 + 32 * 4;
const PUBLIC_ENCODED_BYTES: usize =
    4 + 1 + ml_dsa_65::PUBLIC_KEY_BYTES + ml_kem_768::PUBLIC_KEY_BYTES + 32;

impl NodeSecrets {
    /// Fresh random seeds from the operating system's CSPRNG.
    ///
    /// # Errors
    /// [`CryptoError::Randomness`] when the OS RNG fails.
    pub fn generate() -> Result<Self> {
        Ok(Self {
            ml_dsa_seed: random_array()?,
            ml_kem_d: random_array()?,
            ml_kem_z: random_array()?,
            x25519_secret: random_array()?,
        })
    }

    /// Seeds from caller-chosen bytes, for tests and the simulator's seeded nodes.
    #[must_use]
    pub fn from_seed_bytes(bytes: [u8; 128]) -> Self {
        let mut secrets = Self {
            ml_dsa_seed: [0; 32],
            ml_kem_d: [0; 32],
            ml_kem_z: [0; 32],
            x25519_secret: [0; 32],
        };
        secrets.ml_dsa_seed.copy_from_slice(&bytes[0..32]);
        secrets.ml_kem_d.copy_from_slice(&bytes[32..64]);
        secrets.ml_kem_z.copy_from_slice(&bytes[64..96]);
        secrets.x25519_secret.copy_from_slice(&bytes[96..128]);
        secrets
    }

    /// The seed of this node's transport key (libp2p's ed25519), derived from all its
    /// seeds with BLAKE3 `derive_key` under a frozen context, so the key needs no storage
    /// of its own (and no new identity format) and changes only with the node's identity.
    /// The transport key is not trusted on its own: a certificate signed by the ML-DSA key
    /// binds it to the node.
    #[must_use]
    pub fn transport_seed(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key(TRANSPORT_SEED_CONTEXT);
        hasher.update(&self.ml_dsa_seed);
        hasher.update(&self.ml_kem_d);
        hasher.update(&self.ml_kem_z);
        hasher.update(&self.x25519_secret);
        *hasher.finalize().as_bytes()
    }

    /// The versioned encoding: `"FGNS" | version | ml-dsa seed | ml-kem d | ml-kem z | x25519`.
    #[must_use]
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(SECRETS_ENCODED_BYTES));
        bytes.extend_from_slice(SECRETS_MAGIC);
        bytes.push(IDENTITY_FORMAT_VERSION);
        bytes.extend_from_slice(&self.ml_dsa_seed);
        bytes.extend_from_slice(&self.ml_kem_d);
        bytes.extend_from_slice(&self.ml_kem_z);
        bytes.extend_from_slice(&self.x25519_secret);
        bytes
    }

    /// Decodes [`Self::encode`]'s output, rejecting anything else.
    ///
    /// # Errors
    /// [`CryptoError::Malformed`] for a wrong magic or length,
    /// [`CryptoError::UnsupportedVersion`] for another version.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        check_magic_version(bytes, SECRETS_MAGIC, "node secrets")?;
        if bytes.len() != SECRETS_ENCODED_BYTES {
            return Err(CryptoError::Malformed {
                what: "node secrets",
                reason: format!(
                    "expected {SECRETS_ENCODED_BYTES} bytes, found {}",
                    bytes.len()
                ),
            });
        }
        let mut seeds = Zeroizing::new([0u8; 128]);
        seeds.copy_from_slice(&bytes[5..]);
        Ok(Self::from_seed_bytes(*seeds))
    }
}

impl fmt::Debug for NodeSecrets {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("NodeSecrets(<redacted>)")
    }
}

/// A node's public keys: what other nodes need to verify its signatures and wrap keys to it.
#[derive(Clone)]
pub struct NodePublicKeys {
    node_id: NodeId,
    ml_dsa: ml_dsa_65::VerifyingKey,
    ml_kem: ml_kem_768::EncapsulationKey,
    x25519: [u8; 32],
}

impl NodePublicKeys {
    /// The node id: BLAKE3 of the ML-DSA-65 public key.
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The encoded ML-DSA-65 public key.
    #[must_use]
    pub fn ml_dsa_public_key(&self) -> &[u8] {
        self.ml_dsa.as_bytes()
    }

    /// The encoded ML-KEM-768 encapsulation key.
    #[must_use]
    pub fn ml_kem_public_key(&self) -> &[u8] {
        self.ml_kem.as_bytes()
    }

    /// The X25519 public key.
    #[must_use]
    pub fn x25519_public_key(&self) -> &[u8; 32] {
        &self.x25519
    }

    pub(crate) fn ml_kem(&self) -> &ml_kem_768::EncapsulationKey {
        &self.ml_kem
    }

    /// Verifies a detached signature made by this node in `domain`.
    ///
    /// # Errors
    /// [`CryptoError::BadSignature`] when it does not verify.
    pub fn verify(
        &self,
        domain: SignatureDomain,
        message: &[u8],
        signature: &Signature,
    ) -> Result<()> {
        self.ml_dsa.verify(
            message,
            domain.context(),
            signature.as_bytes(),
            domain.name(),
        )
    }

    /// The versioned encoding: `"FGNP" | version | ml-dsa pk | ml-kem pk | x25519 pk`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(PUBLIC_ENCODED_BYTES);
        bytes.extend_from_slice(PUBLIC_MAGIC);
        bytes.push(IDENTITY_FORMAT_VERSION);
        bytes.extend_from_slice(self.ml_dsa.as_bytes());
        bytes.extend_from_slice(self.ml_kem.as_bytes());
        bytes.extend_from_slice(&self.x25519);
        bytes
    }

    /// Decodes [`Self::encode`]'s output, validating every key.
    ///
    /// # Errors
    /// [`CryptoError::Malformed`] or [`CryptoError::UnsupportedVersion`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        check_magic_version(bytes, PUBLIC_MAGIC, "node public keys")?;
        if bytes.len() != PUBLIC_ENCODED_BYTES {
            return Err(CryptoError::Malformed {
                what: "node public keys",
                reason: format!(
                    "expected {PUBLIC_ENCODED_BYTES} bytes, found {}",
                    bytes.len()
                ),
            });
        }
        let (ml_dsa, rest) = bytes[5..].split_at(ml_dsa_65::PUBLIC_KEY_BYTES);
        let (ml_kem, x25519) = rest.split_at(ml_kem_768::PUBLIC_KEY_BYTES);
        let ml_dsa = ml_dsa_65::VerifyingKey::from_bytes(ml_dsa)?;
        let mut x25519_bytes = [0u8; 32];
        x25519_bytes.copy_from_slice(x25519);
        Ok(Self {
            node_id: NodeId::of_signing_key(ml_dsa.as_bytes()),
            ml_dsa,
            ml_kem: ml_kem_768::EncapsulationKey::from_bytes(ml_kem)?,
            x25519: x25519_bytes,
        })
    }
}

impl fmt::Debug for NodePublicKeys {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("NodePublicKeys")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// A node's full identity: its secrets expanded into usable keys.
pub struct NodeIdentity {
    signing_key: ml_dsa_65::SigningKey,
    ml_kem_secret: ml_kem_768::DecapsulationKey,
    x25519_secret: X25519Secret,
    /// The seed of the transport key ([`NodeSecrets::transport_seed`]).
    transport_seed: zeroize::Zeroizing<[u8; 32]>,
    public: NodePublicKeys,
}

impl NodeIdentity {
    /// A brand-new identity from fresh OS randomness.
    ///
    /// # Errors
    /// [`CryptoError::Randomness`] when the OS RNG fails.
    pub fn generate() -> Result<(Self, NodeSecrets)> {
        let secrets = NodeSecrets::generate()?;
        Ok((Self::from_secrets(&secrets), secrets))
    }

    /// Expands stored secrets into the identity (deterministic).
    #[must_use]
    pub fn from_secrets(secrets: &NodeSecrets) -> Self {
        let (signing_key, verifying_key) = ml_dsa_65::keypair_from_seed(&secrets.ml_dsa_seed);
        let (ml_kem_secret, ml_kem_public) =
            ml_kem_768::keypair_from_seed(&secrets.ml_kem_d, &secrets.ml_kem_z);
        let x25519_secret = X25519Secret::from(secrets.x25519_secret);
        let x25519_public = X25519Public::from(&x25519_secret);
        Self {
            signing_key,
            ml_kem_secret,
            x25519_secret,
            transport_seed: zeroize::Zeroizing::new(secrets.transport_seed()),
            public: NodePublicKeys {
                node_id: NodeId::of_signing_key(verifying_key.as_bytes()),
                ml_dsa: verifying_key,
                ml_kem: ml_kem_public,
                x25519: x25519_public.to_bytes(),
            },
        }
    }

    /// This node's id.
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        self.public.node_id
    }

    /// The seed of this node's transport key (see [`NodeSecrets::transport_seed`]).
    #[must_use]
    pub fn transport_seed(&self) -> [u8; 32] {
        *self.transport_seed
    }

    /// This node's public keys.
    #[must_use]
    pub fn public_keys(&self) -> &NodePublicKeys {
        &self.public
    }

    /// Signs `message` in `domain` with hedged randomness from the OS.
    ///
    /// # Errors
    /// [`CryptoError::Randomness`] when the OS RNG fails.
    pub fn sign(&self, domain: SignatureDomain, message: &[u8]) -> Result<Signature> {
        self.sign_with_randomness(domain, message, random_array()?)
    }

    /// Signs with caller-supplied randomness (the simulator passes seeded bytes; all zeros
    /// is FIPS 204's deterministic variant).
    ///
    /// # Errors
    /// Only for impossible contexts; see [`ml_dsa_65::SigningKey::sign`].
    pub fn sign_with_randomness(
        &self,
        domain: SignatureDomain,
        message: &[u8],
        randomness: [u8; 32],
    ) -> Result<Signature> {
        self.signing_key
            .sign(message, domain.context(), randomness)
            .map(Signature)
    }

    pub(crate) fn ml_kem_secret(&self) -> &ml_kem_768::DecapsulationKey {
        &self.ml_kem_secret
    }

    pub(crate) fn x25519_secret(&self) -> &X25519Secret {
        &self.x25519_secret
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("NodeIdentity")
            .field("node_id", &self.public.node_id)
            .finish_non_exhaustive()
    }
}

pub(crate) fn check_magic_version(bytes: &[u8], magic: &[u8; 4], what: &'static str) -> Result<()> {
    if bytes.len() < 5 {
        return Err(CryptoError::Truncated {
            what,
            needed: 5,
            found: bytes.len(),
        });
    }
    if &bytes[..4] != magic {
        return Err(CryptoError::Malformed {
            what,
            reason: format!(
                "bad magic {:?}, expected {:?}",
                String::from_utf8_lossy(&bytes[..4]),
                String::from_utf8_lossy(magic)
            ),
        });
    }
    if bytes[4] != IDENTITY_FORMAT_VERSION {
        return Err(CryptoError::UnsupportedVersion {
            what,
            found: bytes[4],
            supported: IDENTITY_FORMAT_VERSION,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(seed: u8) -> NodeIdentity {
        NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([seed; 128]))
    }

    #[test]
    fn the_transport_seed_is_stable_per_node_and_depends_on_every_seed() {
        let seeds = |byte: u8, at: usize| {
            let mut bytes = [byte; 128];
            bytes[at] ^= 1;
            NodeSecrets::from_seed_bytes(bytes).transport_seed()
        };
        let base = NodeSecrets::from_seed_bytes([1; 128]).transport_seed();
        assert_eq!(
            NodeSecrets::from_seed_bytes([1; 128]).transport_seed(),
            base
        );
        // A change in any of the four seeds changes it.
        for at in [0, 40, 70, 127] {
            assert_ne!(seeds(1, at), base, "byte {at}");
        }
        // Frozen: the same secrets give the same key (and PeerId) in every release.
        assert_eq!(
            data_encoding::HEXLOWER.encode(&base),
            "466ac26f3cb5002c082ab74c395eb8048aa4137ca462b0354bf36db21d688372"
        );
    }

    #[test]
    fn node_id_is_blake3_of_the_ml_dsa_public_key() {
        let node = identity(1);
        assert_eq!(
            node.node_id().to_hex(),
            blake3::hash(node.public_keys().ml_dsa_public_key())
                .to_hex()
                .as_str()
        );
        assert_eq!(identity(1).node_id(), node.node_id());
        assert_ne!(identity(2).node_id(), node.node_id());
    }

    #[test]
    fn signatures_are_bound_to_domain_message_and_signer() {
        let node = identity(1);
        let keys = node.public_keys();
        let signature = node.sign(SignatureDomain::Snapshot, b"commit").unwrap();
        keys.verify(SignatureDomain::Snapshot, b"commit", &signature)
            .unwrap();
        assert!(matches!(
            keys.verify(SignatureDomain::Receipt, b"commit", &signature),
            Err(CryptoError::BadSignature { domain: "receipt" })
        ));
        assert!(
            keys.verify(SignatureDomain::Snapshot, b"commiT", &signature)
                .is_err()
        );
        assert!(
            identity(2)
                .public_keys()
                .verify(SignatureDomain::Snapshot, b"commit", &signature)
                .is_err()
        );
        let mut bytes = signature.as_bytes().to_vec();
        bytes[100] ^= 1;
        let flipped = Signature::from_bytes(&bytes).unwrap();
        assert!(
            keys.verify(SignatureDomain::Snapshot, b"commit", &flipped)
                .is_err()
        );
        assert!(Signature::from_bytes(&bytes[1..]).is_err());
    }

    #[test]
    fn secrets_and_public_keys_round_trip_and_reject_garbage() {
        let secrets = NodeSecrets::from_seed_bytes([9; 128]);
        assert_eq!(NodeSecrets::decode(&secrets.encode()).unwrap(), secrets);
        let node = NodeIdentity::from_secrets(&secrets);
        let encoded = node.public_keys().encode();
        let decoded = NodePublicKeys::decode(&encoded).unwrap();
        assert_eq!(decoded.node_id(), node.node_id());
        assert_eq!(decoded.encode(), encoded);

        let mut wrong_version = secrets.encode().to_vec();
        wrong_version[4] = 2;
        assert!(matches!(
            NodeSecrets::decode(&wrong_version),
            Err(CryptoError::UnsupportedVersion { found: 2, .. })
        ));
        assert!(NodeSecrets::decode(&secrets.encode()[..100]).is_err());
        assert!(NodeSecrets::decode(b"FGNP\x01").is_err());
        assert!(NodePublicKeys::decode(&encoded[..encoded.len() - 1]).is_err());
        assert!(NodePublicKeys::decode(b"").is_err());
    }
}
