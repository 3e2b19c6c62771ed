//! A volume group's data plane (`/forge/shards/1`): the messages that move shard records
//! and objects between the group's members. Raft replicates a group's records (refs,
//! listings); chunks are too big for a log, so each chunk's k+m shard records go, by
//! placement, to k+m different members over this protocol, and objects (commits, trees,
//! index nodes: small, and needed to read anything) go to every member. The daemon
//! (`node/src/daemon/groups.rs`) drives it; the messages live here, beside the Raft
//! ones, so their decoders are fuzzed without the daemon.
//!
//! Every message is a format byte, then postcard; anything else is refused.

use forge_mesh::net::Protocol;
use serde::{Deserialize, Serialize};

/// Shards and objects between members of a volume group.
pub const SHARDS_PROTOCOL: Protocol = Protocol {
    name: "/forge/shards/1",
    max_request_bytes: 40 << 20,
    max_response_bytes: 40 << 20,
    inbound_queue: 64,
};

/// The most bytes of shard records and objects one `Put` carries (a sender splits larger
/// batches; well under the protocol's limit, so a batch always fits with its framing).
pub const PUT_BYTES_MAX: usize = 8 << 20;
/// The most chunks one `Get` or `Has` names.
pub const CIDS_PER_REQUEST_MAX: usize = 4_096;

/// One shard record for a member to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPut {
    /// The chunk.
    pub cid: [u8; 32],
    /// Which of its k+m shards.
    pub index: u16,
    /// The shard record (`forge_store::erasure::ShardRecord` encoding).
    #[serde(with = "forge_store::byte_fields")]
    pub record: Vec<u8>,
}

/// One object for a member to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectPut {
    /// Its cid (the receiver checks the bytes hash to it).
    pub cid: [u8; 32],
    /// The sealed object.
    #[serde(with = "forge_store::byte_fields")]
    pub bytes: Vec<u8>,
}

/// What one member's repair of its own shards found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairSummary {
    /// Chunks of the group's volumes looked at.
    pub chunks: u64,
    /// Shards this member owns (by placement) and holds after the run.
    pub held: u64,
    /// Shards it rebuilt from the others.
    pub rebuilt: u64,
    /// Their bytes.
    pub rebuilt_bytes: u64,
    /// Shards it held for an absent owner, dropped once the owner held them.
    pub released: u64,
    /// Shards it owns and could not rebuild (too few others answered).
    pub backlog: u64,
    /// Objects it lacked and fetched.
    pub objects_fetched: u64,
}

/// A member's request to another member of volume group `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardRequest {
    /// Keep these shards and objects; answer once they are durable.
    Put {
        /// The volume group (the receiver checks the sender is in it).
        group: u64,
        /// Shard records.
        shards: Vec<ShardPut>,
        /// Objects.
        objects: Vec<ObjectPut>,
    },
    /// Every shard record held of each chunk.
    Get {
        /// The volume group.
        group: u64,
        /// The chunks.
        cids: Vec<[u8; 32]>,
    },
    /// Which shards of each chunk are held.
    Has {
        /// The volume group.
        group: u64,
        /// The chunks.
        cids: Vec<[u8; 32]>,
    },
    /// Run your repair now and report (`forge group repair`).
    Repair {
        /// The volume group.
        group: u64,
    },
    /// Sweep your copy of the group's data: delete what the group's volumes no longer
    /// reach (the group's gc epoch must be `epoch`, odd: the sweep the asker opened).
    Sweep {
        /// The volume group.
        group: u64,
        /// The sweep's gc epoch.
        epoch: u64,
    },
    /// The sealed bytes of each object held (a member that was away fetches what was
    /// published meanwhile).
    Objects {
        /// The volume group.
        group: u64,
        /// The objects.
        cids: Vec<[u8; 32]>,
    },
}

impl ShardRequest {
    /// The volume group the request is for.
    #[must_use]
    pub fn group(&self) -> u64 {
        match self {
            Self::Put { group, .. }
            | Self::Get { group, .. }
            | Self::Has { group, .. }
            | Self::Objects { group, .. }
            | Self::Repair { group }
            | Self::Sweep { group, .. } => *group,
        }
    }
}

/// The shards held of one chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldShards {
    /// The chunk.
    pub cid: [u8; 32],
    /// (shard index, record).
    pub shards: Vec<(u16, Vec<u8>)>,
}

/// The answer to a [`ShardRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardReply {
    /// Everything in the `Put` is durable here (counts stored anew; the rest was held).
    Stored {
        /// Shard records written.
        shards: u32,
        /// Objects written.
        objects: u32,
    },
    /// For a `Get`: the records held, one entry per chunk asked for, in order.
    Shards(Vec<HeldShards>),
    /// For a `Has`: the shard indexes held of each chunk asked for, in order.
    Held(Vec<Vec<u16>>),
    /// For an `Objects`: each object asked for, in order (None: not held).
    Objects(Vec<Option<Vec<u8>>>),
    /// For a `Repair`: what the member's repair did.
    Repaired(RepairSummary),
    /// For a `Sweep`: chunks and objects deleted, and their bytes.
    Swept {
        /// Chunks whose shards were deleted here.
        chunks: u64,
        /// Objects deleted here.
        objects: u64,
        /// Bytes of shard records and objects deleted.
        bytes: u64,
    },
}

codec!(ShardRequest, "a shard request");
codec!(ShardReply, "a shard reply");

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let put = ShardRequest::Put {
            group: 3,
            shards: vec![ShardPut {
                cid: [5; 32],
                index: 2,
                record: vec![1, 2, 3],
            }],
            objects: vec![ObjectPut {
                cid: [6; 32],
                bytes: vec![9; 10],
            }],
        };
        let bytes = put.encode().unwrap();
        assert_eq!(ShardRequest::decode(&bytes).unwrap(), put);
        assert_eq!(put.group(), 3);
        for cut in 0..bytes.len() {
            assert!(ShardRequest::decode(&bytes[..cut]).is_err());
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(ShardRequest::decode(&trailing).is_err());
        let reply = ShardReply::Shards(vec![HeldShards {
            cid: [1; 32],
            shards: vec![(0, vec![4; 8])],
        }]);
        assert_eq!(ShardReply::decode(&reply.encode().unwrap()).unwrap(), reply);
        assert!(ShardReply::decode(&[2, 0]).is_err(), "another format");
    }
}
