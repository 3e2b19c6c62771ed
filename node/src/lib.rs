//! forge-node: the vault, its mounts, the typed service over them, the daemon and the
//! `forge` command line. The layers, each using only those before it:
//!
//! - foundations: `datadir`, `config`, `error`, `output`, `progress`, `clock`,
//!   `passphrase`, `owner` (who owns a data directory);
//! - `vault`: the engine (volumes, import/export, snapshots, checks; no process concerns);
//! - `mount`: a volume as a file system (FUSE adapter, inodes, staging, commits);
//! - `service`: every operation once, typed; its client for the control socket;
//! - `daemon`: the process (host of mounts, control server, /metrics, signals) and `cli`:
//!   arguments, transport choice, rendering.

pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod datadir;
pub mod error;
pub mod lockstep;
pub mod mount;
pub mod output;
pub mod owner;
pub mod passphrase;
pub mod progress;
pub mod service;
pub mod vault;

#[cfg(test)]
mod test_support;

pub use error::{ExitCode, IntegrityFault, MountFault, NodeError, Result};
