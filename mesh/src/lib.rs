//! forge-mesh: how vaults reach each other.
//!
//! - [`net`]: the `PeerNet` trait, the one door to other nodes (request/response with
//!   deadlines, size caps and bounded inbound queues), and its errors;
//! - [`memory`]: the in-process implementation (many nodes in one process, seeded loss,
//!   delay, duplication, corruption, partitions) for tests and the simulator;
//! - [`hello`]: the certificate binding a transport key to a node's ML-DSA-65 identity and
//!   the replay-proof Hello exchanged on every connection (sans-IO);
//! - [`audit`]: storage audits (random byte ranges of chunks, proved with BLAKE3 verified
//!   streaming against their cids, without downloading them);
//! - [`announce`]: signed announcements of new heads (Announcement domain), sent to
//!   followers over `PeerNet`, taken only from trusted authors and only when newer;
//! - [`proof`]: transfer receipts (signed by the receiver, countersigned by the sender)
//!   and proof files anyone can verify offline;
//! - [`sync`]: the sender's walk of a reference index (sans-IO): asks what the receiver
//!   holds, sends only what it lacks, index nodes only after their subtrees.
//!
//! [`quic`] is the production implementation (libp2p over QUIC, with the Hello on every
//! connection). It sits behind the `libp2p` feature, so crates that only
//! need the trait (consensus, the simulator) do not build libp2p.

pub mod announce;
pub mod audit;
pub mod blocking;
mod bytes;
pub mod hello;
pub mod memory;
pub mod net;
pub mod proof;
#[cfg(feature = "libp2p")]
pub mod quic;
pub mod sync;

pub use hello::{Certificate, Handshake, VerifiedPeer};
pub use memory::{FaultPlan, MemoryNetwork, MemoryPeer, NetStats};
pub use net::{
    Answer, BoxFuture, Gossip, Inbound, InboundRequest, MeshError, PeerNet, Protocol, Subscription,
};
pub use proof::{Receipt, TransferProof};
