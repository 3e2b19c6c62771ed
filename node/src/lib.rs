//! forge-node: the vault (data directory, node keys, volumes, import/export, snapshots,
//! statistics) and the `forge` command line. Mounts and the control socket come next.

pub mod cli;
pub mod clock;
pub mod datadir;
pub mod error;
pub mod passphrase;
pub mod progress;
pub mod vault;

pub use error::{ExitCode, NodeError, Result};
