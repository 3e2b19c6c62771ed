//! Content and node identifiers: 32-byte BLAKE3 digests with strict text forms.

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE32_NOPAD, HEXLOWER_PERMISSIVE};

use crate::error::{CryptoError, Result};

/// Length in bytes of every BLAKE3-256 identifier.
pub const DIGEST_BYTES: usize = 32;
/// Length of an identifier in hexadecimal.
pub const HEX_CHARS: usize = DIGEST_BYTES * 2;
/// Length of an identifier in unpadded RFC 4648 base32.
pub const BASE32_CHARS: usize = 52;

const _: () = assert!(BASE32_CHARS == (DIGEST_BYTES * 8).div_ceil(5));

/// Content id: BLAKE3-256 of a chunk's (or object's) ciphertext.
///
/// Any vault can compute and check it without holding a key, which is what lets a
/// zero-knowledge vault deduplicate, verify and serve data it cannot read.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cid([u8; DIGEST_BYTES]);

/// Node id: BLAKE3-256 of a node's ML-DSA-65 public key, shown as lower-case hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; DIGEST_BYTES]);

macro_rules! digest_id {
    ($name:ident, $what:literal) => {
        impl $name {
            /// Wraps raw digest bytes.
            #[must_use]
            pub const fn from_bytes(bytes: [u8; DIGEST_BYTES]) -> Self {
                Self(bytes)
            }

            /// The raw digest bytes.
            #[must_use]
            pub const fn as_bytes(&self) -> &[u8; DIGEST_BYTES] {
                &self.0
            }

            /// Reads an id from exactly 32 bytes, rejecting any other length.
            ///
            /// # Errors
            /// [`CryptoError::Malformed`] when `bytes` is not 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Result<Self> {
                let array: [u8; DIGEST_BYTES] =
                    bytes.try_into().map_err(|_| CryptoError::Malformed {
                        what: $what,
                        reason: format!("expected {DIGEST_BYTES} bytes, found {}", bytes.len()),
                    })?;
                Ok(Self(array))
            }

            /// Lower-case hexadecimal, 64 characters: the canonical text form.
            #[must_use]
            pub fn to_hex(&self) -> String {
                data_encoding::HEXLOWER.encode(&self.0)
            }

            /// Lower-case unpadded base32, 52 characters: shorter, for file names and URLs.
            #[must_use]
            pub fn to_base32(&self) -> String {
                BASE32_NOPAD.encode(&self.0).to_ascii_lowercase()
            }

            /// Parses the hex (64 characters) or base32 (52 characters) form, in either case.
            ///
            /// # Errors
            /// [`CryptoError::InvalidId`] naming the problem: wrong length or a character
            /// outside the alphabet.
            pub fn parse(text: &str) -> Result<Self> {
                parse_digest(text, $what).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Twelve characters identify an id in logs without drowning them.
                write!(
                    formatter,
                    concat!(stringify!($name), "({}…)"),
                    &self.to_hex()[..12]
                )
            }
        }

        impl FromStr for $name {
            type Err = CryptoError;
            fn from_str(text: &str) -> Result<Self> {
                Self::parse(text)
            }
        }
    };
}

digest_id!(Cid, "cid");
digest_id!(NodeId, "node id");

impl Cid {
    /// The cid of `ciphertext`: its BLAKE3-256 hash.
    #[must_use]
    pub fn of(ciphertext: &[u8]) -> Self {
        Self(*blake3::hash(ciphertext).as_bytes())
    }

    /// Whether `ciphertext` hashes to this cid.
    #[must_use]
    pub fn matches(&self, ciphertext: &[u8]) -> bool {
        // blake3::Hash compares in constant time; equality here is not secret anyway.
        blake3::hash(ciphertext) == blake3::Hash::from_bytes(self.0)
    }
}

impl NodeId {
    /// The node id for an ML-DSA-65 public key.
    #[must_use]
    pub fn of_signing_key(ml_dsa_public_key: &[u8]) -> Self {
        Self(*blake3::hash(ml_dsa_public_key).as_bytes())
    }
}

fn parse_digest(text: &str, what: &'static str) -> Result<[u8; DIGEST_BYTES]> {
    let invalid = |reason: &'static str| CryptoError::InvalidId {
        what,
        input: text.chars().take(80).collect(),
        reason,
    };
    let decoded = match text.len() {
        HEX_CHARS => HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .map_err(|_| invalid("not hexadecimal (expected 64 characters 0-9, a-f)"))?,
        BASE32_CHARS => BASE32_NOPAD
            .decode(text.to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid("not base32 (expected 52 characters a-z, 2-7)"))?,
        0 => return Err(invalid("empty")),
        _ => {
            return Err(invalid(
                "wrong length: expected 64 hex or 52 base32 characters",
            ));
        }
    };
    decoded
        .try_into()
        .map_err(|_| invalid("decoded to the wrong number of bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base32_round_trip_and_agree() {
        let cid = Cid::of(b"hello");
        assert_eq!(cid.to_hex().len(), HEX_CHARS);
        assert_eq!(cid.to_base32().len(), BASE32_CHARS);
        assert_eq!(Cid::parse(&cid.to_hex()).unwrap(), cid);
        assert_eq!(Cid::parse(&cid.to_base32()).unwrap(), cid);
        assert_eq!(Cid::parse(&cid.to_hex().to_uppercase()).unwrap(), cid);
        assert_eq!(cid.to_string(), cid.to_hex());
        assert!(cid.matches(b"hello"));
        assert!(!cid.matches(b"hellO"));
    }

    #[test]
    fn known_blake3_value() {
        // BLAKE3("") from the reference implementation's test vectors.
        assert_eq!(
            Cid::of(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn malformed_ids_are_rejected_with_a_reason() {
        let cases = [
            "",
            "abc",
            &"g".repeat(64),
            &"1".repeat(52),
            &"a".repeat(63),
            &"a".repeat(65),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f326 ",
        ];
        for case in cases {
            let error = Cid::parse(case).unwrap_err();
            assert!(
                matches!(error, CryptoError::InvalidId { what: "cid", .. }),
                "{case:?} gave {error:?}"
            );
        }
        assert!(NodeId::from_slice(&[0; 31]).is_err());
    }
}
