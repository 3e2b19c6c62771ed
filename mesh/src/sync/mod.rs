//! Sync between vaults: the sans-IO pieces (the sender's index walk) and, with the driver,
//! the protocol that moves chunks, objects, index nodes and heads.

pub mod offer;
pub mod session;
pub mod transfer;
pub mod walker;
pub mod wire;

pub use offer::{DomainInfo, Offer, RefMove, SnapshotEntry, ancestors, index_head_message};
pub use session::{
    ProgressFn, PushConfig, PushReport, SYNC_PROTOCOL, SyncStore, push, push_with_progress,
    serve_sync, serve_sync_resolved,
};
pub use transfer::{
    Incoming, Outgoing, Published, TransferConfig, TransferSummary, VOLUME_PROTOCOL, VolumeHost,
    VolumeMessage, follow_volume, pull_volume, send_volume, serve_volumes,
};
pub use walker::{Item, Step, SyncWalker, WalkStats};
pub use wire::{DataKind, Message, PutOutcome};
