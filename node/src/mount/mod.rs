//! `forge volume mount` and `unmount`: a volume's branch read-write, or a snapshot
//! read-only, as a FUSE file system (through `fuser`, no libfuse).
//!
//! The mount process owns the data directory for as long as it runs. Writes are staged in
//! files under `<data-dir>/staging/`; a closed file is chunked into the working tree; fsync
//! also stores the working tree and records it (`mountwork/` in the meta column), so the
//! next mount of the branch after a crash recovers every fsynced byte. Unmount commits the
//! working tree as a snapshot; if the branch moved meanwhile, to a new branch
//! `BRANCH-conflict-TIME`. Each running mount is registered in `<data-dir>/mounts/PID.json`
//! so `unmount` finds its process and a second read-write mount of a branch is refused.

pub mod content;
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
