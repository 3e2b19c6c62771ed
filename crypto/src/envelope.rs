//! Key envelopes: a volume key (and for writers a domain key) wrapped to one recipient
//! with hybrid ML-KEM-768 + X25519, combined X-Wing style, then sealed with AEAD.
//!
//! ```text
//! envelope = version:u8 | algorithm:u8 | kind:u8 | recipient:NodeId[32]
//!          | ml_kem_ciphertext[1088] | x25519_ephemeral_public[32]
//!          | XChaCha20-Poly1305(kek, nonce = 0, aad = all of the above || binding)(kind | keys)
//! kek      = BLAKE3-derive_key(COMBINER_CONTEXT,
//!                ml_kem_shared || x25519_shared || x25519_ephemeral_public || recipient_x25519_public)
//! ```
//!
//! Both shared secrets must be known to derive the key, so the envelope stays closed while
//! either ML-KEM-768 or X25519 holds. As in X-Wing, the ML-KEM ciphertext is not hashed into
//! the key (ML-KEM is ciphertext-collision-resistant) but the X25519 ephemeral and
//! recipient keys are. The zero nonce is safe because every envelope has a fresh key.
//! The caller's `binding` (e.g. the volume id) is authenticated, so an envelope cannot be
//! moved to another volume.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use x25519_dalek::{PublicKey as X25519Public, StaticSecret as X25519Secret};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{CryptoError, Result, random_array};
use crate::id::{DIGEST_BYTES, NodeId};
use crate::identity::{NodeIdentity, NodePublicKeys};
use crate::keys::{DomainKey, KEY_BYTES, VolumeKey};
use crate::pq::ml_kem_768;

/// Version of the envelope format.
pub const ENVELOPE_FORMAT_VERSION: u8 = 1;
/// ML-KEM-768 + X25519, BLAKE3 combiner, XChaCha20-Poly1305.
pub const ALGORITHM_MLKEM768_X25519: u8 = 1;

const COMBINER_CONTEXT: &str = "forge-vault 2026 v1 hybrid ML-KEM-768+X25519 envelope key";
const WHAT: &str = "key envelope";
const KIND_READER: u8 = 1;
const KIND_WRITER: u8 = 2;
const KIND_DOMAIN: u8 = 3;
const TAG_BYTES: usize = 16;
const HEADER_BYTES: usize = 3 + DIGEST_BYTES + ml_kem_768::CIPHERTEXT_BYTES + 32;

/// What an envelope carries.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvelopeContents {
    /// A reader's envelope: the volume key, enough to read every object and chunk.
    Reader { volume_key: VolumeKey },
    /// A writer's envelope: also the domain key, so the writer can deduplicate convergently.
    Writer {
        volume_key: VolumeKey,
        domain_key: DomainKey,
    },
    /// A dedup domain's key alone, kept by the vault so new volumes can join the domain.
    Domain { domain_key: DomainKey },
}

impl EnvelopeContents {
    /// The volume key, unless this is a domain envelope.
    #[must_use]
    pub fn volume_key(&self) -> Option<&VolumeKey> {
        match self {
            Self::Reader { volume_key } | Self::Writer { volume_key, .. } => Some(volume_key),
            Self::Domain { .. } => None,
        }
    }

    /// The domain key, for writer and domain envelopes.
    #[must_use]
    pub fn domain_key(&self) -> Option<&DomainKey> {
        match self {
            Self::Reader { .. } => None,
            Self::Writer { domain_key, .. } | Self::Domain { domain_key } => Some(domain_key),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Self::Reader { .. } => KIND_READER,
            Self::Writer { .. } => KIND_WRITER,
            Self::Domain { .. } => KIND_DOMAIN,
        }
    }

    /// The encoding: `kind:u8 | volume key (reader, writer) | domain key (writer, domain)`.
    #[must_use]
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut bytes = Zeroizing::new(Vec::with_capacity(1 + 2 * KEY_BYTES));
        bytes.push(self.kind());
        if let Some(volume_key) = self.volume_key() {
            bytes.extend_from_slice(volume_key.as_bytes());
        }
        if let Some(domain_key) = self.domain_key() {
            bytes.extend_from_slice(domain_key.as_bytes());
        }
        bytes
    }

    /// Inverse of [`Self::to_bytes`].
    ///
    /// # Errors
    /// [`CryptoError::Malformed`] for an unknown kind or a wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let malformed = |reason: String| CryptoError::Malformed {
            what: "envelope contents",
            reason,
        };
        let (&kind, keys) = bytes
            .split_first()
            .ok_or_else(|| malformed("empty".into()))?;
        let expected =
            contents_len(kind).ok_or_else(|| malformed(format!("unknown kind {kind}")))? - 1;
        if keys.len() != expected {
            return Err(malformed(format!(
                "kind {kind} needs {expected} key bytes, found {}",
                keys.len()
            )));
        }
        let key = |index: usize| {
            let mut key = [0u8; KEY_BYTES];
            key.copy_from_slice(&keys[index * KEY_BYTES..(index + 1) * KEY_BYTES]);
            key
        };
        Ok(match kind {
            KIND_READER => Self::Reader {
                volume_key: VolumeKey::from_bytes(key(0)),
            },
            KIND_WRITER => Self::Writer {
                volume_key: VolumeKey::from_bytes(key(0)),
                domain_key: DomainKey::from_bytes(key(1)),
            },
            _ => Self::Domain {
                domain_key: DomainKey::from_bytes(key(0)),
            },
        })
    }
}

/// Bytes of [`EnvelopeContents::to_bytes`] for a kind, or `None` for an unknown kind.
fn contents_len(kind: u8) -> Option<usize> {
    match kind {
        KIND_READER | KIND_DOMAIN => Some(1 + KEY_BYTES),
        KIND_WRITER => Some(1 + 2 * KEY_BYTES),
        _ => None,
    }
}

impl std::fmt::Debug for EnvelopeContents {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::Reader { .. } => "EnvelopeContents::Reader(<redacted>)",
            Self::Writer { .. } => "EnvelopeContents::Writer(<redacted>)",
            Self::Domain { .. } => "EnvelopeContents::Domain(<redacted>)",
        })
    }
}

/// The randomness one wrap consumes; pass seeded bytes for reproducible tests.
#[derive(Clone, Zeroize)]
pub struct WrapRandomness {
    /// The ML-KEM encapsulation message `m`.
    pub ml_kem_m: [u8; 32],
    /// The X25519 ephemeral secret.
    pub x25519_ephemeral: [u8; 32],
}

impl std::fmt::Debug for WrapRandomness {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("WrapRandomness(<redacted>)")
    }
}

/// Wraps `contents` to `recipient`, bound to `binding`, with fresh OS randomness.
///
/// # Errors
/// [`CryptoError::Randomness`] when the OS RNG fails;
/// [`CryptoError::NonContributoryKeyExchange`] for a low-order X25519 key.
pub fn wrap(
    recipient: &NodePublicKeys,
    contents: &EnvelopeContents,
    binding: &[u8],
) -> Result<Vec<u8>> {
    let randomness = WrapRandomness {
        ml_kem_m: random_array()?,
        x25519_ephemeral: random_array()?,
    };
    wrap_with_randomness(recipient, contents, binding, &randomness)
}

/// [`wrap`] with caller-supplied randomness.
///
/// # Errors
/// [`CryptoError::NonContributoryKeyExchange`] for a low-order X25519 key.
pub fn wrap_with_randomness(
    recipient: &NodePublicKeys,
    contents: &EnvelopeContents,
    binding: &[u8],
    randomness: &WrapRandomness,
) -> Result<Vec<u8>> {
    let (ml_kem_ciphertext, ml_kem_shared) = recipient.ml_kem().encapsulate(randomness.ml_kem_m);
    let ephemeral = X25519Secret::from(randomness.x25519_ephemeral);
    let ephemeral_public = X25519Public::from(&ephemeral);
    let x25519_shared =
        ephemeral.diffie_hellman(&X25519Public::from(*recipient.x25519_public_key()));
    if !x25519_shared.was_contributory() {
        return Err(CryptoError::NonContributoryKeyExchange);
    }
    let kek = combine(
        &ml_kem_shared,
        x25519_shared.as_bytes(),
        ephemeral_public.as_bytes(),
        recipient.x25519_public_key(),
    );

    let mut envelope = Vec::with_capacity(HEADER_BYTES + 1 + 2 * KEY_BYTES + TAG_BYTES);
    envelope.extend_from_slice(&[
        ENVELOPE_FORMAT_VERSION,
        ALGORITHM_MLKEM768_X25519,
        contents.kind(),
    ]);
    envelope.extend_from_slice(recipient.node_id().as_bytes());
    envelope.extend_from_slice(&ml_kem_ciphertext);
    envelope.extend_from_slice(ephemeral_public.as_bytes());
    debug_assert_eq!(envelope.len(), HEADER_BYTES);

    let plaintext = contents.to_bytes();
    let aad = associated_data(&envelope, binding);
    let ciphertext = XChaCha20Poly1305::new((&*kek).into())
        .encrypt(
            &XNonce::default(),
            Payload {
                msg: &plaintext,
                aad: &aad,
            },
        )
        .expect("XChaCha20-Poly1305 encrypts 64 bytes without failure");
    envelope.extend_from_slice(&ciphertext);
    Ok(envelope)
}

/// Opens an envelope addressed to `identity`, checking it is bound to `binding`.
///
/// # Errors
/// Format errors for garbage; [`CryptoError::EnvelopeNotForRecipient`] when it was wrapped
/// to someone else, bound to something else, or modified.
pub fn unwrap(
    identity: &NodeIdentity,
    envelope: &[u8],
    binding: &[u8],
) -> Result<EnvelopeContents> {
    let header = EnvelopeHeader::parse(envelope)?;
    if header.recipient != identity.node_id() {
        return Err(CryptoError::EnvelopeNotForRecipient);
    }
    let ml_kem_ciphertext =
        &envelope[3 + DIGEST_BYTES..3 + DIGEST_BYTES + ml_kem_768::CIPHERTEXT_BYTES];
    let mut ephemeral_bytes = [0u8; 32];
    ephemeral_bytes.copy_from_slice(&envelope[HEADER_BYTES - 32..HEADER_BYTES]);

    let ml_kem_shared = identity.ml_kem_secret().decapsulate(ml_kem_ciphertext)?;
    let x25519_shared = identity
        .x25519_secret()
        .diffie_hellman(&X25519Public::from(ephemeral_bytes));
    if !x25519_shared.was_contributory() {
        return Err(CryptoError::NonContributoryKeyExchange);
    }
    let kek = combine(
        &ml_kem_shared,
        x25519_shared.as_bytes(),
        &ephemeral_bytes,
        identity.public_keys().x25519_public_key(),
    );
    let aad = associated_data(&envelope[..HEADER_BYTES], binding);
    let plaintext = Zeroizing::new(
        XChaCha20Poly1305::new((&*kek).into())
            .decrypt(
                &XNonce::default(),
                Payload {
                    msg: &envelope[HEADER_BYTES..],
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::EnvelopeNotForRecipient)?,
    );
    let contents = EnvelopeContents::from_bytes(&plaintext)?;
    if contents.kind() != header.kind {
        return Err(CryptoError::Malformed {
            what: WHAT,
            reason: "kind does not match contents".into(),
        });
    }
    Ok(contents)
}

/// The public header of an envelope: whom it is for and what kind it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeHeader {
    /// The node id the envelope was wrapped to.
    pub recipient: NodeId,
    /// Whether it carries a writer's domain key.
    pub is_writer: bool,
    kind: u8,
}

impl EnvelopeHeader {
    /// Parses and validates an envelope's header and length without any key.
    ///
    /// # Errors
    /// [`CryptoError::UnsupportedVersion`], [`CryptoError::UnknownAlgorithm`],
    /// [`CryptoError::Malformed`] or [`CryptoError::Truncated`].
    pub fn parse(envelope: &[u8]) -> Result<Self> {
        let Some(&version) = envelope.first() else {
            return Err(CryptoError::Truncated {
                what: WHAT,
                needed: HEADER_BYTES,
                found: 0,
            });
        };
        if version != ENVELOPE_FORMAT_VERSION {
            return Err(CryptoError::UnsupportedVersion {
                what: WHAT,
                found: version,
                supported: ENVELOPE_FORMAT_VERSION,
            });
        }
        if envelope.len() < HEADER_BYTES {
            return Err(CryptoError::Truncated {
                what: WHAT,
                needed: HEADER_BYTES,
                found: envelope.len(),
            });
        }
        if envelope[1] != ALGORITHM_MLKEM768_X25519 {
            return Err(CryptoError::UnknownAlgorithm {
                what: WHAT,
                found: envelope[1],
            });
        }
        let kind = envelope[2];
        let contents = contents_len(kind).ok_or_else(|| CryptoError::Malformed {
            what: WHAT,
            reason: format!("unknown kind {kind}"),
        })?;
        let expected_len = HEADER_BYTES + contents + TAG_BYTES;
        if envelope.len() != expected_len {
            return Err(CryptoError::Malformed {
                what: WHAT,
                reason: format!("expected {expected_len} bytes, found {}", envelope.len()),
            });
        }
        Ok(Self {
            recipient: NodeId::from_slice(&envelope[3..3 + DIGEST_BYTES])?,
            is_writer: kind == KIND_WRITER,
            kind,
        })
    }
}

fn combine(
    ml_kem_shared: &[u8; 32],
    x25519_shared: &[u8; 32],
    x25519_ephemeral_public: &[u8; 32],
    x25519_recipient_public: &[u8; 32],
) -> Zeroizing<[u8; 32]> {
    let mut hasher = blake3::Hasher::new_derive_key(COMBINER_CONTEXT);
    hasher.update(ml_kem_shared);
    hasher.update(x25519_shared);
    hasher.update(x25519_ephemeral_public);
    hasher.update(x25519_recipient_public);
    Zeroizing::new(*hasher.finalize().as_bytes())
}

fn associated_data(header: &[u8], binding: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 8 + binding.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(&(binding.len() as u64).to_le_bytes());
    aad.extend_from_slice(binding);
    aad
}
