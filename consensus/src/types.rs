//! The Raft type configuration and what a group's log carries. Every openraft type stays
//! inside this crate: its alpha API changes between releases.

use std::fmt;

use forge_crypto::NodeId;
use forge_store::metadata::{Change, Expected, RecordUpdate};
use serde::{Deserialize, Serialize};

/// A volume group's number: 0 is the cluster group (membership, node keys, the group
/// registry); every volume group has its own.
pub type GroupId = u64;

/// The cluster-wide group.
pub const CLUSTER_GROUP: GroupId = 0;

/// A member as Raft knows it: the vault node it is, by NodeId (reached over `PeerNet`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's 32-byte NodeId.
    pub node: [u8; 32],
}

impl Member {
    /// The member that is `node`.
    #[must_use]
    pub fn of(node: &NodeId) -> Self {
        Self {
            node: *node.as_bytes(),
        }
    }

    /// Its NodeId.
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        NodeId::from_bytes(self.node)
    }
}

/// The Raft id of a node: the first 8 bytes of its NodeId (a joining node whose id
/// collides with a member's is refused, see [`crate::GroupHandle::add_member`]).
#[must_use]
pub fn raft_id(node: &NodeId) -> u64 {
    let bytes = node.as_bytes();
    u64::from_be_bytes([
        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
    ])
}

/// What must hold of a record (mirrors [`Expected`], with owned data for the log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// Anything, or nothing.
    Any,
    /// Nothing.
    Absent,
    /// Exactly these bytes.
    Value(#[serde(with = "forge_store::byte_fields")] Vec<u8>),
}

/// What happens to a record (mirrors [`Change`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Write {
    /// Nothing: a pure condition.
    Keep,
    /// Store these bytes.
    Put(#[serde(with = "forge_store::byte_fields")] Vec<u8>),
    /// Remove it.
    Delete,
}

/// One record's condition and change, as the log carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The record space's name.
    pub space: String,
    /// The key within it.
    #[serde(with = "forge_store::byte_fields")]
    pub key: Vec<u8>,
    /// What it must hold.
    pub expect: Expect,
    /// What happens to it.
    pub write: Write,
}

impl From<&RecordUpdate> for Update {
    fn from(update: &RecordUpdate) -> Self {
        Self {
            space: update.space.name().to_owned(),
            key: update.key.clone(),
            expect: match &update.expected {
                Expected::Any => Expect::Any,
                Expected::Absent => Expect::Absent,
                Expected::Value(value) => Expect::Value(value.clone()),
            },
            write: match &update.change {
                Change::Keep => Write::Keep,
                Change::Put(value) => Write::Put(value.clone()),
                Change::Delete => Write::Delete,
            },
        }
    }
}

/// An entry of a group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Every update, if every condition holds; otherwise nothing.
    Apply(Vec<Update>),
}

impl fmt::Display for Command {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Apply(updates) => write!(formatter, "apply {} update(s)", updates.len()),
        }
    }
}

/// How a command ended when applied (the same on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Not a command (a blank or membership entry).
    None,
    /// Applied whole.
    Applied,
    /// The first record that did not hold what was expected: nothing applied.
    Conflict {
        /// Its space.
        space: String,
        /// Its key.
        #[serde(with = "forge_store::byte_fields")]
        key: Vec<u8>,
    },
}

openraft::declare_raft_types!(
    /// The Raft types of every forge group.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = u64,
        Node = Member,
        AsyncRuntime = crate::runtime::ForgeRuntime,
);

/// A group's Raft instance.
pub type Raft = openraft::Raft<TypeConfig, crate::state_machine::KvStateMachine>;
