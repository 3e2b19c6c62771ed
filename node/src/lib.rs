//! forge-node: the vault (data directory, node keys, volumes, import/export, snapshots,
//! statistics), FUSE mounts, and the `forge` command line.

pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datadir;
pub mod error;
pub mod metrics;
pub mod mount;
pub mod output;
pub mod passphrase;
pub mod progress;
pub mod service;
pub mod vault;

#[cfg(test)]
mod test_support;

pub use error::{ExitCode, IntegrityFault, MountFault, NodeError, Result};
