//! forge-mesh: the libp2p (QUIC) swarm, gossip of snapshot heads, the production `PeerNet`,
//! and the sync protocol as a sans-IO state machine with its driver. Built by the sync issue;
//! until then the crate pins its dependencies so their build cost is known.
