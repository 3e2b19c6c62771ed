//! Property tests: sealing, envelopes and passphrase protection round-trip, detect any
//! single-bit change, refuse wrong keys, and are deterministic exactly where they must be.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests and benches fail loudly by design.

use forge_crypto::envelope::{self, WrapRandomness};
use forge_crypto::passphrase::{self, KdfParams};
use forge_crypto::seal::{self, Compression};
use forge_crypto::{
    Cid, CryptoError, DomainKey, EnvelopeContents, NodeIdentity, NodeSecrets, VolumeKey,
};
use proptest::prelude::*;

const LIMIT: usize = 1 << 20;

fn compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::Never), Just(Compression::WhenSmaller)]
}

/// Data that is sometimes compressible (repeated runs) and sometimes not.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..4096),
        (any::<u8>(), 0usize..20_000).prop_map(|(byte, len)| vec![byte; len]),
        proptest::collection::vec(0u8..4, 0..8192),
    ]
}

fn node(seed: u8) -> NodeIdentity {
    NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([seed; 128]))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn seal_open_round_trips(key in any::<[u8; 32]>(), data in payload(), aad in proptest::collection::vec(any::<u8>(), 0..40), mode in compression()) {
        let sealed = seal::seal(&key, &data, &aad, mode);
        prop_assert_eq!(seal::open(&key, &sealed, &aad, LIMIT).unwrap(), data.clone());
        prop_assert_eq!(&sealed, &seal::seal(&key, &data, &aad, mode), "sealing must be deterministic");
        if mode == Compression::Never {
            prop_assert_eq!(sealed.len(), data.len() + seal::SEAL_OVERHEAD_BYTES);
        }
    }

    #[test]
    fn any_flipped_bit_is_detected(key in any::<[u8; 32]>(), data in payload(), mode in compression(), position in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut sealed = seal::seal(&key, &data, b"chunk", mode);
        let index = position.index(sealed.len());
        sealed[index] ^= 1 << bit;
        let error = seal::open(&key, &sealed, b"chunk", LIMIT).unwrap_err();
        // Header bytes fail their own checks; everything else fails authentication.
        prop_assert!(matches!(error,
            CryptoError::AuthenticationFailed { .. } | CryptoError::UnsupportedVersion { .. }
            | CryptoError::UnknownAlgorithm { .. } | CryptoError::UnknownFlags { .. }), "{error:?}");
    }

    #[test]
    fn wrong_key_or_aad_is_refused(key in any::<[u8; 32]>(), other in any::<[u8; 32]>(), data in payload()) {
        prop_assume!(key != other);
        let sealed = seal::seal(&key, &data, b"object", Compression::WhenSmaller);
        let wrong_key = seal::open(&other, &sealed, b"object", LIMIT).unwrap_err();
        prop_assert!(matches!(wrong_key, CryptoError::AuthenticationFailed { .. }), "wrong key: {wrong_key:?}");
        let wrong_aad = seal::open(&key, &sealed, b"chunk", LIMIT).unwrap_err();
        prop_assert!(matches!(wrong_aad, CryptoError::AuthenticationFailed { .. }), "wrong aad: {wrong_aad:?}");
    }

    #[test]
    fn truncation_is_refused(key in any::<[u8; 32]>(), data in payload(), cut in any::<prop::sample::Index>()) {
        let sealed = seal::seal(&key, &data, b"", Compression::Never);
        let keep = cut.index(sealed.len());
        prop_assert!(seal::open(&key, &sealed[..keep], b"", LIMIT).is_err());
    }

    #[test]
    fn convergent_within_a_domain_distinct_across_domains(root_a in any::<[u8; 32]>(), root_b in any::<[u8; 32]>(), data in payload()) {
        prop_assume!(root_a != root_b);
        let (domain_a, domain_a_again, domain_b) =
            (DomainKey::from_bytes(root_a), DomainKey::from_bytes(root_a), DomainKey::from_bytes(root_b));
        let seal_in = |domain: &DomainKey| {
            let key = domain.chunk_key(&domain.plaintext_hash(&data));
            seal::seal(key.as_bytes(), &data, b"chunk", Compression::WhenSmaller)
        };
        // Two volumes of one tenant store the same bytes once ...
        prop_assert_eq!(Cid::of(&seal_in(&domain_a)), Cid::of(&seal_in(&domain_a_again)));
        // ... and another tenant's copy is unrelated ciphertext with an unrelated cid.
        prop_assert_ne!(Cid::of(&seal_in(&domain_a)), Cid::of(&seal_in(&domain_b)));
        prop_assert_ne!(domain_a.plaintext_hash(&data), domain_b.plaintext_hash(&data));
    }

    #[test]
    fn envelopes_round_trip_and_only_open_for_their_recipient(volume in any::<[u8; 32]>(), domain in any::<[u8; 32]>(), kind in 0u8..3, m in any::<[u8; 32]>(), ephemeral in any::<[u8; 32]>(), flip in any::<prop::sample::Index>()) {
        let (alice, bob) = (node(1), node(2));
        let contents = match kind {
            0 => EnvelopeContents::Reader { volume_key: VolumeKey::from_bytes(volume) },
            1 => EnvelopeContents::Writer { volume_key: VolumeKey::from_bytes(volume), domain_key: DomainKey::from_bytes(domain) },
            _ => EnvelopeContents::Domain { domain_key: DomainKey::from_bytes(domain) },
        };
        prop_assert_eq!(EnvelopeContents::from_bytes(&contents.to_bytes()).unwrap(), contents.clone());
        let randomness = WrapRandomness { ml_kem_m: m, x25519_ephemeral: ephemeral };
        let wrapped = envelope::wrap_with_randomness(alice.public_keys(), &contents, b"volume-1", &randomness).unwrap();
        prop_assert_eq!(envelope::unwrap(&alice, &wrapped, b"volume-1").unwrap(), contents.clone());
        prop_assert!(matches!(envelope::unwrap(&bob, &wrapped, b"volume-1"), Err(CryptoError::EnvelopeNotForRecipient)));
        prop_assert!(envelope::unwrap(&alice, &wrapped, b"volume-2").is_err(), "binding must be checked");
        let mut tampered = wrapped.clone();
        let index = flip.index(tampered.len());
        tampered[index] ^= 0x01;
        prop_assert!(envelope::unwrap(&alice, &tampered, b"volume-1").is_err(), "flip at {index} went unnoticed");
    }
}

#[test]
fn envelope_to_another_node_id_is_refused_even_with_a_forged_recipient_field() {
    let (alice, bob) = (node(1), node(2));
    let contents = EnvelopeContents::Reader {
        volume_key: VolumeKey::from_bytes([5; 32]),
    };
    let mut wrapped = envelope::wrap(alice.public_keys(), &contents, b"v").unwrap();
    // Readdress Alice's envelope to Bob: Bob's keys still cannot open it.
    wrapped[3..35].copy_from_slice(bob.node_id().as_bytes());
    assert!(matches!(
        envelope::unwrap(&bob, &wrapped, b"v"),
        Err(CryptoError::EnvelopeNotForRecipient)
    ));
    // Random wraps of the same contents differ (fresh encapsulation each time).
    assert_ne!(
        envelope::wrap(alice.public_keys(), &contents, b"v").unwrap(),
        envelope::wrap(alice.public_keys(), &contents, b"v").unwrap()
    );
}

#[test]
fn envelope_garbage_is_refused_with_format_errors() {
    let alice = node(1);
    assert!(matches!(
        envelope::unwrap(&alice, &[], b""),
        Err(CryptoError::Truncated { .. })
    ));
    assert!(matches!(
        envelope::unwrap(&alice, &[9; 2000], b""),
        Err(CryptoError::UnsupportedVersion { found: 9, .. })
    ));
    let contents = EnvelopeContents::Reader {
        volume_key: VolumeKey::from_bytes([5; 32]),
    };
    let wrapped = envelope::wrap(alice.public_keys(), &contents, b"").unwrap();
    assert!(envelope::unwrap(&alice, &wrapped[..wrapped.len() - 1], b"").is_err());
    let mut unknown_algorithm = wrapped.clone();
    unknown_algorithm[1] = 7;
    assert!(matches!(
        envelope::unwrap(&alice, &unknown_algorithm, b""),
        Err(CryptoError::UnknownAlgorithm { found: 7, .. })
    ));
}

#[test]
fn seal_decoding_errors_are_distinct() {
    let key = [3u8; 32];
    let sealed = seal::seal(&key, b"hello world", b"", Compression::Never);
    let mut version = sealed.clone();
    version[0] = 3;
    assert!(matches!(
        seal::open(&key, &version, b"", LIMIT),
        Err(CryptoError::UnsupportedVersion { found: 3, .. })
    ));
    let mut algorithm = sealed.clone();
    algorithm[1] = 9;
    assert!(matches!(
        seal::open(&key, &algorithm, b"", LIMIT),
        Err(CryptoError::UnknownAlgorithm { found: 9, .. })
    ));
    let mut flags = sealed.clone();
    flags[2] = 0x80;
    assert!(matches!(
        seal::open(&key, &flags, b"", LIMIT),
        Err(CryptoError::UnknownFlags { found: 0x80, .. })
    ));
    assert!(matches!(
        seal::open(&key, &sealed[..20], b"", LIMIT),
        Err(CryptoError::Truncated { .. })
    ));
    assert!(matches!(
        seal::open(&key, &[], b"", LIMIT),
        Err(CryptoError::Truncated { found: 0, .. })
    ));
    // Setting the zstd flag on an uncompressed payload is caught by the tag, not by zstd.
    let mut compressed_flag = sealed.clone();
    compressed_flag[2] = seal::FLAG_ZSTD;
    assert!(matches!(
        seal::open(&key, &compressed_flag, b"", LIMIT),
        Err(CryptoError::AuthenticationFailed { .. })
    ));
}

#[test]
fn compression_is_used_when_it_pays_and_bounded_on_open() {
    let key = [4u8; 32];
    let text = b"forge vault ".repeat(10_000);
    let sealed = seal::seal(&key, &text, b"", Compression::WhenSmaller);
    assert!(seal::SealHeader::parse(&sealed).unwrap().is_compressed());
    assert!(sealed.len() < text.len() / 10);
    // A reader that expects at most 1 KiB refuses to inflate 120 KB.
    assert!(matches!(
        seal::open(&key, &sealed, b"", 1024),
        Err(CryptoError::Decompression { .. })
    ));
    assert_eq!(seal::open(&key, &sealed, b"", text.len()).unwrap(), text);

    let random: Vec<u8> = (0..65_536u32)
        .map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[0])
        .collect();
    let sealed = seal::seal(&key, &random, b"", Compression::WhenSmaller);
    assert!(
        !seal::SealHeader::parse(&sealed).unwrap().is_compressed(),
        "incompressible data is stored as is"
    );
}

#[test]
fn passphrase_protection_round_trips_and_refuses_wrong_passphrase_and_hostile_params() {
    let secret = b"the node's seeds";
    let protected =
        passphrase::protect(b"correct horse", secret, KdfParams::MINIMUM_FOR_TESTS).unwrap();
    assert_eq!(
        passphrase::unprotect(b"correct horse", &protected)
            .unwrap()
            .as_slice(),
        secret
    );
    assert!(matches!(
        passphrase::unprotect(b"wrong horse", &protected),
        Err(CryptoError::WrongPassphrase)
    ));
    assert_eq!(
        passphrase::read_params(&protected).unwrap(),
        KdfParams::MINIMUM_FOR_TESTS
    );
    // Salt is random: protecting twice gives different bytes.
    assert_ne!(
        protected,
        passphrase::protect(b"correct horse", secret, KdfParams::MINIMUM_FOR_TESTS).unwrap()
    );
    // Every byte is covered: header tampering is refused, ciphertext tampering too.
    for index in [0usize, 1, 2, 6, 10, 14, 30, 54, protected.len() - 1] {
        let mut tampered = protected.clone();
        tampered[index] ^= 0x01;
        assert!(
            passphrase::unprotect(b"correct horse", &tampered).is_err(),
            "byte {index}"
        );
    }
    // A header asking for 1 TiB of memory is refused before any allocation.
    let mut hostile = protected.clone();
    hostile[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        passphrase::unprotect(b"correct horse", &hostile),
        Err(CryptoError::InvalidKdfParams { .. })
    ));
    assert!(
        passphrase::protect(
            b"x",
            b"y",
            KdfParams {
                memory_kib: 8,
                iterations: 0,
                parallelism: 1
            }
        )
        .is_err()
    );
    assert!(matches!(
        passphrase::unprotect(b"x", &protected[..10]),
        Err(CryptoError::Truncated { .. })
    ));
}
