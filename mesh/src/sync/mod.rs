//! Sync between vaults: the sans-IO pieces (the sender's index walk) and, with the driver,
//! the protocol that moves chunks, objects, index nodes and heads.

pub mod session;
pub mod walker;
pub mod wire;

pub use session::{PushConfig, PushReport, SYNC_PROTOCOL, SyncStore, push, serve_sync};
pub use walker::{Item, Step, SyncWalker, WalkStats};
pub use wire::{DataKind, Message, PutOutcome};
