//! Fuzzes a volume group's data-plane decoders (`/forge/shards/1`: bytes from any member).
//! Whatever decodes survives an encode-decode round trip unchanged; nothing panics.
#![no_main]
use forge_consensus::shards::{ShardReply, ShardRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ShardRequest::decode(data) {
        assert_eq!(ShardRequest::decode(&request.encode().unwrap()).unwrap(), request);
    }
    if let Ok(reply) = ShardReply::decode(data) {
        assert_eq!(ShardReply::decode(&reply.encode().unwrap()).unwrap(), reply);
    }
});
