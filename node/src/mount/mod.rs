//! A volume as a file system: a branch read-write, or a snapshot read-only, served through
//! FUSE (`fuser`, no libfuse). No process concerns here: the daemon's host
//! (`daemon/host.rs`) mounts, registers and unmounts these.
//!
//! Writes are staged in files under `<data-dir>/staging/`; a closed file is chunked into
//! the working tree (`fs/`); fsync also stores the working tree and records it
//! (`mountwork/` in the meta column), so the next mount of the branch after a crash
//! recovers every fsynced byte; unmount commits the working tree as a snapshot, to a new
//! branch `BRANCH-conflict-TIME` if the branch moved meanwhile (`working.rs`). File
//! contents: `content.rs`; per-request metrics: `requests.rs`.

pub mod content;
pub mod detector;
pub mod fs;
pub mod requests;
pub mod working;

use forge_crypto::Cid;

pub use working::{CommitOutcome, commit, nothing_to_commit, persist_working};

/// The working target of a read-write mount: the branch and the snapshot it builds on.
#[derive(Debug)]
pub struct WorkTarget {
    /// Branch being written (a conflict branch after the original moved).
    pub branch: String,
    /// Its head as this mount last saw or wrote it.
    pub base: Option<Cid>,
}
