//! forge-mesh: how vaults reach each other.
//!
//! - [`net`]: the `PeerNet` trait, the one door to other nodes (request/response with
//!   deadlines, size caps and bounded inbound queues), and its errors;
//! - [`memory`]: the in-process implementation (many nodes in one process, seeded loss,
//!   delay, duplication, corruption, partitions) for tests and the simulator;
//! - [`hello`]: the certificate binding a transport key to a node's ML-DSA-65 identity and
//!   the replay-proof Hello exchanged on every connection (sans-IO);
//! - [`sync`]: the sender's walk of a reference index (sans-IO): asks what the receiver
//!   holds, sends only what it lacks, index nodes only after their subtrees.
//!
//! The libp2p (QUIC) implementation sits behind the `libp2p` feature, so crates that only
//! need the trait (consensus, the simulator) do not build libp2p.

pub mod hello;
pub mod memory;
pub mod net;
pub mod sync;

pub use hello::{Certificate, Handshake, VerifiedPeer};
pub use memory::{FaultPlan, MemoryNetwork, MemoryPeer, NetStats};
pub use net::{Answer, BoxFuture, Inbound, InboundRequest, MeshError, PeerNet, Protocol};
