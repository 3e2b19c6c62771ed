//! Fuzzes the reference-index node decoder (the plaintext a keyless vault reads from
//! peers): arbitrary bytes give an error or a node that encodes back to them. Never a panic.
#![no_main]
use forge_crypto::Cid;
use forge_store::refindex::Node;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Under its true id (so the content checks run) and under a wrong one.
    if let Ok(node) = Node::decode(&Cid::of(data), data) {
        assert_eq!(node.encode(), data, "a decoded node re-encodes to its bytes");
    }
    assert!(Node::decode(&Cid::of(b"another id"), data).is_err() || Cid::of(data) == Cid::of(b"another id"));
});
