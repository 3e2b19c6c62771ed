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
//! (k+m)/n = 0.6; at most 1.5 times the floor over groups of 4-15 members and layouts
//! narrower than the group; 1.64 of 6 shards when the group is exactly as wide as its
//! layout). With fewer members than shards, matching goes in layers of one shard per
//! member. Giving shard i to the i-th ranked member instead, as forge did first,
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

/// The members in shard `position`'s rendezvous order for chunk `cid`, best first: where
/// that shard goes when its placed node cannot take it (the first of these not already
/// holding a shard of the chunk).
#[must_use]
pub fn rank_for_position(cid: &Cid, position: usize, members: &[NodeId]) -> Vec<NodeId> {
    let mut ranked: Vec<([u8; 32], NodeId)> = members
        .iter()
        .map(|node| (score(cid, position, node), *node))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, node)| node).collect()
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
    let mut placed = vec![members[0]; shard_count];
    // Layers of one shard per member: with fewer members than shards, the positions a
    // layer leaves unmatched go to the next. (One layer with a capacity of several per
    // member instead let every position reach for its first choice as soon as one member
    // left a group as wide as the layout, moving 2.5 shards of 6 instead of about 1.)
    let mut waiting: Vec<usize> = (0..shard_count).collect();
    while !waiting.is_empty() {
        let (matched, unmatched) = match_layer(&waiting, &rankings);
        debug_assert!(!matched.is_empty(), "a layer matches at least one position");
        if matched.is_empty() {
            break;
        }
        for (position, node) in matched {
            placed[position] = node;
        }
        waiting = unmatched;
    }
    placed
}

/// Deferred acceptance of `positions` to members, one each: positions propose down their
/// rankings, a member keeps the proposal that scores highest for it. The matched pairs,
/// and the positions every member turned away (when positions outnumber members).
fn match_layer(
    positions: &[usize],
    rankings: &[Vec<([u8; 32], NodeId)>],
) -> (Vec<(usize, NodeId)>, Vec<usize>) {
    let mut next_choice: BTreeMap<usize, usize> = positions.iter().map(|p| (*p, 0)).collect();
    let mut held: BTreeMap<NodeId, ([u8; 32], usize)> = BTreeMap::new();
    let mut free: VecDeque<usize> = positions.iter().copied().collect();
    let mut unmatched = Vec::new();
    while let Some(position) = free.pop_front() {
        let choice = next_choice.entry(position).or_default();
        let Some(&(score, node)) = rankings[position].get(*choice) else {
            unmatched.push(position);
            continue;
        };
        *choice += 1;
        match held.get(&node) {
            Some(&(kept_score, _)) if kept_score >= score => free.push_back(position),
            Some(&(_, displaced)) => {
                held.insert(node, (score, position));
                free.push_back(displaced);
            }
            None => {
                held.insert(node, (score, position));
            }
        }
    }
    unmatched.sort_unstable();
    (
        held.into_iter()
            .map(|(node, (_, position))| (position, node))
            .collect(),
        unmatched,
    )
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

    #[test]
    fn a_group_as_wide_as_its_layout_moves_under_two_shards_when_a_member_leaves() {
        // 3 nodes and 2+1, or 6 and 4+2: the layout's width equals the group's size, so
        // after a removal one node holds two shards of a chunk (a degraded layout repair
        // must report). The removed node's shard moves, and the shard the matching leaves
        // for the second layer often differs from it: 1.64 for 6 nodes (2.47 when one
        // layer let each member hold two).
        for (nodes, shards) in [(3, 3), (6, 6)] {
            let mean = mean_moved(nodes, shards, 2000, 1);
            assert!(
                (0.95..=1.75).contains(&mean),
                "{nodes} nodes, {shards} shards: {mean}"
            );
        }
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
            // A layout as wide as the group degrades on any removal: tested above.
            prop_assume!(removed < nodes && shards < nodes as usize);
            let mean = mean_moved(nodes, shards, 600, removed);
            let floor = shards as f64 / f64::from(nodes);
            // Measured over every size and layout here: at most 1.47 times the floor (a
            // layout one narrower than the group), 1.22 for 4+2 on 10 nodes.
            prop_assert!(mean <= floor * 1.6 + 0.05, "mean {} floor {}", mean, floor);
            prop_assert!(mean >= floor * 0.75, "mean {} floor {}", mean, floor);
        }
    }
}
