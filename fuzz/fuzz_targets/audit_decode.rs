//! Fuzzes the audit protocol's decoders (bytes from any peer): a challenge, and an answer
//! checked against a fixed challenge. Arbitrary bytes give an error, a challenge that
//! encodes back to exactly them, or verdicts (a bad proof is a failed sample); never a
//! panic.
#![no_main]
use forge_crypto::Cid;
use forge_mesh::audit::{Sample, check, decode_request, encode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(samples) = decode_request(data) {
        assert_eq!(encode_request(&samples), data, "a decoded challenge re-encodes to its bytes");
    }
    let asked = [
        Sample { cid: Cid::of(b"one"), first_kib: 0, kib: 1 },
        Sample { cid: Cid::of(b"two"), first_kib: 3, kib: 2 },
    ];
    if let Ok(verdicts) = check(&asked, data) {
        assert_eq!(verdicts.len(), asked.len());
    }
});
