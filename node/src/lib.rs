//! forge-node: the vault. Today: the data directory, the node's keys and the `forge` command
//! line; volumes, snapshots, mounts and the control socket build on these.

pub mod cli;
pub mod datadir;
pub mod error;
pub mod passphrase;

pub use error::{ExitCode, NodeError, Result};
