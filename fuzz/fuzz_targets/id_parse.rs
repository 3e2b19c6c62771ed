//! Fuzzes cid and node-id parsing: a parsed id prints back to a form that parses to itself.
#![no_main]
use forge_crypto::{Cid, NodeId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cid) = Cid::parse(text) {
        assert_eq!(Cid::parse(&cid.to_hex()).expect("hex form parses"), cid);
        assert_eq!(Cid::parse(&cid.to_base32()).expect("base32 form parses"), cid);
    }
    let _ = NodeId::parse(text);
});
