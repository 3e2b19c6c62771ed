//! forge-consensus: metadata replication with openraft, one Raft group per volume group,
//! implementing forge-store's `MetadataStore`. Built by the cluster issue; until then the
//! crate pins its dependencies (openraft `=0.10.0-alpha.37`) so their build cost is known.
