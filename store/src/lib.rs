//! forge-store: the storage vocabulary every other crate shares.
//!
//! The shared identifiers; the `KvEngine` storage seam with RocksDB and an in-memory engine
//! that models crashes; the FastCDC chunker; the Reed-Solomon erasure coder and its shard
//! records; rendezvous placement. The object model, the reference index and the
//! `MetadataStore` trait arrive with the rest of the single-node vault (ARCHITECTURE.md).

pub mod chunker;
pub mod erasure;
pub mod ids;
pub mod kv;
pub mod placement;

pub use forge_crypto::{Cid, NodeId};
pub use ids::{IdError, ShardIdx, VolumeId};
pub use kv::{Column, Durability, KvEngine, KvError, MemKv, RocksKv, WriteBatch};
