//! The one error type of forge-consensus.

use forge_mesh::net::MeshError;

/// What went wrong in a Raft group, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsensusError {
    /// A record did not hold what the update expected: nothing was applied.
    #[error("record {space}/{} changed meanwhile; nothing was applied", hex(.key))]
    Conflict {
        /// Its space.
        space: String,
        /// Its key.
        key: Vec<u8>,
    },
    /// No leader is known or reachable: the group has no quorum now (a partition, or
    /// too many members down). Retry when members are back.
    #[error("group {group} has no reachable leader (no quorum?): retry once members are back")]
    NoLeader {
        /// The group.
        group: u64,
    },
    /// The write was in flight when the leader changed: it may or may not have been
    /// applied. Read the record before retrying.
    #[error(
        "a leader change in group {group} interrupted the write: it may or may not have been applied; read before retrying"
    )]
    Unknown {
        /// The group.
        group: u64,
    },
    /// Two nodes whose Raft ids (the first 8 bytes of their NodeIds) are the same.
    #[error("node {node} cannot join: its Raft id collides with member {other}'s")]
    IdCollision {
        /// The joining node.
        node: String,
        /// The member.
        other: String,
    },
    /// A group id that cannot be used.
    #[error("group id {group} is reserved")]
    InvalidGroup {
        /// The id.
        group: u64,
    },
    /// The network failed.
    #[error(transparent)]
    Network(#[from] MeshError),
    /// Storage failed, or stored state does not decode.
    #[error("group storage: {0}")]
    Storage(#[from] std::io::Error),
    /// A cluster record or message that does not decode (its own message says what).
    #[error("{0}")]
    Malformed(String),
    /// Raft itself refused or failed (its message).
    #[error("raft: {detail}")]
    Raft {
        /// What openraft said.
        detail: String,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
