//! Placement: which node holds shard i of a chunk. A pure function of the chunk and the
//! group's members, so every node computes the same answer with no coordination.
//!
//! Each shard position ranks the members by its own score, BLAKE3(cid ‖ position ‖ node)
//! (rendezvous hashing per position), and positions are matched to distinct members by
//! deferred acceptance: positions propose down their rankings, a member keeps the
//! proposals that score highest for it and turns the others away. The result is the
//! unique position-optimal stable matching, whatever the order of proposals, and it is
//! robust: removing a member moves the shards it held plus a few displaced by their
//! replacements (0.73 shards per chunk for 4+2 on 10 nodes, against a floor of
//! (k+m)/n = 0.6). Giving shard i to the i-th ranked member instead, as forge did first,
//! shifted every shard ranked below the removed member: about 2.1 per chunk.

use std::collections::{BTreeMap, VecDeque};

use forge_crypto::{Cid, NodeId};

fn score(cid: &Cid, position: usize, node: &NodeId) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("forge-vault 2026 v2 shard placement");
    hasher.update(cid.as_bytes());
    hasher.update(&u64::try_from(position).unwrap_or(u64::MAX).to_le_bytes());
    hasher.update(node.as_bytes());
    *hasher.finalize().as_bytes()
}

/// The node for each of a chunk's `shard_count` shards, in shard order: distinct nodes
/// when the group has at least `shard_count` members; otherwise each member holds at
/// most ⌈shard_count / members⌉ shards of the chunk. Empty for an empty group.
#[must_use]
pub fn place_shards(cid: &Cid, shard_count: usize, members: &[NodeId]) -> Vec<NodeId> {
    let mut members = members.to_vec();
    members.sort_unstable();
    members.dedup();
    if members.is_empty() {
        return Vec::new();
    }
    let capacity = shard_count.div_ceil(members.len());
    // Each position's ranking of the members, best first.
    let rankings: Vec<Vec<([u8; 32], NodeId)>> = (0..shard_count)
        .map(|position| {
            let mut ranked: Vec<([u8; 32], NodeId)> = members
                .iter()
                .map(|node| (score(cid, position, node), *node))
                .collect();
            ranked.sort_unstable_by(|a, b| b.cmp(a));
            ranked
        })
        .collect();
    let mut next_choice = vec![0usize; shard_count];
    let mut held: BTreeMap<NodeId, Vec<([u8; 32], usize)>> = BTreeMap::new();
    let mut free: VecDeque<usize> = (0..shard_count).collect();
    while let Some(position) = free.pop_front() {
        // Capacity times members ≥ positions, so a position always finds a member that
        // keeps it before its ranking runs out.
        let Some(&(score, node)) = rankings[position].get(next_choice[position]) else {
            debug_assert!(false, "position {position} ran out of members");
            continue;
        };
        next_choice[position] += 1;
        let holding = held.entry(node).or_default();
        holding.push((score, position));
        if holding.len() > capacity {
            // The member turns away the proposal that scores lowest for it.
            holding.sort_unstable_by(|a, b| b.cmp(a));
            if let Some((_, turned_away)) = holding.pop() {
                free.push_back(turned_away);
            }
        }
    }
    let mut placed = vec![members[0]; shard_count];
    for (node, holding) in held {
        for (_, position) in holding {
            placed[position] = node;
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn node(index: u32) -> NodeId {
        NodeId::from_bytes(*blake3::hash(&index.to_le_bytes()).as_bytes())
    }

    #[test]
    fn distinct_nodes_when_the_group_is_large_enough_and_stable_under_reordering() {
        let members: Vec<NodeId> = (0..8).map(node).collect();
        let cid = Cid::of(b"chunk");
        let placed = place_shards(&cid, 6, &members);
        let distinct: BTreeSet<_> = placed.iter().collect();
        assert_eq!(distinct.len(), 6);
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(place_shards(&cid, 6, &reversed), placed);
        assert_eq!(place_shards(&cid, 3, &[node(1)]), vec![node(1); 3]);
        assert!(place_shards(&cid, 3, &[]).is_empty());
        // Fewer members than shards: none holds more than its share, rounded up.
        let small = place_shards(&cid, 6, &members[..4]);
        for member in &members[..4] {
            let held = small.iter().filter(|placed| *placed == member).count();
            assert!(held <= 2, "{held}");
        }
    }

    /// Mean shards moved per chunk when one of `nodes` members leaves, over `chunks`.
    fn mean_moved(nodes: u32, shards: usize, chunks: u32, removed: u32) -> f64 {
        let members: Vec<NodeId> = (0..nodes).map(node).collect();
        let without: Vec<NodeId> = members
            .iter()
            .copied()
            .filter(|member| *member != node(removed))
            .collect();
        let mut moved = 0usize;
        for index in 0..chunks {
            let cid = Cid::of(&index.to_le_bytes());
            let before = place_shards(&cid, shards, &members);
            let after = place_shards(&cid, shards, &without);
            moved += before
                .iter()
                .zip(&after)
                .filter(|(before, after)| before != after)
                .count();
        }
        f64::from(u32::try_from(moved).unwrap_or(u32::MAX)) / f64::from(chunks)
    }

    #[test]
    fn removing_one_of_ten_nodes_moves_about_six_tenths_of_a_shard_per_chunk_of_4_plus_2() {
        let mean = mean_moved(10, 6, 4000, 3);
        // (k+m)/n = 0.6 is the floor (the removed node's own shards); the matching adds
        // a few displaced ones (0.73 measured).
        assert!((0.55..=0.8).contains(&mean), "{mean}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// For any group size and layout, one member leaving moves about (k+m)/n shards
        /// per chunk: at least the floor, and not much more.
        #[test]
        fn movement_on_removal_stays_near_the_floor(
            nodes in 4u32..16,
            shards in 2usize..9,
            removed in 0u32..16,
        ) {
            prop_assume!(removed < nodes && shards <= nodes as usize);
            let mean = mean_moved(nodes, shards, 600, removed);
            let floor = shards as f64 / f64::from(nodes);
            prop_assert!(mean <= floor * 1.5 + 0.05, "mean {} floor {}", mean, floor);
            prop_assert!(mean >= floor * 0.75, "mean {} floor {}", mean, floor);
        }
    }
}
