//! The one error type of forge-crypto: every failure a caller can act on, as a value.

/// Everything that can go wrong in forge-crypto.
///
/// Decoding errors name what was expected and what was found, so a user looking at a
/// corrupted file or a garbled identifier knows which part is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// An identifier (cid, node id) did not parse.
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidId {
        what: &'static str,
        input: String,
        reason: &'static str,
    },

    /// A sealed blob, envelope or key file was written by a newer (or unknown) format version.
    #[error("{what}: unsupported format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        what: &'static str,
        found: u8,
        supported: u8,
    },

    /// The algorithm byte names an algorithm this build does not implement.
    #[error("{what}: unknown algorithm {found:#04x}")]
    UnknownAlgorithm { what: &'static str, found: u8 },

    /// A flags byte has bits set that this format version does not define.
    #[error("{what}: unknown flag bits {found:#04x}")]
    UnknownFlags { what: &'static str, found: u8 },

    /// Input ended before the fixed-size header or trailer it must contain.
    #[error("{what} is truncated: need at least {needed} bytes, found {found}")]
    Truncated {
        what: &'static str,
        needed: usize,
        found: usize,
    },

    /// A field had the wrong length or an impossible value.
    #[error("{what} is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },

    /// The AEAD tag did not verify: the data was modified or the key is wrong. No plaintext
    /// is ever returned in this case.
    #[error("{what} failed authentication: it was modified, or the key is wrong")]
    AuthenticationFailed { what: &'static str },

    /// A key envelope was not wrapped to this recipient (or was modified).
    #[error(
        "key envelope cannot be opened with this node's key: it was sealed to another recipient, or modified"
    )]
    EnvelopeNotForRecipient,

    /// The passphrase does not open a passphrase-protected secret.
    #[error("wrong passphrase (or the protected file was modified)")]
    WrongPassphrase,

    /// Passphrase-derivation parameters are outside the accepted range.
    #[error("passphrase parameters rejected: {reason}")]
    InvalidKdfParams { reason: String },

    /// The compressed payload inside an authenticated seal did not decompress, or would
    /// exceed the caller's size limit.
    #[error("sealed payload failed to decompress: {reason}")]
    Decompression { reason: String },

    /// An ML-DSA signature did not verify for this key, message and signature domain.
    #[error("signature does not verify for this {domain} message and signer")]
    BadSignature { domain: &'static str },

    /// The operating system's random number generator failed.
    #[error("operating system randomness unavailable: {reason}")]
    Randomness { reason: String },

    /// An X25519 exchange produced the all-zero secret (a low-order public key).
    #[error("X25519 public key is of low order: refusing a non-contributory key exchange")]
    NonContributoryKeyExchange,
}

/// Shorthand for results in this crate.
pub type Result<T, E = CryptoError> = std::result::Result<T, E>;

/// Fills `buffer` from the operating system's CSPRNG.
pub fn fill_random(buffer: &mut [u8]) -> Result<()> {
    getrandom::fill(buffer).map_err(|error| CryptoError::Randomness {
        reason: error.to_string(),
    })
}

/// Returns `N` random bytes from the operating system's CSPRNG (ids, salts, keys).
///
/// # Errors
/// [`CryptoError::Randomness`] when the OS RNG fails.
pub fn random_array<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    fill_random(&mut bytes)?;
    Ok(bytes)
}
