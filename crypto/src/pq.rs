//! The post-quantum primitives, ML-DSA-65 (FIPS 204) and ML-KEM-768 (FIPS 203), behind
//! forge-crypto's own types.
//!
//! This module is the only place that names the implementation (libcrux, pinned exactly in
//! the workspace). Swapping it for another FIPS 203/204 crate means rewriting this file and
//! passing the known-answer tests in `tests/acvp.rs`; nothing else in the workspace changes.

use zeroize::{Zeroize, Zeroizing};

use crate::error::{CryptoError, Result};

/// Implements `Debug` without printing key bytes (public keys show a short prefix).
macro_rules! redacted_debug {
    ($name:ident, secret) => {
        impl std::fmt::Debug for $name {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
    ($name:ident, public) => {
        impl std::fmt::Debug for $name {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let prefix = data_encoding::HEXLOWER.encode(&self.as_bytes()[..8]);
                write!(formatter, concat!(stringify!($name), "({}…)"), prefix)
            }
        }
    };
}

/// ML-DSA-65 (FIPS 204): signing keys, verification keys and signatures.
pub mod ml_dsa_65 {
    use super::{CryptoError, Result, Zeroize};
    use libcrux_ml_dsa::ml_dsa_65 as imp;

    /// Bytes of the key-generation seed ξ.
    pub const SEED_BYTES: usize = 32;
    /// Bytes of an encoded verification (public) key.
    pub const PUBLIC_KEY_BYTES: usize = 1952;
    /// Bytes of an encoded signing (secret) key.
    pub const SECRET_KEY_BYTES: usize = 4032;
    /// Bytes of a signature.
    pub const SIGNATURE_BYTES: usize = 3309;
    /// Bytes of the per-signature randomness (hedged signing).
    pub const SIGNING_RANDOMNESS_BYTES: usize = 32;
    /// The longest context string FIPS 204 allows.
    pub const CONTEXT_BYTES_MAX: usize = 255;

    /// An ML-DSA-65 signing key; zeroized on drop.
    pub struct SigningKey(Box<imp::MLDSA65SigningKey>);

    /// An ML-DSA-65 verification key.
    #[derive(Clone)]
    pub struct VerifyingKey(Box<imp::MLDSA65VerificationKey>);

    redacted_debug!(SigningKey, secret);
    redacted_debug!(VerifyingKey, public);

    /// `ML-DSA.KeyGen_internal(ξ)` (FIPS 204, Algorithm 6): a key pair from a 32-byte seed.
    #[must_use]
    pub fn keypair_from_seed(seed: &[u8; SEED_BYTES]) -> (SigningKey, VerifyingKey) {
        let pair = imp::generate_key_pair(*seed);
        (
            SigningKey(Box::new(pair.signing_key)),
            VerifyingKey(Box::new(pair.verification_key)),
        )
    }

    impl SigningKey {
        /// The encoded secret key (FIPS 204 `skEncode`).
        #[must_use]
        pub fn as_bytes(&self) -> &[u8; SECRET_KEY_BYTES] {
            imp::MLDSA65SigningKey::as_ref(&self.0)
        }

        /// `ML-DSA.Sign(sk, M, ctx)` (Algorithm 2, pure) with caller-supplied randomness
        /// (all zeros gives the deterministic variant).
        ///
        /// # Errors
        /// [`CryptoError::Malformed`] for a context over 255 bytes; signing itself does not
        /// otherwise fail in practice.
        pub fn sign(
            &self,
            message: &[u8],
            context: &[u8],
            randomness: [u8; SIGNING_RANDOMNESS_BYTES],
        ) -> Result<Vec<u8>> {
            if context.len() > CONTEXT_BYTES_MAX {
                return Err(CryptoError::Malformed {
                    what: "ML-DSA context",
                    reason: format!(
                        "{} bytes, at most {CONTEXT_BYTES_MAX} allowed",
                        context.len()
                    ),
                });
            }
            imp::sign(&self.0, message, context, randomness)
                .map(|signature| signature.as_slice().to_vec())
                .map_err(|error| CryptoError::Malformed {
                    what: "ML-DSA signing",
                    reason: format!("{error:?}"),
                })
        }
    }

    impl Drop for SigningKey {
        fn drop(&mut self) {
            self.0.as_mut_slice().zeroize();
        }
    }

    impl VerifyingKey {
        /// Reads an encoded verification key.
        ///
        /// # Errors
        /// [`CryptoError::Malformed`] for a wrong length.
        pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
            let array: [u8; PUBLIC_KEY_BYTES] =
                bytes.try_into().map_err(|_| CryptoError::Malformed {
                    what: "ML-DSA-65 public key",
                    reason: format!("expected {PUBLIC_KEY_BYTES} bytes, found {}", bytes.len()),
                })?;
            Ok(Self(Box::new(imp::MLDSA65VerificationKey::new(array))))
        }

        /// The encoded public key (FIPS 204 `pkEncode`).
        #[must_use]
        pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_BYTES] {
            imp::MLDSA65VerificationKey::as_ref(&self.0)
        }

        /// `ML-DSA.Verify(pk, M, σ, ctx)` (Algorithm 3, pure).
        ///
        /// # Errors
        /// [`CryptoError::BadSignature`] (with `domain` as given) for a wrong length, a
        /// context over 255 bytes, or a signature that does not verify.
        pub fn verify(
            &self,
            message: &[u8],
            context: &[u8],
            signature: &[u8],
            domain: &'static str,
        ) -> Result<()> {
            let bad = CryptoError::BadSignature { domain };
            let array: [u8; SIGNATURE_BYTES] = signature.try_into().map_err(|_| bad.clone())?;
            if context.len() > CONTEXT_BYTES_MAX {
                return Err(bad);
            }
            imp::verify(
                &self.0,
                message,
                context,
                &imp::MLDSA65Signature::new(array),
            )
            .map_err(|_| bad)
        }
    }
}

/// ML-KEM-768 (FIPS 203): encapsulation and decapsulation keys.
pub mod ml_kem_768 {
    use super::{CryptoError, Result, Zeroize, Zeroizing};
    use libcrux_ml_kem::mlkem768 as imp;

    /// Bytes of each of the two key-generation seeds, d and z.
    pub const SEED_HALF_BYTES: usize = 32;
    /// Bytes of an encapsulation (public) key.
    pub const PUBLIC_KEY_BYTES: usize = 1184;
    /// Bytes of a decapsulation (secret) key.
    pub const SECRET_KEY_BYTES: usize = 2400;
    /// Bytes of a ciphertext.
    pub const CIPHERTEXT_BYTES: usize = 1088;
    /// Bytes of a shared secret.
    pub const SHARED_SECRET_BYTES: usize = 32;

    /// An ML-KEM-768 decapsulation key; zeroized on drop.
    pub struct DecapsulationKey(Box<imp::MlKem768PrivateKey>);

    /// An ML-KEM-768 encapsulation key (validated on decode).
    #[derive(Clone)]
    pub struct EncapsulationKey(Box<imp::MlKem768PublicKey>);

    redacted_debug!(DecapsulationKey, secret);
    redacted_debug!(EncapsulationKey, public);

    /// `ML-KEM.KeyGen_internal(d, z)` (FIPS 203, Algorithm 16).
    #[must_use]
    pub fn keypair_from_seed(
        d: &[u8; SEED_HALF_BYTES],
        z: &[u8; SEED_HALF_BYTES],
    ) -> (DecapsulationKey, EncapsulationKey) {
        let mut randomness = Zeroizing::new([0u8; 2 * SEED_HALF_BYTES]);
        randomness[..SEED_HALF_BYTES].copy_from_slice(d);
        randomness[SEED_HALF_BYTES..].copy_from_slice(z);
        let (private_key, public_key) = imp::generate_key_pair(*randomness).into_parts();
        (
            DecapsulationKey(Box::new(private_key)),
            EncapsulationKey(Box::new(public_key)),
        )
    }

    impl EncapsulationKey {
        /// Reads an encoded encapsulation key, with the FIPS 203 modulus check.
        ///
        /// # Errors
        /// [`CryptoError::Malformed`] for a wrong length or a key that fails the check.
        pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
            let key =
                imp::MlKem768PublicKey::try_from(bytes).map_err(|_| CryptoError::Malformed {
                    what: "ML-KEM-768 public key",
                    reason: format!("expected {PUBLIC_KEY_BYTES} bytes, found {}", bytes.len()),
                })?;
            if !imp::validate_public_key(&key) {
                return Err(CryptoError::Malformed {
                    what: "ML-KEM-768 public key",
                    reason: "coefficients out of range (FIPS 203 modulus check)".into(),
                });
            }
            Ok(Self(Box::new(key)))
        }

        /// The encoded key.
        #[must_use]
        pub fn as_bytes(&self) -> &[u8; PUBLIC_KEY_BYTES] {
            self.0.as_slice()
        }

        /// `ML-KEM.Encaps_internal(ek, m)` (Algorithm 17): ciphertext and shared secret.
        #[must_use]
        pub fn encapsulate(
            &self,
            m: [u8; 32],
        ) -> ([u8; CIPHERTEXT_BYTES], Zeroizing<[u8; SHARED_SECRET_BYTES]>) {
            let (ciphertext, shared_secret) = imp::encapsulate(&self.0, m);
            (*ciphertext.as_slice(), Zeroizing::new(shared_secret))
        }
    }

    impl DecapsulationKey {
        /// Reads an encoded decapsulation key.
        ///
        /// # Errors
        /// [`CryptoError::Malformed`] for a wrong length.
        pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
            let key =
                imp::MlKem768PrivateKey::try_from(bytes).map_err(|_| CryptoError::Malformed {
                    what: "ML-KEM-768 secret key",
                    reason: format!("expected {SECRET_KEY_BYTES} bytes, found {}", bytes.len()),
                })?;
            Ok(Self(Box::new(key)))
        }

        /// The encoded key.
        #[must_use]
        pub fn as_bytes(&self) -> &[u8; SECRET_KEY_BYTES] {
            self.0.as_slice()
        }

        /// `ML-KEM.Decaps(dk, c)` (Algorithm 18). A ciphertext that was not made for this key
        /// yields the implicit-rejection secret, not an error: the caller's AEAD catches it.
        ///
        /// # Errors
        /// [`CryptoError::Malformed`] for a ciphertext of the wrong length.
        pub fn decapsulate(
            &self,
            ciphertext: &[u8],
        ) -> Result<Zeroizing<[u8; SHARED_SECRET_BYTES]>> {
            let ciphertext = imp::MlKem768Ciphertext::try_from(ciphertext).map_err(|_| {
                CryptoError::Malformed {
                    what: "ML-KEM-768 ciphertext",
                    reason: format!(
                        "expected {CIPHERTEXT_BYTES} bytes, found {}",
                        ciphertext.len()
                    ),
                }
            })?;
            Ok(Zeroizing::new(imp::decapsulate(&self.0, &ciphertext)))
        }
    }

    impl Drop for DecapsulationKey {
        fn drop(&mut self) {
            self.0[0..SECRET_KEY_BYTES].zeroize();
        }
    }
}
