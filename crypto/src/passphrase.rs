//! Passphrase protection of secrets at rest: Argon2id, parameters stored beside the
//! ciphertext so they can be raised later without breaking old files.
//!
//! ```text
//! protected = version:u8 | kdf:u8 | memory_kib:u32le | iterations:u32le | parallelism:u32le
//!           | salt[16] | nonce[24] | XChaCha20-Poly1305(argon2id(passphrase, salt), aad = header)
//! ```
//!
//! Parameters read from a file are bounded before use, so a corrupted or hostile header
//! cannot make the reader allocate gigabytes or spin for hours.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::error::{CryptoError, Result, random_array};

/// Version of the passphrase-protected format.
pub const PASSPHRASE_FORMAT_VERSION: u8 = 1;
/// KDF byte for Argon2id version 0x13.
pub const KDF_ARGON2ID_V13: u8 = 1;

/// Bytes of the Argon2id salt.
pub const SALT_BYTES: usize = 16;
/// Bytes of the XChaCha20 nonce.
pub const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const HEADER_BYTES: usize = 2 + 12 + SALT_BYTES + NONCE_BYTES;
const WHAT: &str = "passphrase-protected secret";

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl KdfParams {
    /// The default for new secrets: 64 MiB, 3 passes, 1 lane (about a quarter second here).
    pub const DEFAULT: Self = Self {
        memory_kib: 64 * 1024,
        iterations: 3,
        parallelism: 1,
    };
    /// The cheapest Argon2id allows; for tests only.
    pub const MINIMUM_FOR_TESTS: Self = Self {
        memory_kib: 8,
        iterations: 1,
        parallelism: 1,
    };

    const MEMORY_KIB_MAX: u32 = 4 * 1024 * 1024;
    const ITERATIONS_MAX: u32 = 64;
    const PARALLELISM_MAX: u32 = 16;

    fn validate(self) -> Result<Params> {
        let reject = |reason: String| Err(CryptoError::InvalidKdfParams { reason });
        if self.parallelism == 0 || self.parallelism > Self::PARALLELISM_MAX {
            return reject(format!(
                "parallelism {} outside 1..={}",
                self.parallelism,
                Self::PARALLELISM_MAX
            ));
        }
        if self.iterations == 0 || self.iterations > Self::ITERATIONS_MAX {
            return reject(format!(
                "iterations {} outside 1..={}",
                self.iterations,
                Self::ITERATIONS_MAX
            ));
        }
        if self.memory_kib < 8 * self.parallelism || self.memory_kib > Self::MEMORY_KIB_MAX {
            return reject(format!(
                "memory {} KiB outside {}..={} KiB",
                self.memory_kib,
                8 * self.parallelism,
                Self::MEMORY_KIB_MAX
            ));
        }
        Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32)).map_err(|error| {
            CryptoError::InvalidKdfParams {
                reason: error.to_string(),
            }
        })
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Encrypts `secret` under a key derived from `passphrase` with a fresh random salt.
///
/// # Errors
/// [`CryptoError::InvalidKdfParams`] for out-of-range parameters;
/// [`CryptoError::Randomness`] when the OS RNG fails.
pub fn protect(passphrase: &[u8], secret: &[u8], params: KdfParams) -> Result<Vec<u8>> {
    protect_with_randomness(passphrase, secret, params, random_array()?, random_array()?)
}

/// [`protect`] with caller-supplied salt and nonce (the simulator passes seeded bytes;
/// production always uses [`protect`]).
///
/// # Errors
/// [`CryptoError::InvalidKdfParams`] for out-of-range parameters.
pub fn protect_with_randomness(
    passphrase: &[u8],
    secret: &[u8],
    params: KdfParams,
    salt: [u8; SALT_BYTES],
    nonce: [u8; NONCE_BYTES],
) -> Result<Vec<u8>> {
    let argon_params = params.validate()?;
    let key = derive(passphrase, &salt, argon_params)?;

    let mut protected = Vec::with_capacity(HEADER_BYTES + secret.len() + TAG_BYTES);
    protected.extend_from_slice(&[PASSPHRASE_FORMAT_VERSION, KDF_ARGON2ID_V13]);
    protected.extend_from_slice(&params.memory_kib.to_le_bytes());
    protected.extend_from_slice(&params.iterations.to_le_bytes());
    protected.extend_from_slice(&params.parallelism.to_le_bytes());
    protected.extend_from_slice(&salt);
    protected.extend_from_slice(&nonce);
    let ciphertext = XChaCha20Poly1305::new((&*key).into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: secret,
                aad: &protected,
            },
        )
        .map_err(|_| CryptoError::Malformed {
            what: WHAT,
            reason: "secret too large".into(),
        })?;
    protected.extend_from_slice(&ciphertext);
    Ok(protected)
}

/// Decrypts a [`protect`]ed secret.
///
/// # Errors
/// Format errors for garbage, [`CryptoError::InvalidKdfParams`] for hostile parameters,
/// [`CryptoError::WrongPassphrase`] when the passphrase (or the file) is wrong.
pub fn unprotect(passphrase: &[u8], protected: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let params = read_params(protected)?;
    let argon_params = params.validate()?;
    let salt = &protected[14..14 + SALT_BYTES];
    let nonce = &protected[14 + SALT_BYTES..HEADER_BYTES];
    let key = derive(passphrase, salt, argon_params)?;
    XChaCha20Poly1305::new((&*key).into())
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: &protected[HEADER_BYTES..],
                aad: &protected[..HEADER_BYTES],
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::WrongPassphrase)
}

/// Reads the KDF parameters of a protected secret without the passphrase.
///
/// # Errors
/// As [`unprotect`], before any key derivation.
pub fn read_params(protected: &[u8]) -> Result<KdfParams> {
    let Some(&version) = protected.first() else {
        return Err(CryptoError::Truncated {
            what: WHAT,
            needed: HEADER_BYTES + TAG_BYTES,
            found: 0,
        });
    };
    if version != PASSPHRASE_FORMAT_VERSION {
        return Err(CryptoError::UnsupportedVersion {
            what: WHAT,
            found: version,
            supported: PASSPHRASE_FORMAT_VERSION,
        });
    }
    if protected.len() < HEADER_BYTES + TAG_BYTES {
        return Err(CryptoError::Truncated {
            what: WHAT,
            needed: HEADER_BYTES + TAG_BYTES,
            found: protected.len(),
        });
    }
    if protected[1] != KDF_ARGON2ID_V13 {
        return Err(CryptoError::UnknownAlgorithm {
            what: WHAT,
            found: protected[1],
        });
    }
    let word = |offset: usize| {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&protected[offset..offset + 4]);
        u32::from_le_bytes(bytes)
    };
    Ok(KdfParams {
        memory_kib: word(2),
        iterations: word(6),
        parallelism: word(10),
    })
}

fn derive(passphrase: &[u8], salt: &[u8], params: Params) -> Result<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, &mut *key)
        .map_err(|error| CryptoError::InvalidKdfParams {
            reason: error.to_string(),
        })?;
    Ok(key)
}
