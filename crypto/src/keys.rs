//! The key hierarchy: dedup-domain keys, per-chunk keys and volume keys.
//!
//! ```text
//! domain key (random, one per tenant by default)
//!   ├─ plaintext-hash key ──keyed BLAKE3(plaintext)──> PlaintextHash (dedup index key)
//!   ├─ chunk-key key ──keyed BLAKE3(PlaintextHash)──> ChunkKey (seals exactly one plaintext)
//!   └─ chunker seed (FastCDC gear table, so chunk boundaries do not fingerprint files)
//! volume key (random, one per volume) ──> seals the volume's own objects
//! ```
//!
//! Equal plaintext in one domain gives an equal chunk key and so equal ciphertext (dedup
//! across that tenant's volumes); a different domain key gives unrelated keys, so one
//! tenant cannot confirm that another holds a given file. Manifests carry each chunk's
//! key, so a reader needs only the volume key; sharing a volume never reveals the domain key.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Result, random_array};

/// Length in bytes of every symmetric key.
pub const KEY_BYTES: usize = 32;

// BLAKE3 `derive_key` context strings. Frozen: changing one changes every key below it.
const CONTEXT_PLAINTEXT_HASH: &str = "forge-vault 2026 v1 domain plaintext-hash key";
const CONTEXT_CHUNK_KEY: &str = "forge-vault 2026 v1 domain chunk-key key";
const CONTEXT_CHUNKER_SEED: &str = "forge-vault 2026 v1 domain chunker seed";
const CONTEXT_PUBLIC_DOMAIN: &str = "forge-vault 2026 v1 shared public domain key";

macro_rules! secret_key {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; KEY_BYTES]);

        impl $name {
            /// Wraps raw key bytes (for example read back from an envelope).
            #[must_use]
            pub const fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
                Self(bytes)
            }

            /// The raw key bytes. Handle with care: copies are not zeroized for you.
            #[must_use]
            pub const fn as_bytes(&self) -> &[u8; KEY_BYTES] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Never print key material, not even in debug logs.
                formatter.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_key!(
    /// A random 256-bit volume key: seals the volume's objects (manifests, trees, snapshots).
    VolumeKey
);
secret_key!(
    /// The key of one chunk, derived from the domain key and the chunk's plaintext hash.
    /// It seals exactly one plaintext, and manifests carry it so readers need no domain key.
    ChunkKey
);

impl VolumeKey {
    /// A fresh random volume key from the operating system's CSPRNG.
    ///
    /// # Errors
    /// [`crate::CryptoError::Randomness`] when the OS RNG fails.
    pub fn generate() -> Result<Self> {
        Ok(Self(random_array()?))
    }
}

/// Keyed BLAKE3 of a chunk's plaintext under its domain's plaintext-hash key.
///
/// It is the key of the domain-scoped dedup index, so a duplicate costs one hash and no
/// compression or sealing. It reveals nothing to a party without the domain key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlaintextHash([u8; KEY_BYTES]);

impl PlaintextHash {
    /// Wraps raw hash bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The raw hash bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl fmt::Debug for PlaintextHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "PlaintextHash({}…)",
            data_encoding::HEXLOWER.encode(&self.0[..6])
        )
    }
}

/// A dedup domain's secret key together with the subkeys derived from it.
///
/// Subkeys are derived once at construction, since every chunk of an import uses them.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DomainKey {
    root: [u8; KEY_BYTES],
    plaintext_hash_key: [u8; KEY_BYTES],
    chunk_key_key: [u8; KEY_BYTES],
    chunker_seed: [u8; KEY_BYTES],
}

impl DomainKey {
    /// A fresh random domain key.
    ///
    /// # Errors
    /// [`crate::CryptoError::Randomness`] when the OS RNG fails.
    pub fn generate() -> Result<Self> {
        Ok(Self::from_bytes(random_array()?))
    }

    /// The opt-in shared public domain: a fixed, publicly known key, so volumes of
    /// different tenants that choose it deduplicate common content (base layers) against
    /// each other. Confidentiality against anyone who can guess the content is given up,
    /// by choice, for those volumes only.
    #[must_use]
    pub fn shared_public() -> Self {
        Self::from_bytes(blake3::derive_key(CONTEXT_PUBLIC_DOMAIN, b""))
    }

    /// Rebuilds a domain key (and its subkeys) from its 32 root bytes.
    #[must_use]
    pub fn from_bytes(root: [u8; KEY_BYTES]) -> Self {
        Self {
            plaintext_hash_key: blake3::derive_key(CONTEXT_PLAINTEXT_HASH, &root),
            chunk_key_key: blake3::derive_key(CONTEXT_CHUNK_KEY, &root),
            chunker_seed: blake3::derive_key(CONTEXT_CHUNKER_SEED, &root),
            root,
        }
    }

    /// The 32 root bytes, for wrapping into a writer envelope.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.root
    }

    /// Keyed BLAKE3 of `plaintext`: the dedup index key for that chunk in this domain.
    #[must_use]
    pub fn plaintext_hash(&self, plaintext: &[u8]) -> PlaintextHash {
        PlaintextHash(*blake3::keyed_hash(&self.plaintext_hash_key, plaintext).as_bytes())
    }

    /// The chunk key for a plaintext with this hash.
    #[must_use]
    pub fn chunk_key(&self, plaintext_hash: &PlaintextHash) -> ChunkKey {
        ChunkKey(*blake3::keyed_hash(&self.chunk_key_key, &plaintext_hash.0).as_bytes())
    }

    /// 64 bits that seed the domain's FastCDC gear table.
    #[must_use]
    pub fn chunker_seed(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.chunker_seed[..8]);
        u64::from_le_bytes(first)
    }
}

impl PartialEq for DomainKey {
    fn eq(&self, other: &Self) -> bool {
        // Subkeys are functions of the root, so comparing roots is enough.
        self.root == other.root
    }
}
impl Eq for DomainKey {}

impl fmt::Debug for DomainKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("DomainKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_deterministic_within_a_domain_and_differs_across_domains() {
        let domain = DomainKey::from_bytes([7; 32]);
        let same = DomainKey::from_bytes([7; 32]);
        let other = DomainKey::from_bytes([8; 32]);
        let hash = domain.plaintext_hash(b"chunk");
        assert_eq!(hash, same.plaintext_hash(b"chunk"));
        assert_ne!(hash, other.plaintext_hash(b"chunk"));
        assert_eq!(domain.chunk_key(&hash), same.chunk_key(&hash));
        assert_ne!(
            domain.chunk_key(&hash),
            other.chunk_key(&other.plaintext_hash(b"chunk"))
        );
        assert_ne!(domain.chunker_seed(), other.chunker_seed());
        // The chunk key is not the hash itself: the index key reveals no key material.
        assert_ne!(domain.chunk_key(&hash).as_bytes(), hash.as_bytes());
    }

    #[test]
    fn debug_never_prints_key_material() {
        let text = format!(
            "{:?} {:?}",
            DomainKey::from_bytes([0xab; 32]),
            VolumeKey::from_bytes([0xab; 32])
        );
        assert!(!text.contains("ab"), "{text}");
        assert!(text.contains("redacted"));
    }

    #[test]
    fn random_keys_differ() {
        assert_ne!(
            VolumeKey::generate().unwrap(),
            VolumeKey::generate().unwrap()
        );
        assert_ne!(
            DomainKey::generate().unwrap(),
            DomainKey::generate().unwrap()
        );
        assert_eq!(DomainKey::shared_public(), DomainKey::shared_public());
    }
}
