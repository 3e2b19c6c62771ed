//! Fuzzes the cluster's decoders: the joining protocol's messages (`/forge/cluster/1`,
//! bytes from any peer) and the records the cluster group replicates. Whatever decodes
//! survives an encode-decode round trip unchanged (postcard also reads overlong varints,
//! so the bytes themselves need not come back); trailing garbage is refused; nothing
//! panics.
#![no_main]
use forge_consensus::cluster::{ClusterReply, ClusterRequest, GroupRecord, MemberRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = ClusterRequest::decode(data) {
        assert_eq!(ClusterRequest::decode(&request.encode().unwrap()).unwrap(), request);
    }
    if let Ok(reply) = ClusterReply::decode(data) {
        assert_eq!(ClusterReply::decode(&reply.encode().unwrap()).unwrap(), reply);
    }
    if let Ok(group) = GroupRecord::decode(data) {
        assert_eq!(GroupRecord::decode(&group.encode().unwrap()).unwrap(), group);
    }
    let _ = MemberRecord::decode(data);
});
