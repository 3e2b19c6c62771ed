//! forge-crypto: identifiers, the key hierarchy, sealing, post-quantum identities and key
//! envelopes for Forge Vault. Pure functions: no I/O, no clocks; randomness comes from the
//! OS only where a `*_with_randomness` variant lets callers pass their own.
//!
//! Choices (see ARCHITECTURE.md): BLAKE3 for ids and derivation; XChaCha20-Poly1305 with a
//! synthetic nonce for deterministic sealing; ML-DSA-65 and ML-KEM-768 (FIPS 204/203, from
//! libcrux, behind [`pq`]); X25519 beside ML-KEM, combined X-Wing style; Argon2id for
//! passphrases.

pub mod digest;
pub mod envelope;
pub mod error;
pub mod id;
pub mod identity;
pub mod keys;
pub mod passphrase;
pub mod pq;
pub mod seal;

pub use digest::Digest256;
pub use envelope::{EnvelopeContents, EnvelopeHeader, WrapRandomness};
pub use error::{CryptoError, Result, fill_random, random_array};
pub use id::{Cid, NodeId};
pub use identity::{NodeIdentity, NodePublicKeys, NodeSecrets, Signature, SignatureDomain};
pub use keys::{ChunkKey, DomainKey, PlaintextHash, VolumeKey};
pub use passphrase::KdfParams;
pub use seal::Compression;
