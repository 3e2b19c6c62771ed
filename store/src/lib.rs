//! forge-store: the storage vocabulary every other crate shares.
//!
//! The shared identifiers; the `KvEngine` storage seam with RocksDB and an in-memory engine
//! that models crashes; the FastCDC chunker; the Reed-Solomon erasure coder and its shard
//! records and the chunk store built on them; rendezvous placement; the object model and its
//! codec; the `MetadataStore` trait (refs by compare-and-swap) and its local implementation.

pub mod byte_fields;
pub mod chunker;
pub mod chunkstore;
pub mod contract;
pub mod erasure;
#[cfg(feature = "simulation")]
pub mod faults;
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

/// Whether bug `name` is switched on: `false`, always, unless the calling crate is built
/// for simulation (its `simulation` feature, which turns on forge-store's).
#[macro_export]
macro_rules! injected_bug {
    ($name:literal) => {{
        #[cfg(feature = "simulation")]
        let active = $crate::faults::active($name);
        #[cfg(not(feature = "simulation"))]
        let active = false;
        active
    }};
}

/// Whether fault point `name` fires now (see `faults::points`): `false`, always, unless
/// the calling crate is built for simulation.
#[macro_export]
macro_rules! fault_point {
    ($name:literal) => {{
        #[cfg(feature = "simulation")]
        let fires = $crate::faults::points::fire($name);
        #[cfg(not(feature = "simulation"))]
        let fires = false;
        fires
    }};
}
