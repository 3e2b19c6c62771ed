//! forge-consensus: metadata replicated with openraft, one Raft group per volume group and
//! many groups per process (multi-raft), sharing one `KvEngine` and one `PeerNet`.
//!
//! - [`KvLogStore`]: a group's log and vote on the engine, fsyncs batched by one
//!   [`Syncer`](forge_store::kv::Syncer) for every group.
//! - [`KvStateMachine`]: a group's records, changed by all-or-nothing multi-record
//!   compare-and-swap commands; snapshots from a point-in-time view of the engine.
//! - [`network`]: Raft's messages over `PeerNet` (`/forge/raft/2`), one protocol for every
//!   group; followers forward writes and reads to the leader.
//! - [`GroupHandle`]: start, form, write, read linearizably, change members, status.
//!
//! Every openraft type stays inside this crate (its alpha API moves between releases).

/// `encode`/`decode` for a message or record: a format byte, then postcard.
macro_rules! codec {
    ($type:ty, $what:literal) => {
        impl $type {
            /// Its bytes: a format byte, then postcard.
            ///
            /// # Errors
            /// None in practice (postcard encodes every value of it).
            pub fn encode(&self) -> Result<Vec<u8>, crate::ConsensusError> {
                crate::keys::encode(self)
                    .map_err(|error| crate::ConsensusError::Malformed(error.to_string()))
            }

            /// Decodes what [`Self::encode`] wrote.
            ///
            /// # Errors
            /// Another format, or bytes that do not decode.
            pub fn decode(bytes: &[u8]) -> Result<Self, crate::ConsensusError> {
                crate::keys::decode(bytes, $what)
                    .map_err(|error| crate::ConsensusError::Malformed(error.to_string()))
            }
        }
    };
}

pub mod cluster;
mod error;
mod group;
pub mod history;
mod keys;
mod log_store;
pub mod network;
mod runtime;
pub mod shards;
mod state_machine;
mod types;

pub use error::ConsensusError;
pub use group::{GroupHandle, GroupOptions, GroupStatus};
pub use log_store::KvLogStore;
pub use network::{GroupTable, RAFT_PROTOCOL, serve_raft};
pub use runtime::seeded;
pub use state_machine::{KvStateMachine, ReplicaState};
pub use types::{CLUSTER_GROUP, GroupId, Member, raft_id};
