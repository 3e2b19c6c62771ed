//! Plain BLAKE3-256 of public bytes, for identities that are not ids of stored objects:
//! a workload's digest (`forge run`: its manifest's bytes then its program's). Not keyed,
//! not secret: anyone reproduces it with `b3sum`.

/// An incremental BLAKE3-256.
#[derive(Debug, Clone, Default)]
pub struct Digest256(blake3::Hasher);

impl Digest256 {
    /// An empty digest.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything added.
    #[must_use]
    pub fn finalize(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::Digest256;

    #[test]
    fn pieces_hash_as_their_concatenation_and_match_blake3() {
        let mut digest = Digest256::new();
        digest.update(b"name = \"x\"\n");
        digest.update(b"#!/bin/sh\n");
        assert_eq!(
            digest.finalize(),
            *blake3::hash(b"name = \"x\"\n#!/bin/sh\n").as_bytes()
        );
        // The BLAKE3 of nothing (the reference value).
        assert_eq!(
            data_encoding::HEXLOWER.encode(&Digest256::new().finalize()),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }
}
