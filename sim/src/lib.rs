//! forge-sim: deterministic simulation of many vaults (turmoil hosts, simulated `PeerNet`,
//! in-memory disks with a crash model, fault injection, invariant checks, seed replay).
//! Built with the cluster issue; see ../shared/notes/simulation.md for the plan.
