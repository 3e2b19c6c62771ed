//! Fuzzes the node-secrets and node-public-keys decoders: decode then re-encode must give
//! back the same bytes whenever decoding succeeds.
#![no_main]
use forge_crypto::{NodePublicKeys, NodeSecrets};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(secrets) = NodeSecrets::decode(data) {
        assert_eq!(secrets.encode().as_slice(), data);
    }
    if let Ok(keys) = NodePublicKeys::decode(data) {
        assert_eq!(keys.encode(), data);
    }
});
