//! Fuzzes key-envelope parsing and unwrapping with a fixed recipient: errors only, no panic.
#![no_main]
use std::sync::OnceLock;

use forge_crypto::{envelope, EnvelopeHeader, NodeIdentity, NodeSecrets};
use libfuzzer_sys::fuzz_target;

fn recipient() -> &'static NodeIdentity {
    static RECIPIENT: OnceLock<NodeIdentity> = OnceLock::new();
    RECIPIENT.get_or_init(|| NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([7; 128])))
}

fuzz_target!(|data: &[u8]| {
    let _ = EnvelopeHeader::parse(data);
    let _ = envelope::unwrap(recipient(), data, b"fuzz");
});
