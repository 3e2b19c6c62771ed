//! Fuzzes the announcement decoder (what any peer may send a follower): arbitrary bytes
//! never panic, neither reading the claimed author nor verifying; nothing is accepted (a
//! valid signature cannot be forged by the fuzzer).
#![no_main]
use std::sync::OnceLock;

use forge_crypto::{NodeIdentity, NodePublicKeys, NodeSecrets};
use forge_mesh::announce::Announcement;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static NodePublicKeys {
    static KEYS: OnceLock<NodePublicKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([7; 128]))
            .public_keys()
            .clone()
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = Announcement::claimed_author(data);
    assert!(Announcement::decode_verified(data, keys()).is_err());
});
