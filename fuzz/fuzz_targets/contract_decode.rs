//! Fuzzes the contract decoders (`VolumeContract::decode`, `SignedContract::decode`):
//! what decodes passes its own validation and re-encodes to the same bytes. Never a panic.
#![no_main]
use forge_store::contract::{SignedContract, VolumeContract};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    check(data);
    // Past the headers too, so the fuzzer spends its time in the bodies.
    for header in [b"FK\x01c", b"FK\x01s"] {
        check(&[header.as_slice(), data].concat());
    }
});

fn check(data: &[u8]) {
    if let Ok(contract) = VolumeContract::decode(data) {
        contract.validate().expect("a decoded contract is valid");
        assert_eq!(contract.encode(), data, "one encoding per contract");
    }
    if let Ok((signed, contract)) = SignedContract::decode(data) {
        assert_eq!(VolumeContract::decode(&signed.contract).expect("inner decodes"), contract);
        assert_eq!(signed.encode(), data, "one encoding per signed contract");
    }
}
