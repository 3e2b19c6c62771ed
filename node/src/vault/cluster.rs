//! This vault's place in a cluster, as it keeps it locally: which peers may join the
//! cluster through it (`forge peer trust NODE --cluster`), and whether it is a member
//! (then the daemon runs the cluster's Raft group, and the volume groups it is in, at
//! start). What the cluster agrees on (members, groups) lives in the cluster group's
//! replicated records: see `daemon/cluster.rs`.

use forge_crypto::NodeId;
use forge_store::metadata::{Change, Expected, RecordSpace, RecordUpdate};
use serde::{Deserialize, Serialize};

use super::{Vault, records};
use crate::error::Result;

/// Peers that may join the cluster through this node: key = NodeId, value = when.
pub const CLUSTER_TRUST: RecordSpace = RecordSpace::new("cluster-trust");
/// This node's membership: key `membership`, value = [`ClusterMembership`].
pub const CLUSTER: RecordSpace = RecordSpace::new("cluster");

const MEMBERSHIP_KEY: &[u8] = b"membership";

/// That this node is in a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMembership {
    /// When it formed or joined it, ns since the epoch.
    pub since_ns: i64,
    /// The member it joined through (None: it formed the cluster).
    pub through: Option<[u8; 32]>,
}

impl Vault {
    /// Lets `node` join this node's cluster through it (or stops letting it).
    ///
    /// # Errors
    /// Metadata errors.
    pub fn set_cluster_trust(&self, node: &NodeId, trusted: bool) -> Result<()> {
        let change = if trusted {
            Change::Put(self.now_ns().to_be_bytes().to_vec())
        } else {
            Change::Delete
        };
        self.refs().apply(&[RecordUpdate::new(
            CLUSTER_TRUST,
            node.as_bytes().to_vec(),
            Expected::Any,
            change,
        )])?;
        Ok(())
    }

    /// Whether `node` may join the cluster through this node.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn cluster_trusted(&self, node: &NodeId) -> Result<bool> {
        Ok(self
            .refs()
            .get_record(CLUSTER_TRUST, node.as_bytes())?
            .is_some())
    }

    /// This node's cluster membership, if any.
    ///
    /// # Errors
    /// Metadata errors, a corrupt record.
    pub fn cluster_membership(&self) -> Result<Option<ClusterMembership>> {
        self.refs()
            .get_record(CLUSTER, MEMBERSHIP_KEY)?
            .map(|value| records::decode("cluster membership", &value))
            .transpose()
    }

    /// Records (Some) or forgets (None) this node's cluster membership.
    ///
    /// # Errors
    /// Metadata errors.
    pub fn set_cluster_membership(&self, membership: Option<&ClusterMembership>) -> Result<()> {
        let change = match membership {
            Some(membership) => Change::Put(records::encode(membership)),
            None => Change::Delete,
        };
        self.refs().apply(&[RecordUpdate::new(
            CLUSTER,
            MEMBERSHIP_KEY.to_vec(),
            Expected::Any,
            change,
        )])?;
        Ok(())
    }
}
