//! Placement: which node holds shard i of a chunk. A pure function (rendezvous hashing over
//! the group's members), so every node computes the same answer with no coordination, and a
//! membership change moves only the shards whose best node changed.

use forge_crypto::{Cid, NodeId};

/// The node for each of a chunk's `shard_count` shards, in shard order.
///
/// Members are ranked by BLAKE3(cid || node id), highest first; shard i goes to the i-th
/// ranked member, wrapping around when the group is smaller than the layout (then some
/// nodes hold several shards of one chunk, as on a single node). Returns an empty list
/// for an empty group.
#[must_use]
pub fn place_shards(cid: &Cid, shard_count: usize, members: &[NodeId]) -> Vec<NodeId> {
    if members.is_empty() {
        return Vec::new();
    }
    let mut ranked: Vec<([u8; 32], NodeId)> = members
        .iter()
        .map(|member| {
            let mut hasher =
                blake3::Hasher::new_derive_key("forge-vault 2026 v1 rendezvous placement");
            hasher.update(cid.as_bytes());
            hasher.update(member.as_bytes());
            (*hasher.finalize().as_bytes(), *member)
        })
        .collect();
    // Highest score first; ties (duplicate members) broken by node id for determinism.
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    (0..shard_count)
        .map(|index| ranked[index % ranked.len()].1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(index: u8) -> NodeId {
        NodeId::from_bytes(*blake3::hash(&[index]).as_bytes())
    }

    #[test]
    fn distinct_nodes_when_the_group_is_large_enough_and_stable_under_reordering() {
        let members: Vec<NodeId> = (0..8).map(node).collect();
        let cid = Cid::of(b"chunk");
        let placed = place_shards(&cid, 6, &members);
        let distinct: std::collections::BTreeSet<_> = placed.iter().collect();
        assert_eq!(distinct.len(), 6);
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(place_shards(&cid, 6, &reversed), placed);
        assert_eq!(place_shards(&cid, 3, &[node(1)]), vec![node(1); 3]);
        assert!(place_shards(&cid, 3, &[]).is_empty());
    }

    #[test]
    fn removing_a_member_only_moves_its_shards() {
        let members: Vec<NodeId> = (0..10).map(node).collect();
        let without: Vec<NodeId> = members
            .iter()
            .copied()
            .filter(|member| *member != node(3))
            .collect();
        let mut moved = 0;
        for index in 0..500u32 {
            let cid = Cid::of(&index.to_le_bytes());
            let before = place_shards(&cid, 1, &members)[0];
            let after = place_shards(&cid, 1, &without)[0];
            if before != node(3) {
                assert_eq!(before, after, "a shard not on the removed node stayed put");
            } else {
                moved += 1;
            }
        }
        assert!(
            (20..=80).contains(&moved),
            "about a tenth of 500 were on node 3: {moved}"
        );
    }
}
