//! What the cluster group (group 0) records, and the joining protocol's messages
//! (`/forge/cluster/1`). The daemon (`node/src/daemon/cluster.rs`) drives them; they live
//! here, beside the Raft types, so their decoders are fuzzed without the daemon.
//!
//! Every value is a format byte, then postcard ([`crate::keys`]); anything else is an
//! error naming what did not decode.

use forge_mesh::net::Protocol;
use serde::{Deserialize, Serialize};

/// The record space of members: key = NodeId, value = [`MemberRecord`].
pub const MEMBERS: &str = "members";
/// The record space of volume groups: key = name, value = [`GroupRecord`].
pub const GROUPS: &str = "groups";
/// The record space of the next group id: key `next`, value = u64 big-endian.
pub const GROUP_IDS: &str = "group-ids";

/// Joining: asking a member for the member list, then to be added.
pub const CLUSTER_PROTOCOL: Protocol = Protocol {
    name: "/forge/cluster/1",
    max_request_bytes: 64 << 10,
    max_response_bytes: 1 << 20,
    inbound_queue: 16,
};

/// A member, as the cluster group records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Where it listens.
    pub addresses: Vec<String>,
    /// When it joined, ns since the epoch.
    pub joined_ns: i64,
    /// Its public keys (`NodePublicKeys` encoding; their ML-DSA key hashes to the member's
    /// NodeId, checked by whoever uses them): what a group volume's keys are wrapped to.
    pub keys: Vec<u8>,
}

/// A volume group, as the cluster group records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Its Raft group id.
    pub id: u64,
    /// Data shards per chunk.
    pub data_shards: u32,
    /// Parity shards per chunk.
    pub parity_shards: u32,
    /// The members that run it (and that placement puts shards on).
    pub nodes: Vec<[u8; 32]>,
    /// The members it was created on: the lowest of them forms its Raft group (a member
    /// added later never does, even with a lower NodeId).
    pub founders: Vec<[u8; 32]>,
    /// Members being removed: out of placement, still read from (and still in the Raft
    /// group) until every shard they held has a new owner.
    pub retiring: Vec<[u8; 32]>,
}

/// A joiner's request to a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterRequest {
    /// The members' NodeIds (whose Raft messages the joiner must accept).
    Members,
    /// Add the asker, reachable at these addresses.
    Join {
        /// Its listen addresses.
        addresses: Vec<String>,
        /// Its public keys (`NodePublicKeys` encoding), for the member record.
        keys: Vec<u8>,
    },
}

/// A member's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterReply {
    /// The members' NodeIds.
    Members(Vec<[u8; 32]>),
    /// The asker was added (a voter once it caught up).
    Joined,
}

codec!(MemberRecord, "a cluster member record");
codec!(GroupRecord, "a volume group record");
codec!(ClusterRequest, "a cluster request");
codec!(ClusterReply, "a cluster reply");

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn records_and_messages_round_trip_and_garbage_is_refused() {
        let group = GroupRecord {
            id: 7,
            data_shards: 4,
            parity_shards: 2,
            nodes: vec![[1; 32], [2; 32]],
            founders: vec![[1; 32]],
            retiring: vec![[3; 32]],
        };
        assert_eq!(
            GroupRecord::decode(&group.encode().unwrap()).unwrap(),
            group
        );
        let join = ClusterRequest::Join {
            addresses: vec!["/ip4/127.0.0.1/udp/1/quic-v1".into()],
            keys: vec![7; 40],
        };
        let bytes = join.encode().unwrap();
        assert_eq!(ClusterRequest::decode(&bytes).unwrap(), join);
        for cut in 0..bytes.len() {
            assert!(ClusterRequest::decode(&bytes[..cut]).is_err());
        }
        assert!(ClusterReply::decode(&[9, 0]).is_err());
        assert!(MemberRecord::decode(b"").is_err());
    }
}
