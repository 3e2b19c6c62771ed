//! The reference index: every cid a snapshot reaches, as a content-defined Merkle tree over
//! the sorted cids (prolly-tree style). It is plaintext, so a vault without keys can sync,
//! garbage-collect, audit and fsck with it. Two versions diff in time proportional to their
//! difference, because equal subtrees have equal ids and are skipped.
//!
//! ```text
//! node    = "FR" | version:u8=1 | level:u8 | count:u32le | entry[32] * count
//! node id = BLAKE3(node)           (stored in the Objects column like any object)
//! ```
//!
//! Level 0 nodes hold sorted, unique cids. A level n node holds the ids of its level n-1
//! children in key order. Boundary rule (frozen with version 1): at every level, an entry
//! closes its node when its last byte (cids and node ids are both uniformly distributed) is
//! below [`BOUNDARY_BYTE_BELOW`] (average fan-out 64), or when the node is full
//! ([`NODE_ENTRIES_MAX`]). Boundaries depend only on the entries themselves, so a change
//! rewrites only the nodes on its path.

use std::collections::BTreeSet;

use forge_crypto::Cid;

/// Version of the node encoding and the boundary rule.
pub const REFINDEX_FORMAT_VERSION: u8 = 1;
/// An entry whose last byte is below this closes its node: 4/256, average fan-out 64.
pub const BOUNDARY_BYTE_BELOW: u8 = 4;
/// No node holds more entries than this.
pub const NODE_ENTRIES_MAX: usize = 1024;
const HEADER_BYTES: usize = 2 + 1 + 1 + 4;

/// Errors reading an index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RefIndexError {
    /// A node that does not decode, is not well-formed, or does not match its id.
    #[error("reference index node {id} is corrupt: {reason}")]
    Corrupt { id: Cid, reason: String },
    /// A node the index names is not stored.
    #[error("reference index node {id} is missing")]
    Missing { id: Cid },
}

/// A decoded node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// 0 for leaves (entries are cids); n for nodes whose entries are level n-1 node ids.
    pub level: u8,
    /// The entries.
    pub entries: Vec<Cid>,
}

impl Node {
    /// The node's encoding.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_BYTES + 32 * self.entries.len());
        bytes.extend_from_slice(b"FR");
        bytes.push(REFINDEX_FORMAT_VERSION);
        bytes.push(self.level);
        let count = u32::try_from(self.entries.len()).expect("nodes hold at most 1024 entries");
        bytes.extend_from_slice(&count.to_le_bytes());
        for entry in &self.entries {
            bytes.extend_from_slice(entry.as_bytes());
        }
        bytes
    }

    /// Decodes and checks a node stored under `id`.
    ///
    /// # Errors
    /// [`RefIndexError::Corrupt`].
    pub fn decode(id: &Cid, bytes: &[u8]) -> Result<Self, RefIndexError> {
        let corrupt = |reason: String| RefIndexError::Corrupt { id: *id, reason };
        if !id.matches(bytes) {
            return Err(corrupt("does not match its id".into()));
        }
        if bytes.len() < HEADER_BYTES || &bytes[..2] != b"FR" || bytes[2] != REFINDEX_FORMAT_VERSION
        {
            return Err(corrupt("bad header".into()));
        }
        let count = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        if count > NODE_ENTRIES_MAX || bytes.len() != HEADER_BYTES + 32 * count {
            return Err(corrupt(format!("{count} entries in {} bytes", bytes.len())));
        }
        let entries: Vec<Cid> = bytes[HEADER_BYTES..]
            .chunks_exact(32)
            .map(|chunk| Cid::from_slice(chunk).expect("chunks_exact(32) gives 32 bytes"))
            .collect();
        let level = bytes[3];
        if level == 0 && entries.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(corrupt("leaf entries not sorted and unique".into()));
        }
        if level > 0 && entries.is_empty() {
            return Err(corrupt("an inner node without children".into()));
        }
        Ok(Self { level, entries })
    }
}

/// Builds the index of `cids` (sorted and deduplicated here), handing each node to `store`
/// as (id, encoding). Returns the root id; an empty set's root is an empty leaf.
pub fn build(cids: &[Cid], mut store: impl FnMut(Cid, Vec<u8>)) -> Cid {
    let mut entries: Vec<Cid> = cids.to_vec();
    entries.sort_unstable();
    entries.dedup();
    let mut level = 0u8;
    loop {
        let mut parents = Vec::new();
        let mut current = Vec::new();
        let count = entries.len();
        for (index, entry) in entries.into_iter().enumerate() {
            current.push(entry);
            let closes =
                entry.as_bytes()[31] < BOUNDARY_BYTE_BELOW || current.len() >= NODE_ENTRIES_MAX;
            if closes || index + 1 == count {
                let bytes = Node {
                    level,
                    entries: std::mem::take(&mut current),
                }
                .encode();
                let id = Cid::of(&bytes);
                store(id, bytes);
                parents.push(id);
            }
        }
        match parents.as_slice() {
            [] => {
                let bytes = Node {
                    level: 0,
                    entries: Vec::new(),
                }
                .encode();
                let id = Cid::of(&bytes);
                store(id, bytes);
                return id;
            }
            [root] => return *root,
            _ => {}
        }
        entries = parents;
        level = level
            .checked_add(1)
            .expect("fewer than 256 levels: fan-out is at least 2 on average");
    }
}

/// Every cid in the index under `root`, in order, and every node id visited.
///
/// # Errors
/// Missing or corrupt nodes.
pub fn walk(
    root: &Cid,
    get: impl Fn(&Cid) -> Option<Vec<u8>>,
) -> Result<(Vec<Cid>, Vec<Cid>), RefIndexError> {
    let (mut cids, mut nodes) = (Vec::new(), Vec::new());
    let mut frontier = vec![*root];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for id in frontier {
            nodes.push(id);
            let node = load(&id, &get)?;
            if node.level == 0 {
                cids.extend(node.entries)
            } else {
                next.extend(node.entries)
            }
        }
        frontier = next;
    }
    Ok((cids, nodes))
}

/// Cids only in `a` and only in `b`. Node ids present on both sides stand for identical
/// subtrees and are pruned level by level, so the work follows the difference.
///
/// # Errors
/// Missing or corrupt nodes.
pub fn diff(
    a: &Cid,
    b: &Cid,
    get: impl Fn(&Cid) -> Option<Vec<u8>>,
) -> Result<(Vec<Cid>, Vec<Cid>), RefIndexError> {
    let (mut a_frontier, mut b_frontier) = (vec![*a], vec![*b]);
    let (mut a_leaves, mut b_leaves) = (BTreeSet::new(), BTreeSet::new());
    while !a_frontier.is_empty() || !b_frontier.is_empty() {
        let a_ids: BTreeSet<Cid> = a_frontier.iter().copied().collect();
        let b_ids: BTreeSet<Cid> = b_frontier.iter().copied().collect();
        let mut next = (Vec::new(), Vec::new());
        for (frontier, other, leaves, next) in [
            (&a_frontier, &b_ids, &mut a_leaves, &mut next.0),
            (&b_frontier, &a_ids, &mut b_leaves, &mut next.1),
        ] {
            for id in frontier.iter().filter(|id| !other.contains(id)) {
                let node = load(id, &get)?;
                if node.level == 0 {
                    leaves.extend(node.entries)
                } else {
                    next.extend(node.entries)
                }
            }
        }
        (a_frontier, b_frontier) = next;
    }
    Ok((
        a_leaves.difference(&b_leaves).copied().collect(),
        b_leaves.difference(&a_leaves).copied().collect(),
    ))
}

fn load(id: &Cid, get: &impl Fn(&Cid) -> Option<Vec<u8>>) -> Result<Node, RefIndexError> {
    let bytes = get(id).ok_or(RefIndexError::Missing { id: *id })?;
    Node::decode(id, &bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use proptest::prelude::*;

    fn cid(index: u32) -> Cid {
        Cid::of(&index.to_le_bytes())
    }

    fn build_into(cids: &[Cid], nodes: &mut BTreeMap<Cid, Vec<u8>>) -> Cid {
        build(cids, |id, bytes| {
            nodes.insert(id, bytes);
        })
    }

    #[test]
    fn walk_returns_every_cid_sorted_and_one_change_rewrites_few_nodes() {
        let cids: Vec<Cid> = (0..20_000).map(cid).collect();
        let mut nodes = BTreeMap::new();
        let root = build_into(&cids, &mut nodes);
        let (walked, visited) = walk(&root, |id| nodes.get(id).cloned()).unwrap();
        let mut sorted = cids.clone();
        sorted.sort();
        assert_eq!(walked, sorted);
        assert!(
            visited.len() > 200,
            "about 20000/64 leaves: {}",
            visited.len()
        );

        let mut edited = cids.clone();
        edited[1234] = cid(99_999);
        let mut edited_nodes = BTreeMap::new();
        let edited_root = build_into(&edited, &mut edited_nodes);
        let new_nodes = edited_nodes
            .keys()
            .filter(|id| !nodes.contains_key(id))
            .count();
        assert!(
            new_nodes <= 8,
            "a one-cid change rewrites only its path: {new_nodes} new nodes"
        );
        let mut all = nodes.clone();
        all.extend(edited_nodes);
        let (only_a, only_b) = diff(&root, &edited_root, |id| all.get(id).cloned()).unwrap();
        assert_eq!((only_a, only_b), (vec![cid(1234)], vec![cid(99_999)]));
    }

    #[test]
    fn damaged_or_missing_nodes_are_errors() {
        let mut nodes = BTreeMap::new();
        let root = build_into(&(0..500).map(cid).collect::<Vec<_>>(), &mut nodes);
        let victim = *nodes.keys().next().unwrap();
        let mut damaged = nodes.clone();
        damaged.get_mut(&victim).unwrap()[10] ^= 1;
        assert!(walk(&root, |id| damaged.get(id).cloned()).is_err());
        nodes.remove(&victim);
        assert!(matches!(
            walk(&root, |id| nodes.get(id).cloned()),
            Err(RefIndexError::Missing { .. })
        ));
        let empty = build(&[], |_, _| {});
        assert!(
            Node::decode(
                &empty,
                &Node {
                    level: 0,
                    entries: Vec::new()
                }
                .encode()
            )
            .is_ok()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn diff_is_the_set_difference(a in proptest::collection::btree_set(0u32..5000, 0..800), b in proptest::collection::btree_set(0u32..5000, 0..800)) {
            let (a_cids, b_cids): (Vec<Cid>, Vec<Cid>) = (a.iter().map(|i| cid(*i)).collect(), b.iter().map(|i| cid(*i)).collect());
            let mut nodes = BTreeMap::new();
            let (a_root, b_root) = (build_into(&a_cids, &mut nodes), build_into(&b_cids, &mut nodes));
            let (only_a, only_b) = diff(&a_root, &b_root, |id| nodes.get(id).cloned()).unwrap();
            let expected_a: BTreeSet<Cid> = a.difference(&b).map(|i| cid(*i)).collect();
            let expected_b: BTreeSet<Cid> = b.difference(&a).map(|i| cid(*i)).collect();
            prop_assert_eq!(only_a.into_iter().collect::<BTreeSet<_>>(), expected_a);
            prop_assert_eq!(only_b.into_iter().collect::<BTreeSet<_>>(), expected_b);
            prop_assert_eq!(a == b, a_root == b_root, "equal sets, equal roots");
        }
    }
}
