//! Fuzzes the Hello and certificate decoders (the first bytes a connection carries):
//! arbitrary bytes are refused with an error, never a panic. (A valid signature cannot be
//! forged by the fuzzer, so nothing is ever accepted.)
#![no_main]
use std::sync::OnceLock;

use forge_crypto::{NodeIdentity, NodeSecrets};
use forge_mesh::hello::{Certificate, Handshake};
use libfuzzer_sys::fuzz_target;

fn handshake() -> &'static Handshake {
    static HANDSHAKE: OnceLock<Handshake> = OnceLock::new();
    HANDSHAKE.get_or_init(|| {
        let identity = NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([7; 128]));
        let certificate = Certificate::issue(&identity, b"local", 0).expect("issue");
        Handshake::new(&certificate, b"local", b"remote", [1; 32]).expect("handshake")
    })
}

fuzz_target!(|data: &[u8]| {
    assert!(handshake().verify(data).is_err());
    assert!(Certificate::decode_verified(data).is_err());
});
