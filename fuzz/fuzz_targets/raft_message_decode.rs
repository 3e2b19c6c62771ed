//! Fuzzes the Raft protocol's decoders (`/forge/raft/1`: bytes from any cluster member):
//! a request (group and message) and a reply. Arbitrary bytes give an error or a message;
//! never a panic, never an allocation the input does not pay for.
#![no_main]
use forge_consensus::network::{decode_reply, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_request(data);
    let _ = decode_reply(data);
});
