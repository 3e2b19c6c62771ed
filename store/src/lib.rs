//! forge-store: the storage vocabulary every other crate shares.
//!
//! The shared identifiers; the `KvEngine` storage seam with RocksDB and an in-memory engine
//! that models crashes; the FastCDC chunker; the Reed-Solomon erasure coder and its shard
//! records and the chunk store built on them; rendezvous placement; the object model and its
//! codec; the `MetadataStore` trait (refs by compare-and-swap) and its local implementation.

pub mod chunker;
pub mod chunkstore;
pub mod erasure;
pub mod ids;
pub mod kv;
pub mod metadata;
pub mod object;
pub mod placement;
pub mod refindex;

pub use forge_crypto::{Cid, NodeId};
pub use ids::{IdError, ShardIdx, VolumeId};
#[cfg(feature = "rocksdb")]
pub use kv::RocksKv;
pub use kv::{Column, Durability, KvEngine, KvError, MemKv, WriteBatch};
